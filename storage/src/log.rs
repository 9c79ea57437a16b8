//! The append-only log: preallocated segment files of CRC-checked records,
//! written by one writer thread with group commit.
//!
//! An append is encoded and placed (sequence number, segment, offset) under
//! the log's lock, then queued to the writer on a bounded channel
//! ([`LogConfig::queue_capacity`]; a full queue blocks the appender, which is
//! the log's backpressure). Its [`Completion`] runs once an fdatasync that
//! covers the record has returned, never before; one fdatasync covers every
//! record of a batch.
//!
//! On [`Log::open`] every segment is scanned ([`scan_segment`]): a corrupt
//! record is reported and skipped, every other record is handed to the
//! caller's visitor, and a torn tail (an append interrupted by a crash) is
//! reported with the number of bytes cut and zeroed on disk. Appends resume
//! after the last valid record of the newest segment.
//!
//! Space: segments of [`LogConfig::segment_bytes`] are allocated whole when
//! created, and the files never exceed [`LogConfig::max_bytes`] in total.
//! Message records may fill all but one segment's worth, so that
//! acknowledgements (which let compaction free space) still fit when the log
//! is full of messages. Over the bound an append is refused with
//! [`StorageError::Full`]; ENOSPC while allocating is
//! [`StorageError::DiskFull`]; nothing already logged is touched.
//!
//! Compaction is by whole segments: [`Log::remove_segments`] deletes sealed
//! segments that the caller (see [`crate::RetryIndex::removable_segments`])
//! found to hold only acknowledged or expired records.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{SyncSender, sync_channel};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use crate::StorageError;
use crate::backend::{self, BackendChoice, BackendKind, Shared, WriteOp};
use crate::record::{HEADER_LEN, MAX_RECORD_BODY, RecordKind, decode_record, encode_record};
use crate::recovery::{CorruptReason, scan_segment};
use crate::segment;

/// Called once per append, on the writer thread: with the record's location
/// after an fdatasync covering it returned, or with the reason it was not
/// made durable. Keep it short (send on a channel, wake a task): it delays
/// the answers to the rest of its batch.
pub type Completion = Box<dyn FnOnce(Result<RecordLocation, StorageError>) + Send + 'static>;

/// Where a record lives in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RecordLocation {
    /// Id of the segment file.
    pub segment: u64,
    /// Byte offset of the record's header in the segment.
    pub offset: u64,
    /// Encoded length, header included.
    pub len: u32,
    /// The record's sequence number (strictly increasing along the log).
    pub seq: u64,
}

/// How a log is set up. [`LogConfig::new`] gives the defaults.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// Directory of the segment files and the lock; created if missing.
    pub dir: PathBuf,
    /// Size of each preallocated segment file (default 64 MiB; at least
    /// 4 KiB and at most 4 GiB). A record must fit in one segment.
    pub segment_bytes: u64,
    /// Bound on the segment files' total size (`storage.max_bytes`, default
    /// 1 GiB; at least two segments).
    pub max_bytes: u64,
    /// Which writer to run.
    pub backend: BackendChoice,
    /// Appends queued to the writer at most (default 8192); a full queue
    /// blocks appenders.
    pub queue_capacity: usize,
}

impl LogConfig {
    /// The defaults, for a log in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            segment_bytes: 64 * 1024 * 1024,
            max_bytes: 1024 * 1024 * 1024,
            backend: BackendChoice::Auto,
            queue_capacity: 8192,
        }
    }
}

/// A corrupt stretch skipped by recovery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CorruptRecord {
    /// Segment id.
    pub segment: u64,
    /// Byte offset of the stretch.
    pub offset: u64,
    /// Bytes skipped (to the next valid record).
    pub len: u64,
    /// What was wrong with the record that started there.
    pub reason: CorruptReason,
}

/// A torn tail cut by recovery: the bytes of an interrupted append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TornTail {
    /// Segment id.
    pub segment: u64,
    /// Where the cut starts (the end of the last valid record).
    pub offset: u64,
    /// Bytes cut (zeroed on disk).
    pub bytes_cut: u64,
}

/// What [`Log::open`] found and chose, for the relay's start line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveryReport {
    /// The writer running.
    pub backend: BackendKind,
    /// Why that writer (configured, or the io_uring probe's answer).
    pub backend_reason: String,
    /// Segment files found.
    pub segments: usize,
    /// Valid records recovered (handed to the visitor).
    pub records: u64,
    /// Corrupt records skipped, each reported.
    pub corrupt: Vec<CorruptRecord>,
    /// Torn tails cut.
    pub torn: Vec<TornTail>,
}

