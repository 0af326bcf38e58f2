//! The store test suite every [`HubStore`] implementation must pass.
//!
//! Each backend implements [`Fixture`] (how to get a fresh, empty store and how to open
//! it again) and instantiates the suite with [`store_suite!`](crate::store_suite), which
//! expands to one `#[test]` per behaviour below. Backend-specific tests (schema version
//! markers, partitions) live next to each backend.

use brume_protocol::{
    Batch, ChunkLineage, Field, FieldsBlob, LossReason, LossReport, ModuleRef, Point, StreamChunk, Value,
};

use super::{BatchOutcome, HubStore, LossSummary, ReadingsPage, ReadingsQuery, StreamSummary};

/// A backend under test: owns whatever the store lives in (a temporary directory, a
/// private PostgreSQL server) and removes it on drop.
pub(crate) trait Fixture: Sized {
    /// The store type.
    type Store: HubStore;
    /// Sets up an empty place for a store.
    fn new() -> Self;
    /// Opens a store on this fixture's data. Opening again after dropping (or next to)
    /// a previous store must see everything that store committed.
    fn open(&self) -> Self::Store;
    /// Turns the (closed) store's database back into a schema v2 one: no rollups (of
    /// either kind), no presence.
    fn undo_rollups_migration(&self);
}

/// Expands to one `#[test]` per suite function, each running on a fresh `$fixture`.
#[macro_export]
#[doc(hidden)]
macro_rules! store_suite {
    ($fixture:ty) => {
        $crate::store_suite!(@tests $fixture;
            same_batch_twice_is_stored_once_and_both_committed,
            readings_are_ordered_and_paginated,
            watermark_and_gaps,
            losses_keep_the_maximum,
            reopen_keeps_data,
            failed_transaction_stores_nothing,
            random_ingest_matches_a_model,
            lineage_is_stored_per_reading_and_listed,
            aggregation_matches_brute_force,
            fleet_aggregation_matches_brute_force,
            agent_streams_count_what_each_agent_sent,
            migration_to_v3_rolls_up_existing_readings,
            presence_keeps_the_latest_message_per_agent,
            retention_drops_whole_days_and_keeps_rollups,
            poison_batches_are_quarantined_and_block_nothing,
            quarantine_lists_reingests_and_discards,
            registry_is_content_addressed_and_never_overwrites,
            deployments_update_only_from_the_revision_read,
            desired_generation_grows_only_on_change_and_survives_reopen,
            reports_keep_the_newest,
            jobs_keep_their_agents_and_progress,
        );
    };
    (@tests $fixture:ty; $($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                let fixture = <$fixture as $crate::store::suite::Fixture>::new();
                $crate::store::suite::$name(&fixture);
            }
        )*
    };
}

pub(crate) fn fields(v: f64) -> FieldsBlob {
    FieldsBlob::encode(&[Field { name: "value".into(), value: Value::F64(v) }]).unwrap()
}

/// A batch with one chunk per `(stream, timestamps)` entry.
pub(crate) fn batch(agent: &str, epoch: u64, seq: u64, chunks: &[(&str, &[i64])]) -> Batch {
    Batch {
        agent_id: agent.into(),
        epoch,
        seq,
        created_ms: 1,
        streams: chunks
            .iter()
            .map(|(s, ts)| StreamChunk {
                stream: (*s).into(),
                points: ts.iter().map(|&t| Point { ts_ns: t, fields: fields(t as f64) }).collect(),
            })
            .collect(),
        losses: vec![],
        lineage: vec![],
    }
}

/// Every reading of `stream`, following cursors with pages of `limit`; also returns the
/// number of pages.
pub(crate) fn all(store: &dyn HubStore, stream: &str, limit: usize) -> (Vec<(i64, String, u64, u32)>, usize) {
    let mut out = Vec::new();
    let mut after = None;
    let mut pages = 0;
    loop {
        let page = store
            .readings(&ReadingsQuery { stream: stream.into(), from: None, to: None, limit, after: after.take() })
            .unwrap();
        pages += 1;
        assert!(page.readings.len() <= limit);
        out.extend(page.readings.iter().map(|r| (r.ts_ns, r.agent_id.clone(), r.seq, r.idx)));
        match page.next {
            Some(c) => after = Some(c),
            None => return (out, pages),
        }
    }
}

pub(crate) fn same_batch_twice_is_stored_once_and_both_committed(f: &impl Fixture) {
    let store = f.open();
    let b = batch("a1", 7, 1, &[("s", &[10, 20])]);
    assert_eq!(store.ingest(std::slice::from_ref(&b), 100).unwrap(), vec![BatchOutcome::Stored]);
    assert_eq!(store.ingest(std::slice::from_ref(&b), 200).unwrap(), vec![BatchOutcome::Duplicate]);
    // Twice in one transaction: the second is a duplicate of the first.
    let c = batch("a1", 7, 2, &[("s", &[30])]);
    assert_eq!(store.ingest(&[c.clone(), c], 300).unwrap(), vec![BatchOutcome::Stored, BatchOutcome::Duplicate]);
    let streams = store.streams().unwrap();
    assert_eq!(
        streams,
        vec![StreamSummary { stream: "s".into(), readings: 3, first_ts_ns: Some(10), last_ts_ns: Some(30) }]
    );
    assert_eq!(all(&store, "s", 100).0.len(), 3);
    // Same seq in another epoch is a different batch.
    let e = batch("a1", 8, 1, &[("s", &[40])]);
    assert_eq!(store.ingest(&[e], 400).unwrap(), vec![BatchOutcome::Stored]);
    // Outcomes follow the input order, whatever order the store inserts in.
    let out =
        store.ingest(&[batch("z", 1, 9, &[]), batch("a1", 7, 1, &[("s", &[10])]), batch("b", 1, 1, &[])], 500).unwrap();
    assert_eq!(out, vec![BatchOutcome::Stored, BatchOutcome::Duplicate, BatchOutcome::Stored]);
}

pub(crate) fn readings_are_ordered_and_paginated(f: &impl Fixture) {
    let store = f.open();
    // Interleaved timestamps across agents, epochs and batches; equal timestamps are
    // ordered by agent id, then epoch (as u64: 2^63+1 after 5), then seq, then idx.
    // Agent ids compare bytewise: "A-x" < "a" < "a_b" < "b" (a locale collation would
    // put them differently).
    store
        .ingest(
            &[
                batch("b", 5, 1, &[("s", &[30, 10]), ("other", &[1])]),
                batch("a", 5, 1, &[("s", &[30, 20])]),
                batch("a", (1 << 63) + 1, 1, &[("s", &[30])]),
                batch("a", 5, 2, &[("s", &[30, 30])]),
                batch("a_b", 5, 1, &[("s", &[40])]),
                batch("A-x", 5, 1, &[("s", &[40])]),
            ],
            1,
        )
        .unwrap();
    let expected = vec![
        (10, "b".to_string(), 1, 1),
        (20, "a".into(), 1, 1),
        (30, "a".into(), 1, 0),
        (30, "a".into(), 2, 0),
        (30, "a".into(), 2, 1),
        (30, "a".into(), 1, 0), // epoch 2^63+1
        (30, "b".into(), 1, 0),
        (40, "A-x".into(), 1, 0),
        (40, "a_b".into(), 1, 0),
    ];
    for limit in [1, 2, 3, 6, 7, 100] {
        let (rows, pages) = all(&store, "s", limit);
        assert_eq!(rows, expected, "limit {limit}");
        assert_eq!(pages, expected.len().div_ceil(limit).max(1), "limit {limit}");
    }
    // The 6th row is the big epoch.
    let page =
        store.readings(&ReadingsQuery { stream: "s".into(), from: None, to: None, limit: 9, after: None }).unwrap();
    assert_eq!(page.readings[5].epoch, (1 << 63) + 1);
    assert_eq!(page.next, None);
    assert_eq!(page.readings[0].fields, fields(10.0));

    // from inclusive, to exclusive.
    let q = ReadingsQuery { stream: "s".into(), from: Some(20), to: Some(30), limit: 10, after: None };
    let page = store.readings(&q).unwrap();
    assert_eq!(page.readings.iter().map(|r| r.ts_ns).collect::<Vec<_>>(), vec![20]);
    // A range combined with a cursor: both bounds apply.
    let first = store
        .readings(&ReadingsQuery { stream: "s".into(), from: Some(20), to: Some(40), limit: 2, after: None })
        .unwrap();
    let rest = store
        .readings(&ReadingsQuery {
            stream: "s".into(),
            from: Some(20),
            to: Some(40),
            limit: 100,
            after: first.next.clone(),
        })
        .unwrap();
    assert_eq!(first.readings.len() + rest.readings.len(), 6);
    assert_eq!(rest.next, None);

    let unknown = ReadingsQuery { stream: "nope".into(), from: None, to: None, limit: 10, after: None };
    assert_eq!(store.readings(&unknown).unwrap(), ReadingsPage { readings: vec![], next: None });

    let names: Vec<String> = store.streams().unwrap().into_iter().map(|s| s.stream).collect();
    assert_eq!(names, vec!["other", "s"]);
}

