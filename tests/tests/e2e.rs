//! End-to-end: sensor → agent (real process) → mosquitto (real, private) → hub (real
//! process) → stored → acknowledged, across broker outages and `kill -9`.
//!
//! Each test takes about a minute: it streams 1,000 readings/s through a 40 s outage.

use std::path::Path;
use std::time::Duration;

use brume_e2e::{Agent, Hub, Mosquitto, Sensor, check_exactly_once, wait_until};

const AGENT: &str = env!("CARGO_BIN_EXE_e2e-edge-agent");
const HUB: &str = env!("CARGO_BIN_EXE_e2e-cloud-hub");
const STREAMS: u64 = 4;
const RATE: u64 = 1000;

/// Waits until the hub holds every acknowledged reading (or fails with the agent's state).
async fn drain(hub: &Hub, agent: &Agent, acked: usize) {
    let res = wait_until("the hub to hold every acknowledged reading", Duration::from_secs(120), || async {
        hub.total().await >= acked as u64
    })
    .await;
    if let Err(e) = res {
        let status = agent.status().await.map(|s| s.to_string()).unwrap_or_default();
        panic!("{e}\nagent status: {status}\nagent log tail:\n{}", tail(&agent.log()));
    }
}

fn tail(s: &str) -> &str {
    &s[s.len().saturating_sub(4000)..]
}

/// The cloud broker is down for 40 s while 1,000 readings/s flow into the agent over MQTT:
/// every reading reaches the hub's store exactly once, in order per stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_outage_loses_nothing_and_duplicates_nothing() {
    let mut broker = Mosquitto::start().unwrap();
    let hub = Hub::start(Path::new(HUB), broker.port).await.unwrap();
    let agent = Agent::start(Path::new(AGENT), "edge-outage", broker.port, &[]).await.unwrap();
    let sensor = Sensor::start(agent.mqtt_port, STREAMS, RATE);

    wait_until("data to reach the hub", Duration::from_secs(30), || async { hub.total().await > 500 }).await.unwrap();
    broker.stop();
    tokio::time::sleep(Duration::from_secs(40)).await; // the outage itself is the test's subject
    let during = agent.status().await.unwrap();
    assert!(during["outbox"]["batches"].as_u64().unwrap() > 0, "the agent buffers while the broker is down: {during}");
    broker.restart().unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await; // keep publishing while the backlog drains
    let (acked, sent) = sensor.stop().await;
    assert!(acked.len() as u64 >= RATE * 40, "the agent kept acknowledging during the outage: {}", acked.len());

    drain(&hub, &agent, acked.len()).await;
    let stored = check_exactly_once(&hub, &acked, sent, STREAMS).await.unwrap();
    assert_eq!(stored, acked.len() as u64, "stored exactly what was acknowledged (sent {sent})");
    let st = agent.status().await.unwrap();
    wait_until("the outbox to empty", Duration::from_secs(30), || async {
        agent.status().await.map(|s| s["outbox"]["batches"] == 0).unwrap_or(false)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {st}"));
}

/// Same outage, plus the agent killed with SIGKILL during it and restarted on the same data
/// directory, and the hub killed and restarted afterwards: every reading the agent
/// PUBACKed reaches the hub, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_and_hub_kill_9_lose_nothing_acknowledged() {
    let mut broker = Mosquitto::start().unwrap();
    let mut hub = Hub::start(Path::new(HUB), broker.port).await.unwrap();
    let mut agent = Agent::start(Path::new(AGENT), "edge-kill", broker.port, &[]).await.unwrap();
    let sensor = Sensor::start(agent.mqtt_port, STREAMS, RATE);

    wait_until("data to reach the hub", Duration::from_secs(30), || async { hub.total().await > 500 }).await.unwrap();
    broker.stop();
    tokio::time::sleep(Duration::from_secs(15)).await;
    agent.proc.kill9();
    agent.restart().await.unwrap();
    tokio::time::sleep(Duration::from_secs(25)).await;
    broker.restart().unwrap();
    // Kill the hub while the backlog drains, then bring it back.
    wait_until("the backlog to start draining", Duration::from_secs(30), || async { hub.total().await > 5_000 })
        .await
        .unwrap();
    hub.proc.kill9();
    tokio::time::sleep(Duration::from_secs(2)).await;
    hub.restart().await.unwrap();
    let (acked, sent) = sensor.stop().await;

    drain(&hub, &agent, acked.len()).await;
    let stored = check_exactly_once(&hub, &acked, sent, STREAMS).await.unwrap();
    assert!(stored >= acked.len() as u64);
    // Readings committed but whose PUBACK was lost to the kill may also arrive; nothing else.
    assert!(
        stored - acked.len() as u64 <= 200,
        "at most the in-flight window beyond the acked set: {stored} vs {}",
        acked.len()
    );
}
