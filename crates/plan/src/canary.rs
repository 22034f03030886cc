//! Every canary in one place: running a MUL_MAT-shaped program on any engine against the
//! reference engine and a CPU f32 baseline. Here the engine-level check (a baked conv matmul,
//! [`canary`]) and its helpers; in [`planned`] the forms the planner dispatches (tiled,
//! shape-shared with the surface fallback, packs of experts, compressed weights); in [`int8`] the
//! int8-weight probe, which the plugin dispatches only where it passed (`GGML_ANE_INT8_INPUT=1`).
//!
//! Platform-neutral on purpose: the plugin's engine choice, `ane doctor` and `ane bench` all use
//! these functions, and on Linux they run against the reference engine.

mod int8;
mod planned;
pub use int8::*;
pub use planned::*;

use std::time::Instant;

use ane_mil::build::{conv_matmul, weights_blob_fp16, WEIGHT_PATH};
use half::f16;

use ane_engine::reference::ReferenceEngine;
use ane_engine::surface::spatial_bucket;
use ane_engine::{Chip, Engine, EngineError, Surface, WeightFile};

/// The `[m][n]` outputs of a shape-shared program of shape `s` from its fp16 output tensor `yh`,
/// row tiles in place and contraction slices summed in f32 (as the plugin's host does).
fn read_tiled_output(s: &crate::TiledShape, yh: &[f16], m: usize, n: usize, y: &mut [f32]) {
    for mi in 0..m {
        let (tile, row) = (mi / s.m_tile, mi % s.m_tile);
        for ni in 0..n {
            y[mi * n + ni] = (0..s.k_chunks)
                .map(|c| yh[s.y_index(tile, c, row, ni)].to_f32())
                .sum();
        }
    }
}

/// Shape of the canary program: `conv_matmul(64, 64, 64)`.
pub const CANARY_SHAPE: (usize, usize, usize) = (64, 64, 64);
/// Largest [`max_rel_err`] the canary accepts against the reference engine. Both compute in fp16
/// with at least fp16 accumulation over K = 64 values in [-1, 1], so honest results differ by a
/// few fp16 ulps; wrong binding, layout or weights give errors of order 1.
pub const CANARY_TOLERANCE: f64 = 1e-2;

/// Deterministic values in [-1, 1) that differ per index, so transposes and swaps show.
pub fn test_values(n: usize, seed: u64) -> Vec<f16> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            f16::from_f32(((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0)
        })
        .collect()
}

/// One matmul run on an engine: `y[m][n] = sum_k w[m][k] x[k][n]`.
#[derive(Clone, Debug)]
pub struct MatmulRun {
    /// The result, `m * n` values, row-major `[m][n]`.
    pub y: Vec<f32>,
    /// Compile (and load) time, ms.
    pub compile_ms: f64,
    /// Fastest evaluation including the copies in and out, ms.
    pub eval_ms: f64,
    /// First evaluation, ms.
    pub first_eval_ms: f64,
}

