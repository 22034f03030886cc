//! The end of `ane doctor`: the llama.cpp command lines that fit this machine, and why.
//!
//! [`decide`] is platform-neutral: it takes the platform facts and the doctor's verdicts
//! ([`Facts`]) and returns the lines and a one-line reason ([`Commands`]), so every case is tested
//! on Linux. [`facts`] gathers them from a finished report and [`locate_plugin`] finds the
//! plugin's own file.
//!
//! JSON: `commands: {case, why, lines: [..], notes: [..], plugin_path, plugin_path_from}`, `case`
//! one of `metal` (Apple Silicon, an engine of the plugin passes its canaries: ANE prefill beside
//! Metal in one process), `no_ane` (a Mac where the plugin would decline everything: nothing to
//! gain; the reference engine for testing) and `rpc_stand_in` (not macOS: the reference engine
//! beside llama.cpp's RPC backend as the GPU, as the tests run it).

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

/// Port `ggml-rpc-server` listens on by default.
pub const RPC_PORT: u16 = 50052;

/// What the decision needs to know about the machine and the doctor's verdicts.
#[derive(Clone, Debug, Default)]
pub struct Facts {
    /// `std::env::consts::OS`: `macos`, `linux`, ...
    pub os: String,
    /// `std::env::consts::ARCH`: `aarch64`, `x86_64`, ...
    pub arch: String,
    /// What `GGML_ANE_ENGINE=auto` would pick: `ane`, `coreml` or `none` (the report's
    /// `plugin_engine`).
    pub plugin_engine: String,
    /// Why the private API is not used: the names of its failed checks (empty when it passes).
    pub ane_failed: Vec<String>,
    /// Why Core ML is not used: its error, or the names of its failed checks.
    pub coreml_failed: Vec<String>,
    /// The plugin's file, when found.
    pub plugin_path: Option<PathBuf>,
    /// How it was found (`GGML_BACKEND_PATH`, `beside the ane binary`).
    pub plugin_path_from: Option<&'static str>,
}

/// Which kind of machine the lines are for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Case {
    /// Apple Silicon with a working engine: ANE prefill beside Metal (MTL0) in one process.
    Metal,
    /// A Mac where the plugin would decline every matmul: nothing to gain.
    NoAne,
    /// Not macOS: the reference engine beside llama.cpp's RPC backend standing in for the GPU.
    RpcStandIn,
}

impl Case {
    pub fn name(self) -> &'static str {
        match self {
            Case::Metal => "metal",
            Case::NoAne => "no_ane",
            Case::RpcStandIn => "rpc_stand_in",
        }
    }
}

/// The command lines for this machine and the one-line reason.
#[derive(Clone, Debug)]
pub struct Commands {
    pub case: Case,
    pub why: String,
    /// Runnable shell lines (model path `model.gguf`).
    pub lines: Vec<String>,
    /// What the lines assume, and what each is for.
    pub notes: Vec<String>,
    pub plugin_path: Option<PathBuf>,
    pub plugin_path_from: Option<&'static str>,
}

/// The plugin's file name on `os`.
pub fn plugin_file_name(os: &str) -> &'static str {
    match os {
        "macos" | "ios" => "libggml_ane.dylib",
        "windows" => "ggml_ane.dll",
        _ => "libggml_ane.so",
    }
}

