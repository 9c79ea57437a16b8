//! The handshake, the lane writer and the close over any [`Link`], QUIC or
//! TCP: the transport-independent counterparts of [`super::hello`],
//! [`super::accept_hello`], [`super::run_writer`] and [`super::close_with`],
//! with typed errors ([`ConnError`]).

use super::conn::{ConnError, ControlSender, FrameReceiver, LaneSender, Link, LinkEnd};
use super::{Hello, LaneQueues, Queued, Welcome, WriteObserver, WriterConfig};
use crate::lanes::LaneScheduler;
use bytes::{Bytes, BytesMut};
use relay_codec::batch::BatchStats;
use relay_codec::frame::{CloseCode, PROTOCOL_VERSION, Role};
use relay_codec::{BatchEncoder, Frame, Lane, Limits};
use std::sync::Arc;
use std::time::Duration;

/// How long a close waits for its Close frame to be sent.
const CLOSE_GRACE: Duration = Duration::from_millis(700);

/// The connecting side of the handshake: opens the control channel, sends
/// Hello and waits (at most `timeout`) for Welcome. A refusal (a Close
/// frame, or the link closed with a code) is [`ConnError::Refused`] with
/// the peer's code and reason.
pub async fn hello_on(
    link: &Link,
    role: Role,
    notices: bool,
    agent: &str,
    timeout: Duration,
) -> Result<(ControlSender, FrameReceiver, Welcome), ConnError> {
    let step = async {
        let (mut send, mut recv) = link.open_control().await?;
        send.send(&Frame::Hello {
            version: PROTOCOL_VERSION,
            role,
            notices,
            agent: agent.to_owned(),
        })
        .await?;
        match recv.next().await? {
            Some(Frame::Welcome {
                version,
                node,
                time_ms,
                max_payload,
                max_frame,
            }) => Ok((
                send,
                recv,
                Welcome {
                    version,
                    node,
                    time_ms,
                    max_payload,
                    max_frame,
                },
            )),
            Some(Frame::Close { code, reason }) => Err(ConnError::Refused { code, reason }),
            Some(other) => Err(ConnError::Unexpected {
                expected: "Welcome",
                got: other.name(),
            }),
            None => Err(ConnError::EndedBefore("Welcome")),
        }
    };
    let r = tokio::time::timeout(timeout, step).await;
    let refused = || match link.end() {
        Some(LinkEnd::Closed { code, reason }) => Some(ConnError::Refused { code, reason }),
        _ => None,
    };
    match r {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e @ ConnError::Refused { .. })) => Err(e),
        Ok(Err(e)) => Err(refused().unwrap_or(e)),
        Err(_) => Err(refused().unwrap_or(ConnError::Timeout("Welcome"))),
    }
}

/// The accepting side of the handshake: waits (at most `timeout`) for the
/// control channel and its Hello. The caller answers with Welcome, or
/// refuses with [`close_on`].
pub async fn accept_hello_on(
    link: &Link,
    timeout: Duration,
) -> Result<(ControlSender, FrameReceiver, Hello), ConnError> {
    let step = async {
        let (send, mut recv) = link.accept_control().await?;
        match recv.next().await? {
            Some(Frame::Hello {
                version,
                role,
                notices,
                agent,
            }) => Ok((
                send,
                recv,
                Hello {
                    version,
                    role,
                    notices,
                    agent,
                },
            )),
            Some(other) => Err(ConnError::Unexpected {
                expected: "Hello",
                got: other.name(),
            }),
            None => Err(ConnError::EndedBefore("Hello")),
        }
    };
    tokio::time::timeout(timeout, step)
        .await
        .map_err(|_| ConnError::Timeout("Hello"))?
}

/// Closes `link` with `code` and `reason` so the peer can print why: on
/// QUIC a Close frame on `control` first (best effort), then the
/// connection close; on TCP the link's own close (a Close frame, then
/// `close_notify`). Waits a moment for the Close to leave.
pub async fn close_on(
    link: &Link,
    control: Option<&mut ControlSender>,
    code: CloseCode,
    reason: &str,
) {
    match link {
        Link::Quic(q) => {
            let stream = match control {
                Some(ControlSender::Quic(s)) => Some(s),
                _ => None,
            };
            super::close_with(&q.conn, stream, code, reason).await;
        }
        Link::Tcp(t) => {
            t.close(code, reason);
            let _ = tokio::time::timeout(CLOSE_GRACE, t.close_sent()).await;
        }
    }
}

/// [`super::run_writer`] over any link: drains `queues` into batch frames
/// on `lanes` until the queues are closed and empty or the link fails;
/// then ends the lanes and waits (at most `cfg.drain_timeout`) for them
/// to be delivered.
pub async fn run_writer_on<O: WriteObserver>(
    mut lanes: LaneSender,
    queues: Arc<LaneQueues>,
    cfg: WriterConfig,
    mut obs: O,
) -> Result<(), ConnError> {
    let mut sched = LaneScheduler::new(cfg.weights);
    // Made on the first message, so an idle link holds no zstd context.
    let mut encoder: Option<BatchEncoder> = None;
    let mut out = BytesMut::new();
    let max_msgs = cfg.max_batch_messages.clamp(1, Limits::MAX_BATCH_CAP);
    loop {
        // Take nothing off the queues for a dead link: what stays queued
        // goes out on the next one (a cell reconnecting).
        if let Some(end) = lanes.end() {
            return Err(end.into());
        }
        let Some(i) = sched.next(queues.nonempty()) else {
            if queues.is_closed() && queues.is_empty() {
                break;
            }
            tokio::select! {
                _ = queues.notify.notified() => {}
                end = lanes.closed() => return Err(end.into()),
            }
            continue;
        };
        let lane = Lane::ALL[i];
        let enc = match &mut encoder {
            Some(e) => e,
            slot => slot.insert(
                BatchEncoder::new(cfg.zstd_level, cfg.compress_min)
                    .map_err(ConnError::Compressor)?,
            ),
        };
        let forwarded = fill_batch(&queues, i, enc, &cfg, max_msgs, &mut obs);
        queues.space.notify_waiters();
        let stats = enc.finish(lane, &mut out);
        if stats.count > 0 {
            obs.on_batch(lane, &stats);
            lanes.send(lane, out.split().freeze()).await?;
        }
        if let Some(f) = forwarded {
            let stats = BatchStats {
                count: usize::from(f.batch.count),
                raw_bytes: f.batch.raw_len as usize,
                wire_bytes: f.batch.frame_len(),
                compressed: f.batch.compressed,
            };
            obs.on_forwarded(lane, &stats, f.queued_at);
            let head = Bytes::copy_from_slice(&f.batch.frame_header());
            lanes.send_parts(lane, head, f.batch.data).await?;
        }
    }
    // Queues closed and drained: end the lanes and wait (bounded) until
    // they are delivered, so a caller that exits next loses nothing.
    lanes
        .finish(tokio::time::Instant::now() + cfg.drain_timeout)
        .await;
    Ok(())
}

/// Takes lane `i`'s next batch into `enc`: queued messages up to the batch
/// bounds, stopping before a forwarded batch (returned, to go out after
/// them so the lane keeps its order); staged messages if nothing was
/// queued.
fn fill_batch<O: WriteObserver>(
    queues: &LaneQueues,
    i: usize,
    enc: &mut BatchEncoder,
    cfg: &WriterConfig,
    max_msgs: usize,
    obs: &mut O,
) -> Option<super::ForwardedBatch> {
    let lane = Lane::ALL[i];
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
    forwarded
}
