//! A hard cap on compiles per process, below the ANE's leak.
//!
//! Every public project on the private API reports that a process stops being able to compile
//! (and then to load) after about 119 compiles, unloads or not: the framework leaks per compile.
//! The plugin compiles one program per shape bucket, a few dozen for a model, so the cap is never
//! reached in normal use; a runaway (shapes that keep changing, a bug in the bucketing) must not
//! walk the device into that state, where it fails in ways nobody has characterised. Past the cap
//! a compile is refused with [`EngineError::CompileCap`] before reaching the framework; the plugin
//! counts that as an engine failure, falls back, and gives the device up after a run of them.
//! Attempts count, not successes: a failed compile costs the framework the same.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::EngineError;

/// Compiles allowed per process (per engine: each engine is opened once per process).
pub const MAX_COMPILES: u64 = 100;

/// Compile attempts so far against a cap.
#[derive(Debug)]
pub struct CompileCap {
    max: u64,
    used: AtomicU64,
}

impl Default for CompileCap {
    fn default() -> Self {
        CompileCap::new(MAX_COMPILES)
    }
}

impl CompileCap {
    /// A cap of `max` attempts.
    pub fn new(max: u64) -> Self {
        CompileCap {
            max,
            used: AtomicU64::new(0),
        }
    }

    /// Takes one attempt, or refuses when the cap is spent.
    ///
    /// # Errors
    /// [`EngineError::CompileCap`] once `max` attempts were taken.
    pub fn take(&self) -> Result<(), EngineError> {
        self.used
            .fetch_update(Relaxed, Relaxed, |n| (n < self.max).then_some(n + 1))
            .map(|_| ())
            .map_err(|_| EngineError::CompileCap { max: self.max })
    }

    /// Attempts taken.
    pub fn used(&self) -> u64 {
        self.used.load(Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_past_the_cap_and_stays_refused() {
        let c = CompileCap::new(3);
        for _ in 0..3 {
            c.take().unwrap();
        }
        for _ in 0..5 {
            assert!(matches!(c.take(), Err(EngineError::CompileCap { max: 3 })));
        }
        assert_eq!(c.used(), 3);
    }

    #[test]
    fn the_default_is_below_the_leak() {
        const { assert!(MAX_COMPILES < 119) };
        assert_eq!(CompileCap::default().used(), 0);
    }

    #[test]
    fn threads_never_overshoot() {
        let c = std::sync::Arc::new(CompileCap::new(50));
        let ok: usize = (0..8)
            .map(|_| {
                let c = c.clone();
                std::thread::spawn(move || (0..20).filter(|_| c.take().is_ok()).count())
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().unwrap())
            .sum();
        assert_eq!(ok, 50);
    }
}
