//! Errors of loading ([`LoadError`]) and running ([`ModuleError`]) a module.
//!
//! Every message says what happened and what the operator or module author can do about
//! it, because these strings end up in the agent's log and in its status reports, read by
//! someone who has never seen this crate.

use std::time::Duration;

/// Why a module could not be loaded. Loading failures are permanent for those bytes:
/// retrying the same file gives the same error.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The bytes are not a valid WebAssembly module (corrupt file, wrong format, or a
    /// feature the engine does not enable).
    #[error("module does not compile: {0}; rebuild it for wasm32-unknown-unknown and check the file is not truncated")]
    Compile(String),
    /// The module has no `brume-manifest` custom section.
    #[error("module has no `{section}` custom section; build it with the Brume SDK, which embeds the manifest")]
    MissingManifest {
        /// The section name looked for.
        section: &'static str,
    },
    /// The manifest section is present but unusable.
    #[error("module manifest is invalid: {0}; fix the manifest the module was built with")]
    BadManifest(String),
    /// The manifest declares an ABI version this host does not speak.
    #[error(
        "module was built for ABI version {module}, this agent speaks version {host}; rebuild the module with a matching SDK or upgrade the agent"
    )]
    AbiMismatch {
        /// The version the module declares.
        module: u32,
        /// The version of this host.
        host: u32,
    },
    /// A required export is missing or has the wrong type.
    #[error("module export `{name}` {problem}; it must be `{expected}` (build the module with the Brume SDK)")]
    Export {
        /// The export name.
        name: &'static str,
        /// What is wrong: "is missing" or "has type ...".
        problem: String,
        /// The expected type, in WAT-like notation.
        expected: &'static str,
    },
    /// The module imports something the host does not provide. Modules get only
    /// `brume.history` and `brume.log`: no WASI, no clock, no filesystem, no network.
    #[error(
        "module imports `{module}::{name}` ({problem}); modules may import only `brume::history` and `brume::log` (no WASI: build for wasm32-unknown-unknown)"
    )]
    Import {
        /// The import's module name, e.g. `wasi_snapshot_preview1`.
        module: String,
        /// The import's field name, e.g. `fd_write`.
        name: String,
        /// What is wrong with it.
        problem: String,
    },
    /// This build has no compiler (runtime-only) and no precompiled code was found for
    /// the module.
    #[error(
        "this agent is a runtime-only build and cannot compile modules: give it the module precompiled for {target} (`cloud-hub module precompile --target {target}`, or deploy it through a hub, which serves precompiled builds)"
    )]
    NoCompiler {
        /// The agent's architecture (`aarch64`, `armv7`, ...).
        target: &'static str,
    },
}

/// A module compiled ahead of time (by [`crate::LoadedModule::serialize`]) could not be
/// used: written by another wasmtime version or engine configuration, or damaged. The
/// caller recompiles from the `.wasm`.
#[derive(Debug, thiserror::Error)]
#[error("precompiled module unusable: {0}; compile it again from the .wasm file")]
pub struct PrecompiledError(pub String);

/// Which output cap a module exceeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputCap {
    /// `Limits::max_output_bytes`, checked on the returned buffer's length before decoding.
    Bytes,
    /// `Limits::max_output_readings`, checked after decoding.
    Readings,
}

impl std::fmt::Display for OutputCap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            OutputCap::Bytes => "bytes",
            OutputCap::Readings => "readings",
        })
    }
}

