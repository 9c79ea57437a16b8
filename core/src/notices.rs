//! Notices to a sender about its dropped messages, summed and bounded in
//! rate (`link.notice_interval_ms`, docs/PROTOCOL.md 4.11).
//!
//! One [`NoticeAggregator`] per link that asked for notices. Every drop is
//! recorded with its reason and destination (the notice's code and
//! subject); what goes out is at most one notice per (code, subject) per
//! interval, whose counts add up exactly to the drops recorded. The first
//! drop of a (code, subject) that had no notice in the last interval is due
//! at once, so a single miss is reported without delay; the drops after it
//! are summed until the interval ends. A flood of misses is a few notices.
//!
//! Bounded: at most [`MAX_SUBJECTS`] subjects are pending; a drop to a
//! further subject is counted under its code's zero subject, so at most
//! `MAX_SUBJECTS + NoticeCode::ALL.len()` entries exist.
//!
//! Pure: the time is the caller's (`now_ms`), nothing here reads a clock.

use relay_codec::frame::NoticeCode;
use relay_codec::{Frame, MessageId, PublicKey};
use std::collections::BTreeMap;

/// Distinct (code, subject) pairs pending per link before further subjects
/// are folded into their code's zero subject.
pub const MAX_SUBJECTS: usize = 64;

/// The subject of a notice whose messages had no cell destination, or were
/// folded together.
pub const NO_SUBJECT: PublicKey = PublicKey([0; 32]);

/// One notice due to be sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Notice {
    /// Why the messages were dropped.
    pub code: NoticeCode,
    /// How many (at least 1).
    pub count: u32,
    /// The first of them.
    pub id: MessageId,
    /// Their destination, or [`NO_SUBJECT`].
    pub subject: PublicKey,
}

impl Notice {
    /// The frame that carries it.
    pub fn into_frame(self) -> Frame {
        Frame::Notice {
            code: self.code,
            count: self.count,
            id: self.id,
            subject: self.subject,
        }
    }
}

#[derive(Debug)]
struct Entry {
    /// Drops not yet reported.
    count: u64,
    /// The first of them (meaningful while `count > 0`).
    first: MessageId,
    /// When the next notice may leave: the last one's time plus the
    /// interval, or the time of the first drop for a new entry.
    due_ms: u64,
}

/// Sums one link's drops into notices, at most one per (code, subject) per
/// interval; see the module documentation.
#[derive(Debug)]
pub struct NoticeAggregator {
    interval_ms: u64,
    entries: BTreeMap<(NoticeCode, PublicKey), Entry>,
}

impl NoticeAggregator {
    /// An aggregator that lets out one notice per (code, subject) per
    /// `interval_ms` (at least 1).
    pub fn new(interval_ms: u64) -> Self {
        Self {
            interval_ms: interval_ms.max(1),
            entries: BTreeMap::new(),
        }
    }

    /// Records `n` messages dropped for `code` to `subject`, the first of
    /// them `id`, at `now_ms`. Returns whether its entry became pending:
    /// then [`next_due`](Self::next_due) may be earlier than before (now,
    /// for a first drop), and whoever waits for it should look again.
    pub fn record(
        &mut self,
        code: NoticeCode,
        subject: PublicKey,
        id: MessageId,
        n: u64,
        now_ms: u64,
    ) -> bool {
        if n == 0 {
            return false;
        }
        let mut key = (code, subject);
        if !self.entries.contains_key(&key) && subject != NO_SUBJECT {
            if self.subjects() >= MAX_SUBJECTS {
                self.forget_idle(now_ms);
            }
            if self.subjects() >= MAX_SUBJECTS {
                key = (code, NO_SUBJECT);
            }
        }
        let e = self.entries.entry(key).or_insert(Entry {
            count: 0,
            first: id,
            due_ms: now_ms,
        });
        let became_pending = e.count == 0;
        if became_pending {
            e.first = id;
        }
        e.count = e.count.saturating_add(n);
        became_pending
    }

    /// The earliest time a pending notice is due, if any is pending.
    pub fn next_due(&self) -> Option<u64> {
        self.entries
            .values()
            .filter(|e| e.count > 0)
            .map(|e| e.due_ms)
            .min()
    }