pub(crate) fn watermark_and_gaps(f: &impl Fixture) {
    let store = f.open();
    let seqs = [2u64, 3, 5, 9, 10];
    let batches: Vec<Batch> = seqs.iter().map(|&s| batch("a", 1, s, &[("s", &[s as i64])])).collect();
    store.ingest(&batches, 50).unwrap();
    store.ingest(&[batch("a", 2, 1, &[]), batch("a", 2, 2, &[("s", &[1, 2])])], 60).unwrap();
    store.ingest(&[batch("b", 1, 1, &[]), batch("b", 1, 3, &[])], 70).unwrap();
    let agents = store.agents().unwrap();
    let summary: Vec<_> = agents
        .iter()
        .map(|a| (a.agent_id.as_str(), a.epoch, a.batches, a.readings, a.watermark, a.max_seq, a.missing.clone()))
        .collect();
    assert_eq!(
        summary,
        vec![
            ("a", 1, 5, 5, 0, 10, vec![(1, 1), (4, 4), (6, 8)]),
            ("a", 2, 2, 2, 2, 2, vec![]),
            ("b", 1, 2, 0, 1, 3, vec![(2, 2)]),
        ]
    );
    assert_eq!(agents[0].last_seen_ms, 50);
    assert_eq!(agents[2].last_seen_ms, 70);
    // Each gap is known since the batch after it was stored.
    assert_eq!(agents[2].missing_since_ms, vec![70]);
    assert_eq!(agents[0].missing_since_ms, vec![50, 50, 50]);
    // Filling seq 1 moves the watermark to 3.
    store.ingest(&[batch("a", 1, 1, &[])], 80).unwrap();
    let a = &store.agents().unwrap()[0];
    assert_eq!((a.watermark, a.missing.clone(), a.last_seen_ms), (3, vec![(4, 4), (6, 8)], 80));
}

pub(crate) fn losses_keep_the_maximum(f: &impl Fixture) {
    let store = f.open();
    let loss = |stream: &str, reason, total| LossReport { stream: stream.into(), reason, total };
    let mut b1 = batch("a", 1, 1, &[]);
    b1.losses = vec![loss("s", LossReason::StoreFull, 5), loss("s", LossReason::Retention, 1)];
    let mut b2 = batch("a", 1, 2, &[]);
    b2.losses = vec![loss("s", LossReason::StoreFull, 3)];
    // A duplicate carrying a newer total still updates the counter.
    let mut b1_again = b1.clone();
    b1_again.losses = vec![loss("t", LossReason::StoreFull, 2)];
    store.ingest(&[b1, b2], 1).unwrap();
    store.ingest(&[b1_again], 2).unwrap();
    let a = &store.agents().unwrap()[0];
    assert_eq!(
        a.losses,
        vec![
            LossSummary { stream: "s".into(), reason: LossReason::Retention, total: 1 },
            LossSummary { stream: "s".into(), reason: LossReason::StoreFull, total: 5 },
            LossSummary { stream: "t".into(), reason: LossReason::StoreFull, total: 2 },
        ]
    );
    // Loss-only streams do not appear as streams.
    assert!(store.streams().unwrap().is_empty());
}

pub(crate) fn reopen_keeps_data(f: &impl Fixture) {
    {
        let store = f.open();
        store.ingest(&[batch("a", 1, 1, &[("s", &[5])])], 1).unwrap();
    }
    let store = f.open();
    // Stream ids are found again: new readings land on the existing stream.
    store.ingest(&[batch("a", 1, 2, &[("s", &[6])])], 2).unwrap();
    assert_eq!(store.streams().unwrap()[0].readings, 2);
    assert_eq!(store.ingest(&[batch("a", 1, 1, &[("s", &[5])])], 3).unwrap(), vec![BatchOutcome::Duplicate]);
}

pub(crate) fn failed_transaction_stores_nothing(f: &impl Fixture) {
    let store = f.open();
    // A seq beyond i64 fails the call after the first batch was prepared or written.
    let mut bad = batch("a", 1, 2, &[("new", &[1])]);
    bad.seq = u64::MAX;
    assert!(store.ingest(&[batch("a", 1, 1, &[("new", &[1])]), bad], 1).is_err());
    assert!(store.streams().unwrap().is_empty());
    assert!(store.agents().unwrap().is_empty());
    // The stream id created by the rolled-back transaction is not cached.
    store.ingest(&[batch("a", 1, 1, &[("new", &[1])])], 2).unwrap();
    assert_eq!(store.streams().unwrap()[0].readings, 1);
}

/// A reading in the model: `(ts_ns, agent_id, epoch, seq, idx)`, the API's order.
type ModelRow = (i64, String, u64, u64, u32);

/// Random groups (with re-sends) against an in-memory model: outcomes, stream
/// statistics and the paginated readings must agree. Deterministic seed, so a failure
/// reproduces.
pub(crate) fn random_ingest_matches_a_model(f: &impl Fixture) {
    use rand::{Rng, SeedableRng};
    use std::collections::{BTreeMap, BTreeSet};

    let store = f.open();
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let day = 86_400_000_000_000i64;
    let mut seen: BTreeSet<(String, u64, u64)> = BTreeSet::new();
    // stream -> sorted (ts, agent, epoch, seq, idx)
    let mut model: BTreeMap<String, Vec<ModelRow>> = BTreeMap::new();
    for _ in 0..12 {
        let group: Vec<Batch> = (0..rng.random_range(1..8))
            .map(|_| {
                let agent = ["a", "b", "c"][rng.random_range(0..3)];
                let epoch = [1u64, u64::MAX][rng.random_range(0..2)];
                let seq = rng.random_range(1..10);
                let chunks: Vec<(String, Vec<i64>)> = (0..rng.random_range(0..3))
                    .map(|i| {
                        let n = rng.random_range(0..4);
                        // Spread over a few days so several partitions are involved.
                        let ts = (0..n).map(|_| rng.random_range(0..3 * day)).collect();
                        (format!("s{i}"), ts)
                    })
                    .collect();
                let refs: Vec<(&str, &[i64])> = chunks.iter().map(|(s, t)| (s.as_str(), t.as_slice())).collect();
                batch(agent, epoch, seq, &refs)
            })
            .collect();
        let outcomes = store.ingest(&group, 1).unwrap();
        for (b, o) in group.iter().zip(outcomes) {
            let new = seen.insert((b.agent_id.clone(), b.epoch, b.seq));
            assert_eq!(o == BatchOutcome::Stored, new, "{b:?}");
            if !new {
                continue;
            }
            let mut idx = 0;
            for c in &b.streams {
                for p in &c.points {
                    model.entry(c.stream.clone()).or_default().push((p.ts_ns, b.agent_id.clone(), b.epoch, b.seq, idx));
                    idx += 1;
                }
            }
        }
    }
    model.retain(|_, v| !v.is_empty());
    let summaries = store.streams().unwrap();
    assert_eq!(summaries.iter().map(|s| &s.stream).collect::<Vec<_>>(), model.keys().collect::<Vec<_>>());
    for s in &summaries {
        let rows = model.get_mut(&s.stream).unwrap();
        rows.sort();
        assert_eq!(s.readings, rows.len() as u64);
        assert_eq!(s.first_ts_ns, rows.first().map(|r| r.0));
        assert_eq!(s.last_ts_ns, rows.iter().map(|r| r.0).max());
        let expect: Vec<_> = rows.iter().map(|r| (r.0, r.1.clone(), r.3, r.4)).collect();
        assert_eq!(all(&store, &s.stream, 3).0, expect, "{}", s.stream);
    }
}

