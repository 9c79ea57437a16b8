//! Log benchmark: appends/s, MB/s and time to sync (p50/p99) with group
//! commit, for each backend side by side, at 128 B and 1 KiB records.
//!
//! ```text
//! cargo run --release -p relay-storage --example log_bench -- [--secs 5] [--threads 8] [--window 64] [--dir DIR]
//! ```
//!
//! `--threads` appenders each keep up to `--window` appends in flight (an
//! append's completion frees its slot), as a relay's connections would. Time
//! to sync is from the `append` call to its completion, which runs after the
//! fdatasync covering the record. Each run uses a fresh log in a temporary
//! directory under `--dir` (default: the system temp dir). The io_uring rows
//! are skipped, with the probe's reason, where io_uring is refused.

use std::path::PathBuf;
use std::sync::mpsc::sync_channel;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use relay_storage::record::RecordKind;
use relay_storage::{BackendChoice, BackendKind, Log, LogConfig, probe_io_uring};

struct Args {
    secs: u64,
    threads: usize,
    window: usize,
    dir: PathBuf,
}

fn args() -> Args {
    let mut a = Args {
        secs: 5,
        threads: 8,
        window: 64,
        dir: std::env::temp_dir(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--secs" => a.secs = value().parse().expect("--secs N"),
            "--threads" => a.threads = value().parse().expect("--threads N"),
            "--window" => a.window = value().parse().expect("--window N"),
            "--dir" => a.dir = value().into(),
            other => panic!("unknown flag {other}; see the doc comment for usage"),
        }
    }
    a
}

struct Row {
    backend: BackendKind,
    size: usize,
    appends: u64,
    secs: f64,
    syncs: u64,
    p50_us: u64,
    p99_us: u64,
}

fn run(backend: BackendKind, size: usize, a: &Args) -> Row {
    let dir = tempfile::tempdir_in(&a.dir).expect("temp dir");
    let mut c = LogConfig::new(dir.path());
    c.backend = match backend {
        BackendKind::IoUring => BackendChoice::IoUring,
        BackendKind::Portable => BackendChoice::Portable,
    };
    c.max_bytes = 64 * 1024 * 1024 * 1024;
    let (log, _) = Log::open(c, |_, _, _| {}).expect("open log");
    let hist = Arc::new(Mutex::new(
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap(),
    ));
    let body = vec![0x5Au8; size];
    let stop = Instant::now() + Duration::from_secs(a.secs);
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..a.threads {
            let (log, hist, body) = (&log, hist.clone(), &body);
            s.spawn(move || {
                // A slot per append in flight.
                let (give, take) = sync_channel::<()>(a.window);
                for _ in 0..a.window {
                    give.send(()).unwrap();
                }
                while Instant::now() < stop {
                    take.recv().unwrap();
                    let (give, hist) = (give.clone(), hist.clone());
                    let t0 = Instant::now();
                    log.append(
                        RecordKind::Message,
                        body,
                        Box::new(move |r| {
                            r.expect("append failed");
                            let us = t0.elapsed().as_micros() as u64;
                            let _ = hist.lock().unwrap().record(us.max(1));
                            let _ = give.send(());
                        }),
                    )
                    .expect("append refused");
                }
                // Wait for this thread's appends still in flight.
                for _ in 0..a.window {
                    take.recv().unwrap();
                }
            });
        }
    });
    let secs = start.elapsed().as_secs_f64();
    let stats = log.stats();
    drop(log);
    let h = hist.lock().unwrap();
    Row {
        backend,
        size,
        appends: stats.appends,
        secs,
        syncs: stats.syncs,
        p50_us: h.value_at_quantile(0.50),
        p99_us: h.value_at_quantile(0.99),
    }
}

fn main() {
    let a = args();
    let probe = probe_io_uring();
    println!(
        "log_bench: {} threads x {} in flight, {} s per run, dir {}; io_uring: {}",
        a.threads,
        a.window,
        a.secs,
        a.dir.display(),
        probe.reason
    );
    println!(
        "{:<9} {:>6} {:>12} {:>9} {:>10} {:>11} {:>10} {:>10}",
        "backend", "record", "appends/s", "MB/s", "syncs/s", "appends/sync", "p50 us", "p99 us"
    );
    for size in [128usize, 1024] {
        for backend in [BackendKind::Portable, BackendKind::IoUring] {
            if backend == BackendKind::IoUring && !probe.available {
                println!("{backend:<9} {size:>6}  skipped: {}", probe.reason);
                continue;
            }
            let r = run(backend, size, &a);
            let rate = r.appends as f64 / r.secs;
            println!(
                "{:<9} {:>6} {:>12.0} {:>9.1} {:>10.0} {:>11.1} {:>10} {:>10}",
                r.backend.name(),
                r.size,
                rate,
                rate * r.size as f64 / 1e6,
                r.syncs as f64 / r.secs,
                r.appends as f64 / r.syncs.max(1) as f64,
                r.p50_us,
                r.p99_us
            );
        }
    }
}
