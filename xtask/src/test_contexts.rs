//! Test step `contexts`: two llama contexts on one model decode at the same time from two
//! threads with the plugin loaded; every context's logits must equal those of a single-context
//! run, bit for bit. llama.cpp creates one backend instance per context, so this checks that the
//! device state they share (engine, kernel cache, staged weights, stats) is race-free under a
//! real host, beyond the Rust stress test and `test-backend-ops -j 2`.
//!
//! The driver is `tests/c/two_contexts.c`, compiled here with the system C compiler against the
//! llama.cpp build in `target/llama`.

use std::process::Command;
use std::time::Duration;

use crate::test::{json_u64, Prereqs};
use crate::util::{self, abs, bail, Result};
use crate::{llama, models};

const ROUNDS: &str = "8";

pub(crate) fn step(pre: &mut Prereqs) -> Result<String> {
    let plugin = pre.plugin()?;
    pre.llama()?;
    pre.models()?;
    let src = abs("target/llama/src");
    let bin_dir = llama::bin_dir();
    let exe = abs("target/xtask-c/two_contexts");
    std::fs::create_dir_all(abs("target/xtask-c"))?;
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    util::run(
        Command::new(&cc)
            .args(["-O2", "-Wall", "-Werror"])
            .arg("-I")
            .arg(src.join("include"))
            .arg("-I")
            .arg(src.join("ggml/include"))
            .arg(abs("tests/c/two_contexts.c"))
            .arg("-L")
            .arg(&bin_dir)
            .args(["-lllama", "-lggml", "-lggml-base", "-lpthread"])
            .arg(format!("-Wl,-rpath,{}", bin_dir.display()))
            .arg("-o")
            .arg(&exe),
    )?;
    let res = util::run_logged(
        Command::new(&exe)
            .arg(models::path("f16"))
            .arg(ROUNDS)
            .arg(&bin_dir)
            .env("GGML_BACKEND_PATH", &plugin)
            .env("GGML_ANE_ENGINE", "reference")
            .env("GGML_ANE_STATS", "json")
            .env("OMP_WAIT_POLICY", crate::test::OMP_WAIT_POLICY),
        "two-contexts",
        Duration::from_secs(300),
    )?;
    let offloaded = res
        .stderr
        .lines()
        .filter_map(|l| l.strip_prefix("ggml-ane-stats: "))
        .filter_map(|j| json_u64(j, "ops_offloaded"))
        .max()
        .unwrap_or(0);
    let summary = res
        .stdout
        .lines()
        .find(|l| l.starts_with("two_contexts:"))
        .unwrap_or("")
        .to_string();
    if !res.success() || !summary.contains(" 0 logit mismatches") || offloaded == 0 {
        bail!(
            "two concurrent contexts: {} ({summary}; ops offloaded {offloaded})\n{}\n{}",
            res.status_text(),
            res.stderr_tail(10),
            res.where_logged()
        );
    }
    Ok(format!("{summary}; {offloaded} MUL_MATs offloaded"))
}
