//! A running module instance: one `Store`, its limits, and the calls of the ABI.

use std::sync::Arc;
use std::time::{Duration, Instant};

use brume_module_abi::{self as abi, ABI_VERSION, CallResult, InitRequest, Input, Manifest, Output};
use serde::de::DeserializeOwned;
use wasmtime::{Memory, Store, Trap, TypedFunc};

use crate::engine::{EngineInner, WasmEngine};
use crate::error::{ModuleError, OutputCap};
use crate::host::{self, CallStats, CapHit, HistoryProvider, HostFault, HostState, Limiter, LogBucket};
use crate::limits::Limits;
use crate::module::LoadedModule;

/// What one processed batch produced and cost.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessOutcome {
    /// The module's output: readings on declared streams, and metrics.
    pub output: Output,
    /// Fuel the call consumed (copy-in, `brume_process`, nested `brume_alloc` calls).
    pub fuel_used: u64,
    /// Wall time of the call, copy-in to decoded output.
    pub elapsed: Duration,
    /// History queries and log lines of the call.
    pub stats: CallStats,
}

/// One instance of a module, with its own `Store` (memory, globals, fuel, limits).
///
/// Not thread-safe to share, but `Send`: run it on one worker at a time. After a call
/// fails with an error for which [`ModuleError::poisons`] is true (trap, timeout,
/// out-of-fuel, memory limit, ABI violation) the instance is **poisoned**: every further
/// call returns [`ModuleError::Poisoned`]. The caller drops it and calls
/// [`LoadedModule::instantiate`] again (restoring saved state with
/// [`ModuleInstance::load_state`] if it has any); instantiation is cheap (tens of µs).
pub struct ModuleInstance {
    store: Store<HostState>,
    memory: Memory,
    alloc: TypedFunc<i32, i32>,
    process: TypedFunc<(i32, i32), i64>,
    save_state: TypedFunc<(), i64>,
    load_state: TypedFunc<(i32, i32), i64>,
    manifest: Arc<Manifest>,
    limits: Limits,
    /// Epoch ticks per call, from `limits.time_per_batch` and the engine's tick.
    deadline_ticks: u64,
    poisoned: bool,
    /// Keeps the engine, hence its epoch ticker, alive while the instance exists:
    /// without ticks, time budgets would silently stop being enforced.
    _engine: Arc<EngineInner>,
}

impl std::fmt::Debug for ModuleInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModuleInstance")
            .field("module", &self.manifest.name)
            .field("limits", &self.limits)
            .field("poisoned", &self.poisoned)
            .finish_non_exhaustive()
    }
}

/// Turns a wasmtime error into a [`ModuleError`], using what the store recorded.
fn classify(err: wasmtime::Error, state: &HostState, limits: &Limits) -> ModuleError {
    match state.limiter.hit {
        Some(CapHit::Memory) => {
            return ModuleError::MemoryLimit { limit: limits.memory_bytes };
        }
        Some(CapHit::Table) => {
            return ModuleError::Trap {
                message: format!("table growth past the cap of {} elements: {err:#}", host::TABLE_ELEMENTS_CAP),
            };
        }
        None => {}
    }
    if let Some(f) = err.downcast_ref::<HostFault>() {
        return ModuleError::BadMessage(f.0.clone());
    }
    match err.downcast_ref::<Trap>() {
        Some(Trap::OutOfFuel) => ModuleError::OutOfFuel { budget: limits.fuel_per_batch },
        Some(Trap::Interrupt) => ModuleError::Timeout { budget: limits.time_per_batch },
        _ => ModuleError::Trap { message: format!("{err:#}") },
    }
}

