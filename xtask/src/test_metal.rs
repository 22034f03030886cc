//! Test step `metal`: the plugin beside Metal, end to end through llama.cpp, on Linux.
//!
//! There is no Mac here, so `tests/c/fake_metal.c` registers a test double of llama.cpp's Metal
//! backend in its own process (registry `MTL`, GPU device `MTL0`, Metal's buffer types `MTL0`
//! and `MTL0_Mapped` with Metal's `is_host`, `supports_buft` and memcpy semantics, and compute
//! that runs only when the backend is synchronized, like a command queue), then loads a model
//! with the llama API the way `--device ANE,MTL0 -ts 0,1 -ngl 99` does. The plugin's rules for
//! Metal's buffers (`crates/ggml/src/view/residence.rs`: weights in `MTL<n>_Mapped` read in place,
//! the shared `MTL<n>` declined) are then exercised by llama.cpp's own loader and scheduler
//! rather than by unit tests over hand-made facts. Per model:
//!
//! * mmap on (the default, weights in `MTL0_Mapped`): greedy tokens with ANE+MTL0 identical to
//!   MTL0 alone (and MTL0 alone identical to CPU-only, which checks the double itself); the
//!   plugin offloaded MUL_MATs with none fallen back and no weight buffer declined; MTL0 computed
//!   no prefill-sized weight MUL_MAT (the ANE took every one);
//! * mmap off (`--no-mmap`, weights in the shared `MTL0`, which also holds activations): the
//!   plugin offloads nothing, says why in exactly one line, and the tokens are still MTL0's.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::test::{stat, Prereqs, OMP_WAIT_POLICY};
use crate::util::{self, abs, bail, Result};
use crate::{llama, models};

/// Greedy decode steps after the prefill.
const STEPS: usize = 16;
/// Start of the plugin's one-line notice about weights it cannot read (crates/ggml/src/placement.rs).
const WEIGHT_NOTICE: &str = "ggml-ane: MUL_MAT weights such as";
/// Each run takes seconds (SmolLM2 135M with the plugin about 3 s on 2 cores); a hang is a bug.
const TIMEOUT: Duration = Duration::from_secs(180);

pub(crate) fn step(pre: &mut Prereqs) -> Result<String> {
    let plugin = pre.plugin()?;
    pre.llama()?;
    pre.models()?;
    let exe = build()?;
    let models: [(&str, PathBuf); 3] = [
        ("f16", models::path("f16")),
        ("q8_0", models::path("q8_0")),
        ("smollm2-q8_0", models::smollm2_as("Q8_0")?),
    ];
    let mut passed = Vec::new();
    let mut failed = Vec::new();
    for (name, model) in &models {
        match check_model(&exe, &plugin, name, model) {
            Ok(s) => {
                println!("{name}: {s}");
                passed.push(format!("{name}: {s}"));
            }
            Err(e) => {
                println!("{name}: FAIL {e}");
                failed.push(format!("{name}: {e}"));
            }
        }
    }
    if !failed.is_empty() {
        bail!("{}", failed.join("\n"));
    }
    Ok(passed.join("; "))
}

/// Compiles the driver against the llama.cpp build, with ggml's internal backend header (the
/// vtables a backend fills in) from its sources.
fn build() -> Result<PathBuf> {
    let src = abs("target/llama/src");
    let bin_dir = llama::bin_dir();
    let exe = abs("target/xtask-c/fake_metal");
    std::fs::create_dir_all(abs("target/xtask-c"))?;
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    util::run(
        Command::new(&cc)
            .args(["-O2", "-Wall", "-Werror"])
            .arg("-I")
            .arg(src.join("include"))
            .arg("-I")
            .arg(src.join("ggml/include"))
            .arg("-I")
            .arg(src.join("ggml/src"))
            .arg(abs("tests/c/fake_metal.c"))
            .arg("-L")
            .arg(&bin_dir)
            .args(["-lllama", "-lggml", "-lggml-base"])
            .arg(format!("-Wl,-rpath,{}", bin_dir.display()))
            .arg("-o")
            .arg(&exe),
    )?;
    Ok(exe)
}

/// What one run of the driver printed.
struct Run {
    /// Generated token ids, as printed.
    tokens: String,
    /// `(buffer type, tensors)` of this device's buffers holding weights.
    weights: Vec<(String, u64)>,
    /// Weight MUL_MATs with >= 64 src1 columns that MTL0 computed.
    mtl0_batched: u64,
    stderr: String,
    secs: f64,
    logs: String,
}

