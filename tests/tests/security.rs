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
    agent.write_json(stream, &format!("[{body}]")).await;
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

/// A test PKI: a CA and certificates it (or another CA) issues, as PEM files.
struct Pki {
    dir: tempfile::TempDir,
    ca: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl Pki {
    fn new(name: &str) -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, format!("{name} CA"));
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(dir.path().join("ca.pem"), cert.pem()).unwrap();
        Pki { dir, ca: rcgen::Issuer::new(params, key) }
    }

    fn ca_file(&self) -> std::path::PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A certificate for `cn` (also its only subject alternative name), valid now or
    /// expired in 2021. Returns (certificate file, key file).
    fn issue(&self, cn: &str, expired: bool) -> (std::path::PathBuf, std::path::PathBuf) {
        let mut params = rcgen::CertificateParams::new(vec![cn.to_owned()]).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, cn);
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        let tag = if expired { "-expired" } else { "" };
        let (c, k) = (self.dir.path().join(format!("{cn}{tag}.pem")), self.dir.path().join(format!("{cn}{tag}.key")));
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }

    /// A `[... .tls]` table body trusting this CA, with `identity`'s certificate and key.
    fn client_toml(&self, identity: Option<&(std::path::PathBuf, std::path::PathBuf)>) -> String {
        let mut t = format!("ca_file = {:?}\n", self.ca_file());
        if let Some((c, k)) = identity {
            t.push_str(&format!("cert_file = {c:?}\nkey_file = {k:?}\n"));
        }
        t
    }
}

/// The broker's per-agent ACL as shipped (README, "Security").
const ACL: &str = include_str!("../../integrations/mosquitto/brume.acl");

async fn last_error(agent: &Agent) -> String {
    agent.status().await.unwrap()["forward"]["last_error"].as_str().unwrap_or("").to_owned()
}

