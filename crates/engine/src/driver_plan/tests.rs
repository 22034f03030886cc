//! Plan tests: each documented driver rule checked over many generated programs.

use super::*;
use crate::surface::{alloc_size, MIN_SURFACE_BYTES, SURFACE_ALIGN};
use ane_mil::build::{
    const_blob, conv_matmul, program, reshape, weights_blob_fp16, FunctionBuilder, WEIGHT_PATH,
};
use ane_mil::{DType, Program};
use proptest::prelude::*;

/// One I/O tensor of a generated program: `[1, c, 1, s]` with a legal row.
#[derive(Clone, Debug)]
struct Io {
    dtype: DType,
    c: usize,
    s: usize,
}

fn io() -> impl Strategy<Value = Io> {
    // j >= 4: the last axis is at least MIN_LAST_AXIS (64) elements in both dtypes.
    (any::<bool>(), 1usize..48, 4usize..40).prop_map(|(fp32, c, j)| {
        // A 64-byte row: 32 fp16 or 16 fp32 elements per step.
        let (dtype, step) = if fp32 {
            (DType::Fp32, 16)
        } else {
            (DType::Fp16, 32)
        };
        Io {
            dtype,
            c,
            s: j * step,
        }
    })
}

/// Program with one `reshape` per (input, output) pair, inputs declared in the given order, plus
/// optional unused BLOBFILE consts (path, repeat count).
fn identity_program(ins: &[(String, Io)], outs: &[String], blobs: &[(String, usize)]) -> Program {
    let mut f = FunctionBuilder::new("main");
    for (name, io) in ins {
        f.input(name, ValueType::tensor(io.dtype, &[1, io.c, 1, io.s]));
    }
    let mut n = 0;
    for (path, repeat) in blobs {
        for _ in 0..*repeat {
            n += 1;
            f.push(const_blob(
                &format!("blobc_{n}"),
                ValueType::tensor(DType::Fp16, &[64, 1, 1, 1]),
                path,
                64,
            ));
        }
    }
    for (i, ((x, io), y)) in ins.iter().zip(outs).enumerate() {
        let ty = ValueType::tensor(io.dtype, &[1, io.c, 1, io.s]);
        let shape = f.const_i32s(&format!("shapec_{i}"), &[1, io.c as i64, 1, io.s as i64]);
        f.push(reshape(y, ty, x, &shape));
        f.output(y);
    }
    program(vec![f.finish()])
}

fn names(prefix: &'static str) -> impl Strategy<Value = Vec<String>> {
    prop::collection::btree_set("[a-z]{1,3}_[a-z0-9]{0,4}", 1..6)
        .prop_map(move |s| s.into_iter().map(|n| format!("{prefix}{n}")).collect())
}

fn sorted_by_name(b: &[Binding]) -> bool {
    b.windows(2).all(|w| w[0].name < w[1].name)
}

