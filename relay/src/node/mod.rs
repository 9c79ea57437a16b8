//! The tokio/quinn shell of a relay: it owns the sockets, the tasks, the
//! queues and the clock, feeds what happens into the relay's pure
//! [`relay_core::Node`] (one per relay, behind a mutex taken once per
//! event) and carries out the actions it returns. Every rule (admission,
//! source, signatures, TTL, freshness, dedup, routing, limits, notices)
//! is the node's; the shell only reads the time, moves bytes, counts and
//! logs.
//!
//! Links come from two listeners, QUIC on UDP and TLS on TCP (by default
//! at one address), and are the same from the handshake on
//! ([`relay_link::Link`]): one admission, one set of tasks. Per link there
//! are ([`link`]): the link task (handshake, admission, then its control
//! frames), a control writer fed by a bounded channel, one reader per
//! incoming lane, and one writer draining the link's lock-free lane
//! queues into batch frames. [`actions`] turns the node's actions into
//! queue pushes, control frames, closes, counters and log lines; one timer
//! task ticks the node when its notices fall due.
//! A lane reader never waits on another link but where the node allows a
//! bounded pause: a full queue drops messages for that receiver, and the
//! node counts and notices them.

use crate::admin::{self, AdminState, MeshView};
use crate::config::{ListenTcp, RelayConfig};
use crate::metrics::{Metrics, TcpRefusal};
use relay_codec::frame::{CloseCode, Role};
use relay_codec::keyfile::{KeyFileError, load_or_create_keyfile, read_keyfile};
use relay_codec::{Keypair, Limits, PublicKey};
use relay_core::{LinkId, NodeConfigError, Now};
use relay_link::WriterConfig;
use relay_link::quic::{self, TransportTuning};
use relay_link::tcp::{TcpListener, TcpListenerStats, TcpTuning};
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use thiserror::Error;
use tokio::task::JoinHandle;
use tracing::{info, warn};

mod actions;
mod durable;
mod handle;
mod link;
mod peer;

use actions::Executor;
pub use handle::LinkHandle;
use link::{Incoming, handle_connection};

/// The relay's decisions, naming links by their shell handles.
type CoreNode = relay_core::Node<Arc<LinkHandle>>;

/// The file in a data directory that the relay using it holds locked
/// (`flock`, released by the kernel when the holder exits however it
/// exits), with the holder's pid in it.
pub const LOCK_FILE: &str = "relay.lock";

/// The node's secret key file in a data directory.
pub const KEY_FILE: &str = "node.key";

/// Why a relay could not start.
///
/// Each message names its cause once (none has a `source()`) and, where
/// the operator can do something, what.
#[derive(Debug, Error)]
pub enum NodeError {
    /// The data directory or its lock file could not be created or opened.
    #[error("data directory {path}: {error}")]
    DataDir {
        /// The directory or file.
        path: PathBuf,
        /// What the OS said.
        error: std::io::Error,
    },
    /// Another relay uses the data directory: two relays must not share
    /// one identity.
    #[error(
        "data directory {dir} is in use by another relay ({}, holding {dir}/{LOCK_FILE}); \
         stop that relay first, or give this one a directory of its own with --data-dir DIR",
        pid.map_or_else(|| "pid not written yet".to_owned(), |p| format!("pid {p}")),
        dir = dir.display()
    )]
    Locked {
        /// The directory.
        dir: PathBuf,
        /// The pid the lock holder wrote, if it has.
        pid: Option<u32>,
    },
    /// The node key could not be read or created.
    #[error(transparent)]
    Key(#[from] KeyFileError),
    /// `relay id` found no key and was not asked to create one.
    #[error(
        "no node key at {}: this is not the data directory of a relay that has started; \
         run `relay id` where the relay runs, or pass its --data-dir DIR (or --config FILE); \
         `relay id --create` makes the key of a relay not started yet",
        path.display()
    )]
    NoKey {
        /// Where the key was looked for.
        path: PathBuf,
    },
    /// The QUIC listen address could not be bound.
    #[error(
        "QUIC listen address {addr}: {error}{}",
        bind_hint(error, "--listen", "node.listen")
    )]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// What the OS said.
        error: std::io::Error,
    },
    /// The TCP listen address could not be bound.
    #[error(
        "TCP listen address {addr}{}: {error}{}",
        if *same { " (node.listen_tcp = \"same\": the address of node.listen)" } else { "" },
        tcp_bind_hint(error)
    )]
    ListenTcp {
        /// The address.
        addr: SocketAddr,
        /// Whether it was taken from `node.listen` (`listen_tcp = "same"`).
        same: bool,
        /// What the OS said.
        error: std::io::Error,
    },
    /// The QUIC endpoint could not be set up.
    #[error("QUIC endpoint: {0}")]
    Transport(relay_link::TransportError),
    /// The configuration cannot run a node (validation rules it out; this
    /// is a second line of defence).
    #[error("configuration: {0}")]
    Config(#[from] NodeConfigError),
    /// The OS gave no randomness to seed the node with.
    #[error("no randomness from the OS to seed the relay: {0}")]
    Random(getrandom::Error),
    /// The durable log (DATA_DIR/log) could not be opened.
    #[error("durable log: {0}")]
    Storage(#[from] relay_storage::StorageError),
    /// The mesh settings cannot run (a peer with this relay's own key, or
    /// a bound out of range).
    #[error("mesh: {0}")]
    Mesh(String),
    /// The admin address could not be bound.
    #[error(
        "admin address {addr}: {error}{}",
        bind_hint(error, "--admin", "node.admin")
    )]
    Admin {
        /// The address.
        addr: SocketAddr,
        /// What the OS said.
        error: std::io::Error,
    },
}

