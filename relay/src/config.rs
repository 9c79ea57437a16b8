//! Relay configuration: one TOML file, five sections (`[node]`, `[limits]`,
//! `[security]`, `[link]`, `[mesh]`).
//!
//! Every setting has a default, and the commented example
//! `config/relay.toml` holds exactly those defaults (it is embedded as
//! [`EMBEDDED_DEFAULT`], and a test keeps the two equal). A file only needs
//! the settings it changes. Unknown keys are refused, a wrong type or an
//! impossible value is reported with the dotted field name and the line.
//!
//! ```
//! use relay::config::{ConfigError, RelayConfig};
//!
//! let cfg = RelayConfig::from_toml_str("[limits]\nmax_payload = 2048\n", None).unwrap();
//! assert_eq!(cfg.limits.max_payload, 2048);
//! assert_eq!(cfg.node, RelayConfig::default().node);
//!
//! let err = RelayConfig::from_toml_str("[link]\nlane_weights = [8, 4, 0, 1]\n", None).unwrap_err();
//! assert!(matches!(err, ConfigError::Invalid { field: "link.lane_weights", line: Some(2), .. }));
//! ```

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, ToSocketAddrs};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use relay_codec::{Limits, PublicKey};
use relay_core::{FreshnessWindow, Verify};
use serde::{Deserialize, Deserializer, Serialize};
use toml::de::{DeTable, DeValue};

/// The commented example configuration (`config/relay.toml`), which sets
/// every setting to its default. Parsing it gives [`RelayConfig::default`].
pub const EMBEDDED_DEFAULT: &str = include_str!("../../config/relay.toml");

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;

/// Bytes a frame needs beyond its largest payload (headers, signature).
pub const FRAME_OVERHEAD: usize = 4096;

/// The whole relay configuration. Missing sections and keys take their
/// defaults; unknown ones are refused.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelayConfig {
    /// `[node]`: addresses, data directory, threads.
    pub node: NodeConfig,
    /// `[limits]`: sizes and counts that bound memory.
    pub limits: LimitsConfig,
    /// `[security]`: signature checks, timestamp and replay windows.
    pub security: SecurityConfig,
    /// `[link]`: QUIC transport, batching, compression, lane scheduling.
    pub link: LinkConfig,
    /// `[mesh]`: peer relays, which relays are trusted, how many links.
    pub mesh: MeshSection,
    /// `[storage]`: the durable log (DATA_DIR/log) and durable delivery.
    pub storage: StorageConfig,
}

/// Which writer the durable log runs (`storage.backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StorageBackend {
    /// io_uring where the kernel allows it, the portable writer otherwise.
    Auto,
    /// io_uring, or the relay does not start.
    IoUring,
    /// Plain `pwrite` + `fdatasync` on a writer thread.
    Portable,
}

/// `[storage]`: the durable log and durable delivery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Bound on the log's segment files on disk, bytes,
    /// `2 × segment_bytes..=2^50`; past it new durable messages are
    /// refused. Default 1 GiB.
    pub max_bytes: u64,
    /// Size of each preallocated segment file, bytes, `4 KiB..=4 GiB`.
    /// Default 64 MiB.
    pub segment_bytes: u64,
    /// The log's writer. Default [`StorageBackend::Auto`].
    pub backend: StorageBackend,
    /// How long a durable message waits for its destination, ms,
    /// `1_000..=31_536_000_000` (a year). Default 86 400 000 (a day).
    pub ttl_ms: u64,
    /// First retry of an unacknowledged delivery, ms, `10..=3_600_000`.
    /// Default 1 000.
    pub retry_initial_ms: u64,
    /// Longest wait between retries, ms, `retry_initial_ms..=3_600_000`.
    /// Default 60 000.
    pub retry_max_ms: u64,
    /// How often acknowledged segments are looked for and removed, ms,
    /// `100..=3_600_000`. Default 1 000.
    pub compact_interval_ms: u64,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            max_bytes: 1 << 30,
            segment_bytes: 64 << 20,
            backend: StorageBackend::Auto,
            ttl_ms: 86_400_000,
            retry_initial_ms: 1_000,
            retry_max_ms: 60_000,
            compact_interval_ms: 1_000,
        }
    }
}

impl StorageConfig {
    /// The durable settings of the relay's node.
    #[must_use]
    pub fn durable_config(&self) -> relay_core::DurableConfig {
        relay_core::DurableConfig {
            ttl_ms: self.ttl_ms,
            retry_initial_ms: self.retry_initial_ms,
            retry_max_ms: self.retry_max_ms,
            ..relay_core::DurableConfig::default()
        }
    }
}

/// `[node]`: where the relay listens and keeps its files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// UDP address of the QUIC listener. Default `127.0.0.1:4433`. In a
    /// file, a host name is resolved when the file is read (see
    /// [`resolve_socket_addr`]).
    #[serde(deserialize_with = "socket_addr")]
    pub listen: SocketAddr,
    /// Where the TLS-over-TCP listener binds, beside QUIC. Default
    /// [`ListenTcp::Same`]: the host and port of `listen`.
    pub listen_tcp: ListenTcp,
    /// TCP address of the HTTP admin endpoint. Default `127.0.0.1:9433`.
    /// A host name is resolved as for `listen`.
    #[serde(deserialize_with = "socket_addr")]
    pub admin: SocketAddr,
    /// Directory for the node key and the durable log; must not be empty.
    /// Default `relay-data`.
    pub data_dir: PathBuf,
    /// Async runtime worker threads, `1..=256`. Default 2.
    pub worker_threads: usize,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 4433)),
            listen_tcp: ListenTcp::Same,
            admin: SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9433)),
            data_dir: PathBuf::from("relay-data"),
            worker_threads: 2,
        }
    }
}

/// Where a relay listens for links over TLS on TCP (`node.listen_tcp`,
/// `relay --listen-tcp`): written `"same"`, `"off"` or `HOST:PORT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ListenTcp {
    /// The host and port of `node.listen` (QUIC on UDP, TLS on TCP, one
    /// address for cells). With port 0 the TCP port is the one QUIC got.
    #[default]
    Same,
    /// No TCP listener: QUIC only.
    Off,
    /// This address (`HOST:PORT`, as `node.listen` takes it).
    At(SocketAddr),
}

impl ListenTcp {
    /// Parses `same`, `off` or `HOST:PORT` ([`resolve_socket_addr`]).
    ///
    /// # Errors
    /// What is wrong, in words for the operator.
    ///
    /// ```
    /// use relay::config::ListenTcp;
    ///
    /// assert_eq!(ListenTcp::parse("off"), Ok(ListenTcp::Off));
    /// assert_eq!(ListenTcp::parse("same"), Ok(ListenTcp::Same));
    /// assert_eq!(ListenTcp::parse("127.0.0.1:4434"), Ok(ListenTcp::At("127.0.0.1:4434".parse().unwrap())));
    /// assert!(ListenTcp::parse("tcp").unwrap_err().contains("\"off\""));
    /// ```
    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "same" => Ok(ListenTcp::Same),
            "off" => Ok(ListenTcp::Off),
            addr => resolve_socket_addr(addr).map(ListenTcp::At).map_err(|e| {
                format!("{e}; or \"same\" (the address of node.listen) or \"off\" (no TCP)")
            }),
        }
    }
}

impl std::fmt::Display for ListenTcp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenTcp::Same => f.write_str("same"),
            ListenTcp::Off => f.write_str("off"),
            ListenTcp::At(a) => write!(f, "{a}"),
        }
    }
}

