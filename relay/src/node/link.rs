//! One link's tasks, from handshake to close, over QUIC or TCP alike: the
//! transport and Hello handshakes, then the node's admission, the control
//! channel, one reader per lane, and the [`LinkGuard`] that releases what
//! the link holds however its task ends.
//!
//! Every decision is the node's: this module turns what the link reads
//! into events ([`relay_core::Node::link_up`], `batch`, `control`,
//! `protocol_error`, `finish`, `link_down`) and hands the actions to the
//! [`Executor`].

use super::actions::Executor;
use super::handle::{LinkHandle, RelayObserver};
use super::{LinkEntry, Shared};
use crate::metrics::{CloseReason, Metrics};
use relay_codec::frame::CloseCode;
use relay_codec::frame::Role;
use relay_codec::{Frame, Lane};
use relay_core::{Action, Admission, LinkInfo, Now};
use relay_link::tcp::{TcpIncoming, TcpLink};
use relay_link::{
    BatchReader, ControlSender, FrameReceiver, LaneQueues, Link, LinkEnd, LinkError, Transport,
};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::task::AbortHandle;
use tracing::{debug, info, warn};

/// How long a new connection may take to send its Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Control frames waiting for one cell link's control stream (a relay
/// link's queue holds its link-state database more: see `serve`).
const CONTROL_QUEUE: usize = 1024;
/// After a peer's Close, how long its data streams may take to be read.
const DRAIN_ON_CLOSE: Duration = Duration::from_secs(5);
/// After the relay's own Close at an orderly close, how long the peer may
/// take to read it and close the connection, and how long writing the last
/// control frames may take, each.
const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// A connection whose transport handshake has not run yet.
pub(super) enum Incoming {
    /// From the QUIC endpoint.
    Quic(quinn::Incoming),
    /// From the TCP listener.
    Tcp(TcpIncoming),
}

