//! Storage behind the hub: the [`HubStore`] trait and the types it speaks.
//!
//! The ingest task calls [`HubStore::ingest`] with a group of validated batches and
//! acknowledges them only after it returns `Ok`: the trait's contract is that `Ok`
//! means *durably committed*. The HTTP API only reads.
//!
//! The methods are synchronous and may block on disk or network IO; callers run them
//! on a blocking thread (`tokio::task::spawn_blocking`), never on the async runtime.
//!
//! Two implementations, tested by one suite (`store/suite.rs`, instantiated per backend):
//!
//! * [`sqlite::SqliteStore`], one file in `data_dir`: the single-machine default;
//! * [`postgres::PostgresStore`], a PostgreSQL database shared by any number of hubs:
//!   the scale-out path (time-partitioned readings, retention by dropping partitions).

pub mod fleet;
pub mod postgres;
pub mod rollup;
pub mod sqlite;
#[cfg(test)]
pub(crate) mod suite;

use std::time::Duration;

use brume_protocol::{Batch, FieldsBlob, LossReason, ModuleRef, StatusExtV2, StatusV1};

/// Why a storage operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The data directory could not be created.
    #[error("cannot create data directory {path}: {source}")]
    CreateDir {
        /// The directory.
        path: std::path::PathBuf,
        /// The IO error.
        source: std::io::Error,
    },
    /// An SQLite call failed.
    #[error("sqlite error while {op}: {source}")]
    Sqlite {
        /// What the store was doing, e.g. `inserting readings`.
        op: &'static str,
        /// The underlying error.
        source: rusqlite::Error,
    },
    /// The database was written by a newer hub with a schema this one does not know.
    #[error("database schema version {found} is newer than the {supported} this hub supports")]
    SchemaTooNew {
        /// `PRAGMA user_version` of the file.
        found: i64,
        /// Newest version this build knows.
        supported: i64,
    },
    /// A stored value does not decode (the file was modified outside the hub).
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
    /// A PostgreSQL call failed. `source` carries the server's SQLSTATE and message
    /// when the server answered; otherwise it is a connection error.
    #[error("postgres error while {op}: {}", postgres::pg_error_text(.source))]
    Postgres {
        /// What the store was doing, e.g. `inserting batches`.
        op: &'static str,
        /// The underlying error.
        source: tokio_postgres::Error,
    },
    /// Could not connect to PostgreSQL.
    #[error("cannot connect to postgres at {target}: {}", postgres::pg_error_text(.source))]
    PostgresConnect {
        /// Host, port and database (never the password).
        target: String,
        /// The underlying error.
        source: tokio_postgres::Error,
    },
    /// A PostgreSQL operation took longer than `storage.postgres.query_timeout`. The
    /// connection was dropped, which makes the server roll back an open transaction.
    #[error("postgres {op} timed out after {after:?}")]
    Timeout {
        /// What the store was doing.
        op: &'static str,
        /// The limit that was exceeded.
        after: Duration,
    },
    /// The store's dedicated IO runtime could not be started.
    #[error("cannot start the postgres IO runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// A batch holds more readings than the schema can number.
    #[error("batch ({agent_id}, {epoch}, {seq}) has more than {max} readings")]
    TooManyReadings {
        /// Agent id.
        agent_id: String,
        /// Store epoch.
        epoch: u64,
        /// Sequence number.
        seq: u64,
        /// Largest reading index the schema holds.
        max: i64,
    },
}

impl StoreError {
    /// Whether the error says the database is unavailable (down, unreachable, out of
    /// disk, locked, overloaded, in failover), as opposed to refusing what it was given.
    ///
    /// The ingest task retries a transient failure as it is, whole, for as long as it
    /// lasts: nothing is wrong with the batches. Any other failure makes the batches the
    /// suspects: the group is split, and a batch that fails alone again and again is
    /// quarantined (see `crate::ingest`). Misjudging a transient error as content costs
    /// little (the ingest task also pings the store before it blames a batch); misjudging
    /// content as transient would stall every agent, so only errors known to be about
    /// availability are listed here.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::CreateDir { .. }
            | StoreError::PostgresConnect { .. }
            | StoreError::Timeout { .. }
            | StoreError::Runtime(_) => true,
            StoreError::Postgres { source, .. } => match source.code() {
                // No SQLSTATE: the connection broke (IO error, server gone).
                None => true,
                // 08 connection exception, 40 transaction rollback (serialization failure,
                // deadlock), 53 insufficient resources (disk full, out of memory, too many
                // connections), 57 operator intervention (shutdown, cancel, crash
                // recovery), 58 system error (IO), 55P03 lock not available.
                Some(code) => {
                    let c = code.code();
                    ["08", "40", "53", "57", "58"].iter().any(|p| c.starts_with(p)) || c == "55P03"
                }
            },
            StoreError::Sqlite { source, .. } => {
                use rusqlite::ErrorCode as C;
                matches!(
                    source.sqlite_error_code(),
                    Some(
                        C::DatabaseBusy
                            | C::DatabaseLocked
                            | C::DiskFull
                            | C::SystemIoFailure
                            | C::CannotOpen
                            | C::ReadOnly
                            | C::OutOfMemory
                            | C::FileLockingProtocolFailed
                    )
                )
            }
            StoreError::SchemaTooNew { .. } | StoreError::Corrupt(_) | StoreError::TooManyReadings { .. } => false,
        }
    }
}

