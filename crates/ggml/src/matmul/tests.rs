//! MUL_MAT semantics on host buffers through the reference engine: layouts, broadcasting, strides,
//! caching, and the fallback when the engine fails.

use super::*;
use crate::support::TensorDesc;
use ane_engine::reference::ReferenceEngine;
use ane_engine::{Chip, ChipLimits, EngineCounters};

const F32_INFO: TypeInfo = TypeInfo {
    blck_size: 1,
    type_size: 4,
    to_float: None,
};

fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed ^ 0x9e3779b97f4a7c15;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32
        })
        .collect()
}

/// dst[i3][i2][n][m] with ggml broadcasting, f64 accumulation.
fn oracle(a: &[f32], ad: &TensorDesc, b: &[f32], bd: &TensorDesc) -> Vec<f64> {
    let [k, m, ne02, ne03] = ad.ne.map(|v| v as usize);
    let [_, n, ne12, ne13] = bd.ne.map(|v| v as usize);
    let at = |i0: usize, i1: usize, i2: usize, i3: usize| {
        a[(i0 * ad.nb[0] + i1 * ad.nb[1] + i2 * ad.nb[2] + i3 * ad.nb[3]) / 4] as f64
    };
    let bt = |i0: usize, i1: usize, i2: usize, i3: usize| {
        b[(i0 * bd.nb[0] + i1 * bd.nb[1] + i2 * bd.nb[2] + i3 * bd.nb[3]) / 4] as f64
    };
    let mut out = vec![0.0; m * n * ne12 * ne13];
    for i3 in 0..ne13 {
        for i2 in 0..ne12 {
            for j in 0..n {
                for i in 0..m {
                    out[((i3 * ne12 + i2) * n + j) * m + i] = (0..k)
                        .map(|kk| {
                            at(kk, i, i2 / (ne12 / ne02), i3 / (ne13 / ne03)) * bt(kk, j, i2, i3)
                        })
                        .sum();
                }
            }
        }
    }
    out
}

fn run(
    engine: &dyn Engine,
    cache: &Mutex<KernelCache>,
    stats: &Stats,
    a: &[f32],
    ad: TensorDesc,
    b: &[f32],
    bd: TensorDesc,
) -> Vec<f32> {
    let [_, m, _, _] = ad.ne;
    let [_, n, ne12, ne13] = bd.ne;
    let dd = TensorDesc::contiguous(GGML_TYPE_F32, 4, [m, n, ne12, ne13]);
    let mut dst = vec![f32::NAN; (m * n * ne12 * ne13) as usize];
    // SAFETY: all three buffers match their descriptions and do not overlap.
    unsafe {
        compute(
            engine,
            cache,
            stats,
            Operand {
                desc: ad,
                data: a.as_ptr().cast(),
            },
            F32_INFO,
            Operand {
                desc: bd,
                data: b.as_ptr().cast(),
            },
            F32_INFO,
            Operand {
                desc: dd,
                data: dst.as_mut_ptr().cast(),
            },
        )
    };
    dst
}

fn assert_close(got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len());
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g as f64 - w).abs() <= tol * w.abs().max(1.0),
            "element {i}: got {g}, want {w}"
        );
    }
}

