//! End to end: exactly once from a sensor with a persistent MQTT session across `kill -9`
//! of the agent (issue 10: one duplicate per `kill -9` at 1,000 readings/s was measured).
//!
//! The sensor speaks MQTT 3.1.1 over a raw socket (rumqttc's codec), as the spec says a
//! client must: `CleanSession = 0`, and after a reconnect it re-sends every PUBLISH whose
//! PUBACK it has not read, with `DUP = 1` and the same packet identifier. Before each
//! `kill -9` it stops reading PUBACKs, sends more, and waits until the agent has committed
//! all of them: so every re-send after the restart is a PUBLISH the agent committed and
//! whose PUBACK the sensor never saw, exactly the case that used to be stored twice.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use brume_e2e::{Agent, Hub, Mosquitto, check_exactly_once, wait_until};
use bytes::BytesMut;
use rumqttc::mqttbytes::{QoS, v4};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const AGENT: &str = env!("CARGO_BIN_EXE_e2e-edge-agent");
const HUB: &str = env!("CARGO_BIN_EXE_e2e-cloud-hub");
const STREAMS: u64 = 4;
/// Publishes committed but never acknowledged to the sensor before each kill.
const UNREAD: u64 = 50;

/// What the sensor has sent and what it knows to be acknowledged.
#[derive(Default)]
struct SensorState {
    /// Packet id → reading number, for publishes whose PUBACK was not read.
    unacked: BTreeMap<u16, u64>,
    /// Reading numbers whose PUBACK was read.
    acked: HashSet<u64>,
}

fn publish(n: u64, pkid: u16, dup: bool) -> Vec<u8> {
    let mut p = v4::Publish::new(format!("s/{}", n % STREAMS), QoS::AtLeastOnce, format!("{{\"n\":{n}}}"));
    p.pkid = pkid;
    p.dup = dup;
    let mut out = BytesMut::new();
    v4::Packet::Publish(p).write(&mut out, usize::MAX).unwrap();
    out.to_vec()
}

/// Connects with `CleanSession = 0`; returns the stream and `session_present`.
async fn connect(port: u16) -> (TcpStream, bool) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut c = v4::Connect::new("durable-sensor");
    c.clean_session = false;
    c.keep_alive = 30;
    let mut out = BytesMut::new();
    v4::Packet::Connect(c).write(&mut out, usize::MAX).unwrap();
    s.write_all(&out).await.unwrap();
    let mut buf = BytesMut::new();
    loop {
        match v4::Packet::read(&mut buf, 1 << 20) {
            Ok(v4::Packet::ConnAck(a)) => {
                assert_eq!(a.code, v4::ConnectReturnCode::Success);
                assert!(buf.is_empty());
                return (s, a.session_present);
            }
            Ok(other) => panic!("expected CONNACK, got {other:?}"),
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {
                assert!(s.read_buf(&mut buf).await.unwrap() > 0, "agent closed before CONNACK");
            }
            Err(e) => panic!("bad CONNACK: {e}"),
        }
    }
}

/// Reads PUBACKs into `state` until the connection ends or `stop` is set.
async fn read_acks(
    mut rd: tokio::net::tcp::OwnedReadHalf,
    state: Arc<Mutex<SensorState>>,
    stop: Arc<tokio::sync::Notify>,
) {
    let mut buf = BytesMut::new();
    loop {
        loop {
            match v4::Packet::read(&mut buf, 1 << 20) {
                Ok(v4::Packet::PubAck(a)) => {
                    let mut st = state.lock().unwrap();
                    let n = st.unacked.remove(&a.pkid).expect("PUBACK for a packet id in flight");
                    st.acked.insert(n);
                }
                Ok(other) => panic!("unexpected {other:?}"),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => break,
                Err(e) => panic!("bad packet from the agent: {e}"),
            }
        }
        tokio::select! {
            _ = stop.notified() => return,
            r = rd.read_buf(&mut buf) => if !matches!(r, Ok(n) if n > 0) { return },
        }
    }
}

