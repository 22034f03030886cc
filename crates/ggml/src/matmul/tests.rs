//! MUL_MAT semantics on host buffers through the reference engine: layouts, broadcasting, strides,
//! tiling, fusion, staging, shape-shared programs, and the fallback when the engine fails.

use super::*;
use crate::support::TensorDesc;
use crate::test_util::{f32_desc, rand_vec, Device, F32_INFO};
use ane_engine::reference::ReferenceEngine;
use ane_engine::{Chip, ChipLimits, EngineCounters, WeightFile};
use std::sync::atomic::Ordering::Relaxed;

/// dst[i3][i2][n][m] with ggml broadcasting, f64 accumulation.
fn oracle(a: &[f32], ad: &TensorDesc, b: &[f32], bd: &TensorDesc) -> Vec<f64> {
    let [k, m, ne02, ne03] = ad.ne.map(|v| v as usize);
    let [_, n, ne12, ne13] = bd.ne.map(|v| v as usize);
    let at = |i0: usize, i1: usize, i2: usize, i3: usize| a[(ad.offset(i0, i1, i2, i3)) / 4] as f64;
    let bt = |i0: usize, i1: usize, i2: usize, i3: usize| b[(bd.offset(i0, i1, i2, i3)) / 4] as f64;
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

struct Rig<E: Engine>(Device<E>);

impl<E: Engine> std::ops::Deref for Rig<E> {
    type Target = Device<E>;
    fn deref(&self) -> &Device<E> {
        &self.0
    }
}

impl<E: Engine> std::ops::DerefMut for Rig<E> {
    fn deref_mut(&mut self) -> &mut Device<E> {
        &mut self.0
    }
}

impl<E: Engine> Rig<E> {
    fn new(engine: E) -> Self {
        Rig(Device::new(engine, KernelCache::new(8)))
    }

    /// Computes every `(src0, desc)` against the shared src1 as one group; returns each dst.
    fn run(
        &self,
        weights: bool,
        srcs: &[(&[f32], TensorDesc)],
        b: &[f32],
        bd: TensorDesc,
    ) -> Vec<Vec<f32>> {
        let [_, n, ne12, ne13] = bd.ne;
        let mut dsts: Vec<Vec<f32>> = srcs
            .iter()
            .map(|(_, ad)| vec![f32::NAN; (ad.ne[1] * n * ne12 * ne13) as usize])
            .collect();
        let members = srcs
            .iter()
            .zip(dsts.iter_mut())
            .map(|((a, ad), d)| Member {
                src0: Operand::of_f32(*ad, a),
                src0_info: F32_INFO,
                dst: Operand::of_f32_mut(
                    TensorDesc::contiguous(GGML_TYPE_F32, 4, [ad.ne[1], n, ne12, ne13]),
                    d,
                ),
            })
            .collect();
        let group = Group {
            src1: Operand::of_f32(bd, b),
            src1_info: F32_INFO,
            members,
            weights,
            speculative: 0,
        };
        // SAFETY: every buffer matches its description and no dst overlaps a source.
        compute(&self.cx(), &group);
        dsts
    }
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
fn one_program_serves_every_weight_of_a_shape() {
    let rig = Rig::new(ReferenceEngine::new(Chip::M4.limits()));
    let (ad, bd) = (f32_desc([96, 80, 1, 1]), f32_desc([96, 70, 1, 1]));
    let b = rand_vec(96 * 70, 2);
    for seed in 0..3 {
        let a = rand_vec(96 * 80, 10 + seed);
        let got = rig.run(false, &[(&a, ad)], &b, bd);
        assert_close(&got[0], &oracle(&a, &ad, &b, &bd), 5e-3);
    }
    let c: EngineCounters = rig.engine.counters();
    assert_eq!(
        (c.compiles, c.evaluations),
        (1, 3),
        "weights are inputs: one program per shape"
    );
    assert_eq!(rig.stats.ops_offloaded.load(Relaxed), 3);
}

/// Activations, weights and outputs live in engine memory: nothing is copied per dispatch.
#[test]
fn dispatches_bind_engine_memory_without_copies() {
    let rig = Rig::new(ReferenceEngine::new(Chip::M4.limits()));
    let (ad, bd) = (f32_desc([96, 80, 1, 1]), f32_desc([96, 70, 1, 1]));
    let a = rand_vec(96 * 80, 21);
    for seed in 0..3 {
        let b = rand_vec(96 * 70, 30 + seed);
        let got = rig.run(true, &[(&a, ad)], &b, bd);
        assert_close(&got[0], &oracle(&a, &ad, &b, &bd), 5e-3);
    }
    // Per-call operands (attention-like, not weights) too.
    let b = rand_vec(96 * 70, 40);
    let got = rig.run(false, &[(&a, ad)], &b, bd);
    assert_close(&got[0], &oracle(&a, &ad, &b, &bd), 5e-3);
    let c = rig.engine.counters();
    assert_eq!(c.evaluations, 4);
    assert_eq!(c.bytes_copied, 0, "every surface is engine memory");
    // A host surface, by contrast, counts as copied.
    let size = ane_engine::surface::request_alloc_size(&[64 * 64 * 2]);
    let (x, w) = (Surface::new(size), Surface::new(size));
    let mut y = Surface::new(size);
    let shape = rig.planner.tile(64, 64, 64);
    let id = rig
        .cache
        .lock()
        .unwrap()
        .get_or_compile(&rig.engine, shape, &rig.stats)
        .unwrap();
    rig.engine.evaluate(id, &[&x, &w], &mut [&mut y]).unwrap();
    assert!(rig.engine.counters().bytes_copied > 0);
}

/// src1 stored permuted: logical [K=64, N=40, 6, 2] with N outermost in memory (6 x 2 batches
/// against 2 src0 matrices: r2 = 3, r3 = 2).
fn permuted_src1(seed: u64) -> (Vec<f32>, TensorDesc) {
    let (k, n, b2, b3) = (64usize, 40usize, 6usize, 2usize);
    let bd = TensorDesc {
        ty: GGML_TYPE_F32,
        ne: [k as i64, n as i64, b2 as i64, b3 as i64],
        nb: [4, 4 * k * b2 * b3, 4 * k, 4 * k * b2],
    };
    (rand_vec(k * n * b2 * b3, seed), bd)
}

#[test]
fn broadcast_and_permuted_operands() {
    let rig = Rig::new(ReferenceEngine::new(Chip::M4.limits()));
    // src0: 2 matrices [K=64, M=48]; src1: 6 x 2 batches, N=40 -> r2 = 3, r3 = 2 (ne03 = 1).
    let ad = f32_desc([64, 48, 2, 1]);
    let a = rand_vec(64 * 48 * 2, 4);
    let (b, bd) = permuted_src1(5);
    let got = rig.run(false, &[(&a, ad)], &b, bd);
    assert_close(&got[0], &oracle(&a, &ad, &b, &bd), 5e-3);
    assert_eq!(
        rig.engine.counters().evaluations,
        2,
        "one dispatch per src0 matrix"
    );
}

#[test]
fn rows_contraction_and_columns_beyond_the_axis_limit_are_tiled() {
    // An engine with a tiny axis limit: M = 300 -> 3 row tiles, K = 200 -> 2 slices summed on the
    // host, 300 columns -> chunks of at most 128.
    let rig = Rig::new(ReferenceEngine::new(ChipLimits {
        max_axis: 128,
        max_loaded_programs: 8,
    }));
    let (ad, bd) = (f32_desc([200, 300, 1, 1]), f32_desc([200, 300, 1, 1]));
    let (a, b) = (rand_vec(200 * 300, 6), rand_vec(200 * 300, 7));
    let got = rig.run(true, &[(&a, ad)], &b, bd);
    // Each K slice's partial is rounded to fp16 before the host adds them: one more rounding.
    assert_close(&got[0], &oracle(&a, &ad, &b, &bd), 1e-2);
    assert_eq!(
        rig.engine.counters().evaluations,
        3,
        "one dispatch per column chunk"
    );
    assert_eq!(rig.stats.ops_fallback.load(Relaxed), 0);
}

#[test]
fn fused_group_is_one_dispatch_per_chunk() {
    let rig = Rig::new(ReferenceEngine::new(Chip::M4.limits()));
    let (q, k, v) = (
        rand_vec(64 * 64, 1),
        rand_vec(64 * 32, 2),
        rand_vec(64 * 32, 3),
    );
    let (qd, kd, vd) = (
        f32_desc([64, 64, 1, 1]),
        f32_desc([64, 32, 1, 1]),
        f32_desc([64, 32, 1, 1]),
    );
    let bd = f32_desc([64, 100, 1, 1]);
    let x = rand_vec(64 * 100, 4);
    let got = rig.run(true, &[(&q, qd), (&k, kd), (&v, vd)], &x, bd);
    assert_close(&got[0], &oracle(&q, &qd, &x, &bd), 5e-3);
    assert_close(&got[1], &oracle(&k, &kd, &x, &bd), 5e-3);
    assert_close(&got[2], &oracle(&v, &vd, &x, &bd), 5e-3);
    assert_eq!(rig.engine.counters().evaluations, 1);
    assert_eq!(rig.stats.ops_fused.load(Relaxed), 3);
}

#[test]
fn weights_are_staged_once_and_changes_are_noticed() {
    let rig = Rig::new(ReferenceEngine::new(Chip::M4.limits()));
    let (ad, bd) = (f32_desc([64, 64, 1, 1]), f32_desc([64, 64, 1, 1]));
    let mut a = rand_vec(64 * 64, 8);
    let b = rand_vec(64 * 64, 9);
    rig.run(true, &[(&a, ad)], &b, bd);
    let staged = rig.staged.lock().unwrap().bytes();
    // One surface of the request size: at least the weights and the ANE's minimum surface.
    assert!(staged >= (64 * 64 * 2).max(ane_engine::surface::MIN_SURFACE_BYTES));
    rig.run(true, &[(&a, ad)], &b, bd);
    assert_eq!(
        rig.staged.lock().unwrap().bytes(),
        staged,
        "second call reuses the staged copy"
    );
    // A buffer reused for other weights at the same address: the fingerprint changes.
    a.iter_mut().for_each(|v| *v = -*v);
    let got = rig.run(true, &[(&a, ad)], &b, bd);
    assert_close(&got[0], &oracle(&a, &ad, &b, &bd), 5e-3);
}

#[test]
fn non_weight_dimensions_are_bucketed() {
    let rig = Rig::new(ReferenceEngine::new(Chip::M4.limits()));
    let bd = f32_desc([100, 64, 1, 1]);
    let b = rand_vec(100 * 64, 1);
    for m in [70, 90, 120] {
        let ad = f32_desc([100, m, 1, 1]);
        let a = rand_vec(100 * m as usize, m as u64);
        let got = rig.run(false, &[(&a, ad)], &b, bd);
        assert_close(&got[0], &oracle(&a, &ad, &b, &bd), 5e-3);
    }
    assert_eq!(
        rig.engine.counters().compiles,
        1,
        "M 70..120 and K 100 pad to one 128x128 shape"
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
    let rig = Rig::new(Broken);
    let (ad, a2d, bd) = (
        f32_desc([64, 72, 1, 1]),
        f32_desc([64, 8, 1, 1]),
        f32_desc([64, 65, 1, 1]),
    );
    let (a, a2, b) = (
        rand_vec(64 * 72, 8),
        rand_vec(64 * 8, 18),
        rand_vec(64 * 65, 9),
    );
    let got = rig.run(true, &[(&a, ad), (&a2, a2d)], &b, bd);
    assert!(got.iter().flatten().all(|v| v.is_finite()));
    assert_close(&got[0], &oracle(&a, &ad, &b, &bd), 1e-5);
    assert_close(&got[1], &oracle(&a2, &a2d, &b, &bd), 1e-5);
    assert_eq!(rig.stats.ops_fallback.load(Relaxed), 2);
    assert_eq!(rig.stats.ops_offloaded.load(Relaxed), 0);
}

#[test]
fn lru_keeps_loaded_programs_under_budget() {
    let mut rig = Rig::new(ReferenceEngine::new(Chip::M4.limits()));
    rig.cache = Mutex::new(KernelCache::new(2));
    let b = rand_vec(64 * 64, 10);
    for (i, m) in [64i64, 96, 160, 224, 288].into_iter().enumerate() {
        let ad = f32_desc([64, m, 1, 1]);
        let a = rand_vec(64 * m as usize, 100 + i as u64);
        let got = rig.run(true, &[(&a, ad)], &b, f32_desc([64, 64, 1, 1]));
        assert_close(
            &got[0],
            &oracle(&a, &ad, &b, &f32_desc([64, 64, 1, 1])),
            5e-3,
        );
    }
    let c = rig.engine.counters();
    assert_eq!(c.compiles, 5);
    assert_eq!(c.loaded_peak, 2);
    assert_eq!(c.loaded, 2);
}

#[test]
fn token_major_layout_gives_the_same_results() {
    use ane_plan::Layout;
    let mut rig = Rig::new(ReferenceEngine::new(ChipLimits {
        max_axis: 128,
        max_loaded_programs: 16,
    }));
    rig.planner.layout = Layout::Tokens;
    // Tiles (M 300 > 128), slices (K 200 > 128) and column chunks (300 > 128).
    let (ad, bd) = (f32_desc([200, 300, 1, 1]), f32_desc([200, 300, 1, 1]));
    let (a, b) = (rand_vec(200 * 300, 16), rand_vec(200 * 300, 17));
    let got = rig.run(true, &[(&a, ad)], &b, bd);
    assert_close(&got[0], &oracle(&a, &ad, &b, &bd), 1e-2);
    // A fused group whose members straddle a tile boundary (96 + 64 rows in 2 tiles of 96).
    let (q, kk) = (rand_vec(64 * 96, 18), rand_vec(64 * 64, 19));
    let (qd, kd, xd) = (
        f32_desc([64, 96, 1, 1]),
        f32_desc([64, 64, 1, 1]),
        f32_desc([64, 70, 1, 1]),
    );
    let x = rand_vec(64 * 70, 20);
    let got = rig.run(true, &[(&q, qd), (&kk, kd)], &x, xd);
    assert_close(&got[0], &oracle(&q, &qd, &x, &xd), 5e-3);
    assert_close(&got[1], &oracle(&kk, &kd, &x, &xd), 5e-3);
    // Broadcast with permuted src1 (the slow conversion path).
    let ad = f32_desc([64, 48, 2, 1]);
    let a = rand_vec(64 * 48 * 2, 21);
    let (b, bd) = permuted_src1(22);
    let got = rig.run(false, &[(&a, ad)], &b, bd);
    assert_close(&got[0], &oracle(&a, &ad, &b, &bd), 5e-3);
    assert_eq!(rig.stats.ops_fallback.load(Relaxed), 0);
}

/// The pool hands the same surfaces back in the same roles (the ANE caches a request per binding).
#[test]
fn scratch_pairs_keep_their_roles() {
    let engine = ReferenceEngine::new(Chip::M4.limits());
    let mut pool = ScratchPool::default();
    let size = ane_engine::surface::alloc_size(1 << 16);
    let base = |s: &Surface| s.engine_memory().map(|m| m.base().as_ptr() as usize);
    let (x, y) = pool.take_pair(&engine, size).unwrap();
    let (bx, by) = (base(&x), base(&y));
    assert!(bx.is_some() && bx != by, "engine memory, two surfaces");
    pool.give_pair(x, y);
    for _ in 0..3 {
        let (x, y) = pool.take_pair(&engine, size).unwrap();
        assert_eq!((base(&x), base(&y)), (bx, by));
        pool.give_pair(x, y);
    }
}

#[test]
fn partial_failures_recompute_the_failed_columns_only() {
    // Half the evaluations fail: each failed chunk is recomputed on the CPU, the rest comes from
    // the engine; broadcast (r2 = 2) and a permuted src1 exercise the per-run views.
    let faults = ane_engine::reference::faults::FaultSpec {
        eval: 0.5,
        seed: 7,
        ..Default::default()
    };
    let rig = Rig::new(ReferenceEngine::with_faults(Chip::M4.limits(), faults));
    let ad = f32_desc([64, 40, 2, 2]);
    let a = rand_vec(64 * 40 * 4, 31);
    let (b, bd) = permuted_src1(32);
    let got = rig.run(false, &[(&a, ad)], &b, bd);
    assert_close(&got[0], &oracle(&a, &ad, &b, &bd), 5e-3);
    let injected = rig.engine.counters().faults_injected;
    assert!(injected > 0, "some dispatch must fail");
    assert!(
        rig.stats.dispatches.load(Relaxed) > 0,
        "some dispatch must succeed"
    );
    assert_eq!(
        rig.stats.fallback_own.load(Relaxed),
        1,
        "one CPU pass per group"
    );
}

#[test]
fn fallback_views_cover_exactly_the_failed_columns() {
    let (w, x, d) = (
        f32_desc([8, 4, 2, 1]),
        f32_desc([8, 6, 4, 1]),
        f32_desc([4, 6, 4, 1]),
    );
    let buf = vec![0f32; 192];
    let base = buf.as_ptr() as usize;
    let op = |desc| Operand::of_f32(desc, &buf);
    let g = Group {
        src1: op(x),
        src1_info: F32_INFO,
        members: vec![Member {
            src0: op(w),
            src0_info: F32_INFO,
            dst: op(d),
        }],
        weights: false,
        speculative: 0,
    };
    let whole = cpu_views(&g, &[]);
    assert_eq!(whole.len(), 1);
    assert_eq!(whole[0].0.src1.desc, x, "all failed: the node itself");
    let part = Failed {
        i02: 1,
        i03: 0,
        cols: vec![(4, 2, 0), (5, 2, 0), (0, 3, 0), (1, 3, 0), (3, 3, 0)],
    };
    let v = cpu_views(&g, &[part]);
    let runs: Vec<(usize, usize, usize, i64)> = v
        .iter()
        .map(|(m, _)| {
            assert!(m.is_valid());
            (
                m.src0.addr() - base,
                m.src1.addr() - base,
                m.dst.addr() - base,
                m.src1.desc.ne[1],
            )
        })
        .collect();
    assert_eq!(
        runs,
        vec![
            (
                w.nb[2],
                4 * x.nb[1] + 2 * x.nb[2],
                4 * d.nb[1] + 2 * d.nb[2],
                2
            ),
            (w.nb[2], 3 * x.nb[2], 3 * d.nb[2], 2),
            (
                w.nb[2],
                3 * x.nb[1] + 3 * x.nb[2],
                3 * d.nb[1] + 3 * d.nb[2],
                1
            ),
        ]
    );
}

#[test]
fn a_device_that_gave_up_dispatches_nothing_and_stays_right() {
    let faults = ane_engine::reference::faults::FaultSpec {
        eval: 1.0,
        ..Default::default()
    };
    let mut rig = Rig::new(ReferenceEngine::with_faults(Chip::M4.limits(), faults));
    rig.health = crate::health::Health::new(2);
    let ad = f32_desc([64, 72, 1, 1]);
    let a = rand_vec(64 * 72, 41);
    let bd = f32_desc([64, 1100, 1, 1]);
    let b = rand_vec(64 * 1100, 42);
    let want = oracle(&a, &ad, &b, &bd);
    let got = rig.run(true, &[(&a, ad)], &b, bd);
    assert_close(&got[0], &want, 1e-5);
    assert!(rig.health.is_off(), "two failures in a row turn it off");
    assert_eq!(rig.stats.gave_up.load(Relaxed), 1);
    let tried = rig.engine.counters().faults_injected;
    for _ in 0..3 {
        let got = rig.run(true, &[(&a, ad)], &b, bd);
        assert_close(&got[0], &want, 1e-5);
    }
    assert_eq!(
        rig.engine.counters().faults_injected,
        tried,
        "no dispatch once the device gave up"
    );
    assert_eq!(rig.stats.ops_fallback.load(Relaxed), 4);
}

#[test]
fn a_shape_the_compiler_rejects_falls_back_without_turning_the_device_off() {
    let faults = ane_engine::reference::faults::FaultSpec {
        compile: 1.0,
        ..Default::default()
    };
    let mut rig = Rig::new(ReferenceEngine::with_faults(Chip::M4.limits(), faults));
    rig.health = crate::health::Health::new(2);
    let ad = f32_desc([64, 72, 1, 1]);
    let a = rand_vec(64 * 72, 43);
    let bd = f32_desc([64, 512, 1, 1]);
    let b = rand_vec(64 * 512, 44);
    let want = oracle(&a, &ad, &b, &bd);
    for _ in 0..5 {
        let got = rig.run(true, &[(&a, ad)], &b, bd);
        assert_close(&got[0], &want, 1e-5);
    }
    assert_eq!(
        rig.engine.counters().faults_injected,
        1,
        "the rejected shape is compiled once, its later dispatches go straight to the CPU"
    );
    assert!(
        !rig.health.is_off(),
        "repeats of a remembered compile failure are not new device failures"
    );
    assert!(
        rig.health.is_rejected(&crate::health::OpKey::of(&ad, &bd)),
        "an op that failed for good is declined from then on"
    );
    assert_eq!(rig.stats.ops_fallback.load(Relaxed), 5);
}

#[test]
fn an_objective_c_exception_is_an_engine_error_and_a_fallback() {
    // The ANE driver catches exceptions thrown by private classes (`apple/client.rs`, `guarded`);
    // the reference engine throws the same error on purpose. The op must still be right.
    let faults = ane_engine::reference::faults::FaultSpec {
        exception: 1.0,
        ..Default::default()
    };
    let rig = Rig::new(ReferenceEngine::with_faults(Chip::M4.limits(), faults));
    let ad = f32_desc([64, 72, 1, 1]);
    let a = rand_vec(64 * 72, 45);
    let bd = f32_desc([64, 256, 1, 1]);
    let b = rand_vec(64 * 256, 46);
    let want = oracle(&a, &ad, &b, &bd);
    let got = rig.run(true, &[(&a, ad)], &b, bd);
    assert_close(&got[0], &want, 1e-5);
    assert!(rig.engine.counters().exceptions >= 1, "counted");
    assert_eq!(rig.stats.ops_fallback.load(Relaxed), 1);
    assert_eq!(rig.stats.ops_offloaded.load(Relaxed), 0);
}

#[test]
fn past_the_compile_cap_ops_fall_back_and_the_framework_is_not_asked() {
    let rig = Rig::new(ReferenceEngine::new(Chip::M4.limits()).with_compile_cap(1));
    let cases = [(64usize, 72usize, 256usize, 47u64), (128, 80, 256, 48)];
    // The first runs on the engine (fp16 inputs), the second on the CPU (exact).
    for ((k, m, n, seed), tol) in cases.into_iter().zip([1e-2, 1e-5]) {
        let ad = f32_desc([k as i64, m as i64, 1, 1]);
        let a = rand_vec(k * m, seed);
        let bd = f32_desc([k as i64, n as i64, 1, 1]);
        let b = rand_vec(k * n, seed + 100);
        let want = oracle(&a, &ad, &b, &bd);
        let got = rig.run(true, &[(&a, ad)], &b, bd);
        assert_close(&got[0], &want, tol);
    }
    let c = rig.engine.counters();
    assert_eq!(
        c.compile_attempts, 1,
        "the second shape was refused before compiling"
    );
    assert_eq!(c.compiles, 1);
    assert_eq!(rig.stats.ops_offloaded.load(Relaxed), 1);
    assert_eq!(rig.stats.ops_fallback.load(Relaxed), 1);
}
