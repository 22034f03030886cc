//! Computing a graph split: claimed MUL_MAT nodes in order, fused into groups that share src1
//! (`joins`), the lookahead's speculated companions added (`lookahead`), each group handed to
//! [`matmul::compute`].

use std::sync::atomic::Ordering::Relaxed;

use crate::config::{Config, StatsMode};
use crate::device::*;
use crate::ffi::*;
use crate::matmul::{self, Group, Member, Operand};
use crate::support::is_noop;
use crate::support::{self, Policy, TensorDesc};
use crate::view::desc;
use crate::view::fetch::Fetch;
use crate::view::residence::Access;
use crate::{bridge, ggml, host_cpu, lookahead, open, placement};

/// A claimed MUL_MAT node made into views: the group member, its activations, and how its weight
/// is read.
pub(crate) struct Node {
    pub member: Member,
    pub src1: Operand,
    pub src1_info: ggml::TypeInfo,
    /// src0 lives in a weights buffer.
    pub weight: bool,
    /// src0, src1 and the output are read in place (not copies through ggml's API): only then
    /// do the lookahead and the buffer range of the weight apply.
    pub in_place: bool,
    /// src0 is a weight in a GPU's buffer the plugin reads: the GPU can take rows of it
    /// (`crate::split`).
    pub on_gpu: bool,
}

/// A claimed MUL_MAT node as a group member, after re-checking what compute relies on; operands
/// the plugin reads only through ggml's API are copied by `fetch`.
///
/// # Safety
/// `node` is a MUL_MAT of the graph ggml handed to `graph_compute`, with allocated tensors.
pub(crate) unsafe fn member(
    g: &ggml::Ggml,
    fetch: &mut Fetch<'_>,
    node: &ggml_tensor,
) -> Result<Node, String> {
    // SAFETY: a MUL_MAT node has two valid sources.
    let (s0, s1) = unsafe { (&*node.src[0], &*node.src[1]) };
    let i0 = g.type_info(s0.type_).ok_or("unknown src0 type")?;
    let i1 = g.type_info(s1.type_).ok_or("unknown src1 type")?;
    let f32_info = g.type_info(GGML_TYPE_F32).ok_or("no f32 traits")?;
    // Whatever the scheduler sends, compute only what support::mul_mat accepts shape-wise (the
    // batch-size gate does not matter for correctness here).
    let policy = Policy { min_batch: 0 };
    support::mul_mat(&desc(s0), &desc(s1), &desc(node), Some(i0), policy)
        .map_err(|d| format!("unsupported MUL_MAT: {}", d.name()))?;
    if s0.data.is_null() || s1.data.is_null() || node.data.is_null() {
        return Err("MUL_MAT tensor without data".into());
    }
    let weight = g.is_weight(s0);
    let access = (
        placement::weight_access(g, s0),
        placement::activation_access(g, s1),
        placement::activation_access(g, node),
    );
    // SAFETY: tensors of the graph being computed: allocated, of their shapes, host memory where
    // `access` says Direct (the residence rules), the output apart from its sources (ggml
    // allocates an op's output apart from its inputs).
    unsafe {
        Ok(Node {
            member: Member {
                src0: fetch.input(s0, &i0, access.0, weight)?,
                src0_info: i0,
                dst: fetch.output(std::ptr::from_ref(node).cast_mut(), &f32_info, access.2)?,
            },
            src1: fetch.input(s1, &i1, access.1, false)?,
            src1_info: i1,
            weight,
            in_place: access == (Access::Direct, Access::Direct, Access::Direct),
            on_gpu: weight && placement::on_gpu(g, s0),
        })
    }
}

/// The group being built, with what its computation needs beyond the views.
pub(crate) struct Open {
    pub group: Group,
    /// The byte range of the buffer holding the first weight (`None`: no lookahead companions).
    pub range: Option<(usize, usize)>,
    /// Every member's weight tensor, when all of them live in a GPU's buffer the plugin reads
    /// (the GPU can take rows of the group, `crate::split`).
    pub gpu_weights: Option<Vec<*const ggml_tensor>>,
    /// Every member's weight is read in place: beyond the resident set the group may stream
    /// through the instance's ring (whose background thread must never read the plugin's own
    /// copies of remote weights, which can be replaced).
    pub in_place: bool,
}

