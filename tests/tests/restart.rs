//! A relay that crashes and restarts on the same address with the same key:
//! its QUIC cells learn of it from a stateless reset at their next packet
//! (the new process derives the same reset key from the relay's identity),
//! not after the 30 s idle timeout, and reconnect to it.

use relay_client::cell::{CellOptions, Event};
use relay_codec::{Keypair, Lane};
use relay_tests::RelayProcess;
use relay_tests::cells::{HonestPair, connect, options, wait_event};

#[tokio::test]
async fn a_quic_cell_learns_of_a_relay_restart_from_a_stateless_reset() {
    let relay = RelayProcess::start();
    let listen = relay.quic.to_string();
    let reconnecting = CellOptions {
        reconnect: true,
        ..options()
    };
    let mut cell = connect(&relay, Keypair::generate(), reconnecting).await;
    let relay = relay.kill_and_restart("", &listen, &[]);

    // Anything the cell sends now reaches the new process on the old
    // connection, which it answers with a stateless reset.
    cell.handle()
        .send(
            Keypair::generate().public(),
            Lane::Normal,
            "after the crash",
        )
        .await
        .expect("queued");
    let reason = wait_event(&mut cell, "the cell sees its link end", |e| match e {
        Event::Disconnected { reason } => Some(reason.clone()),
        _ => None,
    })
    .await;
    assert!(
        reason.contains("reset the connection"),
        "the link should end by a stateless reset, not {reason:?}; relay log:\n{}",
        relay.log()
    );
    wait_event(&mut cell, "the cell reconnects", |e| {
        matches!(e, Event::Reconnected).then_some(())
    })
    .await;

    // The restarted relay serves cells as before.
    let mut pair = HonestPair::start(&relay).await;
    pair.exchange("after the restart").await;
    pair.close().await;
    drop(cell);
    relay.stop();
}
