//! The reference engine: executes MIL programs on the CPU exactly as the ANE would receive them.
//!
//! It is the oracle every layer above the private API is tested against on Linux, so it is strict
//! where the chip is strict and documents where it is not:
//! - **Parses the text.** `compile` takes MIL text and weight files and goes through
//!   [`ane_mil::text::parse`] and [`ane_mil::blob::read_blob`]; nothing of the emitter's IR leaks in.
//! - **The driver's plan.** `compile` builds the same [`DriverPlan`] the macOS driver replays
//!   (weights dictionary, model files, binding order, surface size, row rule) and reads weights
//!   through it; `evaluate` checks every request with [`DriverPlan::check_request`] and binds
//!   surfaces in the plan's order. A rule broken in the plan fails here, on Linux.
//! - **Binding order.** Inputs and outputs bind in alphabetical order of their MIL names.
//! - **Surfaces.** Every surface of a request has the same allocation size, at least
//!   [`crate::surface::MIN_SURFACE_BYTES`], a multiple of [`crate::surface::SURFACE_ALIGN`], and large
//!   enough for its tensor, which sits packed at the start.
//! - **Limits.** Axis lengths above the chip's cap fail to compile; loading more than the loaded
//!   program budget fails.
//! - **Numerics.** fp16 storage, fp32 accumulation, one rounding to fp16 per op (see `exec`); matmul
//!   outputs of magnitude >= 32752 become ±inf (the documented output cliff, on by default), and
//!   fp16 accumulation is available as a model of the accuracy loss at large K ([`Numerics`]).
//! - **Failures on demand.** [`ReferenceEngine::with_faults`] injects the documented compile, load,
//!   allocation and evaluation failures with given probabilities ([`faults`]).
//!
//! - **Probed forms.** It follows the forms of the probes it is told to stand in for
//!   ([`ReferenceEngine::with_probes`], [`crate::probe`]): MIL rewritten in the current dialect,
//!   surfaces planned in the current order (under the ascending order it binds the program's own
//!   sizes, as the driver's copy path does); the `shorthand`, `verbose`, `sync_compile`,
//!   `async_compile`, `unordered` and `unequal` faults model the machines of the reports.
//!
//! Not modelled (documented, not hidden): compile latency, the ~119-compile process leak (only as an
//! injected compile fault), and the M1/M2 slice cliff.

mod exec;
pub mod faults;
mod memory;

use std::sync::Arc;

use ane_mil::DType;

use crate::driver_plan::DriverPlan;
use crate::engine_core::EngineCore;
use crate::probe::{CompileCall, ProbeKind, SurfaceOrder};
use crate::{
    Chip, ChipLimits, Engine, EngineCounters, EngineError, ProgramId, Surface, WeightFile,
};
use exec::Checked;
pub use exec::{Accum, Numerics, MATMUL_OUTPUT_CLIFF};
use faults::{FaultSpec, Faults, Step};

/// CPU engine with ANE rules and numerics. Cheap to share: the bookkeeping is the engines' shared
/// core ([`EngineCore`]), and evaluation runs outside every lock.
#[derive(Debug)]
pub struct ReferenceEngine {
    handoffs: Arc<memory::Handoffs>,
    numerics: Numerics,
    faults: Option<Faults>,
    /// `with_placement`: the device every operation reports, standing in for Core ML's compute
    /// plan in tests of the engine choice.
    placed_on: Option<crate::coreml_plan::OpDevice>,
    /// `with_probes`: the conflicting reports whose forms it follows (none by default).
    probes: &'static [ProbeKind],
    /// Chip, limits, surfaces' kind, ids, budget, the same per-process compile cap as the ANE
    /// driver (so the plugin's behaviour past it is tested), the step log and counters: what
    /// every engine keeps alike.
    core: EngineCore<Arc<Program>>,
}

/// A loaded program: the driver plan it was compiled from and the checked function.
#[derive(Debug)]
struct Program {
    plan: DriverPlan,
    checked: Checked,
    /// Operator of each statement of `main` but constants, for `op_placement`.
    ops: Vec<String>,
}