/// Maps a `u64` epoch to an `i64` with the same ordering (flips the sign bit).
///
/// Both SQL backends store epochs as signed 64-bit integers; flipping the sign bit makes
/// the database's integer order the `u64` order the API promises.
pub fn epoch_to_sql(epoch: u64) -> i64 {
    (epoch ^ (1 << 63)) as i64
}

/// Inverse of [`epoch_to_sql`].
pub fn epoch_from_sql(v: i64) -> u64 {
    (v as u64) ^ (1 << 63)
}

/// Parses a loss reason as stored by [`LossReason::as_str`].
fn loss_reason_from_str(s: &str) -> Result<LossReason, StoreError> {
    match s {
        "retention" => Ok(LossReason::Retention),
        "store_full" => Ok(LossReason::StoreFull),
        other => Err(StoreError::Corrupt(format!("unknown loss reason {other:?}"))),
    }
}

/// What happened to one batch of an [`HubStore::ingest`] call. Both outcomes mean the
/// batch is durably stored, so both are acknowledged to the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchOutcome {
    /// First time this `(agent_id, epoch, seq)` was seen: its readings were stored.
    Stored,
    /// Already stored earlier (a re-send): nothing but loss counters was written.
    Duplicate,
}

/// Summary of one stream, for `GET /api/v1/streams`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamSummary {
    /// Stream name.
    pub stream: String,
    /// Number of stored readings.
    pub readings: u64,
    /// Oldest reading timestamp, ns since the Unix epoch.
    pub first_ts_ns: Option<i64>,
    /// Newest reading timestamp, ns since the Unix epoch.
    pub last_ts_ns: Option<i64>,
}

/// Position of a reading in the total order `(ts_ns, agent_id, epoch, seq, idx)` used by
/// [`HubStore::readings`]. A page's cursor is its last reading's position; the next page
/// starts strictly after it (keyset pagination: stable while new readings arrive).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    /// Timestamp, ns.
    pub ts_ns: i64,
    /// Agent id.
    pub agent_id: String,
    /// Store epoch.
    pub epoch: u64,
    /// Batch sequence number.
    pub seq: u64,
    /// Index of the reading inside its batch.
    pub idx: u32,
}

impl Cursor {
    /// Encodes the cursor as an opaque token (hex, so it is URL-safe as is).
    pub fn to_token(&self) -> String {
        // Agent ids never contain ':' (protocol::validate_agent_id), and it is the last
        // part anyway, so the split in `from_token` is unambiguous.
        let plain = format!("{}:{}:{}:{}:{}", self.ts_ns, self.epoch, self.seq, self.idx, self.agent_id);
        plain.bytes().map(|b| format!("{b:02x}")).collect()
    }

    /// Decodes a token made by [`Cursor::to_token`]; `None` if it is not one.
    pub fn from_token(token: &str) -> Option<Cursor> {
        if !token.len().is_multiple_of(2) || !token.is_ascii() {
            return None;
        }
        let bytes: Vec<u8> = (0..token.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&token[i..i + 2], 16))
            .collect::<Result<_, _>>()
            .ok()?;
        let plain = String::from_utf8(bytes).ok()?;
        let mut parts = plain.splitn(5, ':');
        let cursor = Cursor {
            ts_ns: parts.next()?.parse().ok()?,
            epoch: parts.next()?.parse().ok()?,
            seq: parts.next()?.parse().ok()?,
            idx: parts.next()?.parse().ok()?,
            agent_id: parts.next()?.to_owned(),
        };
        brume_protocol::validate_agent_id(&cursor.agent_id).ok()?;
        Some(cursor)
    }
}

