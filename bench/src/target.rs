//! The server under test: a relay already running (`--relay KEY@HOST:PORT`,
//! optionally `--relay-pid`), or one this process starts (`--spawn`) on
//! free loopback ports with a temporary data directory and stops again
//! (SIGTERM, then kill) whatever happens; or, with `--broker nats`, a
//! nats-server attached to (`--nats-addr`) or started the same way.

use crate::cli::Topology;
use anyhow::{Context as _, Result, bail};
use relay_client::Transport;
use relay_codec::NodeAddr;
use std::collections::VecDeque;
use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

/// How long a spawned server may take to say it is ready.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a spawned server may take to exit after SIGTERM before it is
/// killed (the relay's own default shutdown grace is 3 s).
pub const STOP_TIMEOUT: Duration = Duration::from_secs(6);
/// Lines of a spawned server's output kept for error messages.
const LOG_LINES: usize = 40;

/// The relay a run measures.
pub struct Target {
    /// Where cells reach it, over [`transport`](Self::transport); in a
    /// mesh (`--relays N`), the first relay: where senders attach.
    pub addr: NodeAddr,
    /// Where receivers attach: [`addr`](Self::addr) for one relay, the
    /// last relay of a mesh (for a square, the corner opposite the first).
    pub rx_addr: NodeAddr,
    /// Every relay process of the run (one, or the mesh's N, the first
    /// first), whose CPU and memory are summed in the report; empty if
    /// unknown.
    pub pids: Vec<u32>,
    /// Where cells reach each relay of the run, in mesh order (one entry
    /// for one relay).
    pub mesh_addrs: Vec<NodeAddr>,
    /// How many relays the run measures (1 unless `--relays N`).
    pub relays: u32,
    /// The mesh's shape (`line`, `ring`, `square`); `None` for one relay.
    pub topology: Option<&'static str>,
    /// How cells reach it (`--transport`).
    pub transport: Transport,
    /// Its admin HTTP address, if known.
    pub admin: Option<SocketAddr>,
    /// The admin addresses of the mesh's other relays (all but the first),
    /// whose drops are added to the first's.
    pub mesh_admins: Vec<SocketAddr>,
    spawned: Option<Spawned>,
    /// The mesh's other relays (all but the first), stopped with it.
    mesh: Vec<Spawned>,
}

impl Target {
    /// An already running relay, reached at `addr` over `transport`.
    pub fn attach(addr: NodeAddr, pid: Option<u32>, transport: Transport) -> Result<Self> {
        check_pid("--relay-pid", pid, "relay")?;
        Ok(Self {
            rx_addr: addr.clone(),
            mesh_addrs: vec![addr.clone()],
            addr,
            pids: pid.into_iter().collect(),
            relays: 1,
            topology: None,
            transport,
            admin: None,
            mesh_admins: Vec::new(),
            spawned: None,
            mesh: Vec::new(),
        })
    }

