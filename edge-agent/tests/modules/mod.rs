//! WASM processing modules running in the agent: real example modules built from
//! `modules/examples` by `cargo xtask build-modules`, and hostile modules in inline WAT.

use std::path::PathBuf;

use edge_agent::config::{Config, ModuleConfig, OnFailure, StartAt};
use edge_agent::store::StoreReader;
use serde_json::Value;

use crate::util::agent::Agent;
use crate::util::eventually;

/// A module built by `cargo xtask build-modules`; fails with that command if missing.
fn built_module(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/modules").join(format!("{name}.wasm"));
    assert!(p.exists(), "{} is missing: run `cargo xtask build-modules` first", p.display());
    p
}

fn module(path: PathBuf, config: &str) -> ModuleConfig {
    ModuleConfig {
        name: None,
        path,
        config: Some(toml::from_str(config).expect("module config")),
        inputs: None,
        on_failure: OnFailure::Skip,
        max_consecutive_failures: 3,
        start_at: StartAt::Earliest,
        memory: None,
        fuel_per_batch: None,
        time_per_batch: None,
        max_output_readings: None,
    }
}

async fn post(agent: &Agent, stream: &str, values: &[f64]) {
    post_json(agent, stream, values.iter().map(|v| serde_json::json!({ "value": v })).collect()).await;
}

/// Writes JSON readings to `stream` over the agent's HTTP ingest; expects 204.
async fn post_json(agent: &Agent, stream: &str, body: Vec<Value>) {
    let r = agent
        .http_client()
        .post(agent.url(&format!("/api/v1/write?stream={stream}")))
        .header("content-type", "application/json")
        .body(serde_json::to_vec(&body).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 204);
}

fn values(agent: &Agent, stream: &str) -> Vec<f64> {
    let reader = StoreReader::open(agent.data_dir(), "t").unwrap();
    reader
        .readings(stream, i64::MIN, i64::MAX, 100_000)
        .unwrap()
        .into_iter()
        .map(|r| {
            r.fields
                .decode()
                .unwrap()
                .into_iter()
                .find(|f| f.name == "value")
                .map(|f| match f.value {
                    brume_protocol::Value::F64(v) => v,
                    _ => f64::NAN,
                })
                .unwrap_or(f64::NAN)
        })
        .collect()
}

async fn module_status(agent: &Agent, i: usize) -> Value {
    agent.status().await["modules"][i].clone()
}

/// The threshold example runs on readings ingested over HTTP and writes exactly the
/// readings above its limit to `alerts/threshold`; its progress is visible in the status.
#[tokio::test]
async fn threshold_module_filters_readings() {
    let path = built_module("threshold");
    let agent = Agent::start_with(|c: &mut Config| c.modules = vec![module(path, "limit = 30.0")]).await;
    post(&agent, "sensors/t", &[10.0, 40.0, 25.0, 50.0, 30.0]).await;
    eventually("two alerts", || async {
        let v = values(&agent, "alerts/threshold");
        if v == [40.0, 50.0] { Ok(()) } else { Err(format!("{v:?} {}", module_status(&agent, 0).await)) }
    })
    .await;
    // The status is updated right after the commit that made the alerts visible.
    let st = eventually("the batch counted in the status", || async {
        let st = module_status(&agent, 0).await;
        if st["batches_ok"].as_u64() >= Some(1) { Ok(st) } else { Err(st.to_string()) }
    })
    .await;
    assert_eq!(st["enabled"], true, "{st}");
    assert_eq!(st["hash"].as_str().unwrap().len(), 64);
    agent.stop().await;
}

