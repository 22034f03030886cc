//! The host's own CPU backend, for MUL_MATs the device claimed but could not compute.
//!
//! A user whose ANE fails must get what CPU-only llama.cpp gives: the same quantized kernels (src1
//! quantized to the weight's `vec_dot_type`), the same threads, the same numbers. So a fallback is
//! not a loop of ours: it builds a small graph of MUL_MAT nodes over the same memory (views of the
//! columns the device did not compute) and hands it to the CPU device's backend, found through the
//! host's registry (`ggml_backend_dev_by_type(CPU)`). Only where the host has no CPU backend, or it
//! declines a node, does the plugin's own f32 loop ([`crate::matmul`]) run.
//!
//! It also computes the device's bridge ops ([`HostCpu::compute_node`], see `crate::bridge`): a
//! copy of the graph's node over views of host memory, the CPU's kernel and threads.
//!
//! Everything is resolved with `dlsym` like [`crate::ggml`]; a missing symbol just means the own
//! loop. One CPU backend per plugin backend instance (a llama context), created at the first
//! fallback and behind a mutex: a ggml CPU backend is not reentrant.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::atomic::{AtomicI32, Ordering::Relaxed};
use std::sync::{Mutex, OnceLock};

use crate::ffi::{
    ggml_backend_dev_t, ggml_backend_reg_t, ggml_backend_t, ggml_cgraph, ggml_tensor,
};
use crate::view::Operand;

/// `GGML_BACKEND_DEVICE_TYPE_CPU`.
const DEVICE_TYPE_CPU: c_int = 0;

#[repr(C)]
pub(crate) struct InitParams {
    pub(crate) mem_size: usize,
    pub(crate) mem_buffer: *mut c_void,
    pub(crate) no_alloc: bool,
}

/// Opaque `struct ggml_context`.
#[repr(C)]
pub(crate) struct GgmlContext {
    _private: [u8; 0],
}

type SetThreads = unsafe extern "C" fn(ggml_backend_t, c_int);

/// The ggml functions a fallback graph needs (ggml.h, ggml-backend.h of ggml 0.26.0), and those
/// [`crate::host_gpu`] builds its graphs with.
pub(crate) struct Fns {
    pub(crate) init: unsafe extern "C" fn(InitParams) -> *mut GgmlContext,
    pub(crate) free: unsafe extern "C" fn(*mut GgmlContext),
    pub(crate) tensor_overhead: unsafe extern "C" fn() -> usize,
    pub(crate) graph_overhead_custom: unsafe extern "C" fn(usize, bool) -> usize,
    pub(crate) new_graph_custom:
        unsafe extern "C" fn(*mut GgmlContext, usize, bool) -> *mut ggml_cgraph,
    pub(crate) graph_add_node: unsafe extern "C" fn(*mut ggml_cgraph, *mut ggml_tensor),
    pub(crate) new_tensor:
        unsafe extern "C" fn(*mut GgmlContext, c_int, c_int, *const i64) -> *mut ggml_tensor,
    pub(crate) mul_mat: unsafe extern "C" fn(
        *mut GgmlContext,
        *mut ggml_tensor,
        *mut ggml_tensor,
    ) -> *mut ggml_tensor,
    pub(crate) graph_compute: unsafe extern "C" fn(ggml_backend_t, *mut ggml_cgraph) -> c_int,
    pub(crate) backend_free: unsafe extern "C" fn(ggml_backend_t),
    dev_by_type: unsafe extern "C" fn(c_int) -> ggml_backend_dev_t,
    pub(crate) dev_init: unsafe extern "C" fn(ggml_backend_dev_t, *const c_char) -> ggml_backend_t,
    dev_supports_op: unsafe extern "C" fn(ggml_backend_dev_t, *const ggml_tensor) -> bool,
    dev_backend_reg: unsafe extern "C" fn(ggml_backend_dev_t) -> ggml_backend_reg_t,
    reg_get_proc_address: unsafe extern "C" fn(ggml_backend_reg_t, *const c_char) -> *mut c_void,
    pub(crate) dev_buffer_type:
        unsafe extern "C" fn(ggml_backend_dev_t) -> crate::ffi::ggml_backend_buffer_type_t,
    pub(crate) alloc_ctx_tensors_from_buft:
        unsafe extern "C" fn(
            *mut GgmlContext,
            crate::ffi::ggml_backend_buffer_type_t,
        ) -> *mut crate::ffi::ggml_backend_buffer,
    pub(crate) buffer_free: unsafe extern "C" fn(*mut crate::ffi::ggml_backend_buffer),
    pub(crate) synchronize: unsafe extern "C" fn(ggml_backend_t),
}

