//! QUIC link layer: a node's TLS identity is its ed25519 key.
//!
//! Both ends of every QUIC connection prove, during the TLS 1.3 handshake,
//! that they hold the ed25519 key they present, so a relay knows a link's
//! authenticated key before it routes a byte from it (docs/PROTOCOL.md,
//! section 6.1).
//!
//! Approach: TLS raw public keys (RFC 7250), as iroh does over quinn. The
//! "certificate" each side sends is just the SubjectPublicKeyInfo DER of its
//! ed25519 key; no X.509 certificate, chain or CA is involved. The handshake
//! signature (TLS 1.3 CertificateVerify) is checked with ed25519-dalek's
//! `verify_strict`, and only the ED25519 signature scheme is offered or
//! accepted.
//!
//! - [`server_config`] requires client authentication and accepts any client
//!   that proves an ed25519 key (a cell's key is not known in advance); read it
//!   afterwards with [`peer_key`].
//! - [`client_config`] presents the client's own key and refuses the server
//!   unless the key it proves equals the one expected.
//!
//! Only TLS 1.3 is enabled, with the ring crypto provider installed in each
//! config. Session resumption and 0-RTT are off, so every connection proves
//! both keys afresh (links are long-lived; one extra signature per connection
//! is cheap). The server name given to `quinn::Endpoint::connect_with` is not
//! checked (identity is the pinned key); use [`SERVER_NAME`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use quinn::crypto::rustls::{NoInitialCipherSuite, QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, TransportConfig, VarInt};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, SignatureAlgorithm, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, SubjectPublicKeyInfoDer, UnixTime};

/// The ALPN protocol identifier of a Celluler link; a peer offering anything
/// else is refused during the handshake.
pub const ALPN: &[u8] = b"celluler/1";

/// Server name to pass to `quinn::Endpoint::connect_with`. It is required by
/// quinn's API but never checked: the server is identified by its key.
pub const SERVER_NAME: &str = "celluler";

/// Requested size of each UDP socket's send and receive buffers (the kernel
/// may cap it, e.g. at `net.core.rmem_max`).
const UDP_BUFFER_BYTES: usize = 4 * 1024 * 1024;

/// DER prefix of an ed25519 SubjectPublicKeyInfo (RFC 8410): SEQUENCE {
/// SEQUENCE { OID 1.3.101.112 }, BIT STRING (0 unused bits) }, followed by
/// the 32-byte key.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// Length of an ed25519 SubjectPublicKeyInfo DER.
const ED25519_SPKI_LEN: usize = ED25519_SPKI_PREFIX.len() + 32;

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

