//! `GGML_ANE_INT8_INPUT=1`: Q8_0 weight groups staged as int8 plus block scales and run by the
//! int8 program give the fp16 path's bits in about half its staged bytes; a failed canary stages
//! fp16; a failed int8 dispatch is computed by the CPU fallback.

use super::*;
use ane_convert::types::GGML_TYPE_Q8_0;
use ane_plan::canary::q8_0_test_blocks;
use std::sync::atomic::AtomicBool;

/// ggml's Q8_0 `to_float` (for the plugin's own CPU fallback loop).
unsafe extern "C" fn q8_0_to_float(x: *const std::ffi::c_void, y: *mut f32, k: i64) {
    let nb = k as usize / 32;
    // SAFETY: ggml's contract: `x` holds `k / 32` blocks, `y` `k` values.
    let (src, out) = unsafe {
        (
            std::slice::from_raw_parts(x.cast::<u8>(), nb * 34),
            std::slice::from_raw_parts_mut(y, k as usize),
        )
    };
    for (b, block) in src.chunks_exact(34).enumerate() {
        let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
        for (e, &q) in block[2..].iter().enumerate() {
            out[b * 32 + e] = d * q as i8 as f32;
        }
    }
}

const Q8_INFO: TypeInfo = TypeInfo {
    blck_size: 32,
    type_size: 34,
    to_float: Some(q8_0_to_float),
};

fn q8_desc(k: i64, m: i64) -> TensorDesc {
    let row = k as usize / 32 * 34;
    TensorDesc {
        ty: GGML_TYPE_Q8_0,
        ne: [k, m, 1, 1],
        nb: [34, row, row * m as usize, row * m as usize],
    }
}

/// Rows of the weights of [`q8_group`]: a fused group of 192 + 128 rows (one int8 tile).
const ROWS: [i64; 2] = [192, 128];
const K: i64 = 256;

/// The members' Q8_0 bytes and their dequantization (f32, `[m][k]`).
fn q8_group() -> Vec<(Vec<u8>, Vec<f32>)> {
    ROWS.iter()
        .enumerate()
        .map(|(i, &m)| {
            let (raw, deq) = q8_0_test_blocks(m as usize, K as usize, 60 + i as u64);
            (raw, deq.iter().map(|v| v.to_f32()).collect())
        })
        .collect()
}

/// A rig whose activations and outputs are at most 64 columns, so that the weights are each
/// request's largest tensor (as in a large model), token-major as the int8 program is.
fn rig<E: Engine>(engine: E) -> Rig<E> {
    let mut rig = Rig::new(engine);
    rig.planner.n_buckets = vec![64];
    rig.planner.layout = ane_plan::Layout::Tokens;
    rig
}

/// Computes the Q8_0 group against `b` (`K` x `n`) through `rig` with the int8 gate `int8`, as
/// weights (`weights`); returns each member's dst.
fn run_q8<E: Engine>(
    rig: &Rig<E>,
    int8: Option<&Int8Gate>,
    weights: bool,
    group: &[(Vec<u8>, Vec<f32>)],
    b: &[f32],
    n: i64,
) -> Vec<Vec<f32>> {
    let mut dsts: Vec<Vec<f32>> = ROWS
        .iter()
        .map(|&m| vec![f32::NAN; (m * n) as usize])
        .collect();
    let members = group
        .iter()
        .zip(ROWS)
        .zip(dsts.iter_mut())
        .map(|(((raw, _), m), d)| Member {
            src0: unsafe { Operand::of_bytes(q8_desc(K, m), raw, &Q8_INFO) },
            src0_info: Q8_INFO,
            dst: unsafe { Operand::of_f32_mut(f32_desc([m, n, 1, 1]), d) },
        })
        .collect();
    let g = Group {
        src1: unsafe { Operand::of_f32(f32_desc([K, n, 1, 1]), b) },
        src1_info: F32_INFO,
        members,
        weights,
        speculative: 0,
    };
    compute(&Context { int8, ..rig.cx() }, &g);
    dsts
}

