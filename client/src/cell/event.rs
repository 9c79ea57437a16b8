//! What a cell hands its application: events and received messages, and
//! the tallies it keeps of what was dropped.

#[cfg(doc)]
use super::{Cell, CellOptions};
use bytes::Bytes;
use relay_codec::frame::{NoticeCode, PresenceInfo};
use relay_codec::{Destination, Lane, MessageId, PublicKey};
use std::collections::BTreeMap;

/// Destinations [`Undelivered`] keeps apart; drops to further ones are
/// counted under the zero key.
pub const MAX_UNDELIVERED_DESTINATIONS: usize = 64;

/// How a received message was authenticated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReceivedAuth {
    /// Its ed25519 signature by the source was verified by this cell.
    Signature,
    /// It was unsigned: its source is what the relay vouched for (the relay
    /// proved the sender's link key).
    Link,
}

/// A message delivered to this cell, after the end-to-end checks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Received {
    /// Its id (a hash of its authenticated bytes).
    pub id: MessageId,
    /// Who sent it.
    pub source: PublicKey,
    /// Where it was sent: this cell, a broadcast, or a service.
    pub destination: Destination,
    /// Its lane.
    pub lane: Lane,
    /// The sender's clock when it was sent, ms since the Unix epoch.
    pub timestamp_ms: u64,
    /// The application bytes.
    pub payload: Bytes,
    /// How its origin was established.
    pub auth: ReceivedAuth,
    /// Whether it was sent durable: the relay keeps it until this cell
    /// acknowledges it (on receipt by default, see
    /// [`CellOptions::ack_durable_on_receive`], or with
    /// [`Cell::ack_durable`]).
    pub durable: bool,
}

/// Something that happened on the link, in the order it happened per lane.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// A message for this cell.
    Message(Received),
    /// A watched cell attached (`up`) or detached; see
    /// [`Cell::watch_presence`].
    Presence {
        /// Attached or detached.
        up: bool,
        /// Who, and what it offers.
        info: PresenceInfo,
    },
    /// The relay dropped `count` messages this cell sent, for one reason
    /// and destination (when [`CellOptions::notices`] is on). A relay sums
    /// its drops and sends at most one such notice per reason and
    /// destination per interval (100 ms by default); the running totals
    /// are in [`Cell::undelivered`], which also counts notices whose event
    /// found the queue full.
    Notice {
        /// Why they were dropped; [`NoticeCode::describe`] says it in words.
        code: NoticeCode,
        /// How many messages (at least 1).
        count: u32,
        /// The id of the first of them.
        id: MessageId,
        /// Their destination cell (all zeros for a broadcast or service
        /// destination, or destinations the relay folded together).
        subject: PublicKey,
    },
    /// The link to the relay was lost. With [`CellOptions::reconnect`] the
    /// cell is reconnecting; queued messages wait for the new link.
    Disconnected {
        /// Why, for people.
        reason: String,
    },
    /// The link is back: services re-announced, presence re-watched.
    Reconnected,
    /// One relay reported a hop of a message this cell sent with the trace
    /// flag (PROTOCOL.md 10.8).
    Trace(TraceHop),
}

/// One hop of a traced message, as a relay reported it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceHop {
    /// The traced message.
    pub id: MessageId,
    /// The relay that reports (it forwarded or delivered the message).
    pub relay: PublicKey,
    /// The TTL the message left that relay with (falls by one per hop).
    pub ttl: u8,
    /// How long the message stayed in that relay, in microseconds.
    pub in_relay_us: u32,
    /// Where it went next: the next relay, or the destination cell.
    pub next: PublicKey,
    /// When this cell read the report (monotonic).
    pub at: std::time::Instant,
}

/// Counters of what this cell received and dropped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CellStats {
    /// Messages delivered to the application.
    pub received: u64,
    /// Messages dropped because their signature did not verify.
    pub dropped_bad_signature: u64,
    /// Messages dropped because their id was seen recently.
    pub dropped_duplicate: u64,
    /// Messages dropped because this cell cannot check or use them (sealed
    /// with an AEAD tag, or acknowledgements of durable messages).
    pub dropped_unsupported: u64,
    /// Presence, notice and link events dropped because the event queue was
    /// full (messages are never dropped this way: the link waits instead).
    pub dropped_events: u64,
    /// Times the link was re-established after being lost.
    pub reconnects: u64,
}

/// What the relay reported it did not deliver of this cell's messages,
/// summed from its notices ([`Event::Notice`]); see [`Cell::undelivered`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Undelivered {
    /// Messages the relay reported dropped, in all.
    pub total: u64,
    /// Notice frames received.
    pub notices: u64,
    /// Dropped messages by reason and destination, ordered by reason then
    /// key. At most [`MAX_UNDELIVERED_DESTINATIONS`] destinations are kept
    /// apart; the rest are counted under the zero key, as are messages
    /// without a cell destination.
    pub by_destination: Vec<(NoticeCode, PublicKey, u64)>,
    /// Whether this is known to be every notice: the relay answered the
    /// orderly close of [`Cell::close`] with its own Close, which follows
    /// its last notice, and no link was lost before (a lost link loses the
    /// notices the relay had not sent yet). False until `close` returns.
    pub complete: bool,
}

impl Undelivered {
    /// Messages dropped for `code`, to any destination.
    pub fn count(&self, code: NoticeCode) -> u64 {
        self.by_destination
            .iter()
            .filter(|(c, _, _)| *c == code)
            .map(|(_, _, n)| n)
            .sum()
    }
}

/// The running sums behind [`Undelivered`].
#[derive(Default)]
pub(crate) struct Tally {
    pub(crate) by: BTreeMap<(NoticeCode, PublicKey), u64>,
    pub(crate) total: u64,
    pub(crate) notices: u64,
    pub(crate) complete: bool,
}

impl Tally {
    pub(crate) fn add(&mut self, code: NoticeCode, subject: PublicKey, count: u32) {
        let n = u64::from(count);
        self.total += n;
        self.notices += 1;
        let mut key = (code, subject);
        let zero = PublicKey([0; 32]);
        if !self.by.contains_key(&key)
            && self.by.keys().filter(|(_, s)| *s != zero).count() >= MAX_UNDELIVERED_DESTINATIONS
        {
            key.1 = zero;
        }
        *self.by.entry(key).or_default() += n;
    }
}
