//! A sender is told what the relay dropped of its messages: notices that
//! sum the drops per reason and destination, at most one per interval
//! (`link.notice_interval_ms`), whose counts add up exactly to the drops,
//! and whose last ones come before the relay's Close at an orderly close
//! (docs/PROTOCOL.md 4.11, 6.2). The CLI's side is in quickstart.rs; the
//! codes for slow receivers, expired, future-dated and badly signed
//! messages are checked in bad_input.rs. Every test runs over QUIC and
//! over TCP.

use relay_client::cell::{AuthMode, CellOptions, Event};
use relay_codec::frame::NoticeCode;
use relay_codec::{Destination, Frame, Keypair, Lane, MessageId};
use relay_link::Transport;
use relay_tests::cells::{WAIT, connect, options_over, within};
use relay_tests::raw::{RawLink, message, signed};
use relay_tests::{RelayProcess, each_transport};
use std::time::Instant;

/// An interval no test run reaches: the first drop of a kind is reported
/// at once and every later one only at the close.
const NEVER: &str = "[link]\nnotice_interval_ms = 60000\n";

fn notices_sent(relay: &RelayProcess, reason: &str) -> f64 {
    relay.metric(
        "celluler_notices_sent_total",
        &format!("reason=\"{reason}\""),
    )
}

fn drops(relay: &RelayProcess, reason: &str) -> f64 {
    relay.metric("celluler_drops_total", &format!("reason=\"{reason}\""))
}

/// `n` signed messages out of hops (TTL 0) from `link` to `to`.
fn out_of_hops(link: &RawLink, to: relay_codec::PublicKey, n: usize) -> Vec<relay_codec::Envelope> {
    (0..n)
        .map(|i| {
            let m = message(
                &link.key,
                Destination::Cell(to),
                Lane::Normal,
                format!("hop {i}").into_bytes(),
            )
            .with_ttl(0);
            signed(&m, &link.key)
        })
        .collect()
}

each_transport!(drops_are_summed_and_the_rest_are_reported_before_the_relays_close);
async fn drops_are_summed_and_the_rest_are_reported_before_the_relays_close(t: Transport) {
    let relay = RelayProcess::start_with_config(NEVER);
    let mut sender = RawLink::connect_over(&relay, Keypair::generate(), t)
        .await
        .unwrap();
    let to = Keypair::generate().public();

    // A batch of three: one notice for all three, at once.
    let first = out_of_hops(&sender, to, 3);
    sender.send_batch(Lane::Normal, &first).await.unwrap();
    let got = within("the first notice", WAIT, sender.next_control(WAIT)).await;
    assert_eq!(
        got,
        Some(Frame::Notice {
            code: NoticeCode::TtlExpired,
            count: 3,
            id: first[0].id(),
            subject: to,
        })
    );

    // Four more within the interval are summed, and reported at the close,
    // before the relay's Close.
    let more = out_of_hops(&sender, to, 4);
    for m in &more {
        sender
            .send_batch(Lane::Normal, std::slice::from_ref(m))
            .await
            .unwrap();
    }
    let (before, code) = sender.close_orderly(WAIT).await;
    assert_eq!(code, relay_codec::frame::CloseCode::Normal);
    assert_eq!(
        before,
        vec![Frame::Notice {
            code: NoticeCode::TtlExpired,
            count: 4,
            id: more[0].id(),
            subject: to,
        }],
        "the pending count, then Close"
    );
    assert_eq!(drops(&relay, "ttl_expired"), 7.0);
    assert_eq!(notices_sent(&relay, "ttl_expired"), 2.0);
    relay.stop();
}

/// A sending cell over `t` whose messages carry no signature, so that a
/// debug build is not bound by signing.
fn unsigned(t: Transport) -> CellOptions {
    CellOptions {
        auth: AuthMode::Link,
        ..options_over(t)
    }
}

const FLOOD: u64 = 10_000;

