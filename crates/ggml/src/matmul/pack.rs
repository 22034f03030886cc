//! One dispatch for a pack of experts (`ane_plan::moe`): the pack's consecutive expert matrices
//! are the `heads` batch of the shape-shared program, each with its own `bucket` activation
//! columns.
//!
//! The staged weights of a pack are the same bytes as one `[K, heads * M]` matrix staged with
//! `heads` row tiles of `M` rows (both place row `r` of expert `h` at `w_index(h, 0, r, ..)`), so
//! the ordinary staging builds them; and with one contraction slice the activations and outputs
//! of `heads` blocks of `bucket` columns sit exactly where a single matrix's `heads * bucket`
//! columns would, so the ordinary token-major fill and scatter move them.

use super::stream::Held;
use super::*;

/// A pack of experts and the gathered activations they multiply.
pub struct Pack<'a> {
    /// The pack's experts as one matrix: `[K, heads * M]`, rows of expert `h` at `h * M`.
    pub experts: Operand,
    /// ggml traits of the experts' type.
    pub info: TypeInfo,
    /// Experts in the pack.
    pub heads: usize,
    /// Rows of one expert.
    pub m: usize,
    /// Columns per expert: expert `h`'s activations are columns `h * bucket ..` of `x`.
    pub bucket: usize,
    /// Activations, f32 `[heads][bucket][K]` (padding columns zero).
    pub x: &'a [f32],
    /// f32 traits, for reading `x`.
    pub f32_info: TypeInfo,
    /// Outputs, f32 `[heads][bucket][M]`.
    pub y: &'a mut [f32],
    /// The experts live in a weights buffer: staged once, kept.
    pub weights: bool,
}

/// A pack's weights converted while the previous pack ran ([`convert_pack_ahead`]).
pub struct PackAhead {
    surface: Arc<Surface>,
    /// Its bytes, counted in the device's ring bytes until the pack is done.
    _held: super::stream::Held,
    /// Nanoseconds the dispatching thread waited for it.
    pub wait_ns: u64,
}

/// The experts of a pack as the one member its staging converts.
fn pack_member(experts: Operand, info: TypeInfo) -> Member {
    Member {
        src0: experts,
        src0_info: info,
        dst: experts,
    }
}

/// The shape a pack of `heads` experts of `m` rows (from `experts`) is staged in, the program
/// shape, and the surface size.
fn pack_shapes(
    planner: &Planner,
    experts: &Operand,
    heads: usize,
    m: usize,
    bucket: usize,
) -> Result<(TiledShape, TiledShape, usize), EngineError> {
    let k = experts.desc.ne[0] as usize;
    let s = planner.tile(k, m, bucket);
    if s.tiles != 1 || s.k_chunks != 1 || s.m_tile != m || s.layout != Layout::Tokens {
        return Err(EngineError::Compile(format!(
            "expert pack {k}x{m} needs tiles"
        )));
    }
    let s = TiledShape { heads, ..s };
    // The weights as `heads` row tiles of one matrix: the same layout as the program's heads.
    let staged_shape = TiledShape {
        heads: 1,
        tiles: heads,
        ..s
    };
    let widest = TiledShape {
        n: *ane_plan::moe::PACK_BUCKETS.last().expect("buckets"),
        ..s
    };
    let size = request_alloc_size(&[widest.x_len() * 2, s.w_len() * 2, widest.y_len() * 2]);
    Ok((s, staged_shape, size))
}

/// Whether the weights of a pack are staged in the resident set (nothing to convert ahead).
pub fn pack_resident(
    cx: &Context<'_>,
    experts: Operand,
    info: TypeInfo,
    heads: usize,
    m: usize,
    bucket: usize,
) -> bool {
    pack_shapes(cx.planner, &experts, heads, m, bucket).is_ok_and(|(_, staged_shape, _)| {
        let key = stage_key(&[pack_member(experts, info)], &staged_shape);
        let staged = cx.staged.lock().unwrap_or_else(|e| e.into_inner());
        staged.entries.contains_key(&key)
    })
}

/// Converts the weights of the pack that runs next while the current one runs (MoE experts
/// stream only within one MUL_MAT_ID: the next layer's experts are unknown until its router
/// runs). Weights that fit the resident set are staged there now (`None`: the pack finds them);
/// others are converted for that pack only and handed to it ([`compute_pack`]'s `ahead`).
pub fn convert_pack_ahead(
    cx: &Context<'_>,
    experts: Operand,
    info: TypeInfo,
    heads: usize,
    m: usize,
    bucket: usize,
) -> Option<PackAhead> {
    let (s, staged_shape, size) = pack_shapes(cx.planner, &experts, heads, m, bucket).ok()?;
    let member = pack_member(experts, info);
    let key = stage_key(&[member], &staged_shape);
    let fits = {
        let staged = cx.staged.lock().unwrap_or_else(|e| e.into_inner());
        if staged.entries.contains_key(&key) {
            return None;
        }
        staged.admits(size)
    };
    let ring = cx
        .staged
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .ring
        .clone();
    let held = Held::new(ring, size);
    let t = Instant::now();
    let made = stage(cx.engine, &[member], 0, 0, &staged_shape, size, &[]).ok()?;
    add_time(&cx.stats.ns_stage, t.elapsed());
    if !guard::fp16_ok(made.fp16(s.w_len())) {
        return None; // the pack's own staging trips the guard and falls back
    }
    let made = Arc::new(made);
    let mut staged = cx.staged.lock().unwrap_or_else(|e| e.into_inner());
    staged.note_peak();
    if fits && !staged.entries.contains_key(&key) && staged.admits(size) {
        cx.stats.groups_staged_dispatch.fetch_add(1, Relaxed);
        staged.insert(key, made);
        staged.publish(cx.stats);
        return None;
    }
    Some(PackAhead {
        surface: made,
        _held: held,
        wait_ns: 0,
    })
}

