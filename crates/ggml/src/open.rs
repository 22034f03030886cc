//! Which engine the device runs on, chosen once when the device is first used.
//!
//! `GGML_ANE_ENGINE=reference` takes the CPU reference engine as it is. Otherwise the candidates
//! (the private ANE API, then Core ML; or the one forced) go through `ane_plan::choice`: canaries
//! against the reference engine, and for Core ML a compute plan with the matmul on the Neural
//! Engine. What was tried is kept for the stats (`engine_choice`).

use std::sync::{Arc, OnceLock};

use ane_engine::reference::ReferenceEngine;
use ane_engine::{Engine, EngineError};
use ane_plan::choice::{Candidate, EngineKind, Requirements};

use crate::config::{self, Config, EngineChoice};
use crate::stats;

/// Opens the engine chosen by the configuration.
///
/// # Errors
/// [`EngineError::Unavailable`] when the chosen engine cannot run here.
pub fn open_engine(cfg: &Config) -> Result<Arc<dyn Engine>, EngineError> {
    let reference = || {
        let limits = cfg.chip.limits();
        let engine = match cfg.faults {
            Some(f) => ReferenceEngine::with_faults(limits, f),
            None => ReferenceEngine::new(limits),
        };
        let numerics = ane_engine::reference::Numerics {
            accum: cfg.ref_accum,
            ..Default::default()
        };
        Arc::new(engine.numerics(numerics).for_chip(cfg.chip)) as Arc<dyn Engine>
    };
    match cfg.engine {
        EngineChoice::Reference => Ok(reference()),
        choice => open_engine_with(candidates(choice), cfg),
    }
}

/// The engines to try for a `GGML_ANE_ENGINE` setting, in the order of `ane_plan::choice`.
fn candidates(choice: EngineChoice) -> Vec<Candidate<'static>> {
    let ane = || Candidate {
        kind: EngineKind::Ane,
        open: Box::new(open_private_api),
    };
    let coreml = || Candidate {
        kind: EngineKind::CoreMl,
        open: Box::new(open_coreml),
    };
    match choice {
        EngineChoice::Ane => vec![ane()],
        EngineChoice::CoreMl => vec![coreml()],
        EngineChoice::Auto | EngineChoice::Reference => vec![ane(), coreml()],
    }
}

/// The first candidate that passes its canaries (`ane_plan::choice::choose`), or the reasons of
/// each, which `ggml_backend_score` prints once while declining. What was tried is kept for stats.
pub(crate) fn open_engine_with(
    candidates: Vec<Candidate<'_>>,
    cfg: &Config,
) -> Result<Arc<dyn Engine>, EngineError> {
    let req = Requirements {
        layout: cfg.layout,
        compressed: cfg.weights == config::WeightsMode::Compressed,
        forced: cfg.engine != EngineChoice::Auto,
    };
    let choice = ane_plan::choice::choose(candidates, req);
    for a in &choice.attempts {
        if let Some(note) = &a.note {
            eprintln!("ggml-ane: {}: {note}", a.kind.title());
        }
    }
    let attempts = choice.attempts.iter().map(stats::Attempt::from).collect();
    let _ = ATTEMPTS.set(attempts);
    match choice.engine {
        Some((_, engine)) => Ok(engine),
        None => Err(EngineError::Unavailable(choice.reasons())),
    }
}

/// The engines tried at open and how each fared (stats `engine_choice`).
static ATTEMPTS: OnceLock<Vec<stats::Attempt>> = OnceLock::new();

pub(crate) fn engine_attempts() -> &'static [stats::Attempt] {
    ATTEMPTS.get().map_or(&[], Vec::as_slice)
}

#[cfg(target_vendor = "apple")]
fn open_private_api() -> Result<Arc<dyn Engine>, EngineError> {
    Ok(ane_engine::apple::open()? as Arc<dyn Engine>)
}

#[cfg(target_vendor = "apple")]
fn open_coreml() -> Result<Arc<dyn Engine>, EngineError> {
    Ok(ane_engine::coreml::open()? as Arc<dyn Engine>)
}

#[cfg(not(target_vendor = "apple"))]
fn open_private_api() -> Result<Arc<dyn Engine>, EngineError> {
    Err(EngineError::Unavailable(
        "not macOS (set GGML_ANE_ENGINE=reference to use the CPU reference engine)".into(),
    ))
}

#[cfg(not(target_vendor = "apple"))]
fn open_coreml() -> Result<Arc<dyn Engine>, EngineError> {
    Err(EngineError::Unavailable("not macOS".into()))
}

#[cfg(test)]
mod tests;
