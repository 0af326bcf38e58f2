//! Store-level tests on a real SQLite file in a temporary directory.

use brume_protocol::{Field, LossReport, Point, StreamChunk, Value};

use super::*;

fn fields(v: f64) -> FieldsBlob {
    FieldsBlob::encode(&[Field {
        name: "value".into(),
        value: Value::F64(v),
    }])
    .unwrap()
}

/// A batch with one chunk per `(stream, timestamps)` entry.
fn batch(agent: &str, epoch: u64, seq: u64, chunks: &[(&str, &[i64])]) -> BatchV1 {
    BatchV1 {
        agent_id: agent.into(),
        epoch,
        seq,
        created_ms: 1,
        streams: chunks
            .iter()
            .map(|(s, ts)| StreamChunk {
                stream: (*s).into(),
                points: ts
                    .iter()
                    .map(|&t| Point {
                        ts_ns: t,
                        fields: fields(t as f64),
                    })
                    .collect(),
            })
            .collect(),
        losses: vec![],
    }
}

fn open() -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path()).unwrap();
    (dir, store)
}

fn all(store: &SqliteStore, stream: &str, limit: usize) -> (Vec<(i64, String, u64, u32)>, usize) {
    let mut out = Vec::new();
    let mut after = None;
    let mut pages = 0;
    loop {
        let page = store
            .readings(&ReadingsQuery {
                stream: stream.into(),
                from: None,
                to: None,
                limit,
                after: after.take(),
            })
            .unwrap();
        pages += 1;
        assert!(page.readings.len() <= limit);
        out.extend(
            page.readings
                .iter()
                .map(|r| (r.ts_ns, r.agent_id.clone(), r.seq, r.idx)),
        );
        match page.next {
            Some(c) => after = Some(c),
            None => return (out, pages),
        }
    }
}

#[test]
fn same_batch_twice_is_stored_once_and_both_committed() {
    let (_d, store) = open();
    let b = batch("a1", 7, 1, &[("s", &[10, 20])]);
    assert_eq!(
        store.ingest(std::slice::from_ref(&b), 100).unwrap(),
        vec![BatchOutcome::Stored]
    );
    assert_eq!(
        store.ingest(std::slice::from_ref(&b), 200).unwrap(),
        vec![BatchOutcome::Duplicate]
    );
    // Twice in one transaction: the second is a duplicate of the first.
    let c = batch("a1", 7, 2, &[("s", &[30])]);
    assert_eq!(
        store.ingest(&[c.clone(), c], 300).unwrap(),
        vec![BatchOutcome::Stored, BatchOutcome::Duplicate]
    );
    let streams = store.streams().unwrap();
    assert_eq!(
        streams,
        vec![StreamSummary {
            stream: "s".into(),
            readings: 3,
            first_ts_ns: Some(10),
            last_ts_ns: Some(30)
        }]
    );
    assert_eq!(all(&store, "s", 100).0.len(), 3);
    // Same seq in another epoch is a different batch.
    let e = batch("a1", 8, 1, &[("s", &[40])]);
    assert_eq!(store.ingest(&[e], 400).unwrap(), vec![BatchOutcome::Stored]);
}

