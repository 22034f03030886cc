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
    /// `GGML_ANE_MOE=off|on|single`: claim MUL_MAT_ID (mixture-of-experts matmuls). Off by
    /// default until measured on a Mac. `on` runs packs of experts per dispatch where the shapes
    /// allow (`ane_plan::moe`); `single` one expert per dispatch (for comparing the two).
    pub moe: bool,
    /// `GGML_ANE_MOE=on` (not `single`): pack experts.
    pub moe_pack: bool,
    /// `GGML_ANE_PRESTAGE=0|1`: convert weights to fp16 when llama.cpp reserves its graphs (at
    /// load) instead of at their first dispatch (default 1).
    pub prestage: bool,
    /// `GGML_ANE_LOOKAHEAD=0|1`: fuse MUL_MATs that share src1 across graph splits (Q with V/K,
    /// see `lookahead`), default 1; off with compressed weights.
    pub lookahead: bool,
    /// `GGML_ANE_BRIDGE=0|1`: in prefill-sized graphs, also claim the cheap nodes between the
    /// device's own matmuls (ROPE, GLU; see `crate::bridge`), computed by the host's CPU backend,
    /// so a layer's matmuls fall into fewer graph splits (default 1).
    pub bridge: bool,
    /// `GGML_ANE_STREAM=ahead|inline`: weight groups beyond the resident set are converted one
    /// group ahead by a background thread per backend instance (`ahead`, the default; see
    /// `matmul::Streamer`) or by their own dispatch (`inline`).
    pub stream_ahead: bool,
    /// `GGML_ANE_GPU_STREAM=0|1`: beside a GPU, weights beyond the staging budget stream through
    /// the device (`1`) instead of staying with the GPU (`0`, the default: declined, `gpu_memory`).
    pub gpu_stream: bool,
    /// `GGML_ANE_GPU_SHARE=auto|F`: beside a GPU, the share of each prefill matmul's output rows
    /// the GPU computes while the device computes the rest (`crate::split`): measured per shape
    /// class (`auto`, the default), or fixed (`0`: all on the device, `1`: all on the GPU).
    pub gpu_share: GpuShare,
    /// `GGML_ANE_PREFER=speed|energy`: `energy` keeps every claimed matmul on the device (no
    /// split), whatever the GPU would gain.
    pub prefer_energy: bool,
    /// `GGML_ANE_CACHE_DIR`: where the split's calibrations are kept (default: the user's cache
    /// folder); read as given, not lower-cased.
    pub cache_dir: Option<std::path::PathBuf>,
    /// `GGML_ANE_SPLIT_TEST`: delays and failures injected into the split (tests).
    pub split_test: crate::split::SplitTest,
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
    /// `GGML_ANE_INT8_INPUT=0|1`: resident groups of Q8_0 weights staged as int8 plus fp16 block
    /// scales, dequantized in the shape-shared program (`ane_mil::build::tiled_matmul_int8`;
    /// `matmul::int8`). A probe (whether the ANE takes int8 input surfaces is unknown): used only
    /// where its canary passes on the engine, run at first use (a failure is said once and fp16
    /// is staged), said once on stderr when asked for. Off by default.
    pub int8_input: bool,
    /// `GGML_ANE_GIVE_UP=N`: after N engine failures in a row the device stops claiming MUL_MATs
    /// (the host's CPU backend takes them with no detour); `0` never gives up (tests of the
    /// fallback path). Default [`DEFAULT_GIVE_UP`].
    pub give_up: u32,
    /// `GGML_ANE_DEBUG` set (any value): log every engine failure that sent work to the CPU.
    pub debug: bool,
}

/// `GGML_ANE_GPU_SHARE`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum GpuShare {
    /// Measured per shape class, kept in the cache folder.
    Auto,
    /// The GPU's share of rows, fixed.
    Fixed(f64),
}

/// Default for `GGML_ANE_GIVE_UP`: far beyond any transient run of faults (a fault mix of 20%
/// eval errors has 1e-11 odds of 16 in a row), soon enough to cost one layer of one prompt.
pub const DEFAULT_GIVE_UP: u32 = 16;

/// Default for `GGML_ANE_MIN_BATCH`.
pub const DEFAULT_MIN_BATCH: usize = 64;
/// `GGML_ANE_STAGE_MAX_MB` when the machine's memory cannot be read: fp16 copies of an 8B
/// model's weights fit.
pub const DEFAULT_STAGE_MAX_MB: usize = ane_plan::staging::FALLBACK_BUDGET_MB as usize;

