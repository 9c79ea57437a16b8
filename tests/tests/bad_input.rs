//! Bad input of every kind against a real relay process. Each case must be
//! refused with a reason the offender can read (a close code and text, or
//! a notice), a counter on /metrics and a line in the relay's log — while
//! two honest cells on the same relay keep exchanging messages: they are
//! started first (one over QUIC, one over TCP) and checked after every bad
//! case. Every case that is not about UDP datagrams runs over both
//! transports ([`each_transport!`]); what only TCP can get wrong is in
//! tcp.rs.

use bytes::{BufMut, Bytes, BytesMut};
use relay_client::cell::{AuthMode, Cell, CellError, CellOptions, Event};
use relay_codec::frame::{CloseCode, NoticeCode, Role};
use relay_codec::{BatchFrame, Destination, Envelope, Frame, Keypair, Lane, Limits, PublicKey};
use relay_core::STUCK_AFTER_MS;
use relay_link::quic::TransportTuning;
use relay_link::{LinkEnd, Transport, tls};
use relay_tests::cells::{HonestPair, WAIT, connect, options, options_over, wait_event, within};
use relay_tests::raw::{
    self, RawLink, RawOptions, batch_frame, encoded, envelope, message, noise, now_ms, signed,
};
use relay_tests::{RelayProcess, each_transport};

/// Two honest cells, one on each transport, exchanging a first round.
async fn honest(relay: &RelayProcess) -> HonestPair {
    HonestPair::start_over(relay, Transport::Quic, Transport::Tcp).await
}

/// Handshakes the relay refused over `t` so far: QUIC counts them as
/// links closed for `handshake_failed`, the TCP listener as
/// `celluler_tcp_handshakes_refused_total{reason="failed"}`.
fn handshakes_refused(relay: &RelayProcess, t: Transport) -> f64 {
    match t {
        Transport::Quic => closed(relay, "handshake_failed"),
        Transport::Tcp => {
            relay.metric("celluler_tcp_handshakes_refused_total", "reason=\"failed\"")
        }
    }
}

/// Waits until the relay counted `n` refused handshakes over `t` and
/// logged a refusal.
async fn expect_handshakes_refused(relay: &RelayProcess, t: Transport, n: f64) {
    let (name, labels, log) = match t {
        Transport::Quic => (
            "celluler_links_closed_total",
            "reason=\"handshake_failed\"",
            "link refused during the QUIC/TLS handshake",
        ),
        Transport::Tcp => (
            "celluler_tcp_handshakes_refused_total",
            "reason=\"failed\"",
            "TCP connections refused before their TLS handshake finished",
        ),
    };
    relay.wait_metric_async(name, labels, n, WAIT).await;
    relay.wait_log_async(log, WAIT).await;
}

/// A TLS handshake over `t` with the relay, pinning `server_key` and
/// offering `alpn`: the error text if the connecting side saw it fail. In
/// TLS 1.3 over TCP a client finishes before the server has judged it, so
/// there the client's first read is what shows the refusal.
async fn handshake_error(
    relay: &RelayProcess,
    t: Transport,
    server_key: PublicKey,
    alpn: &[u8],
) -> Option<String> {
    let key = Keypair::generate();
    match t {
        Transport::Quic => {
            let (_ep, conn) = raw::dial(
                relay.quic,
                server_key,
                &key,
                &TransportTuning::default(),
                alpn,
            )
            .await;
            conn.err().map(|e| e.to_string())
        }
        Transport::Tcp => raw::tcp_handshake_error(relay, server_key, &key, alpn).await,
    }
}

fn drops(relay: &RelayProcess, reason: &str) -> f64 {
    relay.metric("celluler_drops_total", &format!("reason=\"{reason}\""))
}

fn closed(relay: &RelayProcess, reason: &str) -> f64 {
    relay.metric(
        "celluler_links_closed_total",
        &format!("reason=\"{reason}\""),
    )
}

/// Waits until `drops_total{reason}` reaches `n`, then checks it is exactly `n`.
async fn expect_drops(relay: &RelayProcess, reason: &str, n: f64) {
    let labels = format!("reason=\"{reason}\"");
    relay
        .wait_metric_async("celluler_drops_total", &labels, n, WAIT)
        .await;
    assert_eq!(drops(relay, reason), n, "drops_total{{{labels}}}");
}

/// A raw cell link over `t`, connected and attached.
async fn raw_link(relay: &RelayProcess, t: Transport) -> RawLink {
    RawLink::connect_over(relay, Keypair::generate(), t)
        .await
        .unwrap_or_else(|e| panic!("raw link over {t}: {e}; relay log:\n{}", relay.log()))
}

/// Checks that the relay closed `link` with `code` and a reason containing
/// `words`, and logged that reason. Returns the reason.
async fn expect_closed(
    relay: &RelayProcess,
    link: &RawLink,
    code: CloseCode,
    words: &str,
) -> String {
    let (got, reason) = link.closed(WAIT).await;
    assert_eq!(got, code, "close code; reason {reason:?}");
    assert!(
        reason.contains(words),
        "close reason {reason:?} lacks {words:?}"
    );
    relay.wait_log_async(&reason, WAIT).await;
    reason
}

