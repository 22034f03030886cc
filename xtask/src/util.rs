//! Shared plumbing: errors, running child processes (echoed, logged, with
//! timeouts), stamp files. Kept here so each task module reads as a recipe.

use std::fmt::Write as _;
use std::fs;
use std::io::{self, Read as _};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Every task returns this; the message is printed as the final error line.
pub type Result<T = (), E = Box<dyn std::error::Error>> = std::result::Result<T, E>;

/// `return Err(format!(..).into())`.
macro_rules! bail {
    ($($t:tt)*) => { return Err(format!($($t)*).into()) };
}
pub(crate) use bail;

/// The workspace root. `CARGO_MANIFEST_DIR` is read at run time first (cargo
/// sets it for `cargo run`), so a copy of the binary can be pointed elsewhere.
pub fn project_root() -> PathBuf {
    let dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    dir.parent().map(Path::to_path_buf).unwrap_or(dir)
}

/// The cargo that runs us (so rustup overrides and `+toolchain` carry over).
pub fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// Host Python used to create the venv and fetch the sdist.
pub fn host_python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".into())
}

pub fn nproc() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// Absolute path under the project root.
pub fn abs(rel: impl AsRef<Path>) -> PathBuf {
    project_root().join(rel)
}

/// Shell-like rendering of a command, for echoing and error messages.
pub fn render(cmd: &Command) -> String {
    let mut s = String::new();
    for (k, v) in cmd.get_envs() {
        if let Some(v) = v {
            let _ = write!(s, "{}={} ", k.to_string_lossy(), v.to_string_lossy());
        }
    }
    s.push_str(&cmd.get_program().to_string_lossy());
    for a in cmd.get_args() {
        let a = a.to_string_lossy();
        if a.is_empty() || a.contains([' ', '"', '\'']) {
            let _ = write!(s, " '{}'", a.replace('\'', "'\\''"));
        } else {
            let _ = write!(s, " {a}");
        }
    }
    s
}

/// Run with inherited stdio; fail on a nonzero exit.
pub fn run(cmd: &mut Command) -> Result {
    println!("$ {}", render(cmd));
    let status = cmd
        .status()
        .map_err(|e| format!("cannot start `{}`: {e}", render(cmd)))?;
    if !status.success() {
        bail!("`{}` failed: {status}", render(cmd));
    }
    Ok(())
}

/// Run quietly and return stdout; fail on a nonzero exit (stderr in the error).
pub fn read(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot start `{}`: {e}", render(cmd)))?;
    if !out.status.success() {
        bail!(
            "`{}` failed: {}\n{}",
            render(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Output of [`run_logged`]: both streams are also kept in files.
pub struct Logged {
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
    pub stdout_path: PathBuf,
    pub stderr_path: PathBuf,
    pub elapsed: Duration,
}

impl Logged {
    pub fn success(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }

    /// "exit status: 1" or "killed after timeout".
    pub fn status_text(&self) -> String {
        match self.status {
            Some(s) => s.to_string(),
            None => "killed after timeout".into(),
        }
    }

    /// The last `n` lines of stderr, for error messages.
    pub fn stderr_tail(&self, n: usize) -> String {
        tail(&self.stderr, n)
    }

    pub fn where_logged(&self) -> String {
        format!(
            "logs: {} , {}",
            self.stdout_path.display(),
            self.stderr_path.display()
        )
    }
}

pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Run with stdin from /dev/null and stdout/stderr captured into
/// `target/xtask-logs/NAME.{stdout,stderr}`; kill it after `timeout`.
/// Never fails on the child's exit status: callers judge the result.
pub fn run_logged(cmd: &mut Command, name: &str, timeout: Duration) -> Result<Logged> {
    let dir = abs("target/xtask-logs");
    fs::create_dir_all(&dir)?;
    let stdout_path = dir.join(format!("{name}.stdout"));
    let stderr_path = dir.join(format!("{name}.stderr"));
    println!("$ {}", render(cmd));
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(fs::File::create(&stdout_path)?)
        .stderr(fs::File::create(&stderr_path)?)
        .spawn()
        .map_err(|e| format!("cannot start `{}`: {e}", render(cmd)))?;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Ok(Logged {
        status,
        stdout: read_lossy(&stdout_path)?,
        stderr: read_lossy(&stderr_path)?,
        stdout_path,
        stderr_path,
        elapsed: start.elapsed(),
    })
}

fn read_lossy(path: &Path) -> io::Result<String> {
    let mut bytes = Vec::new();
    fs::File::open(path)?.read_to_end(&mut bytes)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// A stamp file: `fresh` when it holds exactly `content`.
pub struct Stamp {
    path: PathBuf,
    content: String,
}

impl Stamp {
    pub fn new(path: impl Into<PathBuf>, content: String) -> Stamp {
        Stamp {
            path: path.into(),
            content,
        }
    }

    pub fn fresh(&self) -> bool {
        fs::read_to_string(&self.path).is_ok_and(|s| s == self.content)
    }

    pub fn write(&self) -> Result {
        if let Some(dir) = self.path.parent() {
            fs::create_dir_all(dir)?;
        }
        fs::write(&self.path, &self.content)?;
        Ok(())
    }

    pub fn remove(&self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Prints "== title" and, on drop, how long the section took.
pub struct Section {
    title: String,
    start: Instant,
}

impl Section {
    pub fn new(title: impl Into<String>) -> Section {
        let title = title.into();
        println!("\n== {title}");
        Section {
            title,
            start: Instant::now(),
        }
    }
}

impl Drop for Section {
    fn drop(&mut self) {
        println!(
            "== {} ({:.1}s)",
            self.title,
            self.start.elapsed().as_secs_f64()
        );
    }
}
