//! `ane doctor [--json] [--out FILE]`: does the ANE work here, how fast, how accurate.
//!
//! Checks: platform, framework and classes, chip and limits, canary numerics, then a sweep of
//! `M, K in {1024, 2048, 4096} x N in {64, 128, 256, 512}` (the contract) measuring ms, TFLOPS and
//! the max relative error against an f32 CPU product, plus compile, load and dispatch latency.
//! Without an ANE the same checks run on the CPU reference engine, and the report says so
//! (`ane_available: false`, `engine: "reference"`).
//!
//! The report ends with the llama.cpp command lines that fit this machine and why
//! ([`crate::doctor_commands`]): on an Apple Silicon Mac whose ANE passes, ANE prefill beside
//! Metal in one process (`--device ANE,MTL0 -ts 0,1`); on a Mac where it does not, nothing to
//! gain (and the reference engine for testing); elsewhere the reference engine beside llama.cpp's
//! RPC backend as the GPU.
//!
//! Before any canary the conflicting third-party reports are probed on each engine opened
//! (`ane_plan::probe`: MIL dialect and surface order on the private API, or the reference engine
//! standing in for it; the compile call on Core ML), conservative form first; JSON `probes` has
//! each probe's forms tried, their results and the winner, text one line per probe.
//!
//! Whether splitting each prefill matmul between the device and a GPU pays on this machine comes
//! from the plugin's calibrations (`split-calibrations.tsv` in its cache folder, see
//! [`crate::bench_split`]): per machine key of this OS build (all keys when none matches), how
//! many shape classes give the GPU a share strictly between 0 and 1 and the best predicted
//! speedup over the GPU alone; without calibrations, how to produce them.
//!
//! The int8-weight probe (`canary_int8_input`, JSON `int8_input`) says whether the device takes
//! Q8_0 weights as an int8 input dequantized in the program, and if not, at which step it stopped.
//!
//! JSON: `{platform, ane_available, host, engine, chip, checks: [{name, ok, detail}], probes,
//! bench: [{m, k, n, ms, tflops, max_rel_err, compile_ms, first_ms}], latency, sweep,
//! split: {file, found, this_os, matched, machines, pays, summary, how},
//! commands: {case, why, lines, notes, plugin_path, plugin_path_from},
//! int8_input: {engine, ok, failed_step, error, max_rel_err, used}}`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::ValueEnum;
use serde_json::{json, Value};

use ane_plan::canary::{cpu_matmul_f32, max_rel_err, run_conv_matmul, test_values};

use crate::probe::Check;

/// Sizes swept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Sweep {
    /// `M, K in {1024, 2048, 4096} x N in {64, 128, 256, 512}`: the report a Mac user sends back.
    Full,
    /// `M = K = 256 x N in {64, 128, 256, 512}`: for tests (debug builds), not for reports.
    Small,
}

impl Sweep {
    pub(crate) fn shapes(self) -> Vec<(usize, usize, usize)> {
        let mk: &[usize] = match self {
            Sweep::Full => &[1024, 2048, 4096],
            Sweep::Small => &[256],
        };
        let mut v = Vec::new();
        for &m in mk {
            for &k in mk {
                for n in [64, 128, 256, 512] {
                    v.push((m, k, n));
                }
            }
        }
        v
    }
}

/// Arguments of `ane doctor`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print the report as JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// Also write the JSON report to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Evaluations per shape (the fastest is reported). Default: 5 on the ANE, 1 on the reference
    /// engine (a naive CPU loop).
    #[arg(long)]
    pub reps: Option<usize>,
    /// Which sweep to run; `full` is the documented report, `small` exists for tests.
    #[arg(long, value_enum, default_value = "full", hide = true)]
    pub sweep: Sweep,
    /// Measure the reference engine in Core ML's place (tests of the report off macOS).
    #[arg(long, hide = true)]
    pub stand_in_coreml: bool,
    /// Inject `GGML_ANE_FAULTS`-style faults into the reference engine measured in the ANE's
    /// place (tests of the probes' report, e.g. `shorthand=1,unordered=1`).
    #[arg(long, hide = true)]
    pub stand_in_faults: Option<ane_engine::reference::faults::FaultSpec>,
}

