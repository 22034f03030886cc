//! Where llama.cpp puts the MUL_MATs the plugin could take, and one line to the user when another
//! backend is going to take them.
//!
//! The scheduler gives a weight's MUL_MAT to the first backend, in the order GPUs, ACCEL devices
//! (in registry order), CPU, that accepts the weight's buffer type and the op
//! (`ggml/src/ggml-backend.cpp:1028-1040`, `src/llama-context.cpp:334-361`). So the plugin never
//! sees the work when
//!
//! * the weights are in GPU memory (layers offloaded with `-ngl`, all of them by default with
//!   Metal): the GPU accepts its own buffer first;
//! * another ACCEL device was registered before it (ggml-blas, on by default in Apple builds):
//!   it is asked first about the same host buffers and takes what it supports;
//! * the weights were repacked into a CPU extra buffer type (`CPU_REPACK`), which is not host
//!   memory: only the CPU accepts it.
//!
//! The decisions are pure functions over plain data ([`Device`], [`WeightPlace`]) so that they are
//! tested with fake device lists; [`inspect_devices`] and [`weight_usable`] are the thin hooks that
//! read the real ones through ggml. See `docs/mac.md` for the whole table.

use std::ffi::{c_char, CStr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

use crate::ffi::{ggml_backend_dev_t, ggml_tensor};
use crate::ggml::{self, Ggml};

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

/// One registered device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Device {
    pub name: String,
    pub kind: DevKind,
}

/// The things the plugin tells the user about, each at most once per process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Notice {
    /// A GPU device is registered: layers offloaded to it never reach the ANE.
    Gpu,
    /// An ACCEL device registered before ours gets first pick of host-memory MUL_MATs.
    AccelFirst,
    /// Weights repacked into a CPU extra buffer type.
    Repack,
    /// Weights in another device's (non-host) memory.
    DeviceMemory,
}

impl Notice {
    const ALL: [Notice; 4] = [
        Notice::Gpu,
        Notice::AccelFirst,
        Notice::Repack,
        Notice::DeviceMemory,
    ];

    fn index(self) -> usize {
        Notice::ALL.iter().position(|&n| n == self).expect("listed")
    }
}

/// Which notices were already printed.
#[derive(Debug, Default)]
pub struct Said([AtomicBool; Notice::ALL.len()]);

impl Said {
    /// True the first time `n` is asked about, false afterwards.
    pub fn first(&self, n: Notice) -> bool {
        !self.0[n.index()].swap(true, Relaxed)
    }
}

/// What the registered devices mean for the plugin, as (notice, line) pairs. `me` is the plugin's
/// own index in `devices` (registry order).
pub fn device_notices(devices: &[Device], me: usize) -> Vec<(Notice, String)> {
    let mut out = Vec::new();
    let gpus: Vec<&str> = devices
        .iter()
        .filter(|d| matches!(d.kind, DevKind::Gpu | DevKind::Igpu))
        .map(|d| d.name.as_str())
        .collect();
    if !gpus.is_empty() {
        out.push((
            Notice::Gpu,
            format!(
                "ggml-ane: GPU device {} registered: the layers llama.cpp offloads to it (-ngl; by \
                 default all that fit) run their MUL_MATs there, never on the ANE; keep layers in \
                 host memory for ANE prefill with -ngl 0 (or -ngl N for a split), see docs/mac.md",
                gpus.join(", ")
            ),
        ));
    }
    let before: Vec<&str> = devices
        .iter()
        .take(me)
        .filter(|d| d.kind == DevKind::Accel)
        .map(|d| d.name.as_str())
        .collect();
    if !before.is_empty() {
        let blas = if before.contains(&"BLAS") {
            " (BLAS takes every MUL_MAT with ne0, ne1, ne10 >= 32)"
        } else {
            ""
        };
        out.push((
            Notice::AccelFirst,
            format!(
                "ggml-ane: ACCEL device {} registered before ANE gets first pick of host-memory \
                 MUL_MATs{blas}, so ANE receives almost none; no llama.cpp flag changes this order: \
                 use a llama.cpp built with -DGGML_BLAS=OFF (or without that backend's library), \
                 see docs/mac.md",
                before.join(", ")
            ),
        ));
    }
    out
}

