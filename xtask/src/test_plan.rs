//! Test step `plan`: the planner's promises checked inside real llama.cpp.
//!
//! 1. The plugin compiles exactly the programs `ane plan` predicts for the same model and prompt,
//!    and dispatches as often: the CLI and the plugin share one planner, and this proves the graph
//!    model `ane plan` uses matches what llama.cpp actually sends.
//!    With the lookahead off too, and no byte is copied between host and engine surfaces.
//! 2. With `GGML_ANE_CHIP=m1` (axis limit 16384), a model whose vocabulary is 20048 tokens has its
//!    LM head offloaded in row tiles and still generates the CPU's greedy text.
//! 3. The lookahead under engine eval faults still gives the CPU's text.
//! 4. Cost routing with costs that split the tiny model's MUL_MATs: the plugin declines exactly
//!    what `ane plan --route cost` keeps on the CPU.
//! 5. The channel-first program layout (`GGML_ANE_LAYOUT=channels`; token-major is the default)
//!    generates the CPU's text too.
//! 6. Compressed weights (`GGML_ANE_WEIGHTS=compressed`): the Q8_0 and Q4_0 models generate the
//!    CPU's text with their lone weights in baked programs (`baked_mb > 0`).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::models;
use crate::test::{completion, generated, json_u64, run_completion, Prereqs};
use crate::util::{self, abs, bail, Result};

/// The largest value of `key` over all `ggml-ane-stats:` lines (the plugin prints one per freed
/// backend; the last context is the one that ran the prompt).
fn stat(stderr: &str, key: &str) -> Result<u64> {
    stderr
        .lines()
        .filter_map(|l| l.strip_prefix("ggml-ane-stats: "))
        .filter_map(|j| json_u64(j, key))
        .max()
        .ok_or_else(|| format!("no `{key}` in any ggml-ane-stats line").into())
}

/// The largest value of the number `key` (integer or decimal) over all `ggml-ane-stats:` lines.
fn stat_f64(stderr: &str, key: &str) -> Result<f64> {
    let pat = format!("\"{key}\":");
    stderr
        .lines()
        .filter_map(|l| l.strip_prefix("ggml-ane-stats: "))
        .filter_map(|j| {
            let rest = j[j.find(&pat)? + pat.len()..].trim_start();
            let end = rest
                .find(|c: char| !(c.is_ascii_digit() || matches!(c, '.' | '-' | 'e' | 'E' | '+')))
                .unwrap_or(rest.len());
            rest[..end].parse::<f64>().ok()
        })
        .reduce(f64::max)
        .ok_or_else(|| format!("no `{key}` in any ggml-ane-stats line").into())
}

/// Prompt tokens, from llama.cpp's `prompt eval time = ... / N tokens` line.
fn prompt_tokens(stderr: &str) -> Option<usize> {
    let line = stderr.lines().find(|l| l.contains("prompt eval time"))?;
    let rest = &line[line.find(" / ")? + 3..];
    rest.split_whitespace().next()?.parse().ok()
}

/// Runs `model` CPU-only and with the plugin plus `env` (stats on), both 16 greedy tokens;
/// fails if either run fails. Returns (CPU text, plugin text, plugin run).
fn cpu_vs_plugin(
    plugin: &Path,
    model: &Path,
    extra: &[&str],
    env: &[(&str, &str)],
    name: &str,
) -> Result<(String, String, util::Logged)> {
    let timeout = Duration::from_secs(300);
    let cpu = run_completion(
        &mut completion(model, None, 16, extra),
        &format!("{name}-cpu"),
        timeout,
    )?;
    let mut cmd = completion(model, Some(plugin), 16, extra);
    cmd.env("GGML_ANE_STATS", "json").envs(env.iter().copied());
    let ane = run_completion(&mut cmd, &format!("{name}-ane"), timeout)?;
    if !cpu.success() || !ane.success() {
        bail!(
            "{name}: cpu {}, ane {}\n{}\n{}",
            cpu.status_text(),
            ane.status_text(),
            ane.stderr_tail(15),
            ane.where_logged()
        );
    }
    let (ct, at) = (
        generated(&cpu.stdout).to_string(),
        generated(&ane.stdout).to_string(),
    );
    Ok((ct, at, ane))
}

