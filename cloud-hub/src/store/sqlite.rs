//! [`HubStore`] on one SQLite file (`data_dir/hub.db`).
//!
//! # Schema (version 9, `PRAGMA user_version`)
//!
//! * `batches(agent_id, epoch, seq, readings, created_ms, received_ms)`, primary key
//!   `(agent_id, epoch, seq)`: the dedup key. A batch's readings are inserted in the
//!   same transaction as its `batches` row, so "row present" means "readings present".
//! * `streams(id, name UNIQUE, readings, first_ts_ns, last_ts_ns)`: stream ids plus
//!   running statistics, updated in the ingest transaction so that listing streams never
//!   scans `readings`.
//! * `readings(stream_id, ts_ns, agent_id, epoch, seq, idx, fields)`: `fields` is the
//!   agent's `FieldsBlob`, stored byte for byte. `idx` numbers the readings of a batch
//!   across all its stream chunks, so `(agent_id, epoch, seq, idx)` is unique. The index
//!   on `(stream_id, ts_ns, agent_id, epoch, seq, idx)` is exactly the API's sort order,
//!   so a page is one index range scan.
//! * `losses(agent_id, epoch, stream, reason, total)`: the maximum cumulative total seen.
//! * `lineage(agent_id, epoch, seq, first_idx, last_idx, module, version, sha256)` (v2):
//!   which module build computed which index range of a batch.
//! * `rollups(stream_id, field, minute, count, sum, min, max, last_ts_ns, last)` (v3):
//!   one-minute aggregates of every numeric field, updated from new readings in the
//!   ingest transaction (see `crate::aggregate`); the v3 migration rolls up the readings
//!   already stored.
//! * `agent_rollups(stream_id, agent_id, field, minute, count, sum, min, max)` (v8): the
//!   same per agent, for fleet-level queries; the v8 migration rolls up the readings
//!   already stored, and retention deletes them with the readings.
//! * `agent_streams(agent_id, stream_id, readings, first_ts_ns, last_ts_ns)` (v9): which
//!   streams each agent sent, updated in the ingest transaction like `streams`; the v9
//!   migration counts the readings already stored.
//! * `presence(agent_id, received_ms, status)` (v4): each agent's latest presence message.
//! * `quarantine(id, agent_id, epoch, seq, topic, reason, error, payload, ...)` (v5):
//!   batches acknowledged without being stored, with their raw bytes (`crate::ingest`).
//! * `module_registry`, `deployments`, `deployment_agents`, `desired`, `reports` (v6): the
//!   control plane (`super::fleet`, implemented in `sqlite/fleet.rs`).
//! * `reprocess_jobs`, `reprocess_agents` (v7): re-processing jobs and each agent's
//!   progress on them (`sqlite/fleet.rs`).
//!
//! Epochs are random `u64`s; SQLite integers are `i64`. They are stored with the sign
//! bit flipped ([`epoch_to_sql`]) so that SQLite's integer order is the `u64` order the
//! API promises. Sequence numbers are at most `i64::MAX` (the ingest path rejects larger
//! ones) and are stored as they are.
//!
//! # Concurrency and durability
//!
//! There is one write connection, used only by [`HubStore::ingest`], and a small pool of
//! read connections for the HTTP API. WAL mode lets readers run while a write
//! transaction is open and always see the last committed state. `synchronous=FULL`
//! fsyncs the WAL on every commit, which is what makes "acknowledged" mean "survives a
//! power cut"; group commit (many batches per transaction) pays for that fsync.
//! Migrations run on open, under an immediate (write-locked) transaction.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use brume_protocol::{AgentStatus, Batch, FieldsBlob, StatusExtV2, StatusV1};

mod fleet;

use super::rollup::{AgentBucket, AgentRollupQuery, Agg, RollupDeltas};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use super::{
    AgentSummary, BatchOutcome, HubStore, LineageRange, LossSummary, MAX_QUARANTINE_PAGE, ModuleSummary, NewQuarantine,
    PresenceRecord, QUARANTINE_COLUMNS, QuarantinedBatch, ReadingsPage, ReadingsQuery, StoreError, StoredReading,
    StreamSummary, attach_lineage, decode_presence, lineage_ranges, loss_reason_from_str, module_ref, quarantine_entry,
    storable_text,
};

/// Schema version this build writes and understands.
pub const SCHEMA_VERSION: i64 = 9;

/// One page of a stream's readings after a cursor: `?1` stream id, `?2` exclusive upper
/// bound on `ts_ns`, `?3` row limit, `?4..?8` the cursor. No lower bound on `ts_ns`: the
/// cursor is one, and with a second one SQLite seeks to that instead of to the cursor
/// (a test checks the plan).
const READINGS_AFTER_CURSOR: &str = "SELECT ts_ns, agent_id, epoch, seq, idx, fields FROM readings
    WHERE stream_id = ?1 AND (ts_ns, agent_id, epoch, seq, idx) > (?4, ?5, ?6, ?7, ?8) AND ts_ns < ?2
    ORDER BY ts_ns, agent_id, epoch, seq, idx LIMIT ?3";

/// Idle read connections kept open. More concurrent readers open extra connections
/// that are closed after use; this only bounds what stays open.
const MAX_IDLE_READERS: usize = 4;

/// How long a connection waits for a lock held by another connection before failing.
/// Only migrations and checkpoints contend in practice (WAL readers never block).
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

