//! Computing claimed MUL_MATs: grouping, weight staging, the shape-shared programs, the engine
//! dispatch, and the CPU fallback that guarantees every output is written.
//!
//! ggml's MUL_MAT is `dst[i3][i2][n][m] = sum_k src0[i3/r3][i2/r2][m][k] * src1[i3][i2][n][k]`.
//! Every dispatch runs [`ane_mil::build::tiled_matmul`] with the weights as a runtime input, so the
//! compiled program depends only on the shape the planner ([`ane_plan::Planner`]) picks:
//! - a **group** is one MUL_MAT, or several that share src1 (Q/K/V, gate/up): their src0 rows are
//!   stacked, so one dispatch computes all of them and the host scatters rows to each dst;
//! - rows and contraction beyond the chip's axis limit become tiles and slices of the same
//!   dispatch; slices are summed on the host in f32;
//! - activation columns are padded to a bucket and cut into bucket-sized chunks;
//! - src0 in a llama.cpp *weights* buffer is converted to fp16 once and kept (staged); other src0
//!   (attention's KV cache, test tensors) is converted per call, with its dimensions bucketed so
//!   that it too reuses a few programs.
//!
//! The activations are written transposed (channel-first `[K][N]`) while converting to fp16, so the
//! ANE runs no transposes.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ane_convert::act_round::ActRound;
use ane_engine::surface::request_alloc_size;
use ane_engine::{Engine, EngineError, ProgramId, Surface};
use ane_plan::{Layout, Planner, TiledShape};
use half::{bf16, f16};
use xxhash_rust::xxh3::Xxh3;

use crate::ffi::{GGML_TYPE_BF16, GGML_TYPE_F16, GGML_TYPE_F32};
use crate::ggml::TypeInfo;
use crate::guard;
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

/// One MUL_MAT of a group.
#[derive(Clone, Copy, Debug)]
pub struct Member {
    /// The weights (or other left operand).
    pub src0: Operand,
    /// ggml traits of src0's type.
    pub src0_info: TypeInfo,
    /// Output (F32).
    pub dst: Operand,
}

impl Member {
    /// A weight without an output, for staging ([`stage_at_load`]): dst is null and never used.
    pub fn weight_only(desc: TensorDesc, data: usize, info: TypeInfo) -> Member {
        Member {
            src0: Operand {
                desc,
                data: data as *const u8,
            },
            src0_info: info,
            dst: Operand {
                desc,
                data: std::ptr::null(),
            },
        }
    }
}

/// MUL_MATs sharing one src1, computed together.
#[derive(Clone, Debug)]
pub struct Group {
    /// Shared activations.
    pub src1: Operand,
    /// ggml traits of src1's type.
    pub src1_info: TypeInfo,
    /// Members; with more than one, every src0 is 2-D and has the same K.
    pub members: Vec<Member>,
    /// src0 lives in a weights buffer: immutable, staged once.
    pub weights: bool,
    /// The last `speculative` members are not nodes of this split: their outputs go to the
    /// lookahead stash (see `crate::lookahead`) and they are counted when taken.
    pub speculative: usize,
}

/// Loaded programs keyed by shape, bounded, least recently used evicted first. Baked programs
/// (compressed weights, [`crate::baked`]) share the bound: they are keyed by weight identity and
/// column bucket, and evicting one frees its compressed weight bytes.
#[derive(Debug)]
pub struct KernelCache {
    entries: HashMap<TiledShape, (ProgramId, u64)>,
    failed: HashMap<TiledShape, EngineError>,
    pub(crate) baked: HashMap<(u128, usize), (ProgramId, u64, usize)>,
    pub(crate) baked_failed: HashMap<(u128, usize), EngineError>,
    /// Compressed weight bytes held by the loaded baked programs.
    pub(crate) baked_bytes: usize,
    /// `GGML_ANE_WEIGHTS=compressed`: single Q8_0/Q4_0 weights run as baked programs.
    pub(crate) compressed: bool,
    tick: u64,
    max: usize,
}

impl KernelCache {
    /// A cache that keeps at most `max` programs loaded.
    pub fn new(max: usize) -> Self {
        KernelCache {
            entries: HashMap::new(),
            failed: HashMap::new(),
            baked: HashMap::new(),
            baked_failed: HashMap::new(),
            baked_bytes: 0,
            compressed: false,
            tick: 0,
            max: max.max(1),
        }
    }

    /// The same cache, running lone Q8_0/Q4_0 weights as baked programs when `on`
    /// (`GGML_ANE_WEIGHTS=compressed`, [`crate::baked`]).
    pub fn compressed(mut self, on: bool) -> Self {
        self.compressed = on;
        self
    }

    /// Number of programs loaded through this cache.
    pub fn len(&self) -> usize {
        self.entries.len() + self.baked.len()
    }

    /// True when nothing is loaded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn next_tick(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    /// Unloads least recently used programs (shape-shared or baked) until one more fits.
    pub(crate) fn make_room(&mut self, engine: &dyn Engine) {
        while self.len() >= self.max {
            let shared = self.entries.iter().min_by_key(|(_, (_, t))| *t);
            let baked = self.baked.iter().min_by_key(|(_, (_, t, _))| *t);
            match (shared, baked) {
                (Some((&s, &(id, ts))), b) if b.is_none_or(|(_, &(_, tb, _))| ts <= tb) => {
                    self.entries.remove(&s);
                    engine.unload(id);
                }
                (_, Some((&key, &(id, _, bytes)))) => {
                    self.baked.remove(&key);
                    self.baked_bytes -= bytes;
                    engine.unload(id);
                }
                _ => break,
            }
        }
    }

    /// The remembered compile failure of `shape`, if any: a dispatch of it would fail again, so
    /// [`compute`] sends its columns to the CPU before converting anything, and the repeat does
    /// not count as a new engine failure ([`crate::health`]): a shape the compiler rejects is not
    /// a device that stopped working.
    pub(crate) fn known_failure(&self, shape: &TiledShape) -> Option<EngineError> {
        self.failed.get(shape).cloned()
    }

