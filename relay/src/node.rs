//! The tokio/quinn shell of a relay: it owns the sockets, the tasks and the
//! clock, feeds what happens into the pure [`crate::core`] state machines
//! and carries out what they decide.
//!
//! Per link (one QUIC connection) there are: a control task (handshake,
//! then Announce / Discover / WatchPresence), a control writer fed by a
//! bounded channel, one ingress task per incoming lane stream, and one
//! writer draining the link's lock-free lane queues into batch frames.
//! Ingress never waits on another link: a full queue drops best-effort
//! messages for that receiver and counts them.

use crate::admin::{self, AdminState};
use crate::config::{RelayConfig, VerifyMode};
use crate::core::{
    DedupVerdict, DedupWindow, FreshnessWindow, LinkId, PresenceReport, Route, Router, Staleness,
};
use crate::metrics::{CloseReason, DropReason, Metrics};
use relay_client::link::{
    self, FrameReader, LaneQueues, LinkError, Outbound, WriteObserver, WriterConfig,
};
use relay_client::transport::{self, TransportTuning};
use relay_codec::batch::BatchStats;
use relay_codec::frame::{CloseCode, MAX_DISCOVER_ENTRIES, NoticeCode, PROTOCOL_VERSION, Role};
use relay_codec::keyfile::{KeyFileError, load_or_create_keyfile};
use relay_codec::verify::verify_each;
use relay_codec::{
    BatchDecoder, DecodeError, Destination, Envelope, Frame, Keypair, Lane, Limits, MessageId,
    PublicKey,
};
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use thiserror::Error;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

/// How long a new connection may take to send its Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Control frames waiting for one link's control stream.
const CONTROL_QUEUE: usize = 1024;
/// After a peer's Close, how long its data streams may take to be read.
const DRAIN_ON_CLOSE: Duration = Duration::from_secs(5);
/// Writers merge their time-in-relay samples every this many batches.
const MERGE_EVERY_BATCHES: u32 = 64;

