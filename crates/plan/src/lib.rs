//! The planner: which program runs each MUL_MAT, shared by the plugin and `ane plan`.
//!
//! # Why programs per shape
//! The ANE compiler leaks: about 119 compiles per process, about 128 loaded programs
//! (ane-private-api.md §5.2). A program with baked weights per weight tensor needs 224 compiles for
//! one prompt length of Llama-3-8B. So every program here takes its weights as a runtime input
//! ([`ane_mil::build::tiled_matmul`]), and one compiled program serves every weight of its shape.
//!
//! # What the planner decides
//! - **Column buckets** ([`Planner::n_bucket`]): token counts are padded up to a few bucket sizes and
//!   cut into pieces of the largest, so any prompt length needs a handful of programs.
//! - **Tiling** ([`Planner::tile`]): rows beyond the chip's axis limit become row tiles and a
//!   contraction beyond it becomes slices summed on the host in fp32; both stay one dispatch.
//! - **Fusion**: MUL_MATs that share their activations (Q/K/V; gate/up) are one group: their weights
//!   are stacked along M, so one dispatch computes all of them.
//! - **Non-weight operands** (attention's K and V caches change every call) have their dimensions
//!   padded by [`Planner::dim_bucket`], so they too reuse a few programs.
//!
//! [`cost`] estimates times from published measurements; [`model`] plans a whole model's prefill.

#![warn(missing_docs)]

pub mod calibration;
pub mod canary;
pub mod choice;
pub mod cost;
pub mod gguf;
pub mod model;
pub mod moe;
pub mod probe;
pub mod staging;

use ane_engine::driver_plan::MIN_LAST_AXIS;
use ane_engine::surface::SPATIAL_MULTIPLE;
use ane_engine::ChipLimits;
pub use ane_mil::build::{Layout, TiledShape};

/// Default column buckets: prefill ubatches are at most 512 tokens in llama.cpp by default
/// (`n_ubatch`), and three sizes keep padding waste under 2x for batches of 64 and more.
pub const DEFAULT_N_BUCKETS: [usize; 3] = [128, 256, 512];

/// Planning rules for one chip.
#[derive(Clone, Debug)]
pub struct Planner {
    /// The chip's limits.
    pub limits: ChipLimits,
    /// Column buckets, ascending, each a multiple of the fp16 spatial multiple.
    pub n_buckets: Vec<usize>,
    /// Where tokens sit in activations and outputs.
    pub layout: Layout,
}

/// A contiguous run of columns handled by one dispatch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ColChunk {
    /// First column.
    pub start: usize,
    /// Columns used.
    pub len: usize,
    /// Compiled column count (`len` padded up to a bucket).
    pub bucket: usize,
}

impl Planner {
    /// The default planner for a chip (the plugin's default layout, [`Layout::default`]).
    pub fn new(limits: ChipLimits) -> Self {
        Planner {
            limits,
            n_buckets: DEFAULT_N_BUCKETS.to_vec(),
            layout: Layout::default(),
        }
    }

    /// Largest column bucket, never above the axis limit.
    pub fn max_cols(&self) -> usize {
        let cap = self.limits.max_axis / SPATIAL_MULTIPLE * SPATIAL_MULTIPLE;
        self.n_buckets.last().copied().unwrap_or(cap).min(cap)
    }

    /// Smallest bucket holding `cols` columns (`cols <= max_cols()`).
    pub fn n_bucket(&self, cols: usize) -> usize {
        self.n_buckets
            .iter()
            .copied()
            .find(|&b| b >= cols && b <= self.max_cols())
            .unwrap_or_else(|| self.max_cols())
    }

    /// Cuts `cols` columns into dispatch-sized chunks: full chunks of the largest bucket, then the
    /// remainder in the smallest bucket that holds it.
    pub fn col_chunks(&self, cols: usize) -> Vec<ColChunk> {
        let max = self.max_cols();
        let mut out = Vec::new();
        let mut start = 0;
        while start < cols {
            let len = (cols - start).min(max);
            out.push(ColChunk {
                start,
                len,
                bucket: self.n_bucket(len),
            });
            start += len;
        }
        out
    }

