use super::*;
use ane_engine::coreml_plan::OpDevice;
use ane_engine::reference::faults::FaultSpec;
use ane_engine::Chip;

fn cfg(pairs: &[(&str, &str)]) -> Config {
    let pairs: Vec<(String, String)> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Config::from_lookup(
        |k| pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()),
        |w| panic!("unexpected warning: {w}"),
    )
}

/// The reference engine standing in for a candidate; `opened` counts its opens.
fn stand_in(
    kind: EngineKind,
    faults: FaultSpec,
    placed: Option<OpDevice>,
    opened: &std::cell::Cell<u32>,
) -> Candidate<'_> {
    Candidate {
        kind,
        open: Box::new(move || {
            opened.set(opened.get() + 1);
            let e = ReferenceEngine::with_faults(Chip::M4.limits(), faults);
            Ok(Arc::new(match placed {
                Some(d) => e.with_placement(d),
                None => e,
            }) as Arc<dyn Engine>)
        }),
    }
}

#[test]
fn the_settings_pick_the_candidates() {
    let kinds = |c: Vec<Candidate<'_>>| c.iter().map(|c| c.kind).collect::<Vec<_>>();
    assert_eq!(
        kinds(candidates(EngineChoice::Auto)),
        [EngineKind::Ane, EngineKind::CoreMl]
    );
    assert_eq!(kinds(candidates(EngineChoice::Ane)), [EngineKind::Ane]);
    assert_eq!(
        kinds(candidates(EngineChoice::CoreMl)),
        [EngineKind::CoreMl]
    );
    assert_eq!(
        cfg(&[("GGML_ANE_ENGINE", "coreml")]).engine,
        EngineChoice::CoreMl
    );
}

#[cfg(not(target_vendor = "apple"))]
#[test]
fn off_macos_every_engine_but_the_reference_declines_with_its_reason() {
    let e = open_engine(&cfg(&[])).err().unwrap().to_string();
    assert!(
        e.contains("private ANE API: not macOS")
            && e.contains("Core ML: not macOS")
            && e.contains("GGML_ANE_ENGINE=reference"),
        "{e}"
    );
    let e = open_engine(&cfg(&[("GGML_ANE_ENGINE", "coreml")]))
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.starts_with("engine unavailable: Core ML: not macOS") && !e.contains("private"),
        "{e}"
    );
    let r = open_engine(&cfg(&[("GGML_ANE_ENGINE", "reference")])).unwrap();
    assert_eq!(r.name(), "reference");
}

#[test]
fn a_failing_private_api_hands_over_to_core_ml_and_the_device_runs_on_it() {
    let (ane_opens, coreml_opens) = (Default::default(), Default::default());
    let broken = FaultSpec {
        eval: 1.0,
        ..FaultSpec::default()
    };
    let c = vec![
        stand_in(EngineKind::Ane, broken, None, &ane_opens),
        stand_in(
            EngineKind::CoreMl,
            FaultSpec::default(),
            Some(OpDevice::NeuralEngine),
            &coreml_opens,
        ),
    ];
    let engine = open_engine_with(c, &cfg(&[])).unwrap();
    assert_eq!((ane_opens.get(), coreml_opens.get()), (1, 1));
    // The chosen engine computes a matmul through the plugin's planner like any other.
    let w = ane_plan::canary::test_values(64 * 64, 1);
    let x = ane_plan::canary::test_values(64 * 64, 2);
    let run = ane_plan::canary::run_tiled(
        engine.as_ref(),
        (64, 64, 64),
        ane_plan::Layout::Tokens,
        &w,
        &x,
        1,
    )
    .unwrap();
    assert_eq!(run.y.len(), 64 * 64);
    // Its compiled programs' placement reaches the stats.
    let stats = crate::stats::Stats::default();
    let id = engine
        .compile(
            &ane_mil::text::emit(&ane_mil::build::conv_matmul(64, 64, 64)),
            &[ane_engine::WeightFile {
                path: ane_mil::build::WEIGHT_PATH.into(),
                bytes: ane_mil::build::weights_blob_fp16(&w),
            }],
        )
        .unwrap();
    stats.count_placement(engine.as_ref(), id);
    let placed = stats.op_placement.lock().unwrap().clone();
    assert!(
        placed.get("neural_engine").copied().unwrap_or(0) >= 1,
        "{placed:?}"
    );
}

#[test]
fn core_ml_with_the_matmul_on_the_cpu_is_declined_with_both_reasons() {
    let opens = Default::default();
    let c = vec![
        stand_in(
            EngineKind::Ane,
            FaultSpec {
                compile: 1.0,
                ..FaultSpec::default()
            },
            None,
            &opens,
        ),
        stand_in(
            EngineKind::CoreMl,
            FaultSpec::default(),
            Some(OpDevice::Cpu),
            &opens,
        ),
    ];
    let e = open_engine_with(c, &cfg(&[])).err().unwrap().to_string();
    assert!(
        e.contains("private ANE API: the canary program failed: compile failed"),
        "{e}"
    );
    assert!(
        e.contains("Core ML: its compute plan keeps work off the Neural Engine"),
        "{e}"
    );
}

#[test]
fn forced_core_ml_without_a_readable_plan_is_used() {
    let opens = Default::default();
    let c = vec![stand_in(
        EngineKind::CoreMl,
        FaultSpec::default(),
        None,
        &opens,
    )];
    assert!(open_engine_with(c, &cfg(&[("GGML_ANE_ENGINE", "coreml")])).is_ok());
    let c = vec![stand_in(
        EngineKind::CoreMl,
        FaultSpec::default(),
        None,
        &opens,
    )];
    assert!(open_engine_with(c, &cfg(&[])).is_err());
}
