//! When the relay may pause a sender for a receiver (`link.max_stall_ms`).
//!
//! Pausing a fast sender until its receiver drains loses nothing, but a
//! receiver that does not drain at all would cost every sender that reaches
//! it a whole pause per batch. [`StallGate`] bounds that: a receiver whose
//! link writer has taken nothing for [`STUCK_AFTER_MS`] is not waited for
//! until it takes something again; its messages that find no room are
//! dropped and counted meanwhile, as without pauses. A receiver that drains,
//! however slowly (a busy machine can hold a process off the CPU for tens of
//! milliseconds), keeps being waited for.

use std::sync::atomic::{AtomicU64, Ordering};

/// How long a receiver may take nothing off its queue before senders stop
/// waiting for it, in milliseconds.
pub const STUCK_AFTER_MS: u64 = 1_000;

/// Per receiver: whether senders may wait for it now. Shared by every
/// sender's reader, so it is atomics; the receiver's progress (messages its
/// writer has taken, a monotonic count) and the time are the caller's
/// values.
#[derive(Debug)]
pub struct StallGate {
    /// The progress count last seen ([`NOT_SEEN`] before the first call),
    /// and since when it has not changed.
    taken: AtomicU64,
    since_ms: AtomicU64,
}

/// No progress count seen yet: the first one always counts as a change, so
/// a receiver whose writer has taken nothing yet (a new link, still at 0)
/// is waited for from its first call, not judged stuck since time 0.
const NOT_SEEN: u64 = u64::MAX;

impl Default for StallGate {
    fn default() -> Self {
        Self {
            taken: AtomicU64::new(NOT_SEEN),
            since_ms: AtomicU64::new(0),
        }
    }
}

impl StallGate {
    /// Whether a sender may wait for this receiver at `now_ms`, its writer
    /// having taken `taken` messages so far.
    pub fn may_wait(&self, taken: u64, now_ms: u64) -> bool {
        if self.taken.swap(taken, Ordering::Relaxed) != taken {
            self.since_ms.store(now_ms, Ordering::Relaxed);
            return true;
        }
        now_ms.saturating_sub(self.since_ms.load(Ordering::Relaxed)) < STUCK_AFTER_MS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_receiver_that_takes_nothing_is_waited_for_until_it_counts_as_stuck() {
        let gate = StallGate::default();
        assert!(gate.may_wait(5, 1_000));
        assert!(gate.may_wait(5, 1_000 + STUCK_AFTER_MS - 1));
        assert!(!gate.may_wait(5, 1_000 + STUCK_AFTER_MS));
        assert!(!gate.may_wait(5, 60_000));
        // It takes something: waited for again, and the clock restarts.
        assert!(gate.may_wait(6, 60_001));
        assert!(gate.may_wait(6, 60_001 + STUCK_AFTER_MS - 1));
        assert!(!gate.may_wait(6, 60_001 + STUCK_AFTER_MS));
    }

    #[test]
    fn a_new_receiver_that_has_taken_nothing_yet_is_waited_for() {
        // A link's writer starts at 0 taken; at real clock values the first
        // call must not find it "stuck since time 0".
        let now = 1_764_000_000_000;
        let gate = StallGate::default();
        assert!(gate.may_wait(0, now));
        assert!(gate.may_wait(0, now + STUCK_AFTER_MS - 1));
        assert!(!gate.may_wait(0, now + STUCK_AFTER_MS));
    }

    #[test]
    fn a_receiver_that_keeps_taking_is_always_waited_for() {
        let gate = StallGate::default();
        for k in 0..100u64 {
            // Progress every 900 ms: never stuck, however long it runs.
            assert!(gate.may_wait(k, k * 900));
            assert!(gate.may_wait(k, k * 900 + 899));
        }
    }
}
