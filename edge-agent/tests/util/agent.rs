//! The agent, run in-process on loopback listeners bound to port 0, and what a test can
//! observe of it over its local HTTP API (`/api/v1/status`, `/metrics`).

use std::net::SocketAddr;

use edge_agent::Listeners;
use edge_agent::config::{Config, ForwardMode};
use rumqttc::mqttbytes::v4;
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::mqtt::{self, QoS4};
use super::{STEP, eventually};

/// Series name of the committed-readings counter.
pub const COMMITTED: &str = "brume_agent_readings_committed_total";

/// A running agent: `edge_agent::run` on its own task, with a private data directory.
///
/// Dropping it cancels the agent without waiting; [`Agent::stop`] shuts it down
/// gracefully and checks that `run` returned `Ok`.
pub struct Agent {
    /// Address of the built-in MQTT listener.
    pub mqtt: SocketAddr,
    /// Address of the local HTTP server.
    pub http: SocketAddr,
    /// The data directory; `Some` until [`Agent::stop`] hands it back.
    dir: Option<TempDir>,
    /// Cancels `run`.
    token: CancellationToken,
    /// `run`'s task; `Some` until [`Agent::stop`] awaits it.
    task: Option<JoinHandle<anyhow::Result<()>>>,
    client: reqwest::Client,
}

impl Agent {
    /// Starts an agent with the test defaults (see [`Agent::start_in`]).
    pub async fn start() -> Agent {
        Agent::start_with(|_| {}).await
    }

    /// Starts an agent on a fresh data directory; `tweak` adjusts the config.
    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> Agent {
        Agent::start_in(tempfile::tempdir().expect("tempdir"), tweak).await
    }

    /// Starts an agent on `dir`. Test defaults: forwarding off (no broker needed), MQTT and
    /// HTTP on `127.0.0.1:0`; `tweak` adjusts the rest. The listeners are bound before
    /// `run` is spawned, so connecting right away is safe.
    pub async fn start_in(dir: TempDir, tweak: impl FnOnce(&mut Config)) -> Agent {
        let mut cfg = Config { data_dir: dir.path().to_path_buf(), ..Config::default() };
        cfg.forward.mode = ForwardMode::Off;
        tweak(&mut cfg);
        cfg.validate().expect("test config must be valid");

        let mqtt_l = TcpListener::bind("127.0.0.1:0").await.expect("bind MQTT");
        let http_l = TcpListener::bind("127.0.0.1:0").await.expect("bind HTTP");
        let mqtt = mqtt_l.local_addr().expect("MQTT addr");
        let http = http_l.local_addr().expect("HTTP addr");
        let token = CancellationToken::new();
        let task =
            tokio::spawn(edge_agent::run(cfg, Listeners { mqtt: Some(mqtt_l), http: Some(http_l) }, token.clone()));
        let client = reqwest::Client::builder().no_proxy().timeout(STEP).build().expect("HTTP client");
        Agent { mqtt, http, dir: Some(dir), token, task: Some(task), client }
    }

    /// The agent's data directory.
    pub fn data_dir(&self) -> &std::path::Path {
        self.dir.as_ref().expect("running").path()
    }

    /// Cancels the agent, waits for `run` to return, asserts it returned `Ok`, and hands
    /// back the data directory (for a restart on the same store).
    pub async fn stop(mut self) -> TempDir {
        self.token.cancel();
        let task = self.task.take().expect("running");
        let result = tokio::time::timeout(STEP * 2, task)
            .await
            .expect("run() did not return after the shutdown token was cancelled")
            .expect("run() panicked");
        if let Err(e) = result {
            panic!("run() returned an error: {e:#}");
        }
        self.dir.take().expect("data dir")
    }

    /// The HTTP client, with a bounded timeout and no proxy.
    pub fn http_client(&self) -> &reqwest::Client {
        &self.client
    }

    /// `http://127.0.0.1:port{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    /// `GET /api/v1/status` as JSON.
    pub async fn status(&self) -> serde_json::Value {
        let resp = self.client.get(self.url("/api/v1/status")).send().await.expect("GET /api/v1/status");
        assert_eq!(resp.status(), 200, "GET /api/v1/status");
        resp.json().await.expect("status is JSON")
    }

    /// `store.readings` from the status.
    pub async fn readings(&self) -> u64 {
        let s = self.status().await;
        s["store"]["readings"].as_u64().unwrap_or_else(|| panic!("status has no store.readings: {s}"))
    }

    /// Waits until the status reports exactly `n` readings. The status is polled because
    /// the store publishes its snapshot just after replying to the commit it describes.
    pub async fn wait_readings(&self, n: u64) {
        eventually(&format!("store.readings == {n}"), || async {
            let r = self.readings().await;
            if r == n { Ok(()) } else { Err(format!("store.readings == {r}")) }
        })
        .await;
    }

    /// `GET /metrics` as text.
    pub async fn metrics_text(&self) -> String {
        let resp = self.client.get(self.url("/metrics")).send().await.expect("GET /metrics");
        assert_eq!(resp.status(), 200, "GET /metrics");
        resp.text().await.expect("metrics text")
    }

    /// Value of one series, e.g. `brume_agent_bad_input_total{reason="bad_json"}`; 0 when
    /// the series does not exist yet (label sets appear on first use).
    pub async fn metric(&self, series: &str) -> u64 {
        let text = self.metrics_text().await;
        for line in text.lines() {
            if let Some((name, value)) = line.rsplit_once(' ')
                && name == series
            {
                let v: f64 = value.parse().unwrap_or_else(|_| panic!("bad metric line {line:?}"));
                return v as u64;
            }
        }
        0
    }

    /// `brume_agent_bad_input_total{reason="…"}`.
    pub async fn bad_input(&self, reason: &str) -> u64 {
        self.metric(&format!("brume_agent_bad_input_total{{reason=\"{reason}\"}}")).await
    }

    /// `brume_agent_readings_refused_total{reason="…"}`.
    pub async fn refused(&self, reason: &str) -> u64 {
        self.metric(&format!("brume_agent_readings_refused_total{{reason=\"{reason}\"}}")).await
    }

    /// `brume_agent_readings_committed_total`.
    pub async fn committed(&self) -> u64 {
        self.metric(COMMITTED).await
    }

    /// Proves the agent still ingests: a new MQTT 3.1.1 connection publishes one good
    /// QoS 1 reading on `topic`, gets its PUBACK, the committed counter goes up by one and
    /// the store ends up holding `expect_readings` readings.
    pub async fn assert_still_works(&self, topic: &str, expect_readings: u64) {
        let committed = self.committed().await;
        let mut conn = mqtt::connect_ok_v4(self.mqtt, "still-works").await;
        conn.send_v4(mqtt::publish_v4(topic, QoS4::AtLeastOnce, 4242, r#"{"ok":1}"#)).await;
        mqtt::expect_puback_v4(&mut conn, 4242).await;
        conn.send_v4(v4::Packet::Disconnect).await;
        assert_eq!(self.committed().await, committed + 1, "the probe reading was committed");
        self.wait_readings(expect_readings).await;
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // A failed test must not leave the agent serving; the runtime ends with the test.
        self.token.cancel();
    }
}
