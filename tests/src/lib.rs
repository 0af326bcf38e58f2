//! Test harness for Brume's end-to-end tests: a private mosquitto on a free port, hub and
//! agent processes that can be stopped, killed and restarted, a sensor that publishes
//! over MQTT and remembers what was acknowledged, and HTTP helpers to read the hub.
//!
//! Everything listens on 127.0.0.1 and lives in temporary directories removed on drop.

/// A private PostgreSQL server per test (initdb in a temporary directory, free port), from
/// the shared harness (`brume_test_support`).
pub mod pg {
    pub use brume_test_support::TestPostgres;
}

pub use brume_test_support::free_port;

use std::collections::HashSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// A test that cannot run here says so instead of passing silently: with
/// `BRUME_REQUIRE_ALL=1` (set by `.ci/run`) it fails; otherwise it appends a line to the
/// file named by `BRUME_SKIP_LOG` (set by `scripts/test.sh`, which counts the lines as
/// skipped in its closing line) and to stderr. Call it, then return.
pub fn skip(test: &str, why: &str) {
    if std::env::var("BRUME_REQUIRE_ALL").is_ok_and(|v| v == "1") {
        panic!("{test} cannot run: {why}; BRUME_REQUIRE_ALL=1 requires every test to run");
    }
    let line = format!("SKIPPED {test}: {why}\n");
    eprint!("{line}");
    if let Some(log) = std::env::var_os("BRUME_SKIP_LOG") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(log) {
            let _ = f.write_all(line.as_bytes());
        }
    }
}

/// Polls `cond` every 50 ms until it holds or `timeout` passes.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut cond: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if cond().await {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn port_open(port: u16) -> bool {
    tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok()
}

/// A child process killed on drop.
pub struct Proc {
    child: Option<Child>,
    name: String,
    cmd: Command,
}

impl Proc {
    fn build(exe: &Path, args: &[String], log: &Path) -> Command {
        let mut cmd = Command::new(exe);
        cmd.args(args);
        let out = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        cmd.stdout(out.try_clone().unwrap()).stderr(out).stdin(Stdio::null());
        cmd.env("RUST_LOG", std::env::var("BRUME_E2E_LOG").unwrap_or_else(|_| "info,rumqttc=warn".into()));
        cmd
    }

    /// Spawns `exe args`, appending its output to `log`.
    pub fn spawn(name: &str, exe: &Path, args: &[String], log: &Path) -> Result<Proc> {
        let mut cmd = Self::build(exe, args, log);
        let child = cmd.spawn().with_context(|| format!("spawning {}", exe.display()))?;
        Ok(Proc { child: Some(child), name: name.into(), cmd })
    }

