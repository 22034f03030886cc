//! IR [`Program`] to Core ML [`Model`] (type `mlProgram`) and back.
//!
//! The writer follows coremltools 9.0's milproto exporter (`backend/mil/load.py`, `helper.py`):
//! rank-0 tensor types for scalars, fp16/int8/uint8/sub-byte immediates in the `bytes` field (sub-
//! byte values packed LSB first), int32 in `ints`, uint64 in `longInts`, BLOBFILE constants as
//! `blobFileValue` with the descriptor offset, every op's `name` as an attribute, one block per
//! function keyed by its opset, and the model description listing `main`'s inputs and outputs
//! as fp16/fp32/int32 multi-arrays. The program's `buildInfo` goes into the one program attribute
//! coremltools' loader accepts.

use std::collections::BTreeMap;

use ane_mil::{Arg, DType, Function, Literal, Program, Scalar, Statement, ValueType};
use half::f16;
use thiserror::Error;

use crate::mil_spec as ms;
use crate::proto::core_ml::specification as spec;
use ms::argument::{binding::Binding as B, Binding};
use ms::tensor_value::Value as TV;
use ms::value::immediate_value::Value as IV;
use ms::value::Value as V;

/// Why a program cannot become a Core ML model, or a model cannot become a program.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum Error {
    /// Something the other side cannot express; the message names the op, value or field.
    #[error("{0}")]
    Unsupported(String),
    /// A protobuf that is malformed or inconsistent (missing field, wrong count, bad dtype).
    #[error("invalid Core ML model: {0}")]
    Invalid(String),
}

fn unsupported(msg: impl Into<String>) -> Error {
    Error::Unsupported(msg.into())
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::Invalid(msg.into())
}

/// Opsets the IR names (`ios18`) and the Core ML spelling with the model specification version
/// that introduced it (coremltools 9.0 `_OPSET`).
const OPSETS: [(&str, &str, i32); 4] = [
    ("ios15", "CoreML5", 6),
    ("ios16", "CoreML6", 7),
    ("ios17", "CoreML7", 8),
    ("ios18", "CoreML8", 9),
];

/// The Core ML opset name and model specification version of an IR opset (`ios18` ->
/// (`CoreML8`, 9)), or `None` for an opset Core ML does not know.
pub fn opset_to_coreml(opset: &str) -> Option<(&'static str, i32)> {
    OPSETS
        .iter()
        .find(|(ir, _, _)| *ir == opset)
        .map(|&(_, c, v)| (c, v))
}

fn opset_from_coreml(opset: &str) -> Option<&'static str> {
    OPSETS
        .iter()
        .find(|(_, c, _)| *c == opset)
        .map(|&(ir, _, _)| ir)
}

fn data_type(d: DType) -> ms::DataType {
    match d {
        DType::Fp16 => ms::DataType::Float16,
        DType::Fp32 => ms::DataType::Float32,
        DType::Int32 => ms::DataType::Int32,
        DType::Int8 => ms::DataType::Int8,
        DType::UInt8 => ms::DataType::Uint8,
        DType::Int4 => ms::DataType::Int4,
        DType::UInt4 => ms::DataType::Uint4,
        DType::UInt64 => ms::DataType::Uint64,
        DType::Bool => ms::DataType::Bool,
        DType::String => ms::DataType::String,
    }
}

fn dtype_from(code: i32) -> Result<DType, Error> {
    let dt = ms::DataType::try_from(code).map_err(|_| invalid(format!("data type {code}")))?;
    Ok(match dt {
        ms::DataType::Float16 => DType::Fp16,
        ms::DataType::Float32 => DType::Fp32,
        ms::DataType::Int32 => DType::Int32,
        ms::DataType::Int8 => DType::Int8,
        ms::DataType::Uint8 => DType::UInt8,
        ms::DataType::Int4 => DType::Int4,
        ms::DataType::Uint4 => DType::UInt4,
        ms::DataType::Uint64 => DType::UInt64,
        ms::DataType::Bool => DType::Bool,
        ms::DataType::String => DType::String,
        other => return Err(unsupported(format!("data type {}", other.as_str_name()))),
    })
}

