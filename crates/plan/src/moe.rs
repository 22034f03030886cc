//! Mixture-of-experts planning: how the expert matmuls of one MUL_MAT_ID become few dispatches.
//!
//! # Why packs
//! In a 512-token ubatch Qwen3-30B-A3B routes ~32 tokens to each of its 128 experts. One dispatch
//! per routed expert per matmul is 384 dispatches per layer, each padded to the smallest dense
//! column bucket (128): 4x padding and a dispatch floor of seconds per ubatch. So the experts of
//! a layer are cut into **packs** of `pack` consecutive experts (consecutive in memory, so a pack's
//! weights are one staged surface, converted once, never copied per dispatch), and one dispatch
//! runs a whole pack as the `heads` batch of the shape-shared program
//! ([`ane_mil::build::TiledShape`]): every expert of the pack gets the same number of activation
//! columns, the pack's **column bucket** ([`pack_bucket`]: the smallest of [`PACK_BUCKETS`] that
//! holds the pack's busiest expert). Buckets 8 apart below 64 keep padding low where MoE layers
//! live (tens of tokens per expert); only the buckets a prompt meets are compiled.
//!
//! A pack's weight surface is capped at [`PACK_MAX_BYTES`] (engine surfaces of one request share
//! one size, so the activations and outputs are allocated that large too); experts bigger than
//! that run one per dispatch with the dense buckets, as MUL_MATs do.
//!
//! [`presets`] and [`plan_layer`] feed `ane plan --moe`: dispatches, padding, programs and staged
//! memory per ubatch for known MoE models under a routing model ([`Routing`]).

use std::collections::BTreeSet;

use ane_engine::driver_plan::MIN_LAST_AXIS;
use ane_engine::surface::SPATIAL_MULTIPLE;

use crate::cost::ChipCost;
use crate::model::Estimate;
use crate::{Planner, TiledShape};

/// Largest surface of one pack: its experts' fp16 weights, and its activations and outputs at the
/// widest column bucket (a request's surfaces share one size).
pub const PACK_MAX_BYTES: usize = 32 << 20;

/// Column buckets of a pack dispatch: per expert, the columns every expert of the pack gets.
/// Past the last one a pack runs its experts one per dispatch (each has enough tokens for the
/// dense buckets).
pub const PACK_BUCKETS: [usize; 14] = [16, 24, 32, 40, 48, 56, 64, 80, 96, 128, 160, 192, 224, 256];

/// Experts per pack for experts of contraction `k` and `m` rows, `n_expert` of them, or `None`
/// when packing does not apply: a pack would hold one expert, or the shape needs what the pack
/// program does not do (row tiles or contraction slices beyond the chip's axis limit; rows that
/// the token-major layout would pad, which would misplace the experts in the staged surface; a
/// channel-first layout, whose activations the pack fill does not write).
pub fn pack_size(planner: &Planner, k: usize, m: usize, n_expert: usize) -> Option<usize> {
    let max = planner.limits.max_axis;
    let rows_exact = m.is_multiple_of(SPATIAL_MULTIPLE) && m >= MIN_LAST_AXIS;
    let tokens = planner.layout == crate::Layout::Tokens;
    if k > max || m > max || !rows_exact || !tokens || n_expert < 2 {
        return None;
    }
    let k_pad = k.next_multiple_of(SPATIAL_MULTIPLE).max(MIN_LAST_AXIS);
    // Every surface of a request is as large as the largest one (weights, or activations and
    // outputs at the widest bucket), so each of them counts against the cap.
    let widest = *PACK_BUCKETS.last().expect("buckets");
    let per_expert = (k_pad * m).max(widest * k_pad).max(widest * m) * 2;
    let fit = (PACK_MAX_BYTES / per_expert).min(n_expert);
    // A power of two, so the packs of n_expert = 2^j experts (all known models) are all full.
    let pack = if fit == 0 { 0 } else { 1 << fit.ilog2() };
    (pack >= 2).then_some(pack)
}

/// The column bucket of a pack whose busiest expert has `max_count` columns, or `None` when that
/// is past [`PACK_BUCKETS`].
pub fn pack_bucket(max_count: usize) -> Option<usize> {
    PACK_BUCKETS.iter().copied().find(|&b| b >= max_count)
}

