//! Fault injection for the reference engine: the documented ANE failures, on demand.
//!
//! The plugin promises that every claimed op is computed whatever the engine does. On Linux the
//! reference engine never fails on a valid program, so that promise is untested unless failures are
//! made up. [`FaultSpec`] (from `GGML_ANE_FAULTS="compile=P,load=P,eval=P,alloc=P[,seed=S]"`) makes
//! each engine call fail with its probability, with the error variant the real driver returns for
//! that step (ane-private-api.md §5.2, §5.3):
//!
//! | step | where | error |
//! |---|---|---|
//! | `compile` | `compile`, after the program checked clean | [`EngineError::Compile`] (the ~119-compile leak, an `ANECCompile` failure) |
//! | `load` | `compile`, after a successful compile | [`EngineError::Load`] (slot reclamation, "model load has failed") |
//! | `alloc` | `evaluate`, before binding surfaces | [`EngineError::Surface`] (IOSurface creation failed) |
//! | `eval` | `evaluate`, before running | [`EngineError::Eval`] ("Program Inference error" `0x1d`) |
//!
//!
//! Six more keys model the machines of three conflicting third-party reports, so that the probes
//! that settle them at run time (`crate::probe`, `ane_plan::probe`) are tested here: each fails
//! (with its probability) only when the engine uses the form the report says fails.
//!
//! | key | fails when | as |
//! |---|---|---|
//! | `shorthand` | MIL in the shorthand dialect is compiled (`string("x")`, M1/M2 per maderix PR 6) | [`EngineError::Compile`] |
//! | `verbose` | MIL in the verbose dialect is compiled (`tensor<string, []>("x")`) | [`EngineError::Compile`] |
//! | `sync_compile` | a compile under the `compileModelAtURL:error:` form (macOS 26 per maderix PR 27) | [`EngineError::Compile`] |
//! | `async_compile` | a compile under the `compileModelAtURL:completionHandler:` form | [`EngineError::Compile`] |
//! | `unordered` | a request's bound inputs are not of strictly ascending sizes or its outputs not descending (M1 per maderix issue 47) | outputs all **zeros**, no error |
//! | `unequal` | a request's bound surfaces are not all one size (Orion's rule) | [`EngineError::Eval`] (`0x1d`) |
//!
//! Injected faults only ever *add* failures: a program the engine rejects still fails with the real
//! reason, and nothing changes a result that is returned as `Ok`.
//!
//! **Determinism.** Draws come from one SplitMix64 stream per engine, advanced atomically. One
//! thread making the same calls in the same order sees the same faults for the same seed; with
//! several threads the *set* of draws is the same but which call gets which draw depends on timing.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::EngineError;

/// Default seed when `seed=` is not given.
pub const DEFAULT_SEED: u64 = 0x5eed_a4e0;

/// Probabilities in `[0, 1]` of each injected failure, and the PRNG seed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FaultSpec {
    /// A compile fails ([`EngineError::Compile`]).
    pub compile: f64,
    /// A load after a successful compile fails ([`EngineError::Load`]).
    pub load: f64,
    /// An evaluation fails ([`EngineError::Eval`]).
    pub eval: f64,
    /// Surface allocation for an evaluation fails ([`EngineError::Surface`]).
    pub alloc: f64,
    /// A compile or an evaluation throws an Objective-C exception ([`EngineError::Exception`]),
    /// as a private class does when the framework changed under us.
    pub exception: f64,
    /// MIL in the shorthand dialect fails to compile.
    pub shorthand: f64,
    /// MIL in the verbose dialect fails to compile.
    pub verbose: f64,
    /// A compile under the synchronous Core ML compile call fails.
    pub sync_compile: f64,
    /// A compile under the completion-handler Core ML compile call fails.
    pub async_compile: f64,
    /// An evaluation whose bound surfaces are not ordered returns zeros.
    pub unordered: f64,
    /// An evaluation whose bound surfaces differ in size fails (`0x1d`).
    pub unequal: f64,
    /// Seed of the PRNG.
    pub seed: u64,
}

