//! Lean senders and receivers for `--client raw`: a bare link (the QUIC or
//! TCP connection and Hello/Welcome a `Cell` sets up, from the link layer
//! `relay_client::link`), the way a load generator can speak a broker's
//! protocol without its client library.
//!
//! A `Cell` hands messages to the application through an event queue after
//! end-to-end checks (id hash, dedup set, a `Received` per message, one
//! queue operation per batch), and takes them from it through a queue to
//! its link writer (an allocation, a queue item and a copy per message). A
//! raw receiver reads each batch frame, walks its messages and records
//! their timestamps directly; a raw sender encodes each message straight
//! into the open batch frame. Comparing the two shows what the Cell costs
//! and how fast the relay is with clients that do not hold it back.

use crate::cells::Progress;
use crate::tally::Tally;
use anyhow::{Context as _, Result, anyhow, bail};
use bytes::{Bytes, BytesMut};
use quinn::Endpoint;
use relay_client::link::quic::{self, TransportTuning};
use relay_client::link::tcp::{self, TcpLink, TcpTuning};
use relay_client::link::{
    BatchReader, ControlSender, FrameReceiver, LaneSender, Link, Transport, WriterConfig, tls,
};
use relay_codec::frame::{CloseCode, Role};
use relay_codec::{
    BatchEncoder, Destination, Frame, Keypair, Lane, Limits, Message, NodeAddr, PublicKey,
    ServiceName,
};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// A bare receiving link, attached and routable.
pub struct RawReceiver {
    /// Its key (the destination senders use).
    pub key: PublicKey,
    link: RawLink,
}

/// A bare link, attached: what a `Cell` sets up, without the `Cell`.
struct RawLink {
    key: Keypair,
    link: Link,
    /// The QUIC endpoint, over QUIC.
    endpoint: Option<Endpoint>,
    /// Held so the control channel stays open.
    _control: ControlSender,
    _reader: FrameReceiver,
}

impl RawLink {
    /// Closes the link and waits (bounded) until the close has left.
    async fn close(&self) {
        self.link.close(CloseCode::Normal, "relay-bench done");
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            self.link.close_sent().await;
            if let Some(ep) = &self.endpoint {
                ep.wait_idle().await;
            }
        })
        .await;
    }
}

/// Connects a raw receiver, announces `services`, and waits (one discover
/// round trip) until the relay has attached it.
pub async fn connect(
    relay: &NodeAddr,
    transport: Transport,
    services: Vec<ServiceName>,
    timeout: Duration,
) -> Result<RawReceiver> {
    let link = dial(relay, transport, services, timeout).await?;
    Ok(RawReceiver {
        key: link.key.public(),
        link,
    })
}

