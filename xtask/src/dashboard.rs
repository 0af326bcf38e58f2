//! Benchmark 10: the dashboard's queries on a month of data. A `cloud-hub` release process
//! on its default SQLite store holding 100 streams over 30 days; the requests the web
//! dashboard makes when an operator opens a chart (`cloud-hub/dashboard/app.js`: `niceStep`
//! over a 1,100-pixel chart), timed from the client; then ten live tails (what ten open
//! browsers hold) for a minute while new readings arrive, with the hub's memory and CPU.
//!
//! The dataset gives every query the work of 1 Hz data without storing 259 million raw
//! readings: one reading per minute for the 30 days up to 3 hours ago (the one-minute
//! rollups, which answer every range of 6 hours and more, have the same 43,200 rows per
//! stream as at 1 Hz), and one per second for the last 3 hours (the raw readings that
//! ranges of an hour and less read).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use brume_protocol::{Batch, Field, FieldsBlob, Point, StatusV1, StreamChunk, Value};
use cloud_hub::store::HubStore;

use crate::util::{cpu_secs, free_port, proc_status_bytes, spawn_hub};

/// Streams in the dataset.
pub const STREAMS: usize = 100;
/// Agents the readings are spread over (reading k of a stream comes from agent k % 10).
pub const AGENTS: usize = 10;
const DAYS: i64 = 30;
const RAW_HOURS: i64 = 3;
const S: i64 = 1_000_000_000;
/// Buckets a 1,100-pixel chart asks for (`app.js`: one per two pixels).
const BUCKETS: i64 = 550;
/// Bucket widths the dashboard uses, seconds (`STEPS` in `app.js`).
const STEPS: [i64; 20] =
    [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400, 172800, 604800];
/// Charts opened per range.
const OPENS: usize = 20;
/// Live tails, and how long they watch.
const TAILS: usize = 10;
const WATCH: Duration = Duration::from_secs(60);
/// The line that starts each SSE event of a tail.
const EVENT: &[u8] = b"event: bucket";

/// `niceStep` of `app.js`.
fn nice_step(span_s: i64, min_s: i64) -> i64 {
    let want = (span_s as f64 / BUCKETS as f64).max(min_s as f64);
    STEPS.iter().copied().find(|&s| s as f64 >= want).unwrap_or(((want / 86400.0).ceil() as i64) * 86400)
}

/// One range's timings.
pub struct RangeResult {
    /// `15m`, `1h`, ...
    pub range: &'static str,
    /// Fleet aggregation (by label) rather than one stream.
    pub fleet: bool,
    /// Request wall times, client side, body read, seconds.
    pub secs: Vec<f64>,
    /// Buckets per answer (the same for every stream).
    pub buckets: usize,
    /// Response bytes per answer, largest.
    pub bytes: usize,
    /// `rollups` or `raw` (fleet: always per-agent rollups).
    pub source: String,
}

/// What the run measured.
pub struct DashboardResult {
    /// Readings in the dataset, and how long storing them took.
    pub readings: u64,
    pub load_secs: f64,
    /// `GET /api/v1/streams`, seconds.
    pub list_secs: f64,
    pub ranges: Vec<RangeResult>,
    /// Live tails: events received per tail (min), RSS at start, peak in the first and
    /// last 20 s, at the end, and hub CPU over the watch as a share of one core.
    pub tail_events_min: u64,
    pub rss_start: u64,
    pub rss_peak_first: u64,
    pub rss_peak_last: u64,
    pub rss_end: u64,
    pub cpu_share: f64,
}

fn value(k: i64) -> FieldsBlob {
    let v = 20.0 + 5.0 * (k as f64 / 3600.0).sin() + ((k * 2_654_435_761) % 1000) as f64 / 1000.0;
    FieldsBlob::encode(&[Field { name: "value".into(), value: Value::F64(v) }]).expect("valid fields")
}

