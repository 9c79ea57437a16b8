//! What the link tests share: a link of either transport between two fresh
//! keys on loopback, and messages to send over it.

#![allow(dead_code)]

use bytes::{Bytes, BytesMut};
use relay_codec::{BatchEncoder, Destination, Envelope, Keypair, Lane, Limits, Message};
use relay_link::quic::{self, TransportTuning};
use relay_link::tcp::{self, TcpLink, TcpListener, TcpTuning, TlsConnection};
use relay_link::tls::{self, ALPN};
use relay_link::{BatchReader, Link, Transport};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Safety net only: the tests wait on events, never on the clock.
pub const WAIT: Duration = Duration::from_secs(60);

pub const BOTH: [Transport; 2] = Transport::ALL;

pub async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, f)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

/// Settings for both sides of a test link.
#[derive(Clone, Default)]
pub struct Opts {
    pub limits: Limits,
    pub quic: TransportTuning,
    pub tcp: TcpTuning,
}

/// Two ends of one link between fresh keys.
pub struct Pair {
    /// The accepting side.
    pub server: Link,
    /// The connecting side.
    pub client: Link,
    pub server_key: Keypair,
    pub client_key: Keypair,
    /// QUIC endpoints must outlive their connections.
    pub _endpoints: Option<(quinn::Endpoint, quinn::Endpoint)>,
}

pub fn localhost() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

pub async fn pair(t: Transport, opts: &Opts) -> Pair {
    let (server_key, client_key) = (Keypair::generate(), Keypair::generate());
    let expected = server_key.public().0;
    match t {
        Transport::Quic => {
            let scfg = quic::server_config(server_key.signing_key(), &opts.quic).unwrap();
            let sep = quic::server_endpoint(localhost(), scfg).unwrap();
            let addr = sep.local_addr().unwrap();
            let ccfg = quic::client_config(client_key.signing_key(), expected, &opts.quic).unwrap();
            let cep = quic::client_endpoint(localhost()).unwrap();
            let connecting = cep.connect_with(ccfg, addr, tls::SERVER_NAME).unwrap();
            let accepting = async { sep.accept().await.expect("endpoint open").await };
            let (s, c) = within("QUIC handshake", async {
                tokio::join!(accepting, connecting)
            })
            .await;
            Pair {
                server: Link::quic(s.unwrap(), opts.limits),
                client: Link::quic(c.unwrap(), opts.limits),
                server_key,
                client_key,
                _endpoints: Some((sep, cep)),
            }
        }
        Transport::Tcp => {
            let (s, c) = tls_pair(&server_key, &client_key, opts).await;
            Pair {
                server: Link::Tcp(TcpLink::new(s, opts.limits, &opts.tcp)),
                client: Link::Tcp(TcpLink::new(c, opts.limits, &opts.tcp)),
                server_key,
                client_key,
                _endpoints: None,
            }
        }
    }
}

/// A finished TLS-over-TCP handshake: (server side, client side).
pub async fn tls_pair(
    server_key: &Keypair,
    client_key: &Keypair,
    opts: &Opts,
) -> (TlsConnection, TlsConnection) {
    let tls = Arc::new(tls::tls_server_config(server_key.signing_key()).unwrap());
    let l = TcpListener::bind(localhost(), tls, opts.tcp.clone()).unwrap();
    let addr = l.local_addr().unwrap();
    let ctls =
        tls::tls_client_config(client_key.signing_key(), server_key.public().0, ALPN).unwrap();
    let accepting = async { l.accept().await.unwrap().handshake().await };
    let (s, c) = within("TLS handshake", async {
        tokio::join!(accepting, tcp::connect(addr, Arc::new(ctls), &opts.tcp))
    })
    .await;
    (s.unwrap(), c.unwrap())
}

pub fn envelope(key: &Keypair, lane: Lane, nonce: u64, payload: Bytes) -> Envelope {
    let msg = Message::new(key.public(), Destination::Broadcast, payload)
        .with_lane(lane)
        .with_timestamp(1_700_000_000_000)
        .with_nonce(nonce);
    let mut buf = BytesMut::new();
    msg.encode_signed(key, &mut buf);
    Envelope::parse(&mut buf.freeze(), &Limits::default()).unwrap()
}

/// A batch frame of one message with `payload` bytes, uncompressed.
pub fn batch_frame(key: &Keypair, lane: Lane, nonce: u64, payload: usize) -> Bytes {
    let mut enc = BatchEncoder::new(1, usize::MAX).unwrap();
    enc.push_envelope(&envelope(key, lane, nonce, Bytes::from(vec![7; payload])));
    let mut out = BytesMut::new();
    enc.finish(lane, &mut out);
    out.freeze()
}

/// Reads every lane the peer starts until `lanes` of them have ended,
/// returning per lane the messages in arrival order.
pub async fn receive_lanes(link: Link, lanes: usize) -> [Vec<Envelope>; 4] {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..lanes {
        let recv = link.accept_lane().await.expect("accept a lane");
        tasks.spawn(async move {
            let mut reader = BatchReader::new(recv, Limits::default()).unwrap();
            let mut envs = Vec::new();
            let mut got = Vec::new();
            while reader
                .next(&mut envs)
                .await
                .expect("read a batch")
                .is_some()
            {
                got.append(&mut envs);
            }
            (reader.lane().expect("a lane with no batch"), got)
        });
    }
    let mut by_lane: [Vec<Envelope>; 4] = Default::default();
    while let Some(r) = tasks.join_next().await {
        let (lane, got) = r.unwrap();
        assert!(by_lane[lane.index()].is_empty(), "two channels for {lane}");
        by_lane[lane.index()] = got;
    }
    by_lane
}
