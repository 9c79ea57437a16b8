//! The mesh rules of the node (crate::mesh), each through its events and
//! actions alone: admission of relay links, liveness, credit, link state,
//! the directory, forwarding and flooding, traces.

use super::test_support::{T0, at};
use super::*;
use crate::mesh::MeshConfig;
use bytes::{Bytes, BytesMut};
use relay_codec::{BatchDecoder, BatchEncoder, Lane, Location, MeshFrame, Message, RouteHeader};

fn key(i: u8) -> PublicKey {
    PublicKey([i; 32])
}

fn info(i: u8, role: Role) -> LinkInfo {
    LinkInfo {
        key: key(i),
        role,
        version: PROTOCOL_VERSION,
        notices: true,
    }
}

/// This relay is key 100; relays 101..=104 are trusted.
fn mesh_cfg() -> MeshConfig {
    MeshConfig {
        trusted_relays: (101..=104).map(key).collect(),
        max_peers: 3,
        ping_interval_ms: 100,
        peer_timeout_ms: 300,
        lane_credit: 8,
        ..MeshConfig::new()
    }
}

fn node() -> Node<LinkId> {
    node_with(mesh_cfg())
}

fn node_with(m: MeshConfig) -> Node<LinkId> {
    Node::new(NodeConfig::new(key(100)), 1)
        .unwrap()
        .with_mesh(m)
        .unwrap()
}

