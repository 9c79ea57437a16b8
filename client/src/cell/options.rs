//! How a cell links to its relay: [`CellOptions`] and their checks.

use super::CellError;
#[cfg(doc)]
use super::{Cell, CellStats, Event};
use relay_codec::frame::MAX_AGENT;
use relay_codec::{Limits, ServiceName};
use relay_link::dial::Backoff;
use relay_link::quic::TransportTuning;
use relay_link::tcp::TcpTuning;
use relay_link::{Transport, WriterConfig};
use std::time::Duration;

/// How this cell authenticates the messages it sends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AuthMode {
    /// Each message carries an ed25519 signature by this cell's key, which
    /// every receiver checks end to end (about 25 µs per message to sign and
    /// as much to verify).
    #[default]
    Signed,
    /// No signature: receivers trust the relay, which proved this cell's key
    /// when the link was set up and only forwards messages whose source is
    /// the link's key.
    Link,
}

/// How a [`Cell`] links to its relay. `CellOptions::default()` just works.
#[derive(Clone, Debug)]
pub struct CellOptions {
    /// Software name and version sent in Hello, for the relay's logs (at
    /// most 64 bytes).
    pub agent: String,
    /// Application version announced to the relay (at most 64 bytes; empty:
    /// none).
    pub app_version: String,
    /// Services this cell offers, announced when it attaches; other cells
    /// find it with [`Cell::discover`] and reach it with
    /// [`Cell::send_to_service`].
    pub services: Vec<ServiceName>,
    /// Whether the relay should send [`Event::Notice`]s about this cell's
    /// messages it drops (not attached, slow receiver, expired, ...); they
    /// are also summed in [`Cell::undelivered`].
    pub notices: bool,
    /// How sent messages are authenticated.
    pub auth: AuthMode,
    /// How to reach the relay: QUIC over UDP (the default) or TLS 1.3 over
    /// TCP, at the relay's host and port. A relay serves both on one port
    /// number by default (`node.listen_tcp` in its config).
    pub transport: Transport,
    /// Bound on reaching the relay: name resolution, the QUIC or TCP and
    /// TLS handshake, and separately the Hello/Welcome exchange.
    pub connect_timeout: Duration,
    /// Whether to reconnect (with backoff) after the link is lost. The first
    /// connection is never retried: [`Cell::connect`] returns its error.
    pub reconnect: bool,
    /// First delay before reconnecting; doubled after each failed attempt.
    /// Each wait is drawn between half the delay and all of it
    /// ([`Backoff`]), so cells cut off together do not return together.
    pub backoff_initial: Duration,
    /// Longest delay between reconnect attempts.
    pub backoff_max: Duration,
    /// Outbound messages queued per lane before sending waits.
    pub queue_depth: usize,
    /// Received messages held for the application before the link stops
    /// reading from the relay (at least 1), not counting the rest of the
    /// batch being handed out. Messages are queued a batch frame at a time:
    /// a batch waits until there is room for all of it, and a batch larger
    /// than the whole bound waits for an empty queue and then goes in alone.
    /// Presence, notice and link events share the queue, which holds at
    /// most this many batches and events: one that finds it full is
    /// dropped and counted ([`CellStats::dropped_events`]).
    pub event_queue: usize,
    /// Message ids remembered per lane to drop duplicates (a message's lane
    /// is part of its authenticated bytes, so its copies all come on one
    /// lane), in the relay's own [`DedupWindow`](relay_core::DedupWindow),
    /// bounded by count alone: at least the last `dedup_capacity / 2` ids of
    /// each lane and at most `dedup_capacity` are remembered (at least 1).
    /// A lane's table is made when its first message arrives (an idle cell
    /// holds none), with room for `min(dedup_capacity / 2, 4096)` ids (128
    /// KiB at most), and grows with the ids: 32 to 64 bytes per id.
    pub dedup_capacity: usize,
    /// A QUIC endpoint (UDP socket) to connect through, shared with other
    /// cells: 10 000 cells can use one. `None`: this cell binds its own
    /// (one per address family), and closes it on [`Cell::close`]. A shared
    /// endpoint is never closed by a cell: `close` closes only this cell's
    /// connection; let the endpoint go idle
    /// ([`quinn::Endpoint::wait_idle`]) before dropping it, so the last
    /// closes reach their relays. Make one with
    /// [`relay_link::quic::client_endpoint`]. Used only over QUIC.
    pub endpoint: Option<quinn::Endpoint>,
    /// How long [`Cell::discover`] waits for the relay's answer.
    pub request_timeout: Duration,
    /// QUIC windows, keep-alive and idle timeout.
    pub tuning: TransportTuning,
    /// TCP socket, chunking and buffer settings, over TCP (its
    /// `handshake_timeout` is replaced by [`connect_timeout`](Self::connect_timeout)).
    pub tcp: TcpTuning,
    /// Bounds on what this cell sends and accepts.
    pub limits: Limits,
    /// How outbound messages are batched.
    pub writer: WriterConfig,
    /// Acknowledge a durable message to the relay as soon as the
    /// application takes it from the cell (`recv`, `recv_many`,
    /// `next_event`). Off: the application calls [`Cell::ack_durable`]
    /// once it has dealt with it (the relay redelivers until then).
    pub ack_durable_on_receive: bool,
}

