//! The real relay, in this test process: the `relay` crate's
//! [`Node`](relay::node::Node) on free loopback ports with a temporary data
//! directory, QUIC and TLS over TCP on one port. It can be stopped and
//! started again on the same ports with the same key (a relay restart),
//! and is stopped when dropped.

#![allow(dead_code)]

use relay::config::RelayConfig;
use relay::node::Node;
use relay_client::Transport;
use relay_client::cell::{Cell, CellOptions, Event, Received};
use relay_codec::{Keypair, NodeAddr, PublicKey};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// How long any one wait of a test may take before it fails.
pub const WAIT: Duration = Duration::from_secs(20);

/// A relay running in this process.
pub struct TestRelay {
    /// Its key.
    pub key: PublicKey,
    /// Its QUIC address; TLS over TCP listens on the same port.
    pub quic: SocketAddr,
    /// Its TCP address.
    pub tcp: SocketAddr,
    config: String,
    dir: tempfile::TempDir,
    running: Option<(oneshot::Sender<()>, JoinHandle<()>)>,
}

impl TestRelay {
    /// A relay with the embedded defaults.
    pub async fn start() -> Self {
        Self::with_config("").await
    }

    /// A relay with `toml` as its config (addresses and data directory are
    /// set here).
    pub async fn with_config(toml: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let node = bind(toml, &dir, "127.0.0.1:0".parse().unwrap()).await;
        let mut relay = TestRelay {
            key: node.key(),
            quic: node.quic_addr(),
            tcp: node.tcp_addr().expect("the relay listens on TCP"),
            config: toml.to_owned(),
            dir,
            running: None,
        };
        relay.run(node);
        relay
    }

    fn run(&mut self, node: Node) {
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(node.run(async {
            let _ = stopped.await;
        }));
        self.running = Some((stop, task));
    }

    /// `KEY@HOST:PORT` for cells over QUIC.
    pub fn addr(&self) -> NodeAddr {
        self.addr_over(Transport::Quic)
    }

    /// `KEY@HOST:PORT` for cells over `transport`.
    pub fn addr_over(&self, transport: Transport) -> NodeAddr {
        let at = match transport {
            Transport::Quic => self.quic,
            Transport::Tcp => self.tcp,
        };
        NodeAddr {
            key: self.key,
            host: at.ip().to_string(),
            port: at.port(),
        }
    }

    /// Shuts the relay down as SIGTERM would (links closed with
    /// `Shutdown`) and waits until it has.
    pub async fn stop(&mut self) {
        if let Some((stop, task)) = self.running.take() {
            let _ = stop.send(());
            tokio::time::timeout(WAIT, task)
                .await
                .expect("the relay stops in time")
                .expect("the relay task");
        }
    }

    /// Starts the relay again on its ports, with its data directory and
    /// so its key; it remembers nothing else of its last run.
    pub async fn restart(&mut self) {
        self.stop().await;
        let node = bind(&self.config, &self.dir, self.quic).await;
        assert_eq!(node.key(), self.key);
        self.run(node);
    }
}

impl Drop for TestRelay {
    fn drop(&mut self) {
        if let Some((stop, task)) = self.running.take() {
            let _ = stop.send(());
            task.abort();
        }
    }
}

/// Binds a relay at `listen` (QUIC, and TCP on the same port). The ports
/// of a relay that just stopped may take a moment to be released: binding
/// is retried for a bounded time.
async fn bind(toml: &str, dir: &tempfile::TempDir, listen: SocketAddr) -> Node {
    let mut cfg = RelayConfig::from_toml_str(toml, None).expect("a valid test config");
    cfg.node.listen = listen;
    cfg.node.admin = "127.0.0.1:0".parse().unwrap();
    cfg.node.data_dir = dir.path().join("data");
    let until = Instant::now() + WAIT;
    loop {
        match Node::bind(cfg.clone()).await {
            Ok(node) => return node,
            Err(e) if Instant::now() < until => {
                tracing::debug!("binding the relay again: {e}");
                tokio::task::yield_now().await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("the relay did not bind {listen}: {e}"),
        }
    }
}

/// Connects a new cell (with a new key) to `relay` over `transport`.
pub async fn connect(
    relay: &TestRelay,
    transport: Transport,
    opts: CellOptions,
) -> (Cell, Keypair) {
    let key = Keypair::generate();
    let cell = connect_as(relay, transport, key.clone(), opts).await;
    (cell, key)
}

/// Connects `key` to `relay` over `transport`.
pub async fn connect_as(
    relay: &TestRelay,
    transport: Transport,
    key: Keypair,
    opts: CellOptions,
) -> Cell {
    let opts = CellOptions { transport, ..opts };
    tokio::time::timeout(WAIT, Cell::connect(&relay.addr_over(transport), key, opts))
        .await
        .expect("connect in time")
        .expect("connect")
}

/// The next message, in bounded time.
pub async fn next_message(cell: &mut Cell) -> Received {
    tokio::time::timeout(WAIT, cell.recv())
        .await
        .expect("a message in time")
        .expect("the cell is open")
}

/// The next event, in bounded time.
pub async fn next_event(cell: &mut Cell) -> Event {
    tokio::time::timeout(WAIT, cell.next_event())
        .await
        .expect("an event in time")
        .expect("the cell is open")
}

/// Waits until `cond` (a counter of a cell) holds, looking every 10 ms,
/// or fails naming `what`.
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let until = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < until, "{what}: not within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
