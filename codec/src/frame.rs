//! Link frames: the length-prefixed units on a QUIC stream.
//!
//! ```text
//! u32  length of what follows (type + body), at most Limits::max_frame
//! u8   frame type
//! ...  body
//! ```
//!
//! Data travels in [`Frame::Batch`] frames, one unidirectional stream per
//! lane. Everything else is control and travels on the link's first
//! bidirectional stream, which starts with [`Frame::Hello`] from the
//! connecting side and [`Frame::Welcome`] (or [`Frame::Close`]) in reply.

use crate::batch::BatchFrame;
use crate::error::DecodeError;
use crate::key::PublicKey;
use crate::limits::Limits;
use crate::mesh::MeshFrame;
use crate::message::{Lane, MAX_SERVICE_NAME, MessageId, ServiceName};
use crate::wire::Reader;
use bytes::{BufMut, Bytes, BytesMut};

/// Link protocol version carried in Hello and Welcome.
pub const PROTOCOL_VERSION: u16 = 1;
/// Bytes of the length prefix.
pub const LEN_PREFIX: usize = 4;
/// Longest agent or application version string.
pub const MAX_AGENT: usize = 64;
/// Longest human-readable reason or detail.
pub const MAX_REASON: usize = 1024;
/// Hello flag: send me notices about my messages.
const HELLO_NOTICES: u8 = 1;
/// Most entries in one discovery reply.
pub const MAX_DISCOVER_ENTRIES: usize = 4096;
/// Most message ids in one [`Frame::DurableAck`].
pub const MAX_DURABLE_ACK_IDS: usize = 1024;

/// The frame type byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameType {
    /// Messages of one lane.
    Batch = 0x01,
    /// First frame of a link, from the connecting side.
    Hello = 0x02,
    /// The accepting side's answer to Hello.
    Welcome = 0x03,
    /// Closing or refusing a link, with a reason.
    Close = 0x04,
    /// A cell states its services and version.
    Announce = 0x05,
    /// Who offers a service?
    Discover = 0x06,
    /// The answer to Discover.
    DiscoverReply = 0x07,
    /// Subscribe to (or stop) presence changes.
    WatchPresence = 0x08,
    /// A cell attached or detached.
    Presence = 0x09,
    /// Messages the relay dropped, with why and how many.
    Notice = 0x0A,
    /// Relay to relay: liveness probe ([`MeshFrame::Ping`]).
    Ping = 0x0B,
    /// Relay to relay: its answer ([`MeshFrame::Pong`]).
    Pong = 0x0C,
    /// Relay to relay: a relay's links, flooded ([`MeshFrame::LinkState`]).
    LinkState = 0x0D,
    /// Relay to relay: credit on a lane ([`MeshFrame::Credit`]).
    Credit = 0x0E,
    /// Relay to relay, routed: where a cell is ([`MeshFrame::Route`]).
    Route = 0x0F,
    /// Relay to relay, routed: where is a cell? ([`MeshFrame::Lookup`]).
    Lookup = 0x10,
    /// Relay to relay, routed: the answer ([`MeshFrame::LookupReply`]).
    LookupReply = 0x11,
    /// Relay to relay (and to a traced message's source cell): one hop of
    /// a traced message ([`MeshFrame::Trace`]).
    Trace = 0x12,
    /// Durable messages stored, received, refused or expired, by id.
    DurableAck = 0x20,
}

impl FrameType {
    fn from_u8(v: u8) -> Result<Self, DecodeError> {
        use FrameType::*;
        Ok(match v {
            0x01 => Batch,
            0x02 => Hello,
            0x03 => Welcome,
            0x04 => Close,
            0x05 => Announce,
            0x06 => Discover,
            0x07 => DiscoverReply,
            0x08 => WatchPresence,
            0x09 => Presence,
            0x0A => Notice,
            0x0B => Ping,
            0x0C => Pong,
            0x0D => LinkState,
            0x0E => Credit,
            0x0F => Route,
            0x10 => Lookup,
            0x11 => LookupReply,
            0x12 => Trace,
            0x20 => DurableAck,
            _ => {
                return Err(DecodeError::Invalid {
                    field: "frame type",
                    value: v as u64,
                });
            }
        })
    }
}

