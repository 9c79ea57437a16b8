//! What a run reports: the JSON file, the human table, the HDR percentile
//! distribution (`.hgrm`) and an SVG plot of it.

use crate::stats::Percentiles;
use anyhow::{Context as _, Result, anyhow};
use hdrhistogram::Histogram;
use serde::Serialize;
use std::fmt::Write as _;
use std::path::Path;

/// One run's results. Keys every mode has come first; mode-specific ones
/// are left out of the JSON when they do not apply, except the CPU and
/// memory keys, which are `null` when unknown.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    /// throughput, latency, fanout or connections.
    pub mode: String,
    /// The server measured: `relay`, or `nats` (nats-server through
    /// async-nats).
    pub broker: String,
    /// `spawned` or `attached`.
    pub target: String,
    /// The server's address: the relay's `KEY@HOST:PORT`, or nats-server's
    /// `HOST:PORT`.
    pub relay: String,
    /// How the senders and receivers reached the relay: `quic` or `tcp`
    /// (none with `--broker nats`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transport: Option<String>,
    /// How many relays the run measured (`--relays N`; 1 unless a mesh;
    /// none with `--broker nats`). `relay` is then the first one's address;
    /// CPU and memory are summed over all of them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relays: Option<u32>,
    /// The mesh's shape (`line`, `ring`, `square`) with `--relays N` > 1.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub topology: Option<String>,
    /// The server's version, where it says (nats-server does).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_version: Option<String>,
    /// Payload bytes per message.
    pub size: usize,
    /// Sending cells.
    pub senders: usize,
    /// Receiving cells.
    pub receivers: usize,
    /// link or signed (`none` for nats).
    pub auth: String,
    /// random or text.
    pub payload: String,
    /// The lane messages were sent on (`none` for nats).
    pub lane: String,
    /// Messages handed to the client after the warm-up.
    pub sent: u64,
    /// Deliveries counted by the receivers, one by one (for fanout: every
    /// receiver's copy), after the warm-up.
    pub received: u64,
    /// Expected deliveries that did not arrive within the grace period,
    /// receiver by receiver.
    pub lost: u64,
    /// Deliveries beyond what each receiver expected (a message delivered
    /// twice): 0 unless the server duplicates; counted in `received`.
    pub duplicates: u64,
    /// First measured send to last receive.
    pub secs: f64,
    /// received / secs.
    pub msgs_per_s: f64,
    /// msgs_per_s × size, in 10^6 bytes per second.
    pub mb_per_s: f64,
    /// One-way latency (receive time − actual send time), µs.
    pub p50_us: f64,
    /// 90th percentile, µs.
    pub p90_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
    /// 99.9th percentile, µs.
    pub p999_us: f64,
    /// Largest, µs.
    pub max_us: f64,
    /// Mean, µs.
    pub mean_us: f64,
    /// Coordinated-omission-corrected latency (receive time − intended
    /// send time on the --rate schedule), µs; latency mode only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub co_p50_us: Option<f64>,
    /// Corrected 90th percentile.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub co_p90_us: Option<f64>,
    /// Corrected 99th percentile.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub co_p99_us: Option<f64>,
    /// Corrected 99.9th percentile.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub co_p999_us: Option<f64>,
    /// Corrected largest.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub co_max_us: Option<f64>,
    /// The server's CPU (the relay's, or nats-server's) from the end of
    /// the warm-up to the last delivery (utime+stime; 100 = one core);
    /// null without the server's pid.
    pub relay_cpu_pct: Option<f64>,
    /// This process's CPU over the same span.
    pub bench_cpu_pct: Option<f64>,
    /// The server's largest resident memory (VmRSS sampled every 25 ms)
    /// from the end of the warm-up to the end of the run, KiB; null without
    /// its pid. Connections mode: its VmHWM (peak over its life).
    pub relay_peak_rss_kib: Option<u64>,
    /// Warm-up before measuring, seconds.
    pub warmup_s: f64,
    /// Messages sent during the warm-up (not counted above).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warmup_sent: Option<u64>,
    /// Warm-up messages received (not counted above).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warmup_received: Option<u64>,
    /// What the senders and receivers were: `cell` (full client Cells),
    /// `raw` (bare links encoding and decoding batches in place) or
    /// `async-nats` (`--broker nats`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    /// With raw receivers: QUIC statistics of each relay -> receiver link
    /// as the receiver saw it at the end (rtt, cwnd, lost packets,
    /// congestion events, datagrams).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raw_links: Option<Vec<crate::raw::LinkStats>>,
    /// Unpaced modes: the in-flight window per sender, if one was set
    /// (absent: open loop).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window: Option<u64>,
    /// Latency mode: the paced rate asked for, msg/s.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate: Option<f64>,
    /// Latency mode: the largest number of messages sent in one pacing
    /// tick (shows how much the pacer stalled).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_burst: Option<u64>,
    /// Fanout mode: broadcast or service.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fanout_target: Option<String>,
    /// Messages the relay dropped during the whole run, warm-up included,
    /// from its metrics (`celluler_drops_total`, every reason; spawned
    /// relays only; in a mesh, summed over every relay).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relay_dropped: Option<u64>,
    /// Messages the server took in during the whole run, warm-up included,
    /// from its own counters (relay: `celluler_messages_in_total`;
    /// nats-server: `/varz` `in_msgs`); spawned servers only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_msgs_in: Option<u64>,
    /// Messages the server handed to receivers during the whole run,
    /// warm-up included (`celluler_messages_out_total`; `out_msgs`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_msgs_out: Option<u64>,
    /// The relay's own time in relay (ingress to egress queueing), median,
    /// µs, from its metrics over its life (for a spawned relay: this run,
    /// warm-up included; spawned relays only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relay_time_p50_us: Option<f64>,
    /// The same, 99th percentile.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relay_time_p99_us: Option<f64>,
    /// `durable`: time from queueing a message to the relay's ack that it
    /// is logged and synced, median, µs (warm-up messages included).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ack_p50_us: Option<f64>,
    /// The same, 99th percentile.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ack_p99_us: Option<f64>,
    /// The same, largest.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ack_max_us: Option<f64>,
    /// `durable`: messages the relay acknowledged as stored (by report time).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub durable_acked: Option<u64>,
    /// `durable`: messages the relay refused (log full or failed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub durable_refused: Option<u64>,
    /// Notices from the relay about sent messages: dropped for a slow
    /// receiver.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub notices_slow_receiver: Option<u64>,
    /// Notices: unknown destination.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub notices_unknown_destination: Option<u64>,
    /// Notices: refused (expired, replayed, bad signature) or TTL expired.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub notices_refused: Option<u64>,
    /// `--broker nats`: messages a subscription could queue in async-nats
    /// before it dropped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nats_sub_capacity: Option<usize>,
    /// `--broker nats`: slow-consumer events async-nats reported (each
    /// drops at least one message).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nats_slow_consumers: Option<u64>,
    /// Connections mode: cells attached.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cells: Option<u64>,
    /// Connections mode: cells asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cells_requested: Option<u64>,
    /// Connections mode: attach attempts that failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attach_failed: Option<u64>,
    /// Connections mode: cells attached per second.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attach_per_s: Option<f64>,
    /// Connections mode: (relay RSS after − before) / cells, bytes; null
    /// without the relay's pid.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relay_rss_per_cell_bytes: Option<Option<f64>>,
    /// Connections mode: the relay's RSS before attaching, KiB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relay_rss_before_kib: Option<u64>,
    /// Connections mode: the relay's RSS with every cell attached, KiB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relay_rss_after_kib: Option<u64>,
    /// Connections mode: relay CPU while the cells sat idle after
    /// attaching (keep-alives), %.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relay_idle_cpu_pct: Option<f64>,
    /// Connections mode: this process's RSS growth per cell, bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bench_rss_per_cell_bytes: Option<f64>,
    /// Why the run stopped before doing all it was asked, if it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stopped_early: Option<String>,
    /// relay-bench version.
    pub bench_version: String,
}

