//! How much of a model's fp16 weights the plugin keeps staged, and how much it converts per
//! ubatch: the staging budget's rules, shared by the plugin (`GGML_ANE_STAGE_MAX_MB`) and
//! `ane plan --ram`.
//!
//! The device reads weights as fp16, so the plugin keeps fp16 copies of the weight groups it
//! dispatches, in a resident set: groups are admitted in graph order while they fit the budget and
//! stay; the groups beyond it are converted for each dispatch (streamed), through a ring of
//! [`RING`] surfaces (the group a dispatch uses and the next, converted meanwhile) that the
//! resident set leaves room for. Prefill walks the layers in the same order every ubatch, so the
//! first layers stay resident and the rest stream every ubatch.

use crate::model::ModelShape;
use serde::Serialize;

/// Groups a streaming ring holds: the one a dispatch uses and the one converted ahead.
pub const RING: usize = 2;

/// The staging budget when the machine's memory cannot be read: fp16 copies of an 8B model fit.
pub const FALLBACK_BUDGET_MB: u64 = 16384;

/// The default staging budget on a machine with `ram` bytes of physical memory: a quarter of it.
/// The staged fp16 copies sit beside the model itself (mmapped by llama.cpp, or held by Metal)
/// and everything else the machine runs; a budget past what the machine holds makes it swap,
/// while a smaller one only streams the groups beyond it. At most half the memory by any rule;
/// [`FALLBACK_BUDGET_MB`] when unknown (0); 256 MiB at least.
pub fn default_budget_mb(ram: u64) -> u64 {
    if ram == 0 {
        return FALLBACK_BUDGET_MB;
    }
    ((ram >> 20) / 4).max(256)
}

/// One weight group of a prefill layer, as the plugin stages it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StagedGroup {
    /// `blk.L.qkv`, `blk.L.o`, `blk.L.gate_up`, `blk.L.down`.
    pub name: String,
    /// fp16 bytes (K padded to 32, times the stacked rows, times 2).
    pub bytes: u64,
}

/// The groups a prefill dispatches, in graph order: per layer Q+K+V, O, gate+up, down; the last
/// layer's FFN and the LM head compute one row in a prefill (on the CPU/GPU) and are left out.
pub fn groups(m: &ModelShape) -> Vec<StagedGroup> {
    let kv = m.n_head_kv * m.head_dim;
    let q = m.n_head * m.head_dim;
    let bytes = |k: usize, rows: usize| (k.next_multiple_of(32) * rows * 2) as u64;
    let mut out = Vec::new();
    for l in 0..m.n_layer {
        out.push(StagedGroup {
            name: format!("blk.{l}.qkv"),
            bytes: bytes(m.n_embd, q + 2 * kv),
        });
        out.push(StagedGroup {
            name: format!("blk.{l}.o"),
            bytes: bytes(q, m.n_embd),
        });
        if l + 1 < m.n_layer {
            out.push(StagedGroup {
                name: format!("blk.{l}.gate_up"),
                bytes: bytes(m.n_embd, 2 * m.n_ff),
            });
            out.push(StagedGroup {
                name: format!("blk.{l}.down"),
                bytes: bytes(m.n_ff, m.n_embd),
            });
        }
    }
    out
}

/// What a budget means for a model.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StagingPlan {
    /// The budget, MiB.
    pub budget_mb: u64,
    /// fp16 bytes of every group a prefill dispatches, MiB.
    pub fp16_mb: f64,
    /// Groups in all.
    pub groups: usize,
    /// How many stay resident (the first in graph order).
    pub resident_groups: usize,
    /// Resident MiB.
    pub resident_mb: f64,
    /// MiB the resident set leaves for the streaming ring ([`RING`] of the largest group; 0 when
    /// everything fits).
    pub ring_mb: f64,
    /// MiB converted on the dispatch path every ubatch (the groups beyond the budget).
    pub stream_mb_per_ubatch: f64,
}

/// Admits the model's groups in graph order against `budget_mb`.
pub fn plan(m: &ModelShape, budget_mb: u64) -> StagingPlan {
    let gs = groups(m);
    let budget = budget_mb.saturating_mul(1 << 20);
    let total: u64 = gs.iter().map(|g| g.bytes).sum();
    // Once anything streams, the ring's room comes out of the resident set.
    let ring = if total > budget {
        RING as u64 * gs.iter().map(|g| g.bytes).max().unwrap_or(0)
    } else {
        0
    };
    let (mut held, mut resident) = (0u64, 0usize);
    for g in &gs {
        if held + g.bytes + ring > budget {
            break;
        }
        held += g.bytes;
        resident += 1;
    }
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    StagingPlan {
        budget_mb,
        fp16_mb: mib(total),
        groups: gs.len(),
        resident_groups: resident,
        resident_mb: mib(held),
        ring_mb: mib(ring),
        stream_mb_per_ubatch: mib(total - held),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_follows_the_machine() {
        let gib = 1u64 << 30;
        assert_eq!(default_budget_mb(16 * gib), 4096);
        assert_eq!(default_budget_mb(24 * gib), 6144);
        assert_eq!(default_budget_mb(0), FALLBACK_BUDGET_MB);
        assert_eq!(default_budget_mb(512 << 20), 256);
        for ram in [8 * gib, 16 * gib, 36 * gib, 192 * gib] {
            assert!(default_budget_mb(ram) << 20 <= ram / 2);
        }
    }

    #[test]
    fn groups_are_admitted_in_graph_order() {
        let m = crate::model::preset("llama3-8b").unwrap();
        let all = plan(&m, 1 << 20);
        // 32 layers x 4 groups, minus the last layer's FFN.
        assert_eq!(all.groups, 126);
        assert_eq!(all.resident_groups, 126);
        assert_eq!(all.stream_mb_per_ubatch, 0.0);
        // Llama 3 8B's dense weights are about 6.5 G parameters: about 13.3 GB in fp16.
        assert!(
            (12_000.0..13_500.0).contains(&all.fp16_mb),
            "{}",
            all.fp16_mb
        );
        assert_eq!(all.ring_mb, 0.0, "no ring when everything fits");
        let half = plan(&m, 6144);
        assert!(half.resident_mb + half.ring_mb <= 6144.0 && half.resident_groups < all.groups);
        // Two of the largest group (gate+up: 4096 x 2 x 14336 fp16 = 224 MiB).
        assert_eq!(half.ring_mb, 448.0);
        assert!((half.resident_mb + half.stream_mb_per_ubatch - all.fp16_mb).abs() < 1e-6);
        let none = plan(&m, 1);
        assert_eq!(none.resident_groups, 0);
        assert_eq!(none.stream_mb_per_ubatch, all.fp16_mb);
    }
}
