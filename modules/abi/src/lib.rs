//! The interface between the Brume agent (host) and WASM processing modules (guests).
//!
//! One definition, used by both sides: the agent's wasm host (`crates/wasm-host`) and the
//! module SDK (`modules/sdk`). A module is a **core WebAssembly module** (built for
//! `wasm32-unknown-unknown`) that talks to the host through a handful of exported and
//! imported functions and postcard-encoded messages in its linear memory. See
//! ARCHITECTURE.md for why this and not the component model.
//!
//! # Calling convention
//!
//! * Byte buffers cross the boundary as `(ptr: u32, len: u32)` pairs in the guest's memory.
//!   A function returning a buffer returns it packed into a `u64` as `ptr << 32 | len`
//!   ([`pack`], [`unpack`]). The guest owns that buffer until the host's next call.
//! * The host writes inputs into memory it obtained from the guest's [`exports::ALLOC`].
//! * Every message is postcard-encoded; every message type here is versioned by
//!   [`ABI_VERSION`] as a whole: a change of any message is a new ABI version.
//!
//! # Guest exports
//!
//! | name | signature | what |
//! |---|---|---|
//! | [`exports::ABI_VERSION`] | `() -> i32` | the ABI version the module was built for |
//! | [`exports::ALLOC`] | `(len: i32) -> i32` | allocate `len` bytes for the host to write into |
//! | [`exports::INIT`] | `(ptr: i32, len: i32) -> i64` | `InitRequest` in, `CallResult<()>` out |
//! | [`exports::PROCESS`] | `(ptr: i32, len: i32) -> i64` | [`Input`] in, `CallResult<Output>` out |
//! | [`exports::SAVE_STATE`] | `() -> i64` | `CallResult<Vec<u8>>` out: the module's state |
//! | [`exports::LOAD_STATE`] | `(ptr: i32, len: i32) -> i64` | state bytes in, `CallResult<()>` out |
//!
//! # Host imports (module [`imports::MODULE`])
//!
//! | name | signature | what |
//! |---|---|---|
//! | [`imports::HISTORY`] | `(ptr: i32, len: i32) -> i64` | [`HistoryQuery`] in, [`HistoryResult`] out |
//! | [`imports::LOG`] | `(level: i32, ptr: i32, len: i32)` | a UTF-8 log line (rate-limited by the host) |
//!
//! Modules get nothing else: no WASI, no clock, no filesystem, no network.

use brume_protocol::Field;
use serde::{Deserialize, Serialize};

/// The ABI version this crate defines. The host refuses modules built for another one.
pub const ABI_VERSION: u32 = 1;

/// Name of the custom section holding the module's [`Manifest`] as JSON.
pub const MANIFEST_SECTION: &str = "brume-manifest";

/// Names of the functions a module exports.
pub mod exports {
    /// `() -> i32`: the module's ABI version.
    pub const ABI_VERSION: &str = "brume_abi_version";
    /// `(len: i32) -> i32`: allocates a buffer for the host.
    pub const ALLOC: &str = "brume_alloc";
    /// `(ptr: i32, len: i32) -> i64`: initialises the module with its deploy-time config.
    pub const INIT: &str = "brume_init";
    /// `(ptr: i32, len: i32) -> i64`: processes a batch of readings.
    pub const PROCESS: &str = "brume_process";
    /// `() -> i64`: returns the module's state for persisting.
    pub const SAVE_STATE: &str = "brume_save_state";
    /// `(ptr: i32, len: i32) -> i64`: restores persisted state.
    pub const LOAD_STATE: &str = "brume_load_state";
}

/// Names of the functions the host provides.
pub mod imports {
    /// The import module name.
    pub const MODULE: &str = "brume";
    /// `(ptr: i32, len: i32) -> i64`: queries the local history.
    pub const HISTORY: &str = "history";
    /// `(level: i32, ptr: i32, len: i32)`: logs a line.
    pub const LOG: &str = "log";
}

/// Packs a guest buffer into the `u64` returned across the boundary.
pub fn pack(ptr: u32, len: u32) -> u64 {
    (u64::from(ptr) << 32) | u64::from(len)
}

/// Unpacks a `u64` returned across the boundary into `(ptr, len)`.
pub fn unpack(v: u64) -> (u32, u32) {
    ((v >> 32) as u32, v as u32)
}

/// What a module declares about itself, embedded as JSON in the [`MANIFEST_SECTION`]
/// custom section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Module name, e.g. `threshold`.
    pub name: String,
    /// Module version (semver), e.g. `1.2.0`.
    pub version: String,
    /// ABI version the module was built for.
    pub abi_version: u32,
    /// Input stream patterns (MQTT-style: `sensors/#`, `line1/+/temp`).
    pub inputs: Vec<String>,
    /// Names of the streams the module writes.
    pub outputs: Vec<String>,
    /// Budgets the module asks for; the agent's config may lower or raise them.
    #[serde(default)]
    pub budgets: Budgets,
}

/// Resource budgets of a module. `None` means the host's default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Budgets {
    /// Cap on linear memory, in bytes.
    pub memory_bytes: Option<u64>,
    /// Fuel (roughly, wasm instructions) per processed batch.
    pub fuel_per_batch: Option<u64>,
    /// Most output readings per processed batch.
    pub max_output_readings: Option<u32>,
}

