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

use crate::ffi::*;
use crate::ggml::{self, TypeInfo};
use crate::matmul::{self, Group, Member, Operand};
use crate::placement;
use crate::support::{self, MoeShape, Policy, TensorDesc};
use crate::view::desc;
use crate::view::fetch::Fetch;

/// What a MUL_MAT_ID node took: experts computed, and pack dispatches among them.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Done {
    /// Experts some token was routed to.
    pub experts: usize,
    /// Packs of experts run by one dispatch each.
    pub packs: usize,
}

/// A MUL_MAT_ID's operands as views.
struct Node {
    s: MoeShape,
    experts: Operand,
    info: TypeInfo,
    src1: Operand,
    f32_info: TypeInfo,
    ids: Operand,
    dst: Operand,
    weight: bool,
}

/// Computes a claimed MUL_MAT_ID node.
///
/// # Safety
/// `node` is a MUL_MAT_ID of the graph ggml handed to `graph_compute`, with allocated host tensors.
pub(crate) unsafe fn compute(
    cx: &matmul::Context<'_>,
    g: &ggml::Ggml,
    fetch: &mut Fetch<'_>,
    node: &ggml_tensor,
) -> Result<Done, String> {
    // SAFETY: a MUL_MAT_ID node has three valid sources.
    let (s0, s1, ids) = unsafe { (&*node.src[0], &*node.src[1], &*node.src[2]) };
    let (d0, d1, di, dd) = (desc(s0), desc(s1), desc(ids), desc(node));
    let info = g
        .type_info(s0.type_)
        .ok_or("MUL_MAT_ID: unknown src0 type")?;
    let f32_info = g.type_info(GGML_TYPE_F32).ok_or("no f32 traits")?;
    let i32_info = g.type_info(GGML_TYPE_I32).ok_or("no i32 traits")?;
    let s = support::mul_mat_id(&d0, &d1, &di, &dd, Some(info), Policy { min_batch: 0 })
        .map_err(|e| format!("unsupported MUL_MAT_ID: {}", e.name()))?;
    if [s0.data, s1.data, ids.data, node.data]
        .iter()
        .any(|p| p.is_null())
    {
        return Err("MUL_MAT_ID tensor without data".into());
    }
    let weight = g.is_weight(s0);
    let act = |t| placement::activation_access(g, t);
    // SAFETY: the node's tensors, allocated, of their shapes, host memory where the residence
    // rules say Direct (the caller's contract); the output is apart from its sources.
    let n = unsafe {
        Node {
            s,
            experts: fetch.input(s0, &info, placement::weight_access(g, s0), weight)?,
            info,
            src1: fetch.input(s1, &f32_info, act(s1), false)?,
            f32_info,
            ids: fetch.input(ids, &i32_info, act(ids), false)?,
            dst: fetch.output(std::ptr::from_ref(node).cast_mut(), &f32_info, act(node))?,
            weight,
        }
    };
    run(cx, &n)
}

/// Which (slot, token) pairs each expert takes, from ids.
fn routes(n: &Node) -> Result<Vec<Vec<(usize, usize)>>, String> {
    let s = &n.s;
    let mut by_expert = vec![Vec::new(); s.n_expert];
    for t in 0..s.n_tokens {
        for i in 0..s.n_used {
            let e = n.ids.get_i32(i, t, 0, 0);
            let e = usize::try_from(e)
                .ok()
                .filter(|&e| e < s.n_expert)
                .ok_or_else(|| format!("MUL_MAT_ID: expert id {e} outside 0..{}", s.n_expert))?;
            by_expert[e].push((i, t));
        }
    }
    Ok(by_expert)
}

