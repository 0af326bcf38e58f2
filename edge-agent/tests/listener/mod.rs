//! The built-in MQTT listener against the protocol's rules (issue 10): one case per rule
//! the listener used to break, and exactly-once from sensors with persistent sessions
//! (QoS 1 re-sends after a restart, QoS 2's full flow).

use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;

use crate::util::agent::Agent;
use crate::util::mqtt::{
    QoS4, QoS5, RawConn, connect_v4, connect_v5_session, expect_puback_v4, publish_v4, publish_v5, raw_connect_flags,
};

/// What a rule-breaking sensor must get back.
#[derive(Debug)]
enum Expect {
    /// The connection is closed without an answer (MQTT 3.1.1 has no error packet).
    Closed,
    /// MQTT 5: DISCONNECT with this reason, then the close.
    Disconnect(v5::DisconnectReasonCode),
    /// CONNACK with this return code, then the close.
    ConnAckV4(v4::ConnectReturnCode),
    /// MQTT 5 CONNACK with this reason code, then the close.
    ConnAckV5(v5::ConnectReturnCode),
}

/// What a case sends: a raw first packet (its own CONNECT), or a PUBLISH after a good
/// CONNECT of the given version.
enum Send {
    Raw(Vec<u8>),
    V4Publish(&'static str),
    V5Publish(&'static str),
    V5Connect { client_id: &'static str, clean_start: bool, expiry: Option<u32> },
}

/// Proves each protocol rule with its own minimal case: the sensor gets the answer the
/// rule prescribes, the violation is counted under its reason, nothing of it is stored,
/// and the listener keeps serving others.
#[tokio::test]
async fn protocol_violations_are_refused_and_store_nothing() {
    let agent = Agent::start().await;
    let cases: Vec<(&str, Send, Expect, &str)> = vec![
        // MQTT-3.1.2-3: the reserved CONNECT flag must be 0.
        ("reserved flag", Send::Raw(raw_connect_flags("MQTT", 4, "r1", 0x03)), Expect::Closed, "protocol_error"),
        // MQTT-3.1.3-8: an empty client id needs CleanSession = 1.
        (
            "empty id, persistent (3.1.1)",
            Send::Raw(raw_connect_flags("MQTT", 4, "", 0x00)),
            Expect::ConnAckV4(v4::ConnectReturnCode::BadClientId),
            "client_id_rejected",
        ),
        (
            "empty id, persistent (5)",
            Send::V5Connect { client_id: "", clean_start: false, expiry: Some(60) },
            Expect::ConnAckV5(v5::ConnectReturnCode::ClientIdentifierNotValid),
            "client_id_rejected",
        ),
        // MQTT-3.3.2-2: no wildcards in a topic name; MQTT-4.7.3-1: not empty; MQTT-1.5.3-2: no U+0000.
        ("'+' in topic (3.1.1)", Send::V4Publish("a/+/b"), Expect::Closed, "bad_topic"),
        ("'#' in topic (3.1.1)", Send::V4Publish("a/#"), Expect::Closed, "bad_topic"),
        ("empty topic (3.1.1)", Send::V4Publish(""), Expect::Closed, "bad_topic"),
        ("U+0000 in topic (3.1.1)", Send::V4Publish("a\0b"), Expect::Closed, "bad_topic"),
        (
            "'+' in topic (5)",
            Send::V5Publish("a/+"),
            Expect::Disconnect(v5::DisconnectReasonCode::TopicNameInvalid),
            "bad_topic",
        ),
        (
            "'#' in topic (5)",
            Send::V5Publish("#"),
            Expect::Disconnect(v5::DisconnectReasonCode::TopicNameInvalid),
            "bad_topic",
        ),
        (
            "U+0000 in topic (5)",
            Send::V5Publish("x\0"),
            Expect::Disconnect(v5::DisconnectReasonCode::TopicNameInvalid),
            "bad_topic",
        ),
        // No topic aliases are offered (topic_alias_max 0), so an empty name stands for nothing.
        (
            "empty topic (5)",
            Send::V5Publish(""),
            Expect::Disconnect(v5::DisconnectReasonCode::TopicNameInvalid),
            "bad_topic",
        ),
    ];
    for (name, send, expect, reason) in cases {
        let before = agent.bad_input(reason).await;
        let mut c = match send {
            Send::Raw(bytes) => {
                let mut c = RawConn::open(agent.mqtt).await;
                c.send(&bytes).await;
                c
            }
            Send::V4Publish(topic) => {
                let (mut c, ack) = connect_v4(agent.mqtt, &format!("case-{before}-{reason}"), true).await;
                assert_eq!(ack.code, v4::ConnectReturnCode::Success, "{name}");
                c.send_v4(publish_v4(topic, QoS4::AtLeastOnce, 1, r#"{"v": 1}"#)).await;
                c
            }
            Send::V5Publish(topic) => {
                let (mut c, ack) =
                    connect_v5_session(agent.mqtt, &format!("case5-{before}-{reason}"), true, None).await;
                assert_eq!(ack.code, v5::ConnectReturnCode::Success, "{name}");
                c.send_v5(publish_v5(topic, QoS5::AtLeastOnce, 1, r#"{"v": 1}"#)).await;
                c
            }
            Send::V5Connect { client_id, clean_start, expiry } => {
                let mut c = RawConn::open(agent.mqtt).await;
                let properties = expiry.map(|e| v5::ConnectProperties {
                    session_expiry_interval: Some(e),
                    ..v5::ConnectProperties::new()
                });
                let connect = v5::Connect { keep_alive: 60, client_id: client_id.into(), clean_start, properties };
                c.send_v5(v5::Packet::Connect(connect, None, None)).await;
                c
            }
        };
        match expect {
            Expect::Closed => c.assert_closed_silently().await,
            Expect::Disconnect(code) => c.assert_disconnected_v5(code).await,
            Expect::ConnAckV4(code) => {
                match c.recv_v4().await {
                    v4::Packet::ConnAck(ack) => assert_eq!(ack.code, code, "{name}"),
                    other => panic!("{name}: expected CONNACK, got {other:?}"),
                }
                c.assert_closed_silently().await;
            }
            Expect::ConnAckV5(code) => {
                match c.recv_v5().await {
                    v5::Packet::ConnAck(ack) => assert_eq!(ack.code, code, "{name}"),
                    other => panic!("{name}: expected CONNACK, got {other:?}"),
                }
                c.assert_closed_silently().await;
            }
        }
        assert_eq!(agent.bad_input(reason).await, before + 1, "{name}: counted as {reason}");
    }
    assert_eq!(agent.committed().await, 0, "nothing of a refused packet is stored");
    agent.assert_still_works("probe", 1).await;
}

/// Proves an empty client id with a clean session is given a unique one: two anonymous
/// sensors do not take each other over (MQTT 5 is told the assigned id).
#[tokio::test]
async fn anonymous_clean_sessions_get_their_own_ids() {
    let agent = Agent::start().await;
    let (mut a, ack) = connect_v4(agent.mqtt, "", true).await;
    assert_eq!(ack.code, v4::ConnectReturnCode::Success);
    let (mut b, ack) = connect_v5_session(agent.mqtt, "", true, None).await;
    assert_eq!(ack.code, v5::ConnectReturnCode::Success);
    let assigned = ack.properties.and_then(|p| p.assigned_client_identifier).expect("assigned client identifier");
    assert!(assigned.starts_with("brume-auto-"), "{assigned}");
    // Both connections still work: neither took the other over.
    a.send_v4(publish_v4("anon/a", QoS4::AtLeastOnce, 1, "1")).await;
    expect_puback_v4(&mut a, 1).await;
    b.send_v5(publish_v5("anon/b", QoS5::AtLeastOnce, 1, "2")).await;
    crate::util::mqtt::expect_puback_v5(&mut b, 1, v5::PubAckReason::Success).await;
    agent.wait_readings(2).await;
}

/// Issue 10: a sensor with a persistent session re-sends (DUP) a PUBLISH whose PUBACK it
/// never got because the agent went down after committing it: it was stored twice. Now
/// the packet identifier is committed with the readings, and survives the restart, so
/// the re-send is acknowledged and stores nothing. A reused identifier with other content,
/// or without DUP, is a new message.
#[tokio::test]
async fn qos1_resend_of_a_committed_publish_is_not_stored_twice_after_a_restart() {
    let agent = Agent::start().await;
    let (mut c, ack) = connect_v4(agent.mqtt, "keeper-1", false).await;
    assert_eq!((ack.code, ack.session_present), (v4::ConnectReturnCode::Success, false));
    c.send_v4(publish_v4("keep/t", QoS4::AtLeastOnce, 7, r#"{"v": 1}"#)).await;
    expect_puback_v4(&mut c, 7).await; // committed; the sensor "loses" this PUBACK
    let mut c5 = {
        let (c5, ack) = connect_v5_session(agent.mqtt, "keeper-5", false, Some(3600)).await;
        assert_eq!((ack.code, ack.session_present), (v5::ConnectReturnCode::Success, false));
        c5
    };
    c5.send_v5(publish_v5("keep/t5", QoS5::AtLeastOnce, 3, r#"{"v": 5}"#)).await;
    crate::util::mqtt::expect_puback_v5(&mut c5, 3, v5::PubAckReason::Success).await;
    drop((c, c5));
    let dir = agent.stop().await;

    // The agent comes back on the same data directory; the sensors resume their sessions.
    let agent = Agent::start_in(dir, |_| {}).await;
    assert_eq!(agent.readings().await, 2);
    let (mut c, ack) = connect_v4(agent.mqtt, "keeper-1", false).await;
    assert_eq!(
        (ack.code, ack.session_present),
        (v4::ConnectReturnCode::Success, true),
        "the session survived the restart"
    );
    let mut resend = publish_v4("keep/t", QoS4::AtLeastOnce, 7, r#"{"v": 1}"#);
    if let v4::Packet::Publish(p) = &mut resend {
        p.dup = true;
    }
    c.send_v4(resend).await;
    expect_puback_v4(&mut c, 7).await;
    let (mut c5, ack) = connect_v5_session(agent.mqtt, "keeper-5", false, Some(3600)).await;
    assert!(ack.session_present);
    let mut resend = publish_v5("keep/t5", QoS5::AtLeastOnce, 3, r#"{"v": 5}"#);
    if let v5::Packet::Publish(p) = &mut resend {
        p.dup = true;
    }
    c5.send_v5(resend).await;
    crate::util::mqtt::expect_puback_v5(&mut c5, 3, v5::PubAckReason::Success).await;
    assert_eq!(agent.metric("brume_agent_sensor_resends_deduplicated_total").await, 2);

    // Identifier 7 reused: with other content (a re-send of a message the agent never
    // committed), and as a new message (DUP = 0) with the same content: both stored.
    let mut reused = publish_v4("keep/t", QoS4::AtLeastOnce, 7, r#"{"v": 2}"#);
    if let v4::Packet::Publish(p) = &mut reused {
        p.dup = true;
    }
    c.send_v4(reused).await;
    expect_puback_v4(&mut c, 7).await;
    c.send_v4(publish_v4("keep/t", QoS4::AtLeastOnce, 7, r#"{"v": 2}"#)).await;
    expect_puback_v4(&mut c, 7).await;
    agent.wait_readings(4).await;
    assert_eq!(agent.readings().await, 4);

    // A clean session forgets: the same re-send is then a new message.
    drop(c);
    let (mut c, ack) = connect_v4(agent.mqtt, "keeper-1", true).await;
    assert!(!ack.session_present);
    let mut resend = publish_v4("keep/t", QoS4::AtLeastOnce, 7, r#"{"v": 2}"#);
    if let v4::Packet::Publish(p) = &mut resend {
        p.dup = true;
    }
    c.send_v4(resend).await;
    expect_puback_v4(&mut c, 7).await;
    agent.wait_readings(5).await;
}

/// Proves QoS 2 end to end: PUBREC after the commit; a re-send of the PUBLISH (before
/// PUBREL, also after a restart) gets PUBREC again and stores nothing; PUBREL gets
/// PUBCOMP once the identifier is released, after which it may carry a new message.
/// MQTT 5 gets PUBREC 0x99 for a bad payload.
#[tokio::test]
async fn qos2_is_exactly_once_across_a_restart() {
    let agent = Agent::start().await;
    let (mut c, _) = connect_v4(agent.mqtt, "exact-1", false).await;
    let publish = || publish_v4("exact/t", QoS4::ExactlyOnce, 9, r#"{"v": 9}"#);
    c.send_v4(publish()).await;
    expect_v4(&mut c, "PUBREC 9", |p| matches!(p, v4::Packet::PubRec(r) if r.pkid == 9)).await;
    drop(c);
    let dir = agent.stop().await;

    let agent = Agent::start_in(dir, |_| {}).await;
    let (mut c, ack) = connect_v4(agent.mqtt, "exact-1", false).await;
    assert!(ack.session_present);
    let mut again = publish();
    if let v4::Packet::Publish(p) = &mut again {
        p.dup = true;
    }
    c.send_v4(again.clone()).await;
    expect_v4(&mut c, "PUBREC 9 again", |p| matches!(p, v4::Packet::PubRec(r) if r.pkid == 9)).await;
    c.send_v4(again).await; // even twice
    expect_v4(&mut c, "PUBREC 9 again", |p| matches!(p, v4::Packet::PubRec(r) if r.pkid == 9)).await;
    c.send_v4(v4::Packet::PubRel(v4::PubRel::new(9))).await;
    expect_v4(&mut c, "PUBCOMP 9", |p| matches!(p, v4::Packet::PubComp(r) if r.pkid == 9)).await;
    assert_eq!(agent.readings().await, 1, "stored once");
    // Released: identifier 9 now carries a new message.
    c.send_v4(publish_v4("exact/t", QoS4::ExactlyOnce, 9, r#"{"v": 10}"#)).await;
    expect_v4(&mut c, "PUBREC 9 (new)", |p| matches!(p, v4::Packet::PubRec(r) if r.pkid == 9)).await;
    c.send_v4(v4::Packet::PubRel(v4::PubRel::new(9))).await;
    expect_v4(&mut c, "PUBCOMP 9 (new)", |p| matches!(p, v4::Packet::PubComp(r) if r.pkid == 9)).await;
    agent.wait_readings(2).await;

    // MQTT 5, clean session: the flow works without stored state; a bad payload ends it.
    let (mut c5, ack) = connect_v5_session(agent.mqtt, "exact-5", true, None).await;
    assert_eq!(ack.properties.and_then(|p| p.max_qos), None, "QoS 2 is supported");
    c5.send_v5(publish_v5("exact/t5", QoS5::ExactlyOnce, 1, r#"{"v": 1}"#)).await;
    match c5.recv_v5().await {
        v5::Packet::PubRec(r) => assert_eq!((r.pkid, r.reason), (1, v5::PubRecReason::Success)),
        other => panic!("expected PUBREC, got {other:?}"),
    }
    c5.send_v5(v5::Packet::PubRel(v5::PubRel::new(1, None))).await;
    match c5.recv_v5().await {
        v5::Packet::PubComp(r) => assert_eq!(r.pkid, 1),
        other => panic!("expected PUBCOMP, got {other:?}"),
    }
    c5.send_v5(publish_v5("exact/t5", QoS5::ExactlyOnce, 2, "{not json")).await;
    match c5.recv_v5().await {
        v5::Packet::PubRec(r) => assert_eq!((r.pkid, r.reason), (2, v5::PubRecReason::PayloadFormatInvalid)),
        other => panic!("expected PUBREC 0x99, got {other:?}"),
    }
    agent.wait_readings(3).await;
    assert_eq!(agent.readings().await, 3);
}

/// Receives the next v4 packet and checks it with `ok`.
async fn expect_v4(c: &mut RawConn, what: &str, ok: impl Fn(&v4::Packet) -> bool) {
    let p = c.recv_v4().await;
    assert!(ok(&p), "expected {what}, got {p:?}");
}

/// Issue 10: 10,000 publishes to distinct topics from one client filled
/// `store.max_streams`, and from then on every client's first reading on a new stream was
/// refused, forever. Now each client id has a budget of new streams
/// (`listener.new_streams_burst`, refilled per minute), refusals are counted per client,
/// and a well-behaved sensor still gets its new stream.
#[tokio::test]
async fn one_flooding_client_cannot_take_every_stream() {
    let agent = Agent::start_with(|cfg| {
        cfg.store.max_streams = 12;
        cfg.listener.new_streams_burst = 5;
        cfg.listener.new_streams_per_minute = 0;
    })
    .await;
    let (mut flood, _) = connect_v5_session(agent.mqtt, "flooder", true, None).await;
    let mut burst = bytes::BytesMut::new();
    for i in 0..20u16 {
        publish_v5(&format!("flood/{i}"), QoS5::AtLeastOnce, i + 1, r#"{"v": 1}"#).write(&mut burst, None).unwrap();
    }
    flood.send(&burst).await;
    for i in 0..20u16 {
        let reason = if i < 5 { v5::PubAckReason::Success } else { v5::PubAckReason::QuotaExceeded };
        crate::util::mqtt::expect_puback_v5(&mut flood, i + 1, reason).await;
    }
    assert_eq!(agent.metric(r#"brume_agent_stream_quota_refused_total{client="flooder"}"#).await, 15);
    assert_eq!(agent.refused("stream_quota").await, 15);

    // Another sensor creates its stream; the flooder keeps using the streams it has.
    let (mut good, _) = connect_v4(agent.mqtt, "well-behaved", true).await;
    good.send_v4(publish_v4("good/t", QoS4::AtLeastOnce, 1, r#"{"v": 2}"#)).await;
    expect_puback_v4(&mut good, 1).await;
    flood.send_v5(publish_v5("flood/0", QoS5::AtLeastOnce, 21, r#"{"v": 3}"#)).await;
    crate::util::mqtt::expect_puback_v5(&mut flood, 21, v5::PubAckReason::Success).await;
    agent.wait_readings(7).await;
}

/// Streams whose readings retention removed (and that have no loss to report) are
/// deleted, so `store.max_streams` counts streams in use and the budget recovers.
#[tokio::test]
async fn streams_emptied_by_retention_free_their_place() {
    use edge_agent::config::{StreamRule, StreamRuleBody};
    let rules = |cfg: &mut edge_agent::config::Config| {
        cfg.store.max_streams = 3;
        cfg.store.streams.push(StreamRule {
            pattern: "old/#".into(),
            rule: StreamRuleBody {
                max_age: std::time::Duration::from_secs(3600),
                forward: false,
                ..StreamRuleBody::default()
            },
        });
    };
    let agent = Agent::start_with(rules).await;
    let (mut c, _) = connect_v4(agent.mqtt, "backfill", true).await;
    // Two hours old: past the rule's max_age, deleted by the next retention run (the
    // default interval, 60 s, does not come during this part).
    let old_ms = edge_agent::now_ns() / 1_000_000 - 2 * 3600 * 1000;
    for i in 1..=3u16 {
        c.send_v4(publish_v4(&format!("old/{i}"), QoS4::AtLeastOnce, i, format!(r#"{{"v": 1, "ts": {old_ms}}}"#)))
            .await;
        expect_puback_v4(&mut c, i).await;
    }
    c.send_v4(publish_v4("new/t", QoS4::AtLeastOnce, 4, r#"{"v": 1}"#)).await;
    c.assert_closed_silently().await; // 3.1.1: refused (too many streams) means no PUBACK
    assert_eq!(agent.refused("too_many_streams").await, 1);
    let dir = agent.stop().await;

    // Retention runs every 100 ms now: the three streams empty out and go.
    let agent = Agent::start_in(dir, |cfg| {
        rules(cfg);
        cfg.store.retention_interval = std::time::Duration::from_millis(100);
    })
    .await;
    crate::util::eventually("the emptied streams are deleted", || async {
        let n = agent.status().await["store"]["streams"].clone();
        if n == 0 { Ok(()) } else { Err(format!("{n} streams")) }
    })
    .await;
    let (mut c, _) = connect_v4(agent.mqtt, "fresh", true).await;
    c.send_v4(publish_v4("new/t", QoS4::AtLeastOnce, 1, r#"{"v": 1}"#)).await;
    expect_puback_v4(&mut c, 1).await;
    let text = agent.metrics_text().await;
    assert!(!text.contains(r#"readings_dropped_total{stream="old/"#), "local history is not a loss: {text}");
}
