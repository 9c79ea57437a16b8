//! The Celluler relay node.

pub mod config;
pub mod core;
