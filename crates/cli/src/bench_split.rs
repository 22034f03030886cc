//! `ane bench split`: what the plugin's split of prefill matmuls between the device and a GPU
//! (`GGML_ANE_GPU_SHARE=auto`) measured and chose, and what it predicts, read from the
//! calibrations it keeps in its cache folder; with `--llama-bench`, also measured end to end.
//!
//! The cache file `split-calibrations.tsv` has one tab-separated line per machine and shape class:
//! `machine class ane_ms gpu_ms share at` (machine = `engine|chip|os-release|gpu`, the device's and
//! the GPU's time for the whole group, the GPU's share of rows, seconds since the epoch). Per line
//! this prints the device ms, the GPU ms, the share and the predicted speedup over the GPU alone
//! ([`predicted_speedup`]); the device's column is labelled with the engine that ran (`reference`
//! on Linux: the CPU stand-in, never an ANE figure).
//!
//! Measured mode runs `llama-bench` prompt processing (`-p 512 -n 0 -r 3 -o jsonl`) with the GPU
//! alone (`-dev GPU`) and beside the device (`-dev ANE/GPU -ts 0/1`, the plugin with
//! `GGML_ANE_GPU_SHARE=auto` and a cache folder a first warm-up run fills) and prints both t/s,
//! their ratio and the shares the plugin chose. On Linux the device is the reference engine
//! (`GGML_ANE_ENGINE=reference`) and the GPU llama.cpp's RPC backend (`--gpu RPC0 --rpc HOST:PORT`).
//!
//! [`doctor_section`] is `ane doctor`'s `split`: whether splitting pays on this machine.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

/// The plugin's cache file of calibrations, in its cache folder.
pub const FILE: &str = ane_plan::calibration::SPLIT_FILE;

/// The plugin measures a class again when its line is older than this.
pub const STALE_DAYS: u64 = 30;

/// Arguments of `ane bench split`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Folder of `split-calibrations.tsv`. Default: the plugin's (`GGML_ANE_CACHE_DIR`, else
    /// `~/Library/Caches/ggml-ane` on macOS, `$XDG_CACHE_HOME/ggml-ane` or `~/.cache/ggml-ane`).
    /// With `--llama-bench`: the folder the runs use (default: a fresh temporary one, removed after).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Also measure: this `llama-bench` runs prompt processing with the GPU alone and beside the
    /// device (needs `--model` and `--gpu`).
    #[arg(long)]
    pub llama_bench: Option<PathBuf>,
    /// The model `llama-bench` runs.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// The GPU device as llama.cpp names it: `MTL0` on a Mac, `RPC0` for llama.cpp's RPC backend.
    #[arg(long)]
    pub gpu: Option<String>,
    /// `HOST:PORT` of a running `ggml-rpc-server` (needed with `--gpu RPC<n>`).
    #[arg(long)]
    pub rpc: Option<String>,
    /// The plugin's file. Default: `GGML_BACKEND_PATH`, else `libggml_ane.{so,dylib}` beside `ane`.
    #[arg(long)]
    pub plugin: Option<PathBuf>,
    /// Prompt tokens per run (`llama-bench -p`).
    #[arg(long, default_value_t = 512)]
    pub prompt: usize,
    /// Repetitions per timed run (`llama-bench -r`).
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// Seconds each `llama-bench` run may take before it is killed.
    #[arg(long, default_value_t = 1800)]
    pub timeout: u64,
}

/// One line of the cache file.
#[derive(Clone, Debug, PartialEq)]
pub struct Line {
    /// `engine|chip|os-release|gpu`.
    pub machine: String,
    /// Shape class (`t<type>:k<K>:m<M>[+<M>..]:n<N bucket>`).
    pub class: String,
    /// The device computing the whole group, ms.
    pub ane_ms: f64,
    /// The GPU computing the whole group, ms (`inf`: the GPU failed).
    pub gpu_ms: f64,
    /// The GPU's share of rows, 0 to 1.
    pub share: f64,
    /// When measured, seconds since the epoch.
    pub at: u64,
}

/// One line of the cache file, if well-formed (the plugin's own rules: six fields, a share in
/// `[0, 1]`).
pub fn parse_line(line: &str) -> Option<Line> {
    let f: Vec<&str> = line.trim_end_matches('\r').split('\t').collect();
    if f.len() != 6 || f[0].is_empty() || f[1].is_empty() {
        return None;
    }
    Some(Line {
        machine: f[0].to_string(),
        class: f[1].to_string(),
        ane_ms: f[2].parse().ok().filter(|v: &f64| !v.is_nan())?,
        gpu_ms: f[3].parse().ok().filter(|v: &f64| !v.is_nan())?,
        share: f[4]
            .parse::<f64>()
            .ok()
            .filter(|s| (0.0..=1.0).contains(s))?,
        at: f[5].parse().ok()?,
    })
}

