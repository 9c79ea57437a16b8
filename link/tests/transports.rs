//! The transport-independent link interface (`conn`, `handshake`,
//! `writer`, `reader`) over real QUIC and real TLS over TCP on loopback:
//! every behaviour test runs on both transports; the TCP framing and close
//! tests on TCP.

mod common;

use bytes::{BufMut, Bytes, BytesMut};
use common::*;
use relay_codec::frame::{CloseCode, LEN_PREFIX, PROTOCOL_VERSION, Role};
use relay_codec::mux::{Channel, Demux, Event, chunk_header};
use relay_codec::{Envelope, Frame, Keypair, Lane, Limits};
use relay_link::quic::TransportTuning;
use relay_link::tcp::{TcpLink, TcpTuning, TlsConnection};
use relay_link::{
    ControlSender, FrameReceiver, LaneQueues, Link, LinkEnd, LinkError, NoObserver, Outbound,
    Transport, WriterConfig, accept_hello, close, hello, run_writer,
};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Runs the handshake on both sides; the client's and server's halves.
async fn handshake(
    p: &Pair,
) -> (
    (ControlSender, FrameReceiver, relay_link::Welcome),
    (ControlSender, FrameReceiver, relay_link::Hello),
) {
    let server = async {
        let (mut send, recv, hello) = accept_hello(&p.server, WAIT).await.unwrap();
        send.send(&Frame::Welcome {
            version: PROTOCOL_VERSION,
            node: p.server_key.public(),
            time_ms: 42,
            max_payload: 1000,
            max_frame: 2000,
        })
        .await
        .unwrap();
        (send, recv, hello)
    };
    let client = async {
        hello(&p.client, Role::Cell, true, "test/1", WAIT)
            .await
            .unwrap()
    };
    within("handshake", async { tokio::join!(client, server) }).await
}

#[tokio::test]
async fn the_handshake_proves_keys_and_exchanges_hello_and_welcome() {
    for t in BOTH {
        let p = pair(t, &Opts::default()).await;
        assert_eq!(p.client.transport(), t);
        assert_eq!(p.client.peer_key(), Some(p.server_key.public()), "{t}");
        assert_eq!(p.server.peer_key(), Some(p.client_key.public()), "{t}");
        let ((_, _, welcome), (_, _, hello)) = handshake(&p).await;
        assert_eq!(hello.version, PROTOCOL_VERSION);
        assert_eq!(hello.role, Role::Cell);
        assert!(hello.notices);
        assert_eq!(hello.agent, "test/1");
        assert_eq!(welcome.node, p.server_key.public());
        assert_eq!(
            (welcome.time_ms, welcome.max_payload, welcome.max_frame),
            (42, 1000, 2000)
        );
    }
}

#[tokio::test]
async fn a_refusal_reaches_the_connecting_side_with_its_code_and_reason() {
    for t in BOTH {
        let p = pair(t, &Opts::default()).await;
        let server = async {
            let (mut send, _recv, _hello) = accept_hello(&p.server, WAIT).await.unwrap();
            close(
                &p.server,
                Some(&mut send),
                CloseCode::Unauthorized,
                "key not allowed",
            )
            .await;
        };
        let client = hello(&p.client, Role::Cell, false, "test/1", WAIT);
        let (r, ()) = within("refusal", async { tokio::join!(client, server) }).await;
        match r {
            Err(LinkError::Refused { code, reason }) => {
                assert_eq!(code, CloseCode::Unauthorized, "{t}");
                assert_eq!(reason, "key not allowed", "{t}");
            }
            other => panic!("{t}: expected a refusal, got {:?}", other.err()),
        }
        let end = within("close", p.client.closed()).await;
        assert_eq!(
            end,
            LinkEnd::Closed {
                code: CloseCode::Unauthorized,
                reason: "key not allowed".into()
            },
            "{t}"
        );
        assert_eq!(p.server.end(), Some(LinkEnd::Local), "{t}");
    }
}