/// MQTT over TLS with client certificates (mutual TLS) and the per-agent ACL: the agent
/// and the hub connect with their certificates and readings flow; plaintext, an expired
/// certificate, one from another CA and a broker certificate the agent does not trust are
/// all refused; an agent's certificate cannot publish batches as another agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_over_mutual_tls_with_per_agent_acl() {
    let pki = Pki::new("fleet");
    let server = pki.issue("127.0.0.1", false);
    std::fs::write(pki.dir.path().join("acl"), ACL).unwrap();
    // The shipped listener configuration, on the harness's port, with this PKI's files.
    let server_files = [("ca.pem", pki.ca_file()), ("broker.pem", server.0.clone()), ("broker.key", server.1.clone())];
    let conf: String = include_str!("../../integrations/mosquitto/mosquitto-tls.conf")
        .lines()
        .filter(|l| !l.starts_with("listener ") && !l.starts_with("per_listener_settings"))
        .map(|l| {
            let mut l = l.replace("/etc/mosquitto/brume/brume.acl", &pki.dir.path().join("acl").display().to_string());
            for (name, path) in &server_files {
                l = l.replace(&format!("/etc/mosquitto/brume/{name}"), &path.display().to_string());
            }
            assert!(!l.contains("/etc/"), "a path the test does not replace: {l}");
            format!("{l}\n")
        })
        .collect();
    let broker = brume_test_support::Mosquitto::start_with(|_| {
        format!("persistence false\nlog_dest stderr\nlog_type error\nlog_type warning\n{conf}")
    })
    .unwrap();
    let hub_id = pki.issue("brume-hub", false);
    let hub = Hub::start_with_mqtt(
        Path::new(HUB),
        broker.port,
        &format!("[mqtt.tls]\n{}", pki.client_toml(Some(&hub_id))),
        "",
    )
    .await
    .unwrap();
    let a_id = pki.issue("edge-a", false);
    let port = broker.port;
    let tls_agent = |id: &'static str, table: String| async move {
        Agent::start(Path::new(AGENT), id, port, &[("forward.tls", &table)]).await.unwrap()
    };
    let a = tls_agent("edge-a", pki.client_toml(Some(&a_id))).await;
    write(&a, "tls", 0..50).await;
    a.wait_drained(Duration::from_secs(30)).await;
    assert_eq!(hub.readings("tls").await.unwrap().len(), 50);

    // Refused: plaintext to a TLS-only listener, an expired client certificate, one from
    // another CA, and a broker certificate from a CA the agent does not trust.
    let other = Pki::new("rogue");
    let expired = pki.issue("edge-x", true);
    let rogue = other.issue("edge-r", false);
    let s_id = pki.issue("edge-s", false);
    let plain = Agent::start(Path::new(AGENT), "edge-plain", broker.port, &[]).await.unwrap();
    let old = tls_agent("edge-x", pki.client_toml(Some(&expired))).await;
    let identity = |ca: std::path::PathBuf, id: &(std::path::PathBuf, std::path::PathBuf)| {
        format!("ca_file = {ca:?}\ncert_file = {:?}\nkey_file = {:?}\n", id.0, id.1)
    };
    let stranger = tls_agent("edge-r", identity(pki.ca_file(), &rogue)).await;
    let suspicious = tls_agent("edge-s", identity(other.ca_file(), &s_id)).await;
    for agent in [&plain, &old, &stranger, &suspicious] {
        write(agent, "refused", 0..5).await;
    }
    wait_until("every refused agent to report a connection error", Duration::from_secs(20), || async {
        let mut all = true;
        for agent in [&plain, &old, &stranger, &suspicious] {
            all &= !last_error(agent).await.is_empty();
        }
        all
    })
    .await
    .unwrap();
    // The agent names the reason when it is its own check that failed.
    let e = last_error(&suspicious).await;
    assert!(e.to_lowercase().contains("certificate") || e.contains("UnknownIssuer"), "{e}");
    for agent in [&plain, &old, &stranger, &suspicious] {
        let s = agent.status().await.unwrap();
        assert_eq!(s["forward"]["connected"], false, "{s}");
        let waiting = s["outbox"]["readings"].as_u64().unwrap() + s["store"]["unbatched_readings"].as_u64().unwrap();
        assert_eq!(waiting, 5, "nothing left the refused agent: {s}");
    }

    // edge-a's certificate publishing as edge-b: on edge-b's topic the broker drops it
    // (ACL); on its own topic with edge-b in the payload the hub refuses it. Then a batch
    // of its own on the same connection, acknowledged by the hub: the broker and the hub
    // handle one connection's publishes in order, so the two before were dealt with.
    let client_tls = brume_tls::ClientTls { ca_file: pki.ca_file(), cert_file: Some(a_id.0), key_file: Some(a_id.1) };
    let mut opts = MqttOptions::new("edge-a-impostor", "127.0.0.1", broker.port);
    opts.set_transport(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(
        client_tls.client_config().unwrap(),
    )));
    let (client, mut el) = AsyncClient::new(opts, 16);
    client.subscribe(topics::acks("edge-a"), QoS::AtLeastOnce).await.unwrap();
    let batch = |agent: &str, epoch: u64| {
        AgentMessage::BatchV2(brume_protocol::BatchV2 {
            agent_id: agent.into(),
            epoch,
            seq: 1,
            created_ms: 0,
            streams: vec![brume_protocol::StreamChunk {
                stream: format!("forged/{agent}/{epoch}"),
                points: vec![brume_protocol::Point {
                    ts_ns: 1_700_000_000_000_000_000,
                    fields: brume_protocol::FieldsBlob::encode(&[brume_protocol::Field {
                        name: "v".into(),
                        value: brume_protocol::Value::F64(1.0),
                    }])
                    .unwrap(),
                }],
            }],
            losses: vec![],
            lineage: vec![],
        })
        .encode()
    };
    client.publish(topics::batches("edge-b"), QoS::AtLeastOnce, false, batch("edge-b", 77)).await.unwrap();
    client.publish(topics::batches("edge-a"), QoS::AtLeastOnce, false, batch("edge-b", 78)).await.unwrap();
    client.publish(topics::batches("edge-a"), QoS::AtLeastOnce, false, batch("edge-a", 79)).await.unwrap();
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let Ok(Event::Incoming(Packet::Publish(p))) = el.poll().await
                && matches!(HubMessage::decode(&p.payload), Ok(HubMessage::AckV1(AckV1 { epoch: 79, .. })))
            {
                break;
            }
        }
    })
    .await
    .expect("the impostor connection's own batch is acknowledged");
    let streams: Vec<String> = hub.counts().await.unwrap().into_iter().map(|(s, _)| s).collect();
    assert!(streams.contains(&"forged/edge-a/79".to_owned()), "{streams:?}");
    assert!(!streams.iter().any(|s| s.contains("edge-b")), "a batch as edge-b was stored: {streams:?}");
}
