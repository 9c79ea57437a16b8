//! The engine behind the message modes (throughput, latency, fanout):
//! connect the receivers and senders, send, receive, wait out the grace
//! period, and turn what was seen into a [`Report`]. The same engine
//! drives a relay (cells or raw links) and nats-server (async-nats
//! clients, [`crate::nats`]): the shapes, the pacing, the warm-up and the
//! counting ([`crate::tally`]) are one code path for both.
//!
//! Timeline of a run:
//! 1. receivers connect and are probed until the server routes to them;
//!    then the senders connect;
//! 2. sending starts at `start`; messages whose intended send time is
//!    before `start + warm-up` are warm-up, left out of the bench's
//!    figures (counts, rate, latency, CPU, peak memory);
//! 3. senders stop at their share of `--count` or at `--duration` after
//!    the warm-up;
//! 4. the run ends when every expected delivery arrived, or when nothing
//!    arrived for the grace period (the rest is `lost`).
//!
//! CPU is sampled when measuring starts and at the last moment deliveries
//! made progress, so an idle grace period does not dilute it; the server's
//! resident memory is sampled every 25 ms over the same span. The server's
//! own counters (messages in, out, dropped) are read before sending starts
//! and at the end: they cover the warm-up too.

use crate::cells::{self, Notices, Progress, Received};
use crate::clock::{self, now_ns};
use crate::payload::{Fill, PayloadPool};
use crate::progress::Bar;
use crate::report::{Report, human};
use crate::stats::{CpuSample, Percentiles, status_kib};
use crate::tally::Tally;
use crate::target::{Server, Target};
use anyhow::{Context as _, Result, anyhow, bail};
use hdrhistogram::Histogram;
use relay_client::cell::{AuthMode, Cell, CellError, CellHandle};
use relay_codec::{Lane, PublicKey, ServiceName};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;

/// Settings every message mode shares.
#[derive(Clone, Debug)]
pub struct Common {
    /// Payload bytes.
    pub size: usize,
    /// Payload filler.
    pub fill: Fill,
    /// Lane to send on (relay only).
    pub lane: Lane,
    /// How messages are authenticated (relay only).
    pub auth: AuthMode,
    /// Warm-up, seconds.
    pub warmup: f64,
    /// No-progress grace before counting the rest as lost, seconds.
    pub grace: f64,
    /// Where to write the JSON report.
    pub json: Option<PathBuf>,
    /// Where to write the percentile distribution.
    pub hgrm: Option<PathBuf>,
    /// Where to write the SVG plot.
    pub plot: Option<PathBuf>,
    /// Bound on connecting each sender and receiver.
    pub connect_timeout: Duration,
    /// What the senders and receivers are.
    pub client: Client,
    /// async-nats: messages a subscription may queue before the library
    /// drops (see [`crate::nats::DEFAULT_SUB_CAPACITY`]).
    pub nats_sub_capacity: usize,
}

/// What the senders and receivers are built from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Client {
    /// Full `relay_client::Cell`s: what an application gets.
    Cell,
    /// Bare relay links that encode and decode batches in place (see
    /// [`crate::raw`]).
    Raw,
    /// async-nats clients, against nats-server.
    Nats,
}

impl Client {
    /// Lower-case name, as in the report.
    pub fn name(self) -> &'static str {
        match self {
            Client::Cell => "cell",
            Client::Raw => "raw",
            Client::Nats => "async-nats",
        }
    }
}

/// A connected NATS receiver: its client (kept open) and subscription.
struct NatsRx {
    client: async_nats::Client,
    sub: async_nats::Subscriber,
}

/// A connected receiver of any kind.
enum Rx {
    Cell(Cell),
    Raw(Box<crate::raw::RawReceiver>),
    Nats(Box<NatsRx>),
}

/// What a receiver of any kind saw.
struct RxOut {
    tally: Tally,
    lost_link: Option<String>,
    cell: Option<Cell>,
    link: Option<crate::raw::LinkStats>,
}

impl From<Received> for RxOut {
    fn from(r: Received) -> Self {
        Self {
            tally: r.tally,
            lost_link: r.lost_link,
            cell: Some(r.cell),
            link: None,
        }
    }
}

impl From<crate::raw::RawReceived> for RxOut {
    fn from(r: crate::raw::RawReceived) -> Self {
        Self {
            tally: r.tally,
            lost_link: r.lost_link,
            cell: None,
            link: r.link,
        }
    }
}

/// Runs `connect(i)` for `i` in `0..n` concurrently and returns the
/// results in order of `i`, or the first failure.
async fn connect_all<T, F, Fut>(n: usize, connect: F) -> Result<Vec<T>>
where
    T: Send + 'static,
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<T>> + Send + 'static,
{
    let mut set = JoinSet::new();
    for i in 0..n {
        let fut = connect(i);
        set.spawn(async move { (i, fut.await) });
    }
    let mut out: Vec<Option<T>> = (0..n).map(|_| None).collect();
    while let Some(r) = set.join_next().await {
        let (i, c) = r.map_err(|e| anyhow!("connecting task failed: {e}"))?;
        out[i] = Some(c?);
    }
    Ok(out
        .into_iter()
        .map(|c| c.expect("every task reported"))
        .collect())
}

/// Connects `n` raw receivers concurrently.
async fn connect_raw(
    target: &Target,
    n: usize,
    services: Vec<ServiceName>,
    timeout: Duration,
) -> Result<Vec<crate::raw::RawReceiver>> {
    connect_all(n, |i| {
        let (addr, services) = (target.rx_addr.clone(), services.clone());
        let transport = target.transport;
        async move {
            crate::raw::connect(&addr, transport, services, timeout)
                .await
                .with_context(|| format!("receiver {i}"))
        }
    })
    .await
}

/// Connects `n` raw senders concurrently.
async fn connect_raw_senders(
    target: &Target,
    n: usize,
    signed: bool,
    timeout: Duration,
) -> Result<Vec<crate::raw::RawSender>> {
    connect_all(n, |i| {
        let addr = target.addr.clone();
        let transport = target.transport;
        async move {
            crate::raw::connect_sender(&addr, transport, signed, timeout)
                .await
                .with_context(|| format!("sender {i}"))
        }
    })
    .await
}

