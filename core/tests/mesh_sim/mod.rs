//! The deterministic mesh simulation's harness: many [`Node`]s and cells in
//! one process, on a simulated network, driven by one seeded generator.
//!
//! - **Time** goes in rounds of [`SimConfig::step_ms`]; in a round every
//!   packet due is delivered (in due-time order), then every live relay
//!   ticks. Every event of a round sees the same [`Now`].
//! - **The network**: a relay link is two endpoints; what a node sends on
//!   one arrives at the other after a random delay of 1 to
//!   `max_delay_ms`, in order per stream (the control stream and each lane
//!   are ordered, as QUIC streams are), in any order across streams and
//!   links. Batches are real batch frames: encoded with the codec and
//!   decoded again on arrival.
//! - **Faults**: a link cut, told to both ends or silent (packets lost
//!   until a node closes the link as idle); a relay crash, told to its
//!   neighbours or silent, its cells moving to other relays; a restart (a
//!   new node with a fresh seed, no memory). Relay links are redialled
//!   forever with exponential backoff and jitter, as the shell does.
//! - **Checks at every step**: no cell gets a message twice; a relay sends
//!   a cell-addressed message to another relay at most once and a flooded
//!   one at most once per relay link; a message crosses at most TTL relays.
//!   After the last fault: routes converge within a bound
//!   ([`Sim::converge`]); then every probe message sent between cells the
//!   mesh connects is delivered, to each matching cell.
//!
//! Everything is ordered by keys and ids (B-trees), so a seed replays
//! exactly.

#![allow(dead_code)]

use bytes::{Bytes, BytesMut};
use relay_codec::frame::{PROTOCOL_VERSION, Role};
use relay_codec::{
    BatchDecoder, BatchEncoder, Destination, Envelope, Frame, Lane, Limits, Message, MessageId,
    PublicKey, ServiceName,
};
use relay_core::{
    Action, Admission, DropReason, FreshnessWindow, LinkInfo, MeshConfig, Node, NodeConfig, Now,
};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// The unix time of round 0.
const T0: u64 = 1_700_000_000_000;
/// The TTL of simulated messages: enough for a line of 30 relays.
pub const SIM_TTL: u8 = 64;
/// Services cells may offer.
const SERVICES: [&str; 3] = ["chat", "files", "clock"];

/// How a simulation's relays are linked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Topology {
    /// 0–1–2–…
    Line,
    /// A line closed into a ring.
    Ring,
    /// A grid as square as the count allows.
    Square,
    /// A random connected graph: a random spanning tree plus extra edges
    /// (about `extra` per relay).
    Random {
        /// Extra edges per relay, in tenths.
        extra_tenths: u32,
    },
    /// Every relay linked to every other.
    Full,
}

/// What one simulation runs.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Relays.
    pub relays: usize,
    /// Cells, spread over the relays at random.
    pub cells: usize,
    /// How the relays are linked.
    pub topology: Topology,
    /// Rounds of random traffic and faults.
    pub chaos_rounds: u32,
    /// Chance of a fault per round, in thousandths.
    pub fault_per_mille: u32,
    /// Random messages per round during the chaos.
    pub traffic_per_round: u32,
    /// Probe messages sent after convergence.
    pub probes: u32,
    /// One round, in ms.
    pub step_ms: u64,
    /// Longest network delay, in ms.
    pub max_delay_ms: u64,
    /// The mesh settings every relay runs with (trusted relays are filled
    /// in).
    pub mesh: MeshConfig,
    /// Dedup ids per relay.
    pub dedup_capacity: usize,
    /// When cells first attach, in ms (0: in the first round).
    pub attach_after_ms: u64,
}

impl SimConfig {
    /// A small configuration for `relays` relays and `cells` cells.
    pub fn small(relays: usize, cells: usize, topology: Topology) -> Self {
        let mesh = MeshConfig {
            max_peers: 64,
            ping_interval_ms: 100,
            peer_timeout_ms: 300,
            // More than a round trip across a line of 30 relays.
            lookup_timeout_ms: 2_000,
            route_ttl_ms: 2_000,
            lane_credit: 256,
            route_hops: 64,
            forget_after_ms: 10_000,
            register_refresh_ms: 2_000,
            ..MeshConfig::new()
        };
        Self {
            relays,
            cells,
            topology,
            chaos_rounds: 300,
            fault_per_mille: 40,
            traffic_per_round: 4,
            probes: 60,
            step_ms: 10,
            max_delay_ms: 20,
            mesh,
            dedup_capacity: 65_536,
            attach_after_ms: 0,
        }
    }
}

type Ep = u64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EndKind {
    Cell(usize),
    /// A relay link; `remote` is the other end's endpoint.
    Peer {
        remote: Ep,
        edge: usize,
    },
}

