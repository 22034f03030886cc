//! Type checking and execution of one parsed MIL function with ANE numerics.
//!
//! Numerics (the documented behaviour of the ANE, ane-private-api.md §5.4): every tensor is stored
//! as fp16 unless its MIL type is fp32 (only the I/O `cast` boundary has fp32); products are
//! accumulated in fp32 and the result is rounded once to fp16. Conversion of a value above 65504 to
//! fp16 gives ±inf, as on the chip. [`Numerics`] adds the two documented matmul effects: the output
//! cliff (on by default) and, optionally, fp16 accumulation.

use std::collections::HashMap;
use std::sync::Arc;

use ane_mil::{Arg, DType, Function, Literal, Scalar, Statement, ValueType};
use half::f16;

use crate::EngineError;

/// A runtime value.
#[derive(Clone, Debug)]
pub(crate) enum Value {
    /// A numeric tensor (fp16 or fp32), values widened to f32 (fp16 ones are exact).
    Num { ty: ValueType, data: Arc<Vec<f32>> },
    /// Integer scalar or tensor (shapes, perms, axes).
    Ints { ty: ValueType, data: Vec<i64> },
    /// Boolean scalar.
    Bool(bool),
    /// String scalar.
    Str(String),
}

impl Value {
    fn ty(&self) -> ValueType {
        match self {
            Value::Num { ty, .. } | Value::Ints { ty, .. } => ty.clone(),
            Value::Bool(_) => ValueType::scalar(DType::Bool),
            Value::Str(_) => ValueType::scalar(DType::String),
        }
    }
}

/// Magnitude from which a matmul output becomes ±inf on the ANE (ane-private-api.md §5.4: "about
/// 32752-32759 becomes inf, independent of K", measured on M1 to M5 Pro). 32752 is the largest
/// fp16 value below 32768, so every output that rounds to 32752 or above is hit.
pub const MATMUL_OUTPUT_CLIFF: f32 = 32752.0;

/// How matmul products are accumulated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Accum {
    /// fp32 accumulation, one rounding to fp16 at the end (the default: what the ANE's results
    /// look like at small K).
    #[default]
    Fp32,
    /// Every partial sum rounded to fp16: a pessimistic model of the error growth with K that
    /// ANEForge measured (relative error 0.0026 at 512 to 0.062 at 8192), for accuracy studies.
    Fp16,
}

/// Numeric behaviour of the reference engine's matmul beyond fp16 storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Numerics {
    /// Outputs of magnitude >= [`MATMUL_OUTPUT_CLIFF`] become ±inf (on by default: documented
    /// ANE behaviour that the plugin's numeric guard must see on Linux).
    pub output_cliff: bool,
    /// Accumulation precision.
    pub accum: Accum,
}

impl Default for Numerics {
    fn default() -> Self {
        Numerics {
            output_cliff: true,
            accum: Accum::Fp32,
        }
    }
}

/// Resolves a BLOBFILE reference (path, descriptor offset) to the blob's dtype and bytes.
pub(crate) type BlobResolver<'a> = dyn Fn(&str, u64) -> Result<(DType, Vec<u8>), EngineError> + 'a;

