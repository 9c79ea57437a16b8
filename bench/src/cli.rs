//! The command line: subcommands, knobs and their help texts.

use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum};
use relay_codec::{Lane, NodeAddr};
use std::path::PathBuf;

/// Smallest payload: it carries two 8-byte timestamps.
pub const MIN_SIZE: usize = crate::payload::STAMP_LEN;

#[derive(Parser, Debug)]
#[command(
    name = "relay-bench",
    version,
    about = "Load generator and reporter for Celluler relays",
    long_about = "Load generator and reporter for Celluler relays.\n\n\
        Every message carries its send time; receivers in this process record one-way latency \
        in HDR histograms. Results: a table on stdout, and optionally --json, --hgrm (HDR \
        percentile distribution) and --plot (SVG). Run against a relay it starts (--spawn) or one \
        already running (--relay KEY@HOST:PORT).",
    after_help = "Examples:\n  \
        relay-bench throughput --spawn --senders 4 --receivers 4 --size 128 --count 2000000\n  \
        relay-bench latency --spawn --rate 50000 --duration 10 --hgrm lat.hgrm --plot lat.svg\n  \
        relay-bench fanout --spawn --receivers 8 --target service --count 100000\n  \
        relay-bench connections --spawn --cells 10000 --json conns.json\n  \
        relay-bench throughput --spawn --relays 3 --topology line --count 500000 --window 1000\n  \
        relay-bench reach --spawn --relays 5 --topology line --attaches 9\n  \
        relay-bench throughput --relay KEY@10.0.0.5:4433 --relay-pid 4242 --duration 30\n  \
        relay-bench throughput --spawn --broker nats --senders 4 --receivers 4 --count 2000000\n  \
        relay-bench latency --broker nats --nats-addr 127.0.0.1:4222 --nats-pid 4343 --rate 50000\n\n\
        Exit status: 0 done, 1 the run failed, 2 bad arguments or a feature not available yet, \
        130 interrupted."
)]
pub struct Cli {
    /// What to measure.
    #[command(subcommand)]
    pub cmd: Cmd,
}

/// The modes.
#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// P sender cells -> S receiver cells as fast as the client takes
    /// messages; delivered msg/s, MB/s, latency under load, loss.
    ///
    /// Sender j sends to receiver j % S; the --count messages are split
    /// across the senders; sending stops at --count or --duration.
    /// msgs_per_s = received / (last receive - first send).
    Throughput(ThroughputArgs),
    /// One sender paced at --rate msg/s to one receiver for --duration:
    /// one-way latency, and latency corrected for coordinated omission.
    Latency(LatencyArgs),
    /// One sender to K receivers by broadcast or service; every receiver
    /// must get every message (received = K x sent).
    Fanout(FanoutArgs),
    /// Attach --cells idle cells: attach rate (cells/s) and the relay's
    /// memory per cell.
    Connections(ConnectionsArgs),
    /// `throughput` with durable messages: each is logged and synced by
    /// the relay before it is acknowledged; adds the time to that ack
    /// (ack_p50_us, ack_p99_us) to the report. Same flags as throughput.
    Durable(ThroughputArgs),
    /// Across a mesh (--spawn --relays N): the time from a cell's attach to
    /// the last relay until a probe from a cell on every other relay has
    /// reached it (probes every 10 ms), over --attaches cells one after
    /// another; median and max.
    Reach(ReachArgs),
}

/// `reach` flags.
#[derive(Args, Debug)]
pub struct ReachArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Cells to attach, one after another (each timed).
    #[arg(long, value_name = "K", default_value_t = 9, value_parser = parse_count_usize)]
    pub attaches: usize,
    /// Write the results as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

