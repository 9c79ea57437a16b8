//! The actions executor: carries out what the relay's [`relay_core::Node`]
//! decided, as queue pushes, control frames, closes, counters and log
//! lines. It decides nothing: a queue that refuses a message goes back to
//! the node ([`relay_core::Node::undelivered`]), which counts and notices
//! it.

use super::Shared;
use super::handle::{ControlQueued, LinkHandle};
use crate::metrics::{CloseReason, DropReason};
use relay_codec::frame::Role;
use relay_core::{LinkId, Now, QueueRefusal, Undelivered};
use relay_link::{ForwardedBatch, Outbound};
use std::sync::Arc;
use std::time::Instant;
use tracing::{debug, info, warn};

/// An action of the relay's node, naming links by their handles.
pub(super) type Action = relay_core::Action<Arc<LinkHandle>>;

/// How many of the receivers woken last are looked at before waking one
/// again: a batch mostly goes to one or a few, and a repeated wake is
/// harmless, so the check stays short for a broadcast to many.
const WAKE_MEMO: usize = 8;

/// What one task (a lane reader, a link task, the timer) needs to carry
/// out the node's actions, kept across events so nothing is allocated per
/// message. Each buffer holds at most one event's worth.
#[derive(Default)]
pub(super) struct Executor {
    /// The node appends here; [`run`](Self::run) empties it.
    pub(super) actions: Vec<Action>,
    /// Pushes a queue refused, merged per receiver and reason, for the
    /// node's [`undelivered`](relay_core::Node::undelivered).
    refused: Vec<Undelivered>,
    /// Receivers whose writer gets a wake after the pushes.
    woken: Vec<Arc<LinkHandle>>,
    /// Receivers the last batch's sender may pause for
    /// ([`relay_core::Action::MayPause`]); the lane reader empties it.
    pub(super) pause: Vec<(LinkId, Arc<LinkHandle>)>,
    /// Durable messages a full lane queue refused, in order: queued by a
    /// task that waits for room (a durable message is never dropped for a
    /// slow receiver; past [`SPILL_WAIT`] the node's retry takes over).
    spill: Vec<(Arc<LinkHandle>, Outbound)>,
}

/// The longest a spilled durable delivery waits for room before it is
/// left to the node's retry.
const SPILL_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

