//! Q8_0 weights staged as int8 plus fp16 block scales (`GGML_ANE_INT8_INPUT=1`, issue 24 item 5),
//! dequantized inside the shape-shared program ([`ane_mil::build::tiled_matmul_int8`]).
//!
//! Opt-in and gated: the form is used only after its canary ([`ane_plan::canary::int8_canary`])
//! passed on the device's engine, run once at first use ([`Int8Gate`]); a failed canary is said
//! once on stderr and every group stays fp16. A group takes the form when all its members are
//! 2-D Q8_0 weights in a weights buffer, its token-major tiling rounds to whole 64-byte int8 rows
//! within the axis limit, and it is resident: a group beyond the resident set keeps the fp16 path
//! (and its streaming ring).
//!
//! Every surface of one request has one size, so the scales are not staged in a surface of their
//! own (it would cost as much as the int8 one): the int8 weights are resident in a surface of the
//! int8 request's size, the scales are kept on the host beside them (1/16 of the fp16 weight
//! bytes, counted in the same budget) and written into a scratch surface by each dispatch. The
//! request's size is the int8 weights' only while they are its largest tensor, so an int8 group
//! is dispatched in column chunks no wider than the activations and outputs that fit the weights'
//! bytes ([`int8_cols`]; 256 for SmolLM2's K = 576, no narrower than fp16's for K and M of 1024
//! and more): its surfaces then hold about half of fp16's.
//!
//! A failure of any step (staging, surfaces, compile, evaluate, the output guard) is an error of
//! the dispatch like the fp16 path's: [`super::compute`] sends its columns to the CPU fallback.

use std::sync::OnceLock;

use ane_convert::types::GGML_TYPE_Q8_0;
use ane_mil::build::{stage_q8_0_int8, QuantKind};

use super::*;

/// Whether the int8 form may be used: asked for (`GGML_ANE_INT8_INPUT=1`, a [`Context`] with a
/// gate), and its canary passed on the engine; the canary runs once, at the first group that
/// would take the form.
#[derive(Debug, Default)]
pub struct Int8Gate {
    canary: OnceLock<bool>,
}

impl Int8Gate {
    /// A gate whose canary has not run yet.
    pub fn new() -> Self {
        Int8Gate::default()
    }

    /// Whether the canary passed on `engine` (run on the first call; the outcome in `stats`
    /// `int8_canary`, and a failure said once on stderr).
    pub(crate) fn passes(&self, engine: &dyn Engine, stats: &Stats) -> bool {
        *self.canary.get_or_init(|| {
            let c = ane_plan::canary::int8_canary(engine);
            stats.int8_canary.store(
                if c.ok {
                    INT8_CANARY_PASS
                } else {
                    INT8_CANARY_FAIL
                },
                Relaxed,
            );
            if !c.ok {
                eprintln!(
                    "ggml-ane: GGML_ANE_INT8_INPUT=1: the int8-input canary failed on the {} \
                     engine ({} step: {}); Q8_0 weights are staged as fp16",
                    engine.name(),
                    c.failed_step.as_deref().unwrap_or("?"),
                    c.error.as_deref().unwrap_or("")
                );
            }
            c.ok
        })
    }
}

/// `Stats::int8_canary` values: not run, passed, failed.
pub const INT8_CANARY_NOT_RUN: u64 = 0;
/// See [`INT8_CANARY_NOT_RUN`].
pub const INT8_CANARY_PASS: u64 = 1;
/// See [`INT8_CANARY_NOT_RUN`].
pub const INT8_CANARY_FAIL: u64 = 2;

/// A 2-D Q8_0 weight with contiguous blocks and whole blocks per row, in memory.
pub(crate) fn q8_0_2d(m: &Member) -> bool {
    let d = &m.src0.desc;
    d.ty == GGML_TYPE_Q8_0
        && d.ne[2] == 1
        && d.ne[3] == 1
        && (d.ne[0] as usize).is_multiple_of(QuantKind::BLOCK)
        && d.nb[0] == m.src0_info.type_size
        && m.src0_info.type_size == QuantKind::Q8_0.block_bytes()
        && !m.src0.is_null()
}

