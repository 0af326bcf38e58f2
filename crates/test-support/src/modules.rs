//! The example WASM modules as test fixtures.

use std::path::PathBuf;

/// Path of an example module built by `cargo xtask build-modules` (`target/modules/`).
/// Panics, naming that command, if it is missing: a test must not pass without it.
pub fn built_module(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/modules").join(format!("{name}.wasm"));
    assert!(p.exists(), "{} is missing: run `cargo xtask build-modules` first", p.display());
    p
}

/// The bytes of [`built_module`].
pub fn built_module_bytes(name: &str) -> Vec<u8> {
    let p = built_module(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

/// Another release of a module: the `"version": "<from>"` of the manifest in its
/// `brume-manifest` custom section replaced by `to`, which must have the same length so
/// that no section size changes. The result is a valid module with other bytes (another
/// sha256), as a publisher's next build would be. Panics if the section or the version
/// is not found.
pub fn with_version(wasm: &[u8], from: &str, to: &str) -> Vec<u8> {
    assert_eq!(from.len(), to.len(), "versions must have the same length");
    // A custom section's content starts with its name (length-prefixed); the manifest
    // JSON follows.
    let section = b"\x0ebrume-manifest{";
    let start = find(wasm, section, 0).expect("no brume-manifest section");
    let needle = format!("\"version\": \"{from}\"").into_bytes();
    let at = find(wasm, &needle, start)
        .unwrap_or_else(|| panic!("the manifest has no {}", String::from_utf8_lossy(&needle)));
    let mut out = wasm.to_vec();
    let v = at + needle.len() - 1 - from.len();
    out[v..v + to.len()].copy_from_slice(to.as_bytes());
    out
}

fn find(haystack: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    haystack[from..].windows(needle.len()).position(|w| w == needle).map(|i| i + from)
}

/// A module in WebAssembly text that implements the Brume ABI with no state and the given
/// body for `brume_process` (`(param i32 i32) (result i64)`), e.g. `unreachable` (traps)
/// or `(loop $l (br $l)) (i64.const 0)` (never returns). `manifest` is the JSON of the
/// `brume-manifest` section. Parse it with the `wat` crate.
pub fn stub_module_wat(manifest: &str, process_body: &str) -> String {
    let manifest = manifest.replace('\\', "\\\\").replace('"', "\\\"");
    format!(
        r#"(module
  (@custom "brume-manifest" "{manifest}")
  (memory (export "memory") 1)
  (global $next (mut i32) (i32.const 1024))
  (func (export "brume_abi_version") (result i32) (i32.const 1))
  (func (export "brume_alloc") (param $len i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $next))
    (global.set $next (i32.add (global.get $next) (local.get $len)))
    (local.get $p))
  ;; CallResult::Ok(()) = [0]; CallResult::Ok(Vec<u8>) empty = [0, 0]
  (data (i32.const 16) "\00\00")
  (func (export "brume_init") (param i32 i32) (result i64) (i64.const 0x0000001000000001))
  (func (export "brume_save_state") (result i64) (i64.const 0x0000001000000002))
  (func (export "brume_load_state") (param i32 i32) (result i64) (i64.const 0x0000001000000001))
  (func (export "brume_process") (param i32 i32) (result i64) {process_body})
)"#
    )
}
