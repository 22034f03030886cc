//! The few ggml-base functions the plugin calls, resolved at run time.
//!
//! The plugin is `dlopen`ed by a process that already has `libggml-base` loaded. Resolving the
//! symbols with `dlsym` (instead of linking) keeps the `.so` free of a link-time dependency, lets
//! `cargo test` link without ggml, and behaves the same on macOS, where a dylib may not have
//! undefined symbols. If ggml-base is not in the global scope (a host that loaded it `RTLD_LOCAL`),
//! we try the library by name with `RTLD_NOLOAD`, which only finds an already-loaded copy: the
//! plugin must never bring its own ggml (buffer types are compared by pointer).

use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::OnceLock;

use crate::ffi::*;

/// The buffer of `t`, or of the tensor it views (null: not allocated).
pub(crate) fn buffer_of(t: &ggml_tensor) -> *mut ggml_backend_buffer {
    if t.buffer.is_null() && !t.view_src.is_null() {
        // SAFETY: view_src is a valid tensor for as long as its view is.
        unsafe { (*t.view_src).buffer }
    } else {
        t.buffer
    }
}

/// Function pointers into ggml-base.
#[derive(Debug)]
pub struct Ggml {
    pub cpu_buffer_type: unsafe extern "C" fn() -> ggml_backend_buffer_type_t,
    pub buft_is_host: unsafe extern "C" fn(ggml_backend_buffer_type_t) -> bool,
    pub get_type_traits: unsafe extern "C" fn(c_int) -> *const ggml_type_traits,
    pub graph_n_nodes: unsafe extern "C" fn(*mut ggml_cgraph) -> c_int,
    pub graph_node: unsafe extern "C" fn(*mut ggml_cgraph, c_int) -> *mut ggml_tensor,
    /// `ggml_backend_buffer_get_usage` (WEIGHTS = 1 marks immutable model weights).
    pub buffer_get_usage: Option<unsafe extern "C" fn(*mut ggml_backend_buffer) -> c_int>,
    /// `ggml_backend_buffer_get_base` and `ggml_backend_buffer_get_size`: the live byte range of
    /// a tensor's buffer (see [`Ggml::buffer_range`]).
    pub buffer_get_base: Option<unsafe extern "C" fn(*mut ggml_backend_buffer) -> *mut c_void>,
    /// See `buffer_get_base`.
    pub buffer_get_size: Option<unsafe extern "C" fn(*mut ggml_backend_buffer) -> usize>,
    /// Where weights and devices are (see [`crate::placement`]); optional, like `buffer_get_usage`.
    pub placement: Placement,
}

/// The ggml functions [`crate::placement`] inspects buffers and registered devices with. Each is
/// optional: without it the plugin just says less.
#[derive(Debug, Default)]
pub struct Placement {
    /// `ggml_backend_buffer_get_type`.
    pub buffer_get_type:
        Option<unsafe extern "C" fn(*mut ggml_backend_buffer) -> ggml_backend_buffer_type_t>,
    /// `ggml_backend_buft_name`.
    pub buft_name: Option<unsafe extern "C" fn(ggml_backend_buffer_type_t) -> *const c_char>,
    /// `ggml_backend_buft_get_device`.
    pub buft_get_device:
        Option<unsafe extern "C" fn(ggml_backend_buffer_type_t) -> ggml_backend_dev_t>,
    /// `ggml_backend_dev_type` (`enum ggml_backend_dev_type`).
    pub dev_type: Option<unsafe extern "C" fn(ggml_backend_dev_t) -> c_int>,
    /// `ggml_backend_dev_name`.
    pub dev_name: Option<unsafe extern "C" fn(ggml_backend_dev_t) -> *const c_char>,
    /// `ggml_backend_dev_count` (in libggml, the registry, not ggml-base).
    pub dev_count: Option<unsafe extern "C" fn() -> usize>,
    /// `ggml_backend_dev_get` (in libggml).
    pub dev_get: Option<unsafe extern "C" fn(usize) -> ggml_backend_dev_t>,
    /// `ggml_backend_dev_backend_reg`: a device's registry (whose name tells Metal's and RPC's
    /// devices apart from look-alikes, see [`crate::view::residence`]).
    pub dev_backend_reg: Option<unsafe extern "C" fn(ggml_backend_dev_t) -> *mut c_void>,
    /// `ggml_backend_reg_name`.
    pub reg_name: Option<unsafe extern "C" fn(*mut c_void) -> *const c_char>,
    /// `ggml_backend_tensor_get`: reads tensors of buffers the plugin reads through ggml's API.
    pub tensor_get: Option<unsafe extern "C" fn(*const ggml_tensor, *mut c_void, usize, usize)>,
    /// `ggml_backend_tensor_set`: writes outputs into such buffers.
    pub tensor_set: Option<unsafe extern "C" fn(*mut ggml_tensor, *const c_void, usize, usize)>,
    /// `ggml_nbytes`: the bound `ggml_backend_tensor_get` asserts on.
    pub nbytes: Option<unsafe extern "C" fn(*const ggml_tensor) -> usize>,
}