fn check_surface_rule(plan: &DriverPlan) -> Result<(), TestCaseError> {
    let biggest = plan
        .inputs
        .iter()
        .chain(&plan.outputs)
        .map(Binding::bytes)
        .max()
        .unwrap();
    prop_assert!(plan.surface_bytes >= MIN_SURFACE_BYTES);
    prop_assert_eq!(plan.surface_bytes % SURFACE_ALIGN, 0);
    prop_assert!(plan.surface_bytes >= biggest);
    prop_assert!(plan.surface_bytes < biggest.max(MIN_SURFACE_BYTES) + SURFACE_ALIGN);
    let ni = plan.inputs.len();
    let no = plan.outputs.len();
    prop_assert!(plan
        .check_request(&vec![plan.surface_bytes; ni], &vec![plan.surface_bytes; no])
        .is_ok());
    // One surface of a different size breaks the equal-size rule.
    let mut ins = vec![plan.surface_bytes; ni];
    ins[ni - 1] += SURFACE_ALIGN;
    prop_assert!(plan
        .check_request(&ins, &vec![plan.surface_bytes; no])
        .is_err());
    prop_assert!(plan
        .check_request(
            &vec![plan.surface_bytes; ni + 1],
            &vec![plan.surface_bytes; no]
        )
        .is_err());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Binding order, indices, rows, surfaces, QoS, MIL bytes and the no-BLOBFILE dictionary, over
    /// programs with shuffled parameter declarations.
    #[test]
    fn plan_follows_every_rule(
        (ins, outs) in (names("i"), names("o"))
            .prop_flat_map(|(i, o)| {
                let n = i.len().min(o.len());
                let i: Vec<String> = i.into_iter().take(n).collect();
                let o: Vec<String> = o.into_iter().take(n).collect();
                (
                    Just(i).prop_shuffle(),
                    Just(o).prop_shuffle(),
                    prop::collection::vec(io(), n),
                )
            })
            .prop_map(|(i, o, ios)| (i.into_iter().zip(ios).collect::<Vec<_>>(), o)),
    ) {
        let text = ane_mil::text::emit(&identity_program(&ins, &outs, &[]));
        let plan = DriverPlan::new(&text, &[]).unwrap();
        // MIL travels as the exact UTF-8 bytes, and `model.mil` is the first file.
        prop_assert_eq!(&plan.mil[..], text.as_bytes());
        prop_assert_eq!(plan.files.len(), 1);
        prop_assert_eq!(plan.files[0].rel_path.as_str(), MODEL_MIL_FILE);
        prop_assert_eq!(&plan.files[0].contents[..], text.as_bytes());
        // No BLOBFILE: an empty (not absent) dictionary.
        prop_assert!(plan.weights.is_empty());
        // Binding order is alphabetical, whatever the declaration order; indices are 0..n.
        prop_assert!(sorted_by_name(&plan.inputs) && sorted_by_name(&plan.outputs));
        for (i, b) in plan.inputs.iter().chain(&plan.outputs).enumerate() {
            let n = plan.inputs.len();
            prop_assert_eq!(b.index, if i < n { i } else { i - n });
        }
        let mut declared: Vec<&String> = ins.iter().map(|(n, _)| n).collect();
        declared.sort();
        let bound: Vec<&String> = plan.inputs.iter().map(|b| &b.name).collect();
        prop_assert_eq!(declared, bound);
        for b in &plan.inputs {
            let io = &ins.iter().find(|(n, _)| *n == b.name).unwrap().1;
            prop_assert_eq!(&b.ty.shape, &vec![1, io.c, 1, io.s]);
        }
        // Rows of 64 bytes.
        for b in plan.inputs.iter().chain(&plan.outputs) {
            prop_assert_eq!(b.row_bytes() % ROW_ALIGN, 0);
        }
        check_surface_rule(&plan)?;
        prop_assert_eq!(plan.qos, 21);
        prop_assert!(VALID_QOS.contains(&plan.qos));
    }

    /// The baked-weight form: one dictionary entry keyed by the MIL path, offset 0, the file's bytes,
    /// written at the path relative to the model directory.
    #[test]
    fn conv_matmul_plan(k in 1usize..300, m in 1usize..300, j in 2usize..20) {
        let n = 32 * j;
        let text = ane_mil::text::emit(&conv_matmul(k, m, n));
        let blob = weights_blob_fp16(&vec![half::f16::ONE; m * k]);
        let unused = WeightFile { path: "@model_path/weights/other.bin".into(), bytes: vec![1, 2, 3] };
        let plan = DriverPlan::new(
            &text,
            &[unused, WeightFile { path: WEIGHT_PATH.into(), bytes: blob.clone() }],
        )
        .unwrap();
        prop_assert_eq!(plan.weights.len(), 1);
        let e = &plan.weights[0];
        prop_assert_eq!(e.key.as_str(), WEIGHT_PATH);
        prop_assert_eq!(e.offset, 0);
        prop_assert_eq!(&e.data[..], &blob[..]);
        let rels: Vec<&str> = plan.files.iter().map(|f| f.rel_path.as_str()).collect();
        prop_assert_eq!(rels, vec![MODEL_MIL_FILE, "weights/weight.bin"]);
        prop_assert_eq!(&plan.files[1].contents[..], &blob[..]);
        prop_assert_eq!(plan.surface_bytes, alloc_size(k.max(m) * n * 2));
        check_surface_rule(&plan)?;
    }

    /// Several BLOBFILE paths, some repeated: one entry per distinct path, sorted, every key
    /// written under the model directory at its relative path.
    #[test]
    fn every_blobfile_has_an_entry_and_a_file(
        paths in prop::collection::btree_set("[a-z]{1,6}(/[a-z0-9_]{1,6}){0,2}\\.bin", 1..5),
        repeat in 1usize..3,
    ) {
        let keys: Vec<String> = paths.iter().map(|p| format!("{MODEL_PATH_PREFIX}{p}")).collect();
        let ins = vec![("x_in".to_string(), Io { dtype: DType::Fp16, c: 4, s: 64 })];
        let blobs: Vec<(String, usize)> = keys.iter().map(|k| (k.clone(), repeat)).collect();
        let text = ane_mil::text::emit(&identity_program(&ins, &["y_out".into()], &blobs));
        let files: Vec<WeightFile> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| WeightFile { path: k.clone(), bytes: vec![i as u8; 10 + i] })
            .collect();
        let plan = DriverPlan::new(&text, &files).unwrap();
        let got: Vec<&str> = plan.weights.iter().map(|e| e.key.as_str()).collect();
        let want: Vec<&str> = keys.iter().map(String::as_str).collect();
        prop_assert_eq!(got, want);
        for (e, f) in plan.weights.iter().zip(&plan.files[1..]) {
            prop_assert_eq!(e.offset, 0);
            prop_assert_eq!(format!("{MODEL_PATH_PREFIX}{}", f.rel_path), e.key.clone());
            prop_assert!(!f.rel_path.split('/').any(|c| c == ".." || c.is_empty()));
            let given = files.iter().find(|w| w.path == e.key).unwrap();
            prop_assert_eq!(&e.data[..], &given.bytes[..]);
        }
        // Dropping any one file makes the plan fail, naming the path.
        for missing in &keys {
            let fewer: Vec<WeightFile> =
                files.iter().filter(|w| &w.path != missing).cloned().collect();
            let err = DriverPlan::new(&text, &fewer).unwrap_err();
            prop_assert!(matches!(err, EngineError::Weights(ref m) if m.contains(missing.as_str())));
        }
    }

    /// Rows that are not a multiple of 64 bytes are refused.
    #[test]
    fn odd_rows_are_refused(s in MIN_LAST_AXIS..2000) {
        prop_assume!(s % 32 != 0);
        let ins = vec![("x_in".to_string(), Io { dtype: DType::Fp16, c: 2, s })];
        let text = ane_mil::text::emit(&identity_program(&ins, &["y_out".into()], &[]));
        let err = DriverPlan::new(&text, &[]).unwrap_err();
        prop_assert!(matches!(err, EngineError::Compile(ref m) if m.contains("row rule")));
    }

    /// A last axis below 64 elements is refused even when its rows are a multiple of 64 bytes.
    #[test]
    fn short_last_axes_are_refused(j in 1usize..2) {
        let s = 32 * j;
        let ins = vec![("x_in".to_string(), Io { dtype: DType::Fp16, c: 2, s })];
        let text = ane_mil::text::emit(&identity_program(&ins, &["y_out".into()], &[]));
        let err = DriverPlan::new(&text, &[]).unwrap_err();
        prop_assert!(matches!(err, EngineError::Compile(ref m) if m.contains("last axis below 64")));
    }

    /// Weight paths escaping the model directory are refused.
    #[test]
    fn escaping_paths_are_refused(
        pre in "[a-z]{0,4}",
        bad in prop::sample::select(vec!["..", ".", ""]),
        post in "[a-z]{1,4}",
    ) {
        let path = format!("{MODEL_PATH_PREFIX}{pre}/{bad}/{post}");
        prop_assert!(relative_weight_path(&path).is_err());
        let rel = format!("{pre}/{post}");
        prop_assert_eq!(
            relative_weight_path(&format!("{MODEL_PATH_PREFIX}{rel}")).is_ok(),
            !pre.is_empty()
        );
    }
}

