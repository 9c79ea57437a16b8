//! The tokio/quinn shell of a relay: it owns the sockets, the tasks and the
//! clock, feeds what happens into the pure [`crate::core`] state machines
//! and carries out what they decide.
//!
//! Per link (one QUIC connection) there are: a control task (handshake,
//! then Announce / Discover / WatchPresence), a control writer fed by a
//! bounded channel, one ingress task per incoming lane stream, and one
//! writer draining the link's lock-free lane queues into batch frames.
//! Ingress never waits on another link: a full queue drops best-effort
//! messages for that receiver and counts them.

use crate::admin::{self, AdminState};
use crate::config::RelayConfig;
use crate::core::{DedupWindow, FreshnessWindow, LinkId, Router};
use crate::metrics::Metrics;
use relay_client::link::WriterConfig;
use relay_client::transport::{self, TransportTuning};
use relay_codec::frame::CloseCode;
use relay_codec::keyfile::{KeyFileError, load_or_create_keyfile};
use relay_codec::{Keypair, Limits, PublicKey};
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use thiserror::Error;
use tokio::task::JoinHandle;
use tracing::{info, warn};

mod connection;
mod ingest;

pub use connection::LinkHandle;
use connection::handle_connection;

/// Why a relay could not start.
#[derive(Debug, Error)]
pub enum NodeError {
    /// The data directory could not be created.
    #[error("data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The node key could not be read or created.
    #[error(transparent)]
    Key(#[from] KeyFileError),
    /// The QUIC endpoint could not be set up.
    #[error("QUIC endpoint: {0}")]
    Transport(#[from] transport::TransportError),
    /// The admin address could not be bound.
    #[error("admin address {addr}: {source} (is another relay running? pass --admin ADDR)")]
    Admin {
        /// The address.
        addr: SocketAddr,
        /// What the OS said.
        source: std::io::Error,
    },
}

/// Milliseconds since the Unix epoch, read once per batch.
fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The state the routing decisions need, behind one lock taken once per
/// incoming batch.
struct Core {
    router: Router<Arc<LinkHandle>>,
    dedup: DedupWindow,
    freshness: FreshnessWindow,
}

struct LinkEntry {
    handle: Arc<LinkHandle>,
    writer: Option<JoinHandle<()>>,
}

struct Shared {
    cfg: RelayConfig,
    key: PublicKey,
    limits: Limits,
    core: Mutex<Core>,
    metrics: Arc<Metrics>,
    links: Mutex<HashMap<LinkId, LinkEntry>>,
    link_count: AtomicUsize,
    next_link: AtomicU64,
    shutting_down: AtomicBool,
    sampled: AtomicU64,
    started: Instant,
    /// Datagrams the QUIC socket saw that cannot be QUIC; folded into the
    /// metrics and logged once a second at most.
    not_quic: Arc<AtomicU64>,
}

/// A running relay: bound sockets and a key, ready to [`run`](Node::run).
pub struct Node {
    shared: Arc<Shared>,
    endpoint: quinn::Endpoint,
    admin: tokio::net::TcpListener,
    quic_addr: SocketAddr,
    admin_addr: SocketAddr,
    key_created: bool,
}

impl Node {
    /// Creates the data directory and node key if absent, binds the QUIC and
    /// admin addresses. Must be called inside a tokio runtime.
    pub async fn bind(cfg: RelayConfig) -> Result<Node, NodeError> {
        let dir = &cfg.node.data_dir;
        create_private_dir(dir).map_err(|source| NodeError::DataDir {
            path: dir.clone(),
            source,
        })?;
        let (keypair, key_created) = load_or_create_keyfile(&dir.join("node.key"))?;
        let tuning = TransportTuning {
            stream_window: cfg.link.stream_window,
            conn_window: cfg.link.conn_window,
            keep_alive: cfg.link.keep_alive(),
            idle_timeout: cfg.link.idle_timeout(),
            ..TransportTuning::default()
        };
        let server = transport::server_config(keypair.signing_key(), &tuning)?;
        let not_quic = Arc::new(AtomicU64::new(0));
        let endpoint =
            transport::server_endpoint_counting(cfg.node.listen, server, not_quic.clone())?;
        let quic_addr = endpoint
            .local_addr()
            .map_err(|e| transport::TransportError::Bind {
                addr: cfg.node.listen,
                source: e,
            })?;
        let admin = admin::bind(cfg.node.admin)
            .await
            .map_err(|source| NodeError::Admin {
                addr: cfg.node.admin,
                source,
            })?;
        let admin_addr = admin.local_addr().map_err(|source| NodeError::Admin {
            addr: cfg.node.admin,
            source,
        })?;
        let limits = cfg.limits.codec_limits();
        let core = Core {
            router: Router::new(cfg.limits.max_links),
            dedup: DedupWindow::new(cfg.security.dedup_window_ms, cfg.security.dedup_capacity),
            freshness: FreshnessWindow::new(
                cfg.security.timestamp_past_ms,
                cfg.security.timestamp_future_ms,
            ),
        };
        let shared = Arc::new(Shared {
            key: keypair.public(),
            limits,
            core: Mutex::new(core),
            metrics: Arc::new(Metrics::new()),
            links: Mutex::new(HashMap::new()),
            link_count: AtomicUsize::new(0),
            next_link: AtomicU64::new(1),
            shutting_down: AtomicBool::new(false),
            sampled: AtomicU64::new(0),
            started: Instant::now(),
            not_quic,
            cfg,
        });
        Ok(Node {
            shared,
            endpoint,
            admin,
            quic_addr,
            admin_addr,
            key_created,
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

    /// Serves until `shutdown` completes, then stops accepting, flushes what
    /// is queued (bounded by `link.shutdown_grace_ms`) and closes every link.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let shared = self.shared.clone();
        let (admin_stop, admin_stopped) = tokio::sync::oneshot::channel::<()>();
        let health_shared = shared.clone();
        let quic_addr = self.quic_addr;
        let state = AdminState {
            metrics: shared.metrics.clone(),
            health: Arc::new(move || health_shared.health(quic_addr)),
        };
        let admin_task = tokio::spawn(admin::serve(self.admin, state, async {
            let _ = admin_stopped.await;
        }));
        let garbage_task = tokio::spawn(report_not_quic(shared.clone()));
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                incoming = self.endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    tokio::spawn(handle_connection(shared.clone(), incoming));
                }
                _ = &mut shutdown => break,
            }
        }
        info!("shutting down: no new links; flushing queued messages");
        shared.shutting_down.store(true, Ordering::Release);
        self.endpoint.set_server_config(None);
        let grace = shared.cfg.link.shutdown_grace();
        let deadline = tokio::time::Instant::now() + grace;
        let writers: Vec<JoinHandle<()>> = {
            let mut links = shared.links.lock().unwrap_or_else(|e| e.into_inner());
            links
                .values_mut()
                .filter_map(|e| {
                    e.handle.queues.close();
                    e.writer.take()
                })
                .collect()
        };
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
        self.endpoint.close(
            quinn::VarInt::from_u32(CloseCode::Shutdown as u32),
            b"relay shutting down",
        );
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
        garbage_task.abort();
        let _ = admin_stop.send(());
        let _ = tokio::time::timeout(Duration::from_secs(1), admin_task).await;
        info!("stopped");
    }
}

impl Shared {
    /// Milliseconds since the relay started, on the monotonic clock: the
    /// time the pure pieces that only measure intervals are given.
    fn mono_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn health(&self, quic: SocketAddr) -> serde_json::Value {
        let cells = self.core.lock().map(|c| c.router.len()).unwrap_or(0);
        serde_json::json!({
            "status": if self.shutting_down.load(Ordering::Relaxed) { "stopping" } else { "ok" },
            "key": self.key.to_string(),
            "quic": quic.to_string(),
            "links": self.link_count.load(Ordering::Relaxed),
            "cells": cells,
            "uptime_s": self.started.elapsed().as_secs(),
            "time_in_relay_p99_us": self.metrics.time_in_relay_quantile(0.99),
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

/// Folds the socket's count of non-QUIC datagrams into the metrics and logs
/// it, at most once a second, so a flood of garbage costs one line a second.
async fn report_not_quic(shared: Arc<Shared>) {
    let mut seen = 0;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let now = shared.not_quic.load(Ordering::Relaxed);
        if now > seen {
            shared.metrics.not_quic(now - seen);
            warn!(
                count = now - seen,
                "dropped UDP datagrams that are not QUIC packets"
            );
            seen = now;
        }
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

/// The node's key, creating it in `data_dir` if absent (for `relay id`).
pub fn node_key(data_dir: &std::path::Path) -> Result<Keypair, NodeError> {
    create_private_dir(data_dir).map_err(|source| NodeError::DataDir {
        path: data_dir.to_owned(),
        source,
    })?;
    Ok(load_or_create_keyfile(&data_dir.join("node.key"))?.0)
}
