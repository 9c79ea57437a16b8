//! The relay under test: one already running (`--relay KEY@HOST:PORT`,
//! optionally `--relay-pid`), or one this process starts (`--spawn`) on
//! free loopback ports with a temporary data directory and stops again
//! (SIGTERM, then kill) whatever happens.

use anyhow::{Context as _, Result, bail};
use relay_codec::NodeAddr;
use std::collections::VecDeque;
use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

/// How long a spawned relay may take to print its ready line.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a spawned relay may take to exit after SIGTERM before it is
/// killed (its own default shutdown grace is 3 s).
pub const STOP_TIMEOUT: Duration = Duration::from_secs(6);
/// Lines of the spawned relay's stderr kept for error messages.
const LOG_LINES: usize = 40;

/// The relay a run measures.
pub struct Target {
    /// Where cells reach it.
    pub addr: NodeAddr,
    /// Its process, for CPU and memory; `None` if unknown.
    pub pid: Option<u32>,
    /// Its admin HTTP address, if known.
    pub admin: Option<SocketAddr>,
    spawned: Option<Spawned>,
}

impl Target {
    /// An already running relay.
    pub fn attach(addr: NodeAddr, pid: Option<u32>) -> Result<Self> {
        if let Some(p) = pid
            && !Path::new(&format!("/proc/{p}/stat")).exists()
        {
            bail!(
                "--relay-pid {p}: no such process on this machine; give the relay's pid \
                 (e.g. `pgrep -x relay`) or leave --relay-pid out (CPU and memory are then \
                 not reported)"
            );
        }
        Ok(Self {
            addr,
            pid,
            admin: None,
            spawned: None,
        })
    }

    /// Starts the `relay` binary (`bin`, or the one beside this executable,
    /// else on PATH) on 127.0.0.1 with free ports and a temporary data
    /// directory, and waits for its ready line.
    pub fn spawn(bin: Option<&Path>, config: Option<&Path>, log: &str) -> Result<Self> {
        let bin = match bin {
            Some(b) if b.is_file() => b.to_path_buf(),
            Some(b) => bail!(
                "--relay-bin {}: no such file; build the relay with `cargo build --release -p relay`",
                b.display()
            ),
            None => find_relay()?,
        };
        let dir = tempfile::Builder::new()
            .prefix("relay-bench.")
            .tempdir()
            .context("creating a temporary data directory for the relay")?;
        let mut cmd = Command::new(&bin);
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
        .arg(dir.path().join("data"))
        .env("RUST_LOG", log)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        // If this process dies without cleaning up (SIGKILL), the relay gets
        // SIGTERM from the kernel instead of living on. The relay is spawned
        // from the main thread, which lives as long as the process.
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
            .with_context(|| format!("starting the relay {}", bin.display()))?;
        let pid = child.id();
        let log_tail = Arc::new(Mutex::new(VecDeque::new()));
        if let Some(stderr) = child.stderr.take() {
            let tail = log_tail.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    let mut t = tail.lock().unwrap_or_else(|e| e.into_inner());
                    if t.len() == LOG_LINES {
                        t.pop_front();
                    }
                    t.push_back(line);
                }
            });
        }
        let (tx, rx) = mpsc::channel();
        if let Some(stdout) = child.stdout.take() {
            std::thread::spawn(move || {
                // Keep reading after the ready line so the relay never
                // blocks on a full pipe.
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    let _ = tx.send(line);
                }
            });
        }
        let mut spawned = Spawned {
            child,
            bin,
            _dir: dir,
            log_tail,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        let line = loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(l) if l.starts_with("relay ready:") => break l,
                Ok(_) => continue,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {}
            }
            if let Ok(Some(status)) = spawned.child.try_wait() {
                std::thread::sleep(Duration::from_millis(100));
                bail!(
                    "the relay {} exited ({status}) before it was ready; its last log lines:\n{}",
                    spawned.bin.display(),
                    spawned.log()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "the relay {} printed no ready line within {}s; its last log lines:\n{}",
                    spawned.bin.display(),
                    START_TIMEOUT.as_secs(),
                    spawned.log()
                );
            }
        };
        let (addr, admin) = parse_ready(&line)?;
        Ok(Self {
            addr,
            pid: Some(pid),
            admin,
            spawned: Some(spawned),
        })
    }

    /// The sum of the samples of metric `name` whose labels contain
    /// `labels` (empty: all), from the relay's admin endpoint; `None` if
    /// its address is unknown (attached relays) or it does not answer.
    pub async fn metric(&self, name: &str, labels: &str) -> Option<f64> {
        let admin = self.admin?;
        let (name, labels) = (name.to_owned(), labels.to_owned());
        tokio::task::spawn_blocking(move || {
            let body = http_get(admin, "/metrics")?;
            let mut found = false;
            let sum = body
                .lines()
                .filter(|l| !l.starts_with('#'))
                .filter(|l| {
                    l.strip_prefix(name.as_str())
                        .is_some_and(|r| r.starts_with('{') || r.starts_with(' '))
                })
                .filter(|l| labels.is_empty() || l.contains(labels.as_str()))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .inspect(|_| found = true)
                .sum();
            found.then_some(sum)
        })
        .await
        .ok()
        .flatten()
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
        let s = self.spawned.as_mut()?;
        match s.child.try_wait() {
            Ok(Some(status)) => Some(format!(
                "the spawned relay exited ({status}); its last log lines:\n{}",
                s.log()
            )),
            _ => None,
        }
    }

    /// The last lines a spawned relay logged.
    pub fn log(&self) -> Option<String> {
        self.spawned.as_ref().map(Spawned::log)
    }

    /// Stops a spawned relay (SIGTERM, then kill after [`STOP_TIMEOUT`]);
    /// nothing for an attached one. Also done on drop.
    pub fn stop(&mut self) {
        if let Some(s) = self.spawned.take() {
            drop(s);
        }
    }
}

