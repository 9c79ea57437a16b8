//! The `relay` binary: runs a Celluler relay.
//!
//! `relay` with no arguments serves on loopback with the embedded default
//! config; `--config FILE` and the flags override it.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use relay::config::{ConfigError, RelayConfig};
use relay::node::{Node, node_key};
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "relay",
    version,
    about = "Celluler relay: forwards signed cell messages over QUIC"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// TOML config file (see config/relay.toml); defaults are embedded.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// QUIC listen address (overrides node.listen).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Admin HTTP address for /metrics and /health (overrides node.admin).
    #[arg(long)]
    admin: Option<SocketAddr>,
    /// Data directory: node key and, later, the durable log (overrides node.data_dir).
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Print this node's key (creating it if absent) and nothing else.
    Id {
        /// Data directory holding node.key.
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Validate a config file; names the bad field and line.
    CheckConfig {
        /// The file to check.
        file: PathBuf,
    },
}

fn load_config(cli: &Cli) -> Result<RelayConfig, ConfigError> {
    let mut cfg = match &cli.config {
        Some(path) => RelayConfig::load(path)?,
        None => RelayConfig::default(),
    };
    if let Some(a) = cli.listen {
        cfg.node.listen = a;
    }
    if let Some(a) = cli.admin {
        cfg.node.admin = a;
    }
    if let Some(d) = &cli.data_dir {
        cfg.node.data_dir = d.clone();
    }
    if let Err(mut errs) = cfg.validate() {
        return Err(errs.remove(0));
    }
    Ok(cfg)
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("relay: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match &cli.command {
        Some(Command::Id { data_dir }) => {
            let dir = match data_dir.clone().or_else(|| cli.data_dir.clone()) {
                Some(d) => d,
                None => load_config(&cli)?.node.data_dir,
            };
            println!("{}", node_key(&dir)?.public());
            return Ok(());
        }
        Some(Command::CheckConfig { file }) => {
            RelayConfig::load(file)?;
            println!("{}: ok", file.display());
            return Ok(());
        }
        None => {}
    }
    let cfg = load_config(&cli)?;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cfg.node.worker_threads)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(async move {
        let data_dir = cfg.node.data_dir.clone();
        let node = Node::bind(cfg).await?;
        let key = node.key();
        let quic = node.quic_addr();
        // Before the ready line: a supervisor may stop the relay as soon
        // as it reads it.
        let shutdown = shutdown_signal()?;
        println!(
            "relay ready: key={key} quic={quic} admin=http://{admin} data={dir}{created} | next: cell keygen --out me.key && cell listen --relay {key}@{quic} --key me.key",
            admin = node.admin_addr(),
            dir = data_dir.display(),
            created = if node.key_created() { " (new key)" } else { "" },
        );
        node.run(shutdown).await;
        Ok(())
    })
}

/// Listens for SIGINT and SIGTERM from now on, and returns what completes
/// on the first of them. Listening starts here, not when the future is
/// first polled: a signal that arrived in between would otherwise take its
/// default action and kill the relay without a clean shutdown.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("listening for SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}
