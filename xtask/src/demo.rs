//! `cargo xtask demo`: one command that shows the plugin working.
//!
//! Builds the plugin, the llama.cpp tools and a tiny model, then runs a
//! greedy `llama-completion` with the plugin loaded through
//! `GGML_BACKEND_PATH` on the reference engine. The prompt is long enough
//! (> 64 tokens) that the prefill MUL_MATs reach the plugin's default minimum
//! batch; the stats table the plugin prints at backend free shows which
//! matmuls it ran. Then the same on a tiny generated mixture-of-experts model
//! with `GGML_ANE_MOE=on`: the table's `MUL_MAT_ID (experts)` row counts the
//! expert matmuls and the packs of experts that ran them.

use std::process::Command;

use crate::util::{self, Result, Section};
use crate::{llama, models};

/// About 110 tokens with the tiny model's character-level vocabulary.
pub const PROMPT: &str = "The quick brown fox jumps over the lazy dog. \
Pack my box with five dozen liquor jugs. Sphinx of black quartz, judge my vow.";

/// `target/release/libggml_ane.so`, built on demand.
pub fn build_plugin() -> Result<std::path::PathBuf> {
    let _s = Section::new("plugin (release)");
    util::run(util::cargo().args(["build", "--release", "-p", "ggml-ane"]))?;
    let lib = util::abs("target/release/libggml_ane.so");
    if !lib.is_file() {
        return Err(format!("cargo build succeeded but {} is missing", lib.display()).into());
    }
    Ok(lib)
}

/// The demo on the tiny generated f16 model, or on `model` (any GGUF, with `--no-repack` so
/// quantized weights stay where the plugin can read them, and a prompt long enough for a real
/// tokenizer to pass the minimum batch).
pub fn run(model: Option<&std::path::Path>) -> Result {
    if let Some(m) = model {
        if !m.is_file() {
            return Err(format!("--model {}: no such file", m.display()).into());
        }
    }
    let plugin = build_plugin()?;
    llama::run(false)?;
    let (path, prompt, extra): (std::path::PathBuf, &str, &[&str]) = match model {
        Some(m) => (
            m.to_path_buf(),
            crate::bench_fallback::TEXT_PROMPT,
            &["--no-repack"],
        ),
        None => {
            models::run()?;
            (models::path("f16"), PROMPT, &[])
        }
    };
    completion(&plugin, &path, prompt, extra, &[])?;
    if model.is_none() {
        let moe = models::moe()?;
        completion(&plugin, &moe, PROMPT, &[], &[("GGML_ANE_MOE", "on")])?;
    }
    Ok(())
}

/// One greedy `llama-completion` with the plugin loaded and its stats table printed.
fn completion(
    plugin: &std::path::Path,
    path: &std::path::Path,
    prompt: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Result {
    let _s = Section::new(format!(
        "demo: llama-completion on {} with the ANE plugin (reference engine{})",
        path.display(),
        env.iter()
            .map(|(k, v)| format!(", {k}={v}"))
            .collect::<String>()
    ));
    let mut cmd = Command::new(llama::bin("llama-completion"));
    cmd.arg("-m")
        .arg(path)
        .args(["-p", prompt, "-n", "16", "-no-cnv", "--temp", "0"])
        .args(["-t", "2", "--no-warmup"])
        .args(extra)
        .env("GGML_BACKEND_PATH", plugin)
        .env("GGML_ANE_ENGINE", "reference")
        .env("GGML_ANE_STATS", "1")
        .envs(env.iter().copied())
        .env("OMP_WAIT_POLICY", crate::test::OMP_WAIT_POLICY)
        .stdin(std::process::Stdio::null());
    crate::exit_drain::apply(&mut cmd);
    util::run(&mut cmd)
}
