//! Loading a module: compile, read the manifest, check the ABI surface, hash.

use std::sync::Arc;

use brume_module_abi::{self as abi, ABI_VERSION, MANIFEST_SECTION, Manifest};
use sha2::{Digest, Sha256};
use wasmtime::{ExternType, FuncType, Module, ValType};

use crate::engine::WasmEngine;
use crate::error::{LoadError, PrecompiledError};
use crate::host::MEMORY_EXPORT;

/// A compiled, checked module: ready to be instantiated any number of times. Cheap to
/// clone (the compiled code is shared).
#[derive(Clone)]
pub struct LoadedModule {
    pub(crate) module: Module,
    pub(crate) manifest: Arc<Manifest>,
    hash: [u8; 32],
}

impl std::fmt::Debug for LoadedModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModule")
            .field("name", &self.manifest.name)
            .field("version", &self.manifest.version)
            .field("hash", &self.hash_hex())
            .finish_non_exhaustive()
    }
}

/// Value types as they appear in signatures, for comparing and for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ty {
    I32,
    I64,
    Other,
}

fn ty(v: &ValType) -> Ty {
    match v {
        ValType::I32 => Ty::I32,
        ValType::I64 => Ty::I64,
        _ => Ty::Other,
    }
}

/// Renders a function type as WAT, e.g. `(func (param i32 i32) (result i64))`.
fn render(f: &FuncType) -> String {
    let list = |it: &mut dyn Iterator<Item = ValType>| -> String {
        it.map(|v| match ty(&v) {
            Ty::I32 => "i32".to_string(),
            Ty::I64 => "i64".to_string(),
            Ty::Other => format!("{v}"),
        })
        .collect::<Vec<_>>()
        .join(" ")
    };
    let params = list(&mut f.params());
    let results = list(&mut f.results());
    let mut s = "(func".to_string();
    if !params.is_empty() {
        s += &format!(" (param {params})");
    }
    if !results.is_empty() {
        s += &format!(" (result {results})");
    }
    s + ")"
}

fn matches_sig(f: &FuncType, params: &[Ty], results: &[Ty]) -> bool {
    f.params().map(|v| ty(&v)).eq(params.iter().copied()) && f.results().map(|v| ty(&v)).eq(results.iter().copied())
}

/// A required function export: name, params, results, and the WAT text for messages.
struct Required {
    name: &'static str,
    params: &'static [Ty],
    results: &'static [Ty],
    wat: &'static str,
}

const REQUIRED_EXPORTS: &[Required] = &[
    Required { name: abi::exports::ABI_VERSION, params: &[], results: &[Ty::I32], wat: "(func (result i32))" },
    Required {
        name: abi::exports::ALLOC,
        params: &[Ty::I32],
        results: &[Ty::I32],
        wat: "(func (param i32) (result i32))",
    },
    Required {
        name: abi::exports::INIT,
        params: &[Ty::I32, Ty::I32],
        results: &[Ty::I64],
        wat: "(func (param i32 i32) (result i64))",
    },
    Required {
        name: abi::exports::PROCESS,
        params: &[Ty::I32, Ty::I32],
        results: &[Ty::I64],
        wat: "(func (param i32 i32) (result i64))",
    },
    Required { name: abi::exports::SAVE_STATE, params: &[], results: &[Ty::I64], wat: "(func (result i64))" },
    Required {
        name: abi::exports::LOAD_STATE,
        params: &[Ty::I32, Ty::I32],
        results: &[Ty::I64],
        wat: "(func (param i32 i32) (result i64))",
    },
];

const ALLOWED_IMPORTS: &[Required] = &[
    Required {
        name: abi::imports::HISTORY,
        params: &[Ty::I32, Ty::I32],
        results: &[Ty::I64],
        wat: "(func (param i32 i32) (result i64))",
    },
    Required {
        name: abi::imports::LOG,
        params: &[Ty::I32, Ty::I32, Ty::I32],
        results: &[],
        wat: "(func (param i32 i32 i32))",
    },
];

/// Reads the manifest custom section. Exactly one is required: two would let a tool
/// that reads the first disagree with one that reads the last.
pub(crate) fn read_manifest(bytes: &[u8]) -> Result<Manifest, LoadError> {
    let mut found: Option<&[u8]> = None;
    for payload in wasmparser::Parser::new(0).parse_all(bytes) {
        let payload = payload.map_err(|e| LoadError::Compile(e.to_string()))?;
        if let wasmparser::Payload::CustomSection(reader) = payload
            && reader.name() == MANIFEST_SECTION
        {
            if found.is_some() {
                return Err(LoadError::BadManifest(format!("more than one `{MANIFEST_SECTION}` section")));
            }
            found = Some(reader.data());
        }
    }
    let data = found.ok_or(LoadError::MissingManifest { section: MANIFEST_SECTION })?;
    Manifest::from_json(data).map_err(|e| LoadError::BadManifest(e.to_string()))
}

fn check_exports(module: &Module) -> Result<(), LoadError> {
    for req in REQUIRED_EXPORTS {
        let problem = match module.get_export(req.name) {
            None => "is missing".to_string(),
            Some(ExternType::Func(f)) if matches_sig(&f, req.params, req.results) => continue,
            Some(ExternType::Func(f)) => format!("has type `{}`", render(&f)),
            Some(other) => format!("is not a function but {}", extern_kind(&other)),
        };
        return Err(LoadError::Export { name: req.name, problem, expected: req.wat });
    }
    match module.get_export(MEMORY_EXPORT) {
        Some(ExternType::Memory(m)) if !m.is_64() && !m.is_shared() => Ok(()),
        Some(ExternType::Memory(_)) => Err(LoadError::Export {
            name: MEMORY_EXPORT,
            problem: "is a 64-bit or shared memory".into(),
            expected: "(memory)",
        }),
        None => Err(LoadError::Export { name: MEMORY_EXPORT, problem: "is missing".into(), expected: "(memory)" }),
        Some(other) => Err(LoadError::Export {
            name: MEMORY_EXPORT,
            problem: format!("is not a memory but {}", extern_kind(&other)),
            expected: "(memory)",
        }),
    }
}

