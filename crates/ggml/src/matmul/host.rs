//! Host conversion around a dispatch: src1 rows read and rounded as the CPU rounds them, written
//! as fp16 activations in the program's layout, and fp16 outputs scattered into each member's dst.

use super::*;

/// Reads element `off` bytes into a plain-typed buffer.
///
/// # Safety
/// `base + off` must point at a readable element of type `ty`.
pub(super) unsafe fn read_plain(ty: i32, base: *const u8, off: usize) -> f32 {
    // SAFETY: the caller guarantees the element is in bounds; reads are unaligned-safe.
    unsafe {
        let p = base.add(off);
        match ty {
            GGML_TYPE_F32 => p.cast::<f32>().read_unaligned(),
            GGML_TYPE_F16 => f16::from_bits(p.cast::<u16>().read_unaligned()).to_f32(),
            GGML_TYPE_BF16 => bf16::from_bits(p.cast::<u16>().read_unaligned()).to_f32(),
            _ => unreachable!("read_plain on a non-plain type"),
        }
    }
}

/// Writes `v` to element (`i0`, `i1`, `i2`, `i3`) of an f32 tensor.
///
/// # Safety
/// `dst` is a writable f32 tensor and the index is within its shape.
pub(crate) unsafe fn put(dst: &Operand, i0: usize, i1: usize, i2: usize, i3: usize, v: f32) {
    let d = &dst.desc;
    let off = d.offset(i0, i1, i2, i3);
    // SAFETY: in bounds by the caller's contract; unaligned-safe write.
    unsafe {
        dst.data
            .cast_mut()
            .add(off)
            .cast::<f32>()
            .write_unaligned(v)
    };
}

/// Row `i1` of matrix (`i2`, `i3`) of a tensor, widened to f32 into `out` (length ne0).
///
/// # Safety
/// The operand must describe readable memory; for non-plain types, rows must be contiguous blocks
/// (checked by `supports_op`) and `info.to_float` must be set.
pub(crate) unsafe fn read_row(
    op: &Operand,
    info: &TypeInfo,
    i1: usize,
    i2: usize,
    i3: usize,
    out: &mut [f32],
) {
    let d = &op.desc;
    let base = d.row_offset(i1, i2, i3);
    if is_plain(d.ty) {
        for (i0, o) in out.iter_mut().enumerate() {
            // SAFETY: in bounds by the tensor's shape and strides.
            *o = unsafe { read_plain(d.ty, op.data, base + i0 * d.nb[0]) };
        }
    } else {
        let f = info.to_float.expect("supports_op checked to_float");
        // SAFETY: a row of ne0 elements is ne0/blck contiguous blocks starting at `base`.
        unsafe { f(op.data.add(base).cast(), out.as_mut_ptr(), out.len() as i64) };
    }
}

/// Writes the activation columns into `x` (`[k_pad][n]`, fp16), zeroing every padding element.
///
/// # Safety
/// As for [`compute`].
pub(super) unsafe fn fill_activations(
    cx: &Context<'_>,
    g: &Group,
    s: &TiledShape,
    k: usize,
    cols: &[(usize, usize, usize)],
    x: &mut Surface,
) -> Result<(), EngineError> {
    if s.layout == Layout::Tokens {
        // SAFETY: forwarded contract.
        return unsafe { fill_tokens(cx, g, s, k, cols, x) };
    }
    let xs = x.fp16_mut(s.x_len());
    let d = &g.src1.desc;
    let round = act_round(cx, g);
    let run = contiguous_run(cols).filter(|_| {
        round == ActRound::None
            && d.ty == GGML_TYPE_F32
            && d.nb[0] == 4
            && d.nb[1].is_multiple_of(4)
    });
    if let Some((i1, i12, i13)) = run {
        let stride = d.nb[1] / 4;
        let len = (cols.len() - 1) * stride + k;
        // SAFETY: rows i1..i1+len of matrix (i12, i13) are readable f32, `len` values from here.
        let src = unsafe {
            std::slice::from_raw_parts(
                g.src1.data.add(d.row_offset(i1, i12, i13)).cast::<f32>(),
                len,
            )
        };
        ane_convert::act_f32_to_f16_transposed(src, cols.len(), k, stride, &mut xs[..k * s.n], s.n)
            .map_err(|e| EngineError::Eval(format!("activation conversion: {e}")))?;
        xs[k * s.n..].fill(f16::ZERO);
        // fp16 conversion of a value beyond 65504 (or a non-finite input) gives a non-finite value.
        if !guard::fp16_ok(&xs[..k * s.n]) {
            return Err(guard::trip(cx.stats, "src1 out of fp16 range"));
        }
        return Ok(());
    }
    if round != ActRound::None {
        // SAFETY: forwarded contract.
        let rows = unsafe { read_rounded(cx, g, cols, k, round)? };
        ane_convert::act_f32_to_f16_transposed(&rows, cols.len(), k, k, &mut xs[..k * s.n], s.n)
            .map_err(|e| EngineError::Eval(format!("activation conversion: {e}")))?;
        xs[k * s.n..].fill(f16::ZERO);
        if !guard::fp16_ok(&xs[..k * s.n]) {
            return Err(guard::trip(cx.stats, "src1 out of fp16 range"));
        }
        return Ok(());
    }
    xs.fill(f16::ZERO);
    let mut row = vec![0f32; k];
    for (c, &(i1, i12, i13)) in cols.iter().enumerate() {
        // SAFETY: forwarded contract.
        unsafe { read_row(&g.src1, &g.src1_info, i1, i12, i13, &mut row) };
        if !guard::input_ok(&row) {
            return Err(guard::trip(cx.stats, "src1 out of fp16 range"));
        }
        for (ki, &v) in row.iter().enumerate() {
            xs[ki * s.n + c] = f16::from_f32(v);
        }
    }
    Ok(())
}

