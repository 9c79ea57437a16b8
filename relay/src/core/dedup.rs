//! The dedup window: which message ids this relay has already seen.
//!
//! A message seen before is never forwarded again; that is what stops a
//! broadcast flood from looping and a durable message from being delivered
//! twice. Memory is bounded, so the window alone cannot stop every replay:
//! an id evicted for lack of room would be accepted again. The relay pairs
//! it with [`FreshnessWindow`](super::FreshnessWindow): a message is only
//! accepted while its timestamp is fresh, and the dedup window is sized to
//! remember ids for at least that long
//! ([`FreshnessWindow::replay_horizon_ms`](super::FreshnessWindow::replay_horizon_ms)).
//! Early evictions are counted so an operator can see when that pairing is
//! weakened and raise the capacity.

use std::collections::{HashSet, VecDeque};
use std::hash::{BuildHasher, Hasher, RandomState};

/// What [`DedupWindow::check_and_insert`] found.
#[must_use = "a duplicate must not be forwarded"]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DedupVerdict {
    /// Not seen within the window; it is now remembered.
    Fresh,
    /// Seen within the window; drop it.
    Duplicate,
}

/// Remembers 128-bit message ids for `window_ms` milliseconds, in at most
/// `capacity` entries.
///
/// - An id inserted at time `t` is reported [`DedupVerdict::Duplicate`] for
///   every check at `now_ms` with `now_ms - t <= window_ms`, unless it was
///   evicted early for lack of room. Seeing a duplicate does not extend its
///   life: a replay must not keep an id alive past the original message's
///   freshness.
/// - Never more than `capacity` ids are held. When full, the oldest id is
///   evicted first and [`evicted_early`](Self::evicted_early) counts it: that
///   id could now be replayed, and only the timestamp check still stops it.
/// - Cost: O(1) amortised per check (one hash lookup, one queue push, and
///   amortised pops of expired entries). About 24 bytes of queue plus one
///   hash-set slot (16 bytes, load factor up to 7/8) per remembered id.
/// - Time is the caller's `now_ms` (any millisecond clock). It should not go
///   backwards; if it does, the latest time seen is used instead, so that
///   entries stay in time order and nothing is forgotten early.
///
/// Why an exact queue rather than two rotating hash-set generations: the
/// generations would save the per-entry time but keep ids anywhere between
/// one and two windows, so sizing against the freshness window would need
/// twice the capacity anyway, and early evictions could not be told apart
/// from expiry.
#[derive(Debug)]
pub struct DedupWindow {
    window_ms: u64,
    capacity: usize,
    seen: HashSet<u128, IdHashBuilder>,
    /// Insertion order is time order (see `latest_ms`), so expiry and
    /// eviction both pop from the front.
    order: VecDeque<Entry>,
    latest_ms: u64,
    evicted_early: u64,
}

/// An id split into two u64 halves: a `u128` field would be 16-byte aligned
/// and pad the entry from 24 to 32 bytes.
#[derive(Debug, Clone, Copy)]
struct Entry {
    at_ms: u64,
    lo: u64,
    hi: u64,
}

impl Entry {
    fn id(&self) -> u128 {
        (u128::from(self.hi) << 64) | u128::from(self.lo)
    }
}

/// Up-front allocation is capped so that a large configured capacity costs
/// memory only once traffic needs it; the tables grow up to the bound.
const INITIAL_ALLOCATION: usize = 4096;

impl DedupWindow {
    /// A window remembering ids for `window_ms` milliseconds in at most
    /// `capacity` entries. Size `capacity` for the peak message rate times
    /// the window; `window_ms` should be at least the freshness window's
    /// replay horizon.
    ///
    /// # Panics
    ///
    /// If `capacity` is 0: a window that remembers nothing would let every
    /// replay through.
    pub fn new(window_ms: u64, capacity: usize) -> Self {
        assert!(capacity > 0, "dedup window capacity must be at least 1");
        let initial = capacity.min(INITIAL_ALLOCATION);
        Self {
            window_ms,
            capacity,
            seen: HashSet::with_capacity_and_hasher(initial, IdHashBuilder::new()),
            order: VecDeque::with_capacity(initial),
            latest_ms: 0,
            evicted_early: 0,
        }
    }

    /// Reports whether `id` was seen within the window ending at `now_ms`,
    /// and remembers it if not.
    pub fn check_and_insert(&mut self, id: u128, now_ms: u64) -> DedupVerdict {
        let now_ms = self.advance(now_ms);
        self.drop_expired(now_ms);
        // Make room only for an id that will be inserted: evicting on a
        // duplicate would forget a live id for nothing.
        if self.order.len() >= self.capacity && !self.seen.contains(&id) {
            self.evict_oldest();
            self.evicted_early += 1;
        }
        if !self.seen.insert(id) {
            return DedupVerdict::Duplicate;
        }
        self.order.push_back(Entry {
            at_ms: now_ms,
            lo: id as u64,
            hi: (id >> 64) as u64,
        });
        DedupVerdict::Fresh
    }

