//! The link layer over real QUIC on loopback, without a relay: a small
//! accepting side written here against `link` and `transport`.

use bytes::{Bytes, BytesMut};
use relay_client::link::{
    self, FrameReader, LaneQueues, LinkError, NoObserver, Outbound, WriterConfig,
};
use relay_client::transport::{self, TransportTuning};
use relay_codec::frame::{CloseCode, PROTOCOL_VERSION, Role};
use relay_codec::{BatchDecoder, Destination, Envelope, Frame, Keypair, Lane, Limits, Message};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(10);

struct Pair {
    /// The accepting side's connection.
    server: quinn::Connection,
    /// The connecting side's connection.
    client: quinn::Connection,
    _endpoints: (quinn::Endpoint, quinn::Endpoint),
}

/// A QUIC connection over loopback between two fresh keys.
async fn connect(server_key: &Keypair, client_key: &Keypair) -> Pair {
    connect_with(server_key, client_key, &TransportTuning::default()).await
}

/// Like [`connect`], the accepting side with `server_tuning` (its receive
/// windows bound what the connecting side can have in flight).
async fn connect_with(
    server_key: &Keypair,
    client_key: &Keypair,
    server_tuning: &TransportTuning,
) -> Pair {
    let tuning = TransportTuning::default();
    let scfg = transport::server_config(server_key.signing_key(), server_tuning).unwrap();
    let sep = transport::server_endpoint("127.0.0.1:0".parse().unwrap(), scfg).unwrap();
    let addr: SocketAddr = sep.local_addr().unwrap();
    let ccfg =
        transport::client_config(client_key.signing_key(), server_key.public().0, &tuning).unwrap();
    let cep = transport::client_endpoint("127.0.0.1:0".parse().unwrap()).unwrap();
    let connecting = cep
        .connect_with(ccfg, addr, transport::SERVER_NAME)
        .unwrap();
    let accepting = async { sep.accept().await.expect("endpoint open").await };
    let (server, client) =
        tokio::time::timeout(WAIT, async { tokio::join!(accepting, connecting) })
            .await
            .expect("QUIC handshake timed out");
    Pair {
        server: server.expect("server side of the handshake"),
        client: client.expect("client side of the handshake"),
        _endpoints: (sep, cep),
    }
}

fn envelope(key: &Keypair, lane: Lane, nonce: u64, payload: Bytes) -> Envelope {
    let msg = Message::new(key.public(), Destination::Broadcast, payload)
        .with_lane(lane)
        .with_timestamp(1_700_000_000_000)
        .with_nonce(nonce);
    let mut buf = BytesMut::new();
    msg.encode_signed(key, &mut buf);
    Envelope::parse(&mut buf.freeze(), &Limits::default()).unwrap()
}

/// Polls `f` once: its output if it is ready, `None` if it waits (having
/// registered for the wake-up it waits for, which a later `.await` of the
/// same future in this task receives).
async fn poll_once<F: Future>(mut f: Pin<&mut F>) -> Option<F::Output> {
    std::future::poll_fn(move |cx| match f.as_mut().poll(cx) {
        Poll::Ready(v) => Poll::Ready(Some(v)),
        Poll::Pending => Poll::Ready(None),
    })
    .await
}

fn outbound(env: Envelope) -> Outbound {
    Outbound {
        env,
        queued_at: Instant::now(),
    }
}

/// Starts a link writer draining `queues` over `conn`.
fn spawn_writer(
    conn: &quinn::Connection,
    queues: &Arc<LaneQueues>,
    cfg: WriterConfig,
) -> tokio::task::JoinHandle<Result<(), LinkError>> {
    tokio::spawn(link::run_writer(
        conn.clone(),
        queues.clone(),
        cfg,
        NoObserver,
    ))
}

/// Closes `queues` and waits for their writer to send everything and end.
async fn close_and_join(
    queues: &LaneQueues,
    writer: tokio::task::JoinHandle<Result<(), LinkError>>,
) {
    queues.close();
    tokio::time::timeout(WAIT, writer)
        .await
        .expect("writer finished")
        .unwrap()
        .expect("writer succeeded");
}