/// Columns that one dispatch is worth, for choosing between padding and dispatches: the fixed
/// cost of an evaluate (~0.1 ms on an M4) is about what 64 columns of a 2048 x 768 expert take at
/// the runtime-weight matmul's estimated throughput (`cost::ChipCost`).
pub const DISPATCH_COLS: usize = 64;

/// How a pack's experts are dispatched: the packed ones in one dispatch of `bucket` columns each,
/// the `alone` ones (indexes into the pack) one per dispatch with the dense buckets.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PackSplit {
    /// The pack dispatch's column bucket; `None`: no pack dispatch.
    pub bucket: Option<usize>,
    /// Experts that run alone: busier than the bucket (a popular expert would otherwise pad the
    /// whole pack to its count).
    pub alone: Vec<usize>,
}

/// Splits a pack with `counts[h]` columns for expert `h` into one pack dispatch and experts that
/// run alone, minimising padded columns plus [`DISPATCH_COLS`] per dispatch.
pub fn split_pack(planner: &Planner, counts: &[usize]) -> PackSplit {
    let alone_cost = |n: usize| -> usize {
        planner
            .col_chunks(n)
            .iter()
            .map(|c| c.bucket + DISPATCH_COLS)
            .sum()
    };
    let heads = counts.len();
    let mut best = PackSplit {
        bucket: None,
        alone: (0..heads).filter(|&h| counts[h] > 0).collect(),
    };
    let mut best_cost: usize = best.alone.iter().map(|&h| alone_cost(counts[h])).sum();
    for b in PACK_BUCKETS {
        let alone: Vec<usize> = (0..heads).filter(|&h| counts[h] > b).collect();
        let packed = counts.iter().any(|&n| n > 0 && n <= b);
        let cost = alone.iter().map(|&h| alone_cost(counts[h])).sum::<usize>()
            + if packed { heads * b + DISPATCH_COLS } else { 0 };
        if packed && cost < best_cost {
            best_cost = cost;
            best = PackSplit {
                bucket: Some(b),
                alone,
            };
        }
    }
    best
}

/// How one MUL_MAT_ID's experts are dispatched, for one ubatch's routing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LayerPlan {
    /// Routed (expert, token) pairs: the columns that carry data.
    pub routed_cols: usize,
    /// Every dispatch, in order, as the program it runs: `(heads, column bucket)`, `heads = 1`
    /// for a single expert.
    pub shapes: Vec<(usize, usize)>,
}

impl LayerPlan {
    /// All dispatches.
    pub fn dispatches(&self) -> usize {
        self.shapes.len()
    }
    /// Dispatches of packs.
    pub fn pack_dispatches(&self) -> usize {
        self.shapes.iter().filter(|&&(h, _)| h > 1).count()
    }
    /// Dispatches of single experts (packing off, a ragged last pack, or a popular expert).
    pub fn single_dispatches(&self) -> usize {
        self.dispatches() - self.pack_dispatches()
    }
    /// Activation columns computed, padding included.
    pub fn padded_cols(&self) -> usize {
        self.shapes.iter().map(|&(h, b)| h * b).sum()
    }
    /// Padded over routed columns (1.0 = no padding).
    pub fn padding(&self) -> f64 {
        self.padded_cols() as f64 / self.routed_cols.max(1) as f64
    }
    /// Distinct programs: `(heads, column bucket)`.
    pub fn programs(&self) -> BTreeSet<(usize, usize)> {
        self.shapes.iter().copied().collect()
    }
    /// The program of each dispatch for experts of contraction `k` and `m` rows.
    pub fn tiled_shapes(&self, planner: &Planner, k: usize, m: usize) -> Vec<TiledShape> {
        self.shapes
            .iter()
            .map(|&(heads, b)| TiledShape {
                heads,
                ..planner.tile(k, m, b)
            })
            .collect()
    }
}

