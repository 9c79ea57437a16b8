//! The cell's API, [`Cell`] and [`CellHandle`], and the state they share
//! with the link tasks.

use super::connect::{Dialer, dial};
use super::event::Tally;
use super::options::{check_announcement, validate};
use super::receive::LaneDedup;
use super::session::supervise;
use super::{AuthMode, CellError, CellOptions, CellStats, Event, Received, Undelivered};
use crate::clock;
use bytes::{Bytes, BytesMut};
#[cfg(doc)]
use relay_codec::frame::CloseCode;
use relay_codec::id_table::IdKey;
use relay_codec::message::encoded_layout;
use relay_codec::{
    Authenticator, Destination, Envelope, Frame, Keypair, Lane, Message, MessageId, NodeAddr,
    PublicKey, ServiceName,
};
use relay_link::LaneQueues;
use relay_link::dial::Backoff;
use relay_link::lanes::LANES;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio::task::JoinHandle;

/// Control frames waiting to be written to the relay.
pub(crate) const CONTROL_QUEUE: usize = 256;

/// A cell linked to a relay: send, receive, announce, discover.
///
/// Sending methods take `&self` and are also available on a cloneable
/// [`CellHandle`] (see [`Cell::handle`]) for other tasks; receiving
/// ([`next_event`](Self::next_event), [`recv`](Self::recv)) takes
/// `&mut self`. Dropping a `Cell` closes it in the background; call
/// [`close`](Self::close) to wait until queued messages are flushed.
///
/// ```no_run
/// use relay_client::cell::{Cell, CellOptions, Event};
/// use relay_codec::{Keypair, Lane, NodeAddr};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let relay: NodeAddr = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa@127.0.0.1:4433".parse()?;
/// let mut cell = Cell::connect(&relay, Keypair::generate(), CellOptions::default()).await?;
/// let peer = Keypair::generate().public();
/// cell.send(peer, Lane::Normal, &b"hello"[..]).await?;
/// while let Some(event) = cell.next_event().await {
///     if let Event::Message(msg) = event {
///         println!("{} says {:?}", msg.source, msg.payload);
///         break;
///     }
/// }
/// cell.close().await?;
/// # Ok(())
/// # }
/// ```
pub struct Cell {
    handle: CellHandle,
    events: mpsc::Receiver<Delivery>,
    /// The rest of the batch being handed out.
    buffered: std::vec::IntoIter<Received>,
    shutdown: watch::Sender<bool>,
    supervisor: Option<JoinHandle<Result<(), CellError>>>,
}

/// A cloneable handle for sending and control on a [`Cell`], for tasks
/// other than the one receiving. It fails with [`CellError::Closed`] once
/// the cell is closed.
#[derive(Clone)]
pub struct CellHandle {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for CellHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CellHandle")
            .field("key", &self.shared.key.public())
            .field("relay", &self.shared.relay)
            .finish()
    }
}

impl std::fmt::Debug for Cell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cell")
            .field("key", &self.handle.shared.key.public())
            .field("relay", &self.handle.shared.relay)
            .finish()
    }
}

/// The cells offering a service, with their application versions.
pub(crate) type Discovered = Vec<(PublicKey, String)>;

/// What the link tasks hand to the application, in order.
pub(crate) enum Delivery {
    /// Presence, a notice, or the link going down or coming back.
    Event(Event),
    /// The messages of one batch frame that passed the checks, in order;
    /// never empty. It holds [`Shared::permits`] of the message queue's
    /// permits, given back when the application takes it off the queue.
    Batch(Vec<Received>),
}

