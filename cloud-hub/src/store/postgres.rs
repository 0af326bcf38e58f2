//! [`HubStore`] on PostgreSQL, shared by any number of hub instances.
//!
//! Same semantics as [`super::sqlite::SqliteStore`] (the shared test suite checks both);
//! what differs is the schema, built for time series at scale and for several writers.
//!
//! # Schema (migrations in [`MIGRATIONS`], recorded in `schema_migrations`)
//!
//! * `batches(agent_id, epoch, seq, readings, created_ms, received_ms)`, primary key
//!   `(agent_id, epoch, seq)`: the dedup key. Inserted with `ON CONFLICT DO NOTHING
//!   RETURNING`, in the same transaction as the batch's readings, so "row present" means
//!   "readings present". Never deleted by retention, so a re-sent old batch stays a
//!   duplicate instead of resurrecting dropped data.
//! * `streams(id, name UNIQUE)`: stream ids.
//! * `readings(stream_id, ts_ns, agent_id, epoch, seq, idx, fields)`, **partitioned by
//!   `RANGE (ts_ns)`, one partition per UTC day** (`readings_pYYYYMMDD`) for the days of the
//!   [`PartitionWindow`] around today, created on demand before the rows that need them
//!   are inserted, and a DEFAULT partition `readings_default` (v6) for every other day, so
//!   the number of tables is bounded whatever timestamps agents send. `fields` is the agent's `FieldsBlob`
//!   (`bytea`), byte for byte. The index `(stream_id, ts_ns, agent_id, epoch, seq, idx)`
//!   exists on every partition and is exactly the API's sort order: a time-range query
//!   touches only the partitions of its range (pruning) and reads each through an
//!   index range scan, merged in order.
//! * `reading_partitions(day, name)`: the partitions the hub created, so retention and
//!   the partition cache never parse `pg_class`.
//! * `stream_days(stream_id, day, readings, first_ts_ns, last_ts_ns)`: per-stream, per-day
//!   statistics maintained in the ingest transaction. Listing streams sums these (streams
//!   × days rows, never `readings`), and retention deletes a day's rows together with its
//!   partition, so the listing stays exact after old data is dropped.
//! * `losses(agent_id, epoch, stream, reason, total)`: the maximum cumulative total seen.
//! * `lineage`, `rollups`, `presence` (v2–v4) as in SQLite.
//! * `agent_rollups(stream_id, field, minute, agent_id, count, sum, min, max)` (v9): as in
//!   SQLite, for fleet-level queries; retention deletes them with the readings' days.
//! * `agent_streams(agent_id, stream_id, readings, first_ts_ns, last_ts_ns)` (v11): as in
//!   SQLite.
//! * Schema `brume_api` (v10): views for SQL readers outside the hub (Grafana,
//!   `integrations/grafana/`). They are a contract: later migrations keep their names and
//!   columns (adding columns at the end at most), whatever happens to the tables beneath.
//! * `quarantine(id, agent_id, epoch, seq, topic, reason, error, payload, ...)` (v5):
//!   batches acknowledged without being stored, with their raw bytes (`crate::ingest`).
//! * `module_registry`, `deployments`, `deployment_agents`, `desired`, `reports` (v7): the
//!   control plane, as in SQLite (`postgres/fleet.rs`).
//!
//! Text columns that the API sorts by use `COLLATE "C"` (byte order), the order SQLite
//! uses, whatever locale the database was created with. Epochs are stored with the sign
//! bit flipped ([`super::epoch_to_sql`]), as in SQLite.
//!
//! # Retention
//!
//! [`PostgresStore::drop_partitions_before`] drops whole days: `DROP TABLE` on a
//! partition is instant and leaves no dead tuples, unlike `DELETE`. Call it from a timer
//! or cron; readings that arrive later for a dropped day recreate its partition.
//!
//! # Concurrency
//!
//! Several hubs write at once. Dedup needs no lock: the primary key on `batches` makes a
//! concurrent insert of the same batch wait for the first transaction and then do
//! nothing. Rows are inserted in key order so that two transactions touching the same
//! keys lock them in the same order and cannot deadlock. DDL (migrations, partition
//! creation and dropping) is serialised between hubs with transaction-scoped advisory
//! locks, because `CREATE TABLE IF NOT EXISTS` is not safe against a concurrent create.
//!
//! # Why a dedicated runtime behind a synchronous trait
//!
//! [`HubStore`] is synchronous: callers run it on blocking threads, which suits SQLite.
//! Rather than making the trait async (boxed futures for `dyn HubStore`, and SQLite
//! would then need its own `spawn_blocking` inside), this store owns a small tokio
//! runtime that drives its connections, and each method blocks the calling thread on
//! [`tokio::runtime::Handle::block_on`]. The trait, its callers and SQLite stay as they
//! are, and the connections never depend on which runtime (if any) the caller has. The
//! cost is one blocked thread per in-flight call, which the blocking pool is for.
//! Methods must therefore not be called from inside an async task.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use brume_protocol::{AgentStatus, Batch, FieldsBlob, StatusExtV2, StatusV1};

mod fleet;

use super::rollup::{AgentBucket, AgentRollupQuery, Agg, RollupDeltas};
use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_postgres::CopyInSink;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::Type;
use tokio_postgres::{Client, IsolationLevel, NoTls, Transaction};

use super::{
    AgentSummary, BatchOutcome, HubStore, LineageRange, LossSummary, MAX_QUARANTINE_PAGE, ModuleSummary, NewQuarantine,
    PresenceRecord, QUARANTINE_COLUMNS, QuarantinedBatch, ReadingsPage, ReadingsQuery, StoreError, StoredReading,
    StreamSummary, attach_lineage, decode_presence, epoch_from_sql, epoch_to_sql, lineage_ranges, loss_reason_from_str,
    module_ref, quarantine_entry, storable_text,
};

/// One UTC day in nanoseconds: the partition width.
pub const DAY_NS: i64 = 86_400 * 1_000_000_000;

/// Advisory lock key serialising migrations between hubs ("brume" + 1).
const MIGRATION_LOCK: i64 = 0x6272_756d_6501;
/// Advisory lock key serialising partition creation and dropping between hubs.
const PARTITION_LOCK: i64 = 0x6272_756d_6502;

/// Versioned migrations, applied in order, each in the migration transaction. Never edit
/// a released entry: add a new one.
pub const MIGRATIONS: &[(i32, &str)] = &[
    (1, SCHEMA_V1),
    (2, SCHEMA_V2),
    (3, SCHEMA_V3),
    (4, SCHEMA_V4),
    (5, SCHEMA_V5),
    (6, SCHEMA_V6),
    (7, fleet::SCHEMA_V7),
    (8, fleet::SCHEMA_V8),
    (9, SCHEMA_V9),
    (10, SCHEMA_V10),
    (11, SCHEMA_V11),
];

/// Newest schema version this build knows.
pub const SCHEMA_VERSION: i32 = MIGRATIONS[MIGRATIONS.len() - 1].0;