/// Builds the dataset in `data`, ending at `now_ns`. Returns the readings stored.
fn load(data: &Path, now_ns: i64) -> Result<u64> {
    let store = cloud_hub::store::sqlite::SqliteStore::open(data)?;
    let raw_from = now_ns - RAW_HOURS * 3600 * S;
    let month_from = now_ns - DAYS * 86_400 * S;
    // Timestamps of every stream: a minute apart, then a second apart.
    let ts: Vec<i64> = (0..)
        .map(|m| month_from + m * 60 * S)
        .take_while(|&t| t < raw_from)
        .chain((0..).map(|s| raw_from + s * S).take_while(|&t| t < now_ns))
        .collect();
    let mut seqs = [0u64; AGENTS];
    let mut total = 0u64;
    // Per agent, batches of 1,000 readings covering all streams in time order.
    let mut group: Vec<Batch> = Vec::new();
    for chunk in ts.chunks(1000 / STREAMS * AGENTS) {
        for (a, seq) in seqs.iter_mut().enumerate() {
            let streams: Vec<StreamChunk> = (0..STREAMS)
                .map(|i| StreamChunk {
                    stream: format!("bench/{i}"),
                    points: chunk
                        .iter()
                        .enumerate()
                        .filter(|(k, _)| k % AGENTS == a)
                        .map(|(_, &t)| Point { ts_ns: t, fields: value(t / S + i as i64 * 977) })
                        .collect(),
                })
                .filter(|c| !c.points.is_empty())
                .collect();
            if streams.is_empty() {
                continue;
            }
            *seq += 1;
            let b = Batch {
                agent_id: format!("agent-{a}"),
                epoch: 1,
                seq: *seq,
                created_ms: 0,
                streams,
                losses: vec![],
                lineage: vec![],
            };
            total += b.reading_count() as u64;
            group.push(b);
            if group.len() == crate::hub::GROUP {
                store.ingest(&group, 0)?;
                group.clear();
            }
        }
    }
    if !group.is_empty() {
        store.ingest(&group, 0)?;
    }
    let now_ms = now_ns / 1_000_000;
    for a in 0..AGENTS {
        store.record_presence(
            &StatusV1 {
                agent_id: format!("agent-{a}"),
                online: true,
                version: "bench".into(),
                started_ms: now_ms,
                sent_ms: now_ms,
                heartbeat_s: 3600,
                store_readings: 0,
                outbox_batches: 0,
                outbox_readings: 0,
                modules: vec![],
                labels: vec![("site".into(), "plant-1".into())],
            },
            &Default::default(),
            now_ms,
        )?;
    }
    Ok(total)
}

fn now_ns() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock after 1970").as_nanos() as i64
}

