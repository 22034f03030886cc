//! `ane bench`: MUL_MAT shapes on the engine against an f32 CPU product measured in the same run,
//! with the speedup per shape, so a claim such as "16.8x the CPU" can be checked on a Mac.
//!
//! The engine column always names the engine that was measured: without a working ANE the
//! reference engine is timed and labelled as such; an ANE number is printed only when measured
//! on the ANE. The CPU baseline is this crate's own blocked f32 loop on all cores (not
//! Accelerate), so the ratio is against that baseline and says so.

use std::time::Instant;

use anyhow::{bail, Result};
use serde_json::json;

use ane_plan::canary::{cpu_matmul_f32, max_rel_err, run_conv_matmul, test_values};
use ane_plan::canary::{q8_0_test_blocks, run_int8, run_tiled, Int8Bytes};
use ane_plan::{Layout, Planner};

use std::sync::Arc;

use ane_engine::Engine;

use crate::probe::probe;

/// Arguments of `ane bench`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// `host`: conversion throughput instead of MUL_MAT shapes.
    #[command(subcommand)]
    pub what: Option<What>,
    /// Program forms to time: `conv` (baked weights, the prototype's form), `tiled` (the plugin's
    /// shape-shared form, channel-first), `tokens` (the same, token-major) and `int8` (token-major
    /// with Q8_0 weights as an int8 input plus fp16 block scales, dequantized in the program: the
    /// int8-weight probe, not used by the plugin yet); comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "conv,tiled,tokens,int8")]
    pub forms: Vec<String>,
    /// Shapes as `MxKxN` (M rows of weights, K inner, N tokens), comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1024x1024x256,2048x2048x512,4096x4096x512"
    )]
    pub shapes: Vec<String>,
    /// Evaluations per shape (fastest reported).
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// Measure the reference engine even on a Mac.
    #[arg(long)]
    pub reference: bool,
    /// Engines to time: `auto` (the private ANE API when usable, else the reference engine),
    /// `coreml` (Core ML, CPUAndNeuralEngine), or `both` (the two side by side, same shapes).
    #[arg(long, value_enum, default_value = "auto")]
    pub engine: Engines,
    /// Time the reference engine in Core ML's place (tests off macOS; labelled as such).
    #[arg(long, hide = true)]
    pub stand_in_coreml: bool,
    /// Print JSON lines instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Which engines `ane bench` times.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Engines {
    /// The private ANE API when usable, else the reference engine.
    Auto,
    /// Core ML only.
    Coreml,
    /// Both, side by side.
    Both,
}

/// What else `ane bench` can measure.
#[derive(Debug, clap::Subcommand)]
pub enum What {
    /// Host conversion (activations, outputs, weights) against memcpy and ggml.
    Host(crate::bench_host::Args),
    /// One MoE layer's expert matmul: packs of experts against one dispatch per expert.
    Moe(crate::bench_moe::Args),
    /// The device and a GPU splitting prefill matmuls: per shape class the device ms, GPU ms,
    /// share and predicted speedup from the plugin's calibrations; `--llama-bench` also measures.
    Split(crate::bench_split::Args),
}

fn parse_shape(s: &str) -> Result<(usize, usize, usize)> {
    let v: Vec<usize> = s
        .trim()
        .split('x')
        .map(|p| p.parse::<usize>())
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("shape `{s}`: {e}"))?;
    match v[..] {
        [m, k, n] if m > 0 && k > 0 && n > 0 => Ok((m, k, n)),
        _ => bail!("shape `{s}`: expected MxKxN with positive sizes"),
    }
}

/// Runs the benchmark.
pub fn run(args: &Args) -> Result<()> {
    let shapes: Vec<_> = args
        .shapes
        .iter()
        .map(|s| parse_shape(s))
        .collect::<Result<_>>()?;
    let mut engines: Vec<(String, Arc<dyn Engine>, bool)> = Vec::new();
    if args.engine != Engines::Coreml {
        let p = probe(!args.reference);
        let label = if p.ane_available {
            "ane"
        } else {
            "reference (CPU, not ANE)"
        };
        engines.push((label.to_string(), p.engine, p.ane_available));
    }
    if args.engine != Engines::Auto {
        match crate::probe::open_coreml(args.stand_in_coreml) {
            Ok(e) if args.stand_in_coreml => {
                engines.push(("coreml stand-in (reference, not Core ML)".into(), e, false))
            }
            Ok(e) => engines.push(("coreml".into(), e, true)),
            Err(why) if args.engine == Engines::Coreml => bail!("Core ML: {why}"),
            Err(why) => println!("coreml: not measured: {why}"),
        }
    }
    for (label, engine, on_device) in &engines {
        bench_engine(args, &shapes, label, engine.as_ref(), *on_device)?;
    }
    Ok(())
}