const SCHEMA_V1: &str = "
CREATE TABLE batches (
    agent_id    TEXT    NOT NULL,
    epoch       INTEGER NOT NULL,
    seq         INTEGER NOT NULL,
    readings    INTEGER NOT NULL,
    created_ms  INTEGER NOT NULL,
    received_ms INTEGER NOT NULL,
    PRIMARY KEY (agent_id, epoch, seq)
) WITHOUT ROWID;
CREATE TABLE streams (
    id          INTEGER PRIMARY KEY,
    name        TEXT    NOT NULL UNIQUE,
    readings    INTEGER NOT NULL DEFAULT 0,
    first_ts_ns INTEGER,
    last_ts_ns  INTEGER
);
CREATE TABLE readings (
    stream_id INTEGER NOT NULL REFERENCES streams(id),
    ts_ns     INTEGER NOT NULL,
    agent_id  TEXT    NOT NULL,
    epoch     INTEGER NOT NULL,
    seq       INTEGER NOT NULL,
    idx       INTEGER NOT NULL,
    fields    BLOB    NOT NULL
);
CREATE INDEX readings_by_stream_time ON readings (stream_id, ts_ns, agent_id, epoch, seq, idx);
CREATE TABLE losses (
    agent_id TEXT    NOT NULL,
    epoch    INTEGER NOT NULL,
    stream   TEXT    NOT NULL,
    reason   TEXT    NOT NULL,
    total    INTEGER NOT NULL,
    PRIMARY KEY (agent_id, epoch, stream, reason)
) WITHOUT ROWID;
";

/// Lineage: which module build computed which readings of a batch (chunks without an
/// entry were ingested as is).
const SCHEMA_V2: &str = "
CREATE TABLE lineage (
    agent_id  TEXT    NOT NULL,
    epoch     INTEGER NOT NULL,
    seq       INTEGER NOT NULL,
    first_idx INTEGER NOT NULL,
    last_idx  INTEGER NOT NULL,
    module    TEXT    NOT NULL,
    version   TEXT    NOT NULL,
    sha256    BLOB    NOT NULL,
    PRIMARY KEY (agent_id, epoch, seq, first_idx)
) WITHOUT ROWID;
";

/// One-minute rollups of numeric fields (see `crate::aggregate`).
const SCHEMA_V3: &str = "
CREATE TABLE rollups (
    stream_id  INTEGER NOT NULL,
    field      TEXT    NOT NULL,
    minute     INTEGER NOT NULL,
    count      INTEGER NOT NULL,
    sum        REAL    NOT NULL,
    min        REAL    NOT NULL,
    max        REAL    NOT NULL,
    last_ts_ns INTEGER NOT NULL,
    last       REAL    NOT NULL,
    PRIMARY KEY (stream_id, field, minute)
) WITHOUT ROWID;
";

/// One-minute rollups per agent, for fleet-level aggregation (see `crate::aggregate`).
/// No `last`: fleet queries combine agents, where "the last value" means nothing.
const SCHEMA_V8: &str = "
CREATE TABLE agent_rollups (
    stream_id  INTEGER NOT NULL,
    field      TEXT    NOT NULL,
    minute     INTEGER NOT NULL,
    agent_id   TEXT    NOT NULL,
    count      INTEGER NOT NULL,
    sum        REAL    NOT NULL,
    min        REAL    NOT NULL,
    max        REAL    NOT NULL,
    PRIMARY KEY (stream_id, field, minute, agent_id)
) WITHOUT ROWID;
";

/// Which streams each agent sent (see `HubStore::agent_streams`).
const SCHEMA_V9: &str = "
CREATE TABLE agent_streams (
    agent_id    TEXT    NOT NULL,
    stream_id   INTEGER NOT NULL,
    readings    INTEGER NOT NULL,
    first_ts_ns INTEGER NOT NULL,
    last_ts_ns  INTEGER NOT NULL,
    PRIMARY KEY (agent_id, stream_id)
) WITHOUT ROWID;
INSERT INTO agent_streams (agent_id, stream_id, readings, first_ts_ns, last_ts_ns)
    SELECT agent_id, stream_id, count(*), min(ts_ns), max(ts_ns) FROM readings GROUP BY agent_id, stream_id;
";

/// Agents' latest presence messages.
const SCHEMA_V4: &str = "
CREATE TABLE presence (
    agent_id    TEXT    NOT NULL PRIMARY KEY,
    received_ms INTEGER NOT NULL,
    status      BLOB    NOT NULL
) WITHOUT ROWID;
";

/// Quarantined batches: raw payloads the hub acknowledged without storing (see
/// `crate::ingest`). Epoch and seq with the sign bit flipped, like `batches.epoch`.
const SCHEMA_V5: &str = "
CREATE TABLE quarantine (
    id                INTEGER PRIMARY KEY,
    agent_id          TEXT    NOT NULL,
    epoch             INTEGER NOT NULL,
    seq               INTEGER NOT NULL,
    topic             TEXT    NOT NULL,
    reason            TEXT    NOT NULL,
    error             TEXT    NOT NULL,
    payload           BLOB    NOT NULL,
    first_received_ms INTEGER NOT NULL,
    last_received_ms  INTEGER NOT NULL,
    deliveries        INTEGER NOT NULL DEFAULT 1,
    UNIQUE (agent_id, epoch, seq)
);
";

/// Merges rollup deltas into `rollups` (see `Agg::merge`: `SET` expressions read the old
/// row, so `last` is compared before `last_ts_ns` changes).
const UPSERT_ROLLUP: &str = "
INSERT INTO rollups (stream_id, field, minute, count, sum, min, max, last_ts_ns, last)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
ON CONFLICT (stream_id, field, minute) DO UPDATE SET
    count = count + excluded.count,
    sum = sum + excluded.sum,
    min = min(min, excluded.min),
    max = max(max, excluded.max),
    last = CASE WHEN excluded.last_ts_ns > last_ts_ns
                  OR (excluded.last_ts_ns = last_ts_ns AND excluded.last > last)
                THEN excluded.last ELSE last END,
    last_ts_ns = max(last_ts_ns, excluded.last_ts_ns)";

/// Merges per-agent rollup deltas into `agent_rollups`.
const UPSERT_AGENT_ROLLUP: &str = "
INSERT INTO agent_rollups (stream_id, field, minute, agent_id, count, sum, min, max)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
ON CONFLICT (stream_id, field, minute, agent_id) DO UPDATE SET
    count = count + excluded.count,
    sum = sum + excluded.sum,
    min = min(min, excluded.min),
    max = max(max, excluded.max)";