/// Reads every uni stream the peer opens until `streams` of them have
/// ended, returning per lane the messages in arrival order.
async fn receive_all(conn: quinn::Connection, streams: usize) -> [Vec<Envelope>; 4] {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..streams {
        let recv = conn.accept_uni().await.expect("accept a data stream");
        tasks.spawn(async move {
            let mut reader = FrameReader::new(recv, Limits::default());
            let mut decoder = BatchDecoder::new(Limits::default()).unwrap();
            let mut lane_of_stream = None;
            let mut got = Vec::new();
            while let Some(frame) = reader.next().await.expect("read a frame") {
                let Frame::Batch(batch) = frame else {
                    panic!("a data stream carried a non-batch frame: {frame:?}");
                };
                // One stream per lane.
                assert_eq!(*lane_of_stream.get_or_insert(batch.lane), batch.lane);
                for env in decoder.messages(&batch).unwrap() {
                    got.push(env.expect("a valid message"));
                }
            }
            (lane_of_stream.expect("a stream with no batch"), got)
        });
    }
    let mut by_lane: [Vec<Envelope>; 4] = Default::default();
    while let Some(r) = tasks.join_next().await {
        let (lane, got) = r.unwrap();
        assert!(by_lane[lane.index()].is_empty(), "two streams for {lane}");
        by_lane[lane.index()] = got;
    }
    by_lane
}

#[tokio::test]
async fn handshake_exchanges_hello_and_welcome() {
    let relay = Keypair::generate();
    let cell = Keypair::generate();
    let pair = connect(&relay, &cell).await;
    assert_eq!(
        transport::peer_key(&pair.server),
        Some(cell.public().0),
        "the accepting side learns the cell's proven key"
    );
    let relay_pub = relay.public();
    let server = pair.server.clone();
    let accept = tokio::spawn(async move {
        let (mut send, _reader, hello) = link::accept_hello(&server, Limits::default(), WAIT)
            .await
            .expect("a Hello");
        link::write_frame(
            &mut send,
            &Frame::Welcome {
                version: PROTOCOL_VERSION,
                node: relay_pub,
                time_ms: 1_700_000_000_123,
                max_payload: 65_536,
                max_frame: 1 << 20,
            },
        )
        .await
        .unwrap();
        (hello, send)
    });
    let (_send, _reader, welcome) = link::hello(
        &pair.client,
        Role::Cell,
        true,
        "link-test/1",
        Limits::default(),
        WAIT,
    )
    .await
    .expect("a Welcome");
    let (hello, _server_send) = accept.await.unwrap();
    assert_eq!(hello.version, PROTOCOL_VERSION);
    assert_eq!(hello.role, Role::Cell);
    assert!(hello.notices);
    assert_eq!(hello.agent, "link-test/1");
    assert_eq!(welcome.version, PROTOCOL_VERSION);
    assert_eq!(welcome.node, relay.public());
    assert_eq!(welcome.time_ms, 1_700_000_000_123);
    assert_eq!(welcome.max_payload, 65_536);
    assert_eq!(welcome.max_frame, 1 << 20);
}

#[tokio::test]
async fn refused_handshake_surfaces_the_reason() {
    let relay = Keypair::generate();
    let cell = Keypair::generate();
    let pair = connect(&relay, &cell).await;
    let server = pair.server.clone();
    let refuse = tokio::spawn(async move {
        let (mut send, _reader, hello) = link::accept_hello(&server, Limits::default(), WAIT)
            .await
            .unwrap();
        assert_eq!(hello.role, Role::Cell);
        link::close_with(
            &server,
            Some(&mut send),
            CloseCode::Version,
            "this relay speaks link version 9 only",
        )
        .await;
    });
    let err = link::hello(
        &pair.client,
        Role::Cell,
        false,
        "link-test/1",
        Limits::default(),
        WAIT,
    )
    .await
    .err()
    .expect("the handshake must fail");
    refuse.await.unwrap();
    match err {
        LinkError::Refused { code, reason } => {
            assert_eq!(code, CloseCode::Version);
            assert_eq!(reason, "this relay speaks link version 9 only");
        }
        other => panic!("expected Refused, got {other:?}"),
    }
    // The connection ends with the same code.
    let closed = tokio::time::timeout(WAIT, pair.client.closed())
        .await
        .unwrap();
    match closed {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(
                c.error_code,
                quinn::VarInt::from_u32(CloseCode::Version as u32)
            );
        }
        other => panic!("expected an application close, got {other:?}"),
    }
}

