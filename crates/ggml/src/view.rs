//! Checked views of tensor memory: the one place below the C boundary that reads or writes
//! through a tensor's address.
//!
//! ggml hands the plugin raw tensors (an address, a shape, byte strides). They become an
//! [`Operand`] once: at the boundary ([`Operand::of_tensor`], whose caller vouches for the
//! memory, the only `unsafe` step), or over the plugin's own buffers ([`Operand::of_f32`], checked
//! against the buffer's length). Every access after that goes through a method here that checks
//! the bytes it touches lie inside the view, so the compute path above it has no `unsafe fn`
//! taking raw tensors and no stride arithmetic of its own (that lives in
//! [`TensorDesc::row_offset`]).

use half::{bf16, f16};

pub mod fetch;
pub mod residence;

use crate::ffi::{ggml_tensor, GGML_TYPE_BF16, GGML_TYPE_F16, GGML_TYPE_F32};
use crate::ggml::TypeInfo;
use crate::support::{is_plain, TensorDesc};

/// The description of a ggml tensor: type, shape, strides.
pub fn desc(t: &ggml_tensor) -> TensorDesc {
    TensorDesc {
        ty: t.type_,
        ne: t.ne,
        nb: t.nb,
    }
}

/// A tensor operand: its description and the memory it may touch.
///
/// Invariant (established by the constructors): `len` bytes from `data` are readable, and
/// writable if `writable`, for as long as the view or a copy of it is used; `row` is the byte
/// length of one row (`ne[0]` elements) for the description the view was made with, and every row
/// that description addresses lies inside the `len` bytes. An output overlaps no source of the
/// same computation. Every access is checked against `len`; `desc` is public, so what goes to
/// ggml is checked again against the current description ([`Operand::covers_desc`]).
#[derive(Clone, Copy, Debug)]
pub struct Operand {
    /// Types, shape, strides.
    pub desc: TensorDesc,
    data: *const u8,
    len: usize,
    /// Elements per block and bytes per block of the type (plain types: 1 and the element size).
    block: (usize, usize),
    writable: bool,
}

/// Bytes a view of `desc` with rows of `row` bytes spans from its first element (`None` on
/// overflow).
fn span(desc: &TensorDesc, row: usize) -> Option<usize> {
    if desc.ne.iter().any(|&n| n <= 0) {
        return Some(0);
    }
    (1..4).try_fold(row, |acc, i| {
        (desc.ne[i] as usize - 1)
            .checked_mul(desc.nb[i])
            .and_then(|v| acc.checked_add(v))
    })
}

/// Bytes of one row of `ne0` elements: whole blocks for block types, strided elements for plain
/// types (`None` on overflow).
fn row_len(desc: &TensorDesc, (blck, size): (usize, usize)) -> Option<usize> {
    let ne0 = desc.ne[0].max(0) as usize;
    if blck > 1 {
        (ne0 / blck).checked_mul(size)
    } else if ne0 == 0 {
        Some(0)
    } else {
        (ne0 - 1).checked_mul(desc.nb[0])?.checked_add(size)
    }
}

impl Operand {
    /// A view of a ggml tensor.
    ///
    /// # Safety
    /// `t.data` points at the memory `t`'s shape and strides describe, readable (and writable, if
    /// the view is written) while the view is used, and `info` is the traits of `t`'s type.
    pub unsafe fn of_tensor(t: &ggml_tensor, info: &TypeInfo) -> Operand {
        // SAFETY: forwarded to the caller.
        unsafe { Operand::of_parts(desc(t), t.data as usize, info) }
    }

    /// A view of a tensor known by its description and address (a weight the lookahead learnt
    /// in an earlier graph).
    ///
    /// # Safety
    /// As for [`Operand::of_tensor`]: the memory at `addr` is a live tensor described by `desc`.
    pub unsafe fn of_parts(desc: TensorDesc, addr: usize, info: &TypeInfo) -> Operand {
        let block = (info.blck_size.max(1), info.type_size);
        Operand {
            desc,
            data: addr as *const u8,
            len: Operand::extent(&desc, block).unwrap_or(0),
            block,
            writable: true,
        }
    }

    /// Bytes `desc` spans with blocks `block`.
    fn extent(desc: &TensorDesc, block: (usize, usize)) -> Option<usize> {
        span(desc, row_len(desc, block)?)
    }

    /// A view of a buffer of the plugin's own, `bytes` long, checked against `desc`.
    fn of_buffer(
        desc: TensorDesc,
        data: *const u8,
        bytes: usize,
        block: (usize, usize),
    ) -> Operand {
        let len = Operand::extent(&desc, block).expect("view size overflows");
        assert!(len <= bytes, "view past its buffer");
        Operand {
            desc,
            data,
            len,
            block,
            writable: false,
        }
    }

