//! [`DurableQueues`]: what a relay decides about durable messages, with
//! the log as actions.
//!
//! A durable message from a cell to a cell is logged before anything else
//! ([`crate::Action::DurableLog`]); only once the shell reports it synced
//! ([`crate::Node::durable_logged`]) is it acknowledged to the sender (a
//! [`Frame::DurableAck`] with [`DurableStatus::Acked`]) and delivered to
//! its destination, if attached. It stays queued, per destination and per
//! lane in log order, until the destination acknowledges it
//! ([`crate::Action::DurableRelease`]) or its time to live runs out (the
//! sender hears of it: [`DurableStatus::Expired`]). Unacknowledged
//! deliveries are retried with exponential backoff and jitter drawn from
//! the node's seeded generator; a cell that attaches gets what is queued
//! for it, lane by lane, oldest first. A log that refuses an append (full,
//! or failed) refuses the message to its sender ([`DurableStatus::Full`],
//! [`DurableStatus::Failed`]); best-effort traffic is untouched.
//!
//! Bounded: at most [`DurableConfig::max_pending`] appends in flight (more
//! are refused as [`DurableStatus::Full`]); queued messages are bounded by
//! the log's size on disk (the shell refuses appends past
//! `storage.max_bytes`); the window of released ids by
//! [`RELEASED_WINDOW`].

use relay_codec::frame::{DurableStatus, MAX_DURABLE_ACK_IDS};
use relay_codec::{Envelope, Frame, MessageId, PublicKey};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};

/// Released ids remembered, so that a sender's resend of a message already
/// delivered (its ack was lost with a link) is acknowledged again, not
/// logged twice.
pub const RELEASED_WINDOW: usize = 65_536;

/// The durable settings (`storage.*` in config/relay.toml).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DurableConfig {
    /// How long a logged message waits for its destination, in ms
    /// (`storage.ttl_ms`), at least 1.
    pub ttl_ms: u64,
    /// The first retry of an unacknowledged delivery comes after about
    /// this many ms (`storage.retry_initial_ms`), at least 1; each one
    /// after doubles it.
    pub retry_initial_ms: u64,
    /// The longest wait between retries, in ms (`storage.retry_max_ms`),
    /// at least `retry_initial_ms`.
    pub retry_max_ms: u64,
    /// Appends in flight at most; more are refused as full.
    pub max_pending: usize,
}

impl Default for DurableConfig {
    fn default() -> Self {
        Self {
            ttl_ms: 86_400_000,
            retry_initial_ms: 1_000,
            retry_max_ms: 60_000,
            max_pending: 65_536,
        }
    }
}

/// Why the shell's log did not store a message, for
/// [`crate::Node::durable_logged`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogRefusal {
    /// The log is at `storage.max_bytes` (or the disk is full).
    Full,
    /// The log failed (a write or sync error).
    Failed,
}

impl LogRefusal {
    /// The status a refused sender is told.
    pub fn status(self) -> DurableStatus {
        match self {
            Self::Full => DurableStatus::Full,
            Self::Failed => DurableStatus::Failed,
        }
    }
}

/// A message being appended, not yet synced.
struct Pending {
    id: MessageId,
    sender: PublicKey,
    dest: PublicKey,
    lane: u8,
    env: Envelope,
    expires_unix_ms: u64,
}

/// A logged message waiting for its destination's ack.
struct Stored {
    id: MessageId,
    sender: PublicKey,
    dest: PublicKey,
    lane: u8,
    expires_mono_ms: u64,
    /// Deliveries so far.
    attempts: u32,
    /// When its next retry falls due, if one is scheduled.
    retry_due: Option<u64>,
}

/// What an incoming durable message turned out to be.
pub(crate) enum Incoming {
    /// New: append it under this token.
    Log(u64),
    /// Already logged (a resend): acknowledge it again.
    AckAgain,
    /// Being appended now: its ack is on its way.
    InFlight,
    /// Too many appends in flight.
    Busy,
}

/// The durable messages a node answers for; see the [module
/// documentation](self).
#[derive(Default)]
pub struct DurableQueues {
    cfg: DurableConfig,
    next_token: u64,
    pending: BTreeMap<u64, Pending>,
    pending_ids: HashSet<MessageId>,
    stored: BTreeMap<u64, Stored>,
    by_id: HashMap<MessageId, u64>,
    /// Per destination, per lane: the sequence numbers queued, log order.
    queues: HashMap<PublicKey, [BTreeSet<u64>; 4]>,
    /// (due, seq) of the retries scheduled.
    retries: BTreeSet<(u64, u64)>,
    /// (expires, seq) on the monotonic clock.
    expiry: BTreeSet<(u64, u64)>,
    released: HashSet<MessageId>,
    released_order: VecDeque<MessageId>,
}

