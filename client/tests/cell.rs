//! The cell API over real QUIC on loopback, against the stand-in relay of
//! `common` (built from the link layer; the real relay lives in another
//! crate).

mod common;

use bytes::{Bytes, BytesMut};
use common::{RelayBehaviour, StandIn, WAIT, now_ms};
use relay_client::cell::{
    AuthMode, Cell, CellError, CellOptions, Event, Received, ReceivedAuth, Undelivered,
};
use relay_codec::frame::{CloseCode, NoticeCode};
use relay_codec::{
    Authenticator, Destination, Envelope, Frame, Keypair, Lane, Limits, Message, MessageId,
    NodeAddr, PublicKey, ServiceName,
};
use std::time::{Duration, Instant};

fn svc(s: &str) -> ServiceName {
    ServiceName::new(s).unwrap()
}

async fn connect(relay: &StandIn, opts: CellOptions) -> (Cell, Keypair) {
    let key = Keypair::generate();
    let cell = tokio::time::timeout(WAIT, Cell::connect(&relay.addr, key.clone(), opts))
        .await
        .expect("connect in time")
        .expect("connect");
    relay.attached(key.public(), false).await;
    (cell, key)
}

async fn next_message(cell: &mut Cell) -> Received {
    tokio::time::timeout(WAIT, cell.recv())
        .await
        .expect("a message in time")
        .expect("the cell is open")
}

