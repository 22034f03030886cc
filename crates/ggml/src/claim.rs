//! Whether the device claims a node (a decision, with its reason), and what it learns and stages
//! about the weights it claims (an explicit step, after the decision).

use crate::config::{self, Config};
use crate::device::*;
use crate::matmul::{self, Member, Operand};
use crate::support::{self, TensorDesc};
use crate::{baked, health, lookahead};

/// What [`decide`] and [`after_claim`] know of a MUL_MAT node, read once at the boundary.
pub(crate) struct ClaimedNode<U: Fn() -> bool, B: Fn() -> Option<(usize, usize)>> {
    pub src0: TensorDesc,
    pub src1: TensorDesc,
    pub dst: TensorDesc,
    /// src0's memory (`None` for a type without ggml traits).
    pub src0_view: Option<Operand>,
    /// src1's tensor address: the lookahead learns which weights share it.
    pub src1_id: usize,
    /// src0 lives in a weights buffer.
    pub weight: bool,
    /// src0 is a weight in a GPU's buffer the device reads: its identity (its data address, as
    /// the lookahead knows weights) for the GPU weights' share of the staging budget.
    pub gpu_weight: Option<usize>,
    /// Bytes of the surface src0 alone is staged in (`matmul::staged_bytes`).
    pub staged_bytes: u64,
    pub src0_info: Option<crate::ggml::TypeInfo>,
    /// Whether src0's buffer is one the device reads (counts and says once when not).
    pub weight_usable: U,
    /// The live byte range of src0's buffer.
    pub buffer_range: B,
}

/// The claim decision.
pub(crate) enum Verdict {
    /// The device computes it.
    Claim,
    /// Not this device's, with the reason counted in the stats (`None`: counted elsewhere, e.g.
    /// `declined_buft`).
    Decline(Option<support::Decline>),
}

/// Whether the device claims a MUL_MAT: the types and shapes it computes ([`support::mul_mat`]),
/// a device that has not given up, a shape that compiles, the cost rule, and a weight buffer it
/// can read. Decides only: staging is [`after_claim`]'s.
pub(crate) fn decide<U: Fn() -> bool, B: Fn() -> Option<(usize, usize)>>(
    dev: &DeviceState,
    n: &ClaimedNode<U, B>,
) -> Verdict {
    use support::Decline;
    if let Err(d) = support::mul_mat(&n.src0, &n.src1, &n.dst, n.src0_info, dev.policy) {
        return Verdict::Decline(Some(d));
    }
    if dev.health.is_off() {
        return Verdict::Decline(Some(Decline::DeviceOff));
    }
    if dev.health.is_rejected(&health::OpKey::of(&n.src0, &n.src1)) {
        return Verdict::Decline(Some(Decline::ShapeFailed));
    }
    if !cost_says_ane(dev, &n.src0, &n.src1, n.weight) {
        return Verdict::Decline(Some(Decline::CostModel));
    }
    if !(n.weight_usable)() {
        return Verdict::Decline(None);
    }
    // Beside a GPU, weights beyond the staging budget stay with the GPU (it computes them at its
    // own speed) unless GGML_ANE_GPU_STREAM=1 asks to stream them.
    if let Some(id) = n.gpu_weight.filter(|_| !Config::get().gpu_stream) {
        let mut budget = dev.gpu_weights.lock().unwrap_or_else(|e| e.into_inner());
        if !budget.admit(id, n.staged_bytes) {
            return Verdict::Decline(Some(Decline::GpuMemory));
        }
    }
    Verdict::Claim
}

/// Whether the device claims a MUL_MAT_ID: each expert's product a MUL_MAT it computes
/// ([`support::mul_mat_id`]), `GGML_ANE_MOE` on, a device that has not given up, the cost model
/// (`GGML_ANE_ROUTE=cost`: [`ane_plan::moe::estimate`]), room for its experts in the staging
/// budget ([`ClaimBudget`]), and expert weights in a buffer it reads. Nothing is staged here: a
/// pack (or expert) is staged by the first dispatch that routes tokens to it.
#[allow(clippy::too_many_arguments)]
pub(crate) fn decide_id(
    dev: &DeviceState,
    src0: &TensorDesc,
    src1: &TensorDesc,
    ids: &TensorDesc,
    dst: &TensorDesc,
    src0_info: Option<crate::ggml::TypeInfo>,
    experts: Option<usize>,
    weight_usable: impl Fn() -> bool,
) -> Verdict {
    let s = match support::mul_mat_id(src0, src1, ids, dst, src0_info, dev.policy) {
        Ok(s) => s,
        Err(d) => return Verdict::Decline(Some(d)),
    };
    let cfg = Config::get();
    if !cfg.moe {
        return Verdict::Decline(Some(support::Decline::MoeOff));
    }
    if dev.health.is_off() {
        return Verdict::Decline(Some(support::Decline::DeviceOff));
    }
    if cfg.route == ane_plan::model::Route::Cost {
        let e = ane_plan::moe::ExpertShape {
            k: s.k,
            m: s.m,
            n_expert: s.n_expert,
            n_used: s.n_used,
        };
        // Packs where `mul_mat_id::run` packs (`moe::pack_size` checks the shape and layout).
        let est = ane_plan::moe::estimate(
            &dev.planner,
            &dev.cost,
            e,
            s.n_tokens,
            cfg.moe_pack && s.stacked,
        );
        if !est.ane_wins() {
            return Verdict::Decline(Some(support::Decline::CostModel));
        }
    }
    if !weight_usable() {
        return Verdict::Decline(None);
    }
    if let Some(data) = experts {
        let bytes = (s.k.next_multiple_of(32).max(64) * s.m * s.n_expert * 2) as u64;
        let mut budget = dev.experts.lock().unwrap_or_else(|e| e.into_inner());
        if !budget.admit(data, bytes) {
            return Verdict::Decline(Some(support::Decline::MoeMemory));
        }
    }
    Verdict::Claim
}

