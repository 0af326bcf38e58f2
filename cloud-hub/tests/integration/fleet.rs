//! The control plane at the hub: registry uploads (signatures, refusals, idempotence),
//! resumable downloads, and a deployment reaching a simulated agent as a retained
//! desired state, advanced by the agent's reports.

use std::time::{Duration, Instant};

use brume_protocol::{AgentReport, Desired, DesiredState, ModuleReportV1, Phase, ReportV1, topics};
use brume_signing::SecretKey;
use brume_test_support::{built_module_bytes, with_version};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::util::{DEADLINE, Hub, Mosquitto};

/// POSTs a module with an optional signature header.
async fn upload(hub: &Hub, wasm: &[u8], signature: Option<String>) -> (u16, Value) {
    let mut req = reqwest::Client::new().post(format!("{}/api/v1/registry/modules", hub.url)).body(wasm.to_vec());
    if let Some(s) = signature {
        req = req.header("Brume-Signature", s);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

async fn post_json(hub: &Hub, path: &str, body: Value) -> (u16, Value) {
    let resp = reqwest::Client::new().post(format!("{}{path}", hub.url)).json(&body).send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

fn error_of(v: &Value) -> &str {
    v["error"].as_str().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_refuses_unsigned_untrusted_tampered_and_overwrites() {
    let broker = Mosquitto::start().expect("starting mosquitto");
    let key = SecretKey::generate();
    let other = SecretKey::generate();
    let trusted = key.public().to_string();
    let hub = Hub::start_with(broker.port, |c| c.fleet.trusted_keys = vec![trusted]).await;
    let v1 = built_module_bytes("threshold");

    let (status, body) = upload(&hub, &v1, None).await;
    assert_eq!(status, 403, "{body}");
    assert!(error_of(&body).contains("not signed"), "{body}");

    let (status, body) = upload(&hub, &v1, Some(other.sign(&v1).to_string())).await;
    assert_eq!(status, 403, "{body}");
    assert!(error_of(&body).contains("not among the trusted keys"), "{body}");

    let mut tampered = v1.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    let (status, body) = upload(&hub, &tampered, Some(key.sign(&v1).to_string())).await;
    assert_eq!(status, 403, "{body}");
    assert!(error_of(&body).contains("does not match this module"), "{body}");

    let garbage = b"\0asm not really a module".to_vec();
    let (status, body) = upload(&hub, &garbage, Some(key.sign(&garbage).to_string())).await;
    assert_eq!(status, 400, "a signed module that does not load: {body}");
    assert!(error_of(&body).contains("does not load"), "{body}");

    let (status, body) = upload(&hub, &v1, Some(key.sign(&v1).to_string())).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!((body["name"].as_str(), body["version"].as_str()), (Some("threshold"), Some("0.1.0")));
    assert_eq!(body["key_id"], json!(key.public().id().to_string()));
    assert_eq!(body["manifest"]["outputs"], json!(["alerts/threshold"]));
    let sha = body["sha256"].as_str().unwrap().to_owned();
    assert_eq!(sha, brume_signing::to_hex(&brume_signing::module_digest(&v1)));
    let (status, _) = upload(&hub, &v1, Some(key.sign(&v1).to_string())).await;
    assert_eq!(status, 200, "the same bytes again: idempotent");

    // Same name and version, other bytes (a rebuild that forgot to bump the version).
    let mut rebuilt = v1.clone();
    rebuilt.extend_from_slice(&[0, 4, 3, b'p', b'a', b'd']); // an extra empty custom section "pad"
    let (status, body) = upload(&hub, &rebuilt, Some(key.sign(&rebuilt).to_string())).await;
    assert_eq!(status, 409, "{body}");
    assert!(error_of(&body).contains("never overwritten"), "{body}");

    let v2 = with_version(&v1, "0.1.0", "0.2.0");
    assert_eq!(upload(&hub, &v2, Some(key.sign(&v2).to_string())).await.0, 201);
    let list = hub.get_json("/api/v1/registry/modules?name=threshold").await;
    let versions: Vec<&str> = list.as_array().unwrap().iter().map(|m| m["version"].as_str().unwrap()).collect();
    assert_eq!(versions, ["0.1.0", "0.2.0"]);

    // Download: whole, then resumed from an offset.
    let http = reqwest::Client::new();
    let url = format!("{}/api/v1/registry/modules/{sha}", hub.url);
    let whole = http.get(&url).send().await.unwrap();
    assert_eq!(whole.status().as_u16(), 200);
    assert_eq!(whole.headers()["brume-signature"].to_str().unwrap(), key.sign(&v1).to_string());
    assert_eq!(whole.bytes().await.unwrap().as_ref(), v1.as_slice());
    let rest = http.get(&url).header("Range", "bytes=1000-").send().await.unwrap();
    assert_eq!(rest.status().as_u16(), 206);
    assert_eq!(rest.headers()["content-range"].to_str().unwrap(), format!("bytes 1000-{}/{}", v1.len() - 1, v1.len()));
    assert_eq!(rest.bytes().await.unwrap().as_ref(), &v1[1000..]);
    let past = http.get(&url).header("Range", format!("bytes={}-", v1.len())).send().await.unwrap();
    assert_eq!(past.status().as_u16(), 416);
    assert_eq!(hub.get(&format!("/api/v1/registry/modules/{}", "0".repeat(64))).await.0, 404);
    hub.stop().await;
}

/// The registry serves each module compiled for every device architecture: what the
/// hub's `Precompiler` makes of those bytes (compilation is deterministic, so any hub
/// serves the same code), with its sha256 in a header. This hub caches nothing
/// (`blob_cache = 0`), so every request compiles on demand. Refusals: an unknown
/// target, an agent of another wasmtime release, an unknown module.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_serves_modules_precompiled_per_architecture() {
    use brume_wasm_host::{ENGINE_VERSION, Precompiler, Target};
    let broker = Mosquitto::start().expect("starting mosquitto");
    let key = SecretKey::generate();
    let trusted = key.public().to_string();
    let hub = Hub::start_with(broker.port, |c| {
        c.fleet.trusted_keys = vec![trusted];
        c.fleet.blob_cache = bytesize::ByteSize::b(0);
    })
    .await;
    let v1 = built_module_bytes("threshold");
    let (status, body) = upload(&hub, &v1, Some(key.sign(&v1).to_string())).await;
    assert_eq!(status, 201, "{body}");
    let sha = body["sha256"].as_str().unwrap().to_owned();
    let precompiler = Precompiler::new().unwrap();
    let http = reqwest::Client::new();
    for target in Target::ALL {
        let url = format!("{}/api/v1/registry/modules/{sha}/precompiled/{target}?engine={ENGINE_VERSION}", hub.url);
        let resp = http.get(&url).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 200, "{target}");
        let announced = resp.headers()["brume-artifact-sha256"].to_str().unwrap().to_owned();
        let code = resp.bytes().await.unwrap();
        assert_eq!(announced, brume_signing::to_hex(&brume_signing::module_digest(&code)), "{target}");
        assert_eq!(code.as_ref(), precompiler.precompile(target, &v1).unwrap().as_slice(), "{target}");
    }
    let base = format!("{}/api/v1/registry/modules", hub.url);
    let (status, body) = hub.get(&format!("/api/v1/registry/modules/{sha}/precompiled/mips")).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("unknown target"), "{body}");
    let resp = http.get(format!("{base}/{sha}/precompiled/armv7?engine=wasmtime-1.0.0")).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 409);
    assert!(resp.text().await.unwrap().contains("same Brume release"));
    assert_eq!(hub.get(&format!("/api/v1/registry/modules/{}/precompiled/aarch64", "0".repeat(64))).await.0, 404);
    hub.stop().await;
}