impl Default for FaultSpec {
    fn default() -> Self {
        FaultSpec {
            compile: 0.0,
            load: 0.0,
            eval: 0.0,
            alloc: 0.0,
            exception: 0.0,
            shorthand: 0.0,
            verbose: 0.0,
            sync_compile: 0.0,
            async_compile: 0.0,
            unordered: 0.0,
            unequal: 0.0,
            seed: DEFAULT_SEED,
        }
    }
}

impl FaultSpec {
    /// True when some probability is above zero.
    pub fn any(&self) -> bool {
        [
            self.compile,
            self.load,
            self.eval,
            self.alloc,
            self.exception,
            self.shorthand,
            self.verbose,
            self.sync_compile,
            self.async_compile,
            self.unordered,
            self.unequal,
        ]
        .iter()
        .any(|&p| p > 0.0)
    }
}

/// Why a `GGML_ANE_FAULTS` value was rejected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FaultSpecError(pub String);

impl fmt::Display for FaultSpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for FaultSpecError {}

impl FromStr for FaultSpec {
    type Err = FaultSpecError;

    /// Parses `key=value` pairs separated by commas: `compile`, `load`, `eval`, `alloc` take a
    /// probability in `[0, 1]`, `seed` an unsigned integer. Keys may repeat (the last wins); an
    /// empty string is no faults.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut spec = FaultSpec::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| FaultSpecError(format!("`{part}` is not key=value")))?;
            let (key, value) = (key.trim(), value.trim());
            if key == "seed" {
                spec.seed = value
                    .parse()
                    .map_err(|_| FaultSpecError(format!("seed `{value}` is not an integer")))?;
                continue;
            }
            let p: f64 = value
                .parse()
                .ok()
                .filter(|p: &f64| (0.0..=1.0).contains(p))
                .ok_or_else(|| {
                    FaultSpecError(format!("{key}={value}: not a probability in [0, 1]"))
                })?;
            match key {
                "compile" => spec.compile = p,
                "load" => spec.load = p,
                "eval" => spec.eval = p,
                "alloc" => spec.alloc = p,
                "exception" => spec.exception = p,
                "shorthand" => spec.shorthand = p,
                "verbose" => spec.verbose = p,
                "sync_compile" => spec.sync_compile = p,
                "async_compile" => spec.async_compile = p,
                "unordered" => spec.unordered = p,
                "unequal" => spec.unequal = p,
                other => {
                    return Err(FaultSpecError(format!(
                        "unknown key `{other}` (compile, load, eval, alloc, exception, shorthand, verbose, sync_compile, async_compile, unordered, unequal, seed)"
                    )))
                }
            }
        }
        Ok(spec)
    }
}

/// The engine step a fault is drawn for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Step {
    Compile,
    Load,
    Alloc,
    Eval,
    /// Drawn at the start of every compile and evaluation.
    Throw,
    /// Drawn for a compile of shorthand-dialect MIL.
    Shorthand,
    /// Drawn for a compile of verbose-dialect MIL.
    Verbose,
    /// Drawn for a compile under the synchronous Core ML call.
    SyncCompile,
    /// Drawn for a compile under the completion-handler Core ML call.
    AsyncCompile,
    /// Drawn for an evaluation whose bound surfaces are not ordered (zeros, not an error).
    Unordered,
    /// Drawn for an evaluation whose bound surfaces differ in size.
    Unequal,
}

/// A fault source: the spec, the PRNG state and how many faults were injected.
#[derive(Debug)]
pub(crate) struct Faults {
    spec: FaultSpec,
    state: AtomicU64,
    injected: AtomicU64,
}

const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

impl Faults {
    pub(crate) fn new(spec: FaultSpec) -> Self {
        Faults {
            spec,
            state: AtomicU64::new(spec.seed),
            injected: AtomicU64::new(0),
        }
    }

