//! Learning, speculation, verification and pruning, through the reference engine.

use super::*;
use crate::matmul::{compute, KernelCache};
use crate::test_util::{f32_desc, rand_vec, Device, F32_INFO};
use ane_engine::reference::ReferenceEngine;

/// A weight `[k, m]` with its values.
struct W {
    vals: Vec<f32>,
    desc: TensorDesc,
}

impl W {
    fn new(k: usize, m: usize, seed: u64) -> W {
        W {
            vals: rand_vec(k * m, seed),
            desc: f32_desc([k as i64, m as i64, 1, 1]),
        }
    }
    fn weight(&self) -> Weight {
        Weight {
            data: self.vals.as_ptr() as usize,
            desc: self.desc,
            info: F32_INFO,
        }
    }
    fn member(&self, dst: &mut [f32], n: usize) -> Member {
        Member {
            src0: unsafe { Operand::of_f32(self.desc, &self.vals) },
            src0_info: F32_INFO,
            dst: unsafe { Operand::of_f32_mut(f32_desc([self.desc.ne[1], n as i64, 1, 1]), dst) },
        }
    }
}

struct Rig {
    dev: Device,
    learner: Mutex<Learner>,
}

impl std::ops::Deref for Rig {
    type Target = Device;
    fn deref(&self) -> &Device {
        &self.dev
    }
}

impl Rig {
    fn new() -> Rig {
        Rig {
            dev: Device::new(
                ReferenceEngine::new(ane_engine::Chip::M4.limits()),
                KernelCache::new(8),
            ),
            learner: Mutex::default(),
        }
    }

    /// The scheduler's sightings of `ws`, in this order, all reading src1 `0x1000` (no buffer).
    fn learn(&self, ws: &[&W], xd: &TensorDesc) {
        let mut l = self.learner.lock().unwrap();
        for w in ws {
            l.observe(w.weight(), 0x1000, xd, None);
        }
    }

    /// Computes `members` on `x` as one group, with speculation from `stash` when given; returns
    /// how many companions were speculated.
    fn run(
        &self,
        x: &[f32],
        xd: TensorDesc,
        members: Vec<Member>,
        stash: Option<&mut Stash>,
    ) -> usize {
        let mut g = Group {
            src1: src1(x, xd),
            src1_info: F32_INFO,
            members,
            weights: true,
            speculative: 0,
        };
        let cx = self.cx();
        match stash {
            Some(stash) => {
                // SAFETY: every buffer matches its description; the stash outlives the compute.
                let added =
                    unsafe { stash.speculate(&self.learner, &self.stats, &mut g, |_, _| true) };
                let fb = compute(&cx, &g);
                stash.computed(fb);
                added
            }
            None => {
                compute(&cx, &g);
                0
            }
        }
    }

    fn get(&self, c: &std::sync::atomic::AtomicU64) -> u64 {
        c.load(Relaxed)
    }
}

/// A 128-row Q and 64-row V and K of contraction `kdim` (seeds `seed`, `seed + 1`, `seed + 2`).
fn qvk(kdim: usize, seed: u64) -> (W, W, W) {
    (
        W::new(kdim, 128, seed),
        W::new(kdim, 64, seed + 1),
        W::new(kdim, 64, seed + 2),
    )
}

/// A 64-row Q and a 32-row V (K = 64) learnt as sharing `n` activations, with those and a rig.
fn learnt_pair(n: usize, seed: u64) -> (W, W, Vec<f32>, TensorDesc, Rig) {
    let (q, v) = (W::new(64, 64, seed), W::new(64, 32, seed + 1));
    let (x, xd, rig) = inputs(64, n, seed + 2);
    rig.learn(&[&q, &v], &xd);
    (q, v, x, xd, rig)
}

/// Unwritten (NaN) outputs of the 128-row Q and 64-row V and K of these tests, for `n` tokens.
fn qvk_outputs(n: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    (
        vec![f32::NAN; 128 * n],
        vec![f32::NAN; 64 * n],
        vec![f32::NAN; 64 * n],
    )
}

/// Whether the learner, shown `pair` on one src1 `at`, learns no companion for the first.
fn teaches_nothing(l: &mut Learner, pair: [&W; 2], at: usize, xd: &TensorDesc) -> bool {
    for w in pair {
        l.observe(w.weight(), at, xd, None);
    }
    l.of(pair[0].weight().data).is_empty()
}