/// Plans one MUL_MAT_ID: `counts[e]` columns routed to expert `e`, packs of `pack` experts
/// (`None`: one dispatch per routed expert, dense buckets). The plugin's `mul_mat_id::run` makes
/// the same choices on the real routing.
pub fn plan_layer(planner: &Planner, counts: &[usize], pack: Option<usize>) -> LayerPlan {
    let mut p = LayerPlan {
        routed_cols: counts.iter().sum(),
        ..LayerPlan::default()
    };
    let single = |p: &mut LayerPlan, n: usize| {
        p.shapes
            .extend(planner.col_chunks(n).iter().map(|c| (1, c.bucket)));
    };
    match pack {
        Some(g) => {
            for experts in counts.chunks(g) {
                if experts.len() < g {
                    experts
                        .iter()
                        .filter(|&&n| n > 0)
                        .for_each(|&n| single(&mut p, n));
                    continue;
                }
                let split = split_pack(planner, experts);
                if let Some(b) = split.bucket {
                    p.shapes.push((g, b));
                }
                split.alone.iter().for_each(|&h| single(&mut p, experts[h]));
            }
        }
        None => counts
            .iter()
            .filter(|&&n| n > 0)
            .for_each(|&n| single(&mut p, n)),
    }
    p
}

/// How tokens pick experts in a planned ubatch.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Routing {
    /// Every token picks `n_used` distinct experts uniformly (a well-balanced router).
    Uniform,
    /// Expert `e` is picked with weight `1 / (rank + 1)^s` over a fixed random ranking: popular
    /// experts take several times their share (routers seen in practice are between the two).
    Skewed(f64),
}

/// Deterministic per-expert column counts of `tokens` tokens choosing `n_used` of `n_expert`
/// experts each (`seed` picks the draw).
pub fn route(
    n_expert: usize,
    n_used: usize,
    tokens: usize,
    routing: Routing,
    seed: u64,
) -> Vec<usize> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        // xorshift64*: reproducible without a dependency.
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        (state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    };
    let mut rank: Vec<usize> = (0..n_expert).collect();
    for i in (1..n_expert).rev() {
        let j = (next() * (i + 1) as f64) as usize;
        rank.swap(i, j.min(i));
    }
    let weight: Vec<f64> = (0..n_expert)
        .map(|e| match routing {
            Routing::Uniform => 1.0,
            Routing::Skewed(s) => 1.0 / ((rank[e] + 1) as f64).powf(s),
        })
        .collect();
    let mut counts = vec![0; n_expert];
    let n_used = n_used.min(n_expert);
    for _ in 0..tokens {
        let mut picked: Vec<usize> = Vec::with_capacity(n_used);
        while picked.len() < n_used {
            let total: f64 = (0..n_expert)
                .filter(|e| !picked.contains(e))
                .map(|e| weight[e])
                .sum();
            let mut r = next() * total;
            let mut choice = None;
            for e in (0..n_expert).filter(|e| !picked.contains(e)) {
                choice = Some(e);
                r -= weight[e];
                if r <= 0.0 {
                    break;
                }
            }
            picked.push(choice.expect("n_used <= n_expert"));
        }
        picked.iter().for_each(|&e| counts[e] += 1);
    }
    counts
}

/// The expert part of a MoE model's shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MoePreset {
    /// Name for `ane plan --moe`.
    pub name: std::borrow::Cow<'static, str>,
    /// MoE layers.
    pub layers: usize,
    /// Hidden size (gate/up contraction, down rows).
    pub hidden: usize,
    /// Expert FFN size (gate/up rows, down contraction).
    pub ffn: usize,
    /// Experts per layer.
    pub n_expert: usize,
    /// Experts each token uses.
    pub n_used: usize,
}

/// Known MoE models (shapes from their published configs).
pub const PRESETS: [MoePreset; 3] = [
    MoePreset {
        name: std::borrow::Cow::Borrowed("qwen3-30b-a3b"),
        layers: 48,
        hidden: 2048,
        ffn: 768,
        n_expert: 128,
        n_used: 8,
    },
    MoePreset {
        name: std::borrow::Cow::Borrowed("olmoe-1b-7b"),
        layers: 16,
        hidden: 2048,
        ffn: 1024,
        n_expert: 64,
        n_used: 8,
    },
    MoePreset {
        name: std::borrow::Cow::Borrowed("mixtral-8x7b"),
        layers: 32,
        hidden: 4096,
        ffn: 14336,
        n_expert: 8,
        n_used: 2,
    },
];

