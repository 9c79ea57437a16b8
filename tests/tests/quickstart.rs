//! The README quick start with real processes: a relay, its key from
//! `relay id`, two keys made with `cell keygen` in `~/.config/celluler/`
//! (outside the work tree), a `cell listen` in the background, and two
//! `cell send`s (one message as an argument, then one per line of stdin on
//! the high lane). Plus `cell listen --service` and `cell discover` against
//! an in-process cell, and `cell send` to a cell that is not attached.

use relay_client::cell::{Cell, CellOptions};
use relay_codec::{Keypair, Lane, PublicKey};
use relay_tests::{RelayProcess, bin_path};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(30);

/// A child process killed when the test ends, whatever happens.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Runs `cell ARGS` to completion (bounded) with `stdin`.
fn cell(dir: &Path, args: &[&str], stdin: &str) -> Output {
    let mut child = Guard(
        Command::new(bin_path("cell"))
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn cell"),
    );
    let mut input = child.0.stdin.take().unwrap();
    input.write_all(stdin.as_bytes()).unwrap();
    drop(input);
    let end = Instant::now() + WAIT;
    while matches!(child.0.try_wait(), Ok(None)) {
        assert!(Instant::now() < end, "cell {args:?} ran over {WAIT:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut out = Vec::new();
    let mut err = Vec::new();
    child
        .0
        .stdout
        .take()
        .unwrap()
        .read_to_end(&mut out)
        .unwrap();
    child
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_end(&mut err)
        .unwrap();
    Output {
        status: child.0.wait().unwrap(),
        stdout: out,
        stderr: err,
    }
}

fn ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// `KEY@HOST:PORT` of `relay`, its key read with `relay id` as the README
/// does (`RELAY=$(relay id)@127.0.0.1:4433`).
fn relay_addr(relay: &RelayProcess) -> String {
    let id = Command::new(bin_path("relay"))
        .arg("id")
        .arg("--data-dir")
        .arg(relay.dir.path().join("data"))
        .output()
        .expect("relay id");
    assert!(id.status.success(), "{id:?}");
    let said = String::from_utf8_lossy(&id.stderr);
    assert!(said.starts_with("read key from /"), "{said}");
    let relay_key = String::from_utf8(id.stdout).unwrap().trim().to_owned();
    assert_eq!(relay_key, relay.key.to_string());
    format!("{relay_key}@{}", relay.quic)
}

/// `cell keygen --out FILE`: the new public key, checked with `cell id`.
fn keygen(d: &Path, file: &str) -> String {
    let key = ok(&cell(d, &["keygen", "--out", file], ""), "keygen")
        .trim()
        .to_owned();
    assert_eq!(key.len(), 52, "{key}");
    assert_eq!(ok(&cell(d, &["id", "--key", file], ""), "id").trim(), key);
    key
}

/// Starts `cell listen ARGS` and waits for its "listening as KEY" line.
fn listen(d: &Path, args: &[&str], key: &str) -> Guard {
    let mut listener = Guard(
        Command::new(bin_path("cell"))
            .arg("listen")
            .args(args)
            .current_dir(d)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn cell listen"),
    );
    let (tx, rx) = mpsc::channel();
    let stderr = listener.0.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let end = Instant::now() + WAIT;
    let mut seen = Vec::new();
    loop {
        let left = end.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains("listening as") => {
                assert!(line.contains(key), "{line}");
                return listener;
            }
            Ok(line) => seen.push(line),
            Err(_) => panic!("no \"listening as\" line from cell listen; stderr: {seen:?}"),
        }
    }
}

/// Waits (bounded) for `listener` to exit 0 and returns its stdout lines
/// as JSON.
fn json_lines(listener: &mut Guard) -> Vec<serde_json::Value> {
    let end = Instant::now() + WAIT;
    let status = loop {
        if let Some(s) = listener.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < end, "cell listen did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stdout = String::new();
    listener
        .0
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    assert!(status.success(), "cell listen: {status}; stdout {stdout}");
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect()
}

#[test]
fn cell_keygen_makes_a_key_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let a = keygen(d, "a.key");
    let b = keygen(d, "b.key");
    assert_ne!(a, b);
    // keygen never overwrites a key.
    let again = cell(d, &["keygen", "--out", "a.key"], "");
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("a.key"),
        "the error names the file: {}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert_eq!(ok(&cell(d, &["id", "--key", "a.key"], ""), "id").trim(), a);
}

/// `cell listen --service` and `cell discover`, with an in-process cell
/// that stays linked as the sender.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cell_listen_prints_messages_and_cell_discover_finds_it() {
    let relay = RelayProcess::start();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_owned();
    let addr = relay_addr(&relay);
    let a = keygen(&d, "a.key");
    keygen(&d, "b.key");
    let args = [
        "--relay",
        &addr,
        "--key",
        "a.key",
        "--count",
        "2",
        "--timeout",
        "20",
        "--service",
        "chat",
    ];
    let mut listener = tokio::task::block_in_place(|| listen(&d, &args, &a));
    let found = tokio::task::block_in_place(|| {
        let mut found = String::new();
        let end = Instant::now() + WAIT;
        // The listener announced before it printed; poll until the relay
        // has read the announcement.
        while !found.contains(&a) {
            assert!(Instant::now() < end, "cell discover never found {a}");
            let out = cell(
                &d,
                &["discover", "--relay", &addr, "--key", "b.key", "chat"],
                "",
            );
            found = ok(&out, "discover");
        }
        found
    });
    let entry: serde_json::Value = serde_json::from_str(found.lines().next().unwrap()).unwrap();
    assert!(entry.to_string().contains(&a), "{entry}");

    let sender =
        relay_tests::cells::connect(&relay, Keypair::generate(), CellOptions::default()).await;
    let to: PublicKey = a.parse().unwrap();
    sender
        .send(to, Lane::Normal, &b"hello, alice"[..])
        .await
        .unwrap();
    sender
        .send(to, Lane::Bulk, vec![0xff, 0x00, 0xfe])
        .await
        .unwrap();
    let lines = tokio::task::block_in_place(|| json_lines(&mut listener));
    assert_eq!(lines.len(), 2, "{lines:?}");
    // Two lanes, two streams: either may come first.
    let text = lines
        .iter()
        .find(|l| l["lane"] == "normal")
        .expect("normal");
    assert_eq!(text["payload"], "hello, alice");
    assert_eq!(text["encoding"], "utf8");
    let bytes = lines.iter().find(|l| l["lane"] == "bulk").expect("bulk");
    assert_eq!(bytes["encoding"], "base64", "not UTF-8");
    assert_eq!(bytes["payload"], "/wD+");
    for l in &lines {
        assert_eq!(l["source"], sender.public_key().to_string());
        assert_eq!(l["destination"], a.as_str());
        assert_eq!(l["auth"], "signature");
    }
    Cell::close(sender).await.unwrap();
    relay.stop();
}

