//! `fanout`: one sender to K receivers, by broadcast or by service.
//!
//! Receivers attach (announcing this run's service for `--target
//! service`); the sender waits until discovery lists all K, then sends
//! unpaced. Every receiver must get every message: received counts every
//! copy, and lost = K x sent - received.

use crate::cli::{FanoutArgs, FanoutTarget};
use crate::run::{Common, Fanout, Plan};
use relay_codec::ServiceName;

/// Default message count when neither --count nor --duration is given.
pub const DEFAULT_COUNT: u64 = 100_000;

/// The plan for a fanout run.
pub fn plan(a: &FanoutArgs) -> anyhow::Result<(Common, Plan)> {
    if a.target.broker == crate::cli::Broker::Nats {
        return Err(crate::Unavailable(
            "fanout --broker nats: the NATS comparison covers throughput and latency; fanout \
             (one subject, K subscribers) is not built"
                .into(),
        )
        .into());
    }
    let count = match (a.count, a.duration) {
        (None, None) => Some(DEFAULT_COUNT),
        (c, _) => c,
    };
    let common = super::common(&a.msg, &a.target, count.is_none())?;
    let fanout = match a.to {
        FanoutTarget::Broadcast => Fanout::Broadcast,
        FanoutTarget::Service => {
            // Unique per run, so cells of other runs on a shared relay are
            // not counted.
            let name = format!(
                "relay-bench-fanout-{:x}",
                crate::payload::mix64(std::process::id() as u64 ^ crate::clock::now_ns())
            );
            Fanout::Service(ServiceName::new(name).expect("valid service name"))
        }
    };
    Ok((
        common,
        Plan {
            mode: "fanout",
            senders: 1,
            receivers: a.receivers,
            fanout,
            count,
            duration: a.duration,
            pacing: None,
            window: a.window,
            durable: false,
        },
    ))
}
