//! Engines that execute MIL programs: the Apple Neural Engine and a CPU reference engine.
//!
//! # Design choices
//! - **One object-safe trait, [`Engine`].** The plugin picks an engine at run time (`GGML_ANE_ENGINE`),
//!   so the boundary is `dyn Engine`. Programs are opaque [`ProgramId`] handles owned by the engine:
//!   the caller cannot keep a program alive past `unload`, and the engine can count what is loaded.
//! - **Who validates what.** The caller (the plugin's planner) chooses shapes that fit the chip
//!   ([`ChipLimits`]) and sizes surfaces with [`surface::request_alloc_size`]. Engines still check
//!   every documented ANE rule and return an [`EngineError`] naming the rule, because a broken rule on
//!   the real chip gives *silently wrong numbers*, not an error: the reference engine is where we find
//!   out on Linux.
//! - **The reference engine executes the text, not the IR it came from.** It parses the MIL text it is
//!   given, reads weights through the MILBlob v2 reader, binds surfaces in alphabetical order of MIL
//!   names and stores every tensor as fp16, so a test that passes on it exercises exactly the bytes
//!   the ANE would receive.
//! - **macOS code is one small module** (`apple`), compiled only for `target_vendor = "apple"`.
//!   Everything it needs to decide (sizes, names, orders) is computed by platform-neutral code here.

#![warn(missing_docs)]

mod chip;
pub mod compile_cap;
pub mod coreml_plan;
pub mod driver_plan;
pub mod engine_core;
mod error;
pub mod host;
pub mod model_dir;
pub mod probe;
pub mod reference;
pub mod request_cache;
pub mod resident;
pub mod steps;
pub mod strided;
pub mod surface;

#[cfg(target_vendor = "apple")]
pub mod apple;
#[cfg(target_vendor = "apple")]
pub mod coreml;
#[cfg(target_vendor = "apple")]
mod macos;

pub use chip::{chip_from_ane_subtype, chip_from_brand, identify_chip, Chip, ChipLimits};
pub use error::EngineError;
pub use surface::Surface;

/// Bytes of one weight file a program refers to through `BLOBFILE(path = ...)`.
#[derive(Clone, Debug)]
pub struct WeightFile {
    /// The path exactly as written in the MIL text, e.g. `@model_path/weights/weight.bin`.
    pub path: String,
    /// MILBlob v2 file contents.
    pub bytes: Vec<u8>,
}

/// Handle of a compiled and loaded program inside one engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProgramId(pub u64);

/// Monotonic counters an engine keeps, for stats and for tests that assert on compile counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineCounters {
    /// Successful compiles.
    pub compiles: u64,
    /// Successful loads.
    pub loads: u64,
    /// Unloads.
    pub unloads: u64,
    /// Successful evaluations.
    pub evaluations: u64,
    /// Programs loaded right now.
    pub loaded: u64,
    /// Highest number of programs loaded at once.
    pub loaded_peak: u64,
    /// Failures injected on purpose (the reference engine's `GGML_ANE_FAULTS`); 0 elsewhere.
    pub faults_injected: u64,
    /// Tensor bytes copied between host [`Surface`]s and device memory by evaluations (the
    /// reference engine counts what the ANE driver would copy). Zero when every surface came
    /// from [`Engine::new_surface`].
    pub bytes_copied: u64,
    /// Objective-C exceptions caught around calls into the framework (each became an
    /// [`EngineError::Exception`] and a CPU fallback); injected ones count too.
    pub exceptions: u64,
    /// Compiles attempted, counted against [`compile_cap::MAX_COMPILES`].
    pub compile_attempts: u64,
    /// Compiles answered with an already loaded identical program (same MIL and weights).
    pub shared: u64,
    /// Compiled models reused from an on-disk cache instead of compiled (Core ML).
    pub cache_reused: u64,
}

impl EngineCounters {
    /// Records that `n` programs are loaded now (after a load or an unload), keeping the peak.
    pub fn set_loaded(&mut self, n: usize) {
        self.loaded = n as u64;
        self.loaded_peak = self.loaded_peak.max(self.loaded);
    }
}