/// A raw receiver's next message must be `want`: the same authenticated
/// bytes, with the TTL one hop lower.
async fn expect_next(link: &mut RawLink, want: &Envelope, what: &str) {
    let got = link
        .next_message(WAIT)
        .await
        .unwrap_or_else(|| panic!("{what}: nothing arrived"));
    assert_eq!(
        got.authenticated_bytes(),
        want.authenticated_bytes(),
        "{what}: got {got:?}, want {want:?}"
    );
    assert_eq!(got.ttl(), want.ttl() - 1, "{what}: TTL after one hop");
}

/// Sends one signed marker from `from` to `to` on `lane`, and returns it.
async fn marker(from: &mut RawLink, to: PublicKey, lane: Lane, text: &str) -> Envelope {
    let m = signed(
        &message(
            &from.key,
            Destination::Cell(to),
            lane,
            text.as_bytes().to_vec(),
        ),
        &from.key,
    );
    from.send_batch(lane, std::slice::from_ref(&m))
        .await
        .expect("send marker");
    m
}

/// The next notice a raw link got, about one message.
async fn notice(link: &mut RawLink) -> (NoticeCode, relay_codec::MessageId, PublicKey) {
    loop {
        match link.next_control(WAIT).await {
            Some(Frame::Notice {
                code,
                count,
                id,
                subject,
            }) => {
                assert_eq!(count, 1, "a notice about one message");
                return (code, id, subject);
            }
            Some(_) => continue,
            None => panic!("no notice within {WAIT:?}"),
        }
    }
}

