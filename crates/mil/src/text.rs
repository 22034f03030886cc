//! Textual MIL (`model.mil`): the emitter the backend feeds the ANE compiler, and a parser that
//! reads it back.
//!
//! The dialect is the one coremltools 9.0 / coremlc 3505 prints and every direct-ANE project feeds
//! `_ANEInMemoryModelDescriptor`: typed scalar literals (`int32(1)`, `string("valid")`), inline
//! tensors (`tensor<int32, [2]>([1, 1])`), `BLOBFILE(...)` weights, arguments sorted by name,
//! 4-space function and 12-space statement indentation, and the whole `buildInfo` on one line (a
//! line break inside it is reported to be rejected).
//!
//! Floats are written as hexadecimal floats (`0x1.8p+1`): the compiler and the validator read
//! them, and unlike shortest-decimal printing they are exact by construction, so
//! `parse(emit(p)) == p` holds for every finite value without relying on a decimal printer.
//!
//! A second dialect, [`Dialect::Verbose`] (`program(1.0)`, `ios16`, every scalar written as a
//! rank-0 tensor: `tensor<string, []>("valid")`), is what coremltools 6/7 print and what M1/M2
//! are reported to need; [`emit_in`] and [`to_dialect`] write either, and which one a Mac takes is
//! probed at run time (`ane_engine::probe`).
//!
//! The parser also takes Apple's iOS16 spellings (`tensor<string, []>("x")` scalars,
//! `dict<tensor<string, []>, tensor<string, []>>`), `//` comments and any whitespace between
//! tokens, so it can read programs written by other tools.

use std::fmt::Write as _;

use thiserror::Error;

use crate::{Arg, DType, Function, Literal, Program, Scalar, Statement, ValueType};

/// Indentation of a `func` line inside the program braces.
const FUNC_INDENT: &str = "    ";
/// Indentation of a statement; 12 spaces is what Apple's compiler writes.
const STMT_INDENT: &str = "            ";

/// The two MIL text dialects third-party reports disagree on (ane-private-api.md §9, maderix
/// PR 6): which one a Mac's compiler takes is probed at run time, never assumed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Dialect {
    /// `program(1.3)`, `func main<ios18>`, typed scalar shorthand (`string("valid")`,
    /// `int32(1)`, `fp16 s`): what every direct-ANE project feeds the compiler and what
    /// [`emit`] writes for the programs [`crate::build`] makes; reported to compile only on M4.
    #[default]
    Shorthand,
    /// `program(1.0)`, `func main<ios16>`, every scalar as a rank-0 tensor
    /// (`tensor<string, []>("valid")`, `tensor<int32, []> g`, `BLOBFILE(path =
    /// tensor<string, []>(...), offset = tensor<uint64, []>(64))`) and the `buildInfo` dict typed
    /// `dict<tensor<string, []>, tensor<string, []>>`: what coremltools 6/7 print, reported
    /// necessary on M1/M2. Ops newer than iOS16 cannot be written in it ([`IOS18_ONLY_OPS`]).
    Verbose,
}

/// Ops the iOS16 opset lacks that [`crate::build`] can emit (iOS18 additions): a program using
/// one cannot be written in [`Dialect::Verbose`].
pub const IOS18_ONLY_OPS: [&str; 6] = [
    "constexpr_blockwise_shift_scale",
    "constexpr_sparse_blockwise_shift_scale",
    "scaled_dot_product_attention",
    "slice_update",
    "read_state",
    "coreml_update_state",
];

impl Dialect {
    /// Both, the one used today first.
    pub const ALL: [Dialect; 2] = [Dialect::Shorthand, Dialect::Verbose];

    /// Name in reports (`shorthand`, `verbose`).
    pub fn name(self) -> &'static str {
        match self {
            Dialect::Shorthand => "shorthand",
            Dialect::Verbose => "verbose",
        }
    }

    /// `program(<version>)` in this dialect.
    pub fn program_version(self) -> &'static str {
        match self {
            Dialect::Shorthand => crate::build::PROGRAM_VERSION,
            Dialect::Verbose => "1.0",
        }
    }

    /// The opset of every function in this dialect.
    pub fn opset(self) -> &'static str {
        match self {
            Dialect::Shorthand => crate::build::OPSET,
            Dialect::Verbose => "ios16",
        }
    }
}

/// Why a program cannot be written in a dialect.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[error("MIL in the {dialect} dialect: {why}")]
pub struct DialectError {
    /// The dialect asked for.
    pub dialect: &'static str,
    /// What stood in the way.
    pub why: String,
}

/// Writes `p` as MIL text.
///
/// Arguments are written in the order they are stored; [`crate::build`] stores them sorted by name
/// as coremltools does. The program version and opsets are written as stored; for a given
/// dialect use [`emit_in`].
///
/// # Examples
///
/// ```
/// let text = ane_mil::text::emit(&ane_mil::build::conv_matmul(64, 96, 64));
/// assert!(text.starts_with("program(1.3)\n[buildInfo = dict<string, string>({{"));
/// ```
pub fn emit(p: &Program) -> String {
    write_program(p, false)
}

