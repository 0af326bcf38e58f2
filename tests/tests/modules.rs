//! WASM modules end to end with real processes: readings in over MQTT, the example
//! modules (built by `cargo xtask build-modules`) running in the agent, their results
//! stored at the hub with their lineage; and the downsample module killed with SIGKILL
//! mid-stream, whose outputs must equal those of an uninterrupted run over the same input.

use std::path::{Path, PathBuf};
use std::time::Duration;

use brume_e2e::{Agent, Hub, Mosquitto, arrival_order, model_downsample, wait_until, windows};
use serde_json::Value;
use sha2::{Digest, Sha256};

const AGENT: &str = env!("CARGO_BIN_EXE_e2e-edge-agent");
const HUB: &str = env!("CARGO_BIN_EXE_e2e-cloud-hub");
/// Timestamp of reading 0, ms: a whole second, so 1 s windows start at reading 0.
const T0_MS: i64 = 1_700_000_000_000;
/// Readings are 10 ms apart: 100 per one-second window.
const STEP_MS: i64 = 10;

/// A module built by `cargo xtask build-modules`.
fn built_module(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/modules").join(format!("{name}.wasm"));
    assert!(p.exists(), "{} is missing: run `cargo xtask build-modules` first", p.display());
    p
}

fn sha256_hex(path: &Path) -> String {
    Sha256::digest(std::fs::read(path).unwrap()).iter().map(|b| format!("{b:02x}")).collect()
}

/// Value of reading `i`: varied, deterministic, small integers (exact in f64).
fn value(i: i64) -> f64 {
    ((i * 37) % 101) as f64
}

fn payload(i: i64) -> String {
    format!("{{\"value\":{},\"ts\":{}}}", value(i), T0_MS + i * STEP_MS)
}

/// Publishes readings `range` ([`payload`]) reliably: see [`brume_e2e::publish_reliably`].
async fn publish_reliably(port: u16, topic: &str, range: std::ops::Range<i64>) {
    brume_e2e::publish_reliably(port, topic, range, payload).await
}

fn num(r: &Value, field: &str) -> f64 {
    r["fields"][field].as_f64().unwrap_or_else(|| panic!("field {field} in {r}"))
}

fn modules_config(mods: &[(&Path, &str)]) -> String {
    let items: Vec<String> = mods
        .iter()
        .map(|(p, cfg)| format!("{{ path = {:?}, config = {{ {cfg} }} }}", p.display().to_string()))
        .collect();
    format!("modules = [{}]", items.join(", "))
}

/// Counts at the hub, for failure messages.
async fn hub_state(hub: &Hub) -> (usize, usize) {
    let d = hub.readings("downsampled").await.map(|r| r.len()).unwrap_or(0);
    (d, hub.readings("sensors/d").await.map(|r| r.len()).unwrap_or(0))
}

