//! Core ML and Foundation: one small guarded function per call.
//!
//! Each function sends one message (or a few that belong together) under [`guarded`], so an
//! Objective-C exception becomes [`EngineError::Exception`] instead of unwinding into Rust and
//! aborting the host process; each `NSError` becomes an [`EngineError`] with its description,
//! domain, code and `userInfo` ([`ns_error`]). Only documented Core ML API is used.

use std::path::{Path, PathBuf};

use objc2::rc::Retained;
use objc2::runtime::ProtocolObject;
use objc2_core_ml::{MLComputeUnits, MLFeatureProvider, MLModel, MLModelConfiguration};
use objc2_foundation::{
    NSProcessInfo, NSSearchPathDirectory, NSSearchPathDomainMask,
    NSSearchPathForDirectoriesInDomains, NSString, NSTemporaryDirectory, NSURL,
};

use crate::coreml_plan::COMPUTE_UNITS;
use crate::EngineError;

pub(super) use crate::macos::{class, guarded, ns_error};

/// A `file://` URL of a directory.
pub(super) fn dir_url(path: &Path) -> Result<Retained<NSURL>, EngineError> {
    let s = path
        .to_str()
        .ok_or_else(|| EngineError::Compile(format!("path {} is not UTF-8", path.display())))?;
    let s = NSString::from_str(s);
    guarded("fileURLWithPath:isDirectory:", || {
        NSURL::fileURLWithPath_isDirectory(&s, true)
    })
}

/// The file-system path of a `file://` URL.
fn url_path(url: &NSURL) -> Result<Option<PathBuf>, EngineError> {
    guarded("path", || url.path().map(|p| PathBuf::from(p.to_string())))
}

/// `MLModelConfiguration` with `computeUnits` = [`COMPUTE_UNITS`] (CPU and Neural Engine).
pub(super) fn configuration() -> Result<Retained<MLModelConfiguration>, EngineError> {
    guarded("MLModelConfiguration setComputeUnits:", || {
        // SAFETY: `+new` takes no argument and returns a configuration; `-setComputeUnits:` takes
        // an `MLComputeUnits` (NSInteger), and 3 is the documented
        // `MLComputeUnitsCPUAndNeuralEngine` (macOS 13+).
        unsafe {
            let config = MLModelConfiguration::new();
            config.setComputeUnits(MLComputeUnits(COMPUTE_UNITS));
            config
        }
    })
}

/// `+[MLModel compileModelAtURL:error:]` on an `.mlpackage`: the compiled `.mlmodelc` Core ML
/// wrote to a temporary folder of its own.
pub(super) fn compile_model(package: &Path) -> Result<PathBuf, EngineError> {
    let url = dir_url(package)?;
    let r = guarded("compileModelAtURL:error:", || {
        // Deprecated in the current SDK for `compileModelAtURL:completionHandler:` (macOS 13+),
        // but available since macOS 10.13 and synchronous, which is what `Engine::compile` is:
        // the asynchronous form would only be blocked on here.
        #[allow(deprecated)]
        // SAFETY: takes a file URL and returns the compiled model's URL or an NSError.
        let r = unsafe { MLModel::compileModelAtURL_error(&url) };
        r
    })?;
    let out = r.map_err(|e| EngineError::Compile(ns_error("compileModelAtURL", &e)))?;
    url_path(&out)?.ok_or_else(|| {
        EngineError::Compile("compileModelAtURL returned a URL without a path".into())
    })
}

/// How long to wait for `compileModelAtURL:completionHandler:`.
pub(super) const COMPILE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// The package compiled with the call `call` ([`crate::probe::CompileCall`], probed: the
/// synchronous one is reported failing on macOS 26).
pub(super) fn compile_model_with(
    package: &Path,
    call: crate::probe::CompileCall,
) -> Result<PathBuf, EngineError> {
    match call {
        crate::probe::CompileCall::Sync => compile_model(package),
        crate::probe::CompileCall::Async => compile_model_async(package),
    }
}

