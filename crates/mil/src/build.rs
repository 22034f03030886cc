//! Typed constructors for the ops the backend emits, and the whole-program forms it uses.
//!
//! Every constructor stores its arguments sorted by name, because that is how coremltools and
//! Apple's compiler write them, and a byte-stable text keeps compiled-program caches keyed on the
//! text effective. Every statement gets `name = string("<output>")`: op names must be unique and
//! reusing the SSA name guarantees that.
//!
//! Op parameters that MIL requires to be compile-time constants (conv `strides`, matmul
//! `transpose_x`, transpose `perm`, ...) are passed as *names of const statements*, never inline
//! literals: the ANE compiler rejects inline `transpose_x = bool(false)` (reported by Orion), and
//! named consts are what coremltools writes too.

use crate::{Arg, DType, Function, Literal, Program, Scalar, Statement, ValueType};

/// Where the single weight file of a program lives, as the ANE compiler resolves it: `@model_path`
/// is the directory handed to the compiler alongside the MIL text.
pub const WEIGHT_PATH: &str = "@model_path/weights/weight.bin";

/// MIL syntax version every direct-ANE project uses and the iOS18-era compiler accepts.
pub const PROGRAM_VERSION: &str = "1.3";

/// Opset of `main`: iOS18 is the newest opset coremltools 9.0 knows, and what the compiler on
/// current macOS expects.
pub const OPSET: &str = "ios18";

/// Offset of the first blob descriptor in a weight file (right after the 64-byte header).
pub const FIRST_BLOB_OFFSET: u64 = 64;

