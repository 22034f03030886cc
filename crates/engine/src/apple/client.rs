//! AppleNeuralEngine.framework: loading it, its classes, and one small safe function per call.
//!
//! Each function below holds one `unsafe` block that sends one message. The selectors and their C
//! types are those of ane-private-api.md §1.2 (iOS 16.4.1 headers, iOS 26.1 decompile, and the call
//! casts of maderix, ggml-ane, Orion and axiom). objc2 checks argument and return encodings against
//! the runtime in debug builds, so a wrong guess panics there instead of corrupting memory; [`load`]
//! probes every selector first so that a missing one makes the engine unavailable instead.

use std::ffi::CStr;

use objc2::rc::Retained;
use objc2::runtime::{AnyClass, AnyObject, Sel};
use objc2::{msg_send, sel};
use objc2_foundation::{NSArray, NSData, NSDictionary, NSError, NSNumber, NSString};

use crate::macos::{class, guarded, ns_error};

use super::surface::IoSurface;
use crate::driver_plan::{DriverPlan, PROCEDURE_INDEX};
use crate::EngineError;

/// Where the framework lives.
pub(super) const FRAMEWORK_PATH: &CStr =
    c"/System/Library/PrivateFrameworks/AppleNeuralEngine.framework/AppleNeuralEngine";

/// The classes the driver needs, resolved once.
#[derive(Clone, Copy, Debug)]
pub(super) struct Client {
    descriptor: &'static AnyClass,
    model: &'static AnyClass,
    request: &'static AnyClass,
    io_object: &'static AnyClass,
    device_info: Option<&'static AnyClass>,
    /// `-[_ANEInMemoryModel localModelPath]` exists (else `NSTemporaryDirectory()/<hex>`).
    has_local_model_path: bool,
}

/// What [`load`] found, for `ane doctor`.
#[derive(Clone, Debug, Default)]
pub struct Discovery {
    /// The framework image opened.
    pub framework: bool,
    /// `(class name, found)` for the four required classes and `_ANEDeviceInfo`.
    pub classes: Vec<(String, bool)>,
    /// Required selectors that were missing, as `+[Class sel]` / `-[Class sel]`.
    pub missing_selectors: Vec<String>,
}

/// Opens the framework and resolves classes and selectors.
///
/// # Errors
/// [`EngineError::Unavailable`] naming what is missing; the [`Discovery`] says the same in detail.
pub(super) fn load() -> (Result<Client, EngineError>, Discovery) {
    let mut d = Discovery::default();
    // SAFETY: dlopen with a constant NUL-terminated path; the handle is kept for the life of the
    // process on purpose (the classes it registers must stay valid), so it is never closed.
    let handle = unsafe { libc::dlopen(FRAMEWORK_PATH.as_ptr(), libc::RTLD_NOW) };
    d.framework = !handle.is_null();
    if !d.framework {
        return (
            Err(EngineError::Unavailable(format!(
                "cannot open {}",
                FRAMEWORK_PATH.to_string_lossy()
            ))),
            d,
        );
    }
    let names: [&CStr; 5] = [
        c"_ANEInMemoryModelDescriptor",
        c"_ANEInMemoryModel",
        c"_ANERequest",
        c"_ANEIOSurfaceObject",
        c"_ANEDeviceInfo",
    ];
    let found: Vec<Option<&'static AnyClass>> = names.iter().map(|n| class(n)).collect();
    for (n, c) in names.iter().zip(&found) {
        d.classes
            .push((n.to_string_lossy().into_owned(), c.is_some()));
    }
    let (Some(descriptor), Some(model), Some(request), Some(io_object)) =
        (found[0], found[1], found[2], found[3])
    else {
        let missing: Vec<&str> = d
            .classes
            .iter()
            .take(4)
            .filter(|(_, ok)| !ok)
            .map(|(n, _)| n.as_str())
            .collect();
        return (
            Err(EngineError::Unavailable(format!(
                "AppleNeuralEngine.framework lacks {}",
                missing.join(", ")
            ))),
            d,
        );
    };
    let class_sels: [(&AnyClass, Sel); 4] = [
        (descriptor, sel!(modelWithMILText:weights:optionsPlist:)),
        (model, sel!(inMemoryModelWithDescriptor:)),
        (io_object, sel!(objectWithIOSurface:)),
        (
            request,
            sel!(requestWithInputs:inputIndices:outputs:outputIndices:weightsBuffer:perfStats:procedureIndex:),
        ),
    ];
    for (c, s) in class_sels {
        if c.class_method(s).is_none() {
            d.missing_selectors.push(format!(
                "+[{} {}]",
                c.name().to_string_lossy(),
                s.name().to_string_lossy()
            ));
        }
    }
    let instance_sels = [
        sel!(hexStringIdentifier),
        sel!(compileWithQoS:options:error:),
        sel!(loadWithQoS:options:error:),
        sel!(evaluateWithQoS:options:request:error:),
        sel!(unloadWithQoS:error:),
    ];
    for s in instance_sels {
        if !model.responds_to(s) {
            d.missing_selectors.push(format!(
                "-[_ANEInMemoryModel {}]",
                s.name().to_string_lossy()
            ));
        }
    }
    if !d.missing_selectors.is_empty() {
        return (
            Err(EngineError::Unavailable(format!(
                "AppleNeuralEngine.framework lacks {}",
                d.missing_selectors.join(", ")
            ))),
            d,
        );
    }
    let client = Client {
        descriptor,
        model,
        request,
        io_object,
        device_info: found[4],
        has_local_model_path: model.responds_to(sel!(localModelPath)),
    };
    (Ok(client), d)
}

