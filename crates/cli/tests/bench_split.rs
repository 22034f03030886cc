//! `ane bench split`: the plugin's calibrations (`split-calibrations.tsv`) read back per machine
//! key, in text and JSON, and the measured mode end to end beside llama.cpp's RPC backend.
//!
//! The measured test needs the llama.cpp build and a tiny model under `target/` (`cargo xtask
//! llama`) and a plugin build. It runs only when they exist; with `ANE_GGML_TESTS=1` (as `cargo
//! xtask test` sets) a missing piece FAILS the test, otherwise it prints why it was not run.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;

/// A fresh folder under the system's temp folder, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let d = std::env::temp_dir().join(format!("ane-{name}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Two machines as the plugin writes them: the reference engine beside the RPC GPU (a failed GPU
/// class, a class the device keeps, a stale one) and an ANE beside Metal; and lines the plugin
/// would skip.
fn sample(dir: &Path) {
    let t = now();
    let old = t - 40 * 86_400;
    let text = format!(
        "reference|M4|linux-6.1-test|RPC0\tt1:k256:m128+128:n512\t4.452\t3.562\t0.5\t{t}\n\
         reference|M4|linux-6.1-test|RPC0\tt1:k256:m256:n512\t0.000\tinf\t0\t{t}\n\
         reference|M4|linux-6.1-test|RPC0\tt1:k512:m256:n512\t1.000\t100.000\t0\t{t}\n\
         reference|M4|linux-6.1-test|RPC0\tt1:k512:m512:n512\t10.000\t10.000\t0.5\t{old}\n\
         ane|M4|macos-24.1.0|MTL0\tt8:k4096:m4096:n512\t30.000\t10.000\t0.75\t{t}\n\
         not a line\n\
         ane|M4|macos-24.1.0|MTL0\tt8:k4096:m1024:n512\t1\t1\t2\t{t}\n"
    );
    std::fs::write(dir.join("split-calibrations.tsv"), text).unwrap();
}

fn ane(args: &[&str], env: &[(&str, &Path)]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ane"));
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run ane")
}

fn stdout_ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn calibrations_print_per_machine_with_the_predicted_speedup() {
    let dir = TempDir::new("split-text");
    sample(&dir.0);
    let d = dir.0.to_str().unwrap();
    let text = stdout_ok(&ane(&["bench", "split", "--cache-dir", d], &[]));
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].starts_with("calibrations: ") && lines[0].ends_with("split-calibrations.tsv"),
        "{text}"
    );
    assert!(text.contains("gpu_ms / max(device_ms * (1 - share), gpu_ms * share)"));
    let row = |class: &str| {
        *lines
            .iter()
            .find(|l| l.split_whitespace().next() == Some(class))
            .unwrap_or_else(|| panic!("{class}: {text}"))
    };
    // The reference engine's machine: labelled as such, its device column named after it.
    assert!(
        text.contains("machine reference|M4|linux-6.1-test|RPC0"),
        "{text}"
    );
    assert!(
        text.contains(
            "device: reference (the CPU stand-in, not the ANE); chip M4; linux-6.1-test; GPU RPC0"
        ),
        "{text}"
    );
    assert!(text.contains("reference ms"), "{text}");
    // 3.562 / max(4.452 * 0.5, 3.562 * 0.5) = 1.60.
    let cols: Vec<&str> = row("t1:k256:m128+128:n512").split_whitespace().collect();
    assert_eq!(cols[1..], ["4.452", "3.562", "0.500", "1.60x"], "{text}");
    let cols: Vec<&str> = row("t1:k256:m256:n512").split_whitespace().collect();
    assert_eq!(cols[1..], ["0.000", "failed", "0.000", "-"], "{text}");
    // The device alone against a GPU 100x slower: 100x.
    assert!(row("t1:k512:m256:n512").contains("100.00x"), "{text}");
    assert!(row("t1:k512:m512:n512").ends_with("(stale: measured again at next use)"));
    assert!(
        text.contains("2 of 4 classes split between the device and the GPU"),
        "{text}"
    );
    assert!(text.contains("best predicted 100.00x over the GPU alone (t1:k512:m256:n512); device = reference engine, not an ANE figure"), "{text}");
    // The ANE beside Metal: 10 / max(30 * 0.25, 10 * 0.75) = 1.33; no stand-in note.
    assert!(text.contains("machine ane|M4|macos-24.1.0|MTL0"), "{text}");
    assert!(text.contains("ane ms"), "{text}");
    assert!(row("t8:k4096:m4096:n512").ends_with("1.33x"), "{text}");
    assert!(
        text.contains("1 of 1 classes split between the device and the GPU (share strictly between 0 and 1); best predicted 1.33x over the GPU alone (t8:k4096:m4096:n512)\n"),
        "{text}"
    );
    // The line with a share of 2 is skipped, as the plugin skips it.
    assert!(!text.contains("t8:k4096:m1024:n512"), "{text}");
}

