//! The engine behind the message modes (throughput, latency, fanout):
//! connect the cells, send, receive, wait out the grace period, and turn
//! what was seen into a [`Report`].
//!
//! Timeline of a run:
//! 1. receivers connect (each a `Cell`) and are probed until the relay has
//!    attached them; then the senders connect;
//! 2. sending starts at `start`; messages whose intended send time is
//!    before `start + warm-up` are warm-up and excluded from every figure;
//! 3. senders stop at their share of `--count` or at `--duration` after
//!    the warm-up;
//! 4. the run ends when every expected delivery arrived, or when nothing
//!    arrived for the grace period (the rest is `lost`).
//!
//! CPU is sampled when measuring starts and at the last moment deliveries
//! made progress, so an idle grace period does not dilute it.

use crate::cells::{self, Notices, Progress, Received};
use crate::clock::{self, now_ns};
use crate::payload::{Fill, PayloadPool};
use crate::progress::Bar;
use crate::report::{Report, human};
use crate::stats::{CpuSample, Percentiles, status_kib};
use crate::target::Target;
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
    /// Lane to send on.
    pub lane: Lane,
    /// How messages are authenticated.
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
    /// Bound on connecting each cell.
    pub connect_timeout: Duration,
    /// What the receivers are.
    pub client: Client,
}

/// What the receivers are built from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Client {
    /// Full `relay_client::Cell`s: what an application gets.
    Cell,
    /// Bare links that decode batches in place (see [`crate::raw`]).
    Raw,
}

impl Client {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Client::Cell => "cell",
            Client::Raw => "raw",
        }
    }
}

/// A connected receiver of either kind.
enum Rx {
    Cell(Cell),
    Raw(Box<crate::raw::RawReceiver>),
}

/// What a receiver of either kind saw.
struct RxOut {
    hist: Histogram<u64>,
    co_hist: Histogram<u64>,
    received: u64,
    last_ns: u64,
    foreign: u64,
    lost_link: Option<String>,
    cell: Option<Cell>,
    link: Option<crate::raw::LinkStats>,
}

impl From<Received> for RxOut {
    fn from(r: Received) -> Self {
        Self {
            hist: r.hist,
            co_hist: r.co_hist,
            received: r.received,
            last_ns: r.last_ns,
            foreign: r.foreign,
            lost_link: r.lost_link,
            cell: Some(r.cell),
            link: None,
        }
    }
}

impl From<crate::raw::RawReceived> for RxOut {
    fn from(r: crate::raw::RawReceived) -> Self {
        Self {
            hist: r.hist,
            co_hist: r.co_hist,
            received: r.received,
            last_ns: r.last_ns,
            foreign: r.foreign,
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
        let (addr, services) = (target.addr.clone(), services.clone());
        async move {
            crate::raw::connect(&addr, services, timeout)
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
        async move {
            crate::raw::connect_sender(&addr, signed, timeout)
                .await
                .with_context(|| format!("sender {i}"))
        }
    })
    .await
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

/// What the senders did.
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
}

/// A sender of either kind.
enum Tx {
    Cell(CellHandle),
    Raw(Box<crate::raw::RawSender>),
}

impl Tx {
    /// Sends (a cell: queues) one message to `dest`.
    #[inline]
    async fn send(&mut self, dest: &Dest, lane: Lane, p: bytes::Bytes) -> Result<()> {
        match self {
            Tx::Cell(h) => dest
                .send(h, lane, p)
                .await
                .map_err(|e| anyhow!("sending failed: {e}")),
            Tx::Raw(r) => r.send(dest.destination(), lane, p).await,
        }
    }

    /// Writes what a raw sender holds in its open batch; a cell's writer
    /// sends on its own.
    async fn flush(&mut self) -> Result<()> {
        match self {
            Tx::Cell(_) => Ok(()),
            Tx::Raw(r) => r.flush().await,
        }
    }
}

impl Dest {
    fn destination(&self) -> relay_codec::Destination {
        match self {
            Dest::Cell(k) => relay_codec::Destination::Cell(*k),
            Dest::Broadcast => relay_codec::Destination::Broadcast,
            Dest::Service(s) => relay_codec::Destination::Service(s.clone()),
        }
    }

