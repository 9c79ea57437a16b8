//! The log's test suite, run on both backends on real files with fdatasync.
//!
//! Each test is a function taking the backend; `suite!` instantiates all of
//! them per backend. The io_uring run of a test is skipped, with the probe's
//! reason printed, only where io_uring is refused.

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};

use common::{backend_or_skip, body, config, open_collect};
use relay_storage::index::{Applied, compact, encode_ack};
use relay_storage::record::{RecordKind, encode_record};
use relay_storage::recovery::CorruptReason;
use relay_storage::{
    BackendChoice, DurableMessage, LANES, Log, MessageId, RecordLocation, RetryIndex, StorageError,
};

fn segment_file(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:016x}.seg"))
}

fn round_trip(backend: BackendChoice) {
    let dir = tempfile::tempdir().unwrap();
    let c = config(dir.path(), backend);
    let mut locs = Vec::new();
    {
        let (log, report, got) = open_collect(&c);
        assert!(got.is_empty());
        assert_eq!((report.records, report.segments), (0, 0));
        for i in 0..300u64 {
            let kind = if i % 3 == 2 {
                RecordKind::Ack
            } else {
                RecordKind::Message
            };
            let loc = log.append_wait(kind, &body(i, 1000)).unwrap();
            assert!(log.synced_seq() >= loc.seq);
            locs.push((loc, kind));
        }
        // 300 KB over 64 KiB segments: several segments.
        assert!(log.stats().segments >= 4, "{:?}", log.stats());
        for (i, (loc, _)) in locs.iter().enumerate() {
            assert_eq!(log.read(loc).unwrap(), body(i as u64, 1000));
        }
        assert_eq!(log.stats().appends, 300);
    }
    let (log, report, got) = open_collect(&c);
    assert_eq!(report.records, 300);
    assert!(
        report.corrupt.is_empty() && report.torn.is_empty(),
        "{report:?}"
    );
    assert_eq!(got.len(), 300);
    for (i, (loc, kind, b)) in got.iter().enumerate() {
        assert_eq!((*loc, *kind), locs[i]);
        assert_eq!(*b, body(i as u64, 1000));
    }
    // Appends continue after the recovered records, in sequence.
    let next = log.append_wait(RecordKind::Message, b"after").unwrap();
    assert!(next.seq > locs.last().unwrap().0.seq);
    assert_eq!(log.read(&next).unwrap(), b"after");
}

fn group_commit(backend: BackendChoice) {
    const THREADS: u64 = 16;
    const PER_THREAD: u64 = 100;
    let dir = tempfile::tempdir().unwrap();
    let c = config(dir.path(), backend);
    let (log, _, _) = open_collect(&c);
    let log = Arc::new(log);
    let early = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let (log, early, tx) = (log.clone(), early.clone(), tx.clone());
            s.spawn(move || {
                for i in 0..PER_THREAD {
                    let (log2, early, tx) = (log.clone(), early.clone(), tx.clone());
                    log.append(
                        RecordKind::Message,
                        &body(t * PER_THREAD + i, 128),
                        Box::new(move |r| {
                            let loc = r.unwrap();
                            // Answered only once an fdatasync covered it.
                            if log2.synced_seq() < loc.seq {
                                early.store(true, Ordering::SeqCst);
                            }
                            tx.send(loc).unwrap();
                        }),
                    )
                    .unwrap();
                }
            });
        }
    });
    drop(tx);
    let mut seqs: Vec<u64> = rx.iter().map(|l| l.seq).collect();
    assert_eq!(seqs.len() as u64, THREADS * PER_THREAD);
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(
        seqs.len() as u64,
        THREADS * PER_THREAD,
        "sequence numbers unique"
    );
    assert!(
        !early.load(Ordering::SeqCst),
        "a waiter was answered before its sync"
    );
    let stats = log.stats();
    assert_eq!(stats.appends, THREADS * PER_THREAD);
    assert!(
        stats.syncs < stats.appends,
        "group commit: {} fdatasyncs for {} appends",
        stats.syncs,
        stats.appends
    );
    assert_eq!(
        stats.plain_batches, 0,
        "every batch went through its writer's own path"
    );
    println!("group commit: {stats:?}");
}

