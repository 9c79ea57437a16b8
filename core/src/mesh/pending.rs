//! Lookups on their way and what waits for them: a message for a cell
//! whose home is not known yet, or a trace report for a source whose home
//! is not known, is held until the directory answers.
//!
//! Bounded: at most `max_lookups` lookups pending, at most
//! `max_held_per_lookup` items held for one, and at most `max_held` in all
//! (`mesh.max_pending_lookups`, `mesh.max_held_per_lookup`,
//! `mesh.max_held`); what does not fit is dropped by the caller and
//! counted. Each lookup asks one directory relay at a time and gives up
//! after the last, each after `lookup_timeout_ms`.

use crate::router::LinkId;
use relay_codec::{Envelope, MeshFrame, MessageId, PublicKey};
use std::collections::{BTreeMap, BTreeSet};

/// Something that waits for a cell's home.
#[derive(Clone, Debug, PartialEq)]
pub enum Held {
    /// A message for the cell, its TTL already lowered for this hop.
    Message {
        /// The message.
        env: Envelope,
        /// Its id.
        id: MessageId,
        /// The link it came from (for the notice if it is dropped).
        from: LinkId,
        /// When it arrived.
        since_ms: u64,
    },
    /// A trace report for the home relay of the cell (the traced
    /// message's source).
    Trace(Box<MeshFrame>),
}

/// One lookup on its way.
#[derive(Clone, Debug, PartialEq)]
pub struct Lookup {
    /// The cell sought.
    pub cell: PublicKey,
    /// The directory relays to ask, best first.
    pub ask: Vec<PublicKey>,
    /// Which of them is being asked.
    pub asking: usize,
    /// When the one asked is given up on.
    pub deadline_ms: u64,
    /// What waits.
    pub held: Vec<Held>,
}

/// Bounds of [`Pending`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PendingLimits {
    /// Most lookups at once.
    pub max_lookups: usize,
    /// Most items held for one lookup.
    pub max_held_per_lookup: usize,
    /// Most items held in all.
    pub max_held: usize,
}

/// The pending lookups of one relay.
pub struct Pending {
    limits: PendingLimits,
    by_request: BTreeMap<u32, Lookup>,
    by_cell: BTreeMap<PublicKey, u32>,
    deadlines: BTreeSet<(u64, u32)>,
    next_request: u32,
    held: usize,
}

impl Pending {
    /// No lookup pending.
    pub fn new(limits: PendingLimits) -> Self {
        Self {
            limits,
            by_request: BTreeMap::new(),
            by_cell: BTreeMap::new(),
            deadlines: BTreeSet::new(),
            next_request: 1,
            held: 0,
        }
    }

    /// The request pending for `cell`, if any.
    pub fn request_for(&self, cell: &PublicKey) -> Option<u32> {
        self.by_cell.get(cell).copied()
    }

    /// Holds `item` for the pending `request`; gives it back if a bound
    /// is reached.
    pub fn hold(&mut self, request: u32, item: Held) -> Result<(), Held> {
        if self.held >= self.limits.max_held {
            return Err(item);
        }
        match self.by_request.get_mut(&request) {
            Some(l) if l.held.len() < self.limits.max_held_per_lookup => {
                l.held.push(item);
                self.held += 1;
                Ok(())
            }
            _ => Err(item),
        }
    }

    /// Starts a lookup of `cell`, asking `ask[0]` first, with `item`
    /// held: its request number, or the item back if a bound is reached.
    pub fn start(
        &mut self,
        cell: PublicKey,
        ask: Vec<PublicKey>,
        deadline_ms: u64,
        item: Held,
    ) -> Result<u32, Held> {
        if self.by_request.len() >= self.limits.max_lookups
            || self.held >= self.limits.max_held
            || ask.is_empty()
            || self.by_cell.contains_key(&cell)
        {
            return Err(item);
        }
        let request = self.next_request;
        self.next_request = self.next_request.wrapping_add(1).max(1);
        self.by_request.insert(
            request,
            Lookup {
                cell,
                ask,
                asking: 0,
                deadline_ms,
                held: vec![item],
            },
        );
        self.by_cell.insert(cell, request);
        self.deadlines.insert((deadline_ms, request));
        self.held += 1;
        Ok(request)
    }

    /// The lookup `request`, ended: removed with what it held.
    pub fn finish(&mut self, request: u32) -> Option<Lookup> {
        let l = self.by_request.remove(&request)?;
        self.by_cell.remove(&l.cell);
        self.deadlines.remove(&(l.deadline_ms, request));
        self.held -= l.held.len();
        Some(l)
    }

