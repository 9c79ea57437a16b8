//! Every exit of a link task releases what the link holds: a link task
//! that panics (a debug-build fault hook) leaves the open-link gauge, the
//! node's routing and the key as if the link had closed normally.
//!
//! The relay runs in this process, through its library, on real QUIC
//! links; the cells are raw links built from `relay_link`.

#![cfg(debug_assertions)]

use bytes::{Bytes, BytesMut};
use relay::config::RelayConfig;
use relay::node::Node;
use relay_codec::frame::{NoticeCode, Role};
use relay_codec::{BatchEncoder, Destination, Envelope, Frame, Keypair, Lane, Limits, Message};
use relay_codec::{MessageId, PublicKey};
use relay_link::quic::{self, TransportTuning};
use relay_link::{BatchReader, ControlSender, LaneSender, Link, LinkEnd, tls};
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;

/// The safety net of every wait here; nothing is timed.
const WAIT: Duration = Duration::from_secs(30);

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within {WAIT:?}"))
}

/// A cell linked by hand: what it reads arrives on `messages` and
/// `controls`.
struct RawCell {
    key: Keypair,
    link: Link,
    lanes: LaneSender,
    messages: mpsc::UnboundedReceiver<Envelope>,
    controls: mpsc::UnboundedReceiver<Frame>,
    _control: ControlSender,
    _endpoint: quinn::Endpoint,
}

impl RawCell {
    /// Links `key` to the relay at `addr`, asking for notices.
    async fn connect(addr: SocketAddr, relay: PublicKey, key: Keypair) -> RawCell {
        let cfg = quic::client_config_with_alpn(
            key.signing_key(),
            relay.0,
            &TransportTuning::default(),
            tls::ALPN,
        )
        .expect("client config");
        let endpoint = quic::client_endpoint("127.0.0.1:0".parse().unwrap()).expect("endpoint");
        let conn = within(
            "QUIC handshake",
            endpoint
                .connect_with(cfg, addr, tls::SERVER_NAME)
                .expect("connect"),
        )
        .await
        .expect("QUIC handshake");
        let link = Link::quic(conn, Limits::default());
        let (control, mut reader, _welcome) =
            relay_link::hello(&link, Role::Cell, true, "relay/tests/link_release", WAIT)
                .await
                .expect("Hello/Welcome");
        let (ctl_tx, controls) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(f)) = reader.next().await {
                if ctl_tx.send(f).is_err() {
                    return;
                }
            }
        });
        let (msg_tx, messages) = mpsc::unbounded_channel();
        let data = link.clone();
        tokio::spawn(async move {
            while let Ok(recv) = data.accept_lane().await {
                let tx = msg_tx.clone();
                tokio::spawn(async move {
                    let mut reader = BatchReader::new(recv, Limits::default()).expect("reader");
                    let mut envs = Vec::new();
                    while let Ok(Some(_)) = reader.next(&mut envs).await {
                        for e in envs.drain(..) {
                            if tx.send(e).is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        RawCell {
            key,
            lanes: link.lane_sender(),
            link,
            messages,
            controls,
            _control: control,
            _endpoint: endpoint,
        }
    }

    /// Sends one signed message to `to`; its id.
    async fn send_to(&mut self, to: PublicKey, payload: &'static [u8]) -> MessageId {
        static NONCE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let msg = Message::new(
            self.key.public(),
            Destination::Cell(to),
            Bytes::from_static(payload),
        )
        .with_lane(Lane::Normal)
        .with_timestamp(now_ms)
        .with_nonce(NONCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        let mut buf = BytesMut::new();
        msg.encode_signed(&self.key, &mut buf);
        let mut bytes = buf.freeze();
        let env = Envelope::parse(&mut bytes, &Limits::default()).expect("a message");
        let mut enc = BatchEncoder::new(1, usize::MAX).expect("encoder");
        enc.push_envelope(&env);
        let mut frame = BytesMut::new();
        enc.finish(Lane::Normal, &mut frame);
        self.lanes
            .send(Lane::Normal, frame.freeze())
            .await
            .expect("send a batch");
        env.id()
    }
}

/// The value of the open-link gauge for cells.
fn cell_links(relay: &relay::metrics::Metrics) -> f64 {
    let text = relay.encode();
    text.lines()
        .find_map(|l| l.strip_prefix("celluler_links{role=\"cell\"} "))
        .unwrap_or_else(|| panic!("no cell link gauge in\n{text}"))
        .parse()
        .expect("a number")
}

fn closed_internal(relay: &relay::metrics::Metrics) -> f64 {
    let text = relay.encode();
    text.lines()
        .find_map(|l| l.strip_prefix("celluler_links_closed_total{reason=\"internal\"} "))
        .map_or(0.0, |v| v.parse().expect("a number"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_task_that_panics_releases_its_link() {
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        "[node]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nlisten_tcp = \"off\"\n\
         data_dir = {:?}\n",
        dir.path().display().to_string()
    );
    let cfg = RelayConfig::from_toml_str(&toml, None).expect("config");
    let node = Node::bind(cfg).await.expect("bind");
    let (relay_key, addr, metrics) = (node.key(), node.quic_addr(), node.metrics());
    let victim = Keypair::generate();
    let victim_key = victim.public();
    node.inject_link_task_panic(victim_key);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let relay = tokio::spawn(node.run(async {
        let _ = stopped.await;
    }));

    let mut sender = RawCell::connect(addr, relay_key, Keypair::generate()).await;
    let first = RawCell::connect(addr, relay_key, victim).await;
    // Its task panicked once the link was up: the guard closed the link,
    // after releasing it.
    let end = within("the panicked link's close", first.link.closed()).await;
    assert!(
        matches!(end, LinkEnd::Closed { .. }),
        "the relay closes the link, it does not just vanish: {end:?}"
    );
    assert_eq!(cell_links(&metrics), 1.0, "only the sender's link is open");
    assert_eq!(
        closed_internal(&metrics),
        1.0,
        "counted as an internal failure"
    );

    // The node detached it: a message to its key is for an unknown cell.
    let lost = sender.send_to(victim_key, b"to nobody").await;
    let notice = within("the unknown-destination notice", async {
        loop {
            match sender.controls.recv().await.expect("control stream open") {
                Frame::Notice {
                    code, id, subject, ..
                } => return (code, id, subject),
                _ => continue,
            }
        }
    })
    .await;
    assert_eq!(notice, (NoticeCode::UnknownDestination, lost, victim_key));

    // The key links again (no stale attachment, no stale count) and
    // receives.
    let key = first.key.clone();
    drop(first);
    let mut again = RawCell::connect(addr, relay_key, key).await;
    assert_eq!(cell_links(&metrics), 2.0);
    let id = sender.send_to(victim_key, b"after the panic").await;
    let got = within("the message on the new link", again.messages.recv())
        .await
        .expect("lane open");
    assert_eq!(got.id(), id);
    assert_eq!(got.payload().as_ref(), b"after the panic");

    let _ = stop.send(());
    within("relay stop", relay).await.expect("relay task");
}
