//! The `relay` binary: runs a Celluler relay.
//!
//! `relay` with no arguments serves on loopback with the embedded default
//! config; `--config FILE` and the flags override it.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use relay::config::{ConfigError, ListenTcp, PeerAddr, RelayConfig, resolve_socket_addr};
use relay::node::{KEY_FILE, Node, node_key};
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "relay",
    version,
    about = "Celluler relay: forwards signed cell messages over QUIC and TLS over TCP"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// TOML config file (see config/relay.toml); defaults are embedded.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// QUIC listen address, IP:PORT or HOST:PORT (overrides node.listen).
    #[arg(long, value_name = "HOST:PORT", value_parser = resolve_socket_addr)]
    listen: Option<SocketAddr>,
    /// TLS-over-TCP listen address, HOST:PORT as --listen; `same` for the
    /// address of --listen (the default), `off` for QUIC only (overrides
    /// node.listen_tcp).
    #[arg(long, value_name = "HOST:PORT|same|off", value_parser = ListenTcp::parse)]
    listen_tcp: Option<ListenTcp>,
    /// Admin HTTP address for /metrics and /health, as --listen (overrides
    /// node.admin).
    #[arg(long, value_name = "HOST:PORT", value_parser = resolve_socket_addr)]
    admin: Option<SocketAddr>,
    /// Data directory: node key and, later, the durable log (overrides node.data_dir).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// A peer relay to dial and redial, KEY@HOST:PORT over QUIC or
    /// tcp://KEY@HOST:PORT; repeatable; added to mesh.peers (its key is
    /// trusted).
    #[arg(long = "peer", value_name = "KEY@HOST:PORT")]
    peers: Vec<PeerAddr>,
}

#[derive(Subcommand)]
enum Command {
    /// Print this node's public key on stdout, and on stderr which key
    /// file it read. A missing key is an error unless --create.
    Id {
        /// Data directory holding node.key.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Create the key if the directory has none (to know a relay's
        /// address before its first start).
        #[arg(long)]
        create: bool,
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
    if let Some(t) = cli.listen_tcp {
        cfg.node.listen_tcp = t;
    }
    if let Some(a) = cli.admin {
        cfg.node.admin = a;
    }
    if let Some(d) = &cli.data_dir {
        cfg.node.data_dir = d.clone();
    }
    cfg.mesh.peers.extend(cli.peers.iter().cloned());
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
        Some(Command::Id { data_dir, create }) => {
            let dir = match data_dir.clone().or_else(|| cli.data_dir.clone()) {
                Some(d) => d,
                None => load_config(&cli)?.node.data_dir,
            };
            // Absolute paths: `relay id` run from another directory than
            // the relay's is the mistake these messages show.
            let dir = std::path::absolute(&dir).unwrap_or(dir);
            let (key, created) = node_key(&dir, *create)?;
            let file = dir.join(KEY_FILE);
            if created {
                eprintln!("created a new key in {}", file.display());
            } else {
                eprintln!("read key from {}", file.display());
            }
            println!("{}", key.public());
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
    relay_link::logging::init("info");
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
        let tcp = node
            .tcp_addr()
            .map_or_else(|| "off".to_owned(), |a| a.to_string());
        // Before the ready line: a supervisor may stop the relay as soon
        // as it reads it.
        let shutdown = shutdown_signal()?;
        let (cell, where_cell) = cell_command();
        // The cell's key goes outside any work tree, where it cannot be
        // committed by accident.
        let cell_key = "~/.config/celluler/me.key";
        println!(
            "relay ready: key={key} quic={quic} tcp={tcp} admin=http://{admin} data={dir}{created} | next: \
             {cell} keygen --out {cell_key} && {cell} listen --relay {key}@{quic} --key {cell_key}{where_cell}",
            admin = node.admin_addr(),
            dir = data_dir.display(),
            created = if node.key_created() { " (new key)" } else { "" },
        );
        node.run(shutdown).await;
        Ok(())
    })
}

/// How the ready line's next step runs `cell`: the `cell` binary beside
/// this `relay` (where `cargo build` puts both), quoted for a shell, so the
/// command runs as printed; else `cell` from PATH, with a note saying so.
fn cell_command() -> (String, &'static str) {
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.join("cell")))
        .filter(|p| p.is_file());
    match beside.as_deref().map(|p| p.to_string_lossy()) {
        Some(path) => match shlex::try_quote(&path) {
            Ok(quoted) => (quoted.into_owned(), ""),
            Err(_) => ("cell".to_owned(), NOT_BESIDE),
        },
        None => ("cell".to_owned(), NOT_BESIDE),
    }
}

/// The note after a next step whose `cell` was not found beside `relay`.
const NOT_BESIDE: &str = " (no cell binary beside this relay: put one on PATH, e.g. from `cargo build --release --bin cell`)";

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