/// The coremltools 9.0 / coremlc 3505.4.1 `buildInfo`, byte for byte what the working direct-ANE
/// programs carry (the values are not checked strictly, but there is no reason to differ).
pub fn build_info() -> Vec<(String, String)> {
    [
        ("coremlc-component-MIL", "3510.2.1"),
        ("coremlc-version", "3505.4.1"),
        ("coremltools-component-milinternal", ""),
        ("coremltools-version", "9.0"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// A program with the standard header (`program(1.3)`, [`build_info`]) around `functions`.
pub fn program(functions: Vec<Function>) -> Program {
    Program {
        version: PROGRAM_VERSION.into(),
        build_info: build_info(),
        functions,
    }
}

fn named(
    output: &str,
    ty: ValueType,
    op: &str,
    mut args: Vec<(&str, Arg)>,
    extra: Vec<(&str, Literal)>,
) -> Statement {
    args.sort_by(|a, b| a.0.cmp(b.0));
    let mut attrs = vec![(
        "name".to_string(),
        Literal::Scalar(DType::String, Scalar::Str(output.into())),
    )];
    attrs.extend(extra.into_iter().map(|(k, v)| (k.to_string(), v)));
    Statement {
        output: output.into(),
        ty,
        op: op.into(),
        args: args.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
        attrs,
    }
}

fn var(name: &str) -> Arg {
    Arg::Var(name.into())
}

/// `const` holding `val`; the statement's type is the literal's type.
pub fn const_literal(output: &str, val: Literal) -> Statement {
    named(
        output,
        val.value_type(),
        "const",
        Vec::new(),
        vec![("val", val)],
    )
}

/// A scalar const, e.g. `int32 g = const()[name = string("g"), val = int32(1)];`.
pub fn const_scalar(output: &str, dtype: DType, value: Scalar) -> Statement {
    const_literal(output, Literal::Scalar(dtype, value))
}

/// An inline tensor const, e.g. `tensor<int32, [2]> s = const()[..., val = tensor<int32, [2]>([1, 1])];`.
///
/// # Panics
///
/// If `values.len()` differs from the number of elements of `ty`.
pub fn const_tensor(output: &str, ty: ValueType, values: Vec<Scalar>) -> Statement {
    assert_eq!(
        values.len(),
        ty.numel(),
        "const_tensor {output}: value count does not match {ty:?}"
    );
    const_literal(output, Literal::Tensor(ty, values))
}

/// An int32 vector const (shapes, perms, strides, pads).
pub fn const_i32s(output: &str, values: &[i64]) -> Statement {
    const_tensor(
        output,
        ValueType::tensor(DType::Int32, &[values.len()]),
        values.iter().map(|&v| Scalar::Int(v)).collect(),
    )
}

/// A const whose value lives in a weight file; `offset` is the blob's *descriptor* offset, as
/// returned by [`crate::blob::BlobWriter::push`].
pub fn const_blob(output: &str, ty: ValueType, path: &str, offset: u64) -> Statement {
    const_literal(
        output,
        Literal::Blob {
            ty,
            path: path.into(),
            offset,
        },
    )
}

/// Names of the const statements holding a conv's parameters.
#[derive(Clone, Copy, Debug)]
pub struct ConvParams<'a> {
    /// int32 `[2]`.
    pub dilations: &'a str,
    /// int32 scalar.
    pub groups: &'a str,
    /// int32 `[4]`.
    pub pad: &'a str,
    /// string scalar.
    pub pad_type: &'a str,
    /// int32 `[2]`.
    pub strides: &'a str,
}

/// `conv(dilations, groups, pad, pad_type, strides, weight, x)`; `ty` is the output type.
pub fn conv(output: &str, ty: ValueType, x: &str, weight: &str, p: ConvParams<'_>) -> Statement {
    let args = vec![
        ("dilations", var(p.dilations)),
        ("groups", var(p.groups)),
        ("pad", var(p.pad)),
        ("pad_type", var(p.pad_type)),
        ("strides", var(p.strides)),
        ("weight", var(weight)),
        ("x", var(x)),
    ];
    named(output, ty, "conv", args, Vec::new())
}

/// `matmul(transpose_x, transpose_y, x, y)`; the transposes are names of bool consts.
pub fn matmul(
    output: &str,
    ty: ValueType,
    x: &str,
    y: &str,
    transpose_x: &str,
    transpose_y: &str,
) -> Statement {
    let args = vec![
        ("transpose_x", var(transpose_x)),
        ("transpose_y", var(transpose_y)),
        ("x", var(x)),
        ("y", var(y)),
    ];
    named(output, ty, "matmul", args, Vec::new())
}

/// `transpose(perm, x)`; `perm` names an int32 vector const.
pub fn transpose(output: &str, ty: ValueType, x: &str, perm: &str) -> Statement {
    named(
        output,
        ty,
        "transpose",
        vec![("perm", var(perm)), ("x", var(x))],
        Vec::new(),
    )
}

/// `reshape(shape, x)`; `shape` names an int32 vector const.
pub fn reshape(output: &str, ty: ValueType, x: &str, shape: &str) -> Statement {
    named(
        output,
        ty,
        "reshape",
        vec![("shape", var(shape)), ("x", var(x))],
        Vec::new(),
    )
}

/// `cast(dtype, x)`; `dtype` names a string const such as `"fp16"`.
pub fn cast(output: &str, ty: ValueType, x: &str, dtype: &str) -> Statement {
    named(
        output,
        ty,
        "cast",
        vec![("dtype", var(dtype)), ("x", var(x))],
        Vec::new(),
    )
}

/// Accumulates one function: inputs, statements, outputs.
///
/// # Examples
///
/// ```
/// use ane_mil::{build::{self, FunctionBuilder}, DType, ValueType};
/// let mut f = FunctionBuilder::new("main");
/// let x = f.input("x", ValueType::tensor(DType::Fp16, &[1, 4]));
/// let perm = f.push(build::const_i32s("perm", &[1, 0]));
/// let y = f.push(build::transpose("y", ValueType::tensor(DType::Fp16, &[4, 1]), &x, &perm));
/// f.output(&y);
/// let p = build::program(vec![f.finish()]);
/// assert_eq!(p.functions[0].statements.len(), 2);
/// ```
#[derive(Clone, Debug)]
pub struct FunctionBuilder {
    f: Function,
}

impl FunctionBuilder {
    /// An empty function in the [`OPSET`] opset.
    pub fn new(name: &str) -> Self {
        FunctionBuilder {
            f: Function {
                name: name.into(),
                opset: OPSET.into(),
                inputs: Vec::new(),
                statements: Vec::new(),
                outputs: Vec::new(),
            },
        }
    }

    /// Adds a parameter and returns its name.
    pub fn input(&mut self, name: &str, ty: ValueType) -> String {
        self.f.inputs.push((name.into(), ty));
        name.into()
    }

    /// Appends a statement and returns the name of its output.
    pub fn push(&mut self, st: Statement) -> String {
        let out = st.output.clone();
        self.f.statements.push(st);
        out
    }

    /// Adds a bool scalar const and returns its name.
    pub fn const_bool(&mut self, name: &str, v: bool) -> String {
        self.push(const_scalar(name, DType::Bool, Scalar::Bool(v)))
    }

    /// Adds an int32 scalar const and returns its name.
    pub fn const_i32(&mut self, name: &str, v: i64) -> String {
        self.push(const_scalar(name, DType::Int32, Scalar::Int(v)))
    }

    /// Adds a string scalar const and returns its name.
    pub fn const_string(&mut self, name: &str, v: &str) -> String {
        self.push(const_scalar(name, DType::String, Scalar::Str(v.into())))
    }

    /// Adds an int32 vector const and returns its name.
    pub fn const_i32s(&mut self, name: &str, v: &[i64]) -> String {
        self.push(const_i32s(name, v))
    }

    /// The five consts of a 1x1-style conv with `valid` padding, unit strides and dilations and
    /// one group, named `c_*`.
    pub fn conv_defaults(&mut self) -> ConvDefaults {
        ConvDefaults {
            pad_type: self.const_string("c_pad_type", "valid"),
            strides: self.const_i32s("c_strides", &[1, 1]),
            pad: self.const_i32s("c_pad", &[0, 0, 0, 0]),
            dilations: self.const_i32s("c_dilations", &[1, 1]),
            groups: self.const_i32("c_groups", 1),
        }
    }

    /// Marks a value as a function output (in call order).
    pub fn output(&mut self, name: &str) {
        self.f.outputs.push(name.into());
    }

    /// The finished function.
    pub fn finish(self) -> Function {
        self.f
    }
}

/// Names of the consts made by [`FunctionBuilder::conv_defaults`].
#[derive(Clone, Debug)]
pub struct ConvDefaults {
    /// `"valid"`.
    pub pad_type: String,
    /// `[1, 1]`.
    pub strides: String,
    /// `[0, 0, 0, 0]`.
    pub pad: String,
    /// `[1, 1]`.
    pub dilations: String,
    /// `1`.
    pub groups: String,
}

impl ConvDefaults {
    /// As [`ConvParams`] for [`conv`].
    pub fn params(&self) -> ConvParams<'_> {
        ConvParams {
            dilations: &self.dilations,
            groups: &self.groups,
            pad: &self.pad,
            pad_type: &self.pad_type,
            strides: &self.strides,
        }
    }
}

fn fp16(shape: &[usize]) -> ValueType {
    ValueType::tensor(DType::Fp16, shape)
}

/// `y[1, m, 1, n] = W[m, k] · x[1, k, 1, n]` as a 1x1 conv with `W` baked into the program.
///
/// This is the form every direct-ANE project uses for a weight matrix, because the ANE is a
/// convolution engine and the constant weight can be laid out for it at compile time.
/// Activations are channel-first (element `(k_i, n_i)` of `x` at `k_i * n + n_i`), so no
/// transposes are needed around the conv. `W: tensor<fp16, [m, k, 1, 1]>` is the first blob of
/// [`WEIGHT_PATH`] (descriptor offset 64), row-major, which is also ggml's src0 row layout;
/// [`weights_blob_fp16`] writes it.
pub fn conv_matmul(k: usize, m: usize, n: usize) -> Program {
    let mut f = FunctionBuilder::new("main");
    let x = f.input("x", fp16(&[1, k, 1, n]));
    let c = f.conv_defaults();
    let w = f.push(const_blob(
        "W",
        fp16(&[m, k, 1, 1]),
        WEIGHT_PATH,
        FIRST_BLOB_OFFSET,
    ));
    let y = f.push(conv("y", fp16(&[1, m, 1, n]), &x, &w, c.params()));
    f.output(&y);
    program(vec![f.finish()])
}

/// `y[1, m, 1, n] = W[m, k] · x[k, n]` with both operands as runtime inputs, so that one compiled
/// program serves every weight matrix of the same shape.
///
/// Inputs are `a_x: tensor<fp16, [1, 1, k, n]>` and `b_w: tensor<fp16, [1, 1, m, k]>`. Their names
/// start with `a_`/`b_` because the ANE binds input surfaces in alphabetical name order, not in
/// declaration order; making both orders agree removes a class of silent mix-ups. The product
/// `matmul(x = b_w, y = a_x)` is `[1, 1, m, n]`, reshaped to the same `[1, m, 1, n]` output layout
/// as [`conv_matmul`].
pub fn dyn_matmul(k: usize, m: usize, n: usize) -> Program {
    let mut f = FunctionBuilder::new("main");
    let a_x = f.input("a_x", fp16(&[1, 1, k, n]));
    let b_w = f.input("b_w", fp16(&[1, 1, m, k]));
    let tx = f.const_bool("mm_transpose_x", false);
    let ty = f.const_bool("mm_transpose_y", false);
    let shape = f.const_i32s("y_shape", &[1, m as i64, 1, n as i64]);
    let prod = f.push(matmul("mm", fp16(&[1, 1, m, n]), &b_w, &a_x, &tx, &ty));
    let y = f.push(reshape("y", fp16(&[1, m, 1, n]), &prod, &shape));
    f.output(&y);
    program(vec![f.finish()])
}

/// Shape of a [`tiled_matmul`] program: the one form the planner compiles per shape bucket.
///
/// The weights are a runtime input, so one program serves every weight of its shape (the ANE leaks
/// after ~119 compiles per process, so programs must be per shape, not per weight). The batch axes
/// carry the three ways one dispatch grows beyond a plain matmul:
/// - `tiles`: output rows beyond the chip's axis limit, cut into `tiles` blocks of `m_tile` rows that
///   share the activations (the x batch broadcasts);
/// - `k_chunks`: a contraction beyond the axis limit, cut into `k_chunks` slices of `k_chunk`; the
///   program returns one partial product per slice and the host adds them in fp32;
/// - `heads`: independent matrices with their own activations (attention: one per KV head).
///
/// [`Layout`] picks where the tokens sit in the activations and outputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TiledShape {
    /// Independent (weight, activation) pairs; with `heads > 1`, `tiles` must be 1.
    pub heads: usize,
    /// Row tiles sharing one activation.
    pub tiles: usize,
    /// Contraction slices.
    pub k_chunks: usize,
    /// Rows per tile.
    pub m_tile: usize,
    /// Contraction length per slice.
    pub k_chunk: usize,
    /// Activation columns (tokens), already bucketed.
    pub n: usize,
    /// Token-major or channel-first activations and outputs.
    pub layout: Layout,
}

