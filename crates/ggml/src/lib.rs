//! `ggml-ane`: a ggml backend (API v3) that runs llama.cpp's prefill MUL_MATs on the Apple Neural
//! Engine.
//!
//! llama.cpp loads this library (`GGML_BACKEND_PATH=/path/libggml_ane.so` or `ggml_backend_load`) and
//! sees one device, `ANE`, of type ACCEL. Like ggml-blas it works on host memory (the CPU buffer
//! type), claims only MUL_MATs it will compute (see [`support`]), and computes each one through an
//! engine ([`ane_engine`]): the ANE on a Mac, or the CPU reference engine when
//! `GGML_ANE_ENGINE=reference`. Whatever happens in the engine, the output is written: failures fall
//! back to the plugin's own CPU path.
//!
//! File order follows ggml-blas: device state, compute, backend vtable, device vtable, registry,
//! entry points. Every `extern "C"` function catches panics, because unwinding into C aborts the host.

#![deny(unsafe_op_in_unsafe_fn)]

mod baked;
pub mod config;
pub mod ffi;
pub mod ggml;
pub mod guard;
pub mod health;
pub mod host_api;
pub mod host_cpu;
mod lookahead;
pub mod matmul;
mod open;
pub mod placement;
pub mod stats;
pub mod support;
#[cfg(test)]
mod test_util;

use std::ffi::{c_char, c_int, c_void};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr::{addr_of, null, null_mut};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, OnceLock};

use ane_engine::Engine;

use ane_plan::Planner;
use config::{Config, EngineChoice, StatsMode};
use ffi::*;
use matmul::{Group, KernelCache, Member, Operand, ScratchPool, StagedWeights};
use stats::Stats;
use support::{Policy, TensorDesc};

// ---------------------------------------------------------------------------------------------
// device state

/// Everything one `ANE` device shares across its backend instances (threads may call at once).
pub struct DeviceState {
    engine: Arc<dyn Engine>,
    planner: Planner,
    cache: Mutex<KernelCache>,
    staged: Mutex<StagedWeights>,
    scratch: Mutex<ScratchPool>,
    stats: Stats,
    policy: Policy,
    /// Which weights share activations across splits (see [`lookahead`]).
    learner: Mutex<lookahead::Learner>,
    /// Published costs of the engine's chip (`GGML_ANE_ROUTE=cost`).
    cost: ane_plan::cost::ChipCost,
    /// Whether the device gave up after a run of engine failures.
    health: health::Health,
}

impl DeviceState {
    /// What the compute paths need of the device.
    fn matmul_cx(&self) -> matmul::Context<'_> {
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
        }
    }
}

/// One backend instance (a llama context): what must not be shared with other instances.
#[derive(Default)]
struct BackendCtx {
    /// Speculated outputs of this instance's graphs.
    stash: Mutex<lookahead::Stash>,
    /// The host's CPU backend, for this instance's fallbacks (with the host's thread count).
    host: host_cpu::HostCpu,
}

/// The device state, or why there is none. Created on first use, never in `ggml_backend_score`'s
/// hot path more than once.
fn device_state() -> Result<&'static DeviceState, &'static str> {
    static STATE: OnceLock<Result<DeviceState, String>> = OnceLock::new();
    STATE
        .get_or_init(|| {
            let cfg = Config::get();
            if ggml::ggml().is_none() {
                return Err("ggml-base symbols not found in this process".into());
            }
            let engine = open::open_engine(cfg).map_err(|e| e.to_string())?;
            // SAFETY: registering a plain `extern "C" fn()` has no preconditions; it runs once at
            // normal process exit.
            unsafe { libc::atexit(ggml_backend_ane_at_exit) };
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
                cost: {
                    let published = ane_plan::cost::chip_cost(engine.chip());
                    // Validated when the configuration was read.
                    cfg.cost
                        .as_deref()
                        .and_then(|s| published.with_overrides(s).ok())
                        .unwrap_or(published)
                },
                engine,
                stats: Stats::default(),
                learner: Mutex::default(),
            })
        })
        .as_ref()
        .map_err(|s| s.as_str())
}