/// Default for `GGML_ANE_STAGE_MAX_MB` on a machine with `ram` bytes of physical memory
/// ([`ane_plan::staging::default_budget_mb`]: a quarter of it, shared with `ane plan --ram`).
pub fn default_stage_mb(ram: u64) -> usize {
    ane_plan::staging::default_budget_mb(ram) as usize
}

/// Physical memory in bytes (0 when unknown).
pub fn physical_memory() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let (pages, size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    if pages <= 0 || size <= 0 {
        0
    } else {
        pages as u64 * size as u64
    }
}
/// Default for `GGML_ANE_MAX_PROGRAMS`: well under the ~128 loaded-program cap of the ANE.
pub const DEFAULT_MAX_PROGRAMS: usize = 96;

/// What a knob accepts.
#[derive(Clone, Copy, Debug)]
pub enum Values {
    /// One of these words (case-insensitive).
    OneOf(&'static [&'static str]),
    /// An integer >= 1.
    Positive,
    /// An integer >= 0.
    Count,
    /// A chip name (`m1` .. `m5`).
    Chip,
    /// `key=value,...` overrides of the cost model (`ane_plan::cost`).
    Costs,
    /// The fault spec of the reference engine (`ane_engine::reference::faults`).
    Faults,
    /// Anything: the knob is on when set.
    Presence,
    /// `auto` or a fraction in `[0, 1]` (`GGML_ANE_GPU_SHARE`).
    Share,
    /// The test hooks of the split (`crate::split::SplitTest`).
    SplitTest,
}

/// One environment variable of the plugin: its name, default, and what it accepts, listed once
/// (`KNOBS`): the parser, the warnings and the README's table all follow it.
#[derive(Clone, Copy, Debug)]
pub struct Knob {
    /// `GGML_ANE_...`.
    pub name: &'static str,
    /// The value used when unset or invalid.
    pub default: &'static str,
    /// What it accepts.
    pub values: Values,
}

impl Knob {
    /// Whether `v` (trimmed) is a value this knob accepts.
    pub fn accepts(&self, v: &str) -> bool {
        match self.values {
            Values::OneOf(words) => words.iter().any(|w| w.eq_ignore_ascii_case(v)),
            Values::Positive => v.parse::<usize>().is_ok_and(|n| n >= 1),
            Values::Count => v.parse::<u32>().is_ok(),
            Values::Chip => Chip::from_str(v).is_ok(),
            Values::Costs => ane_plan::cost::chip_cost(Chip::M4)
                .with_overrides(v)
                .is_ok(),
            Values::Faults => v.parse::<FaultSpec>().is_ok(),
            Values::Presence => true,
            Values::Share => {
                v.eq_ignore_ascii_case("auto")
                    || v.parse::<f64>().is_ok_and(|x| (0.0..=1.0).contains(&x))
            }
            Values::SplitTest => v.parse::<crate::split::SplitTest>().is_ok(),
        }
    }

    /// The accepted values, for warnings.
    pub fn describe(&self) -> String {
        match self.values {
            Values::OneOf(words) => words.join(", "),
            Values::Positive => "an integer >= 1".into(),
            Values::Count => "an integer >= 0".into(),
            Values::Chip => "m1, m2, m3, m4, m5".into(),
            Values::Costs => "key=value,... (dispatch_ms, peak_tflops, half_gflop, sram_bytes, \
                compile_ms, load_ms, cpu_tflops, matmul_penalty)"
                .into(),
            Values::Faults => "compile=P,load=P,eval=P,alloc=P,exception=P[,seed=S]".into(),
            Values::Presence => "any value".into(),
            Values::Share => "auto, or the GPU's share of rows from 0 to 1".into(),
            Values::SplitTest => "gpu_ms=N,ane_ms=N,gpu_fail=0|1".into(),
        }
    }

    /// The value to use: the variable's (trimmed, lower-cased) when it is accepted, else the
    /// default, with one warning naming the variable, what it accepts and the default.
    fn read(&self, get: &dyn Fn(&str) -> Option<String>, warn: &mut dyn FnMut(String)) -> String {
        match get(self.name) {
            Some(v) if self.accepts(v.trim()) => v.trim().to_ascii_lowercase(),
            Some(v) => {
                warn(format!(
                    "ggml-ane: ignoring {}={v:?} (valid: {}); using {}",
                    self.name,
                    self.describe(),
                    if self.default.is_empty() {
                        "none"
                    } else {
                        self.default
                    }
                ));
                self.default.to_string()
            }
            None => self.default.to_string(),
        }
    }
}