/// Where the tokens sit in a [`tiled_matmul`] program's activations and outputs.
///
/// Neither form transposes anything inside the program. `Tokens` (the default) keeps ggml's row
/// layout for activations and outputs, so the host converts with plain fp32<->fp16 copies, and
/// takes the weights staged transposed (`[K, M]` per tile, once, at load): `matmul(x = [n, k],
/// y = [k, m])`, the operand layout of maderix's weights-as-input matmul that ran on M4
/// (`training_dynamic`: activations `[SEQ, IC]`, weights `[IC, OC]`). `Channels` is the
/// channel-first `[1, C, 1, S]` convention of the baked-conv projects: `matmul(x = W[m, k],
/// y = X[k, n])` with the weights in ggml's row layout, at the price of a transpose on the host on
/// the way in and out. Which one the ANE runs faster is unmeasured: `ane bench --forms
/// tiled,tokens` on a Mac decides, `GGML_ANE_LAYOUT` picks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Layout {
    /// `a_x: [heads, k_chunks, k_chunk, n]`, `b_w: [heads*tiles, k_chunks, m_tile, k_chunk]`,
    /// `y: [heads*tiles, k_chunks, m_tile, n]`.
    Channels,
    /// `a_x: [heads, k_chunks, n, k_chunk]`, `b_w: [heads*tiles, k_chunks, k_chunk, m_tile]`,
    /// `y: [heads*tiles, k_chunks, n, m_tile]`.
    #[default]
    Tokens,
}

impl TiledShape {
    /// Elements of the `a_x` input: `[heads, k_chunks, k_chunk, n]`.
    pub fn x_len(&self) -> usize {
        self.heads * self.k_chunks * self.k_chunk * self.n
    }
    /// Elements of the `b_w` input: `[heads * tiles, k_chunks, m_tile, k_chunk]` (channel-first)
    /// or `[heads * tiles, k_chunks, k_chunk, m_tile]` (token-major).
    pub fn w_len(&self) -> usize {
        self.heads * self.tiles * self.k_chunks * self.m_tile * self.k_chunk
    }

    /// Position in `b_w` of weight row `row` of tile `tile` (`heads * tiles` counted together),
    /// contraction element `kk` of slice `c`.
    pub fn w_index(&self, tile: usize, c: usize, row: usize, kk: usize) -> usize {
        let slice = (tile * self.k_chunks + c) * self.m_tile * self.k_chunk;
        match self.layout {
            Layout::Channels => slice + row * self.k_chunk + kk,
            Layout::Tokens => slice + kk * self.m_tile + row,
        }
    }
    /// Position in `a_x` of contraction element `kk` of slice `c` for column (token) `ni` of
    /// head `head`: `[heads, k_chunks, k_chunk, n]` (channel-first) or `[heads, k_chunks, n,
    /// k_chunk]` (token-major). The one place the activation layout is written down: the plugin,
    /// the canaries and the CLI all index through it.
    pub fn x_index(&self, head: usize, c: usize, kk: usize, ni: usize) -> usize {
        let slice = head * self.k_chunks + c;
        match self.layout {
            Layout::Channels => (slice * self.k_chunk + kk) * self.n + ni,
            Layout::Tokens => (slice * self.n + ni) * self.k_chunk + kk,
        }
    }

    /// Position in `y` of output row `row` of tile `tile` (`heads * tiles` counted together),
    /// partial product of slice `c`, column (token) `ni`.
    pub fn y_index(&self, tile: usize, c: usize, row: usize, ni: usize) -> usize {
        let slice = tile * self.k_chunks + c;
        match self.layout {
            Layout::Channels => (slice * self.m_tile + row) * self.n + ni,
            Layout::Tokens => (slice * self.n + ni) * self.m_tile + row,
        }
    }

    /// Elements of the `y` output: `[heads * tiles, k_chunks, m_tile, n]`.
    pub fn y_len(&self) -> usize {
        self.heads * self.tiles * self.k_chunks * self.m_tile * self.n
    }
    /// Multiply-adds done by one dispatch (padding included).
    pub fn macs(&self) -> u64 {
        (self.heads * self.tiles * self.k_chunks * self.m_tile * self.k_chunk) as u64
            * self.n as u64
    }
}

