//! Test step `fuzz`: the MIL parser, the blob reader and the GGUF reader take bytes from files
//! the plugin does not control, so they must reject any input without panicking or reading out
//! of bounds. Their arbitrary-bytes property tests (`--test bad_input`, on stable) always run;
//! then `cargo +nightly fuzz` runs each libFuzzer target for 30 s when nightly and cargo-fuzz are
//! installed. When they are not, or a nightly build breaks, the step says so loudly instead of
//! passing quietly.

use std::process::Command;
use std::time::Duration;

use crate::util::{self, bail, Result};

/// Seconds each `cargo fuzz` target runs in the `fuzz` step.
const FUZZ_SECS: u32 = 30;

/// Targets in `fuzz/fuzz_targets/`.
const FUZZ_TARGETS: [&str; 3] = ["mil_parse", "blob_read", "gguf_parse"];

/// The stable property-test twins always run; the libFuzzer targets run when `cargo +nightly fuzz`
/// works here, and the summary says which of the two ran.
pub(crate) fn step() -> Result<String> {
    util::run(util::cargo().args([
        "test",
        "-p",
        "ane-mil",
        "-p",
        "ane-plan",
        "--test",
        "bad_input",
    ]))?;
    let have_fuzz = Command::new("cargo")
        .args(["+nightly", "fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have_fuzz {
        let msg = "cargo-fuzz or the nightly toolchain is missing: ONLY the property-test twins \
                   ran, NO fuzzing (install: rustup toolchain install nightly; cargo install \
                   cargo-fuzz)";
        println!("\n!!! fuzz: {msg}\n");
        return Ok(format!("property tests passed; {msg}"));
    }
    let mut ran = Vec::new();
    for target in FUZZ_TARGETS {
        let res = util::run_logged(
            Command::new("cargo")
                .args([
                    "+nightly",
                    "fuzz",
                    "run",
                    "--fuzz-dir",
                    "fuzz",
                    target,
                    "--",
                ])
                .arg(format!("-max_total_time={FUZZ_SECS}")),
            &format!("fuzz-{target}"),
            Duration::from_secs(600),
        )?;
        let build_failed = !res.success()
            && !res.stderr.contains("libFuzzer")
            && (res.stderr.contains("could not compile")
                || res.stderr.contains("error: failed to"));
        if build_failed {
            // The nightly toolchain moves; a fuzz build broken by it is not a finding about our
            // code (the same code compiles on stable above). Say so loudly, don't hide it.
            println!(
                "\n!!! fuzz: building target {target} with nightly failed: NO fuzzing for it ({})\n",
                res.where_logged()
            );
            ran.push(format!("{target} NOT RUN (nightly build failed)"));
            continue;
        }
        if !res.success() {
            bail!(
                "fuzz target {target} found a crash ({}):\n{}\n{}",
                res.status_text(),
                res.stderr_tail(30),
                res.where_logged()
            );
        }
        let runs = res
            .stderr
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix("Done ")?.split(' ').next())
            .unwrap_or("?")
            .to_string();
        ran.push(format!("{target} {runs} runs"));
    }
    Ok(format!(
        "property tests passed; cargo fuzz clean for {FUZZ_SECS}s each: {}",
        ran.join(", ")
    ))
}