/// `n` activations of `kdim` values (seeded) and their description.
fn activations(kdim: usize, n: usize, seed: u64) -> (Vec<f32>, TensorDesc) {
    (
        rand_vec(kdim * n, seed),
        f32_desc([kdim as i64, n as i64, 1, 1]),
    )
}

/// [`activations`] and a fresh rig.
fn inputs(kdim: usize, n: usize, seed: u64) -> (Vec<f32>, TensorDesc, Rig) {
    let (x, xd) = activations(kdim, n, seed);
    (x, xd, Rig::new())
}

fn src1(x: &[f32], d: TensorDesc) -> Operand {
    unsafe { Operand::of_f32(d, x) }
}

#[test]
fn learns_companions_in_node_order_once() {
    let (q, v, k, o) = (
        W::new(64, 64, 1),
        W::new(64, 32, 2),
        W::new(64, 32, 3),
        W::new(64, 64, 4),
    );
    let other_k = W::new(128, 32, 5);
    let xd = f32_desc([64, 96, 1, 1]);
    let mut l = Learner::default();
    for _ in 0..3 {
        // The scheduler asks several times (passes, graphs): nothing is learnt twice.
        l.observe(q.weight(), 0x1000, &xd, None);
        l.observe(v.weight(), 0x1000, &xd, None);
        l.observe(k.weight(), 0x1000, &xd, None);
        l.observe(o.weight(), 0x2000, &xd, None); // another src1: not a companion
        l.observe(other_k.weight(), 0x1000, &f32_desc([128, 96, 1, 1]), None); // other shape
    }
    let of_q: Vec<usize> = l.of(q.weight().data).iter().map(|w| w.data).collect();
    assert_eq!(of_q, vec![v.weight().data, k.weight().data]);
    assert!(l.of(v.weight().data).is_empty());
    assert!(l.of(o.weight().data).is_empty());
}

#[test]
fn non_contiguous_activations_teach_nothing() {
    let (q, v) = (W::new(64, 64, 1), W::new(64, 32, 2));
    let mut xd = f32_desc([64, 96, 1, 1]);
    xd.nb[1] = 4 * 80; // rows with a gap
    let mut l = Learner::default();
    assert!(teaches_nothing(&mut l, [&q, &v], 0x1000, &xd));
}

/// Q in one split, V and K in the next: one dispatch, and V/K outputs bit-equal to computing them
/// in their own dispatch.
#[test]
fn speculated_outputs_equal_their_own_dispatch() {
    let (kdim, n) = (128, 96);
    let (q, v, k) = qvk(kdim, 11);
    let (x, xd, rig) = inputs(kdim, n, 14);
    rig.learn(&[&q, &v, &k], &xd);
    // Without lookahead: Q, then V+K.
    let (mut q0, mut v0, mut k0) = (vec![0f32; 128 * n], vec![0f32; 64 * n], vec![0f32; 64 * n]);
    rig.run(&x, xd, vec![q.member(&mut q0, n)], None);
    rig.run(
        &x,
        xd,
        vec![v.member(&mut v0, n), k.member(&mut k0, n)],
        None,
    );
    assert_eq!(rig.get(&rig.stats.dispatches), 2);

    let mut stash = Stash::default();
    let (mut q1, mut v1, mut k1) = qvk_outputs(n);
    stash.begin();
    rig.run(&x, xd, vec![q.member(&mut q1, n)], Some(&mut stash));
    assert_eq!(rig.get(&rig.stats.dispatches), 3, "Q+V+K is one dispatch");
    stash.begin();
    let (mv, mk) = (v.member(&mut v1, n), k.member(&mut k1, n));
    assert!(stash.waits_for(&mv) && stash.waits_for(&mk));
    assert!(stash.take(&rig.learner, &rig.stats, &mv, &src1(&x, xd)));
    assert!(stash.take(&rig.learner, &rig.stats, &mk, &src1(&x, xd)));
    assert_eq!(
        rig.get(&rig.stats.dispatches),
        3,
        "V and K need no dispatch"
    );
    assert_eq!(q1, q0);
    assert_eq!(v1, v0);
    assert_eq!(k1, k0);
    assert_eq!(rig.get(&rig.stats.lookahead_hits), 2);
    // Q, V+K, then Q (+V+K speculated, counted when taken) and the two takes.
    assert_eq!(rig.get(&rig.stats.ops_offloaded), 6);
    assert!(!stash.waits_for(&mv), "taken once");
}

