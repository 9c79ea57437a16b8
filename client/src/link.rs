//! The link layer shared by cells and relays: bounded lane queues, the
//! writer that drains them into batch frames on one QUIC stream per lane,
//! the frame reader, and the Hello/Welcome handshake.
//!
//! Nothing here blocks a tokio worker: producers push into lock-free
//! queues and wake the writer through a `Notify`; a full queue is reported
//! to the producer, which decides (drop and count, or wait).
//!
//! The lane queues are crossbeam `SegQueue`s bounded by a counter rather
//! than `ArrayQueue`s: an `ArrayQueue` allocates its whole capacity up front
//! (8192 slots × 4 lanes ≈ 2 MiB per link), which 10 000 idle cells cannot
//! afford; a `SegQueue` holds memory only for what is queued.

use crate::lanes::{LANES, LaneScheduler};
use bytes::{Bytes, BytesMut};
use crossbeam_queue::SegQueue;
use quinn::{Connection, RecvStream, SendStream};
use relay_codec::batch::{BatchFrame, BatchStats};
use relay_codec::frame::{CloseCode, LEN_PREFIX, PROTOCOL_VERSION, Role};
use relay_codec::message::encoded_layout;
use relay_codec::{BatchEncoder, DecodeError, Envelope, Frame, Lane, Limits, PublicKey};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio::sync::Notify;

