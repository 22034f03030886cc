//! The C boundary: the only layer that sees raw ggml pointers. Every `extern "C"` function of the
//! backend, device and registry vtables lives here and runs its body under [`catch_panic`]
//! (unwinding into C aborts the host); ggml tensors become [`TensorDesc`] views ([`desc`]) before
//! anything below is asked. File order follows ggml-blas: backend vtable, device vtable, registry,
//! entry points.

use std::ffi::{c_char, c_int, c_void};
use std::ptr::{addr_of, null, null_mut};
use std::sync::atomic::Ordering::Relaxed;

use crate::claim::*;
use crate::compute::*;
use crate::config::{Config, EngineChoice};
use crate::device::*;
use crate::ffi::*;
use crate::support::is_noop;
use crate::view::residence::{self, Access};
use crate::view::{desc, Operand};
use crate::{bridge, ggml, host_api, placement};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Runs `f`, turning a panic into `fallback`: unwinding across the C ABI would abort the host.
pub(crate) fn catch_panic<T>(fallback: T, f: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|_| {
        eprintln!("ggml-ane: internal panic caught at the C boundary");
        fallback
    })
}

pub(crate) static GUID: [u8; 16] = *b"ggml-ane-backend";

unsafe extern "C" fn ggml_backend_ane_get_name(_backend: ggml_backend_t) -> *const c_char {
    c"ANE".as_ptr()
}

unsafe extern "C" fn ggml_backend_ane_free(backend: ggml_backend_t) {
    catch_panic((), || {
        if !backend.is_null() {
            // SAFETY: backends and their contexts are created by `Box::into_raw` in init_backend
            // and freed once by ggml.
            let b = unsafe { Box::from_raw(backend) };
            if !b.context.is_null() {
                // SAFETY: as above.
                drop(unsafe { Box::from_raw(b.context.cast::<BackendCtx>()) });
            }
        }
    })
}

/// At normal exit: the process's stats, once (llama.cpp creates and frees backend instances for
/// its memory probe and an idle second instance of every ACCEL device, each of which would
/// otherwise print a table of its own), then every program unloaded: on the ANE that frees the
/// driver's slots and removes the model directories (they hold weights). Skipped if another
/// thread holds the cache.
extern "C" fn ggml_backend_ane_at_exit() {
    catch_panic((), || {
        placement::say_at_exit();
        if let Ok(dev) = device_state() {
            print_stats(dev);
            if let Ok(mut cache) = dev.cache.try_lock() {
                cache.clear(dev.engine.as_ref());
            }
        }
    })
}

unsafe extern "C" fn ggml_backend_ane_graph_compute(
    backend: ggml_backend_t,
    cgraph: *mut ggml_cgraph,
) -> i32 {
    catch_panic(GGML_STATUS_FAILED, || {
        // SAFETY: ggml passes a backend made by init_backend, whose context is a `BackendCtx`
        // alive until `free`.
        let Some(ctx) = (unsafe { backend.as_ref() })
            .and_then(|b| unsafe { b.context.cast::<BackendCtx>().as_ref() })
        else {
            return GGML_STATUS_FAILED;
        };
        graph_compute(ctx, cgraph, companion_claimed)
    })
}

pub(crate) fn backend_iface() -> ggml_backend_i {
    ggml_backend_i {
        get_name: Some(ggml_backend_ane_get_name),
        free: Some(ggml_backend_ane_free),
        set_tensor_async: None,    // synchronous backend on host memory
        get_tensor_async: None,    // same
        set_tensor_2d_async: None, // same
        get_tensor_2d_async: None, // same
        cpy_tensor_async: None,    // same
        synchronize: None,         // graph_compute returns when the work is done
        graph_plan_create: None,   // graph plans are unused by llama.cpp
        graph_plan_free: None,     // same
        graph_plan_update: None,   // same
        graph_plan_compute: None,  // same
        graph_compute: Some(ggml_backend_ane_graph_compute),
        event_record: None,   // no events
        event_wait: None,     // no events
        graph_optimize: None, // nodes run in graph order
    }
}

unsafe extern "C" fn ggml_backend_ane_device_get_name(_dev: ggml_backend_dev_t) -> *const c_char {
    c"ANE".as_ptr()
}

unsafe extern "C" fn ggml_backend_ane_device_get_description(
    _dev: ggml_backend_dev_t,
) -> *const c_char {
    catch_panic(c"Apple Neural Engine".as_ptr(), || match device_state() {
        Ok(d) if d.engine.name() == "reference" => {
            c"Apple Neural Engine (CPU reference engine)".as_ptr()
        }
        _ => c"Apple Neural Engine".as_ptr(),
    })
}

