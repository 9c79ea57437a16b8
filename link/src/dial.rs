//! Redialing a lost link: exponential backoff with jitter, for cells and
//! (next) relay peering alike.
//!
//! [`Backoff`] is the policy and its state: the delay before each attempt
//! starts at `initial`, doubles after every failure up to `max`, and goes
//! back to `initial` after a success. Each wait is drawn with "equal
//! jitter", between half the delay and the whole of it, so nodes cut off
//! together (a relay restart) do not all come back in the same instant.
//! The random draws come from a seed the caller passes in: a run with the
//! same seed waits the same times, which is what tests and simulations
//! need; production seeds it from the OS.
//!
//! [`redial`] is the loop around it: wait, make an [`Attempt`], and again
//! until one succeeds. It stops only by succeeding; a caller that must give
//! up (a cell closing, a relay shutting down) races it against that event
//! and drops it, which cancels the wait or the attempt in progress.

use std::future::Future;
use std::time::Duration;
use thiserror::Error;

/// A [`Backoff`] whose bounds make no sense.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
#[error(
    "backoff initial delay {initial:?} must be above zero and at most the longest delay {max:?}"
)]
pub struct BackoffError {
    /// The first delay asked for.
    pub initial: Duration,
    /// The longest delay asked for.
    pub max: Duration,
}

/// Exponential backoff with equal jitter and a seeded random source.
///
/// The `n`-th wait since the last success (counting from 0) is drawn
/// uniformly from `[d / 2, d]`, with `d = min(initial × 2^n, max)`.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    /// The delay the next wait is drawn under.
    delay: Duration,
    rng: fastrand::Rng,
}

impl Backoff {
    /// A backoff from `initial` up to `max`, drawing its jitter from
    /// `seed`. Errors unless `0 < initial <= max`.
    pub fn new(initial: Duration, max: Duration, seed: u64) -> Result<Self, BackoffError> {
        if initial.is_zero() || max < initial {
            return Err(BackoffError { initial, max });
        }
        Ok(Self {
            initial,
            max,
            delay: initial,
            rng: fastrand::Rng::with_seed(seed),
        })
    }

    /// The delay the next wait is drawn under (before jitter): `initial`
    /// after a success, doubled per failure since, at most `max`.
    pub fn delay(&self) -> Duration {
        self.delay
    }

    /// How long to wait before the next attempt, between half of
    /// [`delay`](Self::delay) and all of it; the delay then doubles (up to
    /// `max`) for the attempt after, in case this one fails too.
    pub fn next_wait(&mut self) -> Duration {
        let half = self.delay / 2;
        // Nanosecond resolution: a delay is at most u64::MAX ns (584
        // years) for this purpose.
        let span = u64::try_from((self.delay - half).as_nanos()).unwrap_or(u64::MAX);
        let wait = half + Duration::from_nanos(self.rng.u64(0..=span));
        self.delay = self.delay.saturating_mul(2).min(self.max);
        wait
    }

    /// An attempt succeeded: the next wait starts again from `initial`.
    pub fn reset(&mut self) {
        self.delay = self.initial;
    }
}

/// One attempt at making a link, made again by [`redial`] until it
/// succeeds. A closure returning a future implements it; a type of its
/// own can hold what the attempts share by `&mut` (an endpoint cache),
/// which a closure's future could not borrow.
pub trait Attempt {
    /// What a successful attempt makes.
    type Output;
    /// Why an attempt failed.
    type Error;
    /// Makes one attempt.
    fn attempt(&mut self) -> impl Future<Output = Result<Self::Output, Self::Error>> + Send;
}

impl<F, Fut, T, E> Attempt for F
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>> + Send,
{
    type Output = T;
    type Error = E;
    fn attempt(&mut self) -> impl Future<Output = Result<T, E>> + Send {
        self()
    }
}