/// Rounds to the nearest fp16 and widens back: the effect of storing a value as fp16.
pub(crate) fn round_fp16(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

fn store(dtype: DType, mut data: Vec<f32>) -> Vec<f32> {
    if dtype == DType::Fp16 {
        data.iter_mut().for_each(|v| *v = round_fp16(*v));
    }
    data
}

/// A function checked against the chip rules, with its constants materialised.
#[derive(Debug)]
pub(crate) struct Checked {
    pub(crate) func: Function,
    /// Constant values by name.
    consts: HashMap<String, Value>,
}

/// Decodes a literal into a value; `blob` resolves BLOBFILE references to (dtype, bytes).
fn literal_value(lit: &Literal, blob: &BlobResolver<'_>) -> Result<Value, EngineError> {
    let bad = |what: &str| EngineError::Compile(format!("unsupported literal: {what}"));
    Ok(match lit {
        Literal::Scalar(DType::Bool, Scalar::Bool(b)) => Value::Bool(*b),
        Literal::Scalar(DType::String, Scalar::Str(s)) => Value::Str(s.clone()),
        Literal::Scalar(d @ (DType::Fp16 | DType::Fp32), s) => Value::Num {
            ty: ValueType::scalar(*d),
            data: Arc::new(store(
                *d,
                vec![scalar_f32(s).ok_or_else(|| bad("float value"))?],
            )),
        },
        Literal::Scalar(d, Scalar::Int(i)) => Value::Ints {
            ty: ValueType::scalar(*d),
            data: vec![*i],
        },
        Literal::Tensor(ty, vals) => {
            if vals.len() != ty.numel() {
                return Err(EngineError::Compile(format!(
                    "inline tensor has {} values for type with {} elements",
                    vals.len(),
                    ty.numel()
                )));
            }
            match ty.dtype {
                DType::Fp16 | DType::Fp32 => Value::Num {
                    ty: ty.clone(),
                    data: Arc::new(store(
                        ty.dtype,
                        vals.iter()
                            .map(|s| scalar_f32(s).ok_or_else(|| bad("float element")))
                            .collect::<Result<_, _>>()?,
                    )),
                },
                DType::Int32 | DType::Int8 | DType::UInt8 | DType::UInt64 => Value::Ints {
                    ty: ty.clone(),
                    data: vals
                        .iter()
                        .map(|s| match s {
                            Scalar::Int(i) => Ok(*i),
                            _ => Err(bad("integer element")),
                        })
                        .collect::<Result<_, _>>()?,
                },
                other => return Err(bad(&format!("inline tensor of {other}"))),
            }
        }
        Literal::Blob { ty, path, offset } => {
            let (dtype, bytes) = blob(path, *offset)?;
            if dtype != ty.dtype {
                return Err(EngineError::Weights(format!(
                    "blob at {path}:{offset} holds {dtype}, MIL declares {}",
                    ty.dtype
                )));
            }
            if bytes.len() != ty.byte_size() {
                return Err(EngineError::Weights(format!(
                    "blob at {path}:{offset} holds {} bytes, MIL type {:?} needs {}",
                    bytes.len(),
                    ty.shape,
                    ty.byte_size()
                )));
            }
            let data = match dtype {
                DType::Fp16 => bytes
                    .chunks_exact(2)
                    .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
                DType::Fp32 => bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
                DType::Int8 | DType::UInt8 | DType::Int4 | DType::UInt4 => {
                    return Ok(Value::Ints {
                        ty: ty.clone(),
                        data: decode_ints(ty.dtype, &bytes, ty.numel()),
                    })
                }
                other => return Err(bad(&format!("blob of {other}"))),
            };
            Value::Num {
                ty: ty.clone(),
                data: Arc::new(data),
            }
        }
        other => return Err(bad(&format!("{other:?}"))),
    })
}

/// The first `n` elements of an integer blob; sub-byte types are packed LSB first (element `2i` in
/// the low nibble of byte `i`), as MILBlob stores them.
fn decode_ints(dtype: DType, bytes: &[u8], n: usize) -> Vec<i64> {
    match dtype {
        DType::Int8 => bytes.iter().take(n).map(|&b| b as i8 as i64).collect(),
        DType::UInt8 => bytes.iter().take(n).map(|&b| b as i64).collect(),
        DType::Int4 | DType::UInt4 => (0..n)
            .map(|i| {
                let nib = (bytes[i / 2] >> (4 * (i % 2))) & 0x0f;
                if dtype == DType::Int4 {
                    (((nib << 4) as i8) >> 4) as i64
                } else {
                    nib as i64
                }
            })
            .collect(),
        _ => unreachable!("decode_ints on {dtype}"),
    }
}

/// `constexpr_blockwise_shift_scale` materialised: `out[i] = scale[b(i)] * (data[i] - offset[b(i)])`
/// where `b(i)` divides every coordinate of `i` by the block size of its axis
/// (`data.shape / scale.shape`). Computed in f32 (exact for the integer data and fp16/fp32 scales
/// the op takes at these sizes) and rounded once to the scale's dtype, as coremltools' `decompress`.
fn blockwise_shift_scale(
    data: &[i64],
    shape: &[usize],
    scale: &[f32],
    scale_shape: &[usize],
    offset: Option<&[f32]>,
    dtype: DType,
) -> Vec<f32> {
    let ds = strides(shape);
    let ss = strides(scale_shape);
    let block: Vec<usize> = shape.iter().zip(scale_shape).map(|(d, s)| d / s).collect();
    let out = data
        .iter()
        .enumerate()
        .map(|(i, &q)| {
            let b: usize = (0..shape.len())
                .map(|a| (i / ds[a]) % shape[a] / block[a] * ss[a])
                .sum();
            let o = offset.map_or(0.0, |o| o[b]);
            scale[b] * (q as f32 - o)
        })
        .collect();
    store(dtype, out)
}

/// A numeric or integer const as f32 values (integers are small here: offsets and quant data).
fn as_f32s(v: &Value) -> Option<(ValueType, Vec<f32>)> {
    match v {
        Value::Num { ty, data } => Some((ty.clone(), data.as_ref().clone())),
        Value::Ints { ty, data } => Some((ty.clone(), data.iter().map(|&i| i as f32).collect())),
        _ => None,
    }
}

/// Elementwise `add` where the operands have one shape or one of them is a single element.
fn add(x: &[f32], y: &[f32]) -> Vec<f32> {
    match (x.len(), y.len()) {
        (_, 1) => x.iter().map(|&a| a + y[0]).collect(),
        (1, _) => y.iter().map(|&b| x[0] + b).collect(),
        _ => x.iter().zip(y).map(|(&a, &b)| a + b).collect(),
    }
}

fn scalar_f32(s: &Scalar) -> Option<f32> {
    match s {
        Scalar::Float(f) => Some(*f as f32),
        Scalar::Int(i) => Some(*i as f32),
        _ => None,
    }
}

/// Static checks plus constant materialisation. `max_axis` is the chip's axis cap.
pub(crate) fn check(
    func: Function,
    max_axis: usize,
    blob: &BlobResolver<'_>,
) -> Result<Checked, EngineError> {
    let cerr = |m: String| EngineError::Compile(m);
    let mut types: HashMap<String, ValueType> = HashMap::new();
    let mut consts: HashMap<String, Value> = HashMap::new();
    let check_axes = |name: &str, ty: &ValueType| -> Result<(), EngineError> {
        if let Some(&d) = ty.shape.iter().find(|&&d| d > max_axis) {
            return Err(EngineError::Compile(format!(
                "`{name}` has an axis of {d}, over the chip limit of {max_axis}"
            )));
        }
        if ty.shape.len() > 5 {
            return Err(EngineError::Compile(format!(
                "`{name}` has rank {} > 5",
                ty.shape.len()
            )));
        }
        Ok(())
    };
    for (name, ty) in &func.inputs {
        // int8 inputs: the probe of int8 weight surfaces (`build::tiled_matmul_int8`); whether the
        // chip takes them is what its canary finds out, the reference engine runs them.
        if !matches!(ty.dtype, DType::Fp16 | DType::Fp32 | DType::Int8) || ty.is_scalar() {
            return Err(cerr(format!(
                "input `{name}` must be an fp16/fp32/int8 tensor, is {:?}",
                ty
            )));
        }
        check_axes(name, ty)?;
        if types.insert(name.clone(), ty.clone()).is_some() {
            return Err(cerr(format!("input `{name}` declared twice")));
        }
    }
    for st in &func.statements {
        if types.contains_key(&st.output) {
            return Err(cerr(format!("`{}` defined twice", st.output)));
        }
        check_axes(&st.output, &st.ty)?;
        let inferred = if st.op == "const" {
            let lit = st
                .attr("val")
                .ok_or_else(|| cerr(format!("const `{}` has no val", st.output)))?;
            let v = literal_value(lit, blob)?;
            let ty = v.ty();
            consts.insert(st.output.clone(), v);
            ty
        } else {
            let ty = infer(st, &types, &consts)?;
            if let Some(v) = fold(st, &ty, &consts)? {
                consts.insert(st.output.clone(), v);
            }
            ty
        };
        if inferred != st.ty {
            return Err(cerr(format!(
                "`{}` = {}(...) declared {} {:?}, inferred {} {:?}",
                st.output, st.op, st.ty.dtype, st.ty.shape, inferred.dtype, inferred.shape
            )));
        }
        types.insert(st.output.clone(), st.ty.clone());
    }
    // Binding order is the driver plan's business (crate::driver_plan); here only the types.
    for o in &func.outputs {
        let ty = types
            .get(o)
            .ok_or_else(|| cerr(format!("returned `{o}` is not defined")))?;
        if !matches!(ty.dtype, DType::Fp16 | DType::Fp32) || ty.is_scalar() {
            return Err(cerr(format!("output `{o}` must be an fp16/fp32 tensor")));
        }
    }
    if func.outputs.is_empty() {
        return Err(cerr("function returns nothing".into()));
    }
    Ok(Checked { func, consts })
}

/// The `x` and `y` operands of an elementwise op (`add`, `mul`): its only arguments, of one
/// fp16/fp32 dtype.
fn float_operands<'a>(
    st: &Statement,
    types: &'a HashMap<String, ValueType>,
) -> Result<(&'a ValueType, &'a ValueType), EngineError> {
    only_args(st, &["x", "y"])?;
    let x = var_type(st, "x", types)?;
    let y = var_type(st, "y", types)?;
    if x.dtype != y.dtype || !matches!(x.dtype, DType::Fp16 | DType::Fp32) {
        return Err(EngineError::Compile(format!(
            "`{}` = {}: operands must share an fp16/fp32 dtype, have {} and {}",
            st.output, st.op, x.dtype, y.dtype
        )));
    }
    Ok((x, y))
}

