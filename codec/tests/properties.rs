//! Property tests of the codec: round trips over every field's range,
//! tamper detection, and robustness against arbitrary and truncated input.

use bytes::{BufMut, Bytes, BytesMut};
use proptest::prelude::*;
use relay_codec::batch::{ADAPTIVE_MAX_LEVEL, BatchStats, PROBE_EVERY};
use relay_codec::frame::{CloseCode, Role};
use relay_codec::verify::{verify_batch, verify_each};
use relay_codec::{
    Authenticator, BatchDecoder, BatchEncoder, DecodeError, Destination, Envelope, Frame, Keypair,
    Kind, Lane, Limits, Message, PublicKey, Qos, ServiceName, VerifyError,
};

fn lane() -> impl Strategy<Value = Lane> {
    prop::sample::select(Lane::ALL.to_vec())
}

fn destination() -> impl Strategy<Value = Destination> {
    prop_oneof![
        any::<[u8; 32]>().prop_map(|k| Destination::Cell(PublicKey(k))),
        Just(Destination::Broadcast),
        "[a-z0-9./_-]{1,64}".prop_map(|s| Destination::Service(ServiceName::new(s).unwrap())),
        // Multi-byte UTF-8 names up to the 64-byte bound.
        "[a-zé☃]{1,16}".prop_map(|s| Destination::Service(ServiceName::new(s).unwrap())),
    ]
}

fn authenticator() -> impl Strategy<Value = Authenticator> {
    prop_oneof![
        Just(Authenticator::None),
        prop::array::uniform32(any::<u8>()).prop_map(|h| {
            let mut s = [0u8; 64];
            s[..32].copy_from_slice(&h);
            s[32..].copy_from_slice(&h);
            Authenticator::Signature(s)
        }),
        any::<[u8; 16]>().prop_map(Authenticator::AeadTag),
    ]
}

prop_compose! {
    fn message()(
        ttl in any::<u8>(),
        kind in prop_oneof![Just(Kind::Data), Just(Kind::Ack)],
        qos in prop_oneof![Just(Qos::BestEffort), Just(Qos::Durable)],
        trace in any::<bool>(),
        lane in lane(),
        source in any::<[u8; 32]>(),
        destination in destination(),
        timestamp_ms in any::<u64>(),
        nonce in any::<u64>(),
        payload in prop::collection::vec(any::<u8>(), 0..2048),
        auth in authenticator(),
    ) -> Message {
        Message {
            ttl, kind, qos, trace, lane,
            source: PublicKey(source),
            destination, timestamp_ms, nonce,
            payload: Bytes::from(payload),
            auth,
        }
    }
}

fn encode(m: &Message) -> Bytes {
    let mut b = BytesMut::new();
    m.encode(&mut b);
    b.freeze()
}

/// `msgs` moved to `lane`, and their batch frame with the stats of its
/// encoding (compressed when `compress` and zstd gains enough).
fn lane_batch(msgs: Vec<Message>, lane: Lane, compress: bool) -> (Vec<Message>, BatchStats, Bytes) {
    let msgs: Vec<Message> = msgs.into_iter().map(|m| Message { lane, ..m }).collect();
    let mut enc = BatchEncoder::new(1, if compress { 0 } else { usize::MAX }).unwrap();
    for m in &msgs {
        enc.push(m);
    }
    let mut out = BytesMut::new();
    let stats = enc.finish(lane, &mut out);
    assert!(enc.is_empty());
    (msgs, stats, out.freeze())
}

fn signed_sample(secret: u8, payload: &[u8], nonce: u64) -> (Keypair, Bytes) {
    let kp = Keypair::from_secret_bytes(&[secret; 32]);
    let m = Message::new(
        kp.public(),
        Destination::Cell(PublicKey([9; 32])),
        Bytes::copy_from_slice(payload),
    )
    .with_timestamp(1_700_000_000_000)
    .with_nonce(nonce);
    let mut b = BytesMut::new();
    m.encode_signed(&kp, &mut b);
    (kp, b.freeze())
}