    /// Starts the `relay` binary (`bin`, or the one beside this executable,
    /// else on PATH) on 127.0.0.1 with free ports and a temporary data
    /// directory, and waits for its ready line; cells reach it over
    /// `transport` at the address that line gives for it.
    pub fn spawn(
        bin: Option<&Path>,
        config: Option<&Path>,
        log: &str,
        transport: Transport,
    ) -> Result<Self> {
        let bin = relay_bin(bin)?;
        let dir = tempfile::Builder::new()
            .prefix("relay-bench.")
            .tempdir()
            .context("creating a temporary data directory for the relay")?;
        let mut cmd = Command::new(&bin);
        cmd.env("RUST_LOG", log);
        if let Some(c) = config {
            cmd.arg("--config").arg(c);
        }
        cmd.args([
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(dir.path().join("data"));
        let (mut spawned, lines) = Spawned::start(cmd, bin, Some(dir))?;
        let line = spawned.wait_for("the relay", &lines, |l| {
            l.starts_with("relay ready:").then(|| l.to_owned())
        })?;
        let pid = spawned.child.id();
        let (addr, admin) = parse_ready(&line, transport)?;
        Ok(Self {
            rx_addr: addr.clone(),
            mesh_addrs: vec![addr.clone()],
            addr,
            pids: vec![pid],
            relays: 1,
            topology: None,
            transport,
            admin,
            mesh_admins: Vec::new(),
            spawned: Some(spawned),
            mesh: Vec::new(),
        })
    }

    /// Starts `n` relays (as [`spawn`](Self::spawn) does one), each with
    /// its own key (made beforehand with `relay id --create`) and a
    /// planned free port, peered over QUIC along the edges of `topology`
    /// (both ends of an edge list each other, as `--peer`), and waits
    /// until every relay has all its peer links up and sees all `n` in
    /// its `/topology` (bounded by [`MESH_TIMEOUT`]). Senders attach to
    /// the first relay, receivers to the last.
    pub fn spawn_mesh(
        bin: Option<&Path>,
        config: Option<&Path>,
        log: &str,
        transport: Transport,
        n: usize,
        topology: Topology,
    ) -> Result<Self> {
        if n > MAX_RELAYS {
            bail!("--relays {n}: at most {MAX_RELAYS} relays are spawned on one machine");
        }
        let bin = relay_bin(bin)?;
        let edges = mesh_edges(n, topology);
        let mut planned = Vec::with_capacity(n);
        for i in 0..n {
            let dir = tempfile::Builder::new()
                .prefix("relay-bench.")
                .tempdir()
                .context("creating a temporary data directory for a relay")?;
            let data = dir.path().join("data");
            let out = Command::new(&bin)
                .args(["id", "--create", "--data-dir"])
                .arg(&data)
                .stdin(Stdio::null())
                .output()
                .with_context(|| format!("running {} id --create", bin.display()))?;
            if !out.status.success() {
                bail!(
                    "`{} id --create` for relay {i} failed: {}",
                    bin.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            let key = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            planned.push((key, free_port(i)?, dir));
        }
        let mut procs = Vec::with_capacity(n);
        for (i, (_, port, dir)) in planned.iter().enumerate() {
            let mut cmd = Command::new(&bin);
            cmd.env("RUST_LOG", log);
            if let Some(c) = config {
                cmd.arg("--config").arg(c);
            }
            cmd.arg("--listen")
                .arg(format!("127.0.0.1:{port}"))
                .args(["--admin", "127.0.0.1:0", "--data-dir"])
                .arg(dir.path().join("data"));
            for &(a, b) in &edges {
                let other = match (a == i, b == i) {
                    (true, _) => b,
                    (_, true) => a,
                    _ => continue,
                };
                let (key, port, _) = &planned[other];
                cmd.arg("--peer").arg(format!("{key}@127.0.0.1:{port}"));
            }
            procs.push(Spawned::start(cmd, bin.clone(), None)?);
        }
        // The data directories go with the processes, removed after they stop.
        let mut spawned = Vec::with_capacity(n);
        let mut ready = Vec::with_capacity(n);
        for ((mut s, lines), (_, _, dir)) in procs.into_iter().zip(planned) {
            s._dir = Some(dir);
            let line = s.wait_for("a mesh relay", &lines, |l| {
                l.starts_with("relay ready:").then(|| l.to_owned())
            })?;
            let (addr, admin) = parse_ready(&line, transport)?;
            let admin = admin.context("a mesh relay's ready line has no admin address")?;
            ready.push((addr, admin));
            spawned.push(s);
        }
        wait_for_mesh(&mut spawned, &ready, &edges)?;
        let pids = spawned.iter().map(|s| s.child.id()).collect();
        let mut spawned = spawned.into_iter();
        let first = spawned.next().expect("n >= 1");
        Ok(Self {
            addr: ready[0].0.clone(),
            rx_addr: ready[n - 1].0.clone(),
            mesh_addrs: ready.iter().map(|r| r.0.clone()).collect(),
            pids,
            relays: n as u32,
            topology: Some(topology.name()),
            transport,
            admin: Some(ready[0].1),
            mesh_admins: ready[1..].iter().map(|r| r.1).collect(),
            spawned: Some(first),
            mesh: spawned.collect(),
        })
    }

    /// The sum of the samples of metric `name` whose labels contain
    /// `labels` (empty: all), from the relay's admin endpoint; `None` if
    /// its address is unknown (attached relays) or it does not answer.
    pub async fn metric(&self, name: &str, labels: &str) -> Option<f64> {
        let body = self.metrics().await?;
        metric_sum(&body, name, labels)
    }

    /// The relay's `/metrics` text; `None` if its admin address is unknown
    /// (attached relays) or it does not answer.
    async fn metrics(&self) -> Option<String> {
        let admin = self.admin?;
        tokio::task::spawn_blocking(move || http_get(admin, "/metrics"))
            .await
            .ok()
            .flatten()
    }

    /// Messages in, out and dropped, every lane and reason, from the
    /// relay's metrics (one read of `/metrics`); in a mesh, in and out are
    /// the first relay's and drops are summed over every relay (a message
    /// may be dropped at any hop).
    pub async fn counts(&self) -> ServerCounts {
        let Some(body) = self.metrics().await else {
            return ServerCounts::default();
        };
        let n = |name| metric_sum(&body, name, "").map(|v| v as u64);
        let mut dropped = n("celluler_drops_total");
        for &admin in &self.mesh_admins {
            let other = tokio::task::spawn_blocking(move || http_get(admin, "/metrics"))
                .await
                .ok()
                .flatten()
                .and_then(|b| metric_sum(&b, "celluler_drops_total", ""));
            dropped = dropped.zip(other).map(|(a, b)| a + b as u64);
        }
        ServerCounts {
            msgs_in: n("celluler_messages_in_total"),
            msgs_out: n("celluler_messages_out_total"),
            dropped,
        }
    }

    /// `spawned` or `attached`.
    pub fn kind(&self) -> &'static str {
        if self.spawned.is_some() {
            "spawned"
        } else {
            "attached"
        }
    }

    /// For error messages: whether a spawned relay has died, with its log.
    pub fn health(&mut self) -> Option<String> {
        if let Some(h) = self.spawned.as_mut()?.health("relay") {
            return Some(h);
        }
        self.mesh.iter_mut().find_map(|s| s.health("mesh relay"))
    }

    /// Stops a spawned relay (SIGTERM, then kill after [`STOP_TIMEOUT`]);
    /// nothing for an attached one. Also done on drop.
    pub fn stop(&mut self) {
        if let Some(s) = self.spawned.take() {
            drop(s);
        }
        self.mesh.clear();
    }
}

/// A server process this process started (a relay or nats-server):
/// stopped with SIGTERM, then killed, when dropped.
struct Spawned {
    child: Child,
    bin: PathBuf,
    /// The relay's temporary data directory, removed after it stops.
    _dir: Option<tempfile::TempDir>,
    log_tail: Arc<Mutex<VecDeque<String>>>,
}

impl Spawned {
    /// Starts `cmd` (the program at `bin`) with its stdout and stderr
    /// piped: their lines go to the returned channel until the process
    /// ends, and the last [`LOG_LINES`] of them to the log tail.
    fn start(
        mut cmd: Command,
        bin: PathBuf,
        dir: Option<tempfile::TempDir>,
    ) -> Result<(Self, mpsc::Receiver<String>)> {
        // Bounded: the lines are read as they come until the server is
        // ready; after that the receiver is gone and sends fail at once.
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // If this process dies without cleaning up (SIGKILL), the server
        // gets SIGTERM from the kernel instead of living on. Servers are
        // spawned from the main thread, which lives as long as the process.
        // SAFETY: prctl is async-signal-safe and touches only this child.
        unsafe {
            use std::os::unix::process::CommandExt as _;
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let log_tail = Arc::new(Mutex::new(VecDeque::new()));
        let (tx, rx) = mpsc::sync_channel(LOG_LINES);
        let out: [Option<Box<dyn std::io::Read + Send>>; 2] = [
            child.stdout.take().map(|s| Box::new(s) as _),
            child.stderr.take().map(|s| Box::new(s) as _),
        ];
        for stream in out.into_iter().flatten() {
            let (tail, tx) = (log_tail.clone(), tx.clone());
            // Keep reading after the ready line so the server never blocks
            // on a full pipe; from then on lines go to the tail only.
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    {
                        let mut t = tail.lock().unwrap_or_else(|e| e.into_inner());
                        if t.len() == LOG_LINES {
                            t.pop_front();
                        }
                        t.push_back(line.clone());
                    }
                    let _ = tx.send(line);
                }
            });
        }
        let spawned = Spawned {
            child,
            bin,
            _dir: dir,
            log_tail,
        };
        Ok((spawned, rx))
    }

    /// Waits up to [`START_TIMEOUT`] for a line of the server's output
    /// that `ready` accepts, and returns what it made of it; fails with the
    /// server's last log lines if it exits or prints no such line.
    fn wait_for<T>(
        &mut self,
        what: &str,
        lines: &mpsc::Receiver<String>,
        mut ready: impl FnMut(&str) -> Option<T>,
    ) -> Result<T> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match lines.recv_timeout(Duration::from_millis(100)) {
                Ok(l) => {
                    if let Some(v) = ready(&l) {
                        return Ok(v);
                    }
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                // Both streams closed: the process is ending; try_wait
                // below tells.
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                // Let the output threads catch the last lines.
                std::thread::sleep(Duration::from_millis(100));
                bail!(
                    "{what} {} exited ({status}) before it was ready; its last log lines:\n{}",
                    self.bin.display(),
                    self.log()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "{what} {} did not say it was ready within {}s; its last log lines:\n{}",
                    self.bin.display(),
                    START_TIMEOUT.as_secs(),
                    self.log()
                );
            }
        }
    }