/// What a [`Frame::DurableAck`] says of its messages (PROTOCOL.md 4.12).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum DurableStatus {
    /// From a relay: logged and synced, the relay answers for them now.
    /// From a cell: its application has them; the relay may forget them.
    Acked = 0,
    /// Refused: the relay's durable log is full (`storage.max_bytes`).
    /// Nothing was stored; best-effort traffic still flows.
    Full = 1,
    /// Dropped unacknowledged: their time to live ran out before the
    /// destination took them.
    Expired = 2,
    /// Refused: the relay could not store them (its log failed).
    Failed = 3,
}

impl DurableStatus {
    fn from_u8(v: u8) -> Result<Self, DecodeError> {
        Ok(match v {
            0 => Self::Acked,
            1 => Self::Full,
            2 => Self::Expired,
            3 => Self::Failed,
            _ => {
                return Err(DecodeError::Invalid {
                    field: "durable status",
                    value: v as u64,
                });
            }
        })
    }

    /// Its name, for logs and error messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::Acked => "acked",
            Self::Full => "refused: the relay's durable log is full (storage.max_bytes)",
            Self::Expired => "expired before the destination took it",
            Self::Failed => "refused: the relay could not store it",
        }
    }
}

/// What kind of node opens a link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Role {
    /// An application node.
    Cell = 0,
    /// A peer relay.
    Relay = 1,
}

/// Why a link is closed or refused. Also used as the QUIC application close
/// code, so a peer that never read the Close frame still learns why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum CloseCode {
    /// Orderly close.
    Normal = 0,
    /// The peer speaks a protocol version this node does not.
    Version = 1,
    /// The peer's key is not allowed here.
    Unauthorized = 2,
    /// A message claimed a source other than the link's key.
    ForgedSource = 3,
    /// A frame or message was over its bound.
    Oversize = 4,
    /// Bytes that do not decode.
    Malformed = 5,
    /// The node has as many links as it allows.
    TooManyLinks = 6,
    /// The node is shutting down.
    Shutdown = 7,
    /// The link sent faster than it is allowed to.
    RateLimited = 8,
    /// The link was silent past its idle timeout.
    Idle = 9,
    /// Messages with bad signatures.
    BadSignature = 10,
}

impl CloseCode {
    /// The code with wire value `v`; unknown values read as `Malformed`.
    pub fn from_u16(v: u16) -> Self {
        use CloseCode::*;
        [
            Normal,
            Version,
            Unauthorized,
            ForgedSource,
            Oversize,
            Malformed,
            TooManyLinks,
            Shutdown,
            RateLimited,
            Idle,
            BadSignature,
        ]
        .into_iter()
        .find(|c| *c as u16 == v)
        .unwrap_or(Malformed)
    }
}

/// Why a relay reports messages it dropped; each is a drop the sender can
/// cause or be told about. Duplicates (replays, retransmits) are dropped
/// silently: a copy of a message that already passed is not the sender's
/// loss.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u16)]
pub enum NoticeCode {
    /// No cell with that key is attached to the relay.
    UnknownDestination = 1,
    /// The receiver reads too slowly; best-effort messages found its queue
    /// full and were dropped.
    DroppedSlowReceiver = 2,
    /// The timestamp is older than the relay's window.
    Expired = 3,
    /// The message ran out of hops.
    TtlExpired = 4,
    /// The timestamp is further in the future than the relay's window.
    FromFuture = 5,
    /// The signature did not verify (a relay that verifies every message).
    BadSignature = 6,
    /// The receiver's link was closing (it left, or the relay is stopping).
    ReceiverClosing = 7,
}

impl NoticeCode {
    /// Every code, in wire order.
    pub const ALL: [NoticeCode; 7] = [
        NoticeCode::UnknownDestination,
        NoticeCode::DroppedSlowReceiver,
        NoticeCode::Expired,
        NoticeCode::TtlExpired,
        NoticeCode::FromFuture,
        NoticeCode::BadSignature,
        NoticeCode::ReceiverClosing,
    ];

    fn from_u16(v: u16) -> Result<Self, DecodeError> {
        Self::ALL
            .into_iter()
            .find(|c| *c as u16 == v)
            .ok_or(DecodeError::Invalid {
                field: "notice code",
                value: v as u64,
            })
    }

