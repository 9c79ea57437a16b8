//! Meshes of real relay processes peered with each other: each relay's
//! key is made in its data directory and its port chosen before any
//! starts, so every relay's `[mesh]` can name the others from the start.

use crate::RelayProcess;
use relay_codec::PublicKey;
use relay_link::Transport;
use std::net::{TcpListener, UdpSocket};

/// A relay of a mesh, not started yet: its key (in its data directory)
/// and a port free on UDP and TCP alike when it was chosen.
pub struct Planned {
    /// Its key.
    pub key: PublicKey,
    /// Its QUIC and TCP port.
    pub port: u16,
    /// Its data directory, holding its key (removed when dropped).
    pub data: tempfile::TempDir,
}

impl Planned {
    /// A new key and a free port.
    pub fn new() -> Self {
        let data = tempfile::tempdir().expect("temp dir");
        let (kp, _) = relay::node::node_key(data.path(), true).expect("a relay key");
        Self {
            key: kp.public(),
            port: free_port(),
            data,
        }
    }

    /// How another relay names it in `mesh.peers` over `transport`.
    pub fn peer(&self, transport: Transport) -> String {
        let prefix = match transport {
            Transport::Quic => "",
            Transport::Tcp => "tcp://",
        };
        format!("{prefix}{}@127.0.0.1:{}", self.key, self.port)
    }

    /// Starts it with `toml` (its `[mesh]` and whatever else) on its port
    /// and data directory.
    pub fn start(&self, toml: &str) -> RelayProcess {
        let listen = format!("127.0.0.1:{}", self.port);
        let relay = RelayProcess::start_at(toml, &listen, Some(self.data.path()), &[]);
        assert_eq!(relay.key, self.key, "the relay runs with its planned key");
        relay
    }
}

impl Default for Planned {
    fn default() -> Self {
        Self::new()
    }
}

/// Ports planned relays are given: below Linux's ephemeral range (32768
/// and up), so a socket bound to port 0 elsewhere (another test's relay or
/// cell) cannot take a planned port between its choice and its relay's
/// start.
const PLANNED_PORTS: std::ops::Range<u16> = 20_000..32_000;

/// A loopback port free on UDP and on TCP when asked, from
/// [`PLANNED_PORTS`]: tried in an order drawn from the process id and a
/// counter, so test processes running at once start apart.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let span = u32::from(PLANNED_PORTS.end - PLANNED_PORTS.start);
    let base = std::process::id().wrapping_mul(7919);
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = PLANNED_PORTS.start + (base.wrapping_add(n.wrapping_mul(37)) % span) as u16;
        let Ok(_udp) = UdpSocket::bind(("127.0.0.1", port)) else {
            continue;
        };
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no port of {PLANNED_PORTS:?} is free on UDP and TCP");
}

/// The `[mesh]` section of relay `i` of `plan` on a graph of `edges`:
/// both ends of an edge list each other as peers (so the two dial each
/// other and keep one link), over `transport`.
pub fn mesh_toml(
    plan: &[Planned],
    edges: &[(usize, usize)],
    i: usize,
    transport: Transport,
) -> String {
    let peers: Vec<String> = edges
        .iter()
        .filter_map(|&(a, b)| match (a == i, b == i) {
            (true, _) => Some(b),
            (_, true) => Some(a),
            _ => None,
        })
        .map(|j| format!("{:?}", plan[j].peer(transport)))
        .collect();
    format!("[mesh]\npeers = [{}]\n", peers.join(", "))
}

/// `n` relays on a graph of `edges`, started, peered over `transport`.
/// Returns the relays with their plans (which hold the data directories).
pub fn start_mesh(
    n: usize,
    edges: &[(usize, usize)],
    transport: Transport,
) -> Vec<(Planned, RelayProcess)> {
    let plan: Vec<Planned> = (0..n).map(|_| Planned::new()).collect();
    let relays: Vec<RelayProcess> = (0..n)
        .map(|i| plan[i].start(&mesh_toml(&plan, edges, i, transport)))
        .collect();
    plan.into_iter().zip(relays).collect()
}

/// How many relay links each of `n` relays has on a graph of `edges`.
pub fn degrees(n: usize, edges: &[(usize, usize)]) -> Vec<usize> {
    (0..n)
        .map(|i| edges.iter().filter(|&&(a, b)| a == i || b == i).count())
        .collect()
}
