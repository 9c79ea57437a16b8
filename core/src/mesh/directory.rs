//! Where cells are: the directory (docs/PROTOCOL.md 10.5).
//!
//! **The choice.** A full table of every cell on every relay is 100,000
//! entries on each of 1,000 relays, and every attach would be flooded to
//! all of them. Instead each cell's location is kept by its `k` directory
//! relays: the `k` reachable relays with the highest rendezvous score
//! ([`score`]) for its key. Rendezvous (highest-random-weight) hashing
//! needs no ring to agree on: any relay that knows the same reachable set
//! computes the same holders, and when a relay joins or leaves only the
//! cells it scores highest for move (about `k / relays` of them). So each
//! relay holds about `k × cells / relays` entries (300 at 1,000 relays and
//! 100,000 cells with `k` = 3), an attach costs `k` routed Route frames, and
//! a lookup one routed Lookup and its reply: nothing is flooded.
//!
//! **Bounds.** [`Directory`] holds at most its capacity
//! (`directory_capacity`), least recently used first out; an entry lost so
//! comes back with the next registration of its cell (its home registers
//! again whenever its set of holders changes).

use lru::LruCache;
use relay_codec::{Location, PublicKey};
use std::num::NonZeroUsize;

/// The rendezvous score of `relay` for `cell`: xxh3-64 (seed 0) of the
/// relay's key followed by the cell's key. Higher wins.
pub fn score(relay: &PublicKey, cell: &PublicKey) -> u64 {
    let mut b = [0u8; 64];
    b[..32].copy_from_slice(&relay.0);
    b[32..].copy_from_slice(&cell.0);
    xxhash_rust::xxh3::xxh3_64(&b)
}

/// The `k` relays of `reachable` that keep `cell`'s location, best first
/// (highest score; ties, which need a hash collision, by key).
pub fn holders(reachable: &[PublicKey], cell: &PublicKey, k: usize) -> Vec<PublicKey> {
    let mut best: Vec<(u64, PublicKey)> = Vec::with_capacity(k + 1);
    for r in reachable {
        let s = (score(r, cell), *r);
        if best.len() < k || best.last().is_some_and(|b| s > *b) {
            let at = best.partition_point(|b| *b > s);
            best.insert(at, s);
            best.truncate(k);
        }
    }
    best.into_iter().map(|(_, r)| r).collect()
}

/// The locations this relay keeps as a directory relay.
pub struct Directory {
    entries: LruCache<PublicKey, Location>,
}

impl Directory {
    /// An empty directory of at most `capacity` entries (at least 1).
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: LruCache::new(NonZeroUsize::new(capacity.max(1)).expect("at least 1")),
        }
    }

    /// `cell` is at `at`, unless a newer location is held (newer wins;
    /// an equal version is the same fact). Returns whether it was kept.
    pub fn register(&mut self, cell: PublicKey, at: Location) -> bool {
        if let Some(old) = self.entries.get(&cell)
            && old.version > at.version
        {
            return false;
        }
        self.entries.put(cell, at);
        true
    }

    /// `cell` left `at`: its entry goes unless a newer one is held (it has
    /// attached elsewhere since). Returns whether an entry went.
    pub fn withdraw(&mut self, cell: &PublicKey, at: &Location) -> bool {
        match self.entries.peek(cell) {
            Some(old) if old.version <= at.version => {
                self.entries.pop(cell);
                true
            }
            _ => false,
        }
    }

    /// Where `cell` is, as far as this directory knows.
    pub fn get(&mut self, cell: &PublicKey) -> Option<Location> {
        self.entries.get(cell).copied()
    }

    /// Drops every entry whose home relay `keep` refuses (a relay that is
    /// no longer reachable); returns how many went.
    pub fn retain_homes(&mut self, mut keep: impl FnMut(&PublicKey) -> bool) -> usize {
        let gone: Vec<PublicKey> = self
            .entries
            .iter()
            .filter(|(_, at)| !keep(&at.home))
            .map(|(c, _)| *c)
            .collect();
        for c in &gone {
            self.entries.pop(c);
        }
        gone.len()
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(i: u16) -> PublicKey {
        let mut b = [0; 32];
        b[..2].copy_from_slice(&i.to_le_bytes());
        PublicKey(b)
    }

    #[test]
    fn holders_are_the_top_k_scores_and_agree_whatever_the_order() {
        let relays: Vec<PublicKey> = (0..50).map(k).collect();
        let cell = k(9999);
        let h = holders(&relays, &cell, 3);
        let mut all: Vec<(u64, PublicKey)> = relays.iter().map(|r| (score(r, &cell), *r)).collect();
        all.sort_by(|a, b| b.cmp(a));
        assert_eq!(h, all[..3].iter().map(|(_, r)| *r).collect::<Vec<_>>());
        let mut rev = relays.clone();
        rev.reverse();
        assert_eq!(holders(&rev, &cell, 3), h);
        assert_eq!(holders(&relays[..2], &cell, 3).len(), 2);
    }

    #[test]
    fn a_relay_leaving_moves_only_the_cells_it_held() {
        let relays: Vec<PublicKey> = (0..100).map(k).collect();
        let gone = relays[17];
        let rest: Vec<PublicKey> = relays.iter().copied().filter(|r| *r != gone).collect();
        let mut moved = 0;
        for c in 1000..3000u16 {
            let before = holders(&relays, &k(c), 3);
            let after = holders(&rest, &k(c), 3);
            if before != after {
                assert!(before.contains(&gone), "only a cell the relay held moves");
                moved += 1;
            }
        }
        // About 3 in 100 of the cells.
        assert!((20..=120).contains(&moved), "{moved}");
    }

    #[test]
    fn newer_wins_and_a_stale_withdraw_keeps_the_newer_entry() {
        let mut d = Directory::new(10);
        let cell = k(1);
        let at = |home, version| Location {
            home: k(home),
            version,
        };
        assert!(d.register(cell, at(2, 5)));
        assert!(!d.register(cell, at(3, 4)), "older loses");
        assert!(d.register(cell, at(3, 6)), "the cell moved to 3");
        assert!(!d.withdraw(&cell, &at(2, 5)), "2's late withdraw is older");
        assert_eq!(d.get(&cell), Some(at(3, 6)));
        assert!(d.withdraw(&cell, &at(3, 6)));
        assert_eq!(d.get(&cell), None);
    }

    #[test]
    fn capacity_is_a_bound_and_unreachable_homes_are_dropped() {
        let mut d = Directory::new(3);
        for c in 0..10 {
            d.register(
                k(c),
                Location {
                    home: k(100 + c % 2),
                    version: 1,
                },
            );
        }
        assert_eq!(d.len(), 3);
        let gone = d.retain_homes(|h| *h == k(100));
        assert_eq!(gone + d.len(), 3);
        assert!(gone >= 1);
    }
}
