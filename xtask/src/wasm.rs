//! Benchmark 4: WASM modules. What running a module costs compared with the same code
//! compiled natively, and what the agent's module pipeline (store → module → commit)
//! sustains.
//!
//! * **Call rate**: the threshold example (`target/modules/threshold.wasm`) on 1,000-reading
//!   batches through the agent's host (`ModuleInstance::process`: encode the input, copy
//!   it in, run under fuel and epoch limits, decode the output), against the same filter
//!   compiled natively and driven through the SDK's byte-level runtime, so that both sides
//!   do the same postcard encoding and decoding and differ only in WASM.
//! * **Instantiate** (`instantiate` + `brume_init`), **empty call**, **compile** (`load`).
//! * **Pipeline**: a store pre-filled with readings on 100 streams, then the agent's own
//!   module runner (`ModuleRunners`, the code the agent runs) with the threshold module
//!   from the first reading; timed until its cursor passes the last reading.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use brume_module_abi::{CallResult, InitRequest, Input, ModuleReading, Output, decode, encode};
use brume_module_sdk::FilterModule;
use brume_module_sdk::prelude::*;
use brume_module_sdk::rt::Runtime;
use brume_module_sdk::testing::MockHistory;
use brume_wasm_host::{LimitOverrides, Limits, LoadedModule, ModuleInstance, NoHistory, WasmEngine};
use edge_agent::config::{Config, ModuleConfig, OnFailure, StartAt};
use edge_agent::store::writer::StoreHandle;
use edge_agent::store::{Store, StoreOptions, StoreReader};

use crate::util::Samples;

/// Readings per module call, as the agent's default `module_runtime.batch_max_readings`.
pub const BATCH: usize = 1000;
/// The threshold's limit: simulated values follow a sine between 15 and 26, so about a
/// fifth pass.
const LIMIT: f64 = 24.0;

/// The example's manifest, as embedded in `threshold.wasm`.
const MANIFEST: &str =
    r#"{"name":"threshold","version":"0.1.0","abi_version":1,"inputs":["sensors/#"],"outputs":["alerts/threshold"]}"#;

/// The threshold example's filter (modules/examples/threshold), compiled natively.
#[derive(Debug)]
struct Threshold(f64);

impl Default for Threshold {
    fn default() -> Self {
        Threshold(f64::INFINITY)
    }
}

impl Filter for Threshold {
    fn init(&mut self, config: &serde_json::Value) -> Result<(), String> {
        self.0 = config["limit"].as_f64().ok_or("limit must be a number")?;
        Ok(())
    }

    fn keep(&mut self, r: &ModuleReading) -> bool {
        r.number("value").is_some_and(|v| v > self.0)
    }
}

pub struct CallResults {
    pub native: Samples,
    pub wasm: Samples,
    /// Fuel one batch of `BATCH` readings costs.
    pub fuel_per_batch: u64,
    /// Output readings per batch (same on both sides, checked).
    pub outputs_per_batch: usize,
    pub instantiate: Samples,
    pub empty_call: Samples,
    pub compile: Duration,
    pub module_bytes: usize,
}

fn threshold_path(root: &Path) -> std::path::PathBuf {
    root.join("target/modules/threshold.wasm")
}

/// One batch of simulated readings, on `sensors/<n>` streams, sampled across several
/// periods of the simulator's sine so that the pass rate is the pipeline's.
fn batch() -> Input {
    let readings = edge_agent::ingest::simulator::generate(0, BATCH * 97, 100, edge_agent::now_ns())
        .into_iter()
        .step_by(97)
        .map(|r| ModuleReading {
            stream: r.stream.replace("sim/", "sensors/"),
            ts_ns: r.ts_ns,
            fields: r.fields.decode().expect("simulated fields decode"),
        })
        .collect();
    Input { readings }
}

fn config_json() -> String {
    format!("{{\"limit\": {LIMIT}}}")
}

fn instantiate(engine: &WasmEngine, module: &LoadedModule) -> Result<ModuleInstance> {
    let limits = Limits::from_manifest(&module.manifest().budgets, &LimitOverrides::default());
    module.instantiate(engine, limits, Arc::new(NoHistory), &config_json()).map_err(|e| anyhow::anyhow!("{e}"))
}

/// Readings/s over `batches` calls of `f`, which processes one batch.
fn rate(batches: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let start = Instant::now();
    for _ in 0..batches {
        f()?;
    }
    Ok((batches * BATCH) as f64 / start.elapsed().as_secs_f64())
}

