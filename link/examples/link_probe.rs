//! Throughput probe of the link interface on loopback: 64 KiB batch frames
//! pushed through `LaneSender` and read through `FrameReceiver`, over QUIC
//! or TLS over TCP, both ends in this process.
//!
//! ```text
//! cargo run --release -p relay-link --example link_probe -- tcp 5
//! cargo run --release -p relay-link --example link_probe -- quic 5
//! cargo run --release -p relay-link --example link_probe -- tcp 5 8192   # chunk bytes
//! ```
//!
//! Prints MB/s of frame bytes and the process's CPU seconds per GB
//! (user + system, both ends together; the machine's cores are shared).
//!
//! Medians of 5 interleaved 3 s runs on the 2-core development machine
//! while other builds ran beside it (load average 4-5; MB/s is the noisier
//! figure, CPU-s/GB the steadier):
//!
//! | transport | chunk payload | `notsent_lowat` | MB/s | CPU-s/GB |
//! |---|---:|---:|---:|---:|
//! | TCP | 8 189 (8 KiB with header) | 128 KiB | 414 | 1.97 |
//! | TCP | 16 381 (16 KiB: one TLS record) | 128 KiB | 593 | 1.43 |
//! | TCP | 65 535 (64 KiB) | 128 KiB | 559 | 1.33 |
//! | TCP | 16 381 | kernel default | 535 | 1.61 |
//! | QUIC | - | - | 245 | 3.01 |
//!
//! 8 KiB chunks cost 38% more CPU per byte than 16 KiB (a write and a TLS
//! record per chunk); 64 KiB save about 7%, within the noise, for four
//! times the bulk data a control frame can wait behind in the writer. So
//! the default chunk is 16 KiB, one TLS record. Bounding the kernel's
//! unsent bytes at 128 KiB costs nothing measurable. TCP carries the same
//! frames for about half the CPU of QUIC.

use bytes::{Bytes, BytesMut};
use relay_codec::{BatchEncoder, Destination, Frame, Keypair, Lane, Limits, Message};
use relay_link::quic::{self, TransportTuning};
use relay_link::tcp::{self, TcpLink, TcpListener, TcpTuning};
use relay_link::tls::{self, ALPN};
use relay_link::{Link, Transport};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The process's user + system CPU time so far.
fn cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime is
    // the 12th, stime the 13th, in clock ticks (100 per second on Linux).
    let rest = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    Duration::from_millis(f.iter().sum::<u64>() * 10)
}

/// One batch frame of 64 KiB of 1 KiB messages, uncompressed.
fn batch(key: &Keypair) -> Bytes {
    let mut enc = BatchEncoder::new(1, usize::MAX).unwrap();
    let mut n = 0;
    while enc.len_bytes() < 63 * 1024 {
        let msg = Message::new(
            key.public(),
            Destination::Broadcast,
            Bytes::from(vec![n as u8; 1024]),
        )
        .with_lane(Lane::Bulk)
        .with_timestamp(1_700_000_000_000)
        .with_nonce(n);
        enc.push_signed(&msg, key);
        n += 1;
    }
    let mut out = BytesMut::new();
    enc.finish(Lane::Bulk, &mut out);
    out.freeze()
}

async fn pair(t: Transport, tuning: &TcpTuning) -> (Link, Link, Option<Vec<quinn::Endpoint>>) {
    let (server_key, client_key) = (Keypair::generate(), Keypair::generate());
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let limits = Limits::default();
    match t {
        Transport::Quic => {
            let q = TransportTuning::default();
            let sep = quic::server_endpoint(
                any,
                quic::server_config(server_key.signing_key(), &q).unwrap(),
            )
            .unwrap();
            let addr = sep.local_addr().unwrap();
            let cep = quic::client_endpoint(any).unwrap();
            let ccfg =
                quic::client_config(client_key.signing_key(), server_key.public().0, &q).unwrap();
            let connecting = cep.connect_with(ccfg, addr, tls::SERVER_NAME).unwrap();
            let (s, c) = tokio::join!(async { sep.accept().await.unwrap().await }, connecting);
            (
                Link::quic(s.unwrap(), limits),
                Link::quic(c.unwrap(), limits),
                Some(vec![sep, cep]),
            )
        }
        Transport::Tcp => {
            let tls = Arc::new(tls::tls_server_config(server_key.signing_key()).unwrap());
            let l = TcpListener::bind(any, tls, tuning.clone()).unwrap();
            let addr = l.local_addr().unwrap();
            let ctls = Arc::new(
                tls::tls_client_config(client_key.signing_key(), server_key.public().0, ALPN)
                    .unwrap(),
            );
            let (s, c) = tokio::join!(
                async { l.accept().await.unwrap().handshake().await },
                tcp::connect(addr, ctls, tuning)
            );
            (
                Link::Tcp(TcpLink::new(s.unwrap(), limits, tuning)),
                Link::Tcp(TcpLink::new(c.unwrap(), limits, tuning)),
                None,
            )
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let t: Transport = args.first().map_or("tcp", String::as_str).parse().unwrap();
    let secs: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(5);
    let mut tuning = TcpTuning::default();
    if let Some(c) = args.get(2).and_then(|s| s.parse().ok()) {
        tuning.chunk_bytes = c;
    }
    if let Some(l) = args.get(3).and_then(|s| s.parse().ok()) {
        tuning.notsent_lowat = l;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let (server, client, _keep) = pair(t, &tuning).await;
        let frame = batch(&Keypair::generate());
        let size = frame.len();
        let stop = Instant::now() + Duration::from_secs(secs);
        let mut lanes = client.lane_sender();
        let sender = tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < stop {
                for _ in 0..64 {
                    lanes.send(Lane::Bulk, frame.clone()).await.unwrap();
                }
                n += 64;
            }
            lanes
                .finish(tokio::time::Instant::now() + Duration::from_secs(5))
                .await;
            (n, lanes)
        });
        let mut recv = server.accept_lane().await.unwrap();
        let (start, cpu0) = (Instant::now(), cpu());
        let mut got = 0u64;
        while let Some(f) = recv.next().await.unwrap() {
            assert!(matches!(f, Frame::Batch(_)));
            got += 1;
        }
        let (elapsed, cpu1) = (start.elapsed(), cpu());
        let (sent, _lanes) = sender.await.unwrap();
        assert_eq!(sent, got);
        let bytes = got as f64 * size as f64;
        let mbs = bytes / elapsed.as_secs_f64() / 1e6;
        let cpu_per_gb = (cpu1 - cpu0).as_secs_f64() / (bytes / 1e9);
        println!(
            "{t}: {got} frames of {size} B in {:.2} s: {mbs:.0} MB/s ({:.2} Gbit/s), \
             CPU {:.2} s ({:.0}% of one core), {cpu_per_gb:.2} CPU-s/GB{}",
            elapsed.as_secs_f64(),
            mbs * 8.0 / 1000.0,
            (cpu1 - cpu0).as_secs_f64(),
            100.0 * (cpu1 - cpu0).as_secs_f64() / elapsed.as_secs_f64(),
            match t {
                Transport::Tcp => format!(
                    " [chunk {} B, notsent_lowat {} B]",
                    tuning.chunk_bytes, tuning.notsent_lowat
                ),
                Transport::Quic => String::new(),
            }
        );
        client.close(relay_codec::frame::CloseCode::Normal, "done");
    });
}