/// Runs a group through the planner and engine: split with the GPU when its weights sit in a
/// GPU's buffer and the share says so (`crate::split`), else on the device alone, with its learnt
/// companions (see [`lookahead`]) when `range`, the byte range of the buffer holding the group's
/// first weight, is known: only companions inside it are read (a companion learnt from a model
/// freed since is never touched).
pub(crate) fn run_group(split: &mut Split<'_, '_>, open: Open) {
    let Open {
        mut group,
        range: head_buffer,
        gpu_weights,
        in_place,
    } = open;
    let (dev, host, companions) = (split.dev, split.host, split.companions);
    let cx = matmul::Context {
        host: Some(host),
        act_round: Config::get().act_round,
        // Not for weights on a GPU the budget admitted (`gpu_memory`): they fit, and a ring
        // would make the resident set give up room for nothing.
        stream: (in_place && group.weights && (gpu_weights.is_none() || Config::get().gpu_stream))
            .then_some(split.stream),
        ..dev.matmul_cx()
    };
    let on_gpu = gpu_weights.is_some();
    if let (Some(weights), Some(g)) = (gpu_weights, ggml::ggml()) {
        let machine = || {
            // SAFETY: the first member's weight is a live tensor of this graph's model.
            let gpu = placement::device_of(g, unsafe { &*weights[0] });
            crate::split::machine_key(dev.engine.name(), &format!("{:?}", dev.engine.chip()), &gpu)
        };
        let job = crate::split::Job {
            cx: &cx,
            group: &group,
            weights: &weights,
            gpu: split.gpu,
            ggml: g,
            machine: &machine,
        };
        if crate::split::run(&dev.splitter, &job).is_some() {
            split.stash.begin();
            split.write_back();
            return;
        }
    }
    let stash = &mut *split.stash;
    // SAFETY: the group was built from this graph's claimed MUL_MATs (valid host tensors); the
    // stash is borrowed until the group is computed.
    let head_ty = group.members[0].src0.desc.ty;
    let speculated = Config::get().lookahead
        && !dev.health.is_off()
        && head_buffer.is_some_and(|range| {
            // SAFETY: as above.
            // Beside a GPU only companions admitted to the GPU weights' budget (the others stay
            // with the GPU, `gpu_memory`).
            let admitted = |w: &lookahead::Weight| {
                !on_gpu
                    || Config::get().gpu_stream
                    || dev
                        .gpu_weights
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .is_admitted(w.data)
            };
            let added = unsafe {
                stash.speculate(&dev.learner, &dev.stats, &mut group, |w, src1| {
                    companions(dev, head_ty, w, src1, range) && admitted(w)
                })
            };
            added > 0
        });
    let fallback = matmul::compute(&cx, &group);
    if speculated {
        stash.computed(fallback);
    }
    // Memory may have changed hands: the next take compares bytes again.
    stash.begin();
    split.write_back();
}

/// Counts a computed node by its weight's name ("where each matmul ran"), when stats are on.
fn count_weight(dev: &DeviceState, node: &ggml_tensor) {
    if Config::get().stats != StatsMode::Off {
        // SAFETY: a MUL_MAT or MUL_MAT_ID has a valid src0 with a NUL-terminated name.
        let name = unsafe { std::ffi::CStr::from_ptr((*node.src[0]).name.as_ptr()) };
        dev.stats.count_weight(&name.to_string_lossy());
    }
}

/// Fusion rule: a MUL_MAT joins the open group when it reads the same src1, its src0 is a 2-D
/// weight with the same K, and only no-op nodes or group members lie in between. Then no tensor is
/// freed (and its memory handed to a later member's output) between the first and the last member,
/// so computing all of them at once is the same as computing them in graph order.
pub(crate) fn joins(group: &Group, m: &Member, src1: &Operand, weight: bool) -> bool {
    let first = &group.members[0].src0.desc;
    group.weights
        && weight
        && group.src1.addr() == src1.addr()
        && group.src1.desc == src1.desc
        && first.ne[2] == 1
        && first.ne[3] == 1
        && m.src0.desc.ne[2] == 1
        && m.src0.desc.ne[3] == 1
        && m.src0.desc.ne[0] == first.ne[0]
        && matmul::rounds_alike(first.ty, m.src0.desc.ty)
}

