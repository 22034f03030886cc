//! When to stop offering the device: a run of engine failures.
//!
//! In the field the ANE can fail for good (a macOS update breaks the private API, the compile
//! budget is spent, the driver wedges). Then every claimed MUL_MAT pays for a conversion and a
//! failed dispatch before the CPU computes it. After [`Health::new`]'s `limit` failures in a row
//! the device is *off*: `supports_op` declines, so the scheduler keeps the work on the CPU backend
//! with no detour at all, and nodes already routed here (a reused graph) go straight to the CPU.
//! One success resets the run, so a transient fault never switches a healthy device off. Numeric
//! guard trips are data, not device failures, and do not count.
//!
//! A device that keeps failing but may not give up (`GGML_ANE_GIVE_UP=0`, or a run shorter than
//! the limit) is retried with back-off: after [`BACKOFF_AFTER`] failures in a row only one group
//! in [`RETRY_EVERY`] is tried on the device, the others go to the CPU without converting or
//! dispatching anything, so a failing device costs close to nothing; one success ends it.
//!
//! A shape the device's compiler rejects is not a dead device: its compile failure is remembered
//! (`matmul::KernelCache`) and its repeats do not count toward the run. Once a MUL_MAT of given
//! types and dimensions was computed entirely on the CPU because of such a remembered failure,
//! [`Health::reject`] records it and `supports_op` declines it from then on (`shape_failed`), so
//! the scheduler keeps that op on the CPU backend with no copies.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::Relaxed};
use std::sync::Mutex;

use ane_engine::EngineError;

use crate::support::TensorDesc;

/// A MUL_MAT as `supports_op` sees it: src0's type and dimensions, src1's dimensions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct OpKey {
    ty: i32,
    src0: [i64; 4],
    src1: [i64; 4],
}

impl OpKey {
    /// The key of `src0 x src1`.
    pub fn of(src0: &TensorDesc, src1: &TensorDesc) -> Self {
        OpKey {
            ty: src0.ty,
            src0: src0.ne,
            src1: src1.ne,
        }
    }
}

/// Failures in a row after which the device is tried only now and then ([`Health::should_try`]).
pub const BACKOFF_AFTER: u32 = 8;

/// During back-off, one group in this many is tried on the device.
pub const RETRY_EVERY: u32 = 16;

/// The device's failure run, whether it gave up, and the ops it cannot compute.
#[derive(Debug, Default)]
pub struct Health {
    limit: u32,
    run: AtomicU32,
    off: AtomicBool,
    skipped: AtomicU32,
    rejected: Mutex<HashSet<OpKey>>,
}

impl Health {
    /// Gives up after `limit` failures in a row; `0` never does.
    pub fn new(limit: u32) -> Self {
        Health {
            limit,
            ..Health::default()
        }
    }

    /// Failures in a row that turn the device off (`0`: never).
    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// A dispatch succeeded.
    pub fn ok(&self) {
        self.run.store(0, Relaxed);
    }

    /// A dispatch failed with `e`. True exactly once: when this failure turns the device off.
    pub fn failed(&self, e: &EngineError) -> bool {
        if crate::guard::is_trip(e) {
            return false;
        }
        let n = self.run.fetch_add(1, Relaxed) + 1;
        self.limit > 0 && n >= self.limit && !self.off.swap(true, Relaxed)
    }

    /// Whether the next group should try the device: always, unless the last
    /// [`BACKOFF_AFTER`] dispatches or more all failed; then one call in [`RETRY_EVERY`].
    pub fn should_try(&self) -> bool {
        if !self.backing_off() {
            return true;
        }
        self.skipped.fetch_add(1, Relaxed) % RETRY_EVERY == RETRY_EVERY - 1
    }

    /// Whether the device is in back-off: the last [`BACKOFF_AFTER`] dispatches or more all
    /// failed. The rest of a group stops trying the device then.
    pub fn backing_off(&self) -> bool {
        self.run.load(Relaxed) >= BACKOFF_AFTER
    }

    /// The device gave up: claim nothing, compute what arrives on the CPU.
    pub fn is_off(&self) -> bool {
        self.off.load(Relaxed)
    }

    /// `op` failed for good (every dispatch of it hit a remembered compile failure): decline it
    /// from now on. True the first time, so the caller logs it once.
    pub fn reject(&self, op: OpKey) -> bool {
        self.rejected
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(op)
    }

    /// Whether `op` was rejected.
    pub fn is_rejected(&self, op: &OpKey) -> bool {
        self.rejected
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(op)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eval() -> EngineError {
        EngineError::Eval("injected".into())
    }

    #[test]
    fn a_run_of_failures_turns_it_off_once() {
        let h = Health::new(3);
        assert!(!h.failed(&eval()) && !h.failed(&eval()));
        assert!(!h.is_off());
        assert!(h.failed(&eval()), "the third in a row turns it off");
        assert!(h.is_off());
        assert!(!h.failed(&eval()), "said once");
    }

    #[test]
    fn one_success_resets_the_run() {
        let h = Health::new(3);
        for _ in 0..10 {
            assert!(!h.failed(&eval()));
            assert!(!h.failed(&eval()));
            h.ok();
        }
        assert!(!h.is_off());
    }

    #[test]
    fn guard_trips_and_limit_zero_never_count() {
        let h = Health::new(1);
        let stats = crate::stats::Stats::default();
        for _ in 0..5 {
            assert!(!h.failed(&crate::guard::trip(&stats, "src1 out of fp16 range")));
        }
        assert!(!h.is_off());
        let never = Health::new(0);
        for _ in 0..100 {
            assert!(!never.failed(&eval()));
        }
        assert!(!never.is_off());
    }

    #[test]
    fn a_failing_device_is_retried_with_back_off_until_it_works() {
        let h = Health::new(0);
        for _ in 0..BACKOFF_AFTER {
            assert!(h.should_try());
            h.failed(&eval());
        }
        let tries = (0..RETRY_EVERY * 4).filter(|_| h.should_try()).count();
        assert_eq!(tries, 4, "one in RETRY_EVERY");
        h.ok();
        assert!(
            (0..10).all(|_| h.should_try()),
            "a success ends the back-off"
        );
    }

    #[test]
    fn a_rejected_op_is_declined_by_its_dimensions() {
        let h = Health::new(3);
        let w = TensorDesc::contiguous(0, 4, [64, 72, 1, 1]);
        let x = TensorDesc::contiguous(0, 4, [64, 512, 1, 1]);
        let other = TensorDesc::contiguous(0, 4, [64, 511, 1, 1]);
        assert!(!h.is_rejected(&OpKey::of(&w, &x)));
        assert!(h.reject(OpKey::of(&w, &x)));
        assert!(!h.reject(OpKey::of(&w, &x)), "said once");
        assert!(h.is_rejected(&OpKey::of(&w, &x)));
        assert!(!h.is_rejected(&OpKey::of(&w, &other)));
        assert!(!h.is_off(), "a rejected shape leaves the device on");
    }
}
