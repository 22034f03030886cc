//! ANE and GPU together: each prefill matmul's output rows split between the device and the GPU
//! that holds the weights, both computing at once.
//!
//! Beside a GPU every claimed prefill matmul would otherwise run on the device while the GPU waits,
//! and published figures put the ANE alone below Metal at prefill on most Macs: running both is
//! what makes prefill faster. For a group whose weights sit in the GPU's weights buffer, the GPU
//! computes the last rows of every member through the plugin's own instance of its backend
//! ([`crate::host_gpu`]) on a thread of its own, while the device computes the first rows; one
//! output is written. Rows are cut on 32-row boundaries ([`ane_rows`]) so the device's programs
//! keep planner-friendly shapes, and a share stays fixed per shape class, so each class compiles
//! one program.
//!
//! The share: `GGML_ANE_GPU_SHARE=auto` (the default) measures, per shape class, the device and the
//! GPU each computing the whole group, and gives the GPU the share that makes both finish together
//! ([`share_from_times`]); the figures are kept per machine in the user's cache folder
//! ([`Calibrations`]), re-measured when older than [`STALE_DAYS`]. A fixed share forces it;
//! `GGML_ANE_PREFER=energy` keeps everything on the device. A failed GPU part is computed by the
//! CPU and its class falls back to the device alone; a failed device part falls back as every
//! device dispatch does. Nothing is left unwritten.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::config::{Config, GpuShare};
use crate::ffi::{ggml_tensor, GGML_TYPE_F32};
use crate::host_gpu::{GpuRows, HostGpu};
use crate::matmul::{self, Group, Member};

/// Row granularity of a cut: the device's programs take M in multiples of 32.
pub const ROW_STEP: usize = 32;

/// Calibrations older than this are measured again.
pub const STALE_DAYS: u64 = 30;

/// Rows of `m` the device keeps when the GPU's share is `gpu_share`, on [`ROW_STEP`] boundaries.
pub fn ane_rows(m: usize, gpu_share: f64) -> usize {
    let keep = (m as f64 * (1.0 - gpu_share.clamp(0.0, 1.0)) / ROW_STEP as f64).round() as usize;
    (keep * ROW_STEP).min(m)
}

/// The GPU's share that makes both finish together when the device takes `ane_ms` and the GPU
/// `gpu_ms` for the whole work, in eighths (a few shape classes share programs).
pub fn share_from_times(ane_ms: f64, gpu_ms: f64) -> f64 {
    if !(ane_ms.is_finite() && gpu_ms.is_finite()) || ane_ms <= 0.0 || gpu_ms <= 0.0 {
        return 0.0;
    }
    (ane_ms / (ane_ms + gpu_ms) * 8.0).round() / 8.0
}

/// What a split of one class was measured at.
#[derive(Clone, Debug, PartialEq)]
pub struct Calibration {
    /// Shape class ([`class_of`]).
    pub class: String,
    pub ane_ms: f64,
    pub gpu_ms: f64,
    /// The GPU's share of rows.
    pub share: f64,
    /// Seconds since the epoch when measured.
    pub at: u64,
}

/// The calibrations of one machine (`machine`: engine, chip, OS build, GPU), in memory and in the
/// cache file `split-calibrations.tsv` of a private folder.
pub struct Calibrations {
    machine: String,
    file: Option<PathBuf>,
    known: HashMap<String, Calibration>,
    /// Classes measured in this process.
    pub measured: Vec<String>,
    /// Classes read from the file and used.
    pub reused: std::collections::HashSet<String>,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The folder calibrations are kept in: `GGML_ANE_CACHE_DIR`, else the user's cache folder
/// ([`ane_plan::calibration::cache_dir`], which `ane bench split` reads too).
pub fn cache_dir(cfg: &Config) -> Option<PathBuf> {
    ane_plan::calibration::cache_dir(cfg.cache_dir.clone())
}

/// Creates `dir` private to the user (0700) and refuses a symlink or a file in its place.
fn private_dir(dir: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(dir) {
        Ok(m) if m.file_type().is_symlink() || !m.is_dir() => Err(std::io::Error::other(format!(
            "{} is not a directory of ours",
            dir.display()
        ))),
        Ok(_) => Ok(()),
        Err(_) => {
            std::fs::create_dir_all(dir)?;
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
            }
            Ok(())
        }
    }
}

