//! The process-wide engine, its epoch ticker and the linker with the host functions.

use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use wasmtime::{Config, Engine, Linker};

use crate::host::{self, HostState};

/// Engine settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineConfig {
    /// Period of the epoch ticker. Time budgets are enforced at this granularity: a call
    /// given `time_per_batch` is stopped between `time_per_batch` and one tick later.
    /// Shorter ticks are more precise and cost a wake-up per tick.
    pub epoch_tick: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig { epoch_tick: Duration::from_millis(10) }
    }
}

/// What the engine handle, its modules' instances and the ticker share.
pub(crate) struct EngineInner {
    pub(crate) engine: Engine,
    /// Built once: the host functions are the same for every instance; per-instance data
    /// lives in the `Store`.
    pub(crate) linker: Linker<HostState>,
    pub(crate) epoch_tick: Duration,
}

/// The WASM engine: compiled code, configuration and the epoch ticker. Create **one per
/// process** and load every module through it; modules and instances of one engine share
/// its compiled-code cache and its ticker.
///
/// Dropping it stops the ticker once the last instance created through it is dropped too
/// (instances keep the engine alive so that their time budgets keep being enforced).
pub struct WasmEngine {
    pub(crate) inner: Arc<EngineInner>,
}

impl std::fmt::Debug for WasmEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasmEngine").field("epoch_tick", &self.inner.epoch_tick).finish_non_exhaustive()
    }
}

/// The engine could not be created (an unsupported platform or configuration).
#[derive(Debug, thiserror::Error)]
#[error("cannot create the WASM engine: {0}")]
pub struct HostError(pub(crate) String);

impl WasmEngine {
    /// Creates the engine with fuel metering and epoch interruption enabled, and starts
    /// the epoch ticker thread (`brume-epoch-ticker`).
    pub fn new(cfg: EngineConfig) -> Result<WasmEngine, HostError> {
        if cfg.epoch_tick.is_zero() {
            return Err(HostError("epoch_tick must be positive".into()));
        }
        let engine = Engine::new(&base_config()).map_err(|e| HostError(format!("{e:#}")))?;
        let mut linker = Linker::new(&engine);
        host::add_to_linker(&mut linker).map_err(|e| HostError(format!("{e:#}")))?;
        let inner = Arc::new(EngineInner { engine, linker, epoch_tick: cfg.epoch_tick });
        spawn_ticker(Arc::downgrade(&inner), cfg.epoch_tick)
            .map_err(|e| HostError(format!("cannot start the epoch ticker thread: {e}")))?;
        Ok(WasmEngine { inner })
    }

    /// The configured epoch tick.
    pub fn epoch_tick(&self) -> Duration {
        self.inner.epoch_tick
    }

    /// Whether this build can compile modules ([`WasmEngine::load`]): true with the
    /// `jit` feature. A runtime-only build loads only modules precompiled for its
    /// [`crate::Target`] ([`WasmEngine::load_precompiled`]).
    pub const fn can_compile() -> bool {
        cfg!(feature = "jit")
    }
}

/// The wasmtime configuration of every Brume engine: the agent's, and the hub's when it
/// precompiles for a device (`crate::Precompiler`). Precompiled code loads only into an
/// engine configured exactly like the one that compiled it, so there is one place.
pub(crate) fn base_config() -> Config {
    let mut config = Config::new();
    // Both are needed: fuel makes the CPU budget deterministic (same batch, same cost,
    // whatever else runs on the device), epochs bound wall-clock time including time
    // spent in host calls. Their cost is measured in dependencies.md §3.
    config.consume_fuel(true);
    config.epoch_interruption(true);
    config
}

/// Starts the thread that advances the engine's epoch every `tick`. It holds only a weak
/// reference so that it never keeps the engine alive, and exits at the first tick after
/// the last strong reference is gone.
pub(crate) fn spawn_ticker(weak: Weak<EngineInner>, tick: Duration) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new().name("brume-epoch-ticker".into()).spawn(move || {
        loop {
            std::thread::sleep(tick);
            match weak.upgrade() {
                Some(inner) => inner.engine.increment_epoch(),
                None => return,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ticker must not outlive the engine: it would leak a thread per engine.
    #[test]
    fn ticker_exits_when_engine_dropped() {
        let engine = WasmEngine::new(EngineConfig { epoch_tick: Duration::from_millis(1) }).unwrap();
        let handle = spawn_ticker(Arc::downgrade(&engine.inner), Duration::from_millis(1)).unwrap();
        drop(engine);
        handle.join().unwrap();
    }
}
