//! TLS 1.3 over TCP: the second transport of a Celluler link.
//!
//! The identity rules are exactly those of QUIC: the same rustls configs
//! ([`crate::tls::tls_server_config`], [`crate::tls::tls_client_config`]),
//! raw ed25519 public keys on both sides, ALPN `celluler/1`, TLS 1.3 only,
//! no resumption. What TCP adds is the socket handling QUIC did itself:
//!
//! - a handshake deadline ([`TcpTuning::handshake_timeout`]) from the TCP
//!   accept or connect on, so sockets that never finish (or never start) a
//!   handshake cannot pile up;
//! - a bound on handshakes in progress per listener
//!   ([`TcpTuning::max_handshakes`]): a connection beyond it is closed at
//!   once, before any TLS work, and counted;
//! - `TCP_NODELAY` (control frames are small and must not wait for Nagle),
//!   `TCP_NOTSENT_LOWAT` (bounds the unsent bytes the kernel queues, which
//!   a control frame would otherwise wait behind) and keep-alives.
//!
//! What travels on the connection (the chunk multiplexing of the control
//! channel and the lanes) is [`link`]'s business: [`TcpLink`].

mod link;

pub use link::{TcpLaneSender, TcpLink, TcpReceiver, TcpSender};

use crate::tls::{SERVER_NAME, key_from_certs};
use rustls_pki_types::ServerName;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A TLS connection over TCP, either side.
pub type TlsStream = tokio_rustls::TlsStream<TcpStream>;

/// Socket and multiplexing settings of TCP links (both sides).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpTuning {
    /// Longest a TLS handshake may take, counted from the TCP accept (or
    /// from the start of the connect). Default 10 s.
    pub handshake_timeout: Duration,
    /// Most TLS handshakes one listener runs at once; a connection over it
    /// is closed before its handshake starts. Default 256.
    pub max_handshakes: usize,
    /// `TCP_NOTSENT_LOWAT` in bytes: the kernel queues at most about this
    /// much unsent data per socket, so a control frame waits behind at
    /// most this much bulk data in the kernel (0: the kernel's default,
    /// unbounded). Default 128 KiB.
    pub notsent_lowat: u32,
    /// Idle time before TCP keep-alive probes, so a vanished peer is
    /// noticed (zero: no keep-alives). Default 5 s, as QUIC's keep-alive.
    pub keepalive: Duration,
    /// Unacknowledged data older than this fails the connection
    /// (`TCP_USER_TIMEOUT`; zero: the kernel's default). Default 30 s, as
    /// QUIC's idle timeout.
    pub user_timeout: Duration,
    /// Largest chunk payload the writer cuts frames into (1 to 65535): the
    /// most bulk data a control frame waits behind in the writer. Default
    /// [`relay_codec::mux::DEFAULT_CHUNK`] (16 381: one TLS record with
    /// its header).
    pub chunk_bytes: usize,
    /// Bytes each channel may queue for the writer task before its sender
    /// waits (a frame larger than this is still taken when the queue is
    /// empty). Default 256 KiB.
    pub send_queue: usize,
    /// Bytes of received frames each channel may hold unread before the
    /// reader stops reading the socket (backpressure through TCP, as
    /// QUIC's stream window). One frame is always taken into an empty
    /// channel. Default 4 MiB.
    pub channel_window: usize,
    /// After this side closes, how long it keeps reading (and discarding)
    /// until the peer closes too, so the kernel does not reset the
    /// connection while the peer still reads the Close frame. Default 2 s.
    pub linger: Duration,
}

impl Default for TcpTuning {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            max_handshakes: 256,
            notsent_lowat: 128 * 1024,
            keepalive: Duration::from_secs(5),
            user_timeout: Duration::from_secs(30),
            chunk_bytes: relay_codec::mux::DEFAULT_CHUNK,
            send_queue: 256 * 1024,
            channel_window: 4 * 1024 * 1024,
            linger: Duration::from_secs(2),
        }
    }
}

