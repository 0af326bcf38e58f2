//! Compiling modules: once per module file, in a child process when the agent runs as its
//! own binary, cached on disk.
//!
//! Compiling with Cranelift is the most memory-hungry thing the agent does: tens of MB
//! of working memory and ~7 MB of compiler code paged in, for a few hundred ms per
//! module. Done in the agent's own process, most of that stays resident for the agent's
//! life. So the `edge-agent` binary compiles in a short-lived child of itself
//! (`edge-agent compile-module IN OUT`) and loads the machine code with
//! [`WasmEngine::load_precompiled`]: the compiler never runs in the long-lived process,
//! and a compiler crash or blow-up on a hostile module kills only the child.
//!
//! The compiled code is kept in `<data_dir>/module-cache/<sha256 of the .wasm>.cwasm`,
//! so a restart or a rollback to a known build loads in microseconds. Each file starts
//! with a magic and the sha256 of the code: a damaged file is detected, deleted and
//! compiled again. A file from another agent version is refused by wasmtime and
//! recompiled the same way.
//!
//! **Runtime-only builds** (without the `jit` feature; the default for ARM devices, see
//! `cross/README.md`) have no compiler at all. They load code precompiled for their
//! architecture, kept beside the `.wasm` as `<stem>.<arch>.cwasm` ([`precompiled_path`]):
//! the hub precompiles every registered module for every device architecture and the
//! fleet client downloads the one for this agent; for modules in the agent's own config,
//! `cloud-hub module precompile` writes it. JIT builds use such a file too when it is
//! there and usable, and compile otherwise.

#[cfg(feature = "jit")]
use std::io::Write;
use std::path::{Path, PathBuf};
#[cfg(feature = "jit")]
use std::process::{Command, Stdio};
#[cfg(feature = "jit")]
use std::sync::Mutex;
use std::sync::OnceLock;
use std::time::Duration;
#[cfg(feature = "jit")]
use std::time::Instant;

use brume_wasm_host::{LoadError, LoadedModule, Target, WasmEngine};
use sha2::{Digest, Sha256};

