//! The agent's WASM host: runs Brume processing modules (see `modules/abi`) under limits.
//!
//! A narrow wrapper around wasmtime: nothing of wasmtime appears in this crate's API, so
//! the agent cannot come to depend on it and a wasmtime upgrade (which is also a compiler
//! upgrade, see the dependency notes) touches this crate only.
//!
//! Start with [`WasmEngine::new`], then [`WasmEngine::load`] a module's bytes into a
//! [`LoadedModule`], [`LoadedModule::instantiate`] it into a [`ModuleInstance`] and call
//! [`ModuleInstance::process`] per batch.
//!
//! # Why it is shaped like this
//!
//! * **One engine per process.** The engine owns the compiler configuration and the
//!   epoch counter; modules compiled by one engine can only run in its stores. One engine
//!   means one epoch ticker thread for every module and one place where fuel and epochs
//!   are switched on.
//! * **One store per instance.** A store owns an instance's memory, fuel and limits;
//!   wasmtime frees nothing in a store until the store is dropped, so instances never
//!   share one, and dropping an instance frees everything it had.
//! * **Fuel and epochs, both.** Fuel counts instructions: deterministic (the same batch
//!   costs the same on a loaded or idle device), so it is the CPU budget a module author
//!   can reason about, and [`ProcessOutcome::fuel_used`] is a stable cost metric. But
//!   fuel does not advance while the guest waits in a host call (a slow history query),
//!   so a wall-clock budget backs it: the ticker thread increments the engine's epoch
//!   every [`EngineConfig::epoch_tick`], and each call gets a deadline of
//!   [`Limits::time_per_batch`] in ticks. Both cost throughput in tight loops
//!   (dependencies.md §3); that is the price of stopping a runaway module.
//! * **Memory growth traps.** The store's resource limiter refuses growth past
//!   [`Limits::memory_bytes`] with an error rather than letting `memory.grow` return -1,
//!   so the caller sees [`ModuleError::MemoryLimit`] instead of a module that misbehaves
//!   after an allocation failure.
//! * **Poisoning.** A guest stopped mid-call (trap, out of fuel, timeout, memory cap) or
//!   one that broke the calling convention may have left its memory half-updated: its
//!   allocator, its running state. Rather than guessing, the instance refuses every
//!   further call with [`ModuleError::Poisoned`]; the caller re-instantiates (cheap) and
//!   restores the last saved state. Errors raised after the guest returned normally
//!   (output caps, undeclared streams, `CallResult::Err`) do not poison.
//!
//! Host functions (`brume.history`, `brume.log`) are in the `host` module; they are the
//! module's only way out of its sandbox, and each is bounded.

#![warn(missing_docs)]

mod engine;
mod error;
mod host;
mod instance;
mod limits;
mod module;
mod target;

pub use engine::{EngineConfig, HostError, WasmEngine};
pub use error::{LoadError, ModuleError, OutputCap, PrecompiledError};
pub use host::{CallStats, HistoryProvider, NoHistory};
pub use instance::{ModuleInstance, ProcessOutcome};
pub use limits::{LimitOverrides, Limits};
pub use module::LoadedModule;
#[cfg(feature = "precompile")]
pub use target::Precompiler;
pub use target::{ENGINE_VERSION, Target, UnknownTarget};
