//! The store's file: connection settings and schema migrations.

use std::path::Path;

use rusqlite::Connection;

use super::{StoreError, sessions};
use crate::config::Durability;

/// Schema version this agent writes (`PRAGMA user_version`).
pub(super) const SCHEMA_VERSION: i64 = 4;

/// Opens a connection with the store's pragmas.
pub(super) fn open_conn(path: &Path, durability: Durability, page_size: i64) -> Result<Connection, StoreError> {
    let conn = Connection::open(path)?;
    // Set before the file exists (it is fixed afterwards in WAL mode). A commit rewrites
    // the last, partly filled page of `readings`: at sensor rates that page is most of
    // what a commit writes, so small pages mean fewer bytes written per reading.
    conn.pragma_update(None, "page_size", page_size)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // Checkpoint every 4 MiB of WAL whatever the page size (of this file, which may
    // predate the setting).
    let actual: i64 = conn.pragma_query_value(None, "page_size", |r| r.get(0))?;
    conn.pragma_update(None, "wal_autocheckpoint", 4 * 1024 * 1024 / actual.max(512))?;
    conn.pragma_update(None, "synchronous", if durability == Durability::Full { "FULL" } else { "NORMAL" })?;
    conn.pragma_update(None, "busy_timeout", 5000)?;
    // Keep the WAL from growing without bound during a long outage with many commits.
    conn.pragma_update(None, "journal_size_limit", 64 * 1024 * 1024)?;
    Ok(conn)
}

/// Brings the schema up to [`SCHEMA_VERSION`]; refuses a newer one.
pub(super) fn migrate(conn: &Connection) -> Result<(), StoreError> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::Corrupt(format!(
            "agent.db has schema version {version}, this agent knows up to {SCHEMA_VERSION}: it was written by a newer \
             agent; run that version, or move the data directory aside to start empty"
        )));
    }
    if version < 1 {
        conn.execute_batch(
            "BEGIN;
             CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS streams(
                 id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE,
                 bytes INTEGER NOT NULL, count INTEGER NOT NULL, forward INTEGER NOT NULL DEFAULT 1);
             CREATE TABLE IF NOT EXISTS readings(
                 id INTEGER PRIMARY KEY, stream_id INTEGER NOT NULL,
                 ts_ns INTEGER NOT NULL, fields BLOB NOT NULL);
             CREATE TABLE IF NOT EXISTS stream_buckets(
                 bucket INTEGER NOT NULL, stream_id INTEGER NOT NULL,
                 first_id INTEGER NOT NULL, last_id INTEGER NOT NULL,
                 min_ts INTEGER NOT NULL, max_ts INTEGER NOT NULL, count INTEGER NOT NULL,
                 PRIMARY KEY(bucket, stream_id)) WITHOUT ROWID;
             CREATE INDEX IF NOT EXISTS stream_buckets_by_stream ON stream_buckets(stream_id, bucket);
             CREATE TABLE IF NOT EXISTS outbox(
                 seq INTEGER PRIMARY KEY, first_id INTEGER NOT NULL, last_id INTEGER NOT NULL,
                 readings INTEGER NOT NULL, created_ms INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS module_progress(
                 name TEXT PRIMARY KEY, hash TEXT NOT NULL, cursor INTEGER NOT NULL,
                 state BLOB NOT NULL, updated_ms INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS losses(
                 stream_id INTEGER NOT NULL, reason INTEGER NOT NULL, total INTEGER NOT NULL,
                 PRIMARY KEY(stream_id, reason)) WITHOUT ROWID;
             PRAGMA user_version = 1;
             COMMIT;",
        )?;
    }
    if version < 2 {
        // Lineage: which module build wrote a reading (NULL: ingested).
        conn.execute_batch(
            "BEGIN;
             ALTER TABLE readings ADD COLUMN producer INTEGER;
             ALTER TABLE module_progress ADD COLUMN version TEXT NOT NULL DEFAULT '';
             CREATE TABLE IF NOT EXISTS producers(
                 id INTEGER PRIMARY KEY, name TEXT NOT NULL, version TEXT NOT NULL, hash TEXT NOT NULL,
                 UNIQUE(name, version, hash));
             PRAGMA user_version = 2;
             COMMIT;",
        )?;
    }
    if version < 3 {
        // MQTT sessions of sensors (exactly once from the sensor).
        conn.execute_batch(&format!("BEGIN; {} PRAGMA user_version = 3; COMMIT;", sessions::SCHEMA_V3))?;
    }
    if version < 4 {
        // The derived state (stream counters, directory, `meta` counters) is written
        // every DERIVED_FLUSH_READINGS readings instead of every commit; until now it
        // was always complete. The newest acknowledged batch row stays, marked.
        conn.execute_batch(
            "BEGIN;
             ALTER TABLE outbox ADD COLUMN acked INTEGER NOT NULL DEFAULT 0;
             INSERT OR REPLACE INTO meta(key, value) SELECT 'derived_upto', COALESCE(MAX(id), 0) FROM readings;
             PRAGMA user_version = 4;
             COMMIT;",
        )?;
    }
    debug_assert_eq!(SCHEMA_VERSION, 4);
    Ok(())
}
