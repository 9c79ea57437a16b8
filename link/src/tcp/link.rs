//! A link over one TLS-over-TCP connection: the control channel and the
//! four lanes travel as chunks of [`relay_codec::mux`] on the one stream.
//!
//! Two tasks per link:
//!
//! - the **writer** owns the TLS write half. Senders queue frames per
//!   channel (bounded by [`TcpTuning::send_queue`] bytes each); the writer
//!   cuts them into chunks of at most [`TcpTuning::chunk_bytes`] and sends,
//!   chunk by chunk, the control channel first, then the lanes picked by
//!   the weighted [`LaneScheduler`] (8:4:2:1 unless the lane writer sets
//!   its own weights, [`TcpLaneSender::set_weights`]);
//! - the **reader** owns the read half, demultiplexes it and queues each
//!   channel's frames (bounded by [`TcpTuning::channel_window`] bytes
//!   each). A full channel stops the reader, so the socket is not read and
//!   TCP flow control stops the peer: backpressure, as QUIC's stream
//!   windows give. A lane that is not read holds back the other channels
//!   too (TCP is one ordered stream); QUIC would not.
//!
//! **Head-of-line bound.** A control frame queued while bulk data is being
//! sent waits behind at most: the rest of the one chunk being written
//! (≤ `chunk_bytes`), what rustls holds encrypted but unsent (≤ one
//! write, since tokio-rustls writes records out as it makes them), the
//! kernel's unsent bytes (≤ about [`TcpTuning::notsent_lowat`]) and the
//! bytes in flight (the congestion window, as on QUIC). Without chunking
//! it would wait for the whole batch frame ahead of it (up to
//! `max_frame`, 4 MiB by default).
//!
//! **Close.** [`TcpLink::close`] sends a Close frame on the control channel
//! (after the control frame in progress, if any, so the Close starts on a
//! frame boundary), drops everything else unsent, sends TLS `close_notify`
//! and shuts the socket's write side; then it keeps reading, discarding,
//! until the peer closes too or [`TcpTuning::linger`] passes, so the
//! kernel does not reset the connection under a Close the peer has not
//! read. A peer that reads `close_notify` takes the last Close frame
//! before it as the reason ([`LinkEnd::Closed`]); `close_notify` without
//! one is [`LinkEnd::Lost`], unless the stream stopped inside a chunk or a
//! frame: that is broken framing ([`LinkEnd::Mux`]), answered with Close
//! `Malformed` as any other.

use super::{TcpTuning, TlsConnection};
use crate::error::{LinkEnd, LinkError};
use crate::lanes::{DEFAULT_LANE_WEIGHTS, LANES, LaneScheduler};
use bytes::{Bytes, BytesMut};
use relay_codec::frame::{CloseCode, FrameType, LEN_PREFIX};
use relay_codec::mux::{CHANNELS, CHUNK_HEADER, Channel, Demux, Event, MAX_CHUNK, chunk_header};
use relay_codec::{Frame, Lane, Limits};
use std::collections::VecDeque;
use std::io::IoSlice;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Notify, mpsc, watch};

/// Most byte segments one chunk gathers (small control frames coalesce).
const MAX_SLICES: usize = 16;
/// What a queued received frame costs beyond its bytes, so that many tiny
/// frames cannot hold more memory than the window says.
const FRAME_COST: usize = 64;
/// Bytes asked of the TLS stream per read.
const READ_BUF: usize = 64 * 1024;

/// A link over TLS over TCP. Cheap to clone (a handle); when the last
/// handle (and every sender and receiver of it) is dropped, the link is
/// closed with `Normal`.
#[derive(Clone)]
pub struct TcpLink {
    h: Arc<Handle>,
}

impl std::fmt::Debug for TcpLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpLink")
            .field("remote", &self.h.0.remote)
            .field("end", &self.h.0.end())
            .finish_non_exhaustive()
    }
}

/// Closes the link when the last user handle goes; the tasks hold only
/// [`Inner`].
struct Handle(Arc<Inner>);

impl Drop for Handle {
    fn drop(&mut self) {
        self.0.close(CloseCode::Normal, "");
    }
}

struct Inner {
    peer_key: [u8; 32],
    remote: SocketAddr,
    limits: Limits,
    send_queue: usize,
    channel_window: usize,
    linger: std::time::Duration,
    tx: Mutex<TxQueues>,
    /// Wakes the writer (a permit is kept if it is busy).
    wake_writer: Notify,
    /// Wakes senders waiting for room in a send queue.
    tx_room: Notify,
    /// Wakes those waiting for the writer to have flushed everything.
    writer_idle: Notify,
    rx: [RxChannel; CHANNELS],
    /// Wakes the reader waiting for room in a channel.
    rx_room: Notify,
    /// Lane channels as the peer starts them.
    new_lanes: tokio::sync::Mutex<mpsc::Receiver<Channel>>,
    control_taken: AtomicBool,
    end: watch::Sender<Option<LinkEnd>>,
    /// Set when the writer task has ended (after sending its close).
    writer_done: watch::Sender<bool>,
}

