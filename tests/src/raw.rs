//! Raw links: a QUIC or TCP connection and the link handshake built by
//! hand from `relay_link`, so a test can send exactly the bytes it wants
//! (forged sources, oversize payloads, zip bombs, replays) and see exactly
//! what the relay answers: frames on the control channel, messages on the
//! lanes, and the close code and reason. [`RawOptions::transport`] picks
//! the transport; everything else is the same on both.

use bytes::{Bytes, BytesMut};
use quinn::{Connection, ConnectionError, Endpoint};
use relay_codec::frame::{CloseCode, Role};
use relay_codec::{
    BatchEncoder, Destination, Envelope, Frame, Keypair, Lane, Limits, Message, PublicKey,
};
use relay_link::quic::{self, TransportTuning};
use relay_link::tcp::{self, TcpLink, TcpTuning};
use relay_link::{
    BatchReader, ControlSender, FrameReceiver, LaneSender, Link, LinkEnd, LinkError, Transport,
    Welcome, tls,
};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::RelayProcess;

/// How long a handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

/// A nonce no other message of this test process uses.
pub fn next_nonce() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// A data message from `from` to `to` on `lane`, stamped now with a fresh
/// nonce, not yet signed.
pub fn message(from: &Keypair, to: Destination, lane: Lane, payload: impl Into<Bytes>) -> Message {
    Message::new(from.public(), to, payload.into())
        .with_lane(lane)
        .with_timestamp(now_ms())
        .with_nonce(next_nonce())
}

/// `msg` encoded and signed by `key`.
pub fn signed(msg: &Message, key: &Keypair) -> Envelope {
    let mut buf = BytesMut::new();
    msg.encode_signed(key, &mut buf);
    envelope(buf.freeze())
}

/// `msg` encoded with the authenticator it holds (none for a fresh one).
pub fn encoded(msg: &Message) -> Envelope {
    let mut buf = BytesMut::new();
    msg.encode(&mut buf);
    envelope(buf.freeze())
}

/// Parses one encoded message, with bounds far above any test's.
pub fn envelope(mut bytes: Bytes) -> Envelope {
    let limits = Limits {
        max_payload: Limits::MAX_PAYLOAD_CAP,
        ..Limits::default()
    };
    Envelope::parse(&mut bytes, &limits).expect("a well-formed message")
}

/// One uncompressed batch frame (length prefix included) holding `envs`,
/// all on `lane`.
pub fn batch_frame(lane: Lane, envs: &[Envelope]) -> Bytes {
    let mut enc = BatchEncoder::new(1, usize::MAX).expect("batch encoder");
    for e in envs {
        enc.push_envelope(e);
    }
    let mut out = BytesMut::new();
    enc.finish(lane, &mut out);
    out.freeze()
}

/// `len` bytes that zstd cannot shrink (a xorshift stream from `seed`).
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 32) as u8
        })
        .collect()
}

/// A client endpoint on loopback and a QUIC connection to `addr` that
/// presents `key` and accepts the server only if it proves `server_key`,
/// offering `alpn`. Errors are the handshake's.
pub async fn dial(
    addr: SocketAddr,
    server_key: PublicKey,
    key: &Keypair,
    tuning: &TransportTuning,
    alpn: &[u8],
) -> (Endpoint, Result<Connection, ConnectionError>) {
    let cfg = quic::client_config_with_alpn(key.signing_key(), server_key.0, tuning, alpn)
        .expect("client config");
    let endpoint = quic::client_endpoint("127.0.0.1:0".parse().unwrap()).expect("client endpoint");
    let connecting = endpoint
        .connect_with(cfg, addr, tls::SERVER_NAME)
        .expect("connect_with accepts the address");
    let conn = tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting)
        .await
        .unwrap_or_else(|_| panic!("QUIC handshake with {addr} took over {HANDSHAKE_TIMEOUT:?}"));
    (endpoint, conn)
}

