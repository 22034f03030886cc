//! Fusion across graph splits ("lookahead"): one dispatch for Q, K and V.
//!
//! llama.cpp's attention block reads one normed input three times, but its node order is Q,
//! RoPE(Q), V, K (b11434 `llm_graph_context::build_attn` expands `q_cur`, `v_cur`, `k_cur` in that
//! order, and `q_cur` is already roped). RoPE is a CPU op, so the scheduler cuts a split after Q:
//! this backend gets Q in one `graph_compute` call and V, K in the next. Fusion inside a split
//! (`joins` in lib.rs) makes V+K one dispatch; this module makes Q+V+K one, which is what the
//! planner's "4 weight dispatches per layer" counts.
//!
//! 1. **Learn** ([`Learner::observe`]): the scheduler asks `supports_op` about a graph's weight
//!    MUL_MATs in node order before anything runs (its first pass), so weights that read the same
//!    src1 tensor as an earlier weight become that weight's *companions* — already for the first
//!    prompt.
//! 2. **Speculate** ([`Stash::speculate`]): when a group whose first weight has companions runs,
//!    the companions join its dispatch. Their outputs go to this backend's stash, beside a copy of
//!    src1's bytes.
//! 3. **Verify** ([`Stash::take`]): when a companion's own MUL_MAT arrives, it takes the stash only
//!    if the weight and dst shape match and its src1 has the same shape, strides and *bytes* as the
//!    copy. Same weights and same activations give the same program outputs, so what is written is
//!    exactly what its own dispatch would have written. Anything else runs normally.
//! 4. **Prune**: a companion whose stash goes unused twice in a row is dropped for good. Graph
//!    tensors live at reused addresses, so a later graph can teach a false pair; it costs wasted
//!    rows in a dispatch until pruned, never a wrong output.
//!
//! The stash belongs to one backend instance (one llama context), the companions to the device.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Mutex;

use crate::ffi::GGML_TYPE_F32;
use crate::ggml::TypeInfo;
use crate::matmul::{Group, Member, Operand};
use crate::stats::Stats;
use crate::support::TensorDesc;

/// Sightings remembered while learning: a layer's weight MUL_MATs are a handful of nodes apart.
const RECENT: usize = 64;
/// Companions kept per weight (Q has two: V and K).
const MAX_COMPANIONS: usize = 4;
/// Consecutive unused speculations after which a pair is dropped.
const MAX_MISSES: u8 = 2;

/// A weight as the learner keeps it: an address is its identity (weights buffers never move).
#[derive(Clone, Copy, Debug)]
pub struct Weight {
    /// `src0->data`.
    pub data: usize,
    /// Shape and strides.
    pub desc: TensorDesc,
    /// ggml traits of its type.
    pub info: TypeInfo,
}

#[derive(Clone, Copy, Debug)]
struct Sighting {
    src1: usize,
    src1_ne: [i64; 4],
    weight: usize,
}

#[derive(Clone, Copy, Debug)]
struct Companion {
    weight: Weight,
    misses: u8,
}

/// What the device has learnt about which weights share their activations.
#[derive(Default, Debug)]
pub struct Learner {
    recent: VecDeque<Sighting>,
    companions: HashMap<usize, Vec<Companion>>,
    refused: HashSet<(usize, usize)>,
    /// The last head weight seen, while weights reading its src1 may still follow.
    open: Option<Ready>,
    /// Heads already handed out as [`Ready`], with their companion count then.
    handed: HashMap<usize, usize>,
}

/// A group whose weights are all known: a head weight and the companions a dispatch of it will
/// stack (see [`Stash::speculate`]), handed out once so the plugin can stage their weights at load
/// (`matmul::stage_ahead`). A prediction only: the staged surface is found by its weights'
/// identity, so a dispatch that stacks other weights stages its own.
#[derive(Clone, Debug)]
pub struct Ready {
    /// The group's first weight.
    pub head: Weight,
    /// Its companions, in the order a dispatch stacks them.
    pub companions: Vec<Weight>,
    /// The src1 the head was seen with.
    pub src1_desc: TensorDesc,
    /// What the caller said of the head's buffer when it was seen.
    pub head_buffer: Option<(usize, usize)>,
    /// Completed by a later pass over the graph (a head handed out before came again): the
    /// graph's last group, which for an LLM is the LM head, used in prefill for one row only.
    pub trailing: bool,
    src1: usize,
}