/// Writes `p` in dialect `d`: its program version, opset and spelling of scalars (literals read
/// the same in both: [`Program::canonical`]). For the programs [`crate::build`] makes,
/// `emit_in(p, Dialect::Shorthand)` is byte for byte [`emit`]`(p)`.
///
/// # Errors
/// [`Dialect::Verbose`] for a program using an op of [`IOS18_ONLY_OPS`].
///
/// # Examples
///
/// ```
/// use ane_mil::text::{emit_in, Dialect};
/// let p = ane_mil::build::conv_matmul(64, 96, 64);
/// let v = emit_in(&p, Dialect::Verbose).unwrap();
/// assert!(v.starts_with("program(1.0)\n[buildInfo = dict<tensor<string, []>, tensor<string, []>>"));
/// assert!(v.contains("func main<ios16>") && v.contains("val = tensor<string, []>(\"valid\")"));
/// assert_eq!(emit_in(&p, Dialect::Shorthand).unwrap(), ane_mil::text::emit(&p));
/// ```
pub fn emit_in(p: &Program, d: Dialect) -> Result<String, DialectError> {
    if d == Dialect::Verbose {
        for f in &p.functions {
            if let Some(st) = f
                .statements
                .iter()
                .find(|st| IOS18_ONLY_OPS.contains(&st.op.as_str()))
            {
                return Err(DialectError {
                    dialect: d.name(),
                    why: format!(
                        "`{}` ({}) is an iOS18 op, the {} opset has none",
                        st.op,
                        st.output,
                        d.opset()
                    ),
                });
            }
            // iOS17 widened `cast` to int8/uint8/int16/uint16; iOS16's takes fp16, fp32, int32
            // and bool only, so an int8 input (`build::tiled_matmul_int8`) has no iOS16 form.
            if let Some((name, ty)) = f
                .inputs
                .iter()
                .find(|(_, ty)| !matches!(ty.dtype, DType::Fp16 | DType::Fp32 | DType::Int32))
            {
                return Err(DialectError {
                    dialect: d.name(),
                    why: format!(
                        "input `{name}` is {}: casting it needs the iOS17 cast, the {} opset's \
                         takes fp16, fp32, int32 and bool",
                        ty.dtype,
                        d.opset()
                    ),
                });
            }
        }
    }
    let mut p = p.clone().canonical();
    p.version = d.program_version().into();
    for f in &mut p.functions {
        f.opset = d.opset().into();
    }
    Ok(write_program(&p, d == Dialect::Verbose))
}

/// MIL text `src` rewritten in dialect `d` (parsed, then [`emit_in`]).
///
/// # Errors
/// `src` does not parse, or cannot be written in `d`.
pub fn to_dialect(src: &str, d: Dialect) -> Result<String, DialectError> {
    let p = parse(src).map_err(|e| DialectError {
        dialect: d.name(),
        why: e.to_string(),
    })?;
    emit_in(&p, d)
}

/// The `tensor<string, []>` spelling of a string scalar type, the verbose dialect's.
const VERBOSE_STRING: &str = "tensor<string, []>";

fn write_program(p: &Program, verbose: bool) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "program({})", p.version);
    if !p.build_info.is_empty() {
        if verbose {
            let _ = write!(
                s,
                "[buildInfo = dict<{VERBOSE_STRING}, {VERBOSE_STRING}>({{"
            );
        } else {
            s.push_str("[buildInfo = dict<string, string>({");
        }
        for (i, (k, v)) in p.build_info.iter().enumerate() {
            if i > 0 {
                s.push_str(", ");
            }
            let _ = write!(s, "{{{}, {}}}", quote(k), quote(v));
        }
        s.push_str("})]\n");
    }
    s.push_str("{\n");
    for f in &p.functions {
        emit_function(&mut s, f, verbose);
    }
    s.push_str("}\n");
    s
}

fn emit_function(s: &mut String, f: &Function, verbose: bool) {
    let _ = write!(s, "{FUNC_INDENT}func {}", f.name);
    if !f.opset.is_empty() {
        let _ = write!(s, "<{}>", f.opset);
    }
    s.push('(');
    for (i, (name, ty)) in f.inputs.iter().enumerate() {
        if i > 0 {
            s.push_str(", ");
        }
        let _ = write!(s, "{} {name}", value_type(ty, verbose));
    }
    s.push_str(") {\n");
    for st in &f.statements {
        emit_statement(s, st, verbose);
    }
    let _ = writeln!(s, "{FUNC_INDENT}}} -> ({});", f.outputs.join(", "));
}

fn emit_statement(s: &mut String, st: &Statement, verbose: bool) {
    let _ = write!(
        s,
        "{STMT_INDENT}{} {} = {}(",
        value_type(&st.ty, verbose),
        st.output,
        st.op
    );
    for (i, (name, arg)) in st.args.iter().enumerate() {
        if i > 0 {
            s.push_str(", ");
        }
        let _ = write!(s, "{name} = ");
        match arg {
            Arg::Var(v) => s.push_str(v),
            Arg::Tuple(vs) => {
                let _ = write!(s, "({})", vs.join(", "));
            }
            Arg::Literal(l) => emit_literal(s, l, verbose),
        }
    }
    s.push(')');
    if !st.attrs.is_empty() {
        s.push('[');
        for (i, (name, lit)) in st.attrs.iter().enumerate() {
            if i > 0 {
                s.push_str(", ");
            }
            let _ = write!(s, "{name} = ");
            emit_literal(s, lit, verbose);
        }
        s.push(']');
    }
    s.push_str(";\n");
}

/// `fp16` for scalars (`tensor<fp16, []>` when verbose), `tensor<fp16, [1, 2]>` otherwise.
fn value_type(ty: &ValueType, verbose: bool) -> String {
    if ty.is_scalar() && !verbose {
        ty.dtype.mil_name().to_string()
    } else {
        tensor_type(ty)
    }
}

/// Always the `tensor<...>` spelling, also for rank 0 (`tensor<fp16, []>`).
fn tensor_type(ty: &ValueType) -> String {
    let dims: Vec<String> = ty.shape.iter().map(|d| d.to_string()).collect();
    format!("tensor<{}, [{}]>", ty.dtype, dims.join(", "))
}

/// `int32(1)`, or `tensor<int32, []>(1)` when verbose.
fn scalar_literal(d: DType, v: &str, verbose: bool) -> String {
    if verbose {
        format!("{}({v})", tensor_type(&ValueType::scalar(d)))
    } else {
        format!("{d}({v})")
    }
}

fn emit_literal(s: &mut String, l: &Literal, verbose: bool) {
    match l {
        Literal::Scalar(d, v) => s.push_str(&scalar_literal(*d, &scalar(v), verbose)),
        Literal::Tensor(ty, vals) if ty.is_scalar() && vals.len() == 1 => {
            let _ = write!(s, "{}({})", tensor_type(ty), scalar(&vals[0]));
        }
        Literal::Tensor(ty, vals) => {
            let items: Vec<String> = vals.iter().map(scalar).collect();
            let _ = write!(s, "{}([{}])", tensor_type(ty), items.join(", "));
        }
        Literal::Blob { ty, path, offset } => {
            let _ = write!(
                s,
                "{}(BLOBFILE(path = {}, offset = {}))",
                tensor_type(ty),
                scalar_literal(DType::String, &quote(path), verbose),
                scalar_literal(DType::UInt64, &offset.to_string(), verbose)
            );
        }
    }
}

