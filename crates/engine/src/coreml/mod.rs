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
//!    `.mlpackage` written to a staging folder, `+[MLModel compileModelAtURL:error:]`, the result
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
use crate::resident::Table;
use crate::{
    identify_chip, Chip, ChipLimits, Engine, EngineCounters, EngineError, ProgramId, Surface,
    WeightFile,
};
use model::{Builder, LoadedModel};

/// The Core ML engine.
pub struct CoreMlEngine {
    chip: Chip,
    limits: ChipLimits,
    cache: Cache,
    /// Compiles left (`crate::compile_cap`): counts `compileModelAtURL` calls, not cache hits.
    cap: crate::compile_cap::CompileCap,
    /// Each call into the framework, for `ane doctor` (`crate::steps`).
    steps: Arc<crate::steps::StepLog>,
    /// Serialises package, compile and install (see [`Builder`]).
    compiling: Mutex<()>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    next_id: u64,
    /// Unloaded exactly once, by the last holder (`crate::resident`).
    programs: Table<LoadedModel>,
    counters: EngineCounters,
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
            chip,
            limits: chip.limits(),
            cache,
            cap: crate::compile_cap::CompileCap::default(),
            steps: Arc::default(),
            compiling: Mutex::new(()),
            state: Mutex::new(State::default()),
        }))
    })
}

impl CoreMlEngine {
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

    /// The compiled-model cache folder.
    pub fn cache_dir(&self) -> &std::path::Path {
        self.cache.root()
    }
}

impl Engine for CoreMlEngine {
    fn name(&self) -> &'static str {
        "coreml"
    }

    fn limits(&self) -> ChipLimits {
        self.limits
    }

    fn chip(&self) -> Chip {
        self.chip
    }

    fn compile(&self, mil: &str, weights: &[WeightFile]) -> Result<ProgramId, EngineError> {
        let plan = CoreMlPlan::new(mil, weights)?;
        let key = plan.key;
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
        let builder = Builder {
            cache: &self.cache,
            cap: &self.cap,
            steps: &self.steps,
            compiling: &self.compiling,
        };
        let (program, built) = self.counted(autoreleasepool(|_| builder.build(plan)))?;
        let mut st = self.lock();
        st.counters.compiles += built.compiles;
        st.counters.cache_reused += u64::from(built.from_cache);
        st.counters.loads += 1;
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
        // handle drops, and the drop then releases it.
        let handle = self
            .lock()
            .programs
            .get(program.0)
            .ok_or(EngineError::UnknownProgram(program.0))?;
        let mut prog = handle.lock();
        let sizes: Vec<usize> = inputs.iter().map(|s| s.alloc_size()).collect();
        let out_sizes: Vec<usize> = outputs.iter().map(|s| s.alloc_size()).collect();
        prog.plan.check_request(&sizes, &out_sizes)?;
        let copied = self.counted(self.steps.run("evaluate", || {
            autoreleasepool(|_| prog.evaluate(inputs, outputs))
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
        // Outside the engine lock: released here, or by an evaluation in flight when it ends.
        drop(removed);
    }

    fn op_placement(&self, program: ProgramId) -> Option<Vec<OpPlacement>> {
        let handle = self.lock().programs.get(program.0)?;
        let known = handle.lock().placement.known();
        known
    }

    fn read_op_placement(&self, program: ProgramId) -> Option<Vec<OpPlacement>> {
        let handle = self.lock().programs.get(program.0)?;
        let mut exceptions = 0;
        let p = handle.lock().read_placement(&mut exceptions);
        self.lock().counters.exceptions += exceptions;
        p
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

impl Drop for CoreMlEngine {
    fn drop(&mut self) {
        // The ids first: a guard in the `for` expression would live through the loop, and
        // `unload` takes the lock again.
        let ids = self.lock().programs.ids();
        for id in ids {
            self.unload(ProgramId(id));
        }
    }
}
