//! Cell messages: the owned [`Message`] a sender builds, and the zero-copy
//! [`Envelope`] a relay parses and forwards.
//!
//! Layout (little-endian; see docs/PROTOCOL.md):
//!
//! ```text
//! off  len  field
//!   0    1  ttl (hops left; the only field outside the authenticated bytes)
//!   1    1  version = 1
//!   2    1  kind          0 data, 1 ack
//!   3    1  flags         bit0 durable, bit1 trace, others 0
//!   4    1  lane          0 control, 1 high, 2 normal, 3 bulk
//!   5    1  auth          0 none, 1 ed25519 signature (64 B), 2 AEAD tag (16 B)
//!   6    1  dest kind     0 cell, 1 broadcast, 2 service
//!   7    1  dest len      32 / 0 / 1..=64
//!   8    4  payload len
//!  12   32  source key
//!  44    8  timestamp, ms since the Unix epoch
//!  52    8  nonce
//!  60    D  destination
//! 60+D   P  payload
//!  ...   A  authenticator
//! ```
//!
//! The authenticated bytes are `[1, 60+D+P)`: contiguous, so a signature is
//! checked without copying and many can be batch-verified, and TTL sits
//! outside them so a relay can lower it without breaking a signature or
//! changing the id.

use crate::error::{DecodeError, VerifyError};
use crate::key::{Keypair, PublicKey};
use crate::limits::Limits;
use crate::wire::{le_u32, le_u64, split_front};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use std::fmt;

/// The message format version this build speaks.
pub const VERSION: u8 = 1;
/// Bytes before the destination.
pub const HEADER_LEN: usize = 60;
/// Longest service name, in bytes.
pub const MAX_SERVICE_NAME: usize = 64;
/// Default hop budget of a new message.
pub const DEFAULT_TTL: u8 = 16;
/// Length of an ed25519 signature authenticator.
pub const SIGNATURE_LEN: usize = 64;
/// Length of an AEAD tag authenticator.
pub const AEAD_TAG_LEN: usize = 16;

/// Where the authenticator starts and where the message ends, read from
/// the header of an encoded message at the front of `buf`. Only the length
/// fields are read, nothing is checked: for messages this node encoded
/// itself (parse anything else with [`Envelope::parse`]). `None` if the
/// header is incomplete or names an unknown authenticator.
pub fn encoded_layout(buf: &[u8]) -> Option<(usize, usize)> {
    let h = buf.get(..HEADER_LEN)?;
    let auth_len = match h[OFF_AUTH] {
        0 => 0,
        1 => SIGNATURE_LEN,
        2 => AEAD_TAG_LEN,
        _ => return None,
    };
    let auth_start = HEADER_LEN + h[OFF_DEST_LEN] as usize + le_u32(h, OFF_PAYLOAD_LEN) as usize;
    Some((auth_start, auth_start + auth_len))
}

const OFF_VERSION: usize = 1;
const OFF_KIND: usize = 2;
const OFF_FLAGS: usize = 3;
const OFF_LANE: usize = 4;
const OFF_AUTH: usize = 5;
const OFF_DEST_KIND: usize = 6;
const OFF_DEST_LEN: usize = 7;
const OFF_PAYLOAD_LEN: usize = 8;
const OFF_SOURCE: usize = 12;
const OFF_TIMESTAMP: usize = 44;
const OFF_NONCE: usize = 52;

const FLAG_DURABLE: u8 = 1;
const FLAG_TRACE: u8 = 2;
const FLAGS_KNOWN: u8 = FLAG_DURABLE | FLAG_TRACE;

/// A priority lane. Lower numbers are served first; every lane gets a
/// weighted share so none starves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Lane {
    /// Link and presence control; served first.
    Control = 0,
    /// Latency-sensitive application traffic.
    High = 1,
    /// The default lane.
    Normal = 2,
    /// Bulk transfers; served last but never starved.
    Bulk = 3,
}