impl Serialize for ListenTcp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ListenTcp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        ListenTcp::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// Parses `HOST:PORT` into the address to bind: HOST is an IPv4 address, an
/// IPv6 address in brackets or a host name, resolved as a cell resolves a
/// relay's host (the system resolver; the first address it gives). PORT is
/// `0..=65535`, 0 meaning a free port.
///
/// # Errors
/// What is wrong, in words for the operator: no port, a port out of range,
/// a bare IPv6 address, or a name that does not resolve.
///
/// ```
/// use relay::config::resolve_socket_addr;
///
/// assert_eq!(resolve_socket_addr("[::1]:0").unwrap(), "[::1]:0".parse().unwrap());
/// assert!(resolve_socket_addr("localhost:4433").unwrap().ip().is_loopback());
/// let err = resolve_socket_addr("127.0.0.1:99999").unwrap_err();
/// assert_eq!(err, "port 99999 is out of range (0-65535)");
/// ```
pub fn resolve_socket_addr(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    let (host, port) = match text.strip_prefix('[') {
        Some(rest) => rest.split_once("]:"),
        None => text.rsplit_once(':'),
    }
    .ok_or_else(|| format!("{text:?} is not HOST:PORT (e.g. 127.0.0.1:4433)"))?;
    if host.is_empty() {
        return Err(format!("{text:?} has no host (e.g. 127.0.0.1:{port})"));
    }
    if host.contains(':') && !text.starts_with('[') {
        return Err(format!(
            "{text:?}: put an IPv6 address in brackets, e.g. [::1]:4433"
        ));
    }
    let port = match port.parse::<u64>() {
        Ok(p) => u16::try_from(p).map_err(|_| format!("port {p} is out of range (0-65535)"))?,
        Err(_) => return Err(format!("port {port:?} is not a number (0-65535)")),
    };
    (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve host {host:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("host {host:?} resolves to no address"))
}

/// Deserializes a [`SocketAddr`] from `HOST:PORT` text with
/// [`resolve_socket_addr`], so a config file takes what the flags take.
fn socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let text = String::deserialize(d)?;
    resolve_socket_addr(&text).map_err(serde::de::Error::custom)
}

/// `[limits]`: bounds on sizes and counts, in bytes or items.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest message payload in bytes, `1..=16 MiB`. Default 1 MiB.
    pub max_payload: usize,
    /// Largest frame in bytes, `max_payload + 4096 ..= 64 MiB`. Default 4 MiB.
    pub max_frame: usize,
    /// Most messages in one batch frame, `1..=65535`. Default 4096.
    pub max_batch_messages: usize,
    /// Most simultaneous links (cells and relays), `>= 1`. Default 16384.
    pub max_links: usize,
    /// Most services one cell may announce, `1..=255` (a `u8` on the wire).
    /// Default 16.
    pub max_services_per_cell: usize,
    /// Messages per lane per outbound link, `16..=1_048_576`. Default 8192.
    pub lane_queue_depth: usize,
    /// Longest a TLS handshake over TCP may take from the accept on, ms,
    /// `1..=600_000`, so sockets that never finish one cannot pile up.
    /// Default 10 000.
    pub handshake_timeout_ms: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_payload: MIB,
            max_frame: 4 * MIB,
            max_batch_messages: 4096,
            max_links: 16384,
            max_services_per_cell: 16,
            lane_queue_depth: 8192,
            handshake_timeout_ms: 10_000,
        }
    }
}

impl LimitsConfig {
    /// The decoder bounds these limits give a link (see [`relay_codec::Limits`]).
    #[must_use]
    pub fn codec_limits(&self) -> Limits {
        Limits {
            max_payload: self.max_payload,
            max_frame: self.max_frame,
            max_batch_messages: self.max_batch_messages,
            max_services: self.max_services_per_cell,
        }
    }

    /// [`Self::handshake_timeout_ms`] as a [`Duration`].
    #[must_use]
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms)
    }
}

/// How many ingress messages from cells get their signature checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VerifyMode {
    /// No checks at the relay (receivers verify end to end). The default.
    #[default]
    Off,
    /// A random `security.sample_rate` fraction is checked.
    Sampled,
    /// Every message is checked.
    All,
}

/// `[security]`: signature checks and the replay windows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecurityConfig {
    /// Which ingress messages are verified. Default [`VerifyMode::Off`].
    pub verify: VerifyMode,
    /// Fraction verified in [`VerifyMode::Sampled`], `0 < x <= 1.0`
    /// (checked whatever the mode). Default 0.01.
    pub sample_rate: f64,
    /// Oldest timestamp accepted, ms before now, `1_000..=86_400_000`.
    /// Default 300 000.
    pub timestamp_past_ms: u64,
    /// Furthest timestamp accepted, ms after now, `0..=3_600_000`.
    /// Default 30 000.
    pub timestamp_future_ms: u64,
    /// How long a message id is remembered, ms, `>= timestamp_past_ms` (so a
    /// replay older than the window fails the timestamp check). Default 300 000.
    pub dedup_window_ms: u64,
    /// Ids the dedup window holds, `1_024..=100_000_000`; the last half of
    /// them are always remembered. Default 1 000 000.
    pub dedup_capacity: usize,
}

impl Default for SecurityConfig {
    fn default() -> Self {
        Self {
            verify: VerifyMode::Off,
            sample_rate: 0.01,
            timestamp_past_ms: 300_000,
            timestamp_future_ms: 30_000,
            dedup_window_ms: 300_000,
            dedup_capacity: 1_000_000,
        }
    }
}

impl SecurityConfig {
    /// [`Self::timestamp_past_ms`] as a [`Duration`].
    #[must_use]
    pub fn timestamp_past(&self) -> Duration {
        Duration::from_millis(self.timestamp_past_ms)
    }

    /// [`Self::timestamp_future_ms`] as a [`Duration`].
    #[must_use]
    pub fn timestamp_future(&self) -> Duration {
        Duration::from_millis(self.timestamp_future_ms)
    }

    /// [`Self::dedup_window_ms`] as a [`Duration`].
    #[must_use]
    pub fn dedup_window(&self) -> Duration {
        Duration::from_millis(self.dedup_window_ms)
    }
}

/// `[link]`: the QUIC transport, batching, compression and lane weights.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LinkConfig {
    /// Keep-alive interval on an idle link, ms, `>= 1`. Default 5 000.
    pub keep_alive_ms: u64,
    /// Idle link timeout, ms, `keep_alive_ms < x <= 86_400_000`. Default 30 000.
    pub idle_timeout_ms: u64,
    /// QUIC receive window per stream, bytes, `1 KiB..=1 GiB`. Default 8 MiB.
    pub stream_window: u64,
    /// QUIC receive window per connection, bytes, `stream_window..=4 GiB`.
    /// Default 16 MiB.
    pub conn_window: u64,
    /// Target bytes per batch frame, `1 KiB..=limits.max_frame`. Default 64 KiB.
    pub batch_bytes: usize,
    /// Batches at least this large are zstd-compressed; any value (0
    /// compresses every batch). Default 1024.
    pub compress_min_bytes: usize,
    /// zstd level, `1..=19`. Default 1. At 1..=3 the batch encoder adapts:
    /// see [`relay_codec::BatchEncoder`].
    pub zstd_level: i32,
    /// Writer share of lanes `[control, high, normal, bulk]`, each `1..=1024`.
    /// Default `[8, 4, 2, 1]`.
    pub lane_weights: [u32; 4],
    /// Drain time on shutdown, ms, `0..=600_000`. Default 3 000.
    pub shutdown_grace_ms: u64,
    /// Longest pause, ms, `0..=1_000`, in reading a sender's lane after a
    /// batch left a cell-addressed receiver's lane queue over half full:
    /// the sender is slowed to its receiver's pace before anything is
    /// dropped. A receiver that has taken nothing for a second is not
    /// waited for until it does; broadcast and service receivers never
    /// are. 0 never pauses. Default 20.
    pub max_stall_ms: u64,
    /// Shortest time between two notices for one reason and destination
    /// on a sender's link, ms, `1..=60_000`: drops are summed meanwhile
    /// (docs/PROTOCOL.md 4.11). Default 100.
    pub notice_interval_ms: u64,
}

