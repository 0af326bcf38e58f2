//! Server-side aggregation: readings of one numeric field of one stream, in time buckets
//! (count, min, max, mean, last), so a dashboard can show a month in 500 points.
//!
//! Both stores keep **one-minute rollups** per `(stream, field, minute)`, updated in the
//! ingest transaction from the readings of new batches only (a duplicate batch adds
//! nothing). A query whose step is a whole number of minutes merges rollups: 30 days at
//! any rate is at most 43,200 rows. A finer step reads and decodes the raw readings, up to
//! [`MAX_RAW_READINGS`].
//!
//! **Fleet-level** queries ([`fleet`]) combine one stream across many agents (those with
//! some label): per bucket, the readings' count, min, max and mean over all of them, and
//! the median and 95th percentile *across agents* of each agent's mean in that bucket
//! ("how hot is the hottest 5% of plant 1"). They read per-agent one-minute rollups, so
//! their step is a whole number of minutes.
//!
//! Merging is order-independent, because hubs ingest the same stream in any order:
//! count, sum, min and max commute, and `last` is the value at the greatest timestamp,
//! ties going to the greater value.

use std::collections::BTreeMap;

use crate::store::rollup::floor_to;
pub use crate::store::rollup::{
    AgentBucket, AgentRollupQuery, Agg, ROLLUP_NS, RollupDeltas, minute_of, numeric_fields,
};
use crate::store::{HubStore, ReadingsQuery, StoreError};

/// Most buckets one query may return.
pub const MAX_BUCKETS: i64 = 10_000;

/// Most raw readings a sub-minute query may read.
pub const MAX_RAW_READINGS: usize = 2_000_000;

/// An aggregation query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AggregateQuery {
    /// Stream name.
    pub stream: String,
    /// Numeric field.
    pub field: String,
    /// Inclusive start, ns; rounded down to a whole step.
    pub from: i64,
    /// Exclusive end, ns; rounded up to a whole step.
    pub to: i64,
    /// Bucket width, ns. Buckets start at multiples of it since the Unix epoch.
    pub step: i64,
}

/// Buckets with data, oldest first, and where they came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Aggregated {
    /// The range actually covered, after rounding to whole steps.
    pub from: i64,
    /// Exclusive end of the covered range.
    pub to: i64,
    /// Bucket start and aggregate, for buckets with at least one reading.
    pub buckets: Vec<(i64, Agg)>,
    /// True when computed from one-minute rollups, false from raw readings.
    pub from_rollups: bool,
}

/// Why a query cannot be answered as asked.
#[derive(Debug, thiserror::Error)]
pub enum AggregateError {
    /// A parameter is out of range.
    #[error("{0}")]
    Invalid(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Most `(bucket, agent)` rows one fleet query may merge: 500 buckets of 2,000 agents.
/// Bounds the memory and time of one query whatever the fleet's size.
pub const MAX_FLEET_ROWS: usize = 1_000_000;

/// A fleet-level aggregation query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetQuery {
    /// Stored stream name.
    pub stream: String,
    /// Numeric field.
    pub field: String,
    /// Inclusive start, ns; rounded down to a whole step.
    pub from: i64,
    /// Exclusive end, ns; rounded up to a whole step.
    pub to: i64,
    /// Bucket width, ns: a whole number of minutes.
    pub step: i64,
    /// Only these agents (already resolved from labels); all when `None`.
    pub agents: Option<Vec<String>>,
}

/// One bucket of a fleet-level answer.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetBucket {
    /// Bucket start, ns.
    pub start: i64,
    /// Agents with at least one reading in the bucket.
    pub agents: usize,
    /// Readings over all of them.
    pub count: u64,
    /// Smallest value of any agent.
    pub min: f64,
    /// Largest value of any agent.
    pub max: f64,
    /// Mean of all readings (agents weighted by their reading counts).
    pub mean: f64,
    /// Median of the agents' means.
    pub p50: f64,
    /// 95th percentile of the agents' means.
    pub p95: f64,
}