    /// A snake_case name, for metric labels and logs.
    pub const fn as_str(self) -> &'static str {
        match self {
            NoticeCode::UnknownDestination => "unknown_destination",
            NoticeCode::DroppedSlowReceiver => "slow_receiver",
            NoticeCode::Expired => "expired",
            NoticeCode::TtlExpired => "ttl_expired",
            NoticeCode::FromFuture => "from_future",
            NoticeCode::BadSignature => "bad_signature",
            NoticeCode::ReceiverClosing => "receiver_closing",
        }
    }

    /// Why the messages were not delivered, for people: it completes "N
    /// messages to KEY were not delivered: ...".
    pub const fn describe(self) -> &'static str {
        match self {
            NoticeCode::UnknownDestination => "not attached to this relay or any relay it reaches",
            NoticeCode::DroppedSlowReceiver => "the receiver reads too slowly; its queue was full",
            NoticeCode::Expired => {
                "timestamp older than the relay accepts; check this machine's clock"
            }
            NoticeCode::TtlExpired => "ran out of hops (TTL 0)",
            NoticeCode::FromFuture => {
                "timestamp further ahead than the relay accepts; check this machine's clock"
            }
            NoticeCode::BadSignature => "signature did not verify",
            NoticeCode::ReceiverClosing => "the receiver's link was closing",
        }
    }
}

/// A cell's presence, as announced and as reported to watchers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PresenceInfo {
    /// The cell.
    pub key: PublicKey,
    /// The application version it announced (up to 64 bytes).
    pub app_version: String,
    /// The services it offers (up to `Limits::max_services`).
    pub services: Vec<ServiceName>,
}

/// One link frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// Messages of one lane, maybe compressed.
    Batch(BatchFrame),
    /// Opens a link.
    Hello {
        /// Highest protocol version the sender speaks.
        version: u16,
        /// Cell or relay.
        role: Role,
        /// Whether the sender wants [`Frame::Notice`]s about its messages
        /// that the relay drops (not attached, slow receiver, expired, ...).
        notices: bool,
        /// Software name and version, for logs (up to 64 bytes).
        agent: String,
    },
    /// Accepts a link.
    Welcome {
        /// The version both sides will speak.
        version: u16,
        /// The accepting node's key.
        node: PublicKey,
        /// The accepting node's clock, ms since the Unix epoch, so a cell can
        /// see its skew against the timestamp window.
        time_ms: u64,
        /// Largest payload the node accepts.
        max_payload: u32,
        /// Largest frame the node accepts.
        max_frame: u32,
    },
    /// Closes or refuses a link.
    Close {
        /// Why, as a code.
        code: CloseCode,
        /// Why, for people (up to 1024 bytes).
        reason: String,
    },
    /// States services and version; replaces any earlier announcement.
    Announce {
        /// Application version (up to 64 bytes).
        app_version: String,
        /// Services offered.
        services: Vec<ServiceName>,
    },
    /// Asks who offers a service.
    Discover {
        /// Echoed in the reply.
        request: u32,
        /// The service.
        service: ServiceName,
    },
    /// Who offers the service.
    DiscoverReply {
        /// The request answered.
        request: u32,
        /// The cells (up to 4096), each with its version.
        cells: Vec<(PublicKey, String)>,
    },
    /// Starts (true) or stops (false) presence reports on this link.
    WatchPresence(bool),
    /// A cell attached (`up`) or detached.
    Presence {
        /// Attached or detached.
        up: bool,
        /// Who, and what it offers.
        info: PresenceInfo,
    },
    /// A report on messages the relay dropped: `count` of them, for one
    /// reason, to one destination (a relay sums its drops and sends at most
    /// one Notice per reason and destination per interval).
    Notice {
        /// Why they were dropped.
        code: NoticeCode,
        /// How many messages this notice covers (at least 1).
        count: u32,
        /// The id of the first of them.
        id: MessageId,
        /// Their destination cell, or all zeros (a broadcast or service
        /// destination, or destinations folded together by a relay).
        subject: PublicKey,
    },
    /// A relay-to-relay control frame (types `0x0B` to `0x12`), on a
    /// relay-role link's control stream; a Trace also goes to a cell.
    Mesh(MeshFrame),
    /// Durable messages, by id, and what became of them (1 to
    /// [`MAX_DURABLE_ACK_IDS`] ids): a relay acknowledges what it logged or
    /// reports a refusal or expiry to the sender; a cell acknowledges what
    /// its application took to the relay that delivered it.
    DurableAck {
        /// What it says of them.
        status: DurableStatus,
        /// Their ids.
        ids: Vec<MessageId>,
    },
}

