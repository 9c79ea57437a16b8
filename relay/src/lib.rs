//! The Celluler relay node.
//!
//! - [`node`]: the tokio shell that owns the listeners (QUIC and TLS over
//!   TCP, through `relay-link`), the link tasks, the queues and the clock,
//!   and drives the relay's decisions, the pure `relay_core::Node`;
//! - [`config`]: the TOML configuration and its validation;
//! - [`metrics`] and [`admin`]: Prometheus counters and the admin HTTP endpoint.

pub mod admin;
pub mod config;
pub mod metrics;
pub mod node;
