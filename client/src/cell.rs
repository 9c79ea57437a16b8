//! The cell side of a link: what an application links to use a relay as its
//! hop.
//!
//! A [`Cell`] holds one link to one relay (see docs/ARCHITECTURE.md, "Identity and
//! links"), over QUIC or TLS over TCP ([`CellOptions::transport`]): a
//! control channel carries control frames both ways (Hello/Welcome,
//! Announce, Discover, presence, notices, Close), and each side sends its
//! messages in batch frames on its lanes (QUIC: a unidirectional stream per
//! lane; TCP: chunks interleaved on the one connection).
//!
//! What the cell checks ("What is checked where"): the relay proved its key
//! during the TLS handshake (pinned from [`NodeAddr::key`]); every received
//! message that carries an ed25519 signature is verified before the
//! application sees it, duplicates are dropped, and messages the cell cannot
//! check yet (sealed with an AEAD tag) are dropped and counted. Unsigned
//! messages are delivered marked [`ReceivedAuth::Link`]: the relay vouched
//! for their source.
//!
//! Received messages reach the application one batch frame at a time: a
//! lane's reader decodes a batch, checks it, and hands over what passed in
//! one queue operation; [`Cell::next_event`] and [`Cell::recv`] then pop
//! from the batch, and [`Cell::recv_many`] takes many at once.
//!
//! Backpressure: sending waits while the lane's queue is full (own messages
//! are never dropped); receiving waits while [`CellOptions::event_queue`]
//! messages wait for the application, which slows this cell's own link only
//! (the relay drops or stores for it).
//!
//! Many cells can share one QUIC endpoint (one UDP socket): see
//! [`CellOptions::endpoint`].

use bytes::{Bytes, BytesMut};
use quinn::ConnectionError;
use relay_codec::frame::{CloseCode, MAX_AGENT, NoticeCode, PresenceInfo, Role};
use relay_codec::id_table::{IdKey, IdTable};
use relay_codec::message::{SIGNATURE_LEN, encoded_layout};
use relay_codec::{
    Authenticator, Destination, Envelope, Frame, KeyError, Keypair, Kind, Lane, Limits, Message,
    MessageId, NodeAddr, PublicKey, ServiceName,
};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use thiserror::Error;
use tokio::sync::{Notify, OwnedMutexGuard, Semaphore, mpsc, oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use relay_link::lanes::LANES;
use relay_link::quic::{self, TransportTuning};
use relay_link::tcp::{self, HandshakeError, TcpLink, TcpTuning};
use relay_link::{
    BatchReader, ControlSender, FrameReceiver, LaneQueues, Link, LinkEnd, LinkError, NoObserver,
    Transport, TransportError, WriterConfig, tls,
};

/// Signed messages in one batch above which verification leaves the async
/// worker for the blocking pool (about 25 µs each).
const VERIFY_INLINE_MAX: usize = 32;
/// Control frames waiting to be written to the relay.
const CONTROL_QUEUE: usize = 256;
/// How long [`Cell::close`] waits for the relay to take its Close frame,
/// and then for the endpoint to go idle.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// How long `close` waits for the relay to read what was sent and answer
/// with its Close.
const DRAIN_GRACE: Duration = Duration::from_secs(6);
/// Destinations [`Undelivered`] keeps apart; drops to further ones are
/// counted under the zero key.
pub const MAX_UNDELIVERED_DESTINATIONS: usize = 64;

/// How this cell authenticates the messages it sends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AuthMode {
    /// Each message carries an ed25519 signature by this cell's key, which
    /// every receiver checks end to end (about 25 µs per message to sign and
    /// as much to verify).
    #[default]
    Signed,
    /// No signature: receivers trust the relay, which proved this cell's key
    /// when the link was set up and only forwards messages whose source is
    /// the link's key.
    Link,
}

/// How a [`Cell`] links to its relay. `CellOptions::default()` just works.
#[derive(Clone, Debug)]
pub struct CellOptions {
    /// Software name and version sent in Hello, for the relay's logs (at
    /// most 64 bytes).
    pub agent: String,
    /// Application version announced to the relay (at most 64 bytes; empty:
    /// none).
    pub app_version: String,
    /// Services this cell offers, announced when it attaches; other cells
    /// find it with [`Cell::discover`] and reach it with
    /// [`Cell::send_to_service`].
    pub services: Vec<ServiceName>,
    /// Whether the relay should send [`Event::Notice`]s about this cell's
    /// messages it drops (not attached, slow receiver, expired, ...); they
    /// are also summed in [`Cell::undelivered`].
    pub notices: bool,
    /// How sent messages are authenticated.
    pub auth: AuthMode,
    /// How to reach the relay: QUIC over UDP (the default) or TLS 1.3 over
    /// TCP, at the relay's host and port. A relay serves both on one port
    /// number by default (`node.listen_tcp` in its config).
    pub transport: Transport,
    /// Bound on reaching the relay: name resolution, the QUIC or TCP and
    /// TLS handshake, and separately the Hello/Welcome exchange.
    pub connect_timeout: Duration,
    /// Whether to reconnect (with backoff) after the link is lost. The first
    /// connection is never retried: [`Cell::connect`] returns its error.
    pub reconnect: bool,
    /// First delay before reconnecting; doubled after each failed attempt.
    pub backoff_initial: Duration,
    /// Longest delay between reconnect attempts.
    pub backoff_max: Duration,
    /// Outbound messages queued per lane before sending waits.
    pub queue_depth: usize,
    /// Received messages held for the application before the link stops
    /// reading from the relay (at least 1), not counting the rest of the
    /// batch being handed out. Messages are queued a batch frame at a time:
    /// a batch waits until there is room for all of it, and a batch larger
    /// than the whole bound waits for an empty queue and then goes in alone.
    /// Presence, notice and link events share the queue, which holds at
    /// most this many batches and events: one that finds it full is
    /// dropped and counted ([`CellStats::dropped_events`]).
    pub event_queue: usize,
    /// Message ids remembered per lane to drop duplicates (a message's lane
    /// is part of its authenticated bytes, so its copies all come on one
    /// lane). The ids are kept in two generations of `dedup_capacity / 2`:
    /// when the newer one fills, the older one is forgotten. So at least
    /// the last `dedup_capacity / 2` ids of each lane and at most
    /// `dedup_capacity` are remembered, and memory grows as ids arrive
    /// (nothing is allocated up front; at most about 34 bytes per id).
    pub dedup_capacity: usize,
    /// A QUIC endpoint (UDP socket) to connect through, shared with other
    /// cells: 10 000 cells can use one. `None`: this cell binds its own
    /// (one per address family), and closes it on [`Cell::close`]. A shared
    /// endpoint is never closed by a cell: `close` closes only this cell's
    /// connection; let the endpoint go idle
    /// ([`quinn::Endpoint::wait_idle`]) before dropping it, so the last
    /// closes reach their relays. Make one with
    /// [`quic::client_endpoint`]. Used only over QUIC.
    pub endpoint: Option<quinn::Endpoint>,
    /// How long [`Cell::discover`] waits for the relay's answer.
    pub request_timeout: Duration,
    /// QUIC windows, keep-alive and idle timeout.
    pub tuning: TransportTuning,
    /// TCP socket, chunking and buffer settings, over TCP (its
    /// `handshake_timeout` is replaced by [`connect_timeout`](Self::connect_timeout)).
    pub tcp: TcpTuning,
    /// Bounds on what this cell sends and accepts.
    pub limits: Limits,
    /// How outbound messages are batched.
    pub writer: WriterConfig,
}

