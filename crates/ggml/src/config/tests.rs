//! Knob parsing and the README table of knobs.
use super::*;
use std::collections::HashMap;

fn cfg(pairs: &[(&str, &str)]) -> (Config, Vec<String>) {
    let map: HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let mut warnings = Vec::new();
    let c = Config::from_lookup(|k| map.get(k).cloned(), |w| warnings.push(w));
    (c, warnings)
}

#[test]
fn defaults() {
    let (c, w) = cfg(&[]);
    assert_eq!(c.engine, EngineChoice::Auto);
    assert_eq!(c.min_batch, 64);
    assert_eq!(c.stats, StatsMode::Off);
    assert_eq!(c.chip, Chip::M4);
    assert_eq!(c.max_programs, 96);
    assert_eq!(c.weights, WeightsMode::Fp16);
    assert_eq!(c.give_up, DEFAULT_GIVE_UP);
    assert!(w.is_empty());
    let (c, w) = cfg(&[("GGML_ANE_GIVE_UP", "0")]);
    assert_eq!((c.give_up, w.len()), (0, 0));
    let (c, w) = cfg(&[("GGML_ANE_GIVE_UP", "-1")]);
    assert_eq!((c.give_up, w.len()), (DEFAULT_GIVE_UP, 1));
    let (c, w) = cfg(&[("GGML_ANE_WEIGHTS", "Compressed")]);
    assert_eq!((c.weights, w.len()), (WeightsMode::Compressed, 0));
    let (c, w) = cfg(&[("GGML_ANE_WEIGHTS", "q4")]);
    assert_eq!((c.weights, w.len()), (WeightsMode::Fp16, 1));
}

#[test]
fn values_are_read() {
    let (c, w) = cfg(&[
        ("GGML_ANE_ENGINE", "Reference"),
        ("GGML_ANE_MIN_BATCH", "1"),
        ("GGML_ANE_STATS", "json"),
        ("GGML_ANE_CHIP", "m1"),
        ("GGML_ANE_MAX_PROGRAMS", "8"),
    ]);
    assert_eq!(c.engine, EngineChoice::Reference);
    assert_eq!(
        (c.min_batch, c.stats, c.chip, c.max_programs),
        (1, StatsMode::Json, Chip::M1, 8)
    );
    assert!(w.is_empty());
}

#[test]
fn bad_values_warn_once_each_and_default() {
    let (c, w) = cfg(&[
        ("GGML_ANE_ENGINE", "gpu"),
        ("GGML_ANE_MIN_BATCH", "0"),
        ("GGML_ANE_CHIP", "m9"),
    ]);
    assert_eq!(c.engine, EngineChoice::Auto);
    assert_eq!(c.min_batch, 64);
    assert_eq!(c.chip, Chip::M4);
    assert_eq!(w.len(), 3);
    assert!(w[0].contains("GGML_ANE_ENGINE"));
}

#[test]
fn routing_costs_and_lookahead() {
    let (c, w) = cfg(&[]);
    assert_eq!(c.route, ane_plan::model::Route::Batch);
    assert!(c.lookahead && c.cost.is_none() && w.is_empty());
    let (c, w) = cfg(&[
        ("GGML_ANE_ROUTE", "Cost"),
        ("GGML_ANE_COST", "dispatch_ms=0.01,matmul_penalty=1"),
        ("GGML_ANE_LOOKAHEAD", "0"),
    ]);
    assert_eq!(c.route, ane_plan::model::Route::Cost);
    assert_eq!(c.cost.as_deref(), Some("dispatch_ms=0.01,matmul_penalty=1"));
    assert!(!c.lookahead && w.is_empty());
    let (c, w) = cfg(&[("GGML_ANE_COST", "speed=3"), ("GGML_ANE_ROUTE", "gpu")]);
    assert!(c.cost.is_none());
    assert_eq!(c.route, ane_plan::model::Route::Batch);
    assert_eq!(w.len(), 2);
    // Compressed weights turn the lookahead off.
    let (c, _) = cfg(&[("GGML_ANE_WEIGHTS", "compressed")]);
    assert!(!c.lookahead);
}

