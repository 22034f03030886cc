//! `cargo xtask test`: everything that must pass before a commit, in order,
//! stopping at the first failing step.
//!
//! `cargo test` covers the Rust code in isolation. The plugin's real contract
//! is with programs we do not control, so the later steps run them:
//!
//! * `unit`  - `cargo test --workspace`, with `ANE_GGML_TESTS=1` (llama.cpp built first);
//! * `mil`   - every MIL form `ane mil` can emit, at a few shapes, checked by
//!   the coremltools-based validator `miltext_check.py`;
//! * `coreml` - the same forms and shapes, plus the plugin's shape-shared program in both
//!   layouts (with row tiles and K slices) and the baked one, written as Core ML packages by
//!   `ane mil --coreml --verify` (read back, executed on the reference engine bit-identical to the
//!   MIL text) and loaded, converted to pymil and type-checked by `validators/coreml_check.py`;
//!   broken copies must be rejected;
//! * `ops`   - llama.cpp's `test-backend-ops -b ANE -o MUL_MAT` against the
//!   CPU backend, with the plugin on the reference engine;
//! * `faults` - the same with `-j 2` and injected engine failures
//!   (`GGML_ANE_FAULTS`): every claimed case passes through the CPU fallback;
//! * `fuzz`  - the MIL parser, blob reader and GGUF reader: their
//!   arbitrary-bytes property tests, then `cargo fuzz` for 30 s per target
//!   when nightly and cargo-fuzz are installed (said loudly when not);
//! * `overflow` - a tiny f32 model whose FFN activations exceed fp16's range:
//!   greedy text with the plugin identical to the CPU, through the numeric guard;
//! * `e2e`   - greedy `llama-completion` on tiny f16/q8_0/q4_0 models, CPU
//!   only vs. with the plugin: identical text, and the plugin's JSON stats
//!   must show offloaded ops;
//! * `sched` - `GGML_SCHED_DEBUG` output: the prefill graph has an ANE split,
//!   decode graphs (1 token) have none.
//! * `placement` - where llama.cpp puts the weights (docs/mac.md): q4_0 with
//!   default flags is repacked, the plugin gets no MUL_MATs and says once to
//!   pass `--no-repack`; with `--no-repack` it offloads; a prefill saved with
//!   `--prompt-cache` by a run with the plugin is continued by a run without
//!   it (the "ANE prefill, then Metal decode" recipe) with the CPU's text.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::flags::TestOpts;
use crate::util::{self, abs, bail, Result, Section};
use crate::{demo, llama, models, venv};

/// Prompt for `e2e` and `sched`: well over 80 tokens with the tiny vocab, so
/// the prefill batch is above the plugin's default minimum of 64.
const PROMPT: &str = "Once upon a time, in a small village by the sea, there lived an old \
fisherman who told stories about the stars to anyone who would listen.";

/// `test-backend-ops` must have computed at least this many MUL_MAT cases on
/// the plugin. The b11434 suite has 2276 MUL_MAT cases, but 359 of them are
/// "not supported [CPU]": the CPU backend, which is the judge, lacks them
/// (e.g. K-quants with an F16 src1), so at most 1917 can be claimed and
/// checked. The plugin claims 1916 (measured); this floor catches a plugin
/// that silently stops claiming a whole type.
const MIN_CLAIMED_OPS: usize = 1900;

/// Shapes (k, m, n) the MIL forms are emitted and validated at.
const MIL_SHAPES: [(u32, u32, u32); 2] = [(128, 96, 64), (256, 512, 128)];

/// `ane mil` forms step mil validates beside the listed ones, in the shorthand dialect only:
/// the int8-weight probe (`build::tiled_matmul_int8`), left out of `--list-forms` because Core ML
/// takes int8 model inputs only from specification 10 and step coreml packages every listed form,
/// and out of the verbose dialect because iOS16's `cast` takes no int8.
const MIL_HIDDEN_FORMS: [&str; 1] = ["int8-input"];

/// Lazily built prerequisites shared by the steps.
#[derive(Default)]
pub(crate) struct Prereqs {
    plugin: Option<PathBuf>,
    llama: bool,
    models: bool,
    python: Option<PathBuf>,
}

impl Prereqs {
    pub(crate) fn plugin(&mut self) -> Result<PathBuf> {
        if self.plugin.is_none() {
            self.plugin = Some(demo::build_plugin()?);
        }
        Ok(self.plugin.clone().unwrap())
    }
    pub(crate) fn llama(&mut self) -> Result {
        if !self.llama {
            llama::run(false)?;
            self.llama = true;
        }
        Ok(())
    }
    pub(crate) fn models(&mut self) -> Result {
        if !self.models {
            models::run()?;
            self.models = true;
        }
        Ok(())
    }
    pub(crate) fn python(&mut self) -> Result<PathBuf> {
        if self.python.is_none() {
            self.python = Some(venv::run()?);
        }
        Ok(self.python.clone().unwrap())
    }
}

