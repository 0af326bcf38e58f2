//! When the writer commits: the commit window and the publishers that close it early.
//!
//! Every commit costs the flash a few pages of WAL whatever it holds, so at ordinary
//! rates the number of commits, not the number of readings, is what wears an SD card.
//! The writer therefore gathers commands for up to `store.commit_window` after the first
//! one before committing (see `writer_loop`); a reading is still acknowledged only after
//! the commit that holds it.
//!
//! A pure time window would throttle closed-loop publishers: a sensor with 100 QoS 1
//! PUBLISHes in flight stops sending until its PUBACKs arrive, so it would get 100
//! readings per window. Waiting is pointless once no publisher can add anything, so the
//! window closes early when every MQTT connection with readings awaiting their commit has
//! gone quiet ([`Publisher::quiet_after`]: silent for longer than twice its usual gap
//! between PUBLISHes, at least [`MIN_QUIET`]). A sensor that streams at a steady rate keeps
//! the window open; one that has sent all it may and waits makes it close.
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
    gate: Arc<Gate>,
    window: Duration,
    wake: Box<dyn Fn() + Send + Sync>,
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
}

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
            s.pending += 1;
            s.quiet = false;
        });
    }

    /// The verdict of one submitted PUBLISH arrived (its commit is over).
    pub fn answered(&self) {
        self.update(|s| {
            s.pending = s.pending.saturating_sub(1);
            if s.pending == 0 {
                s.quiet = false;
            }
        });
    }

    /// How long the connection may stay silent, with readings pending, before it is taken
    /// as waiting for its acknowledgements: zero once as many are pending as it ever had
    /// while quiet (its in-flight limit); `None` if nothing is pending or the silence
    /// could not end before the window does anyway.
    pub fn quiet_after(&self) -> Option<Duration> {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.pending == 0 || s.quiet {
            return None;
        }
        if s.limit > 0 && s.pending >= s.limit {
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
        Publisher::new(gate.clone(), Duration::from_millis(50), Box::new(move || {
            w.fetch_add(1, Ordering::Relaxed);
        }))
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
        b.answered();
        assert!(gate.all_quiet());
        a.active();
        assert!(!gate.all_quiet(), "a sends again");
        a.answered();
        assert!(!gate.all_quiet(), "nothing pending: nobody to commit early for");
        drop(a);
        drop(b);
        assert_eq!((gate.busy.load(Ordering::Relaxed), gate.quiet.load(Ordering::Relaxed)), (0, 0));
    }

    #[test]
    fn a_steady_sender_is_given_time_a_burst_sender_is_not() {
        let (gate, wakes) = (Arc::new(Gate::default()), Arc::new(AtomicU32::new(0)));
        let p = publisher(&gate, &wakes);
        assert_eq!(p.quiet_after(), None, "nothing pending");
        // A closed-loop burst: 100 PUBLISHes back to back, then a pause for the commit.
        let mut t = Instant::now();
        for round in 0..5 {
            for _ in 0..100 {
                p.submitted(t);
            }
            if round < 4 {
                for _ in 0..100 {
                    p.answered();
                }
                t += Duration::from_millis(3);
            }
        }
        assert_eq!(p.quiet_after(), Some(MIN_QUIET));
        // Once it was seen quiet with 100 pending, 100 pending is its limit: quiet at once.
        p.quiet();
        for _ in 0..100 {
            p.answered();
        }
        for _ in 0..99 {
            p.submitted(t);
        }
        assert_eq!(p.quiet_after(), Some(MIN_QUIET), "below its limit it may still send");
        p.submitted(t);
        assert_eq!(p.quiet_after(), Some(Duration::ZERO));
        // A steady 100 readings/s: gaps of 10 ms, so 20 ms of silence before "quiet".
        let q = publisher(&gate, &wakes);
        let mut t = Instant::now();
        for _ in 0..100 {
            q.submitted(t);
            q.answered();
            t += Duration::from_millis(10);
        }
        q.submitted(t);
        let after = q.quiet_after().unwrap();
        assert!(after > Duration::from_millis(15) && after < Duration::from_millis(25), "{after:?}");
        // A sensor at 10 readings/s cannot fall quiet before the 50 ms window ends.
        let r = publisher(&gate, &wakes);
        let mut t = Instant::now();
        for _ in 0..100 {
            r.submitted(t);
            r.answered();
            t += Duration::from_millis(100);
        }
        r.submitted(t);
        assert_eq!(r.quiet_after(), None);
    }
}
