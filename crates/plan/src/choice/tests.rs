use super::*;
use ane_engine::coreml_plan::OpDevice;
use ane_engine::reference::{faults::FaultSpec, ReferenceEngine};
use ane_engine::Chip;

fn req() -> Requirements {
    Requirements {
        layout: Layout::Tokens,
        compressed: false,
        forced: false,
    }
}

fn engine(faults: FaultSpec, placed: Option<OpDevice>) -> Arc<dyn Engine> {
    let e = ReferenceEngine::with_faults(Chip::M4.limits(), faults);
    Arc::new(match placed {
        Some(d) => e.with_placement(d),
        None => e,
    })
}

fn good(kind: EngineKind, placed: Option<OpDevice>) -> Candidate<'static> {
    Candidate {
        kind,
        open: Box::new(move || Ok(engine(FaultSpec::default(), placed))),
    }
}

fn faulty(kind: EngineKind, faults: FaultSpec) -> Candidate<'static> {
    Candidate {
        kind,
        open: Box::new(move || Ok(engine(faults, Some(OpDevice::NeuralEngine)))),
    }
}

fn missing(kind: EngineKind) -> Candidate<'static> {
    Candidate {
        kind,
        open: Box::new(|| {
            Err(EngineError::Unavailable(
                "class _ANEClient not found".into(),
            ))
        }),
    }
}

fn chosen(c: &Choice) -> Option<EngineKind> {
    c.engine.as_ref().map(|(k, _)| *k)
}

#[test]
fn the_private_api_wins_when_its_canaries_pass() {
    let c = choose(
        vec![
            good(EngineKind::Ane, None),
            good(EngineKind::CoreMl, Some(OpDevice::NeuralEngine)),
        ],
        req(),
    );
    assert_eq!(chosen(&c), Some(EngineKind::Ane));
    // Core ML was never opened.
    assert_eq!(c.attempts.len(), 1);
    assert!(c.attempts[0].outcome.is_ok());
}

#[test]
fn core_ml_takes_over_when_the_private_api_is_missing_or_fails() {
    let c = choose(
        vec![
            missing(EngineKind::Ane),
            good(EngineKind::CoreMl, Some(OpDevice::NeuralEngine)),
        ],
        req(),
    );
    assert_eq!(chosen(&c), Some(EngineKind::CoreMl));
    assert!(c.attempts[0]
        .outcome
        .as_ref()
        .unwrap_err()
        .contains("_ANEClient"));
    let placement = c.attempts[1].placement.as_ref().unwrap();
    assert!(placement.iter().any(|o| o.op == "matmul"));

    // Every compile fails, every evaluation fails, every call throws: each falls to Core ML
    // with the step in the reason.
    for (faults, word) in [
        (
            FaultSpec {
                compile: 1.0,
                ..FaultSpec::default()
            },
            "compile",
        ),
        (
            FaultSpec {
                eval: 1.0,
                ..FaultSpec::default()
            },
            "evaluation",
        ),
        (
            FaultSpec {
                exception: 1.0,
                ..FaultSpec::default()
            },
            "exception",
        ),
        (
            FaultSpec {
                load: 1.0,
                ..FaultSpec::default()
            },
            "load",
        ),
    ] {
        let c = choose(
            vec![
                faulty(EngineKind::Ane, faults),
                good(EngineKind::CoreMl, Some(OpDevice::NeuralEngine)),
            ],
            req(),
        );
        assert_eq!(chosen(&c), Some(EngineKind::CoreMl), "{word}");
        let why = c.attempts[0].outcome.as_ref().unwrap_err();
        assert!(why.contains("canary") && why.contains(word), "{why}");
    }
}

#[test]
fn core_ml_is_refused_when_its_plan_keeps_the_matmul_off_the_neural_engine() {
    for device in [OpDevice::Cpu, OpDevice::Gpu] {
        let c = choose(
            vec![
                missing(EngineKind::Ane),
                good(EngineKind::CoreMl, Some(device)),
            ],
            req(),
        );
        assert_eq!(chosen(&c), None);
        let r = c.reasons();
        assert!(r.starts_with("private ANE API: "), "{r}");
        assert!(
            r.contains(&format!(
                "Core ML: its compute plan keeps work off the Neural Engine: matmul on {}",
                device.name()
            )),
            "{r}"
        );
    }
}

#[test]
fn an_unreadable_compute_plan_is_refused_unless_core_ml_is_forced() {
    let c = choose(vec![good(EngineKind::CoreMl, None)], req());
    assert_eq!(chosen(&c), None);
    assert!(c.reasons().contains("14.4"));
    let forced = Requirements {
        forced: true,
        ..req()
    };
    let c = choose(vec![good(EngineKind::CoreMl, None)], forced);
    assert_eq!(chosen(&c), Some(EngineKind::CoreMl));
    assert!(c.attempts[0]
        .note
        .as_ref()
        .unwrap()
        .contains("forced although"));
    // Forcing does not excuse a plan that puts the matmul on the CPU.
    let c = choose(vec![good(EngineKind::CoreMl, Some(OpDevice::Cpu))], forced);
    assert_eq!(chosen(&c), None);
}

