//! Per-instance resource limits and how they are resolved from the manifest and config.

use std::time::Duration;

use brume_module_abi::Budgets;

/// The resource limits of one module instance. Every call into the instance runs under
/// them; exceeding one fails the call with a typed [`crate::ModuleError`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Cap on the instance's linear memory, in bytes (initial size included). Growth past
    /// it traps with [`crate::ModuleError::MemoryLimit`].
    pub memory_bytes: u64,
    /// Fuel (roughly one unit per wasm instruction) per call. Deterministic: the same batch
    /// always costs the same fuel, whatever the machine's load.
    pub fuel_per_batch: u64,
    /// Wall-clock budget per call, enforced with epoch interruption at the engine's tick
    /// granularity. Catches what fuel cannot: time spent in host calls (history queries).
    pub time_per_batch: Duration,
    /// Most output readings per batch.
    pub max_output_readings: u32,
    /// Most bytes of an encoded output (and of saved state), checked on the length the
    /// module returns before the host reads or decodes anything.
    pub max_output_bytes: u64,
    /// Most readings one `brume.history` query may return: `LastN::n` and
    /// `Range::limit` are lowered to it.
    pub max_history_readings: u32,
    /// Log lines per second a module may emit through `brume.log` (token bucket with a
    /// burst of one second's worth); the rest are dropped and counted.
    pub log_lines_per_s: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_bytes: 16 << 20,
            fuel_per_batch: 50_000_000,
            time_per_batch: Duration::from_secs(1),
            max_output_readings: 10_000,
            max_output_bytes: 4 << 20,
            max_history_readings: 10_000,
            log_lines_per_s: 10,
        }
    }
}

/// Limits set by the agent's config for one module. `None` keeps what the manifest asks
/// for (or the default).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LimitOverrides {
    /// Overrides [`Limits::memory_bytes`].
    pub memory_bytes: Option<u64>,
    /// Overrides [`Limits::fuel_per_batch`].
    pub fuel_per_batch: Option<u64>,
    /// Overrides [`Limits::time_per_batch`].
    pub time_per_batch: Option<Duration>,
    /// Overrides [`Limits::max_output_readings`].
    pub max_output_readings: Option<u32>,
    /// Overrides [`Limits::max_output_bytes`].
    pub max_output_bytes: Option<u64>,
    /// Overrides [`Limits::max_history_readings`].
    pub max_history_readings: Option<u32>,
    /// Overrides [`Limits::log_lines_per_s`].
    pub log_lines_per_s: Option<u32>,
}

impl Limits {
    /// Resolves the limits of a module: for each limit, the config override if set, else
    /// the manifest's budget if it declares one, else [`Limits::default`].
    ///
    /// The operator has the last word: a manifest may ask for more than the default (a
    /// module that needs 64 MiB says so), and the agent's config may lower or raise it.
    /// The manifest only declares memory, fuel and output readings; the other limits come
    /// from the config or the defaults.
    pub fn from_manifest(budgets: &Budgets, overrides: &LimitOverrides) -> Limits {
        let d = Limits::default();
        Limits {
            memory_bytes: overrides.memory_bytes.or(budgets.memory_bytes).unwrap_or(d.memory_bytes),
            fuel_per_batch: overrides.fuel_per_batch.or(budgets.fuel_per_batch).unwrap_or(d.fuel_per_batch),
            time_per_batch: overrides.time_per_batch.unwrap_or(d.time_per_batch),
            max_output_readings: overrides
                .max_output_readings
                .or(budgets.max_output_readings)
                .unwrap_or(d.max_output_readings),
            max_output_bytes: overrides.max_output_bytes.unwrap_or(d.max_output_bytes),
            max_history_readings: overrides.max_history_readings.unwrap_or(d.max_history_readings),
            log_lines_per_s: overrides.log_lines_per_s.unwrap_or(d.log_lines_per_s),
        }
    }
}
