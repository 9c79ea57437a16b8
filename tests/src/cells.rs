//! Honest cells built with the real `relay_client::cell::Cell` API, and
//! bounded waits for async tests.

use crate::RelayProcess;
use relay_client::cell::{Cell, CellOptions, Event, Received, ReceivedAuth};
use relay_codec::{Destination, Keypair, Lane, ServiceName};
use relay_link::Transport;
use std::future::Future;
use std::time::Duration;

/// The bound on any single wait in a test: long enough for a debug build
/// on a loaded 2-core machine, short enough that a hang fails the test.
pub const WAIT: Duration = Duration::from_secs(30);

/// Awaits `f`, or panics saying what did not happen within `timeout`.
pub async fn within<T>(what: &str, timeout: Duration, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(timeout, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: not done within {timeout:?}"))
}

/// Polls `cond` until it holds, or panics saying what did not happen.
pub async fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let end = tokio::time::Instant::now() + timeout;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < end,
            "{what}: not true within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Options for a test cell: the defaults, but no reconnecting, so a link
/// the relay closes shows up as a failure instead of being repaired
/// silently.
pub fn options() -> CellOptions {
    options_over(Transport::Quic)
}

/// [`options`] over `transport`.
pub fn options_over(transport: Transport) -> CellOptions {
    CellOptions {
        reconnect: false,
        transport,
        ..CellOptions::default()
    }
}

/// A cell linked to `relay` as `key` and attached there (routable), or a
/// panic with the error.
///
/// `Cell::connect` returns once the relay's Welcome arrived, and the relay
/// attaches a link to its router before it writes Welcome (what
/// `exchange.rs`, `a_cell_is_reachable_as_soon_as_connect_returns`
/// guards). One discover round trip more proves it independently of that
/// order: the relay serves a link's control stream only after attaching
/// it, so the other tests do not depend on it.
pub async fn connect(relay: &RelayProcess, key: Keypair, opts: CellOptions) -> Cell {
    let cell = connect_only(relay, key, opts).await;
    within(
        "attach probe (discover round trip)",
        WAIT,
        cell.discover(&ServiceName::new("relay-tests-probe").unwrap()),
    )
    .await
    .expect("the relay answers discover");
    cell
}

/// `Cell::connect`, nothing more, or a panic with the error.
///
/// The relay's address is the one for `opts.transport`.
pub async fn connect_only(relay: &RelayProcess, key: Keypair, opts: CellOptions) -> Cell {
    match within(
        "cell connects",
        WAIT,
        Cell::connect(&relay.addr_over(opts.transport), key, opts),
    )
    .await
    {
        Ok(c) => c,
        Err(e) => panic!("cell could not connect: {e}; relay log:\n{}", relay.log()),
    }
}

/// The next message `cell` receives (other events are skipped).
pub async fn recv(cell: &mut Cell, what: &str) -> Received {
    within(what, WAIT, cell.recv())
        .await
        .unwrap_or_else(|| panic!("{what}: the cell stopped"))
}

/// The first event for which `pick` returns `Some`, skipping the others.
pub async fn wait_event<T>(
    cell: &mut Cell,
    what: &str,
    mut pick: impl FnMut(&Event) -> Option<T>,
) -> T {
    within(what, WAIT, async {
        loop {
            match cell.next_event().await {
                Some(e) => {
                    if let Some(t) = pick(&e) {
                        return t;
                    }
                }
                None => panic!("{what}: the cell stopped"),
            }
        }
    })
    .await
}

/// Two honest cells on one relay that check, whenever asked, that they
/// can still exchange messages both ways.
pub struct HonestPair {
    /// One cell.
    pub a: Cell,
    /// The other.
    pub b: Cell,
    round: u32,
}

impl HonestPair {
    /// Connects both cells (over QUIC) and checks a first exchange.
    pub async fn start(relay: &RelayProcess) -> Self {
        Self::start_over(relay, Transport::Quic, Transport::Quic).await
    }

    /// Connects cell `a` over `ta` and `b` over `tb`, and checks a first
    /// exchange.
    pub async fn start_over(relay: &RelayProcess, ta: Transport, tb: Transport) -> Self {
        let a = connect(relay, Keypair::generate(), options_over(ta)).await;
        let b = connect(relay, Keypair::generate(), options_over(tb)).await;
        let mut pair = HonestPair { a, b, round: 0 };
        pair.exchange("at start").await;
        pair
    }

    /// Sends one signed message each way and checks each arrives intact,
    /// next in line, from the right source. `after` names what just
    /// happened, for the failure message.
    pub async fn exchange(&mut self, after: &str) {
        self.round += 1;
        let round = self.round;
        for (from, to) in [(&self.a, &self.b), (&self.b, &self.a)] {
            let payload = format!("honest round {round} from {}", from.public_key().short());
            from.send(to.public_key(), Lane::Normal, payload.clone().into_bytes())
                .await
                .unwrap_or_else(|e| panic!("honest send {after}: {e}"));
        }
        let (ka, kb) = (self.a.public_key(), self.b.public_key());
        for (from, to) in [(ka, &mut self.b), (kb, &mut self.a)] {
            let what = format!("honest exchange {after}");
            let got = recv(to, &what).await;
            let want = format!("honest round {round} from {}", from.short());
            assert_eq!(got.payload, want.as_bytes(), "{what}");
            assert_eq!(got.source, from, "{what}");
            assert_eq!(
                got.destination,
                Destination::Cell(to.public_key()),
                "{what}"
            );
            assert_eq!(got.auth, ReceivedAuth::Signature, "{what}");
        }
    }

    /// Closes both cells; each must flush and close cleanly.
    pub async fn close(self) {
        within("close honest cell a", WAIT, self.a.close())
            .await
            .expect("honest cell a closes cleanly");
        within("close honest cell b", WAIT, self.b.close())
            .await
            .expect("honest cell b closes cleanly");
    }
}
