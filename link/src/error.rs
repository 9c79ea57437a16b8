//! The errors of the link layer, one `thiserror` enum each:
//!
//! - [`TransportError`]: a TLS config, QUIC config or endpoint could not be
//!   built (setup, before any link);
//! - [`LinkEnd`]: why a link ended, the same words for QUIC and TCP;
//! - [`LinkError`]: why an operation on a link failed (the handshake, a
//!   send, a read), with a typed variant for every condition a caller
//!   tells apart, and [`LinkError::peer_fault`] for the close code owed to
//!   a peer that sent bad bytes.
//!
//! Every message names its cause itself and no variant has a `source()`
//! (an error chain says the cause once).

use quinn::crypto::rustls::NoInitialCipherSuite;
use relay_codec::frame::CloseCode;
use relay_codec::mux::MuxError;
use relay_codec::{DecodeError, Lane};
use std::net::SocketAddr;

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
    /// A [`TransportTuning`](crate::quic::TransportTuning) value does not fit QUIC's limits.
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
pub enum LinkError {
    /// The link has ended.
    #[error(transparent)]
    Ended(#[from] LinkEnd),
    /// The peer told this side to stop sending on a channel (QUIC
    /// `STOP_SENDING`, with the peer's code).
    #[error("the peer stopped reading a channel of the link (code {0})")]
    Stopped(u64),
    /// The peer abandoned a channel it was sending on (QUIC `RESET_STREAM`,
    /// with the peer's code).
    #[error("the peer abandoned a channel of the link (code {0})")]
    Reset(u64),
    /// The peer sent bytes that do not decode as a frame.
    #[error("bad frame from the peer: {0}")]
    Decode(#[from] DecodeError),
    /// A channel ended in the middle of a frame.
    #[error("the peer's channel ended inside a frame")]
    Truncated,
    /// This side already ended (or stopped) the channel used.
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
        /// What came ([`relay_codec::Frame::name`]).
        got: &'static str,
    },
    /// The control channel ended before the handshake's frame came.
    #[error("the control channel ended before {0}")]
    EndedBefore(&'static str),
    /// The peer refused the link with a Close frame (or closed it with a
    /// code during the handshake).
    #[error("refused by the peer ({code:?}): {reason}")]
    Refused {
        /// The peer's code.
        code: CloseCode,
        /// The peer's words.
        reason: String,
    },
    /// The accepting side answered with a protocol version this side does
    /// not speak.
    #[error("the peer answered with link protocol version {theirs}; this side speaks up to {ours}")]
    Version {
        /// The highest version this side speaks.
        ours: u16,
        /// The version in the peer's Welcome.
        theirs: u16,
    },
    /// A handshake step took longer than allowed.
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    /// A lane carried another frame than a batch.
    #[error("{0} frame on a data stream; only batch frames belong there")]
    NotBatch(&'static str),
    /// A lane carried batches of two lanes.
    #[error("a data stream carries batches of one lane only: {first:?}, then {got:?}")]
    MixedLanes {
        /// The lane of the channel's first batch.
        first: Lane,
        /// The lane of the batch that differs.
        got: Lane,
    },
    /// A zstd context could not be made (out of memory).
    #[error("cannot create a zstd context: {0}")]
    Zstd(std::io::Error),
}

impl LinkError {
    /// The close code this side should use when the peer caused `self`
    /// (bad bytes or a broken protocol), if it did.
    pub fn peer_fault(&self) -> Option<CloseCode> {
        match self {
            LinkError::Decode(e) => Some(e.close_code()),
            LinkError::Truncated
            | LinkError::Unexpected { .. }
            | LinkError::NotBatch(_)
            | LinkError::MixedLanes { .. } => Some(CloseCode::Malformed),
            _ => None,
        }
    }

    /// The peer's code and reason, if the peer closed or refused the link.
    pub fn refusal(&self) -> Option<(CloseCode, &str)> {
        match self {
            LinkError::Refused { code, reason }
            | LinkError::Ended(LinkEnd::Closed { code, reason }) => Some((*code, reason)),
            _ => None,
        }
    }
}

impl From<quinn::WriteError> for LinkError {
    fn from(e: quinn::WriteError) -> Self {
        match e {
            quinn::WriteError::Stopped(code) => LinkError::Stopped(code.into_inner()),
            quinn::WriteError::ConnectionLost(c) => LinkError::Ended(c.into()),
            quinn::WriteError::ClosedStream => LinkError::Finished,
            // 0-RTT is off on every Celluler link.
            quinn::WriteError::ZeroRttRejected => LinkError::Ended(LinkEnd::Lost),
        }
    }
}

impl From<quinn::ReadError> for LinkError {
    fn from(e: quinn::ReadError) -> Self {
        match e {
            quinn::ReadError::Reset(code) => LinkError::Reset(code.into_inner()),
            quinn::ReadError::ConnectionLost(c) => LinkError::Ended(c.into()),
            // This side stopped the stream.
            quinn::ReadError::ClosedStream => LinkError::Finished,
            // Streams are read in order by one reader, and 0-RTT is off.
            quinn::ReadError::IllegalOrderedRead | quinn::ReadError::ZeroRttRejected => {
                LinkError::Ended(LinkEnd::Lost)
            }
        }
    }
}

impl From<quinn::ConnectionError> for LinkError {
    fn from(e: quinn::ConnectionError) -> Self {
        LinkError::Ended(e.into())
    }
}
