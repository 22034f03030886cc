//! Reliability of the compute path (issue 6): every claimed MUL_MAT gives the right numbers when the
//! engine fails at random, when values leave the fp16 range, and when several threads compute
//! through one shared device state at once.

use std::sync::atomic::Ordering::Relaxed;

use ane_engine::reference::faults::FaultSpec;
use ane_engine::reference::ReferenceEngine;
use ane_engine::{Chip, Engine};
use ggml_ane::matmul::{compute, Group, KernelCache, Member, Operand};
use ggml_ane::test_util::{f32_desc, rand_vec, F32_INFO};

/// One device's shared state, as `DeviceState` holds it (the crate's test device).
type Device = ggml_ane::test_util::Device;

fn device(engine: ReferenceEngine, max_programs: usize) -> Device {
    Device::new(engine, KernelCache::new(max_programs))
}

fn reference() -> Device {
    device(ReferenceEngine::new(Chip::M4.limits()), 16)
}

/// `dst[n][m] = sum_k a[m][k] b[n][k]` through `compute`, one 2-D MUL_MAT.
fn mul_mat(
    dev: &Device,
    weights: bool,
    a: &[f32],
    b: &[f32],
    (k, m, n): (usize, usize, usize),
) -> Vec<f32> {
    let mut dst = vec![f32::NAN; m * n];
    let group = Group {
        src1: unsafe { Operand::of_f32(f32_desc([k as i64, n as i64, 1, 1]), b) },
        src1_info: F32_INFO,
        members: vec![Member {
            src0: unsafe { Operand::of_f32(f32_desc([k as i64, m as i64, 1, 1]), a) },
            src0_info: F32_INFO,
            dst: unsafe { Operand::of_f32_mut(f32_desc([m as i64, n as i64, 1, 1]), &mut dst) },
        }],
        weights,
        speculative: 0,
    };
    compute(&dev.cx(), &group);
    dst
}

fn oracle(a: &[f32], b: &[f32], k: usize, m: usize, n: usize) -> Vec<f64> {
    let mut out = vec![0.0; m * n];
    for j in 0..n {
        for i in 0..m {
            out[j * m + i] = (0..k)
                .map(|kk| a[i * k + kk] as f64 * b[j * k + kk] as f64)
                .sum();
        }
    }
    out
}

/// Tolerance of an engine result against the f64 oracle on the unrounded inputs: fp16 rounding of
/// the inputs alone moves a K=96 dot product of values in [-1, 1] by up to ~5e-3. A wrong row or
/// column is off by O(1).
const TOL: f64 = 1e-2;

/// Relative error within `tol` (fp16 rounding of inputs and outputs on the engine path).
fn assert_close(got: &[f32], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len());
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g as f64 - w).abs() <= tol * w.abs().max(1.0),
            "{what}: element {i}: got {g}, want {w}"
        );
    }
}

// ---------------------------------------------------------------- numeric guard

#[test]
fn src1_beyond_fp16_range_is_computed_on_the_cpu() {
    let dev = reference();
    let (k, m, n) = (64, 32, 16);
    let a = rand_vec(m * k, 1);
    let mut b = rand_vec(n * k, 2);
    b[5 * k + 3] = 70000.0; // converts to inf in fp16
    let got = mul_mat(&dev, true, &a, &b, (k, m, n));
    assert_close(&got, &oracle(&a, &b, k, m, n), 1e-5, "src1 overflow");
    assert!(got.iter().all(|v| v.is_finite()));
    assert!(dev.stats.guard_trips.load(Relaxed) >= 1);
    assert_eq!(dev.stats.ops_fallback.load(Relaxed), 1);
}

#[test]
fn non_staged_src0_beyond_fp16_range_is_computed_on_the_cpu() {
    let dev = reference();
    let (k, m, n) = (64, 32, 16);
    let mut a = rand_vec(m * k, 3);
    a[7] = -1.0e5;
    let b = rand_vec(n * k, 4);
    let got = mul_mat(&dev, false, &a, &b, (k, m, n));
    assert_close(&got, &oracle(&a, &b, k, m, n), 1e-5, "src0 overflow");
    assert!(dev.stats.guard_trips.load(Relaxed) >= 1);
}

