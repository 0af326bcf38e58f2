//! Integration tests of the edge agent, run in-process.
//!
//! Each test starts `edge_agent::run` on loopback listeners bound to port 0 with a
//! private data directory and forwarding off, talks to the built-in MQTT listener with
//! raw packets (so it can also send malformed ones) and to the local HTTP server, and
//! observes what was stored and counted through `/api/v1/status` and `/metrics`.
//! Every test that feeds the agent bad input ends by proving the agent still ingests a
//! good reading on a new connection. Helpers live in `tests/util/`.

mod listener;
mod modules;
mod util;

use bytesize::ByteSize;
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;
use serde_json::Value;

use util::agent::Agent;
use util::mqtt::{
    QoS4, QoS5, RawConn, connect_ok_v4, connect_ok_v5, connect_v4, connect_v5, expect_puback_v4, expect_puback_v5,
    publish_v4, publish_v5, raw_connect,
};

/// Bytes that are not UTF-8 (a lone continuation byte and an invalid lead byte).
const NOT_UTF8: &[u8] = b"{\"t\": \x80\xff}";

/// Proves the MQTT 3.1.1 happy path: a QoS 1 JSON publish is acknowledged with its own
/// packet id and stored; a QoS 0 publish is stored without an answer; PINGREQ gets
/// PINGRESP; SUBSCRIBE is refused per filter with SUBACK return code 0x80 and the
/// connection stays usable.
#[tokio::test]
async fn mqtt_v4_publish_ping_and_subscribe() {
    let agent = Agent::start().await;
    let mut c = connect_ok_v4(agent.mqtt, "sensor-1").await;

    c.send_v4(publish_v4("sensors/t1", QoS4::AtLeastOnce, 7, r#"{"temp": 21.5, "hum": 40}"#)).await;
    expect_puback_v4(&mut c, 7).await;
    assert_eq!(agent.committed().await, 1, "committed before the PUBACK");
    agent.wait_readings(1).await;

    // QoS 0 has no acknowledgement; the store is the only witness.
    c.send_v4(publish_v4("sensors/t1", QoS4::AtMostOnce, 0, r#"{"temp": 21.6}"#)).await;
    agent.wait_readings(2).await;

    c.send_v4(v4::Packet::PingReq).await;
    assert_eq!(c.recv_v4().await, v4::Packet::PingResp);

    c.send_v4(v4::Packet::Subscribe(v4::Subscribe::new("sensors/#", QoS4::AtLeastOnce))).await;
    let (suback, raw) = c.recv_v4_raw().await;
    let v4::Packet::SubAck(suback) = suback else { panic!("expected SUBACK, got {suback:?}") };
    assert_eq!(suback.return_codes, vec![v4::SubscribeReasonCode::Failure]);
    // SUBACK, remaining length 3, packet id of the SUBSCRIBE, failure 0x80.
    let pkid = suback.pkid.to_be_bytes();
    assert_eq!(&raw[..], &[0x90, 0x03, pkid[0], pkid[1], 0x80]);

    // The refused SUBSCRIBE did not cost the connection.
    c.send_v4(publish_v4("sensors/t2", QoS4::AtLeastOnce, 8, r#"{"temp": 19}"#)).await;
    expect_puback_v4(&mut c, 8).await;
    agent.wait_readings(3).await;

    agent.assert_still_works("probe", 4).await;
}

/// Proves MQTT 5 negative acknowledgements: CONNACK advertises `listener.max_inflight`
/// as receive maximum; a QoS 1 publish with an invalid UTF-8 payload or bad JSON gets
/// PUBACK 0x99 (payload format invalid) and stores nothing; a good one gets PUBACK
/// success and is stored.
#[tokio::test]
async fn mqtt_v5_bad_payloads_get_payload_format_invalid() {
    let agent = Agent::start_with(|cfg| cfg.listener.max_inflight = 7).await;
    let (mut c, connack) = connect_v5(agent.mqtt, "sensor-5").await;
    assert_eq!(connack.code, v5::ConnectReturnCode::Success);
    let props = connack.properties.expect("CONNACK properties");
    assert_eq!(props.receive_max, Some(7), "receive maximum = listener.max_inflight");
    assert_eq!(props.max_qos, None, "absent: QoS 2 is supported");

    c.send_v5(publish_v5("sensors/t", QoS5::AtLeastOnce, 1, NOT_UTF8)).await;
    expect_puback_v5(&mut c, 1, v5::PubAckReason::PayloadFormatInvalid).await;
    c.send_v5(publish_v5("sensors/t", QoS5::AtLeastOnce, 2, r#"{"temp": "#)).await;
    expect_puback_v5(&mut c, 2, v5::PubAckReason::PayloadFormatInvalid).await;
    c.send_v5(publish_v5("sensors/t", QoS5::AtLeastOnce, 4, r#"{"a\u0000": 1}"#)).await;
    expect_puback_v5(&mut c, 4, v5::PubAckReason::PayloadFormatInvalid).await;
    c.send_v5(publish_v5("sensors/t", QoS5::AtLeastOnce, 3, r#"{"temp": 20}"#)).await;
    expect_puback_v5(&mut c, 3, v5::PubAckReason::Success).await;

    // Only the good reading reached the store.
    assert_eq!(agent.committed().await, 1);
    agent.wait_readings(1).await;
    assert_eq!(agent.bad_input("not_utf8").await, 1);
    assert_eq!(agent.bad_input("bad_json").await, 1);
    assert_eq!(agent.bad_input("bad_field").await, 1, "a control character in a field name");

    agent.assert_still_works("probe", 2).await;
}

/// Proves MQTT 3.1.1 bad payloads (invalid UTF-8, bad JSON, bad line protocol) are
/// acknowledged with a plain PUBACK (3.1.1 has no negative one, and re-sending garbage
/// cannot help), store nothing, and are counted under their own reason.
#[tokio::test]
async fn mqtt_v4_bad_payloads_are_acked_counted_and_dropped() {
    let agent = Agent::start().await;
    let mut c = connect_ok_v4(agent.mqtt, "sensor-bad").await;

    let cases: [(&[u8], &str); 3] =
        [(NOT_UTF8, "not_utf8"), (br#"{"temp": 1,"#, "bad_json"), (b"cpu,host=a usage=", "bad_line_protocol")];
    for (i, (payload, reason)) in cases.iter().enumerate() {
        let pkid = 10 + i as u16;
        c.send_v4(publish_v4("sensors/t", QoS4::AtLeastOnce, pkid, *payload)).await;
        expect_puback_v4(&mut c, pkid).await;
        assert_eq!(agent.bad_input(reason).await, 1, "bad_input{{reason={reason:?}}}");
    }
    assert_eq!(agent.committed().await, 0, "no bad payload was committed");

    // A good publish on the same connection; PUBACKs are in order, so once it is
    // acknowledged the bad ones were long decided.
    c.send_v4(publish_v4("sensors/t", QoS4::AtLeastOnce, 20, r#"{"temp": 1}"#)).await;
    expect_puback_v4(&mut c, 20).await;
    assert_eq!(agent.committed().await, 1);
    agent.wait_readings(1).await;

    agent.assert_still_works("probe", 2).await;
}

/// Proves malformed packets close the connection (MQTT 5: after DISCONNECT 0x81
/// malformed packet), are counted as `malformed_packet`, and leave the agent serving:
/// a PUBLISH with a remaining length of five bytes, an unknown packet type after
/// CONNECT, and an MQTT 5 PUBLISH whose topic length runs past the packet.
#[tokio::test]
async fn malformed_packets_close_the_connection() {
    let agent = Agent::start().await;

    // Remaining length: four continuation bytes, which MQTT forbids.
    let mut c = connect_ok_v4(agent.mqtt, "mal-1").await;
    c.send(&[0x32, 0xff, 0xff, 0xff, 0xff, 0x01]).await;
    c.assert_closed_silently().await;
    assert_eq!(agent.bad_input("malformed_packet").await, 1);

    // Packet type 0 is reserved.
    let mut c = connect_ok_v4(agent.mqtt, "mal-2").await;
    c.send(&[0x00, 0x00]).await;
    c.assert_closed_silently().await;
    assert_eq!(agent.bad_input("malformed_packet").await, 2);

    // MQTT 5 PUBLISH QoS 1, remaining length 4, topic length 16 with 2 bytes left.
    let mut c = connect_ok_v5(agent.mqtt, "mal-3").await;
    c.send(&[0x32, 0x04, 0x00, 0x10, b'a', b'b']).await;
    c.assert_disconnected_v5(v5::DisconnectReasonCode::MalformedPacket).await;
    assert_eq!(agent.bad_input("malformed_packet").await, 3);

    assert_eq!(agent.committed().await, 0);
    agent.assert_still_works("probe", 1).await;
}

/// Proves a packet over `listener.max_packet_bytes` closes the connection and is
/// counted as `packet_too_large`: silently on MQTT 3.1.1, after DISCONNECT 0x95 (packet
/// too large) on MQTT 5, whose CONNACK advertised the limit.
#[tokio::test]
async fn oversize_packets_close_the_connection() {
    let agent = Agent::start_with(|cfg| cfg.listener.max_packet_bytes = ByteSize::kib(1)).await;
    let big = format!(r#"{{"blob": "{}"}}"#, "x".repeat(4096));

    let mut c = connect_ok_v4(agent.mqtt, "big-4").await;
    c.send_v4(publish_v4("sensors/big", QoS4::AtLeastOnce, 1, big.clone())).await;
    c.assert_closed_silently().await;
    assert_eq!(agent.bad_input("packet_too_large").await, 1);

    let (mut c, connack) = connect_v5(agent.mqtt, "big-5").await;
    assert_eq!(connack.code, v5::ConnectReturnCode::Success);
    assert_eq!(connack.properties.expect("CONNACK properties").max_packet_size, Some(1024));
    c.send_v5(publish_v5("sensors/big", QoS5::AtLeastOnce, 1, big)).await;
    c.assert_disconnected_v5(v5::DisconnectReasonCode::PacketTooLarge).await;
    assert_eq!(agent.bad_input("packet_too_large").await, 2);

    assert_eq!(agent.committed().await, 0);
    agent.assert_still_works("probe", 1).await;
}

/// Proves a CONNECT with a protocol the listener does not speak (MQTT 3.1 "MQIsdp"
/// level 3, or "MQTT" level 6) gets CONNACK return code 1 (unacceptable protocol
/// version) and is then closed, counted as `unsupported_protocol_version`.
#[tokio::test]
async fn unknown_protocol_versions_are_refused() {
    let agent = Agent::start().await;
    for (i, (name, level)) in [("MQIsdp", 3u8), ("MQTT", 6)].into_iter().enumerate() {
        let mut c = RawConn::open(agent.mqtt).await;
        c.send(&raw_connect(name, level, "old-sensor")).await;
        let (connack, raw) = c.recv_v4_raw().await;
        assert_eq!(
            connack,
            v4::Packet::ConnAck(v4::ConnAck::new(v4::ConnectReturnCode::RefusedProtocolVersion, false))
        );
        assert_eq!(&raw[..], &[0x20, 0x02, 0x00, 0x01], "{name} level {level}");
        c.assert_closed_silently().await;
        assert_eq!(agent.bad_input("unsupported_protocol_version").await, i as u64 + 1);
    }
    agent.assert_still_works("probe", 1).await;
}

/// Proves `store.max_streams` stops a flood of new topics: with MQTT 5 the first five
/// streams are accepted and the next five get PUBACK 0x97 (quota exceeded), in packet
/// order; with MQTT 3.1.1 a refused publish gets no PUBACK and the connection is closed
/// so the sensor keeps the reading. Refusals are counted as `too_many_streams`, and
/// existing streams keep working.
#[tokio::test]
async fn too_many_streams_are_refused() {
    let agent = Agent::start_with(|cfg| cfg.store.max_streams = 5).await;

    // Pipelined: all ten PUBLISHes go out before any PUBACK is read.
    let mut c = connect_ok_v5(agent.mqtt, "flood-5").await;
    let mut burst = bytes::BytesMut::new();
    for i in 0..10u16 {
        publish_v5(&format!("flood/{i}"), QoS5::AtLeastOnce, i + 1, r#"{"v": 1}"#).write(&mut burst, None).unwrap();
    }
    c.send(&burst).await;
    for i in 0..10u16 {
        let reason = if i < 5 { v5::PubAckReason::Success } else { v5::PubAckReason::QuotaExceeded };
        expect_puback_v5(&mut c, i + 1, reason).await;
    }
    assert_eq!(agent.committed().await, 5);
    assert_eq!(agent.refused("too_many_streams").await, 5);
    agent.wait_readings(5).await;

    let mut c = connect_ok_v4(agent.mqtt, "flood-4").await;
    c.send_v4(publish_v4("flood/new", QoS4::AtLeastOnce, 1, r#"{"v": 1}"#)).await;
    c.assert_closed_silently().await;
    assert_eq!(agent.refused("too_many_streams").await, 6);
    assert_eq!(agent.committed().await, 5);

    agent.assert_still_works("flood/0", 6).await;
}

/// `POST` to the agent's ingest endpoint; returns the status and the body as text.
async fn post(agent: &Agent, path: &str, content_type: Option<&str>, body: impl Into<reqwest::Body>) -> (u16, String) {
    let mut req = agent.http_client().post(agent.url(path)).body(body);
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    let resp = req.send().await.expect("POST");
    let status = resp.status().as_u16();
    (status, resp.text().await.expect("response body"))
}

/// The `"error"` string of a JSON error response.
fn error_of(body: &str) -> String {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("error body is not JSON ({e}): {body:?}"));
    v["error"].as_str().unwrap_or_else(|| panic!("no \"error\" string in {body}")).to_owned()
}

/// Proves HTTP ingest: a JSON array with `?stream=` is stored (204); bad JSON is 400
/// with an error naming the problem; line protocol is stored (204); an empty body is
/// 400; a body over `payload.max_payload_bytes` is 413. Each rejection is counted.
#[tokio::test]
async fn http_ingest() {
    let agent = Agent::start_with(|cfg| cfg.payload.max_payload_bytes = 1024).await;
    let json = Some("application/json");

    let (code, body) =
        post(&agent, "/api/v1/write?stream=x", json, r#"[{"v": 1}, {"v": 2}, {"v": 3, "ts": 1700000000000}]"#).await;
    assert_eq!((code, body.as_str()), (204, ""));
    agent.wait_readings(3).await;
    assert_eq!(agent.status().await["store"]["streams"], 1, "all three on stream x");

    let (code, body) = post(&agent, "/api/v1/write?stream=x", json, r#"[{"v": 1}, {"v": "#).await;
    assert_eq!(code, 400, "{body}");
    let err = error_of(&body);
    assert!(err.contains("invalid JSON"), "error names the problem: {err:?}");
    assert_eq!(agent.bad_input("bad_json").await, 1);

    let (code, body) = post(&agent, "/api/v1/write", Some("text/plain"), "cpu,host=a usage=0.5\nmem free=12i\n").await;
    assert_eq!((code, body.as_str()), (204, ""));
    agent.wait_readings(5).await;

    // Issue 10: this reading stopped a PostgreSQL hub, and every agent with it.
    let (code, body) = post(&agent, "/api/v1/write?stream=bad", json, r#"{"a\u0000":1}"#).await;
    assert_eq!(code, 400, "{body}");
    let err = error_of(&body);
    assert!(err.contains("field name") && err.contains("U+0000"), "names the field and the character: {err:?}");
    assert_eq!(agent.bad_input("bad_field").await, 1);

    let (code, body) = post(&agent, "/api/v1/write?stream=x", json, "").await;
    assert_eq!(code, 400, "{body}");
    assert!(error_of(&body).contains("empty"), "{body}");
    assert_eq!(agent.bad_input("empty").await, 1);

    let big = "cpu usage=0.5\n".repeat(256); // 3.5 KiB of valid line protocol
    assert!(big.len() > 1024);
    let (code, body) = post(&agent, "/api/v1/write", Some("text/plain"), big).await;
    assert_eq!(code, 413, "{body}");
    assert!(error_of(&body).contains("exceeds the limit of 1024 bytes"), "{body}");
    assert_eq!(agent.bad_input("too_large").await, 1);

    assert_eq!(agent.committed().await, 5);
    agent.wait_readings(5).await;
    agent.assert_still_works("probe", 6).await;
}

/// Proves the acknowledgement promise across a graceful shutdown: every reading whose
/// PUBACK was received is in the store when a new agent opens the same data directory,
/// and `run` returns `Ok` even with a sensor still connected.
#[tokio::test]
async fn graceful_shutdown_keeps_every_acknowledged_reading() {
    const N: u16 = 25;
    let agent = Agent::start().await;
    let mut c = connect_ok_v4(agent.mqtt, "before-restart").await;
    let mut burst = bytes::BytesMut::new();
    for i in 1..=N {
        let topic = if i % 2 == 0 { "restart/a" } else { "restart/b" };
        publish_v4(topic, QoS4::AtLeastOnce, i, format!(r#"{{"i": {i}}}"#)).write(&mut burst, usize::MAX).unwrap();
    }
    c.send(&burst).await;
    for i in 1..=N {
        expect_puback_v4(&mut c, i).await;
    }

    // `c` stays open: shutdown must not wait for the sensor to leave.
    let dir = agent.stop().await;
    c.assert_closed_silently().await;

    let agent = Agent::start_in(dir, |_| {}).await;
    assert_eq!(agent.readings().await, u64::from(N), "readings after reopening the store");
    agent.assert_still_works("probe", u64::from(N) + 1).await;
}

/// Proves MQTT 3.1.1 session handling for publishers: a reconnect with
/// `clean_session = false` and the same client id gets `session_present = true`; a
/// clean session gets `false` and discards the session; a second connection with the
/// same client id takes over (the first is closed).
#[tokio::test]
async fn persistent_session_is_reported_present() {
    let agent = Agent::start().await;

    let (mut first, ack) = connect_v4(agent.mqtt, "persistent-1", false).await;
    assert_eq!((ack.code, ack.session_present), (v4::ConnectReturnCode::Success, false), "new session");

    // Second connection while the first is open: takeover, and the session is present.
    let (mut second, ack) = connect_v4(agent.mqtt, "persistent-1", false).await;
    assert_eq!((ack.code, ack.session_present), (v4::ConnectReturnCode::Success, true), "resumed session");
    first.assert_closed_silently().await;
    second.send_v4(v4::Packet::Disconnect).await;
    second.assert_closed_silently().await;

    let (_clean, ack) = connect_v4(agent.mqtt, "persistent-1", true).await;
    assert_eq!((ack.code, ack.session_present), (v4::ConnectReturnCode::Success, false), "clean session");

    // The clean session discarded the persistent one.
    let (_again, ack) = connect_v4(agent.mqtt, "persistent-1", false).await;
    assert_eq!((ack.code, ack.session_present), (v4::ConnectReturnCode::Success, false), "after a clean session");

    agent.assert_still_works("probe", 1).await;
}

/// Proves an MQTT 5 client's normal DISCONNECT (`E0 00`, remaining length 0, as
/// rumqttc's own client sends it) ends the connection cleanly: the agent closes without
/// answering and counts nothing as bad input.
#[tokio::test]
async fn mqtt_v5_normal_disconnect_is_not_malformed() {
    let agent = Agent::start().await;
    let mut c = connect_ok_v5(agent.mqtt, "polite-5").await;
    c.send_v5(publish_v5("sensors/t", QoS5::AtLeastOnce, 1, r#"{"temp": 20}"#)).await;
    expect_puback_v5(&mut c, 1, v5::PubAckReason::Success).await;
    c.send_v5(v5::Packet::Disconnect(v5::Disconnect::new(v5::DisconnectReasonCode::NormalDisconnection))).await;
    c.assert_closed_silently().await;
    assert_eq!(agent.bad_input("malformed_packet").await, 0);
    agent.assert_still_works("probe", 2).await;
}