fn value_type(ty: &ValueType) -> ms::ValueType {
    ms::ValueType {
        r#type: Some(ms::value_type::Type::TensorType(ms::TensorType {
            data_type: data_type(ty.dtype) as i32,
            rank: ty.shape.len() as i64,
            dimensions: ty
                .shape
                .iter()
                .map(|&d| ms::Dimension {
                    dimension: Some(ms::dimension::Dimension::Constant(
                        ms::dimension::ConstantDimension { size: d as u64 },
                    )),
                })
                .collect(),
            attributes: BTreeMap::new(),
        })),
    }
}

fn value_type_from(vt: Option<&ms::ValueType>, what: &str) -> Result<ValueType, Error> {
    let Some(ms::value_type::Type::TensorType(t)) = vt.and_then(|v| v.r#type.as_ref()) else {
        return Err(unsupported(format!(
            "{what}: only tensor types are supported"
        )));
    };
    if t.rank != t.dimensions.len() as i64 {
        return Err(invalid(format!(
            "{what}: rank {} with {} dimensions",
            t.rank,
            t.dimensions.len()
        )));
    }
    let shape = t
        .dimensions
        .iter()
        .map(|d| match d.dimension {
            Some(ms::dimension::Dimension::Constant(c)) => usize::try_from(c.size)
                .map_err(|_| invalid(format!("{what}: dimension {}", c.size))),
            _ => Err(unsupported(format!("{what}: only fixed dimensions"))),
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(ValueType {
        dtype: dtype_from(t.data_type)?,
        shape,
    })
}

fn float(s: &Scalar, what: &str) -> Result<f64, Error> {
    match s {
        Scalar::Float(f) => Ok(*f),
        Scalar::Int(i) => Ok(*i as f64),
        _ => Err(unsupported(format!("{what}: non-numeric float element"))),
    }
}

fn int(s: &Scalar, what: &str) -> Result<i64, Error> {
    match s {
        Scalar::Int(i) => Ok(*i),
        _ => Err(unsupported(format!("{what}: non-integer element"))),
    }
}

/// Packs sub-byte values LSB first, as MILBlob and coremltools do.
fn pack_nibbles(vals: &[i64]) -> Vec<u8> {
    vals.chunks(2)
        .map(|c| (c[0] as u8 & 0x0f) | (c.get(1).map_or(0, |v| (*v as u8 & 0x0f) << 4)))
        .collect()
}

fn tensor_value(ty: &ValueType, vals: &[Scalar], what: &str) -> Result<ms::TensorValue, Error> {
    let ints = || {
        vals.iter()
            .map(|v| int(v, what))
            .collect::<Result<Vec<_>, _>>()
    };
    let range = |lo: i64, hi: i64| -> Result<Vec<i64>, Error> {
        let v = ints()?;
        match v.iter().find(|x| !(lo..=hi).contains(*x)) {
            Some(x) => Err(unsupported(format!(
                "{what}: {x} out of range for {}",
                ty.dtype
            ))),
            None => Ok(v),
        }
    };
    let value = match ty.dtype {
        DType::Bool => TV::Bools(ms::tensor_value::RepeatedBools {
            values: vals
                .iter()
                .map(|v| match v {
                    Scalar::Bool(b) => Ok(*b),
                    _ => Err(unsupported(format!("{what}: non-bool element"))),
                })
                .collect::<Result<_, _>>()?,
        }),
        DType::String => TV::Strings(ms::tensor_value::RepeatedStrings {
            values: vals
                .iter()
                .map(|v| match v {
                    Scalar::Str(s) => Ok(s.clone()),
                    _ => Err(unsupported(format!("{what}: non-string element"))),
                })
                .collect::<Result<_, _>>()?,
        }),
        DType::Fp32 => TV::Floats(ms::tensor_value::RepeatedFloats {
            values: vals
                .iter()
                .map(|v| float(v, what).map(|f| f as f32))
                .collect::<Result<_, _>>()?,
        }),
        DType::Fp16 => TV::Bytes(ms::tensor_value::RepeatedBytes {
            values: vals
                .iter()
                .map(|v| float(v, what).map(|f| f16::from_f64(f).to_le_bytes()))
                .collect::<Result<Vec<_>, _>>()?
                .concat(),
        }),
        DType::Int32 => TV::Ints(ms::tensor_value::RepeatedInts {
            values: range(i32::MIN.into(), i32::MAX.into())?
                .into_iter()
                .map(|v| v as i32)
                .collect(),
        }),
        DType::UInt64 => TV::LongInts(ms::tensor_value::RepeatedLongInts { values: ints()? }),
        DType::Int8 => TV::Bytes(ms::tensor_value::RepeatedBytes {
            values: range(-128, 127)?.into_iter().map(|v| v as u8).collect(),
        }),
        DType::UInt8 => TV::Bytes(ms::tensor_value::RepeatedBytes {
            values: range(0, 255)?.into_iter().map(|v| v as u8).collect(),
        }),
        DType::Int4 => TV::Bytes(ms::tensor_value::RepeatedBytes {
            values: pack_nibbles(&range(-8, 7)?),
        }),
        DType::UInt4 => TV::Bytes(ms::tensor_value::RepeatedBytes {
            values: pack_nibbles(&range(0, 15)?),
        }),
    };
    Ok(ms::TensorValue { value: Some(value) })
}

fn literal_value(lit: &Literal, what: &str) -> Result<ms::Value, Error> {
    let immediate = |ty: &ValueType, vals: &[Scalar]| -> Result<ms::Value, Error> {
        Ok(ms::Value {
            doc_string: String::new(),
            r#type: Some(value_type(ty)),
            value: Some(V::ImmediateValue(ms::value::ImmediateValue {
                value: Some(IV::Tensor(tensor_value(ty, vals, what)?)),
            })),
        })
    };
    match lit {
        Literal::Scalar(d, s) => immediate(&ValueType::scalar(*d), std::slice::from_ref(s)),
        Literal::Tensor(ty, vals) => {
            if vals.len() != ty.numel() {
                return Err(unsupported(format!(
                    "{what}: {} values for {} elements",
                    vals.len(),
                    ty.numel()
                )));
            }
            immediate(ty, vals)
        }
        Literal::Blob { ty, path, offset } => Ok(ms::Value {
            doc_string: String::new(),
            r#type: Some(value_type(ty)),
            value: Some(V::BlobFileValue(ms::value::BlobFileValue {
                file_name: path.clone(),
                offset: *offset,
            })),
        }),
    }
}

fn string_value(s: &str) -> ms::Value {
    literal_value(
        &Literal::Scalar(DType::String, Scalar::Str(s.into())),
        "string",
    )
    .expect("a string scalar always converts")
}

fn string_type() -> ms::ValueType {
    value_type(&ValueType::scalar(DType::String))
}

/// `buildInfo` as coremltools' loader expects a program attribute: a string-to-string dictionary.
fn build_info_value(info: &[(String, String)]) -> ms::Value {
    ms::Value {
        doc_string: String::new(),
        r#type: Some(ms::ValueType {
            r#type: Some(ms::value_type::Type::DictionaryType(Box::new(
                ms::DictionaryType {
                    key_type: Some(Box::new(string_type())),
                    value_type: Some(Box::new(string_type())),
                },
            ))),
        }),
        value: Some(V::ImmediateValue(ms::value::ImmediateValue {
            value: Some(IV::Dictionary(ms::DictionaryValue {
                values: info
                    .iter()
                    .map(|(k, v)| ms::dictionary_value::KeyValuePair {
                        key: Some(string_value(k)),
                        value: Some(string_value(v)),
                    })
                    .collect(),
            })),
        })),
    }
}