#[test]
fn changed_activations_are_refused_and_recomputed_by_the_caller() {
    let (kdim, n) = (64, 64);
    let (q, v) = (W::new(kdim, 64, 21), W::new(kdim, 32, 22));
    let mut x = rand_vec(kdim * n, 23);
    let xd = f32_desc([kdim as i64, n as i64, 1, 1]);
    let rig = Rig::new();
    rig.learn(&[&q, &v], &xd);
    let mut stash = Stash::default();
    let (mut qo, mut vo) = (vec![0f32; 64 * n], vec![f32::NAN; 32 * n]);
    stash.begin();
    rig.run(&x, xd, vec![q.member(&mut qo, n)], Some(&mut stash));
    // One value of src1 changes between the splits (the last bit of one float).
    x[kdim * n / 2] = f32::from_bits(x[kdim * n / 2].to_bits() ^ 1);
    stash.begin();
    let mv = v.member(&mut vo, n);
    assert!(!stash.take(&rig.learner, &rig.stats, &mv, &src1(&x, xd)));
    assert!(
        vo.iter().all(|v| v.is_nan()),
        "nothing written on a refusal"
    );
    assert_eq!(rig.get(&rig.stats.lookahead_mismatch), 1);
    // Another shape of src1 is refused too.
    x[kdim * n / 2] = f32::from_bits(x[kdim * n / 2].to_bits() ^ 1);
    stash.begin();
    rig.run(&x, xd, vec![q.member(&mut qo, n)], Some(&mut stash));
    let short = f32_desc([kdim as i64, n as i64 - 1, 1, 1]);
    let mut v_short = vec![f32::NAN; 32 * (n - 1)];
    let mv = v.member(&mut v_short, n - 1);
    assert!(!stash.take(&rig.learner, &rig.stats, &mv, &src1(&x, short)));
    // Two refusals in a row: the pair is dropped and not learnt again.
    assert!(rig.learner.lock().unwrap().of(q.weight().data).is_empty());
    {
        let mut l = rig.learner.lock().unwrap();
        assert!(teaches_nothing(&mut l, [&q, &v], 0x3000, &xd));
    }
}

#[test]
fn unused_speculation_is_pruned() {
    let n = 64;
    let (q, _v, x, xd, rig) = learnt_pair(n, 31);
    let mut stash = Stash::default();
    let mut qo = vec![0f32; 64 * n];
    for round in 0..3 {
        stash.begin();
        let before = rig.get(&rig.stats.dispatches);
        let added = rig.run(&x, xd, vec![q.member(&mut qo, n)], Some(&mut stash));
        assert_eq!(rig.get(&rig.stats.dispatches), before + 1);
        // V never comes: its speculation is wasted twice, then V is no longer added.
        assert_eq!(added, usize::from(round < 2), "round {round}");
    }
    assert_eq!(rig.get(&rig.stats.lookahead_wasted), 2);
}

/// A comparison made for one snapshot does not carry over to the next: after the stash is
/// refilled from other activations, the same src1 address is compared again (and refused).
#[test]
fn a_refilled_stash_compares_again() {
    let (kdim, n) = (64, 64);
    let (q, v) = (W::new(kdim, 64, 51), W::new(kdim, 32, 52));
    let x = rand_vec(kdim * n, 53);
    let y = rand_vec(kdim * n, 54);
    let xd = f32_desc([kdim as i64, n as i64, 1, 1]);
    let rig = Rig::new();
    rig.learn(&[&q, &v], &xd);
    let mut stash = Stash::default();
    let (mut qo, mut vo) = (vec![0f32; 64 * n], vec![f32::NAN; 32 * n]);
    stash.begin();
    rig.run(&x, xd, vec![q.member(&mut qo, n)], Some(&mut stash));
    let mv = v.member(&mut vo, n);
    assert!(stash.take(&rig.learner, &rig.stats, &mv, &src1(&x, xd)));
    // Same call: Q again on other activations refills the stash.
    rig.run(&y, xd, vec![q.member(&mut qo, n)], Some(&mut stash));
    let mut vo2 = vec![f32::NAN; 32 * n];
    let mv2 = v.member(&mut vo2, n);
    assert!(!stash.take(&rig.learner, &rig.stats, &mv2, &src1(&x, xd)));
    assert!(vo2.iter().all(|v| v.is_nan()));
}

