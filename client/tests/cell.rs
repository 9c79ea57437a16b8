//! The cell API against the real relay (the `relay` crate, run in this
//! process by `support`), over QUIC and, where the test is about the link,
//! TLS over TCP too.

mod support;

use bytes::{Bytes, BytesMut};
use relay_client::Transport;
use relay_client::cell::{
    AuthMode, Cell, CellError, CellOptions, Event, Received, ReceivedAuth, Undelivered,
};
use relay_client::clock::now_ms;
use relay_codec::frame::{CloseCode, NoticeCode};
use relay_codec::{
    Authenticator, Destination, Envelope, Keypair, Lane, Limits, Message, MessageId, NodeAddr,
    PublicKey, ServiceName,
};
use std::time::{Duration, Instant};
use support::{TestRelay, WAIT, connect, connect_as, next_event, next_message, wait_until};

fn svc(s: &str) -> ServiceName {
    ServiceName::new(s).unwrap()
}

/// The next message `cell` receives is `marker`, sent after everything it
/// must not receive and on the same lane: nothing else arrived before it.
async fn next_is_marker(cell: &mut Cell, marker: &[u8]) {
    let m = next_message(cell).await;
    assert_eq!(
        &m.payload[..],
        marker,
        "expected nothing before the marker, got {m:?}"
    );
}

/// The next event if one is already queued; `None` without waiting.
async fn queued_event(cell: &mut Cell) -> Option<Event> {
    tokio::select! {
        biased;
        e = cell.next_event() => e,
        _ = std::future::ready(()) => None,
    }
}

