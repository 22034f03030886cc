//! `supports_op`: the one place that decides what the plugin claims.
//!
//! Whatever this returns `Ok` for, `graph_compute` computes (through the engine, or on the CPU if
//! the engine fails). The decision is a pure function of the op's types and shapes so that it is
//! cheap (the scheduler calls it very often) and testable without ggml.

use crate::ffi::{GGML_TYPE_BF16, GGML_TYPE_F16, GGML_TYPE_F32, GGML_TYPE_I32};
use crate::ggml::TypeInfo;

/// Types, shape and strides of one tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TensorDesc {
    /// `enum ggml_type`.
    pub ty: i32,
    /// Elements per dimension, innermost first.
    pub ne: [i64; 4],
    /// Byte strides per dimension.
    pub nb: [usize; 4],
}

impl TensorDesc {
    /// Byte offset of element (`i0`, `i1`, `i2`, `i3`): the one place the plugin does ggml's
    /// stride arithmetic.
    pub fn offset(&self, i0: usize, i1: usize, i2: usize, i3: usize) -> usize {
        i0 * self.nb[0] + self.row_offset(i1, i2, i3)
    }

    /// Byte offset of row `i1` of matrix (`i2`, `i3`).
    pub fn row_offset(&self, i1: usize, i2: usize, i3: usize) -> usize {
        i1 * self.nb[1] + i2 * self.nb[2] + i3 * self.nb[3]
    }

    /// Contiguous f32 (or any plain type of `elem` bytes) tensor of shape `ne`.
    pub fn contiguous(ty: i32, elem: usize, ne: [i64; 4]) -> Self {
        let mut nb = [elem, 0, 0, 0];
        for i in 1..4 {
            nb[i] = nb[i - 1] * ne[i - 1] as usize;
        }
        TensorDesc { ty, ne, nb }
    }
}

/// Why a MUL_MAT was declined. The names are the stats keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Decline {
    /// Fewer src1 columns (tokens) than `GGML_ANE_MIN_BATCH`: decode stays on the CPU/GPU.
    SmallBatch,
    /// dst is not F32.
    DstType,
    /// src1 is not F32, F16 or BF16.
    Src1Type,
    /// src0 has no conversion to float in ggml-base.
    Src0Type,
    /// Quantized src0 whose blocks are not contiguous within a row.
    Src0Layout,
    /// Shapes that are not a MUL_MAT ggml defines (K mismatch, broadcast not integral, wrong dst).
    Shape,
    /// Some dimension is zero.
    Empty,
    /// Fewer than [`MIN_OUTPUTS`] output values: one ANE dispatch costs more than the CPU does
    /// for the whole op, and fp16 inputs make the relative error of a lone dot product with
    /// cancellation unbounded (llama.cpp's test suite measures it on one value).
    TinyOutput,
    /// `GGML_ANE_ROUTE=cost`: the cost model (`ane_plan::model::estimate`) puts the CPU ahead.
    CostModel,
    /// The device gave up after a run of engine failures (`crate::health`, `GGML_ANE_GIVE_UP`).
    DeviceOff,
    /// This op's types and dimensions failed for good on the device (a shape its compiler
    /// rejects, `crate::health::Health::reject`).
    ShapeFailed,
    /// A MUL_MAT_ID while `GGML_ANE_MOE=off` (the default until measured on a Mac).
    MoeOff,
    /// A MUL_MAT_ID whose experts, in fp16, do not fit what is left of `GGML_ANE_STAGE_MAX_MB`
    /// after the experts already claimed (`crate::claim::ClaimBudget`).
    MoeMemory,
    /// Beside a GPU, a weight in the GPU's buffer beyond `GGML_ANE_STAGE_MAX_MB`: the GPU keeps
    /// it rather than the device streaming it (`GGML_ANE_GPU_STREAM=1` streams it).
    GpuMemory,
}

/// Smallest number of output values the plugin claims (see [`Decline::TinyOutput`]).
pub const MIN_OUTPUTS: i64 = 16;