/// Library names the registry functions (`ggml_backend_dev_count`, `ggml_backend_dev_get`) live in
/// when they are not in the global scope.
const REGISTRY_LIBS: [&CStr; 4] = [
    c"libggml.so",
    c"libggml.so.0",
    c"libggml.dylib",
    c"libggml.0.dylib",
];

fn resolve_placement(handle: *mut c_void) -> Placement {
    let f = |n: &CStr| {
        let p = lookup(handle, n);
        (!p.is_null()).then_some(p)
    };
    // The registry is in libggml; look in the global scope, then in an already loaded copy.
    let reg = |n: &CStr| {
        f(n).or_else(|| {
            REGISTRY_LIBS.iter().find_map(|lib| {
                // SAFETY: RTLD_NOLOAD only returns a handle to an already loaded library.
                let h = unsafe { libc::dlopen(lib.as_ptr(), libc::RTLD_NOLOAD | libc::RTLD_LAZY) };
                (!h.is_null())
                    .then(|| lookup(h, n))
                    .filter(|p| !p.is_null())
            })
        })
    };
    // SAFETY: each symbol is the ggml function of that name, whose C signature (ggml 0.26.0,
    // ggml-backend.h) is the one transmuted to.
    unsafe {
        Placement {
            buffer_get_type: f(c"ggml_backend_buffer_get_type").map(|p| std::mem::transmute(p)),
            buft_name: f(c"ggml_backend_buft_name").map(|p| std::mem::transmute(p)),
            buft_get_device: f(c"ggml_backend_buft_get_device").map(|p| std::mem::transmute(p)),
            dev_type: f(c"ggml_backend_dev_type").map(|p| std::mem::transmute(p)),
            dev_name: f(c"ggml_backend_dev_name").map(|p| std::mem::transmute(p)),
            dev_count: reg(c"ggml_backend_dev_count").map(|p| std::mem::transmute(p)),
            dev_get: reg(c"ggml_backend_dev_get").map(|p| std::mem::transmute(p)),
            dev_backend_reg: f(c"ggml_backend_dev_backend_reg").map(|p| std::mem::transmute(p)),
            reg_name: f(c"ggml_backend_reg_name").map(|p| std::mem::transmute(p)),
            tensor_get: f(c"ggml_backend_tensor_get").map(|p| std::mem::transmute(p)),
            tensor_set: f(c"ggml_backend_tensor_set").map(|p| std::mem::transmute(p)),
            nbytes: f(c"ggml_nbytes").map(|p| std::mem::transmute(p)),
        }
    }
}

/// `name` in the global scope, else in an already loaded libggml or libggml-base (never loading
/// one: the plugin must use the host's own ggml).
pub(crate) fn find_symbol(name: &CStr) -> Option<*mut c_void> {
    let p = lookup(libc::RTLD_DEFAULT, name);
    if !p.is_null() {
        return Some(p);
    }
    REGISTRY_LIBS
        .iter()
        .chain(BASE_LIBS.iter())
        .find_map(|lib| {
            // SAFETY: RTLD_NOLOAD only returns a handle to an already loaded library.
            let h = unsafe { libc::dlopen(lib.as_ptr(), libc::RTLD_NOLOAD | libc::RTLD_LAZY) };
            (!h.is_null())
                .then(|| lookup(h, name))
                .filter(|p| !p.is_null())
        })
}

/// Library names of ggml-base.
const BASE_LIBS: [&CStr; 4] = [
    c"libggml-base.so",
    c"libggml-base.so.0",
    c"libggml-base.dylib",
    c"libggml-base.0.dylib",
];

/// `GGML_BACKEND_BUFFER_USAGE_WEIGHTS`.
pub const GGML_BACKEND_BUFFER_USAGE_WEIGHTS: c_int = 1;

fn lookup(handle: *mut c_void, name: &CStr) -> *mut c_void {
    // SAFETY: dlsym with a valid handle (or RTLD_DEFAULT) and a NUL-terminated name has no other
    // preconditions.
    unsafe { libc::dlsym(handle, name.as_ptr()) }
}

