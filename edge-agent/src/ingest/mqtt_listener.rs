//! The built-in MQTT listener sensors publish to (MQTT 3.1.1 and 5, QoS 0 and 1).
//!
//! It is not a broker: it accepts PUBLISH, answers PING, refuses SUBSCRIBE, and turns
//! each PUBLISH into readings on the stream named by its topic. Packets are decoded and
//! encoded with rumqttc's maintained codecs (`mqttbytes::v4` and `v5::mqttbytes::v5`).
//!
//! # The acknowledgement promise
//!
//! Each connection has a reader half and a writer half joined by a bounded, ordered
//! queue. The reader parses a PUBLISH, submits its readings to the store (without waiting
//! for the commit) and queues the pending verdict; the writer half awaits the verdicts in
//! order and only then writes the PUBACK. So up to `listener.max_inflight` publishes of a
//! connection share one group commit, and no PUBACK leaves before its reading is durable.
//!
//! # Bad input
//!
//! * Malformed packet, oversize packet, QoS 2, or a protocol violation: the connection is
//!   closed (MQTT 5: after a DISCONNECT with the reason code), counted and logged.
//! * Unknown protocol version: CONNACK "unacceptable protocol version", then close.
//! * Bad payload (invalid UTF-8, bad JSON, bad line protocol, bad stream name): counted
//!   and logged; MQTT 5 gets PUBACK "payload format invalid" (0x99); MQTT 3.1.1 has no
//!   negative PUBACK, so the publish is acknowledged (re-sending garbage cannot help) and
//!   nothing is stored.
//! * The store refuses (stream full, disk full): MQTT 5 gets PUBACK "quota exceeded"
//!   (0x97) or "implementation specific error" (0x83); MQTT 3.1.1 gets no PUBACK and the
//!   connection is closed, so the sensor keeps the reading and publishes it again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::payload::{self, PayloadConfig};
use crate::config::ListenerConfig;
use crate::metrics::Metrics;
use crate::store::writer::{AppendError, StoreHandle};

/// Shared state of the listener.
struct Shared {
    cfg: ListenerConfig,
    payload: PayloadConfig,
    store: StoreHandle,
    metrics: Arc<Metrics>,
    /// Sessions by client id, for takeover and `session_present`.
    sessions: Mutex<Sessions>,
}

/// Client sessions as a publisher sees them.
#[derive(Default)]
struct Sessions {
    /// Open connection per client id: (connection number, its token). A new connection with
    /// the same id cancels the old one (MQTT session takeover).
    active: HashMap<String, (u64, CancellationToken)>,
    /// Client ids that connected with a persistent session (clean_session = false), so a
    /// reconnect gets `session_present = true` as the publisher expects.
    persistent: std::collections::HashSet<String>,
    next_conn: u64,
}

/// Accepts sensor connections until `shutdown`; waits for open connections to finish
/// their pending commits and PUBACKs before returning.
pub async fn serve(
    listener: TcpListener,
    cfg: ListenerConfig,
    payload: PayloadConfig,
    store: StoreHandle,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let shared = Arc::new(Shared { cfg, payload, store, metrics, sessions: Mutex::new(Sessions::default()) });
    let limit = Arc::new(Semaphore::new(shared.cfg.max_connections));
    let tracker = TaskTracker::new();
    loop {
        let (socket, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            tracing::warn!(%peer, max = shared.cfg.max_connections, "too many sensor connections; refusing");
            shared.metrics.bad("too_many_connections");
            continue;
        };
        let _ = socket.set_nodelay(true);
        let shared = shared.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            shared.metrics.listener_connections.inc();
            if let Err(e) = handle(socket, &shared, shutdown).await {
                tracing::debug!(%peer, error = %e, "sensor connection closed");
            }
            shared.metrics.listener_connections.dec();
            drop(permit);
        });
    }
    tracker.close();
    tracker.wait().await;
}

/// MQTT protocol version of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Version {
    V4,
    V5,
}

/// A decoded inbound packet, version-independent.
enum Inbound {
    Publish { topic: String, qos: u8, pkid: u16, payload: bytes::Bytes },
    PingReq,
    Disconnect,
    Subscribe { pkid: u16, filters: usize },
    Unsubscribe { pkid: u16, filters: usize },
    /// A packet a publisher may send that needs no answer (PUBACK from us? never), ignored.
    Ignored,
}

