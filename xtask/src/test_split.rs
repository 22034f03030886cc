//! Part of test step `gpu`: the device and the GPU computing each prefill matmul together
//! (`crates/ggml/src/split.rs`), with llama.cpp's RPC backend as the GPU and the reference engine
//! as the device.
//!
//! * Forced GPU shares 0.25, 0.5 and 0.75 give the text of the RPC-only run (which share 0, the
//!   device alone, gives too) on the tiny f16 and q8_0 models, with split matmuls and the GPU's
//!   share of the work close to the one asked; share 1 makes the device decline (the GPU keeps
//!   the nodes); on SmolLM2 the texts are compared and reported (fp16 device rows beside the
//!   GPU's may part at a near tie).
//! * `auto` measures its shape classes and writes them to the cache folder; a second process
//!   reads them (nothing measured again) and gives the same text.
//! * An injected slow GPU moves the share to 0, an injected slow device towards 1, and a failing
//!   GPU part is computed by the CPU with the text unchanged.

use std::path::Path;

use crate::models;
use crate::test::stat_f64;
use crate::test_gpu::{complete_env, gpu_args, RpcServer, Run};
use crate::util::{self, bail, Result};

/// The `"share"` values of the `calibrations` in the plugin's stats JSON.
fn calibrated_shares(stderr: &str) -> Vec<f64> {
    let Some(line) = stderr.lines().find(|l| l.contains("ggml-ane-stats: ")) else {
        return Vec::new();
    };
    line.split("\"share\":")
        .skip(1)
        .filter_map(|r| {
            let end = r
                .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-' || c == 'e'))
                .unwrap_or(r.len());
            r[..end].parse().ok()
        })
        .collect()
}

/// One run beside the RPC GPU with the split's environment.
fn run(
    plugin: &Path,
    rpc: &RpcServer,
    model: &Path,
    prompt: &str,
    env: &[(&str, &str)],
    name: &str,
) -> Result<Run> {
    complete_env(
        model,
        prompt,
        16,
        &gpu_args(&rpc.endpoint, true),
        Some(plugin),
        &[],
        env,
        name,
    )
}