/// One channel's received frames.
#[derive(Default)]
struct RxChannel {
    q: Mutex<RxQueue>,
    /// Wakes its one receiver.
    data: Notify,
}

#[derive(Default)]
struct RxQueue {
    frames: VecDeque<Bytes>,
    /// Cost of `frames`: their bytes plus [`FRAME_COST`] each.
    cost: usize,
    /// The peer ended the channel.
    fin: bool,
    /// The receiver stopped reading: what arrives is dropped.
    stopped: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Inner {
    fn end(&self) -> Option<LinkEnd> {
        self.end.borrow().clone()
    }

    fn tx(&self) -> MutexGuard<'_, TxQueues> {
        lock(&self.tx)
    }

    /// Ends the link with `end` (if it has not ended) and has the writer
    /// close with `closing`; wakes everyone who waits.
    fn finish_with(&self, end: LinkEnd, closing: Closing) {
        let local = end.is_local();
        let set = self.end.send_if_modified(|e| match e {
            None => {
                *e = Some(end);
                true
            }
            Some(_) => false,
        });
        if !set {
            return;
        }
        self.tx().close(closing);
        for ch in &self.rx {
            if local {
                let mut q = lock(&ch.q);
                q.frames.clear();
                q.cost = 0;
            }
            ch.data.notify_one();
        }
        self.wake_writer.notify_one();
        self.tx_room.notify_waiters();
        self.writer_idle.notify_waiters();
        self.rx_room.notify_one();
    }

    fn close(&self, code: CloseCode, reason: &str) {
        // The Close frame's encoder cuts the reason to its bound.
        let closing = Closing::Frame(code, reason.to_owned());
        self.finish_with(LinkEnd::Local, closing);
    }

    /// Queues `parts` (one frame, or the parts of one) on channel `ci`,
    /// waiting while its queue is full.
    async fn push(&self, ci: usize, mut parts: impl AsMut<[Bytes]>) -> Result<(), LinkError> {
        let parts = parts.as_mut();
        let len: usize = parts.iter().map(Bytes::len).sum();
        loop {
            let room = self.tx_room.notified();
            tokio::pin!(room);
            // Registered before looking, so a wake in between is not lost.
            room.as_mut().enable();
            if let Some(end) = self.end() {
                return Err(end.into());
            }
            if self.tx().try_push(ci, parts, len, self.send_queue)? {
                self.wake_writer.notify_one();
                return Ok(());
            }
            room.await;
        }
    }
}

/// How the writer ends the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Closing {
    /// Send a Close frame with this code and reason, then `close_notify`.
    Frame(CloseCode, String),
    /// Only `close_notify` (the peer has closed, or the link failed).
    Quiet,
}

/// One channel's frames waiting for the writer.
#[derive(Debug, Default)]
struct TxChannel {
    /// Byte segments, in order; on the control channel each is one frame.
    queue: VecDeque<Bytes>,
    /// Bytes in `queue`.
    bytes: usize,
    /// The front segment has been partly sent.
    front_started: bool,
    /// Something was ever queued here.
    used: bool,
    /// The sender ended the channel; the end chunk follows the queue.
    finish: bool,
    /// The end chunk has been cut.
    finished: bool,
}

impl TxChannel {
    fn has_work(&self) -> bool {
        !self.queue.is_empty() || (self.finish && !self.finished)
    }
}

/// What the writer does next.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    /// Send a chunk with this header; its payload is in the slices.
    Chunk([u8; CHUNK_HEADER]),
    /// Nothing to send: flush and wait.
    Idle,
    /// Send this Close frame (if any) on the control channel, then
    /// `close_notify`, and end.
    Close(Option<Bytes>),
}

/// The writer's queues and its choice of what goes next; pure, so the
/// order is tested without sockets.
#[derive(Debug)]
struct TxQueues {
    chans: [TxChannel; CHANNELS],
    closing: Option<Closing>,
    sched: LaneScheduler,
    chunk: usize,
    /// The writer has flushed everything queued so far.
    flushed: bool,
}

impl TxQueues {
    fn new(chunk: usize) -> Self {
        Self {
            chans: Default::default(),
            closing: None,
            sched: LaneScheduler::new(DEFAULT_LANE_WEIGHTS),
            chunk: chunk.clamp(1, MAX_CHUNK),
            flushed: true,
        }
    }

    /// Takes `parts` (`len` bytes) into channel `ci` if its queue has room
    /// (an empty queue takes anything); `Ok(false)` if it is full.
    fn try_push(
        &mut self,
        ci: usize,
        parts: &mut [Bytes],
        len: usize,
        cap: usize,
    ) -> Result<bool, LinkError> {
        let c = &mut self.chans[ci];
        if c.finish {
            return Err(LinkError::Finished);
        }
        if c.bytes > 0 && c.bytes + len > cap {
            return Ok(false);
        }
        for p in parts.iter_mut().filter(|p| !p.is_empty()) {
            c.queue.push_back(std::mem::take(p));
        }
        c.bytes += len;
        c.used = true;
        self.flushed = false;
        Ok(true)
    }