/// Writes both kinds of rollup deltas.
fn write_rollups(tx: &rusqlite::Transaction<'_>, deltas: RollupDeltas) -> Result<(), StoreError> {
    let mut up = tx.prepare_cached(UPSERT_ROLLUP).map_err(sql("preparing rollup upsert"))?;
    for ((sid, field, minute), a) in deltas.streams {
        up.execute(params![sid, field, minute, a.count as i64, a.sum, a.min, a.max, a.last_ts_ns, a.last])
            .map_err(sql("upserting rollup"))?;
    }
    if !deltas.agents.is_empty() {
        let mut up = tx.prepare_cached(UPSERT_AGENT_ROLLUP).map_err(sql("preparing agent rollup upsert"))?;
        for ((sid, agent, field, minute), a) in deltas.agents {
            up.execute(params![sid, field, minute, agent, a.count as i64, a.sum, a.min, a.max])
                .map_err(sql("upserting agent rollup"))?;
        }
    }
    Ok(())
}

pub use super::{epoch_from_sql, epoch_to_sql};

fn sql(op: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
    move |source| StoreError::Sqlite { op, source }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves at worst a rolled-back transaction behind
    // (rusqlite rolls back on drop), so the connection is still usable.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The write side: the connection plus a cache of stream ids.
struct Writer {
    conn: Connection,
    /// Stream name → id, for streams known to be committed. Entries created inside a
    /// transaction are added only after it commits, so a rollback cannot leave an id
    /// in the cache that does not exist in the file.
    stream_ids: HashMap<String, i64>,
}

/// SQLite implementation of [`HubStore`].
pub struct SqliteStore {
    path: PathBuf,
    /// The only connection that writes. Only the ingest task calls `ingest`, so this
    /// lock is uncontended; it is what lets the store be shared as `Arc<dyn HubStore>`.
    writer: Mutex<Writer>,
    /// Idle read connections (at most [`MAX_IDLE_READERS`]). The lock is held only to
    /// pop or push a connection, never during a query.
    readers: Mutex<Vec<Connection>>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").field("path", &self.path).finish_non_exhaustive()
    }
}

fn open_conn(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path).map_err(sql("opening the database"))?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(sql("setting busy_timeout"))?;
    // journal_mode is persistent in the file, synchronous is per connection: both are
    // set on every connection so no code path runs with weaker durability.
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0)).map_err(sql("enabling WAL"))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Corrupt(format!("cannot enable WAL journal mode (got {mode})")));
    }
    conn.pragma_update(None, "synchronous", "FULL").map_err(sql("setting synchronous=FULL"))?;
    Ok(conn)
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(sql("starting migration"))?;
    let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(sql("reading user_version"))?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew { found: version, supported: SCHEMA_VERSION });
    }
    if version < 1 {
        tx.execute_batch(SCHEMA_V1).map_err(sql("creating schema v1"))?;
    }
    if version < 2 {
        tx.execute_batch(SCHEMA_V2).map_err(sql("creating schema v2"))?;
    }
    if version < 3 {
        tx.execute_batch(SCHEMA_V3).map_err(sql("creating schema v3"))?;
        // Readings stored before rollups existed, rolled up once.
        let mut deltas = RollupDeltas::default();
        {
            let mut q = tx
                .prepare("SELECT stream_id, ts_ns, fields FROM readings")
                .map_err(sql("reading readings for rollups"))?;
            let mut rows = q.query([]).map_err(sql("reading readings for rollups"))?;
            while let Some(r) = rows.next().map_err(sql("reading readings for rollups"))? {
                let fields = FieldsBlob(r.get(2).map_err(sql("reading readings for rollups"))?);
                let (sid, ts): (i64, i64) = (
                    r.get(0).map_err(sql("reading readings for rollups"))?,
                    r.get(1).map_err(sql("reading readings for rollups"))?,
                );
                deltas.add(sid, ts, &fields)?;
            }
        }
        write_rollups(&tx, deltas)?;
    }
    if version < 4 {
        tx.execute_batch(SCHEMA_V4).map_err(sql("creating schema v4"))?;
    }
    if version < 5 {
        tx.execute_batch(SCHEMA_V5).map_err(sql("creating schema v5"))?;
    }
    if version < 6 {
        tx.execute_batch(fleet::SCHEMA_V6).map_err(sql("creating schema v6"))?;
    }
    if version < 7 {
        tx.execute_batch(fleet::SCHEMA_V7).map_err(sql("creating schema v7"))?;
    }
    if version < 8 {
        tx.execute_batch(SCHEMA_V8).map_err(sql("creating schema v8"))?;
        // Readings stored before per-agent rollups existed, rolled up once.
        let mut deltas = RollupDeltas::default();
        {
            let op = "reading readings for agent rollups";
            let mut q = tx.prepare("SELECT stream_id, agent_id, ts_ns, fields FROM readings").map_err(sql(op))?;
            let mut rows = q.query([]).map_err(sql(op))?;
            while let Some(r) = rows.next().map_err(sql(op))? {
                let fields = FieldsBlob(r.get(3).map_err(sql(op))?);
                let agent: String = r.get(1).map_err(sql(op))?;
                deltas.add_for_agent(r.get(0).map_err(sql(op))?, &agent, r.get(2).map_err(sql(op))?, &fields)?;
            }
        }
        write_rollups(&tx, deltas)?;
    }
    if version < 9 {
        tx.execute_batch(SCHEMA_V9).map_err(sql("creating schema v9"))?;
    }
    // Later versions add `if version < N { ... }` steps here, in order.
    tx.pragma_update(None, "user_version", SCHEMA_VERSION).map_err(sql("writing user_version"))?;
    tx.commit().map_err(sql("committing migration"))
}