/// Runs the driver in `mode` (`ane`, `gpu`, `cpu`), with the plugin loaded when given.
fn run(
    exe: &Path,
    model: &Path,
    mode: &str,
    no_mmap: bool,
    plugin: Option<&Path>,
    share: &str,
    name: &str,
) -> Result<Run> {
    let mut cmd = Command::new(exe);
    cmd.arg(model)
        .arg(llama::bin_dir())
        .arg(mode)
        .args(["--steps", &STEPS.to_string()])
        .args(if no_mmap { &["--no-mmap"][..] } else { &[][..] })
        .env_remove("GGML_BACKEND_PATH")
        .env("OMP_WAIT_POLICY", OMP_WAIT_POLICY);
    if let Some(p) = plugin {
        cmd.env("GGML_BACKEND_PATH", p)
            .env("GGML_ANE_ENGINE", "reference")
            .env("GGML_ANE_STATS", "json")
            // `0`: the device alone (these checks count the fake's own matmuls); a split run
            // checks the plugin's own MTL0 instance through the fake's deferred queue.
            .env("GGML_ANE_GPU_SHARE", share);
    }
    let res = util::run_logged(&mut cmd, name, TIMEOUT)?;
    if !res.success() {
        bail!(
            "{name}: fake_metal {}:\n{}\n{}",
            res.status_text(),
            res.stderr_tail(10),
            res.where_logged()
        );
    }
    let line = |prefix: &str| {
        res.stdout
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .map(str::trim)
    };
    let tokens = line("tokens:").unwrap_or_default().to_string();
    if tokens.split_whitespace().count() != STEPS {
        bail!(
            "{name}: expected {STEPS} token ids, got `{tokens}`; {}",
            res.where_logged()
        );
    }
    let weights = res
        .stdout
        .lines()
        .filter_map(|l| l.strip_prefix("weights: "))
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let buft = it.next()?.to_string();
            let tensors = it.find_map(|f| f.strip_prefix("tensors="))?.parse().ok()?;
            Some((buft, tensors))
        })
        .collect();
    let mtl0_batched = line("mtl0:")
        .and_then(|l| {
            l.split_whitespace()
                .find_map(|f| f.strip_prefix("weight_mul_mat_batched="))
        })
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("{name}: no `mtl0:` line; {}", res.where_logged()))?;
    Ok(Run {
        tokens,
        weights,
        mtl0_batched,
        secs: res.elapsed.as_secs_f64(),
        logs: res.where_logged(),
        stderr: res.stderr,
    })
}

/// Describes where the weights were, for messages.
fn weights_text(r: &Run) -> String {
    if r.weights.is_empty() {
        return "none in MTL0's buffers".into();
    }
    let parts: Vec<String> = r
        .weights
        .iter()
        .map(|(b, n)| format!("{b} ({n} tensors)"))
        .collect();
    parts.join(", ")
}

/// Whether the weights were all in `buft` and nowhere else of the device.
fn weights_only_in(r: &Run, buft: &str) -> bool {
    !r.weights.is_empty() && r.weights.iter().all(|(b, n)| b == buft && *n > 0)
}

