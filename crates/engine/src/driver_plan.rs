//! Everything the ANE driver does for one program, computed as plain data.
//!
//! The macOS driver (`apple/`) cannot run here, so it decides nothing: it takes a [`DriverPlan`] and
//! replays it through AppleNeuralEngine.framework. The reference engine builds the same plan in
//! `compile` and checks every request against it in `evaluate`, so a rule broken here fails the
//! Linux tests. The rules, from `ane-private-api.md` (section numbers in brackets):
//!
//! - **MIL as bytes** [§1.3.1]: the descriptor takes the MIL text as `NSData` (UTF-8), never as
//!   `NSString`; [`DriverPlan::mil`] is exactly the bytes written to `model.mil`.
//! - **Weights dictionary** [§1.3.1-2]: one entry per distinct `BLOBFILE` path of the MIL, keyed by
//!   the path exactly as written (`@model_path/weights/weight.bin`), valued `{offset: 0, data}`.
//!   The dictionary is never nil; it is empty only when the program has no `BLOBFILE`. Offset 0 is
//!   what almost every project passes (maderix once used 64): the conservative choice.
//! - **Files under the model's temporary directory** [§1.3.4]: `model.mil` plus every weight file
//!   at its path with `@model_path/` stripped. Paths must sit under `@model_path/`, be relative, and
//!   contain no `..`, empty or `.` component, so nothing is written outside the directory. Weight
//!   files the MIL does not reference are neither in the dictionary (they would change the hash)
//!   nor written.
//! - **Binding order** [§2.5]: inputs bind in alphabetical order of the MIL parameter names and
//!   outputs in alphabetical order of the returned variable names, with indices `0..n`.
//! - **Surfaces** [§2.3, §2.5]: one allocation size for every surface of a request:
//!   [`crate::surface::request_alloc_size`] of the largest tensor (at least 48 KiB, a multiple of
//!   128 bytes).
//! - **Rows** [§2.2]: the last axis of every I/O tensor is a multiple of 64 bytes (fp16: a multiple
//!   of 32 elements), so the packed layout Orion describes and the 64-byte-row layout axiom uses
//!   are the same bytes. A program breaking this is refused at compile time.
//! - **Shortest last axis** [§2.2]: at least [`MIN_LAST_AXIS`] elements. Other implementations
//!   report that an I/O tensor whose last axis is below 64 fp16 values compiles and then fails at
//!   load (status 0x1d); 32 satisfies the row rule above but not this one. Refused at compile time
//!   until `ane doctor` has shown a shorter axis loading on real hardware.
//! - **QoS** [§1.4]: 21 for compile, load, evaluate and unload.
//! - **Probed forms** ([`crate::probe`]): [`DriverPlan::new_in`] writes the MIL in the engine's
//!   current dialect and plans surfaces in its current order; under
//!   [`SurfaceOrder::Ascending`] the program's own surfaces take [`DriverPlan::surface_sizes`]
//!   (inputs ascending, outputs descending) and requests are copied through them.

use std::collections::BTreeMap;
use std::sync::Arc;

use ane_mil::{Arg, Function, Literal, ValueType};

use crate::probe::{Forms, SurfaceOrder};
use crate::surface::{ordered_sizes, request_alloc_size, MIN_SURFACE_BYTES, SURFACE_ALIGN};
use crate::{EngineError, WeightFile};