    /// Whether the process has exited, with its last log lines.
    fn health(&mut self, what: &str) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(format!(
                "the spawned {what} exited ({status}); its last log lines:\n{}",
                self.log()
            )),
            _ => None,
        }
    }

    fn log(&self) -> String {
        let t = self.log_tail.lock().unwrap_or_else(|e| e.into_inner());
        if t.is_empty() {
            return "  (nothing)".into();
        }
        t.iter().map(|l| format!("  {l}\n")).collect()
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "relay-bench: the spawned {} did not stop within {}s of SIGTERM; killing it",
            self.bin.display(),
            STOP_TIMEOUT.as_secs()
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The sum of the samples of metric `name` whose labels contain `labels`
/// (empty: all) in a Prometheus text exposition; `None` if it has none.
fn metric_sum(body: &str, name: &str, labels: &str) -> Option<f64> {
    let mut found = false;
    let sum = body
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with('{') || r.starts_with(' '))
        })
        .filter(|l| labels.is_empty() || l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .inspect(|_| found = true)
        .sum();
    found.then_some(sum)
}

/// Counters a server keeps itself, read before and after a run; `None`
/// where the server does not say (an attached relay or nats-server whose
/// admin or monitoring address is unknown).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServerCounts {
    /// Messages the server took in from senders.
    pub msgs_in: Option<u64>,
    /// Messages the server handed to receivers.
    pub msgs_out: Option<u64>,
    /// Messages the server dropped (the relay; nats-server does not count
    /// them).
    pub dropped: Option<u64>,
}

