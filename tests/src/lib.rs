//! Harness for end-to-end tests: starts the real `relay` binary on free
//! loopback ports with a temporary data directory, reads its ready line,
//! scrapes its admin endpoint, and stops it (SIGTERM, then kill) when the
//! test ends, whatever happens.
//!
//! The binaries are found beside the test executable's directory
//! (`target/<profile>/`); `cargo test --workspace` builds them because the
//! `relay` and `relay-client` packages have integration tests of their own.
//! `cargo test -p relay-tests` alone does not rebuild them: run
//! `cargo build -p relay -p relay-client --bins` first.
//!
//! - [`cells`]: honest cells on the real `Cell` API, and bounded waits.
//! - [`raw`]: hand-made links that send exactly the bytes a test wants.
//! - [`each_transport!`]: one test body, one test per transport.

pub mod cells;
pub mod mesh;
pub mod raw;

/// Instantiates the test body `async fn NAME(t: Transport)` once per
/// transport, as `NAME::quic` and `NAME::tcp` (so `cargo test tcp` runs
/// the TCP half). Each runs through [`over`], so whatever fails names the
/// transport it failed over.
///
/// ```ignore
/// each_transport!(a_forged_source_closes_the_link);
/// async fn a_forged_source_closes_the_link(t: Transport) { /* ... */ }
/// ```
#[macro_export]
macro_rules! each_transport {
    ($($name:ident),+ $(,)?) => {$(
        mod $name {
            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn quic() {
                $crate::over(::relay_link::Transport::Quic, super::$name).await
            }
            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn tcp() {
                $crate::over(::relay_link::Transport::Tcp, super::$name).await
            }
        }
    )+};
}

/// Runs `test(transport)`; a panic in it is raised again with the
/// transport in front of its message, so every failure says which
/// transport it was over.
pub async fn over<F, Fut>(transport: Transport, test: F)
where
    F: FnOnce(Transport) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    use futures_util::FutureExt as _;
    if let Err(panic) = std::panic::AssertUnwindSafe(test(transport))
        .catch_unwind()
        .await
    {
        let msg = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("(a panic without a message)");
        panic!("over {transport}: {msg}");
    }
}

use relay_codec::{NodeAddr, PublicKey};
use relay_link::Transport;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

/// How long a relay may take to print its ready line.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);

/// Path of a workspace binary (`relay`, `cell`, `relay-bench`).
///
/// # Panics
/// If it is not built, with the command that builds it.
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target directory");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built; run `cargo build --workspace --bins` (cargo test --workspace builds it)",
        path.display()
    );
    path
}

/// A `relay` process started for one test.
pub struct RelayProcess {
    child: Child,
    /// The relay's key.
    pub key: PublicKey,
    /// Its QUIC address.
    pub quic: SocketAddr,
    /// Its TCP address; `None` when it does not listen on TCP
    /// (`--listen-tcp off`).
    pub tcp: Option<SocketAddr>,
    /// Its admin HTTP address.
    pub admin: SocketAddr,
    /// Its data directory (removed when the test ends).
    pub dir: tempfile::TempDir,
    log: Arc<Mutex<String>>,
}

impl RelayProcess {
    /// A relay with the embedded defaults on free loopback ports.
    pub fn start() -> Self {
        Self::start_with_config("")
    }

    /// A relay with `toml` as its config file (ports and data directory are
    /// still set by flags).
    pub fn start_with_config(toml: &str) -> Self {
        Self::start_with(toml, &[])
    }

    /// A relay with `toml` as its config file (empty: none) and `args`
    /// after the flags that set free ports and the data directory (so
    /// `args` may override them, e.g. `["--listen-tcp", "off"]`).
    pub fn start_with(toml: &str, args: &[&str]) -> Self {
        Self::start_at(toml, "127.0.0.1:0", None, args)
    }