/// A relay this process started.
struct Spawned {
    child: Child,
    bin: PathBuf,
    _dir: tempfile::TempDir,
    log_tail: Arc<Mutex<VecDeque<String>>>,
}

impl Spawned {
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
            "relay-bench: the spawned relay did not stop within {}s of SIGTERM; killing it",
            STOP_TIMEOUT.as_secs()
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
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
    if let Some(path) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&path) {
            let p = d.join("relay");
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    looked.push("every directory on PATH".into());
    bail!(
        "cannot find the relay binary to --spawn: looked at {}; build it with \
         `cargo build --release -p relay` (or `cargo build --release`), pass --relay-bin PATH, \
         or attach to a running relay with --relay KEY@HOST:PORT",
        looked.join(" and ")
    )
}

/// The relay's address and admin address from its ready line
/// (`relay ready: key=KEY quic=ADDR admin=http://ADDR data=DIR ...`).
pub fn parse_ready(line: &str) -> Result<(NodeAddr, Option<SocketAddr>)> {
    let field = |name: &str| line.split_whitespace().find_map(|w| w.strip_prefix(name));
    let (Some(key), Some(quic)) = (field("key="), field("quic=")) else {
        bail!("the relay's ready line has no key= or quic=: {line:?}");
    };
    let quic: SocketAddr = quic
        .parse()
        .with_context(|| format!("bad quic= address in the relay's ready line {line:?}"))?;
    let addr: NodeAddr = format!("{key}@{quic}")
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
    use super::*;

    #[test]
    fn reads_the_ready_line() {
        let key = relay_codec::Keypair::from_secret_bytes(&[9; 32]).public();
        let line = format!(
            "relay ready: key={key} quic=127.0.0.1:4433 admin=http://127.0.0.1:9433 data=x | next: y"
        );
        let (addr, admin) = parse_ready(&line).unwrap();
        assert_eq!(addr.key, key);
        assert_eq!(addr.port, 4433);
        assert_eq!(admin, Some("127.0.0.1:9433".parse().unwrap()));
        assert!(parse_ready("relay ready: nothing").is_err());
    }

    #[test]
    fn nofile_limit_is_at_least_what_it_was() {
        assert!(raise_nofile_limit() >= 64);
    }
}