/// Nothing to release: a reference program is plain memory. Held as an `Arc` so that
/// evaluations run outside the program's lock, concurrently.
impl crate::resident::Release for Arc<Program> {
    fn release(&mut self) {}
}

impl ReferenceEngine {
    /// An engine enforcing `limits`, with the default [`Numerics`] and no injected faults.
    pub fn new(limits: ChipLimits) -> Self {
        ReferenceEngine {
            handoffs: Arc::default(),
            numerics: Numerics::default(),
            faults: None,
            placed_on: None,
            probes: &[],
            core: EngineCore::new(Chip::Unknown, limits),
        }
    }

    /// An engine enforcing `limits` whose calls fail as `faults` says (see [`faults`]).
    pub fn with_faults(limits: ChipLimits, faults: FaultSpec) -> Self {
        ReferenceEngine {
            faults: faults.any().then(|| Faults::new(faults)),
            ..Self::new(limits)
        }
    }

    /// The same engine with a compile cap of `max` attempts instead of
    /// [`crate::compile_cap::MAX_COMPILES`] (tests).
    pub fn with_compile_cap(mut self, max: u64) -> Self {
        self.core.cap = crate::compile_cap::CompileCap::new(max);
        self
    }

    /// The same engine standing for `chip` (its costs; limits are set apart).
    pub fn for_chip(mut self, chip: Chip) -> Self {
        self.core.chip = chip;
        self
    }

    /// The same engine answering `op_placement` as a Core ML compute plan would: every
    /// operation of a program (constants aside) on `device` (tests of the engine choice).
    pub fn with_placement(mut self, device: crate::coreml_plan::OpDevice) -> Self {
        self.placed_on = Some(device);
        self
    }

    /// The same engine following the forms of `probes` ([`crate::probe`]): standing in for the
    /// private API (`MilDialect`, `SurfaceOrder`) or Core ML (`CompileCall`) in tests of the
    /// probes.
    pub fn with_probes(mut self, probes: &'static [ProbeKind]) -> Self {
        self.probes = probes;
        self
    }

    /// The same engine with other numerics.
    pub fn numerics(mut self, numerics: Numerics) -> Self {
        self.numerics = numerics;
        self
    }

    fn inject(&self, step: Step) -> Result<(), EngineError> {
        let r = self.faults.as_ref().map_or(Ok(()), |f| f.check(step));
        // Counted like the ANE driver counts the exceptions it catches.
        self.core.counted(r)
    }
}

impl ReferenceEngine {
    /// Parse, plan, check and the compile faults: the `compile` step.
    fn compile_checked(&self, mil: &str, weights: &[WeightFile]) -> Result<Program, EngineError> {
        let forms = &self.core.forms;
        // The driver's dialect, as `DriverPlan::new_in` writes it.
        let converted;
        let mil = if self.probes.contains(&ProbeKind::MilDialect) {
            let p = ane_mil::text::parse(mil).map_err(|e| EngineError::Parse(e.to_string()))?;
            converted = ane_mil::text::emit_in(&p, forms.dialect())
                .map_err(|e| EngineError::Compile(e.to_string()))?;
            converted.as_str()
        } else {
            mil
        };
        let program = ane_mil::text::parse(mil)
            .map_err(|e| EngineError::Parse(e.to_string()))?
            .canonical();
        let func = program
            .functions
            .into_iter()
            .find(|f| f.name == "main")
            .ok_or_else(|| EngineError::Compile("no function `main`".into()))?;
        if !matches!(func.opset.as_str(), "ios16" | "ios17" | "ios18") {
            return Err(EngineError::Compile(format!(
                "opset `{}` not taken by the ANE compiler",
                func.opset
            )));
        }
        // The driver plan decides binding order, weight files and surface sizes; the reference
        // engine takes them from it so that a rule broken in the plan fails here too.
        let plan = DriverPlan::for_function(mil, &func, weights)?.with_order(forms.surface_order());
        let blob = |path: &str, offset: u64| -> Result<(DType, Vec<u8>), EngineError> {
            let entry = plan.weights.iter().find(|w| w.key == path).ok_or_else(|| {
                EngineError::Weights(format!("no weight file given for `{path}`"))
            })?;
            let b = ane_mil::blob::read_blob(&entry.data, offset)
                .map_err(|e| EngineError::Weights(format!("{path}: {e}")))?;
            Ok((b.dtype, b.data.to_vec()))
        };
        let ops = func
            .statements
            .iter()
            .filter(|st| st.op != "const")
            .map(|st| st.op.clone())
            .collect();
        let checked = exec::check(func, self.core.limits.max_axis, &blob)?;
        self.core.cap.take()?;
        self.inject(Step::Throw)?;
        // The machines of the conflicting reports: a compiler that refuses one dialect, a Core ML
        // whose compile call of one form fails.
        let verbose = mil.contains("tensor<string, []>(");
        self.inject(if verbose {
            Step::Verbose
        } else {
            Step::Shorthand
        })?;
        self.inject(match forms.compile_call() {
            CompileCall::Sync => Step::SyncCompile,
            CompileCall::Async => Step::AsyncCompile,
        })?;
        self.inject(Step::Compile)?;
        Ok(Program { plan, checked, ops })
    }

