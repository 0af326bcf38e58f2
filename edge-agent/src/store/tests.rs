use super::*;
use brume_protocol::{Field, LossReport, Value};
use proptest::prelude::*;

fn opts(cfg_toml: &str) -> StoreOptions {
    let mut cfg = Config::parse(cfg_toml).unwrap();
    cfg.forward.batch_linger = Duration::from_millis(100);
    StoreOptions::from_config(&cfg)
}

/// A valid timestamp base (2023-11-14); tests add small offsets.
const T0: i64 = 1_700_000_000_000_000_000;

/// A reading whose timestamp is `T0 + ts` and whose `value` is `ts`, so tests can speak
/// in small numbers.
fn reading(stream: &str, ts: i64) -> Reading {
    Reading::new(stream, T0 + ts, &[Field { name: "value".into(), value: Value::F64(ts as f64) }]).unwrap()
}

/// Sends every pending batch "to the hub" and returns (stream, ts) in sequence order.
fn drain(store: &mut Store, dir: &Path) -> Vec<(String, i64)> {
    let later = Instant::now() + Duration::from_secs(3600);
    store.apply(&[], &[], later).unwrap();
    let reader = StoreReader::open(dir, "a").unwrap();
    let mut out = Vec::new();
    let seqs = reader.pending_seqs(0, usize::MAX >> 1).unwrap();
    for &seq in &seqs {
        let b = reader.load_batch(store.epoch(), seq).unwrap().unwrap();
        for c in b.streams {
            for p in c.points {
                out.push((c.stream.clone(), p.ts_ns));
            }
        }
    }
    store.apply(&[], &seqs, later).unwrap();
    out
}

#[test]
fn batches_cover_every_reading_once_in_order_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let o = opts("[forward]\nbatch_max_readings = 10");
    let mut store = Store::open(dir.path(), o.clone()).unwrap();
    let now = Instant::now();
    let rs: Vec<Reading> = (0..25).map(|i| reading(if i % 2 == 0 { "a" } else { "b" }, i)).collect();
    let out = store.apply(&[&rs[..7], &rs[7..]], &[], now).unwrap();
    assert_eq!(out.results, vec![Ok(()), Ok(())]);
    assert_eq!(out.batches_cut, 2, "two full batches of 10, 5 left lingering");
    let snap = store.snapshot();
    assert_eq!((snap.outbox_batches, snap.unbatched, snap.newest_seq), (2, 5, 2));
    let epoch = store.epoch();
    drop(store);

    let mut store = Store::open(dir.path(), o).unwrap();
    assert_eq!(store.epoch(), epoch, "epoch is stable across restarts");
    assert_eq!(store.snapshot().unbatched, 5);
    let got = drain(&mut store, dir.path());
    let want: Vec<(String, i64)> = rs.iter().map(|r| (r.stream.clone(), r.ts_ns)).collect();
    // Within a batch, readings are grouped by stream; per-stream order is what counts.
    for s in ["a", "b"] {
        let g: Vec<_> = got.iter().filter(|x| x.0 == s).collect();
        let w: Vec<_> = want.iter().filter(|x| x.0 == s).collect();
        assert_eq!(g, w);
    }
    let snap = store.snapshot();
    assert_eq!((snap.outbox_batches, snap.newest_seq), (0, 3));
    // The readings stay as local history after the hub acknowledged them.
    assert_eq!(snap.readings, 25);
}

#[test]
fn refuse_new_stream_refuses_when_full_and_drop_oldest_counts_losses() {
    let dir = tempfile::tempdir().unwrap();
    let o = opts(
        "[[store.streams]]\nmatch = \"keep/#\"\nmax_bytes = \"500 B\"\nwhen_full = \"refuse_new\"\n\
         [[store.streams]]\nmatch = \"#\"\nmax_bytes = \"500 B\"\nwhen_full = \"drop_oldest\"\n",
    );
    let mut store = Store::open(dir.path(), o).unwrap();
    let now = Instant::now();
    let keep: Vec<Reading> = (0..8).map(|i| reading("keep/x", i)).collect();
    let r1 = store.apply(&[&keep], &[], now).unwrap();
    assert_eq!(r1.results, vec![Ok(())]);
    let r2 = store.apply(&[&keep[..4]], &[], now).unwrap();
    assert_eq!(r2.results, vec![Err(Refusal::StreamFull("keep/x".into()))]);

    let drop: Vec<Reading> = (0..20).map(|i| reading("drop/y", i)).collect();
    let r3 = store.apply(&[&drop], &[], now).unwrap();
    assert_eq!(r3.results, vec![Ok(())]);
    let lost: u64 = r3.dropped.iter().filter(|d| d.0 == "drop/y").map(|d| d.2).sum();
    assert!(lost > 0, "over-budget unacknowledged readings are counted as lost: {:?}", r3.dropped);
    let reader = StoreReader::open(dir.path(), "a").unwrap();
    let losses = reader.losses().unwrap();
    assert_eq!(losses, vec![LossReport { stream: "drop/y".into(), reason: LossReason::StoreFull, total: lost }]);
    // What is left plus what was lost is everything.
    let left = reader.readings("drop/y", i64::MIN, i64::MAX, 1000).unwrap();
    assert_eq!(left.len() as u64 + lost, 20);
    assert_eq!(left.first().unwrap().ts_ns, T0 + lost as i64, "the oldest went first");
}