fn scalar(v: &Scalar) -> String {
    match v {
        Scalar::Bool(b) => b.to_string(),
        Scalar::Int(i) => i.to_string(),
        Scalar::Float(f) => hex_float(*f),
        Scalar::Str(t) => quote(t),
    }
}

fn quote(t: &str) -> String {
    let mut q = String::with_capacity(t.len() + 2);
    q.push('"');
    for c in t.chars() {
        match c {
            '"' => q.push_str("\\\""),
            '\\' => q.push_str("\\\\"),
            '\n' => q.push_str("\\n"),
            '\t' => q.push_str("\\t"),
            '\r' => q.push_str("\\r"),
            c => q.push(c),
        }
    }
    q.push('"');
    q
}

/// Exact hexadecimal spelling of `f`, C `%a` style: `0x1.8p+1`, `-0x1p-14`, `0x0p+0`, `inf`, `nan`.
///
/// # Examples
///
/// ```
/// assert_eq!(ane_mil::text::hex_float(3.0), "0x1.8p+1");
/// assert_eq!(ane_mil::text::hex_float(-0.125), "-0x1p-3");
/// ```
pub fn hex_float(f: f64) -> String {
    if f.is_nan() {
        return "nan".into();
    }
    let sign = if f.is_sign_negative() { "-" } else { "" };
    if f.is_infinite() {
        return format!("{sign}inf");
    }
    if f == 0.0 {
        return format!("{sign}0x0p+0");
    }
    let bits = f.to_bits();
    let biased = ((bits >> 52) & 0x7ff) as i64;
    let mut frac = bits & ((1u64 << 52) - 1);
    let mut exp = biased - 1023;
    if biased == 0 {
        // Subnormal: normalise so the leading digit is always 1.
        exp = -1022;
        while frac & (1u64 << 52) == 0 {
            frac <<= 1;
            exp -= 1;
        }
        frac &= (1u64 << 52) - 1;
    }
    let exp_sign = if exp < 0 { '-' } else { '+' };
    if frac == 0 {
        return format!("{sign}0x1p{exp_sign}{}", exp.abs());
    }
    let digits = format!("{frac:013x}");
    format!(
        "{sign}0x1.{}p{exp_sign}{}",
        digits.trim_end_matches('0'),
        exp.abs()
    )
}

/// A syntax error, with the 1-based line and column of the offending token.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[error("line {line}:{column}: expected {expected}, found {found}")]
pub struct ParseError {
    /// 1-based line.
    pub line: usize,
    /// 1-based column (in characters).
    pub column: usize,
    /// What the grammar needed at this point, e.g. "`=` after argument name".
    pub expected: String,
    /// The token that was there instead.
    pub found: String,
}

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Ident(String),
    Number(String),
    Str(String),
    Punct(char),
    Arrow,
    Eof,
}

impl Tok {
    fn describe(&self) -> String {
        match self {
            Tok::Ident(s) => format!("`{s}`"),
            Tok::Number(s) => format!("number `{s}`"),
            Tok::Str(s) => format!("string {}", quote(s)),
            Tok::Punct(c) => format!("`{c}`"),
            Tok::Arrow => "`->`".into(),
            Tok::Eof => "end of input".into(),
        }
    }
}

struct Token {
    tok: Tok,
    line: usize,
    column: usize,
}

fn lex(src: &str) -> Result<Vec<Token>, ParseError> {
    let chars: Vec<char> = src.chars().collect();
    let mut out = Vec::new();
    let (mut i, mut line, mut line_start) = (0usize, 1usize, 0usize);
    while i < chars.len() {
        let c = chars[i];
        let column = i - line_start + 1;
        let err = |expected: &str, found: String| ParseError {
            line,
            column,
            expected: expected.into(),
            found,
        };
        if c == '\n' {
            i += 1;
            line += 1;
            line_start = i;
            continue;
        }
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        if c == '/' && chars.get(i + 1) == Some(&'/') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
            continue;
        }
        let start = i;
        let tok = if c == '-' && chars.get(i + 1) == Some(&'>') {
            i += 2;
            Tok::Arrow
        } else if c == '"' {
            i += 1;
            let mut s = String::new();
            loop {
                match chars.get(i) {
                    None | Some('\n') => return Err(err("closing `\"`", "end of line".into())),
                    Some('"') => {
                        i += 1;
                        break;
                    }
                    Some('\\') => {
                        let e = chars.get(i + 1).copied();
                        s.push(match e {
                            Some('n') => '\n',
                            Some('t') => '\t',
                            Some('r') => '\r',
                            Some(c @ ('"' | '\\' | '\'')) => c,
                            other => {
                                return Err(err(
                                    "an escape (\\\" \\\\ \\n \\t \\r)",
                                    format!("\\{}", other.map(String::from).unwrap_or_default()),
                                ))
                            }
                        });
                        i += 2;
                    }
                    Some(&c) => {
                        s.push(c);
                        i += 1;
                    }
                }
            }
            Tok::Str(s)
        } else if c.is_ascii_digit()
            || ((c == '+' || c == '-' || c == '.')
                && chars
                    .get(i + 1)
                    .is_some_and(|n| n.is_ascii_digit() || *n == '.' || *n == 'i' || *n == 'n'))
        {
            i += 1;
            while i < chars.len() {
                let n = chars[i];
                let prev = chars[i - 1];
                let exp_sign = (n == '+' || n == '-')
                    && matches!(prev, 'p' | 'P' | 'e' | 'E')
                    && !is_hex_e(&chars[start..i]);
                if n.is_ascii_alphanumeric() || n == '.' || exp_sign {
                    i += 1;
                } else {
                    break;
                }
            }
            Tok::Number(chars[start..i].iter().collect())
        } else if c.is_ascii_alphabetic() || c == '_' || c == '@' {
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || matches!(chars[i], '_' | '@' | '.'))
            {
                i += 1;
            }
            Tok::Ident(chars[start..i].iter().collect())
        } else if "()[]{}<>,=;?".contains(c) {
            i += 1;
            Tok::Punct(c)
        } else {
            return Err(err("a MIL token", format!("`{c}`")));
        };
        out.push(Token { tok, line, column });
    }
    out.push(Token {
        tok: Tok::Eof,
        line,
        column: chars.len() - line_start + 1,
    });
    Ok(out)
}