/// Why a link failed.
///
/// Each message names its cause itself and no variant has a `source()`,
/// so a printed error chain says the cause once.
#[derive(Debug, Error)]
pub enum LinkError {
    /// The QUIC connection failed or was closed.
    #[error("connection: {0}")]
    Connection(quinn::ConnectionError),
    /// Writing to a stream failed.
    #[error("write: {0}")]
    Write(quinn::WriteError),
    /// Reading from a stream failed.
    #[error("read: {0}")]
    Read(quinn::ReadError),
    /// The peer sent bytes that do not decode.
    #[error("bad frame from peer: {0}")]
    Decode(DecodeError),
    /// The peer refused or closed the link, saying why.
    #[error("refused by peer ({code:?}): {reason}")]
    Refused {
        /// The peer's code.
        code: CloseCode,
        /// The peer's words.
        reason: String,
    },
    /// The peer broke the link protocol.
    #[error("protocol: {0}")]
    Protocol(String),
    /// A step took longer than allowed.
    #[error("timed out: {0}")]
    Timeout(&'static str),
    /// A stream ended in the middle of a frame.
    #[error("stream ended inside a frame")]
    Truncated,
    /// Local resource failure (e.g. a compressor could not be made).
    #[error("local: {0}")]
    Local(String),
}

impl From<quinn::ConnectionError> for LinkError {
    fn from(e: quinn::ConnectionError) -> Self {
        Self::Connection(e)
    }
}

impl From<quinn::WriteError> for LinkError {
    fn from(e: quinn::WriteError) -> Self {
        Self::Write(e)
    }
}

impl From<quinn::ReadError> for LinkError {
    fn from(e: quinn::ReadError) -> Self {
        Self::Read(e)
    }
}

impl From<DecodeError> for LinkError {
    fn from(e: DecodeError) -> Self {
        Self::Decode(e)
    }
}

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
enum Queued {
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
    lanes: [BoundedLane; LANES],
    notify: Notify,
    /// Woken whenever the writer has taken messages, for producers that
    /// wait for room instead of dropping.
    space: Notify,
    closed: AtomicBool,
}

/// A `SegQueue` that refuses pushes past `cap` queued messages, and the
/// lane's staging buffer; `len` counts both.
struct BoundedLane {
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
    fn take_staged(&self, max_bytes: usize, max_count: usize) -> Option<(BytesMut, usize)> {
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

    fn pop(&self) -> Option<Queued> {
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

    fn nonempty(&self) -> [bool; LANES] {
        std::array::from_fn(|i| self.lanes[i].len() > 0)
    }
}

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
            weights: crate::lanes::DEFAULT_LANE_WEIGHTS,
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

/// Drains `queues` into batch frames until the queues are closed and empty
/// or the connection fails. Lanes are picked by the weighted scheduler;
/// each lane has its own unidirectional stream with a QUIC priority (control
/// highest), opened on first use.
///
/// Batching needs no timer: while a write is in flight, new messages pile up
/// in the queues and leave together in the next batch; on an idle link a
/// message leaves at once.
pub async fn run_writer<O: WriteObserver>(
    conn: Connection,
    queues: std::sync::Arc<LaneQueues>,
    cfg: WriterConfig,
    mut obs: O,
) -> Result<(), LinkError> {
    let mut sched = LaneScheduler::new(cfg.weights);
    // Made on the first message, so an idle link holds no zstd context.
    let mut encoder: Option<BatchEncoder> = None;
    let mut streams: [Option<SendStream>; LANES] = Default::default();
    let mut out = BytesMut::new();
    let max_msgs = cfg.max_batch_messages.clamp(1, Limits::MAX_BATCH_CAP);
    loop {
        // Take nothing off the queues for a dead connection: what stays
        // queued goes out on the next one (a cell reconnecting).
        if let Some(e) = conn.close_reason() {
            return Err(e.into());
        }
        let Some(i) = sched.next(queues.nonempty()) else {
            if queues.is_closed() && queues.is_empty() {
                break;
            }
            tokio::select! {
                _ = queues.notify.notified() => {}
                e = conn.closed() => return Err(e.into()),
            }
            continue;
        };
        let lane = Lane::ALL[i];
        let enc = match &mut encoder {
            Some(e) => e,
            slot => slot.insert(
                BatchEncoder::new(cfg.zstd_level, cfg.compress_min)
                    .map_err(|e| LinkError::Local(e.to_string()))?,
            ),
        };
        // Messages queued before a forwarded batch go out first, in their
        // own batch, so the lane keeps its order.
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
        queues.space.notify_waiters();
        let stats = enc.finish(lane, &mut out);
        if stats.count > 0 {
            obs.on_batch(lane, &stats);
            let stream = lane_stream(&conn, &mut streams, i).await?;
            stream.write_chunk(out.split().freeze()).await?;
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
            let header = Bytes::copy_from_slice(&f.batch.frame_header());
            let stream = lane_stream(&conn, &mut streams, i).await?;
            stream.write_all_chunks(&mut [header, f.batch.data]).await?;
        }
    }
    // Queues closed and drained: end the streams and wait (bounded) until
    // the peer has read them, so a caller that exits next loses nothing.
    for s in streams.iter_mut().flatten() {
        let _ = s.finish();
    }
    let deadline = tokio::time::Instant::now() + cfg.drain_timeout;
    for s in streams.iter_mut().flatten() {
        let _ = tokio::time::timeout_at(deadline, s.stopped()).await;
    }
    Ok(())
}

/// The stream of lane `i` in `streams`, opened on first use with the
/// lane's QUIC priority (control highest). For writers of batch frames.
pub async fn lane_stream<'a>(
    conn: &Connection,
    streams: &'a mut [Option<SendStream>; LANES],
    i: usize,
) -> Result<&'a mut SendStream, LinkError> {
    Ok(match &mut streams[i] {
        Some(s) => s,
        slot => {
            let s = conn.open_uni().await?;
            // Higher lanes get higher QUIC priority.
            let _ = s.set_priority((LANES - i) as i32);
            slot.insert(s)
        }
    })
}

/// Reads whole frames from a QUIC stream, within `limits`.
pub struct FrameReader {
    stream: RecvStream,
    /// The unread rest of the last chunk quinn returned, while `partial`
    /// is empty: frames wholly inside it are sliced out without a copy.
    chunk: Bytes,
    /// A frame that spans chunks, assembled by copying.
    partial: BytesMut,
    limits: Limits,
}

impl FrameReader {
    /// A reader over `stream`.
    pub fn new(stream: RecvStream, limits: Limits) -> Self {
        Self {
            stream,
            chunk: Bytes::new(),
            // Sized per frame that needs it; an idle link's control stream
            // holds no buffer.
            partial: BytesMut::new(),
            limits,
        }
    }

