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
//! Conflicting sources, and which form is used (the other one probed at run time where possible;
//! the MIL dialect and the surface order are, [`crate::probe`]: the plan is made in the
//! engine's current forms, and under ascending sizes requests are copied through the program's
//! own surfaces of [`DriverPlan::surface_sizes`], never bound directly):
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
use crate::engine_core::EngineCore;
use crate::{identify_chip, Chip, Engine, EngineError, ProgramId, Surface, WeightFile};

/// The ANE engine.
pub struct AneEngine {
    client: Client,
    dirs: Arc<Mutex<DirRefcount>>,
    /// Chip, limits, surfaces' kind (IOSurfaces bound directly, or host copies), ids, budget,
    /// compile cap (the framework's per-process leak), step log, counters.
    core: EngineCore<LoadedProgram>,
    /// Compile and load time of the last program built, in ms.
    last_build_ms: Mutex<(f64, f64)>,
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
                dirs: Arc::new(Mutex::new(DirRefcount::default())),
                core: EngineCore::new(chip, chip.limits()),
                last_build_ms: Mutex::new((0.0, 0.0)),
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
    /// Compile and load time of the last program built, in ms.
    pub fn last_build_ms(&self) -> (f64, f64) {
        *self.last_build_ms.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Engine for AneEngine {
    fn name(&self) -> &'static str {
        "ane"
    }

    /// An IOSurface written and read in place (`surface::SharedSurface`).
    fn new_surface(&self, bytes: usize) -> Result<Surface, EngineError> {
        self.core.new_surface(bytes, |bytes| {
            let s = surface::SharedSurface::new(bytes)?;
            Ok(Surface::from_engine(Box::new(s)))
        })
    }

    fn compile(&self, mil: &str, weights: &[WeightFile]) -> Result<ProgramId, EngineError> {
        // In the probed MIL dialect and surface order ([`crate::probe`]).
        let plan = DriverPlan::new_in(mil, weights, &self.core.forms)?;
        let key = plan.content_key();
        // The same MIL and weights already loaded: a second id for it, no compile.
        if let Some(id) = self.core.admit(key)? {
            return Ok(id);
        }
        self.core.cap.take()?;
        let (program, times) = self.core.counted(autoreleasepool(|_| {
            LoadedProgram::build(&self.client, plan, &self.dirs, &self.core.steps)
        }))?;
        self.core.count(|c| c.compiles += 1);
        *self.last_build_ms.lock().unwrap_or_else(|e| e.into_inner()) = (
            times.compile.as_secs_f64() * 1e3,
            times.load.as_secs_f64() * 1e3,
        );
        Ok(self.core.insert(Some(key), program))
    }

    crate::engine_core::answered_by_core!(programs);

    /// The MIL dialect and the surface order.
    fn probes(&self) -> &'static [crate::probe::ProbeKind] {
        &[
            crate::probe::ProbeKind::MilDialect,
            crate::probe::ProbeKind::SurfaceOrder,
        ]
    }
}
