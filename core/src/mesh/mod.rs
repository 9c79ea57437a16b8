//! The mesh: what a relay decides about other relays, inside the pure
//! [`Node`](crate::Node) (docs/PROTOCOL.md section 10).
//!
//! - [`membership`]: relay links' liveness (Ping/Pong), the link-state
//!   database and shortest paths; why not SWIM (`foca`) is said there.
//! - [`directory`]: where cells are, kept by the `k` relays of highest
//!   rendezvous score for each cell's key.
//! - [`route_cache`]: destination → home relay, LRU with an expiry.
//! - [`pending`]: lookups on their way and the messages that wait for them.
//! - [`credit`]: credit-based flow control per lane on relay links.
//!
//! **Forwarding.** A message for a cell not attached here goes to the next
//! hop toward its home relay (cache, else a directory lookup: the message
//! waits, nothing is flooded). The TTL is lowered once per relay and the
//! dedup window stops any second forward of a message, so a message
//! crosses each relay at most once: no loop, and no duplicate delivery
//! through a second path. Broadcast and service messages are flooded:
//! delivered to the matching cells here and sent on every relay link but
//! the one they came from, once per relay (the dedup window again).
//!
//! **Bounds per relay** (each a [`MeshConfig`] value): relay links
//! (`max_peers`), link-state origins (`max_relays`), directory entries
//! (`directory_capacity`), cached routes (`route_cache_capacity`),
//! pending lookups and held messages (`max_pending_lookups`,
//! `max_held_per_lookup`, `max_held`), and per relay link and lane at most
//! `lane_credit` messages on their way. None grows with the number of
//! cells in the mesh but the directory, which is about `k × cells /
//! relays` and capped.

pub mod credit;
pub mod directory;
pub mod membership;
pub mod pending;
pub mod route_cache;

use crate::node::{Action, Now};
use crate::reason::{CloseReason, DropReason};
use crate::router::LinkId;
use credit::Credit;
use directory::{Directory, holders};
use membership::{LinkStateDb, LsaVerdict};
use pending::{Held, Pending, PendingLimits};
use relay_codec::frame::CloseCode;
use relay_codec::mesh::MAX_NEIGHBORS;
use relay_codec::{Envelope, Frame, Lane, Location, MeshFrame, MessageId, PublicKey, RouteHeader};
use route_cache::{CacheStats, RouteCache};
use std::collections::{BTreeMap, BTreeSet};

/// What the mesh part of a relay runs with (config/relay.toml's `[mesh]`
/// and `trusted_relays`, `max_peers`). Every bound of the mesh is here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshConfig {
    /// The relay keys whose relay-role links are admitted; empty: relay
    /// peering is off and every relay link is refused (`Unauthorized`).
    pub trusted_relays: BTreeSet<PublicKey>,
    /// Most relay links up at once, 1..=[`MAX_NEIGHBORS`]; one more is
    /// refused (`TooManyLinks`). Relay links count in `max_links` too.
    pub max_peers: usize,
    /// This relay's dialable address, announced in its LinkState (empty:
    /// none).
    pub addr: String,
    /// A Ping on each relay link this often, in ms (at least 1).
    pub ping_interval_ms: u64,
    /// A relay link on which nothing arrived for this long is closed
    /// (`Idle`); more than `ping_interval_ms`.
    pub peer_timeout_ms: u64,
    /// Directory relays per cell (`k`, at least 1).
    pub directory_replicas: usize,
    /// Most directory entries this relay keeps.
    pub directory_capacity: usize,
    /// Most cached routes.
    pub route_cache_capacity: usize,
    /// How long a cached route lives, in ms.
    pub route_ttl_ms: u64,
    /// How long a directory relay is given to answer a Lookup, in ms.
    pub lookup_timeout_ms: u64,
    /// Most lookups pending at once.
    pub max_pending_lookups: usize,
    /// Most messages (and trace reports) held for one lookup.
    pub max_held_per_lookup: usize,
    /// Most held in all.
    pub max_held: usize,
    /// Messages per lane a relay may send on a relay link before credit
    /// comes back (at least 2).
    pub lane_credit: u32,
    /// Most other relays' LinkStates kept.
    pub max_relays: usize,
    /// A relay unreachable this long, in ms, is forgotten.
    pub forget_after_ms: u64,
    /// Hops a routed mesh frame may take (at least 1).
    pub route_hops: u8,
    /// Each local cell's location is registered again this often, in ms,
    /// so a directory relay that lost it (restarted, evicted) learns it
    /// again; 0: only when its directory relays change.
    pub register_refresh_ms: u64,
}

