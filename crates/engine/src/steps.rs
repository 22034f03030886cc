//! A log of each call an engine made into its framework: step, result, time.
//!
//! The first run on a Mac is the one that counts, and it happens on someone else's machine. When
//! it fails, "compile failed" is not enough: the report (`ane doctor`, text and JSON) must say
//! which step of which program stopped, after which others succeeded, and how long each took. The
//! engines record every step (descriptor, model directory, compile, load, surfaces, request,
//! evaluate, unload for the ANE driver; the same names where they apply for the reference engine,
//! so the log's shape is tested on Linux). Bounded: the first [`MAX_RECORDS`] steps, then only
//! failures, up to as many again.

use std::sync::Mutex;
use std::time::Instant;

use crate::EngineError;

/// Steps kept in order from the start.
pub const MAX_RECORDS: usize = 64;

/// One step.
#[derive(Clone, Debug, PartialEq)]
pub struct StepRecord {
    /// What was called (`compile`, `load`, `evaluate`, ...).
    pub step: &'static str,
    /// Whether it succeeded.
    pub ok: bool,
    /// Wall time in ms.
    pub ms: f64,
    /// The error, when it failed.
    pub error: Option<String>,
}

/// The bounded log.
#[derive(Debug, Default)]
pub struct StepLog {
    records: Mutex<Vec<StepRecord>>,
}

impl StepLog {
    /// Runs `f` as `step`, recording its result and time.
    ///
    /// # Errors
    /// `f`'s error, unchanged.
    pub fn run<T>(
        &self,
        step: &'static str,
        f: impl FnOnce() -> Result<T, EngineError>,
    ) -> Result<T, EngineError> {
        let t = Instant::now();
        let r = f();
        self.push(StepRecord {
            step,
            ok: r.is_ok(),
            ms: t.elapsed().as_secs_f64() * 1e3,
            error: r.as_ref().err().map(ToString::to_string),
        });
        r
    }

    fn push(&self, rec: StepRecord) {
        let mut v = self.records.lock().unwrap_or_else(|e| e.into_inner());
        let failures_kept = v.iter().skip(MAX_RECORDS).count();
        if v.len() < MAX_RECORDS || (!rec.ok && failures_kept < MAX_RECORDS) {
            v.push(rec);
        }
    }

    /// The records so far.
    pub fn records(&self) -> Vec<StepRecord> {
        self.records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// The first failed step, as `step: error`, for a one-line verdict.
pub fn first_failure(records: &[StepRecord]) -> Option<String> {
    records
        .iter()
        .find(|r| !r.ok)
        .map(|r| format!("{}: {}", r.step, r.error.as_deref().unwrap_or("failed")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_results_and_names_the_first_failure() {
        let log = StepLog::default();
        log.run("compile", || Ok(())).unwrap();
        let e = log
            .run("load", || -> Result<(), _> {
                Err(EngineError::Load("status 0x1d".into()))
            })
            .unwrap_err();
        assert!(matches!(e, EngineError::Load(_)));
        let r = log.records();
        assert_eq!(r.len(), 2);
        assert!(r[0].ok && !r[1].ok);
        assert_eq!(
            first_failure(&r).as_deref(),
            Some("load: load failed: status 0x1d")
        );
    }

    #[test]
    fn bounded_but_keeps_late_failures() {
        let log = StepLog::default();
        for _ in 0..200 {
            log.run("evaluate", || Ok(())).unwrap();
        }
        let _ = log.run("unload", || -> Result<(), _> {
            Err(EngineError::Load("late".into()))
        });
        let r = log.records();
        assert_eq!(r.len(), MAX_RECORDS + 1);
        assert_eq!(r.last().unwrap().step, "unload");
    }
}