/// Why a relay could not start.
#[derive(Debug, Error)]
pub enum NodeError {
    /// The data directory could not be created.
    #[error("data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The node key could not be read or created.
    #[error(transparent)]
    Key(#[from] KeyFileError),
    /// The QUIC endpoint could not be set up.
    #[error("QUIC endpoint: {0}")]
    Transport(#[from] transport::TransportError),
    /// The admin address could not be bound.
    #[error("admin address {addr}: {source} (is another relay running? pass --admin ADDR)")]
    Admin {
        /// The address.
        addr: SocketAddr,
        /// What the OS said.
        source: std::io::Error,
    },
}

/// Milliseconds since the Unix epoch, read once per batch.
fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// One attached link as the routing core and other links see it.
pub struct LinkHandle {
    id: LinkId,
    key: PublicKey,
    role: Role,
    queues: Arc<LaneQueues>,
    control: mpsc::Sender<Frame>,
    conn: quinn::Connection,
    notices: bool,
    /// Why this relay closed the link, if it did; counted when it ends.
    closed_by_us: Mutex<Option<CloseReason>>,
}

impl LinkHandle {
    /// Sends a control frame if there is room; control traffic to a link
    /// that does not read is dropped, never waited for.
    fn control(&self, frame: Frame) {
        let _ = self.control.try_send(frame);
    }

    fn notice(&self, code: NoticeCode, id: MessageId, subject: PublicKey) {
        if self.notices {
            self.control(Frame::Notice { code, id, subject });
        }
    }

    fn close(&self, code: CloseCode, reason: &str) {
        self.close_as(code, CloseReason::from(code), reason);
    }

    fn close_as(&self, code: CloseCode, why: CloseReason, reason: &str) {
        self.closed_by_us
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(why);
        self.conn
            .close(quinn::VarInt::from_u32(code as u32), reason.as_bytes());
    }
}

/// The state the routing decisions need, behind one lock taken once per
/// incoming batch.
struct Core {
    router: Router<Arc<LinkHandle>>,
    dedup: DedupWindow,
    freshness: FreshnessWindow,
}

struct LinkEntry {
    handle: Arc<LinkHandle>,
    writer: Option<JoinHandle<()>>,
}

struct Shared {
    cfg: RelayConfig,
    key: PublicKey,
    limits: Limits,
    core: Mutex<Core>,
    metrics: Arc<Metrics>,
    links: Mutex<HashMap<LinkId, LinkEntry>>,
    link_count: AtomicUsize,
    next_link: AtomicU64,
    shutting_down: AtomicBool,
    sampled: AtomicU64,
    started: Instant,
    /// Datagrams the QUIC socket saw that cannot be QUIC; folded into the
    /// metrics and logged once a second at most.
    not_quic: Arc<AtomicU64>,
}

/// A running relay: bound sockets and a key, ready to [`run`](Node::run).
pub struct Node {
    shared: Arc<Shared>,
    endpoint: quinn::Endpoint,
    admin: tokio::net::TcpListener,
    quic_addr: SocketAddr,
    admin_addr: SocketAddr,
    key_created: bool,
}

impl Node {
    /// Creates the data directory and node key if absent, binds the QUIC and
    /// admin addresses. Must be called inside a tokio runtime.
    pub async fn bind(cfg: RelayConfig) -> Result<Node, NodeError> {
        let dir = &cfg.node.data_dir;
        create_private_dir(dir).map_err(|source| NodeError::DataDir {
            path: dir.clone(),
            source,
        })?;
        let (keypair, key_created) = load_or_create_keyfile(&dir.join("node.key"))?;
        let tuning = TransportTuning {
            stream_window: cfg.link.stream_window,
            conn_window: cfg.link.conn_window,
            keep_alive: cfg.link.keep_alive(),
            idle_timeout: cfg.link.idle_timeout(),
            ..TransportTuning::default()
        };
        let server = transport::server_config(keypair.signing_key(), &tuning)?;
        let not_quic = Arc::new(AtomicU64::new(0));
        let endpoint =
            transport::server_endpoint_counting(cfg.node.listen, server, not_quic.clone())?;
        let quic_addr = endpoint
            .local_addr()
            .map_err(|e| transport::TransportError::Bind {
                addr: cfg.node.listen,
                source: e,
            })?;
        let admin = admin::bind(cfg.node.admin)
            .await
            .map_err(|source| NodeError::Admin {
                addr: cfg.node.admin,
                source,
            })?;
        let admin_addr = admin.local_addr().map_err(|source| NodeError::Admin {
            addr: cfg.node.admin,
            source,
        })?;
        let limits = cfg.limits.codec_limits();
        let core = Core {
            router: Router::new(cfg.limits.max_links),
            dedup: DedupWindow::new(cfg.security.dedup_window_ms, cfg.security.dedup_capacity),
            freshness: FreshnessWindow::new(
                cfg.security.timestamp_past_ms,
                cfg.security.timestamp_future_ms,
            ),
        };
        let shared = Arc::new(Shared {
            key: keypair.public(),
            limits,
            core: Mutex::new(core),
            metrics: Arc::new(Metrics::new()),
            links: Mutex::new(HashMap::new()),
            link_count: AtomicUsize::new(0),
            next_link: AtomicU64::new(1),
            shutting_down: AtomicBool::new(false),
            sampled: AtomicU64::new(0),
            started: Instant::now(),
            not_quic,
            cfg,
        });
        Ok(Node {
            shared,
            endpoint,
            admin,
            quic_addr,
            admin_addr,
            key_created,
        })
    }

    /// The node's identity.
    pub fn key(&self) -> PublicKey {
        self.shared.key
    }

    /// The bound QUIC address.
    pub fn quic_addr(&self) -> SocketAddr {
        self.quic_addr
    }

    /// The bound admin HTTP address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Whether the key was created by this start.
    pub fn key_created(&self) -> bool {
        self.key_created
    }

    /// The relay's counters.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.shared.metrics.clone()
    }

    /// Serves until `shutdown` completes, then stops accepting, flushes what
    /// is queued (bounded by `link.shutdown_grace_ms`) and closes every link.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let shared = self.shared.clone();
        let (admin_stop, admin_stopped) = tokio::sync::oneshot::channel::<()>();
        let health_shared = shared.clone();
        let quic_addr = self.quic_addr;
        let state = AdminState {
            metrics: shared.metrics.clone(),
            health: Arc::new(move || health_shared.health(quic_addr)),
        };
        let admin_task = tokio::spawn(admin::serve(self.admin, state, async {
            let _ = admin_stopped.await;
        }));
        let garbage_task = tokio::spawn(report_not_quic(shared.clone()));
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                incoming = self.endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    tokio::spawn(handle_connection(shared.clone(), incoming));
                }
                _ = &mut shutdown => break,
            }
        }
        info!("shutting down: no new links; flushing queued messages");
        shared.shutting_down.store(true, Ordering::Release);
        self.endpoint.set_server_config(None);
        let grace = shared.cfg.link.shutdown_grace();
        let deadline = tokio::time::Instant::now() + grace;
        let writers: Vec<JoinHandle<()>> = {
            let mut links = shared.links.lock().unwrap_or_else(|e| e.into_inner());
            links
                .values_mut()
                .filter_map(|e| {
                    e.handle.queues.close();
                    e.writer.take()
                })
                .collect()
        };
        let mut flushed = true;
        for w in writers {
            if tokio::time::timeout_at(deadline, w).await.is_err() {
                flushed = false;
            }
        }
        if !flushed {
            warn!(
                grace_ms = grace.as_millis() as u64,
                "shutdown grace ran out before every link was flushed"
            );
        }
        self.endpoint.close(
            quinn::VarInt::from_u32(CloseCode::Shutdown as u32),
            b"relay shutting down",
        );
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
        garbage_task.abort();
        let _ = admin_stop.send(());
        let _ = tokio::time::timeout(Duration::from_secs(1), admin_task).await;
        info!("stopped");
    }
}

