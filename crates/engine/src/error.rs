//! Engine errors: each names the rule or step that failed.

use thiserror::Error;

/// Why an engine call failed. The plugin treats every variant the same way (compute the node on the
/// CPU), but the variant feeds stats and logs, so it says which documented rule was broken.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum EngineError {
    /// The engine cannot run on this machine (no ANE, framework or class missing).
    #[error("engine unavailable: {0}")]
    Unavailable(String),
    /// The MIL text did not parse.
    #[error("MIL parse error: {0}")]
    Parse(String),
    /// The program is well-formed text but not something the chip compiles.
    #[error("compile failed: {0}")]
    Compile(String),
    /// A weight file is missing or malformed.
    #[error("weight file: {0}")]
    Weights(String),
    /// Loading would exceed the loaded-program budget.
    #[error("loaded-program budget exhausted ({loaded} of {max} loaded)")]
    Budget {
        /// Programs loaded now.
        loaded: usize,
        /// The cap.
        max: usize,
    },
    /// Load failed.
    #[error("load failed: {0}")]
    Load(String),
    /// The id does not name a loaded program.
    #[error("unknown program {0}")]
    UnknownProgram(u64),
    /// A surface rule was broken (count, minimum size, equal sizes, too small for the value).
    #[error("surface rule: {0}")]
    Surface(String),
    /// Evaluation failed.
    #[error("evaluation failed: {0}")]
    Eval(String),
    /// A private class threw an Objective-C exception; caught at the call (it would otherwise
    /// unwind into Rust and abort the host process). Holds the call, the exception's name and
    /// reason.
    #[error("Objective-C exception: {0}")]
    Exception(String),
    /// The per-process compile cap is spent ([`crate::compile_cap`]).
    #[error(
        "compile cap of {max} per process reached (the ANE leaks after ~119 compiles per process)"
    )]
    CompileCap {
        /// The cap.
        max: u64,
    },
}
