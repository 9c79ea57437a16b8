//! The node's durable-message events (see [`crate::durable`]).

use super::{Action, Node, Now};
use crate::durable::{Incoming, LogRefusal, ack_frames};
use crate::router::LinkId;
use relay_codec::frame::DurableStatus;
use relay_codec::{Envelope, MessageId, PublicKey};
use std::collections::BTreeMap;

impl<H: Clone> Node<H> {
    /// The durable messages `route_batch` took aside: each new one is
    /// logged ([`Action::DurableLog`]); a resend of one already logged is
    /// acknowledged again; too many appends in flight refuse it as full.
    pub(super) fn durable_ingest(
        &mut self,
        now: Now,
        link: LinkId,
        from_key: PublicKey,
        envs: &[Envelope],
        out: &mut Vec<Action<H>>,
    ) {
        if self.scratch.durable.is_empty() {
            return;
        }
        let taken = std::mem::take(&mut self.scratch.durable);
        let mut again = Vec::new();
        let mut busy = Vec::new();
        for &(index, ttl) in &taken {
            let e = envs[index as usize].clone().with_ttl(ttl);
            let id = self.scratch.ids[index as usize];
            let Some(dest) = e.dest_cell() else {
                continue;
            };
            match self.durable.incoming(now.unix_ms, from_key, dest, &e, id) {
                Incoming::Log(token) => out.push(Action::DurableLog {
                    token,
                    id,
                    dest,
                    lane: e.lane() as u8,
                    expires_unix_ms: self.durable.pending_expiry(token).unwrap_or(u64::MAX),
                    env: e,
                }),
                Incoming::AckAgain => again.push(id),
                Incoming::InFlight => {}
                Incoming::Busy => busy.push(id),
            }
        }
        self.scratch.durable = taken;
        let Some(handle) = self.links.get(&link).map(|l| l.handle.clone()) else {
            return;
        };
        for frame in ack_frames(DurableStatus::Acked, &again) {
            out.push(Action::Control {
                to: handle.clone(),
                frame,
            });
        }
        for &id in &busy {
            out.push(Action::DurableRefused {
                key: from_key,
                id,
                status: DurableStatus::Full,
            });
        }
        for frame in ack_frames(DurableStatus::Full, &busy) {
            out.push(Action::Control {
                to: handle.clone(),
                frame,
            });
        }
    }

    /// The log answered appends ([`Action::DurableLog`]): `Ok(seq)` once
    /// the record is synced, under its log sequence number, or a refusal.
    /// Actions: per sender attached, one [`Frame::DurableAck`] per status
    /// (its acks, or its refusals and an [`Action::DurableRefused`] each);
    /// then each stored message's [`Action::DurableDeliver`] to its
    /// destination, if attached (its retry scheduled). Unknown tokens are
    /// ignored.
    pub fn durable_logged(
        &mut self,
        now: Now,
        results: &[(u64, Result<u64, LogRefusal>)],
        out: &mut Vec<Action<H>>,
    ) {
        let mut replies: BTreeMap<(PublicKey, u8), Vec<MessageId>> = BTreeMap::new();
        let mut deliver = Vec::new();
        for &(token, result) in results {
            let Some((id, sender, dest, env)) =
                self.durable.logged(now.mono_ms, now.unix_ms, token, result)
            else {
                continue;
            };
            let status = match result {
                Ok(seq) => {
                    deliver.push((seq, dest, env));
                    DurableStatus::Acked
                }
                Err(why) => {
                    out.push(Action::DurableRefused {
                        key: sender,
                        id,
                        status: why.status(),
                    });
                    why.status()
                }
            };
            replies.entry((sender, status as u8)).or_default().push(id);
        }
        for ((sender, status), ids) in replies {
            let status = match status {
                0 => DurableStatus::Acked,
                1 => DurableStatus::Full,
                _ => DurableStatus::Failed,
            };
            self.send_durable_ack(sender, status, &ids, out);
        }
        for (seq, dest, env) in deliver {
            if let Some((_, h)) = self.router.cell(&dest) {
                let to = h.clone();
                self.durable.delivering(now.mono_ms, seq, &mut self.rng);
                out.push(Action::DurableDeliver { to, seq, env });
            }
        }
    }

    /// A durable message found in the log at start (`seq`, as logged by
    /// [`Action::DurableLog`]), not yet released: it is queued again for
    /// its destination, delivered when that cell attaches. Returns whether
    /// it was queued (not a message to a cell, or a duplicate, is not).
    pub fn durable_recovered(
        &mut self,
        now: Now,
        seq: u64,
        env: &Envelope,
        expires_unix_ms: u64,
    ) -> bool {
        let Some(dest) = env.dest_cell() else {
            return false;
        };
        self.durable.store(
            now.mono_ms,
            now.unix_ms,
            seq,
            env.id(),
            env.source(),
            dest,
            env.lane() as u8,
            expires_unix_ms,
        )
    }

