//! The relay's durable log: relay-storage's [`Log`] in DATA_DIR/log and
//! its [`RetryIndex`], driven by the node's durable actions. Appends are
//! answered on the log's writer thread once synced; the answers come back
//! to the node in one task ([`run_durable`]), many at a time, which also
//! compacts the log on a timer.

use super::Shared;
use crate::config::{StorageBackend, StorageConfig};
use relay_codec::{Envelope, Limits, MessageId, PublicKey};
use relay_core::{LogRefusal, Now};
use relay_storage::index::{self, DurableMessage};
use relay_storage::record::RecordKind;
use relay_storage::{BackendChoice, Log, LogConfig, RecordLocation, RetryIndex, StorageError};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::{info, warn};

/// The directory of the log inside the data directory.
pub const LOG_DIR: &str = "log";

/// An append's outcome, from the writer thread to [`run_durable`].
type Answer = (u64, Result<u64, LogRefusal>);

/// What the index and the locations of queued records need, under one lock.
struct Tables {
    index: RetryIndex,
    /// Log sequence number → location, of every message record queued.
    locs: HashMap<u64, RecordLocation>,
}

/// The log, its index, and the channel its answers come back on.
pub(super) struct DurableStore {
    log: Log,
    tables: Arc<Mutex<Tables>>,
    answers: mpsc::UnboundedSender<Answer>,
    dedup_window_ms: u64,
    compact_every: Duration,
}

/// The log opened, with what recovery found, before the node exists.
pub(super) struct Opened {
    pub(super) store: DurableStore,
    pub(super) answers: mpsc::UnboundedReceiver<Answer>,
    /// The recovered messages still queued: (seq, message, expires).
    recovered: Vec<(u64, Envelope, u64)>,
}

fn lock(t: &Mutex<Tables>) -> MutexGuard<'_, Tables> {
    t.lock().unwrap_or_else(|e| e.into_inner())
}

/// Opens (or creates) DATA_DIR/log, rebuilds the retry index from it and
/// logs the start line: which backend and why, and what recovery found.
pub(super) fn open(
    data_dir: &Path,
    cfg: &StorageConfig,
    dedup_window_ms: u64,
    limits: &Limits,
    unix_ms: u64,
) -> Result<Opened, StorageError> {
    let mut lc = LogConfig::new(data_dir.join(LOG_DIR));
    lc.max_bytes = cfg.max_bytes;
    lc.segment_bytes = cfg.segment_bytes;
    lc.backend = match cfg.backend {
        StorageBackend::Auto => BackendChoice::Auto,
        StorageBackend::IoUring => BackendChoice::IoUring,
        StorageBackend::Portable => BackendChoice::Portable,
    };
    let (log, report, index, bad) = RetryIndex::open(lc, unix_ms)?;
    let mut recovered = Vec::new();
    let mut locs = HashMap::new();
    let dests: Vec<Vec<u8>> = index.destinations().map(<[u8]>::to_vec).collect();
    let mut unreadable = 0u64;
    for dest in dests {
        for lane in 0..relay_storage::LANES as u8 {
            for loc in index.queued(&dest, lane) {
                match read_message(&log, &loc, limits) {
                    Some((env, expires)) => {
                        locs.insert(loc.seq, loc);
                        recovered.push((loc.seq, env, expires));
                    }
                    None => unreadable += 1,
                }
            }
        }
    }
    recovered.sort_by_key(|r| r.0);
    info!(
        backend = ?report.backend,
        why = %report.backend_reason,
        queued = recovered.len(),
        undecodable = bad + unreadable,
        max_bytes = cfg.max_bytes,
        "{report} (in {})",
        log.dir().display()
    );
    let (tx, rx) = mpsc::unbounded_channel();
    Ok(Opened {
        store: DurableStore {
            log,
            tables: Arc::new(Mutex::new(Tables { index, locs })),
            answers: tx,
            dedup_window_ms,
            compact_every: Duration::from_millis(cfg.compact_interval_ms),
        },
        answers: rx,
        recovered,
    })
}

impl Opened {
    /// Hands the recovered messages to the node: each is queued again for
    /// its destination.
    pub(super) fn recover_into(&mut self, node: &mut super::CoreNode, now: Now) -> usize {
        let mut n = 0;
        for (seq, env, expires) in self.recovered.drain(..) {
            if node.durable_recovered(now, seq, &env, expires) {
                n += 1;
            }
        }
        n
    }
}