/// A simulated agent on the control plane: publishes presence and reports, receives
/// its desired states.
struct FleetAgent {
    id: String,
    client: AsyncClient,
    desired: mpsc::UnboundedReceiver<Desired>,
}

impl FleetAgent {
    async fn connect(port: u16, id: &str, labels: &[(&str, &str)]) -> FleetAgent {
        let mut opts = MqttOptions::new(format!("fleet-test-{id}"), "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_max_packet_size(16 << 20, 16 << 20);
        let (client, mut eventloop) = AsyncClient::new(opts, 64);
        let (tx, desired) = mpsc::unbounded_channel();
        let topic = topics::desired(id);
        client.subscribe(topic.clone(), QoS::AtLeastOnce).await.unwrap();
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) if p.topic == topic => {
                        let d = DesiredState::decode(&p.payload).expect("desired state decodes");
                        if tx.send(d).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        });
        let status = super::util::status(id, labels);
        client.publish(topics::status(id), QoS::AtLeastOnce, true, status.encode()).await.unwrap();
        FleetAgent { id: id.into(), client, desired }
    }

    /// The next desired state with a module list (skips nothing: asserts order).
    async fn next_desired(&mut self) -> Desired {
        tokio::time::timeout(DEADLINE, self.desired.recv()).await.expect("no desired state").unwrap()
    }

    async fn report(&self, generation: u64, d: &Desired, phase: Phase) {
        let r = AgentReport::V1(ReportV1 {
            agent_id: self.id.clone(),
            sent_ms: brume_now_ms(),
            generation,
            modules: d
                .modules
                .iter()
                .map(|m| ModuleReportV1 {
                    name: m.module.name.clone(),
                    deployment: m.deployment,
                    wanted: m.module.clone(),
                    phase,
                    running: (phase == Phase::Running).then(|| m.module.clone()),
                    error: String::new(),
                    batches_ok: 0,
                    batches_failed: 0,
                })
                .collect(),
        });
        self.client.publish(topics::report(&self.id), QoS::AtLeastOnce, true, r.encode()).await.unwrap();
    }
}

fn brume_now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