impl Default for LinkConfig {
    fn default() -> Self {
        Self {
            keep_alive_ms: 5_000,
            idle_timeout_ms: 30_000,
            stream_window: 8 << 20,
            conn_window: 16 << 20,
            batch_bytes: 64 * KIB,
            compress_min_bytes: 1024,
            zstd_level: 1,
            lane_weights: [8, 4, 2, 1],
            shutdown_grace_ms: 3_000,
            max_stall_ms: 20,
            notice_interval_ms: 100,
        }
    }
}

impl LinkConfig {
    /// [`Self::keep_alive_ms`] as a [`Duration`].
    #[must_use]
    pub fn keep_alive(&self) -> Duration {
        Duration::from_millis(self.keep_alive_ms)
    }

    /// [`Self::idle_timeout_ms`] as a [`Duration`].
    #[must_use]
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }

    /// [`Self::shutdown_grace_ms`] as a [`Duration`].
    #[must_use]
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }

    /// [`Self::max_stall_ms`] as a [`Duration`].
    #[must_use]
    pub fn max_stall(&self) -> Duration {
        Duration::from_millis(self.max_stall_ms)
    }
}

/// `[mesh]`: relay peering (docs/PROTOCOL.md section 10).
///
/// Peering is on as soon as one relay is trusted: a configured peer (its
/// key is trusted, as this relay dials it) or a key in `trusted_relays`.
/// With neither (the default) every relay-role link is refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MeshSection {
    /// Relays this relay dials and redials forever (exponential backoff
    /// with jitter), each [`PeerAddr`] text: `KEY@HOST:PORT` over QUIC,
    /// `tcp://KEY@HOST:PORT` over TLS on TCP. At most `max_peers`, no key
    /// twice, not this relay's own key. Default none.
    pub peers: Vec<PeerAddr>,
    /// More relay keys whose links are accepted, beside the peers' (which
    /// are always trusted). Each is dialed too once the mesh announces
    /// its address (its LinkState), while the configured peers and those
    /// dialed leave room under `max_peers`. Default none: only the
    /// configured peers.
    #[serde(with = "keys")]
    pub trusted_relays: Vec<PublicKey>,
    /// Most relay links up at once, `1..=1024`; one more is refused
    /// (`TooManyLinks`). Default 16.
    pub max_peers: usize,
    /// Where other relays may dial this one (`HOST:PORT`, at most 255
    /// bytes), announced to the mesh in its LinkState. Default empty: the
    /// QUIC listener's address, unless it is a wildcard (`0.0.0.0`, `::`),
    /// which no relay can dial: then nothing is announced (the relay still
    /// dials and accepts its peers) and the start log says to set this.
    pub advertise: String,
}

impl Default for MeshSection {
    fn default() -> Self {
        Self {
            peers: Vec::new(),
            trusted_relays: Vec::new(),
            max_peers: 16,
            advertise: String::new(),
        }
    }
}

impl MeshSection {
    /// The relay keys trusted: the peers' and `trusted_relays`.
    #[must_use]
    pub fn trusted(&self) -> std::collections::BTreeSet<PublicKey> {
        self.peers
            .iter()
            .map(|p| p.addr.key)
            .chain(self.trusted_relays.iter().copied())
            .collect()
    }

    /// What the relay's node runs its mesh with; `addr` is the address it
    /// announces to other relays (its QUIC listener).
    #[must_use]
    pub fn mesh_config(&self, addr: String) -> relay_core::MeshConfig {
        relay_core::MeshConfig {
            trusted_relays: self.trusted(),
            max_peers: self.max_peers,
            addr,
            ..relay_core::MeshConfig::new()
        }
    }
}

/// One peer relay to dial (`mesh.peers`, `relay --peer`): `KEY@HOST:PORT`
/// over QUIC (also written `quic://KEY@HOST:PORT`), or
/// `tcp://KEY@HOST:PORT` over TLS on TCP. HOST is resolved at each dial.
///
/// ```
/// use relay::config::PeerAddr;
///
/// let key = "a".repeat(52);
/// let p: PeerAddr = format!("tcp://{key}@127.0.0.1:4433").parse().unwrap();
/// assert_eq!(p.transport, relay_link::Transport::Tcp);
/// assert_eq!(p.to_string(), format!("tcp://{key}@127.0.0.1:4433"));
/// assert!("udp://x@h:1".parse::<PeerAddr>().unwrap_err().contains("tcp://"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerAddr {
    /// The peer's key and where it listens.
    pub addr: relay_codec::NodeAddr,
    /// How to reach it.
    pub transport: relay_link::Transport,
}

impl std::str::FromStr for PeerAddr {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let (transport, rest) = match text.split_once("://") {
            None => (relay_link::Transport::Quic, text),
            Some(("quic", rest)) => (relay_link::Transport::Quic, rest),
            Some(("tcp", rest)) => (relay_link::Transport::Tcp, rest),
            Some((other, _)) => {
                return Err(format!(
                    "{text:?}: unknown transport {other:?}; write KEY@HOST:PORT (QUIC) or \
                     tcp://KEY@HOST:PORT"
                ));
            }
        };
        let addr = rest.parse().map_err(|e| {
            format!(
                "{text:?} is not a peer: {e}; write KEY@HOST:PORT (QUIC) or tcp://KEY@HOST:PORT"
            )
        })?;
        Ok(Self { addr, transport })
    }
}

impl std::fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.transport {
            relay_link::Transport::Quic => write!(f, "{}", self.addr),
            relay_link::Transport::Tcp => write!(f, "tcp://{}", self.addr),
        }
    }
}

impl Serialize for PeerAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PeerAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Relay keys as text in a config file.
mod keys {
    use relay_codec::PublicKey;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(keys: &[PublicKey], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(keys.iter().map(ToString::to_string))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<PublicKey>, D::Error> {
        Vec::<String>::deserialize(d)?
            .iter()
            .map(|k| {
                k.parse()
                    .map_err(|e| serde::de::Error::custom(format!("relay key {k:?}: {e}")))
            })
            .collect()
    }
}

/// Why a configuration could not be loaded. Each message names the file
/// (when there is one) and its cause once; none has a `source()`.
#[derive(thiserror::Error, Debug)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {}: {error}{}", path.display(), read_hint(error))]
    Io {
        /// The file that was asked for.
        path: PathBuf,
        /// What the OS said.
        error: std::io::Error,
    },
    /// The text is not valid TOML, or a key is unknown or of the wrong type.
    #[error("{}:{line}:{column}: {message}", show_path(path.as_deref()))]
    Parse {
        /// The file, if the text came from one.
        path: Option<PathBuf>,
        /// 1-based line of the error.
        line: usize,
        /// 1-based column (in characters) of the error.
        column: usize,
        /// What is wrong, starting with the dotted key when one is known.
        message: String,
    },
    /// A value is out of its bounds or contradicts another setting.
    #[error("{}invalid `{field}`: {reason}", show_place(path.as_deref(), *line))]
    Invalid {
        /// Dotted name of the setting, e.g. `limits.max_frame`.
        field: &'static str,
        /// The file, if the setting came from one.
        path: Option<PathBuf>,
        /// 1-based line of the setting, when it was set in the source text.
        line: Option<usize>,
        /// What the bound is and what was given.
        reason: String,
    },
}

fn show_path(path: Option<&Path>) -> String {
    path.map_or_else(|| "<config>".to_owned(), |p| p.display().to_string())
}

/// `FILE:LINE: ` in front of an invalid setting, as a parse error starts;
/// nothing for a setting that came from no file (a flag).
fn show_place(path: Option<&Path>, line: Option<usize>) -> String {
    match (path, line) {
        (path, Some(l)) => format!("{}:{l}: ", show_path(path)),
        (Some(p), None) => format!("{}: ", p.display()),
        (None, None) => String::new(),
    }
}

