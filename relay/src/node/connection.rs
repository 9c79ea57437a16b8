//! One link from handshake to close, over QUIC or TCP alike: admission,
//! the control channel, the lanes and the reasons a link is refused or
//! closed.

use super::ingest::RelayObserver;
use super::{LinkEntry, Shared, unix_ms};
use crate::core::{LinkId, Notice, NoticeAggregator, StallGate};
use crate::metrics::{CloseReason, DropReason};
use relay_codec::frame::{CloseCode, MAX_DISCOVER_ENTRIES, NoticeCode, PROTOCOL_VERSION, Role};
use relay_codec::{Envelope, Frame, Lane, MessageId, PublicKey};
use relay_link::tcp::{TcpIncoming, TcpLink};
use relay_link::{BatchReader, ControlSender, FrameReceiver, LaneQueues, Link, LinkEnd, LinkError};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

/// How long a new connection may take to send its Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Control frames waiting for one link's control stream.
const CONTROL_QUEUE: usize = 1024;
/// After a peer's Close, how long its data streams may take to be read.
const DRAIN_ON_CLOSE: Duration = Duration::from_secs(5);
/// After the relay's own Close at an orderly close, how long the peer may
/// take to read it and close the connection, and how long writing the last
/// control frames may take, each.
const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// Drops of one batch to report to its sender: (code, subject, first id,
/// count), consecutive drops of one (code, subject) merged.
pub(super) type Drops = Vec<(NoticeCode, PublicKey, MessageId, u64)>;

/// One attached link as the routing core and other links see it.
pub struct LinkHandle {
    pub(super) id: LinkId,
    pub(super) key: PublicKey,
    pub(super) role: Role,
    pub(super) queues: Arc<LaneQueues>,
    pub(super) control: mpsc::Sender<Frame>,
    pub(super) link: Link,
    /// The link's dropped messages not yet reported, if it asked for
    /// notices in Hello.
    pub(super) notices: Option<Mutex<NoticeAggregator>>,
    /// Wakes the control writer when a notice may have fallen due.
    pub(super) notice_due: tokio::sync::Notify,
    /// Why this relay closed the link, if it did; counted when it ends.
    pub(super) closed_by_us: Mutex<Option<CloseReason>>,
    /// Whether senders may pause for this link as a receiver.
    pub(super) stall_gate: StallGate,
}

impl LinkHandle {
    /// Sends a control frame if there is room; control traffic to a link
    /// that does not read is dropped, never waited for.
    pub(super) fn control(&self, frame: Frame) {
        let _ = self.control.try_send(frame);
    }

    /// Records a batch's drops for the notices to this link (when it asked
    /// for them), at `now_ms` on the relay's monotonic clock. The control
    /// writer sends them, summed and bounded in rate.
    pub(super) fn report_drops(&self, drops: &Drops, now_ms: u64) {
        let Some(agg) = &self.notices else { return };
        if drops.is_empty() {
            return;
        }
        let mut agg = agg.lock().unwrap_or_else(|e| e.into_inner());
        let mut moved = false;
        for &(code, subject, id, n) in drops {
            moved |= agg.record(code, subject, id, n, now_ms);
        }
        drop(agg);
        if moved {
            self.notice_due.notify_one();
        }
    }

    /// The notices due at `now_ms` (all pending ones if `all`).
    fn take_notices(&self, now_ms: u64, all: bool) -> Vec<Notice> {
        let mut out = Vec::new();
        if let Some(agg) = &self.notices {
            let mut agg = agg.lock().unwrap_or_else(|e| e.into_inner());
            if all {
                agg.take_all(&mut out);
            } else {
                agg.take_due(now_ms, &mut out);
            }
        }
        out
    }

    fn next_notice_due(&self) -> Option<u64> {
        let agg = self.notices.as_ref()?;
        agg.lock().unwrap_or_else(|e| e.into_inner()).next_due()
    }

    pub(super) fn close(&self, code: CloseCode, reason: &str) {
        self.close_as(code, CloseReason::from(code), reason);
    }

    pub(super) fn close_as(&self, code: CloseCode, why: CloseReason, reason: &str) {
        self.closed_by_us
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(why);
        self.link.close(code, reason);
    }
}

