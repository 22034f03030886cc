//! The CPU path of claimed MUL_MATs when the engine fails: whole and partial fallbacks, a device
//! that gave up, shapes the compiler rejects, exceptions, the compile cap.

use super::*;

#[test]
fn engine_failure_falls_back_and_writes_every_output() {
    let rig = Rig::new(Broken::default());
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
    let op = |desc| unsafe { Operand::of_f32(desc, &buf) };
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
