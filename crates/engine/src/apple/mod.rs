//! The Apple Neural Engine driver: AppleNeuralEngine.framework's private `_ANEInMemoryModel` API.
//!
//! **Only type-checked** (`cargo xtask check-apple`): no machine of this project is a Mac. The
//! driver therefore decides nothing itself. [`crate::driver_plan::DriverPlan`] (tested on Linux, and
//! consumed by the reference engine) says what to send; this module replays it:
//!
//! 1. `dlopen` the framework, resolve `_ANEInMemoryModelDescriptor`, `_ANEInMemoryModel`,
//!    `_ANERequest`, `_ANEIOSurfaceObject` (and `_ANEDeviceInfo` for the chip), and probe every
//!    selector, so a framework that changed makes the engine unavailable rather than crash
//!    (`client.rs`); then `+[_ANEDeviceInfo hasANE]`, `+isVirtualMachine` and the public
//!    sysctls must not say "no Neural Engine" or "virtual machine" ([`crate::host::decide`]);
//! 2. per program: descriptor from the MIL bytes and weights dictionary, model, files written
//!    under its directory (refcounted by identifier), compile, load with one retry, one flat
//!    IOSurface per binding, the request built once (`program.rs`, `surface.rs`);
//! 3. per evaluation, when every surface came from [`Engine::new_surface`] (what the plugin uses
//!    for staged weights, activations and outputs): those IOSurfaces are bound directly, through a
//!    request cached per binding (one compiled model, many requests: §1.3.8), unlocked for the
//!    evaluation and relocked when the CPU next touches them: no copy. Otherwise (host
//!    [`Surface`]s: canaries, `ane bench`): copied into the program's own IOSurfaces under lock,
//!    evaluate, outputs copied back; `EngineCounters::bytes_copied` counts those bytes.
//!
//! Conflicting sources, and which form is used (the other one probed at run time where possible):
//! - model directory: `localModelPath` when the method exists, else `NSTemporaryDirectory()/<hex>`;
//! - weights entry offset: 0 (not 64);
//! - surfaces: flat 1-D, packed; the plan's 64-byte row rule makes the 2-D row-padded layout the
//!   same bytes, so both readings agree;
//! - minimum surface size: 48 KiB, rounded to 128 bytes (satisfies the 64-width and 32-width claims);
//! - QoS 21 (not 33);
//! - chip: `aneSubType` (`h17*` = M5, although a base M5 may report `h16`: same limits), then the
//!   CPU brand string, else the most conservative limits.

#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

mod client;
mod program;
mod surface;

use std::sync::{Arc, Mutex};

use objc2::rc::autoreleasepool;

use client::Client;
pub use client::Discovery;
use program::LoadedProgram;

use crate::driver_plan::{DirRefcount, DriverPlan};
use crate::resident::Table;
use crate::{
    identify_chip, Chip, ChipLimits, Engine, EngineCounters, EngineError, ProgramId, Surface,
    WeightFile,
};

/// The ANE engine.
pub struct AneEngine {
    client: Client,
    chip: Chip,
    /// `Engine::use_own_surfaces`: IOSurfaces bound directly (default) or host copies.
    own_surfaces: std::sync::atomic::AtomicBool,
    limits: ChipLimits,
    dirs: Arc<Mutex<DirRefcount>>,
    /// Compiles left before the framework's per-process leak (`crate::compile_cap`).
    cap: crate::compile_cap::CompileCap,
    /// Each call into the framework, for `ane doctor` (`crate::steps`).
    steps: Arc<crate::steps::StepLog>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    next_id: u64,
    /// Unloaded exactly once, by the last holder (`crate::resident`).
    programs: Table<LoadedProgram>,
    counters: EngineCounters,
    last_compile_ms: f64,
    last_load_ms: f64,
}

/// What `open` found, for `ane doctor`.
#[derive(Clone, Debug)]
pub struct Probe {
    /// Framework, classes and selectors.
    pub discovery: Discovery,
    /// `aneSubType`, when available.
    pub ane_subtype: Option<String>,
    /// `machdep.cpu.brand_string`, when available.
    pub brand: Option<String>,
    /// The chip they identify.
    pub chip: Chip,
    /// Whether this is a real Neural Engine outside a virtual machine ([`crate::host`]).
    pub host: crate::host::HostSignals,
}

/// Opens the ANE engine and reports what was found either way.
pub fn open_with_probe() -> (Result<Arc<AneEngine>, EngineError>, Probe) {
    autoreleasepool(|_| {
        let (client, discovery) = client::load();
        // Model directories left by a crashed process hold weights: remove them (ours only).
        crate::model_dir::clean_stale(std::path::Path::new(
            &objc2_foundation::NSTemporaryDirectory().to_string(),
        ));
        // A real ANE, no virtual machine: checked before anything is compiled.
        let host = crate::macos::host_signals(client.as_ref().ok().and_then(Client::device_info));
        let client = client.and_then(|c| {
            crate::host::decide(&host)
                .map(|()| c)
                .map_err(|why| EngineError::Unavailable(format!("no usable Neural Engine: {why}")))
        });
        let ane_subtype = client.as_ref().ok().and_then(Client::ane_subtype);
        let brand = host.brand.clone();
        let chip = identify_chip(ane_subtype.as_deref(), brand.as_deref());
        let probe = Probe {
            discovery,
            ane_subtype,
            brand,
            chip,
            host,
        };
        let engine = client.map(|client| {
            Arc::new(AneEngine {
                client,
                chip,
                own_surfaces: std::sync::atomic::AtomicBool::new(true),
                limits: chip.limits(),
                dirs: Arc::new(Mutex::new(DirRefcount::default())),
                cap: crate::compile_cap::CompileCap::default(),
                steps: Arc::default(),
                state: Mutex::new(State::default()),
            })
        });
        (engine, probe)
    })
}