    /// The next frame; `Ok(None)` when the stream ended cleanly between frames.
    pub async fn next(&mut self) -> Result<Option<Frame>, LinkError> {
        loop {
            if let Some(f) = self.take()? {
                return Ok(Some(f));
            }
            match self.stream.read_chunk(256 * 1024, true).await? {
                Some(chunk) if self.partial.is_empty() => self.chunk = chunk.bytes,
                Some(chunk) => self.partial.extend_from_slice(&chunk.bytes),
                None if self.partial.is_empty() && self.chunk.is_empty() => return Ok(None),
                None => return Err(LinkError::Truncated),
            }
        }
    }

    /// The next whole frame from what has been read, if there is one.
    fn take(&mut self) -> Result<Option<Frame>, DecodeError> {
        if self.partial.is_empty() {
            if self.chunk.is_empty() {
                return Ok(None);
            }
            if let Some(n) = Frame::peek_len(&self.chunk, &self.limits)? {
                return Frame::decode(self.chunk.split_to(n), &self.limits).map(Some);
            }
            // The frame continues in later chunks. Room for all of it now,
            // when its length is known (and checked against the limit), so
            // that it is copied once rather than regrown.
            let whole = self.chunk.get(..LEN_PREFIX).map_or(0, |p| {
                LEN_PREFIX + u32::from_le_bytes([p[0], p[1], p[2], p[3]]) as usize
            });
            self.partial.reserve(whole.max(self.chunk.len()));
            self.partial.extend_from_slice(&self.chunk);
            self.chunk = Bytes::new();
            return Ok(None);
        }
        let f = Frame::take(&mut self.partial, &self.limits)?;
        if f.is_some() && !self.partial.is_empty() {
            // The chunk that completed the frame began the next one.
            if let Some(n) = Frame::peek_len(&self.partial, &self.limits)?
                && n > self.partial.len()
            {
                self.partial.reserve(n - self.partial.len());
            }
        }
        Ok(f)
    }

