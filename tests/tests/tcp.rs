//! TLS over TCP on a real relay process, beside QUIC: where the relay
//! listens (`node.listen_tcp`, `--listen-tcp`), that TCP links go through
//! the same admission as QUIC ones (the `limits.max_links` refusal with its
//! reason), that what the TCP listener refuses is counted and logged, and
//! that a shutdown closes TCP links as it closes QUIC ones.

use relay_client::cell::{Cell, CellError, Event};
use relay_codec::Keypair;
use relay_codec::frame::CloseCode;
use relay_link::Transport;
use relay_tests::RelayProcess;
use relay_tests::cells::{HonestPair, WAIT, connect, options_over, wait_event, within};
use std::io::Write as _;

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
        let mut s = std::net::TcpStream::connect(tcp).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: relay\r\n\r\n")
            .unwrap();
    }
    relay
        .wait_metric_async(
            "celluler_tcp_handshakes_refused_total",
            "reason=\"failed\"",
            3.0,
            WAIT,
        )
        .await;
    relay
        .wait_log_async("TCP connections refused before their TLS handshake", WAIT)
        .await;
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
