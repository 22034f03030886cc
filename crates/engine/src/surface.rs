//! I/O surfaces and the size rules every request must follow.
//!
//! On the ANE a tensor travels in an IOSurface holding the packed `[1, C, 1, S]` channel-first
//! layout. The documented rules (ane-private-api.md §2.3, §2.5) are:
//! - a surface smaller than about 48 KiB fails at evaluation with status `0x1d`, so every surface
//!   is at least [`MIN_SURFACE_BYTES`];
//! - allocations are rounded to [`SURFACE_ALIGN`] bytes (the conservative 128 of the two claims);
//! - every surface of one request has the same allocation size, or evaluation fails with `0x1d`;
//! - a row `S * elemsize` that is a multiple of 64 bytes makes the packed and the row-padded layouts
//!   identical, so planners keep `S` a multiple of [`SPATIAL_MULTIPLE`] for fp16.

/// Minimum allocation of any surface (Orion: `[768,16]` fp16 = 49152 bytes works, smaller fails).
pub const MIN_SURFACE_BYTES: usize = 49152;
/// Allocation granularity (maderix PR #35 on M5: 128-byte aligned surfaces).
pub const SURFACE_ALIGN: usize = 128;
/// fp16 spatial length multiple so that one row is a multiple of 64 bytes.
pub const SPATIAL_MULTIPLE: usize = 32;
/// Smallest spatial length the ANE evaluates reliably (the `ane` crate's `MIN_SPATIAL_WIDTH`).
pub const MIN_SPATIAL: usize = 64;

/// What IOSurface reports about a surface it allocated (`IOSurfaceGet{AllocSize, BytesPerRow,
/// Width, Height}`), read back by the ANE driver after creating each one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Bytes allocated.
    pub alloc: usize,
    /// Bytes per row.
    pub bytes_per_row: usize,
    /// Width in elements (bytes: one byte per element).
    pub width: usize,
    /// Rows.
    pub height: usize,
}

/// Checks that a surface requested flat (`bytes` x 1, one byte per element, rows of `bytes`) came
/// back that way: the driver writes and the ANE reads it as one packed run of `bytes`, so a
/// surface that IOSurface padded into several rows, or allocated short, would be written out of
/// bounds or read with gaps. Such a surface is refused (the op falls back) instead.
///
/// # Errors
/// [`crate::EngineError::Surface`] naming the field that differs.
pub fn check_flat(bytes: usize, g: Geometry) -> Result<(), crate::EngineError> {
    let bad = |what: &str| {
        Err(crate::EngineError::Surface(format!(
            "IOSurface asked flat {bytes} bytes came back {what} ({g:?})"
        )))
    };
    if g.alloc < bytes {
        return bad("short");
    }
    if g.height != 1 {
        return bad("with several rows");
    }
    if g.width != bytes || g.bytes_per_row < bytes {
        return bad("with another row width");
    }
    Ok(())
}

/// Allocation size for a surface that must hold `bytes`.
pub fn alloc_size(bytes: usize) -> usize {
    bytes.max(MIN_SURFACE_BYTES).next_multiple_of(SURFACE_ALIGN)
}

/// One allocation size for every surface of a request whose largest tensor needs `max_bytes`.
pub fn request_alloc_size(tensor_bytes: &[usize]) -> usize {
    alloc_size(tensor_bytes.iter().copied().max().unwrap_or(0))
}

/// Allocation sizes for a request under [`crate::probe::SurfaceOrder::Ascending`]: inputs of
/// strictly ascending sizes and outputs of strictly descending sizes, in binding order, each
/// [`alloc_size`] of its tensor or the least step ([`SURFACE_ALIGN`]) past its neighbour.
/// `inputs` and `outputs` are tensor bytes in binding order.
pub fn ordered_sizes(inputs: &[usize], outputs: &[usize]) -> (Vec<usize>, Vec<usize>) {
    let mut ins: Vec<usize> = Vec::with_capacity(inputs.len());
    for &b in inputs {
        let floor = ins.last().map_or(0, |&p| p + SURFACE_ALIGN);
        ins.push(alloc_size(b).max(floor));
    }
    // Descending: built from the last (smallest) up.
    let mut outs: Vec<usize> = Vec::with_capacity(outputs.len());
    for &b in outputs.iter().rev() {
        let floor = outs.last().map_or(0, |&p| p + SURFACE_ALIGN);
        outs.push(alloc_size(b).max(floor));
    }
    outs.reverse();
    (ins, outs)
}