impl Lane {
    /// All lanes, highest priority first.
    pub const ALL: [Lane; 4] = [Lane::Control, Lane::High, Lane::Normal, Lane::Bulk];

    /// The lane with wire value `v`.
    pub fn from_u8(v: u8) -> Result<Self, DecodeError> {
        match v {
            0 => Ok(Lane::Control),
            1 => Ok(Lane::High),
            2 => Ok(Lane::Normal),
            3 => Ok(Lane::Bulk),
            _ => Err(DecodeError::Invalid {
                field: "lane",
                value: v as u64,
            }),
        }
    }

    /// The lane's index, 0 (control) to 3 (bulk).
    pub fn index(self) -> usize {
        self as usize
    }

    /// Lower-case name, as in configs and the command line.
    pub fn name(self) -> &'static str {
        match self {
            Lane::Control => "control",
            Lane::High => "high",
            Lane::Normal => "normal",
            Lane::Bulk => "bulk",
        }
    }
}

impl std::str::FromStr for Lane {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Lane::ALL
            .into_iter()
            .find(|l| l.name() == s)
            .ok_or_else(|| format!("unknown lane {s:?}; use control, high, normal or bulk"))
    }
}

impl fmt::Display for Lane {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a message is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    /// Application data.
    Data = 0,
    /// An acknowledgement of durable messages; the payload is their 16-byte ids.
    Ack = 1,
}

impl Kind {
    fn from_u8(v: u8) -> Result<Self, DecodeError> {
        match v {
            0 => Ok(Kind::Data),
            1 => Ok(Kind::Ack),
            _ => Err(DecodeError::Invalid {
                field: "kind",
                value: v as u64,
            }),
        }
    }
}

/// Delivery guarantee a sender asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Qos {
    /// Dropped (and counted) when a queue is full or the destination away.
    #[default]
    BestEffort,
    /// Stored on disk until the next hop acknowledges it.
    Durable,
}

/// A service name: 1 to 64 bytes of UTF-8.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceName(String);

impl ServiceName {
    /// A service name, if `s` is 1..=64 bytes with no control characters.
    pub fn new(s: impl Into<String>) -> Result<Self, DecodeError> {
        let s = s.into();
        if s.is_empty() || s.len() > MAX_SERVICE_NAME {
            return Err(DecodeError::TooLarge {
                what: "service name length",
                got: s.len(),
                limit: MAX_SERVICE_NAME,
            });
        }
        if s.chars().any(char::is_control) {
            return Err(DecodeError::Utf8("service name"));
        }
        Ok(Self(s))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a message goes.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Destination {
    /// One cell.
    Cell(PublicKey),
    /// Every attached cell.
    Broadcast,
    /// Every cell that announced this service.
    Service(ServiceName),
}

impl Destination {
    fn kind_and_len(&self) -> (u8, usize) {
        match self {
            Destination::Cell(_) => (0, 32),
            Destination::Broadcast => (1, 0),
            Destination::Service(s) => (2, s.0.len()),
        }
    }
}

/// What proves a message's origin and integrity.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub enum Authenticator {
    /// None: the cell trusts the mesh (the ingress relay proved the link's key).
    None,
    /// An ed25519 signature by the source over the authenticated bytes.
    Signature([u8; SIGNATURE_LEN]),
    /// The tag of an end-to-end AEAD covering the same bytes.
    AeadTag([u8; AEAD_TAG_LEN]),
}

impl Authenticator {
    fn code_and_len(&self) -> (u8, usize) {
        match self {
            Authenticator::None => (0, 0),
            Authenticator::Signature(_) => (1, SIGNATURE_LEN),
            Authenticator::AeadTag(_) => (2, AEAD_TAG_LEN),
        }
    }

    fn bytes(&self) -> &[u8] {
        match self {
            Authenticator::None => &[],
            Authenticator::Signature(s) => s,
            Authenticator::AeadTag(t) => t,
        }
    }
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Authenticator::None => f.write_str("None"),
            Authenticator::Signature(_) => f.write_str("Signature(..)"),
            Authenticator::AeadTag(_) => f.write_str("AeadTag(..)"),
        }
    }
}