/// A readings query: one stream, an optional time range, a page size and a cursor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadingsQuery {
    /// Stream name.
    pub stream: String,
    /// Inclusive lower bound on `ts_ns`.
    pub from: Option<i64>,
    /// Exclusive upper bound on `ts_ns`.
    pub to: Option<i64>,
    /// Page size, at least 1.
    pub limit: usize,
    /// Start strictly after this position.
    pub after: Option<Cursor>,
}

/// One stored reading.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredReading {
    /// Timestamp, ns since the Unix epoch.
    pub ts_ns: i64,
    /// Agent that sent it.
    pub agent_id: String,
    /// The agent's store epoch.
    pub epoch: u64,
    /// Batch sequence number.
    pub seq: u64,
    /// Index of the reading inside its batch.
    pub idx: u32,
    /// The fields, exactly as the agent sent them.
    pub fields: FieldsBlob,
    /// The module build that computed this reading; `None` if it was ingested as is.
    pub module: Option<ModuleRef>,
}

impl StoredReading {
    /// This reading's position, for pagination.
    pub fn cursor(&self) -> Cursor {
        Cursor { ts_ns: self.ts_ns, agent_id: self.agent_id.clone(), epoch: self.epoch, seq: self.seq, idx: self.idx }
    }
}

/// One page of readings.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadingsPage {
    /// Readings in `(ts_ns, agent_id, epoch, seq, idx)` order.
    pub readings: Vec<StoredReading>,
    /// Where the next page starts; `None` when this page is the last.
    pub next: Option<Cursor>,
}

/// Cumulative losses an agent reported for one stream and reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LossSummary {
    /// Stream name.
    pub stream: String,
    /// Why the readings were dropped.
    pub reason: LossReason,
    /// Highest cumulative total reported.
    pub total: u64,
}

/// Ingest state of one agent store epoch, for `GET /api/v1/agents`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentSummary {
    /// Agent id.
    pub agent_id: String,
    /// Store epoch.
    pub epoch: u64,
    /// Stored batches.
    pub batches: u64,
    /// Stored readings.
    pub readings: u64,
    /// Highest `w` such that batches `1..=w` are all stored (0 if batch 1 is missing).
    pub watermark: u64,
    /// Highest stored sequence number.
    pub max_seq: u64,
    /// Inclusive ranges of sequence numbers below `max_seq` that are not stored,
    /// ascending. Capped at [`MAX_MISSING_RANGES`] ranges.
    pub missing: Vec<(u64, u64)>,
    /// For each range of `missing`, since when it is known to be missing: when the hub
    /// stored the batch right after it, ms since the Unix epoch.
    pub missing_since_ms: Vec<i64>,
    /// Losses the agent reported in this epoch.
    pub losses: Vec<LossSummary>,
    /// When the hub last stored a batch of this epoch, ms since the Unix epoch.
    pub last_seen_ms: i64,
}

/// Most gap ranges reported per agent epoch, so one badly broken agent cannot make the
/// agents listing arbitrarily large.
pub const MAX_MISSING_RANGES: usize = 10_000;

/// Records a missing range for the agent at `pos[key]`, up to [`MAX_MISSING_RANGES`].
/// Shared by the backends, which differ only in how they find the gaps.
pub(crate) fn add_gap(
    out: &mut [AgentSummary],
    pos: &std::collections::HashMap<(String, u64), usize>,
    key: &(String, u64),
    (lo, hi): (i64, i64),
    since_ms: i64,
) {
    if let Some(&i) = pos.get(key)
        && out[i].missing.len() < MAX_MISSING_RANGES
    {
        out[i].missing.push((lo as u64, hi as u64));
        out[i].missing_since_ms.push(since_ms);
    }
}

/// Sets each agent's watermark from its missing ranges (ascending): 1..=watermark are all
/// present, i.e. everything below the first gap.
pub(crate) fn set_watermarks(out: &mut [AgentSummary]) {
    for a in out {
        a.watermark = match a.missing.first() {
            Some(&(lo, _)) => lo - 1,
            None => a.max_seq,
        };
    }
}

/// Summary of one module build that produced stored readings, for `GET /api/v1/modules`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleSummary {
    /// The build.
    pub module: ModuleRef,
    /// Distinct agents whose batches carried its outputs.
    pub agents: u64,
    /// Stored readings it computed.
    pub readings: u64,
}

/// Readings `first_idx..=last_idx` of one batch were computed by `module`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LineageRange {
    pub first_idx: u32,
    pub last_idx: u32,
    pub module: ModuleRef,
}