/// Times every shape and form on one engine, against the f32 CPU loop.
fn bench_engine(
    args: &Args,
    shapes: &[(usize, usize, usize)],
    label: &str,
    engine: &dyn Engine,
    on_device: bool,
) -> Result<()> {
    if !args.json {
        println!(
            "engine: {label}; baseline: f32 CPU loop on {} threads",
            threads()
        );
        println!(
            "{:>7} {:>6} {:>6} {:>5} {:>11} {:>9} {:>11} {:>9} {:>8} {:>11}",
            "form",
            "M",
            "K",
            "N",
            "engine ms",
            "TFLOPS",
            "cpu f32 ms",
            "TFLOPS",
            "speedup",
            "max_rel_err"
        );
    }
    let mut measured: Vec<(String, (usize, usize, usize), f64)> = Vec::new();
    for ((m, k, n), form) in shapes
        .iter()
        .flat_map(|&s| args.forms.iter().map(move |f| (s, f.clone())))
    {
        let x = test_values(k * n, 6);
        // The int8 form runs on Q8_0 blocks; the others, and the CPU product, on their fp16
        // dequantization (what fp16 staging holds), so every row's error is against the same math.
        let (raw, w) = if form == "int8" {
            if !k.is_multiple_of(ane_mil::build::QuantKind::BLOCK) {
                bail!("form int8: K = {k} is not a whole number of 32-value Q8_0 blocks");
            }
            q8_0_test_blocks(m, k, 5)
        } else {
            (Vec::new(), test_values(m * k, 5))
        };
        // (failed step, error) for the int8 probe, whose failure is the finding.
        let r = match form.as_str() {
            "conv" => run_conv_matmul(engine, (k, m, n), &w, &x, args.reps)
                .map_err(|e| (None, e.to_string())),
            "tiled" => run_tiled(engine, (k, m, n), Layout::Channels, &w, &x, args.reps)
                .map_err(|e| (None, e.to_string())),
            "tokens" => run_tiled(engine, (k, m, n), Layout::Tokens, &w, &x, args.reps)
                .map_err(|e| (None, e.to_string())),
            "int8" => run_int8(
                engine,
                &Planner::new(engine.limits()),
                (k, m, n),
                &raw,
                &x,
                args.reps,
            )
            .map_err(|f| (Some(f.step), f.error.to_string())),
            other => bail!("unknown form `{other}` (conv, tiled, tokens, int8)"),
        };
        // What the int8 form binds for the weights against the fp16 form.
        let bytes = (form == "int8")
            .then(|| Int8Bytes::of(&Planner::new(engine.limits()), (k, m, n)).ok())
            .flatten();
        let bytes_json = bytes.map(|b| {
            json!({"int8_bytes": b.q, "scale_bytes": b.scales, "fp16_bytes": b.fp16,
                   "ratio": (b.q + b.scales) as f64 / b.fp16 as f64,
                   "int8_surface_bytes": b.int8_surface, "fp16_surface_bytes": b.fp16_surface})
        });
        // A form the chip rejects (the baked conv cannot tile rows past the axis limit, a device
        // may take no int8 input) is a result to report, not a reason to stop measuring the others.
        let r = match r {
            Ok(r) => r,
            Err((step, e)) => {
                if args.json {
                    println!(
                        "{}",
                        json!({"engine": engine.name(), "label": label, "form": form, "m": m, "k": k, "n": n, "error": e, "failed_step": step, "weights": bytes_json})
                    );
                } else {
                    println!("{form:>7} {m:>6} {k:>6} {n:>5}  failed: {e}");
                }
                continue;
            }
        };
        let wf: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
        let xf: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
        let mut cpu_ms = f64::INFINITY;
        let mut exact = Vec::new();
        for _ in 0..args.reps.max(1) {
            let t = Instant::now();
            exact = cpu_matmul_f32(&wf, &xf, (k, m, n));
            cpu_ms = cpu_ms.min(t.elapsed().as_secs_f64() * 1e3);
        }
        let err = max_rel_err(&r.y, &exact);
        let tf = |ms: f64| 2.0 * (m * k * n) as f64 / (ms * 1e-3) / 1e12;
        let speedup = cpu_ms / r.eval_ms;
        measured.push((form.clone(), (m, k, n), r.eval_ms));
        if args.json {
            println!(
                "{}",
                json!({"engine": engine.name(), "label": label, "ane": on_device, "form": form, "m": m, "k": k, "n": n,
                       "engine_ms": r.eval_ms, "cpu_ms": cpu_ms, "speedup": speedup,
                       "engine_tflops": tf(r.eval_ms), "cpu_tflops": tf(cpu_ms), "max_rel_err": err,
                       "weights": bytes_json})
            );
        } else {
            println!(
                "{form:>7} {m:>6} {k:>6} {n:>5} {:>11.3} {:>9.4} {:>11.3} {:>9.4} {:>7.2}x {:>11.2e}",
                r.eval_ms,
                tf(r.eval_ms),
                cpu_ms,
                tf(cpu_ms),
                speedup,
                err
            );
            if let Some(b) = bytes {
                let mib = |v: usize| v as f64 / (1 << 20) as f64;
                println!(
                    "{:>7} weights {:.2} MiB int8 + {:.2} MiB scales = {:.3} of fp16's {:.2} MiB; \
                     request surfaces {:.2} MiB each (fp16: {:.2} MiB)",
                    "",
                    mib(b.q),
                    mib(b.scales),
                    (b.q + b.scales) as f64 / b.fp16 as f64,
                    mib(b.fp16),
                    mib(b.int8_surface),
                    mib(b.fp16_surface)
                );
            }
        }
    }
    if !on_device && !args.json {
        println!("no ANE measured: the speedup column compares the reference engine with the CPU baseline");
    }
    // The cost model's most uncertain constant, measured: how much slower the shape-shared
    // programs (weights as an input) run than the baked conv, per layout.
    for (form, layout) in [("tiled", "channels"), ("tokens", "tokens")] {
        let Some(ratio) = penalty(&measured, form) else {
            continue;
        };
        let line = format!("matmul_penalty={ratio:.3}");
        if args.json {
            println!(
                "{}",
                json!({"calibration": {"layout": layout, "matmul_penalty": ratio,
                       "measured_on_ane": on_device, "cost": line}})
            );
        } else if on_device {
            println!(
                "{layout} layout: {form} / conv time = {ratio:.3}: GGML_ANE_COST={line} (also `ane plan --cost {line}`)"
            );
        } else {
            println!(
                "{layout} layout: {form} / conv time = {ratio:.3} on the reference engine (not a calibration: measure on a Mac)"
            );
        }
    }
    Ok(())
}

