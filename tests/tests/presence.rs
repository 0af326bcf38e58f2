//! Agent presence at the hub: retained status messages, heartbeats and the MQTT last will.

use std::path::Path;
use std::time::Duration;

use brume_e2e::{Agent, Hub, Mosquitto, wait_until};
use serde_json::Value;

const AGENT: &str = env!("CARGO_BIN_EXE_e2e-edge-agent");
const HUB: &str = env!("CARGO_BIN_EXE_e2e-cloud-hub");

async fn presence(hub: &Hub) -> Vec<Value> {
    match reqwest::get(format!("{}/api/v1/presence", hub.url)).await {
        Ok(r) => r.json::<Vec<Value>>().await.unwrap_or_default(),
        Err(_) => Vec::new(),
    }
}

async fn wait_online(hub: &Hub, online: bool, what: &str) -> Value {
    wait_online_within(hub, online, what, Duration::from_secs(30)).await
}

async fn wait_online_within(hub: &Hub, online: bool, what: &str, within: Duration) -> Value {
    let done =
        wait_until(what, within, || async { presence(hub).await.first().is_some_and(|p| p["online"] == online) }).await;
    let list = presence(hub).await;
    if let Err(e) = done {
        panic!("{e}: {list:?}");
    }
    list[0].clone()
}

/// The hub shows an agent online with its version, backlog and modules as soon as it
/// connects; heartbeats move its last-seen time; offline within seconds of a SIGKILL (the
/// broker publishes its last will) while its heartbeat is a minute long, so only the
/// last will can explain it; online again after a restart; offline after a clean stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_follows_the_agent_through_kill_9_and_restart() {
    let broker = Mosquitto::start().unwrap();
    let hub = Hub::start(Path::new(HUB), broker.port).await.unwrap();
    let mut agent = Agent::start(
        Path::new(AGENT),
        "edge-p",
        broker.port,
        &[("forward", "heartbeat = \"1s\""), ("labels", "site = \"plant-a\"\nline = \"3\"")],
    )
    .await
    .unwrap();

    let p = wait_online(&hub, true, "the agent online").await;
    assert_eq!(p["agent_id"], "edge-p");
    assert_eq!(p["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(p["heartbeat_s"], 1);
    assert_eq!(p["outbox_batches"], 0);
    assert_eq!(p["modules"], serde_json::json!([]));
    // The operator's labels, and the platform labels the agent adds itself.
    assert_eq!(
        p["labels"],
        serde_json::json!({
            "line": "3", "site": "plant-a",
            "brume.arch": std::env::consts::ARCH, "brume.build": "jit", "brume.engine": "wasmtime-48",
        })
    );
    // Fleet filters by label, on presence and on the completeness listing.
    let get = |path: &str| {
        let url = format!("{}{path}", hub.url);
        async move { reqwest::get(url).await.unwrap().json::<Vec<Value>>().await.unwrap().len() }
    };
    assert_eq!(get("/api/v1/presence?label=site:plant-a&label=line:3").await, 1);
    assert_eq!(get("/api/v1/presence?label=site:plant-b").await, 0);
    assert_eq!(get("/api/v1/presence?online=true&prefix=edge-").await, 1);
    let first_seen = p["last_seen_ms"].as_i64().unwrap();
    // Heartbeats move last-seen forward.
    wait_until("a heartbeat", Duration::from_secs(10), || async {
        presence(&hub).await.first().is_some_and(|p| p["last_seen_ms"].as_i64() > Some(first_seen))
    })
    .await
    .unwrap();

    // A heartbeat of a minute: three missed ones (what marks an agent offline without a
    // last will) take three minutes, far beyond the deadline below.
    let cfg = agent.dir.path().join("agent.toml");
    let text = std::fs::read_to_string(&cfg).unwrap().replace("heartbeat = \"1s\"", "heartbeat = \"60s\"");
    std::fs::write(&cfg, text).unwrap();
    agent.proc.terminate();
    wait_online(&hub, false, "the agent offline after a clean stop").await;
    agent.restart().await.unwrap();
    let p = wait_online(&hub, true, "the agent online with a one-minute heartbeat").await;
    assert_eq!(p["heartbeat_s"], 60);

    agent.proc.kill9();
    let p = wait_online_within(&hub, false, "the last will, within seconds of kill -9", Duration::from_secs(5)).await;
    assert_eq!(p["agent_id"], "edge-p");

    agent.restart().await.unwrap();
    wait_online(&hub, true, "the agent online after restart").await;

    agent.proc.terminate();
    wait_online(&hub, false, "the agent offline after a clean stop").await;
}