#[test]
fn calibrations_as_json() {
    let dir = TempDir::new("split-json");
    sample(&dir.0);
    let d = dir.0.to_str().unwrap();
    let out = stdout_ok(&ane(&["bench", "split", "--json", "--cache-dir", d], &[]));
    let r: Value = serde_json::from_str(&out).expect("one JSON object");
    assert_eq!(r["found"], true);
    assert!(r["file"]
        .as_str()
        .unwrap()
        .ends_with("split-calibrations.tsv"));
    assert!(r["measured"].is_null(), "{r}");
    let ms = r["machines"].as_array().unwrap();
    assert_eq!(ms.len(), 2);
    let m = &ms[0];
    assert_eq!(m["machine"], "reference|M4|linux-6.1-test|RPC0");
    assert_eq!(
        (&m["engine"], &m["chip"], &m["os"], &m["gpu"], &m["ane"]),
        (
            &Value::from("reference"),
            &Value::from("M4"),
            &Value::from("linux-6.1-test"),
            &Value::from("RPC0"),
            &Value::from(false)
        )
    );
    assert_eq!(m["split_classes"], 2);
    assert_eq!(m["stale_classes"], 1);
    assert_eq!(m["best_class"], "t1:k512:m256:n512");
    assert_eq!(m["best_predicted_speedup"], 100.0);
    let c = &m["classes"][0];
    assert_eq!(c["class"], "t1:k256:m128+128:n512");
    assert_eq!(c["device_ms"], 4.452);
    assert_eq!(c["gpu_ms"], 3.562);
    assert_eq!(c["share"], 0.5);
    assert_eq!(c["predicted_speedup"], 1.6);
    assert_eq!(c["stale"], false);
    let failed = &m["classes"][1];
    assert_eq!(failed["gpu_failed"], true);
    assert!(failed["gpu_ms"].is_null() && failed["predicted_speedup"].is_null());
    let a = &ms[1];
    assert_eq!(a["engine"], "ane");
    assert_eq!(a["ane"], true);
    assert_eq!(a["classes"].as_array().unwrap().len(), 1);
    assert_eq!(a["classes"][0]["predicted_speedup"], 1.333);
}

#[test]
fn no_calibrations_say_how_to_produce_them() {
    let dir = TempDir::new("split-none");
    let d = dir.0.to_str().unwrap();
    let text = stdout_ok(&ane(&["bench", "split", "--cache-dir", d], &[]));
    assert!(text.contains("no calibrations"), "{text}");
    assert!(text.contains("GGML_ANE_GPU_SHARE=auto"), "{text}");
    assert!(text.contains("ane bench split --llama-bench"), "{text}");
    // The default folder is the plugin's: GGML_ANE_CACHE_DIR.
    sample(&dir.0);
    let out = stdout_ok(&ane(
        &["bench", "split", "--json"],
        &[("GGML_ANE_CACHE_DIR", &dir.0)],
    ));
    let r: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["machines"].as_array().unwrap().len(), 2, "{r}");
}

#[test]
fn measured_mode_needs_its_arguments() {
    let out = ane(
        &[
            "bench",
            "split",
            "--llama-bench",
            "/nonexistent/llama-bench",
        ],
        &[],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("needs --model"), "{err}");
    let out = ane(
        &[
            "bench",
            "split",
            "--llama-bench",
            "/nonexistent/llama-bench",
            "--model",
            "m.gguf",
            "--gpu",
            "RPC0",
        ],
        &[],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("needs --rpc HOST:PORT"), "{err}");
}

// ---------------------------------------------------------------- measured, end to end

/// Linux only: the reference engine beside llama.cpp's RPC backend (a Mac measures with Metal).
#[cfg(not(target_vendor = "apple"))]
mod measured {
    use std::net::{TcpListener, TcpStream};
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    use serde_json::Value;

    /// `ggml-rpc-server` on a free loopback port, killed when dropped.
    struct RpcServer {
        child: Child,
        endpoint: String,
    }

