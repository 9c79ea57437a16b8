//! The lane scheduler: which lane's queue a link writer drains next.
//!
//! Lanes are indices `0..LANES`, 0 the most urgent (control, high, normal,
//! bulk), as `relay_codec::Lane::index` numbers them. Each pick is one batch
//! from one lane; a pick is the unit of share, so the writer should bound
//! the size of a batch (bytes and messages) to keep a bulk pick from
//! costing much more link time than a control pick.
//!
//! Design: a fixed cyclic schedule of `sum(weights)` slots, in which lane
//! `i` owns `weights[i]` slots spread as evenly as smooth weighted round
//! robin spreads them (with 8, 4, 2, 1: control, high, control, normal,
//! control, high, control, bulk, ...). A cursor walks the cycle and each
//! pick goes to the first slot at or after it whose lane has something to
//! send; empty lanes' slots are skipped. The only state is the cursor, so
//! there is no credit to bank: an idle lane gets no burst when it comes
//! back, and the guarantees below hold after any history, not only from a
//! fresh start:
//!
//! - a pick is never an empty lane, and there is a pick iff a lane is
//!   nonempty;
//! - with all lanes backlogged, every `sum(weights)` consecutive picks give
//!   lane `i` exactly `weights[i]` picks; with a subset backlogged, the same
//!   holds for the subset and the sum of its weights;
//! - a backlogged lane waits at most `sum(weights) - weights[i]` picks of
//!   other lanes (control, with default weights, at most one).

/// Number of lanes; lane indices are `0..LANES`, 0 the most urgent.
pub const LANES: usize = 4;

/// Default weights: control 8, high 4, normal 2, bulk 1 picks per cycle.
pub const DEFAULT_LANE_WEIGHTS: [u32; LANES] = [8, 4, 2, 1];

/// Largest weight a lane can have; larger ones are lowered to it. Ratios
/// beyond 1024:1 buy nothing over that, and the cap keeps the schedule
/// (two bytes a slot) small for every link.
pub const MAX_LANE_WEIGHT: u32 = 1024;

/// Decides which lane a link writer drains next: higher lanes more often
/// and sooner, every lane a guaranteed share (see the module docs).
///
/// Cost per [`next`](Self::next): one binary search per nonempty lane over
/// that lane's slots; memory: two bytes per slot of the cycle.
#[derive(Debug, Clone)]
pub struct LaneScheduler {
    weights: [u32; LANES],
    cycle_len: u32,
    /// Slot positions owned by each lane, ascending.
    slots: [Box<[u16]>; LANES],
    /// The next slot to serve, in `0..cycle_len`.
    cursor: u32,
}

impl Default for LaneScheduler {
    /// A scheduler with [`DEFAULT_LANE_WEIGHTS`].
    fn default() -> Self {
        Self::new(DEFAULT_LANE_WEIGHTS)
    }
}

impl LaneScheduler {
    /// A scheduler giving lane `i` `weights[i]` picks per cycle of
    /// `sum(weights)` picks. Each weight is clamped to
    /// `1..=`[`MAX_LANE_WEIGHT`]: a weight of 0 would starve its lane, which
    /// is exactly what lanes must never do.
    pub fn new(weights: [u32; LANES]) -> Self {
        let weights = weights.map(|w| w.clamp(1, MAX_LANE_WEIGHT));
        let cycle_len: u32 = weights.iter().sum();
        // Smooth weighted round robin, run once over a whole cycle: each
        // slot goes to the lane furthest behind its share, ties to the more
        // urgent lane, which spreads every lane's slots evenly.
        let mut behind = [0i64; LANES];
        let mut slots: [Vec<u16>; LANES] = Default::default();
        for slot in 0..cycle_len {
            for (lag, &weight) in behind.iter_mut().zip(&weights) {
                *lag += i64::from(weight);
            }
            let mut chosen = 0;
            for lane in 1..LANES {
                if behind[lane] > behind[chosen] {
                    chosen = lane;
                }
            }
            behind[chosen] -= i64::from(cycle_len);
            // cycle_len <= LANES * MAX_LANE_WEIGHT, well within u16.
            slots[chosen].push(slot as u16);
        }
        Self {
            weights,
            cycle_len,
            slots: slots.map(Vec::into_boxed_slice),
            cursor: 0,
        }
    }

