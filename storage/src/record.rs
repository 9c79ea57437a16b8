//! The on-disk log record: a fixed 20-byte header followed by the body.
//!
//! ```text
//! offset  size  field
//!      0     2  magic     0xCE11, little-endian (bytes 11 CE)
//!      2     1  kind      RecordKind (1 = Message, 2 = Ack)
//!      3     1  flags     reserved, must be 0
//!      4     4  length    body length in bytes, u32 LE, at most MAX_RECORD_BODY
//!      8     4  crc       CRC-32 (IEEE) of bytes 2..8, bytes 12..20 and the body, u32 LE
//!     12     8  sequence  u64 LE, strictly increasing along a log
//!     20     n  body      `length` bytes
//! ```
//!
//! The CRC is the IEEE CRC-32 (the zlib/Ethernet polynomial, as computed by
//! `crc32fast`), not CRC-32C. It covers every header field except the magic
//! (which is compared exactly) and the CRC itself, so that a change to any
//! byte of a record, the sequence number included, is detected. CRC-32 detects
//! every error burst of up to 32 bits, so any single changed byte is always
//! caught; a changed length field makes the CRC cover a different span and is
//! caught with probability 1 − 2⁻³², or reads as a torn tail when the new
//! length runs past the end of the input.
//!
//! Records are self-delimiting, so a log is simply records back to back; see
//! [`crate::recovery::scan`] for walking one.

use crate::StorageError;

/// Magic number at the start of every record (stored little-endian).
pub const MAGIC: u16 = 0xCE11;

/// Size of the fixed record header in bytes.
pub const HEADER_LEN: usize = 20;

/// Largest body a record may carry: 16 MiB.
///
/// [`encode_record`] refuses longer bodies and [`decode_record`] refuses a
/// length field over this bound as soon as it has been read, before waiting
/// for (or allocating room for) the body.
pub const MAX_RECORD_BODY: usize = 16 * 1024 * 1024;

const MAGIC_BYTES: [u8; 2] = MAGIC.to_le_bytes();
const KIND_AT: usize = 2;
const FLAGS_AT: usize = 3;
const LEN_AT: usize = 4;
const CRC_AT: usize = 8;
const SEQ_AT: usize = 12;

/// What a record means to the log. Stored as one byte; 0 is never a valid kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum RecordKind {
    /// A durable message accepted from the previous hop; the body is the
    /// message as received.
    Message = 1,
    /// The next hop acknowledged a logged message; the body names it. An
    /// acknowledged message may be dropped by compaction.
    Ack = 2,
}

impl RecordKind {
    /// The kind stored as `byte`, or `None` if this build defines no such kind.
    pub const fn from_u8(byte: u8) -> Option<Self> {
        match byte {
            1 => Some(Self::Message),
            2 => Some(Self::Ack),
            _ => None,
        }
    }

    /// The byte this kind is stored as.
    pub const fn as_u8(self) -> u8 {
        self as u8
    }
}

/// A decoded record, borrowing its body from the input buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    /// Sequence number; strictly increasing along a log.
    pub seq: u64,
    /// What the record means.
    pub kind: RecordKind,
    /// The body, at most [`MAX_RECORD_BODY`] bytes.
    pub body: &'a [u8],
}

/// Bytes a record with a body of `body_len` bytes takes on disk
/// (`HEADER_LEN + body_len`).
pub const fn encoded_len(body_len: usize) -> usize {
    HEADER_LEN + body_len
}

/// CRC over a header's kind, flags, length and sequence fields and the body.
fn record_crc(header: &[u8; HEADER_LEN], body: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&header[KIND_AT..CRC_AT]);
    h.update(&header[SEQ_AT..HEADER_LEN]);
    h.update(body);
    h.finalize()
}