/// What to do about an address that cannot be bound, after `; `.
fn bind_hint(error: &std::io::Error, flag: &str, key: &str) -> String {
    bind_advice(error).map_or_else(String::new, |what| {
        format!("; {what} with {flag} HOST:PORT (or {key})")
    })
}

/// [`bind_hint`] for the TCP listener, which can also be turned off.
fn tcp_bind_hint(error: &std::io::Error) -> String {
    const OFF: &str = "--listen-tcp off (or node.listen_tcp = \"off\") serves QUIC only";
    match bind_advice(error) {
        Some(what) => {
            format!("; {what} with --listen-tcp HOST:PORT (or node.listen_tcp), or {OFF}")
        }
        None => format!("; {OFF}"),
    }
}

fn bind_advice(error: &std::io::Error) -> Option<&'static str> {
    use std::io::ErrorKind;
    Some(match error.kind() {
        ErrorKind::AddrInUse => {
            "another program uses it (is another relay running?): stop it, or use another address"
        }
        ErrorKind::AddrNotAvailable => "no interface of this host has that address: use one it has",
        ErrorKind::PermissionDenied => "a port below 1024 needs privileges: use a higher one",
        _ => return None,
    })
}

/// Tries at binding QUIC and TCP on one free port (`listen = "HOST:0"`,
/// `listen_tcp = "same"`) before giving up: a UDP port the kernel picks
/// free may be taken on TCP.
const SAME_PORT_TRIES: usize = 16;

/// The longest each step of a shutdown after the flush may take: link tasks
/// recording their close, the closes reaching the cells (QUIC's closing
/// period), in-flight admin requests.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// The node with `[mesh]` set up: its peers' and `trusted_relays`' keys
/// trusted, announcing `quic` as where it may be dialed.
fn with_mesh(
    node: CoreNode,
    cfg: &RelayConfig,
    me: PublicKey,
    quic: SocketAddr,
) -> Result<CoreNode, NodeError> {
    if cfg.mesh.peers.iter().any(|p| p.addr.key == me) {
        return Err(NodeError::Mesh(format!(
            "mesh.peers (or --peer) lists this relay's own key {me}; a relay does not peer with \
             itself"
        )));
    }
    node.with_mesh(cfg.mesh.mesh_config(announced_addr(cfg, quic)))
        .map_err(|e| NodeError::Mesh(e.to_string()))
}

/// What the relay announces as where it may be dialed: `mesh.advertise`,
/// else the QUIC listener's address, or nothing if that is a wildcard no
/// relay can dial (said once, with what to do, if the relay peers at all).
fn announced_addr(cfg: &RelayConfig, quic: SocketAddr) -> String {
    if !cfg.mesh.advertise.is_empty() {
        return cfg.mesh.advertise.clone();
    }
    if !quic.ip().is_unspecified() {
        return quic.to_string();
    }
    if !cfg.mesh.trusted().is_empty() {
        warn!(
            listen = %quic,
            "the mesh is not told where to dial this relay (it listens on a wildcard address): \
             set mesh.advertise = \"HOST:PORT\" so that relays that learn of it can dial it"
        );
    }
    String::new()
}

/// Milliseconds since the Unix epoch, read once per batch.
fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

struct LinkEntry {
    handle: Arc<LinkHandle>,
    writer: Option<JoinHandle<()>>,
    /// Whether this relay dialed it (a peer link of `mesh.peers`).
    dialed: bool,
}