proptest! {
    #[test]
    fn message_round_trips(m in message()) {
        let b = encode(&m);
        prop_assert_eq!(b.len(), m.encoded_len());
        let back = Message::decode(b.clone(), &Limits::default()).unwrap();
        prop_assert_eq!(&back, &m);
        let env = Envelope::parse(&mut b.clone(), &Limits::default()).unwrap();
        prop_assert_eq!(env.id(), m.id());
        prop_assert_eq!(env.raw(), &b);
        prop_assert_eq!(&env.payload(), &m.payload);
        let (auth_start, end) = relay_codec::message::encoded_layout(&b).unwrap();
        prop_assert_eq!(end, b.len());
        prop_assert_eq!(&b[1..auth_start], env.authenticated_bytes());
        prop_assert_eq!(&env.into_payload(), &m.payload);
    }

    #[test]
    fn signed_messages_verify(m in message()) {
        let kp = Keypair::from_secret_bytes(&[4; 32]);
        let m = Message { source: kp.public(), ..m };
        let mut b = BytesMut::new();
        m.encode_signed(&kp, &mut b);
        let env = Envelope::parse(&mut b.freeze(), &Limits::default()).unwrap();
        prop_assert!(env.verify().is_ok());
        let mut m2 = m.clone();
        m2.sign(&kp);
        prop_assert_eq!(env.to_message(), m2);
        // The signature after the payload is cut off.
        prop_assert_eq!(&env.into_payload(), &m.payload);
    }

    #[test]
    fn any_change_to_a_signed_byte_fails_verification(
        payload in prop::collection::vec(any::<u8>(), 0..300),
        pos in any::<prop::sample::Index>(),
        bit in 0u8..8,
    ) {
        let (_, b) = signed_sample(5, &payload, 1);
        let mut t = BytesMut::from(&b[..]);
        // Every byte but TTL (byte 0) is covered by the signature or is it.
        let i = 1 + pos.index(t.len() - 1);
        t[i] ^= 1 << bit;
        match Envelope::parse(&mut t.freeze(), &Limits::default()) {
            Err(_) => {}
            Ok(env) => prop_assert!(env.verify().is_err(), "flip at {} verified", i),
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..512)) {
        let limits = Limits::default();
        let mut b = Bytes::from(data.clone());
        let _ = Envelope::parse(&mut b, &limits);
        let _ = Frame::decode(Bytes::from(data.clone()), &limits);
        let mut buf = BytesMut::from(&data[..]);
        while let Ok(Some(_)) = Frame::take(&mut buf, &limits) {}
    }

    #[test]
    fn arbitrary_bytes_after_a_valid_header_never_panic(
        ty in 1u8..=10,
        body in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        let limits = Limits::default();
        let mut f = BytesMut::new();
        f.put_u32_le(body.len() as u32 + 1);
        f.put_u8(ty);
        f.put_slice(&body);
        if let Ok(Frame::Batch(batch)) = Frame::decode(f.freeze(), &limits) {
            let mut dec = BatchDecoder::new(limits).unwrap();
            if let Ok(it) = dec.messages(&batch) {
                for m in it { let _ = m; }
            }
        }
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic(m in message(), cut in any::<prop::sample::Index>()) {
        let b = encode(&m);
        let n = cut.index(b.len());
        let r = Envelope::parse(&mut b.slice(..n), &Limits::default());
        let is_truncated = matches!(r, Err(DecodeError::Truncated { .. }));
        prop_assert!(is_truncated, "cut at {}: {:?}", n, r);
    }

    #[test]
    fn batches_round_trip_with_and_without_compression(
        msgs in prop::collection::vec(message(), 1..40),
        compress in any::<bool>(),
        lane in lane(),
    ) {
        let (msgs, stats, encoded) = lane_batch(msgs, lane, compress);
        prop_assert_eq!(stats.count, msgs.len());
        prop_assert_eq!(stats.wire_bytes, encoded.len());
        let limits = Limits::default();
        let Frame::Batch(batch) = Frame::decode(encoded.clone(), &limits).unwrap() else {
            panic!("not a batch");
        };
        prop_assert_eq!(batch.compressed, stats.compressed);
        // Header plus data rebuild the frame byte for byte (relay passthrough).
        let mut rebuilt = batch.frame_header().to_vec();
        rebuilt.extend_from_slice(&batch.data);
        prop_assert_eq!(rebuilt.len(), batch.frame_len());
        prop_assert_eq!(&rebuilt[..], &encoded[..]);
        prop_assert!(!stats.compressed || stats.raw_bytes > batch.data.len());
        // A sender's batch has no hop count: the 9-byte header, flag 0x02 clear.
        prop_assert_eq!(batch.hops, 0);
        prop_assert_eq!(batch.frame_header().len(), 13);
        prop_assert_eq!(encoded[6] & 0x02, 0);
        let mut dec = BatchDecoder::new(limits).unwrap();
        let back: Vec<Message> = dec.messages(&batch).unwrap().map(|e| e.unwrap().to_message()).collect();
        prop_assert_eq!(back, msgs);
    }

    #[test]
    fn batches_with_a_hop_count_round_trip_or_are_refused(
        msgs in prop::collection::vec(message(), 1..20),
        hops in 1u8..=255,
        compress in any::<bool>(),
        lane in lane(),
    ) {
        let (msgs, _, plain) = lane_batch(msgs, lane, compress);
        let limits = Limits::default();
        let Frame::Batch(mut batch) = Frame::decode(plain.clone(), &limits).unwrap() else {
            panic!("not a batch");
        };
        // What a relay forwarding whole writes: the header with the hops
        // byte, then the data as it came.
        batch.hops = hops;
        let mut forwarded = batch.frame_header().to_vec();
        forwarded.extend_from_slice(&batch.data);
        prop_assert_eq!(&forwarded[..], &Frame::Batch(batch.clone()).to_bytes()[..]);
        prop_assert_eq!(forwarded.len(), plain.len() + 1);
        prop_assert_eq!(forwarded[6], plain[6] | 0x02);
        prop_assert_eq!(forwarded[13], hops);
        prop_assert_eq!(&forwarded[14..], &plain[13..]);
        let Frame::Batch(back) = Frame::decode(Bytes::from(forwarded.clone()), &limits).unwrap() else {
            panic!("not a batch");
        };
        prop_assert_eq!(&back, &batch);
        let mut dec = BatchDecoder::new(limits).unwrap();
        let got: Vec<Result<Envelope, DecodeError>> = dec.messages(&back).unwrap().collect();
        // Each message has its TTL byte minus hops, up to the first whose
        // byte is below hops, which is refused (and ends the batch).
        let ok = msgs.iter().take_while(|m| m.ttl >= hops).count();
        prop_assert_eq!(got.len(), (ok + 1).min(msgs.len()));
        for (g, m) in got.iter().zip(&msgs).take(ok) {
            let e = g.as_ref().unwrap();
            prop_assert_eq!(e.ttl(), m.ttl - hops);
            prop_assert_eq!(e.id(), m.id());
            prop_assert_eq!(e.to_message(), Message { ttl: m.ttl - hops, ..m.clone() });
        }
        // Re-encoded message by message, each keeps its lowered TTL.
        if ok > 0 {
            let mut enc = BatchEncoder::new(1, usize::MAX).unwrap();
            for g in got.iter().take(ok) {
                enc.push_envelope(g.as_ref().unwrap());
            }
            let mut out = BytesMut::new();
            enc.finish(lane, &mut out);
            let Frame::Batch(again) = Frame::decode(out.freeze(), &limits).unwrap() else {
                panic!("not a batch");
            };
            prop_assert_eq!(again.hops, 0);
            let ttls: Vec<u8> = dec.messages(&again).unwrap().map(|e| e.unwrap().ttl()).collect();
            let want: Vec<u8> = msgs.iter().take(ok).map(|m| m.ttl - hops).collect();
            prop_assert_eq!(ttls, want);
        }
        if ok < msgs.len() {
            let refused = matches!(
                &got[ok],
                Err(DecodeError::Invalid { field: "message TTL below the batch's hops", .. })
            );
            prop_assert!(refused, "{:?}", got[ok]);
        }
        // The hops flag with a hops byte of 0 is refused.
        forwarded[13] = 0;
        let zero = Frame::decode(Bytes::from(forwarded), &limits);
        prop_assert!(
            matches!(zero, Err(DecodeError::Invalid { field: "batch hops", value: 0 })),
            "{:?}", zero
        );
    }
}

#[test]
fn incompressible_traffic_backs_off_and_compressible_traffic_is_noticed() {
    let kp = Keypair::from_secret_bytes(&[1; 32]);
    let mut enc = BatchEncoder::new(1, 1024).unwrap();
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut out = BytesMut::new();
    // 100 batches of 1 KiB random payloads: none compressed, and zstd ran
    // on only a handful (1 + skips of 1, 2, 4, ..., 64).
    for _ in 0..100 {
        push_random_batch(&mut enc, &kp, &mut x, 32, 1024);
        out.clear();
        assert!(!enc.finish(Lane::Normal, &mut out).compressed);
    }
    assert!(enc.compress_attempts() <= 8, "{}", enc.compress_attempts());
    // Text arrives: within the longest skip, batches are compressed again.
    let mut compressed = 0;
    for b in 0..70u64 {
        push_text_batch(&mut enc, &kp, b, 32);
        out.clear();
        compressed += usize::from(enc.finish(Lane::Normal, &mut out).compressed);
    }
    assert!(compressed >= 5, "{compressed}");
}

/// `count` small JSON-like records broadcast by `from`, numbered `batch`:
/// they compress well.
fn push_text_batch(enc: &mut BatchEncoder, from: &Keypair, batch: u64, count: u64) {
    for i in 0..count {
        let text = format!("{{\"sensor\":\"cell-{i}\",\"batch\":{batch},\"status\":\"ok\"}}");
        enc.push(
            &Message::new(from.public(), Destination::Broadcast, Bytes::from(text)).with_nonce(i),
        );
    }
}

/// 64 messages from `from` to one cell, 128 random bytes each: zstd finds
/// only the repeated headers, under 2.5×.
fn headers_only_batch(enc: &mut BatchEncoder, from: &Keypair, x: &mut u64) -> Vec<Message> {
    let to = Keypair::from_secret_bytes(&[2; 32]).public();
    (0..64u64)
        .map(|i| {
            let payload: Vec<u8> = (0..128)
                .map(|_| {
                    *x ^= *x << 13;
                    *x ^= *x >> 7;
                    *x ^= *x << 17;
                    *x as u8
                })
                .collect();
            let m = Message::new(from.public(), Destination::Cell(to), Bytes::from(payload))
                .with_nonce(i);
            enc.push(&m);
            m
        })
        .collect()
}

#[test]
fn barely_compressible_traffic_goes_fast_and_text_gets_the_level_back() {
    let kp = Keypair::from_secret_bytes(&[1; 32]);
    let limits = Limits::default();
    let mut dec = BatchDecoder::new(limits).unwrap();
    let mut enc = BatchEncoder::new(1, 1024).unwrap();
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut out = BytesMut::new();
    assert!(!enc.is_fast());
    for b in 0..10 {
        let sent = headers_only_batch(&mut enc, &kp, &mut x);
        out.clear();
        let stats = enc.finish(Lane::Normal, &mut out);
        // The first batch, at level 1, shows the ratio; every later one is
        // at the fast level, and still round-trips.
        assert!(enc.is_fast(), "batch {b}: {stats:?}");
        assert!(
            stats.compressed,
            "batch {b}: headers still gain 20 %: {stats:?}"
        );
        let Frame::Batch(batch) = Frame::decode(out.split().freeze(), &limits).unwrap() else {
            panic!("not a batch");
        };
        let back: Vec<Message> = dec
            .messages(&batch)
            .unwrap()
            .map(|e| e.unwrap().to_message())
            .collect();
        assert_eq!(back, sent);
    }
    // Text arrives: the next probe at level 1 sees it compress well, and
    // the encoder keeps level 1 from then on.
    let mut probes = 0;
    for b in 0..PROBE_EVERY {
        push_text_batch(&mut enc, &kp, b, 64);
        out.clear();
        let stats = enc.finish(Lane::Normal, &mut out);
        assert!(stats.compressed);
        if !enc.is_fast() {
            probes += 1;
            assert!(stats.wire_bytes * 3 < stats.raw_bytes, "{stats:?}");
        }
    }
    assert!(
        probes > 0,
        "no probe at the configured level in {PROBE_EVERY} batches"
    );
    assert!(!enc.is_fast());
}

#[test]
fn a_slow_level_is_kept_whatever_the_traffic() {
    const { assert!(ADAPTIVE_MAX_LEVEL < 19) };
    let kp = Keypair::from_secret_bytes(&[1; 32]);
    let mut enc = BatchEncoder::new(19, 1024).unwrap();
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut out = BytesMut::new();
    for _ in 0..5 {
        headers_only_batch(&mut enc, &kp, &mut x);
        out.clear();
        assert!(enc.finish(Lane::Normal, &mut out).compressed);
        assert!(!enc.is_fast());
    }
}

/// `count` broadcasts from `from` with `len` random bytes each (a xorshift
/// stream from `x`).
fn push_random_batch(enc: &mut BatchEncoder, from: &Keypair, x: &mut u64, count: u64, len: usize) {
    for i in 0..count {
        let payload: Vec<u8> = (0..len)
            .map(|_| {
                *x ^= *x << 13;
                *x ^= *x >> 7;
                *x ^= *x << 17;
                *x as u8
            })
            .collect();
        enc.push(
            &Message::new(from.public(), Destination::Broadcast, Bytes::from(payload))
                .with_nonce(i),
        );
    }
}

#[test]
fn incompressible_batches_go_uncompressed_and_text_compresses() {
    let kp = Keypair::from_secret_bytes(&[1; 32]);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut out = BytesMut::new();

    // 1 KiB random payloads: their shared 60-byte headers are under 6 % of
    // the bytes, so zstd cannot save the 20 % the rule asks. zstd is tried
    // and the batch goes raw: the messages plus the 13-byte frame header.
    let mut enc = BatchEncoder::new(1, 1024).unwrap();
    push_random_batch(&mut enc, &kp, &mut x, 32, 1024);
    let stats = enc.finish(Lane::Normal, &mut out);
    assert_eq!(enc.compress_attempts(), 1);
    assert!(!stats.compressed, "{stats:?}");
    assert_eq!(stats.wire_bytes, stats.raw_bytes + 13, "{stats:?}");
    assert_eq!(out[6], 0, "batch flags: not compressed");

    // 128-byte random payloads: the headers are a third of the bytes and
    // zstd saves more than 20 % on them, so the batch is compressed, by at
    // least that much, and the encoder turns to the fast level (it gains
    // under 2.5×).
    let mut enc = BatchEncoder::new(1, 1024).unwrap();
    push_random_batch(&mut enc, &kp, &mut x, 64, 128);
    out.clear();
    let stats = enc.finish(Lane::Normal, &mut out);
    assert!(stats.compressed, "{stats:?}");
    assert!(stats.wire_bytes * 5 <= stats.raw_bytes * 4, "{stats:?}");
    assert!(
        stats.wire_bytes * 5 > stats.raw_bytes * 2,
        "random bytes stay: {stats:?}"
    );
    assert!(enc.is_fast());

    let mut enc = BatchEncoder::new(1, 1024).unwrap();
    for i in 0..64u64 {
        let text = format!("{{\"sensor\":\"cell-{i}\",\"temp\":21.{i},\"status\":\"ok\"}}");
        let m = Message::new(kp.public(), Destination::Broadcast, Bytes::from(text)).with_nonce(i);
        enc.push(&m);
    }
    out.clear();
    let text_stats = enc.finish(Lane::Normal, &mut out);
    assert!(text_stats.compressed);
    assert!(
        text_stats.wire_bytes * 3 < text_stats.raw_bytes,
        "{text_stats:?}"
    );
    assert!(
        !enc.is_fast(),
        "text compresses well: the configured level stays"
    );
}

/// A batch frame whose zstd data is `data` and whose header claims `raw_len`.
fn forged_zstd_batch(data: &[u8], raw_len: u32, count: u16) -> Bytes {
    let mut f = BytesMut::new();
    f.put_u32_le((1 + 8 + data.len()) as u32);
    f.put_u8(0x01);
    f.put_u8(Lane::Normal as u8);
    f.put_u8(1);
    f.put_u16_le(count);
    f.put_u32_le(raw_len);
    f.put_slice(data);
    f.freeze()
}

#[test]
fn decompression_bomb_is_refused() {
    let limits = Limits::default();
    // 64 MiB of zeros compress to a few KiB.
    let zeros = vec![0u8; 64 << 20];
    let bomb = zstd::bulk::compress(&zeros, 19).unwrap();
    assert!(bomb.len() < 64 * 1024);

    // Claiming the true size is over the frame bound: refused at the header.
    let f = forged_zstd_batch(&bomb, 64 << 20, 1);
    assert!(matches!(
        Frame::decode(f, &limits),
        Err(DecodeError::TooLarge {
            what: "batch raw length",
            ..
        })
    ));

    // Lying about the size: refused before decompressing a byte.
    let f = forged_zstd_batch(&bomb, 1000, 1);
    let Frame::Batch(batch) = Frame::decode(f, &limits).unwrap() else {
        panic!()
    };
    let mut dec = BatchDecoder::new(limits).unwrap();
    assert!(matches!(
        dec.messages(&batch),
        Err(DecodeError::Decompress(_))
    ));

    // A zstd stream without a content size (streaming encoder) is refused too.
    let mut streamed = Vec::new();
    {
        let mut w = zstd::stream::Encoder::new(&mut streamed, 1).unwrap();
        std::io::Write::write_all(&mut w, &zeros[..1 << 20]).unwrap();
        w.finish().unwrap();
    }
    let f = forged_zstd_batch(&streamed, 1000, 1);
    let Frame::Batch(batch) = Frame::decode(f, &limits).unwrap() else {
        panic!()
    };
    assert!(matches!(
        dec.messages(&batch),
        Err(DecodeError::Decompress(_))
    ));
}

#[test]
fn batch_count_must_match_its_messages() {
    let kp = Keypair::from_secret_bytes(&[1; 32]);
    let m = Message::new(
        kp.public(),
        Destination::Broadcast,
        Bytes::from_static(b"x"),
    );
    let mut raw = BytesMut::new();
    m.encode(&mut raw);
    m.encode(&mut raw);
    for (count, ok) in [(1u16, false), (2, true), (3, false)] {
        let mut f = BytesMut::new();
        f.put_u32_le((1 + 8 + raw.len()) as u32);
        f.put_u8(0x01);
        f.put_u8(Lane::Normal as u8);
        f.put_u8(0);
        f.put_u16_le(count);
        f.put_u32_le(raw.len() as u32);
        f.put_slice(&raw);
        let Frame::Batch(batch) = Frame::decode(f.freeze(), &Limits::default()).unwrap() else {
            panic!()
        };
        let mut dec = BatchDecoder::new(Limits::default()).unwrap();
        let all_ok = dec.messages(&batch).unwrap().all(|r| r.is_ok());
        assert_eq!(all_ok, ok, "count {count}");
    }
}

#[test]
fn a_frame_claiming_4_gib_is_refused_from_its_prefix() {
    let mut b = BytesMut::new();
    b.put_u32_le(u32::MAX);
    assert!(matches!(
        Frame::take(&mut b, &Limits::default()),
        Err(DecodeError::TooLarge { what: "frame", .. })
    ));
}

#[test]
fn batch_verification_names_the_bad_signature() {
    let envs: Vec<Envelope> = (0..64u8)
        .map(|i| {
            let (_, b) = signed_sample(10 + i % 7, &[i; 40], i as u64);
            Envelope::parse(&mut b.clone(), &Limits::default()).unwrap()
        })
        .collect();
    let refs: Vec<&Envelope> = envs.iter().collect();
    assert!(verify_batch(&refs).is_ok());
    assert!(verify_each(&refs).iter().all(|r| r.is_ok()));

    // Tamper with message 17's payload.
    let mut raw = BytesMut::from(&envs[17].raw()[..]);
    raw[100] ^= 1;
    let bad = Envelope::parse(&mut raw.freeze(), &Limits::default()).unwrap();
    let mut refs = refs.clone();
    refs[17] = &bad;
    assert_eq!(verify_batch(&refs), Err(VerifyError::BadSignature));
    let verdicts = verify_each(&refs);
    for (i, v) in verdicts.iter().enumerate() {
        assert_eq!(v.is_ok(), i != 17, "message {i}");
    }

    // An unsigned message cannot pass a signature check.
    let (kp, _) = signed_sample(3, b"x", 0);
    let unsigned = Message::new(kp.public(), Destination::Broadcast, Bytes::new());
    let e = Envelope::parse(&mut encode(&unsigned), &Limits::default()).unwrap();
    assert_eq!(e.verify(), Err(VerifyError::Unsigned));
}

#[test]
fn a_signature_by_another_key_is_refused() {
    let (_, b) = signed_sample(1, b"hello", 0);
    let mut t = BytesMut::from(&b[..]);
    // Swap in another source key: signature no longer matches.
    let other = Keypair::from_secret_bytes(&[2; 32]).public();
    t[12..44].copy_from_slice(&other.0);
    let env = Envelope::parse(&mut t.freeze(), &Limits::default()).unwrap();
    assert_eq!(env.verify(), Err(VerifyError::BadSignature));
}

#[test]
fn control_frames_refuse_bad_values() {
    let limits = Limits::default();
    let hello = Frame::Hello {
        version: 1,
        role: Role::Cell,
        notices: false,
        agent: "x".into(),
    }
    .to_bytes();
    let mut bad_role = BytesMut::from(&hello[..]);
    bad_role[7] = 9;
    assert!(matches!(
        Frame::decode(bad_role.freeze(), &limits),
        Err(DecodeError::Invalid { field: "role", .. })
    ));
    let mut trailing = BytesMut::from(&hello[..]);
    trailing.put_u8(0);
    let n = trailing.len() as u32 - 4;
    trailing[..4].copy_from_slice(&n.to_le_bytes());
    assert!(matches!(
        Frame::decode(trailing.freeze(), &limits),
        Err(DecodeError::Trailing(1))
    ));
    let close = Frame::Close {
        code: CloseCode::Oversize,
        reason: "too big".into(),
    };
    assert_eq!(Frame::decode(close.to_bytes(), &limits).unwrap(), close);
    // Too many services for the limits.
    let announce = Frame::Announce {
        app_version: "1".into(),
        services: (0..20)
            .map(|i| ServiceName::new(format!("s{i}")).unwrap())
            .collect(),
    };
    assert!(matches!(
        Frame::decode(announce.to_bytes(), &limits),
        Err(DecodeError::TooLarge {
            what: "services",
            ..
        })
    ));
}

// ---------------------------------------------------------------------------
// Mesh frames (relay to relay)

fn key() -> impl Strategy<Value = relay_codec::PublicKey> {
    any::<[u8; 32]>().prop_map(relay_codec::PublicKey)
}

fn route_header() -> impl Strategy<Value = relay_codec::RouteHeader> {
    (key(), key(), any::<u8>()).prop_map(|(origin, target, hops)| relay_codec::RouteHeader {
        origin,
        target,
        hops,
    })
}

fn location() -> impl Strategy<Value = relay_codec::Location> {
    (key(), any::<u64>()).prop_map(|(home, version)| relay_codec::Location { home, version })
}

fn mesh_frame() -> impl Strategy<Value = relay_codec::MeshFrame> {
    use relay_codec::MeshFrame as M;
    prop_oneof![
        any::<u64>().prop_map(|nonce| M::Ping { nonce }),
        any::<u64>().prop_map(|nonce| M::Pong { nonce }),
        (
            key(),
            any::<u64>(),
            "[a-z0-9.:]{0,40}",
            prop::collection::vec(key(), 0..20)
        )
            .prop_map(|(origin, seq, addr, neighbors)| M::LinkState {
                origin,
                seq,
                addr,
                neighbors
            }),
        (lane(), 1u32..).prop_map(|(lane, grant)| M::Credit { lane, grant }),
        (route_header(), any::<bool>(), key(), location()).prop_map(|(header, up, cell, at)| {
            M::Route {
                header,
                up,
                cell,
                at,
            }
        }),
        (route_header(), any::<u32>(), key()).prop_map(|(header, request, cell)| M::Lookup {
            header,
            request,
            cell
        }),
        (
            route_header(),
            any::<u32>(),
            key(),
            prop::option::of(location())
        )
            .prop_map(|(header, request, cell, at)| M::LookupReply {
                header,
                request,
                cell,
                at
            }),
        (
            route_header(),
            any::<[u8; 16]>(),
            key(),
            any::<u8>(),
            any::<u32>(),
            key()
        )
            .prop_map(|(header, id, source, ttl, in_relay_us, next)| M::Trace {
                header,
                id: relay_codec::MessageId(id),
                source,
                ttl,
                in_relay_us,
                next
            }),
    ]
}

proptest! {
    #[test]
    fn mesh_frames_round_trip(m in mesh_frame()) {
        let f = relay_codec::Frame::Mesh(m);
        let b = f.to_bytes();
        prop_assert_eq!(relay_codec::Frame::decode(b.clone(), &Limits::default()).unwrap(), f);
        // Every truncation is an error or "more bytes needed", never a panic.
        for cut in 0..b.len() {
            let mut short = BytesMut::from(&b[..cut]);
            prop_assert!(!matches!(relay_codec::Frame::take(&mut short, &Limits::default()), Ok(Some(_))));
        }
    }

    #[test]
    fn arbitrary_mesh_bodies_never_panic(ty in 0x0Bu8..=0x12, body in prop::collection::vec(any::<u8>(), 0..300)) {
        let mut b = BytesMut::new();
        b.put_u32_le(1 + body.len() as u32);
        b.put_u8(ty);
        b.put_slice(&body);
        let _ = relay_codec::Frame::decode(b.freeze(), &Limits::default());
    }
}