/// The lineage of a batch as index ranges, numbering readings the way both backends
/// store them: consecutively over the batch's non-empty chunks.
pub(crate) fn lineage_ranges(b: &Batch) -> Vec<LineageRange> {
    let mut out = Vec::with_capacity(b.lineage.len());
    let mut idx: u64 = 0;
    for (i, chunk) in b.streams.iter().enumerate() {
        let n = chunk.points.len() as u64;
        if n > 0
            && let Some(m) = b.module_of(i)
        {
            // Batches beyond u32 readings are refused by the stores before this matters.
            out.push(LineageRange {
                first_idx: idx.min(u32::MAX.into()) as u32,
                last_idx: (idx + n - 1).min(u32::MAX.into()) as u32,
                module: m.clone(),
            });
        }
        idx += n;
    }
    out
}

/// A module reference from its stored columns.
pub(crate) fn module_ref(name: String, version: String, sha256: &[u8]) -> Result<ModuleRef, StoreError> {
    let sha256 = sha256
        .try_into()
        .map_err(|_| StoreError::Corrupt(format!("module {name:?} has a {}-byte sha256", sha256.len())))?;
    Ok(ModuleRef { name, version, sha256 })
}

/// Sets `module` on every reading of a page, looking up each distinct batch's lineage
/// once with `lookup(agent_id, epoch, seq)`.
pub(crate) fn attach_lineage(
    readings: &mut [StoredReading],
    mut lookup: impl FnMut(&str, u64, u64) -> Result<Vec<LineageRange>, StoreError>,
) -> Result<(), StoreError> {
    let mut cache: std::collections::HashMap<(String, u64, u64), Vec<LineageRange>> = std::collections::HashMap::new();
    for r in readings.iter_mut() {
        let key = (r.agent_id.clone(), r.epoch, r.seq);
        if !cache.contains_key(&key) {
            let ranges = lookup(&r.agent_id, r.epoch, r.seq)?;
            cache.insert(key.clone(), ranges);
        }
        r.module = cache[&key].iter().find(|l| (l.first_idx..=l.last_idx).contains(&r.idx)).map(|l| l.module.clone());
    }
    Ok(())
}