struct Shared {
    cfg: RelayConfig,
    key: PublicKey,
    limits: Limits,
    /// Socket and buffer settings of TCP links.
    tcp: TcpTuning,
    /// Every decision; locked once per event, never across an await.
    node: Mutex<CoreNode>,
    /// When the timer task ticks the node next, on its monotonic clock
    /// (`u64::MAX`: nothing pending); an event that brings that earlier
    /// wakes the task through `tick_sooner`.
    next_tick: AtomicU64,
    tick_sooner: tokio::sync::Notify,
    metrics: Arc<Metrics>,
    /// The admitted links, for the shutdown flush and `/health`; an entry
    /// lives as long as its link task ([`link`]'s guard removes it).
    links: Mutex<HashMap<LinkId, LinkEntry>>,
    next_link: AtomicU64,
    /// The origin of [`Now::mono_ms`].
    started: Instant,
    /// Datagrams the QUIC socket saw that cannot be QUIC; folded into the
    /// metrics and logged once a second at most.
    not_quic: Arc<AtomicU64>,
    /// What the TCP listener turned away, likewise; `None` without one.
    tcp_refused: Option<Arc<TcpListenerStats>>,
    /// The durable log; `None` only in a relay that never opened one.
    durable: Option<durable::DurableStore>,
    /// Told whenever a relay link comes up or goes down: the peer dialers
    /// wait on it while their peer's link is up.
    peers_changed: tokio::sync::Notify,
    /// Test hook: the key whose next link task panics once it is up.
    #[cfg(debug_assertions)]
    fault_panic: Mutex<Option<PublicKey>>,
}

/// A running relay: bound sockets and a key, ready to [`run`](Node::run).
pub struct Node {
    shared: Arc<Shared>,
    endpoint: quinn::Endpoint,
    tcp: Option<TcpListener>,
    admin: tokio::net::TcpListener,
    quic_addr: SocketAddr,
    tcp_addr: Option<SocketAddr>,
    admin_addr: SocketAddr,
    key_created: bool,
    /// The log's answers, for [`durable::run_durable`].
    durable_rx:
        Option<tokio::sync::mpsc::UnboundedReceiver<(u64, Result<u64, relay_core::LogRefusal>)>>,
    /// The identity and QUIC tuning peer links are dialed with.
    keypair: Keypair,
    tuning: TransportTuning,
    /// The data directory's lock, held until the node is dropped (after
    /// [`run`](Node::run) returns).
    _lock: std::fs::File,
}

impl Node {
    /// Creates the data directory and node key if absent, locks the
    /// directory against a second relay, binds the QUIC, TCP (unless
    /// `node.listen_tcp` is off) and admin addresses. Must be called inside
    /// a tokio runtime.
    pub async fn bind(cfg: RelayConfig) -> Result<Node, NodeError> {
        let dir = &cfg.node.data_dir;
        create_private_dir(dir).map_err(|error| NodeError::DataDir {
            path: dir.clone(),
            error,
        })?;
        let lock = lock_data_dir(dir)?;
        let (keypair, key_created) = load_or_create_keyfile(&dir.join(KEY_FILE))?;
        let tuning = TransportTuning {
            stream_window: cfg.link.stream_window,
            conn_window: cfg.link.conn_window,
            keep_alive: cfg.link.keep_alive(),
            idle_timeout: cfg.link.idle_timeout(),
            ..TransportTuning::default()
        };
        // One TLS config for both transports: the same identity and rules.
        let tls = Arc::new(
            relay_link::tls::tls_server_config(keypair.signing_key())
                .map_err(NodeError::Transport)?,
        );
        let tcp_tuning = TcpTuning {
            keepalive: cfg.link.keep_alive(),
            user_timeout: cfg.link.idle_timeout(),
            handshake_timeout: cfg.limits.handshake_timeout(),
            ..TcpTuning::default()
        };
        let not_quic = Arc::new(AtomicU64::new(0));
        let (endpoint, quic_addr, tcp) =
            bind_listeners(&cfg, &tuning, &tls, &tcp_tuning, &not_quic, &keypair)?;
        let tcp_addr = match &tcp {
            Some(l) => Some(l.local_addr().map_err(|error| NodeError::ListenTcp {
                addr: quic_addr,
                same: cfg.node.listen_tcp == ListenTcp::Same,
                error,
            })?),
            None => None,
        };
        let admin = admin::bind(cfg.node.admin)
            .await
            .map_err(|error| NodeError::Admin {
                addr: cfg.node.admin,
                error,
            })?;
        let admin_addr = admin.local_addr().map_err(|error| NodeError::Admin {
            addr: cfg.node.admin,
            error,
        })?;
        let limits = cfg.limits.codec_limits();
        // Every random choice of the node (the dedup table's hash key, the
        // messages a sampled policy checks) comes from this seed.
        let seed = getrandom::u64().map_err(NodeError::Random)?;
        let node = CoreNode::new(cfg.node_config(keypair.public()), seed)?;
        let mut node = with_mesh(node, &cfg, keypair.public(), quic_addr)?;
        let started = Instant::now();
        let mut opened = durable::open(
            dir,
            &cfg.storage,
            cfg.security.dedup_window_ms,
            &limits,
            unix_ms(),
        )?;
        let now = Now {
            mono_ms: 0,
            unix_ms: unix_ms(),
        };
        let recovered = opened.recover_into(&mut node, now);
        if recovered > 0 {
            info!(
                queued = recovered,
                "durable messages recovered from the log; each goes to its cell when it attaches"
            );
        }
        let shared = Arc::new(Shared {
            key: keypair.public(),
            limits,
            tcp: tcp_tuning,
            node: Mutex::new(node),
            next_tick: AtomicU64::new(u64::MAX),
            tick_sooner: tokio::sync::Notify::new(),
            metrics: Arc::new(Metrics::new()),
            links: Mutex::new(HashMap::new()),
            next_link: AtomicU64::new(1),
            started,
            durable: Some(opened.store),
            not_quic,
            tcp_refused: tcp.as_ref().map(|l| l.stats().clone()),
            peers_changed: tokio::sync::Notify::new(),
            #[cfg(debug_assertions)]
            fault_panic: Mutex::new(None),
            cfg,
        });
        Ok(Node {
            shared,
            endpoint,
            tcp,
            admin,
            quic_addr,
            tcp_addr,
            admin_addr,
            key_created,
            durable_rx: Some(opened.answers),
            keypair,
            tuning,
            _lock: lock,
        })
    }