/// QoS passed (as `unsigned int`) to compile, load, evaluate and unload: `QOS_CLASS_DEFAULT`, what
/// maderix, ggml-ane, Orion and axiom use. Valid values are 9, 17, 21, 25 and 33; any other falls
/// back to a default priority with a log line.
pub const QOS: u32 = 21;
/// The QoS values `_ANEQoSMapper` accepts.
pub const VALID_QOS: [u32; 5] = [9, 17, 21, 25, 33];
/// Prefix every `BLOBFILE` path must have; the compiler resolves it to the model directory.
pub const MODEL_PATH_PREFIX: &str = "@model_path/";
/// Name of the MIL file inside the model directory.
pub const MODEL_MIL_FILE: &str = "model.mil";
/// `offset` of every weights-dictionary entry.
pub const WEIGHT_ENTRY_OFFSET: u64 = 0;
/// Row granularity that makes packed and row-padded surface layouts identical.
pub const ROW_ALIGN: usize = 64;
/// Shortest last axis of an I/O tensor, in elements (see the module doc).
pub const MIN_LAST_AXIS: usize = 64;
/// Names the framework itself writes into the model directory; a weight file must not collide.
pub const RESERVED_FILES: [&str; 3] = [MODEL_MIL_FILE, "net.plist", "data"];
/// `procedureIndex` of every request (programs have one function, `main`).
pub const PROCEDURE_INDEX: u32 = 0;
/// Delay before the one retry of a failed load (maderix and ggml-ane: `usleep(100000)`).
pub const LOAD_RETRY_DELAY_MS: u64 = 100;

/// One weights-dictionary entry: `{ key: { "offset": offset, "data": data } }`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WeightEntry {
    /// The `BLOBFILE` path exactly as written in the MIL.
    pub key: String,
    /// Always [`WEIGHT_ENTRY_OFFSET`].
    pub offset: u64,
    /// The whole weight file.
    pub data: Arc<[u8]>,
}

/// A file to write under the model's temporary directory before compiling.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedFile {
    /// Path relative to the model directory, `/`-separated, e.g. `weights/weight.bin`.
    pub rel_path: String,
    /// File contents.
    pub contents: Arc<[u8]>,
}

/// One input or output surface of a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Binding {
    /// MIL parameter name (inputs) or returned variable name (outputs).
    pub name: String,
    /// Its MIL type.
    pub ty: ValueType,
    /// Position in the request's `inputIndices` / `outputIndices` (and in the surface arrays).
    pub index: usize,
}

impl Binding {
    /// Bytes the tensor occupies, packed at the start of its surface.
    pub fn bytes(&self) -> usize {
        self.ty.byte_size()
    }

    /// Bytes of one row: the last axis times the element size.
    pub fn row_bytes(&self) -> usize {
        (self.ty.shape.last().copied().unwrap_or(1) * self.ty.dtype.bits()).div_ceil(8)
    }
}

/// What the driver does for one program, in the order it does it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DriverPlan {
    /// MIL text as bytes: the descriptor's `NSData` and the contents of `model.mil`.
    pub mil: Arc<[u8]>,
    /// Weights dictionary entries, sorted by key. Empty only when the MIL has no `BLOBFILE`.
    pub weights: Vec<WeightEntry>,
    /// Files to write under the model directory: `model.mil` first, then weights by path.
    pub files: Vec<PlannedFile>,
    /// Inputs in binding order (alphabetical by name), `index` = position.
    pub inputs: Vec<Binding>,
    /// Outputs in binding order (alphabetical by name), `index` = position.
    pub outputs: Vec<Binding>,
    /// Allocation size of every IOSurface of a request ([`SurfaceOrder::Equal`]).
    pub surface_bytes: usize,
    /// The sizes of the surfaces the program binds ([`DriverPlan::surface_sizes`]).
    pub order: SurfaceOrder,
    /// QoS for every call.
    pub qos: u32,
}