/// Outputs become takeable only once their compute finished.
#[test]
fn nothing_is_taken_before_it_is_computed() {
    let n = 64;
    let (q, v, x, xd, rig) = learnt_pair(n, 61);
    let mut stash = Stash::default();
    let mut qo = vec![0f32; 64 * n];
    let mut g = Group {
        src1: src1(&x, xd),
        src1_info: F32_INFO,
        members: vec![q.member(&mut qo, n)],
        weights: true,
        speculative: 0,
    };
    // SAFETY: valid buffers; the compute is never run (as if it had panicked).
    let added = unsafe { stash.speculate(&rig.learner, &rig.stats, &mut g, |_, _| true) };
    assert_eq!(added, 1);
    let mut vo = vec![f32::NAN; 32 * n];
    let mv = v.member(&mut vo, n);
    assert!(!stash.waits_for(&mv));
    assert!(!stash.take(&rig.learner, &rig.stats, &mv, &src1(&x, xd)));
}

/// One layer as the scheduler shows it (Q, V, K on the attention input; O; gate, up on the FFN
/// input; down), then the LM head: each group is handed out once it is complete, in the order a
/// dispatch stacks it, and the last one when the next pass starts.
#[test]
fn complete_groups_are_handed_out_once() {
    let ws: Vec<W> = (0..8).map(|i| W::new(64, 32, 40 + i)).collect();
    let [q, v, k, o, gate, up, down, head] = [0, 1, 2, 3, 4, 5, 6, 7].map(|i| &ws[i]);
    let xd = f32_desc([64, 96, 1, 1]);
    let sightings = [
        (q, 0x1000),
        (v, 0x1000),
        (k, 0x1000),
        (o, 0x2000),
        (gate, 0x3000),
        (up, 0x3000),
        (down, 0x4000),
        (head, 0x5000),
    ];
    let mut l = Learner::default();
    let mut got = Vec::new();
    for pass in 0..3 {
        for (w, src1) in sightings {
            if let Some(r) = l.observe(w.weight(), src1, &xd, Some((pass / 2, pass / 2 + 1))) {
                let mut g = vec![r.head.data];
                g.extend(r.companions.iter().map(|c| c.data));
                got.push((g, r.head_buffer, r.trailing));
            }
        }
    }
    let d = |w: &W| w.weight().data;
    let first = Some((0, 1));
    assert_eq!(
        got,
        vec![
            (vec![d(q), d(v), d(k)], first, false),
            (vec![d(o)], first, false),
            (vec![d(gate), d(up)], first, false),
            (vec![d(down)], first, false),
            // completed by the second pass's first sighting: the trailing group (LM head)
            (vec![d(head)], first, true),
        ]
    );
}

/// A group staged at load is the one its dispatch binds: no staging inside the prompt, and the
/// outputs equal those of a rig that staged at the first dispatch.
#[test]
fn groups_staged_at_load_serve_the_first_dispatch() {
    let (kdim, n) = (128, 64);
    let (q, v, k) = qvk(kdim, 51);
    let (x, xd) = activations(kdim, n, 54);
    let mut outs = Vec::new();
    for at_load in [false, true] {
        let rig = Rig::new();
        let ready = {
            let mut l = rig.learner.lock().unwrap();
            let buf = Some((1, 2));
            for w in [&q, &v, &k] {
                assert!(l.observe(w.weight(), 0x1000, &xd, buf).is_none());
            }
            l.observe(W::new(kdim, 32, 55).weight(), 0x2000, &xd, buf)
        };
        let r = ready.expect("Q's group is complete once another src1 shows up");
        if at_load {
            let members: Vec<Member> = std::iter::once(&r.head)
                .chain(&r.companions)
                .map(|w| {
                    Member::weight_only(
                        unsafe { Operand::of_parts(w.desc, w.data, &w.info) },
                        w.info,
                    )
                })
                .collect();
            let cx = rig.cx();
            let added = crate::matmul::stage_ahead(&cx, &members).unwrap();
            assert!(added > 0);
            let again = crate::matmul::stage_ahead(&cx, &members).unwrap();
            assert_eq!(again, 0, "staged once");
            assert_eq!(rig.get(&rig.stats.groups_staged_load), 1);
        }
        let mut stash = Stash::default();
        let (mut qo, mut vo, mut ko) = qvk_outputs(n);
        stash.begin();
        assert_eq!(
            rig.run(&x, xd, vec![q.member(&mut qo, n)], Some(&mut stash)),
            2
        );
        stash.begin();
        assert!(stash.take(
            &rig.learner,
            &rig.stats,
            &v.member(&mut vo, n),
            &src1(&x, xd)
        ));
        assert!(stash.take(
            &rig.learner,
            &rig.stats,
            &k.member(&mut ko, n),
            &src1(&x, xd)
        ));
        let dispatch_staged = rig.get(&rig.stats.groups_staged_dispatch);
        assert_eq!(dispatch_staged, u64::from(!at_load), "at_load {at_load}");
        outs.push((qo, vo, ko));
    }
    assert_eq!(outs[0], outs[1]);
}

