//! Where a tensor's memory is and how the plugin may read it: the rules, as pure functions over
//! plain facts about a buffer type (its name, host flag, device and registry), so that each one is
//! tested on Linux with fake buffer types. [`crate::placement`] reads the facts through ggml.
//!
//! Three ways in, and everything else declined, never guessed:
//!
//! * **Host** memory (`is_host`: the CPU buffer type, `-ngl 0` runs): read and written through
//!   the tensor's `data`.
//! * **A GPU's weights-only buffer over host memory**: Metal's `MTL<n>_Mapped`, which wraps the
//!   mmapped model file and, whenever mmap is on, holds every Metal layer's weights and nothing
//!   else (`ggml-metal.cpp:462`, `:743-751`; `llama-model.cpp:1856-1905`). Metal says
//!   `is_host = false` for it, but on Apple Silicon its tensors' `data` are host addresses, and
//!   weights never change, so they are read in place, with no wait on the GPU. Only tensors of a
//!   buffer whose usage is WEIGHTS, inside the buffer's range. Metal's other types are refused:
//!   `MTL<n>` (shared) also holds activations and the KV cache, and accepting it would stop the
//!   scheduler copying activations to the plugin, which is what drains Metal's command buffer
//!   before they are read (`ggml-backend.cpp:1939-1948`); `MTL<n>_Private` is not host memory at
//!   all (a fake base address).
//! * **Through ggml's tensor API** (`ggml_backend_tensor_get`/`_set`): llama.cpp's RPC backend,
//!   the GPU-typed backend on Linux. Its one buffer type holds weights and activations, `data` is
//!   a server address (never dereferenced), and its transport runs every call in order, so a read
//!   after the graph that wrote a tensor sees the result. Weights are copied once; activations per
//!   graph. Other backends' APIs are not trusted to order reads after their own work (Metal's
//!   shared `get_tensor` is a plain memcpy with no wait), so no other type gets this road.

/// `enum ggml_backend_dev_type` (`ggml/include/ggml-backend.h:136-147`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DevKind {
    Cpu,
    Gpu,
    Igpu,
    Accel,
    Meta,
    Other(i32),
}

impl DevKind {
    /// From the C enum value.
    pub fn from_ggml(t: i32) -> DevKind {
        match t {
            0 => DevKind::Cpu,
            1 => DevKind::Gpu,
            2 => DevKind::Igpu,
            3 => DevKind::Accel,
            4 => DevKind::Meta,
            o => DevKind::Other(o),
        }
    }
}

/// What ggml says of a buffer type, read once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuftFacts {
    /// `ggml_backend_buft_name`.
    pub name: String,
    /// `ggml_backend_buft_is_host`.
    pub is_host: bool,
    /// The buffer type's device, if it has one.
    pub device: Option<DevFacts>,
}

/// A buffer type's device: its name, type and registry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DevFacts {
    /// `ggml_backend_dev_name` (`MTL0`, `RPC0`, `CPU`).
    pub name: String,
    pub kind: DevKind,
    /// `ggml_backend_reg_name` of its registry (`MTL`, `RPC[host:port]`, `CPU`).
    pub reg: String,
}

/// How the plugin may read tensors of a buffer type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Residence {
    /// Host memory: through `data`.
    Host,
    /// A GPU's weights-only buffer over host memory (Metal's `MTL<n>_Mapped`): weights through
    /// `data`, in place.
    MappedWeights,
    /// Only through `ggml_backend_tensor_get`/`_set` (llama.cpp's RPC backend).
    Api,
    /// Not readable by the plugin: why, as the user should hear it.
    Declined(Unreadable),
}

/// Why a buffer type is declined.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unreadable {
    /// A CPU extra buffer type (`CPU_REPACK`, `AMX`, `KLEIDIAI`): re-laid-out for the CPU.
    Repacked { buft: String },
    /// Metal's shared type `MTL<n>`: weights land there when the model is loaded without mmap
    /// (`--load-mode none`/`dio`; `--no-mmap` in older llama.cpp).
    GpuShared { buft: String, device: String },
    /// Metal's private type `MTL<n>_Private`: GPU-only memory.
    GpuPrivate { buft: String, device: String },
    /// Any other device's memory.
    Other { buft: String, device: String },
}

