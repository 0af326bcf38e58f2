//! Module rollouts end to end with real processes: a hub with a module registry, agents
//! taking modules from deployments, readings flowing through the swap.
//!
//! The threshold example with `limit = -1` on field `n` forwards every reading, so each
//! input reading must have exactly one output at the hub, from whichever build ran it:
//! a swap that lost or repeated a reading shows up as a missing or doubled `n`.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::Duration;

use brume_e2e::{Agent, Hub, Mosquitto, Sensor, wait_until};
use brume_signing::SecretKey;
use brume_test_support::{built_module_bytes, stub_module_wat, with_version};
use rumqttc::{AsyncClient, MqttOptions, QoS};
use serde_json::{Value, json};

const AGENT: &str = env!("CARGO_BIN_EXE_e2e-edge-agent");
const HUB: &str = env!("CARGO_BIN_EXE_e2e-cloud-hub");

async fn upload(hub: &Hub, key: &SecretKey, wasm: &[u8]) -> Value {
    let resp = reqwest::Client::new()
        .post(format!("{}/api/v1/registry/modules", hub.url))
        .header("Brume-Signature", key.sign(wasm).to_string())
        .body(wasm.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201);
    resp.json().await.unwrap()
}

async fn deploy(hub: &Hub, body: Value) -> u64 {
    let resp = reqwest::Client::new().post(format!("{}/api/v1/deployments", hub.url)).json(&body).send().await.unwrap();
    let status = resp.status().as_u16();
    let v: Value = resp.json().await.unwrap();
    assert_eq!(status, 201, "{v}");
    v["id"].as_u64().unwrap()
}

async fn get(hub: &Hub, path: &str) -> Value {
    reqwest::get(format!("{}{path}", hub.url)).await.unwrap().json().await.unwrap()
}

