//! What the node's test modules share: the clock and the cells they use.

use super::{LinkInfo, Now};
use relay_codec::frame::{PROTOCOL_VERSION, Role};
use relay_codec::{Keypair, PublicKey};

/// The wall clock at mono time 0.
pub(super) const T0: u64 = 1_700_000_000_000;

/// The time `mono_ms` ms after mono time 0.
pub(super) fn at(mono_ms: u64) -> Now {
    Now {
        mono_ms,
        unix_ms: T0 + mono_ms,
    }
}

/// Test cell (or relay) number `i`'s keys.
pub(super) fn kp(i: u8) -> Keypair {
    Keypair::from_secret_bytes(&[i; 32])
}

/// Its public key.
pub(super) fn key(i: u8) -> PublicKey {
    kp(i).public()
}

/// A cell link of key `i` that asked for notices.
pub(super) fn cell(i: u8) -> LinkInfo {
    LinkInfo {
        key: key(i),
        role: Role::Cell,
        version: PROTOCOL_VERSION,
        notices: true,
    }
}
