//! Running the plugin's shape-shared program on an engine outside llama.cpp: what `ane bench`
//! times and what the plugin's start-up canary checks. The canary matters because the plugin
//! dispatches `tiled_matmul` (two inputs bound in alphabetical order, weights as an input), not
//! the baked conv the engine's own canary runs: an ANE that got the binding order or the
//! runtime-weight matmul wrong would otherwise give wrong numbers silently.

use std::time::Instant;

use super::{max_rel_err, test_values, MatmulRun, CANARY_TOLERANCE};
use ane_engine::reference::ReferenceEngine;
use ane_engine::surface::request_alloc_size;
use ane_engine::{Engine, EngineError, Surface};
use half::f16;

use crate::{Layout, Planner};

/// Compiles the plugin's shape-shared program for `m x k x n` (as the planner would tile it on this
/// engine's chip), evaluates it `reps` times with the weights as an input, and unloads it.
pub fn run_tiled(
    engine: &dyn Engine,
    (k, m, n): (usize, usize, usize),
    layout: Layout,
    w: &[f16],
    x: &[f16],
    reps: usize,
) -> Result<MatmulRun, EngineError> {
    let planner = Planner {
        layout,
        ..Planner::new(engine.limits())
    };
    run_planned(engine, &planner, (k, m, n), w, x, reps)
}