#[test]
fn plain_2d_matches_oracle_and_caches_program() {
    let e = ReferenceEngine::new(Chip::M4.limits());
    let cache = Mutex::new(KernelCache::new(8));
    let stats = Stats::default();
    let ad = TensorDesc::contiguous(GGML_TYPE_F32, 4, [96, 80, 1, 1]);
    let bd = TensorDesc::contiguous(GGML_TYPE_F32, 4, [96, 70, 1, 1]);
    let (a, b) = (rand_vec(96 * 80, 1), rand_vec(96 * 70, 2));
    let want = oracle(&a, &ad, &b, &bd);
    assert_close(&run(&e, &cache, &stats, &a, ad, &b, bd), &want, 5e-3);
    assert_close(&run(&e, &cache, &stats, &a, ad, &b, bd), &want, 5e-3);
    let c: EngineCounters = e.counters();
    assert_eq!(
        (c.compiles, c.evaluations),
        (1, 2),
        "second call must reuse the program"
    );
    assert_eq!(
        stats
            .ops_offloaded
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
    // Same shape, different weights: a different program, never a stale one.
    let a2 = rand_vec(96 * 80, 3);
    assert_close(
        &run(&e, &cache, &stats, &a2, ad, &b, bd),
        &oracle(&a2, &ad, &b, &bd),
        5e-3,
    );
    assert_eq!(e.counters().compiles, 2);
}

#[test]
fn broadcast_and_permuted_operands() {
    let e = ReferenceEngine::new(Chip::M4.limits());
    let cache = Mutex::new(KernelCache::new(8));
    let stats = Stats::default();
    // src0: 2 matrices [K=64, M=48]; src1: 6 x 2 batches, N=40 -> r2 = 3, r3 = 2 (ne03 = 1).
    let ad = TensorDesc::contiguous(GGML_TYPE_F32, 4, [64, 48, 2, 1]);
    let a = rand_vec(64 * 48 * 2, 4);
    // src1 stored permuted: logical [K=64, N=40, 6, 2] with N outermost in memory.
    let (k, n, b2, b3) = (64usize, 40usize, 6usize, 2usize);
    let nb = [4, 4 * k * b2 * b3, 4 * k, 4 * k * b2];
    let bd = TensorDesc {
        ty: GGML_TYPE_F32,
        ne: [k as i64, n as i64, b2 as i64, b3 as i64],
        nb,
    };
    let b = rand_vec(k * n * b2 * b3, 5);
    let want = oracle(&a, &ad, &b, &bd);
    assert_close(&run(&e, &cache, &stats, &a, ad, &b, bd), &want, 5e-3);
    assert_eq!(e.counters().evaluations, 2, "one dispatch per src0 matrix");
}

#[test]
fn column_chunks_respect_axis_limit() {
    // An engine with a tiny axis limit forces several dispatches for the columns.
    let e = ReferenceEngine::new(ChipLimits {
        max_axis: 128,
        max_loaded_programs: 8,
    });
    let cache = Mutex::new(KernelCache::new(8));
    let stats = Stats::default();
    let ad = TensorDesc::contiguous(GGML_TYPE_F32, 4, [64, 64, 1, 1]);
    let bd = TensorDesc::contiguous(GGML_TYPE_F32, 4, [64, 300, 1, 1]);
    let (a, b) = (rand_vec(64 * 64, 6), rand_vec(64 * 300, 7));
    assert_close(
        &run(&e, &cache, &stats, &a, ad, &b, bd),
        &oracle(&a, &ad, &b, &bd),
        5e-3,
    );
    assert_eq!(e.counters().evaluations, 3);
    assert_eq!(
        stats
            .ops_fallback
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

/// An engine whose every call fails, like an ANE past its compile budget.
struct Broken;
impl Engine for Broken {
    fn name(&self) -> &'static str {
        "broken"
    }
    fn limits(&self) -> ChipLimits {
        Chip::M4.limits()
    }
    fn compile(&self, _: &str, _: &[WeightFile]) -> Result<ProgramId, EngineError> {
        Err(EngineError::Compile("injected".into()))
    }
    fn evaluate(
        &self,
        _: ProgramId,
        _: &[&Surface],
        _: &mut [&mut Surface],
    ) -> Result<(), EngineError> {
        Err(EngineError::Eval("injected".into()))
    }
    fn unload(&self, _: ProgramId) {}
    fn counters(&self) -> EngineCounters {
        EngineCounters::default()
    }
}

#[test]
fn engine_failure_falls_back_and_writes_every_output() {
    let cache = Mutex::new(KernelCache::new(8));
    let stats = Stats::default();
    let ad = TensorDesc::contiguous(GGML_TYPE_F32, 4, [64, 72, 1, 1]);
    let bd = TensorDesc::contiguous(GGML_TYPE_F32, 4, [64, 65, 1, 1]);
    let (a, b) = (rand_vec(64 * 72, 8), rand_vec(64 * 65, 9));
    let got = run(&Broken, &cache, &stats, &a, ad, &b, bd);
    assert!(got.iter().all(|v| v.is_finite()));
    assert_close(&got, &oracle(&a, &ad, &b, &bd), 1e-5);
    assert_eq!(
        stats
            .ops_fallback
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert_eq!(
        stats
            .ops_offloaded
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

#[test]
fn lru_keeps_loaded_programs_under_budget() {
    let e = ReferenceEngine::new(Chip::M4.limits());
    let cache = Mutex::new(KernelCache::new(2));
    let stats = Stats::default();
    let ad = TensorDesc::contiguous(GGML_TYPE_F32, 4, [64, 64, 1, 1]);
    let bd = TensorDesc::contiguous(GGML_TYPE_F32, 4, [64, 64, 1, 1]);
    let b = rand_vec(64 * 64, 10);
    for seed in 0..5 {
        let a = rand_vec(64 * 64, 100 + seed);
        assert_close(
            &run(&e, &cache, &stats, &a, ad, &b, bd),
            &oracle(&a, &ad, &b, &bd),
            5e-3,
        );
    }
    let c = e.counters();
    assert_eq!(c.compiles, 5);
    assert_eq!(c.loaded_peak, 2);
    assert_eq!(c.loaded, 2);
}
