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
//! weakened and raise the capacity. Room is promised for `capacity / 2`
//! inserts (see [`DedupWindow`]), so the capacity should cover twice the
//! traffic of a window.

use relay_codec::id_table::{IdKey, IdTable};
use std::mem;

/// What [`DedupWindow::check_and_insert`] found.
#[must_use = "a duplicate must not be forwarded"]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DedupVerdict {
    /// Not remembered; it is now.
    Fresh,
    /// Remembered: seen before, within the window; drop it.
    Duplicate,
}

/// Remembers 128-bit message ids for at least `window_ms` milliseconds, in
/// at most `capacity` entries.
///
/// With `t` the time at which an id was inserted (the check that reported
/// it [`Fresh`](DedupVerdict::Fresh)):
///
/// - **Remembered through its window.** Every check of the id at
///   `now_ms <= t + window_ms` reports [`DedupVerdict::Duplicate`], as long
///   as at most `capacity / 2` (rounded down) other ids were inserted after
///   it. Beyond that many it may be forgotten early, and
///   [`evicted_early`](Self::evicted_early) counts it: that id could now be
///   replayed, and only the timestamp check still stops it.
/// - **Forgotten by twice its window.** A check at `now_ms > t + 2 ×
///   window_ms` reports it fresh (and inserts it anew). In between, either
///   verdict is possible.
/// - **No false duplicates.** An id never inserted is always fresh: ids are
///   compared in full, never by hash alone.
/// - Seeing a duplicate does not extend its life: a replay must not keep an
///   id alive past the original message's freshness.
/// - **Bounded memory.** Never more than `capacity` ids are held
///   ([`len`](Self::len)), in two tables each allocated for at most
///   `capacity / 2` ids: 16-byte slots in power-of-two tables at most
///   half full (`IdTable`), so 32 to 64 bytes per id of capacity (2 ×
///   16 MiB at the default 1 M).
/// - **Cost.** A check is at most two hash-table lookups, one per
///   generation, and an insert into the slot the first one just brought
///   into cache; no single id is ever removed. A caller with a batch of
///   ids calls [`prefetch`](Self::prefetch) first, so that the cache
///   misses of the whole batch overlap. A generation is dropped in bulk by
///   zeroing its table (16 MiB at 1 M capacity, a few ms), at most once per
///   `capacity / 2` inserts or per `window_ms`.
/// - Time is the caller's `now_ms` (any millisecond clock). It should not go
///   backwards; if it does, the latest time seen is used instead, so that
///   nothing is forgotten early.
///
/// # How
///
/// Two generations of ids, `current` and `previous`, each a hash set of at
/// most `capacity / 2` ids. A check looks in both; a fresh id goes into
/// `current`. `current` becomes `previous` (the old `previous` is dropped
/// and its table, cleared, becomes the new `current`) when either
///
/// - its oldest id is more than `window_ms` old. Every id of `previous`
///   was inserted before that one, so it is past its window too: this is
///   expiry. An id thus stays in `current` at most `window_ms` after the
///   generation's first insert, then in `previous` until `window_ms` after
///   the generation's last insert (when `previous` is dropped on its own,
///   also expiry): between `window_ms` and 2 × `window_ms` in all; or
/// - it is full: `previous` is dropped whatever its age, and all its ids
///   are counted in [`evicted_early`](Self::evicted_early). Some of them
///   may already have been past their window, so the count can be higher
///   than the number of ids actually forgotten early, never lower. An id
///   is dropped this way only at the second such rotation after its
///   insert, so after at least `capacity / 2` later inserts.
///
/// While `previous` is empty, `current` may also rotate just to move into
/// the other table, reserved at full size (see `ONE_STEP_FROM` in the
/// source); that drops nothing.
///
/// Why generations rather than the exact time-ordered queue this replaced:
/// the queue forgot every id exactly on time, but paid per message a
/// lookup and an insert in a table of `capacity` ids and, once full (three
/// seconds at 300 000 msg/s and the default 1 M), the removal of the
/// oldest id from elsewhere in that table: random accesses to tens of MiB
/// that took a third of the relay's CPU. The price of generations: ids may be kept up to twice
/// the window, which only ever refuses an exact copy of a message already
/// seen, and room is promised for `capacity / 2` inserts rather than
/// `capacity`, so the capacity should cover twice the traffic of a window.
#[derive(Debug)]
pub struct DedupWindow {
    window_ms: u64,
    capacity: usize,
    /// Most ids one generation holds: `capacity / 2`, at least 1.
    generation_capacity: usize,
    current: IdTable,
    previous: IdTable,
    /// When the oldest and the newest id of `current` were inserted
    /// (meaningless while it is empty).
    current_oldest_ms: u64,
    current_newest_ms: u64,
    /// When the newest id of `previous` was inserted.
    previous_newest_ms: u64,
    latest_ms: u64,
    evicted_early: u64,
}