impl DriverPlan {
    /// A key of the program's content (MIL bytes, weight keys and bytes): two plans with the same
    /// key are the same program, and the driver compiles it once (the second compile would cost a
    /// slot of the per-process compile budget for nothing). 128 bits from two independent
    /// SipHash streams.
    pub fn content_key(&self) -> u128 {
        use std::hash::{Hash, Hasher};
        let half = |salt: u8| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            salt.hash(&mut h);
            self.mil.hash(&mut h);
            for w in &self.weights {
                w.key.hash(&mut h);
                w.offset.hash(&mut h);
                w.data.hash(&mut h);
            }
            h.finish()
        };
        (u128::from(half(1)) << 64) | u128::from(half(2))
    }

    /// Drops the MIL, weight and file bytes once the program is loaded (the framework and the
    /// model directory hold what they need): a loaded program keeps only its bindings, surface
    /// size and QoS, so baked weights are not held twice for the program's lifetime.
    pub fn release_contents(&mut self) {
        self.mil = Arc::from(&[][..]);
        self.weights.clear();
        self.files.clear();
    }

    /// `self` after [`DriverPlan::release_contents`].
    pub fn loaded(mut self) -> Self {
        self.release_contents();
        self
    }

    /// Plans a program in an engine's current forms ([`crate::probe`]): the MIL rewritten in
    /// its dialect (byte for byte unchanged in the shorthand for what `ane_mil::build` makes),
    /// surfaces in its order.
    ///
    /// # Errors
    /// [`EngineError::Parse`] for text that does not parse, [`EngineError::Compile`] for a
    /// program the dialect cannot express (an iOS18 op in the iOS16 dialect), and the errors of
    /// [`DriverPlan::for_function`].
    pub fn new_in(mil: &str, weights: &[WeightFile], forms: &Forms) -> Result<Self, EngineError> {
        let program = ane_mil::text::parse(mil).map_err(|e| EngineError::Parse(e.to_string()))?;
        let mil = ane_mil::text::emit_in(&program, forms.dialect())
            .map_err(|e| EngineError::Compile(e.to_string()))?;
        Ok(Self::new(&mil, weights)?.with_order(forms.surface_order()))
    }

    /// The same plan with surfaces in `order`.
    pub fn with_order(mut self, order: SurfaceOrder) -> Self {
        self.order = order;
        self
    }

    /// The allocation sizes of the surfaces the program binds, inputs and outputs in binding
    /// order: all [`DriverPlan::surface_bytes`], or under [`SurfaceOrder::Ascending`]
    /// [`crate::surface::ordered_sizes`] of the tensors.
    pub fn surface_sizes(&self) -> (Vec<usize>, Vec<usize>) {
        match self.order {
            SurfaceOrder::Equal => (
                vec![self.surface_bytes; self.inputs.len()],
                vec![self.surface_bytes; self.outputs.len()],
            ),
            SurfaceOrder::Ascending => {
                let bytes = |v: &[Binding]| v.iter().map(Binding::bytes).collect::<Vec<_>>();
                ordered_sizes(&bytes(&self.inputs), &bytes(&self.outputs))
            }
        }
    }

    /// Plans a program given as MIL text (function `main`) and its weight files.
    ///
    /// # Errors
    /// [`EngineError::Parse`] for text that does not parse, and the errors of
    /// [`DriverPlan::for_function`].
    pub fn new(mil: &str, weights: &[WeightFile]) -> Result<Self, EngineError> {
        let program = ane_mil::text::parse(mil).map_err(|e| EngineError::Parse(e.to_string()))?;
        let main = program
            .function("main")
            .ok_or_else(|| EngineError::Compile("no function `main`".into()))?;
        let mut paths = Vec::new();
        for f in &program.functions {
            paths.extend(blobfile_paths(f));
        }
        Self::build(mil, main, paths, weights)
    }

    /// Plans a program whose text `mil` has already been parsed into its function `main`.
    ///
    /// # Errors
    /// [`EngineError::Weights`] for a `BLOBFILE` path outside `@model_path/` or without a weight
    /// file; [`EngineError::Compile`] for an I/O value that is not a tensor, a returned name that is
    /// not defined, a duplicate name, or a row that is not a multiple of 64 bytes.
    pub fn for_function(
        mil: &str,
        main: &Function,
        weights: &[WeightFile],
    ) -> Result<Self, EngineError> {
        Self::build(mil, main, blobfile_paths(main), weights)
    }

    fn build(
        mil: &str,
        main: &Function,
        paths: Vec<String>,
        weights: &[WeightFile],
    ) -> Result<Self, EngineError> {
        let mil: Arc<[u8]> = Arc::from(mil.as_bytes());
        // BTreeMap: one entry per path, sorted by key.
        let mut by_path: BTreeMap<String, Arc<[u8]>> = BTreeMap::new();
        for path in paths {
            if by_path.contains_key(&path) {
                continue;
            }
            relative_weight_path(&path)?;
            let file = weights.iter().find(|w| w.path == path).ok_or_else(|| {
                EngineError::Weights(format!("no weight file given for `{path}`"))
            })?;
            by_path.insert(path, Arc::from(file.bytes.as_slice()));
        }
        let mut files = vec![PlannedFile {
            rel_path: MODEL_MIL_FILE.into(),
            contents: mil.clone(),
        }];
        let mut entries = Vec::new();
        for (key, data) in by_path {
            files.push(PlannedFile {
                rel_path: relative_weight_path(&key)?,
                contents: data.clone(),
            });
            entries.push(WeightEntry {
                key,
                offset: WEIGHT_ENTRY_OFFSET,
                data,
            });
        }

        let mut inputs: Vec<(String, ValueType)> = main.inputs.clone();
        let mut outputs = Vec::new();
        for o in &main.outputs {
            let ty = main
                .value_type(o)
                .ok_or_else(|| EngineError::Compile(format!("returned `{o}` is not defined")))?;
            outputs.push((o.clone(), ty.clone()));
        }
        let inputs = binding_order(&mut inputs, "input")?;
        let outputs = binding_order(&mut outputs, "output")?;
        for b in inputs.iter().chain(&outputs) {
            if b.ty.is_scalar() {
                return Err(EngineError::Compile(format!(
                    "`{}` is a scalar: surfaces carry tensors",
                    b.name
                )));
            }
            if b.ty.shape.last().is_some_and(|&d| d < MIN_LAST_AXIS) {
                return Err(EngineError::Compile(format!(
                    "`{}` {:?}: a last axis below {MIN_LAST_AXIS} elements fails at load on the ANE (status 0x1d)",
                    b.name, b.ty.shape
                )));
            }
            if !b.row_bytes().is_multiple_of(ROW_ALIGN) {
                return Err(EngineError::Compile(format!(
                    "`{}` {:?}: rows of {} bytes are not a multiple of {ROW_ALIGN} (row rule; fp16 needs a last axis multiple of 32)",
                    b.name, b.ty.shape, b.row_bytes()
                )));
            }
        }
        let sizes: Vec<usize> = inputs.iter().chain(&outputs).map(Binding::bytes).collect();
        Ok(DriverPlan {
            mil,
            weights: entries,
            files,
            inputs,
            outputs,
            surface_bytes: request_alloc_size(&sizes),
            order: SurfaceOrder::Equal,
            qos: QOS,
        })
    }

    /// Checks a request's surfaces (allocation sizes in binding order) against the plan and the
    /// surface rules. Surfaces larger than [`DriverPlan::surface_bytes`] are allowed as long as they
    /// are all equal (the tensor sits packed at the start, Orion #14). Under
    /// [`SurfaceOrder::Ascending`] the request's surfaces are copied into the program's own
    /// ([`DriverPlan::surface_sizes`]), so they need only hold their tensors.
    ///
    /// # Errors
    /// [`EngineError::Surface`] naming the rule: counts, equal sizes, minimum size and alignment,
    /// room for each tensor.
    pub fn check_request(&self, inputs: &[usize], outputs: &[usize]) -> Result<(), EngineError> {
        let serr = |m: String| Err(EngineError::Surface(m));
        if self.order == SurfaceOrder::Ascending
            && inputs.len() == self.inputs.len()
            && outputs.len() == self.outputs.len()
        {
            for (b, &size) in self
                .inputs
                .iter()
                .zip(inputs)
                .chain(self.outputs.iter().zip(outputs))
            {
                if b.bytes() > size {
                    return serr(format!(
                        "`{}` needs {} bytes, its surface has {size}",
                        b.name,
                        b.bytes()
                    ));
                }
            }
            return Ok(());
        }
        if inputs.len() != self.inputs.len() || outputs.len() != self.outputs.len() {
            return serr(format!(
                "request has {} inputs / {} outputs, program takes {} / {}",
                inputs.len(),
                outputs.len(),
                self.inputs.len(),
                self.outputs.len()
            ));
        }
        let Some(&first) = inputs.first().or(outputs.first()) else {
            return serr("request has no surfaces".into());
        };
        for (i, &size) in inputs.iter().chain(outputs).enumerate() {
            if size != first {
                return serr(format!(
                    "surface {i} is {size} bytes, the first is {first}: sizes must be equal (0x1d)"
                ));
            }
        }
        if first < MIN_SURFACE_BYTES || !first.is_multiple_of(SURFACE_ALIGN) {
            return serr(format!(
                "surfaces of {first} bytes: need >= {MIN_SURFACE_BYTES} and a multiple of {SURFACE_ALIGN}"
            ));
        }
        for b in self.inputs.iter().chain(&self.outputs) {
            if b.bytes() > first {
                return serr(format!(
                    "`{}` needs {} bytes, surfaces have {first}",
                    b.name,
                    b.bytes()
                ));
            }
        }
        Ok(())
    }
}

