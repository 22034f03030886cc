//! Computing one claimed MUL_MAT: host-side layout conversion, the kernel cache, the engine
//! dispatch, and the CPU fallback that guarantees the output is always written.
//!
//! ggml's MUL_MAT is `dst[i3][i2][n][m] = sum_k src0[i3/r3][i2/r2][m][k] * src1[i3][i2][n][k]`.
//! The program form is a 1x1 conv (`ane_mil::build::conv_matmul`): weights `[M, K, 1, 1]` (exactly
//! ggml's src0 row layout), activations channel-first `[1, K, 1, N]`. The host writes src1
//! transposed into that layout while converting to fp16, so the ANE runs no transposes. All src1
//! columns that share one src0 matrix (broadcast over heads and batches) go in one dispatch.
//!
//! Programs are cached per (weight content, M, K, N bucket). Keying on the content hash, not on the
//! data pointer, means a buffer reused for different weights can never hit a stale program.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Instant;

use ane_engine::surface::{request_alloc_size, spatial_bucket, SPATIAL_MULTIPLE};
use ane_engine::{Engine, EngineError, ProgramId, Surface, WeightFile};
use half::{bf16, f16};
use xxhash_rust::xxh3::Xxh3;

use crate::ffi::{GGML_TYPE_BF16, GGML_TYPE_F16, GGML_TYPE_F32};
use crate::ggml::TypeInfo;
use crate::stats::{add_time, Stats};
use crate::support::{is_plain, TensorDesc};

/// A tensor operand: its description and the address of its first element.
#[derive(Clone, Copy, Debug)]
pub struct Operand {
    /// Types, shape, strides.
    pub desc: TensorDesc,
    /// `tensor->data`.
    pub data: *const u8,
}

/// Key of one compiled program.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Key {
    weights: u128,
    m: usize,
    k: usize,
    n: usize,
}

/// Loaded programs, bounded, least recently used evicted first.
#[derive(Debug)]
pub struct KernelCache {
    entries: HashMap<Key, (ProgramId, u64)>,
    failed: HashSet<Key>,
    tick: u64,
    max: usize,
}

impl KernelCache {
    /// A cache that keeps at most `max` programs loaded.
    pub fn new(max: usize) -> Self {
        KernelCache {
            entries: HashMap::new(),
            failed: HashSet::new(),
            tick: 0,
            max: max.max(1),
        }
    }

    /// Number of programs loaded through this cache.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when nothing is loaded.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn get_or_compile(
        &mut self,
        engine: &dyn Engine,
        key: Key,
        stats: &Stats,
        build: impl FnOnce() -> (String, Vec<WeightFile>),
    ) -> Result<ProgramId, EngineError> {
        self.tick += 1;
        if let Some(e) = self.entries.get_mut(&key) {
            e.1 = self.tick;
            stats
                .cache_hits
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Ok(e.0);
        }
        if self.failed.contains(&key) {
            // A program that failed once fails again; don't pay for the compile on every call.
            return Err(EngineError::Compile(
                "this program failed to compile earlier".into(),
            ));
        }
        stats
            .cache_misses
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        while self.entries.len() >= self.max {
            let (&old, &(id, _)) = self
                .entries
                .iter()
                .min_by_key(|(_, (_, t))| *t)
                .expect("non-empty");
            self.entries.remove(&old);
            engine.unload(id);
        }
        let (mil, weights) = build();
        match engine.compile(&mil, &weights) {
            Ok(id) => {
                self.entries.insert(key, (id, self.tick));
                Ok(id)
            }
            Err(e) => {
                if !matches!(e, EngineError::Budget { .. }) {
                    self.failed.insert(key);
                }
                Err(e)
            }
        }
    }

    /// Unloads everything.
    pub fn clear(&mut self, engine: &dyn Engine) {
        for (_, (id, _)) in self.entries.drain() {
            engine.unload(id);
        }
    }
}

/// Reads element `off` bytes into a plain-typed buffer.
///
/// # Safety
/// `base + off` must point at a readable element of type `ty`.
unsafe fn read_plain(ty: i32, base: *const u8, off: usize) -> f32 {
    // SAFETY: the caller guarantees the element is in bounds; reads are unaligned-safe.
    unsafe {
        let p = base.add(off);
        match ty {
            GGML_TYPE_F32 => p.cast::<f32>().read_unaligned(),
            GGML_TYPE_F16 => f16::from_bits(p.cast::<u16>().read_unaligned()).to_f32(),
            GGML_TYPE_BF16 => bf16::from_bits(p.cast::<u16>().read_unaligned()).to_f32(),
            _ => unreachable!("read_plain on a non-plain type"),
        }
    }
}

