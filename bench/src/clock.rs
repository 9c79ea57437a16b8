//! One process-local monotonic clock for every timestamp the bench takes.
//!
//! Payloads carry nanoseconds since [`EPOCH`], a `std::time::Instant` fixed
//! when the process starts; senders and receivers live in the same process,
//! so one-way latency is a plain subtraction with no clock skew.

use std::sync::OnceLock;
use std::time::Instant;

static EPOCH: OnceLock<Instant> = OnceLock::new();

/// Fixes the epoch (call early in `main`; later calls do nothing).
pub fn init() {
    EPOCH.get_or_init(Instant::now);
}

/// Nanoseconds since the process-local epoch.
#[inline]
pub fn now_ns() -> u64 {
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// Seconds, from a nanosecond span.
pub fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// A nanosecond span from seconds (negative or NaN: 0).
pub fn ns(secs: f64) -> u64 {
    if secs.is_finite() && secs > 0.0 {
        (secs * 1e9) as u64
    } else {
        0
    }
}
