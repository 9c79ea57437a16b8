//! `cell`: a Celluler cell on the command line, for scripts, tests and
//! poking at a relay.
//!
//! ```text
//! cell keygen --out cell.key                 # new identity; prints its public key
//! cell id --key cell.key                     # prints the public key
//! cell listen --relay KEY@HOST:PORT --key cell.key [--count N] [--timeout SECS] [--service NAME]...
//! cell send --relay KEY@HOST:PORT --key cell.key (--to KEY | --broadcast | --service NAME) [MESSAGE]
//! cell discover --relay KEY@HOST:PORT --key cell.key SERVICE
//! ```
//!
//! `listen`, `send` and `discover` reach the relay over QUIC, or over TLS
//! on TCP with `--transport tcp`.
//!
//! Output meant for programs (public keys, received messages, discovery
//! results) goes to stdout, one item per line; everything for people goes
//! to stderr. Logs: `RUST_LOG` (default `warn`), on stderr.
//!
//! Exit status: 0 success, 1 an error, 2 a usage error (clap's), and for
//! `cell send` 3 when the relay reported messages it did not deliver.

use anyhow::{Context as _, anyhow, bail};
use base64::Engine as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use relay_client::Transport;
use relay_client::cell::{
    AuthMode, Cell, CellError, CellOptions, Event, Received, ReceivedAuth, Undelivered,
};
use relay_codec::keyfile::{KeyFileError, read_keyfile, write_keyfile};
use relay_codec::{Destination, Keypair, Lane, NodeAddr, PublicKey, ServiceName};
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tokio::io::AsyncBufReadExt as _;

/// `cell send`'s exit status when the relay reported messages it did not
/// deliver.
const EXIT_UNDELIVERED: u8 = 3;
/// Exit status of `cell send --durable` when the relay refused a message
/// or reported it expired.
const EXIT_REFUSED: u8 = 4;

/// What `cell send --help` says after the options.
const SEND_HELP: &str = "\
Without --durable, delivery is best effort, and nothing is stored for later: a message to a cell that is not \
attached to the relay is dropped, as is one whose receiver reads too slowly or that the relay \
refuses (expired, from the future, out of hops). The relay reports each drop to the sender; \
cell send waits for its reports before it exits and lists them on stderr, e.g.
  1 to KEY: not attached to this relay or any relay it reaches
  1 of 1 messages were not delivered
A broadcast or service message that no cell receives is not reported.

With --durable (to one cell, --to KEY): each message is stored by the relay before it is acknowledged, and waits there for a receiver that is away. `acked N` is printed on stdout when the Nth message (N from 1, in order) is acknowledged; messages not yet acknowledged are resent unchanged after each reconnect (the receiver drops repeats), across relay restarts. It exits 0 once every message is acknowledged, 4 with the reason on stderr if the relay refuses one (its durable log is full) or reports one expired.

Exit status:
  0  every message was sent and the relay reported none dropped
  1  an error: the link failed, or not every message was sent
  2  a usage error
  3  the relay reported messages it did not deliver
  4  (--durable) the relay refused a message or reported it expired";

