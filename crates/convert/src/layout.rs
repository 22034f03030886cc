//! Activations in, outputs out: contiguous f32 <-> f16 and the ANE layout transforms, as generic
//! bodies over a [`Kernel`]. Bounds are checked by the public wrappers in `lib.rs`; these bodies
//! trust them.
//!
//! The transforms go through a small staging block that stays in L1: 8x8 tiles read the source
//! along its rows and write the block; then each row of the block is copied to the destination
//! in one burst. Without it, power-of-two row strides (K = 4096 f32 is 16 KiB) put every row of
//! a strip in the same cache set, and the transposes ran at a fifth of their in-cache speed.
//! Source and destination rows of the next block are prefetched, because runs of 128-512 bytes
//! per row are too short for the hardware prefetchers.
//!
//! Kernels with non-temporal stores ([`Kernel::STREAM`], x86_64) take a different path for
//! the part of the destination that is made of whole, aligned 64-byte lines: each line is
//! assembled in registers (activations) or in an L1 stage (outputs) and written once with
//! streaming stores. Ordinary stores read every destination line before writing it and push
//! the source out of the cache; on 64 MiB buffers that kept the transposes at 0.3x memcpy, the
//! streaming path runs at 0.6-0.7x (x86_64, one thread). The edges (the unaligned head, the tails) go through the
//! staged path above.

use crate::kernel::{narrow1, prefetch, widen1, Kernel};

/// Staging block for activations: [`ACT_BK`] channels x [`ACT_BN`] tokens of fp16 (16 KiB).
const ACT_BK: usize = 128;
const ACT_BN: usize = 64;
/// Staging block for outputs: [`OUT_BN`] tokens x [`OUT_BM`] channels of f32 (32 KiB).
const OUT_BN: usize = 128;
const OUT_BM: usize = 64;

/// fp16 transpose block: [`TR_BR`] source rows x [`TR_BC`] source columns per L1 stage (16 KiB).
/// Each destination row gets a run of 256 bytes per visit, each source row one of 128 bytes.
/// Measured on 4096 x 4096 (8 KiB strides both sides): 128 x 64 ran at 1.5x of 64 x 64 and 2x
/// of 32 x 32; 128 x 128 no better. Sweeping the columns in chunks (to keep the destination
/// pages in the TLB, as [`OUT_S_NC`]) made no difference.
const TR_BR: usize = 128;
const TR_BC: usize = 64;

/// The unit the streaming paths write whole, in bytes.
const LINE: usize = 64;
/// Streaming outputs: [`OUT_S_BN`] tokens x [`OUT_S_BM`] channels of f32 per L1 stage (8 KiB),
/// so every destination row gets a run of 256 bytes (4 lines) and every source row (a channel) is
/// read one whole 64-byte line at a time; measured best of 16-128 channels x 16-64 tokens.
const OUT_S_BN: usize = 32;
const OUT_S_BM: usize = 64;
/// Streaming outputs: tokens per sweep over the channels, so the destination rows of one sweep
/// (one page each when M is large) stay in the TLB.
const OUT_S_NC: usize = 512;

/// `dst[i] = f16(src[i])`; `src.len() == dst.len()`.
#[inline(always)]
pub(crate) unsafe fn narrow<K: Kernel>(src: &[f32], dst: &mut [u16]) {
    debug_assert_eq!(src.len(), dst.len());
    let n8 = src.len() & !7;
    let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
    let mut i = 0;
    while i < n8 {
        // SAFETY: i + 8 <= len on both sides.
        unsafe { K::narrow8(s.add(i), d.add(i)) };
        i += 8;
    }
    for j in n8..src.len() {
        dst[j] = narrow1(src[j]);
    }
}