/// Row `i1` of matrix (`i2`, `i3`) of a tensor, widened to f32 into `out` (length ne0).
///
/// # Safety
/// The operand must describe readable memory; for non-plain types, rows must be contiguous blocks
/// (checked by `supports_op`) and `info.to_float` must be set.
unsafe fn read_row(
    op: &Operand,
    info: &TypeInfo,
    i1: usize,
    i2: usize,
    i3: usize,
    out: &mut [f32],
) {
    let d = &op.desc;
    let base = i1 * d.nb[1] + i2 * d.nb[2] + i3 * d.nb[3];
    if is_plain(d.ty) {
        for (i0, o) in out.iter_mut().enumerate() {
            // SAFETY: in bounds by the tensor's shape and strides.
            *o = unsafe { read_plain(d.ty, op.data, base + i0 * d.nb[0]) };
        }
    } else {
        let f = info.to_float.expect("supports_op checked to_float");
        // SAFETY: a row of ne0 elements is ne0/blck contiguous blocks starting at `base`.
        unsafe { f(op.data.add(base).cast(), out.as_mut_ptr(), out.len() as i64) };
    }
}

/// Hash of the src0 matrix (`i2`, `i3`): its raw bytes when rows are contiguous (no conversion
/// needed to find a cached program), else its widened values.
///
/// # Safety
/// As for [`read_row`].
unsafe fn weight_hash(
    op: &Operand,
    info: &TypeInfo,
    i2: usize,
    i3: usize,
    widened: &mut Option<Vec<f32>>,
) -> u128 {
    let d = &op.desc;
    let (k, m) = (d.ne[0] as usize, d.ne[1] as usize);
    let mut h = Xxh3::new();
    h.update(&d.ty.to_le_bytes());
    let elem_contig = d.nb[0] == info.type_size;
    if elem_contig {
        let row_bytes = k / info.blck_size * info.type_size;
        for i1 in 0..m {
            // SAFETY: the row is `row_bytes` contiguous readable bytes.
            let row = unsafe {
                std::slice::from_raw_parts(
                    op.data.add(i1 * d.nb[1] + i2 * d.nb[2] + i3 * d.nb[3]),
                    row_bytes,
                )
            };
            h.update(row);
        }
    } else {
        // SAFETY: forwarded contract.
        let w = widened.get_or_insert_with(|| unsafe { widen_matrix(op, info, i2, i3) });
        for v in w.iter() {
            h.update(&v.to_le_bytes());
        }
    }
    h.digest128()
}

/// The src0 matrix (`i2`, `i3`) as f32, row-major `[M][K]`.
///
/// # Safety
/// As for [`read_row`].
unsafe fn widen_matrix(op: &Operand, info: &TypeInfo, i2: usize, i3: usize) -> Vec<f32> {
    let (k, m) = (op.desc.ne[0] as usize, op.desc.ne[1] as usize);
    let mut w = vec![0f32; m * k];
    for (i1, row) in w.chunks_exact_mut(k).enumerate() {
        // SAFETY: forwarded contract.
        unsafe { read_row(op, info, i1, i2, i3, row) };
    }
    w
}

/// Computes a claimed MUL_MAT. Never leaves `dst` unwritten: any engine failure computes the
/// affected columns on the CPU with f32 accumulation.
///
/// # Safety
/// `src0`, `src1` and `dst` must describe valid tensors of a MUL_MAT that [`crate::support::mul_mat`]
/// accepted; `dst` memory must be writable and not overlap the sources.
#[allow(clippy::too_many_arguments)]
pub unsafe fn compute(
    engine: &dyn Engine,
    cache: &Mutex<KernelCache>,
    stats: &Stats,
    src0: Operand,
    src0_info: TypeInfo,
    src1: Operand,
    src1_info: TypeInfo,
    dst: Operand,
) {
    use std::sync::atomic::Ordering::Relaxed;
    let [k, m, ne02, ne03] = src0.desc.ne.map(|v| v as usize);
    let [_, n, ne12, ne13] = src1.desc.ne.map(|v| v as usize);
    let (r2, r3) = (ne12 / ne02, ne13 / ne03);
    let max_axis = engine.limits().max_axis;
    // Columns per dispatch: a multiple of the spatial multiple that stays under the axis limit.
    let max_cols = (max_axis / SPATIAL_MULTIPLE * SPATIAL_MULTIPLE).max(SPATIAL_MULTIPLE);
    let mut any_fallback = false;
    let mut xrow = vec![0f32; k];
    for i03 in 0..ne03 {
        for i02 in 0..ne02 {
            // Every src1 column (n, i12, i13) that multiplies this src0 matrix.
            let cols: Vec<(usize, usize, usize)> = (i03 * r3..(i03 + 1) * r3)
                .flat_map(|i13| {
                    (i02 * r2..(i02 + 1) * r2)
                        .flat_map(move |i12| (0..n).map(move |i1| (i1, i12, i13)))
                })
                .collect();
            let t = Instant::now();
            let mut widened: Option<Vec<f32>> = None;
            // SAFETY: forwarded contract.
            let wkey = unsafe { weight_hash(&src0, &src0_info, i02, i03, &mut widened) };
            add_time(&stats.ns_convert, t.elapsed());
            for chunk in cols.chunks(max_cols) {
                let np = spatial_bucket(chunk.len());
                let key = Key {
                    weights: wkey,
                    m,
                    k,
                    n: np,
                };
                let result = {
                    let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
                    // SAFETY: forwarded contract.
                    unsafe {
                        dispatch(
                            engine,
                            &mut cache,
                            stats,
                            key,
                            &src0,
                            &src0_info,
                            i02,
                            i03,
                            &mut widened,
                            &src1,
                            &src1_info,
                            chunk,
                            &dst,
                        )
                    }
                };
                if let Err(_e) = result {
                    any_fallback = true;
                    let t = Instant::now();
                    // SAFETY: forwarded contract.
                    let w = widened.get_or_insert_with(|| unsafe {
                        widen_matrix(&src0, &src0_info, i02, i03)
                    });
                    for &(i1, i12, i13) in chunk {
                        // SAFETY: forwarded contract.
                        unsafe { read_row(&src1, &src1_info, i1, i12, i13, &mut xrow) };
                        for (mi, wrow) in w.chunks_exact(k).enumerate() {
                            let acc: f32 = wrow.iter().zip(&xrow).map(|(a, b)| a * b).sum();
                            let off = mi * dst.desc.nb[0]
                                + i1 * dst.desc.nb[1]
                                + i12 * dst.desc.nb[2]
                                + i13 * dst.desc.nb[3];
                            // SAFETY: dst is writable f32 at every in-bounds index.
                            unsafe {
                                dst.data
                                    .cast_mut()
                                    .add(off)
                                    .cast::<f32>()
                                    .write_unaligned(acc)
                            };
                        }
                    }
                    add_time(&stats.ns_fallback, t.elapsed());
                }
            }
        }
    }
    if any_fallback {
        stats.ops_fallback.fetch_add(1, Relaxed);
    } else {
        stats.ops_offloaded.fetch_add(1, Relaxed);
    }
}

