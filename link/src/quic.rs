//! QUIC: the first transport of a Celluler link (UDP; quinn).
//!
//! The TLS identity is [`crate::tls`]'s (raw ed25519 keys, ALPN
//! `celluler/1`). What this module adds: the quinn configs with the link's
//! flow-control and liveness settings ([`TransportTuning`]), endpoints with
//! large UDP buffers and a count of datagrams that cannot be QUIC, and
//! [`QuicLink`], a connection as the [`crate::Link`] interface sees it:
//!
//! - the control channel is the first bidirectional stream, opened by the
//!   connecting side, at the highest QUIC priority;
//! - each lane is one unidirectional stream per direction, opened on first
//!   use, with a QUIC priority by lane (control highest), so QUIC itself
//!   interleaves the lanes and lets a control frame pass bulk data;
//! - close is QUIC's `CONNECTION_CLOSE` with the application code and
//!   reason.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::error::TransportError;
use crate::error::{LinkEnd, LinkError};
use crate::lanes::LANES;
use crate::tls::{ALPN, key_from_certs, tls_client_config, tls_server_config};
use bytes::{Bytes, BytesMut};
use ed25519_dalek::SigningKey;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, TransportConfig, VarInt};
use relay_codec::frame::{CloseCode, LEN_PREFIX};
use relay_codec::{DecodeError, Frame, Lane, Limits};
use rustls_pki_types::CertificateDer;

/// Requested size of each UDP socket's send and receive buffers (the kernel
/// may cap it, e.g. at `net.core.rmem_max`).
const UDP_BUFFER_BYTES: usize = 4 * 1024 * 1024;

/// QUIC flow-control and liveness settings for a link, applied to both
/// server and client configs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransportTuning {
    /// Per-stream receive window in bytes (should cover the bandwidth-delay
    /// product of one lane).
    pub stream_window: u64,
    /// Whole-connection receive and send window in bytes.
    pub conn_window: u64,
    /// Interval of keep-alive pings, so idle links stay open and a dead peer
    /// is noticed (zero: no keep-alives).
    pub keep_alive: Duration,
    /// A connection with no traffic for this long is closed (zero: never;
    /// the peer's own timeout still applies).
    pub idle_timeout: Duration,
    /// How many unidirectional streams the peer may have open at once.
    pub max_uni_streams: u32,
    /// How many bidirectional streams the peer may have open at once.
    pub max_bi_streams: u32,
}

impl Default for TransportTuning {
    /// 8 MiB stream window, 16 MiB connection window, 5 s keep-alive, 30 s
    /// idle timeout, 8 unidirectional and 4 bidirectional streams.
    fn default() -> Self {
        Self {
            stream_window: 8 * 1024 * 1024,
            conn_window: 16 * 1024 * 1024,
            keep_alive: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
            max_uni_streams: 8,
            max_bi_streams: 4,
        }
    }
}

/// quinn server config for a relay: mutual TLS 1.3 with raw ed25519 keys.
///
/// The server proves `key`; every client must prove an ed25519 key of its own
/// (any key is accepted; see [`peer_key`]) and offer exactly [`ALPN`].
pub fn server_config(
    key: &SigningKey,
    tuning: &TransportTuning,
) -> Result<quinn::ServerConfig, TransportError> {
    server_config_from(Arc::new(tls_server_config(key)?), tuning)
}

/// quinn server config over a TLS config from [`tls_server_config`], so
/// one TLS config serves both QUIC and TLS over TCP.
pub fn server_config_from(
    tls: Arc<rustls::ServerConfig>,
    tuning: &TransportTuning,
) -> Result<quinn::ServerConfig, TransportError> {
    let crypto = QuicServerConfig::try_from(tls)?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(Arc::new(transport_config(tuning)?));
    Ok(cfg)
}

/// quinn client config: presents `key` and accepts the server only if it
/// proves the ed25519 key `expected_server`. Offers [`ALPN`].
pub fn client_config(
    key: &SigningKey,
    expected_server: [u8; 32],
    tuning: &TransportTuning,
) -> Result<quinn::ClientConfig, TransportError> {
    client_config_with_alpn(key, expected_server, tuning, ALPN)
}