pub fn run(opts: &TestOpts) -> Result {
    let mut pre = Prereqs {
        plugin: opts.plugin.clone(),
        ..Prereqs::default()
    };
    let mut rows: Vec<(&str, &str, f64, String)> = Vec::new();
    let mut failure = None;
    for &step in &opts.steps {
        let section = Section::new(format!("test step `{step}`"));
        let start = Instant::now();
        let result = match step {
            "setup" => step_setup(&mut pre),
            "unit" => step_unit(&mut pre),
            "mil" => step_mil(&mut pre),
            "coreml" => step_coreml(&mut pre),
            "ops" => step_ops(&mut pre),
            "moe" => crate::test_moe::step(&mut pre),
            "faults" => step_faults(&mut pre),
            "fallback" => pre.plugin().and_then(|p| crate::bench_fallback::run(&p)),
            "overflow" => crate::test_overflow::step(&mut pre),
            "fuzz" => crate::test_fuzz::step(),
            "e2e" => step_e2e(&mut pre),
            "real" => crate::test_real::step(&mut pre),
            "sched" => crate::test_sched::step(&mut pre),
            "placement" => crate::test_placement::step(&mut pre),
            "plan" => crate::test_plan::step(&mut pre),
            "contexts" => crate::test_contexts::step(&mut pre),
            "host2" => crate::test_host2::step(&mut pre),
            "metal" => crate::test_metal::step(&mut pre),
            "gpu" => crate::test_gpu::step(&mut pre),
            "staging" => crate::test_staging::step(&mut pre),
            other => Err(format!("unknown step {other}").into()),
        };
        drop(section);
        let secs = start.elapsed().as_secs_f64();
        match result {
            Ok(summary) => {
                println!("PASS {step}: {summary}");
                rows.push((step, "PASS", secs, summary));
            }
            Err(e) => {
                println!("FAIL {step}: {e}");
                let first = e.to_string().lines().next().unwrap_or_default().to_string();
                rows.push((step, "FAIL", secs, first));
                failure = Some((step, e));
                break;
            }
        }
    }
    for &step in &opts.steps {
        if !rows.iter().any(|r| r.0 == step) {
            rows.push((step, "not run", 0.0, String::new()));
        }
    }
    println!("\n{:<7} {:<8} {:>8}  detail", "step", "result", "time");
    for (step, result, secs, detail) in &rows {
        println!("{step:<7} {result:<8} {secs:>7.1}s  {detail}");
    }
    match failure {
        Some((step, e)) => bail!("test step `{step}` failed: {e}"),
        None => {
            println!("\nall {} test steps passed", rows.len());
            Ok(())
        }
    }
}

// ---------------------------------------------------------------- setup

/// The fresh-machine promise: with every cmake hidden from PATH, set-up still
/// finds one (the project venv's, installed from PyPI when missing); and a host
/// Python whose `-m venv` fails as Debian's does without python3-venv still
/// gets a venv with pip (through virtualenv).
fn step_setup(pre: &mut Prereqs) -> Result<String> {
    let python = pre.python()?;
    let path = std::env::var_os("PATH").unwrap_or_default();
    let hidden = crate::tools::path_without_cmake(&path);
    if crate::tools::cmake_on_path(&hidden).is_some() {
        bail!("a cmake is still visible after hiding every PATH folder that has one");
    }
    let cmake = crate::tools::cmake_with(&hidden, &python)?;
    if cmake != crate::tools::venv_cmake() {
        bail!(
            "with cmake hidden, set-up chose {} instead of the venv's",
            cmake.display()
        );
    }
    util::read(Command::new(&cmake).arg("--version"))?;

    let dir = abs("target/setup-check");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    // A python3 that refuses `-m venv` like Debian's without python3-venv.
    let host = dir.join("python3-no-venv");
    std::fs::write(
        &host,
        format!(
            "#!/bin/sh\nif [ \"$1\" = -m ] && [ \"$2\" = venv ]; then\n  \
             echo 'The virtual environment was not created successfully because ensurepip is \
             not available.' >&2\n  exit 1\nfi\nexec '{}' \"$@\"\n",
            util::host_python()
        ),
    )?;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&host, std::fs::Permissions::from_mode(0o755))?;
    let venv = dir.join("venv");
    let how = crate::tools::make_venv(&host.to_string_lossy(), &venv, false)?;
    if how != crate::tools::VenvHow::Virtualenv {
        bail!("a host without venv support was reported as {how:?}");
    }
    let pip = util::read(Command::new(venv.join("bin/python")).args(["-m", "pip", "--version"]))?;
    let _ = std::fs::remove_dir_all(&venv);
    Ok(format!(
        "cmake hidden from PATH -> {} ; python without venv -> virtualenv ({})",
        cmake.display(),
        pip.split_whitespace().take(2).collect::<Vec<_>>().join(" ")
    ))
}

// ---------------------------------------------------------------- unit

/// `ANE_GGML_TESTS=1` turns on ane-convert's bit-exactness tests against libggml-base
/// (`crates/convert/tests/ggml_base.rs`), which need the llama.cpp build.
fn step_unit(pre: &mut Prereqs) -> Result<String> {
    pre.llama()?;
    // The tiny models: tests that run llama.cpp (`ane bench split` measured) need one.
    pre.models()?;
    // ... and the plugin: the release build every later step shares (a clean clone has none).
    let plugin = pre.plugin()?;
    util::run(
        util::cargo()
            .args(["test", "--workspace"])
            .env("ANE_GGML_TESTS", "1")
            .env("ANE_TEST_PLUGIN", &plugin),
    )?;
    Ok("cargo test --workspace (with ANE_GGML_TESTS=1) passed".into())
}

// ---------------------------------------------------------------- mil

/// The MIL validator script: `$ANE_MIL_VALIDATOR`, else the shared checkout
/// next to the repository (newest copy), else the copy vendored in
/// `validators/`. Never skipped silently.
fn mil_validator() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("ANE_MIL_VALIDATOR") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        bail!("ANE_MIL_VALIDATOR={} is not a file", p.display());
    }
    let default = util::project_root().join("../shared/validators/miltext_check.py");
    if default.is_file() {
        return Ok(std::fs::canonicalize(&default)?);
    }
    let vendored = util::project_root().join("validators/miltext_check.py");
    if vendored.is_file() {
        return Ok(vendored);
    }
    bail!(
        "MIL validator not found: set ANE_MIL_VALIDATOR=/path/to/miltext_check.py \
         (looked for {})",
        default.display()
    )
}

/// Runs the MIL validator on `dir/model.mil` (the caller judges the result).
fn validate(python: &Path, validator: &Path, dir: &Path, name: &str) -> Result<util::Logged> {
    util::run_logged(
        Command::new(python)
            .arg(validator)
            .arg(dir.join("model.mil")),
        name,
        Duration::from_secs(600),
    )
}

