//! `cargo xtask demo`: one command that shows the product working.
//!
//! Builds the plugin and the llama.cpp tools, fetches SmolLM2 135M (the real model the tests use,
//! as Q8_0), and runs the greedy `llama-completion` a user would, on the reference engine:
//!
//! 1. CPU-only, then with the plugin (`-ngl 0 --no-repack`: prefill on the device, decode on the
//!    CPU), the two texts side by side;
//! 2. one process with a GPU: llama.cpp's RPC backend on loopback stands in for Metal
//!    (`--device ANE,RPC0 -ts 0,1 -ngl 99`, the command a Mac user types with `MTL0`): the
//!    GPU-only text beside the one with prefill on the device and decode on the GPU, the graph
//!    splits, and the plugin's table of where each matmul ran;
//! 3. a tiny generated mixture-of-experts model with `GGML_ANE_MOE=on`: the table's
//!    `MUL_MAT_ID (experts)` row counts the expert matmuls and the packs of experts.
//!
//! `--model PATH` runs step 1 on any GGUF instead.

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

/// The demo (see the module doc); `model` replaces SmolLM2 in step 1 and skips the rest.
pub fn run(model: Option<&std::path::Path>) -> Result {
    if let Some(m) = model {
        if !m.is_file() {
            return Err(format!("--model {}: no such file", m.display()).into());
        }
    }
    let plugin = build_plugin()?;
    llama::run(false)?;
    let path = match model {
        Some(m) => m.to_path_buf(),
        None => models::smollm2_as("Q8_0")?,
    };
    let prompt = crate::bench_fallback::TEXT_PROMPT;
    let cpu = completion(None, &path, prompt, &["--no-repack"], &[])?;
    let ane = completion(
        Some(&plugin),
        &path,
        prompt,
        &["--no-repack", "-ngl", "0"],
        &[],
    )?;
    side_by_side(
        "CPU only",
        &cpu,
        "prefill on the device, decode on the CPU",
        &ane,
    );
    if model.is_some() {
        return Ok(());
    }
    let rpc = crate::test_gpu::RpcServer::start()?;
    let gpu = completion(
        None,
        &path,
        prompt,
        &crate::test_gpu::gpu_args(&rpc.endpoint, false),
        &[],
    )?;
    let beside = completion(
        Some(&plugin),
        &path,
        prompt,
        &crate::test_gpu::gpu_args(&rpc.endpoint, true),
        &[],
    )?;
    drop(rpc);
    side_by_side(
        "GPU only (RPC0)",
        &gpu,
        "prefill on the device beside the GPU, decode on the GPU",
        &beside,
    );
    let moe = models::moe()?;
    let none: [&str; 0] = [];
    let moe_run = completion(
        Some(&plugin),
        &moe,
        PROMPT,
        &none,
        &[("GGML_ANE_MOE", "on")],
    )?;
    println!("{}", moe_run.table);
    Ok(())
}

/// What one demo run printed.
struct Shown {
    text: String,
    /// The plugin's stats table and the graph-splits line (empty without the plugin).
    table: String,
    /// The command, for the reader.
    command: String,
}

/// Prints two runs' texts, whether they are identical, and the second run's table.
fn side_by_side(a_name: &str, a: &Shown, b_name: &str, b: &Shown) {
    let same = if a.text == b.text {
        "identical"
    } else {
        "DIFFERENT"
    };
    println!("\n--- {a_name}:\n$ {}\n{}", a.command, a.text.trim());
    println!("\n--- {b_name}:\n$ {}\n{}", b.command, b.text.trim());
    println!("\n(generated text {same})\n{}", b.table);
}

/// One greedy `llama-completion`, with the plugin (its stats table kept) or without.
fn completion(
    plugin: Option<&std::path::Path>,
    path: &std::path::Path,
    prompt: &str,
    extra: &[impl AsRef<std::ffi::OsStr>],
    env: &[(&str, &str)],
) -> Result<Shown> {
    let mut cmd = Command::new(llama::bin("llama-completion"));
    cmd.arg("-m")
        .arg(path)
        .args(["-p", prompt, "-n", "24", "-no-cnv", "--temp", "0"])
        .args(["-t", "2", "--no-warmup", "-lv", "4"])
        .args(extra)
        .envs(env.iter().copied())
        .env("OMP_WAIT_POLICY", crate::test::OMP_WAIT_POLICY)
        .env_remove("GGML_BACKEND_PATH");
    if let Some(p) = plugin {
        cmd.env("GGML_BACKEND_PATH", p)
            .env("GGML_ANE_ENGINE", "reference")
            .env("GGML_ANE_STATS", "1");
    }
    crate::exit_drain::apply(&mut cmd);
    let command = util::render(&cmd);
    let _s = Section::new(format!("demo: {command}"));
    let res = crate::test::run_completion(&mut cmd, "demo", std::time::Duration::from_secs(900))?;
    if !res.success() {
        return Err(format!(
            "llama-completion {}\n{}\n{}",
            res.status_text(),
            res.stderr_tail(15),
            res.where_logged()
        )
        .into());
    }
    let text = crate::test::generated_from(&res.stdout, prompt).to_string();
    let splits = crate::test_gpu::reserved_splits(&res.stderr)
        .map(|n| format!("graph splits (prefill / decode): {n}\n"))
        .unwrap_or_default();
    let table = res
        .stderr
        .find("ggml-ane stats")
        .map(|i| format!("{splits}{}", &res.stderr[i..]))
        .unwrap_or_default();
    Ok(Shown {
        text,
        table,
        command,
    })
}
