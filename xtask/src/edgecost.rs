//! Benchmark 7: what a reading costs the device at a steady rate.
//!
//! The release `edge-agent` runs as a process with its defaults except the settings under
//! test, forwarding in hub mode over a private mosquitto to a release `cloud-hub` (SQLite
//! store), so batches are acknowledged and leave the outbox as in production. One rumqttc
//! publisher (10 topics, QoS 1, 100 in flight, JSON payloads) sends at a fixed rate, in
//! ticks of 10 ms. After a warm-up, the agent's CPU (utime + stime, `/proc/<pid>/stat`)
//! and bytes written (`write_bytes`, `/proc/<pid>/io`: what reached the block layer on its
//! behalf) are read at the start and end of the measured interval, and every PUBACK's
//! latency from the publish to the acknowledgement is kept. The same is measured, in the
//! same run, for a mosquitto bridge configured for store-and-forward ([`Target::Bridge`]).

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};

use crate::util::{Mosquitto, Proc, free_port, spawn_hub, wait_port};

/// What one run measured over its measured interval.
pub struct CostResult {
    pub readings: u64,
    pub secs: f64,
    /// Agent CPU seconds (user + system).
    pub cpu_secs: f64,
    /// Agent `write_bytes`.
    pub write_bytes: u64,
    /// PUBACK latency, seconds: p50, p99.
    pub p50: f64,
    pub p99: f64,
    /// Store commits (`brume_agent_commits_total`) over the interval (0 for a bridge).
    pub commits: u64,
    /// On-disk bytes per stored reading (see [`stored_per_reading`]); 0 for a bridge.
    pub stored_bytes_per_reading: f64,
}

fn cpu_secs(pid: u32) -> Result<f64> {
    crate::util::cpu_secs(pid).context("reading utime and stime from /proc/<pid>/stat")
}

fn write_bytes(pid: u32) -> Result<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io"))
        .context("reading /proc/<pid>/io (needs the same user or root)")?;
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes: "))
        .and_then(|v| v.trim().parse().ok())
        .context("no write_bytes in /proc/<pid>/io")
}