/// Whether request sizes (binding order) follow the ascending-inputs, descending-outputs rule
/// of [`crate::probe::SurfaceOrder::Ascending`]; one input or one output is ordered.
pub fn is_ordered(inputs: &[usize], outputs: &[usize]) -> bool {
    inputs.windows(2).all(|w| w[0] < w[1]) && outputs.windows(2).all(|w| w[0] > w[1])
}

/// Spatial length to compile for `n` columns: at least [`MIN_SPATIAL`] and a multiple of
/// [`SPATIAL_MULTIPLE`].
pub fn spatial_bucket(n: usize) -> usize {
    n.max(MIN_SPATIAL).next_multiple_of(SPATIAL_MULTIPLE)
}

/// Memory an engine allocated for a surface (an IOSurface on the ANE), so that the plugin writes
/// activations and weights straight into what the device reads and no copy is made per call.
///
/// It follows the documented access protocol (ane-private-api.md §2.4): the CPU touches the memory
/// only while it holds it (IOSurfaceLock), the device only while the CPU does not, and nothing
/// touches a surface during an evaluation. The memory starts held by the CPU. [`Surface`]'s
/// accessors call [`EngineMemory::to_cpu`]; engines call [`Surface::for_device`] around an
/// evaluation. Shared read-only surfaces (staged weights) stay with the device across evaluations
/// once written.
pub trait EngineMemory: Send + Sync + std::fmt::Debug {
    /// First byte. Stable for the life of the memory; valid to dereference only under the
    /// protocol above.
    fn base(&self) -> std::ptr::NonNull<u8>;
    /// Size in bytes (the surface's allocation size).
    fn size(&self) -> usize;
    /// Makes CPU access legal (locks for the CPU if the device held it). Fails while an
    /// evaluation uses the memory, or if the lock fails.
    fn to_cpu(&self) -> Result<(), crate::EngineError>;
    /// Hands the memory to the device for one evaluation (unlocks it if the CPU held it); every
    /// successful call is paired with one [`EngineMemory::release`].
    fn to_device(&self) -> Result<(), crate::EngineError>;
    /// The evaluation that called [`EngineMemory::to_device`] is over.
    fn release(&self);
    /// For the engine that made it, to recognise its own memory.
    fn as_any(&self) -> &dyn std::any::Any;
}

/// The CPU/device hand-off state of one engine memory, shared by every engine's
/// [`EngineMemory`]: who holds it (the CPU, locked, or the device) and how many evaluations bind
/// it now. Starts held by the CPU.
#[derive(Debug)]
pub struct Handoff(std::sync::Mutex<(bool, usize)>);

impl Default for Handoff {
    fn default() -> Self {
        Handoff(std::sync::Mutex::new((true, 0)))
    }
}

impl Handoff {
    fn state(&self) -> std::sync::MutexGuard<'_, (bool, usize)> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// [`EngineMemory::to_cpu`]: refused while an evaluation binds it; `lock` runs when the
    /// device held it (the CPU holds it only if `lock` succeeds).
    ///
    /// # Errors
    /// [`crate::EngineError::Surface`] while bound, or `lock`'s error.
    pub fn to_cpu(
        &self,
        lock: impl FnOnce() -> Result<(), crate::EngineError>,
    ) -> Result<(), crate::EngineError> {
        let mut st = self.state();
        if st.1 > 0 {
            return Err(crate::EngineError::Surface(format!(
                "CPU access to a surface that {} evaluation(s) bind",
                st.1
            )));
        }
        if !st.0 {
            lock()?;
            st.0 = true;
        }
        Ok(())
    }

