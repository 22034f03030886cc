//! Forms of a call the sources disagree on, and which one an engine uses now.
//!
//! Three third-party reports conflict with what every other source does (ane-private-api.md §9),
//! and none can be settled without the Mac it is about. So each is a [`ProbeKind`] with two forms,
//! the one the drivers used so far (the conservative one) first; an engine says which probes
//! concern it ([`crate::Engine::probes`]), holds its current form of each ([`Forms`], in the
//! engine core) and follows it in every compile and evaluation. Which form wins on a machine is
//! decided by a canary per form (`ane_plan::probe`), kept for the process, and reported by
//! `ane doctor`.
//!
//! | probe | form 0 (conservative) | form 1 | report |
//! |---|---|---|---|
//! | `compile_call` (Core ML) | `compileModelAtURL:error:` | `compileModelAtURL:completionHandler:` | the synchronous call fails on macOS 26 (maderix PR 27) |
//! | `mil_dialect` (private API) | [`Dialect::Shorthand`]: `program(1.3)`, `ios18`, `string("x")` | [`Dialect::Verbose`]: `program(1.0)`, `ios16`, `tensor<string, []>("x")` | the shorthand compiles only on M4 (maderix PR 6) |
//! | `surface_order` (private API) | [`SurfaceOrder::Equal`]: every surface of a request one size | [`SurfaceOrder::Ascending`]: inputs of strictly ascending sizes, outputs descending, in binding order | M1 returns zeros otherwise (maderix issue 47) |

use std::sync::atomic::{AtomicU8, Ordering::Relaxed};

pub use ane_mil::text::Dialect;

/// One of the conflicting reports, probed at run time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProbeKind {
    /// How Core ML compiles a package: [`CompileCall`].
    CompileCall,
    /// The MIL text dialect the private API's compiler takes: [`Dialect`].
    MilDialect,
    /// The sizes of a request's surfaces on the private API: [`SurfaceOrder`].
    SurfaceOrder,
}

impl ProbeKind {
    /// Every probe, in the order they are reported.
    pub const ALL: [ProbeKind; 3] = [
        ProbeKind::CompileCall,
        ProbeKind::MilDialect,
        ProbeKind::SurfaceOrder,
    ];

    /// Name in reports and JSON.
    pub fn name(self) -> &'static str {
        match self {
            ProbeKind::CompileCall => "compile_call",
            ProbeKind::MilDialect => "mil_dialect",
            ProbeKind::SurfaceOrder => "surface_order",
        }
    }

    /// Names of its forms, the conservative one first.
    pub fn forms(self) -> &'static [&'static str] {
        const CALLS: [&str; 2] = [CompileCall::Sync.name(), CompileCall::Async.name()];
        const ORDERS: [&str; 2] = [SurfaceOrder::Equal.name(), SurfaceOrder::Ascending.name()];
        match self {
            ProbeKind::CompileCall => &CALLS,
            ProbeKind::MilDialect => &["shorthand", "verbose"],
            ProbeKind::SurfaceOrder => &ORDERS,
        }
    }

    /// The third-party report it settles, in one line.
    pub fn report(self) -> &'static str {
        match self {
            ProbeKind::CompileCall => {
                "compileModelAtURL: reported failing on macOS 26 (maderix PR 27)"
            }
            ProbeKind::MilDialect => {
                "string(\"x\") with ios18 reported compiling only on M4; tensor<string, []> with ios16 on M1/M2 (maderix PR 6)"
            }
            ProbeKind::SurfaceOrder => {
                "inputs of ascending and outputs of descending sizes reported necessary on M1, zeros otherwise (maderix issue 47)"
            }
        }
    }

    fn slot(self) -> usize {
        self as usize
    }
}

/// How Core ML is asked to compile a package.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CompileCall {
    /// `+[MLModel compileModelAtURL:error:]` (macOS 10.13+, deprecated, synchronous).
    #[default]
    Sync,
    /// `+[MLModel compileModelAtURL:completionHandler:]` (macOS 13+), waited for.
    Async,
}

impl CompileCall {
    /// Name in reports.
    pub const fn name(self) -> &'static str {
        match self {
            CompileCall::Sync => "compileModelAtURL:error:",
            CompileCall::Async => "compileModelAtURL:completionHandler:",
        }
    }
}

/// The sizes of the surfaces bound in one request of the private API.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SurfaceOrder {
    /// Every surface one size, the largest tensor's ([`crate::surface::request_alloc_size`]):
    /// Orion's rule (other sizes fail with `0x1d`).
    #[default]
    Equal,
    /// Inputs of strictly ascending sizes and outputs of strictly descending sizes, in binding
    /// order ([`crate::surface::ordered_sizes`]); the driver then copies through its own
    /// surfaces (the plugin's surfaces are one size), never binding the plugin's directly.
    Ascending,
}

impl SurfaceOrder {
    /// Name in reports.
    pub const fn name(self) -> &'static str {
        match self {
            SurfaceOrder::Equal => "equal",
            SurfaceOrder::Ascending => "ascending_inputs_descending_outputs",
        }
    }
}

/// The form an engine uses now for each probe (index into [`ProbeKind::forms`]; 0 until set).
#[derive(Debug, Default)]
pub struct Forms([AtomicU8; 3]);

impl Forms {
    /// The current form of `kind`.
    pub fn get(&self, kind: ProbeKind) -> usize {
        usize::from(self.0[kind.slot()].load(Relaxed))
    }

    /// Uses form `form` of `kind` from now on (out-of-range forms are clamped to the last).
    pub fn set(&self, kind: ProbeKind, form: usize) {
        let last = kind.forms().len() - 1;
        self.0[kind.slot()].store(form.min(last) as u8, Relaxed);
    }

    /// The MIL dialect to compile in.
    pub fn dialect(&self) -> Dialect {
        Dialect::ALL[self.get(ProbeKind::MilDialect)]
    }

    /// The sizes of a request's surfaces.
    pub fn surface_order(&self) -> SurfaceOrder {
        match self.get(ProbeKind::SurfaceOrder) {
            0 => SurfaceOrder::Equal,
            _ => SurfaceOrder::Ascending,
        }
    }

    /// The Core ML compile call.
    pub fn compile_call(&self) -> CompileCall {
        match self.get(ProbeKind::CompileCall) {
            0 => CompileCall::Sync,
            _ => CompileCall::Async,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_start_conservative_and_follow_what_is_set() {
        let f = Forms::default();
        assert_eq!(
            (f.dialect(), f.surface_order(), f.compile_call()),
            (Dialect::Shorthand, SurfaceOrder::Equal, CompileCall::Sync)
        );
        f.set(ProbeKind::MilDialect, 1);
        f.set(ProbeKind::SurfaceOrder, 1);
        f.set(ProbeKind::CompileCall, 7);
        assert_eq!(
            (f.dialect(), f.surface_order(), f.compile_call()),
            (
                Dialect::Verbose,
                SurfaceOrder::Ascending,
                CompileCall::Async
            )
        );
        assert_eq!(f.get(ProbeKind::CompileCall), 1, "clamped to the last form");
        for k in ProbeKind::ALL {
            assert_eq!(k.forms().len(), 2);
            assert!(!k.report().is_empty());
        }
        assert_eq!(
            ProbeKind::MilDialect.forms(),
            Dialect::ALL.map(Dialect::name)
        );
    }
}
