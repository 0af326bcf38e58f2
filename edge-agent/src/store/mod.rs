//! The agent's durable store: readings, the outbox and loss counters in one SQLite file.
//!
//! Start with [`Store::apply`], the single entry point for writes. It is called by exactly
//! one thread (see [`writer`]), which gives *group commit*: everything that queued up
//! while the previous transaction was being fsynced goes into the next one.
//!
//! # On-disk format (`agent.db`, WAL mode)
//!
//! * `readings(id, stream_id, ts_ns, fields)`: every reading, `id` assigned by the writer
//!   from a counter that never goes backwards (also after deletes), so ids are a total
//!   ingest order. `fields` is the protocol's fields blob, stored as it will be sent.
//! * `outbox(seq, first_id, last_id, ..., acked)`: a batch is a *range of reading ids*,
//!   not a copy of them. Cutting a batch writes one small row; the batch's bytes are read
//!   back from `readings` when it is sent. Readings deleted by retention meanwhile are
//!   simply absent from the (re)sent batch and counted as lost. An acknowledged row is
//!   deleted, except the newest, which stays marked `acked = 1` until a newer one exists,
//!   so the outbox alone tells the next sequence number.
//! * `meta`: the store epoch (random, chosen at creation), and, as of the last flush of
//!   the derived state, the next batch sequence number, the next reading id,
//!   `batched_upto` (every reading id ≤ it belongs to a batch) and `derived_upto`.
//! * `streams(id, name, bytes, count, forward)` (`forward` mirrors the stream's rule) and `losses(stream_id, reason, total)`.
//! * `mqtt_sessions(client_id, last_seen_ms)` and `mqtt_pkids(client_id, pkid, qos, digest,
//!   ord)` (v3): persistent MQTT sessions of sensors and the packet identifiers of their
//!   committed PUBLISHes, written in the same transaction as the readings, so a sensor's
//!   re-send after a crash is recognised ([`sessions`]).
//! * `stream_buckets(bucket, stream_id, first_id, last_id, min_ts, max_ts, count)`: the
//!   per-stream directory. Reading ids are grouped in buckets of [`BUCKET_IDS`]; for every
//!   bucket and stream with readings in it, one row says where they are and which times
//!   they cover. Per-stream work (retention, budgets, time-range reads) finds its rows
//!   through it and then scans that id range of `readings`.
//!
//! # Derived state: written every [`DERIVED_FLUSH_READINGS`], replayed on open
//!
//! Stream counters, the directory and the counters in `meta` follow from `readings` and
//! `outbox`. Writing them in every commit cost three extra 4 KiB pages per commit, most of
//! what an ordinary commit wrote at sensor rates (issue 16). They are kept in memory and
//! written ("flushed") together with `meta.derived_upto` every [`DERIVED_FLUSH_READINGS`]
//! readings, in any transaction that deletes readings (replay only adds), and at the start
//! of a retention run. On open, the readings after `derived_upto` are replayed into them
//! (at most that many rows), `next_seq`/`batched_upto` are raised to what the outbox
//! holds and `next_id` past the largest reading id. Readers ([`StoreReader::readings`],
//! [`StoreReader::last_n`]) scan the directory and then the id range after
//! `derived_upto`, in one read transaction.
//!
//! # Why a bucket directory instead of an index on `(stream_id, ts_ns)`
//!
//! Readings of many streams arrive interleaved. An index on `(stream_id, ts_ns)` takes
//! every commit's rows at one place *per stream*, so a commit of 1,000 readings over 100
//! streams dirties ~100 index pages for ~30 KB of data, and ingest ran 8x slower than
//! plain appends (see BENCHMARKS.md). The directory's primary key starts with the bucket,
//! so all of a commit's directory updates land in the last page or two, and `readings`
//! itself is append-only by rowid: a commit writes about what raw appends write.
//!
//! # Invariants
//!
//! * A reading is acknowledged to its sender only after the transaction holding it has
//!   committed (with `durability = full`, after the WAL fsync).
//! * A batch row is deleted only when the hub acknowledges its sequence number.
//! * Sequence numbers are contiguous and never reused within an epoch; batches cover
//!   increasing, disjoint id ranges, so per-stream order equals sequence order.
//! * A reading deleted before the hub acknowledged it (not yet batched, or inside an
//!   unacknowledged batch) is counted in `losses` exactly once.
//! * In-memory mirrors (stream counters, the outbox index, the counters in `meta`, the
//!   directory rows not yet flushed) are rebuilt from the database whenever a transaction
//!   fails, so they never describe uncommitted state.
//! * Every reading id > `meta.derived_upto` is absent from the stored counters and
//!   directory; every id ≤ it is in them.

mod reader;
mod retention;
mod schema;
pub mod sessions;
pub mod window;
pub mod writer;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use brume_protocol::{LossReason, Reading};
use rusqlite::{Connection, OptionalExtension, params};

use crate::config::{Config, Durability, StreamRuleBody, StreamRules, WhenFull};
pub use reader::{StoreReader, StoredReading, TimedFields};
use schema::{migrate, open_conn};
pub use sessions::{PublishId, SessionOp};