fn operation(st: &Statement) -> Result<ms::Operation, Error> {
    let what = |n: &str| format!("op `{}` ({}) `{n}`", st.output, st.op);
    let mut inputs = BTreeMap::new();
    for (name, arg) in &st.args {
        let arguments = match arg {
            Arg::Var(v) => vec![Binding {
                binding: Some(B::Name(v.clone())),
            }],
            Arg::Tuple(vs) => vs
                .iter()
                .map(|v| Binding {
                    binding: Some(B::Name(v.clone())),
                })
                .collect(),
            Arg::Literal(l) => vec![Binding {
                binding: Some(B::Value(literal_value(l, &what(name))?)),
            }],
        };
        if inputs
            .insert(name.clone(), ms::Argument { arguments })
            .is_some()
        {
            return Err(unsupported(format!("{}: given twice", what(name))));
        }
    }
    let mut attributes = BTreeMap::new();
    for (name, lit) in &st.attrs {
        if attributes
            .insert(name.clone(), literal_value(lit, &what(name))?)
            .is_some()
        {
            return Err(unsupported(format!("{}: given twice", what(name))));
        }
    }
    Ok(ms::Operation {
        r#type: st.op.clone(),
        inputs,
        outputs: vec![ms::NamedValueType {
            name: st.output.clone(),
            r#type: Some(value_type(&st.ty)),
        }],
        blocks: Vec::new(),
        attributes,
    })
}