fn var_type<'a>(
    st: &Statement,
    arg: &str,
    types: &'a HashMap<String, ValueType>,
) -> Result<&'a ValueType, EngineError> {
    match st.arg(arg) {
        Some(Arg::Var(v)) => types.get(v).ok_or_else(|| {
            EngineError::Compile(format!(
                "`{}`: `{arg}` refers to undefined `{v}`",
                st.output
            ))
        }),
        Some(_) => Err(EngineError::Compile(format!(
            "`{}`: `{arg}` must be a named value",
            st.output
        ))),
        None => Err(EngineError::Compile(format!(
            "`{}` = {}: missing argument `{arg}`",
            st.output, st.op
        ))),
    }
}

/// An argument that must be a compile-time constant (named const or inline literal).
fn const_arg<'a>(
    st: &'a Statement,
    arg: &str,
    consts: &'a HashMap<String, Value>,
) -> Result<Value, EngineError> {
    match st.arg(arg) {
        Some(Arg::Var(v)) => consts.get(v).cloned().ok_or_else(|| {
            EngineError::Compile(format!(
                "`{}`: `{arg}` must be a const, `{v}` is not",
                st.output
            ))
        }),
        Some(Arg::Literal(l)) => literal_value(l, &|_, _| {
            Err(EngineError::Compile(
                "BLOBFILE not allowed inline in an op argument".into(),
            ))
        }),
        _ => Err(EngineError::Compile(format!(
            "`{}` = {}: missing argument `{arg}`",
            st.output, st.op
        ))),
    }
}

