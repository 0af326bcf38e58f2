//! Policy tests of the wasm host with hand-written WAT guests (P12).
//!
//! Each guest implements the ABI by hand: results are pre-encoded in the test with
//! `brume_module_abi::encode` and embedded as data segments, so the tests need no
//! toolchain for wasm32. Every failure test then checks that a healthy instance of
//! another module on the same engine still processes a batch: a failing module must never
//! take the others down.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use brume_module_abi::{
    self as abi, CallResult, HistoryKind, HistoryQuery, HistoryResult, Input, ModuleReading, Output, pack,
};
use brume_protocol::{Field, Value};
use brume_wasm_host::{
    EngineConfig, HistoryProvider, LimitOverrides, Limits, LoadError, LoadedModule, ModuleError, ModuleInstance,
    NoHistory, OutputCap, WasmEngine,
};

// ---------------------------------------------------------------------------------------
// Guest builder

/// Where the test data segment starts; below it sit the fixed init/save results.
const DATA: u32 = 1024;

/// A hand-written guest. The defaults give a healthy module whose `brume_process`
/// returns `process_result`.
struct Guest {
    /// Manifest JSON, or `None` for no custom section.
    manifest: Option<String>,
    /// What `brume_abi_version` returns.
    abi_version: u32,
    /// Import declarations.
    imports: String,
    /// Standard exports to leave out.
    skip: Vec<&'static str>,
    /// Extra definitions (replacement exports, helper functions).
    extra: String,
    /// Body of `brume_process (param i32 i32) (result i64)`, locals first.
    process: String,
    /// Bytes placed at `DATA`.
    data: Vec<u8>,
    /// Initial memory, pages.
    pages: u32,
}

fn manifest_json(name: &str, abi_version: u32, outputs: &[&str]) -> String {
    serde_json::json!({
        "name": name, "version": "1.0.0", "abi_version": abi_version,
        "inputs": ["in/#"], "outputs": outputs,
    })
    .to_string()
}

/// A WAT string literal with every byte escaped.
fn wat_bytes(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("\\{b:02x}")).collect()
}

impl Guest {
    /// A guest whose `brume_process` returns the given encoded bytes from its data segment.
    fn returning(name: &str, result_bytes: Vec<u8>) -> Guest {
        let len = result_bytes.len() as u32;
        Guest {
            manifest: Some(manifest_json(name, abi::ABI_VERSION, &["out"])),
            abi_version: abi::ABI_VERSION,
            imports: String::new(),
            skip: Vec::new(),
            extra: String::new(),
            process: format!("(i64.const {})", pack(DATA, len)),
            data: result_bytes,
            pages: 1,
        }
    }

    /// A guest whose `brume_process` runs `body` (which must leave an i64 on the stack).
    fn running(name: &str, body: &str) -> Guest {
        Guest { process: body.to_string(), ..Guest::returning(name, Vec::new()) }
    }