#[derive(Clone, Copy, Debug)]
struct Endpoint {
    relay: usize,
    kind: EndKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EdgeState {
    /// Both ends up: (endpoint at a, endpoint at b); `silent`: packets
    /// are lost (a cut no end was told of).
    Up { ea: Ep, eb: Ep, silent: bool },
    /// Down; dialled again at `retry_at` (ms), after `attempt` failures.
    Down { retry_at: u64, attempt: u32 },
}

struct Edge {
    a: usize,
    b: usize,
    state: EdgeState,
}

struct Relay {
    key: PublicKey,
    node: Option<Node<Ep>>,
    /// When it restarts, if it is down.
    restart_at: Option<u64>,
    crashed_at: u64,
    /// Starts so far: a restarted relay is a new node with no memory.
    incarnation: u32,
}

struct Cell {
    key: PublicKey,
    /// Its relay and endpoint, if attached.
    at: Option<(usize, Ep)>,
    /// When it (re)attaches, if detached.
    attach_at: Option<u64>,
    services: Vec<ServiceName>,
    received: BTreeSet<MessageId>,
    /// Per message received: (relay, its incarnation, ms) that delivered it.
    by: BTreeMap<MessageId, (usize, u32, u64)>,
}

enum Payload {
    Control(Frame),
    Batch(Bytes),
}

struct Packet {
    to: Ep,
    payload: Payload,
}

/// What a run measured.
#[derive(Clone, Debug, Default)]
pub struct SimReport {
    /// Rounds from the last fault to converged routes.
    pub rounds_to_converge: u32,
    /// The bound they were checked against.
    pub converge_bound: u32,
    /// Probe deliveries expected (and made).
    pub probe_deliveries: u64,
    /// Messages delivered to cells in all.
    pub delivered: u64,
    /// Faults injected.
    pub faults: u32,
    /// Drops by reason, as the nodes counted them.
    pub drops: BTreeMap<&'static str, u64>,
    /// Mesh control bytes sent, in all.
    pub control_bytes: u64,
    /// Second copies of a broadcast or service message to a cell that had
    /// moved to another relay in between (allowed; counted).
    pub redelivered_after_move: u64,
}

/// One simulation.
pub struct Sim {
    pub cfg: SimConfig,
    pub seed: u64,
    rng: fastrand::Rng,
    relays: Vec<Relay>,
    edges: Vec<Edge>,
    cells: Vec<Cell>,
    eps: BTreeMap<Ep, Endpoint>,
    next_ep: Ep,
    /// (due ms, sequence) → packet.
    net: BTreeMap<(u64, u64), Packet>,
    seq: u64,
    /// Per stream (endpoint, stream), the due time of its last packet.
    stream_tail: BTreeMap<(Ep, u8), u64>,
    pub now_ms: u64,
    enc: BatchEncoder,
    dec: BatchDecoder,
    limits: Limits,
    nonce: u64,
    /// (relay, incarnation, message) → sends to other relays.
    forwards: BTreeMap<(usize, u32, MessageId), u32>,
    /// message → relays that sent it on.
    forwarders: BTreeMap<MessageId, BTreeSet<usize>>,
    /// Unicast messages (their ids), to tell flooded ones apart.
    unicast: BTreeSet<MessageId>,
    /// Probes: id → the cells that must get it.
    probes: BTreeMap<MessageId, BTreeSet<usize>>,
    /// Probes: id → (sender cell, destination).
    probe_ends: BTreeMap<MessageId, (usize, String)>,
    pub last_fault_ms: u64,
    pub report: SimReport,
    /// Mesh control bytes sent, per relay, since the last reset.
    pub control_bytes: Vec<u64>,
    work: VecDeque<(usize, Vec<Action<Ep>>)>,
}

fn key_of(tag: u8, i: usize) -> PublicKey {
    let mut b = [0u8; 32];
    b[0] = tag;
    b[1..9].copy_from_slice(&(i as u64).to_le_bytes());
    // The rest from a hash, so keys (and rendezvous scores) look random.
    let h = xx(&b[..9]);
    b[9..17].copy_from_slice(&h.to_le_bytes());
    PublicKey(b)
}

fn xx(b: &[u8]) -> u64 {
    // A small deterministic mix (splitmix64 over the bytes).
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for &c in b {
        x = x
            .wrapping_add(u64::from(c))
            .wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x ^= x >> 31;
    }
    x
}

impl Sim {
    /// A simulation of `cfg` from `seed`: relays up and linked, cells
    /// attached.
    pub fn new(cfg: SimConfig, seed: u64) -> Self {
        let mut rng = fastrand::Rng::with_seed(seed);
        let relays: Vec<Relay> = (0..cfg.relays)
            .map(|i| Relay {
                key: key_of(1, i),
                node: None,
                restart_at: None,
                crashed_at: 0,
                incarnation: 0,
            })
            .collect();
        let edges = build_edges(cfg.topology, cfg.relays, &mut rng)
            .into_iter()
            .map(|(a, b)| Edge {
                a,
                b,
                state: EdgeState::Down {
                    retry_at: 0,
                    attempt: 0,
                },
            })
            .collect();
        let cells = (0..cfg.cells)
            .map(|i| {
                let services = SERVICES
                    .iter()
                    .filter(|_| rng.u32(0..4) == 0)
                    .map(|s| ServiceName::new(*s).unwrap())
                    .collect();
                Cell {
                    key: key_of(2, i),
                    at: None,
                    attach_at: Some(cfg.attach_after_ms),
                    services,
                    received: BTreeSet::new(),
                    by: BTreeMap::new(),
                }
            })
            .collect();
        let limits = Limits::default();
        let mut sim = Sim {
            relays,
            edges,
            cells,
            eps: BTreeMap::new(),
            next_ep: 1,
            net: BTreeMap::new(),
            seq: 0,
            stream_tail: BTreeMap::new(),
            now_ms: 0,
            enc: BatchEncoder::new(1, usize::MAX).expect("a batch encoder"),
            dec: BatchDecoder::new(limits).expect("a batch decoder"),
            limits,
            nonce: 0,
            forwards: BTreeMap::new(),
            forwarders: BTreeMap::new(),
            unicast: BTreeSet::new(),
            probes: BTreeMap::new(),
            probe_ends: BTreeMap::new(),
            last_fault_ms: 0,
            report: SimReport::default(),
            control_bytes: vec![0; cfg.relays],
            work: VecDeque::new(),
            rng,
            seed,
            cfg,
        };
        for i in 0..sim.relays.len() {
            sim.start_relay(i);
        }
        sim
    }

    fn now(&self) -> Now {
        Now {
            mono_ms: self.now_ms + 1,
            unix_ms: T0 + self.now_ms,
        }
    }

    fn start_relay(&mut self, i: usize) {
        let key = self.relays[i].key;
        let cfg = NodeConfig {
            max_links: 4096,
            dedup_capacity: self.cfg.dedup_capacity,
            freshness: FreshnessWindow::new(300_000, 30_000),
            ..NodeConfig::new(key)
        };
        let mut mesh = self.cfg.mesh.clone();
        mesh.trusted_relays = self
            .relays
            .iter()
            .map(|r| r.key)
            .filter(|k| *k != key)
            .collect();
        mesh.addr = format!("relay{i}:4433");
        let node = Node::new(cfg, self.rng.u64(..))
            .expect("node config")
            .with_mesh(mesh)
            .expect("mesh config");
        self.relays[i].node = Some(node);
        self.relays[i].restart_at = None;
        self.relays[i].incarnation += 1;
        let now = self.now_ms;
        for e in &mut self.edges {
            if (e.a == i || e.b == i) && matches!(e.state, EdgeState::Down { .. }) {
                e.state = EdgeState::Down {
                    retry_at: now,
                    attempt: 0,
                };
            }
        }
    }

    fn alive(&self, i: usize) -> bool {
        self.relays[i].node.is_some()
    }

    fn new_ep(&mut self, relay: usize, kind: EndKind) -> Ep {
        let ep = self.next_ep;
        self.next_ep += 1;
        self.eps.insert(ep, Endpoint { relay, kind });
        ep
    }

