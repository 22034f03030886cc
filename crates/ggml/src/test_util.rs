//! Helpers shared by the unit tests of the compute modules.

use crate::ffi::GGML_TYPE_F32;
use crate::ggml::TypeInfo;
use crate::support::TensorDesc;

/// Traits of F32 (no `to_float` needed: the plugin reads plain types itself).
pub(crate) const F32_INFO: TypeInfo = TypeInfo {
    blck_size: 1,
    type_size: 4,
    to_float: None,
};

/// `n` pseudo-random values in [-1, 1) from `seed` (xorshift, reproducible).
pub(crate) fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed ^ 0x9e37_79b9_7f4a_7c15;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32
        })
        .collect()
}

/// A contiguous F32 tensor description.
pub(crate) fn f32_desc(ne: [i64; 4]) -> TensorDesc {
    TensorDesc::contiguous(GGML_TYPE_F32, 4, ne)
}