pub(crate) fn lineage_is_stored_per_reading_and_listed(f: &impl Fixture) {
    let store = f.open();
    let m = |version: &str, h: u8| ModuleRef { name: "down".into(), version: version.into(), sha256: [h; 32] };
    // Chunks: ingested "s" [1, 2], empty "t" (computed, no readings), "s" [3, 4] by
    // v1, "s" [5] by v2. Readings are numbered over non-empty chunks: 0..=4.
    let mut b = batch("a1", 1, 1, &[("s", &[1, 2]), ("t", &[]), ("s", &[3, 4]), ("s", &[5])]);
    b.lineage = vec![
        ChunkLineage { chunk: 1, module: m("1", 1) },
        ChunkLineage { chunk: 2, module: m("1", 1) },
        ChunkLineage { chunk: 3, module: m("2", 2) },
    ];
    let mut other = batch("a2", 1, 1, &[("s", &[6])]);
    other.lineage = vec![ChunkLineage { chunk: 0, module: m("1", 1) }];
    store.ingest(&[b.clone(), other], 1).unwrap();
    // A re-send must not duplicate lineage rows (or fail on them).
    assert_eq!(store.ingest(&[b], 2).unwrap(), vec![BatchOutcome::Duplicate]);
    let page =
        store.readings(&ReadingsQuery { stream: "s".into(), from: None, to: None, limit: 100, after: None }).unwrap();
    let got: Vec<(i64, Option<String>)> =
        page.readings.iter().map(|r| (r.ts_ns, r.module.as_ref().map(|m| m.version.clone()))).collect();
    let v = |s: &str| Some(s.to_owned());
    assert_eq!(got, vec![(1, None), (2, None), (3, v("1")), (4, v("1")), (5, v("2")), (6, v("1"))]);
    assert_eq!(page.readings[2].module, Some(m("1", 1)));
    let modules = store.modules().unwrap();
    let summary: Vec<(String, u64, u64)> =
        modules.iter().map(|s| (s.module.version.clone(), s.agents, s.readings)).collect();
    assert_eq!(summary, vec![("1".into(), 2, 3), ("2".into(), 1, 1)]);
}

/// Server-side aggregation (rollups for whole-minute steps, raw readings otherwise)
/// equals a brute-force computation over the readings the model says are stored: random
/// batches from two agents, re-sent duplicates, readings with and without the field,
/// integer and non-numeric fields, timestamp ties, random ranges and steps.
pub(crate) fn aggregation_matches_brute_force(f: &impl Fixture) {
    use crate::aggregate::{Agg, AggregateQuery, aggregate};
    use rand::{Rng, SeedableRng};
    use std::collections::{BTreeMap, BTreeSet};

    const S: i64 = 1_000_000_000;
    const T0: i64 = 1_700_000_000 * S;
    let store = f.open();
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut sent: Vec<Batch> = Vec::new();
    let mut stored: BTreeSet<(String, u64)> = BTreeSet::new();
    // (stream, ts, numeric fields) of every stored reading.
    type Stored = (String, i64, Vec<(String, f64)>);
    let mut model: Vec<Stored> = Vec::new();
    for round in 0..15 {
        let mut group: Vec<Batch> = Vec::new();
        for _ in 0..rng.random_range(1..6) {
            let agent = ["a", "b"][rng.random_range(0..2)];
            let seq = sent.iter().filter(|b| b.agent_id == agent).count() as u64 + 1;
            let streams = (0..rng.random_range(1..3))
                .map(|i| StreamChunk {
                    stream: format!("s{i}"),
                    points: (0..rng.random_range(0..40))
                        .map(|_| {
                            // Whole seconds over 6 hours: many timestamp ties.
                            let ts_ns = T0 + rng.random_range(0..6 * 3600) * S;
                            let mut fl = vec![Field { name: "n".into(), value: Value::I64(rng.random_range(-50..50)) }];
                            if rng.random_bool(0.8) {
                                let v = f64::from(rng.random_range(-10_000..10_000)) / 100.0;
                                fl.push(Field { name: "value".into(), value: Value::F64(v) });
                            }
                            fl.push(Field { name: "ok".into(), value: Value::Bool(true) });
                            fl.push(Field { name: "name".into(), value: Value::Str("x".into()) });
                            Point { ts_ns, fields: FieldsBlob::encode(&fl).unwrap() }
                        })
                        .collect(),
                })
                .collect();
            let b = Batch {
                agent_id: agent.into(),
                epoch: 1,
                seq,
                created_ms: 1,
                streams,
                losses: vec![],
                lineage: vec![],
            };
            sent.push(b.clone());
            group.push(b);
        }
        // Re-send an earlier batch now and then: it must add nothing.
        if round % 3 == 2 {
            group.push(sent[rng.random_range(0..sent.len())].clone());
        }
        store.ingest(&group, 1).unwrap();
        for b in &group {
            if stored.insert((b.agent_id.clone(), b.seq)) {
                for c in &b.streams {
                    for p in &c.points {
                        let nums = crate::aggregate::numeric_fields(&p.fields).unwrap();
                        model.push((c.stream.clone(), p.ts_ns, nums));
                    }
                }
            }
        }
    }

    let floor = |t: i64, step: i64| t - t.rem_euclid(step);
    let mut checked = 0;
    for _ in 0..40 {
        let stream = ["s0", "s1", "s9"][rng.random_range(0..3)];
        let field = ["value", "n", "ok", "absent"][rng.random_range(0..4)];
        let step = [60 * S, 300 * S, 3600 * S, 7 * S, 90 * S][rng.random_range(0..5)];
        let (a, b) = (rng.random_range(-3600..7 * 3600) * S, rng.random_range(-3600..7 * 3600) * S);
        let (from, to) = (T0 + a.min(b), T0 + a.max(b) + 1);
        let got =
            aggregate(&store, &AggregateQuery { stream: stream.into(), field: field.into(), from, to, step }).unwrap();
        let (lo, hi) = (floor(from, step), floor(to - 1, step) + step);
        assert_eq!((got.from, got.to), (lo, hi));
        assert_eq!(got.from_rollups, step % (60 * S) == 0);
        let mut want: BTreeMap<i64, Agg> = BTreeMap::new();
        for (s, ts, nums) in &model {
            if s != stream || *ts < lo || *ts >= hi {
                continue;
            }
            if let Some((_, v)) = nums.iter().find(|(n, _)| n == field) {
                let x = Agg::of(*ts, *v);
                want.entry(floor(*ts, step)).and_modify(|a| a.merge(&x)).or_insert(x);
            }
        }
        let want: Vec<(i64, Agg)> = want.into_iter().collect();
        assert_eq!(got.buckets.len(), want.len(), "{stream} {field} step {step} [{from}, {to})");
        for ((gs, g), (ws, w)) in got.buckets.iter().zip(&want) {
            assert_eq!(gs, ws);
            assert_eq!(
                (g.count, g.min, g.max, g.last_ts_ns, g.last),
                (w.count, w.min, w.max, w.last_ts_ns, w.last),
                "bucket {gs}"
            );
            assert!((g.sum - w.sum).abs() <= 1e-9 * w.sum.abs().max(1.0), "bucket {gs}: sum {} vs {}", g.sum, w.sum);
        }
        checked += want.len();
    }
    assert!(checked > 100, "the random queries hit only {checked} non-empty buckets");
}

