//! Settling the conflicting third-party reports on the machine itself: for each probe an engine
//! follows ([`ane_engine::probe`]), the conservative form first and the other only when a canary
//! with it fails or returns zeros; the winner kept for the process.
//!
//! The rules, all decided here (platform-neutral, tested through the reference engine and its
//! faults):
//! - **The canary** ([`probe_canary`]): the plugin's shape-shared program with two inputs of
//!   different sizes (so the surface-size order matters), positive weights and activations (so
//!   every expected output is nonzero and an all-zeros result is a symptom, not a value), compared
//!   with the reference engine. One compile per form tried, counted against the engine's compile
//!   cap like any other.
//! - **The order** ([`combinations`]): every probe the engine follows and the process has not
//!   decided yet is searched together, the all-conservative combination first, then those with
//!   one other form (in [`ProbeKind::ALL`] order), then two, ...; the first that passes wins.
//!   A probe decided before (by another engine of the same name in this process) is reused,
//!   without a compile.
//! - **The budget**: the first run per engine is its canary; each further run is an *extra*
//!   compile, and a process spends at most [`EXTRA_COMPILES`] of them on probes in total. When
//!   the budget or the compile cap runs out, probing stops with that reason, the conservative
//!   forms stay, and the decision is kept (nothing is probed twice).
//! - **Kept**: the decision per (engine name, probe) lives in a [`ProbeStore`] — the process's
//!   ([`ProbeStore::process`]) for the plugin and `ane doctor`, a fresh one in tests.

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};

use ane_engine::probe::ProbeKind;
use ane_engine::reference::ReferenceEngine;
use ane_engine::{Chip, Engine};
use half::f16;

use crate::canary::{max_rel_err, run_planned, test_values, CANARY_TOLERANCE};
use crate::{Layout, Planner};

/// Extra compiles (runs after each engine's first) the probes of one process may spend.
pub const EXTRA_COMPILES: u32 = 4;

/// Shape of the probe canary `(k, m, n)`: weights (`b_w`, 16 KiB) larger than activations
/// (`a_x`, 8 KiB), one output.
pub const PROBE_SHAPE: (usize, usize, usize) = (64, 128, 64);

/// How one canary run fared.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// Within tolerance of the reference engine, no zero output.
    Pass {
        /// Against the reference engine.
        max_rel_err: f64,
    },
    /// Every output zero (expected: none).
    Zeros,
    /// Numbers off the reference engine, or some outputs zero.
    Wrong {
        /// Against the reference engine.
        max_rel_err: f64,
    },
    /// The engine returned an error (compile, load, evaluate).
    Failed(String),
}

impl Verdict {
    /// `pass`, `zeros`, `wrong` or `failed`.
    pub fn name(&self) -> &'static str {
        match self {
            Verdict::Pass { .. } => "pass",
            Verdict::Zeros => "zeros",
            Verdict::Wrong { .. } => "wrong",
            Verdict::Failed(_) => "failed",
        }
    }

    /// Whether it passed.
    pub fn ok(&self) -> bool {
        matches!(self, Verdict::Pass { .. })
    }

    /// One line for reports.
    pub fn detail(&self) -> String {
        match self {
            Verdict::Pass { max_rel_err } => format!("pass (max_rel_err {max_rel_err:.2e})"),
            Verdict::Zeros => "all outputs zero".into(),
            Verdict::Wrong { max_rel_err } => {
                format!("wrong numbers (max_rel_err {max_rel_err:.2e})")
            }
            Verdict::Failed(e) => format!("failed: {e}"),
        }
    }
}

/// Positive values in [0.25, 1): products summed over K are never zero.
fn positive(n: usize, seed: u64) -> Vec<f16> {
    test_values(n, seed)
        .into_iter()
        .map(|v| f16::from_f32(0.25 + 0.75 * v.to_f32().abs().min(0.99)))
        .collect()
}

/// Runs the probe canary ([`PROBE_SHAPE`], the plugin's default layout) on `engine` and judges
/// it against the reference engine. Its compile goes through `engine` (and its compile cap).
pub fn probe_canary(engine: &dyn Engine) -> Verdict {
    let (k, m, n) = PROBE_SHAPE;
    let w = positive(m * k, 21);
    let x = positive(k * n, 22);
    let planner = Planner {
        layout: Layout::default(),
        ..Planner::new(engine.limits())
    };
    let got = match run_planned(engine, &planner, PROBE_SHAPE, &w, &x, 1) {
        Ok(r) => r.y,
        Err(e) => return Verdict::Failed(e.to_string()),
    };
    let reference = ReferenceEngine::new(Chip::Unknown.limits());
    let want = match run_planned(&reference, &planner, PROBE_SHAPE, &w, &x, 1) {
        Ok(r) => r.y,
        Err(e) => return Verdict::Failed(format!("reference engine: {e}")),
    };
    judge(&got, &want)
}

