//! The rounding llama.cpp's CPU backend applies to activations, so the device can apply it too.
//!
//! For a quantized weight the CPU backend does not multiply by the fp32 activations: it first
//! quantizes each activation row to the weight type's `vec_dot_type` (Q8_0 for Q4_0/Q5_0/Q8_0/
//! IQ4_NL/MXFP4, Q8_1 for Q4_1/Q5_1, Q8_K for the K- and most I-quants, BF16 for BF16, F16 for F16)
//! and takes integer dot products. The ANE path converts activations to fp16, which is *more*
//! precise; but a user comparing texts sees the difference as "the plugin changes my output"
//! (near-ties in greedy decoding part, perplexity moves by a percent). Rounding each activation
//! row the CPU's way first ([`quantize`] then dequantize, exactly as ggml-cpu's `from_float` does
//! on this architecture) makes the device see the values the CPU multiplies, up to fp16's own
//! rounding of them (2^-12 relative, against the 8-bit step of 2^-8 of the block maximum).
//!
//! ggml-cpu quantizes Q8_0/Q8_1 rows with `id = 1/d` on ARM (NEON) and `id = 127/amax` on x86
//! (AVX), rounding half to even on both; Q8_K always goes through `quantize_row_q8_K_ref`. Both
//! forms are here and chosen by target architecture; tests compare the bytes with ggml's own.

use half::{bf16, f16};

use crate::types::*;

/// How the CPU backend rounds an activation row for a weight of some type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ActRound {
    /// Nothing beyond the fp16 conversion (F16 weights: the CPU converts to fp16 too; F32: the
    /// CPU keeps fp32, which no fp16 device can match).
    None,
    /// To bf16, round to nearest even (BF16 weights).
    Bf16,
    /// Blocks of 32, int8 with an fp16 scale.
    Q8_0,
    /// Blocks of 32, int8 with an fp16 scale and sum (same values as Q8_0).
    Q8_1,
    /// Blocks of 256, int8 with an fp32 scale.
    Q8K,
}

/// Bytes of one block of Q8_0 (`fp16 d; int8 qs[32]`).
pub const Q8_0_BLOCK: usize = 34;
/// Bytes of one block of Q8_1 (`fp16 d; fp16 s; int8 qs[32]`).
pub const Q8_1_BLOCK: usize = 36;
/// Bytes of one block of Q8_K (`float d; int8 qs[256]; int16 bsums[16]`).
pub const Q8_K_BLOCK: usize = 292;

impl ActRound {
    /// The rounding the CPU backend applies for weights of `ggml_type` (its `vec_dot_type`).
    pub fn for_weight(ggml_type: i32) -> ActRound {
        match ggml_type {
            GGML_TYPE_BF16 => ActRound::Bf16,
            GGML_TYPE_Q4_0 | GGML_TYPE_Q5_0 | GGML_TYPE_Q8_0 | GGML_TYPE_IQ4_NL
            | GGML_TYPE_MXFP4 => ActRound::Q8_0,
            GGML_TYPE_Q4_1 | GGML_TYPE_Q5_1 => ActRound::Q8_1,
            GGML_TYPE_Q2_K | GGML_TYPE_Q3_K | GGML_TYPE_Q4_K | GGML_TYPE_Q5_K | GGML_TYPE_Q6_K
            | GGML_TYPE_IQ4_XS => ActRound::Q8K,
            _ => ActRound::None,
        }
    }

    /// Elements per block (1 for element-wise roundings).
    pub fn block(self) -> usize {
        match self {
            ActRound::None | ActRound::Bf16 => 1,
            ActRound::Q8_0 | ActRound::Q8_1 => 32,
            ActRound::Q8K => 256,
        }
    }

    /// Rounds `row` in place as the CPU backend sees it. Returns `false`, leaving `row` as it
    /// was, when its length is not a whole number of blocks (the CPU backend would not take
    /// such a row either).
    pub fn apply(self, row: &mut [f32]) -> bool {
        if !row.len().is_multiple_of(self.block()) {
            return false;
        }
        match self {
            ActRound::None => {}
            ActRound::Bf16 => row
                .iter_mut()
                .for_each(|v| *v = bf16::from_f32(*v).to_f32()),
            ActRound::Q8_0 | ActRound::Q8_1 => {
                for b in row.chunks_exact_mut(32) {
                    let (d, q) = q8_0_block(b);
                    let d = f16::from_f32(d).to_f32();
                    for (v, &q) in b.iter_mut().zip(&q) {
                        *v = d * f32::from(q);
                    }
                }
            }
            ActRound::Q8K => {
                for b in row.chunks_exact_mut(256) {
                    let (d, q) = q8_k_block(b);
                    for (v, &q) in b.iter_mut().zip(q.iter()) {
                        *v = d * f32::from(q);
                    }
                }
            }
        }
        true
    }