impl SqliteStore {
    /// Opens (creating if needed) `data_dir/hub.db` and applies migrations.
    pub fn open(data_dir: &Path) -> Result<SqliteStore, StoreError> {
        std::fs::create_dir_all(data_dir)
            .map_err(|source| StoreError::CreateDir { path: data_dir.to_owned(), source })?;
        let path = data_dir.join("hub.db");
        let mut conn = open_conn(&path)?;
        migrate(&mut conn)?;
        let stream_ids = {
            let mut stmt = conn.prepare("SELECT name, id FROM streams").map_err(sql("loading streams"))?;
            stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .and_then(|rows| rows.collect::<Result<HashMap<String, i64>, _>>())
                .map_err(sql("loading streams"))?
        };
        Ok(SqliteStore { path, writer: Mutex::new(Writer { conn, stream_ids }), readers: Mutex::new(Vec::new()) })
    }

    /// Path of the database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on a pooled read connection.
    fn with_reader<T>(&self, f: impl FnOnce(&Connection) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let conn = lock(&self.readers).pop();
        let conn = match conn {
            Some(c) => c,
            None => open_conn(&self.path)?,
        };
        let result = f(&conn);
        let mut idle = lock(&self.readers);
        if idle.len() < MAX_IDLE_READERS {
            idle.push(conn);
        }
        result
    }
}

/// Per-stream statistics accumulated over one ingest transaction, written once per
/// stream at the end instead of once per reading.
#[derive(Default)]
struct StreamDelta {
    readings: i64,
    first_ts_ns: i64,
    last_ts_ns: i64,
}

