//! Durable store-and-forward storage for the Celluler relay.
//!
//! A durable message is appended to the relay's log before it is acknowledged
//! to the previous hop, and leaves the log only once the next hop has
//! acknowledged it (see "Durable store-and-forward" in the design notes).
//!
//! - [`record`]: the on-disk record format — a 20-byte header (magic, kind,
//!   flags, body length, CRC-32, sequence number) and a body of at most
//!   [`record::MAX_RECORD_BODY`] bytes.
//! - [`recovery`]: [`recovery::scan`] (the valid prefix of a buffer) and
//!   [`recovery::scan_segment`], which skips a corrupt record in the middle
//!   and tells a torn tail apart from it.
//! - [`log`]: [`Log`], an append-only log of preallocated segment files with
//!   group commit (a waiter is answered once an fdatasync covers its record,
//!   never before), a recovery scan on open, a bound on its size on disk,
//!   compaction by whole segments and one `flock` per directory.
//! - [`backend`]: the writer thread behind the log — io_uring (linked writes
//!   and one fdatasync per batch, the next batch written while the last one
//!   syncs) or portable (`pwrite` + `fdatasync`) — and [`backend::probe_io_uring`].
//! - [`index`]: [`RetryIndex`], per-destination, per-lane retry queues of
//!   record locations and the dedup window's message ids, rebuilt from the
//!   log on open.
//!
//! Decoding arbitrary bytes never panics and never allocates: a record borrows
//! its body from the input, and a length over the bound is refused as soon as
//! the length field has been read.
//!
//! ```
//! use relay_storage::record::{RecordKind, decode_record, encode_record};
//! use relay_storage::recovery::{StopReason, scan};
//!
//! let mut log = Vec::new();
//! encode_record(1, RecordKind::Message, b"hello", &mut log).unwrap();
//! encode_record(2, RecordKind::Ack, b"", &mut log).unwrap();
//!
//! let (rec, used) = decode_record(&log).unwrap().unwrap();
//! assert_eq!((rec.seq, rec.kind, rec.body), (1, RecordKind::Message, &b"hello"[..]));
//!
//! // A crash in the middle of the second append leaves a torn tail.
//! let outcome = scan(&log[..log.len() - 3]);
//! assert_eq!(outcome.valid_len, used);
//! assert_eq!(outcome.stop, StopReason::TornTail);
//! ```

#![warn(missing_docs)]

pub mod backend;
pub mod index;
pub mod log;
pub mod record;
pub mod recovery;
mod segment;

pub use backend::{BackendChoice, BackendKind, Probe, probe_io_uring};
pub use index::{DurableMessage, LANES, MessageId, RetryIndex};

pub use log::{Completion, Log, LogConfig, LogStats, RecordLocation, RecoveryReport};

/// Why a record could not be encoded or decoded.
///
/// Every decoder and every log operation in this crate returns one of these
/// instead of panicking.
#[derive(thiserror::Error, Debug)]
#[non_exhaustive]
pub enum StorageError {
    /// A body to encode is longer than [`record::MAX_RECORD_BODY`].
    #[error("record body is {len} bytes, over the limit of {max}")]
    BodyTooLarge {
        /// Length of the body offered.
        len: usize,
        /// The bound in force ([`record::MAX_RECORD_BODY`]).
        max: usize,
    },
    /// The bytes at the start of a record are not [`record::MAGIC`].
    #[error("bad record magic")]
    BadMagic,
    /// A header's length field is over [`record::MAX_RECORD_BODY`].
    #[error("record length field is {len}, over the limit of {max}")]
    LengthOverBound {
        /// The length field as read.
        len: u32,
        /// The bound in force ([`record::MAX_RECORD_BODY`]).
        max: usize,
    },
    /// The stored CRC does not match the header and body.
    #[error("record CRC mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    CrcMismatch {
        /// CRC stored in the header.
        stored: u32,
        /// CRC computed over the bytes read.
        computed: u32,
    },
    /// A record with a valid CRC names a kind this build does not know.
    #[error("unknown record kind {0}")]
    UnknownKind(u8),
    /// A record with a valid CRC sets flag bits this build does not know.
    #[error("unknown record flags {0:#04x}")]
    UnknownFlags(u8),
    /// A file operation on the log failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done ("open", "fallocate", "fdatasync", ...).
        op: &'static str,
        /// The file or directory concerned.
        path: std::path::PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// Another process (or another [`Log`] in this one) holds the log
    /// directory's lock.
    #[error("log directory {0} is locked by another process")]
    Locked(std::path::PathBuf),
    /// The log is at its configured bound (`storage.max_bytes`): the append
    /// is refused and nothing already logged is touched.
    #[error("durable log full: {used} bytes on disk, limit storage.max_bytes = {max_bytes}")]
    Full {
        /// Bytes of segment files on disk now.
        used: u64,
        /// The configured bound.
        max_bytes: u64,
    },
    /// The file system has no room for a new segment (ENOSPC while
    /// preallocating it): the append is refused and nothing already logged
    /// is touched.
    #[error("no space left on device for a new log segment in {0}")]
    DiskFull(std::path::PathBuf),
    /// A record (header included) is larger than a segment.
    #[error("record of {len} bytes does not fit a segment of {segment_bytes} bytes")]
    RecordTooLarge {
        /// Encoded length of the record.
        len: usize,
        /// The configured segment size.
        segment_bytes: u64,
    },
    /// A write or fdatasync failed; the log accepts no more appends and the
    /// records not yet synced were not acknowledged.
    #[error("log writer failed: {0}")]
    WriterFailed(String),
    /// The log's configuration is inconsistent.
    #[error("bad log configuration: {0}")]
    BadConfig(String),
    /// A message record's body is not a valid durable message.
    #[error("bad durable message body: {0}")]
    BadMessage(&'static str),
    /// A location names no segment of this log (compacted or never written).
    #[error("no such record: segment {segment}, offset {offset}")]
    NoSuchRecord {
        /// Segment id.
        segment: u64,
        /// Byte offset in the segment.
        offset: u64,
    },
}

impl StorageError {
    /// An [`StorageError::Io`] for `op` on `path`.
    pub(crate) fn io(op: &'static str, path: &std::path::Path, source: std::io::Error) -> Self {
        Self::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}

#[cfg(test)]
mod alloc_count {
    //! A counting global allocator for the test build only, so that tests can
    //! check that refusing an oversize length allocates nothing.

    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    thread_local! {
        static ALLOCS: Cell<usize> = const { Cell::new(0) };
    }

    struct Counting;

    // SAFETY: forwards every call to `System` unchanged; only counts.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
            // SAFETY: same contract as our caller's.
            unsafe { System.alloc(layout) }
        }
        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
            // SAFETY: same contract as our caller's.
            unsafe { System.alloc_zeroed(layout) }
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
            // SAFETY: same contract as our caller's.
            unsafe { System.realloc(ptr, layout, new_size) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            // SAFETY: same contract as our caller's.
            unsafe { System.dealloc(ptr, layout) }
        }
    }

    #[global_allocator]
    static GLOBAL: Counting = Counting;

    /// Number of allocations (including reallocations) made by this thread
    /// while running `f`.
    pub(crate) fn allocations_during<R>(f: impl FnOnce() -> R) -> (R, usize) {
        let before = ALLOCS.with(Cell::get);
        let r = f();
        let after = ALLOCS.with(Cell::get);
        (r, after - before)
    }
}
