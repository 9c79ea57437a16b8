//! QUIC link layer.
