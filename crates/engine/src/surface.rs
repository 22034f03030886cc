//! I/O surfaces and the size rules every request must follow.
//!
//! On the ANE a tensor travels in an IOSurface holding the packed `[1, C, 1, S]` channel-first
//! layout. The documented rules (ane-private-api.md §2.3, §2.5) are:
//! - a surface smaller than about 48 KiB fails at evaluation with status `0x1d`, so every surface
//!   is at least [`MIN_SURFACE_BYTES`];
//! - allocations are rounded to [`SURFACE_ALIGN`] bytes (the conservative 128 of the two claims);
//! - every surface of one request has the same allocation size, or evaluation fails with `0x1d`;
//! - a row `S * elemsize` that is a multiple of 64 bytes makes the packed and the row-padded layouts
//!   identical, so planners keep `S` a multiple of [`SPATIAL_MULTIPLE`] for fp16.

/// Minimum allocation of any surface (Orion: `[768,16]` fp16 = 49152 bytes works, smaller fails).
pub const MIN_SURFACE_BYTES: usize = 49152;
/// Allocation granularity (maderix PR #35 on M5: 128-byte aligned surfaces).
pub const SURFACE_ALIGN: usize = 128;
/// fp16 spatial length multiple so that one row is a multiple of 64 bytes.
pub const SPATIAL_MULTIPLE: usize = 32;
/// Smallest spatial length the ANE evaluates reliably (the `ane` crate's `MIN_SPATIAL_WIDTH`).
pub const MIN_SPATIAL: usize = 64;

/// Allocation size for a surface that must hold `bytes`.
pub fn alloc_size(bytes: usize) -> usize {
    bytes.max(MIN_SURFACE_BYTES).next_multiple_of(SURFACE_ALIGN)
}

/// One allocation size for every surface of a request whose largest tensor needs `max_bytes`.
pub fn request_alloc_size(tensor_bytes: &[usize]) -> usize {
    alloc_size(tensor_bytes.iter().copied().max().unwrap_or(0))
}

/// Spatial length to compile for `n` columns: at least [`MIN_SPATIAL`] and a multiple of
/// [`SPATIAL_MULTIPLE`].
pub fn spatial_bucket(n: usize) -> usize {
    n.max(MIN_SPATIAL).next_multiple_of(SPATIAL_MULTIPLE)
}

/// Host memory standing in for an IOSurface: a zeroed allocation of a fixed size. The tensor occupies
/// its first bytes, packed; the rest is padding the engine never reads. Storage is fp16-typed so the
/// fp16 views need no alignment checks.
#[derive(Clone, Debug)]
pub struct Surface {
    halves: Vec<half::f16>,
}

impl Surface {
    /// A zeroed surface of `alloc` bytes (rounded up to an even count). Use [`alloc_size`] /
    /// [`request_alloc_size`] to choose it.
    pub fn new(alloc: usize) -> Self {
        Surface {
            halves: vec![half::f16::ZERO; alloc.div_ceil(2)],
        }
    }

    /// Allocation size in bytes.
    pub fn alloc_size(&self) -> usize {
        self.halves.len() * 2
    }

    /// Raw bytes.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: f16 is two plain bytes; any u8 view of it is valid and the length is exact.
        unsafe {
            std::slice::from_raw_parts(self.halves.as_ptr().cast::<u8>(), self.halves.len() * 2)
        }
    }

    /// Raw bytes, writable.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: every bit pattern is a valid f16, so writing arbitrary bytes is sound.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.halves.as_mut_ptr().cast::<u8>(),
                self.halves.len() * 2,
            )
        }
    }

    /// The first `n` fp16 elements, writable. Panics if the surface is too small (a caller bug).
    pub fn fp16_mut(&mut self, n: usize) -> &mut [half::f16] {
        &mut self.halves[..n]
    }

    /// The first `n` fp16 elements.
    pub fn fp16(&self, n: usize) -> &[half::f16] {
        &self.halves[..n]
    }

    /// The first `n` fp32 elements, decoded from the raw bytes (for fp32 I/O).
    pub fn fp32_vec(&self, n: usize) -> Vec<f32> {
        self.bytes()[..n * 4]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn alloc_size_rules(bytes in 0usize..10_000_000) {
            let a = alloc_size(bytes);
            prop_assert!(a >= bytes);
            prop_assert!(a >= MIN_SURFACE_BYTES);
            prop_assert_eq!(a % SURFACE_ALIGN, 0);
            prop_assert!(a < bytes.max(MIN_SURFACE_BYTES) + SURFACE_ALIGN);
        }

        #[test]
        fn spatial_bucket_rules(n in 1usize..100_000) {
            let s = spatial_bucket(n);
            prop_assert!(s >= n && s >= MIN_SPATIAL);
            prop_assert_eq!((s * 2) % 64, 0);
            prop_assert!(s < n.max(MIN_SPATIAL) + SPATIAL_MULTIPLE);
        }
    }

    #[test]
    fn surface_fp16_view() {
        let mut s = Surface::new(alloc_size(10));
        s.fp16_mut(3).copy_from_slice(&[half::f16::ONE; 3]);
        assert_eq!(s.bytes()[0..2], [0x00, 0x3c]);
        assert_eq!(s.fp16(4)[3], half::f16::ZERO);
    }
}