/// In a hex number an `e` is a digit, so `0x1e-3` is not an exponent; only `p` is.
fn is_hex_e(sofar: &[char]) -> bool {
    let s: String = sofar.iter().collect();
    let s = s.trim_start_matches(['+', '-']);
    (s.starts_with("0x") || s.starts_with("0X")) && matches!(sofar.last(), Some('e' | 'E'))
}

/// Parses MIL text into a [`Program`].
///
/// Takes what [`emit`] writes plus whitespace and comment variations, Apple's iOS16 literal
/// spellings and decimal floats. Only what the IR can hold is accepted: one output per statement,
/// only a `buildInfo` program attribute, no function attributes.
///
/// # Errors
///
/// A [`ParseError`] with the line, column, what was expected and what was found.
///
/// # Examples
///
/// ```
/// let src = "program(1.3)\n{\n func main<ios18>(tensor<fp16, [2]> x) {\n } -> (x);\n}\n";
/// let p = ane_mil::text::parse(src).unwrap();
/// assert_eq!(p.functions[0].inputs[0].0, "x");
/// let e = ane_mil::text::parse("program(1.3) { func }").unwrap_err();
/// assert_eq!((e.line, e.column), (1, 21));
/// ```
pub fn parse(src: &str) -> Result<Program, ParseError> {
    let toks = lex(src)?;
    let mut p = Parser { toks, pos: 0 };
    p.program()
}

struct Parser {
    toks: Vec<Token>,
    pos: usize,
}

/// A type as written: the IR type plus whether it used the `tensor<...>` spelling (which matters
/// for literals: `tensor<fp16, []>(1)` is a rank-0 tensor literal, `fp16(1)` a scalar one).
struct WrittenType {
    ty: ValueType,
    tensor_form: bool,
}

impl Parser {
    fn peek(&self) -> &Tok {
        &self.toks[self.pos].tok
    }

    fn peek_at(&self, k: usize) -> &Tok {
        &self.toks[(self.pos + k).min(self.toks.len() - 1)].tok
    }

    fn bump(&mut self) -> Tok {
        let t = self.toks[self.pos].tok.clone();
        if self.pos + 1 < self.toks.len() {
            self.pos += 1;
        }
        t
    }

    fn error(&self, expected: impl Into<String>) -> ParseError {
        let t = &self.toks[self.pos];
        ParseError {
            line: t.line,
            column: t.column,
            expected: expected.into(),
            found: t.tok.describe(),
        }
    }

    fn is_punct(&self, c: char) -> bool {
        *self.peek() == Tok::Punct(c)
    }

    fn eat(&mut self, c: char) -> bool {
        if self.is_punct(c) {
            self.bump();
            true
        } else {
            false
        }
    }

    fn expect(&mut self, c: char, what: &str) -> Result<(), ParseError> {
        if self.eat(c) {
            Ok(())
        } else {
            Err(self.error(format!("`{c}` {what}")))
        }
    }

    fn ident(&mut self, what: &str) -> Result<String, ParseError> {
        match self.peek() {
            Tok::Ident(s) => {
                let s = s.clone();
                self.bump();
                Ok(s)
            }
            _ => Err(self.error(what)),
        }
    }

    fn keyword(&mut self, kw: &str) -> Result<(), ParseError> {
        match self.peek() {
            Tok::Ident(s) if s == kw => {
                self.bump();
                Ok(())
            }
            _ => Err(self.error(format!("`{kw}`"))),
        }
    }

    fn program(&mut self) -> Result<Program, ParseError> {
        self.keyword("program")?;
        self.expect('(', "after `program`")?;
        let version = match self.peek() {
            Tok::Number(n) => n.clone(),
            _ => return Err(self.error("program version number")),
        };
        self.bump();
        self.expect(')', "after the program version")?;
        let mut build_info = Vec::new();
        if self.eat('[') {
            if !self.is_punct(']') {
                let key = self.ident("program attribute name")?;
                if key != "buildInfo" {
                    self.pos -= 1;
                    return Err(self.error("`buildInfo` (the only program attribute)"));
                }
                self.expect('=', "after `buildInfo`")?;
                build_info = self.build_info()?;
            }
            self.expect(']', "closing the program attributes")?;
        }
        self.expect('{', "opening the program body")?;
        let mut functions = Vec::new();
        while !self.is_punct('}') {
            functions.push(self.function()?);
        }
        self.bump();
        if *self.peek() != Tok::Eof {
            return Err(self.error("end of input after the program"));
        }
        Ok(Program {
            version,
            build_info,
            functions,
        })
    }

    /// `dict<string, string>({{"k", "v"}, ...})`, also with `tensor<string, []>` key/value types.
    fn build_info(&mut self) -> Result<Vec<(String, String)>, ParseError> {
        self.keyword("dict")?;
        self.expect('<', "after `dict`")?;
        for i in 0..2 {
            let t = self.value_type()?;
            if t.ty != ValueType::scalar(DType::String) {
                return Err(self.error("buildInfo dict of strings"));
            }
            if i == 0 {
                self.expect(',', "between dict key and value types")?;
            }
        }
        self.expect('>', "closing the dict type")?;
        self.expect('(', "before the dict literal")?;
        self.expect('{', "opening the dict literal")?;
        let mut pairs = Vec::new();
        if !self.is_punct('}') {
            loop {
                self.expect('{', "opening a dict entry")?;
                let k = self.string("dict key string")?;
                self.expect(',', "between dict key and value")?;
                let v = self.string("dict value string")?;
                self.expect('}', "closing a dict entry")?;
                pairs.push((k, v));
                if !self.eat(',') {
                    break;
                }
            }
        }
        self.expect('}', "closing the dict literal")?;
        self.expect(')', "after the dict literal")?;
        Ok(pairs)
    }

