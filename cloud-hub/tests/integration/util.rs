//! Test harness: a real mosquitto on a free loopback port (`brume_test_support`), the hub
//! running in-process, and an MQTT client that behaves like an agent.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use brume_protocol::{AgentMessage, BatchV1, Field, FieldsBlob, HubMessage, Point, StreamChunk, Value, topics};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Upper bound for anything a test waits for.
pub const DEADLINE: Duration = Duration::from_secs(30);

pub use brume_test_support::Mosquitto;

/// The hub running in-process, stopped on drop.
pub struct Hub {
    /// Base URL of the HTTP API, e.g. `http://127.0.0.1:1234`.
    pub url: String,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<Result<(), cloud_hub::HubError>>>,
    _dir: tempfile::TempDir,
    http: reqwest::Client,
}

impl Hub {
    /// Starts the hub (SQLite store in a temporary directory) against the broker on
    /// `mqtt_port`.
    pub async fn start(mqtt_port: u16) -> Hub {
        Hub::start_with(mqtt_port, |_| {}).await
    }

    /// Starts the hub with the PostgreSQL store at `url`.
    pub async fn start_postgres(mqtt_port: u16, url: &str) -> Hub {
        Hub::start_with(mqtt_port, |cfg| {
            cfg.storage.backend = cloud_hub::Backend::Postgres;
            cfg.storage.postgres.url = url.to_owned();
            // Short enough that an outage test does not wait long for a retry.
            cfg.storage.postgres.connect_timeout = Duration::from_secs(2);
        })
        .await
    }

    /// Starts the hub with the default config adjusted by `configure`.
    pub async fn start_with(mqtt_port: u16, configure: impl FnOnce(&mut cloud_hub::Config)) -> Hub {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = cloud_hub::Config { data_dir: dir.path().to_owned(), ..Default::default() };
        cfg.mqtt.port = mqtt_port;
        configure(&mut cfg);
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(cloud_hub::run(cfg, listener, shutdown.clone()));
        Hub { url: format!("http://{addr}"), shutdown, task: Some(task), _dir: dir, http: reqwest::Client::new() }
    }

    /// GET `path`, returning the status and the body.
    pub async fn get(&self, path: &str) -> (u16, String) {
        let resp = self.http.get(format!("{}{path}", self.url)).send().await.unwrap();
        (resp.status().as_u16(), resp.text().await.unwrap())
    }

    /// Sends `method path` with no body, returning the status and the body.
    pub async fn request(&self, method: reqwest::Method, path: &str) -> (u16, String) {
        let resp = self.http.request(method, format!("{}{path}", self.url)).send().await.unwrap();
        (resp.status().as_u16(), resp.text().await.unwrap())
    }

    /// GET `path`, expecting 200 and JSON.
    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        let (status, body) = self.get(path).await;
        assert_eq!(status, 200, "GET {path}: {body}");
        serde_json::from_str(&body).unwrap()
    }

    /// Value of one sample in `/metrics`, e.g. `brume_hub_batches_total{result="stored"}`;
    /// 0 if absent.
    pub async fn metric(&self, sample: &str) -> f64 {
        let (_, body) = self.get("/metrics").await;
        body.lines()
            .find_map(|l| l.strip_prefix(sample).and_then(|rest| rest.strip_prefix(' ')))
            .map_or(0.0, |v| v.trim().parse().unwrap())
    }

    /// Stops the hub and checks that it shut down cleanly.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        let task = self.task.take().unwrap();
        tokio::time::timeout(DEADLINE, task).await.expect("hub did not stop").unwrap().unwrap();
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// An MQTT client standing in for an edge agent: publishes batches, receives acks.
pub struct Agent {
    /// Agent id.
    pub id: String,
    client: AsyncClient,
    acks: mpsc::UnboundedReceiver<HubMessage>,
}

