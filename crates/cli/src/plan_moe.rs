//! `ane plan --moe`: the expert matmuls of a mixture-of-experts model, as the plugin would
//! dispatch them (`ane_plan::moe`), under two routing models.

use ane_engine::Chip;
use ane_plan::moe::{self, MoePreset, Routing, PRESETS};
use ane_plan::Planner;
use anyhow::{bail, Result};
use serde::Serialize;

use crate::plan::Args;

/// One preset under one routing model, for one ubatch.
#[derive(Debug, Serialize)]
pub struct MoeRow {
    /// Preset name.
    pub model: String,
    /// `uniform` or `skewed`.
    pub routing: String,
    /// Tokens in the ubatch.
    pub tokens: usize,
    /// Experts per pack (gate/up, down); 0: not packed.
    pub pack: (usize, usize),
    /// Dispatches per MoE layer with packs (gate, up and down as separate MUL_MAT_IDs).
    pub dispatches_per_layer: usize,
    /// The same, one expert per dispatch (`GGML_ANE_MOE=single`).
    pub dispatches_per_layer_single: usize,
    /// Padded over routed columns with packs.
    pub padding: f64,
    /// The same, one expert per dispatch.
    pub padding_single: f64,
    /// Distinct programs the layers compile with packs.
    pub programs: usize,
    /// Fraction of experts some token of the ubatch reaches (what staging only routed experts
    /// would save: nothing at prefill sizes).
    pub experts_touched: f64,
    /// fp16 staging of every expert, GiB.
    pub staged_fp16_gib: f64,
    /// The same experts in Q8_0 and Q4_0 block forms, GiB (what compressed weights would hold).
    pub q8_0_gib: f64,
    /// See `q8_0_gib`.
    pub q4_0_gib: f64,
    /// MoE layers whose experts fit their share of the staging budget
    /// (`ane_plan::moe::EXPERT_SHARE`; the rest stay on the CPU: `moe_memory`).
    pub layers_admitted: usize,
    /// MoE layers.
    pub layers: usize,
    /// Estimated ms per ubatch of the admitted layers' expert matmuls on the device (packs) and
    /// on the CPU: published costs, not measured.
    pub est_ane_ms: f64,
    /// See `est_ane_ms`.
    pub est_cpu_ms: f64,
}

/// Plans `p` for one ubatch.
pub fn plan_row(
    planner: &Planner,
    cost: &ane_plan::cost::ChipCost,
    p: &MoePreset,
    tokens: usize,
    routing: Routing,
    stage_max_bytes: u64,
) -> MoeRow {
    let counts = moe::route(p.n_expert, p.n_used, tokens, routing, 1);
    let packed = moe::plan_moe_layer(planner, p, &counts, true);
    let single = moe::plan_moe_layer(planner, p, &counts, false);
    let per_layer = moe::experts_fp16_bytes(p) / p.layers as u64;
    let layers_admitted =
        (moe::expert_budget(stage_max_bytes) / per_layer.max(1)).min(p.layers as u64) as usize;
    let ane_ms: f64 = packed
        .matmuls
        .iter()
        .zip(moe::MoeLayerPlan::dims(p))
        .flat_map(|(l, (k, m))| l.tiled_shapes(planner, k, m))
        .map(|s| cost.dispatch_time_ms(&s))
        .sum();
    let flops = 3.0 * 2.0 * (p.hidden * p.ffn * tokens * p.n_used) as f64;
    let params = (3 * p.layers * p.n_expert * p.hidden * p.ffn) as f64;
    let gib = |bytes: f64| bytes / (1u64 << 30) as f64;
    MoeRow {
        model: p.name.to_string(),
        routing: match routing {
            Routing::Uniform => "uniform".into(),
            Routing::Skewed(_) => "skewed".into(),
        },
        tokens,
        pack: (packed.packs.0.unwrap_or(0), packed.packs.1.unwrap_or(0)),
        dispatches_per_layer: packed.dispatches(),
        dispatches_per_layer_single: single.dispatches(),
        padding: packed.padding(),
        padding_single: single.padding(),
        programs: packed.programs(p).len(),
        experts_touched: counts.iter().filter(|&&c| c > 0).count() as f64 / p.n_expert as f64,
        staged_fp16_gib: gib(moe::experts_fp16_bytes(p) as f64),
        q8_0_gib: gib(params * 34.0 / 32.0),
        q4_0_gib: gib(params * 18.0 / 32.0),
        layers_admitted,
        layers: p.layers,
        est_ane_ms: ane_ms * layers_admitted as f64,
        est_cpu_ms: cost.cpu_ms(flops) * layers_admitted as f64,
    }
}