/// Tables start with room for this many ids (or a generation, if fewer).
const INITIAL_ALLOCATION: usize = 4096;

/// Tables grow by doubling, like any hash set, up to this many ids (half a
/// MiB). Past it, a table is given room for a whole generation in one
/// step, and while it is empty whenever possible:
///
/// - a full `current` whose `previous` is empty (the first fill) rotates
///   into the other table, reserved at full size: nothing is dropped and
///   nothing rehashed;
/// - after a rotation that closed a generation this large, the new, empty
///   `current` is reserved at full size;
/// - otherwise (traffic surging past this size just after a quiet window)
///   `current` grows to full size in place: one rehash, at most once per
///   table.
///
/// Why: rehashing into a larger table touches every page of the new table
/// at once, which took 7 to 30 ms at 1 M capacity on a VM (40 ms for the
/// last doubling of the exact design), all while the caller holds the lock
/// every connection's ingest shares. Reserving an empty table costs only
/// an allocation of zeroed memory, whose pages are then faulted in one at
/// a time by later inserts. Why not everything up front: a relay with little
/// traffic then costs well under a MiB whatever its configured capacity.
/// Past this size, random hashing touches nearly every page of a table
/// once it holds a few percent of its slots, so growing more gradually
/// would save little memory. Cleared tables keep their allocation, so in
/// steady state nothing is allocated or rehashed.
const ONE_STEP_FROM: usize = 16_384;

impl DedupWindow {
    /// A window remembering ids for at least `window_ms` milliseconds in at
    /// most `capacity` entries. Size `capacity` for twice the peak message
    /// rate times the window (see [`DedupWindow`]); `window_ms` should be at
    /// least the freshness window's replay horizon.
    ///
    /// `key` places ids in the tables (it changes no verdict): the caller
    /// draws it, from a seeded generator where runs must replay (the
    /// pure node does) or at random, and keeps it secret from
    /// senders.
    ///
    /// # Panics
    ///
    /// If `capacity` is 0: a window that remembers nothing would let every
    /// replay through.
    pub fn new(window_ms: u64, capacity: usize, key: IdKey) -> Self {
        assert!(capacity > 0, "dedup window capacity must be at least 1");
        let generation_capacity = (capacity / 2).max(1);
        Self {
            window_ms,
            capacity,
            generation_capacity,
            current: IdTable::with_capacity(generation_capacity.min(INITIAL_ALLOCATION), key),
            // Grown when it first becomes `current`.
            previous: IdTable::with_capacity(0, key),
            current_oldest_ms: 0,
            current_newest_ms: 0,
            previous_newest_ms: 0,
            latest_ms: 0,
            evicted_early: 0,
        }
    }