/// The int8 program's shape for a group of `members` (`k` x `m_total` stacked) at its widest
/// column bucket ([`int8_cols`]), when the group takes the form: the gate is on and its canary
/// passed, the members are weights ([`q8_0_2d`], one K), and the token-major tiling with rows
/// rounded to 64-byte int8 rows stays within the axis limit.
pub(super) fn shape_for(
    cx: &Context<'_>,
    members: &[Member],
    weights: bool,
    k: usize,
    m_total: usize,
) -> Option<TiledShape> {
    let gate = cx.int8?;
    if !weights
        || !k.is_multiple_of(QuantKind::BLOCK)
        || !members
            .iter()
            .all(|m| q8_0_2d(m) && m.src0.desc.ne[0] as usize == k)
    {
        return None;
    }
    let tokens = Planner {
        layout: Layout::Tokens,
        ..cx.planner.clone()
    };
    let s = tokens.tile(k, m_total, cx.planner.max_cols()).for_int8();
    if s.m_tile > cx.planner.limits.max_axis
        || !s.k_chunk.is_multiple_of(QuantKind::BLOCK)
        || s.heads != 1
    {
        return None;
    }
    let s = TiledShape {
        n: int8_cols(cx.planner, &s),
        ..s
    };
    gate.passes(cx.engine, cx.stats).then_some(s)
}

/// The widest column bucket an int8 group of shape `s` is dispatched with: the largest of
/// `planner`'s whose activations and outputs are no larger than the int8 weights, so that the
/// weights stay the request's largest tensor and its surfaces hold about half of fp16's; the
/// smallest bucket when none is (tiny weights).
pub(super) fn int8_cols(planner: &Planner, s: &TiledShape) -> usize {
    let fits = |n: usize| {
        let w = TiledShape { n, ..*s };
        w.x_len() * 2 <= s.w_len() && w.y_len() * 2 <= s.w_len()
    };
    let buckets = planner
        .n_buckets
        .iter()
        .copied()
        .filter(|&b| b <= planner.max_cols());
    buckets
        .clone()
        .filter(|&b| fits(b))
        .max()
        .or_else(|| buckets.min())
        .unwrap_or(planner.max_cols())
}

/// The planner whose column chunks an int8 group of shape `s` (from [`plan`]) is cut into:
/// buckets up to its `n`.
pub(super) fn planner_for(planner: &Planner, s: &TiledShape) -> Planner {
    Planner {
        n_buckets: planner
            .n_buckets
            .iter()
            .copied()
            .filter(|&b| b <= s.n)
            .collect(),
        ..planner.clone()
    }
}

/// The int8 shape [`super::compute`] dispatches a group with, when it takes the form and is
/// resident (staged as int8 already, or its int8 surface and scales fit the budget now); `None`
/// leaves it to the fp16 path.
pub(super) fn plan(cx: &Context<'_>, g: &Group, k: usize, m_total: usize) -> Option<TiledShape> {
    let s = shape_for(cx, &g.members, g.weights, k, m_total)?;
    let key = int8_key(&g.members, &s);
    let size = request_size_int8(cx.planner, &s);
    let staged = cx.staged.lock().unwrap_or_else(|e| e.into_inner());
    (staged.entries.contains_key(&key) || staged.admits(size + s.ws_len() * 2)).then_some(s)
}

/// The allocation size of every surface of an int8 request for `s` (activations and outputs at
/// the group's widest column bucket, [`int8_cols`], so that its chunks share one size).
pub(super) fn request_size_int8(planner: &Planner, s: &TiledShape) -> usize {
    let wide = TiledShape {
        n: s.n.max(int8_cols(planner, s)),
        ..*s
    };
    request_alloc_size(&[
        wide.x_len() * 2,
        s.w_len(),
        s.ws_len() * 2,
        wide.y_len() * 2,
    ])
}

