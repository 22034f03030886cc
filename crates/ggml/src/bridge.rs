//! Bridge ops: the cheap nodes between two of the device's matmuls in a layer (ROPE of Q and K,
//! the GLU between gate/up and down), claimed in prefill-sized graphs and computed by the host's
//! CPU backend inside the device's split.
//!
//! Why: with the weights on a GPU and the device ahead of it, the scheduler's pass 3
//! (`ggml-backend.cpp:1359-1378`) gives a node that sits between two device nodes, and that the
//! device does not support, to the backend with the most supported inputs: the CPU. Each such node
//! then costs two split crossings (device -> CPU -> device), and on a Mac every crossing drains the
//! GPU. Claimed here, pass 2 keeps it in the device's split (ROPE(Q) and ROPE(K) with Q, K and V;
//! the GLU with gate, up and down). The work is the CPU's own kernel on the CPU's threads, the
//! same numbers as where it ran before. Decode graphs are below the batch gate
//! ([`crate::support::bridge`]) and keep theirs where they were.

use crate::config::Config;
use crate::device::DeviceState;
use crate::ffi::{ggml_tensor, GGML_MAX_SRC, GGML_OP_GLU, GGML_OP_ROPE};
use crate::ggml::Ggml;
use crate::host_cpu::HostCpu;
use crate::placement;
use crate::support;
use crate::view::fetch::Fetch;
use crate::view::residence::Access;
use crate::view::{desc, Operand};

/// Whether `op` is a bridge op.
pub(crate) fn is_bridge(op: i32) -> bool {
    matches!(op, GGML_OP_ROPE | GGML_OP_GLU)
}

/// How the plugin reads source `t` of a bridge op: weights (ROPE's frequency factors) by the
/// weight rules, everything else as an activation; a source not allocated yet (at claim time)
/// is an activation the scheduler will place.
fn source_access(g: &Ggml, t: &ggml_tensor) -> Access {
    if g.is_weight(t) {
        placement::weight_access(g, t)
    } else {
        placement::activation_access(g, t)
    }
}

/// `supports_op` for a bridge op: `GGML_ANE_BRIDGE` on, a device that has not given up, the
/// types and batch of [`support::bridge`], sources the plugin can read where they already are,
/// and a host CPU backend that computes the node.
pub(crate) fn claims(dev: &DeviceState, g: &Ggml, node: &ggml_tensor) -> bool {
    if !Config::get().bridge || dev.health.is_off() {
        return false;
    }
    let srcs: Vec<&ggml_tensor> = node
        .src
        .iter()
        // SAFETY: a node's non-null sources are valid tensors.
        .filter_map(|s| unsafe { s.as_ref() })
        .collect();
    let descs: Vec<_> = srcs.iter().map(|s| desc(s)).collect();
    if support::bridge(node.op, &desc(node), &descs, dev.policy).is_err() {
        return false;
    }
    // Sources not allocated yet (at graph reservation: activations, and views of them) are
    // placed by the scheduler, which copies what the device does not read.
    let readable = srcs
        .iter()
        .all(|s| !placement::is_allocated(s) || source_access(g, s) != Access::No);
    readable && HostCpu::available() && HostCpu::supports(node)
}

/// Computes bridge op `node` of the graph being computed: its sources and output made into views
/// (copied through ggml's API where they live in such a buffer), the node on the host's CPU
/// backend, outputs written back.
///
/// # Safety
/// `node` is a claimed bridge op of the graph ggml handed to `graph_compute`, with allocated
/// tensors, its output apart from its sources.
pub(crate) unsafe fn compute(
    g: &Ggml,
    fetch: &mut Fetch<'_>,
    host: &HostCpu,
    node: &ggml_tensor,
) -> Result<(), String> {
    let mut srcs: [Option<Operand>; GGML_MAX_SRC] = [None; GGML_MAX_SRC];
    for (i, s) in node.src.iter().enumerate() {
        // SAFETY: a node's non-null sources are valid tensors.
        let Some(t) = (unsafe { s.as_ref() }) else {
            continue;
        };
        let info = g
            .type_info(t.type_)
            .ok_or("bridge op: unknown source type")?;
        // SAFETY: an allocated tensor of the graph (or a weight of the model), host memory where
        // the access is Direct (the residence rules).
        srcs[i] = Some(unsafe { fetch.input(t, &info, source_access(g, t), g.is_weight(t))? });
    }
    let info = g.type_info(node.type_).ok_or("bridge op: unknown type")?;
    let at = std::ptr::from_ref(node).cast_mut();
    // SAFETY: the node's output, apart from its sources (the caller's contract).
    let dst = unsafe { fetch.output(at, &info, placement::activation_access(g, node))? };
    host.compute_node(node, &srcs, &dst).map_err(|e| {
        format!(
            "bridge op {}: the host's CPU backend did not compute it ({e:?})",
            node.op
        )
    })?;
    fetch.write_back()
}