/// `MTL<digits>` followed by `suffix`, returning the digits' part `MTL<digits>`.
fn metal_name<'a>(name: &'a str, suffix: &str) -> Option<&'a str> {
    let dev = name.strip_suffix(suffix)?;
    let digits = dev.strip_prefix("MTL")?;
    (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())).then_some(dev)
}

/// Whether `d` is a Metal GPU named `dev`.
fn is_metal(d: &DevFacts, dev: &str) -> bool {
    d.reg == "MTL" && d.name == dev && matches!(d.kind, DevKind::Gpu | DevKind::Igpu)
}

/// Whether `d` is a device of llama.cpp's RPC backend and `buft` its buffer type
/// (`RPC<n>[host:port]`, `ggml-rpc.cpp:1094`).
fn is_rpc(d: &DevFacts, buft: &str) -> bool {
    (d.reg == "RPC" || d.reg.starts_with("RPC["))
        && d.kind == DevKind::Gpu
        && d.name.starts_with("RPC")
        && buft
            .strip_prefix(d.name.as_str())
            .is_some_and(|rest| rest.starts_with('['))
}

/// How tensors of the buffer type described by `f` may be read.
pub fn classify(f: &BuftFacts) -> Residence {
    if f.is_host {
        return Residence::Host;
    }
    let buft = f.name.clone();
    let Some(d) = &f.device else {
        return Residence::Declined(Unreadable::Other {
            buft,
            device: "?".into(),
        });
    };
    let device = d.name.clone();
    if d.kind == DevKind::Cpu {
        return Residence::Declined(Unreadable::Repacked { buft });
    }
    if metal_name(&f.name, "_Mapped").is_some_and(|dev| is_metal(d, dev)) {
        return Residence::MappedWeights;
    }
    if metal_name(&f.name, "_Private").is_some_and(|dev| is_metal(d, dev)) {
        return Residence::Declined(Unreadable::GpuPrivate { buft, device });
    }
    if metal_name(&f.name, "").is_some_and(|dev| is_metal(d, dev)) {
        return Residence::Declined(Unreadable::GpuShared { buft, device });
    }
    if is_rpc(d, &f.name) {
        return Residence::Api;
    }
    Residence::Declined(Unreadable::Other { buft, device })
}

/// What one tensor of a buffer of residence `r` is to the plugin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Read (and, for outputs, written) through `data`.
    Direct,
    /// Copied in (and out) through ggml's tensor API.
    Api,
    /// Not to be touched.
    No,
}

/// How the plugin may read a MUL_MAT's weight (`src0`) in a buffer of residence `r`: `weights`
/// when the buffer's usage is WEIGHTS, `inside` when the tensor's bytes lie inside the buffer's
/// range. A mapped GPU buffer is read in place only for weights inside it; through the API only
/// weights are copied (the copy is kept, so it must be immutable).
pub fn weight_access(r: &Residence, weights: bool, inside: bool) -> Access {
    match r {
        Residence::Host => Access::Direct,
        Residence::MappedWeights if weights && inside => Access::Direct,
        Residence::Api if weights => Access::Api,
        _ => Access::No,
    }
}

/// How the plugin may read an activation (or write an output) in a buffer of residence `r`:
/// never in a GPU's mapped weights buffer (activations never live there; the scheduler copies
/// them out of Metal's other types).
pub fn activation_access(r: &Residence) -> Access {
    match r {
        Residence::Host => Access::Direct,
        Residence::Api => Access::Api,
        _ => Access::No,
    }
}

