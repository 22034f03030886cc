//! Whole-model prefill plans: the MUL_MATs llama.cpp's graph issues for a llama-style model, what
//! the plugin does with each, and what that costs. `ane plan` prints this.
//!
//! The graph model follows llama.cpp b11434 (`src/models/llama.cpp`, `src/llama-graph.cpp`):
//! per layer Q, then V and K (sharing the normed input; RoPE on Q sits between Q and them in the
//! node order, so only V and K share a split; the plugin's lookahead (`GGML_ANE_LOOKAHEAD`, on by
//! default with fp16 weights) computes V and K in Q's dispatch), attention (MUL_MATs only when
//! flash attention is off; it is on by default where the CPU runs attention), the output
//! projection, then gate and up (one fused group) and down. In the last layer only the rows that
//! produce outputs continue after attention (`inp_out_ids`: 1 row for text generation), so its FFN
//! and the LM head run with `n_outputs` columns. Prompts are split in ubatches of `n_ubatch`
//! tokens, and the KV length seen by a ubatch is the cache use padded to 256 (llama-kv-cache.cpp).

use std::collections::{BTreeSet, HashMap};

use ane_engine::Chip;
use serde::Serialize;

use crate::cost::{chip_cost, ChipCost};
use crate::gguf::{Gguf, GgufError};
use crate::{Planner, TiledShape};

/// A compiled program: a shape-shared tiled program, or (with compressed weights) one baked
/// program per weight matrix and column bucket. The plugin's kernel cache is keyed by it too.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ProgramKey {
    /// `ane_mil::build::tiled_matmul` of this shape.
    Tiled(TiledShape),
    /// `ane_mil::build::tiled_matmul_int8` of this shape (Q8_0 weights as an int8 input plus fp16
    /// block scales, `GGML_ANE_INT8_INPUT=1`): another program than [`ProgramKey::Tiled`] of the
    /// same shape.
    TiledInt8(TiledShape),
    /// A baked compressed-weight conv for one weight matrix.
    Baked {
        /// Which weight: in the plugin a fingerprint of the weight tensor, in the planner the
        /// index of its group in the per-ubatch graph model.
        weight: u128,
        /// Column bucket.
        n: usize,
    },
}

/// The dimensions that decide a llama-style model's MUL_MAT shapes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ModelShape {
    /// Name for reports.
    pub name: String,
    /// Embedding width.
    pub n_embd: usize,
    /// FFN width.
    pub n_ff: usize,
    /// Query heads.
    pub n_head: usize,
    /// KV heads.
    pub n_head_kv: usize,
    /// Head width.
    pub head_dim: usize,
    /// Layers.
    pub n_layer: usize,
    /// Vocabulary (LM head rows).
    pub n_vocab: usize,
}

/// Presets for models people run (shapes from their published configs).
pub fn preset(name: &str) -> Option<ModelShape> {
    let m = |n: &str, e, f, h, kv, l, v| ModelShape {
        name: n.into(),
        n_embd: e,
        n_ff: f,
        n_head: h,
        n_head_kv: kv,
        head_dim: e / h,
        n_layer: l,
        n_vocab: v,
    };
    Some(match name {
        "llama3-8b" => m("llama3-8b", 4096, 14336, 32, 8, 32, 128256),
        "llama3-70b" => m("llama3-70b", 8192, 28672, 64, 8, 80, 128256),
        "qwen2.5-0.5b" => m("qwen2.5-0.5b", 896, 4864, 14, 2, 24, 151936),
        "qwen2.5-7b" => m("qwen2.5-7b", 3584, 18944, 28, 4, 28, 152064),
        _ => return None,
    })
}

/// Names accepted by [`preset`].
pub const PRESETS: [&str; 4] = ["llama3-8b", "llama3-70b", "qwen2.5-0.5b", "qwen2.5-7b"];