fn ints(v: &Value, what: &str) -> Result<Vec<i64>, EngineError> {
    match v {
        Value::Ints { data, .. } => Ok(data.clone()),
        _ => Err(EngineError::Compile(format!("`{what}` must be integers"))),
    }
}

fn only_args(st: &Statement, allowed: &[&str]) -> Result<(), EngineError> {
    for (n, _) in &st.args {
        if !allowed.contains(&n.as_str()) {
            return Err(EngineError::Compile(format!(
                "`{}` = {}: unsupported argument `{n}`",
                st.output, st.op
            )));
        }
    }
    Ok(())
}

/// Compile-time values: every `constexpr_*` op, and an `add` of two consts (the
/// `add(x = constexpr, y = 0)` route of compressed weights), are materialised once here, as the
/// ANE compiler does; `run` then finds them among the consts and never executes them.
fn fold(
    st: &Statement,
    ty: &ValueType,
    consts: &HashMap<String, Value>,
) -> Result<Option<Value>, EngineError> {
    let cerr = |m: &str| EngineError::Compile(format!("`{}` = {}: {m}", st.output, st.op));
    match st.op.as_str() {
        "constexpr_blockwise_shift_scale" => {
            let Value::Ints { ty: dt, data } = const_arg(st, "data", consts)? else {
                return Err(cerr("data must be an integer const"));
            };
            let (st_ty, scale) = as_f32s(&const_arg(st, "scale", consts)?)
                .ok_or_else(|| cerr("scale must be numeric"))?;
            let offset = match st.arg("offset") {
                Some(_) => Some(
                    as_f32s(&const_arg(st, "offset", consts)?)
                        .ok_or_else(|| cerr("offset must be numeric"))?
                        .1,
                ),
                None => None,
            };
            let data = blockwise_shift_scale(
                &data,
                &dt.shape,
                &scale,
                &st_ty.shape,
                offset.as_deref(),
                ty.dtype,
            );
            Ok(Some(Value::Num {
                ty: ty.clone(),
                data: Arc::new(data),
            }))
        }
        "add" => {
            let val = |n: &str| match st.arg(n) {
                Some(Arg::Var(v)) => consts.get(v).and_then(as_f32s),
                _ => None,
            };
            Ok(match (val("x"), val("y")) {
                (Some((_, x)), Some((_, y))) => Some(Value::Num {
                    ty: ty.clone(),
                    data: Arc::new(store(ty.dtype, add(&x, &y))),
                }),
                _ => None,
            })
        }
        _ => Ok(None),
    }
}

