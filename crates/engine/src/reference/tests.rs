//! Reference-engine tests: numerics against an f64 oracle, and every ANE rule it enforces.

use super::*;
use crate::surface::{alloc_size, request_alloc_size, MIN_SURFACE_BYTES};
use crate::Chip;
use ane_mil::build::{conv_matmul, dyn_matmul, weights_blob_fp16, WEIGHT_PATH};
use half::f16;

fn engine() -> ReferenceEngine {
    ReferenceEngine::new(Chip::M4.limits())
}

/// Deterministic values in [-1, 1) that differ per index, so transposes and swaps show.
fn values(n: usize, seed: u64) -> Vec<f16> {
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

/// out[m][n] = sum_k w[m][k] x[k][n], in f64.
fn oracle(w: &[f16], x: &[f16], k: usize, m: usize, n: usize) -> Vec<f64> {
    let mut out = vec![0.0; m * n];
    for mi in 0..m {
        for ni in 0..n {
            out[mi * n + ni] = (0..k)
                .map(|ki| w[mi * k + ki].to_f64() * x[ki * n + ni].to_f64())
                .sum();
        }
    }
    out
}

fn assert_close(got: &[f16], want: &[f64]) {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let g = g.to_f64();
        assert!(
            (g - w).abs() <= 1e-3 * w.abs().max(1.0),
            "element {i}: got {g}, want {w}"
        );
    }
}

#[test]
fn conv_matmul_matches_oracle() {
    let (k, m, n) = (96, 80, 64);
    let e = engine();
    let w = values(m * k, 1);
    let x = values(k * n, 2);
    let mil = ane_mil::text::emit(&conv_matmul(k, m, n));
    let id = e
        .compile(
            &mil,
            &[WeightFile {
                path: WEIGHT_PATH.into(),
                bytes: weights_blob_fp16(&w),
            }],
        )
        .unwrap();
    let size = request_alloc_size(&[k * n * 2, m * n * 2]);
    let mut xs = Surface::new(size);
    xs.fp16_mut(k * n).copy_from_slice(&x);
    let mut ys = Surface::new(size);
    e.evaluate(id, &[&xs], &mut [&mut ys]).unwrap();
    assert_close(ys.fp16(m * n), &oracle(&w, &x, k, m, n));
    let c = e.counters();
    assert_eq!((c.compiles, c.loads, c.evaluations, c.loaded), (1, 1, 1, 1));
    e.unload(id);
    assert_eq!(e.counters().loaded, 0);
    assert!(matches!(
        e.evaluate(id, &[&xs], &mut [&mut ys]),
        Err(EngineError::UnknownProgram(_))
    ));
}

#[test]
fn dyn_matmul_binds_inputs_alphabetically() {
    let (k, m, n) = (64, 64, 64);
    let e = engine();
    let id = e
        .compile(&ane_mil::text::emit(&dyn_matmul(k, m, n)), &[])
        .unwrap();
    let w = values(m * k, 3);
    let x = values(k * n, 4);
    let size = request_alloc_size(&[k * n * 2, m * k * 2, m * n * 2]);
    let (mut a, mut b, mut y) = (Surface::new(size), Surface::new(size), Surface::new(size));
    a.fp16_mut(k * n).copy_from_slice(&x); // a_x
    b.fp16_mut(m * k).copy_from_slice(&w); // b_w
    e.evaluate(id, &[&a, &b], &mut [&mut y]).unwrap();
    assert_close(y.fp16(m * n), &oracle(&w, &x, k, m, n));
    // Swapped surfaces bind to the wrong parameters: the result must differ (silently, as on the chip).
    let mut y2 = Surface::new(size);
    e.evaluate(id, &[&b, &a], &mut [&mut y2]).unwrap();
    assert_ne!(y.fp16(m * n), y2.fp16(m * n));
}

