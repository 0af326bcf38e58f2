//! MQTT session state of sensors, kept in the store so that "exactly once from the
//! sensor" survives a crash of the agent.
//!
//! # The problem
//!
//! A sensor with a persistent session (MQTT 3.1.1 `CleanSession = 0`, MQTT 5
//! `Clean Start = 0` with a session expiry) re-sends every PUBLISH it has no
//! acknowledgement for when it reconnects, with `DUP = 1` and the same packet identifier.
//! If the agent crashed after committing a reading but before its PUBACK left, the re-send
//! would be stored a second time. So the agent records the packet identifier of every
//! committed PUBLISH of a persistent session **in the same transaction as its readings**,
//! and a re-send of a committed identifier is acknowledged without storing anything.
//!
//! # QoS 1
//!
//! A QoS 1 packet identifier is free for reuse as soon as the sensor has the PUBACK, and
//! nothing tells the agent when that is, except the next PUBLISH that reuses it (with
//! `DUP = 0`). So an entry holds the identifier *and a digest of topic and payload*: a
//! `DUP = 1` PUBLISH is a duplicate only if both match an entry. A `DUP = 0` PUBLISH is
//! always new and replaces the entry. The one case this cannot tell apart is a reused
//! identifier carrying byte-for-byte the same topic and payload as the message before it,
//! re-sent because the agent crashed before committing it; sensors that need a strict
//! guarantee use QoS 2, whose release step removes the ambiguity.
//!
//! # QoS 2
//!
//! The entry is written with the readings; PUBREC follows the commit. The identifier
//! stays taken until the sensor's PUBREL, which deletes the entry in a later group commit;
//! PUBCOMP follows *that* commit, so the sensor can only reuse the identifier once the
//! agent has durably forgotten it. Every PUBLISH with a taken identifier is a duplicate.
//!
//! # Bounds
//!
//! A sensor has at most the receive maximum (`listener.max_inflight`) publishes
//! unacknowledged, so only that many most recent entries per client can matter: older ones
//! are evicted in the transaction that adds a new one. Sessions not connected for
//! `listener.session_expiry` are deleted by the retention run; a clean-session CONNECT
//! deletes the client's session at once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rusqlite::{Transaction, params};

use super::StoreError;

/// `last_seen_ms` of a session whose client is connected right now: never expires.
const CONNECTED: i64 = i64::MAX;

/// One PUBLISH of a persistent session, as the store needs to recognise its re-send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishId {
    /// MQTT client id.
    pub client: Arc<str>,
    /// Packet identifier.
    pub pkid: u16,
    /// 1 or 2.
    pub qos: u8,
    /// The DUP flag: the sensor says it may have sent this before.
    pub dup: bool,
    /// Digest of topic and payload ([`digest`]).
    pub digest: i64,
}

/// The digest a QoS 1 re-send is matched on: the first 8 bytes of sha256(topic, 0, payload).
pub fn digest(topic: &str, payload: &[u8]) -> i64 {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(topic.as_bytes());
    h.update([0]);
    h.update(payload);
    let d = h.finalize();
    i64::from_le_bytes(d[..8].try_into().expect("8 bytes"))
}

/// A change to session state, committed by the writer like an append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionOp {
    /// A client connected. `persistent = false` (clean session) deletes its stored state.
    /// The reply says whether a session was present.
    Open {
        /// Client id.
        client: Arc<str>,
        /// Keep the session after the connection ends.
        persistent: bool,
    },
    /// A persistent client disconnected: its expiry starts now.
    Close {
        /// Client id.
        client: Arc<str>,
    },
    /// QoS 2 PUBREL: the identifier is free again. The reply says whether it was taken.
    Release {
        /// Client id.
        client: Arc<str>,
        /// Packet identifier.
        pkid: u16,
    },
}

/// One stored packet identifier.
#[derive(Debug, Clone, Copy)]
struct Entry {
    qos: u8,
    digest: i64,
    /// Insertion order (a reading id), for eviction.
    ord: i64,
}

/// In-memory mirror of `mqtt_sessions` and `mqtt_pkids`, rebuilt with the store's other
/// mirrors after a failed transaction.
#[derive(Debug, Default)]
pub(super) struct Sessions {
    clients: HashMap<Arc<str>, HashMap<u16, Entry>>,
    /// Most entries kept per client (the receive maximum).
    max_pkids: usize,
}

