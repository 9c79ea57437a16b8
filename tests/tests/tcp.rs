//! TLS over TCP on a real relay process, beside QUIC: where the relay
//! listens (`node.listen_tcp`, `--listen-tcp`), that TCP links go through
//! the same admission as QUIC ones (the `limits.max_links` refusal with its
//! reason), that a shutdown closes TCP links as it closes QUIC ones, and
//! the bad input only TCP can get (docs/PROTOCOL.md 6.3): garbage instead
//! of a ClientHello, a handshake that never finishes, a flood of
//! connections, a certificate instead of a raw key, and chunk streams no
//! honest sender writes. Each is refused with a reason, counted and
//! logged, while two honest cells (one on each transport) keep talking.
//!
//! What both transports share runs over both in the other suites: wrong
//! ALPN, wrong key, oversize and malformed frames, a cell that stops
//! reading (bad_input.rs), backpressure, priorities, notices and TTL.

use relay_client::cell::{Cell, CellError, Event};
use relay_codec::frame::{CloseCode, Role};
use relay_codec::{Frame, Keypair};
use relay_link::Transport;
use relay_tests::RelayProcess;
use relay_tests::cells::{HonestPair, WAIT, connect, options_over, wait_event, within};
use relay_tests::raw::{RawTcp, tcp_handshake_error_with, x509_client_config};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Two honest cells, one on each transport, exchanging a first round.
async fn honest(relay: &RelayProcess) -> HonestPair {
    HonestPair::start_over(relay, Transport::Quic, Transport::Tcp).await
}

fn refused(relay: &RelayProcess, reason: &str) -> f64 {
    relay.metric(
        "celluler_tcp_handshakes_refused_total",
        &format!("reason=\"{reason}\""),
    )
}

/// What the relay's TCP listener logs when it refuses connections.
const REFUSED_LOG: &str = "TCP connections refused before their TLS handshake finished";

