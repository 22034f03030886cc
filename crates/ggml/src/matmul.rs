//! Computing claimed MUL_MATs: grouping, weight staging, the shape-shared programs, the engine
//! dispatch, and the CPU fallback that guarantees every output is written.
//!
//! ggml's MUL_MAT is `dst[i3][i2][n][m] = sum_k src0[i3/r3][i2/r2][m][k] * src1[i3][i2][n][k]`.
//! Every dispatch runs [`ane_mil::build::tiled_matmul`] with the weights as a runtime input, so the
//! compiled program depends only on the shape the planner ([`ane_plan::Planner`]) picks:
//! - a **group** is one MUL_MAT, or several that share src1 (Q/K/V, gate/up): their src0 rows are
//!   stacked, so one dispatch computes all of them and the host scatters rows to each dst;
//! - rows and contraction beyond the chip's axis limit become tiles and slices of the same
//!   dispatch; slices are summed on the host in f32;
//! - activation columns are padded to a bucket and cut into bucket-sized chunks;
//! - src0 in a llama.cpp *weights* buffer is converted to fp16 once and kept (staged); other src0
//!   (attention's KV cache, test tensors) is converted per call, with its dimensions bucketed so
//!   that it too reuses a few programs.
//!
//! The activations are written transposed (channel-first `[K][N]`) while converting to fp16, so the
//! ANE runs no transposes.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ane_convert::act_round::ActRound;
use ane_engine::surface::request_alloc_size;
use ane_engine::{Engine, EngineError, ProgramId, Surface};
use ane_plan::{Layout, Planner, TiledShape};
use half::f16;
use xxhash_rust::xxh3::Xxh3;

use crate::ffi::GGML_TYPE_F32;
use crate::ggml::TypeInfo;
use crate::guard;
use crate::stats::{add_time, Stats};
use crate::support::TensorDesc;

pub use crate::view::Operand;

/// One MUL_MAT of a group.
#[derive(Clone, Copy, Debug)]
pub struct Member {
    /// The weights (or other left operand).
    pub src0: Operand,
    /// ggml traits of src0's type.
    pub src0_info: TypeInfo,
    /// Output (F32).
    pub dst: Operand,
}

impl Member {
    /// A weight without an output, for staging ([`stage_ahead`]): dst is detached, never used.
    pub fn weight_only(src0: Operand, info: TypeInfo) -> Member {
        Member {
            src0,
            src0_info: info,
            dst: Operand::detached(src0.desc),
        }
    }
}

/// MUL_MATs sharing one src1, computed together.
#[derive(Clone, Debug)]
pub struct Group {
    /// Shared activations.
    pub src1: Operand,
    /// ggml traits of src1's type.
    pub src1_info: TypeInfo,
    /// Members; with more than one, every src0 is 2-D and has the same K.
    pub members: Vec<Member>,
    /// src0 lives in a weights buffer: immutable, staged once.
    pub weights: bool,
    /// The last `speculative` members are not nodes of this split: their outputs go to the
    /// lookahead stash (see `crate::lookahead`) and they are counted when taken.
    pub speculative: usize,
}

/// Device-wide state the compute path needs.
pub struct Context<'a> {
    /// The engine.
    pub engine: &'a dyn Engine,
    /// Planning rules.
    pub planner: &'a Planner,
    /// Loaded programs.
    pub cache: &'a Mutex<KernelCache>,
    /// Staged weights.
    pub staged: &'a Mutex<StagedWeights>,
    /// Reusable surfaces.
    pub scratch: &'a Mutex<ScratchPool>,
    /// Counters.
    pub stats: &'a Stats,
    /// Whether the device gave up (see [`crate::health`]).
    pub health: &'a crate::health::Health,
    /// The host's CPU backend for fallbacks (`None`: the plugin's own loop).
    pub host: Option<&'a crate::host_cpu::HostCpu>,
    /// `GGML_ANE_ACT_ROUND=cpu`: activations rounded as the CPU backend rounds them for each
    /// weight type (`ane_convert::act_round`) before their fp16 conversion.
    pub act_round: bool,
    /// The backend instance's streaming ring, for groups beyond the resident set whose weights
    /// are read in place (`None`: such groups are converted by their dispatch).
    pub stream: Option<&'a Streamer>,
    /// `GGML_ANE_INT8_INPUT=1`: resident groups of Q8_0 weights staged as int8 plus fp16 block
    /// scales where the int8 canary passed ([`int8`]); `None`: every group fp16.
    pub int8: Option<&'a Int8Gate>,
}