    /// Dials edge `e` (both ends alive).
    fn connect(&mut self, e: usize) {
        let (a, b) = (self.edges[e].a, self.edges[e].b);
        let ea = self.next_ep;
        let eb = ea + 1;
        self.next_ep += 2;
        self.eps.insert(
            ea,
            Endpoint {
                relay: a,
                kind: EndKind::Peer {
                    remote: eb,
                    edge: e,
                },
            },
        );
        self.eps.insert(
            eb,
            Endpoint {
                relay: b,
                kind: EndKind::Peer {
                    remote: ea,
                    edge: e,
                },
            },
        );
        self.edges[e].state = EdgeState::Up {
            ea,
            eb,
            silent: false,
        };
        let now = self.now();
        let (ka, kb) = (self.relays[a].key, self.relays[b].key);
        // b accepts a's Hello; a has read b's Welcome.
        let mut out = Vec::new();
        let adm = self.relays[b].node.as_mut().unwrap().link_up(
            now,
            eb,
            eb,
            LinkInfo {
                key: ka,
                role: Role::Relay,
                version: PROTOCOL_VERSION,
                notices: false,
            },
            &mut out,
        );
        assert_eq!(
            adm,
            Admission::Admitted,
            "seed {}: relay link refused",
            self.seed
        );
        self.work.push_back((b, out));
        let mut out = Vec::new();
        let adm = self.relays[a]
            .node
            .as_mut()
            .unwrap()
            .peer_dialed(now, ea, ea, kb, &mut out);
        assert_eq!(
            adm,
            Admission::Admitted,
            "seed {}: dialed link refused",
            self.seed
        );
        self.work.push_back((a, out));
        self.run_work();
    }

    /// Attaches cell `c` to relay `r`.
    fn attach(&mut self, c: usize, r: usize) {
        let ep = self.new_ep(r, EndKind::Cell(c));
        self.cells[c].at = Some((r, ep));
        self.cells[c].attach_at = None;
        let now = self.now();
        let key = self.cells[c].key;
        let mut out = Vec::new();
        let node = self.relays[r].node.as_mut().unwrap();
        let adm = node.link_up(
            now,
            ep,
            ep,
            LinkInfo {
                key,
                role: Role::Cell,
                version: PROTOCOL_VERSION,
                notices: true,
            },
            &mut out,
        );
        assert_eq!(adm, Admission::Admitted);
        if !self.cells[c].services.is_empty() {
            node.control(
                now,
                ep,
                Frame::Announce {
                    app_version: "sim".into(),
                    services: self.cells[c].services.clone(),
                },
                &mut out,
            );
        }
        self.work.push_back((r, out));
        self.run_work();
    }

    /// Ends the link of endpoint `ep` at both ends (those still alive).
    fn teardown(&mut self, ep: Ep) {
        let Some(end) = self.eps.remove(&ep) else {
            return;
        };
        let now = self.now();
        if let Some(node) = self.relays[end.relay].node.as_mut() {
            let mut out = Vec::new();
            let _ = node.link_down(now, ep, &mut out);
            self.work.push_back((end.relay, out));
        }
        match end.kind {
            EndKind::Cell(c) => {
                if self.cells[c].at.map(|(_, e)| e) == Some(ep) {
                    self.cells[c].at = None;
                    self.cells[c].attach_at = Some(self.now_ms + 50 + self.rng.u64(0..200));
                }
            }
            EndKind::Peer { remote, edge } => {
                if let Some(r) = self.eps.remove(&remote)
                    && let Some(node) = self.relays[r.relay].node.as_mut()
                {
                    let mut out = Vec::new();
                    let _ = node.link_down(now, remote, &mut out);
                    self.work.push_back((r.relay, out));
                }
                if let EdgeState::Up { ea, eb, .. } = self.edges[edge].state
                    && (ea == ep || eb == ep || ea == remote || eb == remote)
                {
                    let attempt = 0;
                    self.edges[edge].state = EdgeState::Down {
                        retry_at: self.now_ms + self.backoff(attempt),
                        attempt,
                    };
                }
            }
        }
    }

    /// Exponential backoff with jitter: 20 ms × 2^attempt, at most 640 ms,
    /// plus up to half of it.
    fn backoff(&mut self, attempt: u32) -> u64 {
        let base = (20u64 << attempt.min(5)).min(640);
        base + self.rng.u64(0..=base / 2)
    }

    /// Carries out queued actions until none is left.
    fn run_work(&mut self) {
        while let Some((relay, actions)) = self.work.pop_front() {
            let mut batches: BTreeMap<(Ep, Lane), Vec<Envelope>> = BTreeMap::new();
            let mut closes = Vec::new();
            let trace = std::env::var("SIM_TRACE_ID").ok();
            for a in actions {
                if let Some(t) = &trace {
                    let s = format!("{a:?}");
                    if s.contains(t.as_str())
                        || matches!(a, Action::Drop { .. }) && s.contains("Unknown")
                    {
                        eprintln!(
                            "{} ms: relay {relay}: {}",
                            self.now_ms,
                            &s[..s.len().min(300)]
                        );
                    }
                }
                match a {
                    Action::Control { to, frame } => self.control_out(relay, to, frame),
                    Action::Deliver { to, id, env, .. } => {
                        match self.eps.get(&to).map(|e| e.kind) {
                            Some(EndKind::Cell(c)) => self.deliver(relay, c, to, id, &env),
                            Some(EndKind::Peer { remote, .. }) => {
                                self.count_forward(relay, id, &env);
                                batches.entry((remote, env.lane())).or_default().push(env);
                            }
                            None => {}
                        }
                    }
                    Action::Forward { to, batch, .. } => {
                        let envs: Vec<Envelope> = self
                            .dec
                            .messages(&batch)
                            .expect("a forwarded batch decodes")
                            .map(|m| m.expect("its messages decode"))
                            .collect();
                        match self.eps.get(&to).map(|e| e.kind) {
                            Some(EndKind::Cell(c)) => {
                                for env in &envs {
                                    self.deliver(relay, c, to, env.id(), env);
                                }
                            }
                            Some(EndKind::Peer { remote, .. }) => {
                                for env in envs {
                                    self.count_forward(relay, env.id(), &env);
                                    batches.entry((remote, env.lane())).or_default().push(env);
                                }
                            }
                            None => {}
                        }
                    }
                    Action::Close { link, .. } => closes.push(link),
                    Action::Drop { reason, count } => {
                        *self.report.drops.entry(reason.as_str()).or_default() += count;
                    }
                    Action::PeerClosing { link, .. } => closes.push(link),
                    _ => {}
                }
            }
            for ((to, lane), envs) in batches {
                for env in &envs {
                    self.enc.push_envelope(env);
                }
                let mut buf = BytesMut::new();
                self.enc.finish(lane, &mut buf);
                self.send(to, 1 + lane as u8, Payload::Batch(buf.freeze()));
            }
            for link in closes {
                self.teardown(link);
            }
        }
    }

