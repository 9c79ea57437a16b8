//! The cell side of a link: what an application links to use a relay as its
//! hop.
//!
//! A [`Cell`] holds one link to one relay (see docs/ARCHITECTURE.md, "Identity and
//! links"), over QUIC or TLS over TCP ([`CellOptions::transport`]): a
//! control channel carries control frames both ways (Hello/Welcome,
//! Announce, Discover, presence, notices, Close), and each side sends its
//! messages in batch frames on its lanes (QUIC: a unidirectional stream per
//! lane; TCP: chunks interleaved on the one connection).
//!
//! What the cell checks ("What is checked where"): the relay proved its key
//! during the TLS handshake (pinned from [`NodeAddr::key`](relay_codec::NodeAddr::key)); every received
//! message that carries an ed25519 signature is verified before the
//! application sees it, duplicates are dropped, and messages the cell cannot
//! check yet (sealed with an AEAD tag) are dropped and counted. Unsigned
//! messages are delivered marked [`ReceivedAuth::Link`]: the relay vouched
//! for their source.
//!
//! Received messages reach the application one batch frame at a time: a
//! lane's reader decodes a batch, checks it, and hands over what passed in
//! one queue operation; [`Cell::next_event`] and [`Cell::recv`] then pop
//! from the batch, and [`Cell::recv_many`] takes many at once.
//!
//! Backpressure: sending waits while the lane's queue is full (own messages
//! are never dropped); receiving waits while [`CellOptions::event_queue`]
//! messages wait for the application, which slows this cell's own link only
//! (the relay drops or stores for it).
//!
//! Many cells can share one QUIC endpoint (one UDP socket): see
//! [`CellOptions::endpoint`].
//!
//! The module is split along its seams:
//!
//! - `options`: [`CellOptions`] and [`AuthMode`], and their validation;
//! - `event`: what the application receives ([`Event`], [`Received`]) and
//!   the tallies it can read ([`CellStats`], [`Undelivered`]);
//! - `error`: [`CellError`];
//! - `handle`: the API, [`Cell`] and [`CellHandle`], over the state they
//!   share with the link tasks;
//! - `connect`: one dial of the relay (resolve, QUIC or TCP, Hello and
//!   Welcome, announce) and the endpoints reused across dials;
//! - `session`: one connection's tasks, reconnecting with
//!   [`relay_link::dial::Backoff`], and the orderly close;
//! - `receive`: the lane readers and the end-to-end checks (signatures,
//!   unsupported messages, duplicates through the relay's own
//!   [`relay_core::DedupWindow`]).

mod connect;
mod error;
mod event;
mod handle;
mod options;
mod receive;
mod session;

pub use error::CellError;
pub use event::{
    CellStats, Event, MAX_UNDELIVERED_DESTINATIONS, Received, ReceivedAuth, TraceHop, Undelivered,
};
pub use handle::{Cell, CellHandle, DurableReceipt};
pub use options::{AuthMode, CellOptions};
