//! Host-side conversions around an ANE dispatch, at memory speed.
//!
//! Each job is one pass over memory with no allocation:
//! - **Weights**: a row of a ggml tensor (F32, F16, BF16, the legacy quants, the K-quants, IQ4) to
//!   fp16 with [`row_to_f16`], bit-identical to ggml's `to_float` followed by a round-to-nearest-even
//!   fp16 conversion. Each block is decoded into a small stack array and narrowed straight into the
//!   destination.
//! - **Activations**: [`act_f32_to_f16_transposed`] turns ggml's src1 (N tokens x K channels, f32)
//!   into the ANE's channel-first fp16 layout `[K][Np]` directly in the engine's input buffer.
//! - **Outputs**: [`out_f16_to_f32_transposed`] turns the ANE's `[M][Np]` fp16 output into ggml's
//!   dst rows (N x M, f32) directly in the destination tensor.
//! - **Transposed weights**: [`transpose_f16`] moves fp16 bit patterns from rows to columns, for
//!   staging weights in the transposed layout.
//!
//! # Design choices
//! - **Write each algorithm once.** The bodies are generic over a small kernel trait (8 values
//!   narrowed, widened, or an 8x8 tile transposed) and instantiated inside one
//!   `#[target_feature]` function per instruction set: AVX2+F16C on x86_64 and NEON fp16 on aarch64,
//!   chosen at run time ([`Backend::best`]), with a scalar fallback. The whole loop, dequantization
//!   included, is compiled for the chosen instruction set; the runtime check happens once per call.
//! - **Same rounding everywhere.** Every backend rounds to nearest-even, so results never depend on
//!   the machine; tests compare every backend against the scalar one bit for bit.
//! - **Who checks what.** Public functions check every length and stride and return a
//!   [`ConvertError`]; the generic bodies trust them.
//! - **ggml is the oracle, not a dependency.** [`ggml::GgmlBase`] loads `libggml-base` at run time
//!   for the tests and the benchmark; the conversions never call it.

#![warn(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod act_round;
mod bench;
mod dispatch;
pub mod ggml;
mod kernel;
mod layout;
mod weights;

use half::f16;
use half::slice::HalfFloatSliceExt;

pub use bench::{bench_host, HostBenchRow};
pub use dispatch::Backend;
pub use weights::{block_layout, IQ4NL_VALUES};

use dispatch::call;

/// ggml type ids (`enum ggml_type`, ggml 0.26) of the types this crate knows.
pub mod types {
    #![allow(missing_docs)]
    pub const GGML_TYPE_F32: i32 = 0;
    pub const GGML_TYPE_F16: i32 = 1;
    pub const GGML_TYPE_Q4_0: i32 = 2;
    pub const GGML_TYPE_Q4_1: i32 = 3;
    pub const GGML_TYPE_Q5_0: i32 = 6;
    pub const GGML_TYPE_Q5_1: i32 = 7;
    pub const GGML_TYPE_Q8_0: i32 = 8;
    pub const GGML_TYPE_Q2_K: i32 = 10;
    pub const GGML_TYPE_Q3_K: i32 = 11;
    pub const GGML_TYPE_Q4_K: i32 = 12;
    pub const GGML_TYPE_Q5_K: i32 = 13;
    pub const GGML_TYPE_Q6_K: i32 = 14;
    pub const GGML_TYPE_IQ4_NL: i32 = 20;
    pub const GGML_TYPE_IQ4_XS: i32 = 23;
    pub const GGML_TYPE_BF16: i32 = 30;
    /// MXFP4 (not converted here; its activations round like Q8_0's on the CPU).
    pub const GGML_TYPE_MXFP4: i32 = 39;

    /// Every type [`crate::row_to_f16`] converts natively, with ggml's name for it.
    pub const SUPPORTED: [(i32, &str); 15] = [
        (GGML_TYPE_F32, "f32"),
        (GGML_TYPE_F16, "f16"),
        (GGML_TYPE_BF16, "bf16"),
        (GGML_TYPE_Q4_0, "q4_0"),
        (GGML_TYPE_Q4_1, "q4_1"),
        (GGML_TYPE_Q5_0, "q5_0"),
        (GGML_TYPE_Q5_1, "q5_1"),
        (GGML_TYPE_Q8_0, "q8_0"),
        (GGML_TYPE_Q2_K, "q2_K"),
        (GGML_TYPE_Q3_K, "q3_K"),
        (GGML_TYPE_Q4_K, "q4_K"),
        (GGML_TYPE_Q5_K, "q5_K"),
        (GGML_TYPE_Q6_K, "q6_K"),
        (GGML_TYPE_IQ4_NL, "iq4_nl"),
        (GGML_TYPE_IQ4_XS, "iq4_xs"),
    ];
}