/// The expert shape of a MoE GGUF (`name` for reports): the experts of its first MoE layer
/// (`blk.N.ffn_gate_exps.weight`, `[hidden, ffn, n_expert]`), the experts each token uses
/// (`{arch}.expert_used_count`) and how many layers have experts. `Ok(None)` for a model without
/// experts.
///
/// # Errors
/// A field that is missing or malformed, named.
pub fn from_gguf(
    g: &crate::gguf::Gguf,
    name: &str,
) -> Result<Option<MoePreset>, crate::gguf::GgufError> {
    use crate::gguf::GgufError;
    let mut layers = 0;
    let mut first = None;
    for i in 0.. {
        let up = format!("blk.{i}.ffn_gate_exps.weight");
        let block = format!("blk.{i}.attn_norm.weight");
        match g.tensors.get(&up) {
            Some(t) => {
                layers += 1;
                first.get_or_insert((up, t.dims.clone()));
            }
            None if g.tensors.contains_key(&block) => {}
            None => break,
        }
    }
    let Some((field, dims)) = first else {
        return Ok(None);
    };
    let [hidden, ffn, n_expert] = dims.as_slice() else {
        return Err(GgufError::Invalid {
            field,
            detail: format!("expected 3 dims [hidden, ffn, n_expert], got {dims:?}"),
        });
    };
    let arch = g
        .str("general.architecture")
        .ok_or_else(|| GgufError::Invalid {
            field: "general.architecture".into(),
            detail: "missing".into(),
        })?;
    let key = format!("{arch}.expert_used_count");
    let n_used = g.int(&key).ok_or(GgufError::Invalid {
        field: key,
        detail: "missing".into(),
    })?;
    Ok(Some(MoePreset {
        name: name.to_string().into(),
        layers,
        hidden: *hidden as usize,
        ffn: *ffn as usize,
        n_expert: *n_expert as usize,
        n_used: n_used.max(1) as usize,
    }))
}

/// The preset called `name`.
pub fn preset(name: &str) -> Option<MoePreset> {
    PRESETS.iter().find(|p| p.name == name).cloned()
}

/// One MoE layer of a preset planned for one ubatch: gate and up (contraction `hidden`, `ffn`
/// rows, sharing their activations, so llama.cpp may merge them) and down (the transpose).
#[derive(Clone, Debug, PartialEq)]
pub struct MoeLayerPlan {
    /// Gate + up + down, each as its own MUL_MAT_ID.
    pub matmuls: Vec<LayerPlan>,
    /// Experts per pack of gate/up and of down (`None`: no packing).
    pub packs: (Option<usize>, Option<usize>),
}

impl MoeLayerPlan {
    /// Dispatches of the layer.
    pub fn dispatches(&self) -> usize {
        self.matmuls.iter().map(LayerPlan::dispatches).sum()
    }
    /// Padded over routed columns, over the layer.
    pub fn padding(&self) -> f64 {
        let padded: usize = self.matmuls.iter().map(LayerPlan::padded_cols).sum();
        let routed: usize = self.matmuls.iter().map(|p| p.routed_cols).sum();
        padded as f64 / routed.max(1) as f64
    }
    /// `(k, m)` of gate, up and down.
    pub fn dims(p: &MoePreset) -> [(usize, usize); 3] {
        [(p.hidden, p.ffn), (p.hidden, p.ffn), (p.ffn, p.hidden)]
    }
    /// Distinct programs: `(k, m, heads, bucket)`.
    pub fn programs(&self, p: &MoePreset) -> BTreeSet<(usize, usize, usize, usize)> {
        self.matmuls
            .iter()
            .zip(MoeLayerPlan::dims(p))
            .flat_map(|(l, (k, m))| l.programs().into_iter().map(move |(h, b)| (k, m, h, b)))
            .collect()
    }
}