impl Shared {
    fn health(&self, quic: SocketAddr) -> serde_json::Value {
        let cells = self.core.lock().map(|c| c.router.len()).unwrap_or(0);
        serde_json::json!({
            "status": if self.shutting_down.load(Ordering::Relaxed) { "stopping" } else { "ok" },
            "key": self.key.to_string(),
            "quic": quic.to_string(),
            "links": self.link_count.load(Ordering::Relaxed),
            "cells": cells,
            "uptime_s": self.started.elapsed().as_secs(),
            "time_in_relay_p99_us": self.metrics.time_in_relay_quantile(0.99),
        })
    }

    fn writer_config(&self) -> WriterConfig {
        WriterConfig {
            weights: self.cfg.link.lane_weights,
            batch_bytes: self.cfg.link.batch_bytes,
            max_batch_messages: self.cfg.limits.max_batch_messages,
            zstd_level: self.cfg.link.zstd_level,
            compress_min: self.cfg.link.compress_min_bytes,
            decrement_ttl: true,
            drain_timeout: self.cfg.link.shutdown_grace(),
        }
    }

    /// Sends presence reports to their watchers.
    fn report(reports: Vec<PresenceReport<Arc<LinkHandle>>>) {
        for r in reports {
            r.to.control(Frame::Presence {
                up: r.up,
                info: r.info,
            });
        }
    }

