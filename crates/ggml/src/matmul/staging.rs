//! Weight staging: fp16 copies of weight matrices in the layout a dispatch binds, kept by identity
//! (at load through `stage_ahead`/`convert_ahead`, or by a group's first dispatch through `stage`).

use std::sync::atomic::AtomicUsize;

use super::stream::RING;
use super::*;

/// Staged weights: fp16 copies of weight matrices in the program's `b_w` layout, by identity,
/// each already in a surface of the request size, so a dispatch hands it to the engine as is.
///
/// A resident set, not an LRU cache: prefill walks the layers in the same order every ubatch,
/// which is LRU's worst case (once the model is larger than the budget every ubatch would evict
/// and convert everything again). Groups are admitted in the order they come (graph order) while
/// their bytes fit `max_bytes`, and stay while they are used; a group that does not fit is
/// converted for its dispatch only (streamed, counted in `streamed_bytes` and `wait_ns`). ggml
/// never says when a weights buffer is freed, so entries no dispatch used during a whole pass
/// over the model are released ([`StagedWeights::mark_used`]).
#[derive(Debug, Default)]
pub struct StagedWeights {
    /// Surfaces by stage key, with the pass that last used them and their admission order.
    pub(super) entries: HashMap<u128, (Arc<Surface>, u64, u64)>,
    /// Admissions so far (the next entry's order).
    pub(super) admitted: u64,
    /// Single weight matrices converted ahead of time ([`convert_ahead`]), by [`member_key`], until a
    /// group's surface is built from them.
    pub(super) converted: HashMap<u128, Arc<Vec<f16>>>,
    pub(super) converted_bytes: usize,
    pub(super) bytes: usize,
    /// The current pass over the model.
    pub(super) pass: u64,
    /// Staged at load ([`stage_ahead`]) and not used by a dispatch yet.
    pub(super) unused: std::collections::HashSet<u128>,
    /// The first entry a dispatch used: when it is used again, a pass over the model is over.
    pub(super) first: Option<u128>,
    /// Cap on staged bytes: what does not fit is streamed.
    pub max_bytes: usize,
    /// Bytes of surfaces converted for one dispatch only (not resident), in all.
    pub streamed_bytes: u64,
    /// Nanoseconds dispatches waited for those conversions.
    pub wait_ns: u64,
    /// The most bytes held at once (resident, converted, and the streaming rings).
    pub peak_bytes: usize,
    /// Bytes the backend instances' streaming rings hold ([`super::stream::Streamer`]).
    pub ring: Arc<AtomicUsize>,
    /// A group has been streamed: from then on the resident set leaves room for a ring.
    pub(super) streaming: bool,
    /// The largest streamed group's surface.
    pub(super) largest_streamed: usize,
    /// Host-side fp16 block scales of the groups staged as int8 (`GGML_ANE_INT8_INPUT=1`,
    /// [`super::int8`]), by the same key as their int8 surface in `entries`; their bytes count in
    /// `bytes` with it, and they leave with it. Each dispatch writes them into a scratch surface.
    pub(super) scales: HashMap<u128, Arc<Vec<f16>>>,
}

impl StagedWeights {
    /// A store holding at most `max_bytes` of surfaces.
    pub fn new(max_bytes: usize) -> Self {
        StagedWeights {
            max_bytes,
            ..Default::default()
        }
    }

    /// Bytes held (surfaces and converted matrices).
    pub fn bytes(&self) -> usize {
        self.bytes + self.converted_bytes
    }

    /// Room the resident set leaves for the streaming rings once groups stream: a ring's worth
    /// ([`RING`] of the largest streamed group), so that resident and streamed bytes together
    /// stay within the budget. Nothing while everything fits.
    pub(super) fn ring_reserve(&self) -> usize {
        if self.streaming {
            RING * self.largest_streamed
        } else {
            0
        }
    }

    /// Whether `size` more bytes become resident.
    pub(super) fn admits(&self, size: usize) -> bool {
        self.bytes() + size + self.ring_reserve() <= self.max_bytes
    }

