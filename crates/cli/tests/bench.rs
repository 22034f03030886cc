//! `ane bench --engine both`: the private API's (here the reference engine's) and Core ML's rows
//! side by side, each labelled with what was really measured.

use std::process::Command;

fn bench(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ane"))
        .args([
            "bench",
            "--json",
            "--shapes",
            "128x128x64",
            "--forms",
            "conv,tokens",
            "--reps",
            "1",
        ])
        .args(args)
        .output()
        .expect("run ane bench")
}

#[test]
fn both_engines_are_timed_on_the_same_shapes() {
    let out = bench(&["--engine", "both", "--stand-in-coreml"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &serde_json::Value| v.get("form").is_some())
        .collect();
    let labels: Vec<&str> = rows.iter().map(|r| r["label"].as_str().unwrap()).collect();
    if cfg!(target_vendor = "apple") {
        return;
    }
    assert_eq!(
        labels,
        [
            "reference (CPU, not ANE)",
            "reference (CPU, not ANE)",
            "coreml stand-in (reference, not Core ML)",
            "coreml stand-in (reference, not Core ML)"
        ]
    );
    for r in &rows {
        assert_eq!(r["ane"], false, "{r}");
        assert!(r["engine_ms"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["max_rel_err"].as_f64().unwrap() < 1e-2, "{r}");
    }
}

#[cfg(not(target_vendor = "apple"))]
#[test]
fn core_ml_alone_off_macos_is_a_clear_error() {
    let out = bench(&["--engine", "coreml"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Core ML: not macOS"), "{err}");
}

/// The int8-weight probe's row: timed on the reference engine off macOS, its error against the
/// f32 product of the dequantized weights as small as the fp16 form's, and its weight bytes
/// about half of fp16's (int8 plus one fp16 scale per 32 values: 17/32).
#[test]
fn the_int8_form_has_a_row_with_its_weight_bytes() {
    let out = Command::new(env!("CARGO_BIN_EXE_ane"))
        .args([
            "bench",
            "--json",
            "--shapes",
            "192x256x64",
            "--forms",
            "int8",
        ])
        .args(["--reps", "1", "--reference"])
        .output()
        .expect("run ane bench");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &serde_json::Value| v.get("form").is_some())
        .collect();
    assert_eq!(rows.len(), 1, "{rows:?}");
    let r = &rows[0];
    assert_eq!(
        (&r["form"], &r["engine"]),
        (&"int8".into(), &"reference".into())
    );
    assert!(r["error"].is_null(), "{r}");
    assert!(r["engine_ms"].as_f64().unwrap() > 0.0, "{r}");
    assert!(r["max_rel_err"].as_f64().unwrap() < 1e-2, "{r}");
    let w = &r["weights"];
    assert_eq!(w["int8_bytes"], 192 * 256, "{w}");
    assert_eq!(w["scale_bytes"], 192 * 256 / 32 * 2, "{w}");
    assert_eq!(w["fp16_bytes"], 192 * 256 * 2, "{w}");
    assert_eq!(w["ratio"], 17.0 / 32.0, "{w}");
    // K not whole blocks: refused with the reason, not a panic.
    let out = Command::new(env!("CARGO_BIN_EXE_ane"))
        .args([
            "bench",
            "--shapes",
            "64x80x64",
            "--forms",
            "int8",
            "--reference",
        ])
        .output()
        .expect("run ane bench");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Q8_0 blocks"));
}