/// Appends one record (header and body) to `out`.
///
/// Fails with [`StorageError::BodyTooLarge`] if `body` is longer than
/// [`MAX_RECORD_BODY`]; `out` is then left untouched and nothing is
/// allocated. On success exactly [`encoded_len`]`(body.len())` bytes are
/// appended. The caller keeps `seq` strictly increasing along a log;
/// [`crate::recovery::scan`] stops at the first record that breaks that.
pub fn encode_record(
    seq: u64,
    kind: RecordKind,
    body: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), StorageError> {
    let len = match u32::try_from(body.len()) {
        Ok(len) if body.len() <= MAX_RECORD_BODY => len,
        _ => {
            return Err(StorageError::BodyTooLarge {
                len: body.len(),
                max: MAX_RECORD_BODY,
            });
        }
    };
    let mut header = [0u8; HEADER_LEN];
    header[..KIND_AT].copy_from_slice(&MAGIC_BYTES);
    header[KIND_AT] = kind.as_u8();
    header[FLAGS_AT] = 0;
    header[LEN_AT..CRC_AT].copy_from_slice(&len.to_le_bytes());
    header[SEQ_AT..].copy_from_slice(&seq.to_le_bytes());
    let crc = record_crc(&header, body);
    header[CRC_AT..SEQ_AT].copy_from_slice(&crc.to_le_bytes());

    out.reserve(encoded_len(body.len()));
    out.extend_from_slice(&header);
    out.extend_from_slice(body);
    Ok(())
}