/// Why a TLS-over-TCP connection could not be established.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The TCP connection could not be made.
    #[error("could not connect to {addr} over TCP: {source}")]
    Connect {
        /// Where.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// TLS refused the peer (or the peer refused us with an alert): a wrong
    /// key, a certificate instead of a raw key, another protocol, garbage.
    #[error("TLS handshake refused: {0}")]
    Tls(rustls::Error),
    /// The connection failed during the handshake (closed, reset).
    #[error("connection failed during the TLS handshake: {0}")]
    Io(std::io::Error),
    /// The handshake did not finish in time.
    #[error("the TLS handshake did not finish within {0:?}")]
    Timeout(Duration),
    /// The handshake finished without a proven ed25519 key (cannot happen
    /// with this crate's verifiers; checked rather than assumed).
    #[error("the peer finished the TLS handshake without proving an ed25519 key")]
    NoPeerKey,
}

impl HandshakeError {
    /// The TLS error, from an I/O error tokio-rustls wrapped it in.
    fn from_io(e: std::io::Error) -> Self {
        match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
            Some(tls) => HandshakeError::Tls(tls.clone()),
            None => HandshakeError::Io(e),
        }
    }
}

/// The TCP listener could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("could not listen on TCP {addr}: {source}")]
pub struct BindError {
    /// The address asked for.
    pub addr: SocketAddr,
    /// Why.
    pub source: std::io::Error,
}

/// A TCP connection whose TLS handshake has finished: the stream and the
/// key the peer proved.
#[derive(Debug)]
pub struct TlsConnection {
    /// The TLS stream.
    pub stream: TlsStream,
    /// The peer's ed25519 key, proven in the handshake.
    pub peer_key: [u8; 32],
    /// The peer's address.
    pub remote: SocketAddr,
}

/// The ed25519 key the peer of `stream` proved; `None` before the
/// handshake finished.
pub fn peer_key(stream: &TlsStream) -> Option<[u8; 32]> {
    key_from_certs(stream.get_ref().1.peer_certificates()?)
}

/// What a TCP listener has refused so far, for metrics.
#[derive(Debug, Default)]
pub struct TcpListenerStats {
    /// Connections closed at once because `max_handshakes` were running.
    pub over_limit: AtomicU64,
    /// Handshakes that failed (TLS refused, or the connection failed).
    pub failed: AtomicU64,
    /// Handshakes that did not finish within `handshake_timeout`.
    pub timed_out: AtomicU64,
}

/// A TCP listener that hands out connections for TLS handshakes, at most
/// [`TcpTuning::max_handshakes`] at once.
pub struct TcpListener {
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    tuning: TcpTuning,
    handshakes: Arc<Semaphore>,
    stats: Arc<TcpListenerStats>,
}

impl std::fmt::Debug for TcpListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpListener")
            .field("listener", &self.listener)
            .finish_non_exhaustive()
    }
}