impl Incoming {
    fn remote_address(&self) -> SocketAddr {
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

/// Releases what an admitted link holds when its task ends, however it
/// ends (a panic or a cancelled task included): its subtasks, its place in
/// the node (`link_down`: detached, watchers told), its queues, its entry
/// in the shell's table and the open-link gauge. The link itself is closed
/// last, so a peer that sees the close finds the relay's counts already
/// down.
struct LinkGuard {
    shared: Arc<Shared>,
    handle: Arc<LinkHandle>,
    remote: SocketAddr,
    transport: Transport,
    /// The control writer and the lane acceptor: aborted.
    tasks: Vec<AbortHandle>,
    /// How the link ended, once its task saw it end.
    end: Option<LinkEnd>,
}

impl LinkGuard {
    /// Counts the link open; [`Drop`] counts it closed.
    fn new(
        shared: Arc<Shared>,
        handle: Arc<LinkHandle>,
        remote: SocketAddr,
        transport: Transport,
    ) -> Self {
        shared.metrics.link_opened(handle.role);
        Self {
            shared,
            handle,
            remote,
            transport,
            tasks: Vec::new(),
            end: None,
        }
    }
}

impl Drop for LinkGuard {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        let (s, h) = (&self.shared, &self.handle);
        let end = self.end.take().or_else(|| h.link.end());
        let (now, at) = s.now();
        let mut ex = Executor::default();
        let departed = {
            let mut node = s.node();
            if let Some(LinkEnd::Mux(e)) = &end {
                // A TCP link closed itself on the peer's bad chunk framing
                // (and logged it): the node counts it as any bad input.
                node.protocol_error(now, h.id, e.close_code(), e.to_string(), &mut ex.actions);
            }
            node.link_down(now, h.id, &mut ex.actions)
        };
        ex.run(s, now, at, h.id);
        h.queues.close();
        s.links
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&h.id);
        let reason = departed
            .and_then(|d| d.closed_by_node)
            .unwrap_or_else(|| end.as_ref().map_or(CloseReason::Internal, close_reason));
        s.metrics.link_closed(h.role, reason);
        let (peer, remote, transport) = (h.key, self.remote, self.transport);
        if h.role == Role::Relay {
            s.peers_changed();
            let why = end
                .as_ref()
                .map_or_else(|| "its task failed".to_owned(), ToString::to_string);
            info!(%peer, %remote, %transport, reason = reason.as_str(), "peer link down: {why}");
            if end.is_none() {
                h.link
                    .close(CloseCode::Normal, "internal error in the relay");
            }
            return;
        }
        match &end {
            Some(why) => {
                info!(%peer, %remote, %transport, reason = reason.as_str(), "link closed: {why}");
            }
            None => {
                warn!(%peer, %remote, %transport, reason = reason.as_str(), "link closed: its task failed");
                h.link
                    .close(CloseCode::Normal, "internal error in the relay");
            }
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
    let (ctl_send, ctl_recv, hello) = match relay_link::accept_hello(&link, HELLO_TIMEOUT).await {
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
    serve(
        shared,
        link,
        remote,
        transport,
        key,
        Side::Accepted(hello),
        ctl_send,
        ctl_recv,
    )
    .await;
}

/// How a link that passed its handshake came to be.
pub(super) enum Side {
    /// Accepted: the peer's Hello, read; this relay answers with Welcome.
    Accepted(relay_link::Hello),
    /// Dialed by this relay to a peer relay ([`super::peer`]): its
    /// Welcome was read.
    Dialed,
}

/// A link from its admission to its close, accepted or dialed alike.
#[allow(clippy::too_many_arguments)]
pub(super) async fn serve(
    shared: Arc<Shared>,
    link: Link,
    remote: SocketAddr,
    transport: Transport,
    key: relay_codec::PublicKey,
    side: Side,
    mut ctl_send: relay_link::ControlSender,
    mut ctl_recv: FrameReceiver,
) {
    let m = shared.metrics.clone();
    let dialed = matches!(side, Side::Dialed);
    let hello = match side {
        Side::Accepted(h) => h,
        Side::Dialed => relay_link::Hello {
            version: relay_codec::frame::PROTOCOL_VERSION,
            role: Role::Relay,
            notices: false,
            agent: "(dialed by this relay)".to_owned(),
        },
    };
    if hello.role == Role::Relay
        && let Some(reason) = shared.redundant_peer_link(key, dialed)
    {
        m.link_refused(CloseReason::HandshakeFailed);
        m.relay_refused();
        info!(peer = %key, %remote, %transport, dialed, "peer link not kept: {reason}");
        relay_link::close(&link, Some(&mut ctl_send), CloseCode::Normal, &reason).await;
        return;
    }
    let id = shared
        .next_link
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // A new relay link is sent the whole link-state database at once (one
    // frame per relay known, at most `max_relays` + 1) besides its
    // liveness and credit frames: its queue holds that much more.
    let depth = match hello.role {
        Role::Relay => CONTROL_QUEUE + 2 * shared.node().mesh().config().max_relays,
        Role::Cell => CONTROL_QUEUE,
    };
    let (ctl_tx, ctl_rx) = mpsc::channel::<Frame>(depth);
    let handle = Arc::new(LinkHandle {
        id,
        key,
        role: hello.role,
        queues: Arc::new(LaneQueues::new(shared.cfg.limits.lane_queue_depth)),
        control: ctl_tx,
        link: link.clone(),
        control_full_logged: AtomicBool::new(false),
    });
    let info = LinkInfo {
        key,
        role: hello.role,
        version: hello.version,
        notices: hello.notices,
    };
    let mut ex = Executor::default();
    let (now, at) = shared.now();
    let admission = if dialed {
        shared
            .node()
            .peer_dialed(now, id, handle.clone(), key, &mut ex.actions)
    } else {
        shared
            .node()
            .link_up(now, id, handle.clone(), info, &mut ex.actions)
    };
    if let Admission::Refused { code, reason } = admission {
        ex.run(&shared, now, at, id);
        m.link_refused(CloseReason::HandshakeFailed);
        if hello.role == Role::Relay {
            m.relay_refused();
        }
        warn!(%remote, %transport, peer = %key, agent = %hello.agent, "link refused: {reason}");
        relay_link::close(&link, Some(&mut ctl_send), code, &reason).await;
        return;
    }
    // From here the node holds the link: every exit releases it.
    let mut guard = LinkGuard::new(shared.clone(), handle.clone(), remote, transport);
    // Welcome is the first control frame, and the cell was attached with
    // it: once a cell has read Welcome, messages to it are routed.
    ex.run(&shared, now, at, id);
    let writer = tokio::spawn({
        let lanes = link.lane_sender();
        let queues = handle.queues.clone();
        let cfg = shared.writer_config();
        let obs = RelayObserver::new(m.clone());
        async move {
            if let Err(e) = relay_link::run_writer(lanes, queues, cfg, obs).await {
                debug!("link writer ended: {e}");
            }
        }
    });
    shared
        .links
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(
            id,
            LinkEntry {
                handle: handle.clone(),
                writer: Some(writer),
                dialed,
            },
        );
    if hello.role == Role::Relay {
        shared.peers_changed();
        info!(peer = %key, %remote, %transport, dialed, "peer link up");
    } else {
        info!(peer = %key, %remote, %transport, agent = %hello.agent, "link opened");
    }

    let (finish_tx, finish_rx) = oneshot::channel();
    let mut ctl_writer = tokio::spawn(control_writer(m.clone(), ctl_send, ctl_rx, finish_rx));
    let drain = Arc::new(tokio::sync::Notify::new());
    let mut acceptor = tokio::spawn(accept_lanes(shared.clone(), handle.clone(), drain.clone()));
    guard.tasks.push(ctl_writer.abort_handle());
    guard.tasks.push(acceptor.abort_handle());
    #[cfg(debug_assertions)]
    shared.injected_fault(&key);

    if let ControlEnd::PeerClosed = control_loop(&shared, &handle, &mut ctl_recv, &mut ex).await {
        // The peer finished its data streams before sending Close; read
        // them to the end before closing, or their last messages are lost.
        drain.notify_one();
        let _ = tokio::time::timeout(DRAIN_ON_CLOSE, &mut acceptor).await;
        // Every message of the link has been ingested: the node's last
        // notices and Close end the control stream. The peer reads up to
        // that Close and closes the connection; closing first would
        // discard what it has not read yet (docs/PROTOCOL.md 6.2).
        let (now, at) = shared.now();
        shared.node().finish(now, id, &mut ex.actions);
        ex.run(&shared, now, at, id);
        let _ = finish_tx.send(());
        let _ = tokio::time::timeout(CLOSE_LINGER, &mut ctl_writer).await;
        if tokio::time::timeout(CLOSE_LINGER, link.closed())
            .await
            .is_err()
        {
            link.close(CloseCode::Normal, "closed at the peer's request");
        }
    }
    guard.end = Some(link.closed().await);
    drop(guard);
    // A TCP link's Close and close_notify are written by its own task; let
    // them leave before this task (and, at shutdown, the runtime) ends.
    let _ = tokio::time::timeout(CLOSE_LINGER, link.close_sent()).await;
}

/// Writes a link's control stream: the frames the node's actions queued
/// for it. On `finish` (an orderly close; the node queued its last
/// notices and its Close), writes what is queued up to that Close and ends
/// the stream.
async fn control_writer(
    metrics: Arc<Metrics>,
    mut send: ControlSender,
    mut frames: mpsc::Receiver<Frame>,
    mut finish: oneshot::Receiver<()>,
) {
    loop {
        tokio::select! {
            f = frames.recv() => match f {
                Some(f) => {
                    if write_control(&metrics, &mut send, &f).await.is_err() {
                        return;
                    }
                }
                None => return,
            },
            r = &mut finish => {
                if r.is_err() {
                    return;
                }
                while let Ok(f) = frames.try_recv() {
                    if write_control(&metrics, &mut send, &f).await.is_err() {
                        return;
                    }
                    if matches!(f, Frame::Close { .. }) {
                        break;
                    }
                }
                send.finish();
                return;
            }
        }
    }
}

async fn write_control(
    metrics: &Metrics,
    send: &mut ControlSender,
    frame: &Frame,
) -> Result<(), LinkError> {
    send.send(frame).await?;
    if let Frame::Notice { code, .. } = frame {
        metrics.notice_sent(*code);
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
/// reader task each, until the link ends or `drain` is signalled; then
/// takes the lanes already started and waits (bounded by the caller) for
/// every reader to finish.
async fn accept_lanes(
    shared: Arc<Shared>,
    handle: Arc<LinkHandle>,
    drain: Arc<tokio::sync::Notify>,
) {
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            r = handle.link.accept_lane() => match r {
                Ok(recv) => {
                    tasks.spawn(read_lane(shared.clone(), handle.clone(), recv));
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
        tasks.spawn(read_lane(shared.clone(), handle.clone(), recv));
    }
    while tasks.join_next().await.is_some() {}
}

/// How a link's control stream ended.
enum ControlEnd {
    /// The peer sent Close: drain its data streams, then finish.
    PeerClosed,
    /// The stream or connection ended, or the node closed the link.
    Ended,
}

/// Feeds the link's control frames to the node until the stream ends, the
/// node closes the link, or the peer closes it.
async fn control_loop(
    shared: &Shared,
    handle: &LinkHandle,
    ctl: &mut FrameReceiver,
    ex: &mut Executor,
) -> ControlEnd {
    loop {
        let frame = match ctl.next().await {
            Ok(Some(f)) => f,
            Ok(None) => return ControlEnd::Ended,
            Err(e) => {
                if let Some(code) = e.peer_fault() {
                    let (now, at) = shared.now();
                    shared.node().protocol_error(
                        now,
                        handle.id,
                        code,
                        e.to_string(),
                        &mut ex.actions,
                    );
                    ex.run(shared, now, at, handle.id);
                }
                return ControlEnd::Ended;
            }
        };
        let (now, at) = shared.now();
        shared
            .node()
            .control(now, handle.id, frame, &mut ex.actions);
        let end = ex.actions.iter().find_map(|a| match a {
            Action::PeerClosing { link, .. } if *link == handle.id => Some(ControlEnd::PeerClosed),
            Action::Close { link, .. } if *link == handle.id => Some(ControlEnd::Ended),
            _ => None,
        });
        ex.run(shared, now, at, handle.id);
        if let Some(end) = end {
            return end;
        }
    }
}

/// Reads one lane of a link, batch frames only, and feeds each batch to
/// the node; pauses when the node allows it for a backlogged receiver.
async fn read_lane(shared: Arc<Shared>, from: Arc<LinkHandle>, recv: FrameReceiver) {
    let mut reader = match BatchReader::new(recv, shared.limits) {
        Ok(r) => r,
        Err(e) => {
            warn!("{e}");
            return;
        }
    };
    let mut envs = Vec::new();
    let mut ex = Executor::default();
    loop {
        let batch = match reader.next(&mut envs).await {
            Ok(Some(b)) => b,
            Ok(None) => return,
            Err(e) => {
                if let Some(code) = e.peer_fault() {
                    let (now, at) = shared.now();
                    shared.node().protocol_error(
                        now,
                        from.id,
                        code,
                        e.to_string(),
                        &mut ex.actions,
                    );
                    ex.run(&shared, now, at, from.id);
                }
                return;
            }
        };
        shared.metrics.msgs_in(
            batch.lane.index(),
            envs.len() as u64,
            envs.iter().map(|e| e.len() as u64).sum(),
        );
        let (now, at) = shared.now();
        shared
            .node()
            .batch(now, from.id, &envs, &batch, &mut ex.actions);
        ex.run(&shared, now, at, from.id);
        if !ex.pause.is_empty() {
            stall(&shared, &mut ex, now, batch.lane).await;
        }
    }
}

/// Stops reading a sender's lane until every receiver its last batch's
/// cell-addressed messages left backlogged has drained to half its queue,
/// for at most `link.max_stall_ms`, where the node allows a pause
/// ([`relay_core::Node::may_wait`]). While the relay does not read, flow
/// control slows the sender to its receivers' pace, so a fast sender and a
/// slower receiver lose nothing. Other links are never paused.
async fn stall(shared: &Shared, ex: &mut Executor, now: Now, lane: Lane) {
    ex.pause.retain(|(_, h)| h.queues.over_high_water(lane));
    if !ex.pause.is_empty() {
        let node = shared.node();
        ex.pause
            .retain(|(l, h)| node.may_wait(now, *l, h.queues.taken(lane)));
    }
    if ex.pause.is_empty() {
        return;
    }
    let start = tokio::time::Instant::now();
    let deadline = start + shared.cfg.link.max_stall();
    let mut timed_out = false;
    for (_, h) in ex.pause.drain(..) {
        if !timed_out && !h.queues.wait_for_room(lane, deadline).await {
            timed_out = true;
        }
    }
    shared
        .metrics
        .stalled(start.elapsed().as_secs_f64(), timed_out);
}