    fn wat(&self) -> String {
        let manifest = match &self.manifest {
            Some(m) => format!("(@custom \"brume-manifest\" \"{}\")", wat_bytes(m.as_bytes())),
            None => String::new(),
        };
        let ok_unit = wat_bytes(&abi::encode(&CallResult::<()>::Ok(())));
        let saved = abi::encode(&CallResult::<Vec<u8>>::Ok(vec![1, 2, 3]));
        let mut exports = vec![
            (
                abi::exports::ABI_VERSION,
                format!("(func (export \"brume_abi_version\") (result i32) (i32.const {}))", self.abi_version),
            ),
            (
                abi::exports::ALLOC,
                // A bump allocator that grows memory when needed and never frees: enough
                // for the few batches of a test.
                r#"(func (export "brume_alloc") (param $len i32) (result i32) (local $p i32)
                    (local.set $p (global.get $heap))
                    (global.set $heap (i32.add (global.get $heap) (local.get $len)))
                    (if (i32.gt_u (global.get $heap) (i32.mul (memory.size) (i32.const 65536)))
                      (then (drop (memory.grow
                        (i32.sub (i32.add (i32.shr_u (global.get $heap) (i32.const 16)) (i32.const 1)) (memory.size))))))
                    (local.get $p))"#
                    .to_string(),
            ),
            (abi::exports::INIT, format!("(func (export \"brume_init\") (param i32 i32) (result i64) (i64.const {}))", pack(16, 1))),
            (
                abi::exports::PROCESS,
                format!("(func (export \"brume_process\") (param i32 i32) (result i64) {})", self.process),
            ),
            (
                abi::exports::SAVE_STATE,
                format!("(func (export \"brume_save_state\") (result i64) (i64.const {}))", pack(32, saved.len() as u32)),
            ),
            (
                abi::exports::LOAD_STATE,
                format!("(func (export \"brume_load_state\") (param i32 i32) (result i64) (i64.const {}))", pack(16, 1)),
            ),
        ];
        exports.retain(|(name, _)| !self.skip.contains(name));
        let exports: Vec<String> = exports.into_iter().map(|(_, f)| f).collect();
        format!(
            r#"(module
                {manifest}
                {imports}
                (memory (export "memory") {pages})
                (global $heap (mut i32) (i32.const 8192))
                {exports}
                {extra}
                (data (i32.const 16) "{ok_unit}")
                (data (i32.const 32) "{saved}")
                (data (i32.const {DATA}) "{data}"))"#,
            imports = self.imports,
            pages = self.pages,
            exports = exports.join("\n"),
            extra = self.extra,
            saved = wat_bytes(&saved),
            data = wat_bytes(&self.data),
        )
    }

    fn bytes(&self) -> Vec<u8> {
        wat::parse_str(self.wat()).unwrap_or_else(|e| panic!("bad test WAT: {e}\n{}", self.wat()))
    }
}

// ---------------------------------------------------------------------------------------
// Helpers

fn engine() -> WasmEngine {
    WasmEngine::new(EngineConfig::default()).unwrap()
}

fn reading(stream: &str, ts_ns: i64, v: f64) -> ModuleReading {
    ModuleReading { stream: stream.into(), ts_ns, fields: vec![Field { name: "v".into(), value: Value::F64(v) }] }
}

fn input() -> Input {
    Input { readings: vec![reading("in/a", 1, 20.0), reading("in/b", 2, 30.0)] }
}

fn healthy_output() -> Output {
    Output { readings: vec![reading("out", 42, 1.5)], metrics: vec![("m".into(), 2.0)] }
}

fn ok_output(out: &Output) -> Vec<u8> {
    abi::encode(&CallResult::Ok(out.clone()))
}

fn load(engine: &WasmEngine, guest: &Guest) -> LoadedModule {
    engine.load(&guest.bytes()).unwrap()
}

fn instantiate(engine: &WasmEngine, guest: &Guest, limits: Limits) -> ModuleInstance {
    load(engine, guest).instantiate(engine, limits, Arc::new(NoHistory), "{}").unwrap()
}

/// A second, healthy module on the same engine still processes a batch correctly.
fn assert_others_unaffected(engine: &WasmEngine) {
    let guest = Guest::returning("healthy", ok_output(&healthy_output()));
    let mut inst = instantiate(engine, &guest, Limits::default());
    assert_eq!(inst.process(&input()).unwrap().output, healthy_output());
}

/// Runs one batch expecting a poisoning failure, checks the instance then refuses with
/// `Poisoned`, and that other modules are unaffected.
fn fails_and_poisons(engine: &WasmEngine, inst: &mut ModuleInstance) -> ModuleError {
    let err = inst.process(&input()).unwrap_err();
    assert!(inst.is_poisoned(), "{err} should poison");
    assert!(matches!(inst.process(&input()), Err(ModuleError::Poisoned)));
    assert!(matches!(inst.save_state(), Err(ModuleError::Poisoned)));
    assert_others_unaffected(engine);
    err
}

/// Runs one batch expecting a failure that leaves the instance usable.
fn fails_without_poisoning(engine: &WasmEngine, inst: &mut ModuleInstance) -> ModuleError {
    let err = inst.process(&input()).unwrap_err();
    assert!(!inst.is_poisoned(), "{err} should not poison");
    assert_eq!(inst.save_state().unwrap(), [1, 2, 3], "instance still usable");
    assert_others_unaffected(engine);
    err
}

const INFINITE_LOOP: &str = "(loop $l (br $l)) (i64.const 0)";

// ---------------------------------------------------------------------------------------
// Happy path