fn step_mil(pre: &mut Prereqs) -> Result<String> {
    let validator = mil_validator()?;
    let python = pre.python()?;
    util::run(util::cargo().args(["build", "-p", "ane-cli"]))?;
    let ane = abs("target/debug/ane");
    let listing = util::read(Command::new(&ane).args(["mil", "--list-forms"]))?;
    let forms = parse_forms(&listing);
    if forms.is_empty() {
        bail!("`ane mil --list-forms` listed no forms:\n{listing}");
    }
    let out_root = abs("target/xtask-mil");
    if out_root.exists() {
        std::fs::remove_dir_all(&out_root)?;
    }
    let mut checked = 0;
    // The listed forms, then the hidden ones only this step reaches.
    for form in forms.iter().map(String::as_str).chain(MIL_HIDDEN_FORMS) {
        for (k, m, n) in MIL_SHAPES {
            let dir = out_root.join(format!("{form}-k{k}-m{m}-n{n}"));
            util::run(
                Command::new(&ane)
                    .args(["mil", "--form", form])
                    .args(["--k", &k.to_string(), "--m", &m.to_string()])
                    .args(["--n", &n.to_string()])
                    .arg("--out")
                    .arg(&dir),
            )?;
            let res = validate(
                &python,
                &validator,
                &dir,
                &format!("mil-{form}-k{k}-m{m}-n{n}"),
            )?;
            if !res.success() {
                bail!(
                    "validator rejected form `{form}` at k={k} m={m} n={n} ({}):\n{}\n{}\n{}",
                    res.status_text(),
                    util::tail(&res.stdout, 30),
                    res.stderr_tail(10),
                    res.where_logged()
                );
            }
            checked += 1;
        }
    }
    // The verbose dialect (`program(1.0)`, ios16, scalars as `tensor<T, []>`): the second form
    // of the MIL-dialect probe (`ane_engine::probe`), at the first shape. Forms with iOS18-only
    // ops (the compressed ones) are refused in it, with an error naming the op.
    let (k, m, n) = MIL_SHAPES[0];
    let (mut verbose, mut refused) = (0, Vec::new());
    for form in &forms {
        let dir = out_root.join(format!("{form}-verbose"));
        let out = Command::new(&ane)
            .args(["mil", "--form", form, "--dialect", "verbose"])
            .args(["--k", &k.to_string(), "--m", &m.to_string()])
            .args(["--n", &n.to_string()])
            .arg("--out")
            .arg(&dir)
            .output()?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            if err.contains("iOS18 op") {
                refused.push(form.as_str());
                continue;
            }
            bail!(
                "`ane mil --form {form} --dialect verbose` failed:\n{}",
                util::tail(&err, 5)
            );
        }
        let res = validate(&python, &validator, &dir, &format!("mil-{form}-verbose"))?;
        if !res.success() {
            bail!(
                "validator rejected form `{form}` in the verbose dialect ({}):\n{}\n{}",
                res.status_text(),
                util::tail(&res.stdout, 30),
                res.where_logged()
            );
        }
        verbose += 1;
    }
    if verbose == 0 {
        bail!("no form was emitted in the verbose dialect");
    }
    Ok(format!(
        "{checked} programs valid ({} forms x {} shapes); verbose dialect: {verbose} valid, \
         refused (iOS18 ops): {}",
        forms.len() + MIL_HIDDEN_FORMS.len(),
        MIL_SHAPES.len(),
        refused.join(", ")
    ))
}

// ---------------------------------------------------------------- coreml

/// The plugin's own program forms, beyond the listed ones, as `ane mil --coreml` arguments: the
/// shape-shared program as the planner tiles it (one tile, one slice at these shapes) in both
/// layouts, the same with row tiles and K slices forced (what larger weights get), and the baked
/// fp16 conv (the doctor's canary). The quantized baked forms are among the listed ones.
const COREML_PLUGIN_FORMS: [(&str, &[&str]); 5] = [
    ("shared-tokens", &["--form", "shared", "--layout", "tokens"]),
    (
        "shared-channels",
        &["--form", "shared", "--layout", "channels"],
    ),
    (
        "shared-tokens-t2-k2",
        &[
            "--form",
            "shared",
            "--layout",
            "tokens",
            "--tiles",
            "2",
            "--k-chunks",
            "2",
        ],
    ),
    (
        "shared-channels-t3-k2",
        &[
            "--form",
            "shared",
            "--layout",
            "channels",
            "--tiles",
            "3",
            "--k-chunks",
            "2",
        ],
    ),
    ("baked", &["--form", "baked"]),
];

/// Broken copies the Core ML validator must reject: (corruption, package it is applied to). One
/// per rule family: an op's output type against type inference, operand dtypes, the blob file.
const COREML_CORRUPTIONS: [(&str, &str); 3] = [
    ("output-shape", "shared-tokens-t2-k2"),
    ("input-dtype", "shared-channels"),
    ("blob-offset", "q4-0-matmul"),
];

/// `N passed, M failed`, the last line `coreml_check.py` prints.
fn coreml_verdict(stdout: &str) -> Option<(usize, usize)> {
    let last = stdout.lines().rev().find(|l| !l.trim().is_empty())?;
    let (p, f) = last.trim().split_once(" passed, ")?;
    Some((p.parse().ok()?, f.strip_suffix(" failed")?.parse().ok()?))
}