/// A message's identity: xxh3-128 of its authenticated bytes; the dedup and
/// replay key.
///
/// Why xxh3-128 and not a cryptographic hash: it runs at tens of GB/s, so
/// the relay can afford it on every message (BLAKE3 costs several times
/// more on 100–300 byte inputs), and 128 bits make accidental collisions
/// negligible. Collisions an attacker builds buy nothing: the id covers the
/// source key and the relay accepts a cell's messages only under its own
/// key, so a sender can only collide with its own messages, and colliding
/// with a message it has not seen would need a second preimage of bytes
/// (nonce, timestamp) it does not know.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId(pub [u8; 16]);

impl MessageId {
    /// The id of these authenticated bytes.
    pub fn of(authenticated: &[u8]) -> Self {
        MessageId(xxhash_rust::xxh3::xxh3_128(authenticated).to_le_bytes())
    }

    /// The id as a number, for hash tables.
    pub fn as_u128(&self) -> u128 {
        u128::from_le_bytes(self.0)
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({self})")
    }
}

/// A cell message as a sender builds it or a receiver reads it.
///
/// The payload is a [`Bytes`]: decoding shares the frame's buffer instead of
/// copying it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// Hops left before a relay drops it.
    pub ttl: u8,
    /// What it is.
    pub kind: Kind,
    /// Delivery guarantee.
    pub qos: Qos,
    /// Whether each hop reports it (traceroute).
    pub trace: bool,
    /// Priority lane.
    pub lane: Lane,
    /// Who sent it.
    pub source: PublicKey,
    /// Where it goes.
    pub destination: Destination,
    /// When it was sent, in ms since the Unix epoch (sender's clock).
    pub timestamp_ms: u64,
    /// Makes otherwise equal messages distinct.
    pub nonce: u64,
    /// Opaque application bytes (sealed when the sender chose so).
    pub payload: Bytes,
    /// What proves origin and integrity.
    pub auth: Authenticator,
}

impl Message {
    /// A data message on the normal lane, best effort, unsigned, with the
    /// default TTL, timestamp 0 and nonce 0: set those with the `with_` methods.
    pub fn new(source: PublicKey, destination: Destination, payload: Bytes) -> Self {
        Self {
            ttl: DEFAULT_TTL,
            kind: Kind::Data,
            qos: Qos::BestEffort,
            trace: false,
            lane: Lane::Normal,
            source,
            destination,
            timestamp_ms: 0,
            nonce: 0,
            payload,
            auth: Authenticator::None,
        }
    }

    /// Sets the lane.
    pub fn with_lane(mut self, lane: Lane) -> Self {
        self.lane = lane;
        self
    }

    /// Sets the timestamp (ms since the Unix epoch).
    pub fn with_timestamp(mut self, ms: u64) -> Self {
        self.timestamp_ms = ms;
        self
    }

    /// Sets the nonce.
    pub fn with_nonce(mut self, nonce: u64) -> Self {
        self.nonce = nonce;
        self
    }

    /// Sets the delivery guarantee.
    pub fn with_qos(mut self, qos: Qos) -> Self {
        self.qos = qos;
        self
    }

    /// Sets the hop budget.
    pub fn with_ttl(mut self, ttl: u8) -> Self {
        self.ttl = ttl;
        self
    }

