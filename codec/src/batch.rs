//! Batch frames: many messages of one lane in one frame, zstd-compressed
//! when that gains.
//!
//! Body of a batch frame (after the length prefix and type byte):
//!
//! ```text
//! u8   lane
//! u8   flags        bit0: data is one zstd frame; bit1: a hops byte follows raw_len
//! u16  count        messages in the batch, 1..=Limits::max_batch_messages
//! u32  raw_len      bytes of the concatenated messages, <= Limits::max_frame
//! u8   hops         only with flag bit1: 1..=255, subtracted from every message's TTL
//! ...  data         the messages back to back, or their zstd compression
//! ```
//!
//! A compressed batch is refused before decompression if its zstd header
//! claims another size than `raw_len`, and decompression writes into a
//! buffer of exactly `raw_len` bytes, so no frame can expand past the bound.
//!
//! The hop count lets a relay forward a batch whole (its data as the sender
//! encoded and compressed it) and still lower every message's TTL: it
//! rewrites only the header. A decoder hands out each message with its
//! effective TTL, the message's TTL byte minus `hops`
//! ([`Envelope::ttl`]).

use crate::error::DecodeError;
use crate::frame::{FrameType, LEN_PREFIX};
use crate::key::Keypair;
use crate::limits::Limits;
use crate::message::{Envelope, Lane, Message};
use crate::wire::Reader;
use bytes::{BufMut, Bytes, BytesMut};

const FLAG_ZSTD: u8 = 0x01;
const FLAG_HOPS: u8 = 0x02;
const FLAGS_KNOWN: u8 = FLAG_ZSTD | FLAG_HOPS;
/// Bytes of a batch header without a hop count, after the frame's length
/// prefix and type byte.
pub const BATCH_HEADER_LEN: usize = 8;
/// Bytes of a batch frame before its data when it has no hop count: prefix,
/// type, batch header.
pub const FRAME_HEADER_LEN: usize = LEN_PREFIX + 1 + BATCH_HEADER_LEN;
/// Bytes of a batch frame before its data when it has a hop count.
pub const MAX_FRAME_HEADER_LEN: usize = FRAME_HEADER_LEN + 1;

/// A decoded batch frame whose messages are not yet parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchFrame {
    /// The lane of every message in it.
    pub lane: Lane,
    /// Whether `data` is zstd-compressed.
    pub compressed: bool,
    /// Relay hops the batch has been forwarded whole since its messages'
    /// TTL bytes were written: every message's TTL is its TTL byte minus
    /// this. 0 (no hops byte on the wire) for a batch as a sender encoded
    /// it.
    pub hops: u8,
    /// Number of messages.
    pub count: u16,
    /// Length of the messages uncompressed.
    pub raw_len: u32,
    /// The messages, or their compression.
    pub data: Bytes,
}

/// The bytes of a batch frame before its data: 13, or 14 with a hop count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchFrameHeader {
    bytes: [u8; MAX_FRAME_HEADER_LEN],
    len: u8,
}

impl BatchFrameHeader {
    /// The header bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

impl std::ops::Deref for BatchFrameHeader {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl BatchFrame {
    /// Bytes of the batch header: 8, or 9 with a hop count.
    fn header_len(&self) -> usize {
        BATCH_HEADER_LEN + usize::from(self.hops > 0)
    }

    fn flags(&self) -> u8 {
        (if self.compressed { FLAG_ZSTD } else { 0 }) | (if self.hops > 0 { FLAG_HOPS } else { 0 })
    }

    /// Bytes of the whole frame: length prefix, type, header and data.
    pub fn frame_len(&self) -> usize {
        LEN_PREFIX + 1 + self.header_len() + self.data.len()
    }

    /// The bytes of this batch's frame that come before `data` (length
    /// prefix, type byte and batch header, with the hop count if there is
    /// one), so a relay can forward a batch without copying or
    /// recompressing its data.
    pub fn frame_header(&self) -> BatchFrameHeader {
        let mut bytes = [0u8; MAX_FRAME_HEADER_LEN];
        let len = (1 + self.header_len() + self.data.len()) as u32;
        bytes[..4].copy_from_slice(&len.to_le_bytes());
        bytes[4] = FrameType::Batch as u8;
        bytes[5] = self.lane as u8;
        bytes[6] = self.flags();
        bytes[7..9].copy_from_slice(&self.count.to_le_bytes());
        bytes[9..13].copy_from_slice(&self.raw_len.to_le_bytes());
        bytes[13] = self.hops;
        BatchFrameHeader {
            bytes,
            len: (LEN_PREFIX + 1 + self.header_len()) as u8,
        }
    }