impl ModelShape {
    /// Shapes read from a GGUF's tensor table (`blk.0.attn_q.weight` is `[n_embd, n_head*head_dim]`,
    /// and so on), with head counts from the metadata.
    ///
    /// # Errors
    /// A missing tensor or key, named.
    pub fn from_gguf(g: &Gguf, name: &str) -> Result<ModelShape, GgufError> {
        let missing = |f: &str| GgufError::Invalid {
            field: f.into(),
            detail: "missing".into(),
        };
        let dims = |t: &str| -> Result<(usize, usize), GgufError> {
            let info = g.tensors.get(t).ok_or_else(|| missing(t))?;
            match info.dims.as_slice() {
                [a, b] => Ok((*a as usize, *b as usize)),
                _ => Err(GgufError::Invalid {
                    field: t.into(),
                    detail: format!("expected 2 dims, got {:?}", info.dims),
                }),
            }
        };
        let arch = g
            .str("general.architecture")
            .ok_or_else(|| missing("general.architecture"))?;
        let int = |k: &str| -> Result<usize, GgufError> {
            let key = format!("{arch}.{k}");
            g.int(&key).map(|v| v as usize).ok_or_else(|| missing(&key))
        };
        let (n_embd, q_rows) = dims("blk.0.attn_q.weight")?;
        let (_, k_rows) = dims("blk.0.attn_k.weight")?;
        let (_, n_ff) = dims("blk.0.ffn_gate.weight")?;
        let (_, n_vocab) = dims("output.weight").or_else(|_| dims("token_embd.weight"))?;
        let n_head = int("attention.head_count")?;
        let n_head_kv = int("attention.head_count_kv").unwrap_or(n_head);
        let head_dim = q_rows / n_head.max(1);
        if head_dim == 0 || k_rows != n_head_kv * head_dim {
            return Err(GgufError::Invalid {
                field: "blk.0.attn_k.weight".into(),
                detail: "rows do not match head_count_kv".into(),
            });
        }
        Ok(ModelShape {
            name: name.into(),
            n_embd,
            n_ff,
            n_head,
            n_head_kv,
            head_dim,
            n_layer: int("block_count")?,
            n_vocab,
        })
    }
}

/// Options of a plan.
#[derive(Clone, Debug, Serialize)]
pub struct PlanOptions {
    /// Chip whose limits and costs apply.
    #[serde(serialize_with = "ser_display")]
    pub chip: Chip,
    /// llama.cpp's `n_ubatch` (default 512).
    pub n_ubatch: usize,
    /// The plugin's `GGML_ANE_MIN_BATCH` (default 64).
    pub min_batch: usize,
    /// Flash attention on (llama.cpp's default where the CPU runs attention): no attention MUL_MATs.
    pub flash_attn: bool,
    /// Output rows after the last layer's attention (1 for text generation).
    pub n_outputs: usize,
    /// Loaded-program budget (`GGML_ANE_MAX_PROGRAMS`).
    pub max_programs: usize,
    /// `GGML_ANE_WEIGHTS=compressed` with weights of this many bits each (Q8_0 8.5, Q4_0 4.5):
    /// lone weight MUL_MATs run baked per-weight programs. `None`: fp16 shape-shared only.
    pub compressed_bits: Option<f64>,
    /// The plugin's cross-split fusion (`GGML_ANE_LOOKAHEAD=1`, its default; it is off with
    /// compressed weights): Q, V and K in one dispatch.
    pub lookahead: bool,
    /// How MUL_MATs are routed (`GGML_ANE_ROUTE`).
    pub route: Route,
    /// Costs to use instead of the chip's published ones (`GGML_ANE_COST`, `--cost`).
    pub cost: Option<ChipCost>,
    /// The programs' layout (`GGML_ANE_LAYOUT`).
    #[serde(skip)]
    pub layout: crate::Layout,
}

/// How MUL_MATs are split between the ANE and the CPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Route {
    /// Every supported MUL_MAT with at least `min_batch` tokens (the plugin's default).
    #[default]
    Batch,
    /// Also ask the cost model, per MUL_MAT: the ANE only where its estimate beats the CPU's.
    Cost,
}

/// The cost model's two estimates for one MUL_MAT.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Estimate {
    /// Its ANE dispatches (shape-shared program, padded columns, tiles), ms.
    pub ane_ms: f64,
    /// The same FLOPs on the CPU, ms.
    pub cpu_ms: f64,
}

impl Estimate {
    /// Whether the ANE is estimated faster.
    pub fn ane_wins(&self) -> bool {
        self.ane_ms < self.cpu_ms
    }
}