    /// Bytes the budget leaves beside the resident set (what the rings may hold).
    pub(super) fn room(&self) -> usize {
        self.max_bytes.saturating_sub(self.bytes())
    }

    /// A group of `size` bytes streams: the resident set makes room for a ring of such groups by
    /// releasing its most recently admitted entries (graph order keeps the first layers resident).
    /// Returns how many were released.
    pub(super) fn begin_stream(&mut self, size: usize) -> usize {
        self.streaming = true;
        self.largest_streamed = self.largest_streamed.max(size);
        let mut released = 0;
        while self.bytes + self.ring_reserve() > self.max_bytes {
            let Some(newest) = self
                .entries
                .iter()
                .max_by_key(|(_, (_, _, seq))| *seq)
                .map(|(k, _)| *k)
            else {
                break;
            };
            self.forget(newest);
            released += 1;
        }
        released
    }

    /// Takes the rings' bytes into the peak.
    pub(super) fn note_peak(&mut self) {
        self.peak_bytes = self.peak_bytes.max(self.bytes() + self.ring.load(Relaxed));
    }

    /// Takes a matrix converted ahead ([`convert_ahead`]) out of the store.
    pub(super) fn take_converted(&mut self, key: &u128) -> Option<Arc<Vec<f16>>> {
        let p = self.converted.remove(key)?;
        self.converted_bytes -= p.len() * 2;
        Some(p)
    }

    /// A dispatch is about to use `key`. The first key dispatched marks the start of a pass over
    /// the model (a prompt, or a ubatch of one); when it comes again, every entry no dispatch used
    /// in between is released: groups staged at load that a prefill never dispatches (llama.cpp
    /// reserves with every row an output, but a prefill computes the last layer's FFN and the LM
    /// head for one row, on the CPU), and the groups of a model freed since (ggml never says).
    /// A later use stages them again. Returns how many were released.
    pub(super) fn mark_used(&mut self, key: u128) -> usize {
        self.unused.remove(&key);
        if let Some(e) = self.entries.get_mut(&key) {
            e.1 = self.pass;
        }
        match self.first {
            // Also when the marker is gone (released, or its group changed): restart the pass.
            None => {
                self.first = Some(key);
                0
            }
            Some(f) if !self.entries.contains_key(&f) => {
                self.first = Some(key);
                0
            }
            Some(f) if f == key => {
                let pass = self.pass;
                let stale: Vec<u128> = self
                    .entries
                    .iter()
                    .filter(|(k, (_, used, _))| {
                        (*used < pass || self.unused.contains(*k)) && **k != key
                    })
                    .map(|(k, _)| *k)
                    .collect();
                for k in &stale {
                    self.remove_entry(*k);
                    self.unused.remove(k);
                }
                self.pass += 1;
                if let Some(e) = self.entries.get_mut(&key) {
                    e.1 = self.pass;
                }
                stale.len()
            }
            Some(_) => 0,
        }
    }

    /// Drops the surface staged under `key`, if any.
    pub(super) fn forget(&mut self, key: u128) {
        self.remove_entry(key);
        self.unused.remove(&key);
    }

    /// Removes the surface under `key` and the int8 scales kept with it, with their bytes.
    fn remove_entry(&mut self, key: u128) {
        if let Some((e, ..)) = self.entries.remove(&key) {
            self.bytes -= e.alloc_size();
        }
        if let Some(d) = self.scales.remove(&key) {
            self.bytes -= d.len() * 2;
        }
    }

    /// The int8 surface and host scales staged under `key` ([`super::int8`]), marked used in
    /// this pass.
    pub(super) fn int8_entry(&mut self, key: u128) -> Option<(Arc<Surface>, Arc<Vec<f16>>)> {
        let d = self.scales.get(&key)?.clone();
        let e = self.entries.get_mut(&key)?;
        e.1 = self.pass;
        Some((e.0.clone(), d))
    }

    /// Makes an int8 surface and its host scales resident under `key`.
    pub(super) fn insert_int8(&mut self, key: u128, q: Arc<Surface>, d: Arc<Vec<f16>>) {
        self.remove_entry(key);
        self.bytes += d.len() * 2;
        self.scales.insert(key, d);
        self.insert(key, q);
    }