/// Unsigned messages (the node does not verify by default) as one batch
/// of `lane`.
fn batch(msgs: &[Message], lane: Lane) -> (BatchFrame, Vec<Envelope>) {
    let mut enc = BatchEncoder::new(1, usize::MAX).unwrap();
    for m in msgs {
        enc.push(m);
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

fn msg(from: u8, dest: Destination, nonce: u64) -> Message {
    Message::new(key(from), dest, Bytes::from_static(b"hi"))
        .with_timestamp(T0)
        .with_nonce(nonce)
}

fn send(n: &mut Node<LinkId>, now: Now, link: LinkId, msgs: &[Message]) -> Vec<Action<LinkId>> {
    let lane = msgs[0].lane;
    let (b, envs) = batch(msgs, lane);
    let mut out = Vec::new();
    n.batch(now, link, &envs, &b, &mut out);
    out
}

fn control(n: &mut Node<LinkId>, now: Now, link: LinkId, f: Frame) -> Vec<Action<LinkId>> {
    let mut out = Vec::new();
    n.control(now, link, f, &mut out);
    out
}

fn mesh_frames(out: &[Action<LinkId>], to: LinkId) -> Vec<MeshFrame> {
    out.iter()
        .filter_map(|a| match a {
            Action::Control {
                to: t,
                frame: Frame::Mesh(m),
            } if *t == to => Some(m.clone()),
            _ => None,
        })
        .collect()
}

fn delivers(out: &[Action<LinkId>]) -> Vec<(LinkId, u8)> {
    out.iter()
        .filter_map(|a| match a {
            Action::Deliver { to, env, .. } => Some((*to, env.ttl())),
            _ => None,
        })
        .collect()
}

fn drops(out: &[Action<LinkId>], reason: DropReason) -> u64 {
    out.iter()
        .map(|a| match a {
            Action::Drop { reason: r, count } if *r == reason => *count,
            _ => 0,
        })
        .sum()
}

/// Brings relay `i` up on `link` and has it list this relay back, so it
/// is reachable; returns the actions of the link coming up.
fn peer(n: &mut Node<LinkId>, now: Now, link: LinkId, i: u8) -> Vec<Action<LinkId>> {
    let mut out = Vec::new();
    assert_eq!(
        n.peer_dialed(now, link, link, key(i), &mut out),
        Admission::Admitted
    );
    link_state(n, now, link, i, 1, &[100]);
    out
}

/// Relay `origin`'s LinkState arriving on `link`.
fn link_state(
    n: &mut Node<LinkId>,
    now: Now,
    link: LinkId,
    origin: u8,
    seq: u64,
    neighbors: &[u8],
) -> Vec<Action<LinkId>> {
    control(
        n,
        now,
        link,
        Frame::Mesh(MeshFrame::LinkState {
            origin: key(origin),
            seq,
            addr: String::new(),
            neighbors: neighbors.iter().map(|&i| key(i)).collect(),
        }),
    )
}

fn cell(n: &mut Node<LinkId>, link: LinkId, i: u8) {
    let mut out = Vec::new();
    assert_eq!(
        n.link_up(at(0), link, link, info(i, Role::Cell), &mut out),
        Admission::Admitted
    );
}

#[test]
fn an_untrusted_relay_is_refused_with_a_reason_and_no_mesh_refuses_every_relay() {
    let mut n = node();
    let mut out = Vec::new();
    match n.link_up(at(0), 1, 1, info(50, Role::Relay), &mut out) {
        Admission::Refused { code, reason } => {
            assert_eq!(code, CloseCode::Unauthorized);
            assert!(reason.contains(&key(50).to_string()), "{reason}");
            assert!(reason.contains("trusted_relays"), "{reason}");
        }
        a => panic!("{a:?}"),
    }
    assert!(out.is_empty() && n.links() == 0);
    let mut plain: Node<LinkId> = Node::new(NodeConfig::new(key(100)), 1).unwrap();
    assert!(matches!(
        plain.link_up(at(0), 1, 1, info(101, Role::Relay), &mut out),
        Admission::Refused { code: CloseCode::Unauthorized, reason } if reason.contains("not enabled")
    ));
}

#[test]
fn a_trusted_relay_gets_the_link_state_database_and_max_peers_is_a_bound() {
    let mut n = node();
    let mut out = Vec::new();
    assert_eq!(
        n.link_up(at(0), 1, 1, info(101, Role::Relay), &mut out),
        Admission::Admitted
    );
    assert!(matches!(
        out[0],
        Action::Control {
            frame: Frame::Welcome { .. },
            ..
        }
    ));
    let ls = mesh_frames(&out, 1);
    assert!(
        matches!(&ls[0], MeshFrame::LinkState { origin, neighbors, .. } if *origin == key(100) && neighbors == &vec![key(101)]),
        "{ls:?}"
    );
    // A dialed link sends no Welcome of its own.
    out.clear();
    assert_eq!(
        n.peer_dialed(at(0), 2, 2, key(102), &mut out),
        Admission::Admitted
    );
    assert!(!out.iter().any(|a| matches!(
        a,
        Action::Control {
            frame: Frame::Welcome { .. },
            ..
        }
    )));
    // The new own LinkState goes to the first relay too.
    assert!(!mesh_frames(&out, 1).is_empty());
    out.clear();
    assert_eq!(
        n.peer_dialed(at(0), 3, 3, key(103), &mut out),
        Admission::Admitted
    );
    assert!(matches!(
        n.peer_dialed(at(0), 4, 4, key(104), &mut out),
        Admission::Refused { code: CloseCode::TooManyLinks, reason } if reason.contains("max_peers")
    ));
    // A relay is not a cell: nothing routes to it as one.
    assert!(n.router().cell(&key(101)).is_none());
    assert_eq!(n.mesh().stats().peers, 3);
}

#[test]
fn a_newer_link_of_a_relay_replaces_the_older() {
    let mut n = node();
    peer(&mut n, at(0), 1, 101);
    let out = peer(&mut n, at(1), 2, 101);
    assert!(out.iter().any(|a| matches!(
        a,
        Action::Close {
            link: 1,
            why: CloseReason::Replaced,
            ..
        }
    )));
    assert_eq!(n.mesh().peers().collect::<Vec<_>>(), vec![(2, key(101))]);
}

#[test]
fn pings_go_out_on_time_are_answered_and_silence_closes_the_link() {
    let mut n = node();
    peer(&mut n, at(0), 1, 101);
    assert_eq!(n.poll_timeout(), Some(100));
    let mut out = Vec::new();
    n.tick(at(100), &mut out);
    assert!(matches!(mesh_frames(&out, 1)[..], [MeshFrame::Ping { .. }]));
    let out = control(
        &mut n,
        at(150),
        1,
        Frame::Mesh(MeshFrame::Ping { nonce: 9 }),
    );
    assert_eq!(mesh_frames(&out, 1), vec![MeshFrame::Pong { nonce: 9 }]);
    // Heard at 150: still up at 449, closed as idle at 450.
    let mut out = Vec::new();
    n.tick(at(449), &mut out);
    assert!(!out.iter().any(|a| matches!(a, Action::Close { .. })));
    n.tick(at(450), &mut out);
    assert!(out.iter().any(|a| matches!(
        a,
        Action::Close {
            link: 1,
            code: CloseCode::Idle,
            why: CloseReason::Idle,
            ..
        }
    )));
    assert_eq!(n.mesh().stats().peers, 0, "its routes went at once");
}

#[test]
fn credit_is_granted_back_at_half_the_window_and_an_overrun_closes_the_link() {
    let mut n = node();
    peer(&mut n, at(0), 1, 101);
    let m = |i| msg(101, Destination::Broadcast, i).with_lane(Lane::Bulk);
    let out = send(&mut n, at(1), 1, &[m(1), m(2), m(3)]);
    assert!(mesh_frames(&out, 1).is_empty());
    let out = send(&mut n, at(1), 1, &[m(4)]);
    assert_eq!(
        mesh_frames(&out, 1),
        vec![MeshFrame::Credit {
            lane: Lane::Bulk,
            grant: 4
        }]
    );
    let nine: Vec<Message> = (10..19).map(m).collect();
    let out = send(&mut n, at(2), 1, &nine);
    assert!(out.iter().any(|a| matches!(
        a,
        Action::Close {
            link: 1,
            code: CloseCode::RateLimited,
            ..
        }
    )));
}

#[test]
fn without_credit_a_flooded_message_is_dropped_on_that_link_only() {
    let mut n = node();
    peer(&mut n, at(0), 1, 101);
    peer(&mut n, at(0), 2, 102);
    cell(&mut n, 10, 10);
    let m = |i| msg(10, Destination::Broadcast, i).with_lane(Lane::High);
    let msgs: Vec<Message> = (0..10).map(m).collect();
    let out = send(&mut n, at(1), 10, &msgs);
    // 8 credits per lane per link: 8 reach each relay, 2 are dropped there.
    assert_eq!(delivers(&out).iter().filter(|(t, _)| *t == 1).count(), 8);
    assert_eq!(delivers(&out).iter().filter(|(t, _)| *t == 2).count(), 8);
    assert_eq!(drops(&out, DropReason::SlowReceiver), 4);
    // A grant lets more through.
    control(
        &mut n,
        at(2),
        1,
        Frame::Mesh(MeshFrame::Credit {
            lane: Lane::High,
            grant: 8,
        }),
    );
    let out = send(&mut n, at(3), 10, &[m(20)]);
    assert_eq!(delivers(&out).iter().filter(|(t, _)| *t == 1).count(), 1);
    assert_eq!(
        drops(&out, DropReason::SlowReceiver),
        1,
        "link 2 has none left"
    );
}

#[test]
fn a_broadcast_is_flooded_once_never_back_and_a_second_copy_stops_here() {
    let mut n = node();
    peer(&mut n, at(0), 1, 101);
    peer(&mut n, at(0), 2, 102);
    cell(&mut n, 10, 10);
    let b = msg(50, Destination::Broadcast, 1).with_ttl(5);
    let out = send(&mut n, at(1), 1, std::slice::from_ref(&b));
    let mut d = delivers(&out);
    d.sort();
    assert_eq!(
        d,
        vec![(2, 4), (10, 4)],
        "to the cell and the other relay, TTL one lower"
    );
    let out = send(&mut n, at(2), 2, &[b]);
    assert!(
        delivers(&out).is_empty(),
        "a copy by another path stops here"
    );
    assert_eq!(drops(&out, DropReason::Duplicate), 1);
}

#[test]
fn a_message_with_no_hop_left_is_not_forwarded() {
    let mut n = node();
    peer(&mut n, at(0), 1, 101);
    peer(&mut n, at(0), 2, 102);
    let out = send(
        &mut n,
        at(1),
        1,
        &[msg(50, Destination::Broadcast, 1).with_ttl(0)],
    );
    assert!(delivers(&out).is_empty());
    assert_eq!(drops(&out, DropReason::TtlExpired), 1);
}

#[test]
fn a_cell_elsewhere_is_looked_up_not_flooded_then_cached_and_hinted() {
    let mut n = node();
    peer(&mut n, at(0), 1, 101);
    cell(&mut n, 10, 10);
    // 101's LinkState already lists 100; 102 behind it is reachable.
    link_state(&mut n, at(0), 1, 101, 2, &[100, 102]);
    link_state(&mut n, at(0), 1, 102, 1, &[101]);
    let dest = key(77);
    let holders = n.mesh_mut().holders_of(&dest);
    assert!(!holders.is_empty());
    let out = send(&mut n, at(1), 10, &[msg(10, Destination::Cell(dest), 1)]);
    assert!(
        delivers(&out).is_empty(),
        "no data leaves before the answer"
    );
    assert_eq!(
        drops(&out, DropReason::UnknownDestination),
        0,
        "held, not dropped"
    );
    let (request, asked) = match mesh_frames(&out, 1)[..] {
        [
            MeshFrame::Lookup {
                request,
                header,
                cell,
            },
        ] if cell == dest => (request, header.target),
        ref f => panic!("{f:?}"),
    };
    assert!(holders.contains(&asked) && asked != key(100));
    // The directory answers: 77 is at 102.
    let home = Location {
        home: key(102),
        version: 5,
    };
    let out = control(
        &mut n,
        at(2),
        1,
        Frame::Mesh(MeshFrame::LookupReply {
            header: RouteHeader {
                origin: asked,
                target: key(100),
                hops: 9,
            },
            request,
            cell: dest,
            at: Some(home),
        }),
    );
    assert_eq!(
        delivers(&out),
        vec![(1, 15)],
        "to the next hop, TTL one lower"
    );
    assert!(
        matches!(
            mesh_frames(&out, 1)[..],
            [MeshFrame::Route { up: true, cell, at, header }] if cell == dest && at == home && header.hops == 0
        ),
        "a hint before the data"
    );
    // The next message goes at once, from the cache, without a new hint.
    let out = send(&mut n, at(3), 10, &[msg(10, Destination::Cell(dest), 2)]);
    assert_eq!(delivers(&out), vec![(1, 15)]);
    assert!(mesh_frames(&out, 1).is_empty());
    // The link drops: the route through it goes at once.
    let mut out = Vec::new();
    n.link_down(at(4), 1, &mut out);
    let out = send(&mut n, at(5), 10, &[msg(10, Destination::Cell(dest), 3)]);
    assert!(delivers(&out).is_empty());
    assert_eq!(drops(&out, DropReason::UnknownDestination), 1);
}

#[test]
fn a_lookup_nobody_answers_fails_after_its_directory_relays_and_is_noticed() {
    let mut n = node_with(MeshConfig {
        lookup_timeout_ms: 50,
        ..mesh_cfg()
    });
    peer(&mut n, at(0), 1, 101);
    cell(&mut n, 10, 10);
    let out = send(&mut n, at(1), 10, &[msg(10, Destination::Cell(key(77)), 1)]);
    assert!(delivers(&out).is_empty());
    // Only 101 can be asked (100 is the other directory relay, and does
    // not know): the timeout gives up.
    let mut out = Vec::new();
    n.tick(at(51), &mut out);
    assert_eq!(drops(&out, DropReason::UnknownDestination), 1);
    assert!(out.iter().any(|a| matches!(
        a,
        Action::Control {
            to: 10,
            frame: Frame::Notice {
                code: NoticeCode::UnknownDestination,
                ..
            }
        }
    )));
    assert_eq!(n.mesh().stats().held, 0);
}

#[test]
fn a_registration_is_kept_and_answers_a_lookup_newer_wins() {
    let mut n = node();
    peer(&mut n, at(0), 1, 101);
    link_state(&mut n, at(0), 1, 101, 2, &[100, 102]);
    link_state(&mut n, at(0), 1, 102, 1, &[101]);
    let cell_key = key(33);
    let reg = |version| {
        Frame::Mesh(MeshFrame::Route {
            header: RouteHeader {
                origin: key(102),
                target: key(100),
                hops: 5,
            },
            up: true,
            cell: cell_key,
            at: Location {
                home: key(102),
                version,
            },
        })
    };
    control(&mut n, at(1), 1, reg(7));
    control(&mut n, at(1), 1, reg(6));
    let lookup = Frame::Mesh(MeshFrame::Lookup {
        header: RouteHeader {
            origin: key(101),
            target: key(100),
            hops: 5,
        },
        request: 4,
        cell: cell_key,
    });
    let out = control(&mut n, at(2), 1, lookup);
    match &mesh_frames(&out, 1)[..] {
        [
            MeshFrame::LookupReply {
                request: 4,
                at: Some(at),
                header,
                ..
            },
        ] => {
            assert_eq!((at.home, at.version), (key(102), 7));
            assert_eq!(header.target, key(101));
        }
        f => panic!("{f:?}"),
    }
}

#[test]
fn a_routed_frame_passes_on_with_one_hop_less_and_dies_at_zero() {
    let mut n = node();
    peer(&mut n, at(0), 1, 101);
    peer(&mut n, at(0), 2, 102);
    let f = |hops| {
        Frame::Mesh(MeshFrame::Lookup {
            header: RouteHeader {
                origin: key(101),
                target: key(102),
                hops,
            },
            request: 1,
            cell: key(9),
        })
    };
    let out = control(&mut n, at(1), 1, f(3));
    assert!(matches!(
        mesh_frames(&out, 2)[..],
        [MeshFrame::Lookup { header, .. }] if header.hops == 2
    ));
    let out = control(&mut n, at(1), 1, f(0));
    assert!(mesh_frames(&out, 2).is_empty());
    assert_eq!(n.mesh().stats().routed_dropped, 1);
}

#[test]
fn link_state_floods_newer_only_and_never_back() {
    let mut n = node();
    peer(&mut n, at(0), 1, 101);
    peer(&mut n, at(0), 2, 102);
    let out = link_state(&mut n, at(1), 1, 150, 3, &[101]);
    assert_eq!(mesh_frames(&out, 2).len(), 1);
    assert!(mesh_frames(&out, 1).is_empty());
    let out = link_state(&mut n, at(1), 2, 150, 3, &[101]);
    assert!(mesh_frames(&out, 1).is_empty() && mesh_frames(&out, 2).is_empty());
    // An older one is answered with the one held, on its link only.
    let out = link_state(&mut n, at(1), 2, 150, 2, &[]);
    assert!(mesh_frames(&out, 1).is_empty());
    assert!(matches!(
        mesh_frames(&out, 2)[..],
        [MeshFrame::LinkState { seq: 3, .. }]
    ));
    let topo = n.mesh().topology();
    assert_eq!(topo[0], (key(100), vec![key(101), key(102)]));
    assert!(topo.contains(&(key(150), vec![key(101)])));
    // This relay's own LinkState from before a restart: it jumps past it.
    let out = link_state(&mut n, at(1), 1, 100, 99, &[]);
    assert!(matches!(
        mesh_frames(&out, 1)[..],
        [MeshFrame::LinkState { seq: 100, .. }]
    ));
}

#[test]
fn a_mesh_frame_from_a_cell_closes_its_link() {
    let mut n = node();
    cell(&mut n, 10, 10);
    let out = control(&mut n, at(1), 10, Frame::Mesh(MeshFrame::Ping { nonce: 1 }));
    assert!(out.iter().any(|a| matches!(
        a,
        Action::Close {
            link: 10,
            code: CloseCode::Malformed,
            ..
        }
    )));
}

#[test]
fn a_traced_message_reports_its_hop_to_its_source() {
    let mut n = node();
    peer(&mut n, at(0), 1, 101);
    peer(&mut n, at(0), 2, 102);
    cell(&mut n, 10, 10);
    let mut m = msg(50, Destination::Cell(key(10)), 1);
    m.trace = true;
    // From a relay to the cell here: the report goes toward the source's
    // home (unknown yet: a lookup).
    let out = send(&mut n, at(1), 1, &[m]);
    assert_eq!(delivers(&out).len(), 0, "forwarded whole to the cell");
    assert!(
        out.iter()
            .any(|a| matches!(a, Action::Forward { to: 10, .. }))
    );
    let frames: Vec<MeshFrame> = [1, 2].iter().flat_map(|l| mesh_frames(&out, *l)).collect();
    assert!(
        frames
            .iter()
            .any(|f| matches!(f, MeshFrame::Lookup { cell, .. } if *cell == key(50))),
        "{frames:?}"
    );
    // From the cell here to another cell here: straight to the source.
    cell(&mut n, 11, 11);
    let mut m = msg(10, Destination::Cell(key(11)), 2);
    m.trace = true;
    let out = send(&mut n, at(2), 10, &[m]);
    assert!(matches!(
        mesh_frames(&out, 10)[..],
        [MeshFrame::Trace { next, source, .. }] if next == key(11) && source == key(10)
    ));
}

#[test]
fn without_a_mesh_the_delivering_relay_reports_the_last_hop_to_its_source() {
    let mut n: Node<LinkId> = Node::new(NodeConfig::new(key(100)), 1).unwrap();
    cell(&mut n, 10, 10);
    cell(&mut n, 11, 11);
    let mut m = msg(10, Destination::Cell(key(11)), 1);
    m.trace = true;
    let out = send(&mut n, at(1), 10, &[m.clone()]);
    match &mesh_frames(&out, 10)[..] {
        [
            MeshFrame::Trace {
                header,
                next,
                source,
                ..
            },
        ] => {
            assert_eq!(header.origin, key(100), "this relay reports");
            assert_eq!(*next, key(11), "delivered to the destination");
            assert_eq!(*source, key(10));
        }
        other => panic!("one Trace to the source, got {other:?}"),
    }
    // Untraced: no report.
    m.trace = false;
    m.nonce += 1;
    let out = send(&mut n, at(2), 10, &[m]);
    assert!(mesh_frames(&out, 10).is_empty());
}