impl ServerCounts {
    /// What changed from `before` to `self`.
    pub fn since(&self, before: &ServerCounts) -> ServerCounts {
        let d = |a: Option<u64>, b: Option<u64>| Some(a?.saturating_sub(b?));
        ServerCounts {
            msgs_in: d(self.msgs_in, before.msgs_in),
            msgs_out: d(self.msgs_out, before.msgs_out),
            dropped: d(self.dropped, before.dropped),
        }
    }
}

/// The nats-server a `--broker nats` run measures: one already running
/// (`--nats-addr`, optionally `--nats-pid`), or one this process starts
/// (`--spawn`) on free loopback ports and stops again.
pub struct NatsTarget {
    /// Its client address, HOST:PORT.
    pub addr: String,
    /// Its process, for CPU and memory; `None` if unknown.
    pub pid: Option<u32>,
    /// Its HTTP monitoring address (`/varz`), if known.
    pub monitor: Option<SocketAddr>,
    spawned: Option<Spawned>,
}

impl NatsTarget {
    /// An already running nats-server.
    pub fn attach(addr: String, pid: Option<u32>) -> Result<Self> {
        check_pid("--nats-pid", pid, "nats-server")?;
        Ok(Self {
            addr,
            pid,
            monitor: None,
            spawned: None,
        })
    }

