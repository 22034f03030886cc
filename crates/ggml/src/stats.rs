//! Counters the plugin keeps and prints at backend free (`GGML_ANE_STATS=1|json`).
//!
//! They answer the user's first question, "did my matmuls run on the ANE?", and let tests compare
//! compile counts with what the planner promised.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use ane_engine::EngineCounters;

use crate::support::Decline;

/// Process-wide counters of one device (shared by all its backend instances).
#[derive(Debug, Default)]
pub struct Stats {
    /// MUL_MATs computed through the engine (each expert product of a MUL_MAT_ID counts as one).
    pub ops_offloaded: AtomicU64,
    /// MUL_MAT_ID nodes (mixture-of-experts matmuls) computed by the device.
    pub mul_mat_id_ops: AtomicU64,
    /// Expert products those nodes took (one MUL_MAT each, on the engine or its fallback).
    pub mul_mat_id_experts: AtomicU64,
    /// Dispatches that ran a pack of several experts (`ane_plan::moe`).
    pub mul_mat_id_packs: AtomicU64,
    /// Bridge ops (ROPE, GLU between the device's matmuls, `crate::bridge`) computed in the
    /// device's splits by the host's CPU backend.
    pub bridge_ops: AtomicU64,
    /// MUL_MATs computed by the device and the GPU together (`crate::split`).
    pub split_ops: AtomicU64,
    /// Work (rows x K x N) of split MUL_MATs, and the part the GPU computed.
    pub split_work_total: AtomicU64,
    /// See `split_work_total`.
    pub split_work_gpu: AtomicU64,
    /// GPU parts that failed (their rows computed by the CPU).
    pub split_gpu_failures: AtomicU64,
    /// Shape classes measured for the split in this process.
    pub split_calibrations: AtomicU64,
    /// Calibrations known at exit (class, device ms, GPU ms, GPU share), with how many were
    /// measured here and how many read from the cache folder; filled before printing.
    pub calibrations: std::sync::Mutex<(Vec<crate::split::Calibration>, usize, usize)>,
    /// Bytes of weights copied to the host through ggml's tensor API (llama.cpp's RPC backend),
    /// held for the process.
    pub weight_copies_bytes: AtomicU64,
    /// MUL_MATs (or parts) computed by the plugin's own CPU path after an engine failure.
    pub ops_fallback: AtomicU64,
    /// Fallback computations run by the host's own CPU backend (`crate::host_cpu`): one per
    /// graph of views handed to it.
    pub fallback_cpu_backend: AtomicU64,
    /// Fallback computations run by the plugin's own loop (no CPU backend, or it declined).
    pub fallback_own: AtomicU64,
    /// 1 once the device gave up after a run of engine failures (`crate::health`).
    pub gave_up: AtomicU64,
    /// MUL_MATs computed as members of a fused group (sharing one dispatch with others).
    pub ops_fused: AtomicU64,
    /// Dispatches whose program has row tiles or contraction slices (axes beyond the chip limit).
    pub dispatches_tiled: AtomicU64,
    /// Engine dispatches (evaluations).
    pub dispatches: AtomicU64,
    /// MUL_MATs written from outputs computed in an earlier split's dispatch (`crate::lookahead`).
    pub lookahead_hits: AtomicU64,
    /// Speculated outputs never taken (their MUL_MAT did not come, or came on another path).
    pub lookahead_wasted: AtomicU64,
    /// Speculated outputs refused because src1, the weight or the shape differed.
    pub lookahead_mismatch: AtomicU64,
    /// Dispatches whose columns were recomputed on the CPU because an input was out of fp16 range
    /// or an output was non-finite or past the matmul output cliff (see `guard`).
    pub guard_trips: AtomicU64,
    /// Kernel cache hits / misses.
    pub cache_hits: AtomicU64,
    /// Kernel cache misses (compiles requested).
    pub cache_misses: AtomicU64,
    /// `supports_op` declines of MUL_MAT, by [`Decline::index`].
    pub declined: [AtomicU64; Decline::ALL.len()],
    /// `supports_op` calls for MUL_MATs the plugin would claim but whose weight is in a buffer it
    /// cannot read (`CPU_REPACK`, GPU memory): see [`crate::placement`].
    pub declined_buft: AtomicU64,
    /// Nanoseconds converting inputs, weights and outputs on the host.
    pub ns_convert: AtomicU64,
    /// Nanoseconds inside the engine (compile, load, evaluate).
    pub ns_engine: AtomicU64,
    /// Nanoseconds in the CPU fallback.
    pub ns_fallback: AtomicU64,
    /// Nanoseconds converting weights to staged fp16 surfaces (part of `ns_convert`).
    pub ns_stage: AtomicU64,
    /// Weight groups staged at load (`supports_op`, `matmul::stage_ahead`).
    pub groups_staged_load: AtomicU64,
    /// Weight groups staged by a dispatch (not staged at load, or evicted since).
    pub groups_staged_dispatch: AtomicU64,
    /// Groups staged at load and released unused after a pass over the model
    /// (`StagedWeights::mark_used`).
    pub groups_released: AtomicU64,
    /// Bytes of staged weight surfaces held now.
    pub staged_bytes: AtomicU64,
    /// `GGML_ANE_STAGE_MAX_MB` in bytes (the staging budget).
    pub stage_budget_bytes: AtomicU64,
    /// The most staged bytes held at once (a streamed surface in flight included).
    pub staged_peak_bytes: AtomicU64,
    /// Bytes of weight surfaces converted for one dispatch only (groups beyond the budget).
    pub stream_bytes: AtomicU64,
    /// Nanoseconds dispatches waited for those conversions.
    pub convert_wait_ns: AtomicU64,
    /// Streamed groups the background thread had converted before their dispatch asked.
    pub stream_ahead: AtomicU64,
    /// `GGML_ANE_INT8_INPUT=1`: the int8-input canary, run at first use
    /// (`matmul::INT8_CANARY_NOT_RUN`, `_PASS`, `_FAIL`).
    pub int8_canary: AtomicU64,
    /// Weight groups staged as int8 plus block scales (`GGML_ANE_INT8_INPUT=1`).
    pub int8_groups: AtomicU64,
    /// Dispatches of the int8-weight program.
    pub int8_dispatches: AtomicU64,
    /// Compressed weight bytes (`weight.bin` files) held by loaded baked programs
    /// (`GGML_ANE_WEIGHTS=compressed`).
    pub baked_bytes: AtomicU64,
    /// MUL_MATs this device computed, by the name of their src0 (weights are named
    /// `blk.N.attn_q.weight` etc.): "where each matmul ran", for the table and the JSON.
    pub by_weight: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
    /// Operations of the compiled programs by the device the engine placed them on (Core ML's
    /// compute plan; empty for engines that cannot tell).
    pub op_placement: std::sync::Mutex<std::collections::BTreeMap<&'static str, u64>>,
}