/// Readings in over MQTT, through the threshold and downsample examples in the agent:
/// the hub stores exactly the expected alerts and windows, each with the lineage of the
/// module file that computed it, and lists both module builds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_modules_results_reach_the_hub_with_lineage() {
    let broker = Mosquitto::start().unwrap();
    let hub = Hub::start(Path::new(HUB), broker.port).await.unwrap();
    let (threshold, downsample) = (built_module("threshold"), built_module("downsample"));
    let mods = modules_config(&[(&threshold, "limit = 80.0"), (&downsample, "window_s = 1")]);
    let mut agent = Agent::start(Path::new(AGENT), "edge-mod", broker.port, &[("", &mods)]).await.unwrap();

    const N: i64 = 301; // three full windows, and one reading that closes the third
    publish_reliably(agent.mqtt_port, "sensors/t", 0..N).await;
    let alerts_want: Vec<(i64, f64)> =
        (0..N).filter(|&i| value(i) > 80.0).map(|i| ((T0_MS + i * STEP_MS) * 1_000_000, value(i))).collect();
    let input: Vec<(i64, f64)> = (0..N).map(|i| ((T0_MS + i * STEP_MS) * 1_000_000, value(i))).collect();
    let windows_want = model_downsample(&input, 1_000_000_000);
    assert_eq!(windows_want.len(), 3);

    wait_until("the module outputs at the hub", Duration::from_secs(60), || async {
        let a = hub.readings("alerts/threshold").await.unwrap_or_default().len();
        let d = hub.readings("downsampled").await.unwrap_or_default().len();
        a >= alerts_want.len() && d >= windows_want.len()
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.log()));

    let alerts = hub.readings("alerts/threshold").await.unwrap();
    let got: Vec<(i64, f64)> = alerts.iter().map(|r| (r["ts_ns"].as_i64().unwrap(), num(r, "value"))).collect();
    assert_eq!(got, alerts_want, "exactly the readings above the limit, once each");
    let down = hub.readings("downsampled").await.unwrap();
    assert_eq!(windows(&down), windows_want);

    // Lineage: computed readings name the module file that computed them; raw ones nothing.
    for (rows, name, file) in [(&alerts, "threshold", &threshold), (&down, "downsample", &downsample)] {
        for r in rows.iter() {
            assert_eq!(r["module"]["name"], name, "{r}");
            assert_eq!(r["module"]["sha256"], sha256_hex(file), "{r}");
        }
    }
    let raw = hub.readings("sensors/t").await.unwrap();
    assert_eq!(raw.len(), N as usize, "the raw stream is forwarded too");
    assert!(raw.iter().all(|r| r.get("module").is_none()), "ingested readings carry no lineage");
    let modules: Value = reqwest::get(format!("{}/api/v1/modules", hub.url)).await.unwrap().json().await.unwrap();
    let listed: Vec<(String, u64, u64)> = modules
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (m["name"].as_str().unwrap().to_owned(), m["agents"].as_u64().unwrap(), m["readings"].as_u64().unwrap())
        })
        .collect();
    assert_eq!(
        listed,
        vec![("downsample".into(), 1, windows_want.len() as u64), ("threshold".into(), 1, alerts_want.len() as u64)]
    );
    agent.proc.terminate();
}

/// The agent is killed with SIGKILL twice while readings stream in over MQTT and the
/// downsample module aggregates them: its outputs at the hub equal an uninterrupted run
/// of the module over exactly the input the agent stored (no window lost, none twice,
/// no reading counted twice or skipped), because its outputs, input cursor and state are
/// committed in one transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downsample_outputs_survive_kill_9() {
    let broker = Mosquitto::start().unwrap();
    let hub = Hub::start(Path::new(HUB), broker.port).await.unwrap();
    let downsample = built_module("downsample");
    let mods = modules_config(&[(&downsample, "window_s = 1")]);
    // Small module batches, so a kill lands between many module commits.
    let mut agent = Agent::start(
        Path::new(AGENT),
        "edge-ds",
        broker.port,
        &[("", &mods), ("module_runtime", "batch_max_readings = 7")],
    )
    .await
    .unwrap();

    const N: i64 = 2_001; // 20 windows, and one reading that closes the last
    let port = agent.mqtt_port;
    let publisher = tokio::spawn(async move { publish_reliably(port, "sensors/d", 0..N).await });
    for outputs in [4, 12] {
        wait_until("downsample outputs at the hub", Duration::from_secs(60), || async {
            hub.readings("downsampled").await.map(|r| r.len() >= outputs).unwrap_or(false)
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.log()));
        agent.proc.kill9();
        agent.restart().await.unwrap();
    }
    tokio::time::timeout(Duration::from_secs(120), publisher).await.expect("publisher finished").unwrap();
    let done = wait_until("every window and reading at the hub", Duration::from_secs(60), || async {
        let d = hub.readings("downsampled").await.map(|r| r.len()).unwrap_or(0);
        let raw = hub.readings("sensors/d").await.map(|r| r.len()).unwrap_or(0);
        d >= 20 && raw >= N as usize && agent.drained().await
    })
    .await;
    if let Err(e) = done {
        let status = agent.status().await.ok();
        panic!(
            "{e}\nhub (downsampled, raw): {:?}\nagent status: {status:?}\nagent log:\n{}",
            hub_state(&hub).await,
            agent.log()
        );
    }

    let input = arrival_order(&hub.readings("sensors/d").await.unwrap());
    let want = model_downsample(&input, 1_000_000_000);
    let got = windows(&hub.readings("downsampled").await.unwrap());
    assert_eq!(got.len(), want.len(), "windows: got {got:?}\nwant {want:?}");
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g, w, "window at {}", w.0);
    }
    agent.proc.terminate();
}

