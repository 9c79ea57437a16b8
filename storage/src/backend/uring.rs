//! The io_uring writer: one ring owned by the writer thread.
//!
//! A batch is one chain of linked SQEs: a write per contiguous run, then an
//! fdatasync per file. Up to [`MAX_IN_FLIGHT`] batches are in the ring at a
//! time: the next batch is submitted once the last one's writes have
//! completed, and is written while the last one syncs. Batches are
//! answered strictly in order, each once its own fdatasync has completed.
//! While batches are in flight the writer sleeps in `io_uring_enter`, and
//! an eventfd polled through the ring wakes it when appends arrive. A short
//! write or any failed entry breaks the chain; the batch is then written and
//! synced again with plain `pwrite` + `fdatasync` (the same bytes at the
//! same offsets), whose result is final.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::{Arc, OnceLock};

use io_uring::{IoUring, opcode, squeue, types};

use super::{Batch, Probe, Shared, WriteOp, gather};
use crate::StorageError;

/// Batches in the ring at once: one syncing, one being written.
const MAX_IN_FLIGHT: usize = 2;
/// Submission queue size.
const RING_ENTRIES: u32 = 256;
/// SQEs a batch may take in the ring; a batch needing more (one spread over
/// many tiny segments) is written with plain calls instead.
const MAX_BATCH_SQES: usize = 64;
/// `user_data` of the eventfd poll.
const POLL_TAG: u64 = u64::MAX;

/// Tries a ring and a no-op through it.
pub(super) fn probe() -> Probe {
    let refused = |what: &str, e: std::io::Error| {
        let name = match e.raw_os_error() {
            Some(libc::EPERM) => "EPERM (seccomp or kernel.io_uring_disabled)",
            Some(libc::ENOSYS) => "ENOSYS (kernel without io_uring)",
            Some(libc::ENOMEM) => "ENOMEM (locked-memory limit)",
            Some(libc::EACCES) => "EACCES",
            _ => "error",
        };
        Probe {
            available: false,
            reason: format!("{what}: {name}: {e}"),
        }
    };
    let mut ring = match IoUring::new(8) {
        Ok(ring) => ring,
        Err(e) => return refused("io_uring_setup", e),
    };
    let nop = opcode::Nop::new().build().user_data(7);
    // SAFETY: a no-op references no memory.
    if unsafe { ring.submission().push(&nop) }.is_err() {
        return Probe {
            available: false,
            reason: "io_uring submission queue full on a new ring".into(),
        };
    }
    if let Err(e) = ring.submit_and_wait(1) {
        return refused("io_uring_enter", e);
    }
    match ring.completion().next() {
        Some(cqe) if cqe.result() >= 0 => Probe {
            available: true,
            reason: "io_uring available".into(),
        },
        Some(cqe) => refused(
            "io_uring nop",
            std::io::Error::from_raw_os_error(-cqe.result()),
        ),
        None => Probe {
            available: false,
            reason: "io_uring nop did not complete".into(),
        },
    }
}

/// How appenders wake a writer sleeping in the ring.
#[derive(Default)]
pub(crate) struct Wake {
    fd: OnceLock<OwnedFd>,
    parked: AtomicBool,
}

impl Wake {
    /// Writes the eventfd if the writer said it is about to sleep.
    pub(crate) fn notify(&self) {
        // Pairs with the fence in `Writer::run`: either the writer sees the
        // queued op, or this sees `parked` (Dekker's pattern).
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.parked.swap(false, Ordering::SeqCst)
            && let Some(fd) = self.fd.get()
        {
            let one = 1u64.to_ne_bytes();
            // SAFETY: an 8-byte write from a live buffer to our eventfd.
            let _ = unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), 8) };
        }
    }
}

/// A batch in the ring.
struct InFlight {
    batch: Batch,
    /// Entries not yet completed.
    pending: usize,
    /// Write entries not yet completed (its fdatasync may still run).
    writes_pending: usize,
    /// Some entry failed, was short or was cancelled.
    broken: bool,
    syncs: u64,
}

/// The writer thread's ring.
pub(crate) struct Writer {
    ring: IoUring,
    shared: Arc<Shared>,
    efd: RawFd,
}

