//! Crash test: a child process (this test binary re-executed with
//! `RELAY_STORAGE_CRASH_DIR` set) appends durable messages under load and
//! prints each one once its append is synced; the parent kills it with
//! SIGKILL at random moments, reopens the log after each kill and checks
//! that every message reported synced is recovered exactly once, that every
//! acknowledgement reported synced still releases its message, and that
//! nothing that was never sent appears.
//!
//! `crash_kill_loop` kills 24 times per backend. The long version, 120 kills
//! per backend:
//!
//! ```text
//! cargo test -p relay-storage --release --test crash -- --ignored crash_kill_loop_long
//! ```
//!
//! `RELAY_STORAGE_CRASH_SEED=<n>` replays the kill points of a printed seed.

mod common;

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{backend_or_skip, config};
use relay_storage::index::{Applied, encode_ack};
use relay_storage::record::RecordKind;
use relay_storage::{BackendChoice, BackendKind, DurableMessage, Log, RetryIndex};

const DIR_VAR: &str = "RELAY_STORAGE_CRASH_DIR";
const RUN_VAR: &str = "RELAY_STORAGE_CRASH_RUN";
const BACKEND_VAR: &str = "RELAY_STORAGE_CRASH_BACKEND";
/// Appender threads in the child.
const APPENDERS: u64 = 4;
/// Messages each appender sends at most (the child is killed long before).
const PER_APPENDER: u64 = 20_000;
/// No line from the child for this long means it hung: a bound on the test,
/// not a timing assertion.
const SILENCE_LIMIT: Duration = Duration::from_secs(120);

/// Small segments, a queue of 1024 and room for every run's records.
fn crash_config(dir: &Path, backend: BackendChoice) -> relay_storage::LogConfig {
    let mut c = config(dir, backend);
    c.queue_capacity = 1024;
    c.max_bytes = 2 * 1024 * 1024 * 1024;
    c
}

/// A message's id: the run that sent it and its number in the run.
fn id(run: u64, n: u64) -> [u8; 16] {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&run.to_le_bytes());
    id[8..].copy_from_slice(&n.to_le_bytes());
    id
}

/// The payload a message with this id carries: anything else is a record
/// that was never sent.
fn payload(run: u64, n: u64) -> Vec<u8> {
    let len = 64 + (n % 200) as usize;
    (0..len)
        .map(|j| (run * 31 + n * 7 + j as u64) as u8)
        .collect()
}

fn backend_of(name: &str) -> BackendChoice {
    match name {
        "io_uring" => BackendChoice::IoUring,
        _ => BackendChoice::Portable,
    }
}

/// The child's side: runs only when re-executed by the parent.
#[test]
fn crash_child() {
    let Ok(dir) = std::env::var(DIR_VAR) else {
        return;
    };
    let run: u64 = std::env::var(RUN_VAR).unwrap().parse().unwrap();
    let backend = backend_of(&std::env::var(BACKEND_VAR).unwrap());
    let (log, _, _, _) = RetryIndex::open(crash_config(Path::new(&dir), backend), 0).unwrap();
    let (tx, rx) = mpsc::channel::<(u64, u64)>();
    let stdout = std::io::stdout();
    // After a newline: libtest has printed "test crash_child ... " unended.
    writeln!(stdout.lock(), "\nready {run}").unwrap();
    std::thread::scope(|s| {
        for t in 0..APPENDERS {
            let (log, tx) = (&log, tx.clone());
            s.spawn(move || {
                for k in 0..PER_APPENDER {
                    let n = t * PER_APPENDER + k;
                    let mut b = Vec::new();
                    DurableMessage {
                        id: id(run, n),
                        lane: (n % 4) as u8,
                        received_at_ms: 0,
                        expires_at_ms: u64::MAX,
                        dest: b"away",
                        payload: &payload(run, n),
                    }
                    .encode(&mut b)
                    .unwrap();
                    let tx = tx.clone();
                    log.append(
                        RecordKind::Message,
                        &b,
                        Box::new(move |r| {
                            let _ = tx.send((n, r.unwrap().seq));
                        }),
                    )
                    .unwrap();
                }
            });
        }
        drop(tx);
        // Completions run on the writer thread; printing and acknowledging
        // happen here, after the sync that answered them.
        let (atx, arx) = mpsc::channel::<u64>();
        for (n, seq) in rx {
            let mut out = stdout.lock();
            writeln!(out, "acked {run} {n}").unwrap();
            while let Ok(done) = arx.try_recv() {
                writeln!(out, "released {run} {done}").unwrap();
            }
            out.flush().unwrap();
            drop(out);
            if n % 4 == 0 {
                let atx = atx.clone();
                log.append(
                    RecordKind::Ack,
                    &encode_ack(seq),
                    Box::new(move |r| {
                        r.unwrap();
                        let _ = atx.send(n);
                    }),
                )
                .unwrap();
            }
        }
    });
}

