//! A preload library that lets llama-completion finish printing before it exits.
//!
//! llama.cpp b11434's `common_log` writes from a worker thread and its
//! singleton is leaked on purpose, so nothing drains the queue at exit: a run
//! that exits while the worker lags loses the tail of stdout/stderr (measured:
//! 9 of 30 CPU-only runs here, no plugin involved). `exit_drain.c` is a
//! destructor that sleeps 200 ms inside `exit()`, while the worker still runs
//! (30 of 30 complete). It interposes no symbol, so the computation is the
//! host's own. `run_completion` still checks for the final timings line and
//! retries, so a missing shim only makes the tests slower, never wrong.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use crate::util::{self, Stamp};

const SOURCE: &str = include_str!("exit_drain.c");

/// Builds the library once per source text; `None` (said once, loudly) where
/// it cannot be built or preloaded.
fn library() -> Option<&'static PathBuf> {
    static LIB: OnceLock<Option<PathBuf>> = OnceLock::new();
    LIB.get_or_init(|| match build() {
        Ok(p) => Some(p),
        Err(e) => {
            println!(
                "WARNING: no exit-drain preload ({e}); llama-completion output may be cut \
                 at exit and runs will be retried"
            );
            None
        }
    })
    .as_ref()
}

fn build() -> util::Result<PathBuf> {
    if !cfg!(target_os = "linux") {
        return Err("only built for Linux (LD_PRELOAD)".into());
    }
    let dir = util::abs("target/xtask-shim");
    std::fs::create_dir_all(&dir)?;
    let src = dir.join("exit_drain.c");
    let lib = dir.join("libexit_drain.so");
    let stamp = Stamp::new(dir.join("stamp"), SOURCE.to_string());
    if stamp.fresh() && lib.is_file() {
        return Ok(lib);
    }
    std::fs::write(&src, SOURCE)?;
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    util::run(
        Command::new(cc)
            .args(["-shared", "-fPIC", "-O2", "-o"])
            .arg(&lib)
            .arg(&src),
    )?;
    stamp.write()?;
    Ok(lib)
}

/// Adds the preload to a llama-completion command (nothing where unavailable).
pub fn apply(cmd: &mut Command) {
    if let Some(lib) = library() {
        cmd.env("LD_PRELOAD", lib);
    }
}