#[test]
fn healthy_module_processes_saves_and_loads_state() {
    let engine = engine();
    let guest = Guest::returning("healthy", ok_output(&healthy_output()));
    let module = load(&engine, &guest);
    assert_eq!(module.manifest().name, "healthy");
    assert_eq!(module.manifest().outputs, ["out"]);
    assert_eq!(module.hash_hex().len(), 64);
    assert_eq!(module.hash(), load(&engine, &guest).hash(), "hash is of the bytes");
    assert_ne!(module.hash(), load(&engine, &Guest::returning("other", ok_output(&healthy_output()))).hash());

    let mut inst = module.instantiate(&engine, Limits::default(), Arc::new(NoHistory), "{}").unwrap();
    for _ in 0..3 {
        let outcome = inst.process(&input()).unwrap();
        assert_eq!(outcome.output, healthy_output());
        assert!(outcome.fuel_used > 0 && outcome.fuel_used < 10_000, "fuel {}", outcome.fuel_used);
        assert_eq!(outcome.stats, Default::default());
    }
    assert_eq!(inst.save_state().unwrap(), [1, 2, 3]);
    inst.load_state(&[1, 2, 3]).unwrap();
    inst.load_state(&[]).unwrap();
    assert!(!inst.is_poisoned());
}

/// A module compiled in one engine loads in another (as in the agent's compile child
/// process) and runs the same; bytes that are not a compiled module are refused with
/// `PrecompiledError`, and a bad `.wasm` beside good compiled code is still checked.
/// The hub compiles for devices with [`Precompiler`]: code for this machine's target
/// loads in an ordinary engine and runs the same as compiled here; code for another
/// architecture is refused by it with a clear error (never run); code for every target
/// names the wasmtime release [`ENGINE_VERSION`] says, so agents and hubs compare the
/// right string.
#[cfg(feature = "precompile")]
#[test]
fn precompiled_for_a_target_loads_there_only() {
    use brume_wasm_host::{ENGINE_VERSION, Precompiler, Target};
    let guest = Guest::returning("healthy", ok_output(&healthy_output()));
    let wasm = guest.bytes();
    let pc = Precompiler::new().unwrap();
    let host = Target::host().expect("tests run on a supported architecture");
    let engine = engine();
    // wasmtime's engine section: a format byte (0), the version's length, the version.
    let version = ENGINE_VERSION.strip_prefix("wasmtime-").unwrap();
    let mut marker = vec![0u8, version.len() as u8];
    marker.extend_from_slice(version.as_bytes());
    for target in Target::ALL {
        let code = pc.precompile(target, &wasm).unwrap();
        assert!(
            code.windows(marker.len()).any(|w| w == marker.as_slice()),
            "{target}: compiled code does not carry {ENGINE_VERSION}"
        );
        let loaded = engine.load_precompiled(&wasm, &code).unwrap();
        if target == host {
            let module = loaded.unwrap();
            let mut inst = module.instantiate(&engine, Limits::default(), Arc::new(NoHistory), "{}").unwrap();
            assert_eq!(inst.process(&input()).unwrap().output, healthy_output());
        } else {
            let err = loaded.unwrap_err().to_string();
            assert!(err.starts_with("precompiled module unusable: "), "{target}: {err}");
        }
    }
    assert!(matches!(
        pc.precompile(host, b"\0asm garbage"),
        Err(LoadError::MissingManifest { .. } | LoadError::BadManifest(_) | LoadError::Compile(_))
    ));
    for t in Target::ALL {
        assert_eq!(t.name().parse::<Target>().unwrap(), t);
    }
    assert_eq!("arm64".parse::<Target>().unwrap(), Target::Aarch64);
    assert!("mips".parse::<Target>().is_err());
}

#[test]
fn precompiled_module_loads_in_another_engine() {
    let guest = Guest::returning("healthy", ok_output(&healthy_output()));
    let wasm = guest.bytes();
    let compiled = load(&engine(), &guest).serialize().unwrap();
    let other = engine();
    let module = other.load_precompiled(&wasm, &compiled).unwrap().unwrap();
    assert_eq!(module.manifest().name, "healthy");
    assert_eq!(module.hash(), load(&other, &guest).hash());
    let mut inst = module.instantiate(&other, Limits::default(), Arc::new(NoHistory), "{}").unwrap();
    assert_eq!(inst.process(&input()).unwrap().output, healthy_output());

    let err = other.load_precompiled(&wasm, b"not a compiled module").unwrap().unwrap_err();
    assert!(err.to_string().starts_with("precompiled module unusable: "), "{err}");
    let wrong_abi = Guest {
        manifest: Some(manifest_json("healthy", 99, &["out"])),
        ..Guest::returning("healthy", ok_output(&healthy_output()))
    };
    assert!(matches!(
        other.load_precompiled(&wrong_abi.bytes(), &compiled),
        Err(LoadError::AbiMismatch { module: 99, .. })
    ));
}