    /// The surface staged under `key`, made by `make` if missing: resident when it fits the
    /// budget ([`Self::admits`]), else for this dispatch only (streamed without a ring: nothing
    /// resident is evicted for it).
    pub(super) fn get_or_insert<E>(
        &mut self,
        key: u128,
        make: impl FnOnce() -> Result<Surface, E>,
    ) -> Result<Arc<Surface>, E> {
        if let Some(e) = self.entries.get_mut(&key) {
            e.1 = self.pass;
            return Ok(e.0.clone());
        }
        let t = Instant::now();
        let v = Arc::new(make()?);
        let size = v.alloc_size();
        self.peak_bytes = self
            .peak_bytes
            .max(self.bytes() + self.ring.load(Relaxed) + size);
        if self.admits(size) {
            self.insert(key, v.clone());
        } else {
            self.streamed_bytes += size as u64;
            self.wait_ns += t.elapsed().as_nanos() as u64;
        }
        Ok(v)
    }

    /// Makes `v` resident under `key`.
    pub(super) fn insert(&mut self, key: u128, v: Arc<Surface>) {
        self.bytes += v.alloc_size();
        self.admitted += 1;
        if let Some((old, ..)) = self.entries.insert(key, (v, self.pass, self.admitted)) {
            self.bytes -= old.alloc_size();
        }
        self.note_peak();
    }

    /// Copies the store's counters into the stats.
    pub(super) fn publish(&self, stats: &Stats) {
        stats.staged_bytes.store(self.bytes() as u64, Relaxed);
        stats
            .staged_peak_bytes
            .store(self.peak_bytes as u64, Relaxed);
        stats.stream_bytes.store(self.streamed_bytes, Relaxed);
        stats.convert_wait_ns.store(self.wait_ns, Relaxed);
    }
}

/// Identity of one weight matrix: address, description and a fingerprint of its first and last
/// bytes (see [`stage_key`]).
pub(crate) fn member_key(m: &Member) -> u128 {
    let d = &m.src0.desc;
    let mut h = Xxh3::new();
    h.update(&m.src0.addr().to_le_bytes());
    h.update(&d.ty.to_le_bytes());
    for v in
        d.ne.iter()
            .map(|v| *v as u64)
            .chain(d.nb.iter().map(|v| *v as u64))
    {
        h.update(&v.to_le_bytes());
    }
    m.src0.fingerprint(&mut h);
    h.digest128()
}