/// Whether [`Learner::observe`] learns from a MUL_MAT of these operands (2-D weight, contiguous
/// f32 activations, as llama.cpp's projections).
pub fn eligible(weight: &TensorDesc, src1: &TensorDesc) -> bool {
    two_d(weight) && contiguous_f32(src1)
}

/// Activations the stash can copy and compare: contiguous f32 (llama.cpp's normed inputs).
fn contiguous_f32(d: &TensorDesc) -> bool {
    d.ty == GGML_TYPE_F32 && *d == TensorDesc::contiguous(GGML_TYPE_F32, 4, d.ne)
}

fn two_d(d: &TensorDesc) -> bool {
    d.ne[2] == 1 && d.ne[3] == 1
}

impl Learner {
    /// Records that `weight` is multiplied with the graph tensor at `src1` (a claimed MUL_MAT);
    /// `head_buffer` is the byte range of the live buffer holding `weight` (kept in case it heads
    /// a group). Returns the group this sighting completed, if any: the open head's, once a weight
    /// reading another src1 shows that no more companions follow, and only when its head lies in
    /// the same live buffer (see `close`). The last group of a graph is completed by the next pass;
    /// llama.cpp reserves its graphs more than once at load.
    pub fn observe(
        &mut self,
        weight: Weight,
        src1: usize,
        src1_desc: &TensorDesc,
        head_buffer: Option<(usize, usize)>,
    ) -> Option<Ready> {
        if !eligible(&weight.desc, src1_desc) {
            return None;
        }
        let seen = |s: &Sighting| s.src1 == src1 && s.src1_ne == src1_desc.ne;
        let ready = match &self.open {
            Some(o) if o.src1 != src1 || o.src1_desc.ne != src1_desc.ne => {
                let trailing = self.handed.contains_key(&weight.data);
                self.close(head_buffer).map(|r| Ready { trailing, ..r })
            }
            _ => None,
        };
        let head = self.recent.iter().find(|s| seen(s)).map(|s| s.weight);
        if self.open.is_none() && head.is_none_or(|h| h == weight.data) {
            self.open = Some(Ready {
                head: weight,
                companions: Vec::new(),
                src1_desc: *src1_desc,
                head_buffer,
                trailing: false,
                src1,
            });
        }
        if self
            .recent
            .iter()
            .any(|s| seen(s) && s.weight == weight.data)
        {
            return ready; // a later pass over the same graph, or the same graph again
        }
        self.recent.push_back(Sighting {
            src1,
            src1_ne: src1_desc.ne,
            weight: weight.data,
        });
        if self.recent.len() > RECENT {
            self.recent.pop_front();
        }
        let Some(head) = head else { return ready };
        if self.refused.contains(&(head, weight.data)) {
            return ready;
        }
        let list = self.companions.entry(head).or_default();
        let k_of = |w: &Weight| w.desc.ne[0];
        if list.len() < MAX_COMPANIONS
            && !list.iter().any(|c| c.weight.data == weight.data)
            && list.iter().all(|c| k_of(&c.weight) == k_of(&weight))
        {
            list.push(Companion { weight, misses: 0 });
        }
        ready
    }

    /// Completes the open group: its head with the companions learnt so far, unless handed out
    /// before with as many companions. `live` is the buffer of the weight seen now, which is in
    /// use: the group is handed out only if its head lies in that same buffer, because an open
    /// group can be left over from a graph whose model was freed since (its weights must not be
    /// read). A group closed from another buffer waits for a later pass.
    fn close(&mut self, live: Option<(usize, usize)>) -> Option<Ready> {
        let mut r = self.open.take()?;
        if r.head_buffer.is_none() || r.head_buffer != live {
            return None;
        }
        // Every pass over every prompt's graph closes each group again: count before copying.
        let n = self.companions.get(&r.head.data).map_or(0, Vec::len);
        if self.handed.insert(r.head.data, n) == Some(n) {
            return None;
        }
        r.companions = self.of(r.head.data);
        Some(r)
    }

