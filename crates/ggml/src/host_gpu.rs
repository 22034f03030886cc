//! The GPU's own backend, for the rows of a prefill matmul the plugin gives the GPU while the
//! device computes the others (`crate::split`).
//!
//! Beside a GPU, the weights the device reads sit in the GPU's weights buffer (Metal's
//! `MTL<n>_Mapped`, llama.cpp's RPC buffers), so the GPU can multiply any of their rows where they
//! are. The plugin makes its own instance of that GPU's backend through the host's registry (as
//! [`crate::host_cpu`] does for the CPU), and for one group builds a graph of MUL_MATs over views
//! of the weights' last rows (no copy: the view points into the weight's buffer) and of the
//! activations, which it uploads into a buffer of the GPU's own type; the results come back with
//! `ggml_backend_tensor_get`. llama.cpp's own instance of the GPU is idle meanwhile: the scheduler
//! runs one split at a time.

use std::ffi::c_int;
use std::sync::Mutex;

use crate::ffi::{ggml_backend_dev_t, ggml_backend_t, ggml_tensor, GGML_TYPE_F32};
use crate::ggml::{buffer_of, Ggml};
use crate::host_cpu::{fns, Fns};
use crate::view::Operand;

/// Rows `[r0, ne[1])` of one weight, multiplied by the group's activations into `dst`.
#[derive(Clone, Copy)]
pub struct GpuRows {
    /// The weight as ggml knows it (its buffer is the GPU's).
    pub weight: *const ggml_tensor,
    /// First row the GPU computes.
    pub r0: usize,
    /// The output rows `[r0, M)`: a view `[M - r0, N]` of the member's output.
    pub dst: Operand,
}

// SAFETY: a weight tensor of a live model (read-only metadata) and a view; used by one thread at a
// time (the GPU part of a group runs on its own thread while the device computes the rest).
unsafe impl Send for GpuRows {}

/// A created GPU backend.
struct Gpu {
    dev: ggml_backend_dev_t,
    backend: ggml_backend_t,
}

// SAFETY: only used under the slot's mutex, one thread at a time.
unsafe impl Send for Gpu {}

impl Drop for Gpu {
    fn drop(&mut self) {
        if let Some(f) = fns() {
            // SAFETY: made by ggml_backend_dev_init, freed once here.
            unsafe { (f.backend_free)(self.backend) };
        }
    }
}

/// The GPU backend of one plugin backend instance, made on first use for the device holding the
/// weights.
#[derive(Default)]
pub struct HostGpu {
    gpu: Mutex<Option<Gpu>>,
}

impl HostGpu {
    /// Computes every part (rows of one weight each) on the GPU backend of the device whose buffer
    /// holds the weights: one graph, activations `src1` (F32 `[K, N]`) uploaded once. All parts'
    /// weights must live on the same device. Nothing is written on error.
    pub fn compute_rows(&self, g: &Ggml, parts: &[GpuRows], src1: &Operand) -> Result<(), String> {
        let f = fns().ok_or("ggml's graph functions not found")?;
        let p = &g.placement;
        let (Some(get_type), Some(get_dev), Some(get), Some(set)) = (
            p.buffer_get_type,
            p.buft_get_device,
            p.tensor_get,
            p.tensor_set,
        ) else {
            return Err("ggml's buffer functions not found".into());
        };
        if parts.is_empty() {
            return Ok(());
        }
        let s1 = &src1.desc;
        if s1.ty != GGML_TYPE_F32 || s1.ne[2] != 1 || s1.ne[3] != 1 || !src1.covers_desc() {
            return Err("GPU rows: activations must be a 2-D F32 view".into());
        }
        let (k, n) = (s1.ne[0] as usize, s1.ne[1] as usize);
        // The device of every part's weight.
        let mut dev: ggml_backend_dev_t = std::ptr::null_mut();
        for part in parts {
            // SAFETY: a weight of a live model.
            let w = unsafe { &*part.weight };
            let buf = buffer_of(w);
            if buf.is_null() || w.data.is_null() {
                return Err("GPU rows: a weight without buffer".into());
            }
            // SAFETY: a live tensor's buffer, its type and device.
            let d = unsafe { get_dev(get_type(buf)) };
            if d.is_null() || (!dev.is_null() && d != dev) {
                return Err("GPU rows: weights on no device, or on several".into());
            }
            dev = d;
            let rows = w.ne[1] as usize;
            let ok = w.ne[0] as usize == k
                && w.ne[2] == 1
                && w.ne[3] == 1
                && part.r0 < rows
                && part.dst.desc.ne == [(rows - part.r0) as i64, n as i64, 1, 1]
                && part.dst.covers_desc();
            if !ok {
                return Err("GPU rows: shapes do not match".into());
            }
        }
        // Contiguous activations, as the uploaded tensor is laid out.
        let mut x = vec![0f32; k * n];
        let info = crate::ggml::TypeInfo {
            blck_size: 1,
            type_size: 4,
            to_float: None,
        };
        for (j, col) in x.chunks_mut(k).enumerate() {
            src1.read_row(&info, j, 0, 0, col);
        }
        let mut slot = self.gpu.lock().unwrap_or_else(|e| e.into_inner());
        if slot.as_ref().is_some_and(|gpu| gpu.dev != dev) {
            *slot = None;
        }
        if slot.is_none() {
            // SAFETY: a registered device; default parameters.
            let backend = unsafe { (f.dev_init)(dev, std::ptr::null()) };
            if backend.is_null() {
                return Err("GPU rows: the GPU backend would not start".into());
            }
            *slot = Some(Gpu { dev, backend });
        }
        let gpu = slot.as_ref().expect("made above");
        // SAFETY: the parts were checked above (shapes, buffers, one device); `x` outlives the
        // call; every tensor and buffer made is freed inside.
        let outs = unsafe { run(f, gpu, parts, &x, k, n, get, set)? };
        for (part, out) in parts.iter().zip(outs) {
            let rows = part.dst.desc.ne[0] as usize;
            for (j, col) in out.chunks(rows).enumerate() {
                if part
                    .dst
                    .with_f32s_mut(j, 0, 0, rows, |d| d.copy_from_slice(col))
                    .is_none()
                {
                    for (i, v) in col.iter().enumerate() {
                        part.dst.put(i, j, 0, 0, *v);
                    }
                }
            }
        }
        Ok(())
    }
}