impl Fns {
    /// Runs `body` with a metadata-only ggml context (no_alloc) with room for `tensors` tensors
    /// and a graph of `nodes` nodes, freed afterwards on every path; `None` when ggml gives no
    /// context.
    pub(crate) fn with_context<R>(
        &self,
        tensors: usize,
        nodes: usize,
        body: impl FnOnce(*mut GgmlContext) -> R,
    ) -> Option<R> {
        // SAFETY: size queries without preconditions.
        let size = unsafe {
            (self.tensor_overhead)() * tensors + (self.graph_overhead_custom)(nodes, false)
        } + 1024;
        // SAFETY: a metadata-only context of `size` bytes, freed below.
        let ctx = unsafe {
            (self.init)(InitParams {
                mem_size: size,
                mem_buffer: std::ptr::null_mut(),
                no_alloc: true,
            })
        };
        if ctx.is_null() {
            return None;
        }
        let r = body(ctx);
        // SAFETY: made above, freed once.
        unsafe { (self.free)(ctx) };
        Some(r)
    }
}

/// The symbol `name` as a function pointer of type `T`.
///
/// # Safety
/// `T` must be the C function pointer type of the ggml function of that name.
unsafe fn sym<T>(name: &CStr) -> Option<T> {
    assert_eq!(std::mem::size_of::<T>(), std::mem::size_of::<*mut c_void>());
    let p = crate::ggml::find_symbol(name)?;
    // SAFETY: a non-null function address, read as the pointer type the caller vouches for.
    Some(unsafe { std::mem::transmute_copy::<*mut c_void, T>(&p) })
}

pub(crate) fn fns() -> Option<&'static Fns> {
    static FNS: OnceLock<Option<Fns>> = OnceLock::new();
    FNS.get_or_init(|| {
        // SAFETY: each field's type is the C signature of the function of that name
        // (ggml.h / ggml-backend.h, ggml 0.26.0).
        unsafe {
            Some(Fns {
                init: sym(c"ggml_init")?,
                free: sym(c"ggml_free")?,
                tensor_overhead: sym(c"ggml_tensor_overhead")?,
                graph_overhead_custom: sym(c"ggml_graph_overhead_custom")?,
                new_graph_custom: sym(c"ggml_new_graph_custom")?,
                graph_add_node: sym(c"ggml_graph_add_node")?,
                new_tensor: sym(c"ggml_new_tensor")?,
                mul_mat: sym(c"ggml_mul_mat")?,
                graph_compute: sym(c"ggml_backend_graph_compute")?,
                backend_free: sym(c"ggml_backend_free")?,
                dev_by_type: sym(c"ggml_backend_dev_by_type")?,
                dev_init: sym(c"ggml_backend_dev_init")?,
                dev_supports_op: sym(c"ggml_backend_dev_supports_op")?,
                dev_backend_reg: sym(c"ggml_backend_dev_backend_reg")?,
                reg_get_proc_address: sym(c"ggml_backend_reg_get_proc_address")?,
                dev_buffer_type: sym(c"ggml_backend_dev_buffer_type")?,
                alloc_ctx_tensors_from_buft: sym(c"ggml_backend_alloc_ctx_tensors_from_buft")?,
                buffer_free: sym(c"ggml_backend_buffer_free")?,
                synchronize: sym(c"ggml_backend_synchronize")?,
            })
        }
    })
    .as_ref()
}