/// How one engine fared when the plugin opened (`ane_plan::choice`), for stats `engine_choice`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attempt {
    /// `ane` or `coreml`.
    pub engine: &'static str,
    /// Whether it was chosen.
    pub chosen: bool,
    /// Why not, or a note on the chosen one.
    pub detail: Option<String>,
}

impl From<&ane_plan::choice::Attempt> for Attempt {
    fn from(a: &ane_plan::choice::Attempt) -> Self {
        Attempt {
            engine: a.kind.name(),
            chosen: a.outcome.is_ok(),
            detail: a.outcome.clone().err().or_else(|| a.note.clone()),
        }
    }
}

/// The int8-input canary's outcome as the stats name it: `not_run`, `pass` or `fail`.
fn int8_canary_name(v: u64) -> &'static str {
    match v {
        crate::matmul::INT8_CANARY_PASS => "pass",
        crate::matmul::INT8_CANARY_FAIL => "fail",
        _ => "not_run",
    }
}

/// Adds a duration to a nanosecond counter.
pub fn add_time(c: &AtomicU64, d: Duration) {
    c.fetch_add(d.as_nanos() as u64, Relaxed);
}

impl Stats {
    /// The GPU's share of the split MUL_MATs' work (0 when nothing was split).
    pub fn gpu_share(&self) -> f64 {
        let t = self.split_work_total.load(Relaxed);
        if t == 0 {
            0.0
        } else {
            self.split_work_gpu.load(Relaxed) as f64 / t as f64
        }
    }