/// Like [`client_config`] but offering `alpn` instead of [`ALPN`]; for tests
/// that check a wrong protocol is refused.
pub fn client_config_with_alpn(
    key: &SigningKey,
    expected_server: [u8; 32],
    tuning: &TransportTuning,
    alpn: &[u8],
) -> Result<quinn::ClientConfig, TransportError> {
    let tls = tls_client_config(key, expected_server, alpn)?;
    let crypto = QuicClientConfig::try_from(tls)?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(Arc::new(transport_config(tuning)?));
    Ok(cfg)
}

/// The ed25519 public key the other side of `conn` proved during the
/// handshake; `None` if the handshake is not complete or it presented none.
pub fn peer_key(conn: &quinn::Connection) -> Option<[u8; 32]> {
    let identity = conn.peer_identity()?;
    let certs = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    key_from_certs(&certs)
}

/// A QUIC endpoint bound to `addr` that accepts connections with `cfg` (and
/// can also dial out). Call from within a tokio runtime.
pub fn server_endpoint(
    addr: SocketAddr,
    cfg: quinn::ServerConfig,
) -> Result<quinn::Endpoint, TransportError> {
    make_endpoint(addr, Some(cfg))
}

/// Like [`server_endpoint`], but counts in `not_quic` every received
/// datagram that cannot be a QUIC packet (empty, fixed bit clear, or a long
/// header of an unknown version too short to negotiate). quinn drops such
/// datagrams silently; the count lets an operator see garbage arriving.
///
/// Its stateless-reset key is derived from `identity` (the node's secret
/// key), so the same node restarted on the same address answers packets
/// of its former connections with a stateless reset (RFC 9000 §10.3) that
/// their peers accept: a cell learns at its next packet (at the latest its
/// keep-alive) that the relay restarted, instead of waiting out the idle
/// timeout.
pub fn server_endpoint_counting(
    addr: SocketAddr,
    cfg: quinn::ServerConfig,
    not_quic: Arc<std::sync::atomic::AtomicU64>,
    identity: &[u8; 32],
) -> Result<quinn::Endpoint, TransportError> {
    use quinn::Runtime;
    let socket =
        std::net::UdpSocket::bind(addr).map_err(|error| TransportError::Bind { addr, error })?;
    enlarge_buffers(&socket);
    let inner = quinn::TokioRuntime
        .wrap_udp_socket(socket)
        .map_err(|error| TransportError::Endpoint { addr, error })?;
    let mut endpoint = endpoint_config();
    let (reset, cid_key) = restart_keys(identity);
    endpoint.reset_key(reset).cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    quinn::Endpoint::new_with_abstract_socket(
        endpoint,
        Some(cfg),
        Arc::new(CountingSocket { inner, not_quic }),
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|error| TransportError::Endpoint { addr, error })
}

/// Endpoint settings shared by cells and relays: no fixed-bit greasing, so
/// every QUIC packet on a relay's port has the fixed bit set and the relay
/// can tell garbage from QUIC (see [`plausible_quic`]).
fn endpoint_config() -> quinn::EndpointConfig {
    let mut cfg = quinn::EndpointConfig::default();
    cfg.grease_quic_bit(false);
    cfg
}

/// What a node needs to answer its former connections after a restart,
/// from its secret key `identity`: the HMAC key of stateless-reset tokens,
/// and the key of the connection-id generator (quinn answers only packets
/// whose connection id it could have issued, so a new process must issue
/// them the same way). Both are HMAC-SHA256 keyed by the secret over fixed
/// labels: the same across restarts, different per node, and revealing
/// nothing of the secret.
fn restart_keys(identity: &[u8; 32]) -> (Arc<dyn quinn::crypto::HmacKey>, u64) {
    use ring::hmac;
    let derive = hmac::Key::new(hmac::HMAC_SHA256, identity);
    let reset = hmac::sign(&derive, b"celluler/1 QUIC stateless reset key");
    let cid = hmac::sign(&derive, b"celluler/1 QUIC connection id key");
    let mut cid_key = [0; 8];
    cid_key.copy_from_slice(&cid.as_ref()[..8]);
    (
        Arc::new(hmac::Key::new(hmac::HMAC_SHA256, reset.as_ref())),
        u64::from_le_bytes(cid_key),
    )
}

