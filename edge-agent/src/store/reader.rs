//! [`StoreReader`]: the read-only side of the store.

use std::collections::HashMap;
use std::path::Path;

use brume_protocol::{Batch, ChunkLineage, FieldsBlob, LossReport, ModuleRef, Point, StreamChunk};
use rusqlite::{Connection, OptionalExtension, params};

use super::{ModuleProgress, Store, StoreError, reason_from_code};

/// An inclusive range of reading ids.
type IdRange = (i64, i64);

/// One reading of a stream: when it was taken and its fields.
#[derive(Debug, Clone, PartialEq)]
pub struct TimedFields {
    /// Reading timestamp, ns since the epoch.
    pub ts_ns: i64,
    /// The fields, as stored.
    pub fields: FieldsBlob,
}

/// A stored reading with its place in the store, as a module reads its input.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredReading {
    /// Row id: the store's arrival order, and a module's cursor.
    pub id: i64,
    /// Stream name.
    pub stream: String,
    /// Reading timestamp, ns since the epoch.
    pub ts_ns: i64,
    /// The fields, as stored.
    pub fields: FieldsBlob,
}

/// A read-only connection for building batches to send and answering status queries,
/// so reads never wait behind the writer (WAL readers see the last commit).
pub struct StoreReader {
    conn: Connection,
    agent_id: String,
}

impl StoreReader {
    /// Opens a reader on the store in `dir` (which the writer must have created).
    pub fn open(dir: &Path, agent_id: &str) -> Result<StoreReader, StoreError> {
        let conn = Connection::open_with_flags(
            Store::db_path(dir),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.pragma_update(None, "busy_timeout", 5000)?;
        // Readers scan recent data once (forwarding, module input, history); the OS page
        // cache holds the file. A small page cache keeps each reader (two per module)
        // from holding up to SQLite's default 2 MiB.
        conn.pragma_update(None, "cache_size", -512)?;
        Ok(StoreReader { conn, agent_id: agent_id.to_string() })
    }

    /// Builds the batch with sequence number `seq`, or `None` if it was acknowledged (or
    /// never cut). Readings deleted since the batch was cut are absent.
    pub fn load_batch(&self, epoch: u64, seq: u64) -> Result<Option<Batch>, StoreError> {
        let tx = self.conn.unchecked_transaction()?; // one consistent snapshot
        let Some((first, last, created_ms)) = tx
            .prepare_cached("SELECT first_id, last_id, created_ms FROM outbox WHERE seq = ?1 AND acked = 0")?
            .query_row([seq as i64], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?)))
            .optional()?
        else {
            return Ok(None);
        };
        let mut streams: Vec<StreamChunk> = Vec::new();
        // One chunk per (stream, producer): ingested readings and each module build's
        // outputs travel apart, so the hub knows what computed what.
        let mut index: HashMap<(i64, Option<i64>), usize> = HashMap::new();
        let mut producers: Vec<(usize, i64)> = Vec::new();
        {
            let mut q = tx.prepare_cached(
                "SELECT r.stream_id, s.name, r.ts_ns, r.fields, r.producer FROM readings r JOIN streams s ON s.id = r.stream_id \
                 WHERE r.id BETWEEN ?1 AND ?2 AND s.forward = 1 ORDER BY r.id",
            )?;
            let mut rows = q.query(params![first, last])?;
            while let Some(row) = rows.next()? {
                let key: (i64, Option<i64>) = (row.get(0)?, row.get(4)?);
                let i = match index.get(&key) {
                    Some(&i) => i,
                    None => {
                        streams.push(StreamChunk { stream: row.get(1)?, points: Vec::new() });
                        index.insert(key, streams.len() - 1);
                        if let Some(pid) = key.1 {
                            producers.push((streams.len() - 1, pid));
                        }
                        streams.len() - 1
                    }
                };
                streams[i].points.push(Point { ts_ns: row.get(2)?, fields: FieldsBlob(row.get(3)?) });
            }
        }
        let mut lineage = Vec::with_capacity(producers.len());
        {
            let mut q = tx.prepare_cached("SELECT name, version, hash FROM producers WHERE id = ?1")?;
            for (chunk, pid) in producers {
                let (name, version, hash): (String, String, String) =
                    q.query_row([pid], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
                let sha256 = ModuleRef::parse_sha256(&hash).ok_or_else(|| {
                    StoreError::Corrupt(format!("producer {pid} has hash {hash:?}, not 64 hex digits"))
                })?;
                lineage.push(ChunkLineage { chunk: chunk as u32, module: ModuleRef { name, version, sha256 } });
            }
        }
        let losses = self.losses_in(&tx)?;
        Ok(Some(Batch { agent_id: self.agent_id.clone(), epoch, seq, created_ms, streams, losses, lineage }))
    }