#[test]
fn too_many_streams_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path(), opts("[store]\nmax_streams = 2")).unwrap();
    let rs = [reading("a", 1), reading("b", 1)];
    assert_eq!(store.apply(&[&rs], &[], Instant::now()).unwrap().results, vec![Ok(())]);
    let out = store.apply(&[&[reading("c", 1)], &[reading("a", 2)]], &[], Instant::now()).unwrap();
    assert_eq!(out.results, vec![Err(Refusal::TooManyStreams("c".into())), Ok(())]);
}

#[test]
fn age_retention_deletes_old_readings_and_counts_unacknowledged_ones() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path(), opts("[store.default_rule]\nmax_age = \"1s\"")).unwrap();
    let now_ns = 10_000_000_000;
    let rs = [reading("s", now_ns - 5_000_000_000), reading("s", now_ns)];
    store.apply(&[&rs], &[], Instant::now()).unwrap();
    let out = store.expire(T0 + now_ns).unwrap();
    assert_eq!(out.dropped, vec![("s".to_string(), LossReason::Retention, 1)]);
    assert_eq!(store.snapshot().readings, 1);
}

/// Operations of the model test.
#[derive(Debug, Clone)]
enum Op {
    /// Append readings on streams chosen by the bytes.
    Append(Vec<u8>),
    /// Let the linger time pass (cuts whatever is waiting).
    Linger,
    /// "Send" the n-th pending batch: the hub sees its content.
    Send(usize),
    /// The hub acknowledges the n-th batch it has seen.
    Ack(usize),
    /// Crash and reopen: all in-memory state is lost.
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => prop::collection::vec(0u8..3, 1..12).prop_map(Op::Append),
        1 => Just(Op::Linger),
        3 => (0usize..4).prop_map(Op::Send),
        3 => (0usize..4).prop_map(Op::Ack),
        1 => Just(Op::Reopen),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// The outbox against an in-memory model: whatever the interleaving of writes,
    /// sends, acks and crashes, every committed reading is delivered, exactly once, in
    /// per-stream order, with contiguous sequence numbers; acked batches never come back.
    #[test]
    fn outbox_matches_model(ops in prop::collection::vec(op(), 1..60)) {
        let dir = tempfile::tempdir().unwrap();
        let o = opts("[forward]\nbatch_max_readings = 5");
        let mut store = Store::open(dir.path(), o.clone()).unwrap();
        let mut ts = 0i64;
        let mut committed: Vec<(String, i64)> = Vec::new();
        // What the hub has seen, by sequence number (first content seen wins).
        let mut seen: BTreeMap<u64, Vec<(String, i64)>> = BTreeMap::new();
        let mut acked: Vec<u64> = Vec::new();
        let mut clock = Instant::now();
        for op in ops {
            match op {
                Op::Append(streams) => {
                    let rs: Vec<Reading> = streams.iter().map(|s| { ts += 1; reading(&format!("s{s}"), ts) }).collect();
                    let out = store.apply(&[&rs], &[], clock).unwrap();
                    prop_assert_eq!(&out.results, &vec![Ok(())]);
                    committed.extend(rs.iter().map(|r| (r.stream.clone(), r.ts_ns)));
                }
                Op::Linger => {
                    clock += Duration::from_secs(1);
                    store.apply(&[], &[], clock).unwrap();
                }
                Op::Send(n) => {
                    let reader = StoreReader::open(dir.path(), "a").unwrap();
                    let pending = reader.pending_seqs(0, 100).unwrap();
                    if let Some(&seq) = pending.get(n) {
                        prop_assert!(!acked.contains(&seq), "acked batch {} is pending again", seq);
                        let b = reader.load_batch(store.epoch(), seq).unwrap().unwrap();
                        let content: Vec<(String, i64)> = b.streams.iter()
                            .flat_map(|c| c.points.iter().map(move |p| (c.stream.clone(), p.ts_ns))).collect();
                        let prev = seen.entry(seq).or_insert_with(|| content.clone());
                        prop_assert_eq!(&*prev, &content, "a re-sent batch changed");
                    }
                }
                Op::Ack(n) => {
                    let unacked: Vec<u64> = seen.keys().copied().filter(|s| !acked.contains(s)).collect();
                    if let Some(&seq) = unacked.get(n) {
                        store.apply(&[], &[seq], clock).unwrap();
                        acked.push(seq);
                    }
                }
                Op::Reopen => {
                    drop(store);
                    store = Store::open(dir.path(), o.clone()).unwrap();
                }
            }
            check_directory(&store);
            let snap = store.snapshot();
            let reader = StoreReader::open(dir.path(), "a").unwrap();
            let pending = reader.pending_seqs(0, 1000).unwrap();
            for seq in &pending {
                prop_assert!(!acked.contains(seq));
            }
            prop_assert_eq!(snap.outbox_batches as usize, pending.len());
            prop_assert_eq!(snap.newest_seq as usize, pending.len() + acked.len());
        }
        // Deliver everything that is left.
        for (seq, content) in {
            clock += Duration::from_secs(1);
            store.apply(&[], &[], clock).unwrap();
            let reader = StoreReader::open(dir.path(), "a").unwrap();
            let pending = reader.pending_seqs(0, 1000).unwrap();
            pending.into_iter().map(|seq| {
                let b = reader.load_batch(store.epoch(), seq).unwrap().unwrap();
                (seq, b.streams.iter().flat_map(|c| c.points.iter().map(move |p| (c.stream.clone(), p.ts_ns))).collect::<Vec<_>>())
            }).collect::<Vec<_>>()
        } {
            if let Some(prev) = seen.get(&seq) { prop_assert_eq!(prev, &content); }
            seen.insert(seq, content);
        }
        let seqs: Vec<u64> = seen.keys().copied().collect();
        prop_assert_eq!(seqs, (1..=seen.len() as u64).collect::<Vec<_>>(), "sequence numbers are contiguous");
        let delivered: Vec<(String, i64)> = seen.values().flatten().cloned().collect();
        let mut sorted_delivered = delivered.clone();
        sorted_delivered.sort_by_key(|x| x.1);
        prop_assert_eq!(&sorted_delivered, &committed, "every committed reading exactly once");
        for s in ["s0", "s1", "s2"] {
            let per: Vec<i64> = delivered.iter().filter(|x| x.0 == s).map(|x| x.1).collect();
            prop_assert!(per.windows(2).all(|w| w[0] < w[1]), "per-stream order kept for {}", s);
        }
    }
}