/// Where a MUL_MAT weight lives, as far as the plugin is concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WeightPlace {
    /// Host memory: the plugin can read it (and the scheduler may give it the op).
    Host,
    /// A CPU extra buffer type (`CPU_REPACK`, `AMX`, `KLEIDIAI`): re-laid-out for the CPU.
    CpuExtra { buft: String },
    /// Memory of another device (`MTL0` for Metal).
    Device {
        buft: String,
        device: String,
        kind: DevKind,
    },
}

/// Classifies a weight's buffer from its buffer type's host flag, name and device.
pub fn classify(is_host: bool, buft: &str, device: Option<(&str, DevKind)>) -> WeightPlace {
    match device {
        _ if is_host => WeightPlace::Host,
        Some((_, DevKind::Cpu)) => WeightPlace::CpuExtra { buft: buft.into() },
        Some((name, kind)) => WeightPlace::Device {
            buft: buft.into(),
            device: name.into(),
            kind,
        },
        None => WeightPlace::Device {
            buft: buft.into(),
            device: "?".into(),
            kind: DevKind::Other(-1),
        },
    }
}

/// The line for a weight (named `tensor`) the plugin would claim but cannot read, if any.
pub fn weight_notice(place: &WeightPlace, tensor: &str) -> Option<(Notice, String)> {
    match place {
        WeightPlace::Host => None,
        WeightPlace::CpuExtra { buft } => Some((
            Notice::Repack,
            format!(
                "ggml-ane: MUL_MAT weights such as {tensor} are in the {buft} buffer (repacked for \
                 the CPU), which the ANE cannot read, so the CPU computes them; run llama.cpp with \
                 --no-repack to offload them, see docs/mac.md"
            ),
        )),
        WeightPlace::Device { buft, device, .. } => Some((
            Notice::DeviceMemory,
            format!(
                "ggml-ane: MUL_MAT weights such as {tensor} are in {buft} memory of device \
                 {device}, which computes them; -ngl 0 keeps layers in host memory for ANE \
                 prefill, see docs/mac.md"
            ),
        )),
    }
}

static SAID: Said = Said([const { AtomicBool::new(false) }; Notice::ALL.len()]);

/// Prints `line` once per process per notice, as one write (the host's logger thread writes to
/// stderr concurrently).
fn say(n: Notice, line: &str) {
    if SAID.first(n) {
        use std::io::Write;
        let _ = std::io::stderr()
            .lock()
            .write_all(format!("{line}\n").as_bytes());
    }
}