    fn control_out(&mut self, relay: usize, to: Ep, frame: Frame) {
        if let Frame::Mesh(_) = &frame {
            let n = frame.to_bytes().len() as u64;
            self.control_bytes[relay] += n;
            self.report.control_bytes += n;
        }
        match self.eps.get(&to).map(|e| e.kind) {
            Some(EndKind::Peer { remote, .. }) => {
                // The handshake layer consumes Welcome.
                if !matches!(frame, Frame::Welcome { .. }) {
                    self.send(remote, 0, Payload::Control(frame));
                }
            }
            Some(EndKind::Cell(_)) | None => {}
        }
    }

    fn send(&mut self, to: Ep, stream: u8, payload: Payload) {
        // A silent cut loses what is sent on it.
        if let Some(Endpoint {
            kind: EndKind::Peer { edge, .. },
            ..
        }) = self.eps.get(&to)
            && matches!(self.edges[*edge].state, EdgeState::Up { silent: true, .. })
        {
            return;
        }
        let delay = 1 + self.rng.u64(0..self.cfg.max_delay_ms);
        let tail = self.stream_tail.entry((to, stream)).or_insert(0);
        let at = (self.now_ms + delay).max(*tail);
        *tail = at;
        self.seq += 1;
        self.net.insert((at, self.seq), Packet { to, payload });
    }

    fn count_forward(&mut self, relay: usize, id: MessageId, env: &Envelope) {
        let inc = self.relays[relay].incarnation;
        let n = self.forwards.entry((relay, inc, id)).or_default();
        *n += 1;
        let n = *n;
        let seed = self.seed;
        if self.unicast.contains(&id) {
            assert!(
                n <= 1,
                "seed {seed}: relay {relay} sent cell-addressed message {id} to a relay {n} times (a loop)"
            );
        } else {
            let degree = self
                .edges
                .iter()
                .filter(|e| e.a == relay || e.b == relay)
                .count() as u32;
            assert!(
                n <= degree,
                "seed {seed}: relay {relay} flooded {id} {n} times; it has {degree} links"
            );
        }
        let relays = self.forwarders.entry(id).or_default();
        relays.insert(relay);
        assert!(
            relays.len() <= SIM_TTL as usize,
            "seed {seed}: {id} was sent on by {} relays, more than its TTL {SIM_TTL}",
            relays.len()
        );
        let _ = env;
    }

    fn deliver(&mut self, relay: usize, c: usize, ep: Ep, id: MessageId, env: &Envelope) {
        let seed = self.seed;
        let inc = self.relays[relay].incarnation;
        let now = self.now_ms;
        let cell = &mut self.cells[c];
        assert_eq!(
            cell.at.map(|(_, e)| e),
            Some(ep),
            "seed {seed}: delivery on a stale link"
        );
        match env.destination() {
            Destination::Cell(k) => assert_eq!(k, cell.key, "seed {seed}: {id} to the wrong cell"),
            Destination::Broadcast => {}
            Destination::Service(s) => assert!(
                cell.services.contains(&s),
                "seed {seed}: {id} for {s} to a cell not offering it"
            ),
        }
        assert_ne!(
            env.source(),
            cell.key,
            "seed {seed}: {id} came back to its sender"
        );
        if let Some(first) = cell.by.get(&id)
            && cell.at.map(|(r, _)| r) == Some(first.0)
            && first.1 == inc
        {
            panic!(
                "seed {seed}: cell {c} got message {id} twice: from relay {first:?} (relay, incarnation, ms), then from relay {relay} incarnation {inc} at {now} ms",
            );
        }
        if !cell.received.insert(id) {
            // A second copy after the cell moved to another relay (the
            // first relay had it before the cell left): the relays cannot
            // know; a cell drops it by its id (end to end).
            self.report.redelivered_after_move += 1;
            return;
        }
        cell.by.insert(id, (relay, inc, now));
        self.report.delivered += 1;
    }

    /// Sends a message from cell `c` to `dest`; returns its id.
    fn send_from(&mut self, c: usize, dest: Destination, lane: Lane) -> Option<MessageId> {
        let (r, ep) = self.cells[c].at?;
        self.nonce += 1;
        let msg = Message::new(self.cells[c].key, dest.clone(), Bytes::from_static(b"sim"))
            .with_lane(lane)
            .with_ttl(SIM_TTL)
            .with_timestamp(T0 + self.now_ms)
            .with_nonce(self.nonce);
        let mut buf = BytesMut::new();
        let mut enc = BatchEncoder::new(1, usize::MAX).expect("encoder");
        enc.push(&msg);
        enc.finish(lane, &mut buf);
        let Frame::Batch(batch) = Frame::decode(buf.freeze(), &self.limits).unwrap() else {
            unreachable!("a batch frame");
        };
        let envs: Vec<Envelope> = self
            .dec
            .messages(&batch)
            .unwrap()
            .map(|m| m.unwrap())
            .collect();
        let id = envs[0].id();
        if matches!(dest, Destination::Cell(_)) {
            self.unicast.insert(id);
        }
        let now = self.now();
        let mut out = Vec::new();
        self.relays[r]
            .node
            .as_mut()
            .unwrap()
            .batch(now, ep, &envs, &batch, &mut out);
        self.work.push_back((r, out));
        self.run_work();
        Some(id)
    }

    fn random_lane(&mut self) -> Lane {
        Lane::ALL[self.rng.usize(0..4)]
    }

    fn random_message(&mut self) -> Option<(usize, Destination, Lane)> {
        let c = self.rng.usize(0..self.cells.len());
        self.cells[c].at?;
        let dest = match self.rng.u32(0..10) {
            0 => Destination::Broadcast,
            1 => Destination::Service(ServiceName::new(SERVICES[self.rng.usize(0..3)]).unwrap()),
            _ => {
                let mut d = self.rng.usize(0..self.cells.len());
                if d == c {
                    d = (d + 1) % self.cells.len();
                }
                Destination::Cell(self.cells[d].key)
            }
        };
        Some((c, dest, self.random_lane()))
    }