    #[inline]
    async fn send(&self, h: &CellHandle, lane: Lane, p: bytes::Bytes) -> Result<(), CellError> {
        match self {
            Dest::Cell(k) => h.send(*k, lane, p).await.map(drop),
            Dest::Broadcast => h.broadcast(lane, p).await.map(drop),
            Dest::Service(s) => h.send_to_service(s, lane, p).await.map(drop),
        }
    }
}

/// The senders' shared in-flight window: deliveries expected minus
/// deliveries seen stay at most `limit`.
struct Window {
    limit: u64,
    factor: u64,
    sent: AtomicU64,
    progress: Vec<Arc<Progress>>,
}

/// Messages a sender sends between looks at the window.
const WINDOW_STEP: u64 = 64;

impl Window {
    /// Accounts for `WINDOW_STEP` more messages sent and waits while too
    /// many are in flight.
    async fn step(&self) {
        let sent = self.sent.fetch_add(WINDOW_STEP, Ordering::Relaxed) + WINDOW_STEP;
        loop {
            let seen: u64 = self
                .progress
                .iter()
                .map(|p| p.seen.load(Ordering::Relaxed))
                .sum();
            if (sent * self.factor).saturating_sub(seen) <= self.limit || cells::stopping() {
                return;
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
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

/// Connects `n` cells concurrently, each probed until attached.
async fn connect_many(
    target: &Target,
    n: usize,
    opts: relay_client::CellOptions,
    what: &str,
) -> Result<Vec<Cell>> {
    connect_all(n, |i| {
        let (addr, opts) = (target.addr.clone(), opts.clone());
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

/// Runs `plan` against `target`.
pub async fn run(target: &Target, common: &Common, plan: &Plan) -> Result<Outcome> {
    let seed = run_seed();
    // Receivers first, so nothing is sent to a cell the relay does not know.
    let services = match &plan.fanout {
        Fanout::Service(s) => vec![s.clone()],
        _ => Vec::new(),
    };
    let rx_cells: Vec<Rx> = match common.client {
        Client::Cell => connect_many(
            target,
            plan.receivers,
            cells::options(common.auth, false, services, common.connect_timeout),
            "receiver",
        )
        .await?
        .into_iter()
        .map(Rx::Cell)
        .collect(),
        Client::Raw => connect_raw(target, plan.receivers, services, common.connect_timeout)
            .await?
            .into_iter()
            .map(|r| Rx::Raw(Box::new(r)))
            .collect(),
    };
    let (tx_cells, tx_raw) = match common.client {
        Client::Cell => {
            let cells = connect_many(
                target,
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
            .await?,
        ),
    };
    let rx_keys: Vec<PublicKey> = rx_cells
        .iter()
        .map(|r| match r {
            Rx::Cell(c) => c.public_key(),
            Rx::Raw(r) => r.key,
        })
        .collect();
    let drops_before = target.metric("celluler_drops_total", "").await;

    // Receivers run from now on.
    let measure_from = Arc::new(AtomicU64::new(u64::MAX));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut progress = Vec::new();
    let mut rx_tasks = Vec::new();
    for rx in rx_cells {
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
    for cell in tx_cells {
        txs.push(Tx::Cell(cell.handle()));
        watchers.push(tokio::spawn(cells::watch_sender(
            cell,
            notices.clone(),
            stop_rx.clone(),
        )));
    }
    txs.extend(tx_raw.into_iter().map(|r| Tx::Raw(Box::new(r))));
    let mut senders = Vec::new();
    for (j, tx) in txs.into_iter().enumerate() {
        let pool = PayloadPool::new(common.fill, common.size, seed, j as u64);
        let dest = match &plan.fanout {
            Fanout::PerReceiver => Dest::Cell(rx_keys[j % rx_keys.len()]),
            Fanout::Broadcast => Dest::Broadcast,
            Fanout::Service(s) => Dest::Service(s.clone()),
        };
        senders.push((tx, dest, pool));
    }
    let warmup_ns = clock::ns(common.warmup);
    let start = now_ns() + 2_000_000;
    let measure_ns = start + warmup_ns;
    measure_from.store(measure_ns, Ordering::Relaxed);
    let end_ns = plan.duration.map(|d| measure_ns + clock::ns(d));
    let n = senders.len() as u64;
    let factor = match plan.fanout {
        Fanout::PerReceiver => 1,
        _ => plan.receivers as u64,
    };
    let window = plan.window.map(|w| {
        Arc::new(Window {
            limit: w.max(WINDOW_STEP) * n * factor,
            factor,
            sent: AtomicU64::new(0),
            progress: progress.clone(),
        })
    });
    let mut send_done: Vec<oneshot::Receiver<Result<(Sent, Tx)>>> = Vec::new();
    for (j, (tx, dest, pool)) in senders.into_iter().enumerate() {
        let quota = plan.count.map(|c| c / n + u64::from((j as u64) < c % n));
        let (done, done_rx) = oneshot::channel();
        send_done.push(done_rx);
        let lane = common.lane;
        match plan.pacing {
            None => {
                let window = window.clone();
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
        let mut total = Sent::default();
        let mut txs = Vec::new();
        for rx in send_done {
            let (s, tx) = rx
                .await
                .map_err(|_| anyhow!("a sender stopped without a result"))??;
            total.merge(s);
            txs.push(tx);
        }
        Ok::<_, anyhow::Error>((total, txs))
    };
    let mut done_txs = Vec::new();

    // Monitor: progress, CPU at the start and at the last progress, the
    // end of the grace period.
    let by_time = plan.count.is_none();
    let mut bar = if by_time {
        Bar::new(
            (common.warmup + plan.duration.unwrap_or(0.0)).ceil() as u64,
            "s",
        )
    } else {
        Bar::new(plan.count.unwrap_or(0) * factor, "msgs")
    };
    let grace = Duration::from_secs_f64(common.grace);
    let pid = target.pid;
    tokio::pin!(all_sent);
    let mut sent: Option<Sent> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(25));
    let mut cpu_start: Option<CpuSample> = None;
    let mut cpu_end: Option<CpuSample> = None;
    let (mut last_rx, mut last_progress) = (0u64, Instant::now());
    let (mut rate_at, mut rate_rx, mut rate) = (Instant::now(), 0u64, 0.0);
    loop {
        tokio::select! {
            r = &mut all_sent, if sent.is_none() => {
                let (s, txs) = r?;
                sent = Some(s);
                done_txs = txs;
                last_progress = Instant::now();
            }
            _ = tick.tick() => {}
        }
        if cpu_start.is_none() && now_ns() >= measure_ns {
            cpu_start = Some(CpuSample::take(pid));
        }
        let rx = received();
        if rx != last_rx {
            last_rx = rx;
            last_progress = Instant::now();
            if cpu_start.is_some() {
                cpu_end = Some(CpuSample::take(pid));
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
        if let Some(s) = &sent
            && (rx >= s.sent * factor || last_progress.elapsed() >= grace)
        {
            break;
        }
    }
    bar.finish();
    let sent = sent.expect("loop ends once all senders are done");
    let peak_rss = pid.and_then(|p| status_kib(Some(p), "VmHWM"));
    let relay_time = |q: &'static str| async move {
        target
            .metric(
                "celluler_time_in_relay_seconds",
                &format!("quantile=\"{q}\""),
            )
            .await
            .map(|s| crate::stats::round1(s * 1e6))
    };
    let (relay_t50, relay_t99) = (relay_time("0.5").await, relay_time("0.99").await);
    let relay_dropped = match (
        drops_before,
        target.metric("celluler_drops_total", "").await,
    ) {
        (Some(a), Some(b)) => Some((b - a).max(0.0) as u64),
        _ => None,
    };

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
    let mut hist = crate::stats::new_hist();
    let mut co_hist = crate::stats::new_hist();
    let (mut received, mut last_ns, mut foreign) = (0u64, 0u64, 0u64);
    let mut links = Vec::new();
    for r in results {
        links.extend(r.link);
        hist.add(&r.hist).expect("same histogram bounds");
        co_hist.add(&r.co_hist).expect("same histogram bounds");
        received += r.received;
        last_ns = last_ns.max(r.last_ns);
        foreign += r.foreign;
        if let Some(l) = r.lost_link {
            lost_links.push(format!("receiver: {l}"));
        }
        all_cells.extend(r.cell);
    }
    cells::close_all(all_cells).await;
    if !lost_links.is_empty() {
        bail!(
            "link(s) to the relay were lost during the run: {}",
            lost_links.join("; ")
        );
    }

    let expected = sent.sent * factor;
    let secs = if received > 0 && last_ns > sent.first_ns {
        clock::secs(last_ns - sent.first_ns)
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
    let (slow, unknown, refused) = notices.get();
    let mut report = Report {
        mode: plan.mode.into(),
        target: target.kind().into(),
        relay: target.addr.to_string(),
        size: common.size,
        senders: plan.senders,
        receivers: plan.receivers,
        auth: match common.auth {
            AuthMode::Link => "link",
            AuthMode::Signed => "signed",
        }
        .into(),
        payload: common.fill.name().into(),
        lane: common.lane.name().into(),
        sent: sent.sent,
        received,
        lost: expected.saturating_sub(received),
        secs: (secs * 1e6).round() / 1e6,
        msgs_per_s: msgs_per_s.round(),
        mb_per_s: crate::stats::round1(msgs_per_s * common.size as f64 / 1e6),
        relay_cpu_pct: relay_cpu,
        bench_cpu_pct: bench_cpu,
        relay_peak_rss_kib: peak_rss,
        warmup_s: common.warmup,
        warmup_sent: (common.warmup > 0.0).then_some(sent.warmup),
        window: plan.window,
        client: Some(common.client.name().into()),
        raw_links: (!links.is_empty()).then_some(links),
        relay_dropped,
        relay_time_p50_us: relay_t50,
        relay_time_p99_us: relay_t99,
        notices_slow_receiver: Some(slow),
        notices_unknown_destination: Some(unknown),
        notices_refused: Some(refused),
        bench_version: env!("CARGO_PKG_VERSION").into(),
        ..Report::default()
    };
    report.set_latency(&Percentiles::of(&hist));
    let mut notes = Vec::new();
    if let Some(p) = plan.pacing {
        report.rate = Some(p.rate);
        report.max_burst = Some(sent.max_burst);
        report.set_corrected(&Percentiles::of(&co_hist));
        notes.push(
            "one-way latency is measured from the actual send time; co-corrected from the \
             time the --rate schedule meant to send it (coordinated omission)"
                .into(),
        );
    }
    if let Fanout::Broadcast | Fanout::Service(_) = &plan.fanout {
        report.fanout_target = Some(
            match plan.fanout {
                Fanout::Broadcast => "broadcast",
                _ => "service",
            }
            .into(),
        );
        notes.push(format!(
            "received counts every receiver's copy: {} sent x {} receivers = {} expected",
            sent.sent, plan.receivers, expected
        ));
    }
    if report.lost > 0 {
        notes.push(format!(
            "{} expected deliveries did not arrive within the {:.1} s grace period; the relay \
             reported {slow} dropped for a slow receiver, {unknown} for an unknown \
             destination, {refused} refused (notices can themselves be dropped, so these may \
             under-count){}{}",
            report.lost,
            common.grace,
            relay_dropped
                .map(|d| format!("; its metrics count {d} drops in all"))
                .unwrap_or_default(),
            if plan.window.is_none() && plan.pacing.is_none() {
                "; the senders ran open loop (as natsbench does): --window N keeps at most N \
                 messages per sender in flight, to find the rate the relay delivers without loss"
            } else {
                ""
            }
        ));
    }
    if foreign > 0 {
        notes.push(format!(
            "{foreign} messages without the bench's timestamps arrived (another sender on \
             this relay?) and were ignored"
        ));
    }
    if target.pid.is_none() {
        notes.push("relay CPU and memory are unknown: pass --relay-pid PID".into());
    }
    Ok(Outcome {
        report,
        hist,
        co_hist,
        notes,
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
/// `measure_ns`, then `quota` messages or until `end_ns`.
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
    while now < measure_ns {
        tx.send(&dest, lane, pool.make(now, now)).await?;
        s.warmup += 1;
        k += 1;
        if k.is_multiple_of(WINDOW_STEP) {
            if let Some(w) = &window {
                // What is held back cannot be delivered while we wait.
                tx.flush().await?;
                w.step().await;
            }
            if cells::stopping() {
                return Ok((s, tx));
            }
        }
        now = now_ns();
    }
    let quota = quota.unwrap_or(u64::MAX);
    let end = end_ns.unwrap_or(u64::MAX);
    s.first_ns = now;
    while s.sent < quota && now < end {
        tx.send(&dest, lane, pool.make(now, now)).await?;
        s.sent += 1;
        k += 1;
        if k.is_multiple_of(WINDOW_STEP) {
            if let Some(w) = &window {
                tx.flush().await?;
                w.step().await;
            }
            if cells::stopping() {
                break;
            }
        }
        now = now_ns();
    }
    tx.flush().await?;
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
    rt.block_on(tx.flush())?;
    Ok((s, tx))
}