/// One MUL_MAT for the CPU backend: `dst = src0 x src1` with ggml's broadcasting, each operand
/// any view (type, shape, strides, address) of host memory.
#[derive(Clone, Copy, Debug)]
pub struct MatMul {
    /// Weights (or other left operand), `[K, M, ne02, ne03]`.
    pub src0: Operand,
    /// Activations, `[K, N, ne12, ne13]`.
    pub src1: Operand,
    /// F32 output, `[M, N, ne12, ne13]`.
    pub dst: Operand,
}

impl MatMul {
    /// The shapes ggml's `ggml_mul_mat` accepts without asserting (which would abort the host):
    /// same K, broadcastable batch dims, src0 not transposed, dst shaped as the product.
    pub fn is_valid(&self) -> bool {
        let (a, b, d) = (&self.src0.desc, &self.src1.desc, &self.dst.desc);
        a.ne[0] == b.ne[0]
            && a.ne.iter().chain(&b.ne).all(|&v| v > 0)
            && b.ne[2] % a.ne[2] == 0
            && b.ne[3] % a.ne[3] == 0
            && a.nb[0] <= a.nb[1]
            && d.ne == [a.ne[1], b.ne[1], b.ne[2], b.ne[3]]
            && d.ty == crate::ffi::GGML_TYPE_F32
            && d.nb[0] == 4
    }
}

/// A created CPU backend.
struct Cpu {
    dev: ggml_backend_dev_t,
    backend: ggml_backend_t,
    set_threads: Option<SetThreads>,
    threads: c_int,
}

// SAFETY: the backend is only used under the slot's mutex, one thread at a time.
unsafe impl Send for Cpu {}

impl Drop for Cpu {
    fn drop(&mut self) {
        if let Some(f) = fns() {
            // SAFETY: created by ggml_backend_dev_init and freed once, here.
            unsafe { (f.backend_free)(self.backend) };
        }
    }
}

/// Why a fallback could not use the CPU backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotRun {
    /// ggml's graph or registry functions are not in this process.
    NoGgml,
    /// No CPU device in the host's registry, or it would not start.
    NoCpuBackend,
    /// The CPU backend declined (or cannot take) this node.
    Declined,
    /// Graph compute returned this status.
    Failed(i32),
}

/// The CPU backend of one plugin backend instance, made on first use.
#[derive(Default)]
pub struct HostCpu {
    cpu: Mutex<Option<Option<Cpu>>>,
    /// Threads the host asked for (`ggml_backend_set_n_threads` on the plugin's backend); 0 until
    /// it asks, then the CPU backend's own default is kept.
    n_threads: AtomicI32,
}

impl HostCpu {
    /// Records the host's thread count for this backend instance.
    pub fn set_n_threads(&self, n: i32) {
        self.n_threads.store(n.max(1), Relaxed);
    }

    /// Whether the host has a CPU backend to fall back to.
    pub fn available() -> bool {
        fns().is_some_and(|f| {
            // SAFETY: the registry lookup has no preconditions.
            !unsafe { (f.dev_by_type)(DEVICE_TYPE_CPU) }.is_null()
        })
    }

    /// Computes `ops` in one graph on the CPU backend. All or nothing: on `Err` no output was
    /// written by this call (every node is checked before any runs). The operands are views
    /// ([`Operand`]): valid memory of their shapes, outputs apart from sources.
    pub fn compute(&self, ops: &[MatMul]) -> Result<(), NotRun> {
        let f = fns().ok_or(NotRun::NoGgml)?;
        if ops.is_empty() {
            return Ok(());
        }
        // ggml reads what the descriptions say: each must lie inside its view's memory.
        let inside = |o: &Operand| o.covers_desc();
        if !ops
            .iter()
            .all(|op| op.is_valid() && inside(&op.src0) && inside(&op.src1) && inside(&op.dst))
        {
            return Err(NotRun::Declined);
        }
        self.with_cpu(f, |cpu| {
            // SAFETY: the operands are views (valid memory, their invariant); `is_valid` held for
            // each; the context is freed on every path.
            unsafe { run_graph(f, cpu, ops) }
        })
    }

