//! The Celluler relay node.
//!
//! - [`core`]: pure state machines (router and presence table, dedup window,
//!   freshness window, notices, stall gate, TTL) that take events and the
//!   time as values and return decisions;
//! - [`node`]: the tokio shell that owns the listeners (QUIC and TLS over
//!   TCP, through `relay-link`), the link tasks and the clock;
//! - [`config`]: the TOML configuration and its validation;
//! - [`metrics`] and [`admin`]: Prometheus counters and the admin HTTP endpoint.

pub mod admin;
pub mod config;
pub mod core;
pub mod metrics;
pub mod node;
