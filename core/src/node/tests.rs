//! Every rule of the node, each through its events and actions alone.

use super::test_support::*;
use super::*;
use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use relay_codec::{BatchDecoder, BatchEncoder, Lane, Message, ServiceName};

fn svc(s: &str) -> ServiceName {
    ServiceName::new(s).unwrap()
}

/// A message from cell `from` to `dest`, stamped `now`, unique by `nonce`.
fn msg(from: u8, dest: Destination, now: Now, nonce: u64) -> Message {
    Message::new(key(from), dest, Bytes::from(vec![7u8; 16]))
        .with_timestamp(now.unix_ms)
        .with_nonce(nonce)
}

fn to(i: u8) -> Destination {
    Destination::Cell(key(i))
}

/// Encodes `msgs`, each signed by `signer` (its source's key unless the
/// test wants a bad signature), and decodes the batch as a relay reads it.
fn encode(msgs: &[(Message, u8)]) -> (BatchFrame, Vec<Envelope>) {
    let mut enc = BatchEncoder::new(1, usize::MAX).unwrap();
    for (m, signer) in msgs {
        enc.push_signed(m, &kp(*signer));
    }
    let mut out = BytesMut::new();
    enc.finish(Lane::Normal, &mut out);
    let limits = Limits {
        max_frame: 64 << 20,
        max_payload: 16 << 20,
        ..Limits::default()
    };
    let Frame::Batch(b) = Frame::decode(out.freeze(), &limits).unwrap() else {
        panic!("not a batch");
    };
    let envs = decode(&b, &limits);
    (b, envs)
}

fn decode(b: &BatchFrame, limits: &Limits) -> Vec<Envelope> {
    let mut dec = BatchDecoder::new(*limits).unwrap();
    dec.messages(b).unwrap().map(Result::unwrap).collect()
}

/// A node whose handles are the link ids themselves, and its action buffer.
struct Relay {
    node: Node<LinkId>,
    out: Vec<Action<LinkId>>,
    nonce: u64,
}

impl Relay {
    fn new(cfg: NodeConfig) -> Self {
        Self::seeded(cfg, 42)
    }

    fn seeded(cfg: NodeConfig, seed: u64) -> Self {
        Self {
            node: Node::new(cfg, seed).unwrap(),
            out: Vec::new(),
            nonce: 0,
        }
    }

    fn standard() -> Self {
        Self::new(NodeConfig::new(key(200)))
    }

    fn up(&mut self, now: Now, link: LinkId, info: LinkInfo) -> Admission {
        self.out.clear();
        self.node.link_up(now, link, link, info, &mut self.out)
    }

    /// Links `link` as cell `i` and forgets its Welcome.
    fn cell(&mut self, link: LinkId, i: u8) {
        assert_eq!(self.up(at(0), link, cell(i)), Admission::Admitted);
    }

    fn down(&mut self, now: Now, link: LinkId) -> Option<Departed> {
        self.out.clear();
        self.node.link_down(now, link, &mut self.out)
    }

    /// Sends messages signed by their sources as one batch on `link`.
    fn send(&mut self, now: Now, link: LinkId, msgs: Vec<Message>) -> &[Action<LinkId>] {
        let signed: Vec<(Message, u8)> = msgs
            .into_iter()
            .map(|m| {
                let signer = (1..=255).find(|&i| key(i) == m.source).unwrap_or(1);
                (m, signer)
            })
            .collect();
        self.send_signed(now, link, &signed)
    }

    fn send_signed(&mut self, now: Now, link: LinkId, msgs: &[(Message, u8)]) -> &[Action<LinkId>] {
        let (b, envs) = encode(msgs);
        self.out.clear();
        self.node.batch(now, link, &envs, &b, &mut self.out);
        &self.out
    }

    /// `n` messages from cell `from` to `dest`, each new.
    fn msgs(&mut self, from: u8, dest: Destination, now: Now, n: usize) -> Vec<Message> {
        (0..n)
            .map(|_| {
                self.nonce += 1;
                msg(from, dest.clone(), now, self.nonce)
            })
            .collect()
    }

    fn control(&mut self, now: Now, link: LinkId, frame: Frame) -> &[Action<LinkId>] {
        self.out.clear();
        self.node.control(now, link, frame, &mut self.out);
        &self.out
    }

    fn tick(&mut self, now: Now) -> &[Action<LinkId>] {
        self.out.clear();
        self.node.tick(now, &mut self.out);
        &self.out
    }
}

fn dropped(actions: &[Action<LinkId>], reason: DropReason) -> u64 {
    actions
        .iter()
        .map(|a| match a {
            Action::Drop { reason: r, count } if *r == reason => *count,
            _ => 0,
        })
        .sum()
}

fn all_dropped(actions: &[Action<LinkId>]) -> u64 {
    actions
        .iter()
        .map(|a| match a {
            Action::Drop { count, .. } => *count,
            _ => 0,
        })
        .sum()
}

/// (receiver, index, TTL) of every Deliver, in order.
fn delivers(actions: &[Action<LinkId>]) -> Vec<(LinkId, u32, u8)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Deliver { to, index, env, .. } => Some((*to, *index, env.ttl())),
            _ => None,
        })
        .collect()
}

fn forwards(actions: &[Action<LinkId>]) -> Vec<(LinkId, &BatchFrame)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Forward { to, batch, .. } => Some((*to, batch)),
            _ => None,
        })
        .collect()
}

/// (link, code, why) of every Close.
fn closes(actions: &[Action<LinkId>]) -> Vec<(LinkId, CloseCode, CloseReason)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Close {
                link, code, why, ..
            } => Some((*link, *code, *why)),
            _ => None,
        })
        .collect()
}

/// The control frames sent to `link`, in order.
fn frames_to(actions: &[Action<LinkId>], link: LinkId) -> Vec<&Frame> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Control { to, frame } if *to == link => Some(frame),
            _ => None,
        })
        .collect()
}