#[test]
fn outputs_past_the_matmul_cliff_are_computed_on_the_cpu() {
    // Every input is exact in fp16, every dot product is 64 * 25 * 25 = 40000: finite in fp16, but
    // past the ANE's 32752 output cliff, which the reference engine reproduces.
    let dev = reference();
    let (k, m, n) = (64, 16, 8);
    let a = vec![25.0; m * k];
    let b = vec![25.0; n * k];
    let got = mul_mat(&dev, true, &a, &b, (k, m, n));
    assert!(got.iter().all(|&v| v == 40000.0), "{:?}", &got[..4]);
    assert_eq!(dev.stats.guard_trips.load(Relaxed), 1);
    // Just under the cliff, the engine's result is used.
    let b = vec![20.0; n * k]; // 32000
    let got = mul_mat(&dev, true, &a, &b, (k, m, n));
    assert!(got.iter().all(|&v| v == 32000.0));
    assert_eq!(dev.stats.guard_trips.load(Relaxed), 1);
    assert_eq!(dev.stats.ops_offloaded.load(Relaxed), 1);
}

// ---------------------------------------------------------------- faults

#[test]
fn every_result_is_right_under_injected_faults() {
    let spec: FaultSpec = "compile=0.3,load=0.1,eval=0.2,alloc=0.1,seed=11"
        .parse()
        .unwrap();
    let dev = device(ReferenceEngine::with_faults(Chip::M4.limits(), spec), 4);
    for (i, (k, m, n)) in [(64, 64, 8), (96, 40, 70), (128, 16, 3), (32, 200, 65)]
        .into_iter()
        .cycle()
        .take(40)
        .enumerate()
    {
        let a = rand_vec(m * k, 100 + i as u64);
        let b = rand_vec(n * k, 200 + i as u64);
        let got = mul_mat(&dev, i % 2 == 0, &a, &b, (k, m, n));
        assert_close(&got, &oracle(&a, &b, k, m, n), TOL, "under faults");
    }
    let s = &dev.stats;
    let injected = dev.engine.counters().faults_injected;
    assert!(injected > 0 && s.ops_fallback.load(Relaxed) > 0);
    assert_eq!(
        s.ops_fallback.load(Relaxed) + s.ops_offloaded.load(Relaxed),
        40
    );
}

// ---------------------------------------------------------------- concurrency

/// Several threads compute through one shared device state (engine, kernel cache, staged
/// weights, stats), as llama.cpp's `test-backend-ops -j` and parallel contexts do. Shapes repeat
/// across threads, so they share programs and staged weights; the cache holds fewer programs than
/// there are shapes, so threads also evict each other's programs.
#[test]
fn threads_share_one_device_state() {
    const THREADS: usize = 6;
    const ROUNDS: usize = 12;
    let shapes = [
        (64, 64, 8),
        (96, 40, 70),
        (128, 16, 3),
        (32, 200, 65),
        (256, 8, 1),
    ];
    // Shared weights per shape (staged once, read by every thread).
    let weights: Vec<Vec<f32>> = shapes
        .iter()
        .enumerate()
        .map(|(i, &(k, m, _))| rand_vec(m * k, i as u64))
        .collect();
    for faults in [
        None,
        Some("compile=0.2,load=0.1,eval=0.2,alloc=0.05,seed=5"),
    ] {
        let limits = Chip::M4.limits();
        let engine = match faults {
            Some(f) => ReferenceEngine::with_faults(limits, f.parse().unwrap()),
            None => ReferenceEngine::new(limits),
        };
        let dev = device(engine, 3);
        std::thread::scope(|scope| {
            for t in 0..THREADS {
                let (dev, weights, shapes) = (&dev, &weights, &shapes);
                scope.spawn(move || {
                    for r in 0..ROUNDS {
                        let i = (t + r) % shapes.len();
                        let (k, m, n) = shapes[i];
                        let b = rand_vec(n * k, (t * 1000 + r) as u64);
                        let staged = r % 3 != 0;
                        let got = mul_mat(dev, staged, &weights[i], &b, (k, m, n));
                        let want = oracle(&weights[i], &b, k, m, n);
                        assert_close(&got, &want, TOL, &format!("thread {t} round {r}"));
                    }
                });
            }
        });
        let s = &dev.stats;
        let ops = s.ops_fallback.load(Relaxed) + s.ops_offloaded.load(Relaxed);
        assert_eq!(ops, (THREADS * ROUNDS) as u64, "faults {faults:?}");
        let c = dev.engine.counters();
        assert!(c.loaded <= 3, "cache bound held: {c:?}");
        if faults.is_none() {
            assert_eq!(s.ops_fallback.load(Relaxed), 0);
        }
    }
}