/// Values of a batch from which rounding runs on several threads (the host's own threads are
/// idle while a device split runs).
const PAR_ROUND_MIN: usize = 1 << 16;

/// The src1 rows of `cols` (`[cols][k]`, f32), rounded as the CPU backend rounds them for this
/// group's weights (`round`), on up to 8 threads for large batches.
///
/// # Safety
/// As for [`compute`].
unsafe fn read_rounded(
    cx: &Context<'_>,
    g: &Group,
    cols: &[(usize, usize, usize)],
    k: usize,
    round: ActRound,
) -> Result<Vec<f32>, EngineError> {
    let mut rows = vec![0f32; cols.len() * k];
    for (r, &(i1, i12, i13)) in rows.chunks_exact_mut(k).zip(cols) {
        // SAFETY: forwarded contract.
        unsafe { read_row(&g.src1, &g.src1_info, i1, i12, i13, r) };
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
///
/// # Safety
/// As for [`compute`].
pub(super) unsafe fn fill_tokens(
    cx: &Context<'_>,
    g: &Group,
    s: &TiledShape,
    k: usize,
    cols: &[(usize, usize, usize)],
    x: &mut Surface,
) -> Result<(), EngineError> {
    let xs = x.fp16_mut(s.x_len());
    let d = &g.src1.desc;
    let plain_f32 = d.ty == GGML_TYPE_F32 && d.nb[0] == 4;
    let round = act_round(cx, g);
    let rounded = match round {
        ActRound::None => None,
        // SAFETY: forwarded contract.
        _ => Some(unsafe { read_rounded(cx, g, cols, k, round)? }),
    };
    let mut row = vec![0f32; k];
    for (cidx, &(i1, i12, i13)) in cols.iter().enumerate() {
        let base = d.row_offset(i1, i12, i13);
        let src: &[f32] = if let Some(r) = &rounded {
            &r[cidx * k..(cidx + 1) * k]
        } else if plain_f32 {
            // SAFETY: a contiguous f32 row of k values starts at `base`.
            unsafe { std::slice::from_raw_parts(g.src1.data.add(base).cast::<f32>(), k) }
        } else {
            // SAFETY: forwarded contract.
            unsafe { read_row(&g.src1, &g.src1_info, i1, i12, i13, &mut row) };
            if !guard::input_ok(&row) {
                return Err(guard::trip(cx.stats, "src1 out of fp16 range"));
            }
            &row
        };
        for c in 0..s.k_chunks {
            let seg = &mut xs[(c * s.n + cidx) * s.k_chunk..(c * s.n + cidx + 1) * s.k_chunk];
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
    for c in 0..s.k_chunks {
        xs[(c * s.n + cols.len()) * s.k_chunk..(c + 1) * s.n * s.k_chunk].fill(f16::ZERO);
    }
    Ok(())
}

/// Token-major outputs (`[tiles][k_chunks][n][m_tile]`) into each member's dst rows: one slice is
/// a plain fp16 -> fp32 copy per token and tile; several slices are summed in f32.
///
/// # Safety
/// As for [`compute`].
pub(super) unsafe fn scatter_tokens(
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
            let base = d.row_offset(i1, i12, i13);
            let mut mi = 0;
            while mi < rows {
                let (t, row) = ((r0 + mi) / s.m_tile, (r0 + mi) % s.m_tile);
                let seg = (s.m_tile - row).min(rows - mi);
                let at = |c: usize| ((t * s.k_chunks + c) * s.n + cidx) * s.m_tile + row;
                if s.k_chunks == 1 && d.nb[0] == 4 {
                    // SAFETY: `seg` contiguous f32 outputs of this token start here.
                    let out = unsafe {
                        std::slice::from_raw_parts_mut(
                            m.dst.data.cast_mut().add(base + mi * 4).cast::<f32>(),
                            seg,
                        )
                    };
                    ane_convert::f16_to_f32(&ys[at(0)..at(0) + seg], out)
                        .map_err(|e| EngineError::Eval(format!("output conversion: {e}")))?;
                } else {
                    for j in 0..seg {
                        let acc: f32 = (0..s.k_chunks).map(|c| ys[at(c) + j].to_f32()).sum();
                        // SAFETY: an in-bounds element of a writable f32 dst.
                        unsafe { put(&m.dst, mi + j, i1, i12, i13, acc) };
                    }
                }
                mi += seg;
            }
        }
        r0 += rows;
    }
    Ok(())
}