/// A UDP socket that counts datagrams which cannot be QUIC, passing
/// everything through unchanged.
#[derive(Debug)]
struct CountingSocket {
    inner: Arc<dyn quinn::AsyncUdpSocket>,
    not_quic: Arc<std::sync::atomic::AtomicU64>,
}

/// Whether `p` could be a QUIC packet (RFC 9000 §17: the fixed bit is set in
/// every packet of versions 1 and 2; a long header carries a 4-byte version).
pub fn plausible_quic(p: &[u8]) -> bool {
    match p.first() {
        None => false,
        Some(b) if b & 0x40 == 0 => false,
        Some(b) if b & 0x80 != 0 => p.len() >= 7,
        Some(_) => true,
    }
}

impl quinn::AsyncUdpSocket for CountingSocket {
    fn create_io_poller(self: Arc<Self>) -> std::pin::Pin<Box<dyn quinn::UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &quinn::udp::Transmit) -> std::io::Result<()> {
        self.inner.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut std::task::Context,
        bufs: &mut [std::io::IoSliceMut<'_>],
        meta: &mut [quinn::udp::RecvMeta],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = self.inner.poll_recv(cx, bufs, meta);
        if let std::task::Poll::Ready(Ok(n)) = &r {
            let mut bad = 0;
            for (buf, m) in bufs.iter().zip(meta.iter()).take(*n) {
                let stride = m.stride.max(1);
                bad += buf[..m.len]
                    .chunks(stride)
                    .filter(|d| !plausible_quic(d))
                    .count() as u64;
            }
            if bad > 0 {
                self.not_quic
                    .fetch_add(bad, std::sync::atomic::Ordering::Relaxed);
            }
        }
        r
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

/// A QUIC endpoint bound to `bind` (e.g. `0.0.0.0:0`) for dialling out with
/// `connect_with`, a [`client_config`] and [`SERVER_NAME`]. Call from within
/// a tokio runtime.
pub fn client_endpoint(bind: SocketAddr) -> Result<quinn::Endpoint, TransportError> {
    make_endpoint(bind, None)
}

fn make_endpoint(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
) -> Result<quinn::Endpoint, TransportError> {
    let socket =
        std::net::UdpSocket::bind(addr).map_err(|error| TransportError::Bind { addr, error })?;
    enlarge_buffers(&socket);
    quinn::Endpoint::new(
        endpoint_config(),
        server,
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|error| TransportError::Endpoint { addr, error })
}

/// Best effort: ask for large UDP buffers so bursts are not dropped by the
/// kernel; failure only costs throughput, so it is logged, not returned.
fn enlarge_buffers(socket: &std::net::UdpSocket) {
    let state = match quinn::udp::UdpSocketState::new(socket.into()) {
        Ok(state) => state,
        Err(e) => {
            tracing::debug!(%e, "cannot inspect UDP socket; keeping default buffers");
            return;
        }
    };
    if let Err(e) = state.set_send_buffer_size(socket.into(), UDP_BUFFER_BYTES) {
        tracing::debug!(%e, "cannot enlarge UDP send buffer");
    }
    if let Err(e) = state.set_recv_buffer_size(socket.into(), UDP_BUFFER_BYTES) {
        tracing::debug!(%e, "cannot enlarge UDP receive buffer");
    }
    tracing::debug!(
        send = ?state.send_buffer_size(socket.into()).ok(),
        recv = ?state.recv_buffer_size(socket.into()).ok(),
        "UDP socket buffers"
    );
}

fn transport_config(tuning: &TransportTuning) -> Result<TransportConfig, TransportError> {
    let stream_window = VarInt::from_u64(tuning.stream_window)
        .map_err(|_| TransportError::Tuning("stream_window exceeds 2^62 - 1"))?;
    let conn_window = VarInt::from_u64(tuning.conn_window)
        .map_err(|_| TransportError::Tuning("conn_window exceeds 2^62 - 1"))?;
    let idle = IdleTimeout::try_from(tuning.idle_timeout)
        .map_err(|_| TransportError::Tuning("idle_timeout too large"))?;
    let mut t = TransportConfig::default();
    t.stream_receive_window(stream_window)
        .receive_window(conn_window)
        .send_window(tuning.conn_window)
        .keep_alive_interval((!tuning.keep_alive.is_zero()).then_some(tuning.keep_alive))
        .max_idle_timeout(Some(idle))
        .max_concurrent_uni_streams(VarInt::from_u32(tuning.max_uni_streams))
        .max_concurrent_bidi_streams(VarInt::from_u32(tuning.max_bi_streams));
    Ok(t)
}

/// QUIC priority of the control stream: above every lane stream.
const CONTROL_PRIORITY: i32 = LANES as i32 + 1;

/// Bytes asked of quinn per stream read.
const READ_CHUNK: usize = 256 * 1024;

/// A QUIC connection as a link, with the bounds its readers enforce.
/// Cheap to clone (a handle).
#[derive(Clone, Debug)]
pub struct QuicLink {
    conn: quinn::Connection,
    limits: Limits,
}

impl QuicLink {
    /// The link over `conn`, reading frames within `limits`.
    pub fn new(conn: quinn::Connection, limits: Limits) -> Self {
        Self { conn, limits }
    }

    /// The QUIC connection.
    pub fn connection(&self) -> &quinn::Connection {
        &self.conn
    }

    /// The key the peer proved in the TLS handshake.
    pub fn peer_key(&self) -> Option<[u8; 32]> {
        peer_key(&self.conn)
    }

    /// The control channel's halves from a newly opened or accepted
    /// bidirectional stream, at the highest priority.
    fn control(
        &self,
        bi: Result<(quinn::SendStream, quinn::RecvStream), quinn::ConnectionError>,
    ) -> Result<(quinn::SendStream, QuicReader), LinkError> {
        let (send, recv) = bi?;
        let _ = send.set_priority(CONTROL_PRIORITY);
        Ok((send, QuicReader::new(recv, self.limits)))
    }

    /// The connecting side's control channel: the first bidirectional stream.
    pub(crate) async fn open_control(&self) -> Result<(quinn::SendStream, QuicReader), LinkError> {
        self.control(self.conn.open_bi().await)
    }

    /// The accepting side's control channel, once the peer has sent on it.
    pub(crate) async fn accept_control(
        &self,
    ) -> Result<(quinn::SendStream, QuicReader), LinkError> {
        self.control(self.conn.accept_bi().await)
    }

    /// This side's lane streams, none opened yet.
    pub(crate) fn lanes(&self) -> QuicLanes {
        QuicLanes {
            conn: self.conn.clone(),
            streams: Default::default(),
        }
    }

    /// The next lane stream the peer opens.
    pub(crate) async fn accept_lane(&self) -> Result<QuicReader, LinkError> {
        let recv = self.conn.accept_uni().await?;
        Ok(QuicReader::new(recv, self.limits))
    }

    /// Closes the connection at once with `code` and `reason`.
    pub fn close(&self, code: CloseCode, reason: &str) {
        self.conn.close(app_code(code), reason.as_bytes());
    }

    /// Why the link ended, if it has.
    pub fn end(&self) -> Option<LinkEnd> {
        self.conn.close_reason().map(LinkEnd::from)
    }

    /// Waits until the link has ended and says why.
    pub async fn closed(&self) -> LinkEnd {
        self.conn.closed().await.into()
    }
}

/// A close code as a QUIC application error code.
pub(crate) fn app_code(code: CloseCode) -> VarInt {
    VarInt::from_u32(code as u32)
}

/// Reads whole frames from one QUIC stream, within the link's limits.
pub struct QuicReader {
    stream: quinn::RecvStream,
    /// The unread rest of the last chunk quinn returned, while `partial`
    /// is empty: frames wholly inside it are sliced out without a copy.
    chunk: Bytes,
    /// A frame that spans chunks, assembled by copying.
    partial: BytesMut,
    limits: Limits,
}

impl std::fmt::Debug for QuicReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuicReader")
            .field("stream", &self.stream.id())
            .finish_non_exhaustive()
    }
}

