//! `MLComputePlan` (macOS 14.4+): the device Core ML prefers for each operation of a program.
//!
//! The class is looked up at run time: on an older macOS it is missing and the placement is
//! `None` (which [`crate::coreml_plan::verdict`] refuses). Loading a plan is asynchronous only;
//! the driver blocks on it with a timeout, and the completion handler walks the plan itself
//! (`modelStructure.program.functions["main"].block.operations`, then
//! `computeDeviceUsageForMLProgramOperation:` and `preferredComputeDevice` for each) and sends
//! plain data back, so no Core ML object crosses threads.

use std::ffi::CStr;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::mpsc;
use std::time::Duration;

use block2::RcBlock;
use objc2::runtime::AnyClass;
use objc2_core_ml::{MLComputePlan, MLModelConfiguration};
use objc2_foundation::{NSError, NSObjectProtocol, NSString};

use super::client::{class, dir_url, guarded, ns_error};
use crate::coreml_plan::{placed, OpDevice, OpPlacement};
use crate::EngineError;

/// How long to wait for a compute plan.
pub(super) const PLAN_TIMEOUT: Duration = Duration::from_secs(30);

/// The device classes (macOS 14+) and what they mean.
const DEVICES: [(&CStr, OpDevice); 3] = [
    (c"MLNeuralEngineComputeDevice", OpDevice::NeuralEngine),
    (c"MLCPUComputeDevice", OpDevice::Cpu),
    (c"MLGPUComputeDevice", OpDevice::Gpu),
];

/// Where each operation of the compiled model at `compiled` runs under `config`: `Ok(None)` when
/// this macOS has no `MLComputePlan`.
///
/// # Errors
/// The plan failed to load (its NSError), did not answer within [`PLAN_TIMEOUT`], or was not an
/// ML program with a `main` function; exceptions as usual.
pub(super) fn placement(
    compiled: &Path,
    config: &MLModelConfiguration,
) -> Result<Option<Vec<OpPlacement>>, EngineError> {
    if class(c"MLComputePlan").is_none() {
        return Ok(None);
    }
    let url = dir_url(compiled)?;
    let (tx, rx) = mpsc::channel::<Result<Vec<OpPlacement>, EngineError>>();
    let handler = RcBlock::new(move |plan: *mut MLComputePlan, error: *mut NSError| {
        let r = match (NonNull::new(plan), NonNull::new(error)) {
            // SAFETY: Core ML passes a valid plan, alive for the duration of the handler.
            (Some(plan), _) => walk(unsafe { plan.as_ref() }),
            (None, Some(e)) => Err(EngineError::Load(ns_error(
                "MLComputePlan loadContentsOfURL",
                // SAFETY: a valid NSError, alive for the duration of the handler.
                unsafe { e.as_ref() },
            ))),
            (None, None) => Err(EngineError::Load(
                "MLComputePlan loadContentsOfURL: neither a plan nor an error".into(),
            )),
        };
        // After a timeout nobody listens any more: nothing to do.
        let _ = tx.send(r);
    });
    guarded(
        "MLComputePlan loadContentsOfURL:configuration:completionHandler:",
        || {
            // SAFETY: takes the URL of an `.mlmodelc` directory, a configuration and a block of
            // the declared signature, which Core ML copies and calls once.
            unsafe {
                MLComputePlan::loadContentsOfURL_configuration_completionHandler(
                    &url, config, &handler,
                )
            }
        },
    )?;
    match rx.recv_timeout(PLAN_TIMEOUT) {
        Ok(r) => r.map(Some),
        Err(_) => Err(EngineError::Load(format!(
            "MLComputePlan did not answer within {} s",
            PLAN_TIMEOUT.as_secs()
        ))),
    }
}

/// The operations of `main` and their preferred devices (constants without one are left out).
fn walk(plan: &MLComputePlan) -> Result<Vec<OpPlacement>, EngineError> {
    let devices: Vec<(&'static AnyClass, OpDevice)> = DEVICES
        .iter()
        .filter_map(|&(name, d)| Some((class(name)?, d)))
        .collect();
    let main = NSString::from_str("main");
    let walked = guarded("MLComputePlan modelStructure...operations", || {
        // SAFETY: property reads without arguments and `objectForKey:` with an NSString key, as
        // in Apple's MLComputePlan example; each returns what its binding declares.
        let ops = unsafe {
            let Some(program) = plan.modelStructure().program() else {
                return Err("the compiled model is not an ML program".to_string());
            };
            let Some(function) = program.functions().objectForKey(&main) else {
                return Err("the ML program has no `main` function".to_string());
            };
            function.block().operations()
        };
        let mut out = Vec::new();
        for op in ops.to_vec() {
            // SAFETY: a property read and `computeDeviceUsageForMLProgramOperation:` with an
            // operation of this plan's structure; the usage is nil when undetermined.
            let (raw, usage) = unsafe {
                (
                    op.operatorName().to_string(),
                    plan.computeDeviceUsageForMLProgramOperation(&op),
                )
            };
            let device = usage.map(|usage| {
                // SAFETY: a property read without arguments.
                let preferred = unsafe { usage.preferredComputeDevice() };
                devices
                    .iter()
                    .find(|(c, _)| preferred.isKindOfClass(c))
                    .map_or(OpDevice::Unknown, |&(_, d)| d)
            });
            // `ios18.matmul` -> `matmul`, constants without a usage left out (`placed`).
            out.extend(placed(&raw, device));
        }
        Ok(out)
    })?;
    walked.map_err(|e| EngineError::Load(format!("MLComputePlan: {e}")))
}
