//! Benchmark 5: the hub's stores. Ingest of batches as agents send them (with dedup, in
//! groups of batches per transaction as the ingest task does) into SQLite and into a
//! private PostgreSQL server, the raw PostgreSQL insert ceiling for the same rows, and a
//! dashboard query: 30 days of 1 Hz data aggregated to 500 buckets.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use brume_protocol::{Batch, Field, FieldsBlob, Point, StreamChunk, Value};
use cloud_hub::aggregate::{AggregateQuery, aggregate, step_for};
use cloud_hub::store::HubStore;
use cloud_hub::store::postgres::{PostgresOptions, PostgresStore};
use cloud_hub::store::sqlite::SqliteStore;

#[path = "../../cloud-hub/src/store/postgres/test_server.rs"]
#[allow(dead_code)]
mod test_server;

/// Readings per batch, as the agent's default `forward.batch_max_readings`.
pub const BATCH: usize = 1000;
/// Batches per ingest transaction.
pub const GROUP: usize = 10;
const S: i64 = 1_000_000_000;
/// 2024-01-01T00:00:00Z.
const T0: i64 = 1_704_067_200 * S;

/// `days` of one reading per second on one stream, as batches of one agent.
pub fn batches(days: i64) -> Vec<Batch> {
    make("bench-agent", "plant/line1/temp", days * 86_400)
}

/// `n` full batches of agent `agent`, on the stream `plant/<agent>/temp`.
pub fn batches_for(agent: &str, n: u64) -> Vec<Batch> {
    make(agent, &format!("plant/{agent}/temp"), n as i64 * BATCH as i64)
}

/// `n` readings one second apart from T0 on `stream`, as batches of `agent`.
fn make(agent: &str, stream: &str, n: i64) -> Vec<Batch> {
    (0..n)
        .collect::<Vec<i64>>()
        .chunks(BATCH)
        .enumerate()
        .map(|(i, secs)| Batch {
            agent_id: agent.into(),
            epoch: 1,
            seq: i as u64 + 1,
            created_ms: 0,
            streams: vec![StreamChunk {
                stream: stream.into(),
                points: secs
                    .iter()
                    .map(|&s| Point {
                        ts_ns: T0 + s * S,
                        fields: FieldsBlob::encode(&[Field {
                            name: "value".into(),
                            value: Value::F64(20.0 + 5.0 * (s as f64 / 3600.0).sin()),
                        }])
                        .expect("valid field"),
                    })
                    .collect(),
            }],
            losses: vec![],
            lineage: vec![],
        })
        .collect()
}

/// Ingests `batches` in groups; readings/s.
pub fn ingest_rate(store: &dyn HubStore, batches: &[Batch]) -> Result<f64> {
    let n: usize = batches.iter().map(Batch::reading_count).sum();
    let start = Instant::now();
    for g in batches.chunks(GROUP) {
        store.ingest(g, 0)?;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// Re-ingests every batch (all duplicates, as after lost acks); batches/s.
pub fn duplicate_rate(store: &dyn HubStore, batches: &[Batch]) -> Result<f64> {
    let start = Instant::now();
    for g in batches.chunks(GROUP) {
        store.ingest(g, 0)?;
    }
    Ok(batches.len() as f64 / start.elapsed().as_secs_f64())
}

/// Latencies of `runs` aggregations of the whole range to 500 buckets, and the buckets
/// returned.
pub fn query_latencies(store: &dyn HubStore, days: i64, runs: usize) -> Result<(Vec<Duration>, usize)> {
    let (from, to) = (T0, T0 + days * 86_400 * S);
    let q = AggregateQuery {
        stream: "plant/line1/temp".into(),
        field: "value".into(),
        from,
        to,
        step: step_for(from, to, 500),
    };
    let mut out = Vec::with_capacity(runs);
    let mut buckets = 0;
    for _ in 0..runs {
        let t = Instant::now();
        let r = aggregate(store, &q)?;
        out.push(t.elapsed());
        buckets = r.buckets.len();
        let total: u64 = r.buckets.iter().map(|(_, a)| a.count).sum();
        if total != (days * 86_400) as u64 || !r.from_rollups {
            bail!("aggregate counted {total} readings (rollups: {}), expected {}", r.from_rollups, days * 86_400);
        }
    }
    Ok((out, buckets))
}

pub fn sqlite_store() -> Result<(tempfile::TempDir, SqliteStore)> {
    let dir = tempfile::tempdir()?;
    let store = SqliteStore::open(dir.path())?;
    Ok((dir, store))
}

/// A private PostgreSQL server (initdb in a temporary directory, free port).
pub struct Pg {
    pub server: test_server::TestPostgres,
}

impl Pg {
    pub fn start() -> Pg {
        Pg { server: test_server::TestPostgres::start() }
    }

    /// A fresh database and a hub store on it.
    pub fn store(&self, db: &str) -> Result<PostgresStore> {
        let url = self.server.create_db(db);
        let mut config: tokio_postgres::Config = url.parse()?;
        config.connect_timeout(Duration::from_secs(5));
        Ok(PostgresStore::connect(PostgresOptions { config, pool_size: 4, query_timeout: Duration::from_secs(120), partition_window: Default::default() })?)
    }

    /// The raw ceiling: the same rows (the hub's reading columns) inserted with
    /// `INSERT ... SELECT FROM unnest(...) ON CONFLICT DO NOTHING` into an unpartitioned
    /// table with the dedup key as primary key, `GROUP × BATCH` rows per transaction.
    /// Rows/s.
    pub fn raw_rate(&self, db: &str, batches: &[Batch]) -> Result<f64> {
        let url = self.server.create_db(db);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(async {
            let (mut client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
            tokio::spawn(conn);
            client
                .batch_execute(
                    "CREATE TABLE raw (stream_id int8 NOT NULL, ts_ns int8 NOT NULL, agent_id text NOT NULL,
                         epoch int8 NOT NULL, seq int8 NOT NULL, idx int4 NOT NULL, fields bytea NOT NULL,
                         PRIMARY KEY (agent_id, epoch, seq, idx))",
                )
                .await?;
            let n: usize = batches.iter().map(Batch::reading_count).sum();
            let start = Instant::now();
            for g in batches.chunks(GROUP) {
                let (mut sid, mut ts, mut agent, mut epoch, mut seq, mut idx, mut fields) =
                    (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
                for b in g {
                    for (i, p) in b.streams[0].points.iter().enumerate() {
                        sid.push(1i64);
                        ts.push(p.ts_ns);
                        agent.push(b.agent_id.as_str());
                        epoch.push(b.epoch as i64);
                        seq.push(b.seq as i64);
                        idx.push(i as i32);
                        fields.push(p.fields.0.as_slice());
                    }
                }
                let tx = client.transaction().await?;
                tx.execute(
                    "INSERT INTO raw SELECT * FROM unnest($1::int8[], $2::int8[], $3::text[], $4::int8[], $5::int8[],
                         $6::int4[], $7::bytea[]) ON CONFLICT DO NOTHING",
                    &[&sid, &ts, &agent, &epoch, &seq, &idx, &fields],
                )
                .await?;
                tx.commit().await?;
            }
            let secs = start.elapsed().as_secs_f64();
            let stored: i64 = client.query_one("SELECT count(*) FROM raw", &[]).await?.get(0);
            if stored as usize != n {
                bail!("raw table holds {stored} rows, expected {n}");
            }
            Ok(n as f64 / secs)
        })
        .context("raw PostgreSQL insert")
    }
}