impl TcpListener {
    /// Listens on `addr` for TLS links with the server config `tls` (from
    /// [`crate::tls::tls_server_config`]). Call from within a tokio runtime.
    pub fn bind(
        addr: SocketAddr,
        tls: Arc<rustls::ServerConfig>,
        tuning: TcpTuning,
    ) -> Result<Self, BindError> {
        let bind = |source| BindError { addr, source };
        let socket = match addr {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
        }
        .map_err(bind)?;
        socket.set_reuseaddr(true).map_err(bind)?;
        socket.bind(addr).map_err(bind)?;
        let listener = socket.listen(1024).map_err(bind)?;
        Ok(Self {
            listener,
            acceptor: tokio_rustls::TlsAcceptor::from(tls),
            handshakes: Arc::new(Semaphore::new(tuning.max_handshakes.max(1))),
            tuning,
            stats: Arc::default(),
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// What it has refused so far.
    pub fn stats(&self) -> &Arc<TcpListenerStats> {
        &self.stats
    }

    /// The next connection whose handshake may start; connections over the
    /// handshake bound are closed (and counted) while waiting for it. Run
    /// [`TcpIncoming::handshake`] in a task of its own. Fails only if
    /// accepting fails (e.g. out of file descriptors).
    pub async fn accept(&self) -> std::io::Result<TcpIncoming> {
        loop {
            let (stream, remote) = self.listener.accept().await?;
            let Ok(permit) = self.handshakes.clone().try_acquire_owned() else {
                self.stats.over_limit.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%remote, limit = self.tuning.max_handshakes,
                    "TCP connection closed: too many TLS handshakes in progress");
                continue;
            };
            return Ok(TcpIncoming {
                stream,
                remote,
                acceptor: self.acceptor.clone(),
                tuning: self.tuning.clone(),
                stats: self.stats.clone(),
                _permit: permit,
            });
        }
    }
}

/// An accepted TCP connection before its TLS handshake.
pub struct TcpIncoming {
    stream: TcpStream,
    remote: SocketAddr,
    acceptor: tokio_rustls::TlsAcceptor,
    tuning: TcpTuning,
    stats: Arc<TcpListenerStats>,
    /// One of the listener's handshake slots, given back when the
    /// handshake ends either way.
    _permit: OwnedSemaphorePermit,
}

impl TcpIncoming {
    /// The peer's address.
    pub fn remote_address(&self) -> SocketAddr {
        self.remote
    }

    /// Runs the server side of the TLS handshake, within the handshake
    /// timeout. On failure the socket is closed (after a TLS alert where
    /// TLS has one to send) and the failure counted.
    pub async fn handshake(self) -> Result<TlsConnection, HandshakeError> {
        configure(&self.stream, &self.tuning);
        let timeout = self.tuning.handshake_timeout;
        let r = match tokio::time::timeout(timeout, self.acceptor.accept(self.stream)).await {
            Err(_) => {
                self.stats.timed_out.fetch_add(1, Ordering::Relaxed);
                Err(HandshakeError::Timeout(timeout))
            }
            Ok(Err(e)) => {
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                Err(HandshakeError::from_io(e))
            }
            Ok(Ok(s)) => established(s.into(), self.remote),
        };
        if let Err(e) = &r {
            tracing::debug!(remote = %self.remote, "TLS-over-TCP handshake failed: {e}");
        }
        r
    }
}

/// Connects to `addr` over TCP and runs the client side of the TLS
/// handshake with `tls` (from [`crate::tls::tls_client_config`], which pins the
/// server's key), all within `tuning.handshake_timeout`.
pub async fn connect(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    tuning: &TcpTuning,
) -> Result<TlsConnection, HandshakeError> {
    let timeout = tuning.handshake_timeout;
    let step = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|source| HandshakeError::Connect { addr, source })?;
        configure(&tcp, tuning);
        let name = ServerName::try_from(SERVER_NAME).expect("SERVER_NAME is a valid DNS name");
        let s = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .map_err(HandshakeError::from_io)?;
        established(s.into(), addr)
    };
    tokio::time::timeout(timeout, step)
        .await
        .map_err(|_| HandshakeError::Timeout(timeout))?
}

fn established(stream: TlsStream, remote: SocketAddr) -> Result<TlsConnection, HandshakeError> {
    let peer_key = peer_key(&stream).ok_or(HandshakeError::NoPeerKey)?;
    Ok(TlsConnection {
        stream,
        peer_key,
        remote,
    })
}

