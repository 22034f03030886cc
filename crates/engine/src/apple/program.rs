//! One compiled, loaded program: model object, model directory, surfaces and its request.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use objc2::rc::Retained;
use objc2::runtime::AnyObject;

use super::client::Client;
use super::surface::{IoSurface, SharedSurface};
use crate::driver_plan::{
    with_one_retry, write_model_dir, DirRefcount, DriverPlan, LOAD_RETRY_DELAY_MS,
};
use crate::engine_core::Evaluate;
use crate::request_cache::RequestCache;
use crate::resident::Release;
use crate::steps::StepLog;
use crate::{EngineError, Surface};

/// A loaded program. Everything in it is used only under its [`crate::resident::Resident`] mutex;
/// it is unloaded and its directory released when the last holder drops it ([`Release`]).
pub(super) struct LoadedProgram {
    client: Client,
    steps: Arc<StepLog>,
    dirs: Arc<Mutex<DirRefcount>>,
    pub(super) plan: DriverPlan,
    model: Retained<AnyObject>,
    pub(super) dir: PathBuf,
    /// The program's own surfaces and their request, for host [`Surface`]s (canaries,
    /// `ane bench`): made on first copy-path use, never for a program only bound directly.
    copy: Option<CopyPath>,
    /// Requests binding engine surfaces ([`SharedSurface`]) directly, by the surfaces' ids in
    /// binding order: one compiled model evaluated with different requests (§1.3.8, maderix's
    /// per-layer requests). A request retains its IOSurfaces, so entries of dropped surfaces are
    /// purged on every bound evaluation ([`RequestCache`]).
    bound: RequestCache<Retained<AnyObject>>,
}

/// One flat IOSurface per binding, and the request built once over them.
struct CopyPath {
    inputs: Vec<IoSurface>,
    outputs: Vec<IoSurface>,
    request: Retained<AnyObject>,
}

/// Cached direct-binding requests per program: a model's layers share programs (one request per
/// weight group and scratch pair; 80 layers for a 70B model, twice with two threads).
const MAX_REQUESTS: usize = 256;

fn shared(s: &Surface) -> Option<&SharedSurface> {
    s.engine_memory()?.as_any().downcast_ref::<SharedSurface>()
}

// SAFETY: the model and request objects are only messaged while the program's mutex is held, so
// no two threads use them at once; Objective-C retain/release are thread-safe.
unsafe impl Send for LoadedProgram {}

/// Timings of the steps of [`LoadedProgram::build`], for `ane doctor`.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct BuildTimes {
    pub(super) compile: Duration,
    pub(super) load: Duration,
}

impl LoadedProgram {
    /// Descriptor, model, model directory, compile, load (one retry); the copy path's surfaces
    /// wait for their first use. On failure everything done so far is undone (unload, directory
    /// released).
    pub(super) fn build(
        client: &Client,
        plan: DriverPlan,
        dirs: &Arc<Mutex<DirRefcount>>,
        steps: &Arc<StepLog>,
    ) -> Result<(LoadedProgram, BuildTimes), EngineError> {
        let lock = || dirs.lock().unwrap_or_else(|e| e.into_inner());
        let model = steps.run("descriptor", || client.model(&plan))?;
        let hex = steps.run("identifier", || client.hex_identifier(&model))?;
        let dir = client.model_dir(&model, &hex);
        // The files are written under the directory lock: a second builder of the same program
        // waits for them to be complete.
        steps.run("model_dir", || {
            DirRefcount::acquire_and_write(
                dirs,
                &dir,
                || write_model_dir(&dir, &plan),
                crate::model_dir::remove,
            )
        })?;
        let mut times = BuildTimes::default();
        let t = std::time::Instant::now();
        let done = steps
            .run("compile", || client.compile(&model, plan.qos))
            .and_then(|()| {
                times.compile = t.elapsed();
                let t = std::time::Instant::now();
                let r = steps.run("load", || {
                    with_one_retry(
                        || client.load(&model, plan.qos),
                        || std::thread::sleep(Duration::from_millis(LOAD_RETRY_DELAY_MS)),
                    )
                });
                times.load = t.elapsed();
                r
            });
        if let Err(e) = done {
            release_dir(&mut lock(), &dir);
            return Err(e);
        }
        Ok((
            LoadedProgram {
                // Loaded: the framework and the directory have the weights; keep no copy.
                plan: plan.loaded(),
                client: *client,
                steps: steps.clone(),
                dirs: dirs.clone(),
                model,
                dir,
                copy: None,
                bound: RequestCache::new(MAX_REQUESTS),
            },
            times,
        ))
    }