/// A link over `transport` to `relay`, presenting `key` and pinning the
/// relay's key, before Hello: the QUIC endpoint (if QUIC) and the link.
/// A TCP relay address is [`RelayProcess::tcp`]; panics if it has none.
pub async fn dial_link(
    relay: &RelayProcess,
    transport: Transport,
    key: &Keypair,
    opts: &RawOptions,
) -> Result<(Option<Endpoint>, Link), LinkError> {
    match transport {
        Transport::Quic => {
            let (ep, conn) = dial(relay.quic, relay.key, key, &opts.tuning, tls::ALPN).await;
            Ok((Some(ep), Link::quic(conn?, Limits::default())))
        }
        Transport::Tcp => {
            let addr = relay.tcp.expect("the relay listens on TCP");
            let cfg = tls::tls_client_config(key.signing_key(), relay.key.0, tls::ALPN)
                .expect("TLS client config");
            let conn = tcp::connect(addr, std::sync::Arc::new(cfg), &opts.tcp)
                .await
                .unwrap_or_else(|e| panic!("TCP/TLS handshake with {addr}: {e}"));
            Ok((
                None,
                Link::Tcp(TcpLink::new(conn, Limits::default(), &opts.tcp)),
            ))
        }
    }
}

/// How a [`RawLink`] connects.
#[derive(Clone, Debug)]
pub struct RawOptions {
    /// Ask for notices in Hello.
    pub notices: bool,
    /// Accept and read the relay's data streams from the start. Off: a
    /// cell that does not read (the relay's streams fill their windows and
    /// stall) until [`RawLink::start_reading`], if ever.
    pub read_data: bool,
    /// The transport to link over.
    pub transport: Transport,
    /// QUIC windows (small windows make a non-reading cell stall sooner).
    pub tuning: TransportTuning,
    /// TCP buffers (a small channel window makes a non-reading cell stall
    /// sooner).
    pub tcp: TcpTuning,
    /// Wait after Welcome until the relay has attached the link (see
    /// [`RawLink::wait_attached`]); off: return as soon as Welcome came,
    /// as `Cell::connect` does.
    pub wait_attached: bool,
}

impl RawOptions {
    /// A cell that does not read (until [`RawLink::start_reading`]), with
    /// receive windows of 16 KiB a stream and 32 KiB in all (QUIC; over
    /// TCP 16 KiB a channel, and the kernel's socket buffers): the relay
    /// can send it only so far ahead, and the rest waits in its queues.
    pub fn not_reading() -> Self {
        Self {
            read_data: false,
            tuning: TransportTuning {
                stream_window: 16 * 1024,
                conn_window: 32 * 1024,
                ..TransportTuning::default()
            },
            tcp: TcpTuning {
                channel_window: 16 * 1024,
                ..TcpTuning::default()
            },
            ..Self::default()
        }
    }

    /// These options over `transport`.
    pub fn over(self, transport: Transport) -> Self {
        Self { transport, ..self }
    }
}

impl Default for RawOptions {
    fn default() -> Self {
        Self {
            notices: true,
            read_data: true,
            transport: Transport::Quic,
            tuning: TransportTuning::default(),
            tcp: TcpTuning::default(),
            wait_attached: true,
        }
    }
}

/// What a raw link saw from the relay.
#[derive(Debug)]
enum RawEvent {
    /// A frame on the control channel.
    Control(Frame),
    /// A message from a lane (every message of every batch, in the order
    /// this link read them).
    Message(Arrival),
}

/// A message a raw link read, and how it travelled.
#[derive(Clone, Debug)]
pub struct Arrival {
    /// The message, with its TTL as decoded (its TTL byte minus `hops`).
    pub env: Envelope,
    /// The hop count of the batch it came in: 0 for a batch the relay
    /// built, more for one it forwarded whole.
    pub hops: u8,
}

/// A hand-made cell link: handshake done, every byte sent is the test's.
pub struct RawLink {
    /// The cell's key (what the relay proved).
    pub key: Keypair,
    /// The link.
    pub link: Link,
    /// The control channel's sending half.
    pub control: ControlSender,
    /// What the relay said in Welcome.
    pub welcome: Welcome,
    /// The QUIC endpoint, on QUIC.
    endpoint: Option<Endpoint>,
    events: mpsc::UnboundedReceiver<RawEvent>,
    controls: VecDeque<Frame>,
    messages: VecDeque<Arrival>,
    lanes: LaneSender,
    tasks: Vec<JoinHandle<()>>,
    /// Feeds the data readers' events; `None` once they run.
    unread: Option<mpsc::UnboundedSender<RawEvent>>,
}

impl RawLink {
    /// Connects to `relay` as `key`, completes Hello/Welcome and waits
    /// until the relay has attached the link.
    pub async fn connect(relay: &RelayProcess, key: Keypair) -> Result<RawLink, LinkError> {
        Self::connect_with(relay, key, RawOptions::default()).await
    }

