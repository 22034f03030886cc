use super::*;
use ane_engine::probe::{CompileCall, Dialect, SurfaceOrder};
use ane_engine::reference::faults::FaultSpec;

const PRIVATE: &[ProbeKind] = &[ProbeKind::MilDialect, ProbeKind::SurfaceOrder];
const COREML: &[ProbeKind] = &[ProbeKind::CompileCall];
const ALL: &[ProbeKind] = &ProbeKind::ALL;

/// The reference engine standing in for an engine following `probes`, on a machine `faults`
/// describes.
fn stand_in(probes: &'static [ProbeKind], faults: FaultSpec) -> ReferenceEngine {
    ReferenceEngine::with_faults(Chip::M4.limits(), faults).with_probes(probes)
}

fn outcome(r: &ProbeReport, kind: ProbeKind) -> &ProbeOutcome {
    r.probes.iter().find(|p| p.kind == kind).unwrap()
}

fn tried(r: &ProbeReport, kind: ProbeKind) -> Vec<(usize, &'static str)> {
    outcome(r, kind)
        .tried
        .iter()
        .map(|(f, v)| (*f, v.name()))
        .collect()
}

#[test]
fn combinations_start_conservative_and_move_one_probe_at_a_time() {
    assert_eq!(
        combinations(&[ProbeKind::MilDialect, ProbeKind::SurfaceOrder]),
        [vec![0, 0], vec![1, 0], vec![0, 1], vec![1, 1]]
    );
    let all = combinations(ALL);
    assert_eq!(all.len(), 8);
    assert_eq!(
        all[..4],
        [vec![0, 0, 0], vec![1, 0, 0], vec![0, 1, 0], vec![0, 0, 1]]
    );
    assert_eq!(combinations(&[]), [Vec::<usize>::new()]);
}

#[test]
fn zeros_and_partial_zeros_are_symptoms() {
    let want = [1.0f32, 2.0, 3.0];
    assert_eq!(judge(&[0.0; 3], &want), Verdict::Zeros);
    assert!(matches!(
        judge(&[1.0, 0.0, 3.0], &want),
        Verdict::Wrong { .. }
    ));
    assert!(judge(&want, &want).ok());
}

#[test]
fn a_healthy_engine_keeps_the_conservative_forms_for_one_compile() {
    let store = ProbeStore::new(EXTRA_COMPILES);
    let e = stand_in(PRIVATE, FaultSpec::default());
    let r = run_probes_with(&e, &store, probe_canary);
    assert_eq!((r.runs.len(), r.extra_compiles), (1, 0));
    for p in &r.probes {
        assert_eq!(p.decision.winner, Some(0), "{p:?}");
        assert!(!p.reused);
    }
    assert_eq!(tried(&r, ProbeKind::MilDialect), [(0, "pass")]);
    assert_eq!(e.counters().compile_attempts, 1);
    assert_eq!(e.counters().loaded, 0, "the canary unloads its program");
    assert_eq!(r.note(), None, "nothing to say");
    assert_eq!(store.extra_left(), EXTRA_COMPILES);
}

