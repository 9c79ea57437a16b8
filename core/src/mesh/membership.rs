//! Which relays are in the mesh and how to reach them: the link-state
//! database (each relay's links, flooded, newest `seq` wins), shortest
//! paths over it, and the liveness of this relay's own relay links
//! (Ping/Pong on the control stream). docs/PROTOCOL.md 10.1 to 10.3.
//!
//! **Why not SWIM (`foca`).** foca was evaluated first: it is sans-IO (no
//! socket, no clock: timers come back as "call me after this `Duration`",
//! randomness from an `RngCore` passed in), so purity was not the problem.
//! What does not fit is SWIM's model of the network: every member probes
//! randomly chosen members *directly* (`send_to(member)`), and probes
//! through k others when that fails. A relay mesh is a sparse graph of
//! links (a line, a ring, a square), not any-to-any datagrams: relay A of a
//! line A–B–C has no way to send to C but through B, so SWIM's packets
//! would need the routing they are meant to feed, and a lost path would
//! read as a dead member. And SWIM answers "who is alive", not "who links
//! to whom", which forwarding needs: a link-state database would be needed
//! beside it anyway. Its wire format would also be foca's own (postcard or
//! a custom codec), outside docs/PROTOCOL.md. So: liveness is measured per
//! link, where it is true (a Ping every interval on the control stream,
//! never behind data; a link silent for the peer timeout is closed), and
//! membership is the set of relays reachable in the link-state graph.
//!
//! **Bounds.** At most `max_relays` origins are kept (a LinkState from a
//! further origin is dropped and counted); each lists at most
//! [`MAX_NEIGHBORS`] keys. Shortest paths are a breadth-first search,
//! O(relays + links), redone only when the database changed.

use relay_codec::mesh::MAX_NEIGHBORS;
use relay_codec::{MeshFrame, PublicKey};
use std::collections::BTreeMap;

/// One relay's links as last heard.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Lsa {
    seq: u64,
    addr: String,
    /// Sorted, at most [`MAX_NEIGHBORS`].
    neighbors: Vec<PublicKey>,
}

/// What [`LinkStateDb::receive`] made of a LinkState.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LsaVerdict {
    /// Newer than what was held: kept; pass it on to the other links.
    Newer,
    /// The one held: dropped.
    Stale,
    /// Older than the one held: dropped, and the sender must get the one
    /// held ([`LinkStateDb::frame_of`]), or it would keep the old one (a
    /// relay that restarted learns its own old `seq` so, and jumps past it).
    Older,
    /// This relay's own, from before a restart: its `seq` jumped past it;
    /// send the own LinkState again.
    OwnOutdated,
    /// A new origin while `max_relays` are held: dropped.
    Full,
}

/// The link-state database and the shortest paths from this relay.
pub struct LinkStateDb {
    me: PublicKey,
    own_seq: u64,
    own_addr: String,
    own_neighbors: Vec<PublicKey>,
    others: BTreeMap<PublicKey, Lsa>,
    max_relays: usize,
    dirty: bool,
    /// Relay → (hops from here, first hop), for every reachable relay but
    /// this one.
    paths: BTreeMap<PublicKey, (u32, PublicKey)>,
    /// Every reachable relay, this one included, sorted.
    reachable: Vec<PublicKey>,
    /// Since when each held relay that is not reachable has not been.
    unreachable_since: BTreeMap<PublicKey, u64>,
}

impl LinkStateDb {
    /// An empty database for relay `me`, dialable at `addr`, holding at
    /// most `max_relays` other relays' LinkStates.
    pub fn new(me: PublicKey, addr: String, max_relays: usize) -> Self {
        Self {
            me,
            own_seq: 1,
            own_addr: addr,
            own_neighbors: Vec::new(),
            others: BTreeMap::new(),
            max_relays,
            dirty: true,
            paths: BTreeMap::new(),
            reachable: vec![me],
            unreachable_since: BTreeMap::new(),
        }
    }

    /// This relay's links changed (a relay link up or down): a new own
    /// LinkState (its `seq` one higher).
    pub fn set_neighbors(&mut self, neighbors: impl IntoIterator<Item = PublicKey>) {
        let mut n: Vec<PublicKey> = neighbors.into_iter().collect();
        n.sort();
        n.dedup();
        n.truncate(MAX_NEIGHBORS);
        self.own_neighbors = n;
        self.own_seq += 1;
        self.dirty = true;
    }

    /// This relay's own LinkState frame.
    pub fn own_frame(&self) -> MeshFrame {
        MeshFrame::LinkState {
            origin: self.me,
            seq: self.own_seq,
            addr: self.own_addr.clone(),
            neighbors: self.own_neighbors.clone(),
        }
    }

