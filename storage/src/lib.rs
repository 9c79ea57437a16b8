//! Durable store-and-forward storage for the Celluler relay.
//!
//! A durable message is appended to the relay's log before it is acknowledged
//! to the previous hop, and leaves the log only once the next hop has
//! acknowledged it (see "Durable store-and-forward" in the design notes). This
//! crate will hold that log: segment files of CRC-checked records with group
//! commit, an io_uring backend and a portable one, compaction, and the
//! per-destination retry queues.
//!
//! This first piece is pure, with no file I/O:
//!
//! - [`record`]: the on-disk record format — a 20-byte header (magic, kind,
//!   flags, body length, CRC-32, sequence number) and a body of at most
//!   [`record::MAX_RECORD_BODY`] bytes — with [`record::encode_record`] and
//!   [`record::decode_record`].
//! - [`recovery`]: [`recovery::scan`], which walks a segment's bytes and stops
//!   at the first torn or corrupt record, so that recovery can truncate the
//!   segment to the valid prefix.
//!
//! Decoding arbitrary bytes never panics and never allocates: a record borrows
//! its body from the input, and a length over the bound is refused as soon as
//! the length field has been read.
//!
//! What comes next: segment files and their rotation, the writer thread with
//! group commit (io_uring where the kernel allows it, `pwritev` + `fdatasync`
//! otherwise), compaction of acknowledged records, and the retry queues.
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

pub mod record;
pub mod recovery;

/// Why a record could not be encoded or decoded.
///
/// Every decoder in this crate returns one of these instead of panicking. The
/// enum is non-exhaustive: later pieces (segment files, backends) add variants.
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