unsafe extern "C" fn ggml_backend_ane_device_get_memory(
    _dev: ggml_backend_dev_t,
    free: *mut usize,
    total: *mut usize,
) {
    // Host memory backend: it owns no device memory of its own.
    // SAFETY: ggml passes valid out-pointers.
    unsafe {
        if !free.is_null() {
            *free = 0;
        }
        if !total.is_null() {
            *total = 0;
        }
    }
}

unsafe extern "C" fn ggml_backend_ane_device_get_type(_dev: ggml_backend_dev_t) -> i32 {
    GGML_BACKEND_DEVICE_TYPE_ACCEL
}

unsafe extern "C" fn ggml_backend_ane_device_get_props(
    dev: ggml_backend_dev_t,
    props: *mut ggml_backend_dev_props,
) {
    catch_panic((), || {
        // SAFETY: ggml passes a valid props pointer.
        let Some(p) = (unsafe { props.as_mut() }) else {
            return;
        };
        // SAFETY: the callbacks ignore their argument.
        unsafe {
            p.name = ggml_backend_ane_device_get_name(dev);
            p.description = ggml_backend_ane_device_get_description(dev);
            ggml_backend_ane_device_get_memory(dev, &mut p.memory_free, &mut p.memory_total);
        }
        p.type_ = GGML_BACKEND_DEVICE_TYPE_ACCEL;
        p.device_id = null();
        // mmap: a model device without it turns mmap off for the whole model
        // (`llama-model.cpp:1514-1522`), which would move Metal's weights out of `MTL<n>_Mapped`,
        // the buffer the plugin reads beside the GPU. The plugin loads nothing itself. No async
        // and no events: `graph_compute` returns when the work is done, and pipeline parallelism
        // stays off (`llama-context.cpp:432-456`).
        p.caps = ggml_backend_dev_caps {
            mmap_support: true,
            ..ggml_backend_dev_caps::default()
        };
    })
}

unsafe extern "C" fn ggml_backend_ane_device_init_backend(
    dev: ggml_backend_dev_t,
    _params: *const c_char,
) -> ggml_backend_t {
    catch_panic(null_mut(), || {
        let Ok(state) = device_state() else {
            return null_mut();
        };
        static AT_EXIT: std::sync::Once = std::sync::Once::new();
        // SAFETY: registering a plain `extern "C" fn()` has no preconditions; it runs once at
        // normal process exit (before ggml's registry unloads the plugin: registered later).
        AT_EXIT.call_once(|| unsafe {
            libc::atexit(ggml_backend_ane_at_exit);
        });
        placement::inspect_devices(dev);
        Box::into_raw(Box::new(ggml_backend {
            guid: &GUID,
            iface: backend_iface(),
            device: dev,
            context: Box::into_raw(Box::new(BackendCtx::new(state))).cast(),
        }))
    })
}

unsafe extern "C" fn ggml_backend_ane_device_get_buffer_type(
    _dev: ggml_backend_dev_t,
) -> ggml_backend_buffer_type_t {
    catch_panic(null_mut(), || match ggml::ggml() {
        // SAFETY: ggml-base's CPU buffer type is a static object.
        Some(g) => unsafe { (g.cpu_buffer_type)() },
        None => null_mut(),
    })
}