    /// A cell that never reads: it never accepts the relay's lanes, and
    /// its small windows make the relay's lane to it stall after a few
    /// KiB, so its lane queue fills and stays full.
    pub async fn connect_never_reading(relay: &RelayProcess) -> Result<RawLink, LinkError> {
        Self::connect_with(relay, Keypair::generate(), RawOptions::not_reading()).await
    }

    /// Like [`connect`](Self::connect) over `transport`.
    pub async fn connect_over(
        relay: &RelayProcess,
        key: Keypair,
        transport: Transport,
    ) -> Result<RawLink, LinkError> {
        Self::connect_with(relay, key, RawOptions::default().over(transport)).await
    }

    /// Like [`connect`](Self::connect) with options.
    pub async fn connect_with(
        relay: &RelayProcess,
        key: Keypair,
        opts: RawOptions,
    ) -> Result<RawLink, LinkError> {
        let (endpoint, link) = dial_link(relay, opts.transport, &key, &opts).await?;
        let (control, reader, welcome) = relay_link::hello(
            &link,
            Role::Cell,
            opts.notices,
            "relay-tests/raw",
            HANDSHAKE_TIMEOUT,
        )
        .await?;
        let (tx, events) = mpsc::unbounded_channel();
        let tasks = vec![tokio::spawn(read_control(reader, tx.clone()))];
        let mut raw = RawLink {
            key,
            lanes: link.lane_sender(),
            link,
            control,
            welcome,
            endpoint,
            events,
            controls: VecDeque::new(),
            messages: VecDeque::new(),
            tasks,
            unread: Some(tx),
        };
        if opts.read_data {
            raw.start_reading();
        }
        if opts.wait_attached {
            raw.wait_attached().await;
        }
        Ok(raw)
    }

    /// Starts accepting and reading the relay's lanes, for a link
    /// connected with [`RawOptions::read_data`] off: what the relay queued
    /// meanwhile arrives from now on. Does nothing if reading already.
    pub fn start_reading(&mut self) {
        if let Some(tx) = self.unread.take() {
            self.tasks
                .push(tokio::spawn(read_data(self.link.clone(), tx)));
        }
    }

    /// Waits until the relay has attached this link to its router: it
    /// serves a link's control channel only after attaching it, so a
    /// Discover answered proves it (see [`crate::cells::connect`]).
    pub async fn wait_attached(&mut self) {
        let request = u32::MAX;
        self.send_control(&Frame::Discover {
            request,
            service: relay_codec::ServiceName::new("relay-tests-probe").unwrap(),
        })
        .await
        .expect("send Discover");
        let deadline = tokio::time::Instant::now() + HANDSHAKE_TIMEOUT;
        loop {
            // Take the reply out of the control frames, keeping the others.
            if let Some(i) = self
                .controls
                .iter()
                .position(|f| matches!(f, Frame::DiscoverReply { request: r, .. } if *r == request))
            {
                self.controls.remove(i);
                return;
            }
            assert!(
                self.pull(deadline).await,
                "no DiscoverReply within {HANDSHAKE_TIMEOUT:?}"
            );
        }
    }

    /// This link's key.
    pub fn public(&self) -> PublicKey {
        self.key.public()
    }

    /// Writes `bytes` as they are on this link's lane `lane` (QUIC: its
    /// data stream, opened on first use; TCP: its channel, in chunks).
    pub async fn send_raw(&mut self, lane: Lane, bytes: &[u8]) -> Result<(), LinkError> {
        self.lanes.send(lane, Bytes::copy_from_slice(bytes)).await
    }

    /// Sends `envs` (all on `lane`) as one uncompressed batch frame.
    pub async fn send_batch(&mut self, lane: Lane, envs: &[Envelope]) -> Result<(), LinkError> {
        let frame = batch_frame(lane, envs);
        self.lanes.send(lane, frame).await
    }

    /// Ends every lane this link sent on (the relay can read each to its
    /// end), waiting (bounded) until what was sent has left.
    pub async fn finish_lanes(&mut self) {
        self.lanes
            .finish(tokio::time::Instant::now() + HANDSHAKE_TIMEOUT)
            .await;
    }

    /// Writes one control frame.
    pub async fn send_control(&mut self, frame: &Frame) -> Result<(), LinkError> {
        self.control.send(frame).await
    }

