//! Every counter the relay exports, and their Prometheus text encoding.
//!
//! [`Metrics`] is built once at start and shared behind an `Arc`. Labeled
//! children (per lane, per drop reason, per link role, per close reason) are
//! created at construction and kept as handles, so every hot-path update is a
//! single relaxed atomic add: no label lookups, no locks.
//!
//! The one exception is time in relay, an HDR histogram behind a mutex: hot
//! code records into its own local histogram (see [`Metrics::time_histogram`])
//! and folds it in with [`Metrics::merge_time_in_relay`] every so often.
//!
//! [`Metrics::encode`] renders the Prometheus text exposition format,
//! version 0.0.4 ([`CONTENT_TYPE`]).

use std::fmt::Write as _;
use std::sync::atomic::AtomicU64;
use std::sync::{Mutex, MutexGuard};

use hdrhistogram::Histogram as HdrHistogram;
use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use relay_codec::frame::{NoticeCode, Role};

/// The `Content-Type` of what [`Metrics::encode`] returns (Prometheus text
/// format 0.0.4).
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// Label values of the four lanes, indexed by lane wire value
/// (`relay_codec::message::Lane as usize`).
pub const LANE_NAMES: [&str; 4] = ["control", "high", "normal", "bulk"];

/// Label values of the link roles, indexed by `relay_codec::frame::Role as usize`.
pub const ROLE_NAMES: [&str; 2] = ["cell", "relay"];

/// Lowest trackable time in relay, in microseconds.
pub const TIME_LOW_US: u64 = 1;
/// Highest trackable time in relay, in microseconds (60 s); longer times are
/// clamped to it.
pub const TIME_HIGH_US: u64 = 60_000_000;
/// Significant decimal digits kept by the time-in-relay histogram.
pub const TIME_SIGFIG: u8 = 3;

/// Quantiles exported for `celluler_time_in_relay_seconds`.
pub const TIME_QUANTILES: [f64; 5] = [0.5, 0.9, 0.99, 0.999, 1.0];

/// Why a message was dropped, and why a link closed: the `reason` labels
/// of `celluler_drops_total` and `celluler_links_closed_total`, decided by
/// the pure node and counted here.
pub use relay_core::{CloseReason, DropReason};

/// Why the TCP listener turned a connection away before it became a link;
/// the `reason` label of `celluler_tcp_handshakes_refused_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TcpRefusal {
    /// Closed at once: `max_handshakes` TLS handshakes were already running.
    OverLimit,
    /// The TLS handshake failed (garbage, a wrong ALPN, no raw key, reset).
    Failed,
    /// The TLS handshake did not finish within its deadline.
    TimedOut,
}

impl TcpRefusal {
    /// Every reason, in label order.
    pub const ALL: [TcpRefusal; 3] = [
        TcpRefusal::OverLimit,
        TcpRefusal::Failed,
        TcpRefusal::TimedOut,
    ];

    /// The snake_case label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            TcpRefusal::OverLimit => "over_limit",
            TcpRefusal::Failed => "failed",
            TcpRefusal::TimedOut => "timed_out",
        }
    }
}

/// Per-lane counters: one handle per lane, indexed by lane wire value.
type LaneCounters = [Counter; 4];

/// Every metric the relay exports. Share it as `Arc<Metrics>`; all update
/// methods take `&self` and are one relaxed atomic add per counter touched
/// (except [`Metrics::merge_time_in_relay`], which takes a mutex).
pub struct Metrics {
    registry: Registry,
    messages_in: LaneCounters,
    bytes_in: LaneCounters,
    messages_out: LaneCounters,
    bytes_out: LaneCounters,
    drops: [Counter; DropReason::ALL.len()],
    notices_sent: [Counter; NoticeCode::ALL.len()],
    dedup_hits: Counter,
    not_quic: Counter,
    tcp_refused: [Counter; TcpRefusal::ALL.len()],
    stalls: Counter,
    stall_timeouts: Counter,
    stall_seconds: Counter<f64, AtomicU64>,
    links: [Gauge; 2],
    links_opened: [Counter; 2],
    links_closed: [Counter; CloseReason::ALL.len()],
    control_dropped: [Counter; 2],
    batches_out: Counter,
    batch_messages: Histogram,
    batch_raw_bytes: Counter,
    batch_wire_bytes: Counter,
    compression_ratio: Gauge<f64, AtomicU64>,
    signatures_checked: Counter,
    signatures_failed: Counter,
    time_in_relay: Mutex<HdrHistogram<u64>>,
    durable: DurableMetrics,
    mesh: MeshMetrics,
}