impl Decline {
    /// Every reason, in stats order.
    pub const ALL: [Decline; 14] = [
        Decline::SmallBatch,
        Decline::DstType,
        Decline::Src1Type,
        Decline::Src0Type,
        Decline::Src0Layout,
        Decline::Shape,
        Decline::Empty,
        Decline::TinyOutput,
        Decline::CostModel,
        Decline::DeviceOff,
        Decline::ShapeFailed,
        Decline::MoeOff,
        Decline::MoeMemory,
        Decline::GpuMemory,
    ];

    /// Stats key.
    pub fn name(self) -> &'static str {
        match self {
            Decline::SmallBatch => "small_batch",
            Decline::DstType => "dst_type",
            Decline::Src1Type => "src1_type",
            Decline::Src0Type => "src0_type",
            Decline::Src0Layout => "src0_layout",
            Decline::Shape => "shape",
            Decline::Empty => "empty",
            Decline::TinyOutput => "tiny_output",
            Decline::CostModel => "cost_model",
            Decline::DeviceOff => "device_off",
            Decline::ShapeFailed => "shape_failed",
            Decline::MoeOff => "moe_off",
            Decline::MoeMemory => "moe_memory",
            Decline::GpuMemory => "gpu_memory",
        }
    }

    /// Index into [`Decline::ALL`].
    pub fn index(self) -> usize {
        Decline::ALL
            .iter()
            .position(|&d| d == self)
            .expect("listed")
    }
}

/// The knobs the decision depends on.
#[derive(Clone, Copy, Debug)]
pub struct Policy {
    /// Smallest number of src1 columns claimed.
    pub min_batch: usize,
}

/// Whether the device claims a bridge op (`crate::bridge`): a ROPE or GLU whose tensors are all
/// F32, in a prefill-sized graph (at least `min_batch` tokens: ROPE's `ne[2]`, GLU's `ne[1]`), so
/// decode graphs keep theirs where they are. `srcs`: the op's sources, in order.
pub fn bridge(
    op: i32,
    dst: &TensorDesc,
    srcs: &[TensorDesc],
    policy: Policy,
) -> Result<(), Decline> {
    use crate::ffi::{GGML_OP_GLU, GGML_OP_ROPE};
    let tokens = match op {
        GGML_OP_ROPE => dst.ne[2],
        GGML_OP_GLU => dst.ne[1],
        _ => return Err(Decline::Shape),
    };
    if dst.ty != GGML_TYPE_F32 {
        return Err(Decline::DstType);
    }
    // ROPE's positions (I32) and frequency factors (F32) are read as they are; every float
    // operand is F32.
    let float_srcs = if op == GGML_OP_ROPE { &srcs[..1] } else { srcs };
    if srcs.is_empty() || float_srcs.iter().any(|s| s.ty != GGML_TYPE_F32) {
        return Err(Decline::Src1Type);
    }
    if dst
        .ne
        .iter()
        .chain(srcs.iter().flat_map(|s| &s.ne))
        .any(|&n| n <= 0)
    {
        return Err(Decline::Empty);
    }
    if tokens < policy.min_batch as i64 || dst.ne[3] != 1 {
        return Err(Decline::SmallBatch);
    }
    Ok(())
}

/// Ops that compute nothing (views and reshapes): claimed, never dispatched.
pub fn is_noop(op: i32) -> bool {
    use crate::ffi::*;
    matches!(
        op,
        GGML_OP_NONE | GGML_OP_RESHAPE | GGML_OP_VIEW | GGML_OP_PERMUTE | GGML_OP_TRANSPOSE
    )
}

/// True for the element types the plugin widens itself, with arbitrary strides.
pub fn is_plain(ty: i32) -> bool {
    matches!(ty, GGML_TYPE_F32 | GGML_TYPE_F16 | GGML_TYPE_BF16)
}

