//! `cargo xtask venv`: the Python environment the tests need.
//!
//! Two tools are Python: the MIL validator (Apple's coremltools judges every
//! MIL op rule) and the tiny-model writer (the `gguf` package). Both run from
//! `target/venv`, pinned and cached by a stamp; a venv that already imports
//! the pinned versions is adopted as is.

use std::path::PathBuf;
use std::process::Command;

use crate::tools;
use crate::util::{self, abs, Result, Section, Stamp};

/// pip requirements, pinned where behaviour matters.
const REQUIREMENTS: [&str; 3] = ["coremltools==9.0", "numpy", "gguf==0.19.0"];

/// Prints "ok" when the pinned packages import at the pinned versions.
const PROBE: &str = "\
import importlib.metadata as m, coremltools, numpy, gguf
assert m.version('coremltools') == '9.0', m.version('coremltools')
assert m.version('gguf') == '0.19.0', m.version('gguf')
print('ok')";

/// The venv's Python interpreter.
pub fn python() -> PathBuf {
    abs("target/venv/bin/python")
}

fn usable() -> bool {
    python().is_file()
        && util::read(Command::new(python()).args(["-c", PROBE]))
            .is_ok_and(|out| out.trim_end().ends_with("ok"))
}

/// Ensure `target/venv` exists (any packages); returns its Python. Made
/// without root by [`tools::make_venv`] (stdlib venv, else virtualenv).
pub fn base() -> Result<PathBuf> {
    let dir = abs("target/venv");
    if python().is_file() {
        return Ok(python());
    }
    let host = util::host_python();
    let how = tools::make_venv(&host, &dir, false)?;
    println!("created {} ({how:?}, from {host})", dir.display());
    Ok(python())
}

/// Ensure `target/venv` has [`REQUIREMENTS`]; returns its Python.
pub fn run() -> Result<PathBuf> {
    let _s = Section::new("python venv");
    let dir = abs("target/venv");
    let stamp = Stamp::new(
        dir.join("xtask-stamp"),
        format!("{}\n", REQUIREMENTS.join(" ")),
    );
    if stamp.fresh() && python().is_file() {
        println!("{} up to date", dir.display());
        return Ok(python());
    }
    if usable() {
        println!("{} already has {}", dir.display(), REQUIREMENTS.join(" "));
        stamp.write()?;
        return Ok(python());
    }
    base()?;
    println!(
        "installing {} from PyPI into {}",
        REQUIREMENTS.join(" "),
        dir.display()
    );
    util::run(
        Command::new(python())
            .args(["-m", "pip", "install", "--quiet"])
            .args(REQUIREMENTS),
    )?;
    if !usable() {
        return Err(format!("{} still lacks {}", dir.display(), REQUIREMENTS.join(" ")).into());
    }
    stamp.write()?;
    Ok(python())
}
