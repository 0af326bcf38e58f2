//! Benchmark 7: what a reading costs the device at a steady rate.
//!
//! The release `edge-agent` runs as a process with its defaults except the settings under
//! test, forwarding in hub mode over a private mosquitto to a release `cloud-hub` (SQLite
//! store), so batches are acknowledged and leave the outbox as in production. One rumqttc
//! publisher (10 topics, QoS 1, 100 in flight, JSON payloads) sends at a fixed rate, in
//! ticks of 10 ms. After a warm-up, the agent's CPU (utime + stime, `/proc/<pid>/stat`)
//! and bytes written (`write_bytes`, `/proc/<pid>/io`: what reached the block layer on its
//! behalf) are read at the start and end of the measured interval, and every PUBACK's
//! latency from the publish to the acknowledgement is kept.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};

use crate::util::{Mosquitto, Proc, free_port, wait_port};

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
    /// Store commits (`brume_agent_commits_total`) over the interval.
    pub commits: u64,
}

fn cpu_secs(pid: u32) -> Result<f64> {
    crate::util::cpu_secs(pid).context("reading utime and stime from /proc/<pid>/stat")
}

fn write_bytes(pid: u32) -> Result<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).context("reading /proc/<pid>/io (needs the same user or root)")?;
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

/// Runs the agent at `rate` readings/s (0: idle, no publisher) for `warmup` + `secs`,
/// with `store_extra` appended to its `[store]` section.
pub fn run(agent_exe: &Path, hub_exe: &Path, rate: u32, warmup: Duration, secs: u64, store_extra: &str) -> Result<CostResult> {
    let mosq = Mosquitto::start()?;
    let dir = tempfile::tempdir()?;
    let hub_http = free_port();
    let hub_cfg = dir.path().join("hub.toml");
    std::fs::write(
        &hub_cfg,
        format!(
            "data_dir = {:?}\n[mqtt]\nhost = \"127.0.0.1\"\nport = {}\n[http]\nlisten = \"127.0.0.1:{hub_http}\"\n",
            dir.path().join("hub").display().to_string(),
            mosq.port
        ),
    )?;
    let _hub = Proc::spawn("cloud-hub", hub_exe, &["--config".into(), hub_cfg.display().to_string()], &dir.path().join("hub.log"), &[
        ("RUST_LOG", "warn"),
    ])?;
    wait_port("the hub's HTTP API", hub_http, Duration::from_secs(30))?;

    let (mqtt, http) = (free_port(), free_port());
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "agent_id = \"bench-cost\"\ndata_dir = {data:?}\n\n[store]\n{store_extra}\n\n[forward]\nmode = \"hub\"\nhost = \"127.0.0.1\"\nport = {port}\n\n\
             [listener]\nlisten = \"127.0.0.1:{mqtt}\"\n\n[http]\nlisten = \"127.0.0.1:{http}\"\n",
            data = dir.path().join("agent").display().to_string(),
            port = mosq.port
        ),
    )?;
    let mut agent = Proc::spawn("edge-agent", agent_exe, &["--config".into(), cfg.display().to_string()], &dir.path().join("agent.log"), &[
        ("RUST_LOG", "warn"),
    ])?;
    wait_port("the agent's MQTT listener", mqtt, Duration::from_secs(20))?;
    wait_port("the agent's HTTP API", http, Duration::from_secs(20))?;
    let pid = agent.pid();

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (readings, latencies, t0, t1) = rt.block_on(async {
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
                            .context("the publisher's queue is full: the agent cannot keep up")?;
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
                    t0 = Some((Instant::now(), cpu_secs(pid)?, write_bytes(pid)?, commits(http).await?));
                }
                _ = tokio::time::sleep_until(end.into()), if t0.is_some() => break,
            }
        }
        let t1 = (Instant::now(), cpu_secs(pid)?, write_bytes(pid)?, commits(http).await?);
        anyhow::Ok((readings, latencies, t0.context("no start sample")?, t1))
    })?;
    agent.check_alive().context("the agent died during the run")?;
    agent.terminate()?;
    if rate > 0 && (readings as f64) < 0.9 * f64::from(rate) * secs as f64 {
        bail!("only {readings} readings acknowledged in {secs} s at {rate}/s");
    }
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
    })
}
