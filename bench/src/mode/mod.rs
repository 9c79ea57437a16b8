//! One module per mode: each turns its command-line arguments into a plan
//! and runs it.

pub mod connections;
pub mod fanout;
pub mod latency;
pub mod throughput;

use crate::Unavailable;
use crate::cli::{Auth, ClientArg, MsgArgs, PayloadArg, TargetArgs};
use crate::payload::Fill;
use crate::run::{Client, Common};
use relay_client::cell::AuthMode;

/// The shared settings of a message mode; `duration_bound` picks the
/// default warm-up (1 s for runs bounded by time, 0 for runs bounded by a
/// count).
pub fn common(m: &MsgArgs, t: &TargetArgs, duration_bound: bool) -> Result<Common, Unavailable> {
    let auth = match m.auth {
        Auth::Link => AuthMode::Link,
        Auth::Signed => AuthMode::Signed,
        Auth::Sealed => {
            return Err(Unavailable(
                "--auth sealed: end-to-end sealed payloads are not available yet in \
                 relay-client (the sealing issue); use --auth link (the default) or --auth signed"
                    .into(),
            ));
        }
    };
    Ok(Common {
        size: m.size,
        fill: match m.payload {
            PayloadArg::Random => Fill::Random,
            PayloadArg::Text => Fill::Text,
        },
        lane: m.lane,
        auth,
        warmup: m.warmup.unwrap_or(if duration_bound { 1.0 } else { 0.0 }),
        grace: m.grace,
        json: m.json.clone(),
        hgrm: m.hgrm.clone(),
        plot: m.plot.clone(),
        connect_timeout: std::time::Duration::from_secs_f64(t.connect_timeout),
        client: match m.client {
            ClientArg::Cell => Client::Cell,
            ClientArg::Raw => Client::Raw,
        },
    })
}
