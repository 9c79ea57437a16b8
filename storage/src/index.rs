//! Per-destination retry queues over the log, and the persisted dedup window.
//!
//! A durable message is logged as a [`RecordKind::Message`] record whose
//! body is a [`DurableMessage`] (its id, lane, destination, times and
//! payload); the next hop's acknowledgement is a [`RecordKind::Ack`] record
//! naming the message's sequence number ([`encode_ack`]). [`RetryIndex`] is
//! the in-memory view of that log: for each destination key, one queue per
//! lane of the locations of messages not yet acknowledged or expired, in log
//! order, and the ids of every message still on disk, which is the dedup
//! window persisted. It is rebuilt on start by feeding
//! [`RetryIndex::apply`] from [`Log::open`]'s visitor, so lanes (priorities)
//! and the dedup window survive a restart.
//!
//! The index holds no payloads (read them back with [`Log::read`]) and does
//! no I/O of its own, so the relay's pure node can drive it: the caller
//! decides when to log, feeds each record to [`RetryIndex::apply`] once its
//! append has completed, and passes the time in (`now_ms`); nothing here
//! reads a clock. Its size is bounded by the log's: one entry per message
//! record on disk, and the log is bounded by `max_bytes`.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::StorageError;
use crate::log::{Log, RecordLocation};
use crate::record::RecordKind;

/// Number of lanes (priorities), as the wire's lanes 0 (control, first) to
/// 3 (bulk, last).
pub const LANES: usize = 4;

/// A message's 16-byte id, as on the wire.
pub type MessageId = [u8; 16];

/// Longest destination key a durable message may carry.
pub const MAX_DEST_LEN: usize = 1024;

/// Bytes before the destination in a message body.
const FIXED_LEN: usize = 16 + 1 + 2 + 8 + 8;

/// The body of a [`RecordKind::Message`] record.
///
/// ```text
/// offset  size  field
///      0    16  id              message id
///     16     1  lane            0..LANES, 0 first
///     17     2  dest_len        u16 LE, at most MAX_DEST_LEN
///     19     8  received_at_ms  u64 LE, when this relay accepted it
///     27     8  expires_at_ms   u64 LE, when it expires (u64::MAX: never)
///     35     n  dest            destination key
///   35+n     …  payload         the message as received
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DurableMessage<'a> {
    /// The message id (dedup key).
    pub id: MessageId,
    /// Lane, below [`LANES`].
    pub lane: u8,
    /// When this relay accepted it, in ms of the caller's clock.
    pub received_at_ms: u64,
    /// When it expires, in ms of the same clock.
    pub expires_at_ms: u64,
    /// Destination key (a cell's key, or whatever the relay routes by).
    pub dest: &'a [u8],
    /// The message as received.
    pub payload: &'a [u8],
}

impl<'a> DurableMessage<'a> {
    /// Appends the encoded body to `out`. Refuses a lane over the bound or a
    /// destination over [`MAX_DEST_LEN`].
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), StorageError> {
        if usize::from(self.lane) >= LANES {
            return Err(StorageError::BadMessage("lane out of range"));
        }
        if self.dest.len() > MAX_DEST_LEN {
            return Err(StorageError::BadMessage("destination too long"));
        }
        out.reserve(FIXED_LEN + self.dest.len() + self.payload.len());
        out.extend_from_slice(&self.id);
        out.push(self.lane);
        out.extend_from_slice(&(self.dest.len() as u16).to_le_bytes());
        out.extend_from_slice(&self.received_at_ms.to_le_bytes());
        out.extend_from_slice(&self.expires_at_ms.to_le_bytes());
        out.extend_from_slice(self.dest);
        out.extend_from_slice(self.payload);
        Ok(())
    }

    /// Decodes a body written by [`DurableMessage::encode`]; borrows from it.
    pub fn decode(body: &'a [u8]) -> Result<Self, StorageError> {
        if body.len() < FIXED_LEN {
            return Err(StorageError::BadMessage("body shorter than its header"));
        }
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&body[at..at + 8]);
            u64::from_le_bytes(b)
        };
        let mut id = [0u8; 16];
        id.copy_from_slice(&body[..16]);
        let lane = body[16];
        if usize::from(lane) >= LANES {
            return Err(StorageError::BadMessage("lane out of range"));
        }
        let dest_len = usize::from(u16::from_le_bytes([body[17], body[18]]));
        if dest_len > MAX_DEST_LEN || FIXED_LEN + dest_len > body.len() {
            return Err(StorageError::BadMessage("bad destination length"));
        }
        Ok(Self {
            id,
            lane,
            received_at_ms: u64_at(19),
            expires_at_ms: u64_at(27),
            dest: &body[FIXED_LEN..FIXED_LEN + dest_len],
            payload: &body[FIXED_LEN + dest_len..],
        })
    }
}