    /// One round: packets due, ticks, scheduled restarts, attaches and
    /// redials.
    pub fn round(&mut self) {
        self.now_ms += self.cfg.step_ms;
        while let Some(entry) = self.net.first_entry() {
            if entry.key().0 > self.now_ms {
                break;
            }
            let p = entry.remove();
            self.arrive(p);
        }
        let now = self.now();
        for i in 0..self.relays.len() {
            if let Some(node) = self.relays[i].node.as_mut() {
                let mut out = Vec::new();
                node.tick(now, &mut out);
                self.work.push_back((i, out));
            }
        }
        self.run_work();
        for i in 0..self.relays.len() {
            if self.relays[i].restart_at.is_some_and(|t| t <= self.now_ms) {
                self.start_relay(i);
            }
        }
        for c in 0..self.cells.len() {
            if self.cells[c].attach_at.is_some_and(|t| t <= self.now_ms) {
                let alive: Vec<usize> = (0..self.relays.len()).filter(|r| self.alive(*r)).collect();
                if alive.is_empty() {
                    continue;
                }
                let r = alive[self.rng.usize(0..alive.len())];
                self.attach(c, r);
            }
        }
        for e in 0..self.edges.len() {
            if let EdgeState::Down { retry_at, attempt } = self.edges[e].state
                && retry_at <= self.now_ms
            {
                if self.alive(self.edges[e].a) && self.alive(self.edges[e].b) {
                    self.connect(e);
                } else {
                    let next = attempt + 1;
                    let retry_at = self.now_ms + self.backoff(next);
                    self.edges[e].state = EdgeState::Down {
                        retry_at,
                        attempt: next,
                    };
                }
            }
        }
    }

    fn arrive(&mut self, p: Packet) {
        let Some(end) = self.eps.get(&p.to).copied() else {
            return;
        };
        if let (Ok(want), Payload::Batch(b)) = (std::env::var("SIM_TRACE_ID"), &p.payload) {
            let Frame::Batch(batch) = Frame::decode(b.clone(), &self.limits).unwrap() else {
                unreachable!()
            };
            for m in self.dec.messages(&batch).unwrap() {
                let m = m.unwrap();
                if m.id().to_string() == want {
                    eprintln!(
                        "{} ms: {want} arrives at relay {} (ttl {})",
                        self.now_ms,
                        end.relay,
                        m.ttl()
                    );
                }
            }
        }
        let now = self.now();
        let Some(node) = self.relays[end.relay].node.as_mut() else {
            return;
        };
        let mut out = Vec::new();
        match p.payload {
            Payload::Control(frame) => node.control(now, p.to, frame, &mut out),
            Payload::Batch(bytes) => {
                let Frame::Batch(batch) = Frame::decode(bytes, &self.limits).unwrap() else {
                    unreachable!("a batch");
                };
                let envs: Vec<Envelope> = self
                    .dec
                    .messages(&batch)
                    .unwrap()
                    .map(|m| m.unwrap())
                    .collect();
                node.batch(now, p.to, &envs, &batch, &mut out);
            }
        }
        self.work.push_back((end.relay, out));
        self.run_work();
    }

    /// Injects one random fault.
    pub fn fault(&mut self) {
        self.report.faults += 1;
        self.last_fault_ms = self.now_ms;
        match self.rng.u32(0..10) {
            // A link cut, told to both ends.
            0..=3 => {
                if let Some(e) = self.random_up_edge()
                    && let EdgeState::Up { ea, .. } = self.edges[e].state
                {
                    self.teardown(ea);
                    self.run_work();
                }
            }
            // A silent cut: the ends find out by their peer timeout.
            4..=5 => {
                if let Some(e) = self.random_up_edge()
                    && let EdgeState::Up { ea, eb, .. } = self.edges[e].state
                {
                    self.edges[e].state = EdgeState::Up {
                        ea,
                        eb,
                        silent: true,
                    };
                }
            }
            // A relay crash; it restarts later.
            _ => {
                let alive: Vec<usize> = (0..self.relays.len()).filter(|r| self.alive(*r)).collect();
                if alive.len() <= 1 {
                    return;
                }
                let r = alive[self.rng.usize(0..alive.len())];
                self.crash(r);
            }
        }
    }

    fn random_up_edge(&mut self) -> Option<usize> {
        let up: Vec<usize> = (0..self.edges.len())
            .filter(|e| matches!(self.edges[*e].state, EdgeState::Up { silent: false, .. }))
            .collect();
        (!up.is_empty()).then(|| up[self.rng.usize(0..up.len())])
    }

    /// Relay `r` dies: its state is gone; each neighbour is told (the
    /// connection resets) or not (it times out); its cells move.
    pub fn crash(&mut self, r: usize) {
        self.relays[r].node = None;
        self.relays[r].crashed_at = self.now_ms;
        self.relays[r].restart_at = Some(self.now_ms + 1_000 + self.rng.u64(0..1_000));
        let mine: Vec<(Ep, Endpoint)> = self
            .eps
            .iter()
            .filter(|(_, e)| e.relay == r)
            .map(|(k, e)| (*k, *e))
            .collect();
        for (ep, end) in mine {
            self.eps.remove(&ep);
            match end.kind {
                EndKind::Cell(c) => {
                    self.cells[c].at = None;
                    self.cells[c].attach_at = Some(self.now_ms + 50 + self.rng.u64(0..300));
                }
                EndKind::Peer { remote, edge } => {
                    self.edges[edge].state = EdgeState::Down {
                        retry_at: self.now_ms,
                        attempt: 0,
                    };
                    if self.rng.bool() {
                        self.teardown(remote);
                    }
                    // Otherwise the remote end lingers, its packets lost,
                    // until its node closes it as idle.
                }
            }
        }
        self.run_work();
    }

    /// Ends the chaos: relays that crashed too recently for their
    /// neighbours to have noticed stay down; the others restart now.
    fn end_chaos(&mut self) {
        let quiet =
            self.cfg.mesh.peer_timeout_ms + 2 * self.cfg.max_delay_ms * self.relays.len() as u64;
        for i in 0..self.relays.len() {
            if self.relays[i].restart_at.is_some() {
                if self.now_ms - self.relays[i].crashed_at >= quiet {
                    self.start_relay(i);
                } else {
                    self.relays[i].restart_at = None;
                }
            }
        }
        self.last_fault_ms = self.now_ms;
    }

    /// The connected component of every live relay over the links up.
    fn components(&self) -> Vec<Option<usize>> {
        let n = self.relays.len();
        let mut comp = vec![None; n];
        let mut adj = vec![Vec::new(); n];
        for e in &self.edges {
            if let EdgeState::Up { silent: false, .. } = e.state
                && self.alive(e.a)
                && self.alive(e.b)
            {
                adj[e.a].push(e.b);
                adj[e.b].push(e.a);
            }
        }
        let mut next = 0;
        for s in 0..n {
            if comp[s].is_some() || !self.alive(s) {
                continue;
            }
            comp[s] = Some(next);
            let mut q = vec![s];
            while let Some(u) = q.pop() {
                for &v in &adj[u] {
                    if comp[v].is_none() {
                        comp[v] = Some(next);
                        q.push(v);
                    }
                }
            }
            next += 1;
        }
        comp
    }

