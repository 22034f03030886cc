//! The int8-weight probe (issue 24, item 5): the shape-shared program with Q8_0 weights as an
//! int8 input plus fp16 block scales, dequantized in the program
//! ([`ane_mil::build::tiled_matmul_int8`]). Nobody knows whether the ANE takes int8 input
//! surfaces at all, so [`int8_canary`] says not only pass or fail but which step stopped it:
//! compile (the compiler refuses the int8 input or the cast), surfaces, evaluate, or numerics
//! (it ran, but not to the fp16 program's result). `ane doctor` reports it, `ane bench` times
//! it; the plugin runs it once at first use and dispatches the form only where it passed
//! (`GGML_ANE_INT8_INPUT=1`, `ggml-ane` `matmul::int8`).

use std::time::Instant;

use super::{max_rel_err, test_values, MatmulRun, CANARY_TOLERANCE};
use ane_engine::reference::ReferenceEngine;
use ane_engine::surface::request_alloc_size;
use ane_engine::{Engine, EngineError};
use ane_mil::build::{stage_q8_0_int8, tiled_matmul_int8, QuantKind};
use half::f16;

use crate::{Layout, Planner, TiledShape};

/// Where a run of the int8 program stopped.
#[derive(Clone, Debug)]
pub struct Int8Failure {
    /// `compile` (compile and load), `surfaces`, `evaluate`; with the engine's own name of the
    /// failed call after a colon when its step log has one (`compile: load`).
    pub step: String,
    /// The engine's error.
    pub error: EngineError,
}

impl std::fmt::Display for Int8Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} failed: {}", self.step, self.error)
    }
}

/// The int8 program's shape for an `m x k` weight at `n` tokens under `planner`: its token-major
/// tiling with rows per tile rounded to whole 64-byte int8 rows.
///
/// # Errors
/// `k` not whole Q8_0 blocks, `n` beyond one column bucket, or a rounded tile beyond the axis
/// limit (as [`EngineError::Compile`]).
pub fn int8_shape(
    planner: &Planner,
    (k, m, n): (usize, usize, usize),
) -> Result<TiledShape, EngineError> {
    if !k.is_multiple_of(QuantKind::BLOCK) {
        return Err(EngineError::Compile(format!(
            "k = {k} is not a whole number of Q8_0 blocks"
        )));
    }
    let chunk = planner.col_chunks(n);
    if chunk.len() != 1 {
        return Err(EngineError::Compile(format!(
            "n = {n} is beyond one column bucket ({})",
            planner.max_cols()
        )));
    }
    let tokens = Planner {
        layout: Layout::Tokens,
        ..planner.clone()
    };
    let s = tokens.tile(k, m, chunk[0].bucket).for_int8();
    if s.m_tile > planner.limits.max_axis {
        return Err(EngineError::Compile(format!(
            "{} rows per tile, rounded to 64-byte int8 rows, exceed the axis limit {}",
            s.m_tile, planner.limits.max_axis
        )));
    }
    Ok(s)
}

/// Bytes a dispatch of the int8 program binds for the weights (the int8 surface and the scale
/// surface, each of the request's size) and what the fp16 program binds for them (one surface),
/// for an `m x k` weight at `n` tokens; also the tensors' own bytes (int8 weights plus scales
/// against fp16 weights). Every surface of a request has one size, so the scales cost a whole
/// surface if staged beside the weights: the staging saving holds only when they are written per
/// dispatch (scratch) instead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Int8Bytes {
    /// int8 weight tensor bytes.
    pub q: usize,
    /// fp16 scale tensor bytes.
    pub scales: usize,
    /// fp16 weight tensor bytes of the fp16 program.
    pub fp16: usize,
    /// Allocation size of each surface of an int8 request.
    pub int8_surface: usize,
    /// Allocation size of each surface of the fp16 request.
    pub fp16_surface: usize,
}