/// Builds the dataset, starts the hub on it, times the dashboard's requests, then watches
/// ten live tails.
pub fn run(exe: &Path) -> Result<DashboardResult> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let end = now_ns();
    let started = Instant::now();
    let readings = load(&data, end)?;
    let load_secs = started.elapsed().as_secs_f64();
    eprintln!("  dataset: {readings} readings in {load_secs:.0} s");
    // No broker: the API and the tails read the store.
    let (mut hub, http) = spawn_hub(exe, dir.path(), &data, free_port(), "")?;
    let pid = hub.pid();
    let base = format!("http://127.0.0.1:{http}");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let client = reqwest::Client::new();
    let get = |url: String| {
        let client = client.clone();
        async move {
            let t = Instant::now();
            let resp = client.get(&url).send().await?;
            if !resp.status().is_success() {
                bail!("{url}: {}", resp.status());
            }
            let body = resp.bytes().await?;
            Ok::<_, anyhow::Error>((t.elapsed().as_secs_f64(), body))
        }
    };
    let (list_secs, list) = rt.block_on(get(format!("{base}/api/v1/streams")))?;
    let listed: serde_json::Value = serde_json::from_slice(&list)?;
    if listed.as_array().map(Vec::len) != Some(STREAMS) {
        bail!("the hub lists {} streams, expected {STREAMS}", listed.as_array().map_or(0, Vec::len));
    }
    let mut ranges = Vec::new();
    let now = now_ns();
    let mut pick = 7usize;
    for (range, span_s, fleet) in [
        ("15m", 900, false),
        ("1h", 3600, false),
        ("6h", 21_600, false),
        ("24h", 86_400, false),
        ("7d", 604_800, false),
        ("30d", 2_592_000, false),
        ("24h", 86_400, true),
        ("7d", 604_800, true),
        ("30d", 2_592_000, true),
    ] {
        let step = nice_step(span_s, if fleet { 60 } else { 1 });
        let mut r =
            RangeResult { range, fleet, secs: Vec::new(), buckets: 0, bytes: 0, source: "agent rollups".into() };
        for _ in 0..OPENS {
            pick = (pick * 31 + 17) % STREAMS;
            let mut url = format!(
                "{base}/api/v1/{}?stream=bench%2F{pick}&field=value&from={}&to={now}&step={step}s",
                if fleet { "fleet/aggregate" } else { "aggregate" },
                now - span_s * S
            );
            if fleet {
                url.push_str("&label=site%3Aplant-1");
            }
            let (secs, body) = rt.block_on(get(url.clone()))?;
            let v: serde_json::Value = serde_json::from_slice(&body)?;
            let n = v["buckets"].as_array().context("buckets")?.len();
            if n == 0 {
                bail!("{url}: no buckets");
            }
            r.secs.push(secs);
            r.buckets = r.buckets.max(n);
            r.bytes = r.bytes.max(body.len());
            if let Some(s) = v["source"].as_str() {
                r.source = s.to_owned();
            }
        }
        eprintln!(
            "  {}{range:<4} step {step:>6} s: {} buckets from {}, p50 {:.1} ms, max {:.1} ms",
            if fleet { "fleet " } else { "" },
            r.buckets,
            r.source,
            crate::util::Samples(r.secs.clone()).median() * 1e3,
            r.secs.iter().copied().fold(0.0, f64::max) * 1e3
        );
        ranges.push(r);
    }

    // Ten live tails while the bench writes 10 readings/s to each tailed stream (into the
    // same SQLite file: the hub has no broker here, and the tails read the store).
    let rss_start = proc_status_bytes(pid, "VmRSS").unwrap_or(0);
    let cpu_start = cpu_secs(pid).unwrap_or(0.0);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (data, stop) = (data.clone(), stop.clone());
        std::thread::spawn(move || -> Result<()> {
            let store = cloud_hub::store::sqlite::SqliteStore::open(&data)?;
            let mut seq = 1_000_000u64;
            while !stop.load(Ordering::Relaxed) {
                let t = now_ns();
                seq += 1;
                let streams = (0..TAILS)
                    .map(|i| StreamChunk {
                        stream: format!("bench/{i}"),
                        points: (0..10).map(|k| Point { ts_ns: t + k, fields: value(t / S + k) }).collect(),
                    })
                    .collect();
                let b = Batch {
                    agent_id: "agent-live".into(),
                    epoch: 1,
                    seq,
                    created_ms: 0,
                    streams,
                    losses: vec![],
                    lineage: vec![],
                };
                store.ingest(&[b], 0)?;
                std::thread::sleep(Duration::from_secs(1));
            }
            Ok(())
        })
    };
    let peaks = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
    let sampler = {
        let (peaks, stop) = (peaks.clone(), stop.clone());
        std::thread::spawn(move || {
            let t0 = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                if let Some(v) = proc_status_bytes(pid, "VmRSS") {
                    let e = t0.elapsed();
                    if e < Duration::from_secs(20) {
                        peaks[0].fetch_max(v, Ordering::Relaxed);
                    } else if e > WATCH - Duration::from_secs(20) {
                        peaks[1].fetch_max(v, Ordering::Relaxed);
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let events: Vec<u64> = rt.block_on(async {
        let mut tasks = Vec::new();
        for i in 0..TAILS {
            let url = format!("{base}/api/v1/tail?stream=bench%2F{i}&field=value&step=2s");
            let client = client.clone();
            tasks.push(tokio::spawn(async move {
                let mut resp = client.get(&url).send().await?.error_for_status()?;
                let mut n = 0u64;
                let deadline = tokio::time::Instant::now() + WATCH;
                while let Ok(chunk) = tokio::time::timeout_at(deadline, resp.chunk()).await {
                    match chunk? {
                        Some(c) => n += c.windows(EVENT.len()).filter(|w| *w == EVENT).count() as u64,
                        None => bail!("{url}: the tail ended"),
                    }
                }
                Ok::<_, anyhow::Error>(n)
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await??);
        }
        Ok::<_, anyhow::Error>(out)
    })?;
    stop.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    writer.join().map_err(|_| anyhow::anyhow!("the writer thread panicked"))??;
    let cpu_share = (cpu_secs(pid).unwrap_or(0.0) - cpu_start) / WATCH.as_secs_f64();
    let rss_end = proc_status_bytes(pid, "VmRSS").unwrap_or(0);
    hub.check_alive().context("the hub died under the dashboard's queries")?;
    hub.terminate()?;
    Ok(DashboardResult {
        readings,
        load_secs,
        list_secs,
        ranges,
        tail_events_min: events.iter().copied().min().unwrap_or(0),
        rss_start,
        rss_peak_first: peaks[0].load(Ordering::Relaxed),
        rss_peak_last: peaks[1].load(Ordering::Relaxed),
        rss_end,
        cpu_share,
    })
}