    /// Appends the notices due at `now_ms` to `out`; each starts its
    /// (code, subject)'s next interval. Entries that stayed idle for an
    /// interval are forgotten.
    pub fn take_due(&mut self, now_ms: u64, out: &mut Vec<Notice>) {
        let interval = self.interval_ms;
        self.entries.retain(|&(code, subject), e| {
            if e.due_ms > now_ms {
                return true;
            }
            if e.count == 0 {
                // No drop for a whole interval: the next one is due at once.
                return false;
            }
            out.push(take(code, subject, e));
            e.due_ms = now_ms.saturating_add(interval);
            true
        });
    }

    /// Appends every pending notice to `out`, due or not, and forgets
    /// everything: for the link's orderly close, after its last message
    /// was handled.
    pub fn take_all(&mut self, out: &mut Vec<Notice>) {
        for ((code, subject), mut e) in std::mem::take(&mut self.entries) {
            while e.count > 0 {
                out.push(take(code, subject, &mut e));
            }
        }
    }

    /// Entries held (pending or within their interval).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Entries with a cell subject: what [`MAX_SUBJECTS`] bounds.
    fn subjects(&self) -> usize {
        self.entries
            .keys()
            .filter(|(_, s)| *s != NO_SUBJECT)
            .count()
    }

    fn forget_idle(&mut self, now_ms: u64) {
        self.entries.retain(|_, e| e.count > 0 || e.due_ms > now_ms);
    }
}

