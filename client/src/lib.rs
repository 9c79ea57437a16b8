//! What a Celluler cell links to use a relay as its hop.
//!
//! - [`cell`]: the application API: [`Cell::connect`] to a relay over QUIC
//!   or TLS over TCP ([`Transport`]), send to a cell, a service or everyone,
//!   receive checked messages and events, announce services, discover,
//!   watch presence; reconnects by itself.
//! - [`clock`]: the one reading of the wall clock (message timestamps).
//! - [`logging`]: stderr logs for the workspace's binaries (from
//!   `relay-link`, so the relay logs the same way).
//!
//! The link layer under it (TLS identities, QUIC and TCP, the handshake,
//! lane queues, writer and reader) is the crate `relay-link`, shared with
//! the relay; [`link`] re-exports it for applications that need its types
//! (a shared QUIC endpoint, tuning).
//!
//! The binary `cell` wraps [`cell`] for scripts: `cell keygen`, `cell id`,
//! `cell listen`, `cell send`, `cell discover`.

pub mod cell;
pub mod clock;

pub use relay_link::logging;

/// The link layer (`relay-link`), as a cell's options name it.
pub use relay_link as link;

pub use cell::{
    AuthMode, Cell, CellError, CellHandle, CellOptions, CellStats, Event, Received, ReceivedAuth,
    TraceHop, Undelivered,
};
pub use relay_codec::{Destination, Keypair, Lane, MessageId, NodeAddr, PublicKey, ServiceName};
pub use relay_link::Transport;
