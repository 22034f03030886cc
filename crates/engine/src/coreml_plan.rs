//! Everything the Core ML engine does for one program, computed as plain data.
//!
//! The Core ML driver (`coreml/`, macOS only) cannot run here, so, like the private-API driver, it
//! decides nothing. A [`CoreMlPlan`] says what to hand to Core ML for one program; [`Cache`] says
//! where compiled models live and when one may be reused; [`verdict`] says whether a compute plan
//! puts the work on the Neural Engine. All of it is tested on Linux.
//!
//! Rules, from Apple's public Core ML documentation and headers:
//! - **The model** is an `.mlpackage` written from the same MIL text the private API would get:
//!   parsed into the IR, converted by [`ane_coreml::to_model`] (an mlProgram `Model`, spec 9), its
//!   `BLOBFILE`s copied verbatim as the package's weight files. The private driver's plan
//!   ([`DriverPlan`]) is built first, so a program breaks the same rules (row alignment, shortest
//!   axis, weight paths) under both engines and the planner's choices suit both.
//! - **Features** are named like the MIL parameters and returned values; the [`Engine`] trait binds
//!   surfaces in alphabetical order of those names, the same order as the private API, so the plan
//!   keeps the [`DriverPlan`]'s bindings. Every input and output is fp16 (Core ML takes fp16
//!   multi-arrays from macOS 13); anything else is refused at compile.
//! - **Compute units**: `MLComputeUnitsCPUAndNeuralEngine` ([`COMPUTE_UNITS`]): never the GPU,
//!   which llama.cpp's Metal backend owns.
//! - **Compiled models are reused across runs**: `compileModelAtURL` output is moved into a private
//!   cache directory (mode 0700, ours, not a symlink) under a name keyed by the program's content
//!   and the OS build ([`Cache::entry`]). A cached model that fails to load is removed and
//!   compiled once more ([`on_load_failure`]). The cache keeps at most [`CACHE_ENTRIES`] models,
//!   oldest removed first.
//! - **Placement**: `MLComputePlan` (macOS 14.4+) says which device each operation is placed on.
//!   The plugin chooses Core ML only if every matmul-class operation is on the Neural Engine
//!   ([`verdict`]); Core ML silently running a matmul on the CPU would be slower than llama.cpp's
//!   own CPU kernels.
//!
//! [`Engine`]: crate::Engine

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::driver_plan::{Binding, DriverPlan};
use crate::{EngineError, WeightFile};

/// `MLComputeUnits` value of `MLComputeUnitsCPUAndNeuralEngine` (macOS 13+): CPU only = 0,
/// CPU and GPU = 1, all = 2, CPU and Neural Engine = 3.
pub const COMPUTE_UNITS: isize = 3;
/// Compiled models kept in the cache; the oldest beyond this are removed when the engine opens.
pub const CACHE_ENTRIES: usize = 256;
/// Version of the cache's naming scheme; bumped when what a key covers changes.
pub const CACHE_FORMAT: u32 = 1;
/// Suffix Core ML gives compiled models.
pub const COMPILED_SUFFIX: &str = ".mlmodelc";
/// Name of the cache folder under the per-user cache directory.
pub const CACHE_DIR_NAME: &str = "ggml-ane-coreml";

/// One input or output feature of the model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Feature {
    /// Feature name: the MIL parameter or returned value.
    pub name: String,
    /// Shape, outermost first (the `MLMultiArray` shape).
    pub shape: Vec<usize>,
    /// C-contiguous strides in elements (the `MLMultiArray` strides).
    pub strides: Vec<usize>,
    /// Bytes of the fp16 tensor, packed at the start of its surface.
    pub bytes: usize,
}

impl Feature {
    fn from_binding(b: &Binding) -> Result<Self, EngineError> {
        if b.ty.dtype != ane_mil::DType::Fp16 {
            return Err(EngineError::Compile(format!(
                "`{}` is {}: the Core ML engine binds fp16 features only",
                b.name, b.ty.dtype
            )));
        }
        let mut strides = vec![1; b.ty.shape.len()];
        for i in (0..b.ty.shape.len().saturating_sub(1)).rev() {
            strides[i] = strides[i + 1] * b.ty.shape[i + 1];
        }
        Ok(Feature {
            name: b.name.clone(),
            shape: b.ty.shape.clone(),
            strides,
            bytes: b.bytes(),
        })
    }
}