impl Report {
    /// Sets the one-way latency fields.
    pub fn set_latency(&mut self, p: &Percentiles) {
        self.p50_us = p.p50;
        self.p90_us = p.p90;
        self.p99_us = p.p99;
        self.p999_us = p.p999;
        self.max_us = p.max;
        self.mean_us = p.mean;
    }

    /// Sets the coordinated-omission-corrected fields.
    pub fn set_corrected(&mut self, p: &Percentiles) {
        self.co_p50_us = Some(p.p50);
        self.co_p90_us = Some(p.p90);
        self.co_p99_us = Some(p.p99);
        self.co_p999_us = Some(p.p999);
        self.co_max_us = Some(p.max);
    }
}

/// Writes `report` as pretty JSON to `path`.
pub fn write_json(path: &Path, report: &Report) -> Result<()> {
    let mut s = serde_json::to_string_pretty(report)?;
    s.push('\n');
    std::fs::write(path, s).with_context(|| format!("writing the JSON report {}", path.display()))
}

/// `n` with a k/M suffix.
pub fn human(n: f64) -> String {
    if n >= 1e6 {
        format!("{:.2} M", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.1} k", n / 1e3)
    } else {
        format!("{n:.0}")
    }
}

fn kib(k: u64) -> String {
    if k >= 1 << 20 {
        format!("{:.2} GiB", k as f64 / (1u64 << 20) as f64)
    } else {
        format!("{:.1} MiB", k as f64 / 1024.0)
    }
}

