//! `libggml-base` loaded at run time: the oracle for the conversion tests and the peer in the
//! host benchmark ([`crate::bench_host`]).
//!
//! Only five symbols are used, all public ggml API (ggml 0.26): `ggml_get_type_traits`,
//! `ggml_quantize_chunk`, `ggml_quantize_requires_imatrix`, `ggml_fp32_to_fp16_row` and
//! `ggml_fp16_to_fp32_row`. Loading at run time (not linking) keeps the crate buildable and its
//! unit tests runnable before llama.cpp is built.

use std::ffi::{c_char, c_void, CStr};
use std::path::{Path, PathBuf};

use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::types::GGML_TYPE_F32;
use crate::ConvertError;

/// `GGML_TYPE_COUNT` of ggml 0.26: type ids at or above it are out of range for the traits table.
pub const GGML_TYPE_COUNT: i32 = 43;

type ToFloat = unsafe extern "C" fn(*const c_void, *mut f32, i64);
type FromFloat = unsafe extern "C" fn(*const f32, *mut c_void, i64);

/// `struct ggml_type_traits` (ggml.h), field for field.
#[repr(C)]
struct RawTraits {
    type_name: *const c_char,
    blck_size: i64,
    blck_size_interleave: i64,
    type_size: usize,
    is_quantized: bool,
    to_float: Option<ToFloat>,
    from_float_ref: Option<FromFloat>,
}

/// The parts of a ggml type's traits the tests and benchmark need.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TypeTraits {
    /// ggml's name (`"q4_K"`).
    pub name: String,
    /// Elements per block.
    pub blck_size: usize,
    /// Bytes per block.
    pub type_size: usize,
    /// Whether ggml calls it quantized.
    pub is_quantized: bool,
    /// Whether ggml-base has a `to_float` for it (F32 has none).
    pub has_to_float: bool,
}

/// A loaded libggml-base.
pub struct GgmlBase {
    path: PathBuf,
    get_type_traits: unsafe extern "C" fn(i32) -> *const RawTraits,
    quantize_chunk:
        unsafe extern "C" fn(i32, *const f32, *mut c_void, i64, i64, i64, *const f32) -> usize,
    requires_imatrix: unsafe extern "C" fn(i32) -> bool,
    fp32_to_fp16_row: unsafe extern "C" fn(*const f32, *mut u16, i64),
    fp16_to_fp32_row: unsafe extern "C" fn(*const u16, *mut f32, i64),
    // Last, so the function pointers above are never used after the library is unloaded.
    _lib: libloading::Library,
}

impl std::fmt::Debug for GgmlBase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgmlBase")
            .field("path", &self.path)
            .finish()
    }
}

impl GgmlBase {
    /// Where the llama.cpp build of this workspace puts libggml-base (`cargo xtask llama`), unless
    /// `ANE_GGML_BASE` names another file.
    pub fn default_path() -> PathBuf {
        if let Some(p) = std::env::var_os("ANE_GGML_BASE") {
            return PathBuf::from(p);
        }
        let file = if cfg!(target_vendor = "apple") {
            "libggml-base.dylib"
        } else {
            "libggml-base.so"
        };
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../target/llama/build/bin")
            .join(file)
    }

    /// Loads [`GgmlBase::default_path`].
    ///
    /// # Errors
    /// [`ConvertError::Ggml`] when the file is missing (the message says to run
    /// `cargo xtask llama`) or lacks a symbol.
    pub fn open_default() -> Result<GgmlBase, ConvertError> {
        GgmlBase::open(&GgmlBase::default_path())
    }

