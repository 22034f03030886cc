//! The Apple Neural Engine driver (AppleNeuralEngine.framework, private `_ANEInMemoryModel` API).
//!
//! Not written yet: it is the subject of its own issue ("The ANE engine on macOS"). Until then this
//! module is the ripgrep-style disabled twin: the same entry point, returning
//! [`EngineError::Unavailable`] with the reason, so the plugin declines (score 0) on a Mac instead of
//! pretending. Everything the driver will need to decide (surface sizes, binding order, limits) is
//! already computed by platform-neutral code in this crate and tested on Linux.

use std::sync::Arc;

use crate::{Engine, EngineError};

/// Opens the ANE engine.
///
/// # Errors
/// Always, for now: the driver is not implemented.
pub fn open() -> Result<Arc<dyn Engine>, EngineError> {
    Err(EngineError::Unavailable(
        "the macOS ANE driver is not implemented yet; use GGML_ANE_ENGINE=reference to test the plugin".into(),
    ))
}