/// The body of a [`RecordKind::Ack`] record: the sequence number of the
/// acknowledged message record, u64 LE.
pub fn encode_ack(message_seq: u64) -> [u8; 8] {
    message_seq.to_le_bytes()
}

/// Decodes an [`encode_ack`] body.
pub fn decode_ack(body: &[u8]) -> Result<u64, StorageError> {
    let b: [u8; 8] = body
        .try_into()
        .map_err(|_| StorageError::BadMessage("ack body is not 8 bytes"))?;
    Ok(u64::from_le_bytes(b))
}

/// What [`RetryIndex::apply`] did with a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// A message, now queued for its destination.
    Queued,
    /// A message whose id was already in the window: not queued again.
    Duplicate,
    /// An acknowledgement that released the message at this location.
    Released(RecordLocation),
    /// An acknowledgement of a message no longer queued (already released,
    /// expired or compacted).
    StaleAck,
}

/// A queued message, as the index keeps it.
#[derive(Debug, Clone)]
struct Queued {
    loc: RecordLocation,
    dest: Vec<u8>,
    lane: u8,
    expires_at_ms: u64,
}

/// What compaction needs to know about a segment.
#[derive(Debug, Default, Clone)]
struct SegmentStats {
    /// Messages in it still queued.
    live: usize,
    /// Newest `received_at_ms` of its messages: its ids must stay on disk
    /// for the dedup window after that.
    newest_received_ms: u64,
    /// Ids of its messages, forgotten with the segment.
    ids: Vec<MessageId>,
    /// Other segments holding messages acknowledged here: removing this one
    /// first would bring those messages back on the next start.
    ack_targets: BTreeSet<u64>,
}

/// Per-destination, per-lane queues of logged messages, and the ids of
/// every message on disk. See the module documentation.
#[derive(Debug, Default)]
pub struct RetryIndex {
    queues: HashMap<Vec<u8>, [BTreeSet<u64>; LANES]>,
    queued: HashMap<u64, Queued>,
    /// (expires_at_ms, seq) of every queued message.
    expiry: BTreeSet<(u64, u64)>,
    seen: HashMap<MessageId, u64>,
    segments: BTreeMap<u64, SegmentStats>,
}