impl Writer {
    /// Sets up the ring and the wake-up eventfd.
    pub(crate) fn new(shared: Arc<Shared>) -> Result<Self, StorageError> {
        let ring = IoUring::new(RING_ENTRIES)
            .map_err(|e| StorageError::io("io_uring_setup", std::path::Path::new(""), e))?;
        // SAFETY: plain syscall; the fd is checked and then owned.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            return Err(StorageError::io(
                "eventfd",
                std::path::Path::new(""),
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: `efd` is a new fd nobody else owns.
        let owned = unsafe { OwnedFd::from_raw_fd(efd) };
        let _ = shared.wake.fd.set(owned);
        Ok(Self { ring, shared, efd })
    }

    /// Runs until every sender of `rx` is gone and every batch is answered.
    pub(crate) fn run(mut self, rx: Receiver<WriteOp>) {
        let mut in_flight: VecDeque<InFlight> = VecDeque::new();
        // Sequence number of `in_flight[0]`; batch tags in user_data.
        let mut front_tag: u64 = 0;
        let mut carry: Option<WriteOp> = None;
        let mut closed = false;
        let mut poll_armed = false;
        loop {
            // Take new appends while there is room in the ring.
            // A batch is submitted only once the writes before it have
            // completed, so records reach the page cache in log order and a
            // crash leaves at most a torn tail, never a hole before records.
            let can_take = |in_flight: &VecDeque<InFlight>| {
                in_flight.len() < MAX_IN_FLIGHT && in_flight.iter().all(|f| f.writes_pending == 0)
            };
            while !closed && can_take(&in_flight) {
                let first = match carry.take() {
                    Some(op) => op,
                    None => match rx.try_recv() {
                        Ok(op) => op,
                        Err(TryRecvError::Empty) => break,
                        Err(TryRecvError::Disconnected) => {
                            closed = true;
                            break;
                        }
                    },
                };
                let batch = Batch::new(gather(&rx, first, &mut carry));
                let tag = front_tag + in_flight.len() as u64;
                if let Some(f) = self.submit(batch, tag) {
                    in_flight.push_back(f);
                }
            }
            if in_flight.is_empty() {
                if closed {
                    return;
                }
                // Idle: sleep on the channel itself.
                match rx.recv() {
                    Ok(op) => carry = Some(op),
                    Err(_) => closed = true,
                }
                continue;
            }
            let want_wake = !closed && can_take(&in_flight);
            if want_wake && !poll_armed {
                let poll = opcode::PollAdd::new(types::Fd(self.efd), libc::POLLIN as u32)
                    .build()
                    .user_data(POLL_TAG);
                // SAFETY: the eventfd outlives the ring (both owned here and
                // in `shared`); a poll references no buffer.
                if unsafe { self.ring.submission().push(&poll) }.is_ok() {
                    poll_armed = true;
                }
            }
            if want_wake {
                self.shared.wake.parked.store(true, Ordering::SeqCst);
                std::sync::atomic::fence(Ordering::SeqCst);
                // An append queued before `parked` was set sent no wake-up.
                if carry.is_none() {
                    match rx.try_recv() {
                        Ok(op) => carry = Some(op),
                        Err(TryRecvError::Disconnected) => closed = true,
                        Err(TryRecvError::Empty) => {}
                    }
                }
            }
            // With an append already in hand, only submit and reap.
            let wait = usize::from(carry.is_none());
            if let Err(e) = self.ring.submit_and_wait(wait) {
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR | libc::EBUSY | libc::EAGAIN)
                ) {
                    continue;
                }
                // The ring itself is unusable. Its entries may still
                // reference the batches' buffers, so those are leaked, never
                // freed; the waiters hear that nothing was made durable.
                let reason = format!("io_uring_enter: {e}");
                for f in in_flight.drain(..) {
                    let Batch { ops, runs } = f.batch;
                    std::mem::forget(runs);
                    Batch {
                        ops,
                        runs: Vec::new(),
                    }
                    .finish(Err(reason.clone()), &self.shared, 0);
                }
                front_tag = 0;
                continue;
            }
            self.shared.wake.parked.store(false, Ordering::Release);
            for cqe in self.ring.completion() {
                let tag = cqe.user_data();
                if tag == POLL_TAG {
                    poll_armed = false;
                    let mut buf = [0u8; 8];
                    // SAFETY: an 8-byte read into a live buffer from our
                    // non-blocking eventfd.
                    let _ = unsafe { libc::read(self.efd, buf.as_mut_ptr().cast(), 8) };
                    continue;
                }
                let batch_tag = tag >> 16;
                let Some(f) = batch_tag
                    .checked_sub(front_tag)
                    .and_then(|i| in_flight.get_mut(i as usize))
                else {
                    continue;
                };
                f.pending -= 1;
                let entry = (tag & 0xFFFF) as usize;
                if entry < f.batch.runs.len() {
                    f.writes_pending -= 1;
                }
                let res = cqe.result();
                let ok = match f.batch.runs.get(entry) {
                    Some(run) => res >= 0 && res as usize == run.buf.len(),
                    None => res >= 0,
                };
                if !ok {
                    f.broken = true;
                }
            }
            while in_flight.front().is_some_and(|f| f.pending == 0) {
                let Some(f) = in_flight.pop_front() else {
                    break;
                };
                front_tag += 1;
                if f.broken {
                    fallback(f.batch, &self.shared);
                } else {
                    f.batch.finish(Ok(()), &self.shared, f.syncs);
                }
            }
        }
    }

    /// Pushes a batch's chain and submits it; `None` if it was answered at
    /// once (log failed, or written with plain calls).
    fn submit(&mut self, batch: Batch, tag: u64) -> Option<InFlight> {
        if self.shared.failed.get().is_some() {
            batch.finish(Err(String::new()), &self.shared, 0);
            return None;
        }
        let files = batch.files();
        let entries = batch.runs.len() + files.len();
        if entries > MAX_BATCH_SQES {
            fallback(batch, &self.shared);
            return None;
        }
        let free = {
            let sq = self.ring.submission();
            sq.capacity() - sq.len()
        };
        if free < entries && self.ring.submit().is_err() {
            fallback(batch, &self.shared);
            return None;
        }
        let mut sqes = Vec::with_capacity(entries);
        for (i, run) in batch.runs.iter().enumerate() {
            let write = opcode::Write::new(
                types::Fd(run.file.as_raw_fd()),
                run.buf.as_ptr(),
                run.buf.len() as u32,
            )
            .offset(run.offset)
            .build()
            .flags(squeue::Flags::IO_LINK)
            .user_data(tag << 16 | i as u64);
            sqes.push(write);
        }
        for (j, file) in files.iter().enumerate() {
            let mut sync = opcode::Fsync::new(types::Fd(file.as_raw_fd()))
                .flags(types::FsyncFlags::DATASYNC)
                .build()
                .user_data(tag << 16 | (batch.runs.len() + j) as u64);
            if j + 1 < files.len() {
                sync = sync.flags(squeue::Flags::IO_LINK);
            }
            sqes.push(sync);
        }
        // SAFETY: every buffer and fd referenced lives in `batch`, which is
        // kept in `in_flight` until all its entries have completed.
        if unsafe { self.ring.submission().push_multiple(&sqes) }.is_err() {
            fallback(batch, &self.shared);
            return None;
        }
        let _ = self.ring.submit();
        Some(InFlight {
            pending: entries,
            writes_pending: batch.runs.len(),
            broken: false,
            syncs: files.len() as u64,
            batch,
        })
    }
}

/// Writes and syncs a batch with plain calls; the result is final.
fn fallback(batch: Batch, shared: &Shared) {
    shared
        .plain_batches
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut result = Ok(());
    for run in &batch.runs {
        if let Err(e) = run.file.write_all_at(&run.buf, run.offset) {
            result = Err(format!("write: {e}"));
            break;
        }
    }
    let mut syncs = 0;
    if result.is_ok() {
        for file in batch.files() {
            syncs += 1;
            if let Err(e) = file.sync_data() {
                result = Err(format!("fdatasync: {e}"));
                break;
            }
        }
    }
    batch.finish(result, shared, syncs);
}