/// What the Core ML driver does for one program.
#[derive(Clone, Debug)]
pub struct CoreMlPlan {
    /// The encoded `Model` protobuf (`Data/com.apple.CoreML/model.mlmodel`).
    pub model: Vec<u8>,
    /// Weight files by `BLOBFILE` path, as the package stores them.
    pub weights: Vec<(String, Vec<u8>)>,
    /// Inputs in binding order (alphabetical by name).
    pub inputs: Vec<Feature>,
    /// Outputs in binding order (alphabetical by name).
    pub outputs: Vec<Feature>,
    /// Content key of the program (MIL bytes and weights): equal keys, same model.
    pub key: u128,
}

impl CoreMlPlan {
    /// Plans a program given as MIL text (function `main`) and its weight files.
    ///
    /// # Errors
    /// The [`DriverPlan`] errors (parse, weights, row rules), [`EngineError::Compile`] for a
    /// program Core ML's protobuf cannot hold or a non-fp16 feature.
    pub fn new(mil: &str, weights: &[WeightFile]) -> Result<Self, EngineError> {
        let driver = DriverPlan::new(mil, weights)?;
        let program = ane_mil::text::parse(mil).map_err(|e| EngineError::Parse(e.to_string()))?;
        let model = ane_coreml::to_model(&program)
            .map_err(|e| EngineError::Compile(format!("Core ML model: {e}")))?;
        let inputs = driver
            .inputs
            .iter()
            .map(Feature::from_binding)
            .collect::<Result<Vec<_>, _>>()?;
        let outputs = driver
            .outputs
            .iter()
            .map(Feature::from_binding)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(CoreMlPlan {
            model: prost::Message::encode_to_vec(&model),
            weights: driver
                .weights
                .iter()
                .map(|w| (w.key.clone(), w.data.to_vec()))
                .collect(),
            inputs,
            outputs,
            key: driver.content_key(),
        })
    }

    /// Writes the `.mlpackage` to `dir` (a path ending in `.mlpackage`; an old package there is
    /// replaced, anything else refused).
    ///
    /// # Errors
    /// [`EngineError::Compile`] naming the path.
    pub fn write_package(&self, dir: &Path) -> Result<(), EngineError> {
        let model: ane_coreml::Model = prost::Message::decode(self.model.as_slice())
            .map_err(|e| EngineError::Compile(format!("model protobuf: {e}")))?;
        let files: Vec<(&str, &[u8])> = self
            .weights
            .iter()
            .map(|(p, b)| (p.as_str(), b.as_slice()))
            .collect();
        ane_coreml::package::write(dir, &model, &files)
            .map_err(|e| EngineError::Compile(format!("writing {}: {e}", dir.display())))
    }

    /// Checks the surfaces of a prediction (their sizes, in binding order): the right counts, and
    /// room for each tensor. Core ML copies features in and out, so sizes need not be equal.
    ///
    /// # Errors
    /// [`EngineError::Surface`] naming the feature.
    pub fn check_request(&self, inputs: &[usize], outputs: &[usize]) -> Result<(), EngineError> {
        if inputs.len() != self.inputs.len() || outputs.len() != self.outputs.len() {
            return Err(EngineError::Surface(format!(
                "request has {} inputs / {} outputs, model takes {} / {}",
                inputs.len(),
                outputs.len(),
                self.inputs.len(),
                self.outputs.len()
            )));
        }
        let pairs = self.inputs.iter().zip(inputs);
        for (f, &size) in pairs.chain(self.outputs.iter().zip(outputs)) {
            if size < f.bytes {
                return Err(EngineError::Surface(format!(
                    "`{}` needs {} bytes, its surface has {size}",
                    f.name, f.bytes
                )));
            }
        }
        Ok(())
    }

    /// Drops the model and weight bytes once the model is loaded (Core ML holds what it needs).
    pub fn loaded(mut self) -> Self {
        self.model = Vec::new();
        self.weights = Vec::new();
        self
    }
}

/// The compiled-model cache: a private folder of `<key>.mlmodelc` entries.
#[derive(Clone, Debug)]
pub struct Cache {
    root: PathBuf,
    /// Distinguishes OS builds: a model compiled by one macOS is not reused by another.
    salt: String,
}