/// Quotes `s` for a POSIX shell when it holds anything but plain path characters.
fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+,:=@%".contains(c));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Decides the lines. Pure: the same facts give the same lines on any platform.
pub fn decide(f: &Facts) -> Commands {
    let file = plugin_file_name(&f.os);
    let path = match &f.plugin_path {
        Some(p) => shell_quote(&p.to_string_lossy()),
        None => format!("/path/to/{file}"),
    };
    let plugin = format!("GGML_BACKEND_PATH={path}");
    let reference = format!("GGML_ANE_ENGINE=reference {plugin}");
    let mut notes = Vec::new();
    let case;
    let why;
    let lines;
    if f.os == "macos" {
        let apple_silicon = f.arch == "aarch64";
        let engine = f.plugin_engine.as_str();
        if apple_silicon && (engine == "ane" || engine == "coreml") {
            case = Case::Metal;
            why = if engine == "ane" {
                "Apple Silicon Mac whose Neural Engine passes the plugin's canaries: ANE prefill \
                 beside Metal (MTL0) in one llama.cpp process, decode on Metal"
                    .to_string()
            } else {
                format!(
                    "Apple Silicon Mac whose Neural Engine the plugin reaches through Core ML (the \
                     private API failed: {}): ANE prefill beside Metal (MTL0) in one llama.cpp \
                     process, decode on Metal",
                    list(&f.ane_failed)
                )
            };
            lines = vec![
                format!("{plugin} llama-completion -m model.gguf --device ANE,MTL0 -ts 0,1"),
                format!("{plugin} llama-server -m model.gguf --device ANE,MTL0 -ts 0,1"),
                format!("{plugin} llama-bench -m model.gguf -dev ANE/MTL0 -ts 0/1"),
                format!("{plugin} llama-completion -m model.gguf -ngl 0 --no-repack"),
            ];
            notes.push(
                "-ts 0,1 gives the ANE no layers: every layer stays on Metal, and the prefill \
                 matmuls whose weights are in MTL0_Mapped run on the ANE"
                    .to_string(),
            );
            notes.push(
                "llama-cli takes the same arguments as llama-completion; multimodal models \
                 (--mmproj) also need -mmdev MTL0"
                    .to_string(),
            );
            notes.push(
                "llama.cpp built with Metal and -DGGML_BLAS=OFF (BLAS would take the matmuls \
                 first); keep mmap on: no --load-mode none or dio (older llama.cpp: --no-mmap), \
                 or the weights leave MTL0_Mapped"
                    .to_string(),
            );
            notes.push(
                "the last line is the fallback without the GPU: ANE prefill, CPU decode"
                    .to_string(),
            );
            notes.push(
                "GGML_ANE_STATS=1 before a line prints at exit how many matmuls ran on the ANE"
                    .to_string(),
            );
        } else {
            case = Case::NoAne;
            why = if !apple_silicon {
                format!(
                    "an Intel Mac ({}) has no Neural Engine: the plugin would decline every \
                     matmul, nothing to gain; run llama.cpp without it",
                    f.arch
                )
            } else {
                format!(
                    "the Neural Engine is not usable here (private API: {}; Core ML: {}): the \
                     plugin would decline every matmul, nothing to gain; run llama.cpp without it",
                    list(&f.ane_failed),
                    list(&f.coreml_failed)
                )
            };
            lines = vec![
                "llama-completion -m model.gguf".to_string(),
                format!("{reference} llama-completion -m model.gguf --device ANE,MTL0 -ts 0,1"),
            ];
            notes.push("the first line is llama.cpp alone (Metal), without the plugin".to_string());
            notes.push(
                "the second runs the plugin's reference engine (the ANE's numerics on the CPU, \
                 slow) beside Metal: for testing the plugin, not for speed"
                    .to_string(),
            );
        }
    } else {
        case = Case::RpcStandIn;
        why = format!(
            "no Neural Engine on {} {}: the reference engine (the ANE's numerics on the CPU, \
             slow) stands in for testing, beside llama.cpp's RPC backend as the GPU",
            f.os, f.arch
        );
        let ep = format!("127.0.0.1:{RPC_PORT}");
        lines = vec![
            format!("ggml-rpc-server -H 127.0.0.1 -p {RPC_PORT}"),
            format!(
                "{reference} llama-completion -m model.gguf --rpc {ep} --device ANE,RPC0 -ts 0,1 \
                 -ngl 99"
            ),
            format!(
                "{reference} llama-bench -m model.gguf -rpc {ep} -dev ANE/RPC0 -ts 0/1 -ngl 99"
            ),
            format!("{reference} llama-completion -m model.gguf -ngl 0 --no-repack"),
        ];
        notes.push(
            "the first line starts the GPU stand-in (llama.cpp built with -DGGML_RPC=ON); run the \
             next ones in another shell"
                .to_string(),
        );
        notes.push(
            "the last line needs no RPC server: prefill on the reference engine, decode on the CPU"
                .to_string(),
        );
        notes.push(
            "on an Apple Silicon Mac ane doctor prints the Metal lines (--device ANE,MTL0 -ts 0,1)"
                .to_string(),
        );
    }
    if f.plugin_path.is_none() {
        notes.push(format!(
            "{file} was not found (GGML_BACKEND_PATH unset, nothing beside this ane binary): \
             build it with cargo build --release -p ggml-ane and put its absolute path in place \
             of /path/to/{file}"
        ));
    }
    Commands {
        case,
        why,
        lines,
        notes,
        plugin_path: f.plugin_path.clone(),
        plugin_path_from: f.plugin_path_from,
    }
}

