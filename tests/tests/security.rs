//! Security end to end with real processes: hub messages signed with the hub's key
//! (`mqtt.signing_key`) and verified by agents that pin it (`forward.hub_keys`).

use std::path::Path;
use std::time::Duration;

use brume_e2e::{Agent, Hub, Mosquitto, wait_until};
use brume_protocol::{AckV1, AgentMessage, HubKind, HubMessage, SignedV1, topics};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

const AGENT: &str = env!("CARGO_BIN_EXE_e2e-edge-agent");
const HUB: &str = env!("CARGO_BIN_EXE_e2e-cloud-hub");

/// Writes `n` readings `{"n": i}` to a stream through the agent's HTTP API.
async fn write(agent: &Agent, stream: &str, range: std::ops::Range<u64>) {
    let body = range.map(|i| format!("{{\"n\":{i}}}")).collect::<Vec<_>>().join(",");
    let r = reqwest::Client::new()
        .post(format!("{}/api/v1/write?stream={stream}", agent.url))
        .header("content-type", "application/json")
        .body(format!("[{body}]"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 204);
}

/// The agent's counter `brume_agent_<name>` with exactly these labels (0 when absent).
async fn counter(agent: &Agent, name: &str, labels: &str) -> u64 {
    let text = reqwest::get(format!("{}/metrics", agent.url)).await.unwrap().text().await.unwrap();
    let line = format!("brume_agent_{name}_total{{{labels}}} ");
    text.lines().find_map(|l| l.strip_prefix(&line)).map_or(0, |v| v.trim().parse::<f64>().unwrap() as u64)
}

async fn outbox(agent: &Agent) -> u64 {
    agent.status().await.unwrap()["outbox"]["batches"].as_u64().unwrap()
}

/// An attacker on the broker: answers every batch it sees with forged acknowledgements
/// (unsigned, and signed with a key of its own), forges desired states and hub
/// announcements for the same agents, and counts the batches it answered.
async fn attacker(port: u16, key: brume_signing::SecretKey) -> tokio::sync::watch::Receiver<u64> {
    let (tx, rx) = tokio::sync::watch::channel(0u64);
    let mut opts = MqttOptions::new("attacker", "127.0.0.1", port);
    opts.set_max_packet_size(16 << 20, 16 << 20);
    let (client, mut el) = AsyncClient::new(opts, 64);
    client.subscribe("brume/v1/agents/+/batches", QoS::AtLeastOnce).await.unwrap();
    tokio::spawn(async move {
        let mut forged = 0u64;
        loop {
            let Ok(ev) = el.poll().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let Event::Incoming(Packet::Publish(p)) = ev else { continue };
            let Ok(k) = AgentMessage::peek_key(&p.payload) else { continue };
            let topic = topics::acks(&k.agent_id);
            let ack = HubMessage::AckV1(AckV1 { epoch: k.epoch, seqs: vec![k.seq] }).encode();
            let (id, sig) = key.sign_hub_message(&topic, &ack);
            let signed = HubKind::Ack.seal(SignedV1 { message: ack.clone(), key_id: id.0, signature: sig.to_vec() });
            // A hub announcement, unsigned: makes agents re-send everything in flight.
            let online =
                brume_protocol::HubAnnouncement::OnlineV1(brume_protocol::HubOnlineV1 { subscribed_ms: 1 }).encode();
            for (t, payload) in [(topic.clone(), ack), (topic, signed), (topics::HUB_ONLINE.to_owned(), online)] {
                let _ = client.publish(t, QoS::AtLeastOnce, false, payload).await;
            }
            forged += 1;
            let _ = tx.send(forged);
        }
    });
    rx
}

/// A forged acknowledgement never removes a batch from the outbox of an agent that pins
/// the hub's key, and the batch still reaches the hub once it is up. The control: an
/// agent without pinned keys deletes its batches on the same forged acks, so the forgery
/// does reach agents and the pinned agent's refusal is what keeps its batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_hub_messages_are_ignored_by_agents_that_pin_the_hub_key() {
    let cloud = Mosquitto::start().unwrap();
    let keys = tempfile::tempdir().unwrap();
    let key_file = keys.path().join("hub.key");
    let out = std::process::Command::new(HUB).args(["keygen", "--out", key_file.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let public = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(public.starts_with("ed25519:"), "{public}");

    let pinned = Agent::start(
        Path::new(AGENT),
        "edge-pinned",
        cloud.port,
        &[
            ("forward", &format!("hub_keys = [{public:?}]\nack_timeout = \"2s\"")),
            // The control plane on, so that the agent listens for desired states (its
            // module downloads would go to this URL; none happens here).
            ("fleet", &format!("hub_url = \"http://127.0.0.1:9\"\ntrusted_keys = [{public:?}]")),
        ],
    )
    .await
    .unwrap();
    let open = Agent::start(Path::new(AGENT), "edge-open", cloud.port, &[]).await.unwrap();
    let mut forged = attacker(cloud.port, brume_signing::SecretKey::generate()).await;

    write(&pinned, "s", 0..100).await;
    write(&open, "s", 0..100).await;
    // The control agent's batches go on the forged acks alone (no hub is running).
    wait_until("the unpinned agent to drop its batches on forged acks", Duration::from_secs(30), || async {
        open.drained().await
    })
    .await
    .unwrap();
    // The pinned agent has seen forged acks for its batches, several times (re-sends after
    // `ack_timeout` and after each forged announcement), and kept every batch.
    forged.wait_for(|&n| n >= 6).await.unwrap();
    wait_until("the pinned agent to refuse forged messages", Duration::from_secs(30), || async {
        counter(&pinned, "hub_messages_rejected", "kind=\"ack\",reason=\"unsigned\"").await >= 2
            && counter(&pinned, "hub_messages_rejected", "kind=\"ack\",reason=\"untrusted_key\"").await >= 2
            && counter(&pinned, "hub_messages_rejected", "kind=\"announcement\",reason=\"unsigned\"").await >= 1
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", pinned.log()));
    assert!(outbox(&pinned).await > 0, "a forged ack removed a batch from the outbox");

    // A forged desired state (unsigned, for the pinned agent) is refused too.
    let mut opts = MqttOptions::new("attacker-desired", "127.0.0.1", cloud.port);
    opts.set_clean_session(true);
    let (c, mut el) = AsyncClient::new(opts, 8);
    let desired = brume_protocol::DesiredState::for_desired(brume_protocol::Desired {
        agent_id: "edge-pinned".into(),
        generation: 1_000_000,
        issued_ms: 0,
        modules: vec![],
        reprocess: vec![],
    })
    .encode();
    c.publish(topics::desired("edge-pinned"), QoS::AtLeastOnce, false, desired).await.unwrap();
    tokio::spawn(async move { while el.poll().await.is_ok() {} });
    wait_until("the forged desired state to be refused", Duration::from_secs(10), || async {
        counter(&pinned, "hub_messages_rejected", "kind=\"desired\",reason=\"unsigned\"").await >= 1
    })
    .await
    .unwrap();

    // The real hub signs with the pinned key: the pinned agent's batches reach it, every
    // reading once, while the attacker goes on forging.
    let hub =
        Hub::start_with_mqtt(Path::new(HUB), cloud.port, &format!("signing_key = {key_file:?}"), "").await.unwrap();
    pinned.wait_drained(Duration::from_secs(60)).await;
    let rows = hub.readings("s").await.unwrap();
    let from_pinned: Vec<u64> = rows
        .iter()
        .filter(|r| r["agent_id"] == "edge-pinned")
        .map(|r| r["fields"]["n"].as_f64().unwrap() as u64)
        .collect();
    assert_eq!(from_pinned, (0..100).collect::<Vec<_>>(), "every reading of the pinned agent, once, in order");
}
