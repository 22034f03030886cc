//! Helpers shared by the tests of the compute modules (unit tests and `tests/`): a device around
//! the reference engine, F32 traits and descriptions, reproducible data.

use std::sync::Mutex;

use ane_engine::reference::ReferenceEngine;
use ane_engine::Engine;
use ane_plan::Planner;

use crate::ffi::GGML_TYPE_F32;
use crate::ggml::TypeInfo;
use crate::matmul::{Context, KernelCache, ScratchPool, StagedWeights};
use crate::stats::Stats;
use crate::support::TensorDesc;

/// Traits of F32 (no `to_float` needed: the plugin reads plain types itself).
pub const F32_INFO: TypeInfo = TypeInfo {
    blck_size: 1,
    type_size: 4,
    to_float: None,
};

/// `n` pseudo-random values in [-1, 1) from `seed` (xorshift, reproducible).
pub fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed ^ 0x9e37_79b9_7f4a_7c15;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32
        })
        .collect()
}

/// A contiguous F32 tensor description.
pub fn f32_desc(ne: [i64; 4]) -> TensorDesc {
    TensorDesc::contiguous(GGML_TYPE_F32, 4, ne)
}

/// What the plugin's device holds around one engine (planner, kernel cache, staged weights,
/// scratch surfaces, stats), for tests that call the compute paths directly; each module's test
/// rig derefs to one.
pub struct Device<E: Engine = ReferenceEngine> {
    pub engine: E,
    pub planner: Planner,
    pub cache: Mutex<KernelCache>,
    pub staged: Mutex<StagedWeights>,
    pub scratch: Mutex<ScratchPool>,
    pub stats: Stats,
    pub health: crate::health::Health,
    /// `Context::act_round` (off: the rigs check the device's own numerics).
    pub act_round: bool,
}

impl<E: Engine> Device<E> {
    /// A device with a 1 GiB staging cap and `cache`.
    pub fn new(engine: E, cache: KernelCache) -> Self {
        Device {
            planner: Planner::new(engine.limits()),
            engine,
            cache: Mutex::new(cache),
            staged: Mutex::new(StagedWeights::new(1 << 30)),
            scratch: Mutex::new(ScratchPool::default()),
            stats: Stats::default(),
            health: crate::health::Health::new(0),
            act_round: false,
        }
    }

    /// The compute context over all of it.
    pub fn cx(&self) -> Context<'_> {
        Context {
            engine: &self.engine,
            planner: &self.planner,
            cache: &self.cache,
            staged: &self.staged,
            scratch: &self.scratch,
            stats: &self.stats,
            health: &self.health,
            host: None,
            act_round: self.act_round,
            stream: None,
            int8: None,
        }
    }
}