/// Sends `n` datagrams of `len` noise bytes with the QUIC fixed bit
/// (0x40) cleared: they cannot be QUIC packets of any version.
fn send_non_quic(relay: &RelayProcess, n: usize, seed: u64) {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for i in 0..n {
        let mut d = noise(64 + (i * 97) % 1200, seed + i as u64);
        d[0] &= !0x40;
        sock.send_to(&d, relay.quic).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_datagrams_do_not_disturb_the_relay() {
    let relay = RelayProcess::start();
    let mut pair = honest(&relay).await;
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for i in 0..600u64 {
        let mut d = noise(8 + (i as usize * 7919) % 1392, i);
        match i % 3 {
            // Fixed bit clear: cannot be QUIC at all.
            0 => d[0] &= !0x40,
            // A long header (Initial-looking) with random contents.
            1 => d[0] |= 0xC0,
            // A short header for a connection that does not exist.
            _ => d[0] = (d[0] & 0x3F) | 0x40,
        }
        sock.send_to(&d, relay.quic).unwrap();
    }
    // Nothing to answer garbage with but silence (or a version
    // negotiation); the relay keeps serving everyone else.
    pair.exchange("after 600 garbage datagrams").await;
    let (status, health) = relay.http_get("/health");
    assert_eq!(status, 200, "{health}");
    // What cannot be QUIC is counted and logged.
    relay
        .wait_metric_async("celluler_not_quic_datagrams_total", "", 1.0, WAIT)
        .await;
    relay
        .wait_log_async("dropped UDP datagrams that are not QUIC packets", WAIT)
        .await;
    // A new cell can still link.
    let late = connect(&relay, Keypair::generate(), options()).await;
    pair.exchange("after the garbage was counted").await;
    within("close late", WAIT, late.close()).await.unwrap();
    pair.close().await;
    relay.stop();
}

/// `celluler_not_quic_datagrams_total` counts garbage, not honest QUIC.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_datagrams_that_cannot_be_quic_are_counted_as_garbage() {
    let relay = RelayProcess::start();
    let mut pair = honest(&relay).await;
    for i in 0..50 {
        pair.exchange(&format!("honest round {i}")).await;
    }
    // Ten datagrams that cannot be QUIC, after all the honest traffic:
    // once they are counted, so is anything before them.
    send_non_quic(&relay, 10, 99);
    relay
        .wait_metric_async("celluler_not_quic_datagrams_total", "", 10.0, WAIT)
        .await;
    assert_eq!(
        relay.metric("celluler_not_quic_datagrams_total", ""),
        10.0,
        "honest QUIC packets were counted as garbage"
    );
    pair.close().await;
    relay.stop();
}

each_transport!(a_wrong_alpn_is_refused_during_the_handshake);
async fn a_wrong_alpn_is_refused_during_the_handshake(t: Transport) {
    let relay = RelayProcess::start();
    let mut pair = honest(&relay).await;
    let before = handshakes_refused(&relay, t);
    let text = handshake_error(&relay, t, relay.key, b"not-celluler/9")
        .await
        .expect("a connection offering another protocol must fail");
    // QUIC's and TLS's alert 120: no_application_protocol.
    assert!(
        text.contains("handshake")
            || text.contains("120")
            || text.contains("NoApplicationProtocol"),
        "{text}"
    );
    expect_handshakes_refused(&relay, t, before + 1.0).await;
    pair.exchange("after a wrong ALPN").await;
    pair.close().await;
    relay.stop();
}

each_transport!(an_unknown_protocol_version_is_refused_with_the_version_named);
async fn an_unknown_protocol_version_is_refused_with_the_version_named(t: Transport) {
    let relay = RelayProcess::start();
    let mut pair = honest(&relay).await;
    let before = closed(&relay, "handshake_failed");
    let opts = RawOptions::default().over(t);
    let (_ep, link) = raw::dial_link(&relay, t, &Keypair::generate(), &opts)
        .await
        .expect("TLS handshake");
    let (mut send, mut reader) = link.open_control().await.unwrap();
    let hello = Frame::Hello {
        version: 99,
        role: Role::Cell,
        notices: true,
        agent: "from-the-future/99".into(),
    };
    send.send(&hello).await.unwrap();
    let answer = within("the answer to Hello v99", WAIT, reader.next()).await;
    let (code, reason) = match answer {
        Ok(Some(Frame::Close { code, reason })) => (code, reason),
        Ok(other) => panic!("expected Close, got {other:?}"),
        Err(e) => match link.end() {
            Some(LinkEnd::Closed { code, reason }) => (code, reason),
            _ => panic!("expected a refusal, got {e}"),
        },
    };
    assert_eq!(code, CloseCode::Version, "{reason}");
    assert!(reason.contains("version 99"), "{reason}");
    assert!(reason.contains("version 1"), "{reason}");
    // The connection is closed with the same code after the Close frame.
    match within("connection closed", WAIT, link.closed()).await {
        LinkEnd::Closed { code, .. } => assert_eq!(code, CloseCode::Version),
        other => panic!("expected an application close, got {other:?}"),
    }
    relay.wait_log_async(&reason, WAIT).await;
    relay
        .wait_metric_async(
            "celluler_links_closed_total",
            "reason=\"handshake_failed\"",
            before + 1.0,
            WAIT,
        )
        .await;
    pair.exchange("after Hello version 99").await;
    pair.close().await;
    relay.stop();
}

each_transport!(a_relay_that_proves_another_key_is_refused_by_the_cell);
async fn a_relay_that_proves_another_key_is_refused_by_the_cell(t: Transport) {
    let relay = RelayProcess::start();
    let mut pair = honest(&relay).await;
    let before = handshakes_refused(&relay, t);
    // TLS proves the key each side holds: a cell pinned to another relay
    // key than the one this relay proves must refuse to link.
    let mut wrong = relay.addr_over(t);
    wrong.key = Keypair::generate().public();
    let err = within(
        "connect pinned to the wrong key",
        WAIT,
        Cell::connect(&wrong, Keypair::generate(), options_over(t)),
    )
    .await
    .expect_err("a cell must not link to a relay that proves another key");
    let text = err.to_string();
    assert!(matches!(err, CellError::Connect { .. }), "{err:?}");
    assert!(
        text.contains("KEY in KEY@HOST:PORT"),
        "the error says what to check: {text}"
    );
    // The same at the transport level, with the reason.
    let err = handshake_error(&relay, t, wrong.key, tls::ALPN)
        .await
        .expect("pinned to the wrong key");
    assert!(
        err.contains("certificate") || err.contains("Certificate") || err.contains("key"),
        "a clear error: {err}"
    );
    // The relay sees both handshakes fail.
    expect_handshakes_refused(&relay, t, before + 2.0).await;
    pair.exchange("after clients refused the relay's key").await;
    pair.close().await;
    relay.stop();
}

each_transport!(a_forged_source_closes_the_link);
async fn a_forged_source_closes_the_link(t: Transport) {
    let relay = RelayProcess::start();
    let mut pair = honest(&relay).await;
    let mut forger = raw_link(&relay, t).await;
    // Claims to be honest cell a, writing to honest cell b.
    let impostor = Keypair::generate();
    let mut msg = message(
        &impostor,
        Destination::Cell(pair.b.public_key()),
        Lane::Normal,
        &b"I am a"[..],
    );
    msg.source = pair.a.public_key();
    let env = signed(&msg, &impostor);
    forger.send_batch(Lane::Normal, &[env]).await.unwrap();
    let reason = expect_closed(
        &relay,
        &forger,
        CloseCode::ForgedSource,
        "is not this link's key",
    )
    .await;
    assert!(
        reason.contains(&pair.a.public_key().to_string()),
        "{reason}"
    );
    expect_drops(&relay, "forged_source", 1.0).await;
    // b's next message is the honest one: the forgery never reached it.
    pair.exchange("after a forged source").await;
    pair.close().await;
    relay.stop();
}

each_transport!(links_the_relay_closes_are_counted_under_their_reason);
/// What every close the relay makes is counted under: its own reason in
/// `celluler_links_closed_total`.
async fn links_the_relay_closes_are_counted_under_their_reason(t: Transport) {
    let relay = RelayProcess::start();
    let mut forger = raw_link(&relay, t).await;
    let impostor = Keypair::generate();
    let mut msg = message(
        &impostor,
        Destination::Broadcast,
        Lane::Normal,
        &b"forged"[..],
    );
    msg.source = Keypair::generate().public();
    forger
        .send_batch(Lane::Normal, &[signed(&msg, &impostor)])
        .await
        .unwrap();
    forger.closed(WAIT).await;
    let mut garbage = raw_link(&relay, t).await;
    garbage
        .send_raw(Lane::Normal, &[5, 0, 0, 0, 0x7F, 1, 2, 3, 4])
        .await
        .unwrap();
    garbage.closed(WAIT).await;
    relay
        .wait_metric_async("celluler_links_closed_total", "", 2.0, WAIT)
        .await;
    let body = relay.http_get("/metrics").1;
    assert_eq!(
        closed(&relay, "forged_source"),
        1.0,
        "links closed:\n{}",
        body.lines()
            .filter(|l| l.starts_with("celluler_links_closed_total"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(closed(&relay, "malformed"), 1.0);
    assert_eq!(closed(&relay, "normal"), 0.0);
    // A link replaced by a newer one of the same key.
    let key = Keypair::generate();
    let old = RawLink::connect_over(&relay, Keypair::from_secret_bytes(&key.secret_bytes()), t)
        .await
        .unwrap();
    let _new = RawLink::connect_over(&relay, key, t).await.unwrap();
    let (code, reason) = old.closed(WAIT).await;
    assert!(reason.contains("replaced"), "{code:?}: {reason}");
    relay
        .wait_metric_async("celluler_links_closed_total", "", 3.0, WAIT)
        .await;
    assert_eq!(closed(&relay, "replaced"), 1.0);
    relay.stop();
}

const SMALL_LIMITS: &str =
    "[limits]\nmax_payload = 1024\nmax_frame = 8192\n\n[link]\nbatch_bytes = 4096\n";

each_transport!(an_oversize_message_or_frame_closes_the_link);
async fn an_oversize_message_or_frame_closes_the_link(t: Transport) {
    let relay = RelayProcess::start_with_config(SMALL_LIMITS);
    let mut pair = honest(&relay).await;
    let b = pair.b.public_key();

    // A payload over max_payload, in a frame under max_frame.
    let mut big = raw_link(&relay, t).await;
    assert_eq!(big.welcome.max_payload, 1024);
    assert_eq!(big.welcome.max_frame, 8192);
    let env = signed(
        &message(
            &big.key,
            Destination::Cell(b),
            Lane::Normal,
            vec![7u8; 2000],
        ),
        &big.key,
    );
    big.send_batch(Lane::Normal, &[env]).await.unwrap();
    let reason = expect_closed(&relay, &big, CloseCode::Oversize, "payload").await;
    assert!(
        reason.contains("2000") && reason.contains("1024"),
        "{reason}"
    );
    expect_drops(&relay, "oversize", 1.0).await;
    pair.exchange("after an oversize payload").await;

    // A frame whose length prefix is over max_frame: refused on its first
    // four bytes, before anything is buffered.
    let mut huge = raw_link(&relay, t).await;
    let mut frame = BytesMut::new();
    frame.put_u32_le(1 << 20);
    frame.put_u8(0x01);
    huge.send_raw(Lane::Normal, &frame).await.unwrap();
    let reason = expect_closed(&relay, &huge, CloseCode::Oversize, "frame").await;
    assert!(reason.contains("8192"), "{reason}");
    expect_drops(&relay, "oversize", 2.0).await;
    pair.exchange("after an oversize frame").await;

    // An honest cell learns the limit from Welcome and refuses locally.
    let err = pair
        .a
        .send(b, Lane::Normal, vec![0u8; 2000])
        .await
        .expect_err("over the relay's max_payload");
    assert!(
        matches!(
            err,
            CellError::PayloadTooLarge {
                size: 2000,
                limit: 1024
            }
        ),
        "{err:?}"
    );
    pair.exchange("after a refused local send").await;
    pair.close().await;
    relay.stop();
}

/// A zstd batch frame with `raw_len` in its header and `data` as its body.
fn zstd_batch(raw_len: u32, data: Vec<u8>) -> Bytes {
    Frame::Batch(BatchFrame {
        lane: Lane::Normal,
        compressed: true,
        hops: 0,
        count: 1,
        raw_len,
        data: Bytes::from(data),
    })
    .to_bytes()
}

/// `frame` (one zstd frame with its content size) with the content size
/// field rewritten to `claim`: the header lies, the data does not.
fn lie_about_content_size(mut frame: Vec<u8>, claim: u64) -> Vec<u8> {
    let fhd = frame[4];
    let single_segment = fhd & 0x20 != 0;
    let did = [0, 1, 2, 4][(fhd & 3) as usize];
    let (fcs_len, bias) = match fhd >> 6 {
        0 if single_segment => (1, 0),
        0 => panic!("no content size field"),
        1 => (2, 256),
        2 => (4, 0),
        _ => (8, 0),
    };
    let at = 5 + usize::from(!single_segment) + did;
    let v = (claim - bias).to_le_bytes();
    frame[at..at + fcs_len].copy_from_slice(&v[..fcs_len]);
    frame
}

each_transport!(a_decompression_bomb_closes_the_link);
async fn a_decompression_bomb_closes_the_link(t: Transport) {
    let relay = RelayProcess::start();
    let mut pair = honest(&relay).await;
    let zeros = vec![0u8; 1 << 20];
    let honest_frame = zstd::bulk::compress(&zeros, 1).unwrap();
    assert!(honest_frame.len() < 1024, "1 MiB of zeros packs small");
    let mut unsized_frame = Vec::new();
    {
        let mut enc = zstd::stream::Encoder::new(&mut unsized_frame, 1).unwrap();
        enc.include_contentsize(false).unwrap();
        std::io::copy(&mut &zeros[..], &mut enc).unwrap();
        enc.finish().unwrap();
    }
    assert!(
        zstd::zstd_safe::get_frame_content_size(&unsized_frame)
            .unwrap()
            .is_none()
    );
    let cases: [(&str, Bytes, &str); 3] = [
        // The header says 1000 bytes; the zstd frame says 1 MiB.
        (
            "zstd frame claims 1 MiB",
            zstd_batch(1000, honest_frame.clone()),
            "claims",
        ),
        // No content size: the decoder cannot bound it before starting.
        (
            "zstd frame without a content size",
            zstd_batch(1000, unsized_frame),
            "content size",
        ),
        // Both headers say 1000 bytes; the data expands to 1 MiB.
        (
            "zstd frame lying about its size",
            zstd_batch(1000, lie_about_content_size(honest_frame, 1000)),
            "decompression failed",
        ),
    ];
    for (i, (what, frame, words)) in cases.into_iter().enumerate() {
        let mut bomber = raw_link(&relay, t).await;
        bomber.send_raw(Lane::Normal, &frame).await.unwrap();
        let reason = expect_closed(&relay, &bomber, CloseCode::Malformed, words).await;
        assert!(reason.contains("decompression failed"), "{what}: {reason}");
        expect_drops(&relay, "malformed", (i + 1) as f64).await;
        pair.exchange(&format!("after a {what}")).await;
    }
    pair.close().await;
    relay.stop();
}

/// `frame`, a batch without a hop count, with the hop-count flag set and
/// `hops` inserted after `raw_len` (docs/PROTOCOL.md 5), 0 included.
fn with_hops(frame: Bytes, hops: u8) -> Vec<u8> {
    let mut v = frame.to_vec();
    let len = u32::from_le_bytes(v[..4].try_into().unwrap()) + 1;
    v[..4].copy_from_slice(&len.to_le_bytes());
    v[6] |= 0x02;
    v.insert(13, hops);
    v
}

each_transport!(malformed_frames_close_the_link);
async fn malformed_frames_close_the_link(t: Transport) {
    let relay = RelayProcess::start();
    let mut pair = honest(&relay).await;
    // A well-formed message from `link`'s own key to itself, so only the
    // framing is wrong (and a batch the relay accepts before the bad one
    // reaches no honest cell).
    let good = |link: &RawLink, lane| {
        signed(
            &message(&link.key, Destination::Cell(link.public()), lane, &b"x"[..]),
            &link.key,
        )
    };
    type Bad = fn(&RawLink, &dyn Fn(&RawLink, Lane) -> Envelope) -> Vec<u8>;
    let cases: [(&str, Bad, &str); 7] = [
        (
            "an unknown frame type",
            |_, _| vec![5, 0, 0, 0, 0x7F, 1, 2, 3, 4],
            "frame type",
        ),
        (
            "a Hello on a data stream",
            |_, _| {
                Frame::Hello {
                    version: 1,
                    role: Role::Cell,
                    notices: false,
                    agent: String::new(),
                }
                .to_bytes()
                .to_vec()
            },
            "Hello frame on a data stream",
        ),
        (
            "two lanes on one stream",
            |l, good| {
                let mut v = batch_frame(Lane::Normal, &[good(l, Lane::Normal)]).to_vec();
                v.extend_from_slice(&batch_frame(Lane::High, &[good(l, Lane::High)]));
                v
            },
            "one lane only",
        ),
        (
            "a batch whose count lies",
            |l, good| {
                let mut v = batch_frame(Lane::Normal, &[good(l, Lane::Normal)]).to_vec();
                v[7] = 2; // count (u16 LE at offset 7): 2, for one message
                v
            },
            "truncated",
        ),
        // QUIC's reader takes the frame and finds it truncated; TCP's
        // demultiplexer refuses the length prefix itself.
        (
            "a zero-length frame",
            |_, _| vec![0, 0, 0, 0],
            "truncated|length 0",
        ),
        (
            "a hop count over a message's TTL",
            |l, good| with_hops(batch_frame(Lane::Normal, &[good(l, Lane::Normal)]), 17),
            "TTL below the batch's hops",
        ),
        (
            "a hop-count flag with a hop count of 0",
            |l, good| with_hops(batch_frame(Lane::Normal, &[good(l, Lane::Normal)]), 0),
            "batch hops",
        ),
    ];
    for (i, (what, bytes, words)) in cases.into_iter().enumerate() {
        let mut bad = raw_link(&relay, t).await;
        let bytes = bytes(&bad, &good);
        bad.send_raw(Lane::Normal, &bytes).await.unwrap();
        let words = match words.split_once('|') {
            Some((quic, tcp)) => [quic, tcp][usize::from(t == Transport::Tcp)],
            None => words,
        };
        expect_closed(&relay, &bad, CloseCode::Malformed, words).await;
        expect_drops(&relay, "malformed", (i + 1) as f64).await;
        pair.exchange(&format!("after {what}")).await;
    }
    // A data stream that ends inside a frame.
    let mut cut = raw_link(&relay, t).await;
    let frame = batch_frame(Lane::Normal, &[good(&cut, Lane::Normal)]);
    cut.send_raw(Lane::Normal, &frame[..frame.len() - 3])
        .await
        .unwrap();
    cut.finish_lanes().await;
    expect_closed(&relay, &cut, CloseCode::Malformed, "ended inside a frame").await;
    pair.exchange("after a stream cut inside a frame").await;
    // A Batch on the control stream.
    let mut wrong = raw_link(&relay, t).await;
    let frame = Frame::decode(
        batch_frame(Lane::Normal, &[good(&wrong, Lane::Normal)]),
        &Limits::default(),
    )
    .unwrap();
    wrong.send_control(&frame).await.unwrap();
    expect_closed(&relay, &wrong, CloseCode::Malformed, "unexpected").await;
    pair.exchange("after a batch on the control stream").await;
    pair.close().await;
    relay.stop();
}

each_transport!(a_replayed_message_is_delivered_once);
async fn a_replayed_message_is_delivered_once(t: Transport) {
    let relay = RelayProcess::start();
    let mut pair = honest(&relay).await;
    let mut receiver = raw_link(&relay, t).await;
    let sender_key = Keypair::generate();
    let mut sender = RawLink::connect_over(
        &relay,
        Keypair::from_secret_bytes(&sender_key.secret_bytes()),
        t,
    )
    .await
    .unwrap();
    let env = signed(
        &message(
            &sender_key,
            Destination::Cell(receiver.public()),
            Lane::Normal,
            &b"pay 10 coins"[..],
        ),
        &sender_key,
    );
    // The same bytes twice, in two batches.
    sender
        .send_batch(Lane::Normal, std::slice::from_ref(&env))
        .await
        .unwrap();
    sender
        .send_batch(Lane::Normal, std::slice::from_ref(&env))
        .await
        .unwrap();
    let after = marker(
        &mut sender,
        receiver.public(),
        Lane::Normal,
        "after the replay",
    )
    .await;
    expect_next(&mut receiver, &env, "the original").await;
    expect_next(&mut receiver, &after, "the marker, not the replay").await;
    expect_drops(&relay, "duplicate", 1.0).await;
    assert_eq!(relay.metric("celluler_dedup_hits_total", ""), 1.0);
    pair.exchange("after a replay").await;

    // Replayed again from a new link of the same key (a restarted cell, or
    // whoever captured the bytes and holds the key).
    let mut again = RawLink::connect_over(&relay, sender_key, t).await.unwrap();
    again
        .send_batch(Lane::Normal, std::slice::from_ref(&env))
        .await
        .unwrap();
    let after = marker(
        &mut again,
        receiver.public(),
        Lane::Normal,
        "after the second replay",
    )
    .await;
    expect_next(&mut receiver, &after, "the marker, not the second replay").await;
    expect_drops(&relay, "duplicate", 2.0).await;
    relay
        .wait_log_async("refused replayed, expired or future-dated messages", WAIT)
        .await;
    pair.exchange("after a replay on a new link").await;
    pair.close().await;
    relay.stop();
}

each_transport!(a_message_outside_the_timestamp_window_is_refused);
async fn a_message_outside_the_timestamp_window_is_refused(t: Transport) {
    let relay = RelayProcess::start();
    let mut pair = honest(&relay).await;
    let mut receiver = raw_link(&relay, t).await;
    let mut sender = raw_link(&relay, t).await;
    let hour = 3_600_000;
    for (i, (reason, ts, want)) in [
        ("expired", now_ms() - hour, NoticeCode::Expired),
        ("from_future", now_ms() + hour, NoticeCode::FromFuture),
    ]
    .into_iter()
    .enumerate()
    {
        let env = signed(
            &message(
                &sender.key,
                Destination::Cell(receiver.public()),
                Lane::High,
                format!("stamped {reason}").into_bytes(),
            )
            .with_timestamp(ts),
            &sender.key,
        );
        sender
            .send_batch(Lane::High, std::slice::from_ref(&env))
            .await
            .unwrap();
        let after = marker(&mut sender, receiver.public(), Lane::High, reason).await;
        expect_next(
            &mut receiver,
            &after,
            &format!("the marker, not the {reason} one"),
        )
        .await;
        expect_drops(&relay, reason, 1.0).await;
        let (code, id, subject) = notice(&mut sender).await;
        assert_eq!(code, want, "{reason}");
        assert_eq!(id, env.id(), "{reason}");
        assert_eq!(subject, receiver.public(), "{reason}");
        relay
            .wait_log_async("refused replayed, expired or future-dated messages", WAIT)
            .await;
        assert_eq!(
            drops(&relay, "expired") + drops(&relay, "from_future"),
            (i + 1) as f64
        );
        pair.exchange(&format!("after a message {reason}")).await;
    }
    pair.close().await;
    relay.stop();
}

/// `env` with one payload byte flipped after signing.
fn tampered(env: &Envelope) -> Envelope {
    let mut raw = env.raw().to_vec();
    let at = env.raw().len() - 64 - 1; // last payload byte
    raw[at] ^= 0x01;
    envelope(Bytes::from(raw))
}

each_transport!(a_bad_signature_is_dropped_when_the_relay_verifies_all);
async fn a_bad_signature_is_dropped_when_the_relay_verifies_all(t: Transport) {
    let relay = RelayProcess::start_with_config("[security]\nverify = \"all\"\n");
    let mut pair = honest(&relay).await;
    let mut receiver = raw_link(&relay, t).await;
    let mut sender = raw_link(&relay, t).await;
    let good = signed(
        &message(
            &sender.key,
            Destination::Cell(receiver.public()),
            Lane::Normal,
            &b"pay 10 coins"[..],
        ),
        &sender.key,
    );
    let bad = tampered(&good);
    assert_eq!(bad.payload(), &b"pay 10 coinr"[..]);
    assert!(bad.verify().is_err());
    sender
        .send_batch(Lane::Normal, std::slice::from_ref(&bad))
        .await
        .unwrap();
    let after = marker(&mut sender, receiver.public(), Lane::Normal, "after").await;
    expect_next(
        &mut receiver,
        &after,
        "the marker, not the tampered message",
    )
    .await;
    expect_drops(&relay, "bad_signature", 1.0).await;
    assert_eq!(relay.metric("celluler_signatures_failed_total", ""), 1.0);
    let (code, id, subject) = notice(&mut sender).await;
    assert_eq!(code, NoticeCode::BadSignature);
    assert_eq!(id, bad.id());
    assert_eq!(subject, receiver.public());
    relay
        .wait_log_async("dropped messages whose signature does not verify", WAIT)
        .await;
    pair.exchange("after a bad signature").await;
    pair.close().await;
    relay.stop();
}

each_transport!(a_bad_signature_is_caught_by_the_receiving_cell_when_the_relay_does_not_verify);
async fn a_bad_signature_is_caught_by_the_receiving_cell_when_the_relay_does_not_verify(
    t: Transport,
) {
    // verify = "off" (the default): the relay checks links, the receiver
    // checks messages end to end.
    let relay = RelayProcess::start();
    let mut pair = honest(&relay).await;
    let mut sender = raw_link(&relay, t).await;
    let b = pair.b.public_key();
    let good = signed(
        &message(
            &sender.key,
            Destination::Cell(b),
            Lane::Normal,
            &b"pay 10"[..],
        ),
        &sender.key,
    );
    let unsigned = encoded(&message(
        &sender.key,
        Destination::Cell(b),
        Lane::Normal,
        &b"vouched for by the relay"[..],
    ));
    sender
        .send_batch(Lane::Normal, &[tampered(&good), unsigned])
        .await
        .unwrap();
    let m = relay_tests::cells::recv(&mut pair.b, "the unsigned message").await;
    assert_eq!(m.payload, &b"vouched for by the relay"[..]);
    assert_eq!(m.source, sender.public());
    assert_eq!(m.auth, relay_client::cell::ReceivedAuth::Link);
    assert_eq!(pair.b.stats().dropped_bad_signature, 1);
    assert_eq!(drops(&relay, "bad_signature"), 0.0);
    pair.exchange("after a bad signature the receiver caught")
        .await;
    pair.close().await;
    relay.stop();
}

each_transport!(a_cell_that_never_reads_loses_only_its_own_messages);
async fn a_cell_that_never_reads_loses_only_its_own_messages(t: Transport) {
    // Small send buffers too, so that the relay's writer to the sink blocks
    // and its lane queue stays full.
    const MAX_STALL_MS: u64 = 20;
    let relay = RelayProcess::start_with_config(&format!(
        "[limits]\nlane_queue_depth = 256\n[link]\nstream_window = 16384\nconn_window = 65536\n\
         max_stall_ms = {MAX_STALL_MS}\n"
    ));
    let mut pair = honest(&relay).await;
    let sink = RawLink::connect_with(
        &relay,
        Keypair::generate(),
        RawOptions::not_reading().over(t),
    )
    .await
    .unwrap();
    let mut flooder = connect(
        &relay,
        Keypair::generate(),
        CellOptions {
            auth: AuthMode::Link,
            ..options_over(t)
        },
    )
    .await;
    const FLOOD: u64 = 20_000;
    let handle = flooder.handle();
    let to = sink.public();
    let flood = tokio::spawn(async move {
        for i in 0..FLOOD {
            // Distinct noise per message, so batches do not compress and
            // the sink's small windows hold few messages.
            handle
                .send(to, Lane::Normal, noise(512, i))
                .await
                .expect("flood send");
        }
    });
    // The honest pair keeps talking while the flood goes on...
    for i in 0..3 {
        pair.exchange(&format!("during the flood ({i})")).await;
    }
    within("flood queued", WAIT, flood).await.unwrap();
    let dropped = relay
        .wait_metric_async(
            "celluler_drops_total",
            "reason=\"slow_receiver\"",
            1.0,
            WAIT,
        )
        .await;
    assert!(dropped <= FLOOD as f64, "{dropped}");
    // ... and after it.
    pair.exchange("after the flood").await;
    // The flooder hears that its messages were dropped, and for whom.
    let subject = wait_event(&mut flooder, "a slow-receiver notice", |e| match e {
        Event::Notice {
            code: NoticeCode::DroppedSlowReceiver,
            subject,
            ..
        } => Some(*subject),
        _ => None,
    })
    .await;
    assert_eq!(subject, to);
    // The receiver's own lane queue is bounded: most of the flood was
    // dropped, not held. Over QUIC what is held is that queue and the
    // sink's small windows; over TCP also the relay's send queue for the
    // channel (TcpTuning::send_queue, 256 KiB), the unsent bytes the kernel
    // may queue (TCP_NOTSENT_LOWAT, 128 KiB) and the sink's socket receive
    // buffer (the kernel's, not the relay's): about 1 000 messages more
    // of 512 bytes (measured: 1 527 held in all).
    let held = match t {
        Transport::Quic => 1_000,
        Transport::Tcp => 3_000,
    };
    let n = relay
        .wait_metric_async(
            "celluler_drops_total",
            "reason=\"slow_receiver\"",
            (FLOOD - held) as f64,
            WAIT,
        )
        .await;
    assert!(n <= FLOOD as f64);
    // The flooder was paused for the sink only until the gate judged it
    // stuck (its writer took nothing for STUCK_AFTER_MS), and never again.
    // The sink never drains, so each pause for it ran its whole
    // MAX_STALL_MS, and the pauses of one sender's lane come one after
    // another: at most STUCK_AFTER_MS / MAX_STALL_MS of them fit in that
    // time, one more at its edge (a busy machine fits fewer, never more).
    // Without the gate, every batch of the flood (over 150 of them, each
    // at most 64 KiB) would pause.
    let timeouts = relay.metric("celluler_sender_stall_timeouts_total", "");
    assert!(timeouts >= 1.0, "the flooder was never paused for the sink");
    let bound = (STUCK_AFTER_MS / MAX_STALL_MS + 1) as f64;
    assert!(
        timeouts <= bound,
        "{timeouts} pauses of {MAX_STALL_MS} ms timed out for a cell that never reads; \
         the gate allows {bound}"
    );
    // (Measured: about 33 on an idle machine, 176 with the gate removed.)
    pair.exchange("at the end").await;
    drop(sink);
    let tally = flooder.handle();
    within("close flooder", WAIT, flooder.close())
        .await
        .unwrap();
    // Every drop was reported to the flooder, exactly: slow receiver while
    // the sink was attached, then (its link closing, then gone) the rest.
    let u = tally.undelivered();
    assert!(u.complete, "{u:?}");
    for (code, reason) in [
        (NoticeCode::DroppedSlowReceiver, "slow_receiver"),
        (NoticeCode::ReceiverClosing, "shutdown"),
        (NoticeCode::UnknownDestination, "unknown_destination"),
    ] {
        assert_eq!(
            u.count(code) as f64,
            drops(&relay, reason),
            "{reason}: {u:?}"
        );
    }
    assert!(
        u.count(NoticeCode::DroppedSlowReceiver) as f64 >= n,
        "{u:?}"
    );
    assert!(u.notices < u.total / 10, "summed: {u:?}");
    pair.close().await;
    relay.stop();
}