fn torn_tail(backend: BackendChoice) {
    let dir = tempfile::tempdir().unwrap();
    let c = config(dir.path(), backend);
    let last = {
        let (log, _, _) = open_collect(&c);
        let mut last = None;
        for i in 0..10 {
            last = Some(log.append_wait(RecordKind::Message, &body(i, 200)).unwrap());
        }
        last.unwrap()
    };
    // An append torn halfway: the first half of a valid record after the last.
    let mut rec = Vec::new();
    encode_record(last.seq + 1, RecordKind::Message, &body(10, 200), &mut rec).unwrap();
    let half = rec.len() / 2;
    let end = last.offset + u64::from(last.len);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(segment_file(dir.path(), last.segment))
        .unwrap();
    f.write_all_at(&rec[..half], end).unwrap();
    drop(f);

    let (log, report, got) = open_collect(&c);
    assert_eq!(got.len(), 10);
    assert!(report.corrupt.is_empty(), "{report:?}");
    assert_eq!(report.torn.len(), 1, "{report:?}");
    assert_eq!(report.torn[0].offset, end);
    assert_eq!(report.torn[0].bytes_cut, half as u64);
    let line = report.to_string();
    assert!(
        line.contains(&format!("{half} bytes cut")) && line.contains(log_backend_name(&log)),
        "{line}"
    );
    let next = log
        .append_wait(RecordKind::Message, &body(11, 200))
        .unwrap();
    assert_eq!(
        next.offset, end,
        "appends resume where the valid records end"
    );
    drop(log);
    let (_, report, got) = open_collect(&c);
    assert!(
        report.torn.is_empty() && report.corrupt.is_empty(),
        "{report:?}"
    );
    assert_eq!(got.len(), 11);
    assert_eq!(got[10].2, body(11, 200));
}

fn log_backend_name(log: &Log) -> &'static str {
    log.backend().name()
}

fn bit_flip_in_middle(backend: BackendChoice) {
    let dir = tempfile::tempdir().unwrap();
    let c = config(dir.path(), backend);
    let locs: Vec<_> = {
        let (log, _, _) = open_collect(&c);
        (0..20)
            .map(|i| log.append_wait(RecordKind::Message, &body(i, 300)).unwrap())
            .collect()
    };
    let hit = locs[7];
    let path = segment_file(dir.path(), hit.segment);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let at = hit.offset + 40;
    let mut byte = [0u8; 1];
    f.read_exact_at(&mut byte, at).unwrap();
    byte[0] ^= 0x04;
    f.write_all_at(&byte, at).unwrap();
    drop(f);

    let (log, report, got) = open_collect(&c);
    assert_eq!(report.corrupt.len(), 1, "{report:?}");
    let bad = report.corrupt[0];
    assert_eq!((bad.segment, bad.offset), (hit.segment, hit.offset));
    assert_eq!(bad.len, u64::from(hit.len));
    assert_eq!(bad.reason, CorruptReason::BadCrc);
    assert!(report.torn.is_empty());
    let want: Vec<u64> = (0..20).filter(|&i| i != 7).collect();
    let seen: Vec<u64> = got
        .iter()
        .map(|(_, _, b)| u64::from_le_bytes(b[..8].try_into().unwrap()))
        .collect();
    assert_eq!(seen, want);
    assert!(
        log.read(&hit).is_err(),
        "the flipped record reads as an error"
    );
    assert_eq!(log.read(&locs[8]).unwrap(), body(8, 300));
}