impl Manifest {
    /// Parses the manifest JSON of a custom section.
    pub fn from_json(bytes: &[u8]) -> Result<Manifest, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

/// A reading as modules see it: decoded fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModuleReading {
    /// Stream name.
    pub stream: String,
    /// Timestamp, ns since the Unix epoch.
    pub ts_ns: i64,
    /// Fields.
    pub fields: Vec<Field>,
}

impl ModuleReading {
    /// The value of a numeric field, if present and numeric (integers are converted).
    pub fn number(&self, name: &str) -> Option<f64> {
        self.fields.iter().find(|f| f.name == name).and_then(|f| match f.value {
            brume_protocol::Value::F64(v) => Some(v),
            brume_protocol::Value::I64(v) => Some(v as f64),
            _ => None,
        })
    }
}

/// Deploy-time initialisation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InitRequest {
    /// The module's config block from the agent's config, as JSON text (`{}` if none).
    pub config_json: String,
}

/// A batch of input readings, in order per stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Input {
    /// The readings.
    pub readings: Vec<ModuleReading>,
}

/// Log levels of [`imports::LOG`].
pub mod level {
    /// Error.
    pub const ERROR: i32 = 1;
    /// Warning.
    pub const WARN: i32 = 2;
    /// Information.
    pub const INFO: i32 = 3;
    /// Debug.
    pub const DEBUG: i32 = 4;
}

/// What a module produced for one input batch.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Output {
    /// Output readings; their streams must be among the manifest's outputs.
    pub readings: Vec<ModuleReading>,
    /// Module metrics (name, value), exported by the agent as gauges.
    pub metrics: Vec<(String, f64)>,
}

/// Result of a guest call: `Ok` or an error message from the module.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CallResult<T> {
    /// Success.
    Ok(T),
    /// The module reports an error (the batch is counted as failed).
    Err(String),
}

/// A question about the local history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryQuery {
    /// The stream.
    pub stream: String,
    /// What to return.
    pub kind: HistoryKind,
}

/// Kinds of history queries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum HistoryKind {
    /// The last `n` readings before `before_ns` (exclusive), oldest first.
    LastN {
        /// How many (the host caps it).
        n: u32,
        /// Upper bound, exclusive.
        before_ns: i64,
    },
    /// Readings in `[from_ns, to_ns)`, oldest first, at most `limit` (the host caps it).
    Range {
        /// Lower bound, inclusive.
        from_ns: i64,
        /// Upper bound, exclusive.
        to_ns: i64,
        /// Most readings.
        limit: u32,
    },
    /// Aggregates of a numeric field over `[from_ns, to_ns)`.
    Aggregate {
        /// Lower bound, inclusive.
        from_ns: i64,
        /// Upper bound, exclusive.
        to_ns: i64,
        /// The numeric field.
        field: String,
    },
}

/// Aggregates over a window. `min`, `max`, `mean` are `None` when `count` is 0.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Aggregates {
    /// Readings with the field.
    pub count: u64,
    /// Minimum.
    pub min: Option<f64>,
    /// Maximum.
    pub max: Option<f64>,
    /// Arithmetic mean.
    pub mean: Option<f64>,
}

/// The host's answer to a [`HistoryQuery`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum HistoryResult {
    /// Readings, oldest first.
    Readings(Vec<ModuleReading>),
    /// Aggregates.
    Aggregates(Aggregates),
    /// The query was refused (unknown stream is not an error: it gives no readings).
    Err(String),
}

/// Encodes a message.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    postcard::to_stdvec(msg).expect("encoding to a Vec cannot fail")
}

/// Decodes a message, refusing trailing bytes.
pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, postcard::Error> {
    let (v, rest) = postcard::take_from_bytes(bytes)?;
    if rest.is_empty() { Ok(v) } else { Err(postcard::Error::DeserializeBadEncoding) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use brume_protocol::Value;

    #[test]
    fn pack_round_trips() {
        assert_eq!(unpack(pack(0xdead_beef, 17)), (0xdead_beef, 17));
        assert_eq!(unpack(pack(0, u32::MAX)), (0, u32::MAX));
    }

    #[test]
    fn manifest_json() {
        let m = Manifest::from_json(
            br#"{"name":"t","version":"1.0.0","abi_version":1,"inputs":["s/#"],"outputs":["o"],"budgets":{"memory_bytes":1048576}}"#,
        )
        .unwrap();
        assert_eq!(m.budgets.memory_bytes, Some(1 << 20));
        assert!(
            Manifest::from_json(br#"{"name":"t","version":"1","abi_version":1,"inputs":[],"outputs":[],"x":1}"#)
                .is_err()
        );
    }

    /// Golden bytes: the ABI is versioned as a whole; changing a message must bump
    /// ABI_VERSION. If this fails, you changed the wire format of modules.
    #[test]
    fn golden_bytes_input() {
        let input = Input {
            readings: vec![ModuleReading {
                stream: "s".into(),
                ts_ns: 1,
                fields: vec![Field { name: "v".into(), value: Value::Bool(true) }],
            }],
        };
        assert_eq!(encode(&input), [1, 1, b's', 2, 1, 1, b'v', 2, 1]);
        assert_eq!(decode::<Input>(&encode(&input)).unwrap(), input);
        let r: CallResult<Output> = CallResult::Err("x".into());
        assert_eq!(encode(&r), [1, 1, b'x']);
    }
}
