//! Test step `placement`: where llama.cpp puts the weights decides whether the plugin can see
//! them at all (docs/mac.md). With default flags, q4_0 weights are repacked into CPU_REPACK
//! buffers the plugin cannot read: it must get (almost) no MUL_MATs, count them as
//! `declined_buft` and say exactly once to pass `--no-repack`. With `--no-repack` it offloads
//! them. Finally, a prefill saved with `--prompt-cache` by a run with the plugin must be continued
//! by a run without it (the "ANE prefill, then Metal decode" recipe) with the CPU's text.

use std::process::Command;
use std::time::Duration;

use crate::models;
use crate::test::{completion, generated, json_u64, run_completion, Prereqs};
use crate::util::{self, abs, bail, Result};

/// Start of the plugin's one-line notice about weights in a buffer it cannot
/// read (crates/ggml/src/placement.rs).
const WEIGHT_NOTICE: &str = "ggml-ane: MUL_MAT weights such as";

/// The largest `key` over the plugin's `ggml-ane-stats: {json}` stderr lines
/// (one per freed backend instance; the logger may put a timestamp before it).
fn stats_max(stderr: &str, key: &str) -> Result<u64> {
    const PREFIX: &str = "ggml-ane-stats: ";
    let mut best = None;
    for line in stderr.lines() {
        let Some(i) = line.find(PREFIX) else { continue };
        let n = json_u64(&line[i + PREFIX.len()..], key)
            .ok_or_else(|| format!("no numeric \"{key}\" in `{line}`"))?;
        best = best.max(Some(n));
    }
    best.ok_or_else(|| format!("no `{PREFIX}` line on stderr").into())
}

pub(crate) fn step(pre: &mut Prereqs) -> Result<String> {
    let plugin = pre.plugin()?;
    pre.llama()?;
    pre.models()?;
    let model = models::path("q4_0");
    let timeout = Duration::from_secs(300);
    let run = |cmd: &mut Command, name: &str| -> Result<util::Logged> {
        let res = run_completion(cmd, name, timeout)?;
        if !res.success() {
            bail!(
                "{name}: llama-completion {}:\n{}\n{}",
                res.status_text(),
                res.stderr_tail(15),
                res.where_logged()
            );
        }
        Ok(res)
    };
    let notices = |res: &util::Logged| {
        res.stderr
            .lines()
            .filter(|l| l.contains(WEIGHT_NOTICE))
            .count()
    };

    // Default flags: Q4_0 weights go to CPU_REPACK, which the plugin cannot read.
    let repacked = run(
        completion(&model, Some(&plugin), 4, &[]).env("GGML_ANE_STATS", "json"),
        "placement-repack",
    )?;
    let ctx = |r: &util::Logged| format!("{}\n{}", r.stderr_tail(10), r.where_logged());
    let (off_repacked, buft_repacked) = (
        stats_max(&repacked.stderr, "ops_offloaded")?,
        stats_max(&repacked.stderr, "declined_buft")?,
    );
    if notices(&repacked) != 1 {
        bail!(
            "default flags (repacked q4_0): expected exactly one `{WEIGHT_NOTICE}` line, got {}\n{}",
            notices(&repacked),
            ctx(&repacked)
        );
    }
    let line = repacked
        .stderr
        .lines()
        .find(|l| l.contains(WEIGHT_NOTICE))
        .unwrap_or_default();
    if !line.contains("CPU_REPACK") || !line.contains("--no-repack") {
        bail!("the notice should name CPU_REPACK and --no-repack: `{line}`");
    }
    if buft_repacked == 0 {
        bail!(
            "default flags: declined_buft = 0, but the weights are repacked\n{}",
            ctx(&repacked)
        );
    }

    // --no-repack: the weights stay in host memory and the plugin offloads them.
    let plain = run(
        completion(&model, Some(&plugin), 4, &["--no-repack"]).env("GGML_ANE_STATS", "json"),
        "placement-no-repack",
    )?;
    let (off_plain, buft_plain) = (
        stats_max(&plain.stderr, "ops_offloaded")?,
        stats_max(&plain.stderr, "declined_buft")?,
    );
    if off_plain == 0 || buft_plain != 0 || notices(&plain) != 0 {
        bail!(
            "--no-repack: expected offloaded MUL_MATs, declined_buft = 0 and no notice; got \
             ops_offloaded = {off_plain}, declined_buft = {buft_plain}, {} notice(s)\n{}",
            notices(&plain),
            ctx(&plain)
        );
    }
    if off_repacked * 4 > off_plain {
        bail!(
            "default flags offloaded {off_repacked} MUL_MATs, --no-repack {off_plain}: \
             repacked weights should (almost) never reach the plugin"
        );
    }

    // Prefill with the plugin, saved with --prompt-cache; decode in another
    // process without it (on a Mac: with the layers on Metal).
    let dir = abs("target/xtask-placement");
    std::fs::create_dir_all(&dir)?;
    let cache = dir.join("prompt.bin");
    let _ = std::fs::remove_file(&cache);
    let cache_arg = cache.to_string_lossy().into_owned();
    let prefill = run(
        completion(
            &model,
            Some(&plugin),
            1,
            &["--no-repack", "--prompt-cache", &cache_arg],
        )
        .env("GGML_ANE_STATS", "json"),
        "placement-prefill",
    )?;
    if stats_max(&prefill.stderr, "ops_offloaded")? == 0 || !cache.is_file() {
        bail!(
            "prefill run: no offloaded MUL_MATs or no prompt cache written\n{}",
            ctx(&prefill)
        );
    }
    let decode_args = [
        "--no-repack",
        "--prompt-cache",
        &cache_arg,
        "--prompt-cache-ro",
    ];
    let decode = run(
        &mut completion(&model, None, 24, &decode_args),
        "placement-decode",
    )?;
    if !decode
        .stderr
        .contains("session file has exact match for prompt")
    {
        bail!(
            "decode run did not reuse the saved prefill\n{}",
            ctx(&decode)
        );
    }
    let cpu = run(
        &mut completion(&model, None, 24, &["--no-repack"]),
        "placement-cpu",
    )?;
    let (handoff, reference) = (generated(&decode.stdout), generated(&cpu.stdout));
    if reference.trim().is_empty() || handoff != reference {
        bail!(
            "prompt-cache handoff text differs from the CPU-only run\n  handoff: {handoff:?}\n  cpu:     {reference:?}\n{}",
            decode.where_logged()
        );
    }
    Ok(format!(
        "q4_0 default flags: {off_repacked} offloaded, declined_buft {buft_repacked}, one \
         --no-repack notice; --no-repack: {off_plain} offloaded; prompt-cache handoff \
         (plugin prefill, plugin-less decode) = CPU text"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_max_reads_prefixed_lines() {
        let err = "0.00.028.415 ggml-ane-stats: {\"declined_buft\":7}\nggml-ane-stats: {\"declined_buft\":3}\n";
        assert_eq!(stats_max(err, "declined_buft").unwrap(), 7);
        assert!(stats_max("nothing", "declined_buft").is_err());
    }
}
