//! Benchmark 8c: how much a module swap delays the module's outputs on one real agent
//! while readings flow.
//!
//! A private mosquitto, one release `cloud-hub` (SQLite, `fleet.reconcile_interval =
//! 200ms`) and one release `edge-agent` with its defaults apart from the addresses and
//! `[fleet]`. Two builds of the threshold example (v1, and v2 = the same code with another
//! version in its manifest, so another sha256) are uploaded signed; v1 is deployed with
//! `limit = -1` on field `n`, so it emits one output (`alerts/threshold`, same timestamp
//! and fields) per input. A sensor publishes `{"n": <counter>}` at QoS 1 on `sensors/0`
//! at a fixed rate; the agent stamps each reading with its ingest time. A passive
//! subscriber on the agent's batch topic decodes every batch (re-sends dropped by
//! `(epoch, seq)`) and records, for each reading of a chunk with lineage (a module
//! output), its `n`, timestamp, arrival wall-clock time and the build that computed it.
//! Delay of an output = arrival − ingest timestamp (one machine, one wall clock): commit
//! window, module runner, module commit, the forwarder's batching (`forward.batch_linger`)
//! and the broker.
//!
//! After a steady phase the deployments alternate v2, v1, v2, v1 (each a new deployment,
//! `probation = "0s"`), each awaited until the hub says done with the agent running it,
//! with steady flow between them. Outputs whose timestamp falls in a swap window (deploy
//! request → done) extended by 1 s count as "during swaps", all others as "steady".
//! Every acknowledged input must have exactly one output, and by input order the build
//! must change exactly once per swap; otherwise the run fails.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use brume_protocol::{AgentMessage, Value as FieldValue, topics};
use brume_signing::SecretKey;
use edge_agent::now_ns;
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use serde_json::{Value, json};

use crate::rollout::wait_json;
use crate::util::{Mosquitto, Proc, cpu_secs, free_port, spawn_hub, wait_port};

const AGENT_ID: &str = "bench-swap";
/// Readings per second from the sensor.
pub const RATE: u64 = 200;
/// Swaps per sample: v2, v1, v2, v1.
pub const SWAPS: usize = 4;
/// How long after a swap is done its outputs still count as "during swaps".
pub const AFTER_SWAP: Duration = Duration::from_secs(1);
/// How long to wait for every acknowledged input's output after the sensor stopped.
const DRAIN: Duration = Duration::from_secs(30);

/// Phases of one sample.
#[derive(Clone, Copy)]
pub struct Timing {
    /// Steady flow before the first swap.
    pub first: Duration,
    /// Steady flow between one swap being done and the next deploy request.
    pub between: Duration,
    /// Steady flow after the last swap, before the sensor stops.
    pub after: Duration,
}

impl Timing {
    pub fn new(quick: bool) -> Timing {
        if quick {
            Timing { first: Duration::from_secs(3), between: Duration::from_secs(2), after: Duration::from_secs(2) }
        } else {
            Timing { first: Duration::from_secs(5), between: Duration::from_secs(3), after: Duration::from_secs(3) }
        }
    }
}

/// Percentiles of output delays, milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct Delays {
    pub count: usize,
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

impl Delays {
    fn of(mut ms: Vec<f64>) -> Delays {
        ms.sort_by(f64::total_cmp);
        let q = |p: f64| if ms.is_empty() { f64::NAN } else { ms[((ms.len() - 1) as f64 * p).round() as usize] };
        Delays { count: ms.len(), p50: q(0.5), p99: q(0.99), max: ms.last().copied().unwrap_or(f64::NAN) }
    }
}

/// One swap.
#[derive(Debug, Clone)]
pub struct Swap {
    /// Version deployed.
    pub version: &'static str,
    /// Deploy request → the hub says done with the agent running it, seconds.
    pub secs: f64,
    /// Largest delay of an output in this swap's window (extended by [`AFTER_SWAP`]), ms.
    pub max_ms: f64,
}