    /// The next uniform draw in `[0, 1)` (SplitMix64).
    fn draw(&self) -> f64 {
        let mut z = self.state.fetch_add(GOLDEN, Relaxed).wrapping_add(GOLDEN);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }

    /// `Err` with the step's error if a fault is drawn for it.
    pub(crate) fn check(&self, step: Step) -> Result<(), EngineError> {
        let p = match step {
            Step::Compile => self.spec.compile,
            Step::Load => self.spec.load,
            Step::Alloc => self.spec.alloc,
            Step::Eval => self.spec.eval,
            Step::Throw => self.spec.exception,
            Step::Shorthand => self.spec.shorthand,
            Step::Verbose => self.spec.verbose,
            Step::SyncCompile => self.spec.sync_compile,
            Step::AsyncCompile => self.spec.async_compile,
            Step::Unordered => self.spec.unordered,
            Step::Unequal => self.spec.unequal,
        };
        if p <= 0.0 || self.draw() >= p {
            return Ok(());
        }
        self.injected.fetch_add(1, Relaxed);
        Err(match step {
            Step::Compile => EngineError::Compile("injected fault: ANECCompile failed".into()),
            Step::Load => EngineError::Load("injected fault: model load has failed".into()),
            Step::Alloc => {
                EngineError::Surface("injected fault: IOSurface allocation failed".into())
            }
            Step::Eval => {
                EngineError::Eval("injected fault: Program Inference error (0x1d)".into())
            }
            Step::Throw => EngineError::Exception(
                "injected fault: NSInvalidArgumentException: -[_ANEInMemoryModel \
                 evaluateWithQoS:options:request:error:]: unrecognized selector"
                    .into(),
            ),
            Step::Shorthand => EngineError::Compile(
                "injected fault: ANECCompile failed on the shorthand MIL dialect (string(\"x\"), ios18)"
                    .into(),
            ),
            Step::Verbose => EngineError::Compile(
                "injected fault: ANECCompile failed on the verbose MIL dialect (tensor<string, []>, ios16)"
                    .into(),
            ),
            Step::SyncCompile => {
                EngineError::Compile("injected fault: compileModelAtURL:error: failed".into())
            }
            Step::AsyncCompile => EngineError::Compile(
                "injected fault: compileModelAtURL:completionHandler: failed".into(),
            ),
            Step::Unordered => EngineError::Eval(
                "injected fault: surfaces out of size order (outputs zeroed)".into(),
            ),
            Step::Unequal => EngineError::Eval(
                "injected fault: Program Inference error (0x1d): surfaces of different sizes"
                    .into(),
            ),
        })
    }