/// The answer of [`fleet`]: buckets with data, oldest first.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetAggregated {
    /// The range actually covered, after rounding to whole steps.
    pub from: i64,
    /// Exclusive end of the covered range.
    pub to: i64,
    /// Buckets with at least one reading.
    pub buckets: Vec<FleetBucket>,
}

/// The `p`-th percentile (0–100) of sorted values, interpolating linearly between the
/// closest ranks (PostgreSQL's `percentile_cont`, numpy's default).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    match sorted.len() {
        0 => f64::NAN,
        1 => sorted[0],
        n => {
            let rank = p / 100.0 * (n - 1) as f64;
            let lo = rank.floor() as usize;
            let hi = (lo + 1).min(n - 1);
            sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64)
        }
    }
}

/// The range `[from, to)` rounded outwards to whole steps, checked for size.
fn bucket_range(from: i64, to: i64, step: i64) -> Result<(i64, i64), AggregateError> {
    if step <= 0 {
        return Err(AggregateError::Invalid("step must be positive".into()));
    }
    if from >= to {
        return Err(AggregateError::Invalid(format!("from ({from}) must be before to ({to})")));
    }
    let lo = floor_to(from, step);
    let hi = to.saturating_add((step - to.rem_euclid(step)) % step);
    let n = (i128::from(hi) - i128::from(lo)) / i128::from(step);
    if n > i128::from(MAX_BUCKETS) {
        return Err(AggregateError::Invalid(format!(
            "{n} buckets requested, at most {MAX_BUCKETS}: use a larger step or fewer buckets"
        )));
    }
    Ok((lo, hi))
}

/// Answers a fleet-level query from the per-agent rollups.
pub fn fleet(store: &dyn HubStore, q: &FleetQuery) -> Result<FleetAggregated, AggregateError> {
    if q.step % ROLLUP_NS != 0 {
        return Err(AggregateError::Invalid(
            "fleet aggregation reads one-minute rollups: the step must be a whole number of minutes".into(),
        ));
    }
    let (from, to) = bucket_range(q.from, q.to, q.step)?;
    if q.agents.as_ref().is_some_and(Vec::is_empty) {
        return Ok(FleetAggregated { from, to, buckets: Vec::new() });
    }
    let rows = store.agent_rollups(&AgentRollupQuery {
        stream: q.stream.clone(),
        field: q.field.clone(),
        from,
        to,
        step: q.step,
        agents: q.agents.clone(),
        max_rows: MAX_FLEET_ROWS,
    })?;
    if rows.len() > MAX_FLEET_ROWS {
        return Err(AggregateError::Invalid(format!(
            "more than {MAX_FLEET_ROWS} agent-buckets in range: use a larger step, a shorter range or a label that selects fewer agents"
        )));
    }
    // Rows come ordered by bucket: fold each run of one bucket.
    let mut buckets = Vec::new();
    for run in rows.chunk_by(|a, b| a.start == b.start) {
        let mut means: Vec<f64> = run.iter().map(|r| r.sum / r.count as f64).collect();
        means.sort_by(f64::total_cmp);
        let count: u64 = run.iter().map(|r| r.count).sum();
        buckets.push(FleetBucket {
            start: run[0].start,
            agents: run.len(),
            count,
            min: run.iter().map(|r| r.min).fold(f64::INFINITY, f64::min),
            max: run.iter().map(|r| r.max).fold(f64::NEG_INFINITY, f64::max),
            mean: run.iter().map(|r| r.sum).sum::<f64>() / count as f64,
            p50: percentile(&means, 50.0),
            p95: percentile(&means, 95.0),
        });
    }
    Ok(FleetAggregated { from, to, buckets })
}

/// Chooses a step for about `buckets` buckets over `[from, to)`: a whole number of
/// minutes when that is at least a minute, so the rollups answer.
pub fn step_for(from: i64, to: i64, buckets: i64) -> i64 {
    let span = i128::from(to) - i128::from(from);
    let raw = (span.max(1) + i128::from(buckets) - 1) / i128::from(buckets.max(1));
    let raw = i64::try_from(raw).unwrap_or(i64::MAX).max(1);
    if raw >= ROLLUP_NS { ((raw - 1) / ROLLUP_NS + 1).saturating_mul(ROLLUP_NS) } else { raw }
}