    /// Whether the host's CPU device computes `node` (its op, types, shapes and parameters) when
    /// its tensors are host memory: asked with copies of the node whose sources have no buffer,
    /// since the CPU device declines non-host buffers the plugin reads through its own views.
    pub fn supports(node: &ggml_tensor) -> bool {
        let Some(f) = fns() else {
            return false;
        };
        // SAFETY: the registry lookup has no preconditions.
        let dev = unsafe { (f.dev_by_type)(DEVICE_TYPE_CPU) };
        if dev.is_null() {
            return false;
        }
        let mut srcs = [None; crate::ffi::GGML_MAX_SRC];
        for (i, s) in node.src.iter().enumerate() {
            // SAFETY: a node's non-null sources are valid tensors.
            if let Some(t) = unsafe { s.as_ref() } {
                srcs[i] = Some(ggml_tensor {
                    buffer: std::ptr::null_mut(),
                    view_src: std::ptr::null_mut(),
                    extra: std::ptr::null_mut(),
                    ..*t
                });
            }
        }
        let mut proxy = ggml_tensor {
            buffer: std::ptr::null_mut(),
            view_src: std::ptr::null_mut(),
            extra: std::ptr::null_mut(),
            ..*node
        };
        for (i, s) in srcs.iter_mut().enumerate() {
            proxy.src[i] = s.as_mut().map_or(std::ptr::null_mut(), std::ptr::from_mut);
        }
        // SAFETY: the proxies are valid tensor structs (sources without buffers) alive for the
        // call; the CPU device reads their metadata.
        unsafe { (f.dev_supports_op)(dev, &proxy) }
    }

    /// Computes a copy of `node` (its op and parameters) whose sources are `srcs` (in order,
    /// `None` where the node has none) and whose output is `dst`, on the CPU backend.
    pub fn compute_node(
        &self,
        node: &ggml_tensor,
        srcs: &[Option<Operand>; crate::ffi::GGML_MAX_SRC],
        dst: &Operand,
    ) -> Result<(), NotRun> {
        let f = fns().ok_or(NotRun::NoGgml)?;
        let shaped = |o: &Operand, t: *mut ggml_tensor| {
            // SAFETY: a node's non-null sources are valid tensors.
            o.covers_desc() && unsafe { t.as_ref() }.is_some_and(|t| o.desc.ne == t.ne)
        };
        let same_sources = srcs.iter().zip(node.src.iter()).all(|(o, &t)| match o {
            Some(o) => shaped(o, t),
            None => t.is_null(),
        });
        if !same_sources
            || !dst.covers_desc()
            || dst.desc.ne != node.ne
            || dst.desc.ty != node.type_
        {
            return Err(NotRun::Declined);
        }
        self.with_cpu(f, |cpu| {
            // SAFETY: the operands are views covering their descriptions (checked), the output
            // apart from the sources (the caller's views' invariant).
            unsafe { run_node(f, cpu, node, srcs, dst) }
        })
    }