#[test]
fn a_compiler_refusing_the_shorthand_falls_back_to_the_verbose_dialect() {
    let store = ProbeStore::new(EXTRA_COMPILES);
    let faults = FaultSpec {
        shorthand: 1.0,
        ..FaultSpec::default()
    };
    let e = stand_in(PRIVATE, faults);
    let r = run_probes_with(&e, &store, probe_canary);
    assert_eq!(
        tried(&r, ProbeKind::MilDialect),
        [(0, "failed"), (1, "pass")]
    );
    assert_eq!(outcome(&r, ProbeKind::MilDialect).decision.winner, Some(1));
    assert_eq!(
        outcome(&r, ProbeKind::SurfaceOrder).decision.winner,
        Some(0)
    );
    assert_eq!(r.extra_compiles, 1);
    assert_eq!(
        e.counters().compile_attempts,
        2,
        "each form's compile counts against the compile cap"
    );
    assert_eq!(store.extra_left(), EXTRA_COMPILES - 1);
    assert!(
        r.note().unwrap().contains("mil_dialect: verbose"),
        "{:?}",
        r.note()
    );
    // The engine stays on it: the plugin's canaries pass in the verbose dialect.
    assert_eq!(e.form(ProbeKind::MilDialect), 1);
    assert!(crate::canary::canary(&e).unwrap().ok);
    let (t, _, _) = crate::canary::shape_shared_canary(&e, Layout::Tokens).unwrap();
    assert!(t.ok);
    // Compressed weights need an iOS18 op the verbose (iOS16) dialect lacks: refused, named.
    let err = crate::canary::compressed_canary(&e)
        .unwrap_err()
        .to_string();
    assert!(err.contains("constexpr_blockwise_shift_scale"), "{err}");
    assert_eq!(
        Dialect::ALL[e.form(ProbeKind::MilDialect)],
        Dialect::Verbose
    );
}

#[test]
fn zeros_from_unordered_surfaces_fall_back_to_ascending_sizes() {
    let store = ProbeStore::new(EXTRA_COMPILES);
    let faults = FaultSpec {
        unordered: 1.0,
        ..FaultSpec::default()
    };
    let e = stand_in(PRIVATE, faults);
    let r = run_probes_with(&e, &store, probe_canary);
    // Both dialects give zeros with equal surfaces; ascending sizes pass.
    assert_eq!(
        tried(&r, ProbeKind::SurfaceOrder),
        [(0, "zeros"), (0, "zeros"), (1, "pass")]
    );
    assert_eq!(
        tried(&r, ProbeKind::MilDialect),
        [(0, "zeros"), (1, "zeros"), (0, "pass")]
    );
    assert_eq!(
        outcome(&r, ProbeKind::SurfaceOrder).decision.winner,
        Some(1)
    );
    assert_eq!(outcome(&r, ProbeKind::MilDialect).decision.winner, Some(0));
    assert_eq!(
        (r.extra_compiles, store.extra_left()),
        (2, EXTRA_COMPILES - 2)
    );
    // The plugin's shape-shared program now runs right, copied through ordered surfaces.
    let (t, _, _) = crate::canary::shape_shared_canary(&e, Layout::Tokens).unwrap();
    assert!(t.ok, "{t:?}");
    let s = e.new_surface(65536).unwrap();
    assert!(
        s.engine_memory().is_none(),
        "no direct binding of the plugin's one-size surfaces"
    );
}

#[test]
fn core_ml_whose_synchronous_compile_fails_uses_the_completion_handler() {
    let store = ProbeStore::new(EXTRA_COMPILES);
    let faults = FaultSpec {
        sync_compile: 1.0,
        ..FaultSpec::default()
    };
    let e = stand_in(COREML, faults);
    let r = run_probes_with(&e, &store, probe_canary);
    assert_eq!(
        tried(&r, ProbeKind::CompileCall),
        [(0, "failed"), (1, "pass")]
    );
    assert_eq!(e.form(ProbeKind::CompileCall), 1);
    assert_eq!(ProbeKind::CompileCall.forms()[1], CompileCall::Async.name());
    assert!(crate::canary::canary(&e).unwrap().ok);
    // Probes the engine does not follow are not set.
    e.set_form(ProbeKind::SurfaceOrder, 1);
    assert_eq!(e.form(ProbeKind::SurfaceOrder), 0);
    assert_eq!(
        SurfaceOrder::Equal.name(),
        ProbeKind::SurfaceOrder.forms()[0]
    );
}

