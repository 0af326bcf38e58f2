//! Benchmark 8: a module rollout to a fleet. N simulated agents in this process, each its
//! own MQTT connection to a private mosquitto, publish their presence, take the desired
//! state the hub publishes, download the module from the hub over HTTP, check its sha256
//! and signature as the agent does, and report it running. One release `cloud-hub`
//! process on its default SQLite store with the default `fleet.reconcile_interval`.
//! Measured: time from creating the deployment to every agent running it (the hub's
//! deployment `done`), the hub's CPU time and peak RSS, and the bytes it served.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use brume_protocol::{AgentReport, AgentStatus, DesiredState, ModuleReportV1, Phase, ReportV1, StatusV1, topics};
use brume_signing::{Keyring, SecretKey, Signature};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{Value, json};

use crate::util::{Mosquitto, proc_status_bytes, spawn_hub};

/// What one rollout measured.
pub struct RolloutResult {
    /// Deployment created → every agent running it (hub says done).
    pub secs: f64,
    /// Deployment created → the last agent had downloaded and verified the module.
    pub downloaded_secs: f64,
    /// Hub CPU seconds over the rollout.
    pub hub_cpu: f64,
    /// mosquitto CPU seconds over the rollout.
    pub broker_cpu: f64,
    /// Hub peak RSS over its life (VmHWM), bytes.
    pub hub_hwm: u64,
    /// Module bytes the agents downloaded.
    pub bytes: u64,
    /// Module size.
    pub module_bytes: u64,
    /// Downloads the simulated agents had to try again.
    pub retries: u64,
}

/// Runs one rollout of `module` (the threshold example) to `agents` simulated agents in
/// `waves`.
pub fn run(exe: &Path, module: &[u8], agents: usize, waves: &[&str]) -> Result<RolloutResult> {
    let mosq = Mosquitto::start()?;
    let dir = tempfile::tempdir()?;
    let key = SecretKey::generate();
    let (mut hub, http) = spawn_hub(
        exe,
        dir.path(),
        &dir.path().join("data"),
        mosq.port,
        &format!("[fleet]\ntrusted_keys = [{:?}]", key.public().to_string()),
    )?;
    let url = format!("http://127.0.0.1:{http}");
    let keyring = Arc::new(Keyring::new(vec![key.public()]));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let port = mosq.port;
    let module = module.to_vec();
    let module_bytes = module.len() as u64;
    let hub_pid = hub.pid();
    let mosq_pid = mosq.pid();
    let waves: Vec<String> = waves.iter().map(|w| w.to_string()).collect();
    let r = rt.block_on(async move {
        let http = reqwest::Client::new();
        let resp = http
            .post(format!("{url}/api/v1/registry/modules"))
            .header("Brume-Signature", key.sign(&module).to_string())
            .body(module.clone())
            .send()
            .await?;
        if resp.status().as_u16() != 201 {
            bail!("upload refused: {}", resp.text().await?);
        }
        let downloaded = Arc::new(AtomicU64::new(0));
        let bytes = Arc::new(AtomicU64::new(0));
        let retries = Arc::new(AtomicU64::new(0));
        let epoch = Instant::now();
        let last_download_ms = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for a in 0..agents {
            tasks.push(tokio::spawn(sim_agent(
                port,
                format!("roll-{a:05}"),
                url.clone(),
                http.clone(),
                keyring.clone(),
                downloaded.clone(),
                bytes.clone(),
                retries.clone(),
                (epoch, last_download_ms.clone()),
            )));
        }
        // Every agent's presence stored before the clock starts.
        wait_json(&http, &format!("{url}/api/v1/fleet/agents"), Duration::from_secs(300), |v| {
            v.as_array().is_some_and(|a| a.len() == agents)
        })
        .await
        .context("waiting for every agent's presence at the hub")?;
        let (cpu0, bcpu0) =
            (crate::util::cpu_secs(hub_pid).unwrap_or(0.0), crate::util::cpu_secs(mosq_pid).unwrap_or(0.0));
        let start = Instant::now();
        let start_ms = epoch.elapsed().as_millis() as u64;
        let d: Value = http
            .post(format!("{url}/api/v1/deployments"))
            .json(&json!({
                "module": "threshold", "version": "0.1.0", "config": {"limit": 80.0},
                "selector": {"site": "bench"}, "waves": waves, "probation": "0s",
            }))
            .send()
            .await?
            .json()
            .await?;
        let id = d["id"].as_u64().with_context(|| format!("no deployment id: {d}"))?;
        wait_json(&http, &format!("{url}/api/v1/deployments/{id}"), Duration::from_secs(600), |v| {
            v["state"] == "done" && v["agents"]["running"].as_u64() == Some(agents as u64)
        })
        .await
        .context("waiting for the rollout to finish")?;
        let secs = start.elapsed().as_secs_f64();
        let hub_cpu = crate::util::cpu_secs(hub_pid).unwrap_or(0.0) - cpu0;
        let broker_cpu = crate::util::cpu_secs(mosq_pid).unwrap_or(0.0) - bcpu0;
        for t in &tasks {
            t.abort();
        }
        let downloaded_secs = (last_download_ms.load(Ordering::SeqCst).saturating_sub(start_ms)) as f64 / 1000.0;
        if downloaded.load(Ordering::SeqCst) != agents as u64 {
            bail!("{} of {agents} agents downloaded the module", downloaded.load(Ordering::SeqCst));
        }
        Ok(RolloutResult {
            secs,
            downloaded_secs,
            hub_cpu,
            broker_cpu,
            hub_hwm: 0,
            bytes: bytes.load(Ordering::SeqCst),
            module_bytes,
            retries: retries.load(Ordering::SeqCst),
        })
    });
    let mut r = r?;
    r.hub_hwm = proc_status_bytes(hub_pid, "VmHWM").unwrap_or(0);
    hub.terminate()?;
    Ok(r)
}

