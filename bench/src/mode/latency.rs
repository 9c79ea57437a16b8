//! `latency`: one sender paced at --rate msg/s to one receiver.
//!
//! A dedicated OS thread wakes every tick (100 µs by default) and sends
//! every message whose intended time (start + i / rate) has come. Each
//! payload carries its actual and its intended send time, so the receiver
//! records both the one-way latency and the latency corrected for
//! coordinated omission (a stalled sender does not hide the stall). The
//! largest burst in one tick is reported as `max_burst`.

use crate::cli::LatencyArgs;
use crate::run::{Common, Fanout, Pacing, Plan};
use std::time::Duration;

/// The plan for a latency run.
pub fn plan(a: &LatencyArgs) -> anyhow::Result<(Common, Plan)> {
    let common = super::common(&a.msg, &a.target, true)?;
    Ok((
        common,
        Plan {
            mode: "latency",
            senders: 1,
            receivers: 1,
            fanout: Fanout::PerReceiver,
            count: None,
            duration: Some(a.duration),
            pacing: Some(Pacing {
                rate: a.rate,
                tick: Duration::from_micros(a.tick_us),
            }),
            window: None,
            durable: false,
        },
    ))
}