/// `dst[i] = f32(src[i])`; `src.len() == dst.len()`.
#[inline(always)]
pub(crate) unsafe fn widen<K: Kernel>(src: &[u16], dst: &mut [f32]) {
    debug_assert_eq!(src.len(), dst.len());
    let n8 = src.len() & !7;
    let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
    let mut i = 0;
    while i < n8 {
        // SAFETY: i + 8 <= len on both sides.
        unsafe { K::widen8(s.add(i), d.add(i)) };
        i += 8;
    }
    for j in n8..src.len() {
        dst[j] = widen1(src[j]);
    }
}

/// Activations: `src` is N rows of K f32 (row `n` starts at `n * stride`); writes
/// `dst[k * np + n] = f16(src[n * stride + k])` and zeroes the padding columns `n in N..np`.
/// The caller checked `stride >= k`, `np >= n`, `src.len() >= (n-1)*stride + k`, `dst.len() >= k*np`.
#[inline(always)]
pub(crate) unsafe fn act<K: Kernel>(
    src: &[f32],
    n: usize,
    k: usize,
    stride: usize,
    dst: &mut [u16],
    np: usize,
) {
    let mut streamed = false;
    // Rows are `np * 2` bytes apart: with `np % 32 == 0` the same token starts a line in all rows.
    if K::STREAM && np.is_multiple_of(32) {
        let head = (LINE - dst.as_ptr() as usize % LINE) % LINE / 2;
        // Likewise on the source side when `stride % 16 == 0`: start at a line, so each 16-channel
        // step reads whole lines. Straddling ones are finished by the next step, after the other
        // 31 rows (same L1 set at power-of-two strides) evicted them: 0.53x memcpy instead of 0.7.
        let ch = match stride % 16 {
            0 => ((LINE - src.as_ptr() as usize % LINE) % LINE / 4).min(k),
            _ => 0,
        };
        let (n32, k16) = (n.saturating_sub(head) & !31, (k - ch) & !15);
        if n32 > 0 && k16 > 0 {
            let (t1, c1) = (head + n32, ch + k16);
            // SAFETY: every call below covers a sub-rectangle of the caller's checked shape:
            // tokens head..t1 x channels ch..c1 (streamed), then tokens 0..head and t1..n (all
            // channels), and channels 0..ch and c1..k of tokens head..t1. Offsets keep
            // `src.len() >= (n'-1)*stride + k'` and `dst.len() >= (k'-1)*np + n'` because
            // `t1 <= n <= np` and `c1 <= k <= stride`.
            unsafe {
                let (s, d) = (&src[head * stride + ch..], &mut dst[ch * np + head..]);
                act_stream::<K>(s, n32, k16, stride, d, np);
                if head > 0 {
                    act_tiles::<K>(src, head, k, stride, dst, np);
                }
                if t1 < n {
                    act_tiles::<K>(&src[t1 * stride..], n - t1, k, stride, &mut dst[t1..], np);
                }
                if ch > 0 {
                    let (s, d) = (&src[head * stride..], &mut dst[head..]);
                    act_tiles::<K>(s, n32, ch, stride, d, np);
                }
                if c1 < k {
                    let (s, d) = (&src[head * stride + c1..], &mut dst[c1 * np + head..]);
                    act_tiles::<K>(s, n32, k - c1, stride, d, np);
                }
            }
            streamed = true;
        }
    }
    if !streamed {
        // SAFETY: the caller's contract.
        unsafe { act_tiles::<K>(src, n, k, stride, dst, np) };
    }
    if np > n {
        for kk in 0..k {
            dst[kk * np + n..(kk + 1) * np].fill(0);
        }
    }
}

