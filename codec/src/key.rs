//! Identities: ed25519 keys, their printable form and node addresses.

use crate::error::KeyError;
use data_encoding::{Encoding, Specification};
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

/// Length of the printable form of a key.
pub const PRINTABLE_KEY_LEN: usize = 52;

/// Lowercase RFC 4648 base32 without padding: 52 characters for 32 bytes,
/// no 0/O or 1/l look-alikes, one case, no punctuation, so a key survives a
/// double-click, a terminal and a URL. Upper case is accepted when parsing.
fn base32() -> &'static Encoding {
    static ENC: OnceLock<Encoding> = OnceLock::new();
    ENC.get_or_init(|| {
        let mut spec = Specification::new();
        spec.symbols.push_str("abcdefghijklmnopqrstuvwxyz234567");
        spec.translate.from.push_str("ABCDEFGHIJKLMNOPQRSTUVWXYZ");
        spec.translate.to.push_str("abcdefghijklmnopqrstuvwxyz");
        spec.encoding().expect("valid base32 specification")
    })
}

pub(crate) fn encode_b32(bytes: &[u8; 32]) -> String {
    base32().encode(bytes)
}

pub(crate) fn decode_b32(s: &str) -> Result<[u8; 32], KeyError> {
    let s = s.trim();
    if s.len() != PRINTABLE_KEY_LEN {
        return Err(KeyError::Format(s.chars().take(80).collect()));
    }
    let v = base32()
        .decode(s.as_bytes())
        .map_err(|_| KeyError::Format(s.to_owned()))?;
    v.try_into().map_err(|_| KeyError::Format(s.to_owned()))
}

/// An ed25519 public key: the identity of a cell or a relay.
///
/// Its printable form ([`fmt::Display`], [`FromStr`]) is 52 lowercase base32
/// characters. Construction does not check that the bytes are a curve point
/// (the hot path never needs it); [`PublicKey::verifying_key`] does.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    /// The raw 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The key as an ed25519-dalek verifying key, checking it is a valid point.
    pub fn verifying_key(&self) -> Result<VerifyingKey, KeyError> {
        VerifyingKey::from_bytes(&self.0).map_err(|_| KeyError::NotOnCurve)
    }

    /// The first 8 printable characters, for logs.
    pub fn short(&self) -> String {
        let mut s = self.to_string();
        s.truncate(8);
        s
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&encode_b32(&self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.short())
    }
}

impl FromStr for PublicKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        decode_b32(s).map(PublicKey)
    }
}

/// A node's ed25519 signing key with its public key.
///
/// The secret is zeroized on drop (ed25519-dalek's `zeroize` feature).
#[derive(Clone)]
pub struct Keypair {
    signing: SigningKey,
    public: PublicKey,
}

impl Keypair {
    /// A fresh keypair from the operating system's random source.
    pub fn generate() -> Self {
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret).expect("the OS random source is available");
        let kp = Self::from_secret_bytes(&secret);
        secret.fill(0);
        kp
    }

    /// The keypair whose 32-byte ed25519 secret (seed) is `secret`.
    pub fn from_secret_bytes(secret: &[u8; 32]) -> Self {
        let signing = SigningKey::from_bytes(secret);
        let public = PublicKey(signing.verifying_key().to_bytes());
        Self { signing, public }
    }

    /// The public half: this node's identity.
    pub fn public(&self) -> PublicKey {
        self.public
    }

    /// The 32-byte secret seed. Handle with care.
    pub fn secret_bytes(&self) -> [u8; 32] {
        self.signing.to_bytes()
    }

    /// The ed25519-dalek signing key, for TLS and other layers.
    pub fn signing_key(&self) -> &SigningKey {
        &self.signing
    }

    /// An ed25519 signature over `msg`.
    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        self.signing.sign(msg).to_bytes()
    }
}

impl fmt::Debug for Keypair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Keypair({})", self.public.short())
    }
}