/// The verdict on `got` against `want` (whose values are all nonzero).
pub fn judge(got: &[f32], want: &[f32]) -> Verdict {
    if got.iter().all(|&v| v == 0.0) {
        return Verdict::Zeros;
    }
    let max_rel_err = max_rel_err(got, want);
    if max_rel_err > CANARY_TOLERANCE || got.contains(&0.0) {
        return Verdict::Wrong { max_rel_err };
    }
    Verdict::Pass { max_rel_err }
}

/// What a process decided for one probe of one engine.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// The form in use (the winner, or the conservative 0 when none passed).
    pub form: usize,
    /// The form that passed, if any.
    pub winner: Option<usize>,
    /// Why no form won.
    pub reason: Option<String>,
}

/// The decisions of a process and the extra compiles it has left for probes.
#[derive(Debug)]
pub struct ProbeStore {
    state: Mutex<StoreState>,
}

#[derive(Debug)]
struct StoreState {
    decided: BTreeMap<(String, ProbeKind), Decision>,
    extra_left: u32,
}

impl ProbeStore {
    /// An empty store with `extra` extra compiles to spend.
    pub fn new(extra: u32) -> Self {
        ProbeStore {
            state: Mutex::new(StoreState {
                decided: BTreeMap::new(),
                extra_left: extra,
            }),
        }
    }

    /// The process's store ([`EXTRA_COMPILES`]): the plugin and `ane doctor` decide once.
    pub fn process() -> &'static ProbeStore {
        static STORE: OnceLock<ProbeStore> = OnceLock::new();
        STORE.get_or_init(|| ProbeStore::new(EXTRA_COMPILES))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, StoreState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The decision for `kind` on engines named `engine`, if made.
    pub fn decision(&self, engine: &str, kind: ProbeKind) -> Option<Decision> {
        self.lock()
            .decided
            .get(&(engine.to_string(), kind))
            .cloned()
    }

    /// Extra compiles left.
    pub fn extra_left(&self) -> u32 {
        self.lock().extra_left
    }

    fn take_extra(&self) -> bool {
        let mut st = self.lock();
        if st.extra_left == 0 {
            return false;
        }
        st.extra_left -= 1;
        true
    }
}

/// One canary run: the form of each probe searched, and the verdict.
#[derive(Clone, Debug)]
pub struct ProbeRun {
    /// `(probe, form)` for each probe searched in this run.
    pub forms: Vec<(ProbeKind, usize)>,
    /// How it fared.
    pub verdict: Verdict,
}

/// One probe's outcome on one engine.
#[derive(Clone, Debug)]
pub struct ProbeOutcome {
    /// Which probe.
    pub kind: ProbeKind,
    /// The forms tried, in order, with the verdict of the run they took part in (empty when
    /// reused).
    pub tried: Vec<(usize, Verdict)>,
    /// What was decided.
    pub decision: Decision,
    /// Decided earlier in this process (no compile now).
    pub reused: bool,
}

/// Everything [`run_probes`] did on one engine.
#[derive(Clone, Debug)]
pub struct ProbeReport {
    /// The engine's name.
    pub engine: &'static str,
    /// Each canary run, in order.
    pub runs: Vec<ProbeRun>,
    /// One entry per probe the engine follows.
    pub probes: Vec<ProbeOutcome>,
    /// Runs beyond the first (each one compile).
    pub extra_compiles: u32,
    /// Extra compiles the process has left.
    pub extra_left: u32,
}

impl ProbeReport {
    /// Notes for the probes whose form is not the conservative one, or where none passed: one
    /// line, empty when there is nothing to say.
    pub fn note(&self) -> Option<String> {
        let parts: Vec<String> = self
            .probes
            .iter()
            .filter(|p| p.decision.form != 0 || p.decision.winner.is_none())
            .map(|p| {
                let forms = p.kind.forms();
                match (&p.decision.winner, &p.decision.reason) {
                    (Some(w), _) => format!("{}: {} (probed)", p.kind.name(), forms[*w]),
                    (None, r) => format!(
                        "{}: no form passed, {} kept ({})",
                        p.kind.name(),
                        forms[0],
                        r.as_deref().unwrap_or("?")
                    ),
                }
            })
            .collect();
        (!parts.is_empty()).then(|| parts.join("; "))
    }
}

