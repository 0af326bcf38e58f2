//! Benchmark 6: one hub process against two, end to end. Simulated agents publish
//! pre-encoded batches over a private mosquitto to `cloud-hub` release processes sharing
//! one subscription group and one private PostgreSQL database, each agent keeping a
//! window of batches in flight and advancing on the hubs' acknowledgements, as the real
//! agent does. CPU time of every process is read from `/proc` to show where the time goes.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use brume_protocol::{AgentMessage, HubMessage, topics};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

use crate::hub::Pg;
use crate::util::{Mosquitto, Proc, free_port, wait_port};

/// Simulated agents.
pub const AGENTS: usize = 20;
/// Batches in flight per agent (the agent's default `forward.window`).
pub const WINDOW: u64 = 16;

pub struct ScaleResult {
    pub readings: u64,
    pub secs: f64,
    /// CPU seconds by component during the run.
    pub cpu: Vec<(String, f64)>,
}

/// `cargo build --release -p cloud-hub`; returns the binary.
pub fn build_hub(root: &Path) -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("building the release cloud-hub binary…");
    let st = std::process::Command::new(cargo)
        .current_dir(root)
        .args(["build", "--release", "-p", "cloud-hub", "--bin", "cloud-hub"])
        .status()
        .context("running cargo build")?;
    if !st.success() {
        bail!("cargo build --release -p cloud-hub failed");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target"));
    Ok(target.join("release").join("cloud-hub"))
}

/// CPU seconds a process has used; 0 for one that is gone (a PostgreSQL backend that
/// exited between listing and reading).
fn cpu_secs(pid: u32) -> f64 {
    crate::util::cpu_secs(pid).unwrap_or(0.0)
}

/// The postmaster and its current backends.
fn postgres_pids(pg: &Pg) -> Vec<u32> {
    let Some(master) = std::fs::read_dir(pg.server.path())
        .into_iter()
        .flatten()
        .flatten()
        .find_map(|e| std::fs::read_to_string(e.path().join("postmaster.pid")).ok())
        .and_then(|s| s.lines().next()?.trim().parse::<u32>().ok())
    else {
        return Vec::new();
    };
    let mut pids = vec![master];
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else { continue };
        let ppid = stat.rsplit_once(')').and_then(|(_, r)| r.split_whitespace().nth(1)?.parse::<u32>().ok());
        if ppid == Some(master) {
            pids.push(pid);
        }
    }
    pids
}

fn self_cpu_secs() -> f64 {
    cpu_secs(std::process::id())
}

/// Runs `hubs` hub processes and the load; returns readings/s and the CPU split.
pub fn run(exe: &Path, pg: &Pg, db: &str, hubs: usize, batches_per_agent: u64) -> Result<ScaleResult> {
    let url = pg.server.create_db(db);
    let mosq = Mosquitto::start()?;
    let dir = tempfile::tempdir()?;
    let mut procs = Vec::new();
    for h in 0..hubs {
        let http = free_port();
        let cfg = dir.path().join(format!("hub{h}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "data_dir = {data:?}\n[mqtt]\nhost = \"127.0.0.1\"\nport = {port}\n[http]\nlisten = \"127.0.0.1:{http}\"\n\
                 [storage]\nbackend = \"postgres\"\n[storage.postgres]\nurl = {url:?}\n",
                data = dir.path().join(format!("data{h}")).display().to_string(),
                port = mosq.port,
            ),
        )?;
        let p = Proc::spawn(
            "cloud-hub",
            exe,
            &["--config".into(), cfg.display().to_string()],
            &dir.path().join(format!("hub{h}.log")),
            &[("RUST_LOG", "warn")],
        )?;
        wait_port("the hub's HTTP API", http, Duration::from_secs(30))?;
        procs.push(p);
    }
    // Batches, encoded before the clock starts.
    let payloads: Vec<Vec<Vec<u8>>> = (0..AGENTS)
        .map(|a| {
            crate::hub::batches_for(&format!("load-{a:02}"), batches_per_agent)
                .into_iter()
                .map(|b| AgentMessage::BatchV2(b).encode())
                .collect()
        })
        .collect();
    let readings = AGENTS as u64 * batches_per_agent * crate::hub::BATCH as u64;

    let cpu_before: Vec<f64> = procs.iter().map(|p| cpu_secs(p.pid())).collect();
    let (pg_before, mosq_before, self_before) =
        (postgres_pids(pg).iter().map(|&p| cpu_secs(p)).sum::<f64>(), cpu_secs(mosq.pid()), self_cpu_secs());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let port = mosq.port;
    let secs = rt.block_on(async move {
        let start = Instant::now();
        let mut tasks = Vec::new();
        for (a, batches) in payloads.into_iter().enumerate() {
            tasks.push(tokio::spawn(agent(port, format!("load-{a:02}"), batches)));
        }
        for t in tasks {
            t.await??;
        }
        anyhow::Ok(start.elapsed().as_secs_f64())
    })?;
    let pg_cpu = postgres_pids(pg).iter().map(|&p| cpu_secs(p)).sum::<f64>() - pg_before;
    let mut cpu: Vec<(String, f64)> = procs
        .iter()
        .zip(&cpu_before)
        .enumerate()
        .map(|(i, (p, b))| (format!("hub {}", i + 1), cpu_secs(p.pid()) - b))
        .collect();
    cpu.push(("PostgreSQL".into(), pg_cpu.max(0.0)));
    cpu.push(("mosquitto".into(), cpu_secs(mosq.pid()) - mosq_before));
    cpu.push(("load generator".into(), self_cpu_secs() - self_before));
    for mut p in procs {
        p.terminate()?;
    }
    Ok(ScaleResult { readings, secs, cpu })
}

/// One simulated agent: publishes its batches with `WINDOW` in flight, re-sends nothing
/// (the hubs do not lose any here), returns when every batch is acknowledged.
async fn agent(port: u16, id: String, batches: Vec<Vec<u8>>) -> Result<()> {
    let mut opts = MqttOptions::new(format!("bench-{id}"), "127.0.0.1", port);
    opts.set_max_packet_size(16 << 20, 16 << 20);
    opts.set_inflight(100);
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut el) = AsyncClient::new(opts, 64);
    client.subscribe(topics::acks(&id), QoS::AtLeastOnce).await?;
    // Wait for the subscription before publishing, so no ack is missed.
    loop {
        if let Event::Incoming(Packet::SubAck(_)) = el.poll().await? {
            break;
        }
    }
    let total = batches.len() as u64;
    let mut pending: BTreeSet<u64> = BTreeSet::new();
    let mut next = 1u64;
    let mut acked = 0u64;
    let deadline = Instant::now() + Duration::from_secs(600);
    while acked < total {
        while next <= total && (pending.len() as u64) < WINDOW {
            client.publish(topics::batches(&id), QoS::AtLeastOnce, false, batches[(next - 1) as usize].clone()).await?;
            pending.insert(next);
            next += 1;
        }
        if Instant::now() > deadline {
            bail!("{id}: {acked} of {total} batches acknowledged after 600 s");
        }
        if let Event::Incoming(Packet::Publish(p)) = el.poll().await? {
            // The benchmark's hubs have no signing key: acks are unsigned.
            let HubMessage::AckV1(ack) = HubMessage::decode(&p.payload)? else {
                bail!("{id}: a signed ack from a hub without signing key");
            };
            for s in ack.seqs {
                if pending.remove(&s) {
                    acked += 1;
                }
            }
        }
    }
    client.disconnect().await?;
    Ok(())
}
