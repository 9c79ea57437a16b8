//! `--broker nats`: the same load shapes against nats-server, through the
//! official Rust client library (async-nats), so the relay can be compared
//! with NATS from this repository alone.
//!
//! Every sender and every receiver is its own `async_nats::Client`, with
//! its own TCP connection, as every relay-bench cell has its own QUIC
//! connection. Receiver *i* subscribes to its own subject and sender *j*
//! publishes to receiver *j % S*'s, as sender *j* sends to cell *j % S* on
//! the relay. Payloads are the ones relay cells carry (the same stamps and
//! filler); the receive side records them with the same
//! [`Tally`](crate::tally::Tally) the cells use, so warm-up, latency and
//! loss are counted the same way on both.
//!
//! async-nats drops a message when a subscription's channel is full (a
//! "slow consumer"), 65 536 messages by default. That loss would measure
//! the bench's receiving task, not the server, so relay-bench raises the
//! channel to [`DEFAULT_SUB_CAPACITY`] messages (`--nats-sub-capacity`);
//! whatever is still dropped is counted as lost and the slow-consumer
//! events are reported.

use crate::cells::Progress;
use crate::tally::Tally;
use anyhow::{Context as _, Result, anyhow, bail};
use async_nats::{Client, Event, Subject, Subscriber};
use bytes::Bytes;
use futures_util::{FutureExt as _, StreamExt as _};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// Messages each subscription may hold before async-nats drops (its default
/// is 65 536); at 128 B and ~300 B of bookkeeping each, up to about 400 MiB
/// per receiver when the receiving task falls that far behind.
pub const DEFAULT_SUB_CAPACITY: usize = 1 << 20;

/// Messages a receiver takes off its subscription per look at the stop
/// flag and per progress update.
const RECV_BATCH: usize = 4096;

/// What the library reported about the run's connections.
#[derive(Default)]
pub struct Events {
    /// Slow-consumer events (each is at least one dropped message; the
    /// library's event channel holds 128 events, so this may under-count).
    pub slow_consumers: AtomicU64,
    /// The first connection lost, if one was.
    pub lost: Mutex<Option<String>>,
}

impl Events {
    fn lost(&self, why: String) {
        let mut l = self.lost.lock().unwrap_or_else(|e| e.into_inner());
        l.get_or_insert(why);
    }

    /// Why a connection was lost during the run, if one was.
    pub fn lost_link(&self) -> Option<String> {
        self.lost.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Connects one client to the nats-server at `addr`.
pub async fn connect(
    addr: &str,
    sub_capacity: usize,
    events: Arc<Events>,
    timeout: Duration,
) -> Result<Client> {
    let opts = async_nats::ConnectOptions::new()
        .name(format!("relay-bench/{}", env!("CARGO_PKG_VERSION")))
        .subscription_capacity(sub_capacity)
        .connection_timeout(timeout)
        .event_callback(move |e| {
            let events = events.clone();
            async move {
                match e {
                    Event::SlowConsumer(_) => {
                        events.slow_consumers.fetch_add(1, Ordering::Relaxed);
                    }
                    // A lost connection fails the run, as a lost relay link
                    // does: the library would reconnect and hide the gap.
                    Event::Disconnected => events.lost("disconnected from nats-server".into()),
                    Event::ServerError(e) => events.lost(format!("nats-server error: {e}")),
                    _ => {}
                }
            }
        });
    opts.connect(addr).await.map_err(|e| {
        anyhow!(
            "could not connect to nats-server at {addr}: {e}\ncheck that nats-server runs \
             there (`nats-server -a 127.0.0.1 -p 4222`), or use --spawn to start one"
        )
    })
}

/// Subscribes `client` to `subject` and waits until the server has the
/// subscription: async-nats's `flush` only empties the socket buffer, so
/// this publishes a probe on the same connection (the server handles one
/// connection's commands in order) and waits for it to come back. The
/// probe has no stamps and is taken here, before counting starts.
pub async fn subscribe(
    client: &Client,
    subject: &Subject,
    timeout: Duration,
) -> Result<Subscriber> {
    let mut sub = client
        .subscribe(subject.clone())
        .await
        .with_context(|| format!("subscribing to {subject}"))?;
    client
        .publish(subject.clone(), Bytes::from_static(b"relay-bench probe"))
        .await
        .context("publishing the subscription probe")?;
    client
        .flush()
        .await
        .context("flushing the subscription probe")?;
    match tokio::time::timeout(timeout, sub.next()).await {
        Ok(Some(_)) => Ok(sub),
        Ok(None) => bail!("the subscription to {subject} closed before its probe came back"),
        Err(_) => bail!("nats-server did not echo the probe on {subject} within {timeout:?}"),
    }
}

/// Receives on `sub` until `stop`: each message is recorded as a cell's
/// are (see [`Tally::take`]), and progress is published after every
/// batch of what was ready.
pub async fn receive(
    mut sub: Subscriber,
    measure_from: Arc<std::sync::atomic::AtomicU64>,
    progress: Arc<Progress>,
    mut stop: watch::Receiver<bool>,
) -> (Tally, Option<String>) {
    let mut tally = Tally::default();
    let mut closed = None;
    loop {
        if *stop.borrow() {
            break;
        }
        let first = tokio::select! {
            biased;
            m = sub.next() => m,
            _ = stop.wait_for(|s| *s) => break,
        };
        let from = measure_from.load(Ordering::Relaxed);
        let Some(m) = first else {
            closed = Some("the subscription closed".to_owned());
            break;
        };
        tally.take(&m.payload, from);
        for _ in 1..RECV_BATCH {
            match sub.next().now_or_never() {
                Some(Some(m)) => tally.take(&m.payload, from),
                Some(None) => {
                    closed = Some("the subscription closed".to_owned());
                    break;
                }
                None => break,
            }
        }
        tally.publish(&progress);
        if closed.is_some() {
            break;
        }
    }
    (tally, closed)
}
