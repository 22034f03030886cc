//! The C ABI of ggml's backend interface, version 3 (ggml 0.26.0), written out by hand.
//!
//! These structs come from `ggml/src/ggml-backend-impl.h` and `ggml/include/ggml.h` of the llama.cpp
//! tree the tests build (b11434). The headers are internal to ggml, so no bindings crate has them;
//! the sizes asserted at the bottom were measured on x86_64 with a C program compiled against those
//! headers (ggml-backend.md, appendix A) and guard against a field added or dropped here.

#![allow(non_camel_case_types, missing_docs)]

use std::ffi::{c_char, c_int, c_void};

/// `GGML_BACKEND_API_VERSION`: the loader rejects a plugin whose registry reports anything else.
pub const GGML_BACKEND_API_VERSION: c_int = 3;

pub const GGML_MAX_DIMS: usize = 4;
pub const GGML_MAX_SRC: usize = 10;
pub const GGML_MAX_OP_PARAMS: usize = 64;
pub const GGML_MAX_NAME: usize = 64;

// `enum ggml_op` values used here.
pub const GGML_OP_NONE: c_int = 0;
pub const GGML_OP_ROPE: c_int = 48;
pub const GGML_OP_GLU: c_int = 100;
pub const GGML_OP_MUL_MAT: c_int = 29;
pub const GGML_OP_MUL_MAT_ID: c_int = 30;
pub const GGML_OP_RESHAPE: c_int = 36;
pub const GGML_OP_VIEW: c_int = 37;
pub const GGML_OP_PERMUTE: c_int = 38;
pub const GGML_OP_TRANSPOSE: c_int = 39;

// `enum ggml_type` values used here.
pub const GGML_TYPE_F32: c_int = 0;
pub const GGML_TYPE_F16: c_int = 1;
pub const GGML_TYPE_BF16: c_int = 30;
pub const GGML_TYPE_I32: c_int = 26;
pub const GGML_TYPE_COUNT: c_int = 43;

pub const GGML_TENSOR_FLAG_COMPUTE: i32 = 16;

// `enum ggml_status`.
pub const GGML_STATUS_FAILED: c_int = -1;
pub const GGML_STATUS_SUCCESS: c_int = 0;

pub const GGML_BACKEND_DEVICE_TYPE_ACCEL: c_int = 3;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct ggml_tensor {
    pub type_: c_int,
    pub buffer: *mut ggml_backend_buffer,
    pub ne: [i64; GGML_MAX_DIMS],
    pub nb: [usize; GGML_MAX_DIMS],
    pub op: c_int,
    pub op_params: [i32; GGML_MAX_OP_PARAMS / 4],
    pub flags: i32,
    pub src: [*mut ggml_tensor; GGML_MAX_SRC],
    pub view_src: *mut ggml_tensor,
    pub view_offs: usize,
    pub data: *mut c_void,
    pub name: [c_char; GGML_MAX_NAME],
    pub extra: *mut c_void,
    pub padding: [c_char; 8],
}

/// Opaque: only reached through `ggml_graph_n_nodes` / `ggml_graph_node`.
#[repr(C)]
pub struct ggml_cgraph {
    _private: [u8; 0],
}

/// Opaque here: we never look inside buffers, only pass them to ggml's own functions.
#[repr(C)]
pub struct ggml_backend_buffer {
    _private: [u8; 0],
}

/// Opaque here: we use the CPU buffer type of ggml-base.
#[repr(C)]
pub struct ggml_backend_buffer_type {
    _private: [u8; 0],
}

pub type ggml_backend_buffer_type_t = *mut ggml_backend_buffer_type;
pub type ggml_backend_t = *mut ggml_backend;
pub type ggml_backend_dev_t = *mut ggml_backend_device;
pub type ggml_backend_reg_t = *mut ggml_backend_reg;

pub type ggml_to_float_t = Option<unsafe extern "C" fn(x: *const c_void, y: *mut f32, k: i64)>;

#[repr(C)]
pub struct ggml_type_traits {
    pub type_name: *const c_char,
    pub blck_size: i64,
    pub blck_size_interleave: i64,
    pub type_size: usize,
    pub is_quantized: bool,
    pub to_float: ggml_to_float_t,
    pub from_float_ref: Option<unsafe extern "C" fn(x: *const f32, y: *mut c_void, k: i64)>,
}

type Fp = Option<unsafe extern "C" fn()>;

#[repr(C)]
pub struct ggml_backend_i {
    pub get_name: Option<unsafe extern "C" fn(ggml_backend_t) -> *const c_char>,
    pub free: Option<unsafe extern "C" fn(ggml_backend_t)>,
    pub set_tensor_async: Fp,
    pub get_tensor_async: Fp,
    pub set_tensor_2d_async: Fp,
    pub get_tensor_2d_async: Fp,
    pub cpy_tensor_async: Fp,
    pub synchronize: Fp,
    pub graph_plan_create: Fp,
    pub graph_plan_free: Fp,
    pub graph_plan_update: Fp,
    pub graph_plan_compute: Fp,
    pub graph_compute: Option<unsafe extern "C" fn(ggml_backend_t, *mut ggml_cgraph) -> c_int>,
    pub event_record: Fp,
    pub event_wait: Fp,
    pub graph_optimize: Fp,
}