/// Why a transport config or endpoint could not be built.
///
/// Each message names its cause itself and no variant has a `source()`,
/// so a printed error chain says the cause once.
#[derive(thiserror::Error, Debug)]
pub enum TransportError {
    /// The expected peer key is not a valid (or is a weak) ed25519 public key.
    #[error("expected peer key is not a valid ed25519 public key")]
    InvalidPeerKey,
    /// rustls refused the TLS configuration.
    #[error("TLS configuration failed: {0}")]
    Tls(rustls::Error),
    /// The TLS config lacks the cipher suite QUIC needs for its initial packets.
    #[error("TLS config is unusable for QUIC: {0}")]
    NoInitialCipherSuite(NoInitialCipherSuite),
    /// A [`TransportTuning`] value does not fit QUIC's limits.
    #[error("transport tuning out of range: {0}")]
    Tuning(&'static str),
    /// The UDP socket could not be bound.
    #[error("could not bind UDP socket on {addr}: {error}")]
    Bind {
        /// Address that was asked for.
        addr: SocketAddr,
        /// Underlying I/O error.
        error: std::io::Error,
    },
    /// quinn could not set up an endpoint on the bound socket.
    #[error("could not create QUIC endpoint on {addr}: {error}")]
    Endpoint {
        /// Address that was asked for.
        addr: SocketAddr,
        /// Underlying I/O error.
        error: std::io::Error,
    },
}

impl From<rustls::Error> for TransportError {
    fn from(e: rustls::Error) -> Self {
        Self::Tls(e)
    }
}

impl From<NoInitialCipherSuite> for TransportError {
    fn from(e: NoInitialCipherSuite) -> Self {
        Self::NoInitialCipherSuite(e)
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

/// The TLS 1.3 server side of every Celluler link, QUIC or TCP: proves
/// `key` as a raw public key, requires the client to prove an ed25519 key
/// of its own (any key), offers only [`ALPN`], no resumption, no 0-RTT.
pub fn tls_server_config(key: &SigningKey) -> Result<rustls::ServerConfig, TransportError> {
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(AnyEd25519Client))
        .with_cert_resolver(Arc::new(
            rustls::server::AlwaysResolvesServerRawPublicKeys::new(certified_key(key)),
        ));
    tls.alpn_protocols = vec![ALPN.to_vec()];
    // No resumption and no 0-RTT: every connection proves the client's key.
    tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    tls.send_tls13_tickets = 0;
    tls.max_early_data_size = 0;
    Ok(tls)
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

/// The TLS 1.3 client side of every Celluler link, QUIC or TCP: presents
/// `key` as a raw public key, accepts the server only if it proves
/// `expected_server`, offers `alpn` (normally [`ALPN`]), no SNI, no
/// resumption, no early data.
pub fn tls_client_config(
    key: &SigningKey,
    expected_server: [u8; 32],
    alpn: &[u8],
) -> Result<rustls::ClientConfig, TransportError> {
    let verifier = PinnedServerKey::new(expected_server)?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(Arc::new(
            rustls::client::AlwaysResolvesClientRawPublicKeys::new(certified_key(key)),
        ));
    tls.alpn_protocols = vec![alpn.to_vec()];
    tls.resumption = rustls::client::Resumption::disabled();
    tls.enable_early_data = false;
    tls.enable_sni = false;
    Ok(tls)
}

/// The ed25519 public key the other side of `conn` proved during the
/// handshake; `None` if the handshake is not complete or it presented none.
pub fn peer_key(conn: &quinn::Connection) -> Option<[u8; 32]> {
    let identity = conn.peer_identity()?;
    let certs = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    key_from_certs(&certs)
}

/// The ed25519 key in a peer's TLS Certificate message: exactly one entry,
/// an ed25519 SPKI (what the verifiers accepted).
fn key_from_certs(certs: &[CertificateDer<'_>]) -> Option<[u8; 32]> {
    match certs {
        [spki] => key_from_spki(spki),
        _ => None,
    }
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
pub fn server_endpoint_counting(
    addr: SocketAddr,
    cfg: quinn::ServerConfig,
    not_quic: Arc<std::sync::atomic::AtomicU64>,
) -> Result<quinn::Endpoint, TransportError> {
    use quinn::Runtime;
    let socket =
        std::net::UdpSocket::bind(addr).map_err(|error| TransportError::Bind { addr, error })?;
    enlarge_buffers(&socket);
    let inner = quinn::TokioRuntime
        .wrap_udp_socket(socket)
        .map_err(|error| TransportError::Endpoint { addr, error })?;
    quinn::Endpoint::new_with_abstract_socket(
        endpoint_config(),
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

/// The ring provider, installed explicitly in each config (never relying on
/// a process-wide default).
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Our raw public key (SPKI) together with the ed25519 key that signs the
/// handshake with it.
fn certified_key(key: &SigningKey) -> Arc<CertifiedKey> {
    let public = key.verifying_key().to_bytes();
    let signer = Ed25519TlsKey {
        key: Arc::new(key.clone()),
        spki: spki_from_key(&public),
    };
    // Certificate and signer come from the same key by construction.
    // (`CertifiedKey::keys_match` parses X.509 and does not apply to RPK.)
    Arc::new(CertifiedKey::new(
        vec![CertificateDer::from(spki_from_key(&public))],
        Arc::new(signer),
    ))
}

/// The SubjectPublicKeyInfo DER of an ed25519 public key.
fn spki_from_key(key: &[u8; 32]) -> Vec<u8> {
    let mut der = Vec::with_capacity(ED25519_SPKI_LEN);
    der.extend_from_slice(&ED25519_SPKI_PREFIX);
    der.extend_from_slice(key);
    der
}

/// The ed25519 key in an SPKI DER; `None` unless it is exactly the 12-byte
/// ed25519 prefix followed by 32 key bytes.
fn key_from_spki(der: &[u8]) -> Option<[u8; 32]> {
    if der.len() != ED25519_SPKI_LEN {
        return None;
    }
    let (prefix, key) = der.split_at(ED25519_SPKI_PREFIX.len());
    if prefix != ED25519_SPKI_PREFIX {
        return None;
    }
    key.try_into().ok()
}

/// Parses a peer's raw public key, refusing anything that is not a valid,
/// non-weak ed25519 point.
fn verifying_key_from_spki(der: &[u8]) -> Result<VerifyingKey, rustls::Error> {
    let bytes = key_from_spki(der).ok_or(rustls::Error::InvalidCertificate(
        CertificateError::BadEncoding,
    ))?;
    let key = VerifyingKey::from_bytes(&bytes)
        .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
    if key.is_weak() {
        return Err(rustls::Error::InvalidCertificate(
            CertificateError::BadEncoding,
        ));
    }
    Ok(key)
}

/// A raw public key as presented in a TLS Certificate message: exactly one
/// entry, and an ed25519 SPKI.
fn verify_presented(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
) -> Result<VerifyingKey, rustls::Error> {
    if !intermediates.is_empty() {
        return Err(rustls::Error::InvalidCertificate(
            CertificateError::BadEncoding,
        ));
    }
    verifying_key_from_spki(end_entity)
}

/// Checks a TLS 1.3 CertificateVerify signature: scheme ED25519 only, strict
/// ed25519 verification against the SPKI's key.
fn verify_ed25519(
    message: &[u8],
    spki: &[u8],
    scheme: SignatureScheme,
    signature: &[u8],
) -> Result<HandshakeSignatureValid, rustls::Error> {
    if scheme != SignatureScheme::ED25519 {
        // Only ED25519 is ever advertised.
        return Err(rustls::Error::PeerMisbehaved(
            rustls::PeerMisbehaved::SignedHandshakeWithUnadvertisedSigScheme,
        ));
    }
    let key = verifying_key_from_spki(spki)?;
    let signature = Signature::from_slice(signature)
        .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadSignature))?;
    key.verify_strict(message, &signature)
        .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadSignature))?;
    Ok(HandshakeSignatureValid::assertion())
}

fn tls12_refused() -> rustls::Error {
    rustls::Error::General("TLS 1.2 is not supported on Celluler links".into())
}

/// Client side: accepts the server only if it proves the pinned key.
#[derive(Debug)]
struct PinnedServerKey {
    expected: [u8; 32],
}

impl PinnedServerKey {
    fn new(expected: [u8; 32]) -> Result<Self, TransportError> {
        let key =
            VerifyingKey::from_bytes(&expected).map_err(|_| TransportError::InvalidPeerKey)?;
        if key.is_weak() {
            return Err(TransportError::InvalidPeerKey);
        }
        Ok(Self { expected })
    }
}

impl ServerCertVerifier for PinnedServerKey {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let key = verify_presented(end_entity, intermediates)?;
        if key.to_bytes() != self.expected {
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(tls12_refused())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_ed25519(message, cert, dss.scheme, dss.signature())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }

    fn requires_raw_public_keys(&self) -> bool {
        true
    }
}

/// Server side: requires a client key, accepts any valid ed25519 key.
#[derive(Debug)]
struct AnyEd25519Client;

impl ClientCertVerifier for AnyEd25519Client {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        verify_presented(end_entity, intermediates)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(tls12_refused())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_ed25519(message, cert, dss.scheme, dss.signature())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }

    fn requires_raw_public_keys(&self) -> bool {
        true
    }
}

/// Our ed25519 key as a rustls signing key (signs the CertificateVerify).
struct Ed25519TlsKey {
    key: Arc<SigningKey>,
    spki: Vec<u8>,
}

impl std::fmt::Debug for Ed25519TlsKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ed25519TlsKey")
            .field("public", &self.key.verifying_key())
            .finish_non_exhaustive()
    }
}

