//! The recovery scan: find the valid prefix of a log segment.
//!
//! On start, each segment's bytes are walked record by record with
//! [`scan`]. The walk stops at the first record that is torn (the input ends
//! inside it, as after a crash during an append) or corrupt (bad magic, bad
//! CRC, a length over [`MAX_RECORD_BODY`](crate::record::MAX_RECORD_BODY),
//! an unknown kind or flags, or a sequence number not greater than the one
//! before). Everything before that point is trusted; the caller truncates the
//! segment to [`ScanOutcome::valid_len`] and appends from there.

use std::ops::Range;

use crate::StorageError;
use crate::record::decode_record;

/// Why a scan stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The input ends exactly after the last valid record (or is empty).
    Clean,
    /// The input ends inside a record whose bytes so far are plausible: the
    /// expected result of a crash during an append.
    TornTail,
    /// The record starting at `offset` is not valid; nothing from `offset`
    /// on is trusted. `offset` equals [`ScanOutcome::valid_len`].
    Corrupt {
        /// Byte offset in the scanned buffer of the first invalid record.
        offset: usize,
        /// What was wrong with it.
        reason: CorruptReason,
    },
}

/// What made a record corrupt, for the log line recovery writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CorruptReason {
    /// The record does not start with the magic number.
    BadMagic,
    /// The length field is over the bound.
    LengthOverBound,
    /// The CRC does not match the header and body.
    BadCrc,
    /// The CRC matches but the kind is unknown to this build.
    UnknownKind,
    /// The CRC matches but flag bits unknown to this build are set.
    UnknownFlags,
    /// The record is valid but its sequence number is not greater than the
    /// previous record's.
    SequenceNotIncreasing,
}

impl CorruptReason {
    /// The reason a [`decode_record`] error stands for.
    fn from_error(err: &StorageError) -> Self {
        match err {
            StorageError::BadMagic => Self::BadMagic,
            // `BodyTooLarge` comes only from encoding; it is the same bound.
            StorageError::LengthOverBound { .. } | StorageError::BodyTooLarge { .. } => {
                Self::LengthOverBound
            }
            StorageError::CrcMismatch { .. } => Self::BadCrc,
            StorageError::UnknownKind(_) => Self::UnknownKind,
            StorageError::UnknownFlags(_) => Self::UnknownFlags,
            // Not produced by `decode_record`.
            _ => Self::BadCrc,
        }
    }
}

/// Result of [`scan`]: the valid records and where the valid prefix ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanOutcome {
    /// `(sequence number, byte range of the whole record, header included)`
    /// for each valid record, in order. The ranges are contiguous from 0 to
    /// `valid_len`; sequence numbers are strictly increasing. At most
    /// `buf.len() / HEADER_LEN` entries.
    pub records: Vec<(u64, Range<usize>)>,
    /// Length of the valid prefix: the end of the last valid record, or 0.
    /// Recovery truncates the segment to this length.
    pub valid_len: usize,
    /// Why the scan stopped.
    pub stop: StopReason,
}

/// Walks the records in `buf` from offset 0 and stops at the first torn or
/// corrupt one (see [`StopReason`]).
///
/// Pure: reads only `buf`, never panics, and allocates only the returned
/// list of records. Sequence numbers must be strictly increasing within
/// `buf`; the first record may carry any sequence number.
pub fn scan(buf: &[u8]) -> ScanOutcome {
    let mut records = Vec::new();
    let mut offset = 0;
    let mut last_seq: Option<u64> = None;
    let stop = loop {
        let rest = &buf[offset..];
        if rest.is_empty() {
            break StopReason::Clean;
        }
        match decode_record(rest) {
            Ok(None) => break StopReason::TornTail,
            Ok(Some((rec, used))) => {
                if last_seq.is_some_and(|last| rec.seq <= last) {
                    break StopReason::Corrupt {
                        offset,
                        reason: CorruptReason::SequenceNotIncreasing,
                    };
                }
                last_seq = Some(rec.seq);
                records.push((rec.seq, offset..offset + used));
                offset += used;
            }
            Err(err) => {
                break StopReason::Corrupt {
                    offset,
                    reason: CorruptReason::from_error(&err),
                };
            }
        }
    };
    ScanOutcome {
        records,
        valid_len: offset,
        stop,
    }
}

/// A stretch of a segment that held no valid record, between two valid ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CorruptRange {
    /// Byte offset of the stretch in the segment.
    pub offset: usize,
    /// Its length in bytes (to the start of the next valid record).
    pub len: usize,
    /// What was wrong with the record that started there.
    pub reason: CorruptReason,
}