impl Int8Bytes {
    /// The sizes for `planner`'s programs at `m x k x n`.
    ///
    /// # Errors
    /// As [`int8_shape`].
    pub fn of(planner: &Planner, kmn: (usize, usize, usize)) -> Result<Self, EngineError> {
        let s = int8_shape(planner, kmn)?;
        let f = Planner {
            layout: Layout::Tokens,
            ..planner.clone()
        }
        .tile(kmn.0, kmn.1, s.n);
        Ok(Int8Bytes {
            q: s.w_len(),
            scales: s.ws_len() * 2,
            fp16: f.w_len() * 2,
            int8_surface: request_alloc_size(&[
                s.x_len() * 2,
                s.w_len(),
                s.ws_len() * 2,
                s.y_len() * 2,
            ]),
            fp16_surface: request_alloc_size(&[f.x_len() * 2, f.w_len() * 2, f.y_len() * 2]),
        })
    }
}

/// The engine's own name of the step that just failed, if its log recorded a new failure.
fn failed_step(engine: &dyn Engine, failures_before: usize, phase: &str) -> String {
    let steps = engine.steps();
    match steps.iter().filter(|r| !r.ok).nth(failures_before) {
        Some(r) if r.step != phase => format!("{phase}: {}", r.step),
        _ => phase.to_string(),
    }
}

/// Compiles [`tiled_matmul_int8`] for `m x k x n` as `planner` tiles it (token-major), stages
/// `raw` (`m` rows of Q8_0 blocks) into its int8 and scale inputs, evaluates it `reps` times on
/// `x` (`[k][n]`) and unloads it. The result is `[m][n]`, slices summed in f32 as the plugin does.
///
/// # Errors
/// The step that failed and the engine's error.
pub fn run_int8(
    engine: &dyn Engine,
    planner: &Planner,
    (k, m, n): (usize, usize, usize),
    raw: &[u8],
    x: &[f16],
    reps: usize,
) -> Result<MatmulRun, Int8Failure> {
    let fail = |step: &str, error: EngineError| Int8Failure {
        step: step.to_string(),
        error,
    };
    let s = int8_shape(planner, (k, m, n)).map_err(|e| fail("shape", e))?;
    let failures = engine.steps().iter().filter(|r| !r.ok).count();
    let t = Instant::now();
    let id = engine
        .compile(&ane_mil::text::emit(&tiled_matmul_int8(s)), &[])
        .map_err(|e| Int8Failure {
            step: failed_step(engine, failures, "compile"),
            error: e,
        })?;
    let compile_ms = t.elapsed().as_secs_f64() * 1e3;
    let size = request_alloc_size(&[s.x_len() * 2, s.w_len(), s.ws_len() * 2, s.y_len() * 2]);
    let surfaces = (|| {
        Ok::<_, EngineError>((
            engine.new_surface(size)?,
            engine.new_surface(size)?,
            engine.new_surface(size)?,
            engine.new_surface(size)?,
        ))
    })();
    let (mut xs, mut qs, mut ds, mut ys) = match surfaces {
        Ok(v) => v,
        Err(e) => {
            engine.unload(id);
            return Err(fail("surfaces", e));
        }
    };
    let (q, d) = stage_q8_0_int8(&s, raw, m, k);
    qs.bytes_mut()[..q.len()]
        .iter_mut()
        .zip(&q)
        .for_each(|(b, &v)| *b = v as u8);
    ds.fp16_mut(d.len()).copy_from_slice(&d);
    let mut best = f64::INFINITY;
    let mut first = 0.0;
    let mut y = vec![0f32; m * n];
    for rep in 0..reps.max(1) {
        let t = Instant::now();
        let xh = xs.fp16_mut(s.x_len());
        xh.fill(f16::ZERO);
        for ki in 0..k {
            let (c, kk) = (ki / s.k_chunk, ki % s.k_chunk);
            for ni in 0..n {
                xh[s.x_index(0, c, kk, ni)] = x[ki * n + ni];
            }
        }
        if let Err(e) = engine.evaluate(id, &[&xs, &qs, &ds], &mut [&mut ys]) {
            engine.unload(id);
            return Err(fail("evaluate", e));
        }
        super::read_tiled_output(&s, ys.fp16(s.y_len()), m, n, &mut y);
        let e = t.elapsed().as_secs_f64() * 1e3;
        if rep == 0 {
            first = e;
        }
        best = best.min(e);
    }
    engine.unload(id);
    Ok(MatmulRun {
        y,
        compile_ms,
        eval_ms: best,
        first_eval_ms: first,
    })
}

