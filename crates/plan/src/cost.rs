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
    /// Throughput divisor of the shape-shared (runtime-weight matmul) programs against baked conv:
    /// [`MATMUL_PENALTY`] until measured.
    pub matmul_penalty: f64,
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
        matmul_penalty: MATMUL_PENALTY,
    }
}

impl ChipCost {
    /// These costs with some replaced by measured ones: `key=value` pairs separated by commas,
    /// keys named as the fields (`dispatch_ms=0.12,matmul_penalty=1.4,cpu_tflops=0.9`). This is
    /// how numbers from `ane bench` on a Mac reach `GGML_ANE_COST` and `ane plan --cost`.
    ///
    /// # Errors
    /// A message naming the pair that is not `known_key=finite non-negative number`.
    pub fn with_overrides(mut self, spec: &str) -> Result<ChipCost, String> {
        for pair in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| format!("`{pair}`: expected key=value"))?;
            let v: f64 = value
                .trim()
                .parse()
                .ok()
                .filter(|v: &f64| v.is_finite() && *v >= 0.0)
                .ok_or_else(|| format!("`{pair}`: value must be a non-negative number"))?;
            let field = match key.trim() {
                "dispatch_ms" => &mut self.dispatch_ms,
                "peak_tflops" => &mut self.peak_tflops,
                "half_gflop" => &mut self.half_gflop,
                "sram_bytes" => &mut self.sram_bytes,
                "compile_ms" => &mut self.compile_ms,
                "load_ms" => &mut self.load_ms,
                "cpu_tflops" => &mut self.cpu_tflops,
                "matmul_penalty" => &mut self.matmul_penalty,
                other => return Err(format!("`{pair}`: unknown cost `{other}`")),
            };
            if v == 0.0 && matches!(key.trim(), "peak_tflops" | "cpu_tflops" | "matmul_penalty") {
                return Err(format!("`{pair}`: must be positive"));
            }
            *field = v;
        }
        Ok(self)
    }

    /// Estimated time of a GEMM of `flops` with `bytes` of operands, as one dispatch.
    /// `penalty` divides throughput (1 for conv, `matmul_penalty` for runtime-weight matmul).
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
        self.gemm_ms(flops, bytes, self.matmul_penalty)
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
    fn overrides_replace_named_costs_and_name_bad_pairs() {
        let c = chip_cost(Chip::M4)
            .with_overrides("dispatch_ms=0.5, matmul_penalty=1.25")
            .unwrap();
        assert_eq!((c.dispatch_ms, c.matmul_penalty), (0.5, 1.25));
        assert_eq!(c.peak_tflops, chip_cost(Chip::M4).peak_tflops);
        for bad in [
            "dispatch_ms",
            "speed=2",
            "cpu_tflops=0",
            "load_ms=-1",
            "load_ms=nan",
        ] {
            let e = chip_cost(Chip::M4).with_overrides(bad).unwrap_err();
            assert!(e.contains(bad.split('=').next().unwrap()), "{bad}: {e}");
        }
    }

    #[test]
    fn dispatch_floor_dominates_tiny_ops() {
        let c = chip_cost(Chip::M1);
        let ms = c.gemm_ms(2.0 * 64.0 * 64.0 * 64.0, 0.0, 1.0);
        assert!(ms > c.dispatch_ms && ms < 2.0 * c.dispatch_ms, "{ms}");
    }
}