/// (code, count, subject) of every notice to `link`.
fn notices_to(actions: &[Action<LinkId>], link: LinkId) -> Vec<(NoticeCode, u32, PublicKey)> {
    frames_to(actions, link)
        .into_iter()
        .filter_map(|f| match f {
            Frame::Notice {
                code,
                count,
                subject,
                ..
            } => Some((*code, *count, *subject)),
            _ => None,
        })
        .collect()
}

/// (watcher, up, key) of every presence report, in order.
fn presence(actions: &[Action<LinkId>]) -> Vec<(LinkId, bool, PublicKey)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Control {
                to,
                frame: Frame::Presence { up, info },
            } => Some((*to, *up, info.key)),
            _ => None,
        })
        .collect()
}

fn pauses(actions: &[Action<LinkId>]) -> Vec<LinkId> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::MayPause { link, .. } => Some(*link),
            _ => None,
        })
        .collect()
}

// ---- source ----

#[test]
fn a_cell_that_sends_as_another_is_closed_and_its_batch_refused() {
    let mut r = Relay::standard();
    r.cell(1, 1);
    r.cell(2, 2);
    let mut msgs = r.msgs(1, to(2), at(0), 3);
    // The third claims to be from cell 2, and is even signed by it.
    msgs.push(msg(2, to(2), at(0), 99));
    let a = r.send(at(0), 1, msgs).to_vec();
    assert_eq!(dropped(&a, DropReason::ForgedSource), 4, "the whole batch");
    assert_eq!(
        closes(&a),
        vec![(1, CloseCode::ForgedSource, CloseReason::ForgedSource)]
    );
    assert!(delivers(&a).is_empty() && forwards(&a).is_empty());
    let Action::Close { reason, .. } = a.last().unwrap() else {
        panic!()
    };
    assert!(reason.contains(&key(2).to_string()), "{reason}");
    // As itself, it passes.
    let ok = r.msgs(1, to(2), at(0), 2);
    assert_eq!(forwards(r.send(at(0), 1, ok)).len(), 1);
}

// ---- signatures ----

fn verifying(verify: Verify) -> Relay {
    Relay::new(NodeConfig {
        verify,
        ..NodeConfig::new(key(200))
    })
}

#[test]
fn with_verify_off_a_bad_signature_passes() {
    let mut r = verifying(Verify::Off);
    r.cell(1, 1);
    r.cell(2, 2);
    let bad = vec![(msg(1, to(2), at(0), 1), 9)];
    let a = r.send_signed(at(0), 1, &bad).to_vec();
    assert_eq!(forwards(&a).len(), 1);
    assert!(!a.iter().any(|a| matches!(a, Action::Verified { .. })));
}

#[test]
fn with_verify_all_each_bad_signature_is_dropped_and_noticed_and_the_link_stays() {
    let mut r = verifying(Verify::All);
    r.cell(1, 1);
    r.cell(2, 2);
    let batch = vec![
        (msg(1, to(2), at(0), 1), 1),
        (msg(1, to(2), at(0), 2), 9),
        (msg(1, to(2), at(0), 3), 1),
    ];
    let a = r.send_signed(at(0), 1, &batch).to_vec();
    assert!(a.contains(&Action::Verified { checked: 3, bad: 1 }));
    assert_eq!(dropped(&a, DropReason::BadSignature), 1);
    assert!(a.contains(&Action::BadSignatures {
        link: 1,
        key: key(1),
        count: 1
    }));
    assert_eq!(delivers(&a), vec![(2, 0, 15), (2, 2, 15)], "not whole");
    assert_eq!(
        notices_to(&a, 1),
        vec![(NoticeCode::BadSignature, 1, key(2))]
    );
    assert!(closes(&a).is_empty());
}

#[test]
fn with_verify_sampled_a_failed_sample_closes_the_link() {
    let mut r = verifying(Verify::Sampled { rate: 1.0 });
    r.cell(1, 1);
    r.cell(2, 2);
    let good = r.msgs(1, to(2), at(0), 3);
    let a = r.send(at(0), 1, good).to_vec();
    assert!(a.contains(&Action::Verified { checked: 3, bad: 0 }));
    assert_eq!(forwards(&a).len(), 1);
    let batch = vec![(msg(1, to(2), at(0), 10), 1), (msg(1, to(2), at(0), 11), 9)];
    let a = r.send_signed(at(0), 1, &batch).to_vec();
    assert_eq!(dropped(&a, DropReason::BadSignature), 2, "the whole batch");
    assert!(a.contains(&Action::Verified { checked: 2, bad: 1 }));
    assert_eq!(
        closes(&a),
        vec![(1, CloseCode::BadSignature, CloseReason::BadSignature)]
    );
    assert!(delivers(&a).is_empty() && forwards(&a).is_empty());
}

#[test]
fn with_verify_sampled_about_the_rate_is_checked() {
    let mut r = verifying(Verify::Sampled { rate: 0.25 });
    r.cell(1, 1);
    r.cell(2, 2);
    let mut checked = 0;
    for k in 0..40 {
        let m = r.msgs(1, to(2), at(k), 10);
        for a in r.send(at(k), 1, m) {
            if let Action::Verified { checked: c, .. } = a {
                checked += c;
            }
        }
    }
    // 400 draws at 1/4: 100 expected; far outside 50..150 is a broken draw.
    assert!((50..150).contains(&checked), "{checked} of 400 checked");
}

// ---- TTL ----

#[test]
fn ttl_0_is_dropped_and_noticed_and_the_rest_leave_one_lower() {
    let mut r = Relay::standard();
    r.cell(1, 1);
    r.cell(2, 2);
    let mut m = r.msgs(1, to(2), at(0), 2);
    m[0] = m[0].clone().with_ttl(0);
    m[1] = m[1].clone().with_ttl(5);
    let a = r.send(at(0), 1, m).to_vec();
    assert_eq!(dropped(&a, DropReason::TtlExpired), 1);
    assert_eq!(notices_to(&a, 1), vec![(NoticeCode::TtlExpired, 1, key(2))]);
    assert_eq!(delivers(&a), vec![(2, 1, 4)], "split, lowered by one");
}