impl Frame {
    /// Appends the frame, with its length prefix.
    pub fn encode(&self, out: &mut BytesMut) {
        let start = out.len();
        out.put_u32_le(0);
        match self {
            Frame::Batch(b) => {
                out.put_u8(FrameType::Batch as u8);
                b.encode_body(out);
            }
            Frame::Hello {
                version,
                role,
                notices,
                agent,
            } => {
                out.put_u8(FrameType::Hello as u8);
                out.put_u16_le(*version);
                out.put_u8(*role as u8);
                out.put_u8(if *notices { HELLO_NOTICES } else { 0 });
                put_str8(out, agent, MAX_AGENT);
            }
            Frame::Welcome {
                version,
                node,
                time_ms,
                max_payload,
                max_frame,
            } => {
                out.put_u8(FrameType::Welcome as u8);
                out.put_u16_le(*version);
                out.put_slice(&node.0);
                out.put_u64_le(*time_ms);
                out.put_u32_le(*max_payload);
                out.put_u32_le(*max_frame);
            }
            Frame::Close { code, reason } => {
                out.put_u8(FrameType::Close as u8);
                out.put_u16_le(*code as u16);
                let r = truncate_utf8(reason, MAX_REASON);
                out.put_u16_le(r.len() as u16);
                out.put_slice(r.as_bytes());
            }
            Frame::Announce {
                app_version,
                services,
            } => {
                out.put_u8(FrameType::Announce as u8);
                put_str8(out, app_version, MAX_AGENT);
                put_services(out, services);
            }
            Frame::Discover { request, service } => {
                out.put_u8(FrameType::Discover as u8);
                out.put_u32_le(*request);
                put_str8(out, service.as_str(), MAX_SERVICE_NAME);
            }
            Frame::DiscoverReply { request, cells } => {
                out.put_u8(FrameType::DiscoverReply as u8);
                out.put_u32_le(*request);
                let n = cells.len().min(MAX_DISCOVER_ENTRIES);
                out.put_u16_le(n as u16);
                for (k, v) in &cells[..n] {
                    out.put_slice(&k.0);
                    put_str8(out, v, MAX_AGENT);
                }
            }
            Frame::WatchPresence(on) => {
                out.put_u8(FrameType::WatchPresence as u8);
                out.put_u8(*on as u8);
            }
            Frame::Presence { up, info } => {
                out.put_u8(FrameType::Presence as u8);
                out.put_u8(*up as u8);
                out.put_slice(&info.key.0);
                put_str8(out, &info.app_version, MAX_AGENT);
                put_services(out, &info.services);
            }
            Frame::Notice {
                code,
                count,
                id,
                subject,
            } => {
                out.put_u8(FrameType::Notice as u8);
                out.put_u16_le(*code as u16);
                out.put_u32_le(*count);
                out.put_slice(&id.0);
                out.put_slice(&subject.0);
            }
            Frame::Mesh(m) => m.encode_typed(out),
            Frame::DurableAck { status, ids } => {
                out.put_u8(FrameType::DurableAck as u8);
                out.put_u8(*status as u8);
                let n = ids.len().min(MAX_DURABLE_ACK_IDS);
                out.put_u16_le(n as u16);
                for id in &ids[..n] {
                    out.put_slice(&id.0);
                }
            }
        }
        let len = (out.len() - start - LEN_PREFIX) as u32;
        out[start..start + LEN_PREFIX].copy_from_slice(&len.to_le_bytes());
    }

    /// The frame as bytes, with its length prefix.
    pub fn to_bytes(&self) -> Bytes {
        let mut b = BytesMut::new();
        self.encode(&mut b);
        b.freeze()
    }

    /// If `buf` starts with a whole frame, its total length (prefix
    /// included); `Ok(None)` if more bytes are needed; an error if the
    /// announced length is over `limits.max_frame` or zero.
    pub fn peek_len(buf: &[u8], limits: &Limits) -> Result<Option<usize>, DecodeError> {
        let Some(p) = buf.get(..LEN_PREFIX) else {
            return Ok(None);
        };
        let len = u32::from_le_bytes([p[0], p[1], p[2], p[3]]) as usize;
        let limit = limits.max_frame.min(Limits::MAX_FRAME_CAP);
        if len > limit {
            return Err(DecodeError::TooLarge {
                what: "frame",
                got: len,
                limit,
            });
        }
        if len == 0 {
            return Err(DecodeError::Truncated { needed: 1 });
        }
        Ok((buf.len() >= LEN_PREFIX + len).then_some(LEN_PREFIX + len))
    }