fn function(f: &Function) -> Result<ms::Function, Error> {
    let (opset, _) = opset_to_coreml(&f.opset)
        .ok_or_else(|| unsupported(format!("function `{}`: opset `{}`", f.name, f.opset)))?;
    let named = |(n, t): &(String, ValueType)| ms::NamedValueType {
        name: n.clone(),
        r#type: Some(value_type(t)),
    };
    let block = ms::Block {
        inputs: Vec::new(),
        outputs: f.outputs.clone(),
        operations: f
            .statements
            .iter()
            .map(operation)
            .collect::<Result<_, _>>()?,
        attributes: BTreeMap::new(),
    };
    Ok(ms::Function {
        inputs: f.inputs.iter().map(named).collect(),
        opset: opset.into(),
        block_specializations: BTreeMap::from([(opset.to_string(), block)]),
        attributes: BTreeMap::new(),
    })
}

fn array_type(ty: &ValueType, what: &str) -> Result<spec::FeatureType, Error> {
    use spec::array_feature_type::ArrayDataType as A;
    let data_type = match ty.dtype {
        DType::Fp16 => A::Float16,
        DType::Fp32 => A::Float32,
        DType::Int32 => A::Int32,
        d => return Err(unsupported(format!("{what}: a {d} model input or output"))),
    };
    Ok(spec::FeatureType {
        is_optional: false,
        r#type: Some(spec::feature_type::Type::MultiArrayType(
            spec::ArrayFeatureType {
                shape: ty.shape.iter().map(|&d| d as i64).collect(),
                data_type: data_type as i32,
                shape_flexibility: None,
                default_optional_value: None,
            },
        )),
    })
}

fn feature(name: &str, ty: &ValueType, what: &str) -> Result<spec::FeatureDescription, Error> {
    Ok(spec::FeatureDescription {
        name: name.into(),
        short_description: String::new(),
        r#type: Some(array_type(ty, what)?),
    })
}

/// The Core ML model of `p`: an `mlProgram` of `p`'s functions, at the specification version of
/// `main`'s opset (iOS18: 9), described by `main`'s inputs and outputs.
///
/// Weights stay where the program says (`BLOBFILE` paths such as
/// [`ane_mil::build::WEIGHT_PATH`]); [`crate::package::write`] puts the files there.
///
/// # Errors
///
/// [`Error::Unsupported`] when `p` has no `main`, more than one function, an opset before iOS15,
/// a model input or output that is not fp16/fp32/int32, or a literal out of its dtype's range.
///
/// # Examples
///
/// ```
/// let model = ane_coreml::to_model(&ane_mil::build::dyn_matmul(8, 4, 2)).unwrap();
/// let desc = model.description.unwrap();
/// assert_eq!(desc.input.iter().map(|f| f.name.as_str()).collect::<Vec<_>>(), ["a_x", "b_w"]);
/// ```
pub fn to_model(p: &Program) -> Result<spec::Model, Error> {
    let main = p
        .function("main")
        .ok_or_else(|| unsupported("no function `main`"))?;
    if p.functions.len() != 1 {
        return Err(unsupported(format!(
            "{} functions: one per model is supported",
            p.functions.len()
        )));
    }
    let (_, version) = opset_to_coreml(&main.opset)
        .ok_or_else(|| unsupported(format!("opset `{}`", main.opset)))?;
    let input = main
        .inputs
        .iter()
        .map(|(n, t)| feature(n, t, &format!("input `{n}`")))
        .collect::<Result<_, _>>()?;
    let output = main
        .outputs
        .iter()
        .map(|n| {
            let t = main
                .value_type(n)
                .ok_or_else(|| unsupported(format!("output `{n}` is never defined")))?;
            feature(n, t, &format!("output `{n}`"))
        })
        .collect::<Result<_, _>>()?;
    let mut functions = BTreeMap::new();
    for f in &p.functions {
        functions.insert(f.name.clone(), function(f)?);
    }
    let mut attributes = BTreeMap::new();
    if !p.build_info.is_empty() {
        attributes.insert("buildInfo".to_string(), build_info_value(&p.build_info));
    }
    Ok(spec::Model {
        specification_version: version,
        description: Some(spec::ModelDescription {
            input,
            output,
            ..Default::default()
        }),
        is_updatable: false,
        r#type: Some(spec::model::Type::MlProgram(ms::Program {
            version: 1,
            functions,
            doc_string: String::new(),
            attributes,
        })),
    })
}