impl Default for CellOptions {
    /// Signed messages, notices on, QUIC, reconnect on with 100 ms to 5 s
    /// backoff, a 5 s connect timeout, 4096 messages per lane, 65 536
    /// queued events and remembered ids, an endpoint of its own, default
    /// tuning, limits and batching.
    fn default() -> Self {
        Self {
            agent: format!("relay-client/{}", env!("CARGO_PKG_VERSION")),
            app_version: String::new(),
            services: Vec::new(),
            notices: true,
            auth: AuthMode::Signed,
            transport: Transport::Quic,
            connect_timeout: Duration::from_secs(5),
            reconnect: true,
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            queue_depth: 4096,
            event_queue: 65_536,
            dedup_capacity: 65_536,
            endpoint: None,
            request_timeout: Duration::from_secs(5),
            tuning: TransportTuning::default(),
            tcp: TcpTuning::default(),
            limits: Limits::default(),
            writer: WriterConfig::default(),
            ack_durable_on_receive: true,
        }
    }
}

pub(crate) fn validate(opts: &CellOptions) -> Result<(), CellError> {
    if opts.agent.len() > MAX_AGENT {
        return Err(CellError::Invalid(format!(
            "agent is {} bytes; at most {MAX_AGENT}",
            opts.agent.len()
        )));
    }
    check_announcement(&opts.app_version, &opts.services, &opts.limits)?;
    if opts.connect_timeout.is_zero() {
        return Err(CellError::Invalid(
            "connect_timeout must be above zero".into(),
        ));
    }
    // The bounds the redialer takes (its seed is drawn at connect).
    Backoff::new(opts.backoff_initial, opts.backoff_max, 0)
        .map_err(|e| CellError::Invalid(format!("backoff_initial and backoff_max: {e}")))?;
    Ok(())
}

pub(crate) fn check_announcement(
    app_version: &str,
    services: &[ServiceName],
    limits: &Limits,
) -> Result<(), CellError> {
    if app_version.len() > MAX_AGENT {
        return Err(CellError::Invalid(format!(
            "app_version is {} bytes; at most {MAX_AGENT}",
            app_version.len()
        )));
    }
    if services.len() > limits.max_services {
        return Err(CellError::Invalid(format!(
            "{} services announced; at most {}",
            services.len(),
            limits.max_services
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_documented_ones() {
        let o = CellOptions::default();
        assert!(o.notices && o.reconnect);
        assert_eq!(o.auth, AuthMode::Signed);
        assert_eq!(o.connect_timeout, Duration::from_secs(5));
        assert_eq!(o.backoff_initial, Duration::from_millis(100));
        assert_eq!(o.backoff_max, Duration::from_secs(5));
        assert_eq!(o.queue_depth, 4096);
        assert_eq!((o.event_queue, o.dedup_capacity), (65_536, 65_536));
        assert!(o.endpoint.is_none());
        assert!(o.agent.len() <= MAX_AGENT);
        validate(&o).unwrap();
    }

    #[test]
    fn bad_options_are_refused_with_a_reason() {
        let o = CellOptions {
            app_version: "x".repeat(65),
            ..CellOptions::default()
        };
        assert!(validate(&o).unwrap_err().to_string().contains("at most 64"));
        let o = CellOptions {
            backoff_max: Duration::from_millis(1),
            ..CellOptions::default()
        };
        assert!(validate(&o).is_err());
    }
}