const SCHEMA_V1: &str = r#"
CREATE TABLE batches (
    agent_id    text COLLATE "C" NOT NULL,
    epoch       int8 NOT NULL,
    seq         int8 NOT NULL,
    readings    int8 NOT NULL,
    created_ms  int8 NOT NULL,
    received_ms int8 NOT NULL,
    PRIMARY KEY (agent_id, epoch, seq)
);
CREATE TABLE streams (
    id   int8 GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name text COLLATE "C" NOT NULL UNIQUE
);
CREATE TABLE stream_days (
    stream_id   int8 NOT NULL REFERENCES streams (id),
    day         int4 NOT NULL,
    readings    int8 NOT NULL,
    first_ts_ns int8 NOT NULL,
    last_ts_ns  int8 NOT NULL,
    PRIMARY KEY (stream_id, day)
);
-- No foreign key to streams: it would cost a lookup per row on the hot path, and
-- stream ids are only ever created, in the same transaction as their first readings.
CREATE TABLE readings (
    stream_id int8 NOT NULL,
    ts_ns     int8 NOT NULL,
    agent_id  text COLLATE "C" NOT NULL,
    epoch     int8 NOT NULL,
    seq       int8 NOT NULL,
    idx       int4 NOT NULL,
    fields    bytea NOT NULL
) PARTITION BY RANGE (ts_ns);
CREATE INDEX readings_by_stream_time ON readings (stream_id, ts_ns, agent_id, epoch, seq, idx);
CREATE TABLE reading_partitions (
    day        int4 PRIMARY KEY,
    name       text NOT NULL UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE losses (
    agent_id text COLLATE "C" NOT NULL,
    epoch    int8 NOT NULL,
    stream   text COLLATE "C" NOT NULL,
    reason   text COLLATE "C" NOT NULL,
    total    int8 NOT NULL,
    PRIMARY KEY (agent_id, epoch, stream, reason)
);
"#;

/// Lineage: which module build computed which readings of a batch (chunks without an
/// entry were ingested as is). One row per computed chunk, not per reading.
const SCHEMA_V2: &str = r#"
CREATE TABLE lineage (
    agent_id  text COLLATE "C" NOT NULL,
    epoch     int8 NOT NULL,
    seq       int8 NOT NULL,
    first_idx int4 NOT NULL,
    last_idx  int4 NOT NULL,
    module    text COLLATE "C" NOT NULL,
    version   text COLLATE "C" NOT NULL,
    sha256    bytea NOT NULL,
    PRIMARY KEY (agent_id, epoch, seq, first_idx)
);
"#;

/// One-minute rollups of numeric fields (see `super::rollup`). Kept when retention
/// drops the raw readings' days: a year of minutes per field is small.
const SCHEMA_V3: &str = r#"
CREATE TABLE rollups (
    stream_id  int8 NOT NULL REFERENCES streams (id),
    field      text COLLATE "C" NOT NULL,
    minute     int8 NOT NULL,
    count      int8 NOT NULL,
    sum        float8 NOT NULL,
    min        float8 NOT NULL,
    max        float8 NOT NULL,
    last_ts_ns int8 NOT NULL,
    last       float8 NOT NULL,
    PRIMARY KEY (stream_id, field, minute)
);
"#;

/// One-minute rollups per agent, for fleet-level aggregation (see `super::rollup`).
/// Unlike `rollups` they grow with the fleet, so retention deletes them with the days of
/// readings it drops.
const SCHEMA_V9: &str = r#"
CREATE TABLE agent_rollups (
    stream_id  int8 NOT NULL REFERENCES streams (id),
    field      text COLLATE "C" NOT NULL,
    minute     int8 NOT NULL,
    agent_id   text COLLATE "C" NOT NULL,
    count      int8 NOT NULL,
    sum        float8 NOT NULL,
    min        float8 NOT NULL,
    max        float8 NOT NULL,
    PRIMARY KEY (stream_id, field, minute, agent_id)
);
"#;

/// Views for SQL readers outside the hub: the schema's contract (see the module docs and
/// `integrations/grafana/README.md`). Times are `timestamptz` for Grafana, and each
/// time-keyed view also has its key in ns (`minute_ns`), which a `WHERE` can compare
/// with the primary key's `minute` so PostgreSQL reads an index range, not every row.
/// Stored epochs and sequence numbers with the sign bit flipped are flipped back.
const SCHEMA_V10: &str = r#"
CREATE SCHEMA brume_api;
CREATE VIEW brume_api.rollups_1m AS
    SELECT s.name AS stream, r.field, r.minute AS minute_ns, to_timestamp(r.minute / 1e9) AS time,
           r.count, r.sum, r.min, r.max, r.sum / r.count AS mean, r.last
    FROM rollups r JOIN streams s ON s.id = r.stream_id;
COMMENT ON VIEW brume_api.rollups_1m IS
    'Brume contract: one-minute count/sum/min/max/mean/last of each numeric field of each stream, all agents together';
CREATE VIEW brume_api.agent_rollups_1m AS
    SELECT s.name AS stream, r.field, r.agent_id, r.minute AS minute_ns, to_timestamp(r.minute / 1e9) AS time,
           r.count, r.sum, r.min, r.max, r.sum / r.count AS mean
    FROM agent_rollups r JOIN streams s ON s.id = r.stream_id;
COMMENT ON VIEW brume_api.agent_rollups_1m IS
    'Brume contract: one-minute count/sum/min/max/mean per agent; kept as long as the raw readings ([retention] keep)';
CREATE VIEW brume_api.streams AS
    SELECT s.name AS stream, coalesce(sum(d.readings), 0)::int8 AS readings,
           to_timestamp(min(d.first_ts_ns) / 1e9) AS first_time, to_timestamp(max(d.last_ts_ns) / 1e9) AS last_time
    FROM streams s LEFT JOIN stream_days d ON d.stream_id = s.id
    GROUP BY s.name;
COMMENT ON VIEW brume_api.streams IS 'Brume contract: every stream with its stored readings and time span';
CREATE VIEW brume_api.batches AS
    SELECT agent_id, (epoch # (-9223372036854775807 - 1)) AS epoch, seq, readings,
           to_timestamp(created_ms / 1e3) AS created_time, to_timestamp(received_ms / 1e3) AS received_time
    FROM batches;
COMMENT ON VIEW brume_api.batches IS
    'Brume contract: every stored batch (epoch as a signed 64-bit number: the agent''s u64 reinterpreted)';
CREATE VIEW brume_api.losses AS
    SELECT agent_id, stream, reason, sum(total)::int8 AS total FROM losses GROUP BY agent_id, stream, reason;
COMMENT ON VIEW brume_api.losses IS
    'Brume contract: readings each agent reported lost, by stream and reason, over all its store epochs';
CREATE VIEW brume_api.quarantine AS
    SELECT id, agent_id, (seq # (-9223372036854775807 - 1)) AS seq, topic, reason, error,
           length(payload) AS bytes, to_timestamp(first_received_ms / 1e3) AS first_received,
           to_timestamp(last_received_ms / 1e3) AS last_received, deliveries
    FROM quarantine;
COMMENT ON VIEW brume_api.quarantine IS
    'Brume contract: batches acknowledged without being stored (GET /api/v1/quarantine), without their payloads';
"#;

/// Which streams each agent sent (see `HubStore::agent_streams`), counted from the
/// readings already stored.
const SCHEMA_V11: &str = r#"
CREATE TABLE agent_streams (
    agent_id    text COLLATE "C" NOT NULL,
    stream_id   int8 NOT NULL REFERENCES streams (id),
    readings    int8 NOT NULL,
    first_ts_ns int8 NOT NULL,
    last_ts_ns  int8 NOT NULL,
    PRIMARY KEY (agent_id, stream_id)
);
INSERT INTO agent_streams (agent_id, stream_id, readings, first_ts_ns, last_ts_ns)
    SELECT agent_id, stream_id, count(*), min(ts_ns), max(ts_ns) FROM readings GROUP BY agent_id, stream_id;
"#;

/// Agents' latest presence messages.
const SCHEMA_V4: &str = r#"
CREATE TABLE presence (
    agent_id    text COLLATE "C" PRIMARY KEY,
    received_ms int8 NOT NULL,
    status      bytea NOT NULL
);
"#;

/// Quarantined batches: raw payloads the hub acknowledged without storing (see
/// `crate::ingest`). Epoch and seq with the sign bit flipped, like `batches.epoch`.
const SCHEMA_V5: &str = r#"
CREATE TABLE quarantine (
    id                int8 GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    agent_id          text COLLATE "C" NOT NULL,
    epoch             int8 NOT NULL,
    seq               int8 NOT NULL,
    topic             text NOT NULL,
    reason            text NOT NULL,
    error             text NOT NULL,
    payload           bytea NOT NULL,
    first_received_ms int8 NOT NULL,
    last_received_ms  int8 NOT NULL,
    deliveries        int8 NOT NULL DEFAULT 1,
    UNIQUE (agent_id, epoch, seq)
);
"#;

/// A DEFAULT partition for readings outside the window of daily partitions (see
/// [`PartitionWindow`]), with an index on `ts_ns` so that moving a day out of it and
/// retention touch only that day's rows.
const SCHEMA_V6: &str = r#"
CREATE TABLE readings_default PARTITION OF readings DEFAULT;
CREATE INDEX readings_default_by_time ON readings_default (ts_ns);
"#;

/// Merges rollup deltas (one row per key per statement) into `rollups`; `SET`
/// expressions read the old row, so `last` is compared before `last_ts_ns` changes.
const UPSERT_ROLLUPS: &str = "
INSERT INTO rollups (stream_id, field, minute, count, sum, min, max, last_ts_ns, last)
SELECT * FROM unnest($1::int8[], $2::text[], $3::int8[], $4::int8[], $5::float8[], $6::float8[],
                     $7::float8[], $8::int8[], $9::float8[])
ON CONFLICT (stream_id, field, minute) DO UPDATE SET
    count = rollups.count + excluded.count,
    sum = rollups.sum + excluded.sum,
    min = least(rollups.min, excluded.min),
    max = greatest(rollups.max, excluded.max),
    last = CASE WHEN excluded.last_ts_ns > rollups.last_ts_ns
                  OR (excluded.last_ts_ns = rollups.last_ts_ns AND excluded.last > rollups.last)
                THEN excluded.last ELSE rollups.last END,
    last_ts_ns = greatest(rollups.last_ts_ns, excluded.last_ts_ns)";

/// Merges per-agent rollup deltas (one row per key per statement) into `agent_rollups`.
const UPSERT_AGENT_ROLLUPS: &str = "
INSERT INTO agent_rollups (stream_id, field, minute, agent_id, count, sum, min, max)
SELECT * FROM unnest($1::int8[], $2::text[], $3::int8[], $4::text[], $5::int8[], $6::float8[],
                     $7::float8[], $8::float8[])
ON CONFLICT (stream_id, field, minute, agent_id) DO UPDATE SET
    count = agent_rollups.count + excluded.count,
    sum = agent_rollups.sum + excluded.sum,
    min = least(agent_rollups.min, excluded.min),
    max = greatest(agent_rollups.max, excluded.max)";

/// Writes rollup deltas in key order (so concurrent hubs lock rows in the same order).
async fn write_rollups(tx: &Transaction<'_>, deltas: RollupDeltas) -> Result<(), StoreError> {
    // Key order here is (stream, agent, field, minute); rows are sent in that order,
    // which is a consistent order across hubs, all that deadlock freedom needs.
    let rows: Vec<_> = deltas.agents.into_iter().collect();
    for part in rows.chunks(ROWS_PER_STATEMENT) {
        let sid: Vec<i64> = part.iter().map(|((s, ..), _)| *s).collect();
        let agent: Vec<&str> = part.iter().map(|((_, a, ..), _)| a.as_str()).collect();
        let field: Vec<&str> = part.iter().map(|((_, _, f, _), _)| f.as_str()).collect();
        let minute: Vec<i64> = part.iter().map(|((.., m), _)| *m).collect();
        let count: Vec<i64> = part.iter().map(|(_, a)| a.count as i64).collect();
        let sum: Vec<f64> = part.iter().map(|(_, a)| a.sum).collect();
        let min: Vec<f64> = part.iter().map(|(_, a)| a.min).collect();
        let max: Vec<f64> = part.iter().map(|(_, a)| a.max).collect();
        tx.execute(UPSERT_AGENT_ROLLUPS, &[&sid, &field, &minute, &agent, &count, &sum, &min, &max])
            .await
            .map_err(pg("updating agent rollups"))?;
    }
    let rows: Vec<_> = deltas.streams.into_iter().collect();
    for part in rows.chunks(ROWS_PER_STATEMENT) {
        let sid: Vec<i64> = part.iter().map(|((s, _, _), _)| *s).collect();
        let field: Vec<&str> = part.iter().map(|((_, f, _), _)| f.as_str()).collect();
        let minute: Vec<i64> = part.iter().map(|((_, _, m), _)| *m).collect();
        let count: Vec<i64> = part.iter().map(|(_, a)| a.count as i64).collect();
        let sum: Vec<f64> = part.iter().map(|(_, a)| a.sum).collect();
        let min: Vec<f64> = part.iter().map(|(_, a)| a.min).collect();
        let max: Vec<f64> = part.iter().map(|(_, a)| a.max).collect();
        let last_ts: Vec<i64> = part.iter().map(|(_, a)| a.last_ts_ns).collect();
        let last: Vec<f64> = part.iter().map(|(_, a)| a.last).collect();
        tx.execute(UPSERT_ROLLUPS, &[&sid, &field, &minute, &count, &sum, &min, &max, &last_ts, &last])
            .await
            .map_err(pg("updating rollups"))?;
    }
    Ok(())
}

/// Which days get a daily partition of their own: `days_back` days before today (UTC,
/// hub clock) through `days_ahead` days after. Readings of other days go to the DEFAULT
/// partition `readings_default`, so the number of tables is bounded (`days_back +
/// days_ahead + 1`, plus whatever days retention has not dropped yet) whatever timestamps
/// agents send: one batch spread over 2000..2200 adds rows, not 73,000 tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionWindow {
    /// Days before today with their own partition.
    pub days_back: u32,
    /// Days after today with their own partition.
    pub days_ahead: u32,
}

impl Default for PartitionWindow {
    fn default() -> Self {
        PartitionWindow { days_back: 31, days_ahead: 3 }
    }
}

impl PartitionWindow {
    /// Whether `day` gets its own partition when today is `today`.
    pub fn contains(&self, today: i32, day: i32) -> bool {
        let day = i64::from(day);
        let today = i64::from(today);
        (today - i64::from(self.days_back)..=today + i64::from(self.days_ahead)).contains(&day)
    }
}

/// How to reach the database and how many connections to use.
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    /// Parsed connection settings (host, port, user, database, password...).
    pub config: tokio_postgres::Config,
    /// Most connections open at once. The ingest path uses one at a time; the rest
    /// serve concurrent HTTP queries.
    pub pool_size: usize,
    /// Bound on one store call, connecting included. On expiry the connection is
    /// dropped, so the server rolls back whatever it had open.
    pub query_timeout: Duration,
    /// Days with a daily partition; the rest go to the DEFAULT partition.
    pub partition_window: PartitionWindow,
}

/// PostgreSQL implementation of [`HubStore`]. See the module docs.
pub struct PostgresStore {
    /// Drives the connections. `Option` only so that `Drop` can shut it down without
    /// blocking (dropping a runtime inside an async context would panic).
    runtime: Option<tokio::runtime::Runtime>,
    options: PostgresOptions,
    /// `host:port/dbname`, for errors and logs (never the password).
    target: String,
    /// Connections not in use. The lock is held only to pop or push one.
    idle: Mutex<Vec<Client>>,
    /// One permit per connection that may be open: bounds the pool at `pool_size`.
    permits: Arc<Semaphore>,
    /// Days whose partition is known to exist. Only a hint: after another hub drops a
    /// partition it may be stale, which ingest detects and repairs (see `ingest`).
    partitions: Mutex<HashSet<i32>>,
    /// Stream name → id for committed streams; ids created in a transaction are added
    /// only after it commits, so a rollback cannot leave a phantom id here.
    stream_ids: Mutex<HashMap<String, i64>>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore").field("target", &self.target).finish_non_exhaustive()
    }
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        // Close connections first, then stop the runtime without waiting for it: the
        // last `Arc<dyn HubStore>` may well be dropped on an async worker thread.
        self.idle.get_mut().unwrap_or_else(PoisonError::into_inner).clear();
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every guarded value (idle clients, caches) stays consistent at each statement, so
    // a panic elsewhere while holding the lock does not make it unusable.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn pg(op: &'static str) -> impl FnOnce(tokio_postgres::Error) -> StoreError {
    move |source| StoreError::Postgres { op, source }
}