impl Cache {
    /// Opens (creating it if needed) the cache folder `base/`[`CACHE_DIR_NAME`], refusing a
    /// symlink or another user's folder, making it 0700, and removing the oldest entries beyond
    /// [`CACHE_ENTRIES`]. `salt` names what a compiled model depends on beyond the program (the
    /// OS build).
    ///
    /// # Errors
    /// I/O errors and refusals, naming the path.
    pub fn open(base: &Path, salt: &str) -> io::Result<Cache> {
        fs::create_dir_all(base)?;
        let root = base.join(CACHE_DIR_NAME);
        crate::model_dir::create_private(&root)?;
        let cache = Cache {
            root,
            salt: salt.to_string(),
        };
        cache.prune(CACHE_ENTRIES)?;
        Ok(cache)
    }

    /// The folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Name of the entry for a program: hex of a hash over the content key, the salt and
    /// [`CACHE_FORMAT`].
    pub fn name(&self, key: u128) -> String {
        use std::hash::{Hash, Hasher};
        let half = |seed: u8| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            (seed, key, &self.salt, CACHE_FORMAT).hash(&mut h);
            h.finish()
        };
        format!("{:016x}{:016x}{COMPILED_SUFFIX}", half(1), half(2))
    }

    /// Where the compiled model of a program lives (whether or not it exists yet).
    pub fn entry(&self, key: u128) -> PathBuf {
        self.root.join(self.name(key))
    }

    /// The compiled model of a program, if the cache holds one (a directory, not a symlink).
    pub fn lookup(&self, key: u128) -> Option<PathBuf> {
        let path = self.entry(key);
        let meta = fs::symlink_metadata(&path).ok()?;
        (meta.is_dir() && !meta.file_type().is_symlink()).then_some(path)
    }

    /// Where to write a program's package before compiling it: a fresh folder of this process
    /// inside the cache (so nothing else can write there), removed by [`Cache::discard`].
    ///
    /// # Errors
    /// I/O errors.
    pub fn staging(&self, key: u128) -> io::Result<PathBuf> {
        let dir = self
            .root
            .join(format!(".staging-{}-{:x}", std::process::id(), key as u64));
        if fs::symlink_metadata(&dir).is_ok() {
            fs::remove_dir_all(&dir)?;
        }
        crate::model_dir::create_private(&dir)?;
        Ok(dir)
    }

    /// Moves a freshly compiled model into the cache and returns its entry. When another process
    /// installed the same entry first, that one is kept and `compiled` is removed (same key, same
    /// model). A compiled model on another volume is copied in first, then renamed into place, so
    /// an entry is never seen half-written.
    ///
    /// # Errors
    /// I/O errors.
    pub fn install(&self, key: u128, compiled: &Path) -> io::Result<PathBuf> {
        let entry = self.entry(key);
        if self.lookup(key).is_some() {
            let _ = fs::remove_dir_all(compiled);
            return Ok(entry);
        }
        let moved = match fs::rename(compiled, &entry) {
            Ok(()) => Ok(()),
            Err(_) => {
                let tmp =
                    self.root
                        .join(format!(".copy-{}-{}", std::process::id(), self.name(key)));
                copy_dir(compiled, &tmp)?;
                let r = fs::rename(&tmp, &entry);
                if r.is_err() {
                    let _ = fs::remove_dir_all(&tmp);
                }
                let _ = fs::remove_dir_all(compiled);
                r
            }
        };
        match moved {
            Ok(()) => Ok(entry),
            // A concurrent installer won the rename.
            Err(_) if self.lookup(key).is_some() => Ok(entry),
            Err(e) => Err(e),
        }
    }

    /// Removes an entry or staging folder (a model that failed to load, a package compiled).
    pub fn discard(&self, path: &Path) {
        if path.starts_with(&self.root) {
            let _ = fs::remove_dir_all(path);
        }
    }

    /// Removes the oldest compiled models beyond `keep`, and staging folders of processes that
    /// are gone.
    fn prune(&self, keep: usize) -> io::Result<()> {
        let mut entries = Vec::new();
        for e in fs::read_dir(&self.root)? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name
                .strip_prefix(".staging-")
                .or_else(|| name.strip_prefix(".copy-"))
                .and_then(|r| r.split('-').next())
                .and_then(|p| p.parse::<u32>().ok())
            {
                if !crate::model_dir::process_alive(pid) {
                    let _ = fs::remove_dir_all(e.path());
                }
                continue;
            }
            if name.ends_with(COMPILED_SUFFIX) {
                let t = e.metadata()?.modified().unwrap_or(std::time::UNIX_EPOCH);
                entries.push((t, e.path()));
            }
        }
        if entries.len() > keep {
            entries.sort();
            for (_, p) in &entries[..entries.len() - keep] {
                let _ = fs::remove_dir_all(p);
            }
        }
        Ok(())
    }
}