#[derive(Parser, Debug)]
#[command(
    name = "cell",
    version,
    about = "A Celluler cell on the command line: make keys, send, listen, discover, trace",
    after_help = "Machine-readable output (keys, JSON lines) goes to stdout; notes and errors \
                  to stderr. Logs: RUST_LOG (default warn)."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Create a new identity in a secret key file (mode 0600) and print its
    /// public key. Never overwrites a file.
    Keygen {
        /// Where to write the key file.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Print the public key of a key file.
    Id {
        /// The key file.
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
    },
    /// Attach to a relay and print each message received as one JSON line.
    ///
    /// Prints `listening as KEY on RELAY` on stderr once attached. Exits 0
    /// after --count messages, or when --timeout runs out (with a note on
    /// stderr saying how many arrived).
    Listen {
        #[command(flatten)]
        link: LinkArgs,
        /// Exit after this many messages.
        #[arg(long, value_name = "N")]
        count: Option<u64>,
        /// Exit after this many seconds.
        #[arg(long, value_name = "SECS")]
        timeout: Option<f64>,
        /// Announce a service this cell offers (repeatable).
        #[arg(long = "service", value_name = "NAME")]
        services: Vec<String>,
    },
    /// Send MESSAGE, or each line of stdin when MESSAGE is absent, then
    /// flush, close, and report what the relay did not deliver.
    ///
    /// Prints `sent N message(s)` on stderr. A message to a cell that is
    /// not attached is dropped and reported (exit status 3): see below.
    #[command(after_help = SEND_HELP)]
    Send {
        #[command(flatten)]
        link: LinkArgs,
        #[command(flatten)]
        target: Target,
        /// Priority lane: control, high, normal or bulk.
        #[arg(long, default_value = "normal", value_name = "LANE")]
        lane: Lane,
        /// Sign each message (receivers verify it) or rely on the relay's
        /// proof of this cell's link.
        #[arg(long, value_enum, default_value_t = AuthArg::Signed)]
        auth: AuthArg,
        /// Durable: stored by the relay until the receiver takes it; see
        /// below. Needs --to.
        #[arg(long)]
        durable: bool,
        /// The message; without it, each line of stdin is one message.
        message: Option<String>,
    },
    /// Send one traced message to the cell DEST and print the relays it
    /// passed, like traceroute: one line per hop (index, relay, time in
    /// relay, time since send, next hop), in hop order.
    ///
    /// Exits 0 once a relay reports delivering it to DEST; 1 with the hop
    /// that did not report if the reports stop for --timeout-ms.
    Trace {
        #[command(flatten)]
        link: LinkArgs,
        /// Priority lane: control, high, normal or bulk.
        #[arg(long, default_value = "normal", value_name = "LANE")]
        lane: Lane,
        /// Give up when the destination is not reached within this many
        /// milliseconds of sending.
        #[arg(long, default_value_t = 5000, value_name = "MS")]
        timeout_ms: u64,
        /// One JSON object per hop on stdout instead of the table.
        #[arg(long)]
        json: bool,
        /// The destination cell's public key.
        dest: String,
    },
    /// Ask the relay which cells offer SERVICE; prints one JSON line per
    /// cell, or a note on stderr (and nothing on stdout) if none does.
    Discover {
        #[command(flatten)]
        link: LinkArgs,
        /// The service name.
        service: String,
    },
}

#[derive(Args, Debug)]
struct LinkArgs {
    /// The relay: its public key, host and port (UDP for QUIC, TCP for
    /// --transport tcp; a relay serves both on one port by default).
    #[arg(long, value_name = "KEY@HOST:PORT")]
    relay: String,
    /// How to reach the relay: quic (UDP) or tcp (TLS 1.3 over TCP, for
    /// networks that block UDP).
    #[arg(long, default_value = "quic", value_name = "quic|tcp")]
    transport: Transport,
    /// This cell's secret key file (create one with `cell keygen`).
    #[arg(long, value_name = "FILE")]
    key: PathBuf,
    /// Give up reaching the relay after this many seconds.
    #[arg(long, default_value_t = 5.0, value_name = "SECS")]
    connect_timeout: f64,
}