/// Groups staged at load that a whole pass over the model did not use (the first group dispatched
/// came again) are released; a later use stages them by its dispatch.
#[test]
fn unused_load_staging_is_released_after_a_pass() {
    let (kdim, n) = (64, 64);
    let (a, b) = (W::new(kdim, 64, 61), W::new(kdim, 32, 62));
    let (x, xd, rig) = inputs(kdim, n, 63);
    let cx = rig.cx();
    for w in [&a, &b] {
        let m = [Member::weight_only(
            unsafe { Operand::of_f32(w.desc, &w.vals) },
            F32_INFO,
        )];
        assert!(crate::matmul::stage_ahead(&cx, &m).unwrap() > 0);
    }
    let held = |r: &Rig| r.staged.lock().unwrap().bytes();
    let both = held(&rig);
    let mut out = vec![0f32; 64 * n];
    rig.run(&x, xd, vec![a.member(&mut out, n)], None);
    assert_eq!(rig.get(&rig.stats.groups_released), 0);
    assert_eq!(held(&rig), both);
    // The next pass: `a` again, `b` never used in between.
    rig.run(&x, xd, vec![a.member(&mut out, n)], None);
    assert_eq!(rig.get(&rig.stats.groups_released), 1);
    assert!(held(&rig) < both);
    assert_eq!(rig.get(&rig.stats.groups_staged_dispatch), 0);
    let (mut bo, mut bo_ref) = (vec![f32::NAN; 32 * n], vec![f32::NAN; 32 * n]);
    rig.run(&x, xd, vec![b.member(&mut bo, n)], None);
    assert_eq!(
        rig.get(&rig.stats.groups_staged_dispatch),
        1,
        "b staged again"
    );
    let fresh = Rig::new();
    fresh.run(&x, xd, vec![b.member(&mut bo_ref, n)], None);
    assert_eq!(bo, bo_ref);
    // Used groups stay: `a` and `b` again release nothing.
    rig.run(&x, xd, vec![a.member(&mut out, n)], None);
    assert_eq!(rig.get(&rig.stats.groups_released), 1);
}

/// A group left open when its model's buffer went away is not handed out by a weight of another
/// buffer: its weights may be unmapped.
#[test]
fn a_group_left_open_by_a_freed_model_is_not_handed_out() {
    let (q, v, o) = (W::new(64, 32, 71), W::new(64, 32, 72), W::new(64, 32, 73));
    let xd = f32_desc([64, 96, 1, 1]);
    let mut l = Learner::default();
    assert!(l.observe(q.weight(), 0x1000, &xd, Some((10, 20))).is_none());
    assert!(l.observe(v.weight(), 0x1000, &xd, Some((10, 20))).is_none());
    // Model freed; a weight of another buffer comes next.
    assert!(l.observe(o.weight(), 0x2000, &xd, Some((30, 40))).is_none());
    // The same buffer again (a later pass over the live model): handed out then.
    assert!(l.observe(q.weight(), 0x1000, &xd, Some((10, 20))).is_none());
    let r = l.observe(o.weight(), 0x3000, &xd, Some((10, 20)));
    let r = r.expect("closed from its own buffer");
    assert_eq!(r.head.data, q.weight().data);
    assert_eq!(r.companions.len(), 1);
}