fn pct(p: Option<f64>, hint: &str) -> String {
    p.map(|v| format!("{v:.1} %"))
        .unwrap_or_else(|| format!("unknown (pass {hint})"))
}

/// The human table for a message run (not connections).
pub fn table(r: &Report, notes: &[String]) -> String {
    let mut s = String::new();
    let shape = match r.mode.as_str() {
        "fanout" => format!(
            "1 sender -> {} receivers by {}",
            r.receivers,
            r.fanout_target.as_deref().unwrap_or("?")
        ),
        _ => format!(
            "{} sender{} -> {} receiver{}",
            r.senders,
            plural(r.senders),
            r.receivers,
            plural(r.receivers)
        ),
    };
    let nats = r.broker == "nats";
    if nats {
        let _ = writeln!(
            s,
            "relay-bench {} against nats-server: {shape}, {} B {} payloads",
            r.mode, r.size, r.payload
        );
        let _ = writeln!(
            s,
            "server: nats-server {} at {} ({}); senders and receivers: async-nats clients \
             (subscription queue {})",
            r.server_version.as_deref().unwrap_or("(version unknown)"),
            r.relay,
            r.target,
            r.nats_sub_capacity.unwrap_or(0)
        );
    } else {
        let _ = writeln!(
            s,
            "relay-bench {}: {shape}, {} B {} payloads, lane {}, auth {}",
            r.mode, r.size, r.payload, r.lane, r.auth
        );
        let _ = writeln!(
            s,
            "relay: {} ({}, over {}); senders and receivers: {}",
            r.relay,
            r.target,
            r.transport.as_deref().unwrap_or("quic"),
            match r.client.as_deref() {
                Some("raw") => "raw links (no Cell)",
                _ => "client Cells",
            }
        );
        if let (Some(n), Some(t)) = (r.relays, r.topology.as_deref()) {
            let _ = writeln!(
                s,
                "mesh: {n} relays, {t}; senders on the first (above), receivers on the last; \
                 relay CPU, RSS and drops summed over all {n}, in/out counters the first's"
            );
        }
    }
    let _ = writeln!(s);
    let mut rows: Vec<(&str, String)> = vec![
        ("sent", format!("{}", r.sent)),
        (
            "received",
            format!("{} (counted by the receivers)", r.received),
        ),
        ("lost", format!("{}", r.lost)),
    ];
    if r.duplicates > 0 {
        rows.push((
            "duplicates",
            format!(
                "{} (delivered more than once; counted in received)",
                r.duplicates
            ),
        ));
    }
    rows.push((
        "time",
        format!("{:.3} s (first measured send to last receive)", r.secs),
    ));
    rows.push((
        "delivered",
        format!("{} msg/s   {:.1} MB/s", human(r.msgs_per_s), r.mb_per_s),
    ));
    if let Some(w) = r.window {
        rows.push((
            "window",
            format!("at most {w} messages in flight per sender (closed loop)"),
        ));
    }
    if let Some(rate) = r.rate {
        rows.push((
            "paced at",
            format!(
                "{} msg/s (largest burst per tick: {})",
                human(rate),
                r.max_burst.unwrap_or(0)
            ),
        ));
    }
    let (server, hint) = if nats {
        ("nats-server", "--nats-pid")
    } else {
        ("relay", "--relay-pid")
    };
    let cpu_label = if nats { "nats-server CPU" } else { "relay CPU" };
    rows.push((cpu_label, pct(r.relay_cpu_pct, hint)));
    rows.push(("bench CPU", pct(r.bench_cpu_pct, hint)));
    rows.push((
        if nats {
            "nats-server peak RSS"
        } else {
            "relay peak RSS"
        },
        r.relay_peak_rss_kib
            .map(|k| format!("{} (sampled every 25 ms while measuring)", kib(k)))
            .unwrap_or_else(|| format!("unknown (pass {hint})")),
    ));
    if r.warmup_s > 0.0 {
        rows.push((
            "warm-up",
            format!(
                "{:.1} s; its {} messages sent ({} received) are left out of every figure \
                 here but the {server}'s own counters below",
                r.warmup_s,
                r.warmup_sent.unwrap_or(0),
                r.warmup_received.unwrap_or(0)
            ),
        ));
    }
    if let (Some(i), Some(o)) = (r.server_msgs_in, r.server_msgs_out) {
        rows.push((
            if nats {
                "nats-server counted"
            } else {
                "relay counted"
            },
            format!("{i} in, {o} out (its own counters, whole run)"),
        ));
    }
    if let Some(e) = r.nats_slow_consumers {
        rows.push(("slow consumers", format!("{e} (async-nats events)")));
    }
    let notices = [
        ("slow receiver", r.notices_slow_receiver),
        ("unknown destination", r.notices_unknown_destination),
        ("refused", r.notices_refused),
    ];
    let drops: Vec<String> = notices
        .iter()
        .filter_map(|(n, v)| v.filter(|v| *v > 0).map(|v| format!("{n} {v}")))
        .collect();
    match r.relay_dropped {
        Some(d) if d > 0 || !drops.is_empty() => rows.push((
            "relay drops",
            format!(
                "{d} (its metrics, whole run); notices: {}",
                drops.join(", ")
            ),
        )),
        Some(_) => rows.push(("relay drops", "0 (its metrics, whole run)".into())),
        None if !drops.is_empty() => {
            rows.push(("relay drops", format!("notices: {}", drops.join(", "))))
        }
        None => {}
    }
    push_rows(&mut s, &rows);
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "  {:<16}{:>10}{:>10}{:>10}{:>10}{:>10}{:>10}",
        "latency (us)", "p50", "p90", "p99", "p99.9", "max", "mean"
    );
    let _ = writeln!(
        s,
        "  {:<16}{:>10.1}{:>10.1}{:>10.1}{:>10.1}{:>10.1}{:>10.1}",
        "one-way", r.p50_us, r.p90_us, r.p99_us, r.p999_us, r.max_us, r.mean_us
    );
    if let Some(p50) = r.co_p50_us {
        let f = |v: Option<f64>| v.unwrap_or(0.0);
        let _ = writeln!(
            s,
            "  {:<16}{:>10.1}{:>10.1}{:>10.1}{:>10.1}{:>10.1}{:>10}",
            "co-corrected",
            p50,
            f(r.co_p90_us),
            f(r.co_p99_us),
            f(r.co_p999_us),
            f(r.co_max_us),
            ""
        );
    }
    if let (Some(a), Some(b)) = (r.relay_time_p50_us, r.relay_time_p99_us) {
        let _ = writeln!(
            s,
            "  {:<16}{:>10.1}{:>10}{:>10.1}   (the relay's own metric over its life, ingress \
             to egress)",
            "in relay", a, "", b
        );
    }
    for n in notes {
        let _ = writeln!(s, "\nnote: {n}");
    }
    s
}