    async fn pull(&mut self, deadline: tokio::time::Instant) -> bool {
        match tokio::time::timeout_at(deadline, self.events.recv()).await {
            Ok(Some(RawEvent::Control(f))) => {
                self.controls.push_back(f);
                true
            }
            Ok(Some(RawEvent::Message(e))) => {
                self.messages.push_back(e);
                true
            }
            Ok(None) | Err(_) => false,
        }
    }

    /// The next message read from the relay, or `None` if none came within
    /// `timeout` (control frames meanwhile are kept for
    /// [`next_control`](Self::next_control)).
    pub async fn next_message(&mut self, timeout: Duration) -> Option<Envelope> {
        self.next_arrival(timeout).await.map(|a| a.env)
    }

    /// Like [`next_message`](Self::next_message), with the hop count of
    /// the batch the message came in.
    pub async fn next_arrival(&mut self, timeout: Duration) -> Option<Arrival> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(m) = self.messages.pop_front() {
                return Some(m);
            }
            if !self.pull(deadline).await {
                return None;
            }
        }
    }

    /// The next control frame from the relay, or `None` if none came within
    /// `timeout` (messages meanwhile are kept for
    /// [`next_message`](Self::next_message)).
    pub async fn next_control(&mut self, timeout: Duration) -> Option<Frame> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(f) = self.controls.pop_front() {
                return Some(f);
            }
            if !self.pull(deadline).await {
                return None;
            }
        }
    }

    /// Waits (bounded) until the relay closes the connection and returns
    /// its close code and reason; panics if it does not, or if the
    /// connection ends another way.
    pub async fn closed(&self, timeout: Duration) -> (CloseCode, String) {
        let e = tokio::time::timeout(timeout, self.link.closed())
            .await
            .unwrap_or_else(|_| panic!("the relay did not close the link within {timeout:?}"));
        match e {
            LinkEnd::Closed { code, reason } => (code, reason),
            e => panic!("the link ended without the relay's close: {e}"),
        }
    }

    /// The orderly close of docs/PROTOCOL.md 6.2, as a cell does it:
    /// finishes the lanes, sends Close, reads control frames until the
    /// relay's Close (which it sends once it has read every lane and sent
    /// its last notices), then closes the connection.
    /// Returns the control frames that came before the relay's Close, and
    /// that Close's code; panics if it does not come within `timeout`.
    pub async fn close_orderly(&mut self, timeout: Duration) -> (Vec<Frame>, CloseCode) {
        self.finish_lanes().await;
        self.send_control(&Frame::Close {
            code: CloseCode::Normal,
            reason: "done".into(),
        })
        .await
        .expect("send Close");
        let mut before = Vec::new();
        loop {
            match self.next_control(timeout).await {
                Some(Frame::Close { code, .. }) => {
                    self.abort();
                    return (before, code);
                }
                Some(f) => before.push(f),
                None => panic!("no Close from the relay within {timeout:?}; before it: {before:?}"),
            }
        }
    }

    /// Closes the link at once (no Close frame, no flush): what a killed
    /// process looks like to the relay.
    pub fn abort(&self) {
        self.link.close(CloseCode::Normal, "aborted");
    }
}

impl Drop for RawLink {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        self.link.close(CloseCode::Normal, "test done");
        if let Some(ep) = &self.endpoint {
            ep.close(
                quinn::VarInt::from_u32(CloseCode::Normal as u32),
                b"test done",
            );
        }
    }
}

async fn read_control(mut reader: FrameReceiver, tx: mpsc::UnboundedSender<RawEvent>) {
    while let Ok(Some(f)) = reader.next().await {
        if tx.send(RawEvent::Control(f)).is_err() {
            return;
        }
    }
}

async fn read_data(link: Link, tx: mpsc::UnboundedSender<RawEvent>) {
    let mut readers = tokio::task::JoinSet::new();
    while let Ok(recv) = link.accept_lane().await {
        let tx = tx.clone();
        readers.spawn(async move {
            let mut reader = BatchReader::new(recv, Limits::default()).expect("batch reader");
            let mut envs = Vec::new();
            while let Ok(Some(b)) = reader.next(&mut envs).await {
                for env in envs.drain(..) {
                    let arrival = Arrival { env, hops: b.hops };
                    if tx.send(RawEvent::Message(arrival)).is_err() {
                        return;
                    }
                }
            }
        });
    }
    // Readers end with the link; JoinSet aborts any left on drop.
    while readers.join_next().await.is_some() {}
}

