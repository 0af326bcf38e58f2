//! `cargo xtask build-modules`: builds the example modules in `modules/examples` (a separate
//! workspace) for `wasm32-unknown-unknown` in release, checks each `.wasm` against the ABI
//! (`brume_module_abi`) and copies it to `<repo>/target/modules/<package>.wasm`, where the
//! wasm host's tests and the README's demo load them from.
//!
//! The check reads the binary, not the sources: the `brume-manifest` custom section must be
//! there once and parse as a `Manifest` for this ABI version with the package's name; the
//! ABI's exports and `memory` must be exported with the right signatures; and the only
//! imports allowed are `brume.history` and `brume.log` (a stray `wasi_snapshot_preview1` or
//! `__wbindgen_*` import means a dependency pulled in a runtime the host does not provide).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use brume_module_abi::{ABI_VERSION, MANIFEST_SECTION, Manifest, exports, imports};
use wasmparser::{ExternalKind, FuncType, Parser, Payload, TypeRef, ValType};

/// The Rust target modules are built for.
pub const TARGET: &str = "wasm32-unknown-unknown";

/// Builds, checks and copies every example module; prints a size table.
pub fn build(root: &Path) -> Result<()> {
    let examples = root.join("modules/examples");
    let out_dir = root.join("target/modules");
    ensure_target()?;

    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(&cargo)
        .args(["build", "--release", "--locked", "--target", TARGET])
        .current_dir(&examples)
        .status()
        .with_context(|| format!("running cargo build in {}", examples.display()))?;
    if !status.success() {
        bail!("building the modules in {} failed ({status})", examples.display());
    }

    let target_dir = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => std::env::current_dir()?.join(d),
        None => examples.join("target"),
    };
    let built = target_dir.join(TARGET).join("release");
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;

    let mut failures = Vec::new();
    let mut rows = Vec::new();
    for package in packages(&examples)? {
        let src = built.join(format!("{}.wasm", package.replace('-', "_")));
        let bytes = std::fs::read(&src).with_context(|| format!("reading {}", src.display()))?;
        match check(&bytes, &package) {
            Ok(m) => {
                let dst = out_dir.join(format!("{package}.wasm"));
                std::fs::write(&dst, &bytes).with_context(|| format!("writing {}", dst.display()))?;
                rows.push((dst, bytes.len(), m));
            }
            Err(e) => failures.push(format!("{}: {e:#}", src.display())),
        }
    }
    if !failures.is_empty() {
        bail!("{} module(s) fail the ABI check:\n  {}", failures.len(), failures.join("\n  "));
    }
    println!("{:<44} {:>10}  manifest", "module", "bytes");
    for (path, size, m) in rows {
        let rel = path.strip_prefix(root).unwrap_or(&path);
        println!("{:<44} {:>10}  {} {} -> {:?}", rel.display(), size, m.name, m.version, m.outputs);
    }
    Ok(())
}

/// Makes sure the wasm target's standard library is installed: installs it with rustup when
/// rustup is there, otherwise fails saying what to install.
fn ensure_target() -> Result<()> {
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let sysroot =
        Command::new(&rustc).args(["--print", "sysroot"]).output().context("running rustc --print sysroot")?;
    let sysroot = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim());
    if sysroot.join("lib/rustlib").join(TARGET).exists() {
        return Ok(());
    }
    eprintln!("the {TARGET} target is not installed; running `rustup target add {TARGET}`");
    match Command::new("rustup").args(["target", "add", TARGET]).status() {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => bail!("`rustup target add {TARGET}` failed ({s}); install the target and rerun"),
        Err(e) => bail!(
            "the Rust target {TARGET} is not installed (no {}) and rustup cannot be run ({e}): \
             install the target's standard library for this toolchain",
            sysroot.join("lib/rustlib").join(TARGET).display()
        ),
    }
}

/// The packages of the examples workspace: its directories holding a Cargo.toml, sorted.
fn packages(examples: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(examples).with_context(|| format!("reading {}", examples.display()))? {
        let path = entry?.path();
        if path.join("Cargo.toml").is_file() {
            names.push(path.file_name().expect("a directory entry has a name").to_string_lossy().into_owned());
        }
    }
    names.sort();
    if names.is_empty() {
        bail!("no module crates in {}", examples.display());
    }
    Ok(names)
}

