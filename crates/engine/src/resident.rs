//! Loaded programs and when they are released: exactly once, after the last user.
//!
//! `Engine::unload` may be called while another thread is still evaluating the same program
//! (the plugin's kernel cache evicts from one thread while a second backend dispatches). The
//! program must then stay loaded until that evaluation ends, and be unloaded then: never skipped
//! (the ANE slot and the model directory would leak for the life of the process) and never twice.
//! [`Table`] holds each program in an `Arc`; `get` hands out clones for evaluations, `remove` drops
//! the table's clone, and whoever drops the last clone runs [`Release::release`] through `Drop`.
//! The ANE driver (`apple/`) keeps its programs here; the rule is tested on Linux below.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

/// What a loaded program does when its last user is gone (unload, remove its directory).
pub trait Release {
    /// Called exactly once, when the last holder drops the program.
    fn release(&mut self);
}

/// One loaded program, used under its own mutex; released on drop.
#[derive(Debug)]
pub struct Resident<T: Release>(Mutex<T>);

impl<T: Release> Resident<T> {
    /// Locks the program for one use (an evaluation).
    pub fn lock(&self) -> MutexGuard<'_, T> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<T: Release> Drop for Resident<T> {
    fn drop(&mut self) {
        self.0
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .release();
    }
}

/// Loaded programs by id.
#[derive(Debug)]
pub struct Table<T: Release> {
    programs: HashMap<u64, Arc<Resident<T>>>,
    /// Loaded programs by content key ([`Table::insert_keyed`]), while any id holds them.
    keyed: HashMap<u128, Weak<Resident<T>>>,
}

impl<T: Release> Default for Table<T> {
    fn default() -> Self {
        Table {
            programs: HashMap::new(),
            keyed: HashMap::new(),
        }
    }
}

impl<T: Release> Table<T> {
    /// Adds `program` under `id`.
    pub fn insert(&mut self, id: u64, program: T) {
        self.programs
            .insert(id, Arc::new(Resident(Mutex::new(program))));
    }

    /// Adds `program` under `id`, findable by its content `key` ([`Table::share`]).
    pub fn insert_keyed(&mut self, id: u64, key: u128, program: T) {
        let r = Arc::new(Resident(Mutex::new(program)));
        self.keyed.retain(|_, w| w.strong_count() > 0);
        self.keyed.insert(key, Arc::downgrade(&r));
        self.programs.insert(id, r);
    }

    /// Makes `id` a second name of the loaded program with content `key`, if one is loaded:
    /// the same program is not compiled twice. It is released when every id is removed.
    pub fn share(&mut self, key: u128, id: u64) -> bool {
        match self.keyed.get(&key).and_then(Weak::upgrade) {
            Some(r) => {
                self.programs.insert(id, r);
                true
            }
            None => false,
        }
    }

    /// A handle for one use; the program stays loaded while it is held, even if removed.
    pub fn get(&self, id: u64) -> Option<Arc<Resident<T>>> {
        self.programs.get(&id).cloned()
    }

    /// Makes `id` unreachable and returns the table's handle: dropping it releases the program,
    /// or, while an evaluation holds a handle from [`Table::get`], that evaluation's drop does.
    /// (Returned so that the caller can drop it outside its own locks.)
    #[must_use = "dropping the handle releases the program"]
    pub fn remove(&mut self, id: u64) -> Option<Arc<Resident<T>>> {
        self.programs.remove(&id)
    }

    /// Programs reachable by id.
    pub fn len(&self) -> usize {
        self.programs.len()
    }

    /// True when no program is reachable.
    pub fn is_empty(&self) -> bool {
        self.programs.is_empty()
    }

    /// Every id.
    pub fn ids(&self) -> Vec<u64> {
        self.programs.keys().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    use std::sync::mpsc;

    struct Probe(Arc<AtomicUsize>);

    impl Release for Probe {
        fn release(&mut self) {
            self.0.fetch_add(1, SeqCst);
        }
    }

    #[test]
    fn removal_releases_once() {
        let n = Arc::new(AtomicUsize::new(0));
        let mut t = Table::default();
        t.insert(1, Probe(n.clone()));
        assert!(t.remove(1).is_some());
        assert!(t.remove(1).is_none());
        assert_eq!(n.load(SeqCst), 1);
        assert!(t.is_empty());
    }

    #[test]
    fn an_evaluation_in_flight_delays_the_release_and_then_it_happens() {
        let n = Arc::new(AtomicUsize::new(0));
        let table = Arc::new(Mutex::new(Table::default()));
        table.lock().unwrap().insert(7, Probe(n.clone()));
        let (started, wait_started) = mpsc::channel();
        let (finish, wait_finish) = mpsc::channel::<()>();
        let t2 = table.clone();
        let evaluator = std::thread::spawn(move || {
            let held = t2.lock().unwrap().get(7).expect("loaded");
            let guard = held.lock();
            started.send(()).unwrap();
            wait_finish.recv().unwrap();
            drop(guard);
            drop(held);
        });
        wait_started.recv().unwrap();
        let removed = table.lock().unwrap().remove(7);
        assert!(removed.is_some(), "unload while evaluating");
        drop(removed);
        assert_eq!(n.load(SeqCst), 0, "not released under a running evaluation");
        assert!(
            table.lock().unwrap().get(7).is_none(),
            "but no longer reachable"
        );
        finish.send(()).unwrap();
        evaluator.join().unwrap();
        assert_eq!(
            n.load(SeqCst),
            1,
            "released by the last holder, exactly once"
        );
    }

    #[test]
    fn dropping_the_table_releases_everything() {
        let n = Arc::new(AtomicUsize::new(0));
        let mut t = Table::default();
        for id in 0..5 {
            t.insert(id, Probe(n.clone()));
        }
        drop(t);
        assert_eq!(n.load(SeqCst), 5);
    }

    #[test]
    fn identical_programs_share_one_load_released_with_the_last_id() {
        let n = Arc::new(AtomicUsize::new(0));
        let mut t = Table::default();
        assert!(!t.share(9, 1), "nothing loaded with that content yet");
        t.insert_keyed(1, 9, Probe(n.clone()));
        assert!(t.share(9, 2));
        assert!(!t.share(8, 3), "other content");
        assert_eq!(t.len(), 2);
        drop(t.remove(1));
        assert_eq!(n.load(SeqCst), 0, "id 2 still uses it");
        drop(t.remove(2));
        assert_eq!(n.load(SeqCst), 1, "released once, with the last id");
        assert!(!t.share(9, 4), "a released program is not shared again");
    }
}
