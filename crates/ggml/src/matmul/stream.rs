//! Streaming the weight groups beyond the resident set: a background thread converts the next
//! streamed group while the dispatching thread (and the other backends' splits in between) work
//! on the current one.
//!
//! The plugin is never told the graph's matmul order, but prefill walks the layers in the same
//! order every ubatch, so each backend instance learns the order of its streamed groups from its
//! own dispatches and predicts the next one from it, cyclically (after a pass's last streamed
//! group comes the next ubatch's first). A prediction that does not come true (the last layer's
//! FFN runs for one row, a smaller last ubatch, another graph) costs one conversion, never a wrong
//! output: a surface is handed out only for the key it was converted for, and the key
//! ([`super::stage_key`]) names the weights' address, shape, a fingerprint of their bytes and the
//! tiling.
//!
//! Memory: the instance holds at most [`RING`] streamed surfaces (the one a dispatch uses, and
//! one converted ahead), counted in the device's `ring` bytes beside the resident set, and
//! converts ahead only while the budget has room for it.
//!
//! Safety of the background reads: a recipe holds views of a model's weights. A backend instance
//! belongs to one llama context, and llama.cpp frees a context (and so this instance, whose drop
//! joins the thread) before the model whose weights it computes with; recipes are learnt only from
//! weights read in place (not the plugin's own copies of remote weights, which can be replaced).

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::mpsc;
use std::sync::{Condvar, Mutex};
use std::thread::JoinHandle;

use super::*;

/// Surfaces an instance's ring holds at most: the one a dispatch uses and one converted ahead
/// (the rule `ane plan --ram` applies too).
pub const RING: usize = ane_plan::staging::RING;
/// Streamed groups remembered; beyond it the order is learnt again.
const MAX_ORDER: usize = 8192;
/// Longest wait for a background conversion before the dispatch converts the group itself (a
/// conversion takes milliseconds; this only guards against a stuck thread).
const MAX_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// What converting a group needs: views of its weights, its tiling and surface size.
#[derive(Clone, Debug)]
pub(crate) struct Recipe {
    pub(crate) members: Vec<Member>,
    pub(crate) shape: TiledShape,
    pub(crate) size: usize,
}

#[derive(Debug)]
enum Slot {
    Converting,
    Done(Result<Arc<Surface>, EngineError>),
}

#[derive(Debug, Default)]
struct State {
    /// Streamed groups in the order dispatched, and each one's place in it.
    order: Vec<u128>,
    index: HashMap<u128, usize>,
    recipes: HashMap<u128, Recipe>,
    /// Conversions ahead, by key, with their bytes.
    slots: HashMap<u128, (Slot, usize)>,
    /// The surface handed to the current dispatch (kept, so that its bytes count until the next).
    current: Option<(u128, Arc<Surface>)>,
}

impl State {
    fn held(&self) -> usize {
        self.slots.values().map(|(_, b)| *b).sum::<usize>()
            + self.current.as_ref().map_or(0, |(_, s)| s.alloc_size())
    }

    /// Records `key` in the order (first sighting) and its latest recipe.
    fn learn(&mut self, key: u128, recipe: Recipe) {
        if !self.index.contains_key(&key) {
            if self.order.len() >= MAX_ORDER {
                self.order.clear();
                self.index.clear();
                self.recipes.clear();
            }
            self.index.insert(key, self.order.len());
            self.order.push(key);
        }
        self.recipes.insert(key, recipe);
    }

    /// The streamed group expected after `key`.
    fn next_after(&self, key: u128) -> Option<u128> {
        let i = *self.index.get(&key)?;
        let next = self.order[(i + 1) % self.order.len()];
        (next != key).then_some(next)
    }
}

/// The background thread: where conversions are sent, and its handle to join.
type Worker = (mpsc::Sender<(u128, Recipe)>, JoinHandle<()>);

struct Shared {
    state: Mutex<State>,
    done: Condvar,
    /// The instance is going: conversions still queued are skipped (only the one in progress
    /// is waited for).
    closing: std::sync::atomic::AtomicBool,
}

/// A streamed group's surface and how it was obtained.
pub(crate) struct Taken {
    pub(crate) surface: Arc<Surface>,
    /// Converted ahead by the background thread.
    pub(crate) ahead: bool,
    /// Nanoseconds the caller waited (for the background conversion, or converting itself).
    pub(crate) wait_ns: u64,
}

/// One backend instance's streaming ring and the thread that fills it.
pub struct Streamer {
    engine: Arc<dyn Engine>,
    shared: Arc<Shared>,
    worker: Mutex<Option<Worker>>,
    /// Bytes held by every instance's ring (the device's, shared).
    ring: Arc<AtomicUsize>,
    /// This instance's share of `ring`.
    counted: AtomicUsize,
    /// Convert ahead (`GGML_ANE_STREAM=ahead`, the default); else every streamed group is converted
    /// by its dispatch (`inline`).
    ahead: bool,
    /// Longest wait for a background conversion ([`MAX_WAIT`]).
    max_wait: std::time::Duration,
}

impl std::fmt::Debug for Streamer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Streamer")
            .field("ahead", &self.ahead)
            .finish()
    }
}