/// Why a call into a module instance failed.
///
/// [`ModuleError::poisons`] says which errors leave the instance unusable; see the crate
/// docs for why.
#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    /// The guest trapped (`unreachable`, out-of-bounds access, division by zero, stack
    /// overflow, ...).
    #[error(
        "module trapped: {message}; the batch failed and the instance must be re-instantiated (a bug in the module)"
    )]
    Trap {
        /// The trap and its wasm backtrace, as wasmtime reports it.
        message: String,
    },
    /// The guest used up its fuel budget for the call.
    #[error(
        "module ran out of fuel (budget {budget} per batch); the batch was stopped, re-instantiate the module, and raise `fuel_per_batch` if the batch is legitimately expensive"
    )]
    OutOfFuel {
        /// The fuel the call was given.
        budget: u64,
    },
    /// The guest ran past its wall-clock budget (epoch deadline).
    #[error(
        "module exceeded its time budget of {budget:?} per batch; the batch was stopped, re-instantiate the module, and raise `time_per_batch` or send smaller batches"
    )]
    Timeout {
        /// The time the call was given.
        budget: Duration,
    },
    /// The guest tried to grow its linear memory (or a table) past the cap.
    #[error(
        "module tried to grow its memory past the cap of {limit} bytes; the batch was stopped, re-instantiate the module, and raise `memory_bytes` if the module needs more"
    )]
    MemoryLimit {
        /// The cap, in bytes.
        limit: u64,
    },
    /// The guest's output exceeded a cap. The instance is still usable.
    #[error(
        "module output too large: {actual} {what} over the cap of {limit}; the batch failed, send smaller batches or raise `max_output_{what}`"
    )]
    OutputTooLarge {
        /// Which cap.
        what: OutputCap,
        /// The size the module returned.
        actual: u64,
        /// The cap.
        limit: u64,
    },
    /// The guest wrote to a stream its manifest does not declare. The instance is still
    /// usable.
    #[error(
        "module wrote to stream `{stream}` which its manifest does not list in `outputs`; the batch failed, declare the stream in the manifest"
    )]
    UndeclaredOutput {
        /// The offending stream name.
        stream: String,
    },
    /// The guest returned `CallResult::Err`. The instance is still usable.
    #[error("module reported an error: {0}")]
    Guest(String),
    /// The guest broke the calling convention: an undecodable buffer, an out-of-bounds
    /// pointer, a missing `memory` export at run time.
    #[error("module broke the ABI: {0}; the instance must be re-instantiated (a bug in the module or its SDK)")]
    BadMessage(String),
    /// The instance's `brume_abi_version` export does not match this host.
    #[error(
        "module's brume_abi_version() returned {module}, this agent speaks version {host}; rebuild the module with a matching SDK"
    )]
    AbiMismatch {
        /// The version the module returned.
        module: u32,
        /// The version of this host.
        host: u32,
    },
    /// The instance failed earlier and refuses further calls.
    #[error("module instance is poisoned by an earlier failure; re-instantiate it")]
    Poisoned,
}

impl ModuleError {
    /// A short stable label for metrics (`brume_module_errors_total{kind=...}`).
    pub fn kind(&self) -> &'static str {
        match self {
            ModuleError::Trap { .. } => "trap",
            ModuleError::OutOfFuel { .. } => "out_of_fuel",
            ModuleError::Timeout { .. } => "timeout",
            ModuleError::MemoryLimit { .. } => "memory_limit",
            ModuleError::OutputTooLarge { .. } => "output_too_large",
            ModuleError::UndeclaredOutput { .. } => "undeclared_output",
            ModuleError::Guest(_) => "guest",
            ModuleError::BadMessage(_) => "bad_message",
            ModuleError::AbiMismatch { .. } => "abi_mismatch",
            ModuleError::Poisoned => "poisoned",
        }
    }

    /// Whether this error leaves the instance poisoned. True when the guest was stopped
    /// mid-call (trap, fuel, time, memory) or broke the calling convention: its memory may
    /// hold half-updated state, so no further call can be trusted. False when the guest
    /// returned normally and only its answer was refused.
    pub fn poisons(&self) -> bool {
        matches!(
            self,
            ModuleError::Trap { .. }
                | ModuleError::OutOfFuel { .. }
                | ModuleError::Timeout { .. }
                | ModuleError::MemoryLimit { .. }
                | ModuleError::BadMessage(_)
                | ModuleError::AbiMismatch { .. }
                | ModuleError::Poisoned
        )
    }
}