    /// [`EngineMemory::to_device`]: `unlock` runs when the CPU held it; one more user.
    pub fn to_device(&self, unlock: impl FnOnce()) {
        let mut st = self.state();
        if st.0 {
            unlock();
            st.0 = false;
        }
        st.1 += 1;
    }

    /// [`EngineMemory::release`]: one user fewer.
    pub fn release(&self) {
        let mut st = self.state();
        st.1 = st.1.saturating_sub(1);
    }

    /// Whether the CPU holds it (locked) now.
    pub fn cpu_held(&self) -> bool {
        self.state().0
    }
}

#[derive(Debug)]
enum Memory {
    /// Plain host memory: engines copy it in and out.
    Host(Vec<half::f16>),
    /// Memory of an engine ([`crate::Engine::new_surface`]).
    Engine(Box<dyn EngineMemory>),
}

/// The memory of one request tensor: an allocation of a fixed size (zeroed for host memory). The
/// tensor occupies its first bytes, packed; the rest is padding the engine never reads. Either host memory standing in
/// for an IOSurface ([`Surface::new`]) or memory of the engine itself
/// ([`crate::Engine::new_surface`]); the accessors work the same on both.
#[derive(Debug)]
pub struct Surface {
    mem: Memory,
}

impl Surface {
    /// A zeroed host surface of `alloc` bytes (rounded up to an even count). Use [`alloc_size`] /
    /// [`request_alloc_size`] to choose it.
    pub fn new(alloc: usize) -> Self {
        Surface {
            mem: Memory::Host(vec![half::f16::ZERO; alloc.div_ceil(2)]),
        }
    }

    /// A surface over engine memory (even length, held by the CPU). Its contents are unspecified:
    /// callers write every element the program reads, padding included.
    pub fn from_engine(mem: Box<dyn EngineMemory>) -> Self {
        Surface {
            mem: Memory::Engine(mem),
        }
    }

    /// The engine memory behind this surface, if any.
    pub fn engine_memory(&self) -> Option<&dyn EngineMemory> {
        match &self.mem {
            Memory::Host(_) => None,
            Memory::Engine(m) => Some(m.as_ref()),
        }
    }

    /// Allocation size in bytes.
    pub fn alloc_size(&self) -> usize {
        match &self.mem {
            Memory::Host(h) => h.len() * 2,
            Memory::Engine(m) => m.size() & !1,
        }
    }

    /// Engine memory made accessible to the CPU. A failure here is a broken protocol (CPU access
    /// during an evaluation) or a failed lock, which the accessors' callers cannot handle: panic,
    /// caught at the plugin's C boundary.
    fn cpu(&self) {
        if let Memory::Engine(m) = &self.mem {
            if let Err(e) = m.to_cpu() {
                panic!("surface not accessible to the CPU: {e}");
            }
        }
    }

    /// The memory as fp16, without the CPU-access step (callers did it or hold the device side).
    fn halves(&self) -> &[half::f16] {
        match &self.mem {
            Memory::Host(h) => h,
            // SAFETY: the memory is `len` bytes at `base`, 2-aligned (engines allocate page- or
            // 128-aligned memory), valid for the life of `self`, and every bit pattern is an f16.
            Memory::Engine(m) => unsafe {
                std::slice::from_raw_parts(m.base().as_ptr().cast::<half::f16>(), m.size() / 2)
            },
        }
    }

    fn halves_mut(&mut self) -> &mut [half::f16] {
        match &mut self.mem {
            Memory::Host(h) => h,
            // SAFETY: as in `halves`; `&mut self` makes this the only view made through this
            // surface.
            Memory::Engine(m) => unsafe {
                std::slice::from_raw_parts_mut(m.base().as_ptr().cast::<half::f16>(), m.size() / 2)
            },
        }
    }

