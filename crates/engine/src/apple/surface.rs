//! Flat IOSurfaces: the buffers a request binds.
//!
//! Every direct-ANE project creates the same surface (ane-private-api.md §2.1): `width = bytes`,
//! `height = 1`, `bytesPerElement = 1`, `bytesPerRow = bytes`, `allocSize = bytes`,
//! `pixelFormat = 0`. IOSurface is a plain C API, so the few functions used are declared here
//! instead of pulling in a framework crate.

use std::ffi::c_void;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Weak};

use objc2::encode::{Encoding, RefEncode};
use objc2::rc::Retained;
use objc2_foundation::{NSDictionary, NSNumber, NSString};

use crate::surface::{EngineMemory, Handoff};
use crate::EngineError;

/// The opaque `struct __IOSurface`. Its encoding, `^{__IOSurface=}`, is what
/// `+[_ANEIOSurfaceObject objectWithIOSurface:]` declares, so objc2's debug checks accept it.
#[repr(C)]
pub(super) struct IOSurfaceOpaque {
    _private: [u8; 0],
}

// SAFETY: `IOSurfaceRef` is `struct __IOSurface *`; a pointer to this opaque struct encodes as
// `^{__IOSurface=}`, the encoding of the framework's selector argument.
unsafe impl RefEncode for IOSurfaceOpaque {
    const ENCODING_REF: Encoding = Encoding::Pointer(&Encoding::Struct("__IOSurface", &[]));
}

/// `kIOSurfaceLockReadOnly`.
const LOCK_READ_ONLY: u32 = 1;

#[link(name = "IOSurface", kind = "framework")]
extern "C" {
    static kIOSurfaceWidth: &'static NSString;
    static kIOSurfaceHeight: &'static NSString;
    static kIOSurfaceBytesPerElement: &'static NSString;
    static kIOSurfaceBytesPerRow: &'static NSString;
    static kIOSurfaceAllocSize: &'static NSString;
    static kIOSurfacePixelFormat: &'static NSString;
    fn IOSurfaceCreate(properties: *const c_void) -> *mut IOSurfaceOpaque;
    fn IOSurfaceLock(buffer: *mut IOSurfaceOpaque, options: u32, seed: *mut u32) -> i32;
    fn IOSurfaceUnlock(buffer: *mut IOSurfaceOpaque, options: u32, seed: *mut u32) -> i32;
    fn IOSurfaceGetBaseAddress(buffer: *mut IOSurfaceOpaque) -> *mut c_void;
    fn IOSurfaceGetAllocSize(buffer: *mut IOSurfaceOpaque) -> usize;
    fn IOSurfaceGetBytesPerRow(buffer: *mut IOSurfaceOpaque) -> usize;
    fn IOSurfaceGetWidth(buffer: *mut IOSurfaceOpaque) -> usize;
    fn IOSurfaceGetHeight(buffer: *mut IOSurfaceOpaque) -> usize;
}

#[link(name = "CoreFoundation", kind = "framework")]
extern "C" {
    fn CFRelease(cf: *const c_void);
}

/// An owned IOSurface of a fixed size. Released on drop.
#[derive(Debug)]
pub(super) struct IoSurface {
    ptr: NonNull<IOSurfaceOpaque>,
    bytes: usize,
}

// SAFETY: an IOSurface is a kernel object usable from any thread; access to its memory goes
// through IOSurfaceLock/Unlock, and the driver never touches a surface while it is evaluated
// (each program's surfaces sit behind that program's mutex).
unsafe impl Send for IoSurface {}
// SAFETY: as above; `&IoSurface` only reads the pointer and the size.
unsafe impl Sync for IoSurface {}