/// What went wrong in a conversion call. Every variant is a caller error (the conversions
/// themselves cannot fail), except [`ConvertError::Ggml`], which comes from loading libggml-base.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// The type has no native conversion here (see [`supported`]).
    #[error("ggml type {0} is not converted natively")]
    UnsupportedType(i32),
    /// The element count is not a whole number of blocks.
    #[error("{n} elements of ggml type {ggml_type} are not a multiple of its block size {block}")]
    PartialBlock {
        /// ggml type id.
        ggml_type: i32,
        /// Elements requested.
        n: usize,
        /// Elements per block.
        block: usize,
    },
    /// A buffer has the wrong length.
    #[error("{what}: expected {expected} elements/bytes, got {got}")]
    Length {
        /// Which buffer.
        what: &'static str,
        /// Length the shape needs (at least, for strided buffers).
        expected: usize,
        /// Length given.
        got: usize,
    },
    /// A stride or padded size is smaller than the row it holds.
    #[error("{what} {got} is smaller than {min}")]
    Stride {
        /// Which stride.
        what: &'static str,
        /// The smallest valid value.
        min: usize,
        /// The value given.
        got: usize,
    },
    /// The requested backend cannot run on this CPU.
    #[error("conversion backend {0:?} is not available on this CPU")]
    BackendUnavailable(Backend),
    /// libggml-base could not be loaded or used.
    #[error("libggml-base: {0}")]
    Ggml(String),
}

/// True when [`row_to_f16`] converts `ggml_type` natively.
pub fn supported(ggml_type: i32) -> bool {
    block_layout(ggml_type).is_some()
}

/// Bytes of a row of `n` elements of `ggml_type`, if supported and `n` is a whole number of blocks.
pub fn row_bytes(ggml_type: i32, n: usize) -> Option<usize> {
    let (qk, bytes) = block_layout(ggml_type)?;
    n.is_multiple_of(qk).then_some(n / qk * bytes)
}

fn check_backend(b: Backend) -> Result<(), ConvertError> {
    if b.is_available() {
        Ok(())
    } else {
        Err(ConvertError::BackendUnavailable(b))
    }
}

fn check_len(what: &'static str, expected: usize, got: usize) -> Result<(), ConvertError> {
    if got < expected {
        Err(ConvertError::Length {
            what,
            expected,
            got,
        })
    } else {
        Ok(())
    }
}

fn check_stride(what: &'static str, min: usize, got: usize) -> Result<(), ConvertError> {
    if got < min {
        Err(ConvertError::Stride { what, min, got })
    } else {
        Ok(())
    }
}

/// Converts one row of `dst.len()` elements of `ggml_type`, stored in `src` (exactly the row's
/// bytes), to fp16. The result equals ggml's `to_float` followed by `f16::from_f32` bit for bit
/// (NaN payloads aside: a NaN stays a NaN).
///
/// # Errors
/// [`ConvertError::UnsupportedType`], [`ConvertError::PartialBlock`] when `dst.len()` is not a
/// whole number of blocks, [`ConvertError::Length`] when `src.len()` is not the row's size.
///
/// # Examples
/// ```
/// use half::f16;
/// // One Q8_0 block: scale 0.5, quants 0, 1, ..., 31.
/// let mut block = vec![0x00, 0x38];
/// block.extend((0..32u8).map(|q| q));
/// let mut out = [f16::ZERO; 32];
/// ane_convert::row_to_f16(ane_convert::types::GGML_TYPE_Q8_0, &block, &mut out).unwrap();
/// assert_eq!(out[3].to_f32(), 1.5);
/// ```
pub fn row_to_f16(ggml_type: i32, src: &[u8], dst: &mut [f16]) -> Result<(), ConvertError> {
    row_to_f16_with(Backend::best(), ggml_type, src, dst)
}