/// When `cols` are consecutive tokens of one (i12, i13) matrix, the first token and that matrix.
fn contiguous_run(cols: &[(usize, usize, usize)]) -> Option<(usize, usize, usize)> {
    let (&(a, b, c), &(z, y, x)) = (cols.first()?, cols.last()?);
    (b == y && c == x && z + 1 == a + cols.len()).then_some((a, b, c))
}

/// Computes a group. Never leaves an output unwritten: the columns of a failed dispatch are
/// computed on the CPU ([`fallback`]). Returns whether any column fell back to the CPU. The
/// operands are MUL_MATs that [`crate::support::mul_mat`] accepted.
pub fn compute(cx: &Context<'_>, g: &Group) -> bool {
    let n_ops = (g.members.len() - g.speculative) as u64;
    if cx.health.is_off() || !cx.health.should_try() {
        // The device gave up, or keeps failing and this group is not its retry: no conversion,
        // no dispatch, the whole nodes on the CPU.
        fallback(cx, g, &[]);
        cx.stats.ops_fallback.fetch_add(n_ops, Relaxed);
        return true;
    }
    // GGML_ANE_WEIGHTS=compressed: a lone Q8_0/Q4_0 weight runs its own baked program.
    if crate::baked::try_compute(cx, g) {
        return false;
    }
    let src0 = &g.members[0].src0.desc;
    let [k, _, ne02, ne03] = src0.ne.map(|v| v as usize);
    let [_, n, ne12, ne13] = g.src1.desc.ne.map(|v| v as usize);
    let (r2, r3) = (ne12 / ne02, ne13 / ne03);
    let m_total: usize = g.members.iter().map(|m| m.src0.desc.ne[1] as usize).sum();
    // GGML_ANE_INT8_INPUT=1: a resident group of Q8_0 weights runs the int8 program (`int8`).
    let int8_shape = int8::plan(cx, g, k, m_total);
    let mut failed: Vec<Failed> = Vec::new();
    let mut any_ok = false;
    // Every failure so far repeated a remembered compile failure (a shape the device rejects).
    let mut all_known = true;
    // A dispatch of this group was tried (in back-off, one failed try ends the group's tries).
    let mut tried = false;
    for i03 in 0..ne03 {
        for i02 in 0..ne02 {
            // Every src1 column (n, i12, i13) that multiplies this src0 matrix.
            let cols: Vec<(usize, usize, usize)> = (i03 * r3..(i03 + 1) * r3)
                .flat_map(|i13| {
                    (i02 * r2..(i02 + 1) * r2)
                        .flat_map(move |i12| (0..n).map(move |i1| (i1, i12, i13)))
                })
                .collect();
            let (kp, mp) = if g.weights {
                (k, m_total)
            } else {
                (cx.planner.dim_bucket(k), cx.planner.dim_bucket(m_total))
            };
            let mut w: Option<Arc<Surface>> = None;
            let mut w8: Option<int8::Int8Weights> = None;
            // int8 groups in chunks whose activations and outputs fit the weights' bytes.
            let chunks = match int8_shape {
                Some(s) => int8::planner_for(cx.planner, &s).col_chunks(cols.len()),
                None => cx.planner.col_chunks(cols.len()),
            };
            for chunk in chunks {
                let cols = &cols[chunk.start..chunk.start + chunk.len];
                // The int8 program unless it failed to compile for this shape before (then this
                // chunk takes the fp16 program, which may compile).
                let shape8 = int8_shape
                    .map(|s| TiledShape {
                        n: chunk.bucket,
                        ..s
                    })
                    .filter(|s| {
                        cx.cache
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .known_failure_of(&ProgramKey::TiledInt8(*s))
                            .is_none()
                    });
                let shape = shape8.unwrap_or_else(|| cx.planner.tile(kp, mp, chunk.bucket));
                let known = if shape8.is_some() {
                    None
                } else {
                    cx.cache
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .known_failure(&shape)
                };
                all_known &= known.is_some();
                // Gave up, or in back-off and this group's try failed already: the rest goes to
                // the CPU without counting as new failures.
                let skip = cx.health.is_off() || (tried && cx.health.backing_off());
                let fresh = known.is_none() && !skip;
                let r = if skip {
                    Err(EngineError::Unavailable(
                        "device gave up or backing off".into(),
                    ))
                } else if let Some(e) = known {
                    Err(e)
                } else {
                    tried = true;
                    match shape8 {
                        Some(s) => int8::dispatch(cx, g, &s, cols, &mut w8),
                        None => dispatch(cx, g, i02, i03, &shape, cols, &mut w),
                    }
                };
                match r {
                    Ok(()) => {
                        any_ok = true;
                        cx.health.ok();
                    }
                    Err(e) => {
                        if crate::config::Config::get().debug {
                            eprintln!("ggml-ane: dispatch failed, CPU fallback: {e}");
                        }
                        if fresh && cx.health.failed(&e) {
                            cx.stats.gave_up.store(1, Relaxed);
                            eprintln!(
                                "ggml-ane: {} engine failures in a row (last: {e}); the device \
                                 stops claiming MUL_MATs, the CPU backend computes them \
                                 (GGML_ANE_GIVE_UP)",
                                cx.health.limit()
                            );
                        }
                        failed.push(Failed {
                            i02,
                            i03,
                            cols: cols.to_vec(),
                        });
                    }
                }
            }
        }
    }
    let any_fallback = !failed.is_empty();
    if any_fallback && !any_ok && all_known {
        for m in &g.members[..g.members.len() - g.speculative] {
            let op = crate::health::OpKey::of(&m.src0.desc, &g.src1.desc);
            if cx.health.reject(op) {
                eprintln!(
                    "ggml-ane: MUL_MAT {:?} x {:?} does not compile for the device; the CPU \
                     backend computes it from now on (declined: shape_failed)",
                    m.src0.desc.ne, g.src1.desc.ne
                );
            }
        }
    }
    if any_fallback {
        // All failed: the whole nodes, exactly as CPU-only llama.cpp computes them.
        let parts: &[Failed] = if any_ok { &failed } else { &[] };
        fallback(cx, g, parts);
        cx.stats.ops_fallback.fetch_add(n_ops, Relaxed);
    } else {
        cx.stats.ops_offloaded.fetch_add(n_ops, Relaxed);
        if g.members.len() > 1 {
            cx.stats.ops_fused.fetch_add(n_ops, Relaxed);
        }
    }
    any_fallback
}