impl Default for CellOptions {
    /// Signed messages, notices on, QUIC, reconnect on with 100 ms to 5 s
    /// backoff, a 5 s connect timeout, 4096 messages per lane, 65 536
    /// queued events and remembered ids, an endpoint of its own, default
    /// tuning, limits and batching.
    fn default() -> Self {
        Self {
            agent: format!("relay-client/{}", env!("CARGO_PKG_VERSION")),
            app_version: String::new(),
            services: Vec::new(),
            notices: true,
            auth: AuthMode::Signed,
            transport: Transport::Quic,
            connect_timeout: Duration::from_secs(5),
            reconnect: true,
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            queue_depth: 4096,
            event_queue: 65_536,
            dedup_capacity: 65_536,
            endpoint: None,
            request_timeout: Duration::from_secs(5),
            tuning: TransportTuning::default(),
            tcp: TcpTuning::default(),
            limits: Limits::default(),
            writer: WriterConfig::default(),
        }
    }
}

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
struct Tally {
    by: BTreeMap<(NoticeCode, PublicKey), u64>,
    total: u64,
    notices: u64,
    complete: bool,
}

impl Tally {
    fn add(&mut self, code: NoticeCode, subject: PublicKey, count: u32) {
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

/// Why a cell operation failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum CellError {
    /// A local I/O failure.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The relay's host name did not resolve.
    #[error("cannot resolve relay host {host:?}: {reason}; check HOST in KEY@HOST:PORT")]
    Resolve {
        /// The host.
        host: String,
        /// What the resolver said.
        reason: String,
    },
    /// The QUIC endpoint or TLS configuration could not be built.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The QUIC or TCP connection to the relay could not be set up.
    #[error("could not connect to the relay at {addr}: {reason}")]
    Connect {
        /// The relay's address.
        addr: SocketAddr,
        /// What failed, with a hint.
        reason: String,
    },
    /// The link protocol failed.
    #[error("link to the relay failed: {0}")]
    Link(LinkError),
    /// The relay refused the link, saying why.
    #[error("the relay refused the link ({code:?}): {reason}")]
    Refused {
        /// The relay's code.
        code: CloseCode,
        /// The relay's words.
        reason: String,
    },
    /// A step took longer than allowed.
    #[error("{0}")]
    Timeout(String),
    /// A payload is over the limit in force (this cell's, or the relay's
    /// from its Welcome, whichever is lower).
    #[error(
        "payload is {size} bytes, over the limit of {limit}; split it into smaller messages \
         (or raise max_payload on the relay and in CellOptions::limits)"
    )]
    PayloadTooLarge {
        /// The payload's length.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// An argument is not acceptable.
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// The cell was closed.
    #[error("the cell is closed")]
    Closed,
    /// The link is down (reconnecting, or for good without
    /// [`CellOptions::reconnect`]).
    #[error("the link to the relay is down: {0}")]
    Disconnected(String),
    /// On close, messages were still queued and could not be sent.
    #[error("{count} queued message(s) were not sent: {reason}")]
    Unsent {
        /// How many.
        count: usize,
        /// Why.
        reason: String,
    },
    /// A key or address is not valid.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The task that runs the cell's link panicked or was cancelled (a
    /// bug: please report it with the log).
    #[error("the cell's link task failed: {0}")]
    TaskFailed(tokio::task::JoinError),
}

impl From<LinkError> for CellError {
    fn from(e: LinkError) -> Self {
        match e {
            LinkError::Refused { code, reason } => CellError::Refused { code, reason },
            e => CellError::Link(e),
        }
    }
}

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
type Discovered = Vec<(PublicKey, String)>;

/// What the link tasks hand to the application, in order.
enum Delivery {
    /// Presence, a notice, or the link going down or coming back.
    Event(Event),
    /// The messages of one batch frame that passed the checks, in order;
    /// never empty. It holds [`Shared::permits`] of the message queue's
    /// permits, given back when the application takes it off the queue.
    Batch(Vec<Received>),
}

/// State shared by the handles and the link tasks.
struct Shared {
    key: Keypair,
    relay: NodeAddr,
    opts: CellOptions,
    /// Outbound lanes; they outlive each connection, so queued messages
    /// survive a reconnect.
    queues: Arc<LaneQueues>,
    nonce: AtomicU64,
    counters: Counters,
    control: mpsc::Sender<Frame>,
    pending: Mutex<HashMap<u32, oneshot::Sender<Discovered>>>,
    next_request: AtomicU32,
    announced: Mutex<Announced>,
    /// Recently seen ids, per lane. The reader of a lane holds its lock
    /// for as long as it reads, so checking takes no lock per message or
    /// batch; a reader on a new connection waits for the old one to finish.
    dedup: [Arc<tokio::sync::Mutex<Dedup>>; LANES],
    /// Room in the application's message queue, one permit per message.
    room: Semaphore,
    /// Permits `room` started with: [`CellOptions::event_queue`].
    room_max: usize,
    /// Largest payload accepted: ours, lowered to the relay's from Welcome.
    max_payload: AtomicUsize,
    link: Mutex<LinkState>,
    /// Set by close (or drop): no more sends.
    closing: AtomicBool,
    /// What the relay reported as not delivered.
    undelivered: Mutex<Tally>,
}

#[derive(Default)]
struct Counters {
    received: AtomicU64,
    dropped_bad_signature: AtomicU64,
    dropped_duplicate: AtomicU64,
    dropped_unsupported: AtomicU64,
    dropped_events: AtomicU64,
    reconnects: AtomicU64,
}

/// What the relay should know about this cell, re-sent on reconnect.
struct Announced {
    app_version: String,
    services: Vec<ServiceName>,
    watch: bool,
}

#[derive(Default)]
struct LinkState {
    up: bool,
    /// Why the link went down, while it is down.
    down_reason: Option<String>,
}