/// The agent binary compiles modules in a child process of itself and caches the
/// machine code under `data_dir/module-cache/<sha256>.cwasm`: a corrupt `.wasm` is
/// reported with the compiler's exact error while a healthy module beside it runs; a
/// damaged cache file is detected at the next start, and the module is compiled again
/// and keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modules_compile_in_a_child_process_into_a_checked_cache() {
    let broker = Mosquitto::start().unwrap();
    let threshold = built_module("threshold");
    let dir = tempfile::tempdir().unwrap();
    let corrupt = dir.path().join("corrupt.wasm");
    std::fs::write(&corrupt, b"\0asm\x01\0\0\0 this is not a module").unwrap();
    let mods = modules_config(&[(&threshold, "limit = 80.0"), (&corrupt, "")]);
    let mut agent = Agent::start(Path::new(AGENT), "edge-cc", broker.port, &[("", &mods)]).await.unwrap();

    let modules = |agent: &Agent| {
        let agent_url = agent.url.clone();
        async move {
            let s: Value = reqwest::get(format!("{agent_url}/api/v1/status")).await.ok()?.json().await.ok()?;
            Some(s["modules"].clone())
        }
    };
    // Listed by name: [corrupt, threshold].
    let (c, t) = (0, 1);
    let loaded = |m: &Value| m[t]["hash"].as_str() == Some(sha256_hex(&threshold).as_str()) && m[t]["enabled"] == true;
    wait_until("threshold loaded, corrupt refused", Duration::from_secs(60), || async {
        modules(&agent).await.is_some_and(|m| loaded(&m) && !m[c]["last_error"].is_null())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.log()));
    let m = modules(&agent).await.unwrap();
    assert_eq!((m[c]["name"].as_str(), m[t]["name"].as_str()), (Some("corrupt"), Some("threshold")));
    let err = m[c]["last_error"].as_str().unwrap();
    assert!(err.starts_with("module does not compile: "), "{err}");
    assert_eq!(m[c]["enabled"], false);

    let cached = agent.dir.path().join("data/module-cache").join(format!("{}.cwasm", sha256_hex(&threshold)));
    let bytes = std::fs::read(&cached).unwrap_or_else(|e| panic!("{}: {e}", cached.display()));
    assert!(bytes.starts_with(b"BRUMECW1"));
    let leftovers: Vec<_> = std::fs::read_dir(cached.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| !n.ends_with(".cwasm"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left in the cache: {leftovers:?}");

    // Damage the cached code: the next start notices, recompiles, and runs the module.
    let mut damaged = bytes.clone();
    let last = damaged.len() - 1;
    damaged[last] ^= 0xff;
    agent.proc.terminate();
    std::fs::write(&cached, &damaged).unwrap();
    agent.restart().await.unwrap();
    wait_until("threshold loaded again", Duration::from_secs(60), || async {
        modules(&agent).await.is_some_and(|m| loaded(&m))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.log()));
    assert!(agent.log().contains("damaged compiled module in the cache"), "{}", agent.log());
    assert_eq!(std::fs::read(&cached).unwrap(), bytes, "recompiled to the same code");
    publish_reliably(agent.mqtt_port, "sensors/x", 0..1).await;
    wait_until("the reading processed", Duration::from_secs(30), || async {
        modules(&agent).await.is_some_and(|m| m[t]["batches_ok"].as_u64() >= Some(1))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.log()));
    agent.proc.terminate();
}
