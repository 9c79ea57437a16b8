//! Relay configuration.
