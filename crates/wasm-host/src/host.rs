//! Per-instance host state (the `Store`'s data), the resource limiter, and the host
//! functions `brume.history` and `brume.log`.
//!
//! Host functions are the only way a module reaches the outside world, so each one is
//! bounded: `history` caps how many readings one query returns, `log` is rate-limited,
//! and both refuse out-of-bounds pointers with a typed fault instead of trusting the guest.

use std::sync::Arc;
use std::time::Instant;

use brume_module_abi::{self as abi, HistoryKind, HistoryQuery, HistoryResult};
use wasmtime::{Caller, Extern, Linker, Memory, ResourceLimiter};

/// Name of the linear memory every module must export (Rust's wasm32 targets export it
/// under this name by default).
pub(crate) const MEMORY_EXPORT: &str = "memory";

/// Cap on the elements of a module's tables. Tables hold function references, and a
/// module built by the SDK needs a few hundred at most; the cap exists so that
/// `table.grow` cannot be used to exhaust host memory around the linear-memory cap.
pub(crate) const TABLE_ELEMENTS_CAP: usize = 100_000;

/// Longest log line kept, in bytes; longer lines are truncated.
pub(crate) const MAX_LOG_LINE: usize = 1024;

/// Read access to the agent's local history, for `brume.history`.
///
/// The agent implements it on its SQLite store. Calls run synchronously on the thread
/// that runs the module and count against the call's time budget (not its fuel), so an
/// implementation should answer from an indexed read and never block on the network.
pub trait HistoryProvider: Send + Sync {
    /// Answers a query. The host has already lowered `LastN::n` and `Range::limit` to
    /// [`crate::Limits::max_history_readings`]; an implementation returns at most that
    /// many readings, oldest first, and an empty list (not an error) for an unknown
    /// stream.
    fn query(&self, query: &HistoryQuery) -> HistoryResult;
}

/// A [`HistoryProvider`] with no history: every query returns no readings. For modules
/// run without a store (tests, tools).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoHistory;

impl HistoryProvider for NoHistory {
    fn query(&self, query: &HistoryQuery) -> HistoryResult {
        match query.kind {
            HistoryKind::Aggregate { .. } => {
                HistoryResult::Aggregates(abi::Aggregates { count: 0, min: None, max: None, mean: None })
            }
            _ => HistoryResult::Readings(Vec::new()),
        }
    }
}

/// Counters of one call into a module, reported in [`crate::ProcessOutcome`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallStats {
    /// `brume.history` queries made.
    pub history_queries: u32,
    /// Readings returned by those queries in total.
    pub history_readings: u64,
    /// Log lines emitted.
    pub log_lines: u32,
    /// Log lines dropped by the rate limit.
    pub log_dropped: u32,
}

/// Which resource cap a guest hit, recorded by the limiter so that the error can be
/// classified even if wasmtime wraps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CapHit {
    Memory,
    Table,
}

/// The error the limiter raises; growth past a cap traps instead of returning -1, so
/// the caller gets a typed error rather than a module that misbehaves after a failed
/// `memory.grow`.
#[derive(Debug, thiserror::Error)]
#[error("{what} growth to {desired} past the cap of {limit}")]
pub(crate) struct CapExceeded {
    what: &'static str,
    desired: usize,
    limit: u64,
}

/// The per-store resource limiter.
pub(crate) struct Limiter {
    /// Linear memory cap, bytes.
    pub(crate) memory_bytes: u64,
    /// Set when a cap was hit during the current call.
    pub(crate) hit: Option<CapHit>,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired as u64 > self.memory_bytes {
            self.hit = Some(CapHit::Memory);
            return Err(wasmtime::Error::new(CapExceeded { what: "memory", desired, limit: self.memory_bytes }));
        }
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > TABLE_ELEMENTS_CAP {
            self.hit = Some(CapHit::Table);
            return Err(wasmtime::Error::new(CapExceeded { what: "table", desired, limit: TABLE_ELEMENTS_CAP as u64 }));
        }
        Ok(true)
    }

    // One module, one memory, a few tables: nothing a core module built by the SDK needs
    // more of, and each extra memory would escape the per-memory cap.
    fn instances(&self) -> usize {
        1
    }
    fn memories(&self) -> usize {
        1
    }
    fn tables(&self) -> usize {
        4
    }
}

/// A token bucket: `rate` lines per second with a burst of `rate` lines.
pub(crate) struct LogBucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl LogBucket {
    pub(crate) fn new(rate: u32) -> LogBucket {
        LogBucket { rate: f64::from(rate), tokens: f64::from(rate), last: Instant::now() }
    }

