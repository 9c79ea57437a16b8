//! TLS 1.3 with raw ed25519 public keys: the identity layer of every
//! Celluler link, the same for QUIC ([`crate::quic`]) and TCP
//! ([`crate::tcp`]).
//!
//! Both ends of every link prove, during the TLS 1.3 handshake, that they
//! hold the ed25519 key they present, so a relay knows a link's
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
//! - [`tls_server_config`] requires client authentication and accepts any
//!   client that proves an ed25519 key (a cell's key is not known in
//!   advance); a link reads it afterwards ([`crate::Link::peer_key`]).
//! - [`tls_client_config`] presents the client's own key and refuses the
//!   server unless the key it proves equals the one expected.
//!
//! Only TLS 1.3 is enabled, with the ring crypto provider installed in each
//! config. Session resumption and 0-RTT are off, so every connection proves
//! both keys afresh (links are long-lived; one extra signature per connection
//! is cheap). The server name a client sends is not checked (identity is the
//! pinned key); use [`SERVER_NAME`].

use std::sync::Arc;

use crate::error::TransportError;
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
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

/// Server name a client sends (quinn's `connect_with` and tokio-rustls need
/// one). It is never checked: the server is identified by its key.
pub const SERVER_NAME: &str = "celluler";

/// DER prefix of an ed25519 SubjectPublicKeyInfo (RFC 8410): SEQUENCE {
/// SEQUENCE { OID 1.3.101.112 }, BIT STRING (0 unused bits) }, followed by
/// the 32-byte key.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// Length of an ed25519 SubjectPublicKeyInfo DER.
const ED25519_SPKI_LEN: usize = ED25519_SPKI_PREFIX.len() + 32;

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

/// The ed25519 key in a peer's TLS Certificate message: exactly one entry,
/// an ed25519 SPKI (what the verifiers accepted).
pub(crate) fn key_from_certs(certs: &[CertificateDer<'_>]) -> Option<[u8; 32]> {
    match certs {
        [spki] => key_from_spki(spki),
        _ => None,
    }
}

/// The ring provider, installed explicitly in each config (never relying on
/// a process-wide default).
pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
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
pub(crate) struct PinnedServerKey {
    expected: [u8; 32],
}

impl PinnedServerKey {
    pub(crate) fn new(expected: [u8; 32]) -> Result<Self, TransportError> {
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn public(key: &SigningKey) -> [u8; 32] {
        key.verifying_key().to_bytes()
    }

    /// Offers raw public keys for client auth but, when asked, presents none
    /// (an empty Certificate message).
    #[derive(Debug)]
    pub(crate) struct EmptyRawKeyIdentity;

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

    /// [`tls_client_config`] with the given client identity instead of a
    /// raw key (`None`: no client authentication at all).
    pub(crate) fn tls_client_config_with_identity(
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
}