/// Tensors claimed so far and their fp16 size, against a share of the staging budget: the expert
/// tensors of MUL_MAT_IDs, and beside a GPU the weights in its buffers (what does not fit stays
/// with the GPU, which computes it anyway, rather than streaming: `gpu_memory`).
///
/// Staging every expert of a large MoE in fp16 does not fit a Mac (Qwen3-30B-A3B: 58 GB), and
/// the staging budget is a resident set admitted in graph order, so a prompt that touched more
/// experts than fit would convert them again on every ubatch. So expert tensors are admitted in
/// the order llama.cpp offers them (layer by layer) while their fp16 size fits
/// [`ane_plan::moe::EXPERT_SHARE`] of the budget (the rest of it holds the dense weights:
/// attention and shared experts), and the rest stay on the CPU (`moe_memory`): the first layers
/// run on the device, every ubatch, without re-staging. ggml never says when a model is freed, so
/// entries no MUL_MAT_ID computed during a whole pass over the model are released ([`Self::used`]):
/// a process that loads another model gets the budget back.
#[derive(Debug, Default)]
pub(crate) struct ClaimBudget {
    /// Admitted tensors: fp16 bytes, and whether a MUL_MAT_ID used them in the current pass.
    admitted: std::collections::HashMap<usize, (u64, bool)>,
    bytes: u64,
    /// The first tensor used: when it is used again, a pass over the model is over.
    first: Option<usize>,
    /// Cap in bytes.
    pub(crate) max_bytes: u64,
}

impl ClaimBudget {
    /// A budget of `max_bytes`.
    pub(crate) fn new(max_bytes: u64) -> Self {
        ClaimBudget {
            max_bytes,
            ..Default::default()
        }
    }

    /// Whether the experts at `data` (`bytes` in fp16) are, or now become, admitted.
    pub(crate) fn admit(&mut self, data: usize, bytes: u64) -> bool {
        if self.admitted.contains_key(&data) {
            return true;
        }
        if self.bytes + bytes > self.max_bytes {
            return false;
        }
        // Admitted at claim time count as used in this pass (a graph is being scheduled).
        self.admitted.insert(data, (bytes, true));
        self.bytes += bytes;
        true
    }

    /// Whether the tensor at `data` is admitted.
    pub(crate) fn is_admitted(&self, data: usize) -> bool {
        self.admitted.contains_key(&data)
    }

    /// A MUL_MAT_ID computed the experts at `data`. When the first one used comes again, the
    /// entries unused since are released. Returns how many.
    pub(crate) fn used(&mut self, data: usize) -> usize {
        let mut released = 0;
        if self.first == Some(data) {
            let stale: Vec<usize> = self
                .admitted
                .iter()
                .filter(|(_, (_, u))| !u)
                .map(|(k, _)| *k)
                .collect();
            for k in stale {
                if let Some((b, _)) = self.admitted.remove(&k) {
                    self.bytes -= b;
                    released += 1;
                }
            }
            for e in self.admitted.values_mut() {
                e.1 = false;
            }
        } else if self.first.is_none_or(|f| !self.admitted.contains_key(&f)) {
            self.first = Some(data);
        }
        if let Some(e) = self.admitted.get_mut(&data) {
            e.1 = true;
        }
        released
    }
}

/// After a claim: the lookahead learns which weights share src1 and stages each group it
/// completes into the surface its dispatches bind; without the lookahead a lone weight is
/// converted to fp16 now. Both happen while llama.cpp reserves its graphs at context creation,
/// so a prompt finds its weights staged.
pub(crate) fn after_claim<U: Fn() -> bool, B: Fn() -> Option<(usize, usize)>>(
    dev: &DeviceState,
    n: &ClaimedNode<U, B>,
) {
    let cfg = Config::get();
    // Only weights read in place are learnt and converted ahead; those copied through ggml's API
    // are staged by their first dispatch.
    let (Some(info), Some(view)) = (n.src0_info.filter(|_| n.weight), n.src0_view) else {
        return;
    };
    if cfg.lookahead && lookahead::eligible(&n.src0, &n.src1) {
        let w = lookahead::Weight {
            data: view.addr(),
            desc: n.src0,
            info,
        };
        let ready = dev
            .learner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .observe(w, n.src1_id, &n.src1, (n.buffer_range)());
        // The graph's last group (the LM head) is left to its first dispatch: a prefill computes
        // it on the CPU for one row, unless all logits are asked for.
        if let Some(r) = ready.filter(|r| cfg.prestage && !r.trailing) {
            stage_group_ahead(dev, &r);
        }
    } else if cfg.prestage {
        let m = Member::weight_only(view, info);
        // With compressed weights a Q8_0/Q4_0 weight is not converted ahead: alone it runs
        // baked; in a fused group it is staged at first dispatch.
        let bakeable = cfg.weights == config::WeightsMode::Compressed
            && baked::may_bake(&m, dev.engine.limits().max_axis);
        if !bakeable {
            matmul::convert_ahead(&dev.staged, &dev.stats, &m);
        }
    }
}