impl DurableQueues {
    /// No messages, with these settings.
    pub fn new(cfg: DurableConfig) -> Self {
        Self {
            cfg,
            ..Self::default()
        }
    }

    /// Messages logged and waiting for their destination.
    pub fn queued(&self) -> usize {
        self.stored.len()
    }

    /// Appends in flight.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Messages queued for `dest`.
    pub fn queued_for(&self, dest: &PublicKey) -> usize {
        self.queues
            .get(dest)
            .map_or(0, |l| l.iter().map(BTreeSet::len).sum())
    }

    /// When [`Self::due`] next has something to do.
    pub fn next_due(&self) -> Option<u64> {
        let r = self.retries.first().map(|&(d, _)| d);
        let e = self.expiry.first().map(|&(d, _)| d);
        match (r, e) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    pub(crate) fn incoming(
        &mut self,
        now_unix_ms: u64,
        sender: PublicKey,
        dest: PublicKey,
        env: &Envelope,
        id: MessageId,
    ) -> Incoming {
        if self.by_id.contains_key(&id) || self.released.contains(&id) {
            return Incoming::AckAgain;
        }
        if self.pending_ids.contains(&id) {
            return Incoming::InFlight;
        }
        if self.pending.len() >= self.cfg.max_pending {
            return Incoming::Busy;
        }
        let token = self.next_token;
        self.next_token += 1;
        self.pending_ids.insert(id);
        self.pending.insert(
            token,
            Pending {
                id,
                sender,
                dest,
                lane: env.lane() as u8,
                env: env.clone(),
                expires_unix_ms: now_unix_ms.saturating_add(self.cfg.ttl_ms),
            },
        );
        Incoming::Log(token)
    }

    /// The expiry (unix ms) of the pending append `token`.
    pub(crate) fn pending_expiry(&self, token: u64) -> Option<u64> {
        self.pending.get(&token).map(|p| p.expires_unix_ms)
    }

    /// The append `token` ended: `Ok(seq)` stores it under its log
    /// sequence number. Returns (id, sender, dest, env) of the message.
    pub(crate) fn logged(
        &mut self,
        mono_ms: u64,
        unix_ms: u64,
        token: u64,
        result: Result<u64, LogRefusal>,
    ) -> Option<(MessageId, PublicKey, PublicKey, Envelope)> {
        let p = self.pending.remove(&token)?;
        self.pending_ids.remove(&p.id);
        if let Ok(seq) = result {
            self.store(
                mono_ms,
                unix_ms,
                seq,
                p.id,
                p.sender,
                p.dest,
                p.lane,
                p.expires_unix_ms,
            );
        }
        Some((p.id, p.sender, p.dest, p.env))
    }

    /// Queues a logged message (synced now, or recovered from the log).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn store(
        &mut self,
        mono_ms: u64,
        unix_ms: u64,
        seq: u64,
        id: MessageId,
        sender: PublicKey,
        dest: PublicKey,
        lane: u8,
        expires_unix_ms: u64,
    ) -> bool {
        if self.by_id.contains_key(&id) || self.stored.contains_key(&seq) {
            return false;
        }
        let lane = lane.min(3);
        let expires_mono_ms = mono_ms.saturating_add(expires_unix_ms.saturating_sub(unix_ms));
        self.by_id.insert(id, seq);
        self.queues.entry(dest).or_default()[usize::from(lane)].insert(seq);
        self.expiry.insert((expires_mono_ms, seq));
        self.stored.insert(
            seq,
            Stored {
                id,
                sender,
                dest,
                lane,
                expires_mono_ms,
                attempts: 0,
                retry_due: None,
            },
        );
        true
    }

    /// A delivery of `seq` is going out now: its retry is scheduled.
    pub(crate) fn delivering(&mut self, mono_ms: u64, seq: u64, rng: &mut fastrand::Rng) {
        let Some(s) = self.stored.get_mut(&seq) else {
            return;
        };
        if let Some(due) = s.retry_due.take() {
            self.retries.remove(&(due, seq));
        }
        let delay = backoff(&self.cfg, s.attempts, rng);
        s.attempts = s.attempts.saturating_add(1);
        let due = mono_ms.saturating_add(delay);
        s.retry_due = Some(due);
        self.retries.insert((due, seq));
    }

