//! The `relay` binary's command line, run as a real process.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const RELAY: &str = env!("CARGO_BIN_EXE_relay");

/// The safety net of every wait here; nothing is timed.
const WAIT: Duration = Duration::from_secs(30);

/// Flags that put both listeners on free loopback ports.
const FREE_PORTS: [&str; 4] = ["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"];

/// Runs `relay ARGS` to its exit (bounded: a relay that serves when it
/// should not is killed, and the test fails): (code, stdout, stderr).
fn run(args: &[&str], cwd: &Path) -> (i32, String, String) {
    let mut child = Command::new(RELAY)
        .args(args)
        .current_dir(cwd)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run relay");
    let status = wait_exit(&mut child);
    let (mut out, mut err) = (String::new(), String::new());
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (status.code().unwrap_or(-1), out, err)
}

/// A `relay` process that printed its ready line; killed when dropped.
struct Running {
    child: Child,
    ready: String,
    stderr: mpsc::Receiver<String>,
}

impl Running {
    /// Starts `relay ARGS` in `cwd` (on free loopback ports unless ARGS
    /// say where) and waits for its ready line.
    fn start(args: &[&str], cwd: &Path) -> Running {
        let ports: &[&str] = if args.contains(&"--listen") {
            &[]
        } else {
            &FREE_PORTS
        };
        let mut child = Command::new(RELAY)
            .args(ports)
            .args(args)
            .current_dir(cwd)
            .env("RUST_LOG", "info,quinn=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn relay");
        let (tx, stderr) = mpsc::channel();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut ready = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut ready)
            .unwrap();
        if !ready.starts_with("relay ready: ") {
            let status = wait_exit(&mut child);
            let log: Vec<String> = stderr.iter().collect();
            panic!(
                "no ready line: {ready:?}; {status}; stderr:\n{}",
                log.join("\n")
            );
        }
        Running {
            child,
            ready,
            stderr,
        }
    }

    /// `name=` from the ready line.
    fn field(&self, name: &str) -> &str {
        self.ready
            .split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in {:?}", self.ready))
    }

    /// Waits (bounded) for a stderr line containing `needle`; returns the
    /// lines up to it.
    fn wait_stderr(&self, needle: &str) -> String {
        let end = Instant::now() + WAIT;
        let mut seen = String::new();
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(line) => {
                    seen.push_str(&line);
                    seen.push('\n');
                    if line.contains(needle) {
                        return seen;
                    }
                }
                Err(_) => panic!("no stderr line with {needle:?}; stderr:\n{seen}"),
            }
        }
    }

    /// Sends SIGTERM and waits (bounded) for the exit status and the rest of
    /// stderr.
    fn stop(mut self) -> (ExitStatus, String) {
        signal("-TERM", self.child.id());
        let status = wait_exit(&mut self.child);
        let rest: Vec<String> = self.stderr.iter().collect();
        (status, rest.join("\n"))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `kill SIG PID` (a negative pid is a process group).
fn signal(sig: &str, pid: impl std::fmt::Display) {
    Command::new("kill")
        .args([sig, "--", &pid.to_string()])
        .status()
        .unwrap();
}

/// Waits for `child` to exit, killing it if it runs past the safety net.
fn wait_exit(child: &mut Child) -> ExitStatus {
    let end = Instant::now() + WAIT;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if Instant::now() > end {
            child.kill().unwrap();
            panic!("process {} did not exit within {WAIT:?}", child.id());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `relay ARGS` expecting it to exit at once with code 1.
fn refused(args: &[&str], cwd: &Path) -> String {
    let (code, out, err) = run(args, cwd);
    assert_eq!(code, 1, "{args:?}: stdout {out:?}, stderr {err:?}");
    assert!(err.starts_with("relay: "), "{err:?}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err:?}");
    err
}

#[test]
fn id_reads_a_key_says_which_and_creates_one_only_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let abs = dir.path().canonicalize().unwrap().join("d/node.key");
    // No key: refused with what to do, and nothing is created.
    let (code, out, err) = run(&["id", "--data-dir", "d"], dir.path());
    assert_eq!(code, 1, "{err}");
    assert!(out.is_empty(), "{out:?}");
    assert!(
        err.contains(&format!("no node key at {}", abs.display())) && err.contains("--create"),
        "{err}"
    );
    assert!(!dir.path().join("d").exists(), "relay id made a directory");

    let (code, out, err) = run(&["id", "--data-dir", "d", "--create"], dir.path());
    assert_eq!(code, 0, "{err}");
    let key = out.trim();
    assert_eq!(key.len(), 52, "{out:?}");
    assert_eq!(out.lines().count(), 1);
    assert_eq!(err, format!("created a new key in {}\n", abs.display()));
    let mode = std::fs::metadata(&abs).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    for args in [
        &["id", "--data-dir", "d"][..],
        &["id", "--data-dir", "d", "--create"],
    ] {
        let (code, again, err) = run(args, dir.path());
        assert_eq!(code, 0, "{err}");
        assert_eq!(again.trim(), key);
        assert_eq!(err, format!("read key from {}\n", abs.display()));
    }
}

#[test]
fn check_config_accepts_the_example_and_names_bad_fields() {
    let dir = tempfile::tempdir().unwrap();
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/relay.toml");
    let (code, out, _) = run(&["check-config", example], dir.path());
    assert_eq!(code, 0, "{out}");

    // (text, words the error must hold, beside the file:line it starts with)
    let cases: [(&str, &[&str], usize); 7] = [
        ("[node]\nlisten = 5\n", &["node.listen"], 2),
        (
            "[node]\nlisten = \"127.0.0.1:4433\"\n\nlisten_tcp = \"udp\"\n",
            &["node.listen_tcp", "\"off\"", "\"same\""],
            4,
        ),
        (
            "[node]\nlisten_tcp = \"127.0.0.1:70000\"\n",
            &["node.listen_tcp", "port 70000 is out of range (0-65535)"],
            2,
        ),
        ("[node]\nbogus = 1\n", &["bogus"], 2),
        (
            "[limits]\nmax_payload = 1048576\nmax_frame = 1024\n",
            &["invalid `limits.max_frame`"],
            3,
        ),
        (
            "\n[limits]\nmax_payload = 0\n",
            &["invalid `limits.max_payload`"],
            3,
        ),
        (
            "[node]\nadmin = \"localhost:70000\"\n",
            &["node.admin", "port 70000 is out of range (0-65535)"],
            2,
        ),
    ];
    for (i, (text, words, line)) in cases.iter().enumerate() {
        let f = dir.path().join(format!("bad{i}.toml"));
        std::fs::write(&f, text).unwrap();
        let err = refused(&["check-config", f.to_str().unwrap()], dir.path());
        let place = format!("relay: {}:{line}:", f.display());
        assert!(
            err.starts_with(&place),
            "{text}: {err} should start {place}"
        );
        for w in *words {
            assert!(err.contains(w), "{text}: {err} should name {w}");
        }
    }
    // A host name is resolved, as the cell resolves a relay's.
    let f = dir.path().join("names.toml");
    std::fs::write(
        &f,
        "[node]\nlisten = \"localhost:4433\"\nadmin = \"localhost:0\"\n",
    )
    .unwrap();
    let (code, out, err) = run(&["check-config", f.to_str().unwrap()], dir.path());
    assert_eq!(
        (code, out.trim_end()),
        (0, &*format!("{}: ok", f.display())),
        "{err}"
    );
}

#[test]
fn a_bad_config_is_refused_at_start_with_the_field_named() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("r.toml");
    std::fs::write(&f, "[security]\nverify = \"sometimes\"\n").unwrap();
    let err = refused(&["--config", f.to_str().unwrap()], dir.path());
    assert!(err.contains("security.verify"), "{err}");
    std::fs::write(&f, "[node]\nlisten_tcp = \"sometimes\"\n").unwrap();
    let err = refused(&["--config", f.to_str().unwrap()], dir.path());
    let place = format!("relay: {}:2:", f.display());
    assert!(err.starts_with(&place), "{err} should start {place}");
    assert!(err.contains("node.listen_tcp"), "{err}");
    // The flag takes the same words, and says what it takes.
    let (code, _, err) = run(&["--listen-tcp", "sometimes"], dir.path());
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("\"off\"") && err.contains("\"same\""), "{err}");
}