/// # Safety
/// `p` is null or a NUL-terminated string.
unsafe fn string(p: *const c_char) -> String {
    if p.is_null() {
        return "?".into();
    }
    // SAFETY: per the contract.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// Registered devices in registry order, and the index of `me` among them.
fn registered(g: &Ggml, me: ggml_backend_dev_t) -> Option<(Vec<Device>, usize)> {
    let p = &g.placement;
    let (count, get, ty, name) = (p.dev_count?, p.dev_get?, p.dev_type?, p.dev_name?);
    let mut devices = Vec::new();
    let mut mine = None;
    // SAFETY: registry functions of the loaded ggml; devices live as long as the process.
    unsafe {
        for i in 0..count() {
            let d = get(i);
            if d.is_null() {
                continue;
            }
            if d == me {
                mine = Some(devices.len());
            }
            devices.push(Device {
                name: string(name(d)),
                kind: DevKind::from_ggml(ty(d)),
            });
        }
    }
    let mine = mine.unwrap_or(devices.len());
    Some((devices, mine))
}

/// Backend-init hook: looks at the registered devices and prints what they mean, once.
pub fn inspect_devices(me: ggml_backend_dev_t) {
    let Some((devices, mine)) = ggml::ggml().and_then(|g| registered(g, me)) else {
        return;
    };
    for (n, line) in device_notices(&devices, mine) {
        say(n, &line);
    }
}

/// `supports_op` hook for a MUL_MAT the plugin would claim: true when its weight `w` is in host
/// memory (or not allocated yet). Otherwise counts it in `declined_buft`, says once where the
/// weight is and which flag changes it, and returns false.
pub fn weight_usable(g: &Ggml, w: &ggml_tensor, declined_buft: &AtomicU64) -> bool {
    let buffer = if w.view_src.is_null() {
        w.buffer
    } else {
        // SAFETY: view_src is a valid tensor for as long as its view is.
        unsafe { (*w.view_src).buffer }
    };
    let p = &g.placement;
    let Some(get_type) = p.buffer_get_type else {
        return true;
    };
    if buffer.is_null() {
        return true;
    }
    // SAFETY: a live tensor's non-null buffer is a valid ggml buffer with a valid type.
    let buft = unsafe { get_type(buffer) };
    // SAFETY: same.
    if buft.is_null() || unsafe { (g.buft_is_host)(buft) } {
        return true;
    }
    declined_buft.fetch_add(1, Relaxed);
    // SAFETY: ggml's own accessors on a valid buffer type / device; names are static C strings.
    let (buft_name, device) = unsafe {
        let name = p.buft_name.map_or("?".into(), |f| string(f(buft)));
        let dev = p.buft_get_device.map(|f| f(buft)).filter(|d| !d.is_null());
        let device = match (dev, p.dev_name, p.dev_type) {
            (Some(d), Some(n), Some(t)) => Some((string(n(d)), DevKind::from_ggml(t(d)))),
            _ => None,
        };
        (name, device)
    };
    // SAFETY: ggml tensor names are NUL-terminated within GGML_MAX_NAME.
    let tensor = unsafe { string(w.name.as_ptr()) };
    let place = classify(
        false,
        &buft_name,
        device.as_ref().map(|(n, k)| (n.as_str(), *k)),
    );
    if let Some((n, line)) = weight_notice(&place, &tensor) {
        say(n, &line);
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(name: &str, kind: DevKind) -> Device {
        Device {
            name: name.into(),
            kind,
        }
    }

    fn kinds(n: &[(Notice, String)]) -> Vec<Notice> {
        n.iter().map(|(k, _)| *k).collect()
    }

    #[test]
    fn device_kinds_follow_the_c_enum() {
        assert_eq!(DevKind::from_ggml(0), DevKind::Cpu);
        assert_eq!(DevKind::from_ggml(1), DevKind::Gpu);
        assert_eq!(DevKind::from_ggml(2), DevKind::Igpu);
        assert_eq!(DevKind::from_ggml(3), DevKind::Accel);
        assert_eq!(DevKind::from_ggml(4), DevKind::Meta);
        assert_eq!(DevKind::from_ggml(9), DevKind::Other(9));
    }

    #[test]
    fn cpu_and_ane_only_is_quiet() {
        // Linux build here, or a Mac build with -DGGML_METAL=OFF -DGGML_BLAS=OFF.
        let devs = [dev("CPU", DevKind::Cpu), dev("ANE", DevKind::Accel)];
        assert!(device_notices(&devs, 1).is_empty());
    }

    #[test]
    fn stock_mac_build_warns_about_metal_and_blas() {
        // Static Apple build: Metal and BLAS are registered in the registry constructor
        // (ggml-backend-reg.cpp), CPU last, then GGML_BACKEND_PATH loads the plugin.
        let devs = [
            dev("MTL0", DevKind::Gpu),
            dev("BLAS", DevKind::Accel),
            dev("CPU", DevKind::Cpu),
            dev("ANE", DevKind::Accel),
        ];
        let n = device_notices(&devs, 3);
        assert_eq!(kinds(&n), [Notice::Gpu, Notice::AccelFirst]);
        assert!(n[0].1.contains("MTL0") && n[0].1.contains("-ngl 0"));
        assert!(n[1].1.contains("BLAS") && n[1].1.contains("-DGGML_BLAS=OFF"));
        assert!(n[1].1.contains("ne0, ne1, ne10 >= 32"));
        for (_, line) in &n {
            assert!(line.starts_with("ggml-ane: ") && !line.contains('\n'));
        }
    }

    #[test]
    fn metal_without_blas_warns_once_about_the_gpu() {
        let devs = [
            dev("MTL0", DevKind::Gpu),
            dev("CPU", DevKind::Cpu),
            dev("ANE", DevKind::Accel),
        ];
        assert_eq!(kinds(&device_notices(&devs, 2)), [Notice::Gpu]);
        // An integrated GPU counts the same; several are listed.
        let devs = [
            dev("Vulkan0", DevKind::Igpu),
            dev("RPC0", DevKind::Gpu),
            dev("ANE", DevKind::Accel),
        ];
        let n = device_notices(&devs, 2);
        assert_eq!(kinds(&n), [Notice::Gpu]);
        assert!(n[0].1.contains("Vulkan0, RPC0"));
    }

    #[test]
    fn only_accel_devices_before_ours_matter() {
        // Registered after the plugin (lower priority): the scheduler asks ANE first.
        let devs = [
            dev("CPU", DevKind::Cpu),
            dev("ANE", DevKind::Accel),
            dev("BLAS", DevKind::Accel),
        ];
        assert!(device_notices(&devs, 1).is_empty());
        // Another ACCEL plugin before ours: warned, without BLAS's rule.
        let devs = [dev("NPU", DevKind::Accel), dev("ANE", DevKind::Accel)];
        let n = device_notices(&devs, 1);
        assert_eq!(kinds(&n), [Notice::AccelFirst]);
        assert!(n[0].1.contains("NPU") && !n[0].1.contains(">= 32"));
        // Our own device is not "before" itself, whatever its name.
        assert!(device_notices(&[dev("ANE", DevKind::Accel)], 0).is_empty());
    }

    #[test]
    fn weight_buffers_are_classified() {
        assert_eq!(
            classify(true, "CPU", Some(("CPU", DevKind::Cpu))),
            WeightPlace::Host
        );
        // Host-ness alone decides readability, whichever device the buffer type belongs to.
        assert_eq!(
            classify(true, "X_Host", Some(("X0", DevKind::Gpu))),
            WeightPlace::Host
        );
        assert_eq!(
            classify(false, "CPU_REPACK", Some(("CPU", DevKind::Cpu))),
            WeightPlace::CpuExtra {
                buft: "CPU_REPACK".into()
            }
        );
        assert_eq!(
            classify(false, "MTL0", Some(("MTL0", DevKind::Gpu))),
            WeightPlace::Device {
                buft: "MTL0".into(),
                device: "MTL0".into(),
                kind: DevKind::Gpu
            }
        );
        assert!(matches!(
            classify(false, "X", None),
            WeightPlace::Device { .. }
        ));
    }

    #[test]
    fn weight_notices_name_the_flag() {
        assert!(weight_notice(&WeightPlace::Host, "w").is_none());
        let (n, line) = weight_notice(
            &classify(false, "CPU_REPACK", Some(("CPU", DevKind::Cpu))),
            "blk.0.attn_q.weight",
        )
        .unwrap();
        assert_eq!(n, Notice::Repack);
        assert!(line.contains("blk.0.attn_q.weight") && line.contains("--no-repack"));
        let (n, line) = weight_notice(
            &classify(false, "MTL0", Some(("MTL0", DevKind::Gpu))),
            "output.weight",
        )
        .unwrap();
        assert_eq!(n, Notice::DeviceMemory);
        assert!(line.contains("-ngl 0"));
    }

    #[test]
    fn each_notice_is_said_once() {
        let said = Said::default();
        assert!(said.first(Notice::Repack));
        assert!(!said.first(Notice::Repack));
        assert!(said.first(Notice::Gpu));
        assert!(!said.first(Notice::Gpu));
        assert!(!said.first(Notice::Repack));
    }
}