#[test]
fn a_batch_forwarded_whole_gets_one_more_hop_and_every_ttl_one_lower() {
    let mut r = Relay::standard();
    r.cell(1, 1);
    r.cell(2, 2);
    let m: Vec<Message> = r
        .msgs(1, to(2), at(0), 3)
        .into_iter()
        .zip([16, 3, 1])
        .map(|(m, t)| m.with_ttl(t))
        .collect();
    let a = r.send(at(0), 1, m).to_vec();
    let f = forwards(&a);
    assert_eq!(f.len(), 1);
    let (to, b) = f[0];
    assert_eq!((to, b.hops, b.count), (2, 1, 3));
    let ttls: Vec<u8> = decode(b, &Limits::default())
        .iter()
        .map(Envelope::ttl)
        .collect();
    assert_eq!(ttls, [15, 2, 0]);
}

// ---- freshness ----

#[test]
fn timestamps_outside_the_window_are_dropped_and_noticed() {
    let mut r = Relay::standard();
    r.cell(1, 1);
    r.cell(2, 2);
    let now = at(1_000_000);
    let w = r.node.config().freshness;
    let stamp = |m: Message, unix: u64| m.with_timestamp(unix);
    let m = r.msgs(1, to(2), now, 4);
    let m = vec![
        stamp(m[0].clone(), now.unix_ms - w.past_ms),
        stamp(m[1].clone(), now.unix_ms - w.past_ms - 1),
        stamp(m[2].clone(), now.unix_ms + w.future_ms),
        stamp(m[3].clone(), now.unix_ms + w.future_ms + 1),
    ];
    let a = r.send(now, 1, m).to_vec();
    assert_eq!(dropped(&a, DropReason::Expired), 1);
    assert_eq!(dropped(&a, DropReason::FromFuture), 1);
    assert_eq!(delivers(&a), vec![(2, 0, 15), (2, 2, 15)]);
    assert_eq!(
        notices_to(&a, 1),
        vec![
            (NoticeCode::Expired, 1, key(2)),
            (NoticeCode::FromFuture, 1, key(2))
        ]
    );
    assert!(a.contains(&Action::Refused {
        link: 1,
        key: key(1),
        count: 2
    }));
}

// ---- dedup ----

#[test]
fn a_replayed_batch_is_dropped_without_a_notice() {
    let mut r = Relay::standard();
    r.cell(1, 1);
    r.cell(2, 2);
    let m = r.msgs(1, to(2), at(0), 3);
    assert_eq!(forwards(r.send(at(0), 1, m.clone())).len(), 1);
    let a = r.send(at(10), 1, m).to_vec();
    assert_eq!(dropped(&a, DropReason::Duplicate), 3);
    assert!(delivers(&a).is_empty() && forwards(&a).is_empty());
    assert!(notices_to(&a, 1).is_empty(), "a duplicate is not noticed");
    assert!(a.contains(&Action::Refused {
        link: 1,
        key: key(1),
        count: 3
    }));
}

// ---- routing ----

#[test]
fn cell_messages_go_to_their_cell_and_unknown_ones_are_dropped_and_noticed() {
    let mut r = Relay::standard();
    r.cell(1, 1);
    r.cell(2, 2);
    r.cell(3, 3);
    let mut m = r.msgs(1, to(2), at(0), 1);
    m.extend(r.msgs(1, to(3), at(0), 1));
    m.extend(r.msgs(1, to(9), at(0), 2));
    m.extend(r.msgs(1, to(2), at(0), 1));
    let a = r.send(at(0), 1, m).to_vec();
    // Cell 3's message is queued in order; cell 2's (the first receiver)
    // after, held back in case the batch could go whole.
    assert_eq!(delivers(&a), vec![(3, 1, 15), (2, 0, 15), (2, 4, 15)]);
    assert_eq!(dropped(&a, DropReason::UnknownDestination), 2);
    assert_eq!(
        notices_to(&a, 1),
        vec![(NoticeCode::UnknownDestination, 2, key(9))]
    );
    assert_eq!(pauses(&a), vec![2, 3], "each cell receiver once");
}

#[test]
fn broadcast_goes_to_every_other_cell_in_key_order_and_never_pauses() {
    let mut r = Relay::standard();
    let mut order: Vec<(PublicKey, LinkId)> = (1..=4).map(|i| (key(i), u64::from(i))).collect();
    for (_, l) in &order {
        r.cell(*l, *l as u8);
    }
    let m = r.msgs(1, Destination::Broadcast, at(0), 1);
    let a = r.send(at(0), 1, m).to_vec();
    order.sort();
    let expect: Vec<(LinkId, u32, u8)> = order
        .iter()
        .filter(|(_, l)| *l != 1)
        .map(|(_, l)| (*l, 0, 15))
        .collect();
    assert_eq!(delivers(&a), expect);
    assert!(pauses(&a).is_empty());
}

#[test]
fn service_messages_go_to_its_members_but_the_sender() {
    let mut r = Relay::standard();
    for i in 1..=4 {
        r.cell(u64::from(i), i);
    }
    for l in [1, 3, 4] {
        r.control(
            at(0),
            l,
            Frame::Announce {
                app_version: "1".into(),
                services: vec![svc("chat")],
            },
        );
    }
    let m = r.msgs(1, Destination::Service(svc("chat")), at(0), 1);
    let a = r.send(at(0), 1, m).to_vec();
    let mut to: Vec<LinkId> = delivers(&a).iter().map(|d| d.0).collect();
    to.sort();
    assert_eq!(to, vec![3, 4]);
    assert!(pauses(&a).is_empty());
}

// ---- forwarding whole ----