/// Estimates one MUL_MAT: `matrices` src0 matrices of `m` rows and `k` columns, each multiplied
/// with `cols` activation columns; `weight` when src0 is a weight (fixed shape, no padding).
/// The plugin's `GGML_ANE_ROUTE=cost` and `ane plan --route cost` both decide with this.
pub fn estimate(
    planner: &Planner,
    cost: &ChipCost,
    k: usize,
    m: usize,
    cols: usize,
    matrices: usize,
    weight: bool,
) -> Estimate {
    let g = Group {
        k,
        ms: vec![m],
        cols,
        tokens: cols,
        matrices,
        weight,
        layer: None,
    };
    Estimate {
        ane_ms: group_dispatches(planner, &g)
            .iter()
            .map(|s| cost.dispatch_time_ms(s))
            .sum(),
        cpu_ms: cost.cpu_ms(g.flops()),
    }
}

fn ser_display<S: serde::Serializer>(c: &Chip, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&c.to_string())
}

impl PlanOptions {
    /// Defaults matching llama.cpp and the plugin.
    pub fn new(chip: Chip) -> Self {
        PlanOptions {
            chip,
            n_ubatch: 512,
            min_batch: 64,
            flash_attn: true,
            n_outputs: 1,
            max_programs: 96,
            compressed_bits: None,
            lookahead: true,
            route: Route::Batch,
            cost: None,
            layout: crate::Layout::default(),
        }
    }
}

/// One MUL_MAT group of the graph, as the plugin sees it.
#[derive(Clone, Debug)]
struct Group {
    /// Contraction.
    k: usize,
    /// Rows of each member (fused members share the activations).
    ms: Vec<usize>,
    /// Activation columns per src0 matrix.
    cols: usize,
    /// Tokens (src1 `ne[1]`), what the plugin's `GGML_ANE_MIN_BATCH` gate looks at.
    tokens: usize,
    /// Independent src0 matrices (attention: KV heads); 1 for weights.
    matrices: usize,
    /// Weights (fixed shape) or a per-call operand (dimensions bucketed).
    weight: bool,
    /// Member of a layer's weight groups (for `weight_dispatches_per_layer`).
    layer: Option<usize>,
}

impl Group {
    fn flops(&self) -> f64 {
        2.0 * self.k as f64
            * self.ms.iter().sum::<usize>() as f64
            * self.cols as f64
            * self.matrices as f64
    }
}

fn ubatch_groups(m: &ModelShape, n: usize, n_kv: usize, o: &PlanOptions) -> Vec<Group> {
    let (e, hd) = (m.n_embd, m.head_dim);
    let w = |k, ms: Vec<usize>, cols, layer| Group {
        k,
        ms,
        cols,
        tokens: cols,
        matrices: 1,
        weight: true,
        layer,
    };
    let mut g = Vec::new();
    for l in 0..m.n_layer {
        let last = l + 1 == m.n_layer;
        // Q reaches the plugin alone: llama.cpp's node order puts RoPE(Q) (a CPU op) between Q and
        // the V/K projections, which therefore form the fused group of the next split, unless the
        // lookahead computes them in Q's dispatch (compressed weights turn it off).
        let (q, kv) = (m.n_head * hd, m.n_head_kv * hd);
        if o.lookahead && o.compressed_bits.is_none() {
            g.push(w(e, vec![q, kv, kv], n, Some(l)));
        } else {
            g.push(w(e, vec![q], n, Some(l)));
            g.push(w(e, vec![kv, kv], n, Some(l)));
        }
        if !o.flash_attn {
            let r = m.n_head / m.n_head_kv.max(1);
            g.push(Group {
                k: hd,
                ms: vec![n_kv],
                cols: r * n,
                tokens: n,
                matrices: m.n_head_kv,
                weight: false,
                layer: None,
            });
            g.push(Group {
                k: n_kv,
                ms: vec![hd],
                cols: r * n,
                tokens: n,
                matrices: m.n_head_kv,
                weight: false,
                layer: None,
            });
        }
        g.push(w(m.n_head * hd, vec![e], n, Some(l)));
        let nf = if last { o.n_outputs.min(n) } else { n };
        g.push(w(e, vec![m.n_ff, m.n_ff], nf, Some(l)));
        g.push(w(m.n_ff, vec![e], nf, Some(l)));
    }
    g.push(w(e, vec![m.n_vocab], o.n_outputs.min(n), None));
    g
}