/// The axis rules every tiled program shares: `heads` and `tiles` not both above 1 (the batch
/// axis cannot both broadcast and match), no empty axis.
fn assert_tiled_axes(s: &TiledShape) {
    assert!(
        s.heads == 1 || s.tiles == 1,
        "heads and tiles cannot both exceed 1"
    );
    assert!(
        s.heads * s.tiles * s.k_chunks * s.m_tile * s.k_chunk * s.n > 0,
        "empty axis"
    );
}

/// The shape-shared matmul program: `y = b_w x a_x`, batched as described on [`TiledShape`].
///
/// Channel-first: inputs `a_x: [heads, k_chunks, k_chunk, n]` (activations: element (k, n) of
/// slice c at `(c * k_chunk + k) * n + n_i`, i.e. exactly the `[K][N]` layout when `heads = 1`)
/// and `b_w: [heads * tiles, k_chunks, m_tile, k_chunk]` (weights, ggml's row layout per slice);
/// output `y: [heads * tiles, k_chunks, m_tile, n]`. Token-major: `a_x: [heads, k_chunks, n,
/// k_chunk]`, `b_w: [heads * tiles, k_chunks, k_chunk, m_tile]`, `y: [heads * tiles, k_chunks, n,
/// m_tile]` (see [`Layout`]; [`TiledShape::w_index`] places weights in either). Names sort `a_x` <
/// `b_w`, so the ANE's alphabetical binding order equals the declaration order.
///
/// # Panics
/// If `heads > 1` and `tiles > 1` (the batch axis cannot both broadcast and match), or any axis is 0.
pub fn tiled_matmul(s: TiledShape) -> Program {
    assert_tiled_axes(&s);
    let bw = s.heads * s.tiles;
    let mut f = FunctionBuilder::new("main");
    let tokens = s.layout == Layout::Tokens;
    let x_shape = if tokens {
        [s.heads, s.k_chunks, s.n, s.k_chunk]
    } else {
        [s.heads, s.k_chunks, s.k_chunk, s.n]
    };
    let w_shape = if tokens {
        [bw, s.k_chunks, s.k_chunk, s.m_tile]
    } else {
        [bw, s.k_chunks, s.m_tile, s.k_chunk]
    };
    let a_x = f.input("a_x", fp16(&x_shape));
    let b_w = f.input("b_w", fp16(&w_shape));
    let tx = f.const_bool("mm_transpose_x", false);
    let ty = f.const_bool("mm_transpose_y", false);
    let y = if tokens {
        // y[n][m] = sum_k x[n][k] * wt[k][m]: the weights were staged transposed.
        f.push(matmul(
            "y",
            fp16(&[bw, s.k_chunks, s.n, s.m_tile]),
            &a_x,
            &b_w,
            &tx,
            &ty,
        ))
    } else {
        f.push(matmul(
            "y",
            fp16(&[bw, s.k_chunks, s.m_tile, s.n]),
            &b_w,
            &a_x,
            &tx,
            &ty,
        ))
    };
    f.output(&y);
    program(vec![f.finish()])
}

/// `mul(x, y)`: elementwise product with numpy broadcasting; `ty` is the output type.
pub fn mul(output: &str, ty: ValueType, x: &str, y: &str) -> Statement {
    named(
        output,
        ty,
        "mul",
        vec![("x", var(x)), ("y", var(y))],
        Vec::new(),
    )
}

/// Row length, in int8 elements, that an int8 I/O tensor's last axis must be a multiple of: the
/// driver's row rule asks for whole 64-byte rows, and an int8 element is one byte (fp16 needs 32).
pub const INT8_ROW: usize = 64;

impl TiledShape {
    /// Elements of the `c_ws` input of [`tiled_matmul_int8`]: one scale per 32 weights along K,
    /// `[heads * tiles * k_chunks, k_chunk / 32, 1, m_tile]`.
    pub fn ws_len(&self) -> usize {
        self.w_len() / QuantKind::BLOCK
    }

    /// Position in `c_ws` of the scale of weight row `row` of tile `tile`, contraction elements
    /// `32 * block .. 32 * block + 32` of slice `c`.
    pub fn ws_index(&self, tile: usize, c: usize, block: usize, row: usize) -> usize {
        ((tile * self.k_chunks + c) * (self.k_chunk / QuantKind::BLOCK) + block) * self.m_tile + row
    }

    /// This shape with `m_tile` rounded up to whole 64-byte int8 rows ([`INT8_ROW`]): what
    /// [`tiled_matmul_int8`] needs of a token-major planner shape (whose `m_tile` is a multiple
    /// of 32 fp16 values).
    pub fn for_int8(self) -> TiledShape {
        TiledShape {
            m_tile: self.m_tile.next_multiple_of(INT8_ROW),
            ..self
        }
    }
}