#[test]
fn paths_outside_model_path_and_reserved_names_are_refused() {
    for p in [
        "/tmp/weight.bin",
        "weights/weight.bin",
        "@model_path/",
        "@model_path//x.bin",
        "@model_path/../x.bin",
        "@model_path/model.mil",
        "@model_path/net.plist",
        "@model_path/data",
        "@model_path/a\\b.bin",
    ] {
        assert!(relative_weight_path(p).is_err(), "{p}");
    }
    assert_eq!(
        relative_weight_path(WEIGHT_PATH).unwrap(),
        "weights/weight.bin"
    );
}

#[test]
fn request_errors_name_the_rule() {
    let text = ane_mil::text::emit(&ane_mil::build::dyn_matmul(64, 64, 64));
    let plan = DriverPlan::new(&text, &[]).unwrap();
    let names: Vec<&str> = plan.inputs.iter().map(|b| b.name.as_str()).collect();
    assert_eq!(names, ["a_x", "b_w"]);
    let s = plan.surface_bytes;
    let msg = |r: Result<(), EngineError>| r.unwrap_err().to_string();
    assert!(msg(plan.check_request(&[s, s + 128], &[s])).contains("equal"));
    assert!(msg(plan.check_request(&[s], &[s])).contains("inputs"));
    let small = MIN_SURFACE_BYTES - 128;
    assert!(msg(plan.check_request(&[small, small], &[small])).contains(">="));
    assert!(msg(plan.check_request(&[s + 1, s + 1], &[s + 1])).contains("multiple"));
    // Larger but equal surfaces are fine.
    assert!(plan.check_request(&[s + 128; 2], &[s + 128]).is_ok());
}