/// Runs a pack on the engine, with its weights converted ahead when `ahead` has them. On error
/// nothing is known about `y`: the caller computes the pack's experts another way.
pub fn compute_pack(
    cx: &Context<'_>,
    p: &mut Pack<'_>,
    ahead: Option<PackAhead>,
) -> Result<(), EngineError> {
    if cx.health.is_off() || !cx.health.should_try() {
        return Err(EngineError::Unavailable(
            "device gave up or backing off".into(),
        ));
    }
    let (s, staged_shape, size) = pack_shapes(cx.planner, &p.experts, p.heads, p.m, p.bucket)?;
    // A pack program that failed to compile fails again: stage nothing for it.
    if let Some(e) = cx
        .cache
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .known_failure(&s)
    {
        return Err(e);
    }
    let k = p.experts.desc.ne[0] as usize;
    let member = pack_member(p.experts, p.info);
    let make = || -> Result<Surface, EngineError> {
        let t = Instant::now();
        let made = stage(cx.engine, &[member], 0, 0, &staged_shape, size, &[])?;
        add_time(&cx.stats.ns_stage, t.elapsed());
        if !guard::fp16_ok(made.fp16(s.w_len())) {
            return Err(guard::trip(cx.stats, "src0 out of fp16 range"));
        }
        Ok(made)
    };
    let key = p.weights.then(|| stage_key(&[member], &staged_shape));
    let _held;
    let weights = if let Some(a) = ahead.filter(|_| key.is_some()) {
        // Streamed, converted while the previous pack ran.
        let mut staged = cx.staged.lock().unwrap_or_else(|e| e.into_inner());
        staged.streamed_bytes += a.surface.alloc_size() as u64;
        staged.wait_ns += a.wait_ns;
        staged.publish(cx.stats);
        cx.stats.stream_ahead.fetch_add(1, Relaxed);
        _held = a._held;
        a.surface
    } else if let Some(key) = key {
        let mut staged = cx.staged.lock().unwrap_or_else(|e| e.into_inner());
        let made = staged.get_or_insert(key, || {
            cx.stats.groups_staged_dispatch.fetch_add(1, Relaxed);
            make()
        })?;
        staged.publish(cx.stats);
        made
    } else {
        Arc::new(make()?)
    };

    // Activations and outputs as one matrix of `heads * bucket` columns (see the module doc).
    let cols: Vec<(usize, usize, usize)> = (0..p.heads * p.bucket).map(|c| (c, 0, 0)).collect();
    let flat = TiledShape {
        heads: 1,
        n: p.heads * p.bucket,
        ..s
    };
    let t = Instant::now();
    // SAFETY: `p` borrows x (read only) and y (exclusively) for this whole call; the views live
    // in `group`, which ends with it.
    let (xv, yv) = unsafe {
        (
            Operand::of_f32(
                TensorDesc::contiguous(GGML_TYPE_F32, 4, [k as i64, cols.len() as i64, 1, 1]),
                p.x,
            ),
            Operand::of_f32_mut(
                TensorDesc::contiguous(GGML_TYPE_F32, 4, [p.m as i64, cols.len() as i64, 1, 1]),
                p.y,
            ),
        )
    };
    let group = Group {
        src1: xv,
        src1_info: p.f32_info,
        members: vec![Member {
            src0: p.experts,
            src0_info: p.info,
            dst: yv,
        }],
        weights: p.weights,
        speculative: 0,
    };
    let (mut x, mut y) = cx
        .scratch
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take_pair(cx.engine, size)?;
    let filled = fill_activations(cx, &group, &flat, k, &cols, &mut x);
    add_time(&cx.stats.ns_convert, t.elapsed());
    let result = filled.and_then(|()| {
        let ys = evaluate(cx, &s, &x, &weights, &mut y)?;
        let t = Instant::now();
        let r = scatter_tokens(&group, &flat, &cols, ys);
        add_time(&cx.stats.ns_convert, t.elapsed());
        r
    });
    cx.scratch
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .give_pair(x, y);
    // A failure is counted by the per-expert path the caller falls back to, not twice; the
    // pack's staged surface goes, so that the experts staged alone by that path do not sit beside
    // a copy nobody uses.
    match (&result, key) {
        (Ok(()), _) => cx.health.ok(),
        (Err(_), Some(key)) => {
            let mut staged = cx.staged.lock().unwrap_or_else(|e| e.into_inner());
            staged.forget(key);
            staged.publish(cx.stats);
        }
        (Err(_), None) => {}
    }
    result
}
