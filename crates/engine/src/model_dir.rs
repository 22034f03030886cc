//! Model directories on disk: created private, written without following links, and never left
//! behind.
//!
//! The ANE compiler reads `model.mil` and the weight blobs from a directory under the per-user
//! temporary directory (`localModelPath`). Those files hold model weights, so:
//! - directories are created with mode 0700 and must really be directories we own: a symlink or
//!   another user's directory planted at the predictable path (the name is a hash of the MIL and
//!   weights) is refused, never followed;
//! - files are created with `O_NOFOLLOW`, mode 0600;
//! - each directory has an owner record beside it (`.ggml-ane-<name>.owner`, holding our pid), not
//!   inside it, so the compiler sees exactly the files it expects; at start-up, directories whose
//!   owner process is gone (a crash) are removed ([`clean_stale`]);
//! - on release of the last program using a directory, it and its owner record are removed
//!   ([`remove`]).

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

const OWNER_PREFIX: &str = ".ggml-ane-";
const OWNER_SUFFIX: &str = ".owner";

fn owner_record(dir: &Path) -> Option<PathBuf> {
    let name = dir.file_name()?.to_string_lossy().into_owned();
    Some(dir.with_file_name(format!("{OWNER_PREFIX}{name}{OWNER_SUFFIX}")))
}

/// Checks that `dir` is a real directory (not a symlink) owned by this user, and makes it 0700.
fn check_private(dir: &Path) -> io::Result<()> {
    let meta = fs::symlink_metadata(dir)?;
    if meta.file_type().is_symlink() || !meta.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a plain directory", dir.display()),
        ));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        // SAFETY: geteuid has no preconditions and cannot fail.
        let me = unsafe { libc::geteuid() };
        if meta.uid() != me {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("{} belongs to another user", dir.display()),
            ));
        }
        if meta.mode() & 0o777 != 0o700 {
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
        }
    }
    Ok(())
}

/// Creates `dir` (its parent must exist) with mode 0700, or accepts it if it already is a private
/// directory of ours; refuses symlinks and foreign directories.
///
/// # Errors
/// I/O errors, or the refusal, naming the path.
pub fn create_private(dir: &Path) -> io::Result<()> {
    let mut b = fs::DirBuilder::new();
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
    match b.create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    check_private(dir)
}

/// Writes `bytes` to `path` (mode 0600), refusing to follow a symlink planted there.
///
/// # Errors
/// I/O errors, including `ELOOP` for a symlink.
pub fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut o = fs::OpenOptions::new();
    o.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o600).custom_flags(libc::O_NOFOLLOW);
    }
    o.open(path)?.write_all(bytes)
}

/// Records this process as the owner of `dir` (beside it), so a later start can clean it up if we
/// crash.
///
/// # Errors
/// I/O errors.
pub fn claim(dir: &Path) -> io::Result<()> {
    let rec = owner_record(dir)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "directory has no name"))?;
    write_private(&rec, std::process::id().to_string().as_bytes())
}

/// Removes `dir` and its owner record. Missing ones are fine.
pub fn remove(dir: &Path) {
    // Only a real directory is removed recursively; a symlink is unlinked, never followed.
    match fs::symlink_metadata(dir) {
        Ok(m) if m.is_dir() => {
            let _ = fs::remove_dir_all(dir);
        }
        Ok(_) => {
            let _ = fs::remove_file(dir);
        }
        Err(_) => {}
    }
    if let Some(rec) = owner_record(dir) {
        let _ = fs::remove_file(rec);
    }
}

/// Whether process `pid` still exists (signal 0); other users' processes count as alive.
pub fn process_alive(pid: u32) -> bool {
    #[cfg(unix)]
    {
        // SAFETY: kill with signal 0 only checks whether the process exists.
        let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
        r == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
    }
    #[cfg(not(unix))]
    {
        let _ = pid;
        true
    }
}

/// Removes the model directories under `root` whose owner process no longer exists (left by a
/// crash). Directories without an owner record (not ours) are never touched. Returns how many
/// were removed.
pub fn clean_stale(root: &Path) -> usize {
    let Ok(entries) = fs::read_dir(root) else {
        return 0;
    };
    let mut removed = 0;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(dir_name) = name
            .strip_prefix(OWNER_PREFIX)
            .and_then(|n| n.strip_suffix(OWNER_SUFFIX))
        else {
            continue;
        };
        let pid = fs::read_to_string(e.path())
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok());
        if pid.is_some_and(|p| p != std::process::id() && !process_alive(p)) {
            remove(&root.join(dir_name));
            removed += 1;
        }
    }
    removed
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn tmp(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("ane-model-dir-test-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn directories_are_private_and_symlinks_refused() {
        let root = tmp("private");
        let dir = root.join("ABC");
        create_private(&dir).unwrap();
        assert_eq!(
            fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        // Loosened by someone: tightened again on reuse.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        create_private(&dir).unwrap();
        assert_eq!(
            fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        // A symlink planted at the predictable name is refused.
        let target = root.join("elsewhere");
        fs::create_dir(&target).unwrap();
        let planted = root.join("DEF");
        std::os::unix::fs::symlink(&target, &planted).unwrap();
        assert!(create_private(&planted).is_err());
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn files_are_not_written_through_symlinks() {
        let root = tmp("nofollow");
        let victim = root.join("victim");
        fs::write(&victim, b"keep").unwrap();
        let link = root.join("model.mil");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        assert!(write_private(&link, b"weights").is_err());
        assert_eq!(fs::read(&victim).unwrap(), b"keep");
        let f = root.join("weight.bin");
        write_private(&f, b"w").unwrap();
        assert_eq!(
            fs::metadata(&f).unwrap().permissions().mode() & 0o777,
            0o600
        );
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn stale_directories_of_dead_owners_are_cleaned() {
        let root = tmp("stale");
        let (dead, live, foreign) = (root.join("DEAD"), root.join("LIVE"), root.join("FOREIGN"));
        for d in [&dead, &live, &foreign] {
            create_private(d).unwrap();
            write_private(&d.join("model.mil"), b"x").unwrap();
        }
        // A pid that cannot exist (above the kernel's pid_max) stands for a crashed process.
        write_private(&owner_record(&dead).unwrap(), b"4294967").unwrap();
        claim(&live).unwrap();
        assert_eq!(clean_stale(&root), 1);
        assert!(!dead.exists() && !owner_record(&dead).unwrap().exists());
        assert!(live.exists(), "our own directory stays");
        assert!(
            foreign.exists(),
            "directories without an owner record are not ours"
        );
        remove(&live);
        assert!(!live.exists() && !owner_record(&live).unwrap().exists());
        fs::remove_dir_all(&root).unwrap();
    }
}
