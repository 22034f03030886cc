//! The program IR: what a MIL text file holds, as plain data.
//!
//! The IR is deliberately generic at the statement level (an op name plus named arguments), because
//! the parser must be able to represent any program the text can express, including ones we would
//! never emit, so that the reference engine can reject them with a precise error. The *typed* part
//! lives in [`crate::build`]: constructors for the ops we emit, which always produce well-formed
//! statements with the argument names Apple's op definitions use.

use std::fmt;

/// Element type of a MIL value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE binary16.
    Fp16,
    /// IEEE binary32.
    Fp32,
    /// Signed 32-bit integer.
    Int32,
    /// Signed 8-bit integer.
    Int8,
    /// Unsigned 8-bit integer.
    UInt8,
    /// Signed 4-bit integer (sub-byte, only inside blobs).
    Int4,
    /// Unsigned 4-bit integer (sub-byte, only inside blobs).
    UInt4,
    /// Unsigned 64-bit integer (only BLOBFILE offsets use it).
    UInt64,
    /// Boolean.
    Bool,
    /// UTF-8 string (scalar only).
    String,
}

impl DType {
    /// The spelling used in MIL text (`fp16`, `int32`, ...).
    pub fn mil_name(self) -> &'static str {
        match self {
            DType::Fp16 => "fp16",
            DType::Fp32 => "fp32",
            DType::Int32 => "int32",
            DType::Int8 => "int8",
            DType::UInt8 => "uint8",
            DType::Int4 => "int4",
            DType::UInt4 => "uint4",
            DType::UInt64 => "uint64",
            DType::Bool => "bool",
            DType::String => "string",
        }
    }

    /// Parses a MIL type name.
    pub fn from_mil_name(s: &str) -> Option<DType> {
        Some(match s {
            "fp16" => DType::Fp16,
            "fp32" => DType::Fp32,
            "int32" => DType::Int32,
            "int8" => DType::Int8,
            "uint8" => DType::UInt8,
            "int4" => DType::Int4,
            "uint4" => DType::UInt4,
            "uint64" => DType::UInt64,
            "bool" => DType::Bool,
            "string" => DType::String,
            _ => return None,
        })
    }

    /// Storage size in bits of one element (strings: 0).
    pub fn bits(self) -> usize {
        match self {
            DType::Fp16 => 16,
            DType::Fp32 | DType::Int32 => 32,
            DType::Int8 | DType::UInt8 | DType::Bool => 8,
            DType::Int4 | DType::UInt4 => 4,
            DType::UInt64 => 64,
            DType::String => 0,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.mil_name())
    }
}

/// Type of a value: a dtype and a shape. A rank-0 shape is a scalar (written `fp16 x` in MIL text,
/// not `tensor<fp16, []> x`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ValueType {
    /// Element type.
    pub dtype: DType,
    /// Dimensions, outermost first. Empty for scalars.
    pub shape: Vec<usize>,
}

impl ValueType {
    /// A tensor type.
    pub fn tensor(dtype: DType, shape: &[usize]) -> Self {
        ValueType {
            dtype,
            shape: shape.to_vec(),
        }
    }

    /// A scalar type.
    pub fn scalar(dtype: DType) -> Self {
        ValueType {
            dtype,
            shape: Vec::new(),
        }
    }

    /// True for rank 0.
    pub fn is_scalar(&self) -> bool {
        self.shape.is_empty()
    }

    /// Number of elements (1 for scalars).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Bytes this value takes when stored densely (sub-byte types rounded up).
    pub fn byte_size(&self) -> usize {
        (self.numel() * self.dtype.bits()).div_ceil(8)
    }
}

/// One scalar element of a literal.
#[derive(Clone, Debug, PartialEq)]
pub enum Scalar {
    /// `bool(true)`.
    Bool(bool),
    /// Any integer dtype.
    Int(i64),
    /// `fp16`/`fp32`; held as f64 so every fp16/fp32 value is exact.
    Float(f64),
    /// `string("...")`.
    Str(String),
}

/// A literal value as written in MIL text.
#[derive(Clone, Debug, PartialEq)]
pub enum Literal {
    /// `int32(1)`, `string("valid")`, `fp16(0x1p-3)`, `uint64(64)`...
    Scalar(DType, Scalar),
    /// `tensor<int32, [4]>([0, 3, 2, 1])`: an inline tensor, values in row-major order.
    Tensor(ValueType, Vec<Scalar>),
    /// `tensor<fp16, [M, K, 1, 1]>(BLOBFILE(path = string("@model_path/..."), offset = uint64(64)))`.
    /// `offset` is the offset of the blob's 64-byte descriptor in the file, not of its data.
    Blob {
        /// Declared type of the blob content.
        ty: ValueType,
        /// Path as written, normally starting with `@model_path/`.
        path: String,
        /// Offset of the blob descriptor inside the file.
        offset: u64,
    },
}