/// Sorts `named` by name (the ANE binding order) and numbers it.
fn binding_order(
    named: &mut [(String, ValueType)],
    what: &str,
) -> Result<Vec<Binding>, EngineError> {
    named.sort_by(|a, b| a.0.cmp(&b.0));
    if let Some(w) = named.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(EngineError::Compile(format!(
            "{what} `{}` appears twice",
            w[0].0
        )));
    }
    Ok(named
        .iter()
        .enumerate()
        .map(|(index, (name, ty))| Binding {
            name: name.clone(),
            ty: ty.clone(),
            index,
        })
        .collect())
}

/// Every `BLOBFILE` path a function refers to, in order of appearance (repeats included).
pub fn blobfile_paths(f: &Function) -> Vec<String> {
    let mut out = Vec::new();
    for st in &f.statements {
        let args = st.args.iter().filter_map(|(_, a)| match a {
            Arg::Literal(l) => Some(l),
            _ => None,
        });
        for lit in st.attrs.iter().map(|(_, l)| l).chain(args) {
            if let Literal::Blob { path, .. } = lit {
                out.push(path.clone());
            }
        }
    }
    out
}

/// The path of a `BLOBFILE` relative to the model directory (`@model_path/` stripped).
///
/// # Errors
/// [`EngineError::Weights`] unless the path starts with `@model_path/` and the rest is a relative
/// `/`-separated path of normal components (no `..`, `.`, empty component, backslash or NUL) that
/// is not one of [`RESERVED_FILES`].
pub fn relative_weight_path(path: &str) -> Result<String, EngineError> {
    let bad = |why: &str| {
        Err(EngineError::Weights(format!(
            "BLOBFILE path `{path}` {why}"
        )))
    };
    let Some(rel) = path.strip_prefix(MODEL_PATH_PREFIX) else {
        return bad("is not under @model_path/");
    };
    if rel.is_empty() || rel.contains('\\') || rel.contains('\0') {
        return bad("is not a plain relative path");
    }
    if rel
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return bad("has an empty, `.` or `..` component");
    }
    if RESERVED_FILES.contains(&rel) {
        return bad("collides with a file the framework writes");
    }
    Ok(rel.to_string())
}