/// Which server to measure.
#[derive(Args, Debug, Clone)]
#[command(group(ArgGroup::new("relay_target").required(true).args(["relay", "spawn", "nats_addr"])))]
pub struct TargetArgs {
    /// What to measure: the Celluler relay, or nats-server through the
    /// official async-nats client with the same load shapes and report
    /// (throughput and latency modes), to compare the two.
    #[arg(long, value_enum, default_value_t = Broker::Relay)]
    pub broker: Broker,
    /// An already running relay, as KEY@HOST:PORT (the relay prints it on
    /// its `relay ready:` line).
    #[arg(long, value_name = "KEY@HOST:PORT", value_parser = parse_node_addr)]
    pub relay: Option<NodeAddr>,
    /// The running relay's process id, to report its CPU and memory (from
    /// /proc; same machine only).
    #[arg(long, value_name = "PID", requires = "relay", conflicts_with = "spawn")]
    pub relay_pid: Option<u32>,
    /// Start the server for this run, stopped (SIGTERM) when it ends: the
    /// `relay` binary beside relay-bench, else on PATH, on free 127.0.0.1
    /// ports with a temporary data directory; with --broker nats,
    /// `nats-server -a 127.0.0.1 -p -1 -m -1` (free client and monitoring
    /// ports, default config: no JetStream).
    #[arg(long)]
    pub spawn: bool,
    /// With --spawn: how many relays to start, each with its own key and
    /// data directory, peered as --topology says (at most 64); the run
    /// starts once every relay sees all N. Senders attach to the first
    /// relay, receivers to the last (square: the opposite corner).
    #[arg(long, value_name = "N", default_value_t = 1, requires = "spawn",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub relays: u32,
    /// With --spawn --relays N: how the relays are peered (over QUIC).
    #[arg(long, value_enum, default_value_t = Topology::Line, requires = "spawn")]
    pub topology: Topology,
    /// With --spawn: the relay binary to start.
    #[arg(long, value_name = "PATH", requires = "spawn")]
    pub relay_bin: Option<PathBuf>,
    /// With --spawn: a relay config file (TOML, see config/relay.toml);
    /// ports and data directory are still chosen by relay-bench.
    #[arg(long, value_name = "FILE", requires = "spawn")]
    pub relay_config: Option<PathBuf>,
    /// With --spawn: the relay's log filter (RUST_LOG); its last lines are
    /// shown if it fails.
    #[arg(
        long,
        value_name = "FILTER",
        default_value = "warn",
        requires = "spawn"
    )]
    pub relay_log: String,
    /// With --broker nats: an already running nats-server, as HOST:PORT
    /// (its client port).
    #[arg(long, value_name = "HOST:PORT")]
    pub nats_addr: Option<String>,
    /// The running nats-server's process id, to report its CPU and memory.
    #[arg(
        long,
        value_name = "PID",
        requires = "nats_addr",
        conflicts_with = "spawn"
    )]
    pub nats_pid: Option<u32>,
    /// With --spawn --broker nats: the nats-server binary to start
    /// (default: `nats-server` on PATH; Debian: apt-get install nats-server).
    #[arg(long, value_name = "PATH", requires = "spawn")]
    pub nats_bin: Option<PathBuf>,
    /// With --broker nats: messages each subscription may queue in the
    /// client before async-nats drops them as a slow consumer (the
    /// library's default is 65536; a larger queue lets the run measure the
    /// server rather than the receiving task; what is dropped counts as
    /// lost).
    #[arg(long, value_name = "N", default_value_t = crate::nats::DEFAULT_SUB_CAPACITY,
          value_parser = parse_count_usize)]
    pub nats_sub_capacity: usize,
    /// How cells (and --client raw links) reach the relay: quic (UDP, the
    /// default) or tcp (TLS 1.3 over TCP, at the relay's TCP address:
    /// with --spawn the one on its ready line, with --relay the same
    /// HOST:PORT, where a relay listens by default). Not with --broker nats.
    #[arg(long, value_enum, value_name = "TRANSPORT")]
    pub transport: Option<TransportArg>,
    /// Seconds a cell may take to reach the relay (QUIC or TCP and TLS
    /// handshake, then Hello/Welcome) before the run fails.
    #[arg(long, value_name = "SECS", default_value_t = 10.0, value_parser = parse_pos_secs)]
    pub connect_timeout: f64,
    /// Worker threads of relay-bench's async runtime (default: one per
    /// CPU).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    pub threads: Option<u16>,
}