/// Dials the relay over `transport` with a fresh key, as a cell, announces
/// `services`, and waits (one discover round trip) until the relay has
/// attached the link and registered the services.
async fn dial(
    relay: &NodeAddr,
    transport: Transport,
    services: Vec<ServiceName>,
    timeout: Duration,
) -> Result<RawLink> {
    let addr: SocketAddr = tokio::net::lookup_host(relay.host_port())
        .await
        .with_context(|| format!("resolving {}", relay.host_port()))?
        .next()
        .ok_or_else(|| anyhow!("{} resolves to no address", relay.host_port()))?;
    let bind: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0".parse().expect("valid")
    } else {
        "[::]:0".parse().expect("valid")
    };
    let key = Keypair::generate();
    let fail = |e: &dyn std::fmt::Display| {
        anyhow!(
            "a raw link could not connect to the relay {relay} over {transport}: {e}\ncheck \
             that a relay runs there and that KEY is its key, or use --spawn"
        )
    };
    let (endpoint, link) = match transport {
        Transport::Quic => {
            let endpoint = quic::client_endpoint(bind)?;
            let cfg =
                quic::client_config(key.signing_key(), relay.key.0, &TransportTuning::default())?;
            let connecting = endpoint
                .connect_with(cfg, addr, tls::SERVER_NAME)
                .map_err(|e| fail(&e))?;
            let conn = tokio::time::timeout(timeout, connecting)
                .await
                .map_err(|_| fail(&format!("no QUIC handshake within {timeout:?}")))?
                .map_err(|e| fail(&e))?;
            (Some(endpoint), Link::quic(conn, Limits::default()))
        }
        Transport::Tcp => {
            let cfg = tls::tls_client_config(key.signing_key(), relay.key.0, tls::ALPN)?;
            let tuning = TcpTuning {
                handshake_timeout: timeout,
                ..TcpTuning::default()
            };
            let conn = tcp::connect(addr, Arc::new(cfg), &tuning)
                .await
                .map_err(|e| fail(&e))?;
            (
                None,
                Link::Tcp(TcpLink::new(conn, Limits::default(), &tuning)),
            )
        }
    };
    let agent = format!("relay-bench/{} raw", env!("CARGO_PKG_VERSION"));
    let (mut control, mut reader, _welcome) =
        relay_client::link::hello(&link, Role::Cell, false, &agent, timeout)
            .await
            .map_err(|e| fail(&e))?;
    if !services.is_empty() {
        control
            .send(&Frame::Announce {
                app_version: String::new(),
                services,
            })
            .await?;
    }
    // The relay serves the control channel only once the link is attached,
    // and in order: the reply also means the announcement is registered.
    let probe = ServiceName::new("relay-bench-probe").expect("valid service name");
    control
        .send(&Frame::Discover {
            request: 1,
            service: probe,
        })
        .await?;
    tokio::time::timeout(timeout, async {
        loop {
            match reader.next().await? {
                Some(Frame::DiscoverReply { request: 1, .. }) => return Ok(()),
                Some(_) => continue,
                None => bail!("the relay ended the control stream"),
            }
        }
    })
    .await
    .map_err(|_| anyhow!("the relay did not answer a discover within {timeout:?}"))??;
    Ok(RawLink {
        key,
        link,
        endpoint,
        _control: control,
        _reader: reader,
    })
}

/// A bare sending link for `--client raw`: each message is encoded straight
/// into the open batch frame (zstd and the 20 % rule as a `Cell`'s writer
/// applies them), and a full batch is written to its lane, as a
/// protocol-level load generator writes prebuilt frames. No queue, task hand-off or allocation
/// per message; what is left is encoding each message and compressing
/// each batch.
pub struct RawSender {
    link: RawLink,
    signed: bool,
    enc: BatchEncoder,
    /// The lane of the open batch.
    lane: Lane,
    out: BytesMut,
    lanes: LaneSender,
    nonce: u64,
}

/// Bytes and messages at which the open batch is written: a `Cell`'s
/// writer defaults.
const BATCH_BYTES: usize = 64 * 1024;
const BATCH_MESSAGES: usize = 4096;

/// Connects a raw sender; `signed` signs every message (`--auth signed`).
pub async fn connect_sender(
    relay: &NodeAddr,
    transport: Transport,
    signed: bool,
    timeout: Duration,
) -> Result<RawSender> {
    let link = dial(relay, transport, Vec::new(), timeout).await?;
    let defaults = WriterConfig::default();
    Ok(RawSender {
        lanes: link.link.lane_sender(),
        link,
        signed,
        enc: BatchEncoder::new(defaults.zstd_level, defaults.compress_min)
            .context("creating a zstd encoder")?,
        lane: Lane::Normal,
        out: BytesMut::new(),
        nonce: 1,
    })
}

impl RawSender {
    /// Adds one message to the open batch, writing the batch first if it is
    /// of another lane, and after if it is full.
    pub async fn send(&mut self, to: Destination, lane: Lane, payload: Bytes) -> Result<()> {
        if lane != self.lane {
            self.flush().await?;
            self.lane = lane;
        }
        let msg = Message::new(self.link.key.public(), to, payload)
            .with_lane(lane)
            .with_timestamp(unix_ms())
            .with_nonce(self.nonce);
        self.nonce += 1;
        if self.signed {
            self.enc.push_signed(&msg, &self.link.key);
        } else {
            self.enc.push(&msg);
        }
        if self.enc.len_bytes() >= BATCH_BYTES || self.enc.count() >= BATCH_MESSAGES {
            self.flush().await?;
        }
        Ok(())
    }

    /// Writes the open batch, if any.
    pub async fn flush(&mut self) -> Result<()> {
        if self.enc.is_empty() {
            return Ok(());
        }
        self.enc.finish(self.lane, &mut self.out);
        self.lanes
            .send(self.lane, self.out.split().freeze())
            .await
            .map_err(|e| anyhow!("sending failed: {e}"))?;
        Ok(())
    }

