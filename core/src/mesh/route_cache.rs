//! The route cache: destination cell → its home relay, with an expiry
//! (the `lru` crate), in front of the directory.
//!
//! It holds where a cell is, not the next hop: the next hop comes from the
//! shortest paths at the moment a message leaves, so when a link drops
//! every route through it changes at once, and an entry whose home is no
//! longer reachable is dropped as soon as that is known
//! ([`RouteCache::retain_homes`]). An entry also remembers the relay link
//! it was last hinted on (a Route hint sent to the next hop, so that relay
//! need not look the cell up itself); a dropped link forgets its hints.
//!
//! Bounded: at most `capacity` entries (`route_cache_capacity`), least
//! recently used out first; each lives `ttl_ms` (`route_ttl_ms`).

use crate::router::LinkId;
use lru::LruCache;
use relay_codec::{Location, PublicKey};
use std::num::NonZeroUsize;

/// One cached route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CachedRoute {
    /// Where the cell is.
    pub at: Location,
    /// When the entry expires ([`Now::mono_ms`](crate::Now)).
    pub expires_ms: u64,
    /// The relay link a hint for it was last sent on.
    pub hinted: Option<LinkId>,
}

/// Hits and misses, for the hit rate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Lookups answered from the cache.
    pub hits: u64,
    /// Lookups not answered (absent or expired).
    pub misses: u64,
}

/// The route cache; see the [module documentation](self).
pub struct RouteCache {
    lru: LruCache<PublicKey, CachedRoute>,
    ttl_ms: u64,
    stats: CacheStats,
}

impl RouteCache {
    /// An empty cache of at most `capacity` entries (at least 1), each
    /// kept `ttl_ms`.
    pub fn new(capacity: usize, ttl_ms: u64) -> Self {
        Self {
            lru: LruCache::new(NonZeroUsize::new(capacity.max(1)).expect("at least 1")),
            ttl_ms,
            stats: CacheStats::default(),
        }
    }

    /// The route to `cell` at `now_ms`, if cached and not expired (an
    /// expired one is removed). Counted as a hit or a miss.
    pub fn get(&mut self, cell: &PublicKey, now_ms: u64) -> Option<&mut CachedRoute> {
        if self.lru.peek(cell).is_some_and(|r| r.expires_ms <= now_ms) {
            self.lru.pop(cell);
        }
        match self.lru.get_mut(cell) {
            Some(r) => {
                self.stats.hits += 1;
                Some(r)
            }
            None => {
                self.stats.misses += 1;
                None
            }
        }
    }

    /// The entry for `cell`, expired or not, without touching its order
    /// or the counters (for views).
    pub fn peek(&self, cell: &PublicKey) -> Option<&CachedRoute> {
        self.lru.peek(cell)
    }

    /// Learns that `cell` is at `at`, unless a newer location is cached;
    /// the entry's expiry starts again.
    pub fn insert(&mut self, cell: PublicKey, at: Location, now_ms: u64) {
        let expires_ms = now_ms.saturating_add(self.ttl_ms);
        match self.lru.get_mut(&cell) {
            Some(r) if r.at.version > at.version && r.expires_ms > now_ms => {}
            Some(r) => {
                if r.at.home != at.home {
                    r.hinted = None;
                }
                r.at = at;
                r.expires_ms = expires_ms;
            }
            None => {
                self.lru.put(
                    cell,
                    CachedRoute {
                        at,
                        expires_ms,
                        hinted: None,
                    },
                );
            }
        }
    }

    /// `cell` left `at`: the entry goes unless it is newer.
    pub fn withdraw(&mut self, cell: &PublicKey, at: &Location) {
        if self
            .lru
            .peek(cell)
            .is_some_and(|r| r.at.version <= at.version)
        {
            self.lru.pop(cell);
        }
    }

    /// Drops every entry whose home `keep` refuses; returns how many.
    pub fn retain_homes(&mut self, mut keep: impl FnMut(&PublicKey) -> bool) -> usize {
        let gone: Vec<PublicKey> = self
            .lru
            .iter()
            .filter(|(_, r)| !keep(&r.at.home))
            .map(|(c, _)| *c)
            .collect();
        for c in &gone {
            self.lru.pop(c);
        }
        gone.len()
    }

    /// `link` dropped: hints sent on it are forgotten.
    pub fn link_down(&mut self, link: LinkId) {
        for (_, r) in self.lru.iter_mut() {
            if r.hinted == Some(link) {
                r.hinted = None;
            }
        }
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.lru.len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.lru.is_empty()
    }

    /// Hits and misses so far.
    pub fn stats(&self) -> CacheStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(i: u8) -> PublicKey {
        PublicKey([i; 32])
    }

    fn at(home: u8, version: u64) -> Location {
        Location {
            home: k(home),
            version,
        }
    }

    #[test]
    fn an_entry_expires_and_is_counted() {
        let mut c = RouteCache::new(4, 100);
        c.insert(k(1), at(2, 1), 0);
        assert_eq!(c.get(&k(1), 99).map(|r| r.at), Some(at(2, 1)));
        assert!(c.get(&k(1), 100).is_none());
        assert_eq!(c.len(), 0);
        assert_eq!(c.stats(), CacheStats { hits: 1, misses: 1 });
    }

    #[test]
    fn newer_wins_until_it_expires() {
        let mut c = RouteCache::new(4, 100);
        c.insert(k(1), at(2, 5), 0);
        c.insert(k(1), at(3, 4), 10);
        assert_eq!(c.get(&k(1), 20).unwrap().at, at(2, 5));
        c.insert(k(1), at(3, 6), 30);
        assert_eq!(c.get(&k(1), 40).unwrap().at, at(3, 6));
        c.withdraw(&k(1), &at(2, 5));
        assert!(c.get(&k(1), 41).is_some(), "an older withdraw keeps it");
        c.withdraw(&k(1), &at(3, 6));
        assert!(c.get(&k(1), 42).is_none());
    }

    #[test]
    fn bounded_and_purged_by_home_and_link() {
        let mut c = RouteCache::new(2, 1000);
        for i in 0..5 {
            c.insert(k(i), at(10 + i % 2, 1), 0);
        }
        assert_eq!(c.len(), 2);
        c.get(&k(4), 1).unwrap().hinted = Some(7);
        c.link_down(7);
        assert_eq!(c.get(&k(4), 2).unwrap().hinted, None);
        assert_eq!(c.retain_homes(|h| *h != k(10)), 1);
        assert_eq!(c.len(), 1);
    }
}
