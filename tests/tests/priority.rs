//! Lanes are priorities end to end, asserted on arrival order, never on
//! time:
//!
//! - under saturation the relay gives each lane the share of its writer's
//!   picks that `link.lane_weights` configures (the cell's writer is
//!   measured the same way in client/tests/link.rs);
//! - control messages sent while a bulk flood is queued overtake the
//!   flood's tail, at the sending cell and at the relay: lanes have queues
//!   and streams of their own, so none waits behind another's backlog.
//!
//! Both run over QUIC and over TCP, where one connection carries every
//! lane in chunks and the writer picks the next chunk by the same weights
//! (docs/PROTOCOL.md 6.3.2).

use relay_client::cell::{AuthMode, CellOptions};
use relay_codec::{Destination, Keypair, Lane};
use relay_link::Transport;
use relay_tests::cells::{WAIT, connect, options_over, recv, within};
use relay_tests::raw::{RawLink, RawOptions, batch_frame, encoded, message, noise};
use relay_tests::{RelayProcess, each_transport};

/// The relay's lane weights under test (control, high, normal, bulk).
const WEIGHTS: [u32; 4] = [8, 4, 2, 1];
/// Messages queued per lane before the receiver reads.
const PER_LANE: usize = 1_500;
/// Arrivals skipped before counting, at least: what QUIC may reorder
/// between lane streams at the start. More are skipped where the relay
/// sent further ahead before the receiver read (see below).
const SKIP: usize = 200;
/// Arrivals counted. Control, with the largest share, runs out of backlog
/// only after `PER_LANE * 15 / 8` = 2 812 picks, beyond the window.
const COUNTED: usize = 2_000;

each_transport!(the_relay_gives_each_lane_its_weighted_share_under_saturation);
async fn the_relay_gives_each_lane_its_weighted_share_under_saturation(t: Transport) {
    // Deep queues, so the whole backlog waits at the relay, and no pauses
    // of the sender (the receiver does not read at first).
    let relay = RelayProcess::start_with_config(&format!(
        "[limits]\nlane_queue_depth = 4096\n[link]\nmax_stall_ms = 0\nlane_weights = {WEIGHTS:?}\n"
    ));
    // The receiver reads nothing until every lane is backlogged; its small
    // windows keep what the relay can send ahead (and QUIC reorder by
    // stream priority) to a few dozen messages over QUIC. Over TCP the
    // relay's channel send queue and the kernel's buffers hold some
    // hundreds more: whatever lane is sent first fills them before the
    // others exist.
    let mut receiver = RawLink::connect_with(
        &relay,
        Keypair::generate(),
        RawOptions::not_reading().over(t),
    )
    .await
    .unwrap();
    let mut sender = RawLink::connect_over(&relay, Keypair::generate(), t)
        .await
        .unwrap();
    // One message per batch frame: the relay forwards each whole, so one
    // pick of its writer's scheduler is one message, and message shares
    // are pick shares.
    let to = Destination::Cell(receiver.public());
    // Bulk first: the lane with the smallest share fills what the relay
    // sends ahead, and still has a backlog through the window.
    for lane in Lane::ALL.into_iter().rev() {
        let mut frames = Vec::new();
        for i in 0..PER_LANE {
            let m = encoded(&message(
                &sender.key,
                to.clone(),
                lane,
                noise(1_000, i as u64),
            ));
            frames.extend_from_slice(&batch_frame(lane, &[m]));
        }
        sender.send_raw(lane, &frames).await.unwrap();
    }
    let total = 4 * PER_LANE;
    relay
        .wait_metric_async("celluler_messages_in_total", "", total as f64, WAIT)
        .await;
    receiver.start_reading();
    let mut order = Vec::with_capacity(total);
    while order.len() < total {
        let a = receiver
            .next_arrival(WAIT)
            .await
            .unwrap_or_else(|| panic!("{} of {total} messages arrived", order.len()));
        order.push(a.env.lane());
    }
    assert_eq!(relay.metric("celluler_drops_total", ""), 0.0);
    // What arrived before every lane had shown up was sent ahead before
    // the receiver read, while lanes were still being queued: not the
    // scheduler's choice.
    let first = Lane::ALL.map(|l| {
        order
            .iter()
            .position(|w| *w == l)
            .expect("every lane arrived")
    });
    let skip = SKIP.max(first.into_iter().max().unwrap_or(0));
    assert!(skip + COUNTED <= total, "first arrival per lane: {first:?}");
    let window = &order[skip..skip + COUNTED];
    let got = Lane::ALL.map(|l| window.iter().filter(|w| **w == l).count());
    let sum: u32 = WEIGHTS.iter().sum();
    let want = WEIGHTS.map(|w| COUNTED * w as usize / sum as usize);
    println!(
        "first arrival per lane {first:?}; arrivals {skip}..{} per lane: {got:?}; weights \
         {WEIGHTS:?} give {want:?}",
        skip + COUNTED
    );
    // The scheduler is exact over every cycle of 15 picks, up to what
    // QUIC and the receiver's stream readers reorder at the window's edges:
    // a message moves at most the ~30 in flight plus one read (~15), so a
    // count by at most twice that. Measured: within 10, idle or with two
    // CPU hogs beside it. Equal weights give control about 500, reversed
    // ones 131, bulk favoured 230.
    let tolerance = COUNTED / 10;
    for (i, lane) in Lane::ALL.iter().enumerate() {
        assert!(
            got[i].abs_diff(want[i]) <= tolerance,
            "{lane} got {} of {COUNTED} arrivals, its weight {} of {sum} gives {}; all: {got:?}",
            got[i],
            WEIGHTS[i],
            want[i]
        );
    }
    // And the shares were measured under saturation: every lane still had
    // a backlog through the window.
    for lane in Lane::ALL {
        assert!(
            order[skip + COUNTED..].contains(&lane),
            "{lane} ran out of backlog inside the counted window"
        );
    }
    relay.stop();
}