/// Why a module could not be compiled or loaded. Its message is what the operator sees
/// in the log and in `/api/v1/status` (`last_error`).
#[derive(Debug, thiserror::Error)]
// A runtime-only build never compiles: the compiler's failures cannot happen there.
#[cfg_attr(not(feature = "jit"), allow(dead_code))]
pub enum CompileError {
    /// The module itself was refused (invalid wasm, bad manifest, ABI, exports,
    /// imports), in this process.
    #[error(transparent)]
    Module(#[from] LoadError),
    /// The module was refused by the compiler process; its reason as it printed it.
    #[error("{0}")]
    Refused(String),
    /// The compiler process could not be started.
    #[error("cannot start the compiler process {exe}: {source}")]
    Spawn {
        /// The agent's executable.
        exe: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Waiting for the compiler process failed.
    #[error("waiting for the compiler process: {0}")]
    Wait(std::io::Error),
    /// The compiler process failed without saying why (killed, crashed).
    #[error("the compiler process failed ({0})")]
    ChildFailed(std::process::ExitStatus),
    /// Compiling took longer than [`CHILD_TIMEOUT`].
    #[error("compiling took more than {} s; the module is too large or hostile", CHILD_TIMEOUT.as_secs())]
    Timeout,
    /// The module cache could not be written or read back.
    #[error("{what}: {source}")]
    Cache {
        /// What was being done.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// A runtime-only agent found no usable precompiled code for the module.
    #[cfg_attr(feature = "jit", allow(dead_code))]
    #[error(
        "this agent is a runtime-only build and cannot compile modules; the module precompiled for it is missing or unusable at {path} ({reason}): write it with `cloud-hub module precompile --target <arch>` from a hub of the same Brume release, or deploy the module through a hub, which serves precompiled builds"
    )]
    NotPrecompiled {
        /// Where it was looked for.
        path: PathBuf,
        /// Not found, or why wasmtime refused it.
        reason: String,
    },
    /// The compiled file was gone right after the compiler process wrote it.
    #[error("the compiled module vanished from the cache")]
    Vanished,
}

/// File header: magic, then the sha256 of the rest.
const MAGIC: &[u8; 8] = b"BRUMECW1";
const HEADER: usize = MAGIC.len() + 32;

/// Longest a compile child may take before it is killed.
const CHILD_TIMEOUT: Duration = Duration::from_secs(300);

/// The executable that compiles modules in child processes, set by the `edge-agent`
/// binary; unset (library use, tests) means compiling in-process.
static COMPILER_EXE: OnceLock<PathBuf> = OnceLock::new();

/// One compilation at a time, so that several module threads do not each hold a
/// compiler's working memory at once.
#[cfg(feature = "jit")]
static COMPILING: Mutex<()> = Mutex::new(());

/// Makes this process compile modules by running `exe compile-module IN OUT`.
pub fn compile_in_child_processes(exe: PathBuf) {
    let _ = COMPILER_EXE.set(exe);
}

/// The child side: compiles and checks `input`, writes the cache file to `output`.
#[cfg(feature = "jit")]
pub fn compile_module_command(input: &Path, output: &Path) -> anyhow::Result<()> {
    use anyhow::Context;
    let wasm = std::fs::read(input).with_context(|| format!("reading {}", input.display()))?;
    let engine = WasmEngine::new(Default::default())?;
    let module = engine.load(&wasm)?;
    let code = module.serialize()?;
    write_cache_file(output, &code).with_context(|| format!("writing {}", output.display()))?;
    Ok(())
}

/// The child side in a runtime-only build: refuses, it has no compiler.
#[cfg(not(feature = "jit"))]
pub fn compile_module_command(_input: &Path, _output: &Path) -> anyhow::Result<()> {
    Err(LoadError::NoCompiler { target: Target::host().map_or(std::env::consts::ARCH, Target::name) }.into())
}

/// Where the code of the module file `wasm_path` precompiled for this agent's
/// architecture is looked for: beside it, `<stem>.<arch>.cwasm` (`threshold.wasm` →
/// `threshold.aarch64.cwasm`). `None` on an architecture Brume does not precompile for.
pub fn precompiled_path(wasm_path: &Path) -> Option<PathBuf> {
    let target = Target::host()?;
    Some(wasm_path.with_extension(format!("{}.cwasm", target.name())))
}

/// Loads `wasm` (read from `wasm_path`, sha256 `hash_hex`): from the agent's cache,
/// else from code precompiled for this architecture beside the file (see
/// [`precompiled_path`]), else compiled (in a child process when configured) and cached.
/// A runtime-only build cannot compile: without usable precompiled code it refuses.
pub(crate) fn load(
    engine: &WasmEngine,
    data_dir: &Path,
    wasm_path: &Path,
    wasm: &[u8],
    hash_hex: &str,
) -> Result<LoadedModule, CompileError> {
    let dir = data_dir.join("module-cache");
    let path = dir.join(format!("{hash_hex}.cwasm"));
    if let Some(m) = from_cache(engine, &path, wasm)? {
        return Ok(m);
    }
    let sibling = precompiled_path(wasm_path);
    let unusable = match sibling.as_deref().map(std::fs::read) {
        Some(Ok(code)) => match engine.load_precompiled(wasm, &code)? {
            Ok(m) => return Ok(m),
            Err(e) => Some(e.to_string()),
        },
        _ => None,
    };
    #[cfg(not(feature = "jit"))]
    {
        let _ = (&dir, &path);
        Err(CompileError::NotPrecompiled {
            path: sibling.unwrap_or_else(|| wasm_path.with_extension("cwasm")),
            reason: unusable.unwrap_or_else(|| "not found".into()),
        })
    }
    #[cfg(feature = "jit")]
    {
        if let (Some(p), Some(reason)) = (&sibling, &unusable) {
            tracing::warn!(path = %p.display(), %reason, "precompiled module not usable by this agent; compiling the .wasm instead");
        }
        let _one_at_a_time = COMPILING.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = std::fs::create_dir_all(&dir) {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot create the module cache; compiling in-process without it");
            return compile_here(engine, wasm, None);
        }
        match COMPILER_EXE.get() {
            Some(exe) => {
                compile_in_child(exe, &dir, &path, wasm)?;
                from_cache(engine, &path, wasm)?.ok_or(CompileError::Vanished)
            }
            None => compile_here(engine, wasm, Some(&path)),
        }
    }
}

/// Deletes cached code of a module build no longer in use.
pub(crate) fn forget(data_dir: &Path, hash_hex: &str) {
    let _ = std::fs::remove_file(data_dir.join("module-cache").join(format!("{hash_hex}.cwasm")));
}

fn from_cache(engine: &WasmEngine, path: &Path, wasm: &[u8]) -> Result<Option<LoadedModule>, CompileError> {
    let Ok(file) = std::fs::read(path) else { return Ok(None) };
    let intact = file.len() > HEADER
        && &file[..MAGIC.len()] == MAGIC
        && Sha256::digest(&file[HEADER..]).as_slice() == &file[MAGIC.len()..HEADER];
    if !intact {
        tracing::warn!(path = %path.display(), "damaged compiled module in the cache; compiling again");
        let _ = std::fs::remove_file(path);
        return Ok(None);
    }
    match engine.load_precompiled(wasm, &file[HEADER..])? {
        Ok(m) => Ok(Some(m)),
        Err(e) => {
            tracing::info!(path = %path.display(), reason = %e, "cached compiled module not usable by this agent; compiling again");
            let _ = std::fs::remove_file(path);
            Ok(None)
        }
    }
}

#[cfg(feature = "jit")]
fn compile_here(engine: &WasmEngine, wasm: &[u8], cache: Option<&Path>) -> Result<LoadedModule, CompileError> {
    let loaded = engine.load(wasm);
    release_freed_memory();
    let module = loaded?;
    if let Some(path) = cache {
        match module
            .serialize()
            .map_err(|e| e.to_string())
            .and_then(|code| write_cache_file(path, &code).map_err(|e| e.to_string()))
        {
            Ok(()) => {}
            Err(e) => tracing::warn!(path = %path.display(), error = %e, "cannot cache the compiled module"),
        }
    }
    Ok(module)
}

#[cfg(feature = "jit")]
fn compile_in_child(exe: &Path, dir: &Path, path: &Path, wasm: &[u8]) -> Result<(), CompileError> {
    // The child compiles exactly the bytes that were hashed, not the file at the
    // module's path, which may be replaced at any moment (hot reload).
    let input = tempfile::Builder::new()
        .prefix(".compile-")
        .suffix(".wasm")
        .tempfile_in(dir)
        .and_then(|mut f| f.write_all(wasm).map(|()| f))
        .map_err(|source| CompileError::Cache {
            what: format!("cannot write the module for the compiler in {}", dir.display()),
            source,
        })?;
    let output = path.with_extension("cwasm.partial");
    let mut child = Command::new(exe)
        .arg("compile-module")
        .arg(input.path())
        .arg(&output)
        .env("RUST_LOG", "error")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| CompileError::Spawn { exe: exe.to_path_buf(), source })?;
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() > CHILD_TIMEOUT => {
                let _ = child.kill();
                let _ = child.wait();
                let _ = std::fs::remove_file(&output);
                return Err(CompileError::Timeout);
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(CompileError::Wait(e)),
        }
    };
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
    }
    if !status.success() {
        let _ = std::fs::remove_file(&output);
        // The child prints `edge-agent: <error>`: the load error, as the in-process path
        // would have returned it.
        let reason = stderr.lines().rev().find_map(|l| l.strip_prefix("edge-agent: ")).unwrap_or(stderr.trim());
        return Err(if reason.is_empty() {
            CompileError::ChildFailed(status)
        } else {
            CompileError::Refused(reason.to_string())
        });
    }
    std::fs::rename(&output, path)
        .map_err(|source| CompileError::Cache { what: "cannot move the compiled module into the cache".into(), source })
}

#[cfg(feature = "jit")]
fn write_cache_file(path: &Path, code: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(MAGIC)?;
    f.write_all(&Sha256::digest(code))?;
    f.write_all(code)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Hands memory freed by an in-process compilation back to the OS. glibc keeps freed
/// heap pages in the thread's arena; after a Cranelift compilation that is several MB
/// per module thread, resident for the life of the agent.
#[cfg(feature = "jit")]
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes no pointers and only releases free pages; it is safe to
    // call from any thread at any time.
    #[allow(unsafe_code)]
    unsafe {
        libc::malloc_trim(0);
    }
}
