//! Host conversion around a dispatch: src1 rows read and rounded as the CPU rounds them, written
//! as fp16 activations in the program's layout, and fp16 outputs scattered into each member's dst.

use super::*;

/// Writes the activation columns into `x` (`[k_pad][n]`, fp16), zeroing every padding element.
pub(super) fn fill_activations(
    cx: &Context<'_>,
    g: &Group,
    s: &TiledShape,
    k: usize,
    cols: &[(usize, usize, usize)],
    x: &mut Surface,
) -> Result<(), EngineError> {
    let xs = x.fp16_mut(s.x_len());
    if s.layout == Layout::Tokens {
        return fill_tokens(cx, g, s, cols, xs);
    }
    let d = &g.src1.desc;
    let round = act_round(cx, g);
    let run = contiguous_run(cols)
        .filter(|_| round == ActRound::None && d.nb[1].is_multiple_of(4))
        .and_then(|(i1, i12, i13)| {
            let stride = d.nb[1] / 4;
            let len = (cols.len() - 1) * stride + k;
            Some((g.src1.f32s(i1, i12, i13, len)?, stride))
        });
    // Rows of `stride` values, transposed into `[k][n]` with the padding zeroed.
    let mut transposed = |src: &[f32], stride: usize| {
        ane_convert::act_f32_to_f16_transposed(src, cols.len(), k, stride, &mut xs[..k * s.n], s.n)
            .map_err(|e| EngineError::Eval(format!("activation conversion: {e}")))?;
        xs[k * s.n..].fill(f16::ZERO);
        // fp16 conversion of a value beyond 65504 (or a non-finite input) gives a non-finite value.
        if !guard::fp16_ok(&xs[..k * s.n]) {
            return Err(guard::trip(cx.stats, "src1 out of fp16 range"));
        }
        Ok(())
    };
    if let Some((src, stride)) = run {
        return transposed(src, stride);
    }
    if round != ActRound::None {
        return transposed(&read_rounded(cx, g, cols, k, round)?, k);
    }
    xs.fill(f16::ZERO);
    let mut row = vec![0f32; k];
    for (c, &(i1, i12, i13)) in cols.iter().enumerate() {
        g.src1.read_row(&g.src1_info, i1, i12, i13, &mut row);
        if !guard::input_ok(&row) {
            return Err(guard::trip(cx.stats, "src1 out of fp16 range"));
        }
        for (ki, &v) in row.iter().enumerate() {
            xs[s.x_index(0, ki / s.k_chunk, ki % s.k_chunk, c)] = f16::from_f32(v);
        }
    }
    Ok(())
}

/// Values of a batch from which rounding runs on several threads (the host's own threads are
/// idle while a device split runs).
const PAR_ROUND_MIN: usize = 1 << 16;

/// The src1 rows of `cols` (`[cols][k]`, f32), rounded as the CPU backend rounds them for this
/// group's weights (`round`), on up to 8 threads for large batches.
fn read_rounded(
    cx: &Context<'_>,
    g: &Group,
    cols: &[(usize, usize, usize)],
    k: usize,
    round: ActRound,
) -> Result<Vec<f32>, EngineError> {
    let mut rows = vec![0f32; cols.len() * k];
    for (r, &(i1, i12, i13)) in rows.chunks_exact_mut(k).zip(cols) {
        g.src1.read_row(&g.src1_info, i1, i12, i13, r);
    }
    if !guard::input_ok(&rows) {
        return Err(guard::trip(cx.stats, "src1 out of fp16 range"));
    }
    let threads = if rows.len() >= PAR_ROUND_MIN {
        std::thread::available_parallelism().map_or(1, |n| n.get().min(8))
    } else {
        1
    };
    if threads > 1 {
        let per = cols.len().div_ceil(threads) * k;
        std::thread::scope(|sc| {
            for chunk in rows.chunks_mut(per) {
                sc.spawn(move || chunk.chunks_exact_mut(k).for_each(|r| _ = round.apply(r)));
            }
        });
    } else {
        rows.chunks_exact_mut(k).for_each(|r| _ = round.apply(r));
    }
    Ok(rows)
}

