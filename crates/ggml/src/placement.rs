//! Where llama.cpp puts the MUL_MATs the plugin could take, and one line to the user when another
//! backend is going to take them.
//!
//! The scheduler gives a weight's MUL_MAT to the first backend, in the scheduler's order (the
//! model devices as given by `--device`, then ACCEL devices in registry order, then the CPU), that
//! accepts the weight's buffer type and the op (`ggml/src/ggml-backend.cpp:1028-1040`,
//! `src/llama-context.cpp:334-361`). So the plugin never sees the work when
//!
//! * the weights are in GPU memory and the GPU comes first (no `--device ANE,MTL0`): the GPU
//!   accepts its own buffer first. With the ANE listed first and `-ts 0,1`, every layer stays on
//!   the GPU and the plugin takes the prefill matmuls whose weights it can read where they are
//!   (Metal's `MTL<n>_Mapped`, llama.cpp's RPC backend: [`crate::view::residence`]);
//! * another ACCEL device was registered before it (ggml-blas, on by default in Apple builds):
//!   it is asked first about the same host buffers and takes what it supports;
//! * the weights were repacked into a CPU extra buffer type (`CPU_REPACK`), which is not host
//!   memory: only the CPU accepts it.
//!
//! The decisions are pure functions over plain data ([`Device`], [`residence::BuftFacts`]) so that
//! they are tested with fake device lists and buffer types; [`inspect_devices`], [`residence`]
//! and [`weight_usable`] are the thin hooks that read the real ones through ggml. See
//! `docs/mac.md` for the whole table.

use std::ffi::{c_char, CStr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

use crate::ffi::{ggml_backend_buffer_type_t, ggml_backend_dev_t, ggml_tensor};
use crate::ggml::{self, buffer_of, Ggml};
use crate::view::residence::{self, Access, BuftFacts, DevFacts, Residence, Unreadable};

pub use crate::view::residence::DevKind;

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
    /// Weights in another device's memory the plugin cannot read.
    DeviceMemory,
    /// Weights both in host memory and in a GPU's buffers (`-ts 0,1` missing).
    SplitLayers,
}