fn bits(v: &[Vec<f32>]) -> Vec<Vec<u32>> {
    v.iter()
        .map(|d| d.iter().map(|x| x.to_bits()).collect())
        .collect()
}

#[test]
fn int8_weights_give_the_fp16_paths_bits_in_about_half_the_staged_bytes() {
    let group = q8_group();
    // 100 columns: two column chunks share the staged weights.
    let n = 100;
    let b = rand_vec((K * n) as usize, 61);
    let fp16 = rig(ReferenceEngine::new(Chip::M4.limits()));
    let want = run_q8(&fp16, None, true, &group, &b, n);
    let fp16_bytes = fp16.staged.lock().unwrap().bytes();
    assert_eq!(fp16.stats.int8_dispatches.load(Relaxed), 0);

    let int8 = rig(ReferenceEngine::new(Chip::M4.limits()));
    let gate = Int8Gate::new();
    let got = run_q8(&int8, Some(&gate), true, &group, &b, n);
    assert!(got.iter().flatten().all(|v| v.is_finite()));
    assert_eq!(
        bits(&got),
        bits(&want),
        "int8 path differs from the fp16 path"
    );
    let s = &int8.stats;
    assert_eq!(s.int8_canary.load(Relaxed), INT8_CANARY_PASS);
    assert_eq!(s.int8_groups.load(Relaxed), 1);
    assert_eq!(s.int8_dispatches.load(Relaxed), 2, "one per column chunk");
    assert_eq!(s.ops_offloaded.load(Relaxed), 2);
    assert_eq!(s.ops_fallback.load(Relaxed), 0);
    let int8_bytes = int8.staged.lock().unwrap().bytes();
    let ratio = int8_bytes as f64 / fp16_bytes as f64;
    // int8 weights (half of fp16) plus host scales (1/16 of fp16).
    assert!(
        (0.5..0.56).contains(&ratio),
        "staged {int8_bytes} bytes against fp16's {fp16_bytes} ({ratio:.3})"
    );
    assert_eq!(
        int8_bytes,
        int8.staged.lock().unwrap().peak_bytes,
        "nothing else held"
    );

    // Again: the staged int8 weights are reused, and the bits are the same.
    let again = run_q8(&int8, Some(&gate), true, &group, &b, n);
    assert_eq!(bits(&again), bits(&want));
    assert_eq!(s.int8_groups.load(Relaxed), 1);
    assert_eq!(s.groups_staged_dispatch.load(Relaxed), 1);
    // The canary compiled its int8 program on the engine (its fp16 side runs on a reference
    // engine of its own); then the int8 program of the 64-column bucket, once.
    assert_eq!(
        int8.engine.counters().compiles,
        2,
        "the canary's and one program"
    );

    // Not weights (a KV cache): the fp16 path, converted per call.
    let before = s.int8_dispatches.load(Relaxed);
    let kv = run_q8(&int8, Some(&gate), false, &group, &b, n);
    assert_eq!(s.int8_dispatches.load(Relaxed), before);
    assert!(kv.iter().flatten().all(|v| v.is_finite()));
}

