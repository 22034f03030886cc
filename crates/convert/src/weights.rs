//! ggml weight rows to fp16, one block at a time.
//!
//! Each block is decoded into a stack array of f32 (at most 256 values, 1 KiB) with exactly the
//! float operations ggml's reference `to_float` performs, in the same order and without fusing
//! (`x*d + m` is two roundings, `d*sc*q` is `(d*sc)*q`), then narrowed to fp16 by the kernel straight
//! into the destination. So the result is `round_ne_f16(ggml_to_float(x))` bit for bit, with one
//! read of the source and one write of the destination.
//!
//! Block layouts (little-endian; `d`, `m`, `dmin` are IEEE fp16), from the ggml-common.h structs:
//!
//! | type | elems | bytes | layout |
//! |---|---|---|---|
//! | Q4_0 | 32 | 18 | d, qs[16]: element j is the low nibble of qs[j], element j+16 the high nibble |
//! | Q4_1 | 32 | 20 | d, m, qs[16] (as Q4_0, value q*d + m) |
//! | Q5_0 | 32 | 22 | d, qh[4] (u32: bit j is the 5th bit of element j), qs[16] |
//! | Q5_1 | 32 | 24 | d, m, qh[4], qs[16] |
//! | Q8_0 | 32 | 34 | d, qs[32] (i8) |
//! | Q2_K | 256 | 84 | scales[16] (low nibble scale, high nibble min), qs[64], d, dmin |
//! | Q3_K | 256 | 110 | hmask[32], qs[64], scales[12] (16 x 6 bit, biased by 32), d |
//! | Q4_K | 256 | 144 | d, dmin, scales[12] (8 x (6-bit scale, 6-bit min)), qs[128] |
//! | Q5_K | 256 | 176 | d, dmin, scales[12], qh[32], qs[128] |
//! | Q6_K | 256 | 210 | ql[128], qh[64], scales[16] (i8), d |
//! | IQ4_NL | 32 | 18 | d, qs[16] indexing the non-linear table [`IQ4NL_VALUES`] |
//! | IQ4_XS | 256 | 136 | d, scales_h (u16), scales_l[4], qs[128] |
//!
//! In the 2- and 3-bit K-quants, a 128-element half holds 32 bytes of `qs`; bit pair `2j` of byte
//! `l` is element `32j + l` of that half. In Q4_K/Q5_K a 64-element group is 32 bytes whose low
//! nibbles are its first 32 elements and high nibbles the next 32.

use half::f16;

use crate::kernel::{narrow1, Kernel};
use crate::types::*;

/// The IQ4_NL / IQ4_XS code book: the 16 values a 4-bit index stands for (times the scale).
pub const IQ4NL_VALUES: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// Elements per block and bytes per block of a type this crate converts natively.
pub fn block_layout(ggml_type: i32) -> Option<(usize, usize)> {
    Some(match ggml_type {
        GGML_TYPE_F32 => (1, 4),
        GGML_TYPE_F16 | GGML_TYPE_BF16 => (1, 2),
        GGML_TYPE_Q4_0 => (32, 18),
        GGML_TYPE_Q4_1 => (32, 20),
        GGML_TYPE_Q5_0 => (32, 22),
        GGML_TYPE_Q5_1 => (32, 24),
        GGML_TYPE_Q8_0 => (32, 34),
        GGML_TYPE_Q2_K => (256, 84),
        GGML_TYPE_Q3_K => (256, 110),
        GGML_TYPE_Q4_K => (256, 144),
        GGML_TYPE_Q5_K => (256, 176),
        GGML_TYPE_Q6_K => (256, 210),
        GGML_TYPE_IQ4_NL => (32, 18),
        GGML_TYPE_IQ4_XS => (256, 136),
        _ => return None,
    })
}

/// fp16 field at byte `off`, widened exactly.
#[inline(always)]
fn half_at<const N: usize>(b: &[u8; N], off: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[off], b[off + 1]])).to_f32_const()
}

/// Narrows a decoded block into `dst` (same length, a multiple of 8).
#[inline(always)]
unsafe fn store<K: Kernel, const N: usize>(y: &[f32; N], dst: &mut [u16]) {
    debug_assert_eq!(dst.len(), N);
    let mut i = 0;
    while i < N {
        // SAFETY: N is a multiple of 8 and dst.len() == N.
        unsafe { K::narrow8(y.as_ptr().add(i), dst.as_mut_ptr().add(i)) };
        i += 8;
    }
}

