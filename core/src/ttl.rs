//! The TTL rule of one relay hop (docs/PROTOCOL.md 3.6), in one place.
//!
//! A message's TTL is the relay hops it has left. A relay drops a message
//! that reaches it with TTL 0; every message it forwards leaves with its
//! TTL one lower, whichever way it leaves:
//!
//! - message by message: the envelope is queued with the TTL of
//!   [`next_ttl`] ([`Envelope::with_ttl`], no bytes touched), and the link
//!   writer writes that TTL when it builds the outgoing batch;
//! - a whole batch as it arrived ([`forwarded_batch`]): its hop count goes
//!   up by one, which lowers every message's TTL by one while the data, as
//!   the sender encoded and compressed it, goes out unchanged.
//!
//! So the TTL a receiver sees does not depend on how the relay chose to
//! forward, and in a mesh the TTL is a loop guard on every path.

use relay_codec::{BatchFrame, Envelope};

/// The TTL a message that reached this relay with `ttl` leaves with, or
/// `None` if it has no hop left: it is dropped (and counted, and its
/// sender told).
pub fn next_ttl(ttl: u8) -> Option<u8> {
    ttl.checked_sub(1)
}

/// `batch`, whose messages are `envs`, as the next hop must receive it when
/// it is forwarded whole: the same data with the hop count one higher.
/// `None` if a message has no hop left (the batch must then go message by
/// message, without it).
pub fn forwarded_batch(batch: &BatchFrame, envs: &[Envelope]) -> Option<BatchFrame> {
    if envs.iter().any(|e| next_ttl(e.ttl()).is_none()) {
        return None;
    }
    // Every message has a TTL byte of at least hops + 1 (its TTL is the
    // byte minus hops, and at least 1), so this never passes 255.
    let hops = batch.hops.checked_add(1)?;
    Some(BatchFrame {
        hops,
        ..batch.clone()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use relay_codec::{BatchDecoder, BatchEncoder, Destination, Frame, Keypair, Lane, Limits};
    use relay_codec::{Message, PublicKey};

    /// A batch of messages with TTLs `ttls`, decoded as a relay reads it.
    fn batch(ttls: &[u8]) -> (BatchFrame, Vec<Envelope>) {
        let key = Keypair::from_secret_bytes(&[1; 32]);
        let mut enc = BatchEncoder::new(1, 0).unwrap();
        for (i, &ttl) in ttls.iter().enumerate() {
            let m = Message::new(
                key.public(),
                Destination::Cell(PublicKey([2; 32])),
                "x".into(),
            )
            .with_ttl(ttl)
            .with_nonce(i as u64);
            enc.push_signed(&m, &key);
        }
        let mut out = BytesMut::new();
        enc.finish(Lane::Normal, &mut out);
        let Frame::Batch(b) = Frame::decode(out.freeze(), &Limits::default()).unwrap() else {
            panic!("not a batch");
        };
        let envs = decode(&b);
        (b, envs)
    }

    fn decode(b: &BatchFrame) -> Vec<Envelope> {
        let mut dec = BatchDecoder::new(Limits::default()).unwrap();
        dec.messages(b).unwrap().map(Result::unwrap).collect()
    }

    #[test]
    fn a_hop_costs_one_and_ttl_0_is_dropped() {
        assert_eq!(next_ttl(16), Some(15));
        assert_eq!(next_ttl(1), Some(0));
        assert_eq!(next_ttl(0), None);
    }

    #[test]
    fn a_batch_forwarded_whole_lowers_every_ttl_by_one_per_hop() {
        let (b, envs) = batch(&[16, 3, 1]);
        let once = forwarded_batch(&b, &envs).expect("every message has a hop left");
        assert_eq!((once.hops, &once.data), (1, &b.data), "data untouched");
        let after: Vec<u8> = decode(&once).iter().map(Envelope::ttl).collect();
        assert_eq!(after, [15, 2, 0]);
        // The message now at 0 stops the batch going whole again.
        assert!(forwarded_batch(&once, &decode(&once)).is_none());
    }

    #[test]
    fn whole_and_message_by_message_forwarding_agree() {
        let (b, envs) = batch(&[16, 2]);
        let mut b2 = b.clone();
        let mut envs2 = envs.clone();
        // Two whole hops, then the same two hops message by message.
        for _ in 0..2 {
            b2 = forwarded_batch(&b2, &envs2).unwrap();
            envs2 = decode(&b2);
        }
        let mut by_message = envs;
        for _ in 0..2 {
            by_message = by_message
                .into_iter()
                .filter_map(|e| next_ttl(e.ttl()).map(|t| e.with_ttl(t)))
                .collect();
        }
        let ttl = |v: &[Envelope]| v.iter().map(Envelope::ttl).collect::<Vec<_>>();
        assert_eq!(ttl(&envs2), [14, 0]);
        assert_eq!(ttl(&by_message), ttl(&envs2));
    }
}