#[test]
fn a_batch_goes_whole_only_when_every_message_passes_to_one_cell() {
    let mut r = Relay::standard();
    r.cell(1, 1);
    r.cell(2, 2);
    r.cell(3, 3);
    let m = r.msgs(1, to(2), at(0), 4);
    let (_, envs) = encode(&[(m[0].clone(), 1)]);
    let a = r.send(at(0), 1, m).to_vec();
    assert_eq!(forwards(&a).len(), 1);
    assert!(delivers(&a).is_empty());
    let Action::Forward { first, .. } = &a[0] else {
        panic!("{a:?}")
    };
    assert_eq!(*first, envs[0].id());
    assert_eq!(pauses(&a), vec![2]);
    // One message dropped: the rest go one by one.
    let mut m = r.msgs(1, to(2), at(0), 3);
    m.push(r.msgs(1, to(2), at(0), 1)[0].clone().with_ttl(0));
    let a = r.send(at(0), 1, m).to_vec();
    assert!(forwards(&a).is_empty());
    assert_eq!(delivers(&a).len(), 3);
    // Two receivers: one by one.
    let mut m = r.msgs(1, to(2), at(0), 2);
    m.extend(r.msgs(1, to(3), at(0), 2));
    let a = r.send(at(0), 1, m).to_vec();
    assert!(forwards(&a).is_empty());
    assert_eq!(delivers(&a).len(), 4);
}

#[test]
fn a_batch_larger_than_a_cell_accepts_goes_message_by_message() {
    let mut r = Relay::standard();
    r.cell(1, 1);
    r.cell(2, 2);
    let mib = |nonces: std::ops::Range<u64>| -> Vec<Message> {
        let payload = Bytes::from(vec![1u8; 1 << 20]);
        nonces
            .map(|n| {
                Message::new(key(1), to(2), payload.clone())
                    .with_timestamp(T0)
                    .with_nonce(n)
            })
            .collect()
    };
    // Five messages of 1 MiB: the batch is over FORWARD_WHOLE_MAX.
    let a = r.send(at(0), 1, mib(0..5)).to_vec();
    assert!(forwards(&a).is_empty());
    assert_eq!(delivers(&a).len(), 5);
    // Three fit.
    assert_eq!(forwards(r.send(at(0), 1, mib(10..13))).len(), 1);
}

// ---- admission ----

#[test]
fn a_link_is_welcomed_first() {
    let mut r = Relay::standard();
    assert_eq!(r.up(at(5), 1, cell(1)), Admission::Admitted);
    let Action::Control {
        to: 1,
        frame:
            Frame::Welcome {
                version,
                node,
                time_ms,
                max_payload,
                max_frame,
            },
    } = &r.out[0]
    else {
        panic!("{:?}", r.out)
    };
    assert_eq!(
        (*version, *node, *time_ms, *max_payload, *max_frame),
        (
            PROTOCOL_VERSION,
            key(200),
            T0 + 5,
            Limits::default().max_payload as u32,
            Limits::default().max_frame as u32
        )
    );
}

fn refused(a: Admission) -> (CloseCode, String) {
    match a {
        Admission::Refused { code, reason } => (code, reason),
        Admission::Admitted => panic!("admitted"),
    }
}

#[test]
fn a_wrong_version_a_relay_and_a_shutting_down_relay_are_refused() {
    let mut r = Relay::standard();
    let (code, reason) = refused(r.up(
        at(0),
        1,
        LinkInfo {
            version: PROTOCOL_VERSION + 1,
            ..cell(1)
        },
    ));
    assert_eq!(code, CloseCode::Version);
    assert!(reason.contains(&format!("version {}", PROTOCOL_VERSION + 1)));
    let (code, reason) = refused(r.up(
        at(0),
        2,
        LinkInfo {
            role: Role::Relay,
            ..cell(2)
        },
    ));
    assert_eq!(code, CloseCode::Unauthorized);
    assert!(reason.contains("relay peering is not enabled"), "{reason}");
    r.node.shut_down(at(0));
    assert_eq!(refused(r.up(at(0), 3, cell(3))).0, CloseCode::Shutdown);
    assert!(r.out.is_empty());
    assert_eq!(r.node.links(), 0, "nothing kept of refused links");
}

#[test]
fn max_links_is_enforced_until_a_link_goes_down() {
    let mut r = Relay::new(NodeConfig {
        max_links: 2,
        ..NodeConfig::new(key(200))
    });
    r.cell(1, 1);
    r.cell(2, 2);
    let (code, reason) = refused(r.up(at(0), 3, cell(3)));
    assert_eq!(code, CloseCode::TooManyLinks);
    assert!(reason.contains("limits.max_links"), "{reason}");
    assert_eq!(dropped(&r.out, DropReason::TooManyLinks), 1);
    r.down(at(1), 2);
    r.cell(3, 3);
}

#[test]
fn a_reconnecting_cell_replaces_its_older_link() {
    let mut r = Relay::standard();
    r.cell(1, 1);
    r.cell(2, 2);
    assert_eq!(r.up(at(0), 3, cell(2)), Admission::Admitted);
    assert_eq!(
        closes(&r.out),
        vec![(2, CloseCode::Normal, CloseReason::Replaced)]
    );
    let m = r.msgs(1, to(2), at(0), 1);
    assert_eq!(forwards(r.send(at(0), 1, m))[0].0, 3);
    // The old link's end does not detach the new one.
    let gone = r.down(at(1), 2).unwrap();
    assert_eq!(gone.closed_by_node, Some(CloseReason::Replaced));
    let m = r.msgs(1, to(2), at(0), 1);
    assert_eq!(forwards(r.send(at(0), 1, m))[0].0, 3);
    assert_eq!(r.node.links(), 2);
}

// ---- control ----