fn drop_reason_for(code: CloseCode) -> Option<DropReason> {
    match code {
        CloseCode::Oversize => Some(DropReason::Oversize),
        CloseCode::Malformed | CloseCode::Version => Some(DropReason::Malformed),
        _ => None,
    }
}

/// A connection whose transport handshake has not run yet.
pub(super) enum Incoming {
    /// From the QUIC endpoint.
    Quic(quinn::Incoming),
    /// From the TCP listener.
    Tcp(TcpIncoming),
}

impl Incoming {
    fn remote_address(&self) -> std::net::SocketAddr {
        match self {
            Incoming::Quic(i) => i.remote_address(),
            Incoming::Tcp(i) => i.remote_address(),
        }
    }

    /// Runs the transport's TLS handshake; the link, or why not.
    async fn establish(self, shared: &Shared) -> Result<Link, String> {
        match self {
            Incoming::Quic(i) => match i.await {
                Ok(c) => Ok(Link::quic(c, shared.limits)),
                Err(e) => Err(format!("during the QUIC/TLS handshake: {e}")),
            },
            Incoming::Tcp(i) => match i.handshake().await {
                Ok(c) => Ok(Link::Tcp(TcpLink::new(c, shared.limits, &shared.tcp))),
                Err(e) => Err(format!("during the TCP/TLS handshake: {e}")),
            },
        }
    }
}