/// Plans one MoE layer of `p` for `tokens` tokens routed by `counts`.
pub fn plan_moe_layer(
    planner: &Planner,
    p: &MoePreset,
    counts: &[usize],
    packing: bool,
) -> MoeLayerPlan {
    let up = packing
        .then(|| pack_size(planner, p.hidden, p.ffn, p.n_expert))
        .flatten();
    let down = packing
        .then(|| pack_size(planner, p.ffn, p.hidden, p.n_expert))
        .flatten();
    MoeLayerPlan {
        matmuls: vec![
            plan_layer(planner, counts, up),
            plan_layer(planner, counts, up),
            plan_layer(planner, counts, down),
        ],
        packs: (up, down),
    }
}

/// Estimated device and CPU times of one MUL_MAT_ID, for `GGML_ANE_ROUTE=cost` before the routing
/// is known: `tokens` tokens each using `n_used` of `n_expert` experts of contraction `k` and `m`
/// rows, spread evenly, with the busiest expert of a pack taking a quarter more than its share
/// (what a balanced router gives for packs of 8 at tens of tokens per expert, see [`route`]).
pub fn estimate(
    planner: &Planner,
    cost: &ChipCost,
    e: ExpertShape,
    tokens: usize,
    packing: bool,
) -> Estimate {
    let routed = tokens * e.n_used;
    let share = routed.div_ceil(e.n_expert.max(1));
    let pack = packing
        .then(|| pack_size(planner, e.k, e.m, e.n_expert))
        .flatten();
    let busiest = (share * 5).div_ceil(4).min(tokens);
    let single = |n: usize| -> f64 {
        planner
            .col_chunks(n)
            .iter()
            .map(|c| cost.dispatch_time_ms(&planner.tile(e.k, e.m, c.bucket)))
            .sum()
    };
    let active = e.n_expert.min(routed);
    let ane_ms = match (pack, pack_bucket(busiest)) {
        (Some(g), Some(b)) => {
            let s = TiledShape {
                heads: g,
                ..planner.tile(e.k, e.m, b)
            };
            active.div_ceil(g) as f64 * cost.dispatch_time_ms(&s)
        }
        _ => active as f64 * single(share),
    };
    Estimate {
        ane_ms,
        cpu_ms: cost.cpu_ms(2.0 * (e.k * e.m * routed) as f64),
    }
}

/// The expert shape of a MUL_MAT_ID.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExpertShape {
    /// Contraction.
    pub k: usize,
    /// Rows of one expert.
    pub m: usize,
    /// Experts.
    pub n_expert: usize,
    /// Experts each token uses.
    pub n_used: usize,
}

/// Share of the staging budget (`GGML_ANE_STAGE_MAX_MB`) that expert tensors may take: the rest
/// keeps the dense weights (attention, shared experts) staged, so that experts never push them
/// out and make every ubatch convert them again.
pub const EXPERT_SHARE: (u64, u64) = (3, 4);

/// Bytes of expert tensors admitted under a staging budget of `stage_max_bytes`.
pub fn expert_budget(stage_max_bytes: u64) -> u64 {
    stage_max_bytes / EXPERT_SHARE.1 * EXPERT_SHARE.0
}

/// Bytes of all experts of `p` in fp16 (what staging every expert would hold).
pub fn experts_fp16_bytes(p: &MoePreset) -> u64 {
    3 * (p.layers * p.n_expert * p.hidden * p.ffn) as u64 * 2
}

#[cfg(test)]
mod tests {
    use super::*;
    use ane_engine::Chip;

    fn planner() -> Planner {
        Planner::new(Chip::M4.limits())
    }

    #[test]
    fn pack_sizes_follow_the_surface_cap_and_the_row_rule() {
        let p = planner();
        // Qwen3-30B-A3B: 3 MiB per expert -> 8 per 32 MiB pack, both directions.
        assert_eq!(pack_size(&p, 2048, 768, 128), Some(8));
        assert_eq!(pack_size(&p, 768, 2048, 128), Some(8));
        // Mixtral: one expert is past the cap.
        assert_eq!(pack_size(&p, 4096, 14336, 8), None);
        // Rows the token-major layout would pad.
        assert_eq!(pack_size(&p, 256, 100, 8), None);
        // Never more than the experts there are.
        assert_eq!(pack_size(&p, 64, 64, 4), Some(4));
        assert_eq!(pack_size(&p, 64, 64, 6), Some(4));
        assert_eq!(pack_size(&p, 64, 64, 1), None);
        // Narrow contraction, wide rows: the outputs at the widest bucket set the size.
        let g = pack_size(&p, 64, 1024, 64).unwrap();
        assert!(g * 256 * 1024 * 2 <= PACK_MAX_BYTES, "{g}");
    }

