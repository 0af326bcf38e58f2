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