    /// Stops the stream, telling the peer to stop sending on it.
    pub fn stop(&mut self, code: CloseCode) {
        let _ = self.stream.stop(quinn::VarInt::from_u32(code as u32));
    }
}

/// Writes one frame to a stream.
pub async fn write_frame(stream: &mut SendStream, frame: &Frame) -> Result<(), LinkError> {
    stream.write_chunk(frame.to_bytes()).await?;
    Ok(())
}

/// Closes the connection with `code` after sending a Close frame on
/// `control` (best effort), so the peer can print why.
pub async fn close_with(
    conn: &Connection,
    control: Option<&mut SendStream>,
    code: CloseCode,
    reason: &str,
) {
    if let Some(s) = control {
        let frame = Frame::Close {
            code,
            reason: reason.to_owned(),
        };
        let _ = tokio::time::timeout(Duration::from_millis(500), write_frame(s, &frame)).await;
        let _ = s.finish();
        // Give the Close frame a moment to reach the peer before the
        // connection close discards unsent stream data.
        let _ = tokio::time::timeout(Duration::from_millis(200), s.stopped()).await;
    }
    conn.close(quinn::VarInt::from_u32(code as u32), reason.as_bytes());
}

/// What the accepting side said in its Welcome.
#[derive(Clone, Debug)]
pub struct Welcome {
    /// The protocol version in use.
    pub version: u16,
    /// The accepting node's key.
    pub node: PublicKey,
    /// Its clock, ms since the Unix epoch.
    pub time_ms: u64,
    /// Largest payload it accepts.
    pub max_payload: u32,
    /// Largest frame it accepts.
    pub max_frame: u32,
}

/// The connecting side of the handshake: opens the control stream, sends
/// Hello, and waits (at most `timeout`) for Welcome. A Close in reply comes
/// back as [`LinkError::Refused`] with the peer's reason.
pub async fn hello(
    conn: &Connection,
    role: Role,
    notices: bool,
    agent: &str,
    limits: Limits,
    timeout: Duration,
) -> Result<(SendStream, FrameReader, Welcome), LinkError> {
    let step = async {
        let (mut send, recv) = conn.open_bi().await?;
        let _ = send.set_priority(LANES as i32 + 1);
        write_frame(
            &mut send,
            &Frame::Hello {
                version: PROTOCOL_VERSION,
                role,
                notices,
                agent: agent.to_owned(),
            },
        )
        .await?;
        let mut reader = FrameReader::new(recv, limits);
        match reader.next().await {
            Ok(Some(Frame::Welcome {
                version,
                node,
                time_ms,
                max_payload,
                max_frame,
            })) => Ok((
                send,
                reader,
                Welcome {
                    version,
                    node,
                    time_ms,
                    max_payload,
                    max_frame,
                },
            )),
            Ok(Some(Frame::Close { code, reason })) => Err(LinkError::Refused { code, reason }),
            Ok(Some(other)) => Err(LinkError::Protocol(format!(
                "expected Welcome, got {}",
                other.name()
            ))),
            Ok(None) => Err(LinkError::Protocol(
                "control stream ended before Welcome".into(),
            )),
            Err(e) => Err(refusal_from_close(conn).unwrap_or(e)),
        }
    };
    match tokio::time::timeout(timeout, step).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(refusal_from_close(conn).unwrap_or(e)),
        Err(_) => {
            Err(refusal_from_close(conn).unwrap_or(LinkError::Timeout("waiting for Welcome")))
        }
    }
}

/// If the peer closed the connection with an application code, that code
/// and reason as a [`LinkError::Refused`].
pub fn refusal_from_close(conn: &Connection) -> Option<LinkError> {
    match conn.close_reason()? {
        quinn::ConnectionError::ApplicationClosed(c) => Some(LinkError::Refused {
            code: CloseCode::from_u16(u16::try_from(c.error_code.into_inner()).unwrap_or(u16::MAX)),
            reason: String::from_utf8_lossy(&c.reason).into_owned(),
        }),
        _ => None,
    }
}

/// The Hello a connecting node sent.
#[derive(Clone, Debug)]
pub struct Hello {
    /// Highest version it speaks.
    pub version: u16,
    /// Cell or relay.
    pub role: Role,
    /// Whether it wants notices about its messages.
    pub notices: bool,
    /// Its software, for logs.
    pub agent: String,
}

/// The accepting side of the handshake: waits (at most `timeout`) for the
/// control stream and its Hello. The caller answers with Welcome or Close.
pub async fn accept_hello(
    conn: &Connection,
    limits: Limits,
    timeout: Duration,
) -> Result<(SendStream, FrameReader, Hello), LinkError> {
    let step = async {
        let (send, recv) = conn.accept_bi().await?;
        let _ = send.set_priority(LANES as i32 + 1);
        let mut reader = FrameReader::new(recv, limits);
        match reader.next().await? {
            Some(Frame::Hello {
                version,
                role,
                notices,
                agent,
            }) => Ok((
                send,
                reader,
                Hello {
                    version,
                    role,
                    notices,
                    agent,
                },
            )),
            Some(_) => Err(LinkError::Protocol("first frame is not Hello".into())),
            None => Err(LinkError::Protocol(
                "control stream ended before Hello".into(),
            )),
        }
    };
    tokio::time::timeout(timeout, step)
        .await
        .map_err(|_| LinkError::Timeout("waiting for Hello"))?
}

pub mod conn;
pub mod session;
pub mod tcp;
