//! Budgets and retention: what goes when a stream or the store is over its byte budget,
//! or readings are older than their stream's `max_age`, and how those deletions are
//! counted as losses.

use std::collections::HashMap;

use brume_protocol::LossReason;
use rusqlite::{OptionalExtension, params};

use super::{ApplyOutcome, ROW_OVERHEAD, State, Store, StoreError, bucket_of, now_ms};
use crate::config::WhenFull;

impl Store {
    /// Deletes readings older than each stream's `max_age` (by reading timestamp).
    pub fn expire(&mut self, now_ns: i64) -> Result<ApplyOutcome, StoreError> {
        let res = (|| {
            let tx = self.conn.transaction()?;
            let mut lost = HashMap::new();
            // Victims are found through the directory: it must be complete.
            self.st.flush_derived(&tx)?;
            let victims: Vec<(i64, i64)> = self
                .st
                .streams
                .values()
                .map(|s| (s.id, now_ns.saturating_sub(s.rule.max_age.as_nanos().min(i64::MAX as u128) as i64)))
                .collect();
            for (sid, cutoff) in victims {
                let ranges: Vec<(i64, i64)> = {
                    let mut q = tx.prepare_cached(
                        "SELECT first_id, last_id FROM stream_buckets WHERE stream_id = ?1 AND min_ts < ?2 ORDER BY bucket",
                    )?;
                    q.query_map(params![sid, cutoff], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<Result<_, _>>()?
                };
                for (first, last) in ranges {
                    let rows: Vec<(i64, u64)> = {
                        let mut q = tx.prepare_cached(
                            "SELECT id, length(fields) FROM readings \
                             WHERE id BETWEEN ?1 AND ?2 AND stream_id = ?3 AND ts_ns < ?4",
                        )?;
                        q.query_map(params![first, last, sid, cutoff], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?
                            .collect::<Result<_, _>>()?
                    };
                    self.st.delete_rows(&tx, sid, &rows, LossReason::Retention, &mut lost)?;
                }
            }
            let expired = self.st.sessions.expire(&tx, now_ms(), self.st.opts.session_expiry)?;
            if expired > 0 {
                tracing::info!(
                    sessions = expired,
                    "expired MQTT sessions of sensors not seen for listener.session_expiry"
                );
            }
            self.st.write_back(&tx, &lost)?;
            // After write_back: the losses of this run are in the table, so a stream that
            // just lost readings is kept to report them.
            let removed = self.st.delete_empty_streams(&tx)?;
            if removed > 0 {
                tracing::info!(
                    streams = removed,
                    "deleted streams left empty by retention; their budget is free again"
                );
            }
            tx.commit()?;
            let dropped = lost
                .into_iter()
                .filter_map(|((sid, reason), n)| Some((self.st.stream_names.get(&sid)?.clone(), reason, n)))
                .collect();
            Ok(ApplyOutcome { dropped, ..ApplyOutcome::default() })
        })();
        if res.is_err() {
            let _ = self.reload();
        }
        res
    }
}

impl State {
    /// Streams over budget lose their oldest readings (policy `drop_oldest`); then, if the
    /// whole store is over budget, the oldest readings of `drop_oldest` streams go.
    pub(super) fn enforce_budgets(
        &mut self,
        tx: &rusqlite::Transaction,
        lost: &mut HashMap<(i64, LossReason), u64>,
    ) -> Result<(), StoreError> {
        let over: Vec<(i64, u64)> = self
            .streams
            .values()
            .filter(|s| s.rule.when_full == WhenFull::DropOldest && s.bytes > s.rule.max_bytes.as_u64())
            // Free 10% below the budget so we do not delete on every commit.
            .map(|s| (s.id, s.bytes - s.rule.max_bytes.as_u64() * 9 / 10))
            .collect();
        if !over.is_empty() || self.total_bytes > self.opts.max_bytes {
            // Deletions go through the directory and adjust it: it must be complete.
            self.flush_derived(tx)?;
        }
        for (sid, mut to_free) in over {
            // Oldest first by arrival (id), bucket by bucket through the directory.
            let mut after = 0i64;
            while to_free > 0 {
                let rows: Vec<(i64, u64)> = {
                    let range: Option<(i64, i64)> = tx
                        .prepare_cached(
                            "SELECT first_id, last_id FROM stream_buckets \
                             WHERE stream_id = ?1 AND last_id > ?2 ORDER BY bucket LIMIT 1",
                        )?
                        .query_row(params![sid, after], |r| Ok((r.get(0)?, r.get(1)?)))
                        .optional()?;
                    let Some((first, last)) = range else { break };
                    let mut q = tx.prepare_cached(
                        "SELECT id, length(fields) FROM readings \
                         WHERE id BETWEEN ?1 AND ?2 AND stream_id = ?3 ORDER BY id LIMIT 512",
                    )?;
                    let rows: Vec<(i64, u64)> = q
                        .query_map(params![first.max(after + 1), last, sid], |r| {
                            Ok((r.get(0)?, r.get::<_, i64>(1)? as u64))
                        })?
                        .collect::<Result<_, _>>()?;
                    after = rows.last().map_or(last, |r| r.0);
                    rows
                };
                if rows.is_empty() {
                    break;
                }
                let mut take = Vec::new();
                for (id, len) in rows {
                    if to_free == 0 {
                        break;
                    }
                    to_free = to_free.saturating_sub(len + ROW_OVERHEAD);
                    take.push((id, len));
                }
                self.delete_rows(tx, sid, &take, LossReason::StoreFull, lost)?;
            }
        }
        if self.total_bytes > self.opts.max_bytes {
            let mut to_free = self.total_bytes - self.opts.max_bytes * 9 / 10;
            let mut after = 0i64;
            while to_free > 0 {
                let rows: Vec<(i64, i64, u64)> = {
                    let mut q = tx.prepare_cached(
                        "SELECT id, stream_id, length(fields) FROM readings WHERE id > ?1 ORDER BY id LIMIT 1024",
                    )?;
                    q.query_map([after], |r| Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u64)))?
                        .collect::<Result<_, _>>()?
                };
                let Some(last) = rows.last() else { break };
                after = last.0;
                let mut by_stream: HashMap<i64, Vec<(i64, u64)>> = HashMap::new();
                for (id, sid, len) in rows {
                    if to_free == 0 {
                        break;
                    }
                    let drop_oldest = self
                        .stream_names
                        .get(&sid)
                        .and_then(|n| self.streams.get(n))
                        .is_some_and(|s| s.rule.when_full == WhenFull::DropOldest);
                    if drop_oldest {
                        to_free = to_free.saturating_sub(len + ROW_OVERHEAD);
                        by_stream.entry(sid).or_default().push((id, len));
                    }
                }
                for (sid, rows) in by_stream {
                    self.delete_rows(tx, sid, &rows, LossReason::StoreFull, lost)?;
                }
            }
        }
        Ok(())
    }