/// The per-stream directory (rows written plus those the writer holds in memory since
/// the last flush) agrees with the readings it describes, and so do the stream counters.
fn check_directory(store: &Store) {
    let conn = &store.conn;
    let mut dir: BTreeMap<(i64, i64), BucketDelta> = BTreeMap::new();
    let rows: Vec<((i64, i64), BucketDelta)> = conn
        .prepare("SELECT bucket, stream_id, first_id, last_id, min_ts, max_ts, count FROM stream_buckets")
        .unwrap()
        .query_map([], |r| {
            Ok((
                (r.get(0)?, r.get(1)?),
                BucketDelta {
                    first_id: r.get(2)?,
                    last_id: r.get(3)?,
                    min_ts: r.get(4)?,
                    max_ts: r.get(5)?,
                    count: r.get(6)?,
                },
            ))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    for (k, d) in rows.into_iter().chain(store.st.pending_buckets.iter().map(|(k, d)| (*k, *d))) {
        let e = dir.entry(k).or_insert(BucketDelta { count: 0, ..d });
        e.first_id = e.first_id.min(d.first_id);
        e.last_id = e.last_id.max(d.last_id);
        e.min_ts = e.min_ts.min(d.min_ts);
        e.max_ts = e.max_ts.max(d.max_ts);
        e.count += d.count;
    }
    dir.retain(|_, d| d.count != 0);
    let readings: Vec<(i64, i64, i64, i64)> = conn
        .prepare("SELECT id, stream_id, ts_ns, length(fields) FROM readings")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let mut counts: BTreeMap<(i64, i64), i64> = BTreeMap::new();
    let mut per_stream: HashMap<i64, (u64, u64)> = HashMap::new();
    for &(id, sid, ts, len) in &readings {
        *counts.entry((bucket_of(id), sid)).or_default() += 1;
        let e = per_stream.entry(sid).or_default();
        e.0 += len as u64 + ROW_OVERHEAD;
        e.1 += 1;
        let d = dir.get(&(bucket_of(id), sid)).expect("a reading outside the directory");
        assert!(
            d.first_id <= id && id <= d.last_id && d.min_ts <= ts && ts <= d.max_ts,
            "directory bounds cover reading {id}"
        );
    }
    let dir_counts: BTreeMap<(i64, i64), i64> = dir.iter().map(|(k, d)| (*k, d.count)).collect();
    assert_eq!(dir_counts, counts, "directory counts");
    for st in store.st.streams.values() {
        assert_eq!(
            per_stream.get(&st.id).copied().unwrap_or_default(),
            (st.bytes, st.count),
            "counters of stream {}",
            st.id
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Retention (bytes and age) and time-range reads through the directory agree with a
    /// brute-force model: what is left is exactly what was written minus what was counted
    /// as dropped, and `readings()` returns exactly the survivors in a time range.
    #[test]
    fn retention_and_reads_match_brute_force(
        writes in prop::collection::vec((0u8..3, 1usize..400, any::<bool>()), 1..12),
        expire_at in 0i64..20_000,
        from in 0i64..20_000,
        span in 1i64..20_000,
        reopen in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let o = opts("[store.default_rule]\nmax_bytes = \"12 KiB\"\nmax_age = \"10us\"\n[store]\nmax_bytes = \"30 KiB\"");
        let mut store = Store::open(dir.path(), o.clone()).unwrap();
        let mut ts = 0i64;
        let mut written = 0u64;
        for (stream, n, shuffle) in writes {
            // Timestamps mostly increase; `shuffle` writes a group with older ones too.
            let rs: Vec<Reading> = (0..n).map(|i| {
                ts += 1;
                let t = if shuffle && i % 3 == 0 { ts.saturating_sub(500) } else { ts };
                reading(&format!("s{stream}"), t)
            }).collect();
            written += rs.len() as u64;
            store.apply(&[&rs], &[], Instant::now()).unwrap();
            check_directory(&store);
        }
        // Reads find readings the directory rows do not cover yet, and so does a reopen.
        check_reads(&store, dir.path(), from, span)?;
        if reopen {
            drop(store);
            store = Store::open(dir.path(), o.clone()).unwrap();
            check_directory(&store);
        }
        store.expire(T0 + expire_at * 1000).unwrap();
        check_directory(&store);
        check_reads(&store, dir.path(), from, span)?;
        let reader = StoreReader::open(dir.path(), "a").unwrap();
        let lost: u64 = reader.losses().unwrap().iter().map(|l| l.total).sum();
        prop_assert_eq!(store.snapshot().readings + lost, written, "survivors + counted losses = written");
    }
}

/// `readings()` through the directory returns exactly what a brute-force scan finds.
fn check_reads(store: &Store, dir: &Path, from: i64, span: i64) -> Result<(), TestCaseError> {
    let reader = StoreReader::open(dir, "a").unwrap();
    for s in ["s0", "s1", "s2"] {
        let (lo, hi) = (T0 + from, T0 + from + span);
        let got: Vec<i64> = reader.readings(s, lo, hi, usize::MAX).unwrap().into_iter().map(|r| r.ts_ns).collect();
        let sid: Option<i64> =
            store.conn.query_row("SELECT id FROM streams WHERE name = ?1", [s], |r| r.get(0)).optional().unwrap();
        let want: Vec<i64> = match sid {
            None => vec![],
            Some(sid) => store
                .conn
                .prepare(
                    "SELECT ts_ns FROM readings WHERE stream_id = ?1 AND ts_ns >= ?2 AND ts_ns < ?3 ORDER BY ts_ns, id",
                )
                .unwrap()
                .query_map(params![sid, lo, hi], |r| r.get(0))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap(),
        };
        prop_assert_eq!(got, want);
        let got: Vec<i64> = reader.last_n(s, hi, 5).unwrap().into_iter().map(|r| r.ts_ns).collect();
        let mut want: Vec<i64> = match sid {
            None => vec![],
            Some(sid) => store
                .conn
                .prepare("SELECT ts_ns FROM readings WHERE stream_id = ?1 AND ts_ns < ?2 ORDER BY id DESC LIMIT 5")
                .unwrap()
                .query_map(params![sid, hi], |r| r.get(0))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap(),
        };
        want.reverse();
        prop_assert_eq!(got, want, "last_n of {}", s);
    }
    Ok(())
}

#[test]
fn local_only_streams_are_kept_but_not_forwarded() {
    let dir = tempfile::tempdir().unwrap();
    let o = opts("[[store.streams]]\nmatch = \"raw/#\"\nforward = false\n[forward]\nbatch_max_readings = 100");
    let mut store = Store::open(dir.path(), o).unwrap();
    let rs: Vec<Reading> = (0..10).map(|i| reading(if i % 2 == 0 { "raw/a" } else { "out/a" }, i)).collect();
    store.apply(&[&rs], &[], Instant::now()).unwrap();
    let got = drain(&mut store, dir.path());
    assert_eq!(got.iter().map(|g| g.0.as_str()).collect::<Vec<_>>(), vec!["out/a"; 5]);
    let reader = StoreReader::open(dir.path(), "a").unwrap();
    assert_eq!(reader.readings("raw/a", i64::MIN, i64::MAX, 100).unwrap().len(), 5, "kept as local history");
}

#[test]
fn module_progress_commits_with_its_outputs_or_not_at_all() {
    let dir = tempfile::tempdir().unwrap();
    let o = opts("[store]\nmax_streams = 2");
    let mut store = Store::open(dir.path(), o).unwrap();
    let p = |cursor: i64| ModuleProgress {
        name: "m".into(),
        module: "m".into(),
        version: "1".into(),
        hash: "ab".repeat(32),
        cursor,
        state: vec![cursor as u8],
    };
    let out = store
        .apply_with_progress(&[&[reading("a", 1)], &[reading("out", 1)]], &[(1, p(7))], &[], Instant::now())
        .unwrap();
    assert_eq!(out.results, vec![Ok(()), Ok(())]);
    let reader = StoreReader::open(dir.path(), "a").unwrap();
    assert_eq!(reader.module_progress("m").unwrap(), Some(p(7)));
    // Outputs refused (a third stream): the progress must not move either.
    let out = store.apply_with_progress(&[&[reading("new", 2)]], &[(0, p(9))], &[], Instant::now()).unwrap();
    assert!(out.results[0].is_err());
    assert_eq!(reader.module_progress("m").unwrap(), Some(p(7)));
    // readings_after skips other streams but moves the cursor past them.
    let (rows, cursor) = reader.readings_after(0, 10, &mut |s| s == "out").unwrap();
    assert_eq!(rows.iter().map(|r| r.stream.as_str()).collect::<Vec<_>>(), vec!["out"]);
    assert_eq!(cursor, reader.last_id().unwrap());
}

#[test]
fn module_outputs_carry_lineage_in_their_own_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path(), opts("")).unwrap();
    let p = |version: &str, hash: u8| ModuleProgress {
        name: "m".into(),
        module: "m".into(),
        version: version.into(),
        hash: format!("{hash:02x}").repeat(32),
        cursor: 1,
        state: vec![],
    };
    // Ingested readings and two module builds writing to the same stream "out".
    let (r1, r2, r3) = ([reading("out", 1)], [reading("out", 2)], [reading("out", 3), reading("in", 4)]);
    let groups: [&[Reading]; 3] = [&r1, &r2, &r3];
    store.apply_with_progress(&groups, &[(0, p("1.0", 0xaa)), (1, p("1.1", 0xbb))], &[], Instant::now()).unwrap();
    store.apply(&[], &[], Instant::now() + Duration::from_secs(3600)).unwrap();
    let reader = StoreReader::open(dir.path(), "a").unwrap();
    let b = reader.load_batch(store.epoch(), 1).unwrap().unwrap();
    // (stream, timestamps, lineage: module version and first hash byte) per chunk.
    type Chunk<'a> = (&'a str, Vec<i64>, Option<(&'a str, u8)>);
    let chunks: Vec<Chunk> = b
        .streams
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let module = b.module_of(i).map(|m| (m.version.as_str(), m.sha256[0]));
            (c.stream.as_str(), c.points.iter().map(|p| p.ts_ns - T0).collect(), module)
        })
        .collect();
    assert_eq!(
        chunks,
        vec![
            ("out", vec![1], Some(("1.0", 0xaa))),
            ("out", vec![2], Some(("1.1", 0xbb))),
            ("out", vec![3], None),
            ("in", vec![4], None),
        ]
    );
    // The batch passes the hub's decoder.
    let bytes = brume_protocol::AgentMessage::BatchV2(b.clone()).encode();
    assert_eq!(brume_protocol::AgentMessage::decode_batch(&bytes).unwrap(), b);
}

/// MQTT session state in the store: a committed PUBLISH's identifier survives reopening
/// and makes its DUP re-send a duplicate; only the newest `session_pkids` identifiers
/// per client are kept; a clean session forgets; QoS 2 identifiers stay taken until
/// released; sessions expire `session_expiry` after their client disconnected.
#[test]
fn mqtt_sessions_dedup_bound_release_and_expire() {
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts("");
    o.session_pkids = 3;
    o.session_expiry = Duration::from_millis(1);
    let client: Arc<str> = "s1".into();
    let id = |pkid: u16, qos: u8, dup: bool, d: i64| PublishId { client: client.clone(), pkid, qos, dup, digest: d };
    let now = Instant::now;
    let mut store = Store::open(dir.path(), o.clone()).unwrap();
    let (open_p, open_c) = (
        [SessionOp::Open { client: "s1".into(), persistent: true }],
        [SessionOp::Open { client: "s1".into(), persistent: false }],
    );
    let open =
        |persistent: bool| Write { sessions: if persistent { &open_p[..] } else { &open_c[..] }, ..Write::default() };
    assert_eq!(store.commit(&open(true), now()).unwrap().sessions, [false]);
    let r = [reading("a", 1)];
    let groups: Vec<&[Reading]> = vec![&r; 5];
    let pubs: Vec<(usize, PublishId)> = (0..5).map(|i| (i, id(i as u16 + 1, 1, false, 10 + i as i64))).collect();
    let out = store.commit(&Write { groups: &groups, publishes: &pubs, ..Write::default() }, now()).unwrap();
    assert!(out.duplicates.is_empty());
    drop(store);

    let mut store = Store::open(dir.path(), o.clone()).unwrap();
    assert_eq!(store.commit(&open(true), now()).unwrap().sessions, [true], "present after reopening");
    // Re-sends: pkids 1 and 2 were evicted (bound 3); 3..=5 are remembered; a DUP with
    // other content, or without DUP, is new.
    let resend: Vec<(usize, PublishId)> = vec![
        (0, id(3, 1, true, 12)),
        (1, id(5, 1, true, 14)),
        (2, id(1, 1, true, 10)),
        (3, id(4, 1, true, 99)),
        (4, id(4, 1, false, 13)),
    ];
    let out = store.commit(&Write { groups: &groups, publishes: &resend, ..Write::default() }, now()).unwrap();
    assert_eq!(out.duplicates, [0, 1]);
    // One reading published with `publish`: whether the store called it a duplicate.
    let duplicate = |store: &mut Store, publish: &[(usize, PublishId)]| {
        let w = Write { groups: &groups[..1], publishes: publish, ..Write::default() };
        !store.commit(&w, now()).unwrap().duplicates.is_empty()
    };
    // QoS 2: taken until released, whatever the DUP flag.
    let q2 = [(0, id(9, 2, false, 0))];
    assert!(!duplicate(&mut store, &q2));
    assert!(duplicate(&mut store, &q2));
    let release = [SessionOp::Release { client: client.clone(), pkid: 9 }];
    assert_eq!(store.commit(&Write { sessions: &release, ..Write::default() }, now()).unwrap().sessions, [true]);
    assert_eq!(store.commit(&Write { sessions: &release, ..Write::default() }, now()).unwrap().sessions, [false]);
    assert!(!duplicate(&mut store, &q2));
    // A clean session forgets everything.
    assert_eq!(store.commit(&open(false), now()).unwrap().sessions, [false]);
    let again = [(0, id(5, 1, true, 14))];
    assert!(!duplicate(&mut store, &again));
    // Expiry counts from the disconnect, never while connected.
    assert_eq!(store.commit(&open(true), now()).unwrap().sessions, [false]);
    std::thread::sleep(Duration::from_millis(5));
    store.expire(crate::now_ns()).unwrap();
    assert_eq!(store.commit(&open(true), now()).unwrap().sessions, [true], "connected sessions do not expire");
    let close = [SessionOp::Close { client: client.clone() }];
    store.commit(&Write { sessions: &close, ..Write::default() }, now()).unwrap();
    std::thread::sleep(Duration::from_millis(5));
    store.expire(crate::now_ns()).unwrap();
    assert_eq!(store.commit(&open(true), now()).unwrap().sessions, [false], "expired after the disconnect");
}

/// Issue 16 ("nothing written when nothing happens"): the periodic retention run of an
/// idle store modifies no row, so its transaction writes nothing to the WAL.
/// An ordinary commit (no batch cut, no deletion) writes its readings and nothing else:
/// stream counters, the directory and `meta` wait for the next flush, and a reopen
/// rebuilds them from the readings.
#[test]
fn an_ordinary_commit_writes_only_its_readings() {
    let dir = tempfile::tempdir().unwrap();
    let o = opts("[forward]\nbatch_max_readings = 1000");
    let mut store = Store::open(dir.path(), o.clone()).unwrap();
    let now = Instant::now();
    store.apply(&[&[reading("a", 1), reading("b", 2)]], &[], now).unwrap();
    let before = store.conn.total_changes();
    store.apply(&[&[reading("a", 3), reading("b", 4), reading("a", 5)]], &[], now).unwrap();
    assert_eq!(store.conn.total_changes() - before, 3, "three rows inserted, nothing else changed");
    let snap = store.snapshot();
    drop(store);
    let store = Store::open(dir.path(), o).unwrap();
    let again = store.snapshot();
    assert_eq!((again.readings, again.bytes, again.unbatched), (snap.readings, snap.bytes, snap.unbatched));
    check_directory(&store);
    assert_eq!(StoreReader::open(dir.path(), "x").unwrap().readings("a", T0, T0 + 10, 10).unwrap().len(), 3);
}

/// With `forward.mode = "off"` nothing is batched (the outbox, on disk and in memory,
/// stays empty however long the agent runs) and readings deleted by retention are not
/// counted as lost: no hub was promised them.
#[test]
fn forwarding_off_cuts_no_batches_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let o = opts("[forward]\nmode = \"off\"\nbatch_max_readings = 5\n[store.default_rule]\nmax_age = \"10us\"");
    let mut store = Store::open(dir.path(), o.clone()).unwrap();
    let now = Instant::now();
    let rs: Vec<Reading> = (0..20).map(|i| reading("a", i)).collect();
    let out = store.apply(&[&rs], &[], now).unwrap();
    assert_eq!(out.batches_cut, 0);
    assert_eq!(store.linger_deadline(), None, "nothing waits to be batched");
    store.apply(&[], &[], now + Duration::from_secs(3600)).unwrap();
    assert_eq!(store.snapshot().outbox_batches, 0);
    let out = store.expire(T0 + 1_000_000).unwrap();
    assert!(out.dropped.is_empty(), "deleted as local history, not lost: {:?}", out.dropped);
    assert_eq!(store.snapshot().readings, 0, "retention still runs");
    let reader = StoreReader::open(dir.path(), "a").unwrap();
    assert!(reader.losses().unwrap().is_empty());
    assert!(reader.pending_seqs(0, 100).unwrap().is_empty());
}

