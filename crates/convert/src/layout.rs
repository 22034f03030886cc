//! Activations in, outputs out: contiguous f32 <-> f16 and the ANE layout transforms, as generic
//! bodies over a [`Kernel`]. Bounds are checked by the public wrappers in `lib.rs`; these bodies
//! trust them.
//!
//! The transforms walk 8x8 tiles in strips so that both sides touch whole cache lines while the
//! strip is hot: a strip is [`STRIP`] columns of the side that is read row-wise; inside it, tiles
//! advance along the side that is written row-wise, filling its lines 16-32 bytes at a time.

use crate::kernel::{narrow1, widen1, Kernel};

/// Tiles per strip side (8 tiles = 64 elements: 256 B of f32, 128 B of f16).
const STRIP: usize = 64;

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
    let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
    let mut kb = 0;
    while kb < k8 {
        let ke = (kb + STRIP).min(k8);
        let mut nb = 0;
        while nb < n8 {
            let mut kt = kb;
            while kt < ke {
                // SAFETY: rows nb..nb+8 < n and columns kt..kt+8 <= k of src; rows kt..kt+8 < k
                // and columns nb..nb+8 <= n <= np of dst.
                unsafe { K::narrow8x8_t(s.add(nb * stride + kt), stride, d.add(kt * np + nb), np) };
                kt += 8;
            }
            nb += 8;
        }
        kb = ke;
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
    let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
    let mut nb = 0;
    while nb < n8 {
        let ne = (nb + STRIP).min(n8);
        let mut mb = 0;
        while mb < m8 {
            let mut nt = nb;
            while nt < ne {
                // SAFETY: rows mb..mb+8 < m, columns nt..nt+8 <= n <= np of src; rows nt..nt+8 < n,
                // columns mb..mb+8 <= m <= stride of dst.
                unsafe { K::widen8x8_t(s.add(mb * np + nt), np, d.add(nt * stride + mb), stride) };
                nt += 8;
            }
            mb += 8;
        }
        nb = ne;
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