#[test]
fn an_announce_over_the_limit_closes_the_link() {
    let mut r = Relay::new(NodeConfig {
        limits: Limits {
            max_services: 2,
            ..Limits::default()
        },
        ..NodeConfig::new(key(200))
    });
    r.cell(1, 1);
    let services = vec![svc("a"), svc("b"), svc("c")];
    let a = r
        .control(
            at(0),
            1,
            Frame::Announce {
                app_version: "1".into(),
                services,
            },
        )
        .to_vec();
    assert_eq!(
        closes(&a),
        vec![(1, CloseCode::Oversize, CloseReason::Oversize)]
    );
    let Action::Close { reason, .. } = &a[0] else {
        panic!()
    };
    assert_eq!(reason, "3 services announced; the limit is 2");
    assert!(r.node.router().discover(&svc("a"), 10).is_empty());
}

#[test]
fn discover_replies_with_the_members_in_key_order() {
    let mut r = Relay::standard();
    for i in [3u8, 1, 2] {
        r.cell(u64::from(i), i);
        r.control(
            at(0),
            u64::from(i),
            Frame::Announce {
                app_version: format!("v{i}"),
                services: vec![svc("chat")],
            },
        );
    }
    let a = r
        .control(
            at(0),
            1,
            Frame::Discover {
                request: 7,
                service: svc("chat"),
            },
        )
        .to_vec();
    let mut expect: Vec<(PublicKey, String)> = (1..=3).map(|i| (key(i), format!("v{i}"))).collect();
    expect.sort();
    assert_eq!(
        a,
        vec![Action::Control {
            to: 1,
            frame: Frame::DiscoverReply {
                request: 7,
                cells: expect
            }
        }]
    );
}

#[test]
fn watchers_hear_attach_announce_and_detach_in_link_order_but_not_of_themselves() {
    let mut r = Relay::standard();
    for w in [30, 10, 20] {
        r.cell(w, w as u8);
        r.control(at(0), w, Frame::WatchPresence(true));
    }
    assert_eq!(r.up(at(0), 5, cell(5)), Admission::Admitted);
    assert_eq!(
        presence(&r.out),
        vec![(10, true, key(5)), (20, true, key(5)), (30, true, key(5))]
    );
    let a = r
        .control(
            at(0),
            5,
            Frame::Announce {
                app_version: "1".into(),
                services: vec![],
            },
        )
        .to_vec();
    assert_eq!(presence(&a).len(), 3);
    // A watcher's own announcement is not reported to itself.
    let a = r
        .control(
            at(0),
            10,
            Frame::Announce {
                app_version: "1".into(),
                services: vec![],
            },
        )
        .to_vec();
    assert_eq!(presence(&a), vec![(20, true, key(10)), (30, true, key(10))]);
    r.control(at(0), 20, Frame::WatchPresence(false));
    r.down(at(0), 5);
    assert_eq!(
        presence(&r.out),
        vec![(10, false, key(5)), (30, false, key(5))]
    );
}

#[test]
fn an_unexpected_control_frame_closes_the_link_and_later_ones_are_ignored() {
    let mut r = Relay::standard();
    r.cell(1, 1);
    let a = r.control(at(0), 1, Frame::WatchPresence(true)).to_vec();
    assert!(a.is_empty());
    let a = r
        .control(
            at(0),
            1,
            Frame::Hello {
                version: 1,
                role: Role::Cell,
                notices: false,
                agent: String::new(),
            },
        )
        .to_vec();
    assert_eq!(
        closes(&a),
        vec![(1, CloseCode::Malformed, CloseReason::Malformed)]
    );
    assert!(r.control(at(0), 1, Frame::WatchPresence(false)).is_empty());
}

#[test]
fn a_protocol_error_is_counted_and_closes_the_link_once() {
    let mut r = Relay::standard();
    r.cell(1, 1);
    r.out.clear();
    r.node
        .protocol_error(at(0), 1, CloseCode::Oversize, "too big".into(), &mut r.out);
    assert_eq!(dropped(&r.out, DropReason::Oversize), 1);
    assert_eq!(
        closes(&r.out),
        vec![(1, CloseCode::Oversize, CloseReason::Oversize)]
    );
    r.out.clear();
    r.node
        .protocol_error(at(0), 1, CloseCode::Malformed, "bad".into(), &mut r.out);
    assert_eq!(dropped(&r.out, DropReason::Malformed), 1);
    assert!(closes(&r.out).is_empty(), "closed already");
}

#[test]
fn an_orderly_close_ends_with_every_pending_notice_then_close() {
    let mut r = Relay::standard();
    r.cell(1, 1);
    // One unknown-destination drop noticed at once, a second one pending
    // for the interval.
    for k in 0..2 {
        let m = r.msgs(1, to(9), at(k), 1);
        r.send(at(k), 1, m);
    }
    let a = r
        .control(
            at(2),
            1,
            Frame::Close {
                code: CloseCode::Normal,
                reason: "bye".into(),
            },
        )
        .to_vec();
    assert_eq!(
        a,
        vec![Action::PeerClosing {
            link: 1,
            code: CloseCode::Normal,
            reason: "bye".into()
        }]
    );
    r.out.clear();
    r.node.finish(at(3), 1, &mut r.out);
    let frames = frames_to(&r.out, 1);
    assert_eq!(frames.len(), 2);
    assert!(matches!(
        frames[0],
        Frame::Notice {
            code: NoticeCode::UnknownDestination,
            count: 1,
            ..
        }
    ));
    assert!(matches!(
        frames[1],
        Frame::Close {
            code: CloseCode::Normal,
            ..
        }
    ));
    assert_eq!(r.node.poll_timeout(), None);
    let gone = r.down(at(4), 1).unwrap();
    assert_eq!(gone.closed_by_node, Some(CloseReason::Normal));
}

// ---- what only the shell sees ----