/// The server a run measures.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Broker {
    /// The Celluler relay (`--relay` or `--spawn`).
    Relay,
    /// nats-server (`--nats-addr` or `--spawn`), through async-nats.
    Nats,
}

/// How cells reach the relay (`--transport`).
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransportArg {
    /// QUIC over UDP.
    Quic,
    /// TLS 1.3 over TCP.
    Tcp,
}

impl From<TransportArg> for relay_client::Transport {
    fn from(t: TransportArg) -> Self {
        match t {
            TransportArg::Quic => relay_client::Transport::Quic,
            TransportArg::Tcp => relay_client::Transport::Tcp,
        }
    }
}

/// How spawned relays are peered.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Topology {
    /// r1 - r2 - ... - rN.
    Line,
    /// A line whose ends are linked.
    Ring,
    /// A grid of ceil(sqrt N) columns, each relay linked to its right and
    /// lower neighbours.
    Square,
}

impl Topology {
    /// Its name in reports, as on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Topology::Line => "line",
            Topology::Ring => "ring",
            Topology::Square => "square",
        }
    }
}

/// How messages are authenticated.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Auth {
    /// No signature: the relay proved the sender's key when it attached.
    Link,
    /// An ed25519 signature per message, verified by every receiver (about
    /// 25 us each way).
    Signed,
    /// End-to-end sealed payloads (not available yet).
    Sealed,
}

/// What senders and receivers are built from.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientArg {
    /// relay_client::Cell.
    Cell,
    /// Bare links: senders encode into batch frames, receivers decode them in place.
    Raw,
}

/// What fills payloads.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PayloadArg {
    /// Incompressible bytes (distinct per message), what bench/compare.sh
    /// uses.
    Random,
    /// JSON-like telemetry records: compressible.
    Text,
}

/// Knobs every message mode shares.
#[derive(Args, Debug, Clone)]
pub struct MsgArgs {
    /// Payload bytes per message (at least 16: the first 16 carry the
    /// actual and intended send times).
    #[arg(long, value_name = "B", default_value_t = 128, value_parser = parse_size)]
    pub size: usize,
    /// Payload filler after the timestamps.
    #[arg(long, value_enum, default_value_t = PayloadArg::Random)]
    pub payload: PayloadArg,
    /// Lane to send on: control, high, normal or bulk.
    #[arg(long, value_name = "LANE", default_value = "normal", value_parser = parse_lane)]
    pub lane: Lane,
    /// How messages are authenticated.
    #[arg(long, value_enum, default_value_t = Auth::Link)]
    pub auth: Auth,
    /// Seconds of sending before measuring; messages sent during it are
    /// left out of the bench's figures (counts, rate, latency, CPU, peak
    /// memory; the server's own counters cover the whole run) (default: 1
    /// for runs bounded by --duration, 0 for runs bounded by --count).
    #[arg(long, value_name = "SECS", value_parser = parse_secs)]
    pub warmup: Option<f64>,
    /// Seconds without any delivery, once sending is over, before the
    /// missing messages count as lost.
    #[arg(long, value_name = "SECS", default_value_t = 3.0, value_parser = parse_secs)]
    pub grace: f64,
    /// What the senders and receivers are: `cell` (the client's Cell:
    /// end-to-end checks, dedup, a queue between the application and the
    /// link, what applications get) or `raw` (bare links, as a load
    /// generator speaking a broker's protocol without its client library
    /// would be: senders encode
    /// each message straight into the open batch frame, receivers decode
    /// batches in place), to measure the relay with lighter clients.
    #[arg(long, value_enum, default_value_t = ClientArg::Cell)]
    pub client: ClientArg,
    /// Write the results as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write the HDR percentile distribution of one-way latency (µs) to
    /// FILE in the .hgrm text format; latency mode also writes the
    /// corrected one to FILE with `.corrected` before the extension.
    #[arg(long, value_name = "FILE")]
    pub hgrm: Option<PathBuf>,
    /// Plot the latency percentile distribution to FILE (SVG).
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
}