    /// Runs `body` with this instance's CPU backend, made on first use, set to the host's threads.
    fn with_cpu<R>(
        &self,
        f: &Fns,
        body: impl FnOnce(&Cpu) -> Result<R, NotRun>,
    ) -> Result<R, NotRun> {
        let mut slot = self.cpu.lock().unwrap_or_else(|e| e.into_inner());
        let cpu = slot
            .get_or_insert_with(|| {
                // SAFETY: registry calls without preconditions; init with default params.
                unsafe {
                    let dev = (f.dev_by_type)(DEVICE_TYPE_CPU);
                    if dev.is_null() {
                        return None;
                    }
                    let backend = (f.dev_init)(dev, std::ptr::null());
                    if backend.is_null() {
                        return None;
                    }
                    let reg = (f.dev_backend_reg)(dev);
                    let p = if reg.is_null() {
                        std::ptr::null_mut()
                    } else {
                        (f.reg_get_proc_address)(reg, c"ggml_backend_set_n_threads".as_ptr())
                    };
                    let set_threads =
                        (!p.is_null()).then(|| std::mem::transmute::<*mut c_void, SetThreads>(p));
                    Some(Cpu {
                        dev,
                        backend,
                        set_threads,
                        threads: 0,
                    })
                }
            })
            .as_mut()
            .ok_or(NotRun::NoCpuBackend)?;
        let want = self.n_threads.load(Relaxed);
        if want > 0 && want != cpu.threads {
            if let Some(set) = cpu.set_threads {
                // SAFETY: the CPU backend's own set_n_threads on its backend.
                unsafe { set(cpu.backend, want) };
            }
            cpu.threads = want;
        }
        body(cpu)
    }
}

/// A tensor of `ctx` describing `o` and pointing at its memory.
///
/// # Safety
/// `ctx` is a live metadata-only context with room for one more tensor.
unsafe fn view_of(f: &Fns, ctx: *mut GgmlContext, o: &Operand) -> Result<*mut ggml_tensor, NotRun> {
    // SAFETY: ctx has room; ne is a valid 4-element array.
    let t = unsafe { (f.new_tensor)(ctx, o.desc.ty, 4, o.desc.ne.as_ptr()) };
    // SAFETY: a tensor just made in ctx; we point it at the operand's memory.
    let t_ref = unsafe { t.as_mut() }.ok_or(NotRun::NoCpuBackend)?;
    t_ref.nb = o.desc.nb;
    t_ref.data = o.as_ptr().cast_mut().cast();
    Ok(t)
}

/// Computes a copy of `node` over `srcs` into `dst` in a one-node graph.
///
/// # Safety
/// As for [`HostCpu::compute_node`], whose checks held.
unsafe fn run_node(
    f: &Fns,
    cpu: &Cpu,
    node: &ggml_tensor,
    srcs: &[Option<Operand>; crate::ffi::GGML_MAX_SRC],
    dst: &Operand,
) -> Result<(), NotRun> {
    let result = f.with_context(srcs.len() + 1, 1, |ctx| {
        // SAFETY: ctx has room for one node (sized above).
        let graph = unsafe { (f.new_graph_custom)(ctx, 1, false) };
        if graph.is_null() {
            return Err(NotRun::NoCpuBackend);
        }
        // SAFETY: ctx has room for every source and the output.
        let d = unsafe { view_of(f, ctx, dst)? };
        // SAFETY: the tensor just made.
        let d_ref = unsafe { &mut *d };
        d_ref.op = node.op;
        d_ref.op_params = node.op_params;
        d_ref.flags = crate::ffi::GGML_TENSOR_FLAG_COMPUTE;
        for (i, s) in srcs.iter().enumerate() {
            if let Some(o) = s {
                // SAFETY: as above.
                d_ref.src[i] = unsafe { view_of(f, ctx, o)? };
            }
        }
        // SAFETY: a node over host memory, made like the original.
        if !unsafe { (f.dev_supports_op)(cpu.dev, d) } {
            return Err(NotRun::Declined);
        }
        // SAFETY: the graph was made for one node.
        unsafe { (f.graph_add_node)(graph, d) };
        // SAFETY: the node's operands are valid host memory (caller's contract).
        match unsafe { (f.graph_compute)(cpu.backend, graph) } {
            0 => Ok(()),
            s => Err(NotRun::Failed(s)),
        }
    });
    result.unwrap_or(Err(NotRun::NoCpuBackend))
}

