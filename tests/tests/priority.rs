//! Lanes are priorities end to end: control messages sent while a bulk
//! flood is queued overtake the flood's tail, at the sending cell and at
//! the relay. Asserted on arrival order, never on time.

use relay_client::cell::{AuthMode, CellOptions};
use relay_codec::{Keypair, Lane};
use relay_tests::RelayProcess;
use relay_tests::cells::{WAIT, connect, options, recv, within};
use relay_tests::raw::noise;

/// Bulk messages in the flood.
const FLOOD: u64 = 30_000;
/// Bytes per bulk payload (incompressible, so the flood is ~30 MB on the
/// wire and takes a while to drain through both hops).
const BULK_BYTES: usize = 1024;
/// After how many queued bulk messages each control message is sent; the
/// last one goes after the whole flood is queued.
const CONTROL_AFTER: [u64; 6] = [100, 2_000, 8_000, 15_000, 25_000, FLOOD];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_messages_overtake_a_bulk_flood() {
    // Queues deep enough for the whole flood at every step, so nothing is
    // dropped and "the last bulk message" is well defined.
    let relay = RelayProcess::start_with_config("[limits]\nlane_queue_depth = 65536\n");
    let sender_opts = CellOptions {
        // Unsigned (the relay vouches for the source): signing 30 000
        // messages in a debug build would dominate the test.
        auth: AuthMode::Link,
        queue_depth: 65_536,
        ..options()
    };
    let a = connect(&relay, Keypair::generate(), sender_opts).await;
    let mut b = connect(&relay, Keypair::generate(), options()).await;
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