/// At normal exit, unloads every program: on the ANE that frees the driver's slots and removes
/// the model directories (they hold weights). Skipped if another thread holds the cache.
extern "C" fn ggml_backend_ane_at_exit() {
    guard((), || {
        if let Ok(dev) = device_state() {
            if let Ok(mut cache) = dev.cache.try_lock() {
                cache.clear(dev.engine.as_ref());
            }
        }
    })
}

fn desc(t: &ggml_tensor) -> TensorDesc {
    TensorDesc {
        ty: t.type_,
        ne: t.ne,
        nb: t.nb,
    }
}

fn is_noop(op: i32) -> bool {
    matches!(
        op,
        GGML_OP_NONE | GGML_OP_RESHAPE | GGML_OP_VIEW | GGML_OP_PERMUTE | GGML_OP_TRANSPOSE
    )
}

// ---------------------------------------------------------------------------------------------
// compute

/// A claimed MUL_MAT node as a group member, after re-checking what compute relies on.
///
/// # Safety
/// `node` is a MUL_MAT of the graph ggml handed to `graph_compute`, with allocated host tensors.
unsafe fn member(
    g: &ggml::Ggml,
    node: &ggml_tensor,
) -> Result<(Member, Operand, ggml::TypeInfo, bool), String> {
    // SAFETY: a MUL_MAT node has two valid sources.
    let (s0, s1) = unsafe { (&*node.src[0], &*node.src[1]) };
    let i0 = g.type_info(s0.type_).ok_or("unknown src0 type")?;
    let i1 = g.type_info(s1.type_).ok_or("unknown src1 type")?;
    // Whatever the scheduler sends, compute only what support::mul_mat accepts shape-wise (the
    // batch-size gate does not matter for correctness here).
    let policy = Policy { min_batch: 0 };
    support::mul_mat(&desc(s0), &desc(s1), &desc(node), Some(i0), policy)
        .map_err(|d| format!("unsupported MUL_MAT: {}", d.name()))?;
    if s0.data.is_null() || s1.data.is_null() || node.data.is_null() {
        return Err("MUL_MAT tensor without data".into());
    }
    let op = |t: &ggml_tensor| Operand {
        desc: desc(t),
        data: t.data as *const u8,
    };
    Ok((
        Member {
            src0: op(s0),
            src0_info: i0,
            dst: op(node),
        },
        op(s1),
        i1,
        g.is_weight(s0),
    ))
}

/// Runs a group through the planner and engine, with its learnt companions (see [`lookahead`])
/// when `head_buffer`, the byte range of the buffer holding the group's first weight, is known:
/// only companions inside it are read (a companion learnt from a model freed since is never
/// touched).
fn run_group(
    dev: &DeviceState,
    host: &host_cpu::HostCpu,
    mut group: Group,
    head_buffer: Option<(usize, usize)>,
    stash: &mut lookahead::Stash,
) {
    // SAFETY: the group was built from this graph's claimed MUL_MATs (valid host tensors); the
    // stash is borrowed until the group is computed.
    let head_ty = group.members[0].src0.desc.ty;
    let speculated = Config::get().lookahead
        && !dev.health.is_off()
        && head_buffer.is_some_and(|range| {
            // SAFETY: as above.
            let added = unsafe {
                stash.speculate(&dev.learner, &dev.stats, &mut group, |w, src1| {
                    companion_claimed(dev, head_ty, w, src1, range)
                })
            };
            added > 0
        });
    // SAFETY: the group was built from this graph's claimed MUL_MATs: valid host tensors, dst
    // separate from its sources (ggml allocates an op's output apart from its inputs); speculated
    // members write into the stash.
    let cx = matmul::Context {
        host: Some(host),
        act_round: Config::get().act_round,
        ..dev.matmul_cx()
    };
    let fallback = unsafe { matmul::compute(&cx, &group) };
    if speculated {
        stash.computed(fallback);
    }
    // Memory may have changed hands: the next take compares bytes again.
    stash.begin();
}

