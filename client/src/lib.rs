//! What a Celluler cell links to use a relay as its hop.
//!
//! - [`transport`]: QUIC endpoints whose TLS identity is the node's ed25519 key.
//! - [`link`]: lane queues, the batching writer, the frame reader and the
//!   Hello/Welcome handshake, shared with the relay.
//! - [`lanes`]: the weighted lane scheduler.

pub mod lanes;
pub mod link;
pub mod transport;