/// The durable log's counters (`celluler_durable_*`).
#[derive(Debug, Default)]
pub struct DurableMetrics {
    logged: Counter,
    acked: Counter,
    released: Counter,
    refused: Counter,
    expired: Counter,
    log_bytes: Gauge,
}

impl DurableMetrics {
    fn register(r: &mut Registry) -> Self {
        let m = Self::default();
        for (name, help, c) in [
            (
                "celluler_durable_logged",
                "Durable messages appended to the log and synced",
                &m.logged,
            ),
            (
                "celluler_durable_acked",
                "Durable messages acknowledged to their sender as stored (resends included)",
                &m.acked,
            ),
            (
                "celluler_durable_released",
                "Durable messages their destination acknowledged, released from the log",
                &m.released,
            ),
            (
                "celluler_durable_refused",
                "Durable messages refused to their sender (log full or failed)",
                &m.refused,
            ),
            (
                "celluler_durable_expired",
                "Durable messages whose time to live ran out before their destination took them",
                &m.expired,
            ),
        ] {
            r.register(name, help, c.clone());
        }
        r.register(
            "celluler_durable_log_bytes",
            "Bytes of durable log segment files on disk",
            m.log_bytes.clone(),
        );
        m
    }

    /// Counts `n` messages synced to the log.
    pub fn logged(&self, n: u64) {
        self.logged.inc_by(n);
    }

    /// Counts `n` messages acknowledged to their sender.
    pub fn acked(&self, n: u64) {
        self.acked.inc_by(n);
    }

    /// Counts `n` messages released by their destination's ack.
    pub fn released(&self, n: u64) {
        self.released.inc_by(n);
    }

    /// Counts `n` messages refused.
    pub fn refused(&self, n: u64) {
        self.refused.inc_by(n);
    }

    /// Counts `n` messages expired.
    pub fn expired(&self, n: u64) {
        self.expired.inc_by(n);
    }

    /// Sets the log's bytes on disk.
    pub fn log_bytes(&self, bytes: u64) {
        self.log_bytes.set(bytes as i64);
    }
}

/// The mesh's series: peer links, messages forwarded to relays, relay
/// links refused.
struct MeshMetrics {
    peers: Gauge,
    forwarded_to_relay: Counter,
    forwarded_batches_to_relay: Counter,
    relays_refused: Counter,
}