    /// Moves `request` on to its next directory relay, with a new
    /// deadline: the relay to ask, or `None` (nothing changed) if it was
    /// the last one.
    pub fn next(&mut self, request: u32, deadline_ms: u64) -> Option<PublicKey> {
        let l = self.by_request.get_mut(&request)?;
        if l.asking + 1 >= l.ask.len() {
            return None;
        }
        l.asking += 1;
        self.deadlines.remove(&(l.deadline_ms, request));
        l.deadline_ms = deadline_ms;
        self.deadlines.insert((deadline_ms, request));
        Some(l.ask[l.asking])
    }

    /// Starts `request` again on a new list of directory relays (who is
    /// reachable changed), asking `ask[0]` with a new deadline; false if
    /// there is no such request or no one to ask.
    pub fn replan(&mut self, request: u32, ask: Vec<PublicKey>, deadline_ms: u64) -> bool {
        let Some(l) = self.by_request.get_mut(&request) else {
            return false;
        };
        if ask.is_empty() {
            return false;
        }
        self.deadlines.remove(&(l.deadline_ms, request));
        l.ask = ask;
        l.asking = 0;
        l.deadline_ms = deadline_ms;
        self.deadlines.insert((deadline_ms, request));
        true
    }

    /// Every pending request, by number.
    pub fn requests(&self) -> Vec<u32> {
        self.by_request.keys().copied().collect()
    }

    /// Which relay `request` is asking now, and for which cell.
    pub fn asking(&self, request: u32) -> Option<(PublicKey, PublicKey)> {
        self.by_request
            .get(&request)
            .map(|l| (l.ask[l.asking], l.cell))
    }

    /// The cell `request` seeks, if `relay` is one of the directory
    /// relays it asked so far (a late answer from an earlier one counts).
    pub fn asked(&self, request: u32, relay: &PublicKey) -> Option<PublicKey> {
        let l = self.by_request.get(&request)?;
        l.ask[..=l.asking].contains(relay).then_some(l.cell)
    }

    /// The requests whose deadline is at or before `now_ms`.
    pub fn due(&self, now_ms: u64) -> Vec<u32> {
        self.deadlines
            .iter()
            .take_while(|(d, _)| *d <= now_ms)
            .map(|(_, r)| *r)
            .collect()
    }

    /// The earliest deadline.
    pub fn next_deadline(&self) -> Option<u64> {
        self.deadlines.first().map(|(d, _)| *d)
    }

    /// Lookups pending.
    pub fn len(&self) -> usize {
        self.by_request.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.by_request.is_empty()
    }

    /// Items held in all.
    pub fn held(&self) -> usize {
        self.held
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(i: u8) -> PublicKey {
        PublicKey([i; 32])
    }

    fn trace() -> Held {
        Held::Trace(Box::new(MeshFrame::Ping { nonce: 0 }))
    }

    #[test]
    fn every_bound_holds() {
        let mut p = Pending::new(PendingLimits {
            max_lookups: 2,
            max_held_per_lookup: 2,
            max_held: 3,
        });
        let a = p.start(k(1), vec![k(9)], 10, trace()).unwrap();
        assert!(
            p.start(k(1), vec![k(9)], 10, trace()).is_err(),
            "one per cell"
        );
        assert!(p.hold(a, trace()).is_ok());
        assert!(p.hold(a, trace()).is_err(), "per lookup");
        let b = p.start(k(2), vec![k(9)], 10, trace()).unwrap();
        assert!(p.start(k(3), vec![k(9)], 10, trace()).is_err(), "lookups");
        assert!(p.hold(b, trace()).is_err(), "in all");
        assert_eq!(p.held(), 3);
        assert_eq!(p.finish(a).unwrap().held.len(), 2);
        assert_eq!((p.held(), p.len()), (1, 1));
        assert!(p.start(k(4), vec![], 10, trace()).is_err(), "nobody to ask");
    }

    #[test]
    fn a_lookup_moves_through_its_directory_relays_then_ends() {
        let mut p = Pending::new(PendingLimits {
            max_lookups: 8,
            max_held_per_lookup: 8,
            max_held: 8,
        });
        let r = p.start(k(1), vec![k(7), k(8)], 10, trace()).unwrap();
        assert_eq!(p.due(9), Vec::<u32>::new());
        assert_eq!(p.due(10), vec![r]);
        assert_eq!(p.next(r, 20), Some(k(8)));
        assert_eq!(p.asking(r), Some((k(8), k(1))));
        assert_eq!(p.asked(r, &k(7)), Some(k(1)), "a late answer counts");
        assert_eq!(p.asked(r, &k(9)), None);
        assert_eq!(p.next_deadline(), Some(20));
        assert_eq!(p.next(r, 30), None, "no one left to ask");
        assert!(p.replan(r, vec![k(5)], 40));
        assert_eq!(p.asking(r), Some((k(5), k(1))));
        assert_eq!(p.next_deadline(), Some(40));
        assert!(!p.replan(r, vec![], 50), "no one to ask");
        assert!(p.finish(r).is_some());
        assert_eq!(p.request_for(&k(1)), None);
        assert_eq!(p.next_deadline(), None);
    }
}
