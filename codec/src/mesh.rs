//! Relay-to-relay control frames: what relays of a mesh tell each other on
//! the control stream of a relay-role link (docs/PROTOCOL.md, section 10).
//!
//! Carried as [`Frame::Mesh`](crate::Frame::Mesh), each with its own frame
//! type (`0x0B` to `0x12`, after the cell-facing ones). Two kinds:
//!
//! - **link frames**, for the neighbour at the other end of the link only:
//!   [`MeshFrame::Ping`], [`MeshFrame::Pong`], [`MeshFrame::Credit`], and
//!   [`MeshFrame::LinkState`], which is flooded (each relay passes a newer
//!   one on to its other neighbours once);
//! - **routed frames**, which start with a [`RouteHeader`] naming the relay
//!   that sent them and the relay they are for, and are passed on hop by
//!   hop toward it: [`MeshFrame::Route`], [`MeshFrame::Lookup`],
//!   [`MeshFrame::LookupReply`], [`MeshFrame::Trace`].

use crate::error::DecodeError;
use crate::key::PublicKey;
use crate::message::{Lane, MessageId};
use crate::wire::Reader;
use bytes::{BufMut, BytesMut};

/// Most neighbours one [`MeshFrame::LinkState`] lists; a relay has at most
/// its `max_peers` links to other relays, which must not exceed this.
pub const MAX_NEIGHBORS: usize = 1024;
/// Longest dialable address (`HOST:PORT`, maybe with a transport prefix) in
/// a [`MeshFrame::LinkState`].
pub const MAX_ADDR: usize = 255;

/// The frame types of mesh frames (the `type` byte of the frame).
pub(crate) mod ty {
    pub const PING: u8 = 0x0B;
    pub const PONG: u8 = 0x0C;
    pub const LINK_STATE: u8 = 0x0D;
    pub const CREDIT: u8 = 0x0E;
    pub const ROUTE: u8 = 0x0F;
    pub const LOOKUP: u8 = 0x10;
    pub const LOOKUP_REPLY: u8 = 0x11;
    pub const TRACE: u8 = 0x12;
}

/// Where a routed mesh frame comes from and goes to; 65 bytes on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RouteHeader {
    /// The relay that sent it.
    pub origin: PublicKey,
    /// The relay it is for.
    pub target: PublicKey,
    /// Relays it may still pass through: each relay that passes it on
    /// lowers it by one; one that finds 0 drops it.
    pub hops: u8,
}

/// Where a cell is, as a directory entry: its home relay and the version of
/// that fact (newer wins).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Location {
    /// The relay the cell is attached to.
    pub home: PublicKey,
    /// Higher is newer: the home relay's wall clock (ms) when the cell
    /// attached, so a move to another relay wins over the old attachment.
    pub version: u64,
}

/// One relay-to-relay control frame; see the [module documentation](self).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MeshFrame {
    /// Liveness probe; the neighbour answers with a Pong of the same nonce.
    /// On the control stream, so it never waits behind lane data.
    Ping {
        /// Echoed in the Pong.
        nonce: u64,
    },
    /// The answer to a Ping.
    Pong {
        /// The Ping's nonce.
        nonce: u64,
    },
    /// A relay's links to other relays, flooded over the mesh: a relay
    /// keeps the newest (highest `seq`) per origin and passes it on once.
    LinkState {
        /// The relay whose links these are.
        origin: PublicKey,
        /// Higher is newer.
        seq: u64,
        /// Where other relays may dial it (empty: not dialable), up to
        /// [`MAX_ADDR`] bytes.
        addr: String,
        /// The relays it has a link up to, at most [`MAX_NEIGHBORS`].
        neighbors: Vec<PublicKey>,
    },
    /// The receiver may send `grant` more messages on `lane` of this link
    /// (credit-based flow control; at least 1).
    Credit {
        /// The lane.
        lane: Lane,
        /// Messages granted.
        grant: u32,
    },
    /// Where a cell is (`up`) or that it left: sent by its home relay to
    /// the directory relays of the cell's key, and to a neighbour as a hint
    /// before the first message for the cell.
    Route {
        /// From whom, to whom.
        header: RouteHeader,
        /// Attached (true) or detached.
        up: bool,
        /// The cell.
        cell: PublicKey,
        /// Its home relay and the version (newer wins).
        at: Location,
    },
    /// Where is `cell`? Asked of one of its directory relays.
    Lookup {
        /// From whom, to whom.
        header: RouteHeader,
        /// Echoed in the reply.
        request: u32,
        /// The cell.
        cell: PublicKey,
    },
    /// The answer to a Lookup.
    LookupReply {
        /// From whom (the directory relay), to whom (the asker).
        header: RouteHeader,
        /// The request answered.
        request: u32,
        /// The cell.
        cell: PublicKey,
        /// Where it is, if the directory knows.
        at: Option<Location>,
    },
    /// A relay passed on (or delivered) a message with the trace flag:
    /// sent to the message's source cell's home relay, which hands it to
    /// the cell.
    Trace {
        /// From the reporting relay to the source's home relay.
        header: RouteHeader,
        /// The traced message.
        id: MessageId,
        /// Its source cell.
        source: PublicKey,
        /// The TTL it left this relay with.
        ttl: u8,
        /// How long it stayed in this relay, in microseconds.
        in_relay_us: u32,
        /// Where it went next: a relay, or the destination cell.
        next: PublicKey,
    },
}

