//! One connection's life and the cell's across them: the link tasks, the
//! reconnects (with [`Backoff`]), the relay's control frames, and the
//! orderly close.

use super::connect::{Dialer, Established, dial};
use super::handle::{Delivery, Shared, lock};
use super::receive::accept_data;
use super::{CellError, Event};
use relay_codec::Frame;
use relay_codec::frame::CloseCode;
use relay_link::dial::{Attempt, Backoff, redial};
use relay_link::lanes::LANES;
use relay_link::{
    ControlSender, FrameReceiver, Link, LinkEnd, LinkError, NoObserver, WriterConfig,
};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinHandle;

/// How long `close` waits for the relay to read what was sent and answer
/// with its Close.
pub(crate) const DRAIN_GRACE: Duration = Duration::from_secs(6);

/// Per-connection state the control reader fills in.
#[derive(Default)]
pub(crate) struct ConnState {
    /// The relay's Close frame, if it sent one.
    pub(crate) close: Mutex<Option<(CloseCode, String)>>,
    /// Signalled when the relay sent Close or ended its control stream.
    pub(crate) peer_done: Notify,
}

/// How a connection's life ended.
pub(crate) enum End {
    /// The cell closed; the result of flushing.
    Shutdown(Result<(), CellError>),
    /// The link was lost, for this reason.
    Lost(String),
}

/// Runs the cell's connections, one after another, until the cell closes
/// or (without [`CellOptions::reconnect`](super::CellOptions::reconnect)) its link is lost.
pub(crate) async fn supervise(
    shared: Arc<Shared>,
    mut dialer: Dialer,
    mut backoff: Backoff,
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
                match reconnect(
                    &shared,
                    &mut dialer,
                    &mut backoff,
                    &mut control_rx,
                    &mut shutdown,
                )
                .await
                {
                    Some(e) => established = e,
                    None => {
                        shared.queues.close();
                        break unsent(&shared, &reason);
                    }
                }
                shared.counters.reconnects.fetch_add(1, Ordering::Relaxed);
                shared.resend_durable();
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
pub(crate) async fn stopping(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

pub(crate) fn unsent(shared: &Shared, reason: &str) -> Result<(), CellError> {
    match shared.queues.len() {
        0 => Ok(()),
        count => Err(CellError::Unsent {
            count,
            reason: format!("the link to the relay was down ({reason})"),
        }),
    }
}

/// Redials ([`redial`]: waits drawn from `backoff`, which the first
/// success resets) until a dial works, or the cell is closed (`None`).
pub(crate) async fn reconnect(
    shared: &Shared,
    dialer: &mut Dialer,
    backoff: &mut Backoff,
    control_rx: &mut mpsc::Receiver<Frame>,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<Established> {
    let redialing = redial(
        backoff,
        Redialing {
            shared,
            dialer,
            control_rx,
        },
        |e, next| tracing::warn!(relay = %shared.relay, retry_in = ?next, "reconnecting failed: {e}"),
    );
    tokio::select! {
        established = redialing => Some(established),
        _ = stopping(shutdown) => None,
    }
}

/// A dial of the relay, made again by [`redial`].
struct Redialing<'a> {
    shared: &'a Shared,
    dialer: &'a mut Dialer,
    control_rx: &'a mut mpsc::Receiver<Frame>,
}

impl Attempt for Redialing<'_> {
    type Output = Established;
    type Error = CellError;
    async fn attempt(&mut self) -> Result<Established, CellError> {
        // Control frames that raced with the link going down: the state
        // they carry is re-sent once linked.
        while self.control_rx.try_recv().is_ok() {}
        dial(self.shared, self.dialer).await
    }
}

/// Runs one connection until it is lost or the cell closes.
pub(crate) async fn serve(
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
                // Control frames queued before the close go first (acks of
                // durable messages the application has).
                while let Ok(frame) = control_rx.try_recv() {
                    if control.send(&frame).await.is_err() {
                        break;
                    }
                }
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
pub(crate) async fn graceful_close(
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

pub(crate) fn describe_close(e: &LinkEnd, state: &ConnState) -> String {
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

/// Closes `link` as [`CloseCode::Normal`] unless it is closed already: a
/// second close sends nothing but would record the close as this cell's
/// ([`LinkEnd::Local`]), and `Dialer::close` reads that to decide whether
/// a close of ours is still in flight.
pub(crate) fn close_if_open(link: &Link, reason: &str) {
    if link.end().is_none() {
        link.close(CloseCode::Normal, reason);
    }
}

/// Closes the link because the relay broke the protocol.
pub(crate) fn violation(link: &Link, code: CloseCode, reason: String) {
    tracing::warn!("closing the link: {reason}");
    link.close(code, &reason);
}

/// Reads the relay's control frames. Never waits on the application: a
/// full event queue drops presence and notice events (counted), so discovery
/// answers keep flowing.
pub(crate) async fn read_control(
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
                Frame::DurableAck { status, ids } => shared.durable_answer(status, &ids),
                // The one mesh frame a cell accepts: a hop report of a
                // message it traced (PROTOCOL.md 10.8).
                Frame::Mesh(relay_codec::mesh::MeshFrame::Trace {
                    header,
                    id,
                    ttl,
                    in_relay_us,
                    next,
                    ..
                }) => shared.emit(
                    &events,
                    Event::Trace(super::TraceHop {
                        id,
                        relay: header.origin,
                        ttl,
                        in_relay_us,
                        next,
                        at: std::time::Instant::now(),
                    }),
                ),
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
