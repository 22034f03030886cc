//! The smallest conversion steps, once per instruction set: 8 values f32 -> f16, 8 values
//! f16 -> f32, and the 8x8 transposing variants the ANE layouts need.
//!
//! Every algorithm in this crate is written once, generic over [`Kernel`], and marked
//! `#[inline(always)]`. [`crate::dispatch`] instantiates it inside a `#[target_feature]` function per
//! instruction set, so the kernel's intrinsics and the surrounding dequantization loops are compiled
//! (and auto-vectorized) for that instruction set, with one runtime check per call instead of one per
//! 8 elements (which is what costs `half`'s slice API 2.6x in cache without `-C target-feature`).
//!
//! All three kernels round to nearest-even, so they agree bit for bit (property-tested).
//!
//! Pointers passed to kernel methods may be unaligned; the caller guarantees they are in bounds.

use half::f16;

/// One instruction set's conversion steps.
///
/// # Safety
/// Implementations are only called from code compiled with the target features they need
/// (see [`crate::dispatch`]); every pointer argument must be valid for the accesses documented on
/// the method.
pub(crate) unsafe trait Kernel: Copy {
    /// Reads 8 f32 at `src`, writes 8 f16 bit patterns at `dst`.
    unsafe fn narrow8(src: *const f32, dst: *mut u16);

    /// Reads 8 f16 bit patterns at `src`, writes 8 f32 at `dst`.
    unsafe fn widen8(src: *const u16, dst: *mut f32);

    /// `dst[c * dst_stride + r] = f16(src[r * src_stride + c])` for r, c in 0..8 (strides in elements).
    unsafe fn narrow8x8_t(src: *const f32, src_stride: usize, dst: *mut u16, dst_stride: usize);

    /// `dst[c * dst_stride + r] = f32(src[r * src_stride + c])` for r, c in 0..8 (strides in elements).
    unsafe fn widen8x8_t(src: *const u16, src_stride: usize, dst: *mut f32, dst_stride: usize);

    /// `dst[c * dst_stride + r] = src[r * src_stride + c]` for r, c in 0..8 (strides in
    /// elements): 16-bit patterns moved, never converted, so NaN payloads survive. The default is
    /// the scalar loop; the vector kernels do it in registers with 8 loads and 8 stores.
    #[inline(always)]
    unsafe fn transpose8x8_u16(
        src: *const u16,
        src_stride: usize,
        dst: *mut u16,
        dst_stride: usize,
    ) {
        for r in 0..8 {
            for c in 0..8 {
                // SAFETY: the caller guarantees both 8x8 tiles are in bounds.
                unsafe {
                    let v = src.add(r * src_stride + c).read_unaligned();
                    dst.add(c * dst_stride + r).write_unaligned(v);
                }
            }
        }
    }

    /// True when the kernel has non-temporal stores that bypass the cache for whole 64-byte
    /// lines ([`Kernel::narrow32x16_t_stream`], [`Kernel::stream64_f32`]). The DRAM-sized
    /// transposes then write each destination line once, without first reading it (the
    /// read-for-ownership of ordinary stores is a third of an activation's traffic) and without
    /// evicting the source. Kernels without them keep the staged ordinary-store path.
    const STREAM: bool = false;

    /// `dst[c * dst_stride + r] = f16(src[r * src_stride + c])` for r in 0..32 (tokens), c in
    /// 0..16 (channels): 16 destination rows of 64 bytes each. With [`Kernel::STREAM`], every
    /// destination row must start on a 64-byte boundary and is written with non-temporal stores;
    /// call [`Kernel::stream_fence`] before the data is handed on.
    #[inline(always)]
    unsafe fn narrow32x16_t_stream(
        src: *const f32,
        src_stride: usize,
        dst: *mut u16,
        dst_stride: usize,
    ) {
        for g in (0..32).step_by(8) {
            for h in [0, 8] {
                // SAFETY: the caller guarantees the 32x16 block is in bounds on both sides.
                unsafe {
                    Self::narrow8x8_t(
                        src.add(g * src_stride + h),
                        src_stride,
                        dst.add(h * dst_stride + g),
                        dst_stride,
                    )
                };
            }
        }
    }