/// [`row_to_f16`] on a chosen backend (for tests and benchmarks).
///
/// # Errors
/// As [`row_to_f16`], plus [`ConvertError::BackendUnavailable`].
pub fn row_to_f16_with(
    backend: Backend,
    ggml_type: i32,
    src: &[u8],
    dst: &mut [f16],
) -> Result<(), ConvertError> {
    check_backend(backend)?;
    let (qk, bytes) = block_layout(ggml_type).ok_or(ConvertError::UnsupportedType(ggml_type))?;
    let n = dst.len();
    if !n.is_multiple_of(qk) {
        return Err(ConvertError::PartialBlock {
            ggml_type,
            n,
            block: qk,
        });
    }
    let expected = n / qk * bytes;
    if src.len() != expected {
        return Err(ConvertError::Length {
            what: "weight row bytes",
            expected,
            got: src.len(),
        });
    }
    let dst: &mut [u16] = dst.reinterpret_cast_mut();
    call!(backend, row(ggml_type, src, dst));
    Ok(())
}

/// `dst[i] = f16(src[i])`, round to nearest-even.
///
/// # Errors
/// [`ConvertError::Length`] when the lengths differ.
pub fn f32_to_f16(src: &[f32], dst: &mut [f16]) -> Result<(), ConvertError> {
    f32_to_f16_with(Backend::best(), src, dst)
}

/// [`f32_to_f16`] on a chosen backend.
///
/// # Errors
/// As [`f32_to_f16`], plus [`ConvertError::BackendUnavailable`].
pub fn f32_to_f16_with(backend: Backend, src: &[f32], dst: &mut [f16]) -> Result<(), ConvertError> {
    check_backend(backend)?;
    if src.len() != dst.len() {
        return Err(ConvertError::Length {
            what: "f16 destination",
            expected: src.len(),
            got: dst.len(),
        });
    }
    let dst: &mut [u16] = dst.reinterpret_cast_mut();
    call!(backend, narrow(src, dst));
    Ok(())
}

/// `dst[i] = f32(src[i])` (exact).
///
/// # Errors
/// [`ConvertError::Length`] when the lengths differ.
pub fn f16_to_f32(src: &[f16], dst: &mut [f32]) -> Result<(), ConvertError> {
    f16_to_f32_with(Backend::best(), src, dst)
}

/// [`f16_to_f32`] on a chosen backend.
///
/// # Errors
/// As [`f16_to_f32`], plus [`ConvertError::BackendUnavailable`].
pub fn f16_to_f32_with(backend: Backend, src: &[f16], dst: &mut [f32]) -> Result<(), ConvertError> {
    check_backend(backend)?;
    if src.len() != dst.len() {
        return Err(ConvertError::Length {
            what: "f32 destination",
            expected: src.len(),
            got: dst.len(),
        });
    }
    let src: &[u16] = src.reinterpret_cast();
    call!(backend, widen(src, dst));
    Ok(())
}

/// Activations into the ANE's channel-first layout: `src` holds `n` rows (tokens) of `k` f32
/// (channels), row `i` starting at `i * src_stride`; writes `dst[c * np + i] = f16(src[i *
/// src_stride + c])` for every channel `c < k` and token `i < n`, and zeroes the padding
/// `dst[c * np + i]` for `n <= i < np`. `dst` must hold at least `k * np` values.
///
/// # Errors
/// [`ConvertError::Stride`] when `src_stride < k` or `np < n`; [`ConvertError::Length`] when a
/// buffer is too short.
pub fn act_f32_to_f16_transposed(
    src: &[f32],
    n: usize,
    k: usize,
    src_stride: usize,
    dst: &mut [f16],
    np: usize,
) -> Result<(), ConvertError> {
    act_f32_to_f16_transposed_with(Backend::best(), src, n, k, src_stride, dst, np)
}

/// [`act_f32_to_f16_transposed`] on a chosen backend.
///
/// # Errors
/// As [`act_f32_to_f16_transposed`], plus [`ConvertError::BackendUnavailable`].
pub fn act_f32_to_f16_transposed_with(
    backend: Backend,
    src: &[f32],
    n: usize,
    k: usize,
    src_stride: usize,
    dst: &mut [f16],
    np: usize,
) -> Result<(), ConvertError> {
    check_backend(backend)?;
    check_stride("activation row stride", k, src_stride)?;
    check_stride("padded token count", n, np)?;
    if n == 0 || k == 0 {
        check_len("activation destination", k * np, dst.len())?;
        dst[..k * np].fill(f16::ZERO);
        return Ok(());
    }
    check_len("activation source", (n - 1) * src_stride + k, src.len())?;
    check_len("activation destination", k * np, dst.len())?;
    let dst: &mut [u16] = dst.reinterpret_cast_mut();
    call!(backend, act(src, n, k, src_stride, dst, np));
    Ok(())
}