    fn string(&mut self, what: &str) -> Result<String, ParseError> {
        match self.peek() {
            Tok::Str(s) => {
                let s = s.clone();
                self.bump();
                Ok(s)
            }
            _ => Err(self.error(what)),
        }
    }

    fn function(&mut self) -> Result<Function, ParseError> {
        self.keyword("func")?;
        let name = self.ident("function name")?;
        let mut opset = String::new();
        if self.eat('<') {
            opset = self.ident("opset name (e.g. `ios18`)")?;
            self.expect('>', "closing the opset")?;
        }
        self.expect('(', "opening the function parameters")?;
        let mut inputs = Vec::new();
        if !self.is_punct(')') {
            loop {
                let ty = self.value_type()?.ty;
                let n = self.ident("parameter name")?;
                inputs.push((n, ty));
                if !self.eat(',') {
                    break;
                }
            }
        }
        self.expect(')', "closing the function parameters")?;
        self.expect(
            '{',
            "opening the function body (function attributes are not supported)",
        )?;
        let mut statements = Vec::new();
        while !self.is_punct('}') {
            statements.push(self.statement()?);
        }
        self.bump();
        if *self.peek() != Tok::Arrow {
            return Err(self.error("`->` before the function outputs"));
        }
        self.bump();
        self.expect('(', "opening the function outputs")?;
        let mut outputs = Vec::new();
        if !self.is_punct(')') {
            loop {
                outputs.push(self.ident("output name")?);
                if !self.eat(',') {
                    break;
                }
            }
        }
        self.expect(')', "closing the function outputs")?;
        self.expect(';', "after the function outputs")?;
        Ok(Function {
            name,
            opset,
            inputs,
            statements,
            outputs,
        })
    }

    fn statement(&mut self) -> Result<Statement, ParseError> {
        let ty = self.value_type()?.ty;
        let output = self.ident("statement output name")?;
        self.expect('=', "after the output name (one output per statement)")?;
        let op = self.ident("op name")?;
        self.expect('(', "after the op name")?;
        let mut args = Vec::new();
        if !self.is_punct(')') {
            loop {
                let name = self.ident("argument name")?;
                self.expect('=', "after the argument name")?;
                args.push((name, self.arg()?));
                if !self.eat(',') {
                    break;
                }
            }
        }
        self.expect(')', "closing the op arguments")?;
        let mut attrs = Vec::new();
        if self.eat('[') {
            if !self.is_punct(']') {
                loop {
                    let name = self.ident("attribute name")?;
                    self.expect('=', "after the attribute name")?;
                    attrs.push((name, self.literal()?));
                    if !self.eat(',') {
                        break;
                    }
                }
            }
            self.expect(']', "closing the attributes")?;
        }
        self.expect(';', "ending the statement")?;
        Ok(Statement {
            output,
            ty,
            op,
            args,
            attrs,
        })
    }

    fn arg(&mut self) -> Result<Arg, ParseError> {
        if self.eat('(') {
            let mut names = Vec::new();
            if !self.is_punct(')') {
                loop {
                    names.push(self.ident("tuple element name")?);
                    if !self.eat(',') {
                        break;
                    }
                }
            }
            self.expect(')', "closing the tuple")?;
            return Ok(Arg::Tuple(names));
        }
        if let Tok::Ident(name) = self.peek() {
            if !matches!(self.peek_at(1), Tok::Punct('(' | '<')) {
                let name = name.clone();
                self.bump();
                return Ok(Arg::Var(name));
            }
        }
        Ok(Arg::Literal(self.literal()?))
    }

    fn value_type(&mut self) -> Result<WrittenType, ParseError> {
        let name = self.ident("a type (`tensor<...>` or a dtype)")?;
        if name != "tensor" {
            return match DType::from_mil_name(&name) {
                Some(d) => Ok(WrittenType {
                    ty: ValueType::scalar(d),
                    tensor_form: false,
                }),
                None => {
                    self.pos -= 1;
                    Err(self.error("a MIL dtype or `tensor`"))
                }
            };
        }
        self.expect('<', "after `tensor`")?;
        let dname = self.ident("tensor dtype")?;
        let dtype = DType::from_mil_name(&dname).ok_or_else(|| {
            self.pos -= 1;
            self.error("a MIL dtype")
        })?;
        self.expect(',', "after the tensor dtype")?;
        self.expect('[', "opening the tensor shape")?;
        let mut shape = Vec::new();
        if !self.is_punct(']') {
            loop {
                match self.peek() {
                    Tok::Number(n) if n.bytes().all(|b| b.is_ascii_digit()) => {
                        let d = n
                            .parse()
                            .map_err(|_| self.error("a dimension that fits in usize"))?;
                        shape.push(d);
                        self.bump();
                    }
                    _ => return Err(self.error("a fixed non-negative dimension")),
                }
                if !self.eat(',') {
                    break;
                }
            }
        }
        self.expect(']', "closing the tensor shape")?;
        self.expect('>', "closing the tensor type")?;
        Ok(WrittenType {
            ty: ValueType { dtype, shape },
            tensor_form: true,
        })
    }

    fn literal(&mut self) -> Result<Literal, ParseError> {
        let WrittenType { ty, tensor_form } = self.value_type()?;
        self.expect('(', "opening the literal value")?;
        let lit = if matches!(self.peek(), Tok::Ident(s) if s == "BLOBFILE") {
            self.bump();
            let (path, offset) = self.blobfile()?;
            Literal::Blob { ty, path, offset }
        } else if self.is_punct('[') {
            let mut vals = Vec::new();
            self.elements(ty.dtype, &mut vals)?;
            Literal::Tensor(ty, vals)
        } else {
            let v = self.scalar(ty.dtype)?;
            if tensor_form {
                Literal::Tensor(ty, vec![v])
            } else {
                Literal::Scalar(ty.dtype, v)
            }
        };
        self.expect(')', "closing the literal value")?;
        Ok(lit)
    }

