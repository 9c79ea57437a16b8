//! What a receiver counts, the same way for every kind of receiver (a
//! relay `Cell`, a raw relay link, a NATS subscription): so the relay and
//! NATS are measured by one rule.
//!
//! The rule: each delivered message is looked at on its own, and the clock
//! is read for each one when the receiver takes it, so a message that
//! waited behind others of its batch is charged for the wait. A message
//! whose intended send time is before the end of the warm-up is counted as
//! warm-up and left out of every figure; one without the bench's stamps is
//! foreign (another sender on a shared server).

use crate::cells::Progress;
use crate::clock::now_ns;
use crate::payload::read_stamps;
use crate::stats::{new_hist, record};
use hdrhistogram::Histogram;
use std::sync::atomic::Ordering;

/// One receiver's counts and latency histograms.
pub struct Tally {
    /// One-way latency, ns: receive time − actual send time.
    pub hist: Histogram<u64>,
    /// Corrected latency, ns: receive time − intended send time.
    pub co_hist: Histogram<u64>,
    /// Measured messages (intended send time at or after the warm-up).
    pub received: u64,
    /// Warm-up messages received.
    pub warmup: u64,
    /// Last measured receive, ns since the epoch (0: none).
    pub last_ns: u64,
    /// Messages without the bench's stamps (not from this run).
    pub foreign: u64,
}

impl Default for Tally {
    fn default() -> Self {
        Self {
            hist: new_hist(),
            co_hist: new_hist(),
            received: 0,
            warmup: 0,
            last_ns: 0,
            foreign: 0,
        }
    }
}

impl Tally {
    /// Counts one delivered payload, reading the clock now; `from` is the
    /// end of the warm-up, ns since the epoch.
    #[inline]
    pub fn take(&mut self, payload: &[u8], from: u64) {
        let Some((sent, intended)) = read_stamps(payload) else {
            self.foreign += 1;
            return;
        };
        if intended < from {
            self.warmup += 1;
            return;
        }
        let now = now_ns();
        record(&mut self.hist, now.saturating_sub(sent));
        record(&mut self.co_hist, now.saturating_sub(intended));
        self.received += 1;
        self.last_ns = now;
    }

    /// Shows the counts to the monitor and the senders' window (one
    /// receiver, one `Progress`).
    pub fn publish(&self, progress: &Progress) {
        progress.received.store(self.received, Ordering::Relaxed);
        progress
            .seen
            .store(self.received + self.warmup, Ordering::Relaxed);
    }

    /// Adds `other`'s counts and histograms to these.
    pub fn merge(&mut self, other: &Tally) {
        self.hist.add(&other.hist).expect("same histogram bounds");
        self.co_hist
            .add(&other.co_hist)
            .expect("same histogram bounds");
        self.received += other.received;
        self.warmup += other.warmup;
        self.last_ns = self.last_ns.max(other.last_ns);
        self.foreign += other.foreign;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload::STAMP_LEN;

    fn stamped(sent: u64, intended: u64) -> Vec<u8> {
        let mut p = vec![0u8; STAMP_LEN + 4];
        p[..8].copy_from_slice(&sent.to_le_bytes());
        p[8..16].copy_from_slice(&intended.to_le_bytes());
        p
    }

    #[test]
    fn warm_up_and_foreign_messages_are_kept_apart() {
        crate::clock::init();
        let from = now_ns();
        let mut t = Tally::default();
        t.take(&stamped(from - 10, from - 10), from);
        t.take(&stamped(from, from), from);
        t.take(&stamped(from + 1, from), from);
        t.take(b"short", from);
        assert_eq!((t.received, t.warmup, t.foreign), (2, 1, 1));
        assert_eq!(t.hist.len(), 2);
        assert!(t.last_ns >= from);
        let progress = Progress::default();
        t.publish(&progress);
        assert_eq!(progress.received.load(Ordering::Relaxed), 2);
        assert_eq!(progress.seen.load(Ordering::Relaxed), 3);
        let mut sum = Tally::default();
        sum.merge(&t);
        sum.merge(&t);
        assert_eq!((sum.received, sum.warmup, sum.foreign), (4, 2, 2));
        assert_eq!(sum.hist.len(), 4);
    }
}