/// Estimated on-disk cost of one reading beyond its fields blob (row header, id, stream
/// id, timestamp, index entry). Budgets are enforced on `fields.len() + ROW_OVERHEAD`.
pub const ROW_OVERHEAD: u64 = 40;

/// Reading ids per directory bucket. Per-stream scans read at most this many rows of
/// other streams per bucket they visit; a new bucket adds one directory entry per stream.
#[cfg(not(test))]
pub const BUCKET_IDS: i64 = 16_384;
/// Small in unit tests, so that they cross many bucket boundaries.
#[cfg(test)]
pub const BUCKET_IDS: i64 = 64;

/// Readings committed between two writes of the derived state (stream counters, the
/// bucket directory and the counters in `meta`). Between them that state lives in memory
/// and is rebuilt on open from the readings after `meta.derived_upto`, so an ordinary
/// commit writes the readings' pages and nothing else.
#[cfg(not(test))]
pub const DERIVED_FLUSH_READINGS: i64 = 16_384;
/// Small in unit tests, so that they cross many flushes.
#[cfg(test)]
pub const DERIVED_FLUSH_READINGS: i64 = 100;

fn bucket_of(id: i64) -> i64 {
    id / BUCKET_IDS
}

/// Per (bucket, stream) aggregate of the readings inserted or deleted in a transaction.
#[derive(Debug, Clone, Copy)]
struct BucketDelta {
    first_id: i64,
    last_id: i64,
    min_ts: i64,
    max_ts: i64,
    count: i64,
}

impl BucketDelta {
    fn new(id: i64, ts: i64) -> Self {
        BucketDelta { first_id: id, last_id: id, min_ts: ts, max_ts: ts, count: 0 }
    }

    fn add(&mut self, id: i64, ts: i64) {
        self.first_id = self.first_id.min(id);
        self.last_id = self.last_id.max(id);
        self.min_ts = self.min_ts.min(ts);
        self.max_ts = self.max_ts.max(ts);
        self.count += 1;
    }
}

/// Adds one reading to the per-(bucket, stream) aggregates.
fn add_to_buckets(buckets: &mut HashMap<(i64, i64), BucketDelta>, id: i64, sid: i64, ts: i64) {
    buckets.entry((bucket_of(id), sid)).or_insert_with(|| BucketDelta::new(id, ts)).add(id, ts);
}

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite failed: disk full, read-only file system, I/O error or corruption.
    #[error("storage error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The data directory could not be created.
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A stored value does not decode (the file was modified outside the agent).
    #[error("corrupt store: {0}")]
    Corrupt(String),
}

impl StoreError {
    /// Short label for metrics and status: `disk_full`, `read_only`, `io` or `other`.
    pub fn kind(&self) -> &'static str {
        use rusqlite::ErrorCode::*;
        match self {
            StoreError::Sqlite(rusqlite::Error::SqliteFailure(e, _)) => match e.code {
                DiskFull => "disk_full",
                ReadOnly => "read_only",
                SystemIoFailure | CannotOpen => "io",
                _ => "other",
            },
            _ => "other",
        }
    }
}

/// Why the store refused one group of readings. The rest of the transaction goes on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The stream's policy is `refuse_new` and it (or the whole store) is at its budget.
    #[error("stream {0:?} is full and its policy is refuse_new; retry later")]
    StreamFull(String),
    /// Creating the stream would exceed `store.max_streams`.
    #[error("too many streams: {0:?} would exceed store.max_streams")]
    TooManyStreams(String),
    /// The sensor's budget of new streams (`listener.new_streams_burst`, refilled at
    /// `listener.new_streams_per_minute`) is spent.
    #[error("client {client:?} may not create stream {stream:?} now: its quota of new streams is spent; retry later")]
    StreamQuota {
        /// MQTT client id.
        client: String,
        /// The stream it tried to create.
        stream: String,
    },
}

impl Refusal {
    /// Metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::StreamFull(_) => "stream_full",
            Refusal::TooManyStreams(_) => "too_many_streams",
            Refusal::StreamQuota { .. } => "stream_quota",
        }
    }
}

/// The part of the config the store needs, resolved.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// fsync per commit or not.
    pub durability: Durability,
    /// Budget of all readings.
    pub max_bytes: u64,
    /// Most streams.
    pub max_streams: usize,
    /// Whether readings are forwarded at all (`forward.mode` is not `off`). If not, no
    /// batch is cut (the outbox would grow for ever, in memory too) and a deleted reading
    /// is not a loss: nothing was promised to a hub.
    pub forwarding: bool,
    /// SQLite page size if the store is new (`store.page_size`).
    pub page_size: i64,
    /// Batch bounds.
    pub batch_max_readings: u64,
    /// Batch bound in bytes (approximate).
    pub batch_max_bytes: u64,
    /// Batch linger.
    pub batch_linger: Duration,
    /// Per-stream retention rules.
    pub rules: StreamRules,
    /// Packet identifiers remembered per persistent MQTT session (the listener's receive
    /// maximum: a sensor cannot have more unacknowledged).
    pub session_pkids: usize,
    /// Persistent MQTT sessions not connected for this long are deleted.
    pub session_expiry: Duration,
    /// New streams one MQTT client may create at once (token bucket size).
    pub new_streams_burst: u32,
    /// New streams per minute a client's budget regains.
    pub new_streams_per_minute: u32,
}