/// The deadband, unit-convert and zscore examples side by side in the agent on one input
/// stream: change-only forwarding, a map, and an anomaly detector that reads its window
/// from the agent's SQLite history through `brume.history`. Each produces exactly what
/// its definition says for the input.
#[tokio::test]
async fn deadband_unit_convert_and_zscore_in_the_agent() {
    let agent = Agent::start_with(|c: &mut Config| {
        c.modules = vec![
            module(built_module("deadband"), "band = 0.5"),
            module(built_module("unit-convert"), "factor = 1.8\noffset = 32.0"),
            module(built_module("zscore"), "z = 3.0\nmin_count = 10"),
        ]
    })
    .await;
    // 20 readings cycling 20.0 … 20.4, a spike, then back to normal; explicit timestamps
    // 100 ms apart, so the zscore window (the hour before each reading) holds those before.
    let mut input: Vec<f64> = (0..20).map(|i| 20.0 + 0.1 * f64::from(i % 5)).collect();
    input.extend([30.0, 20.3]);
    let body: Vec<Value> = input
        .iter()
        .enumerate()
        .map(|(i, v)| serde_json::json!({ "value": v, "ts": 1_700_000_000_000i64 + 100 * i as i64 }))
        .collect();
    post_json(&agent, "sensors/line", body).await;
    eventually("every module past the input", || async {
        let st = agent.status().await;
        let behind: Vec<&Value> =
            (0..3).map(|i| &st["modules"][i]).filter(|m| m["cursor"].as_i64() < Some(22)).collect();
        if behind.is_empty() { Ok(()) } else { Err(format!("{behind:?}")) }
    })
    .await;

    assert_eq!(values(&agent, "deadband"), [20.0, 30.0, 20.3], "first value, then only changes ≥ 0.5");
    let converted = values(&agent, "converted");
    let want: Vec<f64> = input.iter().map(|v| v * 1.8 + 32.0).collect();
    assert_eq!(converted, want);
    assert_eq!(values(&agent, "anomalies"), [30.0], "only the spike is more than 3 σ from its hour's mean");
    for i in 0..3 {
        let st = module_status(&agent, i).await;
        assert_eq!(st["batches_failed"], 0, "{st}");
    }
    agent.stop().await;
}

/// `inputs` in the config replaces the manifest's patterns: the threshold example, built
/// for `sensors/#`, filters `line1/+` instead, and no longer sees `sensors/…`.
#[tokio::test]
async fn config_inputs_replace_the_manifest_inputs() {
    let mut m = module(built_module("threshold"), "limit = 30.0");
    m.inputs = Some(vec!["line1/+".into()]);
    let agent = Agent::start_with(|c: &mut Config| c.modules = vec![m]).await;
    post(&agent, "sensors/t", &[99.0]).await;
    post(&agent, "line1/boiler", &[10.0, 45.0]).await;
    post(&agent, "line1/boiler/deep", &[77.0]).await;
    // The last reading is on a stream the module does not read; once the module's cursor
    // is past it, everything it will ever do with these readings is done.
    let last = 4;
    eventually("the module past every reading", || async {
        let st = module_status(&agent, 0).await;
        if st["cursor"].as_i64() >= Some(last) { Ok(()) } else { Err(st.to_string()) }
    })
    .await;
    assert_eq!(values(&agent, "alerts/threshold"), [45.0]);
    agent.stop().await;
}

/// A hostile module (infinite loop) is stopped by its budget on every batch, counted,
/// and disabled after `max_consecutive_failures`, while a healthy module beside it keeps
/// processing; the input readings stay in the store.
#[tokio::test]
async fn looping_module_is_contained_and_disabled() {
    let dir = tempfile::tempdir().unwrap();
    let looping = dir.path().join("looping.wasm");
    std::fs::write(&looping, wat::parse_str(looping_wat()).unwrap()).unwrap();
    let path = built_module("threshold");
    let agent = Agent::start_with(|c: &mut Config| {
        let mut bad = module(looping, "");
        bad.time_per_batch = Some(std::time::Duration::from_millis(50));
        c.modules = vec![bad, module(path, "limit = 0.0")];
        c.module_runtime.batch_max_readings = 1;
    })
    .await;
    post(&agent, "sensors/x", &[1.0, 2.0, 3.0, 4.0]).await;
    eventually("the looping module disabled", || async {
        let st = module_status(&agent, 0).await;
        if st["enabled"] == false && st["batches_failed"] == 3 { Ok(()) } else { Err(st.to_string()) }
    })
    .await;
    let st = module_status(&agent, 0).await;
    let err = st["last_error"].as_str().unwrap();
    assert!(err.contains("fuel") || err.contains("time"), "{err}");
    eventually("the healthy module processed everything", || async {
        let v = values(&agent, "alerts/threshold");
        if v.len() == 4 { Ok(()) } else { Err(format!("{v:?}")) }
    })
    .await;
    assert_eq!(values(&agent, "sensors/x").len(), 4, "inputs stay in the store");
    let metrics = agent.metrics_text().await;
    assert!(
        metrics.contains("brume_agent_module_batches_total{module=\"looping\",result=\"timeout\"}")
            || metrics.contains("out_of_fuel"),
        "{metrics}"
    );
    agent.stop().await;
}

