//! Codec benchmarks: encode, decode, sign, verify, batch verify, and batch
//! compression at 128 B and 1 KiB payloads.
//!
//! Targets (issue 2): encode + decode of a 128 B message under 150 ns on one
//! core; batch compression of 64 KiB of realistic messages at zstd level 1
//! at 300 MB/s or more. Run: `cargo bench -p relay-codec`.

use bytes::{Bytes, BytesMut};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use relay_codec::verify::verify_batch;
use relay_codec::{
    BatchDecoder, BatchEncoder, Destination, Envelope, Frame, Keypair, Lane, Limits, Message,
};
use std::hint::black_box;

const SIZES: [usize; 2] = [128, 1024];

fn keys() -> (Keypair, Keypair) {
    (
        Keypair::from_secret_bytes(&[1; 32]),
        Keypair::from_secret_bytes(&[2; 32]),
    )
}

/// Realistic structured text: JSON-ish telemetry of about `size` bytes.
fn text_payload(i: u64, size: usize) -> Bytes {
    let mut s = String::with_capacity(size + 64);
    let mut n = 0u64;
    while s.len() < size {
        s.push_str(&format!(
            "{{\"cell\":\"sensor-{}\",\"seq\":{},\"temp_c\":{}.{},\"status\":\"ok\",\"tags\":[\"edge\",\"eu-west\"]}}",
            i % 97,
            i * 31 + n,
            18 + (i + n) % 9,
            (i * 7 + n) % 10
        ));
        n += 1;
    }
    s.truncate(size);
    Bytes::from(s)
}