    /// Copies 64 f32 (4 cache lines) from `src` to `dst`; with [`Kernel::STREAM`], both must be
    /// 64-byte aligned and `dst` is written with non-temporal stores.
    #[inline(always)]
    unsafe fn stream64_f32(src: *const f32, dst: *mut f32) {
        // SAFETY: the caller guarantees 64 elements on both sides, not overlapping.
        unsafe { core::ptr::copy_nonoverlapping(src, dst, 64) };
    }

    /// Copies 32 fp16 (one cache line) from `src` to `dst`; with [`Kernel::STREAM`], both must be
    /// 64-byte aligned and `dst` is written with non-temporal stores.
    #[inline(always)]
    unsafe fn stream32_u16(src: *const u16, dst: *mut u16) {
        // SAFETY: the caller guarantees 32 elements on both sides, not overlapping.
        unsafe { core::ptr::copy_nonoverlapping(src, dst, 32) };
    }

    /// Orders the non-temporal stores before everything after it (`sfence`); a no-op for
    /// kernels without [`Kernel::STREAM`].
    #[inline(always)]
    fn stream_fence() {}
}

/// One f32 to f16 bits, round to nearest-even, in software (the tails of every kernel).
#[inline(always)]
pub(crate) fn narrow1(x: f32) -> u16 {
    f16::from_f32_const(x).to_bits()
}

/// One f16 bit pattern to f32, exact, in software.
#[inline(always)]
pub(crate) fn widen1(h: u16) -> f32 {
    f16::from_bits(h).to_f32_const()
}

/// Hints the cache to fetch the line holding `p` (no fault on any address, so `p` may be
/// computed with `wrapping_add`). The transposes read and write runs of only 128-512 bytes per
/// row, too short for the hardware prefetchers, so they fetch the next block themselves.
#[inline(always)]
pub(crate) fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: prefetch never faults; SSE is baseline on x86_64.
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(p.cast())
    };
    #[cfg(target_arch = "aarch64")]
    // SAFETY: prfm never faults and has no architectural effect.
    unsafe {
        core::arch::asm!("prfm pldl1keep, [{0}]", in(reg) p, options(nostack, readonly, preserves_flags))
    };
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    let _ = p;
}

/// Portable scalar kernel (software rounding, `half`'s const conversions).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Scalar;

// SAFETY: needs no target feature; pointer contracts are the caller's.
unsafe impl Kernel for Scalar {
    #[inline(always)]
    unsafe fn narrow8(src: *const f32, dst: *mut u16) {
        for i in 0..8 {
            // SAFETY: the caller guarantees 8 readable/writable elements.
            unsafe {
                dst.add(i)
                    .write_unaligned(narrow1(src.add(i).read_unaligned()))
            };
        }
    }

    #[inline(always)]
    unsafe fn widen8(src: *const u16, dst: *mut f32) {
        for i in 0..8 {
            // SAFETY: the caller guarantees 8 readable/writable elements.
            unsafe {
                dst.add(i)
                    .write_unaligned(widen1(src.add(i).read_unaligned()))
            };
        }
    }

    #[inline(always)]
    unsafe fn narrow8x8_t(src: *const f32, ss: usize, dst: *mut u16, ds: usize) {
        for r in 0..8 {
            for c in 0..8 {
                // SAFETY: the caller guarantees the 8x8 tiles are in bounds.
                unsafe {
                    let v = src.add(r * ss + c).read_unaligned();
                    dst.add(c * ds + r).write_unaligned(narrow1(v));
                }
            }
        }
    }