#[derive(Args, Debug)]
#[group(required = true, multiple = false)]
struct Target {
    /// Send to one cell, by its public key.
    #[arg(long, value_name = "KEY")]
    to: Option<String>,
    /// Send to every attached cell.
    #[arg(long)]
    broadcast: bool,
    /// Send to every cell offering this service.
    #[arg(long, value_name = "NAME")]
    service: Option<String>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum AuthArg {
    /// An ed25519 signature on each message.
    Signed,
    /// No signature: receivers trust the relay.
    Link,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    relay_client::logging::init("warn");
    let result = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(run(cli)),
        Err(e) => Err(anyhow!("cannot start the async runtime: {e}")),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            // One line, whatever the error chain holds.
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("cell: error: {msg}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let done = ExitCode::SUCCESS;
    match cli.cmd {
        Cmd::Keygen { out } => {
            let kp = Keypair::generate();
            write_keyfile(&out, &kp)?;
            println!("{}", kp.public());
            eprintln!(
                "wrote a new secret key to {} (keep it private)",
                out.display()
            );
            Ok(done)
        }
        Cmd::Id { key } => {
            println!("{}", read_key(&key)?.public());
            Ok(done)
        }
        Cmd::Listen {
            link,
            count,
            timeout,
            services,
        } => listen(link, count, timeout, services).await.map(|()| done),
        Cmd::Send {
            link,
            target,
            lane,
            auth,
            durable,
            message,
        } => {
            if durable {
                send_durable(link, target, lane, auth, message).await
            } else {
                send(link, target, lane, auth, message).await
            }
        }
        Cmd::Discover { link, service } => discover(link, service).await.map(|()| done),
        Cmd::Trace {
            link,
            lane,
            timeout_ms,
            json,
            dest,
        } => trace(link, lane, timeout_ms, json, dest).await,
    }
}

/// Most hops `cell trace` keeps: a message's TTL is one byte.
const MAX_TRACE_HOPS: usize = 256;

/// `cell trace`: one traced message to `dest`, its hops printed in order.
async fn trace(
    link: LinkArgs,
    lane: Lane,
    timeout_ms: u64,
    json: bool,
    dest: String,
) -> anyhow::Result<ExitCode> {
    let dest: PublicKey = dest.parse().map_err(|e| anyhow!("DEST {dest:?}: {e}"))?;
    let (mut cell, _) = connect(&link, CellOptions::default()).await?;
    let mut msg = relay_codec::Message::new(
        cell.public_key(),
        Destination::Cell(dest),
        bytes::Bytes::from_static(b"trace"),
    )
    .with_lane(lane);
    msg.trace = true;
    let sent_at = std::time::Instant::now();
    let id = cell.send_message(msg).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(timeout_ms);
    let mut hops: Vec<relay_client::cell::TraceHop> = Vec::new();
    let reached = loop {
        if hops.iter().any(|h| h.next == dest) {
            break true;
        }
        match tokio::time::timeout_at(deadline, cell.next_event()).await {
            Err(_) => break false,
            Ok(None) => {
                let _ = cell.close().await;
                bail!("the link to the relay ended before the trace was complete");
            }
            Ok(Some(Event::Trace(h))) if h.id == id => {
                if hops.len() < MAX_TRACE_HOPS {
                    hops.push(h);
                }
            }
            Ok(Some(other)) => tracing::debug!(?other, "event"),
        }
    };
    let _ = cell.close().await;
    // Reports can arrive out of order; each hop lowers the TTL by one.
    hops.sort_by_key(|h| std::cmp::Reverse(h.ttl));
    let mut out = std::io::stdout().lock();
    for (i, h) in hops.iter().enumerate() {
        let since_us = h.at.saturating_duration_since(sent_at).as_micros();
        let next = if h.next == dest {
            format!("{} (destination)", h.next)
        } else {
            h.next.to_string()
        };
        if json {
            let line = serde_json::json!({
                "hop": i + 1,
                "relay": h.relay.to_string(),
                "ttl": h.ttl,
                "in_relay_us": h.in_relay_us,
                "since_send_us": since_us as u64,
                "next": h.next.to_string(),
                "destination": h.next == dest,
            });
            writeln!(out, "{line}")?;
        } else {
            writeln!(
                out,
                "{:>2}  {}  {:.3} ms in relay  {:.3} ms  -> {}",
                i + 1,
                h.relay,
                f64::from(h.in_relay_us) / 1000.0,
                since_us as f64 / 1000.0,
                next
            )?;
        }
    }
    if reached {
        if !json {
            writeln!(out, "destination {dest} reached in {} hop(s)", hops.len())?;
        }
        Ok(ExitCode::SUCCESS)
    } else {
        drop(out);
        bail!(
            "no report from hop {} within {timeout_ms} ms: {dest} not reached (not attached \
             anywhere, or the path is down)",
            hops.len() + 1
        )
    }
}

fn seconds(what: &str, secs: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(secs)
        .map_err(|_| anyhow!("{what} must be a number of seconds, 0 or more; got {secs}"))
}

fn service_name(s: &str) -> anyhow::Result<ServiceName> {
    ServiceName::new(s).map_err(|e| anyhow!("service name {s:?}: {e} (1 to 64 bytes of text)"))
}

/// Reads the key file at `path`; a missing one is named with the command
/// that makes it.
fn read_key(path: &std::path::Path) -> anyhow::Result<Keypair> {
    read_keyfile(path).map_err(|e| match &e {
        KeyFileError::Io { error, .. } if error.kind() == std::io::ErrorKind::NotFound => {
            anyhow!("{e}; create it with `cell keygen --out {}`", path.display())
        }
        _ => e.into(),
    })
}

/// Reads the key, parses the relay address and connects.
async fn connect(link: &LinkArgs, mut opts: CellOptions) -> anyhow::Result<(Cell, NodeAddr)> {
    let relay: NodeAddr = link
        .relay
        .parse()
        .map_err(|e| anyhow!("--relay {:?}: {e}", link.relay))?;
    let key = read_key(&link.key)?;
    opts.transport = link.transport;
    opts.connect_timeout = seconds("--connect-timeout", link.connect_timeout)?;
    if opts.connect_timeout.is_zero() {
        bail!("--connect-timeout must be above 0");
    }
    let cell = Cell::connect(&relay, key, opts).await?;
    Ok((cell, relay))
}

async fn listen(
    link: LinkArgs,
    count: Option<u64>,
    timeout: Option<f64>,
    services: Vec<String>,
) -> anyhow::Result<()> {
    let timeout = timeout.map(|t| seconds("--timeout", t)).transpose()?;
    let services = services
        .iter()
        .map(|s| service_name(s))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let first_service = services.first().cloned();
    let opts = CellOptions {
        services,
        // Acknowledged below, once written out.
        ack_durable_on_receive: false,
        ..CellOptions::default()
    };
    let (mut cell, relay) = connect(&link, opts).await?;
    if let Some(service) = first_service {
        // The control stream is ordered: once the relay answers this, it has
        // processed our announcement, so "listening" below means
        // "discoverable" too.
        cell.discover(&service).await?;
    }
    // Listening for Ctrl-C starts before "listening" is printed, and once
    // for the whole loop: an interrupt sent as soon as that line is read
    // ends the loop cleanly instead of killing the process.
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .context("listening for SIGINT")?;
    eprintln!("listening as {} on {relay}", cell.public_key());
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    let mut received = 0u64;
    let stdout = std::io::stdout();
    let outcome: anyhow::Result<()> = loop {
        if count.is_some_and(|c| received >= c) {
            break Ok(());
        }
        let next = async {
            match deadline {
                Some(d) => tokio::time::timeout_at(d, cell.next_event()).await.ok(),
                None => Some(cell.next_event().await),
            }
        };
        let event = tokio::select! {
            e = next => e,
            _ = interrupt.recv() => {
                eprintln!("interrupted after {received} message(s)");
                break Ok(());
            }
        };
        match event {
            None => {
                eprintln!(
                    "timed out after {}s with {received} message(s)",
                    timeout.unwrap_or_default().as_secs_f64()
                );
                break Ok(());
            }
            Some(None) => break Err(anyhow!("the link to the relay ended")),
            Some(Some(Event::Message(m))) => {
                let line = message_json(&m).to_string();
                let mut out = stdout.lock();
                if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
                    // Whoever reads stdout is gone: nothing more to do.
                    break Ok(());
                }
                drop(out);
                if m.durable {
                    // A lost ack (the link is down) is made good: the
                    // relay redelivers, and the cell acks the repeat.
                    let _ = cell.ack_durable(&[m.id]).await;
                }
                received += 1;
            }
            Some(Some(Event::Disconnected { reason })) => {
                eprintln!("link lost: {reason}; reconnecting")
            }
            Some(Some(Event::Reconnected)) => eprintln!("link re-established"),
            Some(Some(other)) => tracing::debug!(?other, "event"),
        }
    };
    let stats = cell.stats();
    if stats.dropped_bad_signature + stats.dropped_unsupported > 0 {
        eprintln!(
            "dropped {} message(s) with bad signatures and {} unsupported (sealed) one(s)",
            stats.dropped_bad_signature, stats.dropped_unsupported
        );
    }
    let _ = cell.close().await;
    outcome
}

fn message_json(m: &Received) -> serde_json::Value {
    let destination = match &m.destination {
        Destination::Cell(k) => k.to_string(),
        Destination::Broadcast => "broadcast".to_owned(),
        Destination::Service(s) => format!("service:{s}"),
    };
    let (encoding, payload) = match std::str::from_utf8(&m.payload) {
        Ok(s) => ("utf8", s.to_owned()),
        Err(_) => (
            "base64",
            base64::engine::general_purpose::STANDARD.encode(&m.payload),
        ),
    };
    let auth = match m.auth {
        ReceivedAuth::Signature => "signature",
        _ => "link",
    };
    serde_json::json!({
        "id": m.id.to_string(),
        "source": m.source.to_string(),
        "destination": destination,
        "lane": m.lane.name(),
        "timestamp_ms": m.timestamp_ms,
        "auth": auth,
        "encoding": encoding,
        "payload": payload,
        "durable": m.durable,
    })
}

/// Reads the messages to send: MESSAGE, or each line of stdin, into `tx`.
async fn read_lines(
    message: Option<String>,
    tx: tokio::sync::mpsc::Sender<Vec<u8>>,
) -> anyhow::Result<()> {
    if let Some(m) = message {
        let _ = tx.send(m.into_bytes()).await;
        return Ok(());
    }
    let mut stdin = tokio::io::BufReader::new(tokio::io::stdin());
    loop {
        let mut line = Vec::new();
        let n = stdin
            .read_until(b'\n', &mut line)
            .await
            .context("reading stdin")?;
        if n == 0 {
            return Ok(());
        }
        if line.last() == Some(&b'\n') {
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
        }
        if tx.send(line).await.is_err() {
            return Ok(());
        }
    }
}

/// `cell send --durable`: every message in flight at once, `acked N`
/// printed in order as the relay acknowledges them.
async fn send_durable(
    link: LinkArgs,
    target: Target,
    lane: Lane,
    auth: AuthArg,
    message: Option<String>,
) -> anyhow::Result<ExitCode> {
    let Some(to) = &target.to else {
        bail!("--durable sends to one cell: give --to KEY");
    };
    let to: PublicKey = to.parse().map_err(|e| anyhow!("--to {to:?}: {e}"))?;
    let opts = CellOptions {
        auth: match auth {
            AuthArg::Signed => AuthMode::Signed,
            AuthArg::Link => AuthMode::Link,
        },
        // Keep trying while a relay restarts.
        backoff_max: Duration::from_secs(1),
        ..CellOptions::default()
    };
    let (cell, _) = connect(&link, opts).await?;
    let handle = cell.handle();
    let (line_tx, mut line_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(1024);
    let reader = tokio::spawn(read_lines(message, line_tx));
    let (receipt_tx, mut receipt_rx) = tokio::sync::mpsc::channel::<(
        relay_codec::MessageId,
        relay_client::cell::DurableReceipt,
    )>(65_536);
    let starter = {
        let handle = handle.clone();
        tokio::spawn(async move {
            while let Some(line) = line_rx.recv().await {
                let started = handle.start_durable(to, lane, line).await?;
                if receipt_tx.send(started).await.is_err() {
                    break;
                }
            }
            anyhow::Ok(())
        })
    };
    let mut acked = 0u64;
    let mut outcome = Ok(ExitCode::SUCCESS);
    let mut stopped_early = false;
    let stdout = std::io::stdout();
    while let Some((id, receipt)) = receipt_rx.recv().await {
        match receipt.await {
            Ok(relay_codec::frame::DurableStatus::Acked) => {
                acked += 1;
                let mut out = stdout.lock();
                let _ = writeln!(out, "acked {acked}").and_then(|()| out.flush());
            }
            Ok(status) => {
                eprintln!("message {} ({id}) {}", acked + 1, status.name());
                outcome = Ok(ExitCode::from(EXIT_REFUSED));
                stopped_early = true;
                break;
            }
            Err(_) => {
                outcome = Err(anyhow!(
                    "the cell stopped before message {} was acknowledged",
                    acked + 1
                ));
                stopped_early = true;
                break;
            }
        }
    }
    if stopped_early {
        // Stopped early: whatever is still on stdin is not read.
        starter.abort();
        reader.abort();
    }
    if let Ok(Err(e)) = reader.await {
        eprintln!("{e:#}");
        outcome = Err(e);
    }
    if let Ok(Err(e)) = starter.await {
        outcome = Err(e);
    }
    eprintln!("{acked} durable message(s) acknowledged");
    let _ = cell.close().await;
    outcome
}

async fn send(
    link: LinkArgs,
    target: Target,
    lane: Lane,
    auth: AuthArg,
    message: Option<String>,
) -> anyhow::Result<ExitCode> {
    let destination = match (&target.to, target.broadcast, &target.service) {
        (Some(k), _, _) => Destination::Cell(
            k.parse::<PublicKey>()
                .map_err(|e| anyhow!("--to {k:?}: {e}"))?,
        ),
        (_, true, _) => Destination::Broadcast,
        (_, _, Some(s)) => Destination::Service(service_name(s)?),
        _ => bail!("say where to send: --to KEY, --broadcast or --service NAME"),
    };
    let opts = CellOptions {
        auth: match auth {
            AuthArg::Signed => AuthMode::Signed,
            AuthArg::Link => AuthMode::Link,
        },
        // The relay's reports of what it dropped: summed by the cell and
        // complete once close has read the relay's Close.
        notices: true,
        ..CellOptions::default()
    };
    let (cell, _) = connect(&link, opts).await?;
    let tally = cell.handle();
    let mut sent = 0u64;
    let sending: anyhow::Result<()> = async {
        let handle = cell.handle();
        let send_one = |payload: Vec<u8>| handle.send_to(destination.clone(), lane, payload);
        match message {
            Some(m) => {
                send_one(m.into_bytes()).await?;
                sent += 1;
            }
            None => {
                let mut stdin = tokio::io::BufReader::new(tokio::io::stdin());
                let mut line = Vec::new();
                loop {
                    line.clear();
                    let n = stdin
                        .read_until(b'\n', &mut line)
                        .await
                        .context("reading stdin")?;
                    if n == 0 {
                        break;
                    }
                    if line.last() == Some(&b'\n') {
                        line.pop();
                        if line.last() == Some(&b'\r') {
                            line.pop();
                        }
                    }
                    send_one(line.clone()).await?;
                    sent += 1;
                }
            }
        }
        Ok(())
    }
    .await;
    let closed = cell.close().await;
    match (&sending, &closed) {
        (Ok(()), Ok(())) => eprintln!("sent {sent} message(s)"),
        (_, Err(CellError::Unsent { count, .. })) => {
            eprintln!("queued {sent} message(s); {count} of them were not sent",)
        }
        _ => eprintln!("queued {sent} message(s) before the error"),
    }
    let undelivered = tally.undelivered();
    report_undelivered(&undelivered, sent);
    sending?;
    closed?;
    if !undelivered.complete {
        eprintln!(
            "note: the relay did not confirm the close, so it may have dropped messages it did \
             not report"
        );
    }
    Ok(if undelivered.total > 0 {
        ExitCode::from(EXIT_UNDELIVERED)
    } else {
        ExitCode::SUCCESS
    })
}

/// Lists on stderr what the relay reported it did not deliver, one line
/// per reason and destination, then the sum: `N of M messages were not
/// delivered`.
fn report_undelivered(u: &Undelivered, sent: u64) {
    if u.total == 0 {
        return;
    }
    for (code, to, n) in &u.by_destination {
        if to.0 == [0; 32] {
            eprintln!("{n}: {}", code.describe());
        } else {
            eprintln!("{n} to {to}: {}", code.describe());
        }
    }
    eprintln!("{} of {sent} messages were not delivered", u.total);
}

async fn discover(link: LinkArgs, service: String) -> anyhow::Result<()> {
    let service = service_name(&service)?;
    let opts = CellOptions {
        reconnect: false,
        notices: false,
        ..CellOptions::default()
    };
    let (cell, _) = connect(&link, opts).await?;
    let found = cell.discover(&service).await;
    let _ = cell.close().await;
    let found = found?;
    if found.is_empty() {
        eprintln!("no cell offers {service} on this relay");
    }
    let mut out = std::io::stdout().lock();
    for (key, app_version) in found {
        let line = serde_json::json!({ "key": key.to_string(), "app_version": app_version });
        writeln!(out, "{line}")?;
    }
    out.flush()?;
    Ok(())
}
