//! The Core ML part of `ane doctor`: the same canaries and sweep as the private API's, side by
//! side, so the first Mac report tells which engine the plugin should prefer.
//!
//! JSON: `coreml: {engine, available, error, host, checks, placement, bench, latency, steps,
//! first_failed_step, int8_input}`, `compare: [{m, k, n, ane_ms, coreml_ms, coreml_over_ane}]` and
//! `plugin_engine` (what `GGML_ANE_ENGINE=auto` would pick from these checks).

use serde_json::{json, Value};

use ane_engine::coreml_plan::{self, OpPlacement};
use ane_engine::Engine;
use ane_plan::canary::{canary, run_conv_matmul, test_values};

use crate::doctor::{round, steps_json, sweep, Args};

fn check(name: &str, ok: bool, detail: String) -> Value {
    json!({"name": name, "ok": ok, "detail": detail})
}

/// Opens Core ML and measures it, or says why it could not.
pub fn section(args: &Args) -> Value {
    let engine = match crate::probe::open_coreml(args.stand_in_coreml) {
        Ok(e) => e,
        Err(why) => {
            #[cfg(target_vendor = "apple")]
            let host = crate::probe::host_json(Some(&ane_engine::coreml::host_signals()));
            #[cfg(not(target_vendor = "apple"))]
            let host = Value::Null;
            return json!({"engine": "coreml", "available": false, "error": why, "host": host,
                          "checks": [], "placement": null, "bench": [], "steps": []});
        }
    };
    let e = engine.as_ref();
    let stand_in = args.stand_in_coreml;
    // What Core ML's open read about the machine (public sysctls, `_ANEDeviceInfo` if loaded).
    #[cfg(target_vendor = "apple")]
    let host = (!stand_in).then(ane_engine::coreml::host_signals);
    #[cfg(not(target_vendor = "apple"))]
    let host: Option<ane_engine::host::HostSignals> = None;
    let reps = args.reps.unwrap_or(if stand_in { 1 } else { 5 }).max(1);
    // The compile call settled first (`ane_plan::probe`); the canaries run in the winning form.
    let probes = crate::probe::probes_json("coreml", &ane_plan::probe::run_probes(e));
    let mut checks = Vec::new();
    let canary_ok = match canary(e) {
        Ok(r) => {
            checks.push(check(
                "canary",
                r.ok,
                format!(
                    "conv_matmul(64,64,64): max_rel_err {:.2e} vs reference engine",
                    r.max_rel_err
                ),
            ));
            r.ok
        }
        Err(err) => {
            checks.push(check("canary", false, err.to_string()));
            false
        }
    };
    let tiled_ok = match ane_plan::canary::tiled_canary(e, ane_plan::Layout::Tokens) {
        Ok(r) => {
            checks.push(check(
                "canary_tiled_tokens",
                r.ok,
                format!(
                    "tiled_matmul (Tokens, 2 row tiles, 2 K slices): max_rel_err {:.2e} vs reference engine",
                    r.max_rel_err
                ),
            ));
            r.ok
        }
        Err(err) => {
            checks.push(check("canary_tiled_tokens", false, err.to_string()));
            false
        }
    };
    let placement = ane_plan::choice::placement_canary(e, ane_plan::Layout::Tokens);
    let (placed_ok, placement_json) = match &placement {
        Ok(p) => {
            let verdict = coreml_plan::verdict(p.as_deref());
            checks.push(check(
                "placement",
                verdict.is_ok(),
                match &verdict {
                    Ok(()) => format!(
                        "compute plan of the shape-shared program: {}",
                        describe(p.as_deref().unwrap_or(&[]))
                    ),
                    Err(why) => why.clone(),
                },
            ));
            (verdict.is_ok(), placement_to_json(p.as_deref()))
        }
        Err(err) => {
            checks.push(check("placement", false, err.to_string()));
            (false, Value::Null)
        }
    };
    let (bench, worst, failures) = sweep(e, args.sweep, reps);
    checks.push(check(
        "sweep",
        failures.is_empty() && worst < 0.05,
        if failures.is_empty() {
            format!(
                "{} shapes, worst max_rel_err {worst:.2e} vs f32 CPU",
                bench.len()
            )
        } else {
            format!("failed: {}", failures.join("; "))
        },
    ));
    let latency = latency(e, reps);
    let steps = e.steps();
    // The int8-weight probe, after the step log was read (its failure is not the section's
    // `first_failed_step`): Core ML takes int8 model inputs only from specification 10 (macOS
    // 26), which `ane_coreml` does not write, so on a Mac it names the compile step.
    let (int8_check, int8_input) = crate::doctor::int8_canary(e);
    checks.push(check(int8_check.name, int8_check.ok, int8_check.detail));
    json!({
        "engine": "coreml",
        "measured": e.name(),
        "available": canary_ok && tiled_ok && placed_ok,
        "host": crate::probe::host_json(host.as_ref()),
        "error": null,
        "checks": checks,
        "placement": placement_json,
        "bench": bench,
        "latency": latency,
        "compiled_models_reused": e.counters().cache_reused,
        "steps": steps_json(&steps),
        "first_failed_step": ane_engine::steps::first_failure(&steps),
        "probes": probes,
        "int8_input": int8_input,
    })
}