#[tokio::test]
async fn a_hello_that_never_comes_times_out() {
    for t in BOTH {
        let p = pair(t, &Opts::default()).await;
        let r = accept_hello(&p.server, Duration::from_millis(50)).await;
        assert!(
            matches!(r, Err(LinkError::Timeout("Hello"))),
            "{t}: {:?}",
            r.err()
        );
        drop(p.client);
    }
}

#[tokio::test]
async fn a_close_tells_the_peer_its_code_and_reason() {
    for t in BOTH {
        let p = pair(t, &Opts::default()).await;
        let ((_c_send, mut c_recv, _), _server_halves) = handshake(&p).await;
        p.server.close(CloseCode::Shutdown, "relay shutting down");
        let end = within("close", p.client.closed()).await;
        assert_eq!(
            end,
            LinkEnd::Closed {
                code: CloseCode::Shutdown,
                reason: "relay shutting down".into()
            },
            "{t}"
        );
        // Reading on afterwards says why too (TCP: the Close frame first).
        let r = loop {
            match within("read", c_recv.next()).await {
                Ok(Some(Frame::Close { code, .. })) => assert_eq!(code, CloseCode::Shutdown),
                other => break other,
            }
        };
        assert!(
            matches!(
                &r,
                Err(LinkError::Ended(LinkEnd::Closed {
                    code: CloseCode::Shutdown,
                    ..
                }))
            ),
            "{t}: {r:?}"
        );
        assert_eq!(p.server.end(), Some(LinkEnd::Local));
    }
}

#[tokio::test]
async fn the_writer_sends_every_lane_in_order_and_ends_the_lanes() {
    for t in BOTH {
        let p = pair(t, &Opts::default()).await;
        const PER_LANE: u64 = 600;
        let queues = Arc::new(LaneQueues::new(PER_LANE as usize));
        for n in 0..PER_LANE {
            for lane in Lane::ALL {
                let payload = Bytes::from(vec![b'a' + (n % 26) as u8; 10 + (n as usize * 7) % 300]);
                queues
                    .push(Outbound {
                        env: envelope(&p.client_key, lane, n, payload),
                        queued_at: Instant::now(),
                    })
                    .expect("room for every message");
            }
        }
        let receiver = tokio::spawn(receive_lanes(p.server.clone(), 4));
        let cfg = WriterConfig {
            batch_bytes: 8 * 1024,
            max_batch_messages: 50,
            ..WriterConfig::default()
        };
        let writer = tokio::spawn(run_writer(
            p.client.lane_sender(),
            queues.clone(),
            cfg,
            NoObserver,
        ));
        queues.close();
        within("writer", writer)
            .await
            .unwrap()
            .expect("writer succeeded");
        // The receivers end only because the writer ended each lane.
        let by_lane = within("receivers", receiver).await.unwrap();
        for lane in Lane::ALL {
            let nonces: Vec<u64> = by_lane[lane.index()].iter().map(Envelope::nonce).collect();
            assert_eq!(
                nonces,
                (0..PER_LANE).collect::<Vec<_>>(),
                "{t}, lane {lane}"
            );
        }
    }
}

/// Bytes the kernel may buffer for one loopback TCP connection at most:
/// the sender's and the receiver's socket buffer maxima.
fn kernel_tcp_buffers() -> usize {
    let max = |path: &str| -> usize {
        std::fs::read_to_string(path)
            .ok()
            .and_then(|s| s.split_whitespace().last()?.parse().ok())
            .unwrap_or(32 << 20)
    };
    max("/proc/sys/net/ipv4/tcp_wmem") + max("/proc/sys/net/ipv4/tcp_rmem")
}