// ------------------------------------------------------------------------------------- reader

fn unpack_nibbles(bytes: &[u8], n: usize, signed: bool) -> Vec<i64> {
    (0..n)
        .map(|i| {
            let nib = (bytes[i / 2] >> (4 * (i % 2))) & 0x0f;
            if signed {
                (((nib << 4) as i8) >> 4) as i64
            } else {
                nib as i64
            }
        })
        .collect()
}

fn scalars_from(ty: &ValueType, tv: &ms::TensorValue, what: &str) -> Result<Vec<Scalar>, Error> {
    let n = ty.numel();
    let bad = || invalid(format!("{what}: {} value in the wrong field", ty.dtype));
    let vals: Vec<Scalar> = match (ty.dtype, tv.value.as_ref().ok_or_else(bad)?) {
        (DType::Bool, TV::Bools(b)) => b.values.iter().map(|&v| Scalar::Bool(v)).collect(),
        (DType::String, TV::Strings(s)) => s.values.iter().cloned().map(Scalar::Str).collect(),
        (DType::Fp32, TV::Floats(f)) => f.values.iter().map(|&v| Scalar::Float(v.into())).collect(),
        (DType::Fp16, TV::Bytes(b)) => {
            if b.values.len() != 2 * n {
                return Err(invalid(format!("{what}: {} bytes of fp16", b.values.len())));
            }
            b.values
                .chunks_exact(2)
                .map(|c| Scalar::Float(f16::from_le_bytes([c[0], c[1]]).into()))
                .collect()
        }
        (DType::Int32, TV::Ints(i)) => i.values.iter().map(|&v| Scalar::Int(v.into())).collect(),
        (DType::UInt64, TV::LongInts(i)) => i.values.iter().map(|&v| Scalar::Int(v)).collect(),
        (DType::Int8, TV::Bytes(b)) => b
            .values
            .iter()
            .map(|&v| Scalar::Int(v as i8 as i64))
            .collect(),
        (DType::UInt8, TV::Bytes(b)) => b.values.iter().map(|&v| Scalar::Int(v as i64)).collect(),
        (d @ (DType::Int4 | DType::UInt4), TV::Bytes(b)) => {
            if b.values.len() != n.div_ceil(2) {
                return Err(invalid(format!("{what}: {} bytes of {d}", b.values.len())));
            }
            unpack_nibbles(&b.values, n, d == DType::Int4)
                .into_iter()
                .map(Scalar::Int)
                .collect()
        }
        _ => return Err(bad()),
    };
    if vals.len() != n {
        return Err(invalid(format!(
            "{what}: {} values for {n} elements",
            vals.len()
        )));
    }
    Ok(vals)
}