/// An engine that compiles MIL text into loaded programs and evaluates them on surfaces.
///
/// Engines are shared by every backend instance of the plugin, so they are `Send + Sync` and take
/// `&self`; calls may come from several threads at once.
pub trait Engine: Send + Sync {
    /// Short name for logs and stats (`ane`, `reference`).
    fn name(&self) -> &'static str;

    /// The chip limits this engine enforces.
    fn limits(&self) -> ChipLimits;

    /// The chip whose costs apply (`ane_plan`'s cost model), `Unknown` when not known.
    fn chip(&self) -> Chip {
        Chip::Unknown
    }

    /// A surface of `bytes` bytes in the engine's own memory (an IOSurface on the ANE), which
    /// evaluations bind without copying. Its contents are unspecified (not zeroed): the ANE
    /// driver leaves padding pages untouched. The default is host memory ([`Surface::new`]), copied per
    /// evaluation.
    ///
    /// # Errors
    /// The engine could not allocate it.
    fn new_surface(&self, bytes: usize) -> Result<Surface, EngineError> {
        Ok(Surface::new(bytes))
    }

    /// Whether [`Engine::new_surface`] hands out the engine's own memory (`true`, the default) or
    /// host memory copied per evaluation (`false`): the fallback when a canary fails with the
    /// former and passes with the latter (`ane_plan::canary::shape_shared_canary`). Engines
    /// without memory of their own ignore it.
    fn use_own_surfaces(&self, _on: bool) {}

    /// Compiles `mil` (textual MIL, function `main`) with its weight files and loads the result.
    ///
    /// # Errors
    /// Malformed MIL or blobs, ops or shapes the chip does not take, or the loaded-program budget
    /// being exhausted.
    fn compile(&self, mil: &str, weights: &[WeightFile]) -> Result<ProgramId, EngineError>;

    /// Evaluates a loaded program. `inputs` and `outputs` are bound in alphabetical order of the
    /// MIL parameter names and returned variable names respectively (the ANE's binding rule).
    ///
    /// # Errors
    /// Unknown program, surface count or size rule broken, or an evaluation failure.
    fn evaluate(
        &self,
        program: ProgramId,
        inputs: &[&Surface],
        outputs: &mut [&mut Surface],
    ) -> Result<(), EngineError>;

    /// Unloads a program and frees what it holds. Unknown ids are ignored.
    fn unload(&self, program: ProgramId);

    /// Counter snapshot.
    fn counters(&self) -> EngineCounters;

    /// Where each operation of a loaded program runs, as far as the engine knows it *without
    /// asking the framework* (never blocks: safe on the compile and dispatch path). Core ML knows
    /// it once [`Engine::read_op_placement`] read the compute plan; `None` before. The private-API
    /// driver answers `None`: it has no other device to place an operation on.
    fn op_placement(&self, _program: ProgramId) -> Option<Vec<coreml_plan::OpPlacement>> {
        None
    }

    /// Where each operation of a loaded program runs, asking the framework if needed (Core ML's
    /// `MLComputePlan`, read once per program and blocking up to 30 s): for the placement canary,
    /// `ane doctor` and stats, never for a dispatch. `None` when the engine cannot tell.
    fn read_op_placement(&self, program: ProgramId) -> Option<Vec<coreml_plan::OpPlacement>> {
        self.op_placement(program)
    }

    /// The conflicting reports ([`probe::ProbeKind`]) whose forms this engine follows: the
    /// private API the MIL dialect and surface order, Core ML its compile call. Empty by default.
    fn probes(&self) -> &'static [probe::ProbeKind] {
        &[]
    }

    /// Uses form `form` (index into [`probe::ProbeKind::forms`]) of `probe` from the next
    /// compile or evaluation on. Ignored for probes the engine does not follow.
    fn set_form(&self, _probe: probe::ProbeKind, _form: usize) {}

    /// The form of `probe` in use (0, the conservative one, until set).
    fn form(&self, _probe: probe::ProbeKind) -> usize {
        0
    }

    /// Each call made into the framework so far, bounded ([`steps`]); empty for engines that
    /// keep none.
    fn steps(&self) -> Vec<steps::StepRecord> {
        Vec::new()
    }
}