/// The human table for a connections run.
pub fn connections_table(r: &Report, notes: &[String]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "relay-bench connections: {} idle cells",
        r.cells.unwrap_or(0)
    );
    let _ = writeln!(
        s,
        "relay: {} ({}, over {})",
        r.relay,
        r.target,
        r.transport.as_deref().unwrap_or("quic")
    );
    let _ = writeln!(s);
    let per_cell = r.relay_rss_per_cell_bytes.flatten();
    let rows: Vec<(&str, String)> = vec![
        (
            "attached",
            format!(
                "{} of {} ({} failed)",
                r.cells.unwrap_or(0),
                r.cells_requested.unwrap_or(0),
                r.attach_failed.unwrap_or(0)
            ),
        ),
        (
            "attach rate",
            format!(
                "{} cells/s over {:.3} s",
                human(r.attach_per_s.unwrap_or(0.0)),
                r.secs
            ),
        ),
        (
            "relay RSS",
            match (r.relay_rss_before_kib, r.relay_rss_after_kib) {
                (Some(b), Some(a)) => format!("{} before, {} with the cells", kib(b), kib(a)),
                _ => "unknown (pass --relay-pid)".into(),
            },
        ),
        (
            "relay per cell",
            per_cell
                .map(|b| format!("{:.1} KiB", b / 1024.0))
                .unwrap_or_else(|| "unknown".into()),
        ),
        (
            "bench per cell",
            r.bench_rss_per_cell_bytes
                .map(|b| format!("{:.1} KiB", b / 1024.0))
                .unwrap_or_else(|| "unknown".into()),
        ),
        (
            "relay CPU",
            format!("{} while attaching", pct(r.relay_cpu_pct, "--relay-pid")),
        ),
        (
            "relay idle CPU",
            format!(
                "{} with the cells attached",
                pct(r.relay_idle_cpu_pct, "--relay-pid")
            ),
        ),
        (
            "bench CPU",
            format!("{} while attaching", pct(r.bench_cpu_pct, "--relay-pid")),
        ),
        (
            "relay peak RSS",
            r.relay_peak_rss_kib
                .map(kib)
                .unwrap_or_else(|| "unknown".into()),
        ),
    ];
    push_rows(&mut s, &rows);
    if let Some(why) = &r.stopped_early {
        let _ = writeln!(s, "\nstopped early: {why}");
    }
    for n in notes {
        let _ = writeln!(s, "\nnote: {n}");
    }
    s
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

