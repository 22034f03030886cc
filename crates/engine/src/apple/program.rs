//! One compiled, loaded program: model object, model directory, surfaces and its request.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use objc2::rc::Retained;
use objc2::runtime::AnyObject;

use super::client::Client;
use super::surface::{IoSurface, SharedSurface};
use crate::driver_plan::{
    with_one_retry, write_model_dir, DirRefcount, DriverPlan, LOAD_RETRY_DELAY_MS,
};
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
    inputs: Vec<IoSurface>,
    outputs: Vec<IoSurface>,
    /// Built once for this binding of surfaces and reused for every evaluation (§1.3.8).
    request: Retained<AnyObject>,
    /// Requests binding engine surfaces ([`SharedSurface`]) directly, by the surfaces' ids in
    /// binding order: one compiled model evaluated with different requests (§1.3.8, maderix's
    /// per-layer requests). See [`BoundRequest`].
    bound: HashMap<Vec<u64>, BoundRequest>,
    /// Direct-binding evaluations so far (least recently used eviction).
    tick: u64,
}

/// A cached direct-binding request. It retains its IOSurfaces (through the `_ANEIOSurfaceObject`s),
/// so it is purged as soon as one of its surfaces is dropped by the plugin (an evicted staged
/// weight, a scratch surface the pool let go), and the least recently used one goes when the cache
/// is full.
struct BoundRequest {
    request: Retained<AnyObject>,
    alive: Vec<Weak<()>>,
    used: u64,
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
    /// Descriptor, model, model directory, compile, load (one retry), surfaces, request.
    /// On failure everything done so far is undone (unload, directory released).
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
        let bound = steps.run("surfaces", || {
            let make = |n: usize| -> Result<Vec<IoSurface>, EngineError> {
                (0..n).map(|_| IoSurface::new(plan.surface_bytes)).collect()
            };
            let inputs = make(plan.inputs.len())?;
            let outputs = make(plan.outputs.len())?;
            let wrap = |v: &[IoSurface]| -> Result<Vec<Retained<AnyObject>>, EngineError> {
                v.iter().map(|s| client.io_object(s)).collect()
            };
            let request = client.request(&wrap(&inputs)?, &wrap(&outputs)?)?;
            Ok((inputs, outputs, request))
        });
        match bound {
            Ok((inputs, outputs, request)) => Ok((
                LoadedProgram {
                    // Loaded: the framework and the directory have the weights; keep no copy.
                    plan: plan.loaded(),
                    client: *client,
                    steps: steps.clone(),
                    dirs: dirs.clone(),
                    model,
                    dir,
                    inputs,
                    outputs,
                    request,
                    bound: HashMap::new(),
                    tick: 0,
                },
                times,
            )),
            Err(e) => {
                let _ = client.unload(&model, plan.qos);
                release_dir(&mut lock(), &dir);
                Err(e)
            }
        }
    }

    /// Evaluates with `inputs` and `outputs`, in binding order, checked against the plan by the
    /// caller. When all of them are this engine's surfaces they are bound directly (no copy);
    /// otherwise host surfaces are copied into the program's own surfaces and back. Returns the
    /// bytes copied.
    pub(super) fn evaluate(
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
        if let Some(key) = key {
            self.tick += 1;
            let tick = self.tick;
            let request = match self.bound.get_mut(&key) {
                Some(b) => {
                    b.used = tick;
                    b.request.clone()
                }
                None => {
                    fn own(s: &Surface) -> &SharedSurface {
                        shared(s).expect("checked above")
                    }
                    let ins = inputs
                        .iter()
                        .map(|s| client.io_object(own(s).io()))
                        .collect::<Result<Vec<_>, _>>()?;
                    let outs = outputs
                        .iter()
                        .map(|s| client.io_object(own(s).io()))
                        .collect::<Result<Vec<_>, _>>()?;
                    let request = client.request(&ins, &outs)?;
                    // Requests of dropped surfaces go first, then the least recently used.
                    self.bound
                        .retain(|_, b| b.alive.iter().all(|w| w.strong_count() > 0));
                    if self.bound.len() >= MAX_REQUESTS {
                        let oldest = self
                            .bound
                            .iter()
                            .min_by_key(|(_, b)| b.used)
                            .map(|(k, _)| k.clone());
                        if let Some(k) = oldest {
                            self.bound.remove(&k);
                        }
                    }
                    let alive = inputs
                        .iter()
                        .copied()
                        .chain(outputs.iter().map(|s| &**s))
                        .map(|s| own(s).liveness())
                        .collect();
                    self.bound.insert(
                        key,
                        BoundRequest {
                            request: request.clone(),
                            alive,
                            used: tick,
                        },
                    );
                    request
                }
            };
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
        let mut copied = 0;
        for ((b, io), host) in self.plan.inputs.iter().zip(&self.inputs).zip(inputs) {
            io.write(&host.bytes()[..b.bytes()])?;
            copied += b.bytes() as u64;
        }
        client.evaluate(&self.model, &self.request, self.plan.qos)?;
        for ((b, io), host) in self
            .plan
            .outputs
            .iter()
            .zip(&self.outputs)
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
