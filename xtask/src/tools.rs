//! Build tools a fresh machine may lack, found or installed without root.
//!
//! The README promises that its two commands set up a machine that has only
//! Rust, Python 3 and a C compiler. llama.cpp needs cmake; the tests need a
//! Python venv. Neither may come from the system package manager: a newcomer
//! is not always root, and CI must prove that nothing outside these commands
//! is needed. So cmake is taken from PATH when it is recent enough and
//! otherwise installed from PyPI (the `cmake` package ships the binary) into
//! the project's own venv, and the venv itself is made by `python3 -m venv`
//! or, where Debian stripped `ensurepip` out of the interpreter, by
//! `virtualenv` installed with the host's pip into a private folder. Each
//! install is announced in one line that says what and where.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::util::{self, abs, bail, Result};

/// llama.cpp b11434's `cmake_minimum_required`.
const CMAKE_MIN: (u32, u32) = (3, 14);
/// The PyPI cmake we install when PATH has none (a 3.x, as llama.cpp's CI uses).
const CMAKE_PYPI: &str = "cmake==3.31.10";
/// virtualenv bundles its own pip wheels, so it needs no `ensurepip`.
const VIRTUALENV_PYPI: &str = "virtualenv==21.15.14";

/// `(major, minor)` of `cmake --version`'s first line ("cmake version 3.31.10").
pub fn parse_cmake_version(out: &str) -> Option<(u32, u32)> {
    let v = out.lines().next()?.trim().strip_prefix("cmake version ")?;
    let mut it = v.split(['.', '-']);
    let major = it.next()?.parse().ok()?;
    let minor = it.next()?.parse().ok()?;
    Some((major, minor))
}

fn cmake_version(bin: &Path) -> Option<(u32, u32)> {
    let out = util::read(Command::new(bin).arg("--version")).ok()?;
    parse_cmake_version(&out)
}

/// The first `cmake` on `path` (a PATH value) that is at least [`CMAKE_MIN`].
pub fn cmake_on_path(path: &std::ffi::OsStr) -> Option<(PathBuf, (u32, u32))> {
    std::env::split_paths(path)
        .map(|d| d.join("cmake"))
        .filter(|p| p.is_file())
        .find_map(|p| {
            cmake_version(&p)
                .filter(|v| *v >= CMAKE_MIN)
                .map(|v| (p, v))
        })
}

/// cmake in the project venv (where [`cmake`] installs it).
pub fn venv_cmake() -> PathBuf {
    abs("target/venv/bin/cmake")
}

/// A usable cmake: from `path` (normally `$PATH`), else the project venv's,
/// installing it from PyPI there when missing. `python` is the venv's Python.
pub fn cmake_with(path: &std::ffi::OsStr, python: &Path) -> Result<PathBuf> {
    if let Some((bin, (ma, mi))) = cmake_on_path(path) {
        println!("cmake: {} ({ma}.{mi})", bin.display());
        return Ok(bin);
    }
    let bin = venv_cmake();
    if cmake_version(&bin).is_some_and(|v| v >= CMAKE_MIN) {
        println!("cmake: {} (PyPI, installed earlier)", bin.display());
        return Ok(bin);
    }
    println!(
        "installing {CMAKE_PYPI} from PyPI into {} (no cmake >= {}.{} on PATH)",
        bin.parent().unwrap_or(&bin).display(),
        CMAKE_MIN.0,
        CMAKE_MIN.1
    );
    util::run(
        Command::new(python)
            .args(["-m", "pip", "install", "--quiet", CMAKE_PYPI])
            .env("PIP_DISABLE_PIP_VERSION_CHECK", "1"),
    )?;
    match cmake_version(&bin) {
        Some(v) if v >= CMAKE_MIN => Ok(bin),
        Some((ma, mi)) => bail!("{} is {ma}.{mi}, older than needed", bin.display()),
        None => bail!(
            "pip installed {CMAKE_PYPI} but {} does not run",
            bin.display()
        ),
    }
}

