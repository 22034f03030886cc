//! The numeric guard: values the ANE cannot represent or compute are sent to the CPU path.
//!
//! The ANE computes in fp16 (ane-private-api.md §5.4), which fails in two documented ways:
//! - **conversion overflow**: an input of magnitude above 65504 becomes ±inf when it is written
//!   to an fp16 surface, and a non-finite input poisons every output it touches;
//! - **the matmul output cliff**: an output of magnitude about 32752 or more becomes ±inf,
//!   independent of K (measured on M1 to M5 Pro).
//!
//! Neither is an engine *error*: the chip returns success and wrong numbers. So [`dispatch`]
//! checks the activations (and weights converted per call) before it hands them over and the
//! outputs after, and on a trip recomputes that dispatch's columns on the CPU with f32
//! accumulation, which is what the CPU backend would have produced. Staged weights are checked
//! only through the outputs (a weight above 65504 gives an inf or NaN output), to avoid scanning
//! every weight matrix on every call.
//!
//! Scaling the inputs to stay in range was considered and not done: one power-of-two scale per
//! dispatch fixes the output cliff only when the largest output is known beforehand, which it is
//! not, and costs a second pass over the activations on every call. A trip is rare (the reference
//! models it; llama's RMS-normalised activations stay far below the limits), so recomputing is
//! cheaper than scaling everything.
//!
//! [`dispatch`]: crate::matmul

use std::sync::atomic::Ordering::Relaxed;

use ane_engine::reference::MATMUL_OUTPUT_CLIFF;
use ane_engine::EngineError;
use half::f16;

use crate::stats::Stats;

/// The largest finite fp16 value; larger magnitudes convert to ±inf.
pub const FP16_MAX: f32 = 65504.0;

/// True when every value converts to a finite fp16 (finite and |x| <= 65504).
pub fn input_ok(values: &[f32]) -> bool {
    // `!(a > b)` instead of `a <= b` would let NaN through; `abs() <= MAX` is false for NaN.
    values.iter().all(|v| v.abs() <= FP16_MAX)
}

/// True when every converted value is finite (no ±inf from an overflowing conversion, no NaN).
pub fn fp16_ok(values: &[f16]) -> bool {
    values.iter().all(|v| v.is_finite())
}

/// True when every output is finite and below the matmul output cliff.
pub fn output_ok(values: &[f16]) -> bool {
    values
        .iter()
        .all(|v| v.to_f32().abs() < MATMUL_OUTPUT_CLIFF)
}

/// Counts a trip and returns the error that sends the dispatch to the CPU path.
pub fn trip(stats: &Stats, what: &str) -> EngineError {
    stats.guard_trips.fetch_add(1, Relaxed);
    EngineError::Eval(format!("{TRIP}{what}"))
}

const TRIP: &str = "numeric guard: ";

/// Whether `e` came from [`trip`] (the data, not the device, was at fault).
pub fn is_trip(e: &EngineError) -> bool {
    matches!(e, EngineError::Eval(m) if m.starts_with(TRIP))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs() {
        assert!(input_ok(&[0.0, -65504.0, 65504.0, 1e-30]));
        for bad in [65505.0, -1e6, f32::INFINITY, f32::NEG_INFINITY, f32::NAN] {
            assert!(!input_ok(&[1.0, bad]), "{bad}");
        }
    }

    #[test]
    fn converted_values() {
        assert!(fp16_ok(&[f16::MAX, f16::MIN, f16::ZERO]));
        assert!(!fp16_ok(&[f16::from_f32(70000.0)]));
        assert!(!fp16_ok(&[f16::NAN]));
    }

    #[test]
    fn outputs_stop_at_the_cliff() {
        assert!(output_ok(&[
            f16::from_f32(32736.0),
            f16::from_f32(-32736.0)
        ]));
        for bad in [32752.0, -32752.0, 40000.0, f32::INFINITY, f32::NAN] {
            assert!(!output_ok(&[f16::ONE, f16::from_f32(bad)]), "{bad}");
        }
    }

    #[test]
    fn a_trip_is_counted() {
        let s = Stats::default();
        let e = trip(&s, "src1 out of fp16 range");
        assert!(e.to_string().contains("numeric guard"));
        assert_eq!(s.guard_trips.load(Relaxed), 1);
    }
}