pub(crate) unsafe extern "C" fn ggml_backend_ane_device_supports_op(
    _dev: ggml_backend_dev_t,
    op: *const ggml_tensor,
) -> bool {
    catch_panic(false, || {
        // SAFETY: ggml passes a valid tensor.
        let Some(t) = (unsafe { op.as_ref() }) else {
            return false;
        };
        if is_noop(t.op) {
            return true;
        }
        let (Ok(dev), Some(g)) = (device_state(), ggml::ggml()) else {
            return false;
        };
        if bridge::is_bridge(t.op) {
            return bridge::claims(dev, g, t);
        }
        if t.op != GGML_OP_MUL_MAT && t.op != GGML_OP_MUL_MAT_ID {
            return false;
        }
        if t.op == GGML_OP_MUL_MAT_ID {
            // SAFETY: a MUL_MAT_ID has three valid sources.
            let (s0, s1, ids) = unsafe { (&*t.src[0], &*t.src[1], &*t.src[2]) };
            let usable = || placement::weight_usable(g, s0, &dev.stats.declined_buft) != Access::No;
            return match decide_id(
                dev,
                &desc(s0),
                &desc(s1),
                &desc(ids),
                &desc(t),
                g.type_info(s0.type_),
                g.is_weight(s0).then_some(s0.data as usize),
                usable,
            ) {
                Verdict::Claim => true,
                Verdict::Decline(Some(d)) => {
                    dev.stats.declined[d.index()].fetch_add(1, Relaxed);
                    false
                }
                Verdict::Decline(None) => false,
            };
        }
        // SAFETY: a MUL_MAT has two valid sources.
        let (s0, s1) = unsafe { (&*t.src[0], &*t.src[1]) };
        // GGML_ANE_GPU_SHARE=1 beside a GPU: the GPU takes all of it, so it keeps the node (no
        // activations copied to the device for nothing).
        if matches!(Config::get().gpu_share, crate::config::GpuShare::Fixed(s) if s >= 1.0)
            && g.is_weight(s0)
            && placement::on_gpu(g, s0)
        {
            return false;
        }
        let node = ClaimedNode {
            src0: desc(s0),
            src1: desc(s1),
            dst: desc(t),
            // SAFETY: ggml's tensor, alive while the model is; used only when src0 is a weight
            // (loaded before llama.cpp reserves the graphs that ask) the plugin reads directly.
            src0_view: g
                .type_info(s0.type_)
                .filter(|_| placement::weight_access(g, s0) == Access::Direct)
                .map(|i| unsafe { Operand::of_tensor(s0, &i) }),
            src1_id: t.src[1] as usize,
            weight: g.is_weight(s0),
            gpu_weight: (g.is_weight(s0) && placement::on_gpu(g, s0)).then_some(s0.data as usize),
            staged_bytes: crate::matmul::staged_bytes(
                &dev.planner,
                s0.ne[0].max(1) as usize,
                s0.ne[1].max(1) as usize,
            ) as u64,
            src0_info: g.type_info(s0.type_),
            weight_usable: || {
                placement::weight_usable(g, s0, &dev.stats.declined_buft) != Access::No
            },
            buffer_range: || g.buffer_range(s0),
        };
        match decide(dev, &node) {
            Verdict::Claim => {
                after_claim(dev, &node);
                true
            }
            Verdict::Decline(Some(d)) => {
                dev.stats.declined[d.index()].fetch_add(1, Relaxed);
                false
            }
            Verdict::Decline(None) => false,
        }
    })
}

unsafe extern "C" fn ggml_backend_ane_device_supports_buft(
    _dev: ggml_backend_dev_t,
    buft: ggml_backend_buffer_type_t,
) -> bool {
    // Host memory, and the GPU buffer types the plugin reads (`view::residence`); the scheduler
    // leaves tensors of an accepted type where they are, so nothing else.
    catch_panic(false, || match ggml::ggml() {
        // SAFETY: ggml passes a valid buffer type.
        Some(g) if !buft.is_null() => {
            // SAFETY: as above.
            let r = unsafe { placement::residence(g, buft) };
            placement::offered(&r);
            residence::accepts(&r)
        }
        _ => false,
    })
}

pub(crate) struct SyncCell<T>(T);
// SAFETY: the wrapped ggml structs are written once at compile time and only read afterwards (ggml
// never writes to a registry or device it did not allocate).
unsafe impl<T> Sync for SyncCell<T> {}

pub(crate) static DEVICE: SyncCell<ggml_backend_device> = SyncCell(ggml_backend_device {
    iface: ggml_backend_device_i {
        get_name: Some(ggml_backend_ane_device_get_name),
        get_description: Some(ggml_backend_ane_device_get_description),
        get_memory: Some(ggml_backend_ane_device_get_memory),
        get_type: Some(ggml_backend_ane_device_get_type),
        get_props: Some(ggml_backend_ane_device_get_props),
        init_backend: Some(ggml_backend_ane_device_init_backend),
        get_buffer_type: Some(ggml_backend_ane_device_get_buffer_type),
        get_host_buffer_type: None, // the buffer type is already host memory
        buffer_from_host_ptr: None, // weights stay in llama.cpp's CPU buffers
        supports_op: Some(ggml_backend_ane_device_supports_op),
        supports_buft: Some(ggml_backend_ane_device_supports_buft),
        offload_op: None, // weights live in host buffers; supports_op decides placement
        event_new: None,  // no events
        event_free: None, // no events
        event_synchronize: None, // no events
    },
    reg: addr_of!(REG.0) as *mut ggml_backend_reg,
    context: null_mut(),
});

unsafe extern "C" fn ggml_backend_ane_reg_get_name(_reg: ggml_backend_reg_t) -> *const c_char {
    c"ANE".as_ptr()
}

unsafe extern "C" fn ggml_backend_ane_reg_get_device_count(_reg: ggml_backend_reg_t) -> usize {
    1
}

unsafe extern "C" fn ggml_backend_ane_reg_get_device(
    _reg: ggml_backend_reg_t,
    index: usize,
) -> ggml_backend_dev_t {
    if index == 0 {
        addr_of!(DEVICE.0) as *mut ggml_backend_device
    } else {
        null_mut()
    }
}