/// Compiles `conv_matmul(k, m, n')` (`n'` = `n` rounded to the spatial bucket), evaluates it
/// `reps` times (at least once) and unloads it.
///
/// # Errors
/// Whatever the engine returns.
pub fn run_conv_matmul(
    engine: &dyn Engine,
    (k, m, n): (usize, usize, usize),
    w: &[f16],
    x: &[f16],
    reps: usize,
) -> Result<MatmulRun, EngineError> {
    let np = spatial_bucket(n);
    let mil = ane_mil::text::emit(&conv_matmul(k, m, np));
    let t = Instant::now();
    let id = engine.compile(
        &mil,
        &[WeightFile {
            path: WEIGHT_PATH.into(),
            bytes: weights_blob_fp16(w),
        }],
    )?;
    let compile_ms = ms(t);
    let size = ane_engine::surface::request_alloc_size(&[k * np * 2, m * np * 2]);
    let mut xs = Surface::new(size);
    let mut ys = Surface::new(size);
    let run = (|| {
        let mut best = f64::INFINITY;
        let mut first = 0.0;
        for r in 0..reps.max(1) {
            let t = Instant::now();
            let xh = xs.fp16_mut(k * np);
            for ki in 0..k {
                xh[ki * np..ki * np + n].copy_from_slice(&x[ki * n..(ki + 1) * n]);
            }
            engine.evaluate(id, &[&xs], &mut [&mut ys])?;
            let yh = ys.fp16(m * np);
            let y: Vec<f32> = (0..m)
                .flat_map(|mi| yh[mi * np..mi * np + n].iter().map(|v| v.to_f32()))
                .collect();
            let e = ms(t);
            if r == 0 {
                first = e;
            }
            best = best.min(e);
            if r + 1 == reps.max(1) {
                return Ok((y, best, first));
            }
        }
        unreachable!("the loop returns on its last iteration")
    })();
    engine.unload(id);
    let (y, eval_ms, first_eval_ms) = run?;
    Ok(MatmulRun {
        y,
        compile_ms,
        eval_ms,
        first_eval_ms,
    })
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// `y[m][n] = sum_k w[m][k] x[k][n]` in f32 on the CPU, split over the available cores: the
/// baseline `ane doctor` and `ane bench` compare against.
pub fn cpu_matmul_f32(w: &[f32], x: &[f32], (k, m, n): (usize, usize, usize)) -> Vec<f32> {
    let mut y = vec![0f32; m * n];
    if m * n == 0 {
        return y;
    }
    let threads = std::thread::available_parallelism()
        .map_or(1, |t| t.get())
        .min(m);
    let rows_per = m.div_ceil(threads);
    std::thread::scope(|s| {
        for (ti, chunk) in y.chunks_mut(rows_per * n).enumerate() {
            s.spawn(move || {
                for (r, acc) in chunk.chunks_mut(n).enumerate() {
                    let mi = ti * rows_per + r;
                    for (ki, &wv) in w[mi * k..(mi + 1) * k].iter().enumerate() {
                        for (a, &xv) in acc.iter_mut().zip(&x[ki * n..(ki + 1) * n]) {
                            *a += wv * xv;
                        }
                    }
                }
            });
        }
    });
    y
}

/// Largest absolute difference divided by the largest magnitude of `want` (a norm-wise relative
/// error: element-wise ratios explode where the exact value is near zero). Non-finite values in
/// `got` give infinity.
pub fn max_rel_err(got: &[f32], want: &[f32]) -> f64 {
    let scale = want.iter().fold(0f64, |a, &v| a.max(f64::from(v).abs()));
    let mut worst = 0f64;
    for (&g, &w) in got.iter().zip(want) {
        if !g.is_finite() {
            return f64::INFINITY;
        }
        worst = worst.max((f64::from(g) - f64::from(w)).abs());
    }
    if got.len() != want.len() {
        return f64::INFINITY;
    }
    if scale == 0.0 {
        worst
    } else {
        worst / scale
    }
}

/// Result of [`canary`].
#[derive(Clone, Debug)]
pub struct CanaryReport {
    /// [`max_rel_err`] of the engine against the reference engine.
    pub max_rel_err: f64,
    /// [`max_rel_err`] of the engine against the f32 CPU product.
    pub max_rel_err_f32: f64,
    /// Compile and load, ms.
    pub compile_ms: f64,
    /// First evaluation, ms.
    pub first_eval_ms: f64,
    /// Whether the engine passed.
    pub ok: bool,
}

/// Compiles, loads and evaluates `conv_matmul(64, 64, 64)` with known weights on `engine` and
/// compares it with the reference engine. The plugin uses the ANE only when this passes.
///
/// # Errors
/// Whatever the engine returns on compile, load or evaluate.
pub fn canary(engine: &dyn Engine) -> Result<CanaryReport, EngineError> {
    let (k, m, n) = CANARY_SHAPE;
    let w = test_values(m * k, 11);
    let x = test_values(k * n, 12);
    let got = run_conv_matmul(engine, CANARY_SHAPE, &w, &x, 2)?;
    let reference = ReferenceEngine::new(Chip::Unknown.limits());
    let want = run_conv_matmul(&reference, CANARY_SHAPE, &w, &x, 1)?;
    let wf: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
    let xf: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
    let exact = cpu_matmul_f32(&wf, &xf, CANARY_SHAPE);
    let err = max_rel_err(&got.y, &want.y);
    Ok(CanaryReport {
        max_rel_err: err,
        max_rel_err_f32: max_rel_err(&got.y, &exact),
        compile_ms: got.compile_ms,
        first_eval_ms: got.first_eval_ms,
        ok: err <= CANARY_TOLERANCE,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_engine_passes_its_own_canary() {
        let e = ReferenceEngine::new(Chip::M4.limits());
        let r = canary(&e).unwrap();
        assert!(r.ok && r.max_rel_err == 0.0, "{r:?}");
        assert!(r.max_rel_err_f32 < 1e-2, "{r:?}");
        assert_eq!(e.counters().loaded, 0, "canary unloads its program");
    }

    #[test]
    fn cpu_matmul_and_error_metric() {
        // [[1, 2], [3, 4]] x [[1, 0, 2], [0, 1, 3]]
        let y = cpu_matmul_f32(&[1., 2., 3., 4.], &[1., 0., 2., 0., 1., 3.], (2, 2, 3));
        assert_eq!(y, [1., 2., 8., 3., 4., 18.]);
        assert_eq!(max_rel_err(&[1., 2.], &[1., 4.]), 0.5);
        assert_eq!(max_rel_err(&[f32::NAN], &[1.]), f64::INFINITY);
    }

    #[test]
    fn odd_n_is_padded_to_the_bucket() {
        let e = ReferenceEngine::new(Chip::M4.limits());
        let (k, m, n) = (64, 32, 70);
        let w = test_values(m * k, 1);
        let x = test_values(k * n, 2);
        let r = run_conv_matmul(&e, (k, m, n), &w, &x, 1).unwrap();
        let wf: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
        let xf: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
        assert!(max_rel_err(&r.y, &cpu_matmul_f32(&wf, &xf, (k, m, n))) < 1e-2);
    }

    /// A broken engine (outputs transposed) fails the canary.
    #[test]
    fn wrong_numbers_fail_the_canary() {
        struct Swapped(ReferenceEngine);
        impl Engine for Swapped {
            fn name(&self) -> &'static str {
                "swapped"
            }
            fn limits(&self) -> ane_engine::ChipLimits {
                self.0.limits()
            }
            fn compile(
                &self,
                mil: &str,
                w: &[WeightFile],
            ) -> Result<ane_engine::ProgramId, EngineError> {
                self.0.compile(mil, w)
            }
            fn evaluate(
                &self,
                p: ane_engine::ProgramId,
                i: &[&Surface],
                o: &mut [&mut Surface],
            ) -> Result<(), EngineError> {
                self.0.evaluate(p, i, o)?;
                let v = o[0].fp16(64 * 64).to_vec();
                for a in 0..64 {
                    for b in 0..64 {
                        o[0].fp16_mut(64 * 64)[a * 64 + b] = v[b * 64 + a];
                    }
                }
                Ok(())
            }
            fn unload(&self, p: ane_engine::ProgramId) {
                self.0.unload(p)
            }
            fn counters(&self) -> ane_engine::EngineCounters {
                self.0.counters()
            }
        }
        let r = canary(&Swapped(ReferenceEngine::new(Chip::M4.limits()))).unwrap();
        assert!(!r.ok && r.max_rel_err > 0.1, "{r:?}");
    }
}