/// Takes `cell`'s link over with a second cell of the same key: the relay
/// closes the older link ("replaced by a newer link of the same key").
/// Returns the newcomer, which does not reconnect.
async fn take_over(relay: &TestRelay, transport: Transport, key: &Keypair) -> Cell {
    let opts = CellOptions {
        reconnect: false,
        ..CellOptions::default()
    };
    connect_as(relay, transport, key.clone(), opts).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cells_exchange_signed_and_link_authenticated_messages() {
    let relay = TestRelay::start().await;
    for t in Transport::ALL {
        let (mut a, a_key) = connect(&relay, t, CellOptions::default()).await;
        let (mut b, b_key) = connect(
            &relay,
            t,
            CellOptions {
                auth: AuthMode::Link,
                agent: "test-b/1".into(),
                ..CellOptions::default()
            },
        )
        .await;

        let before = now_ms();
        let id = a
            .send(b_key.public(), Lane::High, &b"hello b"[..])
            .await
            .unwrap();
        let m = next_message(&mut b).await;
        assert_eq!(m.id, id, "{t}");
        assert_eq!(m.source, a_key.public());
        assert_eq!(m.destination, Destination::Cell(b_key.public()));
        assert_eq!(m.lane, Lane::High);
        assert_eq!(&m.payload[..], b"hello b");
        // Signed by a, verified by b.
        assert_eq!(m.auth, ReceivedAuth::Signature);
        assert!(m.timestamp_ms >= before && m.timestamp_ms <= now_ms());

        let id = b
            .send(a_key.public(), Lane::Bulk, vec![0xff, 0, 1])
            .await
            .unwrap();
        let m = next_message(&mut a).await;
        // Unsigned: the relay vouched for b's key.
        assert_eq!((m.id, m.auth, m.lane), (id, ReceivedAuth::Link, Lane::Bulk));
        assert_eq!(&m.payload[..], &[0xff, 0, 1]);

        // Many messages on one lane arrive in order, each with its own
        // nonce (the same payload twice is two messages, not a duplicate).
        let mut ids = Vec::new();
        for n in 0..100u32 {
            ids.push(
                a.send(b_key.public(), Lane::Normal, (n / 2).to_le_bytes().to_vec())
                    .await
                    .unwrap(),
            );
        }
        for n in 0..100u32 {
            let m = next_message(&mut b).await;
            assert_eq!(
                (m.id, &m.payload[..]),
                (ids[n as usize], &(n / 2).to_le_bytes()[..])
            );
        }
        assert_eq!(b.stats().received, 101);
        let (ha, hb) = (a.handle(), b.handle());
        a.close().await.unwrap();
        b.close().await.unwrap();
        // The relay took each orderly close and answered it with its Close.
        assert!(
            ha.undelivered().complete && hb.undelivered().complete,
            "{t}"
        );
        assert_eq!(ha.undelivered().total, 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_broadcast_and_discovery() {
    let relay = TestRelay::start().await;
    let t = Transport::Quic;
    let (mut echo, echo_key) = connect(
        &relay,
        t,
        CellOptions {
            app_version: "echo-1.2".into(),
            services: vec![svc("echo")],
            ..CellOptions::default()
        },
    )
    .await;
    // The control stream is ordered: the relay has the announcement once
    // it answers echo's own discover.
    assert_eq!(
        echo.discover(&svc("echo")).await.unwrap(),
        vec![(echo_key.public(), "echo-1.2".to_string())]
    );
    let (a, a_key) = connect(&relay, t, CellOptions::default()).await;
    let (mut b, _) = connect(&relay, t, CellOptions::default()).await;

    assert_eq!(
        a.discover(&svc("echo")).await.unwrap(),
        vec![(echo_key.public(), "echo-1.2".to_string())]
    );
    assert_eq!(a.discover(&svc("nobody")).await.unwrap(), vec![]);

    a.send_to_service(&svc("echo"), Lane::Normal, &b"ping"[..])
        .await
        .unwrap();
    let m = next_message(&mut echo).await;
    assert_eq!(m.destination, Destination::Service(svc("echo")));
    assert_eq!(m.source, a_key.public());
    // b offers no service: the ping did not reach it.
    a.send(b.public_key(), Lane::Normal, &b"marker"[..])
        .await
        .unwrap();
    next_is_marker(&mut b, b"marker").await;

    a.broadcast(Lane::Control, &b"all"[..]).await.unwrap();
    for c in [&mut echo, &mut b] {
        let m = next_message(c).await;
        assert_eq!(
            (m.destination, &m.payload[..]),
            (Destination::Broadcast, &b"all"[..])
        );
    }

    // A later announcement replaces the first; b's own discover orders it
    // before a's.
    b.announce("b-2", vec![svc("echo"), svc("other")])
        .await
        .unwrap();
    assert_eq!(b.discover(&svc("other")).await.unwrap().len(), 1);
    let found = a.discover(&svc("other")).await.unwrap();
    assert_eq!(found, vec![(b.public_key(), "b-2".to_string())]);
    assert_eq!(a.discover(&svc("echo")).await.unwrap().len(), 2);
    for c in [a, b, echo] {
        c.close().await.unwrap();
    }
}

/// The next presence event about `key`, passing over others.
async fn presence_of(cell: &mut Cell, key: PublicKey) -> (bool, relay_codec::frame::PresenceInfo) {
    loop {
        match next_event(cell).await {
            Event::Presence { up, info } if info.key == key => return (up, info),
            Event::Presence { .. } => {}
            e => panic!("expected presence, got {e:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_and_notices_become_events() {
    let relay = TestRelay::start().await;
    let t = Transport::Quic;
    let (mut watcher, _) = connect(&relay, t, CellOptions::default()).await;
    watcher.watch_presence(true).await.unwrap();
    // The relay has the watch once it answers this.
    watcher.discover(&svc("x")).await.unwrap();
    let (other, o_key) = connect(
        &relay,
        t,
        CellOptions {
            app_version: "o-1".into(),
            services: vec![svc("x")],
            ..CellOptions::default()
        },
    )
    .await;
    // Reported when it attaches, and again with what it announced.
    let (up, info) = presence_of(&mut watcher, o_key.public()).await;
    assert!(up && info.services.is_empty(), "{info:?}");
    let (up, info) = presence_of(&mut watcher, o_key.public()).await;
    assert!(up);
    assert_eq!(info.app_version, "o-1");
    assert_eq!(info.services, vec![svc("x")]);
    other.close().await.unwrap();
    let (up, _) = presence_of(&mut watcher, o_key.public()).await;
    assert!(!up, "presence down once the cell closed");

    // Messages the relay drops become notices, summed on the handle: 3 to
    // the cell that left, 2 expired broadcasts, 1 more to the cell.
    assert_eq!(watcher.undelivered(), Undelivered::default());
    let me = watcher.public_key();
    let mut first_unknown = None;
    for n in 0..3u8 {
        let id = watcher
            .send(o_key.public(), Lane::Normal, vec![n])
            .await
            .unwrap();
        first_unknown.get_or_insert(id);
    }
    for n in 0..2u8 {
        let stale = Message::new(me, Destination::Broadcast, Bytes::from(vec![n]))
            .with_timestamp(now_ms() - 3_600_000);
        watcher.send_message(stale).await.unwrap();
    }
    watcher
        .send(o_key.public(), Lane::Normal, vec![9])
        .await
        .unwrap();
    let mut seen = Vec::new();
    let mut sum = 0;
    while sum < 6 {
        match next_event(&mut watcher).await {
            Event::Notice {
                code,
                count,
                id,
                subject,
            } => {
                sum += count;
                seen.push((code, count, id, subject));
            }
            e => panic!("expected a notice, got {e:?}"),
        }
    }
    assert_eq!(sum, 6, "{seen:?}");
    let unknown = seen
        .iter()
        .find(|n| n.0 == NoticeCode::UnknownDestination)
        .unwrap();
    assert_eq!(
        (unknown.2, unknown.3),
        (first_unknown.unwrap(), o_key.public())
    );
    let u = watcher.undelivered();
    assert_eq!((u.total, u.notices), (6, seen.len() as u64));
    assert_eq!(u.count(NoticeCode::UnknownDestination), 4);
    assert_eq!(u.count(NoticeCode::Expired), 2);
    assert_eq!(
        u.by_destination,
        vec![
            (NoticeCode::UnknownDestination, o_key.public(), 4),
            (NoticeCode::Expired, PublicKey([0; 32]), 2),
        ]
    );
    assert!(!u.complete, "more may come until the relay's Close");
    let handle = watcher.handle();
    watcher.close().await.unwrap();
    let u = handle.undelivered();
    assert!(u.complete, "the relay answered the close with its Close");
    assert_eq!(u.total, 6);
}

/// A message from `from` to `to` with a fixed nonce and a fresh timestamp.
fn raw(from: &Keypair, to: PublicKey, nonce: u64, payload: &'static [u8]) -> Message {
    Message::new(
        from.public(),
        Destination::Cell(to),
        Bytes::from_static(payload),
    )
    .with_timestamp(now_ms())
    .with_nonce(nonce)
}

/// `msg` with the signature `signer` makes over it, as its authenticator:
/// sent as it is.
fn with_signature_of(msg: &Message, signer: &Keypair) -> Message {
    let mut buf = BytesMut::new();
    msg.encode_signed(signer, &mut buf);
    let env = Envelope::parse(&mut buf.freeze(), &Limits::default()).unwrap();
    Message {
        auth: env.authenticator(),
        ..msg.clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_signatures_and_sealed_messages_are_dropped() {
    // The relay checks no signatures by default (security.verify = "off"):
    // the cell's own check is what stops these.
    let relay = TestRelay::start().await;
    let t = Transport::Quic;
    let (mut cell, key) = connect(&relay, t, CellOptions::default()).await;
    let me = key.public();
    let sender_key = Keypair::generate();
    // Link mode: what carries no authenticator goes unsigned, the rest as
    // it is.
    let sender = connect_as(
        &relay,
        t,
        sender_key.clone(),
        CellOptions {
            auth: AuthMode::Link,
            ..CellOptions::default()
        },
    )
    .await;

    let good = with_signature_of(&raw(&sender_key, me, 1, b"good"), &sender_key);
    // Payload changed after signing.
    let forged = Message {
        payload: Bytes::from_static(b"gold"),
        ..good.clone()
    };
    // Signed by someone other than the source.
    let impostor = with_signature_of(&raw(&sender_key, me, 2, b"impostor"), &Keypair::generate());
    let mut sealed = raw(&sender_key, me, 3, b"sealed");
    sealed.auth = Authenticator::AeadTag([9; 16]);
    let unsigned = raw(&sender_key, me, 4, b"unsigned");
    let mut good_id = None;
    for msg in [forged, good, impostor, sealed, unsigned] {
        let id = sender.send_message(msg.clone()).await.unwrap();
        if &msg.payload[..] == b"good" {
            good_id = Some(id);
        }
    }
    let m = next_message(&mut cell).await;
    assert_eq!(
        (&m.payload[..], m.auth),
        (&b"good"[..], ReceivedAuth::Signature)
    );
    assert_eq!(Some(m.id), good_id);
    let m = next_message(&mut cell).await;
    assert_eq!(
        (&m.payload[..], m.auth),
        (&b"unsigned"[..], ReceivedAuth::Link)
    );
    sender
        .send_message(raw(&sender_key, me, 5, b"marker"))
        .await
        .unwrap();
    next_is_marker(&mut cell, b"marker").await;
    let s = cell.stats();
    assert_eq!(s.received, 3);
    assert_eq!(s.dropped_bad_signature, 2);
    assert_eq!(s.dropped_unsupported, 1);

    // Many signed messages at once: batches large enough to be verified
    // off the async worker.
    let sender_signed = connect_as(&relay, t, Keypair::generate(), CellOptions::default()).await;
    for _ in 0..100 {
        sender_signed
            .send(me, Lane::Normal, &b"bulk"[..])
            .await
            .unwrap();
    }
    for n in 0..100 {
        let m = next_message(&mut cell).await;
        assert_eq!(m.source, sender_signed.public_key());
        assert_eq!(
            (&m.payload[..], m.auth),
            (&b"bulk"[..], ReceivedAuth::Signature),
            "{n}"
        );
    }
    assert_eq!(cell.stats().received, 103);
    for c in [cell, sender, sender_signed] {
        c.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sending_checks_size_and_source_and_keeps_what_the_caller_set() {
    let relay = TestRelay::with_config("[limits]\nmax_payload = 1000\n").await;
    let t = Transport::Quic;
    let (mut cell, key) = connect(&relay, t, CellOptions::default()).await;
    let (mut peer, peer_key) = connect(&relay, t, CellOptions::default()).await;
    let to = peer_key.public();
    // The relay's Welcome lowers the limit below the cell's own.
    let stamped = cell.send(to, Lane::Normal, vec![0; 1000]).await.unwrap();
    match cell.send(to, Lane::Normal, vec![0; 1001]).await {
        Err(CellError::PayloadTooLarge {
            size: 1001,
            limit: 1000,
        }) => {}
        other => panic!("expected PayloadTooLarge, got {other:?}"),
    }
    let foreign = Message::new(to, Destination::Broadcast, Bytes::new());
    let err = cell.send_message(foreign).await.unwrap_err();
    assert!(matches!(err, CellError::Invalid(_)), "{err}");
    // A full message keeps what the caller set: its id (which covers the
    // nonce and the timestamp) is the one this test computes, and it is
    // signed (the cell's mode) over exactly those fields.
    let msg = Message::new(
        key.public(),
        Destination::Cell(to),
        Bytes::from_static(b"m"),
    )
    .with_ttl(3)
    .with_lane(Lane::Bulk)
    .with_nonce(42)
    .with_timestamp(now_ms() - 1000);
    let mut buf = BytesMut::new();
    msg.encode_signed(&key, &mut buf);
    let expected = Envelope::parse(&mut buf.freeze(), &Limits::default())
        .unwrap()
        .id();
    let id = cell.send_message(msg.clone()).await.unwrap();
    assert_eq!(id, expected);
    // Its TTL is kept too: one with no hop left is the relay's to refuse.
    let spent = cell
        .send_message(msg.clone().with_nonce(43).with_ttl(0))
        .await
        .unwrap();
    // Two lanes: the two messages may come in either order.
    let mut got = [next_message(&mut peer).await, next_message(&mut peer).await];
    got.sort_by_key(|m| m.lane.index());
    let m = &got[0];
    assert_eq!(
        (m.id, m.lane, m.payload.len()),
        (stamped, Lane::Normal, 1000)
    );
    // The stamped message got a timestamp of its own.
    assert!(m.timestamp_ms > msg.timestamp_ms);
    let m = &got[1];
    assert_eq!(
        (m.id, m.lane, m.auth),
        (id, Lane::Bulk, ReceivedAuth::Signature)
    );
    assert_eq!(m.timestamp_ms, msg.timestamp_ms);
    match next_event(&mut cell).await {
        Event::Notice {
            code: NoticeCode::TtlExpired,
            count: 1,
            id,
            subject,
        } => assert_eq!((id, subject), (spent, to)),
        e => panic!("expected the TTL notice, got {e:?}"),
    }
    cell.close().await.unwrap();
    peer.close().await.unwrap();
}

/// A QUIC endpoint that completes the TLS handshake as `key` and then
/// never says a word: a relay that hangs before Welcome.
fn silent_endpoint(key: &Keypair) -> quinn::Endpoint {
    use relay_client::link::quic::{self, TransportTuning};
    let cfg = quic::server_config(key.signing_key(), &TransportTuning::default()).unwrap();
    let endpoint = quic::server_endpoint("127.0.0.1:0".parse().unwrap(), cfg).unwrap();
    let ep = endpoint.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Some(incoming) = ep.accept().await {
            if let Ok(conn) = incoming.await {
                held.push(conn);
            }
        }
    });
    endpoint
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_wrong_key_silent_and_unreachable_relays_fail_clearly() {
    let relay = TestRelay::with_config("[limits]\nmax_links = 1\n").await;
    for t in Transport::ALL {
        // The relay is full: the second cell is refused, with the reason.
        let (first, _) = connect(&relay, t, CellOptions::default()).await;
        let opts = CellOptions {
            transport: t,
            ..CellOptions::default()
        };
        match Cell::connect(&relay.addr_over(t), Keypair::generate(), opts.clone()).await {
            Err(CellError::Refused { code, reason }) => {
                assert_eq!(code, CloseCode::TooManyLinks, "{t}");
                assert!(reason.contains("limits.max_links"), "{reason}");
            }
            other => panic!("{t}: expected Refused, got {other:?}"),
        }
        first.close().await.unwrap();

        // Right address, wrong key: the TLS handshake fails, with a hint.
        let wrong = NodeAddr {
            key: Keypair::generate().public(),
            ..relay.addr_over(t)
        };
        let err = Cell::connect(&wrong, Keypair::generate(), opts.clone())
            .await
            .unwrap_err();
        assert!(matches!(err, CellError::Connect { .. }), "{t}: {err:?}");
        assert!(err.to_string().contains("relay's public key"), "{err}");
    }

    let opts = CellOptions {
        connect_timeout: Duration::from_millis(500),
        ..CellOptions::default()
    };
    let silent_key = Keypair::generate();
    let silent = silent_endpoint(&silent_key);
    let at = silent.local_addr().unwrap();
    let silent_addr = NodeAddr {
        key: silent_key.public(),
        host: "127.0.0.1".into(),
        port: at.port(),
    };
    let err = Cell::connect(&silent_addr, Keypair::generate(), opts.clone())
        .await
        .unwrap_err();
    assert!(matches!(err, CellError::Timeout(_)), "{err:?}");
    assert!(err.to_string().contains("did not answer Hello"), "{err}");

    // Nobody on the port: QUIC hears nothing back, TCP is refused.
    let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = socket.local_addr().unwrap().port();
    drop(socket);
    let nowhere = NodeAddr {
        key: Keypair::generate().public(),
        host: "127.0.0.1".into(),
        port,
    };
    let started = Instant::now();
    let err = Cell::connect(&nowhere, Keypair::generate(), opts.clone())
        .await
        .unwrap_err();
    // Bounded by connect_timeout (generously: the bound, not a speed).
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert!(matches!(err, CellError::Timeout(_)), "{err:?}");
    assert!(
        err.to_string().contains("could not reach the relay"),
        "{err}"
    );
    let tcp = CellOptions {
        transport: Transport::Tcp,
        ..opts
    };
    let err = Cell::connect(&nowhere, Keypair::generate(), tcp)
        .await
        .unwrap_err();
    assert!(matches!(err, CellError::Connect { .. }), "{err:?}");
    assert!(err.to_string().contains("TCP connect failed"), "{err}");

    let unresolvable = NodeAddr {
        host: "no-such-host.invalid".into(),
        ..relay.addr()
    };
    let err = Cell::connect(&unresolvable, Keypair::generate(), CellOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(err, CellError::Resolve { .. } | CellError::Timeout(_)),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_restart_is_ridden_out_with_queued_messages_and_announcements() {
    let mut relay = TestRelay::start().await;
    for t in Transport::ALL {
        let (mut a, a_key) = connect(
            &relay,
            t,
            CellOptions {
                app_version: "a-1".into(),
                services: vec![svc("svc-a")],
                backoff_initial: Duration::from_millis(20),
                backoff_max: Duration::from_millis(200),
                ..CellOptions::default()
            },
        )
        .await;
        a.watch_presence(true).await.unwrap();
        // The relay has the watch once it answers a's discover.
        a.discover(&svc("svc-a")).await.unwrap();
        let (b, b_key) = connect(&relay, t, CellOptions::default()).await;
        let (up, info) = presence_of(&mut a, b_key.public()).await;
        assert!(
            up && info.services.is_empty(),
            "b announced nothing: {info:?}"
        );
        // A round trip on b's control stream, then on a's: a second
        // presence about b would be among a's events by the time a's
        // discover is answered.
        b.discover(&svc("svc-a")).await.unwrap();
        a.discover(&svc("svc-a")).await.unwrap();
        assert_eq!(queued_event(&mut a).await, None, "b attached once");

        relay.stop().await;
        match next_event(&mut a).await {
            Event::Disconnected { reason } => {
                assert!(reason.contains("Shutdown"), "{t}: {reason}")
            }
            e => panic!("expected Disconnected, got {e:?}"),
        }
        assert!(!a.is_connected());
        // Sent while down (to itself, which is attached whenever it is):
        // queued, delivered once the link is back.
        for n in 0..20u8 {
            a.send(a_key.public(), Lane::Normal, vec![n]).await.unwrap();
        }
        assert!(matches!(
            a.discover(&svc("svc-a")).await,
            Err(CellError::Disconnected(_))
        ));
        relay.restart().await;
        assert_eq!(next_event(&mut a).await, Event::Reconnected, "{t}");
        assert!(a.is_connected());
        for n in 0..20u8 {
            assert_eq!(&next_message(&mut a).await.payload[..], &[n]);
        }
        assert_eq!(a.stats().reconnects, 1);
        // The announcement was re-sent (ordered before a's own discover)...
        assert_eq!(
            a.discover(&svc("svc-a")).await.unwrap(),
            vec![(a_key.public(), "a-1".to_string())]
        );
        let (c, c_key) = connect(
            &relay,
            t,
            CellOptions {
                services: vec![svc("svc-c")],
                reconnect: false,
                ..CellOptions::default()
            },
        )
        .await;
        assert_eq!(
            c.discover(&svc("svc-a")).await.unwrap(),
            vec![(a_key.public(), "a-1".to_string())]
        );
        // ... and so was the presence watch: c attached, then announced.
        let (up, info) = presence_of(&mut a, c_key.public()).await;
        assert!(up && info.services.is_empty());
        let (up, info) = presence_of(&mut a, c_key.public()).await;
        assert!(up && info.services == vec![svc("svc-c")], "{info:?}");
        for cell in [a, b, c] {
            cell.close().await.unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_reconnect_the_cell_stops_and_says_why() {
    let relay = TestRelay::start().await;
    for t in Transport::ALL {
        let (mut a, a_key) = connect(
            &relay,
            t,
            CellOptions {
                reconnect: false,
                ..CellOptions::default()
            },
        )
        .await;
        let newcomer = take_over(&relay, t, &a_key).await;
        assert!(matches!(
            next_event(&mut a).await,
            Event::Disconnected { .. }
        ));
        assert_eq!(
            tokio::time::timeout(WAIT, a.next_event()).await.unwrap(),
            None
        );
        let err = a
            .send(Keypair::generate().public(), Lane::Normal, &b"x"[..])
            .await
            .unwrap_err();
        assert!(matches!(err, CellError::Disconnected(_)), "{err:?}");
        assert!(
            err.to_string().contains("replaced by a newer link"),
            "{t}: {err}"
        );
        a.close().await.unwrap();
        newcomer.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_flushes_everything_queued() {
    let relay = TestRelay::start().await;
    for t in Transport::ALL {
        let (mut b, b_key) = connect(&relay, t, CellOptions::default()).await;
        let (a, _) = connect(
            &relay,
            t,
            CellOptions {
                auth: AuthMode::Link,
                queue_depth: 64,
                ..CellOptions::default()
            },
        )
        .await;
        // More than a lane holds: sending waits for room, nothing is dropped.
        const N: u32 = 3000;
        let handle = a.handle();
        let sender = tokio::spawn(async move {
            for n in 0..N {
                let lane = Lane::ALL[(n % 4) as usize];
                handle
                    .send(b_key.public(), lane, n.to_le_bytes().to_vec())
                    .await
                    .unwrap();
            }
        });
        tokio::time::timeout(WAIT, sender).await.unwrap().unwrap();
        let handle = a.handle();
        a.close().await.unwrap();
        assert!(handle.undelivered().complete);
        let mut last = [None::<u32>; 4];
        for _ in 0..N {
            let m = next_message(&mut b).await;
            let n = u32::from_le_bytes(m.payload[..].try_into().unwrap());
            let lane = m.lane.index();
            assert!(last[lane].is_none_or(|l| l < n), "lane order");
            last[lane] = Some(n);
        }
        assert_eq!(b.stats().received, N as u64, "{t}");
        b.close().await.unwrap();
    }
}

/// `n` as a payload, and back.
fn seq(n: u32) -> Vec<u8> {
    n.to_le_bytes().to_vec()
}

fn seq_of(m: &Received) -> u32 {
    u32::from_le_bytes(m.payload[..].try_into().expect("a sequence number"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recv_many_takes_batches_in_order_and_returns_0_once_stopped() {
    let relay = TestRelay::start().await;
    let t = Transport::Quic;
    let (mut b, b_key) = connect(
        &relay,
        t,
        CellOptions {
            reconnect: false,
            ..CellOptions::default()
        },
    )
    .await;
    let (a, _) = connect(
        &relay,
        t,
        CellOptions {
            auth: AuthMode::Link,
            ..CellOptions::default()
        },
    )
    .await;
    // A notice in b's queue (for a message to nobody): recv_many, like
    // recv, passes over it.
    b.send(Keypair::generate().public(), Lane::Normal, &b"lost"[..])
        .await
        .unwrap();
    wait_until("the notice arrived", || b.undelivered().total == 1).await;
    const N: u32 = 5000;
    for n in 0..N {
        a.send(b_key.public(), Lane::Normal, seq(n)).await.unwrap();
    }

    let mut out = Vec::new();
    assert_eq!(b.recv_many(&mut out, 0).await, 0, "max 0 takes nothing");
    let mut next = 0u32;
    let mut calls = 0;
    while next < N {
        // Small takes split batches, large ones take several; a message
        // in between comes through next_event and recv, in order too.
        let max = if calls % 2 == 0 { 7 } else { 1000 };
        calls += 1;
        out.clear();
        let got = tokio::time::timeout(WAIT, b.recv_many(&mut out, max))
            .await
            .expect("messages in time");
        assert!(got >= 1 && got <= max, "{got} of at most {max}");
        assert_eq!(got, out.len());
        for m in &out {
            assert_eq!(seq_of(m), next, "in order");
            next += 1;
        }
        if calls == 3 && next + 1 < N {
            match next_event(&mut b).await {
                Event::Message(m) => assert_eq!(seq_of(&m), next),
                e => panic!("expected a message, got {e:?}"),
            }
            assert_eq!(seq_of(&next_message(&mut b).await), next + 1);
            next += 2;
        }
    }
    assert!(calls > 2, "{calls}");
    // recv_many appends.
    a.send(b_key.public(), Lane::Normal, seq(N)).await.unwrap();
    out.clear();
    out.push(placeholder());
    assert_eq!(
        tokio::time::timeout(WAIT, b.recv_many(&mut out, 10))
            .await
            .unwrap(),
        1
    );
    assert_eq!((out.len(), seq_of(&out[1])), (2, N));
    assert_eq!(b.stats().received, N as u64 + 1);
    assert_eq!(b.stats().dropped_events, 0);

    // Once the cell has stopped for good: 0, and why.
    let newcomer = take_over(&relay, t, &b_key).await;
    out.clear();
    let got = tokio::time::timeout(WAIT, b.recv_many(&mut out, 10))
        .await
        .expect("the stop noticed in time");
    assert_eq!((got, out.len()), (0, 0));
    let reason = b.down_reason().expect("down");
    assert!(reason.contains("replaced by a newer link"), "{reason}");
    assert_eq!(b.recv_many(&mut out, 10).await, 0);
    a.close().await.unwrap();
    b.close().await.unwrap();
    newcomer.close().await.unwrap();
}

/// A message to pre-fill an output vector with.
fn placeholder() -> Received {
    Received {
        id: MessageId([0; 16]),
        source: PublicKey([0; 32]),
        destination: Destination::Broadcast,
        lane: Lane::Normal,
        timestamp_ms: 0,
        payload: Bytes::from_static(&[0xff; 4]),
        auth: ReceivedAuth::Link,
        durable: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_event_queue_holds_the_link_back_and_loses_nothing() {
    let relay = TestRelay::start().await;
    for t in Transport::ALL {
        // Batches from the relay are larger than the whole queue.
        let (mut b, b_key) = connect(
            &relay,
            t,
            CellOptions {
                event_queue: 8,
                ..CellOptions::default()
            },
        )
        .await;
        let (a, _) = connect(
            &relay,
            t,
            CellOptions {
                auth: AuthMode::Link,
                ..CellOptions::default()
            },
        )
        .await;
        const N: u32 = 3000;
        for n in 0..N {
            a.send(b_key.public(), Lane::Bulk, seq(n)).await.unwrap();
        }
        let mut out = Vec::new();
        let mut next = 0;
        while next < N {
            if next % 2 == 0 {
                assert_eq!(seq_of(&next_message(&mut b).await), next);
                next += 1;
            } else {
                out.clear();
                let got = tokio::time::timeout(WAIT, b.recv_many(&mut out, 5))
                    .await
                    .unwrap();
                assert!((1..=5).contains(&got));
                for m in &out {
                    assert_eq!(seq_of(m), next);
                    next += 1;
                }
            }
        }
        assert_eq!(b.stats().received, N as u64, "{t}");
        a.close().await.unwrap();
        b.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_a_restarted_relay_forgot_are_dropped_across_a_dedup_rotation() {
    // A relay drops the copies it has seen; one that restarted has seen
    // none, so the cell's own dedup is what stops a replay across it.
    let mut relay = TestRelay::start().await;
    let t = Transport::Quic;
    let quick = CellOptions {
        backoff_initial: Duration::from_millis(10),
        backoff_max: Duration::from_millis(100),
        ..CellOptions::default()
    };
    // Two generations of two ids each.
    let (mut cell, key) = connect(
        &relay,
        t,
        CellOptions {
            dedup_capacity: 4,
            ..quick.clone()
        },
    )
    .await;
    let me = key.public();
    let sender_key = Keypair::generate();
    let mut sender = connect_as(
        &relay,
        t,
        sender_key.clone(),
        CellOptions {
            auth: AuthMode::Link,
            ..quick
        },
    )
    .await;
    // Fixed nonce and timestamp: each send of one of these is the same
    // bytes, the same id.
    let msg = |n: u8| {
        Message::new(
            sender_key.public(),
            Destination::Cell(me),
            Bytes::from(vec![n]),
        )
        .with_timestamp(now_ms())
        .with_nonce(u64::from(n))
    };
    let (e1, e2, e3, e4, e5) = (msg(1), msg(2), msg(3), msg(4), msg(5));
    // Each phase is one run of the relay. The cell's generations:
    // [e1 e2] | [e3] e1 is a duplicate of the older one, [e3 e4] |
    // rotation at e5, e1 and e2 forgotten | next run: e1 is new again, e3
    // a duplicate.
    let phases: [(&[&Message], &[u8]); 3] = [
        (&[&e1, &e2, &e3], &[1, 2, 3]),
        (&[&e1, &e4, &e5], &[4, 5]),
        (&[&e1, &e3], &[1]),
    ];
    for (i, (send, want)) in phases.into_iter().enumerate() {
        if i > 0 {
            relay.restart().await;
            for c in [&mut cell, &mut sender] {
                loop {
                    match next_event(c).await {
                        Event::Reconnected => break,
                        Event::Disconnected { .. } => {}
                        e => panic!("expected the reconnect, got {e:?}"),
                    }
                }
            }
        }
        for m in send {
            sender.send_message((*m).clone()).await.unwrap();
        }
        for w in want {
            assert_eq!(
                &next_message(&mut cell).await.payload[..],
                &[*w],
                "phase {i}"
            );
        }
    }
    sender.send_message(msg(9)).await.unwrap();
    next_is_marker(&mut cell, &[9]).await;
    let s = cell.stats();
    assert_eq!((s.received, s.dropped_duplicate), (7, 2), "{s:?}");
    cell.close().await.unwrap();
    sender.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cells_can_share_one_endpoint() {
    let relay = TestRelay::start().await;
    let t = Transport::Quic;
    let endpoint =
        relay_client::link::quic::client_endpoint("127.0.0.1:0".parse().unwrap()).unwrap();
    let shared = CellOptions {
        endpoint: Some(endpoint.clone()),
        ..CellOptions::default()
    };
    let (mut a, a_key) = connect(&relay, t, shared.clone()).await;
    let (mut b, b_key) = connect(&relay, t, shared).await;
    assert_eq!(endpoint.open_connections(), 2);
    // c has its own socket: the shared one carries no third connection.
    let (mut c, c_key) = connect(&relay, t, CellOptions::default()).await;
    assert_eq!(endpoint.open_connections(), 2);

    a.send(b_key.public(), Lane::Normal, &b"a to b"[..])
        .await
        .unwrap();
    assert_eq!(&next_message(&mut b).await.payload[..], b"a to b");
    b.send(a_key.public(), Lane::High, &b"b to a"[..])
        .await
        .unwrap();
    assert_eq!(&next_message(&mut a).await.payload[..], b"b to a");

    // Closing a closes its connection only: the endpoint carries b on.
    a.close().await.unwrap();
    wait_until("a's connection went away", || {
        endpoint.open_connections() == 1
    })
    .await;
    assert!(b.is_connected());
    b.send(c_key.public(), Lane::Normal, &b"b to c"[..])
        .await
        .unwrap();
    assert_eq!(&next_message(&mut c).await.payload[..], b"b to c");
    c.send(b_key.public(), Lane::Normal, &b"c to b"[..])
        .await
        .unwrap();
    assert_eq!(&next_message(&mut b).await.payload[..], b"c to b");
    // A new cell can still join through it.
    let (mut d, d_key) = connect(
        &relay,
        t,
        CellOptions {
            endpoint: Some(endpoint.clone()),
            ..CellOptions::default()
        },
    )
    .await;
    b.send(d_key.public(), Lane::Normal, &b"b to d"[..])
        .await
        .unwrap();
    assert_eq!(&next_message(&mut d).await.payload[..], b"b to d");
    for cell in [b, c, d] {
        cell.close().await.unwrap();
    }
    tokio::time::timeout(WAIT, endpoint.wait_idle())
        .await
        .expect("the shared endpoint goes idle once its cells closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_traced_message_on_one_relay_reports_its_one_hop() {
    let relay = TestRelay::start().await;
    let t = Transport::Quic;
    let (mut a, a_key) = connect(&relay, t, CellOptions::default()).await;
    let (mut b, b_key) = connect(&relay, t, CellOptions::default()).await;
    let mut msg = relay_codec::Message::new(
        a_key.public(),
        Destination::Cell(b_key.public()),
        Bytes::from_static(b"traced"),
    );
    msg.trace = true;
    let id = a.send_message(msg).await.expect("send traced");
    assert_eq!(&next_message(&mut b).await.payload[..], b"traced");
    let hop = loop {
        match next_event(&mut a).await {
            relay_client::cell::Event::Trace(h) => break h,
            other => println!("skipping {other:?}"),
        }
    };
    assert_eq!(hop.id, id);
    assert_eq!(hop.relay, relay.key, "the relay reports");
    assert_eq!(hop.next, b_key.public(), "delivered to the destination");
}