/// `store.page_size` applies to a new store; an existing one keeps its own.
#[test]
fn page_size_applies_to_new_stores_only() {
    let dir = tempfile::tempdir().unwrap();
    let page = |s: &Store| -> i64 { s.conn.pragma_query_value(None, "page_size", |r| r.get(0)).unwrap() };
    let store = Store::open(dir.path(), opts("")).unwrap();
    assert_eq!(page(&store), 1024, "the default");
    drop(store);
    let store = Store::open(dir.path(), opts("[store]\npage_size = \"4 KiB\"")).unwrap();
    assert_eq!(page(&store), 1024, "an existing store keeps its page size");
    let other = tempfile::tempdir().unwrap();
    let store = Store::open(other.path(), opts("[store]\npage_size = \"4 KiB\"")).unwrap();
    assert_eq!(page(&store), 4096);
}

#[test]
fn idle_retention_run_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path(), opts("")).unwrap();
    store.apply(&[&[reading("a", 1), reading("b", 2)]], &[], Instant::now()).unwrap();
    store.expire(crate::now_ns()).unwrap();
    let before = store.conn.total_changes();
    for _ in 0..3 {
        store.expire(crate::now_ns()).unwrap();
    }
    assert_eq!(store.conn.total_changes(), before, "an idle retention run changed rows");
    // Real work still writes its counters.
    store.apply(&[&[reading("a", 3)]], &[], Instant::now()).unwrap();
    assert!(store.conn.total_changes() > before);
}