    /// Faults injected so far.
    pub(crate) fn injected(&self) -> u64 {
        self.injected.load(Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_form() {
        let s: FaultSpec = "compile=0.3, load=0.1,eval=0.2,alloc=0,seed=7"
            .parse()
            .unwrap();
        assert_eq!(
            s,
            FaultSpec {
                compile: 0.3,
                load: 0.1,
                eval: 0.2,
                alloc: 0.0,
                seed: 7,
                ..FaultSpec::default()
            }
        );
        assert!(s.any());
        assert!(!"".parse::<FaultSpec>().unwrap().any());
        let s: FaultSpec =
            "shorthand=1,verbose=0.5,sync_compile=1,async_compile=0.25,unordered=1,unequal=1"
                .parse()
                .unwrap();
        assert_eq!(
            (
                s.shorthand,
                s.verbose,
                s.sync_compile,
                s.async_compile,
                s.unordered,
                s.unequal
            ),
            (1.0, 0.5, 1.0, 0.25, 1.0, 1.0)
        );
        assert!(s.any());
    }

    #[test]
    fn rejects_malformed_values() {
        for bad in [
            "compile",
            "compile=1.5",
            "compile=-0.1",
            "eval=x",
            "nan=0.1",
            "seed=-1",
        ] {
            assert!(bad.parse::<FaultSpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn rate_and_determinism() {
        let spec: FaultSpec = "eval=0.25,seed=42".parse().unwrap();
        let run = || {
            let f = Faults::new(spec);
            (0..10_000)
                .map(|_| f.check(Step::Eval).is_err())
                .collect::<Vec<_>>()
        };
        let a = run();
        assert_eq!(a, run(), "same seed, same faults");
        let n = a.iter().filter(|&&x| x).count();
        assert!((2200..2800).contains(&n), "{n} faults of 10000 at p=0.25");
        let f = Faults::new(spec);
        assert!(f.check(Step::Compile).is_ok(), "p=0 never fails");
        let other = Faults::new(FaultSpec { seed: 43, ..spec });
        let b: Vec<bool> = (0..10_000)
            .map(|_| other.check(Step::Eval).is_err())
            .collect();
        assert_ne!(a, b, "another seed, other faults");
    }

    #[test]
    fn errors_have_the_real_variants() {
        let f = Faults::new(FaultSpec {
            compile: 1.0,
            load: 1.0,
            eval: 1.0,
            alloc: 1.0,
            exception: 1.0,
            seed: 1,
            ..FaultSpec::default()
        });
        assert!(matches!(
            f.check(Step::Compile),
            Err(EngineError::Compile(_))
        ));
        assert!(matches!(f.check(Step::Load), Err(EngineError::Load(_))));
        assert!(matches!(f.check(Step::Alloc), Err(EngineError::Surface(_))));
        assert!(matches!(f.check(Step::Eval), Err(EngineError::Eval(_))));
        assert!(matches!(
            f.check(Step::Throw),
            Err(EngineError::Exception(_))
        ));
        assert_eq!(f.injected(), 5);
    }

    #[test]
    fn the_engine_fails_where_told_and_counts() {
        use crate::reference::ReferenceEngine;
        use crate::surface::request_alloc_size;
        use crate::{Chip, Engine, Surface};
        let mil = ane_mil::text::emit(&ane_mil::build::dyn_matmul(64, 64, 64));
        let spec = |compile, load, eval, alloc| FaultSpec {
            compile,
            load,
            eval,
            alloc,
            seed: 3,
            ..FaultSpec::default()
        };
        let limits = Chip::M4.limits();
        let e = ReferenceEngine::with_faults(limits, spec(1.0, 0.0, 0.0, 0.0));
        assert!(matches!(e.compile(&mil, &[]), Err(EngineError::Compile(_))));
        let e = ReferenceEngine::with_faults(limits, spec(0.0, 1.0, 0.0, 0.0));
        assert!(matches!(e.compile(&mil, &[]), Err(EngineError::Load(_))));
        assert_eq!((e.counters().loaded, e.counters().faults_injected), (0, 1));
        let size = request_alloc_size(&[64 * 64 * 2]);
        let (a, b) = (Surface::new(size), Surface::new(size));
        for (p, want_alloc) in [
            (spec(0.0, 0.0, 1.0, 0.0), false),
            (spec(0.0, 0.0, 0.0, 1.0), true),
        ] {
            let e = ReferenceEngine::with_faults(limits, p);
            let id = e.compile(&mil, &[]).expect("no compile or load faults");
            let mut y = Surface::new(size);
            let r = e.evaluate(id, &[&a, &b], &mut [&mut y]);
            assert_eq!(
                matches!(r, Err(EngineError::Surface(_))),
                want_alloc,
                "{r:?}"
            );
            assert_eq!(matches!(r, Err(EngineError::Eval(_))), !want_alloc, "{r:?}");
            assert_eq!(e.counters().evaluations, 0);
        }
        // A spec with every probability at zero is no fault source at all.
        let e = ReferenceEngine::with_faults(limits, FaultSpec::default());
        assert!(e.compile(&mil, &[]).is_ok());
        assert_eq!(e.counters().faults_injected, 0);
    }
}