/// Fusion rule: a MUL_MAT joins the open group when it reads the same src1, its src0 is a 2-D
/// weight with the same K, and only no-op nodes or group members lie in between. Then no tensor is
/// freed (and its memory handed to a later member's output) between the first and the last member,
/// so computing all of them at once is the same as computing them in graph order.
fn joins(group: &Group, m: &Member, src1: &Operand, weight: bool) -> bool {
    let first = &group.members[0].src0.desc;
    group.weights
        && weight
        && group.src1.data == src1.data
        && group.src1.desc == src1.desc
        && first.ne[2] == 1
        && first.ne[3] == 1
        && m.src0.desc.ne[2] == 1
        && m.src0.desc.ne[3] == 1
        && m.src0.desc.ne[0] == first.ne[0]
        && matmul::rounds_alike(first.ty, m.src0.desc.ty)
}

fn graph_compute(ctx: &BackendCtx, cgraph: *mut ggml_cgraph) -> i32 {
    let (Ok(dev), Some(g)) = (device_state(), ggml::ggml()) else {
        return GGML_STATUS_FAILED;
    };
    let mut stash = ctx.stash.lock().unwrap_or_else(|e| e.into_inner());
    stash.begin();
    let lookahead = Config::get().lookahead;
    // SAFETY: ggml passes a valid graph; nodes are valid tensors for the duration of the call.
    let n = unsafe { (g.graph_n_nodes)(cgraph) };
    // The open group and the buffer range of its first weight.
    let mut open: Option<(Group, Option<(usize, usize)>)> = None;
    for i in 0..n {
        // SAFETY: 0 <= i < n.
        let Some(node) = (unsafe { (g.graph_node)(cgraph, i).as_ref() }) else {
            return GGML_STATUS_FAILED;
        };
        if is_noop(node.op) || node.flags & GGML_TENSOR_FLAG_COMPUTE == 0 {
            continue;
        }
        if node.op != GGML_OP_MUL_MAT {
            eprintln!("ggml-ane: graph_compute got op {} it never claims", node.op);
            return GGML_STATUS_FAILED;
        }
        // SAFETY: node is a MUL_MAT of this graph.
        let (m, src1, src1_info, weight) = match unsafe { member(g, node) } {
            Ok(v) => v,
            Err(e) => {
                eprintln!("ggml-ane: {e}");
                return GGML_STATUS_FAILED;
            }
        };
        if Config::get().stats != StatsMode::Off {
            // SAFETY: a MUL_MAT has a valid src0 with a NUL-terminated name.
            let name = unsafe { std::ffi::CStr::from_ptr((*node.src[0]).name.as_ptr()) };
            dev.stats.count_weight(&name.to_string_lossy());
        }
        if lookahead && weight && stash.waits_for(&m) {
            // Computed in an earlier split's dispatch: the groups before it run first (graph order).
            if let Some((done, range)) = open.take() {
                run_group(dev, &ctx.host, done, range, &mut stash);
            }
            // SAFETY: m and src1 are this graph's MUL_MAT operands (valid host tensors).
            if unsafe { stash.take(&dev.learner, &dev.stats, &m, &src1) } {
                continue;
            }
        }
        match open.as_mut() {
            Some((group, _)) if joins(group, &m, &src1, weight) => group.members.push(m),
            _ => {
                if let Some((done, range)) = open.take() {
                    run_group(dev, &ctx.host, done, range, &mut stash);
                }
                // SAFETY: a MUL_MAT node has a valid src0.
                let range = g.buffer_range(unsafe { &*node.src[0] });
                open = Some((
                    Group {
                        src1,
                        src1_info,
                        members: vec![m],
                        weights: weight,
                        speculative: 0,
                    },
                    range,
                ));
            }
        }
    }
    if let Some((done, range)) = open.take() {
        run_group(dev, &ctx.host, done, range, &mut stash);
    }
    GGML_STATUS_SUCCESS
}