    /// Takes one whole frame off the front of `buf`, if there is one.
    pub fn take(buf: &mut BytesMut, limits: &Limits) -> Result<Option<Frame>, DecodeError> {
        match Self::peek_len(buf, limits)? {
            None => Ok(None),
            Some(n) => Self::decode(buf.split_to(n).freeze(), limits).map(Some),
        }
    }

    /// Decodes one frame that fills `frame` exactly (prefix included).
    pub fn decode(frame: Bytes, limits: &Limits) -> Result<Frame, DecodeError> {
        let n = Self::peek_len(&frame, limits)?.ok_or(DecodeError::Truncated {
            needed: LEN_PREFIX.saturating_sub(frame.len()).max(1),
        })?;
        if n != frame.len() {
            return Err(DecodeError::Trailing(frame.len().saturating_sub(n)));
        }
        let ty = FrameType::from_u8(frame[LEN_PREFIX])?;
        if ty == FrameType::Batch {
            return BatchFrame::decode_body(frame.slice(LEN_PREFIX + 1..), limits)
                .map(Frame::Batch);
        }
        let mut r = Reader::new(&frame[LEN_PREFIX + 1..]);
        if MeshFrame::is_mesh_type(ty as u8) {
            let m = MeshFrame::decode_body(ty as u8, &mut r)?;
            r.finish()?;
            return Ok(Frame::Mesh(m));
        }
        let f = match ty {
            FrameType::Batch
            | FrameType::Ping
            | FrameType::Pong
            | FrameType::LinkState
            | FrameType::Credit
            | FrameType::Route
            | FrameType::Lookup
            | FrameType::LookupReply
            | FrameType::Trace => unreachable!("handled above"),
            FrameType::Hello => Frame::Hello {
                version: r.u16()?,
                role: match r.u8()? {
                    0 => Role::Cell,
                    1 => Role::Relay,
                    v => {
                        return Err(DecodeError::Invalid {
                            field: "role",
                            value: v as u64,
                        });
                    }
                },
                notices: match r.u8()? {
                    0 => false,
                    HELLO_NOTICES => true,
                    v => {
                        return Err(DecodeError::Invalid {
                            field: "hello flags",
                            value: v as u64,
                        });
                    }
                },
                agent: r.str8("agent", MAX_AGENT)?,
            },
            FrameType::Welcome => Frame::Welcome {
                version: r.u16()?,
                node: PublicKey(r.array()?),
                time_ms: r.u64()?,
                max_payload: r.u32()?,
                max_frame: r.u32()?,
            },
            FrameType::Close => Frame::Close {
                code: CloseCode::from_u16(r.u16()?),
                reason: r.str16("reason", MAX_REASON)?,
            },
            FrameType::Announce => Frame::Announce {
                app_version: r.str8("app version", MAX_AGENT)?,
                services: read_services(&mut r, limits)?,
            },
            FrameType::Discover => Frame::Discover {
                request: r.u32()?,
                service: read_service(&mut r)?,
            },
            FrameType::DiscoverReply => {
                let request = r.u32()?;
                let n = r.u16()? as usize;
                if n > MAX_DISCOVER_ENTRIES {
                    return Err(DecodeError::TooLarge {
                        what: "discovery entries",
                        got: n,
                        limit: MAX_DISCOVER_ENTRIES,
                    });
                }
                // Each entry takes at least 33 bytes: bound the allocation by
                // what the frame can hold, not by what it claims.
                let mut cells = Vec::with_capacity(n.min(r.remaining() / 33));
                for _ in 0..n {
                    cells.push((PublicKey(r.array()?), r.str8("app version", MAX_AGENT)?));
                }
                Frame::DiscoverReply { request, cells }
            }
            FrameType::WatchPresence => Frame::WatchPresence(read_bool(&mut r, "watch")?),
            FrameType::Presence => Frame::Presence {
                up: read_bool(&mut r, "presence state")?,
                info: PresenceInfo {
                    key: PublicKey(r.array()?),
                    app_version: r.str8("app version", MAX_AGENT)?,
                    services: read_services(&mut r, limits)?,
                },
            },
            FrameType::Notice => Frame::Notice {
                code: NoticeCode::from_u16(r.u16()?)?,
                count: match r.u32()? {
                    0 => {
                        return Err(DecodeError::Invalid {
                            field: "notice count",
                            value: 0,
                        });
                    }
                    n => n,
                },
                id: MessageId(r.array()?),
                subject: PublicKey(r.array()?),
            },
            FrameType::DurableAck => {
                let status = DurableStatus::from_u8(r.u8()?)?;
                let n = r.u16()? as usize;
                if n == 0 || n > MAX_DURABLE_ACK_IDS {
                    return Err(DecodeError::Invalid {
                        field: "durable ack count",
                        value: n as u64,
                    });
                }
                let mut ids = Vec::with_capacity(n.min(r.remaining() / 16));
                for _ in 0..n {
                    ids.push(MessageId(r.array()?));
                }
                Frame::DurableAck { status, ids }
            }
        };
        r.finish()?;
        Ok(f)
    }

