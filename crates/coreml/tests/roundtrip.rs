//! IR -> Core ML protobuf -> IR for every program form, package I/O, and the reader's rejections.

use ane_coreml::{from_model, mil_spec, package, to_model, Error, Model};
use ane_mil::build::{self, Layout, QuantKind, TiledShape};
use prost::Message as _;

fn forms() -> Vec<ane_mil::Program> {
    let mut v = vec![
        build::conv_matmul(64, 96, 32),
        build::dyn_matmul(3, 5, 7),
        build::conv_matmul_quant(QuantKind::Q8_0, 64, 48, 8),
        build::conv_matmul_quant(QuantKind::Q4_0, 64, 48, 8),
    ];
    for layout in [Layout::Tokens, Layout::Channels] {
        for (heads, tiles, k_chunks) in [(1, 1, 1), (1, 2, 3), (2, 1, 2)] {
            v.push(build::tiled_matmul(TiledShape {
                heads,
                tiles,
                k_chunks,
                m_tile: 32,
                k_chunk: 64,
                n: 16,
                layout,
            }));
        }
    }
    v
}

#[test]
fn every_form_round_trips_through_encoded_bytes() {
    for p in forms() {
        let bytes = to_model(&p).unwrap().encode_to_vec();
        // Deterministic: the same program encodes to the same bytes.
        assert_eq!(bytes, to_model(&p).unwrap().encode_to_vec());
        let back = from_model(&Model::decode(bytes.as_slice()).unwrap()).unwrap();
        assert_eq!(back, p);
    }
}

#[test]
fn opset_and_scalars_follow_coremltools() {
    let m = to_model(&build::conv_matmul(64, 96, 32)).unwrap();
    assert_eq!(m.specification_version, 9);
    let Some(ane_coreml::proto::core_ml::specification::model::Type::MlProgram(p)) = &m.r#type
    else {
        panic!("not an mlProgram")
    };
    let f = &p.functions["main"];
    assert_eq!(f.opset, "CoreML8");
    let ops = &f.block_specializations["CoreML8"].operations;
    let w = ops.iter().find(|o| o.outputs[0].name == "W").unwrap();
    match &w.attributes["val"].value {
        Some(mil_spec::value::Value::BlobFileValue(b)) => {
            assert_eq!((b.file_name.as_str(), b.offset), (build::WEIGHT_PATH, 64))
        }
        other => panic!("W is not a blob: {other:?}"),
    }
    assert!(p.attributes.contains_key("buildInfo"));
}

#[test]
fn reader_rejects_what_the_ir_cannot_hold() {
    let p = build::dyn_matmul(3, 5, 7);
    // A description that disagrees with `main`.
    let mut m = to_model(&p).unwrap();
    m.description.as_mut().unwrap().input.swap(0, 1);
    assert!(matches!(from_model(&m), Err(Error::Invalid(e)) if e.contains("description")));
    // An op with two outputs.
    let mut m = to_model(&p).unwrap();
    if let Some(ane_coreml::proto::core_ml::specification::model::Type::MlProgram(prog)) =
        &mut m.r#type
    {
        let block = prog
            .functions
            .get_mut("main")
            .unwrap()
            .block_specializations
            .get_mut("CoreML8")
            .unwrap();
        let extra = block.operations[0].outputs[0].clone();
        block.operations[0].outputs.push(extra);
    }
    assert!(matches!(from_model(&m), Err(Error::Unsupported(e)) if e.contains("2 outputs")));
    // A program version other than 1, an unknown opset, not an mlProgram.
    let mut m = to_model(&p).unwrap();
    if let Some(ane_coreml::proto::core_ml::specification::model::Type::MlProgram(prog)) =
        &mut m.r#type
    {
        prog.version = 2;
    }
    assert!(from_model(&m).is_err());
    let mut q = p.clone();
    q.functions[0].opset = "ios14".into();
    assert!(to_model(&q).is_err());
    let mut m = to_model(&p).unwrap();
    m.r#type = None;
    assert!(matches!(from_model(&m), Err(Error::Unsupported(_))));
}

#[test]
fn package_writes_and_reads_back() {
    let dir = std::env::temp_dir().join(format!("ane-coreml-test-{}", std::process::id()));
    let pkg = dir.join("conv.mlpackage");
    let p = build::conv_matmul(64, 96, 32);
    let w = build::weights_blob_fp16(&vec![half::f16::ONE; 96 * 64]);
    package::write(&pkg, &to_model(&p).unwrap(), &[(build::WEIGHT_PATH, &w)]).unwrap();
    for f in [
        "Manifest.json",
        "Data/com.apple.CoreML/model.mlmodel",
        "Data/com.apple.CoreML/weights/weight.bin",
    ] {
        assert!(pkg.join(f).is_file(), "{f}");
    }
    let read = package::read(&pkg).unwrap();
    assert_eq!(from_model(&read.model).unwrap(), p);
    assert_eq!(
        read.weights,
        vec![(build::WEIGHT_PATH.to_string(), w.clone())]
    );
    // Weights outside @model_path/weights/ are refused.
    let err = package::write(&pkg, &to_model(&p).unwrap(), &[("/etc/weight.bin", &w)]);
    assert!(err.is_err());
    // ... before anything is touched: the package written above is still whole.
    assert_eq!(from_model(&package::read(&pkg).unwrap().model).unwrap(), p);
    // A folder that is not a package is not replaced, nor is a file.
    let other = dir.join("other.mlpackage");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("keep.txt"), "mine").unwrap();
    let err = package::write(&other, &to_model(&p).unwrap(), &[]).unwrap_err();
    assert!(err.to_string().contains("not a Core ML package"), "{err}");
    assert!(other.join("keep.txt").is_file());
    let file = dir.join("file.mlpackage");
    std::fs::write(&file, "mine").unwrap();
    assert!(package::write(&file, &to_model(&p).unwrap(), &[]).is_err());
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "mine");
    std::fs::remove_dir_all(&dir).unwrap();
}