/// Polls `url` until its JSON satisfies `ok`.
pub(crate) async fn wait_json(
    http: &reqwest::Client,
    url: &str,
    within: Duration,
    ok: impl Fn(&Value) -> bool,
) -> Result<()> {
    let start = Instant::now();
    loop {
        if let Ok(r) = http.get(url).send().await
            && let Ok(v) = r.json::<Value>().await
            && ok(&v)
        {
            return Ok(());
        }
        if start.elapsed() > within {
            bail!("not reached within {within:?}: {url}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One simulated agent: presence, desired states, download and verify, report.
#[allow(clippy::too_many_arguments)]
async fn sim_agent(
    port: u16,
    id: String,
    hub: String,
    http: reqwest::Client,
    keyring: Arc<Keyring>,
    downloaded: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
    retries: Arc<AtomicU64>,
    (epoch, last_download_ms): (Instant, Arc<AtomicU64>),
) -> Result<()> {
    let mut opts = MqttOptions::new(format!("bench-{id}"), "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(60));
    opts.set_max_packet_size(16 << 20, 16 << 20);
    let (client, mut el) = AsyncClient::new(opts, 16);
    client.subscribe(topics::desired(&id), QoS::AtLeastOnce).await?;
    let status = AgentStatus::V1(StatusV1 {
        agent_id: id.clone(),
        online: true,
        version: "bench".into(),
        started_ms: 0,
        sent_ms: 0,
        heartbeat_s: 600,
        store_readings: 0,
        outbox_batches: 0,
        outbox_readings: 0,
        modules: vec![],
        labels: vec![("site".into(), "bench".into())],
    });
    client.publish(topics::status(&id), QoS::AtLeastOnce, true, status.encode()).await?;
    let mut applied = 0u64;
    loop {
        let Event::Incoming(Packet::Publish(p)) = el.poll().await? else { continue };
        let Ok(d) = DesiredState::decode(&p.payload) else { continue };
        if d.generation <= applied {
            continue;
        }
        applied = d.generation;
        let mut modules = Vec::new();
        for m in &d.modules {
            // As the agent does: a failed download is tried again after 2 s.
            let url = format!("{hub}/api/v1/registry/modules/{}", m.module.sha256_hex());
            let mut attempts = 0;
            let body = loop {
                attempts += 1;
                match http.get(&url).send().await.and_then(|r| r.error_for_status()) {
                    Ok(r) => break r.bytes().await?,
                    Err(_) if attempts < 10 => {
                        retries.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_secs(2)).await;
                    }
                    Err(e) => bail!("{id}: download failed {attempts} times: {e}"),
                }
            };
            bytes.fetch_add(body.len() as u64, Ordering::SeqCst);
            let sig: Signature = m.signature.parse()?;
            let digest = brume_signing::module_digest(&body);
            if digest != m.module.sha256 {
                bail!("{id}: downloaded bytes do not match");
            }
            keyring.verify(&digest, &sig)?;
            downloaded.fetch_add(1, Ordering::SeqCst);
            last_download_ms.fetch_max(epoch.elapsed().as_millis() as u64, Ordering::SeqCst);
            modules.push(ModuleReportV1 {
                name: m.module.name.clone(),
                deployment: m.deployment,
                wanted: m.module.clone(),
                phase: Phase::Running,
                running: Some(m.module.clone()),
                error: String::new(),
                batches_ok: 0,
                batches_failed: 0,
            });
        }
        let r = AgentReport::V1(ReportV1 { agent_id: id.clone(), sent_ms: 0, generation: applied, modules });
        client.publish(topics::report(&id), QoS::AtLeastOnce, true, r.encode()).await?;
    }
}