    /// SIGKILL, no chance to flush anything.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit (up to 30 s, then SIGKILL). Returns the exit status.
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        // SAFETY: sending a signal to our own child's pid has no memory-safety impact.
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(c.id() as libc::pid_t, libc::SIGTERM)
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(st);
            }
            if Instant::now() > deadline {
                eprintln!("{} ignored SIGTERM for 30 s; killing", self.name);
                let _ = c.kill();
                return c.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the same command again (after `kill9` or `terminate`).
    pub fn restart(&mut self) -> Result<()> {
        assert!(self.child.is_none(), "{} is still running", self.name);
        self.child = Some(self.cmd.spawn().with_context(|| format!("restarting {}", self.name))?);
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A private mosquitto broker on a free port (`brume_test_support`), with queue limits
/// high enough for the tests' bursts.
pub struct Mosquitto {
    /// Its port.
    pub port: u16,
    inner: brume_test_support::Mosquitto,
}

impl Mosquitto {
    /// Starts mosquitto (must be installed: `apt-get install mosquitto`) and waits until
    /// it accepts connections.
    pub fn start() -> Result<Mosquitto> {
        let inner = brume_test_support::Mosquitto::start_with(|_| {
            "persistence false\nmax_queued_messages 100000\nmax_inflight_messages 1000\n\
             log_dest stderr\nlog_type error\nlog_type warning\n"
                .into()
        })?;
        Ok(Mosquitto { port: inner.port, inner })
    }

    /// Stops the broker (an outage). Clients see their connections drop.
    pub fn stop(&mut self) {
        self.inner.stop();
    }

    /// Starts it again on the same port and waits until it accepts connections.
    pub fn restart(&mut self) -> Result<()> {
        Ok(self.inner.restart()?)
    }
}

/// A cloud hub process with its own data directory.
pub struct Hub {
    /// HTTP API base URL.
    pub url: String,
    /// The process.
    pub proc: Proc,
    /// Its data directory (kept across restarts).
    pub dir: tempfile::TempDir,
    /// The API token the harness's own requests send, for hubs with `[[http.tokens]]`.
    pub token: Option<String>,
}

impl Hub {
    fn api(&self, path: &str) -> reqwest::RequestBuilder {
        let r = reqwest::Client::new().get(format!("{}{path}", self.url));
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    /// Starts a hub against the broker on `broker_port`.
    pub async fn start(exe: &Path, broker_port: u16) -> Result<Hub> {
        Hub::start_with(exe, broker_port, "").await
    }

    /// Starts a hub with `extra` TOML appended to its config (e.g. a `[storage]` table).
    pub async fn start_with(exe: &Path, broker_port: u16, extra: &str) -> Result<Hub> {
        Hub::start_with_mqtt(exe, broker_port, "", extra).await
    }

    /// [`Hub::start_with`], and `mqtt` lines added to its `[mqtt]` table.
    pub async fn start_with_mqtt(exe: &Path, broker_port: u16, mqtt: &str, extra: &str) -> Result<Hub> {
        let dir = tempfile::tempdir()?;
        let http = free_port();
        let cfg = dir.path().join("hub.toml");
        std::fs::write(
            &cfg,
            format!(
                "data_dir = {data:?}\n[mqtt]\nhost = \"127.0.0.1\"\nport = {broker_port}\n{mqtt}\n[http]\nlisten = \"127.0.0.1:{http}\"\n{extra}\n",
                data = dir.path().join("data").display().to_string()
            ),
        )?;
        let proc =
            Proc::spawn("cloud-hub", exe, &["--config".into(), cfg.display().to_string()], &dir.path().join("log"))?;
        let hub = Hub { url: format!("http://127.0.0.1:{http}"), proc, dir, token: None };
        wait_until("the hub's HTTP API", Duration::from_secs(20), || port_open(http)).await?;
        Ok(hub)
    }

    /// Restarts after a kill, on the same data directory, and waits for its API.
    pub async fn restart(&mut self) -> Result<()> {
        self.proc.restart()?;
        let port: u16 = self.url.rsplit(':').next().unwrap().parse()?;
        wait_until("the hub's HTTP API after restart", Duration::from_secs(20), || port_open(port)).await
    }

    /// All readings of a stream, in the hub's order, paging through the API.
    pub async fn readings(&self, stream: &str) -> Result<Vec<serde_json::Value>> {
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let mut req = self
                .api("/api/v1/readings")
                .query(&[("stream", stream), ("limit", &cloud_hub::http::MAX_LIMIT.to_string())]);
            if let Some(a) = &after {
                req = req.query(&[("after", a)]);
            }
            let v: serde_json::Value = req.send().await?.error_for_status()?.json().await?;
            out.extend(v["readings"].as_array().context("readings array")?.iter().cloned());
            match v["next"].as_str() {
                Some(n) => after = Some(n.to_string()),
                None => return Ok(out),
            }
        }
    }

    /// Reading counts per stream.
    pub async fn counts(&self) -> Result<Vec<(String, u64)>> {
        let v: serde_json::Value = self.api("/api/v1/streams").send().await?.error_for_status()?.json().await?;
        Ok(v.as_array()
            .context("streams array")?
            .iter()
            .map(|s| (s["stream"].as_str().unwrap_or("").to_string(), s["readings"].as_u64().unwrap_or(0)))
            .collect())
    }

    /// Total readings stored, or 0 while the API is unreachable.
    pub async fn total(&self) -> u64 {
        self.counts().await.map(|c| c.iter().map(|x| x.1).sum()).unwrap_or(0)
    }
}

/// An edge agent process with its own data directory and a config file.
pub struct Agent {
    /// Port of its MQTT listener for sensors.
    pub mqtt_port: u16,
    /// Its local HTTP base URL.
    pub url: String,
    /// The process.
    pub proc: Proc,
    /// Data directory and config, kept across restarts.
    pub dir: tempfile::TempDir,
}

impl Agent {
    /// Starts an agent forwarding to the broker on `broker_port`. `extra` adds TOML lines
    /// per section: `("", "top-level = 1")`, `("forward", "mode = \"json\"")`,
    /// `("store.default_rule", "...")`; they are merged with the harness's own.
    pub async fn start(exe: &Path, agent_id: &str, broker_port: u16, extra: &[(&str, &str)]) -> Result<Agent> {
        Agent::start_with(exe, &[], agent_id, broker_port, extra).await
    }

    /// [`Agent::start`] with arguments before the agent's own: `exe` is then a runner
    /// such as `qemu-arm` and `pre` its options and the agent binary.
    pub async fn start_with(
        exe: &Path,
        pre: &[String],
        agent_id: &str,
        broker_port: u16,
        extra: &[(&str, &str)],
    ) -> Result<Agent> {
        let dir = tempfile::tempdir()?;
        let mqtt = free_port();
        let http = free_port();
        let mut sections: Vec<(String, String)> = vec![
            (
                String::new(),
                format!("agent_id = {agent_id:?}\ndata_dir = {:?}\n", dir.path().join("data").display().to_string()),
            ),
            // Forwarding timeouts and backoff are the agent's defaults: the tests hold them
            // to what users get.
            ("forward".into(), format!("port = {broker_port}\n")),
            ("listener".into(), format!("listen = \"127.0.0.1:{mqtt}\"\n")),
            ("http".into(), format!("listen = \"127.0.0.1:{http}\"\n")),
        ];
        for (name, body) in extra {
            match sections.iter_mut().find(|(n, _)| n == name) {
                Some((_, b)) => {
                    b.push_str(body);
                    b.push('\n');
                }
                None => sections.push((name.to_string(), format!("{body}\n"))),
            }
        }
        let mut text = String::new();
        for (name, body) in &sections {
            if !name.is_empty() {
                text.push_str(&format!("[{name}]\n"));
            }
            text.push_str(body);
        }
        let cfg = dir.path().join("agent.toml");
        std::fs::write(&cfg, text)?;
        let mut args = pre.to_vec();
        args.extend(["--config".into(), cfg.display().to_string()]);
        let proc = Proc::spawn("edge-agent", exe, &args, &dir.path().join("log"))?;
        let a = Agent { mqtt_port: mqtt, url: format!("http://127.0.0.1:{http}"), proc, dir };
        // Emulated agents (qemu-user) start several times slower.
        wait_until("the agent's HTTP server", Duration::from_secs(60), || port_open(http)).await?;
        Ok(a)
    }

    /// Restarts on the same data directory and waits for the listener.
    pub async fn restart(&mut self) -> Result<()> {
        self.proc.restart()?;
        let port: u16 = self.url.rsplit(':').next().unwrap().parse()?;
        wait_until("the agent's HTTP server after restart", Duration::from_secs(60), || port_open(port)).await
    }

    /// Writes a JSON array of readings to `stream` through the agent's HTTP API and checks
    /// the 204 (every reading committed).
    pub async fn write_json(&self, stream: &str, array: &str) {
        let r = reqwest::Client::new()
            .post(format!("{}/api/v1/write", self.url))
            .query(&[("stream", stream)])
            .header("content-type", "application/json")
            .body(array.to_owned())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 204, "{}", r.text().await.unwrap_or_default());
    }

    /// The agent's JSON status.
    pub async fn status(&self) -> Result<serde_json::Value> {
        Ok(reqwest::get(format!("{}/api/v1/status", self.url)).await?.error_for_status()?.json().await?)
    }

    /// Whether everything the agent stored has been acknowledged by the hub: no batch in
    /// the outbox and no reading waiting to be batched.
    pub async fn drained(&self) -> bool {
        self.status().await.is_ok_and(|s| s["outbox"]["batches"] == 0 && s["store"]["unbatched_readings"] == 0)
    }

    /// Waits until [`Agent::drained`], panicking with the agent's log after `timeout`.
    pub async fn wait_drained(&self, timeout: Duration) {
        wait_until("the agent's outbox to drain", timeout, || self.drained())
            .await
            .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", self.log()));
    }

    /// The agent's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }
}

/// A sensor publishing numbered readings at QoS 1 to an agent's MQTT listener, round-robin
/// over `streams` topics `<prefix>/<i>` (`s/<i>` by default), remembering which numbers
/// were PUBACKed.
pub struct Sensor {
    /// Numbers whose PUBACK arrived.
    pub acked: Arc<Mutex<HashSet<u64>>>,
    /// Numbers published.
    pub sent: Arc<Mutex<u64>>,
    stop: tokio_util_stop::Stop,
    task: tokio::task::JoinHandle<()>,
}

/// Minimal stop flag (keeps the harness free of extra dependencies).
pub mod tokio_util_stop {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    /// A shared stop flag.
    #[derive(Clone, Default)]
    pub struct Stop(Arc<AtomicBool>);
    impl Stop {
        /// Raise it.
        pub fn set(&self) {
            self.0.store(true, Ordering::SeqCst)
        }
        /// Is it raised?
        pub fn is_set(&self) -> bool {
            self.0.load(Ordering::SeqCst)
        }
    }
}

impl Sensor {
    /// Stream name of reading `n`.
    pub fn stream_of(n: u64, streams: u64) -> String {
        format!("s/{}", n % streams)
    }

    /// Starts publishing `rate` readings per second on `s/<i>`.
    pub fn start(agent_port: u16, streams: u64, rate: u64) -> Sensor {
        Sensor::start_named(agent_port, "s", streams, rate)
    }

    /// Starts publishing `rate` readings per second on `<prefix>/<i>`.
    pub fn start_named(agent_port: u16, prefix: &str, streams: u64, rate: u64) -> Sensor {
        let prefix = prefix.to_owned();
        use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
        let acked = Arc::new(Mutex::new(HashSet::new()));
        let sent = Arc::new(Mutex::new(0u64));
        let stop = tokio_util_stop::Stop::default();
        let (a, s, st) = (acked.clone(), sent.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let mut opts = MqttOptions::new(format!("sensor-{agent_port}"), "127.0.0.1", agent_port);
            opts.set_keep_alive(Duration::from_secs(5));
            opts.set_inflight(100);
            let (client, mut el) = AsyncClient::new(opts, 200);
            // pkid assignment order = publish order; map pkid → reading number.
            let order: Arc<Mutex<std::collections::VecDeque<u64>>> = Default::default();
            let pkids: Arc<Mutex<std::collections::HashMap<u16, u64>>> = Default::default();
            let (o2, p2, a2, st2) = (order.clone(), pkids.clone(), a.clone(), st.clone());
            let poller = tokio::spawn(async move {
                loop {
                    match el.poll().await {
                        Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                            if let Some(n) = o2.lock().unwrap().pop_front() {
                                p2.lock().unwrap().insert(pkid, n);
                            }
                        }
                        Ok(Event::Incoming(Packet::PubAck(ack))) => {
                            if let Some(n) = p2.lock().unwrap().remove(&ack.pkid) {
                                a2.lock().unwrap().insert(n);
                            }
                        }
                        Ok(_) => {}
                        Err(_) => {
                            // Agent down (killed): what was in flight is not acknowledged and
                            // rumqttc will not replay it on a clean session; forget it.
                            o2.lock().unwrap().clear();
                            p2.lock().unwrap().clear();
                            if st2.is_set() {
                                return;
                            }
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            });
            let start = Instant::now();
            let mut n = 0u64;
            while !st.is_set() {
                let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
                while n < due && !st.is_set() {
                    let topic = format!("{prefix}/{}", n % streams);
                    let payload = format!("{{\"n\":{n}}}");
                    order.lock().unwrap().push_back(n);
                    if client.publish(topic, QoS::AtLeastOnce, false, payload).await.is_err() {
                        order.lock().unwrap().pop_back();
                        break;
                    }
                    n += 1;
                    *s.lock().unwrap() = n;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            // Let outstanding PUBACKs arrive.
            let _ = tokio::time::timeout(Duration::from_secs(5), async {
                while !pkids.lock().unwrap().is_empty() || !order.lock().unwrap().is_empty() {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
            .await;
            let _ = client.disconnect().await;
            let _ = tokio::time::timeout(Duration::from_secs(2), poller).await;
        });
        Sensor { acked, sent, stop, task }
    }

    /// Stops publishing and waits for outstanding acknowledgements.
    pub async fn stop(self) -> (HashSet<u64>, u64) {
        self.stop.set();
        let _ = self.task.await;
        let acked = self.acked.lock().unwrap().clone();
        let sent = *self.sent.lock().unwrap();
        (acked, sent)
    }
}

/// Checks the hub holds each acknowledged reading exactly once, in per-stream order, and
/// nothing that was never published. Returns the number of readings at the hub.
pub async fn check_exactly_once(hub: &Hub, acked: &HashSet<u64>, sent: u64, streams: u64) -> Result<u64> {
    check_exactly_once_named(hub, "s", acked, sent, streams).await
}

/// [`check_exactly_once`] for a sensor started with [`Sensor::start_named`].
pub async fn check_exactly_once_named(
    hub: &Hub,
    prefix: &str,
    acked: &HashSet<u64>,
    sent: u64,
    streams: u64,
) -> Result<u64> {
    let mut total = 0;
    for s in 0..streams {
        let stream = format!("{prefix}/{s}");
        let rows = hub.readings(&stream).await?;
        let ns: Vec<u64> = rows.iter().map(|r| r["fields"]["n"].as_f64().unwrap_or(-1.0) as u64).collect();
        let mut seen = HashSet::new();
        for &n in &ns {
            if !seen.insert(n) {
                bail!("reading {n} stored twice on {stream}");
            }
            if n >= sent || n % streams != s {
                bail!("reading {n} on {stream} was never published there");
            }
        }
        if let Some(w) = ns.windows(2).find(|w| w[0] > w[1]) {
            bail!("order broken on {stream}: {} before {}", w[0], w[1]);
        }
        for &n in acked.iter().filter(|n| *n % streams == s) {
            if !seen.contains(&n) {
                bail!(
                    "reading {n} was PUBACKed by the agent but never reached the hub ({} stored on {stream})",
                    ns.len()
                );
            }
        }
        total += ns.len() as u64;
    }
    Ok(total)
}

/// Connects a fresh MQTT client to the agent's listener; `None` while it is down.
async fn mqtt_connect(port: u16, n: u32) -> Option<(rumqttc::AsyncClient, rumqttc::EventLoop)> {
    let mut opts = rumqttc::MqttOptions::new(format!("sensor-{port}-{n}"), "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(5));
    let (client, mut el) = rumqttc::AsyncClient::new(opts, 10);
    let connected = next_packet(&mut el, Duration::from_secs(2), |p| matches!(p, rumqttc::Packet::ConnAck(_))).await;
    connected.then_some((client, el))
}

/// Polls until a packet `want` accepts arrives (true), or an error or the timeout (false).
async fn next_packet(el: &mut rumqttc::EventLoop, within: Duration, want: fn(&rumqttc::Packet) -> bool) -> bool {
    let found = tokio::time::timeout(within, async {
        loop {
            match el.poll().await {
                Ok(rumqttc::Event::Incoming(p)) if want(&p) => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    })
    .await;
    matches!(found, Ok(true))
}

/// Publishes readings `range` (`payload(i)`) to `topic` one at a time at QoS 1, each until its PUBACK
/// arrives, reconnecting and re-publishing the unacknowledged reading while the agent is
/// down: what a well-behaved sensor does. (A reading committed just before a kill, whose
/// PUBACK was lost, is published twice: at-least-once, as MQTT QoS 1 promises.)
pub async fn publish_reliably(port: u16, topic: &str, range: std::ops::Range<i64>, payload: fn(i64) -> String) {
    let mut conn: Option<(rumqttc::AsyncClient, rumqttc::EventLoop)> = None;
    let mut attempts = 0u32;
    for i in range {
        loop {
            if conn.is_none() {
                attempts += 1;
                assert!(attempts < 600, "the agent's listener stayed unreachable");
                conn = mqtt_connect(port, attempts).await;
                if conn.is_none() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            }
            let (client, el) = conn.as_mut().unwrap();
            client.publish(topic, rumqttc::QoS::AtLeastOnce, false, payload(i)).await.unwrap();
            if next_packet(el, Duration::from_secs(5), |p| matches!(p, rumqttc::Packet::PubAck(_))).await {
                break;
            }
            conn = None;
        }
    }
}

fn num(r: &serde_json::Value, field: &str) -> f64 {
    r["fields"][field].as_f64().unwrap_or_else(|| panic!("field {field} in {r}"))
}

/// One closed window as the downsample module reports it: (start ns, min, mean, max, count).
pub type Window = (i64, f64, f64, f64, i64);

/// The downsample module's semantics, on its input in arrival order: per fixed window a
/// reading of a later window closes it, a reading older than the open window is dropped.
pub fn model_downsample(input: &[(i64, f64)], window_ns: i64) -> Vec<Window> {
    let mut out = Vec::new();
    let mut open: Option<(i64, i64, u64, f64, f64, f64)> = None; // start, end, count, sum, min, max
    for &(ts, v) in input {
        match &mut open {
            Some((start, ..)) if ts < *start => {}
            Some((_, end, count, sum, min, max)) if ts < *end => {
                *count += 1;
                *sum += v;
                *min = min.min(v);
                *max = max.max(v);
            }
            _ => {
                if let Some((start, _, count, sum, min, max)) = open {
                    out.push((start, min, sum / count as f64, max, count as i64));
                }
                let start = ts.div_euclid(window_ns) * window_ns;
                open = Some((start, start + window_ns, 1, v, v, v));
            }
        }
    }
    out
}

/// The hub's downsample outputs, by window start.
pub fn windows(rows: &[serde_json::Value]) -> Vec<Window> {
    rows.iter()
        .map(|r| {
            (
                r["ts_ns"].as_i64().unwrap(),
                num(r, "min"),
                num(r, "mean"),
                num(r, "max"),
                r["fields"]["count"].as_i64().unwrap(),
            )
        })
        .collect()
}

/// The agent's stored input as the hub holds it, in the agent's arrival order: batch
/// sequence, then index in the batch (one stream, one producer: one chunk per batch).
pub fn arrival_order(rows: &[serde_json::Value]) -> Vec<(i64, f64)> {
    let mut rows: Vec<&serde_json::Value> = rows.iter().collect();
    rows.sort_by_key(|r| (r["seq"].as_u64().unwrap(), r["idx"].as_u64().unwrap()));
    rows.iter().map(|r| (r["ts_ns"].as_i64().unwrap(), num(r, "value"))).collect()
}
