//! `ane doctor --json` on a machine without an ANE: the JSON contract of the report.
//!
//! Runs the hidden `--sweep small` (M = K = 256) so that the debug-build test stays fast; the
//! default (`full`: M, K in {1024, 2048, 4096} x N in {64, 128, 256, 512}) is the documented report
//! and has the same fields.

use std::process::Command;

#[test]
fn doctor_json_contract_without_ane() {
    let out_file = std::env::temp_dir().join(format!("ane-doctor-{}.json", std::process::id()));
    // The plugin's split calibrations: one key of this machine's OS build, one of a Mac.
    let cache = std::env::temp_dir().join(format!("ane-doctor-split-{}", std::process::id()));
    std::fs::create_dir_all(&cache).unwrap();
    let release = Command::new("uname").arg("-r").output().unwrap().stdout;
    let os = format!(
        "{}-{}",
        std::env::consts::OS,
        String::from_utf8_lossy(&release).trim()
    );
    std::fs::write(
        cache.join("split-calibrations.tsv"),
        format!(
            "reference|M4|{os}|RPC0\tt1:k256:m256:n512\t10.000\t10.000\t0.5\t4102444800\n\
             reference|M4|{os}|RPC0\tt1:k512:m256:n512\t1.000\t4.000\t0.875\t4102444800\n\
             reference|M4|{os}|RPC0\tt1:k512:m512:n512\t1.000\t100.000\t0\t4102444800\n\
             ane|M4|macos-0.0.0|MTL0\tt8:k4096:m4096:n512\t1.000\t10.000\t0.125\t4102444800\n"
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ane"))
        .args(["doctor", "--json", "--sweep", "small", "--out"])
        .arg(&out_file)
        .env("GGML_ANE_CACHE_DIR", &cache)
        .output()
        .expect("run ane doctor");
    std::fs::remove_dir_all(&cache).ok();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stdout is JSON");
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out_file).unwrap()).unwrap();
    std::fs::remove_file(&out_file).ok();
    assert_eq!(r, written, "--out writes the same report");

    assert!(r["platform"].is_string());
    // The report's keys: the new `split` and `commands` beside the ones it always had.
    let keys: Vec<&str> = r.as_object().unwrap().keys().map(|k| k.as_str()).collect();
    let mut want = vec![
        "ane_available",
        "bench",
        "checks",
        "chip",
        "commands",
        "compare",
        "coreml",
        "engine",
        "first_failed_step",
        "host",
        "int8_input",
        "latency",
        "limits",
        "platform",
        "plugin_engine",
        "probes",
        "reps",
        "split",
        "steps",
        "steps_engine",
        "sweep",
        "version",
    ];
    want.sort_unstable();
    let mut got = keys.clone();
    got.sort_unstable();
    assert_eq!(got, want);
    // Whether splitting pays: only this machine's key is counted.
    let split = &r["split"];
    assert_eq!(split["found"], true, "{split}");
    assert_eq!(split["matched"], true, "{split}");
    assert_eq!(split["this_os"], os.as_str(), "{split}");
    let machines = split["machines"].as_array().unwrap();
    assert_eq!(machines.len(), 1, "{split}");
    assert_eq!(machines[0]["machine"], format!("reference|M4|{os}|RPC0"));
    assert_eq!(machines[0]["split_classes"], 2, "{split}");
    // The device alone 100x faster than the GPU on the last class: 100x predicted.
    assert_eq!(machines[0]["best_predicted_speedup"], 100.0, "{split}");
    assert_eq!(split["pays"], true, "{split}");
    let summary = split["summary"].as_str().unwrap();
    assert!(
        summary.starts_with("splitting pays on this machine"),
        "{summary}"
    );
    assert!(
        summary.contains(
            "best predicted 2.00x over the GPU alone for a split class (t1:k256:m256:n512"
        ),
        "{summary}"
    );
    assert!(summary.contains("not an ANE figure"), "{summary}");
    assert!(split["how"].as_array().unwrap().is_empty(), "{split}");
    let c = &r["commands"];
    assert!(
        ["metal", "no_ane", "rpc_stand_in"].contains(&c["case"].as_str().unwrap()),
        "{c}"
    );
    let why = c["why"].as_str().unwrap();
    assert!(!why.is_empty() && !why.contains('\n'), "{c}");
    assert!(!c["lines"].as_array().unwrap().is_empty(), "{c}");
    assert!(c["lines"].as_array().unwrap().iter().all(|l| l.is_string()));
    assert!(c["notes"].as_array().unwrap().iter().all(|l| l.is_string()));
    if cfg!(target_vendor = "apple") {
        return; // On a Mac the values depend on the machine; the fields are checked above/below.
    }
    // No ANE here: the reference engine beside llama.cpp's RPC backend standing in for the GPU.
    assert_eq!(c["case"], "rpc_stand_in", "{c}");
    assert!(why.contains("reference engine"), "{why}");
    let lines: Vec<&str> = c["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect();
    assert_eq!(lines[0], "ggml-rpc-server -H 127.0.0.1 -p 50052");
    assert!(
        lines[1].starts_with("GGML_ANE_ENGINE=reference GGML_BACKEND_PATH=")
            && lines[1]
                .ends_with("llama-completion -m model.gguf --rpc 127.0.0.1:50052 --device ANE,RPC0 -ts 0,1 -ngl 99"),
        "{lines:?}"
    );
    assert!(lines.iter().all(|l| !l.contains("MTL0")), "{lines:?}");
    assert_eq!(r["ane_available"], false);
    assert_eq!(r["engine"], "reference");
    assert!(r["chip"].is_string());
    let checks = r["checks"].as_array().unwrap();
    assert!(checks.len() >= 3, "{checks:?}");
    for c in checks {
        assert!(
            c["name"].is_string() && c["ok"].is_boolean() && c["detail"].is_string(),
            "{c}"
        );
    }
    // The host signals (real ANE, virtual machine) are read only on macOS; the check says so.
    assert!(r["host"].is_null(), "{}", r["host"]);
    let host = checks.iter().find(|c| c["name"] == "host").unwrap();
    assert_eq!(host["ok"], false, "{host}");
    assert!(host["detail"]
        .as_str()
        .unwrap()
        .contains("kern.hv_vmm_present"));
    // The step log: every call the engine made, in order, and none failed here.
    assert_eq!(r["steps_engine"], "reference");
    let steps: Vec<&str> = r["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["step"].as_str().unwrap())
        .collect();
    assert_eq!(&steps[..3], ["compile", "load", "evaluate"], "{steps:?}");
    assert!(steps.contains(&"unload"), "{steps:?}");
    assert!(
        r["first_failed_step"].is_null(),
        "{}",
        r["first_failed_step"]
    );
    let canary = checks.iter().find(|c| c["name"] == "canary").unwrap();
    assert_eq!(canary["ok"], true, "{canary}");
    // The int8-weight probe passes on the reference engine, bit for bit; used only when asked.
    let int8 = checks
        .iter()
        .find(|c| c["name"] == "canary_int8_input")
        .unwrap();
    assert_eq!(int8["ok"], true, "{int8}");
    assert!(
        int8["detail"]
            .as_str()
            .unwrap()
            .contains("only with GGML_ANE_INT8_INPUT=1"),
        "{int8}"
    );
    let i = &r["int8_input"];
    assert_eq!(
        (&i["engine"], &i["ok"], &i["used"]),
        (&"reference".into(), &true.into(), &false.into()),
        "{i}"
    );
    assert!(i["failed_step"].is_null() && i["error"].is_null(), "{i}");
    assert_eq!(i["max_rel_err"], 0.0, "{i}");
    let bench = r["bench"].as_array().unwrap();
    assert!(bench.len() >= 4, "{bench:?}");
    for b in bench {
        for f in ["m", "k", "n"] {
            assert!(b[f].as_u64().unwrap() > 0, "{b}");
        }
        for f in ["ms", "tflops", "max_rel_err"] {
            assert!(b[f].as_f64().unwrap() >= 0.0, "{b}");
        }
        assert!(b["max_rel_err"].as_f64().unwrap() < 1e-2, "{b}");
    }
}

fn doctor(extra: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_ane"))
        .args(["doctor", "--json", "--sweep", "small"])
        .args(extra)
        .output()
        .expect("run ane doctor");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("stdout is JSON")
}

#[test]
fn the_report_has_a_core_ml_section_and_says_which_engine_the_plugin_would_use() {
    let r = doctor(&[]);
    let c = &r["coreml"];
    assert_eq!(c["engine"], "coreml");
    assert!(c["available"].is_boolean());
    if cfg!(target_vendor = "apple") {
        return;
    }
    assert_eq!(c["available"], false);
    assert!(c["error"].as_str().unwrap().contains("not macOS"), "{c}");
    assert_eq!(r["plugin_engine"], "none");
    assert_eq!(r["compare"].as_array().unwrap().len(), 0);
}

#[test]
fn the_core_ml_section_measures_what_the_private_api_section_does() {
    // The reference engine stands in for Core ML: every field of the section is filled as on a
    // Mac, and labelled as the stand-in's.
    let r = doctor(&["--stand-in-coreml"]);
    let c = &r["coreml"];
    assert_eq!(c["measured"], "reference");
    assert_eq!(c["available"], true, "{c}");
    let names: Vec<&str> = c["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "canary",
            "canary_tiled_tokens",
            "placement",
            "sweep",
            "canary_int8_input"
        ]
    );
    let placement = c["placement"].as_array().unwrap();
    assert!(placement
        .iter()
        .any(|o| o["op"] == "matmul" && o["device"] == "neural_engine"));
    assert_eq!(
        c["bench"].as_array().unwrap().len(),
        r["bench"].as_array().unwrap().len()
    );
    for f in [
        "compile_and_load_ms",
        "compile_and_load_again_ms",
        "dispatch_ms",
    ] {
        assert!(c["latency"][f].as_f64().unwrap() >= 0.0, "{}", c["latency"]);
    }
    assert!(c["steps"].as_array().unwrap().len() > 4);
    // Side by side: a row per shape; no private-API time where the ANE was not measured.
    let rows = r["compare"].as_array().unwrap();
    assert_eq!(rows.len(), 4);
    assert!(rows.iter().all(|row| row["coreml_ms"].as_f64().is_some()));
    if !cfg!(target_vendor = "apple") {
        assert!(rows.iter().all(|row| row["ane_ms"].is_null()));
        // A stand-in is never what the plugin would use.
        assert_eq!(r["plugin_engine"], "none");
    }
}

#[test]
fn the_commands_carry_the_plugin_path_from_ggml_backend_path() {
    // Any file will do: the doctor names it, it does not load it.
    let dir = std::env::temp_dir().join(format!("ane doctor plugin {}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let plugin = dir.join("libggml_ane.test");
    std::fs::write(&plugin, b"").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ane"))
        .args(["doctor", "--json", "--sweep", "small"])
        .env("GGML_BACKEND_PATH", &plugin)
        .output()
        .expect("run ane doctor");
    std::fs::remove_dir_all(&dir).ok();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let c = &r["commands"];
    let path = std::fs::canonicalize(dir.parent().unwrap())
        .unwrap()
        .join(dir.file_name().unwrap())
        .join("libggml_ane.test");
    assert_eq!(c["plugin_path"], path.to_str().unwrap(), "{c}");
    assert_eq!(c["plugin_path_from"], "GGML_BACKEND_PATH");
    // The folder has spaces: the prefix is quoted for the shell.
    let prefix = format!("GGML_BACKEND_PATH='{}' ", path.display());
    let lines = c["lines"].as_array().unwrap();
    assert!(
        lines.iter().any(|l| l.as_str().unwrap().contains(&prefix)),
        "{prefix}: {c}"
    );
    assert!(!c["notes"].to_string().contains("was not found"), "{c}");
}

#[test]
fn the_text_report_ends_with_the_command_lines() {
    // No calibrations: the split lines say how to produce them.
    let cache = std::env::temp_dir().join(format!("ane-doctor-nosplit-{}", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_ane"))
        .args(["doctor", "--json", "--sweep", "small"])
        .env("GGML_ANE_CACHE_DIR", &cache)
        .output()
        .expect("run ane doctor");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stdout is JSON");
    let out = Command::new(env!("CARGO_BIN_EXE_ane"))
        .args(["doctor", "--sweep", "small"])
        .env("GGML_ANE_CACHE_DIR", &cache)
        .output()
        .expect("run ane doctor");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let c = &json["commands"];
    let mut want = vec![format!(
        "commands ({}): {}",
        c["case"].as_str().unwrap(),
        c["why"].as_str().unwrap()
    )];
    for l in c["lines"].as_array().unwrap() {
        want.push(format!("  {}", l.as_str().unwrap()));
    }
    for n in c["notes"].as_array().unwrap() {
        want.push(format!("  note: {}", n.as_str().unwrap()));
    }
    // Before the commands: whether splitting with a GPU pays (here: not measured, and how).
    let split = &json["split"];
    assert_eq!(split["found"], false, "{split}");
    let mut split_lines = vec![format!("split: {}", split["summary"].as_str().unwrap())];
    for h in split["how"].as_array().unwrap() {
        split_lines.push(format!("  {}", h.as_str().unwrap()));
    }
    assert!(split_lines[0].starts_with("split: no calibrations in "));
    assert!(
        split_lines[1].contains("GGML_ANE_GPU_SHARE=auto"),
        "{split}"
    );
    assert!(
        split_lines[2].contains("ane bench split --llama-bench"),
        "{split}"
    );
    want.splice(0..0, split_lines);
    let got: Vec<&str> = text.lines().collect();
    assert!(got.len() > want.len(), "{text}");
    assert_eq!(&got[got.len() - want.len()..], want, "{text}");
    // What came before is the report as it always was, ending with the engine line.
    assert!(
        got[got.len() - want.len() - 1].starts_with("the plugin would use: "),
        "{text}"
    );
    assert!(got[0].starts_with("platform "), "{text}");
}

#[test]
fn the_probes_are_reported_with_the_forms_tried_their_results_and_the_winner() {
    if cfg!(target_vendor = "apple") {
        return; // The stand-in is measured only where the ANE is not.
    }
    // A stand-in whose compiler refuses the shorthand dialect: the verbose one wins, one extra
    // compile; the Core ML stand-in keeps the synchronous compile call.
    let r = doctor(&["--stand-in-coreml", "--stand-in-faults", "shorthand=1"]);
    let probes = r["probes"].as_array().unwrap();
    assert_eq!(probes.len(), 2, "{probes:?}");
    let private = &probes[0];
    assert_eq!(private["role"], "private_api_stand_in");
    assert_eq!(private["extra_compiles"], 1);
    let dialect = &private["probes"][0];
    assert_eq!(dialect["probe"], "mil_dialect");
    assert_eq!(
        dialect["forms"],
        serde_json::json!(["shorthand", "verbose"])
    );
    let tried: Vec<(&str, &str)> = dialect["tried"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["form"].as_str().unwrap(), t["result"].as_str().unwrap()))
        .collect();
    assert_eq!(tried, [("shorthand", "failed"), ("verbose", "pass")]);
    assert_eq!(dialect["winner"], "verbose");
    assert!(dialect["report"].as_str().unwrap().contains("M1/M2"));
    assert_eq!(private["probes"][1]["probe"], "surface_order");
    assert_eq!(private["probes"][1]["winner"], "equal");
    assert_eq!(private["runs"].as_array().unwrap().len(), 2);
    let coreml = &probes[1];
    assert_eq!(coreml["role"], "coreml");
    assert_eq!(coreml["probes"][0]["probe"], "compile_call");
    assert_eq!(coreml["probes"][0]["winner"], "compileModelAtURL:error:");
    assert_eq!(r["coreml"]["probes"], *coreml);
    // The canaries ran in the winning dialect: the plugin's forms pass, compressed weights
    // (an iOS18 op) cannot be written in it.
    let check = |name: &str| {
        r["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap()
            .clone()
    };
    assert_eq!(check("canary_tiled_tokens")["ok"], true);
    assert_eq!(check("canary_compressed")["ok"], false);
    // Nor can an int8 input (iOS16's cast has none): the probe names the step that stopped it,
    // and the report's first failed step stays the dialect probe's, not the int8 probe's.
    let int8 = check("canary_int8_input");
    assert_eq!(int8["ok"], false);
    assert!(
        int8["detail"]
            .as_str()
            .unwrap()
            .contains("failed at step compile"),
        "{int8}"
    );
    assert_eq!(r["int8_input"]["failed_step"], "compile");
    let first = r["first_failed_step"].as_str().unwrap();
    assert!(
        first.contains("shorthand") && !first.contains("int8"),
        "{first}"
    );
    assert!(r["int8_input"]["error"]
        .as_str()
        .unwrap()
        .contains("`b_wq` is int8"));
    // The text report says the same, one line per probe.
    let out = Command::new(env!("CARGO_BIN_EXE_ane"))
        .args([
            "doctor",
            "--sweep",
            "small",
            "--stand-in-faults",
            "shorthand=1",
        ])
        .output()
        .expect("run ane doctor");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.lines().any(|l| l
            == "probe mil_dialect (private_api_stand_in, reference): shorthand failed, verbose pass -> verbose"),
        "{text}"
    );
    // Without faults: the conservative forms, no extra compile.
    let r = doctor(&[]);
    let private = &r["probes"][0];
    assert_eq!(private["extra_compiles"], 0);
    for p in private["probes"].as_array().unwrap() {
        assert_eq!(p["winner"], p["forms"][0], "{p}");
    }
}