    /// Checks, deduplicates and routes one incoming batch. An error closes
    /// the sending link with that code and reason.
    fn ingest(&self, from: &LinkHandle, envs: &[Envelope]) -> Result<(), (CloseCode, String)> {
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
        let mut refused = 0u64;
        {
            let mut core = self.core.lock().unwrap_or_else(|e| e.into_inner());
            for (i, e) in envs.iter().enumerate() {
                if !good.as_ref().is_none_or(|g| g[i]) {
                    from.notice(NoticeCode::Refused, ids[i], dest_subject(e));
                    continue;
                }
                if e.ttl() == 0 {
                    m.dropped(DropReason::TtlExpired, 1);
                    from.notice(NoticeCode::TtlExpired, ids[i], dest_subject(e));
                    continue;
                }
                if let Err(s) = core.freshness.check(e.timestamp_ms(), now_ms) {
                    m.dropped(
                        match s {
                            Staleness::Expired { .. } => DropReason::Expired,
                            Staleness::FromFuture { .. } => DropReason::FromFuture,
                        },
                        1,
                    );
                    refused += 1;
                    debug!(link = %from.key.short(), "refused message: {s}");
                    from.notice(NoticeCode::Refused, ids[i], dest_subject(e));
                    continue;
                }
                if core.dedup.check_and_insert(ids[i].as_u128(), now_ms) == DedupVerdict::Duplicate
                {
                    m.dedup_hit();
                    m.dropped(DropReason::Duplicate, 1);
                    refused += 1;
                    continue;
                }
                let out = Outbound {
                    env: e.clone(),
                    queued_at,
                };
                match e.destination() {
                    Destination::Cell(dest) => match core.router.route_cell(&dest) {
                        Route::One(h) => self.enqueue(from, h, out, ids[i], &mut woken),
                        _ => {
                            m.dropped(DropReason::UnknownDestination, 1);
                            from.notice(NoticeCode::UnknownDestination, ids[i], dest);
                        }
                    },
                    Destination::Broadcast => {
                        if let Route::Many(hs) = core.router.route_broadcast(&from.key) {
                            for h in hs {
                                self.enqueue(from, h, out.clone(), ids[i], &mut woken);
                            }
                        }
                    }
                    Destination::Service(s) => {
                        if let Route::Many(hs) = core.router.route_service(&s, &from.key) {
                            for h in hs {
                                self.enqueue(from, h, out.clone(), ids[i], &mut woken);
                            }
                        }
                    }
                }
            }
        }
        if refused > 0 {
            warn!(link = %from.key.short(), refused, "refused replayed, expired or future-dated messages");
        }
        for h in woken {
            h.queues.wake();
        }
        Ok(())
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

    fn enqueue(
        &self,
        from: &LinkHandle,
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
            Err(_) if to.queues.is_closed() => {
                self.metrics.dropped(DropReason::Shutdown, 1);
            }
            Err(_) => {
                self.metrics.dropped(DropReason::SlowReceiver, 1);
                from.notice(NoticeCode::DroppedSlowReceiver, id, to.key);
            }
        }
    }
}

/// Folds the socket's count of non-QUIC datagrams into the metrics and logs
/// it, at most once a second, so a flood of garbage costs one line a second.
async fn report_not_quic(shared: Arc<Shared>) {
    let mut seen = 0;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let now = shared.not_quic.load(Ordering::Relaxed);
        if now > seen {
            shared.metrics.not_quic(now - seen);
            warn!(
                count = now - seen,
                "dropped UDP datagrams that are not QUIC packets"
            );
            seen = now;
        }
    }
}

fn dest_subject(e: &Envelope) -> PublicKey {
    e.dest_cell().unwrap_or(PublicKey([0; 32]))
}

/// Counts and times what a link writer sends.
struct RelayObserver {
    metrics: Arc<Metrics>,
    hist: hdrhistogram::Histogram<u64>,
    batches: u32,
    /// The clock, read once per batch at its first message.
    now: Option<Instant>,
}

impl WriteObserver for RelayObserver {
    fn on_message(&mut self, _lane: Lane, _bytes: usize, queued_at: Instant) {
        let now = *self.now.get_or_insert_with(Instant::now);
        let us = now.saturating_duration_since(queued_at).as_micros() as u64;
        self.hist.saturating_record(us.max(1));
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
        self.batches += 1;
        if self.batches >= MERGE_EVERY_BATCHES {
            self.batches = 0;
            self.metrics.merge_time_in_relay(&mut self.hist);
        }
    }
}

impl Drop for RelayObserver {
    fn drop(&mut self) {
        self.metrics.merge_time_in_relay(&mut self.hist);
    }
}

/// The close code and reason for a decoding failure on a link.
fn decode_close(e: &DecodeError) -> (CloseCode, String) {
    let code = match e {
        DecodeError::TooLarge { .. } => CloseCode::Oversize,
        DecodeError::Version(_) => CloseCode::Version,
        _ => CloseCode::Malformed,
    };
    (code, e.to_string())
}

fn drop_reason_for(code: CloseCode) -> Option<DropReason> {
    match code {
        CloseCode::Oversize => Some(DropReason::Oversize),
        CloseCode::Malformed | CloseCode::Version => Some(DropReason::Malformed),
        _ => None,
    }
}

