//! What the three engines (private API, Core ML, reference) do alike, in one place: ids, the
//! resident table (one release per program, after its last user: [`crate::resident`]), sharing of
//! identical programs, the loaded-program budget, the compile cap ([`crate::compile_cap`]), the
//! step log ([`crate::steps`]) and the counters. An engine keeps only what is its own (how to
//! build, evaluate and release one program) and calls this core around it, so every rule here is
//! tested once, on Linux, and holds for the macOS engines unchanged.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::compile_cap::CompileCap;
use crate::probe::{Forms, SurfaceOrder};
use crate::resident::{Release, Resident, Table};
use crate::steps::StepLog;
use crate::{Chip, ChipLimits, EngineCounters, EngineError, ProgramId, Surface};

/// The shared bookkeeping of one engine over its programs `P`.
#[derive(Debug)]
pub struct EngineCore<P: Release> {
    /// The limits the engine enforces (`max_loaded_programs` is the budget).
    pub limits: ChipLimits,
    /// The chip whose costs apply.
    pub chip: Chip,
    /// `Engine::use_own_surfaces`: the engine's own memory (default) or host copies.
    own_surfaces: AtomicBool,
    /// Compiles left in this process.
    pub cap: CompileCap,
    /// Each call into the framework, for `ane doctor`.
    pub steps: Arc<StepLog>,
    /// The form of each conflicting report in use ([`crate::probe`]).
    pub forms: Forms,
    state: Mutex<State<P>>,
}

#[derive(Debug)]
struct State<P: Release> {
    next_id: u64,
    programs: Table<P>,
    counters: EngineCounters,
}

impl<P: Release> EngineCore<P> {
    /// A core for `chip` enforcing `limits` (at most `limits.max_loaded_programs` loaded) with
    /// [`crate::compile_cap::MAX_COMPILES`] compiles.
    pub fn new(chip: Chip, limits: ChipLimits) -> Self {
        EngineCore {
            limits,
            chip,
            own_surfaces: AtomicBool::new(true),
            cap: CompileCap::default(),
            steps: Arc::default(),
            forms: Forms::default(),
            state: Mutex::new(State {
                next_id: 0,
                programs: Table::default(),
                counters: EngineCounters::default(),
            }),
        }
    }

    /// The same core with another compile cap.
    pub fn with_cap(mut self, cap: CompileCap) -> Self {
        self.cap = cap;
        self
    }

    fn lock(&self) -> MutexGuard<'_, State<P>> {
        // A panic while holding the lock leaves only counters half-updated; keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `Engine::use_own_surfaces`.
    pub fn use_own_surfaces(&self, on: bool) {
        self.own_surfaces.store(on, Relaxed);
    }

    /// `Engine::new_surface`: `own(bytes)` (the engine's memory), or host memory once
    /// [`EngineCore::use_own_surfaces`] turned that off or while surfaces of ascending sizes are
    /// in use ([`SurfaceOrder::Ascending`]: the plugin's surfaces are one size, so the engine
    /// copies through surfaces of its own instead of binding them).
    ///
    /// # Errors
    /// `own`'s error.
    pub fn new_surface(
        &self,
        bytes: usize,
        own: impl FnOnce(usize) -> Result<Surface, EngineError>,
    ) -> Result<Surface, EngineError> {
        if self.own_surfaces.load(Relaxed) && self.forms.surface_order() == SurfaceOrder::Equal {
            own(bytes)
        } else {
            Ok(Surface::new(bytes))
        }
    }

    /// Updates the counters.
    pub fn count<R>(&self, f: impl FnOnce(&mut EngineCounters) -> R) -> R {
        f(&mut self.lock().counters)
    }

    /// `r`, counting a caught Objective-C exception.
    ///
    /// # Errors
    /// `r`'s error, unchanged.
    pub fn counted<T>(&self, r: Result<T, EngineError>) -> Result<T, EngineError> {
        if let Err(EngineError::Exception(_)) = &r {
            self.count(|c| c.exceptions += 1);
        }
        r
    }

