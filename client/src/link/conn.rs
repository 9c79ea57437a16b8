//! One interface over both link transports, QUIC and TLS over TCP: what the
//! handshake, the lane writer and the frame readers need from a link.
//!
//! | need | QUIC | TCP |
//! | --- | --- | --- |
//! | control channel | the first bidirectional stream | mux channel 0 |
//! | a lane's batches | one unidirectional stream per lane, QUIC priority | mux channel 1 + lane, chunk-interleaved by the writer task |
//! | the peer's key | the TLS handshake | the TLS handshake |
//! | close with code and reason | `CONNECTION_CLOSE` with the application code | a Close frame on the control channel, then TLS `close_notify` |
//! | why the peer closed | the application close | the last Close frame before `close_notify` |
//!
//! Why an enum ([`Link`], [`ControlSender`], [`FrameReceiver`],
//! [`LaneSender`]) and not a trait: every call is a `match` on two
//! variants, statically dispatched and inlinable, with no boxed futures
//! (an `async fn` in a `dyn` trait needs a `Box` per call, i.e. per frame)
//! and without making every user generic over the transport (a relay keeps
//! links of both kinds in one table, which needs one concrete type).

use super::FrameReader;
use super::tcp::{TcpLaneSender, TcpLink, TcpReceiver, TcpSender};
use crate::lanes::LANES;
use bytes::Bytes;
use relay_codec::frame::CloseCode;
use relay_codec::mux::MuxError;
use relay_codec::{DecodeError, Frame, Lane, Limits, PublicKey};
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

/// Why a link ended, the same for both transports.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LinkEnd {
    /// The peer closed the link, saying why.
    #[error("the peer closed the link ({code:?}): {reason}")]
    Closed {
        /// The peer's code.
        code: CloseCode,
        /// The peer's words (at most 1024 bytes).
        reason: String,
    },
    /// This side closed the link.
    #[error("this side closed the link")]
    Local,
    /// The peer stopped answering (QUIC idle timeout).
    #[error("the peer stopped answering (idle timeout)")]
    TimedOut,
    /// The connection ended without a close: reset, or (TCP) closed
    /// without a Close frame.
    #[error("the connection was lost without a close (did the peer restart?)")]
    Lost,
    /// The peer broke the TCP chunk framing; this side closed the link
    /// with the error's code.
    #[error("the peer broke the TCP link framing: {0}")]
    Mux(MuxError),
    /// The TCP connection or its TLS failed.
    #[error("TCP/TLS connection failed: {kind:?}: {message}")]
    Io {
        /// The I/O error's kind (`TimedOut` for a dead peer, etc.).
        kind: std::io::ErrorKind,
        /// Its text.
        message: String,
    },
    /// Another QUIC failure (a transport error, a version mismatch).
    #[error("QUIC connection failed: {0}")]
    Quic(quinn::ConnectionError),
}

impl LinkEnd {
    /// Whether this side decided the end: frames still queued from the
    /// peer are then dropped rather than delivered (as QUIC does).
    pub fn is_local(&self) -> bool {
        matches!(self, LinkEnd::Local | LinkEnd::Mux(_))
    }

    pub(crate) fn io(e: &std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            return LinkEnd::Lost;
        }
        LinkEnd::Io {
            kind: e.kind(),
            message: e.to_string(),
        }
    }
}

impl From<quinn::ConnectionError> for LinkEnd {
    fn from(e: quinn::ConnectionError) -> Self {
        match e {
            quinn::ConnectionError::ApplicationClosed(c) => LinkEnd::Closed {
                code: CloseCode::from_u16(
                    u16::try_from(c.error_code.into_inner()).unwrap_or(u16::MAX),
                ),
                reason: String::from_utf8_lossy(&c.reason).into_owned(),
            },
            quinn::ConnectionError::LocallyClosed => LinkEnd::Local,
            quinn::ConnectionError::TimedOut => LinkEnd::TimedOut,
            quinn::ConnectionError::Reset => LinkEnd::Lost,
            other => LinkEnd::Quic(other),
        }
    }
}