    /// A read-only view of `buf`, described by `desc` (plain f32 elements); writes through it
    /// panic.
    ///
    /// # Safety
    /// `buf` outlives every use of the view and its copies, and is not written while they are
    /// used (the view holds no borrow).
    ///
    /// # Panics
    /// If `desc` addresses anything outside `buf` or is not F32.
    pub unsafe fn of_f32(desc: TensorDesc, buf: &[f32]) -> Operand {
        assert_eq!(desc.ty, GGML_TYPE_F32, "of_f32 on another type");
        Operand::of_buffer(
            desc,
            buf.as_ptr().cast(),
            std::mem::size_of_val(buf),
            (1, 4),
        )
    }

    /// A writable view of `buf` (an output), described by `desc` (plain f32 elements).
    ///
    /// # Safety
    /// `buf` outlives every use of the view and its copies, and nothing else reads or writes it
    /// while they are used.
    ///
    /// # Panics
    /// As for [`Operand::of_f32`].
    pub unsafe fn of_f32_mut(desc: TensorDesc, buf: &mut [f32]) -> Operand {
        assert_eq!(desc.ty, GGML_TYPE_F32, "of_f32_mut on another type");
        let bytes = std::mem::size_of_val(buf);
        Operand {
            writable: true,
            ..Operand::of_buffer(desc, buf.as_mut_ptr().cast_const().cast(), bytes, (1, 4))
        }
    }

    /// A read-only view of `buf` holding a tensor of any type (`info`: its traits).
    ///
    /// # Safety
    /// As for [`Operand::of_f32`].
    ///
    /// # Panics
    /// If `desc` addresses anything outside `buf`.
    pub unsafe fn of_bytes(desc: TensorDesc, buf: &[u8], info: &TypeInfo) -> Operand {
        Operand::of_buffer(
            desc,
            buf.as_ptr(),
            buf.len(),
            (info.blck_size.max(1), info.type_size),
        )
    }

    /// A description without memory (a weight's identity where no output exists): every access
    /// panics.
    pub fn detached(desc: TensorDesc) -> Operand {
        Operand {
            desc,
            data: std::ptr::null(),
            len: 0,
            block: (1, 4),
            writable: false,
        }
    }

    /// Byte length of one row of the current description.
    fn row(&self) -> usize {
        row_len(&self.desc, self.block).unwrap_or(usize::MAX)
    }

    /// The address, as identity (staging keys, buffer ranges); never dereferenced by callers.
    pub fn addr(&self) -> usize {
        self.data as usize
    }

    /// Whether the view has no memory.
    pub fn is_null(&self) -> bool {
        self.data.is_null()
    }

    /// Whether everything `desc` addresses lies inside the view's memory (`desc` is public, so
    /// checked again before the description goes to ggml with [`Operand::as_ptr`]).
    pub fn covers_desc(&self) -> bool {
        !self.data.is_null()
            && Operand::extent(&self.desc, self.block).is_some_and(|n| n <= self.len)
    }

    /// The address for handing the view to ggml (the host's CPU backend), which touches the same
    /// memory under the same invariant.
    pub(crate) fn as_ptr(&self) -> *const u8 {
        self.data
    }

    /// The view of `ne` starting `off` bytes in (same strides and row length): one matrix of a
    /// batch, one expert, a run of rows.
    ///
    /// # Panics
    /// If the sub-view reaches outside this one.
    pub fn sub(&self, off: usize, ne: [i64; 4]) -> Operand {
        let desc = TensorDesc { ne, ..self.desc };
        let len = Operand::extent(&desc, self.block).expect("view size overflows");
        assert!(
            off <= self.len && len <= self.len - off,
            "sub-view past its tensor"
        );
        Operand {
            desc,
            data: self.data.wrapping_add(off),
            len,
            ..*self
        }
    }

    /// Byte range `[off, off + n)`, checked.
    fn range(&self, off: usize, n: usize) -> *const u8 {
        assert!(
            !self.data.is_null() && off <= self.len && n <= self.len - off,
            "access past the tensor: {off}+{n} of {} bytes",
            self.len
        );
        self.data.wrapping_add(off)
    }

    /// `n` bytes from `off` bytes in (the rows of a contiguous matrix, say).
    ///
    /// # Panics
    /// If they are not all inside the view.
    pub fn bytes(&self, off: usize, n: usize) -> &[u8] {
        let p = self.range(off, n);
        // SAFETY: in bounds of the view (checked), readable by the invariant.
        unsafe { std::slice::from_raw_parts(p, n) }
    }

