//! Benchmark 2: batched ingest → store → outbox, and the raw SQLite ceiling.
//!
//! Readings come from `edge_agent::ingest::simulator::generate`, generated before the clock
//! starts. Every sample uses a fresh store / database file in a fresh temporary directory
//! (under `std::env::temp_dir()`); opening and closing are not timed.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Result, bail};
use brume_protocol::Reading;
use edge_agent::config::{Config, Durability};
use edge_agent::store::writer::StoreHandle;
use edge_agent::store::{Store, StoreOptions};

/// Readings per `Store::apply` / `StoreHandle::append` call.
pub const GROUP: usize = 1000;
/// Simulated streams (readings interleave over them).
pub const STREAMS: usize = 100;

/// The pre-generated input.
pub struct Input {
    pub readings: Vec<Reading>,
    /// (stream index, ts, blob) of the same readings, for raw SQLite.
    pub raw: Vec<(i64, i64, Vec<u8>)>,
}

impl Input {
    pub fn generate(n: usize) -> Input {
        let readings = edge_agent::ingest::simulator::generate(0, n, STREAMS, edge_agent::now_ns());
        let raw = readings
            .iter()
            .map(|r| {
                let s: i64 = r.stream.trim_start_matches("sim/").parse().unwrap_or(0);
                (s, r.ts_ns, r.fields.0.clone())
            })
            .collect();
        Input { readings, raw }
    }

    /// Mean size of a fields blob, bytes.
    pub fn mean_blob(&self) -> f64 {
        self.raw.iter().map(|r| r.2.len()).sum::<usize>() as f64 / self.raw.len().max(1) as f64
    }
}

fn options(durability: Durability) -> (Config, StoreOptions) {
    let mut cfg = Config { agent_id: "bench".into(), ..Default::default() };
    cfg.store.durability = durability;
    // Tasks that each await every commit are closed-loop writers, which the commit window
    // (by design) gives one commit per window unless they come over MQTT; these rows
    // measure the writer's ceiling, so they commit at once.
    cfg.store.commit_window = std::time::Duration::ZERO;
    let opts = StoreOptions::from_config(&cfg);
    (cfg, opts)
}

/// `Store::apply` with one group of `GROUP` readings per transaction. Readings/s.
pub fn apply_rate(input: &Input, durability: Durability) -> Result<f64> {
    let dir = tempfile::tempdir()?;
    let (_, opts) = options(durability);
    let mut store = Store::open(dir.path(), opts)?;
    let start = Instant::now();
    for g in input.readings.chunks(GROUP) {
        let out = store.apply(&[g], &[], Instant::now())?;
        if let Some(Err(e)) = out.results.first() {
            bail!("store refused a group: {e}");
        }
    }
    let secs = start.elapsed().as_secs_f64();
    check(&store.snapshot(), input.readings.len())?;
    Ok(input.readings.len() as f64 / secs)
}

/// `StoreHandle::append` of `GROUP`-reading groups from `tasks` concurrent tasks (group
/// i goes to task i % tasks; each task awaits each commit). Readings/s.
pub fn handle_rate(input: &Input, durability: Durability, tasks: usize) -> Result<f64> {
    let dir = tempfile::tempdir()?;
    let (cfg, opts) = options(durability);
    let mut shares: Vec<Vec<Vec<Reading>>> = vec![Vec::new(); tasks];
    for (i, g) in input.readings.chunks(GROUP).enumerate() {
        shares[i % tasks].push(g.to_vec());
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let (handle, writer) = StoreHandle::start(
        dir.path().to_path_buf(),
        &cfg.agent_id,
        opts,
        edge_agent::store::writer::WriterOptions::from_config(&cfg.store),
        Arc::new(edge_agent::metrics::Metrics::default()),
    )?;
    let secs = rt.block_on(async {
        let start = Instant::now();
        let mut joins = Vec::new();
        for share in shares {
            let h = handle.clone();
            joins.push(tokio::spawn(async move {
                for g in share {
                    h.append(g).await?;
                }
                anyhow::Ok(())
            }));
        }
        for j in joins {
            j.await??;
        }
        anyhow::Ok(start.elapsed().as_secs_f64())
    })?;
    let snap = handle.snapshot().borrow().clone();
    drop(handle);
    writer.join();
    check(&snap, input.readings.len())?;
    Ok(input.readings.len() as f64 / secs)
}

fn check(snap: &edge_agent::store::StoreSnapshot, n: usize) -> Result<()> {
    if snap.readings != n as u64 {
        bail!("store holds {} readings, expected {n}", snap.readings);
    }
    // Every full batch must have been cut into the outbox.
    if snap.outbox_readings + snap.unbatched != n as u64 || snap.outbox_batches < (n / GROUP) as u64 {
        bail!(
            "outbox holds {} batches / {} readings (+{} unbatched) for {n} readings",
            snap.outbox_batches,
            snap.outbox_readings,
            snap.unbatched
        );
    }
    Ok(())
}

/// Raw SQLite: WAL, `synchronous` as given, prepared INSERT into
/// `t(id INTEGER PRIMARY KEY, stream INTEGER, ts INTEGER, fields BLOB)`, `per_tx` rows per
/// transaction, fresh file. With `indexed`, the table also gets the store's secondary index
/// on (stream, ts). Rows/s.
pub fn raw_rate(input: &Input, per_tx: usize, synchronous: &str, indexed: bool) -> Result<f64> {
    let dir = tempfile::tempdir()?;
    let mut conn = rusqlite::Connection::open(dir.path().join("raw.db"))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", synchronous)?;
    conn.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, stream INTEGER, ts INTEGER, fields BLOB)")?;
    if indexed {
        conn.execute_batch("CREATE INDEX t_by_stream_ts ON t(stream, ts)")?;
    }
    let start = Instant::now();
    for chunk in input.raw.chunks(per_tx) {
        let tx = conn.transaction()?;
        {
            let mut ins = tx.prepare_cached("INSERT INTO t(stream, ts, fields) VALUES (?1, ?2, ?3)")?;
            for (s, ts, blob) in chunk {
                ins.execute(rusqlite::params![s, ts, blob])?;
            }
        }
        tx.commit()?;
    }
    let secs = start.elapsed().as_secs_f64();
    let rows: i64 = conn.query_row("SELECT COUNT(*) FROM t", [], |r| r.get(0))?;
    if rows != input.raw.len() as i64 {
        bail!("raw table holds {rows} rows, expected {}", input.raw.len());
    }
    Ok(input.raw.len() as f64 / secs)
}
