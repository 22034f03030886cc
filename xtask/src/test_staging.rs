//! Test step `staging`: prefill with a staging budget far below the model's fp16 size.
//!
//! The device needs each weight as fp16, so the plugin keeps fp16 copies, up to
//! `GGML_ANE_STAGE_MAX_MB`: a resident set admitted in graph order, the groups beyond it converted
//! for each dispatch (`crates/ggml/src/matmul/staging.rs`). This step runs SmolLM2 135M Q8_0 with
//! a prompt of several ubatches (`-ub 64`) unbounded, then at budgets of 100%, 50% and 20% of the
//! fp16 bytes the unbounded run held, and checks, against the unbounded run in the same step:
//! greedy text identical, every prefill matmul still on the device, the most bytes held at once
//! within the budget (streaming rings included), something streamed below 100% and, with the
//! background ring (`GGML_ANE_STREAM=ahead`), groups found converted ahead. It prints the cost:
//! streamed MiB per ubatch, the time dispatches waited for conversions (at 20% also without the
//! ring, `inline`), and prompt t/s as a ratio to the unbounded run (reference engine: CPU
//! figures, not the ANE's). One more unbounded run with `GGML_ANE_INT8_INPUT=1` (the Q8_0 weights
//! staged as int8 plus host block scales, `crates/ggml/src/matmul/int8.rs`) checks greedy text
//! identical, groups staged as int8, and a staged peak below the fp16 run's (the ratio printed).

use std::time::Duration;

use crate::test::{self, stat_f64, Prereqs};
use crate::util::{bail, Result};
use crate::{llama, models};