    /// The frame type's name, for logs and error messages.
    pub fn name(&self) -> &'static str {
        match self {
            Frame::Batch(_) => "Batch",
            Frame::Hello { .. } => "Hello",
            Frame::Welcome { .. } => "Welcome",
            Frame::Close { .. } => "Close",
            Frame::Announce { .. } => "Announce",
            Frame::Discover { .. } => "Discover",
            Frame::DiscoverReply { .. } => "DiscoverReply",
            Frame::WatchPresence(_) => "WatchPresence",
            Frame::Presence { .. } => "Presence",
            Frame::Notice { .. } => "Notice",
            Frame::Mesh(m) => m.name(),
            Frame::DurableAck { .. } => "DurableAck",
        }
    }

    /// The lane of a batch frame; control frames travel as control.
    pub fn lane(&self) -> Lane {
        match self {
            Frame::Batch(b) => b.lane,
            _ => Lane::Control,
        }
    }
}

fn read_bool(r: &mut Reader<'_>, field: &'static str) -> Result<bool, DecodeError> {
    match r.u8()? {
        0 => Ok(false),
        1 => Ok(true),
        v => Err(DecodeError::Invalid {
            field,
            value: v as u64,
        }),
    }
}

fn read_service(r: &mut Reader<'_>) -> Result<ServiceName, DecodeError> {
    ServiceName::new(r.str8("service name", MAX_SERVICE_NAME)?)
}

fn read_services(r: &mut Reader<'_>, limits: &Limits) -> Result<Vec<ServiceName>, DecodeError> {
    let n = r.u8()? as usize;
    if n > limits.max_services {
        return Err(DecodeError::TooLarge {
            what: "services",
            got: n,
            limit: limits.max_services,
        });
    }
    (0..n).map(|_| read_service(r)).collect()
}

fn put_services(out: &mut BytesMut, services: &[ServiceName]) {
    let n = services.len().min(u8::MAX as usize);
    out.put_u8(n as u8);
    for s in &services[..n] {
        put_str8(out, s.as_str(), MAX_SERVICE_NAME);
    }
}

fn put_str8(out: &mut BytesMut, s: &str, max: usize) {
    let s = truncate_utf8(s, max.min(u8::MAX as usize));
    out.put_u8(s.len() as u8);
    out.put_slice(s.as_bytes());
}

