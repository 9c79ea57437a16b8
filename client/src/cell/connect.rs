//! One dial of the relay: resolve its host, open a QUIC or TLS-over-TCP
//! connection (pinning its key), exchange Hello and Welcome, announce; and
//! the QUIC endpoints reused from one dial to the next.

use super::CellError;
use super::handle::{Shared, lock};
use crate::clock;
use quinn::ConnectionError;
use relay_codec::Frame;
use relay_codec::frame::{CloseCode, Role};
use relay_codec::message::SIGNATURE_LEN;
use relay_link::quic;
use relay_link::tcp::{self, HandshakeError, TcpLink, TcpTuning};
use relay_link::{ControlSender, FrameReceiver, Link, LinkEnd, LinkError, Transport, tls};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::time::Instant;

/// How long [`Cell::close`] waits for the relay to take its Close frame,
/// and then for the endpoint to go idle.
pub(crate) const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Client endpoints, one per address family, reused across reconnects; or
/// the endpoint shared with other cells ([`CellOptions::endpoint`]). Over
/// TCP there are none: each link is a connection of its own.
pub(crate) struct Dialer {
    pub(crate) shared: Option<quinn::Endpoint>,
    v4: Option<quinn::Endpoint>,
    v6: Option<quinn::Endpoint>,
    /// The last link that completed its transport handshake: whether it
    /// was this cell that closed it decides what `close` waits for.
    pub(crate) last: Option<Link>,
}

impl Dialer {
    pub(crate) fn new(shared: Option<quinn::Endpoint>) -> Self {
        Self {
            shared,
            v4: None,
            v6: None,
            last: None,
        }
    }

    pub(crate) fn endpoint_for(&mut self, addr: SocketAddr) -> Result<quinn::Endpoint, CellError> {
        if let Some(ep) = &self.shared {
            return Ok(ep.clone());
        }
        let (slot, bind): (_, SocketAddr) = if addr.is_ipv4() {
            (&mut self.v4, (std::net::Ipv4Addr::UNSPECIFIED, 0).into())
        } else {
            (&mut self.v6, (std::net::Ipv6Addr::UNSPECIFIED, 0).into())
        };
        if let Some(ep) = slot {
            return Ok(ep.clone());
        }
        let ep = quic::client_endpoint(bind)?;
        *slot = Some(ep.clone());
        Ok(ep)
    }

    /// Closes the endpoints this cell owns. If this cell closed its last
    /// link itself, it waits (bounded) until the close has left (QUIC: the
    /// endpoints are idle; TCP: the Close frame and `close_notify` are
    /// written), so the close reaches the relay. If the relay closed it
    /// first (as it does on a Close frame) or no link was made, nothing of
    /// this cell's is in flight: waiting would only sit out QUIC's draining
    /// period or an abandoned dial, so it returns at once. A shared
    /// endpoint is left alone: it carries other cells, and sends this
    /// cell's close on its own.
    pub(crate) async fn close(&mut self) {
        self.shared = None;
        let last = self.last.take();
        let ours = last
            .as_ref()
            .is_some_and(|l| matches!(l.end(), None | Some(LinkEnd::Local)));
        if ours && let Some(link) = &last {
            let _ = tokio::time::timeout(CLOSE_GRACE, link.close_sent()).await;
        }
        for ep in [self.v4.take(), self.v6.take()].into_iter().flatten() {
            if ours {
                let _ = tokio::time::timeout(CLOSE_GRACE, ep.wait_idle()).await;
            }
        }
    }
}

/// A link that passed the handshake.
pub(crate) struct Established {
    pub(crate) link: Link,
    pub(crate) control: ControlSender,
    pub(crate) reader: FrameReceiver,
    /// The writer's batch size, fitted to the relay's largest frame.
    pub(crate) batch_bytes: usize,
}

/// How to open a transport connection to the relay, built once per dial.
pub(crate) enum DialConfig {
    Quic(quinn::ClientConfig),
    Tcp(Arc<rustls::ClientConfig>),
}

/// Bytes a message adds beyond its payload at most (header, longest
/// destination, signature), plus a batch frame's own header.
pub(crate) const MESSAGE_OVERHEAD: usize =
    relay_codec::message::HEADER_LEN + relay_codec::message::MAX_SERVICE_NAME + SIGNATURE_LEN + 16;