async fn eventually_json(hub: &Hub, path: &str, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        let v = hub.get_json(path).await;
        if ok(&v) {
            return v;
        }
        assert!(start.elapsed() < DEADLINE, "{what}: last {path}: {v:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_reaches_matching_agents_in_waves_and_completes_on_their_reports() {
    let broker = Mosquitto::start().expect("starting mosquitto");
    let key = SecretKey::generate();
    let trusted = key.public().to_string();
    let hub = Hub::start_with(broker.port, |c| {
        c.fleet.trusted_keys = vec![trusted];
        c.fleet.reconcile_interval = Duration::from_millis(200);
    })
    .await;
    let v1 = built_module_bytes("threshold");
    assert_eq!(upload(&hub, &v1, Some(key.sign(&v1).to_string())).await.0, 201);

    let mut a1 = FleetAgent::connect(broker.port, "a1", &[("site", "plant-1")]).await;
    let mut a2 = FleetAgent::connect(broker.port, "a2", &[("site", "plant-1")]).await;
    let b1 = FleetAgent::connect(broker.port, "b1", &[("site", "plant-2")]).await;
    eventually_json(&hub, "/api/v1/fleet/agents", "three agents known", |v| v.as_array().unwrap().len() == 3).await;

    let (status, body) = post_json(&hub, "/api/v1/deployments", json!({"module": "nope", "version": "1"})).await;
    assert_eq!(status, 400);
    assert!(error_of(&body).contains("not in the registry"), "{body}");
    let (status, body) =
        post_json(&hub, "/api/v1/deployments", json!({"module": "threshold", "version": "0.1.0", "waves": ["0"]}))
            .await;
    assert_eq!(status, 400);
    assert!(error_of(&body).contains("wave"), "{body}");
    // What agents would refuse to decode is refused here, naming the field.
    let (status, body) = post_json(
        &hub,
        "/api/v1/deployments",
        json!({"module": "threshold", "version": "0.1.0", "inputs": ["a/\u{7}"]}),
    )
    .await;
    assert_eq!(status, 400);
    assert!(error_of(&body).contains("inputs") && error_of(&body).contains("control character"), "{body}");

    let (status, d) = post_json(
        &hub,
        "/api/v1/deployments",
        json!({
            "module": "threshold", "version": "0.1.0", "config": {"limit": 50.0},
            "selector": {"site": "plant-1"}, "waves": ["1", "100%"], "probation": "0s",
        }),
    )
    .await;
    assert_eq!(status, 201, "{d}");
    let id = d["id"].as_u64().unwrap();
    assert_eq!(d["state"], "rolling");

    // Wave 0: one of the two plant-1 agents gets generation 1 with the module.
    let (desired, a1_first) = tokio::select! {
        d = a1.next_desired() => (d, true),
        d = a2.next_desired() => (d, false),
    };
    let (first, second) = if a1_first { (&mut a1, &mut a2) } else { (&mut a2, &mut a1) };
    assert_eq!(desired.generation, 1);
    assert_eq!(desired.modules.len(), 1);
    let m = &desired.modules[0];
    assert_eq!((m.module.name.as_str(), m.module.version.as_str()), ("threshold", "0.1.0"));
    assert_eq!(m.module.sha256, brume_signing::module_digest(&v1));
    assert_eq!(m.signature, key.sign(&v1).to_string());
    assert_eq!(m.config_json, r#"{"limit":50.0}"#);
    assert_eq!((m.deployment, m.size), (id, v1.len() as u64));
    let progress = hub.get_json(&format!("/api/v1/deployments/{id}")).await;
    assert_eq!(progress["wave"], 0);
    assert_eq!(progress["agents"], json!({"pending": 1}), "{progress:#}");

    // It reports running: the second wave starts and the other agent gets it.
    first.report(1, &desired, Phase::Running).await;
    let d2 = second.next_desired().await;
    assert_eq!((d2.generation, d2.modules[0].module.version.as_str()), (1, "0.1.0"));
    second.report(1, &d2, Phase::Running).await;
    let done =
        eventually_json(&hub, &format!("/api/v1/deployments/{id}"), "deployment done", |v| v["state"] == "done").await;
    assert_eq!(done["agents"], json!({"running": 2}), "{done:#}");
    let agents = hub.get_json("/api/v1/fleet/agents").await;
    let b = agents.as_array().unwrap().iter().find(|a| a["agent_id"] == "b1").unwrap();
    assert_eq!(b["desired_generation"], 0, "the selector does not match b1: {agents:#}");
    drop(b1);

    // Rolling it back withdraws it: generation 2 with no module, for both agents.
    let (status, body) =
        post_json(&hub, &format!("/api/v1/deployments/{id}/rollback"), json!({"reason": "test"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!((body["state"].as_str(), body["reason"].as_str()), (Some("rolled_back"), Some("test")));
    for a in [first, second] {
        let d = a.next_desired().await;
        assert_eq!((d.generation, d.modules.len()), (2, 0));
    }
    let (status, body) = post_json(&hub, &format!("/api/v1/deployments/{id}/pause"), json!({})).await;
    assert_eq!(status, 409, "{body}");
    assert!(error_of(&body).contains("rolled_back"), "{body}");

    // A late subscriber (an agent back from offline) gets the latest state, retained.
    let mut late = FleetAgent::connect(broker.port, "a1", &[("site", "plant-1")]).await;
    let d = late.next_desired().await;
    assert_eq!(d.generation, 2, "the retained desired state is the latest");
    hub.stop().await;
}