/// Per-call overhead and compile cost: a 64x64x64 program compiled, dispatched, unloaded, then
/// compiled again (Core ML's second compile is a cache hit on disk).
fn latency(e: &dyn Engine, reps: usize) -> Value {
    let (k, m, n) = (64, 64, 64);
    let w = test_values(m * k, 1);
    let x = test_values(k * n, 2);
    let first = run_conv_matmul(e, (k, m, n), &w, &x, reps.max(10));
    let again = run_conv_matmul(e, (k, m, n), &w, &x, 1);
    match (first, again) {
        (Ok(a), Ok(b)) => json!({
            "compile_and_load_ms": round(a.compile_ms, 3),
            "compile_and_load_again_ms": round(b.compile_ms, 3),
            "dispatch_ms": round(a.eval_ms, 4),
            "shape": "conv_matmul(64,64,64)",
        }),
        (Err(err), _) | (_, Err(err)) => json!({ "error": err.to_string() }),
    }
}

fn describe(ops: &[OpPlacement]) -> String {
    coreml_plan::count_by_device(ops)
        .iter()
        .map(|(d, n)| format!("{n} ops on {}", d.name()))
        .collect::<Vec<_>>()
        .join(", ")
}

fn placement_to_json(ops: Option<&[OpPlacement]>) -> Value {
    match ops {
        None => Value::Null,
        Some(ops) => ops
            .iter()
            .map(|o| json!({"op": o.op, "device": o.device.name()}))
            .collect(),
    }
}

/// Shapes measured on both engines, with Core ML's time over the private API's.
pub fn compare(ane: Option<&[Value]>, coreml: &Value) -> Value {
    let empty = Vec::new();
    let coreml_rows = coreml["bench"].as_array().unwrap_or(&empty);
    let key = |r: &Value| (r["m"].as_u64(), r["k"].as_u64(), r["n"].as_u64());
    coreml_rows
        .iter()
        .map(|c| {
            let a = ane.and_then(|rows| rows.iter().find(|a| key(a) == key(c)));
            let ane_ms = a.and_then(|a| a["ms"].as_f64());
            let coreml_ms = c["ms"].as_f64();
            let ratio = match (ane_ms, coreml_ms) {
                (Some(a), Some(c)) if a > 0.0 => Some(round(c / a, 3)),
                _ => None,
            };
            json!({"m": c["m"], "k": c["k"], "n": c["n"], "ane_ms": ane_ms,
                   "coreml_ms": coreml_ms, "coreml_over_ane": ratio})
        })
        .collect()
}

/// What `GGML_ANE_ENGINE=auto` would pick given these checks (the plugin runs the same ones).
pub fn plugin_engine(ane_ok: bool, coreml: &Value) -> &'static str {
    if ane_ok {
        "ane"
    } else if coreml["available"] == true && coreml["measured"] == "coreml" {
        "coreml"
    } else {
        "none"
    }
}

/// The Core ML lines of the text report.
pub fn print_text(r: &Value) {
    let c = &r["coreml"];
    if c["available"] != true && c["checks"].as_array().is_none_or(|a| a.is_empty()) {
        println!(
            "coreml: not available: {}",
            c["error"].as_str().unwrap_or("?")
        );
    } else {
        println!(
            "coreml: measured on {}{}",
            c["measured"].as_str().unwrap_or("?"),
            if c["measured"] == "coreml" {
                ""
            } else {
                " (a stand-in: NOT Core ML numbers)"
            }
        );
        for ch in c["checks"].as_array().into_iter().flatten() {
            let ok = if ch["ok"] == true { "ok  " } else { "FAIL" };
            println!(
                "[{ok}] coreml {:<9} {}",
                ch["name"].as_str().unwrap_or(""),
                ch["detail"].as_str().unwrap_or("")
            );
        }
        println!("coreml latency: {}", c["latency"]);
        if let Some(f) = c["first_failed_step"].as_str() {
            println!("coreml first failed step: {f}");
        }
    }
    let rows = r["compare"].as_array().cloned().unwrap_or_default();
    if !rows.is_empty() {
        println!(
            "{:>6} {:>6} {:>5} {:>10} {:>10} {:>12}",
            "M", "K", "N", "ane ms", "coreml ms", "coreml/ane"
        );
        let f = |v: &Value| v.as_f64().map_or("-".to_string(), |x| format!("{x:.3}"));
        for row in rows {
            let d = |k: &str| row[k].as_u64().unwrap_or(0);
            println!(
                "{:>6} {:>6} {:>5} {:>10} {:>10} {:>12}",
                d("m"),
                d("k"),
                d("n"),
                f(&row["ane_ms"]),
                f(&row["coreml_ms"]),
                f(&row["coreml_over_ane"])
            );
        }
    }
    println!(
        "the plugin would use: {}",
        r["plugin_engine"].as_str().unwrap_or("?")
    );
}
