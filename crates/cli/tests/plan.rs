//! `ane plan --ram`: the staging budget a machine's memory gives, and what of a model stays
//! resident and what streams every ubatch (the plugin's rules, `ane_plan::staging`).

use std::process::Command;

#[test]
fn ram_gives_the_budget_and_the_resident_and_streamed_weights() {
    let out = Command::new(env!("CARGO_BIN_EXE_ane"))
        .args([
            "plan",
            "--preset",
            "llama3-8b",
            "--ram",
            "16",
            "--prompt-lengths",
            "512",
        ])
        .args(["--json"])
        .output()
        .expect("ane runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let s = &v["staging"]["plan"];
    assert_eq!(s["budget_mb"], 4096, "a quarter of 16 GB");
    let (resident, stream, total) = (
        s["resident_mb"].as_f64().unwrap(),
        s["stream_mb_per_ubatch"].as_f64().unwrap(),
        s["fp16_mb"].as_f64().unwrap(),
    );
    let ring = s["ring_mb"].as_f64().unwrap();
    assert!(
        ring > 0.0 && resident + ring <= 4096.0 && resident > 3000.0,
        "{resident} {ring}"
    );
    assert!((resident + stream - total).abs() < 1e-6);
    // A machine with room for all of it streams nothing.
    let out = Command::new(env!("CARGO_BIN_EXE_ane"))
        .args([
            "plan",
            "--preset",
            "llama3-8b",
            "--ram",
            "128",
            "--prompt-lengths",
            "512",
        ])
        .output()
        .expect("ane runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("budget 32768 MiB") && text.contains("streamed 0 MiB"),
        "{text}"
    );
}