impl IoSurface {
    /// A flat surface of `bytes` bytes.
    pub(super) fn new(bytes: usize) -> Result<Self, EngineError> {
        let n = NSNumber::new_usize(bytes);
        let one = NSNumber::new_usize(1);
        let zero = NSNumber::new_u32(0);
        // SAFETY: the six keys are constant CFStrings exported by IOSurface.framework, valid for
        // the life of the process.
        let keys: [&NSString; 6] = unsafe {
            [
                kIOSurfaceWidth,
                kIOSurfaceHeight,
                kIOSurfaceBytesPerElement,
                kIOSurfaceBytesPerRow,
                kIOSurfaceAllocSize,
                kIOSurfacePixelFormat,
            ]
        };
        let values: [&NSNumber; 6] = [&n, &one, &one, &n, &n, &zero];
        let props: Retained<NSDictionary<NSString, NSNumber>> =
            NSDictionary::from_slices(&keys, &values);
        // SAFETY: NSDictionary is toll-free bridged to CFDictionaryRef; IOSurfaceCreate copies what
        // it needs and returns a +1 reference or NULL.
        let raw = unsafe { IOSurfaceCreate(Retained::as_ptr(&props).cast()) };
        let ptr = NonNull::new(raw).ok_or_else(|| {
            EngineError::Surface(format!("IOSurfaceCreate({bytes} bytes) failed"))
        })?;
        let s = IoSurface { ptr, bytes };
        let p = s.ptr.as_ptr();
        // SAFETY: `p` is a live surface we own; the four getters only read its properties.
        let g = unsafe {
            crate::surface::Geometry {
                alloc: IOSurfaceGetAllocSize(p),
                bytes_per_row: IOSurfaceGetBytesPerRow(p),
                width: IOSurfaceGetWidth(p),
                height: IOSurfaceGetHeight(p),
            }
        };
        // Read back, not assumed: a surface laid out otherwise is refused (see `check_flat`).
        crate::surface::check_flat(bytes, g)?;
        Ok(s)
    }

    /// The `IOSurfaceRef` to hand to `objectWithIOSurface:`.
    pub(super) fn as_ptr(&self) -> *mut IOSurfaceOpaque {
        self.ptr.as_ptr()
    }

    /// `IOSurfaceLock(s, 0, NULL)` (write access); returns the base address.
    fn lock_for_cpu(&self) -> Result<NonNull<u8>, EngineError> {
        // SAFETY: IOSurfaceLock on a live surface with a null seed (ane-private-api.md §2.4).
        let kr = unsafe { IOSurfaceLock(self.ptr.as_ptr(), 0, std::ptr::null_mut()) };
        if kr != 0 {
            return Err(EngineError::Surface(format!(
                "IOSurfaceLock failed: {kr:#x}"
            )));
        }
        // SAFETY: the surface is locked, so its base address is valid until unlock.
        let base = unsafe { IOSurfaceGetBaseAddress(self.ptr.as_ptr()) }.cast::<u8>();
        NonNull::new(base).ok_or_else(|| {
            self.unlock_for_cpu();
            EngineError::Surface("IOSurface has no base address".into())
        })
    }

    /// `IOSurfaceUnlock(s, 0, NULL)`, pairing [`IoSurface::lock_for_cpu`].
    fn unlock_for_cpu(&self) {
        // SAFETY: unlock with the options of the matching lock.
        unsafe { IOSurfaceUnlock(self.ptr.as_ptr(), 0, std::ptr::null_mut()) };
    }

    /// Copies `data` to the start of the surface under a write lock.
    pub(super) fn write(&self, data: &[u8]) -> Result<(), EngineError> {
        self.with_lock(
            0,
            |base| {
                // SAFETY: the surface is locked for writing and holds `self.bytes >= data.len()` bytes
                // (checked by the caller against the plan); the regions cannot overlap.
                unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), base, data.len()) }
            },
            data.len(),
        )
    }

    /// Copies the start of the surface into `out` under a read-only lock.
    pub(super) fn read(&self, out: &mut [u8]) -> Result<(), EngineError> {
        let len = out.len();
        self.with_lock(
            LOCK_READ_ONLY,
            |base| {
                // SAFETY: the surface is locked for reading and holds at least `len` bytes.
                unsafe { std::ptr::copy_nonoverlapping(base.cast_const(), out.as_mut_ptr(), len) }
            },
            len,
        )
    }

    fn with_lock(
        &self,
        options: u32,
        f: impl FnOnce(*mut u8),
        len: usize,
    ) -> Result<(), EngineError> {
        if len > self.bytes {
            return Err(EngineError::Surface(format!(
                "{len} bytes do not fit a surface of {}",
                self.bytes
            )));
        }
        // SAFETY: IOSurfaceLock on a live surface with a null seed is the documented call
        // (ane-private-api.md §2.4); a non-zero kern_return_t means it is not locked.
        let kr = unsafe { IOSurfaceLock(self.ptr.as_ptr(), options, std::ptr::null_mut()) };
        if kr != 0 {
            return Err(EngineError::Surface(format!(
                "IOSurfaceLock failed: {kr:#x}"
            )));
        }
        // SAFETY: the surface is locked, so its base address is valid until unlock.
        let base = unsafe { IOSurfaceGetBaseAddress(self.ptr.as_ptr()) }.cast::<u8>();
        if !base.is_null() {
            f(base);
        }
        // SAFETY: unlock with the same options as the lock above.
        unsafe { IOSurfaceUnlock(self.ptr.as_ptr(), options, std::ptr::null_mut()) };
        if base.is_null() {
            return Err(EngineError::Surface("IOSurface has no base address".into()));
        }
        Ok(())
    }
}