impl StoreOptions {
    /// Resolves the store's options from the agent config.
    pub fn from_config(cfg: &Config) -> Self {
        StoreOptions {
            durability: cfg.store.durability,
            max_bytes: cfg.store.max_bytes.as_u64(),
            max_streams: cfg.store.max_streams,
            forwarding: cfg.forward.mode != crate::config::ForwardMode::Off,
            page_size: cfg.store.page_size.as_u64() as i64,
            batch_max_readings: cfg.forward.batch_max_readings as u64,
            batch_max_bytes: cfg.forward.batch_max_bytes.as_u64(),
            batch_linger: cfg.forward.batch_linger,
            rules: StreamRules::from_config(cfg),
            session_pkids: usize::from(cfg.listener.max_inflight),
            session_expiry: cfg.listener.session_expiry,
            new_streams_burst: cfg.listener.new_streams_burst,
            new_streams_per_minute: cfg.listener.new_streams_per_minute,
        }
    }
}

/// In-memory state of one stream.
#[derive(Debug, Clone)]
struct StreamState {
    id: i64,
    bytes: u64,
    count: u64,
    rule: StreamRuleBody,
    /// Touched in the current transaction (counters must be written back).
    dirty: bool,
}

/// An unacknowledged batch, as kept in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboxEntry {
    /// Batch sequence number.
    pub seq: u64,
    /// First reading id of the batch.
    pub first_id: i64,
    /// Last reading id of the batch.
    pub last_id: i64,
    /// Readings in the batch when it was cut.
    pub readings: u64,
    /// When it was cut, ms since the epoch.
    pub created_ms: i64,
}

/// A snapshot of the store's state, for metrics and the forwarder.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StoreSnapshot {
    /// Store epoch.
    pub epoch: u64,
    /// Bytes of all readings (budget accounting).
    pub bytes: u64,
    /// Readings stored.
    pub readings: u64,
    /// Streams known.
    pub streams: usize,
    /// Unacknowledged batches.
    pub outbox_batches: u64,
    /// Readings in unacknowledged batches.
    pub outbox_readings: u64,
    /// Oldest unacknowledged batch's sequence number.
    pub oldest_seq: Option<u64>,
    /// Newest batch sequence number cut so far (0 if none).
    pub newest_seq: u64,
    /// Creation time of the oldest unacknowledged batch, ms since the epoch.
    pub oldest_created_ms: Option<i64>,
    /// Readings not yet in a batch.
    pub unbatched: u64,
}

/// Where a processing module is: the last reading id it has consumed and its state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleProgress {
    /// Whose progress: the module's name (from its manifest or config), or a
    /// re-processing job's key (`#reprocess/<id>`).
    pub name: String,
    /// The module's name, recorded with version and hash as the lineage of its outputs
    /// (the same as `name` except for re-processing jobs).
    pub module: String,
    /// Module version (from its manifest), recorded with the hash as the lineage of the
    /// module's output readings.
    pub version: String,
    /// Hex sha256 of the module that made this progress.
    pub hash: String,
    /// Every reading id ≤ this has been consumed.
    pub cursor: i64,
    /// The module's saved state.
    pub state: Vec<u8>,
}

/// Everything one transaction applies ([`Store::commit`]); empty by default.
#[derive(Debug, Default, Clone, Copy)]
pub struct Write<'a> {
    /// Groups of readings, each admitted or refused as a whole.
    pub groups: &'a [&'a [Reading]],
    /// `(group index, progress)`: a module's progress, committed only with its group.
    pub progress: &'a [(usize, ModuleProgress)],
    /// `(group index, publish)`: the MQTT PUBLISH of a persistent session a group came
    /// from. A re-send of a committed one is skipped (see [`sessions`]); otherwise its
    /// identifier is recorded with the group.
    pub publishes: &'a [(usize, PublishId)],
    /// Session changes (connect, disconnect, QoS 2 release), applied before the groups.
    pub sessions: &'a [SessionOp],
    /// `(group index, client id)`: the MQTT client a group came from. New streams it
    /// creates are charged to the client's quota ([`StreamQuota`]).
    pub origins: &'a [(usize, Arc<str>)],
    /// Hub-acknowledged batch sequence numbers.
    pub acks: &'a [u64],
}

/// Result of one [`Store::apply`] call.
#[derive(Debug, Default)]
pub struct ApplyOutcome {
    /// One entry per input group: `Ok` if committed (or a duplicate), or why it was refused.
    pub results: Vec<Result<(), Refusal>>,
    /// Indices of groups skipped as re-sends of a PUBLISH already committed.
    pub duplicates: Vec<usize>,
    /// One entry per session change: see [`sessions::Sessions::apply`].
    pub sessions: Vec<bool>,
    /// Readings dropped in this transaction, per (stream, reason).
    pub dropped: Vec<(String, LossReason, u64)>,
    /// Batches cut in this transaction.
    pub batches_cut: u64,
}

