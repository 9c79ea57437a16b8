//! One link from handshake to close: the control stream, the data streams
//! and the reasons a link is refused or closed.

use super::ingest::RelayObserver;
use super::{LinkEntry, Shared, unix_ms};
use crate::core::{LinkId, Notice, NoticeAggregator, StallGate};
use crate::metrics::{CloseReason, DropReason};
use quinn::SendStream;
use relay_client::link::{self, FrameReader, LaneQueues, LinkError};
use relay_client::transport;
use relay_codec::frame::{CloseCode, MAX_DISCOVER_ENTRIES, NoticeCode, PROTOCOL_VERSION, Role};
use relay_codec::{BatchDecoder, DecodeError, Envelope, Frame, Lane, MessageId, PublicKey};
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
    pub(super) conn: quinn::Connection,
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
        self.conn
            .close(quinn::VarInt::from_u32(code as u32), reason.as_bytes());
    }
}

/// The close code and reason for a decoding failure on a link.
fn decode_close(e: &DecodeError) -> (CloseCode, String) {
    (e.close_code(), e.to_string())
}

fn drop_reason_for(code: CloseCode) -> Option<DropReason> {
    match code {
        CloseCode::Oversize => Some(DropReason::Oversize),
        CloseCode::Malformed | CloseCode::Version => Some(DropReason::Malformed),
        _ => None,
    }
}

/// One connection from handshake to close.
pub(super) async fn handle_connection(shared: Arc<Shared>, incoming: quinn::Incoming) {
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
        conn: conn.clone(),
        notices: hello
            .notices
            .then(|| Mutex::new(NoticeAggregator::new(shared.cfg.link.notice_interval_ms))),
        notice_due: tokio::sync::Notify::new(),
        closed_by_us: Mutex::new(None),
        stall_gate: StallGate::default(),
    });
    let writer = tokio::spawn({
        let conn = conn.clone();
        let queues = handle.queues.clone();
        let cfg = shared.writer_config();
        let obs = RelayObserver {
            metrics: m.clone(),
            samples: Vec::new(),
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
            if tokio::time::timeout(CLOSE_LINGER, conn.closed())
                .await
                .is_err()
            {
                handle.close(CloseCode::Normal, "closed at the peer's request");
            }
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

/// Writes a link's control stream: frames from any task (`frames`) and the
/// link's notices as they fall due. On `finish` (the peer's orderly close,
/// once its data streams were read), writes the frames already queued,
/// every pending notice and the Close it was given, and ends the stream.
async fn control_writer(
    shared: Arc<Shared>,
    handle: Arc<LinkHandle>,
    mut send: SendStream,
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
                    if link::write_frame(&mut send, &f).await.is_err() {
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
                    if link::write_frame(&mut send, &f).await.is_err() {
                        return;
                    }
                }
                let last = handle.take_notices(0, true);
                if write_notices(&shared, &mut send, last).await.is_ok()
                    && link::write_frame(&mut send, &close).await.is_ok()
                {
                    let _ = send.finish();
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
    send: &mut SendStream,
    notices: Vec<Notice>,
) -> Result<(), LinkError> {
    for n in notices {
        link::write_frame(send, &n.into_frame()).await?;
        shared.metrics.notice_sent(n.code);
    }
    Ok(())
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