/// Decodes the record at the start of `buf`.
///
/// Returns `Ok(Some((record, consumed)))` for a whole, valid record, where
/// `consumed` is its encoded length; `Ok(None)` when `buf` holds only the
/// beginning of a record whose bytes so far are plausible (a torn tail, or an
/// empty buffer); and an error when the bytes cannot be a record written by
/// [`encode_record`]:
///
/// - [`StorageError::BadMagic`] if the bytes present of the first two are not
///   [`MAGIC`];
/// - [`StorageError::LengthOverBound`] if the length field is over
///   [`MAX_RECORD_BODY`], reported as soon as the length field is present;
/// - [`StorageError::CrcMismatch`] if the CRC does not match;
/// - [`StorageError::UnknownKind`] / [`StorageError::UnknownFlags`] if a
///   record with a valid CRC uses a kind or flag bits this build does not
///   know (for instance one written by a newer version).
///
/// Never panics and never allocates; the record's body borrows from `buf`.
pub fn decode_record(buf: &[u8]) -> Result<Option<(Record<'_>, usize)>, StorageError> {
    let present = buf.len().min(MAGIC_BYTES.len());
    if buf[..present] != MAGIC_BYTES[..present] {
        return Err(StorageError::BadMagic);
    }
    let Some(len_bytes) = buf.get(LEN_AT..CRC_AT) else {
        return Ok(None);
    };
    let len = u32::from_le_bytes([len_bytes[0], len_bytes[1], len_bytes[2], len_bytes[3]]);
    // `len <= MAX_RECORD_BODY` also makes the conversion and sum below exact.
    if len as usize > MAX_RECORD_BODY {
        return Err(StorageError::LengthOverBound {
            len,
            max: MAX_RECORD_BODY,
        });
    }
    let total = encoded_len(len as usize);
    if buf.len() < total {
        return Ok(None);
    }
    let mut header = [0u8; HEADER_LEN];
    header.copy_from_slice(&buf[..HEADER_LEN]);
    let body = &buf[HEADER_LEN..total];

    let stored = u32::from_le_bytes([
        header[CRC_AT],
        header[CRC_AT + 1],
        header[CRC_AT + 2],
        header[CRC_AT + 3],
    ]);
    let computed = record_crc(&header, body);
    if stored != computed {
        return Err(StorageError::CrcMismatch { stored, computed });
    }
    let kind =
        RecordKind::from_u8(header[KIND_AT]).ok_or(StorageError::UnknownKind(header[KIND_AT]))?;
    if header[FLAGS_AT] != 0 {
        return Err(StorageError::UnknownFlags(header[FLAGS_AT]));
    }
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&header[SEQ_AT..]);
    Ok(Some((
        Record {
            seq: u64::from_le_bytes(seq),
            kind,
            body,
        },
        total,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alloc_count::allocations_during;
    use proptest::prelude::*;

    fn encode(seq: u64, kind: RecordKind, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_record(seq, kind, body, &mut out).unwrap();
        out
    }

    /// Rewrites the CRC of the single record in `rec` to match its bytes.
    fn reseal(rec: &mut [u8]) {
        let mut header = [0u8; HEADER_LEN];
        header.copy_from_slice(&rec[..HEADER_LEN]);
        let crc = record_crc(&header, &rec[HEADER_LEN..]);
        rec[CRC_AT..SEQ_AT].copy_from_slice(&crc.to_le_bytes());
    }

    fn kind() -> impl Strategy<Value = RecordKind> {
        prop_oneof![Just(RecordKind::Message), Just(RecordKind::Ack)]
    }

    #[test]
    fn golden_bytes() {
        // Pins the layout; the CRC was checked against Python's zlib.crc32
        // over bytes 2..8, 12..20 and the body.
        let got = encode(0x0102_0304_0506_0708, RecordKind::Message, b"hi");
        let want: [u8; 22] = [
            0x11, 0xCE, // magic
            0x01, // kind
            0x00, // flags
            0x02, 0x00, 0x00, 0x00, // length
            0x5D, 0xB7, 0xEC, 0xAE, // crc
            0x08, 0x07, 0x06, 0x05, 0x04, 0x03, 0x02, 0x01, // seq
            b'h', b'i',
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn round_trip_empty_and_max_body() {
        let rec = encode(7, RecordKind::Ack, b"");
        assert_eq!(rec.len(), HEADER_LEN);
        let (r, used) = decode_record(&rec).unwrap().unwrap();
        assert_eq!(
            (r.seq, r.kind, r.body, used),
            (7, RecordKind::Ack, &b""[..], HEADER_LEN)
        );

        let body = vec![0xA5; MAX_RECORD_BODY];
        let rec = encode(u64::MAX, RecordKind::Message, &body);
        let (r, used) = decode_record(&rec).unwrap().unwrap();
        assert_eq!(used, HEADER_LEN + MAX_RECORD_BODY);
        assert_eq!(r.seq, u64::MAX);
        assert!(r.body == &body[..]);
    }

    #[test]
    fn empty_buffer_is_torn_not_corrupt() {
        assert!(decode_record(&[]).unwrap().is_none());
        assert!(decode_record(&[0x11]).unwrap().is_none());
        assert!(matches!(
            decode_record(&[0x12]),
            Err(StorageError::BadMagic)
        ));
        assert!(matches!(
            decode_record(&[0x11, 0xCF]),
            Err(StorageError::BadMagic)
        ));
    }

    #[test]
    fn oversize_body_refused_without_allocation() {
        let body = vec![0u8; MAX_RECORD_BODY + 1];
        let mut out = vec![1, 2, 3];
        let cap = out.capacity();
        let (res, allocs) =
            allocations_during(|| encode_record(1, RecordKind::Message, &body, &mut out));
        assert!(matches!(
            res,
            Err(StorageError::BodyTooLarge { len, max })
                if len == MAX_RECORD_BODY + 1 && max == MAX_RECORD_BODY
        ));
        assert_eq!(allocs, 0);
        assert_eq!(out, [1, 2, 3]);
        assert_eq!(out.capacity(), cap);
    }

    #[test]
    fn oversize_length_refused_as_soon_as_read_without_allocation() {
        for len in [MAX_RECORD_BODY as u32 + 1, u32::MAX] {
            let mut hdr = vec![0x11, 0xCE, 1, 0];
            hdr.extend_from_slice(&len.to_le_bytes());
            // Only the first 8 bytes: the length is known, the rest is not.
            let (res, allocs) = allocations_during(|| decode_record(&hdr).map(|r| r.is_some()));
            assert!(
                matches!(res, Err(StorageError::LengthOverBound { len: l, .. }) if l == len),
                "{res:?}"
            );
            assert_eq!(allocs, 0);
        }
        // The bound itself is a plausible length: wait for the body.
        let mut hdr = vec![0x11, 0xCE, 1, 0];
        hdr.extend_from_slice(&(MAX_RECORD_BODY as u32).to_le_bytes());
        assert!(decode_record(&hdr).unwrap().is_none());
    }

    #[test]
    fn decode_allocates_nothing() {
        let rec = encode(3, RecordKind::Message, &[9; 100]);
        let (res, allocs) = allocations_during(|| decode_record(&rec).unwrap().unwrap().1);
        assert_eq!(res, rec.len());
        assert_eq!(allocs, 0);
    }

    #[test]
    fn unknown_kind_and_flags_with_valid_crc_are_refused() {
        let mut rec = encode(1, RecordKind::Message, b"x");
        for bad in [0u8, 3, 0xFF] {
            rec[KIND_AT] = bad;
            reseal(&mut rec);
            assert!(
                matches!(decode_record(&rec), Err(StorageError::UnknownKind(k)) if k == bad),
                "kind {bad}"
            );
        }
        rec[KIND_AT] = RecordKind::Ack.as_u8();
        rec[FLAGS_AT] = 0x80;
        reseal(&mut rec);
        assert!(matches!(
            decode_record(&rec),
            Err(StorageError::UnknownFlags(0x80))
        ));
        rec[FLAGS_AT] = 0;
        reseal(&mut rec);
        assert_eq!(
            decode_record(&rec).unwrap().unwrap().0.kind,
            RecordKind::Ack
        );
    }

    #[test]
    fn kind_byte_round_trip() {
        for k in [RecordKind::Message, RecordKind::Ack] {
            assert_eq!(RecordKind::from_u8(k.as_u8()), Some(k));
        }
        assert_eq!(RecordKind::from_u8(0), None);
    }

    /// Every byte of a record, changed to every other value, is refused:
    /// never decoded as a (different) valid record.
    #[test]
    fn every_single_byte_change_is_detected() {
        let rec = encode(0xDEAD_BEEF, RecordKind::Message, b"0123456789");
        for i in 0..rec.len() {
            for mask in 1..=255u8 {
                let mut bad = rec.clone();
                bad[i] ^= mask;
                match decode_record(&bad) {
                    Err(StorageError::BadMagic) => assert!(i < 2, "byte {i}"),
                    Err(StorageError::CrcMismatch { .. }) => assert!(i >= 2, "byte {i}"),
                    Err(StorageError::LengthOverBound { .. }) | Ok(None) => {
                        assert!((LEN_AT..CRC_AT).contains(&i), "byte {i}")
                    }
                    other => panic!("byte {i} ^ {mask:#x}: {other:?}"),
                }
            }
        }
    }

    proptest! {
        #[test]
        fn round_trip(seq in any::<u64>(), kind in kind(), body in proptest::collection::vec(any::<u8>(), 0..512), prefix in proptest::collection::vec(any::<u8>(), 0..8), trailing in proptest::collection::vec(any::<u8>(), 0..8)) {
            let mut out = prefix.clone();
            encode_record(seq, kind, &body, &mut out).unwrap();
            prop_assert_eq!(&out[..prefix.len()], &prefix[..]);
            prop_assert_eq!(out.len(), prefix.len() + encoded_len(body.len()));
            out.extend_from_slice(&trailing);
            let (r, used) = decode_record(&out[prefix.len()..]).unwrap().unwrap();
            prop_assert_eq!(used, encoded_len(body.len()));
            prop_assert_eq!(r, Record { seq, kind, body: &body });
        }

        #[test]
        fn every_proper_prefix_is_torn(seq in any::<u64>(), kind in kind(), body in proptest::collection::vec(any::<u8>(), 0..64)) {
            let rec = encode(seq, kind, &body);
            for cut in 0..rec.len() {
                prop_assert!(decode_record(&rec[..cut]).unwrap().is_none(), "cut {}", cut);
            }
        }

        #[test]
        fn garbage_never_panics(buf in proptest::collection::vec(any::<u8>(), 0..256), magic in any::<bool>()) {
            let mut buf = buf;
            if magic && buf.len() >= 2 {
                buf[..2].copy_from_slice(&MAGIC_BYTES);
            }
            if let Ok(Some((r, used))) = decode_record(&buf) {
                prop_assert!(used <= buf.len());
                prop_assert_eq!(used, encoded_len(r.body.len()));
            }
        }
    }
}