    /// The LinkState held for `origin` (this relay's own included).
    pub fn frame_of(&self, origin: &PublicKey) -> Option<MeshFrame> {
        if *origin == self.me {
            return Some(self.own_frame());
        }
        self.others.get(origin).map(|l| MeshFrame::LinkState {
            origin: *origin,
            seq: l.seq,
            addr: l.addr.clone(),
            neighbors: l.neighbors.clone(),
        })
    }

    /// Every LinkState held (the own one first), for a new neighbour.
    pub fn all_frames(&self) -> Vec<MeshFrame> {
        let mut v = vec![self.own_frame()];
        v.extend(self.others.iter().map(|(k, l)| MeshFrame::LinkState {
            origin: *k,
            seq: l.seq,
            addr: l.addr.clone(),
            neighbors: l.neighbors.clone(),
        }));
        v
    }

    /// A LinkState arrived.
    pub fn receive(
        &mut self,
        origin: PublicKey,
        seq: u64,
        addr: String,
        mut neighbors: Vec<PublicKey>,
    ) -> LsaVerdict {
        neighbors.sort();
        neighbors.dedup();
        neighbors.truncate(MAX_NEIGHBORS);
        if origin == self.me {
            // Its own, come back: the same is nothing; a higher `seq`, or
            // the same `seq` with other links (a restart counted up to it
            // again), is from a past life: jump past it.
            let same =
                seq == self.own_seq && neighbors == self.own_neighbors && addr == self.own_addr;
            if seq > self.own_seq || (seq == self.own_seq && !same) {
                self.own_seq = seq + 1;
                return LsaVerdict::OwnOutdated;
            }
            return if same {
                LsaVerdict::Stale
            } else {
                LsaVerdict::Older
            };
        }
        // Newer is a higher `seq`; for the same `seq` with other contents
        // (a relay that restarted and counted up to it again), the larger
        // contents win, so every relay keeps the same one and it reaches
        // the origin, which then jumps past it.
        match self.others.get(&origin) {
            Some(l) => match (l.seq, &l.neighbors, &l.addr).cmp(&(seq, &neighbors, &addr)) {
                std::cmp::Ordering::Equal => return LsaVerdict::Stale,
                std::cmp::Ordering::Greater => return LsaVerdict::Older,
                std::cmp::Ordering::Less => {}
            },
            None if self.others.len() >= self.max_relays => return LsaVerdict::Full,
            None => {}
        }
        self.others.insert(
            origin,
            Lsa {
                seq,
                addr,
                neighbors,
            },
        );
        self.dirty = true;
        LsaVerdict::Newer
    }

    /// Forgets the LinkStates of relays that have been unreachable since
    /// before `now_ms - after_ms` (a relay that comes back floods a new
    /// one, and a new link brings the neighbour's whole database), and
    /// notes since when the others are. Returns how many were forgotten.
    /// Not at once: a relay cut off for a moment while LinkStates cross
    /// must not lose the far side's.
    pub fn forget_unreachable(&mut self, now_ms: u64, after_ms: u64) -> usize {
        self.compute();
        let paths = &self.paths;
        let since = &mut self.unreachable_since;
        since.retain(|k, _| !paths.contains_key(k));
        for k in self.others.keys() {
            if !paths.contains_key(k) {
                since.entry(*k).or_insert(now_ms);
            }
        }
        let gone: Vec<PublicKey> = since
            .iter()
            .filter(|(_, t)| now_ms.saturating_sub(**t) >= after_ms)
            .map(|(k, _)| *k)
            .collect();
        for k in &gone {
            self.others.remove(k);
            self.unreachable_since.remove(k);
        }
        gone.len()
    }

    /// LinkStates held, this relay's own not counted.
    pub fn len(&self) -> usize {
        self.others.len()
    }

    /// Whether no other relay's LinkState is held.
    pub fn is_empty(&self) -> bool {
        self.others.is_empty()
    }

    /// The address relay `key` announced, if known and not empty.
    pub fn addr(&self, key: &PublicKey) -> Option<&str> {
        self.others
            .get(key)
            .map(|l| l.addr.as_str())
            .filter(|a| !a.is_empty())
    }

    /// The relays `key` announced links to (its LinkState), if known.
    pub fn neighbors_of(&self, key: &PublicKey) -> Option<&[PublicKey]> {
        if *key == self.me {
            return Some(&self.own_neighbors);
        }
        self.others.get(key).map(|l| l.neighbors.as_slice())
    }

