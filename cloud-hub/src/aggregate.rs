//! Server-side aggregation: readings of one numeric field of one stream, in time buckets
//! (count, min, max, mean, last), so a dashboard can show a month in 500 points.
//!
//! Both stores keep **one-minute rollups** per `(stream, field, minute)`, updated in the
//! ingest transaction from the readings of new batches only (a duplicate batch adds
//! nothing). A query whose step is a whole number of minutes merges rollups: 30 days at
//! any rate is at most 43,200 rows. A finer step reads and decodes the raw readings, up to
//! [`MAX_RAW_READINGS`].
//!
//! Merging is order-independent, because hubs ingest the same stream in any order:
//! count, sum, min and max commute, and `last` is the value at the greatest timestamp,
//! ties going to the greater value.

use std::collections::BTreeMap;

use crate::store::rollup::floor_to;
pub use crate::store::rollup::{Agg, ROLLUP_NS, RollupDeltas, minute_of, numeric_fields};
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
    if q.step <= 0 {
        return Err(AggregateError::Invalid("step must be positive".into()));
    }
    if q.from >= q.to {
        return Err(AggregateError::Invalid(format!("from ({}) must be before to ({})", q.from, q.to)));
    }
    let from = floor_to(q.from, q.step);
    let to = q.to.saturating_add((q.step - q.to.rem_euclid(q.step)) % q.step);
    let n = (i128::from(to) - i128::from(from)) / i128::from(q.step);
    if n > i128::from(MAX_BUCKETS) {
        return Err(AggregateError::Invalid(format!(
            "{n} buckets requested, at most {MAX_BUCKETS}: use a larger step or fewer buckets"
        )));
    }
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