    /// Loads libggml-base from `path`.
    ///
    /// # Errors
    /// [`ConvertError::Ggml`] when the file is missing or lacks a symbol.
    pub fn open(path: &Path) -> Result<GgmlBase, ConvertError> {
        if !path.is_file() {
            return Err(ConvertError::Ggml(format!(
                "{} does not exist: run `cargo xtask llama` to build llama.cpp, or set ANE_GGML_BASE",
                path.display()
            )));
        }
        let err = |e: libloading::Error| ConvertError::Ggml(format!("{}: {e}", path.display()));
        // SAFETY: loading libggml-base runs only its static initializers (none with side effects
        // beyond its own state).
        let lib = unsafe { libloading::Library::new(path) }.map_err(err)?;
        // SAFETY: the symbol types are the prototypes of ggml.h (ggml 0.26): `enum ggml_type` is
        // an int, `int64_t`/`size_t` map to i64/usize, `ggml_fp16_t` to u16.
        unsafe {
            Ok(GgmlBase {
                path: path.to_path_buf(),
                get_type_traits: *lib.get(b"ggml_get_type_traits\0").map_err(err)?,
                quantize_chunk: *lib.get(b"ggml_quantize_chunk\0").map_err(err)?,
                requires_imatrix: *lib.get(b"ggml_quantize_requires_imatrix\0").map_err(err)?,
                fp32_to_fp16_row: *lib.get(b"ggml_fp32_to_fp16_row\0").map_err(err)?,
                fp16_to_fp32_row: *lib.get(b"ggml_fp16_to_fp32_row\0").map_err(err)?,
                _lib: lib,
            })
        }
    }