type TensorGet = unsafe extern "C" fn(*const ggml_tensor, *mut std::ffi::c_void, usize, usize);
type TensorSet = unsafe extern "C" fn(*mut ggml_tensor, *const std::ffi::c_void, usize, usize);

/// Builds and computes the graph; returns each part's output, `[M - r0, N]` contiguous.
///
/// # Safety
/// As checked by [`HostGpu::compute_rows`].
#[allow(clippy::too_many_arguments)]
unsafe fn run(
    f: &Fns,
    gpu: &Gpu,
    parts: &[GpuRows],
    x: &[f32],
    k: usize,
    n: usize,
    get: TensorGet,
    set: TensorSet,
) -> Result<Vec<Vec<f32>>, String> {
    let nodes = parts.len();
    let result = f.with_context(2 * nodes + 2, nodes, |ctx| {
        let mut buffer = std::ptr::null_mut();
        let result = (|| {
            let ne_x = [k as i64, n as i64, 1, 1];
            // SAFETY: ctx has room (sized above).
            let xt = unsafe { (f.new_tensor)(ctx, GGML_TYPE_F32, 4 as c_int, ne_x.as_ptr()) };
            if xt.is_null() {
                return Err("GPU rows: no tensor".to_string());
            }
            let mut ys = Vec::with_capacity(nodes);
            for part in parts {
                // SAFETY: checked by the caller: a live weight with a buffer.
                let w = unsafe { &*part.weight };
                let rows = w.ne[1] - part.r0 as i64;
                let ne_w = [w.ne[0], rows, 1, 1];
                // SAFETY: ctx has room.
                let wt = unsafe { (f.new_tensor)(ctx, w.type_, 4, ne_w.as_ptr()) };
                // SAFETY: the tensor just made: a view of the weight's last rows, in its buffer.
                let wr = unsafe { wt.as_mut() }.ok_or("GPU rows: no tensor")?;
                wr.nb = w.nb;
                wr.buffer = buffer_of(w);
                wr.data = w.data.cast::<u8>().wrapping_add(part.r0 * w.nb[1]).cast();
                // SAFETY: shapes checked (same K), so ggml_mul_mat's asserts hold.
                let y = unsafe { (f.mul_mat)(ctx, wt, xt) };
                // SAFETY: the node just made.
                let yr = unsafe { y.as_mut() }.ok_or("GPU rows: no node")?;
                yr.flags |= crate::ffi::GGML_TENSOR_FLAG_COMPUTE;
                ys.push(y);
            }
            // SAFETY: allocates the tensors of ctx without data (x and the outputs) in one buffer of
            // the GPU's default type.
            buffer = unsafe { (f.alloc_ctx_tensors_from_buft)(ctx, (f.dev_buffer_type)(gpu.dev)) };
            if buffer.is_null() {
                return Err("GPU rows: no GPU buffer".to_string());
            }
            // SAFETY: xt is allocated, k*n f32 = its ggml_nbytes.
            unsafe { set(xt, x.as_ptr().cast(), 0, std::mem::size_of_val(x)) };
            // SAFETY: ctx has room for the graph.
            let graph = unsafe { (f.new_graph_custom)(ctx, nodes, false) };
            if graph.is_null() {
                return Err("GPU rows: no graph".to_string());
            }
            for &y in &ys {
                // SAFETY: the graph was made for `nodes` nodes.
                unsafe { (f.graph_add_node)(graph, y) };
            }
            // SAFETY: a graph over allocated tensors of the GPU's buffers.
            let status = unsafe { (f.graph_compute)(gpu.backend, graph) };
            if status != 0 {
                return Err(format!("GPU rows: graph compute returned {status}"));
            }
            // A GPU backend may return before its queue ran (Metal commits command buffers); its
            // get_tensor of a shared buffer does not wait.
            // SAFETY: the backend made above.
            unsafe { (f.synchronize)(gpu.backend) };
            let mut outs = Vec::with_capacity(nodes);
            for (part, &y) in parts.iter().zip(&ys) {
                let rows = part.dst.desc.ne[0] as usize;
                let mut out = vec![0f32; rows * n];
                // SAFETY: y is allocated, [rows, n] F32 contiguous = the bytes read.
                unsafe { get(y, out.as_mut_ptr().cast(), 0, 4 * rows * n) };
                outs.push(out);
            }
            Ok(outs)
        })();
        if !buffer.is_null() {
            // SAFETY: allocated above, freed once.
            unsafe { (f.buffer_free)(buffer) };
        }
        result
    });
    result.unwrap_or_else(|| Err("GPU rows: no ggml context".into()))
}