fn copy_dir(from: &Path, to: &Path) -> io::Result<()> {
    fs::create_dir_all(to)?;
    for e in fs::read_dir(from)? {
        let e = e?;
        let ty = e.file_type()?;
        let dst = to.join(e.file_name());
        if ty.is_dir() {
            copy_dir(&e.path(), &dst)?;
        } else if ty.is_file() {
            fs::copy(e.path(), dst)?;
        }
    }
    Ok(())
}

/// What to do when loading a model fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoadFailure {
    /// The model came from the cache: remove the entry and compile once more (a model compiled
    /// by an older framework, or a damaged entry).
    DiscardAndRecompile,
    /// The model was compiled just now: the error stands, the op falls back.
    Fail,
}

/// The rule for a failed load: a cached model gets one fresh compile, a fresh one none.
pub fn on_load_failure(from_cache: bool) -> LoadFailure {
    if from_cache {
        LoadFailure::DiscardAndRecompile
    } else {
        LoadFailure::Fail
    }
}

/// A device Core ML can place an operation on (`MLComputePlan`'s preferred device).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum OpDevice {
    /// `MLNeuralEngineComputeDevice`.
    NeuralEngine,
    /// `MLCPUComputeDevice`.
    Cpu,
    /// `MLGPUComputeDevice`.
    Gpu,
    /// No device reported (constants, or a plan that could not be read).
    Unknown,
}

impl OpDevice {
    /// Short name for stats and reports.
    pub fn name(self) -> &'static str {
        match self {
            OpDevice::NeuralEngine => "neural_engine",
            OpDevice::Cpu => "cpu",
            OpDevice::Gpu => "gpu",
            OpDevice::Unknown => "unknown",
        }
    }
}

/// Where one operation of a loaded program runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpPlacement {
    /// The MIL operator (`matmul`, `conv`, `cast`, ...), without an opset prefix
    /// ([`operator_name`]).
    pub op: String,
    /// Its device.
    pub device: OpDevice,
}

/// Operators that carry a program's FLOPs: they must be on the Neural Engine.
pub const COMPUTE_OPS: [&str; 3] = ["matmul", "conv", "linear"];

/// The MIL operator of constants, which Core ML gives no device usage.
pub const CONST_OP: &str = "const";

/// The operator name without its opset prefix: Core ML's compute plan reports
/// `MLModelStructureProgramOperation.operatorName` as `ios18.matmul`, `ios17.conv`,
/// `ios18.const` (a public profiling tool's real output), Apple's header comment and the MIL text
/// as `matmul`. A prefix is a dot-terminated opset name: letters then digits (`ios17`,
/// `macos15`, `tvos18`), optionally with a minor version (`ios17_2`); anything else is kept whole.
pub fn operator_name(raw: &str) -> &str {
    let raw = raw.trim();
    let Some((prefix, rest)) = raw.rsplit_once('.') else {
        return raw;
    };
    let letters = prefix.trim_end_matches(|c: char| c.is_ascii_digit() || c == '_');
    let is_opset = !rest.is_empty()
        && !letters.is_empty()
        && letters.len() < prefix.len()
        && letters.chars().all(|c| c.is_ascii_alphabetic());
    if is_opset {
        rest
    } else {
        raw
    }
}

/// Whether a compute plan puts the work on the Neural Engine: every [`COMPUTE_OPS`] operation on
/// it, and at least one such operation. `None` means the engine could not read a plan.
///
/// # Errors
/// Why not, in one line.
pub fn verdict(ops: Option<&[OpPlacement]>) -> Result<(), String> {
    let Some(ops) = ops else {
        return Err(
            "its compute plan could not be read (MLComputePlan needs macOS 14.4), so the \
                    matmul's device is unknown"
                .into(),
        );
    };
    // Names are normalised where the plan is read; a prefixed one is accepted here too.
    let compute: Vec<&OpPlacement> = ops
        .iter()
        .filter(|o| COMPUTE_OPS.contains(&operator_name(&o.op)))
        .collect();
    if compute.is_empty() {
        return Err("its compute plan has no matmul or conv operation".into());
    }
    let off: Vec<String> = compute
        .iter()
        .filter(|o| o.device != OpDevice::NeuralEngine)
        .map(|o| format!("{} on {}", operator_name(&o.op), o.device.name()))
        .collect();
    if off.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "its compute plan keeps work off the Neural Engine: {}",
            off.join(", ")
        ))
    }
}