/// The commit window (`store.commit_window`): appends inside one window share one commit;
/// no append is answered before its commit (a new connection sees the readings when the
/// answer arrives); an MQTT connection that goes quiet with readings pending, or a module
/// that is behind, closes the window at once. The window here is an hour, so any early
/// close that did not happen would hang the test (bounded by its timeouts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_commit_window_groups_commits_and_never_answers_before_them() {
    use crate::metrics::Metrics;
    use writer::{StoreHandle, WriterOptions};
    let dir = tempfile::tempdir().unwrap();
    let metrics = Arc::new(Metrics::default());
    let wopts = |window| WriterOptions {
        max_per_commit: 20_000,
        retention_interval: Duration::from_secs(3600),
        commit_window: window,
    };
    let stored = |dir: &Path| StoreReader::open(dir, "a").unwrap().last_id().unwrap();
    let limit = Duration::from_secs(30);

    // A short window: ten appends submitted at once share one commit, and when each is
    // answered, its readings are already in the database.
    let (h, thread) =
        StoreHandle::start(dir.path().into(), "a", opts(""), wopts(Duration::from_secs(1)), metrics.clone()).unwrap();
    let mut verdicts = Vec::new();
    for i in 0..10 {
        verdicts.push(h.submit(vec![reading("s", i)]).await.unwrap());
    }
    for (i, v) in verdicts.into_iter().enumerate() {
        v.await.unwrap().unwrap();
        assert!(stored(dir.path()) > i as i64, "answered before its reading was committed");
    }
    assert_eq!(metrics.commits.get(), 1, "ten appends inside one window, one commit");
    drop(h);
    thread.join();

    // An hour-long window: only an early close can commit.
    let (h, thread) =
        StoreHandle::start(dir.path().into(), "a", opts(""), wopts(Duration::from_secs(3600)), metrics.clone())
            .unwrap();
    let before = stored(dir.path());
    // Two connections with readings pending: the window stays open while one still sends.
    let (a, b) = (h.publisher(), h.publisher());
    let va = h.submit(vec![reading("s", 100)]).await.unwrap();
    a.submitted(Instant::now());
    let vb = h.submit(vec![reading("s", 101)]).await.unwrap();
    b.submitted(Instant::now());
    a.quiet();
    tokio::task::yield_now().await;
    assert_eq!(stored(dir.path()), before, "b may still send: nothing committed yet");
    b.quiet();
    tokio::time::timeout(limit, va)
        .await
        .expect("the window did not close when every connection went quiet")
        .unwrap()
        .unwrap();
    tokio::time::timeout(limit, vb).await.unwrap().unwrap().unwrap();
    a.answered(Instant::now());
    b.answered(Instant::now());
    assert_eq!(stored(dir.path()), before + 2);
    // A module that is behind commits at once; the append queued before it rides along.
    let v = h.submit(vec![reading("s", 102)]).await.unwrap();
    let progress = ModuleProgress {
        name: "m".into(),
        module: "m".into(),
        version: "1".into(),
        hash: "h".into(),
        cursor: 0,
        state: Vec::new(),
    };
    tokio::time::timeout(limit, h.commit_module(vec![reading("out", 103)], progress, true))
        .await
        .expect("the window did not close for a module that is behind")
        .unwrap();
    v.await.unwrap().unwrap();
    assert_eq!(stored(dir.path()), before + 4);
    // Shutting down commits what the window holds.
    let v = h.submit(vec![reading("s", 104)]).await.unwrap();
    drop((a, b));
    drop(h);
    thread.join();
    v.await.unwrap().unwrap();
    assert_eq!(stored(dir.path()), before + 5);
}