    /// Ends channel `ci` after what is queued, if it exists: the control
    /// channel always does, a lane once something was queued on it.
    fn finish(&mut self, ci: usize) {
        let c = &mut self.chans[ci];
        if (c.used || ci == Channel::Control.index()) && !c.finish {
            c.finish = true;
            self.flushed = false;
        }
    }

    fn close(&mut self, closing: Closing) {
        self.closing.get_or_insert(closing);
    }

    fn busy(&self) -> bool {
        self.closing.is_some() || self.chans.iter().any(TxChannel::has_work)
    }

    /// The next step; a chunk's payload goes into `slices`.
    fn next(&mut self, slices: &mut Vec<Bytes>) -> Step {
        if let Some(closing) = &self.closing {
            let control = &self.chans[0];
            // The Close frame must start on a frame boundary.
            if control.front_started {
                return self.cut(0, slices, 1);
            }
            let frame = match closing {
                Closing::Frame(code, reason) if !control.finish => Some(
                    Frame::Close {
                        code: *code,
                        reason: reason.clone(),
                    }
                    .to_bytes(),
                ),
                _ => None,
            };
            for c in &mut self.chans {
                c.queue.clear();
                c.bytes = 0;
            }
            return Step::Close(frame);
        }
        if self.chans[0].has_work() {
            return self.cut(0, slices, MAX_SLICES);
        }
        let lanes = std::array::from_fn(|i| self.chans[1 + i].has_work());
        match self.sched.next(lanes) {
            Some(i) => self.cut(1 + i, slices, MAX_SLICES),
            None => Step::Idle,
        }
    }

    /// One chunk of channel `ci` (which has work): up to `chunk` bytes
    /// from at most `segments` segments at the front of its queue, or its
    /// end.
    fn cut(&mut self, ci: usize, slices: &mut Vec<Bytes>, segments: usize) -> Step {
        let channel = Channel::ALL[ci];
        let c = &mut self.chans[ci];
        if c.queue.is_empty() {
            c.finished = true;
            return Step::Chunk(chunk_header(channel, 0));
        }
        let mut len = 0;
        while len < self.chunk && slices.len() < segments {
            let Some(front) = c.queue.front_mut() else {
                break;
            };
            let take = (self.chunk - len).min(front.len());
            if take == front.len() {
                slices.extend(c.queue.pop_front());
                c.front_started = false;
            } else {
                slices.push(front.split_to(take));
                c.front_started = true;
            }
            len += take;
        }
        c.bytes -= len;
        // len <= chunk <= MAX_CHUNK.
        Step::Chunk(chunk_header(channel, len as u16))
    }
}

impl TcpLink {
    /// Starts the link's writer and reader tasks on an established TLS
    /// connection; frames are read within `limits`. Call from within a
    /// tokio runtime.
    pub fn new(conn: TlsConnection, limits: Limits, tuning: &TcpTuning) -> Self {
        let (read, write) = tokio::io::split(conn.stream);
        Self::start(conn.peer_key, conn.remote, read, write, limits, tuning)
    }

