//! Pure state machines: no I/O, time passed in as a value.
//!
//! The tokio/quinn shell feeds these events (a message id, a timestamp,
//! which queues are nonempty) with the time it read, and carries out what
//! they decide; so the mesh can be tested in one process, deterministically.

pub mod dedup;
pub mod freshness;
pub mod notices;
pub mod router;
pub mod stall;
pub mod ttl;

pub use dedup::{DedupVerdict, DedupWindow};
pub use freshness::{FreshnessWindow, Staleness};
pub use notices::{Notice, NoticeAggregator};
pub use router::{LinkId, PresenceReport, Route, Router};
pub use stall::{STUCK_AFTER_MS, StallGate};