/// What to write back, in order.
enum Outbound {
    /// Bytes ready now.
    Now(BytesMut),
    /// A PUBACK (QoS 1) or nothing (QoS 0) once the store has decided.
    AfterCommit { pkid: Option<u16>, verdict: oneshot::Receiver<Result<(), AppendError>> },
    /// PUBACK with a payload error (MQTT 5 gets a reason code; MQTT 3.1.1 a plain PUBACK).
    BadPayload { pkid: u16 },
}

#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("keepalive timeout")]
    KeepAlive,
    #[error("store refused a reading; closing so the sensor re-sends it")]
    Refused,
}

async fn handle(mut socket: TcpStream, shared: &Shared, shutdown: CancellationToken) -> Result<(), ConnError> {
    let max = shared.cfg.max_packet_bytes.as_u64() as usize;
    let mut buf = BytesMut::with_capacity(4096);

    // CONNECT, within a bounded time.
    let (version, client_id, clean, keep_alive) = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(c) = read_connect(&mut buf, max, &mut socket, shared).await? {
                return Ok::<_, ConnError>(c);
            }
            if socket.read_buf(&mut buf).await? == 0 {
                return Err(ConnError::Protocol("closed before CONNECT".into()));
            }
        }
    })
    .await
    .map_err(|_| ConnError::Protocol("no CONNECT within 10 s".into()))??;

    // Session takeover: a second connection with the same client id closes the first.
    let conn_token = shutdown.child_token();
    let (conn_no, session_present) = {
        let mut s = shared.sessions.lock().unwrap_or_else(|e| e.into_inner());
        s.next_conn += 1;
        let conn_no = s.next_conn;
        if let Some((_, old)) = s.active.insert(client_id.clone(), (conn_no, conn_token.clone())) {
            old.cancel();
        }
        let present = if clean {
            s.persistent.remove(&client_id);
            false
        } else {
            !s.persistent.insert(client_id.clone())
        };
        (conn_no, present)
    };
    let mut out = BytesMut::new();
    match version {
        Version::V4 => v4::ConnAck::new(v4::ConnectReturnCode::Success, session_present).write(&mut out).map_err(|e| e.to_string()),
        Version::V5 => {
            let props = v5::ConnAckProperties {
                receive_max: Some(shared.cfg.max_inflight),
                max_qos: Some(1),
                retain_available: Some(0),
                max_packet_size: Some(max as u32),
                topic_alias_max: Some(0),
                wildcard_subscription_available: Some(0),
                subscription_identifiers_available: Some(0),
                shared_subscription_available: Some(0),
                session_expiry_interval: None,
                assigned_client_identifier: None,
                reason_string: None,
                user_properties: Vec::new(),
                server_keep_alive: None,
                response_information: None,
                server_reference: None,
                authentication_method: None,
                authentication_data: None,
            };
            v5::ConnAck { session_present, code: v5::ConnectReturnCode::Success, properties: Some(props) }
                .write(&mut out)
                .map_err(|e| e.to_string())
        }
    }
    .map_err(ConnError::Protocol)?;
    socket.write_all(&out).await?;
    tracing::debug!(client_id, ?version, "sensor connected");

    let keep_alive =
        if keep_alive == 0 { shared.cfg.default_keep_alive } else { Duration::from_secs(u64::from(keep_alive)) };
    let idle_limit = keep_alive.mul_f64(1.5);
    let (rd, mut wr) = socket.into_split();
    let (q_tx, mut q_rx) = mpsc::channel::<Outbound>(usize::from(shared.cfg.max_inflight));

    // Stops the reader: on shutdown or takeover (parent token), or when the writer fails.
    let reader_stop = conn_token.child_token();
    let stop_reader = reader_stop.clone();
    // Writer half: awaits verdicts in order, writes acknowledgements.
    let writer = async move {
        while let Some(item) = q_rx.recv().await {
            let mut out = BytesMut::new();
            match item {
                Outbound::Now(b) => out = b,
                Outbound::BadPayload { pkid } => puback(version, pkid, Some(v5::PubAckReason::PayloadFormatInvalid), &mut out),
                Outbound::AfterCommit { pkid, verdict } => {
                    let verdict = verdict.await.unwrap_or(Err(AppendError::Closed));
                    match (verdict, pkid) {
                        (Ok(()), Some(pkid)) => puback(version, pkid, None, &mut out),
                        (Ok(()), None) => {}
                        (Err(e), pkid) => {
                            tracing::warn!(error = %e, "reading refused by the store");
                            let reason = match e {
                                AppendError::Refused(_) => v5::PubAckReason::QuotaExceeded,
                                _ => v5::PubAckReason::ImplementationSpecificError,
                            };
                            match (version, pkid) {
                                (Version::V5, Some(pkid)) => puback(version, pkid, Some(reason), &mut out),
                                // QoS 0 has no acknowledgement to withhold: it is simply lost,
                                // as QoS 0 allows. Counted by the store as refused.
                                (_, None) => {}
                                // 3.1.1 has no negative PUBACK: never ack, close instead.
                                (Version::V4, Some(_)) => return Err(ConnError::Refused),
                            }
                        }
                    }
                }
            }
            if !out.is_empty() {
                wr.write_all(&out).await?;
            }
        }
        let _ = wr.shutdown().await;
        Ok::<(), ConnError>(())
    };
    let writer = async move {
        let res = writer.await;
        if res.is_err() {
            // Nothing read after this could be acknowledged: stop reading now, so the
            // sensor sees the close and re-sends.
            stop_reader.cancel();
        }
        res
    };

    let reader = read_loop(rd, buf, version, max, idle_limit, shared, q_tx, reader_stop);
    // The reader ends on DISCONNECT, EOF, error or shutdown; dropping its queue sender lets
    // the writer finish every pending PUBACK first.
    let (r, w) = tokio::join!(reader, writer);
    {
        let mut s = shared.sessions.lock().unwrap_or_else(|e| e.into_inner());
        if s.active.get(&client_id).is_some_and(|(n, _)| *n == conn_no) {
            s.active.remove(&client_id);
        }
    }
    r.and(w)
}