/// A version 2 database (readings, no rollups) gets its readings rolled up by the v3
/// migration, so aggregation covers data ingested before the upgrade.
pub(crate) fn migration_to_v3_rolls_up_existing_readings(f: &impl Fixture) {
    use crate::aggregate::{AggregateQuery, ROLLUP_NS, aggregate};
    let store = f.open();
    let m = 1_700_000_040 * 1_000_000_000; // a whole minute
    store.ingest(&[batch("a", 1, 1, &[("s", &[m, m + 1, m + ROLLUP_NS])])], 1).unwrap();
    drop(store);
    f.undo_rollups_migration();
    let store = f.open();
    let q =
        AggregateQuery { stream: "s".into(), field: "value".into(), from: m, to: m + 2 * ROLLUP_NS, step: ROLLUP_NS };
    let got = aggregate(&store, &q).unwrap();
    let summary: Vec<(i64, u64, f64)> = got.buckets.iter().map(|(t, a)| (*t, a.count, a.last)).collect();
    // `batch` sets each reading's value to its timestamp.
    assert_eq!(summary, [(m, 2, (m + 1) as f64), (m + ROLLUP_NS, 1, (m + ROLLUP_NS) as f64)]);
    // The per-agent rollups too.
    let q = crate::aggregate::FleetQuery {
        stream: "s".into(),
        field: "value".into(),
        from: m,
        to: m + 2 * ROLLUP_NS,
        step: ROLLUP_NS,
        agents: Some(vec!["a".into()]),
    };
    // And each agent's streams.
    let streams: Vec<(String, u64)> =
        store.agent_streams("a").unwrap().into_iter().map(|s| (s.stream, s.readings)).collect();
    assert_eq!(streams, [("s".to_string(), 3)]);
    let got = crate::aggregate::fleet(&store, &q).unwrap();
    assert_eq!(
        got.buckets.iter().map(|b| (b.start, b.agents, b.count)).collect::<Vec<_>>(),
        [(m, 1, 2), (m + ROLLUP_NS, 1, 1)]
    );
}

/// Each agent's streams: the readings it stored in each and their span, duplicates not
/// counted, other agents' readings not mixed in, kept across reopening.
pub(crate) fn agent_streams_count_what_each_agent_sent(f: &impl Fixture) {
    let store = f.open();
    let b1 = batch("a", 1, 1, &[("s", &[30, 10]), ("t", &[5])]);
    store.ingest(&[b1.clone(), batch("b", 1, 1, &[("s", &[1, 2, 3])])], 1).unwrap();
    store.ingest(&[b1, batch("a", 1, 2, &[("s", &[40])])], 1).unwrap(); // b1 again: a duplicate
    drop(store);
    let store = f.open();
    let list = |agent: &str| -> Vec<(String, u64, Option<i64>, Option<i64>)> {
        store
            .agent_streams(agent)
            .unwrap()
            .into_iter()
            .map(|s| (s.stream, s.readings, s.first_ts_ns, s.last_ts_ns))
            .collect()
    };
    assert_eq!(list("a"), [("s".into(), 3, Some(10), Some(40)), ("t".into(), 1, Some(5), Some(5))]);
    assert_eq!(list("b"), [("s".into(), 3, Some(1), Some(3))]);
    assert_eq!(list("nobody"), []);
}

/// Fleet-level aggregation (per-agent rollups merged per bucket, percentiles across the
/// agents' means) equals a brute-force computation over the stored readings: random
/// batches from five agents, duplicates re-sent, random agent subsets, ranges and steps.
pub(crate) fn fleet_aggregation_matches_brute_force(f: &impl Fixture) {
    use crate::aggregate::{FleetQuery, fleet, percentile};
    use rand::{Rng, SeedableRng};
    use std::collections::BTreeMap;

    const S: i64 = 1_000_000_000;
    const T0: i64 = 1_700_000_000 * S - 1_700_000_000 * S % (3600 * S);
    const AGENTS: [&str; 5] = ["a", "b", "c", "d", "e"];
    let store = f.open();
    let mut rng = rand::rngs::StdRng::seed_from_u64(17);
    // (agent, ts, value) of every stored reading of stream "t", field "value".
    let mut model: Vec<(String, i64, f64)> = Vec::new();
    let mut seqs: BTreeMap<&str, u64> = BTreeMap::new();
    for round in 0..20 {
        let mut group = Vec::new();
        for _ in 0..rng.random_range(1..5) {
            let agent = AGENTS[rng.random_range(0..AGENTS.len())];
            let seq = seqs.entry(agent).and_modify(|s| *s += 1).or_insert(1);
            let points: Vec<Point> = (0..rng.random_range(1..30))
                .map(|_| {
                    let ts_ns = T0 + rng.random_range(0..3 * 3600) * S;
                    let v = f64::from(rng.random_range(-5_000..5_000)) / 10.0;
                    Point {
                        ts_ns,
                        fields: FieldsBlob::encode(&[Field { name: "value".into(), value: Value::F64(v) }]).unwrap(),
                    }
                })
                .collect();
            for p in &points {
                let v = crate::aggregate::numeric_fields(&p.fields).unwrap()[0].1;
                model.push((agent.into(), p.ts_ns, v));
            }
            let b = Batch {
                agent_id: agent.into(),
                epoch: 1,
                seq: *seq,
                created_ms: 1,
                streams: vec![StreamChunk { stream: "t".into(), points }],
                losses: vec![],
                lineage: vec![],
            };
            group.push(b);
        }
        if round % 4 == 3 {
            group.push(group[0].clone()); // a duplicate adds nothing
        }
        store.ingest(&group, 1).unwrap();
    }
    let mut checked = 0;
    for _ in 0..30 {
        let step = [60 * S, 300 * S, 3600 * S, 420 * S][rng.random_range(0..4)];
        let (a, b) = (rng.random_range(-600..4 * 3600) * S, rng.random_range(-600..4 * 3600) * S);
        let (from, to) = (T0 + a.min(b), T0 + a.max(b) + 1);
        let agents: Option<Vec<String>> = rng
            .random_bool(0.6)
            .then(|| AGENTS.iter().filter(|_| rng.random_bool(0.5)).map(|a| a.to_string()).collect());
        let got = fleet(
            &store,
            &FleetQuery { stream: "t".into(), field: "value".into(), from, to, step, agents: agents.clone() },
        )
        .unwrap();
        let (lo, hi) = (from - from.rem_euclid(step), (to - 1) - (to - 1).rem_euclid(step) + step);
        assert_eq!((got.from, got.to), (lo, hi));
        // bucket -> agent -> values
        let mut want: BTreeMap<i64, BTreeMap<&str, Vec<f64>>> = BTreeMap::new();
        for (agent, ts, v) in &model {
            if *ts >= lo && *ts < hi && agents.as_ref().is_none_or(|a| a.contains(agent)) {
                want.entry(ts - ts.rem_euclid(step)).or_default().entry(agent).or_default().push(*v);
            }
        }
        assert_eq!(got.buckets.len(), want.len(), "step {step} [{from}, {to}) agents {agents:?}");
        for (g, (start, per_agent)) in got.buckets.iter().zip(&want) {
            let all: Vec<f64> = per_agent.values().flatten().copied().collect();
            let mut means: Vec<f64> = per_agent.values().map(|v| v.iter().sum::<f64>() / v.len() as f64).collect();
            means.sort_by(f64::total_cmp);
            let close = |x: f64, y: f64| (x - y).abs() <= 1e-9 * y.abs().max(1.0);
            assert_eq!((g.start, g.agents, g.count), (*start, per_agent.len(), all.len() as u64));
            assert_eq!(g.min, all.iter().copied().fold(f64::INFINITY, f64::min));
            assert_eq!(g.max, all.iter().copied().fold(f64::NEG_INFINITY, f64::max));
            assert!(close(g.mean, all.iter().sum::<f64>() / all.len() as f64), "mean of bucket {start}");
            assert!(close(g.p50, percentile(&means, 50.0)), "p50 of bucket {start}");
            assert!(close(g.p95, percentile(&means, 95.0)), "p95 of bucket {start}");
        }
        checked += want.len();
    }
    assert!(checked > 50, "the random queries hit only {checked} non-empty buckets");
    // An empty selection selects nothing (not everything).
    let q = FleetQuery {
        stream: "t".into(),
        field: "value".into(),
        from: T0,
        to: T0 + 3600 * S,
        step: 60 * S,
        agents: Some(vec![]),
    };
    assert!(fleet(&store, &q).unwrap().buckets.is_empty());
}

