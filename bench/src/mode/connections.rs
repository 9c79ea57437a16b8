//! `connections`: attach many idle cells and report how fast the relay
//! takes them and how much memory each costs it.
//!
//! Each idle cell is a full [`relay_client::Cell`] with its own ed25519
//! key, what an application links: QUIC (or TCP and TLS) handshake,
//! Hello/Welcome, its link tasks. Over QUIC the cells share one client
//! endpoint ([`CellOptions::endpoint`]; `--endpoints` spreads them over
//! more UDP sockets); over TCP each has its connection (a file descriptor
//! each, on both sides). An idle `Cell` allocates its queues and dedup state only
//! as it uses them: ten thousand of them take about 50 KiB each in the
//! bench, QUIC connection included (a bare connection with its handshake
//! done takes about 32 KiB).

use crate::progress::Bar;
use crate::report::{Report, human};
use crate::stats::{CpuSample, mem_available_kib, round1, status_kib};
use crate::target::{Target, raise_nofile_limit};
use anyhow::{Context as _, Result, anyhow, bail};
use relay_client::Transport;
use relay_client::cell::{AuthMode, Cell, CellOptions};
use relay_client::link::quic;
use relay_codec::Keypair;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::task::JoinSet;

/// What a connections run does.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Idle cells to attach.
    pub cells: usize,
    /// Handshakes in flight at once.
    pub concurrency: usize,
    /// Client UDP sockets the connections are spread over.
    pub endpoints: usize,
    /// Seconds to hold the attached cells before measuring memory (the
    /// relay's idle CPU is measured over this span).
    pub hold: f64,
    /// Stop attaching when the relay's projected memory would exceed this
    /// share of the machine's available memory (0: never).
    pub memory_guard: f64,
    /// Bound on each cell's QUIC handshake and Hello/Welcome.
    pub connect_timeout: Duration,
}