#[cfg(test)]
mod tests;

/// Reference counts of model directories by path.
///
/// Two programs with the same MIL and weights get the same `hexStringIdentifier`, hence the same
/// directory; deleting it when the first is released would pull the files from under the second
/// (the prototype's "lost the race" bug). The directory is created for the first holder and removed
/// only when the last one releases it.
#[derive(Debug, Default)]
pub struct DirRefcount {
    counts: std::collections::HashMap<std::path::PathBuf, usize>,
}

impl DirRefcount {
    /// Registers one more holder of `dir`; true if it is the first (the caller writes the files).
    pub fn acquire(&mut self, dir: &std::path::Path) -> bool {
        let n = self.counts.entry(dir.to_path_buf()).or_insert(0);
        *n += 1;
        *n == 1
    }

    /// Drops one holder of `dir`; true if it was the last (the caller removes the directory).
    /// Unknown directories return false.
    pub fn release(&mut self, dir: &std::path::Path) -> bool {
        match self.counts.get_mut(dir) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            Some(_) => {
                self.counts.remove(dir);
                true
            }
            None => false,
        }
    }

    /// Holders of `dir`.
    pub fn holders(&self, dir: &std::path::Path) -> usize {
        self.counts.get(dir).copied().unwrap_or(0)
    }

    /// Registers one more holder of `dir` and, for the first, runs `write` (the model files)
    /// *under the same lock*: a second thread building the same program waits until the files
    /// are complete instead of compiling from a half-written directory, and a release cannot
    /// remove the directory mid-write. If `write` fails the registration is undone and the
    /// directory removed by `remove`, so nothing half-written stays behind.
    pub fn acquire_and_write<E>(
        dirs: &std::sync::Mutex<DirRefcount>,
        dir: &std::path::Path,
        write: impl FnOnce() -> Result<(), E>,
        remove: impl FnOnce(&std::path::Path),
    ) -> Result<(), E> {
        let mut d = dirs.lock().unwrap_or_else(|e| e.into_inner());
        if !d.acquire(dir) {
            return Ok(());
        }
        write().inspect_err(|_| {
            if d.release(dir) {
                remove(dir);
            }
        })
    }
}