/// Presence: the last message received per agent wins, listed by agent id, and survives
/// reopening; `online_at` expires an agent after three missed heartbeats.
pub(crate) fn presence_keeps_the_latest_message_per_agent(f: &impl Fixture) {
    use brume_protocol::{ModuleHealth, StatusExtV2, StatusV1};
    let st = |agent: &str, online: bool, sent_ms: i64| StatusV1 {
        agent_id: agent.into(),
        online,
        version: "0.1.0".into(),
        started_ms: 1,
        sent_ms,
        heartbeat_s: 10,
        store_readings: 5,
        outbox_batches: 1,
        outbox_readings: 2,
        modules: vec![ModuleHealth {
            name: "m".into(),
            sha256: "ab".into(),
            enabled: true,
            batches_failed: 0,
            last_error: String::new(),
        }],
        labels: vec![("site".into(), "plant-a".into())],
    };
    let store = f.open();
    assert_eq!(store.presence().unwrap(), vec![]);
    store.record_presence(&st("b", true, 100), &Default::default(), 1_000).unwrap();
    store.record_presence(&st("a", true, 100), &StatusExtV2 { oldest_outbox_ms: Some(40) }, 1_000).unwrap();
    store.record_presence(&st("b", false, 50), &Default::default(), 2_000).unwrap(); // a last will, made at connect time
    drop(store);
    let list = f.open().presence().unwrap();
    let got: Vec<(&str, bool, i64)> =
        list.iter().map(|p| (p.status.agent_id.as_str(), p.status.online, p.received_ms)).collect();
    assert_eq!(got, [("a", true, 1_000), ("b", false, 2_000)]);
    assert_eq!(list[0].status, st("a", true, 100));
    assert_eq!((list[0].ext.oldest_outbox_ms, list[1].ext.oldest_outbox_ms), (Some(40), None));
    assert!(list[0].online_at(1_000 + 30_000));
    assert!(!list[0].online_at(1_000 + 30_001), "three heartbeats missed");
    assert!(!list[1].online_at(2_000));
}

/// Retention deletes the readings of whole days before the cutoff's day, in both
/// backends alike; stream statistics follow, rollups and the batch ledger stay.
pub(crate) fn retention_drops_whole_days_and_keeps_rollups(f: &impl Fixture) {
    use crate::aggregate::{AggregateQuery, aggregate};
    const DAY: i64 = 86_400 * 1_000_000_000;
    let d0 = 19_723 * DAY; // 2024-01-01
    let store = f.open();
    store.ingest(&[batch("a", 1, 1, &[("s", &[d0 + 1, d0 + 2]), ("t", &[d0 + 2 * DAY])])], 1).unwrap();
    store.ingest(&[batch("a", 1, 2, &[("s", &[d0 + DAY + 5])])], 1).unwrap();
    // A cutoff inside day 1: day 0 goes, day 1 stays.
    assert_eq!(store.drop_days_before(d0 + DAY + 10).unwrap(), 2);
    assert_eq!(all(&store, "s", 10).0.iter().map(|r| r.0).collect::<Vec<_>>(), [d0 + DAY + 5]);
    let streams: Vec<(String, u64, Option<i64>)> =
        store.streams().unwrap().into_iter().map(|s| (s.stream, s.readings, s.first_ts_ns)).collect();
    assert_eq!(streams, [("s".into(), 1, Some(d0 + DAY + 5)), ("t".into(), 1, Some(d0 + 2 * DAY))]);
    // The aggregated history of the dropped day is still there.
    let q = AggregateQuery { stream: "s".into(), field: "value".into(), from: d0, to: d0 + DAY, step: DAY };
    assert_eq!(aggregate(&store, &q).unwrap().buckets.iter().map(|(_, a)| a.count).collect::<Vec<_>>(), [2]);
    // Per-agent rollups follow the readings: the dropped day is gone, the kept one stays.
    let fq = |from: i64| crate::aggregate::FleetQuery {
        stream: "s".into(),
        field: "value".into(),
        from,
        to: from + DAY,
        step: DAY,
        agents: None,
    };
    assert!(crate::aggregate::fleet(&store, &fq(d0)).unwrap().buckets.is_empty());
    assert_eq!(crate::aggregate::fleet(&store, &fq(d0 + DAY)).unwrap().buckets.len(), 1);
    // The ledger remembers the batch: re-sent, it is a duplicate and brings nothing back.
    assert_eq!(
        store.ingest(&[batch("a", 1, 1, &[("s", &[d0 + 1, d0 + 2]), ("t", &[d0 + 2 * DAY])])], 1).unwrap(),
        [BatchOutcome::Duplicate]
    );
    assert_eq!(store.drop_days_before(d0 + DAY + 10).unwrap(), 0, "idempotent");
}

/// How a test batch is broken, if it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Poison {
    /// A valid batch.
    None,
    /// Sequence number beyond `i64`: every store refuses it before any SQL.
    SeqOutOfRange,
    /// A fields blob that does not decode: refused while computing rollups.
    CorruptFields,
    /// U+0000 in a stream name: PostgreSQL refuses it in SQL (`text` cannot hold it);
    /// SQLite can store it. Stored or quarantined, it must never hold up the others.
    NulInStreamName,
}