    /// Forgets ids whose window has passed at `now_ms`. Checks do this on
    /// their own; call it from a timer so that [`len`](Self::len) is current
    /// on an idle relay.
    pub fn expire(&mut self, now_ms: u64) {
        let now_ms = self.advance(now_ms);
        self.drop_expired(now_ms);
    }

    /// Number of ids currently remembered (expired ones are only dropped by
    /// a check or [`expire`](Self::expire)); never more than
    /// [`capacity`](Self::capacity).
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Whether no id is remembered.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// The most ids this window will hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// How long, in milliseconds, an id is remembered.
    pub fn window_ms(&self) -> u64 {
        self.window_ms
    }

    /// How many ids were evicted for lack of room before their window had
    /// passed, since creation. Each could be replayed undetected by this
    /// window; a rising count means the capacity is too small for the load.
    pub fn evicted_early(&self) -> u64 {
        self.evicted_early
    }

    fn advance(&mut self, now_ms: u64) -> u64 {
        self.latest_ms = self.latest_ms.max(now_ms);
        self.latest_ms
    }

    fn drop_expired(&mut self, now_ms: u64) {
        while let Some(front) = self.order.front() {
            if now_ms - front.at_ms <= self.window_ms {
                break;
            }
            self.evict_oldest();
        }
    }

    fn evict_oldest(&mut self) {
        if let Some(entry) = self.order.pop_front() {
            self.seen.remove(&entry.id());
        }
    }
}

/// Builds [`IdHasher`]s with a per-window random key.
///
/// Message ids are xxh3-128 hashes and so already uniform, which would make
/// a pass-through hasher enough, but xxh3 is unkeyed: a cell choosing its
/// own nonces can grind ids whose low bits collide and turn the hash table
/// into long probe chains. One keyed 64×64→128 multiply (the folded
/// multiply of foldhash) costs about a nanosecond and takes that away.
/// The key only changes the table layout, never a verdict.
#[derive(Debug, Clone)]
struct IdHashBuilder {
    k0: u64,
    k1: u64,
}

impl IdHashBuilder {
    fn new() -> Self {
        // std's RandomState is already seeded from the OS once per thread;
        // borrowing it avoids a dependency and a syscall per window.
        let state = RandomState::new();
        Self {
            k0: state.hash_one(0x243f_6a88_85a3_08d3_u64),
            k1: state.hash_one(0x1319_8a2e_0370_7344_u64),
        }
    }
}

impl BuildHasher for IdHashBuilder {
    type Hasher = IdHasher;

    fn build_hasher(&self) -> IdHasher {
        IdHasher {
            k0: self.k0,
            k1: self.k1,
            hash: 0,
        }
    }
}

/// Hashes one `u128` id with a single keyed folded multiply.
#[derive(Debug)]
struct IdHasher {
    k0: u64,
    k1: u64,
    hash: u64,
}