/// Tries to read a CONNECT from `buf`. `Ok(None)`: need more bytes.
async fn read_connect(
    buf: &mut BytesMut,
    max: usize,
    socket: &mut TcpStream,
    shared: &Shared,
) -> Result<Option<(Version, String, bool, u16)>, ConnError> {
    if buf.is_empty() {
        return Ok(None);
    }
    // Try 3.1.1 first on a copy. rumqttc's v4 decoder accepts protocol level 5 too (and
    // misreads the properties), so a 5.0 CONNECT is turned into "invalid protocol level 5",
    // which sends it to the v5 decoder below.
    let mut copy = buf.clone();
    match v4::Packet::read(&mut copy, max).and_then(|p| match p {
        v4::Packet::Connect(c) if c.protocol == rumqttc::mqttbytes::Protocol::V5 => {
            Err(rumqttc::mqttbytes::Error::InvalidProtocolLevel(5))
        }
        p => Ok(p),
    }) {
        Ok(v4::Packet::Connect(c)) => {
            *buf = copy;
            Ok(Some((Version::V4, c.client_id, c.clean_session, c.keep_alive)))
        }
        Ok(other) => {
            shared.metrics.bad("not_connect");
            Err(ConnError::Protocol(format!("expected CONNECT, got {other:?}")))
        }
        Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
        Err(rumqttc::mqttbytes::Error::InvalidProtocolLevel(5)) => {
            let mut copy = buf.clone();
            match v5::Packet::read(&mut copy, Some(max as u32)) {
                Ok(v5::Packet::Connect(c, _, _)) => {
                    *buf = copy;
                    Ok(Some((Version::V5, c.client_id, c.clean_start, c.keep_alive)))
                }
                Ok(_) => Err(ConnError::Protocol("expected CONNECT".into())),
                Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
                Err(e) => {
                    shared.metrics.bad("malformed_packet");
                    Err(ConnError::Protocol(format!("bad MQTT 5 CONNECT: {e}")))
                }
            }
        }
        Err(e @ (rumqttc::mqttbytes::Error::InvalidProtocolLevel(_) | rumqttc::mqttbytes::Error::InvalidProtocol)) => {
            shared.metrics.bad("unsupported_protocol_version");
            tracing::warn!(error = %e, "refusing sensor with an unsupported MQTT version (3.1.1 and 5 are supported)");
            let mut out = BytesMut::new();
            let _ = v4::ConnAck::new(v4::ConnectReturnCode::RefusedProtocolVersion, false).write(&mut out);
            let _ = socket.write_all(&out).await;
            Err(ConnError::Protocol(e.to_string()))
        }
        Err(e) => {
            shared.metrics.bad(if matches!(e, rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(_)) {
                "packet_too_large"
            } else {
                "malformed_packet"
            });
            Err(ConnError::Protocol(format!("bad CONNECT: {e}")))
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn read_loop(
    mut rd: tokio::net::tcp::OwnedReadHalf,
    mut buf: BytesMut,
    version: Version,
    max: usize,
    idle_limit: Duration,
    shared: &Shared,
    q: mpsc::Sender<Outbound>,
    token: CancellationToken,
) -> Result<(), ConnError> {
    loop {
        // Parse every complete packet already buffered.
        loop {
            let pkt = match decode(version, &mut buf, max) {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err((reason, msg, code)) => {
                    shared.metrics.bad(reason);
                    tracing::warn!(reason, error = %msg, "closing sensor connection on a bad packet");
                    if let (Version::V5, Some(code)) = (version, code) {
                        let mut out = BytesMut::new();
                        // DISCONNECT, remaining length 2, reason code, no properties. Not
                        // rumqttc's Disconnect::write: it announces remaining length 1, then
                        // writes 2 bytes.
                        out.extend_from_slice(&[0xE0, 0x02, code as u8, 0x00]);
                        let _ = q.send(Outbound::Now(out)).await;
                    }
                    return Err(ConnError::Protocol(msg));
                }
            };
            match pkt {
                Inbound::Publish { topic, qos, pkid, payload } => {
                    let item = publish(shared, &topic, qos, pkid, &payload).await;
                    if q.send(item).await.is_err() {
                        return Ok(()); // writer failed; its error is reported
                    }
                }
                Inbound::PingReq => {
                    let mut out = BytesMut::new();
                    match version {
                        Version::V4 => v4::PingResp.write(&mut out).map_err(|e| e.to_string()),
                        Version::V5 => v5::PingResp::write(&mut out).map_err(|e| e.to_string()),
                    }
                    .map_err(ConnError::Protocol)?;
                    let _ = q.send(Outbound::Now(out)).await;
                }
                Inbound::Subscribe { pkid, filters } => {
                    // This listener only ingests; say so per filter instead of hanging up.
                    let mut out = BytesMut::new();
                    match version {
                        Version::V4 => v4::SubAck::new(pkid, vec![v4::SubscribeReasonCode::Failure; filters])
                            .write(&mut out)
                            .map_err(|e| e.to_string()),
                        Version::V5 => v5::SubAck {
                            pkid,
                            return_codes: vec![v5::SubscribeReasonCode::NotAuthorized; filters],
                            properties: None,
                        }
                        .write(&mut out)
                        .map_err(|e| e.to_string()),
                    }
                    .map_err(ConnError::Protocol)?;
                    let _ = q.send(Outbound::Now(out)).await;
                }
                Inbound::Unsubscribe { pkid, filters } => {
                    let mut out = BytesMut::new();
                    match version {
                        Version::V4 => v4::UnsubAck::new(pkid).write(&mut out).map_err(|e| e.to_string()),
                        Version::V5 => v5::UnsubAck {
                            pkid,
                            reasons: vec![v5::UnsubAckReason::NoSubscriptionExisted; filters],
                            properties: None,
                        }
                        .write(&mut out)
                        .map_err(|e| e.to_string()),
                    }
                    .map_err(ConnError::Protocol)?;
                    let _ = q.send(Outbound::Now(out)).await;
                }
                Inbound::Disconnect => return Ok(()),
                Inbound::Ignored => {}
            }
        }
        let n = tokio::select! {
            _ = token.cancelled() => return Ok(()),
            r = tokio::time::timeout(idle_limit, rd.read_buf(&mut buf)) => match r {
                Ok(r) => r?,
                Err(_) => return Err(ConnError::KeepAlive),
            },
        };
        if n == 0 {
            return Ok(());
        }
    }
}

type DecodeFailure = (&'static str, String, Option<v5::DisconnectReasonCode>);

/// Decodes one packet, `Ok(None)` if more bytes are needed.
fn decode(version: Version, buf: &mut BytesMut, max: usize) -> Result<Option<Inbound>, DecodeFailure> {
    use rumqttc::QoS;
    let qos_num = |q: QoS| match q {
        QoS::AtMostOnce => 0,
        QoS::AtLeastOnce => 1,
        QoS::ExactlyOnce => 2,
    };
    // rumqttc's v5 decoder rejects the normal DISCONNECT, remaining length 0 (`E0 00`), with
    // "payload required"; it is what most MQTT 5 clients (rumqttc's own included) send.
    if version == Version::V5 && buf.starts_with(&[0xE0, 0x00]) {
        bytes::Buf::advance(buf, 2);
        return Ok(Some(Inbound::Disconnect));
    }
    match version {
        Version::V4 => match v4::Packet::read(buf, max) {
            Ok(p) => Ok(Some(match p {
                v4::Packet::Publish(p) => Inbound::Publish { topic: p.topic, qos: qos_num(p.qos), pkid: p.pkid, payload: p.payload },
                v4::Packet::PingReq => Inbound::PingReq,
                v4::Packet::Disconnect => Inbound::Disconnect,
                v4::Packet::Subscribe(s) => Inbound::Subscribe { pkid: s.pkid, filters: s.filters.len() },
                v4::Packet::Unsubscribe(u) => Inbound::Unsubscribe { pkid: u.pkid, filters: u.topics.len() },
                v4::Packet::Connect(_) => return Err(("protocol_error", "second CONNECT".into(), None)),
                _ => Inbound::Ignored,
            })),
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
            Err(e @ rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(_)) => Err(("packet_too_large", e.to_string(), None)),
            Err(e) => Err(("malformed_packet", e.to_string(), None)),
        },
        Version::V5 => match v5::Packet::read(buf, Some(max as u32)) {
            Ok(p) => Ok(Some(match p {
                v5::Packet::Publish(p) => {
                    let topic = match String::from_utf8(p.topic.to_vec()) {
                        Ok(t) => t,
                        Err(_) => return Err(("malformed_packet", "topic is not UTF-8".into(), Some(v5::DisconnectReasonCode::MalformedPacket))),
                    };
                    let qos = match p.qos {
                        rumqttc::v5::mqttbytes::QoS::AtMostOnce => 0,
                        rumqttc::v5::mqttbytes::QoS::AtLeastOnce => 1,
                        rumqttc::v5::mqttbytes::QoS::ExactlyOnce => 2,
                    };
                    Inbound::Publish { topic, qos, pkid: p.pkid, payload: p.payload }
                }
                v5::Packet::PingReq(_) => Inbound::PingReq,
                v5::Packet::Disconnect(_) => Inbound::Disconnect,
                v5::Packet::Subscribe(s) => Inbound::Subscribe { pkid: s.pkid, filters: s.filters.len() },
                v5::Packet::Unsubscribe(u) => Inbound::Unsubscribe { pkid: u.pkid, filters: u.filters.len() },
                v5::Packet::Connect(..) => {
                    return Err(("protocol_error", "second CONNECT".into(), Some(v5::DisconnectReasonCode::ProtocolError)));
                }
                _ => Inbound::Ignored,
            })),
            Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
            Err(e @ rumqttc::v5::mqttbytes::Error::PayloadSizeLimitExceeded { .. }) => {
                Err(("packet_too_large", e.to_string(), Some(v5::DisconnectReasonCode::PacketTooLarge)))
            }
            Err(e) => Err(("malformed_packet", e.to_string(), Some(v5::DisconnectReasonCode::MalformedPacket))),
        },
    }
}

/// Handles one PUBLISH: parse, submit to the store, return what to write back when.
async fn publish(shared: &Shared, topic: &str, qos: u8, pkid: u16, payload: &[u8]) -> Outbound {
    if qos == 2 {
        // Refused rather than silently downgraded: QoS 2 promises more than we keep.
        shared.metrics.bad("qos2_unsupported");
        tracing::warn!(topic, "QoS 2 publish refused; use QoS 0 or 1");
        return Outbound::BadPayload { pkid };
    }
    let stream = topic.strip_prefix(shared.cfg.strip_prefix.as_str()).unwrap_or(topic);
    let pkid = (qos == 1).then_some(pkid);
    let readings = match payload::parse_mqtt(stream, payload, crate::now_ns(), &shared.payload) {
        Ok(r) => r,
        Err(e) => {
            shared.metrics.bad(e.reason());
            tracing::warn!(topic, error = %e, "bad sensor payload; nothing stored");
            return match pkid {
                Some(pkid) => Outbound::BadPayload { pkid },
                None => Outbound::Now(BytesMut::new()),
            };
        }
    };
    shared.metrics.received("mqtt", readings.len() as u64);
    match shared.store.submit(readings).await {
        Ok(verdict) => Outbound::AfterCommit { pkid, verdict },
        Err(e) => {
            let (tx, rx) = oneshot::channel();
            let _ = tx.send(Err(e));
            Outbound::AfterCommit { pkid, verdict: rx }
        }
    }
}

fn puback(version: Version, pkid: u16, reason: Option<v5::PubAckReason>, out: &mut BytesMut) {
    match version {
        Version::V4 => {
            let _ = v4::PubAck::new(pkid).write(out);
        }
        Version::V5 => {
            let mut ack = v5::PubAck::new(pkid, None);
            if let Some(r) = reason {
                ack.reason = r;
            }
            let _ = ack.write(out);
        }
    }
}