/// Random groups of valid and poison batches from several agents, with re-sends of
/// both, stored through the ingest task's [`Committer`](crate::ingest::Committer): every
/// valid batch is stored exactly once, every poison one quarantined (once, however often
/// it arrives), and no group waits for a poison batch. Deterministic seed.
pub(crate) fn poison_batches_are_quarantined_and_block_nothing(f: &impl Fixture) {
    use crate::ingest::{Committer, Outcome, QuarantinePolicy};
    use rand::{Rng, SeedableRng};
    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::Arc;

    let store: Arc<dyn HubStore> = Arc::new(f.open());
    let committer = Committer {
        store: Arc::clone(&store),
        metrics: crate::metrics::Metrics::new(),
        policy: QuarantinePolicy { attempts: 2, retry_delay: std::time::Duration::from_millis(1) },
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(10);
    let t0 = 19_723 * 86_400_000_000_000i64; // 2024-01-01
    // Every batch ever sent, by key, so a re-send is byte for byte the same batch.
    let mut sent: Vec<(Batch, Poison)> = Vec::new();
    // Outcome of each key's first arrival: stored, or quarantined with this id.
    let mut first: BTreeMap<(String, u64, u64), Outcome> = BTreeMap::new();
    let mut deliveries: BTreeMap<(String, u64, u64), u64> = BTreeMap::new();
    let mut next_seq: BTreeMap<&str, u64> = BTreeMap::new();
    let (mut groups_with_poison, mut quarantined_in_mixed_groups) = (0, 0);
    for _ in 0..25 {
        let group: Vec<(Batch, Poison)> = (0..rng.random_range(1..10))
            .map(|_| {
                if !sent.is_empty() && rng.random_bool(0.2) {
                    return sent[rng.random_range(0..sent.len())].clone(); // a re-send
                }
                let agent = ["a", "b", "c", "d"][rng.random_range(0..4)];
                let seq = next_seq.entry(agent).or_insert(0);
                *seq += 1;
                let ts = t0 + rng.random_range(0..1_000_000_000);
                let mut b = batch(agent, 7, *seq, &[("s", &[ts]), ("t", &[ts + 1])]);
                let poison = match rng.random_range(0..10) {
                    0 => Poison::SeqOutOfRange,
                    1 => Poison::CorruptFields,
                    2 => Poison::NulInStreamName,
                    _ => Poison::None,
                };
                match poison {
                    Poison::None => {}
                    Poison::SeqOutOfRange => b.seq = u64::MAX - *seq,
                    Poison::CorruptFields => b.streams[1].points[0].fields = FieldsBlob(vec![0xff, 0xff, 0xff]),
                    Poison::NulInStreamName => b.streams[1].stream = "bad\u{0}name".into(),
                }
                sent.push((b.clone(), poison));
                (b, poison)
            })
            .collect();
        let batches = Arc::new(group.iter().map(|(b, _)| b.clone()).collect::<Vec<_>>());
        let payloads: Vec<(String, Vec<u8>)> = batches
            .iter()
            .map(|b| {
                (
                    brume_protocol::topics::batches(&b.agent_id),
                    brume_protocol::AgentMessage::BatchV2(b.clone()).encode(),
                )
            })
            .collect();
        let raw: Vec<(&str, &[u8])> = payloads.iter().map(|(t, p)| (t.as_str(), p.as_slice())).collect();
        let outcomes = rt
            .block_on(async {
                tokio::time::timeout(std::time::Duration::from_secs(60), committer.store(&batches, &raw, &shutdown))
                    .await
            })
            .expect("a group with poison batches must not wait forever")
            .expect("not shut down");
        assert_eq!(outcomes.len(), group.len());
        let poisoned = group.iter().any(|(_, p)| *p != Poison::None);
        groups_with_poison += usize::from(poisoned);
        for ((b, poison), outcome) in group.iter().zip(outcomes) {
            let key = (b.agent_id.clone(), b.epoch, b.seq);
            *deliveries.entry(key.clone()).or_default() += 1;
            match (poison, outcome, first.get(&key)) {
                (Poison::None, Outcome::Store(BatchOutcome::Stored), None) => {}
                (Poison::None, Outcome::Store(BatchOutcome::Duplicate), Some(_)) => {}
                (Poison::SeqOutOfRange | Poison::CorruptFields, Outcome::Quarantined(id), prev) => {
                    assert!(prev.is_none_or(|p| *p == Outcome::Quarantined(id)), "{key:?}: a re-send keeps its entry");
                    quarantined_in_mixed_groups += usize::from(group.len() > 1);
                }
                (Poison::NulInStreamName, Outcome::Quarantined(id), prev) => {
                    assert!(prev.is_none_or(|p| *p == Outcome::Quarantined(id)), "{key:?}");
                }
                (Poison::NulInStreamName, Outcome::Store(o), prev) => {
                    assert_eq!(o == BatchOutcome::Stored, prev.is_none(), "{key:?}");
                }
                (p, o, prev) => panic!("{key:?} ({p:?}): outcome {o:?} after {prev:?}"),
            }
            first.entry(key).or_insert(outcome);
        }
    }
    assert!(groups_with_poison >= 5 && quarantined_in_mixed_groups >= 3, "the seed exercises mixed groups");

    // The store agrees: exactly the first-stored batches are there, once, and exactly
    // the quarantined ones are listed, with how often they arrived.
    let stored: BTreeSet<&(String, u64, u64)> =
        first.iter().filter(|(_, o)| matches!(o, Outcome::Store(_))).map(|(k, _)| k).collect();
    let per_agent = store.agents().unwrap();
    let listed: BTreeSet<(String, u64, u64)> = per_agent
        .iter()
        .flat_map(|a| {
            let missing = a.missing.clone();
            (1..=a.max_seq)
                .filter(move |s| !missing.iter().any(|&(lo, hi)| (lo..=hi).contains(s)))
                .map(move |s| (a.agent_id.clone(), a.epoch, s))
        })
        .collect();
    assert_eq!(listed.iter().collect::<BTreeSet<_>>(), stored, "every valid batch stored, nothing else");
    let stored_readings: u64 = per_agent.iter().map(|a| a.readings).sum();
    assert_eq!(stored_readings, 2 * stored.len() as u64, "each batch's two readings, once");
    let quarantined = store.quarantined(0, 1000).unwrap();
    let want: BTreeMap<(String, u64, u64), (i64, u64)> = first
        .iter()
        .filter_map(|(k, o)| match o {
            Outcome::Quarantined(id) => Some((k.clone(), (*id, deliveries[k]))),
            Outcome::Store(_) => None,
        })
        .collect();
    let got: BTreeMap<(String, u64, u64), (i64, u64)> =
        quarantined.iter().map(|q| ((q.agent_id.clone(), q.epoch, q.seq), (q.id, q.deliveries))).collect();
    assert_eq!(got, want);
    for q in &quarantined {
        assert_eq!(q.reason, super::QuarantineReason::Rejected);
        assert!(!q.error.is_empty() && !q.error.contains('\0'), "{q:?}");
        let (_, payload) = store.quarantined_payload(q.id).unwrap().unwrap();
        let (b, _) = sent
            .iter()
            .find(|(b, _)| (b.agent_id.as_str(), b.epoch, b.seq) == (q.agent_id.as_str(), q.epoch, q.seq))
            .unwrap();
        assert_eq!(payload, brume_protocol::AgentMessage::BatchV2(b.clone()).encode(), "the bytes as they arrived");
    }
}

/// The quarantine API of the store and `ingest::reingest`: entries are listed by id in
/// pages, a batch that is valid now is re-ingested and leaves quarantine, one that is
/// still invalid stays, and a discarded one is gone.
pub(crate) fn quarantine_lists_reingests_and_discards(f: &impl Fixture) {
    use super::{NewQuarantine, QuarantineReason};
    use crate::ingest::{ReingestResult, reingest};
    let store = f.open();
    let t0 = 19_723 * 86_400_000_000_000i64;
    let good = brume_protocol::AgentMessage::BatchV2(batch("a", 1, 4, &[("s", &[t0])])).encode();
    let mut bad_batch = batch("a", 1, 5, &[("s", &[t0])]);
    bad_batch.streams[0].points[0].fields = FieldsBlob(vec![0xff]);
    let bad = brume_protocol::AgentMessage::BatchV2(bad_batch).encode();
    let topic = brume_protocol::topics::batches("a");
    let q = |seq: u64, payload: &[u8], error: &str| {
        store
            .quarantine(&NewQuarantine {
                agent_id: "a",
                epoch: 1,
                seq,
                topic: &topic,
                reason: QuarantineReason::Invalid,
                error,
                payload,
                received_ms: 1_000 + seq as i64,
            })
            .unwrap()
    };
    // `good` stands for a batch an older hub refused and this one accepts.
    let g = q(4, &good, "refused by an older rule");
    let b = q(5, &bad, "fields do not decode: \u{0}");
    assert_eq!(q(5, &bad, "again"), b, "a re-send updates the entry");
    let list = store.quarantined(0, 10).unwrap();
    assert_eq!(list.iter().map(|e| (e.id, e.seq, e.deliveries)).collect::<Vec<_>>(), [(g, 4, 1), (b, 5, 2)]);
    assert_eq!(list[1].error, "again");
    assert_eq!((list[1].first_received_ms, list[1].last_received_ms), (1_005, 1_005));
    assert_eq!(list[0].bytes, good.len() as u64);
    assert_eq!(store.quarantined(g, 10).unwrap().iter().map(|e| e.id).collect::<Vec<_>>(), [b], "paging by id");
    assert_eq!(store.quarantined(0, 1).unwrap().len(), 1);
    assert_eq!(store.quarantine_id("a", 1, 5).unwrap(), Some(b));
    assert_eq!(store.quarantine_id("a", 1, 6).unwrap(), None);

    assert_eq!(reingest(&store, g).unwrap(), ReingestResult::Stored(BatchOutcome::Stored));
    assert_eq!(store.streams().unwrap()[0].readings, 1);
    assert!(matches!(reingest(&store, b).unwrap(), ReingestResult::StillInvalid(why) if why.contains("malformed")));
    assert_eq!(reingest(&store, g).unwrap(), ReingestResult::NotFound, "left quarantine once stored");
    assert_eq!(store.quarantined(0, 10).unwrap().iter().map(|e| e.id).collect::<Vec<_>>(), [b]);
    assert!(store.release_quarantined(b).unwrap());
    assert!(!store.release_quarantined(b).unwrap());
    assert!(store.quarantined(0, 10).unwrap().is_empty());
    assert_eq!(store.quarantined_payload(b).unwrap(), None);
}

fn module(name: &str, version: &str, wasm: &[u8]) -> ModuleRef {
    ModuleRef { name: name.into(), version: version.into(), sha256: brume_signing::module_digest(wasm) }
}

fn upload<'a>(m: &ModuleRef, wasm: &'a [u8], at: i64) -> super::fleet::ModuleUpload<'a> {
    super::fleet::ModuleUpload {
        module: m.clone(),
        manifest_json: format!("{{\"name\":\"{}\"}}", m.name),
        key_id: "0011223344556677".into(),
        signature: "brume-sig-v1:sig".into(),
        uploaded_ms: at,
        wasm,
    }
}