/// Every well-formed line, a later line of the same machine and class replacing an earlier one.
pub fn parse(text: &str) -> Vec<Line> {
    let mut out: Vec<Line> = Vec::new();
    for l in text.lines().filter_map(parse_line) {
        match out
            .iter_mut()
            .find(|o| o.machine == l.machine && o.class == l.class)
        {
            Some(o) => *o = l,
            None => out.push(l),
        }
    }
    out
}

/// The predicted speedup of the split over the GPU alone: the GPU alone takes `gpu_ms`, the split
/// takes the longer of the device's part and the GPU's, `gpu_ms / max(ane_ms * (1 - share),
/// gpu_ms * share)`. `None` when it cannot be predicted (a failed GPU, no time measured).
pub fn predicted_speedup(ane_ms: f64, gpu_ms: f64, share: f64) -> Option<f64> {
    let timed = gpu_ms.is_finite() && gpu_ms > 0.0 && ane_ms.is_finite() && ane_ms >= 0.0;
    if !timed || !(0.0..=1.0).contains(&share) {
        return None;
    }
    let t = (ane_ms * (1.0 - share)).max(gpu_ms * share);
    (t > 0.0).then(|| gpu_ms / t)
}

/// The calibrations of one machine key.
#[derive(Clone, Debug, PartialEq)]
pub struct Machine {
    pub key: String,
    /// The key's parts: engine (`ane`, `coreml`, `reference`), chip, `os-release`, GPU device.
    pub engine: String,
    pub chip: String,
    pub os: String,
    pub gpu: String,
    /// Its lines, sorted by class.
    pub lines: Vec<Line>,
}

impl Machine {
    fn new(key: &str) -> Machine {
        let mut p = key.splitn(4, '|').map(str::to_string);
        let mut next = || p.next().unwrap_or_else(|| "?".to_string());
        Machine {
            key: key.to_string(),
            engine: next(),
            chip: next(),
            os: next(),
            gpu: next(),
            lines: Vec::new(),
        }
    }

    /// Classes whose share gives the GPU some rows and the device some (strictly between 0 and 1).
    pub fn split_classes(&self) -> usize {
        self.lines
            .iter()
            .filter(|l| l.share > 0.0 && l.share < 1.0)
            .count()
    }

    /// The best predicted speedup over the GPU alone and its class.
    pub fn best(&self) -> Option<(f64, &str)> {
        self.lines
            .iter()
            .filter_map(|l| Some((predicted_speedup(l.ane_ms, l.gpu_ms, l.share)?, &*l.class)))
            .max_by(|a, b| a.0.total_cmp(&b.0))
    }

    /// Lines older than [`STALE_DAYS`] at `now` (the plugin measures them again).
    pub fn stale(&self, now: u64) -> usize {
        self.lines.iter().filter(|l| is_stale(l, now)).count()
    }

    fn to_json(&self, now: u64) -> Value {
        let best = self.best();
        json!({
            "machine": self.key,
            "engine": self.engine,
            "ane": self.engine == "ane" || self.engine == "coreml",
            "chip": self.chip,
            "os": self.os,
            "gpu": self.gpu,
            "classes": self.lines.iter().map(|l| json!({
                "class": l.class,
                "device_ms": finite(l.ane_ms),
                "gpu_ms": finite(l.gpu_ms),
                "gpu_failed": !l.gpu_ms.is_finite(),
                "share": l.share,
                "predicted_speedup": predicted_speedup(l.ane_ms, l.gpu_ms, l.share).map(|s| round(s, 3)),
                "at": l.at,
                "stale": is_stale(l, now),
            })).collect::<Vec<_>>(),
            "split_classes": self.split_classes(),
            "stale_classes": self.stale(now),
            "best_predicted_speedup": best.map(|b| round(b.0, 3)),
            "best_class": best.map(|b| b.1),
        })
    }
}

fn is_stale(l: &Line, now: u64) -> bool {
    l.at < now.saturating_sub(STALE_DAYS * 86_400)
}

/// The lines grouped per machine key, keys in the order they first appear, classes sorted.
pub fn by_machine(lines: &[Line]) -> Vec<Machine> {
    let mut out: Vec<Machine> = Vec::new();
    for l in lines {
        let i = match out.iter().position(|m| m.key == l.machine) {
            Some(i) => i,
            None => {
                out.push(Machine::new(&l.machine));
                out.len() - 1
            }
        };
        out[i].lines.push(l.clone());
    }
    for m in &mut out {
        m.lines.sort_by(|a, b| a.class.cmp(&b.class));
    }
    out
}