    /// Length of the encoding, in bytes.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN
            + self.destination.kind_and_len().1
            + self.payload.len()
            + self.auth.code_and_len().1
    }

    /// Appends the encoding, with the authenticator the message holds.
    ///
    /// # Panics
    /// If the payload is over 4 GiB (a caller bug; limits are far below).
    pub fn encode(&self, out: &mut BytesMut) {
        self.encode_body(self.auth.code_and_len().0, out);
        out.put_slice(self.auth.bytes());
    }

    /// Appends the encoding, signed by `key` (which should be the source's),
    /// without an intermediate copy: the signature is computed over the
    /// bytes just written.
    pub fn encode_signed(&self, key: &Keypair, out: &mut BytesMut) {
        let start = out.len();
        self.encode_body(1, out);
        let sig = key.sign(&out[start + 1..]);
        out.put_slice(&sig);
    }

    /// Signs the message in place with `key`.
    pub fn sign(&mut self, key: &Keypair) {
        let mut buf = BytesMut::with_capacity(self.encoded_len() + SIGNATURE_LEN);
        self.encode_body(1, &mut buf);
        self.auth = Authenticator::Signature(key.sign(&buf[1..]));
    }

    /// The authenticated bytes (everything but TTL and authenticator); what a
    /// signature or AEAD tag covers.
    pub fn authenticated_bytes(&self) -> Bytes {
        let mut buf = BytesMut::with_capacity(self.encoded_len());
        self.encode_body(self.auth.code_and_len().0, &mut buf);
        buf.split_off(1).freeze()
    }

    /// The id of this message.
    pub fn id(&self) -> MessageId {
        MessageId::of(&self.authenticated_bytes())
    }

    fn encode_body(&self, auth_code: u8, out: &mut BytesMut) {
        let (dest_kind, dest_len) = self.destination.kind_and_len();
        let payload_len =
            u32::try_from(self.payload.len()).expect("payload under 4 GiB (bounded by Limits)");
        out.reserve(HEADER_LEN + dest_len + self.payload.len() + SIGNATURE_LEN);
        let flags = match self.qos {
            Qos::BestEffort => 0,
            Qos::Durable => FLAG_DURABLE,
        } | if self.trace { FLAG_TRACE } else { 0 };
        out.put_slice(&[
            self.ttl,
            VERSION,
            self.kind as u8,
            flags,
            self.lane as u8,
            auth_code,
            dest_kind,
            dest_len as u8,
        ]);
        out.put_u32_le(payload_len);
        out.put_slice(&self.source.0);
        out.put_u64_le(self.timestamp_ms);
        out.put_u64_le(self.nonce);
        match &self.destination {
            Destination::Cell(k) => out.put_slice(&k.0),
            Destination::Broadcast => {}
            Destination::Service(s) => out.put_slice(s.0.as_bytes()),
        }
        out.put_slice(&self.payload);
    }

    /// Decodes one message that fills `buf` exactly.
    pub fn decode(buf: Bytes, limits: &Limits) -> Result<Message, DecodeError> {
        let mut b = buf;
        let env = Envelope::parse(&mut b, limits)?;
        if !b.is_empty() {
            return Err(DecodeError::Trailing(b.len()));
        }
        Ok(env.to_message())
    }
}

/// A validated, encoded message: a view over shared bytes with accessors at
/// fixed offsets. This is what a relay routes and forwards; it never copies
/// the payload.
///
/// Its TTL is held apart from the bytes, because TTL is the one field that
/// changes on the way: a message decoded from a batch that relays forwarded
/// whole has its TTL byte minus the batch's hops
/// ([`BatchFrame::hops`](crate::BatchFrame::hops)), and a relay lowers it
/// again with [`with_ttl`](Self::with_ttl) without touching the bytes.
/// Whoever re-encodes an envelope writes [`ttl`](Self::ttl), not the byte
/// (as [`BatchEncoder::push_envelope`](crate::BatchEncoder::push_envelope)
/// does).
#[derive(Clone, PartialEq, Eq)]
pub struct Envelope {
    raw: Bytes,
    /// End of the authenticated bytes (start of the authenticator).
    auth_start: u32,
    /// Hops left: the TTL byte, less what was taken since it was written.
    ttl: u8,
}