impl Executor {
    /// Carries out every action in [`actions`](Self::actions), in order,
    /// for an event read at `now` (`queued_at`, the same instant, stamps
    /// what is queued). `from` is the link whose batch the Forward and
    /// Deliver actions came from. Refused pushes go back to the node, and
    /// what it answers is carried out too.
    pub(super) fn run(&mut self, shared: &Shared, now: Now, queued_at: Instant, from: LinkId) {
        let Executor {
            actions,
            refused,
            woken,
            pause,
            spill,
        } = self;
        loop {
            for action in actions.drain(..) {
                execute(
                    shared, action, queued_at, from, refused, woken, pause, spill,
                );
            }
            if refused.is_empty() {
                break;
            }
            let mut node = shared.node();
            for u in refused.drain(..) {
                node.undelivered(now, u, actions);
            }
        }
        for h in woken.drain(..) {
            h.queues.wake();
        }
        if !spill.is_empty() {
            let items = std::mem::take(spill);
            tokio::spawn(async move {
                let deadline = tokio::time::Instant::now() + SPILL_WAIT;
                for (to, out) in items {
                    if tokio::time::timeout_at(deadline, to.queues.push_wait(out))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            });
        }
    }
}

/// Queues a durable message on `to`, or (its lane full, or an earlier one
/// of this run to it spilled) keeps it, in order, for the spill task.
fn deliver_durable(
    to: Arc<LinkHandle>,
    out: Outbound,
    woken: &mut Vec<Arc<LinkHandle>>,
    spill: &mut Vec<(Arc<LinkHandle>, Outbound)>,
) {
    if spill.iter().any(|(h, _)| Arc::ptr_eq(h, &to)) {
        spill.push((to, out));
        return;
    }
    match to.queues.push(out) {
        Ok(()) => wake(woken, to),
        Err(out) if !to.queues.is_closed() => spill.push((to, out)),
        // Closed: the cell is leaving; the node redelivers when it is back.
        Err(_) => {}
    }
}

#[allow(clippy::too_many_arguments)]
fn execute(
    shared: &Shared,
    action: Action,
    queued_at: Instant,
    from: LinkId,
    refused: &mut Vec<Undelivered>,
    woken: &mut Vec<Arc<LinkHandle>>,
    pause: &mut Vec<(LinkId, Arc<LinkHandle>)>,
    spill: &mut Vec<(Arc<LinkHandle>, Outbound)>,
) {
    let m = &shared.metrics;
    match action {
        Action::Forward { to, batch, first } => {
            let count = u64::from(batch.count);
            match to.queues.push_batch(ForwardedBatch { batch, queued_at }) {
                Ok(()) => {
                    if to.role == Role::Relay {
                        m.forwarded_to_relay(count, true);
                    }
                    wake(woken, to)
                }
                Err(_) => refuse(refused, from, &to, first, count),
            }
        }
        Action::Deliver { to, id, env, .. } => match to.queues.push(Outbound { env, queued_at }) {
            Ok(()) => {
                if to.role == Role::Relay {
                    m.forwarded_to_relay(1, false);
                }
                wake(woken, to)
            }
            Err(_) => refuse(refused, from, &to, id, 1),
        },
        Action::MayPause { link, to } => pause.push((link, to)),
        Action::Control { to, frame } => {
            if let relay_codec::Frame::DurableAck {
                status: relay_codec::frame::DurableStatus::Acked,
                ids,
            } = &frame
            {
                m.durable().acked(ids.len() as u64);
            }
            if let ControlQueued::Full { first } = to.control(frame) {
                m.control_dropped(to.role);
                if first {
                    warn!(
                        peer = %to.key,
                        role = ?to.role,
                        "control frames dropped: the link's control queue is full \
                         (it does not read its control stream); counted in \
                         celluler_control_frames_dropped_total"
                    );
                }
            }
        }
        Action::DurableLog {
            token,
            id,
            dest,
            lane,
            expires_unix_ms,
            env,
        } => {
            if let Some(d) = &shared.durable {
                d.log(
                    token,
                    id,
                    dest,
                    lane,
                    expires_unix_ms,
                    &env,
                    super::unix_ms(),
                );
            }
        }
        Action::DurableDeliver { to, env, .. } => {
            deliver_durable(to, Outbound { env, queued_at }, woken, spill);
        }
        Action::DurableRead { to, seq } => {
            let env = shared
                .durable
                .as_ref()
                .and_then(|d| d.read(seq, &shared.limits));
            match env {
                Some(env) => deliver_durable(to, Outbound { env, queued_at }, woken, spill),
                None => warn!(seq, "durable log: a queued record could not be read back"),
            }
        }
        Action::DurableRelease { seq, expired } => {
            if let Some(d) = &shared.durable {
                d.release(seq);
            }
            if expired {
                m.durable().expired(1);
            } else {
                m.durable().released(1);
            }
        }
        Action::DurableRefused { key, id, status } => {
            m.durable().refused(1);
            warn!(sender = %key.short(), %id, "durable message refused: {}", status.name());
        }
        Action::Close {
            to,
            code,
            reason,
            why,
            ..
        } => {
            if to.link.end().is_some() {
                // It ended on its own (a TCP link logs its own framing
                // errors); the node only records why.
                debug!(peer = %to.key, code = ?code, "link already closed: {reason}");
            } else {
                match why {
                    CloseReason::Replaced => {
                        info!(peer = %to.key, "cell reconnected; closing its previous link");
                    }
                    CloseReason::Shutdown => debug!(peer = %to.key, "closing link: {reason}"),
                    _ => warn!(peer = %to.key, code = ?code, "closing link: {reason}"),
                }
            }
            to.link.close(code, &reason);
        }
        Action::PeerClosing { code, reason, .. } => {
            debug!(?code, "peer closes its link: {reason}");
        }
        Action::Drop { reason, count } => {
            m.dropped(reason, count);
            if reason == DropReason::Duplicate {
                m.dedup_hits(count);
            }
        }
        Action::Verified { checked, bad } => m.signatures(checked, bad),
        Action::Refused { key, count, .. } => {
            warn!(link = %key.short(), refused = count, "refused replayed, expired or future-dated messages");
        }
        Action::BadSignatures { key, count, .. } => {
            warn!(link = %key.short(), bad = count, "dropped messages whose signature does not verify (verify = all)");
        }
    }
}

fn wake(woken: &mut Vec<Arc<LinkHandle>>, to: Arc<LinkHandle>) {
    if !woken
        .iter()
        .rev()
        .take(WAKE_MEMO)
        .any(|w| Arc::ptr_eq(w, &to))
    {
        woken.push(to);
    }
}

/// Records `count` messages `to`'s queue refused, merged with the last
/// refusal when it is for the same receiver and reason.
fn refuse(
    refused: &mut Vec<Undelivered>,
    from: LinkId,
    to: &LinkHandle,
    first: relay_codec::MessageId,
    count: u64,
) {
    let why = if to.queues.is_closed() {
        QueueRefusal::Closed
    } else {
        QueueRefusal::Full
    };
    match refused.last_mut() {
        Some(u) if u.to == to.key && u.why == why => u.count += count,
        _ => refused.push(Undelivered {
            from,
            to: to.key,
            why,
            first,
            count,
        }),
    }
}