/// [`cmake_with`] on this process's PATH and the project venv.
pub fn cmake() -> Result<PathBuf> {
    let python = crate::venv::base()?;
    cmake_with(&std::env::var_os("PATH").unwrap_or_default(), &python)
}

/// How [`make_venv`] created a venv.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum VenvHow {
    /// `python3 -m venv` (the interpreter has ensurepip).
    Stdlib,
    /// `virtualenv`, installed with the host pip into `target/pytools`.
    Virtualenv,
}

/// Create a venv at `dir` with `host` Python. The stdlib route is tried first
/// unless `force_virtualenv`; a failure there (Debian's python3 without the
/// python3-venv package) falls back to virtualenv, which needs only the host's pip.
pub fn make_venv(host: &str, dir: &Path, force_virtualenv: bool) -> Result<VenvHow> {
    if !force_virtualenv {
        let stdlib = util::read(Command::new(host).args(["-m", "venv"]).arg(dir));
        match stdlib {
            Ok(_) if dir.join("bin/python").is_file() => return Ok(VenvHow::Stdlib),
            Ok(_) => println!("`{host} -m venv` made no interpreter; trying virtualenv"),
            Err(e) => {
                let first = e.to_string();
                let first = first.lines().last().unwrap_or("").to_owned();
                println!("`{host} -m venv` failed ({first}); trying virtualenv");
            }
        }
        let _ = std::fs::remove_dir_all(dir);
    }
    let tools = abs("target/pytools");
    if !tools.join("virtualenv").is_dir() {
        println!(
            "installing {VIRTUALENV_PYPI} from PyPI into {} (to create {})",
            tools.display(),
            dir.display()
        );
        util::run(
            Command::new(host)
                .args(["-m", "pip", "install", "--quiet", "--target"])
                .arg(&tools)
                .arg(VIRTUALENV_PYPI)
                .env("PIP_DISABLE_PIP_VERSION_CHECK", "1"),
        )
        .map_err(|e| {
            format!(
                "{e}\nneither `{host} -m venv` nor pip works: install python3-venv \
                 (Debian) or python3-pip, or set PYTHON to a full CPython"
            )
        })?;
    }
    let mut pythonpath = OsString::from(&tools);
    if let Some(old) = std::env::var_os("PYTHONPATH") {
        pythonpath.push(":");
        pythonpath.push(old);
    }
    util::run(
        Command::new(host)
            .args(["-m", "virtualenv", "--quiet"])
            .arg(dir)
            .env("PYTHONPATH", pythonpath),
    )?;
    if !dir.join("bin/python").is_file() {
        bail!("virtualenv made no {}", dir.join("bin/python").display());
    }
    Ok(VenvHow::Virtualenv)
}

/// PATH with every folder holding a `cmake` left out (the setup test's
/// "fresh machine").
pub fn path_without_cmake(path: &std::ffi::OsStr) -> OsString {
    let kept: Vec<PathBuf> = std::env::split_paths(path)
        .filter(|d| !d.join("cmake").exists())
        .collect();
    std::env::join_paths(kept).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmake_versions_parse() {
        assert_eq!(
            parse_cmake_version("cmake version 3.31.10\n\nCMake suite"),
            Some((3, 31))
        );
        assert_eq!(parse_cmake_version("cmake version 4.0.0-rc1"), Some((4, 0)));
        assert_eq!(parse_cmake_version("cmake3 version 3.1"), None);
        assert_eq!(parse_cmake_version(""), None);
        assert!((3, 9) < CMAKE_MIN && (3, 31) >= CMAKE_MIN && (4, 0) >= CMAKE_MIN);
    }

    #[test]
    fn hidden_cmake_is_not_found() {
        let dir = std::env::temp_dir().join(format!("xtask-cmake-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("cmake"), "").unwrap();
        let path = std::env::join_paths([dir.clone(), PathBuf::from("/nonexistent")]).unwrap();
        let hidden = path_without_cmake(&path);
        assert_eq!(std::env::split_paths(&hidden).count(), 1);
        // an empty file is no cmake: not picked even when visible
        assert!(cmake_on_path(&path).is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