/// The README quick start, every step a process.
///
/// Fails intermittently (about 1 run in 15 on an idle machine, 1 in 4 with
/// two CPU hogs beside it): a `cell send` prints "sent N message(s)" and
/// exits 0, yet the relay never reads the messages (messages_in_total
/// stays short, no drop is counted). The relay closes the link when the
/// cell's Close frame arrives without reading the data streams first; see
/// exchange.rs `the_relay_reads_every_data_stream_before_honouring_close`.
#[test]
fn quick_start_keygen_listen_send() {
    let relay = RelayProcess::start();
    // The commands run in a work tree; the keys go to the README's
    // ~/.config/celluler/, with a HOME of the test's own.
    let work_tree = tempfile::tempdir().unwrap();
    let d = work_tree.path();
    let home = tempfile::tempdir().unwrap();
    let keys = home.path().join(".config/celluler");
    let (alice, bob) = (keys.join("alice.key"), keys.join("bob.key"));
    let (alice, bob) = (alice.to_str().unwrap(), bob.to_str().unwrap());
    let relay_addr = relay_addr(&relay);
    let a = keygen(d, alice);
    let b = keygen(d, bob);
    let mut listener = listen(
        d,
        &[
            "--relay",
            &relay_addr,
            "--key",
            alice,
            "--count",
            "3",
            "--timeout",
            "20",
        ],
        &a,
    );

    let out = cell(
        d,
        &[
            "send",
            "--relay",
            &relay_addr,
            "--key",
            bob,
            "--to",
            &a,
            "hello, alice",
        ],
        "",
    );
    ok(&out, "send hello, alice");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("sent 1 message"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cell(
        d,
        &[
            "send",
            "--relay",
            &relay_addr,
            "--key",
            bob,
            "--to",
            &a,
            "--lane",
            "high",
        ],
        "one\ntwo\n",
    );
    ok(&out, "send from stdin");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("sent 2 message"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let lines = json_lines(&mut listener);
    assert_eq!(
        lines.len(),
        3,
        "{lines:?}\nmessages in: {}, drops: {}; relay log:\n{}",
        relay.metric("celluler_messages_in_total", ""),
        relay.metric("celluler_drops_total", ""),
        relay.log()
    );
    let want = [("hello, alice", "normal"), ("one", "high"), ("two", "high")];
    for (line, (payload, lane)) in lines.iter().zip(want) {
        assert_eq!(line["payload"], payload, "{line}");
        assert_eq!(line["lane"], lane, "{line}");
        assert_eq!(line["encoding"], "utf8", "{line}");
        assert_eq!(line["source"], b.as_str(), "{line}");
        assert_eq!(line["destination"], a.as_str(), "{line}");
        assert_eq!(line["auth"], "signature", "{line}");
    }
    assert_eq!(
        relay.metric("celluler_messages_out_total", "lane=\"normal\""),
        1.0
    );
    assert_eq!(
        relay.metric("celluler_messages_out_total", "lane=\"high\""),
        2.0
    );
    relay.stop();
    // Nothing secret was written where `git add` would find it, and the
    // key directory and files are private.
    let in_tree: Vec<_> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(
        in_tree.is_empty(),
        "the quick start wrote {in_tree:?} into the work tree"
    );
    let mode = |p: &Path| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    };
    assert_eq!(mode(&keys), 0o700);
    assert_eq!(
        (mode(Path::new(alice)), mode(Path::new(bob))),
        (0o600, 0o600)
    );
}

/// `cell listen` and `cell send` with `--transport tcp`, at the address the
/// README's commands use (a relay serves TCP on its QUIC port): one
/// message each way round, TCP to QUIC and QUIC to TCP.
#[test]
fn cell_send_and_listen_over_tcp() {
    let relay = RelayProcess::start();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let relay_addr = relay_addr(&relay);
    let a = keygen(d, "a.key");
    let b = keygen(d, "b.key");
    for (listen_over, send_over) in [("quic", "tcp"), ("tcp", "quic")] {
        let mut listener = listen(
            d,
            &[
                "--relay",
                &relay_addr,
                "--transport",
                listen_over,
                "--key",
                "a.key",
                "--count",
                "1",
                "--timeout",
                "20",
            ],
            &a,
        );
        let text = format!("over {send_over} to a cell on {listen_over}");
        let out = cell(
            d,
            &[
                "send",
                "--relay",
                &relay_addr,
                "--transport",
                send_over,
                "--key",
                "b.key",
                "--to",
                &a,
                &text,
            ],
            "",
        );
        ok(&out, &text);
        let lines = json_lines(&mut listener);
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert_eq!(lines[0]["payload"], text.as_str());
        assert_eq!(lines[0]["source"], b.as_str());
    }
    assert!(relay.log().contains("transport=tcp"), "{}", relay.log());
    // An unknown transport is a usage error that names the choices.
    let out = cell(
        d,
        &[
            "send",
            "--relay",
            &relay_addr,
            "--transport",
            "udp",
            "--key",
            "b.key",
            "--to",
            &a,
            "x",
        ],
        "",
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("use quic or tcp"), "{err}");
    relay.stop();
}

/// The README's best-effort note: `cell send` to a cell that is not
/// attached is told by the relay that its messages were dropped, lists
/// them and exits 3; `cell discover` with no match says so on stderr.
#[test]
fn a_send_to_an_absent_cell_is_reported_and_exits_3() {
    let relay = RelayProcess::start();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let relay_addr = relay_addr(&relay);
    keygen(d, "b.key");
    let absent = Keypair::generate().public().to_string();
    let out = cell(
        d,
        &[
            "send",
            "--relay",
            &relay_addr,
            "--key",
            "b.key",
            "--to",
            &absent,
        ],
        "one\ntwo\nthree\n",
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(out.stdout.is_empty());
    assert_eq!(
        err.lines().collect::<Vec<_>>(),
        [
            "sent 3 message(s)",
            &format!("3 to {absent}: not attached to this relay or any relay it reaches"),
            "3 of 3 messages were not delivered",
        ],
        "{err}"
    );
    assert_eq!(
        relay.metric("celluler_drops_total", "reason=\"unknown_destination\""),
        3.0
    );
    let notices = relay.metric(
        "celluler_notices_sent_total",
        "reason=\"unknown_destination\"",
    );
    assert!((1.0..=3.0).contains(&notices), "{notices} notices");

    let out = cell(
        d,
        &[
            "discover",
            "--relay",
            &relay_addr,
            "--key",
            "b.key",
            "nobody",
        ],
        "",
    );
    assert_eq!(ok(&out, "discover with no match"), "");
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "no cell offers nobody on this relay\n"
    );
    relay.stop();
}