/// Decides whether a MUL_MAT `dst = src0 x src1` is claimed. `src0_info` is ggml's traits for
/// src0's type (`None` if unknown).
pub fn mul_mat(
    src0: &TensorDesc,
    src1: &TensorDesc,
    dst: &TensorDesc,
    src0_info: Option<TypeInfo>,
    policy: Policy,
) -> Result<(), Decline> {
    if dst.ty != GGML_TYPE_F32 {
        return Err(Decline::DstType);
    }
    if !is_plain(src1.ty) {
        return Err(Decline::Src1Type);
    }
    let info = match src0_info {
        Some(i) if is_plain(src0.ty) || i.to_float.is_some() => i,
        _ => return Err(Decline::Src0Type),
    };
    let [k, m, ne02, ne03] = src0.ne;
    let [k1, n, ne12, ne13] = src1.ne;
    if src0.ne.iter().chain(&src1.ne).any(|&d| d <= 0) {
        return Err(Decline::Empty);
    }
    if k != k1 || ne12 % ne02 != 0 || ne13 % ne03 != 0 || dst.ne != [m, n, ne12, ne13] {
        return Err(Decline::Shape);
    }
    if !is_plain(src0.ty)
        && (src0.nb[0] != info.type_size || !(k as usize).is_multiple_of(info.blck_size))
    {
        return Err(Decline::Src0Layout);
    }
    if (n as usize) < policy.min_batch {
        return Err(Decline::SmallBatch);
    }
    if policy.min_batch > 0 && m * n * ne12 * ne13 < MIN_OUTPUTS {
        return Err(Decline::TinyOutput);
    }
    Ok(())
}

/// The shapes of a MUL_MAT_ID: experts `[K, M, n_expert]`, src1 `[K, r, n_tokens]` with r = 1
/// (broadcast) or n_used, ids I32 `[n_used, n_tokens]`, dst F32 `[M, n_used, n_tokens]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MoeShape {
    /// Contraction.
    pub k: usize,
    /// Rows of one expert.
    pub m: usize,
    /// Experts in src0.
    pub n_expert: usize,
    /// Experts each token uses.
    pub n_used: usize,
    /// src1 rows per token (1 or n_used).
    pub r: usize,
    /// Tokens.
    pub n_tokens: usize,
    /// Experts stored back to back (`nb[2] = M * nb[1]`): consecutive experts are one
    /// `[K, g * M]` matrix, so they can run as a pack (`ane_plan::moe`).
    pub stacked: bool,
}