/// An IOSurface the plugin writes and reads in place (`Engine::new_surface`), so evaluations bind
/// it without a copy. The CPU holds it locked while it writes or reads; evaluations take it
/// unlocked ("lock, write, unlock, evaluate", ane-private-api.md §2.4, with the unlock deferred
/// to the next evaluation). Staged weights are written once, then stay unlocked.
#[derive(Debug)]
pub(super) struct SharedSurface {
    io: IoSurface,
    base: NonNull<u8>,
    /// Who holds it: the CPU (locked) or evaluations.
    handoff: Handoff,
    /// Unique for the process (addresses can be reused once a surface is freed).
    id: u64,
    /// Dropped with the surface: cached requests that bind it hold a `Weak` and are purged.
    alive: Arc<()>,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

// SAFETY: the base pointer is only dereferenced under the hand-off protocol, whose state sits
// behind the mutex; `IoSurface` is Send + Sync.
unsafe impl Send for SharedSurface {}
// SAFETY: as above.
unsafe impl Sync for SharedSurface {}

impl SharedSurface {
    /// A surface of `bytes` bytes, locked for the CPU. Not cleared: request surfaces are as large
    /// as the largest tensor (often the weights), and the activation and output surfaces only use
    /// their first bytes, so clearing would make every padding page resident. Callers write what
    /// the program reads.
    pub(super) fn new(bytes: usize) -> Result<Self, EngineError> {
        let io = IoSurface::new(bytes)?;
        let base = io.lock_for_cpu()?;
        Ok(SharedSurface {
            io,
            base,
            handoff: Handoff::default(),
            id: NEXT_ID.fetch_add(1, Relaxed),
            alive: Arc::new(()),
        })
    }

    /// Process-unique id (the request cache key).
    pub(super) fn id(&self) -> u64 {
        self.id
    }

    /// Turns dead when this surface drops.
    pub(super) fn liveness(&self) -> Weak<()> {
        Arc::downgrade(&self.alive)
    }

    /// The surface, for `objectWithIOSurface:` and as a request key.
    pub(super) fn io(&self) -> &IoSurface {
        &self.io
    }
}

impl EngineMemory for SharedSurface {
    fn base(&self) -> NonNull<u8> {
        self.base
    }

    fn size(&self) -> usize {
        self.io.bytes
    }

    fn to_cpu(&self) -> Result<(), EngineError> {
        self.handoff.to_cpu(|| {
            let base = self.io.lock_for_cpu()?;
            if base != self.base {
                // Plain (non-purgeable) surfaces keep their address; if one moved, the views
                // handed out are wrong: refuse rather than write elsewhere.
                self.io.unlock_for_cpu();
                return Err(EngineError::Surface(
                    "IOSurface base address changed between locks".into(),
                ));
            }
            Ok(())
        })
    }

    fn to_device(&self) -> Result<(), EngineError> {
        self.handoff.to_device(|| self.io.unlock_for_cpu());
        Ok(())
    }

    fn release(&self) {
        self.handoff.release();
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

impl Drop for SharedSurface {
    fn drop(&mut self) {
        if self.handoff.cpu_held() {
            self.io.unlock_for_cpu();
        }
    }
}

impl Drop for IoSurface {
    fn drop(&mut self) {
        // SAFETY: we own the +1 reference from IOSurfaceCreate and release it once.
        unsafe { CFRelease(self.ptr.as_ptr().cast_const().cast()) }
    }
}