fn list(v: &[String]) -> String {
    if v.is_empty() {
        "no reason recorded".to_string()
    } else {
        v.join(", ")
    }
}

impl Commands {
    pub fn to_json(&self) -> Value {
        json!({
            "case": self.case.name(),
            "why": self.why,
            "lines": self.lines,
            "notes": self.notes,
            "plugin_path": self.plugin_path.as_ref().map(|p| p.to_string_lossy().into_owned()),
            "plugin_path_from": self.plugin_path_from,
        })
    }
}

/// The plugin's file: `GGML_BACKEND_PATH` when it names a file, else the plugin beside this `ane`
/// binary (`cargo build -p ggml-ane -p ane-cli` puts both in one folder).
pub fn locate_plugin() -> (Option<PathBuf>, Option<&'static str>) {
    if let Some(p) = std::env::var_os("GGML_BACKEND_PATH").map(PathBuf::from) {
        if p.is_file() {
            return (Some(absolute(&p)), Some("GGML_BACKEND_PATH"));
        }
    }
    let exe = std::env::current_exe().ok();
    if let Some(dir) = exe.as_deref().and_then(Path::parent) {
        let p = dir.join(plugin_file_name(std::env::consts::OS));
        if p.is_file() {
            return (Some(absolute(&p)), Some("beside the ane binary"));
        }
    }
    (None, None)
}