#[test]
fn surface_rules_are_enforced() {
    let (k, m, n) = (64, 64, 64);
    let e = engine();
    let id = e
        .compile(&ane_mil::text::emit(&dyn_matmul(k, m, n)), &[])
        .unwrap();
    let size = alloc_size(k * n * 2);
    let a = Surface::new(size);
    let b = Surface::new(size + 128);
    let mut y = Surface::new(size);
    let err = e.evaluate(id, &[&a, &b], &mut [&mut y]).unwrap_err();
    assert!(
        matches!(err, EngineError::Surface(ref m) if m.contains("equal")),
        "{err}"
    );
    let small = Surface::new(MIN_SURFACE_BYTES - 128);
    let mut ys = Surface::new(MIN_SURFACE_BYTES - 128);
    let err = e
        .evaluate(id, &[&small, &small], &mut [&mut ys])
        .unwrap_err();
    assert!(matches!(err, EngineError::Surface(_)), "{err}");
    let err = e.evaluate(id, &[&a], &mut [&mut y]).unwrap_err();
    assert!(
        matches!(err, EngineError::Surface(ref m) if m.contains("inputs")),
        "{err}"
    );
}

#[test]
fn axis_limit_depends_on_chip() {
    let mil = ane_mil::text::emit(&dyn_matmul(64, 16385, 64));
    let m1 = ReferenceEngine::new(Chip::M1.limits());
    let err = m1.compile(&mil, &[]).unwrap_err();
    assert!(
        matches!(err, EngineError::Compile(ref m) if m.contains("16384")),
        "{err}"
    );
    assert!(engine().compile(&mil, &[]).is_ok());
}

#[test]
fn loaded_program_budget() {
    let e = ReferenceEngine::new(ChipLimits {
        max_axis: 65536,
        max_loaded_programs: 2,
    });
    let mil = ane_mil::text::emit(&dyn_matmul(64, 64, 64));
    let a = e.compile(&mil, &[]).unwrap();
    let _b = e.compile(&mil, &[]).unwrap();
    assert!(matches!(
        e.compile(&mil, &[]),
        Err(EngineError::Budget { loaded: 2, max: 2 })
    ));
    e.unload(a);
    assert!(e.compile(&mil, &[]).is_ok());
    assert_eq!(e.counters().loaded_peak, 2);
}

#[test]
fn weight_file_errors_name_the_problem() {
    let (k, m, n) = (64, 64, 64);
    let e = engine();
    let mil = ane_mil::text::emit(&conv_matmul(k, m, n));
    let err = e.compile(&mil, &[]).unwrap_err();
    assert!(
        matches!(err, EngineError::Weights(ref s) if s.contains("no weight file")),
        "{err}"
    );
    let short = weights_blob_fp16(&values(m * k - 1, 5));
    let err = e
        .compile(
            &mil,
            &[WeightFile {
                path: WEIGHT_PATH.into(),
                bytes: short,
            }],
        )
        .unwrap_err();
    assert!(matches!(err, EngineError::Weights(_)), "{err}");
    let mut bad = weights_blob_fp16(&values(m * k, 5));
    bad[64] ^= 0xff; // sentinel
    let err = e
        .compile(
            &mil,
            &[WeightFile {
                path: WEIGHT_PATH.into(),
                bytes: bad,
            }],
        )
        .unwrap_err();
    assert!(matches!(err, EngineError::Weights(_)), "{err}");
}

#[test]
fn rejects_unknown_ops_and_bad_text() {
    let e = engine();
    assert!(matches!(
        e.compile("program(1.3) nonsense", &[]),
        Err(EngineError::Parse(_))
    ));
    let mil = ane_mil::text::emit(&dyn_matmul(64, 64, 64)).replace("reshape(", "softplus(");
    let err = e.compile(&mil, &[]).unwrap_err();
    assert!(
        matches!(err, EngineError::Compile(_) | EngineError::Parse(_)),
        "{err}"
    );
}

#[test]
fn driver_plan_rules_fail_on_the_reference_engine() {
    let e = engine();
    // Row rule: 40 fp16 columns are 80-byte rows.
    let err = e
        .compile(&ane_mil::text::emit(&dyn_matmul(64, 64, 40)), &[])
        .unwrap_err();
    assert!(
        matches!(err, EngineError::Compile(ref m) if m.contains("row rule")),
        "{err}"
    );
    // A BLOBFILE escaping the model directory.
    let mil = ane_mil::text::emit(&conv_matmul(64, 64, 64))
        .replace(WEIGHT_PATH, "@model_path/../weight.bin");
    let err = e
        .compile(
            &mil,
            &[WeightFile {
                path: "@model_path/../weight.bin".into(),
                bytes: weights_blob_fp16(&values(64 * 64, 1)),
            }],
        )
        .unwrap_err();
    assert!(
        matches!(err, EngineError::Weights(ref m) if m.contains("..")),
        "{err}"
    );
}