/// Type inference for the ops the reference engine executes.
fn infer(
    st: &Statement,
    types: &HashMap<String, ValueType>,
    consts: &HashMap<String, Value>,
) -> Result<ValueType, EngineError> {
    let cerr = |m: String| EngineError::Compile(format!("`{}` = {}: {m}", st.output, st.op));
    match st.op.as_str() {
        "cast" => {
            only_args(st, &["x", "dtype"])?;
            let x = var_type(st, "x", types)?;
            if !matches!(x.dtype, DType::Fp16 | DType::Fp32 | DType::Int8) {
                return Err(cerr(format!("cast from {} not supported", x.dtype)));
            }
            let Value::Str(d) = const_arg(st, "dtype", consts)? else {
                return Err(cerr("dtype must be a string".into()));
            };
            let dtype = match d.as_str() {
                "fp16" => DType::Fp16,
                "fp32" => DType::Fp32,
                other => return Err(cerr(format!("cast to {other} not supported"))),
            };
            Ok(ValueType {
                dtype,
                shape: x.shape.clone(),
            })
        }
        "conv" => {
            only_args(
                st,
                &[
                    "x",
                    "weight",
                    "strides",
                    "pad_type",
                    "pad",
                    "dilations",
                    "groups",
                ],
            )?;
            let x = var_type(st, "x", types)?;
            let w = var_type(st, "weight", types)?;
            if x.shape.len() != 4 || w.shape.len() != 4 {
                return Err(cerr("only 2-D conv on rank-4 x and weight".into()));
            }
            if x.dtype != DType::Fp16 || w.dtype != DType::Fp16 {
                return Err(cerr("conv computes in fp16 only".into()));
            }
            if w.shape[2] != 1 || w.shape[3] != 1 {
                return Err(cerr("reference engine runs 1x1 kernels only".into()));
            }
            if w.shape[1] != x.shape[1] {
                return Err(cerr(format!(
                    "weight in-channels {} != x channels {}",
                    w.shape[1], x.shape[1]
                )));
            }
            for (arg, want) in [("strides", vec![1, 1]), ("dilations", vec![1, 1])] {
                if st.arg(arg).is_some() && ints(&const_arg(st, arg, consts)?, arg)? != want {
                    return Err(cerr(format!("{arg} must be [1, 1]")));
                }
            }
            if st.arg("groups").is_some()
                && ints(&const_arg(st, "groups", consts)?, "groups")? != vec![1]
            {
                return Err(cerr("groups must be 1".into()));
            }
            if st.arg("pad").is_some()
                && ints(&const_arg(st, "pad", consts)?, "pad")?
                    .iter()
                    .any(|&p| p != 0)
            {
                return Err(cerr("pad must be zero".into()));
            }
            match const_arg(st, "pad_type", consts)? {
                Value::Str(s) if s == "valid" || s == "custom" || s == "same" => {}
                _ => return Err(cerr("pad_type must be valid/custom/same".into())),
            }
            Ok(ValueType::tensor(
                DType::Fp16,
                &[x.shape[0], w.shape[0], x.shape[2], x.shape[3]],
            ))
        }
        "constexpr_blockwise_shift_scale" => {
            only_args(st, &["data", "scale", "offset"])?;
            let data = const_arg(st, "data", consts)?;
            let Value::Ints { ty: dt, .. } = &data else {
                return Err(cerr("data must be an int4/uint4/int8/uint8 const".into()));
            };
            if !matches!(
                dt.dtype,
                DType::Int4 | DType::UInt4 | DType::Int8 | DType::UInt8
            ) {
                return Err(cerr(format!("data dtype {} not supported", dt.dtype)));
            }
            let scale = const_arg(st, "scale", consts)?.ty();
            if !matches!(scale.dtype, DType::Fp16 | DType::Fp32) {
                return Err(cerr("scale must be fp16 or fp32".into()));
            }
            if scale.shape.len() != dt.shape.len() || dt.shape.is_empty() {
                return Err(cerr(format!(
                    "data and scale need the same rank >= 1, have {:?} and {:?}",
                    dt.shape, scale.shape
                )));
            }
            if dt
                .shape
                .iter()
                .zip(&scale.shape)
                .any(|(&d, &s)| s == 0 || d % s != 0)
            {
                return Err(cerr(format!(
                    "scale shape {:?} does not divide data shape {:?} into blocks",
                    scale.shape, dt.shape
                )));
            }
            if st.arg("offset").is_some() {
                let off = const_arg(st, "offset", consts)?.ty();
                if off.shape != scale.shape {
                    return Err(cerr("offset shape must equal scale shape".into()));
                }
                if !matches!(off.dtype, DType::Fp16 | DType::Fp32) && off.dtype != dt.dtype {
                    return Err(cerr("an integer offset must have the data's dtype".into()));
                }
            }
            Ok(ValueType {
                dtype: scale.dtype,
                shape: dt.shape.clone(),
            })
        }
        "add" => {
            let (x, y) = float_operands(st, types)?;
            let shape = if y.numel() == 1 && y.shape.len() <= x.shape.len() {
                x.shape.clone()
            } else if x.numel() == 1 && x.shape.len() <= y.shape.len() {
                y.shape.clone()
            } else if x.shape == y.shape {
                x.shape.clone()
            } else {
                return Err(cerr(format!(
                    "reference engine adds equal shapes or a single element, not {:?} and {:?}",
                    x.shape, y.shape
                )));
            };
            Ok(ValueType {
                dtype: x.dtype,
                shape,
            })
        }
        "mul" => {
            let (x, y) = float_operands(st, types)?;
            let shape = broadcast(&x.shape, &y.shape).ok_or_else(|| {
                cerr(format!(
                    "shapes {:?} and {:?} do not broadcast",
                    x.shape, y.shape
                ))
            })?;
            Ok(ValueType {
                dtype: x.dtype,
                shape,
            })
        }
        "matmul" => {
            only_args(st, &["x", "y", "transpose_x", "transpose_y"])?;
            let x = var_type(st, "x", types)?;
            let y = var_type(st, "y", types)?;
            let flag = |n: &str| -> Result<bool, EngineError> {
                match st.arg(n) {
                    None => Ok(false),
                    // Orion: inline bools are rejected by the ANE compiler; only named consts work.
                    Some(Arg::Var(_)) => match const_arg(st, n, consts)? {
                        Value::Bool(b) => Ok(b),
                        _ => Err(cerr(format!("{n} must be bool"))),
                    },
                    Some(_) => Err(cerr(format!("{n} must be a named const, not inline"))),
                }
            };
            let (tx, ty_) = (flag("transpose_x")?, flag("transpose_y")?);
            if x.shape.len() < 2 || y.shape.len() < 2 {
                return Err(cerr("rank-1 operands not supported".into()));
            }
            if x.dtype != y.dtype {
                return Err(cerr("x and y dtypes differ".into()));
            }
            let (xr, xc) = mat_dims(&x.shape, tx);
            let (yr, yc) = mat_dims(&y.shape, ty_);
            if xc != yr {
                return Err(cerr(format!("contraction mismatch {xc} vs {yr}")));
            }
            let batch = broadcast(&x.shape[..x.shape.len() - 2], &y.shape[..y.shape.len() - 2])
                .ok_or_else(|| cerr("batch dims do not broadcast".into()))?;
            let mut shape = batch;
            shape.extend([xr, yc]);
            Ok(ValueType {
                dtype: x.dtype,
                shape,
            })
        }
        "transpose" => {
            only_args(st, &["x", "perm"])?;
            let x = var_type(st, "x", types)?;
            let perm = ints(&const_arg(st, "perm", consts)?, "perm")?;
            let mut seen = vec![false; x.shape.len()];
            if perm.len() != x.shape.len()
                || perm.iter().any(|&p| {
                    p < 0
                        || p as usize >= seen.len()
                        || std::mem::replace(&mut seen[p as usize], true)
                })
            {
                return Err(cerr(format!(
                    "perm {perm:?} is not a permutation of rank {}",
                    x.shape.len()
                )));
            }
            Ok(ValueType {
                dtype: x.dtype,
                shape: perm.iter().map(|&p| x.shape[p as usize]).collect(),
            })
        }
        "reshape" => {
            only_args(st, &["x", "shape"])?;
            let x = var_type(st, "x", types)?;
            let shape = ints(&const_arg(st, "shape", consts)?, "shape")?;
            if shape.iter().any(|&d| d <= 0) {
                return Err(cerr("shape must be explicit positive dims".into()));
            }
            let shape: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
            if shape.iter().product::<usize>() != x.numel() {
                return Err(cerr(format!(
                    "reshape {:?} -> {:?} changes the element count",
                    x.shape, shape
                )));
            }
            Ok(ValueType {
                dtype: x.dtype,
                shape,
            })
        }
        other => Err(EngineError::Compile(format!(
            "op `{other}` is not supported by the reference engine"
        ))),
    }
}