#[tokio::test]
async fn handshake_times_out_when_nobody_answers() {
    let relay = Keypair::generate();
    let cell = Keypair::generate();
    let pair = connect(&relay, &cell).await;
    let err = link::hello(
        &pair.client,
        Role::Cell,
        false,
        "link-test/1",
        Limits::default(),
        Duration::from_millis(300),
    )
    .await
    .err()
    .expect("nobody answers");
    // Our own timeout, not the connection's idle timeout (30 s).
    assert!(matches!(err, LinkError::Timeout(_)), "{err:?}");
}

#[tokio::test]
async fn writer_sends_every_lane_in_order() {
    let relay = Keypair::generate();
    let cell = Keypair::generate();
    let pair = connect(&relay, &cell).await;
    const PER_LANE: u64 = 700;
    let queues = Arc::new(LaneQueues::new(PER_LANE as usize));
    // Interleave lanes; payloads vary in size and compress well, so the
    // writer makes many batches, some of them zstd.
    for n in 0..PER_LANE {
        for lane in Lane::ALL {
            let payload = Bytes::from(vec![b'a' + (n % 26) as u8; 10 + (n as usize * 7) % 300]);
            queues
                .push(outbound(envelope(&cell, lane, n, payload)))
                .expect("room for every message");
        }
    }
    assert_eq!(queues.len(), 4 * PER_LANE as usize);
    let receiver = tokio::spawn(receive_all(pair.server.clone(), 4));
    let cfg = WriterConfig {
        batch_bytes: 8 * 1024,
        max_batch_messages: 50,
        ..WriterConfig::default()
    };
    let writer = spawn_writer(&pair.client, &queues, cfg);
    close_and_join(&queues, writer).await;
    assert!(queues.is_empty());
    let by_lane = tokio::time::timeout(WAIT, receiver)
        .await
        .expect("receiver finished")
        .unwrap();
    for lane in Lane::ALL {
        let got = &by_lane[lane.index()];
        let nonces: Vec<u64> = got.iter().map(Envelope::nonce).collect();
        assert_eq!(
            nonces,
            (0..PER_LANE).collect::<Vec<_>>(),
            "lane {lane}: every message, in order"
        );
        assert!(
            got.iter()
                .all(|e| e.lane() == lane && e.source() == cell.public())
        );
        // A cell's writer leaves TTL alone.
        assert!(
            got.iter()
                .all(|e| e.ttl() == relay_codec::message::DEFAULT_TTL)
        );
    }
}

