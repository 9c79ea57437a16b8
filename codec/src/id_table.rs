//! A flat hash set of 128-bit message ids, for dedup windows: the relay's
//! (`relay_core::dedup`) and each cell's.
//!
//! Why not `std`'s `HashSet`: at the relay's default capacity a generation
//! holds half a million ids, and every check lands at a random place in
//! tens of MiB. `HashSet` keeps control bytes apart from the slots, so a
//! lookup costs two cache misses per table, and it cannot be told to fetch
//! ahead. Here the slot is the id itself (zero marks an empty slot), probed
//! linearly from a keyed hash: one miss per lookup, and
//! [`IdTable::prefetch`] lets a caller with a whole batch of ids start
//! every miss before waiting on the first (the relay checks batches of up
//! to thousands of messages under one lock).

use std::hash::{BuildHasher, RandomState};

/// Fewest slots a table has.
const MIN_SLOTS: usize = 8;

/// A set of `u128` ids in open addressing with linear probing, at most half
/// full, so that a miss probes about 2.5 slots (under one cache line) on
/// average.
///
/// Bounds: `capacity()` ids in `2 × capacity()` slots of 16 bytes; the
/// table grows (doubling, one rehash) only when an insert finds it full,
/// and [`reserve`](Self::reserve) grows it ahead of need.
#[derive(Debug)]
pub struct IdTable {
    /// Zero is an empty slot; the id zero itself is held in `has_zero`.
    slots: Box<[u128]>,
    len: usize,
    has_zero: bool,
    key: IdKey,
}

impl IdTable {
    /// A table that holds at least `ids` ids before growing, placing them
    /// with `key`.
    pub fn with_capacity(ids: usize, key: IdKey) -> Self {
        Self {
            slots: vec![0; slots_for(ids)].into_boxed_slice(),
            len: 0,
            has_zero: false,
            key,
        }
    }

    /// Ids held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no id is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// How many ids fit before the table grows.
    pub fn capacity(&self) -> usize {
        self.slots.len() / 2
    }

    /// Whether `id` is held.
    pub fn contains(&self, id: u128) -> bool {
        if id == 0 {
            return self.has_zero;
        }
        let mask = self.slots.len() - 1;
        let mut i = self.key.hash(id) as usize & mask;
        loop {
            match self.slots[i] {
                0 => return false,
                s if s == id => return true,
                _ => i = (i + 1) & mask,
            }
        }
    }

    /// Starts loading the cache line where a lookup of `id` begins, so that
    /// a later [`contains`](Self::contains) or [`insert`](Self::insert)
    /// finds it in cache. Only ever a hint: it changes no result.
    pub fn prefetch(&self, id: u128) {
        let i = self.key.hash(id) as usize & (self.slots.len() - 1);
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a prefetch never faults and changes nothing the program
        // can observe; the address is a valid slot in any case. SSE, which
        // has the instruction, is part of every x86_64 CPU.
        unsafe {
            let slot: *const u128 = &self.slots[i];
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(slot.cast());
        }
        // Elsewhere a plain load: independent loads overlap in the CPU too,
        // though each one must complete.
        #[cfg(not(target_arch = "x86_64"))]
        std::hint::black_box(self.slots[i]);
    }

    /// Adds `id`, which must not be held already; grows the table if it is
    /// full.
    pub fn insert(&mut self, id: u128) {
        debug_assert!(!self.contains(id));
        if self.len == self.capacity() {
            self.reserve(1);
        }
        self.place(id);
    }

    /// Makes room for `additional` more ids without further growth, in one
    /// rehash if the table must grow.
    pub fn reserve(&mut self, additional: usize) {
        let needed = self.len + additional;
        if needed <= self.capacity() {
            return;
        }
        let old = std::mem::replace(
            &mut self.slots,
            vec![0; slots_for(needed)].into_boxed_slice(),
        );
        let (len, has_zero) = (self.len, self.has_zero);
        self.len = 0;
        for id in old.iter().copied().filter(|&s| s != 0) {
            self.place(id);
        }
        self.has_zero = has_zero;
        self.len = len;
    }

    /// Forgets every id, keeping the allocation.
    pub fn clear(&mut self) {
        if self.len > usize::from(self.has_zero) {
            self.slots.fill(0);
        }
        self.len = 0;
        self.has_zero = false;
    }

    /// Puts `id` (not held) into the table, which has room for it.
    fn place(&mut self, id: u128) {
        self.len += 1;
        if id == 0 {
            self.has_zero = true;
            return;
        }
        let mask = self.slots.len() - 1;
        let mut i = self.key.hash(id) as usize & mask;
        while self.slots[i] != 0 {
            i = (i + 1) & mask;
        }
        self.slots[i] = id;
    }
}

/// Slots for a table holding `ids` ids at most half full.
fn slots_for(ids: usize) -> usize {
    ids.saturating_mul(2).next_power_of_two().max(MIN_SLOTS)
}