    impl RpcServer {
        fn start(bin: &Path) -> RpcServer {
            let port = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let endpoint = format!("127.0.0.1:{port}");
            let child = Command::new(bin)
                .args(["-H", "127.0.0.1", "-p", &port.to_string(), "-t", "2"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start ggml-rpc-server");
            let mut s = RpcServer { child, endpoint };
            let start = Instant::now();
            while TcpStream::connect(&s.endpoint).is_err() {
                if let Some(status) = s.child.try_wait().unwrap() {
                    panic!("ggml-rpc-server exited ({status}) before listening");
                }
                assert!(
                    start.elapsed() < Duration::from_secs(30),
                    "ggml-rpc-server: nothing listening on {} after 30 s",
                    s.endpoint
                );
                std::thread::sleep(Duration::from_millis(100));
            }
            s
        }
    }

    impl Drop for RpcServer {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// The plugin to load: `ANE_TEST_PLUGIN` (set by `cargo xtask test`, which builds it first),
    /// else `GGML_BACKEND_PATH`, else the newest `libggml_ane.so` of the build folders (beside this
    /// `ane`, `target/release`, `target/debug`).
    fn plugin(root: &Path) -> Option<PathBuf> {
        for var in ["ANE_TEST_PLUGIN", "GGML_BACKEND_PATH"] {
            if let Some(p) = std::env::var_os(var).map(PathBuf::from) {
                return p.is_file().then_some(p);
            }
        }
        let exe = PathBuf::from(env!("CARGO_BIN_EXE_ane"));
        let mut dirs: Vec<PathBuf> = exe.parent().map(Path::to_path_buf).into_iter().collect();
        dirs.push(root.join("target/release"));
        dirs.push(root.join("target/debug"));
        dirs.iter()
            .map(|d| d.join("libggml_ane.so"))
            .filter(|p| p.is_file())
            .max_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
    }

    #[test]
    fn measured_beside_the_rpc_gpu_on_the_reference_engine() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let root = root.canonicalize().unwrap_or(root);
        let bin = root.join("target/llama/build/bin");
        let (bench, server) = (bin.join("llama-bench"), bin.join("ggml-rpc-server"));
        let model = root.join("target/models/tiny-llama-f16.gguf");
        let plugin = plugin(&root);
        let mut missing: Vec<String> = [&bench, &server, &model]
            .iter()
            .filter(|p| !p.is_file())
            .map(|p| p.display().to_string())
            .collect();
        if plugin.is_none() {
            missing
                .push("libggml_ane.so (ANE_TEST_PLUGIN, GGML_BACKEND_PATH, target/release or target/debug)".into());
        }
        if !missing.is_empty() {
            let why = format!(
                "missing {} (cargo xtask llama builds llama.cpp and the tiny models; cargo build -p \
                 ggml-ane the plugin)",
                missing.join(", ")
            );
            if std::env::var("ANE_GGML_TESTS").as_deref() == Ok("1") {
                panic!("ANE_GGML_TESTS=1 but the measured `ane bench split` cannot run: {why}");
            }
            eprintln!(
                "NOT RUN: measured `ane bench split`: {why}; ANE_GGML_TESTS=1 makes this fail"
            );
            return;
        }
        let plugin = plugin.unwrap();
        let rpc = RpcServer::start(&server);
        let out = Command::new(env!("CARGO_BIN_EXE_ane"))
            .args(["bench", "split", "--json", "--gpu", "RPC0", "--rpc"])
            .arg(&rpc.endpoint)
            .arg("--llama-bench")
            .arg(&bench)
            .arg("--model")
            .arg(&model)
            .arg("--plugin")
            .arg(&plugin)
            .args(["--prompt", "256", "--reps", "2", "--timeout", "600"])
            .output()
            .expect("run ane bench split");
        drop(rpc);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}\n{stdout}",
            String::from_utf8_lossy(&out.stderr)
        );
        let r: Value = serde_json::from_str(&stdout).expect("one JSON object");
        let m = &r["measured"];
        for k in ["gpu_tps", "beside_tps", "beside_over_gpu"] {
            assert!(m[k].as_f64().is_some_and(|v| v > 0.0), "{k}: {m}");
        }
        // Labelled as what ran: the reference engine, forced, never an ANE figure.
        assert_eq!(m["engine"], "reference", "{m}");
        assert_eq!(m["engine_forced"], "reference", "{m}");
        assert_eq!(m["ane"], false, "{m}");
        assert_eq!(m["beside_args"], "-dev ANE/RPC0 -ts 0/1");
        assert_eq!(m["gpu_args"], "-dev RPC0");
        assert!(m["split_ops"].as_u64().is_some_and(|n| n > 0), "{m}");
        assert_eq!(m["split_gpu_failures"], 0, "{m}");
        // The warm-up filled the (temporary, now removed) folder; the shares are this run's.
        let shares = m["shares"].as_array().unwrap();
        assert!(!shares.is_empty(), "{m}");
        for s in shares {
            let v = s["share"].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&v), "{s}");
            assert_eq!(s["fresh"], true, "{s}");
        }
        assert_eq!(m["cache_dir_kept"], false);
        assert!(!Path::new(m["cache_dir"].as_str().unwrap()).exists());
        let ms = r["machines"].as_array().unwrap();
        assert_eq!(ms.len(), 1, "{r}");
        assert_eq!(ms[0]["engine"], "reference");
        assert_eq!(ms[0]["gpu"], "RPC0");
        assert!(ms[0]["os"].as_str().unwrap().starts_with("linux-"));
        assert_eq!(ms[0]["classes"].as_array().unwrap().len(), shares.len());
    }
}