/// One connection from handshake to close.
async fn handle_connection(shared: Arc<Shared>, incoming: quinn::Incoming) {
    let remote = incoming.remote_address();
    let m = shared.metrics.clone();
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            m.link_closed(Role::Cell, CloseReason::HandshakeFailed);
            warn!(%remote, "link refused during the QUIC/TLS handshake: {e}");
            return;
        }
    };
    let Some(key) = transport::peer_key(&conn).map(PublicKey) else {
        warn!(%remote, "link without a proven key; closing");
        conn.close(
            quinn::VarInt::from_u32(CloseCode::Unauthorized as u32),
            b"no proven key",
        );
        return;
    };
    let (mut ctl_send, mut ctl_recv, hello) =
        match link::accept_hello(&conn, shared.limits, HELLO_TIMEOUT).await {
            Ok(v) => v,
            Err(e) => {
                let (code, reason) = match &e {
                    LinkError::Decode(d) => decode_close(d),
                    LinkError::Timeout(_) => (CloseCode::Idle, e.to_string()),
                    _ => (CloseCode::Malformed, e.to_string()),
                };
                m.link_closed(Role::Cell, CloseReason::HandshakeFailed);
                warn!(%remote, peer = %key, "link refused at Hello: {reason}");
                conn.close(quinn::VarInt::from_u32(code as u32), reason.as_bytes());
                return;
            }
        };
    let refusal = if hello.version != PROTOCOL_VERSION {
        Some((
            CloseCode::Version,
            format!(
                "this relay speaks link protocol version {PROTOCOL_VERSION}; the peer sent version {}",
                hello.version
            ),
        ))
    } else if hello.role == Role::Relay {
        Some((
            CloseCode::Unauthorized,
            "relay peering is not enabled on this relay; it serves cells only".to_owned(),
        ))
    } else if shared.shutting_down.load(Ordering::Acquire) {
        Some((CloseCode::Shutdown, "relay shutting down".to_owned()))
    } else if shared.link_count.load(Ordering::Acquire) >= shared.cfg.limits.max_links {
        m.dropped(DropReason::TooManyLinks, 1);
        Some((
            CloseCode::TooManyLinks,
            format!(
                "relay has {} links, its limit (limits.max_links)",
                shared.cfg.limits.max_links
            ),
        ))
    } else {
        None
    };
    if let Some((code, reason)) = refusal {
        m.link_closed(hello.role, CloseReason::HandshakeFailed);
        warn!(%remote, peer = %key, agent = %hello.agent, "link refused: {reason}");
        link::close_with(&conn, Some(&mut ctl_send), code, &reason).await;
        return;
    }
    // Welcome is the first frame of the control channel, and the link is
    // attached before the control writer starts: once a cell has read
    // Welcome, messages to it are routed.
    let id = shared.next_link.fetch_add(1, Ordering::Relaxed);
    let (ctl_tx, mut ctl_rx) = mpsc::channel::<Frame>(CONTROL_QUEUE);
    let welcome = Frame::Welcome {
        version: PROTOCOL_VERSION,
        node: shared.key,
        time_ms: unix_ms(),
        max_payload: shared.limits.max_payload as u32,
        max_frame: shared.limits.max_frame as u32,
    };
    if ctl_tx.try_send(welcome).is_err() {
        return;
    }
    let handle = Arc::new(LinkHandle {
        id,
        key,
        role: hello.role,
        queues: Arc::new(LaneQueues::new(shared.cfg.limits.lane_queue_depth)),
        control: ctl_tx,
        conn: conn.clone(),
        notices: hello.notices,
        closed_by_us: Mutex::new(None),
    });
    let writer = tokio::spawn({
        let conn = conn.clone();
        let queues = handle.queues.clone();
        let cfg = shared.writer_config();
        let obs = RelayObserver {
            metrics: m.clone(),
            hist: Metrics::time_histogram(),
            batches: 0,
            now: None,
        };
        async move {
            if let Err(e) = link::run_writer(conn, queues, cfg, obs).await {
                debug!("link writer ended: {e}");
            }
        }
    });
    shared.link_count.fetch_add(1, Ordering::AcqRel);
    shared
        .links
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(
            id,
            LinkEntry {
                handle: handle.clone(),
                writer: Some(writer),
            },
        );
    let (attach, reports) = shared
        .core
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .router
        .attach(key, id, handle.clone());
    if let Some(old) = attach.replaced {
        info!(peer = %key, "cell reconnected; closing its previous link");
        old.close_as(
            CloseCode::Normal,
            CloseReason::Replaced,
            "replaced by a newer link of the same key",
        );
    }
    Shared::report(reports);
    m.link_opened(hello.role);
    info!(peer = %key, %remote, agent = %hello.agent, "link opened");

    // Control writer: frames from any task to this link's control stream.
    let ctl_writer = tokio::spawn(async move {
        while let Some(f) = ctl_rx.recv().await {
            if link::write_frame(&mut ctl_send, &f).await.is_err() {
                break;
            }
        }
    });
    // Data streams: one ingress task per lane stream the peer opens.
    let drain = Arc::new(tokio::sync::Notify::new());
    let mut acceptor = tokio::spawn(accept_data_streams(
        shared.clone(),
        handle.clone(),
        drain.clone(),
    ));

    match control_loop(&shared, &handle, &mut ctl_recv).await {
        ControlEnd::PeerClosed => {
            // The peer finished its data streams before sending Close; read
            // them to the end before closing, or their last messages are lost.
            drain.notify_one();
            let _ = tokio::time::timeout(DRAIN_ON_CLOSE, &mut acceptor).await;
            handle.close(CloseCode::Normal, "closed at the peer's request");
        }
        ControlEnd::Broken(code, reason) => handle.close(code, &reason),
        ControlEnd::Ended => {}
    }
    let why = conn.closed().await;
    acceptor.abort();
    ctl_writer.abort();

    let reports = shared
        .core
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .router
        .detach(key, id);
    Shared::report(reports);
    handle.queues.close();
    shared
        .links
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&id);
    shared.link_count.fetch_sub(1, Ordering::AcqRel);
    let closed_by_us = *handle
        .closed_by_us
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let reason = closed_by_us.unwrap_or_else(|| close_reason(&why));
    m.link_closed(hello.role, reason);
    info!(peer = %key, %remote, reason = reason.as_str(), "link closed: {why}");
}