impl MeshFrame {
    /// Whether `ty` is the type byte of a mesh frame.
    pub(crate) fn is_mesh_type(ty: u8) -> bool {
        (ty::PING..=ty::TRACE).contains(&ty)
    }

    /// The routing header of a routed frame; `None` for link frames.
    pub fn header(&self) -> Option<&RouteHeader> {
        match self {
            MeshFrame::Route { header, .. }
            | MeshFrame::Lookup { header, .. }
            | MeshFrame::LookupReply { header, .. }
            | MeshFrame::Trace { header, .. } => Some(header),
            _ => None,
        }
    }

    /// The routing header of a routed frame, to lower its hops.
    pub fn header_mut(&mut self) -> Option<&mut RouteHeader> {
        match self {
            MeshFrame::Route { header, .. }
            | MeshFrame::Lookup { header, .. }
            | MeshFrame::LookupReply { header, .. }
            | MeshFrame::Trace { header, .. } => Some(header),
            _ => None,
        }
    }

    /// The frame type's name, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            MeshFrame::Ping { .. } => "Ping",
            MeshFrame::Pong { .. } => "Pong",
            MeshFrame::LinkState { .. } => "LinkState",
            MeshFrame::Credit { .. } => "Credit",
            MeshFrame::Route { .. } => "Route",
            MeshFrame::Lookup { .. } => "Lookup",
            MeshFrame::LookupReply { .. } => "LookupReply",
            MeshFrame::Trace { .. } => "Trace",
        }
    }

    /// Appends the type byte and the body (the caller writes the prefix).
    pub(crate) fn encode_typed(&self, out: &mut BytesMut) {
        match self {
            MeshFrame::Ping { nonce } => {
                out.put_u8(ty::PING);
                out.put_u64_le(*nonce);
            }
            MeshFrame::Pong { nonce } => {
                out.put_u8(ty::PONG);
                out.put_u64_le(*nonce);
            }
            MeshFrame::LinkState {
                origin,
                seq,
                addr,
                neighbors,
            } => {
                out.put_u8(ty::LINK_STATE);
                out.put_slice(&origin.0);
                out.put_u64_le(*seq);
                let a = crate::frame::truncate_utf8(addr, MAX_ADDR);
                out.put_u8(a.len() as u8);
                out.put_slice(a.as_bytes());
                let n = neighbors.len().min(MAX_NEIGHBORS);
                out.put_u16_le(n as u16);
                for k in &neighbors[..n] {
                    out.put_slice(&k.0);
                }
            }
            MeshFrame::Credit { lane, grant } => {
                out.put_u8(ty::CREDIT);
                out.put_u8(*lane as u8);
                out.put_u32_le(*grant);
            }
            MeshFrame::Route {
                header,
                up,
                cell,
                at,
            } => {
                out.put_u8(ty::ROUTE);
                put_header(out, header);
                out.put_u8(*up as u8);
                out.put_slice(&cell.0);
                put_location(out, at);
            }
            MeshFrame::Lookup {
                header,
                request,
                cell,
            } => {
                out.put_u8(ty::LOOKUP);
                put_header(out, header);
                out.put_u32_le(*request);
                out.put_slice(&cell.0);
            }
            MeshFrame::LookupReply {
                header,
                request,
                cell,
                at,
            } => {
                out.put_u8(ty::LOOKUP_REPLY);
                put_header(out, header);
                out.put_u32_le(*request);
                out.put_slice(&cell.0);
                match at {
                    Some(at) => {
                        out.put_u8(1);
                        put_location(out, at);
                    }
                    None => out.put_u8(0),
                }
            }
            MeshFrame::Trace {
                header,
                id,
                source,
                ttl,
                in_relay_us,
                next,
            } => {
                out.put_u8(ty::TRACE);
                put_header(out, header);
                out.put_slice(&id.0);
                out.put_slice(&source.0);
                out.put_u8(*ttl);
                out.put_u32_le(*in_relay_us);
                out.put_slice(&next.0);
            }
        }
    }

    /// Decodes the body of a mesh frame of type `ty` (the caller checks
    /// that the body is used up).
    pub(crate) fn decode_body(ty: u8, r: &mut Reader<'_>) -> Result<MeshFrame, DecodeError> {
        Ok(match ty {
            ty::PING => MeshFrame::Ping { nonce: r.u64()? },
            ty::PONG => MeshFrame::Pong { nonce: r.u64()? },
            ty::LINK_STATE => {
                let origin = PublicKey(r.array()?);
                let seq = r.u64()?;
                let addr = r.str8("address", MAX_ADDR)?;
                let n = r.u16()? as usize;
                if n > MAX_NEIGHBORS {
                    return Err(DecodeError::TooLarge {
                        what: "neighbours",
                        got: n,
                        limit: MAX_NEIGHBORS,
                    });
                }
                let mut neighbors = Vec::with_capacity(n.min(r.remaining() / 32));
                for _ in 0..n {
                    neighbors.push(PublicKey(r.array()?));
                }
                MeshFrame::LinkState {
                    origin,
                    seq,
                    addr,
                    neighbors,
                }
            }
            ty::CREDIT => MeshFrame::Credit {
                lane: Lane::from_u8(r.u8()?)?,
                grant: match r.u32()? {
                    0 => {
                        return Err(DecodeError::Invalid {
                            field: "credit grant",
                            value: 0,
                        });
                    }
                    n => n,
                },
            },
            ty::ROUTE => MeshFrame::Route {
                header: read_header(r)?,
                up: read_flag(r, "route state")?,
                cell: PublicKey(r.array()?),
                at: read_location(r)?,
            },
            ty::LOOKUP => MeshFrame::Lookup {
                header: read_header(r)?,
                request: r.u32()?,
                cell: PublicKey(r.array()?),
            },
            ty::LOOKUP_REPLY => MeshFrame::LookupReply {
                header: read_header(r)?,
                request: r.u32()?,
                cell: PublicKey(r.array()?),
                at: match read_flag(r, "lookup found")? {
                    true => Some(read_location(r)?),
                    false => None,
                },
            },
            ty::TRACE => MeshFrame::Trace {
                header: read_header(r)?,
                id: MessageId(r.array()?),
                source: PublicKey(r.array()?),
                ttl: r.u8()?,
                in_relay_us: r.u32()?,
                next: PublicKey(r.array()?),
            },
            v => {
                return Err(DecodeError::Invalid {
                    field: "frame type",
                    value: v as u64,
                });
            }
        })
    }
}