/// The text of a PostgreSQL error with what `tokio_postgres::Error`'s own `Display`
/// leaves out (the server's SQLSTATE and message, or the IO cause).
pub fn pg_error_text(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut s = format!("{} ({}): {}", db.severity(), db.code().code(), db.message());
        if let Some(d) = db.detail() {
            s.push_str(&format!("; {d}"));
        }
        return s;
    }
    let mut s = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        s.push_str(&format!(": {c}"));
        cause = c.source();
    }
    s
}

/// `host:port/dbname` of a connection config, for messages.
pub fn describe_target(config: &tokio_postgres::Config) -> String {
    use tokio_postgres::config::Host;
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(Host::Unix(p)) => p.display().to_string(),
        None => "localhost".to_owned(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let db = config.get_dbname().or(config.get_user()).unwrap_or("postgres");
    format!("{host}:{port}/{db}")
}

/// A checked-out connection. It goes back to the pool only through
/// [`Pooled::release`]; dropped any other way (an error left it unusable, or the call
/// timed out mid-query) the connection is closed, and with it any open transaction.
struct Pooled<'a> {
    client: Option<Client>,
    store: &'a PostgresStore,
    _permit: OwnedSemaphorePermit,
}

impl Pooled<'_> {
    fn client(&mut self) -> &mut Client {
        self.client.as_mut().expect("client present until released")
    }

    /// Returns the connection to the pool if it is still open.
    fn release(mut self) {
        if let Some(c) = self.client.take()
            && !c.is_closed()
        {
            lock(&self.store.idle).push(c);
        }
    }
}

/// UTC day number (days since 1970-01-01) of a timestamp in ns.
pub fn day_of(ts_ns: i64) -> i32 {
    // |i64::MAX / DAY_NS| is 106,751: always fits.
    ts_ns.div_euclid(DAY_NS) as i32
}

/// Civil date of a day number (proleptic Gregorian), from Howard Hinnant's algorithm.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m as u32, d as u32)
}

/// Name of a day's partition: `readings_p20240101`. Nanosecond `i64` timestamps span
/// 1677-09-21 to 2262-04-11, so the year always has four digits.
pub fn partition_name(day: i32) -> String {
    let (y, m, d) = civil_from_days(day.into());
    format!("readings_p{y:04}{m:02}{d:02}")
}

/// `FROM (..) TO (..)` bounds of a day's partition. The first and last representable
/// days are open-ended, since their exact bounds overflow `int8`.
fn partition_bounds(day: i32) -> (String, String) {
    let day = i64::from(day);
    let lo = day.checked_mul(DAY_NS).map_or("MINVALUE".to_owned(), |v| v.to_string());
    let hi = (day + 1).checked_mul(DAY_NS).map_or("MAXVALUE".to_owned(), |v| v.to_string());
    (lo, hi)
}

/// One batch's key columns, converted once for the whole group.
struct Key<'a> {
    agent_id: &'a str,
    epoch: i64,
    seq: i64,
}

/// Per-(stream, day) statistics of one ingest transaction.
struct DayDelta {
    readings: i64,
    first_ts_ns: i64,
    last_ts_ns: i64,
}

/// Most rows per `stream_days`/`losses` statement; arrays beyond this are split so that
/// no single parameter grows without bound.
const ROWS_PER_STATEMENT: usize = 10_000;

