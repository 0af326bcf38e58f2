//! The hub at scale: several instances on one shared subscription and one PostgreSQL,
//! with agents publishing, and instances dying.

use std::path::Path;
use std::time::Duration;

use brume_e2e::pg::TestPostgres;
use brume_e2e::{Agent, Hub, Mosquitto, Sensor, check_exactly_once_named, wait_until};

const AGENT: &str = env!("CARGO_BIN_EXE_e2e-edge-agent");
const HUB: &str = env!("CARGO_BIN_EXE_e2e-cloud-hub");
const AGENTS: usize = 20;
const STREAMS: u64 = 2;
/// Readings per second per sensor.
const RATE: u64 = 25;

fn postgres_storage(url: &str) -> String {
    format!("[storage]\nbackend = \"postgres\"\n[storage.postgres]\nurl = {url:?}\nquery_timeout = \"5s\"\n")
}

/// Two hubs share the agents' batches through an MQTT shared subscription and store them
/// in one PostgreSQL database; 20 agents, each fed by a sensor. One hub is killed with
/// SIGKILL mid-stream (and later started again): every reading any agent PUBACKed is
/// stored exactly once, in order per stream, and the hubs report no gaps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hubs_one_killed_twenty_agents_lose_and_duplicate_nothing() {
    let pg = TestPostgres::start();
    let storage = postgres_storage(&pg.create_db("brume"));
    let broker = Mosquitto::start().unwrap();
    let mut hub_a = Hub::start_with(Path::new(HUB), broker.port, &storage).await.unwrap();
    let hub_b = Hub::start_with(Path::new(HUB), broker.port, &storage).await.unwrap();

    let mut agents = Vec::new();
    let mut sensors = Vec::new();
    for i in 0..AGENTS {
        let agent = Agent::start(Path::new(AGENT), &format!("edge-{i:02}"), broker.port, &[]).await.unwrap();
        sensors.push(Sensor::start_named(agent.mqtt_port, &format!("a{i:02}"), STREAMS, RATE));
        agents.push(agent);
    }
    let log = |hub: &Hub| std::fs::read_to_string(hub.dir.path().join("log")).unwrap_or_default();
    wait_until("data from every agent at the hubs", Duration::from_secs(60), || async {
        let counts = hub_b.counts().await.unwrap_or_default();
        counts.len() == AGENTS * STREAMS as usize && counts.iter().all(|(_, n)| *n >= 20)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\nhub A:\n{}\nhub B:\n{}", log(&hub_a), log(&hub_b)));
    // Both instances took part before the kill.
    for hub in [&hub_a, &hub_b] {
        wait_until("both hubs ingesting", Duration::from_secs(30), || has_stored(hub)).await.unwrap();
    }

    let before = hub_b.total().await;
    hub_a.proc.kill9();
    // Hub B alone carries on, including the batches hub A took and never acknowledged
    // (the agents re-send them after their ack timeout).
    wait_until("ingest to go on without hub A", Duration::from_secs(60), || async {
        hub_b.total().await > before + 2_000
    })
    .await
    .unwrap();
    // Hub A rejoins the group and takes its share again (its counters restarted at 0).
    hub_a.restart().await.unwrap();
    wait_until("hub A ingesting again", Duration::from_secs(60), || has_stored(&hub_a))
        .await
        .unwrap_or_else(|e| panic!("{e}\nhub A:\n{}", log(&hub_a)));

    let mut results = Vec::new();
    for s in sensors {
        results.push(s.stop().await);
    }
    // Drained: every agent's outbox empty.
    for agent in &agents {
        agent.wait_drained(Duration::from_secs(90)).await;
    }
    let mut total_acked = 0;
    for (i, (acked, sent)) in results.iter().enumerate() {
        let stored = check_exactly_once_named(&hub_b, &format!("a{i:02}"), acked, *sent, STREAMS).await.unwrap();
        assert!(stored >= acked.len() as u64);
        total_acked += acked.len();
    }
    assert!(total_acked > 3_000, "the test moved too little data to mean anything: {total_acked}");
    // Completeness as the hubs see it: every agent's batches contiguous from 1.
    let agents_json: serde_json::Value =
        reqwest::get(format!("{}/api/v1/agents", hub_a.url)).await.unwrap().json().await.unwrap();
    let list = agents_json.as_array().unwrap();
    assert_eq!(list.len(), AGENTS);
    for a in list {
        assert_eq!(a["missing"], serde_json::json!([]), "{a}");
        assert_eq!(a["watermark"], a["max_seq"], "{a}");
    }
    for a in &mut agents {
        a.proc.terminate();
    }
}

/// Whether the hub process has stored a batch since it started.
async fn has_stored(hub: &Hub) -> bool {
    match reqwest::get(format!("{}/metrics", hub.url)).await {
        Ok(r) => r.text().await.is_ok_and(|m| stored_batches(&m) > 0),
        Err(_) => false,
    }
}

/// Batches a hub stored, from its Prometheus text.
fn stored_batches(metrics: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("brume_hub_batches_total") && l.contains("stored"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// One hub on PostgreSQL, four agents publishing: PostgreSQL crashes (immediate stop) and
/// comes back, then the broker does the same. While the database is down the hub says it
/// is not ready and acknowledges nothing (the agents' outboxes grow); afterwards ingest
/// resumes by itself and every PUBACKed reading is stored exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_and_broker_restarts_during_ingest_lose_nothing() {
    const N: usize = 4;
    let mut pg = TestPostgres::start();
    let storage = postgres_storage(&pg.create_db("brume"));
    let mut broker = Mosquitto::start().unwrap();
    let hub = Hub::start_with(Path::new(HUB), broker.port, &storage).await.unwrap();
    let mut agents = Vec::new();
    let mut sensors = Vec::new();
    for i in 0..N {
        let agent = Agent::start(Path::new(AGENT), &format!("edge-r{i}"), broker.port, &[]).await.unwrap();
        sensors.push(Sensor::start_named(agent.mqtt_port, &format!("r{i}"), STREAMS, 50));
        agents.push(agent);
    }
    wait_until("data at the hub", Duration::from_secs(60), || async { hub.total().await > 1_000 }).await.unwrap();

    pg.stop();
    let readyz = || async {
        match reqwest::get(format!("{}/readyz", hub.url)).await {
            Ok(r) => r.status().as_u16(),
            Err(_) => 0,
        }
    };
    wait_until("the hub to report the database down", Duration::from_secs(30), || async { readyz().await == 503 })
        .await
        .unwrap();
    // Nothing is acknowledged meanwhile: the agents' outboxes hold more and more batches.
    wait_until("backlog in every agent", Duration::from_secs(60), || async {
        let mut all = true;
        for a in &agents {
            all &= a.status().await.is_ok_and(|s| s["outbox"]["batches"].as_u64() >= Some(3));
        }
        all
    })
    .await
    .unwrap();
    pg.restart();
    wait_until("the hub ready again", Duration::from_secs(60), || async { readyz().await == 200 }).await.unwrap();

    let before = hub.total().await;
    broker.stop();
    tokio::time::sleep(Duration::from_secs(2)).await;
    broker.restart().unwrap();
    wait_until("ingest after the broker restart", Duration::from_secs(60), || async {
        hub.total().await > before + 500
    })
    .await
    .unwrap();

    let mut results = Vec::new();
    for s in sensors {
        results.push(s.stop().await);
    }
    for agent in &agents {
        agent.wait_drained(Duration::from_secs(90)).await;
    }
    for (i, (acked, sent)) in results.iter().enumerate() {
        let stored = check_exactly_once_named(&hub, &format!("r{i}"), acked, *sent, STREAMS).await.unwrap();
        assert!(stored >= acked.len() as u64);
    }
    for a in &mut agents {
        a.proc.terminate();
    }
}