fn put_header(out: &mut BytesMut, h: &RouteHeader) {
    out.put_slice(&h.origin.0);
    out.put_slice(&h.target.0);
    out.put_u8(h.hops);
}

fn read_header(r: &mut Reader<'_>) -> Result<RouteHeader, DecodeError> {
    Ok(RouteHeader {
        origin: PublicKey(r.array()?),
        target: PublicKey(r.array()?),
        hops: r.u8()?,
    })
}

fn put_location(out: &mut BytesMut, at: &Location) {
    out.put_slice(&at.home.0);
    out.put_u64_le(at.version);
}

fn read_location(r: &mut Reader<'_>) -> Result<Location, DecodeError> {
    Ok(Location {
        home: PublicKey(r.array()?),
        version: r.u64()?,
    })
}

fn read_flag(r: &mut Reader<'_>, field: &'static str) -> Result<bool, DecodeError> {
    match r.u8()? {
        0 => Ok(false),
        1 => Ok(true),
        v => Err(DecodeError::Invalid {
            field,
            value: v as u64,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Frame, Limits};

    fn header() -> RouteHeader {
        RouteHeader {
            origin: PublicKey([1; 32]),
            target: PublicKey([2; 32]),
            hops: 16,
        }
    }

    #[test]
    fn body_lengths_are_as_documented() {
        let at = Location {
            home: PublicKey([3; 32]),
            version: 5,
        };
        let cell = PublicKey([4; 32]);
        let cases: Vec<(MeshFrame, usize)> = vec![
            (MeshFrame::Ping { nonce: 1 }, 8),
            (MeshFrame::Pong { nonce: 1 }, 8),
            (
                MeshFrame::LinkState {
                    origin: cell,
                    seq: 1,
                    addr: "h:1".into(),
                    neighbors: vec![cell, cell],
                },
                32 + 8 + 1 + 3 + 2 + 64,
            ),
            (
                MeshFrame::Credit {
                    lane: Lane::Bulk,
                    grant: 9,
                },
                5,
            ),
            (
                MeshFrame::Route {
                    header: header(),
                    up: true,
                    cell,
                    at,
                },
                65 + 1 + 32 + 40,
            ),
            (
                MeshFrame::Lookup {
                    header: header(),
                    request: 1,
                    cell,
                },
                65 + 4 + 32,
            ),
            (
                MeshFrame::LookupReply {
                    header: header(),
                    request: 1,
                    cell,
                    at: None,
                },
                65 + 4 + 32 + 1,
            ),
            (
                MeshFrame::LookupReply {
                    header: header(),
                    request: 1,
                    cell,
                    at: Some(at),
                },
                65 + 4 + 32 + 1 + 40,
            ),
            (
                MeshFrame::Trace {
                    header: header(),
                    id: MessageId([5; 16]),
                    source: cell,
                    ttl: 3,
                    in_relay_us: 7,
                    next: cell,
                },
                65 + 16 + 32 + 1 + 4 + 32,
            ),
        ];
        for (m, body) in cases {
            let b = Frame::Mesh(m.clone()).to_bytes();
            assert_eq!(b.len(), 4 + 1 + body, "{}", m.name());
            assert_eq!(
                Frame::decode(b, &Limits::default()).unwrap(),
                Frame::Mesh(m)
            );
        }
    }

    #[test]
    fn bad_values_are_refused() {
        let limits = Limits::default();
        let credit = Frame::Mesh(MeshFrame::Credit {
            lane: Lane::High,
            grant: 1,
        })
        .to_bytes();
        let mut zero = BytesMut::from(&credit[..]);
        zero[6..10].copy_from_slice(&0u32.to_le_bytes());
        assert!(matches!(
            Frame::decode(zero.freeze(), &limits),
            Err(DecodeError::Invalid {
                field: "credit grant",
                ..
            })
        ));
        let mut lane = BytesMut::from(&credit[..]);
        lane[5] = 4;
        assert!(Frame::decode(lane.freeze(), &limits).is_err());
        let route = Frame::Mesh(MeshFrame::Route {
            header: header(),
            up: false,
            cell: PublicKey([4; 32]),
            at: Location {
                home: PublicKey([3; 32]),
                version: 1,
            },
        })
        .to_bytes();
        let mut flag = BytesMut::from(&route[..]);
        flag[5 + 65] = 2;
        assert!(matches!(
            Frame::decode(flag.freeze(), &limits),
            Err(DecodeError::Invalid {
                field: "route state",
                ..
            })
        ));
        // A neighbour count over the bound is refused before any allocation.
        let mut ls = BytesMut::new();
        ls.put_u32_le(1 + 32 + 8 + 1 + 2);
        ls.put_u8(ty::LINK_STATE);
        ls.put_slice(&[0; 32]);
        ls.put_u64_le(1);
        ls.put_u8(0);
        ls.put_u16_le(MAX_NEIGHBORS as u16 + 1);
        assert!(matches!(
            Frame::decode(ls.freeze(), &limits),
            Err(DecodeError::TooLarge {
                what: "neighbours",
                ..
            })
        ));
        // Trailing bytes after a whole body are refused.
        let ping = Frame::Mesh(MeshFrame::Ping { nonce: 1 }).to_bytes();
        let mut long = BytesMut::new();
        long.put_u32_le(10);
        long.put_slice(&ping[4..]);
        long.put_u8(0);
        assert!(Frame::decode(long.freeze(), &limits).is_err());
    }
}