impl MeshMetrics {
    fn register(r: &mut Registry) -> Self {
        let m = Self {
            peers: Gauge::default(),
            forwarded_to_relay: Counter::default(),
            forwarded_batches_to_relay: Counter::default(),
            relays_refused: Counter::default(),
        };
        r.register(
            "celluler_peers",
            "Relay links up (peer relays, dialed or accepted)",
            m.peers.clone(),
        );
        r.register(
            "celluler_forwarded_to_relay",
            "Messages queued for another relay (each hop counts once per relay)",
            m.forwarded_to_relay.clone(),
        );
        r.register(
            "celluler_forwarded_batches_to_relay",
            "Batches queued whole for another relay",
            m.forwarded_batches_to_relay.clone(),
        );
        r.register(
            "celluler_relays_refused",
            "Relay links refused at admission (untrusted key, max_peers, duplicate link)",
            m.relays_refused.clone(),
        );
        m
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Registers a family with label `key` and returns one child handle per value.
fn family_children<M, const N: usize>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    key: &'static str,
    values: [&'static str; N],
) -> [M; N]
where
    M: prometheus_client::metrics::TypedMetric
        + prometheus_client::encoding::EncodeMetric
        + Clone
        + Default
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let family = Family::<[(&'static str, &'static str); 1], M>::default();
    let children = values.map(|v| family.get_or_create(&[(key, v)]).clone());
    registry.register(name, help, family);
    children
}

impl Metrics {
    /// Builds every metric family, with all labeled children pre-created (so
    /// each series is exported from the start, at zero).
    pub fn new() -> Self {
        let mut r = Registry::default();
        let lanes = |r: &mut Registry, name: &str, help: &str| {
            family_children::<Counter, 4>(r, name, help, "lane", LANE_NAMES)
        };
        let messages_in = lanes(&mut r, "celluler_messages_in", "Messages received, by lane");
        let bytes_in = lanes(
            &mut r,
            "celluler_bytes_in",
            "Message bytes received, by lane",
        );
        let messages_out = lanes(&mut r, "celluler_messages_out", "Messages sent, by lane");
        let bytes_out = lanes(&mut r, "celluler_bytes_out", "Message bytes sent, by lane");
        let drops = family_children::<Counter, { DropReason::ALL.len() }>(
            &mut r,
            "celluler_drops",
            "Messages dropped, by reason",
            "reason",
            DropReason::ALL.map(DropReason::as_str),
        );
        let notices_sent = family_children::<Counter, { NoticeCode::ALL.len() }>(
            &mut r,
            "celluler_notices_sent",
            "Notice frames sent to senders about their dropped messages (each sums many drops), by reason",
            "reason",
            NoticeCode::ALL.map(NoticeCode::as_str),
        );

        let dedup_hits = Counter::default();
        r.register(
            "celluler_dedup_hits",
            "Messages recognised as already seen by the dedup window",
            dedup_hits.clone(),
        );

        let not_quic = Counter::default();
        r.register(
            "celluler_not_quic_datagrams",
            "UDP datagrams on the QUIC port that cannot be QUIC packets (dropped)",
            not_quic.clone(),
        );

        let tcp_refused = family_children::<Counter, { TcpRefusal::ALL.len() }>(
            &mut r,
            "celluler_tcp_handshakes_refused",
            "TCP connections closed before they became links: over the listener's bound on \
             TLS handshakes in progress, a failed TLS handshake, or one past its deadline",
            "reason",
            TcpRefusal::ALL.map(TcpRefusal::as_str),
        );

        let stalls = Counter::default();
        r.register(
            "celluler_sender_stalls",
            "Pauses in reading a sender's lane while a receiver's queue drained (link.max_stall_ms)",
            stalls.clone(),
        );
        let stall_timeouts = Counter::default();
        r.register(
            "celluler_sender_stall_timeouts",
            "Pauses that ended because the receiver did not drain in time (it is then not waited for during a hold-off)",
            stall_timeouts.clone(),
        );
        let stall_seconds = Counter::<f64, AtomicU64>::default();
        r.register(
            "celluler_sender_stall_seconds",
            "Time senders' lanes spent paused for their receivers",
            stall_seconds.clone(),
        );

        let links = family_children::<Gauge, 2>(
            &mut r,
            "celluler_links",
            "Links currently open, by peer role",
            "role",
            ROLE_NAMES,
        );
        let links_opened = family_children::<Counter, 2>(
            &mut r,
            "celluler_links_opened",
            "Links opened, by peer role",
            "role",
            ROLE_NAMES,
        );
        let links_closed = family_children::<Counter, { CloseReason::ALL.len() }>(
            &mut r,
            "celluler_links_closed",
            "Links closed, by reason",
            "reason",
            CloseReason::ALL.map(CloseReason::as_str),
        );
        let control_dropped = family_children::<Counter, 2>(
            &mut r,
            "celluler_control_frames_dropped",
            "Control frames dropped because the link's control queue was full, by peer role",
            "role",
            ROLE_NAMES,
        );

        let batches_out = Counter::default();
        r.register("celluler_batches_out", "Batches sent", batches_out.clone());
        // 1, 2, 4, ..., 4096 messages (13 buckets, plus +Inf).
        let batch_messages = Histogram::new(exponential_buckets(1.0, 2.0, 13));
        r.register(
            "celluler_batch_messages",
            "Messages per batch sent",
            batch_messages.clone(),
        );
        let batch_raw_bytes = Counter::default();
        r.register(
            "celluler_batch_raw_bytes",
            "Batch bytes before compression",
            batch_raw_bytes.clone(),
        );
        let batch_wire_bytes = Counter::default();
        r.register(
            "celluler_batch_wire_bytes",
            "Batch bytes on the wire, after compression",
            batch_wire_bytes.clone(),
        );
        let compression_ratio = Gauge::<f64, AtomicU64>::default();
        r.register(
            "celluler_compression_ratio",
            "Batch raw bytes over wire bytes since start (1 before any batch)",
            compression_ratio.clone(),
        );

        let signatures_checked = Counter::default();
        r.register(
            "celluler_signatures_checked",
            "Message signatures verified",
            signatures_checked.clone(),
        );
        let signatures_failed = Counter::default();
        r.register(
            "celluler_signatures_failed",
            "Message signatures that did not verify",
            signatures_failed.clone(),
        );
        let mesh = MeshMetrics::register(&mut r);

        let durable = DurableMetrics::register(&mut r);
        Metrics {
            durable,
            mesh,
            registry: r,
            messages_in,
            bytes_in,
            messages_out,
            bytes_out,
            drops,
            notices_sent,
            dedup_hits,
            not_quic,
            tcp_refused,
            stalls,
            stall_timeouts,
            stall_seconds,
            links,
            links_opened,
            links_closed,
            control_dropped,
            batches_out,
            batch_messages,
            batch_raw_bytes,
            batch_wire_bytes,
            compression_ratio,
            signatures_checked,
            signatures_failed,
            time_in_relay: Mutex::new(Self::time_histogram()),
        }
    }