impl PostgresStore {
    /// Connects, applies migrations (serialised with any other hub starting at the same
    /// time) and returns the store. Blocks: call it from a blocking thread.
    pub fn connect(options: PostgresOptions) -> Result<PostgresStore, StoreError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            // Connection IO is light (encoding happens on the calling threads); one
            // worker is enough to drive every connection's socket.
            .worker_threads(1)
            .thread_name("brume-postgres")
            .enable_all()
            .build()
            .map_err(StoreError::Runtime)?;
        let store = PostgresStore {
            target: describe_target(&options.config),
            permits: Arc::new(Semaphore::new(options.pool_size.max(1))),
            options,
            runtime: Some(runtime),
            idle: Mutex::new(Vec::new()),
            partitions: Mutex::new(HashSet::new()),
            stream_ids: Mutex::new(HashMap::new()),
        };
        store.call("applying migrations", async {
            let mut conn = store.checkout().await?;
            migrate(conn.client()).await?;
            conn.release();
            Ok(())
        })?;
        Ok(store)
    }

    /// `host:port/dbname` this store talks to.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// Runs `fut` on this store's runtime, blocking the calling thread, bounded by
    /// `query_timeout`. A timed-out future is dropped, and with it any connection it had
    /// checked out (see [`Pooled`]).
    fn call<T>(&self, op: &'static str, fut: impl Future<Output = Result<T, StoreError>>) -> Result<T, StoreError> {
        let rt = self.runtime.as_ref().expect("runtime present until drop");
        let limit = self.options.query_timeout;
        rt.block_on(async move {
            tokio::time::timeout(limit, fut).await.unwrap_or(Err(StoreError::Timeout { op, after: limit }))
        })
    }

    /// Takes an idle connection, or opens one if the pool is not full, or waits.
    async fn checkout(&self) -> Result<Pooled<'_>, StoreError> {
        let permit = Arc::clone(&self.permits).acquire_owned().await.expect("the semaphore is never closed");
        // A connection whose server went away (restart, failover) is closed by its
        // connection task; skip those and open a fresh one instead.
        let idle = {
            let mut idle = lock(&self.idle);
            idle.retain(|c| !c.is_closed());
            idle.pop()
        };
        let client = match idle {
            Some(c) => c,
            None => self.open_client().await?,
        };
        Ok(Pooled { client: Some(client), store: self, _permit: permit })
    }

    async fn open_client(&self) -> Result<Client, StoreError> {
        let connect_err = |source| StoreError::PostgresConnect { target: self.target.clone(), source };
        let (client, connection) = self.options.config.connect(NoTls).await.map_err(connect_err)?;
        let target = self.target.clone();
        // The connection task owns the socket; it ends when the client is dropped or
        // the server goes away, after which `Client::is_closed` is true.
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(target = %target, error = %pg_error_text(&e), "postgres connection ended");
            }
        });
        // Acknowledging means "durably committed". A role or database configured with
        // synchronous_commit=off would break that silently, so this session turns it
        // back on; stronger settings (remote_write, remote_apply) are left alone.
        let sync: String =
            client.query_one("SHOW synchronous_commit", &[]).await.map_err(pg("reading synchronous_commit"))?.get(0);
        if sync == "off" {
            client.batch_execute("SET synchronous_commit = on").await.map_err(pg("setting synchronous_commit"))?;
        }
        Ok(client)
    }

    /// Creates the daily partitions covering `[from_ts_ns, to_ts_ns]` that do not exist
    /// yet. Ingest does this by itself for the days it needs; calling it ahead of time
    /// (for example for tomorrow, from a timer) keeps DDL off the ingest path entirely.
    pub fn ensure_partitions(&self, from_ts_ns: i64, to_ts_ns: i64) -> Result<(), StoreError> {
        let days: BTreeSet<i32> = (day_of(from_ts_ns)..=day_of(to_ts_ns)).collect();
        self.call("creating partitions", async {
            let mut conn = self.checkout().await?;
            self.create_partitions(conn.client(), &days).await?;
            conn.release();
            Ok(())
        })
    }

    /// Creates the partitions of `days` that are not known to exist. Runs in its own
    /// short transaction before the ingest transaction: partition DDL locks the parent
    /// table, and holding that lock for the whole ingest would block every reader.
    async fn create_partitions(&self, client: &mut Client, days: &BTreeSet<i32>) -> Result<(), StoreError> {
        let missing: Vec<i32> = {
            let known = lock(&self.partitions);
            days.iter().copied().filter(|d| !known.contains(d)).collect()
        };
        if missing.is_empty() {
            return Ok(());
        }
        let tx = client.transaction().await.map_err(pg("starting partition transaction"))?;
        // Another hub may be creating the same day right now; the lock makes the check
        // below and the CREATE atomic with respect to it.
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&PARTITION_LOCK]).await.map_err(pg("locking partitions"))?;
        let existing: HashSet<i32> = tx
            .query("SELECT day FROM reading_partitions WHERE day = ANY($1)", &[&missing])
            .await
            .map_err(pg("listing partitions"))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        for &day in missing.iter().filter(|d| !existing.contains(d)) {
            let name = partition_name(day);
            let (lo, hi) = partition_bounds(day);
            // The DEFAULT partition may hold rows of this day (they arrived while it was
            // outside the window): a partition for the day can only be attached once
            // they are moved into it. Empty in the usual case, and found through the
            // default partition's `ts_ns` index either way. Attaching scans the default
            // partition once to check that nothing of the day is left there.
            // DDL takes no parameters; name and bounds are generated from an integer.
            let range = format!(
                "ts_ns >= {} AND ts_ns < {}",
                i64::from(day).saturating_mul(DAY_NS),
                (i64::from(day) + 1).saturating_mul(DAY_NS)
            );
            tx.batch_execute(&format!(
                "CREATE TABLE {name} (LIKE readings);
                 WITH moved AS (DELETE FROM readings_default WHERE {range} RETURNING *)
                     INSERT INTO {name} SELECT * FROM moved;
                 ALTER TABLE readings ATTACH PARTITION {name} FOR VALUES FROM ({lo}) TO ({hi});"
            ))
            .await
            .map_err(pg("creating partition"))?;
            tx.execute("INSERT INTO reading_partitions (day, name) VALUES ($1, $2)", &[&day, &name])
                .await
                .map_err(pg("recording partition"))?;
            tracing::info!(partition = %name, "created readings partition");
        }
        tx.commit().await.map_err(pg("committing partitions"))?;
        lock(&self.partitions).extend(missing);
        Ok(())
    }

    /// Retention: drops every daily partition that ends at or before `ts_ns` (so only
    /// whole days strictly older than `ts_ns` go), with their `stream_days` statistics.
    /// Returns the dropped partitions' names, oldest first.
    ///
    /// `batches` rows are kept, so re-sent old batches stay duplicates and agent
    /// watermarks are unaffected. `DROP TABLE` briefly takes an exclusive lock on the
    /// parent table, so concurrent queries wait for it (milliseconds).
    pub fn drop_partitions_before(&self, ts_ns: i64) -> Result<Vec<String>, StoreError> {
        // Day d ends at (d+1)*DAY_NS and goes if that is <= ts_ns, i.e. if
        // d < floor(ts_ns / DAY_NS).
        let first_kept = day_of(ts_ns);
        let dropped = self.call("dropping partitions", async {
            let mut conn = self.checkout().await?;
            let tx = conn.client().transaction().await.map_err(pg("starting retention transaction"))?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&PARTITION_LOCK])
                .await
                .map_err(pg("locking partitions"))?;
            let rows = tx
                .query("SELECT day, name FROM reading_partitions WHERE day < $1 ORDER BY day", &[&first_kept])
                .await
                .map_err(pg("listing partitions"))?;
            let mut dropped: Vec<(i32, String)> = Vec::new();
            for r in rows {
                let (day, name): (i32, String) = (r.get(0), r.get(1));
                // Names come from our own table and were generated by partition_name.
                tx.batch_execute(&format!("DROP TABLE IF EXISTS {name}")).await.map_err(pg("dropping partition"))?;
                dropped.push((day, name));
            }
            let days: Vec<i32> = dropped.iter().map(|d| d.0).collect();
            // Days outside the partition window live in the default partition.
            let cutoff = i64::from(first_kept).saturating_mul(DAY_NS);
            tx.execute("DELETE FROM readings_default WHERE ts_ns < $1", &[&cutoff])
                .await
                .map_err(pg("deleting old readings of the default partition"))?;
            tx.execute("DELETE FROM stream_days WHERE day < $1", &[&first_kept])
                .await
                .map_err(pg("deleting stream statistics"))?;
            tx.execute("DELETE FROM reading_partitions WHERE day = ANY($1)", &[&days])
                .await
                .map_err(pg("forgetting partitions"))?;
            tx.commit().await.map_err(pg("committing retention"))?;
            conn.release();
            Ok(dropped)
        })?;
        let mut known = lock(&self.partitions);
        for (day, name) in &dropped {
            known.remove(day);
            tracing::info!(partition = %name, "dropped readings partition (retention)");
        }
        Ok(dropped.into_iter().map(|d| d.1).collect())
    }

    /// Names of the existing readings partitions, oldest first.
    pub fn partitions(&self) -> Result<Vec<String>, StoreError> {
        self.call("listing partitions", async {
            let mut conn = self.checkout().await?;
            let rows = conn
                .client()
                .query("SELECT name FROM reading_partitions ORDER BY day", &[])
                .await
                .map_err(pg("listing partitions"))?;
            conn.release();
            Ok(rows.iter().map(|r| r.get(0)).collect())
        })
    }

    /// The days whose partitions this group needs. Usually every day it touches is
    /// cached as existing and this costs nothing. Otherwise batches already stored are
    /// left out (one indexed lookup), so that a re-sent old batch does not recreate a
    /// partition retention dropped; a batch stored between this check and the ingest
    /// transaction only costs an empty partition.
    async fn days_needed(
        &self,
        client: &mut Client,
        batches: &[Batch],
        keys: &[Key<'_>],
    ) -> Result<BTreeSet<i32>, StoreError> {
        let today = day_of(crate::clock::now_ns());
        let window = self.options.partition_window;
        let per_batch: Vec<BTreeSet<i32>> = batches
            .iter()
            .map(|b| {
                b.streams
                    .iter()
                    .flat_map(|c| c.points.iter())
                    .map(|p| day_of(p.ts_ns))
                    .filter(|&d| window.contains(today, d))
                    .collect()
            })
            .collect();
        let missing: Vec<usize> = {
            let known = lock(&self.partitions);
            (0..batches.len()).filter(|&i| per_batch[i].iter().any(|d| !known.contains(d))).collect()
        };
        if missing.is_empty() {
            return Ok(BTreeSet::new());
        }
        let agent_ids: Vec<&str> = missing.iter().map(|&i| keys[i].agent_id).collect();
        let epochs: Vec<i64> = missing.iter().map(|&i| keys[i].epoch).collect();
        let seqs: Vec<i64> = missing.iter().map(|&i| keys[i].seq).collect();
        let stored: HashSet<(String, i64, i64)> = client
            .query(
                "SELECT b.agent_id, b.epoch, b.seq
                 FROM unnest($1::text[], $2::int8[], $3::int8[]) AS u(a, e, s)
                 JOIN batches b ON b.agent_id = u.a AND b.epoch = u.e AND b.seq = u.s",
                &[&agent_ids, &epochs, &seqs],
            )
            .await
            .map_err(pg("checking stored batches"))?
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        Ok(missing
            .into_iter()
            .filter(|&i| {
                let k = &keys[i];
                !stored.contains(&(k.agent_id.to_owned(), k.epoch, k.seq))
            })
            .flat_map(|i| per_batch[i].iter().copied())
            .collect())
    }

    /// One attempt at storing a group: partitions first, then the ingest transaction.
    async fn ingest_once(
        &self,
        batches: &[Batch],
        keys: &[Key<'_>],
        received_ms: i64,
    ) -> Result<Vec<BatchOutcome>, StoreError> {
        let mut conn = self.checkout().await?;
        let days = self.days_needed(conn.client(), batches, keys).await?;
        self.create_partitions(conn.client(), &days).await?;

        // Ids of this group's streams that are already known, copied out so the lock
        // is not held across the transaction.
        let known: HashMap<String, i64> = {
            let ids = lock(&self.stream_ids);
            batches
                .iter()
                .flat_map(|b| b.streams.iter())
                .filter_map(|c| ids.get(&c.stream).map(|&id| (c.stream.clone(), id)))
                .collect()
        };
        let mut created = HashMap::new();
        let tx = conn.client().transaction().await.map_err(pg("starting transaction"))?;
        // On error `tx` is dropped, which rolls it back, and `created` goes with it.
        let outcomes = ingest_tx(&tx, &known, &mut created, batches, keys, received_ms).await?;
        // Once COMMIT returns, the group is durable (synchronous_commit is at least on).
        // If the connection dies during COMMIT the outcome is unknown and the call fails;
        // the retry is safe because the batches dedup.
        tx.commit().await.map_err(pg("committing transaction"))?;
        conn.release();
        lock(&self.stream_ids).extend(created);
        Ok(outcomes)
    }
}

/// Applies pending migrations in one transaction under an advisory lock, so that two
/// hubs starting at once apply each migration exactly once: the second waits for the
/// first to commit, then finds nothing left to do.
async fn migrate(client: &mut Client) -> Result<(), StoreError> {
    let tx = client.transaction().await.map_err(pg("starting migration"))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await.map_err(pg("locking migrations"))?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             version    int4 PRIMARY KEY,
             applied_at timestamptz NOT NULL DEFAULT now()
         )",
    )
    .await
    .map_err(pg("creating schema_migrations"))?;
    let current: i32 = tx
        .query_one("SELECT coalesce(max(version), 0) FROM schema_migrations", &[])
        .await
        .map_err(pg("reading schema version"))?
        .get(0);
    if current > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew { found: current.into(), supported: SCHEMA_VERSION.into() });
    }
    for &(version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
        tx.batch_execute(sql).await.map_err(pg("applying a migration"))?;
        if version == 3 {
            // Readings stored before rollups existed, rolled up once.
            let mut deltas = RollupDeltas::default();
            for r in tx
                .query("SELECT stream_id, ts_ns, fields FROM readings", &[])
                .await
                .map_err(pg("reading readings for rollups"))?
            {
                deltas.add(r.get(0), r.get(1), &FieldsBlob(r.get(2)))?;
            }
            write_rollups(&tx, deltas).await?;
        }
        if version == 9 {
            // Readings stored before per-agent rollups existed, rolled up once.
            let mut deltas = RollupDeltas::default();
            for r in tx
                .query("SELECT stream_id, agent_id, ts_ns, fields FROM readings", &[])
                .await
                .map_err(pg("reading readings for agent rollups"))?
            {
                deltas.add_for_agent(r.get(0), r.get(1), r.get(2), &FieldsBlob(r.get(3)))?;
            }
            write_rollups(&tx, deltas).await?;
        }
        tx.execute("INSERT INTO schema_migrations (version) VALUES ($1)", &[&version])
            .await
            .map_err(pg("recording a migration"))?;
        tracing::info!(version, "applied postgres schema migration");
    }
    tx.commit().await.map_err(pg("committing migration"))
}