    /// Reports whether `id` is remembered at `now_ms`, and remembers it if
    /// not.
    pub fn check_and_insert(&mut self, id: u128, now_ms: u64) -> DedupVerdict {
        let now_ms = self.advance(now_ms);
        // `current` first: duplicates are mostly recent. A fresh id probes
        // both tables, and these two loads can overlap; its insert then
        // finds its slot in cache.
        if self.current.contains(id) || self.previous.contains(id) {
            return DedupVerdict::Duplicate;
        }
        // Room is made only for an id that will be inserted: rotating on a
        // duplicate would forget live ids for nothing.
        let len = self.current.len();
        if len >= self.generation_capacity || len == self.current.capacity() {
            self.make_room();
        }
        self.current.insert(id);
        if self.current.len() == 1 {
            self.current_oldest_ms = now_ms;
        }
        self.current_newest_ms = now_ms;
        DedupVerdict::Fresh
    }

    /// Starts fetching into the cache where [`check_and_insert`] of `id`
    /// will look. Call it for every id of a batch before checking them:
    /// the lookups are random accesses to tables of tens of MiB, and this
    /// lets their misses overlap instead of queueing one after another.
    /// Changes no verdict.
    ///
    /// [`check_and_insert`]: Self::check_and_insert
    pub fn prefetch(&self, id: u128) {
        self.current.prefetch(id);
        if !self.previous.is_empty() {
            self.previous.prefetch(id);
        }
    }

    /// Forgets the ids whose generation has passed its window at `now_ms`.
    /// Checks do this on their own; call it from a timer so that
    /// [`len`](Self::len) is current on an idle relay.
    pub fn expire(&mut self, now_ms: u64) {
        self.advance(now_ms);
    }