impl std::fmt::Display for RecoveryReport {
    /// One line for the relay's start line: the writer and why, and what
    /// recovery found.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let cut: u64 = self.torn.iter().map(|t| t.bytes_cut).sum();
        write!(
            f,
            "durable log: backend {} ({}); {} segments, {} records recovered, {} corrupt records skipped, torn tail: {} bytes cut",
            self.backend,
            self.backend_reason,
            self.segments,
            self.records,
            self.corrupt.len(),
            cut
        )
    }
}

/// Counters of a running log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LogStats {
    /// Appends accepted since open.
    pub appends: u64,
    /// fdatasync calls since open.
    pub syncs: u64,
    /// Batches written since open.
    pub batches: u64,
    /// Record bytes written and synced since open.
    pub bytes_written: u64,
    /// Batches the io_uring writer wrote with plain calls instead (a short
    /// write or a failed entry in the ring); always 0 for the portable one.
    pub plain_batches: u64,
    /// Bytes of segment files on disk.
    pub bytes_on_disk: u64,
    /// Segment files on disk.
    pub segments: usize,
}

/// A segment on disk.
struct SegmentMeta {
    file: Arc<File>,
    capacity: u64,
}

/// The segment appends go to.
struct Active {
    id: u64,
    file: Arc<File>,
    offset: u64,
    capacity: u64,
}

struct State {
    /// `None` once the log is closing.
    tx: Option<SyncSender<WriteOp>>,
    next_seq: u64,
    next_segment: u64,
    active: Option<Active>,
    segments: BTreeMap<u64, SegmentMeta>,
    bytes_on_disk: u64,
}

/// An open log; see the module documentation. Appends may come from any
/// number of threads.
pub struct Log {
    config: LogConfig,
    backend: BackendKind,
    state: Mutex<State>,
    shared: Arc<Shared>,
    writer: Option<JoinHandle<()>>,
    /// Holds the directory's `flock` while open.
    _lock: File,
}

impl std::fmt::Debug for Log {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Log")
            .field("dir", &self.config.dir)
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

impl Log {
    /// Opens (or creates) the log in `config.dir`, scans every segment and
    /// calls `visit` with each valid record, oldest first, then starts the
    /// writer.
    ///
    /// Fails with [`StorageError::Locked`] if another process holds the
    /// directory, [`StorageError::BadConfig`] for bad sizes or an io_uring
    /// backend that is refused, [`StorageError::Io`] on file errors.
    pub fn open(
        config: LogConfig,
        mut visit: impl FnMut(RecordLocation, RecordKind, &[u8]),
    ) -> Result<(Self, RecoveryReport), StorageError> {
        check_config(&config)?;
        let dir = config.dir.clone();
        std::fs::create_dir_all(&dir).map_err(|e| StorageError::io("create_dir", &dir, e))?;
        let lock = segment::lock_dir(&dir)?;
        let (backend, backend_reason) = backend::resolve(config.backend)?;

        let ids = segment::list_segments(&dir)?;
        let mut report = RecoveryReport {
            backend,
            backend_reason,
            segments: ids.len(),
            records: 0,
            corrupt: Vec::new(),
            torn: Vec::new(),
        };
        let mut segments = BTreeMap::new();
        let mut last_seq = None;
        let mut bytes_on_disk = 0;
        let mut active = None;
        for (i, &id) in ids.iter().enumerate() {
            let file = segment::open_segment(&dir, id)?;
            let path = segment::segment_path(&dir, id);
            let buf = std::fs::read(&path).map_err(|e| StorageError::io("read", &path, e))?;
            let scan = scan_segment(&buf, last_seq);
            for (seq, range) in &scan.records {
                if let Ok(Some((rec, _))) = decode_record(&buf[range.clone()]) {
                    let loc = RecordLocation {
                        segment: id,
                        offset: range.start as u64,
                        len: range.len() as u32,
                        seq: *seq,
                    };
                    visit(loc, rec.kind, rec.body);
                    report.records += 1;
                    last_seq = Some(*seq);
                }
            }
            report
                .corrupt
                .extend(scan.corrupt.iter().map(|c| CorruptRecord {
                    segment: id,
                    offset: c.offset as u64,
                    len: c.len as u64,
                    reason: c.reason,
                }));
            if scan.torn_bytes > 0 {
                // Zero the torn bytes so that appends after them (and the
                // next scan) never see them.
                let zeros = vec![0u8; scan.torn_bytes];
                file.write_all_at(&zeros, scan.data_end as u64)
                    .and_then(|()| file.sync_data())
                    .map_err(|e| StorageError::io("zero torn tail", &path, e))?;
                report.torn.push(TornTail {
                    segment: id,
                    offset: scan.data_end as u64,
                    bytes_cut: scan.torn_bytes as u64,
                });
            }
            let capacity = buf.len() as u64;
            bytes_on_disk += capacity;
            let file = Arc::new(file);
            if i + 1 == ids.len() {
                active = Some(Active {
                    id,
                    file: file.clone(),
                    offset: scan.data_end as u64,
                    capacity,
                });
            }
            segments.insert(id, SegmentMeta { file, capacity });
        }

        let shared = Arc::new(Shared::default());
        shared
            .synced_seq
            .store(last_seq.unwrap_or(0), Ordering::Release);
        let (tx, rx) = sync_channel(config.queue_capacity);
        let writer = backend::spawn(backend, rx, shared.clone())?;
        let state = State {
            tx: Some(tx),
            next_seq: last_seq.map_or(1, |s| s + 1),
            next_segment: ids.last().map_or(1, |id| id + 1),
            active,
            segments,
            bytes_on_disk,
        };
        Ok((
            Self {
                config,
                backend,
                state: Mutex::new(state),
                shared,
                writer: Some(writer),
                _lock: lock,
            },
            report,
        ))
    }

