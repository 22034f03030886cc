//! Which engine `ane doctor` and `ane bench` measure, and what was found on the way.
//!
//! On a Mac: the ANE when the framework, classes and selectors resolve and the canary passes.
//! Anywhere else, or when that fails: the CPU reference engine, labelled as such, so no number is
//! ever presented as an ANE number unless it was measured on the ANE.

use std::sync::Arc;

use ane_engine::probe::ProbeKind;
use ane_engine::reference::faults::FaultSpec;
use ane_engine::reference::ReferenceEngine;
use ane_engine::{Chip, Engine, EngineError};
use ane_plan::canary::{canary, CanaryReport};
use ane_plan::probe::{run_probes, ProbeReport};

/// One named check: `{name, ok, detail}` in the doctor report.
#[derive(Clone, Debug)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
}

/// The engine chosen for measuring, and the checks that led there.
pub struct Probed {
    pub engine: Arc<dyn Engine>,
    /// True when `engine` is the ANE and its canary passed.
    pub ane_available: bool,
    pub chip: Chip,
    pub checks: Vec<Check>,
    /// Compile and load time of the ANE canary (ms), when the ANE was used.
    pub ane_build_ms: Option<(f64, f64)>,
    /// The ANE driver's step log when it opened but its canary failed and the reference engine
    /// is measured instead: the first Mac report must say where the ANE stopped.
    pub ane_steps: Option<Vec<ane_engine::steps::StepRecord>>,
    /// What the private driver read about the machine (real ANE, virtual machine) at open;
    /// `None` off macOS.
    pub host: Option<ane_engine::host::HostSignals>,
    /// The probes of the conflicting reports run on the engines opened, before their canaries
    /// (`ane_plan::probe`): the private API's, and the reference engine's standing in for it.
    pub probes: Vec<ProbeReport>,
}

/// The probes the reference engine follows when it stands in for the private API.
pub const PRIVATE_API_PROBES: &[ProbeKind] = &[ProbeKind::MilDialect, ProbeKind::SurfaceOrder];

/// A probe report as JSON (`ane doctor`'s `probes`): `{role, engine, extra_compiles,
/// extra_left, runs: [{forms, result, detail}], probes: [{probe, report, forms, tried: [{form,
/// result, detail}], winner, form, reused, reason}]}`.
pub fn probes_json(role: &str, r: &ProbeReport) -> serde_json::Value {
    use serde_json::json;
    let runs: Vec<_> = r
        .runs
        .iter()
        .map(|run| {
            let forms: serde_json::Map<String, serde_json::Value> = run
                .forms
                .iter()
                .map(|(k, f)| (k.name().to_string(), k.forms()[*f].into()))
                .collect();
            json!({"forms": forms, "result": run.verdict.name(), "detail": run.verdict.detail()})
        })
        .collect();
    let probes: Vec<_> = r
        .probes
        .iter()
        .map(|p| {
            let forms = p.kind.forms();
            json!({
                "probe": p.kind.name(),
                "report": p.kind.report(),
                "forms": forms,
                "tried": p.tried.iter().map(|(f, v)| json!({
                    "form": forms[*f], "result": v.name(), "detail": v.detail()
                })).collect::<Vec<_>>(),
                "winner": p.decision.winner.map(|w| forms[w]),
                "form": forms[p.decision.form],
                "reused": p.reused,
                "reason": p.decision.reason,
            })
        })
        .collect();
    json!({
        "role": role,
        "engine": r.engine,
        "extra_compiles": r.extra_compiles,
        "extra_left": r.extra_left,
        "runs": runs,
        "probes": probes,
    })
}

/// One text line per probe of a `probes` JSON entry: `probe mil_dialect (ane): shorthand failed,
/// verbose pass -> verbose`.
pub fn probes_text(entry: &serde_json::Value) -> Vec<String> {
    let role = entry["role"].as_str().unwrap_or("?");
    let mut lines = Vec::new();
    for p in entry["probes"].as_array().into_iter().flatten() {
        let tried: Vec<String> = p["tried"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|t| {
                format!(
                    "{} {}",
                    t["form"].as_str().unwrap_or("?"),
                    t["result"].as_str().unwrap_or("?")
                )
            })
            .collect();
        let how = if p["reused"] == true {
            "decided earlier in this process".to_string()
        } else {
            tried.join(", ")
        };
        let end = match p["winner"].as_str() {
            Some(w) => format!("-> {w}"),
            None => format!(
                "-> none passed, {} kept ({})",
                p["form"].as_str().unwrap_or("?"),
                p["reason"].as_str().unwrap_or("?")
            ),
        };
        lines.push(format!(
            "probe {} ({role}, {}): {how} {end}",
            p["probe"].as_str().unwrap_or("?"),
            entry["engine"].as_str().unwrap_or("?")
        ));
    }
    if !lines.is_empty() {
        lines.push(format!(
            "probes ({role}): {} extra compiles, {} left for this process",
            entry["extra_compiles"], entry["extra_left"]
        ));
    }
    lines
}