fn step_coreml(pre: &mut Prereqs) -> Result<String> {
    let validator = util::project_root().join("validators/coreml_check.py");
    if !validator.is_file() {
        bail!("Core ML validator {} is missing", validator.display());
    }
    let python = pre.python()?;
    util::run(util::cargo().args(["build", "-p", "ane-cli"]))?;
    let ane = abs("target/debug/ane");
    let forms = parse_forms(&util::read(
        Command::new(&ane).args(["mil", "--list-forms"]),
    )?);
    if forms.is_empty() {
        bail!("`ane mil --list-forms` listed no forms");
    }
    let out_root = abs("target/xtask-coreml");
    if out_root.exists() {
        std::fs::remove_dir_all(&out_root)?;
    }
    std::fs::create_dir_all(&out_root)?;
    let mut cases: Vec<(String, Vec<String>)> = forms
        .iter()
        .map(|f| (f.clone(), vec!["--form".to_string(), f.clone()]))
        .collect();
    cases.extend(COREML_PLUGIN_FORMS.iter().map(|(name, args)| {
        (
            name.to_string(),
            args.iter().map(|a| a.to_string()).collect(),
        )
    }));
    let mut packages = Vec::new();
    let mut values = 0usize;
    for (name, form_args) in &cases {
        for (k, m, n) in MIL_SHAPES {
            let pkg = out_root.join(format!("{name}-m{m}-k{k}-n{n}.mlpackage"));
            let out = util::read(
                Command::new(&ane)
                    .arg("mil")
                    .args(form_args)
                    .args(["--shape", &format!("{m}x{k}x{n}"), "--verify", "--coreml"])
                    .arg(&pkg),
            )?;
            // "PKG: same IR, 1 weight file(s), reference outputs bit-identical (6144 fp16 values)"
            let Some(count) = out
                .split("bit-identical (")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .and_then(|c| c.parse::<usize>().ok())
            else {
                bail!("`ane mil --coreml --verify` for {name} at {m}x{k}x{n} said:\n{out}");
            };
            values += count;
            packages.push(pkg);
        }
    }
    let judge = |pkgs: &[PathBuf], expect_fail: bool, log: &str| -> Result<()> {
        let mut cmd = Command::new(&python);
        cmd.arg(&validator);
        if expect_fail {
            cmd.arg("--expect-fail");
        }
        let res = util::run_logged(cmd.args(pkgs), log, Duration::from_secs(600))?;
        let verdict = coreml_verdict(&res.stdout);
        if !res.success() || verdict != Some((pkgs.len(), 0)) {
            let fails: Vec<&str> = res
                .stdout
                .lines()
                .filter(|l| l.starts_with("FAIL"))
                .collect();
            bail!(
                "{} ({}, verdict {verdict:?} for {} packages):\n{}\n{}\n{}",
                if expect_fail {
                    "coreml_check.py accepted a broken package"
                } else {
                    "coreml_check.py rejected a package"
                },
                res.status_text(),
                pkgs.len(),
                if fails.is_empty() {
                    util::tail(&res.stdout, 30)
                } else {
                    fails.join("\n")
                },
                res.stderr_tail(10),
                res.where_logged()
            );
        }
        Ok(())
    };
    judge(&packages, false, "coreml-check")?;
    let (k, m, n) = MIL_SHAPES[0];
    let mut broken = Vec::new();
    for (kind, source) in COREML_CORRUPTIONS {
        let src = out_root.join(format!("{source}-m{m}-k{k}-n{n}.mlpackage"));
        let dst = out_root.join(format!("broken-{kind}.mlpackage"));
        util::read(
            Command::new(&python)
                .arg(&validator)
                .args(["--corrupt", kind])
                .arg(&src)
                .arg(&dst),
        )?;
        broken.push(dst);
    }
    judge(&broken, true, "coreml-check-broken")?;
    Ok(format!(
        "{} packages ({} forms x {} shapes) loaded, converted to pymil and type-checked by \
         coremltools; reference engine on the read-back programs bit-identical to the MIL text \
         ({values} fp16 values); {} broken copies rejected ({})",
        packages.len(),
        cases.len(),
        MIL_SHAPES.len(),
        broken.len(),
        COREML_CORRUPTIONS.map(|c| c.0).join(", ")
    ))
}

/// Form names from `ane mil --list-forms`: the first word of each line,
/// ignoring blank lines and `#` comments.
fn parse_forms(listing: &str) -> Vec<String> {
    listing
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_whitespace().next())
        .map(String::from)
        .collect()
}

// ---------------------------------------------------------------- ops

fn step_ops(pre: &mut Prereqs) -> Result<String> {
    let plugin = pre.plugin()?;
    pre.llama()?;
    let (c, res) = backend_ops(
        &llama::API3,
        &plugin,
        &["-o", "MUL_MAT"],
        &[],
        "test-backend-ops",
    )?;
    let summary = format!("{} ({:.0}s)", c.summary(), res.elapsed.as_secs_f64());
    println!("test-backend-ops: {summary}");
    ops_verdict(&c, &res, &summary)?;
    Ok(summary)
}

/// `test-backend-ops -b ANE ARGS` of `host` with the plugin on the reference engine, every batch
/// size offered to it (`GGML_ANE_MIN_BATCH=1`), plus `env`; its output parsed into cases.
pub(crate) fn backend_ops(
    host: &llama::Host,
    plugin: &Path,
    args: &[&str],
    env: &[(&str, &str)],
    name: &str,
) -> Result<(OpsCounts, util::Logged)> {
    let mut cmd = Command::new(host.bin("test-backend-ops"));
    cmd.args(["-b", "ANE"])
        .args(args)
        .env("GGML_BACKEND_PATH", plugin)
        .env("GGML_ANE_ENGINE", "reference")
        .env("GGML_ANE_MIN_BATCH", "1")
        .envs(env.iter().copied());
    let res = util::run_logged(&mut cmd, name, Duration::from_secs(45 * 60))?;
    Ok((OpsCounts::parse(&res.stdout), res))
}