    /// Pads a dimension of a non-weight operand (attention's KV length changes every call) to a
    /// power of two of at least 64, capped at the axis limit: exact (zero padding), at most 2x
    /// waste, and a handful of programs over all context lengths.
    pub fn dim_bucket(&self, d: usize) -> usize {
        d.max(64)
            .next_power_of_two()
            .min(self.limits.max_axis.max(d))
    }

    /// The program shape for `m_total` output rows and contraction `k` at `n_bucket` columns.
    pub fn tile(&self, k: usize, m_total: usize, n_bucket: usize) -> TiledShape {
        let max = self.limits.max_axis;
        let k_chunks = k.div_ceil(max);
        let tiles = m_total.div_ceil(max);
        let m_tile = m_total.div_ceil(tiles);
        TiledShape {
            heads: 1,
            tiles,
            k_chunks,
            // Token-major outputs have the rows as their last axis: same 64-byte row rule.
            m_tile: match self.layout {
                Layout::Channels => m_tile,
                Layout::Tokens => m_tile.next_multiple_of(SPATIAL_MULTIPLE).max(MIN_LAST_AXIS),
            },
            // The contraction is the weights' last axis: fp16 rows must be a multiple of 64 bytes
            // (surface row rule), so slices are padded with zeros to a multiple of 32, and to at
            // least 64 (the driver's shortest last axis).
            k_chunk: k
                .div_ceil(k_chunks)
                .next_multiple_of(SPATIAL_MULTIPLE)
                .max(MIN_LAST_AXIS),
            n: n_bucket,
            layout: self.layout,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ane_engine::Chip;
    use proptest::prelude::*;

    #[test]
    fn buckets_and_chunks() {
        let p = Planner::new(Chip::M4.limits());
        assert_eq!(p.n_bucket(64), 128);
        assert_eq!(p.n_bucket(129), 256);
        assert_eq!(p.n_bucket(512), 512);
        let c = p.col_chunks(1100);
        assert_eq!(c.len(), 3);
        assert_eq!((c[2].start, c[2].len, c[2].bucket), (1024, 76, 128));
        assert_eq!(p.dim_bucket(300), 512);
        assert_eq!(p.dim_bucket(5000), 8192);
        assert_eq!(p.dim_bucket(100_000), 100_000);
    }

    #[test]
    fn lm_head_tiles_on_m1() {
        let p = Planner::new(Chip::M1.limits());
        let s = p.tile(4096, 128256, 512);
        assert_eq!(
            (s.tiles, s.m_tile, s.k_chunks, s.k_chunk),
            (8, 16032, 1, 4096)
        );
        let s = p.tile(28672, 8192, 512);
        assert_eq!((s.tiles, s.k_chunks, s.k_chunk), (1, 2, 14336));
    }

    proptest! {
        #[test]
        fn tiles_cover_and_respect_limits(k in 1usize..200_000, m in 1usize..200_000, cols in 1usize..5000,
                                          chip in prop::sample::select(vec![Chip::M1, Chip::M4])) {
            let p = Planner::new(chip.limits());
            let max = chip.limits().max_axis;
            for c in p.col_chunks(cols) {
                prop_assert!(c.len <= c.bucket && c.bucket <= max);
                let s = p.tile(k, m, c.bucket);
                prop_assert!(s.m_tile <= max && s.k_chunk <= max && s.n <= max);
                prop_assert!(s.tiles * s.m_tile >= m && (s.tiles - 1) * s.m_tile < m);
                prop_assert!(s.k_chunks * s.k_chunk >= k && (s.k_chunks - 1) * s.k_chunk < k);
                prop_assert_eq!(s.k_chunk % SPATIAL_MULTIPLE, 0);
            }
            let chunks = p.col_chunks(cols);
            prop_assert_eq!(chunks.iter().map(|c| c.len).sum::<usize>(), cols);
        }
    }
}