    /// Whether every edge between live relays is up and every live relay
    /// sees exactly its component as reachable.
    pub fn converged(&mut self) -> bool {
        for e in &self.edges {
            let both = self.alive(e.a) && self.alive(e.b);
            if both && !matches!(e.state, EdgeState::Up { silent: false, .. }) {
                return false;
            }
        }
        // No lingering half of a link to a dead relay.
        for end in self.eps.values() {
            if let EndKind::Peer { remote, .. } = end.kind
                && !self.eps.contains_key(&remote)
            {
                return false;
            }
        }
        if self
            .cells
            .iter()
            .any(|c| c.at.is_none() && c.attach_at.is_some_and(|t| t != u64::MAX))
        {
            return false;
        }
        let comp = self.components();
        for i in 0..self.relays.len() {
            let Some(ci) = comp[i] else { continue };
            let want: Vec<PublicKey> = {
                let mut v: Vec<PublicKey> = (0..self.relays.len())
                    .filter(|j| comp[*j] == Some(ci))
                    .map(|j| self.relays[j].key)
                    .collect();
                v.sort();
                v
            };
            let node = self.relays[i].node.as_mut().unwrap();
            if node.mesh_mut().reachable() != want.as_slice() {
                return false;
            }
        }
        true
    }

    /// What keeps [`converged`](Self::converged) false, for a failure's
    /// message.
    fn why_not_converged(&mut self) -> String {
        let mut why = Vec::new();
        for (i, e) in self.edges.iter().enumerate() {
            let both = self.alive(e.a) && self.alive(e.b);
            if both && !matches!(e.state, EdgeState::Up { silent: false, .. }) {
                why.push(format!("edge {i} ({}-{}) is {:?}", e.a, e.b, e.state));
            }
        }
        for (ep, end) in &self.eps {
            if let EndKind::Peer { remote, .. } = end.kind
                && !self.eps.contains_key(&remote)
            {
                why.push(format!("endpoint {ep} at relay {} lingers", end.relay));
            }
        }
        let comp = self.components();
        let keys: Vec<PublicKey> = self.relays.iter().map(|r| r.key).collect();
        for i in 0..self.relays.len() {
            if comp[i].is_none() {
                continue;
            }
            let want = (0..self.relays.len())
                .filter(|j| comp[*j] == comp[i])
                .count();
            let node = self.relays[i].node.as_mut().unwrap();
            let peers: Vec<usize> = node
                .mesh()
                .peers()
                .map(|(_, k)| keys.iter().position(|x| *x == k).unwrap())
                .collect();
            let got = node.mesh_mut().reachable().len();
            if got != want {
                let p = |k: &PublicKey| keys.iter().position(|x| x == k).unwrap();
                let reach: Vec<usize> = node.mesh_mut().reachable().iter().map(p).collect();
                let topo: Vec<(usize, Vec<usize>)> = node
                    .mesh()
                    .topology()
                    .iter()
                    .map(|(k, ns)| (p(k), ns.iter().map(p).collect()))
                    .collect();
                why.push(format!(
                    "relay {i} reaches {got} of {want} {reach:?}; its peers {peers:?}; holds {topo:?}"
                ));
            }
        }
        why.join("; ")
    }

    /// Runs rounds until routes converge; returns how many it took, and
    /// fails past `bound`.
    pub fn converge(&mut self, bound: u32) -> u32 {
        let mut rounds = 0;
        while !self.converged() {
            rounds += 1;
            if rounds > bound {
                let why = self.why_not_converged();
                panic!(
                    "seed {}: routes did not converge within {bound} rounds of the last fault: {why}",
                    self.seed
                );
            }
            self.round();
        }
        rounds
    }

    /// The convergence bound: the longest redial backoff and peer timeout,
    /// then a LinkState across the mesh and back, in rounds, with room.
    pub fn converge_bound(&self) -> u32 {
        let step = self.cfg.step_ms;
        let detect = (self.cfg.mesh.peer_timeout_ms + 960 + 400) / step;
        let flood = 2 * self.relays.len() as u64 * self.cfg.max_delay_ms / step;
        (detect + flood + 20) as u32
    }

    /// Rounds after route convergence until the directory and the route
    /// caches are right: a registration refresh, a cached route's life,
    /// and a frame across the mesh.
    pub fn directory_settle_rounds(&self) -> u32 {
        let m = &self.cfg.mesh;
        let wait = m.register_refresh_ms.max(m.route_ttl_ms)
            + 2 * self.relays.len() as u64 * self.cfg.max_delay_ms;
        (wait / self.cfg.step_ms) as u32 + 5
    }

    /// Runs rounds until nothing is in flight and no lookup is pending
    /// (at most `max` rounds).
    pub fn drain(&mut self, max: u32) {
        for _ in 0..max {
            let pending: usize = self
                .relays
                .iter()
                .filter_map(|r| r.node.as_ref())
                .map(|n| n.mesh().stats().pending_lookups)
                .sum();
            if self.net.is_empty() && pending == 0 {
                return;
            }
            self.round();
        }
    }

    /// Sends a probe from cell `c` and records who must get it: the
    /// matching attached cells of the sender's component.
    fn probe(&mut self, c: usize, dest: Destination, lane: Lane) {
        let Some((r, _)) = self.cells[c].at else {
            return;
        };
        let comp = self.components();
        let want: BTreeSet<usize> = (0..self.cells.len())
            .filter(|&d| d != c)
            .filter(|&d| self.cells[d].at.is_some_and(|(rd, _)| comp[rd] == comp[r]))
            .filter(|&d| match &dest {
                Destination::Cell(k) => self.cells[d].key == *k,
                Destination::Broadcast => true,
                Destination::Service(s) => self.cells[d].services.contains(s),
            })
            .collect();
        let desc = format!("{dest:?}").chars().take(40).collect::<String>();
        let dest_copy = dest.clone();
        if let Some(id) = self.send_from(c, dest, lane) {
            if std::env::var("SIM_TRACE_ID").is_ok_and(|t| t == id.to_string()) {
                let n = self.relays[r].node.as_mut().unwrap();
                let st = n.mesh().stats();
                let reach = n.mesh_mut().reachable().len();
                eprintln!(
                    "{} ms: probe {id} sent from relay {r}: {st:?}, {reach} reachable",
                    self.now_ms
                );
                if let Destination::Cell(k) = &dest_copy {
                    let keys: Vec<PublicKey> = self.relays.iter().map(|r| r.key).collect();
                    for (i, rl) in self.relays.iter().enumerate() {
                        if let Some(n) = rl.node.as_ref()
                            && let Some(c) = n.mesh().cached_route(k)
                        {
                            let h = keys.iter().position(|x| *x == c.at.home);
                            eprintln!(
                                "  relay {i} caches home {h:?} v{} until {}",
                                c.at.version, c.expires_ms
                            );
                        }
                    }
                }
            }
            self.probe_ends.insert(id, (c, desc));
            self.report.probe_deliveries += want.len() as u64;
            self.probes.insert(id, want);
        }
    }

