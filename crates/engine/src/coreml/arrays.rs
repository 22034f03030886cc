//! Features: fp16 `MLMultiArray`s filled from surfaces, and prediction outputs read back.
//!
//! Both directions go through the array's byte-access handlers (`getMutableBytesWithHandler:`,
//! `getBytesWithHandler:`, macOS 12.3+), which lend the storage for the duration of the call
//! with its size in bytes (and strides), instead of the deprecated `dataPointer`. The layout
//! arithmetic is [`crate::strided`]'s, checked against that size.

use std::cell::{Cell, RefCell};
use std::ffi::c_void;
use std::ptr::NonNull;

use block2::StackBlock;
use objc2::rc::Retained;
use objc2::runtime::{AnyObject, ProtocolObject};
use objc2::AllocAnyThread;
use objc2_core_ml::{
    MLDictionaryFeatureProvider, MLFeatureProvider, MLFeatureValue, MLMultiArray,
    MLMultiArrayDataType,
};
use objc2_foundation::{NSArray, NSDictionary, NSInteger, NSNumber, NSString};

use super::client::{guarded, ns_error};
use crate::coreml_plan::Feature;
use crate::EngineError;

/// Bytes per fp16 element.
const FP16: usize = 2;

fn numbers(v: &[usize]) -> Retained<NSArray<NSNumber>> {
    let n: Vec<Retained<NSNumber>> = v.iter().map(|&x| NSNumber::new_usize(x)).collect();
    NSArray::from_retained_slice(&n)
}

fn usizes(v: &NSArray<NSNumber>) -> Result<Vec<usize>, String> {
    v.to_vec()
        .iter()
        .map(|n| {
            let x = n.integerValue();
            usize::try_from(x).map_err(|_| format!("negative shape or stride {x}"))
        })
        .collect()
}

/// Storage lent by a handler, as a byte slice length.
fn lent_len(size: NSInteger) -> Result<usize, String> {
    usize::try_from(size).map_err(|_| format!("storage of {size} bytes"))
}

/// A new fp16 array of the feature's shape (`initWithShape:dataType:error:`) holding the packed
/// tensor at the start of `packed`, copied in through `getMutableBytesWithHandler:`.
pub(super) fn input(f: &Feature, packed: &[u8]) -> Result<Retained<MLMultiArray>, EngineError> {
    let shape = numbers(&f.shape);
    let made = guarded("initWithShape:dataType:error:", || {
        // SAFETY: an NSArray of NSNumber and a documented data type (Float16, macOS 12+); returns
        // the array (contents uninitialised, all written below) or an NSError.
        unsafe {
            MLMultiArray::initWithShape_dataType_error(
                MLMultiArray::alloc(),
                &shape,
                MLMultiArrayDataType::Float16,
            )
        }
    })?;
    let array =
        made.map_err(|e| EngineError::Eval(ns_error(&format!("MLMultiArray `{}`", f.name), &e)))?;
    let result: Cell<Option<Result<(), String>>> = Cell::new(None);
    let handler = StackBlock::new(
        |bytes: NonNull<c_void>, size: NSInteger, strides: NonNull<NSArray<NSNumber>>| {
            // SAFETY: Core ML passes the array's strides, a valid NSArray for this call.
            let strides = usizes(unsafe { strides.as_ref() });
            let r = strides.and_then(|strides| {
                let len = lent_len(size)?;
                // SAFETY: Core ML lends `size` writable bytes at `bytes` until the handler
                // returns; nothing else touches them meanwhile.
                let storage =
                    unsafe { std::slice::from_raw_parts_mut(bytes.as_ptr().cast::<u8>(), len) };
                crate::strided::scatter(packed, storage, &f.shape, &strides, FP16)
            });
            result.set(Some(r));
        },
    );
    guarded("getMutableBytesWithHandler:", || {
        // SAFETY: the handler has the declared signature and is called synchronously
        // (non-escaping); it only borrows `packed`, `f` and `result`, which outlive the call.
        unsafe { array.getMutableBytesWithHandler(&handler) }
    })?;
    match result.take() {
        Some(Ok(())) => Ok(array),
        Some(Err(e)) => Err(EngineError::Eval(format!("input `{}`: {e}", f.name))),
        None => Err(EngineError::Eval(format!(
            "input `{}`: getMutableBytesWithHandler did not call its handler",
            f.name
        ))),
    }
}