/// The streaming part of [`act`]: `n` a multiple of 32, `k` of 16, every destination row 64-byte
/// aligned (`dst` is, and `np % 32 == 0`). Strips of 32 tokens run over all channels, 16 at a
/// time, so the 32 source rows are read as sequential streams and each step writes 16 whole
/// lines; chunking the channels (to keep the destination pages in the TLB) measured no better.
#[inline(always)]
unsafe fn act_stream<K: Kernel>(
    src: &[f32],
    n: usize,
    k: usize,
    stride: usize,
    dst: &mut [u16],
    np: usize,
) {
    debug_assert!(n.is_multiple_of(32) && k.is_multiple_of(16) && np.is_multiple_of(32));
    debug_assert_eq!(dst.as_ptr() as usize % LINE, 0);
    let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
    for t0 in (0..n).step_by(32) {
        for c in (0..k).step_by(16) {
            // SAFETY: tokens t0..+32 <= n, channels c..+16 <= k within the caller's bounds;
            // destination rows c..+16 start at a line (`dst` aligned, `np * 2` a multiple of 64,
            // `t0 * 2` too).
            unsafe {
                K::narrow32x16_t_stream(s.add(t0 * stride + c), stride, d.add(c * np + t0), np)
            };
        }
    }
    K::stream_fence();
}

/// The staged body of [`act`] for a sub-rectangle: writes `dst[k * np + n]` for n < N, k < K
/// only (no padding), so `np` is just the destination row stride here. Needs
/// `src.len() >= (n-1)*stride + k`, `dst.len() >= (k-1)*np + n`, `np >= n`.
#[inline(always)]
unsafe fn act_tiles<K: Kernel>(
    src: &[f32],
    n: usize,
    k: usize,
    stride: usize,
    dst: &mut [u16],
    np: usize,
) {
    let (n8, k8) = (n & !7, k & !7);
    let s = src.as_ptr();
    let mut stage = [0u16; ACT_BK * ACT_BN];
    // Channel blocks outside, so the destination rows of a block advance contiguously.
    for kb in (0..k8).step_by(ACT_BK) {
        let bk = ACT_BK.min(k8 - kb);
        for nb in (0..n8).step_by(ACT_BN) {
            let bn = ACT_BN.min(n8 - nb);
            for nt in (0..bn).step_by(8) {
                // The next block's source rows (one line in 16 f32) and destination rows.
                for r in nb + ACT_BN + nt..(nb + ACT_BN + nt + 8).min(n8) {
                    for c in (kb..kb + bk).step_by(16) {
                        prefetch(s.wrapping_add(r * stride + c));
                    }
                }
                for r in kb + 2 * nt..kb + 2 * nt + 16 {
                    prefetch(dst.as_ptr().wrapping_add(r * np + nb + ACT_BN));
                    prefetch(dst.as_ptr().wrapping_add(r * np + nb + ACT_BN + 32));
                }
                for kt in (0..bk).step_by(8) {
                    // SAFETY: source rows nb+nt..+8 < n8 <= n, columns kb+kt..+8 <= k8 <= k <=
                    // stride; stage rows kt..+8 < ACT_BK, columns nt..+8 <= ACT_BN.
                    unsafe {
                        K::narrow8x8_t(
                            s.add((nb + nt) * stride + kb + kt),
                            stride,
                            stage.as_mut_ptr().add(kt * ACT_BN + nt),
                            ACT_BN,
                        )
                    };
                }
            }
            for r in 0..bk {
                let o = (kb + r) * np + nb;
                dst[o..o + bn].copy_from_slice(&stage[r * ACT_BN..r * ACT_BN + bn]);
            }
        }
    }
    // Ragged edges: the last k % 8 channels for every token, the last n % 8 tokens for the rest.
    for kk in k8..k {
        for nn in 0..n {
            dst[kk * np + nn] = narrow1(src[nn * stride + kk]);
        }
    }
    for nn in n8..n {
        for kk in 0..k8 {
            dst[kk * np + nn] = narrow1(src[nn * stride + kk]);
        }
    }
}