/// The writer's lane weights under test: not the default, so a writer that
/// ignored its configuration fails too.
const SHARE_WEIGHTS: [u32; 4] = [16, 4, 2, 1];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writer_gives_each_lane_its_weighted_share_under_saturation() {
    // Small receive windows on the accepting side: QUIC can hold only a few
    // dozen messages in flight, so arrival order is the writer's pick
    // order up to that (within its buffers QUIC sends higher lanes first).
    let tuning = TransportTuning {
        stream_window: 16 * 1024,
        conn_window: 32 * 1024,
        ..TransportTuning::default()
    };
    let (relay, cell) = (Keypair::generate(), Keypair::generate());
    let pair = connect_with(&relay, &cell, &tuning).await;
    const PER_LANE: usize = 1_500;
    // Arrivals skipped (the streams are accepted one after the other) and
    // counted; control, with 16 of 23 picks, keeps a backlog for
    // PER_LANE * 23 / 16 = 2 156 picks, beyond SKIP + COUNTED.
    const SKIP: usize = 100;
    const COUNTED: usize = 1_500;
    // Every lane full before the writer starts, staged as a cell stages
    // its own messages.
    let queues = Arc::new(LaneQueues::new(PER_LANE));
    for n in 0..PER_LANE as u64 {
        for lane in Lane::ALL {
            let msg = Message::new(cell.public(), Destination::Broadcast, vec![7; 1000].into())
                .with_lane(lane)
                .with_nonce(n);
            assert!(queues.stage(lane, move |buf| msg.encode(buf)).is_ok());
        }
    }
    // One message per batch, so a pick of the scheduler is one message.
    let cfg = WriterConfig {
        weights: SHARE_WEIGHTS,
        batch_bytes: 1,
        ..WriterConfig::default()
    };
    let total = 4 * PER_LANE;
    let (tx, mut rx) = tokio::sync::mpsc::channel(total);
    let server = pair.server.clone();
    let receiver = tokio::spawn(async move {
        let mut readers = tokio::task::JoinSet::new();
        for _ in 0..4 {
            let recv = server.accept_uni().await.expect("a data stream");
            let tx = tx.clone();
            readers.spawn(async move {
                let mut reader = FrameReader::new(recv, Limits::default());
                let mut decoder = BatchDecoder::new(Limits::default()).unwrap();
                while let Some(Frame::Batch(b)) = reader.next().await.expect("a frame") {
                    for env in decoder.messages(&b).unwrap() {
                        tx.send(env.unwrap().lane()).await.unwrap();
                    }
                }
            });
        }
        while readers.join_next().await.is_some() {}
    });
    let writer = spawn_writer(&pair.client, &queues, cfg);
    let mut order = Vec::with_capacity(total);
    while order.len() < total {
        let lane = tokio::time::timeout(WAIT, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("{} of {total} messages arrived", order.len()))
            .expect("the readers run until every message came");
        order.push(lane);
    }
    close_and_join(&queues, writer).await;
    tokio::time::timeout(WAIT, receiver).await.unwrap().unwrap();

    let window = &order[SKIP..SKIP + COUNTED];
    let got = Lane::ALL.map(|l| window.iter().filter(|w| **w == l).count());
    let sum: u32 = SHARE_WEIGHTS.iter().sum();
    let want = SHARE_WEIGHTS.map(|w| COUNTED * w as usize / sum as usize);
    println!(
        "arrivals {SKIP}..{} per lane: {got:?}; weights {SHARE_WEIGHTS:?} give {want:?}",
        SKIP + COUNTED
    );
    // Exact over every cycle of 23 picks, up to what QUIC and the four
    // readers reorder at the window's edges: a message moves at most the
    // ~30 in flight plus one read (~15), so a count by at most twice that.
    // Measured: within 60, with two CPU hogs beside it. Equal weights give
    // control 350, the default weights 750, reversed ones 60.
    let tolerance = COUNTED / 10;
    for (i, lane) in Lane::ALL.iter().enumerate() {
        assert!(
            got[i].abs_diff(want[i]) <= tolerance,
            "{lane} got {} of {COUNTED} arrivals, its weight {} of {sum} gives {}; all: {got:?}",
            got[i],
            SHARE_WEIGHTS[i],
            want[i]
        );
    }
    for lane in Lane::ALL {
        assert!(
            order[SKIP + COUNTED..].contains(&lane),
            "{lane} ran out of backlog inside the counted window"
        );
    }
}

#[tokio::test]
async fn push_wait_blocks_while_a_lane_is_full_and_resumes_when_drained() {
    let relay = Keypair::generate();
    let cell = Keypair::generate();
    let pair = connect(&relay, &cell).await;
    let queues = Arc::new(LaneQueues::new(2));
    let msg = |n| outbound(envelope(&cell, Lane::Normal, n, Bytes::from_static(b"x")));
    queues.push(msg(0)).unwrap();
    queues.push(msg(1)).unwrap();
    assert!(queues.push(msg(2)).is_err(), "a full lane refuses push");
    // Lanes are independent: a full normal lane does not block high.
    queues
        .push(outbound(envelope(&cell, Lane::High, 100, Bytes::new())))
        .expect("room on another lane");

    // Polled once, push_wait finds the lane full and waits.
    let mut waiting = std::pin::pin!(queues.push_wait(msg(2)));
    assert!(
        poll_once(waiting.as_mut()).await.is_none(),
        "push_wait returned while the lane was full"
    );
    assert_eq!(queues.lane_len(Lane::Normal), 2);

    // Draining the lane (a writer) lets it in.
    let receiver = tokio::spawn(receive_all(pair.server.clone(), 2));
    let writer = spawn_writer(&pair.client, &queues, WriterConfig::default());
    let pushed = tokio::time::timeout(WAIT, waiting)
        .await
        .expect("push_wait resumed once the lane drained");
    assert!(pushed.is_ok());
    // Everything, including the waiting message, reaches the other side.
    let more = outbound(envelope(&cell, Lane::Normal, 3, Bytes::from_static(b"y")));
    queues.push_wait(more).await.unwrap();
    close_and_join(&queues, writer).await;
    let by_lane = tokio::time::timeout(WAIT, receiver).await.unwrap().unwrap();
    let normal: Vec<u64> = by_lane[Lane::Normal.index()]
        .iter()
        .map(Envelope::nonce)
        .collect();
    assert_eq!(normal, vec![0, 1, 2, 3]);
    let high: Vec<u64> = by_lane[Lane::High.index()]
        .iter()
        .map(Envelope::nonce)
        .collect();
    assert_eq!(high, vec![100]);
}

