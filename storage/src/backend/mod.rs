//! The writer thread behind a [`Log`](crate::Log), in two kinds.
//!
//! Appends reach the writer on a bounded channel, already encoded and placed
//! (segment and offset chosen by the appender under the log's lock). The
//! writer takes everything queued as one batch (bounded by
//! [`MAX_BATCH_OPS`] and [`MAX_BATCH_BYTES`]), writes it, issues one
//! fdatasync per segment file the batch touched, and only then answers every
//! waiter of the batch: group commit. While a batch syncs, the next appends
//! queue up and form the next batch.
//!
//! - [`BackendKind::Portable`]: std files, `pwrite` of each contiguous run
//!   (`write_all_at`) then `fdatasync`, one batch at a time.
//! - [`BackendKind::IoUring`]: one ring owned by the writer thread; a batch
//!   is submitted as linked writes and an fdatasync, and the next batch is
//!   written while the last one syncs. Not tokio-uring (no release or
//!   maintainer since 2024, current-thread runtimes only, panics where
//!   io_uring is refused): the `io-uring` crate, with [`probe_io_uring`]
//!   deciding at open whether it may be used.

use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;

use crate::StorageError;
use crate::log::{Completion, RecordLocation};

mod portable;
#[cfg(target_os = "linux")]
mod uring;

/// Most appends in one batch.
pub const MAX_BATCH_OPS: usize = 4096;
/// Most bytes in one batch (a batch always takes at least one append).
pub const MAX_BATCH_BYTES: usize = 4 * 1024 * 1024;

/// Which writer a log runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendKind {
    /// io_uring: linked writes and one fdatasync per batch, pipelined.
    IoUring,
    /// std files: `pwrite` and `fdatasync`, one batch at a time.
    Portable,
}

impl BackendKind {
    /// Short name for logs and reports: `io_uring` or `portable`.
    pub const fn name(self) -> &'static str {
        match self {
            Self::IoUring => "io_uring",
            Self::Portable => "portable",
        }
    }
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What the configuration asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendChoice {
    /// The default backend ([`DEFAULT_BACKEND`]) when [`probe_io_uring`]
    /// allows it, the portable one otherwise.
    #[default]
    Auto,
    /// io_uring, or an error at open if it is refused.
    IoUring,
    /// The portable backend.
    Portable,
}

/// The backend [`BackendChoice::Auto`] picks where io_uring is allowed: the
/// faster one on the benchmark machine (see docs/BENCHMARKS.md, storage).
pub const DEFAULT_BACKEND: BackendKind = BackendKind::IoUring;

/// What [`probe_io_uring`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// Whether a ring could be set up and used.
    pub available: bool,
    /// Why, in words for the relay's start line (the errno when refused).
    pub reason: String,
}

/// Tries to set up a small io_uring and run a no-op through it.
///
/// EPERM (a seccomp profile or `kernel.io_uring_disabled`), ENOSYS (no
/// io_uring in the kernel) and ENOMEM (locked-memory limit) are the usual
/// refusals in containers; every refusal is reported with its errno.
pub fn probe_io_uring() -> Probe {
    #[cfg(target_os = "linux")]
    {
        uring::probe()
    }
    #[cfg(not(target_os = "linux"))]
    {
        Probe {
            available: false,
            reason: "io_uring is Linux only".into(),
        }
    }
}

/// Resolves a choice to the backend to run and the reason, for the report.
pub(crate) fn resolve(choice: BackendChoice) -> Result<(BackendKind, String), StorageError> {
    match choice {
        BackendChoice::Portable => Ok((BackendKind::Portable, "configured".into())),
        BackendChoice::IoUring => {
            let p = probe_io_uring();
            if p.available {
                Ok((BackendKind::IoUring, "configured".into()))
            } else {
                Err(StorageError::BadConfig(format!(
                    "backend io_uring configured but refused: {}",
                    p.reason
                )))
            }
        }
        BackendChoice::Auto => {
            let p = probe_io_uring();
            if !p.available {
                Ok((
                    BackendKind::Portable,
                    format!("io_uring refused: {}", p.reason),
                ))
            } else {
                Ok((
                    DEFAULT_BACKEND,
                    format!("io_uring available; {DEFAULT_BACKEND} is the default"),
                ))
            }
        }
    }
}

/// One encoded record, placed, on its way to disk.
pub(crate) struct WriteOp {
    /// The segment file it goes to.
    pub file: Arc<File>,
    /// Where it goes and what it is.
    pub loc: RecordLocation,
    /// The encoded record, header included.
    pub bytes: Vec<u8>,
    /// Answered after the fdatasync covering it.
    pub done: Completion,
}