    /// The copy path's surfaces and request, made on first use (step `surfaces`).
    fn make_copy_path(&mut self, client: &Client) -> Result<(), EngineError> {
        if self.copy.is_none() {
            let plan = &self.plan;
            let made = self.steps.run("surfaces", || {
                // One size each, or ascending inputs / descending outputs (probed).
                let (ins, outs) = plan.surface_sizes();
                let make = |sizes: &[usize]| -> Result<Vec<IoSurface>, EngineError> {
                    sizes.iter().map(|&n| IoSurface::new(n)).collect()
                };
                let inputs = make(&ins)?;
                let outputs = make(&outs)?;
                let wrap = |v: &[IoSurface]| -> Result<Vec<Retained<AnyObject>>, EngineError> {
                    v.iter().map(|s| client.io_object(s)).collect()
                };
                let request = client.request(&wrap(&inputs)?, &wrap(&outputs)?)?;
                Ok(CopyPath {
                    inputs,
                    outputs,
                    request,
                })
            })?;
            self.copy = Some(made);
        }
        Ok(())
    }
}

impl Evaluate for LoadedProgram {
    fn check_request(&self, inputs: &[usize], outputs: &[usize]) -> Result<(), EngineError> {
        self.plan.check_request(inputs, outputs)
    }

    /// Evaluates with `inputs` and `outputs`, in binding order, checked against the plan by the
    /// caller. When all of them are this engine's surfaces they are bound directly (no copy);
    /// otherwise host surfaces are copied into the program's own surfaces and back. Returns the
    /// bytes copied.
    fn evaluate(
        &mut self,
        inputs: &[&Surface],
        outputs: &mut [&mut Surface],
    ) -> Result<u64, EngineError> {
        let client = self.client;
        objc2::rc::autoreleasepool(|_| self.evaluate_with(&client, inputs, outputs))
    }
}

impl LoadedProgram {
    fn evaluate_with(
        &mut self,
        client: &Client,
        inputs: &[&Surface],
        outputs: &mut [&mut Surface],
    ) -> Result<u64, EngineError> {
        let key: Option<Vec<u64>> = inputs
            .iter()
            .copied()
            .chain(outputs.iter().map(|s| &**s))
            .map(|s| shared(s).map(SharedSurface::id))
            .collect();
        // Direct binding only with surfaces of one size: under the ascending order the plugin's
        // one-size surfaces are copied through the program's own.
        let key = key.filter(|_| self.plan.order == crate::probe::SurfaceOrder::Equal);
        if let Some(key) = key {
            fn own(s: &Surface) -> &SharedSurface {
                shared(s).expect("checked above")
            }
            let bound = || inputs.iter().copied().chain(outputs.iter().map(|s| &**s));
            // Entries of dropped surfaces are purged here, on every bound evaluation.
            let request = self.bound.get_or_make(
                key,
                || bound().map(|s| own(s).liveness()).collect(),
                || {
                    let ins = inputs
                        .iter()
                        .map(|s| client.io_object(own(s).io()))
                        .collect::<Result<Vec<_>, _>>()?;
                    let outs = outputs
                        .iter()
                        .map(|s| client.io_object(own(s).io()))
                        .collect::<Result<Vec<_>, _>>()?;
                    client.request(&ins, &outs)
                },
            )?;
            // Unlocked for the evaluation; relocked when the CPU next touches them.
            let _ins = inputs
                .iter()
                .map(|s| s.for_device())
                .collect::<Result<Vec<_>, _>>()?;
            let _outs = outputs
                .iter_mut()
                .map(|s| s.for_device_mut())
                .collect::<Result<Vec<_>, _>>()?;
            client.evaluate(&self.model, &request, self.plan.qos)?;
            return Ok(0);
        }
        self.make_copy_path(client)?;
        let (model, qos) = (&self.model, self.plan.qos);
        let copy = self.copy.as_ref().expect("made just above");
        let plan = &self.plan;
        let mut copied = 0;
        for ((b, io), host) in plan.inputs.iter().zip(&copy.inputs).zip(inputs) {
            io.write(&host.bytes()[..b.bytes()])?;
            copied += b.bytes() as u64;
        }
        client.evaluate(model, &copy.request, qos)?;
        for ((b, io), host) in plan
            .outputs
            .iter()
            .zip(&copy.outputs)
            .zip(outputs.iter_mut())
        {
            io.read(&mut host.bytes_mut()[..b.bytes()])?;
            copied += b.bytes() as u64;
        }
        Ok(copied)
    }
}

impl Release for LoadedProgram {
    /// `unloadWithQoS:error:`, then the directory is released (removed by its last holder).
    /// Surfaces and cached requests are released when the fields drop, right after.
    fn release(&mut self) {
        objc2::rc::autoreleasepool(|_| {
            if let Err(e) = self
                .steps
                .run("unload", || self.client.unload(&self.model, self.plan.qos))
            {
                tracing::warn!("ggml-ane: {e}");
            }
        });
        self.bound.clear();
        release_dir(
            &mut self.dirs.lock().unwrap_or_else(|e| e.into_inner()),
            &self.dir,
        );
    }
}

fn release_dir(dirs: &mut DirRefcount, dir: &std::path::Path) {
    if dirs.release(dir) {
        crate::model_dir::remove(dir);
    }
}
