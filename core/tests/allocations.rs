//! The node's ingest allocates nothing per message: a batch of 4096 costs
//! a few allocations at most, whatever way it goes, once the node's
//! buffers have grown to a batch's size.
//!
//! Counted by a global allocator wrapper, on the test's thread only.

use bytes::{Bytes, BytesMut};
use relay_codec::frame::{PROTOCOL_VERSION, Role};
use relay_codec::{
    BatchDecoder, BatchEncoder, BatchFrame, Destination, Envelope, Frame, Keypair, Lane, Limits,
    Message, PublicKey,
};
use relay_core::{Action, Admission, LinkInfo, Node, NodeConfig, Now, Verify};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;

struct Counting;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.with(Cell::get) {
            ALLOCATIONS.with(|n| n.set(n.get() + 1));
        }
        // SAFETY: forwarded as it came.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded as it came.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.with(Cell::get) {
            ALLOCATIONS.with(|n| n.set(n.get() + 1));
        }
        // SAFETY: forwarded as it came.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Allocations made by `f` on this thread.
fn allocations(f: impl FnOnce()) -> u64 {
    ALLOCATIONS.with(|n| n.set(0));
    COUNTING.with(|c| c.set(true));
    f();
    COUNTING.with(|c| c.set(false));
    ALLOCATIONS.with(Cell::get)
}

const MESSAGES: usize = 4096;
const T0: u64 = 1_700_000_000_000;

fn kp(i: u8) -> Keypair {
    Keypair::from_secret_bytes(&[i; 32])
}

fn batch(
    dests: &[Destination],
    t: u64,
    nonce: &mut u64,
    signed: bool,
) -> (BatchFrame, Vec<Envelope>) {
    let mut enc = BatchEncoder::new(1, usize::MAX).unwrap();
    let payload = Bytes::from(vec![1u8; 128]);
    for k in 0..MESSAGES {
        *nonce += 1;
        let m = Message::new(
            kp(1).public(),
            dests[k % dests.len()].clone(),
            payload.clone(),
        )
        .with_timestamp(T0 + t)
        .with_nonce(*nonce);
        if signed {
            enc.push_signed(&m, &kp(1));
        } else {
            enc.push(&m);
        }
    }
    let mut out = BytesMut::new();
    enc.finish(Lane::Normal, &mut out);
    let Frame::Batch(b) = Frame::decode(out.freeze(), &Limits::default()).unwrap() else {
        panic!("not a batch")
    };
    let envs = BatchDecoder::new(Limits::default())
        .unwrap()
        .messages(&b)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    (b, envs)
}

/// Allocations of the last of a few batches to `dests`, with `verify`.
fn steady_state(dests: &[Destination], verify: Verify) -> u64 {
    let cfg = NodeConfig {
        verify,
        // Two batches a generation: the tables reach their full size
        // within the warm-up.
        dedup_capacity: 4 * MESSAGES,
        ..NodeConfig::new(kp(200).public())
    };
    let mut node: Node<Arc<u64>> = Node::new(cfg, 3).unwrap();
    let mut out: Vec<Action<Arc<u64>>> = Vec::new();
    for i in 1..=3u8 {
        let info = LinkInfo {
            key: kp(i).public(),
            role: Role::Cell,
            version: PROTOCOL_VERSION,
            notices: true,
        };
        let at = Now {
            mono_ms: 0,
            unix_ms: T0,
        };
        let admitted = node.link_up(at, u64::from(i), Arc::new(u64::from(i)), info, &mut out);
        assert_eq!(admitted, Admission::Admitted);
    }
    let signed = verify != Verify::Off;
    let mut nonce = 0;
    let mut last = 0;
    for t in 1..=8 {
        let (b, envs) = batch(dests, t, &mut nonce, signed);
        out.clear();
        let now = Now {
            mono_ms: t,
            unix_ms: T0 + t,
        };
        last = allocations(|| node.batch(now, 1, &envs, &b, &mut out));
        assert!(!out.is_empty(), "{dests:?}: no action");
    }
    last
}

fn cell(i: u8) -> Destination {
    Destination::Cell(kp(i).public())
}

#[test]
fn ingest_allocates_nothing_per_message() {
    let unknown = Destination::Cell(PublicKey([9; 32]));
    for (what, dests, verify, most) in [
        ("forwarded whole", vec![cell(2)], Verify::Off, 0),
        (
            "split between two cells",
            vec![cell(2), cell(3)],
            Verify::Off,
            0,
        ),
        ("broadcast", vec![Destination::Broadcast], Verify::Off, 0),
        ("to a cell not attached", vec![unknown], Verify::Off, 0),
        // The batch verifier's vectors (ed25519-dalek's too), per batch:
        // 33 at this size.
        ("verified, all", vec![cell(2)], Verify::All, 64),
    ] {
        let n = steady_state(&dests, verify);
        println!("{what}: {n} allocations for {MESSAGES} messages");
        assert!(n <= most, "{what}: {n} allocations for {MESSAGES} messages");
    }
}
