//! PostgreSQL store tests: the shared suite, then what only this backend has
//! (partitions, retention, several hubs on one database, server restarts). Each test
//! starts its own private server ([`TestPostgres`]), so they run in parallel.

use std::collections::BTreeSet;
use std::time::Duration;

use super::*;
use crate::store::suite::{Fixture, all, batch};
use brume_test_support::TestPostgres;

/// 2024-01-01T00:00:00Z in ns (day 19723).
const T0: i64 = 1_704_067_200_000_000_000;

/// A private server with one database, `brume`.
struct Pg {
    server: TestPostgres,
    url: String,
}

fn options(url: &str) -> PostgresOptions {
    let mut config: tokio_postgres::Config = url.parse().unwrap();
    config.connect_timeout(Duration::from_secs(5));
    PostgresOptions {
        config,
        pool_size: 4,
        query_timeout: Duration::from_secs(20),
        // Ten years back: the tests' data is from 2024 and should land in daily partitions.
        partition_window: PartitionWindow { days_back: 3660, days_ahead: 3 },
    }
}

impl Fixture for Pg {
    type Store = PostgresStore;
    fn new() -> Self {
        let server = TestPostgres::start();
        let url = server.create_db("brume");
        Pg { server, url }
    }
    fn open(&self) -> PostgresStore {
        PostgresStore::connect(options(&self.url)).unwrap()
    }
    fn undo_rollups_migration(&self) {
        self.server.psql("brume", "DROP SCHEMA brume_api CASCADE; DROP TABLE rollups, presence, quarantine, readings_default, module_registry, deployments, deployment_agents, desired, reports, reprocess_jobs, reprocess_agents, agent_rollups, agent_streams; DELETE FROM schema_migrations WHERE version >= 3");
    }
}

crate::store_suite!(Pg);

#[test]
fn partition_names_and_bounds() {
    assert_eq!(partition_name(0), "readings_p19700101");
    assert_eq!(partition_name(-1), "readings_p19691231");
    assert_eq!(partition_name(day_of(T0)), "readings_p20240101");
    assert_eq!(partition_name(day_of(T0 - 1)), "readings_p20231231");
    assert_eq!(partition_name(day_of(T0 + 59 * DAY_NS)), "readings_p20240229");
    assert_eq!(partition_name(day_of(i64::MAX)), "readings_p22620411");
    assert_eq!(partition_name(day_of(i64::MIN)), "readings_p16770921");
    assert_eq!(partition_bounds(day_of(T0)), (T0.to_string(), (T0 + DAY_NS).to_string()));
    assert_eq!(partition_bounds(day_of(i64::MAX)).1, "MAXVALUE");
    assert_eq!(partition_bounds(day_of(i64::MIN)).0, "MINVALUE");
}