async fn next_event(cell: &mut Cell) -> Event {
    tokio::time::timeout(WAIT, cell.next_event())
        .await
        .expect("an event in time")
        .expect("the cell is open")
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cells_exchange_signed_and_link_authenticated_messages() {
    let relay = StandIn::start(RelayBehaviour::default()).await;
    let (mut a, a_key) = connect(&relay, CellOptions::default()).await;
    let (mut b, b_key) = connect(
        &relay,
        CellOptions {
            auth: AuthMode::Link,
            agent: "test-b/1".into(),
            ..CellOptions::default()
        },
    )
    .await;
    assert!(
        relay
            .hub
            .lock()
            .unwrap()
            .agents
            .contains(&"test-b/1".to_string())
    );

    let before = now_ms();
    let id = a
        .send(b_key.public(), Lane::High, &b"hello b"[..])
        .await
        .unwrap();
    let m = next_message(&mut b).await;
    assert_eq!(m.id, id);
    assert_eq!(m.source, a_key.public());
    assert_eq!(m.destination, Destination::Cell(b_key.public()));
    assert_eq!(m.lane, Lane::High);
    assert_eq!(&m.payload[..], b"hello b");
    assert_eq!(m.auth, ReceivedAuth::Signature);
    assert!(m.timestamp_ms >= before && m.timestamp_ms <= now_ms());

    let id = b
        .send(a_key.public(), Lane::Bulk, vec![0xff, 0, 1])
        .await
        .unwrap();
    let m = next_message(&mut a).await;
    assert_eq!((m.id, m.auth, m.lane), (id, ReceivedAuth::Link, Lane::Bulk));
    assert_eq!(&m.payload[..], &[0xff, 0, 1]);

    // What the relay saw: the cell's own key as source, signed per mode,
    // distinct nonces.
    let seen = relay.seen();
    assert_eq!(seen.len(), 2);
    assert!(matches!(
        seen[0].authenticator(),
        Authenticator::Signature(_)
    ));
    assert!(matches!(seen[1].authenticator(), Authenticator::None));
    seen[0].verify().unwrap();

    // Many messages on one lane arrive in order.
    for n in 0..100u32 {
        a.send(b_key.public(), Lane::Normal, n.to_le_bytes().to_vec())
            .await
            .unwrap();
    }
    for n in 0..100u32 {
        let m = next_message(&mut b).await;
        assert_eq!(&m.payload[..], &n.to_le_bytes());
    }
    assert_eq!(b.stats().received, 101);
    a.close().await.unwrap();
    b.close().await.unwrap();
    let closes = relay.hub.lock().unwrap().closes.clone();
    assert!(
        closes.contains(&(a_key.public(), CloseCode::Normal)),
        "{closes:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_broadcast_and_discovery() {
    let relay = StandIn::start(RelayBehaviour::default()).await;
    let (mut echo, echo_key) = connect(
        &relay,
        CellOptions {
            app_version: "echo-1.2".into(),
            services: vec![svc("echo")],
            ..CellOptions::default()
        },
    )
    .await;
    relay.attached(echo_key.public(), true).await;
    let (a, a_key) = connect(&relay, CellOptions::default()).await;
    let (mut b, _) = connect(&relay, CellOptions::default()).await;

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

    // A later announcement replaces the first.
    b.announce("b-2", vec![svc("echo"), svc("other")])
        .await
        .unwrap();
    let until = Instant::now() + WAIT;
    loop {
        let found = a.discover(&svc("other")).await.unwrap();
        if found.len() == 1 {
            assert_eq!(found[0].1, "b-2");
            break;
        }
        assert!(Instant::now() < until, "the new announcement never arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for c in [a, b, echo] {
        c.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_and_notices_become_events() {
    let relay = StandIn::start(RelayBehaviour::default()).await;
    let (mut watcher, w_key) = connect(&relay, CellOptions::default()).await;
    watcher.watch_presence(true).await.unwrap();
    // Wait until the stand-in has the watch.
    let until = Instant::now() + WAIT;
    while !relay.hub.lock().unwrap().cells[&w_key.public()].watching {
        assert!(Instant::now() < until);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (other, o_key) = connect(
        &relay,
        CellOptions {
            app_version: "o-1".into(),
            services: vec![svc("x")],
            ..CellOptions::default()
        },
    )
    .await;
    match next_event(&mut watcher).await {
        Event::Presence { up: true, info } => {
            assert_eq!(info.key, o_key.public());
            assert_eq!(info.app_version, "o-1");
            assert_eq!(info.services, vec![svc("x")]);
        }
        e => panic!("expected presence, got {e:?}"),
    }
    other.close().await.unwrap();
    match next_event(&mut watcher).await {
        Event::Presence { up: false, info } => assert_eq!(info.key, o_key.public()),
        e => panic!("expected presence down, got {e:?}"),
    }

    // Notices become events, and their counts are summed on the handle.
    let id = MessageId([7; 16]);
    assert_eq!(watcher.undelivered(), Undelivered::default());
    for (code, count, subject) in [
        (NoticeCode::UnknownDestination, 3, o_key.public()),
        (NoticeCode::Expired, 2, PublicKey([0; 32])),
        (NoticeCode::UnknownDestination, 1, o_key.public()),
    ] {
        relay.control(
            w_key.public(),
            Frame::Notice {
                code,
                count,
                id,
                subject,
            },
        );
        assert_eq!(
            next_event(&mut watcher).await,
            Event::Notice {
                code,
                count,
                id,
                subject
            }
        );
    }
    let u = watcher.undelivered();
    assert_eq!((u.total, u.notices), (6, 3));
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
    assert!(u.complete, "the stand-in answered the close with its Close");
    assert_eq!(u.total, 6);
}

fn raw(key: &Keypair, to: PublicKey, nonce: u64, payload: &'static [u8]) -> Message {
    Message::new(
        key.public(),
        Destination::Cell(to),
        Bytes::from_static(payload),
    )
    .with_timestamp(now_ms())
    .with_nonce(nonce)
}

fn envelope(bytes: BytesMut) -> Envelope {
    Envelope::parse(&mut bytes.freeze(), &Limits::default()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_signatures_sealed_messages_and_duplicates_are_dropped() {
    let relay = StandIn::start(RelayBehaviour::default()).await;
    let (mut cell, key) = connect(&relay, CellOptions::default()).await;
    let sender = Keypair::generate();
    let me = key.public();

    let mut good = BytesMut::new();
    raw(&sender, me, 1, b"good").encode_signed(&sender, &mut good);
    let good = envelope(good);
    // Payload changed after signing.
    let mut forged = BytesMut::from(&good.raw()[..]);
    let at = forged.len() - 64 - 1;
    forged[at] ^= 0x20;
    let forged = envelope(forged);
    // Signed by someone else than the source.
    let mut impostor = BytesMut::new();
    raw(&sender, me, 2, b"impostor").encode_signed(&Keypair::generate(), &mut impostor);
    let mut sealed_msg = raw(&sender, me, 3, b"sealed");
    sealed_msg.auth = Authenticator::AeadTag([9; 16]);
    let mut sealed = BytesMut::new();
    sealed_msg.encode(&mut sealed);
    let mut unsigned = BytesMut::new();
    raw(&sender, me, 4, b"unsigned").encode(&mut unsigned);

    for env in [
        forged,
        good.clone(),
        envelope(impostor),
        envelope(sealed),
        good.clone(),
        envelope(unsigned),
        good.clone(),
    ] {
        relay.inject(me, env);
    }
    let m = next_message(&mut cell).await;
    assert_eq!(
        (&m.payload[..], m.auth),
        (&b"good"[..], ReceivedAuth::Signature)
    );
    assert_eq!(m.id, good.id());
    let m = next_message(&mut cell).await;
    assert_eq!(
        (&m.payload[..], m.auth),
        (&b"unsigned"[..], ReceivedAuth::Link)
    );
    let mut marker = BytesMut::new();
    raw(&sender, me, 5, b"marker").encode(&mut marker);
    relay.inject(me, envelope(marker));
    next_is_marker(&mut cell, b"marker").await;
    let s = cell.stats();
    assert_eq!(s.received, 3);
    assert_eq!(s.dropped_bad_signature, 2);
    assert_eq!(s.dropped_unsupported, 1);
    assert_eq!(s.dropped_duplicate, 2);

    // Many signed messages in one batch take the batch-verification path.
    for n in 0..100 {
        let mut b = BytesMut::new();
        raw(&sender, me, 1000 + n, b"bulk").encode_signed(&sender, &mut b);
        relay.inject(me, envelope(b));
    }
    for n in 0..100 {
        let m = next_message(&mut cell).await;
        assert_eq!(m.source, sender.public());
        assert_eq!(&m.payload[..], b"bulk", "message {n}");
    }
    assert_eq!(cell.stats().received, 103);
    cell.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sending_checks_size_and_source() {
    let relay = StandIn::start(RelayBehaviour {
        max_payload: Some(1000),
        ..RelayBehaviour::default()
    })
    .await;
    let (cell, key) = connect(&relay, CellOptions::default()).await;
    let peer = Keypair::generate().public();
    // The relay's Welcome lowers the limit below the cell's own.
    cell.send(peer, Lane::Normal, vec![0; 1000]).await.unwrap();
    match cell.send(peer, Lane::Normal, vec![0; 1001]).await {
        Err(CellError::PayloadTooLarge {
            size: 1001,
            limit: 1000,
        }) => {}
        other => panic!("expected PayloadTooLarge, got {other:?}"),
    }
    let foreign = Message::new(peer, Destination::Broadcast, Bytes::new());
    let err = cell.send_message(foreign).await.unwrap_err();
    assert!(matches!(err, CellError::Invalid(_)), "{err}");
    // A full message keeps what the caller set.
    let msg = Message::new(
        key.public(),
        Destination::Cell(peer),
        Bytes::from_static(b"m"),
    )
    .with_ttl(3)
    .with_lane(Lane::Bulk)
    .with_nonce(42)
    .with_timestamp(now_ms() - 1000);
    let id = cell.send_message(msg.clone()).await.unwrap();
    cell.close().await.unwrap();
    let seen = relay.seen();
    let last = seen.iter().find(|e| e.id() == id).expect("relay got it");
    assert_eq!((last.ttl(), last.lane(), last.nonce()), (3, Lane::Bulk, 42));
    assert_eq!(last.timestamp_ms(), msg.timestamp_ms);
    last.verify().unwrap();
    // The stamped message got a nonce and a timestamp of its own.
    let stamped = seen.iter().find(|e| e.payload().len() == 1000).unwrap();
    assert_ne!(stamped.nonce(), 42);
    assert!(stamped.timestamp_ms() > msg.timestamp_ms);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_wrong_key_silent_and_unreachable_relays_fail_clearly() {
    let refusing = StandIn::start(RelayBehaviour {
        refuse: Some((CloseCode::Unauthorized, "key not on the allowlist".into())),
        ..RelayBehaviour::default()
    })
    .await;
    match Cell::connect(&refusing.addr, Keypair::generate(), CellOptions::default()).await {
        Err(CellError::Refused { code, reason }) => {
            assert_eq!(code, CloseCode::Unauthorized);
            assert_eq!(reason, "key not on the allowlist");
        }
        other => panic!("expected Refused, got {other:?}"),
    }

    // Right address, wrong key: the TLS handshake fails, with a hint.
    let relay = StandIn::start(RelayBehaviour::default()).await;
    let wrong = NodeAddr {
        key: Keypair::generate().public(),
        ..relay.addr.clone()
    };
    let err = Cell::connect(&wrong, Keypair::generate(), CellOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, CellError::Connect { .. }), "{err:?}");
    assert!(err.to_string().contains("relay's public key"), "{err}");

    let opts = CellOptions {
        connect_timeout: Duration::from_millis(500),
        ..CellOptions::default()
    };
    let silent = StandIn::start(RelayBehaviour {
        silent: true,
        ..RelayBehaviour::default()
    })
    .await;
    let err = Cell::connect(&silent.addr, Keypair::generate(), opts.clone())
        .await
        .unwrap_err();
    assert!(matches!(err, CellError::Timeout(_)), "{err:?}");
    assert!(err.to_string().contains("did not answer Hello"), "{err}");

    // Nobody on the port.
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = socket.local_addr().unwrap().port();
    drop(socket);
    let nowhere = NodeAddr {
        key: Keypair::generate().public(),
        host: "127.0.0.1".into(),
        port,
    };
    let started = Instant::now();
    let err = Cell::connect(&nowhere, Keypair::generate(), opts)
        .await
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert!(matches!(err, CellError::Timeout(_)), "{err:?}");
    assert!(
        err.to_string().contains("could not reach the relay"),
        "{err}"
    );

    let unresolvable = NodeAddr {
        host: "no-such-host.invalid".into(),
        ..relay.addr.clone()
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
async fn a_lost_link_is_re_established_with_queued_messages_and_announcements() {
    let relay = StandIn::start(RelayBehaviour::default()).await;
    let (mut a, a_key) = connect(
        &relay,
        CellOptions {
            app_version: "a-1".into(),
            services: vec![svc("svc-a")],
            backoff_initial: Duration::from_millis(600),
            backoff_max: Duration::from_millis(1000),
            ..CellOptions::default()
        },
    )
    .await;
    a.watch_presence(true).await.unwrap();
    let (mut b, b_key) = connect(&relay, CellOptions::default()).await;
    // A round trip on b's control stream, then on a's: a presence the
    // stand-in sent a about b would be among a's events by the time a's
    // discover is answered.
    b.discover(&svc("svc-a")).await.unwrap();
    a.discover(&svc("svc-a")).await.unwrap();
    assert_eq!(
        queued_event(&mut a).await,
        None,
        "b attached without announcing: no presence"
    );

    relay.kick(a_key.public());
    match next_event(&mut a).await {
        Event::Disconnected { reason } => {
            assert!(
                reason.contains("Shutdown") && reason.contains("test kick"),
                "{reason}"
            )
        }
        e => panic!("expected Disconnected, got {e:?}"),
    }
    assert!(!a.is_connected());
    // Sent while down: queued, delivered once the link is back.
    for n in 0..20u8 {
        a.send(b_key.public(), Lane::Normal, vec![n]).await.unwrap();
    }
    assert!(matches!(
        a.discover(&svc("svc-a")).await,
        Err(CellError::Disconnected(_))
    ));
    assert_eq!(next_event(&mut a).await, Event::Reconnected);
    assert!(a.is_connected());
    for n in 0..20u8 {
        assert_eq!(&next_message(&mut b).await.payload[..], &[n]);
    }
    assert_eq!(a.stats().reconnects, 1);
    // Announcement and presence watch were re-sent.
    relay.attached(a_key.public(), true).await;
    assert_eq!(
        b.discover(&svc("svc-a")).await.unwrap(),
        vec![(a_key.public(), "a-1".to_string())]
    );
    let until = Instant::now() + WAIT;
    while !relay.hub.lock().unwrap().cells[&a_key.public()].watching {
        assert!(Instant::now() < until, "watch not re-sent");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(relay.hub.lock().unwrap().links, 3);
    a.close().await.unwrap();
    b.close().await.unwrap();
}

/// The next event if one is already queued; `None` without waiting.
async fn queued_event(cell: &mut Cell) -> Option<Event> {
    tokio::select! {
        biased;
        e = cell.next_event() => e,
        _ = std::future::ready(()) => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_reconnect_the_cell_stops_and_says_why() {
    let relay = StandIn::start(RelayBehaviour::default()).await;
    let (mut a, a_key) = connect(
        &relay,
        CellOptions {
            reconnect: false,
            ..CellOptions::default()
        },
    )
    .await;
    relay.kick(a_key.public());
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
    assert!(err.to_string().contains("test kick"), "{err}");
    a.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_flushes_everything_queued() {
    let relay = StandIn::start(RelayBehaviour::default()).await;
    let (mut b, b_key) = connect(&relay, CellOptions::default()).await;
    let (a, _) = connect(
        &relay,
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
    let started = Instant::now();
    a.close().await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    let mut last = [None::<u32>; 4];
    for _ in 0..N {
        let m = next_message(&mut b).await;
        let n = u32::from_le_bytes(m.payload[..].try_into().unwrap());
        let lane = m.lane.index();
        assert!(last[lane].is_none_or(|l| l < n), "lane order");
        last[lane] = Some(n);
    }
    assert_eq!(b.stats().received, N as u64);
    b.close().await.unwrap();
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
    let relay = StandIn::start(RelayBehaviour::default()).await;
    let (mut b, b_key) = connect(
        &relay,
        CellOptions {
            reconnect: false,
            ..CellOptions::default()
        },
    )
    .await;
    let (a, _) = connect(
        &relay,
        CellOptions {
            auth: AuthMode::Link,
            ..CellOptions::default()
        },
    )
    .await;
    // A notice in the queue: recv_many, like recv, passes over it.
    relay.control(
        b_key.public(),
        Frame::Notice {
            code: NoticeCode::UnknownDestination,
            count: 1,
            id: MessageId([1; 16]),
            subject: b_key.public(),
        },
    );
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
        if calls == 3 && next < N {
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
    relay.kick(b_key.public());
    out.clear();
    let got = tokio::time::timeout(WAIT, b.recv_many(&mut out, 10))
        .await
        .expect("the stop noticed in time");
    assert_eq!((got, out.len()), (0, 0));
    let reason = b.down_reason().expect("down");
    assert!(reason.contains("test kick"), "{reason}");
    assert_eq!(b.recv_many(&mut out, 10).await, 0);
    a.close().await.unwrap();
    b.close().await.unwrap();
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
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_event_queue_holds_the_link_back_and_loses_nothing() {
    let relay = StandIn::start(RelayBehaviour::default()).await;
    // Batches from the relay are larger than the whole queue.
    let (mut b, b_key) = connect(
        &relay,
        CellOptions {
            event_queue: 8,
            ..CellOptions::default()
        },
    )
    .await;
    let (a, _) = connect(
        &relay,
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
    assert_eq!(b.stats().received, N as u64);
    a.close().await.unwrap();
    b.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_are_dropped_across_a_dedup_rotation() {
    let relay = StandIn::start(RelayBehaviour::default()).await;
    // Two generations of two ids each.
    let (mut cell, key) = connect(
        &relay,
        CellOptions {
            dedup_capacity: 4,
            ..CellOptions::default()
        },
    )
    .await;
    let me = key.public();
    let sender = Keypair::generate();
    let msg = |n: u8| {
        let mut b = BytesMut::new();
        Message::new(sender.public(), Destination::Cell(me), Bytes::from(vec![n]))
            .with_timestamp(now_ms())
            .with_nonce(u64::from(n))
            .encode(&mut b);
        envelope(b)
    };
    let (e1, e2, e3, e4) = (msg(1), msg(2), msg(3), msg(4));
    // e1 e2 | rotation | e3, e1 (a duplicate from the older generation),
    // e4 | rotation: e1 is forgotten | e1 again (delivered), e3 (a
    // duplicate).
    for env in [&e1, &e2, &e3, &e1, &e4, &e1, &e3] {
        relay.inject(me, env.clone());
    }
    for want in [1u8, 2, 3, 4, 1] {
        let m = next_message(&mut cell).await;
        assert_eq!(&m.payload[..], &[want]);
    }
    relay.inject(me, msg(9));
    next_is_marker(&mut cell, &[9]).await;
    let s = cell.stats();
    assert_eq!((s.received, s.dropped_duplicate), (6, 2), "{s:?}");
    cell.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cells_can_share_one_endpoint() {
    let relay = StandIn::start(RelayBehaviour::default()).await;
    let endpoint =
        relay_client::link::quic::client_endpoint("127.0.0.1:0".parse().unwrap()).unwrap();
    let shared = CellOptions {
        endpoint: Some(endpoint.clone()),
        ..CellOptions::default()
    };
    let (mut a, a_key) = connect(&relay, shared.clone()).await;
    let (mut b, b_key) = connect(&relay, shared).await;
    let (mut c, c_key) = connect(&relay, CellOptions::default()).await;
    // One UDP socket for a and b; c has its own.
    let port = |k: PublicKey| relay.hub.lock().unwrap().cells[&k].link.remote_address();
    let local = endpoint.local_addr().unwrap();
    assert_eq!(port(a_key.public()), local);
    assert_eq!(port(b_key.public()), local);
    assert_ne!(port(c_key.public()), local);
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
    let until = Instant::now() + WAIT;
    while endpoint.open_connections() > 1 {
        assert!(Instant::now() < until, "a's connection never went away");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
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
