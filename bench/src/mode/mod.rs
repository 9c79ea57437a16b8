//! One module per mode: each turns its command-line arguments into a plan
//! and runs it.

pub mod connections;
pub mod durable;
pub mod fanout;
pub mod latency;
pub mod reach;
pub mod throughput;

use crate::cli::{Auth, Broker, ClientArg, MsgArgs, PayloadArg, TargetArgs};
use crate::payload::Fill;
use crate::run::{Client, Common};
use crate::{BadArgs, Unavailable};
use relay_client::cell::AuthMode;
use relay_codec::Lane;

/// Checks the server arguments against `--broker`, and, for a message
/// mode, the message arguments that only a relay has (`m`).
pub fn check_broker(t: &TargetArgs, m: Option<&MsgArgs>) -> Result<(), BadArgs> {
    let bad = |s: &str| Err(BadArgs(s.into()));
    match t.broker {
        Broker::Relay => {
            if t.nats_addr.is_some() {
                return bad("--nats-addr is a nats-server's address: add --broker nats");
            }
            if t.nats_bin.is_some() {
                return bad("--nats-bin starts nats-server: add --broker nats");
            }
        }
        Broker::Nats => {
            if t.relay.is_some() {
                return bad(
                    "--broker nats measures nats-server: give --nats-addr HOST:PORT (or \
                     --spawn) instead of --relay",
                );
            }
            if t.transport.is_some() {
                return bad(
                    "--transport picks how cells reach a relay: async-nats speaks NATS over \
                     TCP; leave --transport out with --broker nats",
                );
            }
            if t.relay_bin.is_some() || t.relay_config.is_some() || t.relays > 1 {
                return bad(
                    "--relay-bin, --relay-config and --relays start relays: leave them out \
                     with --broker nats",
                );
            }
            let Some(m) = m else { return Ok(()) };
            if m.client != ClientArg::Cell {
                return bad(
                    "--client raw is for relay links: with --broker nats the senders and \
                     receivers are async-nats clients",
                );
            }
            if m.auth != Auth::Link {
                return bad(
                    "--auth is for relay cells: nats-server messages carry no signature; \
                     leave --auth out with --broker nats",
                );
            }
            if m.lane != Lane::Normal {
                return bad("NATS has no lanes: leave --lane out with --broker nats");
            }
        }
    }
    Ok(())
}

/// The shared settings of a message mode; `duration_bound` picks the
/// default warm-up (1 s for runs bounded by time, 0 for runs bounded by a
/// count).
pub fn common(m: &MsgArgs, t: &TargetArgs, duration_bound: bool) -> anyhow::Result<Common> {
    check_broker(t, Some(m))?;
    let auth = match m.auth {
        Auth::Link => AuthMode::Link,
        Auth::Signed => AuthMode::Signed,
        Auth::Sealed => {
            return Err(Unavailable(
                "--auth sealed: end-to-end sealed payloads are not available yet in \
                 relay-client (the sealing issue); use --auth link (the default) or --auth signed"
                    .into(),
            )
            .into());
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
        client: match (t.broker, m.client) {
            (Broker::Nats, _) => Client::Nats,
            (Broker::Relay, ClientArg::Cell) => Client::Cell,
            (Broker::Relay, ClientArg::Raw) => Client::Raw,
        },
        nats_sub_capacity: t.nats_sub_capacity,
    })
}
