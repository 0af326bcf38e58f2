//! The runtime behind the export macros: byte-level entry points shared by the wasm
//! exports and the native [`crate::testing::Harness`], the buffer registry, and (on wasm32
//! only) the host imports. Not a stable API: use the macros.
//!
//! # Buffer ownership
//!
//! * `brume_alloc(len)` allocates a zeroed `Box<[u8]>` and records it in a registry keyed by
//!   address. The host writes a call's input into it and passes `(ptr, len)` to the call,
//!   which takes the buffer back out of the registry and frees it when the call returns.
//!   The host's answer to a `brume.history` import works the same way.
//! * A `(ptr, len)` that the registry does not hold is an error answer, never a read of
//!   arbitrary memory: this is why the guest side needs no `unsafe` for buffers.
//! * A buffer the host allocated but never handed back cannot be told apart from garbage
//!   later, so every call frees whatever is still registered once it has taken its input:
//!   the registry never holds more than one call's worth of buffers.
//! * A call's reply is kept in one reply slot until the next call replaces it; the host
//!   copies it out before calling again (ABI: "the guest owns that buffer until the host's
//!   next call").

use std::cell::RefCell;

use brume_module_abi::{CallResult, InitRequest, Input, Output, decode, encode, pack};

use crate::{Context, Emitter, History, Module, check_manifest};