    #[inline(always)]
    unsafe fn widen8x8_t(src: *const u16, ss: usize, dst: *mut f32, ds: usize) {
        for r in 0..8 {
            for c in 0..8 {
                // SAFETY: the caller guarantees the 8x8 tiles are in bounds.
                unsafe {
                    let v = src.add(r * ss + c).read_unaligned();
                    dst.add(c * ds + r).write_unaligned(widen1(v));
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::F16c;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use core::arch::x86_64::*;

    use super::Kernel;

    /// AVX2 + F16C: `vcvtps2ph` with the rounding immediate "nearest-even", 8 lanes at a time.
    #[derive(Clone, Copy, Debug)]
    pub(crate) struct F16c;

    /// Transposes 8 rows of 8 f32 in place (rows become columns).
    #[inline(always)]
    unsafe fn transpose8(r: &mut [__m256; 8]) {
        // SAFETY: only called from functions compiled with AVX (see dispatch).
        unsafe {
            let t0 = _mm256_unpacklo_ps(r[0], r[1]);
            let t1 = _mm256_unpackhi_ps(r[0], r[1]);
            let t2 = _mm256_unpacklo_ps(r[2], r[3]);
            let t3 = _mm256_unpackhi_ps(r[2], r[3]);
            let t4 = _mm256_unpacklo_ps(r[4], r[5]);
            let t5 = _mm256_unpackhi_ps(r[4], r[5]);
            let t6 = _mm256_unpacklo_ps(r[6], r[7]);
            let t7 = _mm256_unpackhi_ps(r[6], r[7]);
            let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
            let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
            let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
            let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
            let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
            let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
            let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
            let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
            r[0] = _mm256_permute2f128_ps::<0x20>(u0, u4);
            r[1] = _mm256_permute2f128_ps::<0x20>(u1, u5);
            r[2] = _mm256_permute2f128_ps::<0x20>(u2, u6);
            r[3] = _mm256_permute2f128_ps::<0x20>(u3, u7);
            r[4] = _mm256_permute2f128_ps::<0x31>(u0, u4);
            r[5] = _mm256_permute2f128_ps::<0x31>(u1, u5);
            r[6] = _mm256_permute2f128_ps::<0x31>(u2, u6);
            r[7] = _mm256_permute2f128_ps::<0x31>(u3, u7);
        }
    }

    /// 16 rows x 8 columns of f32 at `src` (row stride `ss`) to 8 registers of 16 f16: register
    /// `c` holds column `c`, rows 0..16.
    #[inline(always)]
    unsafe fn narrow16x8_t(src: *const f32, ss: usize) -> [__m256i; 8] {
        // SAFETY: only called from functions compiled with AVX2 and F16C; the caller guarantees
        // the 16x8 block is in bounds.
        unsafe {
            let mut a = [_mm256_setzero_ps(); 8];
            let mut b = [_mm256_setzero_ps(); 8];
            for (i, v) in a.iter_mut().enumerate() {
                *v = _mm256_loadu_ps(src.add(i * ss));
            }
            for (i, v) in b.iter_mut().enumerate() {
                *v = _mm256_loadu_ps(src.add((8 + i) * ss));
            }
            transpose8(&mut a);
            transpose8(&mut b);
            let mut out = [_mm256_setzero_si256(); 8];
            for ((o, x), y) in out.iter_mut().zip(a).zip(b) {
                let lo = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(x);
                let hi = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(y);
                *o = _mm256_set_m128i(hi, lo);
            }
            out
        }
    }

    // SAFETY: the methods are only reached through `dispatch`'s `avx2,f16c` functions after
    // `is_x86_feature_detected!` said yes; loads and stores are the unaligned forms.
    unsafe impl Kernel for F16c {
        #[inline(always)]
        unsafe fn narrow8(src: *const f32, dst: *mut u16) {
            // SAFETY: see the impl comment; 8 elements in bounds by the caller.
            unsafe {
                let v = _mm256_loadu_ps(src);
                let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v);
                _mm_storeu_si128(dst.cast(), h);
            }
        }

        #[inline(always)]
        unsafe fn widen8(src: *const u16, dst: *mut f32) {
            // SAFETY: see the impl comment.
            unsafe {
                let h = _mm_loadu_si128(src.cast());
                _mm256_storeu_ps(dst, _mm256_cvtph_ps(h));
            }
        }

        #[inline(always)]
        unsafe fn narrow8x8_t(src: *const f32, ss: usize, dst: *mut u16, ds: usize) {
            // SAFETY: see the impl comment; the caller guarantees both 8x8 tiles are in bounds.
            unsafe {
                let mut r = [_mm256_setzero_ps(); 8];
                for (i, v) in r.iter_mut().enumerate() {
                    *v = _mm256_loadu_ps(src.add(i * ss));
                }
                transpose8(&mut r);
                for (i, v) in r.iter().enumerate() {
                    let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(*v);
                    _mm_storeu_si128(dst.add(i * ds).cast(), h);
                }
            }
        }

        #[inline(always)]
        unsafe fn widen8x8_t(src: *const u16, ss: usize, dst: *mut f32, ds: usize) {
            // SAFETY: see the impl comment; the caller guarantees both 8x8 tiles are in bounds.
            unsafe {
                let mut r = [_mm256_setzero_ps(); 8];
                for (i, v) in r.iter_mut().enumerate() {
                    *v = _mm256_cvtph_ps(_mm_loadu_si128(src.add(i * ss).cast()));
                }
                transpose8(&mut r);
                for (i, v) in r.iter().enumerate() {
                    _mm256_storeu_ps(dst.add(i * ds), *v);
                }
            }
        }

        /// SSE2 only (baseline; the AVX2 instance just inherits it): three rounds of unpacks
        /// interleave 16-, 32- and 64-bit pieces of row pairs, so register `c` ends up holding
        /// column `c`.
        #[inline(always)]
        unsafe fn transpose8x8_u16(src: *const u16, ss: usize, dst: *mut u16, ds: usize) {
            // SAFETY: see the impl comment; the caller guarantees both 8x8 tiles are in bounds.
            unsafe {
                let mut a = [_mm_setzero_si128(); 8];
                for (i, v) in a.iter_mut().enumerate() {
                    *v = _mm_loadu_si128(src.add(i * ss).cast());
                }
                // Pairs of rows, 16-bit interleave: b0 = a00 a10 a01 a11 a02 a12 a03 a13, ...
                let b0 = _mm_unpacklo_epi16(a[0], a[1]);
                let b1 = _mm_unpackhi_epi16(a[0], a[1]);
                let b2 = _mm_unpacklo_epi16(a[2], a[3]);
                let b3 = _mm_unpackhi_epi16(a[2], a[3]);
                let b4 = _mm_unpacklo_epi16(a[4], a[5]);
                let b5 = _mm_unpackhi_epi16(a[4], a[5]);
                let b6 = _mm_unpacklo_epi16(a[6], a[7]);
                let b7 = _mm_unpackhi_epi16(a[6], a[7]);
                // Quads of rows: c0 = columns 0, 1 of rows 0..4; c1 = columns 2, 3; ...
                let c0 = _mm_unpacklo_epi32(b0, b2);
                let c1 = _mm_unpackhi_epi32(b0, b2);
                let c2 = _mm_unpacklo_epi32(b1, b3);
                let c3 = _mm_unpackhi_epi32(b1, b3);
                let c4 = _mm_unpacklo_epi32(b4, b6);
                let c5 = _mm_unpackhi_epi32(b4, b6);
                let c6 = _mm_unpacklo_epi32(b5, b7);
                let c7 = _mm_unpackhi_epi32(b5, b7);
                // All 8 rows: column c of rows 0..4 from c(c/2), rows 4..8 from c(4 + c/2).
                let d = [
                    _mm_unpacklo_epi64(c0, c4),
                    _mm_unpackhi_epi64(c0, c4),
                    _mm_unpacklo_epi64(c1, c5),
                    _mm_unpackhi_epi64(c1, c5),
                    _mm_unpacklo_epi64(c2, c6),
                    _mm_unpackhi_epi64(c2, c6),
                    _mm_unpacklo_epi64(c3, c7),
                    _mm_unpackhi_epi64(c3, c7),
                ];
                for (i, v) in d.iter().enumerate() {
                    _mm_storeu_si128(dst.add(i * ds).cast(), *v);
                }
            }
        }

        const STREAM: bool = true;

        /// Four 8x8 tiles (32 tokens) per 8 channels are kept in registers and each destination
        /// line is written by two consecutive 32-byte streaming stores, so the write-combining
        /// buffer holds whole lines. Writing each tile's 16-byte pieces as they come (lines
        /// finished four tiles later) ran at a quarter of the speed, and so did staging the
        /// block in L1 before streaming it. Two tiles are joined per 32-byte register right after
        /// the conversion: storing the 16-byte halves to the stack and reloading them as 32 bytes
        /// stalls on store forwarding and halved the speed.
        #[inline(always)]
        unsafe fn narrow32x16_t_stream(src: *const f32, ss: usize, dst: *mut u16, ds: usize) {
            // SAFETY: see the impl comment; the caller guarantees the 32x16 source block and the
            // 16 destination rows of 32 values are in bounds, and the rows 64-byte aligned.
            unsafe {
                for h in [0, 8] {
                    let lo = narrow16x8_t(src.add(h), ss);
                    let hi = narrow16x8_t(src.add(16 * ss + h), ss);
                    for (i, (l, u)) in lo.into_iter().zip(hi).enumerate() {
                        let p = dst.add((h + i) * ds);
                        _mm256_stream_si256(p.cast(), l);
                        _mm256_stream_si256(p.add(16).cast(), u);
                    }
                }
            }
        }

        #[inline(always)]
        unsafe fn stream64_f32(src: *const f32, dst: *mut f32) {
            // SAFETY: see the impl comment; both 64-byte aligned, 64 elements in bounds.
            unsafe {
                for j in (0..64).step_by(8) {
                    _mm256_stream_ps(dst.add(j), _mm256_load_ps(src.add(j)));
                }
            }
        }

        #[inline(always)]
        unsafe fn stream32_u16(src: *const u16, dst: *mut u16) {
            // SAFETY: see the impl comment; both 64-byte aligned, 32 elements in bounds.
            unsafe {
                _mm256_stream_si256(dst.cast(), _mm256_load_si256(src.cast()));
                _mm256_stream_si256(dst.add(16).cast(), _mm256_load_si256(src.add(16).cast()));
            }
        }

        #[inline(always)]
        fn stream_fence() {
            // SAFETY: SSE is baseline on x86_64.
            unsafe { _mm_sfence() };
        }
    }
}

#[cfg(target_arch = "aarch64")]
pub(crate) use arm::Neon;

#[cfg(target_arch = "aarch64")]
mod arm {
    use core::arch::aarch64::*;

    use super::Kernel;

    /// NEON with the fp16 conversion instructions (`fcvtn`/`fcvtl`, baseline on Apple silicon):
    /// rounding follows FPCR, which is nearest-even unless someone changed it.
    #[derive(Clone, Copy, Debug)]
    pub(crate) struct Neon;

    /// Transposes a 4x4 block of f32 held as 4 rows.
    #[inline(always)]
    unsafe fn transpose4(r: [float32x4_t; 4]) -> [float32x4_t; 4] {
        // SAFETY: NEON is baseline on aarch64.
        unsafe {
            let a = vtrnq_f32(r[0], r[1]);
            let b = vtrnq_f32(r[2], r[3]);
            [
                vcombine_f32(vget_low_f32(a.0), vget_low_f32(b.0)),
                vcombine_f32(vget_low_f32(a.1), vget_low_f32(b.1)),
                vcombine_f32(vget_high_f32(a.0), vget_high_f32(b.0)),
                vcombine_f32(vget_high_f32(a.1), vget_high_f32(b.1)),
            ]
        }
    }

    #[inline(always)]
    unsafe fn narrow4(v: float32x4_t) -> uint16x4_t {
        // SAFETY: only reached from `neon,fp16` functions (see dispatch).
        unsafe { vreinterpret_u16_f16(vcvt_f16_f32(v)) }
    }

    #[inline(always)]
    unsafe fn widen4(h: uint16x4_t) -> float32x4_t {
        // SAFETY: only reached from `neon,fp16` functions (see dispatch).
        unsafe { vcvt_f32_f16(vreinterpret_f16_u16(h)) }
    }

    // SAFETY: the methods are only reached through `dispatch`'s `neon,fp16` functions after
    // `is_aarch64_feature_detected!("fp16")` said yes. NEON loads/stores have no alignment needs
    // beyond the element's, and every pointer here is element-aligned or read through u8 lanes.
    unsafe impl Kernel for Neon {
        #[inline(always)]
        unsafe fn narrow8(src: *const f32, dst: *mut u16) {
            // SAFETY: see the impl comment.
            unsafe {
                let a = vld1q_f32(src);
                let b = vld1q_f32(src.add(4));
                vst1q_u16(dst, vcombine_u16(narrow4(a), narrow4(b)));
            }
        }

        #[inline(always)]
        unsafe fn widen8(src: *const u16, dst: *mut f32) {
            // SAFETY: see the impl comment.
            unsafe {
                let h = vld1q_u16(src);
                vst1q_f32(dst, widen4(vget_low_u16(h)));
                vst1q_f32(dst.add(4), widen4(vget_high_u16(h)));
            }
        }

        #[inline(always)]
        unsafe fn narrow8x8_t(src: *const f32, ss: usize, dst: *mut u16, ds: usize) {
            // SAFETY: see the impl comment; the caller guarantees both tiles are in bounds.
            unsafe {
                for r0 in [0, 4] {
                    for c0 in [0, 4] {
                        let p = src.add(r0 * ss + c0);
                        let t = transpose4([
                            vld1q_f32(p),
                            vld1q_f32(p.add(ss)),
                            vld1q_f32(p.add(2 * ss)),
                            vld1q_f32(p.add(3 * ss)),
                        ]);
                        for (c, v) in t.iter().enumerate() {
                            vst1_u16(dst.add((c0 + c) * ds + r0), narrow4(*v));
                        }
                    }
                }
            }
        }

        #[inline(always)]
        unsafe fn widen8x8_t(src: *const u16, ss: usize, dst: *mut f32, ds: usize) {
            // SAFETY: see the impl comment; the caller guarantees both tiles are in bounds.
            unsafe {
                for r0 in [0, 4] {
                    for c0 in [0, 4] {
                        let p = src.add(r0 * ss + c0);
                        let t = transpose4([
                            widen4(vld1_u16(p)),
                            widen4(vld1_u16(p.add(ss))),
                            widen4(vld1_u16(p.add(2 * ss))),
                            widen4(vld1_u16(p.add(3 * ss))),
                        ]);
                        for (c, v) in t.iter().enumerate() {
                            vst1q_f32(dst.add((c0 + c) * ds + r0), *v);
                        }
                    }
                }
            }
        }

        /// `trn1`/`trn2` on 16-, 32- and 64-bit lanes: each round transposes 2x2 blocks of the
        /// previous round's elements, so three rounds transpose 8x8.
        #[inline(always)]
        unsafe fn transpose8x8_u16(src: *const u16, ss: usize, dst: *mut u16, ds: usize) {
            // SAFETY: see the impl comment; the caller guarantees both 8x8 tiles are in bounds.
            unsafe {
                let mut a = [vdupq_n_u16(0); 8];
                for (i, v) in a.iter_mut().enumerate() {
                    *v = vld1q_u16(src.add(i * ss));
                }
                // Row pairs (i, i + 1): even columns in `e`, odd columns in `o`, as 32-bit
                // lanes of (row i, row i + 1).
                let mut e = [vdupq_n_u32(0); 4];
                let mut o = [vdupq_n_u32(0); 4];
                for p in 0..4 {
                    e[p] = vreinterpretq_u32_u16(vtrn1q_u16(a[2 * p], a[2 * p + 1]));
                    o[p] = vreinterpretq_u32_u16(vtrn2q_u16(a[2 * p], a[2 * p + 1]));
                }
                // Row quads: q[h] holds rows 4h..4h + 4 as 64-bit lanes of one column each,
                // columns (0, 4), (1, 5), (2, 6), (3, 7).
                let mut q = [[vdupq_n_u64(0); 4]; 2];
                for (h, qh) in q.iter_mut().enumerate() {
                    let x = 2 * h;
                    *qh = [
                        vreinterpretq_u64_u32(vtrn1q_u32(e[x], e[x + 1])),
                        vreinterpretq_u64_u32(vtrn1q_u32(o[x], o[x + 1])),
                        vreinterpretq_u64_u32(vtrn2q_u32(e[x], e[x + 1])),
                        vreinterpretq_u64_u32(vtrn2q_u32(o[x], o[x + 1])),
                    ];
                }
                // Column c: rows 0..4 and rows 4..8 of the same 64-bit lane.
                for (c, (&lo, &hi)) in q[0].iter().zip(&q[1]).enumerate() {
                    let first = vreinterpretq_u16_u64(vtrn1q_u64(lo, hi));
                    let second = vreinterpretq_u16_u64(vtrn2q_u64(lo, hi));
                    vst1q_u16(dst.add(c * ds), first);
                    vst1q_u16(dst.add((c + 4) * ds), second);
                }
            }
        }
    }
}