    /// Starts `nats-server` (`bin`, else the one on PATH) on 127.0.0.1 with
    /// a free client port and a free monitoring port (`-p -1 -m -1`), its
    /// default configuration otherwise (no JetStream), and waits until it
    /// says it is ready.
    pub fn spawn(bin: Option<&Path>) -> Result<Self> {
        let bin = match bin {
            Some(b) if b.is_file() => b.to_path_buf(),
            Some(b) => bail!(
                "--nats-bin {}: no such file; install nats-server (Debian: `apt-get install \
                 nats-server`) or give its path",
                b.display()
            ),
            None => find_on_path("nats-server").ok_or_else(|| {
                anyhow::anyhow!(
                    "cannot find nats-server on PATH to --spawn it: install it (Debian: \
                     `apt-get install nats-server`), pass --nats-bin PATH, or attach to a \
                     running one with --nats-addr HOST:PORT"
                )
            })?,
        };
        let mut cmd = Command::new(&bin);
        cmd.args(["-a", "127.0.0.1", "-p", "-1", "-m", "-1"]);
        let (mut spawned, lines) = Spawned::start(cmd, bin, None)?;
        let (mut addr, mut monitor) = (None, None);
        spawned.wait_for("nats-server", &lines, |l| {
            if let Some(a) = l.split("Listening for client connections on ").nth(1) {
                addr = Some(a.trim().to_owned());
            } else if let Some(a) = l.split("Starting http monitor on ").nth(1) {
                monitor = a.trim().parse::<SocketAddr>().ok();
            }
            l.contains("Server is ready").then_some(())
        })?;
        let Some(addr) = addr else {
            bail!(
                "nats-server said it was ready without saying its client port; its last log \
                 lines:\n{}",
                spawned.log()
            );
        };
        Ok(Self {
            addr,
            pid: Some(spawned.child.id()),
            monitor,
            spawned: Some(spawned),
        })
    }

    /// Messages in and out from nats-server's `/varz` (it counts no drops);
    /// unknown without its monitoring address.
    pub async fn counts(&self) -> ServerCounts {
        let Some(monitor) = self.monitor else {
            return ServerCounts::default();
        };
        let body = tokio::task::spawn_blocking(move || http_get(monitor, "/varz"))
            .await
            .ok()
            .flatten();
        let Some(v) = body.and_then(|b| serde_json::from_str::<serde_json::Value>(&b).ok()) else {
            return ServerCounts::default();
        };
        ServerCounts {
            msgs_in: v["in_msgs"].as_u64(),
            msgs_out: v["out_msgs"].as_u64(),
            dropped: None,
        }
    }
}

/// The server a message mode measures.
// One per run, never moved in a loop: the size difference costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum Server {
    /// A Celluler relay.
    Relay(Target),
    /// A nats-server.
    Nats(NatsTarget),
}