/// What the engine of a key is, for a label: never an ANE figure unless the engine ran on it.
pub fn engine_label(engine: &str) -> String {
    match engine {
        "ane" => "ane (private API, on the Neural Engine)".to_string(),
        "coreml" => "coreml (Core ML, CPUAndNeuralEngine)".to_string(),
        "reference" => "reference (the CPU stand-in, not the ANE)".to_string(),
        other => format!("{other} (not the ANE)"),
    }
}

/// The folder the plugin keeps its calibrations in (as `ggml_ane::split::cache_dir`):
/// `GGML_ANE_CACHE_DIR`, else `~/Library/Caches/ggml-ane` on macOS, `$XDG_CACHE_HOME/ggml-ane` or
/// `~/.cache/ggml-ane` elsewhere.
pub fn default_cache_dir() -> Option<PathBuf> {
    let over = std::env::var("GGML_ANE_CACHE_DIR")
        .ok()
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .map(PathBuf::from);
    ane_plan::calibration::cache_dir(over)
}

/// This machine's `os-release` part of the keys (`uname -r`, as the plugin reads it).
pub fn this_os() -> String {
    let release = Command::new("uname")
        .arg("-r")
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|r| !r.is_empty())
        .unwrap_or_else(|| "?".to_string());
    format!("{}-{release}", std::env::consts::OS)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn round(v: f64, digits: i32) -> f64 {
    crate::doctor::round(v, digits)
}

fn finite(v: f64) -> Value {
    if v.is_finite() {
        json!(round(v, 3))
    } else {
        Value::Null
    }
}

/// The lines of `dir`'s cache file: `None` when there is no readable file.
fn read_dir_lines(dir: &Path) -> Option<Vec<Line>> {
    std::fs::read_to_string(dir.join(FILE))
        .ok()
        .map(|t| parse(&t))
}

/// How to produce calibrations on this kind of machine.
pub fn how_to_calibrate() -> Vec<String> {
    let (dev, extra, gpu) = if cfg!(target_vendor = "apple") {
        ("ANE,MTL0", "", "--gpu MTL0")
    } else {
        (
            "ANE,RPC0",
            " --rpc 127.0.0.1:50052 -ngl 99",
            "--gpu RPC0 --rpc 127.0.0.1:50052",
        )
    };
    let engine = if cfg!(target_vendor = "apple") {
        ""
    } else {
        "GGML_ANE_ENGINE=reference "
    };
    vec![
        format!(
            "run llama.cpp once beside the GPU with the default GGML_ANE_GPU_SHARE=auto: \
             {engine}GGML_BACKEND_PATH=/path/to/{} llama-completion -m model.gguf --device {dev} \
             -ts 0,1{extra} -p \"...\" (the plugin measures each shape class the second time it \
             runs and writes {FILE})",
            crate::doctor_commands::plugin_file_name(std::env::consts::OS)
        ),
        format!("or: ane bench split --llama-bench /path/to/llama-bench --model model.gguf {gpu}"),
    ]
}

/// Runs `ane bench split`.
pub fn run(args: &Args) -> Result<()> {
    let out = match &args.llama_bench {
        Some(lb) => measure(args, lb)?,
        None => {
            let dir = args
                .cache_dir
                .clone()
                .or_else(default_cache_dir)
                .context("no cache folder: HOME is unset; pass --cache-dir")?;
            report(&dir, None)
        }
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        for l in text(&out) {
            println!("{l}");
        }
    }
    Ok(())
}

/// The report of `dir`'s calibrations (only the machines `keep` accepts, when given).
fn report(dir: &Path, keep: Option<&dyn Fn(&Machine) -> bool>) -> Value {
    let lines = read_dir_lines(dir);
    let now = now();
    let machines: Vec<Value> = by_machine(lines.as_deref().unwrap_or_default())
        .iter()
        .filter(|m| keep.is_none_or(|k| k(m)))
        .map(|m| m.to_json(now))
        .collect();
    json!({
        "file": dir.join(FILE).to_string_lossy(),
        "found": lines.is_some(),
        "formula": "gpu_ms / max(device_ms * (1 - share), gpu_ms * share)",
        "machines": machines,
        "how": if machines.is_empty() { how_to_calibrate() } else { Vec::new() },
    })
}