fn mat_dims(shape: &[usize], transposed: bool) -> (usize, usize) {
    let (r, c) = (shape[shape.len() - 2], shape[shape.len() - 1]);
    if transposed {
        (c, r)
    } else {
        (r, c)
    }
}

fn broadcast(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let n = a.len().max(b.len());
    (0..n)
        .map(|i| {
            let da = if i + a.len() >= n {
                a[i + a.len() - n]
            } else {
                1
            };
            let db = if i + b.len() >= n {
                b[i + b.len() - n]
            } else {
                1
            };
            match (da, db) {
                (x, y) if x == y => Some(x),
                (1, y) => Some(y),
                (x, 1) => Some(x),
                _ => None,
            }
        })
        .collect()
}

/// Executes a checked function on inputs given in *declaration* order of the parameters.
pub(crate) fn run(
    c: &Checked,
    inputs: Vec<Vec<f32>>,
    numerics: Numerics,
) -> Result<Vec<Vec<f32>>, EngineError> {
    let mut env: HashMap<&str, Value> = HashMap::new();
    for ((name, ty), data) in c.func.inputs.iter().zip(inputs) {
        env.insert(
            name,
            Value::Num {
                ty: ty.clone(),
                data: Arc::new(store(ty.dtype, data)),
            },
        );
    }
    for st in &c.func.statements {
        let v = match c.consts.get(&st.output) {
            Some(v) => v.clone(),
            None => exec(st, &env, &c.consts, numerics)?,
        };
        env.insert(&st.output, v);
    }
    c.func
        .outputs
        .iter()
        .map(|o| match env.get(o.as_str()) {
            Some(Value::Num { data, .. }) => Ok(data.as_ref().clone()),
            _ => Err(EngineError::Eval(format!(
                "output `{o}` has no numeric value"
            ))),
        })
        .collect()
}

fn num<'a>(
    st: &Statement,
    arg: &str,
    env: &'a HashMap<&str, Value>,
) -> Result<(&'a ValueType, &'a [f32]), EngineError> {
    let Some(Arg::Var(v)) = st.arg(arg) else {
        return Err(EngineError::Eval(format!(
            "`{}`: `{arg}` not a named value",
            st.output
        )));
    };
    match env.get(v.as_str()) {
        Some(Value::Num { ty, data }) => Ok((ty, data.as_slice())),
        _ => Err(EngineError::Eval(format!(
            "`{}`: `{v}` is not a numeric tensor",
            st.output
        ))),
    }
}

