//! What the shell keeps of a link that the node admitted: the handle the
//! node's actions name it by, and the observer that counts what its
//! writer sends.

use crate::metrics::Metrics;
use relay_codec::batch::BatchStats;
use relay_codec::frame::Role;
use relay_codec::{Frame, Lane, PublicKey};
use relay_core::LinkId;
use relay_link::{LaneQueues, Link, WriteObserver};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;
use tokio::sync::mpsc;

/// One admitted link as the node's actions name it: where to queue its
/// messages and control frames, and the link to close.
pub struct LinkHandle {
    pub(super) id: LinkId,
    pub(super) key: PublicKey,
    pub(super) role: Role,
    pub(super) queues: Arc<LaneQueues>,
    pub(super) control: mpsc::Sender<Frame>,
    pub(super) link: Link,
    /// Set at the first control frame dropped for a full queue, so the
    /// log says so once per link while the counter counts every one.
    pub(super) control_full_logged: AtomicBool,
}

impl LinkHandle {
    /// Queues a control frame if there is room; control traffic to a link
    /// that does not read is dropped, never waited for. Returns what
    /// happened, so the caller counts a drop (a closed queue is a link
    /// that is ending, not a drop).
    pub(super) fn control(&self, frame: Frame) -> ControlQueued {
        match self.control.try_send(frame) {
            Ok(()) => ControlQueued::Queued,
            Err(mpsc::error::TrySendError::Full(_)) => ControlQueued::Full {
                first: !self.control_full_logged.swap(true, Ordering::Relaxed),
            },
            Err(mpsc::error::TrySendError::Closed(_)) => ControlQueued::Closed,
        }
    }
}

/// What became of a control frame handed to [`LinkHandle::control`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ControlQueued {
    Queued,
    /// Dropped: the link's control queue was full; `first` for the first
    /// such drop on this link.
    Full {
        first: bool,
    },
    /// The link is ending.
    Closed,
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

impl RelayObserver {
    pub(super) fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            metrics,
            samples: Vec::new(),
            now: None,
        }
    }
}

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