pub(crate) fn check(plugin: &Path, rpc: &RpcServer, real: &Path) -> Result<String> {
    let mut parts = Vec::new();
    let cache = util::abs("target/xtask-split-cache");
    let fresh = |tag: &str| -> Result<String> {
        let d = cache.join(tag);
        let _ = std::fs::remove_dir_all(&d);
        Ok(d.to_string_lossy().into_owned())
    };
    let long: String = crate::demo::PROMPT.chars().cycle().take(110).collect();

    // Forced shares.
    let cases = [
        ("f16", models::path("f16"), long.clone(), true),
        ("q8_0", models::path("q8_0"), long.clone(), true),
        (
            "smollm2-q8_0",
            real.to_path_buf(),
            crate::bench_fallback::TEXT_PROMPT.to_string(),
            false,
        ),
    ];
    for (tag, model, prompt, gate) in &cases {
        let gpu = complete_env(
            model,
            prompt,
            16,
            &gpu_args(&rpc.endpoint, false),
            None,
            &[],
            &[],
            &format!("split-{tag}-rpc"),
        )?;
        let mut row = Vec::new();
        for share in ["0.25", "0.5", "0.75", "1"] {
            let r = run(
                plugin,
                rpc,
                model,
                prompt,
                &[("GGML_ANE_GPU_SHARE", share)],
                &format!("split-{tag}-{share}"),
            )?;
            let (ops, got) = (r.stat("split_ops"), stat_f64(&r.stderr, "gpu_share"));
            let want: f64 = share.parse()?;
            if want >= 1.0 {
                // All rows to the GPU: the device declines, the GPU keeps its nodes.
                let on_device = r.stat("ops_offloaded");
                if on_device != 0 || ops != 0 {
                    bail!(
                        "split-{tag}-1: the device should decline everything; got ops_offloaded \
                         {on_device}, split_ops {ops}"
                    );
                }
            } else if ops == 0 || (got - want).abs() > 0.15 {
                bail!(
                    "split-{tag}-{share}: split_ops {ops}, GPU share of the work {got:.3} \
                     (asked {want})\n{}",
                    util::tail(&r.stderr, 8)
                );
            }
            let same = r.text == gpu.text;
            if *gate && !same {
                bail!(
                    "split-{tag}-{share}: text differs from RPC-only\n  split: {:?}\n  rpc:   {:?}",
                    r.text,
                    gpu.text
                );
            }
            row.push(format!(
                "{share}: {} (work {got:.2})",
                if same { "same" } else { "PARTS" }
            ));
        }
        parts.push(format!("{tag} shares {}", row.join(", ")));
    }

    // auto: measured, kept, reused by a second process.
    let tiny = models::path("f16");
    let dir = fresh("auto")?;
    let env = [
        ("GGML_ANE_GPU_SHARE", "auto"),
        ("GGML_ANE_CACHE_DIR", dir.as_str()),
    ];
    let first = run(plugin, rpc, &tiny, &long, &env, "split-auto-1")?;
    let second = run(plugin, rpc, &tiny, &long, &env, "split-auto-2")?;
    let measured = |r: &Run| r.stat("measured");
    let reused = |r: &Run| r.stat("reused");
    let file = Path::new(&dir).join("split-calibrations.tsv");
    if measured(&first) == 0 || !file.is_file() {
        bail!(
            "split auto: first run measured {} classes, cache file {} {}",
            measured(&first),
            file.display(),
            if file.is_file() { "written" } else { "missing" }
        );
    }
    if measured(&second) != 0 || reused(&second) == 0 {
        bail!(
            "split auto: the second process measured {} classes and reused {} (want 0 and > 0)",
            measured(&second),
            reused(&second)
        );
    }
    if first.text != second.text {
        bail!("split auto: the two processes' texts differ");
    }
    parts.push(format!(
        "auto: {} classes measured and cached, reused by a second process (shares {:?})",
        measured(&first),
        calibrated_shares(&second.stderr)
    ));

    // Injected sides.
    let slow_gpu = run(
        plugin,
        rpc,
        &tiny,
        &long,
        &[
            ("GGML_ANE_GPU_SHARE", "auto"),
            ("GGML_ANE_CACHE_DIR", fresh("slow-gpu")?.as_str()),
            ("GGML_ANE_SPLIT_TEST", "gpu_ms=400"),
        ],
        "split-slow-gpu",
    )?;
    let slow_ane = run(
        plugin,
        rpc,
        &tiny,
        &long,
        &[
            ("GGML_ANE_GPU_SHARE", "auto"),
            ("GGML_ANE_CACHE_DIR", fresh("slow-ane")?.as_str()),
            ("GGML_ANE_SPLIT_TEST", "ane_ms=400"),
        ],
        "split-slow-ane",
    )?;
    let (sg, sa) = (
        calibrated_shares(&slow_gpu.stderr),
        calibrated_shares(&slow_ane.stderr),
    );
    if sg.is_empty() || sg.iter().any(|&s| s > 0.125) {
        bail!("split: a GPU 400 ms slower should get (almost) nothing, got shares {sg:?}");
    }
    if sa.is_empty() || sa.iter().any(|&s| s < 0.75) {
        bail!("split: a device 400 ms slower should give the GPU most rows, got shares {sa:?}");
    }
    let failing = run(
        plugin,
        rpc,
        &tiny,
        &long,
        &[
            ("GGML_ANE_GPU_SHARE", "0.5"),
            ("GGML_ANE_SPLIT_TEST", "gpu_fail=1"),
        ],
        "split-gpu-fail",
    )?;
    if failing.stat("split_gpu_failures") == 0 || failing.text != first.text {
        bail!(
            "split: with every GPU part failing, {} failures counted and the text {}",
            failing.stat("split_gpu_failures"),
            if failing.text == first.text {
                "unchanged"
            } else {
                "changed"
            }
        );
    }
    parts.push(format!(
        "slow GPU -> shares {sg:?}, slow device -> {sa:?}, failing GPU parts ({}) computed by the \
         CPU with the same text",
        failing.stat("split_gpu_failures")
    ));
    Ok(parts.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_json_shares_are_read() {
        let e = "x\nggml-ane-stats: {\"gpu_share\":0.5,\"calibrations\":{\"classes\":[{\"ane_ms\":1.0,\"share\":0.875},{\"share\":0}]}}\n";
        assert_eq!(calibrated_shares(e), vec![0.875, 0.0]);
        assert_eq!(stat_f64(e, "gpu_share"), 0.5);
        assert_eq!(stat_f64("", "gpu_share"), 0.0);
    }
}