/// What is on disk when a verdict arrives: a copy of `agent.db` and its WAL taken at that
/// moment, opened as a crash would leave them (the wal-index is rebuilt from the WAL).
fn crash_copy_holds(dir: &Path, ts: i64) -> bool {
    let copy = tempfile::tempdir().unwrap();
    std::fs::copy(dir.join("agent.db"), copy.path().join("agent.db")).unwrap();
    let wal = dir.join("agent.db-wal");
    if wal.exists() {
        std::fs::copy(&wal, copy.path().join("agent.db-wal")).unwrap();
    }
    let conn = Connection::open(copy.path().join("agent.db")).unwrap();
    conn.query_row("SELECT COUNT(*) FROM readings WHERE ts_ns = ?1", [T0 + ts], |r| r.get::<_, i64>(0)).unwrap() == 1
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    /// The commit window never answers before the commit: whatever the window, the
    /// connections and when they go quiet, or a module that is behind, at the moment an
    /// append is answered a copy of the files (a crash at that point) holds its reading.
    #[test]
    fn the_commit_window_never_answers_before_the_commit(
        ops in prop::collection::vec((0usize..3, any::<bool>(), 0u8..10), 1..30),
        window_ms in 0u64..30,
    ) {
        use crate::metrics::Metrics;
        use writer::{StoreHandle, WriterOptions};
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let bad: Vec<i64> = rt.block_on(async move {
            let wopts = WriterOptions {
                max_per_commit: 20_000,
                retention_interval: Duration::from_secs(3600),
                commit_window: Duration::from_millis(window_ms),
            };
            let (h, thread) = StoreHandle::start(path.clone(), "a", opts(""), wopts, Arc::new(Metrics::default())).unwrap();
            let pubs: Vec<Arc<window::Publisher>> = (0..3).map(|_| Arc::new(h.publisher())).collect();
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            for (i, (conn, quiet, kind)) in ops.into_iter().enumerate() {
                let ts = i as i64;
                let verdict = if kind == 0 {
                    // A module behind on its input: commits at once, with what is queued.
                    let h = h.clone();
                    let progress = ModuleProgress { name: "m".into(), module: "m".into(), version: "1".into(), hash: "h".into(), cursor: ts, state: Vec::new() };
                    let (vtx, vrx) = tokio::sync::oneshot::channel();
                    tokio::spawn(async move { let _ = vtx.send(h.commit_module(vec![reading("out", ts)], progress, true).await); });
                    vrx
                } else {
                    let v = h.submit(vec![reading("s", ts)]).await.unwrap();
                    pubs[conn].submitted(Instant::now());
                    if quiet {
                        pubs[conn].quiet();
                    }
                    let (vtx, vrx) = tokio::sync::oneshot::channel();
                    let p = pubs[conn].clone();
                    tokio::spawn(async move {
                        let r = v.await.unwrap();
                        p.answered(Instant::now());
                        let _ = vtx.send(r);
                    });
                    vrx
                };
                let (tx, path) = (tx.clone(), path.clone());
                tokio::spawn(async move {
                    verdict.await.unwrap().unwrap();
                    let _ = tx.send((ts, crash_copy_holds(&path, ts)));
                });
                if kind == 1 {
                    tokio::task::yield_now().await;
                }
            }
            drop(tx);
            let mut bad = Vec::new();
            // Every verdict arrives: a window closes by its time limit if nothing else.
            while let Some((ts, held)) = rx.recv().await {
                if !held {
                    bad.push(ts);
                }
            }
            drop(pubs);
            drop(h);
            tokio::task::spawn_blocking(move || thread.join()).await.unwrap();
            bad
        });
        prop_assert!(bad.is_empty(), "answered before a crash copy held them: {:?}", bad);
    }
}