/// The verdict both `test-backend-ops` steps share: no failing case, a clean
/// exit, and at least [`MIN_CLAIMED_OPS`] cases claimed by the plugin.
pub(crate) fn ops_verdict(c: &OpsCounts, res: &util::Logged, summary: &str) -> Result {
    ops_verdict_declining(c, res, summary, 0)
}

/// [`ops_verdict`] for a run in which the plugin may decline up to `declined` cases on purpose
/// (shapes it learnt do not compile: `declined.shape_failed`); those count toward the minimum.
fn ops_verdict_declining(
    c: &OpsCounts,
    res: &util::Logged,
    summary: &str,
    declined: usize,
) -> Result {
    ops_verdict_at_least(c, res, summary, declined, MIN_CLAIMED_OPS)
}

/// [`ops_verdict_declining`] with another floor (another llama.cpp's suite has other cases).
pub(crate) fn ops_verdict_at_least(
    c: &OpsCounts,
    res: &util::Logged,
    summary: &str,
    declined: usize,
    min_claimed: usize,
) -> Result {
    if c.fail > 0 {
        bail!(
            "{summary}; failing cases:\n{}\n{}",
            c.failed.join("\n"),
            res.where_logged()
        );
    }
    if !res.success() {
        bail!(
            "test-backend-ops {} ({summary}):\n{}\n{}",
            res.status_text(),
            res.stderr_tail(20),
            res.where_logged()
        );
    }
    if c.ok + c.fail + declined.min(c.unsupported) < min_claimed {
        bail!(
            "{summary}: the plugin claimed fewer than {min_claimed} MUL_MAT cases \
             (was the ANE backend loaded?)\n{}\n{}",
            util::tail(&res.stdout, 10),
            res.where_logged()
        );
    }
    Ok(())
}

/// Per-case results of `test-backend-ops` (test mode). Case lines look like
/// `  MUL_MAT(type_a=f16,type_b=f32,m=16,n=1,k=256,...): OK` with ANSI colour
/// around `OK`/`FAIL`, or `...): not supported [ANE]`.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct OpsCounts {
    ok: usize,
    fail: usize,
    unsupported: usize,
    unsupported_judge: usize,
    skipped: usize,
    failed: Vec<String>,
}

impl OpsCounts {
    /// `claimed N passed N failed N declined by ANE N not supported by the CPU judge N`.
    pub(crate) fn summary(&self) -> String {
        format!(
            "claimed {} passed {} failed {} declined by ANE {} not supported by the CPU judge {}",
            self.ok + self.fail,
            self.ok,
            self.fail,
            self.unsupported,
            self.unsupported_judge
        )
    }

    pub(crate) fn parse(stdout: &str) -> OpsCounts {
        let mut c = OpsCounts::default();
        for raw in stdout.lines() {
            let line = strip_ansi(raw);
            let line = line.trim_end();
            let body = line.trim_start();
            // A case line: two-space indent, OPNAME( ... ): STATUS
            let is_case = line.starts_with("  ")
                && body.find('(').is_some_and(|i| {
                    i > 0
                        && body[..i]
                            .bytes()
                            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
                })
                && body.contains("): ");
            if !is_case {
                continue;
            }
            if body.ends_with(" OK") {
                c.ok += 1;
            } else if body.ends_with("FAIL") {
                c.fail += 1;
                c.failed.push(body.to_string());
            } else if body.contains("): not supported [ANE]") {
                c.unsupported += 1;
            } else if body.contains("): not supported") {
                c.unsupported_judge += 1;
            } else if body.contains("): skipping") {
                c.skipped += 1;
            }
        }
        c
    }
}

/// Remove ANSI CSI sequences (`ESC [ ... letter`).
pub(crate) fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(ch) = chars.next() {
        if ch == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(ch);
        }
    }
    out
}

// ---------------------------------------------------------------- faults

/// Fault rates of the `faults` step: the acceptance run (issue 6).
const FAULTS: &str = "compile=0.3,load=0.1,eval=0.2,exception=0.05,seed=6";

