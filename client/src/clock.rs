//! The client's one reading of the wall clock.
//!
//! Messages carry their sender's wall-clock time (ms since the Unix epoch),
//! which relays check against their own; everything else in the client
//! measures time with tokio's monotonic clock.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Time since the Unix epoch by this machine's clock; zero if the clock is
/// set before 1970.
pub fn since_epoch() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// Milliseconds since the Unix epoch by this machine's clock: what a
/// message's timestamp holds.
pub fn now_ms() -> u64 {
    since_epoch().as_millis() as u64
}
