//! The Celluler relay node: pure decision-making state machines in [`core`],
//! configuration in [`config`].

pub mod config;
pub mod core;