    /// A fresh histogram with the bounds of the shared time-in-relay one
    /// (microseconds, 1 µs..=60 s, 3 significant digits). Hot-path code keeps
    /// one per task, records into it, and passes it to
    /// [`Metrics::merge_time_in_relay`]. Values above 60 s are rejected by
    /// `record`; use `saturating_record` to clamp them.
    pub fn time_histogram() -> HdrHistogram<u64> {
        HdrHistogram::new_with_bounds(TIME_LOW_US, TIME_HIGH_US, TIME_SIGFIG)
            .expect("constant histogram bounds are valid")
    }

    /// Counts `n` messages of `bytes` in all received on lane `lane_index`
    /// (`Lane as usize`, 0..=3; larger indices count as bulk). Called once
    /// per batch, not per message.
    #[inline]
    pub fn msgs_in(&self, lane_index: usize, n: u64, bytes: u64) {
        let i = lane_index.min(3);
        self.messages_in[i].inc_by(n);
        self.bytes_in[i].inc_by(bytes);
    }

    /// Counts `n` messages of `bytes` in all sent on lane `lane_index`
    /// (`Lane as usize`, 0..=3; larger indices count as bulk). Called once
    /// per batch, not per message.
    #[inline]
    pub fn msgs_out(&self, lane_index: usize, n: u64, bytes: u64) {
        let i = lane_index.min(3);
        self.messages_out[i].inc_by(n);
        self.bytes_out[i].inc_by(bytes);
    }

    /// Counts `n` messages dropped for `reason`.
    #[inline]
    pub fn dropped(&self, reason: DropReason, n: u64) {
        self.drops[reason as usize].inc_by(n);
    }

    /// Counts one Notice frame sent, for `code`.
    pub fn notice_sent(&self, code: NoticeCode) {
        // NoticeCode is 1-based on the wire and ALL is in wire order.
        if let Some(i) = NoticeCode::ALL.iter().position(|c| *c == code) {
            self.notices_sent[i].inc();
        }
    }

    /// Counts `n` datagrams that were not QUIC.
    pub fn not_quic(&self, n: u64) {
        self.not_quic.inc_by(n);
    }

    /// Counts `n` TCP connections turned away for `why`.
    pub fn tcp_refused(&self, why: TcpRefusal, n: u64) {
        self.tcp_refused[why as usize].inc_by(n);
    }

    /// Counts one pause of a sender's lane that lasted `seconds`, and
    /// whether it ended because a receiver did not drain in time.
    pub fn stalled(&self, seconds: f64, timed_out: bool) {
        self.stalls.inc();
        if timed_out {
            self.stall_timeouts.inc();
        }
        self.stall_seconds.inc_by(seconds);
    }

    /// The durable log's counters.
    pub fn durable(&self) -> &DurableMetrics {
        &self.durable
    }

    /// Counts `n` dedup-window hits.
    #[inline]
    pub fn dedup_hits(&self, n: u64) {
        self.dedup_hits.inc_by(n);
    }

    /// Sets the number of relay links up.
    pub fn set_peers(&self, n: usize) {
        self.mesh.peers.set(n as i64);
    }

    /// Counts `n` messages queued for another relay, `whole` if as one
    /// forwarded batch.
    #[inline]
    pub fn forwarded_to_relay(&self, n: u64, whole: bool) {
        self.mesh.forwarded_to_relay.inc_by(n);
        if whole {
            self.mesh.forwarded_batches_to_relay.inc();
        }
    }

    /// Counts a relay link refused at admission.
    pub fn relay_refused(&self) {
        self.mesh.relays_refused.inc();
    }

    /// Counts a link opened to a peer of `role` and raises the open-link gauge.
    /// Pair every call with one [`Metrics::link_closed`] of the same role.
    #[inline]
    pub fn link_opened(&self, role: Role) {
        self.links_opened[role as usize].inc();
        self.links[role as usize].inc();
    }