    pub(crate) fn encode_body(&self, out: &mut BytesMut) {
        out.put_slice(&self.frame_header()[LEN_PREFIX + 1..]);
        out.put_slice(&self.data);
    }

    pub(crate) fn decode_body(body: Bytes, limits: &Limits) -> Result<Self, DecodeError> {
        let mut r = Reader::new(&body);
        let lane = Lane::from_u8(r.u8()?)?;
        let flags = r.u8()?;
        if flags & !FLAGS_KNOWN != 0 {
            return Err(DecodeError::Invalid {
                field: "batch flags",
                value: flags as u64,
            });
        }
        let count = r.u16()?;
        let max_count = limits.max_batch_messages.min(Limits::MAX_BATCH_CAP);
        if count == 0 || count as usize > max_count {
            return Err(DecodeError::TooLarge {
                what: "batch count",
                got: count as usize,
                limit: max_count,
            });
        }
        let raw_len = r.u32()?;
        let max_raw = limits.max_frame.min(Limits::MAX_FRAME_CAP);
        if raw_len as usize > max_raw {
            return Err(DecodeError::TooLarge {
                what: "batch raw length",
                got: raw_len as usize,
                limit: max_raw,
            });
        }
        let hops = if flags & FLAG_HOPS != 0 { r.u8()? } else { 0 };
        if flags & FLAG_HOPS != 0 && hops == 0 {
            // One encoding per batch: no hops is written as no hops byte.
            return Err(DecodeError::Invalid {
                field: "batch hops",
                value: 0,
            });
        }
        let compressed = flags & FLAG_ZSTD != 0;
        let data = body.slice(body.len() - r.remaining()..);
        if !compressed && data.len() != raw_len as usize {
            return Err(DecodeError::Invalid {
                field: "batch raw length",
                value: raw_len as u64,
            });
        }
        Ok(Self {
            lane,
            compressed,
            hops,
            count,
            raw_len,
            data,
        })
    }
}

/// What one finished batch cost on the wire.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BatchStats {
    /// Messages in the batch.
    pub count: usize,
    /// Bytes of the messages.
    pub raw_bytes: usize,
    /// Bytes of the whole frame as written (prefix included).
    pub wire_bytes: usize,
    /// Whether it was compressed.
    pub compressed: bool,
}

/// Builds batch frames, reusing its buffer and its zstd context across
/// batches so the steady state allocates nothing. A batch is compressed
/// when it is at least `compress_min` bytes and zstd saves at least 20 %;
/// after a batch that does not, the encoder sends the next 1, 2, 4 … 64
/// batches raw without trying, so incompressible traffic costs almost no
/// compression CPU.
///
/// Traffic that compresses, but not much (under [`FAST_BELOW_RATIO`]:
/// random payloads whose repeated message headers are all zstd finds) is
/// compressed at [`FAST_LEVEL`] instead of a fast configured level (at most
/// [`ADAPTIVE_MAX_LEVEL`]): there zstd's fast strategy costs about 0.6× the
/// CPU for about 5 % more bytes, while compressible traffic keeps the
/// configured level and its ratio. Every [`PROBE_EVERY`]th attempt uses
/// the configured level again, to notice traffic that turned compressible.
pub struct BatchEncoder {
    body: BytesMut,
    count: usize,
    compress_min: usize,
    compressor: zstd::bulk::Compressor<'static>,
    /// The configured level.
    level: i32,
    /// Whether the compressor is set to [`FAST_LEVEL`].
    fast: bool,
    scratch: Vec<u8>,
    /// Batches to send raw before trying zstd again, after one that did
    /// not gain enough.
    skip: u32,
    /// The next skip length (doubles up to [`MAX_SKIP`]).
    backoff: u32,
    attempts: u64,
}

/// A compressed batch is sent only if it is at most this fraction of the
/// raw bytes (saves at least 20 %): below that, the receiver's
/// decompression costs more than the bytes saved.
const MIN_GAIN_NUM: usize = 4;
const MIN_GAIN_DEN: usize = 5;
/// Longest run of batches sent raw without trying zstd, after batches that
/// did not compress: traffic that turns compressible is noticed within it.
const MAX_SKIP: u32 = 64;
/// The zstd level for traffic that compresses less than
/// [`FAST_BELOW_RATIO`] at the configured level. Measured on batches of
/// 500 messages of 128 random bytes: level 1 compresses 1.87× at about
/// 1.0 GB/s, level -5 1.78× at about 1.7 GB/s.
pub const FAST_LEVEL: i32 = -5;
/// Below this ratio (raw over compressed) at the configured level, a batch
/// encoder switches to [`FAST_LEVEL`]. Compressible text (about 12× at
/// level 1, 5× at -5) stays well above it.
pub const FAST_BELOW_RATIO: f64 = 2.5;
/// Highest configured level the encoder adapts: someone who chose a slow
/// level chose ratio over CPU, and gets it on every batch.
pub const ADAPTIVE_MAX_LEVEL: i32 = 3;
/// While at [`FAST_LEVEL`], every this many compression attempts one is
/// made at the configured level, to see whether the traffic changed.
pub const PROBE_EVERY: u64 = 32;

impl BatchEncoder {
    /// An encoder compressing at zstd `level` the batches of at least
    /// `compress_min` bytes (`usize::MAX` turns compression off).
    pub fn new(level: i32, compress_min: usize) -> std::io::Result<Self> {
        Ok(Self {
            body: BytesMut::new(),
            count: 0,
            compress_min,
            compressor: zstd::bulk::Compressor::new(level)?,
            level,
            fast: false,
            scratch: Vec::new(),
            skip: 0,
            backoff: 0,
            attempts: 0,
        })
    }