/// One engine dispatch for `chunk` columns against src0 matrix (`i02`, `i03`).
///
/// # Safety
/// As for [`compute`].
#[allow(clippy::too_many_arguments)]
unsafe fn dispatch(
    engine: &dyn Engine,
    cache: &mut KernelCache,
    stats: &Stats,
    key: Key,
    src0: &Operand,
    src0_info: &TypeInfo,
    i02: usize,
    i03: usize,
    widened: &mut Option<Vec<f32>>,
    src1: &Operand,
    src1_info: &TypeInfo,
    chunk: &[(usize, usize, usize)],
    dst: &Operand,
) -> Result<(), EngineError> {
    use std::sync::atomic::Ordering::Relaxed;
    let Key { m, k, n: np, .. } = key;
    let t = Instant::now();
    let mut build_time = std::time::Duration::ZERO;
    let id = cache.get_or_compile(engine, key, stats, || {
        let tb = Instant::now();
        // SAFETY: forwarded contract.
        let w = widened.get_or_insert_with(|| unsafe { widen_matrix(src0, src0_info, i02, i03) });
        let w16: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
        let mil = ane_mil::text::emit(&ane_mil::build::conv_matmul(k, m, np));
        let blob = ane_mil::build::weights_blob_fp16(&w16);
        build_time = tb.elapsed();
        (
            mil,
            vec![WeightFile {
                path: ane_mil::build::WEIGHT_PATH.to_string(),
                bytes: blob,
            }],
        )
    });
    add_time(&stats.ns_convert, build_time);
    add_time(&stats.ns_engine, t.elapsed().saturating_sub(build_time));
    let id = id?;

    let t = Instant::now();
    let size = request_alloc_size(&[k * np * 2, m * np * 2]);
    let mut x = Surface::new(size);
    {
        let xs = x.fp16_mut(k * np);
        let mut row = vec![0f32; k];
        for (c, &(i1, i12, i13)) in chunk.iter().enumerate() {
            // SAFETY: forwarded contract.
            unsafe { read_row(src1, src1_info, i1, i12, i13, &mut row) };
            for (ki, &v) in row.iter().enumerate() {
                xs[ki * np + c] = f16::from_f32(v);
            }
        }
    }
    let mut y = Surface::new(size);
    add_time(&stats.ns_convert, t.elapsed());

    let t = Instant::now();
    let r = engine.evaluate(id, &[&x], &mut [&mut y]);
    add_time(&stats.ns_engine, t.elapsed());
    r?;
    stats.dispatches.fetch_add(1, Relaxed);

    let t = Instant::now();
    let ys = y.fp16(m * np);
    for (c, &(i1, i12, i13)) in chunk.iter().enumerate() {
        let base = i1 * dst.desc.nb[1] + i12 * dst.desc.nb[2] + i13 * dst.desc.nb[3];
        for mi in 0..m {
            // SAFETY: dst is writable f32 at every in-bounds index.
            unsafe {
                dst.data
                    .cast_mut()
                    .add(base + mi * dst.desc.nb[0])
                    .cast::<f32>()
                    .write_unaligned(ys[mi * np + c].to_f32())
            };
        }
    }
    add_time(&stats.ns_convert, t.elapsed());
    Ok(())
}

#[cfg(test)]
mod tests;