fn extern_kind(e: &ExternType) -> &'static str {
    match e {
        ExternType::Func(_) => "a function",
        ExternType::Global(_) => "a global",
        ExternType::Table(_) => "a table",
        ExternType::Memory(_) => "a memory",
        ExternType::Tag(_) => "a tag",
    }
}

fn check_imports(module: &Module) -> Result<(), LoadError> {
    for import in module.imports() {
        let refuse = |problem: String| LoadError::Import {
            module: import.module().to_string(),
            name: import.name().to_string(),
            problem,
        };
        if import.module() != abi::imports::MODULE {
            return Err(refuse(format!("the host provides no module `{}`", import.module())));
        }
        let Some(req) = ALLOWED_IMPORTS.iter().find(|r| r.name == import.name()) else {
            return Err(refuse(format!("the host provides no function `{}`", import.name())));
        };
        match import.ty() {
            ExternType::Func(f) if matches_sig(&f, req.params, req.results) => {}
            ExternType::Func(f) => {
                return Err(refuse(format!("imported as `{}`, the host provides `{}`", render(&f), req.wat)));
            }
            other => {
                return Err(refuse(format!("imported as {}, the host provides a function", extern_kind(&other))));
            }
        }
    }
    Ok(())
}

impl WasmEngine {
    /// Compiles and checks a module.
    ///
    /// `bytes` is a WebAssembly binary (text format is not accepted in production
    /// builds). The module must carry a [`Manifest`] in the `brume-manifest` custom
    /// section whose `abi_version` is [`ABI_VERSION`], export every function of the ABI
    /// with its exact type and a `memory`, and import nothing but `brume::history` and
    /// `brume::log`. Compilation is the expensive step (milliseconds to seconds for large
    /// modules); do it once per module file and instantiate the result as often as needed.
    ///
    /// A runtime-only build (without the `jit` feature, see [`WasmEngine::can_compile`])
    /// has no compiler and refuses with [`LoadError::NoCompiler`].
    pub fn load(&self, bytes: &[u8]) -> Result<LoadedModule, LoadError> {
        #[cfg(feature = "jit")]
        {
            let module = Module::new(&self.inner.engine, bytes).map_err(|e| LoadError::Compile(format!("{e:#}")))?;
            checked(module, bytes)
        }
        #[cfg(not(feature = "jit"))]
        {
            let _ = bytes;
            Err(LoadError::NoCompiler {
                target: crate::Target::host().map_or(std::env::consts::ARCH, crate::Target::name),
            })
        }
    }

    /// Loads a module compiled ahead of time: `compiled` is what
    /// [`LoadedModule::serialize`] returned for the module `wasm`, in this or another
    /// process of the same build. No compilation happens, so none of the compiler's
    /// memory is touched: the agent compiles in a short-lived child process and loads
    /// the result with this. The same checks as [`WasmEngine::load`] apply to `wasm`.
    ///
    /// Returns `Ok(Err(_))` when `compiled` was written by another wasmtime version or
    /// engine configuration (or is not a compiled module at all): recompile.
    ///
    /// # Trust
    ///
    /// `compiled` is machine code that will run in this process: pass only bytes this
    /// build produced and kept where only the agent writes (its data directory), with
    /// an integrity check against accidental damage. wasmtime checks the version and
    /// configuration it was compiled for, not that its code is benign.
    pub fn load_precompiled(
        &self,
        wasm: &[u8],
        compiled: &[u8],
    ) -> Result<Result<LoadedModule, PrecompiledError>, LoadError> {
        // SAFETY: see "Trust" above; the caller vouches that `compiled` came from
        // `LoadedModule::serialize` of this build, unmodified.
        #[allow(unsafe_code)]
        let module = unsafe { Module::deserialize(&self.inner.engine, compiled) };
        match module {
            Ok(m) => checked(m, wasm).map(Ok),
            Err(e) => Ok(Err(PrecompiledError(format!("{e:#}")))),
        }
    }
}

/// The checks every loaded module passes, on its compiled form and its bytes.
fn checked(module: Module, bytes: &[u8]) -> Result<LoadedModule, LoadError> {
    let manifest = read_manifest(bytes)?;
    if manifest.abi_version != ABI_VERSION {
        return Err(LoadError::AbiMismatch { module: manifest.abi_version, host: ABI_VERSION });
    }
    check_exports(&module)?;
    check_imports(&module)?;
    let hash: [u8; 32] = Sha256::digest(bytes).into();
    Ok(LoadedModule { module, manifest: Arc::new(manifest), hash })
}

impl LoadedModule {
    /// The module's manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// SHA-256 of the module's bytes: its identity for lineage (every output carries it).
    pub fn hash(&self) -> [u8; 32] {
        self.hash
    }

    /// The compiled machine code, for [`WasmEngine::load_precompiled`] in a process of
    /// the same build. Feature `jit` (wasmtime serializes only with its compiler).
    #[cfg(feature = "jit")]
    pub fn serialize(&self) -> Result<Vec<u8>, PrecompiledError> {
        self.module.serialize().map_err(|e| PrecompiledError(format!("{e:#}")))
    }

    /// [`LoadedModule::hash`] as 64 lowercase hex digits.
    pub fn hash_hex(&self) -> String {
        self.hash.iter().map(|b| format!("{b:02x}")).collect()
    }
}