    /// Starts the tasks on any byte stream's halves.
    fn start<R, W>(
        peer_key: [u8; 32],
        remote: SocketAddr,
        read: R,
        write: W,
        limits: Limits,
        tuning: &TcpTuning,
    ) -> Self
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let (lanes_tx, lanes_rx) = mpsc::channel(Lane::ALL.len());
        let inner = Arc::new(Inner {
            peer_key,
            remote,
            limits,
            send_queue: tuning.send_queue,
            channel_window: tuning.channel_window,
            linger: tuning.linger,
            tx: Mutex::new(TxQueues::new(tuning.chunk_bytes)),
            wake_writer: Notify::new(),
            tx_room: Notify::new(),
            writer_idle: Notify::new(),
            rx: Default::default(),
            rx_room: Notify::new(),
            new_lanes: tokio::sync::Mutex::new(lanes_rx),
            control_taken: AtomicBool::new(false),
            end: watch::Sender::new(None),
            writer_done: watch::Sender::new(false),
        });
        tokio::spawn(writer(inner.clone(), write));
        tokio::spawn(reader(inner.clone(), read, lanes_tx));
        Self {
            h: Arc::new(Handle(inner)),
        }
    }

    /// The key the peer proved in the TLS handshake.
    pub fn peer_key(&self) -> [u8; 32] {
        self.h.0.peer_key
    }

    /// The peer's address.
    pub fn remote_address(&self) -> SocketAddr {
        self.h.0.remote
    }

    /// The control channel's two halves; once per link.
    pub(crate) fn control(&self) -> Result<(TcpSender, TcpReceiver), LinkError> {
        if self.h.0.control_taken.swap(true, Ordering::AcqRel) {
            return Err(LinkError::ControlInUse);
        }
        Ok((
            TcpSender { h: self.h.clone() },
            TcpReceiver::new(self.h.clone(), Channel::Control),
        ))
    }

    /// The sender of this side's lanes.
    pub fn lane_sender(&self) -> TcpLaneSender {
        TcpLaneSender { h: self.h.clone() }
    }

    /// The next lane channel the peer starts sending on; an error once the
    /// link has ended (or all four lanes have been handed out).
    pub async fn accept_lane(&self) -> Result<TcpReceiver, LinkError> {
        let next = self.h.0.new_lanes.lock().await.recv().await;
        match next {
            Some(channel) => Ok(TcpReceiver::new(self.h.clone(), channel)),
            None => Err(self.h.0.end().unwrap_or(LinkEnd::Local).into()),
        }
    }

    /// Closes the link with `code` and `reason` (cut to 1024 bytes); see
    /// the module docs.
    pub fn close(&self, code: CloseCode, reason: &str) {
        self.h.0.close(code, reason);
    }

    /// Waits until the link has ended and says why.
    pub async fn closed(&self) -> LinkEnd {
        closed(&self.h.0).await
    }

    /// Why the link ended, if it has.
    pub fn end(&self) -> Option<LinkEnd> {
        self.h.0.end()
    }

    /// Waits until the writer task has ended: after a close, once the
    /// Close frame and `close_notify` are written (or its linger passed).
    pub async fn close_sent(&self) {
        let mut done = self.h.0.writer_done.subscribe();
        let _ = done.wait_for(|d| *d).await;
    }

    /// Bytes queued for the writer and bytes received but not yet read
    /// (with 64 bytes counted per frame): what the link holds in memory
    /// besides its partial frames.
    pub fn buffered(&self) -> (usize, usize) {
        let tx = self.h.0.tx().chans.iter().map(|c| c.bytes).sum();
        let rx = self.h.0.rx.iter().map(|c| lock(&c.q).cost).sum();
        (tx, rx)
    }
}

async fn closed(inner: &Inner) -> LinkEnd {
    let mut rx = inner.end.subscribe();
    let end = rx.wait_for(Option::is_some).await;
    // The sender lives in `inner`, so the channel cannot close.
    end.ok().and_then(|e| e.clone()).unwrap_or(LinkEnd::Local)
}

/// The sending half of a TCP link's control channel.
pub struct TcpSender {
    h: Arc<Handle>,
}

impl std::fmt::Debug for TcpSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpSender").finish_non_exhaustive()
    }
}

impl TcpSender {
    /// Queues one whole frame (length prefix included).
    pub async fn send(&mut self, frame: Bytes) -> Result<(), LinkError> {
        self.h.0.push(Channel::Control.index(), [frame]).await
    }

    /// Ends the channel after what is queued.
    pub fn finish(&mut self) {
        let inner = &self.h.0;
        inner.tx().finish(Channel::Control.index());
        inner.wake_writer.notify_one();
    }
}

/// The sending side of a TCP link's lanes.
pub struct TcpLaneSender {
    h: Arc<Handle>,
}

impl std::fmt::Debug for TcpLaneSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpLaneSender").finish_non_exhaustive()
    }
}

impl TcpLaneSender {
    /// Has the writer task interleave the lanes' chunks by `weights`
    /// (control, high, normal, bulk; see [`LaneScheduler::new`]) from now
    /// on, rather than by [`DEFAULT_LANE_WEIGHTS`].
    pub fn set_weights(&mut self, weights: [u32; LANES]) {
        self.h.0.tx().sched = LaneScheduler::new(weights);
    }

    /// Queues one frame, as one or more parts, on `lane`.
    pub async fn send<const N: usize>(
        &mut self,
        lane: Lane,
        parts: [Bytes; N],
    ) -> Result<(), LinkError> {
        self.h.0.push(Channel::Lane(lane).index(), parts).await
    }

    /// Ends every lane that was sent on, after what is queued.
    pub fn finish(&mut self) {
        let inner = &self.h.0;
        let mut tx = inner.tx();
        for lane in Lane::ALL {
            tx.finish(Channel::Lane(lane).index());
        }
        drop(tx);
        inner.wake_writer.notify_one();
    }

    /// Waits until the writer has written and flushed everything queued
    /// (or the link has ended).
    pub async fn flushed(&self) {
        let inner = &self.h.0;
        loop {
            let idle = inner.writer_idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if inner.end().is_some() || inner.tx().flushed {
                return;
            }
            idle.await;
        }
    }

    /// Why the link ended, if it has.
    pub fn end(&self) -> Option<LinkEnd> {
        self.h.0.end()
    }

    /// Waits until the link has ended and says why.
    pub async fn closed(&self) -> LinkEnd {
        closed(&self.h.0).await
    }
}

/// Whole frames from one channel of a TCP link.
pub struct TcpReceiver {
    h: Arc<Handle>,
    channel: Channel,
}

impl std::fmt::Debug for TcpReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpReceiver")
            .field("channel", &self.channel)
            .finish_non_exhaustive()
    }
}