/// `test-backend-ops -j 2` with the reference engine failing: three runs.
/// 1. Compiles, loads and evaluations fail at random ([`FAULTS`]) under the default give-up rule:
///    every claimed case passes through the fallback, and the device stays on (a transient run of
///    faults must not switch it off).
/// 2. Every evaluation fails and the device never gives up (`GGML_ANE_GIVE_UP=0`): every claimed
///    case is computed by the host's CPU backend (`fallback_cpu_backend`), none by our own loop.
/// 3. Every evaluation fails under the default rule: the device gives up (`gave_up`), declines (`device_off`)
///    what follows, and every case still passes.
fn step_faults(pre: &mut Prereqs) -> Result<String> {
    let plugin = pre.plugin()?;
    pre.llama()?;
    let run = |faults: &str, give_up: Option<&str>, log: &str| {
        let mut cmd = Command::new(llama::bin("test-backend-ops"));
        cmd.args(["-b", "ANE", "-o", "MUL_MAT", "-j", "2"])
            .env("GGML_BACKEND_PATH", &plugin)
            .env("GGML_ANE_ENGINE", "reference")
            .env("GGML_ANE_MIN_BATCH", "1")
            .env("GGML_ANE_FAULTS", faults)
            .env("GGML_ANE_STATS", "json")
            .env_remove("GGML_ANE_GIVE_UP");
        if let Some(g) = give_up {
            cmd.env("GGML_ANE_GIVE_UP", g);
        }
        util::run_logged(&mut cmd, log, Duration::from_secs(45 * 60))
    };
    let stat = |res: &util::Logged, key: &str| stats_field_max(&res.stderr, key).unwrap_or(0);
    let counts = |c: &OpsCounts, res: &util::Logged| {
        format!(
            "claimed {} passed {} failed {}; offloaded {}, fallback {} (host CPU backend {}, own {}), faults {}, declined as failing shapes {}, gave up {} ({:.0}s)",
            c.ok + c.fail,
            c.ok,
            c.fail,
            stat(res, "ops_offloaded"),
            stat(res, "ops_fallback"),
            stat(res, "fallback_cpu_backend"),
            stat(res, "fallback_own"),
            stat(res, "faults_injected"),
            stat(res, "shape_failed"),
            stat(res, "gave_up"),
            res.elapsed.as_secs_f64()
        )
    };

    let res = run(FAULTS, None, "test-backend-ops-faults")?;
    let c = OpsCounts::parse(&res.stdout);
    let mixed = format!("{FAULTS}: {}", counts(&c, &res));
    println!("test-backend-ops with faults: {mixed}");
    // Random compile faults are remembered per shape, as the ANE's deterministic ones are: once
    // an op was computed on the CPU for that reason, the plugin declines it (shape_failed).
    let shape_failed = stat(&res, "shape_failed") as usize;
    ops_verdict_declining(&c, &res, &mixed, shape_failed)?;
    if stat(&res, "ops_fallback") == 0 || stat(&res, "faults_injected") == 0 {
        bail!(
            "{mixed}: no fault reached the fallback path (is GGML_ANE_FAULTS honoured?)\n{}",
            res.where_logged()
        );
    }
    if stat(&res, "engine_exceptions") == 0 {
        bail!(
            "{mixed}: no injected Objective-C exception was counted (engine_exceptions)\n{}",
            res.where_logged()
        );
    }
    if stat(&res, "gave_up") != 0 {
        bail!(
            "{mixed}: random faults switched the device off (GGML_ANE_GIVE_UP rule too eager)\n{}",
            res.where_logged()
        );
    }

    let res = run("eval=1", Some("0"), "test-backend-ops-eval-fails")?;
    let c = OpsCounts::parse(&res.stdout);
    let all = format!("eval=1 GIVE_UP=0: {}", counts(&c, &res));
    println!("test-backend-ops, every evaluation failing: {all}");
    ops_verdict(&c, &res, &all)?;
    if stat(&res, "ops_offloaded") != 0
        || stat(&res, "fallback_own") != 0
        || stat(&res, "fallback_cpu_backend") == 0
    {
        bail!(
            "{all}: with every evaluation failing, every claimed op must be computed by the host's \
             CPU backend\n{}",
            res.where_logged()
        );
    }

    let res = run("eval=1", None, "test-backend-ops-gives-up")?;
    let c = OpsCounts::parse(&res.stdout);
    let off = format!("eval=1: {}", counts(&c, &res));
    println!("test-backend-ops, every evaluation failing, default give-up: {off}");
    if c.fail > 0 || !res.success() {
        ops_verdict(&c, &res, &off)?;
    }
    if stat(&res, "gave_up") != 1 || c.unsupported == 0 {
        bail!(
            "{off}: the device did not give up and decline the rest\n{}",
            res.where_logged()
        );
    }
    Ok(format!("{mixed} | {all} | {off}"))
}

/// The largest value of a number field (`gpu_share`, `staged_peak_mb`, ...) over the
/// `ggml-ane-stats: {json}` stderr lines; 0 when absent.
pub(crate) fn stat_f64(stderr: &str, key: &str) -> f64 {
    let pat = format!("\"{key}\":");
    stderr
        .lines()
        .filter_map(|l| l.split_once(&pat))
        .filter_map(|(_, r)| {
            let end = r.find([',', '}']).unwrap_or(r.len());
            r[..end].trim().parse::<f64>().ok()
        })
        .fold(0.0, f64::max)
}

/// The largest value of an integer field over the `ggml-ane-stats: {json}` stderr lines.
/// [`stats_field_max`], 0 when absent.
pub(crate) fn stat(stderr: &str, key: &str) -> u64 {
    stats_field_max(stderr, key).unwrap_or(0)
}

/// Greedy `llama-completion` of `prompt` (`--temp 0`, `--no-repack`, `threads`) on `model`;
/// `env` adds the plugin's environment, or nothing for CPU-only. Returns the generated text
/// (what follows the echoed prompt) and stderr (the plugin's stats lines).
pub(crate) fn greedy_text(
    model: &Path,
    prompt: &str,
    n_predict: u32,
    threads: &str,
    env: impl FnOnce(&mut Command),
    name: &str,
) -> Result<(String, String)> {
    greedy_text_repack(model, prompt, n_predict, threads, false, env, name)
}

/// [`greedy_text`], with llama.cpp's default CPU_REPACK buffers when `repack` (the CPU backend's
/// own other kernels for quantized weights: a yardstick of how far CPU-only text itself moves).
pub(crate) fn greedy_text_repack(
    model: &Path,
    prompt: &str,
    n_predict: u32,
    threads: &str,
    repack: bool,
    env: impl FnOnce(&mut Command),
    name: &str,
) -> Result<(String, String)> {
    let mut cmd = Command::new(llama::bin("llama-completion"));
    cmd.arg("-m")
        .arg(model)
        .args([
            "-p",
            prompt,
            "-n",
            &n_predict.to_string(),
            "-no-cnv",
            "--temp",
            "0",
        ])
        .args(["-t", threads, "--no-warmup"])
        .args(if repack {
            &[][..]
        } else {
            &["--no-repack"][..]
        })
        .env("OMP_WAIT_POLICY", OMP_WAIT_POLICY)
        .env_remove("GGML_BACKEND_PATH");
    env(&mut cmd);
    crate::exit_drain::apply(&mut cmd);
    let res = run_completion(&mut cmd, name, Duration::from_secs(600))?;
    if !res.success() {
        bail!(
            "{name}: llama-completion {}:\n{}\n{}",
            res.status_text(),
            res.stderr_tail(10),
            res.where_logged()
        );
    }
    let text = match res.stdout.find(prompt) {
        Some(i) => res.stdout[i + prompt.len()..].to_string(),
        None => res.stdout.clone(),
    };
    Ok((text, res.stderr))
}