/// Modules on one thread share it in turn: a module backing off after failures does not
/// hold up the others. The looping module backs off 200 ms, 400 ms, 800 ms … after its
/// failures; the healthy one on the same thread processes its four one-reading batches
/// within the first of those pauses, not one per failure.
#[tokio::test]
async fn a_module_backing_off_does_not_hold_up_its_thread() {
    let dir = tempfile::tempdir().unwrap();
    let looping = dir.path().join("looping.wasm");
    std::fs::write(&looping, wat::parse_str(looping_wat()).unwrap()).unwrap();
    let agent = Agent::start_with(|c: &mut Config| {
        let mut bad = module(looping, "");
        bad.time_per_batch = Some(std::time::Duration::from_millis(50));
        bad.max_consecutive_failures = 10;
        c.modules = vec![bad, module(built_module("threshold"), "limit = 0.0")];
        c.module_runtime.batch_max_readings = 1;
        c.module_runtime.threads = 1;
    })
    .await;
    post(&agent, "sensors/x", &[1.0, 2.0, 3.0, 4.0]).await;
    let st = eventually("the healthy module through its input", || async {
        let st = agent.status().await;
        if st["modules"][1]["batches_ok"].as_u64() >= Some(4) { Ok(st) } else { Err(st["modules"].to_string()) }
    })
    .await;
    let failed = st["modules"][0]["batches_failed"].as_u64().unwrap();
    assert!(
        failed <= 3,
        "the healthy module waited for the looping one's backoffs ({failed} failures first): {}",
        st["modules"]
    );
    assert_eq!(values(&agent, "alerts/threshold"), [1.0, 2.0, 3.0, 4.0]);
    agent.stop().await;
}

/// Modules resume exactly where they stopped: after a restart on the same store, the
/// downsample example's outputs equal those of an uninterrupted run.
#[tokio::test]
async fn downsample_resumes_with_its_state_after_restart() {
    let path = built_module("downsample");
    let cfg = |c: &mut Config| {
        c.modules = vec![module(path.clone(), "window_s = 1")];
        c.module_runtime.batch_max_readings = 7;
    };
    // Readings with explicit timestamps: 0..30 over 3 one-second windows, sent in two halves.
    let body = |range: std::ops::Range<i64>| -> Vec<Value> {
        range.map(|i| serde_json::json!({ "value": i as f64, "ts": 1_700_000_000_000i64 + i * 100 })).collect()
    };
    let outputs = |agent: &Agent| {
        let reader = StoreReader::open(agent.data_dir(), "t").unwrap();
        reader
            .readings("downsampled", i64::MIN, i64::MAX, 1000)
            .unwrap()
            .into_iter()
            .map(|r| (r.ts_ns, r.fields.0))
            .collect::<Vec<_>>()
    };

    // Uninterrupted.
    let a = Agent::start_with(cfg).await;
    post_json(&a, "sensors/d", body(0..15)).await;
    post_json(&a, "sensors/d", body(15..30)).await;
    post_json(&a, "sensors/d", body(30..31)).await; // closes the third window
    eventually("three windows", || async {
        if outputs(&a).len() == 3 { Ok(()) } else { Err(format!("{}", outputs(&a).len())) }
    })
    .await;
    let want = outputs(&a);
    a.stop().await;

    // Interrupted after the first half.
    let b = Agent::start_with(cfg).await;
    post_json(&b, "sensors/d", body(0..15)).await;
    eventually("first window", || async {
        if outputs(&b).len() == 1 { Ok(()) } else { Err(format!("{}", outputs(&b).len())) }
    })
    .await;
    eventually("all input consumed", || async {
        let st = module_status(&b, 0).await;
        let reader = StoreReader::open(b.data_dir(), "t").unwrap();
        let (inputs, _) = reader.readings_after(0, usize::MAX, &mut |s| s == "sensors/d").unwrap();
        let last = inputs.last().map(|r| r.id).unwrap();
        if st["cursor"].as_i64() >= Some(last) { Ok(()) } else { Err(st.to_string()) }
    })
    .await;
    let dir = b.stop().await;
    let b = Agent::start_in(dir, cfg).await;
    post_json(&b, "sensors/d", body(15..30)).await;
    post_json(&b, "sensors/d", body(30..31)).await;
    eventually("three windows after restart", || async {
        if outputs(&b).len() == 3 { Ok(()) } else { Err(format!("{}", outputs(&b).len())) }
    })
    .await;
    let got = outputs(&b);
    assert_eq!(got, want, "same outputs with and without the restart");
    b.stop().await;
}