    /// `[a, b, ...]`, possibly nested and possibly with typed elements (`fp16(0x1p-1)`); the
    /// values are flattened in row-major order.
    fn elements(&mut self, dtype: DType, out: &mut Vec<Scalar>) -> Result<(), ParseError> {
        self.expect('[', "opening the tensor values")?;
        if !self.is_punct(']') {
            loop {
                if self.is_punct('[') {
                    self.elements(dtype, out)?;
                } else if matches!(self.peek_at(1), Tok::Punct('(' | '<'))
                    && matches!(self.peek(), Tok::Ident(_))
                {
                    match self.literal()? {
                        Literal::Scalar(_, v) => out.push(v),
                        _ => return Err(self.error("a scalar tensor element")),
                    }
                } else {
                    out.push(self.scalar(dtype)?);
                }
                if !self.eat(',') {
                    break;
                }
            }
        }
        self.expect(']', "closing the tensor values")
    }

    /// Inside `BLOBFILE(`: `path = string("..."), offset = uint64(N))`, in either order.
    fn blobfile(&mut self) -> Result<(String, u64), ParseError> {
        self.expect('(', "after `BLOBFILE`")?;
        let (mut path, mut offset) = (None, None);
        loop {
            let key = self.ident("`path` or `offset`")?;
            self.expect('=', "after the BLOBFILE field name")?;
            // Either spelling: `string("...")` or `tensor<string, []>("...")` (iOS16).
            match (key.as_str(), self.literal()?.canonical()) {
                ("path", Literal::Scalar(DType::String, Scalar::Str(s))) => path = Some(s),
                ("offset", Literal::Scalar(_, Scalar::Int(o))) if o >= 0 => offset = Some(o as u64),
                ("path", _) => return Err(self.error_before("BLOBFILE path as `string(\"...\")`")),
                ("offset", _) => return Err(self.error_before("BLOBFILE offset as `uint64(N)`")),
                _ => return Err(self.error_before("BLOBFILE field `path` or `offset`")),
            }
            if !self.eat(',') {
                break;
            }
        }
        self.expect(')', "closing BLOBFILE")?;
        match (path, offset) {
            (Some(p), Some(o)) => Ok((p, o)),
            (None, _) => Err(self.error("BLOBFILE `path` field")),
            (_, None) => Err(self.error("BLOBFILE `offset` field")),
        }
    }

    /// Error at the previous token (the literal just read).
    fn error_before(&mut self, expected: &str) -> ParseError {
        self.pos = self.pos.saturating_sub(1);
        self.error(expected)
    }

    fn scalar(&mut self, dtype: DType) -> Result<Scalar, ParseError> {
        let v = match (dtype, self.peek()) {
            (DType::Bool, Tok::Ident(s)) if s == "true" || s == "false" => {
                Scalar::Bool(s == "true")
            }
            (DType::String, Tok::Str(s)) => Scalar::Str(s.clone()),
            (DType::Fp16 | DType::Fp32, Tok::Number(n)) => {
                Scalar::Float(parse_float(n).ok_or_else(|| self.error("a float literal"))?)
            }
            (DType::Fp16 | DType::Fp32, Tok::Ident(s)) if s == "inf" || s == "nan" => {
                Scalar::Float(if s == "inf" { f64::INFINITY } else { f64::NAN })
            }
            (
                DType::Int32
                | DType::Int8
                | DType::UInt8
                | DType::Int4
                | DType::UInt4
                | DType::UInt64,
                Tok::Number(n),
            ) => Scalar::Int(
                parse_int(n)
                    .ok_or_else(|| self.error(format!("an integer literal for {dtype}")))?,
            ),
            _ => return Err(self.error(format!("a {dtype} literal"))),
        };
        self.bump();
        Ok(v)
    }
}

fn parse_int(n: &str) -> Option<i64> {
    let (neg, body) = match n.as_bytes().first() {
        Some(b'-') => (true, &n[1..]),
        Some(b'+') => (false, &n[1..]),
        _ => (false, n),
    };
    let mag: i128 = if let Some(h) = body.strip_prefix("0x").or_else(|| body.strip_prefix("0X")) {
        i128::from_str_radix(h, 16).ok()?
    } else if body.bytes().all(|b| b.is_ascii_digit()) && !body.is_empty() {
        body.parse().ok()?
    } else {
        return None;
    };
    i64::try_from(if neg { -mag } else { mag }).ok()
}

fn parse_float(n: &str) -> Option<f64> {
    let (neg, body) = match n.as_bytes().first() {
        Some(b'-') => (true, &n[1..]),
        Some(b'+') => (false, &n[1..]),
        _ => (false, n),
    };
    let mag = if let Some(h) = body.strip_prefix("0x").or_else(|| body.strip_prefix("0X")) {
        parse_hex_float(h)?
    } else if body == "inf" {
        f64::INFINITY
    } else if body == "nan" {
        f64::NAN
    } else if body
        .bytes()
        .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'+' | b'-'))
    {
        body.parse().ok()?
    } else {
        return None;
    };
    Some(if neg { -mag } else { mag })
}

