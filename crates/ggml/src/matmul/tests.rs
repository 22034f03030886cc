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
        self.run_with(None, weights, srcs, b, bd)
    }

    /// As [`Rig::run`], streaming through `stream` what does not stay resident.
    fn run_with(
        &self,
        stream: Option<&Streamer>,
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
                src0: unsafe { Operand::of_f32(*ad, a) },
                src0_info: F32_INFO,
                dst: unsafe {
                    Operand::of_f32_mut(
                        TensorDesc::contiguous(GGML_TYPE_F32, 4, [ad.ne[1], n, ne12, ne13]),
                        d,
                    )
                },
            })
            .collect();
        let group = Group {
            src1: unsafe { Operand::of_f32(bd, b) },
            src1_info: F32_INFO,
            members,
            weights,
            speculative: 0,
        };
        compute(
            &Context {
                stream,
                ..self.cx()
            },
            &group,
        );
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

/// An engine whose every call fails, like an ANE past its compile budget; its surfaces take
/// `stall` to make (a stuck conversion thread, [`Broken::stalled`]).
#[derive(Default)]
struct Broken {
    stall: std::time::Duration,
}

impl Broken {
    fn stalled(stall: std::time::Duration) -> Broken {
        Broken { stall }
    }
}

impl Engine for Broken {
    fn new_surface(&self, bytes: usize) -> Result<Surface, EngineError> {
        std::thread::sleep(self.stall);
        Ok(Surface::new(bytes))
    }
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

mod failures;
mod int8;

/// Five 64x64 weights, a budget of four of their surfaces, and a streamer over `ring_engine`:
/// two stay resident, three stream. Runs `passes` passes over them (each weight against its own
/// activations, like a model's layers) and returns every output of every pass, the rig and the
/// streamer.
fn streamed_passes(
    ring_engine: Arc<dyn Engine>,
    max_wait: Option<std::time::Duration>,
    passes: usize,
) -> (Vec<Vec<f32>>, Rig<ReferenceEngine>, Streamer) {
    let ad = f32_desc([64, 64, 1, 1]);
    let bd = f32_desc([64, 40, 1, 1]);
    let weights: Vec<Vec<f32>> = (0..5).map(|i| rand_vec(64 * 64, 30 + i)).collect();
    let acts: Vec<Vec<f32>> = (0..5).map(|i| rand_vec(64 * 40, 40 + i)).collect();
    // One group's surface.
    let one = {
        let rig = Rig::new(ReferenceEngine::new(Chip::M4.limits()));
        rig.run(true, &[(&weights[0], ad)], &acts[0], bd);
        let bytes = rig.staged.lock().unwrap().bytes();
        bytes
    };
    let rig = Rig::new(ReferenceEngine::new(Chip::M4.limits()));
    rig.staged.lock().unwrap().max_bytes = 4 * one;
    let ring = rig.staged.lock().unwrap().ring.clone();
    let stream = Streamer::new(ring_engine, ring, true);
    let stream = match max_wait {
        Some(d) => stream.with_max_wait(d),
        None => stream,
    };
    let mut outs = Vec::new();
    for _ in 0..passes {
        for (w, a) in weights.iter().zip(&acts) {
            let got = rig.run_with(Some(&stream), true, &[(w, ad)], a, bd);
            assert_close(&got[0], &oracle(w, &ad, a, &bd), 5e-3);
            outs.push(got.into_iter().next().unwrap());
        }
    }
    let s = rig.staged.lock().unwrap();
    assert!(
        s.peak_bytes <= s.max_bytes,
        "peak {} over the budget {}",
        s.peak_bytes,
        s.max_bytes
    );
    assert_eq!(s.bytes(), 2 * one, "the first two stay resident");
    drop(s);
    (outs, rig, stream)
}

#[test]
fn streamed_groups_are_converted_ahead_once_their_order_is_learnt() {
    let engine = Arc::new(ReferenceEngine::new(Chip::M4.limits()));
    let (outs, rig, stream) = streamed_passes(engine, None, 4);
    // Pass 1 admits four and then makes room for a ring (the fifth streams); pass 2 learns the
    // order of the three streamed groups (one of them already predicted); passes 3 and 4 find
    // all three converted ahead.
    assert_eq!(rig.stats.stream_ahead.load(Relaxed), 1 + 3 + 3);
    // Same weights, same activations: every pass writes the same bits as the first.
    for pass in outs.chunks(5).skip(1) {
        assert_eq!(pass, &outs[..5]);
    }
    let ring = rig.staged.lock().unwrap().ring.clone();
    assert!(
        ring.load(Relaxed) > 0,
        "the current group and the next are held"
    );
    drop(stream);
    assert_eq!(
        ring.load(Relaxed),
        0,
        "a freed instance gives its ring back"
    );
}

#[test]
fn a_failing_background_conversion_is_done_by_the_dispatch() {
    // Every surface the background thread asks for fails; the dispatch converts instead.
    let faults = ane_engine::reference::faults::FaultSpec {
        alloc: 1.0,
        ..Default::default()
    };
    let failing = ReferenceEngine::with_faults(Chip::M4.limits(), faults);
    let (outs, rig, _stream) = streamed_passes(Arc::new(failing), None, 3);
    assert_eq!(rig.stats.stream_ahead.load(Relaxed), 0);
    assert_eq!(
        rig.stats.ops_fallback.load(Relaxed),
        0,
        "no CPU fallback needed"
    );
    assert_eq!(&outs[5..10], &outs[..5]);
}

#[test]
fn an_expert_pack_converted_ahead_gives_the_pack_its_bits() {
    let (k, m, heads) = (64usize, 64usize, 4usize);
    let bucket = ane_plan::moe::PACK_BUCKETS[0];
    let experts = rand_vec(k * m * heads, 50);
    let x = rand_vec(heads * bucket * k, 51);
    let ed = f32_desc([k as i64, (heads * m) as i64, 1, 1]);
    // SAFETY: `experts` outlives every use of the view.
    let view = unsafe { Operand::of_f32(ed, &experts) };
    let run = |rig: &Rig<ReferenceEngine>, ahead: Option<PackAhead>| {
        let mut y = vec![f32::NAN; heads * bucket * m];
        let mut p = Pack {
            experts: view,
            info: F32_INFO,
            heads,
            m,
            bucket,
            x: &x,
            f32_info: F32_INFO,
            y: &mut y,
            weights: true,
        };
        compute_pack(&rig.cx(), &mut p, ahead).unwrap();
        y
    };
    // A budget of nothing: the pack streams, converted by its dispatch or ahead.
    let rig = Rig::new(ReferenceEngine::new(Chip::M4.limits()));
    rig.staged.lock().unwrap().max_bytes = 0;
    let inline = run(&rig, None);
    assert!(!pack_resident(&rig.cx(), view, F32_INFO, heads, m, bucket));
    let ahead = convert_pack_ahead(&rig.cx(), view, F32_INFO, heads, m, bucket)
        .expect("beyond the budget: converted for the pack");
    let ring = rig.staged.lock().unwrap().ring.clone();
    assert!(
        ring.load(Relaxed) > 0,
        "the converted pack counts until it is done"
    );
    assert_eq!(run(&rig, Some(ahead)), inline);
    assert_eq!(ring.load(Relaxed), 0);
    assert_eq!(rig.stats.stream_ahead.load(Relaxed), 1);
    assert_eq!(rig.staged.lock().unwrap().bytes(), 0);
    // Room for it: staged resident by the same call, which the pack then finds.
    let rig = Rig::new(ReferenceEngine::new(Chip::M4.limits()));
    assert!(convert_pack_ahead(&rig.cx(), view, F32_INFO, heads, m, bucket).is_none());
    assert!(pack_resident(&rig.cx(), view, F32_INFO, heads, m, bucket));
    assert_eq!(run(&rig, None), inline);
    assert_eq!(rig.stats.stream_ahead.load(Relaxed), 0);
}

#[test]
fn a_stuck_conversion_thread_neither_hangs_a_dispatch_nor_the_instance_free() {
    use std::time::{Duration, Instant};
    // Background conversions take 300 ms; a dispatch waits 5 ms and then converts itself.
    let t = Instant::now();
    let (outs, rig, stream) = streamed_passes(
        Arc::new(Broken::stalled(Duration::from_millis(300))),
        Some(Duration::from_millis(5)),
        3,
    );
    assert_eq!(&outs[5..10], &outs[..5], "same bits as the first pass");
    assert_eq!(&outs[10..], &outs[..5]);
    assert_eq!(rig.stats.ops_fallback.load(Relaxed), 0);
    assert!(
        rig.stats.stream_ahead.load(Relaxed) < 7,
        "dispatches gave up waiting and converted (a working thread finds all 7)"
    );
    // Freeing the instance waits for the conversion in progress only, not the queued ones.
    let freed = Instant::now();
    drop(stream);
    assert!(
        freed.elapsed() < Duration::from_millis(1000),
        "{:?}",
        freed.elapsed()
    );
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
}