impl Envelope {
    /// Splits one message off the front of `buf`, checking every field and
    /// bound; on error `buf` may be partly consumed and should be dropped.
    pub fn parse(buf: &mut Bytes, limits: &Limits) -> Result<Envelope, DecodeError> {
        let h = buf
            .get(..HEADER_LEN)
            .ok_or_else(|| DecodeError::Truncated {
                needed: HEADER_LEN - buf.len(),
            })?;
        if h[OFF_VERSION] != VERSION {
            return Err(DecodeError::Version(h[OFF_VERSION]));
        }
        Kind::from_u8(h[OFF_KIND])?;
        if h[OFF_FLAGS] & !FLAGS_KNOWN != 0 {
            return Err(DecodeError::Invalid {
                field: "flags",
                value: h[OFF_FLAGS] as u64,
            });
        }
        Lane::from_u8(h[OFF_LANE])?;
        let auth_len = match h[OFF_AUTH] {
            0 => 0,
            1 => SIGNATURE_LEN,
            2 => AEAD_TAG_LEN,
            v => {
                return Err(DecodeError::Invalid {
                    field: "auth",
                    value: v as u64,
                });
            }
        };
        let dest_len = h[OFF_DEST_LEN] as usize;
        let ok_len = match h[OFF_DEST_KIND] {
            0 => dest_len == 32,
            1 => dest_len == 0,
            2 => (1..=MAX_SERVICE_NAME).contains(&dest_len),
            v => {
                return Err(DecodeError::Invalid {
                    field: "destination kind",
                    value: v as u64,
                });
            }
        };
        if !ok_len {
            return Err(DecodeError::Invalid {
                field: "destination length",
                value: dest_len as u64,
            });
        }
        let payload_len = le_u32(h, OFF_PAYLOAD_LEN) as usize;
        let limit = limits.max_payload.min(Limits::MAX_PAYLOAD_CAP);
        if payload_len > limit {
            return Err(DecodeError::TooLarge {
                what: "payload",
                got: payload_len,
                limit,
            });
        }
        let auth_start = HEADER_LEN + dest_len + payload_len;
        let total = auth_start + auth_len;
        if buf.len() < total {
            return Err(DecodeError::Truncated {
                needed: total - buf.len(),
            });
        }
        if h[OFF_DEST_KIND] == 2 {
            let name = &buf[HEADER_LEN..HEADER_LEN + dest_len];
            match std::str::from_utf8(name) {
                Ok(s) if !s.chars().any(char::is_control) => {}
                _ => return Err(DecodeError::Utf8("service name")),
            }
        }
        let ttl = h[0];
        let raw = split_front(buf, total)?;
        Ok(Envelope {
            raw,
            auth_start: auth_start as u32,
            ttl,
        })
    }

    /// The whole encoding, as it arrived. Its first byte is the TTL the
    /// message was last encoded with, which can be more than
    /// [`ttl`](Self::ttl): to re-encode the message, write `ttl()` and then
    /// `raw()[1..]`.
    pub fn raw(&self) -> &Bytes {
        &self.raw
    }

    /// Encoded length.
    pub fn len(&self) -> usize {
        self.raw.len()
    }