/// A TLS-over-TCP handshake with `relay`, presenting `key`, pinning
/// `server_key` and offering `alpn`: the error text if the connecting side
/// saw it refused, `None` if the relay took it. In TLS 1.3 a client
/// finishes its side before the server has checked the client, so a
/// handshake that seems done is judged by its first read: the relay's
/// alert (or a close) is a refusal, and a live link sends nothing before
/// Hello, so the read waits (bounded) until the relay's own Hello timeout.
pub async fn tcp_handshake_error(
    relay: &RelayProcess,
    server_key: PublicKey,
    key: &Keypair,
    alpn: &[u8],
) -> Option<String> {
    let cfg =
        tls::tls_client_config(key.signing_key(), server_key.0, alpn).expect("TLS client config");
    tcp_handshake_error_with(relay, cfg).await
}

/// Like [`tcp_handshake_error`] with a TLS client config of the test's.
pub async fn tcp_handshake_error_with(
    relay: &RelayProcess,
    cfg: rustls::ClientConfig,
) -> Option<String> {
    use tokio::io::AsyncReadExt as _;
    let addr = relay.tcp.expect("the relay listens on TCP");
    let mut conn = match tcp::connect(addr, std::sync::Arc::new(cfg), &TcpTuning::default()).await {
        Ok(c) => c,
        Err(e) => return Some(e.to_string()),
    };
    let mut byte = [0u8; 1];
    match tokio::time::timeout(crate::cells::WAIT, conn.stream.read(&mut byte)).await {
        Err(_) => None,
        Ok(Ok(0)) => Some("the relay closed the connection after the TLS handshake".into()),
        Ok(Ok(_)) => None,
        Ok(Err(e)) => Some(format!("refused after the TLS handshake: {e}")),
    }
}

/// A TLS-over-TCP link whose bytes after the TLS handshake are all the
/// test's: chunks (docs/PROTOCOL.md 6.3.2) written by hand, so a test can
/// send what [`TcpLink`] never would (an unknown channel, data after a
/// channel's end, a length prefix cut across chunks, a stream that ends
/// inside a chunk). What the relay sends back is read with the codec's own
/// [`Demux`](relay_codec::mux::Demux) and frame decoder.
pub struct RawTcp {
    /// The cell's key.
    pub key: Keypair,
    /// What the relay said in Welcome.
    pub welcome: Frame,
    stream: tcp::TlsStream,
    demux: relay_codec::mux::Demux,
    /// Read from the stream, not yet fed to `demux`.
    unread: BytesMut,
    /// The last Close frame the relay sent on channel 0.
    close: Option<(CloseCode, String)>,
}

impl RawTcp {
    /// A TLS handshake with `relay` as `key`, then Hello on channel 0 in
    /// one chunk, then the relay's frames read until Welcome; panics on
    /// anything else.
    pub async fn connect(relay: &RelayProcess, key: Keypair) -> RawTcp {
        let addr = relay.tcp.expect("the relay listens on TCP");
        let cfg = tls::tls_client_config(key.signing_key(), relay.key.0, tls::ALPN)
            .expect("TLS client config");
        let conn = tcp::connect(addr, std::sync::Arc::new(cfg), &TcpTuning::default())
            .await
            .unwrap_or_else(|e| panic!("TCP/TLS handshake with {addr}: {e}"));
        let mut raw = RawTcp {
            key,
            welcome: Frame::Close {
                code: CloseCode::Normal,
                reason: String::new(),
            },
            stream: conn.stream,
            demux: relay_codec::mux::Demux::new(&Limits::default()),
            unread: BytesMut::new(),
            close: None,
        };
        let hello = Frame::Hello {
            version: relay_codec::frame::PROTOCOL_VERSION,
            role: Role::Cell,
            notices: true,
            agent: "relay-tests/raw-tcp".into(),
        }
        .to_bytes();
        raw.chunk(0, &hello).await;
        let deadline = tokio::time::Instant::now() + HANDSHAKE_TIMEOUT;
        match raw.next_frame(deadline).await {
            Some((0, f @ Frame::Welcome { .. })) => raw.welcome = f,
            other => panic!("expected Welcome on channel 0, got {other:?}"),
        }
        raw
    }

    /// Writes `bytes` on the TLS stream as they are.
    pub async fn write(&mut self, bytes: &[u8]) {
        use tokio::io::AsyncWriteExt as _;
        self.stream
            .write_all(bytes)
            .await
            .expect("write to the relay");
        self.stream.flush().await.expect("flush to the relay");
    }

