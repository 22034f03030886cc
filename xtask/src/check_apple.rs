//! `cargo xtask check-apple`: type-check the macOS-only code on Linux.
//!
//! The ANE engine lives under `cfg(target_vendor = "apple")` and CI has no
//! Mac. Clippy only needs the target's standard library (no linker), so
//! `cargo clippy --target aarch64-apple-darwin` catches type errors and lints
//! there. If rustup cannot add the target, say so loudly instead of failing:
//! the rest of CI is still meaningful.
//!
//! One build script does need a compiler: objc2's `exception` feature compiles a small
//! Objective-C file (`@try`/`@catch`) for the target, which no Linux compiler here can do. Clippy
//! never links, so [`stand_in_cc`] points cc-rs at a stand-in that writes an empty host object
//! for it: the Rust side is type-checked; the Objective-C helper is compiled only on a Mac.

use crate::util::{self, Result, Section};

const TARGET: &str = "aarch64-apple-darwin";

pub fn run() -> Result {
    let _s = Section::new(format!("clippy for {TARGET}"));
    let added = util::run(std::process::Command::new("rustup").args(["target", "add", TARGET]));
    if let Err(e) = added {
        let bar = "!".repeat(78);
        eprintln!("{bar}\n!!! {TARGET} target unavailable: macOS code NOT type-checked !!!\n!!! {e}\n{bar}");
        return Ok(());
    }
    let cc = stand_in_cc()?;
    util::run(util::cargo().env("CC_aarch64_apple_darwin", &cc).args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--target",
        TARGET,
        "--",
        "-D",
        "warnings",
    ]))
}

/// A `cc` for `aarch64-apple-darwin` that compiles an empty C file for the host in place of
/// whatever it is given, writing the object where `-o` says (see the module doc).
fn stand_in_cc() -> Result<std::path::PathBuf> {
    let dir = util::abs("target/xtask-shim");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("apple-cc-stand-in");
    let host = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let script = format!(
        "#!/bin/sh\n\
         # Stand-in C compiler for type-checking aarch64-apple-darwin on Linux (xtask check-apple):\n\
         # the object it writes is empty and never linked.\n\
         # cc-rs first asks for the compiler family by preprocessing a file: answer as the host cc.\n\
         [ \"$1\" = -E ] && exec {host} \"$@\"\n\
         [ \"$1\" = \"-?\" ] && exit 1\n\
         out=\n\
         while [ $# -gt 0 ]; do\n\
           case $1 in -o) out=$2 ;; -Fo*) out=${{1#-Fo}} ;; esac; shift\n\
         done\n\
         [ -n \"$out\" ] || exit 0\n\
         printf '' | {host} -x c -c -o \"$out\" -\n"
    );
    std::fs::write(&path, script)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    }
    Ok(path)
}