fn resolve_in(handle: *mut c_void) -> Option<Ggml> {
    let f = |n: &CStr| {
        let p = lookup(handle, n);
        (!p.is_null()).then_some(p)
    };
    let (a, b, c, d, e) = (
        f(c"ggml_backend_cpu_buffer_type")?,
        f(c"ggml_backend_buft_is_host")?,
        f(c"ggml_get_type_traits")?,
        f(c"ggml_graph_n_nodes")?,
        f(c"ggml_graph_node")?,
    );
    // SAFETY: each symbol is the ggml-base function of that name, whose C signature (ggml 0.26.0,
    // ggml.h / ggml-backend.h) is the one transmuted to.
    unsafe {
        Some(Ggml {
            cpu_buffer_type: std::mem::transmute::<
                *mut c_void,
                unsafe extern "C" fn() -> ggml_backend_buffer_type_t,
            >(a),
            buft_is_host: std::mem::transmute::<
                *mut c_void,
                unsafe extern "C" fn(ggml_backend_buffer_type_t) -> bool,
            >(b),
            get_type_traits: std::mem::transmute::<
                *mut c_void,
                unsafe extern "C" fn(c_int) -> *const ggml_type_traits,
            >(c),
            graph_n_nodes: std::mem::transmute::<
                *mut c_void,
                unsafe extern "C" fn(*mut ggml_cgraph) -> c_int,
            >(d),
            graph_node: std::mem::transmute::<
                *mut c_void,
                unsafe extern "C" fn(*mut ggml_cgraph, c_int) -> *mut ggml_tensor,
            >(e),
            buffer_get_usage: f(c"ggml_backend_buffer_get_usage").map(|p| {
                std::mem::transmute::<
                    *mut c_void,
                    unsafe extern "C" fn(*mut ggml_backend_buffer) -> c_int,
                >(p)
            }),
            buffer_get_base: f(c"ggml_backend_buffer_get_base").map(|p| {
                std::mem::transmute::<
                    *mut c_void,
                    unsafe extern "C" fn(*mut ggml_backend_buffer) -> *mut c_void,
                >(p)
            }),
            buffer_get_size: f(c"ggml_backend_buffer_get_size").map(|p| {
                std::mem::transmute::<
                    *mut c_void,
                    unsafe extern "C" fn(*mut ggml_backend_buffer) -> usize,
                >(p)
            }),
            placement: resolve_placement(handle),
        })
    }
}

/// ggml-base, if it is loaded in this process.
pub fn ggml() -> Option<&'static Ggml> {
    static GGML: OnceLock<Option<Ggml>> = OnceLock::new();
    GGML.get_or_init(|| {
        resolve_in(libc::RTLD_DEFAULT).or_else(|| {
            BASE_LIBS.iter().find_map(|name| {
                // SAFETY: RTLD_NOLOAD only returns a handle to an already loaded library.
                let h = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOLOAD | libc::RTLD_LAZY) };
                (!h.is_null()).then(|| resolve_in(h)).flatten()
            })
        })
    })
    .as_ref()
}

/// What the plugin needs to know about a ggml type.
#[derive(Clone, Copy, Debug)]
pub struct TypeInfo {
    /// Elements per block (1 for plain types).
    pub blck_size: usize,
    /// Bytes per block.
    pub type_size: usize,
    /// Dequantizer / widener to f32, if ggml-base has one.
    pub to_float: ggml_to_float_t,
}

impl Ggml {
    /// True when `t`'s memory is a llama.cpp weights buffer: immutable for the model's lifetime, so
    /// its fp16 conversion can be kept.
    pub fn is_weight(&self, t: &ggml_tensor) -> bool {
        let Some(usage) = self.buffer_get_usage else {
            return false;
        };
        let buf = buffer_of(t);
        // SAFETY: a non-null buffer of a live tensor is a valid ggml buffer.
        !buf.is_null() && unsafe { usage(buf) } == GGML_BACKEND_BUFFER_USAGE_WEIGHTS
    }

    /// `[base, base + size)` of the buffer holding `t`: memory that stays readable while `t` is
    /// (a tensor of the graph being computed). `None` without the functions or a buffer.
    pub fn buffer_range(&self, t: &ggml_tensor) -> Option<(usize, usize)> {
        let (base, size) = (self.buffer_get_base?, self.buffer_get_size?);
        let buf = buffer_of(t);
        if buf.is_null() {
            return None;
        }
        // SAFETY: a non-null buffer of a live tensor is a valid ggml buffer.
        let (b, n) = unsafe { (base(buf) as usize, size(buf)) };
        (b != 0).then_some((b, b + n))
    }

    /// Traits of `ty`, or `None` for an unknown type.
    pub fn type_info(&self, ty: c_int) -> Option<TypeInfo> {
        if !(0..GGML_TYPE_COUNT).contains(&ty) {
            return None;
        }
        // SAFETY: ggml_get_type_traits returns a pointer into a static table for any type < COUNT.
        let t = unsafe { (self.get_type_traits)(ty).as_ref()? };
        (t.blck_size > 0 && t.type_size > 0).then_some(TypeInfo {
            blck_size: t.blck_size as usize,
            type_size: t.type_size,
            to_float: t.to_float,
        })
    }
}
