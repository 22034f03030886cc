//! `ane plan`: what a model's prefill would compile and dispatch, with the same planner the plugin
//! uses (`ane-plan`), and estimates from the published cost model.

use std::path::PathBuf;

use ane_engine::Chip;
use ane_plan::gguf::Gguf;
use ane_plan::model::{plan, preset, ModelShape, PlanOptions, Route, PRESETS};
use anyhow::{bail, Context, Result};

/// Arguments of `ane plan`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Read the model's shapes from a GGUF file.
    #[arg(long, conflicts_with = "preset")]
    pub model: Option<PathBuf>,
    /// A known model shape: llama3-8b, llama3-70b, qwen2.5-0.5b, qwen2.5-7b.
    #[arg(long)]
    pub preset: Option<String>,
    /// Chip whose limits and costs apply (m1..m5).
    #[arg(long, default_value = "m4")]
    pub chip: String,
    /// Prompt lengths: `a-b` or a comma-separated list.
    #[arg(long, default_value = "1-4096")]
    pub prompt_lengths: String,
    /// llama.cpp's `--ubatch-size`.
    #[arg(long, default_value_t = 512)]
    pub n_ubatch: usize,
    /// The plugin's `GGML_ANE_MIN_BATCH`.
    #[arg(long, default_value_t = 64)]
    pub min_batch: usize,
    /// Model llama.cpp with flash attention off (attention becomes MUL_MATs).
    #[arg(long)]
    pub no_flash_attn: bool,
    /// Output rows after the last layer (1 for text generation).
    #[arg(long, default_value_t = 1)]
    pub n_outputs: usize,
    /// Model `GGML_ANE_WEIGHTS=compressed` for weights of this type (`q8_0` or `q4_0`): lone weight
    /// MUL_MATs become baked per-weight programs.
    #[arg(long)]
    pub compressed: Option<String>,
    /// Model `GGML_ANE_LOOKAHEAD=0`: Q dispatched apart from V+K (RoPE(Q) splits them).
    #[arg(long)]
    pub no_lookahead: bool,
    /// Model `GGML_ANE_ROUTE`: `batch` (the plugin's default: every MUL_MAT of at least
    /// `--min-batch` tokens) or `cost` (only where the cost model puts the ANE ahead of the CPU).
    #[arg(long, default_value = "batch")]
    pub route: String,
    /// Model `GGML_ANE_LAYOUT`: `tokens` (the plugin's default) or `channels`.
    #[arg(long, default_value = "tokens")]
    pub layout: String,
    /// Replace published costs with measured ones: `key=value,...` (fields of
    /// `ane_plan::cost::ChipCost`, e.g. `dispatch_ms=0.12,matmul_penalty=1.4`), as `GGML_ANE_COST`.
    #[arg(long)]
    pub cost: Option<String>,
    /// Print the plan as JSON (one row per prompt length).
    #[arg(long)]
    pub json: bool,
    /// Plan the expert matmuls (MUL_MAT_ID) of a mixture-of-experts preset, `all`, or a MoE GGUF
    /// file: qwen3-30b-a3b, olmoe-1b-7b, mixtral-8x7b. Uses --chip, --n-ubatch, --cost, --json.
    /// (`--model` on a MoE GGUF prints the same.)
    #[arg(long, conflicts_with_all = ["model", "preset"])]
    pub moe: Option<String>,
    /// With --moe: the staging budget (`GGML_ANE_STAGE_MAX_MB`) that expert layers are admitted
    /// against.
    #[arg(long, default_value_t = 16384)]
    pub stage_max_mb: u64,
    /// The machine's memory in GB: the plugin's default staging budget on it (a quarter), and how
    /// much of the model's fp16 weights stays staged and how much is converted every ubatch.
    #[arg(long)]
    pub ram: Option<f64>,
}

/// Parses `a-b` or `a,b,c`.
pub fn parse_lengths(s: &str) -> Result<Vec<usize>> {
    let s = s.trim();
    if let Some((a, b)) = s.split_once('-') {
        let (a, b): (usize, usize) = (a.trim().parse()?, b.trim().parse()?);
        if a == 0 || a > b {
            bail!("prompt lengths `{s}`: need 1 <= a <= b");
        }
        return Ok((a..=b).collect());
    }
    let v = s
        .split(',')
        .map(|p| p.trim().parse::<usize>())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("prompt lengths `{s}`"))?;
    if v.is_empty() || v.contains(&0) {
        bail!("prompt lengths `{s}`: need positive lengths");
    }
    Ok(v)
}

