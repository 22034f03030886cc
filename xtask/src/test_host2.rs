//! `cargo xtask test` step `host2`: the plugin in the llama.cpp builds users have.
//!
//! One plugin binary serves ggml backend API 2 and API 3 (crates/ggml/src/host_api.rs tells them
//! apart at load). This step proves it on a real API 2 host, llama.cpp b11349 (`llama::API2`,
//! built by set-up next to b11434): `test-backend-ops -b ANE -o MUL_MAT` on the reference engine
//! with every claimed case passing, and greedy text with the plugin identical to CPU-only on the
//! tiny f16 and q8_0 models with MUL_MATs offloaded. Then a host of a version the plugin does not
//! speak (`tests/c/fake_host.c`, exporting `ggml_version()` as ggml 0.27.0 and as 0.15.0 would)
//! must get score 0, a NULL registry and exactly one `ggml-ane:` line naming its version and the
//! supported ones.

use std::process::Command;
use std::time::Duration;

use crate::llama::{self, API2};
use crate::test::{self, Prereqs};
use crate::util::{self, abs, bail, Result};

/// b11349's suite has 1689 MUL_MAT cases, 360 of which its CPU judge does not support; the plugin
/// claims 1325 of the other 1329 (4 declined as `tiny_output`), measured. A floor that catches a
/// plugin that stopped claiming a whole type on this host.
const MIN_CLAIMED_OPS: usize = 1300;

pub(crate) fn step(pre: &mut Prereqs) -> Result<String> {
    let plugin = pre.plugin()?;
    pre.models()?;
    llama::build(&API2, false)?;
    let ops = ops(&plugin)?;
    let text = texts(&plugin)?;
    let refused = unknown_hosts(&plugin)?;
    Ok(format!(
        "{} {}: {ops}; {text}; {refused}",
        API2.name, API2.ggml
    ))
}

fn ops(plugin: &std::path::Path) -> Result<String> {
    let (c, res) = test::backend_ops(
        &API2,
        plugin,
        &["-o", "MUL_MAT"],
        &[],
        "test-backend-ops-b11349",
    )?;
    let summary = format!(
        "test-backend-ops MUL_MAT {} ({:.0}s)",
        c.summary(),
        res.elapsed.as_secs_f64()
    );
    println!("{summary}");
    test::ops_verdict_at_least(&c, &res, &summary, 0, MIN_CLAIMED_OPS)?;
    Ok(summary)
}

fn texts(plugin: &std::path::Path) -> Result<String> {
    let mut parts = Vec::new();
    for dtype in ["f16", "q8_0"] {
        let model = crate::models::path(dtype);
        let timeout = Duration::from_secs(300);
        let cpu = test::run_completion(
            &mut test::completion_on(&API2, &model, None, 24, &[]),
            &format!("host2-{dtype}-cpu"),
            timeout,
        )?;
        let ane = test::run_completion(
            test::completion_on(&API2, &model, Some(plugin), 24, &[]).env("GGML_ANE_STATS", "json"),
            &format!("host2-{dtype}-ane"),
            timeout,
        )?;
        for (what, run) in [("CPU-only", &cpu), ("with the plugin", &ane)] {
            if !run.success() {
                bail!(
                    "{dtype}: b11349 llama-completion {what} {}:\n{}\n{}",
                    run.status_text(),
                    run.stderr_tail(15),
                    run.where_logged()
                );
            }
        }
        let (cpu_text, ane_text) = (test::generated(&cpu.stdout), test::generated(&ane.stdout));
        if cpu_text.trim().is_empty() || cpu_text != ane_text {
            bail!(
                "{dtype}: b11349 greedy text differs\n  cpu: {cpu_text:?}\n  ane: {ane_text:?}\n{}",
                ane.where_logged()
            );
        }
        let n = test::stats_ops_offloaded(&ane.stderr)?;
        if n == 0 {
            bail!(
                "{dtype}: the plugin offloaded nothing on b11349; {}",
                ane.where_logged()
            );
        }
        parts.push(format!("{dtype} text identical, {n} MUL_MATs offloaded"));
    }
    Ok(parts.join(", "))
}

fn unknown_hosts(plugin: &std::path::Path) -> Result<String> {
    let dir = abs("target/xtask-shim");
    std::fs::create_dir_all(&dir)?;
    let exe = dir.join("fake_host");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    util::run(
        Command::new(&cc)
            .arg("-O1")
            .arg("-rdynamic")
            .arg("-o")
            .arg(&exe)
            .arg(abs("tests/c/fake_host.c"))
            .arg("-ldl"),
    )?;
    for version in ["0.27.0", "0.15.0"] {
        let out = Command::new(&exe)
            .arg(plugin)
            .arg(version)
            .env_remove("GGML_ANE_ENGINE")
            .output()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() || stdout.trim() != "score=0 init=null" {
            bail!(
                "fake host ggml {version}: {} {stdout:?}\n{stderr}",
                out.status
            );
        }
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        let ok = lines.len() == 1
            && lines[0].starts_with("ggml-ane: not loading:")
            && lines[0].contains(&format!("ggml {version}"))
            && lines[0].contains("API 2")
            && lines[0].contains("API 3");
        if !ok {
            bail!("fake host ggml {version}: expected one `ggml-ane: not loading:` line, got:\n{stderr}");
        }
    }
    Ok("ggml 0.27.0 and 0.15.0 hosts refused in one line each (score 0, no registry)".into())
}