#[test]
fn limits_resolve_override_then_manifest_then_default() {
    let budgets = abi::Budgets { memory_bytes: Some(1 << 20), fuel_per_batch: Some(7), max_output_readings: None };
    let overrides = LimitOverrides { fuel_per_batch: Some(9), log_lines_per_s: Some(1), ..Default::default() };
    let l = Limits::from_manifest(&budgets, &overrides);
    let d = Limits::default();
    assert_eq!(l.memory_bytes, 1 << 20, "manifest");
    assert_eq!(l.fuel_per_batch, 9, "override beats manifest");
    assert_eq!(l.max_output_readings, d.max_output_readings, "default");
    assert_eq!(l.log_lines_per_s, 1, "override");
    assert_eq!(l.time_per_batch, Duration::from_secs(1));
}

// ---------------------------------------------------------------------------------------
// Engine policy: CPU, memory, traps

#[test]
fn infinite_loop_times_out() {
    let engine = engine();
    let limits = Limits { fuel_per_batch: 1 << 60, time_per_batch: Duration::from_millis(50), ..Limits::default() };
    let mut inst = instantiate(&engine, &Guest::running("loop", INFINITE_LOOP), limits);
    let err = fails_and_poisons(&engine, &mut inst);
    assert!(matches!(err, ModuleError::Timeout { budget } if budget == Duration::from_millis(50)), "{err:?}");
    assert_eq!(err.kind(), "timeout");
}

#[test]
fn infinite_loop_runs_out_of_fuel() {
    let engine = engine();
    let limits = Limits { fuel_per_batch: 100_000, time_per_batch: Duration::from_secs(60), ..Limits::default() };
    let mut inst = instantiate(&engine, &Guest::running("loop", INFINITE_LOOP), limits);
    let err = fails_and_poisons(&engine, &mut inst);
    assert!(matches!(err, ModuleError::OutOfFuel { budget: 100_000 }), "{err:?}");
    assert_eq!(err.kind(), "out_of_fuel");
}

#[test]
fn memory_grow_past_cap_is_memory_limit() {
    let engine = engine();
    let limits = Limits { memory_bytes: 1 << 20, ..Limits::default() };
    let body = "(drop (memory.grow (i32.const 100))) (i64.const 0)";
    let mut inst = instantiate(&engine, &Guest::running("grow", body), limits);
    let err = fails_and_poisons(&engine, &mut inst);
    assert!(matches!(err, ModuleError::MemoryLimit { limit } if limit == 1 << 20), "{err:?}");
    assert_eq!(err.kind(), "memory_limit");
}

#[test]
fn initial_memory_past_cap_fails_instantiation() {
    let engine = engine();
    let guest = Guest { pages: 32, ..Guest::returning("big", ok_output(&healthy_output())) };
    let limits = Limits { memory_bytes: 1 << 20, ..Limits::default() };
    let err = load(&engine, &guest).instantiate(&engine, limits, Arc::new(NoHistory), "{}").unwrap_err();
    assert!(matches!(err, ModuleError::MemoryLimit { limit } if limit == 1 << 20), "{err:?}");
    assert_others_unaffected(&engine);
}

#[test]
fn unreachable_is_trap() {
    let engine = engine();
    let mut inst = instantiate(&engine, &Guest::running("trap", "(unreachable)"), Limits::default());
    let err = fails_and_poisons(&engine, &mut inst);
    let ModuleError::Trap { message } = &err else { panic!("{err:?}") };
    assert!(message.contains("unreachable"), "{message}");
}

// ---------------------------------------------------------------------------------------
// Output policy