/// Reads what the relay sends on a plain TCP socket until it closes (a
/// reset counts as closed), bounded.
async fn read_to_close(s: &mut tokio::net::TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let _ = within("the relay closes the socket", WAIT, s.read_to_end(&mut got)).await;
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_links_over_max_links_is_refused_with_the_reason_over_tcp_as_over_quic() {
    let relay = RelayProcess::start_with_config("[limits]\nmax_links = 2\n");
    let mut pair = honest(&relay).await;
    // A flood of TCP links at once, each refused at Hello with the reason.
    const FLOOD: usize = 16;
    let mut dials = tokio::task::JoinSet::new();
    let addr = relay.addr_over(Transport::Tcp);
    for _ in 0..FLOOD {
        let addr = addr.clone();
        dials.spawn(async move {
            Cell::connect(&addr, Keypair::generate(), options_over(Transport::Tcp)).await
        });
    }
    while let Some(r) = within("the flood's dials", WAIT, dials.join_next()).await {
        match r.expect("dial task") {
            Err(CellError::Refused { code, reason }) => {
                assert_eq!(code, CloseCode::TooManyLinks, "{reason}");
                assert!(reason.contains("limits.max_links"), "{reason}");
            }
            Err(other) => panic!("expected a refusal, got {other:?}"),
            Ok(_) => panic!("a link over max_links got in"),
        }
    }
    relay
        .wait_metric_async(
            "celluler_drops_total",
            "reason=\"too_many_links\"",
            FLOOD as f64,
            WAIT,
        )
        .await;
    relay
        .wait_log_async("link refused: relay has 2 links", WAIT)
        .await;
    assert!(relay.log().contains("transport=tcp"), "{}", relay.log());
    pair.exchange("after a flood of TCP links").await;
    pair.close().await;
    relay
        .wait_metric_async(
            "celluler_links_closed_total",
            "reason=\"normal\"",
            2.0,
            WAIT,
        )
        .await;
    assert_eq!(relay.metric("celluler_links", "role=\"cell\""), 0.0);
    relay.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_over_max_links_is_refused_with_the_reason_over_tcp_as_over_quic() {
    let relay = RelayProcess::start_with_config("[limits]\nmax_links = 1\n");
    let only = connect(&relay, Keypair::generate(), options_over(Transport::Tcp)).await;
    for (i, t) in Transport::ALL.into_iter().enumerate() {
        let err = within(
            "a link over the limit",
            WAIT,
            Cell::connect(&relay.addr_over(t), Keypair::generate(), options_over(t)),
        )
        .await
        .expect_err("the relay holds one link, its limit");
        match &err {
            CellError::Refused { code, reason } => {
                assert_eq!(*code, CloseCode::TooManyLinks, "{t}: {reason}");
                assert!(reason.contains("limits.max_links"), "{t}: {reason}");
            }
            other => panic!("{t}: expected a refusal, got {other:?}"),
        }
        relay
            .wait_metric_async(
                "celluler_drops_total",
                "reason=\"too_many_links\"",
                (i + 1) as f64,
                WAIT,
            )
            .await;
    }
    relay
        .wait_log_async("link refused: relay has 1 links", WAIT)
        .await;
    assert!(relay.log().contains("transport=tcp"), "{}", relay.log());
    // The link that got in is untouched.
    assert_eq!(relay.metric("celluler_links", "role=\"cell\""), 1.0);
    within("close", WAIT, only.close()).await.unwrap();
    relay.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_tcp_off_serves_quic_only_and_an_address_moves_tcp() {
    for how in [&["--listen-tcp", "off"][..], &["--config", "off.toml"][..]] {
        let relay = if how[0] == "--config" {
            RelayProcess::start_with_config("[node]\nlisten_tcp = \"off\"\n")
        } else {
            RelayProcess::start_with("", how)
        };
        assert_eq!(relay.tcp, None, "{how:?}: the ready line says tcp=off");
        let (_, health) = relay.http_get("/health");
        let health: serde_json::Value = serde_json::from_str(&health).unwrap();
        assert_eq!(health["tcp"], serde_json::Value::Null, "{health}");
        // Over TCP at the relay's address nobody (or no relay of this
        // key) answers.
        let mut opts = options_over(Transport::Tcp);
        opts.connect_timeout = std::time::Duration::from_secs(2);
        let err = within(
            "a TCP dial",
            WAIT,
            Cell::connect(&relay.addr(), Keypair::generate(), opts),
        )
        .await
        .expect_err("no TCP listener");
        assert!(
            matches!(err, CellError::Connect { .. } | CellError::Timeout(_)),
            "{err:?}"
        );
        // QUIC serves as ever.
        let mut pair = HonestPair::start(&relay).await;
        pair.exchange("with TCP off").await;
        pair.close().await;
        assert!(relay.stop().success());
    }
    // Another address: TCP there, QUIC where it was.
    let relay = RelayProcess::start_with("", &["--listen-tcp", "127.0.0.1:0"]);
    let tcp = relay.tcp.expect("a TCP address");
    let (_, health) = relay.http_get("/health");
    assert!(health.contains(&format!("\"tcp\":\"{tcp}\"")), "{health}");
    let mut pair = HonestPair::start_over(&relay, Transport::Tcp, Transport::Quic).await;
    pair.exchange("with TCP at its own address").await;
    pair.close().await;
    assert!(relay.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_tcp_port_is_counted_logged_and_harmless() {
    let relay = RelayProcess::start();
    let mut pair = HonestPair::start_over(&relay, Transport::Tcp, Transport::Tcp).await;
    let tcp = relay.tcp.expect("a TCP address");
    for _ in 0..3 {
        let mut s = tokio::net::TcpStream::connect(tcp).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: relay\r\n\r\n")
            .await
            .unwrap();
        // The refusal the sender can read: a TLS alert record (content
        // type 21, decode_error 50), then the close.
        let answer = read_to_close(&mut s).await;
        assert_eq!(answer.first(), Some(&21), "a TLS alert: {answer:?}");
        assert_eq!(answer.last(), Some(&50), "decode_error: {answer:?}");
    }
    relay
        .wait_metric_async(
            "celluler_tcp_handshakes_refused_total",
            "reason=\"failed\"",
            3.0,
            WAIT,
        )
        .await;
    relay.wait_log_async(REFUSED_LOG, WAIT).await;
    assert!(relay.log().contains("failed=3"), "{}", relay.log());
    pair.exchange("after garbage on the TCP port").await;
    assert_eq!(
        relay.metric(
            "celluler_tcp_handshakes_refused_total",
            "reason=\"timed_out\""
        ),
        0.0
    );
    pair.close().await;
    relay.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_tcp_links_as_a_shutdown() {
    let relay = RelayProcess::start();
    let mut tcp = connect(&relay, Keypair::generate(), options_over(Transport::Tcp)).await;
    let mut quic = connect(&relay, Keypair::generate(), options_over(Transport::Quic)).await;
    let status = relay.stop();
    assert!(status.success(), "{status:?}");
    for (t, cell) in [("tcp", &mut tcp), ("quic", &mut quic)] {
        let reason = wait_event(cell, "the link closes", |e| match e {
            Event::Disconnected { reason } => Some(reason.clone()),
            _ => None,
        })
        .await;
        assert!(
            reason.contains("Shutdown") && reason.contains("relay shutting down"),
            "{t}: {reason}"
        );
    }
}

/// A connection that never finishes its TLS handshake is closed at
/// `limits.handshake_timeout_ms`, counted as `timed_out` and logged: idle
/// sockets cannot pile up. The timeout is short here, but not so short
/// that the honest TCP cell's own handshake could miss it on a loaded
/// machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_that_never_finishes_is_closed_at_the_handshake_timeout() {
    let relay = RelayProcess::start_with_config("[limits]\nhandshake_timeout_ms = 2000\n");
    let mut pair = honest(&relay).await;
    let tcp = relay.tcp.expect("a TCP address");
    // One socket says nothing; one starts a ClientHello record (its
    // 5-byte header announces 512 bytes) and sends no more.
    let mut silent = tokio::net::TcpStream::connect(tcp).await.unwrap();
    let mut stalled = tokio::net::TcpStream::connect(tcp).await.unwrap();
    stalled.write_all(&[22, 3, 1, 2, 0]).await.unwrap();
    // The relay closes both without a byte: there is no TLS session to
    // send an alert in, and a reason in plain bytes would be garbage to a
    // TLS client.
    assert_eq!(read_to_close(&mut silent).await, b"", "the silent socket");
    assert_eq!(read_to_close(&mut stalled).await, b"", "the stalled socket");
    relay
        .wait_metric_async(
            "celluler_tcp_handshakes_refused_total",
            "reason=\"timed_out\"",
            2.0,
            WAIT,
        )
        .await;
    relay.wait_log_async(REFUSED_LOG, WAIT).await;
    relay.wait_log_async("timeout_ms=2000", WAIT).await;
    assert_eq!(refused(&relay, "timed_out"), 2.0);
    assert_eq!(refused(&relay, "failed"), 0.0, "a timeout is not a failure");
    pair.exchange("after two handshakes timed out").await;
    // A new TCP cell still links.
    let late = connect(&relay, Keypair::generate(), options_over(Transport::Tcp)).await;
    within("close late", WAIT, late.close()).await.unwrap();
    pair.close().await;
    relay.stop();
}

/// A client presenting an X.509 certificate chain (a leaf and its CA)
/// instead of a raw public key is refused in the TLS handshake, with an
/// alert, counted and logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_chain_instead_of_a_raw_key_is_refused_in_the_handshake() {
    let relay = RelayProcess::start();
    let mut pair = honest(&relay).await;
    let err = tcp_handshake_error_with(&relay, x509_client_config())
        .await
        .expect("the relay must refuse an X.509 client certificate");
    // The server refuses a peer that cannot do raw public keys: alert
    // handshake_failure (40) or unsupported_certificate (43).
    assert!(
        err.contains("HandshakeFailure") || err.contains("UnsupportedCertificate"),
        "{err}"
    );
    relay
        .wait_metric_async(
            "celluler_tcp_handshakes_refused_total",
            "reason=\"failed\"",
            1.0,
            WAIT,
        )
        .await;
    relay.wait_log_async(REFUSED_LOG, WAIT).await;
    assert_eq!(relay.metric("celluler_links", "role=\"cell\""), 2.0);
    pair.exchange("after an X.509 client").await;
    pair.close().await;
    relay.stop();
}

/// Chunk streams no honest sender writes (docs/PROTOCOL.md 6.3.2), each on
/// a fresh link after its Welcome: the relay closes the link with the code
/// and a reason naming the fault, counts the drop and the close, and logs
/// the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunk_streams_no_honest_sender_writes_close_the_link_with_a_reason() {
    let relay = RelayProcess::start_with_config(
        "[limits]\nmax_payload = 1024\nmax_frame = 8192\n\n[link]\nbatch_bytes = 4096\n",
    );
    let mut pair = honest(&relay).await;
    let discover = Frame::Discover {
        request: 1,
        service: relay_codec::ServiceName::new("chat").unwrap(),
    }
    .to_bytes();
    type Case = (&'static str, Vec<(u8, Vec<u8>)>, CloseCode, &'static str);
    let cases: Vec<Case> = vec![
        (
            "a chunk for channel 5",
            vec![(5, b"x".to_vec())],
            CloseCode::Malformed,
            "channel 5, which does not exist",
        ),
        (
            "data on a lane channel after its end",
            vec![(3, vec![]), (3, b"x".to_vec())],
            CloseCode::Malformed,
            "after its end",
        ),
        (
            "the control channel ended inside a frame",
            vec![(0, discover[..3].to_vec()), (0, vec![])],
            CloseCode::Malformed,
            "ended inside a frame",
        ),
        (
            "a frame over max_frame, its length prefix cut across two chunks",
            vec![(4, vec![0, 0]), (4, vec![0x10, 0])],
            CloseCode::Oversize,
            "over the limit of 8192",
        ),
        (
            "a Hello after Welcome",
            vec![(
                0,
                Frame::Hello {
                    version: 1,
                    role: Role::Cell,
                    notices: true,
                    agent: "again".into(),
                }
                .to_bytes()
                .to_vec(),
            )],
            CloseCode::Malformed,
            "Hello",
        ),
    ];
    // Closes per reason, and drops per reason: a broken chunk stream
    // loses whatever it held (a drop), a stray control frame no message.
    let (mut closes, mut drops) = ([0.0; 2], [0.0; 2]);
    for (what, chunks, code, words) in cases {
        let mut bad = RawTcp::connect(&relay, Keypair::generate()).await;
        for (channel, payload) in &chunks {
            bad.chunk(*channel, payload).await;
        }
        let (got, reason) = bad.closed(&relay, WAIT).await;
        assert_eq!(got, code, "{what}: {reason}");
        assert!(reason.contains(words), "{what}: {reason:?} lacks {words:?}");
        relay.wait_log_async(&reason, WAIT).await;
        let i = usize::from(code == CloseCode::Oversize);
        closes[i] += 1.0;
        if !what.contains("Hello") {
            drops[i] += 1.0;
        }
        for (metric, want) in [
            ("celluler_links_closed_total", closes),
            ("celluler_drops_total", drops),
        ] {
            // The one just counted last, so a wait for it covers both.
            for j in [1 - i, i] {
                let labels = format!("reason=\"{}\"", ["malformed", "oversize"][j]);
                relay
                    .wait_metric_async(metric, &labels, want[j], WAIT)
                    .await;
                assert_eq!(relay.metric(metric, &labels), want[j], "{what}: {metric}");
            }
        }
        pair.exchange(&format!("after {what}")).await;
    }
    // The TLS stream ends (close_notify, FIN) inside a chunk: nothing
    // more can come, and what came is not whole.
    let mut cut = RawTcp::connect(&relay, Keypair::generate()).await;
    cut.write(&[3, 100, 0, 1, 2, 3]).await;
    cut.shutdown().await;
    let (got, reason) = cut.closed(&relay, WAIT).await;
    assert_eq!(got, CloseCode::Malformed, "{reason}");
    assert!(reason.contains("inside a chunk"), "{reason}");
    relay.wait_log_async(&reason, WAIT).await;
    for (metric, want) in [
        ("celluler_links_closed_total", closes[0] + 1.0),
        ("celluler_drops_total", drops[0] + 1.0),
    ] {
        let labels = "reason=\"malformed\"";
        relay.wait_metric_async(metric, labels, want, WAIT).await;
        assert_eq!(
            relay.metric(metric, labels),
            want,
            "cut inside a chunk: {metric}"
        );
    }
    pair.exchange("after a stream cut inside a chunk").await;
    pair.close().await;
    relay.stop();
}