    /// The whole run: chaos, convergence, probes, checks.
    pub fn run(&mut self) -> SimReport {
        // Let the mesh form before the chaos.
        let bound = self.converge_bound();
        self.converge(bound);
        for _ in 0..self.cfg.chaos_rounds {
            for _ in 0..self.cfg.traffic_per_round {
                if let Some((c, dest, lane)) = self.random_message() {
                    self.send_from(c, dest, lane);
                }
            }
            if self.rng.u32(0..1000) < self.cfg.fault_per_mille {
                self.fault();
            }
            self.round();
        }
        self.end_chaos();
        self.report.converge_bound = bound;
        self.report.rounds_to_converge = self.converge(bound);
        // The directory converges after the routes: registrations go out
        // on the tick after the views change, and what a lost frame or a
        // stale cache left wrong is mended by the next refresh
        // (`register_refresh_ms`) or expires (`route_ttl_ms`).
        let settle = self.directory_settle_rounds();
        for _ in 0..settle {
            self.round();
        }
        for _ in 0..self.cfg.probes {
            if let Some((c, dest, lane)) = self.random_message() {
                self.probe(c, dest, lane);
            }
        }
        self.drain(10 * bound);
        let mut missing = Vec::new();
        for (id, want) in &self.probes {
            for &d in want {
                if !self.cells[d].received.contains(id) {
                    missing.push((id, d));
                }
            }
        }
        if !missing.is_empty() && std::env::var("SIM_DEBUG").is_ok() {
            for (id, d) in &missing {
                let (src, dst) = self.probe_ends[id].clone();
                let sr = self.cells[src].at.map(|a| a.0);
                let dr = self.cells[*d].at.map(|a| a.0);
                eprintln!("missing {id}: cell {src} at {sr:?} -> cell {d} ({dst}) at {dr:?}");
                let ck = self.cells[*d].key;
                let keys: Vec<PublicKey> = self.relays.iter().map(|r| r.key).collect();
                for (i, r) in self.relays.iter_mut().enumerate() {
                    if let Some(n) = r.node.as_mut() {
                        let m = n.mesh_mut();
                        let hs: Vec<usize> = m
                            .holders_of(&ck)
                            .iter()
                            .map(|h| keys.iter().position(|k| k == h).unwrap())
                            .collect();
                        let e = m
                            .directory_entry(&ck)
                            .map(|l| (keys.iter().position(|k| *k == l.home), l.version));
                        eprintln!(
                            "  relay {i}: home {} holders {hs:?} entry {e:?} router {:?}",
                            m.is_home_of(&ck),
                            n.router().cell(&ck).map(|x| x.0)
                        );
                    }
                }
            }
            for (i, r) in self.relays.iter_mut().enumerate() {
                if let Some(n) = r.node.as_mut() {
                    eprintln!(
                        "relay {i}: {:?} reachable {}",
                        n.mesh().stats(),
                        n.mesh_mut().reachable().len()
                    );
                }
            }
        }
        assert!(
            missing.is_empty(),
            "seed {}: {} probe deliveries of {} missing after the last fault, e.g. {:?}; drops {:?}",
            self.seed,
            missing.len(),
            self.report.probe_deliveries,
            &missing[..missing.len().min(5)],
            self.report.drops
        );
        self.report.clone()
    }

    /// Relays and their nodes, for the scale report.
    pub fn nodes(&self) -> impl Iterator<Item = &Node<Ep>> {
        self.relays.iter().filter_map(|r| r.node.as_ref())
    }

    /// Sends `n` random unicast probes and checks they all arrive.
    pub fn probe_unicast(&mut self, n: u32, drain_rounds: u32) -> u64 {
        self.probes.clear();
        let before = self.report.probe_deliveries;
        for _ in 0..n {
            let c = self.rng.usize(0..self.cells.len());
            let d = (c + 1 + self.rng.usize(0..self.cells.len() - 1)) % self.cells.len();
            let dest = Destination::Cell(self.cells[d].key);
            let lane = self.random_lane();
            self.probe(c, dest, lane);
        }
        self.drain(drain_rounds);
        let missing = self
            .probes
            .iter()
            .flat_map(|(id, want)| want.iter().map(move |d| (*id, *d)))
            .filter(|(id, d)| !self.cells[*d].received.contains(id))
            .count();
        assert_eq!(missing, 0, "seed {}: probes lost: {missing}", self.seed);
        self.report.probe_deliveries - before
    }

    /// Resets the per-relay control byte counters.
    pub fn reset_control_bytes(&mut self) {
        self.control_bytes.iter_mut().for_each(|b| *b = 0);
    }

    /// Crashes relay `r` without restart.
    pub fn kill(&mut self, r: usize) {
        self.crash(r);
        self.relays[r].restart_at = None;
        self.last_fault_ms = self.now_ms;
    }

    /// Live relays.
    pub fn alive_count(&self) -> usize {
        self.relays.iter().filter(|r| r.node.is_some()).count()
    }

    /// Drops counted by the nodes for `reason`.
    pub fn drops(&self, reason: DropReason) -> u64 {
        self.report.drops.get(reason.as_str()).copied().unwrap_or(0)
    }
}

impl Sim {
    /// Every attached cell broadcasts once, on the normal lane.
    pub fn broadcast_from_all(&mut self) {
        for c in 0..self.cells.len() {
            self.send_from(c, Destination::Broadcast, Lane::Normal);
        }
    }

