//! Cost model per chip, from published measurements (none of ours: no Mac here).
//!
//! Every constant cites its source in `ane-private-api.md` (§6 unless noted). They are estimates
//! for planning and for `ane plan`, not claims: `ane bench` on a Mac is the instrument that checks
//! them.

use ane_engine::Chip;
use serde::Serialize;

use crate::TiledShape;

/// Cost constants of one chip.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct ChipCost {
    /// Fixed cost of one evaluate, ms. M1 0.22 (ANEForge cost model "M1 floor 220 us"); M4 0.095
    /// (maderix Part 2: ~0.095 ms XPC+IOKit on a 256x256 matmul); M5 0.07 (maderix m5result.md).
    /// M2/M3 interpolated.
    pub dispatch_ms: f64,
    /// Peak single-GEMM fp16 TFLOPS (ANEForge ROOFLINES.md: M1 3.25 model anchor, M2 Pro 3.4, M4
    /// 5.4, M5 8.7; M3 not measured single-GEMM, M2 value used).
    pub peak_tflops: f64,
    /// FLOPs at which a GEMM reaches half of peak, fitted (with the dispatch floor) to ANEForge's
    /// M4 sweep: 512^3 in 0.209 ms, 1024^3 in 0.746 ms, 2048^3 in 3.51 ms.
    pub half_gflop: f64,
    /// Working set above which throughput drops (~32 MB SRAM; ~35% slower past it: 5.44 TF at
    /// 4096^3 vs 3.43 TF at 6144^3).
    pub sram_bytes: f64,
    /// Compile time per program, ms (11-55 ms reported; Orion 17 ms hello, ~55 ms layer kernels).
    pub compile_ms: f64,
    /// Load time per program, ms (maderix M5: ~1.7 ms).
    pub load_ms: f64,
    /// CPU fp32 GEMM TFLOPS for ops left on the CPU (ANEForge: Accelerate 1.2-1.5 TF on M4;
    /// older chips scaled down).
    pub cpu_tflops: f64,
}

/// Runtime-weight `matmul` against baked-weight 1x1 `conv`: Orion's "1x1 conv > matmul (3x
/// faster)" (citing maderix Part 2). Our shape-shared programs are matmuls, so their estimated
/// throughput is divided by this. Unmeasured for our shapes; the most uncertain constant here.
pub const MATMUL_PENALTY: f64 = 3.0;

/// The cost table of a chip.
pub fn chip_cost(chip: Chip) -> ChipCost {
    let (dispatch_ms, peak_tflops, cpu_tflops) = match chip {
        Chip::M1 | Chip::Unknown => (0.22, 3.25, 0.8),
        Chip::M2 => (0.18, 3.4, 1.0),
        Chip::M3 => (0.14, 3.4, 1.2),
        Chip::M4 => (0.095, 5.4, 1.4),
        Chip::M5 => (0.07, 8.7, 1.6),
    };
    ChipCost {
        dispatch_ms,
        peak_tflops,
        half_gflop: 0.35,
        sram_bytes: 32e6,
        compile_ms: 40.0,
        load_ms: 2.0,
        cpu_tflops,
    }
}

impl ChipCost {
    /// Estimated time of a GEMM of `flops` with `bytes` of operands, as one dispatch.
    /// `penalty` divides throughput (1 for conv, [`MATMUL_PENALTY`] for runtime-weight matmul).
    pub fn gemm_ms(&self, flops: f64, bytes: f64, penalty: f64) -> f64 {
        let efficiency = flops / (flops + self.half_gflop * 1e9);
        let sram = if bytes > self.sram_bytes { 0.65 } else { 1.0 };
        let tflops = self.peak_tflops * efficiency * sram / penalty;
        self.dispatch_ms + flops / (tflops * 1e12) * 1e3
    }

    /// Estimated time of one dispatch of a [`TiledShape`] program.
    pub fn dispatch_time_ms(&self, s: &TiledShape) -> f64 {
        let flops = 2.0 * s.macs() as f64;
        let bytes = 2.0 * (s.x_len() + s.w_len() + s.y_len()) as f64;
        self.gemm_ms(flops, bytes, MATMUL_PENALTY)
    }

    /// Estimated CPU time for `flops`.
    pub fn cpu_ms(&self, flops: f64) -> f64 {
        flops / (self.cpu_tflops * 1e12) * 1e3
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fits_the_m4_sweep_within_a_third() {
        let c = chip_cost(Chip::M4);
        for (n, measured_ms) in [(512.0f64, 0.209), (1024.0, 0.746), (2048.0, 3.51)] {
            let flops = 2.0 * n * n * n;
            let ms = c.gemm_ms(flops, 0.0, 1.0);
            assert!(
                (ms / measured_ms - 1.0).abs() < 0.35,
                "n={n}: model {ms:.3} ms vs {measured_ms}"
            );
        }
    }

    #[test]
    fn dispatch_floor_dominates_tiny_ops() {
        let c = chip_cost(Chip::M1);
        let ms = c.gemm_ms(2.0 * 64.0 * 64.0 * 64.0, 0.0, 1.0);
        assert!(ms > c.dispatch_ms && ms < 2.0 * c.dispatch_ms, "{ms}");
    }
}