/// The `host` check: each signal, and whether they let an engine open.
#[cfg(target_vendor = "apple")]
pub fn host_check(signals: &ane_engine::host::HostSignals) -> Check {
    let verdict = ane_engine::host::decide(signals);
    check(
        "host",
        verdict.is_ok(),
        match verdict {
            Ok(()) => format!(
                "no signal against a real Neural Engine: {}",
                signals.summary()
            ),
            Err(why) => format!("{why} ({})", signals.summary()),
        },
    )
}

/// The signals as a JSON object (`ane doctor`'s `host`), `null` when not read.
pub fn host_json(signals: Option<&ane_engine::host::HostSignals>) -> serde_json::Value {
    let Some(s) = signals else {
        return serde_json::Value::Null;
    };
    let mut m = serde_json::Map::new();
    for (name, value) in s.report() {
        m.insert(name.into(), value.into());
    }
    m.insert("usable".into(), ane_engine::host::decide(s).is_ok().into());
    if let Err(why) = ane_engine::host::decide(s) {
        m.insert("reason".into(), why.into());
    }
    serde_json::Value::Object(m)
}

fn check(name: &'static str, ok: bool, detail: impl Into<String>) -> Check {
    Check {
        name,
        ok,
        detail: detail.into(),
    }
}

fn canary_check(r: &Result<CanaryReport, EngineError>, engine: &str) -> Check {
    match r {
        Ok(r) => check(
            "canary",
            r.ok,
            format!(
                "conv_matmul(64,64,64) on {engine}: max_rel_err {:.2e} vs reference engine, {:.2e} vs f32 CPU (tolerance {:.0e})",
                r.max_rel_err,
                r.max_rel_err_f32,
                ane_plan::canary::CANARY_TOLERANCE
            ),
        ),
        Err(e) => check("canary", false, format!("{engine}: {e}")),
    }
}

/// Probes the machine. `want_ane = false` skips the ANE (e.g. `--engine reference`).
pub fn probe(want_ane: bool) -> Probed {
    probe_with(want_ane, None)
}

