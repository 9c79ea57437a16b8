//! Credit-based flow control per lane on a relay-to-relay link
//! (docs/PROTOCOL.md 10.4).
//!
//! **The bound.** Each side may send at most `window` messages per lane
//! before the other grants them back, so at most `window` messages per lane
//! per relay link are on their way at once (in the sender's queue, on the
//! wire, in the receiver's buffers). A relay grants back what it took as it
//! ingests it, once it took at least half the window, so a busy link keeps
//! moving; a link that is down holds nothing (its state goes with it); a
//! sender out of credit drops the message and counts it (a slow link slows
//! or drops only the traffic that uses it). A peer that sends past the
//! credit it was granted breaks the protocol and is closed.

use relay_codec::Lane;

/// The credit state of one relay link, both directions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credit {
    window: u32,
    /// What this relay may still send, per lane.
    send: [u32; 4],
    /// What the peer sent since this relay last granted it back, per lane.
    taken: [u32; 4],
}

/// The peer sent more on a lane than it was granted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Overrun {
    /// The lane.
    pub lane: Lane,
    /// What it sent since the last grant.
    pub taken: u64,
    /// The window.
    pub window: u32,
}

impl Credit {
    /// A new link's credit: `window` messages on each lane, each way (at
    /// least 2, so half a window is at least 1).
    pub fn new(window: u32) -> Self {
        let window = window.max(2);
        Self {
            window,
            send: [window; 4],
            taken: [0; 4],
        }
    }

    /// What this relay may still send on `lane`.
    pub fn available(&self, lane: Lane) -> u32 {
        self.send[lane.index()]
    }

    /// Takes one message's credit on `lane`; false if there is none left
    /// (the message must not be sent).
    pub fn take(&mut self, lane: Lane) -> bool {
        let c = &mut self.send[lane.index()];
        if *c == 0 {
            return false;
        }
        *c -= 1;
        true
    }

    /// The peer granted `grant` more on `lane`; what it grants beyond the
    /// window is ignored (a sender never holds more than the window).
    pub fn granted(&mut self, lane: Lane, grant: u32) {
        let c = &mut self.send[lane.index()];
        *c = c.saturating_add(grant).min(self.window);
    }

    /// The peer sent `n` messages on `lane`: the grant to send back now,
    /// if half the window or more was taken since the last one; an
    /// [`Overrun`] if the peer sent past its credit.
    pub fn received(&mut self, lane: Lane, n: u64) -> Result<Option<u32>, Overrun> {
        let t = &mut self.taken[lane.index()];
        let total = u64::from(*t) + n;
        if total > u64::from(self.window) {
            return Err(Overrun {
                lane,
                taken: total,
                window: self.window,
            });
        }
        *t = total as u32;
        if *t >= self.window / 2 {
            let grant = *t;
            *t = 0;
            return Ok(Some(grant));
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sender_stops_at_the_window_until_credit_comes_back() {
        let mut c = Credit::new(4);
        for _ in 0..4 {
            assert!(c.take(Lane::Bulk));
        }
        assert!(!c.take(Lane::Bulk), "the window is spent");
        assert!(c.take(Lane::High), "each lane has its own credit");
        c.granted(Lane::Bulk, 2);
        assert!(c.take(Lane::Bulk) && c.take(Lane::Bulk) && !c.take(Lane::Bulk));
        c.granted(Lane::Bulk, u32::MAX);
        assert_eq!(c.available(Lane::Bulk), 4, "never more than the window");
    }

    #[test]
    fn the_receiver_grants_back_at_half_the_window_and_refuses_an_overrun() {
        let mut c = Credit::new(10);
        assert_eq!(c.received(Lane::Normal, 4), Ok(None));
        assert_eq!(c.received(Lane::Normal, 1), Ok(Some(5)));
        assert_eq!(c.received(Lane::Normal, 10), Ok(Some(10)));
        assert_eq!(
            c.received(Lane::Normal, 11),
            Err(Overrun {
                lane: Lane::Normal,
                taken: 11,
                window: 10
            })
        );
    }

    #[test]
    fn sender_and_receiver_agree_so_a_compliant_sender_never_overruns() {
        let (mut tx, mut rx) = (Credit::new(8), Credit::new(8));
        let mut in_flight = 0u64;
        for round in 0..1000u64 {
            // Send as much as credit allows, in bursts of varying size.
            let burst = round % 13;
            let mut sent = 0;
            while sent < burst && tx.take(Lane::High) {
                sent += 1;
            }
            in_flight += sent;
            assert!(in_flight <= 8);
            // The receiver takes a part of what is in flight.
            let n = in_flight.min(round % 5);
            in_flight -= n;
            if let Some(g) = rx.received(Lane::High, n).expect("never an overrun") {
                tx.granted(Lane::High, g);
            }
        }
    }
}
