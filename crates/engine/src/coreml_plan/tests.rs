use super::*;
use ane_mil::build::{conv_matmul, weights_blob_fp16, WEIGHT_PATH};

fn baked(k: usize, m: usize, n: usize, v: f32) -> (String, Vec<WeightFile>) {
    let text = ane_mil::text::emit(&conv_matmul(k, m, n));
    let w = WeightFile {
        path: WEIGHT_PATH.into(),
        bytes: weights_blob_fp16(&vec![half::f16::from_f32(v); m * k]),
    };
    (text, vec![w])
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ane-coreml-plan-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn the_plan_keeps_the_private_drivers_bindings_and_the_packages_model() {
    let (text, w) = baked(64, 96, 64, 1.0);
    let plan = CoreMlPlan::new(&text, &w).unwrap();
    let driver = DriverPlan::new(&text, &w).unwrap();
    let names = |f: &[Feature]| f.iter().map(|f| f.name.clone()).collect::<Vec<_>>();
    let bnames = |b: &[Binding]| b.iter().map(|b| b.name.clone()).collect::<Vec<_>>();
    assert_eq!(names(&plan.inputs), bnames(&driver.inputs));
    assert_eq!(names(&plan.outputs), bnames(&driver.outputs));
    assert_eq!(plan.key, driver.content_key());
    for (f, b) in plan.inputs.iter().zip(&driver.inputs) {
        assert_eq!(f.shape, b.ty.shape);
        assert_eq!(f.bytes, b.bytes());
        // C-contiguous: the last stride is 1 and each stride spans the axes after it.
        assert_eq!(*f.strides.last().unwrap(), 1);
        assert_eq!(f.strides[0] * f.shape[0] * 2, f.bytes);
    }
    // The package written from the plan reads back to the program of the text.
    let dir = tmp("pkg").join("p.mlpackage");
    plan.write_package(&dir).unwrap();
    let read = ane_coreml::package::read(&dir).unwrap();
    let back = ane_coreml::from_model(&read.model).unwrap();
    assert_eq!(
        ane_mil::text::emit(&back),
        ane_mil::text::emit(&ane_mil::text::parse(&text).unwrap())
    );
    assert_eq!(read.weights, plan.weights);
    // What a prediction needs survives dropping the model bytes.
    let loaded = plan.clone().loaded();
    assert!(loaded.model.is_empty() && loaded.weights.is_empty());
    assert_eq!(loaded.inputs, plan.inputs);
    let _ = fs::remove_dir_all(dir.parent().unwrap());
}

#[test]
fn requests_must_have_room_for_every_feature() {
    let (text, w) = baked(64, 64, 64, 1.0);
    let plan = CoreMlPlan::new(&text, &w).unwrap();
    let need_in: Vec<usize> = plan.inputs.iter().map(|f| f.bytes).collect();
    let need_out: Vec<usize> = plan.outputs.iter().map(|f| f.bytes).collect();
    assert!(plan.check_request(&need_in, &need_out).is_ok());
    // Larger surfaces of unequal sizes are fine: Core ML copies.
    let big: Vec<usize> = need_in.iter().map(|b| b + 4096).collect();
    assert!(plan.check_request(&big, &need_out).is_ok());
    let mut small = need_out.clone();
    small[0] -= 2;
    let e = plan
        .check_request(&need_in, &small)
        .unwrap_err()
        .to_string();
    assert!(e.contains(&plan.outputs[0].name), "{e}");
    let e = plan.check_request(&[], &need_out).unwrap_err().to_string();
    assert!(e.contains("inputs"), "{e}");
}

#[test]
fn programs_the_private_driver_refuses_are_refused_too() {
    // A 48-wide last axis breaks the shortest-axis rule of both engines.
    let (text, w) = baked(64, 64, 48, 1.0);
    assert!(matches!(
        CoreMlPlan::new(&text, &w),
        Err(EngineError::Compile(_))
    ));
    assert!(matches!(
        CoreMlPlan::new("program(1.3) garbage", &[]),
        Err(EngineError::Parse(_))
    ));
    let (text, _) = baked(64, 64, 64, 1.0);
    assert!(matches!(
        CoreMlPlan::new(&text, &[]),
        Err(EngineError::Weights(_))
    ));
}

#[test]
fn fp32_features_are_refused() {
    let text = ane_mil::text::emit(&conv_matmul(64, 64, 64)).replace("fp16", "fp32");
    let (_, w) = baked(64, 64, 64, 1.0);
    match CoreMlPlan::new(&text, &w) {
        Err(EngineError::Compile(m)) => assert!(m.contains("fp16"), "{m}"),
        // The weights blob is fp16, so the text may also fail on its const; either way refused.
        Err(_) => {}
        Ok(_) => panic!("fp32 features accepted"),
    }
}

#[test]
fn cache_entries_are_keyed_by_content_and_os_and_installed_once() {
    let base = tmp("cache");
    let cache = Cache::open(&base, "macOS 15.1 (24B83)").unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(cache.root()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
    }
    let other_os = Cache::open(&base, "macOS 15.2 (24C101)").unwrap();
    assert_ne!(cache.name(7), cache.name(8));
    assert_ne!(cache.name(7), other_os.name(7));
    assert_eq!(cache.name(7), cache.name(7));
    assert!(cache.name(7).ends_with(COMPILED_SUFFIX));
    assert!(cache.lookup(7).is_none());

    // A compile's output is moved in and found afterwards.
    let staging = cache.staging(7).unwrap();
    let compiled = staging.join("model.mlmodelc");
    fs::create_dir_all(compiled.join("weights")).unwrap();
    fs::write(compiled.join("model.mil"), b"mil").unwrap();
    let entry = cache.install(7, &compiled).unwrap();
    assert_eq!(cache.lookup(7), Some(entry.clone()));
    assert_eq!(fs::read(entry.join("model.mil")).unwrap(), b"mil");
    assert!(!compiled.exists());
    cache.discard(&staging);
    assert!(!staging.exists());

    // A second installer of the same key keeps the first entry and drops its own copy.
    let again = base.join("again.mlmodelc");
    fs::create_dir_all(&again).unwrap();
    fs::write(again.join("model.mil"), b"other").unwrap();
    assert_eq!(cache.install(7, &again).unwrap(), entry);
    assert_eq!(fs::read(entry.join("model.mil")).unwrap(), b"mil");
    assert!(!again.exists());

    // Nothing outside the cache is ever removed by discard.
    let outside = base.join("keep");
    fs::create_dir_all(&outside).unwrap();
    cache.discard(&outside);
    assert!(outside.exists());
    let _ = fs::remove_dir_all(&base);
}

#[cfg(unix)]
#[test]
fn a_symlinked_cache_is_refused() {
    let base = tmp("symlink");
    let elsewhere = base.join("elsewhere");
    fs::create_dir_all(&elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, base.join(CACHE_DIR_NAME)).unwrap();
    assert!(Cache::open(&base, "x").is_err());
    // A symlink planted at an entry's name is not a cached model.
    let _ = fs::remove_file(base.join(CACHE_DIR_NAME));
    let cache = Cache::open(&base, "x").unwrap();
    std::os::unix::fs::symlink(&elsewhere, cache.entry(3)).unwrap();
    assert!(cache.lookup(3).is_none());
    let _ = fs::remove_dir_all(&base);
}

#[test]
fn the_cache_keeps_the_newest_entries_and_drops_dead_staging() {
    let base = tmp("prune");
    let cache = Cache::open(&base, "x").unwrap();
    for key in 0..5u128 {
        fs::create_dir_all(cache.entry(key)).unwrap();
        // Distinct modification times, oldest first.
        let t =
            std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1000 + key as u64);
        let f = fs::File::open(cache.entry(key)).unwrap();
        f.set_modified(t).unwrap();
    }
    // A staging folder of a process that cannot exist, and one of ours.
    let dead = cache.root().join(".staging-4294967-1");
    fs::create_dir_all(&dead).unwrap();
    let ours = cache.staging(9).unwrap();
    cache.prune(3).unwrap();
    let left: Vec<u128> = (0..5).filter(|k| cache.lookup(*k).is_some()).collect();
    assert_eq!(left, vec![2, 3, 4]);
    assert!(!dead.exists());
    assert!(ours.exists());
    let _ = fs::remove_dir_all(&base);
}