    /// The node's identity.
    pub fn key(&self) -> PublicKey {
        self.shared.key
    }

    /// The bound QUIC address.
    pub fn quic_addr(&self) -> SocketAddr {
        self.quic_addr
    }

    /// The bound TCP address; `None` when `node.listen_tcp` is off.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp_addr
    }

    /// The bound admin HTTP address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Whether the key was created by this start.
    pub fn key_created(&self) -> bool {
        self.key_created
    }

    /// The relay's counters.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.shared.metrics.clone()
    }

    /// Fault injection for tests, in debug builds only: the task of the
    /// next link `key` brings up panics once the link is up (and its
    /// guard must release it). Never called by the relay itself.
    #[doc(hidden)]
    #[cfg(debug_assertions)]
    pub fn inject_link_task_panic(&self, key: PublicKey) {
        *self
            .shared
            .fault_panic
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(key);
    }

    /// One task per configured peer relay, dialing it and redialing it,
    /// and one dialing trusted relays the mesh announced ([`peer`]).
    fn spawn_dialers(&self) -> Vec<JoinHandle<()>> {
        let dialing = Arc::new(peer::Dialing {
            keypair: self.keypair.clone(),
            endpoint: self.endpoint.clone(),
            tuning: self.tuning.clone(),
        });
        let mut tasks: Vec<JoinHandle<()>> = self
            .shared
            .cfg
            .mesh
            .peers
            .iter()
            .map(|p| {
                let seed = getrandom::u64().unwrap_or(p.addr.port.into());
                tokio::spawn(peer::run_peer(
                    self.shared.clone(),
                    dialing.clone(),
                    p.clone(),
                    seed,
                ))
            })
            .collect();
        tasks.push(tokio::spawn(peer::learn(self.shared.clone(), dialing)));
        tasks
    }

    /// Serves until `shutdown` completes, then stops accepting, flushes what
    /// is queued (bounded by `link.shutdown_grace_ms`) and closes every link.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let shared = self.shared.clone();
        let dialers = self.spawn_dialers();
        let (admin_stop, admin_stopped) = tokio::sync::oneshot::channel::<()>();
        let health_shared = shared.clone();
        let (quic_addr, tcp_addr) = (self.quic_addr, self.tcp_addr);
        let state = AdminState {
            metrics: shared.metrics.clone(),
            health: Arc::new(move || health_shared.health(quic_addr, tcp_addr)),
            mesh: {
                let shared = shared.clone();
                Arc::new(move |view| shared.mesh_view(view))
            },
        };
        let admin_task = tokio::spawn(admin::serve(self.admin, state, async {
            let _ = admin_stopped.await;
        }));
        let garbage_task = tokio::spawn(report_refused(shared.clone()));
        let timer_task = tokio::spawn(run_timers(shared.clone()));
        let durable_task = self
            .durable_rx
            .map(|rx| tokio::spawn(durable::run_durable(shared.clone(), rx)));
        let tcp = self.tcp;
        // One task per connection, kept so shutdown can wait for each to
        // record its close; finished ones are reaped as they end, so the
        // set holds at most the connections open (bounded by max_links,
        // plus handshakes in flight).
        let mut connections = tokio::task::JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                incoming = self.endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    connections.spawn(handle_connection(shared.clone(), Incoming::Quic(incoming)));
                }
                incoming = accept_tcp(tcp.as_ref()) => {
                    connections.spawn(handle_connection(shared.clone(), Incoming::Tcp(incoming)));
                }
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
                _ = &mut shutdown => break,
            }
        }
        // No new TCP connections; those in their handshake are refused at
        // admission (shutting down) or by the runtime's end.
        drop(tcp);
        shared.node().shut_down(shared.now().0);
        self.endpoint.set_server_config(None);
        let grace = shared.cfg.link.shutdown_grace();
        let deadline = tokio::time::Instant::now() + grace;
        let (handles, writers): (Vec<Arc<LinkHandle>>, Vec<JoinHandle<()>>) = {
            let mut links = shared.links.lock().unwrap_or_else(|e| e.into_inner());
            let handles = links.values().map(|e| e.handle.clone()).collect();
            let writers = links
                .values_mut()
                .filter_map(|e| {
                    e.handle.queues.close();
                    e.writer.take()
                })
                .collect();
            (handles, writers)
        };
        if handles.is_empty() {
            info!("shutting down: no new links, and none open");
        } else {
            info!(
                links = handles.len(),
                grace_ms = grace.as_millis() as u64,
                "shutting down: no new links; waiting until each link's cell has read what is \
                 queued for it, for at most link.shutdown_grace_ms"
            );
        }
        let mut flushed = true;
        for w in writers {
            if tokio::time::timeout_at(deadline, w).await.is_err() {
                flushed = false;
            }
        }
        if !flushed {
            warn!(
                grace_ms = grace.as_millis() as u64,
                "shutdown grace ran out before every link was flushed"
            );
        }
        // Each link closed as `shutdown` (not as a peer's close), then the
        // endpoint, for connections still in their handshake.
        let (now, at) = shared.now();
        let mut ex = Executor::default();
        shared.node().close_all(now, &mut ex.actions);
        ex.run(&shared, now, at, 0);
        self.endpoint.close(
            quinn::VarInt::from_u32(CloseCode::Shutdown as u32),
            b"relay shutting down",
        );
        // The link tasks see their connection closed at once; let each
        // record it (a metric and a log line) before the runtime stops.
        let _ = tokio::time::timeout(CLOSE_WAIT, async {
            while connections.join_next().await.is_some() {}
        })
        .await;
        if !handles.is_empty() {
            info!(
                "links closed; waiting (at most {CLOSE_WAIT:?}) for the closes to reach the cells"
            );
        }
        let _ = tokio::time::timeout(CLOSE_WAIT, self.endpoint.wait_idle()).await;
        garbage_task.abort();
        timer_task.abort();
        if let Some(t) = durable_task {
            t.abort();
        }
        for d in dialers {
            d.abort();
        }
        let _ = admin_stop.send(());
        let _ = tokio::time::timeout(CLOSE_WAIT, admin_task).await;
        info!("stopped");
    }
}

