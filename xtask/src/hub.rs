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
    pub server: brume_test_support::TestPostgres,
}

impl Pg {
    /// Starts the server with PostgreSQL's default durability (fsync on, synchronous
    /// commit), as a deployment runs it: the figures are what an operator gets.
    pub fn start() -> Pg {
        Pg { server: brume_test_support::TestPostgres::start_durable() }
    }

    /// A fresh database and a hub store on it.
    pub fn store(&self, db: &str) -> Result<PostgresStore> {
        let url = self.server.create_db(db);
        let mut config: tokio_postgres::Config = url.parse()?;
        config.connect_timeout(Duration::from_secs(5));
        // The data is from 2024: a window reaching that far back puts it in daily
        // partitions, as live data is.
        let partition_window = cloud_hub::store::postgres::PartitionWindow { days_back: 3660, days_ahead: 3 };
        Ok(PostgresStore::connect(PostgresOptions {
            config,
            pool_size: 4,
            query_timeout: Duration::from_secs(120),
            partition_window,
        })?)
    }

    /// The raw ceiling, by the hub's own method: the same rows streamed with COPY BINARY
    /// into a table of the same shape as the hub's `readings` (same columns, partitioned by
    /// day, partitions created before the clock starts, the same index), `GROUP × BATCH`
    /// rows per transaction, with nothing else: no dedup, statistics or rollups. Rows/s.
    pub fn raw_rate(&self, db: &str, batches: &[Batch]) -> Result<f64> {
        use tokio_postgres::binary_copy::BinaryCopyInWriter;
        use tokio_postgres::types::Type;
        let url = self.server.create_db(db);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(async {
            let (mut client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
            tokio::spawn(conn);
            let mut ddl = String::from(
                "CREATE TABLE raw (stream_id int8 NOT NULL, ts_ns int8 NOT NULL, agent_id text COLLATE \"C\" NOT NULL,
                     epoch int8 NOT NULL, seq int8 NOT NULL, idx int4 NOT NULL, fields bytea NOT NULL)
                 PARTITION BY RANGE (ts_ns);
                 CREATE INDEX raw_by_stream_time ON raw (stream_id, ts_ns, agent_id, epoch, seq, idx);",
            );
            let day = 86_400 * S;
            let (first, last) = batches
                .iter()
                .flat_map(|b| b.streams.iter().flat_map(|c| c.points.iter().map(|p| p.ts_ns)))
                .fold((i64::MAX, i64::MIN), |(lo, hi), t| (lo.min(t), hi.max(t)));
            for d in first.div_euclid(day)..=last.div_euclid(day) {
                ddl.push_str(&format!(
                    "CREATE TABLE raw_{d} PARTITION OF raw FOR VALUES FROM ({}) TO ({});",
                    d * day,
                    (d + 1) * day
                ));
            }
            client.batch_execute(&ddl).await?;
            let n: usize = batches.iter().map(Batch::reading_count).sum();
            let types = [Type::INT8, Type::INT8, Type::TEXT, Type::INT8, Type::INT8, Type::INT4, Type::BYTEA];
            let start = Instant::now();
            for g in batches.chunks(GROUP) {
                let tx = client.transaction().await?;
                let sink = tx
                    .copy_in::<_, bytes::Bytes>(
                        "COPY raw (stream_id, ts_ns, agent_id, epoch, seq, idx, fields) FROM STDIN (FORMAT binary)",
                    )
                    .await?;
                let mut writer = std::pin::pin!(BinaryCopyInWriter::new(sink, &types));
                for b in g {
                    let (agent, epoch, seq) = (b.agent_id.as_str(), b.epoch as i64, b.seq as i64);
                    for (i, p) in b.streams[0].points.iter().enumerate() {
                        let fields: &[u8] = &p.fields.0;
                        writer.as_mut().write(&[&1i64, &p.ts_ns, &agent, &epoch, &seq, &(i as i32), &fields]).await?;
                    }
                }
                writer.finish().await?;
                tx.commit().await?;
            }
            let secs = start.elapsed().as_secs_f64();
            let stored: i64 = client.query_one("SELECT count(*) FROM raw", &[]).await?.get(0);
            if stored as usize != n {
                bail!("raw table holds {stored} rows, expected {n}");
            }
            Ok(n as f64 / secs)
        })
        .context("raw PostgreSQL COPY")
    }
}