/// `MLDictionaryFeatureProvider` of the arrays, keyed by feature name.
pub(super) fn provider(
    features: &[Feature],
    arrays: &[Retained<MLMultiArray>],
) -> Result<Retained<MLDictionaryFeatureProvider>, EngineError> {
    let keys: Vec<Retained<NSString>> = features
        .iter()
        .map(|f| NSString::from_str(&f.name))
        .collect();
    let values = guarded("featureValueWithMultiArray:", || {
        arrays
            .iter()
            // SAFETY: wraps an MLMultiArray in a feature value; no other argument.
            .map(|a| unsafe { MLFeatureValue::featureValueWithMultiArray(a) })
            .collect::<Vec<_>>()
    })?;
    let key_refs: Vec<&NSString> = keys.iter().map(|k| &**k).collect();
    let value_refs: Vec<&AnyObject> = values.iter().map(|v| -> &AnyObject { v }).collect();
    let dict = NSDictionary::from_slices(&key_refs, &value_refs);
    let r = guarded("initWithDictionary:error:", || {
        // SAFETY: the dictionary maps NSString names to MLFeatureValues, as the initialiser
        // takes; returns the provider or an NSError.
        unsafe {
            MLDictionaryFeatureProvider::initWithDictionary_error(
                MLDictionaryFeatureProvider::alloc(),
                &dict,
            )
        }
    })?;
    r.map_err(|e| EngineError::Eval(ns_error("MLDictionaryFeatureProvider", &e)))
}

/// The provider as the protocol object `predictionFromFeatures:error:` takes.
pub(super) fn as_provider(
    p: &MLDictionaryFeatureProvider,
) -> &ProtocolObject<dyn MLFeatureProvider> {
    ProtocolObject::from_ref(p)
}

/// Copies output `f` of a prediction into `packed` (its surface's bytes), packed: the array must
/// be fp16 of the feature's shape; its strides may be padded.
pub(super) fn output(
    out: &ProtocolObject<dyn MLFeatureProvider>,
    f: &Feature,
    packed: &mut [u8],
) -> Result<(), EngineError> {
    let name = NSString::from_str(&f.name);
    let eval = |what: String| EngineError::Eval(format!("output `{}`: {what}", f.name));
    let array = guarded("featureValueForName: multiArrayValue", || {
        // SAFETY: `featureValueForName:` takes an NSString and returns a value or nil;
        // `multiArrayValue` returns the array or nil for other feature types.
        unsafe {
            out.featureValueForName(&name)
                .and_then(|v| v.multiArrayValue())
        }
    })?
    .ok_or_else(|| eval("missing, or not a multi-array".into()))?;
    let (data_type, shape, strides) = guarded("dataType shape strides", || {
        // SAFETY: three property reads without arguments.
        unsafe { (array.dataType(), array.shape(), array.strides()) }
    })?;
    if data_type != MLMultiArrayDataType::Float16 {
        return Err(eval(format!(
            "data type {:#x} is not Float16 ({:#x})",
            data_type.0,
            MLMultiArrayDataType::Float16.0
        )));
    }
    let shape = usizes(&shape).map_err(eval)?;
    if shape != f.shape {
        return Err(eval(format!(
            "shape {shape:?}, the plan says {:?}",
            f.shape
        )));
    }
    let strides = usizes(&strides).map_err(eval)?;
    let result: Cell<Option<Result<(), String>>> = Cell::new(None);
    let dst = RefCell::new(packed);
    let handler = StackBlock::new(|bytes: NonNull<c_void>, size: NSInteger| {
        let r = lent_len(size).and_then(|len| {
            // SAFETY: Core ML lends `size` readable bytes at `bytes` until the handler returns.
            let storage = unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<u8>(), len) };
            let mut dst = dst.borrow_mut();
            crate::strided::gather(storage, &mut dst, &f.shape, &strides, FP16)
        });
        result.set(Some(r));
    });
    guarded("getBytesWithHandler:", || {
        // SAFETY: the handler has the declared signature and is called synchronously
        // (non-escaping); it borrows `dst`, `strides`, `f` and `result`, which outlive the call.
        unsafe { array.getBytesWithHandler(&handler) }
    })?;
    match result.take() {
        Some(Ok(())) => Ok(()),
        Some(Err(e)) => Err(eval(e)),
        None => Err(eval("getBytesWithHandler did not call its handler".into())),
    }
}