/// Builds the graph in a metadata-only ggml context and computes it.
///
/// # Safety
/// As for [`HostCpu::compute`]; `ops` are valid ([`MatMul::is_valid`]).
unsafe fn run_graph(f: &Fns, cpu: &Cpu, ops: &[MatMul]) -> Result<(), NotRun> {
    let n = ops.len();
    let result = f.with_context(3 * n, n, |ctx| {
        // SAFETY: ctx has room for n nodes (sized above).
        let graph = unsafe { (f.new_graph_custom)(ctx, n, false) };
        if graph.is_null() {
            return Err(NotRun::NoCpuBackend);
        }
        // SAFETY: ctx has room for three tensors per op (sized above).
        let view = |o: &Operand| unsafe { view_of(f, ctx, o) };
        let mut nodes = Vec::with_capacity(n);
        for op in ops {
            let (a, b) = (view(&op.src0)?, view(&op.src1)?);
            // SAFETY: shapes checked by is_valid, so ggml_mul_mat's asserts hold.
            let d = unsafe { (f.mul_mat)(ctx, a, b) };
            // SAFETY: the node just made.
            let d_ref = unsafe { d.as_mut() }.ok_or(NotRun::NoCpuBackend)?;
            if d_ref.ne != op.dst.desc.ne {
                return Err(NotRun::Declined);
            }
            d_ref.nb = op.dst.desc.nb;
            d_ref.data = op.dst.as_ptr().cast_mut().cast();
            // ggml_graph_compute skips nodes without it (ggml_build_forward_expand sets it).
            d_ref.flags |= crate::ffi::GGML_TENSOR_FLAG_COMPUTE;
            // SAFETY: a valid MUL_MAT node over host memory.
            if !unsafe { (f.dev_supports_op)(cpu.dev, d) } {
                return Err(NotRun::Declined);
            }
            nodes.push(d);
        }
        for d in nodes {
            // SAFETY: the graph was made for n nodes.
            unsafe { (f.graph_add_node)(graph, d) };
        }
        // SAFETY: every node's operands are valid host memory (caller's contract).
        match unsafe { (f.graph_compute)(cpu.backend, graph) } {
            0 => Ok(()),
            s => Err(NotRun::Failed(s)),
        }
    });
    result.unwrap_or(Err(NotRun::NoCpuBackend))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::support::TensorDesc;

    fn op(ty: i32, elem: usize, ne: [i64; 4]) -> Operand {
        Operand::detached(TensorDesc::contiguous(ty, elem, ne))
    }

    #[test]
    fn shapes_ggml_would_assert_on_are_refused() {
        let good = MatMul {
            src0: op(1, 2, [64, 32, 2, 1]),
            src1: op(0, 4, [64, 8, 4, 1]),
            dst: op(0, 4, [32, 8, 4, 1]),
        };
        assert!(good.is_valid());
        let mut k = good;
        k.src1.desc.ne[0] = 63;
        assert!(!k.is_valid(), "different K");
        let mut bc = good;
        bc.src1.desc.ne[2] = 3;
        bc.dst.desc.ne[2] = 3;
        assert!(!bc.is_valid(), "batch not a multiple");
        let mut d = good;
        d.dst.desc.ne[1] = 9;
        assert!(!d.is_valid(), "dst shape");
        let mut t = good;
        t.src0.desc.nb.swap(0, 1);
        assert!(!t.is_valid(), "transposed src0");
        let mut f16dst = good;
        f16dst.dst.desc.ty = 1;
        assert!(!f16dst.is_valid(), "dst not f32");
    }

    #[test]
    fn without_ggml_nothing_runs() {
        // cargo test links no ggml: the fallback must say so, not crash.
        let h = HostCpu::default();
        let m = MatMul {
            src0: op(0, 4, [4, 4, 1, 1]),
            src1: op(0, 4, [4, 4, 1, 1]),
            dst: op(0, 4, [4, 4, 1, 1]),
        };
        assert_eq!(h.compute(&[m]), Err(NotRun::NoGgml));
        assert!(!HostCpu::available());
    }
}