    /// `from` acknowledged `id`: the sequence number to release, if `from`
    /// is its destination and it is queued.
    pub(crate) fn acked(&mut self, from: &PublicKey, id: &MessageId) -> Option<u64> {
        let &seq = self.by_id.get(id)?;
        if self.stored.get(&seq).is_none_or(|s| s.dest != *from) {
            return None;
        }
        self.remove(seq);
        Some(seq)
    }

    /// Takes `seq` out of every table and remembers its id as released.
    fn remove(&mut self, seq: u64) -> Option<Stored> {
        let s = self.stored.remove(&seq)?;
        self.by_id.remove(&s.id);
        if let Some(lanes) = self.queues.get_mut(&s.dest) {
            lanes[usize::from(s.lane)].remove(&seq);
            if lanes.iter().all(BTreeSet::is_empty) {
                self.queues.remove(&s.dest);
            }
        }
        if let Some(due) = s.retry_due {
            self.retries.remove(&(due, seq));
        }
        self.expiry.remove(&(s.expires_mono_ms, seq));
        if self.released_order.len() >= RELEASED_WINDOW
            && let Some(old) = self.released_order.pop_front()
        {
            self.released.remove(&old);
        }
        if self.released.insert(s.id) {
            self.released_order.push_back(s.id);
        }
        Some(s)
    }

    /// The messages queued for `dest`, lane by lane, oldest first.
    pub(crate) fn queued_seqs(&self, dest: &PublicKey) -> Vec<u64> {
        self.queues
            .get(dest)
            .map(|lanes| lanes.iter().flatten().copied().collect())
            .unwrap_or_default()
    }

    /// The messages whose time to live ran out by `mono_ms`, taken out:
    /// (seq, id, sender).
    pub(crate) fn take_expired(&mut self, mono_ms: u64) -> Vec<(u64, MessageId, PublicKey)> {
        let due: Vec<u64> = self
            .expiry
            .iter()
            .take_while(|&&(d, _)| d <= mono_ms)
            .map(|&(_, s)| s)
            .collect();
        due.into_iter()
            .filter_map(|seq| self.remove(seq).map(|s| (seq, s.id, s.sender)))
            .collect()
    }

    /// The retries due by `mono_ms`, unscheduled: (seq, dest).
    pub(crate) fn take_retries(&mut self, mono_ms: u64) -> Vec<(u64, PublicKey)> {
        let due: Vec<(u64, u64)> = self
            .retries
            .iter()
            .take_while(|&&(d, _)| d <= mono_ms)
            .copied()
            .collect();
        due.into_iter()
            .filter_map(|(d, seq)| {
                self.retries.remove(&(d, seq));
                let s = self.stored.get_mut(&seq)?;
                s.retry_due = None;
                Some((seq, s.dest))
            })
            .collect()
    }
}

/// The wait before retry `attempt + 1`: `retry_initial_ms × 2^attempt`,
/// at most `retry_max_ms`, then a uniform draw in its upper half so that
/// many messages queued together do not retry together.
pub fn backoff(cfg: &DurableConfig, attempt: u32, rng: &mut fastrand::Rng) -> u64 {
    let base = cfg
        .retry_initial_ms
        .max(1)
        .saturating_mul(1u64 << attempt.min(40))
        .min(cfg.retry_max_ms.max(1));
    base - base / 2 + rng.u64(0..=base / 2)
}

/// Acks (or reports) for many messages, `MAX_DURABLE_ACK_IDS` per frame.
pub(crate) fn ack_frames(status: DurableStatus, ids: &[MessageId]) -> Vec<Frame> {
    ids.chunks(MAX_DURABLE_ACK_IDS)
        .map(|c| Frame::DurableAck {
            status,
            ids: c.to_vec(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_with_jitter_in_the_upper_half() {
        let cfg = DurableConfig {
            retry_initial_ms: 100,
            retry_max_ms: 1_000,
            ..DurableConfig::default()
        };
        let mut rng = fastrand::Rng::with_seed(7);
        for (attempt, base) in [
            (0, 100),
            (1, 200),
            (2, 400),
            (3, 800),
            (4, 1000),
            (30, 1000),
        ] {
            for _ in 0..50 {
                let d = backoff(&cfg, attempt, &mut rng);
                assert!(
                    d >= base / 2 && d <= base,
                    "attempt {attempt}: {d} not in [{}, {base}]",
                    base / 2
                );
            }
        }
        // The jitter is drawn: not every delay is equal.
        let ds: HashSet<u64> = (0..20).map(|_| backoff(&cfg, 3, &mut rng)).collect();
        assert!(ds.len() > 1);
    }
}