    #[test]
    fn buckets_hold_the_busiest_expert() {
        assert_eq!(pack_bucket(1), Some(16));
        assert_eq!(pack_bucket(33), Some(40));
        assert_eq!(pack_bucket(256), Some(256));
        assert_eq!(pack_bucket(257), None);
    }

    #[test]
    fn routing_is_deterministic_and_conserves_pairs() {
        for r in [Routing::Uniform, Routing::Skewed(0.8)] {
            let a = route(128, 8, 512, r, 7);
            assert_eq!(a, route(128, 8, 512, r, 7));
            assert_eq!(a.iter().sum::<usize>(), 512 * 8);
        }
        let skew = route(128, 8, 512, Routing::Skewed(1.0), 1);
        let uni = route(128, 8, 512, Routing::Uniform, 1);
        assert!(skew.iter().max() > uni.iter().max());
    }

    /// The targets for Qwen3-30B-A3B at 512 tokens: at most 64 dispatches per MoE layer
    /// and padding at most 1.5x, for a balanced router.
    #[test]
    fn qwen3_targets_hold_with_packs() {
        let p = planner();
        let q = preset("qwen3-30b-a3b").unwrap();
        for seed in 0..4 {
            let counts = route(q.n_expert, q.n_used, 512, Routing::Uniform, seed);
            let l = plan_moe_layer(&p, &q, &counts, true);
            assert!(l.dispatches() <= 64, "{} dispatches", l.dispatches());
            assert!(l.padding() <= 1.5, "padding {}", l.padding());
            let single = plan_moe_layer(&p, &q, &counts, false);
            assert!(single.dispatches() >= 3 * 120);
            assert!(single.padding() >= 3.5);
        }
    }

    #[test]
    fn estimates_favour_packs_and_scale_with_work() {
        let p = planner();
        let c = crate::cost::chip_cost(Chip::M4);
        let e = ExpertShape {
            k: 2048,
            m: 768,
            n_expert: 128,
            n_used: 8,
        };
        let packed = estimate(&p, &c, e, 512, true);
        let single = estimate(&p, &c, e, 512, false);
        assert!(packed.ane_ms < single.ane_ms, "{packed:?} vs {single:?}");
        assert_eq!(packed.cpu_ms, single.cpu_ms);
        let half = estimate(&p, &c, e, 256, true);
        assert!(half.cpu_ms < packed.cpu_ms && half.ane_ms <= packed.ane_ms);
        // One token: a few experts, the dispatch floor against a tiny CPU cost.
        assert!(!estimate(&p, &c, e, 1, true).ane_wins());
    }

    #[test]
    fn a_popular_expert_runs_alone_and_the_rest_stay_packed() {
        let p = planner();
        let l = plan_layer(&p, &[300, 0, 5, 0], Some(4));
        assert_eq!((l.pack_dispatches(), l.single_dispatches()), (1, 1));
        assert_eq!(l.padded_cols(), 512 + 4 * 16);
        let s = split_pack(&p, &[200, 20, 18, 30, 25, 19, 22, 21]);
        assert_eq!(
            s,
            PackSplit {
                bucket: Some(32),
                alone: vec![0]
            }
        );
        // All busy: one pack of the largest bucket beats eight dense dispatches.
        let s = split_pack(&p, &[250; 8]);
        assert_eq!(s.bucket, Some(256));
        assert!(s.alone.is_empty());
        // One lone expert: alone it takes 128 columns, packed 4 x 16 + a dispatch.
        let s = split_pack(&p, &[0, 0, 0, 9]);
        assert_eq!(s.bucket, Some(16));
        let l = plan_layer(&p, &[0, 0, 0, 0, 3, 9, 0, 1], Some(4));
        assert_eq!((l.pack_dispatches(), l.single_dispatches()), (1, 0));
        assert_eq!((l.padded_cols(), l.routed_cols), (64, 13));
    }
}
