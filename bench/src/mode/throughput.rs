//! `throughput`: P sender cells -> S receiver cells, unpaced.
//!
//! Sender j sends to receiver j % S; the messages are split across the
//! senders; each sends as fast as its cell takes messages (the cell's lane
//! queue waits when full) and stops at its share or at --duration.
//! Delivered rate = received / (last receive - first send), for the relay
//! and for `--broker nats` alike.

use crate::cli::ThroughputArgs;
use crate::run::{Common, Fanout, Plan};

/// Default message count when neither --count nor --duration is given.
pub const DEFAULT_COUNT: u64 = 1_000_000;

/// The plan for a throughput run.
pub fn plan(a: &ThroughputArgs) -> anyhow::Result<(Common, Plan)> {
    let count = match (a.count, a.duration) {
        (None, None) => Some(DEFAULT_COUNT),
        (c, _) => c,
    };
    let common = super::common(&a.msg, &a.target, count.is_none())?;
    Ok((
        common,
        Plan {
            mode: "throughput",
            senders: a.senders,
            receivers: a.receivers,
            fanout: Fanout::PerReceiver,
            count,
            duration: a.duration,
            pacing: None,
            window: a.window,
            durable: false,
        },
    ))
}
