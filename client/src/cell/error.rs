//! Why a cell operation failed.

#[cfg(doc)]
use super::CellOptions;
use relay_codec::KeyError;
use relay_codec::frame::CloseCode;
use relay_link::{LinkError, TransportError};
use std::net::SocketAddr;
use thiserror::Error;

/// Why a cell operation failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum CellError {
    /// A local I/O failure.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The relay's host name did not resolve.
    #[error("cannot resolve relay host {host:?}: {reason}; check HOST in KEY@HOST:PORT")]
    Resolve {
        /// The host.
        host: String,
        /// What the resolver said.
        reason: String,
    },
    /// The QUIC endpoint or TLS configuration could not be built.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The QUIC or TCP connection to the relay could not be set up.
    #[error("could not connect to the relay at {addr}: {reason}")]
    Connect {
        /// The relay's address.
        addr: SocketAddr,
        /// What failed, with a hint.
        reason: String,
    },
    /// The link protocol failed.
    #[error("link to the relay failed: {0}")]
    Link(LinkError),
    /// The relay refused the link, saying why.
    #[error("the relay refused the link ({code:?}): {reason}")]
    Refused {
        /// The relay's code.
        code: CloseCode,
        /// The relay's words.
        reason: String,
    },
    /// A step took longer than allowed.
    #[error("{0}")]
    Timeout(String),
    /// A payload is over the limit in force (this cell's, or the relay's
    /// from its Welcome, whichever is lower).
    #[error(
        "payload is {size} bytes, over the limit of {limit}; split it into smaller messages \
         (or raise max_payload on the relay and in CellOptions::limits)"
    )]
    PayloadTooLarge {
        /// The payload's length.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// An argument is not acceptable.
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// The cell was closed.
    #[error("the cell is closed")]
    Closed,
    /// The link is down (reconnecting, or for good without
    /// [`CellOptions::reconnect`]).
    #[error("the link to the relay is down: {0}")]
    Disconnected(String),
    /// On close, messages were still queued and could not be sent.
    #[error("{count} queued message(s) were not sent: {reason}")]
    Unsent {
        /// How many.
        count: usize,
        /// Why.
        reason: String,
    },
    /// The relay did not take a durable message: its log is full, it
    /// failed, or the message expired before its destination took it.
    #[error("durable message {id} {}", status.name())]
    DurableRefused {
        /// The message.
        id: relay_codec::MessageId,
        /// What the relay said.
        status: relay_codec::frame::DurableStatus,
    },
    /// A key or address is not valid.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The task that runs the cell's link panicked or was cancelled (a
    /// bug: please report it with the log).
    #[error("the cell's link task failed: {0}")]
    TaskFailed(tokio::task::JoinError),
}

impl From<LinkError> for CellError {
    fn from(e: LinkError) -> Self {
        match e {
            LinkError::Refused { code, reason } => CellError::Refused { code, reason },
            e => CellError::Link(e),
        }
    }
}