fn exec(
    st: &Statement,
    env: &HashMap<&str, Value>,
    consts: &HashMap<String, Value>,
    numerics: Numerics,
) -> Result<Value, EngineError> {
    let out = |data: Vec<f32>| Value::Num {
        ty: st.ty.clone(),
        data: Arc::new(store(st.ty.dtype, data)),
    };
    Ok(match st.op.as_str() {
        "cast" => out(num(st, "x", env)?.1.to_vec()),
        "reshape" => out(num(st, "x", env)?.1.to_vec()),
        "add" => out(add(num(st, "x", env)?.1, num(st, "y", env)?.1)),
        "mul" => {
            let (xt, x) = num(st, "x", env)?;
            let (yt, y) = num(st, "y", env)?;
            out(mul(x, &xt.shape, y, &yt.shape, &st.ty.shape))
        }
        "transpose" => {
            let (xt, x) = num(st, "x", env)?;
            let perm: Vec<usize> = ints(&const_arg(st, "perm", consts)?, "perm")?
                .iter()
                .map(|&p| p as usize)
                .collect();
            out(transpose(x, &xt.shape, &perm))
        }
        "conv" => {
            let (xt, x) = num(st, "x", env)?;
            let (wt, w) = num(st, "weight", env)?;
            let (b, c, h, wd) = (xt.shape[0], xt.shape[1], xt.shape[2], xt.shape[3]);
            let o = wt.shape[0];
            let s = h * wd;
            let mut y = vec![0f32; b * o * s];
            let mut acc = vec![0f32; s];
            for bi in 0..b {
                let xb = &x[bi * c * s..(bi + 1) * c * s];
                for oi in 0..o {
                    acc.iter_mut().for_each(|a| *a = 0.0);
                    let wrow = &w[oi * c..(oi + 1) * c];
                    for (ci, &wv) in wrow.iter().enumerate() {
                        let xr = &xb[ci * s..(ci + 1) * s];
                        for (a, &xv) in acc.iter_mut().zip(xr) {
                            *a += wv * xv;
                        }
                    }
                    y[(bi * o + oi) * s..(bi * o + oi + 1) * s].copy_from_slice(&acc);
                }
            }
            out(y)
        }
        "matmul" => {
            let (xt, x) = num(st, "x", env)?;
            let (yt, y) = num(st, "y", env)?;
            let flag = |n: &str| -> bool {
                matches!(
                    st.arg(n).map(|_| const_arg(st, n, consts)),
                    Some(Ok(Value::Bool(true)))
                )
            };
            let mut v = out(matmul(
                x,
                &xt.shape,
                flag("transpose_x"),
                y,
                &yt.shape,
                flag("transpose_y"),
                &st.ty.shape,
                numerics.accum,
            ));
            if numerics.output_cliff {
                if let Value::Num { data, .. } = &mut v {
                    for d in Arc::make_mut(data) {
                        if d.abs() >= MATMUL_OUTPUT_CLIFF {
                            *d = f32::INFINITY.copysign(*d);
                        }
                    }
                }
            }
            v
        }
        other => return Err(EngineError::Eval(format!("op `{other}` not executable"))),
    })
}

/// Elementwise product with numpy broadcasting to `out_shape`: each product is exact in f32 for
/// the operands met here (an int8 weight times an fp16 scale) and rounded once by `store`.
fn mul(x: &[f32], xs: &[usize], y: &[f32], ys: &[usize], out_shape: &[usize]) -> Vec<f32> {
    // Strides of an operand inside the output's index space: 0 along its broadcast axes.
    let bstrides = |s: &[usize]| -> Vec<usize> {
        let own = strides(s);
        let lead = out_shape.len() - s.len();
        (0..out_shape.len())
            .map(|d| {
                if d < lead || s[d - lead] == 1 {
                    0
                } else {
                    own[d - lead]
                }
            })
            .collect()
    };
    let (sx, sy) = (bstrides(xs), bstrides(ys));
    let n: usize = out_shape.iter().product();
    let mut idx = vec![0usize; out_shape.len()];
    let mut out = Vec::with_capacity(n);
    let (mut ox, mut oy) = (0usize, 0usize);
    for _ in 0..n {
        out.push(x[ox] * y[oy]);
        for d in (0..idx.len()).rev() {
            idx[d] += 1;
            ox += sx[d];
            oy += sy[d];
            if idx[d] < out_shape[d] {
                break;
            }
            ox -= sx[d] * idx[d];
            oy -= sy[d] * idx[d];
            idx[d] = 0;
        }
    }
    out
}

fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