/// `throughput` arguments.
#[derive(Args, Debug, Clone)]
pub struct ThroughputArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    #[command(flatten)]
    pub msg: MsgArgs,
    /// Sending cells.
    #[arg(long, short = 'p', value_name = "P", default_value_t = 1, value_parser = parse_count_usize)]
    pub senders: usize,
    /// Receiving cells.
    #[arg(long, short = 's', value_name = "S", default_value_t = 1, value_parser = parse_count_usize)]
    pub receivers: usize,
    /// Messages to send in all, split across the senders (default
    /// 1000000 unless --duration is given).
    #[arg(long, short = 'n', value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub count: Option<u64>,
    /// Stop sending after this many seconds (after the warm-up), even if
    /// --count is not reached.
    #[arg(long, short = 'd', value_name = "SECS", value_parser = parse_pos_secs)]
    pub duration: Option<f64>,
    /// Closed loop: each sender keeps at most N of its messages in flight
    /// (sent, not yet received), looking every min(N, 64) messages;
    /// senders that share a receiver (more senders than receivers) share
    /// their windows, N per sender. Without it senders run open loop and a
    /// server that cannot keep up drops (counted as lost).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub window: Option<u64>,
}

/// `latency` arguments.
#[derive(Args, Debug, Clone)]
pub struct LatencyArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    #[command(flatten)]
    pub msg: MsgArgs,
    /// Messages per second, paced by a thread that sends what is due each
    /// tick.
    #[arg(long, short = 'r', value_name = "R", default_value_t = 10_000.0, value_parser = parse_rate)]
    pub rate: f64,
    /// Seconds to measure (after the warm-up).
    #[arg(long, short = 'd', value_name = "SECS", default_value_t = 10.0, value_parser = parse_pos_secs)]
    pub duration: f64,
    /// Pacing tick in microseconds (the pacer sleeps this long between
    /// sends of what is due).
    #[arg(long, value_name = "US", default_value_t = 100)]
    pub tick_us: u64,
}

/// Where fanout messages go.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum FanoutTarget {
    /// To every cell attached to the relay (other cells on a shared relay
    /// get them too).
    Broadcast,
    /// To every cell that announced this run's service.
    Service,
}

/// `fanout` arguments.
#[derive(Args, Debug, Clone)]
pub struct FanoutArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    #[command(flatten)]
    pub msg: MsgArgs,
    /// How the sender addresses the receivers.
    #[arg(long = "target", value_enum, default_value_t = FanoutTarget::Broadcast)]
    pub to: FanoutTarget,
    /// Receiving cells (K).
    #[arg(long, short = 'k', value_name = "K", default_value_t = 4, value_parser = parse_count_usize)]
    pub receivers: usize,
    /// Messages to send (default 100000 unless --duration is given); each
    /// is delivered K times.
    #[arg(long, short = 'n', value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub count: Option<u64>,
    /// Stop sending after this many seconds (after the warm-up).
    #[arg(long, short = 'd', value_name = "SECS", value_parser = parse_pos_secs)]
    pub duration: Option<f64>,
    /// Closed loop: the sender keeps at most N messages in flight, a
    /// message being in flight until every receiver has it (looking every
    /// min(N, 64) messages).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub window: Option<u64>,
}

/// `connections` arguments.
#[derive(Args, Debug, Clone)]
pub struct ConnectionsArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Idle cells to attach.
    #[arg(long, value_name = "K", default_value_t = 1000, value_parser = parse_count_usize)]
    pub cells: usize,
    /// Handshakes in flight at once.
    #[arg(long, value_name = "N", default_value_t = 64, value_parser = parse_count_usize)]
    pub concurrency: usize,
    /// Client UDP sockets to spread the connections over (one carries any
    /// number; more than ~64 raises the open-file limit to its maximum).
    /// QUIC only: over TCP each cell has a connection of its own.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = parse_count_usize)]
    pub endpoints: usize,
    /// Seconds to hold the attached cells before measuring the relay's
    /// memory (its idle CPU is measured over this span).
    #[arg(long, value_name = "SECS", default_value_t = 1.0, value_parser = parse_secs)]
    pub hold: f64,
    /// Stop attaching early if the relay's growth so far projects past
    /// this fraction of the machine's available memory (0: never).
    #[arg(long, value_name = "FRACTION", default_value_t = 0.5, value_parser = parse_fraction)]
    pub memory_guard: f64,
    /// Write the results as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

