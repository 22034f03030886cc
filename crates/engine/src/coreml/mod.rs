//! The Core ML engine: runs programs through Apple's public Core ML framework, on the CPU and
//! Neural Engine (`MLComputeUnitsCPUAndNeuralEngine`).
//!
//! **Only type-checked** (`cargo xtask check-apple`), never run: no machine of this project is a
//! Mac. So the driver decides nothing. [`crate::coreml_plan`] (tested on Linux) says what the
//! package holds, which features to bind in which order, where compiled models are cached and
//! when one may be reused, what to do when a load fails, and which compute units to ask for;
//! this module replays it with one guarded call per step (`client.rs`):
//!
//! 1. `open`: the `MLModel` class must exist; the host signals must not say "no Neural Engine"
//!    or "virtual machine" ([`crate::host`]); the compiled-model cache is opened under the
//!    per-user caches folder, salted with the OS version string; the chip comes from the CPU
//!    brand string (no private framework is touched).
//! 2. `compile` (`model.rs`): [`CoreMlPlan::new`]; the cache's entry for the program, else the
//!    `.mlpackage` written to a staging folder, `+[MLModel compileModelAtURL:error:]` (or, when
//!    the probe found that failing, `compileModelAtURL:completionHandler:`: [`crate::probe`]), the result
//!    moved into the cache; `+[MLModel modelWithContentsOfURL:configuration:error:]`, with a
//!    cached model that fails to load discarded and compiled once more. `MLComputePlan` (macOS
//!    14.4+, looked up at run time, `placement.rs`) is asked only by
//!    [`Engine::read_op_placement`], once per program, after `coremldata.bin` was found.
//! 3. `evaluate` (`arrays.rs`): each input surface is **copied** into a new fp16 `MLMultiArray`,
//!    the arrays go in an `MLDictionaryFeatureProvider`, `predictionFromFeatures:error:` runs,
//!    and each output array is **copied** back into its surface, row by row along the strides
//!    Core ML chose (which may be padded). [`EngineCounters::bytes_copied`] counts both ways.
//!    Binding surfaces without a copy would need `MLMultiArray`s over IOSurface-backed
//!    `CVPixelBuffer`s (`initWithPixelBuffer:shape:`, `kCVPixelFormatType_OneComponent16Half`),
//!    with Core ML's own rules on their row padding; that is left for later.
//! 4. `unload`: the `MLModel` is dropped, exactly once, after the last evaluation using it
//!    ([`crate::resident`]).
//!
//! Every Objective-C call runs under an exception guard (an exception becomes
//! [`EngineError::Exception`]), every `NSError` becomes an [`EngineError`] carrying its
//! description, and every framework call is recorded in the step log ([`crate::steps`]:
//! `package`, `compile`, `load`, `compute_plan`, `evaluate`, `unload`).

#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

mod arrays;
mod client;
mod model;
mod placement;

use std::sync::{Arc, Mutex};

use objc2::rc::autoreleasepool;

use crate::coreml_plan::{Cache, CoreMlPlan, OpPlacement};
use crate::engine_core::EngineCore;
use crate::{identify_chip, Engine, EngineError, ProgramId, WeightFile};
use model::{Builder, LoadedModel};

/// The Core ML engine.
pub struct CoreMlEngine {
    cache: Cache,
    /// Chip, limits, ids, budget, compile cap (counts `compileModelAtURL` calls, not cache hits), step log,
    /// counters.
    core: EngineCore<LoadedModel>,
    /// Serialises package, compile and install (see [`Builder`]).
    compiling: Mutex<()>,
}

/// What Core ML's open reads about the machine ([`crate::host`]): the public sysctls, and
/// `_ANEDeviceInfo`'s answers only when the class is already in the process (the private
/// framework is never opened for it; absent = unknown).
pub fn host_signals() -> crate::host::HostSignals {
    crate::macos::host_signals(client::class(c"_ANEDeviceInfo"))
}

/// Opens the Core ML engine.
///
/// # Errors
/// [`EngineError::Unavailable`] when Core ML's `MLModel` class is missing, the machine has no
/// Neural Engine or is a virtual machine ([`crate::host`]), or the compiled-model cache cannot be
/// opened.
pub fn open() -> Result<Arc<CoreMlEngine>, EngineError> {
    autoreleasepool(|_| {
        if client::class(c"MLModel").is_none() {
            return Err(EngineError::Unavailable(
                "Core ML's MLModel class is missing".into(),
            ));
        }
        // A real ANE, no virtual machine, before anything is compiled: public signals, and
        // `_ANEDeviceInfo` only if something already loaded it (never opened from here).
        let host = host_signals();
        crate::host::decide(&host).map_err(|why| {
            EngineError::Unavailable(format!("no usable Neural Engine for Core ML: {why}"))
        })?;
        let base = client::cache_base();
        let salt = client::os_version()?;
        let cache = Cache::open(&base, &salt).map_err(|e| {
            EngineError::Unavailable(format!("Core ML model cache under {}: {e}", base.display()))
        })?;
        let chip = identify_chip(None, host.brand.as_deref());
        Ok(Arc::new(CoreMlEngine {
            cache,
            core: EngineCore::new(chip, chip.limits()),
            compiling: Mutex::new(()),
        }))
    })
}

impl CoreMlEngine {
    /// The compiled-model cache folder.
    pub fn cache_dir(&self) -> &std::path::Path {
        self.cache.root()
    }
}

impl Engine for CoreMlEngine {
    fn name(&self) -> &'static str {
        "coreml"
    }

    fn compile(&self, mil: &str, weights: &[WeightFile]) -> Result<ProgramId, EngineError> {
        let plan = CoreMlPlan::new(mil, weights)?;
        let key = plan.key;
        // The same MIL and weights already loaded: a second id for it, no compile.
        if let Some(id) = self.core.admit(key)? {
            return Ok(id);
        }
        let builder = Builder {
            cache: &self.cache,
            cap: &self.core.cap,
            steps: &self.core.steps,
            compiling: &self.compiling,
            call: self.core.forms.compile_call(),
        };
        let (program, built) = self
            .core
            .counted(autoreleasepool(|_| builder.build(plan)))?;
        self.core.count(|c| {
            c.compiles += built.compiles;
            c.cache_reused += u64::from(built.from_cache);
        });
        Ok(self.core.insert(Some(key), program))
    }

    crate::engine_core::answered_by_core!(programs);

    /// The compile call (`compileModelAtURL:error:`, else the completion-handler form).
    fn probes(&self) -> &'static [crate::probe::ProbeKind] {
        &[crate::probe::ProbeKind::CompileCall]
    }

    fn op_placement(&self, program: ProgramId) -> Option<Vec<OpPlacement>> {
        let known = self.core.get(program).ok()?.lock().placement.known();
        known
    }

    fn read_op_placement(&self, program: ProgramId) -> Option<Vec<OpPlacement>> {
        let handle = self.core.get(program).ok()?;
        let mut exceptions = 0;
        let p = handle.lock().read_placement(&mut exceptions);
        self.core.count(|c| c.exceptions += exceptions);
        p
    }
}