/// Waits until deployment `id` has `n` agents running it and is done; on timeout,
/// panics with the deployment and the agents' logs.
async fn wait_running(hub: &Hub, id: u64, n: u64, agents: &[&Agent]) {
    let path = format!("/api/v1/deployments/{id}");
    let start = std::time::Instant::now();
    loop {
        let d = get(hub, &path).await;
        if d["state"] == "done" && d["agents"]["running"] == n {
            return;
        }
        if start.elapsed() > Duration::from_secs(90) {
            let logs: Vec<String> = agents.iter().map(|a| a.log()).collect();
            panic!("deployment {id} not done on {n} agents: {d:#}\nagent logs:\n{}", logs.join("\n----\n"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A hub trusting the publisher key `public`, reconciling every 200 ms.
async fn start_hub(broker_port: u16, public: &str) -> Hub {
    let fleet = format!("[fleet]\ntrusted_keys = [{public:?}]\nreconcile_interval = \"200ms\"\n");
    Hub::start_with(Path::new(HUB), broker_port, &fleet).await.unwrap()
}

/// A hub signing key (`mqtt.signing_key`) in a temporary directory: the hub's `[mqtt]`
/// line and the agents' `forward.hub_keys` line.
fn hub_signing_key() -> (tempfile::TempDir, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let key = SecretKey::generate();
    let path = dir.path().join("hub.key");
    key.write_new(&path).unwrap();
    (dir, format!("signing_key = {path:?}"), format!("hub_keys = [{:?}]", key.public().to_string()))
}

fn fleet_config(hub: &Hub, key: &SecretKey) -> String {
    format!("hub_url = {:?}\ntrusted_keys = [{:?}]", hub.url, key.public().to_string())
}

/// Per agent at the hub: the input numbers (stream `sensors/0`) and the outputs
/// (`alerts/threshold`) as (n, module sha256), in the agent's order.
async fn at_hub(hub: &Hub) -> (BTreeMap<String, Vec<u64>>, BTreeMap<String, Vec<(u64, String)>>) {
    let mut inputs: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for r in hub.readings("sensors/0").await.unwrap() {
        inputs
            .entry(r["agent_id"].as_str().unwrap().to_owned())
            .or_default()
            .push(r["fields"]["n"].as_f64().unwrap() as u64);
    }
    let mut outputs: BTreeMap<String, Vec<(u64, String)>> = BTreeMap::new();
    for r in hub.readings("alerts/threshold").await.unwrap() {
        outputs.entry(r["agent_id"].as_str().unwrap().to_owned()).or_default().push((
            r["fields"]["n"].as_f64().unwrap() as u64,
            r["module"]["sha256"].as_str().unwrap_or("none").to_owned(),
        ));
    }
    for v in outputs.values_mut() {
        v.sort();
    }
    (inputs, outputs)
}

/// v1 deployed to five agents, then v2 rolled out in two waves while readings flow,
/// with one agent offline during the rollout. Every input reading has exactly one output
/// at the hub, each agent switches from v1 to v2 exactly once (by input order), the
/// offline agent gets v2 (not v1) when it returns, and a replayed old desired state
/// does not move it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollout_of_v2_in_waves_loses_and_repeats_nothing() {
    let broker = Mosquitto::start().unwrap();
    let key = SecretKey::generate();
    // The hub signs its messages and the agents act only on signed ones: the whole
    // rollout runs on signed desired states and acks.
    let (hub_key_dir, signing, hub_keys) = hub_signing_key();
    let fleet = format!("[fleet]\ntrusted_keys = [{:?}]\nreconcile_interval = \"200ms\"\n", key.public().to_string());
    let hub = Hub::start_with_mqtt(Path::new(HUB), broker.port, &signing, &fleet).await.unwrap();
    let v1 = built_module_bytes("threshold");
    let v2 = with_version(&v1, "0.1.0", "0.2.0");
    let v1_sha = upload(&hub, &key, &v1).await["sha256"].as_str().unwrap().to_owned();
    let v2_sha = upload(&hub, &key, &v2).await["sha256"].as_str().unwrap().to_owned();

    let fleet = fleet_config(&hub, &key);
    let mut agents = Vec::new();
    for i in 0..5 {
        let extra = [("fleet", fleet.as_str()), ("labels", "site = \"plant-1\""), ("forward", hub_keys.as_str())];
        agents.push(Agent::start(Path::new(AGENT), &format!("edge-{i}"), broker.port, &extra).await.unwrap());
    }
    let config = json!({"limit": -1.0, "field": "n"});
    let d1 = deploy(
        &hub,
        json!({"module": "threshold", "version": "0.1.0", "config": config, "selector": {"site": "plant-1"}, "probation": "0s"}),
    )
    .await;
    wait_running(&hub, d1, 5, &agents.iter().collect::<Vec<_>>()).await;

    let sensors: Vec<Sensor> = agents.iter().map(|a| Sensor::start_named(a.mqtt_port, "sensors", 1, 40)).collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    // edge-4 goes offline before the rollout (cleanly: it says so).
    let mut offline = agents.pop().unwrap();
    offline.proc.terminate();

    let d2 = deploy(
        &hub,
        json!({
            "module": "threshold", "version": "0.2.0", "config": config, "selector": {"site": "plant-1"},
            "waves": ["1", "100%"], "probation": "2s",
        }),
    )
    .await;
    wait_running(&hub, d2, 4, &agents.iter().collect::<Vec<_>>()).await;
    let progress = get(&hub, &format!("/api/v1/deployments/{d2}")).await;
    let waves: Vec<u64> =
        progress["agent_progress"].as_array().unwrap().iter().filter_map(|a| a["wave"].as_u64()).collect();
    assert_eq!(waves.iter().filter(|w| **w == 0).count(), 1, "one canary agent in wave 0: {progress:#}");
    assert_eq!(waves.len(), 5, "the offline agent is in the last wave: {progress:#}");

    // The offline agent returns: it gets v2 straight away, never v1 again.
    offline.restart().await.unwrap();
    agents.push(offline);
    wait_running(&hub, d2, 5, &agents.iter().collect::<Vec<_>>()).await;

    // A replayed old desired state (generation 1, v1, signed by the hub as a recorded
    // genuine message would be) changes nothing.
    let old = brume_protocol::DesiredState::V1(brume_protocol::DesiredV1 {
        agent_id: "edge-4".into(),
        generation: 1,
        issued_ms: 0,
        modules: vec![],
    });
    let topic = brume_protocol::topics::desired("edge-4");
    let hub_key = SecretKey::read(&hub_key_dir.path().join("hub.key")).unwrap();
    let (key_id, signature) = hub_key.sign_hub_message(&topic, &old.encode());
    let replayed = brume_protocol::HubKind::Desired.seal(brume_protocol::SignedV1 {
        message: old.encode(),
        key_id: key_id.0,
        signature: signature.to_vec(),
    });
    let (client, mut el) = AsyncClient::new(MqttOptions::new("replayer", "127.0.0.1", broker.port), 10);
    client.publish(topic, QoS::AtLeastOnce, false, replayed).await.unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            if let Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) = el.poll().await {
                break;
            }
        }
    })
    .await;
    let edge4 = &agents[4];
    wait_until("the replayed desired state counted as stale", Duration::from_secs(10), || async {
        match reqwest::get(format!("{}/metrics", edge4.url)).await {
            Ok(r) => {
                r.text().await.unwrap_or_default().contains("brume_agent_desired_states_total{result=\"stale\"} 1")
            }
            Err(_) => false,
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", edge4.log()));

    let mut acked: BTreeMap<String, HashSet<u64>> = BTreeMap::new();
    for (s, a) in sensors.into_iter().zip(&agents) {
        let id = a.status().await.unwrap()["agent_id"].as_str().unwrap().to_owned();
        acked.insert(id, s.stop().await.0);
    }
    for a in &agents {
        a.wait_drained(Duration::from_secs(60)).await;
    }
    // Every input processed and forwarded: as many outputs as inputs, per agent.
    wait_until("every input's output at the hub", Duration::from_secs(60), || async {
        let (i, o) = at_hub(&hub).await;
        i.len() == 5 && i.iter().all(|(a, ins)| o.get(a).is_some_and(|outs| outs.len() >= ins.len()))
    })
    .await
    .unwrap();
    let (inputs, outputs) = at_hub(&hub).await;
    for (agent, ins) in &inputs {
        let mut ins = ins.clone();
        ins.sort();
        let uniq: HashSet<u64> = ins.iter().copied().collect();
        assert_eq!(uniq.len(), ins.len(), "{agent}: an input stored twice");
        assert!(acked[agent].is_subset(&uniq), "{agent}: an acknowledged reading is missing at the hub");
        let outs = &outputs[agent];
        let ns: Vec<u64> = outs.iter().map(|(n, _)| *n).collect();
        assert_eq!(ns, ins, "{agent}: exactly one output per input reading");
        // One switch from v1 to v2, by input order; v2 at the end.
        let hashes: Vec<&str> = outs.iter().map(|(_, h)| h.as_str()).collect();
        let switch = hashes.iter().position(|h| *h == v2_sha).unwrap_or(hashes.len());
        assert!(hashes[..switch].iter().all(|h| *h == v1_sha), "{agent}: outputs before the swap are v1's");
        assert!(hashes[switch..].iter().all(|h| *h == v2_sha), "{agent}: after the swap, only v2");
        assert!(switch < hashes.len(), "{agent}: v2 processed readings");
    }
    let agents_view = get(&hub, "/api/v1/fleet/agents").await;
    for a in agents_view.as_array().unwrap() {
        assert_eq!(a["in_sync"], true, "{a}");
        assert_eq!(a["modules"][0]["running"]["version"], "0.2.0", "{a}");
    }
}

/// "threshold 0.3.0": implements the ABI and traps on every batch it is given.
fn trapping_v3() -> String {
    stub_module_wat(
        r#"{"name":"threshold","version":"0.3.0","abi_version":1,"inputs":["sensors/#"],"outputs":["alerts/threshold"]}"#,
        "unreachable",
    )
}

/// Runs the operator CLI (`cloud-hub <args>`) against `hub`; returns exit code and stdout.
fn cli(hub: &Hub, args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(HUB)
        .args(args)
        .env("BRUME_HUB", &hub.url)
        .output()
        .unwrap_or_else(|e| panic!("running cloud-hub {args:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        eprintln!("cloud-hub {args:?}: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    }
    (out.status.code().unwrap_or(-1), stdout)
}

/// Everything through the operator CLI: a publisher key, signed uploads, v1 deployed,
/// then a v3 that traps on its input rolled out in two waves. The first wave's agent
/// rolls v3 back on its own during probation (its failed batches retried, not skipped),
/// the hub aborts the rollout from its report, the other agents never receive v3, and
/// every input reading still has exactly one output, all from v1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_failing_on_the_device_is_rolled_back_there_and_the_rollout_aborts() {
    let broker = Mosquitto::start().unwrap();
    let work = tempfile::tempdir().unwrap();
    let key_file = work.path().join("publisher.key");
    // keygen needs no hub: run it before one exists.
    let out = std::process::Command::new(HUB)
        .args(["module", "keygen", "--out", key_file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let public = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(public.starts_with("ed25519:"), "{public}");
    let hub = start_hub(broker.port, &public).await;

    let v1 = work.path().join("threshold-0.1.0.wasm");
    std::fs::write(&v1, built_module_bytes("threshold")).unwrap();
    let v3 = work.path().join("threshold-0.3.0.wasm");
    std::fs::write(&v3, wat::parse_str(trapping_v3()).unwrap()).unwrap();
    let (v1s, v3s) = (v1.to_str().unwrap(), v3.to_str().unwrap());
    let key = key_file.to_str().unwrap();
    assert_eq!(cli(&hub, &["module", "sign", "--key", key, v1s]).0, 0);
    let (code, out) = cli(&hub, &["module", "push", v1s]);
    assert_eq!(code, 0);
    assert!(out.contains("threshold 0.1.0 registered"), "{out}");
    assert_eq!(cli(&hub, &["module", "push", "--key", key, v3s]).0, 0);
    let (_, out) = cli(&hub, &["module", "ls"]);
    assert!(out.contains("0.1.0") && out.contains("0.3.0"), "{out}");

    let fleet = format!("hub_url = {:?}\ntrusted_keys = [{public:?}]", hub.url);
    let mut agents = Vec::new();
    for i in 0..3 {
        let extra = [("fleet", fleet.as_str()), ("labels", "site = \"a\"")];
        agents.push(Agent::start(Path::new(AGENT), &format!("edge-{i}"), broker.port, &extra).await.unwrap());
    }
    wait_until("three agents at the hub", Duration::from_secs(20), || async {
        get(&hub, "/api/v1/fleet/agents").await.as_array().is_some_and(|a| a.len() == 3)
    })
    .await
    .unwrap();
    let config = r#"{"limit": -1, "field": "n"}"#;
    let (code, out) = cli(
        &hub,
        &["deploy", "threshold@0.1.0", "--select", "site=a", "--probation", "0s", "--config", config, "--watch"],
    );
    assert_eq!(code, 0, "{out}");
    let sensors: Vec<Sensor> = agents.iter().map(|a| Sensor::start_named(a.mqtt_port, "sensors", 1, 40)).collect();
    tokio::time::sleep(Duration::from_secs(1)).await;

    let (code, out) = cli(
        &hub,
        &[
            "deploy",
            "threshold@0.3.0",
            "--select",
            "site=a",
            "--waves",
            "1,100%",
            "--probation",
            "30s",
            "--config",
            config,
            "--watch",
        ],
    );
    assert_eq!(code, 3, "watch exits 3 when the rollout is aborted: {out}");
    assert!(out.contains("aborted"), "{out}");
    let d = get(&hub, "/api/v1/deployments/2").await;
    assert_eq!(d["state"], "aborted", "{d:#}");
    let reason = d["reason"].as_str().unwrap();
    assert!(reason.contains("1 of 1") && reason.contains("unreachable"), "the reason names the trap: {reason}");
    let progress = d["agent_progress"].as_array().unwrap();
    assert_eq!(progress.len(), 1, "only the first wave's agent ever got v3: {d:#}");
    assert_eq!(progress[0]["phase"], "rolled_back", "{d:#}");

    // Everyone runs v1, including the agent that rolled back.
    let start = std::time::Instant::now();
    loop {
        let fleet = get(&hub, "/api/v1/fleet/agents").await;
        let back = fleet.as_array().is_some_and(|a| {
            a.iter().all(|a| a["in_sync"] == true && a["modules"][0]["running"]["version"] == "0.1.0")
        });
        if back {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "not every agent back on v1: {fleet:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (code, out) = cli(&hub, &["agents", "ls"]);
    assert_eq!(code, 0);
    assert_eq!(out.lines().filter(|l| l.contains("threshold@0.1.0 running")).count(), 3, "{out}");
    // The platform the agents report: this machine's, JIT build (the e2e agent compiles).
    let platform = format!("{}/jit", std::env::consts::ARCH);
    assert_eq!(out.lines().filter(|l| l.contains(&platform)).count(), 3, "{out}");
    let (_, out) = cli(&hub, &["rollout", "ls", "--json"]);
    let list: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(list[0]["state"], "aborted");
    assert_eq!(list[1]["state"], "done");

    for s in sensors {
        s.stop().await;
    }
    for a in &agents {
        a.wait_drained(Duration::from_secs(60)).await;
    }
    wait_until("every input's output at the hub", Duration::from_secs(60), || async {
        let (i, o) = at_hub(&hub).await;
        i.len() == 3 && i.iter().all(|(a, ins)| o.get(a).is_some_and(|outs| outs.len() >= ins.len()))
    })
    .await
    .unwrap();
    let (inputs, outputs) = at_hub(&hub).await;
    let v1_sha = brume_signing::to_hex(&brume_signing::module_digest(&built_module_bytes("threshold")));
    for (agent, ins) in &inputs {
        let mut ins = ins.clone();
        ins.sort();
        let outs = &outputs[agent];
        assert_eq!(outs.iter().map(|(n, _)| *n).collect::<Vec<_>>(), ins, "{agent}: one output per input");
        assert!(outs.iter().all(|(_, h)| *h == v1_sha), "{agent}: every output is v1's");
    }
}

/// Serves `body` to every HTTP request on 127.0.0.1 (a hub impersonator, or a proxy
/// that corrupts downloads). Returns its base URL.
async fn serve_bytes(body: Vec<u8>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else { return };
            let body = body.clone();
            tokio::spawn(async move {
                let mut req = vec![0u8; 4096];
                let _ = sock.read(&mut req).await;
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/wasm\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = sock.write_all(head.as_bytes()).await;
                let _ = sock.write_all(&body).await;
            });
        }
    });
    url
}

/// The agent checks what the hub says, not only what it downloads: a build whose bytes
/// were changed on the way (here by an impersonating server) is refused and not kept;
/// a build signed by a key the agent has not pinned (the hub trusts it, the agent does
/// not) is refused before download. Neither ever runs, the reports say why, and the
/// rollout aborts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_or_untrusted_builds_are_refused_by_the_agent() {
    let broker = Mosquitto::start().unwrap();
    let key = SecretKey::generate();
    let hub = start_hub(broker.port, &key.public().to_string()).await;
    let v1 = built_module_bytes("threshold");
    upload(&hub, &key, &v1).await;
    let mut tampered = v1.clone();
    let mid = tampered.len() / 2;
    tampered[mid] ^= 0x40;
    let impostor = serve_bytes(tampered).await;
    let other = SecretKey::generate();
    let proxied = format!("hub_url = {impostor:?}\ntrusted_keys = [{:?}]", key.public().to_string());
    let untrusting = format!("hub_url = {:?}\ntrusted_keys = [{:?}]", hub.url, other.public().to_string());
    let a = Agent::start(Path::new(AGENT), "edge-proxied", broker.port, &[("fleet", &proxied)]).await.unwrap();
    let b = Agent::start(Path::new(AGENT), "edge-untrusting", broker.port, &[("fleet", &untrusting)]).await.unwrap();
    wait_until("both agents at the hub", Duration::from_secs(20), || async {
        get(&hub, "/api/v1/fleet/agents").await.as_array().is_some_and(|a| a.len() == 2)
    })
    .await
    .unwrap();
    let id =
        deploy(&hub, json!({"module": "threshold", "version": "0.1.0", "config": {"limit": 1.0}, "probation": "0s"}))
            .await;
    let start = std::time::Instant::now();
    let errors = loop {
        let agents = get(&hub, "/api/v1/fleet/agents").await;
        let errs: BTreeMap<String, (String, String)> = agents
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|x| {
                let m = &x["modules"][0];
                m["error"].as_str().map(|e| {
                    (
                        x["agent_id"].as_str().unwrap().to_owned(),
                        (m["phase"].as_str().unwrap().to_owned(), e.to_owned()),
                    )
                })
            })
            .collect();
        if errs.len() == 2 && errs["edge-untrusting"].0 == "failed" {
            break errs;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no refusals reported: {agents:#}\n{}\n{}",
            a.log(),
            b.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (phase, why) = &errors["edge-proxied"];
    assert!(phase == "downloading" || phase == "failed", "{errors:?}");
    assert!(why.contains("hashes to") && why.contains("not to the deployed build"), "{why}");
    assert!(errors["edge-untrusting"].1.contains("not among the trusted keys"), "{errors:?}");
    for agent in [&a, &b] {
        let status = agent.status().await.unwrap();
        assert_eq!(status["modules"], json!([]), "nothing runs: {status:#}");
        let kept: Vec<_> = std::fs::read_dir(agent.dir.path().join("data/fleet/modules"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".wasm"))
            .collect();
        assert!(kept.is_empty(), "no build kept: {kept:?}");
    }
    let d = get(&hub, &format!("/api/v1/deployments/{id}")).await;
    assert_eq!(d["state"], "aborted", "{d:#}");
}

/// `kill -9` of an agent the moment the new build is on its disk (mid-swap): after the
/// restart exactly one build runs in the slot, and every input reading still has exactly
/// one output, v1's before the swap and v2's after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_in_the_middle_of_a_swap_runs_one_build_from_the_right_cursor() {
    let broker = Mosquitto::start().unwrap();
    let key = SecretKey::generate();
    // The hub signs its messages and the agents act only on signed ones: kill -9 and the
    // swap run on signed desired states and acks.
    let (_hub_key, signing, hub_keys) = hub_signing_key();
    let fleet = format!("[fleet]\ntrusted_keys = [{:?}]\nreconcile_interval = \"200ms\"\n", key.public().to_string());
    let hub = Hub::start_with_mqtt(Path::new(HUB), broker.port, &signing, &fleet).await.unwrap();
    let v1 = built_module_bytes("threshold");
    let v2 = with_version(&v1, "0.1.0", "0.2.0");
    let v1_sha = upload(&hub, &key, &v1).await["sha256"].as_str().unwrap().to_owned();
    let v2_sha = upload(&hub, &key, &v2).await["sha256"].as_str().unwrap().to_owned();
    let fleet = fleet_config(&hub, &key);
    let mut agent = Agent::start(Path::new(AGENT), "edge-k", broker.port, &[("fleet", &fleet), ("forward", &hub_keys)])
        .await
        .unwrap();
    let config = json!({"limit": -1.0, "field": "n"});
    let d1 =
        deploy(&hub, json!({"module": "threshold", "version": "0.1.0", "config": config, "probation": "0s"})).await;
    wait_running(&hub, d1, 1, &[&agent]).await;
    let sensor = Sensor::start_named(agent.mqtt_port, "sensors", 1, 100);
    tokio::time::sleep(Duration::from_millis(500)).await;

    let d2 =
        deploy(&hub, json!({"module": "threshold", "version": "0.2.0", "config": config, "probation": "0s"})).await;
    let v2_file = agent.dir.path().join(format!("data/fleet/modules/{v2_sha}.wasm"));
    wait_until("v2 on the agent's disk", Duration::from_secs(30), || async { v2_file.exists() }).await.unwrap();
    agent.proc.kill9();
    agent.restart().await.unwrap();
    wait_running(&hub, d2, 1, &[&agent]).await;
    let status = agent.status().await.unwrap();
    assert_eq!(status["modules"].as_array().unwrap().len(), 1, "one build in the slot: {status:#}");
    assert_eq!(status["modules"][0]["hash"], v2_sha, "{status:#}");

    let acked = sensor.stop().await.0;
    agent.wait_drained(Duration::from_secs(60)).await;
    wait_until("every input's output at the hub", Duration::from_secs(60), || async {
        let (i, o) = at_hub(&hub).await;
        i.get("edge-k").is_some_and(|ins| o.get("edge-k").is_some_and(|outs| outs.len() >= ins.len()))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.log()));
    let (inputs, outputs) = at_hub(&hub).await;
    let mut ins = inputs["edge-k"].clone();
    ins.sort();
    let uniq: HashSet<u64> = ins.iter().copied().collect();
    assert!(acked.is_subset(&uniq), "acknowledged readings missing at the hub");
    let outs = &outputs["edge-k"];
    assert_eq!(outs.iter().map(|(n, _)| *n).collect::<Vec<_>>(), ins, "exactly one output per input");
    let hashes: Vec<&str> = outs.iter().map(|(_, h)| h.as_str()).collect();
    let switch = hashes.iter().position(|h| *h == v2_sha).expect("v2 processed readings");
    assert!(hashes[..switch].iter().all(|h| *h == v1_sha) && hashes[switch..].iter().all(|h| *h == v2_sha));
}

/// Two hubs on one PostgreSQL: a rollout created through one is driven to the end by
/// the other after the first is killed, and the agent downloads from the second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hubs_on_postgres_either_drives_and_serves_a_rollout() {
    let broker = Mosquitto::start().unwrap();
    let pg = brume_e2e::pg::TestPostgres::start();
    let url = pg.create_db("brume");
    let key = SecretKey::generate();
    let cfg = format!(
        "[storage]\nbackend = \"postgres\"\n[storage.postgres]\nurl = {url:?}\n[fleet]\ntrusted_keys = [{:?}]\nreconcile_interval = \"200ms\"\n",
        key.public().to_string()
    );
    // Both hubs sign with the same key, which the agents pin.
    let (_hub_key, signing, hub_keys) = hub_signing_key();
    let mut first = Hub::start_with_mqtt(Path::new(HUB), broker.port, &signing, &cfg).await.unwrap();
    let second = Hub::start_with_mqtt(Path::new(HUB), broker.port, &signing, &cfg).await.unwrap();
    let v1 = built_module_bytes("threshold");
    upload(&first, &key, &v1).await;
    let fleet = fleet_config(&second, &key);
    let mut agents = Vec::new();
    for i in 0..2 {
        agents.push(
            Agent::start(
                Path::new(AGENT),
                &format!("edge-pg{i}"),
                broker.port,
                &[("fleet", &fleet), ("forward", &hub_keys)],
            )
            .await
            .unwrap(),
        );
    }
    wait_until("both agents known", Duration::from_secs(20), || async {
        get(&first, "/api/v1/fleet/agents").await.as_array().is_some_and(|a| a.len() == 2)
    })
    .await
    .unwrap();
    let id = deploy(
        &first,
        json!({"module": "threshold", "version": "0.1.0", "config": {"limit": 1.0}, "waves": ["1", "100%"], "probation": "1s"}),
    )
    .await;
    first.proc.kill9();
    wait_running(&second, id, 2, &agents.iter().collect::<Vec<_>>()).await;
    let d = get(&second, &format!("/api/v1/deployments/{id}")).await;
    let waves: Vec<u64> = d["agent_progress"].as_array().unwrap().iter().map(|a| a["wave"].as_u64().unwrap()).collect();
    assert_eq!(waves.iter().filter(|w| **w == 0).count(), 1, "{d:#}");
    drop(first);
}

/// Re-processing through the operator CLI: v1 runs live on two agents; v2 is then run
/// over a past time range on one of them. Its results reach the hub as the re-processed
/// variant of the output stream, stamped with v2's hash, exactly one per input reading
/// whose timestamp is in the range; the live outputs (v1) are untouched, and the other
/// agent re-processes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reprocessing_a_past_range_stores_new_results_beside_the_originals() {
    let broker = Mosquitto::start().unwrap();
    let key = SecretKey::generate();
    let hub = start_hub(broker.port, &key.public().to_string()).await;
    let v1 = built_module_bytes("threshold");
    let v2 = with_version(&v1, "0.1.0", "0.2.0");
    let v1_sha = upload(&hub, &key, &v1).await["sha256"].as_str().unwrap().to_owned();
    let v2_sha = upload(&hub, &key, &v2).await["sha256"].as_str().unwrap().to_owned();
    let fleet = fleet_config(&hub, &key);
    let mut agents = Vec::new();
    for i in 0..2 {
        agents.push(
            Agent::start(Path::new(AGENT), &format!("edge-{i}"), broker.port, &[("fleet", &fleet)]).await.unwrap(),
        );
    }
    let config = json!({"limit": -1.0, "field": "n"});
    let d1 =
        deploy(&hub, json!({"module": "threshold", "version": "0.1.0", "config": config, "probation": "0s"})).await;
    wait_running(&hub, d1, 2, &agents.iter().collect::<Vec<_>>()).await;

    // Readings flow, then stop: the range is in the past when the job runs.
    let sensors: Vec<Sensor> = agents.iter().map(|a| Sensor::start_named(a.mqtt_port, "sensors", 1, 50)).collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut acked = 0;
    for s in sensors {
        acked += s.stop().await.0.len();
    }
    wait_until("every live output at the hub", Duration::from_secs(30), || async {
        let (inputs, outputs) = at_hub(&hub).await;
        inputs.values().map(Vec::len).sum::<usize>() == acked && outputs.values().map(Vec::len).sum::<usize>() == acked
    })
    .await
    .unwrap();
    let (_, originals) = at_hub(&hub).await;
    assert!(originals.values().flatten().all(|(_, sha)| *sha == v1_sha), "live outputs are v1's");

    // The range: edge-0's inputs from its 20th reading to (not including) its 60th.
    let inputs = hub.readings("sensors/0").await.unwrap();
    let edge0: Vec<(u64, i64)> = inputs
        .iter()
        .filter(|r| r["agent_id"] == "edge-0")
        .map(|r| (r["fields"]["n"].as_f64().unwrap() as u64, r["ts_ns"].as_i64().unwrap()))
        .collect();
    assert!(edge0.len() > 60, "{} readings", edge0.len());
    let (from, to) = (edge0[20].1, edge0[60].1);
    let expected: Vec<u64> = edge0.iter().filter(|(_, ts)| (from..to).contains(ts)).map(|(n, _)| *n).collect();
    let rfc =
        |ns: i64| humantime::format_rfc3339_nanos(std::time::UNIX_EPOCH + Duration::from_nanos(ns as u64)).to_string();
    let (code, out) = cli(
        &hub,
        &[
            "reprocess",
            "run",
            "threshold@0.2.0",
            "--from",
            &rfc(from),
            "--to",
            &rfc(to),
            "--select",
            "agent_id=edge-0",
            "--config",
            &config.to_string(),
            "--watch",
        ],
    );
    assert_eq!(code, 0, "the job finished on every agent: {out}\n{}", agents[0].log());
    assert!(out.contains("done"), "{out}");

    // The results: beside the originals, v2's, one per input in the range.
    let variant = |hub: &Hub| {
        let url = format!("{}/api/v1/readings?stream=alerts/threshold&build={v2_sha}&limit=10000", hub.url);
        async move { reqwest::get(url).await.unwrap().json::<Value>().await.unwrap() }
    };
    wait_until("the re-processed results at the hub", Duration::from_secs(30), || async {
        variant(&hub).await["readings"].as_array().map_or(0, |r| r.len()) >= expected.len()
    })
    .await
    .unwrap();
    let v = variant(&hub).await;
    assert_eq!((v["stream"].as_str(), v["build"].as_str()), (Some("alerts/threshold"), Some(v2_sha.as_str())));
    let rows = v["readings"].as_array().unwrap();
    assert!(rows.iter().all(|r| r["agent_id"] == "edge-0"), "only the selected agent re-processed");
    assert!(rows.iter().all(|r| r["module"]["sha256"] == v2_sha.as_str()), "stamped with v2: {v:#}");
    let mut got: Vec<u64> = rows.iter().map(|r| r["fields"]["n"].as_f64().unwrap() as u64).collect();
    got.sort();
    assert_eq!(got, expected, "exactly the inputs of the range, once each");
    let (_, after) = at_hub(&hub).await;
    assert_eq!(after, originals, "the live outputs are untouched");
    let streams = get(&hub, "/api/v1/streams").await;
    assert!(
        streams.as_array().unwrap().iter().any(|s| s["stream"] == "alerts/threshold" && s["build"] == v2_sha.as_str()),
        "the variant is listed with its build: {streams:#}"
    );
    let (_, ls) = cli(&hub, &["reprocess", "ls", "--json"]);
    let jobs: Value = serde_json::from_str(ls.trim()).unwrap();
    assert_eq!(jobs[0]["state"], "done", "{jobs:#}");
    assert_eq!(jobs[0]["readings_out"].as_u64(), Some(expected.len() as u64), "{jobs:#}");
}

/// The data-plane check on the device: the same build with a config that changes its
/// output rate (threshold from "never" to "every reading") is rolled back by the agent
/// when its outputs per input drift past `--max-output-change` from what the previous
/// config produced there; the rollout aborts (exit 3 from `deploy --watch`), and the
/// agent runs the previous config again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_output_rate_drift_during_probation_rolls_back_on_the_device() {
    let broker = Mosquitto::start().unwrap();
    let key = SecretKey::generate();
    let hub = start_hub(broker.port, &key.public().to_string()).await;
    let v1 = built_module_bytes("threshold");
    upload(&hub, &key, &v1).await;
    let fleet = fleet_config(&hub, &key);
    let agent = Agent::start(Path::new(AGENT), "edge-0", broker.port, &[("fleet", &fleet)]).await.unwrap();
    let quiet = json!({"limit": 1e12, "field": "n"});
    let d1 = deploy(&hub, json!({"module": "threshold", "version": "0.1.0", "config": quiet, "probation": "0s"})).await;
    wait_running(&hub, d1, 1, &[&agent]).await;
    let sensor = Sensor::start_named(agent.mqtt_port, "sensors", 1, 50);
    // The quiet config's rate is measured on at least `min_inputs` readings.
    wait_until("the quiet config processed 40 readings", Duration::from_secs(20), || async {
        let s: Value = reqwest::get(format!("{}/api/v1/status", agent.url)).await.unwrap().json().await.unwrap();
        s["modules"].as_array().into_iter().flatten().any(|m| m["readings_in"].as_u64().unwrap_or(0) >= 40)
    })
    .await
    .unwrap();

    let (code, out) = cli(
        &hub,
        &[
            "deploy",
            "threshold@0.1.0",
            "--config",
            r#"{"limit": -1, "field": "n"}"#,
            "--probation",
            "60s",
            "--max-output-change",
            "50",
            "--min-inputs",
            "20",
            "--watch",
        ],
    );
    assert_eq!(code, 3, "the rollout aborted: {out}\n{}", agent.log());
    let d2 = get(&hub, "/api/v1/deployments/2").await;
    let row = &d2["agent_progress"][0];
    assert_eq!(row["phase"], "rolled_back", "{d2:#}");
    let why = row["error"].as_str().unwrap_or_default();
    assert!(why.contains("outputs per input") && why.contains("at most ±50%"), "{why}");

    // The quiet config runs again: no new outputs while readings keep flowing.
    wait_until("the previous config running again", Duration::from_secs(20), || async {
        let s: Value = reqwest::get(format!("{}/api/v1/status", agent.url)).await.unwrap().json().await.unwrap();
        s["modules"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|m| m["enabled"] == true && m["readings_in"].as_u64() > Some(20))
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (acked, _) = sensor.stop().await;
    wait_until("every input at the hub", Duration::from_secs(20), || async {
        hub.readings("sensors/0").await.unwrap().len() == acked.len()
    })
    .await
    .unwrap();
    // Batches arrive in the agent's order, so every output is here too. The candidate's
    // outputs are for the readings it processed before it was judged; none after.
    let n = |r: &Value| r["fields"]["n"].as_f64().unwrap() as u64;
    let outputs: Vec<u64> = hub.readings("alerts/threshold").await.unwrap().iter().map(n).collect();
    assert!(!outputs.is_empty() && outputs.len() < acked.len(), "{} outputs", outputs.len());
    let last_output = *outputs.iter().max().unwrap();
    let later = acked.iter().filter(|&&a| a > last_output).count();
    assert!(later > 20, "the quiet config emitted nothing for the {later} readings after the rollback");
}

/// Shadow runs: a candidate runs beside the running build on the same input, its
/// outputs counted and dropped. One whose output rate drifts fails there and is never
/// swapped in (the rollout aborts); one that passes is swapped in after its probation.
/// Through both, every input reading has exactly one output at the hub: none from a
/// candidate while it was in the shadow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_candidate_in_the_shadow_is_compared_and_swapped_in_only_if_it_passes() {
    let broker = Mosquitto::start().unwrap();
    let key = SecretKey::generate();
    let hub = start_hub(broker.port, &key.public().to_string()).await;
    let v1 = built_module_bytes("threshold");
    let v2 = with_version(&v1, "0.1.0", "0.2.0");
    let v1_sha = upload(&hub, &key, &v1).await["sha256"].as_str().unwrap().to_owned();
    let v2_sha = upload(&hub, &key, &v2).await["sha256"].as_str().unwrap().to_owned();
    let fleet = fleet_config(&hub, &key);
    let agent = Agent::start(Path::new(AGENT), "edge-0", broker.port, &[("fleet", &fleet)]).await.unwrap();
    let all = json!({"limit": -1.0, "field": "n"});
    let d1 = deploy(&hub, json!({"module": "threshold", "version": "0.1.0", "config": all, "probation": "0s"})).await;
    wait_running(&hub, d1, 1, &[&agent]).await;
    let sensor = Sensor::start_named(agent.mqtt_port, "sensors", 1, 50);

    // v2 with a config that emits nothing: 0 outputs against the running build's 1 per
    // input, in the shadow. Rolled back there; v1 never stops.
    let (code, out) = cli(
        &hub,
        &[
            "deploy",
            "threshold@0.2.0",
            "--config",
            r#"{"limit": 1e12, "field": "n"}"#,
            "--shadow",
            "--probation",
            "60s",
            "--max-output-change",
            "50",
            "--min-inputs",
            "20",
            "--watch",
        ],
    );
    assert_eq!(code, 3, "the rollout aborted: {out}\n{}", agent.log());
    let d2 = get(&hub, "/api/v1/deployments/2").await;
    let why = d2["agent_progress"][0]["error"].as_str().unwrap_or_default().to_owned();
    assert_eq!(d2["agent_progress"][0]["phase"], "rolled_back", "{d2:#}");
    assert!(why.contains("from the running build on the same") && why.contains("-100%"), "{why}");

    // v2 with v1's config: same outputs, passes in the shadow, swapped in after 2 s.
    let d3 = deploy(
        &hub,
        json!({"module": "threshold", "version": "0.2.0", "config": all, "probation": "2s", "shadow": true,
               "max_output_change_pct": 50, "min_inputs": 20}),
    )
    .await;
    wait_running(&hub, d3, 1, &[&agent]).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (acked, _) = sensor.stop().await;
    wait_until("every output at the hub", Duration::from_secs(30), || async {
        at_hub(&hub).await.1.values().map(Vec::len).sum::<usize>() >= acked.len()
    })
    .await
    .unwrap();
    let (inputs, outputs) = at_hub(&hub).await;
    let outputs = &outputs["edge-0"];
    let ns: Vec<u64> = outputs.iter().map(|(n, _)| *n).collect();
    let mut want: Vec<u64> = inputs["edge-0"].clone();
    want.sort();
    assert_eq!(ns, want, "exactly one output per input: none from a candidate in the shadow");
    // By input order: v1, then v2 from the swap on, one switch.
    let shas: Vec<&str> = outputs.iter().map(|(_, s)| s.as_str()).collect();
    let switch = shas.iter().position(|s| *s == v2_sha).expect("v2 ran after the swap");
    assert!(shas[..switch].iter().all(|s| *s == v1_sha) && shas[switch..].iter().all(|s| *s == v2_sha));
    let log = agent.log();
    assert!(log.contains("candidate passed in the shadow"), "v2 was judged in the shadow first:\n{log}");
    // Nothing changes any more: the generation stays where it is, pass after pass.
    let generation = || async { get(&hub, "/api/v1/fleet/agents").await[0]["desired_generation"].as_u64() };
    let before = generation().await;
    tokio::time::sleep(Duration::from_secs(1)).await; // five reconcile passes
    assert_eq!(generation().await, before, "a desired state is written only when it changes");
}