impl RetryIndex {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }

    /// Opens `log` and rebuilds the index from it, then releases what
    /// expired by `now_ms`. Records that do not decode are counted in the
    /// returned tally (they passed the CRC, so they come from a bug or a
    /// newer writer) and otherwise skipped.
    pub fn open(
        config: crate::LogConfig,
        now_ms: u64,
    ) -> Result<(Log, crate::RecoveryReport, Self, u64), StorageError> {
        let mut index = Self::new();
        let mut bad = 0;
        let (log, report) = Log::open(config, |loc, kind, body| {
            if index.apply(loc, kind, body).is_err() {
                bad += 1;
            }
        })?;
        index.expire(now_ms);
        Ok((log, report, index, bad))
    }

    /// Feeds one record: from [`Log::open`]'s visitor while rebuilding, or
    /// once its append has completed (synced) while running.
    pub fn apply(
        &mut self,
        loc: RecordLocation,
        kind: RecordKind,
        body: &[u8],
    ) -> Result<Applied, StorageError> {
        match kind {
            RecordKind::Message => {
                let msg = DurableMessage::decode(body)?;
                let stats = self.segments.entry(loc.segment).or_default();
                if self.seen.contains_key(&msg.id) {
                    return Ok(Applied::Duplicate);
                }
                self.seen.insert(msg.id, msg.received_at_ms);
                stats.ids.push(msg.id);
                stats.live += 1;
                stats.newest_received_ms = stats.newest_received_ms.max(msg.received_at_ms);
                self.queues.entry(msg.dest.to_vec()).or_default()[usize::from(msg.lane)]
                    .insert(loc.seq);
                self.expiry.insert((msg.expires_at_ms, loc.seq));
                self.queued.insert(
                    loc.seq,
                    Queued {
                        loc,
                        dest: msg.dest.to_vec(),
                        lane: msg.lane,
                        expires_at_ms: msg.expires_at_ms,
                    },
                );
                Ok(Applied::Queued)
            }
            RecordKind::Ack => {
                let seq = decode_ack(body)?;
                let Some(released) = self.release(seq) else {
                    return Ok(Applied::StaleAck);
                };
                if released.segment != loc.segment {
                    self.segments
                        .entry(loc.segment)
                        .or_default()
                        .ack_targets
                        .insert(released.segment);
                }
                Ok(Applied::Released(released))
            }
        }
    }

    /// Takes a message out of its queue; `None` if it is not queued. Used
    /// for acknowledgements (through [`RetryIndex::apply`]) and expiry.
    fn release(&mut self, seq: u64) -> Option<RecordLocation> {
        let q = self.queued.remove(&seq)?;
        if let Some(lanes) = self.queues.get_mut(&q.dest) {
            lanes[usize::from(q.lane)].remove(&seq);
            if lanes.iter().all(BTreeSet::is_empty) {
                self.queues.remove(&q.dest);
            }
        }
        self.expiry.remove(&(q.expires_at_ms, seq));
        if let Some(s) = self.segments.get_mut(&q.loc.segment) {
            s.live -= 1;
        }
        Some(q.loc)
    }

    /// Releases every queued message that expired by `now_ms` and returns
    /// their locations (for the expiry report to the sender). Expiry needs
    /// no record: a restart recomputes it from the stored times.
    pub fn expire(&mut self, now_ms: u64) -> Vec<RecordLocation> {
        let due: Vec<u64> = self
            .expiry
            .range(..(now_ms.saturating_add(1), 0))
            .map(|&(_, seq)| seq)
            .collect();
        due.into_iter()
            .filter_map(|seq| self.release(seq))
            .collect()
    }

    /// Whether a message with this id is on disk (queued, or released but
    /// not yet compacted): a replay to drop.
    pub fn is_duplicate(&self, id: &MessageId) -> bool {
        self.seen.contains_key(id)
    }

    /// The next message to deliver to `dest`: the oldest of the highest
    /// priority lane that has any.
    pub fn next(&self, dest: &[u8]) -> Option<RecordLocation> {
        let lanes = self.queues.get(dest)?;
        lanes
            .iter()
            .find_map(|lane| lane.first())
            .and_then(|seq| self.queued.get(seq))
            .map(|q| q.loc)
    }

    /// Every message queued for `dest` on `lane`, oldest first.
    pub fn queued(&self, dest: &[u8], lane: u8) -> Vec<RecordLocation> {
        self.queues
            .get(dest)
            .and_then(|lanes| lanes.get(usize::from(lane)))
            .map(|l| {
                l.iter()
                    .filter_map(|s| self.queued.get(s))
                    .map(|q| q.loc)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Destination keys with messages queued.
    pub fn destinations(&self) -> impl Iterator<Item = &[u8]> {
        self.queues.keys().map(Vec::as_slice)
    }

    /// Messages queued, over every destination.
    pub fn len(&self) -> usize {
        self.queued.len()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.queued.is_empty()
    }

    /// Ids in the persisted dedup window.
    pub fn window_len(&self) -> usize {
        self.seen.len()
    }

    /// Of the segments `on_disk` (oldest first), those compaction may
    /// remove: not `active`, no message queued, every id older than the
    /// dedup window (`newest received + dedup_window_ms <= now_ms`), and
    /// every message acknowledged in it in a segment removed before it.
    pub fn removable_segments(
        &self,
        on_disk: &[u64],
        active: Option<u64>,
        now_ms: u64,
        dedup_window_ms: u64,
    ) -> Vec<u64> {
        let mut out: Vec<u64> = Vec::new();
        for &id in on_disk {
            if Some(id) == active {
                continue;
            }
            let Some(s) = self.segments.get(&id) else {
                // No record of it was recovered: nothing to keep.
                out.push(id);
                continue;
            };
            let quiet = s.newest_received_ms.saturating_add(dedup_window_ms) <= now_ms;
            let targets_gone = s
                .ack_targets
                .iter()
                .all(|t| !self.segments.contains_key(t) || out.contains(t));
            if s.live == 0 && quiet && targets_gone {
                out.push(id);
            }
        }
        out
    }

    /// Forgets removed segments and their ids.
    pub fn forget_segments(&mut self, ids: &[u64]) {
        for id in ids {
            if let Some(s) = self.segments.remove(id) {
                for mid in &s.ids {
                    self.seen.remove(mid);
                }
            }
        }
    }
}

/// Removes from `log` every segment [`RetryIndex::removable_segments`]
/// allows and forgets them in `index`; returns the bytes freed.
pub fn compact(
    log: &Log,
    index: &mut RetryIndex,
    now_ms: u64,
    dedup_window_ms: u64,
) -> Result<u64, StorageError> {
    let (on_disk, active) = log.segments();
    let ids = index.removable_segments(&on_disk, active, now_ms, dedup_window_ms);
    let freed = log.remove_segments(&ids)?;
    index.forget_segments(&ids);
    Ok(freed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(segment: u64, seq: u64) -> RecordLocation {
        RecordLocation {
            segment,
            offset: seq * 100,
            len: 100,
            seq,
        }
    }

    fn msg(index: &mut RetryIndex, l: RecordLocation, id: u8, dest: &[u8], lane: u8) -> Applied {
        let mut body = Vec::new();
        DurableMessage {
            id: [id; 16],
            lane,
            received_at_ms: 1000 + l.seq,
            expires_at_ms: 10_000 + l.seq,
            dest,
            payload: b"p",
        }
        .encode(&mut body)
        .unwrap();
        index.apply(l, RecordKind::Message, &body).unwrap()
    }

    #[test]
    fn message_body_round_trips_and_bad_bodies_are_refused() {
        let m = DurableMessage {
            id: [3; 16],
            lane: 2,
            received_at_ms: 5,
            expires_at_ms: u64::MAX,
            dest: b"cell",
            payload: b"hello",
        };
        let mut body = Vec::new();
        m.encode(&mut body).unwrap();
        assert_eq!(DurableMessage::decode(&body).unwrap(), m);
        for cut in 0..FIXED_LEN + 4 {
            assert!(DurableMessage::decode(&body[..cut]).is_err(), "cut {cut}");
        }
        let mut bad = body.clone();
        bad[16] = LANES as u8;
        assert!(DurableMessage::decode(&bad).is_err());
        let long = vec![0; MAX_DEST_LEN + 1];
        assert!(
            DurableMessage { dest: &long, ..m }
                .encode(&mut Vec::new())
                .is_err()
        );
        assert!(decode_ack(&[1, 2, 3]).is_err());
        assert_eq!(decode_ack(&encode_ack(77)).unwrap(), 77);
    }

    #[test]
    fn lanes_order_delivery_and_acks_release() {
        let mut ix = RetryIndex::new();
        assert_eq!(msg(&mut ix, loc(1, 1), 1, b"a", 3), Applied::Queued);
        assert_eq!(msg(&mut ix, loc(1, 2), 2, b"a", 1), Applied::Queued);
        assert_eq!(msg(&mut ix, loc(1, 3), 3, b"a", 1), Applied::Queued);
        assert_eq!(msg(&mut ix, loc(1, 4), 4, b"b", 0), Applied::Queued);
        assert_eq!(msg(&mut ix, loc(1, 5), 2, b"a", 1), Applied::Duplicate);
        assert_eq!(ix.next(b"a"), Some(loc(1, 2)));
        assert_eq!(ix.queued(b"a", 1), [loc(1, 2), loc(1, 3)]);
        assert_eq!(
            ix.apply(loc(1, 6), RecordKind::Ack, &encode_ack(2))
                .unwrap(),
            Applied::Released(loc(1, 2))
        );
        assert_eq!(
            ix.apply(loc(1, 7), RecordKind::Ack, &encode_ack(2))
                .unwrap(),
            Applied::StaleAck
        );
        assert_eq!(ix.next(b"a"), Some(loc(1, 3)));
        assert!(ix.is_duplicate(&[2; 16]), "released ids stay in the window");
        assert_eq!(ix.len(), 3);
        // Expiry by time releases without a record.
        let gone = ix.expire(10_003);
        assert_eq!(gone, [loc(1, 1), loc(1, 3)]);
        assert_eq!(ix.next(b"a"), None);
        assert_eq!(ix.destinations().collect::<Vec<_>>(), [&b"b"[..]]);
    }

    #[test]
    fn compaction_waits_for_acks_window_and_ack_order() {
        let mut ix = RetryIndex::new();
        msg(&mut ix, loc(1, 1), 1, b"a", 2);
        msg(&mut ix, loc(2, 2), 2, b"a", 2);
        ix.apply(loc(2, 3), RecordKind::Ack, &encode_ack(1))
            .unwrap();
        msg(&mut ix, loc(3, 4), 3, b"a", 2);
        let disk = [1, 2, 3];
        // Segment 1 is all acknowledged, but its ids are in the window.
        assert!(ix.removable_segments(&disk, Some(3), 1001, 100).is_empty());
        assert_eq!(ix.removable_segments(&disk, Some(3), 2000, 100), [1]);
        // Segment 2 holds the ack for 1 and a queued message.
        ix.apply(loc(3, 5), RecordKind::Ack, &encode_ack(2))
            .unwrap();
        assert_eq!(ix.removable_segments(&disk, Some(3), 2000, 100), [1, 2]);
        // Segment 2 alone (1 kept) would bring message 1 back: refused.
        assert!(
            ix.removable_segments(&[2, 3], Some(3), 2000, 100)
                .is_empty()
        );
        ix.segments.get_mut(&1).unwrap().live = 1;
        assert!(ix.removable_segments(&disk, Some(3), 2000, 100).is_empty());
        ix.segments.get_mut(&1).unwrap().live = 0;
        ix.forget_segments(&[1, 2]);
        assert!(!ix.is_duplicate(&[1; 16]));
        assert!(ix.is_duplicate(&[3; 16]));
    }
}
