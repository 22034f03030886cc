//! `ane doctor --json` on a machine without an ANE: the JSON contract of the report.
//!
//! Runs the hidden `--sweep small` (M = K = 256) so that the debug-build test stays fast; the
//! default (`full`: M, K in {1024, 2048, 4096} x N in {64, 128, 256, 512}) is the documented report
//! and has the same fields.

use std::process::Command;

#[test]
fn doctor_json_contract_without_ane() {
    let out_file = std::env::temp_dir().join(format!("ane-doctor-{}.json", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_ane"))
        .args(["doctor", "--json", "--sweep", "small", "--out"])
        .arg(&out_file)
        .output()
        .expect("run ane doctor");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stdout is JSON");
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out_file).unwrap()).unwrap();
    std::fs::remove_file(&out_file).ok();
    assert_eq!(r, written, "--out writes the same report");

    assert!(r["platform"].is_string());
    if cfg!(target_vendor = "apple") {
        return; // On a Mac the values depend on the machine; the fields are checked above/below.
    }
    assert_eq!(r["ane_available"], false);
    assert_eq!(r["engine"], "reference");
    assert!(r["chip"].is_string());
    let checks = r["checks"].as_array().unwrap();
    assert!(checks.len() >= 3, "{checks:?}");
    for c in checks {
        assert!(
            c["name"].is_string() && c["ok"].is_boolean() && c["detail"].is_string(),
            "{c}"
        );
    }
    // The host signals (real ANE, virtual machine) are read only on macOS; the check says so.
    assert!(r["host"].is_null(), "{}", r["host"]);
    let host = checks.iter().find(|c| c["name"] == "host").unwrap();
    assert_eq!(host["ok"], false, "{host}");
    assert!(host["detail"]
        .as_str()
        .unwrap()
        .contains("kern.hv_vmm_present"));
    // The step log: every call the engine made, in order, and none failed here.
    assert_eq!(r["steps_engine"], "reference");
    let steps: Vec<&str> = r["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["step"].as_str().unwrap())
        .collect();
    assert_eq!(&steps[..3], ["compile", "load", "evaluate"], "{steps:?}");
    assert!(steps.contains(&"unload"), "{steps:?}");
    assert!(
        r["first_failed_step"].is_null(),
        "{}",
        r["first_failed_step"]
    );
    let canary = checks.iter().find(|c| c["name"] == "canary").unwrap();
    assert_eq!(canary["ok"], true, "{canary}");
    let bench = r["bench"].as_array().unwrap();
    assert!(bench.len() >= 4, "{bench:?}");
    for b in bench {
        for f in ["m", "k", "n"] {
            assert!(b[f].as_u64().unwrap() > 0, "{b}");
        }
        for f in ["ms", "tflops", "max_rel_err"] {
            assert!(b[f].as_f64().unwrap() >= 0.0, "{b}");
        }
        assert!(b["max_rel_err"].as_f64().unwrap() < 1e-2, "{b}");
    }
}

fn doctor(extra: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_ane"))
        .args(["doctor", "--json", "--sweep", "small"])
        .args(extra)
        .output()
        .expect("run ane doctor");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("stdout is JSON")
}

#[test]
fn the_report_has_a_core_ml_section_and_says_which_engine_the_plugin_would_use() {
    let r = doctor(&[]);
    let c = &r["coreml"];
    assert_eq!(c["engine"], "coreml");
    assert!(c["available"].is_boolean());
    if cfg!(target_vendor = "apple") {
        return;
    }
    assert_eq!(c["available"], false);
    assert!(c["error"].as_str().unwrap().contains("not macOS"), "{c}");
    assert_eq!(r["plugin_engine"], "none");
    assert_eq!(r["compare"].as_array().unwrap().len(), 0);
}

#[test]
fn the_core_ml_section_measures_what_the_private_api_section_does() {
    // The reference engine stands in for Core ML: every field of the section is filled as on a
    // Mac, and labelled as the stand-in's.
    let r = doctor(&["--stand-in-coreml"]);
    let c = &r["coreml"];
    assert_eq!(c["measured"], "reference");
    assert_eq!(c["available"], true, "{c}");
    let names: Vec<&str> = c["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["canary", "canary_tiled_tokens", "placement", "sweep"]
    );
    let placement = c["placement"].as_array().unwrap();
    assert!(placement
        .iter()
        .any(|o| o["op"] == "matmul" && o["device"] == "neural_engine"));
    assert_eq!(
        c["bench"].as_array().unwrap().len(),
        r["bench"].as_array().unwrap().len()
    );
    for f in [
        "compile_and_load_ms",
        "compile_and_load_again_ms",
        "dispatch_ms",
    ] {
        assert!(c["latency"][f].as_f64().unwrap() >= 0.0, "{}", c["latency"]);
    }
    assert!(c["steps"].as_array().unwrap().len() > 4);
    // Side by side: a row per shape; no private-API time where the ANE was not measured.
    let rows = r["compare"].as_array().unwrap();
    assert_eq!(rows.len(), 4);
    assert!(rows.iter().all(|row| row["coreml_ms"].as_f64().is_some()));
    if !cfg!(target_vendor = "apple") {
        assert!(rows.iter().all(|row| row["ane_ms"].is_null()));
        // A stand-in is never what the plugin would use.
        assert_eq!(r["plugin_engine"], "none");
    }
}