    /// Writes one chunk: `channel` (any byte, valid or not) and `payload`
    /// (at most 65 535 bytes; empty ends the channel).
    pub async fn chunk(&mut self, channel: u8, payload: &[u8]) {
        let len = u16::try_from(payload.len()).expect("a chunk holds at most 65535 bytes");
        let mut out = Vec::with_capacity(3 + payload.len());
        out.push(channel);
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(payload);
        self.write(&out).await;
    }

    /// Ends this side's TLS stream (close_notify, then FIN), whatever
    /// state its chunks are in.
    pub async fn shutdown(&mut self) {
        use tokio::io::AsyncWriteExt as _;
        let _ = self.stream.shutdown().await;
    }

    /// The next frame the relay sent, with the id of its channel; `None`
    /// at the end of the stream or the deadline. Remembers Close.
    async fn next_frame(&mut self, deadline: tokio::time::Instant) -> Option<(u8, Frame)> {
        use relay_codec::mux::Event;
        use tokio::io::AsyncReadExt as _;
        loop {
            let mut input = &self.unread[..];
            let event = self
                .demux
                .feed(&mut input)
                .unwrap_or_else(|e| panic!("the relay sent a malformed chunk stream: {e}"));
            let used = self.unread.len() - input.len();
            let _ = self.unread.split_to(used);
            match event {
                Some(Event::Frame { channel, frame }) => {
                    let f = Frame::decode(frame, &Limits::default())
                        .unwrap_or_else(|e| panic!("the relay sent a malformed frame: {e}"));
                    if let Frame::Close { code, reason } = &f {
                        self.close = Some((*code, reason.clone()));
                    }
                    return Some((channel.id(), f));
                }
                Some(Event::End(_)) => continue,
                None => {}
            }
            let mut buf = [0u8; 16 * 1024];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
                Ok(Ok(n)) => self.unread.extend_from_slice(&buf[..n]),
            }
        }
    }

    /// Reads (bounded) until `relay` ends the connection, and returns the
    /// code and reason of the last Close it sent on channel 0; panics (with
    /// the relay's log) if it sent none or does not close within `timeout`.
    pub async fn closed(&mut self, relay: &RelayProcess, timeout: Duration) -> (CloseCode, String) {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.next_frame(deadline).await.is_some() {}
        assert!(
            tokio::time::Instant::now() < deadline,
            "the relay did not close the connection within {timeout:?}; relay log:\n{}",
            relay.log()
        );
        self.close.clone().unwrap_or_else(|| {
            panic!(
                "the relay ended the connection without a Close frame; relay log:\n{}",
                relay.log()
            )
        })
    }
}

/// A TLS client config that presents an X.509 certificate chain (a leaf
/// and the CA that signed it, ed25519 both, as an ordinary TLS client
/// would) instead of a raw public key, offering ALPN `celluler/1` and
/// accepting whatever raw key the server proves: what a relay must refuse.
pub fn x509_client_config() -> rustls::ClientConfig {
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("CA key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("CA certificate");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("leaf key");
    let leaf = rcgen::CertificateParams::new(vec!["relay-tests-client".to_owned()])
        .expect("leaf params")
        .signed_by(&leaf_key, &issuer)
        .expect("leaf certificate");
    let chain: Vec<CertificateDer<'static>> = vec![leaf.der().clone(), ca.der().clone()];
    let key = PrivateKeyDer::try_from(leaf_key.serialize_der()).expect("leaf key DER");
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(AnyRawKey))
        .with_client_auth_cert(chain, key)
        .expect("client certificate");
    cfg.alpn_protocols = vec![tls::ALPN.to_vec()];
    cfg
}

/// Accepts any raw public key a server presents, unchecked: for test
/// clients whose point is what they send, not whom they reach.
#[derive(Debug)]
struct AnyRawKey;

impl rustls::client::danger::ServerCertVerifier for AnyRawKey {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls_pki_types::CertificateDer<'_>,
        _intermediates: &[rustls_pki_types::CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &rustls_pki_types::CertificateDer<'_>,
        _dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not offered".into()))
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &rustls_pki_types::CertificateDer<'_>,
        _dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        vec![rustls::SignatureScheme::ED25519]
    }

    fn requires_raw_public_keys(&self) -> bool {
        true
    }
}
