//! Checking a module before it enters the registry.
//!
//! An upload is refused unless it is signed by a trusted publisher key and loads: the hub
//! compiles it with the same host library the agents use, which checks the manifest
//! (present once, ABI version, inputs, outputs, budgets), the exports and their types,
//! and that it imports nothing but what Brume grants. A module the registry accepts is
//! therefore one every agent of this build can load; what it cannot know is how the
//! module behaves on real data, which is what rollouts and probation are for.
//!
//! The registry also compiles each module for every device architecture
//! ([`brume_wasm_host::Target`]): runtime-only agents have no compiler and download the
//! code for theirs. An upload that does not compile for one of them is refused, naming
//! it. Compilation is deterministic, so the artifacts are not stored: any hub compiles
//! them again on demand (`GET /api/v1/registry/modules/{sha256}/precompiled/{target}`)
//! and keeps them in memory.

use std::sync::{Arc, OnceLock};

use brume_protocol::ModuleRef;
use brume_signing::{Keyring, Signature, SignatureError, module_digest};
use brume_wasm_host::{LoadError, Precompiler, Target, WasmEngine};

/// Why an upload was refused.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    /// No signature came with the module.
    #[error(
        "the module is not signed: send its signature (`cloud-hub module sign` writes one) in the `Brume-Signature` header"
    )]
    Unsigned,
    /// The signature is malformed, by an untrusted key, or does not match the bytes.
    #[error("signature refused: {0}")]
    Signature(#[from] SignatureError),
    /// The module does not load.
    #[error("the module does not load: {0}")]
    Invalid(#[from] LoadError),
    /// Its manifest name or version cannot be stored or sent to agents.
    #[error("the module's manifest is not acceptable: {0}")]
    Manifest(String),
    /// Larger than `fleet.max_module_bytes`.
    #[error("the module is {size} bytes, over fleet.max_module_bytes ({max} bytes)")]
    TooLarge {
        /// Its size.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// The WASM engine could not start.
    #[error("cannot start the WASM engine to check the module: {0}")]
    Engine(String),
}

impl UploadError {
    /// Refusals of the signature are about who may publish, the others about the module.
    pub fn is_signature(&self) -> bool {
        matches!(self, UploadError::Unsigned | UploadError::Signature(_))
    }
}

/// A module that passed every check, ready for [`crate::store::fleet::FleetStore::put_module`].
#[derive(Debug, Clone)]
pub struct CheckedModule {
    /// Name and version from its manifest, sha256 of the bytes.
    pub module: ModuleRef,
    /// The manifest as JSON.
    pub manifest_json: String,
    /// The key that signed it.
    pub key_id: String,
    /// The signature, normalised.
    pub signature: String,
    /// The module compiled for each device architecture.
    pub artifacts: Vec<(Target, Vec<u8>)>,
}

/// Checks uploads. One engine for the process, made on first use.
pub struct Registry {
    /// Publishers' keys (`fleet.trusted_keys`).
    keyring: Keyring,
    /// `fleet.max_module_bytes`.
    max_bytes: u64,
    engine: OnceLock<Result<Arc<WasmEngine>, String>>,
    precompiler: OnceLock<Result<Arc<Precompiler>, String>>,
}

impl Registry {
    /// A registry trusting `keyring`.
    pub fn new(keyring: Keyring, max_bytes: u64) -> Registry {
        Registry { keyring, max_bytes, engine: OnceLock::new(), precompiler: OnceLock::new() }
    }

    /// `fleet.max_module_bytes`.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Checks size, signature, then the module itself (the signature first: the
    /// compiler never sees bytes no trusted publisher signed). Blocking: compiles.
    pub fn check(&self, wasm: &[u8], signature: Option<&str>) -> Result<CheckedModule, UploadError> {
        if wasm.len() as u64 > self.max_bytes {
            return Err(UploadError::TooLarge { size: wasm.len() as u64, max: self.max_bytes });
        }
        let sig: Signature = signature.ok_or(UploadError::Unsigned)?.parse()?;
        let sha256 = module_digest(wasm);
        let key_id = self.keyring.verify(&sha256, &sig)?;
        let engine = self
            .engine
            .get_or_init(|| WasmEngine::new(Default::default()).map(Arc::new).map_err(|e| e.to_string()))
            .clone()
            .map_err(UploadError::Engine)?;
        let loaded = engine.load(wasm)?;
        let manifest = loaded.manifest();
        let module = ModuleRef { name: manifest.name.clone(), version: manifest.version.clone(), sha256 };
        brume_protocol::validate_module_ref(&module).map_err(|e| UploadError::Manifest(e.to_string()))?;
        let mut artifacts = Vec::new();
        for target in Target::ALL {
            artifacts.push((target, self.precompile(target, wasm)?));
        }
        Ok(CheckedModule {
            module,
            manifest_json: serde_json::to_string(manifest).map_err(|e| UploadError::Manifest(e.to_string()))?,
            key_id: key_id.to_string(),
            signature: sig.to_string(),
            artifacts,
        })
    }

    /// Compiles a module (already checked on upload) for devices of `target`. Blocking.
    pub fn precompile(&self, target: Target, wasm: &[u8]) -> Result<Vec<u8>, UploadError> {
        let precompiler = self
            .precompiler
            .get_or_init(|| Precompiler::new().map(Arc::new).map_err(|e| e.to_string()))
            .clone()
            .map_err(UploadError::Engine)?;
        Ok(precompiler.precompile(target, wasm)?)
    }
}
