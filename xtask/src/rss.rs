//! Benchmark 3: peak RSS of the release `edge-agent` binary at 1,000 readings/s.
//!
//! The agent runs as a process with `--simulate 1000`, forwarding in hub mode to a private
//! mosquitto with no hub behind it: every batch is sent and never acknowledged, so the
//! outbox only grows and batches are re-sent after `forward.ack_timeout` — the worst case
//! for memory. A rumqttc subscriber on `#` counts what reaches the broker, to show that
//! forwarding really ran. A second run adds the five example WASM modules, bound to the
//! simulated streams.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

use crate::util::{Mosquitto, Proc, free_port, proc_status_bytes, wait_port};

pub struct RssResult {
    /// VmHWM at the end of the run, bytes.
    pub hwm: u64,
    /// VmRSS at the end of the run, bytes.
    pub rss_end: u64,
    /// Largest VmRSS seen by the 1 s sampler, bytes.
    pub rss_max: u64,
    /// mosquitto's VmHWM in the same run, bytes.
    pub mosquitto_hwm: u64,
    /// Readings stored and batches left in the outbox (read from agent.db after the run).
    pub readings: u64,
    pub outbox_batches: u64,
    /// Readings written by modules (a non-null producer).
    pub module_outputs: u64,
    /// PUBLISHes seen on the broker from the agent (batches, including re-sends) and bytes.
    pub broker_msgs: u64,
    pub broker_bytes: u64,
    pub secs: f64,
}

/// `cargo build --release -p edge-agent`; returns the binary's path.
pub fn build_agent(root: &Path) -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("building the release edge-agent binary…");
    let st = std::process::Command::new(cargo)
        .current_dir(root)
        .args(["build", "--release", "-p", "edge-agent", "--bin", "edge-agent"])
        .status()
        .context("running cargo build")?;
    if !st.success() {
        bail!("cargo build --release -p edge-agent failed");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target"));
    let exe = target.join("release").join("edge-agent");
    if !exe.is_file() {
        bail!("{} not found after the build", exe.display());
    }
    Ok(exe)
}

/// Runs the agent for `secs` seconds at `rate` simulated readings/s, with `extra` appended
/// to its config (e.g. `[[modules]]` tables).
pub fn run(exe: &Path, secs: u64, rate: u32, extra: &str) -> Result<RssResult> {
    let mosq = Mosquitto::start()?;
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let (mqtt, http) = (free_port(), free_port());
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "agent_id = \"bench-rss\"\ndata_dir = {data:?}\n\n[forward]\nmode = \"hub\"\nhost = \"127.0.0.1\"\nport = {port}\n\n\
             [listener]\nlisten = \"127.0.0.1:{mqtt}\"\n\n[http]\nlisten = \"127.0.0.1:{http}\"\n\n{extra}\n",
            data = data.display().to_string(),
            port = mosq.port
        ),
    )?;

    // Count what the agent publishes to the broker.
    let stop = Arc::new(AtomicBool::new(false));
    let msgs = Arc::new(AtomicU64::new(0));
    let bytes = Arc::new(AtomicU64::new(0));
    let sub = {
        let (stop, msgs, bytes, port) = (stop.clone(), msgs.clone(), bytes.clone(), mosq.port);
        std::thread::spawn(move || -> Result<()> {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(async move {
                let mut opts = MqttOptions::new("bench-rss-counter", "127.0.0.1", port);
                opts.set_max_packet_size(16 << 20, 16 << 20);
                let (client, mut el) = AsyncClient::new(opts, 10);
                client.subscribe("#", QoS::AtMostOnce).await?;
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(ev) = tokio::time::timeout(Duration::from_millis(200), el.poll()).await {
                        match ev {
                            Ok(Event::Incoming(Packet::Publish(p))) if p.topic.contains("bench-rss") => {
                                msgs.fetch_add(1, Ordering::Relaxed);
                                bytes.fetch_add(p.payload.len() as u64, Ordering::Relaxed);
                            }
                            Ok(_) => {}
                            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                        }
                    }
                }
                anyhow::Ok(())
            })
        })
    };

    let mut agent = Proc::spawn(
        "edge-agent",
        exe,
        &["--config".into(), cfg.display().to_string(), "--simulate".into(), rate.to_string()],
        &dir.path().join("agent.log"),
        &[("RUST_LOG", "warn")],
    )?;
    wait_port("the agent's MQTT listener", mqtt, Duration::from_secs(20))?;
    let pid = agent.pid();
    let start = Instant::now();
    let mut rss_max = 0;
    while start.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_secs(1).min(Duration::from_secs(secs).saturating_sub(start.elapsed())));
        agent.check_alive().with_context(|| log_tail(&dir.path().join("agent.log")))?;
        rss_max = rss_max.max(proc_status_bytes(pid, "VmRSS").unwrap_or(0));
    }
    let hwm = proc_status_bytes(pid, "VmHWM").context("reading VmHWM")?;
    let rss_end = proc_status_bytes(pid, "VmRSS").context("reading VmRSS")?;
    let mosquitto_hwm = proc_status_bytes(mosq.pid(), "VmHWM").unwrap_or(0);
    let elapsed = start.elapsed().as_secs_f64();
    agent.terminate()?;
    stop.store(true, Ordering::Relaxed);
    let _ = sub.join();

    let conn = rusqlite::Connection::open(edge_agent::store::Store::db_path(&data))?;
    let readings: i64 = conn.query_row("SELECT COUNT(*) FROM readings", [], |r| r.get(0))?;
    let outbox: i64 = conn.query_row("SELECT COUNT(*) FROM outbox WHERE acked = 0", [], |r| r.get(0))?;
    let module_outputs: i64 =
        conn.query_row("SELECT COUNT(*) FROM readings WHERE producer IS NOT NULL", [], |r| r.get(0))?;
    Ok(RssResult {
        hwm,
        rss_end,
        rss_max: rss_max.max(rss_end),
        mosquitto_hwm,
        readings: readings as u64,
        outbox_batches: outbox as u64,
        module_outputs: module_outputs as u64,
        broker_msgs: msgs.load(Ordering::Relaxed),
        broker_bytes: bytes.load(Ordering::Relaxed),
        secs: elapsed,
    })
}

fn log_tail(p: &Path) -> String {
    let s = std::fs::read_to_string(p).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    format!("agent log:\n{}", lines[lines.len().saturating_sub(20)..].join("\n"))
}

/// `[[modules]]` tables for the five example modules (built in `target/modules/`), each
/// reading every simulated stream.
pub fn five_modules(root: &Path) -> String {
    [
        ("threshold", "limit = 25.0"),
        ("deadband", "band = 0.5"),
        ("downsample", "window_s = 10"),
        ("zscore", "z = 3.0, window_s = 60"),
        ("unit-convert", "factor = 1.8, offset = 32.0"),
    ]
    .iter()
    .map(|(name, config)| {
        format!(
            "[[modules]]\npath = {:?}\ninputs = [\"sim/#\"]\nconfig = {{ {config} }}\nstart_at = \"earliest\"\n",
            root.join("target/modules").join(format!("{name}.wasm")).display().to_string()
        )
    })
    .collect::<Vec<_>>()
    .join("\n")
}