impl MeshConfig {
    /// Peering off (no trusted relay); the reference defaults otherwise.
    pub fn new() -> Self {
        Self {
            trusted_relays: BTreeSet::new(),
            max_peers: 16,
            addr: String::new(),
            ping_interval_ms: 1_000,
            peer_timeout_ms: 3_000,
            directory_replicas: 3,
            directory_capacity: 65_536,
            route_cache_capacity: 65_536,
            route_ttl_ms: 30_000,
            lookup_timeout_ms: 1_000,
            max_pending_lookups: 4_096,
            max_held_per_lookup: 256,
            max_held: 16_384,
            lane_credit: 8_192,
            max_relays: 4_096,
            forget_after_ms: 60_000,
            route_hops: 32,
            register_refresh_ms: 60_000,
        }
    }

    /// Whether a node can run with it.
    ///
    /// # Errors
    ///
    /// The first setting out of its range.
    pub fn validate(&self) -> Result<(), MeshConfigError> {
        let bad = |what: &'static str, why: &'static str| Err(MeshConfigError { what, why });
        if self.max_peers == 0 || self.max_peers > MAX_NEIGHBORS {
            return bad("max_peers", "must be 1 to 1024");
        }
        if self.ping_interval_ms == 0 || self.peer_timeout_ms <= self.ping_interval_ms {
            return bad(
                "mesh.peer_timeout_ms",
                "must be more than mesh.ping_interval_ms, which must be at least 1",
            );
        }
        if self.directory_replicas == 0 {
            return bad("mesh.directory_replicas", "must be at least 1");
        }
        if self.lane_credit < 2 {
            return bad("mesh.lane_credit", "must be at least 2");
        }
        if self.route_hops == 0 {
            return bad("mesh.route_hops", "must be at least 1");
        }
        if self.max_pending_lookups == 0 || self.max_held == 0 || self.max_held_per_lookup == 0 {
            return bad(
                "mesh.max_pending_lookups",
                "the lookup bounds must be at least 1",
            );
        }
        Ok(())
    }
}

impl Default for MeshConfig {
    fn default() -> Self {
        Self::new()
    }
}

/// A [`MeshConfig`] setting out of its range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{what} {why}")]
pub struct MeshConfigError {
    /// The setting.
    pub what: &'static str,
    /// Its rule.
    pub why: &'static str,
}

/// What became of a message [`Mesh::route_cell`] was given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RouteOutcome {
    /// Sent to the next relay.
    Sent,
    /// Held for a lookup.
    Held,
    /// Dropped, for this reason.
    Dropped(DropReason),
    /// The mesh knows no way to it: the caller treats it as unknown.
    NoRoute,
}

/// What the mesh asks the node to do that only the node can: close links
/// (with the node's bookkeeping) and notice drops to senders.
#[derive(Default)]
pub(crate) struct MeshEvents {
    /// Links to close: (link, code, reason, what to count it as).
    pub close: Vec<(LinkId, CloseCode, String, CloseReason)>,
    /// Held messages dropped for an unknown destination: (sender link,
    /// destination, id).
    pub unknown: Vec<(LinkId, PublicKey, MessageId)>,
}

struct Peer<H> {
    key: PublicKey,
    handle: H,
    last_heard_ms: u64,
    next_ping_ms: u64,
    credit: Credit,
}

struct LocalCell<H> {
    handle: H,
    version: u64,
    /// The directory relays it was last registered with.
    holders: Vec<PublicKey>,
}

/// Counters of the mesh, for metrics and the simulation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MeshStats {
    /// Relay links up.
    pub peers: usize,
    /// Other relays' LinkStates held.
    pub relays_known: usize,
    /// Directory entries held.
    pub directory_entries: usize,
    /// Routes cached.
    pub cached_routes: usize,
    /// Route cache hits and misses.
    pub cache: CacheStats,
    /// Lookups pending.
    pub pending_lookups: usize,
    /// Messages and reports held for them.
    pub held: usize,
    /// Lookups sent.
    pub lookups_sent: u64,
    /// Messages forwarded to a relay (unicast and flooded).
    pub forwarded: u64,
    /// Routed mesh frames dropped: out of hops, or no path to their target.
    pub routed_dropped: u64,
    /// LinkStates dropped because `max_relays` were held.
    pub relays_refused: u64,
}

/// The mesh state of one relay; see the [module documentation](self).
pub struct Mesh<H> {
    cfg: MeshConfig,
    me: PublicKey,
    peers: BTreeMap<LinkId, Peer<H>>,
    by_key: BTreeMap<PublicKey, LinkId>,
    lsdb: LinkStateDb,
    directory: Directory,
    cache: RouteCache,
    pending: Pending,
    local: BTreeMap<PublicKey, LocalCell<H>>,
    /// The reachable set local cells were last registered against.
    registered_with: Vec<PublicKey>,
    next_refresh_ms: u64,
    nonce: u64,
    stats: MeshStats,
    pub(crate) events: MeshEvents,
}

