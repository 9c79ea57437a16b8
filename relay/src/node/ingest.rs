//! What the relay does with an incoming batch: checks, dedup, routing,
//! queueing; and what it counts as a link writer sends.

use super::connection::{Drops, LinkHandle};
use super::{Core, Shared, unix_ms};
use crate::config::VerifyMode;
use crate::core::notices::NO_SUBJECT;
use crate::core::{DedupVerdict, PresenceReport, Route, Staleness, ttl};
use crate::metrics::{DropReason, Metrics};
use relay_codec::batch::{BatchFrame, BatchStats};
use relay_codec::frame::{CloseCode, NoticeCode, Role};
use relay_codec::verify::verify_each;
use relay_codec::{Destination, Envelope, Frame, Lane, MessageId, PublicKey};
use relay_link::{ForwardedBatch, Outbound, WriteObserver};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;
use tracing::{debug, warn};

impl Shared {
    /// Sends presence reports to their watchers.
    pub(super) fn report(reports: Vec<PresenceReport<Arc<LinkHandle>>>) {
        for r in reports {
            r.to.control(Frame::Presence {
                up: r.up,
                info: r.info,
            });
        }
    }

    /// Checks, deduplicates and routes one incoming batch; returns the
    /// cells whose lane queue this batch's cell-addressed messages left over
    /// half full, for the reader to wait on (broadcast and service
    /// receivers are never waited for). An error closes the sending link
    /// with that code and reason.
    ///
    /// When every message of the batch passes and goes to the same cell,
    /// the batch is forwarded as it arrived (no re-encoding, no second
    /// compression), with only its hop count raised; otherwise message by
    /// message. Either way every message leaves with its TTL one lower
    /// ([`ttl`]).
    pub(super) fn ingest(
        &self,
        from: &LinkHandle,
        envs: &[Envelope],
        batch: &BatchFrame,
    ) -> Result<Vec<Arc<LinkHandle>>, (CloseCode, String)> {
        let m = &self.metrics;
        let lane = envs.first().map(Envelope::lane).unwrap_or(Lane::Normal);
        m.msgs_in(
            lane.index(),
            envs.len() as u64,
            envs.iter().map(|e| e.len() as u64).sum(),
        );
        for e in envs {
            // A cell sends only as itself: its key was proven at handshake.
            if from.role == Role::Cell && e.source() != from.key {
                m.dropped(DropReason::ForgedSource, 1);
                return Err((
                    CloseCode::ForgedSource,
                    format!(
                        "message source {} is not this link's key {}",
                        e.source(),
                        from.key
                    ),
                ));
            }
        }
        let good = self.check_signatures(from, envs)?;
        let now_ms = unix_ms();
        let queued_at = Instant::now();
        let ids: Vec<MessageId> = envs.iter().map(Envelope::id).collect();
        let mut woken: Vec<Arc<LinkHandle>> = Vec::new();
        // Receivers of cell-addressed messages: the only ones a sender may
        // be paused for.
        let mut unicast: Vec<Arc<LinkHandle>> = Vec::new();
        let mut refused = 0u64;
        // What the sender is told about, reported once for the batch.
        let mut drops: Drops = Vec::new();
        // The one cell this batch goes to so far, and its messages, held
        // back in case the whole batch can be forwarded as it is.
        let mut single: Option<Arc<LinkHandle>> = None;
        // (index, TTL it leaves with)
        let mut held: Vec<(usize, u8)> = Vec::new();
        // Batches mostly go to one cell: look its route up once, not per
        // message (a keyed hash of 32 bytes each).
        let mut last_route: Option<(PublicKey, Arc<LinkHandle>)> = None;
        {
            let mut core = self.core.lock().unwrap_or_else(|e| e.into_inner());
            for id in &ids {
                core.dedup.prefetch(id.as_u128());
            }
            for (i, e) in envs.iter().enumerate() {
                if !good.as_ref().is_none_or(|g| g[i]) {
                    add_drop(
                        &mut drops,
                        NoticeCode::BadSignature,
                        dest_subject(e),
                        ids[i],
                        1,
                    );
                    continue;
                }
                let Some(ttl) = ttl::next_ttl(e.ttl()) else {
                    m.dropped(DropReason::TtlExpired, 1);
                    add_drop(
                        &mut drops,
                        NoticeCode::TtlExpired,
                        dest_subject(e),
                        ids[i],
                        1,
                    );
                    continue;
                };
                if let Err(s) = core.freshness.check(e.timestamp_ms(), now_ms) {
                    let (reason, code) = match s {
                        Staleness::Expired { .. } => (DropReason::Expired, NoticeCode::Expired),
                        Staleness::FromFuture { .. } => {
                            (DropReason::FromFuture, NoticeCode::FromFuture)
                        }
                    };
                    m.dropped(reason, 1);
                    refused += 1;
                    debug!(link = %from.key.short(), "refused message: {s}");
                    add_drop(&mut drops, code, dest_subject(e), ids[i], 1);
                    continue;
                }
                // A duplicate is not reported: a retransmitted copy of a
                // message that already passed is not the sender's loss.
                if core.dedup.check_and_insert(ids[i].as_u128(), now_ms) == DedupVerdict::Duplicate
                {
                    m.dedup_hit();
                    m.dropped(DropReason::Duplicate, 1);
                    refused += 1;
                    continue;
                }
                // Built only where a message is queued on its own: a clone
                // per message costs an atomic on the batch's buffer.
                let out = || Outbound {
                    env: e.clone().with_ttl(ttl),
                    queued_at,
                };
                match e.destination() {
                    Destination::Cell(dest) => match route_memo(&mut last_route, &core, dest) {
                        Some(h) => {
                            if !unicast.iter().any(|u| Arc::ptr_eq(u, h)) {
                                unicast.push(h.clone());
                            }
                            match &single {
                                None => {
                                    single = Some(h.clone());
                                    held.push((i, ttl));
                                }
                                Some(s) if Arc::ptr_eq(s, h) => held.push((i, ttl)),
                                Some(_) => self.enqueue(&mut drops, h, out(), ids[i], &mut woken),
                            }
                        }
                        None => {
                            m.dropped(DropReason::UnknownDestination, 1);
                            add_drop(&mut drops, NoticeCode::UnknownDestination, dest, ids[i], 1);
                        }
                    },
                    Destination::Broadcast => {
                        if let Route::Many(hs) = core.router.route_broadcast(&from.key) {
                            for h in hs {
                                self.enqueue(&mut drops, h, out(), ids[i], &mut woken);
                            }
                        }
                    }
                    Destination::Service(s) => {
                        if let Route::Many(hs) = core.router.route_service(&s, &from.key) {
                            for h in hs {
                                self.enqueue(&mut drops, h, out(), ids[i], &mut woken);
                            }
                        }
                    }
                }
            }
        }
        if let Some(h) = single {
            let whole = (held.len() == envs.len() && h.role == Role::Cell)
                .then(|| ttl::forwarded_batch(batch, envs))
                .flatten()
                .filter(|b| b.frame_len() <= FORWARD_AS_IS_MAX);
            if let Some(whole) = whole {
                self.enqueue_batch(&mut drops, &h, whole, queued_at, &ids, &mut woken);
            } else {
                for (i, ttl) in held {
                    let out = Outbound {
                        env: envs[i].clone().with_ttl(ttl),
                        queued_at,
                    };
                    self.enqueue(&mut drops, &h, out, ids[i], &mut woken);
                }
            }
        }
        from.report_drops(&drops, self.mono_ms());
        if refused > 0 {
            warn!(link = %from.key.short(), refused, "refused replayed, expired or future-dated messages");
        }
        for h in &woken {
            h.queues.wake();
        }
        unicast.retain(|h| h.queues.over_high_water(lane));
        Ok(unicast)
    }