impl QuicReader {
    /// A reader over `stream`.
    pub fn new(stream: quinn::RecvStream, limits: Limits) -> Self {
        Self {
            stream,
            chunk: Bytes::new(),
            // Sized per frame that needs it; an idle link's control stream
            // holds no buffer.
            partial: BytesMut::new(),
            limits,
        }
    }

    /// The next frame; `Ok(None)` when the stream ended cleanly between frames.
    pub async fn next(&mut self) -> Result<Option<Frame>, LinkError> {
        loop {
            if let Some(f) = self.take()? {
                return Ok(Some(f));
            }
            match self.stream.read_chunk(READ_CHUNK, true).await? {
                Some(chunk) if self.partial.is_empty() => self.chunk = chunk.bytes,
                Some(chunk) => self.partial.extend_from_slice(&chunk.bytes),
                None if self.partial.is_empty() && self.chunk.is_empty() => return Ok(None),
                None => return Err(LinkError::Truncated),
            }
        }
    }

    /// The next whole frame from what has been read, if there is one.
    fn take(&mut self) -> Result<Option<Frame>, DecodeError> {
        if self.partial.is_empty() {
            if self.chunk.is_empty() {
                return Ok(None);
            }
            if let Some(n) = Frame::peek_len(&self.chunk, &self.limits)? {
                return Frame::decode(self.chunk.split_to(n), &self.limits).map(Some);
            }
            // The frame continues in later chunks. Room for all of it now,
            // when its length is known (and checked against the limit), so
            // that it is copied once rather than regrown.
            let whole = self.chunk.get(..LEN_PREFIX).map_or(0, |p| {
                LEN_PREFIX + u32::from_le_bytes([p[0], p[1], p[2], p[3]]) as usize
            });
            self.partial.reserve(whole.max(self.chunk.len()));
            self.partial.extend_from_slice(&self.chunk);
            self.chunk = Bytes::new();
            return Ok(None);
        }
        let f = Frame::take(&mut self.partial, &self.limits)?;
        if f.is_some() && !self.partial.is_empty() {
            // The chunk that completed the frame began the next one.
            if let Some(n) = Frame::peek_len(&self.partial, &self.limits)?
                && n > self.partial.len()
            {
                self.partial.reserve(n - self.partial.len());
            }
        }
        Ok(f)
    }