#[tokio::test]
async fn a_reader_that_stops_reading_stops_the_writer_within_a_bound() {
    const FRAME: usize = 64 * 1024;
    let opts = Opts {
        quic: TransportTuning {
            stream_window: 1 << 20,
            conn_window: 2 << 20,
            ..TransportTuning::default()
        },
        tcp: TcpTuning {
            send_queue: 256 * 1024,
            channel_window: 1 << 20,
            ..TcpTuning::default()
        },
        ..Opts::default()
    };
    for t in BOTH {
        let p = pair(t, &opts).await;
        // What may be in flight between a send returning and the receiver
        // reading, at most (every buffer on the way, generously).
        let bound = match t {
            Transport::Quic => opts.quic.conn_window as usize * 2,
            Transport::Tcp => {
                opts.tcp.send_queue
                    + opts.tcp.channel_window
                    + opts.limits.max_frame
                    + 1024 * 1024
                    + kernel_tcp_buffers()
            }
        };
        let total = 4 * bound / FRAME + 64;
        let frame = batch_frame(&p.client_key, Lane::Bulk, 0, FRAME);
        let sent = Arc::new(AtomicUsize::new(0));
        let progress = Arc::new(tokio::sync::Notify::new());
        let producer = tokio::spawn({
            let mut lanes = p.client.lane_sender();
            let (sent, progress) = (sent.clone(), progress.clone());
            async move {
                for _ in 0..total {
                    lanes.send(Lane::Bulk, frame.clone()).await.unwrap();
                    sent.fetch_add(1, Ordering::AcqRel);
                    progress.notify_one();
                }
                lanes
            }
        });
        // Let the producer fill what it can before anything is read.
        within("the producer starts", async {
            while sent.load(Ordering::Acquire) < 8 {
                progress.notified().await;
            }
        })
        .await;
        let mut recv = within("the lane", p.server.accept_lane()).await.unwrap();
        for read in 1..=total {
            let f = within("a frame", recv.next()).await.unwrap().unwrap();
            assert!(matches!(f, Frame::Batch(_)));
            let ahead = sent.load(Ordering::Acquire).saturating_sub(read);
            assert!(
                ahead * FRAME <= bound,
                "{t}: the writer ran {ahead} frames ahead of the reader (bound {bound} bytes)"
            );
            if let Link::Tcp(link) = &p.server {
                let (_, rx) = link.buffered();
                assert!(
                    rx <= opts.tcp.channel_window + FRAME + 4096,
                    "{t}: {rx} bytes held"
                );
            }
            if let Link::Tcp(link) = &p.client {
                let (tx, _) = link.buffered();
                assert!(
                    tx <= opts.tcp.send_queue + FRAME + 4096,
                    "{t}: {tx} bytes queued"
                );
            }
        }
        within("producer", producer).await.unwrap();
    }
}

// ---- TCP only: the framing on the wire, bad input, close ----