    /// Deletes readings of one stream and counts those the hub had not acknowledged.
    fn delete_rows(
        &mut self,
        tx: &rusqlite::Transaction,
        sid: i64,
        rows: &[(i64, u64)],
        reason: LossReason,
        lost: &mut HashMap<(i64, LossReason), u64>,
    ) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut del = tx.prepare_cached("DELETE FROM readings WHERE id = ?1")?;
        let mut n_lost = 0;
        let mut freed = 0;
        let mut per_bucket: HashMap<i64, i64> = HashMap::new();
        // A stream kept as local history only (`forward = false`, or forwarding off) never
        // goes to the hub, so deleting its readings loses nothing the hub was promised.
        let forwarded = self.opts.forwarding
            && self.stream_names.get(&sid).and_then(|n| self.streams.get(n)).is_none_or(|s| s.rule.forward);
        for &(id, len) in rows {
            del.execute([id])?;
            *per_bucket.entry(bucket_of(id)).or_default() += 1;
            freed += len + ROW_OVERHEAD;
            if forwarded && self.is_unacked(id) {
                n_lost += 1;
            }
        }
        if n_lost > 0 {
            *lost.entry((sid, reason)).or_default() += n_lost;
        }
        // The directory keeps counts exact; its id and time bounds stay as (still valid)
        // outer bounds until the bucket is empty for the stream and its row goes.
        let mut dec =
            tx.prepare_cached("UPDATE stream_buckets SET count = count - ?3 WHERE bucket = ?1 AND stream_id = ?2")?;
        let mut gone =
            tx.prepare_cached("DELETE FROM stream_buckets WHERE bucket = ?1 AND stream_id = ?2 AND count <= 0")?;
        for (bucket, n) in per_bucket {
            dec.execute(params![bucket, sid, n])?;
            gone.execute(params![bucket, sid])?;
        }
        self.deleted = true;
        if let Some(st) = self.stream_names.get(&sid).and_then(|n| self.streams.get_mut(n)) {
            st.bytes = st.bytes.saturating_sub(freed);
            st.count = st.count.saturating_sub(rows.len() as u64);
            st.dirty = true;
        }
        self.total_bytes = self.total_bytes.saturating_sub(freed);
        self.total_count = self.total_count.saturating_sub(rows.len() as u64);
        Ok(())
    }

    /// Deletes streams that hold no readings any more and have no loss to report, so that
    /// `store.max_streams` counts streams in use: a flood of one-off topics ages out
    /// instead of exhausting the budget for good. A stream with losses is kept, since its
    /// name is how every batch reports them to the hub. Returns how many went.
    fn delete_empty_streams(&mut self, tx: &rusqlite::Transaction) -> Result<usize, StoreError> {
        let empty: Vec<(i64, String)> =
            self.streams.iter().filter(|(_, s)| s.count == 0).map(|(n, s)| (s.id, n.clone())).collect();
        let mut removed = 0;
        for (id, name) in empty {
            let has_losses: bool = tx
                .prepare_cached("SELECT EXISTS(SELECT 1 FROM losses WHERE stream_id = ?1 AND total > 0)")?
                .query_row([id], |r| r.get(0))?;
            if has_losses {
                continue;
            }
            tx.prepare_cached("DELETE FROM stream_buckets WHERE stream_id = ?1")?.execute([id])?;
            tx.prepare_cached("DELETE FROM losses WHERE stream_id = ?1")?.execute([id])?;
            tx.prepare_cached("DELETE FROM streams WHERE id = ?1")?.execute([id])?;
            self.streams.remove(&name);
            self.stream_names.remove(&id);
            removed += 1;
        }
        Ok(removed)
    }

    /// Whether a reading id is not yet acknowledged by the hub: not batched yet, or
    /// inside a batch still in the outbox.
    fn is_unacked(&self, id: i64) -> bool {
        if id > self.batched_upto {
            return true;
        }
        // Batches cover increasing disjoint ranges; find the last one starting at or
        // before `id`. The outbox is small (a window plus an outage's backlog), and
        // deletions are rare, so a linear scan from the front is fine.
        self.outbox.values().take_while(|e| e.first_id <= id).any(|e| id <= e.last_id)
    }
}