#[test]
fn addresses_take_host_names_and_name_a_port_out_of_range() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Running::start(
        &["--listen", "localhost:0", "--admin", "localhost:0"],
        dir.path(),
    );
    let quic: std::net::SocketAddr = relay.field("quic=").parse().unwrap();
    assert!(quic.ip().is_loopback() && quic.port() != 0, "{quic}");
    // TCP at the same address by default, port included.
    let tcp: std::net::SocketAddr = relay.field("tcp=").parse().unwrap();
    assert_eq!(tcp, quic);
    let admin: std::net::SocketAddr = relay.field("admin=http://").parse().unwrap();
    assert!(admin.ip().is_loopback() && admin.port() != 0, "{admin}");
    assert!(relay.stop().0.success());

    for flag in ["--listen", "--admin", "--listen-tcp"] {
        let (code, _, err) = run(&[flag, "127.0.0.1:99999"], dir.path());
        assert_eq!(code, 2, "{err}");
        assert!(
            err.contains("port 99999 is out of range (0-65535)"),
            "{flag}: {err}"
        );
        let (code, _, err) = run(&[flag, "::1:4433"], dir.path());
        assert_eq!(code, 2, "{err}");
        assert!(err.contains("[::1]:4433"), "{flag}: {err}");
    }
}

