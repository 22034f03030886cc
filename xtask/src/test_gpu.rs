//! Test step `gpu`: prefill on the device beside a GPU, in one llama.cpp process.
//!
//! The GPU is llama.cpp's RPC backend (`ggml-rpc-server` on 127.0.0.1, started and ended here):
//! a real GPU-typed backend in the same scheduler, standing in for Metal. With
//! `--rpc EP --device ANE,RPC0 -ts 0,1 -ngl 99` every layer's weights stay on RPC0; the plugin
//! reads them through ggml's tensor API and takes the prefill matmuls (and the bridge ops between
//! them), RPC0 everything else, decode included. Checked, each against an RPC-only run in the same
//! step:
//!
//! * greedy text identical on the tiny f16 and q8_0 models and SmolLM2 135M Q8_0, with matmuls
//!   on the device, no fallback, and at most 6 graph splits per layer (`sched_reserve`'s count);
//! * the same device op count for 4 and 16 generated tokens (decode never reaches the device);
//! * prompts of 63 tokens (nothing on the device), 64 and 65 (prefill on it), each with the RPC
//!   text;
//! * `-fa on` and `-fa off`;
//! * `llama-bench`: decode t/s within 10% of RPC-only (medians of repeats; the RPC server shares
//!   the machine's cores);
//! * `llama-server -np 4` (`crate::test_server`): four concurrent requests complete, a request
//!   alone gives the RPC-only server's text.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::test::{self, Prereqs};
use crate::util::{self, bail, Result};
use crate::{llama, models};

/// The most graph splits a llama-architecture prefill layer may make beside the GPU: ANE(Q, K,
/// V, ropes), GPU(attention), ANE(O), GPU(add, norm), ANE(gate, up, GLU, down), GPU.
pub(crate) const MAX_SPLITS_PER_LAYER: u64 = 6;

/// `ggml-rpc-server` on a free loopback port, killed when dropped.
pub(crate) struct RpcServer {
    child: Child,
    /// `127.0.0.1:PORT`.
    pub endpoint: String,
}