fn literal_from(v: &ms::Value, what: &str) -> Result<Literal, Error> {
    if !v.doc_string.is_empty() {
        return Err(unsupported(format!("{what}: docString")));
    }
    let ty = value_type_from(v.r#type.as_ref(), what)?;
    match v.value.as_ref() {
        Some(V::BlobFileValue(b)) => Ok(Literal::Blob {
            ty,
            path: b.file_name.clone(),
            offset: b.offset,
        }),
        Some(V::ImmediateValue(ms::value::ImmediateValue {
            value: Some(IV::Tensor(tv)),
        })) => {
            let mut vals = scalars_from(&ty, tv, what)?;
            Ok(if ty.is_scalar() {
                Literal::Scalar(ty.dtype, vals.remove(0))
            } else {
                Literal::Tensor(ty, vals)
            })
        }
        _ => Err(unsupported(format!("{what}: only tensor values"))),
    }
}

fn string_from(v: Option<&ms::Value>, what: &str) -> Result<String, Error> {
    match literal_from(v.ok_or_else(|| invalid(format!("{what}: missing")))?, what)? {
        Literal::Scalar(DType::String, Scalar::Str(s)) => Ok(s),
        _ => Err(invalid(format!("{what}: not a string"))),
    }
}

fn build_info_from(v: &ms::Value) -> Result<Vec<(String, String)>, Error> {
    let Some(V::ImmediateValue(ms::value::ImmediateValue {
        value: Some(IV::Dictionary(d)),
    })) = v.value.as_ref()
    else {
        return Err(invalid("program attribute `buildInfo` is not a dictionary"));
    };
    d.values
        .iter()
        .map(|kv| {
            Ok((
                string_from(kv.key.as_ref(), "buildInfo key")?,
                string_from(kv.value.as_ref(), "buildInfo value")?,
            ))
        })
        .collect()
}

fn statement_from(op: &ms::Operation) -> Result<Statement, Error> {
    let [out] = op.outputs.as_slice() else {
        return Err(unsupported(format!(
            "op {}: {} outputs (the IR has one per op)",
            op.r#type,
            op.outputs.len()
        )));
    };
    let what = |n: &str| format!("op `{}` ({}) `{n}`", out.name, op.r#type);
    if !op.blocks.is_empty() {
        return Err(unsupported(format!("{}: nested blocks", what("blocks"))));
    }
    let ty = value_type_from(out.r#type.as_ref(), &what("output"))?;
    let mut args = Vec::new();
    for (name, a) in &op.inputs {
        let names: Option<Vec<String>> = a
            .arguments
            .iter()
            .map(|b| match &b.binding {
                Some(B::Name(n)) => Some(n.clone()),
                _ => None,
            })
            .collect();
        let arg = match (names, a.arguments.as_slice()) {
            (Some(mut n), _) if n.len() == 1 => Arg::Var(n.remove(0)),
            (Some(n), _) if !n.is_empty() => Arg::Tuple(n),
            (
                _,
                [Binding {
                    binding: Some(B::Value(v)),
                }],
            ) => Arg::Literal(literal_from(v, &what(name))?),
            _ => {
                return Err(unsupported(format!(
                    "{}: {} bindings mixing names and values",
                    what(name),
                    a.arguments.len()
                )))
            }
        };
        args.push((name.clone(), arg));
    }
    // `name` first, as the IR's constructors and MIL text write it; the rest in key order.
    let mut attrs = Vec::new();
    if let Some(n) = op.attributes.get("name") {
        attrs.push(("name".to_string(), literal_from(n, &what("name"))?));
    }
    for (k, v) in op.attributes.iter().filter(|(k, _)| *k != "name") {
        attrs.push((k.clone(), literal_from(v, &what(k))?));
    }
    Ok(Statement {
        output: out.name.clone(),
        ty,
        op: op.r#type.clone(),
        args,
        attrs,
    })
}

fn function_from(name: &str, f: &ms::Function) -> Result<Function, Error> {
    let opset = opset_from_coreml(&f.opset)
        .ok_or_else(|| unsupported(format!("function `{name}`: opset `{}`", f.opset)))?;
    if !f.attributes.is_empty() {
        return Err(unsupported(format!("function `{name}`: attributes")));
    }
    let block = f
        .block_specializations
        .get(&f.opset)
        .ok_or_else(|| invalid(format!("function `{name}`: no block for opset {}", f.opset)))?;
    if f.block_specializations.len() != 1 {
        return Err(unsupported(format!(
            "function `{name}`: {} block specializations",
            f.block_specializations.len()
        )));
    }
    if !block.inputs.is_empty() || !block.attributes.is_empty() {
        return Err(unsupported(format!(
            "function `{name}`: block inputs or attributes"
        )));
    }
    let inputs = f
        .inputs
        .iter()
        .map(|nv| {
            let what = format!("function `{name}` input `{}`", nv.name);
            Ok((nv.name.clone(), value_type_from(nv.r#type.as_ref(), &what)?))
        })
        .collect::<Result<_, Error>>()?;
    Ok(Function {
        name: name.into(),
        opset: opset.into(),
        inputs,
        statements: block
            .operations
            .iter()
            .map(statement_from)
            .collect::<Result<_, _>>()?,
        outputs: block.outputs.clone(),
    })
}

/// Checks that the model description lists exactly `main`'s inputs and outputs, with their types.
fn check_description(d: &spec::ModelDescription, main: &Function) -> Result<(), Error> {
    let outputs: Vec<(String, ValueType)> = main
        .outputs
        .iter()
        .map(|n| {
            main.value_type(n)
                .cloned()
                .map(|t| (n.clone(), t))
                .ok_or_else(|| invalid(format!("output `{n}` is never defined")))
        })
        .collect::<Result<_, _>>()?;
    for (side, listed, actual) in [
        ("input", &d.input, &main.inputs),
        ("output", &d.output, &outputs),
    ] {
        let expected = actual
            .iter()
            .map(|(n, t)| feature(n, t, &format!("{side} `{n}`")))
            .collect::<Result<Vec<_>, _>>()?;
        if *listed != expected {
            let names = |v: &[spec::FeatureDescription]| {
                v.iter().map(|f| f.name.clone()).collect::<Vec<_>>()
            };
            return Err(invalid(format!(
                "description {side}s {:?} do not match `main` ({:?}, with types)",
                names(listed),
                names(&expected)
            )));
        }
    }
    Ok(())
}

/// The IR program of a Core ML `mlProgram` model: the inverse of [`to_model`] (see the crate
/// doc for the three distinctions MIL text has and the protobuf has not).
///
/// # Errors
///
/// [`Error::Unsupported`] for a model that is not an `mlProgram`, or uses what the IR cannot hold
/// (non-tensor types, symbolic dimensions, nested blocks, several outputs per op, function
/// attributes, program attributes other than `buildInfo`); [`Error::Invalid`] for an
/// inconsistent model (program version other than 1, values in the wrong field, a description
/// that does not match `main`, a specification version older than `main`'s opset).
pub fn from_model(model: &spec::Model) -> Result<Program, Error> {
    let Some(spec::model::Type::MlProgram(prog)) = model.r#type.as_ref() else {
        return Err(unsupported("the model is not an mlProgram"));
    };
    if prog.version != 1 {
        return Err(invalid(format!("program version {}", prog.version)));
    }
    if !prog.doc_string.is_empty() {
        return Err(unsupported("program docString"));
    }
    let mut build_info = Vec::new();
    for (k, v) in &prog.attributes {
        match k.as_str() {
            "buildInfo" => build_info = build_info_from(v)?,
            other => return Err(unsupported(format!("program attribute `{other}`"))),
        }
    }
    let functions = prog
        .functions
        .iter()
        .map(|(n, f)| function_from(n, f))
        .collect::<Result<Vec<_>, _>>()?;
    let main = functions
        .iter()
        .find(|f| f.name == "main")
        .ok_or_else(|| invalid("no function `main`"))?;
    let (_, version) = opset_to_coreml(&main.opset).expect("read opsets are known");
    if model.specification_version < version {
        return Err(invalid(format!(
            "specification version {} is older than opset {} ({version})",
            model.specification_version, main.opset
        )));
    }
    check_description(
        model
            .description
            .as_ref()
            .ok_or_else(|| invalid("no model description"))?,
        main,
    )?;
    Ok(Program {
        version: ane_mil::build::PROGRAM_VERSION.into(),
        build_info,
        functions,
    })
}