impl Notice {
    const ALL: [Notice; 5] = [
        Notice::Gpu,
        Notice::AccelFirst,
        Notice::Repack,
        Notice::DeviceMemory,
        Notice::SplitLayers,
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
                "ggml-ane: GPU device {0} registered: the ANE takes prefill matmuls beside it when \
                 listed first, --device ANE,{1} -ts 0,1 (llama-bench: -dev ANE/{1} -ts 0/1); \
                 otherwise the layers on {0} run their MUL_MATs there, see docs/mac.md",
                gpus.join(", "),
                gpus[0]
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

/// The line for a weight (named `tensor`) the plugin would claim but cannot read.
pub fn weight_notice(why: &Unreadable, tensor: &str) -> (Notice, String) {
    match why {
        Unreadable::Repacked { buft } => (
            Notice::Repack,
            format!(
                "ggml-ane: MUL_MAT weights such as {tensor} are in the {buft} buffer (repacked for \
                 the CPU), which the ANE cannot read, so the CPU computes them; run llama.cpp with \
                 --no-repack to offload them, see docs/mac.md"
            ),
        ),
        Unreadable::GpuShared { buft, device } => (
            Notice::DeviceMemory,
            format!(
                "ggml-ane: MUL_MAT weights such as {tensor} are in {device}'s shared {buft} buffer: \
                 the model was loaded without mmap (--load-mode none or dio; --no-mmap in older \
                 llama.cpp), and that buffer also holds the GPU's activations, so {device} \
                 computes them; load with mmap (the default, --load-mode auto) so the weights sit \
                 in {buft}_Mapped, which the ANE reads, see docs/mac.md"
            ),
        ),
        Unreadable::GpuPrivate { buft, device } => (
            Notice::DeviceMemory,
            format!(
                "ggml-ane: MUL_MAT weights such as {tensor} are in {device}'s private {buft} memory \
                 (GGML_METAL_SHARED_BUFFERS_DISABLE, or a GPU without unified memory), which the \
                 ANE cannot read, so {device} computes them; unset that variable, see docs/mac.md"
            ),
        ),
        Unreadable::Other { buft, device } => (
            Notice::DeviceMemory,
            format!(
                "ggml-ane: MUL_MAT weights such as {tensor} are in {buft} memory of device \
                 {device}, which the ANE cannot read, so {device} computes them; -ngl 0 keeps \
                 layers in host memory for ANE prefill, see docs/mac.md"
            ),
        ),
    }
}

/// The line for weights found both in host memory and in a GPU's buffers: with the ANE listed
/// first (`--device ANE,MTL0`) and no `-ts 0,1`, llama.cpp gives the ANE layers of its own (in
/// host memory, their other ops on the CPU).
pub fn split_layers_notice(gpu: &str) -> String {
    format!(
        "ggml-ane: some layers' weights are in host memory and others in {gpu}'s: with --device \
         ANE,{gpu} also pass -ts 0,1 (llama-bench: -ts 0/1) so every layer stays on {gpu} and \
         the ANE still takes their prefill matmuls, see docs/mac.md"
    )
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

/// What ggml says of `buft`.
///
/// # Safety
/// `buft` is a valid buffer type of the loaded ggml.
unsafe fn buft_facts(g: &Ggml, buft: ggml_backend_buffer_type_t) -> BuftFacts {
    let p = &g.placement;
    // SAFETY: ggml's own accessors on a valid buffer type, its device and registry; names are
    // static C strings.
    unsafe {
        let name = p.buft_name.map_or("?".into(), |f| string(f(buft)));
        let dev = p.buft_get_device.map(|f| f(buft)).filter(|d| !d.is_null());
        let device = match (dev, p.dev_name, p.dev_type) {
            (Some(d), Some(n), Some(t)) => Some(DevFacts {
                name: string(n(d)),
                kind: DevKind::from_ggml(t(d)),
                reg: match (p.dev_backend_reg, p.reg_name) {
                    (Some(r), Some(rn)) => {
                        let reg = r(d);
                        if reg.is_null() {
                            "?".into()
                        } else {
                            string(rn(reg))
                        }
                    }
                    _ => "?".into(),
                },
            }),
            _ => None,
        };
        BuftFacts {
            name,
            is_host: (g.buft_is_host)(buft),
            device,
        }
    }
}

/// How tensors of `buft` may be read ([`residence::classify`]), remembered per buffer type:
/// buffer types are static objects of their backends, asked about on every `supports_buft`.
///
/// # Safety
/// `buft` is a valid buffer type of the loaded ggml.
pub unsafe fn residence(g: &Ggml, buft: ggml_backend_buffer_type_t) -> Residence {
    static KNOWN: Mutex<Vec<(usize, Residence)>> = Mutex::new(Vec::new());
    let mut known = KNOWN.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, r)) = known.iter().find(|(b, _)| *b == buft as usize) {
        return r.clone();
    }
    // SAFETY: per the contract.
    let r = residence::classify(&unsafe { buft_facts(g, buft) });
    known.push((buft as usize, r.clone()));
    r
}

/// Whether `t` lives in a GPU's buffer the plugin reads (Metal's mapped weights, RPC): its rows
/// can be given to that GPU (`crate::split`).
pub fn on_gpu(g: &Ggml, t: &ggml_tensor) -> bool {
    matches!(
        tensor_residence(g, t),
        Some(Residence::MappedWeights | Residence::Api)
    )
}

/// Whether `t` (or the tensor it views) has a buffer.
pub fn is_allocated(t: &ggml_tensor) -> bool {
    !buffer_of(t).is_null()
}

/// The residence of `t`'s buffer: `None` when it has none yet (or ggml lacks the accessor).
fn tensor_residence(g: &Ggml, t: &ggml_tensor) -> Option<Residence> {
    let get_type = g.placement.buffer_get_type?;
    let buffer = buffer_of(t);
    if buffer.is_null() {
        return None;
    }
    // SAFETY: a live tensor's non-null buffer is a valid ggml buffer with a valid type.
    let buft = unsafe { get_type(buffer) };
    if buft.is_null() {
        return None;
    }
    // SAFETY: as above.
    Some(unsafe { residence(g, buft) })
}

/// Whether `w`'s bytes lie inside its buffer's range.
fn inside_buffer(g: &Ggml, w: &ggml_tensor) -> bool {
    let (Some((lo, hi)), Some(nbytes)) = (g.buffer_range(w), g.placement.nbytes) else {
        return false;
    };
    let at = w.data as usize;
    // SAFETY: a live tensor.
    let n = unsafe { nbytes(w) };
    at >= lo && at.checked_add(n).is_some_and(|end| end <= hi)
}

/// How a MUL_MAT's weight `w` is read ([`residence::weight_access`]); a tensor without a buffer
/// yet is host memory to be (llama.cpp's graphs are reserved after the weights are loaded).
pub fn weight_access(g: &Ggml, w: &ggml_tensor) -> Access {
    access_in(g, w, tensor_residence(g, w).as_ref())
}

/// [`weight_access`] for `w` in a buffer of residence `r` (`None`: no buffer yet).
fn access_in(g: &Ggml, w: &ggml_tensor, r: Option<&Residence>) -> Access {
    match r {
        None => Access::Direct,
        Some(r) => residence::weight_access(r, g.is_weight(w), inside_buffer(g, w)),
    }
}

/// How an activation or output `t` of a graph being computed is read or written.
pub fn activation_access(g: &Ggml, t: &ggml_tensor) -> Access {
    match tensor_residence(g, t) {
        None => Access::No,
        Some(r) => residence::activation_access(&r),
    }
}

/// `supports_buft` was offered a GPU's mapped weights type / a GPU's shared type (which one).
static OFFERED_MAPPED: AtomicBool = AtomicBool::new(false);
static OFFERED_SHARED: Mutex<Option<Unreadable>> = Mutex::new(None);

/// `supports_buft` hook: remembers which GPU buffer types the scheduler asked about. With the
/// model loaded without mmap, a GPU's weights sit in its shared type, which the plugin declines in
/// `supports_buft`, so the scheduler never asks `supports_op` about their matmuls and
/// [`weight_usable`] never sees them: [`say_at_exit`] tells the user then.
pub fn offered(r: &Residence) {
    match r {
        Residence::MappedWeights => OFFERED_MAPPED.store(true, Relaxed),
        Residence::Declined(why @ Unreadable::GpuShared { .. }) => {
            let mut s = OFFERED_SHARED.lock().unwrap_or_else(|e| e.into_inner());
            if s.is_none() {
                *s = Some(why.clone());
            }
        }
        _ => {}
    }
}

/// The line for a run whose GPU weights were never readable: a GPU's shared buffer type was
/// offered, no mapped weights type ever was, and no weight in host memory came to the plugin
/// (`-ngl 0` runs have their weights in host memory and GPU activations in the shared type).
pub fn mmap_off_notice(
    offered_mapped: bool,
    shared: Option<&Unreadable>,
    seen_host: bool,
) -> Option<(Notice, String)> {
    match shared {
        Some(why @ Unreadable::GpuShared { device, .. }) if !offered_mapped && !seen_host => Some(
            weight_notice(why, &format!("those of the layers on {device}")),
        ),
        _ => None,
    }
}

/// At exit: says [`mmap_off_notice`] if it applies (once per process, like every notice).
pub fn say_at_exit() {
    let shared = OFFERED_SHARED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    if let Some((n, line)) = mmap_off_notice(
        OFFERED_MAPPED.load(Relaxed),
        shared.as_ref(),
        SEEN_HOST.load(Relaxed),
    ) {
        say(n, &line);
    }
}

/// Devices whose buffers held weights the plugin was offered (for [`split_layers_notice`]).
static SEEN_HOST: AtomicBool = AtomicBool::new(false);
static SEEN_GPU: Mutex<Option<String>> = Mutex::new(None);

/// `supports_op` hook for a MUL_MAT the plugin would claim: how its weight `w` is read. When it
/// cannot be, counts it in `declined_buft`, says once where the weight is and which flag changes
/// it, and returns [`Access::No`]. Says once when weights sit both in host memory and in a GPU's
/// buffers (`-ts 0,1` missing).
pub fn weight_usable(g: &Ggml, w: &ggml_tensor, declined_buft: &AtomicU64) -> Access {
    let r = tensor_residence(g, w);
    if matches!(r, Some(Residence::MappedWeights | Residence::Api)) && !g.is_weight(w) {
        // A GPU's KV cache (attention's matmuls): not a weight, and not for the device.
        return Access::No;
    }
    let access = access_in(g, w, r.as_ref());
    match (&r, access) {
        (Some(Residence::MappedWeights | Residence::Api), a) if a != Access::No => {
            let gpu = device_of(g, w);
            *SEEN_GPU.lock().unwrap_or_else(|e| e.into_inner()) = Some(gpu.clone());
            if SEEN_HOST.load(Relaxed) {
                say(Notice::SplitLayers, &split_layers_notice(&gpu));
            }
        }
        (None | Some(Residence::Host), _) => {
            SEEN_HOST.store(true, Relaxed);
            if let Some(gpu) = SEEN_GPU.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                say(Notice::SplitLayers, &split_layers_notice(gpu));
            }
        }
        _ => {}
    }
    if access != Access::No {
        return access;
    }
    declined_buft.fetch_add(1, Relaxed);
    // SAFETY: ggml tensor names are NUL-terminated within GGML_MAX_NAME.
    let tensor = unsafe { string(w.name.as_ptr()) };
    let why = match r {
        Some(Residence::Declined(why)) => why,
        // Readable type but not this tensor (not a weights buffer, outside its range).
        _ => Unreadable::Other {
            buft: "a non-weights".into(),
            device: device_of(g, w),
        },
    };
    let (n, line) = weight_notice(&why, &tensor);
    say(n, &line);
    Access::No
}