/// A free loopback port (bound and released; the server takes it right after).
pub(crate) fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Waits until something accepts connections on `addr`, or `child` exits, or `timeout`.
pub(crate) fn wait_listening(child: &mut Child, addr: &str, timeout: Duration) -> Result {
    let start = Instant::now();
    loop {
        if TcpStream::connect(addr).is_ok() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!("{addr}: the server exited ({status}) before listening");
        }
        if start.elapsed() > timeout {
            bail!("{addr}: nothing listening after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

impl RpcServer {
    /// Starts the server with the CPU backend of [`llama::API3`] behind it, 2 threads.
    pub(crate) fn start() -> Result<RpcServer> {
        let port = free_port()?;
        let endpoint = format!("127.0.0.1:{port}");
        let log = util::abs(format!("target/xtask-logs/rpc-server-{port}.log"));
        std::fs::create_dir_all(util::abs("target/xtask-logs"))?;
        let mut cmd = Command::new(llama::bin("ggml-rpc-server"));
        cmd.args(["-H", "127.0.0.1", "-p", &port.to_string(), "-t", "2"])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log)?)
            .stderr(std::fs::File::create(&log)?);
        println!("$ {} &", util::render(&cmd));
        let mut child = cmd.spawn()?;
        if let Err(e) = wait_listening(&mut child, &endpoint, Duration::from_secs(30)) {
            let _ = child.kill();
            let _ = child.wait();
            bail!("ggml-rpc-server: {e} (log {})", log.display());
        }
        Ok(RpcServer { child, endpoint })
    }
}

impl Drop for RpcServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The command-line arguments that put the device ahead of the RPC GPU with every layer on the
/// GPU (`beside`), or the GPU alone.
pub(crate) fn gpu_args(endpoint: &str, beside: bool) -> Vec<String> {
    let dev = if beside { "ANE,RPC0" } else { "RPC0" };
    let mut a: Vec<String> = ["--rpc", endpoint, "--device", dev, "-ngl", "99"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    if beside {
        a.extend(["-ts".into(), "0,1".into()]);
    }
    a
}

/// The graph splits llama.cpp reserved, as it prints them: `N / M` (prefill / decode) from
/// `sched_reserve: graph (pp ...) splits = N / M`, or `N` from `sched_reserve: graph: ... splits
/// = N` when the two graphs are alike (needs `-lv 4`).
pub(crate) fn reserved_splits(stderr: &str) -> Option<&str> {
    let line = stderr
        .lines()
        .find(|l| l.contains("sched_reserve: graph (pp"))
        .or_else(|| stderr.lines().find(|l| l.contains("sched_reserve: graph:")))?;
    let rest = line.split_once("splits = ")?.1;
    Some(rest.split(',').next().unwrap_or(rest).trim())
}

/// One greedy run's results.
pub(crate) struct Run {
    pub text: String,
    pub stderr: String,
    /// Tokens of the prompt (llama.cpp's own count).
    prompt_tokens: u64,
}

impl Run {
    pub(crate) fn stat(&self, key: &str) -> u64 {
        test::stat(&self.stderr, key)
    }

    /// Graph splits of the reserved prefill graph (`sched_reserve: graph (pp ...) splits = N / M`,
    /// or `sched_reserve: graph: ... splits = N` when prefill and decode graphs are alike).
    fn splits(&self) -> Option<u64> {
        reserved_splits(&self.stderr)?
            .split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    }

    /// `n_layer` of the model (`print_info`).
    fn n_layer(&self) -> Option<u64> {
        self.stderr
            .lines()
            .find(|l| l.contains("print_info: n_layer ") && l.contains('='))
            .and_then(|l| l.rsplit('=').next())
            .and_then(|n| n.trim().parse().ok())
    }
}

/// Greedy `llama-completion` of `prompt` on `model` beside (or without) the device; the device
/// computes its matmuls alone (`GGML_ANE_GPU_SHARE=0`).
fn complete(
    model: &Path,
    prompt: &str,
    n_predict: u32,
    gpu: &[String],
    plugin: Option<&Path>,
    extra: &[&str],
    name: &str,
) -> Result<Run> {
    complete_env(model, prompt, n_predict, gpu, plugin, extra, &[], name)
}

/// [`complete`] with more of the plugin's environment (`env` wins over the defaults).
#[allow(clippy::too_many_arguments)]
pub(crate) fn complete_env(
    model: &Path,
    prompt: &str,
    n_predict: u32,
    gpu: &[String],
    plugin: Option<&Path>,
    extra: &[&str],
    env: &[(&str, &str)],
    name: &str,
) -> Result<Run> {
    let mut cmd = Command::new(llama::bin("llama-completion"));
    cmd.arg("-m")
        .arg(model)
        .args(["-p", prompt, "-n", &n_predict.to_string()])
        .args([
            "-no-cnv",
            "--temp",
            "0",
            "-t",
            "2",
            "--no-warmup",
            // Info level: `print_info: n_layer` and `sched_reserve ... splits = N`.
            "-lv",
            "4",
        ])
        .args(gpu)
        .args(extra)
        .env("OMP_WAIT_POLICY", test::OMP_WAIT_POLICY)
        .env_remove("GGML_BACKEND_PATH");
    if let Some(p) = plugin {
        cmd.env("GGML_BACKEND_PATH", p)
            .env("GGML_ANE_ENGINE", "reference")
            .env("GGML_ANE_STATS", "json")
            .env("GGML_ANE_GPU_SHARE", "0")
            .envs(env.iter().copied());
    }
    crate::exit_drain::apply(&mut cmd);
    let res = test::run_completion(&mut cmd, name, Duration::from_secs(600))?;
    if !res.success() {
        bail!(
            "{name}: llama-completion {}\n{}\n{}",
            res.status_text(),
            res.stderr_tail(15),
            res.where_logged()
        );
    }
    let text = test::generated_from(&res.stdout, prompt).to_string();
    let prompt_tokens = res
        .stderr
        .lines()
        .find(|l| l.contains("prompt eval time"))
        .and_then(|l| l.split(" / ").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    Ok(Run {
        text,
        stderr: res.stderr,
        prompt_tokens,
    })
}

/// A prefix of the demo's prompt (repeated) that llama.cpp tokenizes into `want` tokens on
/// `model`: a binary search over the prefix length, one RPC-only run per probe.
fn prompt_with_tokens(model: &Path, rpc: &RpcServer, want: u64) -> Result<String> {
    let (mut lo, mut hi) = (1usize, 4 * want as usize);
    let mut probes = 0;
    while lo <= hi {
        let mid = (lo + hi) / 2;
        let p = prompt_of(mid);
        let gpu = gpu_args(&rpc.endpoint, false);
        let r = complete(model, &p, 1, &gpu, None, &[], &format!("gpu-tokens{want}"))?;
        probes += 1;
        match r.prompt_tokens.cmp(&want) {
            std::cmp::Ordering::Equal => return Ok(p),
            std::cmp::Ordering::Less => lo = mid + 1,
            std::cmp::Ordering::Greater => hi = mid - 1,
        }
    }
    bail!("no prefix of the demo prompt makes exactly {want} tokens ({probes} probes)")
}

/// The prompt of the demo, repeated to `chars` characters.
fn prompt_of(chars: usize) -> String {
    crate::demo::PROMPT
        .chars()
        .cycle()
        .take(chars)
        .collect::<String>()
}

/// Runs the RPC-only and the beside-the-GPU completion and checks what every such pair must
/// show; returns the device run.
#[allow(clippy::too_many_arguments)]
fn pair(
    plugin: &Path,
    rpc: &RpcServer,
    model: &Path,
    prompt: &str,
    n: u32,
    extra: &[&str],
    name: &str,
    expect_device: bool,
) -> Result<(Run, Run)> {
    let gpu = complete(
        model,
        prompt,
        n,
        &gpu_args(&rpc.endpoint, false),
        None,
        extra,
        &format!("{name}-rpc"),
    )?;
    let ane = complete(
        model,
        prompt,
        n,
        &gpu_args(&rpc.endpoint, true),
        Some(plugin),
        extra,
        &format!("{name}-ane-rpc"),
    )?;
    if gpu.text.trim().is_empty() || ane.text != gpu.text {
        bail!(
            "{name}: text beside the GPU differs from RPC-only\n  ane+rpc: {:?}\n  rpc:     {:?}",
            ane.text,
            gpu.text
        );
    }
    let (ops, fallback) = (ane.stat("ops_offloaded"), ane.stat("ops_fallback"));
    if expect_device && (ops == 0 || fallback != 0) {
        bail!(
            "{name}: expected prefill matmuls on the device and no fallback; got \
             ops_offloaded {ops}, ops_fallback {fallback}\n{}",
            util::tail(&ane.stderr, 10)
        );
    }
    if !expect_device && ops != 0 {
        bail!("{name}: {ops} matmuls on the device for a prompt below the batch gate");
    }
    Ok((gpu, ane))
}

pub(crate) fn step(pre: &mut Prereqs) -> Result<String> {
    let plugin = pre.plugin()?;
    pre.llama()?;
    pre.models()?;
    let rpc = RpcServer::start()?;
    let mut parts = Vec::new();

    // Text, device ops, splits per layer.
    let long = prompt_of(110);
    let real = models::smollm2_as("Q8_0")?;
    let cases: [(&str, PathBuf, String); 3] = [
        ("f16", models::path("f16"), long.clone()),
        ("q8_0", models::path("q8_0"), long.clone()),
        (
            "smollm2-q8_0",
            real.clone(),
            crate::bench_fallback::TEXT_PROMPT.into(),
        ),
    ];
    let mut smollm2: Option<(Run, Run)> = None;
    for (tag, model, prompt) in &cases {
        let (gpu, ane) = pair(
            &plugin,
            &rpc,
            model,
            prompt,
            16,
            &[],
            &format!("gpu-{tag}"),
            true,
        )?;
        let (Some(splits), Some(layers)) = (ane.splits(), ane.n_layer()) else {
            bail!("gpu-{tag}: no `sched_reserve ... splits = N` or `n_layer` line on stderr");
        };
        let per_layer = splits.saturating_sub(3) as f64 / layers as f64;
        // Three splits are not a layer's: the CPU's token embedding, the first GPU split, the
        // output.
        if splits > MAX_SPLITS_PER_LAYER * layers + 3 {
            bail!(
                "gpu-{tag}: {splits} graph splits for {layers} layers ({per_layer:.1} per layer), \
                 more than {MAX_SPLITS_PER_LAYER} per layer"
            );
        }
        let line = format!(
            "{tag}: text = RPC-only, {} matmuls + {} bridge ops on the device, {splits} splits \
             ({per_layer:.1} per layer of {layers}; RPC-only {})",
            ane.stat("ops_offloaded"),
            ane.stat("bridge_ops"),
            gpu.splits().unwrap_or(0)
        );
        println!("{line}");
        parts.push(line);
        if *tag == "smollm2-q8_0" {
            smollm2 = Some((gpu, ane));
        }
    }
    if let Some((gpu, ane)) = &smollm2 {
        parts.push(budget(&plugin, &rpc, &real, gpu, ane)?);
    }

    // Gemma 3 (weighted Q/K norms between Q/K and their ROPEs): more splits per layer, reported
    // only (its text parts from the GPU's at a near tie, see step `real`).
    let gemma = models::gemma()?;
    let g = complete(
        &gemma,
        crate::bench_fallback::TEXT_PROMPT,
        1,
        &gpu_args(&rpc.endpoint, true),
        Some(&plugin),
        &[],
        "gpu-gemma",
    )?;
    if let (Some(splits), Some(layers)) = (g.splits(), g.n_layer()) {
        let line = format!(
            "gemma3 (reported): {splits} splits ({:.1} per layer of {layers}), {} matmuls on the \
             device",
            splits.saturating_sub(3) as f64 / layers as f64,
            g.stat("ops_offloaded")
        );
        println!("{line}");
        parts.push(line);
    }

    // Decode never reaches the device.
    let tiny = models::path("f16");
    let short = complete(
        &tiny,
        &long,
        4,
        &gpu_args(&rpc.endpoint, true),
        Some(&plugin),
        &[],
        "gpu-n4",
    )?;
    let long_run = complete(
        &tiny,
        &long,
        16,
        &gpu_args(&rpc.endpoint, true),
        Some(&plugin),
        &[],
        "gpu-n16",
    )?;
    let (o4, o16) = (short.stat("ops_offloaded"), long_run.stat("ops_offloaded"));
    if o4 == 0 || o4 != o16 {
        bail!("device ops for 4 and 16 generated tokens: {o4} and {o16} (decode reached it)");
    }
    parts.push(format!("device ops for 4 and 16 tokens: {o4} = {o16}"));

    // The batch gate at 63, 64 and 65 prompt tokens: prefixes of the long prompt found by their
    // token count (llama.cpp's own, RPC-only runs of one token).
    let mut gate = Vec::new();
    for want in [63u64, 64, 65] {
        let prompt = prompt_with_tokens(&tiny, &rpc, want)?;
        let (_, ane) = pair(
            &plugin,
            &rpc,
            &tiny,
            &prompt,
            8,
            &[],
            &format!("gpu-prompt{want}"),
            want >= 64,
        )?;
        gate.push(format!("{want}: {}", ane.stat("ops_offloaded")));
    }
    parts.push(format!("prompt tokens -> device ops {}", gate.join(", ")));

    // Flash attention on and off.
    for fa in ["on", "off"] {
        let (_, ane) = pair(
            &plugin,
            &rpc,
            &tiny,
            &long,
            16,
            &["-fa", fa],
            &format!("gpu-fa-{fa}"),
            true,
        )?;
        parts.push(format!(
            "-fa {fa}: text = RPC-only ({} ops)",
            ane.stat("ops_offloaded")
        ));
    }

    parts.push(bench_decode(&plugin, &rpc, &real)?);
    parts.push(crate::test_split::check(&plugin, &rpc, &real)?);
    parts.push(crate::test_server::check(&plugin, &rpc, &tiny)?);
    drop(rpc);
    Ok(parts.join("; "))
}

/// Repeats of each llama-bench decode run.
const BENCH_REPS: &str = "5";
/// Decode t/s beside the device may lose at most this fraction against RPC-only.
const DECODE_TOLERANCE: f64 = 0.10;

/// Rounds of the two llama-bench runs, alternated.
const BENCH_ROUNDS: usize = 3;

/// `llama-bench` decode (`-p 0 -n 32`) beside the device and RPC-only, alternated
/// [`BENCH_ROUNDS`] times; the median of each side's samples (a sample is one repeat's t/s: the
/// median shrugs off the repeats that other work on the two cores slowed down).
fn bench_decode(plugin: &Path, rpc: &RpcServer, model: &Path) -> Result<String> {
    let run = |beside: bool, i: usize| -> Result<Vec<f64>> {
        let mut cmd = Command::new(llama::bin("llama-bench"));
        cmd.arg("-m")
            .arg(model)
            .args(["-rpc", &rpc.endpoint, "-ngl", "99", "-p", "0", "-n", "32"])
            .args(["-r", BENCH_REPS, "-t", "2", "-o", "jsonl"])
            .args(if beside {
                ["-dev", "ANE/RPC0", "-ts", "0/1"].as_slice()
            } else {
                ["-dev", "RPC0"].as_slice()
            })
            .env("OMP_WAIT_POLICY", test::OMP_WAIT_POLICY)
            .env_remove("GGML_BACKEND_PATH");
        if beside {
            cmd.env("GGML_BACKEND_PATH", plugin)
                .env("GGML_ANE_ENGINE", "reference")
                .env("GGML_ANE_GPU_SHARE", "0");
        }
        let name = format!("gpu-bench-{}-{i}", if beside { "ane" } else { "rpc" });
        let res = util::run_logged(&mut cmd, &name, Duration::from_secs(600))?;
        if !res.success() {
            bail!(
                "{name}: llama-bench {}\n{}\n{}",
                res.status_text(),
                res.stderr_tail(10),
                res.where_logged()
            );
        }
        samples_ts(&res.stdout).ok_or_else(|| {
            format!(
                "{name}: no samples_ts in llama-bench's output\n{}",
                res.where_logged()
            )
            .into()
        })
    };
    let (mut ane, mut gpu) = (Vec::new(), Vec::new());
    for i in 0..BENCH_ROUNDS {
        gpu.extend(run(false, i)?);
        ane.extend(run(true, i)?);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        (v[(v.len() - 1) / 2] + v[v.len() / 2]) / 2.0
    };
    let (a, g) = (median(&mut ane), median(&mut gpu));
    let ratio = a / g;
    let line = format!(
        "llama-bench tg32 t/s: beside the device {a:.1}, RPC-only {g:.1}, ratio {ratio:.3} \
         (target >= {:.2})",
        1.0 - DECODE_TOLERANCE
    );
    println!("{line}");
    if ratio < 1.0 - DECODE_TOLERANCE {
        bail!("{line}: decode beside the device is slower than the GPU alone");
    }
    Ok(line)
}

/// Every `samples_ts` value of llama-bench's JSON-lines output.
fn samples_ts(jsonl: &str) -> Option<Vec<f64>> {
    let mut out = Vec::new();
    for line in jsonl.lines() {
        let Some(i) = line.find("\"samples_ts\"") else {
            continue;
        };
        let rest = &line[i..];
        let (a, b) = (rest.find('[')?, rest.find(']')?);
        for v in rest[a + 1..b].split(',') {
            out.push(v.trim().parse().ok()?);
        }
    }
    (!out.is_empty()).then_some(out)
}

/// A staging budget of a fifth of SmolLM2's fp16 weights beside the GPU: by default the weights
/// beyond it stay with the GPU (declined `gpu_memory`, nothing streamed, fewer matmuls on the
/// device); `GGML_ANE_GPU_STREAM=1` claims them all and streams. The text is RPC-only's either way.
fn budget(plugin: &Path, rpc: &RpcServer, model: &Path, gpu: &Run, full: &Run) -> Result<String> {
    let fp16_mb = test::stat_f64(&full.stderr, "staged_peak_mb");
    let mb = format!("{}", (fp16_mb / 5.0).ceil().max(1.0));
    let all = full.stat("ops_offloaded");
    let mut out = Vec::new();
    for stream in ["0", "1"] {
        let r = complete_env(
            model,
            crate::bench_fallback::TEXT_PROMPT,
            16,
            &gpu_args(&rpc.endpoint, true),
            Some(plugin),
            &[],
            &[
                ("GGML_ANE_STAGE_MAX_MB", mb.as_str()),
                ("GGML_ANE_GPU_STREAM", stream),
            ],
            &format!("gpu-budget-stream{stream}"),
        )?;
        let (ops, declined, streamed) = (
            r.stat("ops_offloaded"),
            r.stat("gpu_memory"),
            test::stat_f64(&r.stderr, "stream_mb"),
        );
        if r.text != gpu.text {
            bail!(
                "gpu-budget-stream{stream}: text differs from RPC-only\n  {:?}\n  {:?}",
                r.text,
                gpu.text
            );
        }
        let ok = match stream {
            "0" => declined > 0 && ops > 0 && ops < all && streamed == 0.0,
            _ => declined == 0 && ops == all && streamed > 0.0,
        };
        if !ok {
            bail!(
                "gpu-budget-stream{stream} ({mb} MiB of {fp16_mb:.1}): {ops} matmuls on the device \
                 (unbounded {all}), {declined} declined gpu_memory, {streamed:.1} MiB streamed"
            );
        }
        out.push(format!(
            "GGML_ANE_GPU_STREAM={stream}: {ops}/{all} matmuls on the device, {declined} declined \
             gpu_memory, {streamed:.1} MiB streamed"
        ));
    }
    let line = format!(
        "budget {mb} MiB of {fp16_mb:.1} beside the GPU, text = RPC-only: {}",
        out.join(", ")
    );
    println!("{line}");
    Ok(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_bench_samples_are_read() {
        let j =
            "{\"n_gen\": 32, \"samples_ts\": [ 129.0, 133.5 ], \"x\": 1}\n{\"samples_ts\": [1]}\n";
        assert_eq!(samples_ts(j), Some(vec![129.0, 133.5, 1.0]));
        assert_eq!(samples_ts("{}"), None);
    }

    #[test]
    fn reserved_splits_are_read_in_both_forms() {
        let pp = "x I sched_reserve: graph (pp bs=512, tg bs=1): nodes = 71 / 71, splits = 15 / 2, input";
        assert_eq!(reserved_splits(pp), Some("15 / 2"));
        let one = "I sched_reserve: graph: nodes = 71, splits = 2, input objects = 4";
        assert_eq!(reserved_splits(one), Some("2"));
        assert_eq!(reserved_splits("nothing"), None);
    }

    #[test]
    fn gpu_arguments_put_the_device_first_with_no_layers() {
        let a = gpu_args("127.0.0.1:5", true).join(" ");
        assert_eq!(a, "--rpc 127.0.0.1:5 --device ANE,RPC0 -ngl 99 -ts 0,1");
        assert!(!gpu_args("127.0.0.1:5", false).join(" ").contains("ANE"));
    }
}