/// The part after `0x`: `h[.h]` with an optional `p[+-]d` exponent.
fn parse_hex_float(h: &str) -> Option<f64> {
    let (mant, exp) = match h.find(['p', 'P']) {
        Some(i) => (&h[..i], h[i + 1..].parse::<i64>().ok()?),
        None => (h, 0),
    };
    let (int_part, frac_part) = mant.split_once('.').unwrap_or((mant, ""));
    if int_part.is_empty() && frac_part.is_empty() {
        return None;
    }
    // Collect up to 16 significant hex digits exactly; later digits only fold into a sticky bit,
    // which is enough for the correct rounding of anything this emitter writes (at most 14).
    let mut m: u64 = 0;
    let mut e: i64 = exp;
    let mut sticky = false;
    let mut digits = 0;
    for (i, c) in int_part.chars().chain(frac_part.chars()).enumerate() {
        let d = c.to_digit(16)? as u64;
        let in_frac = i >= int_part.len();
        if digits < 16 {
            if m != 0 || d != 0 {
                digits += 1;
            }
            m = m * 16 + d;
            if in_frac {
                e -= 4;
            }
        } else {
            sticky |= d != 0;
            if !in_frac {
                e += 4;
            }
        }
    }
    if m == 0 {
        return Some(0.0);
    }
    // Round m to 53 bits here (round half to even, honouring the sticky digits) so the final
    // scaling by a power of two is the only other rounding, and only for subnormal results.
    let lz = m.leading_zeros() as i64;
    let shift = (11 - lz).max(0);
    if shift > 0 {
        let rem = m & ((1u64 << shift) - 1);
        let half = 1u64 << (shift - 1);
        m >>= shift;
        e += shift;
        if rem > half || (rem == half && (sticky || m & 1 == 1)) {
            m += 1;
        }
    }
    let mut v = m as f64;
    while e > 0 {
        let step = e.min(1000);
        v *= 2f64.powi(step as i32);
        e -= step;
    }
    while e < 0 {
        let step = (-e).min(1000);
        v *= 2f64.powi(-(step as i32));
        e += step;
    }
    Some(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build;

    #[test]
    fn hex_float_spellings() {
        assert_eq!(hex_float(1.0), "0x1p+0");
        assert_eq!(hex_float(3.0), "0x1.8p+1");
        assert_eq!(hex_float(-0.125), "-0x1p-3");
        assert_eq!(hex_float(0.0), "0x0p+0");
        assert_eq!(hex_float(-0.0), "-0x0p+0");
        assert_eq!(hex_float(65504.0), "0x1.ffcp+15");
        assert_eq!(
            hex_float(f64::from(half::f16::MIN_POSITIVE_SUBNORMAL)),
            "0x1p-24"
        );
        assert_eq!(hex_float(f64::MIN_POSITIVE / 4.0), "0x1p-1024");
        assert_eq!(hex_float(f64::INFINITY), "inf");
    }

    #[test]
    fn float_parsing_is_exact() {
        for v in [
            0.1,
            -1.5e-300,
            5e-324,
            f64::MAX,
            1.0 / 3.0,
            6.1e-5,
            65504.0,
            2.5e-320,
        ] {
            assert_eq!(parse_float(&hex_float(v)), Some(v), "{v}");
        }
        assert_eq!(parse_float("0x1.8p1"), Some(3.0));
        assert_eq!(parse_float("0x.8p0"), Some(0.5));
        assert_eq!(parse_float("0x10"), Some(16.0));
        assert_eq!(parse_float("-2.5e1"), Some(-25.0));
        assert_eq!(parse_float("1."), Some(1.0));
        assert!(parse_float("0xg").is_none());
        // 17 digits with a sticky tail rounds to nearest.
        assert_eq!(
            parse_float("0x1.00000000000008000001p0"),
            Some(1.0 + f64::EPSILON)
        );
    }

    #[test]
    fn emits_documented_statement_shapes() {
        let text = emit(&build::conv_matmul(64, 96, 64));
        assert!(text.contains(
            "\n            string c_pad_type = const()[name = string(\"c_pad_type\"), val = string(\"valid\")];\n"
        ));
        assert!(text.contains(
            "tensor<int32, [2]> c_strides = const()[name = string(\"c_strides\"), val = tensor<int32, [2]>([1, 1])];"
        ));
        assert!(text.contains("    func main<ios18>(tensor<fp16, [1, 64, 1, 64]> x) {\n"));
        assert!(text.ends_with("    } -> (y);\n}\n"));
    }

    #[test]
    fn round_trips_program_forms() {
        for p in [build::conv_matmul(64, 96, 64), build::dyn_matmul(3, 5, 7)] {
            assert_eq!(parse(&emit(&p)).unwrap(), p);
        }
    }

    #[test]
    fn accepts_whitespace_comments_and_ios16_spellings() {
        let src = r#"// leading comment
program(1.0)[buildInfo=dict<tensor<string, []>,tensor<string, []>>({{"a","b"}})]{func main<ios16>(tensor<fp32,[2,2]>x){
  tensor<fp32, []> s = const()[name = tensor<string, []>("s"), val = tensor<fp32, []>(0x1p+1)];
  tensor<int32,[2,2]>t=const()[name=string("t"),val=tensor<int32,[2,2]>([[1,-2],[0x10,+4]])];
  tensor<fp16, [2]> h = const()[name = string("h"), val = tensor<fp16, [2]>([fp16(0x1p-1), fp16(1.5)])];
  tensor<fp32, [2, 2]> y = mul(x = x, y = s)  [name = string("y")] ;
  tensor<fp32, [4, 2]> z = concat(axis = int32(0), values = (x, y))[name = string("z")];
} -> (y, z);
}"#;
        let p = parse(src).unwrap();
        assert_eq!(p.version, "1.0");
        assert_eq!(p.build_info, vec![("a".to_string(), "b".to_string())]);
        let f = &p.functions[0];
        assert_eq!(f.opset, "ios16");
        assert_eq!(f.statements[0].ty, ValueType::scalar(DType::Fp32));
        assert_eq!(
            f.statements[0].attr("val"),
            Some(&Literal::Tensor(
                ValueType::scalar(DType::Fp32),
                vec![Scalar::Float(2.0)]
            ))
        );
        assert_eq!(
            f.statements[1].attr("val"),
            Some(&Literal::Tensor(
                ValueType::tensor(DType::Int32, &[2, 2]),
                vec![
                    Scalar::Int(1),
                    Scalar::Int(-2),
                    Scalar::Int(16),
                    Scalar::Int(4)
                ]
            ))
        );
        assert_eq!(
            f.statements[2].attr("val"),
            Some(&Literal::Tensor(
                ValueType::tensor(DType::Fp16, &[2]),
                vec![Scalar::Float(0.5), Scalar::Float(1.5)]
            ))
        );
        assert_eq!(
            f.statements[4].arg("values"),
            Some(&Arg::Tuple(vec!["x".into(), "y".into()]))
        );
        assert_eq!(
            f.statements[4].arg("axis"),
            Some(&Arg::Literal(Literal::Scalar(DType::Int32, Scalar::Int(0))))
        );
        assert_eq!(f.outputs, ["y", "z"]);
        // And what we re-emit parses to the same IR.
        assert_eq!(parse(&emit(&p)).unwrap(), p);
    }

    fn err(src: &str) -> ParseError {
        parse(src).unwrap_err()
    }

    #[test]
    fn errors_name_position_and_expectation() {
        let e = err("program(1.3)\n{\n  func main<ios18>(tensor<fp16, [1]> x) {\n  } (x);\n}");
        assert_eq!((e.line, e.column), (4, 5));
        assert!(e.expected.contains("->"), "{e}");
        assert_eq!(e.found, "`(`");

        let e = err("program(1.3) { func f() { tensor<fp99, [1]> y = a()[]; } -> (y); }");
        assert_eq!(
            (e.line, e.column, e.expected.as_str()),
            (1, 34, "a MIL dtype")
        );

        let e = err("program(1.3) { func f() { fp16 y = const()[val = fp16(true)]; } -> (y); }");
        assert_eq!(e.expected, "a fp16 literal");
        assert_eq!(e.found, "`true`");

        let e = err("program(1.3) { func f() { fp16 y, fp16 z = a(); } -> (y); }");
        assert!(e.expected.contains("one output per statement"), "{e}");

        let e = err("program(1.3) [foo = string(\"x\")] { }");
        assert!(e.expected.contains("buildInfo"), "{e}");

        let e = err("program(1.3) { func f() { tensor<fp16, [1]> w = const()[val = tensor<fp16, [1]>(BLOBFILE(path = string(\"p\")))]; } -> (w); }");
        assert!(e.expected.contains("offset"), "{e}");

        let e =
            err("program(1.3) { func f() { string s = const()[val = string(\"abc)]; } -> (s); }");
        assert!(e.expected.contains("closing"), "{e}");

        let e = err("program(1.3) { } trailing");
        assert!(e.expected.contains("end of input"), "{e}");
        assert!(
            e.to_string()
                .starts_with("line 1:18: expected end of input"),
            "{e}"
        );

        let e = err("program(1.3) { func f() { int32 y = const()[val = int32(99999999999999999999)]; } -> (y); }");
        assert!(e.expected.contains("integer literal"), "{e}");
    }

    #[test]
    fn the_verbose_dialect_spells_every_scalar_as_a_tensor_and_reads_back_the_same() {
        use crate::build;
        let q = build::conv_matmul_q8_0(64, 64, 64);
        for p in [
            build::conv_matmul(64, 96, 64),
            build::dyn_matmul(64, 64, 64),
            build::tiled_matmul(build::TiledShape {
                heads: 1,
                tiles: 2,
                k_chunks: 2,
                m_tile: 64,
                k_chunk: 64,
                n: 64,
                layout: build::Layout::Tokens,
            }),
        ] {
            let v = emit_in(&p, Dialect::Verbose).unwrap();
            assert!(v.starts_with(
                "program(1.0)\n[buildInfo = dict<tensor<string, []>, tensor<string, []>>({{"
            ));
            assert!(v.contains("    func main<ios16>("), "{v}");
            // No shorthand scalar anywhere: every `string(`, `int32(`, `bool(` is a tensor's.
            for short in ["= string(", "= int32(", "= bool(", "= uint64(", "= fp16("] {
                assert!(!v.contains(short), "{short} in {v}");
            }
            assert!(v.contains("name = tensor<string, []>(\"y\")"), "{v}");
            let back = parse(&v).unwrap();
            assert_eq!(back.version, "1.0");
            let mut same = back.canonical();
            same.version = p.version.clone();
            for f in &mut same.functions {
                f.opset = build::OPSET.into();
            }
            assert_eq!(same, p, "verbose text reads back as the same program");
            // And back to the shorthand, byte for byte what `emit` writes.
            assert_eq!(to_dialect(&v, Dialect::Shorthand).unwrap(), emit(&p));
            assert_eq!(emit_in(&p, Dialect::Shorthand).unwrap(), emit(&p));
        }
        let v = emit_in(&build::conv_matmul(64, 96, 64), Dialect::Verbose).unwrap();
        assert!(v.contains(
            "BLOBFILE(path = tensor<string, []>(\"@model_path/weights/weight.bin\"), offset = tensor<uint64, []>(64))"
        ), "{v}");
        // iOS18 ops have no iOS16 spelling: refused, with the op named.
        let e = emit_in(&q, Dialect::Verbose).unwrap_err();
        assert!(
            e.to_string().contains("constexpr_blockwise_shift_scale"),
            "{e}"
        );
        assert!(emit_in(&q, Dialect::Shorthand).is_ok());
        // An int8 input needs the iOS17 cast: refused too, with the input named.
        let i8p = build::tiled_matmul_int8(build::TiledShape {
            heads: 1,
            tiles: 1,
            k_chunks: 1,
            m_tile: 64,
            k_chunk: 64,
            n: 64,
            layout: build::Layout::Tokens,
        });
        let e = emit_in(&i8p, Dialect::Verbose).unwrap_err();
        assert!(e.to_string().contains("`b_wq` is int8"), "{e}");
        assert!(emit_in(&i8p, Dialect::Shorthand).is_ok());
        assert!(to_dialect("program(1.3) {", Dialect::Verbose).is_err());
    }

    #[test]
    fn strings_round_trip_with_escapes() {
        let mut p = build::dyn_matmul(1, 1, 1);
        p.build_info
            .push(("quote \" back \\ nl \n tab \t".into(), "ünïcode".into()));
        assert_eq!(parse(&emit(&p)).unwrap(), p);
    }
}