/// Per-connection state the control reader fills in.
#[derive(Default)]
struct ConnState {
    /// The relay's Close frame, if it sent one.
    close: Mutex<Option<(CloseCode, String)>>,
    /// Signalled when the relay sent Close or ended its control stream.
    peer_done: Notify,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these small locks leaves consistent
    // data (each critical section is one map/cache operation).
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Milliseconds since the Unix epoch by this machine's clock.
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn random_u64() -> u64 {
    getrandom::u64().unwrap_or_else(|_| {
        // No OS randomness: the clock is a poor but usable fallback for a
        // nonce start or a jitter.
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
    })
}

impl Shared {
    fn emit(&self, events: &mpsc::Sender<Delivery>, event: Event) {
        if let Err(mpsc::error::TrySendError::Full(_)) = events.try_send(Delivery::Event(event)) {
            self.counters.dropped_events.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Permits of the message queue a batch of `n` messages holds: all of
    /// the queue at most, so an oversized batch still gets in.
    fn permits(&self, n: usize) -> usize {
        n.min(self.room_max)
    }

    /// The application took a batch of `n` messages off the queue.
    fn release(&self, n: usize) {
        self.room.add_permits(self.permits(n));
    }

    fn is_up(&self) -> bool {
        lock(&self.link).up
    }

    fn set_up(&self) {
        let mut l = lock(&self.link);
        l.up = true;
        l.down_reason = None;
    }

    fn set_down(&self, reason: &str) {
        let mut l = lock(&self.link);
        l.up = false;
        l.down_reason = Some(reason.to_owned());
    }

    /// The error for a send the queues refused.
    fn closed_error(&self) -> CellError {
        if self.closing.load(Ordering::Acquire) {
            return CellError::Closed;
        }
        match &lock(&self.link).down_reason {
            Some(r) => CellError::Disconnected(r.clone()),
            None => CellError::Closed,
        }
    }

    fn announce_frame(&self) -> Option<Frame> {
        let a = lock(&self.announced);
        (!a.app_version.is_empty() || !a.services.is_empty()).then(|| Frame::Announce {
            app_version: a.app_version.clone(),
            services: a.services.clone(),
        })
    }

    fn fail_pending(&self) {
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
                Arc::new(tokio::sync::Mutex::new(Dedup::new(dedup_capacity)))
            }),
            room: Semaphore::new(room_max),
            room_max,
            max_payload: AtomicUsize::new(limits.max_payload),
            link: Mutex::new(LinkState::default()),
            closing: AtomicBool::new(false),
            undelivered: Mutex::new(Tally::default()),
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

    /// Sends a message built by the caller; see [`CellHandle::send_message`].
    pub async fn send_message(&self, msg: Message) -> Result<MessageId, CellError> {
        self.handle.send_message(msg).await
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
    fn take(&mut self, batch: Vec<Received>) {
        self.handle.shared.release(batch.len());
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
        self.send_to(Destination::Cell(to), lane, payload.into())
            .await
    }

    /// Sends `payload` to every cell attached to the mesh.
    pub async fn broadcast(
        &self,
        lane: Lane,
        payload: impl Into<Bytes>,
    ) -> Result<MessageId, CellError> {
        self.send_to(Destination::Broadcast, lane, payload.into())
            .await
    }

    /// Sends `payload` to every cell that announced `service`.
    pub async fn send_to_service(
        &self,
        service: &ServiceName,
        lane: Lane,
        payload: impl Into<Bytes>,
    ) -> Result<MessageId, CellError> {
        self.send_to(Destination::Service(service.clone()), lane, payload.into())
            .await
    }

    async fn send_to(
        &self,
        destination: Destination,
        lane: Lane,
        payload: Bytes,
    ) -> Result<MessageId, CellError> {
        let msg = Message::new(self.public_key(), destination, payload).with_lane(lane);
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
        if s.closing.load(Ordering::Acquire) {
            return Err(CellError::Closed);
        }
        if msg.source != s.key.public() {
            return Err(CellError::Invalid(format!(
                "message source {} is not this cell's key {}; the relay only forwards a \
                 cell's own messages",
                msg.source,
                s.key.public()
            )));
        }
        let limit = s.max_payload.load(Ordering::Relaxed);
        if msg.payload.len() > limit {
            return Err(CellError::PayloadTooLarge {
                size: msg.payload.len(),
                limit,
            });
        }
        let mut sign = false;
        if msg.auth == Authenticator::None {
            if msg.timestamp_ms == 0 {
                msg.timestamp_ms = now_ms();
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
        // Room in the lane is the common case: stage without registering
        // for the room notification `stage_wait` sets up.
        let id = match s.queues.stage(msg.lane, encode) {
            Ok(id) => {
                s.queues.wake();
                id
            }
            Err(encode) => s
                .queues
                .stage_wait(msg.lane, encode)
                .await
                .map_err(|_| s.closed_error())?,
        };
        Ok(id)
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

    /// Starts or stops presence events; see [`Cell::watch_presence`].
    pub async fn watch_presence(&self, on: bool) -> Result<(), CellError> {
        lock(&self.shared.announced).watch = on;
        self.control(Frame::WatchPresence(on)).await
    }

    /// Sends a control frame if the link is up. While it is down the frame
    /// is not needed: the state it carries is re-sent on reconnect.
    async fn control(&self, frame: Frame) -> Result<(), CellError> {
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

fn validate(opts: &CellOptions) -> Result<(), CellError> {
    if opts.agent.len() > MAX_AGENT {
        return Err(CellError::Invalid(format!(
            "agent is {} bytes; at most {MAX_AGENT}",
            opts.agent.len()
        )));
    }
    check_announcement(&opts.app_version, &opts.services, &opts.limits)?;
    if opts.connect_timeout.is_zero() {
        return Err(CellError::Invalid(
            "connect_timeout must be above zero".into(),
        ));
    }
    if opts.backoff_initial.is_zero() || opts.backoff_max < opts.backoff_initial {
        return Err(CellError::Invalid(
            "backoff_initial must be above zero and at most backoff_max".into(),
        ));
    }
    Ok(())
}

fn check_announcement(
    app_version: &str,
    services: &[ServiceName],
    limits: &Limits,
) -> Result<(), CellError> {
    if app_version.len() > MAX_AGENT {
        return Err(CellError::Invalid(format!(
            "app_version is {} bytes; at most {MAX_AGENT}",
            app_version.len()
        )));
    }
    if services.len() > limits.max_services {
        return Err(CellError::Invalid(format!(
            "{} services announced; at most {}",
            services.len(),
            limits.max_services
        )));
    }
    Ok(())
}

/// Client endpoints, one per address family, reused across reconnects; or
/// the endpoint shared with other cells ([`CellOptions::endpoint`]). Over
/// TCP there are none: each link is a connection of its own.
struct Dialer {
    shared: Option<quinn::Endpoint>,
    v4: Option<quinn::Endpoint>,
    v6: Option<quinn::Endpoint>,
    /// The last link that completed its transport handshake: whether it
    /// was this cell that closed it decides what `close` waits for.
    last: Option<Link>,
}

impl Dialer {
    fn new(shared: Option<quinn::Endpoint>) -> Self {
        Self {
            shared,
            v4: None,
            v6: None,
            last: None,
        }
    }

    fn endpoint_for(&mut self, addr: SocketAddr) -> Result<quinn::Endpoint, CellError> {
        if let Some(ep) = &self.shared {
            return Ok(ep.clone());
        }
        let (slot, bind): (_, SocketAddr) = if addr.is_ipv4() {
            (&mut self.v4, (std::net::Ipv4Addr::UNSPECIFIED, 0).into())
        } else {
            (&mut self.v6, (std::net::Ipv6Addr::UNSPECIFIED, 0).into())
        };
        if let Some(ep) = slot {
            return Ok(ep.clone());
        }
        let ep = quic::client_endpoint(bind)?;
        *slot = Some(ep.clone());
        Ok(ep)
    }

    /// Closes the endpoints this cell owns. If this cell closed its last
    /// link itself, it waits (bounded) until the close has left (QUIC: the
    /// endpoints are idle; TCP: the Close frame and `close_notify` are
    /// written), so the close reaches the relay. If the relay closed it
    /// first (as it does on a Close frame) or no link was made, nothing of
    /// this cell's is in flight: waiting would only sit out QUIC's draining
    /// period or an abandoned dial, so it returns at once. A shared
    /// endpoint is left alone: it carries other cells, and sends this
    /// cell's close on its own.
    async fn close(&mut self) {
        self.shared = None;
        let last = self.last.take();
        let ours = last
            .as_ref()
            .is_some_and(|l| matches!(l.end(), None | Some(LinkEnd::Local)));
        if ours && let Some(link) = &last {
            let _ = tokio::time::timeout(CLOSE_GRACE, link.close_sent()).await;
        }
        for ep in [self.v4.take(), self.v6.take()].into_iter().flatten() {
            if ours {
                let _ = tokio::time::timeout(CLOSE_GRACE, ep.wait_idle()).await;
            }
        }
    }
}

/// A link that passed the handshake.
struct Established {
    link: Link,
    control: ControlSender,
    reader: FrameReceiver,
    /// The writer's batch size, fitted to the relay's largest frame.
    batch_bytes: usize,
}

/// How to open a transport connection to the relay, built once per dial.
enum DialConfig {
    Quic(quinn::ClientConfig),
    Tcp(Arc<rustls::ClientConfig>),
}

/// Bytes a message adds beyond its payload at most (header, longest
/// destination, signature), plus a batch frame's own header.
const MESSAGE_OVERHEAD: usize =
    relay_codec::message::HEADER_LEN + relay_codec::message::MAX_SERVICE_NAME + SIGNATURE_LEN + 16;

/// The largest payload to send and the batch size to write with, given our
/// limits and the relay's (from Welcome): every frame the writer makes fits
/// the relay's `max_frame` (a batch closes at the first message that takes
/// it past `batch_bytes`, so it can hold `batch_bytes` plus one message).
fn sizes(
    our_payload: usize,
    our_batch: usize,
    relay_payload: usize,
    relay_frame: usize,
) -> (usize, usize) {
    let room = relay_frame.saturating_sub(MESSAGE_OVERHEAD);
    let payload = our_payload.min(relay_payload).min(room.saturating_sub(1));
    let batch = our_batch.min(room - payload).max(1);
    (payload, batch)
}

/// Resolves the relay and connects to the first address that answers,
/// giving each address an equal share of the connect timeout.
async fn dial(shared: &Shared, dialer: &mut Dialer) -> Result<Established, CellError> {
    let opts = &shared.opts;
    let relay = &shared.relay;
    let target = relay.host_port();
    let deadline = Instant::now() + opts.connect_timeout;
    let addrs: Vec<SocketAddr> =
        tokio::time::timeout_at(deadline, tokio::net::lookup_host(&target))
            .await
            .map_err(|_| {
                CellError::Timeout(format!(
                    "resolving relay host {:?} took longer than {:?}",
                    relay.host, opts.connect_timeout
                ))
            })?
            .map_err(|e| CellError::Resolve {
                host: relay.host.clone(),
                reason: e.to_string(),
            })?
            .collect();
    if addrs.is_empty() {
        return Err(CellError::Resolve {
            host: relay.host.clone(),
            reason: "no addresses".into(),
        });
    }
    let key = shared.key.signing_key();
    let cfg = match opts.transport {
        Transport::Quic => DialConfig::Quic(quic::client_config(key, relay.key.0, &opts.tuning)?),
        Transport::Tcp => DialConfig::Tcp(Arc::new(tls::tls_client_config(
            key,
            relay.key.0,
            tls::ALPN,
        )?)),
    };
    let mut last = None;
    for (i, &addr) in addrs.iter().enumerate() {
        let left = deadline.saturating_duration_since(Instant::now());
        let share = left / (addrs.len() - i) as u32;
        match attempt(shared, dialer, &cfg, addr, share).await {
            Ok(e) => return Ok(e),
            // Another address may answer; anything else is the relay's word.
            Err(e @ (CellError::Timeout(_) | CellError::Connect { .. })) => {
                tracing::debug!(%addr, error = %e, "relay address failed");
                last = Some(e);
            }
            Err(e) => return Err(e),
        }
    }
    Err(last.expect("at least one address was tried"))
}

/// The hint after a handshake the relay's key or protocol failed.
const KEY_HINT: &str = "; check that the KEY in KEY@HOST:PORT is the relay's public key and that \
                        it is a Celluler relay";

/// Opens a QUIC connection or a TLS-over-TCP connection to `addr`, within
/// `timeout`.
async fn open_link(
    shared: &Shared,
    dialer: &mut Dialer,
    cfg: &DialConfig,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<Link, CellError> {
    let opts = &shared.opts;
    let unreachable = |proto: &str| {
        CellError::Timeout(format!(
            "could not reach the relay at {addr} within {:.1}s; check that it runs there \
             and that {proto} port {} is reachable",
            opts.connect_timeout.as_secs_f64(),
            addr.port()
        ))
    };
    match cfg {
        DialConfig::Quic(cfg) => {
            let ep = dialer.endpoint_for(addr)?;
            let connecting = ep
                .connect_with(cfg.clone(), addr, tls::SERVER_NAME)
                .map_err(|e| CellError::Connect {
                    addr,
                    reason: e.to_string(),
                })?;
            match tokio::time::timeout(timeout, connecting).await {
                Err(_) => Err(unreachable("UDP")),
                Ok(Err(e)) => Err(handshake_error(addr, e)),
                Ok(Ok(c)) => Ok(Link::quic(c, opts.limits)),
            }
        }
        DialConfig::Tcp(tls) => {
            let tuning = TcpTuning {
                handshake_timeout: timeout,
                ..opts.tcp.clone()
            };
            match tcp::connect(addr, tls.clone(), &tuning).await {
                Ok(c) => Ok(Link::Tcp(TcpLink::new(c, opts.limits, &opts.tcp))),
                Err(HandshakeError::Timeout(_)) => Err(unreachable("TCP")),
                Err(e @ HandshakeError::Tls(_)) => Err(CellError::Connect {
                    addr,
                    reason: format!("{e}{KEY_HINT}"),
                }),
                Err(HandshakeError::Connect { source, .. }) => Err(CellError::Connect {
                    addr,
                    reason: format!("TCP connect failed: {source}"),
                }),
                Err(e) => Err(CellError::Connect {
                    addr,
                    reason: e.to_string(),
                }),
            }
        }
    }
}

async fn attempt(
    shared: &Shared,
    dialer: &mut Dialer,
    cfg: &DialConfig,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<Established, CellError> {
    let opts = &shared.opts;
    let link = open_link(shared, dialer, cfg, addr, timeout).await?;
    dialer.last = Some(link.clone());
    let hello = relay_link::hello(
        &link,
        Role::Cell,
        opts.notices,
        &opts.agent,
        opts.connect_timeout,
    )
    .await;
    let (mut control, reader, welcome) = match hello {
        Ok(v) => v,
        Err(LinkError::Timeout(_)) => {
            link.close(CloseCode::Normal, "no Welcome");
            return Err(CellError::Timeout(format!(
                "the relay at {addr} accepted the connection but did not answer Hello within {:?}",
                opts.connect_timeout
            )));
        }
        // Closed with the Version code already.
        Err(e @ LinkError::Version { .. }) => return Err(e.into()),
        Err(e) => {
            link.close(CloseCode::Normal, "handshake failed");
            return Err(e.into());
        }
    };
    let (max_payload, batch_bytes) = sizes(
        opts.limits.max_payload,
        opts.writer.batch_bytes,
        welcome.max_payload as usize,
        welcome.max_frame as usize,
    );
    shared.max_payload.store(max_payload, Ordering::Relaxed);
    let skew = welcome.time_ms as i64 - now_ms() as i64;
    if skew.abs() > 10_000 {
        tracing::warn!(
            skew_ms = skew,
            "this machine's clock differs from the relay's by {:.1}s; the relay refuses \
             messages outside its timestamp window (by default 300s past, 30s future); \
             check NTP",
            skew as f64 / 1000.0
        );
    }
    // Announce and watch before returning, so a connect that returned is
    // visible to discovery as early as possible.
    let mut frames: Vec<Frame> = shared.announce_frame().into_iter().collect();
    if lock(&shared.announced).watch {
        frames.push(Frame::WatchPresence(true));
    }
    for f in &frames {
        if let Err(e) = control.send(f).await {
            link.close(CloseCode::Normal, "announce failed");
            return Err(e.into());
        }
    }
    tracing::debug!(%addr, relay = %shared.relay.key.short(), transport = %link.transport(), "linked to relay");
    shared.set_up();
    Ok(Established {
        link,
        control,
        reader,
        batch_bytes,
    })
}

/// Closes `link` as [`CloseCode::Normal`] unless it is closed already: a
/// second close sends nothing but would record the close as this cell's
/// ([`LinkEnd::Local`]), and `Dialer::close` reads that to decide whether
/// a close of ours is still in flight.
fn close_if_open(link: &Link, reason: &str) {
    if link.end().is_none() {
        link.close(CloseCode::Normal, reason);
    }
}

fn handshake_error(addr: SocketAddr, e: ConnectionError) -> CellError {
    let hint = match &e {
        ConnectionError::TransportError(_) | ConnectionError::ConnectionClosed(_) => KEY_HINT,
        _ => "",
    };
    if let ConnectionError::ApplicationClosed(c) = &e {
        return CellError::Refused {
            code: CloseCode::from_u16(u16::try_from(c.error_code.into_inner()).unwrap_or(u16::MAX)),
            reason: String::from_utf8_lossy(&c.reason).into_owned(),
        };
    }
    CellError::Connect {
        addr,
        reason: format!("{e}{hint}"),
    }
}

/// How a connection's life ended.
enum End {
    /// The cell closed; the result of flushing.
    Shutdown(Result<(), CellError>),
    /// The link was lost, for this reason.
    Lost(String),
}

async fn supervise(
    shared: Arc<Shared>,
    mut dialer: Dialer,
    first: Established,
    mut control_rx: mpsc::Receiver<Frame>,
    mut shutdown: watch::Receiver<bool>,
    events: mpsc::Sender<Delivery>,
) -> Result<(), CellError> {
    let mut established = first;
    let result = loop {
        match serve(
            &shared,
            established,
            &mut control_rx,
            &mut shutdown,
            &events,
        )
        .await
        {
            End::Shutdown(r) => break r,
            End::Lost(reason) => {
                shared.set_down(&reason);
                shared.fail_pending();
                tracing::warn!(relay = %shared.relay, "link to the relay lost: {reason}");
                shared.emit(
                    &events,
                    Event::Disconnected {
                        reason: reason.clone(),
                    },
                );
                if !shared.opts.reconnect {
                    shared.queues.close();
                    break unsent(&shared, &reason);
                }
                match reconnect(&shared, &mut dialer, &mut control_rx, &mut shutdown).await {
                    Some(e) => established = e,
                    None => {
                        shared.queues.close();
                        break unsent(&shared, &reason);
                    }
                }
                shared.counters.reconnects.fetch_add(1, Ordering::Relaxed);
                tracing::info!(relay = %shared.relay, "link to the relay re-established");
                shared.emit(&events, Event::Reconnected);
            }
        }
    };
    dialer.close().await;
    result
}

/// Completes once the cell is closing (or dropped). The guard `wait_for`
/// returns is released at once: it must not be held across an await.
async fn stopping(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

fn unsent(shared: &Shared, reason: &str) -> Result<(), CellError> {
    match shared.queues.len() {
        0 => Ok(()),
        count => Err(CellError::Unsent {
            count,
            reason: format!("the link to the relay was down ({reason})"),
        }),
    }
}

/// Redials with exponential backoff and jitter until it works or the cell
/// is closed (`None`).
async fn reconnect(
    shared: &Shared,
    dialer: &mut Dialer,
    control_rx: &mut mpsc::Receiver<Frame>,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<Established> {
    let opts = &shared.opts;
    let mut delay = opts.backoff_initial;
    loop {
        // Equal jitter: between half the delay and the whole of it, so
        // cells cut off together do not all come back at once.
        let half = delay / 2;
        let jitter = half.mul_f64((random_u64() % 1_000_001) as f64 / 1_000_000.0);
        let sleep = tokio::time::sleep(half + jitter);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = &mut sleep => break,
                _ = stopping(shutdown) => return None,
                // Control frames raced with the link going down; the state
                // they carry is re-sent on reconnect.
                Some(_) = control_rx.recv() => {}
            }
        }
        let dialed = tokio::select! {
            r = dial(shared, dialer) => r,
            _ = stopping(shutdown) => return None,
        };
        match dialed {
            Ok(e) => return Some(e),
            Err(e) => tracing::warn!(
                relay = %shared.relay,
                retry_in = ?(delay * 2).min(opts.backoff_max),
                "reconnecting failed: {e}"
            ),
        }
        delay = (delay * 2).min(opts.backoff_max);
    }
}

/// Runs one connection until it is lost or the cell closes.
async fn serve(
    shared: &Arc<Shared>,
    established: Established,
    control_rx: &mut mpsc::Receiver<Frame>,
    shutdown: &mut watch::Receiver<bool>,
    events: &mpsc::Sender<Delivery>,
) -> End {
    let Established {
        link,
        mut control,
        reader,
        batch_bytes,
    } = established;
    let state = Arc::new(ConnState::default());
    let writer_cfg = WriterConfig {
        batch_bytes,
        ..shared.opts.writer.clone()
    };
    let mut writer = tokio::spawn(relay_link::run_writer(
        link.lane_sender(),
        shared.queues.clone(),
        writer_cfg.clone(),
        NoObserver,
    ));
    tokio::spawn(read_control(
        link.clone(),
        reader,
        shared.clone(),
        events.clone(),
        state.clone(),
    ));
    tokio::spawn(accept_data(link.clone(), shared.clone(), events.clone()));
    shared.set_up();
    let end = loop {
        tokio::select! {
            _ = stopping(shutdown) => {
                let r = graceful_close(shared, &link, &mut control, &mut writer, &writer_cfg, &state).await;
                break End::Shutdown(r);
            }
            e = link.closed() => break End::Lost(describe_close(&e, &state)),
            frame = control_rx.recv() => {
                // The sender lives in `shared`, so the channel never ends here.
                let Some(frame) = frame else { continue };
                if let Err(e) = control.send(&frame).await {
                    let reason = link
                        .end()
                        .map(|e| describe_close(&e, &state))
                        .unwrap_or_else(|| format!("writing to the control stream failed: {e}"));
                    close_if_open(&link, "control stream failed");
                    break End::Lost(reason);
                }
            }
            r = &mut writer => {
                let reason = match r {
                    Ok(Ok(())) => "the writer stopped".to_owned(),
                    Ok(Err(e)) => link
                        .end()
                        .map(|e| describe_close(&e, &state))
                        .unwrap_or_else(|| format!("sending failed: {e}")),
                    Err(e) => format!("the writer failed: {e}"),
                };
                close_if_open(&link, "data stream failed");
                break End::Lost(reason);
            }
        }
    };
    // A writer left on a dead connection would take messages off the
    // queues and lose them; the next connection gets a new one.
    writer.abort();
    end
}

/// Flushes the queues, tells the relay with a Close frame, lets it close
/// first (bounded), then closes.
async fn graceful_close(
    shared: &Shared,
    link: &Link,
    control: &mut ControlSender,
    writer: &mut JoinHandle<Result<(), LinkError>>,
    writer_cfg: &WriterConfig,
    state: &ConnState,
) -> Result<(), CellError> {
    shared.queues.close();
    // Sending what is queued, then run_writer's wait (up to drain_timeout)
    // for the lanes to be delivered.
    let bound = writer_cfg.drain_timeout * LANES as u32 + Duration::from_secs(1);
    let flushed = match tokio::time::timeout(bound, &mut *writer).await {
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(Ok(Err(e))) => Err(format!("sending failed: {e}")),
        Ok(Err(e)) => Err(format!("the writer failed: {e}")),
        Err(_) => Err(format!("flushing took longer than {bound:?}")),
    };
    writer.abort();
    let result = match (flushed, shared.queues.len()) {
        (Ok(()), 0) => Ok(()),
        (Ok(()), count) => Err(CellError::Unsent {
            count,
            reason: "the writer ended early".into(),
        }),
        (Err(reason), count) => Err(CellError::Unsent { count, reason }),
    };
    let close = Frame::Close {
        code: CloseCode::Normal,
        reason: "cell closing".into(),
    };
    let _ = tokio::time::timeout(Duration::from_millis(500), control.send(&close)).await;
    control.finish();
    // The relay answers Close by reading our data streams to their end,
    // then sends its last notices and its own Close on the control stream
    // and waits for us to close the connection: closing first could discard
    // data it has acknowledged but not yet read, and waiting for its Close
    // means every notice has been read. Bounded, in case it never answers.
    let _ = tokio::time::timeout(DRAIN_GRACE, async {
        tokio::select! {
            _ = link.closed() => {}
            _ = state.peer_done.notified() => {}
        }
    })
    .await;
    let answered = matches!(*lock(&state.close), Some((CloseCode::Normal, _)));
    if answered && shared.counters.reconnects.load(Ordering::Relaxed) == 0 {
        lock(&shared.undelivered).complete = true;
    }
    close_if_open(link, "cell closing");
    shared.set_down("the cell closed");
    result
}

fn describe_close(e: &LinkEnd, state: &ConnState) -> String {
    match e {
        LinkEnd::Closed { code, reason } => {
            // The Close frame's reason, where the relay sent one: on QUIC
            // it is not cut to fit a packet.
            let reason = lock(&state.close)
                .as_ref()
                .map(|(_, r)| r.clone())
                .unwrap_or_else(|| reason.clone());
            format!("the relay closed the link ({code:?}): {reason}")
        }
        LinkEnd::TimedOut => "the relay stopped answering (idle timeout)".into(),
        LinkEnd::Lost => "the relay reset the connection (did it restart?)".into(),
        LinkEnd::Local => "closed by this cell".into(),
        e => format!("connection lost: {e}"),
    }
}

/// Closes the link because the relay broke the protocol.
fn violation(link: &Link, code: CloseCode, reason: String) {
    tracing::warn!("closing the link: {reason}");
    link.close(code, &reason);
}

/// Reads the relay's control frames. Never waits on the application: a
/// full event queue drops presence and notice events (counted), so discovery
/// answers keep flowing.
async fn read_control(
    link: Link,
    mut reader: FrameReceiver,
    shared: Arc<Shared>,
    events: mpsc::Sender<Delivery>,
    state: Arc<ConnState>,
) {
    loop {
        match reader.next().await {
            Ok(Some(frame)) => match frame {
                Frame::Presence { up, info } => shared.emit(&events, Event::Presence { up, info }),
                Frame::Notice {
                    code,
                    count,
                    id,
                    subject,
                } => {
                    lock(&shared.undelivered).add(code, subject, count);
                    shared.emit(
                        &events,
                        Event::Notice {
                            code,
                            count,
                            id,
                            subject,
                        },
                    )
                }
                Frame::DiscoverReply { request, cells } => {
                    match lock(&shared.pending).remove(&request) {
                        Some(tx) => {
                            let _ = tx.send(cells);
                        }
                        None => tracing::debug!(request, "discover reply nobody waits for"),
                    }
                }
                Frame::Close { code, reason } => {
                    tracing::debug!(?code, %reason, "relay sent Close");
                    *lock(&state.close) = Some((code, reason));
                    // Everything the relay sent before its Close is read.
                    state.peer_done.notify_one();
                }
                other => {
                    violation(
                        &link,
                        CloseCode::Malformed,
                        format!(
                            "the relay sent a {} frame on the control stream",
                            other.name()
                        ),
                    );
                    break;
                }
            },
            Ok(None) => break,
            Err(e) => {
                if let Some(code) = e.peer_fault() {
                    violation(
                        &link,
                        code,
                        format!("bad control frame from the relay: {e}"),
                    );
                }
                break;
            }
        }
    }
    state.peer_done.notify_one();
}

/// Accepts the relay's lanes (a data stream each on QUIC, a channel each
/// on TCP) and reads each in its own task, so lanes do not wait on each
/// other and each stays in order.
async fn accept_data(link: Link, shared: Arc<Shared>, events: mpsc::Sender<Delivery>) {
    let mut readers = JoinSet::new();
    loop {
        tokio::select! {
            s = link.accept_lane() => match s {
                Ok(recv) => {
                    readers.spawn(read_data(link.clone(), recv, shared.clone(), events.clone()));
                }
                Err(_) => break,
            },
            Some(_) = readers.join_next(), if !readers.is_empty() => {}
        }
    }
    // Let the readers deliver what they have already read.
    while readers.join_next().await.is_some() {}
}

async fn read_data(
    link: Link,
    recv: FrameReceiver,
    shared: Arc<Shared>,
    events: mpsc::Sender<Delivery>,
) {
    let mut reader = match BatchReader::new(recv, shared.opts.limits) {
        Ok(r) => r,
        Err(e) => {
            violation(&link, CloseCode::Shutdown, e.to_string());
            return;
        }
    };
    // Reused for every batch.
    let mut envs: Vec<Envelope> = Vec::new();
    // The dedup state of the lane being read, held while reading it.
    let mut dedup: Option<(Lane, OwnedMutexGuard<Dedup>)> = None;
    loop {
        let batch = match reader.next(&mut envs).await {
            Ok(Some(b)) => b,
            Ok(None) => return,
            Err(e) => {
                if let Some(code) = e.peer_fault() {
                    violation(&link, code, format!("bad data from the relay: {e}"));
                }
                return;
            }
        };
        // Every message of a batch is on the batch's lane (the decoder
        // checks), and the relay keeps one stream per lane: the lock is
        // taken once per stream.
        let seen = match &mut dedup {
            Some((lane, guard)) if *lane == batch.lane => guard,
            slot => {
                // Let go of the other lane first: one lock at a time.
                *slot = None;
                let guard = shared.dedup[batch.lane.index()].clone().lock_owned().await;
                &mut slot.insert((batch.lane, guard)).1
            }
        };
        let passed;
        (envs, passed) = check(&shared, envs, seen).await;
        if passed.is_empty() {
            continue;
        }
        // Room for the whole batch, then one queue operation for it.
        match shared
            .room
            .acquire_many(shared.permits(passed.len()) as u32)
            .await
        {
            Ok(permits) => permits.forget(),
            // The cell was dropped.
            Err(_) => return,
        }
        if events.send(Delivery::Batch(passed)).await.is_err() {
            return;
        }
    }
}

/// The end-to-end checks: signatures (batch-verified), unsupported
/// authenticators and kinds, duplicates. Returns what passes, in order, and
/// `envs` emptied for reuse.
async fn check(
    shared: &Shared,
    mut envs: Vec<Envelope>,
    seen: &mut Dedup,
) -> (Vec<Envelope>, Vec<Received>) {
    let signed = envs
        .iter()
        .filter(|e| matches!(e.authenticator(), Authenticator::Signature(_)))
        .count();
    let sig_ok = if signed == 0 {
        Vec::new()
    } else if signed > VERIFY_INLINE_MAX {
        match tokio::task::spawn_blocking(move || {
            let ok = verify_signed(&envs);
            (envs, ok)
        })
        .await
        {
            Ok((e, ok)) => {
                envs = e;
                ok
            }
            Err(e) => {
                tracing::error!("signature verification task failed: {e}");
                return (Vec::new(), Vec::new());
            }
        }
    } else {
        verify_signed(&envs)
    };
    let (mut bad_signature, mut unsupported, mut duplicate) = (0u64, 0u64, 0u64);
    let mut out = Vec::with_capacity(envs.len());
    let mut ok = sig_ok.into_iter();
    // Each id is hashed once, here, and the dedup table uses it as its own
    // hash; every lookup is started before the first is waited on.
    let ids: Vec<MessageId> = envs.iter().map(Envelope::id).collect();
    for id in &ids {
        seen.prefetch(id.as_u128());
    }
    for (env, id) in envs.drain(..).zip(ids) {
        let auth = match env.authenticator() {
            Authenticator::Signature(_) => {
                if !ok.next().unwrap_or(false) {
                    bad_signature += 1;
                    tracing::debug!(source = %env.source().short(), "dropped a message with a bad signature");
                    continue;
                }
                ReceivedAuth::Signature
            }
            Authenticator::None => ReceivedAuth::Link,
            Authenticator::AeadTag(_) => {
                unsupported += 1;
                tracing::debug!(source = %env.source().short(), "dropped a sealed message (sealing is not supported yet)");
                continue;
            }
        };
        if env.kind() != Kind::Data {
            unsupported += 1;
            continue;
        }
        // Only after the signature passed: a forged copy must not make the
        // genuine message look like a duplicate.
        if !seen.insert(id.as_u128()) {
            duplicate += 1;
            continue;
        }
        out.push(Received {
            id,
            source: env.source(),
            destination: env.destination(),
            lane: env.lane(),
            timestamp_ms: env.timestamp_ms(),
            auth,
            payload: env.into_payload(),
        });
    }
    let c = &shared.counters;
    for (counter, n) in [
        (&c.received, out.len() as u64),
        (&c.dropped_bad_signature, bad_signature),
        (&c.dropped_unsupported, unsupported),
        (&c.dropped_duplicate, duplicate),
    ] {
        if n > 0 {
            counter.fetch_add(n, Ordering::Relaxed);
        }
    }
    (envs, out)
}

/// Recently seen message ids of one lane, to drop duplicates: two
/// generations of at most `generation` ids. When the current one fills it
/// becomes the previous one, whose ids are forgotten; so the last
/// `generation` ids are always remembered, and at most twice as many.
/// The tables grow as ids arrive (nothing up front) and keep their
/// allocation once full.
struct Dedup {
    current: IdTable,
    previous: IdTable,
    generation: usize,
}

impl Dedup {
    /// Remembers between `capacity / 2` and `capacity` ids (at least 1).
    fn new(capacity: usize) -> Self {
        // The key keeps a sender from aiming ids at one run of slots.
        let key = IdKey::random();
        Self {
            current: IdTable::with_capacity(0, key),
            previous: IdTable::with_capacity(0, key),
            generation: (capacity / 2).max(1),
        }
    }

    /// Starts loading the slots where [`insert`](Self::insert) of `id`
    /// will look; changes nothing else.
    fn prefetch(&self, id: u128) {
        self.current.prefetch(id);
        if !self.previous.is_empty() {
            self.previous.prefetch(id);
        }
    }

    /// Remembers `id`; false if it was seen recently (a duplicate).
    fn insert(&mut self, id: u128) -> bool {
        if self.previous.contains(id) || self.current.contains(id) {
            return false;
        }
        self.current.insert(id);
        if self.current.len() >= self.generation {
            std::mem::swap(&mut self.current, &mut self.previous);
            self.current.clear();
        }
        true
    }
}

/// Whether each signed envelope (in order, skipping unsigned ones) verifies.
fn verify_signed(envs: &[Envelope]) -> Vec<bool> {
    let signed: Vec<&Envelope> = envs
        .iter()
        .filter(|e| matches!(e.authenticator(), Authenticator::Signature(_)))
        .collect();
    relay_codec::verify::verify_each(&signed)
        .into_iter()
        .map(|r| r.is_ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_documented_ones() {
        let o = CellOptions::default();
        assert!(o.notices && o.reconnect);
        assert_eq!(o.auth, AuthMode::Signed);
        assert_eq!(o.connect_timeout, Duration::from_secs(5));
        assert_eq!(o.backoff_initial, Duration::from_millis(100));
        assert_eq!(o.backoff_max, Duration::from_secs(5));
        assert_eq!(o.queue_depth, 4096);
        assert_eq!((o.event_queue, o.dedup_capacity), (65_536, 65_536));
        assert!(o.endpoint.is_none());
        assert!(o.agent.len() <= MAX_AGENT);
        validate(&o).unwrap();
    }

    #[test]
    fn batches_fit_the_relays_largest_frame() {
        // Defaults on both sides: nothing to lower.
        assert_eq!(
            sizes(1 << 20, 64 << 10, 1 << 20, 4 << 20),
            (1 << 20, 64 << 10)
        );
        // A relay with small payloads lowers ours.
        assert_eq!(sizes(1 << 20, 64 << 10, 1000, 4 << 20).0, 1000);
        // A relay with small frames lowers the batch, then the payload.
        for frame in [2000, 70_000, 1 << 20] {
            let (p, b) = sizes(1 << 20, 64 << 10, 1 << 20, frame);
            assert!(
                b >= 1 && p + b + MESSAGE_OVERHEAD <= frame,
                "{frame}: {p} {b}"
            );
        }
        assert_eq!(sizes(1 << 20, 64 << 10, 1 << 20, 0), (0, 1));
    }

    #[test]
    fn bad_options_are_refused_with_a_reason() {
        let o = CellOptions {
            app_version: "x".repeat(65),
            ..CellOptions::default()
        };
        assert!(validate(&o).unwrap_err().to_string().contains("at most 64"));
        let o = CellOptions {
            backoff_max: Duration::from_millis(1),
            ..CellOptions::default()
        };
        assert!(validate(&o).is_err());
    }

    #[test]
    fn dedup_allocates_as_it_fills_and_forgets_the_older_generation() {
        // Nothing near the 32 768 ids of a generation is allocated up
        // front, nor after one id.
        let mut d = Dedup::new(65_536);
        assert!(d.current.capacity() + d.previous.capacity() <= 8);
        assert!(d.insert(1) && !d.insert(1));
        assert!(d.current.capacity() <= 8);

        let mut d = Dedup::new(100);
        for id in 0..50 {
            assert!(d.insert(id));
        }
        // Rotated: the first 50 are the older generation, still known.
        assert_eq!((d.previous.len(), d.current.len()), (50, 0));
        assert!((0..50).all(|id| !d.insert(id)));
        for id in 50..100 {
            assert!(d.insert(id));
        }
        // Rotated again: 0..50 are forgotten, 50..100 are known.
        assert!((50..100).all(|id| !d.insert(id)));
        assert!(d.insert(0));
        // Never more than the capacity, at least half of it.
        for id in 1000..5000 {
            d.insert(id);
            let held = d.previous.len() + d.current.len();
            assert!((50..100).contains(&held), "{held}");
            if id >= 1049 {
                assert!(!d.insert(id - 49), "the last 50 are always known");
            }
        }
        // A capacity of 0 or 1 still drops back-to-back copies.
        let mut d = Dedup::new(0);
        assert!(d.insert(7) && !d.insert(7) && d.insert(8) && d.insert(7));
    }

    fn signed(kp: &Keypair, nonce: u64, auth: AuthMode) -> Envelope {
        let msg = Message::new(
            kp.public(),
            Destination::Broadcast,
            Bytes::from_static(b"x"),
        )
        .with_nonce(nonce)
        .with_timestamp(1);
        let mut buf = BytesMut::new();
        match auth {
            AuthMode::Signed => msg.encode_signed(kp, &mut buf),
            AuthMode::Link => msg.encode(&mut buf),
        }
        Envelope::parse(&mut buf.freeze(), &Limits::default()).unwrap()
    }

    #[test]
    fn verify_signed_names_the_bad_ones_in_order() {
        let kp = Keypair::from_secret_bytes(&[1; 32]);
        let good = signed(&kp, 1, AuthMode::Signed);
        let unsigned = signed(&kp, 2, AuthMode::Link);
        let mut raw = BytesMut::from(&signed(&kp, 3, AuthMode::Signed).raw()[..]);
        let last = raw.len() - 1;
        raw[last] ^= 1;
        let bad = Envelope::parse(&mut raw.freeze(), &Limits::default()).unwrap();
        assert_eq!(
            verify_signed(&[good.clone(), unsigned, bad, good]),
            vec![true, false, true]
        );
    }
}