    /// Applies the signature policy. `None` means every message passes;
    /// otherwise the verdict per message.
    fn check_signatures(
        &self,
        from: &LinkHandle,
        envs: &[Envelope],
    ) -> Result<Option<Vec<bool>>, (CloseCode, String)> {
        let m = &self.metrics;
        match self.cfg.security.verify {
            VerifyMode::Off => Ok(None),
            VerifyMode::All => {
                let refs: Vec<&Envelope> = envs.iter().collect();
                let verdicts: Vec<bool> = verify_each(&refs).iter().map(Result::is_ok).collect();
                let bad = verdicts.iter().filter(|ok| !**ok).count() as u64;
                m.signatures(envs.len() as u64, bad);
                if bad > 0 {
                    m.dropped(DropReason::BadSignature, bad);
                    warn!(link = %from.key.short(), bad, "dropped messages whose signature does not verify (verify = all)");
                }
                Ok(Some(verdicts))
            }
            VerifyMode::Sampled => {
                let every = (1.0 / self.cfg.security.sample_rate).round().max(1.0) as u64;
                for e in envs {
                    if !self
                        .sampled
                        .fetch_add(1, Ordering::Relaxed)
                        .is_multiple_of(every)
                    {
                        continue;
                    }
                    let ok = e.verify().is_ok();
                    m.signatures(1, u64::from(!ok));
                    if !ok {
                        m.dropped(DropReason::BadSignature, 1);
                        return Err((
                            CloseCode::BadSignature,
                            format!("a sampled message {} failed signature verification", e.id()),
                        ));
                    }
                }
                Ok(None)
            }
        }
    }