fn folded_multiply(a: u64, b: u64) -> u64 {
    let product = u128::from(a) * u128::from(b);
    (product as u64) ^ ((product >> 64) as u64)
}

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.hash
    }

    fn write_u128(&mut self, id: u128) {
        let lo = (id as u64) ^ self.hash;
        let hi = (id >> 64) as u64;
        self.hash = folded_multiply(lo ^ self.k0, hi ^ self.k1);
    }

    // Only `u128` keys are hashed here; this keeps the hasher correct should
    // anything else ever be fed to it.
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(16) {
            let mut block = [0u8; 16];
            block[..chunk.len()].copy_from_slice(chunk);
            self.write_u128(u128::from_le_bytes(block));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn repeated_id_is_a_duplicate_and_others_are_fresh() {
        let mut window = DedupWindow::new(1_000, 16);
        assert_eq!(window.check_and_insert(7, 100), DedupVerdict::Fresh);
        assert_eq!(window.check_and_insert(7, 100), DedupVerdict::Duplicate);
        assert_eq!(window.check_and_insert(7, 900), DedupVerdict::Duplicate);
        assert_eq!(window.check_and_insert(8, 900), DedupVerdict::Fresh);
        // Same low 64 bits, different high bits: a different message.
        assert_eq!(
            window.check_and_insert(7 | (1u128 << 64), 900),
            DedupVerdict::Fresh
        );
        assert_eq!(window.len(), 3);
        assert_eq!(window.evicted_early(), 0);
    }

    #[test]
    fn id_is_remembered_through_the_last_millisecond_of_its_window() {
        let mut window = DedupWindow::new(100, 16);
        assert_eq!(window.check_and_insert(1, 1_000), DedupVerdict::Fresh);
        assert_eq!(window.check_and_insert(1, 1_100), DedupVerdict::Duplicate);
        // The duplicate at 1_100 did not extend the id's life.
        assert_eq!(window.check_and_insert(1, 1_101), DedupVerdict::Fresh);
        assert_eq!(window.evicted_early(), 0);
    }

    #[test]
    fn expire_forgets_old_ids_without_a_check() {
        let mut window = DedupWindow::new(100, 16);
        for id in 0..10 {
            assert_eq!(
                window.check_and_insert(id, id as u64 * 10),
                DedupVerdict::Fresh
            );
        }
        window.expire(140); // ids inserted at 0..=30 are past their window
        assert_eq!(window.len(), 6);
        window.expire(10_000);
        assert!(window.is_empty());
        assert_eq!(window.evicted_early(), 0);
    }

    #[test]
    fn capacity_holds_under_ten_times_as_many_ids() {
        let capacity = 100;
        let mut window = DedupWindow::new(u64::MAX, capacity);
        for id in 0..(10 * capacity as u128) {
            assert_eq!(window.check_and_insert(id, 5), DedupVerdict::Fresh);
            assert!(window.len() <= capacity);
        }
        assert_eq!(window.len(), capacity);
        assert_eq!(window.evicted_early(), 9 * capacity as u64);
        // The newest ids are kept: oldest first out.
        for id in (9 * capacity as u128)..(10 * capacity as u128) {
            assert_eq!(window.check_and_insert(id, 5), DedupVerdict::Duplicate);
        }
        // An evicted id is accepted again; this is the gap the timestamp
        // check has to cover, and it is counted.
        assert_eq!(window.check_and_insert(0, 5), DedupVerdict::Fresh);
        assert_eq!(window.evicted_early(), 9 * capacity as u64 + 1);
        assert_eq!(window.len(), capacity);
    }

    #[test]
    fn expiry_frees_room_without_counting_early_evictions() {
        let mut window = DedupWindow::new(100, 4);
        for id in 0..4 {
            assert_eq!(window.check_and_insert(id, 0), DedupVerdict::Fresh);
        }
        for id in 4..8 {
            assert_eq!(window.check_and_insert(id, 101), DedupVerdict::Fresh);
        }
        assert_eq!(window.len(), 4);
        assert_eq!(window.evicted_early(), 0);
    }

    #[test]
    fn a_clock_going_backwards_forgets_nothing_early() {
        let mut window = DedupWindow::new(100, 16);
        assert_eq!(window.check_and_insert(1, 1_000), DedupVerdict::Fresh);
        assert_eq!(window.check_and_insert(2, 500), DedupVerdict::Fresh);
        assert_eq!(window.check_and_insert(1, 500), DedupVerdict::Duplicate);
        // Id 2 was stamped with the latest time seen (1_000), not 500.
        assert_eq!(window.check_and_insert(2, 1_100), DedupVerdict::Duplicate);
        assert_eq!(window.check_and_insert(2, 1_101), DedupVerdict::Fresh);
    }

    #[test]
    #[should_panic(expected = "capacity")]
    fn zero_capacity_is_refused() {
        let _ = DedupWindow::new(100, 0);
    }

    #[test]
    fn ids_differing_only_in_high_bits_spread_over_the_table() {
        // A low-64-bit pass-through hash would put all of these in one
        // bucket; a keyed mix must not.
        let builder = IdHashBuilder::new();
        let hashes: HashSet<u64> = (0..1_000u128).map(|i| builder.hash_one(i << 64)).collect();
        assert_eq!(hashes.len(), 1_000);
        let low_bits: HashSet<u64> = hashes.iter().map(|h| h & 0xff).collect();
        assert!(
            low_bits.len() > 200,
            "only {} of 256 buckets used",
            low_bits.len()
        );
    }

    /// The obvious implementation: a list in insertion order, scanned.
    struct Model {
        window_ms: u64,
        capacity: usize,
        entries: VecDeque<(u64, u128)>,
        latest_ms: u64,
        evicted_early: u64,
    }

    impl Model {
        fn check_and_insert(&mut self, id: u128, now_ms: u64) -> DedupVerdict {
            self.latest_ms = self.latest_ms.max(now_ms);
            let now = self.latest_ms;
            self.entries.retain(|&(at, _)| now - at <= self.window_ms);
            if self.entries.iter().any(|&(_, seen)| seen == id) {
                return DedupVerdict::Duplicate;
            }
            if self.entries.len() == self.capacity {
                self.entries.pop_front();
                self.evicted_early += 1;
            }
            self.entries.push_back((now, id));
            DedupVerdict::Fresh
        }
    }

    proptest! {
        #[test]
        fn matches_the_obvious_model(
            window_ms in 0u64..50,
            capacity in 1usize..12,
            // (id from a small pool so repeats are common, clock step that
            // is sometimes negative)
            ops in prop::collection::vec((0u128..24, -5i64..20), 1..400),
        ) {
            let mut window = DedupWindow::new(window_ms, capacity);
            let mut model = Model {
                window_ms,
                capacity,
                entries: VecDeque::new(),
                latest_ms: 0,
                evicted_early: 0,
            };
            let mut now: u64 = 1_000;
            for (id, step) in ops {
                now = now.saturating_add_signed(step);
                // Spread the pool over both halves of the id.
                let id = id.rotate_right(3) ^ (id << 70);
                prop_assert_eq!(
                    window.check_and_insert(id, now),
                    model.check_and_insert(id, now)
                );
                prop_assert_eq!(window.len(), model.entries.len());
                prop_assert!(window.len() <= capacity);
                prop_assert_eq!(window.evicted_early(), model.evicted_early);
            }
        }
    }
}