/// The rows of a 2-D weight as fp16, row-major `[M][K]`.
pub(super) fn rows_f16(m: &Member) -> Vec<f16> {
    let d = &m.src0.desc;
    let (k, rows) = (d.ne[0] as usize, d.ne[1] as usize);
    let mut out = vec![f16::ZERO; k * rows];
    let mut row = vec![0f32; k];
    let fast = ane_convert::row_bytes(d.ty, k).is_some() && d.nb[0] == m.src0_info.type_size;
    for (i1, dst) in out.chunks_exact_mut(k).enumerate() {
        let converted =
            fast && ane_convert::row_to_f16(d.ty, m.src0.row_bytes(i1, 0, 0), dst).is_ok();
        if !converted {
            m.src0.read_row(&m.src0_info, i1, 0, 0, &mut row);
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
pub fn convert_ahead(staged: &Mutex<StagedWeights>, stats: &Stats, m: &Member) -> usize {
    let d = &m.src0.desc;
    if d.ne[2] != 1 || d.ne[3] != 1 || m.src0.is_null() {
        return 0;
    }
    // GGML_ANE_INT8_INPUT=1: a Q8_0 weight is staged as int8 by its group (`super::int8`); fp16
    // rows converted for it would never be taken and hold budget.
    if crate::config::Config::get().int8_input && super::int8::q8_0_2d(m) {
        return 0;
    }
    let key = member_key(m);
    let size = (d.ne[0] * d.ne[1]) as usize * 2;
    {
        let s = staged.lock().unwrap_or_else(|e| e.into_inner());
        if s.converted.contains_key(&key) || !s.admits(size) {
            return 0;
        }
    }
    let t = Instant::now();
    let rows = Arc::new(rows_f16(m));
    add_time(&stats.ns_stage, t.elapsed());
    let mut s = staged.lock().unwrap_or_else(|e| e.into_inner());
    if s.converted.insert(key, rows).is_none() {
        s.converted_bytes += size;
    }
    s.publish(stats);
    size
}

/// Stages a group of 2-D weights (same K, in the order a dispatch stacks them) into the surface
/// its dispatches will bind, ahead of the first one. The plugin calls this from `supports_op`
/// while llama.cpp reserves its graphs at context creation, for the groups the lookahead learner
/// completes (`lookahead::Ready`), so a prompt finds its weights staged. Returns the bytes added:
/// 0 if staged already, not 2-D weights of one K, or over `staged.max_bytes` (nothing is evicted
/// for it; the first dispatch stages what did not fit).
pub fn stage_ahead(cx: &Context<'_>, members: &[Member]) -> Result<usize, EngineError> {
    let Some(first) = members.first() else {
        return Ok(0);
    };
    let k = first.src0.desc.ne[0];
    if !members.iter().all(|m| {
        let d = &m.src0.desc;
        d.ne[0] == k && d.ne[2] == 1 && d.ne[3] == 1 && !m.src0.is_null()
    }) {
        return Ok(0);
    }
    let m_total: usize = members.iter().map(|m| m.src0.desc.ne[1] as usize).sum();
    // GGML_ANE_INT8_INPUT=1 and the group takes the int8 form: staged as int8.
    if let Some(s) = super::int8::shape_for(cx, members, true, k as usize, m_total) {
        return super::int8::stage_ahead(cx, members, &s);
    }
    // The tiling `compute` uses for weights (it does not depend on the column bucket).
    let s = cx.planner.tile(k as usize, m_total, cx.planner.max_cols());
    let size = request_size(&s, cx.planner.max_cols());
    let key = stage_key(members, &s);
    let member_keys: Vec<u128> = members.iter().map(member_key).collect();
    let pre: Vec<Option<Arc<Vec<f16>>>> = {
        let mut staged = cx.staged.lock().unwrap_or_else(|e| e.into_inner());
        if staged.entries.contains_key(&key) || !staged.admits(size) {
            return Ok(0);
        }
        // Matrices converted ahead (`convert_ahead`) become part of this surface.
        member_keys
            .iter()
            .map(|k| staged.take_converted(k))
            .collect()
    };
    // Converted without the lock: other contexts' dispatches go on meanwhile.
    let t = Instant::now();
    let made = stage(cx.engine, members, 0, 0, &s, size, &pre)?;
    add_time(&cx.stats.ns_stage, t.elapsed());
    let added = made.alloc_size();
    let mut staged = cx.staged.lock().unwrap_or_else(|e| e.into_inner());
    if staged.entries.contains_key(&key) || !staged.admits(added) {
        return Ok(0); // staged by a dispatch meanwhile, or the budget filled up
    }
    staged.get_or_insert(key, || Ok::<_, EngineError>(made))?;
    staged.unused.insert(key);
    cx.stats.groups_staged_load.fetch_add(1, Relaxed);
    staged.publish(cx.stats);
    Ok(added)
}

/// Identity of a group's staged weights: its members' [`member_key`]s and the program's tiling.
pub(super) fn stage_key(members: &[Member], shape: &TiledShape) -> u128 {
    let mut h = Xxh3::new();
    for m in members {
        h.update(&member_key(m).to_le_bytes());
    }
    for v in [shape.tiles, shape.k_chunks, shape.m_tile, shape.k_chunk] {
        h.update(&v.to_le_bytes());
    }
    h.update(&[shape.layout as u8]);
    h.digest128()
}

/// Rows of a token-major `b_w` gathered before they are written transposed: one flush writes
/// runs of this many halves (64 bytes) instead of one element per row.
pub(super) const T_BLOCK: usize = 32;

/// Places converted weight rows (consecutive, from row 0) in `b_w` as the layout wants them:
/// row slices as they are (channel-first), or transposed through blocks of [`T_BLOCK`] rows of one
/// tile (token-major).
pub(super) struct WeightWriter<'a> {
    pub(super) w: &'a mut [f16],
    pub(super) s: &'a TiledShape,
    pub(super) k: usize,
    pub(super) block: Vec<f16>,
    pub(super) first: usize,
    pub(super) rows: usize,
}

impl<'a> WeightWriter<'a> {
    pub(super) fn new(w: &'a mut [f16], s: &'a TiledShape, k: usize) -> Self {
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
    pub(super) fn push(&mut self, r: usize, row16: &[f16]) {
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
    pub(super) fn flush(&mut self) {
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
pub(super) fn stage(
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
            let converted = if let Some(rows) = ready {
                // Converted at load by `convert_ahead`: a copy.
                row16.copy_from_slice(&rows[i1 * k..(i1 + 1) * k]);
                true
            } else {
                fast && ane_convert::row_to_f16(d.ty, m.src0.row_bytes(i1, i2, i3), &mut row16)
                    .is_ok()
            };
            if !converted {
                m.src0.read_row(&m.src0_info, i1, i2, i3, &mut row);
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

#[cfg(test)]
mod resident_tests {
    use super::*;

    fn surface(bytes: usize) -> Result<Surface, ()> {
        Ok(Surface::new(bytes))
    }

    #[test]
    fn groups_beyond_the_budget_stream_without_evicting_the_resident_ones() {
        let one = Surface::new(4096).alloc_size();
        let mut s = StagedWeights::new(one + one / 2);
        let a = s.get_or_insert(1, || surface(4096)).unwrap();
        assert_eq!(s.bytes(), one);
        // b does not fit: made for its dispatch, a stays.
        let b1 = s.get_or_insert(2, || surface(4096)).unwrap();
        let b2 = s.get_or_insert(2, || surface(4096)).unwrap();
        assert!(!Arc::ptr_eq(&b1, &b2), "streamed each time");
        assert!(Arc::ptr_eq(&a, &s.get_or_insert(1, || surface(1)).unwrap()));
        assert_eq!(s.streamed_bytes, 2 * one as u64);
        assert_eq!(s.bytes(), one);
        assert_eq!(
            s.peak_bytes,
            2 * one,
            "the streamed surface in flight counts"
        );
    }

    #[test]
    fn streaming_makes_room_for_a_ring_by_releasing_the_newest_entries() {
        let one = Surface::new(4096).alloc_size();
        let mut s = StagedWeights::new(5 * one);
        for k in 1..=5u128 {
            s.get_or_insert(k, || surface(4096)).unwrap();
        }
        assert_eq!(s.bytes(), 5 * one, "everything fits: no ring reserved");
        assert!(!s.admits(one));
        // A sixth group streams: two of its size must fit beside the resident set.
        assert_eq!(s.begin_stream(one), 2);
        assert!(s.entries.contains_key(&1) && s.entries.contains_key(&3));
        assert!(!s.entries.contains_key(&4) && !s.entries.contains_key(&5));
        assert_eq!(s.bytes() + s.ring_reserve(), 5 * one);
        assert_eq!(s.room(), 2 * one);
        // From now on nothing more is admitted while the ring needs the room.
        assert!(!s.admits(one));
    }

    #[test]
    fn entries_unused_for_a_whole_pass_are_released() {
        let mut s = StagedWeights::new(1 << 30);
        for k in [1u128, 2, 3] {
            s.mark_used(k);
            s.get_or_insert(k, || surface(4096)).unwrap();
        }
        // Pass 2 uses 1 and 3 only (2 belongs to a model freed since).
        assert_eq!(s.mark_used(1), 0, "pass 1 used every entry");
        s.mark_used(3);
        assert_eq!(s.mark_used(1), 1, "2 released at the end of pass 2");
        assert!(!s.entries.contains_key(&2) && s.entries.contains_key(&3));
        s.mark_used(3);
        assert_eq!(s.mark_used(1), 0);
    }
}