each_transport!(a_flood_to_an_absent_cell_is_a_few_notices_that_add_up);
async fn a_flood_to_an_absent_cell_is_a_few_notices_that_add_up(t: Transport) {
    let relay = RelayProcess::start();
    let mut sender = connect(&relay, Keypair::generate(), unsigned(t)).await;
    let nobody = Keypair::generate().public();
    let started = Instant::now();
    let handle = sender.handle();
    let flood = tokio::spawn(async move {
        let mut first = None;
        for i in 0..FLOOD {
            let id = handle
                .send(nobody, Lane::Normal, i.to_le_bytes().to_vec())
                .await
                .expect("send");
            first.get_or_insert(id);
        }
        first.expect("sent something")
    });
    // The relay's timer sends what is pending: every drop is reported
    // without a close.
    let (mut notices, mut total, mut first_id) = (0u64, 0u64, None::<MessageId>);
    within("notices for the whole flood", WAIT * 2, async {
        while total < FLOOD {
            match sender.next_event().await {
                Some(Event::Notice {
                    code,
                    count,
                    id,
                    subject,
                }) => {
                    assert_eq!((code, subject), (NoticeCode::UnknownDestination, nobody));
                    first_id.get_or_insert(id);
                    notices += 1;
                    total += u64::from(count);
                }
                Some(_) => {}
                None => panic!("the sender stopped"),
            }
        }
    })
    .await;
    let elapsed_ms = started.elapsed().as_millis() as u64;
    assert_eq!(total, FLOOD, "the counts add up to the drops");
    assert_eq!(first_id, Some(within("flood", WAIT, flood).await.unwrap()));
    // One notice at once, then at most one per 100 ms interval (in whole
    // milliseconds of the relay's clock, so 99 ms apart at the least).
    let bound = 2 + elapsed_ms / 99;
    assert!(
        notices <= bound,
        "{notices} notices for {FLOOD} drops in {elapsed_ms} ms (at most {bound})"
    );
    assert!(notices < FLOOD / 10, "{notices} notices");
    assert_eq!(drops(&relay, "unknown_destination"), FLOOD as f64);
    assert_eq!(notices_sent(&relay, "unknown_destination"), notices as f64);
    // The handle's tally says the same.
    let u = sender.undelivered();
    assert_eq!((u.total, u.notices), (FLOOD, notices));
    assert_eq!(
        u.by_destination,
        vec![(NoticeCode::UnknownDestination, nobody, FLOOD)]
    );
    let handle = sender.handle();
    within("close", WAIT, sender.close()).await.unwrap();
    let u = handle.undelivered();
    assert!(u.complete);
    assert_eq!(u.total, FLOOD);
    relay.stop();
}

each_transport!(close_returns_once_every_notice_has_arrived);
async fn close_returns_once_every_notice_has_arrived(t: Transport) {
    let relay = RelayProcess::start_with_config(NEVER);
    let sender = connect(&relay, Keypair::generate(), unsigned(t)).await;
    let mut present = connect(&relay, Keypair::generate(), options_over(t)).await;
    let (a, b) = (Keypair::generate().public(), Keypair::generate().public());
    const N: u64 = 50;
    for i in 0..N {
        sender
            .send(a, Lane::Normal, i.to_le_bytes().to_vec())
            .await
            .unwrap();
        sender
            .send(b, Lane::High, i.to_le_bytes().to_vec())
            .await
            .unwrap();
        sender
            .send(present.public_key(), Lane::Normal, i.to_le_bytes().to_vec())
            .await
            .unwrap();
        // A round trip per round: later rounds are later batches, whose
        // drops wait for the interval (or the close).
        relay_tests::cells::recv(&mut present, "a message to the present cell").await;
    }
    let handle = sender.handle();
    within("close", WAIT, sender.close()).await.unwrap();
    // Nothing waited for the notices but close: with an interval no run
    // reaches, all but the first of each destination came at the close.
    let u = handle.undelivered();
    assert!(u.complete, "the relay answered the close with its Close");
    assert_eq!(u.total, 2 * N);
    let mut want = vec![
        (NoticeCode::UnknownDestination, a, N),
        (NoticeCode::UnknownDestination, b, N),
    ];
    want.sort();
    assert_eq!(u.by_destination, want);
    assert!(u.notices <= 4, "{} notices", u.notices);
    assert_eq!(drops(&relay, "unknown_destination"), (2 * N) as f64);
    assert_eq!(
        notices_sent(&relay, "unknown_destination"),
        u.notices as f64
    );
    within("close present", WAIT, present.close())
        .await
        .unwrap();
    relay.stop();
}