/// State shared by the handles and the link tasks.
pub(crate) struct Shared {
    pub(crate) key: Keypair,
    pub(crate) relay: NodeAddr,
    pub(crate) opts: CellOptions,
    /// Outbound lanes; they outlive each connection, so queued messages
    /// survive a reconnect.
    pub(crate) queues: Arc<LaneQueues>,
    pub(crate) nonce: AtomicU64,
    pub(crate) counters: Counters,
    pub(crate) control: mpsc::Sender<Frame>,
    pub(crate) pending: Mutex<HashMap<u32, oneshot::Sender<Discovered>>>,
    pub(crate) next_request: AtomicU32,
    pub(crate) announced: Mutex<Announced>,
    /// Recently seen ids, per lane. The reader of a lane holds its lock
    /// for as long as it reads, so checking takes no lock per message or
    /// batch; a reader on a new connection waits for the old one to finish.
    pub(crate) dedup: [Arc<tokio::sync::Mutex<LaneDedup>>; LANES],
    /// Room in the application's message queue, one permit per message.
    pub(crate) room: Semaphore,
    /// Permits `room` started with: [`CellOptions::event_queue`].
    pub(crate) room_max: usize,
    /// Largest payload accepted: ours, lowered to the relay's from Welcome.
    pub(crate) max_payload: AtomicUsize,
    pub(crate) link: Mutex<LinkState>,
    /// Set by close (or drop): no more sends.
    pub(crate) closing: AtomicBool,
    /// What the relay reported as not delivered.
    pub(crate) undelivered: Mutex<Tally>,
    /// Durable messages sent and not yet acknowledged by the relay, by id:
    /// their bytes, resent unchanged after a reconnect.
    pub(crate) durable: Mutex<HashMap<MessageId, Outstanding>>,
}

/// A durable message the relay has not acknowledged yet.
pub(crate) struct Outstanding {
    lane: Lane,
    raw: Bytes,
    waiters: Vec<oneshot::Sender<relay_codec::frame::DurableStatus>>,
}

/// The relay's answer about a durable message: resolves once the relay
/// has logged it ([`DurableStatus::Acked`](relay_codec::frame::DurableStatus::Acked))
/// or refused it.
pub type DurableReceipt = oneshot::Receiver<relay_codec::frame::DurableStatus>;

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) received: AtomicU64,
    pub(crate) dropped_bad_signature: AtomicU64,
    pub(crate) dropped_duplicate: AtomicU64,
    pub(crate) dropped_unsupported: AtomicU64,
    pub(crate) dropped_events: AtomicU64,
    pub(crate) reconnects: AtomicU64,
}

/// What the relay should know about this cell, re-sent on reconnect.
pub(crate) struct Announced {
    pub(crate) app_version: String,
    pub(crate) services: Vec<ServiceName>,
    pub(crate) watch: bool,
}

