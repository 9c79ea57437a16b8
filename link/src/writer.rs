//! The lane writer: drains a link's [`LaneQueues`] into batch frames on
//! the link's lanes ([`LaneSender`]), QUIC or TCP alike.
//!
//! Lanes are picked by the weighted [`LaneScheduler`] (one batch per
//! pick), with the weights of [`WriterConfig::weights`]. Batching needs no
//! timer: while a write is in flight, new messages pile up in the queues
//! and leave together in the next batch; on an idle link a message leaves
//! at once. Per batch the writer does one queue drain, one encode (zstd
//! where it gains) and one send; nothing is boxed or allocated per message.

use crate::conn::LaneSender;
use crate::error::LinkError;
use crate::lanes::{
    DEFAULT_LANE_WEIGHTS, ForwardedBatch, LANES, LaneQueues, LaneScheduler, Queued,
};
use bytes::{Bytes, BytesMut};
use relay_codec::batch::BatchStats;
use relay_codec::{BatchEncoder, Lane, Limits};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How a link writer batches.
#[derive(Clone, Debug)]
pub struct WriterConfig {
    /// Lane weights for the scheduler (control, high, normal, bulk).
    pub weights: [u32; LANES],
    /// Close a batch once it holds this many bytes.
    pub batch_bytes: usize,
    /// Close a batch once it holds this many messages (at most 65535).
    pub max_batch_messages: usize,
    /// zstd level for batches that gain (at 1..=3, adapted to the traffic:
    /// see [`relay_codec::BatchEncoder`]).
    pub zstd_level: i32,
    /// Only batches of at least this many bytes are offered to zstd.
    pub compress_min: usize,
    /// After the queues close, how long to wait for the peer to read what
    /// was sent.
    pub drain_timeout: Duration,
}

impl Default for WriterConfig {
    fn default() -> Self {
        Self {
            weights: DEFAULT_LANE_WEIGHTS,
            batch_bytes: 64 * 1024,
            max_batch_messages: 4096,
            zstd_level: 1,
            compress_min: 1024,
            drain_timeout: Duration::from_secs(3),
        }
    }
}

/// What a writer reports as it sends; the relay counts and times with it.
pub trait WriteObserver: Send + 'static {
    /// One message left its queue for the wire.
    fn on_message(&mut self, _lane: Lane, _bytes: usize, _queued_at: Instant) {}
    /// One batch frame was written.
    fn on_batch(&mut self, _lane: Lane, _stats: &BatchStats) {}
    /// One forwarded batch was written as it arrived.
    fn on_forwarded(&mut self, _lane: Lane, _stats: &BatchStats, _queued_at: Instant) {}
}

/// A writer observer that ignores everything.
pub struct NoObserver;
impl WriteObserver for NoObserver {}

/// Drains `queues` into batch frames on `lanes` until the queues are closed
/// and empty or the link fails; then ends the lanes and waits (at most
/// `cfg.drain_timeout`) for them to be delivered, so a caller that exits
/// next loses nothing.
///
/// Nothing is taken off the queues once the link has ended: what stays
/// queued goes out on the next link (a cell reconnecting).
pub async fn run_writer<O: WriteObserver>(
    mut lanes: LaneSender,
    queues: Arc<LaneQueues>,
    cfg: WriterConfig,
    mut obs: O,
) -> Result<(), LinkError> {
    let mut sched = LaneScheduler::new(cfg.weights);
    // Where the transport interleaves the lanes itself (TCP), it shares by
    // the same weights.
    lanes.set_weights(cfg.weights);
    // Made on the first message, so an idle link holds no zstd context.
    let mut encoder: Option<BatchEncoder> = None;
    let mut out = BytesMut::new();
    let max_msgs = cfg.max_batch_messages.clamp(1, Limits::MAX_BATCH_CAP);
    loop {
        if let Some(end) = lanes.end() {
            return Err(end.into());
        }
        let Some(i) = sched.next(queues.nonempty()) else {
            if queues.is_closed() && queues.is_empty() {
                break;
            }
            tokio::select! {
                _ = queues.notify.notified() => {}
                end = lanes.closed() => return Err(end.into()),
            }
            continue;
        };
        let lane = Lane::ALL[i];
        let enc = match &mut encoder {
            Some(e) => e,
            slot => slot.insert(
                BatchEncoder::new(cfg.zstd_level, cfg.compress_min).map_err(LinkError::Zstd)?,
            ),
        };
        let forwarded = fill_batch(&queues, i, enc, &cfg, max_msgs, &mut obs);
        queues.space.notify_waiters();
        let stats = enc.finish(lane, &mut out);
        if stats.count > 0 {
            obs.on_batch(lane, &stats);
            lanes.send(lane, out.split().freeze()).await?;
        }
        if let Some(f) = forwarded {
            let stats = BatchStats {
                count: usize::from(f.batch.count),
                raw_bytes: f.batch.raw_len as usize,
                wire_bytes: f.batch.frame_len(),
                compressed: f.batch.compressed,
            };
            obs.on_forwarded(lane, &stats, f.queued_at);
            // The batch's own header, hop count included: whoever queued
            // it set the hops it leaves with.
            let head = Bytes::copy_from_slice(&f.batch.frame_header());
            lanes.send_parts(lane, head, f.batch.data).await?;
        }
    }
    lanes
        .finish(tokio::time::Instant::now() + cfg.drain_timeout)
        .await;
    Ok(())
}

/// Takes lane `i`'s next batch into `enc`: queued messages up to the batch
/// bounds, stopping before a forwarded batch (returned, to go out after
/// them so the lane keeps its order); staged messages if nothing was
/// queued.
fn fill_batch<O: WriteObserver>(
    queues: &LaneQueues,
    i: usize,
    enc: &mut BatchEncoder,
    cfg: &WriterConfig,
    max_msgs: usize,
    obs: &mut O,
) -> Option<ForwardedBatch> {
    let lane = Lane::ALL[i];
    let mut forwarded = None;
    while let Some(item) = queues.lanes[i].pop() {
        let item = match item {
            Queued::Message(m) => m,
            Queued::Batch(b) => {
                forwarded = Some(b);
                break;
            }
        };
        obs.on_message(lane, item.env.len(), item.queued_at);
        // Each envelope carries the TTL it leaves with (a relay lowered
        // it when it queued the message).
        enc.push_envelope(&item.env);
        if enc.len_bytes() >= cfg.batch_bytes || enc.count() >= max_msgs {
            break;
        }
    }
    if enc.is_empty()
        && forwarded.is_none()
        && let Some((run, n)) = queues.lanes[i].take_staged(cfg.batch_bytes, max_msgs)
    {
        enc.push_encoded(&run, n);
    }
    forwarded
}