/// How the CPU backend would round this group's activations: by its first member's weight type
/// (members of one dispatch share it, see `group_round`), nothing when `GGML_ANE_ACT_ROUND=off`.
pub(super) fn act_round(cx: &Context<'_>, g: &Group) -> ActRound {
    match g.members.first() {
        Some(m) if cx.act_round => ActRound::for_weight(m.src0.desc.ty),
        _ => ActRound::None,
    }
}

/// Token-major activations (`[k_chunks][n][k_chunk]`): each token's row is a plain fp32 -> fp16
/// conversion of the src1 row, no transpose; padding (K tail, extra tokens) is zeroed.
fn fill_tokens(
    cx: &Context<'_>,
    g: &Group,
    s: &TiledShape,
    cols: &[(usize, usize, usize)],
    xs: &mut [f16],
) -> Result<(), EngineError> {
    let k = g.src1.desc.ne[0] as usize;
    let round = act_round(cx, g);
    let rounded = match round {
        ActRound::None => None,
        _ => Some(read_rounded(cx, g, cols, k, round)?),
    };
    let mut row = vec![0f32; k];
    for (cidx, &(i1, i12, i13)) in cols.iter().enumerate() {
        let src: &[f32] = if let Some(r) = &rounded {
            &r[cidx * k..(cidx + 1) * k]
        } else if let Some(plain) = g.src1.f32s(i1, i12, i13, k) {
            plain
        } else {
            g.src1.read_row(&g.src1_info, i1, i12, i13, &mut row);
            if !guard::input_ok(&row) {
                return Err(guard::trip(cx.stats, "src1 out of fp16 range"));
            }
            &row
        };
        for c in 0..s.k_chunks {
            let at = s.x_index(0, c, 0, cidx);
            let seg = &mut xs[at..at + s.k_chunk];
            let lo = (c * s.k_chunk).min(k);
            let hi = (lo + s.k_chunk).min(k);
            ane_convert::f32_to_f16(&src[lo..hi], &mut seg[..hi - lo])
                .map_err(|e| EngineError::Eval(format!("activation conversion: {e}")))?;
            seg[hi - lo..].fill(f16::ZERO);
            if !guard::fp16_ok(&seg[..hi - lo]) {
                return Err(guard::trip(cx.stats, "src1 out of fp16 range"));
            }
        }
    }
    // The padding tokens of every slice (token-major: they end the slice).
    for c in 0..s.k_chunks {
        xs[s.x_index(0, c, 0, cols.len())..s.x_index(0, c + 1, 0, 0)].fill(f16::ZERO);
    }
    Ok(())
}

/// Token-major outputs (`[tiles][k_chunks][n][m_tile]`) into each member's dst rows: one slice is
/// a plain fp16 -> fp32 copy per token and tile; several slices are summed in f32.
pub(super) fn scatter_tokens(
    g: &Group,
    s: &TiledShape,
    cols: &[(usize, usize, usize)],
    ys: &[f16],
) -> Result<(), EngineError> {
    let mut r0 = 0;
    for m in &g.members {
        let d = &m.dst.desc;
        let rows = d.ne[0] as usize;
        for (cidx, &(i1, i12, i13)) in cols.iter().enumerate() {
            let mut mi = 0;
            while mi < rows {
                let (t, row) = ((r0 + mi) / s.m_tile, (r0 + mi) % s.m_tile);
                let seg = (s.m_tile - row).min(rows - mi);
                let at = |c: usize| s.y_index(t, c, row, cidx);
                let copied = (s.k_chunks == 1)
                    .then(|| {
                        m.dst.with_f32s_mut(i1, i12, i13, mi + seg, |out| {
                            ane_convert::f16_to_f32(&ys[at(0)..at(0) + seg], &mut out[mi..])
                        })
                    })
                    .flatten();
                match copied {
                    Some(r) => {
                        r.map_err(|e| EngineError::Eval(format!("output conversion: {e}")))?
                    }
                    None => {
                        for j in 0..seg {
                            let acc: f32 = (0..s.k_chunks).map(|c| ys[at(c) + j].to_f32()).sum();
                            m.dst.put(mi + j, i1, i12, i13, acc);
                        }
                    }
                }
                mi += seg;
            }
        }
        r0 += rows;
    }
    Ok(())
}