/// The text of a report (and of its `measured` part, when present).
pub fn text(r: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let file = r["file"].as_str().unwrap_or("?");
    if let Some(m) = r.get("measured").filter(|m| !m.is_null()) {
        out.extend(measured_text(m));
    }
    let machines = r["machines"].as_array().cloned().unwrap_or_default();
    if machines.is_empty() {
        out.push(if r["found"] == true {
            format!("no calibrations in {file}")
        } else {
            format!("no calibrations: {file} does not exist")
        });
        for h in r["how"].as_array().into_iter().flatten() {
            out.push(format!("  {}", h.as_str().unwrap_or("")));
        }
        return out;
    }
    if r["measured"]["cache_dir_kept"] == false {
        out.push(format!(
            "calibrations of this run (read before its temporary folder was removed): {file}"
        ));
    } else {
        out.push(format!("calibrations: {file}"));
    }
    out.push(
        "predicted speedup over the GPU alone = gpu_ms / max(device_ms * (1 - share), gpu_ms * share)"
            .to_string(),
    );
    for m in &machines {
        let engine = m["engine"].as_str().unwrap_or("?");
        out.push(format!("machine {}", m["machine"].as_str().unwrap_or("?")));
        out.push(format!(
            "  device: {}; chip {}; {}; GPU {}",
            engine_label(engine),
            m["chip"].as_str().unwrap_or("?"),
            m["os"].as_str().unwrap_or("?"),
            m["gpu"].as_str().unwrap_or("?")
        ));
        out.push(format!(
            "  {:<28} {:>13} {:>10} {:>9} {:>10}",
            "class",
            format!("{engine} ms"),
            "GPU ms",
            "GPU share",
            "predicted"
        ));
        for c in m["classes"].as_array().into_iter().flatten() {
            let ms = |v: &Value| match v.as_f64() {
                Some(v) => format!("{v:.3}"),
                None => "failed".to_string(),
            };
            let pred = match c["predicted_speedup"].as_f64() {
                Some(p) => format!("{p:.2}x"),
                None => "-".to_string(),
            };
            out.push(format!(
                "  {:<28} {:>13} {:>10} {:>9.3} {:>10}{}",
                c["class"].as_str().unwrap_or("?"),
                ms(&c["device_ms"]),
                ms(&c["gpu_ms"]),
                c["share"].as_f64().unwrap_or(f64::NAN),
                pred,
                if c["stale"] == true {
                    "  (stale: measured again at next use)"
                } else {
                    ""
                }
            ));
        }
        out.push(format!("  {}", machine_summary(m)));
    }
    out
}

/// One line: how many classes split and the best predicted speedup.
fn machine_summary(m: &Value) -> String {
    let n = m["classes"].as_array().map_or(0, Vec::len);
    let split = m["split_classes"].as_u64().unwrap_or(0);
    let best = match (
        m["best_predicted_speedup"].as_f64(),
        m["best_class"].as_str(),
    ) {
        (Some(b), Some(c)) => format!("best predicted {b:.2}x over the GPU alone ({c})"),
        _ => "no prediction (the GPU failed or nothing was timed)".to_string(),
    };
    let engine = m["engine"].as_str().unwrap_or("?");
    let note = if m["ane"] == true {
        String::new()
    } else {
        format!("; device = {engine} engine, not an ANE figure")
    };
    format!(
        "{split} of {n} classes split between the device and the GPU (share strictly between 0 \
         and 1); {best}{note}"
    )
}

// ---------------------------------------------------------------- doctor

/// `ane doctor`'s `split`: the calibrations of the machine keys of this OS build (all keys, when
/// none matches), how many classes split and the best predicted speedup, or how to produce them.
pub fn doctor_section(dir: Option<&Path>, this_os: &str) -> Value {
    let Some(dir) = dir else {
        return json!({
            "file": Value::Null, "found": false, "this_os": this_os, "matched": false,
            "machines": [], "pays": Value::Null,
            "summary": "no cache folder (HOME unset and no GGML_ANE_CACHE_DIR): no calibrations",
            "how": how_to_calibrate(),
        });
    };
    let lines = read_dir_lines(dir).unwrap_or_default();
    let all = by_machine(&lines);
    let mine: Vec<&Machine> = all.iter().filter(|m| m.os == this_os).collect();
    let matched = !mine.is_empty();
    let shown: Vec<&Machine> = if matched { mine } else { all.iter().collect() };
    let now = now();
    let file = dir.join(FILE);
    if shown.is_empty() {
        return json!({
            "file": file.to_string_lossy(), "found": false, "this_os": this_os, "matched": false,
            "machines": [], "pays": Value::Null,
            "summary": format!("no calibrations in {}: splitting has not been measured here", file.display()),
            "how": how_to_calibrate(),
        });
    }
    // Pays: a class whose share gives both sides rows is predicted faster than the GPU alone.
    let best_split = shown
        .iter()
        .flat_map(|m| m.lines.iter().map(move |l| (m, l)))
        .filter(|(_, l)| l.share > 0.0 && l.share < 1.0)
        .filter_map(|(m, l)| {
            Some((
                predicted_speedup(l.ane_ms, l.gpu_ms, l.share)?,
                l.class.as_str(),
                m.key.as_str(),
            ))
        })
        .max_by(|a, b| a.0.total_cmp(&b.0));
    let pays = best_split.is_some_and(|b| b.0 > 1.0);
    let any_ane = shown
        .iter()
        .any(|m| m.engine == "ane" || m.engine == "coreml");
    let whose = if matched {
        format!("this machine ({this_os})")
    } else {
        format!("no key of this machine ({this_os}), all keys shown")
    };
    let mut summary = match best_split {
        Some((x, class, key)) if pays => format!(
            "splitting pays on {whose}: best predicted {x:.2}x over the GPU alone for a split \
             class ({class}, {key})"
        ),
        _ => format!(
            "splitting does not pay on {whose}: no class gives both sides rows with a predicted \
             gain over the GPU alone"
        ),
    };
    if !any_ane {
        summary.push_str(" (device = reference engine: not an ANE figure)");
    }
    json!({
        "file": file.to_string_lossy(),
        "found": true,
        "this_os": this_os,
        "matched": matched,
        "machines": shown.iter().map(|m| m.to_json(now)).collect::<Vec<_>>(),
        "pays": pays,
        "summary": summary,
        "how": Vec::<String>::new(),
    })
}