/// Bulk messages in the flood.
const FLOOD: u64 = 30_000;
/// Bytes per bulk payload (incompressible, so the flood is ~30 MB on the
/// wire and takes a while to drain through both hops).
const BULK_BYTES: usize = 1024;
/// After how many queued bulk messages each control message is sent; the
/// last one goes after the whole flood is queued.
const CONTROL_AFTER: [u64; 6] = [100, 2_000, 8_000, 15_000, 25_000, FLOOD];

each_transport!(control_messages_overtake_a_bulk_flood);
async fn control_messages_overtake_a_bulk_flood(t: Transport) {
    // Queues deep enough for the whole flood at every step, so nothing is
    // dropped and "the last bulk message" is well defined.
    let relay = RelayProcess::start_with_config("[limits]\nlane_queue_depth = 65536\n");
    let sender_opts = CellOptions {
        // Unsigned (the relay vouches for the source): signing 30 000
        // messages in a debug build would dominate the test.
        auth: AuthMode::Link,
        queue_depth: 65_536,
        ..options_over(t)
    };
    let a = connect(&relay, Keypair::generate(), sender_opts).await;
    // B reads only once the whole flood is queued, and takes in little
    // meanwhile (a small event queue, so its link stops reading): most of
    // the flood then waits at the relay when the last control message is
    // sent, however fast or slow the machine moves it. With the default
    // queue (65 536) B could have taken in the whole flood by then, and
    // the last control message had nothing left to overtake.
    let receiver_opts = CellOptions {
        event_queue: 256,
        ..options_over(t)
    };
    let mut b = connect(&relay, Keypair::generate(), receiver_opts).await;
    let to = b.public_key();

    let mut controls = CONTROL_AFTER.iter().copied().enumerate().peekable();
    within("queue the flood", WAIT, async {
        for i in 0..FLOOD {
            // Distinct noise per message: batches do not compress.
            let mut p = noise(BULK_BYTES, i);
            p[..8].copy_from_slice(&i.to_le_bytes());
            a.send(to, Lane::Bulk, p).await.expect("queue bulk");
            while let Some((k, _)) = controls.next_if(|(_, after)| *after == i + 1) {
                a.send(to, Lane::Control, format!("control {k}").into_bytes())
                    .await
                    .expect("queue control");
            }
        }
    })
    .await;
    assert!(controls.next().is_none());

    // Arrival positions at B.
    let mut control_at = vec![None; CONTROL_AFTER.len()];
    let mut next_bulk = 0u64;
    let mut position = 0usize;
    let mut last_bulk_at = None;
    while next_bulk < FLOOD || control_at.iter().any(Option::is_none) {
        let m = recv(&mut b, "flood and control messages").await;
        assert_eq!(m.source, a.public_key());
        match m.lane {
            Lane::Bulk => {
                let i = u64::from_le_bytes(m.payload[..8].try_into().unwrap());
                assert_eq!(i, next_bulk, "bulk lane stays in order, nothing lost");
                assert_eq!(m.payload.len(), BULK_BYTES);
                next_bulk += 1;
                if i == FLOOD - 1 {
                    last_bulk_at = Some(position);
                }
            }
            Lane::Control => {
                let text = String::from_utf8(m.payload.to_vec()).unwrap();
                let k: usize = text.strip_prefix("control ").unwrap().parse().unwrap();
                assert!(control_at[k].is_none(), "control {k} twice");
                control_at[k] = Some(position);
            }
            other => panic!("unexpected lane {other}"),
        }
        position += 1;
    }
    let last_bulk_at = last_bulk_at.expect("the whole flood arrived");
    println!("control messages arrived at {control_at:?}; the last bulk message at {last_bulk_at}");
    for (k, at) in control_at.iter().enumerate() {
        let at = at.unwrap();
        assert!(
            at < last_bulk_at,
            "control {k} (sent after {} bulk messages) arrived at position {at}, after the \
             last bulk message (position {last_bulk_at}); arrivals: {control_at:?}",
            CONTROL_AFTER[k]
        );
    }
    assert_eq!(relay.metric("celluler_drops_total", ""), 0.0);
    assert_eq!(
        relay.metric("celluler_messages_out_total", "lane=\"bulk\""),
        FLOOD as f64
    );
    assert_eq!(
        relay.metric("celluler_messages_out_total", "lane=\"control\""),
        CONTROL_AFTER.len() as f64
    );
    within("close a", WAIT, a.close()).await.unwrap();
    within("close b", WAIT, b.close()).await.unwrap();
    relay.stop();
}