fn print_stats(dev: &DeviceState) {
    let counters = dev.engine.counters();
    let text = match Config::get().stats {
        StatsMode::Off => return,
        StatsMode::Table => {
            dev.stats
                .to_table(dev.engine.name(), counters, open::engine_attempts())
        }
        StatsMode::Json => format!(
            "ggml-ane-stats: {}\n",
            dev.stats
                .to_json(dev.engine.name(), counters, open::engine_attempts())
        ),
    };
    // One write for the whole text: the host's logger thread writes to stderr concurrently, and
    // `eprint!` would issue several writes that its lines could split.
    use std::io::Write;
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}

/// Runs `f`, turning a panic into `fallback`: unwinding across the C ABI would abort the host.
fn guard<T>(fallback: T, f: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|_| {
        eprintln!("ggml-ane: internal panic caught at the C boundary");
        fallback
    })
}

// ---------------------------------------------------------------------------------------------
// backend interface

static GUID: [u8; 16] = *b"ggml-ane-backend";

unsafe extern "C" fn ggml_backend_ane_get_name(_backend: ggml_backend_t) -> *const c_char {
    c"ANE".as_ptr()
}

unsafe extern "C" fn ggml_backend_ane_free(backend: ggml_backend_t) {
    guard((), || {
        if let Ok(dev) = device_state() {
            print_stats(dev);
        }
        if !backend.is_null() {
            // SAFETY: backends and their contexts are created by `Box::into_raw` in init_backend
            // and freed once by ggml.
            let b = unsafe { Box::from_raw(backend) };
            if !b.context.is_null() {
                // SAFETY: as above.
                drop(unsafe { Box::from_raw(b.context.cast::<BackendCtx>()) });
            }
        }
    })
}

unsafe extern "C" fn ggml_backend_ane_graph_compute(
    backend: ggml_backend_t,
    cgraph: *mut ggml_cgraph,
) -> i32 {
    guard(GGML_STATUS_FAILED, || {
        // SAFETY: ggml passes a backend made by init_backend, whose context is a `BackendCtx`
        // alive until `free`.
        let Some(ctx) = (unsafe { backend.as_ref() })
            .and_then(|b| unsafe { b.context.cast::<BackendCtx>().as_ref() })
        else {
            return GGML_STATUS_FAILED;
        };
        graph_compute(ctx, cgraph)
    })
}

fn backend_iface() -> ggml_backend_i {
    ggml_backend_i {
        get_name: Some(ggml_backend_ane_get_name),
        free: Some(ggml_backend_ane_free),
        set_tensor_async: None,    // synchronous backend on host memory
        get_tensor_async: None,    // same
        set_tensor_2d_async: None, // same
        get_tensor_2d_async: None, // same
        cpy_tensor_async: None,    // same
        synchronize: None,         // graph_compute returns when the work is done
        graph_plan_create: None,   // graph plans are unused by llama.cpp
        graph_plan_free: None,     // same
        graph_plan_update: None,   // same
        graph_plan_compute: None,  // same
        graph_compute: Some(ggml_backend_ane_graph_compute),
        event_record: None,   // no events
        event_wait: None,     // no events
        graph_optimize: None, // nodes run in graph order
    }
}

// ---------------------------------------------------------------------------------------------
// device interface

unsafe extern "C" fn ggml_backend_ane_device_get_name(_dev: ggml_backend_dev_t) -> *const c_char {
    c"ANE".as_ptr()
}

unsafe extern "C" fn ggml_backend_ane_device_get_description(
    _dev: ggml_backend_dev_t,
) -> *const c_char {
    guard(c"Apple Neural Engine".as_ptr(), || match device_state() {
        Ok(d) if d.engine.name() == "reference" => {
            c"Apple Neural Engine (CPU reference engine)".as_ptr()
        }
        _ => c"Apple Neural Engine".as_ptr(),
    })
}

unsafe extern "C" fn ggml_backend_ane_device_get_memory(
    _dev: ggml_backend_dev_t,
    free: *mut usize,
    total: *mut usize,
) {
    // Host memory backend: it owns no device memory of its own.
    // SAFETY: ggml passes valid out-pointers.
    unsafe {
        if !free.is_null() {
            *free = 0;
        }
        if !total.is_null() {
            *total = 0;
        }
    }
}

