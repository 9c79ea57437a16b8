//! What a Celluler cell links to use a relay as its hop.

pub mod transport;