    /// Queues a whole batch for one cell, or drops all of it (into
    /// `drops`) if the cell's lane has no room for its messages.
    fn enqueue_batch(
        &self,
        drops: &mut Drops,
        to: &Arc<LinkHandle>,
        batch: BatchFrame,
        queued_at: Instant,
        ids: &[MessageId],
        woken: &mut Vec<Arc<LinkHandle>>,
    ) {
        let count = u64::from(batch.count);
        let item = ForwardedBatch { batch, queued_at };
        match to.queues.push_batch(item) {
            Ok(()) => woken.push(to.clone()),
            Err(_) => {
                let (reason, code) = full_queue(to);
                self.metrics.dropped(reason, count);
                if let Some(&first) = ids.first() {
                    add_drop(drops, code, to.key, first, count);
                }
            }
        }
    }

    /// Queues one message for `to`, or drops it (into `drops`) if `to`'s
    /// lane has no room.
    fn enqueue(
        &self,
        drops: &mut Drops,
        to: &Arc<LinkHandle>,
        out: Outbound,
        id: MessageId,
        woken: &mut Vec<Arc<LinkHandle>>,
    ) {
        match to.queues.push(out) {
            Ok(()) => {
                if !woken.iter().any(|w| Arc::ptr_eq(w, to)) {
                    woken.push(to.clone());
                }
            }
            Err(_) => {
                let (reason, code) = full_queue(to);
                self.metrics.dropped(reason, 1);
                add_drop(drops, code, to.key, id, 1);
            }
        }
    }
}

fn dest_subject(e: &Envelope) -> PublicKey {
    e.dest_cell().unwrap_or(NO_SUBJECT)
}

/// Why a queue refused a message: its link is closing, or it is full.
fn full_queue(to: &LinkHandle) -> (DropReason, NoticeCode) {
    if to.queues.is_closed() {
        (DropReason::Shutdown, NoticeCode::ReceiverClosing)
    } else {
        (DropReason::SlowReceiver, NoticeCode::DroppedSlowReceiver)
    }
}

/// Adds `n` drops to `drops`, merged with the last entry when it is for the
/// same code and subject (a batch mostly goes to one cell); the notice
/// aggregator sums the rest.
fn add_drop(drops: &mut Drops, code: NoticeCode, subject: PublicKey, id: MessageId, n: u64) {
    match drops.last_mut() {
        Some((c, s, _, count)) if *c == code && *s == subject => *count += n,
        _ => drops.push((code, subject, id, n)),
    }
}

/// Counts and times what a link writer sends.
pub(super) struct RelayObserver {
    pub(super) metrics: Arc<Metrics>,
    /// This batch's times in relay, in µs; empty (unallocated) on a link
    /// that never sends.
    pub(super) samples: Vec<u32>,
    /// The clock, read once per batch at its first message.
    pub(super) now: Option<Instant>,
}

/// Largest batch forwarded as it arrived: what a cell accepts by default, so
/// a relay configured for larger frames never hands a cell more than that.
const FORWARD_AS_IS_MAX: usize = 4 << 20;

impl WriteObserver for RelayObserver {
    fn on_message(&mut self, _lane: Lane, _bytes: usize, queued_at: Instant) {
        let now = *self.now.get_or_insert_with(Instant::now);
        let us = now.saturating_duration_since(queued_at).as_micros();
        self.samples.push(us.clamp(1, u128::from(u32::MAX)) as u32);
    }

    fn on_batch(&mut self, lane: Lane, stats: &BatchStats) {
        self.now = None;
        self.metrics
            .msgs_out(lane.index(), stats.count as u64, stats.raw_bytes as u64);
        self.metrics.batch_out(
            stats.count as u64,
            stats.raw_bytes as u64,
            stats.wire_bytes as u64,
        );
        self.metrics.record_time_in_relay(&self.samples);
        self.samples.clear();
    }

    fn on_forwarded(&mut self, lane: Lane, stats: &BatchStats, queued_at: Instant) {
        let us = queued_at
            .elapsed()
            .as_micros()
            .clamp(1, u128::from(u32::MAX)) as u32;
        self.samples.clear();
        self.samples.resize(stats.count, us);
        self.on_batch(lane, stats);
    }
}

/// The route to cell `dest`, from `memo` when the previous cell-addressed
/// message of the batch went to the same cell; `None` for a cell not here.
fn route_memo<'a>(
    memo: &'a mut Option<(PublicKey, Arc<LinkHandle>)>,
    core: &Core,
    dest: PublicKey,
) -> Option<&'a Arc<LinkHandle>> {
    if memo.as_ref().is_none_or(|(k, _)| *k != dest) {
        *memo = match core.router.route_cell(&dest) {
            Route::One(h) => Some((dest, h.clone())),
            _ => None,
        };
    }
    memo.as_ref().map(|(_, h)| h)
}