    /// Raw bytes.
    pub fn bytes(&self) -> &[u8] {
        self.cpu();
        let h = self.halves();
        // SAFETY: f16 is two plain bytes; any u8 view of it is valid and the length is exact.
        unsafe { std::slice::from_raw_parts(h.as_ptr().cast::<u8>(), h.len() * 2) }
    }

    /// Raw bytes, writable.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        self.cpu();
        let h = self.halves_mut();
        // SAFETY: every bit pattern is a valid f16, so writing arbitrary bytes is sound.
        unsafe { std::slice::from_raw_parts_mut(h.as_mut_ptr().cast::<u8>(), h.len() * 2) }
    }

    /// The first `n` fp16 elements, writable. Panics if the surface is too small (a caller bug).
    pub fn fp16_mut(&mut self, n: usize) -> &mut [half::f16] {
        self.cpu();
        &mut self.halves_mut()[..n]
    }

    /// The first `n` fp16 elements.
    pub fn fp16(&self, n: usize) -> &[half::f16] {
        self.cpu();
        &self.halves()[..n]
    }

    /// The first `n` fp32 elements, decoded from the raw bytes (for fp32 I/O).
    pub fn fp32_vec(&self, n: usize) -> Vec<f32> {
        self.bytes()[..n * 4]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }

    /// Hands the surface to the device for one evaluation (a no-op for host memory); the CPU
    /// gets it back when the returned guard drops and an accessor is called.
    ///
    /// # Errors
    /// The engine memory refused (see [`EngineMemory::to_device`]).
    pub fn for_device(&self) -> Result<DeviceUse<'_>, crate::EngineError> {
        if let Memory::Engine(m) = &self.mem {
            m.to_device()?;
        }
        Ok(DeviceUse { surface: self })
    }

    /// As [`Surface::for_device`], for an output the device writes.
    ///
    /// # Errors
    /// As [`Surface::for_device`].
    pub fn for_device_mut(&mut self) -> Result<DeviceUseMut<'_>, crate::EngineError> {
        if let Memory::Engine(m) = &self.mem {
            m.to_device()?;
        }
        Ok(DeviceUseMut { surface: self })
    }
}

/// A surface lent to the device for one evaluation (see [`Surface::for_device`]): what an engine
/// that executes on the host (the reference engine) reads through.
#[derive(Debug)]
pub struct DeviceUse<'a> {
    surface: &'a Surface,
}

impl DeviceUse<'_> {
    /// The surface.
    pub fn surface(&self) -> &Surface {
        self.surface
    }
    /// The first `n` fp16 elements, as the device sees them.
    pub fn fp16(&self, n: usize) -> &[half::f16] {
        &self.surface.halves()[..n]
    }
    /// The first `n` bytes, as the device sees them (int8 I/O: one element per byte).
    pub fn bytes(&self, n: usize) -> &[u8] {
        let h = &self.surface.halves()[..n.div_ceil(2)];
        // SAFETY: f16 is two plain bytes; any u8 view of it is valid and within `h`.
        unsafe { &std::slice::from_raw_parts(h.as_ptr().cast::<u8>(), h.len() * 2)[..n] }
    }
    /// The first `n` fp32 elements, as the device sees them.
    pub fn fp32_vec(&self, n: usize) -> Vec<f32> {
        self.fp16(2 * n)
            .chunks_exact(2)
            .map(|p| {
                let (lo, hi) = (p[0].to_bits() as u32, p[1].to_bits() as u32);
                f32::from_bits(lo | (hi << 16))
            })
            .collect()
    }
}

impl Drop for DeviceUse<'_> {
    fn drop(&mut self) {
        if let Memory::Engine(m) = &self.surface.mem {
            m.release();
        }
    }
}

/// An output surface lent to the device for one evaluation (see [`Surface::for_device_mut`]).
#[derive(Debug)]
pub struct DeviceUseMut<'a> {
    surface: &'a mut Surface,
}