#[test]
fn int8_groups_are_staged_at_load_within_the_budget() {
    let group = q8_group();
    let rig = rig(ReferenceEngine::new(Chip::M4.limits()));
    let gate = Int8Gate::new();
    let cx = Context {
        int8: Some(&gate),
        ..rig.cx()
    };
    let members: Vec<Member> = group
        .iter()
        .zip(ROWS)
        .map(|((raw, _), m)| {
            Member::weight_only(
                unsafe { Operand::of_bytes(q8_desc(K, m), raw, &Q8_INFO) },
                Q8_INFO,
            )
        })
        .collect();
    let added = stage_ahead(&cx, &members).unwrap();
    assert!(added > 0);
    assert_eq!(rig.staged.lock().unwrap().bytes(), added);
    assert_eq!(rig.stats.int8_groups.load(Relaxed), 1);
    assert_eq!(stage_ahead(&cx, &members).unwrap(), 0, "staged already");
    let b = rand_vec((K * 64) as usize, 62);
    let got = run_q8(&rig, Some(&gate), true, &group, &b, 64);
    assert!(got.iter().flatten().all(|v| v.is_finite()));
    assert_eq!(rig.stats.groups_staged_dispatch.load(Relaxed), 0);
    assert_eq!(rig.stats.int8_dispatches.load(Relaxed), 1);

    // A budget below the int8 surface: the group keeps the fp16 path (which converts it for its
    // dispatch), nothing int8 is staged.
    let small = self::rig(ReferenceEngine::new(Chip::M4.limits()));
    small.staged.lock().unwrap().max_bytes = added / 2;
    let gate = Int8Gate::new();
    let got = run_q8(&small, Some(&gate), true, &group, &b, 64);
    assert!(got.iter().flatten().all(|v| v.is_finite()));
    assert_eq!(small.stats.int8_groups.load(Relaxed), 0);
    assert_eq!(small.stats.int8_dispatches.load(Relaxed), 0);
    assert_eq!(small.stats.ops_offloaded.load(Relaxed), 2);
}

/// The reference engine, refusing int8 inputs at compile (`refuse`) or failing int8 evaluations
/// once `fail_eval` is set.
struct Int8Faulty {
    inner: ReferenceEngine,
    refuse: bool,
    fail_eval: AtomicBool,
}

impl Int8Faulty {
    fn new(refuse: bool) -> Self {
        Int8Faulty {
            inner: ReferenceEngine::new(Chip::M4.limits()),
            refuse,
            fail_eval: AtomicBool::new(false),
        }
    }
}

impl Engine for Int8Faulty {
    fn name(&self) -> &'static str {
        "int8-faulty"
    }
    fn limits(&self) -> ChipLimits {
        self.inner.limits()
    }
    fn compile(&self, mil: &str, w: &[WeightFile]) -> Result<ProgramId, EngineError> {
        if self.refuse && mil.contains("tensor<int8,") {
            return Err(EngineError::Compile("int8 inputs not supported".into()));
        }
        self.inner.compile(mil, w)
    }
    fn evaluate(
        &self,
        p: ProgramId,
        i: &[&Surface],
        o: &mut [&mut Surface],
    ) -> Result<(), EngineError> {
        if i.len() == 3 && self.fail_eval.load(Relaxed) {
            return Err(EngineError::Eval("injected int8 failure".into()));
        }
        self.inner.evaluate(p, i, o)
    }
    fn unload(&self, p: ProgramId) {
        self.inner.unload(p)
    }
    fn counters(&self) -> EngineCounters {
        self.inner.counters()
    }
    fn new_surface(&self, bytes: usize) -> Result<Surface, EngineError> {
        self.inner.new_surface(bytes)
    }
}

#[test]
fn a_failed_int8_canary_stages_fp16() {
    let group = q8_group();
    let b = rand_vec((K * 64) as usize, 63);
    let fp16 = rig(ReferenceEngine::new(Chip::M4.limits()));
    let want = run_q8(&fp16, None, true, &group, &b, 64);
    let refusing = rig(Int8Faulty::new(true));
    let gate = Int8Gate::new();
    let got = run_q8(&refusing, Some(&gate), true, &group, &b, 64);
    assert_eq!(bits(&got), bits(&want));
    let s = &refusing.stats;
    assert_eq!(s.int8_canary.load(Relaxed), INT8_CANARY_FAIL);
    assert_eq!(s.int8_groups.load(Relaxed), 0);
    assert_eq!(s.int8_dispatches.load(Relaxed), 0);
    assert_eq!(s.ops_fallback.load(Relaxed), 0);
    assert_eq!(
        refusing.staged.lock().unwrap().bytes(),
        fp16.staged.lock().unwrap().bytes(),
        "fp16 staging"
    );
    // The canary ran once: a second group does not ask again.
    run_q8(&refusing, Some(&gate), true, &group, &b, 64);
    assert_eq!(s.int8_canary.load(Relaxed), INT8_CANARY_FAIL);
    assert_eq!(s.ops_offloaded.load(Relaxed), 4);
}