/// The relay's node, locked for one event. Unlocking checks whether the
/// event brought the node's next timer earlier than the one the timer task
/// sleeps for, and wakes it if so.
struct NodeLock<'a> {
    node: MutexGuard<'a, CoreNode>,
    shared: &'a Shared,
}

impl std::ops::Deref for NodeLock<'_> {
    type Target = CoreNode;
    fn deref(&self) -> &CoreNode {
        &self.node
    }
}

impl std::ops::DerefMut for NodeLock<'_> {
    fn deref_mut(&mut self) -> &mut CoreNode {
        &mut self.node
    }
}

impl Drop for NodeLock<'_> {
    fn drop(&mut self) {
        if let Some(due) = self.node.poll_timeout()
            && due < self.shared.next_tick.load(Ordering::Acquire)
        {
            self.shared.next_tick.store(due, Ordering::Release);
            self.shared.tick_sooner.notify_one();
        }
    }
}

impl Shared {
    /// The node, for one event. A task that panicked holding it leaves it
    /// as it was (each event's changes are small and self-contained), so
    /// the relay goes on serving the other links.
    fn node(&self) -> NodeLock<'_> {
        NodeLock {
            node: self.node.lock().unwrap_or_else(|e| e.into_inner()),
            shared: self,
        }
    }

    /// The time of an event, read once: as the node's [`Now`], and as the
    /// instant that stamps what it queues.
    fn now(&self) -> (Now, Instant) {
        let at = Instant::now();
        let now = Now {
            mono_ms: at.saturating_duration_since(self.started).as_millis() as u64,
            unix_ms: unix_ms(),
        };
        (now, at)
    }

    /// Panics if [`Node::inject_link_task_panic`] asked for `key` (once).
    #[cfg(debug_assertions)]
    fn injected_fault(&self, key: &PublicKey) {
        let mut fault = self.fault_panic.lock().unwrap_or_else(|e| e.into_inner());
        if fault.as_ref() == Some(key) {
            *fault = None;
            drop(fault);
            panic!("injected fault: the link task of {key} panics (test hook)");
        }
    }

    fn health(&self, quic: SocketAddr, tcp: Option<SocketAddr>) -> serde_json::Value {
        let (cells, stopping) = {
            let node = self.node();
            (node.router().len(), node.is_shutting_down())
        };
        let links = self.links.lock().map(|l| l.len()).unwrap_or(0);
        serde_json::json!({
            "status": if stopping { "stopping" } else { "ok" },
            "key": self.key.to_string(),
            "quic": quic.to_string(),
            "tcp": tcp.map(|a| a.to_string()),
            "links": links,
            "cells": cells,
            "uptime_s": self.started.elapsed().as_secs(),
            "time_in_relay_p99_us": self.metrics.time_in_relay_quantile(0.99),
        })
    }

    /// The JSON of a mesh view for the admin endpoint, from the node's
    /// views (and, for `/peers`, the shell's view of each link).
    fn mesh_view(&self, view: MeshView) -> serde_json::Value {
        use serde_json::json;
        let me = self.key.to_string();
        match view {
            MeshView::Peers => {
                let peers: Vec<(LinkId, PublicKey)> = self.node().mesh().peers().collect();
                let links = self.links.lock().unwrap_or_else(|e| e.into_inner());
                let peers: Vec<_> = peers
                    .into_iter()
                    .map(|(id, key)| {
                        let e = links.get(&id);
                        json!({
                            "key": key.to_string(),
                            "link": id,
                            "transport": e.map(|e| e.handle.link.transport().name()),
                            "remote": e.map(|e| e.handle.link.remote_address().to_string()),
                            "dialed": e.map(|e| e.dialed),
                        })
                    })
                    .collect();
                json!({ "self": me, "peers": peers })
            }
            MeshView::Routes => {
                let mut node = self.node();
                let stats = node.mesh().stats();
                let routes: Vec<_> = node
                    .mesh_mut()
                    .routes()
                    .iter()
                    .map(|(relay, (hops, next))| {
                        json!({
                            "relay": relay.to_string(),
                            "hops": hops,
                            "next_hop": next.to_string(),
                        })
                    })
                    .collect();
                json!({
                    "self": me,
                    "routes": routes,
                    "relays_known": stats.relays_known,
                    "directory_entries": stats.directory_entries,
                    "cached_routes": stats.cached_routes,
                    "cache_hits": stats.cache.hits,
                    "cache_misses": stats.cache.misses,
                    "pending_lookups": stats.pending_lookups,
                    "held": stats.held,
                    "forwarded": stats.forwarded,
                })
            }
            MeshView::Topology => {
                let node = self.node();
                let mesh = node.mesh();
                let relays: Vec<_> = mesh
                    .topology()
                    .into_iter()
                    .map(|(key, links)| {
                        json!({
                            "key": key.to_string(),
                            "addr": mesh.addr_of(&key),
                            "links": links.iter().map(ToString::to_string).collect::<Vec<_>>(),
                        })
                    })
                    .collect();
                json!({ "self": me, "relays": relays })
            }
        }
    }

    /// A relay link up or down: the gauge, and the dialers waiting.
    fn peers_changed(&self) {
        let n = self.node().mesh().peers().count();
        self.metrics.set_peers(n);
        self.peers_changed.notify_waiters();
    }

    /// Whether a relay link of `key` is up (one the node has not closed).
    fn peer_link_up(&self, key: PublicKey) -> bool {
        self.links
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .any(|e| {
                e.handle.role == Role::Relay && e.handle.key == key && e.handle.link.end().is_none()
            })
    }

    /// Why a new relay link of `key` (`dialed` by this relay or not) is
    /// redundant, if it is. Two relays that list each other both dial: of
    /// two links between them, both keep the one dialed by the lower key,
    /// so they never close each other's last link. A link from the same
    /// dialer as the one up replaces it (the peer restarted).
    fn redundant_peer_link(&self, key: PublicKey, dialed: bool) -> Option<String> {
        let dialer = |ours: bool| if ours { self.key } else { key };
        let new = dialer(dialed);
        let links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        links
            .values()
            .filter(|e| {
                e.handle.role == Role::Relay && e.handle.key == key && e.handle.link.end().is_none()
            })
            .map(|e| dialer(e.dialed))
            .find(|old| *old < new)
            .map(|old| {
                format!(
                    "a link between relays {} and {key} dialed by {old} is up; of two, the one \
                     dialed by the lower key is kept",
                    self.key
                )
            })
    }

    fn writer_config(&self) -> WriterConfig {
        WriterConfig {
            weights: self.cfg.link.lane_weights,
            batch_bytes: self.cfg.link.batch_bytes,
            max_batch_messages: self.cfg.limits.max_batch_messages,
            zstd_level: self.cfg.link.zstd_level,
            compress_min: self.cfg.link.compress_min_bytes,
            drain_timeout: self.cfg.link.shutdown_grace(),
        }
    }
}

