//! One engine dispatch: activations in, program compiled or reused, evaluated, outputs out.

use super::*;

/// One engine dispatch for `cols` against matrix (`i02`, `i03`) of every member.
pub(super) fn dispatch(
    cx: &Context<'_>,
    g: &Group,
    i02: usize,
    i03: usize,
    shape: &TiledShape,
    cols: &[(usize, usize, usize)],
    w: &mut Option<Arc<Surface>>,
) -> Result<(), EngineError> {
    let s = shape;
    let k = g.members[0].src0.desc.ne[0] as usize;
    let t = Instant::now();
    let size = request_size(s, cx.planner.max_cols());
    // Weights: staged once (weights buffers) or converted for this call.
    let weights = match w {
        Some(w) => w.clone(),
        None => {
            let made = if g.weights
                && g.members
                    .iter()
                    .all(|m| m.src0.desc.ne[2] == 1 && m.src0.desc.ne[3] == 1)
            {
                let key = stage_key(&g.members, s);
                let mut staged = cx.staged.lock().unwrap_or_else(|e| e.into_inner());
                let released = staged.mark_used(key);
                cx.stats.groups_released.fetch_add(released as u64, Relaxed);
                // Matrices converted at load: take them out; the group's surface replaces them.
                let keys: Vec<u128> = if staged.entries.contains_key(&key) {
                    Vec::new()
                } else {
                    g.members.iter().map(member_key).collect()
                };
                let pre: Vec<Option<Arc<Vec<f16>>>> =
                    keys.iter().map(|k| staged.take_converted(k)).collect();
                let convert = |pre: &[Option<Arc<Vec<f16>>>]| {
                    let t = Instant::now();
                    let made = stage(cx.engine, &g.members, i02, i03, s, size, pre);
                    add_time(&cx.stats.ns_stage, t.elapsed());
                    cx.stats.groups_staged_dispatch.fetch_add(1, Relaxed);
                    made
                };
                let resident = staged.entries.contains_key(&key) || staged.admits(size);
                match cx.stream {
                    Some(stream) if !resident => {
                        streamed(cx, stream, staged, key, g, s, size, || convert(&pre))?
                    }
                    _ => {
                        let made = staged.get_or_insert(key, || convert(&pre))?;
                        staged.publish(cx.stats);
                        made
                    }
                }
            } else {
                let made = stage(cx.engine, &g.members, i02, i03, s, size, &[])?;
                if !guard::fp16_ok(made.fp16(s.w_len())) {
                    return Err(guard::trip(cx.stats, "src0 out of fp16 range"));
                }
                Arc::new(made)
            };
            *w = Some(made.clone());
            made
        }
    };
    let (mut x, mut y) = cx
        .scratch
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take_pair(cx.engine, size)?;
    let filled = fill_activations(cx, g, s, k, cols, &mut x);
    add_time(&cx.stats.ns_convert, t.elapsed());
    let result = filled.and_then(|()| run_and_scatter(cx, g, s, cols, &weights, &x, &mut y));
    let mut pool = cx.scratch.lock().unwrap_or_else(|e| e.into_inner());
    pool.give_pair(x, y);
    result
}

/// Compiles (or reuses) the shape-shared program of `s`, evaluates it on activations `x` and
/// weights `w` into `y`, counts the dispatch and checks the outputs (the numeric guard).
pub(super) fn evaluate<'y>(
    cx: &Context<'_>,
    s: &TiledShape,
    x: &Surface,
    w: &Surface,
    y: &'y mut Surface,
) -> Result<&'y [f16], EngineError> {
    evaluate_form(cx, s, false, &[x, w], y)
}

/// [`evaluate`] for either form of the shape-shared program: fp16 weights (`inputs` = `[x, w]`)
/// or int8 weights and their scales (`int8`, `inputs` = `[x, wq, ws]`, see `super::int8`).
pub(super) fn evaluate_form<'y>(
    cx: &Context<'_>,
    s: &TiledShape,
    int8: bool,
    inputs: &[&Surface],
    y: &'y mut Surface,
) -> Result<&'y [f16], EngineError> {
    let t = Instant::now();
    let result = {
        let mut cache = cx.cache.lock().unwrap_or_else(|e| e.into_inner());
        let id = if int8 {
            cache.get_or_compile_int8(cx.engine, *s, cx.stats)
        } else {
            cache.get_or_compile(cx.engine, *s, cx.stats)
        };
        id.and_then(|id| cx.engine.evaluate(id, inputs, &mut [&mut *y]))
    };
    add_time(&cx.stats.ns_engine, t.elapsed());
    result?;
    cx.stats.dispatches.fetch_add(1, Relaxed);
    if int8 {
        cx.stats.int8_dispatches.fetch_add(1, Relaxed);
    }
    if s.tiles > 1 || s.k_chunks > 1 {
        cx.stats.dispatches_tiled.fetch_add(1, Relaxed);
    }
    let ys = y.fp16(s.y_len());
    if !guard::output_ok(ys) {
        return Err(guard::trip(
            cx.stats,
            "output non-finite or past the matmul cliff",
        ));
    }
    Ok(ys)
}