/// The per-window random key that places ids in an [`IdTable`].
///
/// Message ids are xxh3-128 hashes and so already uniform, which would make
/// their low bits enough, but xxh3 is unkeyed: a cell choosing its own
/// nonces can grind ids whose low bits collide and turn the table into long
/// probe runs. One keyed 64×64→128 multiply (the folded multiply of
/// foldhash) costs about a nanosecond and takes that away. The key only
/// changes the table layout, never a verdict.
#[derive(Debug, Clone, Copy)]
pub struct IdKey {
    k0: u64,
    k1: u64,
}

impl IdKey {
    /// The key made of `k0` and `k1`: a seeded generator's draws, for a run
    /// that can be replayed (the relay's pure node takes its randomness
    /// from a seed), or random ones. The key must be secret from the
    /// senders whose ids go into the table, or they can grind collisions.
    pub const fn new(k0: u64, k1: u64) -> Self {
        Self { k0, k1 }
    }

    /// A fresh random key.
    pub fn random() -> Self {
        // std's RandomState is already seeded from the OS once per thread;
        // borrowing it avoids a dependency and a syscall per window.
        let state = RandomState::new();
        Self {
            k0: state.hash_one(0x243f_6a88_85a3_08d3_u64),
            k1: state.hash_one(0x1319_8a2e_0370_7344_u64),
        }
    }

    /// Where `id` goes: its low bits pick the first slot probed.
    pub fn hash(&self, id: u128) -> u64 {
        let product = u128::from((id as u64) ^ self.k0) * u128::from(((id >> 64) as u64) ^ self.k1);
        (product as u64) ^ ((product >> 64) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    #[test]
    fn holds_zero_and_ids_that_collide_in_the_low_bits() {
        let mut t = IdTable::with_capacity(4, IdKey::random());
        assert!(!t.contains(0));
        t.insert(0);
        t.insert(1 << 64);
        t.insert(2 << 64);
        assert!(t.contains(0) && t.contains(1 << 64) && t.contains(2 << 64));
        assert!(!t.contains(3 << 64));
        assert_eq!(t.len(), 3);
        t.clear();
        assert!(t.is_empty() && !t.contains(0) && !t.contains(1 << 64));
    }

    #[test]
    fn grows_by_doubling_and_keeps_every_id() {
        let mut t = IdTable::with_capacity(1, IdKey::random());
        assert_eq!(t.capacity(), MIN_SLOTS / 2);
        for id in 0..1_000u128 {
            t.insert(id * 7919);
            assert!(t.len() <= t.capacity());
        }
        assert_eq!(t.capacity(), 1_024);
        assert!((0..1_000u128).all(|id| t.contains(id * 7919)));
        assert!(!t.contains(3));
    }

    #[test]
    fn reserve_makes_room_in_one_step_and_clear_keeps_it() {
        let mut t = IdTable::with_capacity(4, IdKey::random());
        t.insert(5);
        t.reserve(100_000);
        let cap = t.capacity();
        assert!((100_001..200_002).contains(&cap), "{cap}");
        assert!(t.contains(5));
        t.clear();
        assert_eq!(t.capacity(), cap);
        t.reserve(10);
        assert_eq!(t.capacity(), cap);
    }

    #[test]
    fn ids_differing_only_in_high_bits_spread_over_the_table() {
        // The low 64 bits alone would put all of these in one slot; the
        // keyed mix must not. For this structured input a few keys in a
        // hundred use fewer slots (down to a tenth of them in 20 000
        // random keys), so the test takes the median of nine keys: it fails
        // by chance about once in 30 000 runs.
        let mut used: Vec<usize> = (0..9)
            .map(|_| {
                let key = IdKey::random();
                let hashes: HashSet<u64> = (0..1_000u128).map(|i| key.hash(i << 64)).collect();
                assert_eq!(hashes.len(), 1_000);
                hashes
                    .iter()
                    .map(|h| h & 0xff)
                    .collect::<HashSet<u64>>()
                    .len()
            })
            .collect();
        used.sort_unstable();
        assert!(
            used[4] > 200,
            "median {} of 256 slots used ({used:?})",
            used[4]
        );
    }

    proptest! {
        #[test]
        fn agrees_with_a_hash_set(ops in prop::collection::vec((0u128..40, 0u8..10), 1..300)) {
            let mut t = IdTable::with_capacity(2, IdKey::random());
            let mut model = HashSet::new();
            for (id, op) in ops {
                // Spread the pool over both halves, zero included.
                let id = id.rotate_right(3) ^ (id << 70);
                match op {
                    0 => { t.clear(); model.clear(); }
                    1 => t.prefetch(id),
                    _ => {
                        prop_assert_eq!(t.contains(id), model.contains(&id));
                        if model.insert(id) { t.insert(id); }
                    }
                }
                prop_assert_eq!(t.len(), model.len());
                prop_assert!(t.len() <= t.capacity());
            }
        }
    }
}