/// The doctor's text lines of its `split` section.
pub fn doctor_text(s: &Value) -> Vec<String> {
    let mut out = vec![format!("split: {}", s["summary"].as_str().unwrap_or("?"))];
    for m in s["machines"].as_array().into_iter().flatten() {
        out.push(format!(
            "  {}: {}",
            m["machine"].as_str().unwrap_or("?"),
            machine_summary(m)
        ));
    }
    for h in s["how"].as_array().into_iter().flatten() {
        out.push(format!("  {}", h.as_str().unwrap_or("")));
    }
    out
}

// ---------------------------------------------------------------- measured

/// One finished child process.
struct Ran {
    ok: bool,
    status: String,
    stdout: String,
    stderr: String,
}

/// Runs `cmd` to its end (killed after `timeout`), its output captured.
fn run_captured(cmd: &mut Command, timeout: Duration) -> Result<Ran> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {:?}", cmd.get_program()))?;
    let pipe = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(mut r) = r {
                let mut b = Vec::new();
                let _ = r.read_to_end(&mut b);
                s = String::from_utf8_lossy(&b).into_owned();
            }
            s
        })
    };
    let out = pipe(child.stdout.take().map(|p| Box::new(p) as _));
    let err = pipe(child.stderr.take().map(|p| Box::new(p) as _));
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break Some(s);
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (stdout, stderr) = (
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default(),
    );
    Ok(match status {
        Some(s) => Ran {
            ok: s.success(),
            status: s.to_string(),
            stdout,
            stderr,
        },
        None => Ran {
            ok: false,
            status: format!("killed after {}s", timeout.as_secs()),
            stdout,
            stderr,
        },
    })
}

/// Prompt processing t/s of a `llama-bench -o jsonl` run: `avg_ts` of its first prompt-only line.
pub fn pp_tps(jsonl: &str) -> Option<f64> {
    jsonl
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l.trim()).ok())
        .find(|v| v["n_prompt"].as_u64().unwrap_or(0) > 0 && v["n_gen"].as_u64() == Some(0))
        .and_then(|v| v["avg_ts"].as_f64())
}

/// The plugin's stats (`GGML_ANE_STATS=json`: a `ggml-ane-stats: {...}` line on stderr), the last.
pub fn stats(stderr: &str) -> Option<Value> {
    stderr
        .lines()
        .rev()
        .filter_map(|l| l.split_once("ggml-ane-stats:"))
        .find_map(|(_, j)| serde_json::from_str(j.trim()).ok())
}

fn tail(s: &str, n: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(n)..].join("\n")
}

