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
//! Few tokens per expert: with `GGML_ANE_MOE=on` consecutive experts run in packs, one dispatch
//! per pack with small column buckets (`ane_plan::moe`, [`matmul::compute_pack`]); a pack that
//! fails, or experts that do not pack, go one expert per dispatch as above.

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

/// What a MUL_MAT_ID node took: experts computed, and pack dispatches among them.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Done {
    /// Experts some token was routed to.
    pub experts: usize,
    /// Packs of experts run by one dispatch each.
    pub packs: usize,
}

/// Computes a claimed MUL_MAT_ID node.
///
/// # Safety
/// `node` is a MUL_MAT_ID of the graph ggml handed to `graph_compute`, with allocated host tensors.
pub(crate) unsafe fn compute(
    cx: &matmul::Context<'_>,
    g: &ggml::Ggml,
    node: &ggml_tensor,
) -> Result<Done, String> {
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
    let io = Io {
        s,
        src1: s1.data as *const u8,
        d1,
        dst: node.data as *mut u8,
        dd,
    };
    let weight = g.is_weight(s0);
    // Experts stacked back to back, so a pack of them is one [K, pack * M] matrix.
    let stacked = d0.nb[2] == d0.nb[1] * s.m;
    let pack = (crate::config::Config::get().moe_pack && stacked)
        .then(|| ane_plan::moe::pack_size(cx.planner, s.k, s.m, s.n_expert))
        .flatten()
        .filter(|_| cx.planner.layout == ane_plan::Layout::Tokens);
    let mut done = Done::default();
    let mut singles: Vec<usize> = Vec::new();
    match pack {
        Some(n) => {
            for (p, experts) in by_expert.chunks(n).enumerate() {
                let e0 = p * n;
                let routed = (e0..e0 + experts.len()).filter(|&e| !by_expert[e].is_empty());
                if experts.len() < n {
                    singles.extend(routed);
                    continue;
                }
                let counts: Vec<usize> = experts.iter().map(Vec::len).collect();
                let split = ane_plan::moe::split_pack(cx.planner, &counts);
                singles.extend(split.alone.iter().map(|&h| e0 + h));
                let Some(bucket) = split.bucket else {
                    continue;
                };
                // The pack's rows: experts that run alone get none here.
                let packed: Vec<&[(usize, usize)]> = experts
                    .iter()
                    .enumerate()
                    .map(|(h, r)| {
                        if split.alone.contains(&h) {
                            &[][..]
                        } else {
                            &r[..]
                        }
                    })
                    .collect();
                let pack_desc = TensorDesc {
                    ne: [s.k as i64, (n * s.m) as i64, 1, 1],
                    nb: [d0.nb[0], d0.nb[1], d0.nb[1] * n * s.m, d0.nb[1] * n * s.m],
                    ty: d0.ty,
                };
                let mut x = vec![0f32; n * bucket * s.k];
                for (h, rows) in packed.iter().enumerate() {
                    let at = h * bucket * s.k;
                    // SAFETY: the node's tensors, checked by `support::mul_mat_id`.
                    unsafe { io.gather(rows, &mut x[at..at + rows.len() * s.k]) };
                }
                let mut y = vec![0f32; n * bucket * s.m];
                let mut job = matmul::Pack {
                    experts: Operand {
                        desc: pack_desc,
                        // SAFETY: expert e0's slice starts e0 * nb[2] bytes into src0.
                        data: unsafe { (s0.data as *const u8).add(e0 * d0.nb[2]) },
                    },
                    info,
                    heads: n,
                    m: s.m,
                    bucket,
                    x: &x,
                    f32_info,
                    y: &mut y,
                    weights: weight,
                };
                // SAFETY: the pack's experts are a readable slice of src0.
                match unsafe { matmul::compute_pack(cx, &mut job) } {
                    Ok(()) => {
                        for (h, rows) in packed.iter().enumerate() {
                            let at = h * bucket * s.m;
                            // SAFETY: as for the gather.
                            unsafe { io.scatter(rows, &y[at..at + rows.len() * s.m]) };
                        }
                        let products = packed.iter().filter(|r| !r.is_empty()).count();
                        done.packs += 1;
                        done.experts += products;
                        cx.stats
                            .ops_offloaded
                            .fetch_add(products as u64, std::sync::atomic::Ordering::Relaxed);
                    }
                    Err(e) => {
                        if crate::config::Config::get().debug {
                            eprintln!("ggml-ane: expert pack failed, one expert at a time: {e}");
                        }
                        singles.extend((0..n).filter(|&h| !packed[h].is_empty()).map(|h| e0 + h));
                    }
                }
            }
        }
        None => singles.extend((0..s.n_expert).filter(|&e| !by_expert[e].is_empty())),
    }
    let (mut x, mut y) = (Vec::<f32>::new(), Vec::<f32>::new());
    for e in singles {
        let rows = &by_expert[e];
        let n = rows.len();
        x.clear();
        x.resize(n * s.k, 0.0);
        // SAFETY: the node's tensors, checked by `support::mul_mat_id`.
        unsafe { io.gather(rows, &mut x) };
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
        // SAFETY: as for the gather.
        unsafe { io.scatter(rows, &y) };
        done.experts += 1;
    }
    Ok(done)
}

/// The node's activations and outputs, for moving one expert's rows in and out.
struct Io {
    s: MoeShape,
    src1: *const u8,
    d1: TensorDesc,
    dst: *mut u8,
    dd: TensorDesc,
}

impl Io {
    /// Copies src1 row `(i % r, t)` of each routed pair into consecutive `K`-rows of `x`.
    ///
    /// # Safety
    /// `src1` is the node's src1, described by `d1` and accepted by `support::mul_mat_id`.
    unsafe fn gather(&self, rows: &[(usize, usize)], x: &mut [f32]) {
        let k = self.s.k;
        for (j, &(i, t)) in rows.iter().enumerate() {
            let off = self.d1.row_offset(i % self.s.r, t, 0);
            // SAFETY: row (i % r, t) of src1 holds K contiguous f32 (checked by mul_mat_id).
            let src = unsafe { std::slice::from_raw_parts(self.src1.add(off).cast::<f32>(), k) };
            x[j * k..(j + 1) * k].copy_from_slice(src);
        }
    }

    /// Copies consecutive `M`-rows of `y` to dst slice `(i, t)` of each routed pair.
    ///
    /// # Safety
    /// `dst` is the node's output, described by `dd` and accepted by `support::mul_mat_id`.
    unsafe fn scatter(&self, rows: &[(usize, usize)], y: &[f32]) {
        let m = self.s.m;
        for (j, &(i, t)) in rows.iter().enumerate() {
            let off = self.dd.row_offset(i, t, 0);
            // SAFETY: slice (i, t) of dst holds M contiguous f32 (checked by mul_mat_id).
            let dst = unsafe { std::slice::from_raw_parts_mut(self.dst.add(off).cast::<f32>(), m) };
            dst.copy_from_slice(&y[j * m..(j + 1) * m]);
        }
    }
}