fn parse_node_addr(s: &str) -> Result<NodeAddr, String> {
    s.parse::<NodeAddr>().map_err(|e| {
        format!(
            "{e}; expected KEY@HOST:PORT, e.g. the `key=` and `quic=` of the relay's \
             `relay ready:` line joined by @"
        )
    })
}

fn parse_size(s: &str) -> Result<usize, String> {
    let n: usize = s
        .parse()
        .map_err(|_| format!("{s:?} is not a byte count"))?;
    if n < MIN_SIZE {
        return Err(format!(
            "a payload must be at least {MIN_SIZE} bytes: its first 16 bytes carry the actual \
             and intended send times"
        ));
    }
    Ok(n)
}

fn parse_lane(s: &str) -> Result<Lane, String> {
    s.parse()
}

fn parse_secs(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !v.is_finite() || v < 0.0 {
        return Err("seconds must be 0 or more".into());
    }
    Ok(v)
}

fn parse_pos_secs(s: &str) -> Result<f64, String> {
    let v = parse_secs(s)?;
    if v == 0.0 {
        return Err("seconds must be more than 0".into());
    }
    Ok(v)
}

fn parse_rate(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("{s:?} is not a rate"))?;
    if !v.is_finite() || v <= 0.0 || v > 100e6 {
        return Err("the rate must be more than 0 and at most 100000000 msg/s".into());
    }
    Ok(v)
}

fn parse_count_usize(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("{s:?} is not a whole number of at least 1")),
    }
}

fn parse_fraction(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if !(0.0..=1.0).contains(&v) {
        return Err("a fraction between 0 and 1".into());
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_the_compare_shapes() {
        let c = Cli::try_parse_from([
            "relay-bench",
            "throughput",
            "--spawn",
            "--senders",
            "4",
            "--receivers",
            "4",
            "--size",
            "128",
            "--count",
            "2000000",
            "--duration",
            "10",
            "--payload",
            "random",
            "--json",
            "x.json",
        ])
        .unwrap();
        let Cmd::Throughput(t) = c.cmd else { panic!() };
        assert_eq!(
            (t.senders, t.receivers, t.count, t.duration),
            (4, 4, Some(2_000_000), Some(10.0))
        );
        let c = Cli::try_parse_from([
            "relay-bench",
            "latency",
            "--spawn",
            "--rate",
            "50000",
            "--size",
            "128",
            "--duration",
            "10",
            "--payload",
            "random",
            "--json",
            "x.json",
        ])
        .unwrap();
        assert!(matches!(c.cmd, Cmd::Latency(_)));
        let c = Cli::try_parse_from([
            "relay-bench",
            "throughput",
            "--broker",
            "nats",
            "--nats-addr",
            "127.0.0.1:4222",
            "--senders",
            "4",
        ])
        .unwrap();
        let Cmd::Throughput(t) = c.cmd else { panic!() };
        assert_eq!(t.target.broker, Broker::Nats);
        assert_eq!(t.target.nats_addr.as_deref(), Some("127.0.0.1:4222"));
        assert_eq!(
            t.target.nats_sub_capacity,
            crate::nats::DEFAULT_SUB_CAPACITY
        );
    }

    #[test]
    fn bad_arguments_are_refused() {
        for args in [
            &["relay-bench", "throughput", "--spawn", "--size", "4"][..],
            &["relay-bench", "throughput", "--relay", "nonsense"],
            &["relay-bench", "throughput"],
            &["relay-bench", "throughput", "--spawn", "--lane", "fast"],
            &["relay-bench", "latency", "--spawn", "--rate", "0"],
            &["relay-bench", "latency", "--nats-pid", "1", "--spawn"],
            &["relay-bench", "latency", "--relay-pid", "1", "--spawn"],
            &["relay-bench", "latency", "--spawn", "--broker", "kafka"],
        ] {
            assert!(Cli::try_parse_from(args).is_err(), "{args:?}");
        }
    }
}