    /// `n` messages at once from a cell to a cell on another relay, on the
    /// bulk lane.
    pub fn burst(&mut self, n: u32) {
        let from = (0..self.cells.len())
            .find(|&c| self.cells[c].at.is_some())
            .unwrap();
        let r = self.cells[from].at.unwrap().0;
        let to = (0..self.cells.len())
            .find(|&c| self.cells[c].at.is_some_and(|(rc, _)| rc != r))
            .expect("a cell on another relay");
        let key = self.cells[to].key;
        for _ in 0..n {
            self.send_from(from, Destination::Cell(key), Lane::Bulk);
        }
    }
}

/// The scale run: `relays` relays on a random graph (about 5 links each),
/// `cells` cells; prints rounds to converge, route memory per relay and
/// control bytes per relay per round, and checks unicast probes arrive.
pub fn scale_run(relays: usize, cells: usize) {
    let t = std::time::Instant::now();
    let mut cfg = SimConfig::small(relays, cells, Topology::Random { extra_tenths: 15 });
    cfg.step_ms = 100;
    cfg.max_delay_ms = 50;
    cfg.dedup_capacity = 4_096;
    cfg.attach_after_ms = u64::MAX;
    cfg.mesh = MeshConfig {
        max_peers: 64,
        route_hops: 64,
        ..MeshConfig::new()
    };
    let seed = 42;
    let mut s = Sim::new(cfg, seed);
    let bound = s.converge_bound();
    let form = s.converge(bound);
    println!(
        "scale run: {relays} relays, {} links, {cells} cells; a round is {} ms",
        s.edges.len(),
        s.cfg.step_ms
    );
    println!(
        "  mesh formed: routes converged in {form} rounds ({:.1} s of wall time so far)",
        t.elapsed().as_secs_f64()
    );
    let per_round = |s: &Sim, rounds: u32| {
        let n = s.alive_count().max(1) as f64;
        let total: u64 = s.control_bytes.iter().sum();
        let max = s.control_bytes.iter().max().copied().unwrap_or(0);
        (
            total as f64 / n / f64::from(rounds.max(1)),
            max as f64 / f64::from(rounds.max(1)),
        )
    };
    // Steady state: pings only.
    s.reset_control_bytes();
    for _ in 0..50 {
        s.round();
    }
    let (mean, max) = per_round(&s, 50);
    println!(
        "  steady state, no cells: control bytes per relay per round: mean {mean:.0}, max {max:.0}"
    );
    // Every cell attaches now.
    s.reset_control_bytes();
    for c in 0..s.cells.len() {
        s.cells[c].attach_at = Some(s.now_ms);
    }
    s.round();
    let attach_rounds = 20;
    for _ in 1..attach_rounds {
        s.round();
    }
    let (mean, max) = per_round(&s, attach_rounds);
    println!(
        "  {cells} cells attached: control bytes per relay per round over the next {attach_rounds} rounds: mean {mean:.0}, max {max:.0}"
    );
    s.reset_control_bytes();
    for _ in 0..50 {
        s.round();
    }
    let (mean, max) = per_round(&s, 50);
    println!(
        "  steady state with cells: control bytes per relay per round: mean {mean:.0}, max {max:.0}"
    );
    let delivered = s.probe_unicast(2_000, 200);
    memory_report(&s, "after 2,000 unicast probes");
    let (hits, misses) = s.nodes().fold((0, 0), |(h, m), n| {
        let c = n.mesh().stats().cache;
        (h + c.hits, m + c.misses)
    });
    println!(
        "  probes: {delivered} delivered of {delivered} sent; route cache hit rate {:.1} % ({hits} hits, {misses} misses)",
        100.0 * hits as f64 / (hits + misses).max(1) as f64
    );
    // 1 % of the relays die at once, silently or not.
    s.reset_control_bytes();
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut killed = 0;
    while killed < relays / 100 {
        let r = rng.usize(0..relays);
        if s.alive(r) {
            s.kill(r);
            killed += 1;
        }
    }
    let rounds = s.converge(bound);
    let (mean, max) = per_round(&s, rounds);
    println!(
        "  {killed} relays killed: routes converged in {rounds} rounds (bound {bound}); control bytes per relay per round meanwhile: mean {mean:.0}, max {max:.0}"
    );
    for _ in 0..20 {
        s.round();
    }
    let delivered = s.probe_unicast(1_000, 200);
    println!("  after the failure: {delivered} probes delivered of {delivered}");
    memory_report(&s, "at the end");
    println!("  wall time {:.1} s", t.elapsed().as_secs_f64());
}

fn memory_report(s: &Sim, when: &str) {
    let stats: Vec<relay_core::MeshStats> = s.nodes().map(|n| n.mesh().stats()).collect();
    let n = stats.len().max(1);
    let col = |f: &dyn Fn(&relay_core::MeshStats) -> usize| {
        let max = stats.iter().map(f).max().unwrap_or(0);
        let mean = stats.iter().map(f).sum::<usize>() as f64 / n as f64;
        (mean, max)
    };
    let ls = col(&|m| m.relays_known);
    let dir = col(&|m| m.directory_entries);
    let cache = col(&|m| m.cached_routes);
    let held = col(&|m| m.held);
    let peers = col(&|m| m.peers);
    // Bytes: a LinkState entry is a key, a seq, an address and its
    // neighbour keys plus a B-tree slot (~80 B + 32 B per neighbour); a
    // directory entry 32 + 40 B plus the LRU's ~48 B; a cached route
    // 32 + 56 B plus ~48 B.
    let bytes = |ls: f64, dir: f64, cache: f64, peers: f64| {
        ls * (80.0 + 32.0 * peers) + dir * 120.0 + cache * 136.0
    };
    println!(
        "  route memory per relay {when}: link states mean {:.0} (max {}), directory entries mean {:.0} (max {}), cached routes mean {:.0} (max {}), held mean {:.1} (max {}); about {:.0} KiB mean, {:.0} KiB max",
        ls.0,
        ls.1,
        dir.0,
        dir.1,
        cache.0,
        cache.1,
        held.0,
        held.1,
        bytes(ls.0, dir.0, cache.0, peers.0) / 1024.0,
        bytes(ls.1 as f64, dir.1 as f64, cache.1 as f64, peers.0) / 1024.0,
    );
}

/// The edges of `topology` over `n` relays.
fn build_edges(topology: Topology, n: usize, rng: &mut fastrand::Rng) -> Vec<(usize, usize)> {
    let mut e = BTreeSet::new();
    let mut add = |a: usize, b: usize| {
        if a != b {
            e.insert((a.min(b), a.max(b)));
        }
    };
    match topology {
        Topology::Line => (1..n).for_each(|i| add(i - 1, i)),
        Topology::Ring => {
            (1..n).for_each(|i| add(i - 1, i));
            if n > 2 {
                add(n - 1, 0);
            }
        }
        Topology::Square => {
            let w = (n as f64).sqrt().ceil() as usize;
            for i in 0..n {
                if (i + 1) % w != 0 && i + 1 < n {
                    add(i, i + 1);
                }
                if i + w < n {
                    add(i, i + w);
                }
            }
        }
        Topology::Random { extra_tenths } => {
            for i in 1..n {
                add(rng.usize(0..i), i);
            }
            for _ in 0..(n as u64 * u64::from(extra_tenths) / 10) {
                add(rng.usize(0..n), rng.usize(0..n));
            }
        }
        Topology::Full => {
            for a in 0..n {
                for b in a + 1..n {
                    add(a, b);
                }
            }
        }
    }
    e.into_iter().collect()
}
