//! The timestamp window: how old, or how far ahead of this relay's clock, a
//! message may be.
//!
//! This is the half of replay protection that needs no memory: a message
//! outside the window is refused whatever its id. The other half,
//! [`DedupWindow`](super::DedupWindow), remembers ids for as long as a
//! message can pass this check ([`FreshnessWindow::replay_horizon_ms`]),
//! so that together they refuse every replay.

/// Accepts a message timestamp from `past_ms` before to `future_ms` after
/// the relay's clock, both bounds inclusive.
///
/// `future_ms` is the allowance for clock skew between the sender and this
/// relay; `past_ms` is how long a message may spend in flight, queued or
/// stored before it is refused as stale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FreshnessWindow {
    /// How old, in milliseconds, a message may be and still be accepted.
    pub past_ms: u64,
    /// How far ahead of this relay's clock, in milliseconds, a message's
    /// timestamp may be and still be accepted.
    pub future_ms: u64,
}

/// Why a timestamp is outside the [`FreshnessWindow`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Staleness {
    /// Older than `past_ms`.
    #[error("message is {age_ms} ms old, older than this relay accepts")]
    Expired {
        /// How old the message is, in milliseconds.
        age_ms: u64,
    },
    /// Further ahead of this relay's clock than `future_ms`.
    #[error(
        "message timestamp is {ahead_ms} ms ahead of this relay's clock, \
         more than the allowed clock skew"
    )]
    FromFuture {
        /// How far ahead of this relay's clock the timestamp is, in
        /// milliseconds.
        ahead_ms: u64,
    },
}

impl FreshnessWindow {
    /// A window accepting timestamps from `past_ms` before to `future_ms`
    /// after the relay's clock.
    pub const fn new(past_ms: u64, future_ms: u64) -> Self {
        Self { past_ms, future_ms }
    }

    /// Checks a message's timestamp against the relay's clock `now_ms`
    /// (both in milliseconds since the Unix epoch: the sender's wall clock
    /// is compared with this relay's).
    pub fn check(&self, msg_timestamp_ms: u64, now_ms: u64) -> Result<(), Staleness> {
        if msg_timestamp_ms <= now_ms {
            let age_ms = now_ms - msg_timestamp_ms;
            if age_ms > self.past_ms {
                return Err(Staleness::Expired { age_ms });
            }
        } else {
            let ahead_ms = msg_timestamp_ms - now_ms;
            if ahead_ms > self.future_ms {
                return Err(Staleness::FromFuture { ahead_ms });
            }
        }
        Ok(())
    }

    /// For how long, in milliseconds, one message can keep passing
    /// [`check`](Self::check): from `future_ms` before its timestamp to
    /// `past_ms` after it. A dedup window at least this long, with room for
    /// the traffic of that span, catches every replay this check lets
    /// through.
    pub const fn replay_horizon_ms(&self) -> u64 {
        self.past_ms.saturating_add(self.future_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_700_000_000_000;

    #[test]
    fn accepts_exactly_at_both_bounds_and_refuses_one_past() {
        let window = FreshnessWindow::new(1_000, 500);
        assert_eq!(window.check(NOW, NOW), Ok(()));
        assert_eq!(window.check(NOW - 1_000, NOW), Ok(()));
        assert_eq!(
            window.check(NOW - 1_001, NOW),
            Err(Staleness::Expired { age_ms: 1_001 })
        );
        assert_eq!(window.check(NOW + 500, NOW), Ok(()));
        assert_eq!(
            window.check(NOW + 501, NOW),
            Err(Staleness::FromFuture { ahead_ms: 501 })
        );
    }

    #[test]
    fn zero_window_accepts_only_the_current_millisecond() {
        let window = FreshnessWindow::new(0, 0);
        assert_eq!(window.check(NOW, NOW), Ok(()));
        assert_eq!(
            window.check(NOW - 1, NOW),
            Err(Staleness::Expired { age_ms: 1 })
        );
        assert_eq!(
            window.check(NOW + 1, NOW),
            Err(Staleness::FromFuture { ahead_ms: 1 })
        );
    }

    #[test]
    fn extreme_timestamps_neither_overflow_nor_pass() {
        let window = FreshnessWindow::new(1_000, 1_000);
        assert_eq!(
            window.check(u64::MAX, 0),
            Err(Staleness::FromFuture { ahead_ms: u64::MAX })
        );
        assert_eq!(
            window.check(0, u64::MAX),
            Err(Staleness::Expired { age_ms: u64::MAX })
        );
        let open = FreshnessWindow::new(u64::MAX, u64::MAX);
        assert_eq!(open.check(0, u64::MAX), Ok(()));
        assert_eq!(open.check(u64::MAX, 0), Ok(()));
        assert_eq!(open.replay_horizon_ms(), u64::MAX);
    }

    #[test]
    fn replay_horizon_spans_both_sides() {
        let window = FreshnessWindow::new(30_000, 5_000);
        assert_eq!(window.replay_horizon_ms(), 35_000);
        // A message stamped T is accepted from T - future to T + past.
        let stamp = NOW;
        assert_eq!(window.check(stamp, stamp - 5_000), Ok(()));
        assert_eq!(window.check(stamp, stamp + 30_000), Ok(()));
        assert!(window.check(stamp, stamp - 5_001).is_err());
        assert!(window.check(stamp, stamp + 30_001).is_err());
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let expired = Staleness::Expired { age_ms: 61_000 }.to_string();
        assert!(expired.contains("61000 ms old"), "{expired}");
        let ahead = Staleness::FromFuture { ahead_ms: 9_000 }.to_string();
        assert!(ahead.contains("9000 ms ahead"), "{ahead}");
    }
}