#[repr(C)]
pub struct ggml_backend {
    pub guid: *const [u8; 16],
    pub iface: ggml_backend_i,
    pub device: ggml_backend_dev_t,
    pub context: *mut c_void,
}

#[repr(C)]
#[derive(Default)]
pub struct ggml_backend_dev_caps {
    pub async_: bool,
    pub host_buffer: bool,
    pub buffer_from_host_ptr: bool,
    pub events: bool,
    pub mmap_support: bool,
}

#[repr(C)]
pub struct ggml_backend_dev_props {
    pub name: *const c_char,
    pub description: *const c_char,
    pub memory_free: usize,
    pub memory_total: usize,
    pub type_: c_int,
    pub device_id: *const c_char,
    pub caps: ggml_backend_dev_caps,
}

#[repr(C)]
pub struct ggml_backend_device_i {
    pub get_name: Option<unsafe extern "C" fn(ggml_backend_dev_t) -> *const c_char>,
    pub get_description: Option<unsafe extern "C" fn(ggml_backend_dev_t) -> *const c_char>,
    pub get_memory: Option<unsafe extern "C" fn(ggml_backend_dev_t, *mut usize, *mut usize)>,
    pub get_type: Option<unsafe extern "C" fn(ggml_backend_dev_t) -> c_int>,
    pub get_props: Option<unsafe extern "C" fn(ggml_backend_dev_t, *mut ggml_backend_dev_props)>,
    pub init_backend:
        Option<unsafe extern "C" fn(ggml_backend_dev_t, *const c_char) -> ggml_backend_t>,
    pub get_buffer_type:
        Option<unsafe extern "C" fn(ggml_backend_dev_t) -> ggml_backend_buffer_type_t>,
    pub get_host_buffer_type: Fp,
    pub buffer_from_host_ptr: Fp,
    pub supports_op: Option<unsafe extern "C" fn(ggml_backend_dev_t, *const ggml_tensor) -> bool>,
    pub supports_buft:
        Option<unsafe extern "C" fn(ggml_backend_dev_t, ggml_backend_buffer_type_t) -> bool>,
    pub offload_op: Fp,
    pub event_new: Fp,
    pub event_free: Fp,
    pub event_synchronize: Fp,
}

#[repr(C)]
pub struct ggml_backend_device {
    pub iface: ggml_backend_device_i,
    pub reg: ggml_backend_reg_t,
    pub context: *mut c_void,
}

#[repr(C)]
pub struct ggml_backend_reg_i {
    pub get_name: Option<unsafe extern "C" fn(ggml_backend_reg_t) -> *const c_char>,
    pub get_device_count: Option<unsafe extern "C" fn(ggml_backend_reg_t) -> usize>,
    pub get_device: Option<unsafe extern "C" fn(ggml_backend_reg_t, usize) -> ggml_backend_dev_t>,
    pub get_proc_address:
        Option<unsafe extern "C" fn(ggml_backend_reg_t, *const c_char) -> *mut c_void>,
}

#[repr(C)]
pub struct ggml_backend_reg {
    /// Atomic (same layout as `int`) so the plugin can set it to the host's version at init.
    pub api_version: std::sync::atomic::AtomicI32,
    pub iface: ggml_backend_reg_i,
    pub context: *mut c_void,
}

#[cfg(target_pointer_width = "64")]
const _: () = {
    assert!(std::mem::size_of::<ggml_tensor>() == 336);
    assert!(std::mem::offset_of!(ggml_tensor, op) == 80);
    assert!(std::mem::offset_of!(ggml_tensor, flags) == 148);
    assert!(std::mem::offset_of!(ggml_tensor, src) == 152);
    assert!(std::mem::offset_of!(ggml_tensor, data) == 248);
    assert!(std::mem::offset_of!(ggml_tensor, extra) == 320);
    assert!(std::mem::size_of::<ggml_backend_i>() == 128);
    assert!(std::mem::size_of::<ggml_backend_device_i>() == 120);
    assert!(std::mem::size_of::<ggml_backend_reg_i>() == 32);
    assert!(std::mem::size_of::<ggml_backend>() == 152);
    assert!(std::mem::size_of::<ggml_backend_device>() == 136);
    assert!(std::mem::size_of::<ggml_backend_reg>() == 48);
    assert!(std::mem::size_of::<ggml_backend_dev_props>() == 56);
    assert!(std::mem::size_of::<ggml_backend_dev_caps>() == 5);
};
