//! Which engine runs the plugin's programs: the private API, Core ML, or none.
//!
//! The private `_ANEInMemoryModel` API is the fastest path but breaks with macOS releases; Core ML
//! is public and lasting but may place work on the CPU. So at open the plugin tries, in order:
//! 1. the private API, if its canaries pass (numbers within tolerance of the reference engine);
//! 2. Core ML, if its canaries pass *and* its compute plan puts the matmul on the Neural Engine;
//! 3. nothing: the device declines, and the reason names each engine's failure.
//!
//! `GGML_ANE_ENGINE=ane|coreml` forces one candidate (a forced Core ML whose compute plan cannot be
//! read, before macOS 14.4, is accepted with a warning; a plan that puts work elsewhere is not).
//! Before its canaries each candidate is probed ([`crate::probe`]): the forms of the conflicting
//! third-party reports it follows (MIL dialect and surface order for the private API, the compile
//! call for Core ML) are settled on the machine, the conservative ones first, and the canaries
//! then run in the winning forms.
//!
//! Everything here is platform-neutral: candidates are closures opening engines, so tests stand
//! the reference engine (with injected faults) in for either one.

use std::sync::Arc;

use ane_engine::coreml_plan::{self, OpPlacement};
use ane_engine::{Engine, EngineError};

use crate::canary::{compressed_canary, shape_shared_canary, Surfaces};
use crate::probe::{run_probes_with, ProbeReport, ProbeStore};
use crate::Layout;

/// An engine the plugin can run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineKind {
    /// The private-API ANE driver.
    Ane,
    /// Core ML with `CPUAndNeuralEngine`.
    CoreMl,
}

impl EngineKind {
    /// Name in stats, reports and `GGML_ANE_ENGINE`.
    pub fn name(self) -> &'static str {
        match self {
            EngineKind::Ane => "ane",
            EngineKind::CoreMl => "coreml",
        }
    }

    /// What users call it.
    pub fn title(self) -> &'static str {
        match self {
            EngineKind::Ane => "private ANE API",
            EngineKind::CoreMl => "Core ML",
        }
    }
}

/// Opens an engine, or says why it cannot run here.
pub type Opener<'a> = Box<dyn FnOnce() -> Result<Arc<dyn Engine>, EngineError> + 'a>;

/// One engine to try.
pub struct Candidate<'a> {
    /// Which engine.
    pub kind: EngineKind,
    /// Opens it.
    pub open: Opener<'a>,
}

/// What the checks require of every candidate.
#[derive(Clone, Copy, Debug)]
pub struct Requirements {
    /// The layout the plugin dispatches in (the shape-shared canary runs in it).
    pub layout: Layout,
    /// `GGML_ANE_WEIGHTS=compressed`: the baked compressed-weight canary must pass too.
    pub compressed: bool,
    /// The candidate was forced (`GGML_ANE_ENGINE`): an unreadable compute plan is accepted.
    pub forced: bool,
}

/// How one candidate fared.
#[derive(Clone, Debug)]
pub struct Attempt {
    /// Which engine.
    pub kind: EngineKind,
    /// `Ok` if chosen, else the reason in one line.
    pub outcome: Result<(), String>,
    /// Where its canary program's operations ran (Core ML), when known.
    pub placement: Option<Vec<OpPlacement>>,
    /// A note for a chosen engine (host surfaces, unreadable compute plan, a probed form other
    /// than the conservative one), said once.
    pub note: Option<String>,
    /// What probing the conflicting reports did on it ([`crate::probe`]); `None` when it did
    /// not open.
    pub probes: Option<ProbeReport>,
}

/// The choice: the engine, if any, and every attempt in order.
pub struct Choice {
    /// The chosen engine and its kind.
    pub engine: Option<(EngineKind, Arc<dyn Engine>)>,
    /// Each candidate tried, in order.
    pub attempts: Vec<Attempt>,
}