impl<H: Clone> Mesh<H> {
    /// The mesh state of relay `me`, with no relay link up.
    pub fn new(me: PublicKey, cfg: MeshConfig) -> Self {
        Self {
            lsdb: LinkStateDb::new(me, cfg.addr.clone(), cfg.max_relays),
            directory: Directory::new(cfg.directory_capacity),
            cache: RouteCache::new(cfg.route_cache_capacity, cfg.route_ttl_ms),
            pending: Pending::new(PendingLimits {
                max_lookups: cfg.max_pending_lookups,
                max_held_per_lookup: cfg.max_held_per_lookup,
                max_held: cfg.max_held,
            }),
            peers: BTreeMap::new(),
            by_key: BTreeMap::new(),
            local: BTreeMap::new(),
            registered_with: vec![me],
            next_refresh_ms: 0,
            nonce: 0,
            stats: MeshStats::default(),
            events: MeshEvents::default(),
            me,
            cfg,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &MeshConfig {
        &self.cfg
    }

    /// Whether relay peering is on (some relay is trusted).
    pub fn enabled(&self) -> bool {
        !self.cfg.trusted_relays.is_empty()
    }

    /// Whether a relay link is up: only then does a message leave for
    /// another relay.
    pub fn active(&self) -> bool {
        !self.peers.is_empty()
    }

    /// The relay links up: (link, relay key), by link id.
    pub fn peers(&self) -> impl Iterator<Item = (LinkId, PublicKey)> + '_ {
        self.peers.iter().map(|(l, p)| (*l, p.key))
    }

    /// Every relay reachable from here, this one included, by key.
    pub fn reachable(&mut self) -> &[PublicKey] {
        self.lsdb.reachable()
    }

    /// Shortest paths: relay → (hops, first hop).
    pub fn routes(&mut self) -> &BTreeMap<PublicKey, (u32, PublicKey)> {
        self.lsdb.paths()
    }

    /// The relays `relay` announced links to, as held here.
    pub fn neighbors_of(&self, relay: &PublicKey) -> Option<&[PublicKey]> {
        self.lsdb.neighbors_of(relay)
    }

    /// Every relay known and the relays it announced links to, this one
    /// first (for `/topology`); at most `max_relays` + 1 entries.
    pub fn topology(&self) -> Vec<(PublicKey, Vec<PublicKey>)> {
        self.lsdb.topology()
    }

    /// The address `relay` announced, if any: where it may be dialed.
    pub fn addr_of(&self, relay: &PublicKey) -> Option<&str> {
        self.lsdb.addr(relay)
    }

    /// Whether `cell` is attached here, as the mesh knows it.
    pub fn is_home_of(&self, cell: &PublicKey) -> bool {
        self.local.contains_key(cell)
    }

    /// Where this relay's directory says `cell` is, if it keeps it.
    pub fn directory_entry(&mut self, cell: &PublicKey) -> Option<Location> {
        self.directory.get(cell)
    }

    /// The cached route to `cell`, if any (maybe expired).
    pub fn cached_route(&self, cell: &PublicKey) -> Option<route_cache::CachedRoute> {
        self.cache.peek(cell).copied()
    }

    fn is_holder(&mut self, cell: &PublicKey) -> bool {
        let me = self.me;
        holders(self.lsdb.reachable(), cell, self.cfg.directory_replicas).contains(&me)
    }

    /// The directory relays of `cell`, as this relay computes them now.
    pub fn holders_of(&mut self, cell: &PublicKey) -> Vec<PublicKey> {
        holders(self.lsdb.reachable(), cell, self.cfg.directory_replicas)
    }

    /// The counters.
    pub fn stats(&self) -> MeshStats {
        MeshStats {
            peers: self.peers.len(),
            relays_known: self.lsdb.len(),
            directory_entries: self.directory.len(),
            cached_routes: self.cache.len(),
            cache: self.cache.stats(),
            pending_lookups: self.pending.len(),
            held: self.pending.held(),
            ..self.stats
        }
    }

    /// Whether a relay-role link of `key` may come up: `Err(reason)` for
    /// an untrusted key.
    pub(crate) fn admit(&self, key: &PublicKey) -> Result<(), String> {
        if !self.enabled() {
            return Err("relay peering is not enabled on this relay; it serves cells only".into());
        }
        if !self.cfg.trusted_relays.contains(key) {
            return Err(format!(
                "relay {key} is not trusted here (it is not in trusted_relays)"
            ));
        }
        Ok(())
    }

    /// Whether one more relay link fits (`max_peers`); a link that would
    /// replace `key`'s own always does.
    pub(crate) fn has_room(&self, key: &PublicKey) -> bool {
        self.peers.len() < self.cfg.max_peers || self.by_key.contains_key(key)
    }

    /// A relay link came up. Returns the older link of the same relay it
    /// replaces, which the node closes. Actions: the whole link-state
    /// database to the new peer, the own new LinkState to the others.
    pub(crate) fn peer_up(
        &mut self,
        now: Now,
        link: LinkId,
        handle: H,
        key: PublicKey,
        out: &mut Vec<Action<H>>,
    ) -> Option<LinkId> {
        let replaced = self.by_key.insert(key, link).filter(|l| *l != link);
        if let Some(old) = replaced {
            self.peers.remove(&old);
            self.cache.link_down(old);
        }
        self.peers.insert(
            link,
            Peer {
                key,
                handle: handle.clone(),
                last_heard_ms: now.mono_ms,
                next_ping_ms: now.mono_ms + self.cfg.ping_interval_ms,
                credit: Credit::new(self.cfg.lane_credit),
            },
        );
        self.lsdb.set_neighbors(self.by_key.keys().copied());
        for f in self.lsdb.all_frames() {
            out.push(Action::Control {
                to: handle.clone(),
                frame: Frame::Mesh(f),
            });
        }
        let own = self.lsdb.own_frame();
        self.flood_control(Some(link), &own, out);
        replaced
    }

    /// A relay link is down (or being closed): routes through it change at
    /// once; the own new LinkState goes to the other peers.
    pub(crate) fn peer_down(&mut self, link: LinkId, out: &mut Vec<Action<H>>) {
        let Some(p) = self.peers.remove(&link) else {
            return;
        };
        if self.by_key.get(&p.key) == Some(&link) {
            self.by_key.remove(&p.key);
        }
        self.cache.link_down(link);
        self.lsdb.set_neighbors(self.by_key.keys().copied());
        let own = self.lsdb.own_frame();
        self.flood_control(None, &own, out);
    }

    /// A cell attached here (or reattached): its location, newer than any
    /// before, goes to its directory relays.
    pub(crate) fn cell_attached(
        &mut self,
        now: Now,
        cell: PublicKey,
        handle: H,
        out: &mut Vec<Action<H>>,
    ) {
        if !self.enabled() {
            return;
        }
        let version = match self.local.get(&cell) {
            Some(c) => now.unix_ms.max(c.version + 1),
            None => now.unix_ms,
        };
        let holders = holders(self.lsdb.reachable(), &cell, self.cfg.directory_replicas);
        let at = Location {
            home: self.me,
            version,
        };
        for h in &holders {
            self.register(now, *h, true, cell, at, out);
        }
        self.local.insert(
            cell,
            LocalCell {
                handle,
                version,
                holders,
            },
        );
    }

    /// A cell left: its directory relays hear of it.
    pub(crate) fn cell_detached(&mut self, now: Now, cell: PublicKey, out: &mut Vec<Action<H>>) {
        let Some(c) = self.local.remove(&cell) else {
            return;
        };
        let at = Location {
            home: self.me,
            version: c.version,
        };
        for h in &c.holders {
            self.register(now, *h, false, cell, at, out);
        }
    }

    /// Registers (or withdraws) `cell` at directory relay `holder`.
    fn register(
        &mut self,
        now: Now,
        holder: PublicKey,
        up: bool,
        cell: PublicKey,
        at: Location,
        out: &mut Vec<Action<H>>,
    ) {
        if holder == self.me {
            if up {
                self.directory.register(cell, at);
            } else {
                self.directory.withdraw(&cell, &at);
            }
            return;
        }
        let frame = MeshFrame::Route {
            header: self.header(holder),
            up,
            cell,
            at,
        };
        self.send_routed(now, frame, out);
    }

    fn header(&self, target: PublicKey) -> RouteHeader {
        RouteHeader {
            origin: self.me,
            target,
            hops: self.cfg.route_hops,
        }
    }

    /// Something arrived on relay link `link`: it is alive.
    pub(crate) fn heard(&mut self, now: Now, link: LinkId) {
        if let Some(p) = self.peers.get_mut(&link) {
            p.last_heard_ms = p.last_heard_ms.max(now.mono_ms);
        }
    }

    /// A batch of `n` messages on `lane` arrived on relay link `link`:
    /// credit to grant back, or `Err(reason)` if the peer overran it.
    pub(crate) fn received_batch(
        &mut self,
        now: Now,
        link: LinkId,
        lane: Lane,
        n: u64,
        out: &mut Vec<Action<H>>,
    ) -> Result<(), String> {
        self.heard(now, link);
        let Some(p) = self.peers.get_mut(&link) else {
            return Ok(());
        };
        match p.credit.received(lane, n) {
            Ok(Some(grant)) => {
                out.push(Action::Control {
                    to: p.handle.clone(),
                    frame: Frame::Mesh(MeshFrame::Credit { lane, grant }),
                });
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(o) => Err(format!(
                "relay sent {} messages on the {} lane past its credit of {}",
                o.taken, o.lane, o.window
            )),
        }
    }

    /// A message for `dest`, not attached here, with its TTL lowered:
    /// sent toward its home, held for a lookup, dropped, or (no relay link
    /// up, or no directory relay to ask) [`RouteOutcome::NoRoute`].
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn route_cell(
        &mut self,
        now: Now,
        from: LinkId,
        dest: PublicKey,
        index: u32,
        id: MessageId,
        env: Envelope,
        out: &mut Vec<Action<H>>,
    ) -> RouteOutcome {
        if self.peers.is_empty() {
            return RouteOutcome::NoRoute;
        }
        if let Some(home) = self.cached_home(now, &dest) {
            return self.send_data(now, dest, home, index, id, env, 0, out);
        }
        let held = Held::Message {
            env,
            id,
            from,
            since_ms: now.mono_ms,
        };
        self.lookup(now, dest, held, out)
    }

    /// The cached home of `cell`, if it is reachable and not this relay.
    fn cached_home(&mut self, now: Now, cell: &PublicKey) -> Option<PublicKey> {
        let home = self.cache.get(cell, now.mono_ms)?.at.home;
        if home != self.me && self.lsdb.is_reachable(&home) {
            return Some(home);
        }
        let at = Location {
            home,
            version: u64::MAX,
        };
        self.cache.withdraw(cell, &at);
        None
    }

    /// Holds `item` until `cell`'s home is known, starting a lookup if
    /// none is pending (answered here at once if this relay is a directory
    /// relay of `cell` and knows).
    fn lookup(
        &mut self,
        now: Now,
        cell: PublicKey,
        item: Held,
        out: &mut Vec<Action<H>>,
    ) -> RouteOutcome {
        if let Some(request) = self.pending.request_for(&cell) {
            return match self.pending.hold(request, item) {
                Ok(()) => RouteOutcome::Held,
                Err(_) => RouteOutcome::Dropped(DropReason::UnknownDestination),
            };
        }
        let hs = holders(self.lsdb.reachable(), &cell, self.cfg.directory_replicas);
        if hs.contains(&self.me)
            && let Some(at) = self.directory.get(&cell)
            && at.home != self.me
            && self.lsdb.is_reachable(&at.home)
        {
            self.cache.insert(cell, at, now.mono_ms);
            return self.release(now, at.home, item, out);
        }
        let ask: Vec<PublicKey> = hs.into_iter().filter(|h| *h != self.me).collect();
        if ask.is_empty() {
            return RouteOutcome::NoRoute;
        }
        let first = ask[0];
        match self
            .pending
            .start(cell, ask, now.mono_ms + self.cfg.lookup_timeout_ms, item)
        {
            Ok(request) => {
                self.send_lookup(now, first, request, cell, out);
                RouteOutcome::Held
            }
            Err(_) => RouteOutcome::Dropped(DropReason::UnknownDestination),
        }
    }

    fn send_lookup(
        &mut self,
        now: Now,
        to: PublicKey,
        request: u32,
        cell: PublicKey,
        out: &mut Vec<Action<H>>,
    ) {
        self.stats.lookups_sent += 1;
        let frame = MeshFrame::Lookup {
            header: self.header(to),
            request,
            cell,
        };
        self.send_routed(now, frame, out);
    }

    /// Sends a held item on toward `home`, now known.
    fn release(
        &mut self,
        now: Now,
        home: PublicKey,
        item: Held,
        out: &mut Vec<Action<H>>,
    ) -> RouteOutcome {
        match item {
            Held::Message {
                env, id, since_ms, ..
            } => {
                let Some(dest) = env.dest_cell() else {
                    return RouteOutcome::Dropped(DropReason::UnknownDestination);
                };
                let waited_us = now.mono_ms.saturating_sub(since_ms).saturating_mul(1000);
                self.send_data(now, dest, home, 0, id, env, waited_us, out)
            }
            Held::Trace(mut frame) => {
                if let Some(h) = frame.header_mut() {
                    h.target = home;
                }
                self.send_routed(now, *frame, out);
                RouteOutcome::Sent
            }
        }
    }

    /// Sends a message for `dest` to the next hop toward `home`: a hint
    /// first if that link has not had one for `dest`, and a trace report
    /// if the message asks for one.
    #[allow(clippy::too_many_arguments)]
    fn send_data(
        &mut self,
        now: Now,
        dest: PublicKey,
        home: PublicKey,
        index: u32,
        id: MessageId,
        env: Envelope,
        waited_us: u64,
        out: &mut Vec<Action<H>>,
    ) -> RouteOutcome {
        let Some((_, first)) = self.lsdb.path(&home) else {
            return RouteOutcome::NoRoute;
        };
        let Some(&link) = self.by_key.get(&first) else {
            return RouteOutcome::NoRoute;
        };
        let peer = self.peers.get_mut(&link).expect("by_key and peers agree");
        if !peer.credit.take(env.lane()) {
            return RouteOutcome::Dropped(DropReason::SlowReceiver);
        }
        let handle = peer.handle.clone();
        if let Some(r) = self.cache.get(&dest, now.mono_ms)
            && r.hinted != Some(link)
            && r.at.home == home
        {
            r.hinted = Some(link);
            let at = r.at;
            out.push(Action::Control {
                to: handle.clone(),
                frame: Frame::Mesh(MeshFrame::Route {
                    header: RouteHeader {
                        origin: self.me,
                        target: first,
                        hops: 0,
                    },
                    up: true,
                    cell: dest,
                    at,
                }),
            });
        }
        if env.trace() {
            self.trace(now, &env, id, first, waited_us, out);
        }
        self.stats.forwarded += 1;
        out.push(Action::Deliver {
            to: handle,
            index,
            id,
            env,
        });
        RouteOutcome::Sent
    }

    /// A broadcast or service message, its TTL lowered, goes on to every
    /// relay link but `from`; returns how many links had no credit for it
    /// (dropped there).
    pub(crate) fn flood(
        &mut self,
        from: LinkId,
        index: u32,
        id: MessageId,
        env: &Envelope,
        out: &mut Vec<Action<H>>,
    ) -> u64 {
        let mut starved = 0;
        for (link, p) in self.peers.iter_mut() {
            if *link == from {
                continue;
            }
            if !p.credit.take(env.lane()) {
                starved += 1;
                continue;
            }
            self.stats.forwarded += 1;
            out.push(Action::Deliver {
                to: p.handle.clone(),
                index,
                id,
                env: env.clone(),
            });
        }
        starved
    }

    /// Reports one hop of a traced message (`env`, as it leaves) to its
    /// source cell: directly if the source is attached here, else routed
    /// to its home (looked up if need be).
    pub(crate) fn trace(
        &mut self,
        now: Now,
        env: &Envelope,
        id: MessageId,
        next: PublicKey,
        in_relay_us: u64,
        out: &mut Vec<Action<H>>,
    ) {
        let source = env.source();
        let mut frame = self.trace_frame(env, id, next, in_relay_us);
        if let Some(c) = self.local.get(&source) {
            out.push(Action::Control {
                to: c.handle.clone(),
                frame: Frame::Mesh(frame),
            });
            return;
        }
        if self.peers.is_empty() {
            return;
        }
        if let Some(home) = self.cached_home(now, &source) {
            if let Some(h) = frame.header_mut() {
                h.target = home;
            }
            self.send_routed(now, frame, out);
            return;
        }
        let _ = self.lookup(now, source, Held::Trace(Box::new(frame)), out);
    }

    /// The hop report of a traced message (`env`, as it leaves) from this
    /// relay, addressed to this relay (retargeted when routed on).
    pub(crate) fn trace_frame(
        &self,
        env: &Envelope,
        id: MessageId,
        next: PublicKey,
        in_relay_us: u64,
    ) -> MeshFrame {
        MeshFrame::Trace {
            header: self.header(self.me),
            id,
            source: env.source(),
            ttl: env.ttl(),
            in_relay_us: in_relay_us.min(u64::from(u32::MAX)) as u32,
            next,
        }
    }

    /// Sends a routed frame this relay originates or passes on to the next
    /// hop toward its target (handled here if the target is this relay).
    fn send_routed(&mut self, now: Now, frame: MeshFrame, out: &mut Vec<Action<H>>) {
        let Some(target) = frame.header().map(|h| h.target) else {
            return;
        };
        if target == self.me {
            self.routed_here(now, None, frame, out);
            return;
        }
        let link = self
            .lsdb
            .path(&target)
            .and_then(|(_, first)| self.by_key.get(&first).copied());
        match link.and_then(|l| self.peers.get(&l)) {
            Some(p) => out.push(Action::Control {
                to: p.handle.clone(),
                frame: Frame::Mesh(frame),
            }),
            None => self.stats.routed_dropped += 1,
        }
    }

    /// Sends `frame` on every relay link but `except`.
    fn flood_control(&self, except: Option<LinkId>, frame: &MeshFrame, out: &mut Vec<Action<H>>) {
        for (link, p) in &self.peers {
            if Some(*link) != except {
                out.push(Action::Control {
                    to: p.handle.clone(),
                    frame: Frame::Mesh(frame.clone()),
                });
            }
        }
    }

    /// A mesh frame arrived on relay link `link`.
    pub(crate) fn control(
        &mut self,
        now: Now,
        link: LinkId,
        frame: MeshFrame,
        out: &mut Vec<Action<H>>,
    ) {
        self.heard(now, link);
        let Some(peer) = self.peers.get_mut(&link) else {
            return;
        };
        match frame {
            MeshFrame::Ping { nonce } => out.push(Action::Control {
                to: peer.handle.clone(),
                frame: Frame::Mesh(MeshFrame::Pong { nonce }),
            }),
            MeshFrame::Pong { .. } => {}
            MeshFrame::Credit { lane, grant } => peer.credit.granted(lane, grant),
            MeshFrame::LinkState {
                origin,
                seq,
                addr,
                neighbors,
            } => {
                let copy = MeshFrame::LinkState {
                    origin,
                    seq,
                    addr: addr.clone(),
                    neighbors: neighbors.clone(),
                };
                match self.lsdb.receive(origin, seq, addr, neighbors) {
                    LsaVerdict::Newer => self.flood_control(Some(link), &copy, out),
                    LsaVerdict::OwnOutdated => {
                        let own = self.lsdb.own_frame();
                        self.flood_control(None, &own, out);
                    }
                    LsaVerdict::Stale => {}
                    LsaVerdict::Older => {
                        if let (Some(f), Some(p)) =
                            (self.lsdb.frame_of(&origin), self.peers.get(&link))
                        {
                            out.push(Action::Control {
                                to: p.handle.clone(),
                                frame: Frame::Mesh(f),
                            });
                        }
                    }
                    LsaVerdict::Full => self.stats.relays_refused += 1,
                }
            }
            mut routed => {
                let Some(h) = routed.header_mut() else {
                    return;
                };
                if h.target == self.me {
                    self.routed_here(now, Some(link), routed, out);
                    return;
                }
                if h.hops == 0 {
                    self.stats.routed_dropped += 1;
                    return;
                }
                h.hops -= 1;
                self.send_routed(now, routed, out);
            }
        }
    }

    /// A routed frame for this relay (`via`: the relay link it came on;
    /// `None` when this relay sent it to itself).
    fn routed_here(
        &mut self,
        now: Now,
        via: Option<LinkId>,
        frame: MeshFrame,
        out: &mut Vec<Action<H>>,
    ) {
        match frame {
            MeshFrame::Route {
                header,
                up,
                cell,
                at,
            } => {
                // A hint comes from the neighbour itself with no hop left.
                let hint = header.hops == 0
                    && via.is_some_and(|l| {
                        self.peers.get(&l).is_some_and(|p| p.key == header.origin)
                    });
                if hint {
                    if up && at.home != self.me {
                        self.cache.insert(cell, at, now.mono_ms);
                    }
                    return;
                }
                if up {
                    self.directory.register(cell, at);
                } else {
                    self.directory.withdraw(&cell, &at);
                    self.cache.withdraw(&cell, &at);
                }
            }
            MeshFrame::Lookup {
                header,
                request,
                cell,
            } => {
                let holder = self.is_holder(&cell);
                let at = match self.local.get(&cell) {
                    Some(c) => Some(Location {
                        home: self.me,
                        version: c.version,
                    }),
                    // Only a directory relay of the cell answers from its
                    // directory: an entry left from when this relay was
                    // one may be stale (the cell moved and registered with
                    // the relays of today).
                    None if holder => self
                        .directory
                        .get(&cell)
                        .filter(|at| at.home != self.me && self.lsdb.is_reachable(&at.home)),
                    None => None,
                };
                let reply = MeshFrame::LookupReply {
                    header: self.header(header.origin),
                    request,
                    cell,
                    at,
                };
                self.send_routed(now, reply, out);
            }
            MeshFrame::LookupReply {
                header,
                request,
                cell,
                at,
            } => {
                // Only a relay asked may answer, about the cell asked.
                if self.pending.asked(request, &header.origin) != Some(cell) {
                    return;
                }
                match at.filter(|a| a.home != self.me && self.lsdb.is_reachable(&a.home)) {
                    Some(at) => {
                        self.cache.insert(cell, at, now.mono_ms);
                        let l = self.pending.finish(request).expect("asked() found it");
                        for item in l.held {
                            self.released(now, at.home, item, out);
                        }
                    }
                    // Unless the relay asked now says so, wait for it.
                    None if self.pending.asking(request).map(|(r, _)| r) == Some(header.origin) => {
                        self.ask_next(now, request, out)
                    }
                    None => {}
                }
            }
            MeshFrame::Trace { source, .. } => {
                if let Some(c) = self.local.get(&source) {
                    out.push(Action::Control {
                        to: c.handle.clone(),
                        frame: Frame::Mesh(frame),
                    });
                }
            }
            _ => {}
        }
    }

    /// Releases a held item and accounts for it if it cannot go.
    fn released(&mut self, now: Now, home: PublicKey, item: Held, out: &mut Vec<Action<H>>) {
        let unknown = match &item {
            Held::Message { env, id, from, .. } => {
                Some((*from, env.dest_cell().unwrap_or(PublicKey([0; 32])), *id))
            }
            Held::Trace(_) => None,
        };
        match self.release(now, home, item, out) {
            RouteOutcome::Sent | RouteOutcome::Held => {}
            RouteOutcome::Dropped(reason) => out.push(Action::Drop { reason, count: 1 }),
            RouteOutcome::NoRoute => {
                if let Some(u) = unknown {
                    self.events.unknown.push(u);
                }
            }
        }
    }

    /// The directory relay asked for `request` did not know (or did not
    /// answer): the next one is asked, or the lookup fails and what it
    /// held is dropped as for an unknown destination.
    fn ask_next(&mut self, now: Now, request: u32, out: &mut Vec<Action<H>>) {
        let deadline = now.mono_ms + self.cfg.lookup_timeout_ms;
        if let Some(next) = self.pending.next(request, deadline) {
            let (_, cell) = self.pending.asking(request).expect("just moved on");
            self.send_lookup(now, next, request, cell, out);
            return;
        }
        let Some(l) = self.pending.finish(request) else {
            return;
        };
        for item in l.held {
            if let Held::Message { from, id, .. } = item {
                self.events.unknown.push((from, l.cell, id));
            }
        }
    }

    /// The time has come: relay links silent past the peer timeout are
    /// closed (through [`MeshEvents`]), Pings go out, lookups past their
    /// deadline move on, routes to relays no longer reachable go, and
    /// local cells are registered again where their directory relays
    /// changed (or every `register_refresh_ms`).
    pub(crate) fn tick(&mut self, now: Now, out: &mut Vec<Action<H>>) {
        let idle: Vec<LinkId> = self
            .peers
            .iter()
            .filter(|(_, p)| {
                now.mono_ms.saturating_sub(p.last_heard_ms) >= self.cfg.peer_timeout_ms
            })
            .map(|(l, _)| *l)
            .collect();
        for link in idle {
            let key = self.peers[&link].key;
            self.peer_down(link, out);
            self.events.close.push((
                link,
                CloseCode::Idle,
                format!(
                    "relay {key} sent nothing for {} ms (mesh.peer_timeout_ms)",
                    self.cfg.peer_timeout_ms
                ),
                CloseReason::Idle,
            ));
        }
        for p in self.peers.values_mut() {
            if now.mono_ms >= p.next_ping_ms {
                self.nonce += 1;
                p.next_ping_ms = now.mono_ms + self.cfg.ping_interval_ms;
                out.push(Action::Control {
                    to: p.handle.clone(),
                    frame: Frame::Mesh(MeshFrame::Ping { nonce: self.nonce }),
                });
            }
        }
        for request in self.pending.due(now.mono_ms) {
            self.ask_next(now, request, out);
        }
        self.maintain(now, out);
    }

    /// Keeps what depends on who is reachable in step with it: routes to
    /// relays no longer reachable go, and when the reachable set changed
    /// every local cell is registered with its new directory relays; with
    /// all of them when a relay appeared or a refresh is due (local cells
    /// × `k` routed frames, bounded by `max_links`, not by the size of the
    /// mesh).
    fn maintain(&mut self, now: Now, out: &mut Vec<Action<H>>) {
        self.lsdb.compute();
        self.lsdb
            .forget_unreachable(now.mono_ms, self.cfg.forget_after_ms);
        let refresh = self.cfg.register_refresh_ms > 0 && now.mono_ms >= self.next_refresh_ms;
        if refresh {
            self.next_refresh_ms = now.mono_ms + self.cfg.register_refresh_ms;
        }
        let changed = self.lsdb.reachable() != self.registered_with.as_slice();
        if !changed && !refresh {
            return;
        }
        let reachable = self.lsdb.reachable().to_vec();
        let all = refresh
            || reachable
                .iter()
                .any(|r| self.registered_with.binary_search(r).is_err());
        let set: BTreeSet<PublicKey> = reachable.iter().copied().collect();
        self.cache.retain_homes(|h| set.contains(h));
        // A lookup asking a relay that is no longer a directory relay of
        // its cell (gone, or another one took its place) asks the new ones.
        for request in self.pending.requests() {
            let Some((asking, cell)) = self.pending.asking(request) else {
                continue;
            };
            let ask: Vec<PublicKey> = holders(&reachable, &cell, self.cfg.directory_replicas)
                .into_iter()
                .filter(|h| *h != self.me)
                .collect();
            if ask.contains(&asking) {
                continue;
            }
            let first = ask.first().copied();
            let deadline = now.mono_ms + self.cfg.lookup_timeout_ms;
            match first {
                Some(first) if self.pending.replan(request, ask, deadline) => {
                    self.send_lookup(now, first, request, cell, out);
                }
                _ => self.ask_next(now, request, out),
            }
        }
        let cells: Vec<PublicKey> = self.local.keys().copied().collect();
        for cell in cells {
            let hs = holders(&reachable, &cell, self.cfg.directory_replicas);
            let at = Location {
                home: self.me,
                version: self.local[&cell].version,
            };
            // A new directory relay hears of the cell. When a relay became
            // reachable (it may have restarted and forgotten, or a
            // partition healed), or a refresh is due, every one does: a
            // registration lost with a link is mended by the refresh.
            let c = &self.local[&cell];
            let to: Vec<PublicKey> = hs
                .iter()
                .copied()
                .filter(|h| all || !c.holders.contains(h))
                .collect();
            for h in to {
                self.register(now, h, true, cell, at, out);
            }
            if let Some(c) = self.local.get_mut(&cell) {
                c.holders = hs;
            }
        }
        self.registered_with = reachable;
    }

    /// When [`tick`](Self::tick) next has something to do.
    pub(crate) fn next_due(&self) -> Option<u64> {
        let pings = self
            .peers
            .values()
            .map(|p| {
                p.next_ping_ms
                    .min(p.last_heard_ms + self.cfg.peer_timeout_ms)
            })
            .min();
        let refresh = (!self.local.is_empty() && self.cfg.register_refresh_ms > 0)
            .then_some(self.next_refresh_ms);
        [pings, self.pending.next_deadline(), refresh]
            .into_iter()
            .flatten()
            .min()
    }
}