#[test]
fn output_buffer_over_cap_is_refused_before_decoding() {
    let engine = engine();
    // 5 MiB from a 64 KiB memory: only a length check before any read can say
    // "too large" rather than "out of bounds".
    let body = format!("(i64.const {})", pack(0, 5 << 20));
    let mut inst = instantiate(&engine, &Guest::running("flood", &body), Limits::default());
    let err = fails_without_poisoning(&engine, &mut inst);
    assert!(
        matches!(err, ModuleError::OutputTooLarge { what: OutputCap::Bytes, actual, limit } if actual == 5 << 20 && limit == 4 << 20),
        "{err:?}"
    );
}

#[test]
fn too_many_output_readings() {
    let engine = engine();
    let out = Output { readings: vec![reading("out", 1, 1.0), reading("out", 2, 2.0)], metrics: vec![] };
    let limits = Limits { max_output_readings: 1, ..Limits::default() };
    let mut inst = instantiate(&engine, &Guest::returning("many", ok_output(&out)), limits);
    let err = fails_without_poisoning(&engine, &mut inst);
    assert!(matches!(err, ModuleError::OutputTooLarge { what: OutputCap::Readings, actual: 2, limit: 1 }), "{err:?}");
}

#[test]
fn output_on_undeclared_stream() {
    let engine = engine();
    let out = Output { readings: vec![reading("out", 1, 1.0), reading("secret", 2, 2.0)], metrics: vec![] };
    let mut inst = instantiate(&engine, &Guest::returning("sneaky", ok_output(&out)), Limits::default());
    let err = fails_without_poisoning(&engine, &mut inst);
    assert!(matches!(&err, ModuleError::UndeclaredOutput { stream } if stream == "secret"), "{err:?}");
    assert!(err.to_string().contains("`secret`"));
}

#[test]
fn guest_error_is_reported_and_does_not_poison() {
    let engine = engine();
    let result = abi::encode(&CallResult::<Output>::Err("sensor table missing".into()));
    let mut inst = instantiate(&engine, &Guest::returning("err", result), Limits::default());
    let err = fails_without_poisoning(&engine, &mut inst);
    assert!(matches!(&err, ModuleError::Guest(m) if m == "sensor table missing"), "{err:?}");
}

#[test]
fn out_of_bounds_result_is_bad_message() {
    let engine = engine();
    let body = format!("(i64.const {})", pack(65_536 - 2, 100));
    let mut inst = instantiate(&engine, &Guest::running("oob", &body), Limits::default());
    let err = fails_and_poisons(&engine, &mut inst);
    assert!(matches!(&err, ModuleError::BadMessage(m) if m.contains("outside")), "{err:?}");
}

#[test]
fn undecodable_result_is_bad_message() {
    let engine = engine();
    // A CallResult variant index of 7 does not exist.
    let mut inst = instantiate(&engine, &Guest::returning("garbage", vec![7, 1, 2]), Limits::default());
    let err = fails_and_poisons(&engine, &mut inst);
    assert!(matches!(&err, ModuleError::BadMessage(m) if m.contains("undecodable")), "{err:?}");
}

// ---------------------------------------------------------------------------------------
// Load policy

#[test]
fn manifest_with_other_abi_version_is_refused_at_load() {
    let engine = engine();
    let mut guest = Guest::returning("future", ok_output(&healthy_output()));
    guest.manifest = Some(manifest_json("future", abi::ABI_VERSION + 1, &["out"]));
    let err = engine.load(&guest.bytes()).unwrap_err();
    assert!(matches!(err, LoadError::AbiMismatch { module: 2, host: 1 }), "{err:?}");
    assert_others_unaffected(&engine);
}

#[test]
fn export_with_other_abi_version_is_refused_at_instantiation() {
    let engine = engine();
    let guest = Guest { abi_version: abi::ABI_VERSION + 1, ..Guest::returning("liar", ok_output(&healthy_output())) };
    let err = load(&engine, &guest).instantiate(&engine, Limits::default(), Arc::new(NoHistory), "{}").unwrap_err();
    assert!(matches!(err, ModuleError::AbiMismatch { module: 2, host: 1 }), "{err:?}");
    assert_others_unaffected(&engine);
}

#[test]
fn missing_export_is_named() {
    let engine = engine();
    let guest = Guest { skip: vec![abi::exports::PROCESS], ..Guest::returning("half", vec![]) };
    let err = engine.load(&guest.bytes()).unwrap_err();
    assert!(
        matches!(&err, LoadError::Export { name: "brume_process", problem, .. } if problem == "is missing"),
        "{err:?}"
    );
    assert!(err.to_string().contains("`brume_process` is missing"), "{err}");
    assert_others_unaffected(&engine);
}

