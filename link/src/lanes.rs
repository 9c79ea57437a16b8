//! Lanes: the four bounded outbound queues of a link ([`LaneQueues`]) and
//! the weighted scheduler that picks which one the writer drains next
//! ([`LaneScheduler`], in [`scheduler`]).
//!
//! Nothing here blocks a tokio worker: producers push into lock-free
//! queues and wake the writer through a `Notify`; a full queue is reported
//! to the producer, which decides (drop and count, or wait).
//!
//! The lane queues are crossbeam `SegQueue`s bounded by a counter rather
//! than `ArrayQueue`s: an `ArrayQueue` allocates its whole capacity up front
//! (8192 slots × 4 lanes ≈ 2 MiB per link), which 10 000 idle cells cannot
//! afford; a `SegQueue` holds memory only for what is queued.

pub mod scheduler;

pub use scheduler::{DEFAULT_LANE_WEIGHTS, LANES, LaneScheduler, MAX_LANE_WEIGHT};

use bytes::BytesMut;
use crossbeam_queue::SegQueue;
use relay_codec::batch::BatchFrame;
use relay_codec::message::encoded_layout;
use relay_codec::{Envelope, Lane};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;
use tokio::sync::Notify;

/// A message waiting on an outbound lane, with when it was queued (for the
/// time-in-relay histogram).
#[derive(Clone, Debug)]
pub struct Outbound {
    /// The encoded message.
    pub env: Envelope,
    /// When it entered the queue.
    pub queued_at: Instant,
}

/// A whole batch frame a relay forwards as it arrived: when every message
/// of an incoming batch goes to the same cell, re-encoding and recompressing
/// them would only cost CPU.
#[derive(Clone, Debug)]
pub struct ForwardedBatch {
    /// The batch, its data still as the sender encoded (and compressed) it.
    pub batch: BatchFrame,
    /// When it entered the queue.
    pub queued_at: Instant,
}

/// What waits on a lane: one message, or a whole batch forwarded as is.
pub(crate) enum Queued {
    Message(Outbound),
    Batch(ForwardedBatch),
}

impl Queued {
    /// Messages this item holds, the unit a lane's bound counts.
    fn weight(&self) -> usize {
        match self {
            Queued::Message(_) => 1,
            Queued::Batch(b) => usize::from(b.batch.count),
        }
    }
}

/// One lock-free queue per lane for one outbound link, each bounded by a
/// counter, and the wake-up of its writer.
pub struct LaneQueues {
    pub(crate) lanes: [BoundedLane; LANES],
    pub(crate) notify: Notify,
    /// Woken whenever the writer has taken messages, for producers that
    /// wait for room instead of dropping.
    pub(crate) space: Notify,
    closed: AtomicBool,
}

/// A `SegQueue` that refuses pushes past `cap` queued messages, and the
/// lane's staging buffer; `len` counts both.
pub(crate) struct BoundedLane {
    queue: SegQueue<Queued>,
    staged: Mutex<Staged>,
    len: AtomicUsize,
    cap: usize,
    /// Messages the writer has taken since the start.
    taken: AtomicU64,
}

/// Staging buffer capacity an emptied lane keeps (a few batches); a larger
/// one is released.
const STAGED_KEEP: usize = 256 * 1024;

/// Messages encoded straight into a lane by [`LaneQueues::stage`], end to
/// end, waiting for the writer.
#[derive(Default)]
struct Staged {
    buf: BytesMut,
    count: usize,
}

impl BoundedLane {
    /// Takes room for `w` messages, if there is.
    fn reserve(&self, w: usize) -> bool {
        // Reserve the room first, so concurrent producers never overshoot.
        if self.len.fetch_add(w, Ordering::AcqRel) + w > self.cap {
            self.len.fetch_sub(w, Ordering::AcqRel);
            return false;
        }
        true
    }

    fn push(&self, item: Queued) -> Result<(), Queued> {
        if !self.reserve(item.weight()) {
            return Err(item);
        }
        self.queue.push(item);
        Ok(())
    }