/// Compiles (or reuses) the program, evaluates it, checks and scatters the outputs.
pub(super) fn run_and_scatter(
    cx: &Context<'_>,
    g: &Group,
    s: &TiledShape,
    cols: &[(usize, usize, usize)],
    ws: &Surface,
    x: &Surface,
    y: &mut Surface,
) -> Result<(), EngineError> {
    let ys = evaluate(cx, s, x, ws, y)?;
    let t = Instant::now();
    if s.layout == Layout::Tokens {
        scatter_tokens(g, s, cols, ys)?;
        add_time(&cx.stats.ns_convert, t.elapsed());
        return Ok(());
    }
    let run = contiguous_run(cols).filter(|_| s.k_chunks == 1);
    let mut r = 0;
    for m in &g.members {
        let d = &m.dst.desc;
        let rows = d.ne[0] as usize;
        if let Some((i1, i12, i13)) = run.filter(|_| d.nb[1].is_multiple_of(4)) {
            // One slice: output rows r..r+rows are contiguous in `y` (`[tiles][m_tile][n]`).
            let stride = d.nb[1] / 4;
            let len = (cols.len() - 1) * stride + rows;
            let src = &ys[r * s.n..(r + rows) * s.n];
            let done = m.dst.with_f32s_mut(i1, i12, i13, len, |out| {
                ane_convert::out_f16_to_f32_transposed(src, rows, s.n, cols.len(), out, stride)
            });
            if let Some(done) = done {
                done.map_err(|e| EngineError::Eval(format!("output conversion: {e}")))?;
                r += rows;
                continue;
            }
        }
        for mi in 0..rows {
            let (tile, row) = (r / s.m_tile, r % s.m_tile);
            for (c, &(i1, i12, i13)) in cols.iter().enumerate() {
                let acc: f32 = (0..s.k_chunks)
                    .map(|kc| ys[s.y_index(tile, kc, row, c)].to_f32())
                    .sum();
                m.dst.put(mi, i1, i12, i13, acc);
            }
            r += 1;
        }
    }
    add_time(&cx.stats.ns_convert, t.elapsed());
    Ok(())
}

/// The surface of a weight group beyond the resident set, through the instance's streaming ring
/// ([`Streamer`]): converted ahead by its background thread when predicted, else by `convert` now.
#[allow(clippy::too_many_arguments)]
fn streamed(
    cx: &Context<'_>,
    stream: &Streamer,
    mut staged: std::sync::MutexGuard<'_, StagedWeights>,
    key: u128,
    g: &Group,
    s: &TiledShape,
    size: usize,
    convert: impl FnOnce() -> Result<Surface, EngineError>,
) -> Result<Arc<Surface>, EngineError> {
    let released = staged.begin_stream(size);
    cx.stats.groups_released.fetch_add(released as u64, Relaxed);
    if staged.max_bytes < staged.ring_reserve() {
        static ONCE: std::sync::Once = std::sync::Once::new();
        let mb = (1u64 << 20) as f64;
        ONCE.call_once(|| {
            eprintln!(
                "ggml-ane: GGML_ANE_STAGE_MAX_MB={:.0} is below a streaming ring ({RING} groups of \
                 {:.1} MiB): groups are converted by their own dispatch, and staging holds up to \
                 {:.1} MiB; raise it to {:.0} or more",
                staged.max_bytes as f64 / mb,
                size as f64 / mb,
                size as f64 / mb,
                (staged.ring_reserve() as f64 / mb).ceil()
            )
        });
    }
    let room = staged.room();
    // Converted without the device's lock: other instances dispatch meanwhile.
    drop(staged);
    let recipe = stream::Recipe {
        members: g
            .members
            .iter()
            .map(|m| Member::weight_only(m.src0, m.src0_info))
            .collect(),
        shape: *s,
        size,
    };
    let taken = stream.take(key, recipe, room, convert)?;
    let mut staged = cx.staged.lock().unwrap_or_else(|e| e.into_inner());
    staged.streamed_bytes += taken.surface.alloc_size() as u64;
    staged.wait_ns += taken.wait_ns;
    staged.note_peak();
    staged.publish(cx.stats);
    if taken.ahead {
        cx.stats.stream_ahead.fetch_add(1, Relaxed);
    }
    Ok(taken.surface)
}