    /// Stops the stream, telling the peer to stop sending on it.
    pub fn stop(&mut self, code: CloseCode) {
        let _ = self.stream.stop(app_code(code));
    }
}

/// This side's lane streams of a QUIC link, each opened on first use with
/// the lane's QUIC priority.
#[derive(Debug)]
pub struct QuicLanes {
    conn: quinn::Connection,
    streams: [Option<quinn::SendStream>; LANES],
}

impl QuicLanes {
    /// The stream of `lane`, opened on first use with the lane's QUIC
    /// priority (control highest).
    async fn stream(&mut self, lane: Lane) -> Result<&mut quinn::SendStream, LinkError> {
        let i = lane.index();
        Ok(match &mut self.streams[i] {
            Some(s) => s,
            slot => {
                let s = self.conn.open_uni().await?;
                // Higher lanes get higher QUIC priority.
                let _ = s.set_priority((LANES - i) as i32);
                slot.insert(s)
            }
        })
    }

    /// Sends one whole frame on `lane`.
    pub(crate) async fn send(&mut self, lane: Lane, frame: Bytes) -> Result<(), LinkError> {
        Ok(self.stream(lane).await?.write_chunk(frame).await?)
    }

    /// Sends one frame given as two parts on `lane`.
    pub(crate) async fn send_parts(
        &mut self,
        lane: Lane,
        head: Bytes,
        body: Bytes,
    ) -> Result<(), LinkError> {
        Ok(self
            .stream(lane)
            .await?
            .write_all_chunks(&mut [head, body])
            .await?)
    }

    /// Why the connection ended, if it has.
    pub(crate) fn end(&self) -> Option<LinkEnd> {
        self.conn.close_reason().map(LinkEnd::from)
    }

    /// Waits until the connection has ended.
    pub(crate) async fn closed(&self) -> LinkEnd {
        self.conn.closed().await.into()
    }

