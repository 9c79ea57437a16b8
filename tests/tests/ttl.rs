//! The TTL a receiver sees, on every way a relay forwards
//! (docs/PROTOCOL.md 3.6): one hop lower than sent, whether the relay
//! forwarded the batch whole (its hop count raised, its data untouched),
//! message by message, to a broadcast or to a service; and a message that
//! reaches the relay with no hop left is dropped, counted and reported.
//!
//! Raw links on both ends: the sender sets exact TTL bytes and hop counts,
//! the receiver sees each message's TTL and the hop count of the batch it
//! came in, so each test also shows which path the relay took. Every test
//! runs over QUIC and over TCP.

use bytes::Bytes;
use relay_codec::frame::NoticeCode;
use relay_codec::{Destination, Envelope, Frame, Keypair, Lane, Limits, ServiceName};
use relay_link::Transport;
use relay_tests::cells::WAIT;
use relay_tests::raw::{Arrival, RawLink, batch_frame, message, signed};
use relay_tests::{RelayProcess, each_transport};
use std::time::Duration;

/// A raw cell link over `t`, connected and attached.
async fn link(relay: &RelayProcess, t: Transport) -> RawLink {
    RawLink::connect_over(relay, Keypair::generate(), t)
        .await
        .unwrap_or_else(|e| panic!("raw link over {t}: {e}; relay log:\n{}", relay.log()))
}

/// A signed message from `from` to `to` on the normal lane with TTL `ttl`.
fn msg(from: &RawLink, to: Destination, ttl: u8, text: &str) -> Envelope {
    let m = message(&from.key, to, Lane::Normal, text.as_bytes().to_vec()).with_ttl(ttl);
    signed(&m, &from.key)
}

/// The next `n` messages `link` reads.
async fn arrivals(link: &mut RawLink, n: usize, what: &str) -> Vec<Arrival> {
    let mut got = Vec::new();
    while got.len() < n {
        let a = link
            .next_arrival(WAIT)
            .await
            .unwrap_or_else(|| panic!("{what}: {} of {n} messages arrived", got.len()));
        got.push(a);
    }
    got
}

/// Checks that `got` are `sent`, in order, each with its TTL one lower
/// (and the signature intact: TTL is not authenticated), having come in
/// batches with hop count `hops`.
fn one_hop_lower(got: &[Arrival], sent: &[&Envelope], hops: u8, what: &str) {
    assert_eq!(got.len(), sent.len(), "{what}");
    for (a, s) in got.iter().zip(sent) {
        assert_eq!(
            a.env.authenticated_bytes(),
            s.authenticated_bytes(),
            "{what}: another message than sent"
        );
        assert_eq!(
            a.env.ttl(),
            s.ttl() - 1,
            "{what}: sent with TTL {}, arrived with {}",
            s.ttl(),
            a.env.ttl()
        );
        assert_eq!(a.hops, hops, "{what}: batch hop count");
        a.env.verify().expect("the signature survives the hop");
    }
}

/// No further message reaches `link` after `marker` (sent last, to the
/// same link): everything sent before it has been read by then.
async fn nothing_before(link: &mut RawLink, marker: &Envelope, what: &str) {
    let next = link.next_message(WAIT).await;
    let next = next.unwrap_or_else(|| panic!("{what}: the marker did not arrive"));
    assert_eq!(
        next.authenticated_bytes(),
        marker.authenticated_bytes(),
        "{what}: a message arrived that should not have"
    );
}

each_transport!(a_batch_forwarded_whole_arrives_one_hop_lower);
async fn a_batch_forwarded_whole_arrives_one_hop_lower(t: Transport) {
    let relay = RelayProcess::start();
    let mut s = link(&relay, t).await;
    let mut b = link(&relay, t).await;
    let to = Destination::Cell(b.public());
    let sent = [
        msg(&s, to.clone(), 16, "sixteen"),
        msg(&s, to.clone(), 5, "five"),
        msg(&s, to, 1, "one"),
    ];
    s.send_batch(Lane::Normal, &sent).await.unwrap();
    let got = arrivals(&mut b, 3, "forwarded whole").await;
    // Hop count 1: the relay sent the batch as it came, header rewritten.
    one_hop_lower(&got, &sent.iter().collect::<Vec<_>>(), 1, "forwarded whole");
    assert_eq!(
        got.iter().map(|a| a.env.raw()[0]).collect::<Vec<_>>(),
        [16, 5, 1],
        "forwarded whole: TTL bytes untouched"
    );
    relay.stop();
}

each_transport!(a_batch_split_over_two_cells_arrives_one_hop_lower);
async fn a_batch_split_over_two_cells_arrives_one_hop_lower(t: Transport) {
    let relay = RelayProcess::start();
    let mut s = link(&relay, t).await;
    let mut b = link(&relay, t).await;
    let mut c = link(&relay, t).await;
    let (to_b, to_c) = (Destination::Cell(b.public()), Destination::Cell(c.public()));
    let sent = [
        msg(&s, to_b.clone(), 16, "b sixteen"),
        msg(&s, to_c, 9, "c nine"),
        msg(&s, to_b, 2, "b two"),
    ];
    s.send_batch(Lane::Normal, &sent).await.unwrap();
    // Hop count 0: the relay built new batches, with new TTL bytes.
    let got = arrivals(&mut b, 2, "split, to b").await;
    one_hop_lower(&got, &[&sent[0], &sent[2]], 0, "split, to b");
    assert_eq!(got[0].env.raw()[0], 15, "split: TTL byte rewritten");
    let got = arrivals(&mut c, 1, "split, to c").await;
    one_hop_lower(&got, &[&sent[1]], 0, "split, to c");
    relay.stop();
}