pub fn calls(root: &Path, batches: usize, samples: usize) -> Result<CallResults> {
    let bytes = std::fs::read(threshold_path(root)).context("reading target/modules/threshold.wasm")?;
    let input = batch();

    // Native: the same filter behind the SDK runtime the wasm exports call.
    let mut rt = Runtime::<FilterModule<Threshold>>::new(MANIFEST);
    let init: CallResult<()> = decode(&rt.init(&encode(&InitRequest { config_json: config_json() })))?;
    if !matches!(init, CallResult::Ok(())) {
        bail!("native init failed: {init:?}");
    }
    let mut history = MockHistory::new();
    let mut native_outputs = 0;
    let mut native_call = || -> Result<()> {
        let out: CallResult<Output> = decode(&rt.process(&encode(&input), &mut history))?;
        match out {
            CallResult::Ok(o) => native_outputs = o.readings.len(),
            CallResult::Err(e) => bail!("native process failed: {e}"),
        }
        Ok(())
    };

    let engine = WasmEngine::new(Default::default())?;
    let t = Instant::now();
    let module = engine.load(&bytes).map_err(|e| anyhow::anyhow!("{e}"))?;
    let compile = t.elapsed();
    let mut inst = instantiate(&engine, &module)?;
    let (mut fuel, mut wasm_outputs) = (0, 0);
    let mut wasm_call = || -> Result<()> {
        let o = inst.process(&input).map_err(|e| anyhow::anyhow!("{e}"))?;
        (fuel, wasm_outputs) = (o.fuel_used, o.output.readings.len());
        Ok(())
    };

    let (mut native, mut wasm) = (Samples::default(), Samples::default());
    rate(batches / 10 + 1, &mut native_call)?; // warm-up
    rate(batches / 10 + 1, &mut wasm_call)?;
    for _ in 0..samples {
        native.push(rate(batches, &mut native_call)?);
        wasm.push(rate(batches, &mut wasm_call)?);
    }
    if native_outputs != wasm_outputs || wasm_outputs == 0 {
        bail!("native kept {native_outputs} readings per batch, wasm {wasm_outputs}: not the same work");
    }

    let mut instantiate_s = Samples::default();
    let mut empty_call = Samples::default();
    let empty = Input { readings: Vec::new() };
    for _ in 0..samples {
        let n = 200;
        let t = Instant::now();
        for _ in 0..n {
            drop(instantiate(&engine, &module)?);
        }
        instantiate_s.push(t.elapsed().as_secs_f64() / n as f64);
        let mut inst = instantiate(&engine, &module)?;
        let n = 20_000;
        let t = Instant::now();
        for _ in 0..n {
            inst.process(&empty).map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        empty_call.push(t.elapsed().as_secs_f64() / n as f64);
    }
    Ok(CallResults {
        native,
        wasm,
        fuel_per_batch: fuel,
        outputs_per_batch: wasm_outputs,
        instantiate: instantiate_s,
        empty_call,
        compile,
        module_bytes: bytes.len(),
    })
}

pub struct PipelineResult {
    pub readings: usize,
    pub outputs: u64,
    pub secs: f64,
}

/// The agent's module runner over a store pre-filled with `n` readings.
pub fn pipeline(root: &Path, n: usize) -> Result<PipelineResult> {
    let dir = tempfile::tempdir()?;
    let mut cfg = Config { agent_id: "bench".into(), data_dir: dir.path().to_path_buf(), ..Default::default() };
    cfg.modules = vec![ModuleConfig {
        name: None,
        path: threshold_path(root),
        config: Some(toml::from_str(&format!("limit = {LIMIT}"))?),
        inputs: Some(vec!["sim/#".into()]),
        on_failure: OnFailure::Skip,
        max_consecutive_failures: 5,
        start_at: StartAt::Earliest,
        memory: None,
        fuel_per_batch: None,
        time_per_batch: None,
        max_output_readings: None,
    }];
    {
        let mut store = Store::open(dir.path(), StoreOptions::from_config(&cfg))?;
        let readings = edge_agent::ingest::simulator::generate(0, n, 100, edge_agent::now_ns());
        for g in readings.chunks(crate::store::GROUP) {
            store.apply(&[g], &[], Instant::now())?;
        }
    }
    let last = StoreReader::open(dir.path(), &cfg.agent_id)?.last_id()?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let metrics = Arc::new(edge_agent::metrics::Metrics::default());
    let (handle, writer) = StoreHandle::start(
        dir.path().to_path_buf(),
        &cfg.agent_id,
        StoreOptions::from_config(&cfg),
        edge_agent::store::writer::WriterOptions::from_config(&cfg.store),
        metrics.clone(),
    )?;
    let status: edge_agent::modules::SharedModuleStatus = Arc::new(Mutex::new(Default::default()));
    let _guard = rt.enter();
    let runners = edge_agent::modules::ModuleRunners::start(&cfg, handle.clone(), metrics, status.clone(), None)?;
    // The clock starts once the module is compiled and instantiated (its status then
    // names its version), so compilation, measured on its own above, is not counted.
    let deadline = Instant::now() + Duration::from_secs(600);
    while status.lock().unwrap_or_else(|e| e.into_inner()).values().next().is_none_or(|m| m.version.is_none()) {
        if Instant::now() > deadline {
            bail!("the module did not load within 600 s");
        }
        std::hint::spin_loop();
    }
    let start = Instant::now();
    let (cursor, failed) = loop {
        std::thread::sleep(Duration::from_millis(1));
        let s = status.lock().unwrap_or_else(|e| e.into_inner());
        let m: &edge_agent::modules::ModuleStatus = s.values().next().context("no module status")?;
        if m.cursor >= last || m.batches_failed > 0 || Instant::now() > deadline {
            break (m.cursor, m.batches_failed);
        }
    };
    let secs = start.elapsed().as_secs_f64();
    runners.stop();
    let outputs = handle.snapshot().borrow().readings - n as u64;
    drop(handle);
    writer.join();
    if failed > 0 || cursor < last {
        bail!("module pipeline: cursor {cursor} of {last}, {failed} failed batches");
    }
    Ok(PipelineResult { readings: n, outputs, secs })
}