/// One operation as the compute plan reports it: its raw operator name (`ios18.matmul`) and the
/// preferred device of its usage (`None`: Core ML gave it no usage). The name is stored without
/// its opset prefix; a constant without usage is left out (`None`), any other operation without
/// one is [`OpDevice::Unknown`].
pub fn placed(raw_op: &str, usage: Option<OpDevice>) -> Option<OpPlacement> {
    let op = operator_name(raw_op);
    let device = match usage {
        None if op == CONST_OP => return None,
        None => OpDevice::Unknown,
        Some(d) => d,
    };
    Some(OpPlacement {
        op: op.to_string(),
        device,
    })
}

/// The file every compiled model (`.mlmodelc`) holds. `MLComputePlan` asked about a directory
/// without it throws a C++ exception on Core ML's own queue (coremltools issue 2757, fixed there by
/// checking for the file first, PR 2780), which no `@try` and no thread of ours can catch: the
/// host process aborts. So the file is checked first ([`plan_precheck`]).
pub const COREMLDATA: &str = "coremldata.bin";

/// Whether `MLComputePlan` may be asked about the compiled model at `compiled`: it is a directory
/// (not a symlink) holding a regular, non-empty [`COREMLDATA`].
///
/// # Errors
/// Why not, in one line (the plan is then unknown, never asked).
pub fn plan_precheck(compiled: &Path) -> Result<(), String> {
    let dir = fs::symlink_metadata(compiled)
        .map_err(|e| format!("compiled model {} unreadable: {e}", compiled.display()))?;
    if !dir.is_dir() {
        return Err(format!("{} is not a directory", compiled.display()));
    }
    let file = compiled.join(COREMLDATA);
    match fs::symlink_metadata(&file) {
        Ok(m) if m.is_file() && m.len() > 0 => Ok(()),
        Ok(_) => Err(format!(
            "{} is not a non-empty file: MLComputePlan not asked",
            file.display()
        )),
        Err(e) => Err(format!(
            "{} missing ({e}): MLComputePlan not asked",
            file.display()
        )),
    }
}

/// A program's compute plan, read at most once and only when asked ([`Engine::read_op_placement`]:
/// the placement canary, `ane doctor`, stats), never while compiling or dispatching: each read
/// may block up to 30 s.
///
/// [`Engine::read_op_placement`]: crate::Engine::read_op_placement
#[derive(Clone, Debug, Default)]
pub struct LazyPlacement {
    /// `None`: not asked yet; `Some(None)`: asked, unknown.
    read: Option<Option<Vec<OpPlacement>>>,
}

impl LazyPlacement {
    /// What is known without asking the framework (`None` until read, or when unreadable).
    pub fn known(&self) -> Option<Vec<OpPlacement>> {
        self.read.clone().flatten()
    }

    /// Whether the plan was asked for already.
    pub fn asked(&self) -> bool {
        self.read.is_some()
    }

    /// The placement: the one read before, else `load` called once if [`plan_precheck`] passes
    /// for `compiled`. A failed precheck or load leaves it unknown for good (not asked again).
    ///
    /// # Errors
    /// The first time only: the precheck's reason ([`EngineError::Load`]) or `load`'s error.
    pub fn read(
        &mut self,
        compiled: &Path,
        load: impl FnOnce() -> Result<Option<Vec<OpPlacement>>, EngineError>,
    ) -> Result<Option<Vec<OpPlacement>>, EngineError> {
        if let Some(p) = &self.read {
            return Ok(p.clone());
        }
        self.read = Some(None);
        plan_precheck(compiled).map_err(EngineError::Load)?;
        let p = load()?;
        self.read = Some(p.clone());
        Ok(p)
    }
}

/// Operations per device, for stats: `(device, count)` sorted by device.
pub fn count_by_device(ops: &[OpPlacement]) -> Vec<(OpDevice, usize)> {
    let mut m = std::collections::BTreeMap::new();
    for o in ops {
        *m.entry(o.device).or_insert(0) += 1;
    }
    m.into_iter().collect()
}

#[cfg(test)]
mod tests;
