//! The `cell` binary, run as a process: keys, errors, and listen / send /
//! discover through the real relay (run in this process by `support`)
//! over QUIC.

mod support;

use relay_codec::{Keypair, NodeAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use support::TestRelay;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

const BIN: &str = env!("CARGO_BIN_EXE_cell");

fn cell(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run cell")
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8(o.stderr.clone()).unwrap()
}

fn keygen(path: &Path) -> String {
    let o = cell(&["keygen", "--out", path.to_str().unwrap()]);
    assert!(o.status.success(), "keygen failed: {}", stderr(&o));
    let key = stdout(&o).trim().to_owned();
    assert_eq!(key.len(), 52, "{key:?}");
    key
}

/// An error run: exit code 1 and exactly one line on stderr.
fn assert_one_line_error(o: &Output) -> String {
    assert_eq!(o.status.code(), Some(1), "stderr: {}", stderr(o));
    let err = stderr(o);
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err:?}");
    assert!(err.starts_with("cell: error: "), "{err:?}");
    err
}

#[test]
fn keygen_then_id_print_the_same_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys/cell.key");
    let key = keygen(&path);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let o = cell(&["id", "--key", path.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), format!("{key}\n"));
    // Another keygen makes another identity.
    assert_ne!(keygen(&dir.path().join("other.key")), key);
}

#[test]
fn keygen_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cell.key");
    keygen(&path);
    let before = std::fs::read(&path).unwrap();
    let o = cell(&["keygen", "--out", path.to_str().unwrap()]);
    let err = assert_one_line_error(&o);
    assert!(err.contains("already exists"), "{err}");
    assert!(stdout(&o).is_empty());
    assert_eq!(std::fs::read(&path).unwrap(), before, "the key was changed");
}

#[test]
fn id_refuses_a_key_file_others_can_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cell.key");
    keygen(&path);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let o = cell(&["id", "--key", path.to_str().unwrap()]);
    let err = assert_one_line_error(&o);
    assert!(err.contains("chmod 600"), "{err}");
    assert!(stdout(&o).is_empty(), "printed a key anyway");

    let o = cell(&["id", "--key", dir.path().join("missing").to_str().unwrap()]);
    let err = assert_one_line_error(&o);
    assert!(err.contains("missing"), "{err}");
}

#[test]
fn a_missing_key_file_is_named_once_with_the_keygen_to_run() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("absent.key");
    let missing = missing.to_str().unwrap();
    let relay = format!("{}@127.0.0.1:9", Keypair::generate().public());
    for args in [
        &["id", "--key", missing][..],
        &[
            "send",
            "--relay",
            &relay,
            "--key",
            missing,
            "--broadcast",
            "x",
        ],
    ] {
        let err = assert_one_line_error(&cell(args));
        assert_eq!(err.matches("No such file").count(), 1, "{err}");
        assert!(
            err.contains(&format!("create it with `cell keygen --out {missing}`")),
            "{err}"
        );
    }
}

#[test]
fn logs_to_a_pipe_carry_no_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("cell.key");
    keygen(&key);
    // Nothing answers there; at debug level the cell logs its socket set-up
    // before it gives up.
    let relay = format!("{}@127.0.0.1:9", Keypair::generate().public());
    let o = Command::new(BIN)
        .args(["send", "--relay", &relay, "--key", key.to_str().unwrap()])
        .args(["--connect-timeout", "0.2", "--broadcast", "x"])
        .env("RUST_LOG", "debug")
        .env_remove("NO_COLOR")
        .output()
        .unwrap();
    let err = stderr(&o);
    assert!(err.lines().any(|l| l.contains("DEBUG")), "{err}");
    assert!(
        !err.contains('\x1b'),
        "colour codes in stderr to a pipe: {err:?}"
    );
}

#[test]
fn send_to_an_unreachable_relay_fails_in_bounded_time() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("cell.key");
    keygen(&key);
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = socket.local_addr().unwrap().port();
    drop(socket);
    let relay = format!("{}@127.0.0.1:{port}", Keypair::generate().public());
    let to = Keypair::generate().public().to_string();
    let started = Instant::now();
    let o = cell(&[
        "send",
        "--relay",
        &relay,
        "--key",
        key.to_str().unwrap(),
        "--to",
        &to,
        "hello",
    ]);
    let took = started.elapsed();
    let err = assert_one_line_error(&o);
    assert!(err.contains("could not reach the relay"), "{err}");
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
    // The default connect timeout is 5 s.
    assert!(took < Duration::from_secs(15), "took {took:?}");
}