    /// Takes a token if one is available.
    fn take(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.rate);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The data of an instance's `Store`.
pub(crate) struct HostState {
    pub(crate) limiter: Limiter,
    /// Module name, a field of every log event.
    pub(crate) module: Arc<str>,
    pub(crate) history: Arc<dyn HistoryProvider>,
    pub(crate) max_history_readings: u32,
    pub(crate) log_bucket: LogBucket,
    /// Reset before each call.
    pub(crate) stats: CallStats,
}

/// A guest broke the calling convention inside a host function. Raised as the host
/// function's error (which traps the guest) and classified as
/// [`crate::ModuleError::BadMessage`].
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct HostFault(pub(crate) String);

fn fault(msg: String) -> wasmtime::Error {
    wasmtime::Error::new(HostFault(msg))
}

/// Returns `data[ptr..ptr+len]` or a message naming the bad range.
pub(crate) fn guest_slice(data: &[u8], ptr: u32, len: u32) -> Result<&[u8], String> {
    let start = ptr as usize;
    start
        .checked_add(len as usize)
        .and_then(|end| data.get(start..end))
        .ok_or_else(|| format!("buffer {ptr:#x}+{len} is outside the module's memory of {} bytes", data.len()))
}

fn guest_memory(caller: &mut Caller<'_, HostState>, func: &str) -> wasmtime::Result<Memory> {
    match caller.get_export(MEMORY_EXPORT) {
        Some(Extern::Memory(m)) => Ok(m),
        _ => Err(fault(format!("{func}: the module exports no `{MEMORY_EXPORT}`"))),
    }
}

/// Registers the host functions.
pub(crate) fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.func_wrap(abi::imports::MODULE, abi::imports::HISTORY, history)?;
    linker.func_wrap(abi::imports::MODULE, abi::imports::LOG, log)?;
    Ok(())
}

/// `brume.history(ptr, len) -> i64`: decodes a [`HistoryQuery`], caps it, asks the
/// provider, and writes the encoded [`HistoryResult`] into a buffer allocated by the
/// guest's `brume_alloc` (so the guest owns and frees it as any other buffer).
fn history(mut caller: Caller<'_, HostState>, ptr: i32, len: i32) -> wasmtime::Result<i64> {
    const F: &str = "brume.history";
    let memory = guest_memory(&mut caller, F)?;
    let mut query: HistoryQuery = {
        let bytes =
            guest_slice(memory.data(&caller), ptr as u32, len as u32).map_err(|e| fault(format!("{F}: {e}")))?;
        abi::decode(bytes).map_err(|e| fault(format!("{F}: undecodable HistoryQuery: {e}")))?
    };
    let cap = caller.data().max_history_readings;
    match &mut query.kind {
        HistoryKind::LastN { n, .. } => *n = (*n).min(cap),
        HistoryKind::Range { limit, .. } => *limit = (*limit).min(cap),
        HistoryKind::Aggregate { .. } => {}
    }
    let mut result = caller.data().history.query(&query);
    // Enforce the cap on the answer too: a provider bug must not flood the guest.
    if let HistoryResult::Readings(readings) = &mut result {
        let cap = cap as usize;
        if readings.len() > cap {
            match query.kind {
                // The *last* n readings: keep the newest.
                HistoryKind::LastN { .. } => {
                    readings.drain(..readings.len() - cap);
                }
                _ => readings.truncate(cap),
            }
        }
    }
    let returned = match &result {
        HistoryResult::Readings(r) => r.len() as u64,
        _ => 0,
    };
    let stats = &mut caller.data_mut().stats;
    stats.history_queries += 1;
    stats.history_readings += returned;

    let bytes = abi::encode(&result);
    let alloc = match caller.get_export(abi::exports::ALLOC) {
        Some(Extern::Func(f)) => f.typed::<i32, i32>(&caller)?,
        _ => {
            return Err(fault(format!("{F}: the module exports no `{}`", abi::exports::ALLOC)));
        }
    };
    let len = u32::try_from(bytes.len()).map_err(|_| fault(format!("{F}: answer too large")))?;
    let out = alloc.call(&mut caller, len as i32)? as u32;
    memory
        .write(&mut caller, out as usize, &bytes)
        .map_err(|_| fault(format!("{F}: brume_alloc({len}) returned {out:#x}, outside the module's memory")))?;
    Ok(abi::pack(out, len) as i64)
}

/// `brume.log(level, ptr, len)`: emits a line through `tracing` (target `brume_module`,
/// field `module`), subject to the instance's token bucket.
fn log(mut caller: Caller<'_, HostState>, level: i32, ptr: i32, len: i32) -> wasmtime::Result<()> {
    // Rate-limit first: a dropped line costs no copy.
    if !caller.data_mut().log_bucket.take() {
        caller.data_mut().stats.log_dropped += 1;
        return Ok(());
    }
    let memory = guest_memory(&mut caller, "brume.log")?;
    let line = {
        let bytes =
            guest_slice(memory.data(&caller), ptr as u32, len as u32).map_err(|e| fault(format!("brume.log: {e}")))?;
        String::from_utf8_lossy(&bytes[..bytes.len().min(MAX_LOG_LINE)]).into_owned()
    };
    let state = caller.data_mut();
    state.stats.log_lines += 1;
    let module = &*state.module;
    match level {
        i32::MIN..=abi::level::ERROR => tracing::error!(target: "brume_module", module, "{line}"),
        abi::level::WARN => tracing::warn!(target: "brume_module", module, "{line}"),
        abi::level::INFO => tracing::info!(target: "brume_module", module, "{line}"),
        _ => tracing::debug!(target: "brume_module", module, "{line}"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_slice_bounds() {
        let data = [0u8; 8];
        assert_eq!(guest_slice(&data, 2, 6).unwrap().len(), 6);
        assert!(guest_slice(&data, 2, 7).is_err());
        assert!(guest_slice(&data, u32::MAX, u32::MAX).is_err());
    }

    #[test]
    fn bucket_bursts_then_drops() {
        let mut b = LogBucket::new(3);
        assert!(b.take() && b.take() && b.take());
        assert!(!b.take());
        assert!(!LogBucket::new(0).take());
    }
}