/// Runs the connections mode.
pub async fn run(target: &Target, plan: &Plan) -> Result<(Report, Vec<String>)> {
    let mut notes = Vec::new();
    let relay_addr: SocketAddr = tokio::net::lookup_host(target.addr.host_port())
        .await
        .with_context(|| format!("resolving {}", target.addr.host_port()))?
        .next()
        .ok_or_else(|| anyhow!("{} resolves to no address", target.addr.host_port()))?;
    if target.transport == Transport::Tcp {
        let limit = raise_nofile_limit();
        if (plan.cells as u64) + 64 > limit {
            bail!(
                "--cells {} over TCP needs a socket each, but the open-file limit is {limit} \
                 (`ulimit -n`; raise the hard limit, attach fewer cells, or use --transport \
                 quic, where one UDP socket carries any number)",
                plan.cells
            );
        }
    } else if plan.endpoints > 64 {
        let limit = raise_nofile_limit();
        if (plan.endpoints as u64) + 64 > limit {
            bail!(
                "--endpoints {} needs that many UDP sockets, but the open-file limit is {limit} \
                 (`ulimit -n`; raise the hard limit, or use fewer endpoints: one endpoint \
                 carries any number of connections)",
                plan.endpoints
            );
        }
    }
    let bind: SocketAddr = if relay_addr.is_ipv4() {
        "0.0.0.0:0".parse().expect("valid")
    } else {
        "[::]:0".parse().expect("valid")
    };
    // Over TCP every cell's link is a connection of its own: no endpoints.
    let endpoints: Vec<quinn::Endpoint> = match target.transport {
        Transport::Quic => (0..plan.endpoints.max(1))
            .map(|_| quic::client_endpoint(bind))
            .collect::<Result<_, _>>()
            .context("creating the client QUIC endpoint")?,
        Transport::Tcp => Vec::new(),
    };
    // The first relay: where connections attaches its cells.
    let pid = target.pids.first().copied();
    let links_before = target
        .metric("celluler_links", "role=\"cell\"")
        .await
        .map(|v| v as u64);
    let rss_before = pid.and_then(|p| status_kib(Some(p), "VmRSS"));
    let bench_before = status_kib(None, "VmRSS");
    // Idle cells: nothing to report on, nothing to repair.
    let options = CellOptions {
        transport: target.transport,
        ..crate::cells::options(AuthMode::Link, false, Vec::new(), plan.connect_timeout)
    };

    let mut bar = Bar::new(plan.cells as u64, "cells");
    let cpu_start = CpuSample::take(pid);
    let started = Instant::now();
    let mut attached: Vec<Cell> = Vec::with_capacity(plan.cells);
    let mut failed = 0u64;
    let mut first_error: Option<String> = None;
    let mut stopped_early = None;
    let mut set = JoinSet::new();
    let mut next = 0usize;
    let mut last_attach = started;
    let mut next_guard_check = 100usize.min(plan.cells);
    loop {
        while next < plan.cells && set.len() < plan.concurrency.max(1) && stopped_early.is_none() {
            let opts = CellOptions {
                endpoint: (!endpoints.is_empty())
                    .then(|| endpoints[next % endpoints.len()].clone()),
                ..options.clone()
            };
            let relay = target.addr.clone();
            set.spawn(async move {
                Cell::connect(&relay, Keypair::generate(), opts)
                    .await
                    .map_err(anyhow::Error::from)
            });
            next += 1;
        }
        let Some(r) = set.join_next().await else {
            break;
        };
        match r {
            Ok(Ok(cell)) => {
                attached.push(cell);
                last_attach = Instant::now();
            }
            Ok(Err(e)) => {
                failed += 1;
                first_error.get_or_insert_with(|| format!("{e:#}"));
            }
            Err(e) => {
                failed += 1;
                first_error.get_or_insert_with(|| format!("attach task failed: {e}"));
            }
        }
        let done = attached.len() + failed as usize;
        let rate = attached.len() as f64 / started.elapsed().as_secs_f64().max(1e-9);
        bar.set(done as u64, format!("{} cells/s", human(rate)));
        if crate::cells::stopping() {
            bail!("interrupted");
        }
        if failed > 0 && attached.is_empty() && failed as usize >= plan.concurrency.min(plan.cells)
        {
            bail!(
                "could not attach any cell to the relay {}: {}\ncheck that a relay runs there \
                 and that KEY is its key, or use --spawn",
                target.addr,
                first_error.unwrap_or_default()
            );
        }
        if plan.memory_guard > 0.0 && attached.len() >= next_guard_check && stopped_early.is_none()
        {
            next_guard_check += 256;
            if let Some(why) = memory_guard(pid, rss_before, attached.len(), plan) {
                stopped_early = Some(why);
            }
        }
    }
    bar.finish();
    let attach_secs = last_attach.duration_since(started).as_secs_f64();
    let cpu_attached = CpuSample::take(pid);
    let ok = attached.len() as u64;

    // Let the relay finish attaching (it attaches right after Welcome),
    // confirm with its metrics when its admin address is known, and
    // measure its idle cost over the hold.
    if let Some(before) = links_before {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match target
                .metric("celluler_links", "role=\"cell\"")
                .await
                .map(|v| v as u64)
            {
                Some(n) if n >= before + ok => break,
                Some(n) if Instant::now() > deadline => {
                    notes.push(format!(
                        "the relay's celluler_links{{role=\"cell\"}} shows {} new links, not {ok}",
                        n.saturating_sub(before)
                    ));
                    break;
                }
                None => break,
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
    let hold_start = CpuSample::take(pid);
    tokio::time::sleep(Duration::from_secs_f64(plan.hold.max(0.2))).await;
    let hold_end = CpuSample::take(pid);
    let alive = attached.iter().filter(|c| c.is_connected()).count() as u64;
    if alive < ok {
        notes.push(format!(
            "{} of the {ok} attached cells were closed by the relay during the hold: {}",
            ok - alive,
            attached
                .iter()
                .find_map(Cell::down_reason)
                .unwrap_or_default()
        ));
    }
    let rss_after = pid.and_then(|p| status_kib(Some(p), "VmRSS"));
    let bench_after = status_kib(None, "VmRSS");
    let peak = pid.and_then(|p| status_kib(Some(p), "VmHWM"));

    // Close everything (each cell says Close, the relay lets it go); a
    // shared endpoint outlives its cells, so let it send the last closes.
    crate::cells::close_all(attached).await;
    for ep in &endpoints {
        let _ = tokio::time::timeout(Duration::from_secs(3), ep.wait_idle()).await;
    }

    let (relay_cpu, bench_cpu) = cpu_start.pct_until(&cpu_attached);
    let (relay_idle, _) = hold_start.pct_until(&hold_end);
    let per_cell = match (rss_before, rss_after) {
        (Some(b), Some(a)) if ok > 0 => Some(round1((a as f64 - b as f64) * 1024.0 / ok as f64)),
        _ => None,
    };
    let bench_per_cell = match (bench_before, bench_after) {
        (Some(b), Some(a)) if ok > 0 => Some(round1((a as f64 - b as f64) * 1024.0 / ok as f64)),
        _ => None,
    };
    if failed > 0 {
        notes.push(format!(
            "{failed} attach attempts failed; the first: {}",
            first_error.unwrap_or_default()
        ));
    }
    if pid.is_none() {
        notes.push("relay CPU and memory are unknown: pass --relay-pid PID".into());
    }
    let links = match target.transport {
        Transport::Quic => format!("on one of {} shared client endpoint(s)", endpoints.len()),
        Transport::Tcp => "over a TCP connection of its own".to_owned(),
    };
    notes.push(format!(
        "each cell is a relay_client Cell {links}; memory per cell = (relay RSS after - \
         before) / cells"
    ));
    let report = Report {
        mode: "connections".into(),
        broker: "relay".into(),
        target: target.kind().into(),
        relay: target.addr.to_string(),
        transport: Some(target.transport.to_string()),
        auth: "link".into(),
        secs: (attach_secs * 1e6).round() / 1e6,
        relay_cpu_pct: relay_cpu,
        bench_cpu_pct: bench_cpu,
        relay_peak_rss_kib: peak,
        cells: Some(ok),
        cells_requested: Some(plan.cells as u64),
        attach_failed: Some(failed),
        attach_per_s: Some(if attach_secs > 0.0 {
            (ok as f64 / attach_secs).round()
        } else {
            0.0
        }),
        relay_rss_per_cell_bytes: Some(per_cell),
        relay_rss_before_kib: rss_before,
        relay_rss_after_kib: rss_after,
        relay_idle_cpu_pct: relay_idle,
        bench_rss_per_cell_bytes: bench_per_cell,
        stopped_early,
        bench_version: env!("CARGO_PKG_VERSION").into(),
        ..Report::default()
    };
    Ok((report, notes))
}

/// Whether attaching the remaining cells would take the relay past the
/// guard, judged from the growth so far.
fn memory_guard(pid: Option<u32>, before: Option<u64>, n: usize, plan: &Plan) -> Option<String> {
    let (pid, before) = (pid?, before?);
    let now = status_kib(Some(pid), "VmRSS")?;
    let avail = mem_available_kib()?;
    let per_cell = now.saturating_sub(before) as f64 / n as f64;
    let more = per_cell * (plan.cells - n) as f64;
    let budget = avail as f64 * plan.memory_guard;
    (more > budget).then(|| {
        format!(
            "after {n} cells the relay grew by {:.1} KiB per cell; {} cells would need {:.2} GiB \
             more, over {:.0}% of this machine's available {:.2} GiB \
             (--memory-guard 0 turns this check off)",
            per_cell,
            plan.cells,
            more / (1u64 << 20) as f64,
            plan.memory_guard * 100.0,
            avail as f64 / (1u64 << 20) as f64
        )
    })
}