impl Literal {
    /// The same value in one spelling: a rank-0 inline tensor holding one value
    /// (`tensor<fp16, []>(0x1p+0)`, the iOS16 spelling) becomes the scalar literal
    /// (`fp16(0x1p+0)`); MIL reads both as the same value.
    pub fn canonical(self) -> Literal {
        match self {
            Literal::Tensor(ty, mut vals) if ty.is_scalar() && vals.len() == 1 => {
                Literal::Scalar(ty.dtype, vals.remove(0))
            }
            l => l,
        }
    }

    /// The value type of this literal.
    pub fn value_type(&self) -> ValueType {
        match self {
            Literal::Scalar(d, _) => ValueType::scalar(*d),
            Literal::Tensor(t, _) | Literal::Blob { ty: t, .. } => t.clone(),
        }
    }
}

/// An argument of an op call.
#[derive(Clone, Debug, PartialEq)]
pub enum Arg {
    /// A reference to a named value (function input or earlier statement).
    Var(String),
    /// A tuple of references, `(a, b, c)` (used by `concat`).
    Tuple(Vec<String>),
    /// An inline literal.
    Literal(Literal),
}

/// One statement: `<type> <output> = <op>(<args>)[<attrs>];`.
#[derive(Clone, Debug, PartialEq)]
pub struct Statement {
    /// Name of the produced value.
    pub output: String,
    /// Declared type of the produced value.
    pub ty: ValueType,
    /// Op name (`const`, `conv`, `matmul`, ...).
    pub op: String,
    /// Call arguments, in the order written (the emitter writes them sorted by name, as
    /// coremltools does).
    pub args: Vec<(String, Arg)>,
    /// Bracket attributes, in the order written: always `name`, and `val` for `const`.
    pub attrs: Vec<(String, Literal)>,
}

impl Statement {
    /// The argument called `name`, if present.
    pub fn arg(&self, name: &str) -> Option<&Arg> {
        self.args.iter().find(|(n, _)| n == name).map(|(_, a)| a)
    }

    /// The attribute called `name`, if present.
    pub fn attr(&self, name: &str) -> Option<&Literal> {
        self.attrs.iter().find(|(n, _)| n == name).map(|(_, a)| a)
    }
}

/// A function: `func <name><<opset>>(<inputs>) { <statements> } -> (<outputs>);`.
#[derive(Clone, Debug, PartialEq)]
pub struct Function {
    /// Function name; the ANE runs `main`.
    pub name: String,
    /// Opset, e.g. `ios18`.
    pub opset: String,
    /// Parameters in declaration order.
    pub inputs: Vec<(String, ValueType)>,
    /// Body.
    pub statements: Vec<Statement>,
    /// Returned value names, in the order written.
    pub outputs: Vec<String>,
}

impl Function {
    /// Type of a named value: a parameter or a statement output.
    pub fn value_type(&self, name: &str) -> Option<&ValueType> {
        self.inputs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t)
            .or_else(|| {
                self.statements
                    .iter()
                    .find(|s| s.output == name)
                    .map(|s| &s.ty)
            })
    }
}

/// A whole program: `program(<version>)`, the buildInfo attribute and its functions.
#[derive(Clone, Debug, PartialEq)]
pub struct Program {
    /// Program syntax version, `1.3` for what the ANE compiler takes.
    pub version: String,
    /// The `buildInfo` dictionary, key/value pairs in order.
    pub build_info: Vec<(String, String)>,
    /// Functions in order.
    pub functions: Vec<Function>,
}

impl Program {
    /// The same program with every literal in one spelling ([`Literal::canonical`]): what a
    /// program parsed from either text dialect ([`crate::text::Dialect`]) is compared and
    /// executed as.
    pub fn canonical(mut self) -> Program {
        for f in &mut self.functions {
            for st in &mut f.statements {
                for (_, a) in &mut st.args {
                    if let Arg::Literal(l) = a {
                        *l = l.clone().canonical();
                    }
                }
                for (_, l) in &mut st.attrs {
                    *l = l.clone().canonical();
                }
            }
        }
        self
    }

    /// The function called `name`.
    pub fn function(&self, name: &str) -> Option<&Function> {
        self.functions.iter().find(|f| f.name == name)
    }
}