unsafe extern "C" fn ggml_backend_ane_device_get_type(_dev: ggml_backend_dev_t) -> i32 {
    GGML_BACKEND_DEVICE_TYPE_ACCEL
}

unsafe extern "C" fn ggml_backend_ane_device_get_props(
    dev: ggml_backend_dev_t,
    props: *mut ggml_backend_dev_props,
) {
    guard((), || {
        // SAFETY: ggml passes a valid props pointer.
        let Some(p) = (unsafe { props.as_mut() }) else {
            return;
        };
        // SAFETY: the callbacks ignore their argument.
        unsafe {
            p.name = ggml_backend_ane_device_get_name(dev);
            p.description = ggml_backend_ane_device_get_description(dev);
            ggml_backend_ane_device_get_memory(dev, &mut p.memory_free, &mut p.memory_total);
        }
        p.type_ = GGML_BACKEND_DEVICE_TYPE_ACCEL;
        p.device_id = null();
        p.caps = ggml_backend_dev_caps::default();
    })
}

unsafe extern "C" fn ggml_backend_ane_device_init_backend(
    dev: ggml_backend_dev_t,
    _params: *const c_char,
) -> ggml_backend_t {
    guard(null_mut(), || {
        if device_state().is_err() {
            return null_mut();
        }
        placement::inspect_devices(dev);
        Box::into_raw(Box::new(ggml_backend {
            guid: &GUID,
            iface: backend_iface(),
            device: dev,
            context: Box::into_raw(Box::<BackendCtx>::default()).cast(),
        }))
    })
}

unsafe extern "C" fn ggml_backend_ane_device_get_buffer_type(
    _dev: ggml_backend_dev_t,
) -> ggml_backend_buffer_type_t {
    guard(null_mut(), || match ggml::ggml() {
        // SAFETY: ggml-base's CPU buffer type is a static object.
        Some(g) => unsafe { (g.cpu_buffer_type)() },
        None => null_mut(),
    })
}

unsafe extern "C" fn ggml_backend_ane_device_supports_op(
    _dev: ggml_backend_dev_t,
    op: *const ggml_tensor,
) -> bool {
    guard(false, || {
        // SAFETY: ggml passes a valid tensor.
        let Some(t) = (unsafe { op.as_ref() }) else {
            return false;
        };
        if is_noop(t.op) {
            return true;
        }
        if t.op != GGML_OP_MUL_MAT {
            return false;
        }
        let (Ok(dev), Some(g)) = (device_state(), ggml::ggml()) else {
            return false;
        };
        // SAFETY: a MUL_MAT has two valid sources.
        let (s0, s1) = unsafe { (&*t.src[0], &*t.src[1]) };
        match support::mul_mat(
            &desc(s0),
            &desc(s1),
            &desc(t),
            g.type_info(s0.type_),
            dev.policy,
        ) {
            Ok(()) if dev.health.is_off() => {
                dev.stats.declined[support::Decline::DeviceOff.index()].fetch_add(1, Relaxed);
                false
            }
            Ok(())
                if dev
                    .health
                    .is_rejected(&health::OpKey::of(&desc(s0), &desc(s1))) =>
            {
                dev.stats.declined[support::Decline::ShapeFailed.index()].fetch_add(1, Relaxed);
                false
            }
            Ok(()) if !cost_says_ane(dev, &desc(s0), &desc(s1), g.is_weight(s0)) => {
                dev.stats.declined[support::Decline::CostModel.index()].fetch_add(1, Relaxed);
                false
            }
            Ok(()) => {
                let usable = placement::weight_usable(g, s0, &dev.stats.declined_buft);
                let learns = usable
                    && Config::get().lookahead
                    && g.is_weight(s0)
                    && lookahead::eligible(&desc(s0), &desc(s1));
                if learns {
                    if let Some(info) = g.type_info(s0.type_) {
                        let w = lookahead::Weight {
                            data: s0.data as usize,
                            desc: desc(s0),
                            info,
                        };
                        let ready = dev
                            .learner
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .observe(w, t.src[1] as usize, &desc(s1), g.buffer_range(s0));
                        // The graph's last group (the LM head) is left to its first dispatch:
                        // a prefill computes it on the CPU for one row, unless all logits are
                        // asked for.
                        if let Some(r) = ready.filter(|r| Config::get().prestage && !r.trailing) {
                            stage_ready(dev, &r);
                        }
                    }
                } else if usable && Config::get().prestage && g.is_weight(s0) {
                    if let Some(i0) = g.type_info(s0.type_) {
                        let m = matmul::Member {
                            src0: Operand {
                                desc: desc(s0),
                                data: s0.data as *const u8,
                            },
                            src0_info: i0,
                            dst: Operand {
                                desc: desc(t),
                                data: t.data as *const u8,
                            },
                        };
                        // With compressed weights a Q8_0/Q4_0 weight is not converted ahead:
                        // alone it runs baked; in a fused group it is staged at first dispatch.
                        let bakeable = Config::get().weights == config::WeightsMode::Compressed
                            && baked::may_bake(&m, dev.engine.limits().max_axis);
                        if !bakeable {
                            // SAFETY: a weight in a host weights buffer, loaded (llama.cpp
                            // reserves its graphs after loading the model); converted once, at
                            // load.
                            unsafe { matmul::prestage(&dev.staged, &dev.stats, &m) };
                        }
                    }
                }
                usable
            }
            Err(d) => {
                dev.stats.declined[d.index()].fetch_add(1, Relaxed);
                false
            }
        }
    })
}