    /// The companions of `head` (empty when none were learnt).
    fn of(&self, head: usize) -> Vec<Weight> {
        self.companions
            .get(&head)
            .map(|l| l.iter().map(|c| c.weight).collect())
            .unwrap_or_default()
    }

    fn hit(&mut self, head: usize, weight: usize) {
        if let Some(c) = self
            .companions
            .get_mut(&head)
            .and_then(|l| l.iter_mut().find(|c| c.weight.data == weight))
        {
            c.misses = 0;
        }
    }

    fn miss(&mut self, head: usize, weight: usize) {
        let Some(list) = self.companions.get_mut(&head) else {
            return;
        };
        if let Some(c) = list.iter_mut().find(|c| c.weight.data == weight) {
            c.misses += 1;
            if c.misses >= MAX_MISSES {
                list.retain(|c| c.weight.data != weight);
                self.refused.insert((head, weight));
            }
        }
    }
}

#[derive(Debug)]
struct Entry {
    weight: usize,
    weight_desc: TensorDesc,
    /// dst shape the output was computed for.
    ne: [i64; 4],
    /// Contiguous f32 outputs.
    out: Vec<f32>,
    /// Speculated, its compute not finished yet.
    pending: bool,
    /// Computed and not taken yet.
    live: bool,
    /// Computed by the CPU fallback (counted as such when taken).
    fallback: bool,
}

/// One backend's speculative outputs, waiting for their own MUL_MATs.
#[derive(Debug, Default)]
pub struct Stash {
    head: usize,
    src1_desc: Option<TensorDesc>,
    /// src1's bytes when the outputs were computed.
    snapshot: Vec<u8>,
    entries: Vec<Entry>,
    /// src1 address already compared in the current `graph_compute` call.
    verified: Option<usize>,
}

impl Stash {
    /// Forgets which src1 was compared: at the start of a `graph_compute` call, whenever the
    /// stash is refilled, and after any group ran (which may have freed and reused memory).
    pub fn begin(&mut self) {
        self.verified = None;
    }

    /// Outputs not taken count as misses of their pair; the stash is emptied.
    fn retire(&mut self, learner: &Mutex<Learner>, stats: &Stats) {
        let mut l = learner.lock().unwrap_or_else(|e| e.into_inner());
        for e in self.entries.iter_mut() {
            if e.live {
                l.miss(self.head, e.weight);
                stats.lookahead_wasted.fetch_add(1, Relaxed);
            }
            e.live = false;
            e.pending = false;
        }
        self.src1_desc = None;
        self.verified = None;
    }

    /// Adds the learnt companions of `g`'s first weight that `claims` (would the device claim that
    /// weight with this src1?) to `g`, outputs into this stash, replacing what it held, and copies
    /// src1. Returns how many were added (also in `g.speculative`).
    ///
    /// # Safety
    /// `claims` passes only weights whose memory is alive (inside the head's live buffer); the
    /// stash must outlive the computation of `g` and not change in between (the added members'
    /// outputs are views of it).
    pub unsafe fn speculate(
        &mut self,
        learner: &Mutex<Learner>,
        stats: &Stats,
        g: &mut Group,
        claims: impl Fn(&Weight, &TensorDesc) -> bool,
    ) -> usize {
        let d = g.src1.desc;
        if !g.weights || !contiguous_f32(&d) || !g.members.iter().all(|m| two_d(&m.src0.desc)) {
            return 0;
        }
        let head = g.members[0].src0.addr();
        let k = g.members[0].src0.desc.ne[0];
        if head == self.head {
            // The same head again: what it stashed last time was not used.
            self.retire(learner, stats);
        }
        let comps: Vec<Weight> = learner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .of(head)
            .into_iter()
            .filter(|w| w.desc.ne[0] == k && claims(w, &d))
            .filter(|w| !g.members.iter().any(|m| m.src0.addr() == w.data))
            .collect();
        if comps.is_empty() {
            return 0;
        }
        self.retire(learner, stats);
        self.head = head;
        self.src1_desc = Some(d);
        let bytes = d.nb[3] * d.ne[3] as usize;
        // src1 is a contiguous f32 tensor of `bytes` bytes (checked above).
        let src = g.src1.bytes(0, bytes);
        self.snapshot.clear();
        self.snapshot.extend_from_slice(src);
        self.entries.resize_with(comps.len(), || Entry {
            weight: 0,
            weight_desc: TensorDesc::contiguous(GGML_TYPE_F32, 4, [0; 4]),
            ne: [0; 4],
            out: Vec::new(),
            pending: false,
            live: false,
            fallback: false,
        });
        for (e, w) in self.entries.iter_mut().zip(&comps) {
            let ne = [w.desc.ne[1], d.ne[1], d.ne[2], d.ne[3]];
            e.weight = w.data;
            e.weight_desc = w.desc;
            e.ne = ne;
            e.out.clear();
            e.out.resize(ne.iter().product::<i64>() as usize, 0.0);
            // Live only once computed (`computed`): a compute that never returns leaves nothing
            // to take.
            e.pending = true;
            e.live = false;
            e.fallback = false;
            g.members.push(Member {
                // SAFETY: `claims` passed it: a live weight (this function's contract).
                src0: unsafe { Operand::of_parts(w.desc, w.data, &w.info) },
                src0_info: w.info,
                // SAFETY: the stash outlives the computation of `g` and does not change in
                // between (this function's contract); only that computation writes `e.out`.
                dst: unsafe {
                    Operand::of_f32_mut(TensorDesc::contiguous(GGML_TYPE_F32, 4, ne), &mut e.out)
                },
            });
        }
        g.speculative = comps.len();
        comps.len()
    }