/// Runs the doctor.
pub fn run(args: &Args) -> Result<()> {
    let report = report(args);
    let text = serde_json::to_string_pretty(&report)?;
    if let Some(path) = &args.out {
        std::fs::write(path, format!("{text}\n"))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if args.json {
        println!("{text}");
    } else {
        print_text(&report);
    }
    Ok(())
}

/// Builds the report.
pub fn report(args: &Args) -> Value {
    let p = crate::probe::probe_with(true, args.stand_in_faults);
    let engine = p.engine.as_ref();
    let reps = args
        .reps
        .unwrap_or(if p.ane_available { 5 } else { 1 })
        .max(1);
    let mut checks: Vec<Check> = p.checks.clone();
    // The plugin binds the engine's own surfaces (IOSurfaces) directly, and copies through host
    // memory only if that fails its canary: say which it would do. What follows runs with it.
    let (ok, detail) = match ane_plan::canary::shape_shared_canary(engine, ane_plan::Layout::default()) {
        // Surfaces of ascending sizes (probed) are never bound directly: the engine hands out
        // host memory and copies it through surfaces of its own.
        Ok((c, ane_plan::canary::Surfaces::Own, _)) if engine.form(ane_engine::probe::ProbeKind::SurfaceOrder) == 1 => (c.ok, format!("surfaces of ascending sizes (probe surface_order): host surfaces copied per dispatch through the driver's own; shape-shared canary max_rel_err {:.2e}", c.max_rel_err)),
        Ok((c, ane_plan::canary::Surfaces::Own, _)) => (c.ok, format!("engine surfaces bound directly (no copies); shape-shared canary max_rel_err {:.2e}", c.max_rel_err)),
        Ok((c, ane_plan::canary::Surfaces::Host, why)) => (false, format!("engine surfaces failed ({}); host surfaces copied per dispatch instead: canary {} (max_rel_err {:.2e})", why.unwrap_or_default(), if c.ok { "passes" } else { "fails" }, c.max_rel_err)),
        Err(e) => (false, format!("shape-shared canary failed: {e}")),
    };
    checks.push(Check {
        name: "direct_binding",
        ok,
        detail,
    });
    // The plugin dispatches the shape-shared form, not the baked conv: check it in both layouts.
    for layout in [ane_plan::Layout::Channels, ane_plan::Layout::Tokens] {
        let (ok, detail) = match ane_plan::canary::tiled_canary(engine, layout) {
            Ok(r) => (r.ok, format!("tiled_matmul ({layout:?}, 2 row tiles, 2 K slices) on {}: max_rel_err {:.2e} vs reference engine", engine.name(), r.max_rel_err)),
            Err(e) => (false, format!("tiled_matmul ({layout:?}) failed: {e}")),
        };
        checks.push(Check {
            name: if layout == ane_plan::Layout::Channels {
                "canary_tiled"
            } else {
                "canary_tiled_tokens"
            },
            ok,
            detail,
        });
    }
    let (ok, detail) = match ane_plan::canary::compressed_canary(engine) {
        Ok(r) => (r.ok, format!("baked Q8_0/Q4_0 conv (GGML_ANE_WEIGHTS=compressed) on {}: max_rel_err {:.2e} vs reference engine", engine.name(), r.max_rel_err)),
        Err(e) => (false, format!("baked Q8_0/Q4_0 conv failed: {e}")),
    };
    checks.push(Check {
        name: "canary_compressed",
        ok,
        detail,
    });
    let (ok, detail) = match ane_plan::canary::pack_canary(engine) {
        Ok(r) => (r.ok, format!("pack of 4 experts x 16 columns (GGML_ANE_MOE=on) on {}: max_rel_err {:.2e} vs reference engine{}", engine.name(), r.max_rel_err, if r.ok { "" } else { "; MoE would run one expert per dispatch" })),
        Err(e) => (false, format!("pack of experts failed: {e}; MoE would run one expert per dispatch")),
    };
    checks.push(Check {
        name: "canary_moe_pack",
        ok,
        detail,
    });
    let (bench, worst, failures) = sweep(engine, args.sweep, reps);
    checks.push(Check {
        name: "sweep",
        ok: failures.is_empty() && worst < 0.05,
        detail: if failures.is_empty() {
            format!(
                "{} shapes, worst max_rel_err {worst:.2e} vs f32 CPU",
                bench.len()
            )
        } else {
            format!("failed: {}", failures.join("; "))
        },
    });
    // Latency of the smallest program: compile+load of one program, and one dispatch.
    let latency = {
        let (k, m, n) = (64, 64, 64);
        let w = test_values(m * k, 1);
        let x = test_values(k * n, 2);
        match run_conv_matmul(engine, (k, m, n), &w, &x, reps.max(10)) {
            Ok(r) => {
                let (c, l) = p.ane_build_ms.unwrap_or((f64::NAN, f64::NAN));
                json!({
                    "compile_and_load_ms": round(r.compile_ms, 3),
                    "ane_canary_compile_ms": finite(c),
                    "ane_canary_load_ms": finite(l),
                    "dispatch_ms": round(r.eval_ms, 4),
                    "shape": "conv_matmul(64,64,64)",
                })
            }
            Err(e) => json!({ "error": e.to_string() }),
        }
    };
    // Every call into the framework, in order: on a failed first run, where it stopped.
    let (steps_engine, steps) = match p.ane_steps {
        Some(s) => ("ane", s),
        None => (engine.name(), engine.steps()),
    };
    // Last, after the step log was read: a device that refuses int8 inputs (unknown, and not
    // used by the plugin) must not become the report's `first_failed_step`.
    let (check, int8_input) = int8_canary(engine);
    checks.push(check);
    let first_failed = ane_engine::steps::first_failure(&steps);
    let steps = steps_json(&steps);
    let coreml = crate::doctor_coreml::section(args);
    // The plugin's own rule: the baked canary (ane_available) and the shape-shared program in
    // its default layout; platform and chip checks do not gate it.
    let ane_ok = p.ane_available
        && checks
            .iter()
            .any(|c| c.name == "canary_tiled_tokens" && c.ok);
    let compare =
        crate::doctor_coreml::compare(if p.ane_available { Some(&bench) } else { None }, &coreml);
    let plugin_engine = crate::doctor_coreml::plugin_engine(ane_ok, &coreml);
    let role = if p.ane_available {
        "ane"
    } else {
        "private_api_stand_in"
    };
    let mut probes: Vec<Value> = p
        .probes
        .iter()
        .map(|r| crate::probe::probes_json(if r.engine == "ane" { "ane" } else { role }, r))
        .collect();
    if !coreml["probes"].is_null() {
        probes.push(coreml["probes"].clone());
    }
    let mut r = json!({
        "probes": probes,
        "steps_engine": steps_engine,
        "steps": steps,
        "first_failed_step": first_failed,
        "platform": format!("{} {}", std::env::consts::OS, std::env::consts::ARCH),
        "ane_available": p.ane_available,
        "host": crate::probe::host_json(p.host.as_ref()),
        "engine": engine.name(),
        "chip": p.chip.to_string(),
        "limits": {
            "max_axis": engine.limits().max_axis,
            "max_loaded_programs": engine.limits().max_loaded_programs,
        },
        "checks": checks.iter().map(|c| json!({"name": c.name, "ok": c.ok, "detail": c.detail})).collect::<Vec<_>>(),
        "bench": bench,
        "latency": latency,
        "sweep": format!("{:?}", args.sweep).to_lowercase(),
        "reps": reps,
        "version": env!("CARGO_PKG_VERSION"),
        "coreml": coreml,
        "compare": compare,
        "plugin_engine": plugin_engine,
        "int8_input": int8_input,
    });
    // Whether splitting prefill matmuls with a GPU pays here, from the plugin's calibrations.
    r["split"] = crate::bench_split::doctor_section(
        crate::bench_split::default_cache_dir().as_deref(),
        &crate::bench_split::this_os(),
    );
    // Last, from the verdicts above: which llama.cpp command lines fit this machine.
    let commands = crate::doctor_commands::decide(&crate::doctor_commands::facts(&r));
    r["commands"] = commands.to_json();
    r
}

/// The int8-weight probe on `engine` (`ane_plan::canary::int8_canary`): the `canary_int8_input`
/// check and the JSON `int8_input: {engine, ok, failed_step, error, max_rel_err, used}`. Whether
/// the device takes int8 input surfaces is unknown, so a failure names the step that stopped it;
/// `used`: whether the plugin would dispatch the form here (it passed, and this environment asks
/// for it with `GGML_ANE_INT8_INPUT=1`; the plugin runs the same canary at first use).
pub(crate) fn int8_canary(engine: &dyn ane_engine::Engine) -> (Check, Value) {
    let c = ane_plan::canary::int8_canary(engine);
    let detail = match (&c.failed_step, &c.error) {
        (None, _) => format!(
            "Q8_0 as int8 + fp16 block scales dequantized in the shape-shared program (2 row \
             tiles, 2 K slices) on {}: max_rel_err {:.2e} vs the fp16 program; a probe, the \
             plugin uses it for resident Q8_0 weights only with GGML_ANE_INT8_INPUT=1",
            engine.name(),
            c.max_rel_err
        ),
        (Some(step), error) => format!(
            "int8 weights as an input on {}: failed at step {step}: {}",
            engine.name(),
            error.as_deref().unwrap_or("")
        ),
    };
    let json = json!({
        "engine": engine.name(),
        "ok": c.ok,
        "failed_step": c.failed_step,
        "error": c.error,
        "max_rel_err": if c.max_rel_err.is_finite() { json!(c.max_rel_err) } else { Value::Null },
        "used": c.ok && std::env::var("GGML_ANE_INT8_INPUT").as_deref() == Ok("1"),
    });
    (
        Check {
            name: "canary_int8_input",
            ok: c.ok,
            detail,
        },
        json,
    )
}

/// The sweep on one engine: a row per shape, the worst error against f32, and the failures.
pub(crate) fn sweep(
    engine: &dyn ane_engine::Engine,
    which: Sweep,
    reps: usize,
) -> (Vec<Value>, f64, Vec<String>) {
    let mut bench = Vec::new();
    let mut worst = 0f64;
    let mut failures = Vec::new();
    for (m, k, n) in which.shapes() {
        let w = test_values(m * k, (m * 31 + k) as u64);
        let x = test_values(k * n, (k * 17 + n) as u64);
        match run_conv_matmul(engine, (k, m, n), &w, &x, reps) {
            Ok(r) => {
                let wf: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
                let xf: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
                let err = max_rel_err(&r.y, &cpu_matmul_f32(&wf, &xf, (k, m, n)));
                worst = worst.max(err);
                let flops = 2.0 * (m * k * n) as f64;
                bench.push(json!({
                    "m": m, "k": k, "n": n,
                    "ms": round(r.eval_ms, 4),
                    "tflops": round(flops / (r.eval_ms * 1e-3) / 1e12, 5),
                    "max_rel_err": err,
                    "compile_ms": round(r.compile_ms, 3),
                    "first_ms": round(r.first_eval_ms, 4),
                }));
            }
            Err(e) => failures.push(format!("{m}x{k}x{n}: {e}")),
        }
    }
    (bench, worst, failures)
}

/// Step records as JSON.
pub(crate) fn steps_json(steps: &[ane_engine::steps::StepRecord]) -> Vec<Value> {
    steps
        .iter()
        .map(|r| json!({"step": r.step, "ok": r.ok, "ms": round(r.ms, 3), "error": r.error}))
        .collect()
}

pub(crate) fn round(v: f64, digits: i32) -> f64 {
    let p = 10f64.powi(digits);
    (v * p).round() / p
}

fn finite(v: f64) -> Value {
    if v.is_finite() {
        json!(round(v, 3))
    } else {
        Value::Null
    }
}

fn print_text(r: &Value) {
    println!(
        "platform {}  engine {}  ane_available {}  chip {}",
        r["platform"].as_str().unwrap_or("?"),
        r["engine"].as_str().unwrap_or("?"),
        r["ane_available"],
        r["chip"].as_str().unwrap_or("?")
    );
    for c in r["checks"].as_array().into_iter().flatten() {
        let ok = if c["ok"].as_bool() == Some(true) {
            "ok  "
        } else {
            "FAIL"
        };
        println!(
            "[{ok}] {:<9} {}",
            c["name"].as_str().unwrap_or(""),
            c["detail"].as_str().unwrap_or("")
        );
    }
    for entry in r["probes"].as_array().into_iter().flatten() {
        for line in crate::probe::probes_text(entry) {
            println!("{line}");
        }
    }
    if r["engine"] != "ane" {
        println!("(timings below are from the CPU reference engine, not the ANE)");
    }
    println!(
        "{:>6} {:>6} {:>5} {:>10} {:>9} {:>11}",
        "M", "K", "N", "ms", "TFLOPS", "max_rel_err"
    );
    for b in r["bench"].as_array().into_iter().flatten() {
        println!(
            "{:>6} {:>6} {:>5} {:>10.3} {:>9.4} {:>11.2e}",
            b["m"].as_u64().unwrap_or(0),
            b["k"].as_u64().unwrap_or(0),
            b["n"].as_u64().unwrap_or(0),
            b["ms"].as_f64().unwrap_or(f64::NAN),
            b["tflops"].as_f64().unwrap_or(f64::NAN),
            b["max_rel_err"].as_f64().unwrap_or(f64::NAN)
        );
    }
    println!("latency: {}", r["latency"]);
    let steps = r["steps"].as_array().cloned().unwrap_or_default();
    let line: Vec<String> = steps
        .iter()
        .take(16)
        .map(|s| {
            format!(
                "{}{} {:.1}ms",
                s["step"].as_str().unwrap_or("?"),
                if s["ok"] == true { "" } else { " FAILED" },
                s["ms"].as_f64().unwrap_or(f64::NAN)
            )
        })
        .collect();
    println!(
        "steps ({}, first {} of {}): {}",
        r["steps_engine"].as_str().unwrap_or("?"),
        line.len(),
        steps.len(),
        line.join(", ")
    );
    match r["first_failed_step"].as_str() {
        Some(f) => println!("first failed step: {f}"),
        None => println!("first failed step: none"),
    }
    crate::doctor_coreml::print_text(r);
    for line in crate::bench_split::doctor_text(&r["split"]) {
        println!("{line}");
    }
    crate::doctor_commands::print_text(r);
}