pub(crate) fn step(pre: &mut Prereqs) -> Result<String> {
    let plugin = pre.plugin()?;
    pre.llama()?;
    pre.models()?;
    util::run(util::cargo().args(["build", "--release", "-p", "ane-cli"]))?;
    let ane = abs("target/release/ane");
    let timeout = Duration::from_secs(300);

    // 1. compile and dispatch counts against `ane plan`, with the cross-split lookahead (default)
    //    and without it.
    let model = models::path("f16");
    let mut counts = Vec::new();
    let mut staging = String::new();
    for lookahead in [true, false] {
        let label = if lookahead {
            "plan-counts"
        } else {
            "plan-counts-nolookahead"
        };
        let mut cmd = completion(&model, Some(&plugin), 8, &[]);
        cmd.env("GGML_ANE_STATS", "json")
            .env("GGML_ANE_LOOKAHEAD", if lookahead { "1" } else { "0" });
        let run = run_completion(&mut cmd, label, timeout)?;
        if !run.success() {
            bail!(
                "llama-completion with the plugin {}:\n{}\n{}",
                run.status_text(),
                run.stderr_tail(15),
                run.where_logged()
            );
        }
        let tokens = prompt_tokens(&run.stderr)
            .ok_or_else(|| format!("no prompt token count in the log; {}", run.where_logged()))?;
        let compiled = stat(&run.stderr, "programs_compiled")?;
        let dispatches = stat(&run.stderr, "dispatches")?;
        let hits = stat(&run.stderr, "lookahead_hits")?;
        let wasted =
            stat(&run.stderr, "lookahead_wasted")? + stat(&run.stderr, "lookahead_mismatch")?;
        let mut plan_cmd = Command::new(&ane);
        plan_cmd.args([
            "plan",
            "--json",
            "--prompt-lengths",
            &tokens.to_string(),
            "--model",
        ]);
        plan_cmd.arg(&model);
        if !lookahead {
            plan_cmd.arg("--no-lookahead");
        }
        let plan = util::read(&mut plan_cmd)?;
        let planned =
            json_u64(&plan, "programs_total").ok_or("no programs_total in `ane plan --json`")?;
        let planned_dispatches =
            json_u64(&plan[plan.find("\"rows\"").unwrap_or(0)..], "dispatches")
                .ok_or("no rows[0].dispatches in `ane plan --json`")?;
        println!("lookahead {lookahead}: prompt {tokens} tokens: plugin compiled {compiled}, dispatched {dispatches} (lookahead hits {hits}, wasted {wasted}); ane plan: {planned} programs, {planned_dispatches} dispatches");
        if compiled != planned || dispatches != planned_dispatches {
            bail!(
                "lookahead {lookahead}: plugin and planner disagree: compiled {compiled} vs planned {planned}, dispatches {dispatches} vs planned {planned_dispatches}\n{}",
                run.where_logged()
            );
        }
        // Weights, activations and outputs live in engine surfaces: nothing is copied.
        let copied = stat_f64(&run.stderr, "mb_copied")?;
        if copied != 0.0 {
            bail!(
                "lookahead {lookahead}: {copied} MiB copied between host and engine surfaces; every dispatch should bind engine memory\n{}",
                run.where_logged()
            );
        }
        // With the lookahead every group is known at load and staged then (into the surfaces its
        // dispatches bind); without it single weights are converted at load and stacked into
        // their group's surface by its first dispatch.
        let (at_load, by_dispatch) = (
            stat(&run.stderr, "groups_staged_load")?,
            stat(&run.stderr, "groups_staged_dispatch")?,
        );
        if lookahead && (at_load == 0 || by_dispatch != 0) || !lookahead && by_dispatch == 0 {
            bail!(
                "lookahead {lookahead}: weight groups staged at load {at_load}, by a dispatch {by_dispatch}\n{}",
                run.where_logged()
            );
        }
        if lookahead {
            staging =
                format!("weight groups staged at load {at_load}, inside the prompt {by_dispatch}");
        }
        // Each layer's V and K come from Q's dispatch, and nothing speculated is thrown away.
        if lookahead && (hits == 0 || wasted != 0) || !lookahead && hits != 0 {
            bail!(
                "lookahead {lookahead}: {hits} outputs taken, {wasted} wasted or refused\n{}",
                run.where_logged()
            );
        }
        counts.push((
            tokens,
            compiled,
            planned,
            dispatches,
            planned_dispatches,
            hits,
        ));
    }
    let (tokens, compiled, planned, dispatches, planned_dispatches, hits) = counts[0];
    let off_dispatches = counts[1].3;
    if dispatches >= off_dispatches {
        bail!("lookahead saved no dispatch: {dispatches} with, {off_dispatches} without");
    }

    // 2. LM head beyond the M1 axis limit, tiled.
    let big = models::big_vocab()?;
    let cpu = run_completion(
        &mut completion(&big, None, 16, &[]),
        "plan-bigvocab-cpu",
        timeout,
    )?;
    let ane_run = run_completion(
        completion(&big, Some(&plugin), 16, &[])
            .env("GGML_ANE_STATS", "json")
            .env("GGML_ANE_CHIP", "m1")
            .env("GGML_ANE_MIN_BATCH", "1"),
        "plan-bigvocab-ane",
        timeout,
    )?;
    if !cpu.success() || !ane_run.success() {
        bail!(
            "big-vocab runs failed: cpu {}, ane {}\n{}",
            cpu.status_text(),
            ane_run.status_text(),
            ane_run.where_logged()
        );
    }
    let (ct, at) = (generated(&cpu.stdout), generated(&ane_run.stdout));
    println!("bigvocab CPU: {ct:?}\nbigvocab ANE: {at:?}");
    if ct.trim().is_empty() || ct != at {
        bail!(
            "big-vocab greedy text differs or is empty\n  cpu: {ct:?}\n  ane: {at:?}\n{}",
            ane_run.where_logged()
        );
    }
    let tiled = stat(&ane_run.stderr, "dispatches_tiled")?;
    let fallback = stat(&ane_run.stderr, "ops_fallback")?;
    if tiled == 0 || fallback != 0 {
        bail!("LM head (20048 rows > 16384 on m1): {tiled} tiled dispatches, {fallback} fallbacks; expected tiles and no fallback\n{}", ane_run.where_logged());
    }
    // 3. Lookahead under engine faults: Q+V+K dispatches that fail are computed by the CPU path,
    //    stash included, and the text stays the same.
    let (ct, ft, frun) = cpu_vs_plugin(
        &plugin,
        &model,
        &[],
        &[("GGML_ANE_FAULTS", "eval=0.5,seed=7")],
        "plan-lookahead-faults",
    )?;
    let (fhits, ffb) = (
        stat(&frun.stderr, "lookahead_hits")?,
        stat(&frun.stderr, "ops_fallback")?,
    );
    if ct.trim().is_empty() || ct != ft || fhits == 0 || ffb == 0 {
        bail!(
            "lookahead with eval faults: text {ft:?} vs CPU {ct:?}, {fhits} taken, {ffb} fallbacks (want both > 0)\n{}",
            frun.where_logged()
        );
    }
    // 3b. Two ubatches of the prompt: the first one is a pass over the model, so the groups
    //     staged at load that it did not use (the last layer's FFN, computed for one row) are
    //     released when the second starts; the text stays the CPU's.
    let (ct, ut, urun) = cpu_vs_plugin(
        &plugin,
        &model,
        &["-ub", "64"],
        &[("GGML_ANE_MIN_BATCH", "16")],
        "plan-release-unused",
    )?;
    let (released, u_dispatch) = (
        stat(&urun.stderr, "groups_released")?,
        stat(&urun.stderr, "groups_staged_dispatch")?,
    );
    if ct.trim().is_empty() || ct != ut || released == 0 || u_dispatch != 0 {
        bail!(
            "two ubatches: text {ut:?} vs CPU {ct:?}, {released} groups released (want > 0), {u_dispatch} staged by a dispatch (want 0)\n{}",
            urun.where_logged()
        );
    }
    staging.push_str(&format!(
        ", {released} unused released after a 64-token ubatch"
    ));
    // 4. Cost routing (GGML_ANE_ROUTE=cost) with costs under which the tiny model's small
    //    projections (K, V) lose to the CPU and the others win: the plugin declines exactly what
    //    `ane plan --route cost` keeps on the CPU, and the text stays the CPU's.
    let costs = "dispatch_ms=0.01,peak_tflops=1,half_gflop=0,cpu_tflops=0.5,matmul_penalty=1,sram_bytes=1e12";
    let (ct, rt, rrun) = cpu_vs_plugin(
        &plugin,
        &model,
        &[],
        &[("GGML_ANE_ROUTE", "cost"), ("GGML_ANE_COST", costs)],
        "plan-route-cost",
    )?;
    let rplan = util::read(
        Command::new(&ane)
            .args([
                "plan",
                "--json",
                "--route",
                "cost",
                "--cost",
                costs,
                "--prompt-lengths",
            ])
            .arg(tokens.to_string())
            .arg("--model")
            .arg(&model),
    )?;
    let (r_compiled, r_dispatches) = (
        stat(&rrun.stderr, "programs_compiled")?,
        stat(&rrun.stderr, "dispatches")?,
    );
    let r_planned = json_u64(&rplan, "programs_total").ok_or("no programs_total")?;
    let r_planned_d = json_u64(&rplan[rplan.find("\"rows\"").unwrap_or(0)..], "dispatches")
        .ok_or("no rows[0].dispatches")?;
    let r_declined = stat(&rrun.stderr, "cost_model")?;
    let r_offloaded = stat(&rrun.stderr, "ops_offloaded")?;
    println!("route cost: plugin compiled {r_compiled}, dispatched {r_dispatches}, {r_offloaded} offloaded, {r_declined} cost_model declines; ane plan {r_planned} programs, {r_planned_d} dispatches");
    if ct.trim().is_empty()
        || ct != rt
        || r_compiled != r_planned
        || r_dispatches != r_planned_d
        || r_declined == 0
        || r_offloaded == 0
    {
        bail!(
            "cost routing: text {rt:?} vs CPU {ct:?}; compiled {r_compiled} vs planned {r_planned}, dispatches {r_dispatches} vs planned {r_planned_d}, {r_declined} declined, {r_offloaded} offloaded (want a mix)\n{}",
            rrun.where_logged()
        );
    }
    // 5. The channel-first program layout (GGML_ANE_LAYOUT=channels) gives the same text.
    let mut layouts = Vec::new();
    for dtype in ["f16", "q4_0"] {
        let model = models::path(dtype);
        let extra: &[&str] = if dtype == "q4_0" {
            &["--no-repack"]
        } else {
            &[]
        };
        let (ct, tt, tok) = cpu_vs_plugin(
            &plugin,
            &model,
            extra,
            &[("GGML_ANE_LAYOUT", "channels")],
            &format!("plan-channels-{dtype}"),
        )?;
        let offloaded = stat(&tok.stderr, "ops_offloaded")?;
        if ct.trim().is_empty() || ct != tt || offloaded == 0 {
            bail!(
                "channel-first layout, {dtype}: text {tt:?} vs CPU {ct:?}, {offloaded} offloaded\n{}",
                tok.where_logged()
            );
        }
        layouts.push(format!("{dtype} {offloaded} ops"));
    }
    // 6. Compressed weights: baked programs for the lone Q8_0/Q4_0 weights, same text.
    let mut baked = Vec::new();
    for dtype in ["q8_0", "q4_0"] {
        let model = models::path(dtype);
        let extra: &[&str] = if dtype == "q4_0" {
            &["--no-repack"]
        } else {
            &[]
        };
        let (ct, at, run) = cpu_vs_plugin(
            &plugin,
            &model,
            extra,
            &[("GGML_ANE_WEIGHTS", "compressed")],
            &format!("plan-compressed-{dtype}"),
        )?;
        let mb = stat_f64(&run.stderr, "baked_mb")?;
        let offloaded = stat(&run.stderr, "ops_offloaded")?;
        let fallback = stat(&run.stderr, "ops_fallback")?;
        println!("compressed {dtype}: CPU {ct:?}\ncompressed {dtype}: ANE {at:?} ({mb:.3} MiB baked, {offloaded} offloaded, {fallback} fallbacks)");
        if ct.trim().is_empty() || ct != at || mb <= 0.0 || offloaded == 0 {
            bail!(
                "compressed weights, {dtype}: text {at:?} vs CPU {ct:?}, baked_mb {mb}, {offloaded} offloaded\n{}",
                run.where_logged()
            );
        }
        // The planner's compressed model must predict the plugin's programs and baked bytes.
        let compiled = stat(&run.stderr, "programs_compiled")?;
        let plan = util::read(
            Command::new(&ane)
                .args([
                    "plan",
                    "--json",
                    "--compressed",
                    dtype,
                    "--prompt-lengths",
                    &tokens.to_string(),
                    "--model",
                ])
                .arg(&model),
        )?;
        let planned =
            json_u64(&plan, "programs_total").ok_or("no programs_total in `ane plan --json`")?;
        if compiled != planned {
            bail!("compressed {dtype}: plugin compiled {compiled} programs, `ane plan --compressed` predicts {planned}\n{}", run.where_logged());
        }
        baked.push(format!(
            "{dtype} {mb:.2} MiB baked, {compiled} programs = planned"
        ));
    }
    Ok(format!(
        "programs {compiled} = planned {planned}, dispatches {dispatches} = planned {planned_dispatches} ({tokens}-token prompt, 0 bytes copied, {staging}; {hits} MUL_MATs from lookahead, {off_dispatches} dispatches without it = planned; with eval faults text identical, {fhits} taken, {ffb} fallbacks); cost routing: {r_dispatches} dispatches = planned, {r_declined} declines, text identical; m1 LM head 20048 rows: {tiled} tiled dispatches, text identical; channel-first layout identical ({}); compressed weights identical ({})",
        layouts.join(", "),
        baked.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_prompt_tokens_and_stats() {
        let log = "0.00.051.137 I common_perf_print: prompt eval time =      18.27 ms /   113 tokens (    0.16 ms per token)\n\
                   ggml-ane-stats: {\"dispatches\":0,\"programs_compiled\":0}\n\
                   ggml-ane-stats: {\"dispatches\":8,\"programs_compiled\":3}\n";
        assert_eq!(prompt_tokens(log), Some(113));
        assert_eq!(stat(log, "programs_compiled").unwrap(), 3);
        assert_eq!(stat(log, "dispatches").unwrap(), 8);
        assert!(stat(log, "nothing").is_err());
        let log =
            "ggml-ane-stats: {\"baked_mb\":0.0,\"x\":1}\nggml-ane-stats: {\"baked_mb\":1.25e0}\n";
        assert_eq!(stat_f64(log, "baked_mb").unwrap(), 1.25);
        assert!(stat_f64(log, "staged_mb").is_err());
    }
}