/// What a re-processing job reads: its streams, timestamps in its range, ids up to the
/// bound it took at the start; from the directory's first bucket that reaches the range,
/// and in bounded scans that say when they reached the end.
#[test]
fn reprocessing_reads_a_time_range_up_to_a_bound() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path(), opts("")).unwrap();
    // ts 0..100 on "a" interleaved with "b"; then late readings of "a" with old timestamps.
    let mut rs = Vec::new();
    for t in 0..100 {
        rs.push(reading("a", t));
        rs.push(reading("b", t));
    }
    store.apply(&[&rs], &[], Instant::now()).unwrap();
    let reader = StoreReader::open(dir.path(), "a").unwrap();
    let upto = reader.last_id().unwrap();
    store.apply(&[&[reading("a", 50)]], &[], Instant::now()).unwrap();
    let start = reader.reprocess_start(T0 + 40).unwrap();
    assert!(start < upto, "the start is before the range's readings ({start} of {upto})");
    let ts = |rows: &[crate::store::StoredReading]| rows.iter().map(|r| r.ts_ns - T0).collect::<Vec<_>>();
    let (rows, cursor, done) =
        reader.readings_between(start, upto, (T0 + 40, T0 + 60), 1000, usize::MAX, &mut |s| s == "a").unwrap();
    assert_eq!(ts(&rows), (40..60).collect::<Vec<_>>(), "only the range, only `a`, not the late reading");
    assert!(done && cursor <= upto);
    // A small scan bound over more rows than one scan step (4,096): the same readings, in
    // several calls, the last one says done.
    let more: Vec<Reading> = (100..3000).flat_map(|t| [reading("a", t), reading("b", t)]).collect();
    store.apply(&[&more], &[], Instant::now()).unwrap();
    let upto = reader.last_id().unwrap();
    let (mut all, mut from, mut calls) = (Vec::new(), 0, 0);
    loop {
        let (rows, cursor, done) =
            reader.readings_between(from, upto, (T0 + 2500, T0 + 2600), 1000, 1, &mut |s| s == "a").unwrap();
        all.extend(rows);
        (from, calls) = (cursor, calls + 1);
        if done {
            break;
        }
    }
    assert_eq!(ts(&all), (2500..2600).collect::<Vec<_>>());
    assert!(calls >= 2, "the bound split the scan ({calls} calls)");
    // A start past everything in the directory: from the unflushed tail (or the end).
    assert!(reader.reprocess_start(T0 + 1_000_000).unwrap() <= reader.last_id().unwrap());
}
