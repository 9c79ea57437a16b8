//! When the relay may pause a sender for a receiver (`link.max_stall_ms`).
//!
//! Pausing a fast sender until its receiver drains loses nothing, but a
//! receiver that does not drain would cost every sender that reaches it a
//! whole pause per batch. [`StallGate`] bounds that: once a receiver fails
//! to drain within a pause, no sender waits for it again until a hold-off
//! has passed; its messages that find no room are dropped and counted
//! meanwhile, as without pauses.

use std::sync::atomic::{AtomicU64, Ordering};

/// How long a receiver that did not drain within a pause is not waited
/// for, in milliseconds.
pub const STALL_HOLD_OFF_MS: u64 = 1_000;

/// Per receiver: whether senders may wait for it now. Shared by every
/// sender's reader, so it is one atomic; time is the caller's `now_ms`.
#[derive(Debug, Default)]
pub struct StallGate {
    /// Senders may wait again from this time on (0: always).
    not_before_ms: AtomicU64,
}

impl StallGate {
    /// Whether a sender may wait for this receiver at `now_ms`.
    pub fn may_wait(&self, now_ms: u64) -> bool {
        now_ms >= self.not_before_ms.load(Ordering::Relaxed)
    }

    /// The receiver did not drain within a pause that ended at `now_ms`:
    /// nobody waits for it for the next [`STALL_HOLD_OFF_MS`].
    pub fn timed_out(&self, now_ms: u64) {
        self.not_before_ms
            .fetch_max(now_ms.saturating_add(STALL_HOLD_OFF_MS), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_receiver_that_times_out_is_not_waited_for_during_the_hold_off() {
        let gate = StallGate::default();
        assert!(gate.may_wait(0));
        assert!(gate.may_wait(5_000));
        gate.timed_out(5_000);
        assert!(!gate.may_wait(5_000));
        assert!(!gate.may_wait(5_000 + STALL_HOLD_OFF_MS - 1));
        assert!(gate.may_wait(5_000 + STALL_HOLD_OFF_MS));
    }

    #[test]
    fn an_earlier_time_out_never_shortens_the_hold_off() {
        let gate = StallGate::default();
        gate.timed_out(9_000);
        // A reader whose pause ended earlier reports late.
        gate.timed_out(8_000);
        assert!(!gate.may_wait(9_000 + STALL_HOLD_OFF_MS - 1));
        assert!(gate.may_wait(9_000 + STALL_HOLD_OFF_MS));
    }
}