/// Durable storage for batches and the queries the HTTP API serves.
///
/// Implementations are shared between the ingest task and HTTP handlers
/// (`Arc<dyn HubStore>`), so they synchronise internally. Every method may block.
pub trait HubStore: fleet::FleetStore + Send + Sync + 'static {
    /// Stores a group of validated batches in one transaction, deduplicating on
    /// `(agent_id, epoch, seq)`: readings are inserted only for batches not seen
    /// before, loss counters keep the maximum per `(agent, epoch, stream, reason)`.
    ///
    /// Returns one outcome per input batch, in order, only after the transaction is
    /// durably committed. On `Err` nothing was stored.
    fn ingest(&self, batches: &[Batch], received_ms: i64) -> Result<Vec<BatchOutcome>, StoreError>;

    /// All streams, sorted by name.
    fn streams(&self) -> Result<Vec<StreamSummary>, StoreError>;

    /// One page of a stream's readings. An unknown stream yields an empty page.
    fn readings(&self, query: &ReadingsQuery) -> Result<ReadingsPage, StoreError>;

    /// The streams `agent_id` has sent, sorted by name, with the readings it stored in each
    /// and their time span. Counts every reading ever stored: retention does not lower
    /// them (it does lower `streams`).
    fn agent_streams(&self, agent_id: &str) -> Result<Vec<StreamSummary>, StoreError>;

    /// Every `(agent, epoch)` the hub has stored batches for, sorted by agent id, then epoch.
    fn agents(&self) -> Result<Vec<AgentSummary>, StoreError>;

    /// Every module build that computed stored readings, sorted by name, version, hash.
    fn modules(&self) -> Result<Vec<ModuleSummary>, StoreError>;

    /// One-minute rollups of `field` on `stream` for minutes in `[from, to)`, oldest
    /// first (see [`crate::aggregate`]). An unknown stream or field yields none.
    fn rollups(&self, stream: &str, field: &str, from: i64, to: i64) -> Result<Vec<(i64, rollup::Agg)>, StoreError>;

    /// Per-agent aggregates of `q.field` on `q.stream` in buckets of `q.step`, ordered by
    /// bucket then agent, merged from the per-agent one-minute rollups (see
    /// [`crate::aggregate::fleet`]). At most `q.max_rows + 1` rows.
    fn agent_rollups(&self, q: &rollup::AgentRollupQuery) -> Result<Vec<rollup::AgentBucket>, StoreError>;

    /// Checks the database answers a trivial query: for readiness probes.
    fn ping(&self) -> Result<(), StoreError>;

    /// Retention: deletes the readings of every whole UTC day before the day of `ts_ns`
    /// (PostgreSQL drops those days' partitions), and the per-agent rollups of those days.
    /// Stream statistics follow; batch ledger, watermarks, lineage and the stream-wide
    /// one-minute rollups are kept, so a re-sent old batch stays a duplicate and dashboards
    /// keep the aggregated history. Per-agent rollups grow with the fleet, so they follow
    /// the readings' retention. Returns the readings deleted.
    fn drop_days_before(&self, ts_ns: i64) -> Result<u64, StoreError>;

    /// Records an agent's latest presence message (the last one received wins).
    fn record_presence(&self, status: &StatusV1, ext: &StatusExtV2, received_ms: i64) -> Result<(), StoreError>;

    /// Every agent's latest presence message, sorted by agent id.
    fn presence(&self) -> Result<Vec<PresenceRecord>, StoreError>;

    /// Puts a batch in quarantine, durably, in its own transaction: its bytes and the
    /// error are kept until an operator re-ingests or discards it. The same
    /// `(agent_id, epoch, seq)` arriving again updates the existing entry (error, last
    /// receipt, delivery count) and keeps the first payload. Returns the entry's id.
    fn quarantine(&self, q: &NewQuarantine<'_>) -> Result<i64, StoreError>;

    /// The quarantine entry of a batch, if it has one.
    fn quarantine_id(&self, agent_id: &str, epoch: u64, seq: u64) -> Result<Option<i64>, StoreError>;

    /// Quarantined batches with `id > after`, oldest first, at most `limit`.
    fn quarantined(&self, after: i64, limit: usize) -> Result<Vec<QuarantinedBatch>, StoreError>;

    /// One quarantined batch with its payload.
    fn quarantined_payload(&self, id: i64) -> Result<Option<(QuarantinedBatch, Vec<u8>)>, StoreError>;

    /// Removes a quarantine entry (after it was re-ingested, or on an operator's explicit
    /// discard). Returns whether it existed.
    fn release_quarantined(&self, id: i64) -> Result<bool, StoreError>;
}

/// Why a batch was quarantined instead of stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuarantineReason {
    /// The batch's envelope names a valid agent and sequence number, but its content
    /// breaks the protocol's rules (a control character in a name, a timestamp outside
    /// 2000..2200, a fields blob that does not decode...). Typically sent by an agent
    /// older than the hub, or a foreign client.
    Invalid,
    /// The batch passed validation, but the database refused to store it, alone, several
    /// times in a row while it stored other batches and answered pings.
    Rejected,
}

impl QuarantineReason {
    /// Stable lower-case name, stored and served by the API.
    pub fn as_str(self) -> &'static str {
        match self {
            QuarantineReason::Invalid => "invalid",
            QuarantineReason::Rejected => "rejected",
        }
    }

    /// Parses [`QuarantineReason::as_str`].
    pub fn parse(s: &str) -> Result<QuarantineReason, StoreError> {
        match s {
            "invalid" => Ok(QuarantineReason::Invalid),
            "rejected" => Ok(QuarantineReason::Rejected),
            other => Err(StoreError::Corrupt(format!("unknown quarantine reason {other:?}"))),
        }
    }
}

/// A batch to put in quarantine: its raw bytes, exactly as received, and why.
#[derive(Debug, Clone)]
pub struct NewQuarantine<'a> {
    /// Agent id from the topic (validated, equal to the payload's).
    pub agent_id: &'a str,
    /// Epoch from the envelope.
    pub epoch: u64,
    /// Sequence number from the envelope (any `u64`: out-of-range ones are a reason).
    pub seq: u64,
    /// The MQTT topic it arrived on.
    pub topic: &'a str,
    /// Why.
    pub reason: QuarantineReason,
    /// The validation or database error, for the operator.
    pub error: &'a str,
    /// The publish payload, byte for byte.
    pub payload: &'a [u8],
    /// Hub time of receipt, ms since the Unix epoch.
    pub received_ms: i64,
}