/// `m * k / 32` Q8_0 blocks of pseudo-random quants from `seed`, with their ggml dequantization
/// rounded to fp16 (`[m][k]`, what fp16 staging holds). Scales are about 0.01 (so products of
/// values in [-1, 1] stay far from fp16's range), every 5th block's negative and every 7th zero.
pub fn q8_0_test_blocks(m: usize, k: usize, seed: u64) -> (Vec<u8>, Vec<f16>) {
    let nb = m * k / QuantKind::BLOCK;
    let q = test_values(nb * QuantKind::BLOCK, seed);
    let scales = test_values(nb, seed ^ 0x5ca1e);
    let (mut raw, mut deq) = (Vec::new(), Vec::new());
    for b in 0..nb {
        let d = match b {
            b if b % 7 == 0 => f16::ZERO,
            b if b % 5 == 0 => f16::from_f32(-0.01 * (1.0 + scales[b].to_f32().abs())),
            _ => f16::from_f32(0.01 * (1.0 + scales[b].to_f32().abs())),
        };
        raw.extend(d.to_le_bytes());
        for v in &q[b * QuantKind::BLOCK..(b + 1) * QuantKind::BLOCK] {
            let qv = (v.to_bits() ^ (v.to_bits() >> 7)) as u8;
            raw.push(qv);
            deq.push(f16::from_f32(d.to_f32() * qv as i8 as f32));
        }
    }
    (raw, deq)
}

/// Result of [`int8_canary`].
#[derive(Clone, Debug)]
pub struct Int8Canary {
    /// Ran, and within [`CANARY_TOLERANCE`] of the fp16 program on the dequantized weights.
    pub ok: bool,
    /// Largest relative error against the reference engine's fp16 program (infinite when it did
    /// not run).
    pub max_rel_err: f64,
    /// The step that stopped it: `compile`, `surfaces`, `evaluate` (see [`Int8Failure`]) or
    /// `numerics` (ran, wrong result); `None` when it passed.
    pub failed_step: Option<String>,
    /// The engine's error, when a step failed.
    pub error: Option<String>,
}