/// Gathers, multiplies (packs of experts, then single experts) and scatters.
fn run(cx: &matmul::Context<'_>, n: &Node) -> Result<Done, String> {
    let s = n.s;
    let by_expert = routes(n)?;
    let d0 = n.experts.desc;
    let pack = (crate::config::Config::get().moe_pack && s.stacked)
        .then(|| ane_plan::moe::pack_size(cx.planner, s.k, s.m, s.n_expert))
        .flatten();
    let mut done = Done::default();
    let mut singles: Vec<usize> = Vec::new();
    match pack {
        Some(g) => {
            // The packs that dispatch, with their bucket and the experts that run alone.
            let mut plan: Vec<(usize, usize, Vec<usize>)> = Vec::new();
            for (p, experts) in by_expert.chunks(g).enumerate() {
                let e0 = p * g;
                let routed = (e0..e0 + experts.len()).filter(|&e| !by_expert[e].is_empty());
                if experts.len() < g {
                    singles.extend(routed);
                    continue;
                }
                let counts: Vec<usize> = experts.iter().map(Vec::len).collect();
                let split = ane_plan::moe::split_pack(cx.planner, &counts);
                singles.extend(split.alone.iter().map(|&h| e0 + h));
                if let Some(bucket) = split.bucket {
                    plan.push((e0, bucket, split.alone));
                }
            }
            let view = |e0: usize| {
                n.experts.sub(
                    d0.row_offset(0, e0, 0),
                    [s.k as i64, (g * s.m) as i64, 1, 1],
                )
            };
            // Each pack's weights are converted while the one before it runs (when they stream;
            // weights that fit are staged resident by the same call).
            let ahead = n.weight && crate::config::Config::get().stream_ahead;
            let ring_cx = matmul::Context {
                host: None,
                stream: None,
                ..*cx
            };
            std::thread::scope(|scope| {
                let mut next: Option<std::thread::ScopedJoinHandle<'_, Option<matmul::PackAhead>>> =
                    None;
                for (i, (e0, bucket, alone)) in plan.iter().enumerate() {
                    let (e0, bucket) = (*e0, *bucket);
                    let t = std::time::Instant::now();
                    let converted =
                        next.take()
                            .and_then(|h| h.join().ok().flatten())
                            .map(|mut a| {
                                a.wait_ns = t.elapsed().as_nanos() as u64;
                                a
                            });
                    let next_pack = plan.get(i + 1).filter(|&&(e1, b1, _)| {
                        ahead && !matmul::pack_resident(cx, view(e1), n.info, g, s.m, b1)
                    });
                    if let Some(&(e1, b1, _)) = next_pack {
                        let (rcx, experts) = (&ring_cx, view(e1));
                        next = Some(scope.spawn(move || {
                            matmul::convert_pack_ahead(rcx, experts, n.info, g, s.m, b1)
                        }));
                    }
                    let experts = &by_expert[e0..e0 + g];
                    // The pack's rows: experts that run alone get none here.
                    let packed: Vec<&[(usize, usize)]> = experts
                        .iter()
                        .enumerate()
                        .map(|(h, r)| if alone.contains(&h) { &[][..] } else { &r[..] })
                        .collect();
                    let mut x = vec![0f32; g * bucket * s.k];
                    for (h, rows) in packed.iter().enumerate() {
                        let at = h * bucket * s.k;
                        gather(n, rows, &mut x[at..at + rows.len() * s.k]);
                    }
                    let mut y = vec![0f32; g * bucket * s.m];
                    let mut job = matmul::Pack {
                        experts: view(e0),
                        info: n.info,
                        heads: g,
                        m: s.m,
                        bucket,
                        x: &x,
                        f32_info: n.f32_info,
                        y: &mut y,
                        weights: n.weight,
                    };
                    match matmul::compute_pack(cx, &mut job, converted) {
                        Ok(()) => {
                            for (h, rows) in packed.iter().enumerate() {
                                let at = h * bucket * s.m;
                                scatter(n, rows, &y[at..at + rows.len() * s.m]);
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
                                eprintln!(
                                    "ggml-ane: expert pack failed, one expert at a time: {e}"
                                );
                            }
                            singles
                                .extend((0..g).filter(|&h| !packed[h].is_empty()).map(|h| e0 + h));
                        }
                    }
                }
            });
        }
        None => singles.extend((0..s.n_expert).filter(|&e| !by_expert[e].is_empty())),
    }
    let (mut x, mut y) = (Vec::<f32>::new(), Vec::<f32>::new());
    for e in singles {
        let rows = &by_expert[e];
        let cols = rows.len();
        x.clear();
        x.resize(cols * s.k, 0.0);
        gather(n, rows, &mut x);
        y.clear();
        y.resize(cols * s.m, 0.0);
        // SAFETY: x and y are not touched until `group` (which holds the views) is computed.
        let (xv, yv) = unsafe {
            (
                Operand::of_f32(
                    TensorDesc::contiguous(GGML_TYPE_F32, 4, [s.k as i64, cols as i64, 1, 1]),
                    &x,
                ),
                Operand::of_f32_mut(
                    TensorDesc::contiguous(GGML_TYPE_F32, 4, [s.m as i64, cols as i64, 1, 1]),
                    &mut y,
                ),
            )
        };
        let group = Group {
            src1: xv,
            src1_info: n.f32_info,
            members: vec![Member {
                src0: n
                    .experts
                    .sub(d0.row_offset(0, e, 0), [s.k as i64, s.m as i64, 1, 1]),
                src0_info: n.info,
                dst: yv,
            }],
            weights: n.weight,
            speculative: 0,
        };
        matmul::compute(cx, &group);
        scatter(n, rows, &y);
        done.experts += 1;
    }
    Ok(done)
}

/// Copies src1 row `(i % r, t)` of each routed pair into consecutive `K`-rows of `x` (element by
/// element where a row is not an aligned f32 run).
fn gather(n: &Node, rows: &[(usize, usize)], x: &mut [f32]) {
    let k = n.s.k;
    for (j, &(i, t)) in rows.iter().enumerate() {
        let out = &mut x[j * k..(j + 1) * k];
        match n.src1.f32s(i % n.s.r, t, 0, k) {
            Some(src) => out.copy_from_slice(src),
            None => n.src1.read_row(&n.f32_info, i % n.s.r, t, 0, out),
        }
    }
}

/// Copies consecutive `M`-rows of `y` to dst slice `(i, t)` of each routed pair (element by
/// element where a slice is not an aligned f32 run).
fn scatter(n: &Node, rows: &[(usize, usize)], y: &[f32]) {
    let m = n.s.m;
    for (j, &(i, t)) in rows.iter().enumerate() {
        let src = &y[j * m..(j + 1) * m];
        if n.dst
            .with_f32s_mut(i, t, 0, m, |dst| dst.copy_from_slice(src))
            .is_none()
        {
            for (i0, &v) in src.iter().enumerate() {
                n.dst.put(i0, i, t, 0, v);
            }
        }
    }
}