/// `s` cut to at most `max` bytes on a character boundary: an encoder never
/// writes what its own decoder would refuse.
pub(crate) fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn samples() -> Vec<Frame> {
        let k = PublicKey([7; 32]);
        let svc = ServiceName::new("chat").unwrap();
        vec![
            Frame::DurableAck {
                status: DurableStatus::Acked,
                ids: vec![MessageId([1; 16]), MessageId([2; 16])],
            },
            Frame::Hello {
                version: PROTOCOL_VERSION,
                role: Role::Cell,
                notices: true,
                agent: "cell/0.1".into(),
            },
            Frame::Welcome {
                version: 1,
                node: k,
                time_ms: 1_700_000_000_000,
                max_payload: 1 << 20,
                max_frame: 4 << 20,
            },
            Frame::Close {
                code: CloseCode::ForgedSource,
                reason: "source is not the link's key".into(),
            },
            Frame::Announce {
                app_version: "1.2.3".into(),
                services: vec![svc.clone()],
            },
            Frame::Discover {
                request: 9,
                service: svc.clone(),
            },
            Frame::DiscoverReply {
                request: 9,
                cells: vec![(k, "1.2.3".into())],
            },
            Frame::WatchPresence(true),
            Frame::Presence {
                up: false,
                info: PresenceInfo {
                    key: k,
                    app_version: String::new(),
                    services: vec![svc],
                },
            },
            Frame::Notice {
                code: NoticeCode::UnknownDestination,
                count: 70_000,
                id: MessageId([1; 16]),
                subject: k,
            },
        ]
    }

    #[test]
    fn control_frames_round_trip_whole_and_streamed() {
        let limits = Limits::default();
        let mut stream = BytesMut::new();
        for f in samples() {
            let b = f.to_bytes();
            assert_eq!(Frame::decode(b.clone(), &limits).unwrap(), f);
            stream.extend_from_slice(&b);
        }
        // Fed one byte at a time, the stream yields the same frames.
        let mut buf = BytesMut::new();
        let mut out = vec![];
        for byte in stream {
            buf.put_u8(byte);
            while let Some(f) = Frame::take(&mut buf, &limits).unwrap() {
                out.push(f);
            }
        }
        assert_eq!(out, samples());
    }

    #[test]
    fn oversize_frame_is_refused_from_its_prefix() {
        let limits = Limits {
            max_frame: 100,
            ..Limits::default()
        };
        let mut b = BytesMut::new();
        b.put_u32_le(101);
        assert!(matches!(
            Frame::take(&mut b, &limits),
            Err(DecodeError::TooLarge { what: "frame", .. })
        ));
    }

    #[test]
    fn a_notice_is_54_bytes_of_body_and_refuses_count_0_and_unknown_codes() {
        let limits = Limits::default();
        let f = Frame::Notice {
            code: NoticeCode::ReceiverClosing,
            count: 3,
            id: MessageId([9; 16]),
            subject: PublicKey([7; 32]),
        };
        let b = f.to_bytes();
        assert_eq!(b.len(), LEN_PREFIX + 1 + 54);
        assert_eq!(&b[5..11], &[7, 0, 3, 0, 0, 0], "code, then count (LE)");
        let mut zero = BytesMut::from(&b[..]);
        zero[7] = 0;
        assert!(matches!(
            Frame::decode(zero.freeze(), &limits),
            Err(DecodeError::Invalid {
                field: "notice count",
                ..
            })
        ));
        for code in [0u16, 8, 0xffff] {
            let mut bad = BytesMut::from(&b[..]);
            bad[5..7].copy_from_slice(&code.to_le_bytes());
            assert!(
                matches!(
                    Frame::decode(bad.freeze(), &limits),
                    Err(DecodeError::Invalid {
                        field: "notice code",
                        ..
                    })
                ),
                "{code}"
            );
        }
        for c in NoticeCode::ALL {
            assert_eq!(NoticeCode::from_u16(c as u16).unwrap(), c);
            assert!(!c.describe().is_empty() && !c.as_str().is_empty());
        }
    }

    #[test]
    fn long_strings_are_cut_not_corrupted() {
        let f = Frame::Close {
            code: CloseCode::Normal,
            reason: "é".repeat(1000),
        };
        match Frame::decode(f.to_bytes(), &Limits::default()).unwrap() {
            Frame::Close { reason, .. } => {
                assert!(reason.len() <= MAX_REASON && reason.starts_with('é'))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn durable_ack_is_byte_exact_and_bounded() {
        let f = Frame::DurableAck {
            status: DurableStatus::Full,
            ids: vec![MessageId([0xAB; 16])],
        };
        let b = f.to_bytes();
        let mut want = vec![20, 0, 0, 0, 0x20, 1, 1, 0];
        want.extend_from_slice(&[0xAB; 16]);
        assert_eq!(&b[..], &want[..]);
        assert_eq!(Frame::decode(b, &Limits::default()).unwrap(), f);
        // Zero ids, an unknown status, too many ids: refused.
        for body in [
            vec![0x20, 0, 0, 0],
            vec![0x20, 9, 1, 0],
            vec![0x20, 0, 0x01, 0x04],
        ] {
            let mut fr = (body.len() as u32).to_le_bytes().to_vec();
            fr.extend_from_slice(&body);
            assert!(Frame::decode(Bytes::from(fr), &Limits::default()).is_err());
        }
    }
}