#[tokio::test]
async fn on_tcp_a_control_frame_overtakes_a_bulk_frame_already_being_sent() {
    let opts = Opts {
        limits: Limits {
            max_frame: 48 << 20,
            ..Limits::default()
        },
        ..Opts::default()
    };
    let (server_key, client_key) = (Keypair::generate(), Keypair::generate());
    let (mut raw, c) = tls_pair(&server_key, &client_key, &opts).await;
    let link = Link::Tcp(TcpLink::new(c, opts.limits, &opts.tcp));
    // One 32 MiB bulk frame, then a control frame. The raw peer reads
    // nothing until both are queued, so the writer is still inside the
    // bulk frame (the socket buffers hold far less) when control arrives.
    const BULK: usize = 32 << 20;
    let mut bulk = BytesMut::with_capacity(LEN_PREFIX + BULK);
    bulk.put_u32_le(BULK as u32);
    bulk.put_u8(0x01);
    bulk.resize(LEN_PREFIX + BULK, 0xbb);
    let mut lanes = link.lane_sender();
    lanes.send(Lane::Bulk, bulk.freeze()).await.unwrap();
    // Wait until the writer has started on it (its queue shrinks).
    let Link::Tcp(tcp_link) = &link else {
        unreachable!()
    };
    within("the writer starts", async {
        while tcp_link.buffered().0 == LEN_PREFIX + BULK {
            tokio::task::yield_now().await;
        }
    })
    .await;
    let (mut control, _recv) = link.open_control().await.unwrap();
    let ping = Frame::WatchPresence(true);
    control.send(&ping).await.unwrap();

    let mut demux = Demux::new(&opts.limits);
    let mut buf = vec![0; 256 * 1024];
    let mut read = 0usize;
    let mut order = vec![];
    while order.len() < 2 {
        let n = within("read", raw.stream.read(&mut buf)).await.unwrap();
        assert!(n > 0, "stream ended early");
        let mut input = &buf[..n];
        let start = read;
        read += n;
        while let Some(ev) = demux.feed(&mut input).unwrap() {
            if let Event::Frame { channel, frame } = ev {
                order.push((channel, frame.len(), start));
            }
        }
    }
    assert_eq!(order[0].0, Channel::Control, "control first: {order:?}");
    assert_eq!(order[0].1, ping.to_bytes().len());
    assert_eq!(order[1].0, Channel::Lane(Lane::Bulk));
    // How much bulk data control waited behind, for the report.
    eprintln!(
        "control arrived after {} KiB of a {} KiB bulk frame",
        order[0].2 / 1024,
        BULK / 1024
    );
}

/// A TCP link's server side, and the raw TLS stream of its client.
async fn raw_client(opts: &Opts) -> (Link, TlsConnection) {
    let (server_key, client_key) = (Keypair::generate(), Keypair::generate());
    let (s, c) = tls_pair(&server_key, &client_key, opts).await;
    (Link::Tcp(TcpLink::new(s, opts.limits, &opts.tcp)), c)
}

/// Everything the link sends until it closes: the frames of the control
/// channel, with the stream ending in `close_notify`.
async fn control_frames_until_close(raw: &mut TlsConnection) -> Vec<Frame> {
    let mut demux = Demux::new(&Limits::default());
    let mut frames = vec![];
    let mut buf = vec![0; 64 * 1024];
    loop {
        let n = within("read", raw.stream.read(&mut buf))
            .await
            .expect("a clean close_notify");
        if n == 0 {
            demux.finish().unwrap();
            return frames;
        }
        let mut input = &buf[..n];
        while let Some(ev) = demux.feed(&mut input).unwrap() {
            if let Event::Frame {
                channel: Channel::Control,
                frame,
            } = ev
            {
                frames.push(Frame::decode(frame, &Limits::default()).unwrap());
            }
        }
    }
}