fn ingest_tx(
    tx: &rusqlite::Transaction<'_>,
    known: &HashMap<String, i64>,
    created: &mut HashMap<String, i64>,
    batches: &[Batch],
    received_ms: i64,
) -> Result<Vec<BatchOutcome>, StoreError> {
    let mut insert_batch = tx
        .prepare_cached(
            "INSERT INTO batches (agent_id, epoch, seq, readings, created_ms, received_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT DO NOTHING",
        )
        .map_err(sql("preparing batch insert"))?;
    let mut insert_reading = tx
        .prepare_cached(
            "INSERT INTO readings (stream_id, ts_ns, agent_id, epoch, seq, idx, fields)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )
        .map_err(sql("preparing reading insert"))?;
    let mut upsert_loss = tx
        .prepare_cached(
            "INSERT INTO losses (agent_id, epoch, stream, reason, total) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (agent_id, epoch, stream, reason) DO UPDATE SET total = max(total, excluded.total)",
        )
        .map_err(sql("preparing loss upsert"))?;
    let mut insert_lineage = tx
        .prepare_cached(
            "INSERT INTO lineage (agent_id, epoch, seq, first_idx, last_idx, module, version, sha256)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )
        .map_err(sql("preparing lineage insert"))?;

    let mut deltas: HashMap<i64, StreamDelta> = HashMap::new();
    // Per (agent, stream), in key order: the order rows are written.
    let mut agent_deltas: std::collections::BTreeMap<(&str, i64), StreamDelta> = Default::default();
    let mut rollups = RollupDeltas::default();
    let mut outcomes = Vec::with_capacity(batches.len());
    for b in batches {
        let epoch = epoch_to_sql(b.epoch);
        let seq = i64::try_from(b.seq).map_err(|_| StoreError::Corrupt(format!("seq {} exceeds i64", b.seq)))?;
        // ON CONFLICT DO NOTHING: zero changed rows means this (agent, epoch, seq) is
        // already committed, by an earlier transaction or earlier in this one.
        let inserted = insert_batch
            .execute(params![b.agent_id, epoch, seq, b.reading_count() as i64, b.created_ms, received_ms])
            .map_err(sql("inserting batch"))?;
        if inserted == 1 {
            let mut idx: i64 = 0;
            for chunk in &b.streams {
                if chunk.points.is_empty() {
                    continue;
                }
                let stream_id = stream_id(tx, known, created, &chunk.stream)?;
                let delta = deltas.entry(stream_id).or_insert(StreamDelta {
                    readings: 0,
                    first_ts_ns: i64::MAX,
                    last_ts_ns: i64::MIN,
                });
                let by_agent = agent_deltas.entry((b.agent_id.as_str(), stream_id)).or_insert(StreamDelta {
                    readings: 0,
                    first_ts_ns: i64::MAX,
                    last_ts_ns: i64::MIN,
                });
                by_agent.readings += chunk.points.len() as i64;
                by_agent.first_ts_ns = chunk.points.iter().map(|p| p.ts_ns).fold(by_agent.first_ts_ns, i64::min);
                by_agent.last_ts_ns = chunk.points.iter().map(|p| p.ts_ns).fold(by_agent.last_ts_ns, i64::max);
                for p in &chunk.points {
                    insert_reading
                        .execute(params![stream_id, p.ts_ns, b.agent_id, epoch, seq, idx, p.fields.0])
                        .map_err(sql("inserting reading"))?;
                    idx += 1;
                    rollups.add_both(stream_id, &b.agent_id, p.ts_ns, &p.fields)?;
                    delta.readings += 1;
                    delta.first_ts_ns = delta.first_ts_ns.min(p.ts_ns);
                    delta.last_ts_ns = delta.last_ts_ns.max(p.ts_ns);
                }
            }
            for l in lineage_ranges(b) {
                insert_lineage
                    .execute(params![
                        b.agent_id,
                        epoch,
                        seq,
                        l.first_idx,
                        l.last_idx,
                        l.module.name,
                        l.module.version,
                        &l.module.sha256[..]
                    ])
                    .map_err(sql("inserting lineage"))?;
            }
            outcomes.push(BatchOutcome::Stored);
        } else {
            outcomes.push(BatchOutcome::Duplicate);
        }
        // Loss counters are cumulative, so a re-sent batch may carry newer totals than
        // the stored one: apply them for duplicates too. max() makes this idempotent.
        for l in &b.losses {
            let total = i64::try_from(l.total).unwrap_or(i64::MAX);
            upsert_loss
                .execute(params![b.agent_id, epoch, l.stream, l.reason.as_str(), total])
                .map_err(sql("upserting loss report"))?;
        }
    }
    let mut update_stream = tx
        .prepare_cached(
            "UPDATE streams SET readings = readings + ?2,
                first_ts_ns = min(coalesce(first_ts_ns, ?3), ?3),
                last_ts_ns = max(coalesce(last_ts_ns, ?4), ?4)
             WHERE id = ?1",
        )
        .map_err(sql("preparing stream statistics update"))?;
    for (id, d) in deltas {
        update_stream
            .execute(params![id, d.readings, d.first_ts_ns, d.last_ts_ns])
            .map_err(sql("updating stream statistics"))?;
    }
    let mut update_agent_stream = tx
        .prepare_cached(
            "INSERT INTO agent_streams (agent_id, stream_id, readings, first_ts_ns, last_ts_ns)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (agent_id, stream_id) DO UPDATE SET readings = readings + excluded.readings,
                first_ts_ns = min(first_ts_ns, excluded.first_ts_ns),
                last_ts_ns = max(last_ts_ns, excluded.last_ts_ns)",
        )
        .map_err(sql("preparing agent stream update"))?;
    for ((agent, id), d) in agent_deltas {
        update_agent_stream
            .execute(params![agent, id, d.readings, d.first_ts_ns, d.last_ts_ns])
            .map_err(sql("updating agent streams"))?;
    }
    write_rollups(tx, rollups)?;
    Ok(outcomes)
}

/// Looks up or creates a stream id inside the ingest transaction. `known` holds
/// committed ids; ids created in this transaction go to `created` until commit.
fn stream_id(
    tx: &rusqlite::Transaction<'_>,
    known: &HashMap<String, i64>,
    created: &mut HashMap<String, i64>,
    name: &str,
) -> Result<i64, StoreError> {
    if let Some(&id) = known.get(name).or_else(|| created.get(name)) {
        return Ok(id);
    }
    // The write transaction is IMMEDIATE and this is the only writer, so nobody can
    // insert the name between this SELECT and the INSERT.
    let existing: Option<i64> = tx
        .prepare_cached("SELECT id FROM streams WHERE name = ?1")
        .and_then(|mut s| s.query_row([name], |r| r.get(0)).optional())
        .map_err(sql("looking up stream"))?;
    let id = match existing {
        Some(id) => id,
        None => {
            tx.prepare_cached("INSERT INTO streams (name) VALUES (?1)")
                .and_then(|mut s| s.execute([name]))
                .map_err(sql("creating stream"))?;
            tx.last_insert_rowid()
        }
    };
    created.insert(name.to_owned(), id);
    Ok(id)
}

impl HubStore for SqliteStore {
    fn ingest(&self, batches: &[Batch], received_ms: i64) -> Result<Vec<BatchOutcome>, StoreError> {
        let mut guard = lock(&self.writer);
        let Writer { conn, stream_ids } = &mut *guard;
        // IMMEDIATE takes the write lock up front, so the transaction cannot fail
        // half-way with SQLITE_BUSY when upgrading from a read lock.
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(sql("starting transaction"))?;
        let mut created = HashMap::new();
        // On error the transaction is dropped, which rolls it back, and `created` (ids
        // that no longer exist) is discarded with it.
        let outcomes = ingest_tx(&tx, stream_ids, &mut created, batches, received_ms)?;
        tx.commit().map_err(sql("committing transaction"))?;
        stream_ids.extend(created);
        Ok(outcomes)
    }

    fn streams(&self) -> Result<Vec<StreamSummary>, StoreError> {
        self.with_reader(|conn| {
            let mut stmt = conn
                .prepare_cached("SELECT name, readings, first_ts_ns, last_ts_ns FROM streams ORDER BY name")
                .map_err(sql("listing streams"))?;
            let rows = stmt
                .query_map([], |r| {
                    Ok(StreamSummary {
                        stream: r.get(0)?,
                        readings: r.get::<_, i64>(1)?.max(0) as u64,
                        first_ts_ns: r.get(2)?,
                        last_ts_ns: r.get(3)?,
                    })
                })
                .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
                .map_err(sql("listing streams"))?;
            Ok(rows)
        })
    }

    fn agent_streams(&self, agent_id: &str) -> Result<Vec<StreamSummary>, StoreError> {
        self.with_reader(|conn| {
            conn.prepare_cached(
                "SELECT s.name, a.readings, a.first_ts_ns, a.last_ts_ns
                 FROM agent_streams a JOIN streams s ON s.id = a.stream_id
                 WHERE a.agent_id = ?1 ORDER BY s.name",
            )
            .and_then(|mut st| {
                st.query_map([agent_id], |r| {
                    Ok(StreamSummary {
                        stream: r.get(0)?,
                        readings: r.get::<_, i64>(1)?.max(0) as u64,
                        first_ts_ns: r.get(2)?,
                        last_ts_ns: r.get(3)?,
                    })
                })?
                .collect::<Result<Vec<_>, _>>()
            })
            .map_err(sql("listing an agent's streams"))
        })
    }

    fn readings(&self, q: &ReadingsQuery) -> Result<ReadingsPage, StoreError> {
        self.with_reader(|conn| {
            let stream_id: Option<i64> = conn
                .prepare_cached("SELECT id FROM streams WHERE name = ?1")
                .and_then(|mut s| s.query_row([&q.stream], |r| r.get(0)).optional())
                .map_err(sql("looking up stream"))?;
            let Some(stream_id) = stream_id else {
                return Ok(ReadingsPage { readings: Vec::new(), next: None });
            };
            let from = q.from.unwrap_or(i64::MIN);
            let to = q.to.unwrap_or(i64::MAX);
            // One row more than asked tells whether another page exists without a COUNT.
            let fetch = q.limit.saturating_add(1) as i64;
            let map_row = |r: &rusqlite::Row<'_>| {
                Ok(StoredReading {
                    ts_ns: r.get(0)?,
                    agent_id: r.get(1)?,
                    epoch: epoch_from_sql(r.get(2)?),
                    seq: r.get::<_, i64>(3)? as u64,
                    idx: r.get::<_, i64>(4)? as u32,
                    fields: FieldsBlob(r.get(5)?),
                    module: None,
                })
            };
            // A cursor before `from` is no cursor at all. A cursor at or after `from`
            // implies `ts_ns >= from`, and that bound is left out of the cursor query on
            // purpose: with it, SQLite's planner seeks to `from` and filters the row value
            // (every page scanning all rows before it: quadratic paging); without it, it
            // seeks straight to the cursor on the index (keyset paging).
            let after = q.after.as_ref().filter(|c| c.ts_ns >= from);
            let mut rows: Vec<StoredReading> = match after {
                None => conn
                    .prepare_cached(
                        "SELECT ts_ns, agent_id, epoch, seq, idx, fields FROM readings
                         WHERE stream_id = ?1 AND ts_ns >= ?2 AND ts_ns < ?3
                         ORDER BY ts_ns, agent_id, epoch, seq, idx LIMIT ?4",
                    )
                    .and_then(|mut s| {
                        s.query_map(params![stream_id, from, to, fetch], map_row)?.collect::<Result<Vec<_>, _>>()
                    }),
                Some(c) => conn.prepare_cached(READINGS_AFTER_CURSOR).and_then(|mut s| {
                    let seq = i64::try_from(c.seq).unwrap_or(i64::MAX);
                    s.query_map(
                        params![stream_id, to, fetch, c.ts_ns, c.agent_id, epoch_to_sql(c.epoch), seq, c.idx],
                        map_row,
                    )?
                    .collect::<Result<Vec<_>, _>>()
                }),
            }
            .map_err(sql("querying readings"))?;
            let next = if rows.len() > q.limit {
                rows.truncate(q.limit);
                rows.last().map(StoredReading::cursor)
            } else {
                None
            };
            let mut lineage = conn
                .prepare_cached(
                    "SELECT first_idx, last_idx, module, version, sha256 FROM lineage
                     WHERE agent_id = ?1 AND epoch = ?2 AND seq = ?3",
                )
                .map_err(sql("looking up lineage"))?;
            attach_lineage(&mut rows, |agent, epoch, seq| {
                lineage
                    .query_map(params![agent, epoch_to_sql(epoch), seq as i64], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get::<_, Vec<u8>>(4)?))
                    })
                    .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
                    .map_err(sql("looking up lineage"))?
                    .into_iter()
                    .map(|(first_idx, last_idx, name, version, sha)| {
                        Ok(LineageRange { first_idx, last_idx, module: module_ref(name, version, &sha)? })
                    })
                    .collect()
            })?;
            Ok(ReadingsPage { readings: rows, next })
        })
    }

    fn agents(&self) -> Result<Vec<AgentSummary>, StoreError> {
        self.with_reader(|conn| {
            // One consistent snapshot for the three queries below: WAL readers see the
            // state as of the start of the read transaction.
            conn.execute_batch("BEGIN").map_err(sql("starting read transaction"))?;
            let result = agents_in_snapshot(conn);
            // Ending a read-only transaction cannot lose data; ignore a failure here so
            // it does not hide the query's own error.
            let _ = conn.execute_batch("COMMIT");
            result
        })
    }

    fn modules(&self) -> Result<Vec<ModuleSummary>, StoreError> {
        self.with_reader(|conn| {
            conn.prepare_cached(
                "SELECT module, version, sha256, count(DISTINCT agent_id), sum(last_idx - first_idx + 1)
                 FROM lineage GROUP BY module, version, sha256 ORDER BY module, version, sha256",
            )
            .and_then(|mut s| {
                s.query_map([], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get::<_, Vec<u8>>(2)?, r.get::<_, i64>(3)?, r.get::<_, i64>(4)?))
                })?
                .collect::<Result<Vec<_>, _>>()
            })
            .map_err(sql("listing modules"))?
            .into_iter()
            .map(|(name, version, sha, agents, readings)| {
                Ok(ModuleSummary {
                    module: module_ref(name, version, &sha)?,
                    agents: agents.max(0) as u64,
                    readings: readings.max(0) as u64,
                })
            })
            .collect()
        })
    }

    fn record_presence(&self, status: &StatusV1, ext: &StatusExtV2, received_ms: i64) -> Result<(), StoreError> {
        let blob = AgentStatus::V2(status.clone(), ext.clone()).encode();
        let guard = lock(&self.writer);
        guard
            .conn
            .prepare_cached(
                "INSERT INTO presence (agent_id, received_ms, status) VALUES (?1, ?2, ?3)
                 ON CONFLICT (agent_id) DO UPDATE SET received_ms = excluded.received_ms, status = excluded.status",
            )
            .and_then(|mut st| st.execute(params![status.agent_id, received_ms, blob]))
            .map_err(sql("recording presence"))?;
        Ok(())
    }

    fn presence(&self) -> Result<Vec<PresenceRecord>, StoreError> {
        self.with_reader(|conn| {
            conn.prepare_cached("SELECT status, received_ms FROM presence ORDER BY agent_id")
                .and_then(|mut st| {
                    st.query_map([], |r| Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, i64>(1)?)))?
                        .collect::<Result<Vec<_>, _>>()
                })
                .map_err(sql("listing presence"))?
                .into_iter()
                .map(|(blob, at)| decode_presence(&blob, at))
                .collect()
        })
    }

    fn drop_days_before(&self, ts_ns: i64) -> Result<u64, StoreError> {
        const DAY_NS: i64 = 86_400 * 1_000_000_000;
        let cutoff = ts_ns.saturating_sub(ts_ns.rem_euclid(DAY_NS));
        let mut guard = lock(&self.writer);
        let tx =
            guard.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(sql("starting retention"))?;
        let mut total = 0u64;
        {
            let ids: Vec<i64> = tx
                .prepare("SELECT id FROM streams")
                .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect::<Result<_, _>>())
                .map_err(sql("listing streams"))?;
            // Per stream, so each delete is a range of the (stream_id, ts_ns) index.
            let mut delete = tx
                .prepare("DELETE FROM readings WHERE stream_id = ?1 AND ts_ns < ?2")
                .map_err(sql("preparing retention delete"))?;
            let mut update = tx
                .prepare(
                    "UPDATE streams SET readings = readings - ?2,
                        first_ts_ns = (SELECT min(ts_ns) FROM readings WHERE stream_id = ?1),
                        last_ts_ns = CASE WHEN readings - ?2 > 0 THEN last_ts_ns END
                     WHERE id = ?1",
                )
                .map_err(sql("preparing stream statistics update"))?;
            let mut delete_rollups = tx
                .prepare("DELETE FROM agent_rollups WHERE stream_id = ?1 AND minute < ?2")
                .map_err(sql("preparing agent rollup retention"))?;
            for id in ids {
                delete_rollups.execute(params![id, cutoff]).map_err(sql("deleting old agent rollups"))?;
                let n = delete.execute(params![id, cutoff]).map_err(sql("deleting old readings"))?;
                if n > 0 {
                    update.execute(params![id, n as i64]).map_err(sql("updating stream statistics"))?;
                    total += n as u64;
                }
            }
        }
        tx.commit().map_err(sql("committing retention"))?;
        Ok(total)
    }

    fn quarantine(&self, q: &NewQuarantine<'_>) -> Result<i64, StoreError> {
        let guard = lock(&self.writer);
        guard
            .conn
            .prepare_cached(
                "INSERT INTO quarantine (agent_id, epoch, seq, topic, reason, error, payload, first_received_ms, last_received_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8)
                 ON CONFLICT (agent_id, epoch, seq) DO UPDATE SET
                     error = excluded.error, reason = excluded.reason,
                     last_received_ms = excluded.last_received_ms, deliveries = deliveries + 1
                 RETURNING id",
            )
            .and_then(|mut st| {
                st.query_row(
                    params![
                        q.agent_id,
                        epoch_to_sql(q.epoch),
                        epoch_to_sql(q.seq),
                        q.topic,
                        q.reason.as_str(),
                        storable_text(q.error),
                        q.payload,
                        q.received_ms
                    ],
                    |r| r.get(0),
                )
            })
            .map_err(sql("quarantining a batch"))
    }

    fn quarantine_id(&self, agent_id: &str, epoch: u64, seq: u64) -> Result<Option<i64>, StoreError> {
        self.with_reader(|conn| {
            conn.prepare_cached("SELECT id FROM quarantine WHERE agent_id = ?1 AND epoch = ?2 AND seq = ?3")
                .and_then(|mut st| {
                    st.query_row(params![agent_id, epoch_to_sql(epoch), epoch_to_sql(seq)], |r| r.get(0)).optional()
                })
                .map_err(sql("looking up quarantine"))
        })
    }

    fn quarantined(&self, after: i64, limit: usize) -> Result<Vec<QuarantinedBatch>, StoreError> {
        self.with_reader(|conn| {
            let mut st = conn
                .prepare_cached(&format!(
                    "SELECT {QUARANTINE_COLUMNS} FROM quarantine WHERE id > ?1 ORDER BY id LIMIT ?2"
                ))
                .map_err(sql("listing quarantine"))?;
            let rows = st
                .query_map(params![after, limit.min(MAX_QUARANTINE_PAGE) as i64], quarantine_row)
                .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
                .map_err(sql("listing quarantine"))?;
            rows.into_iter().collect()
        })
    }

    fn quarantined_payload(&self, id: i64) -> Result<Option<(QuarantinedBatch, Vec<u8>)>, StoreError> {
        self.with_reader(|conn| {
            let row = conn
                .prepare_cached(&format!("SELECT {QUARANTINE_COLUMNS}, payload FROM quarantine WHERE id = ?1"))
                .and_then(|mut st| {
                    st.query_row([id], |r| Ok((quarantine_row(r)?, r.get::<_, Vec<u8>>(11)?))).optional()
                })
                .map_err(sql("reading quarantine"))?;
            row.map(|(entry, payload)| Ok((entry?, payload))).transpose()
        })
    }

    fn release_quarantined(&self, id: i64) -> Result<bool, StoreError> {
        let guard = lock(&self.writer);
        let n = guard
            .conn
            .prepare_cached("DELETE FROM quarantine WHERE id = ?1")
            .and_then(|mut st| st.execute([id]))
            .map_err(sql("releasing quarantine"))?;
        Ok(n == 1)
    }

    fn ping(&self) -> Result<(), StoreError> {
        self.with_reader(|conn| conn.query_row("SELECT count(*) FROM streams", [], |_| Ok(())).map_err(sql("ping")))
    }

    fn agent_rollups(&self, q: &AgentRollupQuery) -> Result<Vec<AgentBucket>, StoreError> {
        // The agent filter is a JSON array, so one prepared statement serves any number of
        // agents (SQLite has no array parameters).
        let agents = q.agents.as_ref().map(|a| serde_json::to_string(a).expect("strings serialize"));
        self.with_reader(|conn| {
            conn.prepare_cached(
                "SELECT r.minute - ((r.minute - ?4) % ?6) AS bucket, r.agent_id,
                        sum(r.count), sum(r.sum), min(r.min), max(r.max)
                 FROM agent_rollups r JOIN streams s ON s.id = r.stream_id
                 WHERE s.name = ?1 AND r.field = ?2 AND r.minute >= ?4 AND r.minute < ?5
                   AND (?3 IS NULL OR r.agent_id IN (SELECT value FROM json_each(?3)))
                 GROUP BY bucket, r.agent_id
                 ORDER BY bucket, r.agent_id
                 LIMIT ?7",
            )
            .and_then(|mut st| {
                st.query_map(
                    params![q.stream, q.field, agents, q.from, q.to, q.step, (q.max_rows as i64).saturating_add(1)],
                    |r| {
                        Ok(AgentBucket {
                            start: r.get(0)?,
                            agent_id: r.get(1)?,
                            count: r.get::<_, i64>(2)?.max(0) as u64,
                            sum: r.get(3)?,
                            min: r.get(4)?,
                            max: r.get(5)?,
                        })
                    },
                )?
                .collect::<Result<Vec<_>, _>>()
            })
            .map_err(sql("reading agent rollups"))
        })
    }

    fn rollups(&self, stream: &str, field: &str, from: i64, to: i64) -> Result<Vec<(i64, Agg)>, StoreError> {
        self.with_reader(|conn| {
            conn.prepare_cached(
                "SELECT r.minute, r.count, r.sum, r.min, r.max, r.last_ts_ns, r.last
                 FROM rollups r JOIN streams s ON s.id = r.stream_id
                 WHERE s.name = ?1 AND r.field = ?2 AND r.minute >= ?3 AND r.minute < ?4
                 ORDER BY r.minute",
            )
            .and_then(|mut st| {
                st.query_map(params![stream, field, from, to], |r| {
                    Ok((
                        r.get(0)?,
                        Agg {
                            count: r.get::<_, i64>(1)?.max(0) as u64,
                            sum: r.get(2)?,
                            min: r.get(3)?,
                            max: r.get(4)?,
                            last_ts_ns: r.get(5)?,
                            last: r.get(6)?,
                        },
                    ))
                })?
                .collect::<Result<Vec<_>, _>>()
            })
            .map_err(sql("reading rollups"))
        })
    }
}