#[test]
fn a_cached_model_that_fails_to_load_is_compiled_once_more() {
    assert_eq!(on_load_failure(true), LoadFailure::DiscardAndRecompile);
    assert_eq!(on_load_failure(false), LoadFailure::Fail);
}

fn op(op: &str, device: OpDevice) -> OpPlacement {
    OpPlacement {
        op: op.into(),
        device,
    }
}

#[test]
fn the_verdict_wants_every_matmul_on_the_neural_engine() {
    use OpDevice::*;
    let good = [
        op("cast", Cpu),
        op("matmul", NeuralEngine),
        op("conv", NeuralEngine),
    ];
    assert_eq!(verdict(Some(&good)), Ok(()));
    let split = [op("matmul", NeuralEngine), op("matmul", Cpu)];
    let e = verdict(Some(&split)).unwrap_err();
    assert!(e.contains("matmul on cpu"), "{e}");
    let gpu = [op("conv", Gpu)];
    assert!(verdict(Some(&gpu)).unwrap_err().contains("conv on gpu"));
    let unknown = [op("matmul", Unknown)];
    assert!(verdict(Some(&unknown)).is_err());
    assert!(verdict(Some(&[op("cast", NeuralEngine)]))
        .unwrap_err()
        .contains("no matmul"));
    assert!(verdict(None).unwrap_err().contains("14.4"));
    assert_eq!(count_by_device(&good), vec![(NeuralEngine, 2), (Cpu, 1)]);
}

