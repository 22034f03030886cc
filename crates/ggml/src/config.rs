//! Settings read once from the environment.
//!
//! A plugin inside someone else's process must not fail on a typo: a malformed value gives one
//! warning on stderr naming the variable and the default used instead.

use std::str::FromStr;
use std::sync::OnceLock;

use ane_engine::reference::{faults::FaultSpec, Accum};
use ane_engine::Chip;

/// Which engine the plugin uses (`GGML_ANE_ENGINE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineChoice {
    /// The private ANE API when its canaries pass, else Core ML when its canaries pass and its
    /// compute plan puts the matmul on the Neural Engine; otherwise the plugin declines (score 0).
    Auto,
    /// The private ANE API or nothing.
    Ane,
    /// Core ML (`CPUAndNeuralEngine`) or nothing.
    CoreMl,
    /// The CPU reference engine (tests, and Linux).
    Reference,
}

/// How stats are printed at backend free (`GGML_ANE_STATS`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatsMode {
    /// Nothing (default).
    Off,
    /// A human-readable table on stderr.
    Table,
    /// One line `ggml-ane-stats: {...}` on stderr.
    Json,
}

/// How weights reach the ANE (`GGML_ANE_WEIGHTS`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WeightsMode {
    /// Converted to fp16 and fed to the shape-shared programs (default).
    #[default]
    Fp16,
    /// A lone Q8_0/Q4_0 weight stays compressed in a program baked for it
    /// (`constexpr_blockwise_shift_scale`); opt-in until measured on hardware.
    Compressed,
}

/// Every setting of the plugin.
#[derive(Clone, Debug)]
pub struct Config {
    /// `GGML_ANE_ENGINE=auto|ane|coreml|reference`.
    pub engine: EngineChoice,
    /// `GGML_ANE_MIN_BATCH`: smallest token batch (src1 columns) the plugin claims. Decode (1 token)
    /// stays on the CPU/GPU, where one dispatch's fixed cost would dominate.
    pub min_batch: usize,
    /// `GGML_ANE_STATS=1|json`.
    pub stats: StatsMode,
    /// `GGML_ANE_CHIP=m1..m5`: limits the reference engine enforces (default m4).
    pub chip: Chip,
    /// `GGML_ANE_MAX_PROGRAMS`: loaded programs kept at once (LRU beyond). The ANE fails past ~128.
    pub max_programs: usize,
    /// `GGML_ANE_STAGE_MAX_MB`: cap on weights kept converted to fp16 (LRU beyond).
    pub stage_max_mb: usize,
    /// `GGML_ANE_LAYOUT=channels|tokens`: where tokens sit in the programs' activations (see
    /// `ane_mil::build::Layout`); token-major by default: host conversions are plain copies and the
    /// matmul has the operand layout of the weights-as-input matmul measured on an M4.
    pub layout: ane_plan::Layout,
    /// `GGML_ANE_ACT_ROUND=cpu|off`: round activations as llama.cpp's CPU backend does for each
    /// weight type (Q8_0, Q8_1, Q8_K or bf16) before converting them to fp16, so the device
    /// multiplies the values the CPU multiplies (default `cpu`); `off`: plain fp16.
    pub act_round: bool,
    /// `GGML_ANE_PRESTAGE=0|1`: convert weights to fp16 when llama.cpp reserves its graphs (at
    /// load) instead of at their first dispatch (default 1).
    pub prestage: bool,
    /// `GGML_ANE_LOOKAHEAD=0|1`: fuse MUL_MATs that share src1 across graph splits (Q with V/K,
    /// see `lookahead`), default 1; off with compressed weights.
    pub lookahead: bool,
    /// `GGML_ANE_ROUTE=batch|cost`: claim every supported MUL_MAT of at least `min_batch` tokens
    /// (default), or only those the cost model estimates faster on the ANE than on the CPU.
    pub route: ane_plan::model::Route,
    /// `GGML_ANE_COST="key=value,..."`: measured costs replacing the chip's published ones
    /// (`ane_plan::cost::ChipCost::with_overrides`); `None` when unset or malformed.
    pub cost: Option<String>,
    /// `GGML_ANE_FAULTS="compile=P,load=P,eval=P,alloc=P,exception=P[,seed=S]"`: failures the reference engine
    /// injects (tests of the fallback path). `None` when unset, all zero or malformed.
    pub faults: Option<FaultSpec>,
    /// `GGML_ANE_REF_ACCUM=fp32|fp16`: the reference engine's matmul accumulation (fp16 models the
    /// ANE's accuracy loss at large K; see docs/accuracy.md).
    pub ref_accum: Accum,
    /// `GGML_ANE_WEIGHTS=fp16|compressed` (see [`WeightsMode`]).
    pub weights: WeightsMode,
    /// `GGML_ANE_GIVE_UP=N`: after N engine failures in a row the device stops claiming MUL_MATs
    /// (the host's CPU backend takes them with no detour); `0` never gives up (tests of the
    /// fallback path). Default [`DEFAULT_GIVE_UP`].
    pub give_up: u32,
    /// `GGML_ANE_DEBUG` set (any value): log every engine failure that sent work to the CPU.
    pub debug: bool,
}