#[test]
fn undelivered_messages_are_counted_and_noticed_by_why() {
    let mut r = Relay::standard();
    r.cell(1, 1);
    for (why, reason, code) in [
        (
            QueueRefusal::Full,
            DropReason::SlowReceiver,
            NoticeCode::DroppedSlowReceiver,
        ),
        (
            QueueRefusal::Closed,
            DropReason::Shutdown,
            NoticeCode::ReceiverClosing,
        ),
    ] {
        r.out.clear();
        let u = Undelivered {
            from: 1,
            to: key(2),
            why,
            first: MessageId([1; 16]),
            count: 5,
        };
        r.node.undelivered(at(0), u, &mut r.out);
        assert_eq!(dropped(&r.out, reason), 5);
        assert_eq!(notices_to(&r.out, 1), vec![(code, 5, key(2))]);
    }
    // From a link gone: counted only.
    r.down(at(0), 1);
    r.out.clear();
    let u = Undelivered {
        from: 1,
        to: key(2),
        why: QueueRefusal::Full,
        first: MessageId([1; 16]),
        count: 2,
    };
    r.node.undelivered(at(0), u, &mut r.out);
    assert_eq!(
        r.out,
        vec![Action::Drop {
            reason: DropReason::SlowReceiver,
            count: 2
        }]
    );
}

#[test]
fn a_link_that_did_not_ask_for_notices_gets_none() {
    let mut r = Relay::standard();
    assert_eq!(
        r.up(
            at(0),
            1,
            LinkInfo {
                notices: false,
                ..cell(1)
            }
        ),
        Admission::Admitted
    );
    let m = r.msgs(1, to(9), at(0), 3);
    let a = r.send(at(0), 1, m).to_vec();
    assert_eq!(dropped(&a, DropReason::UnknownDestination), 3);
    assert!(notices_to(&a, 1).is_empty());
    assert_eq!(r.node.poll_timeout(), None);
}

// ---- notices ----

#[test]
fn a_flood_of_drops_yields_a_notice_per_interval_whose_counts_add_up() {
    let mut r = Relay::standard();
    r.cell(1, 1);
    let interval = r.node.config().notice_interval_ms;
    let mut noticed = 0u64;
    let mut sent = 0;
    let mut t = 0;
    // 2 000 messages to a cell that is not there, one batch per ms, the
    // shell ticking whenever the node asks.
    for _ in 0..1_000 {
        if r.node.poll_timeout().is_some_and(|due| due <= t) {
            let a = r.tick(at(t)).to_vec();
            for (_, c, _) in notices_to(&a, 1) {
                noticed += u64::from(c);
                sent += 1;
            }
        }
        let m = r.msgs(1, to(9), at(t), 2);
        for (_, c, _) in notices_to(r.send(at(t), 1, m), 1) {
            noticed += u64::from(c);
            sent += 1;
        }
        assert!(r.node.poll_timeout().is_none_or(|due| due <= t + interval));
        t += 1;
    }
    r.out.clear();
    r.node.finish(at(t), 1, &mut r.out);
    for (_, c, _) in notices_to(&r.out, 1) {
        noticed += u64::from(c);
        sent += 1;
    }
    assert_eq!(noticed, 2_000);
    // 1 s at one per 100 ms: the first at once, ten after, the rest at the end.
    assert!(sent <= 12, "{sent} notices");
}

// ---- stalls ----

#[test]
fn a_sender_may_wait_only_for_a_receiver_that_drains_and_only_if_pauses_are_on() {
    let mut r = Relay::standard();
    r.cell(2, 2);
    assert!(r.node.may_wait(at(0), 2, 0));
    assert!(!r.node.may_wait(at(crate::STUCK_AFTER_MS), 2, 0), "stuck");
    assert!(r.node.may_wait(at(crate::STUCK_AFTER_MS), 2, 1));
    assert!(!r.node.may_wait(at(0), 3, 0), "not up");
    let mut off = Relay::new(NodeConfig {
        max_stall_ms: 0,
        ..NodeConfig::new(key(200))
    });
    off.cell(2, 2);
    assert!(!off.node.may_wait(at(0), 2, 0));
}

// ---- release ----

#[test]
fn link_down_releases_its_route_watch_notices_and_slot() {
    let mut r = Relay::new(NodeConfig {
        max_links: 2,
        ..NodeConfig::new(key(200))
    });
    r.cell(1, 1);
    r.cell(2, 2);
    r.control(at(0), 2, Frame::WatchPresence(true));
    // A pending notice for link 2.
    for k in 0..2 {
        let m = r.msgs(2, to(9), at(k), 1);
        r.send(at(k), 2, m);
    }
    assert!(r.node.poll_timeout().is_some());
    let gone = r.down(at(2), 2).unwrap();
    assert_eq!((gone.key, gone.closed_by_node), (key(2), None));
    assert_eq!(r.node.poll_timeout(), None, "its timer went");
    assert!(r.tick(at(1_000)).is_empty(), "and its notices");
    let m = r.msgs(1, to(2), at(3), 1);
    assert_eq!(
        dropped(r.send(at(3), 1, m), DropReason::UnknownDestination),
        1
    );
    // Not a watcher any more; and its slot is free.
    r.cell(3, 3);
    assert!(presence(&r.out).is_empty());
    assert!(r.down(at(4), 2).is_none(), "down once");
    assert!(r.node.router().get(&key(2)).is_none());
}

#[test]
fn close_all_closes_each_open_link_once() {
    let mut r = Relay::standard();
    r.cell(1, 1);
    r.cell(2, 2);
    r.out.clear();
    r.node
        .protocol_error(at(0), 1, CloseCode::Malformed, "x".into(), &mut r.out);
    r.node.shut_down(at(0));
    r.out.clear();
    r.node.close_all(at(0), &mut r.out);
    assert_eq!(
        closes(&r.out),
        vec![(2, CloseCode::Shutdown, CloseReason::Shutdown)]
    );
}