/// Connects `n` NATS receivers concurrently, receiver `i` subscribed to
/// `subjects[i]` and its subscription confirmed by a probe.
async fn connect_nats_receivers(
    addr: &str,
    subjects: &[async_nats::Subject],
    common: &Common,
    events: &Arc<crate::nats::Events>,
) -> Result<Vec<NatsRx>> {
    let timeout = common.connect_timeout;
    connect_all(subjects.len(), |i| {
        let (addr, subject, events) = (addr.to_owned(), subjects[i].clone(), events.clone());
        let capacity = common.nats_sub_capacity;
        async move {
            let client = crate::nats::connect(&addr, capacity, events, timeout)
                .await
                .with_context(|| format!("receiver {i}"))?;
            let sub = crate::nats::subscribe(&client, &subject, timeout)
                .await
                .with_context(|| format!("receiver {i}"))?;
            Ok(NatsRx { client, sub })
        }
    })
    .await
}

/// Connects `n` NATS senders concurrently.
async fn connect_nats_senders(
    addr: &str,
    n: usize,
    common: &Common,
    events: &Arc<crate::nats::Events>,
) -> Result<Vec<async_nats::Client>> {
    let timeout = common.connect_timeout;
    connect_all(n, |i| {
        let (addr, events) = (addr.to_owned(), events.clone());
        let capacity = common.nats_sub_capacity;
        async move {
            crate::nats::connect(&addr, capacity, events, timeout)
                .await
                .with_context(|| format!("sender {i}"))
        }
    })
    .await
}

/// The subject receiver `i` subscribes to: `bench.<i>` on a nats-server of
/// the run's own; with a run id in it on a shared one, so that two runs do
/// not count each other's messages.
fn nats_subject(server: &Server, seed: u64, i: usize) -> async_nats::Subject {
    let s = if server.kind() == "spawned" {
        format!("bench.{i}")
    } else {
        format!("bench.{:08x}.{i}", seed as u32)
    };
    async_nats::Subject::from(s.as_str())
}

/// Where senders send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fanout {
    /// Sender j to receiver j % S.
    PerReceiver,
    /// Every attached cell but the sender.
    Broadcast,
    /// Every cell offering the service.
    Service(ServiceName),
}

/// Pacing for latency runs: an OS thread sends what is due every tick.
#[derive(Clone, Copy, Debug)]
pub struct Pacing {
    /// Messages per second.
    pub rate: f64,
    /// Sleep between ticks.
    pub tick: Duration,
}

/// What one run does.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Mode name for the report.
    pub mode: &'static str,
    /// Sending cells.
    pub senders: usize,
    /// Receiving cells.
    pub receivers: usize,
    /// Where messages go.
    pub fanout: Fanout,
    /// Measured messages to send in all (split across senders).
    pub count: Option<u64>,
    /// Measured sending time, seconds.
    pub duration: Option<f64>,
    /// Paced sending (latency mode); unpaced otherwise.
    pub pacing: Option<Pacing>,
    /// Unpaced senders wait while more than this many of their messages
    /// are in flight (sent, not yet received); `None`: open loop.
    pub window: Option<u64>,
    /// Durable messages (`durable` mode): each is acknowledged by the
    /// relay once logged and synced, and the time to that ack is measured.
    pub durable: bool,
}

/// Times from queueing a durable message to the relay's ack, over every
/// sender, and the refusals.
#[derive(Default)]
struct AckTimes {
    hist: std::sync::Mutex<Option<Histogram<u64>>>,
    acked: AtomicU64,
    refused: AtomicU64,
}

impl AckTimes {
    fn record(&self, ns: u64) {
        let mut h = self.hist.lock().unwrap_or_else(|e| e.into_inner());
        let h = h.get_or_insert_with(|| {
            Histogram::new_with_bounds(1, 3_600_000_000_000, 3).expect("valid bounds")
        });
        let _ = h.record(ns.max(1));
        self.acked.fetch_add(1, Ordering::Relaxed);
    }
}