#[test]
fn daily_partitions_and_retention_by_dropping_them() {
    let f = Pg::new();
    let store = f.open();
    let day = DAY_NS;
    store
        .ingest(
            &[
                batch("a", 1, 1, &[("s", &[T0 + 5, T0 + day + 5]), ("t", &[T0 + 7])]),
                batch("a", 1, 2, &[("s", &[T0 + 2 * day + 5])]),
            ],
            1,
        )
        .unwrap();
    assert_eq!(store.partitions().unwrap(), vec!["readings_p20240101", "readings_p20240102", "readings_p20240103"]);
    // Readings really live in the day partitions, not in the parent.
    assert_eq!(f.server.psql("brume", "SELECT count(*) FROM readings_p20240102"), "1");
    // A time-range query on literal bounds only scans the partitions of its range.
    let plan = f.server.psql(
        "brume",
        &format!(
            "EXPLAIN SELECT * FROM readings WHERE stream_id = 1 AND ts_ns >= {} AND ts_ns < {} \
             ORDER BY ts_ns, agent_id, epoch, seq, idx",
            T0 + day,
            T0 + 2 * day
        ),
    );
    assert!(plan.contains("readings_p20240102"), "{plan}");
    assert!(!plan.contains("readings_p20240101") && !plan.contains("readings_p20240103"), "{plan}");

    // Retention at 2024-01-02T00:00:00.000000005: only 2024-01-01 ended before that.
    assert_eq!(store.drop_partitions_before(T0 + day + 5).unwrap(), vec!["readings_p20240101"]);
    assert_eq!(store.drop_partitions_before(T0 + day).unwrap(), Vec::<String>::new());
    assert_eq!(
        all(&store, "s", 10).0,
        vec![(T0 + day + 5, "a".to_string(), 1, 1), (T0 + 2 * day + 5, "a".to_string(), 2, 0)]
    );
    // Stream statistics follow: "t" had readings on the dropped day only.
    let streams = store.streams().unwrap();
    assert_eq!(
        streams.iter().map(|s| (s.stream.as_str(), s.readings, s.first_ts_ns, s.last_ts_ns)).collect::<Vec<_>>(),
        vec![("s", 2, Some(T0 + day + 5), Some(T0 + 2 * day + 5)), ("t", 0, None, None)]
    );
    // The dedup ledger is kept: a re-sent old batch does not bring its readings back.
    assert_eq!(store.ingest(&[batch("a", 1, 1, &[("s", &[T0 + 5])])], 2).unwrap(), vec![BatchOutcome::Duplicate]);
    assert_eq!(store.partitions().unwrap().len(), 2);
    // Late data for a dropped day recreates its partition.
    store.ingest(&[batch("a", 1, 3, &[("t", &[T0 + 9])])], 3).unwrap();
    assert_eq!(store.partitions().unwrap()[0], "readings_p20240101");
    assert_eq!(all(&store, "t", 10).0.len(), 1);
    // Agents still count the dropped readings as stored by those batches.
    assert_eq!(store.agents().unwrap()[0].readings, 5);
}

/// Issue 10: every day between 2000 and 2200 used to get its own partition, so one batch
/// with spread-out timestamps created a thousand tables. Only the window around today
/// gets daily partitions now; the rest goes to the DEFAULT partition, whose rows move
/// into a day's partition when it is created, and which retention cleans too.
#[test]
fn timestamps_outside_the_window_go_to_the_default_partition() {
    let f = Pg::new();
    let window = PartitionWindow::default();
    let store = PostgresStore::connect(PostgresOptions { partition_window: window, ..options(&f.url) }).unwrap();
    let now = crate::clock::now_ns();
    let today = day_of(now);
    let (min, max) = (brume_protocol::limits::MIN_TS_NS, brume_protocol::limits::MAX_TS_NS);
    // 1,000 readings 73 days apart across 2000..2200, today, tomorrow and the extremes
    // of i64 (the store takes any timestamp; validation restricts them before).
    let mut ts: Vec<i64> = (0..1000).map(|i| min + i * ((max - min) / 1000)).collect();
    ts.extend([now, now + DAY_NS, i64::MIN, -1, 0, i64::MAX - 1]);
    store.ingest(&[batch("a", 1, 1, &[("s", &ts)])], 1).unwrap();
    let in_window: BTreeSet<i32> = ts.iter().map(|&t| day_of(t)).filter(|&d| window.contains(today, d)).collect();
    let expected: Vec<String> = in_window.iter().map(|&d| partition_name(d)).collect();
    assert!(expected.len() >= 2 && expected.len() <= 35, "{expected:?}");
    assert_eq!(store.partitions().unwrap(), expected, "daily partitions only inside the window");
    let in_default = f.server.psql("brume", "SELECT count(*) FROM readings_default");
    assert_eq!(in_default.parse::<usize>().unwrap(), ts.len() - in_window.len());
    ts.sort();
    let read: Vec<i64> = all(&store, "s", 300).0.iter().map(|r| r.0).collect();
    assert_eq!(read, ts, "every reading is served, in order, wherever it is stored");

    // A day gets its partition later (e.g. it enters the window): its rows move there.
    let old = ts[500];
    store.ensure_partitions(old, old).unwrap();
    assert_eq!(f.server.psql("brume", &format!("SELECT count(*) FROM {}", partition_name(day_of(old)))), "1");
    store.ensure_partitions(i64::MIN, i64::MIN).unwrap(); // open-ended lower bound
    assert_eq!(f.server.psql("brume", &format!("SELECT count(*) FROM {}", partition_name(day_of(i64::MIN)))), "1");
    assert_eq!(
        f.server.psql("brume", "SELECT count(*) FROM readings_default").parse::<usize>().unwrap(),
        ts.len() - in_window.len() - 2
    );
    assert_eq!(all(&store, "s", 300).0.len(), ts.len());

    // Retention reaches the default partition: everything before 40 days ago goes.
    let cutoff = now - 40 * DAY_NS;
    let first_kept = i64::from(day_of(cutoff)) * DAY_NS;
    let kept: Vec<i64> = ts.iter().copied().filter(|&t| t >= first_kept).collect();
    assert_eq!(store.drop_days_before(cutoff).unwrap(), (ts.len() - kept.len()) as u64);
    assert_eq!(all(&store, "s", 300).0.iter().map(|r| r.0).collect::<Vec<_>>(), kept);
    assert_eq!(store.streams().unwrap()[0].readings, kept.len() as u64);
}

