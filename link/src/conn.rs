//! One interface over both link transports, QUIC and TLS over TCP: what the
//! handshake, the lane writer and the frame readers need from a link.
//!
//! | need | QUIC ([`crate::quic`]) | TCP ([`crate::tcp`]) |
//! | --- | --- | --- |
//! | control channel | the first bidirectional stream | mux channel 0 |
//! | a lane's batches | one unidirectional stream per lane, QUIC priority | mux channel 1 + lane, chunk-interleaved by the writer task |
//! | the peer's key | the TLS handshake | the TLS handshake |
//! | close with code and reason | `CONNECTION_CLOSE` with the application code | a Close frame on the control channel, then TLS `close_notify` |
//! | why the peer closed | the application close | the last Close frame before `close_notify` |
//!
//! Why an enum ([`Link`], [`ControlSender`], [`crate::FrameReceiver`],
//! [`LaneSender`]) and not a trait: every call is a `match` on two
//! variants, statically dispatched and inlinable, with no boxed futures
//! (an `async fn` in a `dyn` trait needs a `Box` per call, i.e. per frame)
//! and without making every user generic over the transport (a relay keeps
//! links of both kinds in one table, which needs one concrete type).

use crate::error::{LinkEnd, LinkError};
use crate::lanes::LANES;
use crate::quic::{QuicLanes, QuicLink};
use crate::reader::FrameReceiver;
use crate::tcp::{TcpLaneSender, TcpLink, TcpSender};
use bytes::Bytes;
use relay_codec::frame::CloseCode;
use relay_codec::{Frame, Lane, Limits, PublicKey};
use std::net::SocketAddr;

/// Which transport a link runs over.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Transport {
    /// QUIC over UDP (the default).
    #[default]
    Quic,
    /// TLS 1.3 over TCP.
    Tcp,
}

impl Transport {
    /// Both transports, QUIC first.
    pub const ALL: [Transport; 2] = [Transport::Quic, Transport::Tcp];

    /// The name used in configs and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Transport::Quic => "quic",
            Transport::Tcp => "tcp",
        }
    }
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A transport name that is neither `quic` nor `tcp`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown transport {0:?}: use quic or tcp")]
pub struct UnknownTransport(pub String);

impl std::str::FromStr for Transport {
    type Err = UnknownTransport;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "quic" => Ok(Transport::Quic),
            "tcp" => Ok(Transport::Tcp),
            other => Err(UnknownTransport(other.to_owned())),
        }
    }
}

/// A link to a peer over either transport. Cheap to clone (a handle).
#[derive(Clone, Debug)]
pub enum Link {
    /// Over QUIC.
    Quic(QuicLink),
    /// Over TLS over TCP.
    Tcp(TcpLink),
}

impl Link {
    /// A link over the QUIC connection `conn`, reading frames within `limits`.
    pub fn quic(conn: quinn::Connection, limits: Limits) -> Self {
        Link::Quic(QuicLink::new(conn, limits))
    }

    /// Which transport it runs over.
    pub fn transport(&self) -> Transport {
        match self {
            Link::Quic(_) => Transport::Quic,
            Link::Tcp(_) => Transport::Tcp,
        }
    }

    /// The key the peer proved in the TLS handshake (`None` only for a
    /// QUIC connection whose handshake has not finished).
    pub fn peer_key(&self) -> Option<PublicKey> {
        match self {
            Link::Quic(q) => q.peer_key().map(PublicKey),
            Link::Tcp(t) => Some(PublicKey(t.peer_key())),
        }
    }

    /// The peer's address.
    pub fn remote_address(&self) -> SocketAddr {
        match self {
            Link::Quic(q) => q.connection().remote_address(),
            Link::Tcp(t) => t.remote_address(),
        }
    }

    /// The connecting side: opens the control channel (QUIC: the first
    /// bidirectional stream, at the highest priority).
    pub async fn open_control(&self) -> Result<(ControlSender, FrameReceiver), LinkError> {
        match self {
            Link::Quic(q) => {
                let (send, recv) = q.open_control().await?;
                Ok((ControlSender::Quic(send), FrameReceiver::Quic(recv)))
            }
            Link::Tcp(t) => {
                let (send, recv) = t.control()?;
                Ok((ControlSender::Tcp(send), FrameReceiver::Tcp(recv)))
            }
        }
    }

    /// The accepting side: waits for the peer's control channel (QUIC:
    /// until the peer has sent on it; TCP: at once).
    pub async fn accept_control(&self) -> Result<(ControlSender, FrameReceiver), LinkError> {
        match self {
            Link::Quic(q) => {
                let (send, recv) = q.accept_control().await?;
                Ok((ControlSender::Quic(send), FrameReceiver::Quic(recv)))
            }
            Link::Tcp(_) => self.open_control().await,
        }
    }

    /// The sender of this side's lanes (one per link: it owns the lane
    /// streams or channels).
    pub fn lane_sender(&self) -> LaneSender {
        match self {
            Link::Quic(q) => LaneSender::Quic(q.lanes()),
            Link::Tcp(t) => LaneSender::Tcp(t.lane_sender()),
        }
    }

