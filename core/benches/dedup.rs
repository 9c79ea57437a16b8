//! Dedup window benchmarks: the per-message cost of
//! [`DedupWindow::check_and_insert`] in steady state, at the default
//! capacity of 1 M ids and a relay load of 400 000 messages per second.
//!
//! - `fresh_capacity_bound`: random fresh ids into a full window whose
//!   5-minute span is far longer than its capacity lasts at this rate, so
//!   ids are forgotten for lack of room, not age (the profiled case).
//! - `fresh_time_bound`: random fresh ids into a 1-second window, which
//!   holds 400 000 ids at this rate: ids leave because their window passed.
//! - `duplicate`: random ids among the last 400 000 inserted, all still
//!   remembered; nothing is inserted.
//!
//! Criterion's `time` is nanoseconds per message. Before measuring, each
//! case prints the longest single call seen while filling the window and
//! then over a further 2 M steady-state calls: table growth and rehashes
//! show up there, not in the mean (on a busy machine, so does a scheduler
//! tick of a few milliseconds). Run: `cargo bench -p relay-core --bench dedup`.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use relay_codec::id_table::IdKey;
use relay_core::{DedupVerdict, DedupWindow};
use std::hint::black_box;
use std::time::{Duration, Instant};

const CAPACITY: usize = 1_000_000;
/// Messages per millisecond of the simulated clock: 400 000 msg/s.
const PER_MS: u64 = 400;
/// Ids inserted to fill the window, and again in steady state, before
/// measuring: twice the capacity each, so the window has turned over
/// completely several times.
const PREFILL: u64 = 2 * CAPACITY as u64;
/// The duplicate case draws among this many most recent ids; fewer than
/// half the capacity, so every one is guaranteed to be remembered.
const RECENT: u64 = 400_000;

/// splitmix64's finaliser: consecutive inputs give unrelated outputs.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The `i`-th message id: uniform over all 128 bits, like an xxh3 hash.
fn id(i: u64) -> u128 {
    (u128::from(mix(i)) << 64) | u128::from(mix(i ^ 0xD1B5_4A32_D192_ED03))
}

/// What is measured: [`DedupWindow`], or another design to compare it
/// with.
trait Window {
    fn new(window_ms: u64, capacity: usize) -> Self;
    /// Whether `id` was seen before (a duplicate).
    fn check_and_insert(&mut self, id: u128, now_ms: u64) -> bool;
    fn len(&self) -> usize;
    fn evicted_early(&self) -> u64;
}

impl Window for DedupWindow {
    fn new(window_ms: u64, capacity: usize) -> Self {
        // A fixed key: it changes where ids sit, not the cost.
        DedupWindow::new(window_ms, capacity, IdKey::new(1, 2))
    }
    fn check_and_insert(&mut self, id: u128, now_ms: u64) -> bool {
        DedupWindow::check_and_insert(self, id, now_ms) == DedupVerdict::Duplicate
    }
    fn len(&self) -> usize {
        DedupWindow::len(self)
    }
    fn evicted_early(&self) -> u64 {
        DedupWindow::evicted_early(self)
    }
}

/// A window fed `PREFILL` fresh ids at `PER_MS` per millisecond, and the
/// index of the next fresh id.
struct Feed<W> {
    window: W,
    next: u64,
}

impl<W: Window> Feed<W> {
    fn now_ms(&self) -> u64 {
        1_700_000_000_000 + self.next / PER_MS
    }

    /// Checks the next fresh id; true if it was (wrongly) a duplicate.
    fn push(&mut self) -> bool {
        let now = self.now_ms();
        let verdict = self.window.check_and_insert(id(self.next), now);
        self.next += 1;
        verdict
    }

    /// Fills a new window with `PREFILL` ids, then inserts `PREFILL` more,
    /// printing the longest single call of each phase.
    fn prefilled(name: &str, window_ms: u64) -> Self {
        let mut feed = Self {
            window: W::new(window_ms, CAPACITY),
            next: 0,
        };
        let fill = feed.longest_call(PREFILL);
        let steady = feed.longest_call(PREFILL);
        println!(
            "{name}: longest single call {:.1} µs while filling, {:.1} µs in steady state; \
             {} ids held, {} evicted early",
            fill.as_secs_f64() * 1e6,
            steady.as_secs_f64() * 1e6,
            feed.window.len(),
            feed.window.evicted_early(),
        );
        feed
    }

    fn longest_call(&mut self, calls: u64) -> Duration {
        let mut longest = Duration::ZERO;
        for _ in 0..calls {
            let start = Instant::now();
            let duplicate = self.push();
            longest = longest.max(start.elapsed());
            assert!(!duplicate);
        }
        longest
    }
}

/// Benchmarks one design under `label`.
fn bench_window<W: Window>(c: &mut Criterion, label: &str) {
    let mut g = c.benchmark_group(format!("dedup{label}"));
    g.throughput(Throughput::Elements(1));

    for (name, window_ms) in [
        ("fresh_capacity_bound", 300_000),
        ("fresh_time_bound", 1_000),
    ] {
        let mut feed = Feed::<W>::prefilled(&format!("{name}{label}"), window_ms);
        g.bench_function(name, |b| {
            b.iter(|| black_box(feed.push()));
        });
    }

    let mut feed = Feed::<W>::prefilled(&format!("duplicate{label}"), 300_000);
    let now = feed.now_ms();
    let newest = feed.next - 1;
    for back in [0, 1, RECENT / 2, RECENT - 1] {
        assert!(feed.window.check_and_insert(id(newest - back), now));
    }
    let mut draw = 0u64;
    g.bench_function("duplicate", |b| {
        b.iter(|| {
            draw += 1;
            let back = mix(draw) % RECENT;
            black_box(feed.window.check_and_insert(id(newest - back), now))
        });
    });
    g.finish();
}

fn bench_dedup(c: &mut Criterion) {
    bench_window::<DedupWindow>(c, "");
}

criterion_group!(benches, bench_dedup);
criterion_main!(benches);