impl Client {
    /// `_ANEDeviceInfo`, when the framework has it.
    pub(super) fn device_info(&self) -> Option<&'static AnyClass> {
        self.device_info
    }

    /// `+[_ANEDeviceInfo aneSubType]`, e.g. `h16`, when the class and method exist.
    pub(super) fn ane_subtype(&self) -> Option<String> {
        let cls = self.device_info?;
        cls.class_method(sel!(aneSubType))?;
        let s: Option<Retained<NSString>> = guarded("aneSubType", || {
            // SAFETY: `+aneSubType` takes no argument and returns an NSString or nil (§1.5); the
            // method's presence was checked just above.
            unsafe { msg_send![cls, aneSubType] }
        })
        .ok()?;
        s.map(|s| s.to_string())
    }

    /// Descriptor then model: `modelWithMILText:weights:optionsPlist:` and
    /// `inMemoryModelWithDescriptor:`.
    pub(super) fn model(&self, plan: &DriverPlan) -> Result<Retained<AnyObject>, EngineError> {
        let mil = NSData::with_bytes(&plan.mil);
        let weights = weights_dictionary(plan);
        let options: Option<&AnyObject> = None;
        let desc: Option<Retained<AnyObject>> = guarded(
            "modelWithMILText:weights:optionsPlist:",
            || {
                // SAFETY: §1.3.1: MIL as NSData, a non-nil weights NSDictionary, optionsPlist nil;
                // returns a descriptor or nil.
                unsafe {
                    msg_send![self.descriptor, modelWithMILText: &*mil, weights: &*weights, optionsPlist: options]
                }
            },
        )?;
        let desc = desc.ok_or_else(|| {
            EngineError::Compile("modelWithMILText:weights:optionsPlist: returned nil".into())
        })?;
        let model: Option<Retained<AnyObject>> = guarded("inMemoryModelWithDescriptor:", || {
            // SAFETY: `+inMemoryModelWithDescriptor:` takes the descriptor and returns a model or
            // nil.
            unsafe { msg_send![self.model, inMemoryModelWithDescriptor: &*desc] }
        })?;
        model
            .ok_or_else(|| EngineError::Compile("inMemoryModelWithDescriptor: returned nil".into()))
    }

    /// `-hexStringIdentifier` (`SHA256(MIL)_SHA256(weights)_SHA256(options)`).
    pub(super) fn hex_identifier(&self, model: &AnyObject) -> Result<String, EngineError> {
        let s: Option<Retained<NSString>> = guarded("hexStringIdentifier", || {
            // SAFETY: `-hexStringIdentifier` takes no argument and returns an NSString.
            unsafe { msg_send![model, hexStringIdentifier] }
        })?;
        s.map(|s| s.to_string())
            .ok_or_else(|| EngineError::Compile("hexStringIdentifier returned nil".into()))
    }

    /// The model directory: `-localModelPath` when it exists (the conservative form: what the
    /// compiler resolves `@model_path` to), else `NSTemporaryDirectory()/<hex>` (the runtime probe
    /// for older frameworks). Never `std::env::temp_dir()`, which differs when `TMPDIR` is unset.
    pub(super) fn model_dir(&self, model: &AnyObject, hex: &str) -> std::path::PathBuf {
        if self.has_local_model_path {
            let p: Option<Retained<NSString>> = guarded("localModelPath", || {
                // SAFETY: `-localModelPath` takes no argument and returns an NSString or nil; its
                // presence was probed in `load`.
                unsafe { msg_send![model, localModelPath] }
            })
            .ok()
            .flatten();
            if let Some(p) = p {
                return std::path::PathBuf::from(p.to_string());
            }
        }
        std::path::PathBuf::from(objc2_foundation::NSTemporaryDirectory().to_string()).join(hex)
    }

    /// `-compileWithQoS:options:error:` with `@{}`.
    pub(super) fn compile(&self, model: &AnyObject, qos: u32) -> Result<(), EngineError> {
        let opts = empty_dictionary();
        let r: Result<(), Retained<NSError>> = guarded("compileWithQoS:options:error:", || {
            // SAFETY: `BOOL (id, SEL, unsigned int, NSDictionary*, NSError**)` (§1.2); `error: _`
            // maps NO plus the NSError to Err.
            unsafe { msg_send![model, compileWithQoS: qos, options: &*opts, error: _] }
        })?;
        r.map_err(|e| EngineError::Compile(ns_error("compileWithQoS", &e)))
    }

    /// `-loadWithQoS:options:error:` with `@{}` (no retry here; see `with_one_retry`).
    pub(super) fn load(&self, model: &AnyObject, qos: u32) -> Result<(), EngineError> {
        let opts = empty_dictionary();
        let r: Result<(), Retained<NSError>> = guarded("loadWithQoS:options:error:", || {
            // SAFETY: `BOOL (id, SEL, unsigned int, NSDictionary*, NSError**)` (§1.2).
            unsafe { msg_send![model, loadWithQoS: qos, options: &*opts, error: _] }
        })?;
        r.map_err(|e| EngineError::Load(ns_error("loadWithQoS", &e)))
    }

    /// `-evaluateWithQoS:options:request:error:` (synchronous).
    pub(super) fn evaluate(
        &self,
        model: &AnyObject,
        request: &AnyObject,
        qos: u32,
    ) -> Result<(), EngineError> {
        let opts = empty_dictionary();
        let r: Result<(), Retained<NSError>> = guarded(
            "evaluateWithQoS:options:request:error:",
            || {
                // SAFETY: `BOOL (id, SEL, unsigned int, NSDictionary*, _ANERequest*, NSError**)`
                // (§1.2); the request's surfaces are not touched by us during the call (caller
                // holds the lock).
                unsafe {
                    msg_send![model, evaluateWithQoS: qos, options: &*opts, request: request, error: _]
                }
            },
        )?;
        r.map_err(|e| EngineError::Eval(ns_error("evaluateWithQoS", &e)))
    }

    /// `-unloadWithQoS:error:` (two arguments).
    pub(super) fn unload(&self, model: &AnyObject, qos: u32) -> Result<(), EngineError> {
        let r: Result<(), Retained<NSError>> = guarded("unloadWithQoS:error:", || {
            // SAFETY: `BOOL (id, SEL, unsigned int, NSError**)` (§1.3.10).
            unsafe { msg_send![model, unloadWithQoS: qos, error: _] }
        })?;
        r.map_err(|e| EngineError::Load(ns_error("unloadWithQoS", &e)))
    }

    /// `+[_ANEIOSurfaceObject objectWithIOSurface:]`.
    pub(super) fn io_object(&self, s: &IoSurface) -> Result<Retained<AnyObject>, EngineError> {
        let o: Option<Retained<AnyObject>> = guarded("objectWithIOSurface:", || {
            // SAFETY: takes an `IOSurfaceRef` (encoded `^{__IOSurface=}`) and returns a wrapper
            // that retains the surface; `s` is live.
            unsafe { msg_send![self.io_object, objectWithIOSurface: s.as_ptr()] }
        })?;
        o.ok_or_else(|| EngineError::Surface("objectWithIOSurface: returned nil".into()))
    }

    /// `+[_ANERequest requestWithInputs:inputIndices:outputs:outputIndices:weightsBuffer:perfStats:procedureIndex:]`
    /// with indices `0..n` in binding order, no weights buffer, no perf stats, procedure 0.
    pub(super) fn request(
        &self,
        inputs: &[Retained<AnyObject>],
        outputs: &[Retained<AnyObject>],
    ) -> Result<Retained<AnyObject>, EngineError> {
        let ins = NSArray::from_retained_slice(inputs);
        let outs = NSArray::from_retained_slice(outputs);
        let in_idx = indices(inputs.len());
        let out_idx = indices(outputs.len());
        let procedure = NSNumber::new_u32(PROCEDURE_INDEX);
        let none: Option<&AnyObject> = None;
        let r: Option<Retained<AnyObject>> = guarded("requestWithInputs:...", || {
            // SAFETY: argument types as in §1.2: four NSArrays, nil, nil, NSNumber; returns a
            // request.
            unsafe {
                msg_send![
                    self.request,
                    requestWithInputs: &*ins,
                    inputIndices: &*in_idx,
                    outputs: &*outs,
                    outputIndices: &*out_idx,
                    weightsBuffer: none,
                    perfStats: none,
                    procedureIndex: &*procedure
                ]
            }
        })?;
        r.ok_or_else(|| EngineError::Eval("requestWithInputs:... returned nil".into()))
    }
}