/// Outputs back from the ANE's channel-first layout: `src` holds `m` rows (output channels) of
/// `np` fp16 of which the first `n` (tokens) are valid; writes `dst[i * dst_stride + c] =
/// f32(src[c * np + i])` for every token `i < n` and channel `c < m`. Nothing else of `dst` is
/// touched, so `dst` can be a strided ggml tensor.
///
/// # Errors
/// [`ConvertError::Stride`] when `np < n` or `dst_stride < m`; [`ConvertError::Length`] when a
/// buffer is too short.
pub fn out_f16_to_f32_transposed(
    src: &[f16],
    m: usize,
    np: usize,
    n: usize,
    dst: &mut [f32],
    dst_stride: usize,
) -> Result<(), ConvertError> {
    out_f16_to_f32_transposed_with(Backend::best(), src, m, np, n, dst, dst_stride)
}

/// [`out_f16_to_f32_transposed`] on a chosen backend.
///
/// # Errors
/// As [`out_f16_to_f32_transposed`], plus [`ConvertError::BackendUnavailable`].
pub fn out_f16_to_f32_transposed_with(
    backend: Backend,
    src: &[f16],
    m: usize,
    np: usize,
    n: usize,
    dst: &mut [f32],
    dst_stride: usize,
) -> Result<(), ConvertError> {
    check_backend(backend)?;
    check_stride("padded token count", n, np)?;
    check_stride("output row stride", m, dst_stride)?;
    if n == 0 || m == 0 {
        return Ok(());
    }
    check_len("output source", m * np, src.len())?;
    check_len("output destination", (n - 1) * dst_stride + m, dst.len())?;
    let src: &[u16] = src.reinterpret_cast();
    call!(backend, out(src, m, np, n, dst, dst_stride));
    Ok(())
}

/// fp16 matrix transpose, for staging transposed weights: `src` holds `rows` rows of `cols`
/// values, row `r` starting at `r * src_stride`; writes `dst[c * dst_stride + r] = src[r *
/// src_stride + c]` for every `r < rows`, `c < cols`. Nothing else of `dst` is touched, so both
/// sides can be windows of larger matrices. The 16-bit patterns are moved, not converted: NaN
/// payloads and signalling NaNs arrive unchanged. `rows == 0` or `cols == 0` does nothing.
///
/// # Errors
/// [`ConvertError::Stride`] when `src_stride < cols` or `dst_stride < rows`;
/// [`ConvertError::Length`] when a buffer is too short.
///
/// # Examples
/// ```
/// use half::f16;
/// let src: Vec<f16> = (0..6).map(|i| f16::from_f32(i as f32)).collect(); // 2 x 3
/// let mut dst = [f16::ZERO; 6]; // 3 x 2
/// ane_convert::transpose_f16(&src, 2, 3, 3, &mut dst, 2).unwrap();
/// assert_eq!(dst.map(f16::to_f32), [0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
/// ```
pub fn transpose_f16(
    src: &[f16],
    rows: usize,
    cols: usize,
    src_stride: usize,
    dst: &mut [f16],
    dst_stride: usize,
) -> Result<(), ConvertError> {
    transpose_f16_with(
        Backend::best(),
        src,
        rows,
        cols,
        src_stride,
        dst,
        dst_stride,
    )
}

/// [`transpose_f16`] on a chosen backend.
///
/// # Errors
/// As [`transpose_f16`], plus [`ConvertError::BackendUnavailable`].
pub fn transpose_f16_with(
    backend: Backend,
    src: &[f16],
    rows: usize,
    cols: usize,
    src_stride: usize,
    dst: &mut [f16],
    dst_stride: usize,
) -> Result<(), ConvertError> {
    check_backend(backend)?;
    check_stride("transpose source row stride", cols, src_stride)?;
    check_stride("transpose destination row stride", rows, dst_stride)?;
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    check_len(
        "transpose source",
        strided_len(rows, src_stride, cols),
        src.len(),
    )?;
    check_len(
        "transpose destination",
        strided_len(cols, dst_stride, rows),
        dst.len(),
    )?;
    let src: &[u16] = src.reinterpret_cast();
    let dst: &mut [u16] = dst.reinterpret_cast_mut();
    call!(
        backend,
        transpose(src, rows, cols, src_stride, dst, dst_stride)
    );
    Ok(())
}

/// Elements a buffer of `n >= 1` rows of `len` values, `stride` apart, spans:
/// `(n - 1) * stride + len`, saturated so an overflowing shape fails the length check instead of
/// wrapping past it.
fn strided_len(n: usize, stride: usize, len: usize) -> usize {
    (n - 1)
        .checked_mul(stride)
        .and_then(|x| x.checked_add(len))
        .unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests;