fn transpose(x: &[f32], shape: &[usize], perm: &[usize]) -> Vec<f32> {
    let in_strides = strides(shape);
    let out_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
    let n = x.len();
    let mut y = Vec::with_capacity(n);
    let mut idx = vec![0usize; out_shape.len()];
    for _ in 0..n {
        let src: usize = idx
            .iter()
            .enumerate()
            .map(|(d, &i)| i * in_strides[perm[d]])
            .sum();
        y.push(x[src]);
        for d in (0..idx.len()).rev() {
            idx[d] += 1;
            if idx[d] < out_shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    y
}

#[allow(clippy::too_many_arguments)]
fn matmul(
    x: &[f32],
    xs: &[usize],
    tx: bool,
    y: &[f32],
    ys: &[usize],
    ty: bool,
    out_shape: &[usize],
    accum: Accum,
) -> Vec<f32> {
    let r = out_shape.len();
    // fp16 accumulation rounds every partial sum; fp32 leaves it alone.
    let acc_round = |v: f32| match accum {
        Accum::Fp32 => v,
        Accum::Fp16 => round_fp16(v),
    };
    let (m, n) = (out_shape[r - 2], out_shape[r - 1]);
    let (xr, xc) = (xs[xs.len() - 2], xs[xs.len() - 1]);
    let (yr, yc) = (ys[ys.len() - 2], ys[ys.len() - 1]);
    let k = if tx { xr } else { xc };
    let batch = &out_shape[..r - 2];
    let nb: usize = batch.iter().product();
    let bstride = |s: &[usize], b: usize| -> usize {
        // Offset of matrix number `b` of the broadcast batch inside an operand of shape `s`.
        let lead = &s[..s.len() - 2];
        let mut rem = b;
        let mut off = 0;
        let mut mat = 1;
        for d in (0..batch.len()).rev() {
            let i = rem % batch[d];
            rem /= batch[d];
            let ld = d as isize - (batch.len() as isize - lead.len() as isize);
            if ld >= 0 {
                let dim = lead[ld as usize];
                if dim != 1 {
                    off += i * mat;
                }
                mat *= dim;
            }
        }
        off * s[s.len() - 2] * s[s.len() - 1]
    };
    let mut out = vec![0f32; nb * m * n];
    for b in 0..nb {
        let xo = bstride(xs, b);
        let yo = bstride(ys, b);
        for i in 0..m {
            let xv = |kk: usize| {
                if tx {
                    x[xo + kk * xc + i]
                } else {
                    x[xo + i * xc + kk]
                }
            };
            let acc = &mut out[b * m * n + i * n..b * m * n + (i + 1) * n];
            if ty && !tx {
                // Both operands walk contiguous rows: a plain dot product per output.
                let xrow = &x[xo + i * xc..xo + i * xc + k];
                for (j, a) in acc.iter_mut().enumerate() {
                    let yrow = &y[yo + j * yc..yo + j * yc + k];
                    *a = xrow
                        .iter()
                        .zip(yrow)
                        .fold(0f32, |s, (&p, &q)| acc_round(s + p * q));
                }
            } else if ty {
                for (j, a) in acc.iter_mut().enumerate() {
                    *a = (0..k).fold(0f32, |s, kk| acc_round(s + xv(kk) * y[yo + j * yc + kk]));
                }
            } else {
                // Row-wise accumulation: every acc[j] still sums over k in order, in f32, so the
                // result is the same as the dot-product loop, only vectorisable.
                for kk in 0..k {
                    let a_ik = xv(kk);
                    let yrow = &y[yo + kk * yc..yo + kk * yc + n];
                    if accum == Accum::Fp32 {
                        for (a, &yv) in acc.iter_mut().zip(yrow) {
                            *a += a_ik * yv;
                        }
                    } else {
                        for (a, &yv) in acc.iter_mut().zip(yrow) {
                            *a = acc_round(*a + a_ik * yv);
                        }
                    }
                }
            }
        }
    }
    let _ = yr;
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose_swaps_axes() {
        // [2,3] -> [3,2]
        let x = [1., 2., 3., 4., 5., 6.];
        assert_eq!(
            transpose(&x, &[2, 3], &[1, 0]),
            vec![1., 4., 2., 5., 3., 6.]
        );
    }

    #[test]
    fn matmul_plain_and_transposed() {
        let x = [1., 2., 3., 4.]; // [[1,2],[3,4]]
        let y = [5., 6., 7., 8.]; // [[5,6],[7,8]]
        assert_eq!(
            matmul(&x, &[2, 2], false, &y, &[2, 2], false, &[2, 2], Accum::Fp32),
            vec![19., 22., 43., 50.]
        );
        // x^T y = [[1,3],[2,4]] y = [[26,30],[38,44]]
        assert_eq!(
            matmul(&x, &[2, 2], true, &y, &[2, 2], false, &[2, 2], Accum::Fp32),
            vec![26., 30., 38., 44.]
        );
    }

    #[test]
    fn matmul_broadcasts_batch() {
        let x = [1., 0., 0., 1., 2., 0., 0., 2.]; // [2,2,2]: I, 2I
        let y = [1., 2., 3., 4.]; // [2,2] shared
        let out = matmul(
            &x,
            &[2, 2, 2],
            false,
            &y,
            &[2, 2],
            false,
            &[2, 2, 2],
            Accum::Fp32,
        );
        assert_eq!(out, vec![1., 2., 3., 4., 2., 4., 6., 8.]);
    }

    #[test]
    fn mul_broadcasts_like_numpy() {
        // [2, 1, 3] * [2, 1]: out [2, 2, 3].
        let x = [1., 2., 3., 4., 5., 6.];
        let y = [10., 100.];
        assert_eq!(
            mul(&x, &[2, 1, 3], &y, &[2, 1], &[2, 2, 3]),
            vec![10., 20., 30., 100., 200., 300., 40., 50., 60., 400., 500., 600.]
        );
        // A block scale: [2, 2, 1] over [2, 2, 2].
        let w = [1., 2., 3., 4., 5., 6., 7., 8.];
        let s = [1., -1., 2., 0.5];
        assert_eq!(
            mul(&w, &[2, 2, 2], &s, &[2, 2, 1], &[2, 2, 2]),
            vec![1., 2., -3., -4., 10., 12., 3.5, 4.]
        );
    }

    #[test]
    fn fp16_storage_overflows_to_inf() {
        assert_eq!(round_fp16(70000.0), f32::INFINITY);
        assert_eq!(round_fp16(1.0 + 1e-4), 1.0);
    }
}