/// Runs `ane plan --moe NAME|all|FILE.gguf`.
pub fn run(args: &Args, which: &str) -> Result<()> {
    let path = std::path::Path::new(which);
    let presets: Vec<MoePreset> = if which == "all" {
        PRESETS.to_vec()
    } else if let Some(p) = moe::preset(which) {
        vec![p]
    } else if path.is_file() {
        let g = ane_plan::gguf::Gguf::read(path)?;
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        match moe::from_gguf(&g, &name)? {
            Some(p) => vec![p],
            None => {
                bail!("{which}: no expert tensors (blk.N.ffn_gate_exps.weight): not a MoE model")
            }
        }
    } else {
        bail!(
            "unknown MoE preset or file `{which}` (known: all, {})",
            PRESETS
                .iter()
                .map(|p| p.name.as_ref())
                .collect::<Vec<_>>()
                .join(", ")
        );
    };
    run_presets(args, &presets)
}

/// Prints the MoE plan of `presets`.
pub fn run_presets(args: &Args, presets: &[MoePreset]) -> Result<()> {
    let chip: Chip = args.chip.parse().map_err(|e: String| anyhow::anyhow!(e))?;
    let planner = Planner::new(chip.limits());
    let mut cost = ane_plan::cost::chip_cost(chip);
    if let Some(spec) = &args.cost {
        cost = cost
            .with_overrides(spec)
            .map_err(|e| anyhow::anyhow!("--cost {e}"))?;
    }
    let budget = args.stage_max_mb.saturating_mul(1 << 20);
    let rows: Vec<MoeRow> = presets
        .iter()
        .flat_map(|p| {
            [Routing::Uniform, Routing::Skewed(SKEW)]
                .map(|r| plan_row(&planner, &cost, p, args.n_ubatch, r, budget))
        })
        .collect();
    if args.json {
        println!("{}", serde_json::to_string(&rows)?);
        return Ok(());
    }
    println!(
        "expert matmuls (MUL_MAT_ID) per {}-token ubatch on {chip}; routing `uniform` (balanced) and \
         `skewed` (expert weights 1/rank^{SKEW}); staging budget {} MiB",
        args.n_ubatch, args.stage_max_mb
    );
    let w = rows
        .iter()
        .map(|r| r.model.len())
        .max()
        .unwrap_or(0)
        .max(14);
    println!(
        "  {:<w$} {:<8} {:>6} {:>13} {:>9} {:>8} {:>8} {:>9} {:>20} {:>7} {:>17}",
        "model",
        "routing",
        "pack",
        "disp/layer",
        "padding",
        "programs",
        "touched",
        "fp16 GiB",
        "q8_0/q4_0 GiB",
        "layers",
        "est. ms ane/cpu"
    );
    for r in &rows {
        println!(
            "  {:<w$} {:<8} {:>6} {:>5} ({:>5}) {:>4.2}/{:<4.2} {:>8} {:>7.0}% {:>9.1} {:>9.1}/{:<10.1} {:>3}/{:<3} {:>8.1}/{:<8.1}",
            r.model,
            r.routing,
            format!("{}/{}", r.pack.0, r.pack.1),
            r.dispatches_per_layer,
            r.dispatches_per_layer_single,
            r.padding,
            r.padding_single,
            r.programs,
            r.experts_touched * 100.0,
            r.staged_fp16_gib,
            r.q8_0_gib,
            r.q4_0_gib,
            r.layers_admitted,
            r.layers,
            r.est_ane_ms,
            r.est_cpu_ms
        );
    }
    println!(
        "  disp/layer: with packs (one expert per dispatch in brackets); padding: packs/single; \
         pack 0: experts run one per dispatch. Estimates from published costs, not measured."
    );
    Ok(())
}

/// Exponent of the skewed routing model.
pub const SKEW: f64 = 1.0;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qwen3_rows_meet_the_targets_and_the_budget_admits_whole_layers() {
        let planner = Planner::new(Chip::M4.limits());
        let cost = ane_plan::cost::chip_cost(Chip::M4);
        let q = moe::preset("qwen3-30b-a3b").unwrap();
        let r = plan_row(&planner, &cost, &q, 512, Routing::Uniform, 16384 << 20);
        assert!(r.dispatches_per_layer <= 64 && r.padding <= 1.5, "{r:?}");
        assert!(r.dispatches_per_layer_single > 300);
        assert_eq!(r.pack, (8, 8));
        assert!(
            (r.staged_fp16_gib - 54.0).abs() < 1.0,
            "{}",
            r.staged_fp16_gib
        );
        // Experts may take 12 of 16 GiB: 10 of 48 layers (1.125 GiB each).
        assert_eq!((r.layers_admitted, r.layers), (10, 48));
        assert!(r.experts_touched > 0.99);
        let m = moe::preset("mixtral-8x7b").unwrap();
        let r = plan_row(&planner, &cost, &m, 512, Routing::Uniform, 1 << 40);
        assert_eq!(r.pack, (0, 0));
        assert_eq!(r.dispatches_per_layer, r.dispatches_per_layer_single);
    }
}