#[test]
fn export_with_wrong_signature_is_named() {
    let engine = engine();
    let guest = Guest {
        skip: vec![abi::exports::ALLOC],
        extra: r#"(func (export "brume_alloc") (param i64) (result i32) (i32.const 0))"#.into(),
        ..Guest::returning("typo", vec![])
    };
    let err = engine.load(&guest.bytes()).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, LoadError::Export { name: "brume_alloc", .. }), "{err:?}");
    assert!(msg.contains("(func (param i64) (result i32))"), "{msg}");
}

#[test]
fn wasi_import_is_refused_and_named() {
    let engine = engine();
    let guest = Guest {
        imports: r#"(import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))"#.into(),
        ..Guest::returning("wasi", ok_output(&healthy_output()))
    };
    let err = engine.load(&guest.bytes()).unwrap_err();
    assert!(
        matches!(&err, LoadError::Import { module, name, .. } if module == "wasi_snapshot_preview1" && name == "fd_write"),
        "{err:?}"
    );
    assert!(err.to_string().contains("`wasi_snapshot_preview1::fd_write`"), "{err}");
    assert_others_unaffected(&engine);
}

#[test]
fn unknown_brume_import_and_wrong_import_type_are_refused() {
    let engine = engine();
    let clock = Guest {
        imports: r#"(import "brume" "clock" (func (result i64)))"#.into(),
        ..Guest::returning("clock", ok_output(&healthy_output()))
    };
    let err = engine.load(&clock.bytes()).unwrap_err();
    assert!(matches!(&err, LoadError::Import { name, .. } if name == "clock"), "{err:?}");
    let bad_log = Guest {
        imports: r#"(import "brume" "log" (func (param i32 i32)))"#.into(),
        ..Guest::returning("log", ok_output(&healthy_output()))
    };
    let err = engine.load(&bad_log.bytes()).unwrap_err();
    assert!(matches!(&err, LoadError::Import { name, .. } if name == "log"), "{err:?}");
}

#[test]
fn corrupt_bytes_do_not_compile() {
    let engine = engine();
    for bytes in [&b""[..], b"not wasm at all", b"\0asm\x01\0\0\0\x01\xff\xff"] {
        let err = engine.load(bytes).unwrap_err();
        assert!(matches!(err, LoadError::Compile(_)), "{err:?}");
    }
    let mut truncated = Guest::returning("t", ok_output(&healthy_output())).bytes();
    truncated.truncate(truncated.len() / 2);
    assert!(matches!(engine.load(&truncated), Err(LoadError::Compile(_))));
    assert_others_unaffected(&engine);
}

#[test]
fn missing_or_bad_manifest_is_refused() {
    let engine = engine();
    let guest = Guest { manifest: None, ..Guest::returning("anon", vec![]) };
    assert!(matches!(engine.load(&guest.bytes()), Err(LoadError::MissingManifest { section: "brume-manifest" })));
    let guest = Guest { manifest: Some("{\"name\":".into()), ..Guest::returning("anon", vec![]) };
    assert!(matches!(engine.load(&guest.bytes()), Err(LoadError::BadManifest(_))));
}

// ---------------------------------------------------------------------------------------
// Host functions

/// Records queries and answers with fixed readings.
struct Recorder {
    seen: Mutex<Vec<HistoryQuery>>,
    answer: Vec<ModuleReading>,
}

impl HistoryProvider for Recorder {
    fn query(&self, query: &HistoryQuery) -> HistoryResult {
        self.seen.lock().unwrap().push(query.clone());
        HistoryResult::Readings(self.answer.clone())
    }
}