    /// Every relay held and the relays it lists, this one first: the
    /// graph for a topology view.
    pub fn topology(&self) -> Vec<(PublicKey, Vec<PublicKey>)> {
        let mut v = vec![(self.me, self.own_neighbors.clone())];
        v.extend(self.others.iter().map(|(k, l)| (*k, l.neighbors.clone())));
        v
    }

    fn lists(&self, a: &PublicKey, b: &PublicKey) -> bool {
        self.neighbors_of(a)
            .is_some_and(|n| n.binary_search(b).is_ok())
    }

    /// Recomputes the shortest paths if the database changed since;
    /// returns whether it did.
    pub fn compute(&mut self) -> bool {
        if !self.dirty {
            return false;
        }
        self.dirty = false;
        let mut paths: BTreeMap<PublicKey, (u32, PublicKey)> = BTreeMap::new();
        // Breadth first; within one distance, a relay's first hop is the
        // smallest of its predecessors' first hops, so it does not depend
        // on the order edges were seen in.
        let mut layer: Vec<PublicKey> = Vec::new();
        for n in &self.own_neighbors {
            if self.lists(n, &self.me) {
                paths.insert(*n, (1, *n));
                layer.push(*n);
            }
        }
        let mut dist = 1;
        while !layer.is_empty() {
            let mut next: BTreeMap<PublicKey, PublicKey> = BTreeMap::new();
            for u in &layer {
                let first = paths[u].1;
                for v in self.neighbors_of(u).unwrap_or(&[]) {
                    if *v == self.me || paths.contains_key(v) || !self.lists(v, u) {
                        continue;
                    }
                    next.entry(*v)
                        .and_modify(|f| *f = (*f).min(first))
                        .or_insert(first);
                }
            }
            dist += 1;
            layer.clear();
            for (v, first) in next {
                paths.insert(v, (dist, first));
                layer.push(v);
            }
        }
        let mut reachable: Vec<PublicKey> = paths.keys().copied().collect();
        reachable.push(self.me);
        reachable.sort();
        self.paths = paths;
        self.reachable = reachable;
        true
    }

    /// The first hop toward `target` and its distance in hops.
    pub fn path(&mut self, target: &PublicKey) -> Option<(u32, PublicKey)> {
        self.compute();
        self.paths.get(target).copied()
    }

    /// Every relay reachable from here, this one included, sorted by key.
    pub fn reachable(&mut self) -> &[PublicKey] {
        self.compute();
        &self.reachable
    }

    /// Whether `key` is this relay or reachable from it.
    pub fn is_reachable(&mut self, key: &PublicKey) -> bool {
        *key == self.me || self.path(key).is_some()
    }

    /// The current shortest paths (relay → (hops, first hop)).
    pub fn paths(&mut self) -> &BTreeMap<PublicKey, (u32, PublicKey)> {
        self.compute();
        &self.paths
    }

