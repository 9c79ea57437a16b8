//! A sender faster than its receiver is slowed to the receiver's pace by
//! the relay (it stops reading the sender's lane while the receiver's queue
//! drains), so nothing is dropped; a broadcaster is never slowed for one
//! member. The case of a cell-addressed receiver that never drains is in
//! bad_input.rs (`a_cell_that_never_reads_loses_only_its_own_messages`).
//! Both run over QUIC and over TCP.

use relay_client::cell::{AuthMode, Cell, CellOptions};
use relay_codec::{Keypair, Lane};
use relay_link::Transport;
use relay_tests::cells::{WAIT, connect, options_over, within};
use relay_tests::raw::{RawLink, RawOptions, noise};
use relay_tests::{RelayProcess, each_transport};
use std::collections::HashSet;
use std::time::Duration;

/// A sending cell over `t` whose messages carry no signature (the relay
/// vouches for the source), so that a debug build is not bound by signing.
async fn unsigned_sender(relay: &RelayProcess, t: Transport) -> Cell {
    let opts = CellOptions {
        auth: AuthMode::Link,
        ..options_over(t)
    };
    connect(relay, Keypair::generate(), opts).await
}

/// Messages sent: ten times the relay's lane queue below, so a relay that
/// dropped instead of pausing would lose most of them.
const SENT: u64 = 20_000;

each_transport!(a_fast_sender_is_slowed_to_a_slow_receiver_and_nothing_is_lost);
async fn a_fast_sender_is_slowed_to_a_slow_receiver_and_nothing_is_lost(t: Transport) {
    // A short queue, and a pause long enough that a receiver taking 64
    // messages per millisecond always drains in time, however the test
    // machine schedules it.
    let relay = RelayProcess::start_with_config(
        "[limits]\nlane_queue_depth = 2048\n[link]\nmax_stall_ms = 1000\n",
    );
    let sender = unsigned_sender(&relay, t).await;
    let mut receiver = connect(&relay, Keypair::generate(), options_over(t)).await;
    let to = receiver.public_key();
    let handle = sender.handle();
    let send = tokio::spawn(async move {
        for i in 0..SENT {
            // Distinct, incompressible payloads that carry their number.
            let mut p = noise(200, i);
            p[..8].copy_from_slice(&i.to_le_bytes());
            handle.send(to, Lane::Normal, p).await.expect("send");
        }
    });

    let mut seen = HashSet::new();
    let mut buf = Vec::new();
    within("every message, read slowly", WAIT * 4, async {
        while seen.len() < SENT as usize {
            buf.clear();
            receiver.recv_many(&mut buf, 64).await;
            for m in &buf {
                let n = u64::from_le_bytes(m.payload[..8].try_into().unwrap());
                assert!(seen.insert(n), "message {n} delivered twice");
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await;
    within("sender done", WAIT, send).await.unwrap();

    assert_eq!(
        relay.metric("celluler_drops_total", "reason=\"slow_receiver\""),
        0.0
    );
    assert!(
        relay.metric("celluler_sender_stalls_total", "") > 0.0,
        "the receiver was slower, so the sender must have been paused"
    );
    assert!(relay.metric("celluler_sender_stall_seconds_total", "") > 0.0);
}

each_transport!(a_member_that_never_reads_does_not_slow_a_broadcaster);
async fn a_member_that_never_reads_does_not_slow_a_broadcaster(t: Transport) {
    let relay = RelayProcess::start_with_config("[limits]\nlane_queue_depth = 256\n");
    let sink = RawLink::connect_with(
        &relay,
        Keypair::generate(),
        RawOptions::not_reading().over(t),
    )
    .await
    .unwrap();
    let mut reader = connect(&relay, Keypair::generate(), options_over(t)).await;
    let broadcaster = unsigned_sender(&relay, t).await;
    let handle = broadcaster.handle();
    // Broadcast receivers lose what does not fit, by design, so the reader
    // must never fall a queue behind: the broadcaster sends in rounds far
    // smaller than the queue and waits for the reader to have each round,
    // however the machine schedules the two. Only the sink falls behind:
    // 6 MB, far over what its lane queue and (over TCP) the relay's send
    // queue and the kernel's socket buffers hold, about 1 MB in all.
    const SENT: u64 = 6_000;
    const ROUND: u64 = 50;
    let mut seen = HashSet::new();
    let mut buf = Vec::new();
    within("every broadcast at the reader", WAIT * 4, async {
        for round in 0..SENT / ROUND {
            for i in round * ROUND..(round + 1) * ROUND {
                let mut p = noise(1_000, i);
                p[..8].copy_from_slice(&i.to_le_bytes());
                handle.broadcast(Lane::Normal, p).await.expect("broadcast");
            }
            while seen.len() < ((round + 1) * ROUND) as usize {
                buf.clear();
                reader.recv_many(&mut buf, 1024).await;
                for m in &buf {
                    seen.insert(u64::from_le_bytes(m.payload[..8].try_into().unwrap()));
                }
            }
        }
    })
    .await;
    // The sink lost what did not fit, and the broadcaster was never paused
    // for it.
    relay
        .wait_metric_async(
            "celluler_drops_total",
            "reason=\"slow_receiver\"",
            1.0,
            WAIT,
        )
        .await;
    assert_eq!(relay.metric("celluler_sender_stalls_total", ""), 0.0);
    drop(sink);
}