fn check_model(exe: &Path, plugin: &Path, name: &str, model: &Path) -> Result<String> {
    let cpu = run(
        exe,
        model,
        "cpu",
        false,
        None,
        "0",
        &format!("metal-{name}-cpu"),
    )?;
    let gpu = run(
        exe,
        model,
        "gpu",
        false,
        None,
        "0",
        &format!("metal-{name}-gpu"),
    )?;
    let ane = run(
        exe,
        model,
        "ane",
        false,
        Some(plugin),
        "0",
        &format!("metal-{name}-ane"),
    )?;
    let nommap = run(
        exe,
        model,
        "ane",
        true,
        Some(plugin),
        "0",
        &format!("metal-{name}-ane-no-mmap"),
    )?;
    // The split: half of each prefill matmul's rows on the plugin's own MTL0 instance, whose
    // work the fake runs only at synchronize, as Metal's queue does.
    let split = run(
        exe,
        model,
        "ane",
        false,
        Some(plugin),
        "0.5",
        &format!("metal-{name}-split"),
    )?;
    let mut bad = Vec::new();

    // The double itself: MTL0 computes with the CPU backend's kernels, so its tokens are CPU's.
    if gpu.tokens != cpu.tokens {
        bad.push(format!(
            "the fake Metal run differs from CPU-only (a defect of the double, not the plugin)\n  \
             cpu:  {}\n  MTL0: {}",
            cpu.tokens, gpu.tokens
        ));
    }
    if !weights_only_in(&gpu, "MTL0_Mapped") {
        bad.push(format!(
            "MTL0-only with mmap: weights expected in MTL0_Mapped, were in {}",
            weights_text(&gpu)
        ));
    }
    if gpu.mtl0_batched == 0 {
        bad.push("MTL0-only: MTL0 computed no prefill-sized weight MUL_MAT".into());
    }

    // (a) ANE+MTL0 against MTL0 alone.
    if ane.tokens != gpu.tokens {
        bad.push(format!(
            "greedy tokens with ANE+MTL0 differ from MTL0 alone\n  MTL0:     {}\n  ANE+MTL0: {}\n  {}",
            gpu.tokens, ane.tokens, ane.logs
        ));
    }
    // The split with the GPU's own backend: same tokens, rows on MTL0.
    let split_ops = stat(&split.stderr, "split_ops");
    if split.tokens != gpu.tokens || split_ops == 0 || split.mtl0_batched == 0 {
        bad.push(format!(
            "ANE+MTL0 with GGML_ANE_GPU_SHARE=0.5: tokens {} (MTL0 alone {}), split_ops {split_ops}, \
             MTL0 prefill weight MUL_MATs {} (want the same tokens, > 0, > 0); {}",
            split.tokens, gpu.tokens, split.mtl0_batched, split.logs
        ));
    }
    // (b) the plugin's counters.
    if !ane.stderr.contains("ggml-ane-stats: ") {
        bad.push(format!(
            "ANE+MTL0: no `ggml-ane-stats:` line on stderr; {}",
            ane.logs
        ));
    }
    let offloaded = stat(&ane.stderr, "ops_offloaded");
    let fallback = stat(&ane.stderr, "ops_fallback");
    let declined = stat(&ane.stderr, "declined_buft");
    if offloaded == 0 || fallback != 0 || declined != 0 {
        bad.push(format!(
            "ANE+MTL0: expected ops_offloaded > 0, ops_fallback = 0, declined_buft = 0; got \
             {offloaded}, {fallback}, {declined}; {}",
            ane.logs
        ));
    }
    if ane.mtl0_batched != 0 {
        bad.push(format!(
            "ANE+MTL0: MTL0 still computed {} prefill-sized weight MUL_MATs (of {} in the \
             MTL0-only run) the ANE should have taken; {}",
            ane.mtl0_batched, gpu.mtl0_batched, ane.logs
        ));
    }
    // (c) where the weights were.
    if !weights_only_in(&ane, "MTL0_Mapped") {
        bad.push(format!(
            "ANE+MTL0 with mmap: weights expected in MTL0_Mapped, were in {}",
            weights_text(&ane)
        ));
    }

    // (d) mmap off: weights in the shared MTL0, which the plugin must decline and say so once.
    if !weights_only_in(&nommap, "MTL0") {
        bad.push(format!(
            "--no-mmap: weights expected in MTL0 (shared), were in {}",
            weights_text(&nommap)
        ));
    }
    if nommap.tokens != gpu.tokens {
        bad.push(format!(
            "--no-mmap: greedy tokens with ANE+MTL0 differ from MTL0 alone\n  MTL0:     {}\n  \
             ANE+MTL0: {}\n  {}",
            gpu.tokens, nommap.tokens, nommap.logs
        ));
    }
    let nm_offloaded = stat(&nommap.stderr, "ops_offloaded");
    if nm_offloaded != 0 || !nommap.stderr.contains("\"by_weight\":{}") {
        bad.push(format!(
            "--no-mmap: the plugin computed {nm_offloaded} MUL_MATs with weights in the shared \
             MTL0 (expected none); {}",
            nommap.logs
        ));
    }
    let notices: Vec<&str> = nommap
        .stderr
        .lines()
        .filter(|l| l.contains(WEIGHT_NOTICE))
        .collect();
    let names_fix = |l: &str| {
        l.contains("MTL0_Mapped") && (l.contains("--no-mmap") || l.contains("--load-mode"))
    };
    if notices.len() != 1 || !names_fix(notices[0]) {
        let nm_declined = stat(&nommap.stderr, "declined_buft");
        let hint = if notices.is_empty() && nm_declined == 0 {
            " (the plugin was never asked about these MUL_MATs: llama.cpp's scheduler calls \
             supports_op only on backends whose supports_buft accepted the weight's buffer \
             type, ggml-backend.cpp:1036, so a notice raised from supports_op cannot fire for \
             a declined MTL0)"
        } else {
            ""
        };
        bad.push(format!(
            "--no-mmap: expected exactly one `{WEIGHT_NOTICE} ...` line on stderr naming MTL0's \
             shared buffer, MTL0_Mapped and --no-mmap; got {}{} (declined_buft {nm_declined}){hint}; \
             {}",
            notices.len(),
            notices
                .iter()
                .map(|l| format!("\n    {l}"))
                .collect::<String>(),
            nommap.logs
        ));
    }
    if !bad.is_empty() {
        bail!("{}", bad.join("\n"));
    }
    Ok(format!(
        "{} greedy tokens identical (ANE+MTL0, MTL0, CPU); {offloaded} MUL_MATs on the ANE \
         ({} prefill weight MUL_MATs on MTL0 alone, 0 with the ANE), 0 fallback, 0 declined; \
         weights in {}; --no-mmap: weights in {}, 0 offloaded, one notice, same tokens; split \
         0.5: same tokens, {} split MUL_MATs ({:.1}s/{:.1}s/{:.1}s/{:.1}s cpu/gpu/ane/no-mmap)",
        STEPS,
        gpu.mtl0_batched,
        weights_text(&ane),
        weights_text(&nommap),
        split_ops,
        cpu.secs,
        gpu.secs,
        ane.secs,
        nommap.secs
    ))
}
