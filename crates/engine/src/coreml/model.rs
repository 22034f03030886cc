//! One program under Core ML: its compiled model (from the cache or compiled now), the loaded
//! `MLModel`, its placement, and its evaluation.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use objc2::rc::{autoreleasepool, Retained};
use objc2_core_ml::{MLModel, MLModelConfiguration};

use super::{arrays, client, placement};
use crate::compile_cap::CompileCap;
use crate::coreml_plan::{
    on_load_failure, Cache, CoreMlPlan, LazyPlacement, LoadFailure, OpPlacement,
};
use crate::engine_core::Evaluate;
use crate::resident::Release;
use crate::steps::StepLog;
use crate::{EngineError, Surface};

/// A loaded program, used only under its [`crate::resident::Resident`] mutex and released (the
/// `MLModel` dropped) when its last holder drops it.
pub(super) struct LoadedModel {
    steps: Arc<StepLog>,
    /// The features (model and weight bytes dropped once loaded).
    pub(super) plan: CoreMlPlan,
    /// `None` once released.
    model: Option<Retained<MLModel>>,
    /// The compiled model (in the cache) and the configuration it was loaded with: what
    /// `MLComputePlan` is asked about, when asked.
    compiled: PathBuf,
    config: Retained<MLModelConfiguration>,
    /// Where Core ML places each operation: read on first request only ([`LazyPlacement`]).
    pub(super) placement: LazyPlacement,
}

// SAFETY: the MLModel is only messaged while the program's mutex is held (evaluate, release), so
// no two threads use it at once; Objective-C retain/release are thread-safe.
unsafe impl Send for LoadedModel {}

/// What [`build`] did, for the counters.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Built {
    /// `compileModelAtURL` calls that succeeded.
    pub(super) compiles: u64,
    /// The model loaded came from the cache.
    pub(super) from_cache: bool,
}

/// What building needs from the engine.
pub(super) struct Builder<'a> {
    pub(super) cache: &'a Cache,
    pub(super) cap: &'a CompileCap,
    pub(super) steps: &'a Arc<StepLog>,
    /// Held while a package is written, compiled and installed: two threads compiling the same
    /// program would share one staging folder, and the second finds the first one's entry.
    pub(super) compiling: &'a Mutex<()>,
    /// The compile call in use ([`crate::probe::CompileCall`], probed).
    pub(super) call: crate::probe::CompileCall,
}

impl Builder<'_> {
    /// The program's compiled model: the cache's entry, else compiled now (counted against the
    /// cap) and installed. Returns it and whether it came from the cache.
    fn obtain(&self, plan: &CoreMlPlan, built: &mut Built) -> Result<(PathBuf, bool), EngineError> {
        if let Some(p) = self.cache.lookup(plan.key) {
            return Ok((p, true));
        }
        let _one = self.compiling.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = self.cache.lookup(plan.key) {
            return Ok((p, true));
        }
        self.cap.take()?;
        let io = |what: &str, e: std::io::Error| {
            EngineError::Compile(format!("{what} in {}: {e}", self.cache.root().display()))
        };
        let staging = self
            .cache
            .staging(plan.key)
            .map_err(|e| io("staging folder", e))?;
        let package = staging.join("model.mlpackage");
        let r = self
            .steps
            .run("package", || plan.write_package(&package))
            .and_then(|()| {
                self.steps.run("compile", || {
                    client::compile_model_with(&package, self.call)
                })
            })
            .and_then(|out| {
                built.compiles += 1;
                self.cache
                    .install(plan.key, &out)
                    .map_err(|e| io(&format!("installing {}", out.display()), e))
            });
        self.cache.discard(&staging);
        r.map(|p| (p, false))
    }

    fn load(
        &self,
        compiled: &std::path::Path,
        config: &MLModelConfiguration,
    ) -> Result<Retained<MLModel>, EngineError> {
        self.steps
            .run("load", || client::load_model(compiled, config))
    }

    /// Compiled model (cache or compile), then load (a cached model that fails is discarded and
    /// compiled once more: [`on_load_failure`]). The compute plan is not read here
    /// ([`LoadedModel::read_placement`]).
    pub(super) fn build(&self, plan: CoreMlPlan) -> Result<(LoadedModel, Built), EngineError> {
        let mut built = Built::default();
        let config = client::configuration()?;
        let (mut compiled, mut from_cache) = self.obtain(&plan, &mut built)?;
        let model = match self.load(&compiled, &config) {
            Ok(m) => m,
            Err(e) => match on_load_failure(from_cache) {
                LoadFailure::Fail => return Err(e),
                LoadFailure::DiscardAndRecompile => {
                    tracing::warn!(
                        "ggml-ane: cached Core ML model {} failed to load ({e}); compiling again",
                        compiled.display()
                    );
                    self.cache.discard(&compiled);
                    (compiled, from_cache) = self.obtain(&plan, &mut built)?;
                    self.load(&compiled, &config)?
                }
            },
        };
        built.from_cache = from_cache;
        Ok((
            LoadedModel {
                steps: self.steps.clone(),
                plan: plan.loaded(),
                model: Some(model),
                compiled,
                config,
                placement: LazyPlacement::default(),
            },
            built,
        ))
    }
}

