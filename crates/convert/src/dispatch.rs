//! Runtime choice of instruction set, once per process, and one `#[target_feature]` instance of
//! every generic body per instruction set.

use std::sync::atomic::{AtomicU8, Ordering};

use crate::kernel::Scalar;
use crate::{layout, weights};

/// The conversion code path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub enum Backend {
    /// Portable software rounding.
    Scalar,
    /// x86_64 AVX2 + F16C (`vcvtps2ph` / `vcvtph2ps`).
    F16c,
    /// aarch64 NEON with the fp16 conversions (`fcvtn` / `fcvtl`).
    Neon,
}

impl Backend {
    /// True when this CPU can run the backend.
    pub fn is_available(self) -> bool {
        match self {
            Backend::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Backend::F16c => {
                std::is_x86_feature_detected!("f16c") && std::is_x86_feature_detected!("avx2")
            }
            #[cfg(target_arch = "aarch64")]
            Backend::Neon => std::arch::is_aarch64_feature_detected!("fp16"),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// Every backend this CPU can run, best last.
    pub fn available() -> Vec<Backend> {
        [Backend::Scalar, Backend::F16c, Backend::Neon]
            .into_iter()
            .filter(|b| b.is_available())
            .collect()
    }

    /// The fastest backend this CPU can run (detected once, then cached).
    pub fn best() -> Backend {
        static CACHE: AtomicU8 = AtomicU8::new(0);
        match CACHE.load(Ordering::Relaxed) {
            1 => Backend::Scalar,
            2 => Backend::F16c,
            3 => Backend::Neon,
            _ => {
                let b = *Backend::available()
                    .last()
                    .expect("scalar is always available");
                let code = match b {
                    Backend::Scalar => 1,
                    Backend::F16c => 2,
                    Backend::Neon => 3,
                };
                CACHE.store(code, Ordering::Relaxed);
                b
            }
        }
    }
}

/// Generates, for one backend, a module of `#[target_feature]` entry points that instantiate
/// the generic bodies with that backend's kernel.
macro_rules! instances {
    ($(#[$cfg:meta])* $module:ident, $kernel:ty, $features:literal) => {
        $(#[$cfg])*
        pub(crate) mod $module {
            #[allow(unused_imports)]
            use super::*;
            #[allow(unused_imports)]
            use crate::kernel::*;

            /// # Safety
            /// The CPU has the features; the arguments meet `layout::narrow`'s contract.
            #[target_feature(enable = $features)]
            pub(crate) unsafe fn narrow(src: &[f32], dst: &mut [u16]) {
                // SAFETY: forwarded contract.
                unsafe { layout::narrow::<$kernel>(src, dst) }
            }

            /// # Safety
            /// The CPU has the features; the arguments meet `layout::widen`'s contract.
            #[target_feature(enable = $features)]
            pub(crate) unsafe fn widen(src: &[u16], dst: &mut [f32]) {
                // SAFETY: forwarded contract.
                unsafe { layout::widen::<$kernel>(src, dst) }
            }

            /// # Safety
            /// The CPU has the features; the arguments meet `layout::act`'s contract.
            #[target_feature(enable = $features)]
            pub(crate) unsafe fn act(
                src: &[f32], n: usize, k: usize, stride: usize, dst: &mut [u16], np: usize,
            ) {
                // SAFETY: forwarded contract.
                unsafe { layout::act::<$kernel>(src, n, k, stride, dst, np) }
            }

            /// # Safety
            /// The CPU has the features; the arguments meet `layout::out`'s contract.
            #[target_feature(enable = $features)]
            pub(crate) unsafe fn out(
                src: &[u16], m: usize, np: usize, n: usize, dst: &mut [f32], stride: usize,
            ) {
                // SAFETY: forwarded contract.
                unsafe { layout::out::<$kernel>(src, m, np, n, dst, stride) }
            }

            /// # Safety
            /// The CPU has the features; the arguments meet `layout::transpose`'s contract.
            #[target_feature(enable = $features)]
            pub(crate) unsafe fn transpose(
                src: &[u16], rows: usize, cols: usize, ss: usize, dst: &mut [u16], ds: usize,
            ) {
                // SAFETY: forwarded contract.
                unsafe { layout::transpose::<$kernel>(src, rows, cols, ss, dst, ds) }
            }

            /// # Safety
            /// The CPU has the features; the arguments meet `weights::row`'s contract.
            #[target_feature(enable = $features)]
            pub(crate) unsafe fn row(ty: i32, src: &[u8], dst: &mut [u16]) {
                // SAFETY: forwarded contract.
                unsafe { weights::row::<$kernel>(ty, src, dst) }
            }
        }
    };
}

// The scalar instance needs some feature name for the macro; every target has one baseline
// feature that changes nothing: sse2 on x86_64, neon on aarch64. Other targets get a plain module.
instances!(
    #[cfg(target_arch = "x86_64")]
    scalar,
    Scalar,
    "sse2"
);
instances!(
    #[cfg(target_arch = "aarch64")]
    scalar,
    Scalar,
    "neon"
);
instances!(
    #[cfg(target_arch = "x86_64")]
    f16c,
    F16c,
    "avx2,f16c"
);
instances!(
    #[cfg(target_arch = "aarch64")]
    neon,
    Neon,
    "neon,fp16"
);

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
pub(crate) mod scalar {
    use super::*;
    pub(crate) unsafe fn narrow(src: &[f32], dst: &mut [u16]) {
        unsafe { layout::narrow::<Scalar>(src, dst) }
    }
    pub(crate) unsafe fn widen(src: &[u16], dst: &mut [f32]) {
        unsafe { layout::widen::<Scalar>(src, dst) }
    }
    pub(crate) unsafe fn act(s: &[f32], n: usize, k: usize, st: usize, d: &mut [u16], np: usize) {
        unsafe { layout::act::<Scalar>(s, n, k, st, d, np) }
    }
    pub(crate) unsafe fn out(s: &[u16], m: usize, np: usize, n: usize, d: &mut [f32], st: usize) {
        unsafe { layout::out::<Scalar>(s, m, np, n, d, st) }
    }
    pub(crate) unsafe fn row(ty: i32, src: &[u8], dst: &mut [u16]) {
        unsafe { weights::row::<Scalar>(ty, src, dst) }
    }
    pub(crate) unsafe fn transpose(
        s: &[u16],
        r: usize,
        c: usize,
        ss: usize,
        d: &mut [u16],
        ds: usize,
    ) {
        unsafe { layout::transpose::<Scalar>(s, r, c, ss, d, ds) }
    }
}

/// Calls `$f` of the module for `$backend` (checked available by the caller).
macro_rules! call {
    ($backend:expr, $f:ident($($arg:expr),*)) => {{
        match $backend {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the caller checked availability; the public wrapper checked the bounds.
            $crate::dispatch::Backend::F16c => unsafe { $crate::dispatch::f16c::$f($($arg),*) },
            #[cfg(target_arch = "aarch64")]
            // SAFETY: as above.
            $crate::dispatch::Backend::Neon => unsafe { $crate::dispatch::neon::$f($($arg),*) },
            // SAFETY: baseline features only; bounds checked by the public wrapper.
            _ => unsafe { $crate::dispatch::scalar::$f($($arg),*) },
        }
    }};
}
pub(crate) use call;