/// What the plugin would do with one group: the program shapes of its dispatches.
fn group_dispatches(p: &Planner, g: &Group) -> Vec<TiledShape> {
    let (k, m_total) = if g.weight {
        (g.k, g.ms.iter().sum())
    } else {
        (p.dim_bucket(g.k), p.dim_bucket(g.ms.iter().sum()))
    };
    let mut out = Vec::new();
    for _ in 0..g.matrices {
        for c in p.col_chunks(g.cols) {
            out.push(p.tile(k, m_total, c.bucket));
        }
    }
    out
}

/// Plan of one prompt length.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// Prompt tokens.
    pub prompt_length: usize,
    /// ubatches llama.cpp splits it into.
    pub ubatches: usize,
    /// Distinct programs this prompt uses.
    pub programs_used: usize,
    /// ANE dispatches.
    pub dispatches: usize,
    /// Offloaded share of MUL_MAT FLOPs.
    pub offloaded_flops_fraction: f64,
    /// Estimated prefill time (warm programs), ms.
    pub estimated_ms: f64,
}

/// Estimate of the seed prototype's design (baked weights, one program per weight tensor and
/// prompt length, 7 dispatches per layer, conv form, LM head claimed but never computed).
#[derive(Clone, Debug, Serialize)]
pub struct SeedEstimate {
    /// Programs compiled over the requested prompt lengths.
    pub programs_total: usize,
    /// Weight dispatches per layer.
    pub weight_dispatches_per_layer: usize,
    /// Estimated prefill at 512 tokens with warm programs, ms.
    pub estimated_prefill_ms_at_512: f64,
    /// Compile time its first 512-token prompt pays, ms.
    pub first_prompt_compile_ms: f64,
    /// Whether its program count passes the ~119 compile budget of one process.
    pub exceeds_compile_budget: bool,
}

/// A whole plan, the `ane plan --json` document.
#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    /// Model shapes.
    pub model: ModelShape,
    /// Options.
    pub options: PlanOptions,
    /// Column buckets used.
    pub n_buckets: Vec<usize>,
    /// Distinct programs over all requested prompt lengths.
    pub programs_total: usize,
    /// Programs loaded at once at most (LRU keeps it under the budget).
    pub programs_loaded_peak: usize,
    /// Weight dispatches per (non-last) layer at a 512-token prompt.
    pub weight_dispatches_per_layer: usize,
    /// Offloaded share of MUL_MAT FLOPs at 512 tokens.
    pub offloaded_matmul_flops_fraction_at_512: f64,
    /// Estimated prefill at 512 tokens: ours (warm) and the seed design's.
    pub estimated_prefill_ms_at_512: Estimates,
    /// Compile and load time of every program once, ms (first use).
    pub compile_ms_total: f64,
    /// Of `programs_total`, baked compressed-weight programs (`compressed_bits`).
    pub programs_baked: usize,
    /// Compressed weight bytes those baked programs hold, MiB.
    pub baked_mb: f64,
    /// The seed design, for comparison.
    pub seed: SeedEstimate,
    /// Cost constants used.
    pub cost: ChipCost,
    /// One row per prompt length.
    pub rows: Vec<Row>,
}

/// Ours against the seed's.
#[derive(Clone, Debug, Serialize)]
pub struct Estimates {
    /// This planner.
    pub ours: f64,
    /// The seed design.
    pub seed: f64,
}

fn ubatches(len: usize, n_ubatch: usize) -> Vec<(usize, usize)> {
    // (tokens, kv length seen) per ubatch.
    let mut out = Vec::new();
    let mut done = 0;
    while done < len {
        let n = (len - done).min(n_ubatch);
        done += n;
        out.push((n, done.div_ceil(256) * 256));
    }
    out
}