impl LoadedModule {
    /// Creates an instance with its own store and limits, checks the module's
    /// `brume_abi_version`, and calls `brume_init` with `config_json` (the module's config
    /// block, `{}` if none). Instantiation and init run under the same fuel and time
    /// budget as a batch.
    ///
    /// # Panics
    ///
    /// If `engine` is not the engine that loaded this module.
    pub fn instantiate(
        &self,
        engine: &WasmEngine,
        limits: Limits,
        history: Arc<dyn HistoryProvider>,
        config_json: &str,
    ) -> Result<ModuleInstance, ModuleError> {
        let inner = &engine.inner;
        assert!(
            wasmtime::Engine::same(&inner.engine, self.module.engine()),
            "LoadedModule::instantiate: the module was loaded by another WasmEngine"
        );
        let tick = inner.epoch_tick.as_nanos().max(1);
        // Round up, plus one: the current tick may end right after the call starts.
        let deadline_ticks =
            u64::try_from(limits.time_per_batch.as_nanos().div_ceil(tick)).unwrap_or(u64::MAX).saturating_add(1);
        let state = HostState {
            limiter: Limiter { memory_bytes: limits.memory_bytes, hit: None },
            module: Arc::from(self.manifest.name.as_str()),
            history,
            max_history_readings: limits.max_history_readings,
            log_bucket: LogBucket::new(limits.log_lines_per_s),
            stats: CallStats::default(),
        };
        let mut store = Store::new(&inner.engine, state);
        store.limiter(|s| &mut s.limiter);
        store.set_fuel(limits.fuel_per_batch).expect("fuel is enabled on the engine");
        store.set_epoch_deadline(deadline_ticks);

        let instance = match inner.linker.instantiate(&mut store, &self.module) {
            Ok(i) => i,
            Err(e) => return Err(classify(e, store.data(), &limits)),
        };
        // `load` checked every export's presence and type, so these cannot fail.
        let func = |store: &mut Store<HostState>, name: &str| {
            instance.get_func(&mut *store, name).unwrap_or_else(|| panic!("export {name} checked at load"))
        };
        let abi_version =
            func(&mut store, abi::exports::ABI_VERSION).typed::<(), i32>(&store).expect("checked at load");
        let alloc = func(&mut store, abi::exports::ALLOC).typed(&store).expect("checked at load");
        let init = func(&mut store, abi::exports::INIT).typed::<(i32, i32), i64>(&store).expect("checked at load");
        let process = func(&mut store, abi::exports::PROCESS).typed(&store).expect("checked at load");
        let save_state = func(&mut store, abi::exports::SAVE_STATE).typed(&store).expect("checked at load");
        let load_state = func(&mut store, abi::exports::LOAD_STATE).typed(&store).expect("checked at load");
        let memory = instance.get_memory(&mut store, host::MEMORY_EXPORT).expect("checked at load");

        let mut inst = ModuleInstance {
            store,
            memory,
            alloc,
            process,
            save_state,
            load_state,
            manifest: self.manifest.clone(),
            limits,
            deadline_ticks,
            poisoned: false,
            _engine: inner.clone(),
        };
        let version = inst.store_call(|s| abi_version.call(s, ()))? as u32;
        if version != ABI_VERSION {
            return Err(ModuleError::AbiMismatch { module: version, host: ABI_VERSION });
        }
        let req = abi::encode(&InitRequest { config_json: config_json.to_string() });
        let packed = inst.call_with_input(init, &req)?;
        let () = inst.read_result(packed)?;
        Ok(inst)
    }
}

impl ModuleInstance {
    /// Processes one batch: copies `input` into the guest, calls `brume_process` under a
    /// fresh fuel and time budget, and checks the output against the caps and the
    /// manifest's output streams.
    pub fn process(&mut self, input: &Input) -> Result<ProcessOutcome, ModuleError> {
        let started = Instant::now();
        self.begin_call()?;
        let process = self.process.clone();
        let packed = self.call_with_input(process, &abi::encode(input))?;
        let output: Output = self.read_result(packed)?;
        if output.readings.len() as u64 > u64::from(self.limits.max_output_readings) {
            return Err(ModuleError::OutputTooLarge {
                what: OutputCap::Readings,
                actual: output.readings.len() as u64,
                limit: u64::from(self.limits.max_output_readings),
            });
        }
        if let Some(r) = output.readings.iter().find(|r| !self.manifest.outputs.contains(&r.stream)) {
            return Err(ModuleError::UndeclaredOutput { stream: r.stream.clone() });
        }
        let remaining = self.store.get_fuel().expect("fuel is enabled on the engine");
        Ok(ProcessOutcome {
            output,
            fuel_used: self.limits.fuel_per_batch.saturating_sub(remaining),
            elapsed: started.elapsed(),
            stats: std::mem::take(&mut self.store.data_mut().stats),
        })
    }