#[test]
fn another_hubs_retention_does_not_break_ingest() {
    let f = Pg::new();
    let (a, b) = (f.open(), f.open());
    a.ingest(&[batch("x", 1, 1, &[("s", &[T0])])], 1).unwrap();
    // `b` drops the partition `a` has cached as existing.
    assert_eq!(b.drop_partitions_before(T0 + DAY_NS).unwrap().len(), 1);
    assert_eq!(a.ingest(&[batch("x", 1, 2, &[("s", &[T0 + 1])])], 2).unwrap(), vec![BatchOutcome::Stored]);
    assert_eq!(all(&b, "s", 10).0.len(), 1);
}

#[test]
fn concurrent_hubs_migrate_once_and_store_each_batch_once() {
    let f = Pg::new();
    // Four hubs start at once on an empty database.
    let stores: Vec<PostgresStore> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4).map(|_| s.spawn(|| f.open())).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(
        f.server.psql("brume", "SELECT string_agg(version::text, ',' ORDER BY version) FROM schema_migrations"),
        (1..=SCHEMA_VERSION).map(|v| v.to_string()).collect::<Vec<_>>().join(",")
    );
    // Each hub gets every batch (as after redeliveries), in its own order and grouping,
    // on shared streams and days: every batch is stored exactly once overall.
    let batches: Vec<brume_protocol::Batch> = (1..=40)
        .map(|seq| {
            let s = format!("s{}", seq % 3);
            batch("a", 9, seq, &[(s.as_str(), &[T0 + seq as i64, T0 + DAY_NS])])
        })
        .collect();
    let stored: usize = std::thread::scope(|s| {
        let handles: Vec<_> = stores
            .iter()
            .enumerate()
            .map(|(i, store)| {
                let mut mine = batches.clone();
                mine.rotate_left(i * 7);
                if i % 2 == 1 {
                    mine.reverse();
                }
                s.spawn(move || {
                    mine.chunks(1 + i * 3)
                        .map(|group| {
                            store.ingest(group, 1).unwrap().iter().filter(|o| **o == BatchOutcome::Stored).count()
                        })
                        .sum::<usize>()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    });
    assert_eq!(stored, 40);
    let total: u64 = stores[0].streams().unwrap().iter().map(|s| s.readings).sum();
    assert_eq!(total, 80);
    let a = &stores[3].agents().unwrap()[0];
    assert_eq!((a.batches, a.watermark, a.missing.len()), (40, 40, 0));
}

#[test]
fn newer_schema_is_refused() {
    let f = Pg::new();
    drop(f.open());
    f.server.psql("brume", &format!("INSERT INTO schema_migrations (version) VALUES ({})", SCHEMA_VERSION + 1));
    assert!(matches!(PostgresStore::connect(options(&f.url)), Err(StoreError::SchemaTooNew { .. })));
}

#[test]
fn server_restart_fails_calls_then_recovers_without_reopening() {
    let mut f = Pg::new();
    let store = f.open();
    store.ingest(&[batch("a", 1, 1, &[("s", &[T0])])], 1).unwrap();
    f.server.stop();
    let err = store.ingest(&[batch("a", 1, 2, &[("s", &[T0 + 1])])], 2).unwrap_err();
    assert!(matches!(err, StoreError::Postgres { .. } | StoreError::PostgresConnect { .. }), "{err}");
    // The message carries the cause, not only "db error".
    assert!(err.to_string().len() > 40, "{err}");
    assert!(store.streams().is_err());
    f.server.restart();
    // Dead pooled connections are discarded and replaced.
    assert_eq!(store.ingest(&[batch("a", 1, 2, &[("s", &[T0 + 1])])], 3).unwrap(), vec![BatchOutcome::Stored]);
    assert_eq!(all(&store, "s", 10).0.len(), 2);
}

#[test]
fn unreachable_server_is_a_connect_error_naming_the_target() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let err =
        PostgresStore::connect(options(&format!("postgres://u:secret@127.0.0.1:{port}/db"))).unwrap_err().to_string();
    assert!(err.contains(&format!("127.0.0.1:{port}/db")), "{err}");
    assert!(!err.contains("secret"), "{err}");
}

/// The example Grafana dashboard (`integrations/grafana/brume-hub.json`) runs on the hub's
/// schema: every panel's SQL and every query variable, with Grafana's variables and macros
/// expanded the way Grafana expands them, runs against a store holding batches from two
/// agents, a loss report and a quarantined batch, and returns rows. The queries run as the
/// read-only role that `integrations/grafana/README.md` creates, with the README's own SQL,
/// so a query on a column the `brume_api` views lack, on an internal table, or a grant the
/// README forgets fails here, not on an operator's screen.
#[test]
fn grafana_dashboard_queries_run_on_the_schema() {
    use brume_protocol::{LossReason, LossReport};
    let f = Pg::new();
    let store = f.open();
    let mut b = batch("a", 1, 1, &[("s", &[T0, T0 + 60_000_000_000])]);
    b.losses = vec![LossReport { stream: "s".into(), reason: LossReason::StoreFull, total: 3 }];
    store.ingest(&[b, batch("b", 1, 1, &[("s", &[T0 + 1])])], 1).unwrap();
    store
        .quarantine(&NewQuarantine {
            agent_id: "a",
            epoch: 1,
            seq: 2,
            topic: "brume/v1/agents/a/batches",
            reason: crate::store::QuarantineReason::Rejected,
            error: "refused by the database",
            payload: b"\x01\x02",
            received_ms: 1,
        })
        .unwrap();

    // The README's role, from the README's SQL block.
    let readme = include_str!("../../../../integrations/grafana/README.md");
    let grants = readme
        .split("```sql")
        .nth(1)
        .and_then(|s| s.split("```").next())
        .expect("integrations/grafana/README.md: no ```sql block creating the read-only role");
    f.server.psql("brume", grants);
    // The contract is the views: the role cannot read the tables beneath them.
    assert_eq!(f.server.psql("brume", "SELECT has_table_privilege('grafana_reader', 'rollups', 'SELECT')"), "f");

    let dashboard: serde_json::Value =
        serde_json::from_str(include_str!("../../../../integrations/grafana/brume-hub.json")).unwrap();
    // (what, format, SQL) for every query Grafana would send.
    let mut queries: Vec<(String, String, String)> = Vec::new();
    for p in dashboard["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            let title = format!("panel {:?}", p["title"].as_str().unwrap());
            let sql = t["rawSql"].as_str().unwrap_or_else(|| panic!("{title}: a target without rawSql"));
            let format = t["format"].as_str().unwrap_or_else(|| panic!("{title}: a target without format"));
            assert!(matches!(format, "time_series" | "table"), "{title}: format {format:?}");
            queries.push((title, format.to_owned(), sql.to_owned()));
        }
    }
    for v in dashboard["templating"]["list"].as_array().unwrap() {
        if v["type"] == "query" {
            queries.push((
                format!("variable {}", v["name"]),
                "table".to_owned(),
                v["query"].as_str().unwrap().to_owned(),
            ));
        }
    }
    assert!(queries.len() >= 8, "{queries:?}");

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut config: tokio_postgres::Config = f.url.parse().unwrap();
        config.user("grafana_reader").password("choose-one");
        let (client, connection) = config.connect(NoTls).await.unwrap();
        tokio::spawn(connection);
        // The dashboard's time range: a day either side of the data.
        let (from, to) = (T0 - DAY_NS, T0 + DAY_NS);
        for (title, format, raw) in &queries {
            let sql = grafana_expand(raw, from, to).unwrap_or_else(|e| panic!("{title}: {e}\n{raw}"));
            assert!(!sql.contains('$'), "{title}: a macro or variable left unexpanded:\n{sql}");
            let rows = client.query(&sql, &[]).await.unwrap_or_else(|e| {
                // The server's message ("column ... does not exist"), not only "db error".
                let why = e.as_db_error().map_or_else(|| e.to_string(), ToString::to_string);
                panic!("{title}: {why}\n{sql}")
            });
            assert!(!rows.is_empty(), "{title} returns no rows:\n{sql}");
            if format == "time_series" {
                // Grafana turns a result into time series only by a column named `time`.
                assert!(rows[0].columns().iter().any(|c| c.name() == "time"), "{title}: no column named time:\n{sql}");
            }
            // A time range on the rollup views must be an index range on the primary key
            // (`minute`), not a filter over every minute ever stored. Seq scans are
            // disabled so the tiny test tables do not hide an unusable predicate.
            if sql.contains("rollups_1m") {
                client.batch_execute("SET enable_seqscan = off").await.unwrap();
                let plan: Vec<String> = client
                    .query(&format!("EXPLAIN {sql}"), &[])
                    .await
                    .unwrap()
                    .iter()
                    .map(|r| r.get::<_, String>(0))
                    .collect();
                client.batch_execute("RESET enable_seqscan").await.unwrap();
                assert!(
                    plan.iter().any(|l| l.contains("Index Cond") && l.contains("minute >=")),
                    "{title}: the time range is not an index condition on minute:\n{}",
                    plan.join("\n")
                );
            }
        }
    });
}