#[test]
fn model_dir_is_refcounted_by_identifier() {
    let mut r = DirRefcount::default();
    let a = std::path::Path::new("/t/AAA_BBB_CCC");
    let b = std::path::Path::new("/t/DDD");
    assert!(r.acquire(a), "first holder writes the files");
    assert!(!r.acquire(a));
    assert!(r.acquire(b));
    assert_eq!(r.holders(a), 2);
    assert!(!r.release(a), "another program still uses it");
    assert!(r.release(a), "last one removes it");
    assert!(!r.release(a), "unknown now");
    assert!(r.release(b));
}

#[test]
fn model_dir_files_and_mode() {
    let text = ane_mil::text::emit(&conv_matmul(64, 64, 64));
    let blob = weights_blob_fp16(&vec![half::f16::ONE; 64 * 64]);
    let plan = DriverPlan::new(
        &text,
        &[WeightFile {
            path: WEIGHT_PATH.into(),
            bytes: blob.clone(),
        }],
    )
    .unwrap();
    let root = std::env::temp_dir().join(format!("ane-plan-test-{}", std::process::id()));
    // The parent (NSTemporaryDirectory on a Mac) must exist: only the model directory is created.
    std::fs::create_dir_all(&root).unwrap();
    let dir = root.join("HEX_ID");
    write_model_dir(&dir, &plan).unwrap();
    assert_eq!(
        std::fs::read(dir.join("model.mil")).unwrap(),
        text.as_bytes()
    );
    assert_eq!(std::fs::read(dir.join("weights/weight.bin")).unwrap(), blob);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for d in [&dir, &dir.join("weights")] {
            let mode = std::fs::metadata(d).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o700, "{}", d.display());
        }
    }
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn load_is_retried_exactly_once() {
    let mut calls = 0;
    let mut slept = 0;
    let r: Result<(), &str> = with_one_retry(
        || {
            calls += 1;
            if calls == 1 {
                Err("busy")
            } else {
                Ok(())
            }
        },
        || slept += 1,
    );
    assert!(r.is_ok());
    assert_eq!((calls, slept), (2, 1));
    let mut calls = 0;
    let r: Result<(), &str> = with_one_retry(
        || {
            calls += 1;
            Err("dead")
        },
        || {},
    );
    assert_eq!((r, calls), (Err("dead"), 2));
    let mut calls = 0;
    let r: Result<(), &str> = with_one_retry(
        || {
            calls += 1;
            Ok(())
        },
        || panic!("no delay on success"),
    );
    assert_eq!((r, calls), (Ok(()), 1));
    assert_eq!(LOAD_RETRY_DELAY_MS, 100);
}