    /// Never true: an envelope holds at least its header. Present for clippy's
    /// `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        self.raw.is_empty()
    }

    /// Hops left: what a relay checks and lowers (docs/PROTOCOL.md 3.6).
    pub fn ttl(&self) -> u8 {
        self.ttl
    }

    /// The same message with `ttl` hops left; its bytes are shared, not
    /// copied or changed.
    #[must_use]
    pub fn with_ttl(mut self, ttl: u8) -> Envelope {
        self.ttl = ttl;
        self
    }

    /// What it is.
    pub fn kind(&self) -> Kind {
        Kind::from_u8(self.raw[OFF_KIND]).unwrap_or(Kind::Data)
    }

    /// Delivery guarantee.
    pub fn qos(&self) -> Qos {
        if self.raw[OFF_FLAGS] & FLAG_DURABLE != 0 {
            Qos::Durable
        } else {
            Qos::BestEffort
        }
    }

    /// Whether each hop reports it.
    pub fn trace(&self) -> bool {
        self.raw[OFF_FLAGS] & FLAG_TRACE != 0
    }

    /// Priority lane.
    pub fn lane(&self) -> Lane {
        // Checked in parse.
        Lane::from_u8(self.raw[OFF_LANE]).unwrap_or(Lane::Bulk)
    }

    /// Who sent it.
    pub fn source(&self) -> PublicKey {
        let mut k = [0u8; 32];
        k.copy_from_slice(&self.raw[OFF_SOURCE..OFF_SOURCE + 32]);
        PublicKey(k)
    }

    /// Sender's timestamp, ms since the Unix epoch.
    pub fn timestamp_ms(&self) -> u64 {
        le_u64(&self.raw, OFF_TIMESTAMP)
    }

    /// The nonce.
    pub fn nonce(&self) -> u64 {
        le_u64(&self.raw, OFF_NONCE)
    }

    fn dest_len(&self) -> usize {
        self.raw[OFF_DEST_LEN] as usize
    }

    /// The destination key if the message goes to one cell; no allocation.
    pub fn dest_cell(&self) -> Option<PublicKey> {
        (self.raw[OFF_DEST_KIND] == 0).then(|| {
            let mut k = [0u8; 32];
            k.copy_from_slice(&self.raw[HEADER_LEN..HEADER_LEN + 32]);
            PublicKey(k)
        })
    }

    /// The destination.
    pub fn destination(&self) -> Destination {
        match self.raw[OFF_DEST_KIND] {
            0 => Destination::Cell(self.dest_cell().unwrap_or(PublicKey([0; 32]))),
            1 => Destination::Broadcast,
            _ => {
                let name = &self.raw[HEADER_LEN..HEADER_LEN + self.dest_len()];
                // UTF-8 was checked in parse.
                Destination::Service(ServiceName(String::from_utf8_lossy(name).into_owned()))
            }
        }
    }

    /// The payload, sharing the envelope's buffer.
    pub fn payload(&self) -> Bytes {
        self.raw
            .slice(HEADER_LEN + self.dest_len()..self.auth_start as usize)
    }

    /// The payload, keeping the envelope's buffer but not the envelope:
    /// unlike [`payload`](Self::payload), no reference count is touched.
    pub fn into_payload(self) -> Bytes {
        let start = HEADER_LEN + self.dest_len();
        let mut raw = self.raw;
        raw.truncate(self.auth_start as usize);
        raw.advance(start);
        raw
    }

    /// The authenticated bytes: everything but TTL and authenticator.
    pub fn authenticated_bytes(&self) -> &[u8] {
        &self.raw[1..self.auth_start as usize]
    }

    /// The authenticator.
    pub fn authenticator(&self) -> Authenticator {
        let a = &self.raw[self.auth_start as usize..];
        match a.len() {
            SIGNATURE_LEN => {
                let mut s = [0u8; SIGNATURE_LEN];
                s.copy_from_slice(a);
                Authenticator::Signature(s)
            }
            AEAD_TAG_LEN => {
                let mut t = [0u8; AEAD_TAG_LEN];
                t.copy_from_slice(a);
                Authenticator::AeadTag(t)
            }
            _ => Authenticator::None,
        }
    }

    /// The message id.
    pub fn id(&self) -> MessageId {
        MessageId::of(self.authenticated_bytes())
    }

    /// Checks the ed25519 signature against the source key.
    pub fn verify(&self) -> Result<(), VerifyError> {
        match self.authenticator() {
            Authenticator::None => Err(VerifyError::Unsigned),
            Authenticator::AeadTag(_) => Err(VerifyError::Sealed),
            Authenticator::Signature(sig) => {
                let vk = self
                    .source()
                    .verifying_key()
                    .map_err(|_| VerifyError::BadKey)?;
                vk.verify_strict(
                    self.authenticated_bytes(),
                    &ed25519_dalek::Signature::from_bytes(&sig),
                )
                .map_err(|_| VerifyError::BadSignature)
            }
        }
    }

    /// The owned message, sharing the payload bytes.
    pub fn to_message(&self) -> Message {
        Message {
            ttl: self.ttl(),
            kind: self.kind(),
            qos: self.qos(),
            trace: self.trace(),
            lane: self.lane(),
            source: self.source(),
            destination: self.destination(),
            timestamp_ms: self.timestamp_ms(),
            nonce: self.nonce(),
            payload: self.payload(),
            auth: self.authenticator(),
        }
    }
}