/// What `GGML_ANE_INT8_INPUT=1` prints once: the form is a probe, used only where its canary
/// passes, and the stats say whether it did.
pub const INT8_INPUT_NOTE: &str = "ggml-ane: GGML_ANE_INT8_INPUT=1: int8 weights as a program \
    input are a probe (`ane doctor`: canary_int8_input); resident Q8_0 weight groups are staged \
    as int8 only if its canary passes on this engine (stats: int8_canary, int8_groups)";

/// Every environment variable the plugin reads.
pub const KNOBS: [Knob; 26] = [
    Knob {
        name: "GGML_ANE_ENGINE",
        default: "auto",
        values: Values::OneOf(&["auto", "ane", "coreml", "reference"]),
    },
    Knob {
        name: "GGML_ANE_MIN_BATCH",
        default: "64",
        values: Values::Positive,
    },
    Knob {
        name: "GGML_ANE_STATS",
        default: "0",
        values: Values::OneOf(&["0", "1", "json", ""]),
    },
    Knob {
        name: "GGML_ANE_CHIP",
        default: "m4",
        values: Values::Chip,
    },
    Knob {
        name: "GGML_ANE_MAX_PROGRAMS",
        default: "96",
        values: Values::Positive,
    },
    Knob {
        name: "GGML_ANE_STAGE_MAX_MB",
        default: "",
        values: Values::Positive,
    },
    Knob {
        name: "GGML_ANE_LAYOUT",
        default: "tokens",
        values: Values::OneOf(&["tokens", "channels"]),
    },
    Knob {
        name: "GGML_ANE_ACT_ROUND",
        default: "cpu",
        values: Values::OneOf(&["cpu", "off"]),
    },
    Knob {
        name: "GGML_ANE_MOE",
        default: "off",
        values: Values::OneOf(&["off", "on", "single"]),
    },
    Knob {
        name: "GGML_ANE_PRESTAGE",
        default: "1",
        values: Values::OneOf(&["1", "0"]),
    },
    Knob {
        name: "GGML_ANE_LOOKAHEAD",
        default: "1",
        values: Values::OneOf(&["1", "0"]),
    },
    Knob {
        name: "GGML_ANE_BRIDGE",
        default: "1",
        values: Values::OneOf(&["1", "0"]),
    },
    Knob {
        name: "GGML_ANE_GPU_STREAM",
        default: "0",
        values: Values::OneOf(&["0", "1"]),
    },
    Knob {
        name: "GGML_ANE_STREAM",
        default: "ahead",
        values: Values::OneOf(&["ahead", "inline"]),
    },
    Knob {
        name: "GGML_ANE_GPU_SHARE",
        default: "auto",
        values: Values::Share,
    },
    Knob {
        name: "GGML_ANE_PREFER",
        default: "speed",
        values: Values::OneOf(&["speed", "energy"]),
    },
    Knob {
        name: "GGML_ANE_CACHE_DIR",
        default: "",
        values: Values::Presence,
    },
    Knob {
        name: "GGML_ANE_SPLIT_TEST",
        default: "",
        values: Values::SplitTest,
    },
    Knob {
        name: "GGML_ANE_ROUTE",
        default: "batch",
        values: Values::OneOf(&["batch", "cost"]),
    },
    Knob {
        name: "GGML_ANE_COST",
        default: "",
        values: Values::Costs,
    },
    Knob {
        name: "GGML_ANE_FAULTS",
        default: "",
        values: Values::Faults,
    },
    Knob {
        name: "GGML_ANE_REF_ACCUM",
        default: "fp32",
        values: Values::OneOf(&["fp32", "fp16"]),
    },
    Knob {
        name: "GGML_ANE_WEIGHTS",
        default: "fp16",
        values: Values::OneOf(&["fp16", "compressed"]),
    },
    Knob {
        name: "GGML_ANE_INT8_INPUT",
        default: "0",
        values: Values::OneOf(&["0", "1"]),
    },
    Knob {
        name: "GGML_ANE_GIVE_UP",
        default: "16",
        values: Values::Count,
    },
    Knob {
        name: "GGML_ANE_DEBUG",
        default: "",
        values: Values::Presence,
    },
];