/// Geometric mean, over shapes measured in both forms, of `form`'s time over the baked conv's.
fn penalty(measured: &[(String, (usize, usize, usize), f64)], form: &str) -> Option<f64> {
    let logs: Vec<f64> = measured
        .iter()
        .filter(|(f, _, _)| f == form)
        .filter_map(|(_, shape, ms)| {
            let conv = measured
                .iter()
                .find(|(f, s, _)| f == "conv" && s == shape)?
                .2;
            (conv > 0.0 && *ms > 0.0).then(|| (ms / conv).ln())
        })
        .collect();
    (!logs.is_empty()).then(|| (logs.iter().sum::<f64>() / logs.len() as f64).exp())
}

fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |t| t.get())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn penalty_is_the_geometric_mean_of_matching_shapes() {
        let row = |f: &str, s, ms| (f.to_string(), s, ms);
        let m = vec![
            row("conv", (64, 64, 64), 1.0),
            row("tiled", (64, 64, 64), 2.0),
            row("conv", (128, 64, 64), 2.0),
            row("tiled", (128, 64, 64), 16.0),
            row("tiled", (256, 64, 64), 100.0), // no conv for this shape: ignored
        ];
        let p = penalty(&m, "tiled").unwrap();
        assert!((p - 4.0).abs() < 1e-12, "{p}");
        assert!(penalty(&m, "tokens").is_none());
    }

    #[test]
    fn shapes_parse() {
        assert_eq!(parse_shape("4096x11008x512").unwrap(), (4096, 11008, 512));
        assert!(parse_shape("4096x0x512").is_err());
        assert!(parse_shape("4096x512").is_err());
        assert!(parse_shape("ax1x1").is_err());
    }
}