/// A pseudo-random, incompressible payload: splitmix64 started at a mixed
/// seed, so different seeds give unrelated streams (not shifted copies).
fn random_payload(seed: u64, size: usize) -> Bytes {
    fn mix(mut z: u64) -> u64 {
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    let mut x = mix(seed.wrapping_add(0x2545_F491_4F6C_DD1D));
    let mut out = Vec::with_capacity(size + 8);
    while out.len() < size {
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        out.extend_from_slice(&mix(x).to_le_bytes());
    }
    out.truncate(size);
    out.into()
}

fn message(size: usize, i: u64, text: bool) -> Message {
    let (a, b) = keys();
    let payload = if text {
        text_payload(i, size)
    } else {
        random_payload(i, size)
    };
    Message::new(a.public(), Destination::Cell(b.public()), payload)
        .with_timestamp(1_700_000_000_000 + i)
        .with_nonce(i)
}

fn bench_messages(c: &mut Criterion) {
    let limits = Limits::default();
    let (a, _) = keys();
    for size in SIZES {
        let m = message(size, 1, false);
        let mut g = c.benchmark_group(format!("message/{size}B"));
        g.throughput(Throughput::Elements(1));
        let mut buf = BytesMut::with_capacity(4096);
        g.bench_function("encode", |bch| {
            bch.iter(|| {
                buf.clear();
                black_box(&m).encode(&mut buf);
                black_box(buf.len())
            })
        });
        let mut enc = BytesMut::new();
        m.encode(&mut enc);
        let enc = enc.freeze();
        g.bench_function("decode", |bch| {
            bch.iter(|| {
                let mut b = black_box(&enc).clone();
                black_box(Envelope::parse(&mut b, &limits).unwrap())
            })
        });
        g.bench_function("encode+decode", |bch| {
            bch.iter(|| {
                buf.clear();
                black_box(&m).encode(&mut buf);
                let mut b = buf.split().freeze();
                black_box(Envelope::parse(&mut b, &limits).unwrap().lane())
            })
        });
        g.bench_function("id", |bch| {
            let env = Envelope::parse(&mut enc.clone(), &limits).unwrap();
            bch.iter(|| black_box(black_box(&env).id()))
        });
        g.bench_function("sign", |bch| {
            bch.iter(|| {
                buf.clear();
                black_box(&m).encode_signed(&a, &mut buf);
            })
        });
        let mut s = BytesMut::new();
        m.encode_signed(&a, &mut s);
        let signed = Envelope::parse(&mut s.freeze(), &limits).unwrap();
        g.bench_function("verify", |bch| {
            bch.iter(|| black_box(&signed).verify().unwrap())
        });
        g.finish();
    }
}

fn bench_batch_verify(c: &mut Criterion) {
    let limits = Limits::default();
    let (a, _) = keys();
    let mut g = c.benchmark_group("verify_batch");
    for n in [16usize, 64] {
        let envs: Vec<Envelope> = (0..n as u64)
            .map(|i| {
                let mut b = BytesMut::new();
                message(128, i, false).encode_signed(&a, &mut b);
                Envelope::parse(&mut b.freeze(), &limits).unwrap()
            })
            .collect();
        let refs: Vec<&Envelope> = envs.iter().collect();
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(format!("{n}x128B"), |bch| {
            bch.iter(|| verify_batch(black_box(&refs)).unwrap())
        });
    }
    g.finish();
}

/// Messages of `size` totalling about 64 KiB of encoded bytes.
fn batch_of(size: usize, text: bool) -> Vec<Message> {
    let per = message(size, 0, text).encoded_len();
    (0..(64 * 1024 / per) as u64)
        .map(|i| message(size, i, text))
        .collect()
}

fn bench_batches(c: &mut Criterion) {
    let limits = Limits::default();
    for (label, text) in [("text", true), ("random", false)] {
        for size in SIZES {
            let msgs = batch_of(size, text);
            let raw: usize = msgs.iter().map(Message::encoded_len).sum();
            let mut g = c.benchmark_group(format!("batch64k/{label}/{size}B"));
            g.throughput(Throughput::Bytes(raw as u64));
            let mut enc = BatchEncoder::new(1, 1024).unwrap();
            let mut out = BytesMut::with_capacity(128 * 1024);
            g.bench_function("encode+compress", |bch| {
                bch.iter(|| {
                    out.clear();
                    for m in &msgs {
                        enc.push(m);
                    }
                    black_box(enc.finish(Lane::Normal, &mut out))
                })
            });
            // Compression alone, on the already-encoded batch body.
            let mut body = BytesMut::new();
            for m in &msgs {
                m.encode(&mut body);
            }
            let mut cctx = zstd::bulk::Compressor::new(1).unwrap();
            let mut dst = Vec::with_capacity(zstd::zstd_safe::compress_bound(body.len()));
            g.bench_function("zstd1-compress-only", |bch| {
                bch.iter(|| {
                    dst.clear();
                    black_box(cctx.compress_to_buffer(&body[..], &mut dst).unwrap())
                })
            });
            out.clear();
            for m in &msgs {
                enc.push(m);
            }
            let stats = enc.finish(Lane::Normal, &mut out);
            let frame = out.clone().freeze();
            let mut dec = BatchDecoder::new(limits).unwrap();
            g.bench_function("decompress+decode", |bch| {
                bch.iter_batched(
                    || frame.clone(),
                    |f| {
                        let Frame::Batch(b) = Frame::decode(f, &limits).unwrap() else {
                            unreachable!()
                        };
                        dec.messages(&b)
                            .unwrap()
                            .map(|e| e.unwrap().len())
                            .sum::<usize>()
                    },
                    BatchSize::SmallInput,
                )
            });
            g.finish();
            eprintln!(
                "batch64k/{label}/{size}B: {} messages, {} raw bytes -> {} on the wire (ratio {:.2}, compressed: {})",
                stats.count,
                stats.raw_bytes,
                stats.wire_bytes,
                stats.raw_bytes as f64 / stats.wire_bytes as f64,
                stats.compressed
            );
        }
    }
}

criterion_group!(benches, bench_messages, bench_batch_verify, bench_batches);
criterion_main!(benches);