#[test]
fn opset_prefixed_operator_names_are_read_as_plain_ones() {
    use OpDevice::*;
    assert_eq!(operator_name("ios18.matmul"), "matmul");
    assert_eq!(operator_name("ios17.conv"), "conv");
    assert_eq!(operator_name("ios18.const"), "const");
    assert_eq!(operator_name("macos15.linear"), "linear");
    assert_eq!(operator_name("ios17_2.cast"), "cast");
    assert_eq!(operator_name("matmul"), "matmul");
    // Not an opset: kept whole, so nothing is mistaken for a matmul.
    assert_eq!(operator_name("custom.matmul"), "custom.matmul");
    assert_eq!(operator_name("ios18."), "ios18.");
    // Where the plan is read: prefixes stripped, constants without a usage left out.
    assert_eq!(placed("ios18.const", None), None);
    assert_eq!(
        placed("ios18.matmul", Some(NeuralEngine)),
        Some(op("matmul", NeuralEngine))
    );
    assert_eq!(placed("ios17.conv", None), Some(op("conv", Unknown)));
    // What Core ML really reports: the verdict finds the work and its device.
    let real: Vec<OpPlacement> = [
        ("ios18.const", None),
        ("ios18.reshape", Some(NeuralEngine)),
        ("ios18.matmul", Some(NeuralEngine)),
        ("ios17.conv", Some(NeuralEngine)),
    ]
    .iter()
    .filter_map(|&(n, d)| placed(n, d))
    .collect();
    assert_eq!(real.len(), 3);
    assert_eq!(verdict(Some(&real)), Ok(()));
    // The verdict is robust to names that were not normalised.
    let raw = [op("ios18.matmul", NeuralEngine), op("ios17.conv", Cpu)];
    assert_eq!(
        verdict(Some(&raw)).unwrap_err(),
        "its compute plan keeps work off the Neural Engine: conv on cpu"
    );
    assert!(verdict(Some(&[op("ios18.const", NeuralEngine)]))
        .unwrap_err()
        .contains("no matmul"));
}

#[test]
fn a_compute_plan_is_asked_for_only_with_coremldata_and_only_once() {
    let d = tmp("lazy");
    let compiled = d.join("m.mlmodelc");
    fs::create_dir_all(&compiled).unwrap();
    let plan = vec![op("matmul", OpDevice::NeuralEngine)];
    let asked = std::cell::Cell::new(0);
    let load = || {
        asked.set(asked.get() + 1);
        Ok(Some(plan.clone()))
    };
    // No coremldata.bin: MLComputePlan would throw an uncatchable C++ exception; never asked.
    let mut lazy = LazyPlacement::default();
    assert!(!lazy.asked() && lazy.known().is_none());
    let e = lazy.read(&compiled, load).unwrap_err();
    assert!(e.to_string().contains(COREMLDATA), "{e}");
    assert_eq!(asked.get(), 0);
    assert!(lazy.asked());
    assert_eq!(
        lazy.read(&compiled, load).unwrap(),
        None,
        "unknown for good"
    );
    assert_eq!(asked.get(), 0);
    // An empty file or a directory of that name is refused too; a missing model as well.
    fs::create_dir_all(compiled.join(COREMLDATA)).unwrap();
    assert!(plan_precheck(&compiled).is_err());
    fs::remove_dir(compiled.join(COREMLDATA)).unwrap();
    fs::write(compiled.join(COREMLDATA), b"").unwrap();
    assert!(plan_precheck(&compiled).is_err());
    assert!(plan_precheck(&d.join("gone.mlmodelc")).is_err());
    // With the file: asked once, then answered from memory.
    fs::write(compiled.join(COREMLDATA), b"x").unwrap();
    let mut lazy = LazyPlacement::default();
    assert_eq!(lazy.known(), None, "nothing read at load");
    assert_eq!(lazy.read(&compiled, load).unwrap(), Some(plan.clone()));
    assert_eq!(lazy.read(&compiled, load).unwrap(), Some(plan.clone()));
    assert_eq!(lazy.known(), Some(plan.clone()));
    assert_eq!(asked.get(), 1);
    // A load that fails (timeout, NSError) is not retried.
    let mut lazy = LazyPlacement::default();
    let failing = || -> Result<Option<Vec<OpPlacement>>, EngineError> {
        asked.set(asked.get() + 1);
        Err(EngineError::Load(
            "MLComputePlan did not answer within 30 s".into(),
        ))
    };
    assert!(lazy.read(&compiled, failing).is_err());
    assert_eq!(lazy.read(&compiled, failing).unwrap(), None);
    assert_eq!(asked.get(), 2);
    let _ = fs::remove_dir_all(d);
}