/// Identity of a group's int8 staging: its fp16 [`stage_key`] marked as the other form, so that
/// the two never share an entry.
pub(super) fn int8_key(members: &[Member], s: &TiledShape) -> u128 {
    let mut h = Xxh3::new();
    h.update(&stage_key(members, s).to_le_bytes());
    h.update(b"int8");
    h.digest128()
}

/// The stacked members' Q8_0 blocks as `b_wq` (in an engine surface of `size` bytes) and `c_ws`
/// (host fp16) of `s` ([`stage_q8_0_int8`]: ggml's `q` and `d` bit for bit, zeros in padding).
pub(super) fn stage_int8(
    engine: &dyn Engine,
    members: &[Member],
    s: &TiledShape,
    size: usize,
) -> Result<(Surface, Vec<f16>), EngineError> {
    let k = members[0].src0.desc.ne[0] as usize;
    let per_row = k / QuantKind::BLOCK * QuantKind::Q8_0.block_bytes();
    let m_total: usize = members.iter().map(|m| m.src0.desc.ne[1] as usize).sum();
    let mut raw = Vec::with_capacity(m_total * per_row);
    for m in members {
        for i1 in 0..m.src0.desc.ne[1] as usize {
            let row = m.src0.row_bytes(i1, 0, 0);
            let row = row.get(..per_row).ok_or_else(|| {
                EngineError::Eval(format!("Q8_0 row of {} bytes, want {per_row}", row.len()))
            })?;
            raw.extend_from_slice(row);
        }
    }
    let (q, d) = stage_q8_0_int8(s, &raw, m_total, k);
    let mut surface = engine.new_surface(size)?;
    let bytes = surface.bytes_mut();
    if bytes.len() < q.len() || size < d.len() * 2 {
        return Err(EngineError::Surface(format!(
            "int8 surface of {} bytes for {} weights",
            bytes.len(),
            q.len()
        )));
    }
    for (b, &v) in bytes.iter_mut().zip(&q) {
        *b = v as u8;
    }
    Ok((surface, d))
}

/// [`super::stage_ahead`] for a group that takes the int8 form (shape `s`): staged resident at
/// load when it fits. Returns the bytes added (0 if staged already or over the budget).
pub(super) fn stage_ahead(
    cx: &Context<'_>,
    members: &[Member],
    s: &TiledShape,
) -> Result<usize, EngineError> {
    let size = request_size_int8(cx.planner, s);
    let key = int8_key(members, s);
    let need = size + s.ws_len() * 2;
    {
        let staged = cx.staged.lock().unwrap_or_else(|e| e.into_inner());
        if staged.entries.contains_key(&key) || !staged.admits(need) {
            return Ok(0);
        }
    }
    // Staged without the lock: other contexts' dispatches go on meanwhile.
    let t = Instant::now();
    let (q, d) = stage_int8(cx.engine, members, s, size)?;
    add_time(&cx.stats.ns_stage, t.elapsed());
    let mut staged = cx.staged.lock().unwrap_or_else(|e| e.into_inner());
    if staged.entries.contains_key(&key) || !staged.admits(need) {
        return Ok(0);
    }
    let added = q.alloc_size() + d.len() * 2;
    staged.insert_int8(key, Arc::new(q), Arc::new(d));
    staged.unused.insert(key);
    cx.stats.groups_staged_load.fetch_add(1, Relaxed);
    cx.stats.int8_groups.fetch_add(1, Relaxed);
    staged.publish(cx.stats);
    Ok(added)
}

/// A group's int8 weights and their scales, as one dispatch binds them.
pub(super) type Int8Weights = (Arc<Surface>, Arc<Vec<f16>>);