/// [`tiled_matmul`] with the weights as **int8 plus fp16 block scales**, dequantized inside the
/// program: a probe of whether the device takes int8 input surfaces, for Q8_0 weights staged at
/// about half the bytes of fp16 (issue 24, item 5).
///
/// The constexpr dequantize ops ([`blockwise_shift_scale`]) take constants only, so a runtime
/// weight goes through ordinary ops: `w = reshape(mul(reshape(cast(b_wq, fp16)), c_ws))`. Inputs
/// (token-major, [`Layout::Tokens`] only):
/// - `a_x: fp16 [heads, k_chunks, n, k_chunk]`, as in [`tiled_matmul`];
/// - `b_wq: int8 [heads * tiles, k_chunks, k_chunk, m_tile]`, ggml's `q` at [`TiledShape::w_index`];
/// - `c_ws: fp16 [heads * tiles * k_chunks, k_chunk / 32, 1, m_tile]`, ggml's `d` of each block
///   of 32 along K at [`TiledShape::ws_index`]; the size-1 axis broadcasts it over its block.
///
/// The cast of an int8 is exact and `d * q` is exact before its one rounding to fp16, so the
/// weights the matmul sees are bit for bit ggml's dequantization rounded to fp16: the output
/// equals [`tiled_matmul`]'s on those weights. Names sort `a_x` < `b_wq` < `c_ws`, the ANE's
/// binding order. Channel-first is not offered: its scales would have a last axis of
/// `k_chunk / 32`, under the driver's shortest I/O axis, and fixing that costs a transpose.
///
/// # Panics
/// If the layout is not token-major, `k_chunk` is not a multiple of 32, `m_tile` not a multiple
/// of [`INT8_ROW`], or as [`tiled_matmul`].
pub fn tiled_matmul_int8(s: TiledShape) -> Program {
    assert_eq!(s.layout, Layout::Tokens, "int8 weights: token-major only");
    assert!(
        s.k_chunk.is_multiple_of(QuantKind::BLOCK),
        "k_chunk = {} is not a whole number of blocks",
        s.k_chunk
    );
    assert!(
        s.m_tile.is_multiple_of(INT8_ROW),
        "m_tile = {} is not a whole number of 64-byte int8 rows",
        s.m_tile
    );
    assert_tiled_axes(&s);
    let bw = s.heads * s.tiles;
    let blocks = s.k_chunk / QuantKind::BLOCK;
    let w_shape = [bw, s.k_chunks, s.k_chunk, s.m_tile];
    let split = [bw * s.k_chunks, blocks, QuantKind::BLOCK, s.m_tile];
    let mut f = FunctionBuilder::new("main");
    let a_x = f.input("a_x", fp16(&[s.heads, s.k_chunks, s.n, s.k_chunk]));
    let b_wq = f.input("b_wq", ValueType::tensor(DType::Int8, &w_shape));
    let c_ws = f.input("c_ws", fp16(&[bw * s.k_chunks, blocks, 1, s.m_tile]));
    let to_fp16 = f.const_string("w_dtype", "fp16");
    let split_shape = f.const_i32s("w_split_shape", &split.map(|d| d as i64));
    let w_shape_c = f.const_i32s("w_shape", &w_shape.map(|d| d as i64));
    let tx = f.const_bool("mm_transpose_x", false);
    let ty = f.const_bool("mm_transpose_y", false);
    let wq = f.push(cast("w_q", fp16(&w_shape), &b_wq, &to_fp16));
    let wb = f.push(reshape("w_blocks", fp16(&split), &wq, &split_shape));
    let wd = f.push(mul("w_scaled", fp16(&split), &wb, &c_ws));
    let w = f.push(reshape("w", fp16(&w_shape), &wd, &w_shape_c));
    let y = f.push(matmul(
        "y",
        fp16(&[bw, s.k_chunks, s.n, s.m_tile]),
        &a_x,
        &w,
        &tx,
        &ty,
    ));
    f.output(&y);
    program(vec![f.finish()])
}

/// The `b_wq` and `c_ws` inputs of [`tiled_matmul_int8`] (`heads = 1`) from `m` rows of raw
/// Q8_0 blocks (`raw`: the tensor's bytes, row after row, `k / 32` blocks of 34 bytes per row):
/// ggml's `q` and `d` copied bit for bit to [`TiledShape::w_index`] and
/// [`TiledShape::ws_index`], zeros in the padding (a zero scale makes padded weights zero).
///
/// # Panics
/// If `k` is not a multiple of 32, `raw` is not `m * k / 32` blocks long, `s` has several heads
/// or cannot hold an `m x k` weight, or its `k_chunk` is not a multiple of 32.
pub fn stage_q8_0_int8(
    s: &TiledShape,
    raw: &[u8],
    m: usize,
    k: usize,
) -> (Vec<i8>, Vec<half::f16>) {
    let bb = QuantKind::Q8_0.block_bytes();
    let per_row = k / QuantKind::BLOCK;
    assert!(
        k.is_multiple_of(QuantKind::BLOCK),
        "k = {k} is not a whole number of blocks"
    );
    assert!(
        s.k_chunk.is_multiple_of(QuantKind::BLOCK),
        "k_chunk is not whole blocks"
    );
    assert_eq!(
        raw.len(),
        m * per_row * bb,
        "raw is not {m} rows of {per_row} Q8_0 blocks"
    );
    assert!(
        s.heads == 1 && m <= s.tiles * s.m_tile && k <= s.k_chunks * s.k_chunk,
        "{s:?} does not hold a {m} x {k} weight"
    );
    let mut q = vec![0i8; s.w_len()];
    let mut d = vec![half::f16::ZERO; s.ws_len()];
    for (r, row) in raw.chunks_exact(per_row * bb).enumerate() {
        let (tile, ri) = (r / s.m_tile, r % s.m_tile);
        for (b, block) in row.chunks_exact(bb).enumerate() {
            let kk0 = b * QuantKind::BLOCK;
            let (c, kk) = (kk0 / s.k_chunk, kk0 % s.k_chunk);
            d[s.ws_index(tile, c, kk / QuantKind::BLOCK, ri)] =
                half::f16::from_le_bytes([block[0], block[1]]);
            for (e, &v) in block[2..].iter().enumerate() {
                q[s.w_index(tile, c, ri, kk + e)] = v as i8;
            }
        }
    }
    (q, d)
}

/// A one-blob `weight.bin` holding `w` (row-major `[m, k]`) as fp16, for [`conv_matmul`].
///
/// # Examples
///
/// ```
/// let w = vec![half::f16::ONE; 96 * 64];
/// let file = ane_mil::build::weights_blob_fp16(&w);
/// assert_eq!(file.len(), 128 + 96 * 64 * 2);
/// ```
pub fn weights_blob_fp16(w: &[half::f16]) -> Vec<u8> {
    let bytes: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut writer = crate::blob::BlobWriter::new();
    let offset = writer.push(DType::Fp16, &bytes, 0);
    debug_assert_eq!(offset, FIRST_BLOB_OFFSET);
    writer.finish()
}

/// `add(x, y)`: elementwise sum with broadcasting; `ty` is the output type.
pub fn add(output: &str, ty: ValueType, x: &str, y: &str) -> Statement {
    named(
        output,
        ty,
        "add",
        vec![("x", var(x)), ("y", var(y))],
        Vec::new(),
    )
}

/// `constexpr_blockwise_shift_scale(data, scale)` (iOS18): `out = scale[i / block] * data[i]`,
/// with `data` and `scale` names of consts of equal rank; `ty` is the output type (the scale's
/// dtype, the data's shape).
pub fn blockwise_shift_scale(output: &str, ty: ValueType, data: &str, scale: &str) -> Statement {
    named(
        output,
        ty,
        "constexpr_blockwise_shift_scale",
        vec![("data", var(data)), ("scale", var(scale))],
        Vec::new(),
    )
}