impl Config {
    /// Reads the settings through `get` (the environment in production, a map in tests); warnings go
    /// to `warn`.
    pub fn from_lookup(
        get: impl Fn(&str) -> Option<String>,
        mut warn: impl FnMut(String),
    ) -> Config {
        let mut read = |name: &str| -> String {
            let knob = KNOBS
                .iter()
                .find(|k| k.name == name)
                .expect("a knob of KNOBS");
            knob.read(&get, &mut warn)
        };
        let engine = match read("GGML_ANE_ENGINE").as_str() {
            "ane" => EngineChoice::Ane,
            "coreml" => EngineChoice::CoreMl,
            "reference" => EngineChoice::Reference,
            _ => EngineChoice::Auto,
        };
        let min_batch = read("GGML_ANE_MIN_BATCH")
            .parse()
            .unwrap_or(DEFAULT_MIN_BATCH);
        let max_programs = read("GGML_ANE_MAX_PROGRAMS")
            .parse()
            .unwrap_or(DEFAULT_MAX_PROGRAMS);
        let layout = match read("GGML_ANE_LAYOUT").as_str() {
            "channels" => ane_plan::Layout::Channels,
            _ => ane_plan::Layout::Tokens,
        };
        let act_round = read("GGML_ANE_ACT_ROUND") == "cpu";
        let moe_pack = read("GGML_ANE_MOE") == "on";
        let moe = moe_pack || read("GGML_ANE_MOE") == "single";
        let prestage = read("GGML_ANE_PRESTAGE") == "1";
        let lookahead = read("GGML_ANE_LOOKAHEAD") == "1";
        let bridge = read("GGML_ANE_BRIDGE") == "1";
        let stream_ahead = read("GGML_ANE_STREAM") != "inline";
        let gpu_stream = read("GGML_ANE_GPU_STREAM") == "1";
        let gpu_share = match read("GGML_ANE_GPU_SHARE").parse::<f64>() {
            Ok(x) => GpuShare::Fixed(x),
            Err(_) => GpuShare::Auto,
        };
        let prefer_energy = read("GGML_ANE_PREFER") == "energy";
        let cache_dir = get("GGML_ANE_CACHE_DIR")
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
            .map(std::path::PathBuf::from);
        let split_test = read("GGML_ANE_SPLIT_TEST").parse().unwrap_or_default();
        let cost = Some(read("GGML_ANE_COST")).filter(|c| !c.trim().is_empty());
        let route = match read("GGML_ANE_ROUTE").as_str() {
            "cost" => ane_plan::model::Route::Cost,
            _ => ane_plan::model::Route::Batch,
        };
        let stage_max_mb = read("GGML_ANE_STAGE_MAX_MB")
            .parse()
            .unwrap_or_else(|_| default_stage_mb(physical_memory()));
        let stats = match read("GGML_ANE_STATS").as_str() {
            "1" => StatsMode::Table,
            "json" => StatsMode::Json,
            _ => StatsMode::Off,
        };
        let chip = read("GGML_ANE_CHIP").parse().unwrap_or(Chip::M4);
        let ref_accum = match read("GGML_ANE_REF_ACCUM").as_str() {
            "fp16" => Accum::Fp16,
            _ => Accum::Fp32,
        };
        let weights = match read("GGML_ANE_WEIGHTS").as_str() {
            "compressed" => WeightsMode::Compressed,
            _ => WeightsMode::Fp16,
        };
        let int8_input = read("GGML_ANE_INT8_INPUT") == "1";
        let give_up = read("GGML_ANE_GIVE_UP").parse().unwrap_or(DEFAULT_GIVE_UP);
        let faults = read("GGML_ANE_FAULTS")
            .parse::<FaultSpec>()
            .ok()
            .filter(FaultSpec::any);
        let debug = get("GGML_ANE_DEBUG").is_some();
        if int8_input {
            warn(INT8_INPUT_NOTE.to_string());
        }
        Config {
            engine,
            min_batch,
            stats,
            chip,
            max_programs,
            stage_max_mb,
            layout,
            act_round,
            moe,
            moe_pack,
            prestage,
            lookahead: lookahead && weights == WeightsMode::Fp16,
            bridge,
            stream_ahead,
            gpu_stream,
            gpu_share,
            prefer_energy,
            cache_dir,
            split_test,
            route,
            cost,
            faults,
            ref_accum,
            weights,
            int8_input,
            give_up,
            debug,
        }
    }

    /// The process-wide settings, read on first use.
    pub fn get() -> &'static Config {
        static CONFIG: OnceLock<Config> = OnceLock::new();
        CONFIG.get_or_init(|| Config::from_lookup(|k| std::env::var(k).ok(), |w| eprintln!("{w}")))
    }
}

#[cfg(test)]
mod tests;