#[test]
fn a_failed_int8_dispatch_is_computed_by_the_cpu_fallback() {
    let group = q8_group();
    let n = 100;
    let b = rand_vec((K * n) as usize, 64);
    let rig = rig(Int8Faulty::new(false));
    let gate = Int8Gate::new();
    // The canary passes; then every int8 evaluation fails.
    assert!(gate.passes(&rig.engine, &rig.stats));
    rig.engine.fail_eval.store(true, Relaxed);
    let got = run_q8(&rig, Some(&gate), true, &group, &b, n);
    assert!(
        got.iter().flatten().all(|v| v.is_finite()),
        "every output written"
    );
    let bd = f32_desc([K, n, 1, 1]);
    for ((_, deq), (d, m)) in group.iter().zip(got.iter().zip(ROWS)) {
        // The CPU rounds the activations to Q8_0 for a Q8_0 weight.
        assert_close(d, &oracle(deq, &f32_desc([K, m, 1, 1]), &b, &bd), 1e-2);
    }
    // Exactly what a failed fp16 dispatch of the group gives.
    let broken = self::rig(Broken::default());
    let want = run_q8(&broken, None, true, &group, &b, n);
    assert_eq!(broken.stats.ops_fallback.load(Relaxed), 2);
    assert_eq!(bits(&got), bits(&want));
    let s = &rig.stats;
    assert_eq!(s.ops_fallback.load(Relaxed), 2);
    assert_eq!(s.ops_offloaded.load(Relaxed), 0);
    assert_eq!(s.int8_dispatches.load(Relaxed), 0);
}

/// With the default column buckets (128 to 512) the K 256 x M 320 int8 weights (80 KiB) are the
/// largest tensor of a request of 128 columns (activations 64 KiB, outputs 80 KiB) but not of
/// 256: the group is dispatched in chunks of at most 128 columns, in surfaces of the weights'
/// size, where fp16 binds 512-column surfaces (outputs of 320 KiB).
#[test]
fn int8_groups_are_cut_into_chunks_whose_activations_fit_the_weights() {
    let group = q8_group();
    let n = 300;
    let b = rand_vec((K * n) as usize, 65);
    let tokens = |engine| {
        let mut rig = Rig::new(engine);
        rig.planner.layout = ane_plan::Layout::Tokens;
        rig
    };
    let fp16 = tokens(ReferenceEngine::new(Chip::M4.limits()));
    let want = run_q8(&fp16, None, true, &group, &b, n);
    assert_eq!(
        fp16.stats.dispatches.load(Relaxed),
        1,
        "one 512-column chunk"
    );
    let int8 = tokens(ReferenceEngine::new(Chip::M4.limits()));
    let gate = Int8Gate::new();
    let got = run_q8(&int8, Some(&gate), true, &group, &b, n);
    assert_eq!(bits(&got), bits(&want));
    assert_eq!(
        int8.stats.int8_dispatches.load(Relaxed),
        3,
        "128 + 128 + 44"
    );
    let (w8, w16) = (
        int8.staged.lock().unwrap().bytes(),
        fp16.staged.lock().unwrap().bytes(),
    );
    assert_eq!(w8, 256 * 320 + 256 * 320 / 16, "int8 weights and scales");
    assert_eq!(w16, 512 * 320 * 2, "fp16's surface: 512 columns of outputs");
}