impl Choice {
    /// One line saying why no engine was chosen: each attempt's reason.
    pub fn reasons(&self) -> String {
        self.attempts
            .iter()
            .filter_map(|a| {
                a.outcome
                    .as_ref()
                    .err()
                    .map(|e| format!("{}: {e}", a.kind.title()))
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// Tries the candidates in order and keeps the first that passes [`check`], probing with the
/// process's store ([`ProbeStore::process`]).
pub fn choose(candidates: Vec<Candidate<'_>>, req: Requirements) -> Choice {
    choose_with(candidates, req, ProbeStore::process())
}

/// [`choose`] with the probe decisions and budget of `store`.
pub fn choose_with(
    candidates: Vec<Candidate<'_>>,
    req: Requirements,
    store: &ProbeStore,
) -> Choice {
    let mut attempts = Vec::new();
    for c in candidates {
        let engine = match (c.open)() {
            Ok(e) => e,
            Err(e) => {
                let why = match e {
                    EngineError::Unavailable(why) => why,
                    e => e.to_string(),
                };
                attempts.push(Attempt {
                    kind: c.kind,
                    outcome: Err(why),
                    placement: None,
                    note: None,
                    probes: None,
                });
                continue;
            }
        };
        let checked = check_with(c.kind, engine.as_ref(), req, store);
        let ok = checked.outcome.is_ok();
        attempts.push(checked);
        if ok {
            return Choice {
                engine: Some((c.kind, engine)),
                attempts,
            };
        }
    }
    Choice {
        engine: None,
        attempts,
    }
}

/// The checks one engine must pass, after its probes ([`crate::probe`], the process's store):
/// the baked canary, the shape-shared canary in the plugin's layout (with the engine's own
/// surfaces, else host copies), the compressed canary when asked, and for Core ML the compute
/// plan of the shape-shared program.
pub fn check(kind: EngineKind, engine: &dyn Engine, req: Requirements) -> Attempt {
    check_with(kind, engine, req, ProbeStore::process())
}

/// [`check`] with the probe decisions and budget of `store`.
pub fn check_with(
    kind: EngineKind,
    engine: &dyn Engine,
    req: Requirements,
    store: &ProbeStore,
) -> Attempt {
    let probes = run_probes_with(engine, store, crate::probe::probe_canary);
    let mut attempt = Attempt {
        kind,
        outcome: Ok(()),
        placement: None,
        note: probes.note(),
        probes: Some(probes),
    };
    let add_note = |a: &mut Attempt, n: String| {
        a.note = Some(match a.note.take() {
            Some(p) => format!("{p}; {n}"),
            None => n,
        });
    };
    let fail = |mut a: Attempt, why: String| {
        a.outcome = Err(why);
        a
    };
    match crate::canary::canary(engine) {
        Ok(r) if r.ok => {}
        Ok(r) => {
            return fail(
                attempt,
                format!(
                    "the canary program gave wrong numbers (max relative error {:.3e} > {:.0e})",
                    r.max_rel_err,
                    crate::canary::CANARY_TOLERANCE
                ),
            )
        }
        Err(e) => return fail(attempt, format!("the canary program failed: {e}")),
    }
    match shape_shared_canary(engine, req.layout) {
        Ok((t, surfaces, why)) if t.ok => {
            if let (Surfaces::Host, Some(why)) = (surfaces, why) {
                add_note(
                    &mut attempt,
                    format!(
                    "direct IOSurface binding failed its canary ({why}); copying surfaces per dispatch"
                ),
                );
            }
        }
        Ok((t, _, _)) => {
            return fail(
                attempt,
                format!(
                    "wrong numbers for the shape-shared program ({:?} layout, max relative error {:.3e})",
                    req.layout, t.max_rel_err
                ),
            )
        }
        Err(e) => return fail(attempt, format!("the shape-shared program failed: {e}")),
    }
    if req.compressed {
        match compressed_canary(engine) {
            Ok(c) if c.ok => {}
            Ok(c) => {
                return fail(
                    attempt,
                    format!(
                        "wrong numbers for compressed weights (max relative error {:.3e}); unset GGML_ANE_WEIGHTS",
                        c.max_rel_err
                    ),
                )
            }
            Err(e) => {
                return fail(
                    attempt,
                    format!("the compressed-weight program failed ({e}); unset GGML_ANE_WEIGHTS"),
                )
            }
        }
    }
    if kind == EngineKind::CoreMl {
        let placement = match placement_canary(engine, req.layout) {
            Ok(p) => p,
            Err(e) => return fail(attempt, format!("its compute plan program failed: {e}")),
        };
        attempt.placement.clone_from(&placement);
        match (coreml_plan::verdict(placement.as_deref()), placement) {
            (Ok(()), _) => {}
            (Err(why), None) if req.forced => {
                add_note(&mut attempt, format!("forced although {why}"));
            }
            (Err(why), _) => return fail(attempt, why),
        }
    }
    attempt
}

/// Compiles the plugin's shape-shared program for a typical prefill tile (`256 x 256 x 128`) and
/// asks the engine where its operations run.
///
/// # Errors
/// Whatever the engine's compile returns.
pub fn placement_canary(
    engine: &dyn Engine,
    layout: Layout,
) -> Result<Option<Vec<OpPlacement>>, EngineError> {
    let planner = crate::Planner {
        layout,
        ..crate::Planner::new(engine.limits())
    };
    let s = planner.tile(256, 256, 128);
    let id = engine.compile(&ane_mil::text::emit(&ane_mil::build::tiled_matmul(s)), &[])?;
    // Read now, once: the compute plan is never asked for on the dispatch path.
    let placement = engine.read_op_placement(id);
    engine.unload(id);
    Ok(placement)
}

#[cfg(test)]
mod tests;