/// [`run_tiled`] with the tiling of a given planner (the canary narrows the axis limit to force
/// row tiles and contraction slices on small shapes).
///
/// # Errors
/// Whatever the engine returns, or `n` beyond one column bucket.
pub fn run_planned(
    engine: &dyn Engine,
    planner: &Planner,
    (k, m, n): (usize, usize, usize),
    w: &[f16],
    x: &[f16],
    reps: usize,
) -> Result<MatmulRun, EngineError> {
    let chunk = planner.col_chunks(n);
    if chunk.len() != 1 {
        return Err(EngineError::Compile(format!(
            "n = {n} is beyond one column bucket ({})",
            planner.max_cols()
        )));
    }
    let s = planner.tile(k, m, chunk[0].bucket);
    let t = Instant::now();
    let id = engine.compile(&ane_mil::text::emit(&ane_mil::build::tiled_matmul(s)), &[])?;
    let compile_ms = t.elapsed().as_secs_f64() * 1e3;
    let size = request_alloc_size(&[s.x_len() * 2, s.w_len() * 2, s.y_len() * 2]);
    // The engine's own surfaces, as the plugin uses them (bound directly on the ANE).
    let surfaces = (|| {
        Ok::<_, EngineError>((
            engine.new_surface(size)?,
            engine.new_surface(size)?,
            engine.new_surface(size)?,
        ))
    })();
    let (mut xs, mut ws, mut ys) = match surfaces {
        Ok(v) => v,
        Err(e) => {
            engine.unload(id);
            return Err(e);
        }
    };
    {
        // Weights: rows of K, cut into tiles of m_tile rows and slices of k_chunk, placed as the
        // layout wants them (rows, or transposed); engine memory is not cleared.
        let wh = ws.fp16_mut(s.w_len());
        wh.fill(f16::ZERO);
        for r in 0..m {
            let (tile, mi) = (r / s.m_tile, r % s.m_tile);
            for c in 0..s.k_chunks {
                let (lo, hi) = ((c * s.k_chunk).min(k), ((c + 1) * s.k_chunk).min(k));
                for kk in lo..hi {
                    wh[s.w_index(tile, c, mi, kk - lo)] = w[r * k + kk];
                }
            }
        }
    }
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
        let r = engine.evaluate(id, &[&xs, &ws], &mut [&mut ys]);
        if let Err(e) = r {
            engine.unload(id);
            return Err(e);
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

/// Result of [`tiled_canary`].
#[derive(Clone, Debug)]
pub struct TiledCanary {
    /// Within [`CANARY_TOLERANCE`] of the reference engine.
    pub ok: bool,
    /// Largest relative error against the reference engine.
    pub max_rel_err: f64,
}

/// Runs a small `tiled_matmul` (two row tiles and two K slices forced by a narrowed axis limit,
/// non-symmetric weights, distinct columns, so transposes, swapped inputs and wrong tiling all
/// show) on `engine` and on the reference engine, and compares.
///
/// # Errors
/// Whatever `engine` returns.
pub fn tiled_canary(engine: &dyn Engine, layout: Layout) -> Result<TiledCanary, EngineError> {
    let (k, m, n) = (96, 80, 64);
    let w = test_values(m * k, 11);
    let x = test_values(k * n, 12);
    // A 64 axis limit splits M = 80 into 2 row tiles and K = 96 into 2 slices.
    let planner = Planner {
        layout,
        ..Planner::new(ane_engine::ChipLimits {
            max_axis: 64,
            ..engine.limits()
        })
    };
    let got = run_planned(engine, &planner, (k, m, n), &w, &x, 1)?;
    let reference = ReferenceEngine::new(engine.limits());
    let want = run_planned(&reference, &planner, (k, m, n), &w, &x, 1)?;
    let err = max_rel_err(&got.y, &want.y);
    Ok(TiledCanary {
        ok: err <= CANARY_TOLERANCE,
        max_rel_err: err,
    })
}

/// Which memory the shape-shared program passed its canary with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Surfaces {
    /// The engine's own (IOSurfaces bound directly): the fast path.
    Own,
    /// Host memory, copied in and out per evaluation: the engine's own failed the canary.
    Host,
}

/// The shape-shared canary the plugin gates on, with the conservative fallback for the one part
/// no document settles: binding the engine's own surfaces directly. It runs [`tiled_canary`]
/// with the engine's own surfaces; if that fails or errs, it switches `engine` to host surfaces
/// (`Engine::use_own_surfaces(false)`, the copy path every direct-ANE project uses) and runs it
/// again. Returns the last canary, the surfaces it passed (or failed) with, and why the own
/// surfaces were given up, if they were.
///
/// # Errors
/// Whatever `engine` returns on the host-surface attempt.
pub fn shape_shared_canary(
    engine: &dyn Engine,
    layout: Layout,
) -> Result<(TiledCanary, Surfaces, Option<String>), EngineError> {
    let why = match tiled_canary(engine, layout) {
        Ok(c) if c.ok => return Ok((c, Surfaces::Own, None)),
        Ok(c) => format!("wrong numbers (max relative error {:.3e})", c.max_rel_err),
        Err(e) => e.to_string(),
    };
    engine.use_own_surfaces(false);
    match tiled_canary(engine, layout) {
        Ok(c) => Ok((c, Surfaces::Host, Some(why))),
        Err(e) => {
            engine.use_own_surfaces(true);
            Err(e)
        }
    }
}

/// Runs a pack of experts (`crate::moe`, `GGML_ANE_MOE=on`) on `engine` and on the reference
/// engine, and compares: the shape-shared program with a `heads` batch of 4 experts, each with
/// its own 16 activation columns (the small-row buckets MoE layers need), token-major. A device
/// that rejects this form still runs MoE one expert per dispatch; `ane doctor` says which.
///
/// # Errors
/// Whatever `engine` returns.
pub fn pack_canary(engine: &dyn Engine) -> Result<TiledCanary, EngineError> {
    let s = crate::TiledShape {
        heads: 4,
        tiles: 1,
        k_chunks: 1,
        m_tile: 64,
        k_chunk: 64,
        n: 16,
        layout: Layout::Tokens,
    };
    let w = test_values(s.w_len(), 15);
    let x = test_values(s.x_len(), 16);
    let mil = ane_mil::text::emit(&ane_mil::build::tiled_matmul(s));
    let size = request_alloc_size(&[s.x_len() * 2, s.w_len() * 2, s.y_len() * 2]);
    let run = |e: &dyn Engine| -> Result<Vec<f32>, EngineError> {
        let id = e.compile(&mil, &[])?;
        let (mut xs, mut ws, mut ys) = (
            e.new_surface(size)?,
            e.new_surface(size)?,
            e.new_surface(size)?,
        );
        xs.fp16_mut(s.x_len()).copy_from_slice(&x);
        ws.fp16_mut(s.w_len()).copy_from_slice(&w);
        let r = e.evaluate(id, &[&xs, &ws], &mut [&mut ys]);
        e.unload(id);
        r?;
        Ok(ys.fp16(s.y_len()).iter().map(|v| v.to_f32()).collect())
    };
    let got = run(engine)?;
    let want = run(&ReferenceEngine::new(engine.limits()))?;
    let err = max_rel_err(&got, &want);
    Ok(TiledCanary {
        ok: err <= CANARY_TOLERANCE,
        max_rel_err: err,
    })
}

/// Runs the baked compressed-weight form (`GGML_ANE_WEIGHTS=compressed`) for Q8_0 and Q4_0 blocks
/// on `engine` and on the reference engine, and compares: the constexpr route and the nibble
/// order are exactly what a wrong compiler or packing would get wrong.
///
/// # Errors
/// Whatever `engine` returns.
pub fn compressed_canary(engine: &dyn Engine) -> Result<TiledCanary, EngineError> {
    use ane_engine::surface::spatial_bucket;
    use ane_engine::WeightFile;
    use ane_mil::build::{conv_matmul_quant, weights_blob_quant, QuantKind, WEIGHT_PATH};
    let (k, m, n) = (64, 64, 64);
    let x = test_values(k * n, 13);
    let mut worst = 0f64;
    for kind in [QuantKind::Q8_0, QuantKind::Q4_0] {
        // Blocks of pseudo-random bytes with a sane fp16 scale (0.01) at the front of each.
        let nb = m * k / QuantKind::BLOCK;
        let mut raw: Vec<u8> = test_values(nb * kind.block_bytes(), 14)
            .iter()
            .map(|v| v.to_bits() as u8)
            .collect();
        for b in raw.chunks_exact_mut(kind.block_bytes()) {
            b[..2].copy_from_slice(&f16::from_f32(0.01).to_le_bytes());
        }
        let np = spatial_bucket(n);
        let mil = ane_mil::text::emit(&conv_matmul_quant(kind, k, m, np));
        let files = [WeightFile {
            path: WEIGHT_PATH.into(),
            bytes: weights_blob_quant(kind, &raw, m, k),
        }];
        let run = |e: &dyn Engine| -> Result<Vec<f32>, EngineError> {
            let id = e.compile(&mil, &files)?;
            let size = request_alloc_size(&[k * np * 2, m * np * 2]);
            let (mut xs, mut ys) = (Surface::new(size), Surface::new(size));
            let xh = xs.fp16_mut(k * np);
            for ki in 0..k {
                xh[ki * np..ki * np + n].copy_from_slice(&x[ki * n..(ki + 1) * n]);
            }
            let r = e.evaluate(id, &[&xs], &mut [&mut ys]);
            e.unload(id);
            r?;
            Ok(ys.fp16(m * np).iter().map(|v| v.to_f32()).collect())
        };
        let got = run(engine)?;
        let want = run(&ReferenceEngine::new(engine.limits()))?;
        worst = worst.max(max_rel_err(&got, &want));
    }
    Ok(TiledCanary {
        ok: worst <= CANARY_TOLERANCE,
        max_rel_err: worst,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ane_engine::{Chip, ProgramId, WeightFile};

    #[test]
    fn the_pack_canary_passes_on_the_reference_engine() {
        let e = ReferenceEngine::new(Chip::M4.limits());
        let c = pack_canary(&e).unwrap();
        assert!(c.ok && c.max_rel_err == 0.0, "{c:?}");
    }

    #[test]
    fn reference_passes_both_layouts() {
        let e = ReferenceEngine::new(Chip::M4.limits());
        for layout in [Layout::Channels, Layout::Tokens] {
            let r = tiled_canary(&e, layout).unwrap();
            assert!(
                r.ok && r.max_rel_err == 0.0,
                "{layout:?}: {}",
                r.max_rel_err
            );
        }
    }

    /// What a [`Faulty`] engine gets wrong.
    #[derive(Clone, Copy, PartialEq)]
    enum Fault {
        /// Binds the two inputs in declaration order reversed: a driver with the wrong binding
        /// order.
        SwapInputs,
        /// Negates every output: any wrong-numbers engine.
        Negate,
        /// Negates the outputs only when its own surfaces are bound: a broken direct binding
        /// (right numbers with host surfaces).
        NegateOwnSurfaces,
    }

    /// The reference engine with one [`Fault`].
    struct Faulty(ReferenceEngine, Fault);

    fn faulty(fault: Fault) -> Faulty {
        Faulty(ReferenceEngine::new(Chip::M4.limits()), fault)
    }

    impl Engine for Faulty {
        fn name(&self) -> &'static str {
            "faulty"
        }
        fn limits(&self) -> ane_engine::ChipLimits {
            self.0.limits()
        }
        fn new_surface(&self, bytes: usize) -> Result<Surface, EngineError> {
            self.0.new_surface(bytes)
        }
        fn use_own_surfaces(&self, on: bool) {
            self.0.use_own_surfaces(on)
        }
        fn compile(&self, mil: &str, w: &[WeightFile]) -> Result<ProgramId, EngineError> {
            self.0.compile(mil, w)
        }
        fn evaluate(
            &self,
            p: ProgramId,
            i: &[&Surface],
            o: &mut [&mut Surface],
        ) -> Result<(), EngineError> {
            let reversed: Vec<&Surface> = i.iter().rev().copied().collect();
            let bound = if self.1 == Fault::SwapInputs {
                &reversed
            } else {
                i
            };
            self.0.evaluate(p, bound, o)?;
            let negate = match self.1 {
                Fault::SwapInputs => false,
                Fault::Negate => true,
                Fault::NegateOwnSurfaces => i.iter().any(|s| s.engine_memory().is_some()),
            };
            if negate {
                for s in o.iter_mut() {
                    s.bytes_mut().chunks_exact_mut(2).for_each(|b| b[1] ^= 0x80);
                }
            }
            Ok(())
        }
        fn unload(&self, p: ProgramId) {
            self.0.unload(p)
        }
        fn counters(&self) -> ane_engine::EngineCounters {
            self.0.counters()
        }
    }

    #[test]
    fn reference_passes_the_compressed_canary() {
        let r = compressed_canary(&ReferenceEngine::new(Chip::M4.limits())).unwrap();
        assert!(r.ok && r.max_rel_err == 0.0, "{}", r.max_rel_err);
    }

    #[test]
    fn wrong_numbers_fail_the_compressed_canary() {
        let r = compressed_canary(&faulty(Fault::Negate)).unwrap();
        assert!(!r.ok, "negated outputs passed with error {}", r.max_rel_err);
    }

    #[test]
    fn a_broken_direct_binding_falls_back_to_host_surfaces() {
        let good = ReferenceEngine::new(Chip::M4.limits());
        let (c, s, why) = shape_shared_canary(&good, Layout::Tokens).unwrap();
        assert!(c.ok && s == Surfaces::Own && why.is_none());
        assert!(good.new_surface(1 << 16).unwrap().engine_memory().is_some());

        let broken = faulty(Fault::NegateOwnSurfaces);
        let (c, s, why) = shape_shared_canary(&broken, Layout::Tokens).unwrap();
        assert!(c.ok, "host surfaces pass: {}", c.max_rel_err);
        assert_eq!(s, Surfaces::Host);
        assert!(why.unwrap().contains("wrong numbers"));
        assert!(
            broken
                .new_surface(1 << 16)
                .unwrap()
                .engine_memory()
                .is_none(),
            "the engine now hands out host memory"
        );

        // Wrong with either memory: the canary fails.
        let bad = faulty(Fault::Negate);
        let (c, _, _) = shape_shared_canary(&bad, Layout::Tokens).unwrap();
        assert!(!c.ok);
    }

    #[test]
    fn swapped_inputs_fail_the_canary() {
        let e = faulty(Fault::SwapInputs);
        // All surfaces have one size, so the swap evaluates; only the numbers give it away.
        let r = tiled_canary(&e, Layout::Channels).expect("swapped inputs still evaluate");
        assert!(!r.ok, "wrong binding passed with error {}", r.max_rel_err);
    }
}