    fn staged(&self) -> std::sync::MutexGuard<'_, Staged> {
        self.staged.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The staged messages at the front that fit one batch of at most
    /// `max_bytes` (but at least one message) and `max_count`, and how many
    /// they are.
    pub(crate) fn take_staged(
        &self,
        max_bytes: usize,
        max_count: usize,
    ) -> Option<(BytesMut, usize)> {
        let mut st = self.staged();
        if st.count == 0 {
            return None;
        }
        let (mut end, mut n) = (0, 0);
        while n < st.count && n < max_count {
            let Some((_, len)) = encoded_layout(&st.buf[end..]) else {
                // Cannot happen for what `stage` encoded; send the rest
                // whole rather than lose it, and let the peer judge it.
                (end, n) = (st.buf.len(), st.count);
                break;
            };
            if n > 0 && end + len > max_bytes {
                break;
            }
            end += len;
            n += 1;
        }
        let run = st.buf.split_to(end);
        st.count -= n;
        if st.count == 0 && st.buf.capacity() > STAGED_KEEP {
            // After a burst, let the big buffer go with the last run
            // instead of holding it on an idle lane.
            st.buf = BytesMut::new();
        }
        drop(st);
        self.len.fetch_sub(n, Ordering::AcqRel);
        self.taken.fetch_add(n as u64, Ordering::Relaxed);
        Some((run, n))
    }

    pub(crate) fn pop(&self) -> Option<Queued> {
        let item = self.queue.pop()?;
        self.len.fetch_sub(item.weight(), Ordering::AcqRel);
        self.taken
            .fetch_add(item.weight() as u64, Ordering::Relaxed);
        Some(item)
    }

    fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }
}

impl LaneQueues {
    /// Queues holding at most `depth` messages per lane (at least 1).
    pub fn new(depth: usize) -> Self {
        let depth = depth.max(1);
        Self {
            lanes: std::array::from_fn(|_| BoundedLane {
                queue: SegQueue::new(),
                staged: Mutex::new(Staged::default()),
                len: AtomicUsize::new(0),
                cap: depth,
                taken: AtomicU64::new(0),
            }),
            notify: Notify::new(),
            space: Notify::new(),
            closed: AtomicBool::new(false),
        }
    }

    /// Queues `item` on its lane; gives it back if the lane is full or the
    /// link closed. Call [`wake`](Self::wake) after a run of pushes.
    pub fn push(&self, item: Outbound) -> Result<(), Outbound> {
        if self.is_closed() {
            return Err(item);
        }
        self.lanes[item.env.lane().index()]
            .push(Queued::Message(item))
            .map_err(|q| match q {
                Queued::Message(m) => m,
                Queued::Batch(_) => unreachable!("pushed a message"),
            })
    }

    /// Queues a whole batch on its lane, counted as its messages; gives it
    /// back if they do not all fit or the link closed.
    pub fn push_batch(&self, item: ForwardedBatch) -> Result<(), ForwardedBatch> {
        if self.is_closed() {
            return Err(item);
        }
        self.lanes[item.batch.lane.index()]
            .push(Queued::Batch(item))
            .map_err(|q| match q {
                Queued::Batch(b) => b,
                Queued::Message(_) => unreachable!("pushed a batch"),
            })
    }

    /// Queues `item`, waiting for room while its lane is full (for
    /// producers where waiting is the right backpressure). Gives the item
    /// back only if the link is closed. Wakes the writer.
    pub async fn push_wait(&self, item: Outbound) -> Result<(), Outbound> {
        self.put_wait(item, |item| self.push(item)).await
    }