/// Outputs: `src` is M rows of `np` f16 (channel-first, N valid columns); writes
/// `dst[n * stride + m] = f32(src[m * np + n])` for n < N, m < M. Padding columns are not read.
/// The caller checked `np >= n`, `src.len() >= m*np`, `stride >= m`, `dst.len() >= (n-1)*stride + m`.
#[inline(always)]
pub(crate) unsafe fn out<K: Kernel>(
    src: &[u16],
    m: usize,
    np: usize,
    n: usize,
    dst: &mut [f32],
    stride: usize,
) {
    // Rows are `stride * 4` bytes apart: with `stride % 16 == 0` the same channel starts a line
    // in every row.
    if K::STREAM && stride.is_multiple_of(16) {
        let head = (LINE - dst.as_ptr() as usize % LINE) % LINE / 4;
        let (m64, n32) = (
            m.saturating_sub(head) & !(OUT_S_BM - 1),
            n & !(OUT_S_BN - 1),
        );
        if m64 > 0 && n32 > 0 {
            let m1 = head + m64;
            // SAFETY: every call below covers a sub-rectangle of the caller's checked shape:
            // channels head..m1 x tokens 0..n32 (streamed), then channels 0..head, m1..m and the
            // tokens n32..n of channels head..m1. Offsets keep `src.len() >= (m'-1)*np + n'` and
            // `dst.len() >= (n'-1)*stride + m'` because `m1 <= m` and `n <= np`.
            unsafe {
                out_stream::<K>(&src[head * np..], m64, np, n32, &mut dst[head..], stride);
                if head > 0 {
                    out_tiles::<K>(src, head, np, n, dst, stride);
                }
                if m1 < m {
                    out_tiles::<K>(&src[m1 * np..], m - m1, np, n, &mut dst[m1..], stride);
                }
                if n32 < n {
                    let (s, d) = (&src[head * np + n32..], &mut dst[n32 * stride + head..]);
                    out_tiles::<K>(s, m64, np, n - n32, d, stride);
                }
            }
            return;
        }
    }
    // SAFETY: the caller's contract.
    unsafe { out_tiles::<K>(src, m, np, n, dst, stride) };
}

/// The streaming part of [`out`]: `m` a multiple of [`OUT_S_BM`], `n` of [`OUT_S_BN`], every
/// destination row 64-byte aligned (`dst` is, and `stride % 16 == 0`). Blocks of 64 channels x 32
/// tokens are transposed into an L1 stage in source-line order, then each token's 256 bytes are
/// streamed out. Keeping lines in registers instead (16 channels, 64-byte runs) measured slower.
#[inline(always)]
unsafe fn out_stream<K: Kernel>(
    src: &[u16],
    m: usize,
    np: usize,
    n: usize,
    dst: &mut [f32],
    stride: usize,
) {
    /// Aligned so the stage rows can be read with aligned loads.
    #[repr(align(64))]
    struct Stage([f32; OUT_S_BN * OUT_S_BM]);
    debug_assert!(
        m.is_multiple_of(OUT_S_BM) && n.is_multiple_of(OUT_S_BN) && stride.is_multiple_of(16)
    );
    debug_assert_eq!(dst.as_ptr() as usize % LINE, 0);
    let mut stage = Stage([0.0; OUT_S_BN * OUT_S_BM]);
    let st = stage.0.as_mut_ptr();
    let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
    for nb in (0..n).step_by(OUT_S_NC) {
        let ne = (nb + OUT_S_NC).min(n);
        for m0 in (0..m).step_by(OUT_S_BM) {
            for t in (nb..ne).step_by(OUT_S_BN) {
                for cg in (0..OUT_S_BM).step_by(8) {
                    for g in (0..OUT_S_BN).step_by(8) {
                        // SAFETY: source rows m0+cg..+8 < m, columns t+g..+8 <= n <= np; stage
                        // rows g..+8 < OUT_S_BN, columns cg..+8 <= OUT_S_BM.
                        unsafe {
                            K::widen8x8_t(
                                s.add((m0 + cg) * np + t + g),
                                np,
                                st.add(g * OUT_S_BM + cg),
                                OUT_S_BM,
                            )
                        };
                    }
                }
                for r in 0..OUT_S_BN {
                    // SAFETY: stage row r is 64 values at a 256-byte offset of an aligned array;
                    // destination row t+r < n, channels m0..+64 <= m, 64-byte aligned.
                    unsafe { K::stream64_f32(st.add(r * OUT_S_BM), d.add((t + r) * stride + m0)) };
                }
            }
        }
    }
    K::stream_fence();
}