/// Best effort socket options (a failure costs latency or dead-peer
/// detection, not correctness, so it is logged, not returned).
fn configure(tcp: &TcpStream, tuning: &TcpTuning) {
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::debug!(%e, "cannot set TCP_NODELAY");
    }
    let sock = socket2::SockRef::from(tcp);
    if tuning.notsent_lowat > 0
        && let Err(e) = sock.set_tcp_notsent_lowat(tuning.notsent_lowat)
    {
        tracing::debug!(%e, "cannot set TCP_NOTSENT_LOWAT");
    }
    if !tuning.keepalive.is_zero() {
        let ka = socket2::TcpKeepalive::new()
            .with_time(tuning.keepalive)
            .with_interval(tuning.keepalive)
            .with_retries(3);
        if let Err(e) = sock.set_tcp_keepalive(&ka) {
            tracing::debug!(%e, "cannot enable TCP keep-alive");
        }
    }
    if !tuning.user_timeout.is_zero()
        && let Err(e) = sock.set_tcp_user_timeout(Some(tuning.user_timeout))
    {
        tracing::debug!(%e, "cannot set TCP_USER_TIMEOUT");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::tests::{EmptyRawKeyIdentity, tls_client_config_with_identity};
    use crate::tls::{ALPN, PinnedServerKey, provider, tls_client_config, tls_server_config};
    use ed25519_dalek::SigningKey;
    use rustls::{AlertDescription, CertificateError};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Safety net only: every test waits on events.
    const WAIT: Duration = Duration::from_secs(20);

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn public(key: &SigningKey) -> [u8; 32] {
        key.verifying_key().to_bytes()
    }

    fn listener(key: &SigningKey, tuning: TcpTuning) -> (TcpListener, SocketAddr) {
        let tls = Arc::new(tls_server_config(key).unwrap());
        let l = TcpListener::bind("127.0.0.1:0".parse().unwrap(), tls, tuning).unwrap();
        let addr = l.local_addr().unwrap();
        (l, addr)
    }

    /// The server side of the next connection, in a task of its own.
    fn serve_one(
        l: TcpListener,
    ) -> tokio::task::JoinHandle<(Result<TlsConnection, HandshakeError>, TcpListener)> {
        tokio::spawn(async move {
            let incoming = l.accept().await.unwrap();
            (incoming.handshake().await, l)
        })
    }

    async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(WAIT, f).await.expect("timed out")
    }

    /// Reads until the peer closes; returns what it sent.
    async fn read_to_close(mut s: TcpStream) -> Vec<u8> {
        let mut got = vec![];
        // A reset counts as closed too.
        let _ = within(s.read_to_end(&mut got)).await;
        got
    }

    #[tokio::test]
    async fn a_handshake_proves_both_keys() {
        let (server_key, client_key) = (key(1), key(2));
        let (l, addr) = listener(&server_key, TcpTuning::default());
        let server = serve_one(l);
        let tls = tls_client_config(&client_key, public(&server_key), ALPN).unwrap();
        let mut client = within(connect(addr, Arc::new(tls), &TcpTuning::default()))
            .await
            .expect("client handshake");
        assert_eq!(client.peer_key, public(&server_key));
        assert_eq!(peer_key(&client.stream), Some(public(&server_key)));
        let mut server = within(server).await.unwrap().0.expect("server handshake");
        assert_eq!(server.peer_key, public(&client_key));
        assert_eq!(server.remote.ip(), addr.ip());
        // The streams carry bytes both ways.
        client.stream.write_all(b"ping").await.unwrap();
        client.stream.flush().await.unwrap();
        let mut buf = [0; 4];
        within(server.stream.read_exact(&mut buf)).await.unwrap();
        assert_eq!(&buf, b"ping");
        let sock = socket2::SockRef::from(server.stream.get_ref().0);
        assert!(sock.tcp_nodelay().unwrap());
        assert_eq!(sock.tcp_notsent_lowat().unwrap(), 128 * 1024);
    }

    /// Runs a handshake with the client config `tls`; both sides' outcomes.
    async fn both_sides(
        server_key: &SigningKey,
        tls: rustls::ClientConfig,
    ) -> (
        Result<TlsConnection, HandshakeError>,
        Result<TlsConnection, HandshakeError>,
    ) {
        let (l, addr) = listener(server_key, TcpTuning::default());
        let server = serve_one(l);
        let client = within(connect(addr, Arc::new(tls), &TcpTuning::default())).await;
        let server = within(server).await.unwrap().0;
        (client, server)
    }

    /// Asserts the client ended up without a link. In TLS 1.3 a client
    /// finishes its side before the server has checked the client's key,
    /// so a client that thinks it connected must find the server's alert
    /// (or the close) on its first read.
    async fn assert_client_refused(r: Result<TlsConnection, HandshakeError>) {
        if let Ok(mut c) = r {
            let mut buf = [0; 1];
            match within(c.stream.read(&mut buf)).await {
                Ok(0) => {}
                Ok(_) => panic!("the server sent data to a client it should refuse"),
                Err(e) => assert!(
                    matches!(
                        HandshakeError::from_io(e),
                        HandshakeError::Tls(rustls::Error::AlertReceived(_))
                    ),
                    "unexpected read failure"
                ),
            }
        }
    }

    fn tls_error(r: &Result<TlsConnection, HandshakeError>) -> &rustls::Error {
        match r {
            Err(HandshakeError::Tls(e)) => e,
            Err(e) => panic!("expected a TLS refusal, got {e}"),
            Ok(_) => panic!("expected a TLS refusal, got a connection"),
        }
    }

    #[tokio::test]
    async fn a_wrong_pinned_key_is_refused_by_the_client() {
        let tls = tls_client_config(&key(4), public(&key(5)), ALPN).unwrap();
        let (client, server) = both_sides(&key(3), tls).await;
        assert_eq!(
            tls_error(&client),
            &rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure)
        );
        assert_eq!(
            tls_error(&server),
            &rustls::Error::AlertReceived(AlertDescription::AccessDenied)
        );
    }

    #[tokio::test]
    async fn a_wrong_alpn_is_refused_by_the_server() {
        let server_key = key(6);
        let tls = tls_client_config(&key(7), public(&server_key), b"celluler/0").unwrap();
        let (client, server) = both_sides(&server_key, tls).await;
        assert_eq!(tls_error(&server), &rustls::Error::NoApplicationProtocol);
        assert_eq!(
            tls_error(&client),
            &rustls::Error::AlertReceived(AlertDescription::NoApplicationProtocol)
        );
    }

    #[tokio::test]
    async fn a_client_without_a_key_is_refused() {
        let server_key = key(8);
        // No client authentication at all.
        let tls = tls_client_config_with_identity(public(&server_key), None);
        let (client, server) = both_sides(&server_key, tls).await;
        assert_client_refused(client).await;
        assert!(
            matches!(tls_error(&server), rustls::Error::PeerIncompatible(_)),
            "{:?}",
            server.err()
        );
        // Raw keys offered, but an empty Certificate sent when asked.
        let tls = tls_client_config_with_identity(
            public(&server_key),
            Some(Arc::new(EmptyRawKeyIdentity)),
        );
        let (client, server) = both_sides(&server_key, tls).await;
        assert_client_refused(client).await;
        assert_eq!(tls_error(&server), &rustls::Error::NoCertificatesPresented);
    }

    /// An X.509 certificate and its ed25519 key, as an ordinary TLS peer
    /// would present.
    fn x509() -> (
        rustls_pki_types::CertificateDer<'static>,
        rustls_pki_types::PrivateKeyDer<'static>,
    ) {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let cert = rcgen::CertificateParams::new(vec![SERVER_NAME.to_owned()])
            .unwrap()
            .self_signed(&kp)
            .unwrap();
        let key = rustls_pki_types::PrivateKeyDer::try_from(kp.serialize_der()).unwrap();
        (cert.der().clone(), key)
    }

    #[tokio::test]
    async fn a_certificate_instead_of_a_raw_key_is_refused() {
        let server_key = key(9);
        // A client presenting an X.509 certificate.
        let (cert, cert_key) = x509();
        let verifier = PinnedServerKey::new(public(&server_key)).unwrap();
        let mut tls = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_auth_cert(vec![cert], cert_key)
            .unwrap();
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let (client, server) = both_sides(&server_key, tls).await;
        assert_client_refused(client).await;
        assert!(
            matches!(tls_error(&server), rustls::Error::PeerIncompatible(_)),
            "{:?}",
            server.err()
        );

        // A server presenting an X.509 certificate.
        let (cert, cert_key) = x509();
        let mut server_tls = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert], cert_key)
            .unwrap();
        server_tls.alpn_protocols = vec![ALPN.to_vec()];
        let l = TcpListener::bind(
            "127.0.0.1:0".parse().unwrap(),
            Arc::new(server_tls),
            TcpTuning::default(),
        )
        .unwrap();
        let addr = l.local_addr().unwrap();
        let server = serve_one(l);
        let tls = tls_client_config(&key(10), public(&server_key), ALPN).unwrap();
        let client = within(connect(addr, Arc::new(tls), &TcpTuning::default())).await;
        // The client offers to accept only a raw key; the server has none.
        assert_eq!(
            tls_error(&client),
            &rustls::Error::AlertReceived(AlertDescription::HandshakeFailure)
        );
        let server = within(server).await.unwrap().0;
        assert!(
            matches!(tls_error(&server), rustls::Error::PeerIncompatible(_)),
            "{:?}",
            server.err()
        );
    }

    #[tokio::test]
    async fn garbage_instead_of_a_client_hello_is_refused_at_once() {
        // A handshake timeout far beyond the test's: a refusal that comes
        // is the garbage's, not the clock's.
        let tuning = TcpTuning {
            handshake_timeout: Duration::from_secs(3600),
            ..TcpTuning::default()
        };
        let (l, addr) = listener(&key(11), tuning);
        let server = serve_one(l);
        let mut raw = TcpStream::connect(addr).await.unwrap();
        raw.write_all(b"GET / HTTP/1.1\r\nHost: relay\r\n\r\n")
            .await
            .unwrap();
        let (r, l) = within(server).await.unwrap();
        assert!(
            matches!(tls_error(&r), rustls::Error::InvalidMessage(_)),
            "{:?}",
            r.err()
        );
        assert_eq!(l.stats().failed.load(Ordering::Relaxed), 1);
        // The server answered with a TLS alert record (type 21) and closed.
        let answer = read_to_close(raw).await;
        assert_eq!(answer.first(), Some(&21), "{answer:?}");
    }

    #[tokio::test]
    async fn a_socket_that_never_says_hello_is_closed_at_the_handshake_timeout() {
        let tuning = TcpTuning {
            handshake_timeout: Duration::from_millis(100),
            ..TcpTuning::default()
        };
        let (l, addr) = listener(&key(12), tuning);
        let server = serve_one(l);
        let raw = TcpStream::connect(addr).await.unwrap();
        // The close is the event waited for.
        assert_eq!(read_to_close(raw).await, b"");
        let (r, l) = within(server).await.unwrap();
        assert!(
            matches!(r, Err(HandshakeError::Timeout(t)) if t == Duration::from_millis(100)),
            "{:?}",
            r.err()
        );
        assert_eq!(l.stats().timed_out.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn connections_over_the_handshake_bound_are_closed_before_tls() {
        let tuning = TcpTuning {
            max_handshakes: 1,
            handshake_timeout: Duration::from_secs(3600),
            ..TcpTuning::default()
        };
        let server_key = key(13);
        let (l, addr) = listener(&server_key, tuning);
        let l = Arc::new(l);
        let (done_tx, mut done_rx) = tokio::sync::mpsc::channel(4);
        let acceptor = tokio::spawn({
            let l = l.clone();
            async move {
                loop {
                    let incoming = l.accept().await.unwrap();
                    let done = done_tx.clone();
                    tokio::spawn(async move {
                        let _ = done.send(incoming.handshake().await).await;
                    });
                }
            }
        });
        // The first socket takes the only handshake slot and holds it.
        let first = TcpStream::connect(addr).await.unwrap();
        // The second is closed unanswered.
        let second = TcpStream::connect(addr).await.unwrap();
        assert_eq!(read_to_close(second).await, b"");
        assert_eq!(l.stats().over_limit.load(Ordering::Relaxed), 1);
        // Once the first gives its slot back, a real client gets through.
        drop(first);
        let r = within(done_rx.recv()).await.unwrap();
        assert!(matches!(r, Err(HandshakeError::Io(_))), "{:?}", r.err());
        let tls = tls_client_config(&key(14), public(&server_key), ALPN).unwrap();
        within(connect(addr, Arc::new(tls), &TcpTuning::default()))
            .await
            .expect("a handshake after the slot is free");
        assert!(within(done_rx.recv()).await.unwrap().is_ok());
        acceptor.abort();
    }
}