impl Calibrations {
    /// The calibrations of `machine` found in `dir` (none when it is unreadable), fresh ones only.
    pub fn open(machine: String, dir: Option<&Path>) -> Calibrations {
        let file = dir.map(|d| d.join(ane_plan::calibration::SPLIT_FILE));
        let mut known = HashMap::new();
        if let Some(text) = file.as_ref().and_then(|f| std::fs::read_to_string(f).ok()) {
            let fresh_after = now().saturating_sub(STALE_DAYS * 86_400);
            for c in text.lines().filter_map(|l| parse_line(l, &machine)) {
                if c.at >= fresh_after {
                    known.insert(c.class.clone(), c);
                }
            }
        }
        Calibrations {
            machine,
            file,
            known,
            measured: Vec::new(),
            reused: Default::default(),
        }
    }

    /// The share of `class`, if known.
    pub fn get(&self, class: &str) -> Option<&Calibration> {
        self.known.get(class)
    }

    /// Records a measurement and writes the file (every machine's lines kept; a failure to write
    /// only loses the cache).
    pub fn record(&mut self, c: Calibration) {
        self.measured.push(c.class.clone());
        self.known.insert(c.class.clone(), c);
        let Some(file) = &self.file else {
            return;
        };
        let Some(dir) = file.parent() else {
            return;
        };
        if private_dir(dir).is_err() {
            return;
        }
        let others: Vec<String> = std::fs::read_to_string(file)
            .unwrap_or_default()
            .lines()
            .filter(|l| parse_line(l, &self.machine).is_none() && !l.trim().is_empty())
            .map(str::to_string)
            .collect();
        let mut text = others.join("\n");
        if !text.is_empty() {
            text.push('\n');
        }
        let mut mine: Vec<&Calibration> = self.known.values().collect();
        mine.sort_by(|a, b| a.class.cmp(&b.class));
        for c in mine {
            text.push_str(&format!(
                "{}\t{}\t{:.3}\t{:.3}\t{}\t{}\n",
                self.machine, c.class, c.ane_ms, c.gpu_ms, c.share, c.at
            ));
        }
        let tmp = file.with_extension(format!("tmp{}", std::process::id()));
        if std::fs::write(&tmp, text).is_ok() {
            let _ = std::fs::rename(&tmp, file);
        }
    }

    /// Every known calibration (stats).
    pub fn all(&self) -> Vec<Calibration> {
        let mut v: Vec<Calibration> = self.known.values().cloned().collect();
        v.sort_by(|a, b| a.class.cmp(&b.class));
        v
    }
}

/// One line of the cache file, if it is `machine`'s.
fn parse_line(line: &str, machine: &str) -> Option<Calibration> {
    let f: Vec<&str> = line.split('\t').collect();
    if f.len() != 6 || f[0] != machine {
        return None;
    }
    Some(Calibration {
        class: f[1].to_string(),
        ane_ms: f[2].parse().ok()?,
        gpu_ms: f[3].parse().ok()?,
        share: f[4]
            .parse::<f64>()
            .ok()
            .filter(|s| (0.0..=1.0).contains(s))?,
        at: f[5].parse().ok()?,
    })
}

/// `GGML_ANE_SPLIT_TEST`: delays and failures injected into the split, for the tests of the share
/// it picks and of its fault paths (`gpu_ms=N`: the GPU part takes N ms longer; `ane_ms=N`: the
/// device part; `gpu_fail=1`: every GPU part fails).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SplitTest {
    pub gpu_ms: u64,
    pub ane_ms: u64,
    pub gpu_fail: bool,
}