    /// The cell `from` acknowledged durable messages it was given: each
    /// it was the destination of is released ([`Action::DurableRelease`]).
    /// An id it was not the destination of, or that is not queued, is
    /// ignored (a late second ack).
    pub(super) fn durable_acked(
        &mut self,
        from: PublicKey,
        ids: &[MessageId],
        out: &mut Vec<Action<H>>,
    ) {
        for id in ids {
            if let Some(seq) = self.durable.acked(&from, id) {
                out.push(Action::DurableRelease {
                    seq,
                    expired: false,
                });
            }
        }
    }

    /// Expiry and retries due at `now`: an expired message is released
    /// (`expired`) and its sender, if attached, told
    /// ([`DurableStatus::Expired`]); a due retry is read again
    /// ([`Action::DurableRead`]) to its destination if attached, and
    /// otherwise waits for it to attach.
    pub(super) fn durable_tick(&mut self, now: Now, out: &mut Vec<Action<H>>) {
        let mut reports: BTreeMap<PublicKey, Vec<MessageId>> = BTreeMap::new();
        for (seq, id, sender) in self.durable.take_expired(now.mono_ms) {
            out.push(Action::DurableRelease { seq, expired: true });
            reports.entry(sender).or_default().push(id);
        }
        for (sender, ids) in reports {
            self.send_durable_ack(sender, DurableStatus::Expired, &ids, out);
        }
        for (seq, dest) in self.durable.take_retries(now.mono_ms) {
            if let Some((_, h)) = self.router.cell(&dest) {
                let to = h.clone();
                self.durable.delivering(now.mono_ms, seq, &mut self.rng);
                out.push(Action::DurableRead { to, seq });
            }
        }
    }