/// The body of the ingest transaction. See the module docs for the locking order.
async fn ingest_tx(
    tx: &Transaction<'_>,
    known: &HashMap<String, i64>,
    created: &mut HashMap<String, i64>,
    batches: &[Batch],
    keys: &[Key<'_>],
    received_ms: i64,
) -> Result<Vec<BatchOutcome>, StoreError> {
    // 1. Batches, deduplicated. Each distinct key is sent once (a key repeated inside
    //    the group is a duplicate of its first occurrence), sorted, so concurrent hubs
    //    lock primary-key entries in the same order. RETURNING names the rows that
    //    were really inserted: everything else was committed before.
    let mut first_of: BTreeMap<(&str, i64, i64), usize> = BTreeMap::new();
    for (i, k) in keys.iter().enumerate() {
        first_of.entry((k.agent_id, k.epoch, k.seq)).or_insert(i);
    }
    let mut agent_ids: Vec<&str> = Vec::with_capacity(first_of.len());
    let mut epochs: Vec<i64> = Vec::with_capacity(first_of.len());
    let mut seqs: Vec<i64> = Vec::with_capacity(first_of.len());
    let mut counts: Vec<i64> = Vec::with_capacity(first_of.len());
    let mut created_ms: Vec<i64> = Vec::with_capacity(first_of.len());
    for (&(agent, epoch, seq), &i) in &first_of {
        agent_ids.push(agent);
        epochs.push(epoch);
        seqs.push(seq);
        counts.push(batches[i].reading_count() as i64);
        created_ms.push(batches[i].created_ms);
    }
    let inserted: HashSet<(String, i64, i64)> = tx
        .query(
            "INSERT INTO batches (agent_id, epoch, seq, readings, created_ms, received_ms)
             SELECT a, e, s, r, c, $6
             FROM unnest($1::text[], $2::int8[], $3::int8[], $4::int8[], $5::int8[])
                  AS u(a, e, s, r, c)
             ON CONFLICT DO NOTHING
             RETURNING agent_id, epoch, seq",
            &[&agent_ids, &epochs, &seqs, &counts, &created_ms, &received_ms],
        )
        .await
        .map_err(pg("inserting batches"))?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let outcomes: Vec<BatchOutcome> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| {
            let first = first_of[&(k.agent_id, k.epoch, k.seq)] == i;
            if first && inserted.contains(&(k.agent_id.to_owned(), k.epoch, k.seq)) {
                BatchOutcome::Stored
            } else {
                BatchOutcome::Duplicate
            }
        })
        .collect();

    // 2. Stream ids for the new batches' non-empty chunks. Unknown names are inserted in
    //    name order; a concurrent hub inserting the same name makes this wait for its
    //    commit, after which the SELECT (a new snapshot in READ COMMITTED) sees its id.
    let new_batches: Vec<(usize, &Batch)> =
        batches.iter().enumerate().filter(|(i, _)| outcomes[*i] == BatchOutcome::Stored).collect();
    let unknown: BTreeSet<&str> = new_batches
        .iter()
        .flat_map(|(_, b)| b.streams.iter())
        .filter(|c| !c.points.is_empty() && !known.contains_key(&c.stream))
        .map(|c| c.stream.as_str())
        .collect();
    if !unknown.is_empty() {
        let names: Vec<&str> = unknown.into_iter().collect();
        tx.execute("INSERT INTO streams (name) SELECT unnest($1::text[]) ON CONFLICT (name) DO NOTHING", &[&names])
            .await
            .map_err(pg("creating streams"))?;
        for r in tx
            .query("SELECT name, id FROM streams WHERE name = ANY($1)", &[&names])
            .await
            .map_err(pg("looking up streams"))?
        {
            created.insert(r.get(0), r.get(1));
        }
    }
    let stream_id = |name: &str| -> Result<i64, StoreError> {
        known
            .get(name)
            .or_else(|| created.get(name))
            .copied()
            .ok_or_else(|| StoreError::Corrupt(format!("stream {name:?} has no id")))
    };

    // 3. Readings of new batches only, streamed with COPY BINARY into the parent table
    //    (PostgreSQL routes each row to its day's partition). COPY has no conflict
    //    handling, and needs none: the batches insert above already decided which
    //    readings are new, in this same transaction.
    let mut days: BTreeMap<(i64, i32), DayDelta> = BTreeMap::new();
    // Per (agent, stream), in key order: the order rows are written.
    let mut agent_streams: BTreeMap<(&str, i64), DayDelta> = BTreeMap::new();
    let mut rollups = RollupDeltas::default();
    if new_batches.iter().any(|(_, b)| b.reading_count() > 0) {
        let sink: CopyInSink<Bytes> = tx
            .copy_in(
                "COPY readings (stream_id, ts_ns, agent_id, epoch, seq, idx, fields) \
                 FROM STDIN (FORMAT binary)",
            )
            .await
            .map_err(pg("starting readings copy"))?;
        let writer = BinaryCopyInWriter::new(
            sink,
            &[Type::INT8, Type::INT8, Type::TEXT, Type::INT8, Type::INT8, Type::INT4, Type::BYTEA],
        );
        let mut writer = std::pin::pin!(writer);
        for &(i, b) in &new_batches {
            let k = &keys[i];
            let mut idx: i32 = 0;
            for chunk in b.streams.iter().filter(|c| !c.points.is_empty()) {
                let sid = stream_id(&chunk.stream)?;
                for p in &chunk.points {
                    let fields: &[u8] = &p.fields.0;
                    writer
                        .as_mut()
                        .write(&[&sid, &p.ts_ns, &k.agent_id, &k.epoch, &k.seq, &idx, &fields])
                        .await
                        .map_err(pg("copying readings"))?;
                    idx = idx.checked_add(1).ok_or_else(|| StoreError::TooManyReadings {
                        agent_id: b.agent_id.clone(),
                        epoch: b.epoch,
                        seq: b.seq,
                        max: i32::MAX.into(),
                    })?;
                    let d = days.entry((sid, day_of(p.ts_ns))).or_insert(DayDelta {
                        readings: 0,
                        first_ts_ns: i64::MAX,
                        last_ts_ns: i64::MIN,
                    });
                    d.readings += 1;
                    d.first_ts_ns = d.first_ts_ns.min(p.ts_ns);
                    d.last_ts_ns = d.last_ts_ns.max(p.ts_ns);
                    rollups.add_both(sid, &b.agent_id, p.ts_ns, &p.fields)?;
                    let a = agent_streams.entry((b.agent_id.as_str(), sid)).or_insert(DayDelta {
                        readings: 0,
                        first_ts_ns: i64::MAX,
                        last_ts_ns: i64::MIN,
                    });
                    a.readings += 1;
                    a.first_ts_ns = a.first_ts_ns.min(p.ts_ns);
                    a.last_ts_ns = a.last_ts_ns.max(p.ts_ns);
                }
            }
        }
        writer.as_mut().finish().await.map_err(pg("finishing readings copy"))?;
    }

    // 4. Per-stream, per-day statistics, one row per key (aggregated above, because an
    //    upsert may not touch the same row twice in one statement), in key order.
    let rows: Vec<_> = days.into_iter().collect();
    for part in rows.chunks(ROWS_PER_STATEMENT) {
        let sids: Vec<i64> = part.iter().map(|((s, _), _)| *s).collect();
        let ds: Vec<i32> = part.iter().map(|((_, d), _)| *d).collect();
        let n: Vec<i64> = part.iter().map(|(_, v)| v.readings).collect();
        let lo: Vec<i64> = part.iter().map(|(_, v)| v.first_ts_ns).collect();
        let hi: Vec<i64> = part.iter().map(|(_, v)| v.last_ts_ns).collect();
        tx.execute(
            "INSERT INTO stream_days (stream_id, day, readings, first_ts_ns, last_ts_ns)
             SELECT * FROM unnest($1::int8[], $2::int4[], $3::int8[], $4::int8[], $5::int8[])
             ON CONFLICT (stream_id, day) DO UPDATE SET
                 readings = stream_days.readings + excluded.readings,
                 first_ts_ns = least(stream_days.first_ts_ns, excluded.first_ts_ns),
                 last_ts_ns = greatest(stream_days.last_ts_ns, excluded.last_ts_ns)",
            &[&sids, &ds, &n, &lo, &hi],
        )
        .await
        .map_err(pg("updating stream statistics"))?;
    }

    let rows: Vec<_> = agent_streams.into_iter().collect();
    for part in rows.chunks(ROWS_PER_STATEMENT) {
        let agents: Vec<&str> = part.iter().map(|((a, _), _)| *a).collect();
        let sids: Vec<i64> = part.iter().map(|((_, s), _)| *s).collect();
        let n: Vec<i64> = part.iter().map(|(_, v)| v.readings).collect();
        let lo: Vec<i64> = part.iter().map(|(_, v)| v.first_ts_ns).collect();
        let hi: Vec<i64> = part.iter().map(|(_, v)| v.last_ts_ns).collect();
        tx.execute(
            "INSERT INTO agent_streams (agent_id, stream_id, readings, first_ts_ns, last_ts_ns)
             SELECT * FROM unnest($1::text[], $2::int8[], $3::int8[], $4::int8[], $5::int8[])
             ON CONFLICT (agent_id, stream_id) DO UPDATE SET
                 readings = agent_streams.readings + excluded.readings,
                 first_ts_ns = least(agent_streams.first_ts_ns, excluded.first_ts_ns),
                 last_ts_ns = greatest(agent_streams.last_ts_ns, excluded.last_ts_ns)",
            &[&agents, &sids, &n, &lo, &hi],
        )
        .await
        .map_err(pg("updating agent streams"))?;
    }

    write_rollups(tx, rollups).await?;

    // 5. Lineage of the new batches' computed chunks.
    let mut l_agents: Vec<&str> = Vec::new();
    let (mut l_epochs, mut l_seqs): (Vec<i64>, Vec<i64>) = (Vec::new(), Vec::new());
    let (mut l_first, mut l_last): (Vec<i32>, Vec<i32>) = (Vec::new(), Vec::new());
    let (mut l_names, mut l_versions, mut l_hashes): (Vec<String>, Vec<String>, Vec<Vec<u8>>) =
        (Vec::new(), Vec::new(), Vec::new());
    for &(i, b) in &new_batches {
        for l in lineage_ranges(b) {
            l_agents.push(keys[i].agent_id);
            l_epochs.push(keys[i].epoch);
            l_seqs.push(keys[i].seq);
            // Readings are numbered in int4 (checked above), so the ranges fit.
            l_first.push(l.first_idx as i32);
            l_last.push(l.last_idx as i32);
            l_names.push(l.module.name);
            l_versions.push(l.module.version);
            l_hashes.push(l.module.sha256.to_vec());
        }
    }
    if !l_agents.is_empty() {
        tx.execute(
            "INSERT INTO lineage (agent_id, epoch, seq, first_idx, last_idx, module, version, sha256)
             SELECT * FROM unnest($1::text[], $2::int8[], $3::int8[], $4::int4[], $5::int4[],
                                  $6::text[], $7::text[], $8::bytea[])",
            &[&l_agents, &l_epochs, &l_seqs, &l_first, &l_last, &l_names, &l_versions, &l_hashes],
        )
        .await
        .map_err(pg("inserting lineage"))?;
    }

    // 6. Loss counters, for duplicates too: totals are cumulative, so a re-sent batch
    //    may carry newer ones, and greatest() makes applying them idempotent.
    let mut losses: BTreeMap<(&str, i64, &str, &str), i64> = BTreeMap::new();
    for (b, k) in batches.iter().zip(keys) {
        for l in &b.losses {
            let total = i64::try_from(l.total).unwrap_or(i64::MAX);
            let e = losses.entry((k.agent_id, k.epoch, l.stream.as_str(), l.reason.as_str())).or_insert(total);
            *e = (*e).max(total);
        }
    }
    let rows: Vec<_> = losses.into_iter().collect();
    for part in rows.chunks(ROWS_PER_STATEMENT) {
        let agents: Vec<&str> = part.iter().map(|((a, ..), _)| *a).collect();
        let epochs: Vec<i64> = part.iter().map(|((_, e, ..), _)| *e).collect();
        let streams: Vec<&str> = part.iter().map(|((_, _, s, _), _)| *s).collect();
        let reasons: Vec<&str> = part.iter().map(|((.., r), _)| *r).collect();
        let totals: Vec<i64> = part.iter().map(|(_, t)| *t).collect();
        tx.execute(
            "INSERT INTO losses (agent_id, epoch, stream, reason, total)
             SELECT * FROM unnest($1::text[], $2::int8[], $3::text[], $4::text[], $5::int8[])
             ON CONFLICT (agent_id, epoch, stream, reason)
             DO UPDATE SET total = greatest(losses.total, excluded.total)",
            &[&agents, &epochs, &streams, &reasons, &totals],
        )
        .await
        .map_err(pg("upserting loss reports"))?;
    }
    Ok(outcomes)
}