    fn calibrations_json(&self) -> serde_json::Value {
        let c = self.calibrations.lock().unwrap_or_else(|e| e.into_inner());
        serde_json::json!({
            "measured": c.1,
            "reused": c.2,
            "classes": c.0.iter().map(|k| serde_json::json!({
                "class": k.class,
                "ane_ms": k.ane_ms,
                "gpu_ms": if k.gpu_ms.is_finite() { k.gpu_ms } else { -1.0 },
                "share": k.share,
            })).collect::<Vec<_>>(),
        })
    }

    /// Counts where the operations of a freshly compiled program run, when the engine can tell.
    pub fn count_placement(&self, engine: &dyn ane_engine::Engine, id: ane_engine::ProgramId) {
        let Some(ops) = engine.op_placement(id) else {
            return;
        };
        let mut m = self.op_placement.lock().unwrap_or_else(|e| e.into_inner());
        for (device, n) in ane_engine::coreml_plan::count_by_device(&ops) {
            *m.entry(device.name()).or_insert(0) += n as u64;
        }
    }

    /// Counts one MUL_MAT computed by this device, by src0 name (unnamed tensors are grouped).
    pub fn count_weight(&self, name: &str) {
        let key = if name.is_empty() { "(unnamed)" } else { name };
        let mut m = self.by_weight.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry(key.to_string()).or_insert(0) += 1;
    }

    /// The stats as one JSON object (the `ggml-ane-stats:` line).
    pub fn to_json(
        &self,
        engine: &str,
        e: EngineCounters,
        choice: &[Attempt],
    ) -> serde_json::Value {
        let ms = |c: &AtomicU64| c.load(Relaxed) as f64 / 1e6;
        let declined: serde_json::Map<String, serde_json::Value> = Decline::ALL
            .iter()
            .map(|d| {
                (
                    d.name().to_string(),
                    self.declined[d.index()].load(Relaxed).into(),
                )
            })
            .collect();
        serde_json::json!({
            "engine": engine,
            "engine_choice": choice
                .iter()
                .map(|a| serde_json::json!({"engine": a.engine, "chosen": a.chosen, "detail": a.detail}))
                .collect::<Vec<_>>(),
            "op_placement": self.op_placement.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            "compiled_models_reused": e.cache_reused,
            "ops_offloaded": self.ops_offloaded.load(Relaxed),
            "mul_mat_id_ops": self.mul_mat_id_ops.load(Relaxed),
            "mul_mat_id_experts": self.mul_mat_id_experts.load(Relaxed),
            "mul_mat_id_packs": self.mul_mat_id_packs.load(Relaxed),
            "bridge_ops": self.bridge_ops.load(Relaxed),
            "split_ops": self.split_ops.load(Relaxed),
            "gpu_share": self.gpu_share(),
            "split_gpu_failures": self.split_gpu_failures.load(Relaxed),
            "calibrations": self.calibrations_json(),
            "weight_copies_mb": self.weight_copies_bytes.load(Relaxed) as f64 / (1 << 20) as f64,
            "ops_fallback": self.ops_fallback.load(Relaxed),
            "ops_fused": self.ops_fused.load(Relaxed),
            "fallback_cpu_backend": self.fallback_cpu_backend.load(Relaxed),
            "fallback_own": self.fallback_own.load(Relaxed),
            "gave_up": self.gave_up.load(Relaxed),
            "dispatches": self.dispatches.load(Relaxed),
            "dispatches_tiled": self.dispatches_tiled.load(Relaxed),
            "lookahead_hits": self.lookahead_hits.load(Relaxed),
            "lookahead_wasted": self.lookahead_wasted.load(Relaxed),
            "lookahead_mismatch": self.lookahead_mismatch.load(Relaxed),
            "guard_trips": self.guard_trips.load(Relaxed),
            "faults_injected": e.faults_injected,
            "engine_exceptions": e.exceptions,
            "compile_attempts": e.compile_attempts,
            "programs_shared": e.shared,
            "declined": declined,
            "declined_buft": self.declined_buft.load(Relaxed),
            "cache_hits": self.cache_hits.load(Relaxed),
            "cache_misses": self.cache_misses.load(Relaxed),
            "programs_compiled": e.compiles,
            "programs_loaded": e.loaded,
            "programs_loaded_peak": e.loaded_peak,
            "mb_copied": e.bytes_copied as f64 / (1u64 << 20) as f64,
            "ms_convert": ms(&self.ns_convert),
            "ms_engine": ms(&self.ns_engine),
            "ms_fallback": ms(&self.ns_fallback),
            "ms_stage": ms(&self.ns_stage),
            "groups_staged_load": self.groups_staged_load.load(Relaxed),
            "groups_staged_dispatch": self.groups_staged_dispatch.load(Relaxed),
            "groups_released": self.groups_released.load(Relaxed),
            "by_weight": self.by_weight.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            "staged_mb": self.staged_bytes.load(Relaxed) as f64 / (1u64 << 20) as f64,
            "stage_budget_mb": self.stage_budget_bytes.load(Relaxed) as f64 / (1u64 << 20) as f64,
            "staged_peak_mb": self.staged_peak_bytes.load(Relaxed) as f64 / (1u64 << 20) as f64,
            "stream_mb": self.stream_bytes.load(Relaxed) as f64 / (1u64 << 20) as f64,
            "convert_wait_ms": self.convert_wait_ns.load(Relaxed) as f64 / 1e6,
            "stream_ahead": self.stream_ahead.load(Relaxed),
            "int8_canary": int8_canary_name(self.int8_canary.load(Relaxed)),
            "int8_groups": self.int8_groups.load(Relaxed),
            "int8_dispatches": self.int8_dispatches.load(Relaxed),
            "baked_mb": self.baked_bytes.load(Relaxed) as f64 / (1u64 << 20) as f64,
        })
    }

