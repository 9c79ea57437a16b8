//! What the cell receives: a reader per lane, and the end-to-end checks
//! (signatures, unsupported messages, duplicates) before the application
//! sees a message.

use super::handle::{Counters, Delivery, Shared};
use super::session::violation;
use super::{Received, ReceivedAuth};
use relay_codec::frame::CloseCode;
use relay_codec::id_table::IdKey;
use relay_codec::{Authenticator, Envelope, Kind, Lane, MessageId};
use relay_core::{DedupVerdict, DedupWindow};
use relay_link::{BatchReader, FrameReceiver, Link};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio::sync::{OwnedMutexGuard, mpsc};
use tokio::task::JoinSet;

/// Signed messages in one batch above which verification leaves the async
/// worker for the blocking pool (about 25 µs each).
pub(crate) const VERIFY_INLINE_MAX: usize = 32;

/// Accepts the relay's lanes (a data stream each on QUIC, a channel each
/// on TCP) and reads each in its own task, so lanes do not wait on each
/// other and each stays in order.
pub(crate) async fn accept_data(link: Link, shared: Arc<Shared>, events: mpsc::Sender<Delivery>) {
    let mut readers = JoinSet::new();
    loop {
        tokio::select! {
            s = link.accept_lane() => match s {
                Ok(recv) => {
                    readers.spawn(read_data(link.clone(), recv, shared.clone(), events.clone()));
                }
                Err(_) => break,
            },
            Some(_) = readers.join_next(), if !readers.is_empty() => {}
        }
    }
    // Let the readers deliver what they have already read.
    while readers.join_next().await.is_some() {}
}

pub(crate) async fn read_data(
    link: Link,
    recv: FrameReceiver,
    shared: Arc<Shared>,
    events: mpsc::Sender<Delivery>,
) {
    let mut reader = match BatchReader::new(recv, shared.opts.limits) {
        Ok(r) => r,
        Err(e) => {
            violation(&link, CloseCode::Shutdown, e.to_string());
            return;
        }
    };
    // Reused for every batch.
    let mut envs: Vec<Envelope> = Vec::new();
    // The dedup state of the lane being read, held while reading it.
    let mut dedup: Option<(Lane, OwnedMutexGuard<LaneDedup>)> = None;
    loop {
        let batch = match reader.next(&mut envs).await {
            Ok(Some(b)) => b,
            Ok(None) => return,
            Err(e) => {
                if let Some(code) = e.peer_fault() {
                    violation(&link, code, format!("bad data from the relay: {e}"));
                }
                return;
            }
        };
        // Every message of a batch is on the batch's lane (the decoder
        // checks), and the relay keeps one stream per lane: the lock is
        // taken once per stream.
        let seen = match &mut dedup {
            Some((lane, guard)) if *lane == batch.lane => guard,
            slot => {
                // Let go of the other lane first: one lock at a time.
                *slot = None;
                let guard = shared.dedup[batch.lane.index()].clone().lock_owned().await;
                &mut slot.insert((batch.lane, guard)).1
            }
        };
        let passed;
        let mut reack = Vec::new();
        (envs, passed) = check(&shared.counters, envs, seen, &mut reack).await;
        if !reack.is_empty() {
            // A redelivery of what the application already has: its ack
            // was lost; a full control queue loses this one too, and the
            // relay redelivers again.
            for frame in durable_acks(&reack) {
                let _ = shared.control.try_send(frame);
            }
        }
        if passed.is_empty() {
            continue;
        }
        // Room for the whole batch, then one queue operation for it.
        match shared
            .room
            .acquire_many(shared.permits(passed.len()) as u32)
            .await
        {
            Ok(permits) => permits.forget(),
            // The cell was dropped.
            Err(_) => return,
        }
        if events.send(Delivery::Batch(passed)).await.is_err() {
            return;
        }
    }
}

