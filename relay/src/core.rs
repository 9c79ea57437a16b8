//! The relay's pure pieces, from the `relay-core` crate, under the path
//! the shell has always used (`crate::core::...`).
//!
//! The lane scheduler is re-exported here too: it lives in the client
//! crate because cells and relays share the link writer that uses it.

pub use relay_client::lanes;
pub use relay_client::lanes::{DEFAULT_LANE_WEIGHTS, LANES, LaneScheduler, MAX_LANE_WEIGHT};
pub use relay_core::*;