impl Sessions {
    /// Loads the mirror. Sessions marked connected belong to connections that ended with
    /// the previous process: their expiry starts now.
    pub(super) fn load(conn: &rusqlite::Connection, max_pkids: usize, now_ms: i64) -> Result<Sessions, StoreError> {
        conn.execute("UPDATE mqtt_sessions SET last_seen_ms = ?1 WHERE last_seen_ms = ?2", params![now_ms, CONNECTED])?;
        let mut clients: HashMap<Arc<str>, HashMap<u16, Entry>> = HashMap::new();
        let mut q = conn.prepare("SELECT client_id FROM mqtt_sessions")?;
        for c in q.query_map([], |r| r.get::<_, String>(0))? {
            clients.insert(c?.into(), HashMap::new());
        }
        let mut q = conn.prepare("SELECT client_id, pkid, qos, digest, ord FROM mqtt_pkids")?;
        let rows = q.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, u16>(1)?,
                Entry { qos: r.get(2)?, digest: r.get(3)?, ord: r.get(4)? },
            ))
        })?;
        for row in rows {
            let (client, pkid, e) = row?;
            clients.entry(client.into()).or_default().insert(pkid, e);
        }
        Ok(Sessions { clients, max_pkids: max_pkids.max(1) })
    }

    /// Whether `p` repeats a PUBLISH already committed (or committed earlier in the
    /// current transaction).
    pub(super) fn is_duplicate(&self, p: &PublishId) -> bool {
        let Some(e) = self.clients.get(&p.client).and_then(|c| c.get(&p.pkid)) else {
            return false;
        };
        match p.qos {
            2 => e.qos == 2,
            _ => p.dup && e.qos == 1 && e.digest == p.digest,
        }
    }

    /// Records `p` as committed in `tx`, evicting the client's oldest entry beyond the bound.
    pub(super) fn record(&mut self, tx: &Transaction, p: &PublishId, ord: i64) -> Result<(), StoreError> {
        let Some(entries) = self.clients.get_mut(&p.client) else {
            // Not a persistent session (it ended, or was never opened as one): nothing to keep.
            return Ok(());
        };
        tx.prepare_cached(
            "INSERT OR REPLACE INTO mqtt_pkids(client_id, pkid, qos, digest, ord) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?
        .execute(params![&*p.client, p.pkid, p.qos, p.digest, ord])?;
        entries.insert(p.pkid, Entry { qos: p.qos, digest: p.digest, ord });
        while entries.len() > self.max_pkids {
            let (&oldest, _) = entries.iter().min_by_key(|(_, e)| e.ord).expect("not empty");
            entries.remove(&oldest);
            tx.prepare_cached("DELETE FROM mqtt_pkids WHERE client_id = ?1 AND pkid = ?2")?
                .execute(params![&*p.client, oldest])?;
        }
        Ok(())
    }

    /// Applies a session change in `tx`. Returns: `Open` whether a session was present,
    /// `Release` whether the identifier was taken, `Close` whether the session exists.
    pub(super) fn apply(&mut self, tx: &Transaction, op: &SessionOp, now_ms: i64) -> Result<bool, StoreError> {
        match op {
            SessionOp::Open { client, persistent } => {
                let present = self.clients.contains_key(client);
                if *persistent {
                    tx.prepare_cached(
                        "INSERT INTO mqtt_sessions(client_id, last_seen_ms) VALUES (?1, ?2)
                         ON CONFLICT(client_id) DO UPDATE SET last_seen_ms = excluded.last_seen_ms",
                    )?
                    .execute(params![&**client, CONNECTED])?;
                    self.clients.entry(client.clone()).or_default();
                    Ok(present)
                } else {
                    if present {
                        self.forget(tx, client)?;
                    }
                    Ok(false)
                }
            }
            SessionOp::Close { client } => {
                if !self.clients.contains_key(client) {
                    return Ok(false);
                }
                tx.prepare_cached("UPDATE mqtt_sessions SET last_seen_ms = ?2 WHERE client_id = ?1")?
                    .execute(params![&**client, now_ms])?;
                Ok(true)
            }
            SessionOp::Release { client, pkid } => {
                let taken = self.clients.get_mut(client).and_then(|c| c.remove(pkid)).is_some();
                if taken {
                    tx.prepare_cached("DELETE FROM mqtt_pkids WHERE client_id = ?1 AND pkid = ?2")?
                        .execute(params![&**client, pkid])?;
                }
                Ok(taken)
            }
        }
    }

    /// Deletes sessions not connected since `now_ms - expiry`. Returns how many.
    pub(super) fn expire(&mut self, tx: &Transaction, now_ms: i64, expiry: Duration) -> Result<usize, StoreError> {
        let cutoff = now_ms.saturating_sub(expiry.as_millis().min(i64::MAX as u128) as i64);
        let gone: Vec<String> = {
            let mut q = tx.prepare_cached("SELECT client_id FROM mqtt_sessions WHERE last_seen_ms < ?1")?;
            q.query_map([cutoff], |r| r.get(0))?.collect::<Result<_, _>>()?
        };
        for c in &gone {
            self.forget(tx, &Arc::from(c.as_str()))?;
        }
        Ok(gone.len())
    }

    fn forget(&mut self, tx: &Transaction, client: &Arc<str>) -> Result<(), StoreError> {
        tx.prepare_cached("DELETE FROM mqtt_pkids WHERE client_id = ?1")?.execute([&**client])?;
        tx.prepare_cached("DELETE FROM mqtt_sessions WHERE client_id = ?1")?.execute([&**client])?;
        self.clients.remove(client);
        Ok(())
    }
}

/// Schema v3: the tables behind [`Sessions`].
pub(super) const SCHEMA_V3: &str = "
    CREATE TABLE IF NOT EXISTS mqtt_sessions(
        client_id TEXT PRIMARY KEY, last_seen_ms INTEGER NOT NULL) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS mqtt_pkids(
        client_id TEXT NOT NULL, pkid INTEGER NOT NULL, qos INTEGER NOT NULL,
        digest INTEGER NOT NULL, ord INTEGER NOT NULL,
        PRIMARY KEY(client_id, pkid)) WITHOUT ROWID;
";