/// Plans `model` over `prompt_lengths`.
pub fn plan(model: &ModelShape, prompt_lengths: &[usize], o: &PlanOptions) -> Plan {
    let planner = Planner {
        layout: o.layout,
        ..Planner::new(o.chip.limits())
    };
    let cost = o.cost.unwrap_or_else(|| chip_cost(o.chip));
    let mut programs: BTreeSet<ProgramKey> = BTreeSet::new();
    let mut rows = Vec::new();
    let mut memo = HashMap::new();
    for &len in prompt_lengths {
        let (row, used) = plan_length(model, len, o, &planner, &cost, &mut memo);
        programs.extend(used);
        rows.push(row);
    }
    // The 512-token figures, computed even if 512 was not requested.
    let at512 = plan_length(model, 512, o, &planner, &cost, &mut memo).0;
    let mid = model.n_layer.saturating_sub(1) / 2;
    let per_layer = ubatch_groups(model, 512, 512, o)
        .iter()
        .filter(|g| g.layer == Some(mid) && g.tokens >= o.min_batch)
        .map(|g| group_dispatches(&planner, g).len())
        .sum();
    let seed = seed_estimate(model, prompt_lengths, o, &cost);
    // Compressed bytes of every weight with a baked program.
    let groups = ubatch_groups(model, o.n_ubatch, o.n_ubatch, o);
    let baked_groups: BTreeSet<usize> = programs
        .iter()
        .filter_map(|p| match p {
            ProgramKey::Baked { weight, .. } => Some(*weight as usize),
            ProgramKey::Tiled(_) | ProgramKey::TiledInt8(_) => None,
        })
        .collect();
    let bits = o.compressed_bits.unwrap_or(0.0);
    let baked_mb = baked_groups
        .iter()
        .map(|&i| (groups[i].k * groups[i].ms[0]) as f64 * bits / 8.0)
        .sum::<f64>()
        / (1u64 << 20) as f64;
    let programs_baked = programs
        .iter()
        .filter(|p| matches!(p, ProgramKey::Baked { .. }))
        .count();
    Plan {
        model: model.clone(),
        options: o.clone(),
        n_buckets: planner.n_buckets.clone(),
        programs_total: programs.len(),
        programs_loaded_peak: programs.len().min(o.max_programs),
        weight_dispatches_per_layer: per_layer,
        offloaded_matmul_flops_fraction_at_512: at512.offloaded_flops_fraction,
        estimated_prefill_ms_at_512: Estimates {
            ours: at512.estimated_ms,
            seed: seed.estimated_prefill_ms_at_512,
        },
        compile_ms_total: programs.len() as f64 * (cost.compile_ms + cost.load_ms),
        programs_baked,
        baked_mb,
        seed,
        cost,
        rows,
    }
}

/// Totals of one ubatch: dispatches, estimated ms, offloaded FLOPs, all FLOPs, programs used.
type UbatchPlan = (usize, f64, f64, f64, BTreeSet<ProgramKey>);

fn plan_ubatch(
    model: &ModelShape,
    n: usize,
    n_kv: usize,
    o: &PlanOptions,
    planner: &Planner,
    cost: &ChipCost,
) -> UbatchPlan {
    let (mut dispatches, mut ms, mut off, mut all) = (0, 0.0, 0.0, 0.0);
    let mut used = BTreeSet::new();
    let max = planner.limits.max_axis;
    for (i, mut g) in ubatch_groups(model, n, n_kv, o).into_iter().enumerate() {
        all += g.flops();
        if g.tokens < o.min_batch {
            ms += cost.cpu_ms(g.flops());
            continue;
        }
        if o.route == Route::Cost {
            // The plugin decides per MUL_MAT in supports_op: members the CPU wins stay there.
            let cols = g.cols;
            let (ane, cpu): (Vec<usize>, Vec<usize>) = g.ms.iter().partition(|&&m| {
                estimate(planner, cost, g.k, m, cols, g.matrices, g.weight).ane_wins()
            });
            for m in cpu {
                ms += cost.cpu_ms(2.0 * (g.k * m * g.cols * g.matrices) as f64);
            }
            if ane.is_empty() {
                continue;
            }
            g.ms = ane;
        }
        off += g.flops();
        if baked_candidate(&g, o, max) {
            // One baked conv per weight and bucket (the conv form cannot tile).
            for c in planner.col_chunks(g.cols) {
                let flops = 2.0 * (g.k * g.ms[0] * c.bucket) as f64;
                let bytes = 2.0 * ((g.k + g.ms[0]) * c.bucket) as f64;
                ms += cost.gemm_ms(flops, bytes, 1.0);
                dispatches += 1;
                used.insert(ProgramKey::Baked {
                    weight: i as u128,
                    n: c.bucket,
                });
            }
            continue;
        }
        let ds = group_dispatches(planner, &g);
        dispatches += ds.len();
        ms += ds.iter().map(|s| cost.dispatch_time_ms(s)).sum::<f64>();
        used.extend(ds.into_iter().map(ProgramKey::Tiled));
    }
    (dispatches, ms, off, all, used)
}