#[test]
fn a_config_no_node_can_run_with_is_refused() {
    let base = NodeConfig::new(key(1));
    let err = |cfg| Node::<u64>::new(cfg, 0).err();
    assert_eq!(
        err(NodeConfig {
            dedup_capacity: 0,
            ..base.clone()
        }),
        Some(NodeConfigError::DedupCapacity)
    );
    assert_eq!(
        err(NodeConfig {
            max_links: 0,
            ..base.clone()
        }),
        Some(NodeConfigError::MaxLinks)
    );
    for rate in [0.0, 1.5, f64::NAN] {
        assert!(matches!(
            err(NodeConfig {
                verify: Verify::Sampled { rate },
                ..base.clone()
            }),
            Some(NodeConfigError::SampleRate(_))
        ));
    }
    assert_eq!(err(base), None);
}

#[test]
fn drop_reasons_index_their_own_counters() {
    for (i, r) in DropReason::ALL.into_iter().enumerate() {
        assert_eq!(r as usize, i);
    }
}

// ---- determinism ----

/// A run with broadcasts, presence, sampled checks and notices, as the
/// Debug text of every action.
fn scripted_run(seed: u64) -> String {
    let mut r = Relay::seeded(
        NodeConfig {
            verify: Verify::Sampled { rate: 0.5 },
            ..NodeConfig::new(key(200))
        },
        seed,
    );
    let mut log = Vec::new();
    for (l, i) in [(4, 9), (1, 3), (3, 1), (2, 7)] {
        let _ = r.up(at(0), l, cell(i));
        log.append(&mut r.out);
        log.extend(r.control(at(0), l, Frame::WatchPresence(true)).to_vec());
    }
    for t in 1..50u64 {
        let from = [9, 3, 1, 7][t as usize % 4];
        let link = [4, 1, 3, 2][t as usize % 4];
        let dests = [to(3), Destination::Broadcast, to(42), to(1)];
        let mut m = Vec::new();
        for (k, d) in dests.iter().enumerate() {
            m.extend(r.msgs(from, d.clone(), at(t), 1 + k % 2));
        }
        log.extend(r.send(at(t), link, m).to_vec());
        log.extend(r.tick(at(t)).to_vec());
    }
    let _ = r.down(at(60), 3);
    log.append(&mut r.out);
    format!("{log:?}")
}

#[test]
fn the_same_seed_and_events_give_the_same_actions() {
    let a = scripted_run(7);
    assert_eq!(a, scripted_run(7));
    assert!(a.contains("Presence") && a.contains("Notice") && a.contains("Verified"));
    // The seed is what decides: another one samples other messages.
    assert_ne!(a, scripted_run(8));
}

// ---- random event sequences ----

#[derive(Clone, Debug)]
struct M {
    /// 0..4: cell 1..=4; 4: a cell never linked; 5: broadcast.
    dest: u8,
    ttl: u8,
    /// 0 fresh; 1 expired; 2 from the future.
    stamp: u8,
    forged: bool,
    bad_signature: bool,
    /// Resend the n-th message sent so far instead (a replay).
    replay: Option<usize>,
}

#[derive(Clone, Debug)]
enum Op {
    Up {
        slot: u8,
        cell: u8,
        notices: bool,
        version_ok: bool,
    },
    Down {
        slot: u8,
    },
    Batch {
        slot: u8,
        msgs: Vec<M>,
    },
    Watch {
        slot: u8,
        on: bool,
    },
    Announce {
        slot: u8,
        services: u8,
    },
    Close {
        slot: u8,
    },
    Full {
        slot: u8,
        count: u8,
    },
    Garbage {
        slot: u8,
    },
    Tick {
        ms: u16,
    },
}

fn m_strategy() -> impl Strategy<Value = M> {
    (
        0u8..6,
        prop_oneof![8 => Just(16u8), 1 => Just(0u8), 1 => Just(1u8)],
        prop_oneof![8 => Just(0u8), 1 => Just(1u8), 1 => Just(2u8)],
        prop::bool::weighted(0.03),
        prop::bool::weighted(0.1),
        prop::option::weighted(0.1, 0usize..1_000),
    )
        .prop_map(|(dest, ttl, stamp, forged, bad_signature, replay)| M {
            dest,
            ttl,
            stamp,
            forged,
            bad_signature,
            replay,
        })
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let slot = 0u8..6;
    prop_oneof![
        3 => (slot.clone(), 0u8..4, any::<bool>(), prop::bool::weighted(0.9)).prop_map(
            |(slot, cell, notices, version_ok)| Op::Up { slot, cell, notices, version_ok }
        ),
        1 => slot.clone().prop_map(|slot| Op::Down { slot }),
        6 => (slot.clone(), prop::collection::vec(m_strategy(), 1..8))
            .prop_map(|(slot, msgs)| Op::Batch { slot, msgs }),
        1 => (slot.clone(), any::<bool>()).prop_map(|(slot, on)| Op::Watch { slot, on }),
        1 => (slot.clone(), 0u8..4).prop_map(|(slot, services)| Op::Announce { slot, services }),
        1 => slot.clone().prop_map(|slot| Op::Close { slot }),
        1 => (slot.clone(), 1u8..4).prop_map(|(slot, count)| Op::Full { slot, count }),
        1 => slot.prop_map(|slot| Op::Garbage { slot }),
        2 => (0u16..400).prop_map(|ms| Op::Tick { ms }),
    ]
}