    /// Messages pushed since the last finish.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Bytes pushed since the last finish.
    pub fn len_bytes(&self) -> usize {
        self.body.len()
    }

    /// How many batches zstd was run on (some of them sent raw anyway
    /// because they did not gain enough).
    pub fn compress_attempts(&self) -> u64 {
        self.attempts
    }

    /// Whether nothing is pushed.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Whether batches are being compressed at [`FAST_LEVEL`] rather than
    /// the configured level.
    pub fn is_fast(&self) -> bool {
        self.fast
    }

    /// Sets the compressor to [`FAST_LEVEL`] or back to the configured
    /// level. zstd accepts every level between its minimum and maximum, so
    /// a failure would leave the previous level, which is still correct.
    fn set_fast(&mut self, fast: bool) {
        if fast != self.fast {
            let level = if fast { FAST_LEVEL } else { self.level };
            if self.compressor.set_compression_level(level).is_ok() {
                self.fast = fast;
            }
        }
    }

    /// Whether one more message would exceed the count bound of a batch.
    pub fn is_full(&self) -> bool {
        self.count >= Limits::MAX_BATCH_CAP
    }

    /// Adds a message with the authenticator it holds.
    pub fn push(&mut self, msg: &Message) {
        msg.encode(&mut self.body);
        self.count += 1;
    }

    /// Adds a message signed by `key`.
    pub fn push_signed(&mut self, msg: &Message, key: &Keypair) {
        msg.encode_signed(key, &mut self.body);
        self.count += 1;
    }

    /// Adds an already-encoded message as it is, with its TTL byte set to
    /// the envelope's [`ttl`](Envelope::ttl) (which differs from the byte
    /// it arrived with after a relay hop): how a relay forwards without
    /// re-encoding.
    pub fn push_envelope(&mut self, env: &Envelope) {
        self.body.put_u8(env.ttl());
        self.body.extend_from_slice(&env.raw()[1..]);
        self.count += 1;
    }

    /// Adds `count` already-encoded messages laid end to end in `run`, as
    /// they are.
    pub fn push_encoded(&mut self, run: &[u8], count: usize) {
        self.body.extend_from_slice(run);
        self.count += count;
    }