    /// Ends every stream opened, then waits until `deadline` at most for
    /// the peer to acknowledge them.
    pub(crate) async fn finish(&mut self, deadline: tokio::time::Instant) {
        for s in self.streams.iter_mut().flatten() {
            let _ = s.finish();
        }
        for s in self.streams.iter_mut().flatten() {
            let _ = tokio::time::timeout_at(deadline, s.stopped()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::SERVER_NAME;
    use crate::tls::tests::{EmptyRawKeyIdentity, tls_client_config_with_identity};

    const WAIT: Duration = Duration::from_secs(10);

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn public(key: &SigningKey) -> [u8; 32] {
        key.verifying_key().to_bytes()
    }

    fn localhost() -> SocketAddr {
        "127.0.0.1:0".parse().unwrap()
    }

    fn start_server(key: &SigningKey) -> (quinn::Endpoint, SocketAddr) {
        let cfg = server_config(key, &TransportTuning::default()).unwrap();
        let ep = server_endpoint(localhost(), cfg).unwrap();
        let addr = ep.local_addr().unwrap();
        (ep, addr)
    }

    /// Dials `addr` with `cfg` and returns the client-side outcome.
    async fn dial(
        cfg: quinn::ClientConfig,
        addr: SocketAddr,
    ) -> (
        quinn::Endpoint,
        Result<quinn::Connection, quinn::ConnectionError>,
    ) {
        let ep = client_endpoint(localhost()).unwrap();
        let connecting = ep.connect_with(cfg, addr, SERVER_NAME).unwrap();
        let result = tokio::time::timeout(WAIT, connecting)
            .await
            .expect("client handshake timed out");
        (ep, result)
    }

    /// The server-side outcome of the next incoming connection.
    async fn accept_one(ep: &quinn::Endpoint) -> Result<quinn::Connection, quinn::ConnectionError> {
        tokio::time::timeout(WAIT, async {
            let incoming = ep.accept().await.expect("server endpoint closed");
            incoming.await
        })
        .await
        .expect("server handshake timed out")
    }

    /// Dials `server_ep` (at `addr`) with `cfg` while the server accepts, and
    /// asserts the connection is refused: the client ends up without a
    /// connection and the server never gets one. Returns both errors.
    async fn assert_refused(
        server_ep: &quinn::Endpoint,
        addr: SocketAddr,
        cfg: quinn::ClientConfig,
    ) -> (quinn::ConnectionError, quinn::ConnectionError) {
        // quinn only drives a server handshake once it is accepted, so both
        // sides run at once.
        let (server, (_client_ep, client)) = tokio::join!(accept_one(server_ep), dial(cfg, addr));
        // If the client thought it was connected, a round trip shows whether
        // the server really accepted it.
        let client_err = match client {
            Err(e) => e,
            Ok(conn) => {
                let probe = async {
                    let (mut send, mut recv) = conn.open_bi().await?;
                    send.write_all(b"probe").await?;
                    send.finish()?;
                    recv.read_to_end(16).await?;
                    anyhow::Ok(())
                };
                let _ = tokio::time::timeout(WAIT, probe).await;
                match conn.close_reason() {
                    Some(e) => e,
                    None => panic!("client connected and is still connected"),
                }
            }
        };
        let server_err = server.expect_err("server accepted a connection it should refuse");
        (client_err, server_err)
    }

    /// The TLS alert code of a handshake failure this side detected itself.
    fn local_alert(e: &quinn::ConnectionError) -> Option<quinn::TransportErrorCode> {
        match e {
            quinn::ConnectionError::TransportError(t) => Some(t.code),
            _ => None,
        }
    }

    #[tokio::test]
    async fn mutual_keys_and_bi_stream() {
        let server_key = key(1);
        let client_key = key(2);
        let (server_ep, addr) = start_server(&server_key);

        let server = tokio::spawn(async move {
            let conn = accept_one(&server_ep).await.expect("server handshake");
            let seen = peer_key(&conn);
            let (mut send, mut recv) = conn.accept_bi().await.unwrap();
            let msg = recv.read_to_end(1024).await.unwrap();
            send.write_all(b"pong:").await.unwrap();
            send.write_all(&msg).await.unwrap();
            send.finish().unwrap();
            // Keep the connection (and endpoint) alive until the reply is read.
            (seen, conn, server_ep)
        });

        let cfg = client_config(
            &client_key,
            public(&server_key),
            &TransportTuning::default(),
        )
        .unwrap();
        let (_client_ep, conn) = dial(cfg, addr).await;
        let conn = conn.expect("client handshake");
        assert_eq!(peer_key(&conn), Some(public(&server_key)));

        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(b"hello").await.unwrap();
        send.finish().unwrap();
        let reply = tokio::time::timeout(WAIT, recv.read_to_end(1024))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(reply, b"pong:hello");

        let (seen, _server_conn, _server_ep) = server.await.unwrap();
        assert_eq!(seen, Some(public(&client_key)));
        conn.close(0u32.into(), b"done");
    }

    #[tokio::test]
    async fn wrong_server_key_is_refused() {
        let server_key = key(3);
        let (server_ep, addr) = start_server(&server_key);
        let cfg = client_config(&key(4), public(&key(5)), &TransportTuning::default()).unwrap();
        let (client_err, _server_err) = assert_refused(&server_ep, addr, cfg).await;
        // The client itself rejected the server's key (access_denied, from
        // the pinned-key check).
        assert_eq!(
            local_alert(&client_err),
            Some(quinn::TransportErrorCode::crypto(49)),
            "unexpected client error: {client_err}"
        );
        assert!(
            client_err
                .to_string()
                .contains("ApplicationVerificationFailure"),
            "unexpected client error: {client_err}"
        );
    }

    #[tokio::test]
    async fn wrong_alpn_is_refused() {
        let server_key = key(6);
        let (server_ep, addr) = start_server(&server_key);
        let cfg = client_config_with_alpn(
            &key(7),
            public(&server_key),
            &TransportTuning::default(),
            b"celluler/0",
        )
        .unwrap();
        let (client_err, server_err) = assert_refused(&server_ep, addr, cfg).await;
        // The server refused it: no_application_protocol.
        assert_eq!(
            local_alert(&server_err),
            Some(quinn::TransportErrorCode::crypto(120)),
            "unexpected server error: {server_err} (client: {client_err})"
        );
    }

    /// A client config like [`client_config`] but with the given client
    /// identity (`None`: no client authentication at all).
    fn client_config_with_identity(
        expected_server: [u8; 32],
        identity: Option<Arc<dyn rustls::client::ResolvesClientCert>>,
    ) -> quinn::ClientConfig {
        let tls = tls_client_config_with_identity(expected_server, identity);
        let crypto = QuicClientConfig::try_from(tls).unwrap();
        quinn::ClientConfig::new(Arc::new(crypto))
    }

    #[tokio::test]
    async fn client_without_identity_is_refused() {
        let server_key = key(8);
        let (server_ep, addr) = start_server(&server_key);

        // No client authentication at all: the server requires a raw public
        // key from the client and none was offered (handshake_failure).
        let cfg = client_config_with_identity(public(&server_key), None);
        let (client_err, server_err) = assert_refused(&server_ep, addr, cfg).await;
        assert_eq!(
            local_alert(&server_err),
            Some(quinn::TransportErrorCode::crypto(40)),
            "unexpected server error: {server_err} (client: {client_err})"
        );

        // Raw public keys offered, but an empty Certificate sent when asked:
        // client authentication is mandatory (certificate_required).
        let cfg =
            client_config_with_identity(public(&server_key), Some(Arc::new(EmptyRawKeyIdentity)));
        let (client_err, server_err) = assert_refused(&server_ep, addr, cfg).await;
        assert_eq!(
            local_alert(&server_err),
            Some(quinn::TransportErrorCode::crypto(116)),
            "unexpected server error: {server_err} (client: {client_err})"
        );
    }

    #[test]
    fn tuning_out_of_range_is_an_error() {
        let tuning = TransportTuning {
            stream_window: u64::MAX,
            ..TransportTuning::default()
        };
        assert!(matches!(
            server_config(&key(12), &tuning),
            Err(TransportError::Tuning(_))
        ));
    }
}