    /// The lane to drain next, given which lanes have something queued;
    /// `None` iff no lane does. Call once per batch taken.
    pub fn next(&mut self, nonempty: [bool; LANES]) -> Option<usize> {
        let mut best: Option<(u32, usize, u32)> = None; // (distance, lane, slot)
        for (lane, slots) in self.slots.iter().enumerate() {
            if !nonempty[lane] {
                continue;
            }
            let at = slots.partition_point(|&s| u32::from(s) < self.cursor);
            let (slot, distance) = match slots.get(at) {
                Some(&s) => (u32::from(s), u32::from(s) - self.cursor),
                // Every lane owns at least one slot, so wrapping finds one.
                None => {
                    let s = u32::from(slots[0]);
                    (s, s + self.cycle_len - self.cursor)
                }
            };
            // Slots belong to one lane each, so distances never tie.
            if best.is_none_or(|(d, _, _)| distance < d) {
                best = Some((distance, lane, slot));
            }
        }
        let (_, lane, slot) = best?;
        self.cursor = (slot + 1) % self.cycle_len;
        Some(lane)
    }

    /// The weights in effect, after clamping.
    pub fn weights(&self) -> [u32; LANES] {
        self.weights
    }

    /// Picks per cycle: the sum of the weights.
    pub fn cycle_len(&self) -> u32 {
        self.cycle_len
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ALL: [bool; LANES] = [true; LANES];

    fn picks(scheduler: &mut LaneScheduler, nonempty: [bool; LANES], n: usize) -> Vec<usize> {
        (0..n)
            .map(|_| scheduler.next(nonempty).expect("a lane is nonempty"))
            .collect()
    }

    fn counts(picked: &[usize]) -> [u32; LANES] {
        let mut counts = [0; LANES];
        for &lane in picked {
            counts[lane] += 1;
        }
        counts
    }

    #[test]
    fn default_cycle_gives_8_4_2_1_interleaved_control_first() {
        let mut scheduler = LaneScheduler::default();
        assert_eq!(scheduler.cycle_len(), 15);
        let cycle = picks(&mut scheduler, ALL, 15);
        assert_eq!(counts(&cycle), [8, 4, 2, 1]);
        assert_eq!(cycle, [0, 1, 0, 2, 0, 1, 0, 3, 0, 1, 0, 2, 0, 1, 0]);
        // The cycle repeats.
        assert_eq!(picks(&mut scheduler, ALL, 15), cycle);
    }

    #[test]
    fn equal_weights_serve_the_more_urgent_lane_first() {
        let mut scheduler = LaneScheduler::new([3; LANES]);
        let cycle = picks(&mut scheduler, ALL, 12);
        assert_eq!(cycle, [0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3]);
    }

    #[test]
    fn only_nonempty_lanes_are_picked_in_weight_ratio() {
        let mut scheduler = LaneScheduler::default();
        let nonempty = [false, false, true, true];
        let picked = picks(&mut scheduler, nonempty, 30);
        assert_eq!(counts(&picked), [0, 0, 20, 10]);
        assert_eq!(scheduler.next([false; LANES]), None);
    }

    #[test]
    fn an_idle_lane_banks_nothing() {
        let mut scheduler = LaneScheduler::default();
        // Control idle for a long while, bulk alone.
        let alone = picks(&mut scheduler, [false, false, false, true], 1_000);
        assert!(alone.iter().all(|&lane| lane == 3));
        // Back to full backlog: control gets its share, not a burst.
        let after = picks(&mut scheduler, ALL, 15);
        assert_eq!(counts(&after), [8, 4, 2, 1]);
    }

    #[test]
    fn control_waits_at_most_one_pick_behind_backlogged_data() {
        for warmup in 0..15 {
            let mut scheduler = LaneScheduler::default();
            let _ = picks(&mut scheduler, [false, true, true, true], warmup);
            let waited = (0..).take_while(|_| scheduler.next(ALL) != Some(0)).count();
            assert!(waited <= 1, "control waited {waited} picks after {warmup}");
        }
    }

    #[test]
    fn weights_are_clamped_so_no_lane_starves() {
        let mut scheduler = LaneScheduler::new([0, 5_000, 1, 0]);
        assert_eq!(scheduler.weights(), [1, MAX_LANE_WEIGHT, 1, 1]);
        let len = scheduler.cycle_len() as usize;
        let cycle = picks(&mut scheduler, ALL, len);
        assert_eq!(counts(&cycle), [1, MAX_LANE_WEIGHT, 1, 1]);
    }

    fn weights() -> impl Strategy<Value = [u32; LANES]> {
        prop::array::uniform4(1u32..=12)
    }

    fn masks(max: usize) -> impl Strategy<Value = Vec<[bool; LANES]>> {
        prop::collection::vec(prop::array::uniform4(any::<bool>()), 0..max)
    }

    proptest! {
        #[test]
        fn picks_a_nonempty_lane_iff_there_is_one(weights in weights(), masks in masks(300)) {
            let mut scheduler = LaneScheduler::new(weights);
            for nonempty in masks {
                match scheduler.next(nonempty) {
                    Some(lane) => prop_assert!(nonempty[lane], "picked empty lane {lane}"),
                    None => prop_assert!(!nonempty.contains(&true)),
                }
            }
        }

        #[test]
        fn every_cycle_window_of_full_backlog_is_exact(
            weights in weights(),
            history in masks(100),
            cycles in 1usize..5,
        ) {
            let mut scheduler = LaneScheduler::new(weights);
            for nonempty in history {
                let _ = scheduler.next(nonempty);
            }
            let cycle = scheduler.cycle_len() as usize;
            let picked = picks(&mut scheduler, ALL, cycle * (cycles + 1));
            // Every sliding window, not only aligned ones: no lane ever
            // waits a whole cycle, and none gets more than its share.
            for window in picked.windows(cycle) {
                prop_assert_eq!(counts(window), weights);
            }
        }

        #[test]
        fn a_backlogged_subset_shares_by_weight(
            weights in weights(),
            history in masks(100),
            subset in prop::array::uniform4(any::<bool>()),
            cycles in 1usize..20,
        ) {
            prop_assume!(subset.contains(&true));
            let mut scheduler = LaneScheduler::new(weights);
            for nonempty in history {
                let _ = scheduler.next(nonempty);
            }
            let subset_cycle: u32 = (0..LANES).filter(|&l| subset[l]).map(|l| weights[l]).sum();
            let picked = picks(&mut scheduler, subset, subset_cycle as usize * cycles);
            let expected = std::array::from_fn(|l| {
                if subset[l] { weights[l] * cycles as u32 } else { 0 }
            });
            prop_assert_eq!(counts(&picked), expected);
        }

        #[test]
        fn a_backlogged_lane_never_waits_longer_than_its_bound(
            weights in weights(),
            // Per step: how many batches arrive in each lane.
            arrivals in prop::collection::vec(prop::array::uniform4(0u32..3), 1..400),
        ) {
            let mut scheduler = LaneScheduler::new(weights);
            let cycle = scheduler.cycle_len();
            let mut queued = [0u32; LANES];
            let mut waited = [0u32; LANES];
            for arrived in arrivals {
                for lane in 0..LANES {
                    queued[lane] += arrived[lane];
                }
                let nonempty = queued.map(|q| q > 0);
                let picked = scheduler.next(nonempty);
                for lane in 0..LANES {
                    if picked == Some(lane) {
                        queued[lane] -= 1;
                        waited[lane] = 0;
                    } else if nonempty[lane] {
                        waited[lane] += 1;
                        prop_assert!(
                            waited[lane] <= cycle - weights[lane],
                            "lane {} waited {} picks", lane, waited[lane]
                        );
                    }
                }
            }
        }
    }
}