fn compaction(backend: BackendChoice) {
    let dir = tempfile::tempdir().unwrap();
    let c = config(dir.path(), backend);
    let (log, _, _) = open_collect(&c);
    let locs: Vec<_> = (0..400)
        .map(|i| {
            log.append_wait(RecordKind::Message, &body(i, 1000))
                .unwrap()
        })
        .collect();
    let (ids, active) = log.segments();
    assert!(ids.len() >= 5, "{ids:?}");
    let before = log.stats().bytes_on_disk;
    // Remove every sealed segment but the newest sealed one; the active one
    // is never removed even when asked.
    let sealed: Vec<u64> = ids.iter().copied().filter(|&i| Some(i) != active).collect();
    let (gone, kept) = sealed.split_at(sealed.len() - 1);
    let mut ask = gone.to_vec();
    ask.extend(active);
    let freed = log.remove_segments(&ask).unwrap();
    assert_eq!(freed, gone.len() as u64 * c.segment_bytes);
    assert_eq!(log.stats().bytes_on_disk, before - freed);
    for id in gone {
        assert!(!segment_file(dir.path(), *id).exists());
    }
    drop(log);
    let (_, report, got) = open_collect(&c);
    assert_eq!(report.segments, 2);
    let want: Vec<_> = locs
        .iter()
        .filter(|l| l.segment == kept[0] || Some(l.segment) == active)
        .copied()
        .collect();
    let seen: Vec<_> = got.iter().map(|(l, _, _)| *l).collect();
    assert_eq!(seen, want);
}