impl fmt::Debug for Envelope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Envelope")
            .field("source", &self.source())
            .field("destination", &self.destination())
            .field("lane", &self.lane())
            .field("ttl", &self.ttl)
            .field("len", &self.raw.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (Keypair, Message) {
        let a = Keypair::from_secret_bytes(&[1; 32]);
        let b = Keypair::from_secret_bytes(&[2; 32]);
        let m = Message::new(
            a.public(),
            Destination::Cell(b.public()),
            Bytes::from_static(b"payload"),
        )
        .with_lane(Lane::Bulk)
        .with_timestamp(1_700_000_000_123)
        .with_nonce(42);
        (a, m)
    }

    #[test]
    fn round_trip_unsigned_and_signed() {
        let (a, m) = sample();
        let mut buf = BytesMut::new();
        m.encode(&mut buf);
        assert_eq!(buf.len(), m.encoded_len());
        assert_eq!(
            Message::decode(buf.freeze(), &Limits::default()).unwrap(),
            m
        );

        let mut signed = m.clone();
        signed.sign(&a);
        let mut buf = BytesMut::new();
        m.encode_signed(&a, &mut buf);
        let back = Message::decode(buf.clone().freeze(), &Limits::default()).unwrap();
        assert_eq!(back, signed);
        let env = Envelope::parse(&mut buf.freeze(), &Limits::default()).unwrap();
        env.verify().unwrap();
        assert_eq!(env.id(), signed.id());
    }

    #[test]
    fn ttl_is_not_authenticated() {
        let (a, m) = sample();
        let mut buf = BytesMut::new();
        m.encode_signed(&a, &mut buf);
        let id = Envelope::parse(&mut buf.clone().freeze(), &Limits::default())
            .unwrap()
            .id();
        buf[0] = 3;
        let env = Envelope::parse(&mut buf.freeze(), &Limits::default()).unwrap();
        assert_eq!(env.ttl(), 3);
        env.verify().unwrap();
        assert_eq!(env.id(), id);
        // Lowered without touching the bytes, it is still the same message.
        let lower = env.clone().with_ttl(1);
        assert_eq!((lower.ttl(), lower.raw()), (1, env.raw()));
        lower.verify().unwrap();
        assert_eq!(lower.id(), id);
        assert_eq!(lower.to_message().ttl, 1);
    }

    #[test]
    fn service_and_broadcast_destinations() {
        let (_, m) = sample();
        for d in [
            Destination::Broadcast,
            Destination::Service(ServiceName::new("chat/v1").unwrap()),
        ] {
            let m = Message {
                destination: d,
                ..m.clone()
            };
            let mut buf = BytesMut::new();
            m.encode(&mut buf);
            assert_eq!(
                Message::decode(buf.freeze(), &Limits::default()).unwrap(),
                m
            );
        }
        assert!(ServiceName::new("").is_err());
        assert!(ServiceName::new("x".repeat(65)).is_err());
        assert!(ServiceName::new("a\nb").is_err());
    }

    #[test]
    fn oversize_payload_is_refused_before_reading_it() {
        let (_, m) = sample();
        let mut buf = BytesMut::new();
        m.encode(&mut buf);
        let limits = Limits {
            max_payload: 4,
            ..Limits::default()
        };
        assert!(matches!(
            Message::decode(buf.freeze(), &limits),
            Err(DecodeError::TooLarge {
                what: "payload",
                got: 7,
                limit: 4
            })
        ));
    }
}