/// The largest payload to send and the batch size to write with, given our
/// limits and the relay's (from Welcome): every frame the writer makes fits
/// the relay's `max_frame` (a batch closes at the first message that takes
/// it past `batch_bytes`, so it can hold `batch_bytes` plus one message).
pub(crate) fn sizes(
    our_payload: usize,
    our_batch: usize,
    relay_payload: usize,
    relay_frame: usize,
) -> (usize, usize) {
    let room = relay_frame.saturating_sub(MESSAGE_OVERHEAD);
    let payload = our_payload.min(relay_payload).min(room.saturating_sub(1));
    let batch = our_batch.min(room - payload).max(1);
    (payload, batch)
}

/// Resolves the relay and connects to the first address that answers,
/// giving each address an equal share of the connect timeout.
pub(crate) async fn dial(shared: &Shared, dialer: &mut Dialer) -> Result<Established, CellError> {
    let opts = &shared.opts;
    let relay = &shared.relay;
    let target = relay.host_port();
    let deadline = Instant::now() + opts.connect_timeout;
    let addrs: Vec<SocketAddr> =
        tokio::time::timeout_at(deadline, tokio::net::lookup_host(&target))
            .await
            .map_err(|_| {
                CellError::Timeout(format!(
                    "resolving relay host {:?} took longer than {:?}",
                    relay.host, opts.connect_timeout
                ))
            })?
            .map_err(|e| CellError::Resolve {
                host: relay.host.clone(),
                reason: e.to_string(),
            })?
            .collect();
    if addrs.is_empty() {
        return Err(CellError::Resolve {
            host: relay.host.clone(),
            reason: "no addresses".into(),
        });
    }
    let key = shared.key.signing_key();
    let cfg = match opts.transport {
        Transport::Quic => DialConfig::Quic(quic::client_config(key, relay.key.0, &opts.tuning)?),
        Transport::Tcp => DialConfig::Tcp(Arc::new(tls::tls_client_config(
            key,
            relay.key.0,
            tls::ALPN,
        )?)),
    };
    let mut last = None;
    for (i, &addr) in addrs.iter().enumerate() {
        let left = deadline.saturating_duration_since(Instant::now());
        let share = left / (addrs.len() - i) as u32;
        match attempt(shared, dialer, &cfg, addr, share).await {
            Ok(e) => return Ok(e),
            // Another address may answer; anything else is the relay's word.
            Err(e @ (CellError::Timeout(_) | CellError::Connect { .. })) => {
                tracing::debug!(%addr, error = %e, "relay address failed");
                last = Some(e);
            }
            Err(e) => return Err(e),
        }
    }
    Err(last.expect("at least one address was tried"))
}

/// The hint after a handshake the relay's key or protocol failed.
pub(crate) const KEY_HINT: &str = "; check that the KEY in KEY@HOST:PORT is the relay's public key and that \
                        it is a Celluler relay";