/// The end-to-end checks: signatures (batch-verified), unsupported
/// authenticators and kinds, duplicates. Returns what passes, in order, and
/// `envs` emptied for reuse.
pub(crate) async fn check(
    counters: &Counters,
    mut envs: Vec<Envelope>,
    seen: &mut LaneDedup,
    reack: &mut Vec<MessageId>,
) -> (Vec<Envelope>, Vec<Received>) {
    let signed = envs
        .iter()
        .filter(|e| matches!(e.authenticator(), Authenticator::Signature(_)))
        .count();
    let sig_ok = if signed == 0 {
        Vec::new()
    } else if signed > VERIFY_INLINE_MAX {
        match tokio::task::spawn_blocking(move || {
            let ok = verify_signed(&envs);
            (envs, ok)
        })
        .await
        {
            Ok((e, ok)) => {
                envs = e;
                ok
            }
            Err(e) => {
                tracing::error!("signature verification task failed: {e}");
                return (Vec::new(), Vec::new());
            }
        }
    } else {
        verify_signed(&envs)
    };
    let (mut bad_signature, mut unsupported, mut duplicate) = (0u64, 0u64, 0u64);
    let mut out = Vec::with_capacity(envs.len());
    let mut ok = sig_ok.into_iter();
    // Each id is hashed once, here, and the dedup table uses it as its own
    // hash; every lookup is started before the first is waited on.
    let ids: Vec<MessageId> = envs.iter().map(Envelope::id).collect();
    for id in &ids {
        seen.prefetch(id.as_u128());
    }
    for (env, id) in envs.drain(..).zip(ids) {
        let auth = match env.authenticator() {
            Authenticator::Signature(_) => {
                if !ok.next().unwrap_or(false) {
                    bad_signature += 1;
                    tracing::debug!(source = %env.source().short(), "dropped a message with a bad signature");
                    continue;
                }
                ReceivedAuth::Signature
            }
            Authenticator::None => ReceivedAuth::Link,
            Authenticator::AeadTag(_) => {
                unsupported += 1;
                tracing::debug!(source = %env.source().short(), "dropped a sealed message (sealing is not supported yet)");
                continue;
            }
        };
        if env.kind() != Kind::Data {
            unsupported += 1;
            continue;
        }
        // Only after the signature passed: a forged copy must not make the
        // genuine message look like a duplicate.
        let durable = env.qos() == relay_codec::Qos::Durable;
        if !seen.is_new(id.as_u128()) {
            duplicate += 1;
            if durable {
                reack.push(id);
            }
            continue;
        }
        out.push(Received {
            id,
            source: env.source(),
            destination: env.destination(),
            lane: env.lane(),
            timestamp_ms: env.timestamp_ms(),
            auth,
            durable,
            payload: env.into_payload(),
        });
    }
    let c = counters;
    for (counter, n) in [
        (&c.received, out.len() as u64),
        (&c.dropped_bad_signature, bad_signature),
        (&c.dropped_unsupported, unsupported),
        (&c.dropped_duplicate, duplicate),
    ] {
        if n > 0 {
            counter.fetch_add(n, Ordering::Relaxed);
        }
    }
    (envs, out)
}

/// DurableAck frames (acknowledged) for `ids`, as many as they need.
pub(crate) fn durable_acks(ids: &[MessageId]) -> Vec<relay_codec::Frame> {
    ids.chunks(relay_codec::frame::MAX_DURABLE_ACK_IDS)
        .map(|c| relay_codec::Frame::DurableAck {
            status: relay_codec::frame::DurableStatus::Acked,
            ids: c.to_vec(),
        })
        .collect()
}

/// Recently seen message ids of one lane, to drop duplicates: the relay's
/// own [`DedupWindow`], bounded by count alone (a cell checks no
/// timestamps, so no id expires by age). It remembers at least the last
/// `capacity / 2` ids and at most `capacity` (see [`DedupWindow`]).
///
/// The window is made when the lane's first message arrives: a cell that
/// never receives on a lane (most of 10 000 idle cells on one endpoint)
/// holds no table for it. From then on it holds a table sized for
/// `min(capacity / 2, 4096)` ids (about 128 KiB at most) and grows with the
/// ids.
pub(crate) struct LaneDedup {
    window: Option<DedupWindow>,
    capacity: usize,
    key: IdKey,
}

impl LaneDedup {
    /// Remembers between `capacity / 2` and `capacity` ids (at least 1),
    /// placed in its table with `key`.
    pub(crate) fn new(capacity: usize, key: IdKey) -> Self {
        Self {
            window: None,
            capacity: capacity.max(1),
            key,
        }
    }

    /// Starts loading the slots where [`is_new`](Self::is_new) of `id` will
    /// look; changes no verdict.
    pub(crate) fn prefetch(&self, id: u128) {
        if let Some(w) = &self.window {
            w.prefetch(id);
        }
    }

    /// Remembers `id`; false if it was seen recently (a duplicate).
    pub(crate) fn is_new(&mut self, id: u128) -> bool {
        let window = self
            .window
            .get_or_insert_with(|| DedupWindow::new(u64::MAX, self.capacity, self.key));
        // The time stays 0: with an endless window only the count forgets.
        window.check_and_insert(id, 0) == DedupVerdict::Fresh
    }

    /// Ids held now.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.window.as_ref().map_or(0, DedupWindow::len)
    }
}