    /// The budget and the load faults: the `load` step.
    fn load(&self, program: Program) -> Result<ProgramId, EngineError> {
        self.core.count(|c| c.compiles += 1);
        self.inject(Step::Load)?;
        self.core.check_budget()?;
        Ok(self.core.insert(None, Arc::new(program)))
    }

    /// The `evaluate` step.
    fn evaluate_checked(
        &self,
        program: ProgramId,
        inputs: &[&Surface],
        outputs: &mut [&mut Surface],
    ) -> Result<(), EngineError> {
        // The program's lock only long enough to take it: evaluations run concurrently.
        let prog = self.core.get(program)?.lock().clone();
        self.inject(Step::Throw)?;
        self.inject(Step::Alloc)?;
        let sizes = |s: &mut dyn Iterator<Item = usize>| s.collect::<Vec<_>>();
        prog.plan.check_request(
            &sizes(&mut inputs.iter().map(|s| s.alloc_size())),
            &sizes(&mut outputs.iter().map(|s| s.alloc_size())),
        )?;
        let func = &prog.checked.func;
        // The device's turn: engine memory is handed over (a protocol break fails here), host
        // memory counts as copied, as the ANE driver would copy it.
        let ins = inputs
            .iter()
            .map(|s| s.for_device())
            .collect::<Result<Vec<_>, _>>()?;
        let mut outs = outputs
            .iter_mut()
            .map(|s| s.for_device_mut())
            .collect::<Result<Vec<_>, _>>()?;
        let copied: usize = prog
            .plan
            .inputs
            .iter()
            .zip(&ins)
            .filter(|(_, s)| s.surface().engine_memory().is_none())
            .map(|(b, _)| b.bytes())
            .chain(
                prog.plan
                    .outputs
                    .iter()
                    .zip(&outs)
                    .filter(|(_, s)| s.surface().engine_memory().is_none())
                    .map(|(b, _)| b.bytes()),
            )
            .sum();
        // An injected evaluation failure comes back as soon as the device has the surfaces, before
        // this engine widens them to f32: that widening is the emulation's cost, not the device's,
        // and a fault after it would charge the plugin's fallback for it (`cargo xtask
        // bench-fallback` measures that path).
        self.inject(Step::Eval)?;
        // The sizes the device is given: the request's, or under the ascending order the
        // program's own (the driver copies through them).
        let (din, dout) = match prog.plan.order {
            SurfaceOrder::Equal => (
                sizes(&mut ins.iter().map(|s| s.surface().alloc_size())),
                sizes(&mut outs.iter().map(|s| s.surface().alloc_size())),
            ),
            SurfaceOrder::Ascending => prog.plan.surface_sizes(),
        };
        if din
            .iter()
            .chain(&dout)
            .any(|&s| s != din.first().copied().unwrap_or(s))
        {
            self.inject(Step::Unequal)?;
        }
        let zeros =
            !crate::surface::is_ordered(&din, &dout) && self.inject(Step::Unordered).is_err();
        // Surfaces arrive in the plan's binding order; the interpreter wants declaration order.
        let mut by_decl: Vec<Vec<f32>> = vec![Vec::new(); func.inputs.len()];
        for (b, s) in prog.plan.inputs.iter().zip(&ins) {
            let pos = func
                .inputs
                .iter()
                .position(|(n, _)| *n == b.name)
                .expect("bound input is declared");
            by_decl[pos] = match b.ty.dtype {
                DType::Fp16 => s.fp16(b.ty.numel()).iter().map(|h| h.to_f32()).collect(),
                DType::Int8 => s
                    .bytes(b.ty.numel())
                    .iter()
                    .map(|&v| v as i8 as f32)
                    .collect(),
                _ => s.fp32_vec(b.ty.numel()),
            };
        }
        let mut results = exec::run(&prog.checked, by_decl, self.numerics)?;
        if zeros {
            // M1 per maderix issue 47: silent zeros, no error.
            for r in &mut results {
                r.fill(0.0);
            }
        }
        for (b, s) in prog.plan.outputs.iter().zip(outs.iter_mut()) {
            let pos = func
                .outputs
                .iter()
                .position(|n| *n == b.name)
                .expect("bound output is returned");
            let data = &results[pos];
            match b.ty.dtype {
                DType::Fp16 => {
                    for (d, &v) in s.fp16_mut(data.len()).iter_mut().zip(data) {
                        *d = half::f16::from_f32(v);
                    }
                }
                _ => {
                    for (chunk, &v) in s.bytes_mut().chunks_exact_mut(4).zip(data) {
                        chunk.copy_from_slice(&v.to_le_bytes());
                    }
                }
            }
        }
        drop((ins, outs));
        self.core.evaluated(copied as u64);
        Ok(())
    }
}