fn close_reason(e: &quinn::ConnectionError) -> CloseReason {
    match e {
        quinn::ConnectionError::ApplicationClosed(c) => CloseReason::from(CloseCode::from_u16(
            u16::try_from(c.error_code.into_inner()).unwrap_or(u16::MAX),
        )),
        quinn::ConnectionError::LocallyClosed => CloseReason::from(CloseCode::Normal),
        quinn::ConnectionError::TimedOut => CloseReason::TimedOut,
        _ => CloseReason::PeerClosed,
    }
}

/// Accepts the peer's data streams, one ingress task each, until the
/// connection ends or `drain` is signalled; then takes the streams already
/// opened and waits (bounded by the caller) for every ingress task to finish.
async fn accept_data_streams(
    shared: Arc<Shared>,
    handle: Arc<LinkHandle>,
    drain: Arc<tokio::sync::Notify>,
) {
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            r = handle.conn.accept_uni() => match r {
                Ok(recv) => {
                    tasks.spawn(ingress(shared.clone(), handle.clone(), recv));
                }
                Err(_) => return,
            },
            _ = drain.notified() => break,
            // Reap finished readers so the set stays small.
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    while let Ok(Ok(recv)) =
        tokio::time::timeout(Duration::from_millis(50), handle.conn.accept_uni()).await
    {
        tasks.spawn(ingress(shared.clone(), handle.clone(), recv));
    }
    while tasks.join_next().await.is_some() {}
}

/// How a link's control stream ended.
enum ControlEnd {
    /// The peer sent Close: drain its data streams, then close.
    PeerClosed,
    /// The peer broke the protocol: close with this code and reason.
    Broken(CloseCode, String),
    /// The stream or connection ended.
    Ended,
}

