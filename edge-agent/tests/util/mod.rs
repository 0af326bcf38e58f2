//! Helpers for the integration tests: an in-process agent ([`agent::Agent`]) and a raw
//! MQTT client ([`mqtt::RawConn`]).
//!
//! Time is real, not paused: the agent commits on its own OS thread (the store writer)
//! and reads on `spawn_blocking` threads, which a paused tokio clock cannot see, so
//! auto-advance would fire the agent's idle timeouts and our deadlines while a commit
//! is merely in progress. Instead nothing sleeps for a fixed time: tests await the
//! agent's answers, and "eventually" conditions are polled up to a bounded deadline.

#![allow(dead_code)] // Not every test uses every helper.

pub mod agent;
pub mod mqtt;

use std::future::Future;
use std::time::Duration;

/// Upper bound for any single wait (a response, a close, an eventual condition). Generous
/// because commits fsync and the test machine may be busy; a passing test never waits it.
pub const STEP: Duration = Duration::from_secs(20);

/// Polls `probe` until it returns `Ok`, at most [`STEP`]; otherwise panics naming `what`
/// and the last `Err` (what was observed instead).
pub async fn eventually<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let seen = match probe().await {
            Ok(v) => return v,
            Err(seen) => seen,
        };
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {STEP:?} waiting for {what}; last seen: {seen}"
        );
        // A poll interval, not a wait for the outcome: the deadline above bounds the test.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