/// Answers `q` from `store`.
pub fn aggregate(store: &dyn HubStore, q: &AggregateQuery) -> Result<Aggregated, AggregateError> {
    let (from, to) = bucket_range(q.from, q.to, q.step)?;
    let mut out: BTreeMap<i64, Agg> = BTreeMap::new();
    let mut put = |start: i64, a: &Agg| {
        out.entry(start).and_modify(|x| x.merge(a)).or_insert(*a);
    };
    let from_rollups = q.step % ROLLUP_NS == 0;
    if from_rollups {
        for (minute, a) in store.rollups(&q.stream, &q.field, from, to)? {
            put(floor_to(minute, q.step), &a);
        }
    } else {
        let mut query =
            ReadingsQuery { stream: q.stream.clone(), from: Some(from), to: Some(to), limit: 10_000, after: None };
        let mut seen = 0usize;
        loop {
            let page = store.readings(&query)?;
            seen += page.readings.len();
            if seen > MAX_RAW_READINGS {
                return Err(AggregateError::Invalid(format!(
                    "more than {MAX_RAW_READINGS} readings in range for a step under a minute: use a step that is a whole number of minutes"
                )));
            }
            for r in &page.readings {
                if let Some((_, v)) = numeric_fields(&r.fields)?.into_iter().find(|(n, _)| *n == q.field) {
                    put(floor_to(r.ts_ns, q.step), &Agg::of(r.ts_ns, v));
                }
            }
            match page.next {
                Some(c) => query.after = Some(c),
                None => break,
            }
        }
    }
    Ok(Aggregated { from, to, buckets: out.into_iter().collect(), from_rollups })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate_between_ranks() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert_eq!(percentile(&v, 100.0), 4.0);
        assert_eq!(percentile(&v, 50.0), 2.5);
        assert!((percentile(&v, 95.0) - 3.85).abs() < 1e-12);
        assert_eq!(percentile(&[7.0], 95.0), 7.0);
        assert!(percentile(&[], 50.0).is_nan());
    }

    #[test]
    fn merge_is_order_independent() {
        let xs = [Agg::of(5, 1.0), Agg::of(9, 3.0), Agg::of(9, 2.0), Agg::of(1, 7.0)];
        let fold = |order: &[usize]| {
            let mut a = xs[order[0]];
            for &i in &order[1..] {
                a.merge(&xs[i]);
            }
            a
        };
        let want = fold(&[0, 1, 2, 3]);
        assert_eq!(want.last, 3.0, "tie at ts 9 goes to the greater value");
        for order in [[3, 2, 1, 0], [2, 0, 3, 1], [1, 3, 0, 2]] {
            assert_eq!(fold(&order), want);
        }
        assert_eq!((want.count, want.min, want.max, want.mean()), (4, 1.0, 7.0, 13.0 / 4.0));
    }

    #[test]
    fn steps_round_to_minutes_above_a_minute() {
        const S: i64 = 1_000_000_000;
        assert_eq!(step_for(0, 30 * 86_400 * S, 500), 87 * ROLLUP_NS); // 30 days → 5,184 s → 87 min
        assert_eq!(step_for(0, 100 * S, 10), 10 * S);
        assert_eq!(step_for(0, 1, 500), 1);
        assert_eq!(step_for(i64::MIN, i64::MAX, 1), i64::MAX, "saturates");
    }

    #[test]
    fn minutes_floor_for_negative_and_extreme_timestamps() {
        assert_eq!(minute_of(-1), -ROLLUP_NS);
        assert_eq!(minute_of(ROLLUP_NS), ROLLUP_NS);
        assert_eq!(minute_of(i64::MIN), i64::MIN);
        assert_eq!(minute_of(i64::MAX), i64::MAX - i64::MAX % ROLLUP_NS);
    }
}