#[test]
fn readme_lists_every_knob_with_its_values() {
    let readme = include_str!("../../../../README.md");
    for k in KNOBS {
        let row = readme
            .lines()
            .find(|l| l.starts_with(&format!("| `{}`", k.name)))
            .unwrap_or_else(|| panic!("README has no row for {}", k.name));
        if let Values::OneOf(words) = k.values {
            for w in words.iter().filter(|w| !w.is_empty()) {
                assert!(
                    row.contains(&format!("`{w}`")),
                    "README's {} row lacks `{w}`",
                    k.name
                );
            }
        }
    }
}

#[test]
fn warnings_say_what_is_valid() {
    let (_, w) = cfg(&[("GGML_ANE_LAYOUT", "rows")]);
    assert_eq!(w.len(), 1);
    assert!(
        w[0].contains("valid: tokens, channels") && w[0].contains("using tokens"),
        "{w:?}"
    );
}

#[test]
fn faults_and_accumulation() {
    let (c, w) = cfg(&[
        ("GGML_ANE_FAULTS", "compile=0.3,load=0.1,eval=0.2,seed=9"),
        ("GGML_ANE_REF_ACCUM", "FP16"),
    ]);
    let f = c.faults.expect("parsed");
    assert_eq!(
        (f.compile, f.load, f.eval, f.alloc, f.seed),
        (0.3, 0.1, 0.2, 0.0, 9)
    );
    assert_eq!(c.ref_accum, Accum::Fp16);
    assert!(w.is_empty());
    let (c, w) = cfg(&[]);
    assert_eq!((c.faults, c.ref_accum), (None, Accum::Fp32));
    assert!(w.is_empty());
    let (c, w) = cfg(&[
        ("GGML_ANE_FAULTS", "compile=30%"),
        ("GGML_ANE_REF_ACCUM", "bf16"),
    ]);
    assert_eq!((c.faults, c.ref_accum), (None, Accum::Fp32));
    assert_eq!(w.len(), 2, "{w:?}");
    assert!(w[0].contains("GGML_ANE_FAULTS") || w[1].contains("GGML_ANE_FAULTS"));
}

#[test]
fn the_staging_budget_follows_the_machine() {
    use crate::config::{default_stage_mb, DEFAULT_STAGE_MAX_MB};
    let gib = 1u64 << 30;
    assert_eq!(default_stage_mb(16 * gib), 4096);
    assert_eq!(default_stage_mb(24 * gib), 6144);
    assert_eq!(default_stage_mb(128 * gib), 32768);
    assert_eq!(default_stage_mb(0), DEFAULT_STAGE_MAX_MB, "unknown memory");
    assert_eq!(
        default_stage_mb(512 << 20),
        256,
        "a floor for tiny machines"
    );
    for ram in [8 * gib, 16 * gib, 36 * gib, 192 * gib] {
        assert!(
            (default_stage_mb(ram) as u64) << 20 <= ram / 2,
            "at most half of {ram}"
        );
    }
    let (c, _) = cfg(&[]);
    assert!(c.stage_max_mb >= 256);
    let (c, _) = cfg(&[("GGML_ANE_STAGE_MAX_MB", "100")]);
    assert_eq!(c.stage_max_mb, 100);
}

/// `GGML_ANE_INT8_INPUT` is off by default; `1` is read and answered once with a note saying the
/// form is a probe used only where its canary passes.
#[test]
fn int8_input_is_opt_in_and_says_it_is_a_probe() {
    let (c, w) = cfg(&[]);
    assert!(!c.int8_input && w.is_empty());
    let (c, w) = cfg(&[("GGML_ANE_INT8_INPUT", "1")]);
    assert!(c.int8_input);
    assert_eq!(w, [INT8_INPUT_NOTE]);
    assert!(w[0].contains("only if its canary passes"), "{w:?}");
    let (c, w) = cfg(&[("GGML_ANE_INT8_INPUT", "0")]);
    assert!(!c.int8_input && w.is_empty());
    let (c, w) = cfg(&[("GGML_ANE_INT8_INPUT", "on")]);
    assert!(!c.int8_input);
    assert_eq!(w.len(), 1);
    assert!(w[0].contains("valid: 0, 1"), "{w:?}");
}