/// Every combination of forms of `kinds`, the all-conservative one first, then by how many
/// probes leave their first form, then in order of `kinds`.
pub fn combinations(kinds: &[ProbeKind]) -> Vec<Vec<usize>> {
    let mut all: Vec<Vec<usize>> = vec![Vec::new()];
    for k in kinds {
        all = all
            .into_iter()
            .flat_map(|c| {
                (0..k.forms().len()).map(move |f| {
                    let mut c = c.clone();
                    c.push(f);
                    c
                })
            })
            .collect();
    }
    // Stable: ties keep the lexicographic order built above, read from the first probe.
    let key = |c: &Vec<usize>| {
        let moved = c.iter().filter(|&&f| f != 0).count();
        let rev: Vec<usize> = c.iter().rev().copied().collect();
        (moved, rev)
    };
    all.sort_by_key(key);
    all
}

/// Probes `engine` with [`probe_canary`] and the process's store.
pub fn run_probes(engine: &dyn Engine) -> ProbeReport {
    run_probes_with(engine, ProbeStore::process(), probe_canary)
}

/// Probes `engine`: reuses what `store` decided for it, searches the rest (module doc) with
/// `canary`, keeps the decisions in `store` and leaves the engine on them.
pub fn run_probes_with(
    engine: &dyn Engine,
    store: &ProbeStore,
    mut canary: impl FnMut(&dyn Engine) -> Verdict,
) -> ProbeReport {
    let name = engine.name();
    let mut probes = Vec::new();
    let mut open = Vec::new();
    for &kind in engine.probes() {
        match store.decision(name, kind) {
            Some(d) => {
                engine.set_form(kind, d.form);
                probes.push(ProbeOutcome {
                    kind,
                    tried: Vec::new(),
                    decision: d,
                    reused: true,
                });
            }
            None => open.push(kind),
        }
    }
    let mut runs: Vec<ProbeRun> = Vec::new();
    let mut extra = 0;
    let mut winner: Option<Vec<usize>> = None;
    let mut stopped: Option<String> = None;
    if !open.is_empty() {
        for (i, combo) in combinations(&open).into_iter().enumerate() {
            if i > 0 && !store.take_extra() {
                stopped = Some(format!(
                    "probe budget spent ({EXTRA_COMPILES} extra compiles per process)"
                ));
                break;
            }
            if i > 0 {
                extra += 1;
            }
            for (&k, &f) in open.iter().zip(&combo) {
                engine.set_form(k, f);
            }
            let verdict = canary(engine);
            let cap = matches!(&verdict, Verdict::Failed(e) if e.contains("compile cap"));
            runs.push(ProbeRun {
                forms: open.iter().copied().zip(combo.iter().copied()).collect(),
                verdict: verdict.clone(),
            });
            if verdict.ok() {
                winner = Some(combo);
                break;
            }
            if cap {
                stopped = Some(format!("compile cap reached: {}", verdict.detail()));
                break;
            }
        }
    }
    let reason = stopped.or_else(|| {
        runs.last()
            .map(|r| format!("every combination tried, last {}", r.verdict.detail()))
    });
    for (i, &kind) in open.iter().enumerate() {
        let decision = match &winner {
            Some(c) => Decision {
                form: c[i],
                winner: Some(c[i]),
                reason: None,
            },
            None => Decision {
                form: 0,
                winner: None,
                reason: reason.clone(),
            },
        };
        engine.set_form(kind, decision.form);
        store
            .lock()
            .decided
            .insert((name.to_string(), kind), decision.clone());
        probes.push(ProbeOutcome {
            kind,
            tried: runs
                .iter()
                .map(|r| (r.forms[i].1, r.verdict.clone()))
                .collect(),
            decision,
            reused: false,
        });
    }
    probes.sort_by_key(|p| p.kind);
    ProbeReport {
        engine: name,
        runs,
        probes,
        extra_compiles: extra,
        extra_left: store.extra_left(),
    }
}

#[cfg(test)]
mod tests;