impl Agent {
    /// Connects, subscribes to its acks topic and waits for the SUBACK.
    pub async fn connect(mqtt_port: u16, id: &str) -> Agent {
        let mut opts = MqttOptions::new(format!("test-agent-{id}"), "127.0.0.1", mqtt_port);
        opts.set_keep_alive(Duration::from_secs(30));
        let (client, mut eventloop) = AsyncClient::new(opts, 64);
        let (tx, acks) = mpsc::unbounded_channel();
        let (subscribed_tx, subscribed_rx) = tokio::sync::oneshot::channel();
        let topic = topics::acks(id);
        client.subscribe(topic.clone(), QoS::AtLeastOnce).await.unwrap();
        tokio::spawn(async move {
            let mut subscribed_tx = Some(subscribed_tx);
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(s) = subscribed_tx.take() {
                            let _ = s.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) if p.topic == topic => {
                        let msg = HubMessage::decode(&p.payload).expect("hub ack decodes");
                        if tx.send(msg).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    // The broker is gone at the end of a test.
                    Err(_) => return,
                }
            }
        });
        tokio::time::timeout(DEADLINE, subscribed_rx).await.expect("no SUBACK").unwrap();
        Agent { id: id.into(), client, acks }
    }

    /// Publishes raw bytes QoS 1 on `topic`.
    pub async fn publish_raw(&self, topic: String, payload: Vec<u8>) {
        self.client.publish(topic, QoS::AtLeastOnce, false, payload).await.unwrap();
    }

    /// Publishes a batch on this agent's batch topic.
    pub async fn publish(&self, batch: &BatchV1) {
        self.publish_raw(topics::batches(&self.id), AgentMessage::BatchV1(batch.clone()).encode()).await;
    }

    /// Waits for the next hub ack.
    pub async fn next_ack(&mut self, within: Duration) -> Option<HubMessage> {
        tokio::time::timeout(within, self.acks.recv()).await.ok().flatten()
    }

    /// Publishes `batch` until the hub acks it, as an agent would (the hub may not have
    /// subscribed yet, in which case the broker drops the publish). Returns the ack.
    pub async fn send_until_acked(&mut self, batch: &BatchV1) -> HubMessage {
        let start = Instant::now();
        loop {
            self.publish(batch).await;
            let retry_at = Instant::now() + Duration::from_millis(500);
            while let Some(left) = retry_at.checked_duration_since(Instant::now()) {
                match self.next_ack(left).await {
                    Some(HubMessage::AckV1(a)) if a.epoch == batch.epoch && a.seqs.contains(&batch.seq) => {
                        return HubMessage::AckV1(a);
                    }
                    Some(_) => {}
                    None => break,
                }
            }
            assert!(start.elapsed() < DEADLINE, "batch {} never acked", batch.seq);
        }
    }
}

/// A batch from `agent` with readings `(stream, ts_ns, value)`, all with fields
/// `value` (f64), `ok` (bool) and `name` (string).
pub fn batch(agent: &str, epoch: u64, seq: u64, readings: &[(&str, i64, f64)]) -> BatchV1 {
    let mut streams: Vec<StreamChunk> = Vec::new();
    for &(stream, ts_ns, v) in readings {
        let fields = FieldsBlob::encode(&[
            Field { name: "value".into(), value: Value::F64(v) },
            Field { name: "ok".into(), value: Value::Bool(true) },
            Field { name: "name".into(), value: Value::Str("x".into()) },
        ])
        .unwrap();
        let point = Point { ts_ns, fields };
        match streams.iter_mut().find(|c| c.stream == stream) {
            Some(c) => c.points.push(point),
            None => streams.push(StreamChunk { stream: stream.into(), points: vec![point] }),
        }
    }
    BatchV1 { agent_id: agent.into(), epoch, seq, created_ms: 1_700_000_000_000, streams, losses: vec![] }
}

/// A presence message of an online agent with these labels.
pub fn status(id: &str, labels: &[(&str, &str)]) -> brume_protocol::AgentStatus {
    brume_protocol::AgentStatus::V1(brume_protocol::StatusV1 {
        agent_id: id.into(),
        online: true,
        version: "test".into(),
        started_ms: 0,
        sent_ms: 0,
        heartbeat_s: 60,
        store_readings: 0,
        outbox_batches: 0,
        outbox_readings: 0,
        modules: vec![],
        labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
    })
}