/// `brume_agent_commits_total` from the agent's `/metrics`.
async fn commits(http: u16) -> Result<u64> {
    let text = reqwest::get(format!("http://127.0.0.1:{http}/metrics")).await?.text().await?;
    text.lines()
        .find_map(|l| l.strip_prefix("brume_agent_commits_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .context("no brume_agent_commits_total in /metrics")
}

/// What a run measures.
pub enum Target<'a> {
    /// The release agent forwarding in hub mode to a release hub over a private
    /// mosquitto, with `store_extra` appended to its `[store]` section.
    Agent { agent: &'a Path, hub: &'a Path, store_extra: &'a str },
    /// A mosquitto bridge configured for store-and-forward, the usual alternative:
    /// persistence on, `autosave_interval 1`, a QoS 1 bridge (`cleansession false`) to a
    /// second mosquitto standing for the cloud. The figures are the first mosquitto's.
    Bridge,
}

/// Keeps a run's processes alive until it is dropped.
struct Setup {
    /// The measured process and its MQTT port.
    pid: u32,
    mqtt: u16,
    /// The agent's HTTP port (commit counter), if the target is the agent.
    http: Option<u16>,
    /// The port of the broker behind a bridge, where delivery is checked.
    cloud: Option<u16>,
    agent: Option<Proc>,
    data: Option<std::path::PathBuf>,
    _keep: Vec<Box<dyn std::any::Any>>,
}

fn setup(target: &Target<'_>) -> Result<Setup> {
    match target {
        Target::Bridge => {
            let cloud = Mosquitto::start()?;
            let cloud_port = cloud.port;
            let edge = Mosquitto::start_with(|dir| {
                format!(
                    "persistence true\npersistence_location {}/\nautosave_interval 1\nmax_queued_messages 0\n\
                     connection cloud\naddress 127.0.0.1:{cloud_port}\ntopic # out 1\ncleansession false\n\
                     bridge_protocol_version mqttv311\n",
                    dir.display()
                )
            })?;
            Ok(Setup {
                pid: edge.pid(),
                mqtt: edge.port,
                http: None,
                cloud: Some(cloud_port),
                agent: None,
                data: None,
                _keep: vec![Box::new(edge), Box::new(cloud)],
            })
        }
        Target::Agent { agent, hub, store_extra } => {
            let mosq = Mosquitto::start()?;
            let dir = tempfile::tempdir()?;
            let (hub, _) = spawn_hub(hub, dir.path(), &dir.path().join("hub"), mosq.port, "")?;
            let (mqtt, http) = (free_port(), free_port());
            let cfg = dir.path().join("agent.toml");
            let data = dir.path().join("agent");
            std::fs::write(
                &cfg,
                format!(
                    "agent_id = \"bench-cost\"\ndata_dir = {data:?}\n\n[store]\n{store_extra}\n\n[forward]\nmode = \"hub\"\nhost = \"127.0.0.1\"\nport = {port}\n\n\
                     [listener]\nlisten = \"127.0.0.1:{mqtt}\"\n\n[http]\nlisten = \"127.0.0.1:{http}\"\n",
                    data = data.display().to_string(),
                    port = mosq.port
                ),
            )?;
            let agent = Proc::spawn(
                "edge-agent",
                agent,
                &["--config".into(), cfg.display().to_string()],
                &dir.path().join("agent.log"),
                &[("RUST_LOG", "warn")],
            )?;
            wait_port("the agent's MQTT listener", mqtt, Duration::from_secs(20))?;
            wait_port("the agent's HTTP API", http, Duration::from_secs(20))?;
            Ok(Setup {
                pid: agent.pid(),
                mqtt,
                http: Some(http),
                cloud: None,
                agent: Some(agent),
                data: Some(data),
                // Dropped in this order, after the agent: hub, broker, then their files.
                _keep: vec![Box::new(hub), Box::new(mosq), Box::new(dir)],
            })
        }
    }
}

/// Counts the messages a subscriber on `port` receives on `sensors/#` (QoS 1).
async fn count_deliveries(port: u16, count: std::sync::Arc<std::sync::atomic::AtomicU64>) -> Result<()> {
    let mut opts = MqttOptions::new("bench-cost-cloud", "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut el) = AsyncClient::new(opts, 100);
    client.subscribe("sensors/#", QoS::AtLeastOnce).await?;
    loop {
        if let Event::Incoming(Packet::Publish(_)) = el.poll().await.context("cloud subscriber connection")? {
            count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// Runs `target` at `rate` readings/s (0: idle, no publisher) for `warmup` + `secs`.
pub fn run(target: &Target<'_>, rate: u32, warmup: Duration, secs: u64) -> Result<CostResult> {
    let mut su = setup(target)?;
    let (pid, mqtt, http) = (su.pid, su.mqtt, su.http);
    let commits_now = |http: Option<u16>| async move {
        match http {
            Some(h) => commits(h).await,
            None => Ok(0),
        }
    };
    let delivered = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (readings, published, latencies, t0, t1) = rt.block_on(async {
        if let Some(port) = su.cloud {
            let d = delivered.clone();
            tokio::spawn(async move {
                if let Err(e) = count_deliveries(port, d).await {
                    eprintln!("  cloud subscriber: {e:#}");
                }
            });
        }
        let mut opts = MqttOptions::new("bench-cost-sensors", "127.0.0.1", mqtt);
        opts.set_inflight(100);
        opts.set_keep_alive(Duration::from_secs(30));
        // Room for a few seconds of readings: what a sensor buffers while the agent adapts.
        let (client, mut el) = AsyncClient::new(opts, 100_000);
        let start = Instant::now();
        let measure_from = start + warmup;
        let end = measure_from + Duration::from_secs(secs);
        let mut t0 = None;
        let mut sent_at: HashMap<u16, Instant> = HashMap::new();
        let mut latencies = Vec::new();
        let mut readings = 0u64;
        let tick = Duration::from_millis(10);
        let mut ticker = tokio::time::interval(tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let (mut due, mut n) = (0.0f64, 0u64);
        loop {
            tokio::select! {
                _ = ticker.tick(), if rate > 0 => {
                    due += f64::from(rate) * tick.as_secs_f64();
                    while due >= 1.0 {
                        due -= 1.0;
                        let payload = format!("{{\"value\":{}.5}}", n % 1000);
                        client.try_publish(format!("sensors/{}", n % 10), QoS::AtLeastOnce, false, payload)
                            .context("the publisher's queue is full: the receiver cannot keep up")?;
                        n += 1;
                    }
                }
                ev = el.poll() => match ev.context("publisher connection")? {
                    Event::Outgoing(Outgoing::Publish(pkid)) => { sent_at.insert(pkid, Instant::now()); }
                    Event::Incoming(Packet::PubAck(a)) => {
                        if let Some(t) = sent_at.remove(&a.pkid) {
                            let now = Instant::now();
                            if t >= measure_from && now < end {
                                latencies.push(now.duration_since(t).as_secs_f64());
                                readings += 1;
                            }
                        }
                    }
                    _ => {}
                },
                _ = tokio::time::sleep_until(measure_from.into()), if t0.is_none() => {
                    t0 = Some((Instant::now(), cpu_secs(pid)?, write_bytes(pid)?, commits_now(http).await?));
                }
                _ = tokio::time::sleep_until(end.into()), if t0.is_some() => break,
            }
        }
        let t1 = (Instant::now(), cpu_secs(pid)?, write_bytes(pid)?, commits_now(http).await?);
        // Behind a bridge, what was published must reach the cloud broker: a bridge
        // that is not connected would look cheap.
        if su.cloud.is_some() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while delivered.load(std::sync::atomic::Ordering::Relaxed) < n && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        anyhow::Ok((readings, n, latencies, t0.context("no start sample")?, t1))
    })?;
    drop(rt);
    if let Some(agent) = su.agent.as_mut() {
        agent.check_alive().context("the agent died during the run")?;
        agent.terminate()?;
    }
    if rate > 0 && (readings as f64) < 0.9 * f64::from(rate) * secs as f64 {
        bail!("only {readings} readings acknowledged in {secs} s at {rate}/s");
    }
    let got = delivered.load(std::sync::atomic::Ordering::Relaxed);
    if su.cloud.is_some() && (got as f64) < 0.99 * published as f64 {
        bail!("the bridge delivered {got} of {published} messages to the cloud broker");
    }
    let stored_bytes_per_reading = match &su.data {
        Some(d) => stored_per_reading(d)?,
        None => 0.0,
    };
    let mut l = latencies;
    l.sort_by(f64::total_cmp);
    let q = |p: f64| if l.is_empty() { 0.0 } else { l[((l.len() - 1) as f64 * p).round() as usize] };
    Ok(CostResult {
        readings,
        secs: t1.0.duration_since(t0.0).as_secs_f64(),
        cpu_secs: t1.1 - t0.1,
        write_bytes: t1.2 - t0.2,
        p50: q(0.5),
        p99: q(0.99),
        commits: t1.3 - t0.3,
        stored_bytes_per_reading,
    })
}

/// Bytes of `agent.db` in use per stored reading, after the agent stopped: the on-disk
/// size of a reading with its share of pages, indexes and other tables. Written once to
/// the WAL and once at checkpoint, twice that is the floor of bytes written per reading.
fn stored_per_reading(data: &Path) -> Result<f64> {
    let conn = rusqlite::Connection::open(edge_agent::store::Store::db_path(data))?;
    let (pages, free, size): (i64, i64, i64) = conn.query_row(
        "SELECT (SELECT page_count FROM pragma_page_count), (SELECT freelist_count FROM pragma_freelist_count), \
         (SELECT page_size FROM pragma_page_size)",
        [],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )?;
    let n: i64 = conn.query_row("SELECT COUNT(*) FROM readings", [], |r| r.get(0))?;
    Ok(if n == 0 { 0.0 } else { ((pages - free) * size) as f64 / n as f64 })
}