/// Whether each signed envelope (in order, skipping unsigned ones) verifies.
pub(crate) fn verify_signed(envs: &[Envelope]) -> Vec<bool> {
    let signed: Vec<&Envelope> = envs
        .iter()
        .filter(|e| matches!(e.authenticator(), Authenticator::Signature(_)))
        .collect();
    relay_codec::verify::verify_each(&signed)
        .into_iter()
        .map(|r| r.is_ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cell::AuthMode;
    use bytes::{Bytes, BytesMut};
    use relay_codec::{Destination, Keypair, Limits, Message};

    fn signed(kp: &Keypair, nonce: u64, auth: AuthMode) -> Envelope {
        let msg = Message::new(
            kp.public(),
            Destination::Broadcast,
            Bytes::from_static(b"x"),
        )
        .with_nonce(nonce)
        .with_timestamp(1);
        let mut buf = BytesMut::new();
        match auth {
            AuthMode::Signed => msg.encode_signed(kp, &mut buf),
            AuthMode::Link => msg.encode(&mut buf),
        }
        Envelope::parse(&mut buf.freeze(), &Limits::default()).unwrap()
    }

    #[test]
    fn verify_signed_names_the_bad_ones_in_order() {
        let kp = Keypair::from_secret_bytes(&[1; 32]);
        let good = signed(&kp, 1, AuthMode::Signed);
        let unsigned = signed(&kp, 2, AuthMode::Link);
        let mut raw = BytesMut::from(&signed(&kp, 3, AuthMode::Signed).raw()[..]);
        let last = raw.len() - 1;
        raw[last] ^= 1;
        let bad = Envelope::parse(&mut raw.freeze(), &Limits::default()).unwrap();
        assert_eq!(
            verify_signed(&[good.clone(), unsigned, bad, good]),
            vec![true, false, true]
        );
    }

    const KEY: IdKey = IdKey::new(1, 2);

    #[test]
    fn a_lanes_dedup_holds_nothing_until_its_first_message_then_keeps_half_its_capacity() {
        let mut d = LaneDedup::new(65_536, KEY);
        assert!(d.window.is_none(), "no table before the first message");
        assert!(d.is_new(1) && !d.is_new(1));
        assert_eq!(d.len(), 1);

        let mut d = LaneDedup::new(100, KEY);
        for id in 0..5000 {
            assert!(d.is_new(id), "{id}");
            assert!(d.len() <= 100);
            // The last capacity / 2 are always remembered.
            let back = id.saturating_sub(49);
            assert!(!d.is_new(back), "{back} forgotten at {id}");
        }
        // Older ids are forgotten: delivered again.
        assert!(d.is_new(0));
        // A capacity of 0 or 1 still drops back-to-back copies.
        let mut d = LaneDedup::new(0, KEY);
        assert!(d.is_new(7) && !d.is_new(7) && d.is_new(8) && d.is_new(7));
    }

    fn payload_of(r: &Received) -> &[u8] {
        &r.payload[..]
    }

    #[tokio::test]
    async fn check_drops_bad_signatures_sealed_and_duplicates_and_a_forged_copy_does_not_hide_the_genuine()
     {
        let kp = Keypair::from_secret_bytes(&[2; 32]);
        let good = signed(&kp, 1, AuthMode::Signed);
        // The same message with a broken signature: the same id, as the
        // id does not cover the authenticator.
        let mut raw = BytesMut::from(&good.raw()[..]);
        let last = raw.len() - 1;
        raw[last] ^= 1;
        let forged = Envelope::parse(&mut raw.freeze(), &Limits::default()).unwrap();
        assert_eq!(forged.id(), good.id());
        let mut sealed = Message::new(kp.public(), Destination::Broadcast, Bytes::new())
            .with_nonce(9)
            .with_timestamp(1);
        sealed.auth = Authenticator::AeadTag([3; 16]);
        let mut buf = BytesMut::new();
        sealed.encode(&mut buf);
        let sealed = Envelope::parse(&mut buf.freeze(), &Limits::default()).unwrap();
        let unsigned = signed(&kp, 2, AuthMode::Link);

        let counters = Counters::default();
        let mut seen = LaneDedup::new(64, KEY);
        let envs = vec![
            forged,
            good.clone(),
            sealed,
            good.clone(),
            unsigned.clone(),
            unsigned,
        ];
        let (left, out) = check(&counters, envs, &mut seen, &mut Vec::new()).await;
        assert!(left.is_empty());
        let got: Vec<_> = out.iter().map(|r| (r.id, r.auth)).collect();
        assert_eq!(
            got,
            vec![
                (good.id(), ReceivedAuth::Signature),
                (out[1].id, ReceivedAuth::Link)
            ]
        );
        let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        assert_eq!(get(&counters.received), 2);
        assert_eq!(get(&counters.dropped_bad_signature), 1);
        assert_eq!(get(&counters.dropped_unsupported), 1);
        assert_eq!(get(&counters.dropped_duplicate), 2);

        // Over VERIFY_INLINE_MAX signed messages: verified off the async
        // worker, with the same verdicts, in order.
        let many: Vec<Envelope> = (0..VERIFY_INLINE_MAX as u64 + 8)
            .map(|n| signed(&kp, 100 + n, AuthMode::Signed))
            .collect();
        let ids: Vec<MessageId> = many.iter().map(Envelope::id).collect();
        let (_, out) = check(&counters, many, &mut seen, &mut Vec::new()).await;
        assert_eq!(out.iter().map(|r| r.id).collect::<Vec<_>>(), ids);
        assert!(out.iter().all(|r| payload_of(r) == b"x"));
    }
}