/// One connection from handshake to close.
pub(super) async fn handle_connection(shared: Arc<Shared>, incoming: Incoming) {
    let remote = incoming.remote_address();
    let m = shared.metrics.clone();
    let tcp = matches!(incoming, Incoming::Tcp(_));
    let link = match incoming.establish(&shared).await {
        Ok(l) => l,
        Err(e) => {
            m.link_refused(CloseReason::HandshakeFailed);
            if tcp {
                // Counted by the listener and reported once a second: a
                // flood of garbage must not cost a log line per socket.
                debug!(%remote, "link refused {e}");
            } else {
                warn!(%remote, "link refused {e}");
            }
            return;
        }
    };
    let transport = link.transport();
    let Some(key) = link.peer_key() else {
        m.link_refused(CloseReason::HandshakeFailed);
        warn!(%remote, "link without a proven key; closing");
        link.close(CloseCode::Unauthorized, "no proven key");
        return;
    };
    let (mut ctl_send, mut ctl_recv, hello) =
        match relay_link::accept_hello(&link, HELLO_TIMEOUT).await {
            Ok(v) => v,
            Err(e) => {
                let code = match &e {
                    LinkError::Timeout(_) => CloseCode::Idle,
                    e => e.peer_fault().unwrap_or(CloseCode::Malformed),
                };
                let reason = e.to_string();
                m.link_refused(CloseReason::HandshakeFailed);
                warn!(%remote, %transport, peer = %key, "link refused at Hello: {reason}");
                link.close(code, &reason);
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
        m.link_refused(CloseReason::HandshakeFailed);
        warn!(%remote, %transport, peer = %key, agent = %hello.agent, "link refused: {reason}");
        relay_link::close(&link, Some(&mut ctl_send), code, &reason).await;
        return;
    }
    // Welcome is the first frame of the control channel, and the link is
    // attached before the control writer starts: once a cell has read
    // Welcome, messages to it are routed.
    let id = shared.next_link.fetch_add(1, Ordering::Relaxed);
    let (ctl_tx, ctl_rx) = mpsc::channel::<Frame>(CONTROL_QUEUE);
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
        link: link.clone(),
        notices: hello
            .notices
            .then(|| Mutex::new(NoticeAggregator::new(shared.cfg.link.notice_interval_ms))),
        notice_due: tokio::sync::Notify::new(),
        closed_by_us: Mutex::new(None),
        stall_gate: StallGate::default(),
    });
    let writer = tokio::spawn({
        let lanes = link.lane_sender();
        let queues = handle.queues.clone();
        let cfg = shared.writer_config();
        let obs = RelayObserver {
            metrics: m.clone(),
            samples: Vec::new(),
            now: None,
        };
        async move {
            if let Err(e) = relay_link::run_writer(lanes, queues, cfg, obs).await {
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
    info!(peer = %key, %remote, %transport, agent = %hello.agent, "link opened");

    // Control writer: frames from any task, and the notices as they fall
    // due, to this link's control stream.
    let (finish_tx, finish_rx) = tokio::sync::oneshot::channel();
    let mut ctl_writer = tokio::spawn(control_writer(
        shared.clone(),
        handle.clone(),
        ctl_send,
        ctl_rx,
        finish_rx,
    ));
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
            // Every message of the link has been handled: its last notices,
            // then our Close, end the control stream. The peer reads up to
            // that Close and closes the connection; closing first would
            // discard what it has not read yet (docs/PROTOCOL.md 6.2).
            let _ = finish_tx.send(Frame::Close {
                code: CloseCode::Normal,
                reason: "closed at the peer's request".into(),
            });
            let _ = tokio::time::timeout(CLOSE_LINGER, &mut ctl_writer).await;
            if tokio::time::timeout(CLOSE_LINGER, link.closed())
                .await
                .is_err()
            {
                handle.close(CloseCode::Normal, "closed at the peer's request");
            }
        }
        ControlEnd::Broken(code, reason) => handle.close(code, &reason),
        ControlEnd::Ended => {}
    }
    let why = link.closed().await;
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
    if let LinkEnd::Mux(e) = &why
        && let Some(r) = drop_reason_for(e.close_code())
    {
        // The TCP link closed itself on the peer's bad chunk framing (and
        // logged it).
        m.dropped(r, 1);
    }
    let reason = closed_by_us.unwrap_or_else(|| close_reason(&why));
    m.link_closed(hello.role, reason);
    info!(peer = %key, %remote, %transport, reason = reason.as_str(), "link closed: {why}");
    // A TCP link's Close and close_notify are written by its own task; let
    // them leave before this task (and, at shutdown, the runtime) ends.
    let _ = tokio::time::timeout(CLOSE_LINGER, link.close_sent()).await;
}

/// Writes a link's control stream: frames from any task (`frames`) and the
/// link's notices as they fall due. On `finish` (the peer's orderly close,
/// once its data streams were read), writes the frames already queued,
/// every pending notice and the Close it was given, and ends the stream.
async fn control_writer(
    shared: Arc<Shared>,
    handle: Arc<LinkHandle>,
    mut send: ControlSender,
    mut frames: mpsc::Receiver<Frame>,
    mut finish: tokio::sync::oneshot::Receiver<Frame>,
) {
    loop {
        let due = handle
            .next_notice_due()
            .map(|ms| tokio::time::Instant::from_std(shared.started + Duration::from_millis(ms)));
        let due = async move {
            match due {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            f = frames.recv() => match f {
                Some(f) => {
                    if send.send(&f).await.is_err() {
                        return;
                    }
                }
                None => return,
            },
            _ = handle.notice_due.notified() => {}
            _ = due => {}
            close = &mut finish => {
                let Ok(close) = close else { return };
                while let Ok(f) = frames.try_recv() {
                    if send.send(&f).await.is_err() {
                        return;
                    }
                }
                let last = handle.take_notices(0, true);
                if write_notices(&shared, &mut send, last).await.is_ok()
                    && send.send(&close).await.is_ok()
                {
                    send.finish();
                }
                return;
            }
        }
        let notices = handle.take_notices(shared.mono_ms(), false);
        if write_notices(&shared, &mut send, notices).await.is_err() {
            return;
        }
    }
}

async fn write_notices(
    shared: &Shared,
    send: &mut ControlSender,
    notices: Vec<Notice>,
) -> Result<(), LinkError> {
    for n in notices {
        send.send(&n.into_frame()).await?;
        shared.metrics.notice_sent(n.code);
    }
    Ok(())
}

fn close_reason(e: &LinkEnd) -> CloseReason {
    match e {
        LinkEnd::Closed { code, .. } => CloseReason::from(*code),
        LinkEnd::Mux(e) => CloseReason::from(e.close_code()),
        LinkEnd::Local => CloseReason::from(CloseCode::Normal),
        LinkEnd::TimedOut => CloseReason::TimedOut,
        LinkEnd::Io { kind, .. } if *kind == std::io::ErrorKind::TimedOut => CloseReason::TimedOut,
        _ => CloseReason::PeerClosed,
    }
}

/// Accepts the peer's lanes (QUIC data streams, TCP lane channels), one
/// ingress task each, until the link ends or `drain` is signalled; then
/// takes the lanes already started and waits (bounded by the caller) for
/// every ingress task to finish.
async fn accept_data_streams(
    shared: Arc<Shared>,
    handle: Arc<LinkHandle>,
    drain: Arc<tokio::sync::Notify>,
) {
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            r = handle.link.accept_lane() => match r {
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
        tokio::time::timeout(Duration::from_millis(50), handle.link.accept_lane()).await
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
    ctl: &mut FrameReceiver,
) -> ControlEnd {
    loop {
        let frame = match ctl.next().await {
            Ok(Some(f)) => f,
            Ok(None) => return ControlEnd::Ended,
            Err(e) => {
                let Some(code) = e.peer_fault() else {
                    return ControlEnd::Ended;
                };
                let reason = e.to_string();
                if let Some(r) = drop_reason_for(code) {
                    shared.metrics.dropped(r, 1);
                }
                warn!(peer = %handle.key, "closing link: bad control frame: {reason}");
                return ControlEnd::Broken(code, reason);
            }
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

/// Reads one lane of a link: batch frames only, all of one lane.
async fn ingress(shared: Arc<Shared>, from: Arc<LinkHandle>, recv: FrameReceiver) {
    let mut reader = match BatchReader::new(recv, shared.limits) {
        Ok(r) => r,
        Err(e) => {
            warn!("{e}");
            return;
        }
    };
    let mut envs: Vec<Envelope> = Vec::new();
    let fail = |code: CloseCode, reason: String| {
        if let Some(r) = drop_reason_for(code) {
            shared.metrics.dropped(r, 1);
        }
        warn!(peer = %from.key, code = ?code, "closing link: {reason}");
        from.close(code, &reason);
    };
    loop {
        let batch = match reader.next(&mut envs).await {
            Ok(Some(b)) => b,
            Ok(None) => return,
            Err(e) => {
                if let Some(code) = e.peer_fault() {
                    fail(code, e.to_string());
                }
                return;
            }
        };
        match shared.ingest(&from, &envs, &batch) {
            Ok(backlogged) => stall(&shared, &backlogged, batch.lane).await,
            Err((code, reason)) => return fail(code, reason),
        }
    }
}

/// Stops reading a sender's lane until every receiver its last batch's
/// cell-addressed messages left backlogged has drained to half its queue,
/// for at most `link.max_stall_ms`. While the relay does not read, QUIC
/// flow control slows the sender to its receivers' pace, so a fast sender
/// and a slower receiver lose nothing. Other links are never paused.
///
/// A receiver none of whose messages has left for
/// [`STUCK_AFTER_MS`](crate::core::STUCK_AFTER_MS) is not waited for
/// ([`StallGate`]) until one leaves: a cell that never reads costs each of
/// its senders about that long in pauses, then what finds no room is
/// dropped and counted. One that drains, however slowly, keeps being
/// waited for.
/// Broadcast and service messages never pause their sender: one slow
/// member must not slow everyone who broadcasts.
async fn stall(shared: &Shared, backlogged: &[Arc<LinkHandle>], lane: Lane) {
    let max = shared.cfg.link.max_stall();
    if max.is_zero() {
        return;
    }
    let now_ms = unix_ms();
    let waiting: Vec<&Arc<LinkHandle>> = backlogged
        .iter()
        .filter(|h| h.stall_gate.may_wait(h.queues.taken(lane), now_ms))
        .collect();
    if waiting.is_empty() {
        return;
    }
    let start = tokio::time::Instant::now();
    let deadline = start + max;
    let mut timed_out = false;
    for h in waiting {
        if !h.queues.wait_for_room(lane, deadline).await {
            timed_out = true;
            break;
        }
    }
    shared
        .metrics
        .stalled(start.elapsed().as_secs_f64(), timed_out);
}