#[test]
fn errors_name_their_cause_once_and_say_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let busy = udp.local_addr().unwrap().to_string();
    let err = refused(&["--listen", &busy, "--admin", "127.0.0.1:0"], d);
    assert_eq!(err.matches("Address already in use").count(), 1, "{err}");
    assert!(
        err.contains(&busy) && err.contains("another relay") && err.contains("--listen HOST:PORT"),
        "{err}"
    );

    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = tcp.local_addr().unwrap().to_string();
    let err = refused(&["--listen", "127.0.0.1:0", "--admin", &busy], d);
    assert_eq!(err.matches("Address already in use").count(), 1, "{err}");
    assert!(
        err.contains(&busy) && err.contains("another relay") && err.contains("--admin HOST:PORT"),
        "{err}"
    );

    // TCP: by default the address of --listen, here taken on TCP only.
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = tcp.local_addr().unwrap().to_string();
    let err = refused(&["--listen", &busy, "--admin", "127.0.0.1:0"], d);
    assert_eq!(err.matches("Address already in use").count(), 1, "{err}");
    assert!(
        err.contains(&format!("TCP listen address {busy}"))
            && err.contains("the address of node.listen")
            && err.contains("--listen-tcp HOST:PORT")
            && err.contains("--listen-tcp off"),
        "{err}"
    );
    let err = refused(
        &[
            "--listen",
            "127.0.0.1:0",
            "--listen-tcp",
            &busy,
            "--admin",
            "127.0.0.1:0",
        ],
        d,
    );
    assert_eq!(err.matches("Address already in use").count(), 1, "{err}");
    assert!(
        err.contains(&busy) && !err.contains("node.listen)") && err.contains("--listen-tcp off"),
        "{err}"
    );
    drop(tcp);

    let err = refused(&["--config", "absent.toml"], d);
    assert_eq!(err.matches("No such file").count(), 1, "{err}");
    assert!(
        err.contains("absent.toml") && err.contains("config/relay.toml"),
        "{err}"
    );
}