/// Decides whether a MUL_MAT_ID is claimed: each expert's product must be a MUL_MAT the device
/// computes ([`mul_mat`] on one expert against the gathered rows), src1 F32 with contiguous
/// rows, ids I32, dst F32 with contiguous rows; the batch is the token count.
pub fn mul_mat_id(
    src0: &TensorDesc,
    src1: &TensorDesc,
    ids: &TensorDesc,
    dst: &TensorDesc,
    src0_info: Option<TypeInfo>,
    policy: Policy,
) -> Result<MoeShape, Decline> {
    if src1.ty != GGML_TYPE_F32 || src1.nb[0] != 4 {
        return Err(Decline::Src1Type);
    }
    if dst.ty != GGML_TYPE_F32 || dst.nb[0] != 4 {
        return Err(Decline::DstType);
    }
    if ids.ty != GGML_TYPE_I32 || ids.nb[0] != 4 {
        return Err(Decline::Shape);
    }
    if [src0.ne, src1.ne, ids.ne].iter().flatten().any(|&d| d <= 0) {
        return Err(Decline::Empty);
    }
    let [k, m, n_expert, e3] = src0.ne.map(|v| v as usize);
    let [k1, r, n_tokens, b3] = src1.ne.map(|v| v as usize);
    let [n_used, n_tok_ids, i2, i3] = ids.ne.map(|v| v as usize);
    let shape_ok = k == k1
        && e3 == 1
        && b3 == 1
        && i2 == 1
        && i3 == 1
        && n_tok_ids == n_tokens
        && (r == 1 || r == n_used)
        && n_used <= n_expert
        && dst.ne == [m as i64, n_used as i64, n_tokens as i64, 1];
    if !shape_ok {
        return Err(Decline::Shape);
    }
    let expert = TensorDesc {
        ne: [k as i64, m as i64, 1, 1],
        nb: [src0.nb[0], src0.nb[1], src0.nb[1] * m, src0.nb[1] * m],
        ty: src0.ty,
    };
    let rows = TensorDesc::contiguous(GGML_TYPE_F32, 4, [k as i64, n_tokens as i64, 1, 1]);
    let out = TensorDesc::contiguous(GGML_TYPE_F32, 4, [m as i64, n_tokens as i64, 1, 1]);
    mul_mat(&expert, &rows, &out, src0_info, Policy { min_batch: 0 })?;
    if n_tokens < policy.min_batch {
        return Err(Decline::SmallBatch);
    }
    if policy.min_batch > 0 && m * n_used * n_tokens < MIN_OUTPUTS as usize {
        return Err(Decline::TinyOutput);
    }
    Ok(MoeShape {
        k,
        m,
        n_expert,
        n_used,
        r,
        n_tokens,
        stacked: src0.nb[2] == src0.nb[1] * m,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ffi::{GGML_TYPE_F32, GGML_TYPE_I32};

    const POLICY: Policy = Policy { min_batch: 64 };
    const PLAIN: TypeInfo = TypeInfo {
        blck_size: 1,
        type_size: 4,
        to_float: None,
    };

    fn mm(k: i64, m: i64, n: i64) -> (TensorDesc, TensorDesc, TensorDesc) {
        (
            TensorDesc::contiguous(GGML_TYPE_F32, 4, [k, m, 1, 1]),
            TensorDesc::contiguous(GGML_TYPE_F32, 4, [k, n, 1, 1]),
            TensorDesc::contiguous(GGML_TYPE_F32, 4, [m, n, 1, 1]),
        )
    }

    fn moe(
        k: i64,
        m: i64,
        n_expert: i64,
        n_used: i64,
        r: i64,
        n: i64,
    ) -> (TensorDesc, TensorDesc, TensorDesc, TensorDesc) {
        let mut ids = TensorDesc::contiguous(GGML_TYPE_I32, 4, [n_used, n, 1, 1]);
        // A strided view of an argsort over every expert, as llama.cpp makes it.
        ids.nb[1] = 4 * n_expert as usize;
        (
            TensorDesc::contiguous(GGML_TYPE_F32, 4, [k, m, n_expert, 1]),
            TensorDesc::contiguous(GGML_TYPE_F32, 4, [k, r, n, 1]),
            ids,
            TensorDesc::contiguous(GGML_TYPE_F32, 4, [m, n_used, n, 1]),
        )
    }

    #[test]
    fn mul_mat_id_claims_prefill_expert_products() {
        let (a, b, ids, d) = moe(256, 128, 8, 2, 1, 64);
        let s = mul_mat_id(&a, &b, &ids, &d, Some(PLAIN), POLICY).unwrap();
        assert_eq!(
            (s.k, s.m, s.n_expert, s.n_used, s.r, s.n_tokens),
            (256, 128, 8, 2, 1, 64)
        );
        // down projections: one src1 row per used expert.
        let (a, b, ids, d) = moe(256, 128, 8, 2, 2, 64);
        assert_eq!(
            mul_mat_id(&a, &b, &ids, &d, Some(PLAIN), POLICY).unwrap().r,
            2
        );
        // decode, wrong dst, F16 src1, bad ids, r neither 1 nor n_used
        let (a, b, ids, d) = moe(256, 128, 8, 2, 1, 1);
        assert_eq!(
            mul_mat_id(&a, &b, &ids, &d, Some(PLAIN), POLICY),
            Err(Decline::SmallBatch)
        );
        let (a, b, ids, _) = moe(256, 128, 8, 2, 1, 64);
        let wrong = TensorDesc::contiguous(GGML_TYPE_F32, 4, [128, 3, 64, 1]);
        assert_eq!(
            mul_mat_id(&a, &b, &ids, &wrong, Some(PLAIN), POLICY),
            Err(Decline::Shape)
        );
        let (a, mut b, ids, d) = moe(256, 128, 8, 2, 1, 64);
        b.ty = crate::ffi::GGML_TYPE_F16;
        assert_eq!(
            mul_mat_id(&a, &b, &ids, &d, Some(PLAIN), POLICY),
            Err(Decline::Src1Type)
        );
        let (a, b, mut ids, d) = moe(256, 128, 8, 2, 1, 64);
        ids.ty = GGML_TYPE_F32;
        assert_eq!(
            mul_mat_id(&a, &b, &ids, &d, Some(PLAIN), POLICY),
            Err(Decline::Shape)
        );
        let (a, b, ids, d) = moe(256, 128, 8, 2, 3, 64);
        assert_eq!(
            mul_mat_id(&a, &b, &ids, &d, Some(PLAIN), POLICY),
            Err(Decline::Shape)
        );
        // an expert type without a conversion is declined like a MUL_MAT's
        let (mut a, b, ids, d) = moe(256, 128, 8, 2, 1, 64);
        a.ty = 15; // Q8_K: no to_float in the traits given
        assert_eq!(
            mul_mat_id(&a, &b, &ids, &d, Some(PLAIN), POLICY),
            Err(Decline::Src0Type)
        );
    }

    #[test]
    fn prefill_is_claimed_decode_is_not() {
        let (a, b, d) = mm(256, 512, 128);
        assert_eq!(mul_mat(&a, &b, &d, Some(PLAIN), POLICY), Ok(()));
        let (a, b, d) = mm(256, 512, 1);
        assert_eq!(
            mul_mat(&a, &b, &d, Some(PLAIN), POLICY),
            Err(Decline::SmallBatch)
        );
    }

    #[test]
    fn tiny_outputs_are_declined_but_still_computable() {
        let one = Policy { min_batch: 1 };
        let (a, b, d) = mm(2048, 1, 1);
        assert_eq!(
            mul_mat(&a, &b, &d, Some(PLAIN), one),
            Err(Decline::TinyOutput)
        );
        let (a, b, d) = mm(2048, 1, 16);
        assert_eq!(mul_mat(&a, &b, &d, Some(PLAIN), one), Ok(()));
        // graph_compute re-checks with min_batch 0: whatever the scheduler sent is computed.
        let (a, b, d) = mm(2048, 1, 1);
        assert_eq!(
            mul_mat(&a, &b, &d, Some(PLAIN), Policy { min_batch: 0 }),
            Ok(())
        );
    }

    #[test]
    fn declines_name_their_reason() {
        let (a, b, mut d) = mm(256, 512, 128);
        d.ty = GGML_TYPE_F16;
        assert_eq!(
            mul_mat(&a, &b, &d, Some(PLAIN), POLICY),
            Err(Decline::DstType)
        );
        let (a, mut b, d) = mm(256, 512, 128);
        b.ty = 8;
        assert_eq!(
            mul_mat(&a, &b, &d, Some(PLAIN), POLICY),
            Err(Decline::Src1Type)
        );
        let (mut a, b, d) = mm(256, 512, 128);
        a.ty = 8; // Q8_0 without to_float
        assert_eq!(
            mul_mat(
                &a,
                &b,
                &d,
                Some(TypeInfo {
                    blck_size: 32,
                    type_size: 34,
                    to_float: None
                }),
                POLICY
            ),
            Err(Decline::Src0Type)
        );
        // Rows beyond any chip's axis limit are tiled, not declined.
        let (a, b, d) = mm(256, 152000, 128);
        assert_eq!(mul_mat(&a, &b, &d, Some(PLAIN), POLICY), Ok(()));
        let (a, b, d) = mm(256, 512, 128);
        let b2 = TensorDesc {
            ne: [255, 128, 1, 1],
            ..b
        };
        assert_eq!(
            mul_mat(&a, &b2, &d, Some(PLAIN), POLICY),
            Err(Decline::Shape)
        );
        let (a, b, d) = mm(0, 512, 128);
        assert_eq!(
            mul_mat(&a, &b, &d, Some(PLAIN), POLICY),
            Err(Decline::Empty)
        );
    }

    #[test]
    fn broadcast_must_be_integral() {
        let a = TensorDesc::contiguous(GGML_TYPE_F32, 4, [64, 64, 2, 1]);
        let b = TensorDesc::contiguous(GGML_TYPE_F32, 4, [64, 64, 6, 1]);
        let d = TensorDesc::contiguous(GGML_TYPE_F32, 4, [64, 64, 6, 1]);
        assert_eq!(mul_mat(&a, &b, &d, Some(PLAIN), POLICY), Ok(()));
        let b = TensorDesc::contiguous(GGML_TYPE_F32, 4, [64, 64, 5, 1]);
        let d = TensorDesc::contiguous(GGML_TYPE_F32, 4, [64, 64, 5, 1]);
        assert_eq!(
            mul_mat(&a, &b, &d, Some(PLAIN), POLICY),
            Err(Decline::Shape)
        );
    }
}