#[test]
fn bad_arguments_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("cell.key");
    keygen(&key);
    let key = key.to_str().unwrap();
    let relay_key = Keypair::generate().public().to_string();
    for (relay, want) in [
        ("127.0.0.1:4433".to_string(), "KEY@HOST:PORT"),
        (format!("{relay_key}@127.0.0.1"), "KEY@HOST:PORT"),
        ("short@127.0.0.1:1".to_string(), "52 base32"),
    ] {
        let o = cell(&["send", "--relay", &relay, "--key", key, "--broadcast", "x"]);
        let err = assert_one_line_error(&o);
        assert!(err.contains("--relay") && err.contains(want), "{err}");
    }
    let relay = format!("{relay_key}@127.0.0.1:9");
    let o = cell(&["send", "--relay", &relay, "--key", key, "--to", "nope", "x"]);
    let err = assert_one_line_error(&o);
    assert!(err.contains("--to"), "{err}");
    // Usage errors are clap's: exit code 2.
    let o = cell(&["send", "--relay", &relay, "--key", key, "x"]);
    assert_eq!(o.status.code(), Some(2), "no target: {}", stderr(&o));
    let o = cell(&[
        "send",
        "--relay",
        &relay,
        "--key",
        key,
        "--broadcast",
        "--to",
        &relay_key,
        "x",
    ]);
    assert_eq!(o.status.code(), Some(2), "two targets: {}", stderr(&o));
    let o = cell(&[
        "send",
        "--relay",
        &relay,
        "--key",
        key,
        "--broadcast",
        "--lane",
        "fast",
    ]);
    assert_eq!(o.status.code(), Some(2), "bad lane: {}", stderr(&o));
}

/// Starts `cell listen` with `args` (stdout piped), and waits for the
/// first line on its stderr, which says it is listening. Returns the
/// process, that line and the rest of stderr.
async fn start_listener(
    args: &[&str],
) -> (
    tokio::process::Child,
    String,
    tokio::io::Lines<BufReader<tokio::process::ChildStderr>>,
) {
    let mut listener = tokio::process::Command::new(BIN)
        .arg("listen")
        .args(args)
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut err_lines = BufReader::new(listener.stderr.take().unwrap()).lines();
    let first = tokio::time::timeout(Duration::from_secs(20), err_lines.next_line())
        .await
        .expect("listener attached in time")
        .unwrap()
        .expect("a line on stderr");
    (listener, first, err_lines)
}