    /// The writer this log runs.
    pub fn backend(&self) -> BackendKind {
        self.backend
    }

    /// The log's directory.
    pub fn dir(&self) -> &Path {
        &self.config.dir
    }

    /// The configuration the log was opened with.
    pub fn config(&self) -> &LogConfig {
        &self.config
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the state consistent (every
        // update is a single assignment after the fallible steps).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends a record; `done` runs once it is synced (or failed).
    ///
    /// Refused at once, without calling `done`, with
    /// [`StorageError::Full`] / [`StorageError::DiskFull`] when a new segment
    /// is needed and there is no room, [`StorageError::RecordTooLarge`] /
    /// [`StorageError::BodyTooLarge`] for an oversize record, and
    /// [`StorageError::WriterFailed`] after a write error. Blocks while the
    /// writer's queue is full.
    pub fn append(
        &self,
        kind: RecordKind,
        body: &[u8],
        done: Completion,
    ) -> Result<(), StorageError> {
        let len = HEADER_LEN + body.len();
        if body.len() > MAX_RECORD_BODY {
            return Err(StorageError::BodyTooLarge {
                len: body.len(),
                max: MAX_RECORD_BODY,
            });
        }
        if len as u64 > self.config.segment_bytes {
            return Err(StorageError::RecordTooLarge {
                len,
                segment_bytes: self.config.segment_bytes,
            });
        }
        if let Some(reason) = self.shared.failed.get() {
            return Err(StorageError::WriterFailed(reason.clone()));
        }
        let mut st = self.state();
        let fits = st
            .active
            .as_ref()
            .is_some_and(|a| a.offset + len as u64 <= a.capacity);
        if !fits {
            self.rotate(&mut st, kind)?;
        }
        let seq = st.next_seq;
        let Some(active) = st.active.as_mut() else {
            unreachable!("rotate leaves an active segment");
        };
        let loc = RecordLocation {
            segment: active.id,
            offset: active.offset,
            len: len as u32,
            seq,
        };
        let mut bytes = Vec::with_capacity(len);
        encode_record(seq, kind, body, &mut bytes)?;
        let file = active.file.clone();
        active.offset += len as u64;
        st.next_seq += 1;
        let Some(tx) = st.tx.as_ref() else {
            return Err(StorageError::WriterFailed("log closed".into()));
        };
        // Sent under the lock so that the writer sees appends in log order.
        tx.send(WriteOp {
            file,
            loc,
            bytes,
            done,
        })
        .map_err(|_| StorageError::WriterFailed("writer thread gone".into()))?;
        drop(st);
        self.shared.appends.fetch_add(1, Ordering::Relaxed);
        self.shared.notify();
        Ok(())
    }

    /// Appends a record and waits until it is synced.
    pub fn append_wait(
        &self,
        kind: RecordKind,
        body: &[u8],
    ) -> Result<RecordLocation, StorageError> {
        let (tx, rx) = sync_channel(1);
        self.append(
            kind,
            body,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        )?;
        rx.recv()
            .unwrap_or_else(|_| Err(StorageError::WriterFailed("writer thread gone".into())))
    }

    /// Seals the active segment and creates the next one, within the bound.
    fn rotate(&self, st: &mut State, kind: RecordKind) -> Result<(), StorageError> {
        let seg = self.config.segment_bytes;
        let limit = match kind {
            RecordKind::Ack => self.config.max_bytes,
            RecordKind::Message => self.config.max_bytes - seg,
        };
        if st.bytes_on_disk + seg > limit {
            return Err(StorageError::Full {
                used: st.bytes_on_disk,
                max_bytes: self.config.max_bytes,
            });
        }
        let id = st.next_segment;
        let file = Arc::new(segment::create_segment(&self.config.dir, id, seg)?);
        st.next_segment += 1;
        st.bytes_on_disk += seg;
        st.segments.insert(
            id,
            SegmentMeta {
                file: file.clone(),
                capacity: seg,
            },
        );
        st.active = Some(Active {
            id,
            file,
            offset: 0,
            capacity: seg,
        });
        Ok(())
    }

    /// Reads back the body of the record at `loc` (as logged; its CRC is
    /// checked). Meant for records already synced.
    pub fn read(&self, loc: &RecordLocation) -> Result<Vec<u8>, StorageError> {
        let file = {
            let st = self.state();
            match st.segments.get(&loc.segment) {
                Some(meta) => meta.file.clone(),
                None => {
                    return Err(StorageError::NoSuchRecord {
                        segment: loc.segment,
                        offset: loc.offset,
                    });
                }
            }
        };
        let mut buf = vec![0u8; loc.len as usize];
        let path = segment::segment_path(&self.config.dir, loc.segment);
        file.read_exact_at(&mut buf, loc.offset)
            .map_err(|e| StorageError::io("read", &path, e))?;
        match decode_record(&buf)? {
            Some((rec, used)) if used == buf.len() && rec.seq == loc.seq => Ok(rec.body.to_vec()),
            _ => Err(StorageError::NoSuchRecord {
                segment: loc.segment,
                offset: loc.offset,
            }),
        }
    }

    /// Ids of the segments on disk, oldest first, and the active one (which
    /// compaction never removes).
    pub fn segments(&self) -> (Vec<u64>, Option<u64>) {
        let st = self.state();
        (
            st.segments.keys().copied().collect(),
            st.active.as_ref().map(|a| a.id),
        )
    }

    /// Deletes the given sealed segments (compaction) and syncs the
    /// directory; returns the bytes freed. The active segment and unknown
    /// ids are skipped. The caller decides which segments hold only
    /// acknowledged or expired records ([`crate::RetryIndex::removable_segments`]).
    pub fn remove_segments(&self, ids: &[u64]) -> Result<u64, StorageError> {
        let mut st = self.state();
        let active = st.active.as_ref().map(|a| a.id);
        let mut freed = 0;
        for &id in ids {
            if Some(id) == active {
                continue;
            }
            if let Some(meta) = st.segments.remove(&id) {
                segment::remove_segment(&self.config.dir, id)?;
                st.bytes_on_disk -= meta.capacity;
                freed += meta.capacity;
            }
        }
        drop(st);
        if freed > 0 {
            segment::sync_dir(&self.config.dir)?;
        }
        Ok(freed)
    }

    /// Highest sequence number an fdatasync has covered (0 before the
    /// first): it passes a record's sequence number before that record's
    /// completion runs.
    pub fn synced_seq(&self) -> u64 {
        self.shared.synced_seq.load(Ordering::Acquire)
    }

    /// Counters since open, and the space on disk now.
    pub fn stats(&self) -> LogStats {
        let st = self.state();
        LogStats {
            appends: self.shared.appends.load(Ordering::Relaxed),
            syncs: self.shared.syncs.load(Ordering::Relaxed),
            batches: self.shared.batches.load(Ordering::Relaxed),
            bytes_written: self.shared.bytes_written.load(Ordering::Relaxed),
            plain_batches: self.shared.plain_batches.load(Ordering::Relaxed),
            bytes_on_disk: st.bytes_on_disk,
            segments: st.segments.len(),
        }
    }
}

impl Drop for Log {
    /// Stops accepting appends, lets the writer sync and answer everything
    /// queued, and waits for it.
    fn drop(&mut self) {
        self.state().tx = None;
        self.shared.notify();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

fn check_config(c: &LogConfig) -> Result<(), StorageError> {
    if c.segment_bytes < 4096 || c.segment_bytes > u64::from(u32::MAX) {
        return Err(StorageError::BadConfig(format!(
            "segment_bytes {} is outside 4 KiB..4 GiB",
            c.segment_bytes
        )));
    }
    if c.max_bytes < 2 * c.segment_bytes {
        return Err(StorageError::BadConfig(format!(
            "max_bytes {} is less than two segments of {}",
            c.max_bytes, c.segment_bytes
        )));
    }
    if c.queue_capacity == 0 {
        return Err(StorageError::BadConfig("queue_capacity is 0".into()));
    }
    Ok(())
}