/// What to do about a config file that cannot be read.
fn read_hint(error: &std::io::Error) -> &'static str {
    match error.kind() {
        std::io::ErrorKind::NotFound => {
            "; check the path (config/relay.toml in the source tree has every setting with its default)"
        }
        _ => "",
    }
}

/// One broken rule: the field blamed, another field it depends on (used for
/// the line when the blamed field is not in the file), and why.
struct Violation {
    field: &'static str,
    related: Option<&'static str>,
    reason: String,
}

impl Violation {
    fn new(field: &'static str, related: Option<&'static str>, reason: String) -> Self {
        Self {
            field,
            related,
            reason,
        }
    }
}

impl RelayConfig {
    /// What the relay's pure node ([`relay_core::Node`]) runs with, for the
    /// relay `key`: the limits, replay windows, signature policy, notice
    /// interval and stall bound of this configuration.
    #[must_use]
    pub fn node_config(&self, key: PublicKey) -> relay_core::NodeConfig {
        let s = &self.security;
        relay_core::NodeConfig {
            key,
            limits: self.limits.codec_limits(),
            max_links: self.limits.max_links,
            freshness: FreshnessWindow::new(s.timestamp_past_ms, s.timestamp_future_ms),
            dedup_window_ms: s.dedup_window_ms,
            dedup_capacity: s.dedup_capacity,
            verify: match s.verify {
                VerifyMode::Off => Verify::Off,
                VerifyMode::Sampled => Verify::Sampled {
                    rate: s.sample_rate,
                },
                VerifyMode::All => Verify::All,
            },
            notice_interval_ms: self.link.notice_interval_ms,
            max_stall_ms: self.link.max_stall_ms,
            durable: self.storage.durable_config(),
        }
    }

    /// Parses TOML text and validates it. `path` only labels errors. The
    /// first broken rule is returned, with its line when the text sets it.
    ///
    /// # Errors
    /// [`ConfigError::Parse`] for bad TOML, an unknown key or a wrong type;
    /// [`ConfigError::Invalid`] for a value out of its bounds.
    pub fn from_toml_str(src: &str, path: Option<&Path>) -> Result<Self, ConfigError> {
        let cfg: Self = toml::from_str(src).map_err(|e| parse_error(src, path, &e))?;
        if let Some(v) = cfg.violations().into_iter().next() {
            let line =
                line_of_key(src, v.field).or_else(|| v.related.and_then(|r| line_of_key(src, r)));
            return Err(ConfigError::Invalid {
                field: v.field,
                path: path.map(Path::to_owned),
                line,
                reason: v.reason,
            });
        }
        Ok(cfg)
    }

    /// Reads, parses and validates the file at `path`.
    ///
    /// # Errors
    /// [`ConfigError::Io`] if the file cannot be read, otherwise as
    /// [`Self::from_toml_str`], labelled with `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let src = std::fs::read_to_string(path).map_err(|error| ConfigError::Io {
            path: path.to_owned(),
            error,
        })?;
        Self::from_toml_str(&src, Some(path))
    }

    /// Checks every bound and cross-field rule; on failure returns every
    /// broken rule as [`ConfigError::Invalid`] (without lines), in field order.
    ///
    /// # Errors
    /// Every rule broken, never an empty list.
    pub fn validate(&self) -> Result<(), Vec<ConfigError>> {
        let errors: Vec<ConfigError> = self
            .violations()
            .into_iter()
            .map(|v| ConfigError::Invalid {
                field: v.field,
                path: None,
                line: None,
                reason: v.reason,
            })
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    fn violations(&self) -> Vec<Violation> {
        let mut out = Vec::new();
        self.check_bounds(&mut out);
        self.check_rules(&mut out);
        // Report in the order the fields appear in the file.
        out.sort_by_key(|v| field_order(v.field));
        out
    }

    /// Settings that only need to lie in a fixed range.
    fn check_bounds(&self, out: &mut Vec<Violation>) {
        let mut range = |field, value: u64, lo: u64, hi: u64| {
            if !(lo..=hi).contains(&value) {
                let reason = format!("must be in {lo}..={hi}, got {value}");
                out.push(Violation::new(field, None, reason));
            }
        };
        let size = |v: usize| v as u64;
        let (n, l, s, k) = (&self.node, &self.limits, &self.security, &self.link);
        let st = &self.storage;
        range("storage.segment_bytes", st.segment_bytes, 4096, 4 << 30);
        range(
            "storage.max_bytes",
            st.max_bytes,
            st.segment_bytes.saturating_mul(2),
            1 << 50,
        );
        range("storage.ttl_ms", st.ttl_ms, 1_000, 31_536_000_000);
        range(
            "storage.retry_initial_ms",
            st.retry_initial_ms,
            10,
            3_600_000,
        );
        range(
            "storage.retry_max_ms",
            st.retry_max_ms,
            st.retry_initial_ms,
            3_600_000,
        );
        range(
            "storage.compact_interval_ms",
            st.compact_interval_ms,
            100,
            3_600_000,
        );
        range("node.worker_threads", size(n.worker_threads), 1, 256);
        let payload_cap = size(Limits::MAX_PAYLOAD_CAP);
        range("limits.max_payload", size(l.max_payload), 1, payload_cap);
        let batch_cap = size(Limits::MAX_BATCH_CAP);
        range(
            "limits.max_batch_messages",
            size(l.max_batch_messages),
            1,
            batch_cap,
        );
        range("limits.max_links", size(l.max_links), 1, u64::MAX);
        let services_cap = size(Limits::MAX_SERVICES_CAP);
        range(
            "limits.max_services_per_cell",
            size(l.max_services_per_cell),
            1,
            services_cap,
        );
        range(
            "limits.lane_queue_depth",
            size(l.lane_queue_depth),
            16,
            1 << 20,
        );
        range(
            "limits.handshake_timeout_ms",
            l.handshake_timeout_ms,
            1,
            600_000,
        );
        range(
            "security.timestamp_past_ms",
            s.timestamp_past_ms,
            1_000,
            86_400_000,
        );
        range(
            "security.timestamp_future_ms",
            s.timestamp_future_ms,
            0,
            3_600_000,
        );
        range(
            "security.dedup_capacity",
            size(s.dedup_capacity),
            1_024,
            100_000_000,
        );
        range("link.keep_alive_ms", k.keep_alive_ms, 1, u64::MAX);
        range("link.stream_window", k.stream_window, size(KIB), 1 << 30);
        range("link.shutdown_grace_ms", k.shutdown_grace_ms, 0, 600_000);
        range("link.max_stall_ms", k.max_stall_ms, 0, 1_000);
        range("link.notice_interval_ms", k.notice_interval_ms, 1, 60_000);
    }

    /// Settings whose bounds are not a plain integer range, or depend on
    /// another setting.
    fn check_rules(&self, out: &mut Vec<Violation>) {
        self.check_mesh(out);
        let (n, l, s, k) = (&self.node, &self.limits, &self.security, &self.link);
        if !(1..=19).contains(&k.zstd_level) {
            let reason = format!("must be in 1..=19, got {}", k.zstd_level);
            out.push(Violation::new("link.zstd_level", None, reason));
        }
        if n.data_dir.as_os_str().is_empty() {
            out.push(Violation::new(
                "node.data_dir",
                None,
                "must not be empty".to_owned(),
            ));
        }
        let min_frame = l.max_payload.saturating_add(FRAME_OVERHEAD);
        if l.max_frame < min_frame || l.max_frame > Limits::MAX_FRAME_CAP {
            out.push(Violation::new(
                "limits.max_frame",
                Some("limits.max_payload"),
                format!(
                    "must be in limits.max_payload + {FRAME_OVERHEAD} ({min_frame})..={}, got {}",
                    Limits::MAX_FRAME_CAP,
                    l.max_frame
                ),
            ));
        }
        if !(s.sample_rate > 0.0 && s.sample_rate <= 1.0) {
            out.push(Violation::new(
                "security.sample_rate",
                None,
                format!(
                    "must be greater than 0.0 and at most 1.0, got {}",
                    s.sample_rate
                ),
            ));
        }
        if s.dedup_window_ms < s.timestamp_past_ms {
            out.push(Violation::new(
                "security.dedup_window_ms",
                Some("security.timestamp_past_ms"),
                format!(
                    "must be >= security.timestamp_past_ms ({}), or a replay older than the \
                     dedup window but inside the timestamp window is accepted; got {}",
                    s.timestamp_past_ms, s.dedup_window_ms
                ),
            ));
        }
        if k.idle_timeout_ms <= k.keep_alive_ms || k.idle_timeout_ms > 86_400_000 {
            out.push(Violation::new(
                "link.idle_timeout_ms",
                Some("link.keep_alive_ms"),
                format!(
                    "must be greater than link.keep_alive_ms ({}) and at most 86400000, got {}",
                    k.keep_alive_ms, k.idle_timeout_ms
                ),
            ));
        }
        if k.conn_window < k.stream_window || k.conn_window > 4 << 30 {
            out.push(Violation::new(
                "link.conn_window",
                Some("link.stream_window"),
                format!(
                    "must be in link.stream_window ({})..={}, got {}",
                    k.stream_window,
                    4u64 << 30,
                    k.conn_window
                ),
            ));
        }
        if k.batch_bytes < KIB || k.batch_bytes > l.max_frame {
            out.push(Violation::new(
                "link.batch_bytes",
                Some("limits.max_frame"),
                format!(
                    "must be in {KIB}..=limits.max_frame ({}), got {}",
                    l.max_frame, k.batch_bytes
                ),
            ));
        }
        if k.lane_weights.iter().any(|w| !(1..=1024).contains(w)) {
            out.push(Violation::new(
                "link.lane_weights",
                None,
                format!("each weight must be in 1..=1024, got {:?}", k.lane_weights),
            ));
        }
    }
}