/// True if `e` says a row had no partition to go to ("no partition of relation ...
/// found for row"): the partition cache was stale, because another hub dropped the
/// partition after this one cached it. Since schema v6 the DEFAULT partition takes such
/// rows, so this is only a guard for a database whose default partition was removed by
/// hand. The schema has no CHECK constraints of its own; one added by an operator is
/// retried once here and then treated like any other refusal (see `crate::ingest`).
fn is_missing_partition(e: &StoreError) -> bool {
    matches!(e, StoreError::Postgres { source, .. }
        if source.code() == Some(&SqlState::CHECK_VIOLATION))
}

impl HubStore for PostgresStore {
    fn ingest(&self, batches: &[Batch], received_ms: i64) -> Result<Vec<BatchOutcome>, StoreError> {
        let keys = batches
            .iter()
            .map(|b| {
                Ok(Key {
                    agent_id: &b.agent_id,
                    epoch: epoch_to_sql(b.epoch),
                    seq: i64::try_from(b.seq).map_err(|_| StoreError::Corrupt(format!("seq {} exceeds i64", b.seq)))?,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        if batches.is_empty() {
            return Ok(Vec::new());
        }
        let result = self.call("ingest", self.ingest_once(batches, &keys, received_ms));
        if result.is_err() {
            // Whatever failed, the cache may be what is wrong; rebuilding it costs one
            // cheap query on the next call.
            lock(&self.partitions).clear();
        }
        match result {
            Err(e) if is_missing_partition(&e) => {
                // Another hub's retention dropped a partition this one had cached. The
                // transaction rolled back; forget the cache and try once more, which
                // recreates the partition.
                tracing::info!(error = %e, "partition cache was stale; recreating partitions");
                self.call("ingest", self.ingest_once(batches, &keys, received_ms))
            }
            other => other,
        }
    }

    fn streams(&self) -> Result<Vec<StreamSummary>, StoreError> {
        self.call("listing streams", async {
            let mut conn = self.checkout().await?;
            let rows = conn
                .client()
                .query(
                    "SELECT s.name, coalesce(sum(d.readings), 0)::int8,
                            min(d.first_ts_ns), max(d.last_ts_ns)
                     FROM streams s LEFT JOIN stream_days d ON d.stream_id = s.id
                     GROUP BY s.id, s.name ORDER BY s.name",
                    &[],
                )
                .await
                .map_err(pg("listing streams"))?;
            conn.release();
            Ok(rows
                .iter()
                .map(|r| StreamSummary {
                    stream: r.get(0),
                    readings: r.get::<_, i64>(1).max(0) as u64,
                    first_ts_ns: r.get(2),
                    last_ts_ns: r.get(3),
                })
                .collect())
        })
    }

    fn readings(&self, q: &ReadingsQuery) -> Result<ReadingsPage, StoreError> {
        self.call("querying readings", async {
            let mut conn = self.checkout().await?;
            let client = conn.client();
            let Some(row) = client
                .query_opt("SELECT id FROM streams WHERE name = $1", &[&q.stream])
                .await
                .map_err(pg("looking up stream"))?
            else {
                conn.release();
                return Ok(ReadingsPage { readings: Vec::new(), next: None });
            };
            let stream_id: i64 = row.get(0);
            // A cursor implies ts_ns >= its timestamp. Stating it as a plain bound lets
            // the planner prune partitions before the cursor, which it cannot derive
            // from the row comparison.
            let from = q.from.unwrap_or(i64::MIN).max(q.after.as_ref().map_or(i64::MIN, |c| c.ts_ns));
            let to = q.to.unwrap_or(i64::MAX);
            // One row more than asked tells whether another page exists without a COUNT.
            let fetch = q.limit.saturating_add(1) as i64;
            let rows = match &q.after {
                None => {
                    client
                        .query(
                            "SELECT ts_ns, agent_id, epoch, seq, idx, fields FROM readings
                             WHERE stream_id = $1 AND ts_ns >= $2 AND ts_ns < $3
                             ORDER BY ts_ns, agent_id, epoch, seq, idx LIMIT $4",
                            &[&stream_id, &from, &to, &fetch],
                        )
                        .await
                }
                Some(c) => {
                    let seq = i64::try_from(c.seq).unwrap_or(i64::MAX);
                    let idx = i32::try_from(c.idx).unwrap_or(i32::MAX);
                    let epoch = epoch_to_sql(c.epoch);
                    // Row-value comparison in the index's column order: the scan seeks
                    // straight to the cursor (keyset paging), no OFFSET.
                    client
                        .query(
                            "SELECT ts_ns, agent_id, epoch, seq, idx, fields FROM readings
                             WHERE stream_id = $1 AND ts_ns >= $2 AND ts_ns < $3
                               AND (ts_ns, agent_id, epoch, seq, idx) > ($5, $6, $7, $8, $9)
                             ORDER BY ts_ns, agent_id, epoch, seq, idx LIMIT $4",
                            &[&stream_id, &from, &to, &fetch, &c.ts_ns, &c.agent_id, &epoch, &seq, &idx],
                        )
                        .await
                }
            }
            .map_err(pg("querying readings"))?;
            let mut readings: Vec<StoredReading> = rows
                .iter()
                .map(|r| StoredReading {
                    ts_ns: r.get(0),
                    agent_id: r.get(1),
                    epoch: epoch_from_sql(r.get(2)),
                    seq: r.get::<_, i64>(3) as u64,
                    idx: r.get::<_, i32>(4) as u32,
                    fields: FieldsBlob(r.get(5)),
                    module: None,
                })
                .collect();
            let next = if readings.len() > q.limit {
                readings.truncate(q.limit);
                readings.last().map(StoredReading::cursor)
            } else {
                None
            };
            // The page's lineage in one query for all its batches.
            let keys: BTreeSet<(&str, i64, i64)> =
                readings.iter().map(|r| (r.agent_id.as_str(), epoch_to_sql(r.epoch), r.seq as i64)).collect();
            let mut ranges: HashMap<(String, u64, u64), Vec<LineageRange>> = HashMap::new();
            if !keys.is_empty() {
                let agents: Vec<&str> = keys.iter().map(|k| k.0).collect();
                let epochs: Vec<i64> = keys.iter().map(|k| k.1).collect();
                let seqs: Vec<i64> = keys.iter().map(|k| k.2).collect();
                let rows = client
                    .query(
                        "SELECT l.agent_id, l.epoch, l.seq, l.first_idx, l.last_idx, l.module, l.version, l.sha256
                         FROM unnest($1::text[], $2::int8[], $3::int8[]) AS k(a, e, s)
                         JOIN lineage l ON l.agent_id = k.a AND l.epoch = k.e AND l.seq = k.s",
                        &[&agents, &epochs, &seqs],
                    )
                    .await
                    .map_err(pg("looking up lineage"))?;
                for r in rows {
                    let key = (r.get::<_, String>(0), epoch_from_sql(r.get(1)), r.get::<_, i64>(2) as u64);
                    let module = module_ref(r.get(5), r.get(6), r.get(7))?;
                    ranges.entry(key).or_default().push(LineageRange {
                        first_idx: r.get::<_, i32>(3) as u32,
                        last_idx: r.get::<_, i32>(4) as u32,
                        module,
                    });
                }
            }
            conn.release();
            attach_lineage(&mut readings, |a, e, s| Ok(ranges.remove(&(a.to_owned(), e, s)).unwrap_or_default()))?;
            Ok(ReadingsPage { readings, next })
        })
    }

    fn agents(&self) -> Result<Vec<AgentSummary>, StoreError> {
        self.call("listing agents", async {
            let mut conn = self.checkout().await?;
            // One snapshot for the three queries, so counts, gaps and losses agree.
            let tx = conn
                .client()
                .build_transaction()
                .isolation_level(IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await
                .map_err(pg("starting read transaction"))?;
            let out = agents_in_snapshot(&tx).await?;
            tx.commit().await.map_err(pg("ending read transaction"))?;
            conn.release();
            Ok(out)
        })
    }

    fn modules(&self) -> Result<Vec<ModuleSummary>, StoreError> {
        self.call("listing modules", async {
            let mut conn = self.checkout().await?;
            let rows = conn
                .client()
                .query(
                    "SELECT module, version, sha256, count(DISTINCT agent_id),
                            sum(last_idx - first_idx + 1)::int8
                     FROM lineage GROUP BY module, version, sha256 ORDER BY module, version, sha256",
                    &[],
                )
                .await
                .map_err(pg("listing modules"))?;
            conn.release();
            rows.iter()
                .map(|r| {
                    Ok(ModuleSummary {
                        module: module_ref(r.get(0), r.get(1), r.get(2))?,
                        agents: r.get::<_, i64>(3).max(0) as u64,
                        readings: r.get::<_, i64>(4).max(0) as u64,
                    })
                })
                .collect()
        })
    }

    fn record_presence(&self, status: &StatusV1, ext: &StatusExtV2, received_ms: i64) -> Result<(), StoreError> {
        let blob = AgentStatus::V2(status.clone(), ext.clone()).encode();
        self.call("recording presence", async {
            let mut conn = self.checkout().await?;
            conn.client()
                .execute(
                    "INSERT INTO presence (agent_id, received_ms, status) VALUES ($1, $2, $3)
                     ON CONFLICT (agent_id) DO UPDATE SET received_ms = excluded.received_ms, status = excluded.status",
                    &[&status.agent_id, &received_ms, &blob],
                )
                .await
                .map_err(pg("recording presence"))?;
            conn.release();
            Ok(())
        })
    }

    fn presence(&self) -> Result<Vec<PresenceRecord>, StoreError> {
        self.call("listing presence", async {
            let mut conn = self.checkout().await?;
            let rows = conn
                .client()
                .query("SELECT status, received_ms FROM presence ORDER BY agent_id", &[])
                .await
                .map_err(pg("listing presence"))?;
            conn.release();
            rows.iter().map(|r| decode_presence(r.get(0), r.get(1))).collect()
        })
    }

    fn quarantine(&self, q: &NewQuarantine<'_>) -> Result<i64, StoreError> {
        let error = storable_text(q.error);
        self.call("quarantining a batch", async {
            let mut conn = self.checkout().await?;
            let id = conn
                .client()
                .query_one(
                    "INSERT INTO quarantine (agent_id, epoch, seq, topic, reason, error, payload, first_received_ms, last_received_ms)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8)
                     ON CONFLICT (agent_id, epoch, seq) DO UPDATE SET
                         error = excluded.error, reason = excluded.reason,
                         last_received_ms = excluded.last_received_ms, deliveries = quarantine.deliveries + 1
                     RETURNING id",
                    &[
                        &q.agent_id,
                        &epoch_to_sql(q.epoch),
                        &epoch_to_sql(q.seq),
                        &q.topic,
                        &q.reason.as_str(),
                        &error,
                        &q.payload,
                        &q.received_ms,
                    ],
                )
                .await
                .map_err(pg("quarantining a batch"))?
                .get(0);
            conn.release();
            Ok(id)
        })
    }

    fn quarantine_id(&self, agent_id: &str, epoch: u64, seq: u64) -> Result<Option<i64>, StoreError> {
        self.call("looking up quarantine", async {
            let mut conn = self.checkout().await?;
            let row = conn
                .client()
                .query_opt(
                    "SELECT id FROM quarantine WHERE agent_id = $1 AND epoch = $2 AND seq = $3",
                    &[&agent_id, &epoch_to_sql(epoch), &epoch_to_sql(seq)],
                )
                .await
                .map_err(pg("looking up quarantine"))?;
            conn.release();
            Ok(row.map(|r| r.get(0)))
        })
    }

    fn quarantined(&self, after: i64, limit: usize) -> Result<Vec<QuarantinedBatch>, StoreError> {
        let limit = limit.min(MAX_QUARANTINE_PAGE) as i64;
        self.call("listing quarantine", async {
            let mut conn = self.checkout().await?;
            let rows = conn
                .client()
                .query(
                    &format!("SELECT {QUARANTINE_COLUMNS} FROM quarantine WHERE id > $1 ORDER BY id LIMIT $2"),
                    &[&after, &limit],
                )
                .await
                .map_err(pg("listing quarantine"))?;
            conn.release();
            rows.iter().map(quarantine_row).collect()
        })
    }

    fn quarantined_payload(&self, id: i64) -> Result<Option<(QuarantinedBatch, Vec<u8>)>, StoreError> {
        self.call("reading quarantine", async {
            let mut conn = self.checkout().await?;
            let row = conn
                .client()
                .query_opt(&format!("SELECT {QUARANTINE_COLUMNS}, payload FROM quarantine WHERE id = $1"), &[&id])
                .await
                .map_err(pg("reading quarantine"))?;
            conn.release();
            row.map(|r| Ok((quarantine_row(&r)?, r.get(11)))).transpose()
        })
    }

    fn release_quarantined(&self, id: i64) -> Result<bool, StoreError> {
        self.call("releasing quarantine", async {
            let mut conn = self.checkout().await?;
            let n = conn
                .client()
                .execute("DELETE FROM quarantine WHERE id = $1", &[&id])
                .await
                .map_err(pg("releasing quarantine"))?;
            conn.release();
            Ok(n == 1)
        })
    }

    fn drop_days_before(&self, ts_ns: i64) -> Result<u64, StoreError> {
        let first_kept = day_of(ts_ns);
        let readings: i64 = self.call("counting readings to drop", async {
            let mut conn = self.checkout().await?;
            let n = conn
                .client()
                .query_one("SELECT coalesce(sum(readings), 0)::int8 FROM stream_days WHERE day < $1", &[&first_kept])
                .await
                .map_err(pg("counting readings to drop"))?
                .get(0);
            conn.release();
            Ok(n)
        })?;
        self.drop_partitions_before(ts_ns)?;
        let cutoff = i64::from(first_kept).saturating_mul(DAY_NS);
        self.call("deleting old agent rollups", async {
            let mut conn = self.checkout().await?;
            conn.client()
                .execute("DELETE FROM agent_rollups WHERE minute < $1", &[&cutoff])
                .await
                .map_err(pg("deleting old agent rollups"))?;
            conn.release();
            Ok(())
        })?;
        Ok(readings.max(0) as u64)
    }

    fn ping(&self) -> Result<(), StoreError> {
        self.call("ping", async {
            let mut conn = self.checkout().await?;
            conn.client().query_one("SELECT 1", &[]).await.map_err(pg("ping"))?;
            conn.release();
            Ok(())
        })
    }

    fn agent_streams(&self, agent_id: &str) -> Result<Vec<StreamSummary>, StoreError> {
        self.call("listing an agent's streams", async {
            let mut conn = self.checkout().await?;
            let rows = conn
                .client()
                .query(
                    "SELECT s.name, a.readings, a.first_ts_ns, a.last_ts_ns
                     FROM agent_streams a JOIN streams s ON s.id = a.stream_id
                     WHERE a.agent_id = $1 ORDER BY s.name",
                    &[&agent_id],
                )
                .await
                .map_err(pg("listing an agent's streams"))?;
            conn.release();
            Ok(rows
                .iter()
                .map(|r| StreamSummary {
                    stream: r.get(0),
                    readings: r.get::<_, i64>(1).max(0) as u64,
                    first_ts_ns: Some(r.get(2)),
                    last_ts_ns: Some(r.get(3)),
                })
                .collect())
        })
    }

    fn agent_rollups(&self, q: &AgentRollupQuery) -> Result<Vec<AgentBucket>, StoreError> {
        self.call("reading agent rollups", async {
            let mut conn = self.checkout().await?;
            let limit = (q.max_rows as i64).saturating_add(1);
            let rows = conn
                .client()
                .query(
                    "SELECT r.minute - ((r.minute - $4) % $6) AS bucket, r.agent_id,
                            sum(r.count)::int8, sum(r.sum), min(r.min), max(r.max)
                     FROM agent_rollups r JOIN streams s ON s.id = r.stream_id
                     WHERE s.name = $1 AND r.field = $2 AND r.minute >= $4 AND r.minute < $5
                       AND ($3::text[] IS NULL OR r.agent_id = ANY($3))
                     GROUP BY bucket, r.agent_id
                     ORDER BY bucket, r.agent_id
                     LIMIT $7",
                    &[&q.stream, &q.field, &q.agents, &q.from, &q.to, &q.step, &limit],
                )
                .await
                .map_err(pg("reading agent rollups"))?;
            conn.release();
            Ok(rows
                .iter()
                .map(|r| AgentBucket {
                    start: r.get(0),
                    agent_id: r.get(1),
                    count: r.get::<_, i64>(2).max(0) as u64,
                    sum: r.get(3),
                    min: r.get(4),
                    max: r.get(5),
                })
                .collect())
        })
    }

    fn rollups(&self, stream: &str, field: &str, from: i64, to: i64) -> Result<Vec<(i64, Agg)>, StoreError> {
        self.call("reading rollups", async {
            let mut conn = self.checkout().await?;
            let rows = conn
                .client()
                .query(
                    "SELECT r.minute, r.count, r.sum, r.min, r.max, r.last_ts_ns, r.last
                     FROM rollups r JOIN streams s ON s.id = r.stream_id
                     WHERE s.name = $1 AND r.field = $2 AND r.minute >= $3 AND r.minute < $4
                     ORDER BY r.minute",
                    &[&stream, &field, &from, &to],
                )
                .await
                .map_err(pg("reading rollups"))?;
            conn.release();
            Ok(rows
                .iter()
                .map(|r| {
                    (
                        r.get(0),
                        Agg {
                            count: r.get::<_, i64>(1).max(0) as u64,
                            sum: r.get(2),
                            min: r.get(3),
                            max: r.get(4),
                            last_ts_ns: r.get(5),
                            last: r.get(6),
                        },
                    )
                })
                .collect())
        })
    }
}

/// A row of [`QUARANTINE_COLUMNS`].
fn quarantine_row(r: &tokio_postgres::Row) -> Result<QuarantinedBatch, StoreError> {
    quarantine_entry(
        r.get(0),
        r.get(1),
        r.get(2),
        r.get(3),
        r.get(4),
        r.get::<_, &str>(5),
        r.get(6),
        r.get::<_, i32>(7).into(),
        r.get(8),
        r.get(9),
        r.get(10),
    )
}

async fn agents_in_snapshot(tx: &Transaction<'_>) -> Result<Vec<AgentSummary>, StoreError> {
    let mut out: Vec<AgentSummary> = tx
        .query(
            "SELECT agent_id, epoch, count(*), sum(readings)::int8, max(seq), max(received_ms)
             FROM batches GROUP BY agent_id, epoch",
            &[],
        )
        .await
        .map_err(pg("summarising batches"))?
        .iter()
        .map(|r| AgentSummary {
            agent_id: r.get(0),
            epoch: epoch_from_sql(r.get(1)),
            batches: r.get::<_, i64>(2) as u64,
            readings: r.get::<_, i64>(3) as u64,
            watermark: 0,
            max_seq: r.get::<_, i64>(4) as u64,
            missing: Vec::new(),
            missing_since_ms: Vec::new(),
            losses: Vec::new(),
            last_seen_ms: r.get(5),
        })
        .collect();
    out.sort_by(|a, b| (&a.agent_id, a.epoch).cmp(&(&b.agent_id, b.epoch)));
    let pos: HashMap<(String, u64), usize> =
        out.iter().enumerate().map(|(i, a)| ((a.agent_id.clone(), a.epoch), i)).collect();

    // Gaps: each stored seq whose predecessor (in seq order) is not seq-1 ends a gap.
    // One pass over the primary key in the server; LAG's default 0 makes a missing seq 1
    // a gap too. Same query as SQLite.
    let gaps = tx
        .query(
            "SELECT agent_id, epoch, prev + 1, seq - 1, received_ms FROM (
                 SELECT agent_id, epoch, seq, received_ms,
                        lag(seq, 1, 0::int8) OVER (PARTITION BY agent_id, epoch ORDER BY seq) AS prev
                 FROM batches) g
             WHERE seq > prev + 1 ORDER BY agent_id, epoch, seq",
            &[],
        )
        .await
        .map_err(pg("computing gaps"))?;
    for r in gaps {
        let key = (r.get::<_, String>(0), epoch_from_sql(r.get(1)));
        let (lo, hi): (i64, i64) = (r.get(2), r.get(3));
        super::add_gap(&mut out, &pos, &key, (lo, hi), r.get(4));
    }
    super::set_watermarks(&mut out);

    let losses = tx
        .query(
            "SELECT agent_id, epoch, stream, reason, total FROM losses
             ORDER BY agent_id, epoch, stream, reason",
            &[],
        )
        .await
        .map_err(pg("listing losses"))?;
    for r in losses {
        let key = (r.get::<_, String>(0), epoch_from_sql(r.get(1)));
        if let Some(&i) = pos.get(&key) {
            out[i].losses.push(LossSummary {
                stream: r.get(2),
                reason: loss_reason_from_str(r.get(3))?,
                total: r.get::<_, i64>(4).max(0) as u64,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