/// Creates `dir` private (see [`crate::model_dir`]: mode 0700, symlinks and foreign directories
/// refused), records this process as its owner, and writes the plan's files under it with
/// `O_NOFOLLOW`, creating private subdirectories as needed. Existing files are overwritten with the
/// same bytes.
///
/// # Errors
/// Any I/O error or refusal, with the path.
pub fn write_model_dir(dir: &std::path::Path, plan: &DriverPlan) -> Result<(), EngineError> {
    use crate::model_dir::{claim, create_private, write_private};
    let io = |p: &std::path::Path, e: std::io::Error| {
        EngineError::Compile(format!("model directory {}: {e}", p.display()))
    };
    create_private(dir).map_err(|e| io(dir, e))?;
    claim(dir).map_err(|e| io(dir, e))?;
    for f in &plan.files {
        let path = dir.join(&f.rel_path);
        // Relative paths were checked by the plan (no `..`, no absolute parts): create each level.
        let mut at = dir.to_path_buf();
        if let Some(parent) = std::path::Path::new(&f.rel_path).parent() {
            for c in parent.components() {
                at.push(c);
                create_private(&at).map_err(|e| io(&at, e))?;
            }
        }
        write_private(&path, &f.contents).map_err(|e| io(&path, e))?;
    }
    Ok(())
}

/// Runs `load`, and once more after `delay` if it fails (the documented fix for "ANE slot
/// reclamation" load failures). Returns the last result.
pub fn with_one_retry<E>(
    mut load: impl FnMut() -> Result<(), E>,
    delay: impl FnOnce(),
) -> Result<(), E> {
    match load() {
        Ok(()) => Ok(()),
        Err(_) => {
            delay();
            load()
        }
    }
}