/// What one sample measured.
pub struct SwapResult {
    pub during: Delays,
    pub steady: Delays,
    pub swaps: Vec<Swap>,
    /// Inputs the agent acknowledged (PUBACK) and inputs published.
    pub acked: usize,
    pub sent: u64,
    /// Acknowledged inputs without an output, and inputs with more than one.
    pub missing: usize,
    pub duplicated: usize,
    /// Batches seen again (re-sends), dropped by `(epoch, seq)`.
    pub resent: u64,
    /// The builds (v1/v2) that computed the outputs, one entry per run in input order.
    pub builds: Vec<&'static str>,
    /// Agent CPU seconds (utime + stime of the agent process) from the sensor's start to
    /// the last output, and of its waited-for children (the compile processes) over the
    /// same interval.
    pub agent_cpu: f64,
    pub children_cpu: f64,
    /// Length of that interval, seconds.
    pub secs: f64,
}

/// CPU seconds of a process's waited-for children (cutime + cstime, `/proc/<pid>/stat`).
fn children_cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // 1-based fields 16 cutime, 17 cstime; `rest` starts at field 3.
    let ticks = f.get(13)?.parse::<f64>().ok()? + f.get(14)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

fn log_tail(p: &Path) -> String {
    let s = std::fs::read_to_string(p).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    format!("agent log:\n{}", lines[lines.len().saturating_sub(20)..].join("\n"))
}

/// Runs one sample: `v1` is the threshold example's bytes.
pub fn run(agent_exe: &Path, hub_exe: &Path, v1: &[u8], timing: Timing) -> Result<SwapResult> {
    let mosq = Mosquitto::start()?;
    let dir = tempfile::tempdir()?;
    let key = SecretKey::generate();
    let public = key.public().to_string();
    let (mut hub, hub_http) = spawn_hub(
        hub_exe,
        dir.path(),
        &dir.path().join("hub"),
        mosq.port,
        &format!("[fleet]\ntrusted_keys = [{public:?}]\nreconcile_interval = \"200ms\""),
    )?;
    let url = format!("http://127.0.0.1:{hub_http}");
    let (mqtt, http) = (free_port(), free_port());
    let cfg = dir.path().join("agent.toml");
    // The agent's defaults apart from addresses and [fleet].
    std::fs::write(
        &cfg,
        format!(
            "agent_id = {AGENT_ID:?}\ndata_dir = {data:?}\n\n[forward]\nmode = \"hub\"\nhost = \"127.0.0.1\"\nport = {port}\n\n\
             [listener]\nlisten = \"127.0.0.1:{mqtt}\"\n\n[http]\nlisten = \"127.0.0.1:{http}\"\n\n\
             [fleet]\nhub_url = {url:?}\ntrusted_keys = [{public:?}]\n",
            data = dir.path().join("agent").display().to_string(),
            port = mosq.port
        ),
    )?;
    let log = dir.path().join("agent.log");
    let mut agent = Proc::spawn(
        "edge-agent",
        agent_exe,
        &["--config".into(), cfg.display().to_string()],
        &log,
        &[("RUST_LOG", "warn")],
    )?;
    wait_port("the agent's MQTT listener", mqtt, Duration::from_secs(20))?;
    wait_port("the agent's HTTP API", http, Duration::from_secs(20))?;
    let pid = agent.pid();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let r = rt.block_on(sample(&url, mosq.port, mqtt, pid, &key, v1, timing));
    drop(rt);
    let r = r.with_context(|| log_tail(&log))?;
    agent.check_alive().with_context(|| log_tail(&log))?;
    agent.terminate()?;
    hub.terminate()?;
    Ok(r)
}

/// What the subscriber collected.
#[derive(Default)]
struct Seen {
    batches: HashSet<(u64, u64)>,
    resent: u64,
    /// (n, ingest ts_ns, arrival ns, build sha256).
    outputs: Vec<(u64, i64, i64, [u8; 32])>,
    /// Outputs per n.
    by_n: BTreeMap<u64, u32>,
}