/// Whether a learnt companion joins its head's dispatch: it lies inside the head's buffer
/// (`head_buffer`, so it belongs to a live model), its activations round as the head's do
/// (`matmul::rounds_alike`), and the device would claim it with `src1`.
pub(crate) fn companion_claimed(
    dev: &DeviceState,
    head_ty: i32,
    w: &lookahead::Weight,
    src1: &TensorDesc,
    (lo, hi): (usize, usize),
) -> bool {
    let bytes = w.desc.ne[1] as usize * w.desc.nb[1];
    w.data >= lo
        && w.data.saturating_add(bytes) <= hi
        && matmul::rounds_alike(head_ty, w.desc.ty)
        && cost_says_ane(dev, &w.desc, src1, true)
}

/// Stages a group the lookahead learner completed, as `run_group` will stack it: the head, then
/// the companions it would speculate (inside the head's buffer, claimed by the cost rule).
pub(crate) fn stage_group_ahead(dev: &DeviceState, r: &lookahead::Ready) {
    let Some(range) = r.head_buffer else {
        return;
    };
    // SAFETY: weights of claimed MUL_MATs in a live host weights buffer: the learner hands a group
    // out only when the weight seen now (in a graph being scheduled, so alive) lies in the same
    // buffer range as the head, and companions are kept inside that range. Weights are loaded
    // before llama.cpp reserves its graphs.
    let member = |w: &lookahead::Weight| {
        matmul::Member::weight_only(
            unsafe { Operand::of_parts(w.desc, w.data, &w.info) },
            w.info,
        )
    };
    let members: Vec<matmul::Member> = std::iter::once(member(&r.head))
        .chain(
            r.companions
                .iter()
                .filter(|w| companion_claimed(dev, r.head.desc.ty, w, &r.src1_desc, range))
                .map(member),
        )
        .collect();
    if let Err(e) = matmul::stage_ahead(&dev.matmul_cx(), &members) {
        // Not fatal: the first dispatch stages the group (or falls back to the CPU).
        if crate::config::Config::get().debug {
            eprintln!("ggml-ane: staging at load failed (the first dispatch stages): {e}");
        }
    }
}

/// `GGML_ANE_ROUTE=cost`: whether the cost model estimates this MUL_MAT faster on the ANE (always
/// true with the default `batch` routing).
pub(crate) fn cost_says_ane(
    dev: &DeviceState,
    s0: &TensorDesc,
    s1: &TensorDesc,
    weight: bool,
) -> bool {
    if Config::get().route != ane_plan::model::Route::Cost {
        return true;
    }
    let [k, m, ne02, ne03] = s0.ne.map(|v| v as usize);
    let [_, n, ne12, ne13] = s1.ne.map(|v| v as usize);
    let cols = n * (ne12 / ne02.max(1)) * (ne13 / ne03.max(1));
    ane_plan::model::estimate(&dev.planner, &dev.cost, k, m, cols, ne02 * ne03, weight).ane_wins()
}

#[cfg(test)]
mod tests {
    use super::ClaimBudget;

    #[test]
    fn experts_are_admitted_in_order_while_they_fit() {
        let mut b = ClaimBudget::new(100);
        assert!(b.admit(1, 40));
        assert!(b.admit(2, 40));
        // Layer 3 does not fit; asking again gives the same answer, so reservations agree with
        // the graphs computed later.
        assert!(!b.admit(3, 40));
        assert!(!b.admit(3, 40));
        assert!(b.admit(1, 40), "admitted tensors stay admitted");
        assert!(b.admit(4, 20), "a smaller one still fits");
        assert!(!ClaimBudget::new(10).admit(5, 11));
    }

    #[test]
    fn experts_unused_for_a_pass_give_their_budget_back() {
        let mut b = ClaimBudget::new(100);
        assert!(b.admit(1, 40) && b.admit(2, 40));
        assert!(!b.admit(3, 40), "full");
        // Pass 1 computes 1 and 2; pass 2 only 1 (2's model was freed).
        assert_eq!(b.used(1), 0);
        assert_eq!(b.used(2), 0);
        assert_eq!(b.used(1), 0, "end of pass 1: both used");
        assert_eq!(b.used(1), 1, "end of pass 2: 2 released");
        assert!(b.admit(3, 40), "its room is back");
    }
}