/// Whether a learnt companion joins its head's dispatch: it lies inside the head's buffer
/// (`head_buffer`, so it belongs to a live model), its activations round as the head's do
/// (`matmul::rounds_alike`), and the device would claim it with `src1`.
fn companion_claimed(
    dev: &DeviceState,
    head_ty: i32,
    w: &lookahead::Weight,
    src1: &TensorDesc,
    (lo, hi): (usize, usize),
) -> bool {
    let bytes = w.desc.ne[1] as usize * w.desc.nb[1];
    w.data >= lo
        && w.data.saturating_add(bytes) <= hi
        && matmul::rounds_alike(head_ty, w.desc.ty)
        && cost_says_ane(dev, &w.desc, src1, true)
}

/// Stages a group the lookahead learner completed, as `run_group` will stack it: the head, then
/// the companions it would speculate (inside the head's buffer, claimed by the cost rule).
fn stage_ready(dev: &DeviceState, r: &lookahead::Ready) {
    let Some(range) = r.head_buffer else {
        return;
    };
    let member = |w: &lookahead::Weight| matmul::Member::weight_only(w.desc, w.data, w.info);
    let members: Vec<matmul::Member> = std::iter::once(member(&r.head))
        .chain(
            r.companions
                .iter()
                .filter(|w| companion_claimed(dev, r.head.desc.ty, w, &r.src1_desc, range))
                .map(member),
        )
        .collect();
    // SAFETY: weights of claimed MUL_MATs in a live host weights buffer: the learner hands a group
    // out only when the weight seen now (in a graph being scheduled, so alive) lies in the same
    // buffer range as the head, and companions are kept inside that range. Weights are loaded
    // before llama.cpp reserves its graphs.
    if let Err(e) = unsafe { matmul::stage_at_load(&dev.matmul_cx(), &members) } {
        // Not fatal: the first dispatch stages the group (or falls back to the CPU).
        if crate::config::Config::get().debug {
            eprintln!("ggml-ane: staging at load failed (the first dispatch stages): {e}");
        }
    }
}