/// Result of [`scan_segment`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentScan {
    /// `(sequence number, byte range)` of every valid record, in order.
    pub records: Vec<(u64, Range<usize>)>,
    /// Corrupt stretches skipped between valid records, in order.
    pub corrupt: Vec<CorruptRange>,
    /// End of the last valid record (0 if none): appends resume here.
    pub data_end: usize,
    /// Bytes after `data_end` up to the last non-zero byte: a torn tail
    /// (0 when the segment ends cleanly in zeros or at its end).
    pub torn_bytes: usize,
}

/// Walks a preallocated segment: records back to back, then zeros.
///
/// Unlike [`scan`], a corrupt record is skipped: the walk resynchronises on
/// the next offset holding the magic and a record whose CRC matches and
/// whose sequence number is greater than the last one accepted (a false
/// resynchronisation needs a CRC-32 collision). A stretch with no valid
/// record after it is the torn tail of an interrupted append; a stretch
/// followed by a valid record is reported in [`SegmentScan::corrupt`].
/// Records must have sequence numbers above `after_seq` (the last one of the
/// segments before). Never panics; allocates only the returned lists.
pub fn scan_segment(buf: &[u8], after_seq: Option<u64>) -> SegmentScan {
    // The preallocated rest of a segment is zeros; a record's own body may
    // end in zeros, so records are decoded from the whole buffer.
    let nonzero_end = buf.iter().rposition(|&b| b != 0).map_or(0, |p| p + 1);
    let mut out = SegmentScan {
        records: Vec::new(),
        corrupt: Vec::new(),
        data_end: 0,
        torn_bytes: 0,
    };
    let mut last = after_seq;
    let mut offset = 0;
    let accept = |at: usize, last: Option<u64>| -> Option<(u64, usize)> {
        match decode_record(&buf[at..]) {
            Ok(Some((rec, used))) if last.is_none_or(|l| rec.seq > l) => Some((rec.seq, used)),
            _ => None,
        }
    };
    while offset < nonzero_end {
        if let Some((seq, used)) = accept(offset, last) {
            out.records.push((seq, offset..offset + used));
            last = Some(seq);
            offset += used;
            out.data_end = offset;
            continue;
        }
        let reason = match decode_record(&buf[offset..]) {
            Ok(Some(_)) => CorruptReason::SequenceNotIncreasing,
            Ok(None) => CorruptReason::BadCrc,
            Err(err) => CorruptReason::from_error(&err),
        };
        let magic = crate::record::MAGIC.to_le_bytes();
        let next = (offset + 1..nonzero_end.saturating_sub(1))
            .find(|&p| buf[p..p + 2] == magic && accept(p, last).is_some());
        match next {
            Some(p) => {
                out.corrupt.push(CorruptRange {
                    offset,
                    len: p - offset,
                    reason,
                });
                offset = p;
            }
            None => {
                out.torn_bytes = nonzero_end - offset;
                break;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{HEADER_LEN, RecordKind, encode_record};
    use proptest::prelude::*;

    /// A valid log and the `(seq, range)` of each record in it.
    type Log = (Vec<u8>, Vec<(u64, Range<usize>)>);

    fn build(entries: &[(u64, RecordKind, Vec<u8>)]) -> Log {
        let mut buf = Vec::new();
        let mut recs = Vec::new();
        for (seq, kind, body) in entries {
            let start = buf.len();
            encode_record(*seq, *kind, body, &mut buf).unwrap();
            recs.push((*seq, start..buf.len()));
        }
        (buf, recs)
    }

    /// Valid logs of up to 8 records with strictly increasing (gapped)
    /// sequence numbers and bodies of up to 48 bytes.
    fn log(min_records: usize) -> impl Strategy<Value = Log> {
        (
            0..u64::MAX / 2,
            proptest::collection::vec(
                (
                    1..1000u64,
                    prop_oneof![Just(RecordKind::Message), Just(RecordKind::Ack)],
                    proptest::collection::vec(any::<u8>(), 0..48),
                ),
                min_records..8,
            ),
        )
            .prop_map(|(mut seq, raw)| {
                let entries: Vec<_> = raw
                    .into_iter()
                    .map(|(gap, kind, body)| {
                        seq += gap;
                        (seq, kind, body)
                    })
                    .collect();
                build(&entries)
            })
    }

    /// Invariants that hold for a scan of any input whatsoever.
    fn check_invariants(buf: &[u8], out: &ScanOutcome) -> Result<(), TestCaseError> {
        prop_assert!(out.valid_len <= buf.len());
        let mut expect_start = 0;
        let mut last = None;
        for (seq, range) in &out.records {
            prop_assert_eq!(range.start, expect_start);
            prop_assert!(range.len() >= HEADER_LEN);
            let (rec, used) = decode_record(&buf[range.clone()]).unwrap().unwrap();
            prop_assert_eq!(used, range.len());
            prop_assert_eq!(rec.seq, *seq);
            prop_assert!(last.is_none_or(|l| l < *seq));
            last = Some(*seq);
            expect_start = range.end;
        }
        prop_assert_eq!(expect_start, out.valid_len);
        match out.stop {
            StopReason::Clean => prop_assert_eq!(out.valid_len, buf.len()),
            StopReason::TornTail => {
                prop_assert!(out.valid_len < buf.len());
                prop_assert!(decode_record(&buf[out.valid_len..]).unwrap().is_none());
            }
            StopReason::Corrupt { offset, .. } => {
                prop_assert_eq!(offset, out.valid_len);
                prop_assert!(out.valid_len < buf.len());
            }
        }
        Ok(())
    }

    #[test]
    fn empty_is_clean() {
        let out = scan(&[]);
        assert_eq!(
            out,
            ScanOutcome {
                records: vec![],
                valid_len: 0,
                stop: StopReason::Clean
            }
        );
    }

    #[test]
    fn whole_log_is_clean() {
        let (buf, recs) = build(&[
            (1, RecordKind::Message, b"a".to_vec()),
            (2, RecordKind::Ack, vec![]),
            (10, RecordKind::Message, vec![7; 100]),
        ]);
        let out = scan(&buf);
        assert_eq!(out.records, recs);
        assert_eq!(out.valid_len, buf.len());
        assert_eq!(out.stop, StopReason::Clean);
    }

    #[test]
    fn non_increasing_sequence_is_corrupt() {
        for second in [5, 4, 0] {
            let (buf, recs) = build(&[
                (5, RecordKind::Message, b"a".to_vec()),
                (second, RecordKind::Message, b"b".to_vec()),
                (9, RecordKind::Message, b"c".to_vec()),
            ]);
            let out = scan(&buf);
            assert_eq!(out.records, recs[..1], "second seq {second}");
            assert_eq!(out.valid_len, recs[0].1.end);
            assert_eq!(
                out.stop,
                StopReason::Corrupt {
                    offset: recs[0].1.end,
                    reason: CorruptReason::SequenceNotIncreasing
                }
            );
        }
    }

    #[test]
    fn oversize_length_is_corrupt_not_torn() {
        let (mut buf, recs) = build(&[(1, RecordKind::Message, b"ok".to_vec())]);
        // A second header that claims a 4 GiB body and stops after the length.
        buf.extend_from_slice(&[0x11, 0xCE, 1, 0, 0xFF, 0xFF, 0xFF, 0xFF]);
        let out = scan(&buf);
        assert_eq!(out.records, recs);
        assert_eq!(
            out.stop,
            StopReason::Corrupt {
                offset: recs[0].1.end,
                reason: CorruptReason::LengthOverBound
            }
        );
    }

    #[test]
    fn zero_fill_after_records_is_corrupt_at_its_start() {
        let (mut buf, recs) = build(&[(1, RecordKind::Message, b"ok".to_vec())]);
        buf.extend_from_slice(&[0; 64]);
        let out = scan(&buf);
        assert_eq!(out.valid_len, recs[0].1.end);
        assert_eq!(
            out.stop,
            StopReason::Corrupt {
                offset: recs[0].1.end,
                reason: CorruptReason::BadMagic
            }
        );
    }

    #[test]
    fn segment_scan_skips_a_corrupt_middle_record_and_measures_a_torn_tail() {
        let (mut buf, recs) = build(&[
            (1, RecordKind::Message, b"one".to_vec()),
            (2, RecordKind::Message, b"two".to_vec()),
            (3, RecordKind::Message, b"three".to_vec()),
            (4, RecordKind::Message, b"four".to_vec()),
        ]);
        buf[recs[1].1.start + HEADER_LEN] ^= 0x10;
        let full = buf.len();
        buf.truncate(full - 2);
        buf.extend_from_slice(&[0; 100]);
        let out = scan_segment(&buf, None);
        let seqs: Vec<u64> = out.records.iter().map(|(s, _)| *s).collect();
        assert_eq!(seqs, [1, 3]);
        assert_eq!(
            out.corrupt,
            [CorruptRange {
                offset: recs[1].1.start,
                len: recs[1].1.len(),
                reason: CorruptReason::BadCrc
            }]
        );
        assert_eq!(out.data_end, recs[2].1.end);
        assert_eq!(out.torn_bytes, recs[3].1.len() - 2);
    }

    proptest! {
        /// Flipping a bit anywhere in one record of a zero-padded segment
        /// loses that record alone (or reads as a torn tail if it is the last).
        #[test]
        fn segment_scan_loses_only_the_flipped_record((buf, recs) in log(1), at in any::<prop::sample::Index>(), bit in 0..8u8) {
            let at = at.index(buf.len());
            let mut bad = buf.clone();
            bad[at] ^= 1 << bit;
            bad.extend_from_slice(&[0; 32]);
            let out = scan_segment(&bad, None);
            let hit = recs.iter().position(|(_, r)| r.contains(&at)).unwrap();
            let want: Vec<u64> = recs.iter().enumerate().filter(|(i, _)| *i != hit).map(|(_, (s, _))| *s).collect();
            let got: Vec<u64> = out.records.iter().map(|(s, _)| *s).collect();
            prop_assert_eq!(got, want);
            if hit + 1 == recs.len() {
                prop_assert!(out.corrupt.is_empty());
            } else {
                prop_assert_eq!(out.corrupt.len(), 1);
                prop_assert_eq!(out.corrupt[0].offset, recs[hit].1.start);
                prop_assert_eq!(out.torn_bytes, 0);
            }
        }
    }

    proptest! {
        /// Cutting a valid log anywhere keeps exactly the whole records
        /// before the cut, and reports Clean on a boundary, TornTail inside a record.
        #[test]
        fn any_truncation_yields_the_prefix_of_whole_records((buf, recs) in log(0), cut in any::<prop::sample::Index>()) {
            let cut = cut.index(buf.len() + 1);
            let out = scan(&buf[..cut]);
            check_invariants(&buf[..cut], &out)?;
            let whole: Vec<_> = recs.iter().filter(|(_, r)| r.end <= cut).cloned().collect();
            let valid_len = whole.last().map_or(0, |(_, r)| r.end);
            prop_assert_eq!(&out.records, &whole);
            prop_assert_eq!(out.valid_len, valid_len);
            let want = if cut == valid_len { StopReason::Clean } else { StopReason::TornTail };
            prop_assert_eq!(out.stop, want);
        }

        /// Changing any one byte of a valid log stops the scan at the record
        /// holding that byte: everything before it is kept unchanged and
        /// nothing from it on is accepted. A changed length field may also
        /// read as a torn tail; any other byte is reported as corrupt.
        #[test]
        fn any_byte_change_is_detected((buf, recs) in log(1), at in any::<prop::sample::Index>(), mask in 1..=255u8) {
            let at = at.index(buf.len());
            let mut bad = buf.clone();
            bad[at] ^= mask;
            let out = scan(&bad);
            check_invariants(&bad, &out)?;

            let hit = recs.iter().position(|(_, r)| r.contains(&at)).unwrap();
            let start = recs[hit].1.start;
            prop_assert_eq!(&out.records, &recs[..hit].to_vec());
            prop_assert_eq!(out.valid_len, start);
            let within = at - start;
            match out.stop {
                StopReason::Corrupt { offset, reason } => {
                    prop_assert_eq!(offset, start);
                    let want = match within {
                        0..2 => CorruptReason::BadMagic,
                        4..8 => {
                            prop_assert!(matches!(reason, CorruptReason::BadCrc | CorruptReason::LengthOverBound), "{:?}", reason);
                            reason
                        }
                        _ => CorruptReason::BadCrc,
                    };
                    prop_assert_eq!(reason, want, "byte {} of record {}", within, hit);
                }
                StopReason::TornTail => prop_assert!((4..8).contains(&within), "byte {} of record {} read as torn", within, hit),
                StopReason::Clean => prop_assert!(false, "changed byte {} of record {} went unnoticed", within, hit),
            }
        }

        /// Arbitrary bytes never panic and always satisfy the scan's invariants.
        #[test]
        fn garbage_never_panics(buf in proptest::collection::vec(any::<u8>(), 0..1024)) {
            let out = scan(&buf);
            check_invariants(&buf, &out)?;
        }

        /// Garbage after a valid log, or starting with the magic so that the
        /// decoder reads further into it, keeps the log and never panics.
        #[test]
        fn valid_log_then_garbage((buf, recs) in log(0), junk in proptest::collection::vec(any::<u8>(), 0..256), magic in any::<bool>()) {
            let mut all = buf.clone();
            if magic {
                all.extend_from_slice(&crate::record::MAGIC.to_le_bytes());
            }
            all.extend_from_slice(&junk);
            let out = scan(&all);
            check_invariants(&all, &out)?;
            prop_assert!(out.valid_len >= buf.len());
            prop_assert_eq!(&out.records[..recs.len()], &recs[..]);
        }
    }
}