/// Ticks the node when its next timer falls due (its notices), for as
/// long as the relay runs; sleeps while nothing is pending.
async fn run_timers(shared: Arc<Shared>) {
    let mut ex = Executor::default();
    loop {
        let due = {
            let node = shared.node.lock().unwrap_or_else(|e| e.into_inner());
            let due = node.poll_timeout();
            shared
                .next_tick
                .store(due.unwrap_or(u64::MAX), Ordering::Release);
            due
        };
        let sleep = async {
            match due {
                Some(ms) => {
                    let at = shared.started + Duration::from_millis(ms);
                    tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = sleep => {}
            _ = shared.tick_sooner.notified() => continue,
        }
        let (now, at) = shared.now();
        shared.node().tick(now, &mut ex.actions);
        ex.run(&shared, now, at, 0);
    }
}

/// Binds the QUIC endpoint and, unless `node.listen_tcp` is off, the TCP
/// listener: at `node.listen` both for `"same"` (one port number for both,
/// also when the port is 0: the one QUIC got, retried a few times should
/// TCP have it taken).
fn bind_listeners(
    cfg: &RelayConfig,
    tuning: &TransportTuning,
    tls: &Arc<rustls::ServerConfig>,
    tcp_tuning: &TcpTuning,
    not_quic: &Arc<AtomicU64>,
    identity: &Keypair,
) -> Result<(quinn::Endpoint, SocketAddr, Option<TcpListener>), NodeError> {
    let listen = cfg.node.listen;
    let mut tries = 0;
    loop {
        tries += 1;
        let server = quic::server_config_from(tls.clone(), tuning).map_err(NodeError::Transport)?;
        let secret = identity.secret_bytes();
        let endpoint = quic::server_endpoint_counting(listen, server, not_quic.clone(), &secret)
            .map_err(|e| match e {
                relay_link::TransportError::Bind { addr, error } => {
                    NodeError::Listen { addr, error }
                }
                e => NodeError::Transport(e),
            })?;
        let quic_addr = endpoint.local_addr().map_err(|error| NodeError::Listen {
            addr: listen,
            error,
        })?;
        let (at, same) = match cfg.node.listen_tcp {
            ListenTcp::Off => return Ok((endpoint, quic_addr, None)),
            ListenTcp::Same => (quic_addr, true),
            ListenTcp::At(a) => (a, false),
        };
        match TcpListener::bind(at, tls.clone(), tcp_tuning.clone()) {
            Ok(l) => return Ok((endpoint, quic_addr, Some(l))),
            Err(e)
                if same
                    && listen.port() == 0
                    && e.source.kind() == std::io::ErrorKind::AddrInUse
                    && tries < SAME_PORT_TRIES =>
            {
                // Another free UDP port, and try its TCP twin.
                drop(endpoint);
            }
            Err(e) => {
                return Err(NodeError::ListenTcp {
                    addr: e.addr,
                    same,
                    error: e.source,
                });
            }
        }
    }
}

/// The next TCP connection whose handshake may start; never, without a
/// TCP listener. An accept that fails (out of file descriptors) is logged
/// and retried after a pause, rather than spinning.
async fn accept_tcp(tcp: Option<&TcpListener>) -> relay_link::tcp::TcpIncoming {
    let Some(tcp) = tcp else {
        return std::future::pending().await;
    };
    loop {
        match tcp.accept().await {
            Ok(incoming) => return incoming,
            Err(e) => {
                warn!("accepting a TCP connection failed: {e}; retrying in 100 ms");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Folds what the listeners refused without a link into the metrics and
/// logs it, at most once a second, so a flood of garbage costs one line a
/// second: datagrams on the QUIC port that cannot be QUIC, and TCP
/// connections over the handshake bound, failing or timing out their TLS
/// handshake.
async fn report_refused(shared: Arc<Shared>) {
    let mut not_quic = 0;
    let mut tcp = [0u64; TcpRefusal::ALL.len()];
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let now = shared.not_quic.load(Ordering::Relaxed);
        if now > not_quic {
            shared.metrics.not_quic(now - not_quic);
            warn!(
                count = now - not_quic,
                "dropped UDP datagrams that are not QUIC packets"
            );
            not_quic = now;
        }
        let Some(stats) = &shared.tcp_refused else {
            continue;
        };
        let now = [
            stats.over_limit.load(Ordering::Relaxed),
            stats.failed.load(Ordering::Relaxed),
            stats.timed_out.load(Ordering::Relaxed),
        ];
        if now == tcp {
            continue;
        }
        for (i, why) in TcpRefusal::ALL.into_iter().enumerate() {
            shared.metrics.tcp_refused(why, now[i] - tcp[i]);
        }
        let [over, failed, timed_out] = std::array::from_fn(|i| now[i] - tcp[i]);
        warn!(
            over_limit = over,
            failed,
            timed_out,
            limit = shared.tcp.max_handshakes,
            timeout_ms = shared.tcp.handshake_timeout.as_millis() as u64,
            "TCP connections refused before their TLS handshake finished (over the bound on \
             handshakes in progress, a failed handshake, or past its deadline)"
        );
        tcp = now;
    }
}

fn create_private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(0o700);
    }
    b.create(dir)
}

/// Takes the lock of `dir` ([`LOCK_FILE`]) for this process and writes its
/// pid there, or says which relay holds it. The lock is the kernel's
/// (`flock`): it goes with the returned file, so a relay that dies in any
/// way, SIGKILL included, leaves the directory free at once.
fn lock_data_dir(dir: &Path) -> Result<std::fs::File, NodeError> {
    use std::io::{Read as _, Write as _};
    let path = dir.join(LOCK_FILE);
    let io = |error| NodeError::DataDir {
        path: path.clone(),
        error,
    };
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true).write(true).create(true).truncate(false);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut file = opts.open(&path).map_err(io)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut text = String::new();
            let pid = file
                .read_to_string(&mut text)
                .ok()
                .and_then(|_| text.trim().parse().ok());
            return Err(NodeError::Locked {
                dir: dir.to_owned(),
                pid,
            });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
    }
    file.set_len(0).map_err(io)?;
    writeln!(file, "{}", std::process::id()).map_err(io)?;
    Ok(file)
}

/// The node key in `data_dir` for `relay id`, and whether it was created
/// now. Without `create`, a missing key is [`NodeError::NoKey`]: reading
/// an identity must not make one in whatever directory it runs from.
pub fn node_key(data_dir: &Path, create: bool) -> Result<(Keypair, bool), NodeError> {
    let path = data_dir.join(KEY_FILE);
    if !create {
        return match read_keyfile(&path) {
            Ok(kp) => Ok((kp, false)),
            Err(KeyFileError::Io { error, .. }) if error.kind() == std::io::ErrorKind::NotFound => {
                Err(NodeError::NoKey { path })
            }
            Err(e) => Err(e.into()),
        };
    }
    create_private_dir(data_dir).map_err(|error| NodeError::DataDir {
        path: data_dir.to_owned(),
        error,
    })?;
    Ok(load_or_create_keyfile(&path)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wildcard_listener_is_not_announced_unless_advertised() {
        let mut cfg = RelayConfig::default();
        let wild: SocketAddr = "0.0.0.0:4433".parse().unwrap();
        let lo: SocketAddr = "127.0.0.1:4433".parse().unwrap();
        assert_eq!(announced_addr(&cfg, lo), "127.0.0.1:4433");
        assert_eq!(announced_addr(&cfg, wild), "");
        assert_eq!(announced_addr(&cfg, "[::]:9".parse().unwrap()), "");
        cfg.mesh.advertise = "relay.example:4433".into();
        assert_eq!(announced_addr(&cfg, wild), "relay.example:4433");
    }
}
