//! Integration tests of the text format: snapshots of the program forms the backend emits (any
//! change to them changes what the ANE compiles, so it must be deliberate), and a property test
//! that `parse(emit(p)) == p` for random programs built from the op constructors.

use ane_mil::build::{self, ConvParams};
use ane_mil::{text, Arg, DType, Function, Literal, Program, Scalar, Statement, ValueType};
use proptest::prelude::*;

#[test]
fn snapshot_conv_matmul() {
    insta::assert_snapshot!(
        "conv_matmul_64_96_64",
        text::emit(&build::conv_matmul(64, 96, 64))
    );
}

#[test]
fn snapshot_dyn_matmul() {
    insta::assert_snapshot!(
        "dyn_matmul_64_96_64",
        text::emit(&build::dyn_matmul(64, 96, 64))
    );
}

fn tiled(layout: build::Layout) -> build::TiledShape {
    build::TiledShape {
        heads: 1,
        tiles: 2,
        k_chunks: 2,
        m_tile: 96,
        k_chunk: 64,
        n: 128,
        layout,
    }
}

#[test]
fn snapshot_tiled_matmul_channels() {
    insta::assert_snapshot!(
        "tiled_matmul_channels",
        text::emit(&build::tiled_matmul(tiled(build::Layout::Channels)))
    );
}

#[test]
fn snapshot_tiled_matmul_tokens() {
    insta::assert_snapshot!(
        "tiled_matmul_tokens",
        text::emit(&build::tiled_matmul(tiled(build::Layout::Tokens)))
    );
}

#[test]
fn snapshot_q4_0_matmul() {
    insta::assert_snapshot!(
        "q4_0_matmul_64_96_64",
        text::emit(&build::conv_matmul_q4_0(64, 96, 64))
    );
}

fn name() -> impl Strategy<Value = String> {
    "[a-z_][a-z0-9_]{0,6}"
}

fn dtype() -> impl Strategy<Value = DType> {
    prop_oneof![
        Just(DType::Fp16),
        Just(DType::Fp32),
        Just(DType::Int32),
        Just(DType::Int8),
        Just(DType::UInt8),
        Just(DType::Int4),
        Just(DType::UInt4),
        Just(DType::UInt64),
        Just(DType::Bool),
        Just(DType::String),
    ]
}

fn tensor_type() -> impl Strategy<Value = ValueType> {
    (dtype(), prop::collection::vec(0usize..70, 1..5))
        .prop_map(|(d, s)| ValueType { dtype: d, shape: s })
}

fn any_type() -> impl Strategy<Value = ValueType> {
    prop_oneof![tensor_type(), dtype().prop_map(ValueType::scalar)]
}

/// A value of `dtype`, covering fp16 values, arbitrary finite f64 bit patterns and odd strings.
fn scalar_of(dtype: DType) -> BoxedStrategy<Scalar> {
    match dtype {
        DType::Fp16 => any::<u16>()
            .prop_map(half::f16::from_bits)
            .prop_filter("finite", |h| h.is_finite())
            .prop_map(|h| Scalar::Float(h.into()))
            .boxed(),
        DType::Fp32 => prop_oneof![
            any::<f32>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(|f| Scalar::Float(f.into())),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Scalar::Float),
        ]
        .boxed(),
        DType::Bool => any::<bool>().prop_map(Scalar::Bool).boxed(),
        DType::String => "[ -~\n\tä]{0,8}".prop_map(Scalar::Str).boxed(),
        _ => any::<i64>().prop_map(Scalar::Int).boxed(),
    }
}

fn literal() -> impl Strategy<Value = Literal> {
    prop_oneof![
        dtype().prop_flat_map(|d| scalar_of(d).prop_map(move |s| Literal::Scalar(d, s))),
        (dtype(), prop::collection::vec(1usize..4, 0..3)).prop_flat_map(|(d, shape)| {
            let ty = ValueType { dtype: d, shape };
            let n = ty.numel();
            prop::collection::vec(scalar_of(d), n).prop_map(move |v| Literal::Tensor(ty.clone(), v))
        }),
        (
            tensor_type(),
            "@model_path/[a-z/]{1,12}\\.bin",
            any::<u32>()
        )
            .prop_map(|(ty, path, off)| Literal::Blob {
                ty,
                path,
                offset: off as u64 * 64
            }),
    ]
}

