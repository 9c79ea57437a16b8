//! Message payloads: built once per sender, only the timestamps change.
//!
//! Every payload starts with [`STAMP_LEN`] bytes: the actual send time and
//! the intended send time (little-endian u64 nanoseconds since the
//! process-local epoch, see [`crate::clock`]). The rest is filler:
//!
//! - `random`: incompressible bytes. Each sender builds a pool of at least
//!   [`POOL_BYTES`] of distinct payload bodies, each from its own splitmix64
//!   stream (seeded from a mix of the run seed, the sender and the entry),
//!   and cycles through it. Two messages share filler only when they are a
//!   whole pool apart, far beyond any batch (64 KiB by default), so batch
//!   compression gains nothing, as with the incompressible payloads a peer
//!   broker would carry.
//! - `text`: JSON-like telemetry records (device, timestamps, readings),
//!   [`TEXT_ENTRIES`] distinct ones per sender: repetitive the way real
//!   telemetry is, so zstd on batches has something to find.
//!
//! Per message the bench copies one pool entry into a shared arena and
//! patches the stamps: one memcpy, no allocation per message.

use bytes::{Bytes, BytesMut};
use std::fmt::Write as _;

/// Bytes at the start of each payload holding the two timestamps.
pub const STAMP_LEN: usize = 16;
/// Smallest random pool per sender.
pub const POOL_BYTES: usize = 4 << 20;
/// Largest random pool per sender.
const POOL_MAX_BYTES: usize = 64 << 20;
/// Distinct text records per sender.
pub const TEXT_ENTRIES: usize = 256;
/// Size of the arena payloads are carved from.
const ARENA_BYTES: usize = 256 << 10;

/// What fills a payload after its timestamps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fill {
    /// Incompressible pseudo-random bytes.
    Random,
    /// JSON-like telemetry text.
    Text,
}

impl Fill {
    /// Lower-case name, as on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Fill::Random => "random",
            Fill::Text => "text",
        }
    }
}

/// splitmix64: a fast PRNG whose streams from different seeds are
/// unrelated (each seed is first mixed, so seeds 1, 2, 3 do not give
/// shifted copies of one sequence).
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A stream from `seed` (mixed first).
    pub fn new(seed: u64) -> Self {
        Self(mix64(seed))
    }

    /// The next 64 random bits.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix64(self.0)
    }

    /// A float in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Fills `out` with random bytes.
    pub fn fill(&mut self, out: &mut [u8]) {
        let mut chunks = out.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let last = self.next_u64().to_le_bytes();
        rest.copy_from_slice(&last[..rest.len()]);
    }
}

/// The splitmix64 finaliser (a bijective 64-bit mixer).
#[inline]
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A seed for `(run, sender, entry)` whose streams are unrelated.
pub fn seed(run: u64, sender: u64, entry: u64) -> u64 {
    mix64(run ^ mix64(sender.wrapping_add(0x632B_E59B_D9B4_E019) ^ mix64(entry)))
}

/// One sender's payloads: a pool of bodies and an arena to stamp copies in.
pub struct PayloadPool {
    size: usize,
    body: usize,
    pool: Vec<u8>,
    entries: usize,
    next: usize,
    arena: BytesMut,
}

impl PayloadPool {
    /// Payloads of `size` bytes (at least [`STAMP_LEN`]) for sender
    /// `sender` of run `run_seed`.
    pub fn new(fill: Fill, size: usize, run_seed: u64, sender: u64) -> Self {
        assert!(size >= STAMP_LEN, "payload size below {STAMP_LEN}");
        let body = size - STAMP_LEN;
        let entries = match fill {
            _ if body == 0 => 1,
            Fill::Random => POOL_BYTES
                .div_ceil(body)
                .max(2)
                .min((POOL_MAX_BYTES / body).max(2)),
            Fill::Text => TEXT_ENTRIES,
        };
        let mut pool = vec![0u8; body * entries];
        if body > 0 {
            for (i, entry) in pool.chunks_exact_mut(body).enumerate() {
                let mut rng = SplitMix64::new(seed(run_seed, sender, i as u64));
                match fill {
                    Fill::Random => rng.fill(entry),
                    Fill::Text => text_record(&mut rng, sender, i, entry),
                }
            }
        }
        Self {
            size,
            body,
            pool,
            entries,
            next: 0,
            arena: BytesMut::new(),
        }
    }

    /// Payload size in bytes.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Distinct bodies in the pool.
    pub fn entries(&self) -> usize {
        self.entries
    }