pub(crate) fn registry_is_content_addressed_and_never_overwrites(f: &impl Fixture) {
    use super::fleet::{FleetStore, PutModule};
    let store = f.open();
    let (v1, v1b, v2) = (b"wasm one".as_slice(), b"other bytes".as_slice(), b"wasm two".as_slice());
    let m1 = module("thr", "1.0.0", v1);
    assert_eq!(store.put_module(&upload(&m1, v1, 10)).unwrap(), PutModule::Stored);
    assert_eq!(store.put_module(&upload(&m1, v1, 11)).unwrap(), PutModule::AlreadyStored, "idempotent");
    let other = module("thr", "1.0.0", v1b);
    assert_eq!(store.put_module(&upload(&other, v1b, 12)).unwrap(), PutModule::Conflict { existing: m1.sha256 });
    let m2 = module("thr", "2.0.0", v2);
    assert_eq!(store.put_module(&upload(&m2, v2, 13)).unwrap(), PutModule::Stored);

    let list = store.registered_modules().unwrap();
    assert_eq!(list.iter().map(|m| m.module.clone()).collect::<Vec<_>>(), [m1.clone(), m2.clone()]);
    assert_eq!((list[0].size, list[0].uploaded_ms, list[0].key_id.as_str()), (v1.len() as u64, 10, "0011223344556677"));
    assert_eq!(store.registered_module("thr", "2.0.0").unwrap().unwrap().module, m2);
    assert_eq!(store.registered_module("thr", "3.0.0").unwrap(), None);
    assert_eq!(store.module_wasm(&m1.sha256).unwrap().as_deref(), Some(v1));
    assert_eq!(store.module_wasm(&other.sha256).unwrap(), None, "the refused bytes were not kept");
    drop(store);
    assert_eq!(f.open().module_wasm(&m2.sha256).unwrap().as_deref(), Some(v2), "durable");
}

fn spec(module: &str) -> super::fleet::DeploymentSpec {
    super::fleet::DeploymentSpec {
        module: module.into(),
        version: "1.0.0".into(),
        sha256: "00".repeat(32),
        config: serde_json::Map::new(),
        inputs: Some(vec!["t/#".into()]),
        selector: [("site".to_string(), "a".to_string())].into(),
        waves: vec![super::fleet::WaveSize::Agents(1), super::fleet::WaveSize::Percent(100.0)],
        probation_s: 30,
        max_failed_batches: 0,
        abort_threshold: 0.5,
        checks: brume_protocol::Checks { max_output_change_pct: Some(50), max_failed_pct: None, min_inputs: 10 },
        shadow: true,
    }
}

pub(crate) fn deployments_update_only_from_the_revision_read<F: Fixture>(f: &F) {
    use super::fleet::{DeploymentState, FleetStore};
    let store = f.open();
    let d = store.create_deployment(&spec("thr"), 100).unwrap();
    let e = store.create_deployment(&spec("avg"), 101).unwrap();
    assert!(e.id > d.id, "ids increase");
    assert_eq!((d.state, d.wave, d.wave_started_ms, d.created_ms), (DeploymentState::Rolling, 0, 100, 100));
    assert_eq!(d.spec, spec("thr"), "the spec round-trips");

    let mut next = d.clone();
    next.wave = 1;
    next.wave_started_ms = 200;
    let updated = store.update_deployment(&next, 200).unwrap().expect("revision matched");
    assert_eq!((updated.wave, updated.updated_ms), (1, 200));
    assert!(updated.revision > d.revision);
    // A second hub that read the same revision loses.
    let mut stale = d.clone();
    stale.state = DeploymentState::Aborted;
    assert_eq!(store.update_deployment(&stale, 201).unwrap(), None);

    // Agents join the current wave of the revision read, and only of that one.
    let mut at0 = d.clone();
    at0.wave = 0;
    assert_eq!(store.add_deployment_agents(&at0, &["b".into(), "a".into()], 150).unwrap(), None, "stale revision");
    let current = store.deployments().unwrap().into_iter().find(|x| x.id == d.id).unwrap();
    let after = store.add_deployment_agents(&current, &["a".into(), "c".into()], 210).unwrap().expect("current");
    assert!(after.revision > current.revision);
    assert_eq!(store.add_deployment_agents(&current, &["z".into()], 211).unwrap(), None, "claimed once");
    let mut paused = after.clone();
    paused.state = DeploymentState::Paused;
    let paused = store.update_deployment(&paused, 212).unwrap().unwrap();
    assert_eq!(store.add_deployment_agents(&paused, &["y".into()], 213).unwrap(), None, "never while paused");
    let mut rolling = paused.clone();
    rolling.state = DeploymentState::Rolling;
    let mut rolling = store.update_deployment(&rolling, 214).unwrap().unwrap();
    rolling.wave = 0;
    let mut back = store.update_deployment(&rolling, 215).unwrap().unwrap();
    back.revision = store.deployments().unwrap().into_iter().find(|x| x.id == d.id).unwrap().revision;
    store.add_deployment_agents(&back, &["b".into(), "a".into()], 216).unwrap().expect("wave 0 again");
    let members = |store: &F::Store| -> Vec<(u64, String, u32, brume_protocol::Phase, String)> {
        store
            .deployment_agents()
            .unwrap()
            .into_iter()
            .map(|m| (m.deployment, m.agent_id, m.wave, m.phase, m.error))
            .collect()
    };
    use brume_protocol::Phase;
    assert_eq!(
        members(&store),
        [
            (d.id, "a".to_string(), 1, Phase::Pending, String::new()),
            (d.id, "b".to_string(), 0, Phase::Pending, String::new()),
            (d.id, "c".to_string(), 1, Phase::Pending, String::new())
        ],
        "an agent stays in the wave it joined first"
    );
    store
        .record_phases(&[
            (d.id, "b".into(), Phase::RolledBack, "trap\0".into()),
            (d.id, "zz".into(), Phase::Running, "".into()),
        ])
        .unwrap();
    assert_eq!(members(&store)[1].3, Phase::RolledBack);
    assert_eq!(members(&store)[1].4, "trap\\u{0}", "stored as text PostgreSQL accepts");
    assert_eq!(members(&store).len(), 3, "phases of agents not in the deployment are not recorded");
    drop(store);
    let store = f.open();
    assert_eq!(store.deployments().unwrap().iter().map(|x| (x.id, x.wave)).collect::<Vec<_>>(), [(d.id, 0), (e.id, 0)]);
}