/// One statement of an op kind the backend emits, with random names and types (the text format
/// does not care whether the types are consistent).
fn statement() -> impl Strategy<Value = Statement> {
    let five = prop::collection::vec(name(), 5);
    prop_oneof![
        (name(), literal()).prop_map(|(o, l)| build::const_literal(&o, l)),
        (name(), tensor_type(), name(), name(), five).prop_map(|(o, t, x, w, p)| build::conv(
            &o,
            t,
            &x,
            &w,
            ConvParams {
                dilations: &p[0],
                groups: &p[1],
                pad: &p[2],
                pad_type: &p[3],
                strides: &p[4]
            }
        )),
        (name(), tensor_type(), prop::collection::vec(name(), 4))
            .prop_map(|(o, t, n)| build::matmul(&o, t, &n[0], &n[1], &n[2], &n[3])),
        (name(), tensor_type(), name(), name())
            .prop_map(|(o, t, x, p)| build::transpose(&o, t, &x, &p)),
        (name(), tensor_type(), name(), name())
            .prop_map(|(o, t, x, s)| build::reshape(&o, t, &x, &s)),
        (name(), any_type(), name(), name()).prop_map(|(o, t, x, d)| build::cast(&o, t, &x, &d)),
        // Generic forms the parser must also carry: inline literal args and tuples.
        (
            name(),
            any_type(),
            name(),
            literal(),
            prop::collection::vec(name(), 0..4)
        )
            .prop_map(|(o, t, op, l, tuple)| Statement {
                output: o.clone(),
                ty: t,
                op,
                args: vec![
                    ("lit".into(), Arg::Literal(l)),
                    ("values".into(), Arg::Tuple(tuple))
                ],
                attrs: vec![(
                    "name".into(),
                    Literal::Scalar(DType::String, Scalar::Str(o))
                )],
            }),
    ]
}

fn function() -> impl Strategy<Value = Function> {
    (
        name(),
        prop_oneof![
            Just(String::new()),
            Just("ios18".to_string()),
            Just("ios16".to_string())
        ],
        prop::collection::vec((name(), any_type()), 0..3),
        prop::collection::vec(statement(), 0..6),
        prop::collection::vec(name(), 0..3),
    )
        .prop_map(|(name, opset, inputs, statements, outputs)| Function {
            name,
            opset,
            inputs,
            statements,
            outputs,
        })
}

fn program() -> impl Strategy<Value = Program> {
    (
        prop_oneof![Just("1.3".to_string()), Just("1.0".to_string())],
        prop::collection::vec(("[ -~]{0,6}", "[ -~]{0,6}"), 0..3),
        prop::collection::vec(function(), 0..3),
    )
        .prop_map(|(version, build_info, functions)| Program {
            version,
            build_info,
            functions,
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// The verbose (iOS16) dialect reads back as the same program, up to its version and opset.
    #[test]
    fn parse_inverts_emit_in_the_verbose_dialect(p in program()) {
        let v = text::emit_in(&p, text::Dialect::Verbose);
        prop_assume!(v.is_ok());
        let mut back = text::parse(&v.unwrap()).unwrap().canonical();
        back.version.clone_from(&p.version);
        for (b, f) in back.functions.iter_mut().zip(&p.functions) {
            b.opset.clone_from(&f.opset);
        }
        prop_assert_eq!(back, p.canonical());
    }

    #[test]
    fn parse_inverts_emit(p in program()) {
        let src = text::emit(&p);
        let back = text::parse(&src).map_err(|e| TestCaseError::fail(format!("{e}\n{src}")))?;
        prop_assert_eq!(back, p);
    }

    #[test]
    fn program_forms_round_trip(k in 1usize..300, m in 1usize..300, n in 1usize..300) {
        for p in [build::conv_matmul(k, m, n), build::dyn_matmul(k, m, n)] {
            prop_assert_eq!(text::parse(&text::emit(&p)).unwrap(), p);
        }
    }
}
