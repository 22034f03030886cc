//! The kernel cache: loaded programs by [`ProgramKey`] (shape-shared programs by shape, baked
//! programs by weight and column bucket), bounded, least recently used first.

use super::*;
pub use ane_plan::model::ProgramKey;

/// A loaded program.
#[derive(Debug, Clone, Copy)]
struct Loaded {
    id: ProgramId,
    tick: u64,
    /// Weight bytes compiled into it (baked programs; 0 for shape-shared ones).
    weight_bytes: usize,
}

/// Loaded programs, bounded, least recently used unloaded first. Baked programs (compressed
/// weights, [`crate::baked`]) share the bound with the shape-shared ones; evicting one frees its
/// compressed weight bytes.
#[derive(Debug)]
pub struct KernelCache {
    loaded: HashMap<ProgramKey, Loaded>,
    /// Compile failures, remembered: the same program fails again.
    failed: HashMap<ProgramKey, EngineError>,
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
            loaded: HashMap::new(),
            failed: HashMap::new(),
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
        self.loaded.len()
    }

    /// True when nothing is loaded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Unloads least recently used programs until one more fits.
    fn make_room(&mut self, engine: &dyn Engine) {
        while self.loaded.len() >= self.max {
            let Some((&key, &old)) = self.loaded.iter().min_by_key(|(_, l)| l.tick) else {
                break;
            };
            self.loaded.remove(&key);
            self.baked_bytes -= old.weight_bytes;
            engine.unload(old.id);
        }
    }

    /// The remembered compile failure of `shape`, if any: a dispatch of it would fail again, so
    /// [`compute`] sends its columns to the CPU before converting anything, and the repeat does
    /// not count as a new engine failure ([`crate::health`]): a shape the compiler rejects is not
    /// a device that stopped working.
    pub(crate) fn known_failure(&self, shape: &TiledShape) -> Option<EngineError> {
        self.known_failure_of(&ProgramKey::Tiled(*shape))
    }

    /// The remembered compile failure of the program `key`, if any (see
    /// [`KernelCache::known_failure`]).
    pub(crate) fn known_failure_of(&self, key: &ProgramKey) -> Option<EngineError> {
        self.failed.get(key).cloned()
    }

    /// The int8-weight program of `shape` ([`ane_mil::build::tiled_matmul_int8`], keyed apart
    /// from the fp16 program of the same shape), compiled on a miss.
    pub(crate) fn get_or_compile_int8(
        &mut self,
        engine: &dyn Engine,
        shape: TiledShape,
        stats: &Stats,
    ) -> Result<ProgramId, EngineError> {
        self.program(engine, ProgramKey::TiledInt8(shape), stats, || {
            (
                ane_mil::text::emit(&ane_mil::build::tiled_matmul_int8(shape)),
                Vec::new(),
            )
        })
    }

    /// The shape-shared program of `shape`, compiled on a miss.
    pub(crate) fn get_or_compile(
        &mut self,
        engine: &dyn Engine,
        shape: TiledShape,
        stats: &Stats,
    ) -> Result<ProgramId, EngineError> {
        self.program(engine, ProgramKey::Tiled(shape), stats, || {
            (
                ane_mil::text::emit(&ane_mil::build::tiled_matmul(shape)),
                Vec::new(),
            )
        })
    }

    /// The program of `key`, made by `make` (MIL text and weight files) and compiled on a miss.
    pub(crate) fn program(
        &mut self,
        engine: &dyn Engine,
        key: ProgramKey,
        stats: &Stats,
        make: impl FnOnce() -> (String, Vec<ane_engine::WeightFile>),
    ) -> Result<ProgramId, EngineError> {
        use std::sync::atomic::Ordering::Relaxed;
        self.tick += 1;
        if let Some(l) = self.loaded.get_mut(&key) {
            l.tick = self.tick;
            stats.cache_hits.fetch_add(1, Relaxed);
            return Ok(l.id);
        }
        if let Some(e) = self.failed.get(&key) {
            // A program that failed to compile fails again; don't pay for it on every call.
            return Err(e.clone());
        }
        stats.cache_misses.fetch_add(1, Relaxed);
        self.make_room(engine);
        let (mil, weights) = make();
        let weight_bytes: usize = weights.iter().map(|w| w.bytes.len()).sum();
        let r = match engine.compile(&mil, &weights) {
            Ok(id) => {
                stats.count_placement(engine, id);
                self.loaded.insert(
                    key,
                    Loaded {
                        id,
                        tick: self.tick,
                        weight_bytes,
                    },
                );
                self.baked_bytes += weight_bytes;
                Ok(id)
            }
            Err(e) => {
                // Compile failures are deterministic on the ANE (the same text fails again), so
                // they are remembered; budget and load failures are transient (§5.2, §5.3) and
                // the next call tries again. The reference engine's injected compile faults are
                // random but remembered all the same: they stand for a shape the compiler rejects.
                if !matches!(e, EngineError::Budget { .. } | EngineError::Load(_)) {
                    self.failed.insert(key, e.clone());
                }
                Err(e)
            }
        };
        stats.baked_bytes.store(self.baked_bytes as u64, Relaxed);
        r
    }

    /// Unloads everything.
    pub fn clear(&mut self, engine: &dyn Engine) {
        for (_, l) in self.loaded.drain() {
            engine.unload(l.id);
        }
        self.baked_bytes = 0;
    }
}
