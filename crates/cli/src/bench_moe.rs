//! `ane bench moe`: one MoE layer's expert matmul (gate or up of a preset) on the engine, as
//! packs of experts (`GGML_ANE_MOE=on`) against one dispatch per expert (`GGML_ANE_MOE=single`),
//! both measured in the same run with the same routing, so the first Mac run says whether packs
//! pay and by how much (the figures `ane plan --moe` only estimates).

use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Result};
use serde_json::json;

use ane_engine::surface::request_alloc_size;
use ane_engine::{Engine, Surface};
use ane_plan::canary::test_values;
use ane_plan::moe::{self, Routing};
use ane_plan::{Planner, TiledShape};

use crate::probe::probe;

/// Arguments of `ane bench moe`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// MoE preset (see `ane plan --moe`).
    #[arg(long, default_value = "qwen3-30b-a3b")]
    pub preset: String,
    /// Tokens in the ubatch.
    #[arg(long, default_value_t = 512)]
    pub tokens: usize,
    /// Only the first this many experts (0: all), to keep a run on the reference engine short.
    #[arg(long, default_value_t = 0)]
    pub experts: usize,
    /// Evaluations per dispatch shape (fastest kept).
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// Measure the reference engine even on a Mac.
    #[arg(long)]
    pub reference: bool,
    /// Print one JSON line instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Fastest evaluation of `s` on `engine`, ms (compile excluded).
fn time_shape(engine: &dyn Engine, s: TiledShape, reps: usize) -> Result<f64> {
    let id = engine.compile(&ane_mil::text::emit(&ane_mil::build::tiled_matmul(s)), &[])?;
    let size = request_alloc_size(&[s.x_len() * 2, s.w_len() * 2, s.y_len() * 2]);
    let surface = |len: usize, seed: u64| -> Result<Surface> {
        let mut v = engine.new_surface(size)?;
        v.fp16_mut(len).copy_from_slice(&test_values(len, seed));
        Ok(v)
    };
    let (x, w) = (surface(s.x_len(), 1)?, surface(s.w_len(), 2)?);
    let mut y = engine.new_surface(size)?;
    let mut best = f64::INFINITY;
    let mut result = Ok(());
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        result = engine.evaluate(id, &[&x, &w], &mut [&mut y]);
        best = best.min(t.elapsed().as_secs_f64() * 1e3);
        if result.is_err() {
            break;
        }
    }
    engine.unload(id);
    result?;
    Ok(best)
}

/// Runs `ane bench moe`.
pub fn run(args: &Args) -> Result<()> {
    let Some(p) = moe::preset(&args.preset) else {
        bail!(
            "unknown MoE preset `{}` (see ane plan --moe all)",
            args.preset
        );
    };
    let probed = probe(!args.reference);
    let engine: Arc<dyn Engine> = probed.engine;
    let label = if probed.ane_available {
        "ane"
    } else {
        "reference (CPU, not ANE)"
    };
    let planner = Planner::new(engine.limits());
    let mut counts = moe::route(p.n_expert, p.n_used, args.tokens, Routing::Uniform, 1);
    if args.experts > 0 {
        counts.truncate(args.experts.min(p.n_expert));
    }
    let (k, m) = (p.hidden, p.ffn);
    let Some(g) = moe::pack_size(&planner, k, m, p.n_expert) else {
        bail!("{}: experts of {k}x{m} do not pack on this chip", p.name);
    };
    // Each distinct dispatch shape is timed once and counted as often as the layer uses it.
    let mut cache: std::collections::HashMap<TiledShape, f64> = Default::default();
    let mut timed = |s: TiledShape| -> Result<f64> {
        if let Some(&ms) = cache.get(&s) {
            return Ok(ms);
        }
        let ms = time_shape(engine.as_ref(), s, args.reps)?;
        cache.insert(s, ms);
        Ok(ms)
    };
    // The plan the plugin would run for this routing (`ane_plan::moe::plan_layer`), packed and
    // one expert per dispatch.
    let mut total = |plan: &moe::LayerPlan| -> Result<(f64, usize)> {
        let shapes = plan.tiled_shapes(&planner, k, m);
        let ms = shapes.iter().map(|&s| timed(s)).sum::<Result<f64>>()?;
        Ok((ms, shapes.len()))
    };
    let (packed_ms, packed_n) = total(&moe::plan_layer(&planner, &counts, Some(g)))?;
    let (single_ms, single_n) = total(&moe::plan_layer(&planner, &counts, None))?;
    let ratio = single_ms / packed_ms;
    if args.json {
        println!(
            "{}",
            json!({"engine": engine.name(), "label": label, "ane": probed.ane_available, "preset": p.name,
                   "k": k, "m": m, "tokens": args.tokens, "experts": counts.len(), "pack": g,
                   "packed_ms": packed_ms, "packed_dispatches": packed_n,
                   "single_ms": single_ms, "single_dispatches": single_n, "single_over_packed": ratio})
        );
    } else {
        println!(
            "engine: {label}; {} gate matmul ({k}x{m}), {} experts, {} tokens, uniform routing",
            p.name,
            counts.len(),
            args.tokens
        );
        println!("  packs of {g}:        {packed_ms:>10.2} ms in {packed_n} dispatches");
        println!("  one expert each:   {single_ms:>10.2} ms in {single_n} dispatches");
        println!(
            "  single / packed:   {ratio:>10.2}x{}",
            if probed.ane_available {
                ""
            } else {
                " (reference engine: not an ANE figure)"
            }
        );
    }
    Ok(())
}
