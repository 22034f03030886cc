//! The kernel cache: loaded programs by shape (and baked programs by weight), bounded, LRU.

use super::*;

/// Loaded programs keyed by shape, bounded, least recently used evicted first. Baked programs
/// (compressed weights, [`crate::baked`]) share the bound: they are keyed by weight identity and
/// column bucket, and evicting one frees its compressed weight bytes.
#[derive(Debug)]
pub struct KernelCache {
    pub(super) entries: HashMap<TiledShape, (ProgramId, u64)>,
    pub(super) failed: HashMap<TiledShape, EngineError>,
    pub(crate) baked: HashMap<(u128, usize), (ProgramId, u64, usize)>,
    pub(crate) baked_failed: HashMap<(u128, usize), EngineError>,
    /// Compressed weight bytes held by the loaded baked programs.
    pub(crate) baked_bytes: usize,
    /// `GGML_ANE_WEIGHTS=compressed`: single Q8_0/Q4_0 weights run as baked programs.
    pub(crate) compressed: bool,
    pub(super) tick: u64,
    pub(super) max: usize,
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

    pub(super) fn get_or_compile(
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