impl FromStr for SplitTest {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut t = SplitTest::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').ok_or(format!("`{part}`: key=value"))?;
            match k {
                "gpu_ms" => t.gpu_ms = v.parse().map_err(|_| format!("`{part}`"))?,
                "ane_ms" => t.ane_ms = v.parse().map_err(|_| format!("`{part}`"))?,
                "gpu_fail" => t.gpu_fail = v == "1",
                _ => return Err(format!("unknown key `{k}`")),
            }
        }
        Ok(t)
    }
}

/// The shape class of a group: weight type, K, each member's M, and N's power-of-two bucket
/// (prefill batches of similar size share a share).
pub fn class_of(g: &Group) -> String {
    let m: Vec<String> = g
        .members
        .iter()
        .map(|m| m.src0.desc.ne[1].to_string())
        .collect();
    let n = g.src1.desc.ne[1].max(1) as usize;
    format!(
        "t{}:k{}:m{}:n{}",
        g.members[0].src0.desc.ty,
        g.members[0].src0.desc.ne[0],
        m.join("+"),
        n.next_power_of_two()
    )
}

/// The split state of the device: calibrations, and how often each class was seen.
pub struct Splitter {
    cal: Mutex<Option<Calibrations>>,
    seen: Mutex<HashMap<String, u32>>,
}

impl Default for Splitter {
    fn default() -> Self {
        Splitter {
            cal: Mutex::new(None),
            seen: Mutex::new(HashMap::new()),
        }
    }
}

impl Splitter {
    /// Every calibration known, and how many were measured here and reused from the cache.
    pub fn report(&self) -> (Vec<Calibration>, usize, usize) {
        let c = self.cal.lock().unwrap_or_else(|e| e.into_inner());
        match c.as_ref() {
            Some(c) => (c.all(), c.measured.len(), c.reused.len()),
            None => (Vec::new(), 0, 0),
        }
    }
}

/// What one group needs for a split: the group, each member's weight as ggml knows it, and the
/// device's compute path.
pub struct Job<'a> {
    pub cx: &'a matmul::Context<'a>,
    pub group: &'a Group,
    pub weights: &'a [*const ggml_tensor],
    pub gpu: &'a HostGpu,
    pub ggml: &'a crate::ggml::Ggml,
    /// Engine, chip, OS build and GPU device (the machine key of the calibrations): asked only
    /// when the calibrations are first opened, not per group.
    pub machine: &'a dyn Fn() -> String,
}

/// The machine key of the calibrations: engine, chip, OS and its release, GPU device.
pub fn machine_key(engine: &str, chip: &str, gpu: &str) -> String {
    // SAFETY: uname fills the struct it is given.
    let release = unsafe {
        let mut u: libc::utsname = std::mem::zeroed();
        if libc::uname(&mut u) == 0 {
            std::ffi::CStr::from_ptr(u.release.as_ptr())
                .to_string_lossy()
                .into_owned()
        } else {
            "?".into()
        }
    };
    format!("{engine}|{chip}|{}-{release}|{gpu}", std::env::consts::OS)
}

/// Whether the group can be split at all: weights in a buffer of one GPU (the caller checked),
/// plain 2-D members, F32 2-D activations, no speculated companions.
fn splittable(j: &Job<'_>) -> bool {
    let g = j.group;
    g.weights
        && g.speculative == 0
        && j.weights.len() == g.members.len()
        && g.src1.desc.ty == GGML_TYPE_F32
        && g.src1.desc.ne[2] == 1
        && g.src1.desc.ne[3] == 1
        && g.members
            .iter()
            .all(|m| m.src0.desc.ne[2] == 1 && m.src0.desc.ne[3] == 1 && m.dst.desc.nb[0] == 4)
}