/// Prompt tokens per second (`prompt eval time = ... tokens per second)`).
fn prompt_tps(stderr: &str) -> f64 {
    stderr
        .lines()
        .find(|l| l.contains("prompt eval time"))
        .and_then(|l| l.split(',').nth(1))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

struct Run {
    text: String,
    stderr: String,
}

fn run(plugin: &std::path::Path, budget_mb: Option<f64>, stream: &str, name: &str) -> Result<Run> {
    run_env(plugin, budget_mb, stream, name, &[])
}

fn run_env(
    plugin: &std::path::Path,
    budget_mb: Option<f64>,
    stream: &str,
    name: &str,
    env: &[(&str, &str)],
) -> Result<Run> {
    let model = models::smollm2_as("Q8_0")?;
    let prompt = crate::bench_fallback::TEXT_PROMPT;
    let mut cmd = std::process::Command::new(llama::bin("llama-completion"));
    cmd.arg("-m")
        .arg(&model)
        .args([
            "-p", prompt, "-n", "16", "-no-cnv", "--temp", "0", "-t", "2",
        ])
        .args([
            "--no-warmup",
            "-ub",
            "64",
            "-b",
            "64",
            "-ngl",
            "0",
            "--no-repack",
        ])
        .env("GGML_BACKEND_PATH", plugin)
        .env("GGML_ANE_ENGINE", "reference")
        .env("GGML_ANE_STATS", "json")
        .env("GGML_ANE_STREAM", stream)
        .env("OMP_WAIT_POLICY", test::OMP_WAIT_POLICY)
        .envs(env.iter().copied());
    match budget_mb {
        Some(mb) => cmd.env("GGML_ANE_STAGE_MAX_MB", format!("{}", mb.ceil().max(1.0))),
        // Unbounded: far above the model.
        None => cmd.env("GGML_ANE_STAGE_MAX_MB", "65536"),
    };
    crate::exit_drain::apply(&mut cmd);
    let res = test::run_completion(&mut cmd, name, Duration::from_secs(900))?;
    if !res.success() {
        bail!(
            "{name}: llama-completion {}\n{}\n{}",
            res.status_text(),
            res.stderr_tail(10),
            res.where_logged()
        );
    }
    Ok(Run {
        text: test::generated_from(&res.stdout, prompt).to_string(),
        stderr: res.stderr,
    })
}

pub(crate) fn step(pre: &mut Prereqs) -> Result<String> {
    let plugin = pre.plugin()?;
    pre.llama()?;
    let full = run(&plugin, None, "ahead", "staging-unbounded")?;
    let fp16_mb = stat_f64(&full.stderr, "staged_peak_mb");
    let ops = test::stat(&full.stderr, "ops_offloaded");
    let base_tps = prompt_tps(&full.stderr);
    if fp16_mb <= 0.0 || ops == 0 || stat_f64(&full.stderr, "stream_mb") != 0.0 {
        bail!(
            "staging-unbounded: staged peak {fp16_mb:.1} MiB, {ops} ops, stream {} MiB (want > 0, \
             > 0, 0)",
            stat_f64(&full.stderr, "stream_mb")
        );
    }
    // Ubatches of the prompt: its tokens / 64.
    let ubatches = full
        .stderr
        .lines()
        .find(|l| l.contains("prompt eval time"))
        .and_then(|l| l.split(" / ").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse::<f64>().ok())
        .map_or(1.0, |t| (t / 64.0).ceil());
    let mut lines = vec![format!(
        "unbounded: {fp16_mb:.1} MiB staged, {ops} matmuls on the device, {base_tps:.1} prompt t/s"
    )];
    println!("{}", lines[0]);
    // int8 weights as a program input, unbounded: same text in fewer staged bytes.
    let int8 = run_env(
        &plugin,
        None,
        "ahead",
        "staging-int8",
        &[("GGML_ANE_INT8_INPUT", "1")],
    )?;
    let (int8_mb, int8_groups, int8_ops) = (
        stat_f64(&int8.stderr, "staged_peak_mb"),
        test::stat(&int8.stderr, "int8_groups"),
        test::stat(&int8.stderr, "ops_offloaded"),
    );
    if int8.text != full.text {
        bail!(
            "staging-int8: text differs from the fp16 run\n  {:?}\n  {:?}",
            int8.text,
            full.text
        );
    }
    if int8_groups == 0 || int8_ops != ops {
        bail!(
            "staging-int8: {int8_groups} groups staged as int8 (want > 0), {int8_ops} matmuls on \
             the device (fp16 run {ops}; canary: {})",
            int8.stderr
                .lines()
                .find(|l| l.contains("int8-input canary"))
                .unwrap_or("passed or not run")
        );
    }
    if int8_mb <= 0.0 || int8_mb >= fp16_mb {
        bail!("staging-int8: staged peak {int8_mb:.1} MiB, fp16 {fp16_mb:.1} MiB (want below)");
    }
    let line = format!(
        "int8 (GGML_ANE_INT8_INPUT=1): {int8_mb:.1} MiB staged peak against fp16's {fp16_mb:.1} \
         (ratio {:.3}), {int8_groups} groups staged as int8, text identical",
        int8_mb / fp16_mb
    );
    println!("{line}");
    lines.push(line);
    // The last run streams without the background thread: what the ring saves.
    let (mut ahead_wait, mut inline_wait) = (0.0, 0.0);
    for (pct, stream) in [
        (100u32, "ahead"),
        (50, "ahead"),
        (20, "ahead"),
        (20, "inline"),
    ] {
        let budget = fp16_mb * pct as f64 / 100.0;
        let r = run(
            &plugin,
            Some(budget),
            stream,
            &format!("staging-{pct}-{stream}"),
        )?;
        let (peak, stream_mb, wait, ahead) = (
            stat_f64(&r.stderr, "staged_peak_mb"),
            stat_f64(&r.stderr, "stream_mb"),
            stat_f64(&r.stderr, "convert_wait_ms"),
            test::stat(&r.stderr, "stream_ahead"),
        );
        let held = stat_f64(&r.stderr, "staged_mb");
        let ops_b = test::stat(&r.stderr, "ops_offloaded");
        if r.text != full.text {
            bail!(
                "staging at {pct}% ({stream}): text differs from the unbounded run\n  {:?}\n  {:?}",
                r.text,
                full.text
            );
        }
        if ops_b != ops {
            bail!("staging at {pct}% ({stream}): {ops_b} matmuls on the device, unbounded {ops}");
        }
        // Everything held at once, rings included, stays within the budget (rounded up to the
        // MiB the variable is given in).
        if peak > budget.ceil() + 0.01 || held > budget.ceil() + 0.01 {
            bail!(
                "staging at {pct}% ({stream}): peak {peak:.1} MiB, resident {held:.1} MiB over a \
                 {budget:.1} MiB budget"
            );
        }
        if pct < 100 && stream_mb == 0.0 {
            bail!("staging at {pct}% ({stream}): nothing streamed below the model's size");
        }
        match stream {
            "ahead" if pct < 100 && ahead == 0 => {
                bail!("staging at {pct}%: no streamed group was converted ahead")
            }
            "inline" if ahead != 0 => bail!("GGML_ANE_STREAM=inline converted {ahead} ahead"),
            "inline" => inline_wait = wait,
            _ if pct == 20 => ahead_wait = wait,
            _ => {}
        }
        let line = format!(
            "{pct}% {stream} ({budget:.1} MiB): resident {held:.1} MiB, peak {peak:.1} MiB, \
             streamed {:.1} MiB per ubatch ({ahead} groups converted ahead), {wait:.1} ms waited, \
             prompt t/s ratio {:.2}, text identical",
            stream_mb / ubatches,
            prompt_tps(&r.stderr) / base_tps.max(1e-9)
        );
        println!("{line}");
        lines.push(line);
    }
    let line = format!(
        "20%: dispatches waited {ahead_wait:.1} ms with the ring, {inline_wait:.1} ms inline \
         (ratio {:.2})",
        ahead_wait / inline_wait.max(1e-9)
    );
    println!("{line}");
    lines.push(line);
    Ok(lines.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_stats_and_speed() {
        let e = "a\nggml-ane-stats: {\"staged_peak_mb\":12.5,\"stream_mb\":0.0}\n\
                 x common_perf_print: prompt eval time =  100.0 ms /  200 tokens (0.5 ms per \
                 token,  2000.00 tokens per second)\n";
        assert_eq!(stat_f64(e, "staged_peak_mb"), 12.5);
        assert_eq!(stat_f64(e, "stream_mb"), 0.0);
        assert_eq!(prompt_tps(e), 2000.0);
    }
}
