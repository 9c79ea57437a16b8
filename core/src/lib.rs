//! The Celluler relay's decisions, pure: [`Node`] takes what happened to a
//! relay (a link up or down, a batch, a control frame, a timer) with the
//! time as a value and returns what to do about it, in a fixed order.
//!
//! **What pure means here.** Nothing in this crate opens a socket, spawns a
//! thread or a task, waits, reads a clock or draws the OS's randomness:
//! every time is the caller's ([`Now`]), every random choice comes from the
//! seed the node was made with (the dedup table's hash key, which messages
//! `Verify::Sampled` checks), and every list it returns is in an order set
//! by keys and link ids, never by a hash seed. Its dependencies
//! (relay-codec and a seeded generator without `std`) keep tokio, quinn and
//! rustls out of reach; what `std` and relay-codec still offer (the clock,
//! sockets, threads, `IdKey::random`, `Keypair::generate`) is not used here.
//!
//! **Why.** The relay's rules can then be tested one by one, without a
//! network or a runtime (`node` has a unit test per rule), and a simulation
//! can run many relays in one process, exchanging the node's actions as
//! messages on a simulated clock (`tests/sim.rs`): the same seed
//! and the same events give the same actions, so a failure replays from its
//! seed. The relay's tokio/quinn shell (crate `relay`) owns sockets, tasks,
//! queues, metrics and logs, and turns them into events and actions.
//!
//! **The mesh** ([`mesh`]): relay-to-relay links, membership, the
//! directory of where cells are, the route cache, forwarding across hops,
//! flooding, credit, traces; all inside [`Node`] (see
//! [`Node::with_mesh`]). Its deterministic simulation is
//! `core/tests/sim.rs`:
//!
//! - `cargo test -p relay-core --test sim`: a bounded set of seeds (CI);
//! - `SIM_SEED=N cargo test -p relay-core --test sim replay -- --nocapture`:
//!   replays seed N exactly;
//! - `SIM_SEEDS=10000 cargo test -p relay-core --release --test sim long_run -- --ignored --nocapture`:
//!   the long run;
//! - `cargo test -p relay-core --release --test sim scale_run -- --ignored --nocapture`:
//!   the scale run (1,000 relays, 100,000 cells).
//!
//! The pieces the node is built of are public too: [`DedupWindow`],
//! [`FreshnessWindow`], [`ttl`], [`Router`], [`NoticeAggregator`],
//! [`StallGate`], and the reasons the shell counts ([`DropReason`],
//! [`CloseReason`]). [`StallGate`] is shared between threads by the shell,
//! so it uses atomics; they only store the caller's values.

#![warn(missing_docs)]

pub mod dedup;
pub mod durable;
pub mod freshness;
pub mod mesh;
pub mod node;
pub mod notices;
pub mod reason;
pub mod router;
pub mod stall;
pub mod ttl;

pub use dedup::{DedupVerdict, DedupWindow};
pub use durable::{DurableConfig, DurableQueues, LogRefusal};
pub use freshness::{FreshnessWindow, Staleness};
pub use mesh::{Mesh, MeshConfig, MeshConfigError, MeshStats};
pub use node::{
    Action, Admission, Departed, LinkInfo, Node, NodeConfig, NodeConfigError, Now, QueueRefusal,
    Undelivered, Verify,
};
pub use notices::{Notice, NoticeAggregator};
pub use reason::{CloseReason, DropReason};
pub use router::{LinkId, PresenceReport, Route, Router};
pub use stall::{STUCK_AFTER_MS, StallGate};