/// `GGML_ANE_ROUTE=cost`: whether the cost model estimates this MUL_MAT faster on the ANE (always
/// true with the default `batch` routing).
fn cost_says_ane(dev: &DeviceState, s0: &TensorDesc, s1: &TensorDesc, weight: bool) -> bool {
    if Config::get().route != ane_plan::model::Route::Cost {
        return true;
    }
    let [k, m, ne02, ne03] = s0.ne.map(|v| v as usize);
    let [_, n, ne12, ne13] = s1.ne.map(|v| v as usize);
    let cols = n * (ne12 / ne02.max(1)) * (ne13 / ne03.max(1));
    ane_plan::model::estimate(&dev.planner, &dev.cost, k, m, cols, ne02 * ne03, weight).ane_wins()
}

unsafe extern "C" fn ggml_backend_ane_device_supports_buft(
    _dev: ggml_backend_dev_t,
    buft: ggml_backend_buffer_type_t,
) -> bool {
    guard(false, || match ggml::ggml() {
        // SAFETY: ggml passes a valid buffer type.
        Some(g) => unsafe { (g.buft_is_host)(buft) },
        None => false,
    })
}

struct SyncCell<T>(T);
// SAFETY: the wrapped ggml structs are written once at compile time and only read afterwards (ggml
// never writes to a registry or device it did not allocate).
unsafe impl<T> Sync for SyncCell<T> {}

static DEVICE: SyncCell<ggml_backend_device> = SyncCell(ggml_backend_device {
    iface: ggml_backend_device_i {
        get_name: Some(ggml_backend_ane_device_get_name),
        get_description: Some(ggml_backend_ane_device_get_description),
        get_memory: Some(ggml_backend_ane_device_get_memory),
        get_type: Some(ggml_backend_ane_device_get_type),
        get_props: Some(ggml_backend_ane_device_get_props),
        init_backend: Some(ggml_backend_ane_device_init_backend),
        get_buffer_type: Some(ggml_backend_ane_device_get_buffer_type),
        get_host_buffer_type: None, // the buffer type is already host memory
        buffer_from_host_ptr: None, // weights stay in llama.cpp's CPU buffers
        supports_op: Some(ggml_backend_ane_device_supports_op),
        supports_buft: Some(ggml_backend_ane_device_supports_buft),
        offload_op: None, // weights live in host buffers; supports_op decides placement
        event_new: None,  // no events
        event_free: None, // no events
        event_synchronize: None, // no events
    },
    reg: addr_of!(REG.0) as *mut ggml_backend_reg,
    context: null_mut(),
});

// ---------------------------------------------------------------------------------------------
// backend reg interface

unsafe extern "C" fn ggml_backend_ane_reg_get_name(_reg: ggml_backend_reg_t) -> *const c_char {
    c"ANE".as_ptr()
}

unsafe extern "C" fn ggml_backend_ane_reg_get_device_count(_reg: ggml_backend_reg_t) -> usize {
    1
}

unsafe extern "C" fn ggml_backend_ane_reg_get_device(
    _reg: ggml_backend_reg_t,
    index: usize,
) -> ggml_backend_dev_t {
    if index == 0 {
        addr_of!(DEVICE.0) as *mut ggml_backend_device
    } else {
        null_mut()
    }
}

/// `ggml_backend_set_n_threads` of this backend: the engine uses no CPU threads, but the host's
/// count is what the CPU backend computes fallbacks with (as in CPU-only llama.cpp).
unsafe extern "C" fn ggml_backend_ane_set_n_threads(backend: ggml_backend_t, n_threads: c_int) {
    guard((), || {
        // SAFETY: ggml passes a backend of this device (made by init_backend, alive until free);
        // its context is a `BackendCtx`.
        let ctx = unsafe { backend.as_ref() }
            .filter(|b| b.guid == addr_of!(GUID))
            .and_then(|b| unsafe { b.context.cast::<BackendCtx>().as_ref() });
        if let Some(ctx) = ctx {
            ctx.host.set_n_threads(n_threads);
        }
    })
}

