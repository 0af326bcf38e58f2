//! Wall-clock time for the hub: ingest (timestamp checks, presence), the HTTP API (live
//! tail, online status) and the MQTT side (subscription time) all read it here.

use std::time::{SystemTime, UNIX_EPOCH};

/// Wall-clock time, ms since the Unix epoch (0 if the clock is before 1970).
pub(crate) fn now_ms() -> i64 {
    now_ns() / 1_000_000
}

/// Wall-clock time, ns since the Unix epoch (0 if the clock is before 1970).
pub(crate) fn now_ns() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)).unwrap_or(0)
}