    /// The next lane the peer starts sending on, as a frame receiver; an
    /// error once the link has ended. At most four per link on TCP.
    pub async fn accept_lane(&self) -> Result<FrameReceiver, LinkError> {
        match self {
            Link::Quic(q) => Ok(FrameReceiver::Quic(q.accept_lane().await?)),
            Link::Tcp(t) => Ok(FrameReceiver::Tcp(t.accept_lane().await?)),
        }
    }

    /// Closes the link at once with `code` and `reason` (cut to 1024
    /// bytes): what is unsent is dropped, the peer learns the code and
    /// reason. For a close the peer can read a Close frame of, use
    /// [`crate::close`].
    pub fn close(&self, code: CloseCode, reason: &str) {
        match self {
            Link::Quic(q) => q.close(code, reason),
            Link::Tcp(t) => t.close(code, reason),
        }
    }

    /// Waits until the link has ended and says why.
    pub async fn closed(&self) -> LinkEnd {
        match self {
            Link::Quic(q) => q.closed().await,
            Link::Tcp(t) => t.closed().await,
        }
    }

    /// Why the link ended, if it has.
    pub fn end(&self) -> Option<LinkEnd> {
        match self {
            Link::Quic(q) => q.end(),
            Link::Tcp(t) => t.end(),
        }
    }

    /// After a close: waits until this side's close is on its way to the
    /// peer. TCP: the Close frame and `close_notify` are written (or the
    /// link's linger passed). QUIC: at once; the endpoint sends the close
    /// (wait for `quinn::Endpoint::wait_idle` before dropping it).
    pub async fn close_sent(&self) {
        match self {
            Link::Quic(_) => {}
            Link::Tcp(t) => t.close_sent().await,
        }
    }
}

/// The sending half of a link's control channel.
#[derive(Debug)]
pub enum ControlSender {
    /// A QUIC stream.
    Quic(quinn::SendStream),
    /// TCP mux channel 0.
    Tcp(TcpSender),
}

impl ControlSender {
    /// Sends one frame, waiting while the channel's buffer is full.
    pub async fn send(&mut self, frame: &Frame) -> Result<(), LinkError> {
        match self {
            ControlSender::Quic(s) => Ok(s.write_chunk(frame.to_bytes()).await?),
            ControlSender::Tcp(s) => s.send(frame.to_bytes()).await,
        }
    }

    /// Ends the channel after what was sent (QUIC: FIN; TCP: an end chunk).
    pub fn finish(&mut self) {
        match self {
            ControlSender::Quic(s) => {
                let _ = s.finish();
            }
            ControlSender::Tcp(s) => s.finish(),
        }
    }
}

/// The sending side of a link's four lanes (batch frames only).
#[derive(Debug)]
pub enum LaneSender {
    /// One QUIC stream per lane, with the lane's priority.
    Quic(QuicLanes),
    /// TCP mux channels 1..=4, interleaved by the writer task.
    Tcp(TcpLaneSender),
}

impl LaneSender {
    /// Shares the link between the lanes by `weights` (control, high,
    /// normal, bulk) where the transport interleaves them itself: TCP cuts
    /// every lane into chunks and picks the next chunk by these weights.
    /// QUIC: nothing to do (its stream priorities put each lane's stream
    /// before the lower ones; the writer's own scheduler shares by weight).
    pub fn set_weights(&mut self, weights: [u32; LANES]) {
        match self {
            LaneSender::Quic(_) => {}
            LaneSender::Tcp(t) => t.set_weights(weights),
        }
    }

    /// Sends one batch frame (length prefix included) on `lane`, waiting
    /// while the lane's buffer is full.
    pub async fn send(&mut self, lane: Lane, frame: Bytes) -> Result<(), LinkError> {
        match self {
            LaneSender::Quic(q) => q.send(lane, frame).await,
            LaneSender::Tcp(t) => t.send(lane, [frame]).await,
        }
    }

    /// Sends one batch frame given as two parts (a forwarded batch's
    /// header and its data as they arrived), without joining them.
    pub async fn send_parts(
        &mut self,
        lane: Lane,
        head: Bytes,
        body: Bytes,
    ) -> Result<(), LinkError> {
        match self {
            LaneSender::Quic(q) => q.send_parts(lane, head, body).await,
            LaneSender::Tcp(t) => t.send(lane, [head, body]).await,
        }
    }

    /// Why the link ended, if it has.
    pub fn end(&self) -> Option<LinkEnd> {
        match self {
            LaneSender::Quic(q) => q.end(),
            LaneSender::Tcp(t) => t.end(),
        }
    }

    /// Waits until the link has ended and says why.
    pub async fn closed(&self) -> LinkEnd {
        match self {
            LaneSender::Quic(q) => q.closed().await,
            LaneSender::Tcp(t) => t.closed().await,
        }
    }

    /// Ends every lane this sender used, then waits until `deadline` at
    /// most for them to be delivered (QUIC: acknowledged by the peer;
    /// TCP: written to the socket).
    pub async fn finish(&mut self, deadline: tokio::time::Instant) {
        match self {
            LaneSender::Quic(q) => q.finish(deadline).await,
            LaneSender::Tcp(t) => {
                t.finish();
                let _ = tokio::time::timeout_at(deadline, t.flushed()).await;
            }
        }
    }
}
