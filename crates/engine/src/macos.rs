//! What both macOS engines (`apple`, `coreml`) do alike with the Objective-C runtime and the
//! kernel: the exception guard, `NSError` lines, class look-up, sysctls, and the host signals of
//! [`crate::host`]. **Only type-checked** (`cargo xtask check-apple`).

use std::ffi::CStr;

use objc2::runtime::{AnyClass, Bool, Sel};
use objc2::{msg_send, sel};
use objc2_foundation::NSError;

use crate::host::HostSignals;
use crate::EngineError;

/// Turns an `NSError` into one line: description, domain, code and `userInfo` (where the ANE and
/// Core ML compilers say what they disliked, not in the description).
pub(crate) fn ns_error(step: &str, e: &NSError) -> String {
    let info = e.userInfo();
    let info = if info.count() == 0 {
        String::new()
    } else {
        format!(", userInfo {info:?}")
    };
    format!(
        "{step}: {} (domain {}, code {}{info})",
        e.localizedDescription(),
        e.domain(),
        e.code()
    )
}

/// Runs message sends under `@try`/`@catch` (objc2's `exception` feature). A class that throws
/// (an argument it no longer takes, a selector that changed meaning) would otherwise unwind an
/// Objective-C exception into Rust and abort the host process; here it becomes an
/// [`EngineError::Exception`] naming the call, the exception's name and reason, and the op falls
/// back to the CPU.
pub(crate) fn guarded<R>(call: &str, send: impl FnOnce() -> R) -> Result<R, EngineError> {
    objc2::exception::catch(std::panic::AssertUnwindSafe(send)).map_err(|e| {
        let what = match e {
            Some(e) => format!("{e:?}"),
            None => "nil exception object".to_string(),
        };
        EngineError::Exception(format!("{call}: {what}"))
    })
}

/// Whether the Objective-C runtime knows a class (its framework is loaded and the OS has it).
pub(crate) fn class(name: &CStr) -> Option<&'static AnyClass> {
    AnyClass::get(name)
}

/// The raw bytes of a sysctl, `None` when it does not exist or cannot be read.
fn sysctl_bytes(name: &CStr) -> Option<Vec<u8>> {
    let mut buf = [0u8; 256];
    let mut len = buf.len();
    // SAFETY: sysctlbyname with a NUL-terminated name, an output buffer of `len` bytes and its
    // length; no new value is set.
    let r = unsafe {
        libc::sysctlbyname(
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            &mut len,
            std::ptr::null_mut(),
            0,
        )
    };
    (r == 0).then(|| buf[..len.min(buf.len())].to_vec())
}

/// A string sysctl (NUL-terminated), trimmed.
fn sysctl_string(name: &CStr) -> Option<String> {
    let b = sysctl_bytes(name)?;
    let s = b.split(|&c| c == 0).next().unwrap_or(&b);
    Some(String::from_utf8_lossy(s).trim().to_string())
}

/// An integer sysctl (`int` or `int64`, native endian) as a flag: non-zero = true.
fn sysctl_flag(name: &CStr) -> Option<bool> {
    let b = sysctl_bytes(name)?;
    match b.len() {
        4 => Some(i32::from_ne_bytes(b[..4].try_into().ok()?) != 0),
        8 => Some(i64::from_ne_bytes(b[..8].try_into().ok()?) != 0),
        _ => None,
    }
}

/// The CPU brand string (`machdep.cpu.brand_string`), e.g. `Apple M4 Pro`.
pub(crate) fn cpu_brand() -> Option<String> {
    sysctl_string(c"machdep.cpu.brand_string")
}

/// A `BOOL` class method of `_ANEDeviceInfo` (`hasANE`, `isVirtualMachine`) sent by `send`,
/// when the method exists and does not throw.
fn device_info_flag(cls: &AnyClass, sel: Sel, send: impl FnOnce() -> Bool) -> Option<bool> {
    cls.class_method(sel)?;
    guarded("_ANEDeviceInfo", send).ok().map(Bool::as_bool)
}

/// The host signals ([`crate::host`]): the public sysctls, and `_ANEDeviceInfo`'s answers when
/// `device_info` is the class (the private driver passes the one it resolved; Core ML passes
/// what the runtime already knows, without opening the private framework).
pub(crate) fn host_signals(device_info: Option<&AnyClass>) -> HostSignals {
    let (has_ane, is_vm) = device_info.map_or((None, None), |c| {
        (
            device_info_flag(c, sel!(hasANE), || {
                // SAFETY: `+hasANE` takes no argument and returns BOOL (iOS 16.4.1 headers, iOS
                // 26.1 decompile); its presence is checked before the send.
                unsafe { msg_send![c, hasANE] }
            }),
            device_info_flag(c, sel!(isVirtualMachine), || {
                // SAFETY: `+isVirtualMachine` takes no argument and returns BOOL (same sources);
                // its presence is checked before the send.
                unsafe { msg_send![c, isVirtualMachine] }
            }),
        )
    });
    HostSignals {
        hv_vmm_present: sysctl_flag(c"kern.hv_vmm_present"),
        arm64: sysctl_flag(c"hw.optional.arm64"),
        brand: cpu_brand(),
        has_ane,
        is_vm,
    }
}