/// A seeded xorshift for the kill points (the seed is printed).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Lines of the child's stdout, read on a thread.
fn lines_of(child: &mut Child) -> mpsc::Receiver<String> {
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// What the parent has heard, over every run.
#[derive(Default)]
struct Heard {
    acked: HashSet<(u64, u64)>,
    released: HashSet<(u64, u64)>,
}

impl Heard {
    fn take(&mut self, line: &str) -> bool {
        let mut parts = line.split_whitespace();
        let (Some(what), Some(run), Some(n)) = (parts.next(), parts.next(), parts.next()) else {
            return false;
        };
        let (Ok(run), Ok(n)) = (run.parse(), n.parse()) else {
            return false;
        };
        match what {
            "acked" => self.acked.insert((run, n)),
            "released" => self.released.insert((run, n)),
            _ => return false,
        };
        what == "acked"
    }
}

/// Reopens the log and checks it against what the child reported.
fn check(dir: &Path, backend: BackendChoice, heard: &Heard, runs: u64) {
    let mut index = RetryIndex::new();
    let mut on_disk: HashMap<(u64, u64), usize> = HashMap::new();
    let (log, report) = Log::open(crash_config(dir, backend), |loc, kind, body| {
        if kind == RecordKind::Message {
            let m = DurableMessage::decode(body).expect("a message record decodes");
            let run = u64::from_le_bytes(m.id[..8].try_into().unwrap());
            let n = u64::from_le_bytes(m.id[8..].try_into().unwrap());
            assert!(run < runs, "message from run {run} that never ran");
            assert_eq!(
                m.payload,
                payload(run, n),
                "message {run}/{n} was never sent"
            );
            *on_disk.entry((run, n)).or_default() += 1;
        }
        let applied = index.apply(loc, kind, body).unwrap();
        assert_ne!(applied, Applied::Duplicate);
    })
    .unwrap();
    assert!(report.corrupt.is_empty(), "{report:?}");
    for (key, count) in &on_disk {
        assert_eq!(*count, 1, "message {key:?} recovered {count} times");
    }
    for key in &heard.acked {
        assert_eq!(
            on_disk.get(key),
            Some(&1),
            "acknowledged message {key:?} lost"
        );
    }
    let queued: HashSet<_> = index
        .queued(b"away", 0)
        .into_iter()
        .chain((1..4).flat_map(|l| index.queued(b"away", l)))
        .map(|loc| {
            let m = log.read(&loc).unwrap();
            let id = DurableMessage::decode(&m).unwrap().id;
            (
                u64::from_le_bytes(id[..8].try_into().unwrap()),
                u64::from_le_bytes(id[8..].try_into().unwrap()),
            )
        })
        .collect();
    for key in &heard.released {
        assert!(!queued.contains(key), "released message {key:?} came back");
    }
    for key in heard.acked.difference(&heard.released) {
        // Its ack may have been synced without being reported: only an
        // unacknowledged message with n % 4 != 0 must still be queued.
        if key.1 % 4 != 0 {
            assert!(queued.contains(key), "queued message {key:?} lost");
        }
    }
}

fn kill_loop(kind: BackendKind, kills: u64, test: &str) {
    let Some(backend) = backend_or_skip(kind, test) else {
        return;
    };
    let seed = std::env::var("RELAY_STORAGE_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    println!("{test} on {kind}: seed {seed}, {kills} kills");
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let mut heard = Heard::default();
    let started = Instant::now();
    for run in 0..kills {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "crash_child",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env(DIR_VAR, dir.path())
            .env(RUN_VAR, run.to_string())
            .env(BACKEND_VAR, kind.name())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let lines = lines_of(&mut child);
        // Kill after a random number of reported syncs: 0 (right after
        // open) up to a few hundred.
        let kill_after = rng.below(300);
        let mut acks = 0;
        let mut ready = false;
        while !ready || acks < kill_after {
            match lines.recv_timeout(SILENCE_LIMIT) {
                Ok(line) => {
                    ready |= line.starts_with("ready ");
                    if heard.take(&line) {
                        acks += 1;
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let _ = child.kill();
                    panic!("child of run {run} silent for {SILENCE_LIMIT:?}");
                }
            }
        }
        child.kill().unwrap();
        child.wait().unwrap();
        // Whatever the child printed before it died was synced first.
        for line in lines.iter() {
            heard.take(&line);
        }
        assert!(ready, "child of run {run} never opened the log");
        check(dir.path(), backend, &heard, run + 1);
    }
    assert!(!heard.acked.is_empty(), "no message was ever acknowledged");
    println!(
        "{test} on {kind}: {kills} kills, {} acknowledged, {} released, all recovered, in {:?}",
        heard.acked.len(),
        heard.released.len(),
        started.elapsed()
    );
}

#[test]
fn crash_kill_loop_portable() {
    kill_loop(BackendKind::Portable, 24, "crash_kill_loop_portable");
}

#[test]
fn crash_kill_loop_io_uring() {
    kill_loop(BackendKind::IoUring, 24, "crash_kill_loop_io_uring");
}

#[test]
#[ignore = "long: 120 kills per backend; see the module docs for the command"]
fn crash_kill_loop_long() {
    kill_loop(BackendKind::Portable, 120, "crash_kill_loop_long");
    kill_loop(BackendKind::IoUring, 120, "crash_kill_loop_long");
}