/// Whether the plugin would run `g` as a baked compressed-weight program: compressed weights on,
/// a lone (unfused) weight, and axes within the chip limit.
fn baked_candidate(g: &Group, o: &PlanOptions, max_axis: usize) -> bool {
    o.compressed_bits.is_some()
        && g.weight
        && g.ms.len() == 1
        && g.k <= max_axis
        && g.ms[0] <= max_axis
}

/// One prompt length: its row and the programs it uses. Ubatch results are memoised: long prompt
/// sweeps repeat the same (tokens, KV length) pairs.
fn plan_length(
    model: &ModelShape,
    len: usize,
    o: &PlanOptions,
    planner: &Planner,
    cost: &ChipCost,
    memo: &mut HashMap<(usize, usize), UbatchPlan>,
) -> (Row, BTreeSet<ProgramKey>) {
    let (mut dispatches, mut ms, mut off, mut all) = (0, 0.0, 0.0, 0.0);
    let mut used = BTreeSet::new();
    let ub = ubatches(len, o.n_ubatch);
    for &(n, n_kv) in &ub {
        let u = memo
            .entry((n, n_kv))
            .or_insert_with(|| plan_ubatch(model, n, n_kv, o, planner, cost));
        dispatches += u.0;
        ms += u.1;
        off += u.2;
        all += u.3;
        used.extend(u.4.iter().copied());
    }
    let row = Row {
        prompt_length: len,
        ubatches: ub.len(),
        programs_used: used.len(),
        dispatches,
        offloaded_flops_fraction: if all > 0.0 { off / all } else { 0.0 },
        estimated_ms: ms,
    };
    (row, used)
}