#[test]
fn nothing_passes_and_every_reason_is_said() {
    let c = choose(
        vec![
            faulty(
                EngineKind::Ane,
                FaultSpec {
                    eval: 1.0,
                    ..FaultSpec::default()
                },
            ),
            faulty(
                EngineKind::CoreMl,
                FaultSpec {
                    compile: 1.0,
                    ..FaultSpec::default()
                },
            ),
        ],
        req(),
    );
    assert!(c.engine.is_none());
    assert_eq!(c.attempts.len(), 2);
    let r = c.reasons();
    assert!(
        r.contains("private ANE API: the canary program failed: evaluation failed"),
        "{r}"
    );
    assert!(
        r.contains("Core ML: the canary program failed: compile failed"),
        "{r}"
    );
}

/// A reference engine whose compiler rejects the compressed-weight op.
struct NoConstexpr(ReferenceEngine);

impl Engine for NoConstexpr {
    fn name(&self) -> &'static str {
        "no-constexpr"
    }
    fn limits(&self) -> ane_engine::ChipLimits {
        self.0.limits()
    }
    fn compile(
        &self,
        mil: &str,
        weights: &[ane_engine::WeightFile],
    ) -> Result<ane_engine::ProgramId, EngineError> {
        if mil.contains("constexpr_blockwise_shift_scale") {
            return Err(EngineError::Compile(
                "constexpr_blockwise_shift_scale unsupported".into(),
            ));
        }
        self.0.compile(mil, weights)
    }
    fn evaluate(
        &self,
        p: ane_engine::ProgramId,
        i: &[&ane_engine::Surface],
        o: &mut [&mut ane_engine::Surface],
    ) -> Result<(), EngineError> {
        self.0.evaluate(p, i, o)
    }
    fn unload(&self, p: ane_engine::ProgramId) {
        self.0.unload(p);
    }
    fn counters(&self) -> ane_engine::EngineCounters {
        self.0.counters()
    }
}

#[test]
fn the_compressed_canary_gates_only_when_compressed_weights_are_asked_for() {
    let open = || Candidate {
        kind: EngineKind::Ane,
        open: Box::new(|| {
            Ok(Arc::new(NoConstexpr(ReferenceEngine::new(Chip::M4.limits()))) as Arc<dyn Engine>)
        }),
    };
    let c = choose(vec![open()], req());
    assert_eq!(chosen(&c), Some(EngineKind::Ane));
    let compressed = Requirements {
        compressed: true,
        ..req()
    };
    let c = choose(vec![open()], compressed);
    assert!(c.engine.is_none());
    let r = c.reasons();
    assert!(
        r.contains("compressed-weight program failed") && r.contains("GGML_ANE_WEIGHTS"),
        "{r}"
    );
}

#[test]
fn each_candidate_is_probed_first_and_its_canaries_run_in_the_winning_forms() {
    use crate::probe::ProbeStore;
    use ane_engine::probe::ProbeKind;
    // A private API whose compiler refuses the shorthand dialect and returns zeros unless the
    // surfaces are ordered (the M1 of two reports): chosen, in the forms that passed.
    let store = ProbeStore::new(crate::probe::EXTRA_COMPILES);
    let m1 = FaultSpec {
        shorthand: 1.0,
        unordered: 1.0,
        ..FaultSpec::default()
    };
    let c = choose_with(
        vec![Candidate {
            kind: EngineKind::Ane,
            open: Box::new(move || {
                Ok(Arc::new(
                    ReferenceEngine::with_faults(Chip::M4.limits(), m1)
                        .with_probes(&[ProbeKind::MilDialect, ProbeKind::SurfaceOrder]),
                ) as Arc<dyn Engine>)
            }),
        }],
        req(),
        &store,
    );
    assert_eq!(chosen(&c), Some(EngineKind::Ane), "{}", c.reasons());
    let a = &c.attempts[0];
    let p = a.probes.as_ref().unwrap();
    assert_eq!(p.extra_compiles, 3, "the fourth combination passed");
    let note = a.note.as_deref().unwrap();
    assert!(
        note.contains("mil_dialect: verbose") && note.contains("surface_order: ascending"),
        "{note}"
    );
    let (_, e) = c.engine.as_ref().unwrap();
    assert_eq!(
        (
            e.form(ProbeKind::MilDialect),
            e.form(ProbeKind::SurfaceOrder)
        ),
        (1, 1)
    );
    // A Core ML whose synchronous compile fails: refused before, chosen now.
    let sync_fails = FaultSpec {
        sync_compile: 1.0,
        ..FaultSpec::default()
    };
    let c = choose_with(
        vec![Candidate {
            kind: EngineKind::CoreMl,
            open: Box::new(move || {
                Ok(Arc::new(
                    ReferenceEngine::with_faults(Chip::M4.limits(), sync_fails)
                        .with_placement(OpDevice::NeuralEngine)
                        .with_probes(&[ProbeKind::CompileCall]),
                ) as Arc<dyn Engine>)
            }),
        }],
        req(),
        &store,
    );
    assert_eq!(chosen(&c), Some(EngineKind::CoreMl), "{}", c.reasons());
    assert_eq!(
        store.extra_left(),
        0,
        "3 + 1 extra compiles: the budget is spent"
    );
    // Without probes the same machine is refused.
    let c = choose_with(vec![faulty(EngineKind::CoreMl, sync_fails)], req(), &store);
    assert_eq!(chosen(&c), None);
    assert!(
        c.reasons().contains("compileModelAtURL:error:"),
        "{}",
        c.reasons()
    );
}