pub(crate) fn stats_field_max(stderr: &str, key: &str) -> Option<u64> {
    stderr
        .lines()
        // Anywhere in a line: the host's own progress output may precede it on the same line
        // (llama-perplexity's `ETA` has no newline when the plugin prints at exit).
        .filter_map(|l| {
            l.find("ggml-ane-stats: ")
                .map(|i| &l[i + "ggml-ane-stats: ".len()..])
        })
        .filter_map(|j| json_u64(j, key))
        .max()
}

// ---------------------------------------------------------------- e2e

/// Observed on the 2-core build machine with this llama.cpp (OpenMP CPU
/// backend): with OpenMP's default spinning wait policy, `llama-completion`
/// sometimes exits 0 having lost every log message queued after the prompt
/// (generated text and timings; about 5 runs in 6 under `cargo xtask`).
/// `passive` made it reliable (6/6). Used for every `llama-completion` run.
pub const OMP_WAIT_POLICY: &str = "passive";

/// `llama-completion` greedy on one model; `plugin` adds the ANE backend.
pub(crate) fn completion(
    model: &Path,
    plugin: Option<&Path>,
    n_predict: u32,
    extra: &[&str],
) -> Command {
    completion_on(&llama::API3, model, plugin, n_predict, extra)
}

/// [`completion`] with the `llama-completion` of another host version.
pub(crate) fn completion_on(
    host: &llama::Host,
    model: &Path,
    plugin: Option<&Path>,
    n_predict: u32,
    extra: &[&str],
) -> Command {
    let mut cmd = Command::new(host.bin("llama-completion"));
    cmd.arg("-m")
        .arg(model)
        .args(["-p", PROMPT, "-n", &n_predict.to_string()])
        .args(["-no-cnv", "--temp", "0", "-t", "2", "--no-warmup"])
        .args(extra)
        .env("OMP_WAIT_POLICY", OMP_WAIT_POLICY)
        .env_remove("GGML_BACKEND_PATH");
    if let Some(p) = plugin {
        cmd.env("GGML_BACKEND_PATH", p)
            .env("GGML_ANE_ENGINE", "reference");
    }
    crate::exit_drain::apply(&mut cmd);
    cmd
}

/// Runs llama-completion until its log was flushed completely.
///
/// llama-completion prints generated text and timings through llama.cpp's
/// asynchronous logger, which is never drained at exit; a process that exits
/// while the logger lags loses the tail of its output (seen in CPU-only runs
/// too, without the plugin). [`completion`] preloads [`crate::exit_drain`]
/// against that; this is the second line. Entries are written in order, so
/// the final `llama_perf_context_print ... total time` line on stderr proves
/// the text before it is complete. A run without it is retried, and a run
/// still cut after 8 tries is an error: comparing a cut text would blame the
/// plugin for the host's logger.
pub(crate) fn run_completion(
    cmd: &mut Command,
    name: &str,
    timeout: Duration,
) -> Result<util::Logged> {
    const TRIES: u32 = 8;
    let mut attempt = 1;
    loop {
        let res = util::run_logged(cmd, name, timeout)?;
        if !res.success() || res.stderr.contains("total time") {
            return Ok(res);
        }
        if attempt == TRIES {
            bail!(
                "{name}: llama-completion exited {TRIES} times without its final timings line \
                 (output cut at exit by llama.cpp's logger); {}",
                res.where_logged()
            );
        }
        println!("  (llama-completion log truncated at exit, retry {attempt})");
        attempt += 1;
    }
}

fn step_e2e(pre: &mut Prereqs) -> Result<String> {
    let plugin = pre.plugin()?;
    pre.llama()?;
    pre.models()?;
    let mut offloaded = Vec::new();
    for dtype in models::DTYPES {
        let model = models::path(dtype);
        // q4_0 weights would move to the CPU_REPACK buffer type, which the
        // plugin (host buffers only) can never see.
        let extra: &[&str] = if dtype == "q4_0" {
            &["--no-repack"]
        } else {
            &[]
        };
        let timeout = Duration::from_secs(300);
        let cpu = run_completion(
            &mut completion(&model, None, 24, extra),
            &format!("e2e-{dtype}-cpu"),
            timeout,
        )?;
        if !cpu.success() {
            bail!(
                "{dtype}: CPU-only llama-completion {}:\n{}\n{}",
                cpu.status_text(),
                cpu.stderr_tail(15),
                cpu.where_logged()
            );
        }
        let ane = run_completion(
            completion(&model, Some(&plugin), 24, extra).env("GGML_ANE_STATS", "json"),
            &format!("e2e-{dtype}-ane"),
            timeout,
        )?;
        if !ane.success() {
            bail!(
                "{dtype}: llama-completion with the plugin {}:\n{}\n{}",
                ane.status_text(),
                ane.stderr_tail(15),
                ane.where_logged()
            );
        }
        let cpu_text = generated(&cpu.stdout);
        let ane_text = generated(&ane.stdout);
        println!("{dtype} CPU: {cpu_text:?}\n{dtype} ANE: {ane_text:?}");
        if cpu_text.trim().is_empty() {
            bail!("{dtype}: CPU run generated no text; {}", cpu.where_logged());
        }
        if cpu_text != ane_text {
            bail!(
                "{dtype}: greedy output differs\n  cpu: {cpu_text:?}\n  ane: {ane_text:?}\n{}",
                ane.where_logged()
            );
        }
        let ops = stats_ops_offloaded(&ane.stderr).map_err(|e| {
            format!(
                "{dtype}: {e}\n{}\n{}",
                ane.stderr_tail(10),
                ane.where_logged()
            )
        })?;
        if ops == 0 {
            bail!(
                "{dtype}: plugin stats say ops_offloaded = 0; {}",
                ane.where_logged()
            );
        }
        offloaded.push(format!("{dtype} {ops}"));
    }
    Ok(format!(
        "greedy text identical to CPU for {}; ops offloaded: {}",
        models::DTYPES.join("/"),
        offloaded.join(", ")
    ))
}