/// What a module must export: name and signature (params, results).
fn required_exports() -> [(&'static str, &'static [ValType], &'static [ValType]); 6] {
    use ValType::{I32, I64};
    [
        (exports::ABI_VERSION, &[], &[I32]),
        (exports::ALLOC, &[I32], &[I32]),
        (exports::INIT, &[I32, I32], &[I64]),
        (exports::PROCESS, &[I32, I32], &[I64]),
        (exports::SAVE_STATE, &[], &[I64]),
        (exports::LOAD_STATE, &[I32, I32], &[I64]),
    ]
}

/// What a module may import: name and signature.
fn allowed_imports() -> [(&'static str, &'static [ValType], &'static [ValType]); 2] {
    use ValType::{I32, I64};
    [(imports::HISTORY, &[I32, I32], &[I64]), (imports::LOG, &[I32, I32, I32], &[])]
}

fn sig_is(ty: &FuncType, params: &[ValType], results: &[ValType]) -> bool {
    ty.params() == params && ty.results() == results
}

/// Checks a built module against the ABI; returns its manifest.
pub fn check(wasm: &[u8], package: &str) -> Result<Manifest> {
    let mut types: Vec<Option<FuncType>> = Vec::new();
    let mut funcs: Vec<u32> = Vec::new(); // type index per function index (imports first)
    let mut manifests = Vec::new();
    let mut exported = Vec::new(); // (name, kind, index)
    let mut problems = Vec::new();
    for payload in Parser::new(0).parse_all(wasm) {
        match payload.context("not a valid wasm binary")? {
            Payload::TypeSection(r) => {
                for group in r {
                    for sub in group?.into_types() {
                        types.push(match &sub.composite_type.inner {
                            wasmparser::CompositeInnerType::Func(f) => Some(f.clone()),
                            _ => None,
                        });
                    }
                }
            }
            Payload::ImportSection(r) => {
                for import in r.into_imports() {
                    let import = import?;
                    let allowed = allowed_imports();
                    let ok = match import.ty {
                        TypeRef::Func(t) | TypeRef::FuncExact(t) => {
                            funcs.push(t);
                            import.module == imports::MODULE
                                && allowed.iter().any(|(n, p, r)| {
                                    *n == import.name
                                        && types
                                            .get(t as usize)
                                            .and_then(Option::as_ref)
                                            .is_some_and(|f| sig_is(f, p, r))
                                })
                        }
                        _ => false,
                    };
                    if !ok {
                        problems.push(format!(
                            "imports {}.{} ({:?}); only brume.history (i32, i32) -> i64 and brume.log (i32, i32, i32) are provided",
                            import.module, import.name, import.ty
                        ));
                    }
                }
            }
            Payload::FunctionSection(r) => {
                for t in r {
                    funcs.push(t?);
                }
            }
            Payload::ExportSection(r) => {
                for e in r {
                    let e = e?;
                    exported.push((e.name.to_owned(), e.kind, e.index));
                }
            }
            Payload::CustomSection(c) if c.name() == MANIFEST_SECTION => manifests.push(c.data().to_vec()),
            _ => {}
        }
    }

    for (name, params, results) in required_exports() {
        match exported.iter().find(|(n, _, _)| n == name) {
            None => problems.push(format!("does not export {name}")),
            Some((_, kind, index)) => {
                let ty = (matches!(kind, ExternalKind::Func | ExternalKind::FuncExact))
                    .then(|| funcs.get(*index as usize))
                    .flatten()
                    .and_then(|t| types.get(*t as usize))
                    .and_then(Option::as_ref);
                if !ty.is_some_and(|f| sig_is(f, params, results)) {
                    problems
                        .push(format!("exports {name} as {kind:?} {ty:?}, want a function {params:?} -> {results:?}"));
                }
            }
        }
    }
    if !exported.iter().any(|(n, k, _)| n == "memory" && *k == ExternalKind::Memory) {
        problems.push("does not export its memory as `memory`".into());
    }

    let manifest = match manifests.as_slice() {
        [one] => match Manifest::from_json(one) {
            Ok(m) => {
                if m.abi_version != ABI_VERSION {
                    problems
                        .push(format!("manifest abi_version is {}, the ABI is version {ABI_VERSION}", m.abi_version));
                }
                if m.name != package {
                    problems.push(format!("manifest name is {:?}, the package is {package:?}", m.name));
                }
                Some(m)
            }
            Err(e) => {
                problems.push(format!("the {MANIFEST_SECTION} section is not a valid manifest: {e}"));
                None
            }
        },
        [] => {
            problems
                .push(format!("has no {MANIFEST_SECTION} custom section (export it with brume_module_sdk::export!)"));
            None
        }
        many => {
            problems.push(format!("has {} {MANIFEST_SECTION} sections, want one", many.len()));
            None
        }
    };
    match manifest {
        Some(m) if problems.is_empty() => Ok(m),
        _ => bail!("{}", problems.join("; ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal valid module by hand: the ABI's exports as stubs, a memory and a manifest.
    fn module(manifest: Option<&str>, extra_import: Option<(&str, &str)>) -> Vec<u8> {
        // type 0: () -> i32, 1: (i32) -> i32, 2: (i32,i32) -> i64, 3: () -> i64, 4: () -> ()
        let mut m = b"\0asm\x01\0\0\0".to_vec();
        let section = |m: &mut Vec<u8>, id: u8, body: Vec<u8>| {
            m.push(id);
            m.push(body.len() as u8);
            m.extend(body);
        };
        section(
            &mut m,
            1,
            vec![
                5, 0x60, 0, 1, 0x7f, 0x60, 1, 0x7f, 1, 0x7f, 0x60, 2, 0x7f, 0x7f, 1, 0x7e, 0x60, 0, 1, 0x7e, 0x60, 0, 0,
            ],
        );
        let mut nimports = 0;
        if let Some((module, name)) = extra_import {
            let mut b = vec![1, module.len() as u8];
            b.extend(module.as_bytes());
            b.push(name.len() as u8);
            b.extend(name.as_bytes());
            b.extend([0, 4]);
            section(&mut m, 2, b);
            nimports = 1;
        }
        section(&mut m, 3, vec![6, 0, 1, 2, 2, 3, 2]);
        section(&mut m, 5, vec![1, 0, 1]);
        let mut ex = vec![7];
        let names =
            ["brume_abi_version", "brume_alloc", "brume_init", "brume_process", "brume_save_state", "brume_load_state"];
        for (i, n) in names.iter().enumerate() {
            ex.push(n.len() as u8);
            ex.extend(n.as_bytes());
            ex.extend([0, (i + nimports) as u8]);
        }
        ex.extend([6, b'm', b'e', b'm', b'o', b'r', b'y', 2, 0]);
        section(&mut m, 7, ex);
        // bodies: i32.const 0 / i64.const 0, end
        let bodies: [&[u8]; 6] = [&[0x41, 0], &[0x41, 0], &[0x42, 0], &[0x42, 0], &[0x42, 0], &[0x42, 0]];
        let mut code = vec![6];
        for b in bodies {
            code.push(b.len() as u8 + 2);
            code.push(0);
            code.extend(b);
            code.push(0x0b);
        }
        section(&mut m, 10, code);
        if let Some(json) = manifest {
            let mut b = vec![MANIFEST_SECTION.len() as u8];
            b.extend(MANIFEST_SECTION.as_bytes());
            b.extend(json.as_bytes());
            section(&mut m, 0, b);
        }
        m
    }

    const MANIFEST: &str = r#"{"name":"t","version":"1","abi_version":1,"inputs":["a"],"outputs":["b"]}"#;

    #[test]
    fn accepts_a_complete_module() {
        assert_eq!(check(&module(Some(MANIFEST), None), "t").unwrap().name, "t");
    }

    #[test]
    fn names_each_problem() {
        let err = |wasm: Vec<u8>, pkg| format!("{:#}", check(&wasm, pkg).unwrap_err());
        assert_eq!(
            err(module(None, None), "t"),
            "has no brume-manifest custom section (export it with brume_module_sdk::export!)"
        );
        assert_eq!(err(module(Some(MANIFEST), None), "other"), "manifest name is \"t\", the package is \"other\"");
        assert_eq!(
            err(module(Some(MANIFEST), Some(("wasi_snapshot_preview1", "fd_write"))), "t"),
            "imports wasi_snapshot_preview1.fd_write (Func(4)); only brume.history (i32, i32) -> i64 and brume.log (i32, i32, i32) are provided"
        );
        assert!(err(module(Some(MANIFEST), Some(("brume", "log"))), "t").starts_with("imports brume.log (Func(4))"));
        let v2 = MANIFEST.replace("\"abi_version\":1", "\"abi_version\":2");
        assert_eq!(err(module(Some(&v2), None), "t"), "manifest abi_version is 2, the ABI is version 1");
        assert!(err(b"not wasm".to_vec(), "t").starts_with("not a valid wasm binary"));
    }
}