/// One engine dispatch of the int8 program `s` for `cols` (the group's only matrix): weights
/// staged (or taken from `w8`, the group's earlier chunk), the scales written into a scratch
/// surface, activations in, outputs out.
pub(super) fn dispatch(
    cx: &Context<'_>,
    g: &Group,
    s: &TiledShape,
    cols: &[(usize, usize, usize)],
    w8: &mut Option<Int8Weights>,
) -> Result<(), EngineError> {
    let k = g.members[0].src0.desc.ne[0] as usize;
    let t = Instant::now();
    let size = request_size_int8(cx.planner, s);
    let (wq, ws) = match w8 {
        Some(w) => w.clone(),
        None => {
            let made = staged_int8(cx, g, s, size)?;
            *w8 = Some(made.clone());
            made
        }
    };
    let (mut x, mut y, mut d) = {
        let mut pool = cx.scratch.lock().unwrap_or_else(|e| e.into_inner());
        let (x, y) = pool.take_pair(cx.engine, size)?;
        match pool.take(cx.engine, size) {
            Ok(d) => (x, y, d),
            Err(e) => {
                pool.give_pair(x, y);
                return Err(e);
            }
        }
    };
    d.fp16_mut(ws.len()).copy_from_slice(&ws);
    let filled = fill_activations(cx, g, s, k, cols, &mut x);
    add_time(&cx.stats.ns_convert, t.elapsed());
    let result = filled.and_then(|()| run_and_scatter(cx, g, s, cols, &x, &wq, &d, &mut y));
    let mut pool = cx.scratch.lock().unwrap_or_else(|e| e.into_inner());
    // The scale surface first: the next dispatch's `take_pair` gets x and y in their roles.
    pool.give(d);
    pool.give_pair(x, y);
    result
}

/// The group's resident int8 weights, staged now if missing (resident when they fit, else for
/// this dispatch only, counted as streamed).
fn staged_int8(
    cx: &Context<'_>,
    g: &Group,
    s: &TiledShape,
    size: usize,
) -> Result<Int8Weights, EngineError> {
    let key = int8_key(&g.members, s);
    let mut staged = cx.staged.lock().unwrap_or_else(|e| e.into_inner());
    let released = staged.mark_used(key);
    cx.stats.groups_released.fetch_add(released as u64, Relaxed);
    if let Some(w) = staged.int8_entry(key) {
        return Ok(w);
    }
    // fp16 rows converted ahead for these members are not what this form binds.
    for m in &g.members {
        staged.take_converted(&member_key(m));
    }
    let t = Instant::now();
    let made = stage_int8(cx.engine, &g.members, s, size);
    add_time(&cx.stats.ns_stage, t.elapsed());
    let (q, d) = made?;
    cx.stats.groups_staged_dispatch.fetch_add(1, Relaxed);
    let (q, d) = (Arc::new(q), Arc::new(d));
    let need = q.alloc_size() + d.len() * 2;
    if staged.admits(need) {
        staged.insert_int8(key, q.clone(), d.clone());
        cx.stats.int8_groups.fetch_add(1, Relaxed);
    } else {
        // The budget filled since `plan` looked: this dispatch's own copy.
        staged.peak_bytes = staged
            .peak_bytes
            .max(staged.bytes() + staged.ring.load(Relaxed) + need);
        staged.streamed_bytes += need as u64;
        staged.wait_ns += t.elapsed().as_nanos() as u64;
    }
    staged.publish(cx.stats);
    Ok((q, d))
}

/// Compiles (or reuses) the int8 program of `s`, evaluates it on activations `x`, int8 weights
/// `wq` and scales `ws` into `y`, counts the dispatch, checks the outputs (the numeric guard) and
/// scatters them (token-major).
#[allow(clippy::too_many_arguments)]
fn run_and_scatter(
    cx: &Context<'_>,
    g: &Group,
    s: &TiledShape,
    cols: &[(usize, usize, usize)],
    x: &Surface,
    wq: &Surface,
    ws: &Surface,
    y: &mut Surface,
) -> Result<(), EngineError> {
    let ys = evaluate_form(cx, s, true, &[x, wq, ws], y)?;
    let t = Instant::now();
    scatter_tokens(g, s, cols, ys)?;
    add_time(&cx.stats.ns_convert, t.elapsed());
    Ok(())
}