/// Computes the group split between the device and the GPU, if the share says so: `None` when the
/// device computes it alone as usual (share 0, not splittable, or not measured yet), else
/// whether the device part fell back (as [`matmul::compute`]).
pub fn run(split: &Splitter, j: &Job<'_>) -> Option<bool> {
    let cfg = Config::get();
    if cfg.prefer_energy || !splittable(j) {
        return None;
    }
    let class = class_of(j.group);
    let share = match cfg.gpu_share {
        GpuShare::Fixed(s) => s,
        GpuShare::Auto => match known_share(split, j, &class) {
            Some(s) => s,
            None => return calibrate(split, j, &class),
        },
    };
    if share <= 0.0 {
        return None;
    }
    Some(run_share(j, share, &class, split))
}

/// The calibrated share of `class`, if known (reading the cache file on first use).
fn known_share(split: &Splitter, j: &Job<'_>, class: &str) -> Option<f64> {
    let mut c = split.cal.lock().unwrap_or_else(|e| e.into_inner());
    let cal = c.get_or_insert_with(|| {
        Calibrations::open((j.machine)(), cache_dir(Config::get()).as_deref())
    });
    let share = cal.get(class).map(|c| c.share)?;
    if !cal.measured.iter().any(|m| m == class) {
        cal.reused.insert(class.to_string());
    }
    Some(share)
}

/// `auto` before the class is known: the first time the device computes it alone (programs
/// compile and weights stage then, which would bias a measurement); the second time each side
/// computes the whole group, timed, the device's output kept; the share recorded.
fn calibrate(split: &Splitter, j: &Job<'_>, class: &str) -> Option<bool> {
    let first = {
        let mut seen = split.seen.lock().unwrap_or_else(|e| e.into_inner());
        let n = seen.entry(class.to_string()).or_insert(0);
        *n += 1;
        *n == 1
    };
    if first {
        return None;
    }
    let test = Config::get().split_test;
    let t = Instant::now();
    let fell_back = matmul::compute(j.cx, j.group);
    std::thread::sleep(Duration::from_millis(test.ane_ms));
    let ane_ms = t.elapsed().as_secs_f64() * 1e3;
    // The GPU computes the same into scratch outputs, discarded.
    let mut scratch: Vec<Vec<f32>> = Vec::new();
    let parts = gpu_parts(j, &vec![0; j.group.members.len()], Some(&mut scratch));
    let t = Instant::now();
    let gpu_ok = !test.gpu_fail && j.gpu.compute_rows(j.ggml, &parts, &j.group.src1).is_ok();
    std::thread::sleep(Duration::from_millis(test.gpu_ms));
    let gpu_ms = t.elapsed().as_secs_f64() * 1e3;
    let share = if fell_back || !gpu_ok {
        0.0
    } else {
        share_from_times(ane_ms, gpu_ms)
    };
    let mut c = split.cal.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(cal) = c.as_mut() {
        cal.record(Calibration {
            class: class.to_string(),
            ane_ms,
            gpu_ms: if gpu_ok { gpu_ms } else { f64::INFINITY },
            share,
            at: now(),
        });
    }
    j.cx.stats.split_calibrations.fetch_add(1, Relaxed);
    Some(fell_back)
}

/// The GPU parts of the group for rows `[r0[i], M_i)` of each member, writing into the members'
/// outputs, or with `scratch` (calibration: the outputs are the device's) into scratch buffers.
fn gpu_parts(j: &Job<'_>, r0: &[usize], scratch: Option<&mut Vec<Vec<f32>>>) -> Vec<GpuRows> {
    let n = j.group.src1.desc.ne[1];
    let discard = scratch.is_some();
    let mut scratch = scratch;
    if let Some(scratch) = scratch.as_deref_mut() {
        *scratch = j
            .group
            .members
            .iter()
            .map(|m| vec![0f32; m.src0.desc.ne[1] as usize * n as usize])
            .collect();
    }
    j.group
        .members
        .iter()
        .zip(j.weights)
        .zip(r0)
        .enumerate()
        .filter(|(_, ((m, _), &r))| r < m.src0.desc.ne[1] as usize)
        .map(|(i, ((m, &w), &r))| {
            let rows = m.src0.desc.ne[1] - r as i64;
            let dst = if discard {
                let d = crate::support::TensorDesc::contiguous(GGML_TYPE_F32, 4, [rows, n, 1, 1]);
                let buf = &mut scratch.as_deref_mut().expect("discard has scratch")[i];
                // SAFETY: the scratch buffer outlives the parts (the caller holds it until the GPU
                // computed them) and nothing else touches it.
                unsafe { crate::view::Operand::of_f32_mut(d, buf) }
            } else {
                m.dst.sub(4 * r, [rows, n, 1, 1])
            };
            GpuRows {
                weight: w,
                r0: r,
                dst,
            }
        })
        .collect()
}