impl rustls::sign::SigningKey for Ed25519TlsKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn rustls::sign::Signer>> {
        offered
            .contains(&SignatureScheme::ED25519)
            .then(|| Box::new(Ed25519TlsSigner(self.key.clone())) as Box<dyn rustls::sign::Signer>)
    }

    fn public_key(&self) -> Option<SubjectPublicKeyInfoDer<'_>> {
        Some(SubjectPublicKeyInfoDer::from(self.spki.as_slice()))
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        SignatureAlgorithm::ED25519
    }
}

/// Signs one handshake with our ed25519 key.
struct Ed25519TlsSigner(Arc<SigningKey>);

impl std::fmt::Debug for Ed25519TlsSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ed25519TlsSigner").finish_non_exhaustive()
    }
}

impl rustls::sign::Signer for Ed25519TlsSigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        Ok(self.0.sign(message).to_bytes().to_vec())
    }

    fn scheme(&self) -> SignatureScheme {
        SignatureScheme::ED25519
    }
}

pub mod tcp;

#[cfg(test)]
mod tests {
    use super::*;

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

    /// Offers raw public keys for client auth but, when asked, presents none
    /// (an empty Certificate message).
    #[derive(Debug)]
    pub(super) struct EmptyRawKeyIdentity;

    impl rustls::client::ResolvesClientCert for EmptyRawKeyIdentity {
        fn resolve(
            &self,
            _root_hint_subjects: &[&[u8]],
            _sigschemes: &[SignatureScheme],
        ) -> Option<Arc<CertifiedKey>> {
            None
        }

