//! Bench cells built with the real client API ([`relay_client::Cell`]),
//! and the receiving side every message mode shares.
//!
//! Each cell is a full `Cell`: its own QUIC endpoint, lane queues, batching
//! writer and end-to-end checks, exactly what an application pays.
//! Receivers take their messages a batch at a time (`Cell::recv_many`), as
//! a high-rate application would.

use crate::tally::Tally;
use anyhow::{Result, anyhow};
use relay_client::cell::{AuthMode, Cell, CellOptions, Event};
use relay_codec::frame::NoticeCode;
use relay_codec::{Keypair, NodeAddr, ServiceName};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::watch;

/// Set on Ctrl-C or SIGTERM: senders and pacers stop at their next check.
pub static STOP: AtomicBool = AtomicBool::new(false);

/// Whether the run was interrupted.
pub fn stopping() -> bool {
    STOP.load(Ordering::Relaxed)
}

/// Cell options for the bench: no reconnecting (a lost link is a failed
/// run, not something to repair silently), notices on for senders (to
/// count what the relay dropped).
pub fn options(
    auth: AuthMode,
    notices: bool,
    services: Vec<ServiceName>,
    connect_timeout: Duration,
) -> CellOptions {
    CellOptions {
        agent: format!("relay-bench/{}", env!("CARGO_PKG_VERSION")),
        auth,
        notices,
        services,
        reconnect: false,
        connect_timeout,
        ..CellOptions::default()
    }
}

/// Connects a cell with a fresh key, with an error that says what to do.
pub async fn connect(relay: &NodeAddr, opts: CellOptions, what: &str) -> Result<Cell> {
    Cell::connect(relay, Keypair::generate(), opts)
        .await
        .map_err(|e| {
            anyhow!(
                "{what} could not connect to the relay {relay}: {e}\n\
                 check that a relay runs there and that KEY is its key (the relay prints \
                 `relay ready: key=KEY quic=HOST:PORT`), or use --spawn to start one"
            )
        })
}

/// Waits until the relay has attached `cell` to its router.
///
/// `Cell::connect` returns when the relay's Welcome arrives, but the relay
/// sends Welcome before it attaches the link, so a message sent to a cell
/// that has just connected can be dropped as an unknown destination. The
/// relay serves a link's control stream only after attaching it, so one
/// discover round trip proves the cell routable (and its announced
/// services known).
pub async fn probe_attached(cell: &Cell, timeout: Duration) -> Result<()> {
    let probe = ServiceName::new("relay-bench-probe").expect("valid service name");
    tokio::time::timeout(timeout, cell.discover(&probe))
        .await
        .map_err(|_| anyhow!("the relay did not answer a discover within {timeout:?}"))?
        .map_err(|e| anyhow!("the attach probe (discover) failed: {e}"))?;
    Ok(())
}

/// Counts kept by one receiver, visible to the monitor while it runs.
#[derive(Default)]
pub struct Progress {
    /// Measured messages received.
    pub received: AtomicU64,
    /// Every message of this run received, warm-up included (for the
    /// senders' in-flight window).
    pub seen: AtomicU64,
}

/// What one receiver saw.
pub struct Received {
    /// Its counts and latencies.
    pub tally: Tally,
    /// Why the link was lost, if it was.
    pub lost_link: Option<String>,
    /// The cell, to close.
    pub cell: Cell,
}

/// Messages taken from a cell at once.
const RECV_BATCH: usize = 4096;

/// Receives until `stop` turns true, counting each message by the rule of
/// [`Tally::take`]; `measure_from` (ns since the epoch) is the end of the
/// warm-up, shared so the coordinator can set it when sending starts.
///
/// Messages are taken a batch at a time ([`Cell::recv_many`]), as a
/// high-rate application would, and the clock is read for each message as
/// it is looked at.
pub async fn receive(
    mut cell: Cell,
    measure_from: Arc<AtomicU64>,
    progress: Arc<Progress>,
    mut stop: watch::Receiver<bool>,
) -> Received {
    let mut tally = Tally::default();
    let mut lost_link = None;
    let mut batch = Vec::with_capacity(RECV_BATCH);
    loop {
        // `biased` polls the cell first; under a flood that never pauses,
        // the stop flag is still looked at after every batch.
        if *stop.borrow() {
            break;
        }
        batch.clear();
        let n = tokio::select! {
            biased;
            n = cell.recv_many(&mut batch, RECV_BATCH) => n,
            _ = stop.wait_for(|s| *s) => break,
        };
        if n == 0 {
            // Stopped for good: with reconnecting off, the link was lost.
            lost_link = Some(
                cell.down_reason()
                    .unwrap_or_else(|| "the cell stopped".to_owned()),
            );
            break;
        }
        let from = measure_from.load(Ordering::Relaxed);
        for m in &batch {
            tally.take(&m.payload, from);
        }
        tally.publish(&progress);
    }
    Received {
        tally,
        lost_link,
        cell,
    }
}

/// Messages the relay's notices reported dropped, by reason.
#[derive(Default)]
pub struct Notices {
    /// Dropped for a slow receiver.
    pub slow_receiver: AtomicU64,
    /// Unknown destination.
    pub unknown_destination: AtomicU64,
    /// Refused or TTL expired.
    pub refused: AtomicU64,
}

impl Notices {
    /// Adds one notice, about `n` messages.
    pub fn count(&self, code: NoticeCode, n: u32) {
        let c = match code {
            NoticeCode::DroppedSlowReceiver => &self.slow_receiver,
            NoticeCode::UnknownDestination => &self.unknown_destination,
            _ => &self.refused,
        };
        c.fetch_add(u64::from(n), Ordering::Relaxed);
    }

    /// Messages reported: (slow receiver, unknown destination, refused).
    pub fn get(&self) -> (u64, u64, u64) {
        (
            self.slow_receiver.load(Ordering::Relaxed),
            self.unknown_destination.load(Ordering::Relaxed),
            self.refused.load(Ordering::Relaxed),
        )
    }
}

/// Reads a sender cell's events (notices, link loss) until `stop`, then
/// gives the cell back. A lost link is reported in `lost`.
pub async fn watch_sender(
    mut cell: Cell,
    notices: Arc<Notices>,
    mut stop: watch::Receiver<bool>,
) -> (Cell, Option<String>) {
    let mut lost = None;
    loop {
        tokio::select! {
            ev = cell.next_event() => match ev {
                Some(Event::Notice { code, count, .. }) => notices.count(code, count),
                Some(Event::Disconnected { reason }) => { lost = Some(reason); break; }
                Some(_) => {}
                None => { lost.get_or_insert_with(|| "the cell stopped".to_owned()); break; }
            },
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    (cell, lost)
}

/// Closes cells concurrently, each bounded; errors are ignored (the run's
/// figures are already taken).
pub async fn close_all(cells: Vec<Cell>) {
    let mut set = tokio::task::JoinSet::new();
    for c in cells {
        set.spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(5), c.close()).await;
        });
    }
    while set.join_next().await.is_some() {}
}