/// Expands a dashboard query as Grafana 10/11 does for a time range of `[from, to]` ns,
/// an interval of one minute, `$stream` = `s` and `$field` = `value`: first the template
/// variables (single-valued, so inserted unquoted: the SQL quotes them), then the
/// PostgreSQL data source's macros (`pkg/tsdb/grafana-postgresql-datasource/macros.go`).
/// Unknown macros and variables are errors, naming them.
fn grafana_expand(sql: &str, from: i64, to: i64) -> Result<String, String> {
    const INTERVAL_S: i64 = 60;
    let rfc3339 = |ns: i64| {
        let s = humantime::format_rfc3339_nanos(std::time::UNIX_EPOCH + Duration::from_nanos(ns as u64)).to_string();
        // Go's RFC3339Nano: no trailing zeros in the fraction, no fraction if it is zero.
        let (secs, frac) = s.trim_end_matches('Z').split_once('.').unwrap();
        match frac.trim_end_matches('0') {
            "" => format!("{secs}Z"),
            frac => format!("{secs}.{frac}Z"),
        }
    };
    let sql = sql
        .replace("$__interval_ms", &(INTERVAL_S * 1000).to_string())
        .replace("$__interval", &format!("{INTERVAL_S}s"))
        .replace("${stream}", "s")
        .replace("$stream", "s")
        .replace("${field}", "value")
        .replace("$field", "value");
    let mut out = String::new();
    let mut rest = sql.as_str();
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let call = &rest[i + 1..];
        let name_len = call.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(call.len());
        let name = &call[..name_len];
        let Some(args_on) = call[name_len..].strip_prefix('(') else {
            return Err(format!("unknown variable ${name}"));
        };
        let close = args_on.find(')').ok_or_else(|| format!("${name}( is not closed"))?;
        let args: Vec<&str> = args_on[..close].split(',').map(str::trim).filter(|a| !a.is_empty()).collect();
        let group = |col: &str, interval: &str| -> Result<String, String> {
            let interval = interval.trim_matches('\'');
            let (n, unit) = interval.split_at(interval.len().saturating_sub(1));
            let n: i64 = n.parse().map_err(|_| format!("${name}: interval {interval:?}"))?;
            let s = n * match unit {
                "s" => 1,
                "m" => 60,
                "h" => 3600,
                "d" => 86_400,
                _ => return Err(format!("${name}: interval {interval:?}")),
            };
            Ok(format!("floor(extract(epoch from {col})/{s})*{s}"))
        };
        out.push_str(&match (name, args.as_slice()) {
            ("__time", [col]) => format!("{col} AS \"time\""),
            ("__timeEpoch", [col]) => format!("extract(epoch from {col}) as \"time\""),
            ("__timeFilter", [col]) => format!("{col} BETWEEN '{}' AND '{}'", rfc3339(from), rfc3339(to)),
            ("__timeFrom", []) => format!("'{}'", rfc3339(from)),
            ("__timeTo", []) => format!("'{}'", rfc3339(to)),
            // Grafana reads `$__timeGroup(..),` (followed by a comma) as the alias form.
            ("__timeGroup", [col, interval]) if args_on[close + 1..].starts_with(',') => {
                group(col, interval)? + " AS \"time\""
            }
            ("__timeGroup", [col, interval]) => group(col, interval)?,
            ("__timeGroupAlias", [col, interval]) => group(col, interval)? + " AS \"time\"",
            ("__unixEpochFilter", [col]) => {
                format!("{col} >= {} AND {col} <= {}", from.div_euclid(1_000_000_000), to.div_euclid(1_000_000_000))
            }
            ("__unixEpochFrom", []) => from.div_euclid(1_000_000_000).to_string(),
            ("__unixEpochTo", []) => to.div_euclid(1_000_000_000).to_string(),
            ("__unixEpochNanoFilter", [col]) => format!("{col} >= {from} AND {col} <= {to}"),
            ("__unixEpochNanoFrom", []) => from.to_string(),
            ("__unixEpochNanoTo", []) => to.to_string(),
            _ => return Err(format!("the test does not expand the Grafana macro ${name}({})", &args_on[..close])),
        });
        rest = &args_on[close + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[test]
fn grafana_macros_expand_as_grafana_does() {
    let (from, to) = (T0, T0 + 3_600_000_000_000);
    let x = |sql: &str| grafana_expand(sql, from, to);
    assert_eq!(
        x("SELECT $__timeGroupAlias(time, $__interval), 1 WHERE $__timeFilter(time)").unwrap(),
        "SELECT floor(extract(epoch from time)/60)*60 AS \"time\", 1 \
         WHERE time BETWEEN '2024-01-01T00:00:00Z' AND '2024-01-01T01:00:00Z'"
    );
    assert_eq!(
        x("$__timeGroup(t, '5m'), v GROUP BY $__timeGroup(t, '5m')").unwrap(),
        "floor(extract(epoch from t)/300)*300 AS \"time\", v GROUP BY floor(extract(epoch from t)/300)*300"
    );
    assert_eq!(
        x("m BETWEEN $__unixEpochFrom()::int8 * 1000000000 AND $__unixEpochTo()::int8 * 1000000000").unwrap(),
        "m BETWEEN 1704067200::int8 * 1000000000 AND 1704070800::int8 * 1000000000"
    );
    assert_eq!(x("$__unixEpochNanoFilter(m)").unwrap(), format!("m >= {from} AND m <= {to}"));
    assert_eq!(x("'$stream' '$field' $__timeFrom()").unwrap(), "'s' 'value' '2024-01-01T00:00:00Z'");
    assert_eq!(grafana_expand("$__timeTo()", T0, T0 + 1_500_000_000).unwrap(), "'2024-01-01T00:00:01.5Z'");
    assert!(x("$__timeGroup(t)").unwrap_err().contains("$__timeGroup(t)"));
    assert!(x("$agent").unwrap_err().contains("$agent"));
}