#[test]
fn the_winner_is_kept_for_the_process_and_reused_without_a_compile() {
    let store = ProbeStore::new(EXTRA_COMPILES);
    let faults = FaultSpec {
        shorthand: 1.0,
        ..FaultSpec::default()
    };
    let first = stand_in(PRIVATE, faults);
    run_probes_with(&first, &store, probe_canary);
    let second = stand_in(PRIVATE, faults);
    let r = run_probes_with(&second, &store, |_| panic!("no canary for decided probes"));
    assert!(r.runs.is_empty() && r.probes.iter().all(|p| p.reused && p.tried.is_empty()));
    assert_eq!(second.form(ProbeKind::MilDialect), 1);
    assert_eq!(second.counters().compile_attempts, 0);
    assert_eq!(
        store
            .decision("reference", ProbeKind::MilDialect)
            .unwrap()
            .form,
        1
    );
    assert!(crate::canary::canary(&second).unwrap().ok);
}

#[test]
fn when_no_form_passes_the_conservative_one_stays_with_the_reason() {
    let store = ProbeStore::new(EXTRA_COMPILES);
    let faults = FaultSpec {
        shorthand: 1.0,
        verbose: 1.0,
        ..FaultSpec::default()
    };
    let e = stand_in(&[ProbeKind::MilDialect], faults);
    let r = run_probes_with(&e, &store, probe_canary);
    let d = &outcome(&r, ProbeKind::MilDialect).decision;
    assert_eq!((d.form, d.winner), (0, None));
    let why = d.reason.as_deref().unwrap();
    assert!(
        why.contains("every combination tried") && why.contains("verbose"),
        "{why}"
    );
    assert_eq!(e.form(ProbeKind::MilDialect), 0);
    assert!(r.note().unwrap().contains("no form passed"));
}

#[test]
fn an_exhausted_budget_stops_probing_with_a_clear_reason() {
    // Every evaluation fails: no form can pass, and the budget caps the search.
    let faults = FaultSpec {
        eval: 1.0,
        ..FaultSpec::default()
    };
    let store = ProbeStore::new(EXTRA_COMPILES);
    let e = stand_in(ALL, faults);
    let r = run_probes_with(&e, &store, probe_canary);
    assert_eq!(
        r.runs.len() as u32,
        1 + EXTRA_COMPILES,
        "8 combinations, 5 tried"
    );
    assert_eq!((r.extra_compiles, r.extra_left), (EXTRA_COMPILES, 0));
    assert_eq!(e.counters().compile_attempts, u64::from(1 + EXTRA_COMPILES));
    for p in &r.probes {
        assert_eq!((p.decision.form, p.decision.winner), (0, None));
        let why = p.decision.reason.as_deref().unwrap();
        assert!(
            why.contains("probe budget spent (4 extra compiles per process)"),
            "{why}"
        );
    }
    // The budget is the process's: another engine gets its first run, and no extra one.
    let store = ProbeStore::new(1);
    let a = stand_in(PRIVATE, faults);
    assert_eq!(run_probes_with(&a, &store, probe_canary).runs.len(), 2);
    let b = stand_in(COREML, faults);
    let r = run_probes_with(&b, &store, probe_canary);
    assert_eq!(r.runs.len(), 1);
    assert!(outcome(&r, ProbeKind::CompileCall)
        .decision
        .reason
        .as_deref()
        .unwrap()
        .contains("probe budget spent"));
}

#[test]
fn the_compile_cap_stops_probing() {
    let faults = FaultSpec {
        shorthand: 1.0,
        verbose: 1.0,
        ..FaultSpec::default()
    };
    let store = ProbeStore::new(EXTRA_COMPILES);
    let e = stand_in(PRIVATE, faults).with_compile_cap(2);
    let r = run_probes_with(&e, &store, probe_canary);
    assert_eq!(
        r.runs.len(),
        3,
        "two compiles, then the cap refuses the third"
    );
    assert_eq!(e.counters().compile_attempts, 2);
    let why = outcome(&r, ProbeKind::SurfaceOrder)
        .decision
        .reason
        .clone()
        .unwrap();
    assert!(why.starts_with("compile cap reached"), "{why}");
}