impl LoadedModel {
    /// The compute plan, read on the first call only (`coremldata.bin` checked first:
    /// [`crate::coreml_plan::plan_precheck`]); `None` when unreadable. Counts a caught exception
    /// in `exceptions`.
    pub(super) fn read_placement(&mut self, exceptions: &mut u64) -> Option<Vec<OpPlacement>> {
        let (compiled, config, steps) = (&self.compiled, &self.config, &self.steps);
        let r = self.placement.read(compiled, || {
            steps.run("compute_plan", || {
                autoreleasepool(|_| placement::placement(compiled, config))
            })
        });
        match r {
            Ok(p) => p,
            Err(e) => {
                if matches!(e, EngineError::Exception(_)) {
                    *exceptions += 1;
                }
                tracing::warn!("ggml-ane: Core ML compute plan unreadable: {e}");
                None
            }
        }
    }
}

impl Evaluate for LoadedModel {
    /// One prediction (`predict`), in an autorelease pool. Returns the bytes copied.
    fn evaluate(
        &mut self,
        inputs: &[&Surface],
        outputs: &mut [&mut Surface],
    ) -> Result<u64, EngineError> {
        autoreleasepool(|_| self.predict(inputs, outputs))
    }

    /// The features' sizes ([`CoreMlPlan::check_request`]).
    fn check_request(&self, inputs: &[usize], outputs: &[usize]) -> Result<(), EngineError> {
        self.plan.check_request(inputs, outputs)
    }
}

impl LoadedModel {
    /// One prediction: each input copied into a new fp16 `MLMultiArray`, the outputs copied
    /// back into their surfaces, packed. Surfaces are in binding order, checked against the plan
    /// by the caller. Returns the bytes copied.
    fn predict(
        &mut self,
        inputs: &[&Surface],
        outputs: &mut [&mut Surface],
    ) -> Result<u64, EngineError> {
        let model = self
            .model
            .as_ref()
            .ok_or_else(|| EngineError::Eval("the model was released".into()))?;
        let mut copied = 0u64;
        let arrays = self
            .plan
            .inputs
            .iter()
            .zip(inputs)
            .map(|(f, s)| {
                copied += f.bytes as u64;
                arrays::input(f, s.bytes())
            })
            .collect::<Result<Vec<_>, _>>()?;
        let provider = arrays::provider(&self.plan.inputs, &arrays)?;
        let out = client::predict(model, arrays::as_provider(&provider))?;
        for (f, s) in self.plan.outputs.iter().zip(outputs.iter_mut()) {
            arrays::output(&out, f, s.bytes_mut())?;
            copied += f.bytes as u64;
        }
        Ok(copied)
    }
}

impl Release for LoadedModel {
    /// Drops the `MLModel` (its last strong reference: Core ML unloads it).
    fn release(&mut self) {
        let model = self.model.take();
        autoreleasepool(|_| {
            let r = self.steps.run("unload", || {
                client::guarded("MLModel release", move || drop(model))
            });
            if let Err(e) = r {
                tracing::warn!("ggml-ane: {e}");
            }
        });
    }
}