/// The store. Not `Sync`: exactly one thread writes (see [`writer`]).
pub struct Store {
    conn: Connection,
    st: State,
}

/// In-memory mirrors of what is committed; kept apart from the connection so a
/// transaction can borrow the connection while the state is updated.
struct State {
    opts: StoreOptions,
    epoch: u64,
    next_id: i64,
    next_seq: u64,
    batched_upto: i64,
    streams: HashMap<String, StreamState>,
    stream_names: HashMap<i64, String>,
    total_bytes: u64,
    total_count: u64,
    /// Unacknowledged batches keyed by sequence number.
    outbox: BTreeMap<u64, OutboxEntry>,
    /// Bytes of readings not yet batched (approximate: reset on cut).
    unbatched_bytes: u64,
    /// When the oldest not-yet-batched reading was committed.
    oldest_unbatched_at: Option<Instant>,
    /// MQTT sessions of sensors: committed packet identifiers.
    sessions: sessions::Sessions,
    /// New-stream budgets per MQTT client (in memory: a rate limit, not state to keep).
    quota: StreamQuota,
    /// Directory rows of readings after `derived_upto`, not yet written.
    pending_buckets: HashMap<(i64, i64), BucketDelta>,
    /// Every reading id ≤ it is reflected in the stored stream counters and directory
    /// (`meta.derived_upto`); those after it are replayed on open.
    derived_upto: i64,
    /// Readings were deleted in this transaction: the derived state must be written
    /// before it commits, since replay only adds.
    deleted: bool,
    /// `[next_seq, batched_upto, next_id, derived_upto]` as last written to `meta`;
    /// `None` after a reload, so the next flush writes them.
    meta_written: Option<[i64; 4]>,
}

/// Per-client token buckets of new streams, so one sensor cannot take every stream of
/// `store.max_streams` from the others. A bucket holds up to `burst` tokens and regains
/// `per_minute` per minute; creating a stream costs one.
#[derive(Debug, Default)]
struct StreamQuota {
    burst: f64,
    per_sec: f64,
    /// Client id → (tokens, when last refilled). Full buckets are dropped (a client that
    /// is not there is a client with a full bucket), so the map stays small.
    buckets: HashMap<Arc<str>, (f64, Instant)>,
}

impl StreamQuota {
    fn new(burst: u32, per_minute: u32) -> Self {
        StreamQuota { burst: f64::from(burst), per_sec: f64::from(per_minute) / 60.0, buckets: HashMap::new() }
    }

    /// Tokens `client` has at `now`.
    fn available(&self, client: &Arc<str>, now: Instant) -> f64 {
        match self.buckets.get(client) {
            Some(&(tokens, at)) => {
                (tokens + now.saturating_duration_since(at).as_secs_f64() * self.per_sec).min(self.burst)
            }
            None => self.burst,
        }
    }

    /// Spends `n` tokens of `client` (the caller checked [`available`](Self::available)).
    fn spend(&mut self, client: &Arc<str>, n: usize, now: Instant) {
        let left = self.available(client, now) - n as f64;
        self.buckets.insert(client.clone(), (left, now));
        if self.buckets.len() > 10_000 {
            let (burst, per_sec) = (self.burst, self.per_sec);
            self.buckets.retain(|_, (t, at)| *t + now.saturating_duration_since(*at).as_secs_f64() * per_sec < burst);
        }
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

impl Store {
    /// Opens (creating if needed) the store at `dir/agent.db`.
    pub fn open(dir: &Path, opts: StoreOptions) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::DataDir { path: dir.into(), source })?;
        let conn = open_conn(&dir.join("agent.db"), opts.durability, opts.page_size)?;
        migrate(&conn)?;
        let mut store = Store {
            conn,
            st: State {
                epoch: 0,
                next_id: 1,
                next_seq: 1,
                batched_upto: 0,
                streams: HashMap::new(),
                stream_names: HashMap::new(),
                total_bytes: 0,
                total_count: 0,
                outbox: BTreeMap::new(),
                unbatched_bytes: 0,
                oldest_unbatched_at: None,
                sessions: Default::default(),
                quota: StreamQuota::new(opts.new_streams_burst, opts.new_streams_per_minute),
                pending_buckets: HashMap::new(),
                derived_upto: 0,
                deleted: false,
                meta_written: None,
                opts,
            },
        };
        store.reload()?;
        Ok(store)
    }

    /// Path of the database file inside a data directory.
    pub fn db_path(dir: &Path) -> std::path::PathBuf {
        dir.join("agent.db")
    }