    /// The bytes of row `i1` of matrix (`i2`, `i3`): `ne[0]` elements (whole blocks).
    pub fn row_bytes(&self, i1: usize, i2: usize, i3: usize) -> &[u8] {
        let (off, row) = (self.desc.row_offset(i1, i2, i3), self.row());
        let p = self.range(off, row);
        // SAFETY: in bounds of the view (checked), readable by the invariant.
        unsafe { std::slice::from_raw_parts(p, row) }
    }

    /// `n` f32 values from the start of row `i1` of matrix (`i2`, `i3`), when the view is F32,
    /// aligned and they are inside it (a run of rows with `nb[1] = 4 * ne[0]` included).
    pub fn f32s(&self, i1: usize, i2: usize, i3: usize, n: usize) -> Option<&[f32]> {
        let p = self.f32_run(i1, i2, i3, n)?;
        // SAFETY: in bounds and aligned (checked by f32_run), readable by the invariant.
        Some(unsafe { std::slice::from_raw_parts(p, n) })
    }

    /// The address of `n` f32 values from the start of row `i1` of matrix (`i2`, `i3`), when the
    /// view is F32 with unit stride, the address is aligned and all `n` lie inside the view.
    fn f32_run(&self, i1: usize, i2: usize, i3: usize, n: usize) -> Option<*const f32> {
        let off = self.desc.row_offset(i1, i2, i3);
        let ok = self.desc.ty == GGML_TYPE_F32
            && self.desc.nb[0] == 4
            && !self.data.is_null()
            && (self.data as usize + off).is_multiple_of(4)
            && off <= self.len
            && n * 4 <= self.len - off;
        ok.then(|| self.range(off, n * 4).cast::<f32>())
    }

    /// Element `i0` of row (`i1`, `i2`, `i3`) of a plain-typed view, widened to f32.
    pub fn get(&self, i0: usize, i1: usize, i2: usize, i3: usize) -> f32 {
        let p = self.range(self.desc.offset(i0, i1, i2, i3), elem_size(self.desc.ty));
        // SAFETY: in bounds (checked); unaligned reads.
        unsafe {
            match self.desc.ty {
                GGML_TYPE_F32 => p.cast::<f32>().read_unaligned(),
                GGML_TYPE_F16 => f16::from_bits(p.cast::<u16>().read_unaligned()).to_f32(),
                GGML_TYPE_BF16 => bf16::from_bits(p.cast::<u16>().read_unaligned()).to_f32(),
                _ => unreachable!("get on a non-plain type"),
            }
        }
    }

    /// Element (`i0`, `i1`, `i2`, `i3`) of an I32 view (MUL_MAT_ID's expert ids).
    pub fn get_i32(&self, i0: usize, i1: usize, i2: usize, i3: usize) -> i32 {
        assert_eq!(
            self.desc.ty,
            crate::ffi::GGML_TYPE_I32,
            "get_i32 on another type"
        );
        let p = self.range(self.desc.offset(i0, i1, i2, i3), 4);
        // SAFETY: in bounds (checked); unaligned read.
        unsafe { p.cast::<i32>().read_unaligned() }
    }

    /// Row `i1` of matrix (`i2`, `i3`), widened to f32 into `out` (length `ne[0]`): plain types
    /// element by element, block types through ggml's `to_float` (`info`).
    pub fn read_row(&self, info: &TypeInfo, i1: usize, i2: usize, i3: usize, out: &mut [f32]) {
        if is_plain(self.desc.ty) {
            for (i0, o) in out.iter_mut().enumerate() {
                *o = self.get(i0, i1, i2, i3);
            }
            return;
        }
        let bytes = self.row_bytes(i1, i2, i3);
        let f = info.to_float.expect("supports_op checked to_float");
        assert!(
            out.len() / info.blck_size.max(1) * info.type_size <= bytes.len(),
            "row shorter than its output"
        );
        // SAFETY: `bytes` holds the row's whole blocks (checked above), `out` its values.
        unsafe { f(bytes.as_ptr().cast(), out.as_mut_ptr(), out.len() as i64) };
    }

    /// Writes `v` to element (`i0`, `i1`, `i2`, `i3`) of an F32 output.
    pub fn put(&self, i0: usize, i1: usize, i2: usize, i3: usize, v: f32) {
        assert!(self.writable, "write through a read-only view");
        assert_eq!(self.desc.ty, GGML_TYPE_F32, "put on another type");
        let p = self.range(self.desc.offset(i0, i1, i2, i3), 4);
        // SAFETY: in bounds (checked), writable by the invariant; unaligned write.
        unsafe { p.cast_mut().cast::<f32>().write_unaligned(v) };
    }

