//! Measurements: HDR latency histograms, and CPU and memory of processes
//! from `/proc` (Linux).

use hdrhistogram::Histogram;
use std::time::Instant;

/// Highest latency a histogram records (one hour, in ns); longer ones are
/// clamped to it.
const HIST_MAX_NS: u64 = 3_600_000_000_000;

/// A latency histogram in nanoseconds, 3 significant digits.
pub fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIST_MAX_NS, 3).expect("valid histogram bounds")
}

/// Records `ns` (at least 1, at most one hour).
#[inline]
pub fn record(h: &mut Histogram<u64>, ns: u64) {
    h.saturating_record(ns.clamp(1, HIST_MAX_NS));
}

/// Percentiles of a latency histogram, in microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest.
    pub max: f64,
    /// Mean.
    pub mean: f64,
    /// Samples.
    pub count: u64,
}

impl Percentiles {
    /// The percentiles of `h` (ns), in µs rounded to 0.1 µs.
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        let us = |ns: u64| round1(ns as f64 / 1000.0);
        Self {
            p50: us(h.value_at_quantile(0.5)),
            p90: us(h.value_at_quantile(0.9)),
            p99: us(h.value_at_quantile(0.99)),
            p999: us(h.value_at_quantile(0.999)),
            max: us(h.max()),
            mean: round1(h.mean() / 1000.0),
            count: h.len(),
        }
    }
}

/// `x` rounded to one decimal.
pub fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// Clock ticks per second of `/proc/*/stat` times.
fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// utime + stime of a process (all its threads) in clock ticks; `None`
/// for this process. `None` if it cannot be read (no such process).
pub fn cpu_ticks(pid: Option<u32>) -> Option<u64> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/stat"),
        None => "/proc/self/stat".to_owned(),
    };
    let stat = std::fs::read_to_string(path).ok()?;
    // The command name (field 2) may hold spaces; fields after it are
    // plain. After ") ": state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut f = rest.split_whitespace().skip(11);
    let utime: u64 = f.next()?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    Some(utime + stime)
}

/// A field of `/proc/PID/status` in KiB (e.g. `VmRSS`, `VmHWM`); `None`
/// for this process.
pub fn status_kib(pid: Option<u32>, field: &str) -> Option<u64> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/status"),
        None => "/proc/self/status".to_owned(),
    };
    let status = std::fs::read_to_string(path).ok()?;
    status.lines().find_map(|l| {
        let v = l.strip_prefix(field)?.strip_prefix(':')?;
        v.trim().trim_end_matches("kB").trim().parse().ok()
    })
}

/// `MemAvailable` of the machine in KiB.
pub fn mem_available_kib() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    info.lines().find_map(|l| {
        let v = l.strip_prefix("MemAvailable:")?;
        v.trim().trim_end_matches("kB").trim().parse().ok()
    })
}

/// CPU of the relay (if its pid is known) and of this process at one
/// moment.
#[derive(Clone, Copy, Debug)]
pub struct CpuSample {
    at: Instant,
    relay: Option<u64>,
    bench: Option<u64>,
}

impl CpuSample {
    /// Samples now.
    pub fn take(relay_pid: Option<u32>) -> Self {
        Self {
            at: Instant::now(),
            relay: relay_pid.and_then(|p| cpu_ticks(Some(p))),
            bench: cpu_ticks(None),
        }
    }

    /// Samples now, the relay's CPU summed over several processes (the
    /// relays of a mesh); unknown if any of them is.
    pub fn take_all(relay_pids: &[u32]) -> Self {
        let relay = if relay_pids.is_empty() {
            None
        } else {
            relay_pids.iter().map(|&p| cpu_ticks(Some(p))).sum()
        };
        Self {
            at: Instant::now(),
            relay,
            bench: cpu_ticks(None),
        }
    }

    /// What one clock tick is, in CPU %, over the span from `self` to
    /// `later`: the resolution of [`CpuSample::pct_until`] (10 ms ticks
    /// make ±1 % over a second, ±10 % over 0.1 s).
    pub fn tick_pct_until(&self, later: &CpuSample) -> f64 {
        let wall = later.at.duration_since(self.at).as_secs_f64().max(0.01);
        100.0 / clk_tck() / wall
    }

    /// (relay %, bench %) between `self` and a later sample; 100 % is one
    /// core. `None` where unknown or the span is under 10 ms.
    pub fn pct_until(&self, later: &CpuSample) -> (Option<f64>, Option<f64>) {
        let wall = later.at.duration_since(self.at).as_secs_f64();
        if wall < 0.01 {
            return (None, None);
        }
        let tck = clk_tck();
        let pct = |a: Option<u64>, b: Option<u64>| {
            Some(round1(b?.saturating_sub(a?) as f64 / tck / wall * 100.0))
        };
        (pct(self.relay, later.relay), pct(self.bench, later.bench))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_proc_entries() {
        assert!(cpu_ticks(None).is_some());
        assert!(status_kib(None, "VmRSS").unwrap() > 0);
        assert!(status_kib(None, "VmHWM").unwrap() > 0);
        assert!(mem_available_kib().unwrap() > 0);
        assert_eq!(cpu_ticks(Some(u32::MAX)), None);
    }

    #[test]
    fn percentiles_are_ordered_and_in_us() {
        let mut h = new_hist();
        for v in 1..=1000u64 {
            record(&mut h, v * 1000);
        }
        let p = Percentiles::of(&h);
        assert!((p.p50 - 500.0).abs() < 1.0, "{p:?}");
        assert!(p.p50 <= p.p90 && p.p90 <= p.p99 && p.p99 <= p.p999 && p.p999 <= p.max);
        assert_eq!(p.count, 1000);
        assert_eq!(Percentiles::of(&new_hist()), Percentiles::default());
    }
}