impl Server {
    /// `relay` or `nats`.
    pub fn broker(&self) -> &'static str {
        match self {
            Server::Relay(_) => "relay",
            Server::Nats(_) => "nats",
        }
    }

    /// Every server process whose CPU and memory the report sums (the
    /// relays of a mesh); empty if unknown.
    pub fn pids(&self) -> Vec<u32> {
        match self {
            Server::Relay(t) => t.pids.clone(),
            Server::Nats(n) => n.pid.into_iter().collect(),
        }
    }

    /// `spawned` or `attached`.
    pub fn kind(&self) -> &'static str {
        let spawned = match self {
            Server::Relay(t) => t.spawned.is_some(),
            Server::Nats(n) => n.spawned.is_some(),
        };
        if spawned { "spawned" } else { "attached" }
    }

    /// Where clients reach it: `KEY@HOST:PORT` for a relay, `HOST:PORT`
    /// for nats-server.
    pub fn address(&self) -> String {
        match self {
            Server::Relay(t) => t.addr.to_string(),
            Server::Nats(n) => n.addr.clone(),
        }
    }

    /// Its own counters of messages in, out and dropped.
    pub async fn counts(&self) -> ServerCounts {
        match self {
            Server::Relay(t) => t.counts().await,
            Server::Nats(n) => n.counts().await,
        }
    }

    /// For error messages: whether a spawned server has died, with its log.
    pub fn health(&mut self) -> Option<String> {
        match self {
            Server::Relay(t) => t.health(),
            Server::Nats(n) => n.spawned.as_mut()?.health("nats-server"),
        }
    }

    /// Stops a spawned server (SIGTERM, then kill after [`STOP_TIMEOUT`]);
    /// nothing for an attached one. Also done on drop.
    pub fn stop(&mut self) {
        match self {
            Server::Relay(t) => t.stop(),
            Server::Nats(n) => drop(n.spawned.take()),
        }
    }
}

/// The body of a plain HTTP GET, bounded to a few seconds.
fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    resp.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())
}

/// The relay binary: `bin` if given (and a file), else [`find_relay`].
fn relay_bin(bin: Option<&Path>) -> Result<PathBuf> {
    Ok(match bin {
        Some(b) if b.is_file() => b.to_path_buf(),
        Some(b) => bail!(
            "--relay-bin {}: no such file; build the relay with `cargo build --release -p relay`",
            b.display()
        ),
        None => find_relay()?,
    })
}

/// The most relays `--relays` starts (each is a process with its own
/// runtime; more would measure the machine, not the mesh).
pub const MAX_RELAYS: usize = 64;
/// How long a spawned mesh may take, after every relay is ready, until
/// every peer link is up and every relay sees all the others.
pub const MESH_TIMEOUT: Duration = Duration::from_secs(30);

/// The peer links of `n` relays in `topology`, as pairs of indices:
/// line 0-1-...-(n-1); ring, the line plus (n-1)-0 (from 3 relays); square,
/// a grid of ceil(sqrt n) columns filled row by row, each relay linked to
/// its right and lower neighbours (relay 0 and relay n-1 are opposite
/// corners of a full grid).
pub fn mesh_edges(n: usize, topology: Topology) -> Vec<(usize, usize)> {
    let line = (1..n).map(|i| (i - 1, i));
    match topology {
        Topology::Line => line.collect(),
        Topology::Ring => {
            let mut e: Vec<_> = line.collect();
            if n >= 3 {
                e.push((n - 1, 0));
            }
            e
        }
        Topology::Square => {
            let side = (1..=n).find(|s| s * s >= n).unwrap_or(1);
            let mut e = Vec::new();
            for i in 0..n {
                if (i + 1) % side != 0 && i + 1 < n {
                    e.push((i, i + 1));
                }
                if i + side < n {
                    e.push((i, i + side));
                }
            }
            e
        }
    }
}