/// One quarantined batch, as listed by `GET /api/v1/quarantine`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuarantinedBatch {
    /// Store-assigned id, ascending in order of first quarantine.
    pub id: i64,
    /// Agent id.
    pub agent_id: String,
    /// Store epoch.
    pub epoch: u64,
    /// Sequence number.
    pub seq: u64,
    /// MQTT topic it arrived on.
    pub topic: String,
    /// Why.
    pub reason: QuarantineReason,
    /// The last error.
    pub error: String,
    /// Size of the stored payload.
    pub bytes: u64,
    /// First time it was quarantined, ms since the Unix epoch.
    pub first_received_ms: i64,
    /// Last time it arrived (agents re-send batches whose ack they missed).
    pub last_received_ms: i64,
    /// How many times it arrived and was quarantined.
    pub deliveries: u64,
}

/// The columns both backends select for a quarantine entry, in this order.
pub(crate) const QUARANTINE_COLUMNS: &str =
    "id, agent_id, epoch, seq, topic, reason, error, length(payload), first_received_ms, last_received_ms, deliveries";

/// A quarantine entry from [`QUARANTINE_COLUMNS`] (epoch and seq stored with
/// [`epoch_to_sql`], since a quarantined seq may be beyond `i64`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn quarantine_entry(
    id: i64,
    agent_id: String,
    epoch: i64,
    seq: i64,
    topic: String,
    reason: &str,
    error: String,
    bytes: i64,
    first_received_ms: i64,
    last_received_ms: i64,
    deliveries: i64,
) -> Result<QuarantinedBatch, StoreError> {
    Ok(QuarantinedBatch {
        id,
        agent_id,
        epoch: epoch_from_sql(epoch),
        seq: epoch_from_sql(seq),
        topic,
        reason: QuarantineReason::parse(reason)?,
        error,
        bytes: bytes.max(0) as u64,
        first_received_ms,
        last_received_ms,
        deliveries: deliveries.max(0) as u64,
    })
}

/// Largest page of `GET /api/v1/quarantine`.
pub const MAX_QUARANTINE_PAGE: usize = 1000;

/// Error text as stored: control characters (which PostgreSQL `text` may refuse, U+0000
/// in particular) escaped, at most 4 KiB.
pub(crate) fn storable_text(s: &str) -> String {
    let mut out: String =
        s.chars().flat_map(|c| if c.is_control() { c.escape_default().collect::<Vec<_>>() } else { vec![c] }).collect();
    if out.len() > 4096 {
        let mut end = 4096;
        while !out.is_char_boundary(end) {
            end -= 1;
        }
        out.truncate(end);
    }
    out
}

/// An agent's latest presence message and when the hub received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceRecord {
    /// The message.
    pub status: StatusV1,
    /// What version 2 messages add (defaults for a version 1 message).
    pub ext: StatusExtV2,
    /// Hub time of receipt, ms since the Unix epoch: the agent's last-seen time.
    pub received_ms: i64,
}

impl PresenceRecord {
    /// How old the agent's oldest unacknowledged batch was when it sent this message,
    /// seconds, both times by the agent's clock (so skew between clocks does not matter);
    /// `None` with an empty outbox or from an agent sending version 1 messages.
    pub fn backlog_age_s(&self) -> Option<i64> {
        self.ext.oldest_outbox_ms.map(|t| (self.status.sent_ms - t).max(0) / 1000)
    }

    /// Online: the agent's last message said so and it is not more than three heartbeats
    /// old (a last will may be lost with the broker).
    pub fn online_at(&self, now_ms: i64) -> bool {
        self.status.online && now_ms - self.received_ms <= 3_000 * i64::from(self.status.heartbeat_s.max(1))
    }
}

pub(crate) fn decode_presence(blob: &[u8], received_ms: i64) -> Result<PresenceRecord, StoreError> {
    let (status, ext) = brume_protocol::AgentStatus::decode_full(blob)
        .map_err(|e| StoreError::Corrupt(format!("stored presence does not decode: {e}")))?;
    Ok(PresenceRecord { status, ext, received_ms })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_token_round_trips() {
        let c = Cursor { ts_ns: -5, agent_id: "a.b-c_d".into(), epoch: u64::MAX, seq: 7, idx: 3 };
        assert_eq!(Cursor::from_token(&c.to_token()), Some(c));
    }

    #[test]
    fn bad_cursor_tokens_are_refused() {
        for t in
            ["", "zz", "abc", "3a3a3a3a", &"1:2:3:4:bad agent".bytes().map(|b| format!("{b:02x}")).collect::<String>()]
        {
            assert_eq!(Cursor::from_token(t), None, "{t}");
        }
    }
}