    /// The stats as a small table for people.
    pub fn to_table(&self, engine: &str, e: EngineCounters, choice: &[Attempt]) -> String {
        let ms = |c: &AtomicU64| c.load(Relaxed) as f64 / 1e6;
        let mut s = String::new();
        s.push_str(&format!("ggml-ane stats (engine: {engine})\n"));
        for a in choice.iter().filter(|a| !a.chosen) {
            s.push_str(&format!(
                "  not used: {} ({})\n",
                a.engine,
                a.detail.as_deref().unwrap_or("")
            ));
        }
        let placed = self.op_placement.lock().unwrap_or_else(|e| e.into_inner());
        if !placed.is_empty() {
            let parts: Vec<String> = placed.iter().map(|(d, n)| format!("{n} on {d}")).collect();
            s.push_str(&format!(
                "  program ops placed       {}\n",
                parts.join(", ")
            ));
        }
        drop(placed);
        s.push_str(&format!(
            "  MUL_MAT on ANE device    {:>10}\n",
            self.ops_offloaded.load(Relaxed)
        ));
        if self.mul_mat_id_ops.load(Relaxed) > 0 {
            s.push_str(&format!(
                "  MUL_MAT_ID (experts)     {:>10} ({} expert products, {} pack dispatches)\n",
                self.mul_mat_id_ops.load(Relaxed),
                self.mul_mat_id_experts.load(Relaxed),
                self.mul_mat_id_packs.load(Relaxed)
            ));
        }
        if self.bridge_ops.load(Relaxed) > 0 {
            s.push_str(&format!(
                "  bridge ops (ROPE, GLU)   {:>10} (by the host's CPU backend, in the device's splits)\n",
                self.bridge_ops.load(Relaxed)
            ));
        }
        if self.split_ops.load(Relaxed) > 0 {
            s.push_str(&format!(
                "  split with the GPU       {:>10} MUL_MATs, GPU share of the work {:.2} ({} GPU parts failed)\n",
                self.split_ops.load(Relaxed),
                self.gpu_share(),
                self.split_gpu_failures.load(Relaxed)
            ));
        }
        {
            let c = self.calibrations.lock().unwrap_or_else(|e| e.into_inner());
            if !c.0.is_empty() {
                s.push_str(&format!(
                    "  split calibrations       {:>10} ({} measured here, {} from the cache)\n",
                    c.0.len(),
                    c.1,
                    c.2
                ));
                for k in &c.0 {
                    s.push_str(&format!(
                        "    {:<32} device {:.2} ms, GPU {:.2} ms, GPU share {}\n",
                        k.class, k.ane_ms, k.gpu_ms, k.share
                    ));
                }
            }
        }
        if self.weight_copies_bytes.load(Relaxed) > 0 {
            s.push_str(&format!(
                "  weights copied from GPU  {:>10.1} MiB (read through ggml's API, e.g. RPC)\n",
                self.weight_copies_bytes.load(Relaxed) as f64 / (1 << 20) as f64
            ));
        }
        s.push_str(&format!(
            "  MUL_MAT CPU fallback     {:>10}\n",
            self.ops_fallback.load(Relaxed)
        ));
        s.push_str(&format!(
            "  ... by CPU backend / own {:>10} / {}\n",
            self.fallback_cpu_backend.load(Relaxed),
            self.fallback_own.load(Relaxed)
        ));
        if self.gave_up.load(Relaxed) > 0 {
            s.push_str("  device gave up after repeated engine failures (GGML_ANE_GIVE_UP)\n");
        }
        s.push_str(&format!(
            "  MUL_MAT in fused groups  {:>10}\n",
            self.ops_fused.load(Relaxed)
        ));
        s.push_str(&format!(
            "  engine dispatches        {:>10}\n",
            self.dispatches.load(Relaxed)
        ));
        s.push_str(&format!(
            "  ... of them tiled        {:>10}\n",
            self.dispatches_tiled.load(Relaxed)
        ));
        s.push_str(&format!(
            "  taken from lookahead     {:>10} (wasted {}, refused {})\n",
            self.lookahead_hits.load(Relaxed),
            self.lookahead_wasted.load(Relaxed),
            self.lookahead_mismatch.load(Relaxed)
        ));
        s.push_str(&format!(
            "  numeric guard trips      {:>10}\n",
            self.guard_trips.load(Relaxed)
        ));
        if e.faults_injected > 0 {
            s.push_str(&format!(
                "  engine faults injected   {:>10}\n",
                e.faults_injected
            ));
        }
        if e.exceptions > 0 {
            s.push_str(&format!(
                "  Objective-C exceptions   {:>10}\n",
                e.exceptions
            ));
        }
        s.push_str(&format!("  programs compiled        {:>10}\n", e.compiles));
        s.push_str(&format!(
            "  MiB copied to/from engine{:>10.1}\n",
            e.bytes_copied as f64 / (1u64 << 20) as f64
        ));
        s.push_str(&format!(
            "  programs loaded (peak)   {:>10}\n",
            e.loaded_peak
        ));
        s.push_str(&format!(
            "  kernel cache hits/misses {:>10} / {}\n",
            self.cache_hits.load(Relaxed),
            self.cache_misses.load(Relaxed)
        ));
        s.push_str("  MUL_MAT declined (supports_op calls, by reason):\n");
        for d in Decline::ALL {
            let n = self.declined[d.index()].load(Relaxed);
            if n > 0 {
                s.push_str(&format!("    {:<22} {:>10}\n", d.name(), n));
            }
        }
        let buft = self.declined_buft.load(Relaxed);
        if buft > 0 {
            s.push_str(&format!("    {:<22} {:>10}\n", "declined_buft", buft));
        }
        s.push_str(&format!(
            "  time ms: convert {:.3}, engine {:.3}, fallback {:.3}\n",
            ms(&self.ns_convert),
            ms(&self.ns_engine),
            ms(&self.ns_fallback)
        ));
        s.push_str(&format!(
            "  staged weights: {:.1} MiB, {:.3} ms to convert; groups staged at load {}, by a \
             dispatch {}, released unused {}\n",
            self.staged_bytes.load(Relaxed) as f64 / (1u64 << 20) as f64,
            ms(&self.ns_stage),
            self.groups_staged_load.load(Relaxed),
            self.groups_staged_dispatch.load(Relaxed),
            self.groups_released.load(Relaxed)
        ));
        let mb = |a: &AtomicU64| a.load(Relaxed) as f64 / (1u64 << 20) as f64;
        s.push_str(&format!(
            "  staging budget {:.0} MiB, peak {:.1} MiB; streamed {:.1} MiB (groups beyond the \
             budget, converted per dispatch; {} groups converted ahead), {:.3} ms waited\n",
            mb(&self.stage_budget_bytes),
            mb(&self.staged_peak_bytes),
            mb(&self.stream_bytes),
            self.stream_ahead.load(Relaxed),
            self.convert_wait_ns.load(Relaxed) as f64 / 1e6
        ));
        let canary8 = self.int8_canary.load(Relaxed);
        if canary8 != crate::matmul::INT8_CANARY_NOT_RUN {
            s.push_str(&format!(
                "  int8 weights (GGML_ANE_INT8_INPUT): canary {}, {} groups staged as int8, {} \
                 dispatches\n",
                int8_canary_name(canary8),
                self.int8_groups.load(Relaxed),
                self.int8_dispatches.load(Relaxed)
            ));
        }
        let baked = self.baked_bytes.load(Relaxed);
        if baked > 0 {
            s.push_str(&format!(
                "  baked compressed weights: {:.1} MiB\n",
                baked as f64 / (1u64 << 20) as f64
            ));
        }
        let by = self.by_weight.lock().unwrap_or_else(|e| e.into_inner());
        if !by.is_empty() {
            s.push_str(
                "  MUL_MATs computed by the ANE device, by weight (the rest ran elsewhere):\n",
            );
            for (name, n) in by.iter().take(64) {
                s.push_str(&format!("    {name:<40} {n:>8}\n"));
            }
            if by.len() > 64 {
                s.push_str(&format!("    ... and {} more\n", by.len() - 64));
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_has_the_documented_fields() {
        let s = Stats::default();
        s.ops_offloaded.fetch_add(3, Relaxed);
        s.declined[Decline::SmallBatch.index()].fetch_add(2, Relaxed);
        s.declined_buft.fetch_add(5, Relaxed);
        s.op_placement.lock().unwrap().insert("neural_engine", 6);
        let choice = [
            Attempt {
                engine: "ane",
                chosen: false,
                detail: Some("the canary program failed: compile failed: x".into()),
            },
            Attempt {
                engine: "coreml",
                chosen: true,
                detail: None,
            },
        ];
        let j = s.to_json(
            "coreml",
            EngineCounters {
                compiles: 4,
                loaded_peak: 2,
                cache_reused: 1,
                ..Default::default()
            },
            &choice,
        );
        assert_eq!(j["engine_choice"][0]["engine"], "ane");
        assert_eq!(j["engine_choice"][0]["chosen"], false);
        assert_eq!(j["engine_choice"][1]["chosen"], true);
        assert_eq!(j["op_placement"]["neural_engine"], 6);
        assert_eq!(j["compiled_models_reused"], 1);
        assert_eq!(j["ops_offloaded"], 3);
        assert_eq!(j["declined"]["small_batch"], 2);
        assert_eq!(j["declined_buft"], 5);
        assert_eq!(j["programs_compiled"], 4);
        assert_eq!(j["programs_loaded_peak"], 2);
        for k in [
            "ops_fallback",
            "lookahead_hits",
            "lookahead_wasted",
            "lookahead_mismatch",
            "guard_trips",
            "faults_injected",
            "engine_exceptions",
            "compile_attempts",
            "programs_shared",
            "mb_copied",
            "ms_convert",
            "ms_engine",
            "ms_fallback",
            "fallback_cpu_backend",
            "fallback_own",
            "gave_up",
            "engine",
        ] {
            assert!(j.get(k).is_some(), "{k}");
        }
        let t = s.to_table("coreml", EngineCounters::default(), &choice);
        assert!(t.contains("small_batch"));
        assert!(
            t.contains("not used: ane (the canary program failed"),
            "{t}"
        );
        assert!(t.contains("6 on neural_engine"), "{t}");
    }

    /// `GGML_ANE_INT8_INPUT`: the canary's outcome and the int8 counters, in both forms; the table
    /// says nothing of int8 while its canary has not run.
    #[test]
    fn int8_counters_in_json_and_table() {
        let s = Stats::default();
        let e = EngineCounters::default();
        assert_eq!(s.to_json("reference", e, &[])["int8_canary"], "not_run");
        assert!(!s.to_table("reference", e, &[]).contains("int8"));
        s.int8_canary
            .store(crate::matmul::INT8_CANARY_PASS, Relaxed);
        s.int8_groups.fetch_add(120, Relaxed);
        s.int8_dispatches.fetch_add(360, Relaxed);
        let j = s.to_json("reference", e, &[]);
        assert_eq!(
            (&j["int8_canary"], &j["int8_groups"], &j["int8_dispatches"]),
            (&"pass".into(), &120.into(), &360.into())
        );
        let t = s.to_table("reference", e, &[]);
        assert!(
            t.contains("canary pass, 120 groups staged as int8, 360 dispatches"),
            "{t}"
        );
        s.int8_canary
            .store(crate::matmul::INT8_CANARY_FAIL, Relaxed);
        assert_eq!(s.to_json("reference", e, &[])["int8_canary"], "fail");
    }
}