fn indices(n: usize) -> Retained<NSArray<NSNumber>> {
    let nums: Vec<Retained<NSNumber>> = (0..n).map(NSNumber::new_usize).collect();
    NSArray::from_retained_slice(&nums)
}

fn empty_dictionary() -> Retained<NSDictionary<NSString, AnyObject>> {
    NSDictionary::from_slices::<NSString>(&[], &[])
}

/// `{ key: { "offset": @0, "data": NSData } }` from the plan; `@{}` when it has no entries.
fn weights_dictionary(plan: &DriverPlan) -> Retained<NSDictionary<NSString, AnyObject>> {
    let offset_key = NSString::from_str("offset");
    let data_key = NSString::from_str("data");
    let mut keys = Vec::new();
    let mut entries: Vec<Retained<NSDictionary<NSString, AnyObject>>> = Vec::new();
    for w in &plan.weights {
        let offset = NSNumber::new_u64(w.offset);
        let data = NSData::with_bytes(&w.data);
        let values: [&AnyObject; 2] = [&offset, &data];
        entries.push(NSDictionary::from_slices(
            &[&*offset_key, &*data_key],
            &values,
        ));
        keys.push(NSString::from_str(&w.key));
    }
    let key_refs: Vec<&NSString> = keys.iter().map(|k| &**k).collect();
    let value_refs: Vec<&AnyObject> = entries.iter().map(|e| -> &AnyObject { e }).collect();
    NSDictionary::from_slices(&key_refs, &value_refs)
}