/// Waits ([`Backoff::next_wait`]) and makes `attempt` until it succeeds,
/// then resets `backoff` and returns what it made. After each failure,
/// `failed` hears of the error and of the delay the next wait is drawn
/// under (for a log line).
///
/// The first attempt also waits: a link that was just lost is not redialed
/// in a tight loop. Cancel-safe: dropping the future stops at once.
pub async fn redial<A: Attempt>(
    backoff: &mut Backoff,
    mut attempt: A,
    mut failed: impl FnMut(&A::Error, Duration),
) -> A::Output {
    loop {
        tokio::time::sleep(backoff.next_wait()).await;
        match attempt.attempt().await {
            Ok(t) => {
                backoff.reset();
                return t;
            }
            Err(e) => failed(&e, backoff.delay()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn the_delay_doubles_up_to_the_cap_and_each_wait_is_within_its_jitter() {
        let mut b = Backoff::new(100 * MS, 1000 * MS, 7).unwrap();
        let mut delays = Vec::new();
        for _ in 0..8 {
            let d = b.delay();
            let w = b.next_wait();
            assert!(w >= d / 2 && w <= d, "{w:?} outside [{:?}, {d:?}]", d / 2);
            delays.push(d.as_millis());
        }
        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000, 1000, 1000]);
    }

    #[test]
    fn jitter_spreads_over_its_whole_range_and_replays_from_its_seed() {
        let draw = |seed| {
            let mut b = Backoff::new(1000 * MS, 1000 * MS, seed).unwrap();
            (0..200).map(|_| b.next_wait()).collect::<Vec<_>>()
        };
        let waits = draw(42);
        assert_eq!(waits, draw(42), "the same seed, the same waits");
        assert_ne!(waits, draw(43));
        assert!(waits.iter().all(|w| (500 * MS..=1000 * MS).contains(w)));
        // Both halves of the range are used, not one fixed point.
        assert!(waits.iter().any(|w| *w < 600 * MS));
        assert!(waits.iter().any(|w| *w > 900 * MS));
    }

    #[test]
    fn a_success_resets_the_delay() {
        let mut b = Backoff::new(10 * MS, 80 * MS, 1).unwrap();
        for _ in 0..5 {
            b.next_wait();
        }
        assert_eq!(b.delay(), 80 * MS);
        b.reset();
        assert_eq!(b.delay(), 10 * MS);
        assert!(b.next_wait() <= 10 * MS);
        assert_eq!(b.delay(), 20 * MS);
    }

    #[test]
    fn bounds_that_make_no_sense_are_refused() {
        assert!(Backoff::new(Duration::ZERO, MS, 0).is_err());
        let e = Backoff::new(2 * MS, MS, 0).unwrap_err();
        assert!(e.to_string().contains("at most the longest delay"), "{e}");
        assert!(Backoff::new(MS, MS, 0).is_ok());
        // A cap at the largest duration doubles without overflow.
        let mut b = Backoff::new(Duration::from_secs(1), Duration::MAX, 0).unwrap();
        for _ in 0..100 {
            b.next_wait();
        }
        assert_eq!(b.delay(), Duration::MAX);
    }

    #[tokio::test]
    async fn redial_retries_until_an_attempt_succeeds_then_resets() {
        // Microsecond delays: the test counts attempts, it does not time
        // them.
        let us = Duration::from_micros(1);
        let mut b = Backoff::new(us, 4 * us, 3).unwrap();
        let attempts = std::sync::atomic::AtomicU32::new(0);
        let mut failures = Vec::new();
        let got = redial(
            &mut b,
            || {
                let n = attempts.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                std::future::ready(if n < 5 { Err(n) } else { Ok("linked") })
            },
            |e: &u32, next| failures.push((*e, next)),
        )
        .await;
        assert_eq!(got, "linked");
        assert_eq!(attempts.into_inner(), 5);
        // The delay doubled after each failure, capped at 4 µs.
        assert_eq!(
            failures,
            [(1, 2 * us), (2, 4 * us), (3, 4 * us), (4, 4 * us)]
        );
        assert_eq!(b.delay(), us, "reset by the success");
    }
}