    /// Counts a connection refused before it became a link (its handshake
    /// failed, or admission refused it) under `reason`; the open-link gauge
    /// never counted it.
    #[inline]
    pub fn link_refused(&self, reason: CloseReason) {
        self.links_closed[reason as usize].inc();
    }

    /// Counts a link to a peer of `role` closed for `reason` and lowers the
    /// open-link gauge.
    #[inline]
    pub fn link_closed(&self, role: Role, reason: CloseReason) {
        self.links_closed[reason as usize].inc();
        self.links[role as usize].dec();
    }

    /// Counts a control frame dropped for a link of `role` whose control
    /// queue was full.
    pub fn control_dropped(&self, role: Role) {
        self.control_dropped[role as usize].inc();
    }

    /// Counts one batch sent carrying `messages` messages, `raw` bytes before
    /// compression and `wire` bytes after.
    #[inline]
    pub fn batch_out(&self, messages: u64, raw: u64, wire: u64) {
        self.batches_out.inc();
        self.batch_messages.observe(messages as f64);
        self.batch_raw_bytes.inc_by(raw);
        self.batch_wire_bytes.inc_by(wire);
    }

    /// Counts `checked` signatures verified, of which `failed` did not verify
    /// (`failed <= checked`).
    #[inline]
    pub fn signatures(&self, checked: u64, failed: u64) {
        self.signatures_checked.inc_by(checked);
        if failed > 0 {
            self.signatures_failed.inc_by(failed);
        }
    }

    /// Adds `local` (a histogram from [`Metrics::time_histogram`], values in
    /// microseconds) into the shared time-in-relay histogram, then resets
    /// `local`. Takes a mutex: call it every few milliseconds or every few
    /// thousand records, not per message. Values outside 1 µs..=60 s are
    /// clamped.
    pub fn merge_time_in_relay(&self, local: &mut HdrHistogram<u64>) {
        if local.is_empty() {
            return;
        }
        {
            let mut shared = self.time_lock();
            if shared.add(&*local).is_err() {
                // `local` has other bounds or values over 60 s: clamp each.
                for v in local.iter_recorded() {
                    shared.saturating_record_n(v.value_iterated_to(), v.count_at_value());
                }
            }
        }
        local.reset();
    }

    /// Records one batch's times in relay (microseconds) under the shared
    /// histogram's mutex: one lock per batch, and no per-link histogram
    /// (128 KiB each at this precision) for idle links to carry.
    pub fn record_time_in_relay(&self, samples_us: &[u32]) {
        if samples_us.is_empty() {
            return;
        }
        let mut shared = self.time_lock();
        for &us in samples_us {
            shared.saturating_record(u64::from(us));
        }
    }

    /// The time in relay at quantile `q` (0.0..=1.0), in microseconds;
    /// 0 when nothing has been merged yet. Accurate to 3 significant digits.
    pub fn time_in_relay_quantile(&self, q: f64) -> u64 {
        let h = self.time_lock();
        if h.is_empty() {
            0
        } else {
            h.value_at_quantile(q.clamp(0.0, 1.0))
        }
    }

    /// Number of time-in-relay samples merged so far.
    pub fn time_in_relay_count(&self) -> u64 {
        self.time_lock().len()
    }

    fn time_lock(&self) -> MutexGuard<'_, HdrHistogram<u64>> {
        // A panic elsewhere while holding the lock leaves a usable histogram.
        self.time_in_relay
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Renders every metric in the Prometheus text format 0.0.4
    /// ([`CONTENT_TYPE`]). `celluler_compression_ratio` and the
    /// `celluler_time_in_relay_seconds` summary are computed here.
    pub fn encode(&self) -> String {
        let raw = self.batch_raw_bytes.get();
        let wire = self.batch_wire_bytes.get();
        let ratio = if wire == 0 {
            1.0
        } else {
            raw as f64 / wire as f64
        };
        self.compression_ratio.set(ratio);

        let mut out = String::with_capacity(8 * 1024);
        prometheus_text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        self.encode_time_in_relay(&mut out)
            .expect("writing to a String cannot fail");
        out
    }