    fn get_or_compile(
        &mut self,
        engine: &dyn Engine,
        shape: TiledShape,
        stats: &Stats,
    ) -> Result<ProgramId, EngineError> {
        use std::sync::atomic::Ordering::Relaxed;
        self.tick += 1;
        if let Some(e) = self.entries.get_mut(&shape) {
            e.1 = self.tick;
            stats.cache_hits.fetch_add(1, Relaxed);
            return Ok(e.0);
        }
        if let Some(e) = self.failed.get(&shape) {
            // A program that failed to compile fails again; don't pay for it on every call.
            return Err(e.clone());
        }
        stats.cache_misses.fetch_add(1, Relaxed);
        self.make_room(engine);
        stats.baked_bytes.store(self.baked_bytes as u64, Relaxed);
        let mil = ane_mil::text::emit(&ane_mil::build::tiled_matmul(shape));
        match engine.compile(&mil, &[]) {
            Ok(id) => {
                stats.count_placement(engine, id);
                self.entries.insert(shape, (id, self.tick));
                Ok(id)
            }
            Err(e) => {
                // Compile failures are deterministic on the ANE (the same text fails again), so
                // they are remembered; budget and load failures are transient (§5.2, §5.3) and
                // the next call tries again. The reference engine's injected compile faults are
                // random but remembered all the same: they stand for a shape the compiler rejects.
                if !matches!(e, EngineError::Budget { .. } | EngineError::Load(_)) {
                    self.failed.insert(shape, e.clone());
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
        for (_, (id, _, _)) in self.baked.drain() {
            engine.unload(id);
        }
        self.baked_bytes = 0;
    }
}

/// Staged weights: fp16 copies of weight matrices in the program's `b_w` layout, by identity,
/// each already in a surface of the request size, so a dispatch hands it to the engine as is.
#[derive(Debug, Default)]
pub struct StagedWeights {
    entries: HashMap<u128, (Arc<Surface>, u64)>,
    /// Single weight matrices converted ahead of time ([`prestage`]), by [`member_key`], until a
    /// group's surface is built from them.
    prestaged: HashMap<u128, Arc<Vec<f16>>>,
    prestaged_bytes: usize,
    bytes: usize,
    tick: u64,
    /// Staged at load ([`stage_at_load`]) and not used by a dispatch yet.
    unused: std::collections::HashSet<u128>,
    /// The first entry a dispatch used: when it is used again, a pass over the model is over.
    first: Option<u128>,
    /// Cap on staged bytes; least recently used entries go first.
    pub max_bytes: usize,
}

impl StagedWeights {
    /// A store holding at most `max_bytes` of surfaces.
    pub fn new(max_bytes: usize) -> Self {
        StagedWeights {
            max_bytes,
            ..Default::default()
        }
    }

    /// Bytes held (surfaces and prestaged matrices).
    pub fn bytes(&self) -> usize {
        self.bytes + self.prestaged_bytes
    }

    /// Takes a matrix converted ahead ([`prestage`]) out of the store.
    fn take_prestaged(&mut self, key: &u128) -> Option<Arc<Vec<f16>>> {
        let p = self.prestaged.remove(key)?;
        self.prestaged_bytes -= p.len() * 2;
        Some(p)
    }

    /// A dispatch is about to use `key`. The first key dispatched marks the start of a pass over
    /// the model (a prompt, or a ubatch of one); when it comes again, the groups staged at load
    /// that no dispatch used in between are released: llama.cpp reserves with every row an
    /// output, but a prefill computes the last layer's FFN and the LM head for one row (CPU), so
    /// those would otherwise hold their surfaces for nothing. A later use stages them again.
    /// Returns how many were released.
    fn note_dispatch(&mut self, key: u128) -> usize {
        self.unused.remove(&key);
        match self.first {
            // Also when the marker is gone (evicted, or its group changed): restart the pass.
            None => {
                self.first = Some(key);
                0
            }
            Some(f) if !self.entries.contains_key(&f) => {
                self.first = Some(key);
                0
            }
            Some(f) if f == key => {
                let mut n = 0;
                for k in std::mem::take(&mut self.unused) {
                    if let Some((e, _)) = self.entries.remove(&k) {
                        self.bytes -= e.alloc_size();
                        n += 1;
                    }
                }
                n
            }
            Some(_) => 0,
        }
    }

    fn get_or_insert<E>(
        &mut self,
        key: u128,
        make: impl FnOnce() -> Result<Surface, E>,
    ) -> Result<Arc<Surface>, E> {
        self.tick += 1;
        if let Some(e) = self.entries.get_mut(&key) {
            e.1 = self.tick;
            return Ok(e.0.clone());
        }
        let v = Arc::new(make()?);
        let size = v.alloc_size();
        while self.bytes + size > self.max_bytes && !self.entries.is_empty() {
            let (&old, _) = self
                .entries
                .iter()
                .min_by_key(|(_, (_, t))| *t)
                .expect("non-empty");
            if let Some((e, _)) = self.entries.remove(&old) {
                self.bytes -= e.alloc_size();
            }
        }
        if size <= self.max_bytes {
            self.bytes += size;
            self.entries.insert(key, (v.clone(), self.tick));
        }
        Ok(v)
    }
}

/// Identity of one weight matrix: address, description and a fingerprint of its first and last
/// bytes (see [`stage_key`]).
///
/// # Safety
/// `m.src0` must be readable.
pub(crate) unsafe fn member_key(m: &Member) -> u128 {
    let d = &m.src0.desc;
    let mut h = Xxh3::new();
    h.update(&(m.src0.data as usize).to_le_bytes());
    h.update(&d.ty.to_le_bytes());
    for v in
        d.ne.iter()
            .map(|v| *v as u64)
            .chain(d.nb.iter().map(|v| *v as u64))
    {
        h.update(&v.to_le_bytes());
    }
    let row = (d.ne[0] as usize) / m.src0_info.blck_size * m.src0_info.type_size;
    let n = row.min(256);
    let last = (d.ne[1] as usize - 1) * d.nb[1];
    // SAFETY: the first and the last row each have at least `n` readable bytes.
    unsafe {
        h.update(std::slice::from_raw_parts(m.src0.data, n));
        h.update(std::slice::from_raw_parts(m.src0.data.add(last), n));
    }
    h.digest128()
}

/// The rows of a 2-D weight as fp16, row-major `[M][K]`.
///
/// # Safety
/// `m.src0` must be readable.
unsafe fn rows_f16(m: &Member) -> Vec<f16> {
    let d = &m.src0.desc;
    let (k, rows) = (d.ne[0] as usize, d.ne[1] as usize);
    let mut out = vec![f16::ZERO; k * rows];
    let mut row = vec![0f32; k];
    let len = ane_convert::row_bytes(d.ty, k).filter(|_| d.nb[0] == m.src0_info.type_size);
    for (i1, dst) in out.chunks_exact_mut(k).enumerate() {
        let base = i1 * d.nb[1];
        let converted = len.is_some_and(|len| {
            // SAFETY: a contiguous row of k elements is `len` readable bytes at `base`.
            let bytes = unsafe { std::slice::from_raw_parts(m.src0.data.add(base), len) };
            ane_convert::row_to_f16(d.ty, bytes, dst).is_ok()
        });
        if !converted {
            // SAFETY: forwarded contract.
            unsafe { read_row(&m.src0, &m.src0_info, i1, 0, 0, &mut row) };
            for (h, &v) in dst.iter_mut().zip(&row) {
                *h = f16::from_f32(v);
            }
        }
    }
    out
}

/// Converts a 2-D weight matrix to fp16 ahead of its first dispatch. The plugin calls this from
/// `supports_op` when llama.cpp reserves its prefill graph at context creation, so a model's
/// weights are converted at load rather than inside the first prompt. Returns the bytes added (0
/// if already there, not 2-D, or over `staged.max_bytes`).
///
/// # Safety
/// `m.src0` must be a readable weight tensor.
pub unsafe fn prestage(staged: &Mutex<StagedWeights>, stats: &Stats, m: &Member) -> usize {
    let d = &m.src0.desc;
    if d.ne[2] != 1 || d.ne[3] != 1 || m.src0.data.is_null() {
        return 0;
    }
    // SAFETY: forwarded contract.
    let key = unsafe { member_key(m) };
    let size = (d.ne[0] * d.ne[1]) as usize * 2;
    {
        let s = staged.lock().unwrap_or_else(|e| e.into_inner());
        if s.prestaged.contains_key(&key) || s.bytes() + size > s.max_bytes {
            return 0;
        }
    }
    let t = Instant::now();
    // SAFETY: forwarded contract.
    let rows = Arc::new(unsafe { rows_f16(m) });
    add_time(&stats.ns_stage, t.elapsed());
    let mut s = staged.lock().unwrap_or_else(|e| e.into_inner());
    if s.prestaged.insert(key, rows).is_none() {
        s.prestaged_bytes += size;
    }
    stats
        .staged_bytes
        .store(s.bytes() as u64, std::sync::atomic::Ordering::Relaxed);
    size
}

/// Stages a group of 2-D weights (same K, in the order a dispatch stacks them) into the surface
/// its dispatches will bind, ahead of the first one. The plugin calls this from `supports_op`
/// while llama.cpp reserves its graphs at context creation, for the groups the lookahead learner
/// completes (`lookahead::Ready`), so a prompt finds its weights staged. Returns the bytes added:
/// 0 if staged already, not 2-D weights of one K, or over `staged.max_bytes` (nothing is evicted
/// for it; the first dispatch stages what did not fit).
///
/// # Safety
/// Every member's src0 must be a readable weight tensor (dst is not used).
pub unsafe fn stage_at_load(cx: &Context<'_>, members: &[Member]) -> Result<usize, EngineError> {
    let Some(first) = members.first() else {
        return Ok(0);
    };
    let k = first.src0.desc.ne[0];
    if !members.iter().all(|m| {
        let d = &m.src0.desc;
        d.ne[0] == k && d.ne[2] == 1 && d.ne[3] == 1 && !m.src0.data.is_null()
    }) {
        return Ok(0);
    }
    let m_total: usize = members.iter().map(|m| m.src0.desc.ne[1] as usize).sum();
    // The tiling `compute` uses for weights (it does not depend on the column bucket).
    let s = cx.planner.tile(k as usize, m_total, cx.planner.max_cols());
    let size = request_size(&s, cx.planner.max_cols());
    // SAFETY: forwarded contract.
    let key = unsafe { stage_key(members, &s) };
    // SAFETY: forwarded contract.
    let member_keys: Vec<u128> = members.iter().map(|m| unsafe { member_key(m) }).collect();
    let pre: Vec<Option<Arc<Vec<f16>>>> = {
        let mut staged = cx.staged.lock().unwrap_or_else(|e| e.into_inner());
        if staged.entries.contains_key(&key) || staged.bytes() + size > staged.max_bytes {
            return Ok(0);
        }
        // Matrices converted ahead (`prestage`) become part of this surface.
        member_keys
            .iter()
            .map(|k| staged.take_prestaged(k))
            .collect()
    };
    // Converted without the lock: other contexts' dispatches go on meanwhile.
    let t = Instant::now();
    // SAFETY: forwarded contract.
    let made = unsafe { stage(cx.engine, members, 0, 0, &s, size, &pre) }?;
    add_time(&cx.stats.ns_stage, t.elapsed());
    let added = made.alloc_size();
    let mut staged = cx.staged.lock().unwrap_or_else(|e| e.into_inner());
    if staged.entries.contains_key(&key) || staged.bytes() + added > staged.max_bytes {
        return Ok(0); // staged by a dispatch meanwhile, or the budget filled up
    }
    staged.get_or_insert(key, || Ok::<_, EngineError>(made))?;
    staged.unused.insert(key);
    cx.stats.groups_staged_load.fetch_add(1, Relaxed);
    cx.stats.staged_bytes.store(staged.bytes() as u64, Relaxed);
    Ok(added)
}

/// Reusable activation and output surfaces, in the engine's own memory (IOSurfaces on the ANE,
/// written and read in place). Surfaces of one request must all have the size of the largest
/// (often the weights), so allocating and zeroing them per dispatch would cost as much as the
/// weights; a few are kept per size.
#[derive(Debug, Default)]
pub struct ScratchPool {
    free: HashMap<usize, Vec<Surface>>,
}

impl ScratchPool {
    fn take(&mut self, engine: &dyn Engine, size: usize) -> Result<Surface, EngineError> {
        match self.free.get_mut(&size).and_then(Vec::pop) {
            Some(s) => Ok(s),
            None => engine.new_surface(size),
        }
    }

    /// An activation and an output surface of `size` bytes.
    pub(crate) fn take_pair(
        &mut self,
        engine: &dyn Engine,
        size: usize,
    ) -> Result<(Surface, Surface), EngineError> {
        let x = self.take(engine, size)?;
        match self.take(engine, size) {
            Ok(y) => Ok((x, y)),
            Err(e) => {
                self.give(x);
                Err(e)
            }
        }
    }

    /// Returns what [`ScratchPool::take_pair`] gave, so that the next `take_pair` of this size gets
    /// the same surfaces in the same roles: on the ANE a request is cached per binding, and
    /// swapping x and y each time would double the bindings.
    pub(crate) fn give_pair(&mut self, x: Surface, y: Surface) {
        self.give(y);
        self.give(x);
    }

    fn give(&mut self, s: Surface) {
        let v = self.free.entry(s.alloc_size()).or_default();
        if v.len() < 2 {
            v.push(s);
        }
    }
}

/// The allocation size of every surface of a request for `s`. It uses the largest column bucket
/// for the activations and outputs, so all column chunks of a group (and the staged weights) share
/// one size.
fn request_size(s: &TiledShape, max_cols: usize) -> usize {
    let wide = TiledShape {
        n: s.n.max(max_cols),
        ..*s
    };
    request_alloc_size(&[wide.x_len() * 2, s.w_len() * 2, wide.y_len() * 2])
}

/// Device-wide state the compute path needs.
pub struct Context<'a> {
    /// The engine.
    pub engine: &'a dyn Engine,
    /// Planning rules.
    pub planner: &'a Planner,
    /// Loaded programs.
    pub cache: &'a Mutex<KernelCache>,
    /// Staged weights.
    pub staged: &'a Mutex<StagedWeights>,
    /// Reusable surfaces.
    pub scratch: &'a Mutex<ScratchPool>,
    /// Counters.
    pub stats: &'a Stats,
    /// Whether the device gave up (see [`crate::health`]).
    pub health: &'a crate::health::Health,
    /// The host's CPU backend for fallbacks (`None`: the plugin's own loop).
    pub host: Option<&'a crate::host_cpu::HostCpu>,
    /// `GGML_ANE_ACT_ROUND=cpu`: activations rounded as the CPU backend rounds them for each
    /// weight type (`ane_convert::act_round`) before their fp16 conversion.
    pub act_round: bool,
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

/// Writes `v` to element (`i0`, `i1`, `i2`, `i3`) of an f32 tensor.
///
/// # Safety
/// `dst` is a writable f32 tensor and the index is within its shape.
pub(crate) unsafe fn put(dst: &Operand, i0: usize, i1: usize, i2: usize, i3: usize, v: f32) {
    let d = &dst.desc;
    let off = i0 * d.nb[0] + i1 * d.nb[1] + i2 * d.nb[2] + i3 * d.nb[3];
    // SAFETY: in bounds by the caller's contract; unaligned-safe write.
    unsafe {
        dst.data
            .cast_mut()
            .add(off)
            .cast::<f32>()
            .write_unaligned(v)
    };
}

/// Row `i1` of matrix (`i2`, `i3`) of a tensor, widened to f32 into `out` (length ne0).
///
/// # Safety
/// The operand must describe readable memory; for non-plain types, rows must be contiguous blocks
/// (checked by `supports_op`) and `info.to_float` must be set.
pub(crate) unsafe fn read_row(
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

/// Identity of a group's staged weights: its members' [`member_key`]s and the program's tiling.
///
/// # Safety
/// The members' src0 must be readable.
unsafe fn stage_key(members: &[Member], shape: &TiledShape) -> u128 {
    let mut h = Xxh3::new();
    for m in members {
        // SAFETY: forwarded contract.
        h.update(&unsafe { member_key(m) }.to_le_bytes());
    }
    for v in [shape.tiles, shape.k_chunks, shape.m_tile, shape.k_chunk] {
        h.update(&v.to_le_bytes());
    }
    h.update(&[shape.layout as u8]);
    h.digest128()
}

/// Rows of a token-major `b_w` gathered before they are written transposed: one flush writes
/// runs of this many halves (64 bytes) instead of one element per row.
const T_BLOCK: usize = 32;

/// Places converted weight rows (consecutive, from row 0) in `b_w` as the layout wants them:
/// row slices as they are (channel-first), or transposed through blocks of [`T_BLOCK`] rows of one
/// tile (token-major).
struct WeightWriter<'a> {
    w: &'a mut [f16],
    s: &'a TiledShape,
    k: usize,
    block: Vec<f16>,
    first: usize,
    rows: usize,
}

impl<'a> WeightWriter<'a> {
    fn new(w: &'a mut [f16], s: &'a TiledShape, k: usize) -> Self {
        let block = match s.layout {
            Layout::Tokens => vec![f16::ZERO; T_BLOCK * k],
            Layout::Channels => Vec::new(),
        };
        WeightWriter {
            w,
            s,
            k,
            block,
            first: 0,
            rows: 0,
        }
    }

    /// Row `r` (converted, `k` values).
    fn push(&mut self, r: usize, row16: &[f16]) {
        let s = self.s;
        let (t, mi) = (r / s.m_tile, r % s.m_tile);
        if s.layout == Layout::Channels {
            for c in 0..s.k_chunks {
                let lo = c * s.k_chunk;
                let hi = (lo + s.k_chunk).min(self.k);
                if lo >= hi {
                    break;
                }
                let at = s.w_index(t, c, mi, 0);
                self.w[at..at + (hi - lo)].copy_from_slice(&row16[lo..hi]);
            }
            return;
        }
        if self.rows == 0 {
            self.first = r;
        }
        self.block[self.rows * self.k..(self.rows + 1) * self.k].copy_from_slice(row16);
        self.rows += 1;
        if self.rows == T_BLOCK || mi + 1 == s.m_tile {
            self.flush();
        }
    }

    /// Writes the gathered token-major rows.
    fn flush(&mut self) {
        let (s, k, n) = (self.s, self.k, self.rows);
        if n == 0 {
            return;
        }
        let (t, mi) = (self.first / s.m_tile, self.first % s.m_tile);
        for c in 0..s.k_chunks {
            let lo = c * s.k_chunk;
            let hi = (lo + s.k_chunk).min(k);
            if lo >= hi {
                break;
            }
            // `n` rows x (hi - lo) columns of the block, to k-major runs of `n` in the slice.
            let at = s.w_index(t, c, mi, 0);
            let src = &self.block[lo..(n - 1) * k + hi];
            let dst = &mut self.w[at..at + (hi - lo - 1) * s.m_tile + n];
            ane_convert::transpose_f16(src, n, hi - lo, k, dst, s.m_tile)
                .expect("the block and the slice were cut to these shapes");
        }
        self.rows = 0;
    }
}

/// The stacked src0 rows of matrix (`i2`, `i3`) of every member in the `b_w` layout of `s`
/// (`[tiles][k_chunks][m_tile][k_chunk]`, or its transpose per slice for token-major programs),
/// fp16, zero padded, in a surface of `size` bytes.
/// Rows are converted by `ane_convert` (bit-identical to ggml's `to_float` + fp16 rounding, one
/// pass) when their blocks are contiguous, else through ggml's `to_float`.
///
/// # Safety
/// The members' src0 must be readable.
unsafe fn stage(
    engine: &dyn Engine,
    members: &[Member],
    i2: usize,
    i3: usize,
    s: &TiledShape,
    size: usize,
    pre: &[Option<Arc<Vec<f16>>>],
) -> Result<Surface, EngineError> {
    let k = members[0].src0.desc.ne[0] as usize;
    // Engine memory: on the ANE the weights are written once, into the IOSurface every dispatch
    // of this group binds.
    let mut surface = engine.new_surface(size)?;
    let w = surface.fp16_mut(s.w_len());
    // Engine memory is not cleared: the padding rows and K tails must be zeros.
    w.fill(f16::ZERO);
    let mut out = WeightWriter::new(w, s, k);
    let mut row = vec![0f32; k];
    let mut row16 = vec![f16::ZERO; k];
    let mut r = 0;
    for (mi_member, m) in members.iter().enumerate() {
        let d = &m.src0.desc;
        let fast = d.nb[0] == m.src0_info.type_size && ane_convert::row_bytes(d.ty, k).is_some();
        let ready = pre.get(mi_member).and_then(|p| p.as_ref());
        for i1 in 0..d.ne[1] as usize {
            let base = i1 * d.nb[1] + i2 * d.nb[2] + i3 * d.nb[3];
            let converted = if let Some(rows) = ready {
                // Converted at load by `prestage`: a copy.
                row16.copy_from_slice(&rows[i1 * k..(i1 + 1) * k]);
                true
            } else {
                fast && {
                    let len = ane_convert::row_bytes(d.ty, k).unwrap_or(0);
                    // SAFETY: a contiguous row of k elements is `len` readable bytes at `base`.
                    let bytes = unsafe { std::slice::from_raw_parts(m.src0.data.add(base), len) };
                    ane_convert::row_to_f16(d.ty, bytes, &mut row16).is_ok()
                }
            };
            if !converted {
                // SAFETY: forwarded contract.
                unsafe { read_row(&m.src0, &m.src0_info, i1, i2, i3, &mut row) };
                for (h, &v) in row16.iter_mut().zip(&row) {
                    *h = f16::from_f32(v);
                }
            }
            out.push(r, &row16);
            r += 1;
        }
    }
    out.flush();
    Ok(surface)
}

/// When `cols` are consecutive tokens of one (i12, i13) matrix, the first token and that matrix.
fn contiguous_run(cols: &[(usize, usize, usize)]) -> Option<(usize, usize, usize)> {
    let (&(a, b, c), &(z, y, x)) = (cols.first()?, cols.last()?);
    (b == y && c == x && z + 1 == a + cols.len()).then_some((a, b, c))
}

/// Computes a group. Never leaves an output unwritten: the columns of a failed dispatch are
/// computed on the CPU ([`fallback`]). Returns whether any column fell back to the CPU.
///
/// # Safety
/// Every operand must describe valid host tensors of MUL_MATs that [`crate::support::mul_mat`]
/// accepted; dst memory must be writable and not overlap any source.
pub unsafe fn compute(cx: &Context<'_>, g: &Group) -> bool {
    let n_ops = (g.members.len() - g.speculative) as u64;
    if cx.health.is_off() {
        // The device gave up: no conversion, no dispatch, the whole nodes on the CPU.
        // SAFETY: forwarded contract.
        unsafe { fallback(cx, g, &[]) };
        cx.stats.ops_fallback.fetch_add(n_ops, Relaxed);
        return true;
    }
    // GGML_ANE_WEIGHTS=compressed: a lone Q8_0/Q4_0 weight runs its own baked program.
    // SAFETY: forwarded contract.
    if unsafe { crate::baked::try_compute(cx, g) } {
        return false;
    }
    let src0 = &g.members[0].src0.desc;
    let [k, _, ne02, ne03] = src0.ne.map(|v| v as usize);
    let [_, n, ne12, ne13] = g.src1.desc.ne.map(|v| v as usize);
    let (r2, r3) = (ne12 / ne02, ne13 / ne03);
    let m_total: usize = g.members.iter().map(|m| m.src0.desc.ne[1] as usize).sum();
    let mut failed: Vec<Failed> = Vec::new();
    let mut any_ok = false;
    // Every failure so far repeated a remembered compile failure (a shape the device rejects).
    let mut all_known = true;
    for i03 in 0..ne03 {
        for i02 in 0..ne02 {
            // Every src1 column (n, i12, i13) that multiplies this src0 matrix.
            let cols: Vec<(usize, usize, usize)> = (i03 * r3..(i03 + 1) * r3)
                .flat_map(|i13| {
                    (i02 * r2..(i02 + 1) * r2)
                        .flat_map(move |i12| (0..n).map(move |i1| (i1, i12, i13)))
                })
                .collect();
            let (kp, mp) = if g.weights {
                (k, m_total)
            } else {
                (cx.planner.dim_bucket(k), cx.planner.dim_bucket(m_total))
            };
            let mut w: Option<Arc<Surface>> = None;
            for chunk in cx.planner.col_chunks(cols.len()) {
                let shape = cx.planner.tile(kp, mp, chunk.bucket);
                let cols = &cols[chunk.start..chunk.start + chunk.len];
                let known = cx
                    .cache
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .known_failure(&shape);
                let fresh = known.is_none();
                all_known &= !fresh;
                let r = if cx.health.is_off() {
                    Err(EngineError::Unavailable("device gave up".into()))
                } else if let Some(e) = known {
                    Err(e)
                } else {
                    // SAFETY: forwarded contract.
                    unsafe { dispatch(cx, g, i02, i03, &shape, cols, &mut w) }
                };
                match r {
                    Ok(()) => {
                        any_ok = true;
                        cx.health.ok();
                    }
                    Err(e) => {
                        if crate::config::Config::get().debug {
                            eprintln!("ggml-ane: dispatch failed, CPU fallback: {e}");
                        }
                        if fresh && cx.health.failed(&e) {
                            cx.stats.gave_up.store(1, Relaxed);
                            eprintln!(
                                "ggml-ane: {} engine failures in a row (last: {e}); the device \
                                 stops claiming MUL_MATs, the CPU backend computes them \
                                 (GGML_ANE_GIVE_UP)",
                                cx.health.limit()
                            );
                        }
                        failed.push(Failed {
                            i02,
                            i03,
                            cols: cols.to_vec(),
                        });
                    }
                }
            }
        }
    }
    let any_fallback = !failed.is_empty();
    if any_fallback && !any_ok && all_known {
        for m in &g.members[..g.members.len() - g.speculative] {
            let op = crate::health::OpKey::of(&m.src0.desc, &g.src1.desc);
            if cx.health.reject(op) {
                eprintln!(
                    "ggml-ane: MUL_MAT {:?} x {:?} does not compile for the device; the CPU \
                     backend computes it from now on (declined: shape_failed)",
                    m.src0.desc.ne, g.src1.desc.ne
                );
            }
        }
    }
    if any_fallback {
        // All failed: the whole nodes, exactly as CPU-only llama.cpp computes them.
        let parts: &[Failed] = if any_ok { &failed } else { &[] };
        // SAFETY: forwarded contract.
        unsafe { fallback(cx, g, parts) };
        cx.stats.ops_fallback.fetch_add(n_ops, Relaxed);
    } else {
        cx.stats.ops_offloaded.fetch_add(n_ops, Relaxed);
        if g.members.len() > 1 {
            cx.stats.ops_fused.fetch_add(n_ops, Relaxed);
        }
    }
    any_fallback
}

/// The columns of matrix (`i02`, `i03`) one failed dispatch left to the CPU.
struct Failed {
    i02: usize,
    i03: usize,
    cols: Vec<(usize, usize, usize)>,
}

/// The CPU path: `parts` of every member, or, when `parts` is empty, every member whole. Through
/// the host's CPU backend ([`crate::host_cpu`]) when it has one and takes the nodes (same kernels
/// and numbers as CPU-only llama.cpp), else the plugin's own f32 loop.
///
/// # Safety
/// As for [`compute`].
unsafe fn fallback(cx: &Context<'_>, g: &Group, parts: &[Failed]) {
    let t = Instant::now();
    let views = cpu_views(g, parts);
    let ops: Vec<crate::host_cpu::MatMul> = views.iter().map(|v| v.0).collect();
    // SAFETY: views of the group's valid operands (forwarded contract).
    let done = cx.host.is_some_and(|h| unsafe { h.compute(&ops) }.is_ok());
    if done {
        cx.stats.fallback_cpu_backend.fetch_add(1, Relaxed);
    } else {
        cx.stats.fallback_own.fetch_add(1, Relaxed);
        for (op, wi) in &views {
            // SAFETY: as above.
            unsafe { own_fallback(op, wi, &g.src1_info) };
        }
    }
    add_time(&cx.stats.ns_fallback, t.elapsed());
}

/// The MUL_MATs a fallback computes, as views of the group's operands: whole members, or per
/// failed part one 2-D product for each run of consecutive tokens of one src1 matrix.
fn cpu_views(g: &Group, parts: &[Failed]) -> Vec<(crate::host_cpu::MatMul, TypeInfo)> {
    use crate::host_cpu::MatMul;
    let mut ops = Vec::new();
    for m in &g.members {
        if parts.is_empty() {
            let op = MatMul {
                src0: m.src0,
                src1: g.src1,
                dst: m.dst,
            };
            ops.push((op, m.src0_info));
            continue;
        }
        for p in parts {
            let mut rest = &p.cols[..];
            while let Some(&(i1, i12, i13)) = rest.first() {
                let len = rest
                    .iter()
                    .enumerate()
                    .take_while(|&(j, &(a, b, c))| a == i1 + j && b == i12 && c == i13)
                    .count();
                rest = &rest[len..];
                let w = m.src0.desc;
                let x = g.src1.desc;
                let d = m.dst.desc;
                let at = |o: &Operand, off: usize, ne: [i64; 4]| Operand {
                    desc: TensorDesc { ne, ..o.desc },
                    data: o.data.wrapping_add(off),
                };
                let op = MatMul {
                    src0: at(
                        &m.src0,
                        p.i02 * w.nb[2] + p.i03 * w.nb[3],
                        [w.ne[0], w.ne[1], 1, 1],
                    ),
                    src1: at(
                        &g.src1,
                        i1 * x.nb[1] + i12 * x.nb[2] + i13 * x.nb[3],
                        [x.ne[0], len as i64, 1, 1],
                    ),
                    dst: at(
                        &m.dst,
                        i1 * d.nb[1] + i12 * d.nb[2] + i13 * d.nb[3],
                        [d.ne[0], len as i64, 1, 1],
                    ),
                };
                ops.push((op, m.src0_info));
            }
        }
    }
    ops
}

/// The plugin's own CPU loop for one product: f32 accumulation from the original values, weight
/// rows split across threads, each widened once per src1 matrix, src1 widened once.
///
/// # Safety
/// As for [`compute`]; `op` is a valid view ([`crate::host_cpu::MatMul::is_valid`]) whose types
/// `wi` and `xi` describe.
unsafe fn own_fallback(op: &crate::host_cpu::MatMul, wi: &TypeInfo, xi: &TypeInfo) {
    /// Operands cross into the scoped threads; each writes disjoint dst rows.
    #[derive(Clone, Copy)]
    struct Shared(crate::host_cpu::MatMul);
    // SAFETY: the memory is valid for the whole call (the scope joins before returning), sources
    // are only read and every thread writes its own dst rows.
    unsafe impl Send for Shared {}
    // SAFETY: as above.
    unsafe impl Sync for Shared {}
    impl Shared {
        /// Through a method, so closures capture the whole `Shared` (edition 2021 would capture
        /// the non-`Send` field alone).
        fn get(&self) -> &crate::host_cpu::MatMul {
            &self.0
        }
    }

    let (w, x) = (&op.src0.desc, &op.src1.desc);
    let [k, rows, ne02, ne03] = w.ne.map(|v| v as usize);
    let [_, n, ne12, ne13] = x.ne.map(|v| v as usize);
    let (r2, r3) = (ne12 / ne02, ne13 / ne03);
    let threads = std::thread::available_parallelism()
        .map_or(1, |t| t.get())
        .min(rows.div_ceil(16))
        .max(1);
    let shared = Shared(*op);
    for i13 in 0..ne13 {
        for i12 in 0..ne12 {
            let mut xs = vec![0f32; n * k];
            for (i1, row) in xs.chunks_exact_mut(k).enumerate() {
                // SAFETY: forwarded contract.
                unsafe { read_row(&op.src1, xi, i1, i12, i13, row) };
            }
            let xs = &xs;
            let per = rows.div_ceil(threads);
            std::thread::scope(|s| {
                for t in 0..threads {
                    let sh = shared;
                    s.spawn(move || {
                        let op = sh.get();
                        let mut wrow = vec![0f32; k];
                        for r in t * per..((t + 1) * per).min(rows) {
                            // SAFETY: forwarded contract.
                            unsafe { read_row(&op.src0, wi, r, i12 / r2, i13 / r3, &mut wrow) };
                            for (i1, xr) in xs.chunks_exact(k).enumerate() {
                                let acc: f32 = wrow.iter().zip(xr).map(|(a, b)| a * b).sum();
                                // SAFETY: an in-bounds element of this thread's dst rows.
                                unsafe { put(&op.dst, r, i1, i12, i13, acc) };
                            }
                        }
                    });
                }
            });
        }
    }
}

/// One engine dispatch for `cols` against matrix (`i02`, `i03`) of every member.
///
/// # Safety
/// As for [`compute`].
unsafe fn dispatch(
    cx: &Context<'_>,
    g: &Group,
    i02: usize,
    i03: usize,
    shape: &TiledShape,
    cols: &[(usize, usize, usize)],
    w: &mut Option<Arc<Surface>>,
) -> Result<(), EngineError> {
    let s = shape;
    let k = g.members[0].src0.desc.ne[0] as usize;
    let t = Instant::now();
    let size = request_size(s, cx.planner.max_cols());
    // Weights: staged once (weights buffers) or converted for this call.
    let weights = match w {
        Some(w) => w.clone(),
        None => {
            let made = if g.weights
                && g.members
                    .iter()
                    .all(|m| m.src0.desc.ne[2] == 1 && m.src0.desc.ne[3] == 1)
            {
                // SAFETY: forwarded contract.
                let key = unsafe { stage_key(&g.members, s) };
                let mut staged = cx.staged.lock().unwrap_or_else(|e| e.into_inner());
                let released = staged.note_dispatch(key);
                cx.stats.groups_released.fetch_add(released as u64, Relaxed);
                // Matrices converted at load: take them out; the group's surface replaces them.
                let keys: Vec<u128> = if staged.entries.contains_key(&key) {
                    Vec::new()
                } else {
                    // SAFETY: forwarded contract.
                    g.members.iter().map(|m| unsafe { member_key(m) }).collect()
                };
                let pre: Vec<Option<Arc<Vec<f16>>>> =
                    keys.iter().map(|k| staged.take_prestaged(k)).collect();
                let made = staged.get_or_insert(key, || {
                    let t = Instant::now();
                    // SAFETY: forwarded contract.
                    let made = unsafe { stage(cx.engine, &g.members, i02, i03, s, size, &pre) };
                    add_time(&cx.stats.ns_stage, t.elapsed());
                    cx.stats.groups_staged_dispatch.fetch_add(1, Relaxed);
                    made
                })?;
                cx.stats
                    .staged_bytes
                    .store(staged.bytes() as u64, std::sync::atomic::Ordering::Relaxed);
                made
            } else {
                // SAFETY: forwarded contract.
                let made = unsafe { stage(cx.engine, &g.members, i02, i03, s, size, &[]) }?;
                if !guard::fp16_ok(made.fp16(s.w_len())) {
                    return Err(guard::trip(cx.stats, "src0 out of fp16 range"));
                }
                Arc::new(made)
            };
            *w = Some(made.clone());
            made
        }
    };
    let (mut x, mut y) = cx
        .scratch
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take_pair(cx.engine, size)?;
    // SAFETY: forwarded contract.
    let filled = unsafe { fill_activations(cx, g, s, k, cols, &mut x) };
    add_time(&cx.stats.ns_convert, t.elapsed());
    // SAFETY: forwarded contract.
    let result =
        filled.and_then(|()| unsafe { run_and_scatter(cx, g, s, cols, &weights, &x, &mut y) });
    let mut pool = cx.scratch.lock().unwrap_or_else(|e| e.into_inner());
    pool.give_pair(x, y);
    result
}

/// Writes the activation columns into `x` (`[k_pad][n]`, fp16), zeroing every padding element.
///
/// # Safety
/// As for [`compute`].
unsafe fn fill_activations(
    cx: &Context<'_>,
    g: &Group,
    s: &TiledShape,
    k: usize,
    cols: &[(usize, usize, usize)],
    x: &mut Surface,
) -> Result<(), EngineError> {
    if s.layout == Layout::Tokens {
        // SAFETY: forwarded contract.
        return unsafe { fill_tokens(cx, g, s, k, cols, x) };
    }
    let xs = x.fp16_mut(s.x_len());
    let d = &g.src1.desc;
    let round = act_round(cx, g);
    let run = contiguous_run(cols).filter(|_| {
        round == ActRound::None
            && d.ty == GGML_TYPE_F32
            && d.nb[0] == 4
            && d.nb[1].is_multiple_of(4)
    });
    if let Some((i1, i12, i13)) = run {
        let stride = d.nb[1] / 4;
        let len = (cols.len() - 1) * stride + k;
        // SAFETY: rows i1..i1+len of matrix (i12, i13) are readable f32, `len` values from here.
        let src = unsafe {
            std::slice::from_raw_parts(
                g.src1
                    .data
                    .add(i1 * d.nb[1] + i12 * d.nb[2] + i13 * d.nb[3])
                    .cast::<f32>(),
                len,
            )
        };
        ane_convert::act_f32_to_f16_transposed(src, cols.len(), k, stride, &mut xs[..k * s.n], s.n)
            .map_err(|e| EngineError::Eval(format!("activation conversion: {e}")))?;
        xs[k * s.n..].fill(f16::ZERO);
        // fp16 conversion of a value beyond 65504 (or a non-finite input) gives a non-finite value.
        if !guard::fp16_ok(&xs[..k * s.n]) {
            return Err(guard::trip(cx.stats, "src1 out of fp16 range"));
        }
        return Ok(());
    }
    xs.fill(f16::ZERO);
    let mut row = vec![0f32; k];
    for (c, &(i1, i12, i13)) in cols.iter().enumerate() {
        // SAFETY: forwarded contract.
        unsafe { read_row(&g.src1, &g.src1_info, i1, i12, i13, &mut row) };
        if !guard::input_ok(&row) {
            return Err(guard::trip(cx.stats, "src1 out of fp16 range"));
        }
        round.apply(&mut row);
        for (ki, &v) in row.iter().enumerate() {
            xs[ki * s.n + c] = f16::from_f32(v);
        }
    }
    Ok(())
}

/// Whether MUL_MATs with weights of these types may share one dispatch: their activations are
/// rounded alike by the CPU backend (`ane_convert::act_round`), so one activation surface serves
/// both.
pub fn rounds_alike(a: i32, b: i32) -> bool {
    ActRound::for_weight(a) == ActRound::for_weight(b)
}

/// How the CPU backend would round this group's activations: by its first member's weight type
/// (members of one dispatch share it, see `group_round`), nothing when `GGML_ANE_ACT_ROUND=off`.
fn act_round(cx: &Context<'_>, g: &Group) -> ActRound {
    match g.members.first() {
        Some(m) if cx.act_round => ActRound::for_weight(m.src0.desc.ty),
        _ => ActRound::None,
    }
}

/// Token-major activations (`[k_chunks][n][k_chunk]`): each token's row is a plain fp32 -> fp16
/// conversion of the src1 row, no transpose; padding (K tail, extra tokens) is zeroed.
///
/// # Safety
/// As for [`compute`].
unsafe fn fill_tokens(
    cx: &Context<'_>,
    g: &Group,
    s: &TiledShape,
    k: usize,
    cols: &[(usize, usize, usize)],
    x: &mut Surface,
) -> Result<(), EngineError> {
    let xs = x.fp16_mut(s.x_len());
    let d = &g.src1.desc;
    let plain_f32 = d.ty == GGML_TYPE_F32 && d.nb[0] == 4;
    let round = act_round(cx, g);
    let mut row = vec![0f32; k];
    for (cidx, &(i1, i12, i13)) in cols.iter().enumerate() {
        let base = i1 * d.nb[1] + i12 * d.nb[2] + i13 * d.nb[3];
        let src: &[f32] = if plain_f32 && round == ActRound::None {
            // SAFETY: a contiguous f32 row of k values starts at `base`.
            unsafe { std::slice::from_raw_parts(g.src1.data.add(base).cast::<f32>(), k) }
        } else {
            // SAFETY: forwarded contract.
            unsafe { read_row(&g.src1, &g.src1_info, i1, i12, i13, &mut row) };
            if !guard::input_ok(&row) {
                return Err(guard::trip(cx.stats, "src1 out of fp16 range"));
            }
            round.apply(&mut row);
            &row
        };
        for c in 0..s.k_chunks {
            let seg = &mut xs[(c * s.n + cidx) * s.k_chunk..(c * s.n + cidx + 1) * s.k_chunk];
            let lo = (c * s.k_chunk).min(k);
            let hi = (lo + s.k_chunk).min(k);
            ane_convert::f32_to_f16(&src[lo..hi], &mut seg[..hi - lo])
                .map_err(|e| EngineError::Eval(format!("activation conversion: {e}")))?;
            seg[hi - lo..].fill(f16::ZERO);
            if !guard::fp16_ok(&seg[..hi - lo]) {
                return Err(guard::trip(cx.stats, "src1 out of fp16 range"));
            }
        }
    }
    for c in 0..s.k_chunks {
        xs[(c * s.n + cols.len()) * s.k_chunk..(c + 1) * s.n * s.k_chunk].fill(f16::ZERO);
    }
    Ok(())
}

/// Token-major outputs (`[tiles][k_chunks][n][m_tile]`) into each member's dst rows: one slice is
/// a plain fp16 -> fp32 copy per token and tile; several slices are summed in f32.
///
/// # Safety
/// As for [`compute`].
unsafe fn scatter_tokens(
    g: &Group,
    s: &TiledShape,
    cols: &[(usize, usize, usize)],
    ys: &[f16],
) -> Result<(), EngineError> {
    let mut r0 = 0;
    for m in &g.members {
        let d = &m.dst.desc;
        let rows = d.ne[0] as usize;
        for (cidx, &(i1, i12, i13)) in cols.iter().enumerate() {
            let base = i1 * d.nb[1] + i12 * d.nb[2] + i13 * d.nb[3];
            let mut mi = 0;
            while mi < rows {
                let (t, row) = ((r0 + mi) / s.m_tile, (r0 + mi) % s.m_tile);
                let seg = (s.m_tile - row).min(rows - mi);
                let at = |c: usize| ((t * s.k_chunks + c) * s.n + cidx) * s.m_tile + row;
                if s.k_chunks == 1 && d.nb[0] == 4 {
                    // SAFETY: `seg` contiguous f32 outputs of this token start here.
                    let out = unsafe {
                        std::slice::from_raw_parts_mut(
                            m.dst.data.cast_mut().add(base + mi * 4).cast::<f32>(),
                            seg,
                        )
                    };
                    ane_convert::f16_to_f32(&ys[at(0)..at(0) + seg], out)
                        .map_err(|e| EngineError::Eval(format!("output conversion: {e}")))?;
                } else {
                    for j in 0..seg {
                        let acc: f32 = (0..s.k_chunks).map(|c| ys[at(c) + j].to_f32()).sum();
                        // SAFETY: an in-bounds element of a writable f32 dst.
                        unsafe { put(&m.dst, mi + j, i1, i12, i13, acc) };
                    }
                }
                mi += seg;
            }
        }
        r0 += rows;
    }
    Ok(())
}

/// Compiles (or reuses) the program, evaluates it, checks and scatters the outputs.
///
/// # Safety
/// As for [`compute`].
unsafe fn run_and_scatter(
    cx: &Context<'_>,
    g: &Group,
    s: &TiledShape,
    cols: &[(usize, usize, usize)],
    ws: &Surface,
    x: &Surface,
    y: &mut Surface,
) -> Result<(), EngineError> {
    use std::sync::atomic::Ordering::Relaxed;
    let t = Instant::now();
    let result = {
        let mut cache = cx.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .get_or_compile(cx.engine, *s, cx.stats)
            .and_then(|id| cx.engine.evaluate(id, &[x, ws], &mut [y]))
    };
    add_time(&cx.stats.ns_engine, t.elapsed());
    result?;
    cx.stats.dispatches.fetch_add(1, Relaxed);
    if s.tiles > 1 || s.k_chunks > 1 {
        cx.stats.dispatches_tiled.fetch_add(1, Relaxed);
    }

    let t = Instant::now();
    let ys = y.fp16(s.y_len());
    if !guard::output_ok(ys) {
        return Err(guard::trip(
            cx.stats,
            "output non-finite or past the matmul cliff",
        ));
    }
    if s.layout == Layout::Tokens {
        // SAFETY: forwarded contract.
        unsafe { scatter_tokens(g, s, cols, ys)? };
        add_time(&cx.stats.ns_convert, t.elapsed());
        return Ok(());
    }
    let run = contiguous_run(cols).filter(|_| s.k_chunks == 1);
    let mut r = 0;
    for m in &g.members {
        let d = &m.dst.desc;
        let rows = d.ne[0] as usize;
        if let Some((i1, i12, i13)) = run.filter(|_| d.nb[0] == 4 && d.nb[1].is_multiple_of(4)) {
            // One slice: output rows r..r+rows are contiguous in `y` (`[tiles][m_tile][n]`).
            let stride = d.nb[1] / 4;
            let len = (cols.len() - 1) * stride + rows;
            // SAFETY: dst rows i1..i1+len of matrix (i12, i13) are writable f32 and do not overlap
            // any source.
            let out = unsafe {
                std::slice::from_raw_parts_mut(
                    m.dst
                        .data
                        .cast_mut()
                        .add(i1 * d.nb[1] + i12 * d.nb[2] + i13 * d.nb[3])
                        .cast::<f32>(),
                    len,
                )
            };
            let src = &ys[r * s.n..(r + rows) * s.n];
            ane_convert::out_f16_to_f32_transposed(src, rows, s.n, cols.len(), out, stride)
                .map_err(|e| EngineError::Eval(format!("output conversion: {e}")))?;
            r += rows;
            continue;
        }
        for mi in 0..rows {
            let (tile, row) = (r / s.m_tile, r % s.m_tile);
            for (c, &(i1, i12, i13)) in cols.iter().enumerate() {
                let acc: f32 = (0..s.k_chunks)
                    .map(|kc| ys[((tile * s.k_chunks + kc) * s.m_tile + row) * s.n + c].to_f32())
                    .sum();
                // SAFETY: an in-bounds element of a writable f32 dst.
                unsafe { put(&m.dst, mi, i1, i12, i13, acc) };
            }
            r += 1;
        }
    }
    add_time(&cx.stats.ns_convert, t.elapsed());
    Ok(())
}

#[cfg(test)]
mod tests;
