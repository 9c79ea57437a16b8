//! Durable store-and-forward through a real relay process: a durable
//! message is acknowledged to its sender only once logged, survives a
//! SIGKILL of the relay, reaches its cell when it attaches (in order per
//! lane), and leaves the log when that cell acknowledges it. A full log
//! refuses new durable messages while best-effort ones still flow.

use relay_codec::frame::DurableStatus;
use relay_codec::{Destination, Envelope, Frame, Keypair, Lane, MessageId, Qos};
use relay_tests::RelayProcess;
use relay_tests::cells::WAIT;
use relay_tests::raw::{RawLink, message, signed};

async fn link(relay: &RelayProcess, key: Keypair) -> RawLink {
    RawLink::connect(relay, key)
        .await
        .unwrap_or_else(|e| panic!("raw link: {e}; relay log:\n{}", relay.log()))
}

fn durable(from: &Keypair, to: &Keypair, lane: Lane, text: &str) -> Envelope {
    let m = message(
        from,
        Destination::Cell(to.public()),
        lane,
        text.as_bytes().to_vec(),
    )
    .with_qos(Qos::Durable);
    signed(&m, from)
}

/// DurableAck frames until `n` ids came with `status`; panics on another.
async fn acks(link: &mut RawLink, status: DurableStatus, n: usize) -> Vec<MessageId> {
    let mut got = Vec::new();
    while got.len() < n {
        match link.next_control(WAIT).await {
            Some(Frame::DurableAck { status: s, ids }) => {
                assert_eq!(s, status, "ids {ids:?}");
                got.extend(ids);
            }
            Some(_) => {}
            None => panic!("{} of {n} DurableAcks ({status:?}) came", got.len()),
        }
    }
    got
}

#[tokio::test]
async fn an_offline_cell_gets_what_was_acked_after_a_relay_crash_in_lane_order() {
    let relay = RelayProcess::start();
    let (a, b) = (Keypair::generate(), Keypair::generate());
    let mut sender = link(&relay, a.clone()).await;
    let bulk: Vec<Envelope> = (0..3)
        .map(|i| durable(&a, &b, Lane::Bulk, &format!("bulk {i}")))
        .collect();
    let high: Vec<Envelope> = (0..3)
        .map(|i| durable(&a, &b, Lane::High, &format!("high {i}")))
        .collect();
    sender.send_batch(Lane::Bulk, &bulk).await.unwrap();
    sender.send_batch(Lane::High, &high).await.unwrap();
    let mut acked = acks(&mut sender, DurableStatus::Acked, 6).await;
    let mut want: Vec<MessageId> = bulk.iter().chain(&high).map(Envelope::id).collect();
    acked.sort_by_key(|i| i.0);
    want.sort_by_key(|i| i.0);
    assert_eq!(acked, want, "every message acked once");
    drop(sender);

    // A crash: no shutdown, no flush.
    let relay = relay.kill_and_restart("", "127.0.0.1:0", &[]);
    relay.wait_log("durable log", WAIT);
    let mut receiver = link(&relay, b.clone()).await;
    let mut got = Vec::new();
    for _ in 0..6 {
        let env = receiver
            .next_message(WAIT)
            .await
            .unwrap_or_else(|| panic!("got {} of 6; relay log:\n{}", got.len(), relay.log()));
        got.push(env);
    }
    let per_lane = |lane: Lane| -> Vec<MessageId> {
        got.iter()
            .filter(|e| e.lane() == lane)
            .map(Envelope::id)
            .collect()
    };
    assert_eq!(
        per_lane(Lane::High),
        high.iter().map(Envelope::id).collect::<Vec<_>>()
    );
    assert_eq!(
        per_lane(Lane::Bulk),
        bulk.iter().map(Envelope::id).collect::<Vec<_>>()
    );
    assert!(
        got.iter()
            .all(|e| e.qos() == Qos::Durable && e.source() == a.public())
    );

    receiver
        .send_control(&Frame::DurableAck {
            status: DurableStatus::Acked,
            ids: got.iter().map(Envelope::id).collect(),
        })
        .await
        .unwrap();
    relay
        .wait_metric_async("celluler_durable_released_total", "", 6.0, WAIT)
        .await;
    // Released and restarted again: nothing comes back.
    drop(receiver);
    let relay = relay.kill_and_restart("", "127.0.0.1:0", &[]);
    let mut receiver = link(&relay, b).await;
    let mut probe = link(&relay, Keypair::generate()).await;
    let marker = durable(
        &probe.key.clone(),
        &receiver.key.clone(),
        Lane::Bulk,
        "marker",
    );
    probe
        .send_batch(Lane::Bulk, std::slice::from_ref(&marker))
        .await
        .unwrap();
    let first = receiver.next_message(WAIT).await.expect("the marker");
    assert_eq!(
        first.id(),
        marker.id(),
        "a released message came back after a restart"
    );
}

