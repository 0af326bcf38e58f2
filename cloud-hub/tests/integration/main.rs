//! Integration tests: a real mosquitto broker, the hub in-process, an MQTT client
//! playing the agent. Needs `/usr/sbin/mosquitto`, and the PostgreSQL server binaries
//! for the `postgres_*` tests (each starts its own private server).

// The store unit tests' private PostgreSQL harness, shared rather than copied.
mod auth;
mod fleet;
mod util;

use std::time::Duration;

use brume_protocol::{AckV1, AgentMessage, HubMessage, LossReason, LossReport, topics};
use brume_test_support::TestPostgres;
use serde_json::json;
use util::{Agent, Hub, Mosquitto, batch};

/// 2024-01-01T00:00:00Z in ns: inside the hub's accepted timestamp range.
const T0: i64 = 1_704_067_200_000_000_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_is_acked_and_served_over_http() {
    let broker = Mosquitto::start().expect("starting mosquitto");
    let hub = Hub::start(broker.port).await;
    let mut agent = Agent::connect(broker.port, "agent-1").await;

    let mut b = batch("agent-1", 7, 1, &[("temp", T0 + 2, 2.5), ("temp", T0, 1.5), ("hum", T0 + 1, 40.0)]);
    b.losses = vec![LossReport { stream: "temp".into(), reason: LossReason::StoreFull, total: 2 }];
    let ack = agent.send_until_acked(&b).await;
    assert_eq!(ack, HubMessage::AckV1(AckV1 { epoch: 7, seqs: vec![1] }));

    assert_eq!(hub.get("/healthz").await, (200, "ok".to_string()));
    let readings = hub.get_json("/api/v1/readings?stream=temp").await;
    assert_eq!(
        readings,
        json!({
            "stream": "temp",
            "readings": [
                {"ts_ns": T0, "agent_id": "agent-1", "seq": 1, "idx": 1, "fields": {"value": 1.5, "ok": true, "name": "x"}},
                {"ts_ns": T0 + 2, "agent_id": "agent-1", "seq": 1, "idx": 0, "fields": {"value": 2.5, "ok": true, "name": "x"}},
            ],
            "next": null,
        })
    );
    // Pagination through the API: one reading per page, following `next`.
    let page = hub.get_json("/api/v1/readings?stream=temp&limit=1").await;
    assert_eq!(page["readings"][0]["ts_ns"], json!(T0));
    let next = page["next"].as_str().expect("a next cursor");
    let page = hub.get_json(&format!("/api/v1/readings?stream=temp&limit=1&after={next}")).await;
    assert_eq!(page["readings"][0]["ts_ns"], json!(T0 + 2));
    assert_eq!(page["next"], json!(null));
    // Range: from inclusive, to exclusive.
    let page = hub.get_json(&format!("/api/v1/readings?stream=temp&from={}&to={}", T0, T0 + 2)).await;
    assert_eq!(page["readings"].as_array().unwrap().len(), 1);
    // Unknown stream: empty list. Bad parameter: 400 naming it.
    assert_eq!(hub.get_json("/api/v1/readings?stream=nope").await["readings"], json!([]));
    let (status, body) = hub.get("/api/v1/readings?stream=temp&limit=abc").await;
    assert_eq!(status, 400);
    assert!(serde_json::from_str::<serde_json::Value>(&body).unwrap()["error"].as_str().unwrap().contains("limit"));

    assert_eq!(
        hub.get_json("/api/v1/streams").await,
        json!([
            {"stream": "hum", "readings": 1, "first_ts_ns": T0 + 1, "last_ts_ns": T0 + 1},
            {"stream": "temp", "readings": 2, "first_ts_ns": T0, "last_ts_ns": T0 + 2},
        ])
    );
    // Listing filters.
    let names = |v: serde_json::Value, key: &str| -> Vec<String> {
        v.as_array().unwrap().iter().map(|x| x[key].as_str().unwrap().to_owned()).collect()
    };
    assert_eq!(names(hub.get_json("/api/v1/streams?match=temp").await, "stream"), ["temp"]);
    assert_eq!(names(hub.get_json("/api/v1/streams?match=%23").await, "stream"), ["hum", "temp"]);
    assert_eq!(
        hub.get_json("/api/v1/streams?agent=agent-1&match=temp").await,
        json!([{"stream": "temp", "readings": 2, "first_ts_ns": T0, "last_ts_ns": T0 + 2}])
    );
    assert_eq!(hub.get_json("/api/v1/streams?agent=nobody").await, json!([]));
    assert_eq!(names(hub.get_json("/api/v1/agents?prefix=agent-").await, "agent_id"), ["agent-1"]);
    assert_eq!(hub.get_json("/api/v1/agents?prefix=other").await, json!([]));
    for (path, want) in [
        ("/api/v1/streams?match=te%2Bmp", "te+mp\\\": '+' must be a whole level"),
        ("/api/v1/agents?match=x", "unknown parameter `match` (accepted: prefix, label)"),
        ("/api/v1/presence?online=maybe", "maybe\\\" is not true or false"),
    ] {
        let (status, body) = hub.get(path).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert!(body.contains(want), "{path}: {body}");
    }
    let agents = hub.get_json("/api/v1/agents").await;
    let a = &agents[0];
    assert_eq!(agents.as_array().unwrap().len(), 1);
    assert_eq!(
        (&a["agent_id"], &a["epoch"], &a["batches"], &a["readings"], &a["watermark"], &a["max_seq"], &a["missing"]),
        (&json!("agent-1"), &json!(7), &json!(1), &json!(3), &json!(1), &json!(1), &json!([]))
    );
    assert_eq!(a["losses"], json!([{"stream": "temp", "reason": "store_full", "total": 2}]));
    assert!(a["last_seen_ms"].as_i64().unwrap() > 0);

    assert_eq!(hub.metric(r#"brume_hub_batches_total{result="stored"}"#).await, 1.0);
    assert_eq!(hub.metric("brume_hub_readings_stored_total").await, 3.0);
    assert_eq!(hub.metric("brume_hub_mqtt_connected").await, 1.0);
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_batch_is_acked_twice_and_stored_once() {
    let broker = Mosquitto::start().expect("starting mosquitto");
    let hub = Hub::start(broker.port).await;
    let mut agent = Agent::connect(broker.port, "dup").await;

    let b = batch("dup", 42, 1, &[("s", T0, 1.0), ("s", T0 + 1, 2.0)]);
    agent.send_until_acked(&b).await;
    // Drain acks of any retries, then send the same batch once more.
    while agent.next_ack(Duration::from_millis(200)).await.is_some() {}
    agent.publish(&b).await;
    let ack = agent.next_ack(util::DEADLINE).await.expect("second ack");
    assert_eq!(ack, HubMessage::AckV1(AckV1 { epoch: 42, seqs: vec![1] }));

    let readings = hub.get_json("/api/v1/readings?stream=s").await;
    assert_eq!(readings["readings"].as_array().unwrap().len(), 2);
    assert_eq!(hub.metric(r#"brume_hub_batches_total{result="stored"}"#).await, 1.0);
    assert!(hub.metric(r#"brume_hub_batches_total{result="duplicate"}"#).await >= 1.0);
    assert_eq!(hub.metric("brume_hub_readings_stored_total").await, 2.0);
    assert_eq!(hub.get_json("/api/v1/agents").await[0]["batches"], json!(1));
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_batches_are_counted_and_do_not_stop_ingest() {
    let broker = Mosquitto::start().expect("starting mosquitto");
    let hub = Hub::start(broker.port).await;
    let mut agent = Agent::connect(broker.port, "a1").await;
    // Make sure the hub is subscribed before sending what it must reject.
    agent.send_until_acked(&batch("a1", 1, 1, &[("s", T0, 1.0)])).await;
    while agent.next_ack(Duration::from_millis(200)).await.is_some() {}

    agent.publish_raw(topics::batches("a1"), b"not postcard at all".to_vec()).await;
    agent.publish(&batch("someone-else", 1, 2, &[("s", T0 + 1, 2.0)])).await;
    agent.publish(&batch("a1", 1, 3, &[("s", 5, 3.0)])).await; // 1970: bad timestamp
    // Far future (as late as i64 nanoseconds go, year 2262).
    agent.publish(&batch("a1", 1, 4, &[("s", i64::MAX, 3.0)])).await;
    // An envelope version this hub does not know.
    let mut future = AgentMessage::BatchV1(batch("a1", 1, 5, &[("s", T0, 1.0)])).encode();
    future[0] = 9;
    agent.publish_raw(topics::batches("a1"), future).await;
    agent.publish(&batch("a1", 1, 2, &[("s", T0 + 2, 4.0)])).await;
    // One connection delivers in order, so once seq 2 is acked the rejects were handled.
    // Seqs 3 and 4 are a1's own batches with bad timestamps: quarantined and acked (so
    // a1's outbox moves on); the rest could not be acked to anyone.
    let mut acked = Vec::new();
    while !acked.contains(&2) {
        match agent.next_ack(util::DEADLINE).await.expect("ack for the good batch") {
            HubMessage::AckV1(AckV1 { epoch: 1, seqs }) => acked.extend(seqs),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(acked, [3, 4, 2]);
    let quarantined = hub.get_json("/api/v1/quarantine").await;
    let entries: Vec<(u64, &str)> = quarantined["batches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| (q["seq"].as_u64().unwrap(), q["reason"].as_str().unwrap()))
        .collect();
    assert_eq!(entries, [(3, "invalid"), (4, "invalid")]);
    assert!(quarantined["batches"][0]["error"].as_str().unwrap().contains("timestamp"), "{quarantined}");
    assert_eq!(hub.metric(r#"brume_hub_quarantined_total{reason="invalid"}"#).await, 2.0);

    assert_eq!(hub.metric(r#"brume_hub_batches_total{result="rejected_malformed"}"#).await, 2.0);
    assert_eq!(hub.metric(r#"brume_hub_batches_total{result="rejected_agent_mismatch"}"#).await, 1.0);
    assert_eq!(hub.metric(r#"brume_hub_batches_total{result="rejected_bad_timestamp"}"#).await, 2.0);
    let ts: Vec<i64> = hub.get_json("/api/v1/readings?stream=s").await["readings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["ts_ns"].as_i64().unwrap())
        .collect();
    assert_eq!(ts, vec![T0, T0 + 2]);
    // Nothing from the mismatched payload was stored under either agent.
    let agents = hub.get_json("/api/v1/agents").await;
    assert_eq!(agents.as_array().unwrap().len(), 1);
    assert_eq!(agents[0]["max_seq"], json!(2));
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_reconnects_after_broker_restart() {
    let broker = Mosquitto::start().expect("starting mosquitto");
    let port = broker.port;
    let hub = Hub::start(port).await;
    let mut agent = Agent::connect(port, "r1").await;
    agent.send_until_acked(&batch("r1", 1, 1, &[("s", T0, 1.0)])).await;
    drop(agent);
    let mut broker = broker;
    broker.stop();
    // The broker back on the same port: the hub reconnects (backoff) and re-subscribes.
    broker.restart().expect("restarting mosquitto");
    let mut agent = Agent::connect(broker.port, "r1").await;
    agent.send_until_acked(&batch("r1", 1, 2, &[("s", T0 + 1, 2.0)])).await;
    assert_eq!(hub.get_json("/api/v1/agents").await[0]["watermark"], json!(2));
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_serves_http_and_stops_promptly_without_a_broker() {
    // A port nothing listens on: the hub keeps retrying MQTT in the background.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let hub = Hub::start(port).await;
    assert_eq!(hub.get("/healthz").await, (200, "ok".to_string()));
    assert_eq!(hub.get_json("/api/v1/streams").await, json!([]));
    assert_eq!(hub.get_json("/api/v1/agents").await, json!([]));
    assert_eq!(hub.metric("brume_hub_mqtt_connected").await, 0.0);
    assert_eq!(
        hub.get("/readyz").await,
        (503, r#"{"mqtt":"disconnected","store":"ok"}"#.to_string()),
        "not ready without the broker"
    );
    let started = std::time::Instant::now();
    hub.stop().await;
    assert!(started.elapsed() < Duration::from_secs(3), "shutdown took {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_backend_end_to_end_with_duplicates() {
    let pg = TestPostgres::start();
    let url = pg.create_db("hub");
    let broker = Mosquitto::start().expect("starting mosquitto");
    let hub = Hub::start_postgres(broker.port, &url).await;
    let mut agent = Agent::connect(broker.port, "pg-1").await;

    let b = batch("pg-1", 3, 1, &[("temp", T0 + 1, 2.5), ("temp", T0, 1.5), ("hum", T0, 40.0)]);
    assert_eq!(agent.send_until_acked(&b).await, HubMessage::AckV1(AckV1 { epoch: 3, seqs: vec![1] }));
    let readings = hub.get_json("/api/v1/readings?stream=temp").await;
    assert_eq!(
        readings,
        json!({
            "stream": "temp",
            "readings": [
                {"ts_ns": T0, "agent_id": "pg-1", "seq": 1, "idx": 1, "fields": {"value": 1.5, "ok": true, "name": "x"}},
                {"ts_ns": T0 + 1, "agent_id": "pg-1", "seq": 1, "idx": 0, "fields": {"value": 2.5, "ok": true, "name": "x"}},
            ],
            "next": null,
        })
    );
    // The same batch again (its ack was "lost"): acked again, stored once.
    while agent.next_ack(Duration::from_millis(200)).await.is_some() {}
    agent.publish(&b).await;
    assert_eq!(agent.next_ack(util::DEADLINE).await, Some(HubMessage::AckV1(AckV1 { epoch: 3, seqs: vec![1] })));
    assert_eq!(
        hub.get_json("/api/v1/streams").await,
        json!([
            {"stream": "hum", "readings": 1, "first_ts_ns": T0, "last_ts_ns": T0},
            {"stream": "temp", "readings": 2, "first_ts_ns": T0, "last_ts_ns": T0 + 1},
        ])
    );
    let agents = hub.get_json("/api/v1/agents").await;
    assert_eq!(
        (&agents[0]["batches"], &agents[0]["readings"], &agents[0]["watermark"]),
        (&json!(1), &json!(3), &json!(1))
    );
    assert_eq!(hub.metric(r#"brume_hub_batches_total{result="stored"}"#).await, 1.0);
    assert!(hub.metric(r#"brume_hub_batches_total{result="duplicate"}"#).await >= 1.0);
    // The rows are in PostgreSQL; 2024 is outside the window of daily partitions
    // (`storage.postgres.partition_days_back`), so in the default partition.
    assert_eq!(pg.psql("hub", "SELECT count(*) FROM readings_default"), "3");
    assert_eq!(pg.psql("hub", "SELECT count(*) FROM reading_partitions"), "0");
    hub.stop().await;
}

/// Issue 10: one poison batch stopped every agent. A batch with U+0000 in a field name
/// (PostgreSQL `text` cannot hold it) made the PostgreSQL hub retry its group forever. Now
/// it is refused by validation, quarantined and acknowledged; and a batch that passes
/// validation but that the database refuses (a constraint stands in for any such
/// refusal) is found by splitting its group and quarantined after a few attempts. Other
/// agents' batches are stored throughout, and the quarantined ones can be downloaded,
/// re-ingested once the database accepts them, or discarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_poison_batches_are_quarantined_and_never_stop_other_agents() {
    use brume_protocol::{Field, FieldsBlob, Value};
    use reqwest::Method;
    let pg = TestPostgres::start();
    let url = pg.create_db("hub");
    let broker = Mosquitto::start().expect("starting mosquitto");
    let hub = Hub::start_postgres(broker.port, &url).await;
    let mut bad = Agent::connect(broker.port, "bad-1").await;
    let mut good = Agent::connect(broker.port, "good-1").await;
    good.send_until_acked(&batch("good-1", 1, 1, &[("temp", T0, 1.0)])).await;

    // 1. A field name with U+0000, encoded by hand (the protocol crate refuses to).
    let mut poison = batch("bad-1", 9, 1, &[("temp", T0, 1.0)]);
    let fields = vec![Field { name: "a\u{0}".into(), value: Value::F64(1.0) }];
    poison.streams[0].points[0].fields = FieldsBlob(postcard::to_stdvec(&fields).unwrap());
    assert_eq!(
        bad.send_until_acked(&poison).await,
        HubMessage::AckV1(AckV1 { epoch: 9, seqs: vec![1] }),
        "quarantined and acknowledged"
    );
    good.send_until_acked(&batch("good-1", 1, 2, &[("temp", T0 + 1, 2.0)])).await;

    // 2. Valid, but refused by the database, sent between other batches so that groups
    //    mix good and poison batches.
    pg.psql("hub", "ALTER TABLE streams ADD CONSTRAINT no_poison CHECK (name <> 'poison')");
    for seq in 3..=12 {
        good.publish(&batch("good-1", 1, seq, &[("temp", T0 + seq as i64, seq as f64)])).await;
        if seq == 6 {
            bad.publish(&batch("bad-1", 9, 2, &[("poison", T0, 1.0)])).await;
        }
    }
    let mut acked = Vec::new();
    while !(3..=12).all(|s| acked.contains(&s)) {
        match good.next_ack(util::DEADLINE).await.expect("the good agent's batches are all acknowledged") {
            HubMessage::AckV1(a) => acked.extend(a.seqs),
            other => panic!("unexpected {other:?} from a hub without a signing key"),
        }
    }
    assert_eq!(
        bad.next_ack(util::DEADLINE).await,
        Some(HubMessage::AckV1(AckV1 { epoch: 9, seqs: vec![2] })),
        "the refused batch is acknowledged once quarantined"
    );
    let readings = hub.get_json("/api/v1/readings?stream=temp").await;
    assert_eq!(readings["readings"].as_array().unwrap().len(), 12, "{readings}");

    let list = hub.get_json("/api/v1/quarantine").await;
    let entries = list["batches"].as_array().unwrap();
    assert_eq!(entries.len(), 2, "{list}");
    assert_eq!((entries[0]["seq"].as_u64(), entries[0]["reason"].as_str()), (Some(1), Some("invalid")));
    assert!(entries[0]["error"].as_str().unwrap().contains("control character"), "{list}");
    assert_eq!((entries[1]["seq"].as_u64(), entries[1]["reason"].as_str()), (Some(2), Some("rejected")));
    assert!(entries[1]["error"].as_str().unwrap().contains("no_poison"), "{list}");
    assert_eq!(hub.metric(r#"brume_hub_quarantined_total{reason="rejected"}"#).await, 1.0);
    assert_eq!(hub.metric(r#"brume_hub_batches_total{result="quarantined"}"#).await, 1.0);
    let (id1, id2) = (entries[0]["id"].as_i64().unwrap(), entries[1]["id"].as_i64().unwrap());

    // The bytes as they arrived.
    let (status, _) = hub.get(&format!("/api/v1/quarantine/{id2}/payload")).await;
    assert_eq!(status, 200);
    // Still refused: stays. After the fix: stored, and gone from quarantine.
    let (status, body) = hub.request(Method::POST, &format!("/api/v1/quarantine/{id2}/reingest")).await;
    assert_eq!(status, 422, "{body}");
    pg.psql("hub", "ALTER TABLE streams DROP CONSTRAINT no_poison");
    let (status, body) = hub.request(Method::POST, &format!("/api/v1/quarantine/{id2}/reingest")).await;
    assert_eq!((status, body.as_str()), (200, format!(r#"{{"id":{id2},"outcome":"stored"}}"#).as_str()));
    assert_eq!(hub.get_json("/api/v1/readings?stream=poison").await["readings"].as_array().unwrap().len(), 1);
    // The invalid one cannot be stored; an operator discards it.
    let (status, _) = hub.request(Method::POST, &format!("/api/v1/quarantine/{id1}/reingest")).await;
    assert_eq!(status, 422);
    assert_eq!(hub.request(Method::DELETE, &format!("/api/v1/quarantine/{id1}")).await.0, 204);
    assert_eq!(hub.request(Method::DELETE, &format!("/api/v1/quarantine/{id1}")).await.0, 404);
    assert_eq!(hub.get_json("/api/v1/quarantine").await["batches"], json!([]));
    assert_eq!(hub.metric(r#"brume_hub_quarantine_released_total{action="reingested"}"#).await, 1.0);
    assert_eq!(hub.metric(r#"brume_hub_quarantine_released_total{action="discarded"}"#).await, 1.0);
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_withholds_acks_until_the_database_is_back() {
    let mut pg = TestPostgres::start();
    let url = pg.create_db("hub");
    let broker = Mosquitto::start().expect("starting mosquitto");
    let hub = Hub::start_postgres(broker.port, &url).await;
    let mut agent = Agent::connect(broker.port, "pg-2").await;
    agent.send_until_acked(&batch("pg-2", 1, 1, &[("s", T0, 1.0)])).await;
    while agent.next_ack(Duration::from_millis(200)).await.is_some() {}
    assert_eq!(hub.get("/readyz").await, (200, r#"{"mqtt":"connected","store":"ok"}"#.to_string()));
    assert_eq!(hub.metric("brume_hub_batch_latency_seconds_count").await, 1.0, "one stored batch observed");

    pg.stop();
    agent.publish(&batch("pg-2", 1, 2, &[("s", T0 + 1, 2.0)])).await;
    // Wait until the hub has tried and failed to store it...
    let start = std::time::Instant::now();
    while hub.metric("brume_hub_db_errors_total").await < 2.0 {
        assert!(start.elapsed() < util::DEADLINE, "no ingest failure seen");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // ...and check it acknowledged nothing meanwhile, and says it is not ready.
    assert_eq!(agent.next_ack(Duration::from_millis(300)).await, None);
    let (status, body) = hub.get("/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.starts_with(r#"{"mqtt":"connected","store":"#) && !body.contains(r#""store":"ok""#), "{body}");
    assert_eq!(hub.metric(r#"brume_hub_batches_total{result="stored"}"#).await, 1.0);

    // Same hub, database back: the held batch is stored and acknowledged by the retry.
    pg.restart();
    assert_eq!(agent.next_ack(util::DEADLINE).await, Some(HubMessage::AckV1(AckV1 { epoch: 1, seqs: vec![2] })));
    let ts: Vec<i64> = hub.get_json("/api/v1/readings?stream=s").await["readings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["ts_ns"].as_i64().unwrap())
        .collect();
    assert_eq!(ts, vec![T0, T0 + 1]);
    assert_eq!(hub.get_json("/api/v1/agents").await[0]["watermark"], json!(2));
    hub.stop().await;
}

/// `/api/v1/aggregate` over HTTP: buckets from rollups for whole-minute steps, from raw
/// readings below a minute, and parameter errors that name the parameter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregate_api_buckets_a_stream() {
    let broker = Mosquitto::start().expect("starting mosquitto");
    let hub = Hub::start(broker.port).await;
    let mut agent = Agent::connect(broker.port, "agg-1").await;
    const MIN: i64 = 60_000_000_000;
    // Three minutes, two readings each, 10 s apart inside the minute.
    let readings: Vec<(&str, i64, f64)> =
        (0..6).map(|i| ("temp", T0 + (i / 2) * MIN + (i % 2) * 10_000_000_000, i as f64)).collect();
    agent.send_until_acked(&batch("agg-1", 1, 1, &readings)).await;

    let v = hub.get_json(&format!("/api/v1/aggregate?stream=temp&from={T0}&to={}&step=2m", T0 + 3 * MIN)).await;
    assert_eq!(v["source"], "rollups");
    assert_eq!(v["step_ns"], 2 * MIN);
    // T0 is a whole number of 2-minute steps since the epoch.
    assert_eq!(
        v["buckets"],
        json!([
            {"start_ns": T0, "count": 4, "min": 0.0, "max": 3.0, "mean": 1.5, "last": 3.0},
            {"start_ns": T0 + 2 * MIN, "count": 2, "min": 4.0, "max": 5.0, "mean": 4.5, "last": 5.0},
        ])
    );
    let v = hub.get_json(&format!("/api/v1/aggregate?stream=temp&from={T0}&to={}&step=10s", T0 + MIN)).await;
    assert_eq!(v["source"], "raw");
    let starts: Vec<i64> = v["buckets"].as_array().unwrap().iter().map(|b| b["start_ns"].as_i64().unwrap()).collect();
    assert_eq!(starts, [T0, T0 + 10_000_000_000]);
    // `buckets=3` over three minutes: one-minute steps, from the rollups.
    let v = hub.get_json(&format!("/api/v1/aggregate?stream=temp&from={T0}&to={}&buckets=3", T0 + 3 * MIN)).await;
    assert_eq!((v["step_ns"].as_i64(), v["buckets"].as_array().unwrap().len()), (Some(MIN), 3));

    for (query, want) in [
        ("stream=temp&from=1&to=2&step=1s&buckets=2", "give `step` or `buckets`, not both"),
        ("stream=temp&from=5&to=2", "`from` (5) must be before `to` (2)"),
        ("stream=temp&from=1", "parameters `from` and `to` (ns since the Unix epoch) are required"),
        (
            "stream=temp&from=0&to=1000000000000&step=1ns",
            "1000000000000 buckets requested, at most 10000: use a larger step or fewer buckets",
        ),
        ("from=1&to=2", "missing parameter `stream`"),
    ] {
        let (status, body) = hub.get(&format!("/api/v1/aggregate?{query}")).await;
        assert_eq!(status, 400, "{query}: {body}");
        assert!(body.contains(want), "{query}: {body}");
    }
}

/// `/api/v1/fleet/aggregate`: one stream across the agents selected by their presence
/// labels, with per-bucket agents, mean and percentiles of the agents' means.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_aggregate_combines_agents_by_label() {
    let broker = Mosquitto::start().expect("starting mosquitto");
    let hub = Hub::start(broker.port).await;
    const MIN: i64 = 60_000_000_000;
    // Three agents at plant-1 (means 1, 2 and 30 in the first minute), one at plant-2.
    let mut agents = Vec::new();
    for (id, site, values) in [
        ("f-a", "plant-1", [0.0, 2.0]),
        ("f-b", "plant-1", [2.0, 2.0]),
        ("f-c", "plant-1", [20.0, 40.0]),
        ("f-d", "plant-2", [1000.0, 1000.0]),
    ] {
        let mut agent = Agent::connect(broker.port, id).await;
        let readings = [("temp", T0, values[0]), ("temp", T0 + 1, values[1]), ("temp", T0 + MIN, 5.0)];
        agent.send_until_acked(&batch(id, 1, 1, &readings)).await;
        // After an ack, so the hub's subscriptions (status first) are all in place.
        let status = util::status(id, &[("site", site)]);
        agent.publish_raw(topics::status(id), status.encode()).await;
        agents.push(agent);
    }
    let start = std::time::Instant::now();
    while hub.get_json("/api/v1/presence").await.as_array().unwrap().len() < 4 {
        assert!(start.elapsed() < util::DEADLINE, "presence never arrived");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The streams the labelled agents sent, their readings summed.
    assert_eq!(
        hub.get_json("/api/v1/streams?label=site:plant-2").await,
        json!([{"stream": "temp", "readings": 3, "first_ts_ns": T0, "last_ts_ns": T0 + MIN}])
    );
    assert_eq!(hub.get_json("/api/v1/streams?label=site:plant-1").await[0]["readings"], json!(9));
    assert_eq!(hub.get_json("/api/v1/streams?label=site:mars").await, json!([]));
    let v = hub
        .get_json(&format!(
            "/api/v1/fleet/aggregate?stream=temp&label=site:plant-1&from={T0}&to={}&step=1m",
            T0 + 2 * MIN
        ))
        .await;
    assert_eq!(v["agents"], json!(["f-a", "f-b", "f-c"]));
    // Means per agent: 1, 2, 30. p95 interpolates between 2 and 30: 2 + 0.9 * 28.
    let p95 = v["buckets"][0]["p95"].as_f64().unwrap();
    assert!((p95 - 27.2).abs() < 1e-9, "p95 {p95}");
    let mut v = v;
    v["buckets"][0]["p95"] = json!(27.2);
    assert_eq!(
        v["buckets"],
        json!([
            {"start_ns": T0, "agents": 3, "count": 6, "min": 0.0, "max": 40.0, "mean": 11.0, "p50": 2.0, "p95": 27.2},
            {"start_ns": T0 + MIN, "agents": 3, "count": 3, "min": 5.0, "max": 5.0, "mean": 5.0, "p50": 5.0, "p95": 5.0},
        ])
    );
    // Without a selector: every agent.
    let v = hub.get_json(&format!("/api/v1/fleet/aggregate?stream=temp&from={T0}&to={}&step=1m", T0 + MIN)).await;
    assert_eq!((v["agents"].clone(), v["buckets"][0]["agents"].clone()), (json!(null), json!(4)));
    // A label nobody has selects nobody.
    let v =
        hub.get_json(&format!("/api/v1/fleet/aggregate?stream=temp&label=site:mars&from={T0}&to={}", T0 + MIN)).await;
    assert_eq!((v["agents"].clone(), v["buckets"].clone()), (json!([]), json!([])));
    for (query, want) in [
        (format!("stream=temp&from={T0}&to={}&step=10s", T0 + MIN), "whole number of minutes"),
        ("stream=temp&from=1&to=2&label=site".to_string(), "is not key:value"),
        ("stream=temp&from=1&to=2&color=red".to_string(), "unknown parameter `color`"),
    ] {
        let (status, body) = hub.get(&format!("/api/v1/fleet/aggregate?{query}")).await;
        assert_eq!(status, 400, "{query}: {body}");
        assert!(body.contains(want), "{query}: {body}");
    }
    hub.stop().await;
}

/// `/api/v1/tail`: Server-Sent Events with the current bucket, then the bucket again each
/// time new readings change it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_streams_buckets_as_readings_arrive() {
    let broker = Mosquitto::start().expect("starting mosquitto");
    let hub = Hub::start(broker.port).await;
    let mut agent = Agent::connect(broker.port, "tail-1").await;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as i64;
    agent.send_until_acked(&batch("tail-1", 1, 1, &[("live", now, 1.0)])).await;

    let mut resp = reqwest::get(format!("{}/api/v1/tail?stream=live&step=1h", hub.url)).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut text = String::new();
    let mut next_event = async || -> serde_json::Value {
        loop {
            if let Some(end) = text.find("\n\n") {
                let event: String = text.drain(..end + 2).collect();
                if let Some(data) = event.lines().find_map(|l| l.strip_prefix("data: ")) {
                    assert!(event.contains("event: bucket"), "{event}");
                    return serde_json::from_str(data).unwrap();
                }
                continue; // a keep-alive comment
            }
            let chunk =
                tokio::time::timeout(util::DEADLINE, resp.chunk()).await.expect("an event in time").unwrap().unwrap();
            text.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    };
    let first = next_event().await;
    assert_eq!((first["count"].as_u64(), first["last"].as_f64()), (Some(1), Some(1.0)), "{first}");
    agent.send_until_acked(&batch("tail-1", 1, 2, &[("live", now + 1, 5.0)])).await;
    let second = next_event().await;
    assert_eq!(second["start_ns"], first["start_ns"]);
    assert_eq!(
        (second["count"].as_u64(), second["max"].as_f64(), second["last"].as_f64()),
        (Some(2), Some(5.0), Some(5.0)),
        "{second}"
    );

    let (status, body) = hub.get("/api/v1/tail?stream=live&from=1").await;
    assert_eq!((status, body.contains("unknown parameter `from`")), (400, true), "{body}");
    hub.stop().await;
}

/// A publish larger than the protocol allows on a batch topic (a hostile or broken
/// client): the hub drops the connection it arrived on, reconnects, and goes on acking
/// other agents' batches. (Configure the broker's own message size limit to stop such
/// publishes before they reach any hub: see cloud-hub/POSTGRES.md.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_publish_does_not_stop_the_hub() {
    let broker = Mosquitto::start().expect("starting mosquitto");
    let hub = Hub::start(broker.port).await;
    let mut good = Agent::connect(broker.port, "good").await;
    good.send_until_acked(&batch("good", 1, 1, &[("g", T0, 1.0)])).await;

    let mut opts = rumqttc::MqttOptions::new("hostile", "127.0.0.1", broker.port);
    opts.set_max_packet_size(16 << 20, 16 << 20);
    let (client, mut el) = rumqttc::AsyncClient::new(opts, 10);
    let huge = vec![0u8; brume_protocol::limits::MAX_MESSAGE_BYTES + 4096];
    client.publish(topics::batches("hostile"), rumqttc::QoS::AtLeastOnce, false, huge).await.unwrap();
    let sent = tokio::time::timeout(util::DEADLINE, async {
        loop {
            if let Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) = el.poll().await {
                return;
            }
        }
    })
    .await;
    assert!(sent.is_ok(), "the broker took the oversize publish");

    good.send_until_acked(&batch("good", 1, 2, &[("g", T0 + 1, 2.0)])).await;
    assert_eq!(hub.get_json("/api/v1/agents").await[0]["watermark"], json!(2));
    hub.stop().await;
}

/// The per-agent gap gauge: batches 1 and 3 stored, 2 missing, shows one missing batch
/// for that agent after the next refresh; filling the gap brings it back to 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_batches_gauge_per_agent() {
    let broker = Mosquitto::start().expect("starting mosquitto");
    let hub = Hub::start_with(broker.port, |cfg| cfg.ingest.fleet_metrics_interval = Duration::from_millis(100)).await;
    let mut agent = Agent::connect(broker.port, "gap-1").await;
    agent.send_until_acked(&batch("gap-1", 1, 1, &[("g", T0, 1.0)])).await;
    agent.send_until_acked(&batch("gap-1", 1, 3, &[("g", T0 + 2, 3.0)])).await;
    let gauge = r#"brume_hub_agent_missing_batches{agent_id="gap-1"}"#;
    let start = std::time::Instant::now();
    while hub.metric(gauge).await != 1.0 {
        assert!(start.elapsed() < util::DEADLINE, "gauge never showed the gap");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    agent.send_until_acked(&batch("gap-1", 1, 2, &[("g", T0 + 1, 2.0)])).await;
    while hub.metric(gauge).await != 0.0 {
        assert!(start.elapsed() < util::DEADLINE, "gauge never cleared");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(hub.metric("brume_hub_agents_online").await, 0.0, "no presence messages in this test");
    hub.stop().await;
}

/// The fleet gauges alerting rules use: agents known and online, the agents' outboxes (sum
/// and deepest), deployments by state; refreshed from presence messages and the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_gauges_follow_presence() {
    use brume_protocol::AgentStatus;
    let broker = Mosquitto::start().expect("starting mosquitto");
    let hub = Hub::start_with(broker.port, |cfg| cfg.ingest.fleet_metrics_interval = Duration::from_millis(100)).await;
    let mut agent = Agent::connect(broker.port, "g-1").await;
    // An ack first, so the hub's subscriptions (status first) are in place.
    agent.send_until_acked(&batch("g-1", 1, 1, &[("g", T0, 1.0)])).await;
    // g-1 speaks version 2 presence with a backlog 90 s old, g-2 version 1.
    for (id, online, outbox) in [("g-1", true, 3), ("g-2", false, 7)] {
        let AgentStatus::V1(mut st) = util::status(id, &[]) else { unreachable!("util::status is version 1") };
        st.online = online;
        st.outbox_batches = outbox;
        st.sent_ms = 100_000;
        let msg = match online {
            true => AgentStatus::V2(st, brume_protocol::StatusExtV2 { oldest_outbox_ms: Some(10_000) }),
            false => AgentStatus::V1(st),
        };
        agent.publish_raw(topics::status(id), msg.encode()).await;
    }
    let want = [
        ("brume_hub_agents_known", 2.0),
        ("brume_hub_agents_online", 1.0),
        ("brume_hub_agents_outbox_batches", 10.0),
        ("brume_hub_agent_outbox_batches_max", 7.0),
        ("brume_hub_agent_backlog_age_seconds_max", 90.0),
        (r#"brume_hub_deployments{state="rolling"}"#, 0.0),
        (r#"brume_hub_deployments{state="rolled_back"}"#, 0.0),
    ];
    let start = std::time::Instant::now();
    loop {
        let mut got = Vec::new();
        for (name, _) in want {
            got.push((name, hub.metric(name).await));
        }
        if got == want {
            break;
        }
        assert!(start.elapsed() < util::DEADLINE, "fleet gauges {got:?}, want {want:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // `metric` reads an absent sample as 0: the zeros above must be real samples.
    let body = hub.get("/metrics").await.1;
    for (name, v) in want {
        assert!(body.lines().any(|l| l == format!("{name} {v}")), "no sample {name} {v} in\n{body}");
    }
    let presence = hub.get_json("/api/v1/presence").await;
    let ages: Vec<(&str, &serde_json::Value)> =
        presence.as_array().unwrap().iter().map(|p| (p["agent_id"].as_str().unwrap(), &p["backlog_age_s"])).collect();
    assert_eq!(ages, [("g-1", &json!(90)), ("g-2", &json!(null))]);
    hub.stop().await;
}

/// The OpenAPI document is served, is valid JSON, and lists exactly the routes the hub
/// serves: every documented path answers (never 404), and the list matches the router's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_document_matches_the_routes() {
    let broker = Mosquitto::start().expect("starting mosquitto");
    let hub = Hub::start(broker.port).await;
    let doc = hub.get_json("/api/v1/openapi.json").await;
    let mut paths: Vec<&str> = doc["paths"].as_object().unwrap().keys().map(String::as_str).collect();
    paths.sort();
    assert_eq!(
        paths,
        [
            "/api/v1/agents",
            "/api/v1/aggregate",
            "/api/v1/deployments",
            "/api/v1/deployments/{id}",
            "/api/v1/deployments/{id}/{action}",
            "/api/v1/fleet/agents",
            "/api/v1/fleet/aggregate",
            "/api/v1/modules",
            "/api/v1/openapi.json",
            "/api/v1/presence",
            "/api/v1/quarantine",
            "/api/v1/quarantine/{id}",
            "/api/v1/quarantine/{id}/payload",
            "/api/v1/quarantine/{id}/reingest",
            "/api/v1/readings",
            "/api/v1/registry/modules",
            "/api/v1/registry/modules/{sha256}",
            "/api/v1/registry/modules/{sha256}/precompiled/{target}",
            "/api/v1/reprocess",
            "/api/v1/reprocess/{id}",
            "/api/v1/reprocess/{id}/cancel",
            "/api/v1/session",
            "/api/v1/streams",
            "/api/v1/tail",
            "/healthz",
            "/metrics",
            "/readyz",
        ]
    );
    for p in paths {
        if p == "/api/v1/tail" {
            continue; // a stream that never ends; its 400 without parameters is below
        }
        let (status, body) = hub.get(p).await;
        assert_ne!(status, 404, "{p}: {body}");
    }
    assert_eq!(hub.get("/api/v1/tail").await.0, 400);
    assert_eq!(hub.get("/api/v1/nothing-here").await.0, 404, "the check above can fail");
    hub.stop().await;
}