thread_local! {
    /// Buffers handed to the host by `brume_alloc` and not yet returned to a call.
    static BUFFERS: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
    /// The last call's reply, alive until the next call.
    static REPLY: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Allocates a zeroed buffer of `len` bytes for the host and returns its address.
pub fn alloc(len: usize) -> usize {
    let buf = vec![0u8; len].into_boxed_slice();
    let addr = buf.as_ptr() as usize;
    BUFFERS.with_borrow_mut(|b| b.push(buf));
    addr
}

/// Takes back a buffer from [`alloc`] by its address and length; `None` if the registry
/// does not hold exactly that buffer. A zero length is always an empty buffer.
pub fn take(addr: usize, len: usize) -> Option<Box<[u8]>> {
    if len == 0 {
        return Some(Box::default());
    }
    BUFFERS.with_borrow_mut(|b| {
        let i = b.iter().position(|buf| buf.as_ptr() as usize == addr && buf.len() == len)?;
        Some(b.swap_remove(i))
    })
}

/// Number of buffers handed out and not taken back (for tests).
pub fn outstanding() -> usize {
    BUFFERS.with_borrow(Vec::len)
}

/// Runs an export taking `(ptr, len)` input: takes the input buffer, frees stale ones,
/// runs `f` and returns its reply packed for the host.
pub fn call_with_input(ptr: i32, len: i32, f: impl FnOnce(&[u8]) -> Vec<u8>) -> i64 {
    let input = take(ptr as u32 as usize, len as u32 as usize);
    BUFFERS.with_borrow_mut(Vec::clear);
    let out = match input {
        Some(buf) => f(&buf),
        None => {
            encode(&CallResult::<()>::Err(format!("input buffer ({ptr:#x}, {len}) was not allocated by brume_alloc")))
        }
    };
    reply(out)
}

/// Stores a reply in the reply slot and returns it packed as `ptr << 32 | len`.
pub fn reply(bytes: Vec<u8>) -> i64 {
    REPLY.with_borrow_mut(|r| {
        *r = bytes;
        pack(r.as_ptr() as usize as u32, r.len() as u32) as i64
    })
}

/// Copies a manifest string into the array the `brume-manifest` custom section holds.
pub const fn manifest_bytes<const N: usize>(s: &str) -> [u8; N] {
    let b = s.as_bytes();
    assert!(b.len() == N, "manifest length mismatch");
    let mut out = [0u8; N];
    let mut i = 0;
    while i < N {
        out[i] = b[i];
        i += 1;
    }
    out
}

/// One module instance with its manifest: the byte-level calls of the ABI.
pub struct Runtime<M> {
    module: M,
    /// The manifest's output streams, or why the manifest is invalid (then every call fails).
    outputs: Result<Vec<String>, String>,
}

impl<M: Module> Runtime<M> {
    /// A fresh instance (`M::default()`) for a module with this manifest JSON.
    pub fn new(manifest_json: &str) -> Self {
        Runtime { module: M::default(), outputs: check_manifest(manifest_json).map(|m| m.outputs) }
    }

    /// The module.
    pub fn module(&self) -> &M {
        &self.module
    }

    /// `brume_init`: `InitRequest` in, `CallResult<()>` out.
    pub fn init(&mut self, input: &[u8]) -> Vec<u8> {
        let r = (|| {
            self.outputs.as_ref().map_err(Clone::clone)?;
            let req: InitRequest = decode(input).map_err(|e| format!("cannot decode InitRequest: {e}"))?;
            let text = if req.config_json.trim().is_empty() { "{}" } else { req.config_json.as_str() };
            let config: serde_json::Value =
                serde_json::from_str(text).map_err(|e| format!("config is not valid JSON: {e}"))?;
            self.module.init(&config)
        })();
        encode(&to_call_result(r))
    }

    /// `brume_process`: `Input` in, `CallResult<Output>` out.
    pub fn process(&mut self, input: &[u8], history: &mut dyn History) -> Vec<u8> {
        let r = (|| -> Result<Output, String> {
            let outputs = self.outputs.as_ref().map_err(Clone::clone)?;
            let input: Input = decode(input).map_err(|e| format!("cannot decode Input: {e}"))?;
            let mut out = Emitter::new(outputs);
            self.module.process(&input.readings, &mut out, &mut Context::new(history))?;
            out.finish()
        })();
        encode(&to_call_result(r))
    }

    /// `brume_save_state`: `CallResult<Vec<u8>>` out.
    pub fn save_state(&self) -> Vec<u8> {
        encode(&CallResult::Ok(self.module.save_state()))
    }

    /// `brume_load_state`: state bytes in, `CallResult<()>` out. An empty state is a fresh
    /// start and does not reach the module.
    pub fn load_state(&mut self, state: &[u8]) -> Vec<u8> {
        let r = if state.is_empty() { Ok(()) } else { self.module.load_state(state) };
        encode(&to_call_result(r))
    }
}

fn to_call_result<T>(r: Result<T, String>) -> CallResult<T> {
    match r {
        Ok(v) => CallResult::Ok(v),
        Err(e) => CallResult::Err(e),
    }
}

#[cfg(target_arch = "wasm32")]
pub use host::HostHistory;

#[cfg(target_arch = "wasm32")]
mod host {
    use brume_module_abi::{HistoryQuery, HistoryResult, decode, encode, unpack};

    use crate::{History, Level};

    #[link(wasm_import_module = "brume")]
    unsafe extern "C" {
        #[link_name = "history"]
        fn brume_history(ptr: i32, len: i32) -> i64;
        #[link_name = "log"]
        fn brume_log(level: i32, ptr: i32, len: i32);
    }

    /// [`History`] through the `brume` host imports.
    pub struct HostHistory;

    impl History for HostHistory {
        fn query(&mut self, query: &HistoryQuery) -> HistoryResult {
            let q = encode(query);
            // SAFETY: the host reads `len` bytes at `ptr`, which `q` owns for the whole call;
            // its answer comes back as a buffer from brume_alloc, checked by `take`.
            let packed = unsafe { brume_history(q.as_ptr() as usize as i32, q.len() as i32) } as u64;
            let (ptr, len) = unpack(packed);
            match super::take(ptr as usize, len as usize) {
                Some(buf) if !buf.is_empty() => decode(&buf)
                    .unwrap_or_else(|e| HistoryResult::Err(format!("cannot decode the host's HistoryResult: {e}"))),
                _ => HistoryResult::Err(format!(
                    "the host answered with a buffer ({ptr:#x}, {len}) not from brume_alloc"
                )),
            }
        }

        fn log(&mut self, level: Level, msg: &str) {
            // SAFETY: the host reads `len` bytes at `ptr`, which `msg` owns for the whole call.
            unsafe { brume_log(level.to_abi(), msg.as_ptr() as usize as i32, msg.len() as i32) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_takes_back_only_what_it_gave() {
        let a = alloc(8);
        let b = alloc(3);
        assert_eq!(outstanding(), 2);
        assert!(take(a, 7).is_none(), "wrong length");
        assert!(take(a + 1, 8).is_none(), "wrong address");
        assert_eq!(take(a, 8).unwrap().len(), 8);
        assert!(take(a, 8).is_none(), "taken twice");
        assert_eq!(take(0, 0).unwrap().len(), 0, "empty input needs no buffer");
        assert_eq!(take(b, 3).unwrap().len(), 3);
        assert_eq!(outstanding(), 0);
    }

    #[test]
    fn manifest_bytes_copies() {
        const M: &str = "{\"a\":1}";
        const B: [u8; M.len()] = manifest_bytes::<{ M.len() }>(M);
        assert_eq!(&B, M.as_bytes());
    }
}