impl TcpReceiver {
    fn new(h: Arc<Handle>, channel: Channel) -> Self {
        Self { h, channel }
    }

    /// The channel it reads.
    pub fn channel(&self) -> Channel {
        self.channel
    }

    /// The next frame as bytes (length prefix included); `Ok(None)` once
    /// the peer ended the channel.
    pub async fn next_bytes(&mut self) -> Result<Option<Bytes>, LinkError> {
        let inner = &self.h.0;
        let ch = &inner.rx[self.channel.index()];
        loop {
            let data = ch.data.notified();
            // Read before the queue: a peer's end is set only after every
            // frame before it was queued, so an end seen here with an
            // empty queue is final.
            let end = inner.end();
            if let Some(end) = &end
                && end.is_local()
            {
                return Err(end.clone().into());
            }
            {
                let mut q = lock(&ch.q);
                if let Some(f) = q.frames.pop_front() {
                    q.cost -= f.len() + FRAME_COST;
                    drop(q);
                    inner.rx_room.notify_one();
                    return Ok(Some(f));
                }
                if q.fin {
                    return Ok(None);
                }
            }
            if let Some(end) = end {
                return Err(end.into());
            }
            data.await;
        }
    }

    /// The next frame, decoded; `Ok(None)` once the peer ended the channel.
    pub async fn next(&mut self) -> Result<Option<Frame>, LinkError> {
        match self.next_bytes().await? {
            Some(b) => Ok(Some(Frame::decode(b, &self.h.0.limits)?)),
            None => Ok(None),
        }
    }

    /// Stops reading: what is queued and what arrives later is dropped
    /// (also when the receiver is dropped, so an unread channel does not
    /// hold back the others).
    pub fn stop(&mut self) {
        let inner = &self.h.0;
        let mut q = lock(&inner.rx[self.channel.index()].q);
        q.stopped = true;
        q.frames.clear();
        q.cost = 0;
        drop(q);
        inner.rx_room.notify_one();
    }
}

impl Drop for TcpReceiver {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The writer task: sends what [`TxQueues::next`] picks until the link
/// closes.
async fn writer<W: AsyncWrite + Unpin>(inner: Arc<Inner>, mut io: W) {
    /// Tells [`TcpLink::close_sent`] on every way out.
    struct Done<'a>(&'a watch::Sender<bool>);
    impl Drop for Done<'_> {
        fn drop(&mut self) {
            self.0.send_replace(true);
        }
    }
    let _done = Done(&inner.writer_done);
    let mut end_rx = inner.end.subscribe();
    let mut slices: Vec<Bytes> = Vec::with_capacity(MAX_SLICES);
    loop {
        let step = inner.tx().next(&mut slices);
        match step {
            Step::Chunk(header) => {
                inner.tx_room.notify_waiters();
                let r = tokio::select! {
                    r = write_chunk(&mut io, &header, &slices) => r,
                    _ = give_up(&inner, &mut end_rx) => return,
                };
                slices.clear();
                if let Err(e) = r {
                    inner.finish_with(LinkEnd::io(&e), Closing::Quiet);
                    return;
                }
            }
            Step::Idle => {
                let r = tokio::select! {
                    r = io.flush() => r,
                    _ = give_up(&inner, &mut end_rx) => return,
                };
                if let Err(e) = r {
                    inner.finish_with(LinkEnd::io(&e), Closing::Quiet);
                    return;
                }
                let wake = inner.wake_writer.notified();
                {
                    let mut tx = inner.tx();
                    if !tx.busy() {
                        tx.flushed = true;
                    }
                }
                inner.writer_idle.notify_waiters();
                wake.await;
            }
            Step::Close(frame) => {
                let bye = async {
                    if let Some(f) = frame {
                        let header = chunk_header(Channel::Control, f.len() as u16);
                        write_chunk(&mut io, &header, &[f]).await?;
                    }
                    io.shutdown().await
                };
                if let Err(e) = tokio::time::timeout(inner.linger, bye).await {
                    tracing::debug!(remote = %inner.remote, "TCP link close not sent in time: {e}");
                }
                return;
            }
        }
    }
}

/// Resolves `linger` after the link ended: a write that has not finished
/// by then is abandoned (the peer does not read), and the connection is
/// dropped without a Close frame, which could not start mid-chunk.
async fn give_up(inner: &Inner, end_rx: &mut watch::Receiver<Option<LinkEnd>>) {
    let _ = end_rx.wait_for(Option::is_some).await;
    tokio::time::sleep(inner.linger).await;
    tracing::debug!(remote = %inner.remote, "TCP link closed while the peer did not read; dropping it");
}

/// Writes one chunk: its header and payload slices, in one vectored write
/// where the stream takes it (so header and payload share a TLS record).
async fn write_chunk<W: AsyncWrite + Unpin>(
    io: &mut W,
    header: &[u8; CHUNK_HEADER],
    slices: &[Bytes],
) -> std::io::Result<()> {
    let mut bufs = [IoSlice::new(&[]); MAX_SLICES + 1];
    bufs[0] = IoSlice::new(header);
    for (b, s) in bufs[1..].iter_mut().zip(slices) {
        *b = IoSlice::new(s);
    }
    let mut bufs = &mut bufs[..=slices.len().min(MAX_SLICES)];
    while !bufs.is_empty() {
        let n = io.write_vectored(bufs).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut bufs, n);
    }
    Ok(())
}