/// The generated part of `llama-completion` stdout (it echoes the prompt).
/// What follows the echoed `prompt` in llama-completion's stdout (all of it if not found).
pub(crate) fn generated_from<'a>(stdout: &'a str, prompt: &str) -> &'a str {
    let trimmed = stdout.trim_start_matches([' ', '\n']);
    match trimmed.find(prompt) {
        Some(i) => &trimmed[i + prompt.len()..],
        None => stdout,
    }
}

pub(crate) fn generated(stdout: &str) -> &str {
    let trimmed = stdout.trim_start_matches([' ', '\n']);
    match trimmed.find(PROMPT) {
        Some(i) => &trimmed[i + PROMPT.len()..],
        None => stdout,
    }
}

/// `ops_offloaded` from the plugin's `ggml-ane-stats: {json}` stderr lines
/// (one per freed backend instance; the largest count wins).
pub(crate) fn stats_ops_offloaded(stderr: &str) -> Result<u64> {
    const PREFIX: &str = "ggml-ane-stats: ";
    let mut best = None;
    for line in stderr.lines().filter(|l| l.starts_with(PREFIX)) {
        let n = json_u64(&line[PREFIX.len()..], "ops_offloaded")
            .ok_or_else(|| format!("no numeric \"ops_offloaded\" in `{line}`"))?;
        best = best.max(Some(n));
    }
    best.ok_or_else(|| {
        format!("no stderr line starting with `{PREFIX}` (is GGML_ANE_STATS=json honoured?)").into()
    })
}

/// A top-level-ish integer field of a JSON object, without a JSON parser:
/// the first `"key": <digits>` occurrence.
pub(crate) fn json_u64(json: &str, key: &str) -> Option<u64> {
    let pat = format!("\"{key}\"");
    let rest = &json[json.find(&pat)? + pat.len()..];
    let rest = rest.trim_start().strip_prefix(':')?.trim_start();
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_backend_ops_cases() {
        let out = [
            "Testing 2 devices",
            "",
            "Backend 1/2: ANE",
            "  Device description: ANE",
            "",
            "  MUL_MAT(type_a=f16,type_b=f32,m=16,n=1,k=256,bs=[1,1],nr=[1,1],per=[0,1,2,3],k_v=0,o=1): \x1b[1;32mOK\x1b[0m",
            "  MUL_MAT(type_a=q4_0,type_b=f32,m=16,n=1,k=256,bs=[1,1],nr=[1,1],per=[0,1,2,3],k_v=0,o=1): not supported [ANE] ",
            "  MUL_MAT(type_a=f32,type_b=f32,m=16,n=8,k=256,bs=[1,1],nr=[1,1],per=[0,1,2,3],k_v=0,o=1): [MUL_MAT] NMSE = 0.1 > 0.0005 \x1b[1;31mFAIL\x1b[0m",
            "  MUL_MAT(type_a=f32,type_b=f32,m=16,n=8,k=256): skipping large tensors for speed ",
            "  2/3 tests passed",
            "  Backend ANE: \x1b[1;31mFAIL\x1b[0m",
            "Backend 2/2: CPU",
            "  Skipping",
            "Failing tests:",
            "  MUL_MAT(type_a=f32,type_b=f32,m=16,n=8,k=256,bs=[1,1],nr=[1,1],per=[0,1,2,3],k_v=0,o=1)",
            "0/1 backends passed",
            "\x1b[1;31mFAIL\x1b[0m",
        ]
        .join("\n");
        let c = OpsCounts::parse(&out);
        assert_eq!((c.ok, c.fail, c.unsupported, c.skipped), (1, 1, 1, 1));
        assert!(c.failed[0].contains("NMSE"));
    }

    #[test]
    fn finds_stats_json() {
        let err = "load_backend: loaded ANE backend\nggml-ane-stats: {\"engine\":\"reference\",\"ops_offloaded\": 42,\"x\":1}\nggml-ane-stats: {\"ops_offloaded\":0}\n";
        assert_eq!(stats_ops_offloaded(err).unwrap(), 42);
        assert!(stats_ops_offloaded("nothing\n").is_err());
        assert_eq!(json_u64("{\"ops_offloaded\":0}", "ops_offloaded"), Some(0));
        assert_eq!(stats_field_max(err, "ops_offloaded"), Some(42));
        assert_eq!(stats_field_max(err, "ops_fallback"), None);
    }

    #[test]
    fn strips_prompt_echo() {
        let out = format!(" {PROMPT} and then some");
        assert_eq!(generated(&out), " and then some");
    }

    #[test]
    fn reads_the_coreml_verdict() {
        assert_eq!(
            coreml_verdict("PASS a: x\nFAIL b: y\n1 passed, 1 failed\n"),
            Some((1, 1))
        );
        assert_eq!(coreml_verdict("24 passed, 0 failed"), Some((24, 0)));
        assert_eq!(coreml_verdict("Traceback ...\nValueError: x\n"), None);
        assert_eq!(coreml_verdict(""), None);
    }

    #[test]
    fn coreml_corruptions_name_swept_packages() {
        for (_, source) in COREML_CORRUPTIONS {
            assert!(
                COREML_PLUGIN_FORMS.iter().any(|f| f.0 == source) || source == "q4-0-matmul",
                "{source}"
            );
        }
    }

    #[test]
    fn forms_listing() {
        assert_eq!(
            parse_forms("# forms\nconv1x1  1x1 conv\n\nmatmul\n"),
            vec!["conv1x1", "matmul"]
        );
    }
}