/// The links an action names.
fn named(a: &Action<LinkId>) -> Vec<LinkId> {
    match a {
        Action::Forward { to, .. }
        | Action::Deliver { to, .. }
        | Action::Control { to, .. }
        | Action::DurableDeliver { to, .. }
        | Action::DurableRead { to, .. } => vec![*to],
        Action::MayPause { link, to } | Action::Close { link, to, .. } => vec![*link, *to],
        Action::PeerClosing { link, .. }
        | Action::Refused { link, .. }
        | Action::BadSignatures { link, .. } => vec![*link],
        Action::Drop { .. }
        | Action::Verified { .. }
        | Action::DurableLog { .. }
        | Action::DurableRelease { .. }
        | Action::DurableRefused { .. } => vec![],
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn random_events_keep_the_node_consistent(
        seed in any::<u64>(),
        verify in prop_oneof![
            Just(Verify::Off),
            Just(Verify::All),
            Just(Verify::Sampled { rate: 0.5 })
        ],
        ops in prop::collection::vec(op_strategy(), 1..60),
    ) {
        let cfg = NodeConfig {
            max_links: 4,
            verify,
            freshness: FreshnessWindow::new(10_000, 1_000),
            dedup_window_ms: 10_000,
            dedup_capacity: 64,
            ..NodeConfig::new(key(200))
        };
        let mut node: Node<LinkId> = Node::new(cfg, seed).unwrap();
        let mut out = Vec::new();
        let mut slots: [Option<(LinkId, u8)>; 6] = [None; 6];
        let mut next_link: LinkId = 1;
        let mut sent: Vec<Message> = Vec::new();
        let mut t = 0u64;
        for op in ops {
            let now = at(t);
            // Every link up before the event, and the one it brings up.
            let mut up: Vec<LinkId> = slots.iter().flatten().map(|s| s.0).collect();
            up.retain(|l| node.is_up(*l));
            out.clear();
            match op {
                Op::Up { slot, cell: c, notices, version_ok } => {
                    let link = next_link;
                    next_link += 1;
                    let info = LinkInfo {
                        notices,
                        version: if version_ok { PROTOCOL_VERSION } else { 0 },
                        ..cell(c + 1)
                    };
                    up.push(link);
                    if node.link_up(now, link, link, info, &mut out) == Admission::Admitted {
                        if let Some((old, _)) = slots[slot as usize] {
                            let _ = node.link_down(now, old, &mut out);
                        }
                        slots[slot as usize] = Some((link, c + 1));
                    }
                }
                Op::Down { slot } => {
                    if let Some((link, _)) = slots[slot as usize].take() {
                        prop_assert!(node.link_down(now, link, &mut out).is_some());
                        prop_assert!(!node.is_up(link));
                    }
                }
                Op::Batch { slot, msgs } => {
                    let Some((link, me)) = slots[slot as usize] else { continue };
                    let others = node.router().len()
                        - usize::from(node.router().get(&key(me)).is_some());
                    let mut batch = Vec::new();
                    for m in &msgs {
                        let message = match m.replay.and_then(|i| sent.get(i % sent.len().max(1))) {
                            Some(old) if old.source == key(me) => old.clone(),
                            _ => {
                                let dest = match m.dest {
                                    d @ 0..4 => to(d + 1),
                                    4 => to(77),
                                    _ => Destination::Broadcast,
                                };
                                let from = if m.forged { 99 } else { me };
                                let stamp = match m.stamp {
                                    0 => now.unix_ms,
                                    1 => now.unix_ms - 20_000,
                                    _ => now.unix_ms + 5_000,
                                };
                                let new = msg(from, dest, now, sent.len() as u64)
                                    .with_ttl(m.ttl)
                                    .with_timestamp(stamp);
                                sent.push(new.clone());
                                new
                            }
                        };
                        let signer = if m.bad_signature { 98 } else if m.forged { 99 } else { me };
                        batch.push((message, signer));
                    }
                    let (b, envs) = encode(&batch);
                    node.batch(now, link, &envs, &b, &mut out);
                    // Every message is dropped or delivered (to at least
                    // one receiver), never both, unless a broadcast had no
                    // one to go to.
                    let dropped = all_dropped(&out);
                    let mut delivered: Vec<u32> = delivers(&out).iter().map(|d| d.1).collect();
                    delivered.sort();
                    delivered.dedup();
                    let whole: u64 = forwards(&out).iter().map(|f| u64::from(f.1.count)).sum();
                    let accounted = dropped + delivered.len() as u64 + whole;
                    let n = envs.len() as u64;
                    let has_broadcast = envs.iter().any(|e| e.destination() == Destination::Broadcast);
                    if others > 0 || !has_broadcast {
                        prop_assert_eq!(accounted, n, "{:?}", out);
                    } else {
                        prop_assert!(accounted <= n);
                    }
                }
                Op::Watch { slot, on } => {
                    if let Some((link, _)) = slots[slot as usize] {
                        node.control(now, link, Frame::WatchPresence(on), &mut out);
                    }
                }
                Op::Announce { slot, services } => {
                    if let Some((link, _)) = slots[slot as usize] {
                        let services = (0..services).map(|s| svc(&format!("s{s}"))).collect();
                        let frame = Frame::Announce { app_version: "1".into(), services };
                        node.control(now, link, frame, &mut out);
                    }
                }
                Op::Close { slot } => {
                    if let Some((link, _)) = slots[slot as usize] {
                        let frame = Frame::Close { code: CloseCode::Normal, reason: String::new() };
                        node.control(now, link, frame, &mut out);
                        node.finish(now, link, &mut out);
                    }
                }
                Op::Full { slot, count } => {
                    if let Some((link, _)) = slots[slot as usize] {
                        let u = Undelivered {
                            from: link,
                            to: key(3),
                            why: QueueRefusal::Full,
                            first: MessageId([0; 16]),
                            count: u64::from(count),
                        };
                        node.undelivered(now, u, &mut out);
                        prop_assert_eq!(dropped(&out, DropReason::SlowReceiver), u64::from(count));
                    }
                }
                Op::Garbage { slot } => {
                    if let Some((link, _)) = slots[slot as usize] {
                        node.protocol_error(now, link, CloseCode::Malformed, "x".into(), &mut out);
                    }
                }
                Op::Tick { ms } => {
                    t += u64::from(ms);
                    node.tick(at(t), &mut out);
                    prop_assert!(node.poll_timeout().is_none_or(|due| due > t));
                }
            }
            for a in &out {
                for l in named(a) {
                    prop_assert!(up.contains(&l), "{:?} names {} (up: {:?})", a, l, up);
                }
            }
            prop_assert!(node.links() <= 4);
            prop_assert!(node.router().len() <= node.links());
        }
    }
}
