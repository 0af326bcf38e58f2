//! Agent modes end to end with real processes: subscribe mode (consume from a local
//! broker, ack after commit), JSON output for plain MQTT consumers, and loss accounting
//! reported to the hub.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use brume_e2e::{Agent, Hub, Mosquitto, wait_until};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

const AGENT: &str = env!("CARGO_BIN_EXE_e2e-edge-agent");
const HUB: &str = env!("CARGO_BIN_EXE_e2e-cloud-hub");

/// Publishes `n` readings `{"n": i}` at QoS 1 to `topic` on a broker and waits for every PUBACK.
async fn publish_all(port: u16, topic: &str, range: std::ops::Range<u64>) {
    let mut opts = MqttOptions::new(format!("pub-{port}-{}", range.start), "127.0.0.1", port);
    opts.set_inflight(100);
    let (client, mut el) = AsyncClient::new(opts, 200);
    let want = range.end - range.start;
    let poller = tokio::spawn(async move {
        let mut acks = 0;
        while acks < want {
            if let Event::Incoming(Packet::PubAck(_)) = el.poll().await.expect("broker connection") {
                acks += 1;
            }
        }
    });
    for i in range {
        client.publish(topic, QoS::AtLeastOnce, false, format!("{{\"n\":{i}}}")).await.unwrap();
    }
    tokio::time::timeout(Duration::from_secs(60), poller).await.expect("all PUBACKs").unwrap();
}

/// Subscribe mode: the agent consumes `sensors/#` from a local broker with a persistent
/// session and acknowledges only after commit. Killed with SIGKILL mid-stream, it gets the
/// unacknowledged messages again from the broker after restart: every reading reaches the
/// hub (re-delivery after a crash may repeat a few that were committed but not yet acked).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_mode_survives_kill_9() {
    let local = Mosquitto::start().unwrap();
    let cloud = Mosquitto::start().unwrap();
    let hub = Hub::start(Path::new(HUB), cloud.port).await.unwrap();
    let sub = format!("enabled = true\nport = {}\ntopics = [\"sensors/#\"]\nstrip_prefix = \"sensors/\"", local.port);
    let mut agent =
        Agent::start(Path::new(AGENT), "edge-sub", cloud.port, &[("subscribe", &sub), ("listener", "enabled = false")])
            .await
            .unwrap();
    // The persistent session must exist before publishing, or the broker has no one to queue for.
    wait_until("the agent's subscription", Duration::from_secs(20), || async {
        hub.total().await > 0 || agent.log().contains("subscribed to local broker")
    })
    .await
    .unwrap();
    publish_all(local.port, "sensors/press", 0..5_000).await;
    agent.proc.kill9();
    publish_all(local.port, "sensors/press", 5_000..8_000).await; // queued by the broker for the session
    agent.restart().await.unwrap();
    let unique = || async {
        let rows = hub.readings("press").await.unwrap_or_default();
        let mut seen: HashMap<u64, u32> = HashMap::new();
        for r in &rows {
            *seen.entry(r["fields"]["n"].as_f64().unwrap_or(-1.0) as u64).or_default() += 1;
        }
        seen
    };
    wait_until("all 8,000 readings at the hub", Duration::from_secs(90), || async { unique().await.len() >= 8_000 })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.log()));
    let seen = unique().await;
    assert_eq!(seen.len(), 8_000, "every reading published to the local broker reached the hub");
    assert!(seen.keys().all(|n| *n < 8_000));
}

/// JSON output mode: plain MQTT consumers get one JSON object per reading, with the
/// reading's fields; the broker's PUBACK empties the outbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_mode_publishes_one_object_per_reading() {
    let cloud = Mosquitto::start().unwrap();
    let (client, mut el) = AsyncClient::new(MqttOptions::new("consumer", "127.0.0.1", cloud.port), 10);
    client.subscribe("out/edge-json/#", QoS::AtLeastOnce).await.unwrap();
    loop {
        if let Event::Incoming(Packet::SubAck(_)) = el.poll().await.unwrap() {
            break;
        }
    }
    let agent = Agent::start(
        Path::new(AGENT),
        "edge-json",
        cloud.port,
        &[("forward", "mode = \"json\"\njson_topic = \"out/{agent}/{stream}\"")],
    )
    .await
    .unwrap();
    let body = (0..100).map(|i| format!("{{\"n\":{i},\"ok\":true,\"site\":\"a\"}}")).collect::<Vec<_>>().join(",");
    agent.write_json("line/1", &format!("[{body}]")).await;
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), async {
        while got.len() < 100 {
            if let Event::Incoming(Packet::Publish(p)) = el.poll().await.unwrap() {
                assert_eq!(p.topic, "out/edge-json/line/1");
                got.push(serde_json::from_slice::<serde_json::Value>(&p.payload).unwrap());
            }
        }
    })
    .await
    .expect("100 JSON messages");
    let mut ns: Vec<u64> = got.iter().map(|v| v["fields"]["n"].as_f64().unwrap() as u64).collect();
    ns.sort();
    ns.dedup();
    assert_eq!(ns.len(), 100);
    assert_eq!(got[0]["agent_id"], "edge-json");
    assert_eq!(got[0]["stream"], "line/1");
    assert_eq!(got[0]["fields"]["ok"], true);
    assert_eq!(got[0]["fields"]["site"], "a");
    wait_until("the outbox to empty on PUBACK", Duration::from_secs(20), || async {
        agent
            .status()
            .await
            .map(|s| s["outbox"]["batches"] == 0 && s["store"]["unbatched_readings"] == 0)
            .unwrap_or(false)
    })
    .await
    .unwrap();
}

/// Loss accounting: with no hub acknowledging, a stream over its byte budget under
/// `drop_oldest` loses its oldest readings; the count reaches the hub, and what the hub
/// stores plus what was reported lost is everything that was written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_readings_are_counted_and_reported_to_the_hub() {
    let cloud = Mosquitto::start().unwrap();
    let agent = Agent::start(
        Path::new(AGENT),
        "edge-loss",
        cloud.port,
        &[
            ("store.default_rule", "max_bytes = \"20 KiB\"\nwhen_full = \"drop_oldest\""),
            ("forward", "batch_max_readings = 50"),
        ],
    )
    .await
    .unwrap();
    for k in 0..20 {
        let body = (0..100).map(|i| format!("{{\"n\":{}}}", k * 100 + i)).collect::<Vec<_>>().join(",");
        agent.write_json("lossy", &format!("[{body}]")).await;
    }
    let status = agent.status().await.unwrap();
    let lost = status["losses"][0]["total"].as_u64().expect("losses reported in status");
    assert!(lost > 0 && lost < 2_000, "{status}");

    // Now a hub comes up: it receives what is left and the loss report.
    let hub = Hub::start(Path::new(HUB), cloud.port).await.unwrap();
    wait_until("the survivors at the hub", Duration::from_secs(60), || async { hub.total().await == 2_000 - lost })
        .await
        .unwrap();
    let agents: serde_json::Value =
        reqwest::get(format!("{}/api/v1/agents", hub.url)).await.unwrap().json().await.unwrap();
    let a = agents.as_array().unwrap().iter().find(|a| a["agent_id"] == "edge-loss").expect("agent listed");
    assert_eq!(a["losses"][0]["stream"], "lossy");
    assert_eq!(a["losses"][0]["reason"], "store_full");
    assert_eq!(a["losses"][0]["total"].as_u64().unwrap(), lost);
    assert_eq!(a["missing"], serde_json::json!([]), "no batch is missing: losses are inside batches, not gaps");
}