impl RelayConfig {
    /// `[mesh]`'s rules: `max_peers` in range and at least the peers
    /// configured, no peer twice.
    fn check_mesh(&self, out: &mut Vec<Violation>) {
        let m = &self.mesh;
        let cap = relay_codec::mesh::MAX_NEIGHBORS;
        if m.max_peers == 0 || m.max_peers > cap {
            out.push(Violation::new(
                "mesh.max_peers",
                None,
                format!("must be in 1..={cap}, got {}", m.max_peers),
            ));
        } else if m.peers.len() > m.max_peers {
            out.push(Violation::new(
                "mesh.peers",
                Some("mesh.max_peers"),
                format!(
                    "lists {} peers, more than mesh.max_peers ({})",
                    m.peers.len(),
                    m.max_peers
                ),
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        if let Some(p) = m.peers.iter().find(|p| !seen.insert(p.addr.key)) {
            out.push(Violation::new(
                "mesh.peers",
                None,
                format!("lists relay {} twice", p.addr.key),
            ));
        }
        if !m.advertise.is_empty() {
            let any = PublicKey([0; 32]);
            let parsed = format!("{any}@{}", m.advertise).parse::<relay_codec::NodeAddr>();
            let why = match parsed {
                Err(e) => Some(e.to_string()),
                Ok(_) if m.advertise.len() > 255 => Some("longer than 255 bytes".to_owned()),
                Ok(_) => None,
            };
            if let Some(why) = why {
                out.push(Violation::new(
                    "mesh.advertise",
                    None,
                    format!("must be HOST:PORT where other relays reach this one ({why})"),
                ));
            }
        }
    }
}

/// Position of a dotted field in the example file, for a stable error order.
fn field_order(field: &str) -> usize {
    FIELDS
        .iter()
        .position(|f| *f == field)
        .unwrap_or(usize::MAX)
}

/// Every setting, dotted, in file order.
const FIELDS: &[&str] = &[
    "node.listen",
    "node.listen_tcp",
    "node.admin",
    "node.data_dir",
    "node.worker_threads",
    "limits.max_payload",
    "limits.max_frame",
    "limits.max_batch_messages",
    "limits.max_links",
    "limits.max_services_per_cell",
    "limits.lane_queue_depth",
    "limits.handshake_timeout_ms",
    "security.verify",
    "security.sample_rate",
    "security.timestamp_past_ms",
    "security.timestamp_future_ms",
    "security.dedup_window_ms",
    "security.dedup_capacity",
    "link.keep_alive_ms",
    "link.idle_timeout_ms",
    "link.stream_window",
    "link.conn_window",
    "link.batch_bytes",
    "link.compress_min_bytes",
    "link.zstd_level",
    "link.lane_weights",
    "link.shutdown_grace_ms",
    "link.max_stall_ms",
    "link.notice_interval_ms",
    "storage.max_bytes",
    "storage.segment_bytes",
    "storage.backend",
    "storage.ttl_ms",
    "storage.retry_initial_ms",
    "storage.retry_max_ms",
    "storage.compact_interval_ms",
    "mesh.peers",
    "mesh.trusted_relays",
    "mesh.max_peers",
    "mesh.advertise",
];

/// Turns a toml error into [`ConfigError::Parse`], with the line and column
/// of its span and, when the span falls on a key or its value, the dotted
/// key in front of the message.
fn parse_error(src: &str, path: Option<&Path>, err: &toml::de::Error) -> ConfigError {
    let offset = err.span().map_or(src.len(), |s| s.start);
    let (line, column) = line_col(src, offset);
    let message = match DeTable::parse(src)
        .ok()
        .and_then(|t| key_at(t.get_ref(), offset, ""))
    {
        Some(key) => format!("`{key}`: {}", err.message()),
        None => err.message().to_owned(),
    };
    ConfigError::Parse {
        path: path.map(Path::to_owned),
        line,
        column,
        message,
    }
}

/// 1-based line and column (in characters) of a byte offset into `src`.
fn line_col(src: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(src.len());
    while !src.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &src[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

fn covers(span: &Range<usize>, offset: usize) -> bool {
    span.start <= offset && offset < span.end.max(span.start + 1)
}

/// The dotted key whose name or value covers `offset`, innermost first.
fn key_at(table: &DeTable<'_>, offset: usize, prefix: &str) -> Option<String> {
    for (key, value) in table {
        let dotted = if prefix.is_empty() {
            key.get_ref().to_string()
        } else {
            format!("{prefix}.{}", key.get_ref())
        };
        if let DeValue::Table(inner) = value.get_ref()
            && let Some(found) = key_at(inner, offset, &dotted)
        {
            return Some(found);
        }
        if covers(&key.span(), offset) || covers(&value.span(), offset) {
            return Some(dotted);
        }
    }
    None
}

/// 1-based line where the dotted `field` is set in `src`, if it is.
fn line_of_key(src: &str, field: &str) -> Option<usize> {
    let root = DeTable::parse(src).ok()?;
    let mut table = root.get_ref();
    let mut parts = field.split('.').peekable();
    while let Some(part) = parts.next() {
        let (key, value) = table.get_key_value(part)?;
        if parts.peek().is_none() {
            return Some(line_col(src, key.span().start).0);
        }
        match value.get_ref() {
            DeValue::Table(inner) => table = inner,
            _ => return None,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_node_runs_with_this_configuration_and_its_defaults_are_the_files() {
        let key = PublicKey([3; 32]);
        let defaults = RelayConfig::from_toml_str(EMBEDDED_DEFAULT, None).unwrap();
        assert_eq!(
            defaults.node_config(key),
            relay_core::NodeConfig::new(key),
            "relay-core's defaults are config/relay.toml's"
        );
        let mut cfg = defaults;
        cfg.limits.max_links = 7;
        cfg.limits.max_services_per_cell = 3;
        cfg.security.verify = VerifyMode::Sampled;
        cfg.security.sample_rate = 0.25;
        cfg.security.timestamp_past_ms = 9_000;
        cfg.security.timestamp_future_ms = 1_000;
        cfg.security.dedup_window_ms = 10_000;
        cfg.security.dedup_capacity = 2_048;
        cfg.link.notice_interval_ms = 50;
        cfg.link.max_stall_ms = 0;
        let n = cfg.node_config(key);
        assert_eq!(
            (n.max_links, n.limits.max_services, n.verify),
            (7, 3, Verify::Sampled { rate: 0.25 })
        );
        assert_eq!(n.freshness, FreshnessWindow::new(9_000, 1_000));
        assert_eq!((n.dedup_window_ms, n.dedup_capacity), (10_000, 2_048));
        assert_eq!((n.notice_interval_ms, n.max_stall_ms), (50, 0));
        cfg.security.verify = VerifyMode::All;
        assert_eq!(cfg.node_config(key).verify, Verify::All);
        relay_core::Node::<()>::new(cfg.node_config(key), 0).expect("a valid configuration runs");
    }

    fn parse(src: &str) -> Result<RelayConfig, ConfigError> {
        RelayConfig::from_toml_str(src, Some(Path::new("test.toml")))
    }

    /// Asserts `src` is refused as an invalid `field` at `line`.
    fn assert_invalid(src: &str, field: &str, line: Option<usize>) {
        match parse(src) {
            Err(ConfigError::Invalid {
                field: f, line: l, ..
            }) => {
                assert_eq!((f, l), (field, line), "for {src:?}");
            }
            other => panic!("expected Invalid {field} for {src:?}, got {other:?}"),
        }
    }

    /// Asserts `src` is refused as a parse error at `line` naming `words`.
    fn assert_parse_error(src: &str, want_line: usize, words: &[&str]) -> String {
        match parse(src) {
            Err(e @ ConfigError::Parse { .. }) => {
                let ConfigError::Parse { line, message, .. } = &e else {
                    unreachable!()
                };
                assert_eq!(*line, want_line, "line for {src:?}: {message}");
                for w in words {
                    assert!(message.contains(w), "{message:?} should name {w:?}");
                }
                e.to_string()
            }
            other => panic!("expected a parse error for {src:?}, got {other:?}"),
        }
    }

    #[test]
    fn storage_settings_out_of_bounds_are_refused_with_their_line() {
        assert_invalid(
            "[storage]\nmax_bytes = 4096\n",
            "storage.max_bytes",
            Some(2),
        );
        assert_invalid(
            "[storage]\nsegment_bytes = 100\n",
            "storage.segment_bytes",
            Some(2),
        );
        assert_invalid("[storage]\nttl_ms = 0\n", "storage.ttl_ms", Some(2));
        assert_invalid(
            "[storage]\nretry_initial_ms = 5000\nretry_max_ms = 1000\n",
            "storage.retry_max_ms",
            Some(3),
        );
        assert_invalid(
            "[storage]\ncompact_interval_ms = 1\n",
            "storage.compact_interval_ms",
            Some(2),
        );
        assert_parse_error("[storage]\nbackend = \"fast\"\n", 2, &["storage.backend"]);
        let ok = parse(
            "[storage]\nmax_bytes = 1048576\nsegment_bytes = 65536\nbackend = \"portable\"\n",
        )
        .unwrap();
        assert_eq!(ok.storage.backend, StorageBackend::Portable);
        assert_eq!(ok.storage.max_bytes, 1 << 20);
    }

    #[test]
    fn defaults_validate() {
        let cfg = RelayConfig::default();
        assert!(cfg.validate().is_ok(), "{:?}", cfg.validate());
        assert_eq!(cfg.node.listen, "127.0.0.1:4433".parse().unwrap());
        assert_eq!(cfg.node.admin, "127.0.0.1:9433".parse().unwrap());
        assert_eq!(cfg.limits.max_payload, 1 << 20);
        assert_eq!(cfg.link.lane_weights, [8, 4, 2, 1]);
        assert_eq!(cfg.security.verify, VerifyMode::Off);
        assert_eq!(cfg.link.idle_timeout(), Duration::from_secs(30));
        assert_eq!(cfg.security.dedup_window(), Duration::from_secs(300));
        assert_eq!(cfg.limits.codec_limits(), Limits::default());
    }

    #[test]
    fn example_file_equals_defaults() {
        let parsed = RelayConfig::from_toml_str(EMBEDDED_DEFAULT, None).unwrap();
        assert_eq!(parsed, RelayConfig::default());
    }

    #[test]
    fn example_file_sets_every_setting() {
        let example: toml::Table = toml::from_str(EMBEDDED_DEFAULT).unwrap();
        let defaults = toml::Table::try_from(RelayConfig::default()).unwrap();
        let keys = |t: &toml::Table| -> Vec<String> {
            let mut out = Vec::new();
            for (section, v) in t {
                for key in v.as_table().unwrap().keys() {
                    out.push(format!("{section}.{key}"));
                }
            }
            out.sort();
            out
        };
        let mut fields: Vec<String> = FIELDS.iter().map(ToString::to_string).collect();
        fields.sort();
        assert_eq!(keys(&example), keys(&defaults));
        assert_eq!(keys(&example), fields);
    }

    #[test]
    fn every_example_key_has_a_comment_above() {
        let lines: Vec<&str> = EMBEDDED_DEFAULT.lines().map(str::trim).collect();
        let mut keys = 0;
        for (i, line) in lines.iter().enumerate() {
            if line.is_empty() || line.starts_with('#') || line.starts_with('[') {
                continue;
            }
            keys += 1;
            let above = if i == 0 { "" } else { lines[i - 1] };
            assert!(
                above.starts_with("# ") && above.len() > 10,
                "line {} `{line}` has no comment directly above it",
                i + 1
            );
        }
        assert_eq!(keys, FIELDS.len());
    }

    #[test]
    fn serialized_defaults_round_trip() {
        let text = toml::to_string(&RelayConfig::default()).unwrap();
        assert_eq!(parse(&text).unwrap(), RelayConfig::default());
    }

    #[test]
    fn partial_file_overrides_only_what_it_sets() {
        let src = "\
[node]
listen = \"0.0.0.0:5000\"

[security]
verify = \"sampled\"
sample_rate = 0.5
";
        let cfg = parse(src).unwrap();
        let mut want = RelayConfig::default();
        want.node.listen = "0.0.0.0:5000".parse().unwrap();
        want.security.verify = VerifyMode::Sampled;
        want.security.sample_rate = 0.5;
        assert_eq!(cfg, want);
        assert_eq!(parse("").unwrap(), RelayConfig::default());
    }

    #[test]
    fn dotted_and_inline_keys_work_too() {
        let cfg = parse("link.zstd_level = 3\nlimits = { max_links = 7 }\n").unwrap();
        assert_eq!(cfg.link.zstd_level, 3);
        assert_eq!(cfg.limits.max_links, 7);
        assert_invalid("link.zstd_level = 30\n", "link.zstd_level", Some(1));
    }

    #[test]
    fn unknown_key_is_refused_with_name_and_line() {
        let src =
            "[node]\nlisten = \"127.0.0.1:1\"\n\n[limits]\nmax_payload = 10\nmax_paylod = 10\n";
        let shown = assert_parse_error(src, 6, &["max_paylod", "limits.max_paylod"]);
        assert!(shown.starts_with("test.toml:6:"), "{shown}");

        assert_parse_error("[nodes]\nlisten = 1\n", 1, &["nodes"]);
        assert_parse_error("\n\ntypo = 1\n", 3, &["typo"]);
    }

    #[test]
    fn wrong_type_names_field_and_line() {
        let shown = assert_parse_error("[node]\n\nlisten = 5\n", 3, &["node.listen"]);
        assert!(shown.starts_with("test.toml:3:10:"), "{shown}");
        assert_parse_error(
            "[link]\nkeep_alive_ms = 1\nzstd_level = \"fast\"\n",
            3,
            &["link.zstd_level"],
        );
        assert_parse_error("[limits]\nmax_links = -1\n", 2, &["limits.max_links"]);
        assert_parse_error(
            "[link]\nlane_weights = [1, 2, 3]\n",
            2,
            &["link.lane_weights"],
        );
        assert_parse_error("node = 5\n", 1, &["node"]);
    }

    #[test]
    fn bad_verify_mode_names_field() {
        assert_parse_error(
            "[security]\nverify = \"sometimes\"\n",
            2,
            &["security.verify", "sometimes", "sampled"],
        );
    }

    #[test]
    fn syntax_error_has_line_and_column() {
        match parse("[node]\nlisten = \"127.0.0.1:1\n") {
            Err(ConfigError::Parse { line, column, .. }) => {
                assert_eq!(line, 2);
                assert!(column > 1);
            }
            other => panic!("got {other:?}"),
        }
    }

    #[test]
    fn impossible_values_name_the_field() {
        assert_invalid(
            "[limits]\nmax_payload = 1048576\nmax_frame = 1048576\n",
            "limits.max_frame",
            Some(3),
        );
        // max_frame left at its default: the line points at what broke it.
        assert_invalid(
            "[limits]\nmax_payload = 16777216\n",
            "limits.max_frame",
            Some(2),
        );
        assert_invalid(
            "[limits]\nmax_frame = 67108865\n",
            "limits.max_frame",
            Some(2),
        );
        assert_invalid(
            "[limits]\nhandshake_timeout_ms = 0\n",
            "limits.handshake_timeout_ms",
            Some(2),
        );
        assert_invalid(
            "[link]\nkeep_alive_ms = 30000\nidle_timeout_ms = 30000\n",
            "link.idle_timeout_ms",
            Some(3),
        );
        assert_invalid(
            "[security]\ntimestamp_past_ms = 600000\ndedup_window_ms = 599999\n",
            "security.dedup_window_ms",
            Some(3),
        );
        assert_invalid(
            "[link]\nlane_weights = [8, 4, 0, 1]\n",
            "link.lane_weights",
            Some(2),
        );
        assert_invalid(
            "[node]\nworker_threads = 0\n",
            "node.worker_threads",
            Some(2),
        );
        assert_invalid("[node]\ndata_dir = \"\"\n", "node.data_dir", Some(2));
        assert_invalid(
            "[security]\nsample_rate = 0.0\n",
            "security.sample_rate",
            Some(2),
        );
        assert_invalid(
            "[security]\nsample_rate = nan\n",
            "security.sample_rate",
            Some(2),
        );
        assert_invalid(
            "[security]\ndedup_capacity = 10\n",
            "security.dedup_capacity",
            Some(2),
        );
        assert_invalid(
            "[limits]\nmax_services_per_cell = 256\n",
            "limits.max_services_per_cell",
            Some(2),
        );
        assert_invalid(
            "[limits]\nlane_queue_depth = 15\n",
            "limits.lane_queue_depth",
            Some(2),
        );
        assert_invalid("[link]\nconn_window = 1024\n", "link.conn_window", Some(2));
        assert_invalid("[link]\nbatch_bytes = 512\n", "link.batch_bytes", Some(2));
        assert_invalid("[link]\nzstd_level = 0\n", "link.zstd_level", Some(2));
        assert_invalid(
            "[link]\nmax_stall_ms = 1001\n",
            "link.max_stall_ms",
            Some(2),
        );
    }

    #[test]
    fn an_invalid_value_names_the_file_and_line_as_a_parse_error_does() {
        let err = parse("\n[limits]\nmax_payload = 0\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "test.toml:3: invalid `limits.max_payload`: must be in 1..=16777216, got 0"
        );
        // A rule between two settings: the line of the one blamed.
        let err =
            parse("[link]\nbatch_bytes = 1024\n[limits]\nmax_frame = 8192\nmax_payload = 8192\n")
                .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("test.toml:4: invalid `limits.max_frame`"),
            "{err}"
        );
        let err = RelayConfig::from_toml_str("[node]\nworker_threads = 0\n", None).unwrap_err();
        assert!(err.to_string().starts_with("<config>:2: invalid"), "{err}");
    }

    #[test]
    fn listen_tcp_is_same_off_or_an_address_and_a_bad_one_names_its_line() {
        assert_eq!(RelayConfig::default().node.listen_tcp, ListenTcp::Same);
        let at = |src: &str| parse(src).unwrap().node.listen_tcp;
        assert_eq!(at("[node]\nlisten_tcp = \"off\"\n"), ListenTcp::Off);
        assert_eq!(at("[node]\nlisten_tcp = \"same\"\n"), ListenTcp::Same);
        assert_eq!(
            at("[node]\nlisten_tcp = \"127.0.0.1:4434\"\n"),
            ListenTcp::At("127.0.0.1:4434".parse().unwrap())
        );
        let shown = assert_parse_error(
            "[node]\nlisten = \"127.0.0.1:1\"\nlisten_tcp = \"no\"\n",
            3,
            &["node.listen_tcp", "\"off\"", "\"same\""],
        );
        assert!(shown.starts_with("test.toml:3"), "{shown}");
        assert_parse_error(
            "[node]\nlisten_tcp = \"127.0.0.1:70000\"\n",
            2,
            &["node.listen_tcp", "out of range"],
        );
        assert_parse_error("[node]\nlisten_tcp = false\n", 2, &["node.listen_tcp"]);
        // Written back as it is read.
        let cfg = RelayConfig {
            node: NodeConfig {
                listen_tcp: ListenTcp::At("[::1]:5".parse().unwrap()),
                ..NodeConfig::default()
            },
            ..RelayConfig::default()
        };
        let text = toml::to_string(&cfg).unwrap();
        assert!(text.contains("listen_tcp = \"[::1]:5\""), "{text}");
        assert_eq!(RelayConfig::from_toml_str(&text, None).unwrap(), cfg);
    }

    #[test]
    fn addresses_take_host_names_and_say_when_a_port_is_out_of_range() {
        let cfg = parse("[node]\nlisten = \"localhost:4433\"\nadmin = \"[::1]:0\"\n").unwrap();
        assert!(cfg.node.listen.ip().is_loopback());
        assert_eq!(cfg.node.listen.port(), 4433);
        assert_eq!(cfg.node.admin, "[::1]:0".parse().unwrap());
        let shown = assert_parse_error(
            "[node]\nlisten = \"localhost:99999\"\n",
            2,
            &["node.listen", "port 99999 is out of range (0-65535)"],
        );
        assert!(shown.starts_with("test.toml:2:"), "{shown}");
        assert_parse_error(
            "[node]\nadmin = \"127.0.0.1\"\n",
            2,
            &["node.admin", "HOST:PORT"],
        );
        for (text, want) in [
            ("127.0.0.1:65536", "port 65536 is out of range (0-65535)"),
            ("::1:4433", "[::1]:4433"),
            (":4433", "no host"),
            ("localhost:http", "port \"http\" is not a number"),
            (
                "no-such-host.invalid:1",
                "cannot resolve host \"no-such-host.invalid\"",
            ),
        ] {
            let err = resolve_socket_addr(text).unwrap_err();
            assert!(err.contains(want), "{text}: {err}");
        }
        assert_eq!(
            resolve_socket_addr("127.0.0.1:0").unwrap(),
            "127.0.0.1:0".parse().unwrap()
        );
    }

    #[test]
    fn first_error_in_file_order_and_validate_lists_all() {
        let src = "[node]\nworker_threads = 0\n[link]\nzstd_level = 20\n";
        assert_invalid(src, "node.worker_threads", Some(2));
        let cfg: RelayConfig = toml::from_str(src).unwrap();
        let errors = cfg.validate().unwrap_err();
        let fields: Vec<&str> = errors
            .iter()
            .map(|e| match e {
                ConfigError::Invalid { field, line, .. } => {
                    assert_eq!(*line, None);
                    *field
                }
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(fields, ["node.worker_threads", "link.zstd_level"]);
        assert_eq!(
            errors[0].to_string(),
            "invalid `node.worker_threads`: must be in 1..=256, got 0"
        );
    }

    #[test]
    fn mesh_peers_trusted_relays_and_max_peers_parse_and_bad_ones_name_their_line() {
        let a = PublicKey([1; 32]);
        let b = PublicKey([2; 32]);
        let c = PublicKey([3; 32]);
        let src = format!(
            "[mesh]\npeers = [\"{a}@127.0.0.1:4433\", \"tcp://{b}@localhost:4434\"]\n\
             trusted_relays = [\"{c}\"]\nmax_peers = 4\n"
        );
        let cfg = parse(&src).unwrap();
        assert_eq!(cfg.mesh.peers.len(), 2);
        assert_eq!(cfg.mesh.peers[0].transport, relay_link::Transport::Quic);
        assert_eq!(cfg.mesh.peers[1].transport, relay_link::Transport::Tcp);
        assert_eq!(cfg.mesh.peers[1].addr.host, "localhost");
        assert_eq!(cfg.mesh.trusted(), [a, b, c].into_iter().collect());
        let m = cfg.mesh.mesh_config("127.0.0.1:1".into());
        assert_eq!(m.max_peers, 4);
        assert!(m.validate().is_ok());
        // By default only the configured peers are trusted; none: peering off.
        assert!(RelayConfig::default().mesh.trusted().is_empty());
        assert_eq!(
            parse(&format!("[mesh]\npeers = [\"{a}@h:1\"]\n"))
                .unwrap()
                .mesh
                .trusted(),
            [a].into_iter().collect()
        );
        assert_invalid("[mesh]\nmax_peers = 0\n", "mesh.max_peers", Some(2));
        assert_invalid(
            "[mesh]\nadvertise = \"noport\"\n",
            "mesh.advertise",
            Some(2),
        );
        assert_invalid(
            "[mesh]\nadvertise = \"h:99999\"\n",
            "mesh.advertise",
            Some(2),
        );
        let long = format!("[mesh]\nadvertise = \"{}:1\"\n", "h".repeat(260));
        assert_invalid(&long, "mesh.advertise", Some(2));
        assert_eq!(
            parse("[mesh]\nadvertise = \"relay.example:4433\"\n")
                .unwrap()
                .mesh
                .advertise,
            "relay.example:4433"
        );
        assert_invalid("[mesh]\nmax_peers = 1025\n", "mesh.max_peers", Some(2));
        assert_invalid(
            &format!("[mesh]\npeers = [\"{a}@h:1\", \"{b}@h:2\"]\n\nmax_peers = 1\n"),
            "mesh.peers",
            Some(2),
        );
        assert_invalid(
            &format!("[mesh]\n\npeers = [\"{a}@h:1\", \"tcp://{a}@h:2\"]\n"),
            "mesh.peers",
            Some(3),
        );
        let e = assert_parse_error(
            "[mesh]\npeers = [\"nokey:1\"]\n",
            2,
            &["mesh.peers", "KEY@HOST:PORT"],
        );
        assert!(e.starts_with("test.toml:2:"), "{e}");
        assert_parse_error(
            &format!("[mesh]\npeers = [\"udp://{a}@h:1\"]\n"),
            2,
            &["mesh.peers", "unknown transport"],
        );
        assert_parse_error(
            &format!("[mesh]\npeers = [\"{a}@h:0\"]\n"),
            2,
            &["mesh.peers", "port"],
        );
        assert_parse_error(
            "\n[mesh]\ntrusted_relays = [\"not-a-key\"]\n",
            3,
            &["mesh.trusted_relays", "relay key"],
        );
        let e = parse("[mesh]\nmax_peers = 0\n").unwrap_err().to_string();
        assert!(
            e.starts_with("test.toml:2: invalid `mesh.max_peers`"),
            "{e}"
        );
    }

    #[test]
    fn the_readme_mesh_files_are_valid_and_differ_in_addresses_and_data_dirs() {
        let files = [
            include_str!("../../config/mesh-a.toml"),
            include_str!("../../config/mesh-b.toml"),
            include_str!("../../config/mesh-c.toml"),
        ];
        let cfgs: Vec<RelayConfig> = files.iter().map(|f| parse(f).unwrap()).collect();
        for (i, a) in cfgs.iter().enumerate() {
            for b in &cfgs[i + 1..] {
                assert_ne!(a.node.listen, b.node.listen);
                assert_ne!(a.node.admin, b.node.admin);
                assert_ne!(a.node.data_dir, b.node.data_dir);
            }
        }
    }

    #[test]
    fn load_reads_a_file_and_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("relay.toml");
        std::fs::write(&file, "[limits]\nmax_links = 3\n").unwrap();
        assert_eq!(RelayConfig::load(&file).unwrap().limits.max_links, 3);

        std::fs::write(&file, "[limits]\nmax_linkz = 3\n").unwrap();
        let err = RelayConfig::load(&file).unwrap_err();
        assert!(
            err.to_string()
                .starts_with(&format!("{}:2:1:", file.display())),
            "{err}"
        );

        std::fs::write(&file, "[node]\nworker_threads = 0\n").unwrap();
        let err = RelayConfig::load(&file).unwrap_err();
        assert!(
            err.to_string()
                .starts_with(&format!("{}:2: invalid", file.display())),
            "{err}"
        );

        let missing = dir.path().join("missing.toml");
        let err = RelayConfig::load(&missing).unwrap_err();
        let shown = err.to_string();
        assert_eq!(shown.matches("No such file").count(), 1, "{shown}");
        assert!(shown.contains("config/relay.toml"), "{shown}");
        match err {
            ConfigError::Io { path, .. } => assert_eq!(path, missing),
            other => panic!("got {other:?}"),
        }
    }

    proptest! {
        #[test]
        fn frame_rule_matches_validation(payload in 0usize..(20 << 20), frame in 0usize..(70 << 20)) {
            let mut cfg = RelayConfig::default();
            cfg.limits.max_payload = payload;
            cfg.limits.max_frame = frame;
            cfg.link.batch_bytes = KIB;
            let ok = (1..=16 << 20).contains(&payload)
                && frame >= payload + 4096
                && frame <= 64 << 20;
            prop_assert_eq!(cfg.validate().is_ok(), ok);
        }

        #[test]
        fn any_valid_config_round_trips(
            workers in 1usize..=256,
            payload in 1usize..=(16 << 20),
            extra in 4096usize..=(4 << 20),
            past in 1_000u64..=86_400_000,
            more in 0u64..1_000_000,
            weights in proptest::array::uniform4(1u32..=1024),
            rate in 0.0001f64..=1.0,
        ) {
            let mut cfg = RelayConfig::default();
            cfg.node.worker_threads = workers;
            cfg.limits.max_payload = payload;
            cfg.limits.max_frame = (payload + extra).min(64 << 20);
            cfg.security.timestamp_past_ms = past;
            cfg.security.dedup_window_ms = past + more;
            cfg.security.sample_rate = rate;
            cfg.link.lane_weights = weights;
            cfg.link.batch_bytes = KIB;
            prop_assert!(cfg.validate().is_ok());
            let text = toml::to_string(&cfg).unwrap();
            prop_assert_eq!(RelayConfig::from_toml_str(&text, None).unwrap(), cfg);
        }
    }
}