/// `+[MLModel compileModelAtURL:completionHandler:]` (macOS 13+), waited for up to
/// [`COMPILE_TIMEOUT`]: the compiled `.mlmodelc` Core ML wrote to a temporary folder of its own.
/// The handler sends back only the path (no Core ML object crosses threads).
pub(super) fn compile_model_async(package: &Path) -> Result<PathBuf, EngineError> {
    use std::ptr::NonNull;
    use std::sync::mpsc;

    use block2::RcBlock;
    use objc2_foundation::NSError;

    let url = dir_url(package)?;
    let (tx, rx) = mpsc::channel::<Result<PathBuf, EngineError>>();
    let handler = RcBlock::new(move |compiled: *mut NSURL, error: *mut NSError| {
        let r = match (NonNull::new(compiled), NonNull::new(error)) {
            // SAFETY: Core ML passes a valid URL, alive for the duration of the handler.
            (Some(u), _) => url_path(unsafe { u.as_ref() }).and_then(|p| {
                p.ok_or_else(|| {
                    EngineError::Compile(
                        "compileModelAtURL:completionHandler: gave a URL without a path".into(),
                    )
                })
            }),
            (None, Some(e)) => Err(EngineError::Compile(ns_error(
                "compileModelAtURL:completionHandler:",
                // SAFETY: a valid NSError, alive for the duration of the handler.
                unsafe { e.as_ref() },
            ))),
            (None, None) => Err(EngineError::Compile(
                "compileModelAtURL:completionHandler: gave neither a model nor an error".into(),
            )),
        };
        // After a timeout nobody listens any more: nothing to do.
        let _ = tx.send(r);
    });
    guarded("compileModelAtURL:completionHandler:", || {
        // SAFETY: takes a file URL and a block of the declared signature, which Core ML copies
        // and calls once.
        unsafe { MLModel::compileModelAtURL_completionHandler(&url, &handler) }
    })?;
    match rx.recv_timeout(COMPILE_TIMEOUT) {
        Ok(r) => r,
        Err(_) => Err(EngineError::Compile(format!(
            "compileModelAtURL:completionHandler: did not answer within {} s",
            COMPILE_TIMEOUT.as_secs()
        ))),
    }
}

/// `+[MLModel modelWithContentsOfURL:configuration:error:]`.
pub(super) fn load_model(
    compiled: &Path,
    config: &MLModelConfiguration,
) -> Result<Retained<MLModel>, EngineError> {
    let url = dir_url(compiled)?;
    let r = guarded("modelWithContentsOfURL:configuration:error:", || {
        // SAFETY: takes the URL of an `.mlmodelc` directory and a configuration; returns the
        // model or an NSError.
        unsafe { MLModel::modelWithContentsOfURL_configuration_error(&url, config) }
    })?;
    r.map_err(|e| EngineError::Load(ns_error("modelWithContentsOfURL", &e)))
}

/// `-[MLModel predictionFromFeatures:error:]` (synchronous).
pub(super) fn predict(
    model: &MLModel,
    input: &ProtocolObject<dyn MLFeatureProvider>,
) -> Result<Retained<ProtocolObject<dyn MLFeatureProvider>>, EngineError> {
    let r = guarded("predictionFromFeatures:error:", || {
        // SAFETY: takes a feature provider and returns the output provider or an NSError; the
        // input arrays are not touched by us during the call.
        unsafe { model.predictionFromFeatures_error(input) }
    })?;
    r.map_err(|e| EngineError::Eval(ns_error("predictionFromFeatures", &e)))
}

/// The per-user caches folder: `NSSearchPathForDirectoriesInDomains(NSCachesDirectory,
/// NSUserDomainMask)` (the app container's under a sandbox), else `$HOME/Library/Caches`, else
/// `NSTemporaryDirectory()`.
pub(super) fn cache_base() -> PathBuf {
    let searched = guarded("NSSearchPathForDirectoriesInDomains", || {
        NSSearchPathForDirectoriesInDomains(
            NSSearchPathDirectory::CachesDirectory,
            NSSearchPathDomainMask::UserDomainMask,
            true,
        )
        .firstObject()
        .map(|p| p.to_string())
    });
    if let Ok(Some(p)) = searched {
        if !p.is_empty() {
            return PathBuf::from(p);
        }
    }
    if let Some(home) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(home).join("Library/Caches");
    }
    let tmp = guarded("NSTemporaryDirectory", || {
        NSTemporaryDirectory().to_string()
    });
    PathBuf::from(tmp.unwrap_or_else(|_| "/tmp".into()))
}

/// `-[NSProcessInfo operatingSystemVersionString]`, e.g. `Version 14.4 (Build 23E214)`: what a
/// compiled model depends on beyond the program.
pub(super) fn os_version() -> Result<String, EngineError> {
    guarded("operatingSystemVersionString", || {
        NSProcessInfo::processInfo()
            .operatingSystemVersionString()
            .to_string()
    })
}