impl Engine for ReferenceEngine {
    fn name(&self) -> &'static str {
        "reference"
    }

    crate::engine_core::answered_by_core!();

    /// Host memory that enforces the IOSurface hand-off protocol ([`memory`]).
    fn new_surface(&self, bytes: usize) -> Result<Surface, EngineError> {
        self.inject(Step::Alloc)?;
        self.core.new_surface(bytes, |bytes| {
            let mem = memory::TrackedMemory::new(bytes, self.handoffs.clone())?;
            Ok(Surface::from_engine(Box::new(mem)))
        })
    }

    fn compile(&self, mil: &str, weights: &[WeightFile]) -> Result<ProgramId, EngineError> {
        let program = self
            .core
            .steps
            .run("compile", || self.compile_checked(mil, weights))?;
        self.core.steps.run("load", || self.load(program))
    }

    fn evaluate(
        &self,
        program: ProgramId,
        inputs: &[&Surface],
        outputs: &mut [&mut Surface],
    ) -> Result<(), EngineError> {
        self.core.steps.run("evaluate", || {
            self.evaluate_checked(program, inputs, outputs)
        })
    }

    fn probes(&self) -> &'static [ProbeKind] {
        self.probes
    }

    fn op_placement(&self, program: ProgramId) -> Option<Vec<crate::coreml_plan::OpPlacement>> {
        let device = self.placed_on?;
        let prog = self.core.get(program).ok()?.lock().clone();
        // Named as Core ML's compute plan names them (`ios18.matmul`), read through the same
        // normalisation as the Core ML driver's.
        Some(
            prog.ops
                .iter()
                .filter_map(|op| crate::coreml_plan::placed(&format!("ios18.{op}"), Some(device)))
                .collect(),
        )
    }

    fn unload(&self, program: ProgramId) {
        let _ = self.core.steps.run("unload", || {
            // Unloading an unknown id is a no-op by contract, not a failed step.
            self.core.unload(program);
            Ok(())
        });
    }

    fn counters(&self) -> EngineCounters {
        let mut c = self.core.counters();
        c.faults_injected = self.faults.as_ref().map_or(0, Faults::injected);
        c
    }
}

#[cfg(test)]
mod tests;
