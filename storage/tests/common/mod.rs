//! Helpers shared by the storage test suites.
#![allow(dead_code)]

use std::path::Path;

use relay_storage::log::RecoveryReport;
use relay_storage::record::RecordKind;
use relay_storage::{BackendChoice, BackendKind, Log, LogConfig, RecordLocation, probe_io_uring};

/// The choice that runs `kind`, or `None` (with the reason printed) when
/// io_uring is refused here.
pub fn backend_or_skip(kind: BackendKind, test: &str) -> Option<BackendChoice> {
    match kind {
        BackendKind::Portable => Some(BackendChoice::Portable),
        BackendKind::IoUring => {
            let probe = probe_io_uring();
            if probe.available {
                Some(BackendChoice::IoUring)
            } else {
                println!("SKIPPED {test} on io_uring: {}", probe.reason);
                None
            }
        }
    }
}

/// A config for `dir` with small segments, so tests span several.
pub fn config(dir: &Path, backend: BackendChoice) -> LogConfig {
    let mut c = LogConfig::new(dir);
    c.segment_bytes = 64 * 1024;
    c.max_bytes = 64 * 1024 * 1024;
    c.backend = backend;
    c
}

/// A record recovered by a scan: location, kind and body.
pub type Recovered = Vec<(RecordLocation, RecordKind, Vec<u8>)>;

/// Opens the log and collects every record the scan recovers.
pub fn open_collect(c: &LogConfig) -> (Log, RecoveryReport, Recovered) {
    let mut got = Vec::new();
    let (log, report) = Log::open(c.clone(), |loc, kind, body| {
        got.push((loc, kind, body.to_vec()))
    })
    .unwrap();
    (log, report, got)
}

/// A body that names its index, so a recovered record can be checked.
pub fn body(i: u64, len: usize) -> Vec<u8> {
    let mut b = i.to_le_bytes().to_vec();
    b.extend((0..len.saturating_sub(8)).map(|j| (i as usize + j) as u8 | 1));
    b
}