/// The name of the device whose buffer holds `w` ("?" when unknown).
pub fn device_of(g: &Ggml, w: &ggml_tensor) -> String {
    let p = &g.placement;
    let buffer = buffer_of(w);
    let (Some(get_type), Some(get_dev), Some(name)) =
        (p.buffer_get_type, p.buft_get_device, p.dev_name)
    else {
        return "?".into();
    };
    if buffer.is_null() {
        return "?".into();
    }
    // SAFETY: ggml's accessors on a live tensor's buffer; names are static C strings.
    unsafe {
        let dev = get_dev(get_type(buffer));
        if dev.is_null() {
            "?".into()
        } else {
            string(name(dev))
        }
    }
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
        assert!(n[0].1.contains("--device ANE,MTL0 -ts 0,1"));
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
    fn weight_notices_name_the_fix() {
        let r = |buft: &str, dev: &str, kind, reg: &str| {
            residence::classify(&BuftFacts {
                name: buft.into(),
                is_host: false,
                device: Some(DevFacts {
                    name: dev.into(),
                    kind,
                    reg: reg.into(),
                }),
            })
        };
        let why = |r: Residence| match r {
            Residence::Declined(w) => w,
            other => panic!("{other:?} is readable"),
        };
        let (n, line) = weight_notice(
            &why(r("CPU_REPACK", "CPU", DevKind::Cpu, "CPU")),
            "blk.0.attn_q.weight",
        );
        assert_eq!(n, Notice::Repack);
        assert!(line.contains("blk.0.attn_q.weight") && line.contains("--no-repack"));
        let (n, line) = weight_notice(&why(r("MTL0", "MTL0", DevKind::Gpu, "MTL")), "w");
        assert_eq!(n, Notice::DeviceMemory);
        assert!(line.contains("--load-mode none") && line.contains("MTL0_Mapped"));
        let (_, line) = weight_notice(&why(r("MTL0_Private", "MTL0", DevKind::Gpu, "MTL")), "w");
        assert!(line.contains("GGML_METAL_SHARED_BUFFERS_DISABLE"));
        let (_, line) = weight_notice(&why(r("CUDA0", "CUDA0", DevKind::Gpu, "CUDA")), "w");
        assert!(line.contains("-ngl 0") && line.contains("CUDA0"));
        let shared = Unreadable::GpuShared {
            buft: "MTL0".into(),
            device: "MTL0".into(),
        };
        let (_, line) = mmap_off_notice(false, Some(&shared), false).unwrap();
        assert!(line.starts_with("ggml-ane: MUL_MAT weights such as those of the layers on MTL0"));
        assert!(line.contains("--load-mode") && line.contains("MTL0_Mapped"));
        assert!(
            mmap_off_notice(true, Some(&shared), false).is_none(),
            "mmap on"
        );
        assert!(
            mmap_off_notice(false, Some(&shared), true).is_none(),
            "-ngl 0"
        );
        assert!(mmap_off_notice(false, None, false).is_none());
        let line = split_layers_notice("MTL0");
        assert!(line.contains("-ts 0,1") && line.contains("--device ANE,MTL0"));
        assert!(line.starts_with("ggml-ane: ") && !line.contains('\n'));
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