pub(crate) fn desired_generation_grows_only_on_change_and_survives_reopen(f: &impl Fixture) {
    use super::fleet::FleetStore;
    let store = f.open();
    let m = brume_protocol::DesiredModule {
        module: module("thr", "1.0.0", b"x"),
        size: 1,
        signature: "s".into(),
        config_json: "{}".into(),
        inputs: None,
        deployment: 1,
        probation: brume_protocol::Probation { duration_s: 0, max_failed_batches: 0 },
        checks: Default::default(),
        shadow: false,
    };
    let content = |modules: &[brume_protocol::DesiredModule]| super::fleet::DesiredContent {
        modules: modules.to_vec(),
        reprocess: vec![],
    };
    let first = store.set_desired("a", &content(std::slice::from_ref(&m)), 10).unwrap().expect("new");
    assert_eq!(first.generation, 1);
    let decoded = brume_protocol::DesiredState::decode(&first.message).unwrap();
    assert_eq!((decoded.agent_id.as_str(), decoded.generation, decoded.issued_ms), ("a", 1, 10));
    assert_eq!(first.message[0], 0, "without jobs, version 1: agents that predate jobs take it");
    assert_eq!(store.set_desired("a", &content(std::slice::from_ref(&m)), 20).unwrap(), None, "unchanged");
    let second = store.set_desired("a", &content(&[]), 30).unwrap().expect("changed");
    assert_eq!(second.generation, 2);
    assert_eq!(store.set_desired("b", &content(&[]), 30).unwrap().unwrap().generation, 1);
    drop(store);
    let store = f.open();
    let all = store.desired_states().unwrap();
    assert_eq!(all.iter().map(|d| (d.agent_id.as_str(), d.generation)).collect::<Vec<_>>(), [("a", 2), ("b", 1)]);
    assert_eq!(all[0], second);
    assert_eq!(store.set_desired("a", &content(std::slice::from_ref(&m)), 40).unwrap().unwrap().generation, 3);
    // A job is a change too, and the message becomes version 2.
    let job = brume_protocol::ReprocessJob {
        id: 1,
        module: m.module.clone(),
        size: 1,
        signature: "s".into(),
        config_json: "{}".into(),
        inputs: None,
        from_ns: 1,
        to_ns: 2,
    };
    let with_job = super::fleet::DesiredContent { modules: vec![m], reprocess: vec![job] };
    let fourth = store.set_desired("a", &with_job, 50).unwrap().expect("a job is a change");
    assert_eq!((fourth.generation, fourth.message[0]), (4, 1));
    assert_eq!(brume_protocol::DesiredState::decode(&fourth.message).unwrap().reprocess, with_job.reprocess);
    assert_eq!(store.set_desired("a", &with_job, 60).unwrap(), None);
}

pub(crate) fn jobs_keep_their_agents_and_progress(f: &impl Fixture) {
    use super::fleet::{FleetStore, JobAgent, JobSpec};
    use brume_protocol::JobPhase;
    let store = f.open();
    let spec = JobSpec {
        module: "thr".into(),
        version: "2".into(),
        sha256: "ab".repeat(32),
        config: Default::default(),
        inputs: Some(vec!["t/#".into()]),
        selector: [("site".to_string(), "x".to_string())].into(),
        from_ns: 10,
        to_ns: 20,
    };
    let j = store.create_job(&spec, &["a".into(), "b".into()], 5).unwrap();
    let k = store.create_job(&spec, &["c".into()], 6).unwrap();
    assert!(k.id > j.id);
    assert_eq!((j.spec.clone(), j.cancelled, j.created_ms), (spec.clone(), false, 5));
    let agents = store.job_agents().unwrap();
    assert_eq!(
        agents.iter().map(|a| (a.job, a.agent_id.as_str(), a.phase)).collect::<Vec<_>>(),
        [(j.id, "a", JobPhase::Pending), (j.id, "b", JobPhase::Pending), (k.id, "c", JobPhase::Pending)]
    );
    let done = JobAgent {
        job: j.id,
        agent_id: "b".into(),
        phase: JobPhase::Done,
        readings_in: 100,
        readings_out: 7,
        batches_failed: 1,
        error: "x\0".into(),
    };
    let stranger = JobAgent { agent_id: "zz".into(), ..done.clone() };
    store.record_job_progress(&[done.clone(), stranger]).unwrap();
    assert_eq!(store.cancel_job(k.id, 9).unwrap().map(|k| (k.cancelled, k.updated_ms)), Some((true, 9)));
    assert_eq!(store.cancel_job(999, 9).unwrap(), None);
    drop(store);
    let store = f.open();
    let agents = store.job_agents().unwrap();
    assert_eq!(agents.len(), 3, "progress of agents not in the job is not recorded");
    assert_eq!(agents[1], JobAgent { error: "x\\u{0}".into(), ..done });
    assert_eq!(store.jobs().unwrap().iter().map(|j| j.cancelled).collect::<Vec<_>>(), [false, true]);
}

pub(crate) fn reports_keep_the_newest(f: &impl Fixture) {
    use super::fleet::FleetStore;
    let store = f.open();
    let report = |generation: u64, sent_ms: i64| brume_protocol::Report {
        agent_id: "a".into(),
        sent_ms,
        generation,
        modules: vec![],
        jobs: vec![],
    };
    store.record_report(&report(2, 50), 1).unwrap();
    store.record_report(&report(1, 90), 2).unwrap(); // an older generation, sent later: stale
    store.record_report(&report(2, 40), 3).unwrap(); // same generation, sent earlier: stale
    let got = store.reports().unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].report.generation, got[0].report.sent_ms, got[0].received_ms), (2, 50, 1));
    store.record_report(&report(3, 10), 4).unwrap();
    assert_eq!(store.reports().unwrap()[0].report.generation, 3);
}