/// A module that implements the ABI but loops forever in `brume_process`.
fn looping_wat() -> String {
    brume_test_support::stub_module_wat(
        r#"{"name":"looping","version":"0.0.1","abi_version":1,"inputs":["sensors/#"],"outputs":[]}"#,
        "(loop $l (br $l)) (i64.const 0)",
    )
}

/// When the store refuses a module's outputs (here: creating its output stream would pass
/// `store.max_streams`), the module is not blamed: it stays enabled, its progress does not
/// move, and it retries from its last committed state, taking in what arrived meanwhile.
/// Once the store has room (retention deletes an expired stream), every output appears
/// exactly once.
#[tokio::test]
async fn refused_outputs_are_retried_from_the_last_commit() {
    let path = built_module("threshold");
    let a = Agent::start_with(|c: &mut Config| {
        c.store.max_streams = 2;
        c.store.retention_interval = std::time::Duration::from_millis(100);
        c.store.streams = vec![toml::from_str("match = \"old/#\"\nmax_age = \"1h\"").expect("stream rule")];
        c.modules = vec![module(path, "limit = 30.0")];
    })
    .await;
    // A stream that takes the second slot and expires 5 s from now.
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    post_json(&a, "old/x", vec![serde_json::json!({ "value": 1.0, "ts": now_ms - 3_600_000 + 5_000 })]).await;
    post(&a, "sensors/t", &[10.0, 40.0, 25.0, 50.0]).await;
    let refused = "brume_agent_module_batches_total{module=\"threshold\",result=\"store_refused\"}";
    let refusals = |at_least: u64| {
        let a = &a;
        async move {
            eventually("refusals", || async {
                let n = a.metric(refused).await;
                if n >= at_least { Ok(n) } else { Err(format!("{n} refusals; {}", module_status(a, 0).await)) }
            })
            .await
        }
    };
    let n = refusals(2).await;
    post(&a, "sensors/t", &[60.0]).await;
    refusals(n + 2).await;
    let st = module_status(&a, 0).await;
    assert_eq!(st["enabled"], true, "a refusal is not the module's failure: {st}");
    assert_eq!(st["batches_ok"], 0, "{st}");
    assert_eq!(st["batches_failed"], 0, "{st}");
    assert_eq!(st["cursor"], 0, "nothing consumed while every commit is refused: {st}");
    assert!(values(&a, "alerts/threshold").is_empty());

    eventually("the alerts once old/x has expired", || async {
        let v = values(&a, "alerts/threshold");
        if v == [40.0, 50.0, 60.0] { Ok(()) } else { Err(format!("{v:?} {}", module_status(&a, 0).await)) }
    })
    .await;
    post(&a, "sensors/t", &[70.0]).await;
    eventually("and the next", || async {
        let v = values(&a, "alerts/threshold");
        if v == [40.0, 50.0, 60.0, 70.0] { Ok(()) } else { Err(format!("{v:?}")) }
    })
    .await;
    assert_eq!(values(&a, "sensors/t"), [10.0, 40.0, 25.0, 50.0, 60.0, 70.0], "input untouched");
    a.stop().await;
}