    /// Appends the batch frame of everything pushed to `out` and starts a new
    /// batch. Compresses when the batch is at least `compress_min` bytes and
    /// the compression is smaller. Does nothing for an empty batch.
    ///
    /// # Panics
    /// If more than 65535 messages were pushed (check [`is_full`](Self::is_full)).
    pub fn finish(&mut self, lane: Lane, out: &mut BytesMut) -> BatchStats {
        if self.count == 0 {
            return BatchStats::default();
        }
        let count = u16::try_from(self.count).expect("batch count checked with is_full");
        let raw_len = self.body.len();
        let mut compressed = false;
        if raw_len >= self.compress_min {
            if self.skip > 0 {
                self.skip -= 1;
            } else {
                self.attempts += 1;
                if self.fast && self.attempts.is_multiple_of(PROBE_EVERY) {
                    self.set_fast(false);
                }
                self.scratch.clear();
                self.scratch
                    .reserve(zstd::zstd_safe::compress_bound(raw_len));
                let n = self
                    .compressor
                    .compress_to_buffer(&self.body[..], &mut self.scratch)
                    .ok();
                compressed = n.is_some_and(|n| n * MIN_GAIN_DEN <= raw_len * MIN_GAIN_NUM);
                if let Some(n) = n.filter(|_| !self.fast) {
                    // Only a ratio at the configured level decides.
                    let barely = (raw_len as f64) < FAST_BELOW_RATIO * n as f64;
                    self.set_fast(barely && self.level <= ADAPTIVE_MAX_LEVEL);
                }
                // Incompressible traffic stops paying for zstd on every
                // batch: back off, doubling, and try again now and then.
                if compressed {
                    self.backoff = 0;
                } else {
                    self.backoff = (self.backoff * 2).clamp(1, MAX_SKIP);
                    self.skip = self.backoff;
                }
            }
        }
        let data: &[u8] = if compressed {
            &self.scratch
        } else {
            &self.body
        };
        let start = out.len();
        let len = 1 + BATCH_HEADER_LEN + data.len();
        out.reserve(LEN_PREFIX + len);
        out.put_u32_le(len as u32);
        out.put_u8(FrameType::Batch as u8);
        out.put_u8(lane as u8);
        out.put_u8(if compressed { FLAG_ZSTD } else { 0 });
        out.put_u16_le(count);
        out.put_u32_le(raw_len as u32);
        out.put_slice(data);
        let stats = BatchStats {
            count: self.count,
            raw_bytes: raw_len,
            wire_bytes: out.len() - start,
            compressed,
        };
        self.body.clear();
        self.count = 0;
        stats
    }
}

/// Turns batch frames back into messages, reusing one zstd context.
pub struct BatchDecoder {
    limits: Limits,
    decompressor: zstd::bulk::Decompressor<'static>,
}

impl BatchDecoder {
    /// A decoder enforcing `limits`.
    pub fn new(limits: Limits) -> std::io::Result<Self> {
        Ok(Self {
            limits: limits.clamped(),
            decompressor: zstd::bulk::Decompressor::new()?,
        })
    }

    /// The messages of `batch`, decompressed within `raw_len` and parsed
    /// lazily: the iterator yields an error (and then stops) at the first
    /// bad message, if the batch holds fewer or more messages than its
    /// count, or if a message's lane differs from the batch's.
    pub fn messages(&mut self, batch: &BatchFrame) -> Result<BatchMessages, DecodeError> {
        let buf = if batch.compressed {
            let raw_len = batch.raw_len as usize;
            match zstd::zstd_safe::get_frame_content_size(&batch.data) {
                Ok(Some(n)) if n == raw_len as u64 => {}
                Ok(Some(n)) => {
                    return Err(DecodeError::Decompress(format!(
                        "zstd frame claims {n} bytes, batch header {raw_len}"
                    )));
                }
                _ => {
                    return Err(DecodeError::Decompress(
                        "zstd frame without a content size".into(),
                    ));
                }
            }
            let mut out = Vec::with_capacity(raw_len);
            let n = self
                .decompressor
                .decompress_to_buffer(&batch.data[..], &mut out)
                .map_err(|e| DecodeError::Decompress(e.to_string()))?;
            if n != raw_len {
                return Err(DecodeError::Decompress(format!(
                    "expanded to {n} bytes, batch header says {raw_len}"
                )));
            }
            Bytes::from(out)
        } else {
            batch.data.clone()
        };
        Ok(BatchMessages {
            buf,
            left: batch.count as usize,
            lane: batch.lane,
            hops: batch.hops,
            limits: self.limits,
            failed: false,
        })
    }
}

/// The messages of one batch, parsed one at a time, each with its
/// effective TTL (its TTL byte minus the batch's hops).
pub struct BatchMessages {
    buf: Bytes,
    left: usize,
    lane: Lane,
    hops: u8,
    limits: Limits,
    failed: bool,
}

impl Iterator for BatchMessages {
    type Item = Result<Envelope, DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        if self.left == 0 {
            if self.buf.is_empty() {
                return None;
            }
            self.failed = true;
            return Some(Err(DecodeError::Trailing(self.buf.len())));
        }
        self.left -= 1;
        let r = Envelope::parse(&mut self.buf, &self.limits).and_then(|e| {
            if e.lane() != self.lane {
                return Err(DecodeError::Invalid {
                    field: "message lane in batch",
                    value: e.lane() as u64,
                });
            }
            // A relay raises the hop count only over messages with a hop
            // left, so a TTL byte below it was never forwarded honestly.
            match e.ttl().checked_sub(self.hops) {
                Some(ttl) => Ok(e.with_ttl(ttl)),
                None => Err(DecodeError::Invalid {
                    field: "message TTL below the batch's hops",
                    value: e.ttl() as u64,
                }),
            }
        });
        self.failed = r.is_err();
        Some(r)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (0, Some(self.left + 1))
    }
}
