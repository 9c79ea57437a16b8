//! `relay-bench`: load generator and reporter for Celluler relays.
//!
//! Modes: `throughput`, `latency`, `fanout`, `connections` and `durable`
//! (throughput's shape with durable messages, plus the time to the relay's
//! ack). Each runs against a relay the bench starts
//! (`--spawn`, see [`target`]) or one already running (`--relay
//! KEY@HOST:PORT`), with cells built on the real client API
//! ([`relay_client::Cell`]), and reports a table on stdout plus optional
//! JSON, `.hgrm` and SVG files ([`report`]). With `--broker nats`, the
//! throughput and latency modes run the same shapes against nats-server
//! through async-nats ([`nats`]), for the comparison in bench/compare.sh.
//!
//! How it measures honestly: every payload starts with the actual and the
//! intended send time ([`payload`]), in ns since one process-local epoch
//! ([`clock`]); receivers in the same process record latency in HDR
//! histograms, reading the clock per message ([`tally`]); loss is counted
//! after a no-progress grace period; CPU of the server and of the bench
//! come from `/proc` ([`stats`]).

pub mod cells;
pub mod cli;
pub mod clock;
pub mod mode;
pub mod nats;
pub mod payload;
pub mod progress;
pub mod raw;
pub mod report;
pub mod run;
pub mod stats;
pub mod tally;
pub mod target;

use anyhow::{Context as _, Result};
use clap::Parser as _;
use cli::{Broker, Cli, Cmd, TargetArgs};
use relay_client::Transport;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::Duration;
use target::{NatsTarget, Server, Target};

/// A feature the relay or client does not have yet: exit status 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unavailable(pub String);

/// A combination of arguments that cannot be run: exit status 2, as for
/// the arguments clap itself refuses.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadArgs(pub String);

/// The run was interrupted (Ctrl-C or SIGTERM): exit status 130.
#[derive(Debug)]
struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted; the spawned server (if any) was stopped")
    }
}

impl std::error::Error for Interrupted {}

/// The binary's `main`.
pub fn main_entry() -> ExitCode {
    clock::init();
    let cli = Cli::parse();
    relay_client::logging::init("warn");
    match dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e)
            if e.downcast_ref::<Unavailable>().is_some()
                || e.downcast_ref::<BadArgs>().is_some() =>
        {
            eprintln!("relay-bench: {e}");
            ExitCode::from(2)
        }
        Err(e) if e.downcast_ref::<Interrupted>().is_some() => {
            eprintln!("relay-bench: {e}");
            ExitCode::from(130)
        }
        Err(e) => {
            eprintln!("relay-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Durable(a) => {
            let (common, plan) = mode::durable::plan(&a)?;
            message_mode(&a.target, common, plan)
        }
        Cmd::Throughput(a) => {
            let (common, plan) = mode::throughput::plan(&a)?;
            message_mode(&a.target, common, plan)
        }
        Cmd::Latency(a) => {
            let (common, plan) = mode::latency::plan(&a)?;
            message_mode(&a.target, common, plan)
        }
        Cmd::Fanout(a) => {
            let (common, plan) = mode::fanout::plan(&a)?;
            message_mode(&a.target, common, plan)
        }
        Cmd::Reach(a) => {
            mode::check_broker(&a.target, None)?;
            let mut target = open_target(&a.target)?;
            let rt = runtime(&a.target)?;
            let timeout = Duration::from_secs_f64(a.target.connect_timeout);
            let r = rt.block_on(interruptible(mode::reach::run(
                &target, a.attaches, timeout,
            )));
            rt.shutdown_timeout(Duration::from_secs(2));
            let report = r.map_err(|e| with_health(e, target.health()))?;
            target.stop();
            println!(
                "relay-bench reach: {} relays, {}: {} attaches to the last relay, reachable from \
                 every other relay after median {} ms, max {} ms",
                report.relays,
                report.topology.as_deref().unwrap_or("-"),
                report.secs.len(),
                report.median_ms,
                report.max_ms
            );
            if let Some(p) = &a.json {
                let body = serde_json::to_string_pretty(&report)?;
                std::fs::write(p, body + "\n")
                    .with_context(|| format!("writing {}", p.display()))?;
            }
            Ok(())
        }
        Cmd::Connections(a) => {
            mode::check_broker(&a.target, None)?;
            if a.target.broker == Broker::Nats {
                return Err(Unavailable(
                    "connections --broker nats: the NATS comparison covers throughput and \
                     latency; idle connections to nats-server are not measured"
                        .into(),
                )
                .into());
            }
            if a.target.transport == Some(cli::TransportArg::Tcp) && a.endpoints != 1 {
                return Err(BadArgs(
                    "--endpoints spreads QUIC connections over UDP sockets: over --transport \
                     tcp each cell has a connection of its own; leave --endpoints out"
                        .into(),
                )
                .into());
            }
            let plan = mode::connections::Plan {
                cells: a.cells,
                concurrency: a.concurrency,
                endpoints: a.endpoints,
                hold: a.hold,
                memory_guard: a.memory_guard,
                connect_timeout: Duration::from_secs_f64(a.target.connect_timeout),
            };
            let mut target = open_target(&a.target)?;
            let rt = runtime(&a.target)?;
            let r = rt.block_on(interruptible(mode::connections::run(&target, &plan)));
            rt.shutdown_timeout(Duration::from_secs(2));
            let (report, notes) = r.map_err(|e| with_health(e, target.health()))?;
            target.stop();
            print!("{}", report::connections_table(&report, &notes));
            if let Some(p) = &a.json {
                report::write_json(p, &report)?;
            }
            if report.stopped_early.is_some() {
                anyhow::bail!("stopped before attaching every cell (see above)");
            }
            Ok(())
        }
    }
}