    /// Before building a program with content `key`: `Some(id)`, a new name of the identical
    /// program already loaded (nothing is compiled; counted in `shared`), or `None` when it must
    /// be built and the budget has room.
    ///
    /// # Errors
    /// [`EngineError::Budget`] when `max_loaded` programs are loaded.
    pub fn admit(&self, key: u128) -> Result<Option<ProgramId>, EngineError> {
        let mut st = self.lock();
        let id = st.next_id + 1;
        if st.programs.share(key, id) {
            st.next_id = id;
            st.counters.shared += 1;
            return Ok(Some(ProgramId(id)));
        }
        Self::budget(&st, self.limits.max_loaded_programs)
    }

    /// The budget alone (for an engine that does not share programs).
    ///
    /// # Errors
    /// [`EngineError::Budget`] when `max_loaded` programs are loaded.
    pub fn check_budget(&self) -> Result<(), EngineError> {
        Self::budget(&self.lock(), self.limits.max_loaded_programs).map(|_| ())
    }

    fn budget(st: &State<P>, max: usize) -> Result<Option<ProgramId>, EngineError> {
        if st.programs.len() >= max {
            return Err(EngineError::Budget {
                loaded: st.programs.len(),
                max,
            });
        }
        Ok(None)
    }

    /// Adds a loaded program (findable by content `key` for [`EngineCore::admit`] when given) and
    /// returns its id; counts the load.
    pub fn insert(&self, key: Option<u128>, program: P) -> ProgramId {
        let mut st = self.lock();
        st.next_id += 1;
        let id = st.next_id;
        match key {
            Some(key) => st.programs.insert_keyed(id, key, program),
            None => st.programs.insert(id, program),
        }
        st.counters.loads += 1;
        let n = st.programs.len();
        st.counters.set_loaded(n);
        ProgramId(id)
    }

    /// A handle on a loaded program for one use; it stays loaded while held.
    ///
    /// # Errors
    /// [`EngineError::UnknownProgram`].
    pub fn get(&self, program: ProgramId) -> Result<Arc<Resident<P>>, EngineError> {
        self.lock()
            .programs
            .get(program.0)
            .ok_or(EngineError::UnknownProgram(program.0))
    }

    /// One evaluation: `f` runs on the program under its own lock, as step `evaluate`; it returns
    /// the bytes it copied. Counted when it succeeds; exceptions counted either way.
    ///
    /// # Errors
    /// [`EngineError::UnknownProgram`], or `f`'s error.
    pub fn evaluate(
        &self,
        program: ProgramId,
        f: impl FnOnce(&mut P) -> Result<u64, EngineError>,
    ) -> Result<(), EngineError> {
        let handle = self.get(program)?;
        let copied = self.counted(self.steps.run("evaluate", || f(&mut handle.lock())))?;
        // Released here if it was unloaded meanwhile, outside the engine lock.
        drop(handle);
        self.evaluated(copied);
        Ok(())
    }

    /// Counts one successful evaluation that copied `copied` bytes.
    pub fn evaluated(&self, copied: u64) {
        self.count(|c| {
            c.evaluations += 1;
            c.bytes_copied += copied;
        });
    }

    /// Unloads a program: unreachable now, released by its last holder (here, or an evaluation
    /// in flight when it ends), outside the engine lock. Returns whether the id was loaded.
    pub fn unload(&self, program: ProgramId) -> bool {
        let removed = {
            let mut st = self.lock();
            let p = st.programs.remove(program.0);
            if p.is_some() {
                st.counters.unloads += 1;
                let n = st.programs.len();
                st.counters.set_loaded(n);
            }
            p
        };
        let was = removed.is_some();
        drop(removed);
        was
    }

    /// The counters, with the compile attempts taken from the cap.
    pub fn counters(&self) -> EngineCounters {
        let mut c = self.lock().counters;
        c.compile_attempts = self.cap.used();
        c
    }
}

/// A loaded program that evaluates on surfaces by itself (the macOS engines' programs): the
/// core checks the request and runs it ([`EngineCore::evaluate_on`]).
pub trait Evaluate {
    /// Checks the allocation sizes of a request's surfaces, in binding order.
    ///
    /// # Errors
    /// [`EngineError::Surface`] naming the rule.
    fn check_request(&self, inputs: &[usize], outputs: &[usize]) -> Result<(), EngineError>;

    /// Evaluates on checked surfaces, in binding order; returns the bytes copied.
    ///
    /// # Errors
    /// Whatever the framework says.
    fn evaluate(
        &mut self,
        inputs: &[&Surface],
        outputs: &mut [&mut Surface],
    ) -> Result<u64, EngineError>;
}