/// Computes the whole group on the CPU (the host's CPU backend, else the plugin's own loop), with
/// no engine: the rows of a split whose GPU part failed (`crate::split`).
pub fn compute_on_cpu(cx: &Context<'_>, g: &Group) {
    fallback(cx, g, &[]);
}

/// Bytes of the surface a lone 2-D weight of `k` x `m` is staged in (the request size of its
/// tiling): what admitting it to a staging budget costs. A group's surface is at most the sum of
/// its members'.
pub fn staged_bytes(planner: &Planner, k: usize, m: usize) -> usize {
    request_size(&planner.tile(k, m, planner.max_cols()), planner.max_cols())
}

/// Whether MUL_MATs with weights of these types may share one dispatch: their activations are
/// rounded alike by the CPU backend (`ane_convert::act_round`), so one activation surface serves
/// both.
pub fn rounds_alike(a: i32, b: i32) -> bool {
    ActRound::for_weight(a) == ActRound::for_weight(b)
}

mod cache;
mod dispatch;
mod fallback;
mod host;
mod int8;
mod pack;
mod scratch;
mod staging;
mod stream;

pub use cache::{KernelCache, ProgramKey};
use dispatch::*;
use fallback::*;
use host::*;
pub use int8::{Int8Gate, INT8_CANARY_FAIL, INT8_CANARY_NOT_RUN, INT8_CANARY_PASS};
pub use pack::{compute_pack, convert_pack_ahead, pack_resident, Pack, PackAhead};
pub use scratch::ScratchPool;
use scratch::*;
pub(crate) use staging::member_key;
use staging::*;
pub use staging::{convert_ahead, stage_ahead, StagedWeights};
pub use stream::{Streamer, RING};

#[cfg(test)]
mod tests;