    /// Lends `n` f32 values of an F32 output from the start of row `i1` of matrix (`i2`, `i3`) to
    /// `f`, when aligned and inside the view; `None` (and `f` not called) otherwise. The closure
    /// holds the only reference to that memory while it runs.
    pub fn with_f32s_mut<R>(
        &self,
        i1: usize,
        i2: usize,
        i3: usize,
        n: usize,
        f: impl FnOnce(&mut [f32]) -> R,
    ) -> Option<R> {
        assert!(self.writable, "write through a read-only view");
        let p = self.f32_run(i1, i2, i3, n)?.cast_mut();
        // SAFETY: in bounds and aligned (checked by f32_run), writable by the invariant; the
        // slice lives only inside `f`.
        Some(f(unsafe { std::slice::from_raw_parts_mut(p, n) }))
    }

    /// A fingerprint of the first and last rows' leading bytes (at most 256 each): with the
    /// address and description, how a weight is recognised again.
    pub fn fingerprint(&self, h: &mut xxhash_rust::xxh3::Xxh3) {
        let last = self.desc.ne[1].max(1) as usize - 1;
        for i1 in [0, last] {
            let b = self.row_bytes(i1, 0, 0);
            h.update(&b[..b.len().min(256)]);
        }
    }
}

// SAFETY: a view is an address with its checked extent; the invariant makes it valid for every
// thread that uses it (ggml runs a graph's nodes on several threads; outputs of one computation
// are written by disjoint rows).
unsafe impl Send for Operand {}
// SAFETY: as above.
unsafe impl Sync for Operand {}

/// Bytes of one element of a plain type.
fn elem_size(ty: i32) -> usize {
    match ty {
        GGML_TYPE_F32 => 4,
        _ => 2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_check_every_access() {
        let buf: Vec<f32> = (0..24).map(|v| v as f32).collect();
        let v = unsafe {
            Operand::of_f32(TensorDesc::contiguous(GGML_TYPE_F32, 4, [4, 3, 2, 1]), &buf)
        };
        assert_eq!(v.get(1, 2, 1, 0), 21.0);
        assert_eq!(v.f32s(1, 0, 0, 3).unwrap(), &[4.0, 5.0, 6.0]);
        assert!(v.f32s(2, 1, 0, 5).is_none(), "past the end");
        let m = v.sub(12 * 4, [4, 3, 1, 1]);
        assert_eq!(m.get(0, 0, 0, 0), 12.0);
        assert!(std::panic::catch_unwind(|| v.sub(13 * 4, [4, 3, 1, 1])).is_err());
        assert!(std::panic::catch_unwind(|| v.get(4, 2, 1, 0)).is_err());
        let mut out = vec![0f32; 8];
        let o = unsafe {
            Operand::of_f32_mut(
                TensorDesc::contiguous(GGML_TYPE_F32, 4, [4, 2, 1, 1]),
                &mut out,
            )
        };
        o.put(3, 1, 0, 0, 9.0);
        assert_eq!(o.with_f32s_mut(1, 0, 0, 4, |s| s[0] = 7.0), Some(()));
        assert!(o.with_f32s_mut(1, 0, 0, 5, |_| ()).is_none());
        assert_eq!(out[7], 9.0);
        assert_eq!(out[4], 7.0);
    }

    #[test]
    #[should_panic(expected = "view past its buffer")]
    fn a_view_longer_than_its_buffer_is_refused() {
        unsafe {
            Operand::of_f32(
                TensorDesc::contiguous(GGML_TYPE_F32, 4, [4, 3, 1, 1]),
                &[0.0; 11],
            )
        };
    }

    #[test]
    fn read_only_views_refuse_writes_and_changed_descriptions_are_not_covered() {
        let buf = vec![0f32; 12];
        let d = TensorDesc::contiguous(GGML_TYPE_F32, 4, [4, 3, 1, 1]);
        // SAFETY: buf outlives the view and is not written.
        let mut v = unsafe { Operand::of_f32(d, &buf) };
        assert!(std::panic::catch_unwind(|| v.put(0, 0, 0, 0, 1.0)).is_err());
        assert!(std::panic::catch_unwind(|| v.with_f32s_mut(0, 0, 0, 1, |_| ())).is_err());
        assert!(v.covers_desc());
        v.desc.ne[0] = 8; // twice the rows' length: what ggml would read is outside the buffer
        assert!(!v.covers_desc());
        v.desc.ne[0] = 4;
        v.desc.nb[3] = usize::MAX; // overflowing strides are never covered
        v.desc.ne[3] = 2;
        assert!(!v.covers_desc());
    }

    #[test]
    fn detached_views_refuse_access() {
        let d = Operand::detached(TensorDesc::contiguous(GGML_TYPE_F32, 4, [4, 1, 1, 1]));
        assert!(d.is_null());
        assert!(std::panic::catch_unwind(|| d.get(0, 0, 0, 0)).is_err());
    }
}