fn absolute(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

/// The facts of a finished report (before `commands` is added) on this machine.
pub fn facts(r: &Value) -> Facts {
    // The checks that gate the private API (the plugin's rule: the baked canary and the
    // shape-shared program in its default layout; the discovery before them).
    let gates = [
        "framework",
        "classes",
        "host",
        "canary",
        "canary_tiled_tokens",
    ];
    let mut ane_failed: Vec<String> = Vec::new();
    for c in r["checks"].as_array().into_iter().flatten() {
        let name = c["name"].as_str().unwrap_or("");
        if gates.contains(&name) && c["ok"] != true && !ane_failed.iter().any(|n| n == name) {
            ane_failed.push(name.to_string());
        }
    }
    let c = &r["coreml"];
    let coreml_failed: Vec<String> = if c["available"] == true && c["measured"] == "coreml" {
        Vec::new()
    } else if let Some(e) = c["error"].as_str() {
        vec![e.to_string()]
    } else if c["measured"].as_str().is_some_and(|m| m != "coreml") {
        vec![format!(
            "not measured (a stand-in, {})",
            c["measured"].as_str().unwrap_or("?")
        )]
    } else {
        c["checks"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|ch| ch["ok"] != true)
            .filter_map(|ch| ch["name"].as_str().map(str::to_string))
            .collect()
    };
    let (plugin_path, plugin_path_from) = locate_plugin();
    Facts {
        os: std::env::consts::OS.to_string(),
        arch: std::env::consts::ARCH.to_string(),
        plugin_engine: r["plugin_engine"].as_str().unwrap_or("none").to_string(),
        ane_failed,
        coreml_failed,
        plugin_path,
        plugin_path_from,
    }
}

/// The last lines of the text report.
pub fn print_text(r: &Value) {
    let c = &r["commands"];
    println!(
        "commands ({}): {}",
        c["case"].as_str().unwrap_or("?"),
        c["why"].as_str().unwrap_or("?")
    );
    for l in c["lines"].as_array().into_iter().flatten() {
        println!("  {}", l.as_str().unwrap_or(""));
    }
    for n in c["notes"].as_array().into_iter().flatten() {
        println!("  note: {}", n.as_str().unwrap_or(""));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac(engine: &str) -> Facts {
        Facts {
            os: "macos".into(),
            arch: "aarch64".into(),
            plugin_engine: engine.into(),
            plugin_path: Some(PathBuf::from(
                "/Users/me/ggml-ane/target/release/libggml_ane.dylib",
            )),
            plugin_path_from: Some("beside the ane binary"),
            ..Facts::default()
        }
    }

    #[test]
    fn apple_silicon_with_a_passing_ane_gets_the_one_process_metal_lines() {
        let c = decide(&mac("ane"));
        assert_eq!(c.case, Case::Metal);
        let p = "GGML_BACKEND_PATH=/Users/me/ggml-ane/target/release/libggml_ane.dylib";
        assert_eq!(
            c.lines,
            [
                format!("{p} llama-completion -m model.gguf --device ANE,MTL0 -ts 0,1"),
                format!("{p} llama-server -m model.gguf --device ANE,MTL0 -ts 0,1"),
                format!("{p} llama-bench -m model.gguf -dev ANE/MTL0 -ts 0/1"),
                format!("{p} llama-completion -m model.gguf -ngl 0 --no-repack"),
            ]
        );
        assert!(c.why.contains("beside Metal (MTL0)"), "{}", c.why);
        assert!(!c.why.contains('\n'));
        let notes = c.notes.join("\n");
        for want in [
            "-mmdev MTL0",
            "-DGGML_BLAS=OFF",
            "--load-mode none",
            "--no-mmap",
        ] {
            assert!(notes.contains(want), "{want}: {notes}");
        }
        // Nothing of the stand-ins.
        let all = c.lines.join("\n");
        assert!(!all.contains("reference") && !all.contains("RPC"), "{all}");
        assert!(!notes.contains("not found"), "{notes}");
    }

    #[test]
    fn core_ml_reaching_the_neural_engine_also_gets_the_metal_lines_and_says_so() {
        let mut f = mac("coreml");
        f.ane_failed = vec!["canary".into()];
        let c = decide(&f);
        assert_eq!(c.case, Case::Metal);
        assert_eq!(c.lines, decide(&mac("ane")).lines);
        assert!(c.why.contains("through Core ML"), "{}", c.why);
        assert!(c.why.contains("failed: canary"), "{}", c.why);
    }

    #[test]
    fn a_mac_whose_ane_fails_is_told_nothing_to_gain_and_the_reference_engine_for_tests() {
        let mut f = mac("none");
        f.ane_failed = vec!["host".into(), "canary".into()];
        f.coreml_failed = vec!["placement".into()];
        let c = decide(&f);
        assert_eq!(c.case, Case::NoAne);
        assert!(c.why.contains("not usable"), "{}", c.why);
        assert!(c.why.contains("nothing to gain"), "{}", c.why);
        assert!(c
            .why
            .contains("private API: host, canary; Core ML: placement"));
        assert_eq!(c.lines[0], "llama-completion -m model.gguf");
        assert!(c.lines[1].starts_with("GGML_ANE_ENGINE=reference GGML_BACKEND_PATH=/Users/me/"));
        assert!(c.lines[1].ends_with("--device ANE,MTL0 -ts 0,1"));
        assert!(c.notes.join(" ").contains("not for speed"));
    }

    #[test]
    fn an_intel_mac_has_no_neural_engine() {
        let mut f = mac("none");
        f.arch = "x86_64".into();
        let c = decide(&f);
        assert_eq!(c.case, Case::NoAne);
        assert!(c.why.contains("Intel Mac"), "{}", c.why);
        // Even a (stand-in) verdict of a working engine gives no Metal lines off Apple Silicon.
        f.plugin_engine = "ane".into();
        assert_eq!(decide(&f).case, Case::NoAne);
    }

    #[test]
    fn linux_gets_the_rpc_stand_in_with_the_reference_engine() {
        let f = Facts {
            os: "linux".into(),
            arch: "x86_64".into(),
            plugin_engine: "none".into(),
            plugin_path: Some(PathBuf::from("/work/target/release/libggml_ane.so")),
            plugin_path_from: Some("GGML_BACKEND_PATH"),
            ..Facts::default()
        };
        let c = decide(&f);
        assert_eq!(c.case, Case::RpcStandIn);
        let r = "GGML_ANE_ENGINE=reference GGML_BACKEND_PATH=/work/target/release/libggml_ane.so";
        assert_eq!(
            c.lines,
            [
                "ggml-rpc-server -H 127.0.0.1 -p 50052".to_string(),
                format!(
                    "{r} llama-completion -m model.gguf --rpc 127.0.0.1:50052 --device ANE,RPC0 \
                     -ts 0,1 -ngl 99"
                ),
                format!(
                    "{r} llama-bench -m model.gguf -rpc 127.0.0.1:50052 -dev ANE/RPC0 -ts 0/1 \
                     -ngl 99"
                ),
                format!("{r} llama-completion -m model.gguf -ngl 0 --no-repack"),
            ]
        );
        assert!(
            c.why.contains("no Neural Engine on linux x86_64"),
            "{}",
            c.why
        );
        assert!(c.why.contains("reference engine"), "{}", c.why);
        assert!(!c.lines.join(" ").contains("MTL0"));
        let j = c.to_json();
        assert_eq!(j["case"], "rpc_stand_in");
        assert_eq!(j["plugin_path_from"], "GGML_BACKEND_PATH");
        assert_eq!(j["lines"].as_array().unwrap().len(), 4);
    }

    #[test]
    fn an_unknown_plugin_path_gets_a_placeholder_and_a_note() {
        let mut f = mac("ane");
        f.plugin_path = None;
        f.plugin_path_from = None;
        let c = decide(&f);
        assert!(c.lines[0].starts_with("GGML_BACKEND_PATH=/path/to/libggml_ane.dylib "));
        assert!(c.notes.last().unwrap().contains("was not found"));
        assert_eq!(c.to_json()["plugin_path"], Value::Null);
        f.os = "linux".into();
        assert!(decide(&f).lines[1].contains("GGML_BACKEND_PATH=/path/to/libggml_ane.so "));
    }

    #[test]
    fn a_plugin_path_with_spaces_is_quoted_for_the_shell() {
        let mut f = mac("ane");
        f.plugin_path = Some(PathBuf::from(
            "/Users/me/My Projects/it's/libggml_ane.dylib",
        ));
        let c = decide(&f);
        assert!(
            c.lines[0].starts_with(
                r"GGML_BACKEND_PATH='/Users/me/My Projects/it'\''s/libggml_ane.dylib' "
            ),
            "{}",
            c.lines[0]
        );
    }

    #[test]
    fn facts_name_the_failed_gates_once_and_the_core_ml_error() {
        let r = json!({
            "plugin_engine": "none",
            "checks": [
                {"name": "platform", "ok": true},
                {"name": "host", "ok": false},
                {"name": "chip", "ok": false},
                {"name": "canary", "ok": false},
                {"name": "canary", "ok": true},
                {"name": "canary_tiled_tokens", "ok": false},
                {"name": "sweep", "ok": false},
            ],
            "coreml": {"available": false, "error": "not macOS: Core ML exists only on Apple platforms"},
        });
        let f = facts(&r);
        assert_eq!(f.ane_failed, ["host", "canary", "canary_tiled_tokens"]);
        assert_eq!(
            f.coreml_failed,
            ["not macOS: Core ML exists only on Apple platforms"]
        );
        assert_eq!(f.plugin_engine, "none");
        assert_eq!(f.os, std::env::consts::OS);
    }
}