/// The server to measure: started, or attached to.
fn open_server(t: &TargetArgs) -> Result<Server> {
    match t.broker {
        Broker::Relay => open_target(t).map(Server::Relay),
        Broker::Nats if t.spawn => NatsTarget::spawn(t.nats_bin.as_deref()).map(Server::Nats),
        Broker::Nats => {
            let addr = t
                .nats_addr
                .clone()
                .context("--nats-addr HOST:PORT or --spawn is required with --broker nats")?;
            NatsTarget::attach(addr, t.nats_pid).map(Server::Nats)
        }
    }
}

/// The relay to measure: started, or attached to.
fn open_target(t: &TargetArgs) -> Result<Target> {
    let transport = t.transport.map_or(Transport::Quic, Transport::from);
    if t.spawn && t.relays > 1 {
        Target::spawn_mesh(
            t.relay_bin.as_deref(),
            t.relay_config.as_deref(),
            &t.relay_log,
            transport,
            t.relays as usize,
            t.topology,
        )
    } else if t.spawn {
        Target::spawn(
            t.relay_bin.as_deref(),
            t.relay_config.as_deref(),
            &t.relay_log,
            transport,
        )
    } else {
        let addr = t
            .relay
            .clone()
            .context("--relay KEY@HOST:PORT or --spawn is required")?;
        Target::attach(addr, t.relay_pid, transport)
    }
}

fn runtime(t: &TargetArgs) -> Result<tokio::runtime::Runtime> {
    let threads = t.threads.map(usize::from).unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
    });
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name("bench")
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Runs `f` until it ends or Ctrl-C/SIGTERM arrives.
async fn interruptible<T>(f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).ok();
    let term = async move {
        match term.as_mut() {
            Some(t) => {
                t.recv().await;
            }
            None => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        r = f => r,
        _ = tokio::signal::ctrl_c() => {
            cells::STOP.store(true, Ordering::Relaxed);
            Err(Interrupted.into())
        }
        _ = term => {
            cells::STOP.store(true, Ordering::Relaxed);
            Err(Interrupted.into())
        }
    }
}

/// Adds what is known about a spawned server's death (`health`) to an
/// error.
fn with_health(e: anyhow::Error, health: Option<String>) -> anyhow::Error {
    match health {
        Some(h) if e.downcast_ref::<Interrupted>().is_none() => e.context(h),
        _ => e,
    }
}

fn message_mode(t: &TargetArgs, common: run::Common, plan: run::Plan) -> Result<()> {
    let mut server = open_server(t)?;
    let rt = runtime(t)?;
    let r = rt.block_on(interruptible(run::run(&server, &common, &plan)));
    rt.shutdown_timeout(Duration::from_secs(2));
    let out = r.map_err(|e| with_health(e, server.health()))?;
    server.stop();
    print!("{}", report::table(&out.report, &out.notes));
    if let Some(p) = &common.json {
        report::write_json(p, &out.report)?;
    }
    if let Some(p) = &common.hgrm {
        report::write_hgrm(p, &out.hist)?;
        if plan.pacing.is_some() {
            report::write_hgrm(&corrected_path(p), &out.co_hist)?;
        }
    }
    if let Some(p) = &common.plot {
        let title = format!(
            "relay-bench {}: {} B, {} msg/s",
            plan.mode,
            common.size,
            report::human(out.report.msgs_per_s)
        );
        if plan.pacing.is_some() {
            report::write_plot(
                p,
                &title,
                &[("one-way", &out.hist), ("co-corrected", &out.co_hist)],
            )?;
        } else {
            report::write_plot(p, &title, &[("one-way", &out.hist)])?;
        }
    }
    Ok(())
}

/// `lat.hgrm` -> `lat.corrected.hgrm`.
pub fn corrected_path(p: &Path) -> PathBuf {
    let stem = p
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = match p.extension() {
        Some(ext) => format!("{stem}.corrected.{}", ext.to_string_lossy()),
        None => format!("{stem}.corrected"),
    };
    p.with_file_name(name)
}
