//! What [`Node::batch`] costs per message, in steady state: the rules of
//! ingest with nothing of the shell around them (no queues, locks or
//! metrics), so the shell's own cost can be told apart from it.
//!
//! - `forward_whole`: batches of 500 messages of 128 B from one cell to
//!   another, each forwarded whole (one action per batch);
//! - `split`: the same batches to two cells in turn, so each goes message
//!   by message (one action per message).
//!
//! Every batch is new (fresh ids, stamped with the node's clock, which
//! advances a millisecond per batch), into a dedup window of the default
//! capacity (1 M ids), filled before measuring; handles are `Arc`s, as
//! the shell's are. Criterion's `time` is per batch and its throughput per
//! message: ns/message = time / 500. Building the batches is not measured.
//! Run: `cargo bench -p relay-core --bench node_ingest`.

use bytes::{Bytes, BytesMut};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use relay_codec::frame::{PROTOCOL_VERSION, Role};
use relay_codec::{
    Authenticator, BatchDecoder, BatchEncoder, BatchFrame, Destination, Envelope, Frame, Keypair,
    Lane, Limits, Message, PublicKey,
};
use relay_core::{Action, Admission, LinkInfo, Node, NodeConfig, Now};
use std::cell::Cell;
use std::hint::black_box;
use std::sync::Arc;

const MESSAGES: usize = 500;
const PAYLOAD: usize = 128;
/// Batches ingested before measuring: 2 M ids, twice the dedup capacity.
const PREFILL_BATCHES: usize = 4_000;
/// The wall clock at mono time 0.
const T0: u64 = 1_700_000_000_000;

fn key(i: u8) -> PublicKey {
    Keypair::from_secret_bytes(&[i; 32]).public()
}

/// A node with cell 1 on link 1 and cells 2 and 3 on links 2 and 3.
fn node() -> Node<Arc<u64>> {
    let mut node = Node::new(NodeConfig::new(key(200)), 1).expect("default config");
    let mut out = Vec::new();
    for i in 1..=3u8 {
        let info = LinkInfo {
            key: key(i),
            role: Role::Cell,
            version: PROTOCOL_VERSION,
            notices: true,
        };
        let link = u64::from(i);
        let at = Now {
            mono_ms: 0,
            unix_ms: T0,
        };
        assert_eq!(
            node.link_up(at, link, Arc::new(link), info, &mut out),
            Admission::Admitted
        );
    }
    node
}

/// Makes the batches: each new, from cell 1 to `dests` in turn, stamped
/// with the next millisecond.
struct Batches {
    source: PublicKey,
    dests: Vec<Destination>,
    clock: Cell<u64>,
    nonce: Cell<u64>,
    payload: Bytes,
    decoder: std::cell::RefCell<BatchDecoder>,
}

impl Batches {
    fn new(dests: &[u8]) -> Self {
        Self {
            source: key(1),
            dests: dests.iter().map(|&d| Destination::Cell(key(d))).collect(),
            clock: Cell::new(0),
            nonce: Cell::new(0),
            payload: Bytes::from(vec![0x5a; PAYLOAD]),
            decoder: std::cell::RefCell::new(BatchDecoder::new(Limits::default()).unwrap()),
        }
    }

    fn next(&self) -> (Now, BatchFrame, Vec<Envelope>) {
        let mono_ms = self.clock.get() + 1;
        self.clock.set(mono_ms);
        let now = Now {
            mono_ms,
            unix_ms: T0 + mono_ms,
        };
        let mut enc = BatchEncoder::new(1, usize::MAX).unwrap();
        for k in 0..MESSAGES {
            let nonce = self.nonce.get() + 1;
            self.nonce.set(nonce);
            let dest = self.dests[k % self.dests.len()].clone();
            let mut m = Message::new(self.source, dest, self.payload.clone())
                .with_timestamp(now.unix_ms)
                .with_nonce(nonce);
            // Signature-sized: the node does not verify (verify = off, the
            // default), but the id hashes what a signed message carries.
            m.auth = Authenticator::Signature([7; 64]);
            enc.push(&m);
        }
        let mut out = BytesMut::new();
        enc.finish(Lane::Normal, &mut out);
        let Frame::Batch(b) = Frame::decode(out.freeze(), &Limits::default()).unwrap() else {
            unreachable!("a batch encodes as a batch")
        };
        let envs = self
            .decoder
            .borrow_mut()
            .messages(&b)
            .unwrap()
            .map(Result::unwrap)
            .collect();
        (now, b, envs)
    }
}

fn bench_ingest(c: &mut Criterion) {
    let mut g = c.benchmark_group("node_ingest");
    g.throughput(Throughput::Elements(MESSAGES as u64));
    for (name, dests, expect) in [
        ("forward_whole", &[2u8][..], 2),
        ("split", &[2u8, 3][..], MESSAGES + 2),
    ] {
        let mut node = node();
        let batches = Batches::new(dests);
        let mut out: Vec<Action<Arc<u64>>> = Vec::new();
        // The shape each case is meant to measure.
        let (now, b, envs) = batches.next();
        node.batch(now, 1, &envs, &b, &mut out);
        assert_eq!(out.len(), expect, "{name}: {out:?}");
        // Steady state: the dedup window turned over for lack of room
        // (2 M ids into 1 M), both of its tables at their largest.
        for _ in 0..PREFILL_BATCHES {
            let (now, b, envs) = batches.next();
            out.clear();
            node.batch(now, 1, &envs, &b, &mut out);
        }
        assert!(node.dedup().evicted_early() > 0, "the window turned over");
        out.clear();
        g.bench_function(name, |bench| {
            bench.iter_batched(
                || batches.next(),
                |(now, b, envs)| {
                    node.batch(now, 1, &envs, &b, &mut out);
                    black_box(out.len());
                    out.clear();
                },
                BatchSize::SmallInput,
            );
        });
    }
    g.finish();
}

criterion_group!(benches, bench_ingest);
criterion_main!(benches);