/// ggml block types that [`conv_matmul_quant`] keeps compressed.
///
/// Both are exact under `constexpr_blockwise_shift_scale` (mil-and-validation.md §6): the scale
/// is ggml's fp16 `d`, the data an integer of at most 8 bits, so `d * q` is exact in fp32 and the
/// op's single rounding to fp16 equals ggml's `to_float` followed by a round to fp16.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum QuantKind {
    /// 32 x int8 `q` and an fp16 `d` per block (34 bytes): `w = d * q`.
    Q8_0,
    /// 32 x 4-bit `q` and an fp16 `d` per block (18 bytes): `w = d * (q - 8)`; stored in MIL as
    /// int4 `q - 8`, so no offset blob is needed.
    Q4_0,
}

impl QuantKind {
    /// Elements per ggml block.
    pub const BLOCK: usize = 32;

    /// Bytes of one ggml block.
    pub fn block_bytes(self) -> usize {
        match self {
            QuantKind::Q8_0 => 34,
            QuantKind::Q4_0 => 18,
        }
    }

    /// MIL dtype of the `data` blob.
    pub fn data_dtype(self) -> DType {
        match self {
            QuantKind::Q8_0 => DType::Int8,
            QuantKind::Q4_0 => DType::Int4,
        }
    }

    /// Bytes of the `data` blob payload for an `[m, k]` weight.
    pub fn data_bytes(self, m: usize, k: usize) -> usize {
        (m * k * self.data_dtype().bits()).div_ceil(8)
    }

    /// Bytes of the whole weight file [`weights_blob_quant`] writes for an `[m, k]` weight.
    pub fn file_bytes(self, m: usize, k: usize) -> usize {
        self.scale_offset(m, k) as usize + 64 + m * (k / Self::BLOCK) * 2
    }

    /// Descriptor offset of the scale blob: it follows the data blob, 64-byte aligned.
    pub fn scale_offset(self, m: usize, k: usize) -> u64 {
        (FIRST_BLOB_OFFSET + 64 + self.data_bytes(m, k) as u64).div_ceil(64) * 64
    }
}

/// [`conv_matmul`] with the weight kept compressed as ggml blocks of `kind`.
///
/// `W_q: tensor<int8|int4, [m, k, 1, 1]>` (first blob of [`WEIGHT_PATH`]) and
/// `W_s: tensor<fp16, [m, k/32, 1, 1]>` (second blob, [`QuantKind::scale_offset`]) are named
/// consts feeding `W_d = constexpr_blockwise_shift_scale(data = W_q, scale = W_s)`: the scale has
/// the data's rank (the op requires it) and a block of `[1, 32, 1, 1]`, i.e. one ggml block along
/// each weight row. ANEForge found that a constexpr output cannot be a conv weight directly, so it
/// goes through `W = add(x = W_d, y = fp16(0))` first (a no-op the compiler folds); the conv is the
/// one of [`conv_matmul`]. [`weights_blob_quant`] writes the file from raw ggml blocks.
///
/// # Panics
/// If `k` is not a multiple of 32.
pub fn conv_matmul_quant(kind: QuantKind, k: usize, m: usize, n: usize) -> Program {
    assert!(
        k.is_multiple_of(QuantKind::BLOCK),
        "k = {k} is not a whole number of blocks"
    );
    let mut f = FunctionBuilder::new("main");
    let x = f.input("x", fp16(&[1, k, 1, n]));
    let c = f.conv_defaults();
    let q = f.push(const_blob(
        "W_q",
        ValueType::tensor(kind.data_dtype(), &[m, k, 1, 1]),
        WEIGHT_PATH,
        FIRST_BLOB_OFFSET,
    ));
    let s = f.push(const_blob(
        "W_s",
        fp16(&[m, k / QuantKind::BLOCK, 1, 1]),
        WEIGHT_PATH,
        kind.scale_offset(m, k),
    ));
    let d = f.push(blockwise_shift_scale("W_d", fp16(&[m, k, 1, 1]), &q, &s));
    let zero = f.push(const_scalar("W_zero", DType::Fp16, Scalar::Float(0.0)));
    let w = f.push(add("W", fp16(&[m, k, 1, 1]), &d, &zero));
    let y = f.push(conv("y", fp16(&[1, m, 1, n]), &x, &w, c.params()));
    f.output(&y);
    program(vec![f.finish()])
}

/// [`conv_matmul_quant`] for Q8_0 weights.
pub fn conv_matmul_q8_0(k: usize, m: usize, n: usize) -> Program {
    conv_matmul_quant(QuantKind::Q8_0, k, m, n)
}

/// [`conv_matmul_quant`] for Q4_0 weights.
pub fn conv_matmul_q4_0(k: usize, m: usize, n: usize) -> Program {
    conv_matmul_quant(QuantKind::Q4_0, k, m, n)
}

/// The `weight.bin` of [`conv_matmul_quant`] from `m` rows of raw ggml blocks (`raw` is the
/// tensor's bytes, row after row, `k / 32` blocks per row): the data blob (int8 `q`, or int4
/// `q - 8` repacked from ggml's nibble order, where byte `j` holds elements `j` and `j + 16`, to
/// MIL's, where byte `i` holds elements `2i` (low nibble) and `2i + 1`), then the fp16 scales
/// `d`, copied bit for bit.
///
/// # Panics
/// If `k` is not a multiple of 32 or `raw` is not `m * k / 32` blocks long.
pub fn weights_blob_quant(kind: QuantKind, raw: &[u8], m: usize, k: usize) -> Vec<u8> {
    assert!(
        k.is_multiple_of(QuantKind::BLOCK),
        "k = {k} is not a whole number of blocks"
    );
    let nb = m * k / QuantKind::BLOCK;
    assert_eq!(
        raw.len(),
        nb * kind.block_bytes(),
        "raw is not {nb} {kind:?} blocks"
    );
    let mut data = Vec::with_capacity(kind.data_bytes(m, k));
    let mut scales = Vec::with_capacity(nb * 2);
    for block in raw.chunks_exact(kind.block_bytes()) {
        scales.extend_from_slice(&block[..2]);
        let qs = &block[2..];
        match kind {
            QuantKind::Q8_0 => data.extend_from_slice(qs),
            QuantKind::Q4_0 => {
                // Element e of the block: low nibble of qs[e] for e < 16, high of qs[e - 16]
                // otherwise; `q ^ 8` is `q - 8` as a two's-complement nibble.
                let nib = |e: usize| {
                    let q = if e < 16 {
                        qs[e] & 0x0f
                    } else {
                        qs[e - 16] >> 4
                    };
                    q ^ 8
                };
                data.extend((0..16).map(|i| nib(2 * i) | (nib(2 * i + 1) << 4)));
            }
        }
    }
    let mut writer = crate::blob::BlobWriter::new();
    let off = writer.push(kind.data_dtype(), &data, 0);
    debug_assert_eq!(off, FIRST_BLOB_OFFSET);
    let off = writer.push(DType::Fp16, &scales, 0);
    debug_assert_eq!(off, kind.scale_offset(m, k));
    writer.finish()
}