    /// Rebuilds every in-memory mirror from the database.
    fn reload(&mut self) -> Result<(), StoreError> {
        let get = |k: &str| -> Result<Option<i64>, rusqlite::Error> {
            self.conn.query_row("SELECT value FROM meta WHERE key = ?1", [k], |r| r.get(0)).optional()
        };
        self.st.epoch = match get("epoch")? {
            Some(e) => e as u64,
            None => {
                // A new store: pick a random epoch so that a wiped data directory never
                // reuses (agent, epoch, seq) identities the hub already holds.
                let e = rand::random::<u64>() >> 1;
                self.conn.execute("INSERT INTO meta(key, value) VALUES ('epoch', ?1)", [e as i64])?;
                e
            }
        };
        // `meta` is written only with the derived state; batches cut since are in the
        // outbox (whose newest row stays, marked acknowledged, until a newer one exists)
        // and readings committed since are in `readings`.
        let (max_seq, max_batched): (i64, i64) =
            self.conn.query_row("SELECT COALESCE(MAX(seq), 0), COALESCE(MAX(last_id), 0) FROM outbox", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?;
        self.st.next_seq = (get("next_seq")?.unwrap_or(1)).max(max_seq + 1) as u64;
        self.st.batched_upto = get("batched_upto")?.unwrap_or(0).max(max_batched);
        let max_id: i64 = self.conn.query_row("SELECT COALESCE(MAX(id), 0) FROM readings", [], |r| r.get(0))?;
        self.st.next_id = get("next_id")?.unwrap_or(1).max(max_id + 1).max(self.st.batched_upto + 1);
        self.st.derived_upto = match get("derived_upto")? {
            Some(v) => v,
            None => {
                // Set by the migration; absent only if it was removed by hand. The stored
                // counters may then be stale: start from nothing and replay every reading.
                self.conn.execute("UPDATE streams SET bytes = 0, count = 0", [])?;
                self.conn.execute("DELETE FROM stream_buckets", [])?;
                self.conn.execute("INSERT INTO meta(key, value) VALUES ('derived_upto', 0)", [])?;
                0
            }
        };

        self.st.streams.clear();
        self.st.stream_names.clear();
        self.st.total_bytes = 0;
        self.st.total_count = 0;
        // The config may have changed since the last run: bring the forward flags in line.
        let mut stmt = self.conn.prepare("SELECT id, name FROM streams")?;
        let names: Vec<(i64, String)> =
            stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<Result<_, _>>()?;
        drop(stmt);
        for (id, name) in names {
            let forward = self.st.opts.rules.rule_for(&name).forward;
            self.conn
                .execute("UPDATE streams SET forward = ?2 WHERE id = ?1 AND forward != ?2", params![id, forward])?;
        }
        let mut stmt = self.conn.prepare("SELECT id, name, bytes, count FROM streams")?;
        let rows = stmt.query_map([], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get::<_, i64>(2)?, r.get::<_, i64>(3)?))
        })?;
        for row in rows {
            let (id, name, bytes, count) = row?;
            let rule = self.st.opts.rules.rule_for(&name).clone();
            self.st.total_bytes += bytes as u64;
            self.st.total_count += count as u64;
            self.st.stream_names.insert(id, name.clone());
            self.st
                .streams
                .insert(name, StreamState { id, bytes: bytes as u64, count: count as u64, rule, dirty: false });
        }
        drop(stmt);

        // Replay the readings committed after the derived state was last written.
        self.st.pending_buckets.clear();
        self.st.deleted = false;
        self.st.meta_written = None;
        let mut stmt =
            self.conn.prepare("SELECT id, stream_id, ts_ns, length(fields) FROM readings WHERE id > ?1 ORDER BY id")?;
        let mut rows = stmt.query([self.st.derived_upto])?;
        while let Some(r) = rows.next()? {
            let (id, sid, ts, len): (i64, i64, i64, i64) = (r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?);
            let st = self.st.stream_names.get(&sid).and_then(|n| self.st.streams.get_mut(n)).ok_or_else(|| {
                StoreError::Corrupt(format!("reading {id} belongs to stream {sid}, which does not exist"))
            })?;
            let b = len as u64 + ROW_OVERHEAD;
            st.bytes += b;
            st.count += 1;
            st.dirty = true;
            self.st.total_bytes += b;
            self.st.total_count += 1;
            add_to_buckets(&mut self.st.pending_buckets, id, sid, ts);
        }
        drop(rows);
        drop(stmt);

        self.st.outbox.clear();
        let mut stmt = self
            .conn
            .prepare("SELECT seq, first_id, last_id, readings, created_ms FROM outbox WHERE acked = 0 ORDER BY seq")?;
        let rows = stmt.query_map([], |r| {
            Ok(OutboxEntry {
                seq: r.get::<_, i64>(0)? as u64,
                first_id: r.get(1)?,
                last_id: r.get(2)?,
                readings: r.get::<_, i64>(3)? as u64,
                created_ms: r.get(4)?,
            })
        })?;
        for e in rows {
            let e = e?;
            self.st.outbox.insert(e.seq, e);
        }
        drop(stmt);
        // Readings committed before a restart but not yet batched: treat them as just
        // arrived so they are batched after one linger period.
        let unbatched = max_id > self.st.batched_upto;
        self.st.unbatched_bytes = 0;
        self.st.oldest_unbatched_at = unbatched.then(Instant::now);
        self.st.sessions = sessions::Sessions::load(&self.conn, self.st.opts.session_pkids, now_ms())?;
        Ok(())
    }

    /// The store epoch.
    pub fn epoch(&self) -> u64 {
        self.st.epoch
    }

    /// Applies one transaction: appends each group of readings (each all-or-nothing),
    /// applies `acks` (hub-acknowledged batch sequence numbers), enforces byte budgets,
    /// cuts batches that are full or have lingered, and commits.
    ///
    /// On `Err` nothing was committed and the in-memory state was rebuilt from disk; the
    /// caller must not acknowledge any of the groups.
    pub fn apply(&mut self, groups: &[&[Reading]], acks: &[u64], now: Instant) -> Result<ApplyOutcome, StoreError> {
        self.apply_with_progress(groups, &[], acks, now)
    }

    /// Like [`apply`](Self::apply), and also records module progress: each
    /// `(group index, progress)` is written in the same transaction as the module's
    /// output readings (that group), and only if that group was admitted. So a module's
    /// outputs, its input cursor and its state are committed together or not at all,
    /// which makes processing exactly-once across crashes.
    pub fn apply_with_progress(
        &mut self,
        groups: &[&[Reading]],
        progress: &[(usize, ModuleProgress)],
        acks: &[u64],
        now: Instant,
    ) -> Result<ApplyOutcome, StoreError> {
        self.commit(&Write { groups, progress, acks, ..Write::default() }, now)
    }

    /// Applies one transaction with everything [`Write`] can hold: reading groups, module
    /// progress, MQTT session state and hub acknowledgements. The single write path.
    pub fn commit(&mut self, w: &Write<'_>, now: Instant) -> Result<ApplyOutcome, StoreError> {
        let res = self.apply_inner(w, now);
        if res.is_err() {
            // The transaction rolled back (dropped uncommitted). Whatever we changed in
            // memory described it, so start again from what is on disk.
            if let Err(e) = self.reload() {
                tracing::warn!(error = %e, "store reload after failed transaction also failed");
            }
        }
        res
    }

    fn apply_inner(&mut self, w: &Write<'_>, now: Instant) -> Result<ApplyOutcome, StoreError> {
        let Write { groups, progress, publishes, sessions, origins, acks } = *w;
        let mut out = ApplyOutcome::default();
        let tx = self.conn.transaction()?;
        for op in sessions {
            out.sessions.push(self.st.sessions.apply(&tx, op, now_ms())?);
        }
        let mut lost: HashMap<(i64, LossReason), u64> = HashMap::new();
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO readings(id, stream_id, ts_ns, fields, producer) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            let mut new_stream =
                tx.prepare_cached("INSERT INTO streams(name, bytes, count, forward) VALUES (?1, 0, 0, ?2)")?;
            for (gi, group) in groups.iter().enumerate() {
                let publish = publishes.iter().find(|(i, _)| *i == gi).map(|(_, p)| p);
                if publish.is_some_and(|p| self.st.sessions.is_duplicate(p)) {
                    // A sensor's re-send of a PUBLISH committed before: acknowledge it
                    // again, store nothing.
                    out.results.push(Ok(()));
                    out.duplicates.push(gi);
                    continue;
                }
                // Admission, all in memory, before touching the database, so a refused
                // group leaves no trace.
                let origin = origins.iter().find(|(i, _)| *i == gi).map(|(_, c)| c);
                let new_streams = match admit(&self.st.streams, self.st.total_bytes, &self.st.opts, group) {
                    Err(r) => {
                        out.results.push(Err(r));
                        continue;
                    }
                    Ok(new) => new,
                };
                if let Some(client) = origin
                    && !new_streams.is_empty()
                {
                    if self.st.quota.available(client, now) < new_streams.len() as f64 {
                        out.results.push(Err(Refusal::StreamQuota {
                            client: client.to_string(),
                            stream: new_streams[0].clone(),
                        }));
                        continue;
                    }
                    self.st.quota.spend(client, new_streams.len(), now);
                }
                out.results.push(Ok(()));
                let producer = match progress.iter().find(|(i, _)| *i == gi) {
                    Some((_, p)) if !group.is_empty() => Some(producer_id(&tx, p)?),
                    _ => None,
                };
                for r in group.iter() {
                    if !self.st.streams.contains_key(&r.stream) {
                        let rule = self.st.opts.rules.rule_for(&r.stream).clone();
                        new_stream.execute(params![&r.stream, rule.forward])?;
                        let id = tx.last_insert_rowid();
                        self.st.stream_names.insert(id, r.stream.clone());
                        let st = StreamState { id, bytes: 0, count: 0, rule, dirty: true };
                        self.st.streams.insert(r.stream.clone(), st);
                    }
                    let st = self.st.streams.get_mut(&r.stream).expect("inserted above");
                    insert.execute(params![self.st.next_id, st.id, r.ts_ns, r.fields.0, producer])?;
                    add_to_buckets(&mut self.st.pending_buckets, self.st.next_id, st.id, r.ts_ns);
                    let b = r.fields.0.len() as u64 + ROW_OVERHEAD;
                    st.bytes += b;
                    st.count += 1;
                    st.dirty = true;
                    self.st.total_bytes += b;
                    self.st.total_count += 1;
                    self.st.unbatched_bytes += b;
                    self.st.next_id += 1;
                }
                if !group.is_empty() && self.st.oldest_unbatched_at.is_none() {
                    self.st.oldest_unbatched_at = Some(now);
                }
                if let Some(p) = publish {
                    self.st.sessions.record(&tx, p, self.st.next_id)?;
                }
            }
        }

        // Hub acknowledgements: the batch rows go; the readings stay as local history
        // until retention removes them. The newest row stays, marked, so the outbox
        // alone tells the next sequence number and `meta` need not be written.
        if !acks.is_empty() {
            let mut mark = tx.prepare_cached("UPDATE outbox SET acked = 1 WHERE seq = ?1")?;
            let mut any = false;
            for &seq in acks {
                if self.st.outbox.remove(&seq).is_some() {
                    mark.execute([seq as i64])?;
                    any = true;
                }
            }
            if any {
                tx.prepare_cached("DELETE FROM outbox WHERE acked = 1 AND seq < (SELECT MAX(seq) FROM outbox)")?
                    .execute([])?;
            }
        }

        self.st.enforce_budgets(&tx, &mut lost)?;
        if !progress.is_empty() {
            let mut up = tx.prepare_cached(
                "INSERT OR REPLACE INTO module_progress(name, hash, cursor, state, updated_ms, version) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            for (i, p) in progress {
                if matches!(out.results.get(*i), Some(Ok(()))) {
                    up.execute(params![p.name, p.hash, p.cursor, p.state, now_ms(), p.version])?;
                }
            }
        }
        out.batches_cut = self.st.cut_batches(&tx, now)?;
        self.st.write_back(&tx, &lost)?;
        tx.commit()?;
        out.dropped = lost
            .into_iter()
            .filter_map(|((sid, reason), n)| Some((self.st.stream_names.get(&sid)?.clone(), reason, n)))
            .collect();
        Ok(out)
    }

    /// When the next batch must be cut because of linger, if any reading is waiting.
    pub fn linger_deadline(&self) -> Option<Instant> {
        self.st.linger_deadline()
    }

    /// A snapshot for metrics and the forwarder.
    pub fn snapshot(&self) -> StoreSnapshot {
        let first = self.st.outbox.values().next();
        StoreSnapshot {
            epoch: self.st.epoch,
            bytes: self.st.total_bytes,
            readings: self.st.total_count,
            streams: self.st.streams.len(),
            outbox_batches: self.st.outbox.len() as u64,
            outbox_readings: self.st.outbox.values().map(|e| e.readings).sum(),
            oldest_seq: first.map(|e| e.seq),
            newest_seq: self.st.next_seq - 1,
            oldest_created_ms: first.map(|e| e.created_ms),
            unbatched: (self.st.next_id - 1 - self.st.batched_upto).max(0) as u64,
        }
    }
}