/// One notice from `e`'s count: all of it, or `u32::MAX` of it (the rest
/// stays pending).
fn take(code: NoticeCode, subject: PublicKey, e: &mut Entry) -> Notice {
    let count = u32::try_from(e.count).unwrap_or(u32::MAX);
    e.count -= u64::from(count);
    Notice {
        code,
        count,
        id: e.first,
        subject,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UNKNOWN: NoticeCode = NoticeCode::UnknownDestination;
    const SLOW: NoticeCode = NoticeCode::DroppedSlowReceiver;

    fn key(i: u8) -> PublicKey {
        PublicKey([i; 32])
    }

    fn id(i: u64) -> MessageId {
        MessageId((i as u128).to_le_bytes())
    }

    fn due(a: &mut NoticeAggregator, now: u64) -> Vec<Notice> {
        let mut out = Vec::new();
        a.take_due(now, &mut out);
        out
    }

    fn sum(notices: &[Notice]) -> u64 {
        notices.iter().map(|n| u64::from(n.count)).sum()
    }

    #[test]
    fn a_first_drop_is_due_at_once_and_the_rest_wait_for_the_interval() {
        let mut a = NoticeAggregator::new(100);
        assert_eq!(a.next_due(), None);
        assert!(a.record(UNKNOWN, key(1), id(1), 1, 1_000));
        assert_eq!(a.next_due(), Some(1_000));
        let n = due(&mut a, 1_000);
        assert_eq!(
            n,
            vec![Notice {
                code: UNKNOWN,
                count: 1,
                id: id(1),
                subject: key(1)
            }]
        );
        // Within the interval: summed, due when it ends.
        assert!(a.record(UNKNOWN, key(1), id(2), 1, 1_010), "pending again");
        assert!(
            !a.record(UNKNOWN, key(1), id(3), 5, 1_050),
            "already pending"
        );
        assert_eq!(a.next_due(), Some(1_100));
        assert!(due(&mut a, 1_099).is_empty());
        let n = due(&mut a, 1_100);
        assert_eq!(n.len(), 1);
        assert_eq!((n[0].count, n[0].id), (6, id(2)), "the first of the six");
        // A whole interval without drops: forgotten, and the next drop is
        // due at once again.
        assert!(due(&mut a, 1_200).is_empty());
        assert!(a.is_empty());
        assert!(a.record(UNKNOWN, key(1), id(9), 1, 5_000));
    }

    #[test]
    fn a_flood_yields_one_notice_per_interval_whose_counts_add_up() {
        let mut a = NoticeAggregator::new(100);
        let mut sent = Vec::new();
        // 10 000 drops, one per 0.1 ms, over one second; the shell takes
        // what is due whenever it is told or the next due time comes.
        for i in 0..10_000u64 {
            let now = 1_000 + i / 10;
            if a.next_due().is_some_and(|t| t <= now) {
                a.take_due(now, &mut sent);
            }
            if a.record(UNKNOWN, key(1), id(i), 1, now) {
                a.take_due(now, &mut sent);
            }
            assert!(
                a.next_due().is_none_or(|t| t <= now + 100),
                "a pending count waits at most an interval"
            );
        }
        a.take_all(&mut sent);
        assert_eq!(sum(&sent), 10_000);
        // 1 s at one per 100 ms, the first at once, and what is left at
        // the end.
        assert!(sent.len() <= 12, "{} notices", sent.len());
        assert!(a.is_empty());
    }

    #[test]
    fn each_code_and_subject_has_its_own_interval() {
        let mut a = NoticeAggregator::new(100);
        assert!(a.record(UNKNOWN, key(1), id(1), 1, 0));
        assert!(a.record(UNKNOWN, key(2), id(2), 1, 0));
        assert!(a.record(SLOW, key(1), id(3), 4, 0));
        let n = due(&mut a, 0);
        assert_eq!(n.len(), 3);
        assert_eq!(sum(&n), 6);
        a.record(SLOW, key(1), id(4), 1, 50);
        a.record(NoticeCode::Expired, key(1), id(5), 1, 50);
        let n = due(&mut a, 50);
        assert_eq!(
            n.len(),
            1,
            "a new code is due at once, the known one is not"
        );
        assert_eq!(n[0].code, NoticeCode::Expired);
        assert_eq!(a.next_due(), Some(100));
    }

    #[test]
    fn subjects_are_bounded_and_overflow_is_folded_exactly() {
        let mut a = NoticeAggregator::new(100);
        let mut total = 0;
        for i in 0..200u64 {
            a.record(
                UNKNOWN,
                PublicKey([(i % 250) as u8 + 1; 32]),
                id(i),
                i + 1,
                0,
            );
            total += i + 1;
            a.record(SLOW, PublicKey([(i % 250) as u8 + 1; 32]), id(i), 1, 0);
            total += 1;
        }
        assert!(
            a.len() <= MAX_SUBJECTS + NoticeCode::ALL.len(),
            "{} entries",
            a.len()
        );
        let mut out = Vec::new();
        a.take_all(&mut out);
        assert_eq!(sum(&out), total);
        // The overflow went to each code's zero subject.
        assert!(
            out.iter()
                .any(|n| n.code == UNKNOWN && n.subject == NO_SUBJECT)
        );
        assert!(
            out.iter()
                .any(|n| n.code == SLOW && n.subject == NO_SUBJECT)
        );
        assert!(out.iter().all(|n| n.count >= 1));
    }

    #[test]
    fn idle_subjects_make_room_for_new_ones() {
        let mut a = NoticeAggregator::new(100);
        for i in 0..MAX_SUBJECTS as u8 {
            a.record(UNKNOWN, key(i + 1), id(0), 1, 0);
        }
        assert_eq!(due(&mut a, 0).len(), MAX_SUBJECTS);
        // The table is full of subjects within their interval: a new
        // subject is folded.
        a.record(UNKNOWN, key(200), id(1), 1, 10);
        let n = due(&mut a, 10);
        assert_eq!(n[0].subject, NO_SUBJECT);
        // After an idle interval they are forgotten and a new subject gets
        // its own entry.
        a.record(UNKNOWN, key(201), id(2), 1, 500);
        let n = due(&mut a, 500);
        assert_eq!(n.len(), 1);
        assert_eq!(n[0].subject, key(201));
    }

    #[test]
    fn counts_over_u32_are_split_not_lost() {
        let mut a = NoticeAggregator::new(100);
        let big = u64::from(u32::MAX) + 5;
        a.record(UNKNOWN, key(1), id(1), big, 0);
        let mut out = Vec::new();
        a.take_due(0, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].count, u32::MAX);
        a.take_all(&mut out);
        assert_eq!(sum(&out), big);
        // Zero drops record nothing.
        assert!(!a.record(UNKNOWN, key(1), id(1), 0, 0));
        assert!(a.is_empty());
    }
}