    /// Writes what is open, finishes the lanes and closes the link once
    /// the relay has read them (or after 3 s).
    pub async fn close(mut self) {
        let _ = self.flush().await;
        self.lanes
            .finish(tokio::time::Instant::now() + Duration::from_secs(3))
            .await;
        self.link.close().await;
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What one raw receiver saw.
pub struct RawReceived {
    /// Counts and latencies of every stream of the link.
    pub tally: Tally,
    /// Why the link was lost, if it was.
    pub lost_link: Option<String>,
    /// QUIC statistics of the relay -> receiver link at the end (none over
    /// TCP).
    pub link: Option<LinkStats>,
}

/// QUIC statistics of one relay -> receiver link, as this end sees them.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct LinkStats {
    /// Smoothed round-trip time, µs.
    pub rtt_us: u64,
    /// Congestion window of this end (for its ACKs), bytes.
    pub cwnd: u64,
    /// Packets this end declared lost.
    pub lost_packets: u64,
    /// Congestion events this end saw.
    pub congestion_events: u64,
    /// UDP datagrams received.
    pub udp_rx_datagrams: u64,
    /// UDP datagrams sent (mostly ACKs).
    pub udp_tx_datagrams: u64,
}

/// Counts of one lane.
struct StreamSeen {
    tally: Tally,
    error: Option<String>,
}

/// Receives until `stop`: one task per lane the relay starts.
pub async fn receive(
    rx: RawReceiver,
    measure_from: Arc<AtomicU64>,
    progress: Arc<Progress>,
    mut stop: watch::Receiver<bool>,
) -> RawReceived {
    let mut streams = JoinSet::new();
    let mut lost_link = None;
    let stream_stop = stop.clone();
    loop {
        tokio::select! {
            s = rx.link.link.accept_lane() => match s {
                Ok(recv) => {
                    streams.spawn(read_stream(
                        recv,
                        measure_from.clone(),
                        progress.clone(),
                        stream_stop.clone(),
                    ));
                }
                Err(e) => {
                    lost_link = Some(e.to_string());
                    break;
                }
            },
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    let mut out = RawReceived {
        tally: Tally::default(),
        lost_link,
        link: None,
    };
    while let Some(r) = streams.join_next().await {
        let Ok(s) = r else { continue };
        out.tally.merge(&s.tally);
        if out.lost_link.is_none() {
            out.lost_link = s.error;
        }
    }
    if let Link::Quic(q) = &rx.link.link {
        let conn = q.connection();
        let st = conn.stats();
        out.link = Some(LinkStats {
            rtt_us: conn.rtt().as_micros() as u64,
            cwnd: st.path.cwnd,
            lost_packets: st.path.lost_packets,
            congestion_events: st.path.congestion_events,
            udp_rx_datagrams: st.udp_rx.datagrams,
            udp_tx_datagrams: st.udp_tx.datagrams,
        });
    }
    rx.link.close().await;
    out
}

async fn read_stream(
    recv: FrameReceiver,
    measure_from: Arc<AtomicU64>,
    progress: Arc<Progress>,
    mut stop: watch::Receiver<bool>,
) -> StreamSeen {
    let mut s = StreamSeen {
        tally: Tally::default(),
        error: None,
    };
    let mut reader = match BatchReader::new(recv, Limits::default()) {
        Ok(r) => r,
        Err(e) => {
            s.error = Some(e.to_string());
            return s;
        }
    };
    let mut envs = Vec::new();
    loop {
        let batch = tokio::select! {
            biased;
            b = reader.next(&mut envs) => b,
            _ = stop.wait_for(|s| *s) => break,
        };
        match batch {
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(e) => {
                s.error = Some(format!("bad data from the relay: {e}"));
                break;
            }
        }
        let from = measure_from.load(Ordering::Relaxed);
        let (received, seen) = (s.tally.received, s.tally.received + s.tally.warmup);
        for env in &envs {
            s.tally.take(&env.payload(), from);
        }
        // The receiver's lanes share one `Progress`: add what this batch
        // brought.
        progress
            .received
            .fetch_add(s.tally.received - received, Ordering::Relaxed);
        progress
            .seen
            .fetch_add(s.tally.received + s.tally.warmup - seen, Ordering::Relaxed);
    }
    s
}