/// A row of [`QUARANTINE_COLUMNS`]; the inner `Result` is a stored value that does not parse.
fn quarantine_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<QuarantinedBatch, StoreError>> {
    Ok(quarantine_entry(
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        &r.get::<_, String>(5)?,
        r.get(6)?,
        r.get(7)?,
        r.get(8)?,
        r.get(9)?,
        r.get(10)?,
    ))
}

fn agents_in_snapshot(conn: &Connection) -> Result<Vec<AgentSummary>, StoreError> {
    let mut out: Vec<AgentSummary> = conn
        .prepare_cached(
            "SELECT agent_id, epoch, count(*), sum(readings), max(seq), max(received_ms)
             FROM batches GROUP BY agent_id, epoch",
        )
        .and_then(|mut s| {
            s.query_map([], |r| {
                Ok(AgentSummary {
                    agent_id: r.get(0)?,
                    epoch: epoch_from_sql(r.get(1)?),
                    batches: r.get::<_, i64>(2)? as u64,
                    readings: r.get::<_, i64>(3)? as u64,
                    watermark: 0,
                    max_seq: r.get::<_, i64>(4)? as u64,
                    missing: Vec::new(),
                    missing_since_ms: Vec::new(),
                    losses: Vec::new(),
                    last_seen_ms: r.get(5)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()
        })
        .map_err(sql("summarising batches"))?;
    out.sort_by(|a, b| (&a.agent_id, a.epoch).cmp(&(&b.agent_id, b.epoch)));
    let pos: HashMap<(String, u64), usize> =
        out.iter().enumerate().map(|(i, a)| ((a.agent_id.clone(), a.epoch), i)).collect();

    // Gaps: each stored seq whose predecessor (in seq order) is not seq-1 ends a gap.
    // The window function does this in one pass over the primary key, without
    // shipping every seq to Rust. LAG's default 0 makes a missing seq 1 a gap too.
    let mut stmt = conn
        .prepare_cached(
            "SELECT agent_id, epoch, prev + 1, seq - 1, received_ms FROM (
                 SELECT agent_id, epoch, seq, received_ms,
                        lag(seq, 1, 0) OVER (PARTITION BY agent_id, epoch ORDER BY seq) AS prev
                 FROM batches)
             WHERE seq > prev + 1 ORDER BY agent_id, epoch, seq",
        )
        .map_err(sql("computing gaps"))?;
    let mut rows = stmt.query([]).map_err(sql("computing gaps"))?;
    while let Some(r) = rows.next().map_err(sql("computing gaps"))? {
        let key: (String, u64) =
            (r.get(0).map_err(sql("computing gaps"))?, epoch_from_sql(r.get(1).map_err(sql("computing gaps"))?));
        let lo: i64 = r.get(2).map_err(sql("computing gaps"))?;
        let hi: i64 = r.get(3).map_err(sql("computing gaps"))?;
        let since: i64 = r.get(4).map_err(sql("computing gaps"))?;
        super::add_gap(&mut out, &pos, &key, (lo, hi), since);
    }
    super::set_watermarks(&mut out);

    let mut stmt = conn
        .prepare_cached(
            "SELECT agent_id, epoch, stream, reason, total FROM losses ORDER BY agent_id, epoch, stream, reason",
        )
        .map_err(sql("listing losses"))?;
    let mut rows = stmt.query([]).map_err(sql("listing losses"))?;
    while let Some(r) = rows.next().map_err(sql("listing losses"))? {
        let agent: String = r.get(0).map_err(sql("listing losses"))?;
        let epoch = epoch_from_sql(r.get(1).map_err(sql("listing losses"))?);
        let stream: String = r.get(2).map_err(sql("listing losses"))?;
        let reason: String = r.get(3).map_err(sql("listing losses"))?;
        let total: i64 = r.get(4).map_err(sql("listing losses"))?;
        if let Some(&i) = pos.get(&(agent, epoch)) {
            out[i].losses.push(LossSummary {
                stream,
                reason: loss_reason_from_str(&reason)?,
                total: total.max(0) as u64,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
