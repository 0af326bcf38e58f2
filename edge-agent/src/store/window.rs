//! When the writer commits: the commit window and the publishers that close it early.
//!
//! Every commit costs the flash a few pages of WAL whatever it holds, so at ordinary
//! rates the number of commits, not the number of readings, is what wears an SD card.
//! The writer therefore gathers commands for up to `store.commit_window` after the first
//! one before committing (see `writer_loop`); a reading is still acknowledged only after
//! the commit that holds it.
//!
//! A pure time window would throttle sensors that wait for their acknowledgements: one
//! with 100 QoS 1 PUBLISHes in flight stops sending until its PUBACKs arrive, so it would
//! get 100 readings per window. So each connection is watched ([`Publisher`]):
//!
//! * Whether it waits for acknowledgements: when readings are answered while it is
//!   silent, the time to its next PUBLISH is averaged; under [`ACK_DRIVEN`] over
//!   [`REACT_SAMPLES`] samples, it is a sensor at its in-flight limit. A sensor that sends
//!   on its own clock (steady, or a gateway's periodic bursts) is not, and never closes
//!   the window early: for it an early commit would only cost the flash a commit.
//! * When such a sensor has sent what it may ([`Publisher::quiet_after`]): as soon as
//!   nothing more can be read if it sends in bursts or has half its in-flight limit
//!   pending (the most seen pending while it was quiet: half, so a fast sensor is answered
//!   before it stalls); otherwise after a silence of twice its usual gap.
//!
//! The window closes early when every connection with readings pending is quiet: the
//! connection that makes it so calls its `wake` (the writer's alarm, `writer.rs`), since
//! the writer sleeps through the window without looking at its queue.
//!
//! Other sources do not hold the window open: HTTP writes and MQTT session changes ride
//! the next commit (a closed-loop HTTP client gets one request per window: send many
//! readings per request), a module that is behind on its input commits at once
//! (`urgent`), one that keeps up rides the window.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Shortest silence taken as "waiting for acknowledgements" (tokio's timer resolution).
pub const MIN_QUIET: Duration = Duration::from_millis(1);

/// A connection whose PUBLISHes come closer together than this on average is sending in
/// bursts (a closed-loop sensor refilling its in-flight window): the moment it has
/// nothing more to read, it is waiting, without a timer.
pub const BURST_GAP: Duration = Duration::from_micros(50);

/// Counts of MQTT connections with readings awaiting their commit, shared by every
/// [`Publisher`] and the writer.
#[derive(Debug, Default)]
pub struct Gate {
    /// Connections with readings pending that are still sending (or may be).
    busy: AtomicUsize,
    /// Connections with readings pending that have gone quiet.
    quiet: AtomicUsize,
}

impl Gate {
    /// True when some connection waits for a commit and none is still sending: the
    /// window would only delay them.
    pub fn all_quiet(&self) -> bool {
        self.busy.load(Ordering::Acquire) == 0 && self.quiet.load(Ordering::Acquire) > 0
    }
}

/// One MQTT connection's load, as seen by the commit window. The reader half calls
/// [`submitted`](Self::submitted) and [`quiet`](Self::quiet)/[`active`](Self::active), the
/// writer half [`answered`](Self::answered); `wake` is called when the connection's quiet
/// leaves no connection sending, so the writer can commit at once.
pub struct Publisher {
    /// Shared with the writer thread and every other connection: how many connections
    /// have readings pending and how many of those are waiting for their verdicts.
    gate: Arc<Gate>,
    /// The commit window: how long this connection may go without news before it counts
    /// as quiet.
    window: Duration,
    /// Rings the writer's alarm.
    wake: Box<dyn Fn() + Send + Sync>,
    /// This connection's load; locked briefly by its reader and writer halves.
    state: Mutex<Load>,
}

#[derive(Debug, Default)]
struct Load {
    pending: usize,
    quiet: bool,
    last_publish: Option<Instant>,
    /// Moving average of the gap between PUBLISHes, seconds.
    gap: f64,
    /// Most readings ever pending while the connection was quiet: the sensor's in-flight
    /// limit, once seen. Reaching it again means quiet at once, without the timer.
    limit: usize,
    /// When readings were answered while the connection was silent, until the next
    /// PUBLISH.
    answered_silent: Option<Instant>,
    /// Moving average of the time from such an answer to the next PUBLISH, seconds; `None`
    /// until seen. A sensor that waits for its acknowledgements (in-flight limit reached)
    /// sends within a round trip; one that sends on its own clock does not.
    react: Option<f64>,
    /// How many such samples `react` averages (capped): one fast answer can be chance.
    react_samples: u8,
}

/// Samples of `react` needed before a connection counts as waiting for acknowledgements.
pub const REACT_SAMPLES: u8 = 4;

/// A connection whose next PUBLISH follows its acknowledgements within this (on
/// average) is driven by them: it is worth committing early for it.
pub const ACK_DRIVEN: Duration = Duration::from_millis(2);