    /// Retries `put` until it takes `item`, waiting for the writer to make
    /// room between tries; gives the item back once the link is closed.
    /// Wakes the writer.
    async fn put_wait<T, R>(
        &self,
        mut item: T,
        mut put: impl FnMut(T) -> Result<R, T>,
    ) -> Result<R, T> {
        loop {
            let room = self.space.notified();
            tokio::pin!(room);
            // Register before trying, so a wake between the try and the
            // await is not lost.
            room.as_mut().enable();
            match put(item) {
                Ok(r) => {
                    self.wake();
                    return Ok(r);
                }
                Err(back) if self.is_closed() => return Err(back),
                Err(back) => {
                    item = back;
                    self.wake();
                    room.await;
                }
            }
        }
    }

    /// Encodes one message with `encode` straight into `lane`'s staging
    /// buffer, where the writer takes it from as part of a batch: no queue
    /// item, allocation or copy per message (a cell's own sends). Gives
    /// `encode` back, not called, if the lane is full or the link closed.
    /// Call [`wake`](Self::wake) after a run of stages.
    ///
    /// `encode` must append exactly one whole message. A lane's producers
    /// use either this or [`push`](Self::push), not both: the writer sends
    /// queued items before staged ones, so their order would not be kept.
    pub fn stage<R, F: FnOnce(&mut BytesMut) -> R>(&self, lane: Lane, encode: F) -> Result<R, F> {
        if self.is_closed() {
            return Err(encode);
        }
        let l = &self.lanes[lane.index()];
        // Room is taken under the lock, so a writer that sees the count
        // also finds the message.
        let mut st = l.staged();
        if !l.reserve(1) {
            return Err(encode);
        }
        let r = encode(&mut st.buf);
        st.count += 1;
        Ok(r)
    }

    /// Like [`stage`](Self::stage), but waits for room while the lane is
    /// full. Gives `encode` back only if the link is closed. Wakes the
    /// writer.
    pub async fn stage_wait<R, F: FnOnce(&mut BytesMut) -> R>(
        &self,
        lane: Lane,
        encode: F,
    ) -> Result<R, F> {
        self.put_wait(encode, |encode| self.stage(lane, encode))
            .await
    }

    /// How many messages the writer has taken off `lane` since the start:
    /// whether a lane that stays full is moving at all.
    pub fn taken(&self, lane: Lane) -> u64 {
        self.lanes[lane.index()].taken.load(Ordering::Relaxed)
    }

    /// Whether `lane` holds more than half of what it may: a producer that
    /// can wait should, with [`wait_for_room`](Self::wait_for_room).
    pub fn over_high_water(&self, lane: Lane) -> bool {
        let l = &self.lanes[lane.index()];
        l.len() > l.cap / 2
    }

    /// Waits until `lane` is at most half full, the link closes or
    /// `deadline` passes; returns whether the lane drained in time.
    pub async fn wait_for_room(&self, lane: Lane, deadline: tokio::time::Instant) -> bool {
        loop {
            let room = self.space.notified();
            tokio::pin!(room);
            // Register before looking, so a wake in between is not lost.
            room.as_mut().enable();
            if !self.over_high_water(lane) || self.is_closed() {
                return true;
            }
            if tokio::time::timeout_at(deadline, room).await.is_err() {
                return false;
            }
        }
    }

    /// Wakes the writer. Cheap when it is already awake.
    pub fn wake(&self) {
        self.notify.notify_one();
    }

    /// Stops accepting messages; the writer sends what is queued, then ends.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.notify.notify_one();
        self.space.notify_waiters();
    }

    /// Whether [`close`](Self::close) was called.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Messages queued on all lanes.
    pub fn len(&self) -> usize {
        self.lanes.iter().map(BoundedLane::len).sum()
    }

    /// Whether every lane is empty.
    pub fn is_empty(&self) -> bool {
        self.lanes.iter().all(|l| l.len() == 0)
    }

    /// Messages queued on `lane`.
    pub fn lane_len(&self, lane: Lane) -> usize {
        self.lanes[lane.index()].len()
    }

    pub(crate) fn nonempty(&self) -> [bool; LANES] {
        std::array::from_fn(|i| self.lanes[i].len() > 0)
    }
}