/// [`weights_blob_quant`] for Q8_0 blocks.
pub fn weights_blob_q8_0(raw: &[u8], m: usize, k: usize) -> Vec<u8> {
    weights_blob_quant(QuantKind::Q8_0, raw, m, k)
}

/// [`weights_blob_quant`] for Q4_0 blocks.
pub fn weights_blob_q4_0(raw: &[u8], m: usize, k: usize) -> Vec<u8> {
    weights_blob_quant(QuantKind::Q4_0, raw, m, k)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sorted(st: &Statement) -> bool {
        st.args.windows(2).all(|w| w[0].0 < w[1].0)
    }

    #[test]
    fn x_and_y_indexes_fill_their_tensors_exactly_once() {
        for layout in [Layout::Channels, Layout::Tokens] {
            let s = TiledShape {
                heads: 2,
                tiles: 1,
                k_chunks: 3,
                m_tile: 4,
                k_chunk: 5,
                n: 6,
                layout,
            };
            let mut seen = vec![0u8; s.x_len()];
            for h in 0..2 {
                for c in 0..3 {
                    for kk in 0..5 {
                        for ni in 0..6 {
                            seen[s.x_index(h, c, kk, ni)] += 1;
                        }
                    }
                }
            }
            assert!(seen.iter().all(|&v| v == 1), "{layout:?} x");
            let mut seen = vec![0u8; s.y_len() * 2];
            for t in 0..2 {
                for c in 0..3 {
                    for row in 0..4 {
                        for ni in 0..6 {
                            seen[s.y_index(t, c, row, ni)] += 1;
                        }
                    }
                }
            }
            assert_eq!(
                seen.iter().filter(|&&v| v == 1).count(),
                2 * 3 * 4 * 6,
                "{layout:?} y"
            );
            // Token-major: a token's K values are contiguous; channel-first: a channel's tokens.
            let step = |a: usize, b: usize| b - a;
            match layout {
                Layout::Tokens => assert_eq!(step(s.x_index(0, 0, 0, 0), s.x_index(0, 0, 1, 0)), 1),
                Layout::Channels => {
                    assert_eq!(step(s.x_index(0, 0, 0, 0), s.x_index(0, 0, 0, 1)), 1)
                }
            }
        }
    }

    #[test]
    fn op_arguments_are_sorted_and_named() {
        for p in [
            conv_matmul(8, 4, 2),
            dyn_matmul(8, 4, 2),
            tiled_matmul(TiledShape {
                heads: 1,
                tiles: 2,
                k_chunks: 3,
                m_tile: 4,
                k_chunk: 8,
                n: 2,
                layout: Layout::Channels,
            }),
            tiled_matmul(TiledShape {
                heads: 1,
                tiles: 2,
                k_chunks: 3,
                m_tile: 4,
                k_chunk: 8,
                n: 2,
                layout: Layout::Tokens,
            }),
        ] {
            let f = p.function("main").unwrap();
            for st in &f.statements {
                assert!(sorted(st), "{}", st.output);
                assert_eq!(
                    st.attr("name"),
                    Some(&Literal::Scalar(
                        DType::String,
                        Scalar::Str(st.output.clone())
                    ))
                );
                for (_, a) in &st.args {
                    let Arg::Var(v) = a else {
                        panic!("inline literal in {}", st.output)
                    };
                    assert!(f.value_type(v).is_some(), "undefined {v}");
                }
            }
        }
    }

    #[test]
    fn conv_matmul_shapes() {
        let p = conv_matmul(64, 96, 32);
        let f = &p.functions[0];
        assert_eq!(f.inputs, vec![("x".to_string(), fp16(&[1, 64, 1, 32]))]);
        assert_eq!(
            f.statements
                .iter()
                .find(|s| s.output == "W")
                .unwrap()
                .attr("val"),
            Some(&Literal::Blob {
                ty: fp16(&[96, 64, 1, 1]),
                path: WEIGHT_PATH.into(),
                offset: 64
            })
        );
        assert_eq!(f.value_type("y"), Some(&fp16(&[1, 96, 1, 32])));
        assert_eq!(f.outputs, ["y"]);
    }

    #[test]
    fn dyn_matmul_inputs_sort_in_binding_order() {
        let p = dyn_matmul(64, 96, 32);
        let f = &p.functions[0];
        let names: Vec<&str> = f.inputs.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["a_x", "b_w"]);
        assert_eq!(f.value_type("mm"), Some(&fp16(&[1, 1, 96, 32])));
        assert_eq!(f.value_type("y"), Some(&fp16(&[1, 96, 1, 32])));
    }

    #[test]
    fn quant_forms_type_and_sort() {
        for (kind, dt) in [
            (QuantKind::Q8_0, DType::Int8),
            (QuantKind::Q4_0, DType::Int4),
        ] {
            let p = conv_matmul_quant(kind, 64, 48, 8);
            let f = &p.functions[0];
            assert!(f.statements.iter().all(sorted));
            assert_eq!(
                f.value_type("W_q"),
                Some(&ValueType::tensor(dt, &[48, 64, 1, 1]))
            );
            assert_eq!(f.value_type("W_s"), Some(&fp16(&[48, 2, 1, 1])));
            let s = f.statements.iter().find(|s| s.output == "W_s").unwrap();
            let Some(Literal::Blob { offset, .. }) = s.attr("val") else {
                panic!("W_s is not a blob")
            };
            assert_eq!(*offset, kind.scale_offset(48, 64));
            assert_eq!(f.value_type("W"), Some(&fp16(&[48, 64, 1, 1])));
            assert_eq!(f.value_type("y"), Some(&fp16(&[1, 48, 1, 8])));
        }
    }

    /// One row of two blocks per kind, elements chosen so every position is distinguishable.
    #[test]
    fn quant_blobs_repack_ggml_blocks() {
        let (m, k) = (1, 64);
        // Q8_0: d = 0.5 then 2.0; q = e - 16 (block 0), 15 - e (block 1).
        let mut raw = Vec::new();
        for (b, d) in [(0, 0.5f32), (1, 2.0)] {
            raw.extend(half::f16::from_f32(d).to_le_bytes());
            raw.extend((0..32i32).map(|e| (if b == 0 { e - 16 } else { 15 - e }) as i8 as u8));
        }
        let file = weights_blob_q8_0(&raw, m, k);
        assert_eq!(file.len(), QuantKind::Q8_0.file_bytes(m, k));
        let d = crate::blob::read_blob(&file, 64).unwrap();
        assert_eq!(
            (d.dtype, d.data.len(), d.padding_bits),
            (DType::Int8, 64, 0)
        );
        assert_eq!(d.data[3] as i8, -13);
        assert_eq!(d.data[32 + 3] as i8, 12);
        let s = crate::blob::read_blob(&file, QuantKind::Q8_0.scale_offset(m, k)).unwrap();
        assert_eq!(s.dtype, DType::Fp16);
        assert_eq!(s.data, &[0x00, 0x38, 0x00, 0x40]);
        // Q4_0: element e of block b has q = (e + b) % 16; ggml packs e (low) with e + 16 (high).
        let mut raw = Vec::new();
        for b in 0..2usize {
            raw.extend(half::f16::ONE.to_le_bytes());
            raw.extend((0..16).map(|j| (((j + b) % 16) | (((j + 16 + b) % 16) << 4)) as u8));
        }
        let file = weights_blob_q4_0(&raw, m, k);
        assert_eq!(file.len(), QuantKind::Q4_0.file_bytes(m, k));
        let d = crate::blob::read_blob(&file, 64).unwrap();
        assert_eq!(
            (d.dtype, d.data.len(), d.padding_bits),
            (DType::Int4, 32, 0)
        );
        let elem = |i: usize| {
            let nib = (d.data[i / 2] >> (4 * (i % 2))) & 0x0f;
            ((nib as i8) << 4) >> 4 // sign-extend
        };
        for i in 0..64 {
            let (b, e) = (i / 32, i % 32);
            assert_eq!(elem(i) as i32, ((e + b) % 16) as i32 - 8, "element {i}");
        }
    }

    #[test]
    fn int8_input_form_types_sort_and_binds_in_declaration_order() {
        let s = TiledShape {
            heads: 1,
            tiles: 2,
            k_chunks: 3,
            m_tile: 64,
            k_chunk: 96,
            n: 32,
            layout: Layout::Tokens,
        };
        let p = tiled_matmul_int8(s);
        let f = p.function("main").unwrap();
        assert!(f.statements.iter().all(sorted));
        let names: Vec<&str> = f.inputs.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["a_x", "b_wq", "c_ws"]);
        assert_eq!(
            f.inputs[1].1,
            ValueType::tensor(DType::Int8, &[2, 3, 96, 64])
        );
        assert_eq!(f.inputs[2].1, fp16(&[6, 3, 1, 64]));
        assert_eq!(f.inputs[2].1.numel(), s.ws_len());
        assert_eq!(f.value_type("w_blocks"), Some(&fp16(&[6, 3, 32, 64])));
        assert_eq!(f.value_type("w"), Some(&fp16(&[2, 3, 96, 64])));
        assert_eq!(f.value_type("y"), Some(&fp16(&[2, 3, 32, 64])));
        // The weights the matmul reads have the fp16 form's type: only the input differs.
        let dense = tiled_matmul(s);
        let df = dense.function("main").unwrap();
        assert_eq!(df.value_type("b_w"), f.value_type("w"));
        assert_eq!(df.value_type("y"), f.value_type("y"));
        // A planner shape (m_tile a multiple of 32) is rounded to whole int8 rows.
        assert_eq!(TiledShape { m_tile: 96, ..s }.for_int8().m_tile, 128);
        assert_eq!(s.for_int8(), s);
    }

    #[test]
    #[should_panic(expected = "token-major")]
    fn int8_input_form_refuses_channel_first() {
        tiled_matmul_int8(TiledShape {
            heads: 1,
            tiles: 1,
            k_chunks: 1,
            m_tile: 64,
            k_chunk: 64,
            n: 32,
            layout: Layout::Channels,
        });
    }

    /// Every q and d lands where the program reads it: scale index and weight index agree on the
    /// block, padding is zero, and two tiles and two slices are both crossed.
    #[test]
    fn q8_0_blocks_stage_into_the_int8_inputs() {
        let s = TiledShape {
            heads: 1,
            tiles: 2,
            k_chunks: 2,
            m_tile: 64,
            k_chunk: 64,
            n: 32,
            layout: Layout::Tokens,
        };
        let (m, k) = (100, 96); // last tile and last slice partly padding
        let mut raw = Vec::new();
        for r in 0..m {
            for b in 0..k / 32 {
                raw.extend(half::f16::from_f32((r * 3 + b + 1) as f32).to_le_bytes());
                raw.extend((0..32).map(|e| ((r + b * 32 + e) % 255) as u8));
            }
        }
        let (q, d) = stage_q8_0_int8(&s, &raw, m, k);
        assert_eq!((q.len(), d.len()), (s.w_len(), s.ws_len()));
        for r in 0..m {
            for kk in 0..k {
                let (tile, row, c, kc) = (r / 64, r % 64, kk / 64, kk % 64);
                assert_eq!(
                    q[s.w_index(tile, c, row, kc)],
                    ((r + kk) % 255) as u8 as i8,
                    "q of row {r} col {kk}"
                );
                assert_eq!(
                    d[s.ws_index(tile, c, kc / 32, row)].to_f32(),
                    (r * 3 + kk / 32 + 1) as f32,
                    "d of row {r} col {kk}"
                );
            }
        }
        let nonzero_q = q.iter().filter(|&&v| v != 0).count();
        let nonzero_d = d.iter().filter(|v| v.to_f32() != 0.0).count();
        assert_eq!(nonzero_d, m * k / 32, "padding scales are zero");
        let want_q = (0..m)
            .flat_map(|r| (0..k).map(move |kk| (r + kk) % 255))
            .filter(|&v| v != 0)
            .count();
        assert_eq!(nonzero_q, want_q, "padding weights are zero");
    }

    #[test]
    fn weights_blob_layout() {
        let w: Vec<half::f16> = (0..6).map(|i| half::f16::from_f32(i as f32)).collect();
        let file = weights_blob_fp16(&w);
        let b = crate::blob::read_blob(&file, 64).unwrap();
        assert_eq!(b.dtype, DType::Fp16);
        assert_eq!(&b.data[2..4], &half::f16::ONE.to_le_bytes());
        assert_eq!(file.len(), 128 + 12);
    }
}