impl DeviceUseMut<'_> {
    /// The surface.
    pub fn surface(&self) -> &Surface {
        self.surface
    }
    /// The first `n` fp16 elements, written as the device would.
    pub fn fp16_mut(&mut self, n: usize) -> &mut [half::f16] {
        &mut self.surface.halves_mut()[..n]
    }
    /// Raw bytes, written as the device would.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        let h = self.surface.halves_mut();
        // SAFETY: every bit pattern is a valid f16, so writing arbitrary bytes is sound.
        unsafe { std::slice::from_raw_parts_mut(h.as_mut_ptr().cast::<u8>(), h.len() * 2) }
    }
}

impl Drop for DeviceUseMut<'_> {
    fn drop(&mut self) {
        if let Memory::Engine(m) = &self.surface.mem {
            m.release();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn alloc_size_rules(bytes in 0usize..10_000_000) {
            let a = alloc_size(bytes);
            prop_assert!(a >= bytes);
            prop_assert!(a >= MIN_SURFACE_BYTES);
            prop_assert_eq!(a % SURFACE_ALIGN, 0);
            prop_assert!(a < bytes.max(MIN_SURFACE_BYTES) + SURFACE_ALIGN);
        }

        #[test]
        fn spatial_bucket_rules(n in 1usize..100_000) {
            let s = spatial_bucket(n);
            prop_assert!(s >= n && s >= MIN_SPATIAL);
            prop_assert_eq!((s * 2) % 64, 0);
            prop_assert!(s < n.max(MIN_SPATIAL) + SPATIAL_MULTIPLE);
        }
    }

    #[test]
    fn ordered_sizes_ascend_for_inputs_and_descend_for_outputs() {
        let m = MIN_SURFACE_BYTES;
        let (i, o) = ordered_sizes(&[8192, 16384, 100_000], &[4096, 4096]);
        assert_eq!(i, [m, m + SURFACE_ALIGN, alloc_size(100_000)]);
        assert_eq!(o, [m + SURFACE_ALIGN, m]);
        assert!(is_ordered(&i, &o));
        // Bigger tensors keep their own sizes; a small one after a big one steps past it.
        let (i, _) = ordered_sizes(&[200_000, 8192], &[]);
        assert_eq!(
            i,
            [alloc_size(200_000), alloc_size(200_000) + SURFACE_ALIGN]
        );
        assert!(is_ordered(&[m], &[m]), "one of each is ordered");
        assert!(!is_ordered(&[m, m], &[m]), "equal inputs are not");
        assert!(
            !is_ordered(&[m], &[m, m + SURFACE_ALIGN]),
            "ascending outputs are not"
        );
    }

    #[test]
    fn flat_geometry_is_checked_field_by_field() {
        let n = 49152;
        let ok = Geometry {
            alloc: n,
            bytes_per_row: n,
            width: n,
            height: 1,
        };
        assert!(check_flat(n, ok).is_ok());
        assert!(check_flat(
            n,
            Geometry {
                alloc: n + 4096,
                bytes_per_row: n + 64,
                ..ok
            }
        )
        .is_ok());
        let err = |g| check_flat(n, g).unwrap_err().to_string();
        assert!(err(Geometry { alloc: n - 1, ..ok }).contains("short"));
        assert!(err(Geometry { height: 2, ..ok }).contains("several rows"));
        assert!(err(Geometry { width: n / 2, ..ok }).contains("row width"));
        assert!(err(Geometry {
            bytes_per_row: n - 128,
            ..ok
        })
        .contains("row width"));
    }

    #[test]
    fn surface_fp16_view() {
        let mut s = Surface::new(alloc_size(10));
        s.fp16_mut(3).copy_from_slice(&[half::f16::ONE; 3]);
        assert_eq!(s.bytes()[0..2], [0x00, 0x3c]);
        assert_eq!(s.fp16(4)[3], half::f16::ZERO);
    }
}