/// The reader task: demultiplexes the stream into the channels' queues
/// until the link ends.
async fn reader<R: AsyncRead + Unpin>(inner: Arc<Inner>, mut io: R, lanes: mpsc::Sender<Channel>) {
    let mut demux = Demux::new(&inner.limits);
    let mut buf = BytesMut::with_capacity(READ_BUF);
    let mut seen = [false; CHANNELS];
    // The last Close frame the peer sent: its reason when it closes.
    let mut said: Option<(CloseCode, String)> = None;
    let mut end_rx = inner.end.subscribe();
    let peer_end = 'read: loop {
        buf.clear();
        buf.reserve(READ_BUF);
        let r = tokio::select! {
            biased;
            _ = end_rx.wait_for(Option::is_some) => break 'read None,
            r = io.read_buf(&mut buf) => r,
        };
        match r {
            Ok(0) => {
                break 'read Some(match said.take() {
                    Some((code, reason)) => LinkEnd::Closed { code, reason },
                    // Without a Close, a stream that stops inside a chunk
                    // or frame is broken framing, not just a lost link:
                    // refused with its reason (the peer may still read).
                    None => match demux.finish() {
                        Ok(()) => LinkEnd::Lost,
                        Err(e) => {
                            tracing::warn!(remote = %inner.remote, "closing TCP link: {e}");
                            LinkEnd::Mux(e)
                        }
                    },
                });
            }
            Err(e) => {
                // A reset right after a Close still ends for its reason.
                break 'read Some(match said.take() {
                    Some((code, reason)) => LinkEnd::Closed { code, reason },
                    None => LinkEnd::io(&e),
                });
            }
            Ok(_) => {}
        }
        let mut input = &buf[..];
        loop {
            let ev = match demux.feed(&mut input) {
                Ok(Some(ev)) => ev,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(remote = %inner.remote, "closing TCP link: {e}");
                    break 'read Some(LinkEnd::Mux(e));
                }
            };
            let channel = match &ev {
                Event::Frame { channel, .. } | Event::End(channel) => *channel,
            };
            if !seen[channel.index()] {
                seen[channel.index()] = true;
                if channel != Channel::Control {
                    // At most four lanes, each once: never full.
                    let _ = lanes.try_send(channel);
                }
            }
            match ev {
                Event::Frame { channel, frame } => {
                    if channel == Channel::Control
                        && frame.get(LEN_PREFIX) == Some(&(FrameType::Close as u8))
                        && let Ok(Frame::Close { code, reason }) =
                            Frame::decode(frame.clone(), &inner.limits)
                    {
                        said = Some((code, reason));
                    }
                    if !deliver(&inner, channel, frame, &mut end_rx).await {
                        break 'read None;
                    }
                }
                Event::End(channel) => {
                    let ch = &inner.rx[channel.index()];
                    lock(&ch.q).fin = true;
                    ch.data.notify_one();
                }
            }
        }
    };
    drop(lanes);
    match peer_end {
        Some(LinkEnd::Mux(e)) => {
            let closing = Closing::Frame(e.close_code(), e.to_string());
            inner.finish_with(LinkEnd::Mux(e), closing);
        }
        // The peer closed or the connection failed: answer close_notify.
        Some(end) => {
            inner.finish_with(end, Closing::Quiet);
            return;
        }
        None => {}
    }
    // This side ended the link: read (and drop) until the peer closes too,
    // bounded, so the kernel does not reset the connection under the Close
    // frame before the peer has read it.
    let _ = tokio::time::timeout(inner.linger, async {
        loop {
            buf.clear();
            match io.read_buf(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
}

/// Queues `frame` on its channel, waiting while the channel is full;
/// `false` if the link ended meanwhile.
async fn deliver(
    inner: &Inner,
    channel: Channel,
    frame: Bytes,
    end_rx: &mut watch::Receiver<Option<LinkEnd>>,
) -> bool {
    let ch = &inner.rx[channel.index()];
    let cost = frame.len() + FRAME_COST;
    let mut frame = Some(frame);
    loop {
        let room = inner.rx_room.notified();
        {
            let mut q = lock(&ch.q);
            if q.stopped {
                return true;
            }
            if q.frames.is_empty() || q.cost + cost <= inner.channel_window {
                q.frames.extend(frame.take());
                q.cost += cost;
                drop(q);
                ch.data.notify_one();
                return true;
            }
        }
        tokio::select! {
            biased;
            _ = end_rx.wait_for(Option::is_some) => return false,
            _ = room => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use relay_codec::mux::MuxError;

    fn frame(len: usize, fill: u8) -> Bytes {
        let mut b = BytesMut::with_capacity(LEN_PREFIX + len);
        b.extend_from_slice(&(len as u32).to_le_bytes());
        b.resize(LEN_PREFIX + len, fill);
        b.freeze()
    }

    fn push(tx: &mut TxQueues, channel: Channel, f: Bytes) {
        let len = f.len();
        assert!(
            tx.try_push(channel.index(), &mut [f], len, usize::MAX)
                .unwrap()
        );
    }

    /// Runs the writer's choice to the end: each chunk's channel and length.
    fn drain(tx: &mut TxQueues) -> Vec<(u8, usize)> {
        let mut out = vec![];
        let mut slices = vec![];
        loop {
            match tx.next(&mut slices) {
                Step::Chunk(h) => {
                    let len = usize::from(u16::from_le_bytes([h[1], h[2]]));
                    assert_eq!(len, slices.iter().map(Bytes::len).sum::<usize>());
                    out.push((h[0], len));
                    slices.clear();
                }
                Step::Idle => return out,
                Step::Close(_) => panic!("not closing"),
            }
        }
    }

    #[test]
    fn control_goes_out_after_at_most_the_chunk_in_progress() {
        let mut tx = TxQueues::new(16_000);
        let bulk = Channel::Lane(Lane::Bulk);
        push(&mut tx, bulk, frame(1 << 20, 0xbb));
        let mut slices = vec![];
        assert_eq!(
            tx.next(&mut slices),
            Step::Chunk(chunk_header(bulk, 16_000))
        );
        slices.clear();
        push(&mut tx, Channel::Control, frame(40, 1));
        push(&mut tx, Channel::Control, frame(50, 2));
        // Both control frames, together, before the next bulk chunk.
        assert_eq!(
            tx.next(&mut slices),
            Step::Chunk(chunk_header(Channel::Control, 98))
        );
        assert_eq!(slices.len(), 2);
        slices.clear();
        let rest = drain(&mut tx);
        assert!(rest.iter().all(|&(c, len)| c == bulk.id() && len <= 16_000));
        assert_eq!(
            rest.iter().map(|&(_, len)| len).sum::<usize>(),
            LEN_PREFIX + (1 << 20) - 16_000
        );
    }

    #[test]
    fn lanes_interleave_chunk_by_chunk_by_weight() {
        let mut tx = TxQueues::new(1000);
        for lane in Lane::ALL {
            push(&mut tx, Channel::Lane(lane), frame(100_000, 0));
        }
        let order: Vec<u8> = drain(&mut tx).iter().take(15).map(|&(c, _)| c).collect();
        // 8:4:2:1 over one cycle, the control lane first.
        assert_eq!(order, [1, 2, 1, 3, 1, 2, 1, 4, 1, 2, 1, 3, 1, 2, 1]);
    }

    #[test]
    fn a_finished_channel_sends_its_end_after_its_data_and_refuses_more() {
        let mut tx = TxQueues::new(1000);
        let high = Channel::Lane(Lane::High);
        push(&mut tx, high, frame(1500, 0));
        tx.finish(high.index());
        // Never-used lanes get no end chunk.
        tx.finish(Channel::Lane(Lane::Bulk).index());
        assert_eq!(drain(&mut tx), [(2, 1000), (2, 504), (2, 0)]);
        let f = frame(1, 0);
        assert!(matches!(
            tx.try_push(high.index(), &mut [f], 5, usize::MAX),
            Err(LinkError::Finished)
        ));
    }

    #[test]
    fn close_finishes_the_control_frame_in_progress_then_drops_the_rest() {
        let mut tx = TxQueues::new(100);
        push(&mut tx, Channel::Control, frame(250, 7));
        push(&mut tx, Channel::Control, frame(10, 8));
        push(&mut tx, Channel::Lane(Lane::Normal), frame(5000, 9));
        let mut slices = vec![];
        assert_eq!(
            tx.next(&mut slices),
            Step::Chunk(chunk_header(Channel::Control, 100))
        );
        slices.clear();
        tx.close(Closing::Frame(CloseCode::Shutdown, "bye".into()));
        // The rest of the first control frame, in chunks...
        assert_eq!(
            tx.next(&mut slices),
            Step::Chunk(chunk_header(Channel::Control, 100))
        );
        slices.clear();
        assert_eq!(
            tx.next(&mut slices),
            Step::Chunk(chunk_header(Channel::Control, 54))
        );
        assert_eq!(slices.len(), 1, "stops at the frame boundary");
        slices.clear();
        // ...then the Close frame, and nothing else.
        let close = Frame::Close {
            code: CloseCode::Shutdown,
            reason: "bye".into(),
        }
        .to_bytes();
        assert_eq!(tx.next(&mut slices), Step::Close(Some(close)));
        assert!(tx.chans.iter().all(|c| c.bytes == 0));
    }

    #[test]
    fn a_full_queue_refuses_until_the_writer_takes_from_it() {
        let mut tx = TxQueues::new(1000);
        let lane = Channel::Lane(Lane::Normal).index();
        // An empty queue takes a frame larger than its bound.
        assert!(
            tx.try_push(lane, &mut [frame(3000, 0)], 3004, 2000)
                .unwrap()
        );
        assert!(!tx.try_push(lane, &mut [frame(1, 0)], 5, 2000).unwrap());
        let mut slices = vec![];
        for _ in 0..3 {
            tx.next(&mut slices);
            slices.clear();
        }
        assert_eq!(tx.chans[lane].bytes, 4);
        assert!(tx.try_push(lane, &mut [frame(1, 0)], 5, 2000).unwrap());
    }

    /// A link over one end of an in-memory pipe of 64 KiB; the other end
    /// is the test's peer.
    fn piped() -> (TcpLink, tokio::io::DuplexStream) {
        piped_with(64 * 1024)
    }

    /// [`piped`] with a pipe of `capacity` bytes.
    fn piped_with(capacity: usize) -> (TcpLink, tokio::io::DuplexStream) {
        let (ours, peer) = tokio::io::duplex(capacity);
        let (read, write) = tokio::io::split(ours);
        let tuning = TcpTuning {
            linger: std::time::Duration::from_millis(50),
            ..TcpTuning::default()
        };
        let link = TcpLink::start(
            [0; 32],
            "127.0.0.1:1".parse().unwrap(),
            read,
            write,
            Limits::default(),
            &tuning,
        );
        (link, peer)
    }

    /// Everything the link sent the peer until it closed, as frames of
    /// channel 0.
    async fn control_frames_sent(mut peer: tokio::io::DuplexStream) -> Vec<Frame> {
        let mut bytes = vec![];
        tokio::time::timeout(
            std::time::Duration::from_secs(20),
            peer.read_to_end(&mut bytes),
        )
        .await
        .expect("the link closes")
        .unwrap();
        let mut demux = Demux::new(&Limits::default());
        let mut input = &bytes[..];
        let mut frames = vec![];
        while let Some(ev) = demux.feed(&mut input).unwrap() {
            if let Event::Frame {
                channel: Channel::Control,
                frame,
            } = ev
            {
                frames.push(Frame::decode(frame, &Limits::default()).unwrap());
            }
        }
        frames
    }

    #[tokio::test]
    async fn a_stream_that_ends_inside_a_chunk_without_close_is_refused_as_malformed() {
        let (link, mut peer) = piped();
        // A chunk header for 100 bytes of lane 2, three of them, the end.
        peer.write_all(&[3, 100, 0, 1, 2, 3]).await.unwrap();
        peer.shutdown().await.unwrap();
        let end = tokio::time::timeout(std::time::Duration::from_secs(20), link.closed())
            .await
            .expect("the link ends");
        assert_eq!(end, LinkEnd::Mux(MuxError::EndedInsideChunk));
        let frames = control_frames_sent(peer).await;
        assert!(
            matches!(
                frames.last(),
                Some(Frame::Close { code: CloseCode::Malformed, reason })
                    if reason.contains("inside a chunk")
            ),
            "{frames:?}"
        );
    }

    #[tokio::test]
    async fn a_stream_that_ends_after_close_ends_for_its_reason_even_inside_a_lane_frame() {
        let (link, mut peer) = piped();
        // Half a lane frame (a closing side drops the rest), then Close.
        let mut bytes = chunk_header(Channel::Lane(Lane::Normal), 6).to_vec();
        bytes.extend_from_slice(&[100, 0, 0, 0, 1, 0]);
        let close = Frame::Close {
            code: CloseCode::Normal,
            reason: "done".into(),
        }
        .to_bytes();
        bytes.extend_from_slice(&chunk_header(Channel::Control, close.len() as u16));
        bytes.extend_from_slice(&close);
        peer.write_all(&bytes).await.unwrap();
        peer.shutdown().await.unwrap();
        let end = tokio::time::timeout(std::time::Duration::from_secs(20), link.closed())
            .await
            .expect("the link ends");
        assert_eq!(
            end,
            LinkEnd::Closed {
                code: CloseCode::Normal,
                reason: "done".into()
            }
        );
    }

    #[tokio::test]
    async fn a_close_ends_the_writer_even_when_the_peer_never_reads() {
        // A pipe of 1 KiB nobody reads: a 16 KiB chunk write never ends.
        let (link, _peer) = piped_with(1024);
        let mut lanes = link.lane_sender();
        let f = frame(100_000, 0);
        lanes.send(Lane::Bulk, [f]).await.unwrap();
        // Once the writer has cut a chunk it is inside a write that cannot
        // finish.
        tokio::time::timeout(std::time::Duration::from_secs(20), async {
            while link.buffered().0 == LEN_PREFIX + 100_000 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the writer starts");
        link.close(CloseCode::Shutdown, "stuck");
        tokio::time::timeout(std::time::Duration::from_secs(20), link.close_sent())
            .await
            .expect("the writer gives up after its linger");
        assert_eq!(link.end(), Some(LinkEnd::Local));
    }
}