impl Load {
    fn counted(&self) -> (bool, bool) {
        (self.pending > 0 && !self.quiet, self.pending > 0 && self.quiet)
    }
}

impl Publisher {
    /// A connection's load on the writer's `gate`; `window` is `store.commit_window`.
    pub fn new(gate: Arc<Gate>, window: Duration, wake: Box<dyn Fn() + Send + Sync>) -> Publisher {
        Publisher { gate, window, wake, state: Mutex::new(Load::default()) }
    }

    fn update(&self, f: impl FnOnce(&mut Load)) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (busy0, quiet0) = s.counted();
        f(&mut s);
        let (busy1, quiet1) = s.counted();
        drop(s);
        let adjust = |c: &AtomicUsize, before: bool, after: bool| match (before, after) {
            (false, true) => {
                c.fetch_add(1, Ordering::AcqRel);
            }
            (true, false) => {
                c.fetch_sub(1, Ordering::AcqRel);
            }
            _ => {}
        };
        // Quiet is counted before busy is released, so the writer never sees "nobody
        // busy, nobody quiet" in between and nothing is missed.
        adjust(&self.gate.quiet, quiet0, quiet1);
        adjust(&self.gate.busy, busy0, busy1);
        if (busy0 != busy1 || quiet0 != quiet1) && self.gate.all_quiet() {
            (self.wake)();
        }
    }

    /// One PUBLISH was read and submitted to the store.
    pub fn submitted(&self, now: Instant) {
        self.update(|s| {
            if let Some(last) = s.last_publish {
                let gap = now.saturating_duration_since(last).as_secs_f64();
                s.gap += (gap - s.gap) / 8.0;
            }
            s.last_publish = Some(now);
            if let Some(t) = s.answered_silent.take() {
                let r = now.saturating_duration_since(t).as_secs_f64();
                s.react = Some(s.react.map_or(r, |a| a + (r - a) / 4.0));
                s.react_samples = s.react_samples.saturating_add(1).min(REACT_SAMPLES);
            }
            s.pending += 1;
            s.quiet = false;
        });
    }

    /// The verdict of one submitted PUBLISH arrived (its commit is over).
    pub fn answered(&self, now: Instant) {
        self.update(|s| {
            // Quiet (as judged here) or silent for a while: the next PUBLISH tells whether
            // it waited for this answer. Samples taken when quiet keep a sensor wrongly
            // judged as waiting from staying so.
            let silent = s.quiet || s.last_publish.is_none_or(|l| now.saturating_duration_since(l) >= MIN_QUIET);
            s.pending = s.pending.saturating_sub(1);
            if s.pending == 0 {
                s.quiet = false;
            }
            if silent && s.answered_silent.is_none() {
                s.answered_silent = Some(now);
            }
        });
    }

    /// How long the connection may stay silent, with readings pending, before it is taken
    /// as waiting for its acknowledgements: zero (as soon as nothing more can be read)
    /// when it sends in bursts or has half as many pending as it ever had while quiet (its
    /// in-flight limit); `None` for a sensor not seen waiting for acknowledgements, or if nothing is pending or the silence
    /// could not end before the window does anyway.
    pub fn quiet_after(&self) -> Option<Duration> {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        // Only a sensor that waits for its acknowledgements gains from an early commit;
        // for one that sends on its own clock, it would only cost the flash a commit.
        let ack_driven = s.react_samples >= REACT_SAMPLES && s.react.is_some_and(|r| r < ACK_DRIVEN.as_secs_f64());
        if s.pending == 0 || s.quiet || !ack_driven {
            return None;
        }
        // Half its in-flight limit: a sensor that sends faster than one window's worth of
        // its limit must be answered before it reaches the limit, or it stalls.
        if (s.limit > 0 && s.pending * 2 >= s.limit) || s.gap < BURST_GAP.as_secs_f64() {
            return Some(Duration::ZERO);
        }
        let after = Duration::from_secs_f64(2.0 * s.gap).max(MIN_QUIET);
        (after < self.window).then_some(after)
    }

    /// The connection stayed silent for [`quiet_after`](Self::quiet_after), or cannot be
    /// read further (its queue of pending acknowledgements is full).
    pub fn quiet(&self) {
        self.update(|s| {
            if s.pending > 0 {
                s.quiet = true;
                s.limit = s.limit.max(s.pending);
            }
        });
    }

    /// Bytes arrived again after [`quiet`](Self::quiet).
    pub fn active(&self) {
        self.update(|s| s.quiet = false);
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.update(|s| s.pending = 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    fn publisher(gate: &Arc<Gate>, wakes: &Arc<AtomicU32>) -> Publisher {
        let w = wakes.clone();
        Publisher::new(
            gate.clone(),
            Duration::from_millis(50),
            Box::new(move || {
                w.fetch_add(1, Ordering::Relaxed);
            }),
        )
    }

    #[test]
    fn the_window_closes_when_every_pending_connection_is_quiet() {
        let (gate, wakes) = (Arc::new(Gate::default()), Arc::new(AtomicU32::new(0)));
        let (a, b) = (publisher(&gate, &wakes), publisher(&gate, &wakes));
        let t = Instant::now();
        a.submitted(t);
        b.submitted(t);
        assert!(!gate.all_quiet());
        a.quiet();
        assert!(!gate.all_quiet(), "b is still sending");
        assert_eq!(wakes.load(Ordering::Relaxed), 0);
        b.quiet();
        assert!(gate.all_quiet());
        assert_eq!(wakes.load(Ordering::Relaxed), 1, "the writer is woken once");
        // b's commit is done; a keeps waiting and is still the only one pending.
        b.answered(t);
        assert!(gate.all_quiet());
        a.active();
        assert!(!gate.all_quiet(), "a sends again");
        a.answered(t);
        assert!(!gate.all_quiet(), "nothing pending: nobody to commit early for");
        drop(a);
        drop(b);
        assert_eq!((gate.busy.load(Ordering::Relaxed), gate.quiet.load(Ordering::Relaxed)), (0, 0));
    }

    /// Drives `p` through `rounds` rounds of `burst` PUBLISHes `gap` apart, answered
    /// `commit` after the last, the next round starting `react` after the answers.
    fn rounds(
        p: &Publisher,
        t: &mut Instant,
        rounds: usize,
        burst: usize,
        gap: Duration,
        commit: Duration,
        react: Duration,
    ) {
        for _ in 0..rounds {
            for _ in 0..burst {
                p.submitted(*t);
                *t += gap;
            }
            *t += commit;
            for _ in 0..burst {
                p.answered(*t);
            }
            *t += react;
        }
    }

    #[test]
    fn only_a_sensor_that_waits_for_its_acknowledgements_closes_the_window_early() {
        let (gate, wakes) = (Arc::new(Gate::default()), Arc::new(AtomicU32::new(0)));
        let ms = Duration::from_millis;
        let us = Duration::from_micros;
        let mut t = Instant::now();
        // Closed loop, 100 in flight: sends its next burst 0.2 ms after the PUBACKs, so
        // once its 100 are read it is waiting: quiet at once.
        let p = publisher(&gate, &wakes);
        assert_eq!(p.quiet_after(), None, "nothing pending");
        rounds(&p, &mut t, 5, 100, us(2), ms(1), us(200));
        for _ in 0..100 {
            p.submitted(t);
        }
        assert_eq!(p.quiet_after(), Some(Duration::ZERO));
        // Closed loop, 1 in flight: a gap of a round trip, so the timer, until it was seen
        // quiet with 1 pending; then 1 pending is its limit: quiet at once.
        let one = publisher(&gate, &wakes);
        rounds(&one, &mut t, 20, 1, us(0), ms(1), us(200));
        one.submitted(t);
        let after = one.quiet_after().unwrap();
        assert!(after > ms(2) && after < ms(3), "{after:?}");
        one.quiet();
        one.answered(t);
        t += us(200);
        one.submitted(t);
        assert_eq!(one.quiet_after(), Some(Duration::ZERO));
        // A gateway sending 10 readings every 10 ms on its own clock, and a sensor sending
        // one every 10 ms: answered or not, they do not wait for acknowledgements, and an
        // early commit would only cost a commit.
        let periodic = publisher(&gate, &wakes);
        rounds(&periodic, &mut t, 20, 10, us(2), ms(1), ms(9));
        periodic.submitted(t);
        assert_eq!(periodic.quiet_after(), None);
        let steady = publisher(&gate, &wakes);
        rounds(&steady, &mut t, 20, 1, us(0), ms(1), ms(9));
        steady.submitted(t);
        assert_eq!(steady.quiet_after(), None);
        // A fast steady sensor (10,000/s) with 100 in flight stalls at its limit inside
        // one window; answered, it resumes at once. Once seen quiet at 100, it is answered
        // from 50 pending on, before it stalls again.
        let fast = publisher(&gate, &wakes);
        rounds(&fast, &mut t, 5, 100, us(100), ms(40), us(100));
        for _ in 0..100 {
            fast.submitted(t);
            t += us(100);
        }
        assert_eq!(fast.quiet_after(), Some(MIN_QUIET), "at its limit, silent: quiet after the timer");
        fast.quiet();
        t += ms(2);
        for _ in 0..100 {
            fast.answered(t);
        }
        t += us(100);
        for _ in 0..49 {
            fast.submitted(t);
            t += us(100);
        }
        assert_eq!(fast.quiet_after(), Some(MIN_QUIET));
        fast.submitted(t);
        assert_eq!(fast.quiet_after(), Some(Duration::ZERO), "half its limit");
        // Never answered between PUBLISHes (a steady stream inside one window): unknown,
        // so it keeps the window.
        let stream = publisher(&gate, &wakes);
        for _ in 0..100 {
            stream.submitted(t);
            t += ms(1);
        }
        assert_eq!(stream.quiet_after(), None);
    }
}