/// Counters and state the log and its writer share.
#[derive(Default)]
pub(crate) struct Shared {
    pub appends: AtomicU64,
    pub syncs: AtomicU64,
    pub batches: AtomicU64,
    pub bytes_written: AtomicU64,
    /// Batches the io_uring writer redid with plain calls.
    pub plain_batches: AtomicU64,
    /// Highest sequence number covered by a completed fdatasync.
    pub synced_seq: AtomicU64,
    /// Set once by the writer when a write or sync fails.
    pub failed: OnceLock<String>,
    /// Wakes an io_uring writer blocked in the kernel; unused by the
    /// portable one.
    #[cfg(target_os = "linux")]
    pub wake: uring::Wake,
}

impl Shared {
    /// Called by an appender after queueing an op.
    pub fn notify(&self) {
        #[cfg(target_os = "linux")]
        self.wake.notify();
    }
}

/// A contiguous stretch of one segment written by one write call.
pub(crate) struct Run {
    pub file: Arc<File>,
    pub offset: u64,
    pub buf: Vec<u8>,
}

/// A batch: the appends it answers and the runs that write them.
pub(crate) struct Batch {
    pub ops: Vec<WriteOp>,
    pub runs: Vec<Run>,
}

impl Batch {
    /// Coalesces `ops` (in log order) into runs of contiguous bytes.
    pub fn new(mut ops: Vec<WriteOp>) -> Self {
        let mut runs: Vec<Run> = Vec::new();
        for op in &mut ops {
            let offset = op.loc.offset;
            if let Some(run) = runs.last_mut()
                && Arc::ptr_eq(&run.file, &op.file)
                && run.offset + run.buf.len() as u64 == offset
            {
                run.buf.extend_from_slice(&op.bytes);
                continue;
            }
            runs.push(Run {
                file: op.file.clone(),
                offset,
                buf: std::mem::take(&mut op.bytes),
            });
        }
        Self { ops, runs }
    }

    /// Distinct files the batch wrote, each to be synced once.
    pub fn files(&self) -> Vec<Arc<File>> {
        let mut files: Vec<Arc<File>> = Vec::new();
        for run in &self.runs {
            if !files.iter().any(|f| Arc::ptr_eq(f, &run.file)) {
                files.push(run.file.clone());
            }
        }
        files
    }

    /// Answers every waiter: with its location once synced, or the failure
    /// (which also stops the log accepting appends).
    pub fn finish(self, result: Result<(), String>, shared: &Shared, syncs: u64) {
        shared.syncs.fetch_add(syncs, Ordering::Relaxed);
        shared.batches.fetch_add(1, Ordering::Relaxed);
        match result {
            Ok(()) => {
                let bytes: usize = self.runs.iter().map(|r| r.buf.len()).sum();
                shared
                    .bytes_written
                    .fetch_add(bytes as u64, Ordering::Relaxed);
                if let Some(last) = self.ops.last() {
                    shared.synced_seq.fetch_max(last.loc.seq, Ordering::AcqRel);
                }
                for op in self.ops {
                    (op.done)(Ok(op.loc));
                }
            }
            Err(reason) => {
                let _ = shared.failed.set(reason);
                let reason = shared.failed.get().cloned().unwrap_or_default();
                for op in self.ops {
                    (op.done)(Err(StorageError::WriterFailed(reason.clone())));
                }
            }
        }
    }
}

/// Takes up to a batch from `rx`: blocks for the first op unless
/// `carry` holds one, then takes what is queued without waiting.
pub(crate) fn gather(
    rx: &Receiver<WriteOp>,
    first: WriteOp,
    carry: &mut Option<WriteOp>,
) -> Vec<WriteOp> {
    let mut bytes = first.bytes.len();
    let mut ops = vec![first];
    while ops.len() < MAX_BATCH_OPS {
        let Ok(op) = rx.try_recv() else { break };
        if bytes + op.bytes.len() > MAX_BATCH_BYTES {
            *carry = Some(op);
            break;
        }
        bytes += op.bytes.len();
        ops.push(op);
    }
    ops
}

/// Starts the writer thread of `kind`.
pub(crate) fn spawn(
    kind: BackendKind,
    rx: Receiver<WriteOp>,
    shared: Arc<Shared>,
) -> Result<JoinHandle<()>, StorageError> {
    let name = format!("relay-log-{}", kind.name());
    let builder = std::thread::Builder::new().name(name);
    let spawned = match kind {
        BackendKind::Portable => builder.spawn(move || portable::run(rx, &shared)),
        #[cfg(target_os = "linux")]
        BackendKind::IoUring => {
            let ring = uring::Writer::new(shared.clone())?;
            builder.spawn(move || ring.run(rx))
        }
        #[cfg(not(target_os = "linux"))]
        BackendKind::IoUring => {
            return Err(StorageError::BadConfig("io_uring is Linux only".into()));
        }
    };
    spawned.map_err(|e| StorageError::io("spawn writer", std::path::Path::new(""), e))
}