fn push_rows(s: &mut String, rows: &[(&str, String)]) {
    let w = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (k, v) in rows {
        let _ = writeln!(s, "  {k:<w$}   {v}");
    }
}

/// Significant digits of the bench's histograms.
const SIGFIG: usize = 3;

/// The percentile distribution of `h` (values in ns) in HdrHistogram's
/// text format (`.hgrm`), values in microseconds, 5 ticks per half
/// distance, as `outputPercentileDistribution` writes it.
pub fn hgrm(h: &Histogram<u64>) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        "{:>12} {:>14} {:>10} {:>14}\n\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    let mut total = 0u64;
    if !h.is_empty() {
        for v in h.iter_quantiles(5) {
            total += v.count_since_last_iteration();
            let value = v.value_iterated_to() as f64 / 1000.0;
            let q = v.quantile_iterated_to();
            if q < 1.0 {
                let _ = writeln!(
                    s,
                    "{value:>12.SIGFIG$} {q:>2.12} {total:>10} {:>14.2}",
                    1.0 / (1.0 - q)
                );
            } else {
                let _ = writeln!(s, "{value:>12.SIGFIG$} {q:>2.12} {total:>10}");
            }
        }
    }
    let sub_buckets = (2.0 * 10f64.powi(SIGFIG as i32)).log2().ceil().exp2() as u64;
    let _ = writeln!(
        s,
        "#[Mean    = {:>12.SIGFIG$}, StdDeviation   = {:>12.SIGFIG$}]",
        h.mean() / 1000.0,
        h.stdev() / 1000.0
    );
    let _ = writeln!(
        s,
        "#[Max     = {:>12.SIGFIG$}, Total count    = {:>12}]",
        h.max() as f64 / 1000.0,
        h.len()
    );
    let _ = writeln!(
        s,
        "#[Buckets = {:>12}, SubBuckets     = {:>12}]",
        h.buckets(),
        sub_buckets
    );
    s
}

/// Writes [`hgrm`] of `h` to `path`.
pub fn write_hgrm(path: &Path, h: &Histogram<u64>) -> Result<()> {
    std::fs::write(path, hgrm(h))
        .with_context(|| format!("writing the percentile distribution {}", path.display()))
}

/// (1/(1-q), µs) points of the percentile distribution, the last one at
/// `x_end` with the maximum.
fn curve(h: &Histogram<u64>, x_end: f64) -> Vec<(f64, f64)> {
    let mut pts = Vec::new();
    if h.is_empty() {
        return pts;
    }
    for v in h.iter_quantiles(5) {
        let q = v.quantile_iterated_to();
        let us = v.value_iterated_to() as f64 / 1000.0;
        if q < 1.0 {
            let x = 1.0 / (1.0 - q);
            if x <= x_end {
                pts.push((x, us));
            }
        }
    }
    pts.push((x_end, h.max() as f64 / 1000.0));
    pts
}

