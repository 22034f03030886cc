//! `cargo xtask venv`: the Python environment the tests need.
//!
//! Two tools are Python: the MIL validator (Apple's coremltools judges every
//! MIL op rule) and the tiny-model writer (the `gguf` package). Both run from
//! `target/venv`, pinned and cached by a stamp; a venv that already imports
//! the pinned versions is adopted as is.

use std::path::PathBuf;
use std::process::Command;

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
    if !python().is_file() {
        util::run(
            Command::new(util::host_python())
                .args(["-m", "venv"])
                .arg(&dir),
        )
        .map_err(|e| format!("{e}\n(on Debian: `apt-get install python3-venv`)"))?;
    }
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