impl<P: Release + Evaluate> EngineCore<P> {
    /// `Engine::evaluate` for programs that [`Evaluate`]: the request checked, then evaluated
    /// under the program's lock ([`EngineCore::evaluate`]).
    ///
    /// # Errors
    /// Unknown program, a surface rule, or the evaluation's error.
    pub fn evaluate_on(
        &self,
        program: ProgramId,
        inputs: &[&Surface],
        outputs: &mut [&mut Surface],
    ) -> Result<(), EngineError> {
        let ins: Vec<usize> = inputs.iter().map(|s| s.alloc_size()).collect();
        let outs: Vec<usize> = outputs.iter().map(|s| s.alloc_size()).collect();
        self.evaluate(program, |p| {
            p.check_request(&ins, &outs)?;
            p.evaluate(inputs, outputs)
        })
    }
}

impl<P: Release> Drop for EngineCore<P> {
    fn drop(&mut self) {
        // The ids first: a guard in the `for` expression would live through the loop, and
        // `unload` takes the lock again.
        let ids = self.lock().programs.ids();
        for id in ids {
            self.unload(ProgramId(id));
        }
    }
}

/// The [`crate::Engine`] methods an engine answers from its [`EngineCore`] (a field `core`):
/// `limits`, `chip`, `use_own_surfaces`, `steps`, `set_form` and `form`; with `(programs)` also `evaluate`, `unload`
/// and `counters`. Used inside `impl Engine for ...`.
macro_rules! answered_by_core {
    () => {
        fn limits(&self) -> $crate::ChipLimits {
            self.core.limits
        }

        fn chip(&self) -> $crate::Chip {
            self.core.chip
        }

        fn use_own_surfaces(&self, on: bool) {
            self.core.use_own_surfaces(on);
        }

        fn steps(&self) -> Vec<$crate::steps::StepRecord> {
            self.core.steps.records()
        }

        fn set_form(&self, probe: $crate::probe::ProbeKind, form: usize) {
            if self.probes().contains(&probe) {
                self.core.forms.set(probe, form);
            }
        }

        fn form(&self, probe: $crate::probe::ProbeKind) -> usize {
            self.core.forms.get(probe)
        }
    };
    // Also `evaluate` (programs that `Evaluate`), `unload` and `counters`.
    (programs) => {
        $crate::engine_core::answered_by_core!();

        fn evaluate(
            &self,
            program: $crate::ProgramId,
            inputs: &[&$crate::Surface],
            outputs: &mut [&mut $crate::Surface],
        ) -> Result<(), $crate::EngineError> {
            // The handle is held for the evaluation: an `unload` meanwhile leaves the program
            // loaded until it ends, and then releases it.
            self.core.evaluate_on(program, inputs, outputs)
        }

        fn unload(&self, program: $crate::ProgramId) {
            self.core.unload(program);
        }

        fn counters(&self) -> $crate::EngineCounters {
            self.core.counters()
        }
    };
}
pub(crate) use answered_by_core;

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

    struct Probe(Arc<AtomicUsize>);

    fn limits(max_loaded_programs: usize) -> ChipLimits {
        ChipLimits {
            max_loaded_programs,
            ..Chip::Unknown.limits()
        }
    }

    impl Release for Probe {
        fn release(&mut self) {
            self.0.fetch_add(1, SeqCst);
        }
    }

    #[test]
    fn loads_shares_budget_and_unloads_are_counted_and_released_once() {
        let released = Arc::new(AtomicUsize::new(0));
        let core = EngineCore::new(Chip::Unknown, limits(3));
        assert_eq!(core.admit(7).unwrap(), None, "nothing to share yet");
        let a = core.insert(Some(7), Probe(released.clone()));
        let a2 = core.admit(7).unwrap().expect("identical content shared");
        assert_ne!(a, a2);
        assert_eq!(core.admit(8).unwrap(), None);
        let b = core.insert(None, Probe(released.clone()));
        assert!(matches!(
            core.admit(9),
            Err(EngineError::Budget { loaded: 3, max: 3 })
        ));
        assert!(core.check_budget().is_err());
        let c = core.counters();
        assert_eq!((c.loads, c.shared, c.loaded, c.loaded_peak), (2, 1, 3, 3));
        assert!(core.unload(a));
        assert!(!core.unload(a), "twice: a no-op");
        assert_eq!(released.load(SeqCst), 0, "a2 still names it");
        assert!(core.unload(a2));
        assert_eq!(released.load(SeqCst), 1);
        assert!(matches!(
            core.get(a),
            Err(EngineError::UnknownProgram(id)) if id == a.0
        ));
        let c = core.counters();
        assert_eq!((c.unloads, c.loaded), (2, 1));
        drop(core);
        assert_eq!(released.load(SeqCst), 2, "b released when the engine goes");
        let _ = b;
    }

    #[test]
    fn evaluations_are_logged_counted_and_keep_an_unloaded_program_until_they_end() {
        let released = Arc::new(AtomicUsize::new(0));
        let core = EngineCore::new(Chip::Unknown, limits(4)).with_cap(CompileCap::new(1));
        core.cap.take().unwrap();
        assert!(core.cap.take().is_err());
        let id = core.insert(None, Probe(released.clone()));
        core.evaluate(id, |_| {
            // Unloaded while evaluating: released only when the evaluation ends.
            assert!(core.unload(id));
            assert_eq!(released.load(SeqCst), 0);
            Ok(128)
        })
        .unwrap();
        assert_eq!(released.load(SeqCst), 1);
        let e = core.evaluate(id, |_| Ok(0)).unwrap_err();
        assert!(matches!(e, EngineError::UnknownProgram(_)));
        let id = core.insert(None, Probe(released.clone()));
        let e = core
            .evaluate(id, |_| {
                Err(EngineError::Exception("evaluateWithQoS: boom".into()))
            })
            .unwrap_err();
        assert!(matches!(e, EngineError::Exception(_)));
        let c = core.counters();
        assert_eq!(
            (
                c.evaluations,
                c.bytes_copied,
                c.exceptions,
                c.compile_attempts
            ),
            (1, 128, 1, 1)
        );
        let steps: Vec<(&str, bool)> = core
            .steps
            .records()
            .iter()
            .map(|r| (r.step, r.ok))
            .collect();
        assert_eq!(steps, [("evaluate", true), ("evaluate", false)]);
    }
}