    fn losses_in(&self, conn: &Connection) -> Result<Vec<LossReport>, StoreError> {
        let mut q = conn.prepare_cached(
            "SELECT s.name, l.reason, l.total FROM losses l JOIN streams s ON s.id = l.stream_id ORDER BY s.name, l.reason",
        )?;
        let rows = q.query_map([], |r| {
            Ok(LossReport { stream: r.get(0)?, reason: reason_from_code(r.get(1)?), total: r.get::<_, i64>(2)? as u64 })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The last `n` readings of a stream (by arrival) with a timestamp before `before_ns`,
    /// returned oldest first.
    pub fn last_n(&self, stream: &str, before_ns: i64, n: usize) -> Result<Vec<TimedFields>, StoreError> {
        let tx = self.conn.unchecked_transaction()?; // the directory and its tail from one snapshot
        let Some((sid, tail)) = self.tail_range(stream)? else { return Ok(Vec::new()) };
        let mut dir = tx.prepare_cached(
            "SELECT first_id, last_id, stream_id FROM stream_buckets WHERE stream_id = ?1 AND min_ts < ?2 ORDER BY bucket DESC",
        )?;
        let mut ranges: Vec<(i64, i64, i64)> = vec![(tail.0, tail.1, sid)];
        for r in dir.query_map(params![sid, before_ns], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))? {
            ranges.push(r?);
        }
        let mut q = tx.prepare_cached(
            "SELECT ts_ns, fields FROM readings WHERE id BETWEEN ?1 AND ?2 AND stream_id = ?3 AND ts_ns < ?4 \
             ORDER BY id DESC LIMIT ?5",
        )?;
        let mut out: Vec<TimedFields> = Vec::new();
        for (first, last, sid) in ranges {
            if out.len() >= n {
                break;
            }
            let left = (n - out.len()) as i64;
            let rows = q.query_map(params![first, last, sid, before_ns, left], |r| {
                Ok(TimedFields { ts_ns: r.get(0)?, fields: FieldsBlob(r.get(1)?) })
            })?;
            for row in rows {
                out.push(row?);
            }
        }
        out.reverse();
        Ok(out)
    }

    /// A stream's id and the id range not yet in the directory (readings committed after
    /// `meta.derived_upto`, which the writer keeps in memory), or `None` if there is no
    /// such stream. Call inside a read transaction, with the directory query.
    fn tail_range(&self, stream: &str) -> Result<Option<(i64, IdRange)>, StoreError> {
        let Some(sid) = self
            .conn
            .prepare_cached("SELECT id FROM streams WHERE name = ?1")?
            .query_row([stream], |r| r.get(0))
            .optional()?
        else {
            return Ok(None);
        };
        let upto: i64 = self
            .conn
            .prepare_cached("SELECT value FROM meta WHERE key = 'derived_upto'")?
            .query_row([], |r| r.get(0))
            .optional()?
            .unwrap_or(0);
        Ok(Some((sid, (upto + 1, i64::MAX))))
    }

    /// A module's persisted progress, if any.
    pub fn module_progress(&self, name: &str) -> Result<Option<ModuleProgress>, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT name, version, hash, cursor, state FROM module_progress WHERE name = ?1")?
            .query_row([name], |r| {
                Ok(ModuleProgress {
                    name: r.get(0)?,
                    // Not stored: lineage is recorded per output, in `producers`.
                    module: r.get(0)?,
                    version: r.get(1)?,
                    hash: r.get(2)?,
                    cursor: r.get(3)?,
                    state: r.get(4)?,
                })
            })
            .optional()?)
    }

    /// Where a re-processing of readings from `from_ns` on starts: the cursor before the
    /// first reading that may have such a timestamp, from the stream directory (and
    /// before its unflushed tail, which the directory does not cover yet).
    pub fn reprocess_start(&self, from_ns: i64) -> Result<i64, StoreError> {
        let first: Option<i64> =
            self.conn
                .query_row("SELECT MIN(first_id) FROM stream_buckets WHERE max_ts >= ?1", [from_ns], |r| r.get(0))?;
        let derived_upto: i64 = self
            .conn
            .query_row("SELECT value FROM meta WHERE key = 'derived_upto'", [], |r| r.get(0))
            .optional()?
            .unwrap_or(0);
        Ok(first.unwrap_or(i64::MAX).min(derived_upto + 1) - 1)
    }

    /// The highest reading id committed so far (0 if none).
    pub fn last_id(&self) -> Result<i64, StoreError> {
        Ok(self.conn.query_row("SELECT COALESCE(MAX(id), 0) FROM readings", [], |r| r.get(0))?)
    }

    /// Readings with id > `after` on streams accepted by `wanted`, oldest first, at most
    /// `limit`, and the id up to which the store was scanned (the caller's next cursor,
    /// which moves past readings of other streams even when none matched).
    pub fn readings_after(
        &self,
        after: i64,
        limit: usize,
        wanted: &mut dyn FnMut(&str) -> bool,
    ) -> Result<(Vec<StoredReading>, i64), StoreError> {
        let (rows, cursor, _) =
            self.readings_between(after, i64::MAX, (i64::MIN, i64::MAX), limit, usize::MAX, wanted)?;
        Ok((rows, cursor))
    }