unsafe extern "C" fn ggml_backend_ane_reg_get_proc_address(
    _reg: ggml_backend_reg_t,
    name: *const c_char,
) -> *mut c_void {
    guard(null_mut(), || {
        if name.is_null() {
            return null_mut();
        }
        // SAFETY: ggml passes a NUL-terminated name.
        let name = unsafe { std::ffi::CStr::from_ptr(name) };
        if name == c"ggml_backend_set_n_threads" {
            let f: unsafe extern "C" fn(ggml_backend_t, c_int) = ggml_backend_ane_set_n_threads;
            f as *mut c_void
        } else {
            null_mut()
        }
    })
}

static REG: SyncCell<ggml_backend_reg> = SyncCell(ggml_backend_reg {
    // Set by `ggml_backend_init` to the host's version (`host_api`).
    api_version: std::sync::atomic::AtomicI32::new(GGML_BACKEND_API_VERSION),
    iface: ggml_backend_reg_i {
        get_name: Some(ggml_backend_ane_reg_get_name),
        get_device_count: Some(ggml_backend_ane_reg_get_device_count),
        get_device: Some(ggml_backend_ane_reg_get_device),
        get_proc_address: Some(ggml_backend_ane_reg_get_proc_address),
    },
    context: null_mut(),
});

// ---------------------------------------------------------------------------------------------
// entry points

/// The registry of this backend (`GGML_BACKEND_DL_IMPL`), always the same pointer, reporting the
/// host's backend API version when it is one the plugin supports (`host_api`); NULL otherwise,
/// so no struct is read with a layout the plugin was not built for.
///
/// # Safety
/// Called by ggml's loader; no preconditions.
#[no_mangle]
pub unsafe extern "C" fn ggml_backend_init() -> ggml_backend_reg_t {
    guard(null_mut(), || match host_api::host_api() {
        host_api::HostApi::Supported { api, .. } => {
            REG.0.api_version.store(*api, Relaxed);
            addr_of!(REG.0) as *mut ggml_backend_reg
        }
        host_api::HostApi::Unsupported(line) => {
            say_unsupported(line);
            null_mut()
        }
    })
}

/// The one line for a host of another version, once per process.
fn say_unsupported(line: &str) {
    static SAID: std::sync::Once = std::sync::Once::new();
    SAID.call_once(|| eprintln!("{line}"));
}

/// 0 when the plugin has nothing to offer here: a host whose ggml backend API it does not speak
/// (one line says which versions work; checked first, before anything else runs), no ANE and no
/// `GGML_ANE_ENGINE=reference` (so loading it on Linux changes nothing unless asked); 10
/// otherwise.
///
/// # Safety
/// Called by ggml's loader; no preconditions.
#[no_mangle]
pub unsafe extern "C" fn ggml_backend_score() -> i32 {
    guard(0, || {
        if let host_api::HostApi::Unsupported(line) = host_api::host_api() {
            say_unsupported(line);
            return 0;
        }
        match device_state() {
            Ok(_) => 10,
            Err(why) => {
                static SAID: std::sync::Once = std::sync::Once::new();
                if Config::get().engine != EngineChoice::Auto {
                    SAID.call_once(|| eprintln!("ggml-ane: not available: {why}"));
                }
                0
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_points_at_one_device() {
        // SAFETY: plain calls into our own statics.
        unsafe {
            // No ggml in the test process: init refuses; the registry itself is checked.
            assert!(ggml_backend_init().is_null());
            let reg = addr_of!(REG.0) as *mut ggml_backend_reg;
            assert_eq!((*reg).api_version.load(Relaxed), 3);
            let get_device = (*reg).iface.get_device.unwrap();
            let dev = get_device(reg, 0);
            assert!(!dev.is_null());
            assert_eq!((*dev).reg, reg);
            assert!(get_device(reg, 1).is_null());
            assert_eq!(
                ggml_backend_ane_device_get_type(dev),
                GGML_BACKEND_DEVICE_TYPE_ACCEL
            );
        }
    }

    #[test]
    fn score_is_zero_without_ggml_or_ane() {
        // No ggml-base in the test process and no ANE on Linux: the plugin must decline.
        // SAFETY: plain call.
        assert_eq!(unsafe { ggml_backend_score() }, 0);
    }
}