/// A free packet id (1..=100, the listener's receive maximum), waiting for PUBACKs if none.
async fn free_pkid(state: &Mutex<SensorState>) -> u16 {
    loop {
        if let Some(p) = (1..=100u16).find(|p| !state.lock().unwrap().unacked.contains_key(p)) {
            return p;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

async fn readings_in_store(agent: &Agent) -> u64 {
    agent.status().await.ok().and_then(|s| s["store"]["readings"].as_u64()).unwrap_or(0)
}

async fn deduplicated(agent: &Agent) -> u64 {
    let text = reqwest::get(format!("{}/metrics", agent.url)).await.unwrap().text().await.unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("brume_agent_sensor_resends_deduplicated_total "))
        .map_or(0, |v| v.trim().parse::<f64>().unwrap() as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_session_resends_after_kill_9_are_stored_once() {
    let broker = Mosquitto::start().unwrap();
    let hub = Hub::start(Path::new(HUB), broker.port).await.unwrap();
    let mut agent = Agent::start(Path::new(AGENT), "edge-durable", broker.port, &[]).await.unwrap();
    let state = Arc::new(Mutex::new(SensorState::default()));
    let mut next = 0u64;
    for round in 0..4 {
        let (socket, present) = connect(agent.mqtt_port).await;
        assert_eq!(present, round > 0, "round {round}: the session survives kill -9");
        let (rd, mut wr) = socket.into_split();
        let stop = Arc::new(tokio::sync::Notify::new());
        let reader = tokio::spawn(read_acks(rd, state.clone(), stop.clone()));
        // Re-send what was never acknowledged, as MQTT-4.4.0-1 requires: DUP, same ids.
        let resend: Vec<(u16, u64)> = state.lock().unwrap().unacked.iter().map(|(&p, &n)| (p, n)).collect();
        for &(pkid, n) in &resend {
            wr.write_all(&publish(n, pkid, true)).await.unwrap();
        }
        wait_until("the re-sends to be acknowledged", Duration::from_secs(20), || async {
            state.lock().unwrap().unacked.is_empty()
        })
        .await
        .unwrap();
        if round > 0 {
            // Every re-send was committed before the kill: all are duplicates.
            assert_eq!(deduplicated(&agent).await, UNREAD, "round {round}: re-sends recognised");
        }
        if round == 3 {
            stop.notify_one();
            let _ = reader.await;
            break;
        }
        // Fresh readings, acknowledged as they go.
        for _ in 0..500 {
            let pkid = free_pkid(&state).await;
            state.lock().unwrap().unacked.insert(pkid, next);
            wr.write_all(&publish(next, pkid, false)).await.unwrap();
            next += 1;
        }
        wait_until("fresh readings to be acknowledged", Duration::from_secs(20), || async {
            state.lock().unwrap().unacked.is_empty()
        })
        .await
        .unwrap();
        // Stop reading PUBACKs, send more, wait until the agent committed them, kill it.
        stop.notify_one();
        let _ = reader.await;
        for _ in 0..UNREAD {
            let pkid = free_pkid(&state).await;
            state.lock().unwrap().unacked.insert(pkid, next);
            wr.write_all(&publish(next, pkid, false)).await.unwrap();
            next += 1;
        }
        wait_until("the unread publishes to be committed", Duration::from_secs(20), || async {
            readings_in_store(&agent).await == next
        })
        .await
        .unwrap();
        agent.proc.kill9();
        agent.restart().await.unwrap();
    }
    let acked = state.lock().unwrap().acked.clone();
    assert_eq!(acked.len() as u64, next, "every reading acknowledged in the end");
    assert_eq!(readings_in_store(&agent).await, next, "stored once in the agent");
    agent.wait_drained(Duration::from_secs(60)).await;
    let stored = check_exactly_once(&hub, &acked, next, STREAMS).await.unwrap();
    assert_eq!(stored, next, "stored once at the hub");
}