/// The measured mode: GPU alone, a warm-up beside the device that fills the calibrations, then
/// the timed run beside the device.
fn measure(args: &Args, llama_bench: &Path) -> Result<Value> {
    let (Some(model), Some(gpu)) = (&args.model, &args.gpu) else {
        bail!("--llama-bench needs --model M.gguf and --gpu MTL0|RPC0");
    };
    if gpu.starts_with("RPC") && args.rpc.is_none() {
        bail!("--gpu {gpu} needs --rpc HOST:PORT of a running ggml-rpc-server");
    }
    let plugin = match &args.plugin {
        Some(p) if p.is_file() => p.clone(),
        Some(p) => bail!("--plugin {}: not a file", p.display()),
        None => crate::doctor_commands::locate_plugin().0.with_context(|| {
            format!(
                "no plugin: pass --plugin PATH, set GGML_BACKEND_PATH, or put {} beside ane \
                 (cargo build --release -p ggml-ane -p ane-cli)",
                crate::doctor_commands::plugin_file_name(std::env::consts::OS)
            )
        })?,
    };
    let (dir, temporary) = match &args.cache_dir {
        Some(d) => (d.clone(), false),
        None => (
            std::env::temp_dir().join(format!(
                "ane-bench-split-{}-{}",
                std::process::id(),
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos())
            )),
            true,
        ),
    };
    // Off macOS there is no ANE: the reference engine stands in, and says so.
    let forced = (!cfg!(target_vendor = "apple")).then_some("reference");
    let timeout = Duration::from_secs(args.timeout);
    let bench = |beside: bool, reps: usize, with_stats: bool| -> Result<Ran> {
        let mut cmd = Command::new(llama_bench);
        cmd.arg("-m").arg(model).args([
            "-p",
            &args.prompt.to_string(),
            "-n",
            "0",
            "-r",
            &reps.max(1).to_string(),
            "-o",
            "jsonl",
            "-ngl",
            "99",
        ]);
        if let Some(ep) = &args.rpc {
            cmd.args(["-rpc", ep]);
        }
        cmd.env_remove("GGML_BACKEND_PATH");
        if beside {
            cmd.args(["-dev", &format!("ANE/{gpu}"), "-ts", "0/1"])
                .env("GGML_BACKEND_PATH", &plugin)
                .env("GGML_ANE_GPU_SHARE", "auto")
                .env("GGML_ANE_CACHE_DIR", &dir)
                .env_remove("GGML_ANE_PREFER");
            if let Some(e) = forced {
                cmd.env("GGML_ANE_ENGINE", e);
            }
            if with_stats {
                cmd.env("GGML_ANE_STATS", "json");
            } else {
                cmd.env_remove("GGML_ANE_STATS");
            }
        } else {
            cmd.args(["-dev", gpu]);
        }
        let line = format!("{cmd:?}");
        let r = run_captured(&mut cmd, timeout)?;
        if !r.ok {
            bail!("llama-bench {}: {line}\n{}", r.status, tail(&r.stderr, 15));
        }
        Ok(r)
    };
    let started = now();
    let gpu_run = bench(false, args.reps, false)?;
    let gpu_tps = pp_tps(&gpu_run.stdout).with_context(|| {
        format!(
            "no prompt-processing line in llama-bench's output (GPU alone):\n{}",
            tail(&gpu_run.stdout, 5)
        )
    })?;
    bench(true, 1, false).context("warm-up beside the device")?;
    let beside_run = bench(true, args.reps, true)?;
    let beside_tps = pp_tps(&beside_run.stdout).with_context(|| {
        format!(
            "no prompt-processing line in llama-bench's output (beside the device):\n{}",
            tail(&beside_run.stdout, 5)
        )
    })?;
    let st = stats(&beside_run.stderr);
    let engine = st
        .as_ref()
        .and_then(|s| s["engine"].as_str())
        .map(str::to_string);
    // The machine key the plugin wrote: this OS build, this GPU, the engine that ran.
    let os = this_os();
    let keep = |m: &Machine| {
        m.gpu == *gpu && m.os == os && engine.as_deref().is_none_or(|e| e == m.engine)
    };
    let mut r = report(&dir, Some(&keep));
    let shares: Vec<Value> = r["machines"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|m| m["classes"].as_array().cloned().unwrap_or_default())
        .map(|c| json!({"class": c["class"], "share": c["share"], "fresh": c["at"].as_u64().is_some_and(|a| a >= started)}))
        .collect();
    if temporary {
        let _ = std::fs::remove_dir_all(&dir);
    }
    let beside_dev = format!("ANE/{gpu}");
    r["measured"] = json!({
        "llama_bench": llama_bench.to_string_lossy(),
        "model": model.to_string_lossy(),
        "plugin": plugin.to_string_lossy(),
        "gpu": gpu,
        "rpc": args.rpc,
        "prompt": args.prompt,
        "reps": args.reps,
        "gpu_args": format!("-dev {gpu}"),
        "beside_args": format!("-dev {beside_dev} -ts 0/1"),
        "gpu_tps": round(gpu_tps, 2),
        "beside_tps": round(beside_tps, 2),
        "beside_over_gpu": round(beside_tps / gpu_tps, 4),
        "engine": engine,
        "engine_forced": forced,
        "ane": engine.as_deref().is_some_and(|e| e == "ane" || e == "coreml"),
        "split_ops": st.as_ref().map(|s| s["split_ops"].clone()),
        "gpu_share": st.as_ref().map(|s| s["gpu_share"].clone()),
        "split_gpu_failures": st.as_ref().map(|s| s["split_gpu_failures"].clone()),
        "shares": shares,
        "cache_dir": dir.to_string_lossy(),
        "cache_dir_kept": !temporary,
    });
    Ok(r)
}