    /// The next payload, stamped with `sent_ns` and `intended_ns`.
    #[inline]
    pub fn make(&mut self, sent_ns: u64, intended_ns: u64) -> Bytes {
        if self.arena.capacity() - self.arena.len() < self.size {
            self.arena = BytesMut::with_capacity(ARENA_BYTES.max(self.size));
        }
        self.arena.extend_from_slice(&sent_ns.to_le_bytes());
        self.arena.extend_from_slice(&intended_ns.to_le_bytes());
        let off = self.next * self.body;
        self.arena
            .extend_from_slice(&self.pool[off..off + self.body]);
        self.next += 1;
        if self.next == self.entries {
            self.next = 0;
        }
        self.arena.split().freeze()
    }
}

/// The (actual, intended) send times a payload carries.
#[inline]
pub fn read_stamps(payload: &[u8]) -> Option<(u64, u64)> {
    let sent = u64::from_le_bytes(payload.get(0..8)?.try_into().ok()?);
    let intended = u64::from_le_bytes(payload.get(8..16)?.try_into().ok()?);
    Some((sent, intended))
}

const SITES: [&str; 6] = [
    "eu-west-1",
    "eu-central-2",
    "us-east-1",
    "ap-south-1",
    "sa-east-1",
    "af-south-1",
];
const STATUS: [&str; 4] = ["ok", "ok", "warn", "degraded"];
const METRICS: [(&str, f64, f64); 6] = [
    ("temp_c", -10.0, 45.0),
    ("humidity_pct", 5.0, 95.0),
    ("pressure_hpa", 960.0, 1040.0),
    ("co2_ppm", 380.0, 2200.0),
    ("vibration_mm_s", 0.0, 12.0),
    ("current_a", 0.0, 32.0),
];

/// Fills `out` with a telemetry record, cut to length.
fn text_record(rng: &mut SplitMix64, sender: u64, entry: usize, out: &mut [u8]) {
    let mut s = String::with_capacity(out.len() + 256);
    let r = |rng: &mut SplitMix64, lo: f64, hi: f64| lo + (hi - lo) * rng.next_f64();
    let _ = write!(
        s,
        "{{\"device\":\"edge-{:03}-{:05}\",\"seq\":{},\"ts\":\"2026-11-25T{:02}:{:02}:{:02}.{:03}Z\",\
         \"site\":\"{}\",\"fw\":\"1.{}.{}\",\"status\":\"{}\",\"battery_v\":{:.3},\"rssi_dbm\":{},\
         \"readings\":[",
        sender,
        rng.next_u64() % 100_000,
        entry,
        rng.next_u64() % 24,
        rng.next_u64() % 60,
        rng.next_u64() % 60,
        rng.next_u64() % 1000,
        SITES[(rng.next_u64() % SITES.len() as u64) as usize],
        rng.next_u64() % 9,
        rng.next_u64() % 40,
        STATUS[(rng.next_u64() % STATUS.len() as u64) as usize],
        r(rng, 3.1, 4.2),
        -30 - (rng.next_u64() % 70) as i64,
    );
    let mut first = true;
    while s.len() < out.len() {
        let (name, lo, hi) = METRICS[(rng.next_u64() % METRICS.len() as u64) as usize];
        let _ = write!(
            s,
            "{}{{\"m\":\"{name}\",\"v\":{:.2},\"q\":{}}}",
            if first { "" } else { "," },
            r(rng, lo, hi),
            rng.next_u64() % 3
        );
        first = false;
    }
    s.push_str("]}");
    out.copy_from_slice(&s.as_bytes()[..out.len()]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_round_trip_and_sizes_hold() {
        for fill in [Fill::Random, Fill::Text] {
            for size in [16, 17, 128, 1024, 70_000] {
                let mut p = PayloadPool::new(fill, size, 7, 1);
                for i in 0..3 {
                    let b = p.make(100 + i, 50 + i);
                    assert_eq!(b.len(), size);
                    assert_eq!(read_stamps(&b), Some((100 + i, 50 + i)));
                }
            }
        }
        assert_eq!(read_stamps(&[0; 15]), None);
    }

    #[test]
    fn random_bodies_differ_between_messages_and_senders() {
        let mut a = PayloadPool::new(Fill::Random, 128, 1, 0);
        let mut b = PayloadPool::new(Fill::Random, 128, 1, 1);
        let a1 = a.make(0, 0);
        let a2 = a.make(0, 0);
        let b1 = b.make(0, 0);
        assert_ne!(a1[16..], a2[16..]);
        assert_ne!(a1[16..], b1[16..]);
        assert!(a.entries() * 112 >= POOL_BYTES);
    }

    #[test]
    fn text_is_printable() {
        let mut p = PayloadPool::new(Fill::Text, 300, 3, 2);
        let b = p.make(0, 0);
        let body = std::str::from_utf8(&b[16..]).unwrap();
        assert!(body.starts_with("{\"device\":\"edge-002-"), "{body}");
        assert!(body.chars().all(|c| !c.is_control()));
    }
}