    /// DurableAck frames to `key`'s current link, if it is attached.
    fn send_durable_ack(
        &self,
        key: PublicKey,
        status: DurableStatus,
        ids: &[MessageId],
        out: &mut Vec<Action<H>>,
    ) {
        let Some((_, h)) = self.router.cell(&key) else {
            return;
        };
        for frame in ack_frames(status, ids) {
            out.push(Action::Control {
                to: h.clone(),
                frame,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::super::*;
    use crate::durable::LogRefusal;
    use bytes::{Bytes, BytesMut};
    use relay_codec::{BatchDecoder, BatchEncoder, Lane, Message};

    /// Messages from cell `from` to cell `to`: (lane, durable, nonce).
    fn batch(from: u8, to: u8, lane: Lane, msgs: &[(bool, u64)]) -> (BatchFrame, Vec<Envelope>) {
        let mut enc = BatchEncoder::new(1, usize::MAX).unwrap();
        for &(durable, nonce) in msgs {
            let qos = if durable {
                Qos::Durable
            } else {
                Qos::BestEffort
            };
            let m = Message::new(
                kp(from).public(),
                Destination::Cell(kp(to).public()),
                Bytes::from_static(b"hello"),
            )
            .with_timestamp(T0)
            .with_nonce(nonce)
            .with_lane(lane)
            .with_qos(qos);
            enc.push_signed(&m, &kp(from));
        }
        let mut out = BytesMut::new();
        enc.finish(lane, &mut out);
        let Frame::Batch(b) = Frame::decode(out.freeze(), &Limits::default()).unwrap() else {
            panic!("not a batch");
        };
        let mut dec = BatchDecoder::new(Limits::default()).unwrap();
        let envs = dec.messages(&b).unwrap().map(Result::unwrap).collect();
        (b, envs)
    }

    struct T {
        node: Node<LinkId>,
        out: Vec<Action<LinkId>>,
    }

    impl T {
        fn new() -> Self {
            let mut cfg = NodeConfig::new(kp(200).public());
            cfg.durable = DurableConfig {
                ttl_ms: 10_000,
                retry_initial_ms: 100,
                retry_max_ms: 400,
                max_pending: 4,
            };
            Self {
                node: Node::new(cfg, 9).unwrap(),
                out: Vec::new(),
            }
        }
        fn up(&mut self, now: Now, link: LinkId, i: u8) -> &[Action<LinkId>] {
            self.out.clear();
            let a = self.node.link_up(now, link, link, cell(i), &mut self.out);
            assert_eq!(a, Admission::Admitted);
            &self.out
        }
        fn send(
            &mut self,
            now: Now,
            link: LinkId,
            b: &(BatchFrame, Vec<Envelope>),
        ) -> &[Action<LinkId>] {
            self.out.clear();
            self.node.batch(now, link, &b.1, &b.0, &mut self.out);
            &self.out
        }
        fn logged(&mut self, now: Now, r: &[(u64, Result<u64, LogRefusal>)]) -> &[Action<LinkId>] {
            self.out.clear();
            self.node.durable_logged(now, r, &mut self.out);
            &self.out
        }
        fn control(&mut self, now: Now, link: LinkId, f: Frame) -> &[Action<LinkId>] {
            self.out.clear();
            self.node.control(now, link, f, &mut self.out);
            &self.out
        }
        fn tick(&mut self, now: Now) -> &[Action<LinkId>] {
            self.out.clear();
            self.node.tick(now, &mut self.out);
            &self.out
        }
    }

    fn tokens(a: &[Action<LinkId>]) -> Vec<(u64, MessageId, u8)> {
        a.iter()
            .filter_map(|a| match a {
                Action::DurableLog {
                    token, id, lane, ..
                } => Some((*token, *id, *lane)),
                _ => None,
            })
            .collect()
    }

    fn acks(a: &[Action<LinkId>]) -> Vec<(LinkId, DurableStatus, Vec<MessageId>)> {
        a.iter()
            .filter_map(|a| match a {
                Action::Control {
                    to,
                    frame: Frame::DurableAck { status, ids },
                } => Some((*to, *status, ids.clone())),
                _ => None,
            })
            .collect()
    }

    fn deliveries(a: &[Action<LinkId>]) -> Vec<(LinkId, u64, bool)> {
        a.iter()
            .filter_map(|a| match a {
                Action::DurableDeliver { to, seq, .. } => Some((*to, *seq, false)),
                Action::DurableRead { to, seq } => Some((*to, *seq, true)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_durable_message_is_acked_and_delivered_only_once_synced() {
        let mut t = T::new();
        t.up(at(0), 1, 1);
        t.up(at(0), 2, 2);
        let b = batch(1, 2, Lane::High, &[(true, 1)]);
        let a = t.send(at(1), 1, &b).to_vec();
        let logs = tokens(&a);
        assert_eq!(logs.len(), 1);
        assert_eq!(logs[0].2, Lane::High as u8);
        assert!(acks(&a).is_empty() && deliveries(&a).is_empty(), "{a:?}");
        let a = t.logged(at(2), &[(logs[0].0, Ok(77))]).to_vec();
        assert_eq!(acks(&a), vec![(1, DurableStatus::Acked, vec![logs[0].1])]);
        assert_eq!(deliveries(&a), vec![(2, 77, false)]);
        // A stranger's ack releases nothing; the destination's does.
        let ack = Frame::DurableAck {
            status: DurableStatus::Acked,
            ids: vec![logs[0].1],
        };
        assert!(t.control(at(3), 1, ack.clone()).is_empty());
        let a = t.control(at(3), 2, ack).to_vec();
        assert_eq!(
            a,
            vec![Action::DurableRelease {
                seq: 77,
                expired: false
            }]
        );
        assert_eq!(t.node.durable().queued(), 0);
        // Released: nothing is retried.
        assert!(deliveries(t.tick(at(10_000))).is_empty());
    }

    #[test]
    fn a_resend_is_acked_again_not_logged_twice() {
        let mut t = T::new();
        t.up(at(0), 1, 1);
        let b = batch(1, 2, Lane::Normal, &[(true, 1)]);
        let logs = tokens(t.send(at(1), 1, &b));
        // While the append is in flight: nothing.
        assert!(t.send(at(1), 1, &b).is_empty());
        t.logged(at(2), &[(logs[0].0, Ok(5))]);
        let a = t.send(at(3), 1, &b).to_vec();
        assert!(tokens(&a).is_empty());
        assert_eq!(acks(&a), vec![(1, DurableStatus::Acked, vec![logs[0].1])]);
    }

    #[test]
    fn an_offline_cell_gets_its_queue_on_attach_lane_by_lane_in_order() {
        let mut t = T::new();
        t.up(at(0), 1, 1);
        let mut seq = 10;
        let mut want = Vec::new();
        let mut bulk = Vec::new();
        for (lane, nonces) in [(Lane::Bulk, [1, 2]), (Lane::High, [3, 4])] {
            let b = batch(1, 2, lane, &[(true, nonces[0]), (true, nonces[1])]);
            let logs = tokens(t.send(at(1), 1, &b));
            let results: Vec<_> = logs
                .iter()
                .map(|l| {
                    seq += 1;
                    (l.0, Ok(seq))
                })
                .collect();
            let a = t.logged(at(2), &results).to_vec();
            assert_eq!(acks(&a).len(), 1, "one ack frame for the batch");
            assert!(deliveries(&a).is_empty(), "nowhere to deliver yet");
            let seqs: Vec<u64> = results.iter().map(|r| r.1.unwrap()).collect();
            if lane == Lane::High {
                want.extend(seqs);
            } else {
                bulk.extend(seqs);
            }
        }
        want.extend(bulk);
        // Retries do not fire for a cell that is away.
        assert!(deliveries(t.tick(at(5_000))).is_empty());
        let a = t.up(at(5_001), 2, 2).to_vec();
        let got: Vec<u64> = deliveries(&a).iter().map(|d| d.1).collect();
        assert_eq!(got, want, "high lane first, each lane oldest first");
    }

    #[test]
    fn an_unacked_delivery_is_retried_with_growing_backoff() {
        let mut t = T::new();
        t.up(at(0), 1, 1);
        t.up(at(0), 2, 2);
        let b = batch(1, 2, Lane::Normal, &[(true, 1)]);
        let logs = tokens(t.send(at(0), 1, &b));
        t.logged(at(0), &[(logs[0].0, Ok(3))]);
        let mut last = 0;
        let mut gaps = Vec::new();
        for _ in 0..5 {
            let due = t.node.poll_timeout().expect("a retry is scheduled");
            assert!(t.tick(at(due - 1)).is_empty(), "not before it is due");
            let a = t.tick(at(due)).to_vec();
            assert_eq!(deliveries(&a), vec![(2, 3, true)]);
            gaps.push(due - last);
            last = due;
        }
        // 100, 200, 400, 400, 400 ms, each jittered down by at most half.
        for (gap, base) in gaps.iter().zip([100, 200, 400, 400, 400]) {
            assert!(*gap >= base / 2 && *gap <= base, "{gaps:?}");
        }
    }

    #[test]
    fn expiry_releases_and_tells_the_sender() {
        let mut t = T::new();
        t.up(at(0), 1, 1);
        let b = batch(1, 2, Lane::Normal, &[(true, 1)]);
        let logs = tokens(t.send(at(0), 1, &b));
        t.logged(at(0), &[(logs[0].0, Ok(3))]);
        assert!(t.tick(at(9_999)).is_empty());
        let a = t.tick(at(10_000)).to_vec();
        assert_eq!(
            a[0],
            Action::DurableRelease {
                seq: 3,
                expired: true
            }
        );
        assert_eq!(acks(&a), vec![(1, DurableStatus::Expired, vec![logs[0].1])]);
        assert_eq!(t.node.durable().queued(), 0);
    }

    #[test]
    fn a_full_log_refuses_durable_while_best_effort_flows() {
        let mut t = T::new();
        t.up(at(0), 1, 1);
        t.up(at(0), 2, 2);
        let b = batch(1, 2, Lane::Normal, &[(true, 1), (false, 2)]);
        let a = t.send(at(0), 1, &b).to_vec();
        let logs = tokens(&a);
        assert!(
            a.iter().any(|a| matches!(a, Action::Deliver { to: 2, .. })),
            "the best-effort message goes at once: {a:?}"
        );
        let a = t
            .logged(at(1), &[(logs[0].0, Err(LogRefusal::Full))])
            .to_vec();
        assert_eq!(acks(&a), vec![(1, DurableStatus::Full, vec![logs[0].1])]);
        assert!(a.iter().any(|a| matches!(
            a,
            Action::DurableRefused {
                status: DurableStatus::Full,
                ..
            }
        )));
        assert!(deliveries(&a).is_empty());
        // Refused, not stored: the sender may try again, and it is logged.
        assert_eq!(tokens(t.send(at(2), 1, &b)).len(), 1);
    }

    #[test]
    fn too_many_appends_in_flight_are_refused_as_full() {
        let mut t = T::new();
        t.up(at(0), 1, 1);
        let msgs: Vec<(bool, u64)> = (0..6).map(|n| (true, n)).collect();
        let a = t.send(at(0), 1, &batch(1, 2, Lane::Normal, &msgs)).to_vec();
        assert_eq!(tokens(&a).len(), 4);
        let refused: Vec<_> = acks(&a);
        assert_eq!(refused.len(), 1);
        assert_eq!(refused[0].1, DurableStatus::Full);
        assert_eq!(refused[0].2.len(), 2);
    }

    #[test]
    fn a_recovered_message_goes_to_its_cell_on_attach() {
        let mut t = T::new();
        let b = batch(1, 2, Lane::Normal, &[(true, 1)]);
        assert!(t.node.durable_recovered(at(0), 40, &b.1[0], T0 + 10_000));
        assert!(
            !t.node.durable_recovered(at(0), 41, &b.1[0], T0 + 10_000),
            "a duplicate"
        );
        let a = t.up(at(1), 2, 2).to_vec();
        assert_eq!(deliveries(&a), vec![(2, 40, true)]);
    }
}