/// A loopback port free on UDP and TCP when asked, for mesh relay `i`:
/// below Linux's ephemeral range (32768 and up), so no socket bound to
/// port 0 (a cell's, another relay's) takes it before its relay starts;
/// tried from a start drawn from the process id, so runs at once start
/// apart.
fn free_port(i: usize) -> Result<u16> {
    const PORTS: std::ops::Range<u32> = 20_000..32_000;
    let span = PORTS.end - PORTS.start;
    let base = std::process::id()
        .wrapping_mul(7919)
        .wrapping_add(i as u32 * 101);
    for k in 0..span {
        let port = (PORTS.start + base.wrapping_add(k.wrapping_mul(37)) % span) as u16;
        let Ok(_udp) = std::net::UdpSocket::bind(("127.0.0.1", port)) else {
            continue;
        };
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no port of {PORTS:?} is free on UDP and TCP for a mesh relay")
}

/// Waits (at most [`MESH_TIMEOUT`]) until every relay has as many peer
/// links up as `edges` give it (`celluler_peers`) and lists all of them
/// in its `/topology`; fails naming the relays not there yet.
fn wait_for_mesh(
    procs: &mut [Spawned],
    relays: &[(NodeAddr, SocketAddr)],
    edges: &[(usize, usize)],
) -> Result<()> {
    let n = relays.len();
    let degree = |i: usize| edges.iter().filter(|&&(a, b)| a == i || b == i).count();
    let deadline = Instant::now() + MESH_TIMEOUT;
    loop {
        let mut waiting = Vec::new();
        for (i, (addr, admin)) in relays.iter().enumerate() {
            let peers = http_get(*admin, "/metrics")
                .and_then(|b| metric_sum(&b, "celluler_peers", ""))
                .unwrap_or(-1.0);
            let known = http_get(*admin, "/topology")
                .and_then(|b| serde_json::from_str::<serde_json::Value>(&b).ok())
                .and_then(|v| v["relays"].as_array().map(Vec::len))
                .unwrap_or(0);
            if peers < degree(i) as f64 || known < n {
                waiting.push(format!(
                    "relay {i} ({}): {peers} of {} peer links, {known} of {n} relays known",
                    addr.key,
                    degree(i)
                ));
            }
        }
        if waiting.is_empty() {
            return Ok(());
        }
        for p in procs.iter_mut() {
            if let Some(h) = p.health("mesh relay") {
                bail!("{h}");
            }
        }
        if Instant::now() >= deadline {
            bail!(
                "the mesh of {n} relays was not up within {}s:\n  {}",
                MESH_TIMEOUT.as_secs(),
                waiting.join("\n  ")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The `relay` binary beside this executable, else on PATH.
fn find_relay() -> Result<PathBuf> {
    let mut looked = Vec::new();
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
    {
        let p = dir.join("relay");
        if p.is_file() {
            return Ok(p);
        }
        looked.push(p.display().to_string());
    }
    if let Some(p) = find_on_path("relay") {
        return Ok(p);
    }
    looked.push("every directory on PATH".into());
    bail!(
        "cannot find the relay binary to --spawn: looked at {}; build it with \
         `cargo build --release -p relay` (or `cargo build --release`), pass --relay-bin PATH, \
         or attach to a running relay with --relay KEY@HOST:PORT",
        looked.join(" and ")
    )
}

/// Refuses a `flag` pid that is no process on this machine (`program`: what
/// it should be the pid of).
fn check_pid(flag: &str, pid: Option<u32>, program: &str) -> Result<()> {
    if let Some(p) = pid
        && !Path::new(&format!("/proc/{p}/stat")).exists()
    {
        bail!(
            "{flag} {p}: no such process on this machine; give {program}'s pid (e.g. \
             `pgrep -x {program}`) or leave {flag} out (CPU and memory are then not reported)"
        );
    }
    Ok(())
}

/// The first file called `name` in a directory on PATH.
fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The relay's address for `transport` and its admin address, from its
/// ready line (`relay ready: key=KEY quic=ADDR tcp=ADDR admin=http://ADDR
/// data=DIR ...`; `tcp=off` when it does not listen on TCP).
pub fn parse_ready(line: &str, transport: Transport) -> Result<(NodeAddr, Option<SocketAddr>)> {
    let field = |name: &str| line.split_whitespace().find_map(|w| w.strip_prefix(name));
    let which = match transport {
        Transport::Quic => "quic=",
        Transport::Tcp => "tcp=",
    };
    let (Some(key), Some(at)) = (field("key="), field(which)) else {
        bail!("the relay's ready line has no key= or {which}: {line:?}");
    };
    if at == "off" {
        bail!(
            "the relay does not listen on TCP (tcp=off on its ready line): leave node.listen_tcp \
             out of --relay-config, or use --transport quic"
        );
    }
    let at: SocketAddr = at
        .parse()
        .with_context(|| format!("bad {which} address in the relay's ready line {line:?}"))?;
    let addr: NodeAddr = format!("{key}@{at}")
        .parse()
        .with_context(|| format!("bad key in the relay's ready line {line:?}"))?;
    let admin = field("admin=http://").and_then(|a| a.parse().ok());
    Ok((addr, admin))
}

/// Raises this process's soft open-file limit to the hard limit; returns
/// the soft limit now in force.
pub fn raise_nofile_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to our own struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                return want.rlim_cur;
            }
        }
    }
    lim.rlim_cur
}

#[cfg(test)]
mod tests {
    #[test]
    fn mesh_edges_follow_the_topology() {
        assert_eq!(mesh_edges(3, Topology::Line), vec![(0, 1), (1, 2)]);
        assert_eq!(mesh_edges(1, Topology::Ring), vec![]);
        assert_eq!(mesh_edges(2, Topology::Ring), vec![(0, 1)]);
        assert_eq!(mesh_edges(3, Topology::Ring), vec![(0, 1), (1, 2), (2, 0)]);
        // 0 1
        // 2 3: relays 0 and 3 are opposite corners, two paths between them.
        assert_eq!(
            mesh_edges(4, Topology::Square),
            vec![(0, 1), (0, 2), (1, 3), (2, 3)]
        );
        // 0 1 2
        // 3 4: every relay linked.
        assert_eq!(
            mesh_edges(5, Topology::Square),
            vec![(0, 1), (0, 3), (1, 2), (1, 4), (3, 4)]
        );
    }
    use super::*;

    #[test]
    fn reads_the_ready_line() {
        let key = relay_codec::Keypair::from_secret_bytes(&[9; 32]).public();
        let line = format!(
            "relay ready: key={key} quic=127.0.0.1:4433 tcp=127.0.0.1:4434 \
             admin=http://127.0.0.1:9433 data=x | next: y"
        );
        let (addr, admin) = parse_ready(&line, Transport::Quic).unwrap();
        assert_eq!(addr.key, key);
        assert_eq!(addr.port, 4433);
        assert_eq!(admin, Some("127.0.0.1:9433".parse().unwrap()));
        let (addr, _) = parse_ready(&line, Transport::Tcp).unwrap();
        assert_eq!(addr.port, 4434);
        assert!(parse_ready("relay ready: nothing", Transport::Quic).is_err());
        let off = line.replace("tcp=127.0.0.1:4434", "tcp=off");
        let err = parse_ready(&off, Transport::Tcp).unwrap_err().to_string();
        assert!(err.contains("does not listen on TCP"), "{err}");
    }

    #[test]
    fn sums_metrics_and_their_changes() {
        let body = "# HELP celluler_drops_total x\n\
                    celluler_drops_total{reason=\"slow_receiver\"} 3\n\
                    celluler_drops_total{reason=\"duplicate\"} 4\n\
                    celluler_drops_total_other 100\n\
                    celluler_links{role=\"cell\"} 2\n";
        assert_eq!(metric_sum(body, "celluler_drops_total", ""), Some(7.0));
        assert_eq!(
            metric_sum(body, "celluler_drops_total", "reason=\"duplicate\""),
            Some(4.0)
        );
        assert_eq!(metric_sum(body, "celluler_messages_in_total", ""), None);
        let before = ServerCounts {
            msgs_in: Some(10),
            msgs_out: Some(9),
            dropped: None,
        };
        let after = ServerCounts {
            msgs_in: Some(25),
            msgs_out: Some(20),
            dropped: Some(1),
        };
        assert_eq!(
            after.since(&before),
            ServerCounts {
                msgs_in: Some(15),
                msgs_out: Some(11),
                dropped: None,
            }
        );
    }

    #[test]
    fn nofile_limit_is_at_least_what_it_was() {
        assert!(raise_nofile_limit() >= 64);
    }
}