/// Runs the int8 program (80 x 96 weight of Q8_0 blocks, 64 columns, 2 row tiles and 2 K slices
/// forced by a narrowed axis limit) on `engine` and compares it with what the plugin dispatches
/// today: the fp16 shape-shared program on the same blocks dequantized, on the reference engine.
/// The reference engine gives the same bits (`ane-engine`'s
/// `int8_input_program_equals_fp16_program_on_dequantized_q8_0`), so on it the error is 0.
pub fn int8_canary(engine: &dyn Engine) -> Int8Canary {
    let (k, m, n) = (96, 80, 64);
    let (raw, deq) = q8_0_test_blocks(m, k, 21);
    let x = test_values(k * n, 22);
    // A 64 axis limit splits M = 80 into 2 row tiles and K = 96 into 2 slices.
    let planner = Planner {
        layout: Layout::Tokens,
        ..Planner::new(ane_engine::ChipLimits {
            max_axis: 64,
            ..engine.limits()
        })
    };
    let got = match run_int8(engine, &planner, (k, m, n), &raw, &x, 1) {
        Ok(r) => r,
        Err(f) => {
            let (step, error) = (f.step, f.error.to_string());
            return Int8Canary {
                ok: false,
                max_rel_err: f64::INFINITY,
                failed_step: Some(step),
                error: Some(error),
            };
        }
    };
    let reference = ReferenceEngine::new(engine.limits());
    let want = match super::run_planned(&reference, &planner, (k, m, n), &deq, &x, 1) {
        Ok(r) => r,
        Err(e) => {
            return Int8Canary {
                ok: false,
                max_rel_err: f64::INFINITY,
                failed_step: Some("reference".into()),
                error: Some(e.to_string()),
            }
        }
    };
    let err = max_rel_err(&got.y, &want.y);
    let ok = err <= CANARY_TOLERANCE;
    Int8Canary {
        ok,
        max_rel_err: err,
        failed_step: (!ok).then(|| "numerics".into()),
        error: (!ok).then(|| format!("max relative error {err:.3e} against the fp16 program")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ane_engine::{Chip, ProgramId, Surface, WeightFile};

    #[test]
    fn the_reference_engine_passes_bit_for_bit() {
        let e = ReferenceEngine::new(Chip::M4.limits());
        let c = int8_canary(&e);
        assert!(c.ok, "{c:?}");
        assert_eq!(c.max_rel_err, 0.0);
        assert!(c.failed_step.is_none() && c.error.is_none());
        assert_eq!(e.counters().loaded, 0, "the canary unloads its program");
    }

    /// An engine that refuses int8 inputs at compile, or evaluates them as garbage: the two ways
    /// the probe can fail on a Mac.
    struct Int8Refusing {
        inner: ReferenceEngine,
        at_compile: bool,
    }

    impl Engine for Int8Refusing {
        fn name(&self) -> &'static str {
            "int8-refusing"
        }
        fn limits(&self) -> ane_engine::ChipLimits {
            self.inner.limits()
        }
        fn compile(&self, mil: &str, w: &[WeightFile]) -> Result<ProgramId, EngineError> {
            if self.at_compile && mil.contains("tensor<int8,") {
                return Err(EngineError::Compile(
                    "int8 input surfaces not supported".into(),
                ));
            }
            self.inner.compile(mil, w)
        }
        fn evaluate(
            &self,
            p: ProgramId,
            i: &[&Surface],
            o: &mut [&mut Surface],
        ) -> Result<(), EngineError> {
            self.inner.evaluate(p, i, o)?;
            if i.len() == 3 {
                // Reads the int8 surface as if its bytes were something else: wrong numbers.
                for s in o.iter_mut() {
                    s.bytes_mut().chunks_exact_mut(2).for_each(|b| b[0] ^= 0x40);
                }
            }
            Ok(())
        }
        fn unload(&self, p: ProgramId) {
            self.inner.unload(p)
        }
        fn counters(&self) -> ane_engine::EngineCounters {
            self.inner.counters()
        }
    }

    #[test]
    fn a_failure_names_its_step() {
        let refusing = Int8Refusing {
            inner: ReferenceEngine::new(Chip::M4.limits()),
            at_compile: true,
        };
        let c = int8_canary(&refusing);
        assert!(!c.ok && c.max_rel_err.is_infinite());
        assert_eq!(c.failed_step.as_deref(), Some("compile"));
        assert!(c.error.unwrap().contains("int8 input surfaces"));

        let garbling = Int8Refusing {
            inner: ReferenceEngine::new(Chip::M4.limits()),
            at_compile: false,
        };
        let c = int8_canary(&garbling);
        assert!(!c.ok && c.max_rel_err > CANARY_TOLERANCE, "{c:?}");
        assert_eq!(c.failed_step.as_deref(), Some("numerics"));
        assert_eq!(garbling.counters().loaded, 0);
    }

    /// A failure inside the engine's own step log is named by it: the reference engine's load
    /// refuses past its loaded-program budget.
    #[test]
    fn the_engines_step_log_names_the_call() {
        let e = ReferenceEngine::new(ane_engine::ChipLimits {
            max_loaded_programs: 0,
            ..Chip::M4.limits()
        });
        let c = int8_canary(&e);
        assert_eq!(c.failed_step.as_deref(), Some("compile: load"), "{c:?}");
    }

    #[test]
    fn int8_bytes_are_about_half_of_fp16() {
        let p = Planner::new(Chip::M4.limits());
        let b = Int8Bytes::of(&p, (4096, 4096, 512)).unwrap();
        assert_eq!(b.fp16, 4096 * 4096 * 2);
        assert_eq!((b.q, b.scales), (4096 * 4096, 4096 * 4096 / 16));
        // The weights dominate each request: the int8 surface is half the fp16 one.
        assert_eq!(b.int8_surface * 2, b.fp16_surface);
        assert!(int8_shape(&p, (100, 64, 64)).is_err(), "k not whole blocks");
    }
}