    /// The speculated outputs are written (by the engine, or by the CPU path if `fallback`):
    /// from now on they can be taken.
    pub fn computed(&mut self, fallback: bool) {
        for e in self.entries.iter_mut().filter(|e| e.pending) {
            e.pending = false;
            e.live = true;
            e.fallback = fallback;
        }
    }

    /// Whether a live output waits for this weight (cheap; [`Stash::take`] verifies).
    pub fn waits_for(&self, m: &Member) -> bool {
        self.entries
            .iter()
            .any(|e| e.live && e.weight == m.src0.addr())
    }

    /// Writes the stashed output of `m` into its dst if it is exactly what computing `m` on
    /// `src1` would give; returns whether it did. `m` and `src1` are one MUL_MAT of the graph
    /// being computed.
    pub fn take(
        &mut self,
        learner: &Mutex<Learner>,
        stats: &Stats,
        m: &Member,
        src1: &Operand,
    ) -> bool {
        let Some(i) = self
            .entries
            .iter()
            .position(|e| e.live && e.weight == m.src0.addr())
        else {
            return false;
        };
        let same_shape = {
            let e = &self.entries[i];
            e.weight_desc == m.src0.desc
                && e.ne == m.dst.desc.ne
                && self.src1_desc == Some(src1.desc)
        };
        let same_bytes = same_shape
            && (self.verified == Some(src1.addr())
                // src1 has the snapshot's (contiguous) description, so as many bytes.
                || src1.bytes(0, self.snapshot.len()) == self.snapshot.as_slice());
        let e = &mut self.entries[i];
        e.live = false;
        let mut l = learner.lock().unwrap_or_else(|e| e.into_inner());
        if !same_bytes {
            l.miss(self.head, e.weight);
            stats.lookahead_mismatch.fetch_add(1, Relaxed);
            return false;
        }
        l.hit(self.head, e.weight);
        drop(l);
        self.verified = Some(src1.addr());
        let [m0, n, n2, n3] = e.ne.map(|v| v as usize);
        let mut at = 0;
        for i3 in 0..n3 {
            for i2 in 0..n2 {
                for i1 in 0..n {
                    let row = &e.out[at..at + m0];
                    at += m0;
                    let copied = m
                        .dst
                        .with_f32s_mut(i1, i2, i3, m0, |dst| dst.copy_from_slice(row));
                    if copied.is_none() {
                        for (i0, &v) in row.iter().enumerate() {
                            m.dst.put(i0, i1, i2, i3, v);
                        }
                    }
                }
            }
        }
        if e.fallback {
            stats.ops_fallback.fetch_add(1, Relaxed);
        } else {
            stats.ops_offloaded.fetch_add(1, Relaxed);
            stats.ops_fused.fetch_add(1, Relaxed);
        }
        stats.lookahead_hits.fetch_add(1, Relaxed);
        true
    }
}

#[cfg(test)]
mod tests;