#[tokio::test]
async fn wait_for_room_returns_once_a_lane_drains_to_half_or_at_the_deadline() {
    let relay = Keypair::generate();
    let cell = Keypair::generate();
    let pair = connect(&relay, &cell).await;
    let queues = Arc::new(LaneQueues::new(4));
    let msg = |n| outbound(envelope(&cell, Lane::Normal, n, Bytes::from_static(b"x")));
    for n in 0..2 {
        queues.push(msg(n)).unwrap();
    }
    assert!(
        !queues.over_high_water(Lane::Normal),
        "half full is not over"
    );
    queues.push(msg(2)).unwrap();
    assert!(queues.over_high_water(Lane::Normal));
    assert!(
        !queues.over_high_water(Lane::High),
        "lanes are counted apart"
    );

    // Nobody drains: the wait ends at its deadline, saying so.
    let soon = tokio::time::Instant::now() + Duration::from_millis(50);
    assert!(!queues.wait_for_room(Lane::Normal, soon).await);
    assert_eq!(queues.lane_len(Lane::Normal), 3);

    // A writer drains the lane: the wait ends well before its deadline.
    let receiver = tokio::spawn(receive_all(pair.server.clone(), 1));
    let waiting = {
        let queues = queues.clone();
        tokio::spawn(async move {
            let far = tokio::time::Instant::now() + WAIT * 10;
            queues.wait_for_room(Lane::Normal, far).await
        })
    };
    let writer = spawn_writer(&pair.client, &queues, WriterConfig::default());
    let drained = tokio::time::timeout(WAIT, waiting)
        .await
        .expect("the wait ended once the writer took the messages")
        .unwrap();
    assert!(drained);
    assert!(!queues.over_high_water(Lane::Normal));
    close_and_join(&queues, writer).await;
    let by_lane = tokio::time::timeout(WAIT, receiver).await.unwrap().unwrap();
    assert_eq!(by_lane[Lane::Normal.index()].len(), 3);
}

#[tokio::test]
async fn staged_messages_leave_whole_in_order_and_within_the_batch_limits() {
    let relay = Keypair::generate();
    let cell = Keypair::generate();
    let pair = connect(&relay, &cell).await;
    let queues = Arc::new(LaneQueues::new(40));
    let key = &cell;
    let stage = |n: u64| {
        let msg = Message::new(key.public(), Destination::Broadcast, vec![7u8; 100].into())
            .with_lane(Lane::Bulk)
            .with_timestamp(1_700_000_000_000)
            .with_nonce(n);
        move |buf: &mut BytesMut| msg.encode_signed(key, buf)
    };
    for n in 0..40 {
        assert!(queues.stage(Lane::Bulk, stage(n)).is_ok());
    }
    assert!(
        queues.stage(Lane::Bulk, stage(40)).is_err(),
        "a full lane refuses"
    );
    assert_eq!(queues.lane_len(Lane::Bulk), 40);

    // Batches of at most 7 messages or 1 KiB: one message is ~230 bytes.
    let cfg = WriterConfig {
        batch_bytes: 1024,
        max_batch_messages: 7,
        ..WriterConfig::default()
    };
    let server = pair.server.clone();
    let receiver = tokio::spawn(async move {
        let recv = server.accept_uni().await.expect("a data stream");
        let mut reader = FrameReader::new(recv, Limits::default());
        let mut decoder = BatchDecoder::new(Limits::default()).unwrap();
        let mut batches = Vec::new();
        while let Some(Frame::Batch(b)) = reader.next().await.expect("a frame") {
            let msgs: Vec<Envelope> = decoder.messages(&b).unwrap().map(Result::unwrap).collect();
            batches.push((b.raw_len as usize, msgs));
        }
        batches
    });
    let writer = spawn_writer(&pair.client, &queues, cfg);
    // Waits for room, then gets in behind the rest.
    let late = tokio::time::timeout(WAIT, queues.stage_wait(Lane::Bulk, stage(40)))
        .await
        .expect("room once the writer drained the lane");
    assert!(late.is_ok());
    close_and_join(&queues, writer).await;
    let batches = tokio::time::timeout(WAIT, receiver).await.unwrap().unwrap();
    for (raw_len, msgs) in &batches {
        assert!(
            !msgs.is_empty() && msgs.len() <= 7,
            "{} messages",
            msgs.len()
        );
        assert!(*raw_len <= 1024, "{raw_len} bytes");
    }
    let got: Vec<Envelope> = batches.into_iter().flat_map(|(_, m)| m).collect();
    let nonces: Vec<u64> = got.iter().map(Envelope::nonce).collect();
    assert_eq!(nonces, (0..41).collect::<Vec<_>>());
    assert!(
        got.iter().all(|e| e.verify().is_ok()),
        "whole, signed messages"
    );
}