/// Computes the group with the GPU taking `share` of each member's rows.
fn run_share(j: &Job<'_>, share: f64, class: &str, split: &Splitter) -> bool {
    let g = j.group;
    let n = g.src1.desc.ne[1];
    let keep: Vec<usize> = g
        .members
        .iter()
        .map(|m| ane_rows(m.src0.desc.ne[1] as usize, share))
        .collect();
    let ane = Group {
        src1: g.src1,
        src1_info: g.src1_info,
        members: g
            .members
            .iter()
            .zip(&keep)
            .filter(|(_, &k)| k > 0)
            .map(|(m, &k)| Member {
                src0: m.src0.sub(0, [m.src0.desc.ne[0], k as i64, 1, 1]),
                src0_info: m.src0_info,
                dst: m.dst.sub(0, [k as i64, n, 1, 1]),
            })
            .collect(),
        weights: true,
        speculative: 0,
    };
    let parts = gpu_parts(j, &keep, None);
    let test = Config::get().split_test;
    let (host_gpu, ggml, src1) = (j.gpu, j.ggml, g.src1);
    let (fell_back, gpu) = std::thread::scope(|s| {
        let gpu = s.spawn(move || {
            let r = if test.gpu_fail {
                Err("injected GPU failure (GGML_ANE_SPLIT_TEST)".to_string())
            } else {
                host_gpu.compute_rows(ggml, &parts, &src1)
            };
            std::thread::sleep(Duration::from_millis(test.gpu_ms));
            r
        });
        let fell_back = !ane.members.is_empty() && matmul::compute(j.cx, &ane);
        std::thread::sleep(Duration::from_millis(test.ane_ms));
        (fell_back, gpu.join())
    });
    let stats = j.cx.stats;
    stats.split_ops.fetch_add(g.members.len() as u64, Relaxed);
    let total: usize = g.members.iter().map(|m| m.src0.desc.ne[1] as usize).sum();
    let on_gpu: usize = total - keep.iter().sum::<usize>();
    // FLOPs / 2: rows x K x N.
    let work = |rows: usize| (rows * g.src1.desc.ne[0] as usize * n as usize) as u64;
    stats.split_work_total.fetch_add(work(total), Relaxed);
    match gpu {
        Ok(Ok(())) => {
            stats.split_work_gpu.fetch_add(work(on_gpu), Relaxed);
        }
        failed => {
            // The GPU's rows on the CPU; the class stays on the device from now on.
            if Config::get().debug {
                eprintln!("ggml-ane: GPU part failed ({failed:?}), its rows go to the CPU");
            }
            stats.split_gpu_failures.fetch_add(1, Relaxed);
            let rest = Group {
                src1: g.src1,
                src1_info: g.src1_info,
                members: g
                    .members
                    .iter()
                    .zip(&keep)
                    .filter(|(m, &k)| k < m.src0.desc.ne[1] as usize)
                    .map(|(m, &k)| {
                        let rows = m.src0.desc.ne[1] - k as i64;
                        Member {
                            src0: m
                                .src0
                                .sub(k * m.src0.desc.nb[1], [m.src0.desc.ne[0], rows, 1, 1]),
                            src0_info: m.src0_info,
                            dst: m.dst.sub(4 * k, [rows, n, 1, 1]),
                        }
                    })
                    .collect(),
                weights: true,
                speculative: 0,
            };
            matmul::compute_on_cpu(j.cx, &rest);
            if Config::get().gpu_share == GpuShare::Auto {
                let mut c = split.cal.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(cal) = c.as_mut() {
                    cal.record(Calibration {
                        class: class.to_string(),
                        ane_ms: 0.0,
                        gpu_ms: f64::INFINITY,
                        share: 0.0,
                        at: now(),
                    });
                }
            }
        }
    }
    fell_back
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_cut_on_32_row_boundaries() {
        assert_eq!(ane_rows(576, 0.0), 576);
        assert_eq!(ane_rows(576, 1.0), 0);
        assert_eq!(ane_rows(576, 0.5), 288);
        assert_eq!(
            ane_rows(576, 0.25),
            448,
            "432 rows are 13.5 steps of 32: 14"
        );
        assert_eq!(ane_rows(100, 0.5), 64, "1.56 steps round to 2");
        assert_eq!(ane_rows(40, 0.1), 32);
        for m in [32usize, 64, 192, 576, 1536, 49152] {
            for s in [0.0, 0.125, 0.3, 0.5, 0.875, 1.0] {
                let k = ane_rows(m, s);
                assert!(
                    k <= m && k.is_multiple_of(ROW_STEP) || k == m,
                    "{m} {s} -> {k}"
                );
            }
        }
    }

    #[test]
    fn shares_balance_the_two_sides_in_eighths() {
        assert_eq!(share_from_times(10.0, 10.0), 0.5);
        assert_eq!(
            share_from_times(30.0, 10.0),
            0.75,
            "a slow device gives the GPU more"
        );
        assert_eq!(share_from_times(10.0, 30.0), 0.25);
        assert_eq!(
            share_from_times(1.0, 100.0),
            0.0,
            "a GPU 100x slower gets nothing"
        );
        assert_eq!(share_from_times(100.0, 1.0), 1.0);
        assert_eq!(share_from_times(10.0, f64::INFINITY), 0.0, "a failed GPU");
        assert_eq!(share_from_times(0.0, 5.0), 0.0);
    }

    #[test]
    fn calibrations_are_kept_per_machine_and_go_stale() {
        let dir = std::env::temp_dir().join(format!("ggml-ane-split-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut a = Calibrations::open("ref|m4|x|RPC0".into(), Some(&dir));
        assert!(a.get("c1").is_none());
        a.record(Calibration {
            class: "c1".into(),
            ane_ms: 3.0,
            gpu_ms: 1.0,
            share: 0.75,
            at: now(),
        });
        let mut b = Calibrations::open("other".into(), Some(&dir));
        b.record(Calibration {
            class: "c1".into(),
            ane_ms: 1.0,
            gpu_ms: 1.0,
            share: 0.5,
            at: now() - (STALE_DAYS + 1) * 86_400,
        });
        // A second process of the first machine reads its own line, not the other machine's.
        let a2 = Calibrations::open("ref|m4|x|RPC0".into(), Some(&dir));
        assert_eq!(a2.get("c1").map(|c| c.share), Some(0.75));
        // The other machine's line is stale: measured again.
        assert!(Calibrations::open("other".into(), Some(&dir))
            .get("c1")
            .is_none());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o700, "private folder");
        }
        // Garbage lines are skipped.
        std::fs::write(dir.join("split-calibrations.tsv"), "x\ny\tz\n").unwrap();
        assert!(Calibrations::open("other".into(), Some(&dir))
            .get("c1")
            .is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn split_test_hooks_parse() {
        assert_eq!(
            "gpu_ms=5,gpu_fail=1".parse::<SplitTest>(),
            Ok(SplitTest {
                gpu_ms: 5,
                ane_ms: 0,
                gpu_fail: true
            })
        );
        assert!("nope=1".parse::<SplitTest>().is_err());
        assert_eq!("".parse::<SplitTest>(), Ok(SplitTest::default()));
    }
}
