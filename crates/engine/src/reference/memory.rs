//! The reference engine's surface memory: host memory that keeps the IOSurface access protocol
//! (`crate::surface::EngineMemory`) and fails loudly when it is broken, so that the plugin's use of
//! engine-owned surfaces is checked on Linux the way the ANE would need it. New memory is filled
//! with NaNs: engine memory comes with no promised contents (the ANE driver does not clear its
//! IOSurfaces, so that padding pages are never touched), and a caller that reads what it did not
//! write gets NaNs through the numeric guard and the tests.

use std::alloc::{alloc, dealloc, Layout};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use crate::surface::{EngineMemory, Handoff};
use crate::EngineError;

/// Alignment of the allocation (an IOSurface's base is page aligned; 128 is what the rules need).
const ALIGN: usize = 128;

/// Protocol counters shared by every memory of one engine.
#[derive(Debug, Default)]
pub(super) struct Handoffs {
    /// Device -> CPU transitions (IOSurfaceLock on the ANE).
    pub(super) to_cpu: AtomicU64,
    /// CPU -> device transitions (IOSurfaceUnlock on the ANE).
    pub(super) to_device: AtomicU64,
}

/// Aligned host memory, NaN-filled, with the CPU/device hand-off rules.
#[derive(Debug)]
pub(super) struct TrackedMemory {
    ptr: NonNull<u8>,
    len: usize,
    handoff: Handoff,
    handoffs: Arc<Handoffs>,
}

// SAFETY: the memory is owned by this value and only reached through `base()` under the protocol,
// whose state sits behind a mutex.
unsafe impl Send for TrackedMemory {}
// SAFETY: as above.
unsafe impl Sync for TrackedMemory {}

impl TrackedMemory {
    pub(super) fn new(len: usize, handoffs: Arc<Handoffs>) -> Result<Self, EngineError> {
        let len = len.max(2).next_multiple_of(2);
        let layout = Layout::from_size_align(len, ALIGN)
            .map_err(|e| EngineError::Surface(format!("{len} bytes: {e}")))?;
        // SAFETY: the layout has a non-zero size.
        let ptr = NonNull::new(unsafe { alloc(layout) })
            .ok_or_else(|| EngineError::Surface(format!("allocating {len} bytes failed")))?;
        // SAFETY: `len` bytes were just allocated at `ptr`; 0xFFFF is an fp16 NaN.
        unsafe { std::ptr::write_bytes(ptr.as_ptr(), 0xFF, len) };
        Ok(TrackedMemory {
            ptr,
            len,
            handoff: Handoff::default(),
            handoffs,
        })
    }
}

impl EngineMemory for TrackedMemory {
    fn base(&self) -> NonNull<u8> {
        self.ptr
    }

    fn size(&self) -> usize {
        self.len
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn to_cpu(&self) -> Result<(), EngineError> {
        self.handoff.to_cpu(|| {
            self.handoffs.to_cpu.fetch_add(1, Relaxed);
            Ok(())
        })
    }

    fn to_device(&self) -> Result<(), EngineError> {
        self.handoff.to_device(|| {
            self.handoffs.to_device.fetch_add(1, Relaxed);
        });
        Ok(())
    }

    fn release(&self) {
        self.handoff.release();
    }
}

impl Drop for TrackedMemory {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this size and alignment, freed once.
        unsafe {
            dealloc(
                self.ptr.as_ptr(),
                Layout::from_size_align_unchecked(self.len, ALIGN),
            )
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Surface;

    #[test]
    fn cpu_access_during_an_evaluation_is_refused() {
        let h = Arc::new(Handoffs::default());
        let mut s = Surface::from_engine(Box::new(TrackedMemory::new(4096, h.clone()).unwrap()));
        s.fp16_mut(4).fill(half::f16::ZERO);
        s.fp16_mut(4).fill(half::f16::ONE);
        {
            let lent = s.for_device().unwrap();
            assert_eq!(lent.fp16(4), [half::f16::ONE; 4]);
            let m = lent.surface().engine_memory().unwrap();
            assert!(m.to_cpu().is_err(), "the device uses it");
            // A second evaluation may read it at the same time (shared weights).
            let again = lent.surface().for_device().unwrap();
            drop(again);
            assert!(m.to_cpu().is_err(), "still one user");
        }
        assert_eq!(s.fp16(4), [half::f16::ONE; 4]);
        assert_eq!(h.to_device.load(Relaxed), 1);
        assert_eq!(h.to_cpu.load(Relaxed), 1);
    }

    #[test]
    fn accessors_panic_on_a_broken_protocol() {
        let h = Arc::new(Handoffs::default());
        let s = Surface::from_engine(Box::new(TrackedMemory::new(256, h).unwrap()));
        let lent = s.for_device().unwrap();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| s.fp16(1)[0]));
        assert!(r.is_err());
        drop(lent);
        assert!(s.fp16(1)[0].is_nan(), "never written");
    }

    #[test]
    fn memory_is_nan_filled_aligned_and_sized() {
        let h = Arc::new(Handoffs::default());
        let m = TrackedMemory::new(1001, h).unwrap();
        assert_eq!(m.size(), 1002);
        assert_eq!(m.base().as_ptr() as usize % ALIGN, 0);
        let s = Surface::from_engine(Box::new(m));
        assert_eq!(s.alloc_size(), 1002);
        assert!(s.fp16(501).iter().all(|h| h.is_nan()));
    }
}