fn max_bytes_refusal(backend: BackendChoice) {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path(), backend);
    c.segment_bytes = 4096;
    c.max_bytes = 3 * 4096;
    let (log, _, _) = open_collect(&c);
    let mut logged = Vec::new();
    let err = loop {
        match log.append_wait(RecordKind::Message, &body(logged.len() as u64, 500)) {
            Ok(loc) => logged.push(loc),
            Err(e) => break e,
        }
        assert!(logged.len() < 100, "max_bytes never refused");
    };
    assert!(
        matches!(
            err,
            StorageError::Full {
                max_bytes: 12288,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("storage.max_bytes = 12288"),
        "{err}"
    );
    // Messages fill all but one segment; acknowledgements still fit.
    assert_eq!(log.stats().bytes_on_disk, 2 * 4096);
    log.append_wait(RecordKind::Ack, &logged[0].seq.to_le_bytes())
        .unwrap();
    assert!(log.stats().bytes_on_disk <= c.max_bytes);
    drop(log);
    let (_, report, got) = open_collect(&c);
    assert!(report.corrupt.is_empty() && report.torn.is_empty());
    let msgs: Vec<_> = got
        .iter()
        .filter(|(_, k, _)| *k == RecordKind::Message)
        .map(|(l, _, _)| *l)
        .collect();
    assert_eq!(msgs, logged, "nothing logged is lost");
}

/// A tmpfs of 1 MiB mounted for one test, unmounted on drop.
struct SmallTmpfs {
    dir: tempfile::TempDir,
}

impl SmallTmpfs {
    fn mount() -> Result<Self, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
            .arg(dir.path())
            .output()
            .map_err(|e| format!("mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs refused: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Self { dir })
    }
}

impl Drop for SmallTmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

fn enospc_on_small_tmpfs(backend: BackendChoice) {
    let fs = match SmallTmpfs::mount() {
        Ok(fs) => fs,
        Err(why) => {
            println!("SKIPPED enospc_on_small_tmpfs: {why}");
            return;
        }
    };
    let dir = fs.dir.path().join("log");
    let mut c = config(&dir, backend);
    c.segment_bytes = 128 * 1024;
    c.max_bytes = 1024 * 1024 * 1024;
    let mut logged = Vec::new();
    {
        let (log, _, _) = open_collect(&c);
        let err = loop {
            match log.append_wait(RecordKind::Message, &body(logged.len() as u64, 1000)) {
                Ok(loc) => logged.push(loc),
                Err(e) => break e,
            }
            assert!(logged.len() < 10_000, "a 1 MiB tmpfs never filled");
        };
        assert!(matches!(err, StorageError::DiskFull(_)), "{err:?}");
        assert!(err.to_string().contains("no space left"), "{err}");
        assert!(!logged.is_empty());
        // Refused again, and the log still answers reads.
        assert!(log.append_wait(RecordKind::Message, &[0; 2000]).is_err());
        assert_eq!(log.read(&logged[0]).unwrap(), body(0, 1000));
    }
    let (_, report, got) = open_collect(&c);
    assert!(
        report.corrupt.is_empty() && report.torn.is_empty(),
        "{report:?}"
    );
    let seen: Vec<_> = got.iter().map(|(l, _, _)| *l).collect();
    assert_eq!(seen, logged, "every acknowledged record is recovered");
    drop(fs);
}

fn one_lock_per_directory(backend: BackendChoice) {
    let dir = tempfile::tempdir().unwrap();
    let c = config(dir.path(), backend);
    let (log, _, _) = open_collect(&c);
    let err = Log::open(c.clone(), |_, _, _| {}).unwrap_err();
    assert!(matches!(err, StorageError::Locked(_)), "{err:?}");
    drop(log);
    Log::open(c, |_, _, _| {}).unwrap();
}

fn bad_config_is_refused(backend: BackendChoice) {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path(), backend);
    c.max_bytes = c.segment_bytes;
    let err = Log::open(c.clone(), |_, _, _| {}).unwrap_err();
    assert!(matches!(err, StorageError::BadConfig(_)), "{err:?}");
    c.max_bytes = 4 * c.segment_bytes;
    let (log, _, _) = open_collect(&c);
    let err = log
        .append_wait(RecordKind::Message, &vec![0; c.segment_bytes as usize])
        .unwrap_err();
    assert!(
        matches!(err, StorageError::RecordTooLarge { .. }),
        "{err:?}"
    );
}

/// Logs `n` messages round-robin over 3 destinations and 4 lanes, acks
/// every third once it is synced, and feeds every record to `index`.
fn log_messages(log: &Log, index: &mut RetryIndex, n: u64, now_ms: u64) -> Vec<RecordLocation> {
    let mut locs = Vec::new();
    for i in 0..n {
        let dest = format!("cell-{}", i % 3);
        let mut b = Vec::new();
        DurableMessage {
            id: id(i),
            lane: (i % LANES as u64) as u8,
            received_at_ms: now_ms,
            expires_at_ms: now_ms + 60_000,
            dest: dest.as_bytes(),
            payload: &body(i, 200),
        }
        .encode(&mut b)
        .unwrap();
        let loc = log.append_wait(RecordKind::Message, &b).unwrap();
        index.apply(loc, RecordKind::Message, &b).unwrap();
        locs.push(loc);
        if i % 3 == 0 {
            let ack = encode_ack(loc.seq);
            let aloc = log.append_wait(RecordKind::Ack, &ack).unwrap();
            assert_eq!(
                index.apply(aloc, RecordKind::Ack, &ack).unwrap(),
                Applied::Released(loc)
            );
        }
    }
    locs
}

fn id(i: u64) -> MessageId {
    let mut id = [0xAB; 16];
    id[..8].copy_from_slice(&i.to_le_bytes());
    id
}

/// Everything the index would deliver, per destination and lane.
fn snapshot(index: &RetryIndex) -> Vec<(String, u8, Vec<RecordLocation>)> {
    let mut dests: Vec<_> = index
        .destinations()
        .map(|d| String::from_utf8(d.to_vec()).unwrap())
        .collect();
    dests.sort();
    let mut out = Vec::new();
    for d in dests {
        for lane in 0..LANES as u8 {
            out.push((d.clone(), lane, index.queued(d.as_bytes(), lane)));
        }
    }
    out
}

fn index_rebuilt_on_open(backend: BackendChoice) {
    let dir = tempfile::tempdir().unwrap();
    let c = config(dir.path(), backend);
    let now = 1_000_000;
    let (before, locs) = {
        let (log, _, mut index, bad) = RetryIndex::open(c.clone(), now).unwrap();
        assert_eq!((bad, index.len()), (0, 0));
        let locs = log_messages(&log, &mut index, 120, now);
        (snapshot(&index), locs)
    };
    let (log, report, index, bad) = RetryIndex::open(c.clone(), now).unwrap();
    assert_eq!(bad, 0);
    assert!(report.corrupt.is_empty() && report.torn.is_empty());
    assert_eq!(
        snapshot(&index),
        before,
        "queues rebuilt per destination and lane"
    );
    assert_eq!(index.len(), 80);
    // Lanes carry through the disk: lane 0 first, oldest first within it.
    let next = index.next(b"cell-1").unwrap();
    let first_lane0 = locs
        .iter()
        .enumerate()
        .find(|(i, _)| i % 3 == 1 && i % 4 == 0)
        .map(|(_, l)| *l)
        .unwrap();
    assert_eq!(next, first_lane0);
    let m = log.read(&next).unwrap();
    assert_eq!(DurableMessage::decode(&m).unwrap().lane, 0);
    // The dedup window survived: acknowledged and queued ids alike.
    for i in 0..120 {
        assert!(index.is_duplicate(&id(i)), "id {i} forgotten");
    }
    assert!(!index.is_duplicate(&id(120)));
    // Expiry by stored time after a restart.
    let (_, _, index, _) = {
        drop(log);
        RetryIndex::open(c, now + 60_000).unwrap()
    };
    assert!(index.is_empty());
}

fn index_compaction(backend: BackendChoice) {
    let dir = tempfile::tempdir().unwrap();
    let c = config(dir.path(), backend);
    let now = 5_000;
    let window = 1_000;
    let (log, _, mut index, _) = RetryIndex::open(c.clone(), now).unwrap();
    let locs = log_messages(&log, &mut index, 600, now);
    let segs = log.stats().segments;
    assert!(segs >= 3, "{segs}");
    // Within the dedup window nothing goes, acknowledged or not.
    assert_eq!(compact(&log, &mut index, now, window).unwrap(), 0);
    // Acknowledge everything in the first two segments.
    for l in locs.iter().filter(|l| l.segment <= 2) {
        let ack = encode_ack(l.seq);
        let aloc = log.append_wait(RecordKind::Ack, &ack).unwrap();
        index.apply(aloc, RecordKind::Ack, &ack).unwrap();
    }
    let freed = compact(&log, &mut index, now + window, window).unwrap();
    assert_eq!(freed, 2 * c.segment_bytes, "segments 1 and 2 reclaimed");
    let after = snapshot(&index);
    drop(log);
    let (_, report, index, _) = RetryIndex::open(c, now + window).unwrap();
    assert_eq!(report.segments, segs - 2);
    assert_eq!(snapshot(&index), after, "no released message comes back");
    assert!(!index.is_duplicate(&id(0)) && index.is_duplicate(&id(599)));
}

macro_rules! suite {
    ($module:ident, $kind:expr, [$($test:ident),* $(,)?]) => {
        mod $module {
            $(
                #[test]
                fn $test() {
                    if let Some(b) = super::backend_or_skip($kind, stringify!($test)) {
                        super::$test(b);
                    }
                }
            )*
        }
    };
}

macro_rules! both_backends {
    ($($test:ident),* $(,)?) => {
        suite!(portable, relay_storage::BackendKind::Portable, [$($test),*]);
        suite!(io_uring, relay_storage::BackendKind::IoUring, [$($test),*]);
    };
}

both_backends!(
    round_trip,
    group_commit,
    torn_tail,
    bit_flip_in_middle,
    compaction,
    max_bytes_refusal,
    enospc_on_small_tmpfs,
    one_lock_per_directory,
    bad_config_is_refused,
    index_rebuilt_on_open,
    index_compaction,
);

/// `Auto` runs io_uring exactly where the probe allows it, and says why.
#[test]
fn auto_backend_follows_the_probe() {
    let probe = relay_storage::probe_io_uring();
    assert!(!probe.reason.is_empty());
    let dir = tempfile::tempdir().unwrap();
    let c = config(dir.path(), BackendChoice::Auto);
    let (log, report, _) = open_collect(&c);
    let want = if probe.available {
        relay_storage::backend::DEFAULT_BACKEND
    } else {
        relay_storage::BackendKind::Portable
    };
    assert_eq!((report.backend, log.backend()), (want, want));
    if !probe.available {
        assert!(report.backend_reason.contains(&probe.reason), "{report}");
        drop(log);
        let err = Log::open(config(dir.path(), BackendChoice::IoUring), |_, _, _| {}).unwrap_err();
        assert!(matches!(err, StorageError::BadConfig(_)), "{err:?}");
    }
    assert!(report.to_string().contains(want.name()), "{report}");
}
