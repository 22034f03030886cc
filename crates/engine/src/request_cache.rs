//! Requests cached per program for direct binding, and when they go.
//!
//! The private driver binds the plugin's own IOSurfaces without copies through one `_ANERequest`
//! per set of surfaces, cached per program (one compiled model, many requests: a model's layers
//! share programs). A cached request retains its surfaces, so an entry must go as soon as one of
//! its surfaces is dropped by the plugin (an evicted staged weight, a scratch surface the pool let
//! go): otherwise the IOSurface stays alive, with its memory, as long as the program. Dead entries
//! are purged on **every** lookup (every bound evaluation), not only when a new request is
//! inserted; past [`RequestCache::new`]'s bound the least recently used entry goes. Generic over
//! the request, so the rule is tested here with plain values.

use std::collections::HashMap;
use std::sync::Weak;

/// Cached requests by the ids of their surfaces, in binding order.
#[derive(Debug)]
pub struct RequestCache<R> {
    entries: HashMap<Vec<u64>, Entry<R>>,
    tick: u64,
    max: usize,
}

#[derive(Debug)]
struct Entry<R> {
    request: R,
    /// One per surface the request retains: dead once the plugin dropped that surface.
    alive: Vec<Weak<()>>,
    used: u64,
}

impl<R: Clone> RequestCache<R> {
    /// A cache of at most `max` requests.
    pub fn new(max: usize) -> Self {
        RequestCache {
            entries: HashMap::new(),
            tick: 0,
            max: max.max(1),
        }
    }

    /// The request for the surfaces `key`: entries whose surfaces were dropped are purged first,
    /// then the cached one is returned, or `make` builds one, which is cached with `alive` (the
    /// liveness of its surfaces), evicting the least recently used entry when full.
    ///
    /// # Errors
    /// `make`'s error (nothing is cached then).
    pub fn get_or_make<E>(
        &mut self,
        key: Vec<u64>,
        alive: impl FnOnce() -> Vec<Weak<()>>,
        make: impl FnOnce() -> Result<R, E>,
    ) -> Result<R, E> {
        self.tick += 1;
        let tick = self.tick;
        self.entries
            .retain(|_, e| e.alive.iter().all(|w| w.strong_count() > 0));
        if let Some(e) = self.entries.get_mut(&key) {
            e.used = tick;
            return Ok(e.request.clone());
        }
        let request = make()?;
        if self.entries.len() >= self.max {
            let oldest = self
                .entries
                .iter()
                .min_by_key(|(_, e)| e.used)
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                self.entries.remove(&k);
            }
        }
        self.entries.insert(
            key,
            Entry {
                request: request.clone(),
                alive: alive(),
                used: tick,
            },
        );
        Ok(request)
    }

    /// Requests cached.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when none is cached.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Drops every request (the program is unloaded).
    pub fn clear(&mut self) {
        self.entries.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// A request standing for an `_ANERequest`: it retains its surfaces' memory.
    #[derive(Clone, Debug)]
    struct Req(#[allow(dead_code)] Vec<Arc<()>>);

    /// A surface the plugin holds: its memory (an IOSurface) and its liveness token.
    struct Surf {
        id: u64,
        io: Arc<()>,
        token: Arc<()>,
    }

    fn surf(id: u64) -> Surf {
        Surf {
            id,
            io: Arc::new(()),
            token: Arc::new(()),
        }
    }

    fn lookup(c: &mut RequestCache<Req>, surfaces: &[&Surf], made: &mut usize) {
        let key = surfaces.iter().map(|s| s.id).collect();
        c.get_or_make(
            key,
            || surfaces.iter().map(|s| Arc::downgrade(&s.token)).collect(),
            || -> Result<Req, ()> {
                *made += 1;
                Ok(Req(surfaces.iter().map(|s| s.io.clone()).collect()))
            },
        )
        .unwrap();
    }

    #[test]
    fn a_dropped_surface_purges_its_requests_on_the_next_evaluation() {
        let mut c = RequestCache::new(8);
        let mut made = 0;
        let (w1, w2, x) = (surf(1), surf(2), surf(3));
        lookup(&mut c, &[&w1, &x], &mut made);
        lookup(&mut c, &[&w2, &x], &mut made);
        lookup(&mut c, &[&w1, &x], &mut made);
        assert_eq!(
            (made, c.len()),
            (2, 2),
            "the same surfaces reuse their request"
        );
        // The plugin evicts weight 1: only the cached request keeps its memory alive.
        let memory = Arc::downgrade(&w1.io);
        drop(w1);
        assert!(memory.upgrade().is_some(), "retained by the cached request");
        // The next evaluation uses a request already cached (nothing inserted): the dead entry
        // goes anyway, and with it the surface's memory.
        lookup(&mut c, &[&w2, &x], &mut made);
        assert_eq!(made, 2, "no new request was built");
        assert_eq!(c.len(), 1);
        assert!(
            memory.upgrade().is_none(),
            "the evicted surface is released"
        );
    }

    #[test]
    fn the_least_recently_used_request_goes_when_full() {
        let mut c = RequestCache::new(2);
        let mut made = 0;
        let s: Vec<Surf> = (0..3).map(surf).collect();
        lookup(&mut c, &[&s[0]], &mut made);
        lookup(&mut c, &[&s[1]], &mut made);
        lookup(&mut c, &[&s[0]], &mut made);
        lookup(&mut c, &[&s[2]], &mut made);
        assert_eq!(c.len(), 2);
        lookup(&mut c, &[&s[0]], &mut made);
        assert_eq!(made, 3, "0 stayed (recently used), 1 went");
        lookup(&mut c, &[&s[1]], &mut made);
        assert_eq!(made, 4);
        let failed = c.get_or_make(vec![9], Vec::new, || Err::<Req, _>("nil request"));
        assert_eq!(failed.unwrap_err(), "nil request");
        assert_eq!(c.len(), 2, "a failed build caches nothing");
        c.clear();
        assert!(c.is_empty());
    }
}