/// Runs `ane plan`.
pub fn run(args: &Args) -> Result<()> {
    if let Some(which) = &args.moe {
        return crate::plan_moe::run(args, which);
    }
    let model: ModelShape = match (&args.model, &args.preset) {
        (Some(path), _) => {
            let g = Gguf::read(path)?;
            let name = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            // A mixture of experts: its expert matmuls are what matters (and it has no dense
            // FFN for the dense plan to read).
            if let Some(p) = ane_plan::moe::from_gguf(&g, &name)? {
                println!(
                    "{name}: a mixture-of-experts model; its expert matmuls (ane plan --moe):"
                );
                return crate::plan_moe::run_presets(args, &[p]);
            }
            ModelShape::from_gguf(&g, &name)?
        }
        (None, Some(p)) => preset(p)
            .with_context(|| format!("unknown preset `{p}` (known: {})", PRESETS.join(", ")))?,
        (None, None) => bail!("give --model FILE.gguf or --preset NAME"),
    };
    let chip: Chip = args.chip.parse().map_err(|e: String| anyhow::anyhow!(e))?;
    let lengths = parse_lengths(&args.prompt_lengths)?;
    let mut o = PlanOptions::new(chip);
    o.n_ubatch = args.n_ubatch;
    o.min_batch = args.min_batch;
    o.flash_attn = !args.no_flash_attn;
    o.n_outputs = args.n_outputs;
    o.lookahead = !args.no_lookahead;
    o.route = match args.route.as_str() {
        "batch" => Route::Batch,
        "cost" => Route::Cost,
        other => bail!("--route {other}: expected batch or cost"),
    };
    o.layout = match args.layout.as_str() {
        "tokens" => ane_plan::Layout::Tokens,
        "channels" => ane_plan::Layout::Channels,
        other => bail!("--layout {other}: expected tokens or channels"),
    };
    if let Some(spec) = &args.cost {
        o.cost = Some(
            ane_plan::cost::chip_cost(chip)
                .with_overrides(spec)
                .map_err(|e| anyhow::anyhow!("--cost {e}"))?,
        );
    }
    o.compressed_bits = match args.compressed.as_deref() {
        None => None,
        Some("q8_0") => Some(8.5),
        Some("q4_0") => Some(4.5),
        Some(other) => bail!("--compressed {other}: expected q8_0 or q4_0"),
    };
    let p = plan(&model, &lengths, &o);
    let staging = args.ram.map(|gb| {
        let budget = ane_plan::staging::default_budget_mb((gb * (1u64 << 30) as f64) as u64);
        (gb, ane_plan::staging::plan(&model, budget))
    });
    if args.json {
        let mut v = serde_json::to_value(&p)?;
        if let (Some((gb, s)), Some(obj)) = (&staging, v.as_object_mut()) {
            obj.insert(
                "staging".into(),
                serde_json::json!({"ram_gb": gb, "plan": s}),
            );
        }
        println!("{v}");
        return Ok(());
    }
    println!(
        "model {} (embd {}, ff {}, heads {}/{}, layers {}, vocab {}) on {chip}",
        model.name,
        model.n_embd,
        model.n_ff,
        model.n_head,
        model.n_head_kv,
        model.n_layer,
        model.n_vocab
    );
    println!(
        "prompt lengths {} ({} values), column buckets {:?}",
        args.prompt_lengths,
        lengths.len(),
        p.n_buckets
    );
    println!(
        "  programs_total                          {}",
        p.programs_total
    );
    println!(
        "  programs_loaded_peak                    {}",
        p.programs_loaded_peak
    );
    println!(
        "  weight_dispatches_per_layer             {}",
        p.weight_dispatches_per_layer
    );
    println!(
        "  offloaded_matmul_flops_fraction_at_512  {:.4}",
        p.offloaded_matmul_flops_fraction_at_512
    );
    println!(
        "  estimated_prefill_ms_at_512             {:.1} (seed design {:.1}; estimates from published numbers, not measured)",
        p.estimated_prefill_ms_at_512.ours, p.estimated_prefill_ms_at_512.seed
    );
    println!(
        "  compile+load of all programs, ms        {:.0}",
        p.compile_ms_total
    );
    if o.compressed_bits.is_some() {
        println!(
            "  of them baked (compressed weights)      {} holding {:.1} MiB",
            p.programs_baked, p.baked_mb
        );
    }
    println!(
        "  seed design: {} programs ({}), {} dispatches/layer, first prompt compiles {:.0} ms",
        p.seed.programs_total,
        if p.seed.exceeds_compile_budget {
            "over the ~119 compile budget"
        } else {
            "within budget"
        },
        p.seed.weight_dispatches_per_layer,
        p.seed.first_prompt_compile_ms
    );
    if let Some((gb, s)) = &staging {
        println!(
            "  staging with {gb} GB of memory: budget {} MiB (GGML_ANE_STAGE_MAX_MB default, a \
             quarter); fp16 weights {:.0} MiB in {} groups; resident {:.0} MiB (the first {} in \
             graph order); streaming ring {:.0} MiB (two of the largest group); streamed {:.0} \
             MiB per ubatch (each group converted while the one before it runs)",
            s.budget_mb,
            s.fp16_mb,
            s.groups,
            s.resident_mb,
            s.resident_groups,
            s.ring_mb,
            s.stream_mb_per_ubatch
        );
    }
    println!(
        "  {:>8} {:>8} {:>9} {:>10} {:>9} {:>12}",
        "prompt", "ubatches", "programs", "dispatches", "offloaded", "est. ms"
    );
    for r in p.rows.iter().filter(|r| {
        lengths.len() <= 16
            || r.prompt_length.is_power_of_two()
            || r.prompt_length == lengths[lengths.len() - 1]
    }) {
        println!(
            "  {:>8} {:>8} {:>9} {:>10} {:>9.4} {:>12.1}",
            r.prompt_length,
            r.ubatches,
            r.programs_used,
            r.dispatches,
            r.offloaded_flops_fraction,
            r.estimated_ms
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_parse() {
        assert_eq!(parse_lengths("1-4").unwrap(), vec![1, 2, 3, 4]);
        assert_eq!(parse_lengths("128, 512").unwrap(), vec![128, 512]);
        assert!(parse_lengths("0-3").is_err());
        assert!(parse_lengths("5-3").is_err());
        assert!(parse_lengths("a").is_err());
    }
}