#[tokio::test]
async fn a_full_log_refuses_durable_messages_while_best_effort_flows() {
    let toml = "[storage]\nsegment_bytes = 4096\nmax_bytes = 8192\n";
    let relay = RelayProcess::start_with_config(toml);
    let (a, b) = (Keypair::generate(), Keypair::generate());
    let mut sender = link(&relay, a.clone()).await;
    let mut receiver = link(&relay, b.clone()).await;
    // One segment of 4 KiB holds a few 1 KiB messages; the bound allows
    // no second one for messages.
    let mut refused = None;
    let mut stored = Vec::new();
    for i in 0..16 {
        let env = durable(&a, &b, Lane::Normal, &format!("{i:01000}"));
        sender
            .send_batch(Lane::Normal, std::slice::from_ref(&env))
            .await
            .unwrap();
        match sender.next_control(WAIT).await {
            Some(Frame::DurableAck {
                status: DurableStatus::Acked,
                ids,
            }) => {
                assert_eq!(ids, vec![env.id()]);
                stored.push(env.id());
            }
            Some(Frame::DurableAck {
                status: DurableStatus::Full,
                ids,
            }) => {
                assert_eq!(ids, vec![env.id()]);
                refused = Some(env.id());
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(refused.is_some(), "a 8 KiB log refused nothing");
    assert!(!stored.is_empty());
    relay
        .wait_metric_async("celluler_durable_refused_total", "", 1.0, WAIT)
        .await;
    relay.wait_log(
        "durable message refused: refused: the relay's durable log is full (storage.max_bytes)",
        WAIT,
    );
    // Best effort still flows.
    let m = message(
        &a,
        Destination::Cell(b.public()),
        Lane::Normal,
        b"best effort".to_vec(),
    );
    let be = signed(&m, &a);
    sender
        .send_batch(Lane::Normal, std::slice::from_ref(&be))
        .await
        .unwrap();
    // What was stored is delivered (not lost), then the best-effort one.
    let mut ids = Vec::new();
    while ids.len() < stored.len() + 1 {
        let env = receiver.next_message(WAIT).await.expect("a message");
        ids.push(env.id());
    }
    for id in stored.iter().chain([&be.id()]) {
        assert!(ids.contains(id), "{id} missing");
    }
}

/// Under durable load, the relay is SIGKILLed at random moments
/// (`KILLS` times; the seed is printed, `DURABLE_KILLS` raises the count)
/// and restarted on the same data directory and port. Every message
/// acknowledged to the sender reaches the receiving application exactly
/// once, and nothing that was not sent arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_messages_survive_sigkills_and_arrive_exactly_once() {
    use relay_client::cell::{CellOptions, DurableReceipt};
    use relay_tests::cells::{connect, within};
    use std::collections::{BTreeMap, BTreeSet};
    use std::time::Duration;

    let kills: usize = std::env::var("DURABLE_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let seed: u64 = std::env::var("DURABLE_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    println!("durable crash test: {kills} kills, DURABLE_SEED={seed}");
    let mut rng = fastrand::Rng::with_seed(seed);
    const BURST: usize = 40;

    // Over TCP, where a killed relay's connections end at once (its kernel
    // resets them); a QUIC cell would wait for its idle timeout. QUIC and
    // TCP share the port, fixed across restarts so the cells redial it.
    let mut relay = RelayProcess::start();
    let port = relay.quic.port();
    let listen = format!("127.0.0.1:{port}");
    let opts = || CellOptions {
        transport: relay_link::Transport::Tcp,
        backoff_initial: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
        ..CellOptions::default()
    };
    let (a, b) = (Keypair::generate(), Keypair::generate());
    let sender = connect(&relay, a, opts()).await;
    let mut receiver = connect(&relay, b.clone(), opts()).await;

    // Everything the application receives, in order.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(bool, Vec<u8>)>();
    let recv_task = tokio::spawn(async move {
        while let Some(m) = receiver.recv().await {
            if tx.send((m.durable, m.payload.to_vec())).is_err() {
                break;
            }
        }
    });

    let mut sent: BTreeSet<Vec<u8>> = BTreeSet::new();
    let mut pending: Vec<(Vec<u8>, DurableReceipt)> = Vec::new();
    let mut acked: BTreeSet<Vec<u8>> = BTreeSet::new();
    let mut n = 0u64;
    for round in 0..kills {
        for _ in 0..BURST {
            n += 1;
            let payload = format!("m{n}").into_bytes();
            let (_, receipt) = within(
                "queue a durable message",
                WAIT,
                sender
                    .handle()
                    .start_durable(b.public(), Lane::Normal, payload.clone()),
            )
            .await
            .expect("queued");
            sent.insert(payload.clone());
            pending.push((payload, receipt));
        }
        // Kill after a random number of this round's acks: mid-burst.
        let wait_for = rng.usize(0..BURST);
        let mut seen = 0;
        let mut still = Vec::new();
        for (payload, mut receipt) in pending.drain(..) {
            if seen >= wait_for {
                still.push((payload, receipt));
                continue;
            }
            let status = within("an ack", WAIT, &mut receipt)
                .await
                .expect("answered");
            assert_eq!(status, DurableStatus::Acked);
            acked.insert(payload);
            seen += 1;
        }
        pending = still;
        let t = std::time::Instant::now();
        relay = relay.kill_and_restart("", &listen, &[]);
        println!(
            "round {round}: {seen} acks before the kill, restarted in {:?}",
            t.elapsed()
        );
        assert_eq!(relay.quic.port(), port, "round {round}: same port");
    }
    // Every message is acknowledged in the end: the sender resends what
    // was not, after each reconnect.
    for (payload, receipt) in pending.drain(..) {
        let status = within("a late ack", WAIT, receipt).await.expect("answered");
        assert_eq!(status, DurableStatus::Acked);
        acked.insert(payload);
    }
    let mut g: BTreeMap<Vec<u8>, usize> = BTreeMap::new();
    while !acked.iter().all(|p| g.contains_key(p)) {
        let (durable, p) = within("the next delivery", WAIT, rx.recv())
            .await
            .expect("the receiver runs");
        assert!(durable, "a durable message arrives marked durable");
        *g.entry(p).or_default() += 1;
    }
    while let Ok((_, p)) = rx.try_recv() {
        *g.entry(p).or_default() += 1;
    }
    for (p, count) in &g {
        assert!(
            sent.contains(p),
            "{:?} was never sent",
            String::from_utf8_lossy(p)
        );
        assert_eq!(
            *count,
            1,
            "{:?} delivered {count} times",
            String::from_utf8_lossy(p)
        );
    }
    assert_eq!(acked.len(), sent.len());
    recv_task.abort();
}