async fn run(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = tokio::process::Command::new(BIN)
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin).await.unwrap();
    drop(input);
    tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .expect("cell finished in time")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_send_and_discover_through_a_relay() {
    let relay = TestRelay::start().await;
    let addr: NodeAddr = relay.addr();
    let addr = addr.to_string();
    let dir = tempfile::tempdir().unwrap();
    let (lk, sk) = (
        dir.path().join("listener.key"),
        dir.path().join("sender.key"),
    );
    let listener_key = keygen(&lk);
    let sender_key = keygen(&sk);
    let (lk, sk) = (lk.to_str().unwrap(), sk.to_str().unwrap());

    // stderr stays open (and read by no one) until the listener exits.
    let (mut listener, first, _err_lines) = start_listener(&[
        "--relay",
        &addr,
        "--key",
        lk,
        "--count",
        "4",
        "--timeout",
        "30",
        "--service",
        "chat",
    ])
    .await;
    assert_eq!(first, format!("listening as {listener_key} on {addr}"));

    let o = run(&["discover", "--relay", &addr, "--key", sk, "chat"], b"").await;
    assert!(o.status.success(), "{}", stderr(&o));
    let found: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(found["key"], listener_key.as_str());
    assert_eq!(found["app_version"], "");
    let o = run(&["discover", "--relay", &addr, "--key", sk, "nobody"], b"").await;
    assert!(o.status.success() && o.stdout.is_empty(), "{}", stderr(&o));
    assert_eq!(stderr(&o), "no cell offers nobody on this relay\n");

    let o = run(
        &[
            "send",
            "--relay",
            &addr,
            "--key",
            sk,
            "--to",
            &listener_key,
            "--lane",
            "high",
            "hello there",
        ],
        b"",
    )
    .await;
    assert!(o.status.success(), "{}", stderr(&o));
    // The relay reports nothing (the listener is attached) and answers
    // the close with its Close.
    assert_eq!(stderr(&o), "sent 1 message(s)\n");
    // Each stdin line is one message; CRLF is trimmed; bytes that are not
    // UTF-8 come out in base64.
    let o = run(
        &[
            "send",
            "--relay",
            &addr,
            "--key",
            sk,
            "--service",
            "chat",
            "--auth",
            "link",
        ],
        b"line one\r\n\xff\xfe\nline three",
    )
    .await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("sent 3 message"), "{}", stderr(&o));

    let status = tokio::time::timeout(Duration::from_secs(20), listener.wait())
        .await
        .expect("listener exits after --count messages")
        .unwrap();
    assert!(status.success());
    let mut out = String::new();
    listener
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .await
        .unwrap();
    let msgs: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert_eq!(msgs.len(), 4, "{out}");
    let first = &msgs[0];
    assert_eq!(first["source"], sender_key.as_str());
    assert_eq!(first["destination"], listener_key.as_str());
    assert_eq!(first["lane"], "high");
    assert_eq!(first["auth"], "signature");
    assert_eq!(first["encoding"], "utf8");
    assert_eq!(first["payload"], "hello there");
    assert_eq!(first["id"].as_str().unwrap().len(), 32);
    assert!(first["timestamp_ms"].as_u64().unwrap() > 1_700_000_000_000);
    let rest: Vec<(&str, &str, &str)> = msgs[1..]
        .iter()
        .map(|m| {
            assert_eq!(m["destination"], "service:chat");
            assert_eq!(m["auth"], "link");
            assert_eq!(m["lane"], "normal");
            (
                m["encoding"].as_str().unwrap(),
                m["payload"].as_str().unwrap(),
                m["source"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        rest,
        vec![
            ("utf8", "line one", sender_key.as_str()),
            ("base64", "//4=", sender_key.as_str()),
            ("utf8", "line three", sender_key.as_str()),
        ]
    );
}

#[test]
fn listen_exits_cleanly_on_timeout() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let relay = rt.block_on(TestRelay::start());
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("cell.key");
    keygen(&key);
    let started = Instant::now();
    let o = cell(&[
        "listen",
        "--relay",
        &relay.addr().to_string(),
        "--key",
        key.to_str().unwrap(),
        "--timeout",
        "0.5",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(o.stdout.is_empty());
    let err = stderr(&o);
    assert!(err.contains("listening as"), "{err}");
    assert!(
        err.contains("timed out after 0.5s with 0 message(s)"),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(8));
    drop(relay);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_stops_cleanly_on_an_interrupt() {
    let relay = TestRelay::start().await;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("cell.key");
    keygen(&key);
    let (mut listener, first, mut err_lines) = start_listener(&[
        "--relay",
        &relay.addr().to_string(),
        "--key",
        key.to_str().unwrap(),
        "--timeout",
        "60",
    ])
    .await;
    assert!(first.starts_with("listening as "), "{first}");
    // Sent at once: a process that printed the line before it listened for
    // the interrupt could be killed by the default action (a narrow window,
    // so this catches it only now and then).
    let pid = listener.id().unwrap().to_string();
    let sent = Command::new("kill").args(["-INT", &pid]).status().unwrap();
    assert!(sent.success());
    let status = tokio::time::timeout(Duration::from_secs(20), listener.wait())
        .await
        .expect("listener stops within 20 s of the interrupt")
        .unwrap();
    assert!(status.success(), "{status:?}");
    let rest = tokio::time::timeout(Duration::from_secs(5), err_lines.next_line())
        .await
        .expect("stderr ends")
        .unwrap();
    assert_eq!(rest.as_deref(), Some("interrupted after 0 message(s)"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_link_is_one_clear_line() {
    // A relay with room for one link, taken.
    let relay = TestRelay::with_config("[limits]\nmax_links = 1\n").await;
    let _first = relay_client::Cell::connect(
        &relay.addr(),
        Keypair::generate(),
        relay_client::CellOptions::default(),
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("cell.key");
    keygen(&key);
    let o = run(
        &[
            "send",
            "--relay",
            &relay.addr().to_string(),
            "--key",
            key.to_str().unwrap(),
            "--broadcast",
            "x",
        ],
        b"",
    )
    .await;
    let err = assert_one_line_error(&o);
    assert!(
        err.contains("refused") && err.contains("relay has 1 links, its limit"),
        "{err}"
    );
}