impl Streamer {
    /// A ring converting with `engine`, counting its bytes in `ring`.
    pub fn new(engine: Arc<dyn Engine>, ring: Arc<AtomicUsize>, ahead: bool) -> Streamer {
        Streamer {
            engine,
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                done: Condvar::new(),
                closing: std::sync::atomic::AtomicBool::new(false),
            }),
            worker: Mutex::new(None),
            ring,
            counted: AtomicUsize::new(0),
            ahead,
            max_wait: MAX_WAIT,
        }
    }

    /// The same ring with another longest wait for a background conversion (tests).
    #[cfg(test)]
    pub(crate) fn with_max_wait(mut self, d: std::time::Duration) -> Streamer {
        self.max_wait = d;
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Brings the device's ring bytes to this instance's current holding.
    fn recount(&self, st: &State) {
        let held = st.held();
        let old = self.counted.swap(held, Relaxed);
        if held >= old {
            self.ring.fetch_add(held - old, Relaxed);
        } else {
            self.ring.fetch_sub(old - held, Relaxed);
        }
    }

    /// The surface of streamed group `key`: converted ahead (waiting for it if still in
    /// progress), else by `inline` now. Then the group expected next is handed to the background
    /// thread when `room` (bytes the budget leaves beside the resident set) holds it beside what
    /// this ring holds.
    pub(crate) fn take(
        &self,
        key: u128,
        recipe: Recipe,
        room: usize,
        inline: impl FnOnce() -> Result<Surface, EngineError>,
    ) -> Result<Taken, EngineError> {
        let t = Instant::now();
        let mut st = self.lock();
        // The previous dispatch is over: its surface goes (this one takes its place).
        st.current = None;
        if self.ahead {
            st.learn(key, recipe);
        }
        let ready = loop {
            match st.slots.get(&key).map(|(s, _)| s) {
                Some(Slot::Converting) if t.elapsed() >= self.max_wait => {
                    // The thread is stuck or gone: convert here; a late result is dropped.
                    st.slots.remove(&key);
                    break None;
                }
                Some(Slot::Converting) => {
                    st = self
                        .shared
                        .done
                        .wait_timeout(st, self.max_wait.saturating_sub(t.elapsed()))
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
                Some(Slot::Done(_)) => match st.slots.remove(&key) {
                    Some((Slot::Done(r), _)) => break r.ok(),
                    _ => unreachable!("the slot was just seen done"),
                },
                None => break None,
            }
        };
        // Finished conversions for neither this group nor the next: mispredicted.
        let next = st.next_after(key);
        st.slots
            .retain(|k, (s, _)| matches!(s, Slot::Converting) || Some(*k) == next);
        let (surface, ahead) = match ready {
            Some(s) => (s, true),
            None => {
                drop(st);
                let made = inline();
                st = self.lock();
                match made {
                    Ok(s) => (Arc::new(s), false),
                    Err(e) => {
                        self.recount(&st);
                        return Err(e);
                    }
                }
            }
        };
        let wait_ns = t.elapsed().as_nanos() as u64;
        st.current = Some((key, surface.clone()));
        if let Some(next) = next.filter(|n| !st.slots.contains_key(n)) {
            let recipe = st.recipes.get(&next).cloned();
            if let Some(r) = recipe.filter(|r| st.held() + r.size <= room) {
                if self.send(next, r.clone()) {
                    st.slots.insert(next, (Slot::Converting, r.size));
                }
            }
        }
        self.recount(&st);
        Ok(Taken {
            surface,
            ahead,
            wait_ns,
        })
    }

    /// Hands a conversion to the background thread (started on first use). False when the thread
    /// cannot be started.
    fn send(&self, key: u128, recipe: Recipe) -> bool {
        let mut w = self.worker.lock().unwrap_or_else(|e| e.into_inner());
        if w.is_none() {
            let (tx, rx) = mpsc::channel::<(u128, Recipe)>();
            let (engine, shared) = (self.engine.clone(), self.shared.clone());
            let spawned = std::thread::Builder::new()
                .name("ggml-ane-stream".into())
                .spawn(move || convert_loop(engine.as_ref(), &shared, rx));
            match spawned {
                Ok(h) => *w = Some((tx, h)),
                Err(_) => return false,
            }
        }
        w.as_ref()
            .is_some_and(|(tx, _)| tx.send((key, recipe)).is_ok())
    }
}

/// Bytes of a streamed surface counted in the device's ring bytes while this lives (a MUL_MAT_ID's
/// pack converted ahead, [`super::convert_pack_ahead`]).
#[derive(Debug)]
pub struct Held {
    ring: Arc<AtomicUsize>,
    bytes: usize,
}

impl Held {
    /// Counts `bytes` in `ring` until dropped.
    pub(crate) fn new(ring: Arc<AtomicUsize>, bytes: usize) -> Held {
        ring.fetch_add(bytes, Relaxed);
        Held { ring, bytes }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.ring.fetch_sub(self.bytes, Relaxed);
    }
}

/// The background thread: converts what it is sent until the instance goes.
fn convert_loop(engine: &dyn Engine, shared: &Shared, rx: mpsc::Receiver<(u128, Recipe)>) {
    for (key, r) in rx {
        if shared.closing.load(Relaxed) {
            break;
        }
        let made = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            stage(engine, &r.members, 0, 0, &r.shape, r.size, &[])
        }))
        .unwrap_or_else(|_| Err(EngineError::Surface("weight conversion panicked".into())))
        .map(Arc::new);
        let mut st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = st.slots.get_mut(&key) {
            slot.0 = Slot::Done(made);
        }
        drop(st);
        shared.done.notify_all();
    }
}

impl Drop for Streamer {
    /// Joins the background thread: its recipes read the weights of this instance's model, which
    /// llama.cpp frees only after the context that owns this instance.
    fn drop(&mut self) {
        let w = self
            .worker
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some((tx, h)) = w {
            self.shared.closing.store(true, Relaxed);
            drop(tx);
            let _ = h.join();
        }
        let mut st = self.lock();
        st.current = None;
        st.slots.clear();
        self.recount(&st);
    }
}