/// The guest queries history and returns the answer as its output. This works because
/// `HistoryResult::Readings(v)` encodes as `[0, v..]` and `CallResult::Ok(Output {
/// readings: v, metrics: [] })` as `[0, v.., 0]`: the guest appends one zero byte.
#[test]
fn history_round_trip_is_capped_and_measured() {
    let engine = engine();
    let query = HistoryQuery { stream: "in/a".into(), kind: HistoryKind::LastN { n: 1_000_000, before_ns: 99 } };
    let qbytes = abi::encode(&query);
    let body = format!(
        "(local $r i64)
         (local.set $r (call $history (i32.const {DATA}) (i32.const {len})))
         (i32.store8 (i32.add (i32.wrap_i64 (i64.shr_u (local.get $r) (i64.const 32))) (i32.wrap_i64 (local.get $r)))
                     (i32.const 0))
         (i64.add (local.get $r) (i64.const 1))",
        len = qbytes.len()
    );
    let guest = Guest {
        imports: r#"(import "brume" "history" (func $history (param i32 i32) (result i64)))"#.into(),
        data: qbytes,
        ..Guest::running("history", &body)
    };
    let provider = Arc::new(Recorder {
        seen: Mutex::new(Vec::new()),
        answer: vec![reading("out", 1, 1.0), reading("out", 2, 2.0), reading("out", 3, 3.0)],
    });
    let limits = Limits { max_history_readings: 2, ..Limits::default() };
    let mut inst = load(&engine, &guest).instantiate(&engine, limits, provider.clone(), "{}").unwrap();
    let outcome = inst.process(&input()).unwrap();
    assert_eq!(
        *provider.seen.lock().unwrap(),
        [HistoryQuery { stream: "in/a".into(), kind: HistoryKind::LastN { n: 2, before_ns: 99 } }],
        "n capped to max_history_readings"
    );
    // The provider over-answered: the host kept the newest two.
    assert_eq!(outcome.output.readings, [reading("out", 2, 2.0), reading("out", 3, 3.0)]);
    assert_eq!((outcome.stats.history_queries, outcome.stats.history_readings), (1, 2));
}

#[test]
fn undecodable_history_query_is_bad_message() {
    let engine = engine();
    let body = format!("(call $history (i32.const {DATA}) (i32.const 3))");
    let guest = Guest {
        imports: r#"(import "brume" "history" (func $history (param i32 i32) (result i64)))"#.into(),
        data: vec![0xff, 0xff, 0xff],
        ..Guest::running("badq", &body)
    };
    let mut inst = instantiate(&engine, &guest, Limits::default());
    let err = fails_and_poisons(&engine, &mut inst);
    assert!(matches!(&err, ModuleError::BadMessage(m) if m.contains("brume.history")), "{err:?}");
}

#[test]
fn log_lines_are_rate_limited() {
    let engine = engine();
    let body = format!(
        "(local $i i32)
         (loop $l
           (call $log (i32.const 3) (i32.const {DATA}) (i32.const 5))
           (local.set $i (i32.add (local.get $i) (i32.const 1)))
           (br_if $l (i32.lt_u (local.get $i) (i32.const 25))))
         (i64.const {})",
        pack(DATA + 5, 3)
    );
    let mut data = b"hello".to_vec();
    data.extend(ok_output(&Output::default()));
    let guest = Guest {
        imports: r#"(import "brume" "log" (func $log (param i32 i32 i32)))"#.into(),
        data,
        ..Guest::running("chatty", &body)
    };
    let limits = Limits { log_lines_per_s: 10, ..Limits::default() };
    let mut inst = instantiate(&engine, &guest, limits);
    let logs = LogCapture::default();
    let subscriber = tracing_subscriber::fmt().with_ansi(false).with_writer(logs.clone()).finish();
    let outcome = tracing::subscriber::with_default(subscriber, || inst.process(&input()).unwrap());
    let text = logs.text();
    let emitted = text.lines().filter(|l| l.contains("INFO brume_module: hello") && l.ends_with("module=\"chatty\""));
    assert_eq!(emitted.count(), 10, "{text}");
    // A burst of one second's worth (10) passes; the loop takes microseconds, so the
    // bucket cannot refill a whole token before it ends.
    assert_eq!((outcome.stats.log_lines, outcome.stats.log_dropped), (10, 15));
    assert_eq!(outcome.output, Output::default());
}

/// Collects formatted log output (the subscriber is thread-local, and the module runs on
/// the test's thread).
#[derive(Clone, Default)]
struct LogCapture(Arc<Mutex<Vec<u8>>>);

impl LogCapture {
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

impl std::io::Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogCapture {
    type Writer = LogCapture;
    fn make_writer(&'a self) -> LogCapture {
        self.clone()
    }
}
