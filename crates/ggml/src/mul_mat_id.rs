//! MUL_MAT_ID, the expert matmuls of mixture-of-experts models: gathered per expert, computed as
//! MUL_MATs through [`matmul::compute`], scattered back.
//!
//! ggml (b11434): src0 = experts `[K, M, n_expert]`, src1 = `[K, r, n_tokens]` (r = 1 broadcast, or
//! n_used), ids = I32 `[n_used, n_tokens]` (a strided view of an argsort), dst = F32
//! `[M, n_used, n_tokens]`; slice (i, t) of dst is `expert ids[i, t]` times src1 row `(i % r, t)`.
//! For each expert that some token uses, the rows routed to it are copied into one contiguous
//! `[K, count]` activation, multiplied by the expert's `[K, M]` slice (a weight: staged to fp16
//! once, one shape-shared program per (K, M, column bucket), never per expert), and the
//! `[M, count]` result is copied to each (i, t) slice. Every expert's product goes through the
//! same dispatch and fallback as a MUL_MAT, so every claimed op is computed.
//!
//! Not yet: packing several experts into one dispatch (few tokens per expert are padded to the
//! smallest column bucket), small-row buckets, expert staging limits beyond
//! `GGML_ANE_STAGE_MAX_MB`.

use crate::boundary::desc;
use crate::ffi::*;
use crate::ggml;
use crate::matmul::{self, Group, Member, Operand};
use crate::support::{self, MoeShape, Policy, TensorDesc};

/// Which (slot, token) pairs each expert takes, from ids.
///
/// # Safety
/// `ids` points at an I32 tensor described by `d` (`[n_used, n_tokens]`, rows of 4-byte elements).
unsafe fn routes(
    ids: *const u8,
    d: &TensorDesc,
    s: &MoeShape,
) -> Result<Vec<Vec<(usize, usize)>>, String> {
    let mut by_expert = vec![Vec::new(); s.n_expert];
    for t in 0..s.n_tokens {
        for i in 0..s.n_used {
            // SAFETY: (i, t) is inside ids' shape; elements are 4-byte I32.
            let e = unsafe { ids.add(d.offset(i, t, 0, 0)).cast::<i32>().read_unaligned() };
            let e = usize::try_from(e)
                .ok()
                .filter(|&e| e < s.n_expert)
                .ok_or_else(|| format!("MUL_MAT_ID: expert id {e} outside 0..{}", s.n_expert))?;
            by_expert[e].push((i, t));
        }
    }
    Ok(by_expert)
}

/// Computes a claimed MUL_MAT_ID node.
///
/// # Safety
/// `node` is a MUL_MAT_ID of the graph ggml handed to `graph_compute`, with allocated host tensors.
pub(crate) unsafe fn compute(
    cx: &matmul::Context<'_>,
    g: &ggml::Ggml,
    node: &ggml_tensor,
) -> Result<usize, String> {
    // SAFETY: a MUL_MAT_ID node has three valid sources.
    let (s0, s1, ids) = unsafe { (&*node.src[0], &*node.src[1], &*node.src[2]) };
    let (d0, d1, di, dd) = (desc(s0), desc(s1), desc(ids), desc(node));
    let info = g
        .type_info(s0.type_)
        .ok_or("MUL_MAT_ID: unknown src0 type")?;
    let f32_info = g.type_info(GGML_TYPE_F32).ok_or("no f32 traits")?;
    let s = support::mul_mat_id(&d0, &d1, &di, &dd, Some(info), Policy { min_batch: 0 })
        .map_err(|e| format!("unsupported MUL_MAT_ID: {}", e.name()))?;
    if [s0.data, s1.data, ids.data, node.data]
        .iter()
        .any(|p| p.is_null())
    {
        return Err("MUL_MAT_ID tensor without data".into());
    }
    // SAFETY: ids is this node's I32 source, described by di.
    let by_expert = unsafe { routes(ids.data as *const u8, &di, &s)? };
    let weight = g.is_weight(s0);
    let mut experts = 0;
    let (mut x, mut y) = (Vec::<f32>::new(), Vec::<f32>::new());
    for (e, rows) in by_expert.iter().enumerate().filter(|(_, r)| !r.is_empty()) {
        let n = rows.len();
        x.clear();
        x.resize(n * s.k, 0.0);
        for (j, &(i, t)) in rows.iter().enumerate() {
            let off = d1.row_offset(i % s.r, t, 0);
            // SAFETY: row (i % r, t) of src1 holds K contiguous f32 (checked by mul_mat_id).
            let src = unsafe {
                std::slice::from_raw_parts((s1.data as *const u8).add(off).cast::<f32>(), s.k)
            };
            x[j * s.k..(j + 1) * s.k].copy_from_slice(src);
        }
        y.clear();
        y.resize(n * s.m, 0.0);
        let expert = TensorDesc {
            ne: [s.k as i64, s.m as i64, 1, 1],
            nb: [d0.nb[0], d0.nb[1], d0.nb[1] * s.m, d0.nb[1] * s.m],
            ty: d0.ty,
        };
        let group = Group {
            src1: Operand {
                desc: TensorDesc::contiguous(GGML_TYPE_F32, 4, [s.k as i64, n as i64, 1, 1]),
                data: x.as_ptr().cast(),
            },
            src1_info: f32_info,
            members: vec![Member {
                src0: Operand {
                    desc: expert,
                    // SAFETY: expert e's slice starts e * nb[2] bytes into src0.
                    data: unsafe { (s0.data as *const u8).add(e * d0.nb[2]) },
                },
                src0_info: info,
                dst: Operand {
                    desc: TensorDesc::contiguous(GGML_TYPE_F32, 4, [s.m as i64, n as i64, 1, 1]),
                    data: y.as_mut_ptr().cast(),
                },
            }],
            weights: weight,
            speculative: 0,
        };
        // SAFETY: the expert slice is a readable weight of this graph; x and y are host buffers
        // of the described shapes that nothing else aliases.
        unsafe { matmul::compute(cx, &group) };
        for (j, &(i, t)) in rows.iter().enumerate() {
            let off = dd.row_offset(i, t, 0);
            // SAFETY: slice (i, t) of dst holds M contiguous f32 (checked by mul_mat_id).
            let dst = unsafe {
                std::slice::from_raw_parts_mut((node.data as *mut u8).add(off).cast::<f32>(), s.m)
            };
            dst.copy_from_slice(&y[j * s.m..(j + 1) * s.m]);
        }
        experts += 1;
    }
    Ok(experts)
}