    /// This relay's own `seq`.
    pub fn own_seq(&self) -> u64 {
        self.own_seq
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn k(i: u8) -> PublicKey {
        PublicKey([i; 32])
    }

    /// A database at relay `me` that holds the LinkStates of a graph.
    fn db(me: u8, edges: &[(u8, u8)]) -> LinkStateDb {
        let mut adj: BTreeMap<u8, BTreeSet<u8>> = BTreeMap::new();
        for &(a, b) in edges {
            adj.entry(a).or_default().insert(b);
            adj.entry(b).or_default().insert(a);
        }
        let mut d = LinkStateDb::new(k(me), String::new(), 100);
        for (n, ns) in &adj {
            let ns: Vec<PublicKey> = ns.iter().map(|&i| k(i)).collect();
            if *n == me {
                d.set_neighbors(ns);
            } else {
                assert_eq!(d.receive(k(*n), 1, String::new(), ns), LsaVerdict::Newer);
            }
        }
        d
    }

    #[test]
    fn shortest_paths_on_a_line_and_a_ring() {
        let mut line = db(1, &[(1, 2), (2, 3), (3, 4)]);
        assert_eq!(line.path(&k(4)), Some((3, k(2))));
        assert_eq!(line.reachable(), &[k(1), k(2), k(3), k(4)]);
        // A ring of 6 from 1: 4 is 3 hops either way; the smaller first
        // hop wins the tie.
        let mut ring = db(1, &[(1, 2), (2, 3), (3, 4), (4, 5), (5, 6), (6, 1)]);
        assert_eq!(ring.path(&k(4)), Some((3, k(2))));
        assert_eq!(ring.path(&k(5)), Some((2, k(6))));
    }

    #[test]
    fn an_edge_counts_only_when_both_ends_list_it() {
        let mut d = db(1, &[(1, 2), (2, 3)]);
        assert!(d.is_reachable(&k(3)));
        // 3 restarts and no longer lists 2 (but 2's old LinkState still
        // lists 3): 3 is unreachable.
        assert_eq!(d.receive(k(3), 2, String::new(), vec![]), LsaVerdict::Newer);
        assert!(!d.is_reachable(&k(3)));
        assert_eq!(
            d.forget_unreachable(1000, 500),
            0,
            "noted, not yet forgotten"
        );
        assert_eq!(d.forget_unreachable(1499, 500), 0);
        assert_eq!(d.forget_unreachable(1500, 500), 1);
        assert_eq!(d.len(), 1);
    }

    #[test]
    fn newer_wins_stale_is_dropped_and_the_own_seq_jumps_past_a_restart() {
        let mut d = db(1, &[(1, 2)]);
        assert_eq!(
            d.receive(k(2), 1, String::new(), vec![k(1)]),
            LsaVerdict::Stale
        );
        assert_eq!(
            d.receive(k(2), 5, "h:1".into(), vec![k(1)]),
            LsaVerdict::Newer
        );
        assert_eq!(d.receive(k(2), 4, String::new(), vec![]), LsaVerdict::Older);
        assert!(matches!(
            d.frame_of(&k(2)),
            Some(MeshFrame::LinkState { seq: 5, .. })
        ));
        assert_eq!(d.addr(&k(2)), Some("h:1"));
        let own = d.own_seq();
        assert_eq!(
            d.receive(k(1), own - 1, String::new(), vec![]),
            LsaVerdict::Older
        );
        assert_eq!(
            d.receive(k(1), own + 10, String::new(), vec![]),
            LsaVerdict::OwnOutdated
        );
        assert_eq!(d.own_seq(), own + 11);
        match d.own_frame() {
            MeshFrame::LinkState { seq, neighbors, .. } => {
                assert_eq!((seq, neighbors), (own + 11, vec![k(2)]))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_same_seq_with_other_links_is_settled_the_same_way_everywhere() {
        let mut a = LinkStateDb::new(k(1), String::new(), 10);
        let mut b = LinkStateDb::new(k(2), String::new(), 10);
        // Relay 9 restarted and counted up to 4 again with other links.
        a.receive(k(9), 4, String::new(), vec![k(3)]);
        b.receive(k(9), 4, String::new(), vec![k(5)]);
        assert_eq!(
            a.receive(k(9), 4, String::new(), vec![k(5)]),
            LsaVerdict::Newer
        );
        assert_eq!(
            b.receive(k(9), 4, String::new(), vec![k(3)]),
            LsaVerdict::Older
        );
        assert_eq!(a.frame_of(&k(9)), b.frame_of(&k(9)), "both keep the larger");
        // The origin itself: its own seq with other links is a past life.
        let mut o = LinkStateDb::new(k(9), String::new(), 10);
        o.set_neighbors([k(7)]);
        let seq = o.own_seq();
        assert_eq!(
            o.receive(k(9), seq, String::new(), vec![k(7)]),
            LsaVerdict::Stale,
            "its own come back"
        );
        assert_eq!(
            o.receive(k(9), seq, String::new(), vec![k(5)]),
            LsaVerdict::OwnOutdated
        );
        assert_eq!(o.own_seq(), seq + 1);
    }

    #[test]
    fn at_most_max_relays_origins_are_kept() {
        let mut d = LinkStateDb::new(k(0), String::new(), 2);
        assert_eq!(d.receive(k(1), 1, String::new(), vec![]), LsaVerdict::Newer);
        assert_eq!(d.receive(k(2), 1, String::new(), vec![]), LsaVerdict::Newer);
        assert_eq!(d.receive(k(3), 1, String::new(), vec![]), LsaVerdict::Full);
        assert_eq!(d.receive(k(2), 2, String::new(), vec![]), LsaVerdict::Newer);
        assert_eq!(d.len(), 2);
    }

    #[test]
    fn a_relay_not_linked_back_is_not_a_first_hop() {
        // This relay lists 2, but 2 has not listed it yet (its LinkState
        // is older than the link).
        let mut d = LinkStateDb::new(k(1), String::new(), 10);
        d.set_neighbors([k(2)]);
        d.receive(k(2), 1, String::new(), vec![k(3)]);
        d.receive(k(3), 1, String::new(), vec![k(2)]);
        assert_eq!(d.path(&k(2)), None);
        assert_eq!(d.path(&k(3)), None);
        d.receive(k(2), 2, String::new(), vec![k(1), k(3)]);
        assert_eq!(d.path(&k(3)), Some((2, k(2))));
    }
}