    /// [`readings_after`](Self::readings_after) for re-processing: ids in `(after, upto]`
    /// and timestamps in `[ts.0, ts.1)` only, scanning at most about `max_scan` rows
    /// (so a range far in the past does not hold the thread for the whole store). The
    /// last value says whether the scan reached `upto` (nothing more to read).
    pub fn readings_between(
        &self,
        after: i64,
        upto: i64,
        ts: (i64, i64),
        limit: usize,
        max_scan: usize,
        wanted: &mut dyn FnMut(&str) -> bool,
    ) -> Result<(Vec<StoredReading>, i64, bool), StoreError> {
        let mut names: HashMap<i64, Option<String>> = HashMap::new();
        let mut q = self.conn.prepare_cached(
            "SELECT r.id, r.stream_id, s.name, r.ts_ns, r.fields FROM readings r JOIN streams s ON s.id = r.stream_id \
             WHERE r.id > ?1 AND r.id <= ?2 ORDER BY r.id LIMIT 4096",
        )?;
        let mut out = Vec::new();
        let mut cursor = after;
        let mut total = 0usize;
        loop {
            let mut rows = q.query([cursor, upto])?;
            let mut scanned = 0;
            while let Some(row) = rows.next()? {
                scanned += 1;
                let id: i64 = row.get(0)?;
                let sid: i64 = row.get(1)?;
                let name = names.entry(sid).or_insert_with(|| {
                    let n: String = row.get(2).unwrap_or_default();
                    wanted(&n).then_some(n)
                });
                let ts_ns: i64 = row.get(3)?;
                if let Some(n) = name.as_ref().filter(|_| (ts.0..ts.1).contains(&ts_ns)) {
                    out.push(StoredReading { id, stream: n.clone(), ts_ns, fields: FieldsBlob(row.get(4)?) });
                }
                cursor = id;
                if out.len() >= limit {
                    return Ok((out, cursor, cursor >= upto));
                }
            }
            if scanned < 4096 {
                return Ok((out, cursor, true));
            }
            total += scanned;
            if total >= max_scan {
                return Ok((out, cursor, cursor >= upto));
            }
        }
    }

    /// Cumulative loss counters.
    pub fn losses(&self) -> Result<Vec<LossReport>, StoreError> {
        self.losses_in(&self.conn)
    }

    /// The sequence numbers of unacknowledged batches greater than `after`, oldest first.
    pub fn pending_seqs(&self, after: u64, limit: usize) -> Result<Vec<u64>, StoreError> {
        let mut q =
            self.conn.prepare_cached("SELECT seq FROM outbox WHERE seq > ?1 AND acked = 0 ORDER BY seq LIMIT ?2")?;
        let rows = q.query_map(params![after as i64, limit as i64], |r| r.get::<_, i64>(0).map(|v| v as u64))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Readings of a stream in `[from_ns, to_ns)`, oldest first, at most `limit`.
    pub fn readings(
        &self,
        stream: &str,
        from_ns: i64,
        to_ns: i64,
        limit: usize,
    ) -> Result<Vec<TimedFields>, StoreError> {
        let tx = self.conn.unchecked_transaction()?; // the directory and its tail from one snapshot
        let Some((sid, tail)) = self.tail_range(stream)? else { return Ok(Vec::new()) };
        let mut dir = tx.prepare_cached(
            "SELECT first_id, last_id, stream_id FROM stream_buckets \
             WHERE stream_id = ?1 AND max_ts >= ?2 AND min_ts < ?3 ORDER BY bucket",
        )?;
        let mut ranges: Vec<(i64, i64, i64)> = dir
            .query_map(params![sid, from_ns, to_ns], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<Result<_, _>>()?;
        ranges.push((tail.0, tail.1, sid));
        let mut q = tx.prepare_cached(
            "SELECT ts_ns, id, fields FROM readings \
             WHERE id BETWEEN ?1 AND ?2 AND stream_id = ?3 AND ts_ns >= ?4 AND ts_ns < ?5 ORDER BY id",
        )?;
        let mut out: Vec<(i64, i64, FieldsBlob)> = Vec::new();
        for (first, last, sid) in ranges {
            let rows = q.query_map(params![first, last, sid, from_ns, to_ns], |r| {
                Ok((r.get(0)?, r.get(1)?, FieldsBlob(r.get(2)?)))
            })?;
            for row in rows {
                out.push(row?);
            }
        }
        // Readings may carry their own timestamps, so arrival order is not time order.
        out.sort_by_key(|(ts, id, _)| (*ts, *id));
        out.truncate(limit);
        Ok(out.into_iter().map(|(ts_ns, _, fields)| TimedFields { ts_ns, fields }).collect())
    }
}