impl State {
    fn linger_deadline(&self) -> Option<Instant> {
        self.oldest_unbatched_at.filter(|_| self.opts.forwarding).map(|t| t + self.opts.batch_linger)
    }

    /// Cuts batches from readings not yet batched: full ones always, and everything left
    /// once the oldest waiting reading has lingered long enough.
    fn cut_batches(&mut self, tx: &rusqlite::Transaction, now: Instant) -> Result<u64, StoreError> {
        let mut cut = 0;
        if !self.opts.forwarding {
            return Ok(0);
        }
        let last_id = self.next_id - 1;
        let lingered = self.linger_deadline().is_some_and(|d| now >= d);
        loop {
            let pending = (last_id - self.batched_upto).max(0) as u64;
            if pending == 0 {
                break;
            }
            // Average size decides how many readings fit under the byte bound.
            let avg = (self.unbatched_bytes / pending).max(1);
            let by_bytes = (self.opts.batch_max_bytes / avg).max(1);
            let size = self.opts.batch_max_readings.min(by_bytes);
            if pending < size && !lingered {
                break;
            }
            let take = pending.min(size);
            let first = self.batched_upto + 1;
            let last = self.batched_upto + take as i64;
            let entry = OutboxEntry {
                seq: self.next_seq,
                first_id: first,
                last_id: last,
                readings: take,
                created_ms: now_ms(),
            };
            tx.prepare_cached(
                "INSERT INTO outbox(seq, first_id, last_id, readings, created_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![entry.seq as i64, first, last, take as i64, entry.created_ms])?;
            self.outbox.insert(entry.seq, entry);
            self.next_seq += 1;
            self.batched_upto = last;
            self.unbatched_bytes = self.unbatched_bytes.saturating_sub(avg * take);
            cut += 1;
        }
        if self.batched_upto >= last_id {
            self.oldest_unbatched_at = None;
            self.unbatched_bytes = 0;
        }
        Ok(cut)
    }

    /// Writes loss counters inside the transaction, and the derived state when it is due:
    /// after deletions (replay on open only adds) or every [`DERIVED_FLUSH_READINGS`].
    fn write_back(
        &mut self,
        tx: &rusqlite::Transaction,
        lost: &HashMap<(i64, LossReason), u64>,
    ) -> Result<(), StoreError> {
        let mut loss = tx.prepare_cached(
            "INSERT INTO losses(stream_id, reason, total) VALUES (?1, ?2, ?3) \
             ON CONFLICT(stream_id, reason) DO UPDATE SET total = total + excluded.total",
        )?;
        for (&(sid, reason), &n) in lost {
            loss.execute(params![sid, reason_code(reason), n as i64])?;
        }
        if self.deleted || self.next_id - 1 - self.derived_upto >= DERIVED_FLUSH_READINGS {
            self.flush_derived(tx)?;
        }
        Ok(())
    }

    /// Writes the derived state (the directory rows and stream counters of readings
    /// committed since the last flush, and the counters in `meta`) inside the
    /// transaction. Writes only what changed: a transaction that rewrites nothing writes
    /// nothing to the WAL, so an idle agent's periodic retention run costs no flash.
    /// In-memory changes made here are undone by `reload` if the transaction fails.
    fn flush_derived(&mut self, tx: &rusqlite::Transaction) -> Result<(), StoreError> {
        if !self.pending_buckets.is_empty() {
            let mut up = tx.prepare_cached(
                "INSERT INTO stream_buckets(bucket, stream_id, first_id, last_id, min_ts, max_ts, count) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT(bucket, stream_id) DO UPDATE SET \
                 first_id = min(first_id, excluded.first_id), last_id = max(last_id, excluded.last_id), \
                 min_ts = min(min_ts, excluded.min_ts), max_ts = max(max_ts, excluded.max_ts), \
                 count = count + excluded.count",
            )?;
            for ((bucket, sid), d) in self.pending_buckets.drain() {
                up.execute(params![bucket, sid, d.first_id, d.last_id, d.min_ts, d.max_ts, d.count])?;
            }
        }
        let mut upd = tx.prepare_cached("UPDATE streams SET bytes = ?2, count = ?3 WHERE id = ?1")?;
        for st in self.streams.values_mut().filter(|s| s.dirty) {
            upd.execute(params![st.id, st.bytes as i64, st.count as i64])?;
            st.dirty = false;
        }
        self.derived_upto = self.next_id - 1;
        self.deleted = false;
        let now = [self.next_seq as i64, self.batched_upto, self.next_id, self.derived_upto];
        if self.meta_written != Some(now) {
            let mut meta = tx.prepare_cached("INSERT OR REPLACE INTO meta(key, value) VALUES (?1, ?2)")?;
            for (key, value) in ["next_seq", "batched_upto", "next_id", "derived_upto"].into_iter().zip(now) {
                meta.execute(params![key, value])?;
            }
            self.meta_written = Some(now);
        }
        Ok(())
    }
}

/// Whether a group may be stored: stream count and byte budgets. Returns the names of
/// the streams it would create.
fn admit(
    streams: &HashMap<String, StreamState>,
    total_bytes: u64,
    opts: &StoreOptions,
    group: &[Reading],
) -> Result<Vec<String>, Refusal> {
    let mut new_streams: Vec<&str> = Vec::new();
    let mut incoming: HashMap<&str, u64> = HashMap::new();
    for r in group {
        if !streams.contains_key(&r.stream) && !new_streams.contains(&r.stream.as_str()) {
            if streams.len() + new_streams.len() >= opts.max_streams {
                return Err(Refusal::TooManyStreams(r.stream.clone()));
            }
            new_streams.push(&r.stream);
        }
        *incoming.entry(&r.stream).or_default() += r.fields.0.len() as u64 + ROW_OVERHEAD;
    }
    let group_bytes: u64 = incoming.values().sum();
    for (name, add) in incoming {
        let (rule, have) = match streams.get(name) {
            Some(s) => (s.rule.clone(), s.bytes),
            None => (opts.rules.rule_for(name).clone(), 0),
        };
        if rule.when_full == WhenFull::RefuseNew
            && (have + add > rule.max_bytes.as_u64() || total_bytes + group_bytes > opts.max_bytes)
        {
            return Err(Refusal::StreamFull(name.to_string()));
        }
    }
    Ok(new_streams.into_iter().map(str::to_owned).collect())
}

fn reason_code(r: LossReason) -> i64 {
    match r {
        LossReason::Retention => 0,
        LossReason::StoreFull => 1,
    }
}

fn reason_from_code(c: i64) -> LossReason {
    if c == 0 { LossReason::Retention } else { LossReason::StoreFull }
}

/// The id of a module build in `producers`, created on first use.
fn producer_id(tx: &Connection, p: &ModuleProgress) -> Result<i64, StoreError> {
    tx.prepare_cached("INSERT OR IGNORE INTO producers(name, version, hash) VALUES (?1, ?2, ?3)")?
        .execute(params![p.module, p.version, p.hash])?;
    Ok(tx
        .prepare_cached("SELECT id FROM producers WHERE name = ?1 AND version = ?2 AND hash = ?3")?
        .query_row(params![p.module, p.version, p.hash], |r| r.get(0))?)
}

#[cfg(test)]
mod tests;