/// Default for `GGML_ANE_GIVE_UP`: far beyond any transient run of faults (a fault mix of 20%
/// eval errors has 1e-11 odds of 16 in a row), soon enough to cost one layer of one prompt.
pub const DEFAULT_GIVE_UP: u32 = 16;

/// Default for `GGML_ANE_MIN_BATCH`.
pub const DEFAULT_MIN_BATCH: usize = 64;
/// Default for `GGML_ANE_STAGE_MAX_MB`: fp16 copies of an 8B model's weights fit.
pub const DEFAULT_STAGE_MAX_MB: usize = 16384;
/// Default for `GGML_ANE_MAX_PROGRAMS`: well under the ~128 loaded-program cap of the ANE.
pub const DEFAULT_MAX_PROGRAMS: usize = 96;

impl Config {
    /// Reads the settings through `get` (the environment in production, a map in tests); warnings go
    /// to `warn`.
    pub fn from_lookup(
        get: impl Fn(&str) -> Option<String>,
        mut warn: impl FnMut(String),
    ) -> Config {
        let mut parse = |name: &str, default: &str, ok: &dyn Fn(&str) -> bool| -> String {
            match get(name) {
                Some(v) if ok(v.trim()) => v.trim().to_ascii_lowercase(),
                Some(v) => {
                    warn(format!(
                        "ggml-ane: ignoring {name}={v:?} (invalid); using {default}"
                    ));
                    default.to_string()
                }
                None => default.to_string(),
            }
        };
        let engine = match parse("GGML_ANE_ENGINE", "auto", &|v| {
            matches!(
                v.to_ascii_lowercase().as_str(),
                "auto" | "ane" | "coreml" | "reference"
            )
        })
        .as_str()
        {
            "ane" => EngineChoice::Ane,
            "coreml" => EngineChoice::CoreMl,
            "reference" => EngineChoice::Reference,
            _ => EngineChoice::Auto,
        };
        let positive = |v: &str| v.parse::<usize>().is_ok_and(|n| n >= 1);
        let min_batch = parse(
            "GGML_ANE_MIN_BATCH",
            &DEFAULT_MIN_BATCH.to_string(),
            &positive,
        )
        .parse()
        .unwrap_or(DEFAULT_MIN_BATCH);
        let max_programs = parse(
            "GGML_ANE_MAX_PROGRAMS",
            &DEFAULT_MAX_PROGRAMS.to_string(),
            &positive,
        )
        .parse()
        .unwrap_or(DEFAULT_MAX_PROGRAMS);
        let layout = match parse("GGML_ANE_LAYOUT", "tokens", &|v| {
            matches!(v.to_ascii_lowercase().as_str(), "channels" | "tokens")
        })
        .as_str()
        {
            "channels" => ane_plan::Layout::Channels,
            _ => ane_plan::Layout::Tokens,
        };
        let act_round = parse("GGML_ANE_ACT_ROUND", "cpu", &|v| {
            matches!(v.to_ascii_lowercase().as_str(), "cpu" | "off")
        }) == "cpu";
        let prestage = parse("GGML_ANE_PRESTAGE", "1", &|v| matches!(v, "0" | "1")) == "1";
        let lookahead = parse("GGML_ANE_LOOKAHEAD", "1", &|v| matches!(v, "0" | "1")) == "1";
        let cost = parse("GGML_ANE_COST", "", &|v| {
            ane_plan::cost::chip_cost(Chip::M4)
                .with_overrides(v)
                .is_ok()
        });
        let cost = (!cost.trim().is_empty()).then_some(cost);
        let route = match parse("GGML_ANE_ROUTE", "batch", &|v| {
            matches!(v.to_ascii_lowercase().as_str(), "batch" | "cost")
        })
        .to_ascii_lowercase()
        .as_str()
        {
            "cost" => ane_plan::model::Route::Cost,
            _ => ane_plan::model::Route::Batch,
        };
        let stage_max_mb = parse(
            "GGML_ANE_STAGE_MAX_MB",
            &DEFAULT_STAGE_MAX_MB.to_string(),
            &positive,
        )
        .parse()
        .unwrap_or(DEFAULT_STAGE_MAX_MB);
        let stats = match parse("GGML_ANE_STATS", "0", &|v| {
            matches!(v.to_ascii_lowercase().as_str(), "0" | "1" | "json" | "")
        })
        .as_str()
        {
            "1" => StatsMode::Table,
            "json" => StatsMode::Json,
            _ => StatsMode::Off,
        };
        let chip = parse("GGML_ANE_CHIP", "m4", &|v| Chip::from_str(v).is_ok())
            .parse()
            .unwrap_or(Chip::M4);
        let ref_accum = match parse("GGML_ANE_REF_ACCUM", "fp32", &|v| {
            matches!(v.to_ascii_lowercase().as_str(), "fp32" | "fp16")
        })
        .as_str()
        {
            "fp16" => Accum::Fp16,
            _ => Accum::Fp32,
        };
        let weights = match parse("GGML_ANE_WEIGHTS", "fp16", &|v| {
            matches!(v.to_ascii_lowercase().as_str(), "fp16" | "compressed")
        })
        .as_str()
        {
            "compressed" => WeightsMode::Compressed,
            _ => WeightsMode::Fp16,
        };
        let give_up = parse("GGML_ANE_GIVE_UP", &DEFAULT_GIVE_UP.to_string(), &|v| {
            v.parse::<u32>().is_ok()
        })
        .parse()
        .unwrap_or(DEFAULT_GIVE_UP);
        let faults = match get("GGML_ANE_FAULTS") {
            None => None,
            Some(v) => match v.parse::<FaultSpec>() {
                Ok(f) => f.any().then_some(f),
                Err(e) => {
                    warn(format!(
                        "ggml-ane: ignoring GGML_ANE_FAULTS={v:?} ({e}); injecting no faults"
                    ));
                    None
                }
            },
        };
        Config {
            engine,
            min_batch,
            stats,
            chip,
            max_programs,
            stage_max_mb,
            layout,
            act_round,
            prestage,
            lookahead: lookahead && weights == WeightsMode::Fp16,
            route,
            cost,
            faults,
            ref_accum,
            weights,
            give_up,
            debug: get("GGML_ANE_DEBUG").is_some(),
        }
    }

