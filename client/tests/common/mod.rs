//! A stand-in relay for tests, built from the link layer (the real relay
//! lives in another crate): it proves keys, answers Hello, forwards
//! messages by destination, answers Discover from announcements, reports
//! presence, and lets a test inject raw messages or cut a link.

#![allow(dead_code)]

use relay_client::link::quic::{self, TransportTuning};
use relay_client::link::{
    BatchReader, FrameReceiver, LaneQueues, Link, NoObserver, Outbound, WriterConfig,
};
use relay_codec::frame::{CloseCode, PROTOCOL_VERSION, PresenceInfo, Role};
use relay_codec::{
    Destination, Envelope, Frame, Keypair, Limits, NodeAddr, PublicKey, ServiceName,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

pub const WAIT: Duration = Duration::from_secs(10);

/// One attached cell, as the stand-in relay sees it.
pub struct Attached {
    pub link: Link,
    /// Tells this link from a later one of the same cell.
    pub id: u64,
    pub queues: Arc<LaneQueues>,
    pub control: mpsc::UnboundedSender<Frame>,
    pub watching: bool,
    pub announced: Option<(String, Vec<ServiceName>)>,
}

#[derive(Default)]
pub struct Hub {
    pub cells: HashMap<PublicKey, Attached>,
    /// Every message any cell sent, as received.
    pub seen: Vec<Envelope>,
    /// The agent strings of every Hello.
    pub agents: Vec<String>,
    /// Close frames cells sent.
    pub closes: Vec<(PublicKey, CloseCode)>,
    pub links: usize,
}

#[derive(Clone, Default)]
pub struct RelayBehaviour {
    /// Refuse every link with this code and reason.
    pub refuse: Option<(CloseCode, String)>,
    /// Never answer Hello.
    pub silent: bool,
    /// Largest payload announced in Welcome.
    pub max_payload: Option<u32>,
}

pub struct StandIn {
    /// Keeps the relay's identity alive with it.
    _key: Keypair,
    pub addr: NodeAddr,
    pub hub: Arc<Mutex<Hub>>,
    _endpoint: quinn::Endpoint,
}

impl StandIn {
    pub async fn start(behaviour: RelayBehaviour) -> StandIn {
        let key = Keypair::generate();
        let cfg = quic::server_config(key.signing_key(), &TransportTuning::default()).unwrap();
        let endpoint = quic::server_endpoint("127.0.0.1:0".parse().unwrap(), cfg).unwrap();
        let port = endpoint.local_addr().unwrap().port();
        let hub = Arc::new(Mutex::new(Hub::default()));
        let (ep, h, pubkey) = (endpoint.clone(), hub.clone(), key.public());
        tokio::spawn(async move {
            while let Some(incoming) = ep.accept().await {
                let (h, b) = (h.clone(), behaviour.clone());
                tokio::spawn(async move {
                    if let Ok(conn) = incoming.await {
                        serve_link(Link::quic(conn, Limits::default()), h, b, pubkey).await;
                    }
                });
            }
        });
        StandIn {
            addr: NodeAddr {
                key: key.public(),
                host: "127.0.0.1".into(),
                port,
            },
            _key: key,
            hub,
            _endpoint: endpoint,
        }
    }

    /// Waits until `cell` is attached (and has announced, if `announced`).
    pub async fn attached(&self, cell: PublicKey, announced: bool) {
        let until = Instant::now() + WAIT;
        loop {
            {
                let hub = self.hub.lock().unwrap();
                if let Some(a) = hub.cells.get(&cell)
                    && (!announced || a.announced.is_some())
                {
                    return;
                }
            }
            assert!(Instant::now() < until, "{cell:?} never attached");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Puts a raw message on `cell`'s link, as if forwarded.
    pub fn inject(&self, cell: PublicKey, env: Envelope) {
        let hub = self.hub.lock().unwrap();
        let a = hub.cells.get(&cell).expect("attached");
        a.queues
            .push(Outbound {
                env,
                queued_at: std::time::Instant::now(),
            })
            .expect("room");
        a.queues.wake();
    }

    pub fn control(&self, cell: PublicKey, frame: Frame) {
        let hub = self.hub.lock().unwrap();
        hub.cells[&cell].control.send(frame).unwrap();
    }

    /// Cuts `cell`'s link as a relay shutting down would.
    pub fn kick(&self, cell: PublicKey) {
        let hub = self.hub.lock().unwrap();
        hub.cells[&cell]
            .link
            .close(CloseCode::Shutdown, "test kick");
    }

    pub fn seen(&self) -> Vec<Envelope> {
        self.hub.lock().unwrap().seen.clone()
    }
}

pub async fn serve_link(link: Link, hub: Arc<Mutex<Hub>>, b: RelayBehaviour, me: PublicKey) {
    static NEXT_ID: AtomicU64 = AtomicU64::new(1);
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let peer = link.peer_key().expect("a proven key");
    let Ok((mut send, mut reader, hello)) = relay_client::link::accept_hello(&link, WAIT).await
    else {
        return;
    };
    assert_eq!(hello.role, Role::Cell);
    hub.lock().unwrap().agents.push(hello.agent.clone());
    if b.silent {
        tokio::time::sleep(Duration::from_secs(60)).await;
        return;
    }
    if let Some((code, reason)) = &b.refuse {
        relay_client::link::close(&link, Some(&mut send), *code, reason).await;
        return;
    }
    let welcome = Frame::Welcome {
        version: PROTOCOL_VERSION,
        node: me,
        time_ms: now_ms(),
        max_payload: b.max_payload.unwrap_or(1 << 20),
        max_frame: 4 << 20,
    };
    send.send(&welcome).await.unwrap();
    let queues = Arc::new(LaneQueues::new(100_000));
    let (control_tx, mut control_rx) = mpsc::unbounded_channel();
    {
        let mut h = hub.lock().unwrap();
        h.links += 1;
        h.cells.insert(
            peer,
            Attached {
                link: link.clone(),
                id,
                queues: queues.clone(),
                control: control_tx,
                watching: false,
                announced: None,
            },
        );
    }
    tokio::spawn(relay_client::link::run_writer(
        link.lane_sender(),
        queues.clone(),
        WriterConfig::default(),
        NoObserver,
    ));
    tokio::spawn(async move {
        while let Some(f) = control_rx.recv().await {
            if send.send(&f).await.is_err() {
                break;
            }
            // Its Close is the last frame of the control stream.
            if matches!(f, Frame::Close { .. }) {
                send.finish();
                break;
            }
        }
    });
    // Data from the cell. Like the relay, on the cell's Close it takes the
    // streams already opened and reads them to the end before closing.
    let drain = std::sync::Arc::new(tokio::sync::Notify::new());
    let mut acceptor = {
        let (link, hub, drain) = (link.clone(), hub.clone(), drain.clone());
        tokio::spawn(async move {
            let mut tasks = tokio::task::JoinSet::new();
            let read = |recv: FrameReceiver| {
                let (link, hub) = (link.clone(), hub.clone());
                async move {
                    let mut reader = BatchReader::new(recv, Limits::default()).unwrap();
                    let mut envs = Vec::new();
                    while let Ok(Some(_)) = reader.next(&mut envs).await {
                        for env in envs.drain(..) {
                            if env.source() != peer {
                                link.close(CloseCode::ForgedSource, "source is not the link's key");
                                return;
                            }
                            route(&hub, peer, env);
                        }
                    }
                }
            };
            loop {
                tokio::select! {
                    r = link.accept_lane() => match r {
                        Ok(recv) => { tasks.spawn(read(recv)); }
                        Err(_) => return,
                    },
                    _ = drain.notified() => break,
                }
            }
            while let Ok(Ok(recv)) =
                tokio::time::timeout(Duration::from_millis(50), link.accept_lane()).await
            {
                tasks.spawn(read(recv));
            }
            while tasks.join_next().await.is_some() {}
        })
    };
    // Control from the cell.
    loop {
        match reader.next().await {
            Ok(Some(Frame::Announce {
                app_version,
                services,
            })) => {
                let mut h = hub.lock().unwrap();
                let info = PresenceInfo {
                    key: peer,
                    app_version: app_version.clone(),
                    services: services.clone(),
                };
                if let Some(a) = h.cells.get_mut(&peer) {
                    a.announced = Some((app_version, services));
                }
                for (k, a) in &h.cells {
                    if *k != peer && a.watching {
                        let _ = a.control.send(Frame::Presence {
                            up: true,
                            info: info.clone(),
                        });
                    }
                }
            }
            Ok(Some(Frame::Discover { request, service })) => {
                let h = hub.lock().unwrap();
                let mut cells: Vec<(PublicKey, String)> = h
                    .cells
                    .iter()
                    .filter_map(|(k, a)| {
                        let (v, s) = a.announced.as_ref()?;
                        s.contains(&service).then(|| (*k, v.clone()))
                    })
                    .collect();
                cells.sort();
                let _ = h.cells[&peer]
                    .control
                    .send(Frame::DiscoverReply { request, cells });
            }
            Ok(Some(Frame::WatchPresence(on))) => {
                if let Some(a) = hub.lock().unwrap().cells.get_mut(&peer) {
                    a.watching = on;
                }
            }
            Ok(Some(Frame::Close { code, .. })) => {
                hub.lock().unwrap().closes.push((peer, code));
                drain.notify_one();
                let _ = tokio::time::timeout(Duration::from_secs(5), &mut acceptor).await;
                // Like the relay: its own Close, then the cell closes the
                // connection once it has read it (bounded).
                let control = hub
                    .lock()
                    .unwrap()
                    .cells
                    .get(&peer)
                    .map(|a| a.control.clone());
                if let Some(c) = control {
                    let _ = c.send(Frame::Close {
                        code: CloseCode::Normal,
                        reason: "closed at the peer's request".into(),
                    });
                }
                let _ = tokio::time::timeout(Duration::from_secs(2), link.closed()).await;
                link.close(CloseCode::Normal, "closed at the peer's request");
            }
            Ok(Some(other)) => panic!("unexpected control frame from a cell: {other:?}"),
            Ok(None) | Err(_) => break,
        }
    }
    link.closed().await;
    let mut h = hub.lock().unwrap();
    if h.cells.get(&peer).is_some_and(|a| a.id == id) {
        h.cells.remove(&peer);
        let info = PresenceInfo {
            key: peer,
            app_version: String::new(),
            services: vec![],
        };
        for a in h.cells.values() {
            if a.watching {
                let _ = a.control.send(Frame::Presence {
                    up: false,
                    info: info.clone(),
                });
            }
        }
    }
}

pub fn route(hub: &Mutex<Hub>, from: PublicKey, env: Envelope) {
    let mut h = hub.lock().unwrap();
    h.seen.push(env.clone());
    let targets: Vec<PublicKey> = match env.destination() {
        Destination::Cell(k) => vec![k],
        Destination::Broadcast => h.cells.keys().copied().filter(|k| *k != from).collect(),
        Destination::Service(s) => h
            .cells
            .iter()
            .filter(|(k, a)| {
                **k != from && a.announced.as_ref().is_some_and(|(_, v)| v.contains(&s))
            })
            .map(|(k, _)| *k)
            .collect(),
    };
    // Forwarded with one hop less, as a relay does.
    let out = env.clone().with_ttl(env.ttl().saturating_sub(1));
    for t in targets {
        if let Some(a) = h.cells.get(&t) {
            let _ = a.queues.push(Outbound {
                env: out.clone(),
                queued_at: std::time::Instant::now(),
            });
            a.queues.wake();
        }
    }
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}