    /// Number of ids currently held: never more than
    /// [`capacity`](Self::capacity). It includes ids past their window
    /// whose generation has not been dropped yet.
    pub fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }

    /// Whether no id is held.
    pub fn is_empty(&self) -> bool {
        self.current.is_empty() && self.previous.is_empty()
    }

    /// The most ids this window will hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// How long, in milliseconds, an id is at least remembered (room
    /// permitting); it is forgotten within twice that.
    pub fn window_ms(&self) -> u64 {
        self.window_ms
    }

    /// How many ids were dropped for lack of room, since creation: every id
    /// of a generation dropped because the next one filled up, whether or
    /// not its window had passed. Each could be replayed undetected by this
    /// window; a rising count means the capacity is too small for the load.
    pub fn evicted_early(&self) -> u64 {
        self.evicted_early
    }

    /// Moves the clock to `now_ms` (never backwards) and drops the
    /// generations whose window has passed; returns the clock.
    fn advance(&mut self, now_ms: u64) -> u64 {
        let now_ms = self.latest_ms.max(now_ms);
        self.latest_ms = now_ms;
        if !self.current.is_empty() && now_ms - self.current_oldest_ms > self.window_ms {
            // `previous` ended before `current` began, so it has expired
            // too; it is dropped without counting.
            debug_assert!(
                self.previous.is_empty() || self.previous_newest_ms <= self.current_oldest_ms
            );
            self.rotate();
        }
        if !self.previous.is_empty() && now_ms - self.previous_newest_ms > self.window_ms {
            self.previous.clear();
        }
        now_ms
    }

    /// Drops `previous` and makes `current` the new `previous`, reusing the
    /// dropped table (cleared, allocation kept) as the new `current`.
    fn rotate(&mut self) {
        mem::swap(&mut self.current, &mut self.previous);
        self.current.clear();
        self.previous_newest_ms = self.current_newest_ms;
        if self.previous.len() >= ONE_STEP_FROM {
            // Traffic that fills a generation this far will likely fill
            // this one: room for all of it now, while there is nothing to
            // rehash (a no-op once the table has it).
            self.current.reserve(self.generation_capacity);
        }
    }

    /// Lets `current`, which has no room left in its table or its
    /// generation, take one more id (see [`ONE_STEP_FROM`]).
    fn make_room(&mut self) {
        let len = self.current.len();
        if len >= self.generation_capacity {
            // Full: `previous` goes whatever its age, counted.
            self.evicted_early += self.previous.len() as u64;
            self.rotate();
            if self.previous.len() >= self.capacity {
                // Capacity 1: one generation of one id is already the
                // whole capacity, so it goes too.
                self.evicted_early += self.previous.len() as u64;
                self.previous.clear();
            }
        } else if len < ONE_STEP_FROM {
            // A small table: the insert doubles it.
        } else if self.previous.is_empty() {
            // Rotating drops nothing, and the other table is reserved at
            // full size while empty.
            self.rotate();
        } else {
            self.current.reserve(self.generation_capacity - len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Any fixed key: it changes where ids sit, never a verdict.
    const KEY: IdKey = IdKey::new(0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210);
    use std::collections::HashMap;

    #[test]
    fn repeated_id_is_a_duplicate_and_others_are_fresh() {
        let mut window = DedupWindow::new(1_000, 16, KEY);
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
        let mut window = DedupWindow::new(100, 16, KEY);
        assert_eq!(window.check_and_insert(1, 1_000), DedupVerdict::Fresh);
        assert_eq!(window.check_and_insert(1, 1_100), DedupVerdict::Duplicate);
        // The duplicate at 1_100 did not extend the id's life, and a
        // generation whose only id has passed its window is dropped.
        assert_eq!(window.check_and_insert(1, 1_101), DedupVerdict::Fresh);
        assert_eq!(window.evicted_early(), 0);
    }

    #[test]
    fn a_generation_rotated_by_time_still_answers_for_its_window() {
        let mut window = DedupWindow::new(100, 16, KEY);
        assert_eq!(window.check_and_insert(1, 1_000), DedupVerdict::Fresh);
        assert_eq!(window.check_and_insert(2, 1_050), DedupVerdict::Fresh);
        // At 1_101 the generation started at 1_000 rotates to `previous`;
        // id 2 is inside its window and must still be found there, and id
        // 3 goes into the new generation.
        assert_eq!(window.check_and_insert(3, 1_101), DedupVerdict::Fresh);
        assert_eq!(window.check_and_insert(2, 1_150), DedupVerdict::Duplicate);
        assert_eq!(window.check_and_insert(3, 1_201), DedupVerdict::Duplicate);
        // At 1_151 the old generation is past every id's window: dropped,
        // not counted.
        window.expire(1_151);
        assert_eq!(window.len(), 1);
        assert_eq!(window.check_and_insert(2, 1_201), DedupVerdict::Fresh);
        assert_eq!(window.evicted_early(), 0);
    }

    #[test]
    fn ids_are_forgotten_by_twice_the_window() {
        let mut window = DedupWindow::new(100, 16, KEY);
        assert_eq!(window.check_and_insert(1, 0), DedupVerdict::Fresh);
        // Id 2 keeps id 1's generation alive past id 1's window.
        assert_eq!(window.check_and_insert(2, 100), DedupVerdict::Fresh);
        assert_eq!(window.check_and_insert(1, 200), DedupVerdict::Duplicate);
        assert_eq!(window.check_and_insert(1, 201), DedupVerdict::Fresh);
        // Id 2 is past its window too, so forgetting it is no eviction.
        assert_eq!(window.check_and_insert(2, 201), DedupVerdict::Fresh);
        assert_eq!(window.evicted_early(), 0);
    }

    #[test]
    fn a_zero_window_remembers_only_the_same_millisecond() {
        let mut window = DedupWindow::new(0, 16, KEY);
        assert_eq!(window.check_and_insert(1, 10), DedupVerdict::Fresh);
        assert_eq!(window.check_and_insert(2, 10), DedupVerdict::Fresh);
        assert_eq!(window.check_and_insert(1, 10), DedupVerdict::Duplicate);
        assert_eq!(window.check_and_insert(1, 11), DedupVerdict::Fresh);
        assert_eq!(window.check_and_insert(2, 11), DedupVerdict::Fresh);
        assert_eq!(window.evicted_early(), 0);
    }

    #[test]
    fn expire_forgets_old_generations_without_a_check() {
        let mut window = DedupWindow::new(100, 16, KEY);
        for id in 0..10 {
            assert_eq!(
                window.check_and_insert(id, id as u64 * 10),
                DedupVerdict::Fresh
            );
        }
        // Ids 0..8 (at 0..=70) filled the first generation; 8 and 9 (at 80
        // and 90) are in the second.
        window.expire(170);
        assert_eq!(window.len(), 10, "id 7 is inside its window at 170");
        window.expire(171);
        assert_eq!(window.len(), 2);
        window.expire(10_000);
        assert!(window.is_empty());
        assert_eq!(window.evicted_early(), 0);
    }

    #[test]
    fn rotation_by_size_keeps_the_newest_half_and_counts_what_it_drops() {
        let mut window = DedupWindow::new(u64::MAX, 8, KEY);
        for id in 0..8 {
            assert_eq!(window.check_and_insert(id, 5), DedupVerdict::Fresh);
        }
        // The first rotation (at id 4) dropped an empty generation.
        assert_eq!(window.evicted_early(), 0);
        assert_eq!(window.len(), 8);
        // Id 3 was the last into its generation and has had 4 = capacity /
        // 2 ids inserted after it: still remembered. Checking it does not
        // rotate.
        assert_eq!(window.check_and_insert(3, 5), DedupVerdict::Duplicate);
        // One more insert rotates again, dropping ids 0..4, counted.
        assert_eq!(window.check_and_insert(8, 5), DedupVerdict::Fresh);
        assert_eq!(window.evicted_early(), 4);
        assert_eq!(window.len(), 5);
        for id in 4..9 {
            assert_eq!(window.check_and_insert(id, 5), DedupVerdict::Duplicate);
        }
        assert_eq!(window.check_and_insert(3, 5), DedupVerdict::Fresh);
        assert_eq!(window.len(), 6);
    }

    #[test]
    fn capacity_holds_under_ten_times_as_many_ids() {
        let capacity = 100;
        let mut window = DedupWindow::new(u64::MAX, capacity, KEY);
        for id in 0..(10 * capacity as u128) {
            assert_eq!(window.check_and_insert(id, 5), DedupVerdict::Fresh);
            assert!(window.len() <= capacity);
        }
        assert_eq!(window.len(), capacity);
        // 19 rotations, the first of which dropped an empty generation.
        assert_eq!(window.evicted_early(), 9 * capacity as u64);
        // The newest ids are kept.
        for id in (9 * capacity as u128)..(10 * capacity as u128) {
            assert_eq!(window.check_and_insert(id, 5), DedupVerdict::Duplicate);
        }
        // A dropped id is accepted again; this is the gap the timestamp
        // check has to cover, and it is counted: the insert rotates once
        // more, dropping ids 900..950.
        assert_eq!(window.check_and_insert(0, 5), DedupVerdict::Fresh);
        assert_eq!(window.evicted_early(), 9 * capacity as u64 + 50);
        assert_eq!(window.len(), 51);
        assert_eq!(window.check_and_insert(949, 5), DedupVerdict::Fresh);
        assert_eq!(window.check_and_insert(950, 5), DedupVerdict::Duplicate);
    }

    #[test]
    fn capacity_one_keeps_only_the_last_id() {
        let mut window = DedupWindow::new(u64::MAX, 1, KEY);
        assert_eq!(window.check_and_insert(1, 0), DedupVerdict::Fresh);
        assert_eq!(window.check_and_insert(1, 0), DedupVerdict::Duplicate);
        assert_eq!(window.check_and_insert(2, 0), DedupVerdict::Fresh);
        assert_eq!(window.len(), 1);
        assert_eq!(window.evicted_early(), 1);
        assert_eq!(window.check_and_insert(2, 0), DedupVerdict::Duplicate);
        assert_eq!(window.check_and_insert(1, 0), DedupVerdict::Fresh);
        assert_eq!(window.len(), 1);
    }

    #[test]
    fn expiry_frees_room_without_counting_early_evictions() {
        let mut window = DedupWindow::new(100, 4, KEY);
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
    fn steady_traffic_within_capacity_is_bounded_by_time_alone() {
        // One id every 10 ms: 10 per window, far below the room of 500.
        let mut window = DedupWindow::new(100, 1_000, KEY);
        for k in 0..1_000u64 {
            let now = 10 * k;
            assert_eq!(
                window.check_and_insert(u128::from(k), now),
                DedupVerdict::Fresh
            );
            if k >= 10 {
                // Inserted exactly a window ago.
                assert_eq!(
                    window.check_and_insert(u128::from(k - 10), now),
                    DedupVerdict::Duplicate
                );
            }
            // Nothing older than twice the window is held.
            assert!(window.len() <= 21, "{} ids held at {now}", window.len());
        }
        assert_eq!(window.evicted_early(), 0);
    }

    #[test]
    fn a_clock_going_backwards_forgets_nothing_early() {
        let mut window = DedupWindow::new(100, 16, KEY);
        assert_eq!(window.check_and_insert(1, 1_000), DedupVerdict::Fresh);
        assert_eq!(window.check_and_insert(2, 500), DedupVerdict::Fresh);
        assert_eq!(window.check_and_insert(1, 500), DedupVerdict::Duplicate);
        // Id 2 was stamped with the latest time seen (1_000), not 500.
        assert_eq!(window.check_and_insert(2, 1_100), DedupVerdict::Duplicate);
        assert_eq!(window.check_and_insert(2, 1_101), DedupVerdict::Fresh);
        // A jump back after a rotation: the ids stay where they are.
        assert_eq!(window.check_and_insert(3, 1_150), DedupVerdict::Fresh);
        assert_eq!(window.check_and_insert(3, 0), DedupVerdict::Duplicate);
        assert_eq!(window.check_and_insert(2, 0), DedupVerdict::Duplicate);
        assert_eq!(window.check_and_insert(3, 1_250), DedupVerdict::Duplicate);
        assert_eq!(window.evicted_early(), 0);
    }

    #[test]
    #[should_panic(expected = "capacity")]
    fn zero_capacity_is_refused() {
        let _ = DedupWindow::new(100, 0, KEY);
    }

    /// Inserts `n` fresh ids at `now_ms`, numbered on from `next`.
    fn insert_fresh(window: &mut DedupWindow, next: &mut u128, n: usize, now_ms: u64) {
        for _ in 0..n {
            assert_eq!(window.check_and_insert(*next, now_ms), DedupVerdict::Fresh);
            *next += 1;
        }
    }

    #[test]
    fn tables_reach_full_size_without_rehashing_and_are_reused() {
        let capacity = 200_000; // generations of 100 000 ids
        let mut window = DedupWindow::new(u64::MAX, capacity, KEY);
        let mut next = 0;
        // Doubling would still be under 4 × ONE_STEP_FROM slots here;
        // instead the first generation moved into the other table, which
        // was reserved at full size while empty.
        insert_fresh(&mut window, &mut next, 2 * ONE_STEP_FROM, 0);
        assert!(window.current.capacity() >= capacity / 2);
        assert!(!window.previous.is_empty());
        assert_eq!(window.len(), 2 * ONE_STEP_FROM);
        assert_eq!(window.evicted_early(), 0);
        // Every id is still there.
        for id in 0..next {
            assert_eq!(window.check_and_insert(id, 0), DedupVerdict::Duplicate);
        }
        // Fill the big table; the rotation makes the small one big too.
        insert_fresh(&mut window, &mut next, capacity / 2, 0);
        let sizes = (window.current.capacity(), window.previous.capacity());
        assert!(sizes.0 >= capacity / 2 && sizes.1 >= capacity / 2);
        // A power-of-two table at most half full: under 4 slots per id.
        assert!(sizes.0 < capacity && sizes.1 < capacity, "{sizes:?}");
        insert_fresh(&mut window, &mut next, 3 * capacity, 0);
        assert!(window.len() > capacity / 2 && window.evicted_early() > 0);
        // Six more rotations, and neither table was reallocated.
        let now = (window.current.capacity(), window.previous.capacity());
        assert!(
            now == sizes || now == (sizes.1, sizes.0),
            "{sizes:?} {now:?}"
        );
    }

    #[test]
    fn a_surge_after_a_quiet_window_grows_the_table_in_one_step() {
        let capacity = 200_000;
        let mut window = DedupWindow::new(100, capacity, KEY);
        let mut next = 0;
        insert_fresh(&mut window, &mut next, ONE_STEP_FROM / 2 - 1, 0);
        insert_fresh(&mut window, &mut next, 1, 60);
        // Rotated by time at 101, and `previous` holds the quiet
        // generation, in its window until 160: the new one cannot rotate
        // into a fresh table, so it grows in place, once.
        insert_fresh(&mut window, &mut next, 2 * ONE_STEP_FROM, 101);
        assert_eq!(window.previous.len(), ONE_STEP_FROM / 2);
        assert!(window.current.capacity() >= capacity / 2);
        assert!(window.current.capacity() < capacity);
        assert_eq!(window.evicted_early(), 0);
        for id in 0..next {
            assert_eq!(window.check_and_insert(id, 150), DedupVerdict::Duplicate);
        }
    }

    /// What the model remembers of an id's last insert.
    #[derive(Clone, Copy)]
    struct Inserted {
        at_ms: u64,
        /// Ids inserted before it, since the start.
        seq: u64,
        /// `evicted_early` right after it was inserted.
        evicted_early: u64,
    }

    proptest! {
        #[test]
        fn keeps_its_promises(
            window_ms in 0u64..50,
            capacity in 1usize..64,
            // (id from a small pool so repeats are common, clock step that
            // is sometimes negative)
            ops in prop::collection::vec((0u128..24, -5i64..20), 1..400),
        ) {
            let mut window = DedupWindow::new(window_ms, capacity, KEY);
            let mut inserted: HashMap<u128, Inserted> = HashMap::new();
            let mut inserts = 0u64;
            let mut latest = 0u64;
            let mut now: u64 = 1_000;
            for (id, step) in ops {
                now = now.saturating_add_signed(step);
                latest = latest.max(now);
                // Spread the pool over both halves of the id.
                let id = id.rotate_right(3) ^ (id << 70);
                let verdict = window.check_and_insert(id, now);
                match inserted.get(&id) {
                    None => prop_assert_eq!(verdict, DedupVerdict::Fresh, "never inserted"),
                    Some(last) => {
                        let age = latest - last.at_ms;
                        let later = inserts - last.seq - 1;
                        if age > 2 * window_ms {
                            prop_assert_eq!(verdict, DedupVerdict::Fresh, "kept {} ms", age);
                        }
                        if age <= window_ms && later <= (capacity / 2) as u64 {
                            prop_assert_eq!(
                                verdict,
                                DedupVerdict::Duplicate,
                                "forgotten at {} ms after {} inserts",
                                age,
                                later
                            );
                        }
                        if age <= window_ms && verdict == DedupVerdict::Fresh {
                            prop_assert!(
                                window.evicted_early() > last.evicted_early,
                                "forgotten early without being counted"
                            );
                        }
                    }
                }
                if verdict == DedupVerdict::Fresh {
                    inserted.insert(
                        id,
                        Inserted {
                            at_ms: latest,
                            seq: inserts,
                            evicted_early: window.evicted_early(),
                        },
                    );
                    inserts += 1;
                }
                prop_assert!(window.len() <= capacity);
                prop_assert!(window.evicted_early() <= inserts);
                // Each table is allocated for one generation at most
                // (tiny tables hold at least 4).
                let most = (2 * (capacity / 2)).max(14);
                prop_assert!(window.current.capacity() <= most);
                prop_assert!(window.previous.capacity() <= most);
            }
        }
    }
}