async fn post_json(http: &reqwest::Client, url: &str, body: &Value) -> Result<Value> {
    let resp = http.post(url).json(body).send().await?;
    let status = resp.status().as_u16();
    let v: Value = resp.json().await?;
    if status != 201 {
        bail!("POST {url}: {status} {v}");
    }
    Ok(v)
}

/// Creates a deployment of `version` and waits until it is done with the agent running it.
async fn deploy(http: &reqwest::Client, url: &str, version: &str) -> Result<()> {
    let d = post_json(
        http,
        &format!("{url}/api/v1/deployments"),
        &json!({
            "module": "threshold", "version": version, "config": {"limit": -1.0, "field": "n"}, "probation": "0s",
        }),
    )
    .await?;
    let id = d["id"].as_u64().with_context(|| format!("no deployment id: {d}"))?;
    wait_json(http, &format!("{url}/api/v1/deployments/{id}"), Duration::from_secs(120), |v| {
        v["state"] == "done" && v["agents"]["running"].as_u64() == Some(1)
    })
    .await
    .with_context(|| format!("waiting for the deployment of {version}"))
}

#[allow(clippy::too_many_arguments)]
async fn sample(
    url: &str,
    broker: u16,
    agent_mqtt: u16,
    pid: u32,
    key: &SecretKey,
    v1: &[u8],
    timing: Timing,
) -> Result<SwapResult> {
    let http = reqwest::Client::new();
    let v2 = brume_test_support::with_version(v1, "0.1.0", "0.2.0");
    let mut sha = Vec::new();
    for wasm in [v1, &v2[..]] {
        let resp = http
            .post(format!("{url}/api/v1/registry/modules"))
            .header("Brume-Signature", key.sign(wasm).to_string())
            .body(wasm.to_vec())
            .send()
            .await?;
        if resp.status().as_u16() != 201 {
            bail!("upload refused: {}", resp.text().await?);
        }
        sha.push(brume_signing::module_digest(wasm));
    }
    let name_of = |h: &[u8; 32]| {
        if *h == sha[0] {
            "v1"
        } else if *h == sha[1] {
            "v2"
        } else {
            "other"
        }
    };

    wait_json(&http, &format!("{url}/api/v1/fleet/agents"), Duration::from_secs(60), |v| {
        v.as_array().is_some_and(|a| a.iter().any(|a| a["agent_id"] == AGENT_ID && a["online"] == true))
    })
    .await
    .context("waiting for the agent's presence at the hub")?;

    // The subscriber listens before any output exists.
    let seen = Arc::new(Mutex::new(Seen::default()));
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let watcher = tokio::spawn(watch(broker, seen.clone(), ready_tx));
    tokio::time::timeout(Duration::from_secs(10), ready_rx)
        .await
        .context("no SUBACK for the batch subscription")?
        .context("the subscriber stopped before subscribing")?;

    deploy(&http, url, "0.1.0").await?;

    let (cpu0, ccpu0) = (cpu_secs(pid).unwrap_or(0.0), children_cpu_secs(pid).unwrap_or(0.0));
    let t0 = Instant::now();
    let sensor = Sensor::start(agent_mqtt, RATE);
    tokio::time::sleep(timing.first).await;
    let mut windows = Vec::new();
    let mut swaps = Vec::new();
    for (i, version) in ["0.2.0", "0.1.0", "0.2.0", "0.1.0"].into_iter().enumerate() {
        let (start, t) = (now_ns(), Instant::now());
        deploy(&http, url, version).await?;
        let end = now_ns();
        windows.push((start, end));
        swaps.push(Swap {
            version: if version == "0.1.0" { "v1" } else { "v2" },
            secs: t.elapsed().as_secs_f64(),
            max_ms: f64::NAN,
        });
        tokio::time::sleep(if i + 1 == SWAPS { timing.after } else { timing.between }).await;
    }
    let (acked, sent) = sensor.stop().await?;
    if acked.is_empty() {
        bail!("the agent acknowledged no reading");
    }
    let deadline = Instant::now() + DRAIN;
    loop {
        if watcher.is_finished() {
            return match watcher.await {
                Ok(Err(e)) => Err(e.context("the batch subscriber failed")),
                _ => bail!("the batch subscriber stopped"),
            };
        }
        let missing = {
            let s = lock(&seen);
            acked.iter().filter(|n| !s.by_n.contains_key(n)).count()
        };
        if missing == 0 {
            break;
        }
        if Instant::now() > deadline {
            bail!("{missing} of {} acknowledged inputs have no output {DRAIN:?} after the sensor stopped", acked.len());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let secs = t0.elapsed().as_secs_f64();
    let agent_cpu = cpu_secs(pid).unwrap_or(0.0) - cpu0;
    let children_cpu = children_cpu_secs(pid).unwrap_or(0.0) - ccpu0;
    // A moment for late duplicates to show up before they are counted.
    tokio::time::sleep(Duration::from_millis(500)).await;
    watcher.abort();

    let s = lock(&seen);
    let duplicated = s.by_n.values().filter(|c| **c > 1).count();
    let missing = acked.iter().filter(|n| !s.by_n.contains_key(n)).count();
    // Which build computed each input, by input order: one change per swap.
    let mut first: BTreeMap<u64, [u8; 32]> = BTreeMap::new();
    for (n, _, _, h) in &s.outputs {
        first.entry(*n).or_insert(*h);
    }
    let mut builds: Vec<&'static str> = Vec::new();
    for h in first.values() {
        let b = name_of(h);
        if builds.last() != Some(&b) {
            builds.push(b);
        }
    }
    let (mut during, mut steady) = (Vec::new(), Vec::new());
    let extend = AFTER_SWAP.as_nanos() as i64;
    for (_, ts, arrived, _) in &s.outputs {
        let ms = (arrived - ts) as f64 / 1e6;
        match windows.iter().position(|(a, b)| *a <= *ts && *ts <= b + extend) {
            Some(w) => {
                during.push(ms);
                let m = &mut swaps[w].max_ms;
                *m = if m.is_nan() { ms } else { m.max(ms) };
            }
            None => steady.push(ms),
        }
    }
    if missing > 0 || duplicated > 0 {
        bail!("{missing} acknowledged inputs without an output, {duplicated} with more than one");
    }
    if builds != ["v1", "v2", "v1", "v2", "v1"] {
        bail!("by input order the outputs were computed by {builds:?}, not v1, v2, v1, v2, v1 (one change per swap)");
    }
    Ok(SwapResult {
        during: Delays::of(during),
        steady: Delays::of(steady),
        swaps,
        acked: acked.len(),
        sent,
        missing,
        duplicated,
        resent: s.resent,
        builds,
        agent_cpu,
        children_cpu,
        secs,
    })
}

/// The passive subscriber on the agent's batch topic: records every module output.
async fn watch(port: u16, seen: Arc<Mutex<Seen>>, ready: tokio::sync::oneshot::Sender<()>) -> Result<()> {
    let mut opts = MqttOptions::new("bench-swap-watch", "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_max_packet_size(16 << 20, 16 << 20);
    let (client, mut el) = AsyncClient::new(opts, 100);
    client.subscribe(topics::batches(AGENT_ID), QoS::AtLeastOnce).await?;
    let mut ready = Some(ready);
    loop {
        match el.poll().await.context("subscriber connection")? {
            Event::Incoming(Packet::SubAck(_)) => {
                if let Some(r) = ready.take() {
                    let _ = r.send(());
                }
            }
            Event::Incoming(Packet::Publish(p)) => {
                let arrived = now_ns();
                let batch = AgentMessage::decode_batch(&p.payload).context("decoding a batch")?;
                let mut s = lock(&seen);
                if !s.batches.insert((batch.epoch, batch.seq)) {
                    s.resent += 1;
                    continue;
                }
                for (i, chunk) in batch.streams.iter().enumerate() {
                    let Some(m) = batch.module_of(i) else { continue };
                    for pt in &chunk.points {
                        let fields = pt.fields.decode().context("decoding an output's fields")?;
                        let n = fields
                            .iter()
                            .find(|f| f.name == "n")
                            .and_then(|f| match f.value {
                                FieldValue::F64(v) => Some(v as u64),
                                FieldValue::I64(v) => Some(v as u64),
                                _ => None,
                            })
                            .with_context(|| format!("an output of {} without a numeric n", chunk.stream))?;
                        s.outputs.push((n, pt.ts_ns, arrived, m.sha256));
                        *s.by_n.entry(n).or_default() += 1;
                    }
                }
            }
            _ => {}
        }
    }
}

/// A sensor publishing `{"n": <counter>}` at QoS 1 on `sensors/0` at a fixed rate,
/// remembering which numbers were acknowledged (as the end-to-end tests' sensor does).
struct Sensor {
    acked: Arc<Mutex<HashSet<u64>>>,
    sent: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Result<()>>,
}

impl Sensor {
    fn start(agent_port: u16, rate: u64) -> Sensor {
        let acked = Arc::new(Mutex::new(HashSet::new()));
        let sent = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, s, st) = (acked.clone(), sent.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let mut opts = MqttOptions::new("bench-swap-sensor", "127.0.0.1", agent_port);
            opts.set_keep_alive(Duration::from_secs(5));
            opts.set_inflight(100);
            // Room for many seconds of readings: a stalled listener shows as PUBACK delay,
            // not as a sensor error.
            let (client, mut el) = AsyncClient::new(opts, 100_000);
            // pkid assignment order = publish order; map pkid → reading number.
            let order: Arc<Mutex<VecDeque<u64>>> = Default::default();
            let pkids: Arc<Mutex<HashMap<u16, u64>>> = Default::default();
            let (o2, p2, a2) = (order.clone(), pkids.clone(), a.clone());
            let poller: tokio::task::JoinHandle<Result<()>> = tokio::spawn(async move {
                loop {
                    match el.poll().await.context("sensor connection")? {
                        Event::Outgoing(Outgoing::Publish(pkid)) => {
                            if let Some(n) = lock(&o2).pop_front() {
                                lock(&p2).insert(pkid, n);
                            }
                        }
                        Event::Incoming(Packet::PubAck(ack)) => {
                            if let Some(n) = lock(&p2).remove(&ack.pkid) {
                                lock(&a2).insert(n);
                            }
                        }
                        _ => {}
                    }
                }
            });
            let start = Instant::now();
            let mut n = 0u64;
            while !st.load(Ordering::SeqCst) {
                if poller.is_finished() {
                    return match poller.await {
                        Ok(Err(e)) => Err(e),
                        _ => Err(anyhow::anyhow!("the sensor's event loop stopped")),
                    };
                }
                let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
                while n < due {
                    lock(&order).push_back(n);
                    if let Err(e) = client.try_publish("sensors/0", QoS::AtLeastOnce, false, format!("{{\"n\":{n}}}")) {
                        lock(&order).pop_back();
                        bail!("the sensor's queue is full: {e}");
                    }
                    n += 1;
                    s.store(n, Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            // Let outstanding PUBACKs arrive.
            let _ = tokio::time::timeout(Duration::from_secs(5), async {
                while !poller.is_finished() && (!lock(&pkids).is_empty() || !lock(&order).is_empty()) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
            .await;
            if poller.is_finished() {
                return match poller.await {
                    Ok(Err(e)) => Err(e),
                    _ => Err(anyhow::anyhow!("the sensor's event loop stopped")),
                };
            }
            let _ = client.disconnect().await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            poller.abort();
            Ok(())
        });
        Sensor { acked, sent, stop, task }
    }

    /// Stops publishing; returns the acknowledged numbers and how many were published.
    async fn stop(self) -> Result<(HashSet<u64>, u64)> {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.context("the sensor task")?.context("the sensor")?;
        let acked = lock(&self.acked).clone();
        Ok((acked, self.sent.load(Ordering::SeqCst)))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