    /// The file this was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn raw(&self, ty: i32) -> Option<&RawTraits> {
        if !(0..GGML_TYPE_COUNT).contains(&ty) {
            return None;
        }
        // SAFETY: ggml returns a pointer into its static traits table for every id below
        // GGML_TYPE_COUNT.
        let t = unsafe { (self.get_type_traits)(ty).as_ref()? };
        (t.type_size > 0 && t.blck_size > 0).then_some(t)
    }

    /// ggml's traits of `ty`, or `None` for an unknown or removed type.
    pub fn traits(&self, ty: i32) -> Option<TypeTraits> {
        let t = self.raw(ty)?;
        let name = if t.type_name.is_null() {
            String::new()
        } else {
            // SAFETY: a static NUL-terminated string in ggml's table.
            unsafe { CStr::from_ptr(t.type_name) }
                .to_string_lossy()
                .into_owned()
        };
        Some(TypeTraits {
            name,
            blck_size: t.blck_size as usize,
            type_size: t.type_size,
            is_quantized: t.is_quantized,
            has_to_float: t.to_float.is_some(),
        })
    }

    fn check_row(&self, ty: i32, bytes: usize, n: usize) -> Result<&RawTraits, ConvertError> {
        let t = self
            .raw(ty)
            .ok_or_else(|| ConvertError::Ggml(format!("unknown ggml type {ty}")))?;
        let bs = t.blck_size as usize;
        if !n.is_multiple_of(bs) {
            return Err(ConvertError::PartialBlock {
                ggml_type: ty,
                n,
                block: bs,
            });
        }
        if bytes != n / bs * t.type_size {
            return Err(ConvertError::Length {
                what: "ggml row bytes",
                expected: n / bs * t.type_size,
                got: bytes,
            });
        }
        Ok(t)
    }

    /// ggml's `to_float` for `ty` on one row (`dst.len()` elements, `src` exactly its bytes).
    ///
    /// # Errors
    /// Unknown type, a type without `to_float` (F32), or wrong lengths.
    pub fn to_float(&self, ty: i32, src: &[u8], dst: &mut [f32]) -> Result<(), ConvertError> {
        let t = self.check_row(ty, src.len(), dst.len())?;
        let f = t
            .to_float
            .ok_or_else(|| ConvertError::Ggml(format!("ggml type {ty} has no to_float")))?;
        // SAFETY: lengths checked against the type's block geometry.
        unsafe { f(src.as_ptr().cast(), dst.as_mut_ptr(), dst.len() as i64) };
        Ok(())
    }

    /// `ggml_quantize_chunk` of `src` as rows of `n_per_row` into a new buffer.
    ///
    /// # Errors
    /// Unknown type, a type that needs an importance matrix, or `src.len()` not a whole number of
    /// rows of whole blocks.
    pub fn quantize(
        &self,
        ty: i32,
        src: &[f32],
        n_per_row: usize,
    ) -> Result<Vec<u8>, ConvertError> {
        let t = self
            .raw(ty)
            .ok_or_else(|| ConvertError::Ggml(format!("unknown ggml type {ty}")))?;
        // SAFETY: plain query on a valid type id.
        if unsafe { (self.requires_imatrix)(ty) } {
            return Err(ConvertError::Ggml(format!(
                "ggml type {ty} needs an importance matrix"
            )));
        }
        let bs = t.blck_size as usize;
        if n_per_row == 0 || !n_per_row.is_multiple_of(bs) || !src.len().is_multiple_of(n_per_row) {
            return Err(ConvertError::PartialBlock {
                ggml_type: ty,
                n: n_per_row,
                block: bs,
            });
        }
        let nrows = src.len() / n_per_row;
        let mut out = vec![0u8; nrows * n_per_row / bs * t.type_size];
        // SAFETY: `out` holds exactly nrows rows of this type; no imatrix is needed.
        let written = unsafe {
            (self.quantize_chunk)(
                ty,
                src.as_ptr(),
                out.as_mut_ptr().cast(),
                0,
                nrows as i64,
                n_per_row as i64,
                std::ptr::null(),
            )
        };
        if written != out.len() {
            return Err(ConvertError::Ggml(format!(
                "ggml_quantize_chunk wrote {written} bytes, expected {}",
                out.len()
            )));
        }
        Ok(out)
    }

    /// `ggml_fp32_to_fp16_row`.
    ///
    /// # Errors
    /// Lengths differ.
    pub fn fp32_to_fp16_row(&self, src: &[f32], dst: &mut [f16]) -> Result<(), ConvertError> {
        if src.len() != dst.len() {
            return Err(ConvertError::Length {
                what: "f16 destination",
                expected: src.len(),
                got: dst.len(),
            });
        }
        let d: &mut [u16] = dst.reinterpret_cast_mut();
        // SAFETY: equal lengths.
        unsafe { (self.fp32_to_fp16_row)(src.as_ptr(), d.as_mut_ptr(), src.len() as i64) };
        Ok(())
    }

    /// `ggml_fp16_to_fp32_row`.
    ///
    /// # Errors
    /// Lengths differ.
    pub fn fp16_to_fp32_row(&self, src: &[f16], dst: &mut [f32]) -> Result<(), ConvertError> {
        if src.len() != dst.len() {
            return Err(ConvertError::Length {
                what: "f32 destination",
                expected: src.len(),
                got: dst.len(),
            });
        }
        let s: &[u16] = src.reinterpret_cast();
        // SAFETY: equal lengths.
        unsafe { (self.fp16_to_fp32_row)(s.as_ptr(), dst.as_mut_ptr(), src.len() as i64) };
        Ok(())
    }

    /// ggml's two-step path to fp16: `to_float` into `tmp` (at least `dst.len()` long), then
    /// `ggml_fp32_to_fp16_row`. For F32 (no `to_float`) only the second step runs. Works for every
    /// type ggml can dequantize, including those [`crate::row_to_f16`] does not convert natively.
    ///
    /// # Errors
    /// As [`GgmlBase::to_float`], or `tmp` too short.
    pub fn row_to_f16_two_step(
        &self,
        ty: i32,
        src: &[u8],
        tmp: &mut [f32],
        dst: &mut [f16],
    ) -> Result<(), ConvertError> {
        let n = dst.len();
        if tmp.len() < n {
            return Err(ConvertError::Length {
                what: "f32 scratch",
                expected: n,
                got: tmp.len(),
            });
        }
        let tmp = &mut tmp[..n];
        if ty == GGML_TYPE_F32 {
            self.check_row(ty, src.len(), n)?;
            for (t, b) in tmp.iter_mut().zip(src.chunks_exact(4)) {
                *t = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        } else {
            self.to_float(ty, src, tmp)?;
        }
        self.fp32_to_fp16_row(tmp, dst)
    }
}