fn seed_estimate(
    model: &ModelShape,
    prompt_lengths: &[usize],
    o: &PlanOptions,
    cost: &ChipCost,
) -> SeedEstimate {
    // Weight tensors the seed claims: every per-layer matrix (7), and the LM head (claimed, skipped).
    let (e, hd) = (model.n_embd, model.head_dim);
    let layer = [
        (e, model.n_head * hd),
        (e, model.n_head_kv * hd),
        (e, model.n_head_kv * hd),
        (model.n_head * hd, e),
        (e, model.n_ff),
        (e, model.n_ff),
        (model.n_ff, e),
    ];
    let mut ns = BTreeSet::new();
    for &len in prompt_lengths {
        for (n, _) in ubatches(len, o.n_ubatch) {
            if n >= 64 {
                ns.insert(n);
            }
        }
    }
    let per_n = layer.len() * model.n_layer + 1;
    let warm: f64 = model.n_layer as f64
        * layer
            .iter()
            .map(|&(k, m)| {
                let flops = 2.0 * k as f64 * m as f64 * 512.0;
                cost.gemm_ms(flops, 2.0 * (k * m + (k + m) * 512) as f64, 1.0)
            })
            .sum::<f64>();
    SeedEstimate {
        programs_total: per_n * ns.len(),
        weight_dispatches_per_layer: layer.len(),
        estimated_prefill_ms_at_512: warm,
        first_prompt_compile_ms: per_n as f64 * (cost.compile_ms + cost.load_ms),
        exceeds_compile_budget: per_n * ns.len() > 119,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_lengths() -> Vec<usize> {
        (1..=4096).collect()
    }

    #[test]
    fn targets_hold_for_the_issue_models_on_m1_and_m4() {
        for name in ["llama3-8b", "qwen2.5-7b", "llama3-70b"] {
            for chip in [Chip::M1, Chip::M4] {
                let p = plan(
                    &preset(name).unwrap(),
                    &all_lengths(),
                    &PlanOptions::new(chip),
                );
                assert!(
                    p.programs_total <= 16,
                    "{name} {chip}: {} programs",
                    p.programs_total
                );
                assert!(p.programs_loaded_peak <= 96);
                // Q+V+K (lookahead), O, gate+up, down.
                assert_eq!(
                    p.weight_dispatches_per_layer, 4,
                    "{name} {chip}: {}",
                    p.weight_dispatches_per_layer
                );
                // Without it, RoPE(Q) keeps Q apart from V+K.
                let mut o = PlanOptions::new(chip);
                o.lookahead = false;
                let without = plan(&preset(name).unwrap(), &all_lengths(), &o);
                assert_eq!(without.weight_dispatches_per_layer, 5);
                assert!(without.programs_total <= 16);
                assert!(
                    p.offloaded_matmul_flops_fraction_at_512 >= 0.99,
                    "{name} {chip}: {}",
                    p.offloaded_matmul_flops_fraction_at_512
                );
                assert!(
                    p.seed.programs_total > 119,
                    "the seed design blows the budget"
                );
            }
        }
    }

    #[test]
    fn cost_routing_follows_the_estimates() {
        let planner = Planner::new(Chip::M4.limits());
        let cost = chip_cost(Chip::M4);
        // A tiny op: the dispatch floor alone exceeds the CPU's time.
        let tiny = estimate(&planner, &cost, 64, 64, 64, 1, true);
        assert!(
            !tiny.ane_wins() && tiny.ane_ms >= cost.dispatch_ms,
            "{tiny:?}"
        );
        // The estimate adds up the dispatches of the shape-shared program.
        let big = estimate(&planner, &cost, 4096, 4096, 512, 1, true);
        let one = cost.dispatch_time_ms(&planner.tile(4096, 4096, 512));
        assert!((big.ane_ms - one).abs() < 1e-9);
        assert!((big.cpu_ms - cost.cpu_ms(2.0 * 4096.0 * 4096.0 * 512.0)).abs() < 1e-9);
        // With cost routing, the plan offloads exactly the MUL_MATs whose estimate wins, so the
        // fraction can only drop, and the M5's faster ANE keeps more than the M1.
        let m = preset("llama3-8b").unwrap();
        for chip in [Chip::M1, Chip::M4, Chip::M5] {
            let mut o = PlanOptions::new(chip);
            let batch = plan(&m, &[512], &o);
            o.route = Route::Cost;
            let routed = plan(&m, &[512], &o);
            assert!(
                routed.offloaded_matmul_flops_fraction_at_512
                    <= batch.offloaded_matmul_flops_fraction_at_512
            );
            assert!(routed.rows[0].estimated_ms <= batch.rows[0].estimated_ms + 1e-6);
        }
        let frac = |chip| {
            let mut o = PlanOptions::new(chip);
            o.route = Route::Cost;
            plan(&m, &[512], &o).offloaded_matmul_flops_fraction_at_512
        };
        assert!(frac(Chip::M5) > frac(Chip::M1));
    }

    #[test]
    fn short_prompts_stay_on_cpu() {
        let p = plan(
            &preset("llama3-8b").unwrap(),
            &[1, 63, 64],
            &PlanOptions::new(Chip::M4),
        );
        assert_eq!(p.rows[0].dispatches, 0);
        assert_eq!(p.rows[1].dispatches, 0);
        assert!(p.rows[2].dispatches > 0);
    }

    #[test]
    fn attention_adds_programs_when_flash_attention_is_off() {
        let mut o = PlanOptions::new(Chip::M4);
        let with_fa = plan(&preset("llama3-8b").unwrap(), &[512], &o).programs_total;
        o.flash_attn = false;
        let without = plan(&preset("llama3-8b").unwrap(), &[512], &o);
        assert!(without.programs_total > with_fa);
        assert!(without.offloaded_matmul_flops_fraction_at_512 > 0.99);
    }

    #[test]
    fn compressed_weights_are_baked_per_weight_and_counted() {
        let mut o = PlanOptions::new(Chip::M4);
        o.compressed_bits = Some(4.5);
        let m = preset("llama3-8b").unwrap();
        let p = plan(&m, &[512], &o);
        // Q, O and down are lone weights (V+K and gate+up fuse): 3 per layer, the last layer's
        // down runs with 1 output row on the CPU, so 3 * 32 - 1 baked programs at one bucket.
        assert_eq!(p.programs_baked, 3 * 32 - 1);
        let (e, f) = (m.n_embd as f64, m.n_ff as f64);
        let want = (32.0 * 2.0 * e * e + 31.0 * e * f) * 4.5 / 8.0 / (1u64 << 20) as f64;
        assert!(
            (p.baked_mb - want).abs() < 1e-6 * want,
            "{} vs {want}",
            p.baked_mb
        );
        assert!(
            p.programs_total > o.max_programs,
            "an 8B model does not fit baked: LRU thrash"
        );
        assert_eq!(
            plan(&m, &[512], &PlanOptions::new(Chip::M4)).programs_baked,
            0
        );
    }
}
