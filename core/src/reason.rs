//! Why a message was dropped and why a link closed: what the node's
//! actions say and the relay's metrics count, each with its label value.

use relay_codec::frame::CloseCode;

/// Why a message was dropped; in the relay's metrics, the `reason` label
/// of `celluler_drops_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// It claimed a source other than the link's key.
    ForgedSource,
    /// It was over a size bound.
    Oversize,
    /// Its bytes did not decode.
    Malformed,
    /// It was already seen (dedup window).
    Duplicate,
    /// Its timestamp is older than the accepted window.
    Expired,
    /// Its timestamp is too far in the future.
    FromFuture,
    /// Its signature did not verify.
    BadSignature,
    /// The receiver read too slowly for a best-effort lane.
    SlowReceiver,
    /// No cell or route for its destination.
    UnknownDestination,
    /// It ran out of hops.
    TtlExpired,
    /// The link carrying it was refused for lack of link slots.
    TooManyLinks,
    /// The relay was shutting down.
    Shutdown,
}

impl DropReason {
    /// Every reason, in label order.
    pub const ALL: [DropReason; 12] = [
        DropReason::ForgedSource,
        DropReason::Oversize,
        DropReason::Malformed,
        DropReason::Duplicate,
        DropReason::Expired,
        DropReason::FromFuture,
        DropReason::BadSignature,
        DropReason::SlowReceiver,
        DropReason::UnknownDestination,
        DropReason::TtlExpired,
        DropReason::TooManyLinks,
        DropReason::Shutdown,
    ];

    /// The snake_case label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            DropReason::ForgedSource => "forged_source",
            DropReason::Oversize => "oversize",
            DropReason::Malformed => "malformed",
            DropReason::Duplicate => "duplicate",
            DropReason::Expired => "expired",
            DropReason::FromFuture => "from_future",
            DropReason::BadSignature => "bad_signature",
            DropReason::SlowReceiver => "slow_receiver",
            DropReason::UnknownDestination => "unknown_destination",
            DropReason::TtlExpired => "ttl_expired",
            DropReason::TooManyLinks => "too_many_links",
            DropReason::Shutdown => "shutdown",
        }
    }
}

/// Why a link closed; in the relay's metrics, the `reason` label of
/// `celluler_links_closed_total`.
///
/// The first eleven mirror [`CloseCode`] (what this node or the peer sent in
/// a Close frame); the rest cover closes without a Close frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CloseReason {
    /// Orderly close ([`CloseCode::Normal`]).
    Normal,
    /// Protocol version mismatch ([`CloseCode::Version`]).
    Version,
    /// Key not allowed ([`CloseCode::Unauthorized`]).
    Unauthorized,
    /// Forged message source ([`CloseCode::ForgedSource`]).
    ForgedSource,
    /// Frame or message over its bound ([`CloseCode::Oversize`]).
    Oversize,
    /// Undecodable bytes ([`CloseCode::Malformed`]).
    Malformed,
    /// Link limit reached ([`CloseCode::TooManyLinks`]).
    TooManyLinks,
    /// Node shutting down ([`CloseCode::Shutdown`]).
    Shutdown,
    /// Sent faster than allowed ([`CloseCode::RateLimited`]).
    RateLimited,
    /// Silent past the idle timeout ([`CloseCode::Idle`]).
    Idle,
    /// Bad signatures ([`CloseCode::BadSignature`]).
    BadSignature,
    /// The peer went away (connection closed without a Close frame).
    PeerClosed,
    /// The transport timed out.
    TimedOut,
    /// A newer link from the same key replaced this one.
    Replaced,
    /// The handshake did not complete.
    HandshakeFailed,
    /// The relay's task serving the link failed (a bug: it panicked); the
    /// link was closed and released all the same.
    Internal,
}

impl CloseReason {
    /// Every reason, in label order.
    pub const ALL: [CloseReason; 16] = [
        CloseReason::Normal,
        CloseReason::Version,
        CloseReason::Unauthorized,
        CloseReason::ForgedSource,
        CloseReason::Oversize,
        CloseReason::Malformed,
        CloseReason::TooManyLinks,
        CloseReason::Shutdown,
        CloseReason::RateLimited,
        CloseReason::Idle,
        CloseReason::BadSignature,
        CloseReason::PeerClosed,
        CloseReason::TimedOut,
        CloseReason::Replaced,
        CloseReason::HandshakeFailed,
        CloseReason::Internal,
    ];

    /// The snake_case label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            CloseReason::Normal => "normal",
            CloseReason::Version => "version",
            CloseReason::Unauthorized => "unauthorized",
            CloseReason::ForgedSource => "forged_source",
            CloseReason::Oversize => "oversize",
            CloseReason::Malformed => "malformed",
            CloseReason::TooManyLinks => "too_many_links",
            CloseReason::Shutdown => "shutdown",
            CloseReason::RateLimited => "rate_limited",
            CloseReason::Idle => "idle",
            CloseReason::BadSignature => "bad_signature",
            CloseReason::PeerClosed => "peer_closed",
            CloseReason::TimedOut => "timed_out",
            CloseReason::Replaced => "replaced",
            CloseReason::HandshakeFailed => "handshake_failed",
            CloseReason::Internal => "internal",
        }
    }
}

impl From<CloseCode> for CloseReason {
    fn from(code: CloseCode) -> Self {
        match code {
            CloseCode::Normal => CloseReason::Normal,
            CloseCode::Version => CloseReason::Version,
            CloseCode::Unauthorized => CloseReason::Unauthorized,
            CloseCode::ForgedSource => CloseReason::ForgedSource,
            CloseCode::Oversize => CloseReason::Oversize,
            CloseCode::Malformed => CloseReason::Malformed,
            CloseCode::TooManyLinks => CloseReason::TooManyLinks,
            CloseCode::Shutdown => CloseReason::Shutdown,
            CloseCode::RateLimited => CloseReason::RateLimited,
            CloseCode::Idle => CloseReason::Idle,
            CloseCode::BadSignature => CloseReason::BadSignature,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn labels_are_distinct_and_every_close_code_has_its_reason() {
        let drops: BTreeSet<&str> = DropReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(drops.len(), DropReason::ALL.len());
        let closes: BTreeSet<&str> = CloseReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(closes.len(), CloseReason::ALL.len());
        let from_codes: BTreeSet<&str> = (0..=10u16)
            .map(|v| CloseReason::from(CloseCode::from_u16(v)).as_str())
            .collect();
        assert_eq!(from_codes.len(), 11, "one reason per close code");
    }
}