/// Where a node is and who it is: `KEY@HOST:PORT`.
///
/// HOST is a DNS name, an IPv4 address, or an IPv6 address in brackets.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct NodeAddr {
    /// The node's identity.
    pub key: PublicKey,
    /// Host name or address, without brackets.
    pub host: String,
    /// UDP port.
    pub port: u16,
}

impl NodeAddr {
    /// `host:port` as a socket address string, brackets restored for IPv6.
    pub fn host_port(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Display for NodeAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.key, self.host_port())
    }
}

impl FromStr for NodeAddr {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        let s = s.trim();
        let (key, rest) = s
            .split_once('@')
            .ok_or_else(|| KeyError::Address(format!("no '@' in {s:?}")))?;
        let key: PublicKey = key.parse()?;
        let (host, port) = if let Some(r) = rest.strip_prefix('[') {
            let (h, p) = r
                .split_once("]:")
                .ok_or_else(|| KeyError::Address(format!("bad IPv6 host in {rest:?}")))?;
            (h, p)
        } else {
            rest.rsplit_once(':')
                .ok_or_else(|| KeyError::Address(format!("no ':PORT' in {rest:?}")))?
        };
        if host.is_empty()
            || host.contains(['@', '/', ' '])
            || (host.contains(':') && !rest.starts_with('['))
        {
            return Err(KeyError::Address(format!("bad host {host:?}")));
        }
        let port: u16 = port
            .parse()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| KeyError::Address(format!("bad port {port:?}")))?;
        Ok(NodeAddr {
            key,
            host: host.to_owned(),
            port,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printable_key_round_trips_and_is_52_lowercase_chars() {
        let k = Keypair::from_secret_bytes(&[9; 32]).public();
        let s = k.to_string();
        assert_eq!(s.len(), PRINTABLE_KEY_LEN);
        assert!(
            s.chars()
                .all(|c| c.is_ascii_lowercase() || ('2'..='7').contains(&c))
        );
        assert_eq!(s.parse::<PublicKey>().unwrap(), k);
        assert_eq!(s.to_uppercase().parse::<PublicKey>().unwrap(), k);
    }

    #[test]
    fn bad_printable_keys_are_refused() {
        let k = Keypair::from_secret_bytes(&[9; 32]).public().to_string();
        assert!(k[..51].parse::<PublicKey>().is_err());
        assert!(format!("{k}a").parse::<PublicKey>().is_err());
        let mut bad = k.clone();
        bad.replace_range(0..1, "1");
        assert!(bad.parse::<PublicKey>().is_err());
        assert!("".parse::<PublicKey>().is_err());
    }

    #[test]
    fn node_addresses_parse() {
        let k = Keypair::from_secret_bytes(&[3; 32]).public();
        let a: NodeAddr = format!("{k}@127.0.0.1:4433").parse().unwrap();
        assert_eq!((a.key, a.host.as_str(), a.port), (k, "127.0.0.1", 4433));
        assert_eq!(a.to_string(), format!("{k}@127.0.0.1:4433"));
        let b: NodeAddr = format!("{k}@[::1]:9").parse().unwrap();
        assert_eq!(b.host, "::1");
        assert_eq!(b.host_port(), "[::1]:9");
        let c: NodeAddr = format!("{k}@relay.example.org:1").parse().unwrap();
        assert_eq!(c.host, "relay.example.org");
        for bad in [
            format!("{k}127.0.0.1:4433"),
            format!("{k}@127.0.0.1"),
            format!("{k}@127.0.0.1:0"),
            format!("{k}@127.0.0.1:70000"),
            format!("{k}@:4433"),
            format!("{k}@::1:4433"),
            "abc@127.0.0.1:1".to_string(),
        ] {
            assert!(bad.parse::<NodeAddr>().is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn signatures_verify_with_the_public_key() {
        let kp = Keypair::from_secret_bytes(&[5; 32]);
        let sig = kp.sign(b"hello");
        let vk = kp.public().verifying_key().unwrap();
        let sig = ed25519_dalek::Signature::from_bytes(&sig);
        assert!(vk.verify_strict(b"hello", &sig).is_ok());
        assert!(vk.verify_strict(b"hellp", &sig).is_err());
    }
}
