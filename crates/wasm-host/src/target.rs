//! Device architectures, and compiling modules ahead of time for them.
//!
//! A device that does not compile (a runtime-only agent, see [`WasmEngine::can_compile`])
//! loads modules compiled elsewhere for its [`Target`]: native code on x86_64 and
//! aarch64, Pulley bytecode on armv7, where Cranelift has no backend and wasmtime runs
//! its Pulley interpreter. The [`Precompiler`] (feature `precompile`) produces that code
//! on any machine, with the same wasmtime version and engine settings as the device.
//! Compiling for a named target uses the architecture's baseline instruction set (no
//! features detected on the compiling machine), so the code runs on every board of that
//! architecture.

use std::fmt;
use std::str::FromStr;

#[cfg(feature = "precompile")]
use crate::error::LoadError;

/// The wasmtime release compiled code belongs to: its major version, which wasmtime
/// writes into compiled code and checks on load (code compiled by 48.0.x loads in any
/// 48.0.y). Matches the `=` pin in the workspace's `Cargo.toml` (checked by a test
/// against what wasmtime writes).
pub const ENGINE_VERSION: &str = "wasmtime-48";

/// An architecture Brume agents run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    /// 64-bit x86 Linux (gateways, industrial PCs).
    X86_64,
    /// 64-bit ARM Linux (Raspberry Pi 3/4/5 with a 64-bit OS, most current boards).
    Aarch64,
    /// 32-bit ARM Linux with hardware float (Raspberry Pi OS 32-bit, older boards):
    /// modules run on wasmtime's Pulley interpreter.
    Armv7,
}

impl Target {
    /// Every target, in a stable order.
    pub const ALL: [Target; 3] = [Target::X86_64, Target::Aarch64, Target::Armv7];

    /// The architecture of this build, if it is one Brume supports.
    pub const fn host() -> Option<Target> {
        if cfg!(target_arch = "x86_64") {
            Some(Target::X86_64)
        } else if cfg!(target_arch = "aarch64") {
            Some(Target::Aarch64)
        } else if cfg!(target_arch = "arm") {
            Some(Target::Armv7)
        } else {
            None
        }
    }

    /// The name used in file names, URLs and configuration: `x86_64`, `aarch64`, `armv7`.
    pub const fn name(self) -> &'static str {
        match self {
            Target::X86_64 => "x86_64",
            Target::Aarch64 => "aarch64",
            Target::Armv7 => "armv7",
        }
    }

    /// What wasmtime compiles for on this target: a machine triple, or `pulley32`.
    #[cfg_attr(not(feature = "precompile"), allow(dead_code))]
    const fn wasmtime_target(self) -> &'static str {
        match self {
            Target::X86_64 => "x86_64-unknown-linux-gnu",
            Target::Aarch64 => "aarch64-unknown-linux-gnu",
            Target::Armv7 => "pulley32",
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A target name that is not one of [`Target::ALL`].
#[derive(Debug, Clone, thiserror::Error)]
#[error("unknown target {0:?}: expected x86_64, aarch64 or armv7")]
pub struct UnknownTarget(pub String);

impl FromStr for Target {
    type Err = UnknownTarget;

    fn from_str(s: &str) -> Result<Target, UnknownTarget> {
        match s {
            "x86_64" | "amd64" => Ok(Target::X86_64),
            "aarch64" | "arm64" => Ok(Target::Aarch64),
            "armv7" | "armhf" => Ok(Target::Armv7),
            other => Err(UnknownTarget(other.to_owned())),
        }
    }
}

/// Compiles modules for devices of any [`Target`], whatever machine it runs on (the hub
/// compiles every uploaded module for every target). Feature `precompile`.
#[cfg(feature = "precompile")]
pub struct Precompiler {
    engines: Vec<(Target, wasmtime::Engine)>,
}

#[cfg(feature = "precompile")]
impl std::fmt::Debug for Precompiler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Precompiler").finish_non_exhaustive()
    }
}

#[cfg(feature = "precompile")]
impl Precompiler {
    /// One engine per target, configured like the devices' ([`crate::WasmEngine::new`]).
    pub fn new() -> Result<Precompiler, crate::HostError> {
        let mut engines = Vec::new();
        for t in Target::ALL {
            let mut config = crate::engine::base_config();
            config
                .target(t.wasmtime_target())
                .map_err(|e| crate::HostError(format!("target {}: {e:#}", t.wasmtime_target())))?;
            let engine =
                wasmtime::Engine::new(&config).map_err(|e| crate::HostError(format!("engine for {t}: {e:#}")))?;
            engines.push((t, engine));
        }
        Ok(Precompiler { engines })
    }

    /// Compiles `wasm` for `target`: what a device of that target loads with
    /// [`crate::WasmEngine::load_precompiled`]. Only the manifest is checked here; check
    /// the module itself with [`crate::WasmEngine::load`] first (the hub's registry
    /// does, on upload).
    pub fn precompile(&self, target: Target, wasm: &[u8]) -> Result<Vec<u8>, LoadError> {
        crate::module::read_manifest(wasm)?;
        let (_, engine) = self.engines.iter().find(|(t, _)| *t == target).expect("an engine per target");
        engine.precompile_module(wasm).map_err(|e| LoadError::Compile(format!("for {target}: {e:#}")))
    }
}