/// Why an operation on a link failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// The link has ended.
    #[error(transparent)]
    Ended(#[from] LinkEnd),
    /// A QUIC stream write failed (other than by the connection ending).
    #[error("QUIC stream write failed: {0}")]
    QuicWrite(quinn::WriteError),
    /// A QUIC stream read failed (other than by the connection ending).
    #[error("QUIC stream read failed: {0}")]
    QuicRead(quinn::ReadError),
    /// The peer sent bytes that do not decode as a frame.
    #[error("bad frame from the peer: {0}")]
    Decode(#[from] DecodeError),
    /// A channel ended in the middle of a frame.
    #[error("the peer ended a channel inside a frame")]
    Truncated,
    /// This side already ended the channel written to.
    #[error("this side already ended that channel")]
    Finished,
    /// The TCP control channel was already taken by an earlier
    /// `open_control` or `accept_control`.
    #[error("the control channel of this link is already in use")]
    ControlInUse,
    /// The handshake got another frame than the one it waits for.
    #[error("expected {expected}, got a {got} frame")]
    Unexpected {
        /// What the protocol says comes next.
        expected: &'static str,
        /// What came ([`Frame::name`]).
        got: &'static str,
    },
    /// The control channel ended before the handshake's frame came.
    #[error("the control channel ended before {0}")]
    EndedBefore(&'static str),
    /// The peer refused the link with a Close frame.
    #[error("refused by the peer ({code:?}): {reason}")]
    Refused {
        /// The peer's code.
        code: CloseCode,
        /// The peer's words.
        reason: String,
    },
    /// A handshake step took longer than allowed.
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    /// A failure of the QUIC frame reader not listed above (it returns
    /// none today).
    #[error(transparent)]
    Reader(super::LinkError),
    /// A zstd compressor could not be made.
    #[error("cannot create a zstd compressor: {0}")]
    Compressor(std::io::Error),
}

impl ConnError {
    /// The close code this side should use when the peer caused `self`
    /// (bad bytes), if it did.
    pub fn peer_fault(&self) -> Option<CloseCode> {
        match self {
            ConnError::Decode(e) => Some(e.close_code()),
            ConnError::Truncated | ConnError::Unexpected { .. } => Some(CloseCode::Malformed),
            _ => None,
        }
    }
}

impl From<quinn::WriteError> for ConnError {
    fn from(e: quinn::WriteError) -> Self {
        match e {
            quinn::WriteError::ConnectionLost(c) => ConnError::Ended(c.into()),
            other => ConnError::QuicWrite(other),
        }
    }
}

impl From<super::LinkError> for ConnError {
    /// The errors [`FrameReader`] returns.
    fn from(e: super::LinkError) -> Self {
        use super::LinkError as L;
        match e {
            L::Connection(c) => ConnError::Ended(c.into()),
            L::Read(quinn::ReadError::ConnectionLost(c)) => ConnError::Ended(c.into()),
            L::Read(r) => ConnError::QuicRead(r),
            L::Write(w) => w.into(),
            L::Decode(d) => ConnError::Decode(d),
            L::Truncated => ConnError::Truncated,
            L::Refused { code, reason } => ConnError::Refused { code, reason },
            L::Timeout(what) => ConnError::Timeout(what),
            // FrameReader returns neither.
            other @ (L::Protocol(_) | L::Local(_)) => ConnError::Reader(other),
        }
    }
}

/// A QUIC connection as a link, with the bounds its readers enforce.
#[derive(Clone, Debug)]
pub struct QuicLink {
    /// The connection.
    pub conn: quinn::Connection,
    /// The bounds frames read from it are held to.
    pub limits: Limits,
}

impl QuicLink {
    /// The control channel's halves from a newly opened or accepted
    /// bidirectional stream, at the highest priority.
    fn control(
        &self,
        bi: Result<(quinn::SendStream, quinn::RecvStream), quinn::ConnectionError>,
    ) -> Result<(ControlSender, FrameReceiver), ConnError> {
        let (send, recv) = bi.map_err(LinkEnd::from)?;
        let _ = send.set_priority(CONTROL_PRIORITY);
        Ok((
            ControlSender::Quic(send),
            FrameReceiver::Quic(FrameReader::new(recv, self.limits)),
        ))
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

/// QUIC priority of the control stream: above every lane stream.
const CONTROL_PRIORITY: i32 = LANES as i32 + 1;

impl Link {
    /// A link over the QUIC connection `conn`, reading frames within `limits`.
    pub fn quic(conn: quinn::Connection, limits: Limits) -> Self {
        Link::Quic(QuicLink { conn, limits })
    }

    /// Which transport it runs over.
    pub fn transport(&self) -> Transport {
        match self {
            Link::Quic(_) => Transport::Quic,
            Link::Tcp(_) => Transport::Tcp,
        }
    }

    /// The key the peer proved in the TLS handshake.
    pub fn peer_key(&self) -> Option<PublicKey> {
        match self {
            Link::Quic(q) => crate::transport::peer_key(&q.conn).map(PublicKey),
            Link::Tcp(t) => Some(PublicKey(t.peer_key())),
        }
    }

    /// The peer's address.
    pub fn remote_address(&self) -> SocketAddr {
        match self {
            Link::Quic(q) => q.conn.remote_address(),
            Link::Tcp(t) => t.remote_address(),
        }
    }

    /// The connecting side: opens the control channel (QUIC: the first
    /// bidirectional stream, at the highest priority).
    pub async fn open_control(&self) -> Result<(ControlSender, FrameReceiver), ConnError> {
        match self {
            Link::Quic(q) => q.control(q.conn.open_bi().await),
            Link::Tcp(t) => {
                let (send, recv) = t.control()?;
                Ok((ControlSender::Tcp(send), FrameReceiver::Tcp(recv)))
            }
        }
    }

    /// The accepting side: waits for the peer's control channel (QUIC:
    /// until the peer has sent on it; TCP: at once).
    pub async fn accept_control(&self) -> Result<(ControlSender, FrameReceiver), ConnError> {
        match self {
            Link::Quic(q) => q.control(q.conn.accept_bi().await),
            Link::Tcp(_) => self.open_control().await,
        }
    }

    /// The sender of this side's lanes (one per link: it owns the lane
    /// streams or channels).
    pub fn lane_sender(&self) -> LaneSender {
        match self {
            Link::Quic(q) => LaneSender::Quic(QuicLanes {
                conn: q.conn.clone(),
                streams: Default::default(),
            }),
            Link::Tcp(t) => LaneSender::Tcp(t.lane_sender()),
        }
    }

    /// The next lane the peer starts sending on, as a frame receiver; an
    /// error once the link has ended. At most four per link on TCP.
    pub async fn accept_lane(&self) -> Result<FrameReceiver, ConnError> {
        match self {
            Link::Quic(q) => {
                let recv = q.conn.accept_uni().await.map_err(LinkEnd::from)?;
                Ok(FrameReceiver::Quic(FrameReader::new(recv, q.limits)))
            }
            Link::Tcp(t) => Ok(FrameReceiver::Tcp(t.accept_lane().await?)),
        }
    }

    /// Closes the link at once with `code` and `reason` (cut to 1024
    /// bytes): what is unsent is dropped, the peer learns the code and
    /// reason.
    pub fn close(&self, code: CloseCode, reason: &str) {
        match self {
            Link::Quic(q) => q
                .conn
                .close(quinn::VarInt::from_u32(code as u32), reason.as_bytes()),
            Link::Tcp(t) => t.close(code, reason),
        }
    }

    /// Waits until the link has ended and says why.
    pub async fn closed(&self) -> LinkEnd {
        match self {
            Link::Quic(q) => q.conn.closed().await.into(),
            Link::Tcp(t) => t.closed().await,
        }
    }

    /// Why the link ended, if it has.
    pub fn end(&self) -> Option<LinkEnd> {
        match self {
            Link::Quic(q) => q.conn.close_reason().map(LinkEnd::from),
            Link::Tcp(t) => t.end(),
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
    pub async fn send(&mut self, frame: &Frame) -> Result<(), ConnError> {
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

/// Whole frames from one channel of a link, within the link's limits.
pub enum FrameReceiver {
    /// A QUIC stream.
    Quic(FrameReader),
    /// A TCP mux channel.
    Tcp(TcpReceiver),
}

impl FrameReceiver {
    /// The next frame; `Ok(None)` once the peer ended the channel cleanly
    /// between frames.
    pub async fn next(&mut self) -> Result<Option<Frame>, ConnError> {
        match self {
            FrameReceiver::Quic(r) => Ok(r.next().await?),
            FrameReceiver::Tcp(r) => r.next().await,
        }
    }

    /// Stops reading: the peer is told to stop sending (QUIC), or what
    /// arrives is discarded (TCP cannot stop one channel of a connection).
    pub fn stop(&mut self, code: CloseCode) {
        match self {
            FrameReceiver::Quic(r) => r.stop(code),
            FrameReceiver::Tcp(r) => r.stop(),
        }
    }
}

impl std::fmt::Debug for FrameReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameReceiver::Quic(_) => f.write_str("FrameReceiver::Quic"),
            FrameReceiver::Tcp(r) => f.debug_tuple("FrameReceiver::Tcp").field(r).finish(),
        }
    }
}

/// This side's lane streams of a QUIC link, opened on first use.
#[derive(Debug)]
pub struct QuicLanes {
    conn: quinn::Connection,
    streams: [Option<quinn::SendStream>; LANES],
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
    /// Sends one batch frame (length prefix included) on `lane`, waiting
    /// while the lane's buffer is full.
    pub async fn send(&mut self, lane: Lane, frame: Bytes) -> Result<(), ConnError> {
        match self {
            LaneSender::Quic(q) => {
                let s = super::lane_stream(&q.conn, &mut q.streams, lane.index()).await?;
                Ok(s.write_chunk(frame).await?)
            }
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
    ) -> Result<(), ConnError> {
        match self {
            LaneSender::Quic(q) => {
                let s = super::lane_stream(&q.conn, &mut q.streams, lane.index()).await?;
                Ok(s.write_all_chunks(&mut [head, body]).await?)
            }
            LaneSender::Tcp(t) => t.send(lane, [head, body]).await,
        }
    }

    /// Why the link ended, if it has.
    pub fn end(&self) -> Option<LinkEnd> {
        match self {
            LaneSender::Quic(q) => q.conn.close_reason().map(LinkEnd::from),
            LaneSender::Tcp(t) => t.end(),
        }
    }

    /// Waits until the link has ended and says why.
    pub async fn closed(&self) -> LinkEnd {
        match self {
            LaneSender::Quic(q) => q.conn.closed().await.into(),
            LaneSender::Tcp(t) => t.closed().await,
        }
    }

    /// Ends every lane this sender used, then waits until `deadline` at
    /// most for them to be delivered (QUIC: acknowledged by the peer;
    /// TCP: written to the socket).
    pub async fn finish(&mut self, deadline: tokio::time::Instant) {
        match self {
            LaneSender::Quic(q) => {
                for s in q.streams.iter_mut().flatten() {
                    let _ = s.finish();
                }
                for s in q.streams.iter_mut().flatten() {
                    let _ = tokio::time::timeout_at(deadline, s.stopped()).await;
                }
            }
            LaneSender::Tcp(t) => {
                t.finish();
                let _ = tokio::time::timeout_at(deadline, t.flushed()).await;
            }
        }
    }
}