/// The percentile a point of the log axis stands for, as a label.
fn percentile_label(x: f64) -> String {
    let p = 100.0 * (1.0 - 1.0 / x);
    if p <= 0.0 {
        "0%".into()
    } else {
        let digits = (x.log10().round() as i32 - 2).max(0) as usize;
        format!("{p:.digits$}%")
    }
}

/// Plots the latency percentile distribution of each `(name, histogram)`
/// to an SVG file: x is the percentile on a log scale of 1/(1-percentile)
/// (so 90 %, 99 %, 99.9 % are evenly spaced), y the latency in µs.
pub fn write_plot(path: &Path, title: &str, curves: &[(&str, &Histogram<u64>)]) -> Result<()> {
    use plotters::prelude::*;
    let count = curves
        .iter()
        .map(|(_, h)| h.len())
        .max()
        .unwrap_or(0)
        .max(10);
    // One decade past what the sample count can resolve, at most 10^7.
    let x_end = 10f64.powi(((count as f64).log10().ceil() as i32).clamp(1, 7));
    let series: Vec<(&str, Vec<(f64, f64)>)> =
        curves.iter().map(|(n, h)| (*n, curve(h, x_end))).collect();
    let ys = || series.iter().flat_map(|(_, p)| p.iter().map(|(_, y)| *y));
    // Latency spans decades: log scale on y too, a decade around the data.
    let y_max = 10f64.powf(ys().fold(1.0f64, f64::max).log10().ceil());
    let y_min = 10f64
        .powf(ys().fold(f64::INFINITY, f64::min).max(0.1).log10().floor())
        .min(y_max / 10.0);
    let err = |e: &dyn std::fmt::Display| anyhow!("drawing the plot {}: {e}", path.display());
    let root = SVGBackend::new(path, (960, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(70)
        .build_cartesian_2d((1.0f64..x_end).log_scale(), (y_min..y_max).log_scale())
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("percentile (log scale of 1/(1-percentile))")
        .y_desc("latency (µs, log scale)")
        .x_label_formatter(&|x| percentile_label(*x))
        .y_label_formatter(&|y| {
            if *y >= 1.0 {
                format!("{y:.0}")
            } else {
                format!("{y}")
            }
        })
        .draw()
        .map_err(|e| err(&e))?;
    let colors = [BLUE, RED, GREEN, MAGENTA];
    for (i, (name, pts)) in series.into_iter().enumerate() {
        let c = colors[i % colors.len()];
        chart
            .draw_series(LineSeries::new(pts, c.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::{new_hist, record};

    fn sample() -> Histogram<u64> {
        let mut h = new_hist();
        for i in 1..=10_000u64 {
            record(&mut h, 20_000 + i * 37);
        }
        h
    }

    #[test]
    fn hgrm_has_the_standard_layout() {
        let text = hgrm(&sample());
        let mut lines = text.lines();
        let head: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
        assert_eq!(
            head,
            ["Value", "Percentile", "TotalCount", "1/(1-Percentile)"]
        );
        assert_eq!(lines.next(), Some(""));
        let rows: Vec<Vec<f64>> = lines
            .take_while(|l| !l.starts_with('#'))
            .map(|l| l.split_whitespace().map(|v| v.parse().unwrap()).collect())
            .collect();
        assert!(rows.len() > 20);
        assert!(
            rows.windows(2)
                .all(|w| w[0][0] <= w[1][0] && w[0][1] <= w[1][1])
        );
        assert_eq!(rows.last().unwrap().len(), 3);
        assert_eq!(rows.last().unwrap()[1], 1.0);
        assert_eq!(rows.last().unwrap()[2], 10_000.0);
        assert!(text.contains("#[Max     ="));
    }

    #[test]
    fn plot_is_an_svg() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("p.svg");
        let h = sample();
        write_plot(&p, "test", &[("one-way", &h), ("corrected", &h)]).unwrap();
        let svg = std::fs::read_to_string(&p).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.contains("99.9%"),
            "{}",
            &svg[..200]
        );
    }

    #[test]
    fn labels() {
        assert_eq!(percentile_label(1.0), "0%");
        assert_eq!(percentile_label(10.0), "90%");
        assert_eq!(percentile_label(100.0), "99%");
        assert_eq!(percentile_label(1000.0), "99.9%");
        assert_eq!(human(2_580_000.0), "2.58 M");
    }
}