/// Opens a QUIC connection or a TLS-over-TCP connection to `addr`, within
/// `timeout`.
pub(crate) async fn open_link(
    shared: &Shared,
    dialer: &mut Dialer,
    cfg: &DialConfig,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<Link, CellError> {
    let opts = &shared.opts;
    let unreachable = |proto: &str| {
        CellError::Timeout(format!(
            "could not reach the relay at {addr} within {:.1}s; check that it runs there \
             and that {proto} port {} is reachable",
            opts.connect_timeout.as_secs_f64(),
            addr.port()
        ))
    };
    match cfg {
        DialConfig::Quic(cfg) => {
            let ep = dialer.endpoint_for(addr)?;
            let connecting = ep
                .connect_with(cfg.clone(), addr, tls::SERVER_NAME)
                .map_err(|e| CellError::Connect {
                    addr,
                    reason: e.to_string(),
                })?;
            match tokio::time::timeout(timeout, connecting).await {
                Err(_) => Err(unreachable("UDP")),
                Ok(Err(e)) => Err(handshake_error(addr, e)),
                Ok(Ok(c)) => Ok(Link::quic(c, opts.limits)),
            }
        }
        DialConfig::Tcp(tls) => {
            let tuning = TcpTuning {
                handshake_timeout: timeout,
                ..opts.tcp.clone()
            };
            match tcp::connect(addr, tls.clone(), &tuning).await {
                Ok(c) => Ok(Link::Tcp(TcpLink::new(c, opts.limits, &opts.tcp))),
                Err(HandshakeError::Timeout(_)) => Err(unreachable("TCP")),
                Err(e @ HandshakeError::Tls(_)) => Err(CellError::Connect {
                    addr,
                    reason: format!("{e}{KEY_HINT}"),
                }),
                Err(HandshakeError::Connect { source, .. }) => Err(CellError::Connect {
                    addr,
                    reason: format!("TCP connect failed: {source}"),
                }),
                Err(e) => Err(CellError::Connect {
                    addr,
                    reason: e.to_string(),
                }),
            }
        }
    }
}

pub(crate) async fn attempt(
    shared: &Shared,
    dialer: &mut Dialer,
    cfg: &DialConfig,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<Established, CellError> {
    let opts = &shared.opts;
    let link = open_link(shared, dialer, cfg, addr, timeout).await?;
    dialer.last = Some(link.clone());
    let hello = relay_link::hello(
        &link,
        Role::Cell,
        opts.notices,
        &opts.agent,
        opts.connect_timeout,
    )
    .await;
    let (mut control, reader, welcome) = match hello {
        Ok(v) => v,
        Err(LinkError::Timeout(_)) => {
            link.close(CloseCode::Normal, "no Welcome");
            return Err(CellError::Timeout(format!(
                "the relay at {addr} accepted the connection but did not answer Hello within {:?}",
                opts.connect_timeout
            )));
        }
        // Closed with the Version code already.
        Err(e @ LinkError::Version { .. }) => return Err(e.into()),
        Err(e) => {
            link.close(CloseCode::Normal, "handshake failed");
            return Err(e.into());
        }
    };
    let (max_payload, batch_bytes) = sizes(
        opts.limits.max_payload,
        opts.writer.batch_bytes,
        welcome.max_payload as usize,
        welcome.max_frame as usize,
    );
    shared.max_payload.store(max_payload, Ordering::Relaxed);
    let skew = welcome.time_ms as i64 - clock::now_ms() as i64;
    if skew.abs() > 10_000 {
        tracing::warn!(
            skew_ms = skew,
            "this machine's clock differs from the relay's by {:.1}s; the relay refuses \
             messages outside its timestamp window (by default 300s past, 30s future); \
             check NTP",
            skew as f64 / 1000.0
        );
    }
    // Announce and watch before returning, so a connect that returned is
    // visible to discovery as early as possible.
    let mut frames: Vec<Frame> = shared.announce_frame().into_iter().collect();
    if lock(&shared.announced).watch {
        frames.push(Frame::WatchPresence(true));
    }
    for f in &frames {
        if let Err(e) = control.send(f).await {
            link.close(CloseCode::Normal, "announce failed");
            return Err(e.into());
        }
    }
    tracing::debug!(%addr, relay = %shared.relay.key.short(), transport = %link.transport(), "linked to relay");
    shared.set_up();
    Ok(Established {
        link,
        control,
        reader,
        batch_bytes,
    })
}

pub(crate) fn handshake_error(addr: SocketAddr, e: ConnectionError) -> CellError {
    let hint = match &e {
        ConnectionError::TransportError(_) | ConnectionError::ConnectionClosed(_) => KEY_HINT,
        _ => "",
    };
    if let ConnectionError::ApplicationClosed(c) = &e {
        return CellError::Refused {
            code: CloseCode::from_u16(u16::try_from(c.error_code.into_inner()).unwrap_or(u16::MAX)),
            reason: String::from_utf8_lossy(&c.reason).into_owned(),
        };
    }
    CellError::Connect {
        addr,
        reason: format!("{e}{hint}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_fit_the_relays_largest_frame() {
        // Defaults on both sides: nothing to lower.
        assert_eq!(
            sizes(1 << 20, 64 << 10, 1 << 20, 4 << 20),
            (1 << 20, 64 << 10)
        );
        // A relay with small payloads lowers ours.
        assert_eq!(sizes(1 << 20, 64 << 10, 1000, 4 << 20).0, 1000);
        // A relay with small frames lowers the batch, then the payload.
        for frame in [2000, 70_000, 1 << 20] {
            let (p, b) = sizes(1 << 20, 64 << 10, 1 << 20, frame);
            assert!(
                b >= 1 && p + b + MESSAGE_OVERHEAD <= frame,
                "{frame}: {p} {b}"
            );
        }
        assert_eq!(sizes(1 << 20, 64 << 10, 1 << 20, 0), (0, 1));
    }
}
