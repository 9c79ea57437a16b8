//! What a Celluler cell links to use a relay as its hop.
//!
//! - [`cell`]: the application API: [`Cell::connect`] to a relay, send to a
//!   cell, a service or everyone, receive checked messages and events,
//!   announce services, discover, watch presence; reconnects by itself.
//! - [`transport`]: QUIC endpoints whose TLS identity is the node's ed25519 key;
//!   [`transport::tcp`]: the same identity over TLS on TCP.
//! - [`link`]: lane queues, the batching writer, the frame reader and the
//!   Hello/Welcome handshake, shared with the relay; [`link::conn`]: one
//!   interface over QUIC and TCP links, [`link::session`]: the handshake and
//!   writer over it, [`link::tcp`]: the TCP link's chunk multiplexing.
//! - [`lanes`]: the weighted lane scheduler.
//! - [`logging`]: stderr logs for the workspace's binaries.
//!
//! The binary `cell` wraps [`cell`] for scripts: `cell keygen`, `cell id`,
//! `cell listen`, `cell send`, `cell discover`.

pub mod cell;
pub mod lanes;
pub mod link;
pub mod logging;
pub mod transport;

pub use cell::{
    AuthMode, Cell, CellError, CellHandle, CellOptions, CellStats, Event, Received, ReceivedAuth,
    Undelivered,
};
pub use relay_codec::{Destination, Keypair, Lane, MessageId, NodeAddr, PublicKey, ServiceName};