        fn only_raw_public_keys(&self) -> bool {
            true
        }

        fn has_certs(&self) -> bool {
            true
        }
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

    /// [`tls_client_config`] with the given client identity instead of a
    /// raw key (`None`: no client authentication at all).
    pub(super) fn tls_client_config_with_identity(
        expected_server: [u8; 32],
        identity: Option<Arc<dyn rustls::client::ResolvesClientCert>>,
    ) -> rustls::ClientConfig {
        let verifier = PinnedServerKey::new(expected_server).unwrap();
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier));
        let mut tls = match identity {
            None => builder.with_no_client_auth(),
            Some(resolver) => builder.with_client_cert_resolver(resolver),
        };
        tls.alpn_protocols = vec![ALPN.to_vec()];
        tls
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
    fn spki_is_parsed_strictly() {
        let k = public(&key(9));
        let der = spki_from_key(&k);
        assert_eq!(der.len(), 44);
        assert_eq!(key_from_spki(&der), Some(k));
        // Too short, too long, wrong prefix byte, wrong OID.
        assert_eq!(key_from_spki(&der[..43]), None);
        let mut long = der.clone();
        long.push(0);
        assert_eq!(key_from_spki(&long), None);
        for i in 0..ED25519_SPKI_PREFIX.len() {
            let mut bad = der.clone();
            bad[i] ^= 0x01;
            assert_eq!(key_from_spki(&bad), None, "flipped prefix byte {i}");
        }
        // A small-order (weak) point is refused as a peer key.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        assert!(verifying_key_from_spki(&spki_from_key(&identity)).is_err());
        assert!(matches!(
            PinnedServerKey::new(identity),
            Err(TransportError::InvalidPeerKey)
        ));
    }

    #[test]
    fn handshake_signature_is_really_checked() {
        let signer = key(10);
        let spki = spki_from_key(&public(&signer));
        let msg = b"tls13 certificate verify content";
        let sig = signer.sign(msg).to_bytes();

        assert!(verify_ed25519(msg, &spki, SignatureScheme::ED25519, &sig).is_ok());
        // Wrong scheme, tampered message, tampered signature, other key, bad length.
        assert!(verify_ed25519(msg, &spki, SignatureScheme::ECDSA_NISTP256_SHA256, &sig).is_err());
        assert!(verify_ed25519(b"other", &spki, SignatureScheme::ED25519, &sig).is_err());
        let mut bad = sig;
        bad[5] ^= 0x40;
        assert!(verify_ed25519(msg, &spki, SignatureScheme::ED25519, &bad).is_err());
        let other = spki_from_key(&public(&key(11)));
        assert!(verify_ed25519(msg, &other, SignatureScheme::ED25519, &sig).is_err());
        assert!(verify_ed25519(msg, &spki, SignatureScheme::ED25519, &sig[..63]).is_err());
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
