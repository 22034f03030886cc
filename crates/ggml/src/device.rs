//! The device state every backend instance of the `ANE` device shares: engine, planner, kernel
//! cache, staged weights, stats, health; created once, on first use.

use std::sync::{Arc, Mutex, OnceLock};

use ane_engine::Engine;

use crate::config::{self, Config};
use crate::matmul::{self, KernelCache, ScratchPool, StagedWeights};
use crate::stats::Stats;
use crate::support::Policy;
use crate::{ggml, health, host_cpu, lookahead, open};
use ane_plan::Planner;

/// Everything one `ANE` device shares across its backend instances (threads may call at once).
pub struct DeviceState {
    pub(crate) engine: Arc<dyn Engine>,
    pub(crate) planner: Planner,
    pub(crate) cache: Mutex<KernelCache>,
    pub(crate) staged: Mutex<StagedWeights>,
    pub(crate) scratch: Mutex<ScratchPool>,
    pub(crate) stats: Stats,
    pub(crate) policy: Policy,
    /// Which weights share activations across splits (see [`lookahead`]).
    pub(crate) learner: Mutex<lookahead::Learner>,
    /// Published costs of the engine's chip (`GGML_ANE_ROUTE=cost`).
    pub(crate) cost: ane_plan::cost::ChipCost,
    /// Whether the device gave up after a run of engine failures.
    pub(crate) health: health::Health,
    /// Expert tensors admitted against the staging budget (`GGML_ANE_MOE`).
    pub(crate) experts: Mutex<crate::claim::ClaimBudget>,
    /// Weights in a GPU's buffers admitted against the staging budget (the rest stay with the
    /// GPU, `gpu_memory`).
    pub(crate) gpu_weights: Mutex<crate::claim::ClaimBudget>,
    /// Host copies of weights read through ggml's API (llama.cpp's RPC backend).
    pub(crate) weight_copies: crate::view::fetch::WeightCopies,
    /// Shares and calibrations of the split with the GPU.
    pub(crate) splitter: crate::split::Splitter,
    /// `GGML_ANE_INT8_INPUT=1`: whether the int8-weight form's canary passed (run at first use).
    pub(crate) int8: matmul::Int8Gate,
}

impl DeviceState {
    /// What the compute paths need of the device.
    pub(crate) fn matmul_cx(&self) -> matmul::Context<'_> {
        matmul::Context {
            engine: self.engine.as_ref(),
            planner: &self.planner,
            cache: &self.cache,
            staged: &self.staged,
            scratch: &self.scratch,
            stats: &self.stats,
            health: &self.health,
            host: None,
            act_round: Config::get().act_round,
            stream: None,
            int8: Config::get().int8_input.then_some(&self.int8),
        }
    }
}

/// One backend instance (a llama context): what must not be shared with other instances.
pub(crate) struct BackendCtx {
    /// Speculated outputs of this instance's graphs.
    pub(crate) stash: Mutex<lookahead::Stash>,
    /// The host's CPU backend, for this instance's fallbacks (with the host's thread count).
    pub(crate) host: host_cpu::HostCpu,
    /// The GPU's backend, for the GPU's rows of split matmuls (`crate::split`).
    pub(crate) gpu: crate::host_gpu::HostGpu,
    /// The streaming ring for weight groups beyond the resident set (the instance's model only:
    /// dropped, and its thread joined, when llama.cpp frees the context, before the model).
    pub(crate) stream: matmul::Streamer,
}

impl BackendCtx {
    /// An instance of the device `dev`.
    pub(crate) fn new(dev: &DeviceState) -> Self {
        let ring = dev
            .staged
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .ring
            .clone();
        BackendCtx {
            stash: Default::default(),
            host: Default::default(),
            gpu: Default::default(),
            stream: matmul::Streamer::new(dev.engine.clone(), ring, Config::get().stream_ahead),
        }
    }
}

/// The device state, or why there is none. Created on first use, never in `ggml_backend_score`'s
/// hot path more than once.
pub(crate) fn device_state() -> Result<&'static DeviceState, &'static str> {
    static STATE: OnceLock<Result<DeviceState, String>> = OnceLock::new();
    STATE
        .get_or_init(|| {
            let cfg = Config::get();
            if ggml::ggml().is_none() {
                return Err("ggml-base symbols not found in this process".into());
            }
            let engine = open::open_engine(cfg).map_err(|e| e.to_string())?;
            Ok(DeviceState {
                policy: Policy {
                    min_batch: cfg.min_batch,
                },
                planner: Planner {
                    layout: cfg.layout,
                    ..Planner::new(engine.limits())
                },
                cache: Mutex::new(
                    KernelCache::new(cfg.max_programs.min(engine.limits().max_loaded_programs))
                        .compressed(cfg.weights == config::WeightsMode::Compressed),
                ),
                staged: Mutex::new(StagedWeights::new(cfg.stage_max_mb.saturating_mul(1 << 20))),
                scratch: Mutex::new(ScratchPool::default()),
                health: health::Health::new(cfg.give_up),
                gpu_weights: Mutex::new(crate::claim::ClaimBudget::new(
                    (cfg.stage_max_mb as u64).saturating_mul(1 << 20),
                )),
                experts: Mutex::new(crate::claim::ClaimBudget::new(
                    ane_plan::moe::expert_budget((cfg.stage_max_mb as u64).saturating_mul(1 << 20)),
                )),
                cost: {
                    let published = ane_plan::cost::chip_cost(engine.chip());
                    // Validated when the configuration was read.
                    cfg.cost
                        .as_deref()
                        .and_then(|s| published.with_overrides(s).ok())
                        .unwrap_or(published)
                },
                engine,
                stats: {
                    let s = Stats::default();
                    s.stage_budget_bytes.store(
                        (cfg.stage_max_mb as u64).saturating_mul(1 << 20),
                        std::sync::atomic::Ordering::Relaxed,
                    );
                    s
                },
                learner: Mutex::default(),
                weight_copies: Default::default(),
                splitter: Default::default(),
                int8: matmul::Int8Gate::new(),
            })
        })
        .as_ref()
        .map_err(|s| s.as_str())
}