each_transport!(broadcasts_and_service_messages_arrive_one_hop_lower);
async fn broadcasts_and_service_messages_arrive_one_hop_lower(t: Transport) {
    let relay = RelayProcess::start();
    let mut s = link(&relay, t).await;
    let mut b = link(&relay, t).await;
    let mut c = link(&relay, t).await;
    let sent = [
        msg(&s, Destination::Broadcast, 16, "all sixteen"),
        msg(&s, Destination::Broadcast, 3, "all three"),
    ];
    s.send_batch(Lane::Normal, &sent).await.unwrap();
    for (r, name) in [(&mut b, "broadcast, at b"), (&mut c, "broadcast, at c")] {
        let got = arrivals(r, 2, name).await;
        one_hop_lower(&got, &sent.iter().collect::<Vec<_>>(), 0, name);
    }

    let svc = ServiceName::new("ttl-test").unwrap();
    c.send_control(&Frame::Announce {
        app_version: "1".into(),
        services: vec![svc.clone()],
    })
    .await
    .unwrap();
    // Announce and Discover travel on two links' control streams: ask
    // until the relay lists c.
    let deadline = tokio::time::Instant::now() + WAIT;
    for request in 0.. {
        assert!(tokio::time::Instant::now() < deadline, "c never listed");
        s.send_control(&Frame::Discover {
            request,
            service: svc.clone(),
        })
        .await
        .unwrap();
        let listed = loop {
            match s.next_control(WAIT).await {
                Some(Frame::DiscoverReply { request: r, cells }) if r == request => {
                    break cells.iter().any(|(k, _)| *k == c.public());
                }
                Some(_) => continue,
                None => panic!("no DiscoverReply"),
            }
        };
        if listed {
            break;
        }
    }
    let sent = [msg(&s, Destination::Service(svc), 7, "service seven")];
    s.send_batch(Lane::Normal, &sent).await.unwrap();
    let got = arrivals(&mut c, 1, "service").await;
    one_hop_lower(&got, &[&sent[0]], 0, "service");
    relay.stop();
}

/// `envs` as one batch frame that relays have forwarded whole `hops` times.
fn batch_with_hops(envs: &[Envelope], hops: u8) -> Bytes {
    let Frame::Batch(mut b) =
        Frame::decode(batch_frame(Lane::Normal, envs), &Limits::default()).unwrap()
    else {
        panic!("not a batch");
    };
    b.hops = hops;
    Frame::Batch(b).to_bytes()
}

each_transport!(a_message_that_arrives_with_no_hop_left_is_dropped);
async fn a_message_that_arrives_with_no_hop_left_is_dropped(t: Transport) {
    let relay = RelayProcess::start();
    let mut s = link(&relay, t).await;
    let mut b = link(&relay, t).await;
    let to = Destination::Cell(b.public());
    // TTL bytes 4, 2, 3 behind a hop count of 2: TTLs 2, 0, 1.
    let sent = [
        msg(&s, to.clone(), 4, "two left"),
        msg(&s, to.clone(), 2, "none left"),
        msg(&s, to.clone(), 3, "one left"),
    ];
    s.send_raw(Lane::Normal, &batch_with_hops(&sent, 2))
        .await
        .unwrap();
    // The two with a hop left arrive with one less, in a batch the relay
    // built: it cannot forward whole a batch with a message it drops.
    let got = arrivals(&mut b, 2, "the messages with hops left").await;
    assert_eq!(
        got.iter()
            .map(|a| (a.env.ttl(), a.hops))
            .collect::<Vec<_>>(),
        [(1, 0), (0, 0)]
    );
    assert_eq!(got[0].env.id(), sent[0].id());
    assert_eq!(got[1].env.id(), sent[2].id());
    relay
        .wait_metric_async("celluler_drops_total", "reason=\"ttl_expired\"", 1.0, WAIT)
        .await;
    let notice = loop {
        match s.next_control(WAIT).await {
            Some(Frame::Notice {
                code,
                count,
                id,
                subject,
            }) => break (code, count, id, subject),
            Some(_) => continue,
            None => panic!("no TtlExpired notice"),
        }
    };
    assert_eq!(
        notice,
        (NoticeCode::TtlExpired, 1, sent[1].id(), b.public())
    );

    // A batch all of whose messages have TTL 0 reaches no one.
    let dead = [msg(&s, to.clone(), 5, "dead")];
    s.send_raw(Lane::Normal, &batch_with_hops(&dead, 5))
        .await
        .unwrap();
    relay
        .wait_metric_async("celluler_drops_total", "reason=\"ttl_expired\"", 2.0, WAIT)
        .await;
    // Lanes keep their order: once a later marker is in, the dead one
    // would have come before it.
    let marker = msg(&s, to, 16, "marker");
    s.send_batch(Lane::Normal, std::slice::from_ref(&marker))
        .await
        .unwrap();
    nothing_before(&mut b, &marker, "after a batch with no hop left").await;
    assert_eq!(
        relay.metric("celluler_drops_total", "reason=\"ttl_expired\""),
        2.0
    );
    assert!(b.next_message(Duration::ZERO).await.is_none());
    relay.stop();
}