#[cfg(test)]
mod surface_tests {
    use super::*;

    struct Nothing;
    impl Release for Nothing {
        fn release(&mut self) {}
    }

    impl Evaluate for Nothing {
        fn check_request(&self, inputs: &[usize], _: &[usize]) -> Result<(), EngineError> {
            match inputs {
                [n] if *n >= 4096 => Ok(()),
                _ => Err(EngineError::Surface(format!("inputs {inputs:?}"))),
            }
        }

        fn evaluate(
            &mut self,
            inputs: &[&Surface],
            _: &mut [&mut Surface],
        ) -> Result<u64, EngineError> {
            Ok(inputs[0].alloc_size() as u64)
        }
    }

    #[test]
    fn requests_are_checked_before_the_program_evaluates() {
        let core = EngineCore::new(Chip::Unknown, Chip::Unknown.limits());
        let id = core.insert(None, Nothing);
        let big = Surface::new(65536);
        core.evaluate_on(id, &[&big], &mut []).unwrap();
        let e = core.evaluate_on(id, &[&big, &big], &mut []).unwrap_err();
        assert!(matches!(e, EngineError::Surface(_)), "{e}");
        let c = core.counters();
        assert_eq!(
            (c.evaluations, c.bytes_copied),
            (1, big.alloc_size() as u64)
        );
        assert!(
            !core.steps.records()[1].ok,
            "a refused request is a failed evaluate step"
        );
    }

    #[test]
    fn own_surfaces_until_turned_off() {
        let core: EngineCore<Nothing> = EngineCore::new(Chip::Unknown, Chip::Unknown.limits());
        let own = |b: usize| -> Result<Surface, EngineError> {
            Err(EngineError::Surface(format!("own {b}")))
        };
        assert!(
            core.new_surface(4096, own).is_err(),
            "the engine's memory first"
        );
        core.use_own_surfaces(false);
        let s = core.new_surface(4096, own).unwrap();
        assert!(s.engine_memory().is_none() && s.alloc_size() >= 4096);
        core.use_own_surfaces(true);
        core.forms.set(crate::probe::ProbeKind::SurfaceOrder, 1);
        let s = core.new_surface(4096, own).unwrap();
        assert!(
            s.engine_memory().is_none(),
            "surfaces of ascending sizes: host memory, copied through the engine's own"
        );
    }
}