    /// Appends the time-in-relay summary (quantiles in seconds, `_sum`, `_count`).
    fn encode_time_in_relay(&self, out: &mut String) -> std::fmt::Result {
        const NAME: &str = "celluler_time_in_relay_seconds";
        let (quantiles, sum, count) = {
            let h = self.time_lock();
            let count = h.len();
            let quantiles = TIME_QUANTILES.map(|q| {
                if count == 0 {
                    f64::NAN
                } else {
                    h.value_at_quantile(q) as f64 / 1e6
                }
            });
            let sum = if count == 0 {
                0.0
            } else {
                h.mean() * count as f64 / 1e6
            };
            (quantiles, sum, count)
        };
        writeln!(
            out,
            "# HELP {NAME} Time a message spent in the relay, ingress to egress."
        )?;
        writeln!(out, "# TYPE {NAME} summary")?;
        for (q, v) in TIME_QUANTILES.iter().zip(quantiles) {
            write!(out, "{NAME}{{quantile=\"{q}\"}} ")?;
            write_float(out, v)?;
            out.push('\n');
        }
        write!(out, "{NAME}_sum ")?;
        write_float(out, sum)?;
        out.push('\n');
        writeln!(out, "{NAME}_count {count}")
    }
}

/// Writes `v` as a Prometheus float (`NaN`, `+Inf`, `-Inf` or decimal).
fn write_float(out: &mut String, v: f64) -> std::fmt::Result {
    if v.is_nan() {
        out.push_str("NaN");
        Ok(())
    } else if v.is_infinite() {
        out.push_str(if v > 0.0 { "+Inf" } else { "-Inf" });
        Ok(())
    } else {
        write!(out, "{v}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use relay_codec::frame::CloseCode;

    /// The value of the sample line `series` (name plus labels) in `text`.
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines().find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == series).then(|| value.parse().expect("sample value parses"))
        })
    }

    #[test]
    fn exports_every_family() {
        let m = Metrics::new();
        m.msgs_in(1, 1, 10);
        m.msgs_out(2, 1, 20);
        m.dropped(DropReason::Duplicate, 1);
        m.dedup_hits(1);
        m.link_opened(Role::Cell);
        m.link_closed(Role::Cell, CloseReason::PeerClosed);
        m.batch_out(3, 300, 100);
        m.signatures(2, 1);
        let mut local = Metrics::time_histogram();
        local.record(250).unwrap();
        m.merge_time_in_relay(&mut local);

        let text = m.encode();
        for family in [
            "celluler_messages_in_total",
            "celluler_bytes_in_total",
            "celluler_messages_out_total",
            "celluler_bytes_out_total",
            "celluler_drops_total",
            "celluler_notices_sent_total",
            "celluler_dedup_hits_total",
            "celluler_not_quic_datagrams_total",
            "celluler_tcp_handshakes_refused_total",
            "celluler_sender_stalls_total",
            "celluler_sender_stall_timeouts_total",
            "celluler_sender_stall_seconds_total",
            "celluler_links",
            "celluler_links_opened_total",
            "celluler_links_closed_total",
            "celluler_batches_out_total",
            "celluler_batch_messages",
            "celluler_batch_raw_bytes_total",
            "celluler_batch_wire_bytes_total",
            "celluler_compression_ratio",
            "celluler_signatures_checked_total",
            "celluler_signatures_failed_total",
            "celluler_time_in_relay_seconds",
        ] {
            assert!(
                text.contains(&format!("# TYPE {family} ")),
                "missing family {family} in:\n{text}"
            );
        }
        // Every label child exists from the start.
        for lane in LANE_NAMES {
            assert!(text.contains(&format!("celluler_bytes_out_total{{lane=\"{lane}\"}}")));
        }
        for r in DropReason::ALL {
            let series = format!("celluler_drops_total{{reason=\"{}\"}}", r.as_str());
            assert!(sample(&text, &series).is_some(), "missing {series}");
        }
        for r in CloseReason::ALL {
            let series = format!("celluler_links_closed_total{{reason=\"{}\"}}", r.as_str());
            assert!(sample(&text, &series).is_some(), "missing {series}");
        }
        for c in NoticeCode::ALL {
            let series = format!("celluler_notices_sent_total{{reason=\"{}\"}}", c.as_str());
            assert!(sample(&text, &series).is_some(), "missing {series}");
        }
        for r in TcpRefusal::ALL {
            let series = format!(
                "celluler_tcp_handshakes_refused_total{{reason=\"{}\"}}",
                r.as_str()
            );
            assert!(sample(&text, &series).is_some(), "missing {series}");
        }
    }

    #[test]
    fn values_add_up() {
        let m = Metrics::new();
        m.msgs_in(1, 2, 150);
        m.msgs_in(9, 1, 7); // clamped to bulk
        m.msgs_out(0, 1, 5);
        m.dropped(DropReason::FromFuture, 3);
        m.dropped(DropReason::FromFuture, 2);
        m.dedup_hits(2);
        m.link_opened(Role::Relay);
        m.link_opened(Role::Relay);
        m.link_opened(Role::Cell);
        m.link_closed(Role::Relay, CloseCode::Idle.into());
        m.link_refused(CloseReason::HandshakeFailed);
        m.batch_out(1, 1000, 250);
        m.batch_out(100, 3000, 750);
        m.signatures(10, 0);
        m.signatures(5, 2);
        m.tcp_refused(TcpRefusal::TimedOut, 3);
        m.tcp_refused(TcpRefusal::OverLimit, 1);
        m.control_dropped(Role::Relay);

        let t = m.encode();
        let s = |series: &str| sample(&t, series).unwrap_or_else(|| panic!("no {series}:\n{t}"));
        assert_eq!(s("celluler_messages_in_total{lane=\"high\"}"), 2.0);
        assert_eq!(s("celluler_bytes_in_total{lane=\"high\"}"), 150.0);
        assert_eq!(s("celluler_messages_in_total{lane=\"bulk\"}"), 1.0);
        assert_eq!(s("celluler_messages_in_total{lane=\"control\"}"), 0.0);
        assert_eq!(s("celluler_messages_out_total{lane=\"control\"}"), 1.0);
        assert_eq!(s("celluler_bytes_out_total{lane=\"control\"}"), 5.0);
        assert_eq!(s("celluler_drops_total{reason=\"from_future\"}"), 5.0);
        assert_eq!(s("celluler_drops_total{reason=\"duplicate\"}"), 0.0);
        assert_eq!(s("celluler_dedup_hits_total"), 2.0);
        assert_eq!(s("celluler_links{role=\"relay\"}"), 1.0);
        assert_eq!(s("celluler_links{role=\"cell\"}"), 1.0);
        assert_eq!(s("celluler_links_opened_total{role=\"relay\"}"), 2.0);
        assert_eq!(
            s("celluler_control_frames_dropped_total{role=\"relay\"}"),
            1.0
        );
        assert_eq!(
            s("celluler_control_frames_dropped_total{role=\"cell\"}"),
            0.0
        );
        assert_eq!(s("celluler_links_closed_total{reason=\"idle\"}"), 1.0);
        assert_eq!(
            s("celluler_links_closed_total{reason=\"handshake_failed\"}"),
            1.0
        );
        assert_eq!(s("celluler_batches_out_total"), 2.0);
        assert_eq!(s("celluler_batch_messages_count"), 2.0);
        assert_eq!(s("celluler_batch_messages_sum"), 101.0);
        assert_eq!(s("celluler_batch_messages_bucket{le=\"1\"}"), 1.0);
        assert_eq!(s("celluler_batch_messages_bucket{le=\"64\"}"), 1.0);
        assert_eq!(s("celluler_batch_messages_bucket{le=\"128\"}"), 2.0);
        assert_eq!(s("celluler_batch_messages_bucket{le=\"4096\"}"), 2.0);
        assert_eq!(s("celluler_batch_messages_bucket{le=\"+Inf\"}"), 2.0);
        assert_eq!(s("celluler_batch_raw_bytes_total"), 4000.0);
        assert_eq!(s("celluler_batch_wire_bytes_total"), 1000.0);
        assert_eq!(s("celluler_compression_ratio"), 4.0);
        assert_eq!(s("celluler_signatures_checked_total"), 15.0);
        assert_eq!(s("celluler_signatures_failed_total"), 2.0);
        let refused = |r: &str| {
            s(&format!(
                "celluler_tcp_handshakes_refused_total{{reason=\"{r}\"}}"
            ))
        };
        assert_eq!(
            (
                refused("over_limit"),
                refused("failed"),
                refused("timed_out")
            ),
            (1.0, 0.0, 3.0)
        );
    }

    #[test]
    fn compression_ratio_before_any_batch_is_one() {
        let t = Metrics::new().encode();
        assert_eq!(sample(&t, "celluler_compression_ratio"), Some(1.0));
    }

    #[test]
    fn batch_samples_are_recorded_in_the_shared_histogram() {
        let m = Metrics::new();
        m.record_time_in_relay(&[]);
        assert_eq!(m.time_in_relay_count(), 0);
        let samples: Vec<u32> = (1..=100).collect();
        m.record_time_in_relay(&samples);
        assert_eq!(m.time_in_relay_count(), 100);
        assert_eq!(m.time_in_relay_quantile(1.0), 100);
        assert!((49..=51).contains(&m.time_in_relay_quantile(0.5)));
        // Over the 60 s bound: clamped, not lost.
        m.record_time_in_relay(&[u32::MAX]);
        assert_eq!(m.time_in_relay_count(), 101);
    }

    #[test]
    fn summary_reflects_merged_values() {
        let m = Metrics::new();
        let empty = m.encode();
        assert!(empty.contains("celluler_time_in_relay_seconds{quantile=\"0.5\"} NaN\n"));
        assert_eq!(
            sample(&empty, "celluler_time_in_relay_seconds_count"),
            Some(0.0)
        );
        assert_eq!(m.time_in_relay_quantile(0.5), 0);

        // 1..=1000 µs in one local histogram, merged in two rounds.
        let mut local = Metrics::time_histogram();
        for us in 1..=500 {
            local.record(us).unwrap();
        }
        m.merge_time_in_relay(&mut local);
        assert!(local.is_empty(), "merge resets the local histogram");
        for us in 501..=1000 {
            local.record(us).unwrap();
        }
        m.merge_time_in_relay(&mut local);

        assert_eq!(m.time_in_relay_count(), 1000);
        let near = |got: u64, want: u64| got.abs_diff(want) <= want / 500 + 1;
        assert!(near(m.time_in_relay_quantile(0.5), 500));
        assert!(near(m.time_in_relay_quantile(0.99), 990));
        assert!(near(m.time_in_relay_quantile(1.0), 1000));

        let t = m.encode();
        let s = |series: &str| sample(&t, series).unwrap_or_else(|| panic!("no {series}:\n{t}"));
        assert!((s("celluler_time_in_relay_seconds{quantile=\"0.5\"}") - 0.000_5).abs() < 2e-6);
        assert!((s("celluler_time_in_relay_seconds{quantile=\"0.9\"}") - 0.000_9).abs() < 2e-6);
        assert!((s("celluler_time_in_relay_seconds{quantile=\"1\"}") - 0.001).abs() < 2e-6);
        assert_eq!(s("celluler_time_in_relay_seconds_count"), 1000.0);
        // Sum of 1..=1000 µs = 0.5005 s, within histogram precision.
        assert!((s("celluler_time_in_relay_seconds_sum") - 0.5005).abs() < 0.001);
    }

    #[test]
    fn merge_clamps_out_of_range_values() {
        let m = Metrics::new();
        let mut wide =
            hdrhistogram::Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).unwrap();
        wide.record(120_000_000).unwrap(); // two minutes
        m.merge_time_in_relay(&mut wide);
        assert!(wide.is_empty());
        assert_eq!(m.time_in_relay_count(), 1);
        let max = m.time_in_relay_quantile(1.0);
        assert!(
            (TIME_HIGH_US..=TIME_HIGH_US + TIME_HIGH_US / 500).contains(&max),
            "{max}"
        );
    }

    /// Every sample line belongs to the family named by the closest `# TYPE`
    /// line, with a suffix that type allows, and no family is declared twice.
    #[test]
    fn exposition_is_well_formed() {
        let m = Metrics::new();
        m.batch_out(2, 10, 5);
        let text = m.encode();
        let mut seen = std::collections::HashSet::new();
        let mut current: Option<(String, String)> = None;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, ty) = rest.split_once(' ').expect("TYPE line has a type");
                assert!(seen.insert(name.to_owned()), "{name} declared twice");
                assert!(
                    ["counter", "gauge", "histogram", "summary"].contains(&ty),
                    "type {ty}"
                );
                current = Some((name.to_owned(), ty.to_owned()));
                continue;
            }
            if line.starts_with('#') {
                assert!(line.starts_with("# HELP "), "{line}");
                continue;
            }
            let (family, ty) = current.as_ref().expect("sample before any TYPE");
            let name = line.split(['{', ' ']).next().unwrap();
            let allowed: &[&str] = match ty.as_str() {
                "histogram" => &["_bucket", "_sum", "_count"],
                "summary" => &["", "_sum", "_count"],
                _ => &[""],
            };
            assert!(
                allowed.iter().any(|s| name == format!("{family}{s}")),
                "sample {name} under {family} ({ty})"
            );
            let value = line.rsplit_once(' ').unwrap().1;
            assert!(
                value == "NaN" || value == "+Inf" || value.parse::<f64>().is_ok(),
                "bad value in {line}"
            );
        }
        assert!(!text.contains("# EOF"), "0.0.4 text has no EOF marker");
    }
}