#[derive(Default)]
pub(crate) struct LinkState {
    pub(crate) up: bool,
    /// Why the link went down, while it is down.
    pub(crate) down_reason: Option<String>,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these small locks leaves consistent
    // data (each critical section is one map/cache operation).
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A random 64-bit number from the OS, for the first nonce and the
/// backoff's jitter seed.
pub(crate) fn random_u64() -> u64 {
    getrandom::u64().unwrap_or_else(|_| {
        // No OS randomness: the clock is a poor but usable fallback for a
        // nonce start or a jitter.
        clock::since_epoch().as_nanos() as u64
    })
}

impl Shared {
    pub(crate) fn emit(&self, events: &mpsc::Sender<Delivery>, event: Event) {
        if let Err(mpsc::error::TrySendError::Full(_)) = events.try_send(Delivery::Event(event)) {
            self.counters.dropped_events.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Permits of the message queue a batch of `n` messages holds: all of
    /// the queue at most, so an oversized batch still gets in.
    pub(crate) fn permits(&self, n: usize) -> usize {
        n.min(self.room_max)
    }

    /// The application took a batch of `n` messages off the queue.
    pub(crate) fn release(&self, n: usize) {
        self.room.add_permits(self.permits(n));
    }

    pub(crate) fn is_up(&self) -> bool {
        lock(&self.link).up
    }

    pub(crate) fn set_up(&self) {
        let mut l = lock(&self.link);
        l.up = true;
        l.down_reason = None;
    }

    pub(crate) fn set_down(&self, reason: &str) {
        let mut l = lock(&self.link);
        l.up = false;
        l.down_reason = Some(reason.to_owned());
    }

    /// The error for a send the queues refused.
    pub(crate) fn closed_error(&self) -> CellError {
        if self.closing.load(Ordering::Acquire) {
            return CellError::Closed;
        }
        match &lock(&self.link).down_reason {
            Some(r) => CellError::Disconnected(r.clone()),
            None => CellError::Closed,
        }
    }

    pub(crate) fn announce_frame(&self) -> Option<Frame> {
        let a = lock(&self.announced);
        (!a.app_version.is_empty() || !a.services.is_empty()).then(|| Frame::Announce {
            app_version: a.app_version.clone(),
            services: a.services.clone(),
        })
    }

    /// With [`CellOptions::ack_durable_on_receive`]: acknowledges the
    /// durable messages of a batch the application takes. A full control
    /// queue loses the ack; the relay redelivers and the redelivery is
    /// acknowledged.
    pub(crate) fn auto_ack(&self, batch: &[Received]) {
        if !self.opts.ack_durable_on_receive {
            return;
        }
        let ids: Vec<MessageId> = batch.iter().filter(|r| r.durable).map(|r| r.id).collect();
        for frame in super::receive::durable_acks(&ids) {
            let _ = self.control.try_send(frame);
        }
    }

    /// The relay's DurableAck: answers the senders waiting on `ids`.
    pub(crate) fn durable_answer(
        &self,
        status: relay_codec::frame::DurableStatus,
        ids: &[MessageId],
    ) {
        let mut d = lock(&self.durable);
        for id in ids {
            if let Some(o) = d.remove(id) {
                for w in o.waiters {
                    let _ = w.send(status);
                }
            }
        }
    }

    /// After a reconnect: every durable message not acknowledged goes
    /// again, unchanged (same bytes, same id); the relay acknowledges a
    /// copy it already logged without logging it twice.
    pub(crate) fn resend_durable(&self) {
        let again: Vec<(Lane, Bytes)> = lock(&self.durable)
            .values()
            .map(|o| (o.lane, o.raw.clone()))
            .collect();
        for (lane, raw) in again {
            let id = MessageId([0; 16]);
            let put = move |buf: &mut BytesMut| {
                buf.extend_from_slice(&raw);
                id
            };
            // A full lane: the rest go with the next reconnect or resend.
            if self.queues.stage(lane, put).is_err() {
                break;
            }
        }
        self.queues.wake();
    }

    pub(crate) fn fail_pending(&self) {
        // Dropping the senders wakes the waiting discover calls.
        lock(&self.pending).clear();
    }
}

impl Cell {
    /// Connects to `relay` as `key` and sets up the link: resolves the host,
    /// dials it over [`CellOptions::transport`] (pinning the relay's key in
    /// the TLS handshake), exchanges Hello and
    /// Welcome, and announces [`CellOptions::services`] and
    /// [`CellOptions::app_version`] if set.
    ///
    /// Errors if the relay cannot be reached within
    /// [`CellOptions::connect_timeout`], proves another key, or refuses the
    /// link ([`CellError::Refused`] with its reason). Once connected, a lost
    /// link is re-established in the background (see
    /// [`CellOptions::reconnect`]).
    pub async fn connect(
        relay: &NodeAddr,
        key: Keypair,
        opts: CellOptions,
    ) -> Result<Cell, CellError> {
        validate(&opts)?;
        let limits = opts.limits.clamped();
        let (control_tx, control_rx) = mpsc::channel(CONTROL_QUEUE);
        // A batch takes its permits in one `acquire_many(u32)`.
        let room_max = opts.event_queue.clamp(1, u32::MAX as usize);
        let dedup_capacity = opts.dedup_capacity;
        // One key for the lanes' tables; it keeps a sender from aiming ids
        // at one run of slots.
        let dedup_key = IdKey::random();
        let backoff = Backoff::new(opts.backoff_initial, opts.backoff_max, random_u64())
            .map_err(|e| CellError::Invalid(e.to_string()))?;
        let shared = Arc::new(Shared {
            key,
            relay: relay.clone(),
            queues: Arc::new(LaneQueues::new(opts.queue_depth)),
            nonce: AtomicU64::new(random_u64()),
            counters: Counters::default(),
            control: control_tx,
            pending: Mutex::new(HashMap::new()),
            next_request: AtomicU32::new(1),
            announced: Mutex::new(Announced {
                app_version: opts.app_version.clone(),
                services: opts.services.clone(),
                watch: false,
            }),
            dedup: std::array::from_fn(|_| {
                Arc::new(tokio::sync::Mutex::new(LaneDedup::new(
                    dedup_capacity,
                    dedup_key,
                )))
            }),
            room: Semaphore::new(room_max),
            room_max,
            max_payload: AtomicUsize::new(limits.max_payload),
            link: Mutex::new(LinkState::default()),
            closing: AtomicBool::new(false),
            undelivered: Mutex::new(Tally::default()),
            durable: Mutex::new(HashMap::new()),
            opts: CellOptions { limits, ..opts },
        });
        let mut dialer = Dialer::new(shared.opts.endpoint.clone());
        // On failure the endpoint is dropped without waiting: a half-open
        // attempt would only hold the caller up.
        let established = dial(&shared, &mut dialer).await?;
        let (events_tx, events_rx) = mpsc::channel(room_max);
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let supervisor = tokio::spawn(supervise(
            shared.clone(),
            dialer,
            backoff,
            established,
            control_rx,
            shutdown_rx,
            events_tx,
        ));
        Ok(Cell {
            handle: CellHandle { shared },
            events: events_rx,
            buffered: Vec::new().into_iter(),
            shutdown: shutdown_tx,
            supervisor: Some(supervisor),
        })
    }

    /// A cloneable handle for sending from other tasks.
    pub fn handle(&self) -> CellHandle {
        self.handle.clone()
    }

    /// This cell's public key: its identity and the source of its messages.
    pub fn public_key(&self) -> PublicKey {
        self.handle.public_key()
    }

    /// The relay this cell links to.
    pub fn relay(&self) -> &NodeAddr {
        &self.handle.shared.relay
    }

    /// Whether the link is up right now.
    pub fn is_connected(&self) -> bool {
        self.handle.shared.is_up()
    }

    /// Sends `payload` to the cell `to` on `lane`; see
    /// [`CellHandle::send_message`] for what is stamped and checked.
    pub async fn send(
        &self,
        to: PublicKey,
        lane: Lane,
        payload: impl Into<Bytes>,
    ) -> Result<MessageId, CellError> {
        self.handle.send(to, lane, payload).await
    }

    /// Sends `payload` to every cell attached to the mesh.
    pub async fn broadcast(
        &self,
        lane: Lane,
        payload: impl Into<Bytes>,
    ) -> Result<MessageId, CellError> {
        self.handle.broadcast(lane, payload).await
    }

    /// Sends `payload` to every cell that announced `service`.
    pub async fn send_to_service(
        &self,
        service: &ServiceName,
        lane: Lane,
        payload: impl Into<Bytes>,
    ) -> Result<MessageId, CellError> {
        self.handle.send_to_service(service, lane, payload).await
    }

    /// Sends `payload` to `destination`; see [`CellHandle::send_to`].
    pub async fn send_to(
        &self,
        destination: Destination,
        lane: Lane,
        payload: impl Into<Bytes>,
    ) -> Result<MessageId, CellError> {
        self.handle.send_to(destination, lane, payload).await
    }

    /// Sends a message built by the caller; see [`CellHandle::send_message`].
    pub async fn send_message(&self, msg: Message) -> Result<MessageId, CellError> {
        self.handle.send_message(msg).await
    }

    /// Sends `payload` to the cell `to` durable; see
    /// [`CellHandle::send_durable`].
    pub async fn send_durable(
        &self,
        to: PublicKey,
        lane: Lane,
        payload: impl Into<Bytes>,
    ) -> Result<MessageId, CellError> {
        self.handle.send_durable(to, lane, payload).await
    }

    /// Acknowledges durable messages to the relay; see
    /// [`CellHandle::ack_durable`].
    pub async fn ack_durable(&self, ids: &[MessageId]) -> Result<(), CellError> {
        self.handle.ack_durable(ids).await
    }

    /// The next event: a message, a presence change, a notice, or the link
    /// going down or coming back. `None` once the cell has stopped for good
    /// (the link was lost without [`CellOptions::reconnect`]).
    ///
    /// Cancel-safe: dropping the future loses no event.
    pub async fn next_event(&mut self) -> Option<Event> {
        loop {
            if let Some(m) = self.buffered.next() {
                return Some(Event::Message(m));
            }
            match self.events.recv().await? {
                Delivery::Event(e) => return Some(e),
                Delivery::Batch(batch) => self.take(batch),
            }
        }
    }

    /// The next message, **discarding** every other event (presence,
    /// notices, disconnects) until one arrives; use
    /// [`next_event`](Self::next_event) to see those. `None` once the cell
    /// has stopped for good. Cancel-safe.
    pub async fn recv(&mut self) -> Option<Received> {
        loop {
            if let Some(m) = self.buffered.next() {
                return Some(m);
            }
            if let Delivery::Batch(batch) = self.events.recv().await? {
                self.take(batch);
            }
        }
    }

    /// Appends up to `max` messages to `out`, in order, waiting until there
    /// is at least one, and returns how many; for consumers that receive
    /// at a high rate (a whole batch frame costs about what one
    /// [`recv`](Self::recv) does). It takes what has arrived without
    /// waiting for more, and may return fewer than `max` while more are
    /// queued (when `out` is empty, a batch that fits is handed over as
    /// `out` itself, without copying). Like `recv`, it **discards** every
    /// other event. Returns 0 once the cell has stopped for good (see
    /// [`down_reason`](Self::down_reason) for why), or if `max` is 0.
    ///
    /// Cancel-safe: if the future is dropped before it completes, nothing
    /// was taken and `out` is unchanged.
    pub async fn recv_many(&mut self, out: &mut Vec<Received>, max: usize) -> usize {
        let start = out.len();
        loop {
            let taken = out.len() - start;
            if taken == max {
                return taken;
            }
            if self.buffered.len() > 0 {
                out.extend(self.buffered.by_ref().take(max - taken));
                continue;
            }
            // Wait only while nothing was taken (so cancelling loses
            // nothing); after that, take only what is already queued.
            let next = if taken == 0 {
                self.events.recv().await
            } else {
                self.events.try_recv().ok()
            };
            match next {
                None => return taken,
                Some(Delivery::Event(_)) => {}
                Some(Delivery::Batch(batch)) => {
                    if out.is_empty() && batch.len() <= max {
                        // Hand the batch's vector over instead of copying
                        // it (and whatever comes next into it).
                        self.handle.shared.release(batch.len());
                        self.handle.shared.auto_ack(&batch);
                        *out = batch;
                        return out.len();
                    }
                    self.take(batch);
                }
            }
        }
    }

    /// Makes `batch` the one being handed out, giving its room in the
    /// queue back.
    pub(crate) fn take(&mut self, batch: Vec<Received>) {
        self.handle.shared.release(batch.len());
        self.handle.shared.auto_ack(&batch);
        self.buffered = batch.into_iter();
    }

    /// Why the link is down, while it is down: the reason of the last
    /// [`Event::Disconnected`] (also after the cell stopped for good).
    /// `None` while it is up.
    pub fn down_reason(&self) -> Option<String> {
        self.handle.down_reason()
    }

    /// Replaces this cell's announcement (application version and
    /// services); it is re-sent after a reconnect.
    pub async fn announce(
        &self,
        app_version: &str,
        services: Vec<ServiceName>,
    ) -> Result<(), CellError> {
        self.handle.announce(app_version, services).await
    }

    /// Asks the relay which cells offer `service`: their keys and
    /// application versions.
    pub async fn discover(
        &self,
        service: &ServiceName,
    ) -> Result<Vec<(PublicKey, String)>, CellError> {
        self.handle.discover(service).await
    }

    /// Starts (`true`) or stops presence events ([`Event::Presence`]);
    /// re-sent after a reconnect.
    pub async fn watch_presence(&self, on: bool) -> Result<(), CellError> {
        self.handle.watch_presence(on).await
    }

    /// Counters of what was received and dropped.
    pub fn stats(&self) -> CellStats {
        self.handle.stats()
    }

    /// What the relay reported it did not deliver of this cell's messages
    /// so far (with [`CellOptions::notices`] on). Read it from a
    /// [`CellHandle`] after [`close`](Self::close) for the final tally.
    pub fn undelivered(&self) -> Undelivered {
        self.handle.undelivered()
    }

    /// Closes the cell: stops reconnecting, sends every queued message and
    /// waits (bounded by `WriterConfig::drain_timeout` per lane) until the
    /// relay has received them, sends Close and reads the control stream
    /// until the relay's Close (bounded, about 6 s), so every notice about
    /// what was sent has arrived ([`Undelivered::complete`]); then closes
    /// the link with [`CloseCode::Normal`] and waits (about a second at
    /// most) for the endpoint to finish.
    ///
    /// Errors with [`CellError::Unsent`] if messages were still queued and
    /// could not be sent (the link was down, or failed while flushing).
    pub async fn close(mut self) -> Result<(), CellError> {
        self.handle.shared.closing.store(true, Ordering::Release);
        let _ = self.shutdown.send(true);
        let Some(supervisor) = self.supervisor.take() else {
            return Ok(());
        };
        match supervisor.await {
            Ok(r) => r,
            Err(e) => Err(CellError::TaskFailed(e)),
        }
    }
}

impl Drop for Cell {
    fn drop(&mut self) {
        // The supervisor sees the shutdown (or the dropped sender) and
        // closes the link in the background.
        self.handle.shared.closing.store(true, Ordering::Release);
        let _ = self.shutdown.send(true);
        // Readers waiting for room in the queue stop: nobody will take.
        self.handle.shared.room.close();
    }
}

impl CellHandle {
    /// This cell's public key.
    pub fn public_key(&self) -> PublicKey {
        self.shared.key.public()
    }

    /// Why the link is down, while it is down; see [`Cell::down_reason`].
    pub fn down_reason(&self) -> Option<String> {
        lock(&self.shared.link).down_reason.clone()
    }

    /// Sends `payload` to the cell `to` on `lane`.
    pub async fn send(
        &self,
        to: PublicKey,
        lane: Lane,
        payload: impl Into<Bytes>,
    ) -> Result<MessageId, CellError> {
        self.send_to(Destination::Cell(to), lane, payload).await
    }

    /// Sends `payload` to every cell attached to the mesh.
    pub async fn broadcast(
        &self,
        lane: Lane,
        payload: impl Into<Bytes>,
    ) -> Result<MessageId, CellError> {
        self.send_to(Destination::Broadcast, lane, payload).await
    }

    /// Sends `payload` to every cell that announced `service`.
    pub async fn send_to_service(
        &self,
        service: &ServiceName,
        lane: Lane,
        payload: impl Into<Bytes>,
    ) -> Result<MessageId, CellError> {
        self.send_to(Destination::Service(service.clone()), lane, payload)
            .await
    }

    /// Sends `payload` to `destination` on `lane`: what [`send`](Self::send),
    /// [`broadcast`](Self::broadcast) and
    /// [`send_to_service`](Self::send_to_service) do, for a destination
    /// chosen at run time.
    pub async fn send_to(
        &self,
        destination: Destination,
        lane: Lane,
        payload: impl Into<Bytes>,
    ) -> Result<MessageId, CellError> {
        let msg = Message::new(self.public_key(), destination, payload.into()).with_lane(lane);
        self.send_message(msg).await
    }

    /// Queues `msg` for the relay and returns its id.
    ///
    /// The source must be this cell's key (the relay closes a link that
    /// sends as anyone else). A message without an authenticator is stamped
    /// (timestamp now if it is 0, the next nonce if it is 0) and then signed
    /// or left unsigned per [`CellOptions::auth`]; a message that already
    /// carries an authenticator is sent exactly as it is. Other fields
    /// (lane, TTL, QoS, trace, kind) are kept.
    ///
    /// Waits while the lane's queue is full: own messages are never
    /// dropped. Errors if the payload is over the limit, or the cell is
    /// closed (or disconnected for good).
    pub async fn send_message(&self, mut msg: Message) -> Result<MessageId, CellError> {
        let s = &self.shared;
        self.check_sendable(msg.payload.len())?;
        if msg.source != s.key.public() {
            return Err(CellError::Invalid(format!(
                "message source {} is not this cell's key {}; the relay only forwards a \
                 cell's own messages",
                msg.source,
                s.key.public()
            )));
        }
        let mut sign = false;
        if msg.auth == Authenticator::None {
            if msg.timestamp_ms == 0 {
                msg.timestamp_ms = clock::now_ms();
            }
            if msg.nonce == 0 {
                msg.nonce = s.nonce.fetch_add(1, Ordering::Relaxed);
            }
            sign = s.opts.auth == AuthMode::Signed;
        }
        let key = &s.key;
        let msg = &msg;
        // Encoded straight into the lane, where the link writer takes it
        // from as part of a batch.
        let encode = move |buf: &mut BytesMut| {
            let start = buf.len();
            if sign {
                msg.encode_signed(key, buf);
            } else {
                msg.encode(buf);
            }
            let (auth_start, _) =
                encoded_layout(&buf[start..]).expect("a message this cell encoded");
            debug_assert!(
                Envelope::parse(&mut Bytes::copy_from_slice(&buf[start..]), &s.opts.limits).is_ok()
            );
            MessageId::of(&buf[start + 1..start + auth_start])
        };
        self.stage(msg.lane, encode).await
    }

    /// Errors if the cell is closing or `payload_len` is over the relay's
    /// limit: what every send checks first.
    fn check_sendable(&self, payload_len: usize) -> Result<(), CellError> {
        let s = &self.shared;
        if s.closing.load(Ordering::Acquire) {
            return Err(CellError::Closed);
        }
        let limit = s.max_payload.load(Ordering::Relaxed);
        if payload_len > limit {
            return Err(CellError::PayloadTooLarge {
                size: payload_len,
                limit,
            });
        }
        Ok(())
    }

    /// Stages one message on `lane` (`encode` writes it and returns its
    /// id), waiting while the lane is full; errors once the cell is closed.
    async fn stage(
        &self,
        lane: Lane,
        encode: impl FnOnce(&mut BytesMut) -> MessageId,
    ) -> Result<MessageId, CellError> {
        let s = &self.shared;
        // Room in the lane is the common case: stage without registering
        // for the room notification `stage_wait` sets up.
        match s.queues.stage(lane, encode) {
            Ok(id) => {
                s.queues.wake();
                Ok(id)
            }
            Err(encode) => s
                .queues
                .stage_wait(lane, encode)
                .await
                .map_err(|_| s.closed_error()),
        }
    }

    /// Replaces this cell's announcement; see [`Cell::announce`].
    pub async fn announce(
        &self,
        app_version: &str,
        services: Vec<ServiceName>,
    ) -> Result<(), CellError> {
        check_announcement(app_version, &services, &self.shared.opts.limits)?;
        {
            let mut a = lock(&self.shared.announced);
            a.app_version = app_version.to_owned();
            a.services = services.clone();
        }
        self.control(Frame::Announce {
            app_version: app_version.to_owned(),
            services,
        })
        .await
    }

    /// Sends `payload` to the cell `to` on `lane` as a durable message and
    /// returns its id once the relay has acknowledged it as stored (logged
    /// and synced). Until then, a lost link does not lose it: after each
    /// reconnect it is resent unchanged (same bytes, same id), and the
    /// receiver's dedup drops a repeat.
    ///
    /// Errors with [`CellError::DurableRefused`] when the relay refuses it
    /// (its log is full or failed) or reports it expired, and as
    /// [`send_message`](Self::send_message) does.
    pub async fn send_durable(
        &self,
        to: PublicKey,
        lane: Lane,
        payload: impl Into<Bytes>,
    ) -> Result<MessageId, CellError> {
        let (id, receipt) = self.start_durable(to, lane, payload).await?;
        match receipt.await {
            Ok(relay_codec::frame::DurableStatus::Acked) => Ok(id),
            Ok(status) => Err(CellError::DurableRefused { id, status }),
            Err(_) => Err(self.shared.closed_error()),
        }
    }

    /// Queues a durable message like [`send_durable`](Self::send_durable)
    /// and returns at once with its id and the receipt that resolves with
    /// the relay's answer, so that many can be in flight.
    pub async fn start_durable(
        &self,
        to: PublicKey,
        lane: Lane,
        payload: impl Into<Bytes>,
    ) -> Result<(MessageId, DurableReceipt), CellError> {
        let s = &self.shared;
        let payload = payload.into();
        self.check_sendable(payload.len())?;
        let msg = Message::new(self.public_key(), Destination::Cell(to), payload)
            .with_lane(lane)
            .with_qos(relay_codec::Qos::Durable)
            .with_timestamp(clock::now_ms())
            .with_nonce(s.nonce.fetch_add(1, Ordering::Relaxed));
        let mut buf = BytesMut::new();
        if s.opts.auth == AuthMode::Signed {
            msg.encode_signed(&s.key, &mut buf);
        } else {
            msg.encode(&mut buf);
        }
        let raw = buf.freeze();
        // The id as send_message computes it, without parsing what this
        // cell has just encoded.
        let (auth_start, _) = encoded_layout(&raw).expect("a message this cell encoded");
        let id = MessageId::of(&raw[1..auth_start]);
        debug_assert_eq!(
            Envelope::parse(&mut raw.clone(), &s.opts.limits).map(|e| e.id()),
            Ok(id)
        );
        let (tx, rx) = oneshot::channel();
        lock(&s.durable).insert(
            id,
            Outstanding {
                lane,
                raw: raw.clone(),
                waiters: vec![tx],
            },
        );
        let put = move |b: &mut BytesMut| {
            b.extend_from_slice(&raw);
            id
        };
        if let Err(e) = self.stage(lane, put).await {
            lock(&s.durable).remove(&id);
            return Err(e);
        }
        Ok((id, rx))
    }

    /// Acknowledges durable messages this cell received to the relay, so
    /// it forgets them (needed only with
    /// [`CellOptions::ack_durable_on_receive`] off; acknowledging twice is
    /// harmless). While the link is down there is nothing to do: the relay
    /// redelivers after the reconnect.
    pub async fn ack_durable(&self, ids: &[MessageId]) -> Result<(), CellError> {
        for frame in super::receive::durable_acks(ids) {
            self.control(frame).await?;
        }
        Ok(())
    }

    /// Durable messages sent and not yet acknowledged by the relay.
    pub fn durable_outstanding(&self) -> usize {
        lock(&self.shared.durable).len()
    }

    /// Starts or stops presence events; see [`Cell::watch_presence`].
    pub async fn watch_presence(&self, on: bool) -> Result<(), CellError> {
        lock(&self.shared.announced).watch = on;
        self.control(Frame::WatchPresence(on)).await
    }

    /// Sends a control frame if the link is up. While it is down the frame
    /// is not needed: the state it carries is re-sent on reconnect.
    pub(crate) async fn control(&self, frame: Frame) -> Result<(), CellError> {
        let s = &self.shared;
        if s.closing.load(Ordering::Acquire) {
            return Err(CellError::Closed);
        }
        if !s.is_up() {
            return Ok(());
        }
        s.control.send(frame).await.map_err(|_| s.closed_error())
    }

    /// Asks the relay which cells offer `service`; see [`Cell::discover`].
    pub async fn discover(
        &self,
        service: &ServiceName,
    ) -> Result<Vec<(PublicKey, String)>, CellError> {
        let s = &self.shared;
        if s.closing.load(Ordering::Acquire) {
            return Err(CellError::Closed);
        }
        if !s.is_up() {
            return Err(s.closed_error());
        }
        let request = s.next_request.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&s.pending).insert(request, tx);
        let frame = Frame::Discover {
            request,
            service: service.clone(),
        };
        let timeout = s.opts.request_timeout;
        let answer = tokio::time::timeout(timeout, async {
            s.control.send(frame).await.map_err(|_| s.closed_error())?;
            rx.await.map_err(|_| s.closed_error())
        })
        .await;
        lock(&s.pending).remove(&request);
        match answer {
            Ok(r) => r,
            Err(_) => Err(CellError::Timeout(format!(
                "the relay did not answer discover {service:?} within {timeout:?}"
            ))),
        }
    }

    /// What the relay reported as not delivered; see
    /// [`Cell::undelivered`].
    pub fn undelivered(&self) -> Undelivered {
        let t = lock(&self.shared.undelivered);
        Undelivered {
            total: t.total,
            notices: t.notices,
            by_destination: t.by.iter().map(|(&(c, k), &n)| (c, k, n)).collect(),
            complete: t.complete,
        }
    }

    /// Counters of what was received and dropped.
    pub fn stats(&self) -> CellStats {
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CellStats {
            received: get(&c.received),
            dropped_bad_signature: get(&c.dropped_bad_signature),
            dropped_duplicate: get(&c.dropped_duplicate),
            dropped_unsupported: get(&c.dropped_unsupported),
            dropped_events: get(&c.dropped_events),
            reconnects: get(&c.reconnects),
        }
    }
}
