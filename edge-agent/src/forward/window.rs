//! The window of batches in flight, whatever sends them and whatever acknowledges them
//! (the hub's `AckV1` in hub mode, the broker's PUBACKs in JSON mode).
//!
//! It decides three things, and nothing else: how many more batches may go out
//! ([`Window::room`]), where sending resumes ([`Window::cursor`]: the outbox is read after
//! it), and when batches go again: the oldest unacknowledged one after `ack_timeout`, with
//! everything sent after it, in order ([`Window::rewind_expired`]); all of them at once
//! after a reconnect or a hub's announcement ([`Window::restart`]). Time is
//! `tokio::time::Instant`, so it is tested with paused time.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;

/// Batches in flight in the current session.
#[derive(Debug)]
pub(super) struct Window {
    /// Most batches in flight at once (`forward.window`).
    size: usize,
    /// A batch unacknowledged this long is sent again (`forward.ack_timeout`).
    ack_timeout: Duration,
    /// Sequence number → (when it was sent, its readings).
    in_flight: BTreeMap<u64, (Instant, u64)>,
    /// Highest sequence number sent in this session: the next batches come after it.
    cursor: u64,
}

impl Window {
    pub(super) fn new(size: usize, ack_timeout: Duration) -> Window {
        Window { size: size.max(1), ack_timeout, in_flight: BTreeMap::new(), cursor: 0 }
    }

    /// How many more batches may be sent now.
    pub(super) fn room(&self) -> usize {
        self.size.saturating_sub(self.in_flight.len())
    }

    /// Batches in flight.
    pub(super) fn len(&self) -> usize {
        self.in_flight.len()
    }

    /// The next batches to send are those after this sequence number.
    pub(super) fn cursor(&self) -> u64 {
        self.cursor
    }

    /// Batch `seq` (of `readings` readings) was sent at `now`.
    pub(super) fn sent(&mut self, seq: u64, readings: u64, now: Instant) {
        self.in_flight.insert(seq, (now, readings));
        self.cursor = self.cursor.max(seq);
    }

    /// Batch `seq` is acknowledged. Returns its readings if it was in flight (a duplicate
    /// or late acknowledgement returns `None`; the store ignores it too).
    pub(super) fn acked(&mut self, seq: u64) -> Option<u64> {
        self.in_flight.remove(&seq).map(|(_, n)| n)
    }

    /// If the oldest unacknowledged batch has waited `ack_timeout`, rewinds to it: it and
    /// every batch sent after it leave the window and will be sent again, in order.
    /// Returns the first rewound sequence number and how many were rewound.
    pub(super) fn rewind_expired(&mut self, now: Instant) -> Option<(u64, usize)> {
        let first = self
            .in_flight
            .iter()
            .find(|(_, (at, _))| now.saturating_duration_since(*at) >= self.ack_timeout)
            .map(|(&s, _)| s)?;
        let rewound = self.in_flight.split_off(&first).len();
        self.cursor = first - 1;
        Some((first, rewound))
    }

    /// Forgets the session: everything unacknowledged is sent again from the oldest
    /// (after a reconnect, whose clean session dropped what was in flight, or when a hub
    /// announces it subscribed again). Returns how many batches were in flight.
    pub(super) fn restart(&mut self) -> usize {
        let n = self.in_flight.len();
        self.in_flight.clear();
        self.cursor = 0;
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(10);

    #[tokio::test(start_paused = true)]
    async fn fills_to_the_window_and_frees_room_on_acks() {
        let mut w = Window::new(3, TIMEOUT);
        assert_eq!((w.room(), w.cursor()), (3, 0));
        for seq in 1..=3 {
            w.sent(seq, 10, Instant::now());
        }
        assert_eq!((w.room(), w.cursor(), w.len()), (0, 3, 3));
        assert_eq!(w.acked(2), Some(10));
        assert_eq!(w.acked(2), None, "a duplicate ack frees nothing twice");
        assert_eq!(w.acked(99), None, "an ack for a batch not in flight");
        assert_eq!((w.room(), w.cursor()), (1, 3), "sending resumes after the cursor, not at the gap");
    }

    #[tokio::test(start_paused = true)]
    async fn the_oldest_expired_batch_and_everything_after_it_go_again() {
        let mut w = Window::new(8, TIMEOUT);
        w.sent(1, 1, Instant::now());
        tokio::time::advance(Duration::from_secs(4)).await;
        for seq in 2..=4 {
            w.sent(seq, 1, Instant::now());
        }
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(w.rewind_expired(Instant::now()), None, "nothing has waited 10 s yet");
        assert_eq!(w.acked(1), Some(1));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(w.rewind_expired(Instant::now()), None, "the expired one was acknowledged");
        tokio::time::advance(Duration::from_secs(4)).await;
        // 2..=4 were sent 10 s ago: rewind to 2, all three go again, in order.
        assert_eq!(w.rewind_expired(Instant::now()), Some((2, 3)));
        assert_eq!((w.len(), w.cursor(), w.room()), (0, 1, 8));
    }

    #[tokio::test(start_paused = true)]
    async fn a_rewind_keeps_what_was_sent_before_the_expired_batch() {
        let mut w = Window::new(8, TIMEOUT);
        w.sent(5, 1, Instant::now());
        w.sent(6, 1, Instant::now());
        // 5 is re-sent by an earlier rewind and so younger than 6: only 6 onwards goes.
        tokio::time::advance(Duration::from_secs(6)).await;
        w.acked(5);
        w.sent(5, 1, Instant::now());
        tokio::time::advance(Duration::from_secs(4)).await;
        assert_eq!(w.rewind_expired(Instant::now()), Some((6, 1)));
        assert_eq!((w.len(), w.cursor()), (1, 5));
    }

    #[tokio::test(start_paused = true)]
    async fn restart_sends_everything_again_from_the_oldest() {
        let mut w = Window::new(4, TIMEOUT);
        for seq in 7..=10 {
            w.sent(seq, 1, Instant::now());
        }
        assert_eq!(w.restart(), 4);
        assert_eq!((w.len(), w.cursor(), w.room()), (0, 0, 4), "the outbox is read from its oldest batch again");
        assert_eq!(w.acked(7), None, "a late ack of the old session finds nothing in flight");
    }
}