/// Whether `supports_buft` accepts the buffer type: the scheduler then leaves tensors of it where
/// they are for the plugin (`ggml-backend.cpp:1177-1196`), so only types the plugin reads.
pub fn accepts(r: &Residence) -> bool {
    !matches!(r, Residence::Declined(_))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buft(name: &str, is_host: bool, dev: Option<(&str, DevKind, &str)>) -> BuftFacts {
        BuftFacts {
            name: name.into(),
            is_host,
            device: dev.map(|(n, kind, reg)| DevFacts {
                name: n.into(),
                kind,
                reg: reg.into(),
            }),
        }
    }

    fn metal(name: &str) -> BuftFacts {
        buft(name, false, Some(("MTL0", DevKind::Gpu, "MTL")))
    }

    #[test]
    fn host_buffers_are_read_directly() {
        let cpu = buft("CPU", true, Some(("CPU", DevKind::Cpu, "CPU")));
        assert_eq!(classify(&cpu), Residence::Host);
        // Host-ness alone decides, whichever device the type belongs to (Metal's host type).
        let h = buft("MTL0_Host", true, Some(("MTL0", DevKind::Gpu, "MTL")));
        assert_eq!(classify(&h), Residence::Host);
        assert_eq!(
            weight_access(&Residence::Host, false, false),
            Access::Direct
        );
        assert_eq!(activation_access(&Residence::Host), Access::Direct);
    }

    #[test]
    fn metal_mapped_weights_are_read_in_place_and_nothing_else_of_metal() {
        let r = classify(&metal("MTL0_Mapped"));
        assert_eq!(r, Residence::MappedWeights);
        assert!(accepts(&r));
        assert_eq!(weight_access(&r, true, true), Access::Direct);
        assert_eq!(
            weight_access(&r, false, true),
            Access::No,
            "not a weights buffer"
        );
        assert_eq!(
            weight_access(&r, true, false),
            Access::No,
            "outside the buffer"
        );
        assert_eq!(activation_access(&r), Access::No);
        let shared = classify(&metal("MTL0"));
        assert!(matches!(
            shared,
            Residence::Declined(Unreadable::GpuShared { .. })
        ));
        assert!(!accepts(&shared));
        let private = classify(&metal("MTL0_Private"));
        assert!(matches!(
            private,
            Residence::Declined(Unreadable::GpuPrivate { .. })
        ));
        assert_eq!(weight_access(&private, true, true), Access::No);
        // Second GPU.
        let r = classify(&buft(
            "MTL1_Mapped",
            false,
            Some(("MTL1", DevKind::Igpu, "MTL")),
        ));
        assert_eq!(r, Residence::MappedWeights);
    }

    #[test]
    fn only_the_real_metal_shape_counts_as_mapped() {
        for f in [
            // Name of another device's buffer, or a device that is not Metal's.
            buft("MTL1_Mapped", false, Some(("MTL0", DevKind::Gpu, "MTL"))),
            buft("MTL0_Mapped", false, Some(("MTL0", DevKind::Gpu, "Vulkan"))),
            buft("MTL0_Mapped", false, Some(("MTL0", DevKind::Accel, "MTL"))),
            buft("MTL0_Mapped", false, None),
            buft("MTLx_Mapped", false, Some(("MTLx", DevKind::Gpu, "MTL"))),
            buft("MTL_Mapped", false, Some(("MTL", DevKind::Gpu, "MTL"))),
            buft("Vulkan0", false, Some(("Vulkan0", DevKind::Gpu, "Vulkan"))),
            buft("CUDA0", false, Some(("CUDA0", DevKind::Gpu, "CUDA"))),
        ] {
            let r = classify(&f);
            assert!(
                matches!(r, Residence::Declined(Unreadable::Other { .. })),
                "{f:?} -> {r:?}"
            );
            assert!(!accepts(&r));
        }
    }

    #[test]
    fn rpc_goes_through_the_api_and_repacks_are_declined() {
        let f = buft(
            "RPC0[127.0.0.1:50052]",
            false,
            Some(("RPC0", DevKind::Gpu, "RPC[127.0.0.1:50052]")),
        );
        let r = classify(&f);
        assert_eq!(r, Residence::Api);
        assert!(accepts(&r));
        assert_eq!(weight_access(&r, true, false), Access::Api);
        assert_eq!(
            weight_access(&r, false, true),
            Access::No,
            "KV cache, not weights"
        );
        assert_eq!(activation_access(&r), Access::Api);
        // Another device's name in the type, or not the RPC registry: declined.
        let f = buft(
            "RPC1[127.0.0.1:1]",
            false,
            Some(("RPC0", DevKind::Gpu, "RPC[127.0.0.1:1]")),
        );
        assert!(!accepts(&classify(&f)));
        let f = buft("RPC0[x]", false, Some(("RPC0", DevKind::Gpu, "NOTRPC")));
        assert!(!accepts(&classify(&f)));
        let f = buft("CPU_REPACK", false, Some(("CPU", DevKind::Cpu, "CPU")));
        assert!(matches!(
            classify(&f),
            Residence::Declined(Unreadable::Repacked { .. })
        ));
    }
}