#[test]
fn readings_are_ordered_and_paginated() {
    let (_d, store) = open();
    // Interleaved timestamps across agents, epochs and batches; equal timestamps are
    // ordered by agent id, then epoch (as u64: 2^63+1 after 5), then seq, then idx.
    store
        .ingest(
            &[
                batch("b", 5, 1, &[("s", &[30, 10]), ("other", &[1])]),
                batch("a", 5, 1, &[("s", &[30, 20])]),
                batch("a", (1 << 63) + 1, 1, &[("s", &[30])]),
                batch("a", 5, 2, &[("s", &[30, 30])]),
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
    ];
    for limit in [1, 2, 3, 6, 7, 100] {
        let (rows, pages) = all(&store, "s", limit);
        assert_eq!(rows, expected, "limit {limit}");
        assert_eq!(
            pages,
            expected.len().div_ceil(limit).max(1),
            "limit {limit}"
        );
    }
    // The 6th row is the big epoch.
    let page = store
        .readings(&ReadingsQuery {
            stream: "s".into(),
            from: None,
            to: None,
            limit: 7,
            after: None,
        })
        .unwrap();
    assert_eq!(page.readings[5].epoch, (1 << 63) + 1);
    assert_eq!(page.next, None);
    assert_eq!(page.readings[0].fields, fields(10.0));

    // from inclusive, to exclusive.
    let q = ReadingsQuery {
        stream: "s".into(),
        from: Some(20),
        to: Some(30),
        limit: 10,
        after: None,
    };
    let page = store.readings(&q).unwrap();
    assert_eq!(
        page.readings.iter().map(|r| r.ts_ns).collect::<Vec<_>>(),
        vec![20]
    );

    let unknown = ReadingsQuery {
        stream: "nope".into(),
        from: None,
        to: None,
        limit: 10,
        after: None,
    };
    assert_eq!(
        store.readings(&unknown).unwrap(),
        ReadingsPage {
            readings: vec![],
            next: None
        }
    );

    let names: Vec<String> = store
        .streams()
        .unwrap()
        .into_iter()
        .map(|s| s.stream)
        .collect();
    assert_eq!(names, vec!["other", "s"]);
}

#[test]
fn watermark_and_gaps() {
    let (_d, store) = open();
    let seqs = [2u64, 3, 5, 9, 10];
    let batches: Vec<BatchV1> = seqs
        .iter()
        .map(|&s| batch("a", 1, s, &[("s", &[s as i64])]))
        .collect();
    store.ingest(&batches, 50).unwrap();
    store
        .ingest(
            &[batch("a", 2, 1, &[]), batch("a", 2, 2, &[("s", &[1, 2])])],
            60,
        )
        .unwrap();
    store
        .ingest(&[batch("b", 1, 1, &[]), batch("b", 1, 3, &[])], 70)
        .unwrap();
    let agents = store.agents().unwrap();
    let summary: Vec<_> = agents
        .iter()
        .map(|a| {
            (
                a.agent_id.as_str(),
                a.epoch,
                a.batches,
                a.readings,
                a.watermark,
                a.max_seq,
                a.missing.clone(),
            )
        })
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
    // Filling seq 1 moves the watermark to 3.
    store.ingest(&[batch("a", 1, 1, &[])], 80).unwrap();
    let a = &store.agents().unwrap()[0];
    assert_eq!(
        (a.watermark, a.missing.clone(), a.last_seen_ms),
        (3, vec![(4, 4), (6, 8)], 80)
    );
}

#[test]
fn losses_keep_the_maximum() {
    let (_d, store) = open();
    let loss = |stream: &str, reason, total| LossReport {
        stream: stream.into(),
        reason,
        total,
    };
    let mut b1 = batch("a", 1, 1, &[]);
    b1.losses = vec![
        loss("s", LossReason::StoreFull, 5),
        loss("s", LossReason::Retention, 1),
    ];
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
            LossSummary {
                stream: "s".into(),
                reason: LossReason::Retention,
                total: 1
            },
            LossSummary {
                stream: "s".into(),
                reason: LossReason::StoreFull,
                total: 5
            },
            LossSummary {
                stream: "t".into(),
                reason: LossReason::StoreFull,
                total: 2
            },
        ]
    );
    // Loss-only streams do not appear as streams.
    assert!(store.streams().unwrap().is_empty());
}

#[test]
fn reopen_keeps_data_and_schema_version() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = SqliteStore::open(dir.path()).unwrap();
        store
            .ingest(&[batch("a", 1, 1, &[("s", &[5])])], 1)
            .unwrap();
    }
    let store = SqliteStore::open(dir.path()).unwrap();
    // The stream id cache is reloaded: new readings land on the existing stream.
    store
        .ingest(&[batch("a", 1, 2, &[("s", &[6])])], 2)
        .unwrap();
    assert_eq!(store.streams().unwrap()[0].readings, 2);
    let conn = Connection::open(dir.path().join("hub.db")).unwrap();
    let v: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(v, SCHEMA_VERSION);
    conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
        .unwrap();
    drop(conn);
    drop(store);
    assert!(matches!(
        SqliteStore::open(dir.path()),
        Err(StoreError::SchemaTooNew { .. })
    ));
}

#[test]
fn failed_transaction_stores_nothing() {
    let (_d, store) = open();
    // A seq beyond i64 fails inside the transaction after the first batch was written.
    let mut bad = batch("a", 1, 2, &[("new", &[1])]);
    bad.seq = u64::MAX;
    assert!(
        store
            .ingest(&[batch("a", 1, 1, &[("new", &[1])]), bad], 1)
            .is_err()
    );
    assert!(store.streams().unwrap().is_empty());
    assert!(store.agents().unwrap().is_empty());
    // The stream id created by the rolled-back transaction is not cached.
    store
        .ingest(&[batch("a", 1, 1, &[("new", &[1])])], 2)
        .unwrap();
    assert_eq!(store.streams().unwrap()[0].readings, 1);
}

#[test]
fn epoch_mapping_preserves_order() {
    let epochs = [0u64, 1, 5, (1 << 63) - 1, 1 << 63, u64::MAX];
    for w in epochs.windows(2) {
        assert!(epoch_to_sql(w[0]) < epoch_to_sql(w[1]));
    }
    for e in epochs {
        assert_eq!(epoch_from_sql(epoch_to_sql(e)), e);
    }
}