#[test]
fn a_node_key_others_can_read_is_refused_with_the_chmod_to_run() {
    let dir = tempfile::tempdir().unwrap();
    let (code, _, err) = run(&["id", "--data-dir", "d", "--create"], dir.path());
    assert_eq!(code, 0, "{err}");
    let key = dir.path().join("d/node.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let start = [&["--data-dir", "d"][..], &FREE_PORTS].concat();
    for args in [&start[..], &["id", "--data-dir", "d"]] {
        let err = refused(args, dir.path());
        assert!(err.contains("run `chmod 600 "), "{args:?}: {err}");
        assert!(err.contains("d/node.key`"), "{args:?}: {err}");
    }
}

#[test]
fn a_second_relay_on_the_same_data_directory_is_refused_naming_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let first = Running::start(&["--data-dir", "d"], dir.path());
    let err = refused(
        &[&["--data-dir", "d"][..], &FREE_PORTS].concat(),
        dir.path(),
    );
    assert!(
        err.contains(&format!(
            "in use by another relay (pid {}",
            first.child.id()
        )),
        "{err}"
    );
    assert!(err.contains("--data-dir DIR"), "{err}");
    // The refused one changed nothing: the first still serves, and stops
    // cleanly.
    let (status, _) = first.stop();
    assert!(status.success(), "{status:?}");
}

#[test]
fn a_relay_killed_with_sigkill_restarts_on_its_data_directory_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut first = Running::start(&["--data-dir", "d"], dir.path());
    let key = first.field("key=").to_owned();
    first.child.kill().unwrap(); // SIGKILL: no chance to clean up
    let status = first.child.wait().unwrap();
    assert!(!status.success());
    let second = Running::start(&["--data-dir", "d"], dir.path());
    assert_eq!(second.field("key="), key, "same identity");
    assert!(!second.ready.contains("(new key)"), "{}", second.ready);
    assert!(second.stop().0.success());
}

#[test]
fn runs_with_defaults_says_what_next_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Running::start(&[], dir.path());
    assert!(
        relay.ready.contains("data=relay-data (new key)"),
        "{}",
        relay.ready
    );
    assert!(dir.path().join("relay-data/node.key").exists());
    // The next step runs as printed: it makes a key outside the working
    // directory and attaches a listening cell.
    let next = relay
        .ready
        .split_once(" | next: ")
        .map(|(_, n)| n.trim().to_owned())
        .expect("a next step");
    assert!(next.contains(" listen --relay "), "{next}");
    let home = tempfile::tempdir().unwrap();
    let mut cell = Command::new("sh")
        .args(["-c", &next])
        .current_dir(dir.path())
        .env("HOME", home.path())
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(cell.stderr.take().unwrap());
    let mut seen = String::new();
    while !seen.contains("listening as") {
        let before = seen.len();
        err.read_line(&mut seen).unwrap();
        assert!(seen.len() > before, "the next step ended: {seen}");
    }
    let key_file = home.path().join(".config/celluler/me.key");
    let mode = std::fs::metadata(&key_file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    relay.wait_stderr("link opened");

    // Stopping with a cell attached: the log says what it waits for, and
    // the link is closed as a shutdown.
    let (status, log) = relay.stop();
    assert!(status.success(), "{status:?}");
    assert!(
        log.contains("waiting until each link's cell has read"),
        "{log}"
    );
    assert!(log.contains("reason=\"shutdown\""), "{log}");
    assert!(
        !log.contains('\x1b'),
        "colour codes in a log to a pipe:\n{log}"
    );

    // `cell listen`, the shell's child: an interrupt ends it cleanly.
    let sh = cell.id();
    let children = std::fs::read_to_string(format!("/proc/{sh}/task/{sh}/children")).unwrap();
    let listener = children
        .split_whitespace()
        .next()
        .expect("cell listen runs");
    signal("-INT", listener);
    let status = wait_exit(&mut cell);
    let mut rest = String::new();
    err.read_to_string(&mut rest).unwrap();
    assert!(status.success(), "{status:?}: {seen}{rest}");
}
