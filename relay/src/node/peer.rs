//! Dialing the configured peer relays (`mesh.peers`, `relay --peer`): one
//! task per peer dials it as a relay-role link (both keys proven in TLS,
//! Hello with role Relay), serves the link until it drops, and redials
//! forever with exponential backoff and jitter ([`relay_link::redial`]).
//! While a link with the peer is up, whichever side dialed it, the task
//! waits instead of dialing.

use super::Shared;
use super::link::{Side, serve};
use crate::config::PeerAddr;
use relay_codec::Keypair;
use relay_codec::frame::Role;
use relay_link::quic::{self, TransportTuning};
use relay_link::tcp::{self, TcpLink};
use relay_link::{Backoff, ControlSender, FrameReceiver, Link, Transport, tls};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

/// The first redial waits about this long (half to all of it).
const REDIAL_INITIAL: Duration = Duration::from_millis(200);
/// The longest wait between two dials of one peer.
const REDIAL_MAX: Duration = Duration::from_secs(10);
/// How long one dial (resolve, transport and TLS handshakes, Hello and
/// Welcome) may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// The agent a relay's Hello names.
const AGENT: &str = concat!("celluler-relay/", env!("CARGO_PKG_VERSION"));

/// What every dialer of a relay shares.
pub(super) struct Dialing {
    pub(super) keypair: Keypair,
    /// The relay's own QUIC endpoint: peer links over QUIC leave from the
    /// port the relay listens on.
    pub(super) endpoint: quinn::Endpoint,
    pub(super) tuning: TransportTuning,
}

/// A link to a peer that passed Hello and Welcome.
struct Dialed {
    link: Link,
    remote: SocketAddr,
    control: ControlSender,
    reader: FrameReceiver,
}

/// Dials `peer`, serves its link, and again when it drops, forever (the
/// relay aborts the task at shutdown).
pub(super) async fn run_peer(
    shared: Arc<Shared>,
    dialing: Arc<Dialing>,
    peer: PeerAddr,
    seed: u64,
) {
    let key = peer.addr.key;
    let mut backoff =
        Backoff::new(REDIAL_INITIAL, REDIAL_MAX, seed).expect("the redial bounds are ordered");
    loop {
        // Whoever dialed it, one link with the peer is enough.
        loop {
            let changed = shared.peers_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if !shared.peer_link_up(key) {
                break;
            }
            changed.await;
        }
        if shared.node().is_shutting_down() {
            return;
        }
        let attempt = || dial(&shared, &dialing, &peer);
        let d = relay_link::redial(&mut backoff, attempt, |e: &String, next| {
            warn!(%peer, next_in_ms = next.as_millis() as u64, "dialing peer relay failed: {e}");
        })
        .await;
        let Some(d) = d else { continue };
        serve(
            shared.clone(),
            d.link,
            d.remote,
            peer.transport,
            key,
            Side::Dialed,
            d.control,
            d.reader,
        )
        .await;
    }
}

/// One dial: `None` when a link with the peer came up meanwhile (nothing
/// to dial), the link after its Welcome, or why it failed.
async fn dial(
    shared: &Shared,
    dialing: &Dialing,
    peer: &PeerAddr,
) -> Result<Option<Dialed>, String> {
    if shared.peer_link_up(peer.addr.key) {
        return Ok(None);
    }
    let step = async {
        let target = peer.addr.host_port();
        let remote = tokio::net::lookup_host(&target)
            .await
            .map_err(|e| format!("cannot resolve {target}: {e}"))?
            .next()
            .ok_or_else(|| format!("{target} resolves to no address"))?;
        let key = dialing.keypair.signing_key();
        let link = match peer.transport {
            Transport::Quic => {
                let cfg = quic::client_config(key, peer.addr.key.0, &dialing.tuning)
                    .map_err(|e| e.to_string())?;
                let conn = dialing
                    .endpoint
                    .connect_with(cfg, remote, tls::SERVER_NAME)
                    .map_err(|e| e.to_string())?
                    .await
                    .map_err(|e| format!("QUIC/TLS handshake: {e}"))?;
                Link::quic(conn, shared.limits)
            }
            Transport::Tcp => {
                let cfg = tls::tls_client_config(key, peer.addr.key.0, tls::ALPN)
                    .map_err(|e| e.to_string())?;
                let c = tcp::connect(remote, Arc::new(cfg), &shared.tcp)
                    .await
                    .map_err(|e| format!("TCP/TLS handshake: {e}"))?;
                Link::Tcp(TcpLink::new(c, shared.limits, &shared.tcp))
            }
        };
        let (control, reader, _welcome) =
            relay_link::hello(&link, Role::Relay, false, AGENT, DIAL_TIMEOUT)
                .await
                .map_err(|e| e.to_string())?;
        Ok::<_, String>(Dialed {
            link,
            remote,
            control,
            reader,
        })
    };
    match tokio::time::timeout(DIAL_TIMEOUT, step).await {
        Ok(Ok(d)) => {
            info!(peer = %peer, remote = %d.remote, "dialed peer relay");
            Ok(Some(d))
        }
        Ok(Err(e)) => Err(e),
        Err(_) => Err(format!("no answer within {DIAL_TIMEOUT:?}")),
    }
}

/// How often the relays learned from LinkStates are looked at, besides
/// whenever a relay link comes up or goes down.
const LEARN_EVERY: Duration = Duration::from_secs(1);

/// Dials relays of `trusted_relays` that are not configured peers once
/// their address is learned from their LinkState (flooded through the
/// mesh), while fewer than `max_peers` relay links are up and dialers run:
/// an operator lists a relay's key, the mesh tells where it is. Each is
/// then dialed and redialed as a configured peer (over QUIC, at the
/// address it announced). Ends (with its dialers) when the relay aborts
/// it at shutdown.
pub(super) async fn learn(shared: Arc<Shared>, dialing: Arc<Dialing>) {
    let configured: std::collections::BTreeSet<_> =
        shared.cfg.mesh.peers.iter().map(|p| p.addr.key).collect();
    let wanted: Vec<_> = shared
        .cfg
        .mesh
        .trusted_relays
        .iter()
        .copied()
        .filter(|k| !configured.contains(k) && *k != shared.key)
        .collect();
    if wanted.is_empty() {
        return;
    }
    let mut dialers = tokio::task::JoinSet::new();
    let mut dialing_to = std::collections::BTreeSet::new();
    let mut tick = tokio::time::interval(LEARN_EVERY);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shared.peers_changed.notified() => {}
        }
        let found: Vec<PeerAddr> = {
            let node = shared.node();
            let mesh = node.mesh();
            let room = shared
                .cfg
                .mesh
                .max_peers
                .saturating_sub(configured.len() + dialing_to.len());
            wanted
                .iter()
                .filter(|k| !dialing_to.contains(*k))
                .filter_map(|k| {
                    let at = mesh.addr_of(k)?;
                    format!("{k}@{at}").parse::<PeerAddr>().ok()
                })
                .take(room)
                .collect()
        };
        for peer in found {
            info!(%peer, "dialing a trusted relay whose address the mesh announced");
            dialing_to.insert(peer.addr.key);
            let seed = getrandom::u64().unwrap_or(u64::from(peer.addr.port));
            dialers.spawn(run_peer(shared.clone(), dialing.clone(), peer, seed));
        }
    }
}