/// The staged body of [`out`] for a sub-rectangle. Needs `src.len() >= (m-1)*np + n`, `np >= n`,
/// `stride >= m`, `dst.len() >= (n-1)*stride + m`.
#[inline(always)]
unsafe fn out_tiles<K: Kernel>(
    src: &[u16],
    m: usize,
    np: usize,
    n: usize,
    dst: &mut [f32],
    stride: usize,
) {
    let (n8, m8) = (n & !7, m & !7);
    let s = src.as_ptr();
    let mut stage = [0f32; OUT_BN * OUT_BM];
    // Token blocks outside, so the destination rows of a block advance contiguously.
    for nb in (0..n8).step_by(OUT_BN) {
        let bn = OUT_BN.min(n8 - nb);
        for mb in (0..m8).step_by(OUT_BM) {
            let bm = OUT_BM.min(m8 - mb);
            for mt in (0..bm).step_by(8) {
                // The next block's source rows (one line in 32 f16) and destination rows.
                for r in mb + OUT_BM + mt..(mb + OUT_BM + mt + 8).min(m8) {
                    for c in (nb..nb + bn).step_by(32) {
                        prefetch(s.wrapping_add(r * np + c));
                    }
                }
                for r in nb + 2 * mt..nb + 2 * mt + 16 {
                    for c in (0..OUT_BM).step_by(16) {
                        prefetch(dst.as_ptr().wrapping_add(r * stride + mb + OUT_BM + c));
                    }
                }
                for nt in (0..bn).step_by(8) {
                    // SAFETY: source rows mb+mt..+8 < m8 <= m, columns nb+nt..+8 <= n8 <= np;
                    // stage rows nt..+8 < OUT_BN, columns mt..+8 <= OUT_BM.
                    unsafe {
                        K::widen8x8_t(
                            s.add((mb + mt) * np + nb + nt),
                            np,
                            stage.as_mut_ptr().add(nt * OUT_BM + mt),
                            OUT_BM,
                        )
                    };
                }
            }
            for r in 0..bn {
                let o = (nb + r) * stride + mb;
                dst[o..o + bm].copy_from_slice(&stage[r * OUT_BM..r * OUT_BM + bm]);
            }
        }
    }
    for nn in n8..n {
        for mm in 0..m {
            dst[nn * stride + mm] = widen1(src[mm * np + nn]);
        }
    }
    for nn in 0..n8 {
        for mm in m8..m {
            dst[nn * stride + mm] = widen1(src[mm * np + nn]);
        }
    }
}