    /// Returns the module's state (`brume_save_state`), for persisting at a commit
    /// point. Capped by `limits.max_output_bytes`.
    pub fn save_state(&mut self) -> Result<Vec<u8>, ModuleError> {
        self.begin_call()?;
        let save = self.save_state.clone();
        let packed = self.store_call(|s| save.call(s, ()))? as u64;
        self.read_result(packed)
    }

    /// Restores state saved by [`ModuleInstance::save_state`] (`brume_load_state`), e.g.
    /// into a fresh instance after a restart or a poisoning.
    pub fn load_state(&mut self, state: &[u8]) -> Result<(), ModuleError> {
        self.begin_call()?;
        let load = self.load_state.clone();
        let packed = self.call_with_input(load, state)?;
        self.read_result(packed)
    }

    /// Whether an earlier failure poisoned the instance; if so, re-instantiate it.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    /// The limits the instance runs under.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The module's manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Refuses a poisoned instance, then gives the call a fresh budget and clean counters.
    fn begin_call(&mut self) -> Result<(), ModuleError> {
        if self.poisoned {
            return Err(ModuleError::Poisoned);
        }
        self.store.set_fuel(self.limits.fuel_per_batch).expect("fuel is enabled on the engine");
        self.store.set_epoch_deadline(self.deadline_ticks);
        let state = self.store.data_mut();
        state.limiter.hit = None;
        state.stats = CallStats::default();
        Ok(())
    }

    /// Runs a guest call, classifying failures and poisoning the instance when they
    /// leave it untrustworthy.
    fn store_call<R>(
        &mut self,
        f: impl FnOnce(&mut Store<HostState>) -> wasmtime::Result<R>,
    ) -> Result<R, ModuleError> {
        f(&mut self.store).map_err(|e| {
            let err = classify(e, self.store.data(), &self.limits);
            self.fail(err)
        })
    }

    /// Records a failure: poisons the instance if the error calls for it.
    fn fail(&mut self, err: ModuleError) -> ModuleError {
        if err.poisons() {
            self.poisoned = true;
        }
        err
    }

    /// Copies `bytes` into a guest buffer from `brume_alloc`, then calls `f(ptr, len)`.
    fn call_with_input(&mut self, f: TypedFunc<(i32, i32), i64>, bytes: &[u8]) -> Result<u64, ModuleError> {
        let len = u32::try_from(bytes.len())
            .map_err(|_| ModuleError::BadMessage(format!("input of {} bytes does not fit a u32", bytes.len())))?;
        let alloc = self.alloc.clone();
        let ptr = self.store_call(|s| alloc.call(s, len as i32))? as u32;
        if self.memory.write(&mut self.store, ptr as usize, bytes).is_err() {
            let size = self.memory.data_size(&self.store);
            return Err(self.fail(ModuleError::BadMessage(format!(
                "brume_alloc({len}) returned {ptr:#x}, outside the module's memory of {size} bytes"
            ))));
        }
        let packed = self.store_call(|s| f.call(s, (ptr as i32, len as i32)))?;
        Ok(packed as u64)
    }

    /// Reads and decodes the `CallResult<T>` a guest call returned as `packed`. The
    /// length is checked against `max_output_bytes` before anything is read, so a module
    /// cannot make the host decode (or even bounds-check) an arbitrary buffer.
    fn read_result<T: DeserializeOwned>(&mut self, packed: u64) -> Result<T, ModuleError> {
        let (ptr, len) = abi::unpack(packed);
        if u64::from(len) > self.limits.max_output_bytes {
            return Err(self.fail(ModuleError::OutputTooLarge {
                what: OutputCap::Bytes,
                actual: u64::from(len),
                limit: self.limits.max_output_bytes,
            }));
        }
        let decoded = {
            let data = self.memory.data(&self.store);
            host::guest_slice(data, ptr, len).and_then(|bytes| {
                abi::decode::<CallResult<T>>(bytes)
                    .map_err(|e| format!("undecodable result ({len} bytes at {ptr:#x}): {e}"))
            })
        };
        match decoded {
            Ok(CallResult::Ok(v)) => Ok(v),
            Ok(CallResult::Err(msg)) => Err(self.fail(ModuleError::Guest(msg))),
            Err(e) => Err(self.fail(ModuleError::BadMessage(e))),
        }
    }
}