#[tokio::test]
async fn closed_queues_give_messages_back() {
    let cell = Keypair::generate();
    let queues = Arc::new(LaneQueues::new(1));
    let msg = |n| outbound(envelope(&cell, Lane::Bulk, n, Bytes::new()));
    queues.push(msg(0)).unwrap();
    // A producer waiting for room is released by close, with its message.
    let mut waiting = std::pin::pin!(queues.push_wait(msg(1)));
    assert!(
        poll_once(waiting.as_mut()).await.is_none(),
        "push_wait returned while the lane was full"
    );
    queues.close();
    let back = tokio::time::timeout(WAIT, waiting)
        .await
        .expect("close releases push_wait")
        .expect_err("a closed queue refuses");
    assert_eq!(back.env.nonce(), 1);
    assert!(queues.push(msg(2)).is_err());
    assert!(queues.push_wait(msg(3)).await.is_err());
    // What was queued before close stays for the writer to flush.
    assert_eq!(queues.len(), 1);
}

#[tokio::test]
async fn a_forwarded_batch_goes_out_unchanged_and_in_lane_order() {
    let relay = Keypair::generate();
    let cell = Keypair::generate();
    let pair = connect(&relay, &cell).await;
    let queues = Arc::new(LaneQueues::new(1000));
    // Messages 0..10, then a compressed batch holding 10..60, then 60..70.
    for n in 0..10 {
        queues
            .push(outbound(envelope(
                &cell,
                Lane::High,
                n,
                Bytes::from("before"),
            )))
            .unwrap();
    }
    let mut enc = relay_codec::BatchEncoder::new(1, 0).unwrap();
    for n in 10..60 {
        enc.push_envelope(&envelope(
            &cell,
            Lane::High,
            n,
            Bytes::from("x".repeat(200)),
        ));
    }
    let mut frame = BytesMut::new();
    assert!(enc.finish(Lane::High, &mut frame).compressed);
    let frame = frame.freeze();
    let Frame::Batch(batch) = Frame::decode(frame.clone(), &Limits::default()).unwrap() else {
        panic!("not a batch");
    };
    // Counted as its 50 messages against the lane's bound.
    assert!(
        LaneQueues::new(49)
            .push_batch(link::ForwardedBatch {
                batch: batch.clone(),
                queued_at: Instant::now(),
            })
            .is_err()
    );
    queues
        .push_batch(link::ForwardedBatch {
            batch,
            queued_at: Instant::now(),
        })
        .unwrap();
    assert_eq!(queues.len(), 60);
    for n in 60..70 {
        queues
            .push(outbound(envelope(
                &cell,
                Lane::High,
                n,
                Bytes::from("after"),
            )))
            .unwrap();
    }
    // Read the raw stream to see the forwarded frame's bytes as they go out.
    let receiver = tokio::spawn({
        let conn = pair.server.clone();
        async move {
            let mut recv = conn.accept_uni().await.unwrap();
            recv.read_to_end(1 << 20).await.unwrap()
        }
    });
    let writer = spawn_writer(
        &pair.client,
        &queues,
        WriterConfig {
            compress_min: usize::MAX,
            ..WriterConfig::default()
        },
    );
    close_and_join(&queues, writer).await;
    let raw = tokio::time::timeout(WAIT, receiver).await.unwrap().unwrap();
    assert!(
        raw.windows(frame.len()).any(|w| w == &frame[..]),
        "the forwarded frame is on the wire byte for byte"
    );
    let mut buf = BytesMut::from(&raw[..]);
    let mut decoder = BatchDecoder::new(Limits::default()).unwrap();
    let mut nonces = Vec::new();
    while let Some(Frame::Batch(b)) = Frame::take(&mut buf, &Limits::default()).unwrap() {
        for env in decoder.messages(&b).unwrap() {
            nonces.push(env.unwrap().nonce());
        }
    }
    assert_eq!(nonces, (0..70).collect::<Vec<_>>());
}