/// Awaits one sender's durable receipts in order, recording each time to
/// ack; ends when the sender is done.
async fn collect_acks(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<(u64, relay_client::cell::DurableReceipt)>,
    times: Arc<AckTimes>,
) {
    while let Some((t0, receipt)) = rx.recv().await {
        match receipt.await {
            Ok(relay_codec::frame::DurableStatus::Acked) => {
                times.record(now_ns().saturating_sub(t0));
            }
            _ => {
                times.refused.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// A finished run: the report and the histograms behind it.
pub struct Outcome {
    /// The figures.
    pub report: Report,
    /// One-way latency, ns.
    pub hist: Histogram<u64>,
    /// Corrected latency, ns.
    pub co_hist: Histogram<u64>,
    /// Things to tell the reader.
    pub notes: Vec<String>,
}

/// What one sender did.
#[derive(Clone, Copy, Debug, Default)]
struct Sent {
    /// Measured messages.
    sent: u64,
    /// Warm-up messages.
    warmup: u64,
    /// First measured send, ns (0: none).
    first_ns: u64,
    /// Largest burst in one pacing tick.
    max_burst: u64,
}

impl Sent {
    fn merge(&mut self, o: Sent) {
        self.sent += o.sent;
        self.warmup += o.warmup;
        if o.first_ns != 0 && (self.first_ns == 0 || o.first_ns < self.first_ns) {
            self.first_ns = o.first_ns;
        }
        self.max_burst = self.max_burst.max(o.max_burst);
    }
}

#[derive(Clone, Debug)]
enum Dest {
    Cell(PublicKey),
    Broadcast,
    Service(ServiceName),
    Subject(async_nats::Subject),
}

/// A sender of any kind.
enum Tx {
    Cell(CellHandle),
    Raw(Box<crate::raw::RawSender>),
    Nats(async_nats::Client),
    /// A cell sending durable messages to one cell; each receipt goes to
    /// its [`collect_acks`] with the time it was queued.
    Durable(
        CellHandle,
        tokio::sync::mpsc::UnboundedSender<(u64, relay_client::cell::DurableReceipt)>,
    ),
}

impl Tx {
    /// Sends (a cell, a NATS client: queues) one message to `dest`.
    #[inline]
    async fn send(&mut self, dest: &Dest, lane: Lane, p: bytes::Bytes) -> Result<()> {
        match (self, dest) {
            (Tx::Nats(c), Dest::Subject(s)) => c
                .publish(s.clone(), p)
                .await
                .map_err(|e| anyhow!("publishing to nats-server failed: {e}")),
            (Tx::Nats(_), _) | (_, Dest::Subject(_)) => {
                bail!("internal error: a NATS sender with a relay destination or the reverse")
            }
            (Tx::Cell(h), dest) => dest
                .send(h, lane, p)
                .await
                .map_err(|e| anyhow!("sending failed: {e}")),
            (Tx::Raw(r), dest) => r.send(dest.destination(), lane, p).await,
            (Tx::Durable(h, acks), Dest::Cell(k)) => {
                let t0 = now_ns();
                let (_, receipt) = h
                    .start_durable(*k, lane, p)
                    .await
                    .map_err(|e| anyhow!("sending failed: {e}"))?;
                let _ = acks.send((t0, receipt));
                Ok(())
            }
            (Tx::Durable(..), _) => bail!("internal error: durable messages go to one cell"),
        }
    }

    /// Hands on what a raw sender holds in its open batch. A cell's writer
    /// and a NATS client's connection task write what is queued as soon as
    /// they run, so for them there is nothing to do.
    async fn flush(&mut self) -> Result<()> {
        match self {
            Tx::Cell(_) | Tx::Nats(_) | Tx::Durable(..) => Ok(()),
            Tx::Raw(r) => r.flush().await,
        }
    }

    /// After the last message: [`Tx::flush`], and a NATS client waits
    /// until its connection task has written everything.
    async fn finish(&mut self) -> Result<()> {
        match self {
            Tx::Nats(c) => c
                .flush()
                .await
                .map_err(|e| anyhow!("flushing to nats-server failed: {e}")),
            _ => self.flush().await,
        }
    }
}

impl Dest {
    fn destination(&self) -> relay_codec::Destination {
        match self {
            Dest::Cell(k) => relay_codec::Destination::Cell(*k),
            Dest::Broadcast => relay_codec::Destination::Broadcast,
            Dest::Service(s) => relay_codec::Destination::Service(s.clone()),
            Dest::Subject(_) => unreachable!("Tx::send pairs subjects with NATS senders"),
        }
    }

    #[inline]
    async fn send(&self, h: &CellHandle, lane: Lane, p: bytes::Bytes) -> Result<(), CellError> {
        match self {
            Dest::Cell(k) => h.send(*k, lane, p).await.map(drop),
            Dest::Broadcast => h.broadcast(lane, p).await.map(drop),
            Dest::Service(s) => h.send_to_service(s, lane, p).await.map(drop),
            Dest::Subject(_) => unreachable!("Tx::send pairs subjects with NATS senders"),
        }
    }
}

/// The in-flight window of the senders that send to one receiver (or of
/// the one fanout sender): deliveries expected minus deliveries seen stay
/// at most `limit`, so each sender has at most its N messages in flight.
struct Window {
    /// N × the senders sharing it, in deliveries (× K for fanout).
    limit: u64,
    /// Messages a sender sends between looks: min(N, 64).
    step: u64,
    /// Deliveries per message: 1, or K for fanout.
    factor: u64,
    /// Messages its senders have taken room for.
    sent: AtomicU64,
    /// The receivers whose deliveries free room.
    progress: Vec<Arc<Progress>>,
    /// How long a sender waits for room while nothing is delivered: then
    /// what is in flight is taken as lost (a dropped message never frees
    /// its room) and the sender goes on.
    grace: Duration,
}

/// Messages a sender sends between looks at the stop flag, and at most
/// between looks at its window.
const WINDOW_STEP: u64 = 64;

impl Window {
    /// A window of `n` messages per sender for `senders` senders whose
    /// messages reach `progress` `factor` times each.
    fn new(
        n: u64,
        senders: u64,
        factor: u64,
        progress: Vec<Arc<Progress>>,
        grace: Duration,
    ) -> Self {
        Self {
            limit: n * senders * factor,
            step: n.min(WINDOW_STEP),
            factor,
            sent: AtomicU64::new(0),
            progress,
            grace,
        }
    }

    fn seen(&self) -> u64 {
        self.progress
            .iter()
            .map(|p| p.seen.load(Ordering::Relaxed))
            .sum()
    }

    /// Takes room for the next `step` messages; returns the total sent
    /// they make.
    fn take(&self) -> u64 {
        self.sent.fetch_add(self.step, Ordering::Relaxed) + self.step
    }

    /// Whether `upto` messages sent are within the window of `seen`
    /// deliveries.
    fn has_room(&self, upto: u64, seen: u64) -> bool {
        upto * self.factor <= self.limit + seen
    }

    /// Before the `k`-th message of a sender: every `step` messages, takes
    /// room for the next step and waits until it is there (after handing
    /// on what `tx` holds back, which cannot be delivered while it waits).
    async fn gate(&self, k: u64, tx: &mut Tx) -> Result<()> {
        if !k.is_multiple_of(self.step) {
            return Ok(());
        }
        let upto = self.take();
        let mut seen = self.seen();
        if self.has_room(upto, seen) {
            return Ok(());
        }
        tx.flush().await?;
        let mut moved = Instant::now();
        while !self.has_room(upto, seen) && !cells::stopping() && moved.elapsed() < self.grace {
            tokio::time::sleep(Duration::from_micros(200)).await;
            let now_seen = self.seen();
            if now_seen != seen {
                (seen, moved) = (now_seen, Instant::now());
            }
        }
        Ok(())
    }
}

/// A random-enough seed for this run's payloads.
fn run_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ u64::from(std::process::id()).rotate_left(32)
}

/// Connects `n` cells concurrently over the target's transport, each
/// probed until attached.
async fn connect_many(
    target: &Target,
    addr: &relay_codec::NodeAddr,
    n: usize,
    opts: relay_client::CellOptions,
    what: &str,
) -> Result<Vec<Cell>> {
    let opts = relay_client::CellOptions {
        transport: target.transport,
        ..opts
    };
    connect_all(n, |i| {
        let (addr, opts) = (addr.clone(), opts.clone());
        let what = format!("{what} {i}");
        async move {
            let timeout = opts.connect_timeout;
            let cell = cells::connect(&addr, opts, &what).await?;
            cells::probe_attached(&cell, timeout)
                .await
                .with_context(|| format!("{what} connected but"))?;
            Ok(cell)
        }
    })
    .await
}

/// The connected receivers and senders of a run.
struct Parties {
    /// Receiver i, in order.
    rx: Vec<Rx>,
    /// Sender cells: their events are watched for notices and link loss.
    tx_cells: Vec<Cell>,
    /// The other senders (raw links, NATS clients), in order.
    tx_other: Vec<Tx>,
    /// Where sender j sends.
    dests: Vec<Dest>,
    /// What async-nats reported, on a NATS run.
    nats_events: Option<Arc<crate::nats::Events>>,
    /// The server's version, where it says.
    server_version: Option<String>,
}

/// Connects the receivers first, so nothing is sent to one the server does
/// not know yet, then the senders.
async fn connect_parties(
    server: &Server,
    common: &Common,
    plan: &Plan,
    seed: u64,
) -> Result<Parties> {
    let target = match server {
        Server::Relay(t) => t,
        Server::Nats(n) => {
            if plan.fanout != Fanout::PerReceiver {
                bail!("fanout against nats-server is not built; use --broker relay");
            }
            let events = Arc::new(crate::nats::Events::default());
            let subjects: Vec<_> = (0..plan.receivers)
                .map(|i| nats_subject(server, seed, i))
                .collect();
            let rx = connect_nats_receivers(&n.addr, &subjects, common, &events).await?;
            let tx = connect_nats_senders(&n.addr, plan.senders, common, &events).await?;
            let server_version = tx.first().map(|c| c.server_info().version);
            return Ok(Parties {
                rx: rx.into_iter().map(|r| Rx::Nats(Box::new(r))).collect(),
                tx_cells: Vec::new(),
                tx_other: tx.into_iter().map(Tx::Nats).collect(),
                dests: (0..plan.senders)
                    .map(|j| Dest::Subject(subjects[j % subjects.len()].clone()))
                    .collect(),
                nats_events: Some(events),
                server_version,
            });
        }
    };
    if target.relays > 1 && common.client == Client::Raw {
        bail!("--client raw across a mesh (--relays N) is not built; use --client cell");
    }
    let services = match &plan.fanout {
        Fanout::Service(s) => vec![s.clone()],
        _ => Vec::new(),
    };
    let mut rx: Vec<Rx> = match common.client {
        Client::Raw => connect_raw(target, plan.receivers, services, common.connect_timeout)
            .await?
            .into_iter()
            .map(|r| Rx::Raw(Box::new(r)))
            .collect(),
        _ => connect_many(
            target,
            &target.rx_addr,
            plan.receivers,
            cells::options(common.auth, false, services, common.connect_timeout),
            "receiver",
        )
        .await?
        .into_iter()
        .map(Rx::Cell)
        .collect(),
    };
    let (tx_cells, tx_other) = match common.client {
        // Raw receivers are connected only once the relay has registered
        // their services (see `raw::connect`): nothing to wait for.
        Client::Raw => (
            Vec::new(),
            connect_raw_senders(
                target,
                plan.senders,
                common.auth == AuthMode::Signed,
                common.connect_timeout,
            )
            .await?
            .into_iter()
            .map(|r| Tx::Raw(Box::new(r)))
            .collect(),
        ),
        _ => {
            let cells = connect_many(
                target,
                &target.addr,
                plan.senders,
                cells::options(common.auth, true, Vec::new(), common.connect_timeout),
                "sender",
            )
            .await?;
            if let Fanout::Service(svc) = &plan.fanout {
                wait_for_service(&cells[0], svc, plan.receivers).await?;
            }
            (cells, Vec::new())
        }
    };
    if target.relays > 1
        && let (Fanout::PerReceiver, Some(from)) = (&plan.fanout, tx_cells.first())
    {
        for r in &mut rx {
            if let Rx::Cell(c) = r {
                reach(from, c, common.connect_timeout).await?;
            }
        }
    }
    let keys: Vec<PublicKey> = rx
        .iter()
        .map(|r| match r {
            Rx::Cell(c) => c.public_key(),
            Rx::Raw(r) => r.key,
            Rx::Nats(_) => unreachable!("NATS receivers returned above"),
        })
        .collect();
    let dests = (0..plan.senders)
        .map(|j| match &plan.fanout {
            Fanout::PerReceiver => Dest::Cell(keys[j % keys.len()]),
            Fanout::Broadcast => Dest::Broadcast,
            Fanout::Service(s) => Dest::Service(s.clone()),
        })
        .collect();
    Ok(Parties {
        rx,
        tx_cells,
        tx_other,
        dests,
        nats_events: None,
        server_version: None,
    })
}

/// How long one mesh probe is waited for before the next is sent.
const PROBE_WAIT: Duration = Duration::from_millis(250);

/// Across a mesh: sends probes from `from` (on the first relay) to `to`
/// (on the last) until one arrives, so the mesh has learned where `to`
/// is before the clock starts; fails after `timeout`. Probes carry no
/// bench stamps: one arriving later is counted as foreign, not as data.
async fn reach(from: &Cell, to: &mut Cell, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut i = 0u32;
    while Instant::now() < deadline {
        from.send(
            to.public_key(),
            Lane::Normal,
            format!("probe {i}").into_bytes(),
        )
        .await
        .context("sending a mesh probe")?;
        i += 1;
        if let Ok(Some(_)) = tokio::time::timeout(PROBE_WAIT, to.recv()).await {
            return Ok(());
        }
    }
    bail!(
        "receiver {} was not reachable from the first relay within {:?} ({i} probes)",
        to.public_key(),
        timeout
    )
}

/// Runs `plan` against `server`.
pub async fn run(server: &Server, common: &Common, plan: &Plan) -> Result<Outcome> {
    let seed = run_seed();
    let parties = connect_parties(server, common, plan, seed).await?;
    let Parties {
        rx: rx_all,
        tx_cells,
        tx_other,
        dests,
        nats_events,
        server_version,
    } = parties;
    let counts_before = server.counts().await;

    // Receivers run from now on.
    let measure_from = Arc::new(AtomicU64::new(u64::MAX));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut progress = Vec::new();
    let mut rx_tasks = Vec::new();
    for rx in rx_all {
        let p = Arc::new(Progress::default());
        progress.push(p.clone());
        let (from, stop) = (measure_from.clone(), stop_rx.clone());
        rx_tasks.push(match rx {
            Rx::Cell(c) => {
                tokio::spawn(async move { RxOut::from(cells::receive(c, from, p, stop).await) })
            }
            Rx::Raw(r) => {
                tokio::spawn(
                    async move { RxOut::from(crate::raw::receive(*r, from, p, stop).await) },
                )
            }
            Rx::Nats(n) => tokio::spawn(async move {
                let NatsRx { client, sub } = *n;
                let (tally, lost_link) = crate::nats::receive(sub, from, p, stop).await;
                drop(client);
                RxOut {
                    tally,
                    lost_link,
                    cell: None,
                    link: None,
                }
            }),
        });
    }
    let received = || -> u64 {
        progress
            .iter()
            .map(|p| p.received.load(Ordering::Relaxed))
            .sum()
    };

    // Senders: payload pools are built before the clock starts.
    let notices = Arc::new(Notices::default());
    let mut watchers = Vec::new();
    let mut txs: Vec<Tx> = Vec::new();
    let ack_times = Arc::new(AckTimes::default());
    for cell in tx_cells {
        if plan.durable {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            tokio::spawn(collect_acks(rx, ack_times.clone()));
            txs.push(Tx::Durable(cell.handle(), tx));
        } else {
            txs.push(Tx::Cell(cell.handle()));
        }
        watchers.push(tokio::spawn(cells::watch_sender(
            cell,
            notices.clone(),
            stop_rx.clone(),
        )));
    }
    txs.extend(tx_other);
    let mut senders = Vec::new();
    for (j, (tx, dest)) in txs.into_iter().zip(dests).enumerate() {
        let pool = PayloadPool::new(common.fill, common.size, seed, j as u64);
        senders.push((tx, dest, pool));
    }
    let warmup_ns = clock::ns(common.warmup);
    let start = now_ns() + 2_000_000;
    let measure_ns = start + warmup_ns;
    measure_from.store(measure_ns, Ordering::Relaxed);
    let end_ns = plan.duration.map(|d| measure_ns + clock::ns(d));
    let n = senders.len() as u64;
    let fanout = plan.fanout != Fanout::PerReceiver;
    let factor = if fanout { plan.receivers as u64 } else { 1 };
    // One window per receiver, shared by the senders that send to it; one
    // for the fanout sender over every receiver.
    let grace = Duration::from_secs_f64(common.grace);
    let windows: Vec<Arc<Window>> = match plan.window {
        None => Vec::new(),
        Some(w) if fanout => vec![Arc::new(Window::new(w, 1, factor, progress.clone(), grace))],
        Some(w) => (0..plan.receivers)
            .map(|r| {
                let senders = (0..plan.senders)
                    .filter(|j| j % plan.receivers == r)
                    .count();
                Arc::new(Window::new(
                    w,
                    senders as u64,
                    1,
                    vec![progress[r].clone()],
                    grace,
                ))
            })
            .collect(),
    };
    let mut send_done: Vec<oneshot::Receiver<Result<(Sent, Tx)>>> = Vec::new();
    for (j, (tx, dest, pool)) in senders.into_iter().enumerate() {
        let quota = plan.count.map(|c| c / n + u64::from((j as u64) < c % n));
        let (done, done_rx) = oneshot::channel();
        send_done.push(done_rx);
        let lane = common.lane;
        match plan.pacing {
            None => {
                let window = (!windows.is_empty()).then(|| windows[j % windows.len()].clone());
                tokio::spawn(async move {
                    let r = blast(
                        tx, dest, lane, pool, quota, start, measure_ns, end_ns, window,
                    )
                    .await;
                    let _ = done.send(r);
                });
            }
            Some(p) => {
                let rt = tokio::runtime::Handle::current();
                let end = end_ns.unwrap_or(measure_ns);
                std::thread::Builder::new()
                    .name("pacer".into())
                    .spawn(move || {
                        let r = pace(rt, tx, dest, lane, pool, p, start, measure_ns, end);
                        let _ = done.send(r);
                    })
                    .context("starting the pacing thread")?;
            }
        }
    }
    // The senders come back too: a raw sender's link must stay open until
    // the relay has read everything it wrote.
    let all_sent = async move {
        let mut each = Vec::new();
        let mut txs = Vec::new();
        for rx in send_done {
            let (s, tx) = rx
                .await
                .map_err(|_| anyhow!("a sender stopped without a result"))??;
            each.push(s);
            txs.push(tx);
        }
        Ok::<_, anyhow::Error>((each, txs))
    };
    let mut done_txs = Vec::new();

    // Monitor: progress, CPU at the start and at the last progress, the
    // server's memory, the end of the grace period.
    let by_time = plan.count.is_none();
    let mut bar = if by_time {
        Bar::new(bar_len(common, plan), "s")
    } else {
        Bar::new(plan.count.unwrap_or(0) * factor, "msgs")
    };
    let pids = server.pids();
    tokio::pin!(all_sent);
    let mut per_sender: Option<Vec<Sent>> = None;
    let mut expected_total = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(25));
    let mut cpu_start: Option<CpuSample> = None;
    let mut cpu_end: Option<CpuSample> = None;
    let mut peak_rss: Option<u64> = None;
    let (mut last_rx, mut last_progress) = (0u64, Instant::now());
    let (mut rate_at, mut rate_rx, mut rate) = (Instant::now(), 0u64, 0.0);
    loop {
        tokio::select! {
            r = &mut all_sent, if per_sender.is_none() => {
                let (each, txs) = r?;
                expected_total = each.iter().map(|s| s.sent).sum::<u64>() * factor;
                per_sender = Some(each);
                done_txs = txs;
                last_progress = Instant::now();
            }
            _ = tick.tick() => {}
        }
        if cpu_start.is_none() && now_ns() >= measure_ns {
            cpu_start = Some(CpuSample::take_all(&pids));
        }
        if cpu_start.is_some()
            && let Some(kib) = pids
                .iter()
                .map(|&p| status_kib(Some(p), "VmRSS"))
                .sum::<Option<u64>>()
        {
            peak_rss = Some(peak_rss.unwrap_or(0).max(kib));
        }
        let rx = received();
        if rx != last_rx {
            last_rx = rx;
            last_progress = Instant::now();
            if cpu_start.is_some() {
                cpu_end = Some(CpuSample::take_all(&pids));
            }
        }
        if rate_at.elapsed() >= Duration::from_millis(500) {
            rate = (rx - rate_rx) as f64 / rate_at.elapsed().as_secs_f64();
            (rate_at, rate_rx) = (Instant::now(), rx);
        }
        let pos = if by_time {
            (now_ns().saturating_sub(start) / 1_000_000_000).min(bar_len(common, plan))
        } else {
            rx
        };
        bar.set(pos, format!("{} msg/s", human(rate)));
        if per_sender.is_some() && (rx >= expected_total || last_progress.elapsed() >= grace) {
            break;
        }
    }
    bar.finish();
    let per_sender = per_sender.expect("loop ends once all senders are done");
    let mut sent = Sent::default();
    for s in &per_sender {
        sent.merge(*s);
    }
    let relay_time = |q: &'static str| async move {
        match server {
            Server::Relay(t) => t
                .metric(
                    "celluler_time_in_relay_seconds",
                    &format!("quantile=\"{q}\""),
                )
                .await
                .map(|s| crate::stats::round1(s * 1e6)),
            Server::Nats(_) => None,
        }
    };
    let (relay_t50, relay_t99) = (relay_time("0.5").await, relay_time("0.99").await);
    let counts = server.counts().await.since(&counts_before);

    // Collect.
    for tx in done_txs {
        if let Tx::Raw(r) = tx {
            r.close().await;
        }
    }
    let _ = stop_tx.send(true);
    let mut results: Vec<RxOut> = Vec::new();
    for t in rx_tasks {
        results.push(
            t.await
                .map_err(|e| anyhow!("a receiver task failed: {e}"))?,
        );
    }
    let mut all_cells = Vec::new();
    let mut lost_links = Vec::new();
    for w in watchers {
        let (cell, lost) = w.await.map_err(|e| anyhow!("a sender task failed: {e}"))?;
        if let Some(l) = lost {
            lost_links.push(format!("sender: {l}"));
        }
        all_cells.push(cell);
    }
    if let Some(l) = nats_events.as_ref().and_then(|e| e.lost_link()) {
        lost_links.push(l);
    }
    // Lost and duplicated deliveries, receiver by receiver: what one
    // receiver lacks is not made up by another's extra copies.
    let expected_by_rx: Vec<u64> = (0..plan.receivers)
        .map(|r| {
            if fanout {
                sent.sent
            } else {
                per_sender
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| j % plan.receivers == r)
                    .map(|(_, s)| s.sent)
                    .sum()
            }
        })
        .collect();
    let received_by_rx: Vec<u64> = results.iter().map(|r| r.tally.received).collect();
    let (lost, duplicates) = lost_and_duplicates(&expected_by_rx, &received_by_rx);
    let mut all = Tally::default();
    let mut links = Vec::new();
    for out in results {
        links.extend(out.link);
        all.merge(&out.tally);
        if let Some(l) = out.lost_link {
            lost_links.push(format!("receiver: {l}"));
        }
        all_cells.extend(out.cell);
    }
    cells::close_all(all_cells).await;
    if !lost_links.is_empty() {
        bail!(
            "link(s) to the {} were lost during the run: {}",
            server.broker(),
            lost_links.join("; ")
        );
    }

    let received = all.received;
    let secs = if received > 0 && all.last_ns > sent.first_ns {
        clock::secs(all.last_ns - sent.first_ns)
    } else {
        0.0
    };
    let msgs_per_s = if secs > 0.0 {
        received as f64 / secs
    } else {
        0.0
    };
    let (relay_cpu, bench_cpu) = match (cpu_start, cpu_end) {
        (Some(a), Some(b)) => a.pct_until(&b),
        _ => (None, None),
    };
    // The kernel counts CPU in clock ticks: over a short span, one tick
    // is many percent.
    let cpu_tick = match (cpu_start, cpu_end) {
        (Some(a), Some(b)) => Some(a.tick_pct_until(&b)).filter(|t| *t >= 1.0),
        _ => None,
    };
    let nats = matches!(server, Server::Nats(_));
    let (slow, unknown, refused) = notices.get();
    let slow_consumers = nats_events
        .as_ref()
        .map(|e| e.slow_consumers.load(Ordering::Relaxed));
    let mut report = Report {
        mode: plan.mode.into(),
        broker: server.broker().into(),
        target: server.kind().into(),
        relay: server.address(),
        transport: match server {
            Server::Relay(t) => Some(t.transport.to_string()),
            Server::Nats(_) => None,
        },
        relays: match server {
            Server::Relay(t) => Some(t.relays),
            Server::Nats(_) => None,
        },
        topology: match server {
            Server::Relay(t) => t.topology.map(str::to_owned),
            Server::Nats(_) => None,
        },
        server_version,
        size: common.size,
        senders: plan.senders,
        receivers: plan.receivers,
        auth: if nats {
            "none"
        } else {
            match common.auth {
                AuthMode::Link => "link",
                AuthMode::Signed => "signed",
            }
        }
        .into(),
        payload: common.fill.name().into(),
        lane: if nats { "none" } else { common.lane.name() }.into(),
        sent: sent.sent,
        received,
        lost,
        duplicates,
        secs: (secs * 1e6).round() / 1e6,
        msgs_per_s: msgs_per_s.round(),
        mb_per_s: crate::stats::round1(msgs_per_s * common.size as f64 / 1e6),
        relay_cpu_pct: relay_cpu,
        bench_cpu_pct: bench_cpu,
        relay_peak_rss_kib: peak_rss,
        warmup_s: common.warmup,
        warmup_sent: (common.warmup > 0.0).then_some(sent.warmup),
        warmup_received: (common.warmup > 0.0).then_some(all.warmup),
        window: plan.window,
        client: Some(common.client.name().into()),
        raw_links: (!links.is_empty()).then_some(links),
        relay_dropped: counts.dropped,
        server_msgs_in: counts.msgs_in,
        server_msgs_out: counts.msgs_out,
        relay_time_p50_us: relay_t50,
        relay_time_p99_us: relay_t99,
        notices_slow_receiver: (!nats).then_some(slow),
        notices_unknown_destination: (!nats).then_some(unknown),
        notices_refused: (!nats).then_some(refused),
        nats_sub_capacity: nats.then_some(common.nats_sub_capacity),
        nats_slow_consumers: slow_consumers,
        bench_version: env!("CARGO_PKG_VERSION").into(),
        ..Report::default()
    };
    report.set_latency(&Percentiles::of(&all.hist));
    if plan.durable {
        let h = ack_times.hist.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = h.as_ref() {
            let us = |q: f64| crate::stats::round1(h.value_at_quantile(q) as f64 / 1e3);
            report.ack_p50_us = Some(us(0.5));
            report.ack_p99_us = Some(us(0.99));
            report.ack_max_us = Some(crate::stats::round1(h.max() as f64 / 1e3));
        }
        report.durable_acked = Some(ack_times.acked.load(Ordering::Relaxed));
        report.durable_refused = Some(ack_times.refused.load(Ordering::Relaxed));
    }
    let mut notes = Vec::new();
    if let Some(p) = plan.pacing {
        report.rate = Some(p.rate);
        report.max_burst = Some(sent.max_burst);
        report.set_corrected(&Percentiles::of(&all.co_hist));
        notes.push(
            "one-way latency is measured from the actual send time; co-corrected from the \
             time the --rate schedule meant to send it (coordinated omission)"
                .into(),
        );
    }
    if fanout {
        report.fanout_target = Some(
            match plan.fanout {
                Fanout::Broadcast => "broadcast",
                _ => "service",
            }
            .into(),
        );
        notes.push(format!(
            "received counts every receiver's copy: {} sent x {} receivers = {} expected",
            sent.sent,
            plan.receivers,
            sent.sent * factor
        ));
    }
    if let Some(w) = plan.window
        && plan.senders > plan.receivers
        && !fanout
    {
        notes.push(format!(
            "{} senders share {} receivers: the senders of one receiver share their windows \
             ({w} per sender, so {w} x their number in flight to it)",
            plan.senders, plan.receivers
        ));
    }
    if report.lost > 0 {
        let why = if nats {
            format!(
                "async-nats reported {} slow-consumer events (it drops what does not fit a \
                 subscription's queue of {} messages; --nats-sub-capacity sets it)",
                slow_consumers.unwrap_or(0),
                common.nats_sub_capacity
            )
        } else {
            format!(
                "the relay reported {slow} dropped for a slow receiver, {unknown} for an unknown \
                 destination, {refused} refused (notices can themselves be dropped, so these \
                 may under-count){}",
                counts
                    .dropped
                    .map(|d| format!("; its metrics count {d} drops in the whole run"))
                    .unwrap_or_default()
            )
        };
        notes.push(format!(
            "{} expected deliveries did not arrive within the {:.1} s grace period; {why}{}",
            report.lost,
            common.grace,
            if plan.window.is_none() && plan.pacing.is_none() {
                "; the senders ran open loop: --window N keeps at most N messages per sender \
                 in flight, to find the rate the server delivers without loss"
            } else {
                ""
            }
        ));
    }
    if duplicates > 0 {
        notes.push(format!(
            "warning: {duplicates} deliveries more than were sent arrived (duplicates): the \
             server delivered some messages twice, and received and msgs_per_s count them"
        ));
    }
    if all.foreign > 0 {
        notes.push(format!(
            "{} messages without the bench's timestamps arrived (another sender on this \
             server?) and were ignored",
            all.foreign
        ));
    }
    if let Some(t) = cpu_tick {
        notes.push(format!(
            "the CPU figures count the kernel's clock ticks, each {t:.1} % of a core over \
             this short a span: they are that coarse (a longer run measures them finer)"
        ));
    }
    if pids.is_empty() {
        notes.push(format!(
            "{} CPU and memory are unknown: pass {}",
            server.broker(),
            if nats {
                "--nats-pid PID"
            } else {
                "--relay-pid PID"
            }
        ));
    }
    Ok(Outcome {
        report,
        hist: all.hist,
        co_hist: all.co_hist,
        notes,
    })
}