fn measured_text(m: &Value) -> Vec<String> {
    let engine = m["engine"].as_str().unwrap_or("unknown");
    let forced = match m["engine_forced"].as_str() {
        Some(e) => format!(", GGML_ANE_ENGINE={e} (no ANE on this OS)"),
        None => String::new(),
    };
    let mut out = vec![format!(
        "measured: llama-bench pp{} ({} reps), {}",
        m["prompt"],
        m["reps"],
        m["model"].as_str().unwrap_or("?")
    )];
    let row = |label: String, tps: &Value| {
        format!(
            "  {label:<46} {:>10.2} t/s",
            tps.as_f64().unwrap_or(f64::NAN)
        )
    };
    out.push(row(
        format!("GPU alone ({}):", m["gpu_args"].as_str().unwrap_or("?")),
        &m["gpu_tps"],
    ));
    out.push(row(
        format!(
            "beside the device ({}):",
            m["beside_args"].as_str().unwrap_or("?")
        ),
        &m["beside_tps"],
    ));
    out.push(format!(
        "  beside / GPU alone: {:.3}x; device engine: {}{forced}",
        m["beside_over_gpu"].as_f64().unwrap_or(f64::NAN),
        engine_label(engine)
    ));
    if m["ane"] != true {
        out.push("  (not an ANE figure: the device that ran is not the Neural Engine)".to_string());
    }
    let local = |ep: &str| ep.starts_with("127.") || ep.starts_with("localhost");
    if m["rpc"].as_str().is_some_and(local) {
        out.push(
            "  (a local ggml-rpc-server stands in for the GPU and shares the CPU cores with the \
             device's engine: neither t/s nor their ratio says what a Mac would show)"
                .to_string(),
        );
    }
    out.push(format!(
        "  plugin stats: split_ops {}, GPU share of the split work {}, GPU failures {}",
        m["split_ops"],
        m["gpu_share"]
            .as_f64()
            .map_or("?".to_string(), |s| format!("{s:.3}")),
        m["split_gpu_failures"]
    ));
    let shares: Vec<String> = m["shares"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            format!(
                "{} {}",
                s["class"].as_str().unwrap_or("?"),
                s["share"].as_f64().unwrap_or(f64::NAN)
            )
        })
        .collect();
    out.push(format!(
        "  shares chosen (GPU's, per class): {}",
        if shares.is_empty() {
            "none recorded (nothing was split)".to_string()
        } else {
            shares.join(", ")
        }
    ));
    out.push(format!(
        "  calibrations from {}{}",
        m["cache_dir"].as_str().unwrap_or("?"),
        if m["cache_dir_kept"] == true {
            ""
        } else {
            " (a temporary folder, filled by the warm-up run, removed)"
        }
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str =
        "reference|M4|linux-6.1|RPC0\tt1:k256:m128+128:n512\t4.452\t3.562\t0.5\t100\n\
        reference|M4|linux-6.1|RPC0\tt1:k256:m256:n512\t9.801\t20.037\t0.375\t100\n\
        ane|M4|macos-24.1.0|MTL0\tt8:k4096:m4096:n512\t30\t10\t0.75\t200\n\
        ane|M4|macos-24.1.0|MTL0\tt8:k4096:m14336:n512\t5\tinf\t0\t200\n\
        garbage\n\
        x\ty\t1\t2\t1.5\t3\n\
        reference|M4|linux-6.1|RPC0\tt1:k256:m256:n512\t10\t10\t0.5\t300\n";

    #[test]
    fn lines_parse_as_the_plugin_writes_them() {
        let l =
            parse_line("ane|M4|macos-24.1.0|MTL0\tt8:k1:m2:n512\t1.500\t2.250\t0.625\t17").unwrap();
        assert_eq!(l.machine, "ane|M4|macos-24.1.0|MTL0");
        assert_eq!(l.class, "t8:k1:m2:n512");
        assert_eq!((l.ane_ms, l.gpu_ms, l.share, l.at), (1.5, 2.25, 0.625, 17));
        // A failed GPU is written as inf.
        assert!(parse_line("m\tc\t0.000\tinf\t0\t1")
            .unwrap()
            .gpu_ms
            .is_infinite());
        for bad in [
            "",
            "m\tc\t1\t2\t0.5",
            "m\tc\t1\t2\t1.5\t1",
            "m\tc\tx\t2\t0.5\t1",
            "m\tc\t1\t2\t0.5\t-1",
            "m\tc\tNaN\t2\t0.5\t1",
            "m\tc\t1\t2\t0.5\t1\textra",
        ] {
            assert!(parse_line(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn a_later_line_of_a_class_replaces_the_earlier_and_machines_group() {
        let lines = parse(SAMPLE);
        assert_eq!(lines.len(), 4);
        let ms = by_machine(&lines);
        assert_eq!(ms.len(), 2);
        let r = &ms[0];
        assert_eq!(
            (
                r.engine.as_str(),
                r.chip.as_str(),
                r.os.as_str(),
                r.gpu.as_str()
            ),
            ("reference", "M4", "linux-6.1", "RPC0")
        );
        let c = &r.lines[1];
        assert_eq!(
            (c.class.as_str(), c.ane_ms, c.share, c.at),
            ("t1:k256:m256:n512", 10.0, 0.5, 300)
        );
        assert_eq!(r.split_classes(), 2);
        let a = &ms[1];
        assert_eq!(a.split_classes(), 1, "share 0 is not a split");
        let (best, class) = a.best().unwrap();
        assert_eq!(class, "t8:k4096:m4096:n512");
        assert!((best - 10.0 / 7.5).abs() < 1e-12, "{best}");
        assert_eq!(a.stale(200 + STALE_DAYS * 86_400 + 1), 2);
        assert_eq!(a.stale(200), 0);
    }

    #[test]
    fn the_speedup_is_the_gpu_alone_over_the_slower_side() {
        let s = |a, g, x| predicted_speedup(a, g, x).unwrap();
        // Balanced: 10 ms each, half each: 5 ms, 2x.
        assert_eq!(s(10.0, 10.0, 0.5), 2.0);
        // The device 3x slower, GPU share 0.75: both 7.5 ms.
        assert_eq!(s(30.0, 10.0, 0.75), 10.0 / 7.5);
        // Share 0: the device alone against the GPU alone.
        assert_eq!(s(20.0, 10.0, 0.0), 0.5);
        // Share 1: the GPU alone.
        assert_eq!(s(20.0, 10.0, 1.0), 1.0);
        // An unbalanced share: the slower side decides.
        assert_eq!(s(10.0, 10.0, 0.25), 10.0 / 7.5);
        assert_eq!(predicted_speedup(5.0, f64::INFINITY, 0.0), None);
        assert_eq!(predicted_speedup(0.0, 5.0, 0.0), None);
        assert_eq!(predicted_speedup(5.0, 0.0, 0.5), None);
        assert_eq!(predicted_speedup(5.0, 5.0, 1.5), None);
    }

    #[test]
    fn llama_bench_jsonl_and_stats_are_read() {
        let j = "{\"n_prompt\": 0, \"n_gen\": 32, \"avg_ts\": 5.0}\n\
                 {\"n_prompt\": 512, \"n_gen\": 0, \"avg_ts\": 1234.5, \"samples_ts\": [1, 2]}\n";
        assert_eq!(pp_tps(j), Some(1234.5));
        assert_eq!(pp_tps("not json\n{}"), None);
        let e = "x\nggml-ane-stats: {\"engine\": \"reference\", \"split_ops\": 3}\nggml-ane-stats: {\"engine\": \"reference\", \"split_ops\": 7}\n";
        assert_eq!(stats(e).unwrap()["split_ops"], 7);
        assert!(stats("nothing").is_none());
    }

    #[test]
    fn the_doctor_picks_this_machine_or_shows_all_and_says_how_without_any() {
        let dir = std::env::temp_dir().join(format!("ane-split-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let none = doctor_section(Some(&dir), "linux-6.1");
        assert_eq!(none["found"], false);
        assert!(none["pays"].is_null());
        assert!(none["how"][0]
            .as_str()
            .unwrap()
            .contains("GGML_ANE_GPU_SHARE=auto"));
        assert!(none["how"][1]
            .as_str()
            .unwrap()
            .starts_with("or: ane bench split --llama-bench"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(FILE), SAMPLE).unwrap();
        let mine = doctor_section(Some(&dir), "linux-6.1");
        assert_eq!(mine["matched"], true);
        assert_eq!(mine["machines"].as_array().unwrap().len(), 1);
        assert_eq!(mine["machines"][0]["split_classes"], 2);
        assert_eq!(mine["pays"], true);
        let summary = mine["summary"].as_str().unwrap();
        assert!(
            summary.starts_with("splitting pays on this machine"),
            "{summary}"
        );
        assert!(summary.contains("not an ANE figure"), "{summary}");
        let other = doctor_section(Some(&dir), "linux-9.9");
        assert_eq!(other["matched"], false);
        assert_eq!(other["machines"].as_array().unwrap().len(), 2);
        let text = doctor_text(&other).join("\n");
        assert!(text.contains("all keys shown"), "{text}");
        assert!(
            text.contains("ane|M4|macos-24.1.0|MTL0: 1 of 2 classes split"),
            "{text}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