#[tokio::test]
async fn on_tcp_bad_chunks_close_the_link_with_the_reason() {
    let cases: Vec<(Vec<u8>, CloseCode, &str)> = vec![
        // A chunk for a channel that does not exist.
        (vec![9, 1, 0, 0xff], CloseCode::Malformed, "channel 9"),
        // A frame announcing more than max_frame.
        (
            [
                &chunk_header(Channel::Lane(Lane::High), 4)[..],
                &(64u32 << 20).to_le_bytes(),
            ]
            .concat(),
            CloseCode::Oversize,
            "over the limit",
        ),
        // An empty frame.
        (
            [&chunk_header(Channel::Control, 4)[..], &[0, 0, 0, 0]].concat(),
            CloseCode::Malformed,
            "empty frame",
        ),
        // Data after the channel's end.
        (
            [
                &chunk_header(Channel::Control, 0)[..],
                &chunk_header(Channel::Control, 1),
                &[1],
            ]
            .concat(),
            CloseCode::Malformed,
            "after its end",
        ),
    ];
    for (bytes, want_code, want_text) in cases {
        let (link, mut raw) = raw_client(&Opts::default()).await;
        raw.stream.write_all(&bytes).await.unwrap();
        raw.stream.flush().await.unwrap();
        let end = within("the link ends", link.closed()).await;
        assert!(matches!(end, LinkEnd::Mux(_)), "{end:?}");
        assert!(end.to_string().contains(want_text), "{end}");
        // The peer is told why, in a Close frame before close_notify.
        let frames = control_frames_until_close(&mut raw).await;
        match frames.as_slice() {
            [Frame::Close { code, reason }] => {
                assert_eq!(*code, want_code);
                assert!(reason.contains(want_text), "{reason}");
            }
            other => panic!("expected one Close frame, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn on_tcp_a_malformed_frame_is_a_decode_error_on_its_channel() {
    let (link, mut raw) = raw_client(&Opts::default()).await;
    // A whole frame of an unknown type on the control channel.
    let frame = [&2u32.to_le_bytes()[..], &[0x7f, 0]].concat();
    raw.stream
        .write_all(
            &[
                &chunk_header(Channel::Control, frame.len() as u16)[..],
                &frame,
            ]
            .concat(),
        )
        .await
        .unwrap();
    raw.stream.flush().await.unwrap();
    let r = accept_hello(&link, WAIT).await;
    match r {
        Err(e @ LinkError::Decode(_)) => assert_eq!(e.peer_fault(), Some(CloseCode::Malformed)),
        other => panic!("expected a decode error, got {:?}", other.err()),
    }
}

#[tokio::test]
async fn on_tcp_a_peer_that_vanishes_without_close_is_lost() {
    let (link, raw) = raw_client(&Opts::default()).await;
    drop(raw);
    assert_eq!(within("end", link.closed()).await, LinkEnd::Lost);
}

#[tokio::test]
async fn on_tcp_dropping_every_handle_closes_the_link_normally() {
    let (link, mut raw) = raw_client(&Opts::default()).await;
    drop(link);
    let frames = control_frames_until_close(&mut raw).await;
    assert!(
        matches!(
            frames.as_slice(),
            [Frame::Close {
                code: CloseCode::Normal,
                ..
            }]
        ),
        "{frames:?}"
    );
}

#[tokio::test]
async fn on_tcp_the_lanes_share_chunks_by_the_writers_weights() {
    let (link, mut raw) = raw_client(&Opts::default()).await;
    // One large message per lane, queued before the writer starts.
    let key = Keypair::from_secret_bytes(&[3; 32]);
    let queues = Arc::new(LaneQueues::new(4));
    for lane in Lane::ALL {
        let env = envelope(&key, lane, 0, Bytes::from(vec![7; 100_000]));
        queues
            .push(Outbound {
                env,
                queued_at: Instant::now(),
            })
            .unwrap();
    }
    // Equal weights, not the default 8:4:2:1: a link that kept its own
    // weights would send control every other chunk. The writer hands all
    // four batches to the link before the link's task sends (this test's
    // runtime has one thread, and handing over does not wait).
    let cfg = WriterConfig {
        weights: [1; 4],
        compress_min: usize::MAX,
        ..WriterConfig::default()
    };
    let _writer = tokio::spawn(run_writer(link.lane_sender(), queues, cfg, NoObserver));
    // The channel of each chunk, read off the raw stream.
    let mut order = Vec::new();
    let mut buf = BytesMut::new();
    while order.len() < 16 {
        let mut more = [0; 64 * 1024];
        let n = within("read", raw.stream.read(&mut more)).await.unwrap();
        assert!(n > 0, "the stream ended after chunks {order:?}");
        buf.extend_from_slice(&more[..n]);
        while buf.len() >= 3 {
            let len = usize::from(u16::from_le_bytes([buf[1], buf[2]]));
            if buf.len() < 3 + len {
                break;
            }
            order.push(buf[0]);
            let _ = buf.split_to(3 + len);
        }
    }
    assert_eq!(&order[..16], &[1, 2, 3, 4].repeat(4)[..], "{order:?}");
}