/// (lost, duplicated) deliveries, receiver by receiver, from what each
/// expected and what each counted: one receiver's extra copies do not make
/// up for what another lacks.
fn lost_and_duplicates(expected: &[u64], received: &[u64]) -> (u64, u64) {
    expected
        .iter()
        .zip(received)
        .fold((0, 0), |(lost, dup), (&e, &r)| {
            (lost + e.saturating_sub(r), dup + r.saturating_sub(e))
        })
}

fn bar_len(common: &Common, plan: &Plan) -> u64 {
    (common.warmup + plan.duration.unwrap_or(0.0)).ceil() as u64
}

/// Waits until discovery of `svc` lists `n` cells (the relay has their
/// announcements).
async fn wait_for_service(cell: &Cell, svc: &ServiceName, n: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let found = cell
            .discover(svc)
            .await
            .map_err(|e| anyhow!("discovering the receivers' service {svc}: {e}"))?;
        if found.len() >= n {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "only {} of {n} receivers offer service {svc} after 10 s",
                found.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends as fast as the client takes messages: warm-up until
/// `measure_ns`, then `quota` messages or until `end_ns`; with a window,
/// at most its room in flight.
#[allow(clippy::too_many_arguments)]
async fn blast(
    mut tx: Tx,
    dest: Dest,
    lane: Lane,
    mut pool: PayloadPool,
    quota: Option<u64>,
    start: u64,
    measure_ns: u64,
    end_ns: Option<u64>,
    window: Option<Arc<Window>>,
) -> Result<(Sent, Tx)> {
    let mut s = Sent::default();
    let mut k = 0u64;
    let mut now = now_ns();
    if now < start {
        tokio::time::sleep(Duration::from_nanos(start - now)).await;
        now = now_ns();
    }
    let quota = quota.unwrap_or(u64::MAX);
    let end = end_ns.unwrap_or(u64::MAX);
    let mut measuring = false;
    loop {
        if measuring && s.sent >= quota {
            break;
        }
        if let Some(w) = &window {
            w.gate(k, &mut tx).await?;
            now = now_ns();
        }
        // Whether this message is warm-up is decided by the time it is
        // stamped with, as the receivers decide it.
        if !measuring && now >= measure_ns {
            measuring = true;
            s.first_ns = now;
        }
        if measuring && (s.sent >= quota || now >= end) {
            break;
        }
        tx.send(&dest, lane, pool.make(now, now)).await?;
        if measuring {
            s.sent += 1;
        } else {
            s.warmup += 1;
        }
        k += 1;
        if k.is_multiple_of(WINDOW_STEP) && cells::stopping() {
            break;
        }
        now = now_ns();
    }
    tx.finish().await?;
    Ok((s, tx))
}

/// Paced sending on an OS thread: every `tick`, sends each message whose
/// intended time (`start + i / rate`) has come, stamped with its actual
/// and intended send times; until `end_ns`.
#[allow(clippy::too_many_arguments)]
fn pace(
    rt: tokio::runtime::Handle,
    mut tx: Tx,
    dest: Dest,
    lane: Lane,
    mut pool: PayloadPool,
    p: Pacing,
    start: u64,
    measure_ns: u64,
    end_ns: u64,
) -> Result<(Sent, Tx)> {
    let period = 1e9 / p.rate;
    let total = ((end_ns - start) as f64 / period).floor() as u64;
    let mut s = Sent::default();
    let mut i = 0u64;
    while now_ns() < start {
        std::thread::sleep(Duration::from_micros(100));
    }
    while i < total && !cells::stopping() {
        let now = now_ns();
        let due = ((now.saturating_sub(start) as f64 / period) as u64 + 1).min(total);
        if due > i {
            s.max_burst = s.max_burst.max(due - i);
            rt.block_on(async {
                while i < due {
                    let intended = start + (i as f64 * period) as u64;
                    let sent = now_ns();
                    tx.send(&dest, lane, pool.make(sent, intended)).await?;
                    if intended >= measure_ns {
                        if s.sent == 0 {
                            s.first_ns = sent;
                        }
                        s.sent += 1;
                    } else {
                        s.warmup += 1;
                    }
                    i += 1;
                }
                // A tick's messages go out together, as a cell's writer
                // sends what is queued when it runs.
                tx.flush().await
            })?;
        }
        std::thread::sleep(p.tick);
    }
    rt.block_on(tx.finish())?;
    Ok((s, tx))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_and_duplicates_are_counted_per_receiver() {
        assert_eq!(lost_and_duplicates(&[10, 10], &[10, 10]), (0, 0));
        assert_eq!(lost_and_duplicates(&[10, 10], &[7, 10]), (3, 0));
        // Three extra copies at one receiver do not hide three lost at
        // the other.
        assert_eq!(lost_and_duplicates(&[10, 10], &[7, 13]), (3, 3));
        assert_eq!(lost_and_duplicates(&[0], &[2]), (0, 2));
    }

    fn window(n: u64, senders: u64, factor: u64) -> (Window, Vec<Arc<Progress>>) {
        let progress: Vec<_> = (0..factor).map(|_| Arc::new(Progress::default())).collect();
        let w = Window::new(n, senders, factor, progress.clone(), Duration::from_secs(1));
        (w, progress)
    }

    #[test]
    fn a_window_is_per_sender_and_never_overfilled() {
        // N = 100 for each of 2 senders of one receiver: 200 in flight.
        let (w, _) = window(100, 2, 1);
        assert_eq!((w.limit, w.step), (200, 64));
        assert_eq!(w.take(), 64);
        assert_eq!(w.take(), 128);
        assert!(w.has_room(128, 0));
        // A third step would put 192 in flight, a fourth 256 > 200.
        assert_eq!(w.take(), 192);
        assert!(w.has_room(192, 0));
        let upto = w.take();
        assert!(!w.has_room(upto, 0));
        assert!(w.has_room(upto, 56));
    }

    #[test]
    fn a_small_window_is_looked_at_every_message_it_allows() {
        // N below 64 is not raised: the sender looks every N messages.
        let (w, _) = window(5, 1, 1);
        assert_eq!((w.limit, w.step), (5, 5));
        assert!(w.has_room(w.take(), 0));
        let upto = w.take();
        assert!(!w.has_room(upto, 4) && w.has_room(upto, 5));
    }

    #[test]
    fn a_fanout_window_counts_every_receivers_copy() {
        // One sender, 3 receivers: a message is in flight until all 3 have it.
        let (w, progress) = window(64, 1, 3);
        assert_eq!(w.limit, 192);
        assert!(w.has_room(w.take(), 0));
        let upto = w.take();
        assert!(!w.has_room(upto, w.seen()));
        for p in &progress {
            p.seen.store(64, Ordering::Relaxed);
        }
        assert!(w.has_room(upto, w.seen()));
    }
}