/// Serves the link's control stream until it ends.
async fn control_loop(
    shared: &Shared,
    handle: &Arc<LinkHandle>,
    ctl: &mut FrameReader,
) -> ControlEnd {
    loop {
        let frame = match ctl.next().await {
            Ok(Some(f)) => f,
            Ok(None) => return ControlEnd::Ended,
            Err(LinkError::Decode(e)) => {
                let (code, reason) = decode_close(&e);
                if let Some(r) = drop_reason_for(code) {
                    shared.metrics.dropped(r, 1);
                }
                warn!(peer = %handle.key, "closing link: bad control frame: {reason}");
                return ControlEnd::Broken(code, reason);
            }
            Err(_) => return ControlEnd::Ended,
        };
        match frame {
            Frame::Announce {
                app_version,
                services,
            } => {
                if services.len() > shared.cfg.limits.max_services_per_cell {
                    let reason = format!(
                        "{} services announced; the limit is {}",
                        services.len(),
                        shared.cfg.limits.max_services_per_cell
                    );
                    warn!(peer = %handle.key, "closing link: {reason}");
                    return ControlEnd::Broken(CloseCode::Oversize, reason);
                }
                let reports = shared
                    .core
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .router
                    .announce(handle.key, handle.id, app_version, services);
                Shared::report(reports);
            }
            Frame::Discover { request, service } => {
                let cells = shared
                    .core
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .router
                    .discover(&service, MAX_DISCOVER_ENTRIES);
                handle.control(Frame::DiscoverReply { request, cells });
            }
            Frame::WatchPresence(on) => {
                shared
                    .core
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .router
                    .watch(handle.id, handle.clone(), on);
            }
            Frame::Close { code, reason } => {
                debug!(peer = %handle.key, ?code, "peer closes its link: {reason}");
                return ControlEnd::PeerClosed;
            }
            other => {
                let reason = format!("unexpected {:?} frame on the control stream", other.name());
                warn!(peer = %handle.key, "closing link: {reason}");
                return ControlEnd::Broken(CloseCode::Malformed, reason);
            }
        }
    }
}

/// Reads one lane stream of a link: batch frames only, all of one lane.
async fn ingress(shared: Arc<Shared>, from: Arc<LinkHandle>, recv: quinn::RecvStream) {
    let mut reader = FrameReader::new(recv, shared.limits);
    let mut dec = match BatchDecoder::new(shared.limits) {
        Ok(d) => d,
        Err(e) => {
            warn!("cannot create a zstd decoder: {e}");
            return;
        }
    };
    let mut lane: Option<Lane> = None;
    let mut envs: Vec<Envelope> = Vec::new();
    let fail = |code: CloseCode, reason: String| {
        if let Some(r) = drop_reason_for(code) {
            shared.metrics.dropped(r, 1);
        }
        warn!(peer = %from.key, code = ?code, "closing link: {reason}");
        from.close(code, &reason);
    };
    loop {
        let batch = match reader.next().await {
            Ok(Some(Frame::Batch(b))) => b,
            Ok(Some(other)) => {
                return fail(
                    CloseCode::Malformed,
                    format!("{} frame on a data stream", other.name()),
                );
            }
            Ok(None) => return,
            Err(LinkError::Decode(e)) => {
                let (code, reason) = decode_close(&e);
                return fail(code, reason);
            }
            Err(LinkError::Truncated) => {
                return fail(
                    CloseCode::Malformed,
                    "data stream ended inside a frame".into(),
                );
            }
            Err(_) => return,
        };
        if *lane.get_or_insert(batch.lane) != batch.lane {
            return fail(
                CloseCode::Malformed,
                "a data stream carries batches of one lane only".into(),
            );
        }
        envs.clear();
        let msgs = match dec.messages(&batch) {
            Ok(it) => it,
            Err(e) => {
                let (code, reason) = decode_close(&e);
                return fail(code, reason);
            }
        };
        for r in msgs {
            match r {
                Ok(e) => envs.push(e),
                Err(e) => {
                    let (code, reason) = decode_close(&e);
                    return fail(code, reason);
                }
            }
        }
        if let Err((code, reason)) = shared.ingest(&from, &envs) {
            return fail(code, reason);
        }
    }
}

fn create_private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(0o700);
    }
    b.create(dir)
}

/// The node's key, creating it in `data_dir` if absent (for `relay id`).
pub fn node_key(data_dir: &std::path::Path) -> Result<Keypair, NodeError> {
    create_private_dir(data_dir).map_err(|source| NodeError::DataDir {
        path: data_dir.to_owned(),
        source,
    })?;
    Ok(load_or_create_keyfile(&data_dir.join("node.key"))?.0)
}