/// The message record at `loc`, decoded: the message and its expiry.
fn read_message(log: &Log, loc: &RecordLocation, limits: &Limits) -> Option<(Envelope, u64)> {
    let body = log.read(loc).ok()?;
    let m = DurableMessage::decode(&body).ok()?;
    let mut bytes = bytes::Bytes::copy_from_slice(m.payload);
    let env = Envelope::parse(&mut bytes, limits).ok()?;
    Some((env, m.expires_at_ms))
}

impl DurableStore {
    /// [`relay_core::Action::DurableLog`]: appends the message; the
    /// outcome goes to the node through [`run_durable`].
    #[allow(clippy::too_many_arguments)]
    pub(super) fn log(
        &self,
        token: u64,
        id: MessageId,
        dest: PublicKey,
        lane: u8,
        expires_unix_ms: u64,
        env: &Envelope,
        unix_ms: u64,
    ) {
        let msg = DurableMessage {
            id: id.0,
            lane,
            received_at_ms: unix_ms,
            expires_at_ms: expires_unix_ms,
            dest: &dest.0,
            payload: env.raw(),
        };
        let mut body = Vec::new();
        if msg.encode(&mut body).is_err() {
            let _ = self.answers.send((token, Err(LogRefusal::Failed)));
            return;
        }
        let tables = self.tables.clone();
        let answers = self.answers.clone();
        let copy = body.clone();
        let done = Box::new(move |r: Result<RecordLocation, StorageError>| {
            let answer = match r {
                Ok(loc) => {
                    let mut t = lock(&tables);
                    let _ = t.index.apply(loc, RecordKind::Message, &copy);
                    t.locs.insert(loc.seq, loc);
                    Ok(loc.seq)
                }
                Err(_) => Err(LogRefusal::Failed),
            };
            let _ = answers.send((token, answer));
        });
        if let Err(e) = self.log.append(RecordKind::Message, &body, done) {
            let why = match e {
                StorageError::Full { .. } | StorageError::DiskFull(_) => LogRefusal::Full,
                _ => LogRefusal::Failed,
            };
            let _ = self.answers.send((token, Err(why)));
        }
    }

    /// [`relay_core::Action::DurableRead`]: the logged message `seq`.
    pub(super) fn read(&self, seq: u64, limits: &Limits) -> Option<Envelope> {
        let loc = *lock(&self.tables).locs.get(&seq)?;
        read_message(&self.log, &loc, limits).map(|(env, _)| env)
    }

    /// [`relay_core::Action::DurableRelease`]: logs an acknowledgement
    /// record, so a restart does not queue `seq` again.
    pub(super) fn release(&self, seq: u64) {
        let tables = self.tables.clone();
        let body = index::encode_ack(seq);
        let done = Box::new(move |r: Result<RecordLocation, StorageError>| {
            if let Ok(loc) = r {
                let mut t = lock(&tables);
                let _ = t.index.apply(loc, RecordKind::Ack, &body);
                t.locs.remove(&seq);
            }
        });
        if let Err(e) = self.log.append(RecordKind::Ack, &body, done) {
            warn!("durable log: the release of record {seq} was not logged: {e}");
        }
    }

    /// Removes the segments whose records are all released; the bytes on
    /// disk after it.
    fn compact(&self, unix_ms: u64) -> u64 {
        let mut t = lock(&self.tables);
        t.index.expire(unix_ms);
        if let Err(e) = index::compact(&self.log, &mut t.index, unix_ms, self.dedup_window_ms) {
            warn!("durable log compaction: {e}");
        }
        self.log.stats().bytes_on_disk
    }
}

/// Feeds the log's answers to the node, as many as are ready at a time,
/// and compacts the log every `storage.compact_interval_ms`.
pub(super) async fn run_durable(shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<Answer>) {
    let Some(store) = shared.durable.as_ref() else {
        return;
    };
    let mut compact = tokio::time::interval(store.compact_every);
    compact.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ex = super::actions::Executor::default();
    let mut batch: Vec<Answer> = Vec::new();
    loop {
        tokio::select! {
            got = rx.recv_many(&mut batch, 4096) => {
                if got == 0 {
                    return;
                }
                let ok = batch.iter().filter(|a| a.1.is_ok()).count() as u64;
                shared.metrics.durable().logged(ok);
                let (now, at) = shared.now();
                shared.node().durable_logged(now, &batch, &mut ex.actions);
                batch.clear();
                ex.run(&shared, now, at, 0);
            }
            _ = compact.tick() => {
                let bytes = store.compact(super::unix_ms());
                shared.metrics.durable().log_bytes(bytes);
            }
        }
    }
}