/// [`probe`], with `stand_in_faults` injected into the reference engine when it is measured in
/// the ANE's place (`ane doctor --stand-in-faults`, tests of the probes' report).
pub fn probe_with(want_ane: bool, stand_in_faults: Option<FaultSpec>) -> Probed {
    let mut checks = vec![check(
        "platform",
        cfg!(all(target_os = "macos", target_arch = "aarch64")),
        format!("{} {}", std::env::consts::OS, std::env::consts::ARCH),
    )];
    #[cfg(target_vendor = "apple")]
    if want_ane {
        let (opened, p) = ane_engine::apple::open_with_probe();
        let d = &p.discovery;
        checks.push(check(
            "framework",
            d.framework,
            "/System/Library/PrivateFrameworks/AppleNeuralEngine.framework",
        ));
        let classes: Vec<String> = d
            .classes
            .iter()
            .map(|(n, ok)| format!("{n}:{}", if *ok { "found" } else { "MISSING" }))
            .collect();
        let mut detail = classes.join(", ");
        if !d.missing_selectors.is_empty() {
            detail += &format!("; missing selectors: {}", d.missing_selectors.join(", "));
        }
        checks.push(check(
            "classes",
            d.classes.iter().take(4).all(|c| c.1) && d.missing_selectors.is_empty(),
            detail,
        ));
        checks.push(host_check(&p.host));
        let l = p.chip.limits();
        checks.push(check(
            "chip",
            p.chip != Chip::Unknown,
            format!(
                "{} (aneSubType {:?}, brand {:?}); max_axis {}, max_loaded_programs {}",
                p.chip, p.ane_subtype, p.brand, l.max_axis, l.max_loaded_programs
            ),
        ));
        match opened {
            Ok(ane) => {
                // The conflicting reports settled first; the canary runs in the winning forms.
                let probes = vec![run_probes(ane.as_ref())];
                let r = canary(ane.as_ref());
                checks.push(canary_check(&r, "ane"));
                if matches!(r, Ok(ref r) if r.ok) {
                    checks.push(check("engine", true, "measuring the Apple Neural Engine"));
                    let build = ane.last_build_ms();
                    return Probed {
                        engine: ane,
                        ane_available: true,
                        chip: p.chip,
                        checks,
                        ane_build_ms: Some(build),
                        ane_steps: None,
                        host: Some(p.host),
                        probes,
                    };
                }
                let steps = ane.steps();
                let mut fell_back = reference_fallback(
                    checks,
                    p.chip,
                    "the ANE is not usable (see the checks above)",
                    stand_in_faults,
                );
                fell_back.ane_steps = Some(steps);
                fell_back.host = Some(p.host);
                fell_back.probes.splice(0..0, probes);
                return fell_back;
            }
            Err(e) => checks.push(check("canary", false, format!("not run: {e}"))),
        }
        let mut fell_back = reference_fallback(
            checks,
            p.chip,
            "the ANE is not usable (see the checks above)",
            stand_in_faults,
        );
        fell_back.host = Some(p.host);
        return fell_back;
    }
    if !want_ane {
        return reference_fallback(
            checks,
            Chip::Unknown,
            "reference engine requested",
            stand_in_faults,
        );
    }
    checks.push(check(
        "framework",
        false,
        "AppleNeuralEngine.framework exists only on macOS",
    ));
    checks.push(check("classes", false, "not looked up: not macOS"));
    checks.push(check(
        "host",
        false,
        "not read: kern.hv_vmm_present, hw.optional.arm64 and _ANEDeviceInfo exist only on macOS",
    ));
    let l = Chip::Unknown.limits();
    checks.push(check(
        "chip",
        false,
        format!(
            "no Apple chip; reference engine enforces max_axis {}, max_loaded_programs {}",
            l.max_axis, l.max_loaded_programs
        ),
    ));
    reference_fallback(
        checks,
        Chip::Unknown,
        "no ANE on this machine",
        stand_in_faults,
    )
}

/// The reference engine measured in the ANE's place: it follows the private API's probes (so
/// the report's `probes` are exercised everywhere), with `faults` when given.
fn reference_fallback(
    mut checks: Vec<Check>,
    chip: Chip,
    why: &str,
    faults: Option<FaultSpec>,
) -> Probed {
    let engine = match faults {
        Some(f) => ReferenceEngine::with_faults(chip.limits(), f),
        None => ReferenceEngine::new(chip.limits()),
    };
    let engine: Arc<dyn Engine> = Arc::new(engine.with_probes(PRIVATE_API_PROBES));
    let probes = vec![run_probes(engine.as_ref())];
    checks.push(canary_check(&canary(engine.as_ref()), "reference"));
    checks.push(check(
        "engine",
        true,
        format!(
            "{why}: measuring the CPU reference engine instead; its timings are NOT ANE numbers"
        ),
    ));
    Probed {
        engine,
        ane_available: false,
        chip,
        checks,
        ane_build_ms: None,
        ane_steps: None,
        host: None,
        probes,
    }
}

/// Core ML (`CPUAndNeuralEngine`), opened for measuring beside the private API, or why it cannot
/// run here. `stand_in`: the reference engine answering compute-plan queries as if every
/// operation ran on the Neural Engine, so the report's Core ML section is exercised on Linux
/// (hidden `--stand-in-coreml`; its numbers are the reference engine's and labelled so).
pub fn open_coreml(stand_in: bool) -> Result<Arc<dyn Engine>, String> {
    if stand_in {
        let e = ReferenceEngine::new(Chip::Unknown.limits())
            .with_placement(ane_engine::coreml_plan::OpDevice::NeuralEngine)
            .with_probes(&[ProbeKind::CompileCall]);
        return Ok(Arc::new(e));
    }
    #[cfg(target_vendor = "apple")]
    {
        ane_engine::coreml::open()
            .map(|e| e as Arc<dyn Engine>)
            .map_err(|e| e.to_string())
    }
    #[cfg(not(target_vendor = "apple"))]
    Err("not macOS: Core ML exists only on Apple platforms".into())
}