    /// SIGKILLs the relay (no shutdown, no flush: a crash) and starts a
    /// new one on the same data directory and key, with `toml`, listening
    /// at `listen` (`127.0.0.1:0`: new free ports; the old port: cells
    /// redial it) and `args`.
    pub fn kill_and_restart(mut self, toml: &str, listen: &str, args: &[&str]) -> Self {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("temp dir"));
        let mut next = Self::start_at(toml, listen, Some(&dir.path().join("data")), args);
        // The data directory lives as long as the relay using it.
        next.dir = dir;
        next
    }

    /// A relay with `toml` (empty: none) listening at `listen`, with its
    /// data directory at `data_dir` (`None`: one of its own), and `args`
    /// after those flags: a relay of a mesh, whose key and port others
    /// know before it starts.
    pub fn start_at(
        toml: &str,
        listen: &str,
        data_dir: Option<&std::path::Path>,
        args: &[&str],
    ) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let data = data_dir.map_or_else(|| dir.path().join("data"), std::path::Path::to_owned);
        let mut cmd = Command::new(bin_path("relay"));
        if !toml.is_empty() {
            let cfg = dir.path().join("relay.toml");
            std::fs::write(&cfg, toml).expect("write config");
            cmd.arg("--config").arg(cfg);
        }
        cmd.args(["--listen", listen, "--admin", "127.0.0.1:0", "--data-dir"])
            .arg(data)
            .args(args)
            // RELAY_TEST_LOG sets the relays' RUST_LOG when debugging a test.
            .env(
                "RUST_LOG",
                std::env::var("RELAY_TEST_LOG").unwrap_or_else(|_| "info,quinn=warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn relay");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().expect("stderr");
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let line = match rx.recv_timeout(START_TIMEOUT) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "relay printed no ready line within {START_TIMEOUT:?}; stderr:\n{}",
                    log.lock().unwrap()
                );
            }
        };
        let field = |name: &str| -> String {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .unwrap_or_else(|| panic!("no {name} in ready line {line:?}"))
                .to_string()
        };
        let key: PublicKey = field("key=").parse().expect("key in ready line");
        let quic: SocketAddr = field("quic=").parse().expect("quic address");
        let admin: SocketAddr = field("admin=http://").parse().expect("admin address");
        let tcp = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("tcp="))
            .filter(|a| *a != "off")
            .map(|a| a.parse().expect("tcp address"));
        RelayProcess {
            child,
            key,
            quic,
            tcp,
            admin,
            dir,
            log,
        }
    }

    /// `KEY@HOST:PORT` of this relay, for cells over QUIC.
    pub fn addr(&self) -> NodeAddr {
        self.addr_over(Transport::Quic)
    }

    /// `KEY@HOST:PORT` of this relay for cells over `transport`; panics
    /// for TCP if it does not listen on TCP.
    pub fn addr_over(&self, transport: Transport) -> NodeAddr {
        let at = match transport {
            Transport::Quic => self.quic,
            Transport::Tcp => self.tcp.expect("the relay listens on TCP"),
        };
        NodeAddr {
            key: self.key,
            host: at.ip().to_string(),
            port: at.port(),
        }
    }

    /// What the relay logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits until the log contains `needle`, or panics with the log.
    pub fn wait_log(&self, needle: &str, timeout: Duration) {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if self.log().contains(needle) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "relay log has no {needle:?} after {timeout:?}:\n{}",
            self.log()
        );
    }

    /// GETs `path` from the admin endpoint: (status, body).
    pub fn http_get(&self, path: &str) -> (u16, String) {
        let mut s =
            TcpStream::connect_timeout(&self.admin, Duration::from_secs(5)).expect("admin connect");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).expect("admin response");
        let status = resp
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = resp
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (status, body)
    }

    /// The sum of every sample of metric `name` whose labels contain
    /// `labels` (e.g. `reason="duplicate"`; empty for all).
    pub fn metric(&self, name: &str, labels: &str) -> f64 {
        let (_, body) = self.http_get("/metrics");
        body.lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
            })
            .filter(|l| labels.is_empty() || l.contains(labels))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Waits until `metric(name, labels) >= at_least`, or panics.
    pub fn wait_metric(&self, name: &str, labels: &str, at_least: f64, timeout: Duration) -> f64 {
        let end = Instant::now() + timeout;
        loop {
            let v = self.metric(name, labels);
            if v >= at_least {
                return v;
            }
            if Instant::now() > end {
                panic!(
                    "{name}{{{labels}}} is {v}, expected at least {at_least} within {timeout:?}; relay log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Like [`wait_log`](Self::wait_log), for async tests: it sleeps on
    /// the tokio timer instead of blocking a worker thread.
    pub async fn wait_log_async(&self, needle: &str, timeout: Duration) {
        let end = tokio::time::Instant::now() + timeout;
        while tokio::time::Instant::now() < end {
            if self.log().contains(needle) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!(
            "relay log has no {needle:?} after {timeout:?}:\n{}",
            self.log()
        );
    }

    /// Like [`wait_metric`](Self::wait_metric), for async tests.
    pub async fn wait_metric_async(
        &self,
        name: &str,
        labels: &str,
        at_least: f64,
        timeout: Duration,
    ) -> f64 {
        let end = tokio::time::Instant::now() + timeout;
        loop {
            let v = self.metric(name, labels);
            if v >= at_least {
                return v;
            }
            if tokio::time::Instant::now() > end {
                panic!(
                    "{name}{{{labels}}} is {v}, expected at least {at_least} within {timeout:?}; relay log:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Kills the relay with SIGKILL (no shutdown of any kind: its peers
    /// see it vanish) and waits for it to be gone.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits (bounded) for the exit status.
    pub fn stop(mut self) -> ExitStatus {
        self.terminate()
    }

    fn terminate(&mut self) -> ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let end = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            if Instant::now() > end {
                let _ = self.child.kill();
                return self.child.wait().expect("wait relay");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