    /// ggml's bytes for `row` in the quantized form (`None`/`Bf16`: empty), as ggml-cpu's
    /// `from_float` writes them on this architecture. For tests against ggml.
    pub fn quantize(self, row: &[f32]) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            ActRound::None | ActRound::Bf16 => {}
            ActRound::Q8_0 | ActRound::Q8_1 => {
                for b in row.chunks_exact(32) {
                    let (d, q) = q8_0_block(b);
                    out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                    if self == ActRound::Q8_1 {
                        let sum: i32 = q.iter().map(|&q| i32::from(q)).sum();
                        out.extend_from_slice(&f16::from_f32(d * sum as f32).to_le_bytes());
                    }
                    out.extend(q.iter().map(|&q| q as u8));
                }
            }
            ActRound::Q8K => {
                for b in row.chunks_exact(256) {
                    let (d, q) = q8_k_block(b);
                    out.extend_from_slice(&d.to_le_bytes());
                    out.extend(q.iter().map(|&q| q as u8));
                    for s in q.chunks_exact(16) {
                        let sum: i16 = s.iter().map(|&q| i16::from(q)).sum();
                        out.extend_from_slice(&sum.to_le_bytes());
                    }
                }
            }
        }
        out
    }
}

/// One Q8_0/Q8_1 block: the scale (before its fp16 rounding) and the quants.
fn q8_0_block(x: &[f32]) -> (f32, [i8; 32]) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if cfg!(target_arch = "x86_64") {
        // ggml-cpu's AVX path.
        if amax != 0.0 {
            127.0 / amax
        } else {
            0.0
        }
    } else if d != 0.0 {
        // ggml-cpu's NEON path (and the reference's scale).
        1.0 / d
    } else {
        0.0
    };
    let mut q = [0i8; 32];
    for (q, &v) in q.iter_mut().zip(x) {
        *q = (v * id).round_ties_even() as i8;
    }
    (d, q)
}

/// One Q8_K block as `quantize_row_q8_K_ref`: the scale and the quants.
fn q8_k_block(x: &[f32]) -> (f32, [i8; 256]) {
    let mut q = [0i8; 256];
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax == 0.0 {
        return (0.0, q);
    }
    let iscale = -127.0 / max;
    for (q, &v) in q.iter_mut().zip(x) {
        *q = nearest_int(iscale * v).min(127) as i8;
    }
    (1.0 / iscale, q)
}

/// ggml's `nearest_int`: round half to even through the fp32 mantissa (|v| < 2^22).
fn nearest_int(v: f32) -> i32 {
    let bits = (v + 12582912.0).to_bits() as i32;
    (bits & 0x007f_ffff) - 0x0040_0000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_map_to_the_cpu_backends_vec_dot_types() {
        assert_eq!(ActRound::for_weight(GGML_TYPE_F16), ActRound::None);
        assert_eq!(ActRound::for_weight(GGML_TYPE_F32), ActRound::None);
        assert_eq!(ActRound::for_weight(GGML_TYPE_BF16), ActRound::Bf16);
        assert_eq!(ActRound::for_weight(GGML_TYPE_Q8_0), ActRound::Q8_0);
        assert_eq!(ActRound::for_weight(GGML_TYPE_Q4_0), ActRound::Q8_0);
        assert_eq!(ActRound::for_weight(GGML_TYPE_Q4_1), ActRound::Q8_1);
        assert_eq!(ActRound::for_weight(GGML_TYPE_Q4_K), ActRound::Q8K);
        assert_eq!(ActRound::for_weight(GGML_TYPE_Q6_K), ActRound::Q8K);
    }

    #[test]
    fn rounded_rows_hold_what_the_quantized_bytes_say() {
        let row: Vec<f32> = (0..512)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013)
            .collect();
        for mode in [ActRound::Q8_0, ActRound::Q8_1, ActRound::Q8K] {
            let mut r = row.clone();
            assert!(mode.apply(&mut r));
            // Every value is a small integer times its block's scale, and close to the input.
            let bytes = mode.quantize(&row);
            let per = match mode {
                ActRound::Q8K => Q8_K_BLOCK,
                ActRound::Q8_1 => Q8_1_BLOCK,
                _ => Q8_0_BLOCK,
            };
            assert_eq!(bytes.len(), row.len() / mode.block() * per);
            let amax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (a, b) in r.iter().zip(&row) {
                assert!((a - b).abs() <= amax / 127.0, "{mode:?} {a} {b}");
            }
            assert_ne!(r, row, "{mode:?} rounded nothing");
            // Idempotent: the CPU quantizing an already-rounded row gets the same values back.
            let mut again = r.clone();
            mode.apply(&mut again);
            for (a, b) in again.iter().zip(&r) {
                assert!((a - b).abs() <= 1e-6 * amax, "{mode:?}");
            }
        }
        let mut short = vec![1.0f32; 33];
        assert!(!ActRound::Q8_0.apply(&mut short));
        assert_eq!(short, vec![1.0f32; 33]);
        let mut zeros = vec![0f32; 256];
        assert!(ActRound::Q8K.apply(&mut zeros));
        assert!(zeros.iter().all(|&v| v == 0.0));
    }
}
