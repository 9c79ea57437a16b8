//! The lane queues and the lane writer over real links on loopback
//! (QUIC and TLS over TCP), without a relay: what producers see (room,
//! waiting, closing) and what the writer puts on the lanes (order, batch
//! bounds, weighted shares, forwarded batches).

mod common;

use bytes::{Bytes, BytesMut};
use common::*;
use relay_codec::{BatchDecoder, Destination, Envelope, Frame, Keypair, Lane, Limits, Message};
use relay_link::quic::TransportTuning;
use relay_link::tcp::TcpTuning;
use relay_link::{
    BatchReader, ForwardedBatch, LaneQueues, Link, LinkError, NoObserver, Outbound, Transport,
    WriterConfig, run_writer,
};
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

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

/// Starts a link writer draining `queues` over `link`.
fn spawn_writer(
    link: &Link,
    queues: &Arc<LaneQueues>,
    cfg: WriterConfig,
) -> tokio::task::JoinHandle<Result<(), LinkError>> {
    tokio::spawn(run_writer(
        link.lane_sender(),
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

/// The writer's lane weights under test: not the default, so a writer that
/// ignored its configuration fails too.
const SHARE_WEIGHTS: [u32; 4] = [16, 4, 2, 1];

/// A writer observer that records, in order, the lane of every message of
/// every batch the writer builds.
#[derive(Clone, Default)]
struct PickRecorder(Arc<std::sync::Mutex<Vec<Lane>>>);

impl relay_link::WriteObserver for PickRecorder {
    fn on_batch(&mut self, lane: Lane, stats: &relay_codec::batch::BatchStats) {
        let mut picks = self.0.lock().unwrap();
        picks.extend(std::iter::repeat_n(lane, stats.count));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_quic_the_writer_gives_each_lane_its_weighted_share_under_saturation() {
    weighted_share(Transport::Quic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tcp_the_writer_gives_each_lane_its_weighted_share_under_saturation() {
    weighted_share(Transport::Tcp).await;
}

async fn weighted_share(t: Transport) {
    // Small windows and send queues, so the transport pushes back on the
    // writer while every lane is backlogged, as a slow receiver does; the
    // shares are counted from the writer's own picks (its observer), not
    // from arrival order, which four lane readers on a loaded machine
    // shuffle.
    let opts = Opts {
        quic: TransportTuning {
            stream_window: 16 * 1024,
            conn_window: 32 * 1024,
            ..TransportTuning::default()
        },
        tcp: TcpTuning {
            send_queue: 1,
            ..TcpTuning::default()
        },
        ..Opts::default()
    };
    let pair = pair(t, &opts).await;
    let cell = &pair.client_key;
    const PER_LANE: usize = 1_500;
    // Picks skipped (the writer's first ones) and counted; control, with 16 of 23 picks, keeps a backlog for
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
            let recv = server.accept_lane().await.expect("a lane");
            let tx = tx.clone();
            readers.spawn(async move {
                let mut reader = BatchReader::new(recv, Limits::default()).unwrap();
                let mut envs = Vec::new();
                while reader.next(&mut envs).await.expect("a batch").is_some() {
                    for env in envs.drain(..) {
                        tx.send(env.lane()).await.unwrap();
                    }
                }
            });
        }
        while readers.join_next().await.is_some() {}
    });
    let picks = PickRecorder::default();
    let writer = tokio::spawn(run_writer(
        pair.client.lane_sender(),
        queues.clone(),
        cfg,
        picks.clone(),
    ));
    let mut arrived = [0usize; 4];
    for n in 0..total {
        let lane = tokio::time::timeout(WAIT, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("{n} of {total} messages arrived"))
            .expect("the readers run until every message came");
        arrived[lane.index()] += 1;
    }
    assert_eq!(arrived, [PER_LANE; 4], "{t}: every message arrives once");
    close_and_join(&queues, writer).await;
    tokio::time::timeout(WAIT, receiver).await.unwrap().unwrap();
    // The writer's picks, in the order it took messages off the queues:
    // what its scheduler decided, whatever order the four lane readers
    // (tasks on a loaded machine) then happen to run in.
    let order = picks.0.lock().unwrap().clone();
    assert_eq!(order.len(), total, "{t}: one pick per message");

    let window = &order[SKIP..SKIP + COUNTED];
    let got = Lane::ALL.map(|l| window.iter().filter(|w| **w == l).count());
    let sum: u32 = SHARE_WEIGHTS.iter().sum();
    let want = SHARE_WEIGHTS.map(|w| COUNTED * w as usize / sum as usize);
    println!(
        "{t}: picks {SKIP}..{} per lane: {got:?}; weights {SHARE_WEIGHTS:?} give {want:?}",
        SKIP + COUNTED
    );
    // Exact over every cycle of 23 picks, so off by at most one cycle's
    // share at the window's edges; the allowance is wider still. Picks by
    // equal weights would give control 375 of its 1 043, by the default
    // weights [8, 4, 2, 1] 800, by reversed ones 65: each outside it.
    let tolerance = COUNTED / 10;
    for (i, lane) in Lane::ALL.iter().enumerate() {
        assert!(
            got[i].abs_diff(want[i]) <= tolerance,
            "{t}: {lane} got {} of {COUNTED} picks, its weight {} of {sum} gives {}; all: {got:?}",
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
    for t in BOTH {
        push_wait_blocks_while_a_lane_is_full_and_resumes_when_drained_over(t).await;
    }
}

async fn push_wait_blocks_while_a_lane_is_full_and_resumes_when_drained_over(t: Transport) {
    let pair = pair(t, &Opts::default()).await;
    let cell = &pair.client_key;
    let queues = Arc::new(LaneQueues::new(2));
    let msg = |n| outbound(envelope(cell, Lane::Normal, n, Bytes::from_static(b"x")));
    queues.push(msg(0)).unwrap();
    queues.push(msg(1)).unwrap();
    assert!(queues.push(msg(2)).is_err(), "a full lane refuses push");
    // Lanes are independent: a full normal lane does not block high.
    queues
        .push(outbound(envelope(cell, Lane::High, 100, Bytes::new())))
        .expect("room on another lane");

    // Polled once, push_wait finds the lane full and waits.
    let mut waiting = std::pin::pin!(queues.push_wait(msg(2)));
    assert!(
        poll_once(waiting.as_mut()).await.is_none(),
        "push_wait returned while the lane was full"
    );
    assert_eq!(queues.lane_len(Lane::Normal), 2);

    // Draining the lane (a writer) lets it in.
    let receiver = tokio::spawn(receive_lanes(pair.server.clone(), 2));
    let writer = spawn_writer(&pair.client, &queues, WriterConfig::default());
    let pushed = tokio::time::timeout(WAIT, waiting)
        .await
        .expect("push_wait resumed once the lane drained");
    assert!(pushed.is_ok());
    // Everything, including the waiting message, reaches the other side.
    let more = outbound(envelope(cell, Lane::Normal, 3, Bytes::from_static(b"y")));
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
    for t in BOTH {
        wait_for_room_returns_once_a_lane_drains_to_half_or_at_the_deadline_over(t).await;
    }
}

async fn wait_for_room_returns_once_a_lane_drains_to_half_or_at_the_deadline_over(t: Transport) {
    let pair = pair(t, &Opts::default()).await;
    let cell = &pair.client_key;
    let queues = Arc::new(LaneQueues::new(4));
    let msg = |n| outbound(envelope(cell, Lane::Normal, n, Bytes::from_static(b"x")));
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
    let receiver = tokio::spawn(receive_lanes(pair.server.clone(), 1));
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
    for t in BOTH {
        staged_messages_leave_whole_in_order_and_within_the_batch_limits_over(t).await;
    }
}

async fn staged_messages_leave_whole_in_order_and_within_the_batch_limits_over(t: Transport) {
    let pair = pair(t, &Opts::default()).await;
    let cell = &pair.client_key;
    let queues = Arc::new(LaneQueues::new(40));
    let key = cell;
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
        let recv = server.accept_lane().await.expect("a lane");
        let mut reader = BatchReader::new(recv, Limits::default()).unwrap();
        let mut envs = Vec::new();
        let mut batches = Vec::new();
        while let Some(b) = reader.next(&mut envs).await.expect("a batch") {
            batches.push((b.raw_len as usize, std::mem::take(&mut envs)));
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
    for t in BOTH {
        a_forwarded_batch_goes_out_unchanged_and_in_lane_order_over(t).await;
    }
}

async fn a_forwarded_batch_goes_out_unchanged_and_in_lane_order_over(t: Transport) {
    let pair = pair(t, &Opts::default()).await;
    let cell = &pair.client_key;
    let queues = Arc::new(LaneQueues::new(1000));
    // Messages 0..10, then a compressed batch holding 10..60, then 60..70.
    for n in 0..10 {
        queues
            .push(outbound(envelope(
                cell,
                Lane::High,
                n,
                Bytes::from("before"),
            )))
            .unwrap();
    }
    let mut enc = relay_codec::BatchEncoder::new(1, 0).unwrap();
    for n in 10..60 {
        enc.push_envelope(&envelope(cell, Lane::High, n, Bytes::from("x".repeat(200))));
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
            .push_batch(ForwardedBatch {
                batch: batch.clone(),
                queued_at: Instant::now(),
            })
            .is_err()
    );
    queues
        .push_batch(ForwardedBatch {
            batch,
            queued_at: Instant::now(),
        })
        .unwrap();
    assert_eq!(queues.len(), 60);
    for n in 60..70 {
        queues
            .push(outbound(envelope(
                cell,
                Lane::High,
                n,
                Bytes::from("after"),
            )))
            .unwrap();
    }
    // Every frame of the lane as it arrived, to see the forwarded one's
    // bytes as they went out.
    let receiver = tokio::spawn({
        let link = pair.server.clone();
        async move {
            let mut recv = link.accept_lane().await.unwrap();
            let mut raw = BytesMut::new();
            while let Some(f) = recv.next().await.unwrap() {
                let Frame::Batch(b) = f else {
                    panic!("not a batch: {f:?}")
                };
                raw.extend_from_slice(&b.frame_header());
                raw.extend_from_slice(&b.data);
            }
            raw
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