/// fp16 bit patterns: `dst[c * ds + r] = src[r * ss + c]` for r < rows, c < cols.
/// The caller checked `ss >= cols`, `ds >= rows`, `src.len() >= (rows-1)*ss + cols`,
/// `dst.len() >= (cols-1)*ds + rows`.
///
/// Blocks of [`TR_BR`] x [`TR_BC`] go through an L1 stage, as in [`act_tiles`]: the 8x8 tiles of
/// one row group consume whole source lines before moving on, and each destination row of the
/// block is then written as one run. Writing the tiles straight to the destination leaves every
/// line half-used between visits; with power-of-two strides (K = 4096 is 8 KiB) all those lines
/// fall in the same cache sets and are evicted before they are finished.
///
/// With [`Kernel::STREAM`], a 64-byte aligned `dst` and `ds % 32 == 0`, the runs of whole lines
/// are written with non-temporal stores: 2.2x on 4096 x 4096 (0.45x memcpy instead of 0.2x) and
/// 2x for 32-row calls into a 4096-wide tile, since ordinary stores read every destination line
/// first and evict the source. Other shapes and alignments take the ordinary copy.
#[inline(always)]
pub(crate) unsafe fn transpose<K: Kernel>(
    src: &[u16],
    rows: usize,
    cols: usize,
    ss: usize,
    dst: &mut [u16],
    ds: usize,
) {
    /// Aligned so the stage rows can be read with aligned loads.
    #[repr(align(64))]
    struct Stage([u16; TR_BC * TR_BR]);
    let (r8, c8) = (rows & !7, cols & !7);
    let s = src.as_ptr();
    // Rows are `ds * 2` bytes apart: with `ds % 32 == 0` every row's run starts on a line.
    let stream = K::STREAM && ds.is_multiple_of(32) && (dst.as_ptr() as usize).is_multiple_of(LINE);
    let mut stage = Stage([0; TR_BC * TR_BR]);
    for rb in (0..r8).step_by(TR_BR) {
        let br = TR_BR.min(r8 - rb);
        for cb in (0..c8).step_by(TR_BC) {
            let bc = TR_BC.min(c8 - cb);
            for rt in (0..br).step_by(8) {
                // The next block's part of these source rows (one line in 32 f16): 128 streams
                // of 128 bytes are too many and too short for the hardware prefetchers; without
                // this, 4096 x 4096 ran at 0.65x.
                for r in rb + rt..rb + rt + 8 {
                    for c in (cb + TR_BC..cb + 2 * TR_BC).step_by(32) {
                        prefetch(s.wrapping_add(r * ss + c));
                    }
                }
                for ct in (0..bc).step_by(8) {
                    // SAFETY: source rows rb+rt..+8 <= r8 <= rows, columns cb+ct..+8 <= c8 <=
                    // cols <= ss; stage rows ct..+8 <= TR_BC, columns rt..+8 <= TR_BR.
                    unsafe {
                        K::transpose8x8_u16(
                            s.add((rb + rt) * ss + cb + ct),
                            ss,
                            stage.0.as_mut_ptr().add(ct * TR_BR + rt),
                            TR_BR,
                        )
                    };
                }
            }
            if stream && br.is_multiple_of(32) {
                for c in 0..bc {
                    for l in (0..br).step_by(32) {
                        // SAFETY: stage row c is 64-byte aligned (TR_BR * 2 bytes a multiple of
                        // 64), l a multiple of 32; destination row cb+c < cols, columns
                        // rb+l..+32 <= rows, on a line because `dst` and `ds * 2` are multiples
                        // of 64 and so is `(rb + l) * 2`.
                        unsafe {
                            K::stream32_u16(
                                stage.0.as_ptr().add(c * TR_BR + l),
                                dst.as_mut_ptr().add((cb + c) * ds + rb + l),
                            )
                        };
                    }
                }
            } else if br == TR_BR {
                for c in 0..bc {
                    // SAFETY: destination row cb+c < cols, columns rb..+TR_BR <= rows <= ds; a
                    // constant count, so the copy is inlined as vector moves, not a memcpy call.
                    unsafe {
                        core::ptr::copy_nonoverlapping(
                            stage.0.as_ptr().add(c * TR_BR),
                            dst.as_mut_ptr().add((cb + c) * ds + rb),
                            TR_BR,
                        )
                    };
                }
            } else {
                for c in 0..bc {
                    let o = (cb + c) * ds + rb;
                    dst[o..o + br].copy_from_slice(&stage.0[c * TR_BR..c * TR_BR + br]);
                }
            }
        }
    }
    if stream {
        K::stream_fence();
    }
    // Ragged edges: the last cols % 8 columns of every row, the last rows % 8 rows of the rest.
    for c in c8..cols {
        for r in 0..rows {
            dst[c * ds + r] = src[r * ss + c];
        }
    }
    for r in r8..rows {
        for c in 0..c8 {
            dst[c * ds + r] = src[r * ss + c];
        }
    }
}