    /// The process-wide settings, read on first use.
    pub fn get() -> &'static Config {
        static CONFIG: OnceLock<Config> = OnceLock::new();
        CONFIG.get_or_init(|| Config::from_lookup(|k| std::env::var(k).ok(), |w| eprintln!("{w}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn cfg(pairs: &[(&str, &str)]) -> (Config, Vec<String>) {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut warnings = Vec::new();
        let c = Config::from_lookup(|k| map.get(k).cloned(), |w| warnings.push(w));
        (c, warnings)
    }

    #[test]
    fn defaults() {
        let (c, w) = cfg(&[]);
        assert_eq!(c.engine, EngineChoice::Auto);
        assert_eq!(c.min_batch, 64);
        assert_eq!(c.stats, StatsMode::Off);
        assert_eq!(c.chip, Chip::M4);
        assert_eq!(c.max_programs, 96);
        assert_eq!(c.weights, WeightsMode::Fp16);
        assert_eq!(c.give_up, DEFAULT_GIVE_UP);
        assert!(w.is_empty());
        let (c, w) = cfg(&[("GGML_ANE_GIVE_UP", "0")]);
        assert_eq!((c.give_up, w.len()), (0, 0));
        let (c, w) = cfg(&[("GGML_ANE_GIVE_UP", "-1")]);
        assert_eq!((c.give_up, w.len()), (DEFAULT_GIVE_UP, 1));
        let (c, w) = cfg(&[("GGML_ANE_WEIGHTS", "Compressed")]);
        assert_eq!((c.weights, w.len()), (WeightsMode::Compressed, 0));
        let (c, w) = cfg(&[("GGML_ANE_WEIGHTS", "q4")]);
        assert_eq!((c.weights, w.len()), (WeightsMode::Fp16, 1));
    }

    #[test]
    fn values_are_read() {
        let (c, w) = cfg(&[
            ("GGML_ANE_ENGINE", "Reference"),
            ("GGML_ANE_MIN_BATCH", "1"),
            ("GGML_ANE_STATS", "json"),
            ("GGML_ANE_CHIP", "m1"),
            ("GGML_ANE_MAX_PROGRAMS", "8"),
        ]);
        assert_eq!(c.engine, EngineChoice::Reference);
        assert_eq!(
            (c.min_batch, c.stats, c.chip, c.max_programs),
            (1, StatsMode::Json, Chip::M1, 8)
        );
        assert!(w.is_empty());
    }

    #[test]
    fn bad_values_warn_once_each_and_default() {
        let (c, w) = cfg(&[
            ("GGML_ANE_ENGINE", "gpu"),
            ("GGML_ANE_MIN_BATCH", "0"),
            ("GGML_ANE_CHIP", "m9"),
        ]);
        assert_eq!(c.engine, EngineChoice::Auto);
        assert_eq!(c.min_batch, 64);
        assert_eq!(c.chip, Chip::M4);
        assert_eq!(w.len(), 3);
        assert!(w[0].contains("GGML_ANE_ENGINE"));
    }

    #[test]
    fn routing_costs_and_lookahead() {
        let (c, w) = cfg(&[]);
        assert_eq!(c.route, ane_plan::model::Route::Batch);
        assert!(c.lookahead && c.cost.is_none() && w.is_empty());
        let (c, w) = cfg(&[
            ("GGML_ANE_ROUTE", "Cost"),
            ("GGML_ANE_COST", "dispatch_ms=0.01,matmul_penalty=1"),
            ("GGML_ANE_LOOKAHEAD", "0"),
        ]);
        assert_eq!(c.route, ane_plan::model::Route::Cost);
        assert_eq!(c.cost.as_deref(), Some("dispatch_ms=0.01,matmul_penalty=1"));
        assert!(!c.lookahead && w.is_empty());
        let (c, w) = cfg(&[("GGML_ANE_COST", "speed=3"), ("GGML_ANE_ROUTE", "gpu")]);
        assert!(c.cost.is_none());
        assert_eq!(c.route, ane_plan::model::Route::Batch);
        assert_eq!(w.len(), 2);
        // Compressed weights turn the lookahead off.
        let (c, _) = cfg(&[("GGML_ANE_WEIGHTS", "compressed")]);
        assert!(!c.lookahead);
    }

    #[test]
    fn faults_and_accumulation() {
        let (c, w) = cfg(&[
            ("GGML_ANE_FAULTS", "compile=0.3,load=0.1,eval=0.2,seed=9"),
            ("GGML_ANE_REF_ACCUM", "FP16"),
        ]);
        let f = c.faults.expect("parsed");
        assert_eq!(
            (f.compile, f.load, f.eval, f.alloc, f.seed),
            (0.3, 0.1, 0.2, 0.0, 9)
        );
        assert_eq!(c.ref_accum, Accum::Fp16);
        assert!(w.is_empty());
        let (c, w) = cfg(&[]);
        assert_eq!((c.faults, c.ref_accum), (None, Accum::Fp32));
        assert!(w.is_empty());
        let (c, w) = cfg(&[
            ("GGML_ANE_FAULTS", "compile=30%"),
            ("GGML_ANE_REF_ACCUM", "bf16"),
        ]);
        assert_eq!((c.faults, c.ref_accum), (None, Accum::Fp32));
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].contains("GGML_ANE_FAULTS") || w[1].contains("GGML_ANE_FAULTS"));
    }
}
