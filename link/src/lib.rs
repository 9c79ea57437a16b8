//! What both ends of a Celluler link share, cells and relays alike.
//!
//! A link is one authenticated connection between two nodes, over QUIC or
//! TLS 1.3 over TCP, carrying a control channel (Hello/Welcome, Announce,
//! Discover, presence, notices, Close) and four lanes of batch frames
//! (docs/PROTOCOL.md). The modules, from the socket up:
//!
//! - [`tls`]: raw-public-key TLS 1.3 (RFC 7250) with ed25519 identities,
//!   the verifiers and the rustls configs of both transports;
//! - [`quic`]: quinn configs and endpoints, and [`quic::QuicLink`];
//! - [`tcp`]: the TCP listener (handshake deadline and cap) and connector,
//!   and [`tcp::TcpLink`], the control channel and lanes as chunks on one
//!   TLS stream;
//! - [`conn`]: the [`Link`] interface over both (an enum: static dispatch,
//!   nothing boxed per frame), its [`ControlSender`] and [`LaneSender`];
//! - [`dial`]: [`Backoff`] and [`redial`], redialing a lost link with
//!   exponential backoff and seeded jitter;
//! - [`handshake`]: [`hello`] and [`accept_hello`] for either role, and
//!   [`close`], the close that tells the peer why;
//! - [`lanes`]: the bounded outbound [`LaneQueues`] and the weighted
//!   [`LaneScheduler`];
//! - [`writer`]: [`run_writer`], which drains the queues into batch frames;
//! - [`reader`]: [`FrameReceiver`] (frames from one channel) and
//!   [`BatchReader`] (a lane's batches, decoded);
//! - [`error`]: [`LinkError`], [`LinkEnd`], [`TransportError`];
//! - [`logging`]: the stderr log format of the binaries at both ends.
//!
//! Nothing in this crate knows whether it serves a cell or a relay.

#![warn(missing_docs)]

pub mod conn;
pub mod dial;
pub mod error;
pub mod handshake;
pub mod lanes;
pub mod logging;
pub mod quic;
pub mod reader;
pub mod tcp;
pub mod tls;
pub mod writer;

pub use conn::{ControlSender, LaneSender, Link, Transport, UnknownTransport};
pub use dial::{Attempt, Backoff, BackoffError, redial};
pub use error::{LinkEnd, LinkError, TransportError};
pub use handshake::{Hello, Welcome, accept_hello, close, hello};
pub use lanes::{DEFAULT_LANE_WEIGHTS, ForwardedBatch, LANES, LaneQueues, LaneScheduler, Outbound};
pub use reader::{BatchReader, FrameReceiver};
pub use writer::{NoObserver, WriteObserver, WriterConfig, run_writer};