/// Runs `decode` on every block of `src` and narrows each into its slot of `dst`.
#[inline(always)]
unsafe fn blocks<K: Kernel, const BYTES: usize, const QK: usize>(
    src: &[u8],
    dst: &mut [u16],
    decode: impl Fn(&[u8; BYTES], &mut [f32; QK]),
) {
    let mut y = [0f32; QK];
    for (b, out) in src.chunks_exact(BYTES).zip(dst.chunks_exact_mut(QK)) {
        decode(b.try_into().expect("chunks_exact"), &mut y);
        // SAFETY: out.len() == QK, a multiple of 8 for every block type.
        unsafe { store::<K, QK>(&y, out) };
    }
}

#[inline(always)]
fn q4_0(b: &[u8; 18], y: &mut [f32; 32]) {
    let d = half_at(b, 0);
    for j in 0..16 {
        let q = b[2 + j];
        y[j] = ((q & 0xF) as i32 - 8) as f32 * d;
        y[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
    }
}

#[inline(always)]
fn q4_1(b: &[u8; 20], y: &mut [f32; 32]) {
    let (d, m) = (half_at(b, 0), half_at(b, 2));
    for j in 0..16 {
        let q = b[4 + j];
        y[j] = (q & 0xF) as f32 * d + m;
        y[j + 16] = (q >> 4) as f32 * d + m;
    }
}

/// The 5th bits of a Q5 block as (element j, element j + 16) in bit 4.
#[inline(always)]
fn q5_high(qh: u32, j: usize) -> (u8, u8) {
    (
        (((qh >> j) & 1) << 4) as u8,
        (((qh >> (j + 16)) & 1) << 4) as u8,
    )
}

#[inline(always)]
fn q5_0(b: &[u8; 22], y: &mut [f32; 32]) {
    let d = half_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    for j in 0..16 {
        let q = b[6 + j];
        let (h0, h1) = q5_high(qh, j);
        y[j] = (((q & 0xF) | h0) as i32 - 16) as f32 * d;
        y[j + 16] = (((q >> 4) | h1) as i32 - 16) as f32 * d;
    }
}

#[inline(always)]
fn q5_1(b: &[u8; 24], y: &mut [f32; 32]) {
    let (d, m) = (half_at(b, 0), half_at(b, 2));
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    for j in 0..16 {
        let q = b[8 + j];
        let (h0, h1) = q5_high(qh, j);
        y[j] = ((q & 0xF) | h0) as f32 * d + m;
        y[j + 16] = ((q >> 4) | h1) as f32 * d + m;
    }
}

#[inline(always)]
fn q8_0(b: &[u8; 34], y: &mut [f32; 32]) {
    let d = half_at(b, 0);
    for j in 0..32 {
        y[j] = (b[2 + j] as i8) as f32 * d;
    }
}

#[inline(always)]
fn q2_k(b: &[u8; 84], y: &mut [f32; 256]) {
    let (d, dmin) = (half_at(b, 80), half_at(b, 82));
    for half in 0..2 {
        let qs = &b[16 + 32 * half..16 + 32 * half + 32];
        for j in 0..4 {
            for sub in 0..2 {
                let sc = b[8 * half + 2 * j + sub];
                let dl = d * (sc & 0xF) as f32;
                let ml = dmin * (sc >> 4) as f32;
                let base = 128 * half + 32 * j + 16 * sub;
                for l in 0..16 {
                    let q = (qs[16 * sub + l] >> (2 * j)) & 3;
                    y[base + l] = dl * q as f32 - ml;
                }
            }
        }
    }
}

/// The 16 signed 6-bit scales of a Q3_K block: low 4 bits from bytes 0..8 (nibble j / 8),
/// high 2 bits from bytes 8..12 (bit pair j / 4 of byte 8 + j % 4), minus 32.
#[inline(always)]
fn q3_k_scales(s: &[u8]) -> [i32; 16] {
    let mut out = [0i32; 16];
    for (j, o) in out.iter_mut().enumerate() {
        let lo = if j < 8 { s[j] & 0xF } else { s[j - 8] >> 4 };
        let hi = (s[8 + j % 4] >> (2 * (j / 4))) & 3;
        *o = (lo | (hi << 4)) as i32 - 32;
    }
    out
}

#[inline(always)]
fn q3_k(b: &[u8; 110], y: &mut [f32; 256]) {
    let d = half_at(b, 108);
    let scales = q3_k_scales(&b[96..108]);
    let hmask = &b[0..32];
    for half in 0..2 {
        let qs = &b[32 + 32 * half..32 + 32 * half + 32];
        for j in 0..4 {
            let bit = 1u8 << (4 * half + j);
            for sub in 0..2 {
                let dl = d * scales[8 * half + 2 * j + sub] as f32;
                let base = 128 * half + 32 * j + 16 * sub;
                for l in 0..16 {
                    let i = 16 * sub + l;
                    let low = ((qs[i] >> (2 * j)) & 3) as i32;
                    let q = low - if hmask[i] & bit != 0 { 0 } else { 4 };
                    y[base + l] = dl * q as f32;
                }
            }
        }
    }
}

/// Scale and min number `j` (0..8) of a Q4_K/Q5_K block's 12 packed bytes: 6 bits each; for
/// j < 4 the low 6 bits of bytes j and j + 4, else a nibble of byte j + 4 plus the top 2 bits of
/// bytes j - 4 and j.
#[inline(always)]
fn k4_scale_min(s: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

#[inline(always)]
fn q4_k(b: &[u8; 144], y: &mut [f32; 256]) {
    let (d, dmin) = (half_at(b, 0), half_at(b, 2));
    let scales = &b[4..16];
    for g in 0..4 {
        let qs = &b[16 + 32 * g..16 + 32 * g + 32];
        let (sc0, m0) = k4_scale_min(scales, 2 * g);
        let (sc1, m1) = k4_scale_min(scales, 2 * g + 1);
        let (d0, mm0) = (d * sc0 as f32, dmin * m0 as f32);
        let (d1, mm1) = (d * sc1 as f32, dmin * m1 as f32);
        for l in 0..32 {
            y[64 * g + l] = d0 * (qs[l] & 0xF) as f32 - mm0;
            y[64 * g + 32 + l] = d1 * (qs[l] >> 4) as f32 - mm1;
        }
    }
}

#[inline(always)]
fn q5_k(b: &[u8; 176], y: &mut [f32; 256]) {
    let (d, dmin) = (half_at(b, 0), half_at(b, 2));
    let scales = &b[4..16];
    let qh = &b[16..48];
    for g in 0..4 {
        let qs = &b[48 + 32 * g..48 + 32 * g + 32];
        let (sc0, m0) = k4_scale_min(scales, 2 * g);
        let (sc1, m1) = k4_scale_min(scales, 2 * g + 1);
        let (d0, mm0) = (d * sc0 as f32, dmin * m0 as f32);
        let (d1, mm1) = (d * sc1 as f32, dmin * m1 as f32);
        for l in 0..32 {
            let h0 = ((qh[l] >> (2 * g)) & 1) << 4;
            let h1 = ((qh[l] >> (2 * g + 1)) & 1) << 4;
            y[64 * g + l] = d0 * ((qs[l] & 0xF) + h0) as f32 - mm0;
            y[64 * g + 32 + l] = d1 * ((qs[l] >> 4) + h1) as f32 - mm1;
        }
    }
}

#[inline(always)]
fn q6_k(b: &[u8; 210], y: &mut [f32; 256]) {
    let d = half_at(b, 208);
    for half in 0..2 {
        let ql = &b[64 * half..64 * half + 64];
        let qh = &b[128 + 32 * half..128 + 32 * half + 32];
        let sc = &b[192 + 8 * half..192 + 8 * half + 8];
        // Four 32-element quarters: low nibbles of ql[0..32], of ql[32..64], then the high
        // nibbles; the 2 high bits are bit pair `quarter` of qh[l]. 16 elements per scale.
        for quarter in 0..4 {
            let lo = &ql[32 * (quarter & 1)..32 * (quarter & 1) + 32];
            let shift = 4 * (quarter >> 1);
            for l in 0..32 {
                let q = ((lo[l] >> shift) & 0xF) | (((qh[l] >> (2 * quarter)) & 3) << 4);
                let s = sc[2 * quarter + l / 16] as i8;
                y[128 * half + 32 * quarter + l] = d * s as f32 * (q as i32 - 32) as f32;
            }
        }
    }
}

#[inline(always)]
fn iq4_nl(b: &[u8; 18], y: &mut [f32; 32]) {
    let d = half_at(b, 0);
    for j in 0..16 {
        let q = b[2 + j];
        y[j] = d * IQ4NL_VALUES[(q & 0xF) as usize] as f32;
        y[j + 16] = d * IQ4NL_VALUES[(q >> 4) as usize] as f32;
    }
}

#[inline(always)]
fn iq4_xs(b: &[u8; 136], y: &mut [f32; 256]) {
    let d = half_at(b, 0);
    let scales_h = u16::from_le_bytes([b[2], b[3]]);
    for ib in 0..8 {
        let lo = (b[4 + ib / 2] >> (4 * (ib % 2))) & 0xF;
        let hi = ((scales_h >> (2 * ib)) & 3) as u8;
        let dl = d * ((lo | (hi << 4)) as i32 - 32) as f32;
        let qs = &b[8 + 16 * ib..8 + 16 * ib + 16];
        for j in 0..16 {
            y[32 * ib + j] = dl * IQ4NL_VALUES[(qs[j] & 0xF) as usize] as f32;
            y[32 * ib + 16 + j] = dl * IQ4NL_VALUES[(qs[j] >> 4) as usize] as f32;
        }
    }
}

/// F32 source bytes (any alignment) to fp16.
#[inline(always)]
unsafe fn f32_row<K: Kernel>(src: &[u8], dst: &mut [u16]) {
    let mut y = [0f32; 8];
    let mut chunks = src.chunks_exact(32);
    for (c, d) in (&mut chunks).zip(dst.chunks_exact_mut(8)) {
        let c: &[u8; 32] = c.try_into().expect("chunks_exact");
        for (j, v) in y.iter_mut().enumerate() {
            *v = f32::from_le_bytes([c[4 * j], c[4 * j + 1], c[4 * j + 2], c[4 * j + 3]]);
        }
        // SAFETY: d.len() == 8.
        unsafe { K::narrow8(y.as_ptr(), d.as_mut_ptr()) };
    }
    let tail = dst.len() & !7;
    for (b, d) in chunks.remainder().chunks_exact(4).zip(&mut dst[tail..]) {
        *d = narrow1(f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    }
}

/// BF16 source bytes to fp16 (bf16 widens to f32 exactly by a 16-bit shift).
#[inline(always)]
unsafe fn bf16_row<K: Kernel>(src: &[u8], dst: &mut [u16]) {
    let widen = |b0: u8, b1: u8| f32::from_bits((u16::from_le_bytes([b0, b1]) as u32) << 16);
    let mut y = [0f32; 8];
    let mut chunks = src.chunks_exact(16);
    for (c, d) in (&mut chunks).zip(dst.chunks_exact_mut(8)) {
        let c: &[u8; 16] = c.try_into().expect("chunks_exact");
        for (j, v) in y.iter_mut().enumerate() {
            *v = widen(c[2 * j], c[2 * j + 1]);
        }
        // SAFETY: d.len() == 8.
        unsafe { K::narrow8(y.as_ptr(), d.as_mut_ptr()) };
    }
    let tail = dst.len() & !7;
    for (b, d) in chunks.remainder().chunks_exact(2).zip(&mut dst[tail..]) {
        *d = narrow1(widen(b[0], b[1]));
    }
}

/// Converts one row. The caller checked that the type is supported, `dst.len()` is a multiple of
/// its block size and `src.len()` is exactly the row's byte size.
#[inline(always)]
pub(crate) unsafe fn row<K: Kernel>(ggml_type: i32, src: &[u8], dst: &mut [u16]) {
    // SAFETY: every arm relies on the lengths the caller checked (see above).
    unsafe {
        match ggml_type {
            GGML_TYPE_F32 => f32_row::<K>(src, dst),
            GGML_TYPE_F16 => {
                // fp16 -> f32 -> fp16 is the identity (ggml only canonicalizes NaN payloads).
                for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
                    *d = u16::from_le_bytes([s[0], s[1]]);
                }
            }
            GGML_TYPE_BF16 => bf16_row::<K>(src, dst),
            GGML_TYPE_Q4_0 => blocks::<K, 18, 32>(src, dst, q4_0),
            GGML_TYPE_Q4_1 => blocks::<K, 20, 32>(src, dst, q4_1),
            GGML_TYPE_Q5_0 => blocks::<K, 22, 32>(src, dst, q5_0),
            GGML_TYPE_Q5_1 => blocks::<K, 24, 32>(src, dst, q5_1),
            GGML_TYPE_Q8_0 => blocks::<K, 34, 32>(src, dst, q8_0),
            GGML_TYPE_Q2_K => blocks::<K, 84, 256>(src, dst, q2_k),
            GGML_TYPE_Q3_K => blocks::<K, 110, 256>(src, dst, q3_k),
            GGML_TYPE_Q4_K => blocks::<K, 144, 256>(src, dst, q4_k),
            GGML_TYPE_Q5_K => blocks::<K, 176, 256>(src, dst, q5_k),
            GGML_TYPE_Q6_K => blocks::<K, 210, 256>(src, dst, q6_k),
            GGML_TYPE_IQ4_NL => blocks::<K, 18, 32>(src, dst, iq4_nl),
            GGML_TYPE_IQ4_XS => blocks::<K, 136, 256>(src, dst, iq4_xs),
            _ => unreachable!("row_to_f16 checked the type"),
        }
    }
}