#[test]
fn the_directory_lock_covers_the_writing_of_the_files() {
    use std::sync::{Arc, Mutex};
    let dirs = Arc::new(Mutex::new(DirRefcount::default()));
    let root = std::env::temp_dir().join(format!("ane-dirlock-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let dir = root.join("model");
    let file = dir.join("model.mil");
    let writers = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (dirs, dir, file, writers) =
                (dirs.clone(), dir.clone(), file.clone(), writers.clone());
            std::thread::spawn(move || {
                DirRefcount::acquire_and_write(
                    &dirs,
                    &dir,
                    || {
                        writers.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        std::fs::create_dir_all(&dir)?;
                        // Slow on purpose: a second builder must wait for the whole file.
                        std::thread::sleep(std::time::Duration::from_millis(50));
                        std::fs::write(&file, b"program(1.3)")
                    },
                    |_| {},
                )
                .unwrap();
                // Whoever returns sees the complete file.
                assert_eq!(std::fs::read(&file).unwrap(), b"program(1.3)");
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(
        writers.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "written once"
    );
    assert_eq!(dirs.lock().unwrap().holders(&dir), 4);
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn a_failed_write_leaves_no_holder_and_no_directory() {
    use std::sync::Mutex;
    let dirs = Mutex::new(DirRefcount::default());
    let dir = std::path::Path::new("/nonexistent/ane-model");
    let mut removed = Vec::new();
    let r: Result<(), &str> = DirRefcount::acquire_and_write(
        &dirs,
        dir,
        || Err("disk full"),
        |d| removed.push(d.to_path_buf()),
    );
    assert_eq!(r, Err("disk full"));
    assert_eq!(dirs.lock().unwrap().holders(dir), 0);
    assert_eq!(removed, vec![dir.to_path_buf()]);
}

#[test]
fn content_keys_tell_programs_apart_and_contents_can_be_dropped_after_load() {
    let text = ane_mil::text::emit(&conv_matmul(64, 64, 64));
    let w = |v: f32| WeightFile {
        path: WEIGHT_PATH.into(),
        bytes: weights_blob_fp16(&vec![half::f16::from_f32(v); 64 * 64]),
    };
    let a = DriverPlan::new(&text, &[w(1.0)]).unwrap();
    let same = DriverPlan::new(&text, &[w(1.0)]).unwrap();
    let other_weights = DriverPlan::new(&text, &[w(2.0)]).unwrap();
    let other_mil =
        DriverPlan::new(&ane_mil::text::emit(&conv_matmul(64, 64, 128)), &[w(1.0)]).unwrap();
    assert_eq!(a.content_key(), same.content_key());
    assert_ne!(a.content_key(), other_weights.content_key());
    assert_ne!(a.content_key(), other_mil.content_key());
    let mut loaded = a.clone();
    loaded.release_contents();
    assert!(loaded.weights.is_empty() && loaded.files.is_empty() && loaded.mil.is_empty());
    // What evaluations need stays.
    let sizes_in = vec![a.surface_bytes; a.inputs.len()];
    let sizes_out = vec![a.surface_bytes; a.outputs.len()];
    assert!(loaded.check_request(&sizes_in, &sizes_out).is_ok());
    assert_eq!(loaded.inputs, a.inputs);
}
