//! The hub's one-minute rollups: per `(stream, field, minute)` count, sum, min, max and
//! last value, and the same per `(stream, agent, field, minute)` for fleet-level queries
//! (mean and percentiles over the agents with some label), both updated by the stores in
//! the ingest transaction (see [`crate::aggregate`] for the queries that read them). Storage primitives: `aggregate`
//! sits above the store and uses these; the store never reaches up into `aggregate`.

use std::collections::BTreeMap;

use brume_protocol::{FieldsBlob, Value};

use super::StoreError;

/// Width of the stored rollups.
pub const ROLLUP_NS: i64 = 60 * 1_000_000_000;

/// Count, sum, min, max and last value of a numeric field over some readings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Agg {
    /// Readings with the field.
    pub count: u64,
    /// Sum of the values.
    pub sum: f64,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
    /// Timestamp of `last`.
    pub last_ts_ns: i64,
    /// The value at the greatest timestamp (ties: the greatest value).
    pub last: f64,
}

impl Agg {
    /// One reading.
    pub fn of(ts_ns: i64, v: f64) -> Agg {
        Agg { count: 1, sum: v, min: v, max: v, last_ts_ns: ts_ns, last: v }
    }

    /// Adds `o` into `self`.
    pub fn merge(&mut self, o: &Agg) {
        self.count += o.count;
        self.sum += o.sum;
        self.min = self.min.min(o.min);
        self.max = self.max.max(o.max);
        if (o.last_ts_ns, o.last) > (self.last_ts_ns, self.last) {
            self.last_ts_ns = o.last_ts_ns;
            self.last = o.last;
        }
    }

    /// Mean value.
    pub fn mean(&self) -> f64 {
        self.sum / self.count as f64
    }
}

/// The numeric fields of a reading: floats (finite ones) and integers, by name.
pub fn numeric_fields(fields: &FieldsBlob) -> Result<Vec<(String, f64)>, StoreError> {
    let decoded = fields.decode().map_err(|e| StoreError::Corrupt(format!("stored fields do not decode: {e}")))?;
    Ok(decoded
        .into_iter()
        .filter_map(|f| match f.value {
            Value::F64(v) if v.is_finite() => Some((f.name, v)),
            Value::I64(v) => Some((f.name, v as f64)),
            _ => None,
        })
        .collect())
}

/// Start of the rollup minute of `ts_ns`.
pub fn minute_of(ts_ns: i64) -> i64 {
    floor_to(ts_ns, ROLLUP_NS)
}

/// `ts` rounded down to a multiple of `step` (towards minus infinity).
pub(crate) fn floor_to(ts: i64, step: i64) -> i64 {
    ts.saturating_sub(ts.rem_euclid(step))
}

/// Rollup deltas of the readings of one ingest transaction, in key order (the order the
/// stores write them, so concurrent hubs lock rows in the same order).
#[derive(Debug, Default)]
pub struct RollupDeltas {
    /// By `(stream id, field, minute)`: the stream-wide rollups.
    pub streams: BTreeMap<(i64, String, i64), Agg>,
    /// By `(stream id, agent id, field, minute)`: the per-agent rollups.
    pub agents: BTreeMap<(i64, String, String, i64), Agg>,
}

impl RollupDeltas {
    /// Adds one stored reading to the stream-wide rollups.
    pub fn add(&mut self, stream_id: i64, ts_ns: i64, fields: &FieldsBlob) -> Result<(), StoreError> {
        for (name, v) in numeric_fields(fields)? {
            self.put_stream(stream_id, name, ts_ns, v);
        }
        Ok(())
    }

    /// Adds one stored reading of `agent_id` to the per-agent rollups.
    pub fn add_for_agent(
        &mut self,
        stream_id: i64,
        agent_id: &str,
        ts_ns: i64,
        fields: &FieldsBlob,
    ) -> Result<(), StoreError> {
        for (name, v) in numeric_fields(fields)? {
            self.put_agent(stream_id, agent_id, name, ts_ns, v);
        }
        Ok(())
    }

    /// Adds one stored reading to both, decoding its fields once.
    pub fn add_both(
        &mut self,
        stream_id: i64,
        agent_id: &str,
        ts_ns: i64,
        fields: &FieldsBlob,
    ) -> Result<(), StoreError> {
        for (name, v) in numeric_fields(fields)? {
            self.put_stream(stream_id, name.clone(), ts_ns, v);
            self.put_agent(stream_id, agent_id, name, ts_ns, v);
        }
        Ok(())
    }

    fn put_stream(&mut self, stream_id: i64, field: String, ts_ns: i64, v: f64) {
        let a = Agg::of(ts_ns, v);
        self.streams.entry((stream_id, field, minute_of(ts_ns))).and_modify(|x| x.merge(&a)).or_insert(a);
    }

    fn put_agent(&mut self, stream_id: i64, agent_id: &str, field: String, ts_ns: i64, v: f64) {
        let a = Agg::of(ts_ns, v);
        self.agents
            .entry((stream_id, agent_id.to_owned(), field, minute_of(ts_ns)))
            .and_modify(|x| x.merge(&a))
            .or_insert(a);
    }
}

/// One row of a fleet-level rollup query: an agent's aggregate over one bucket.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentBucket {
    /// Bucket start, ns.
    pub start: i64,
    /// The agent.
    pub agent_id: String,
    /// Readings in the bucket.
    pub count: u64,
    /// Their sum.
    pub sum: f64,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
}

/// A fleet-level rollup query: per-agent aggregates of one field of one stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentRollupQuery {
    /// Stored stream name.
    pub stream: String,
    /// Numeric field.
    pub field: String,
    /// Inclusive start, ns, a multiple of `step`.
    pub from: i64,
    /// Exclusive end, ns, a multiple of `step`.
    pub to: i64,
    /// Bucket width, ns: a whole number of minutes.
    pub step: i64,
    /// Only these agents; all when `None`.
    pub agents: Option<Vec<String>>,
    /// The store returns at most this many rows plus one, so the caller can tell an
    /// answer that would be larger (and refuse it) without reading all of it.
    pub max_rows: usize,
}
