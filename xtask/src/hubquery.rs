//! Benchmark 6c: the hub's memory under raw-reading queries. A `cloud-hub` release process
//! on its default SQLite store, preloaded with one stream of readings; many HTTP clients
//! at once page through all of it with `GET /api/v1/readings` at the largest page size,
//! following `next`. The hub's resident memory is sampled from `/proc` throughout.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use cloud_hub::store::HubStore;

use crate::util::{free_port, proc_status_bytes, spawn_hub};

/// What one run measured.
pub struct QueryResult {
    /// Readings served, all clients together.
    pub readings: u64,
    /// Response bytes served.
    pub bytes: u64,
    pub secs: f64,
    /// Highest VmRSS sampled (every 50 ms), bytes.
    pub peak_rss: u64,
    /// VmHWM at the end, bytes.
    pub hwm: u64,
    /// RSS before the clients started, bytes.
    pub idle_rss: u64,
}

/// Preloads `batches` batches of 1,000 readings on one stream, starts the hub on them and
/// lets `clients` clients each page through the whole stream.
pub fn run(exe: &Path, batches: u64, clients: usize) -> Result<QueryResult> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    {
        let store = cloud_hub::store::sqlite::SqliteStore::open(&data)?;
        for g in crate::hub::batches_for("query-agent", batches).chunks(crate::hub::GROUP) {
            store.ingest(g, 0)?;
        }
    }
    let total = batches * crate::hub::BATCH as u64;
    // No broker: the HTTP API serves without one. One permit per client, so no query is
    // refused and every client pages at full speed: the worst case for memory.
    let (mut hub, http) =
        spawn_hub(exe, dir.path(), &data, free_port(), &format!("max_concurrent_queries = {clients}"))?;
    let pid = hub.pid();
    let idle_rss = proc_status_bytes(pid, "VmRSS").unwrap_or(0);
    let peak = Arc::new(AtomicU64::new(idle_rss));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, done) = (peak.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                if let Some(v) = proc_status_bytes(pid, "VmRSS") {
                    peak.fetch_max(v, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let base = format!(
        "http://127.0.0.1:{http}/api/v1/readings?stream=plant/query-agent/temp&limit={}",
        cloud_hub::http::MAX_LIMIT
    );
    let start = Instant::now();
    let per_client: Vec<(u64, u64)> = rt.block_on(async {
        let http = reqwest::Client::new();
        let mut tasks = Vec::new();
        for _ in 0..clients {
            let (http, base) = (http.clone(), base.clone());
            tasks.push(tokio::spawn(async move {
                let (mut readings, mut bytes, mut next): (u64, u64, Option<String>) = (0, 0, None);
                loop {
                    let url = match &next {
                        Some(c) => format!("{base}&after={c}"),
                        None => base.clone(),
                    };
                    let resp = http.get(&url).send().await?;
                    if !resp.status().is_success() {
                        bail!("{url}: {}", resp.status());
                    }
                    let body = resp.bytes().await?;
                    bytes += body.len() as u64;
                    let page: serde_json::Value = serde_json::from_slice(&body)?;
                    readings += page["readings"].as_array().map_or(0, |a| a.len() as u64);
                    match page["next"].as_str() {
                        Some(c) => next = Some(c.to_owned()),
                        None => return Ok::<_, anyhow::Error>((readings, bytes)),
                    }
                }
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await??);
        }
        Ok::<_, anyhow::Error>(out)
    })?;
    let secs = start.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    let hwm = proc_status_bytes(pid, "VmHWM").unwrap_or(0);
    hub.check_alive().context("the hub died under the queries")?;
    hub.terminate()?;
    for &(r, _) in &per_client {
        if r != total {
            bail!("a client read {r} readings, expected {total}");
        }
    }
    Ok(QueryResult {
        readings: per_client.iter().map(|c| c.0).sum(),
        bytes: per_client.iter().map(|c| c.1).sum(),
        secs,
        peak_rss: peak.load(Ordering::Relaxed),
        hwm,
        idle_rss,
    })
}