/// Opens the ANE engine.
///
/// # Errors
/// [`EngineError::Unavailable`] when the framework, a class or a selector is missing, or the
/// machine has no Neural Engine or is a virtual machine ([`crate::host`]).
pub fn open() -> Result<Arc<dyn Engine>, EngineError> {
    open_with_probe().0.map(|e| e as Arc<dyn Engine>)
}

impl AneEngine {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `r`, counting a caught Objective-C exception in the counters.
    fn counted<T>(&self, r: Result<T, EngineError>) -> Result<T, EngineError> {
        if let Err(EngineError::Exception(_)) = &r {
            self.lock().counters.exceptions += 1;
        }
        r
    }

    /// The identified chip.
    pub fn chip(&self) -> Chip {
        self.chip
    }

    /// Compile and load time of the last program built, in ms.
    pub fn last_build_ms(&self) -> (f64, f64) {
        let st = self.lock();
        (st.last_compile_ms, st.last_load_ms)
    }
}

impl Engine for AneEngine {
    fn name(&self) -> &'static str {
        "ane"
    }

    fn limits(&self) -> ChipLimits {
        self.limits
    }

    fn chip(&self) -> Chip {
        self.chip
    }

    /// An IOSurface written and read in place (`surface::SharedSurface`).
    fn new_surface(&self, bytes: usize) -> Result<Surface, EngineError> {
        if !self.own_surfaces.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(Surface::new(bytes));
        }
        let s = surface::SharedSurface::new(bytes)?;
        Ok(Surface::from_engine(Box::new(s)))
    }

    fn use_own_surfaces(&self, on: bool) {
        self.own_surfaces
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    fn compile(&self, mil: &str, weights: &[WeightFile]) -> Result<ProgramId, EngineError> {
        let plan = DriverPlan::new(mil, weights)?;
        let key = plan.content_key();
        {
            let mut st = self.lock();
            // The same MIL and weights already loaded: a second id for it, no compile.
            let id = st.next_id + 1;
            if st.programs.share(key, id) {
                st.next_id = id;
                st.counters.shared += 1;
                return Ok(ProgramId(id));
            }
            if st.programs.len() >= self.limits.max_loaded_programs {
                return Err(EngineError::Budget {
                    loaded: st.programs.len(),
                    max: self.limits.max_loaded_programs,
                });
            }
        }
        self.cap.take()?;
        let (program, times) = self.counted(autoreleasepool(|_| {
            LoadedProgram::build(&self.client, plan, &self.dirs, &self.steps)
        }))?;
        let mut st = self.lock();
        st.counters.compiles += 1;
        st.counters.loads += 1;
        st.last_compile_ms = times.compile.as_secs_f64() * 1e3;
        st.last_load_ms = times.load.as_secs_f64() * 1e3;
        st.next_id += 1;
        let id = st.next_id;
        st.programs.insert_keyed(id, key, program);
        let n = st.programs.len();
        st.counters.set_loaded(n);
        Ok(ProgramId(id))
    }

    fn evaluate(
        &self,
        program: ProgramId,
        inputs: &[&Surface],
        outputs: &mut [&mut Surface],
    ) -> Result<(), EngineError> {
        // Held for the evaluation: an `unload` meanwhile leaves the program loaded until this
        // handle drops, and the drop then unloads it.
        let handle = self
            .lock()
            .programs
            .get(program.0)
            .ok_or(EngineError::UnknownProgram(program.0))?;
        let mut prog = handle.lock();
        let sizes = |v: &mut dyn Iterator<Item = usize>| v.collect::<Vec<_>>();
        prog.plan.check_request(
            &sizes(&mut inputs.iter().map(|s| s.alloc_size())),
            &sizes(&mut outputs.iter().map(|s| s.alloc_size())),
        )?;
        let copied = self.counted(self.steps.run("evaluate", || {
            autoreleasepool(|_| prog.evaluate(&self.client, inputs, outputs))
        }))?;
        drop(prog);
        let mut st = self.lock();
        st.counters.evaluations += 1;
        st.counters.bytes_copied += copied;
        Ok(())
    }

    fn unload(&self, program: ProgramId) {
        let removed = {
            let mut st = self.lock();
            let p = st.programs.remove(program.0);
            if p.is_some() {
                st.counters.unloads += 1;
                let n = st.programs.len();
                st.counters.set_loaded(n);
            }
            p
        };
        // Outside the engine lock: unloaded here, or by an evaluation in flight when it ends.
        drop(removed);
    }

    fn steps(&self) -> Vec<crate::steps::StepRecord> {
        self.steps.records()
    }

    fn counters(&self) -> EngineCounters {
        let mut c = self.lock().counters;
        c.compile_attempts = self.cap.used();
        c
    }
}

impl Drop for AneEngine {
    fn drop(&mut self) {
        // Collect first: a guard in the `for` expression would live through the loop, and
        // `unload` takes the same lock (a deadlock on every drop with programs loaded).
        let ids = self.lock().programs.ids();
        for id in ids {
            self.unload(ProgramId(id));
        }
    }
}
