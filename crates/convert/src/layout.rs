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

use crate::kernel::{narrow1, prefetch, widen1, Kernel};

/// Staging block for activations: [`ACT_BK`] channels x [`ACT_BN`] tokens of fp16 (16 KiB).
const ACT_BK: usize = 128;
const ACT_BN: usize = 64;
/// Staging block for outputs: [`OUT_BN`] tokens x [`OUT_BM`] channels of f32 (32 KiB).
const OUT_BN: usize = 128;
const OUT_BM: usize = 64;

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
    if np > n {
        for kk in 0..k {
            dst[kk * np + n..(kk + 1) * np].fill(0);
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