/// `ggml_backend_set_n_threads` of this backend: the engine uses no CPU threads, but the host's
/// count is what the CPU backend computes fallbacks with (as in CPU-only llama.cpp).
unsafe extern "C" fn ggml_backend_ane_set_n_threads(backend: ggml_backend_t, n_threads: c_int) {
    catch_panic((), || {
        // SAFETY: ggml passes a backend of this device (made by init_backend, alive until free);
        // its context is a `BackendCtx`.
        let ctx = unsafe { backend.as_ref() }
            .filter(|b| b.guid == addr_of!(GUID))
            .and_then(|b| unsafe { b.context.cast::<BackendCtx>().as_ref() });
        if let Some(ctx) = ctx {
            ctx.host.set_n_threads(n_threads);
        }
    })
}

unsafe extern "C" fn ggml_backend_ane_reg_get_proc_address(
    _reg: ggml_backend_reg_t,
    name: *const c_char,
) -> *mut c_void {
    catch_panic(null_mut(), || {
        if name.is_null() {
            return null_mut();
        }
        // SAFETY: ggml passes a NUL-terminated name.
        let name = unsafe { std::ffi::CStr::from_ptr(name) };
        if name == c"ggml_backend_set_n_threads" {
            let f: unsafe extern "C" fn(ggml_backend_t, c_int) = ggml_backend_ane_set_n_threads;
            f as *mut c_void
        } else {
            null_mut()
        }
    })
}

pub(crate) static REG: SyncCell<ggml_backend_reg> = SyncCell(ggml_backend_reg {
    // Set by `ggml_backend_init` to the host's version (`host_api`).
    api_version: std::sync::atomic::AtomicI32::new(GGML_BACKEND_API_VERSION),
    iface: ggml_backend_reg_i {
        get_name: Some(ggml_backend_ane_reg_get_name),
        get_device_count: Some(ggml_backend_ane_reg_get_device_count),
        get_device: Some(ggml_backend_ane_reg_get_device),
        get_proc_address: Some(ggml_backend_ane_reg_get_proc_address),
    },
    context: null_mut(),
});

/// The registry of this backend (`GGML_BACKEND_DL_IMPL`), always the same pointer, reporting the
/// host's backend API version when it is one the plugin supports (`host_api`); NULL otherwise,
/// so no struct is read with a layout the plugin was not built for.
///
/// # Safety
/// Called by ggml's loader; no preconditions.
#[no_mangle]
pub unsafe extern "C" fn ggml_backend_init() -> ggml_backend_reg_t {
    catch_panic(null_mut(), || match host_api::host_api() {
        host_api::HostApi::Supported { api, .. } => {
            REG.0.api_version.store(*api, Relaxed);
            addr_of!(REG.0) as *mut ggml_backend_reg
        }
        host_api::HostApi::Unsupported(line) => {
            say_unsupported(line);
            null_mut()
        }
    })
}

/// The one line for a host of another version, once per process.
pub(crate) fn say_unsupported(line: &str) {
    static SAID: std::sync::Once = std::sync::Once::new();
    SAID.call_once(|| eprintln!("{line}"));
}

/// 0 when the plugin has nothing to offer here: a host whose ggml backend API it does not speak
/// (one line says which versions work; checked first, before anything else runs), no ANE and no
/// `GGML_ANE_ENGINE=reference` (so loading it on Linux changes nothing unless asked); 10
/// otherwise.
///
/// # Safety
/// Called by ggml's loader; no preconditions.
#[no_mangle]
pub unsafe extern "C" fn ggml_backend_score() -> i32 {
    catch_panic(0, || {
        if let host_api::HostApi::Unsupported(line) = host_api::host_api() {
            say_unsupported(line);
            return 0;
        }
        match device_state() {
            Ok(_) => 10,
            Err(why) => {
                static SAID: std::sync::Once = std::sync::Once::new();
                if Config::get().engine != EngineChoice::Auto {
                    SAID.call_once(|| eprintln!("ggml-ane: not available: {why}"));
                }
                0
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_points_at_one_device() {
        // SAFETY: plain calls into our own statics.
        unsafe {
            // No ggml in the test process: init refuses; the registry itself is checked.
            assert!(ggml_backend_init().is_null());
            let reg = addr_of!(REG.0) as *mut ggml_backend_reg;
            assert_eq!((*reg).api_version.load(Relaxed), 3);
            let get_device = (*reg).iface.get_device.unwrap();
            let dev = get_device(reg, 0);
            assert!(!dev.is_null());
            assert_eq!((*dev).reg, reg);
            assert!(get_device(reg, 1).is_null());
            assert_eq!(
                ggml_backend_ane_device_get_type(dev),
                GGML_BACKEND_DEVICE_TYPE_ACCEL
            );
        }
    }

    #[test]
    fn score_is_zero_without_ggml_or_ane() {
        // No ggml-base in the test process and no ANE on Linux: the plugin must decline.
        // SAFETY: plain call.
        assert_eq!(unsafe { ggml_backend_score() }, 0);
    }
}