/// Which learnt companions a group may speculate: the claim rule (`crate::claim`), handed down
/// by the boundary so that computing never reaches back into claiming.
pub(crate) type CompanionRule =
    fn(&DeviceState, i32, &lookahead::Weight, &TensorDesc, (usize, usize)) -> bool;

/// What the groups of one graph split share.
pub(crate) struct Split<'a, 's> {
    dev: &'a DeviceState,
    host: &'a host_cpu::HostCpu,
    stash: &'s mut lookahead::Stash,
    companions: CompanionRule,
    /// The split's operands read through ggml's API, alive until it returns.
    fetch: Fetch<'a>,
    /// An output could not be written back.
    failed: bool,
    /// The GPU's backend of this instance, for the GPU's rows of split groups.
    gpu: &'a crate::host_gpu::HostGpu,
    /// This instance's streaming ring.
    stream: &'a matmul::Streamer,
}

impl Split<'_, '_> {
    /// Writes the outputs copied out through ggml's API (after the group that computed them).
    fn write_back(&mut self) {
        if let Err(e) = self.fetch.write_back() {
            eprintln!("ggml-ane: {e}");
            self.failed = true;
        }
    }
}

pub(crate) fn graph_compute(
    ctx: &BackendCtx,
    cgraph: *mut ggml_cgraph,
    companions: CompanionRule,
) -> i32 {
    let (Ok(dev), Some(g)) = (device_state(), ggml::ggml()) else {
        return GGML_STATUS_FAILED;
    };
    let mut stash = ctx.stash.lock().unwrap_or_else(|e| e.into_inner());
    stash.begin();
    let mut split = Split {
        dev,
        host: &ctx.host,
        stash: &mut stash,
        companions,
        fetch: Fetch::new(g, &dev.weight_copies),
        failed: false,
        gpu: &ctx.gpu,
        stream: &ctx.stream,
    };
    let lookahead = Config::get().lookahead;
    // SAFETY: ggml passes a valid graph; nodes are valid tensors for the duration of the call.
    let n = unsafe { (g.graph_n_nodes)(cgraph) };
    // The open group and the buffer range of its first weight (`None`: no lookahead companions).
    let mut open: Option<Open> = None;
    // The address of the open group's src1 tensor (its view may be a copy).
    let mut open_src1 = 0usize;
    for i in 0..n {
        // SAFETY: 0 <= i < n.
        let Some(node) = (unsafe { (g.graph_node)(cgraph, i).as_ref() }) else {
            return GGML_STATUS_FAILED;
        };
        if is_noop(node.op) || node.flags & GGML_TENSOR_FLAG_COMPUTE == 0 {
            continue;
        }
        if node.op == GGML_OP_MUL_MAT_ID {
            // Graph order: the open group first.
            if let Some(o) = open.take() {
                run_group(&mut split, o);
            }
            let cx = matmul::Context {
                host: Some(&ctx.host),
                act_round: Config::get().act_round,
                ..dev.matmul_cx()
            };
            count_weight(dev, node);
            // The expert budget's pass bookkeeping (`claim::ClaimBudget::used`).
            // SAFETY: a MUL_MAT_ID has a valid src0.
            let experts = unsafe { &*node.src[0] };
            if g.is_weight(experts) {
                let mut b = dev.experts.lock().unwrap_or_else(|e| e.into_inner());
                b.used(experts.data as usize);
            }
            // SAFETY: node is a claimed MUL_MAT_ID of this graph (valid tensors).
            let done = unsafe { crate::mul_mat_id::compute(&cx, g, &mut split.fetch, node) };
            let done = done.and_then(|d| split.fetch.write_back().map(|()| d));
            match done {
                Ok(done) => {
                    dev.stats.mul_mat_id_ops.fetch_add(1, Relaxed);
                    dev.stats
                        .mul_mat_id_experts
                        .fetch_add(done.experts as u64, Relaxed);
                    dev.stats
                        .mul_mat_id_packs
                        .fetch_add(done.packs as u64, Relaxed);
                }
                Err(e) => {
                    eprintln!("ggml-ane: {e}");
                    return GGML_STATUS_FAILED;
                }
            }
            split.stash.begin();
            continue;
        }
        if bridge::is_bridge(node.op) {
            // Graph order: the open group first (the op may read its outputs).
            if let Some(o) = open.take() {
                run_group(&mut split, o);
            }
            // SAFETY: node is a claimed bridge op of this graph (valid tensors).
            if let Err(e) = unsafe { bridge::compute(g, &mut split.fetch, &ctx.host, node) } {
                eprintln!("ggml-ane: {e}");
                return GGML_STATUS_FAILED;
            }
            dev.stats.bridge_ops.fetch_add(1, Relaxed);
            split.stash.begin();
            continue;
        }
        if node.op != GGML_OP_MUL_MAT {
            eprintln!("ggml-ane: graph_compute got op {} it never claims", node.op);
            return GGML_STATUS_FAILED;
        }
        // SAFETY: a MUL_MAT node has a valid src1.
        let src1_at = unsafe { (*node.src[1]).data as usize };
        if open.is_some() && src1_at != open_src1 {
            // Another src1: the open group is complete. Computed (and its outputs written back)
            // before this node's operands are copied, in case one of them is such an output.
            if let Some(o) = open.take() {
                run_group(&mut split, o);
            }
        }
        // SAFETY: node is a MUL_MAT of this graph.
        let n = match unsafe { member(g, &mut split.fetch, node) } {
            Ok(v) => v,
            Err(e) => {
                eprintln!("ggml-ane: {e}");
                return GGML_STATUS_FAILED;
            }
        };
        let Node {
            member: m,
            src1,
            src1_info,
            weight,
            in_place,
            on_gpu,
        } = n;
        count_weight(dev, node);
        if on_gpu {
            // The GPU weights' budget's pass bookkeeping (`claim::ClaimBudget::used`).
            let mut b = dev.gpu_weights.lock().unwrap_or_else(|e| e.into_inner());
            // SAFETY: a MUL_MAT node has a valid src0.
            b.used(unsafe { (*node.src[0]).data as usize });
        }
        if lookahead && weight && in_place && split.stash.waits_for(&m) {
            // Computed in an earlier split's dispatch: the groups before it run first (graph order).
            if let Some(o) = open.take() {
                run_group(&mut split, o);
            }
            if split.stash.take(&dev.learner, &dev.stats, &m, &src1) {
                continue;
            }
        }
        match open.as_mut() {
            Some(o) if joins(&o.group, &m, &src1, weight) => {
                o.group.members.push(m);
                o.in_place &= in_place;
                o.gpu_weights = o.gpu_weights.take().filter(|_| on_gpu).map(|mut w| {
                    w.push(node.src[0].cast_const());
                    w
                });
            }
            _ => {
                if let Some(o) = open.take() {
                    run_group(&mut split, o);
                }
                // SAFETY: a MUL_MAT node has a valid src0.
                let range = in_place
                    .then(|| g.buffer_range(unsafe { &*node.src[0] }))
                    .flatten();
                open_src1 = src1_at;
                open = Some(Open {
                    group: Group {
                        src1,
                        src1_info,
                        members: vec![m],
                        weights: weight,
                        speculative: 0,
                    },
                    range,
                    gpu_weights: on_gpu.then(|| vec![node.src[0].cast_const()]),
                    in_place,
                });
            }
        }
    }
    if let Some(o) = open.take() {
        run_group(&mut split, o);
    }
    if split.failed {
        return GGML_STATUS_FAILED;
    }
    GGML_STATUS_SUCCESS
}

pub(crate) fn print_stats(dev: &DeviceState) {
    *dev.stats
        .calibrations
        .lock()
        .unwrap_or_else(|e| e.into_inner()) = dev.splitter.report();
    dev.stats
        .weight_copies_bytes
        .store(dev.weight_copies.bytes() as u64, Relaxed);
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
