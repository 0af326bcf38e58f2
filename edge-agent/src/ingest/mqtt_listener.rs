//! The built-in MQTT listener sensors publish to (MQTT 3.1.1 and 5, QoS 0, 1 and 2).
//!
//! It is not a broker: it accepts PUBLISH, answers PING, refuses SUBSCRIBE, and turns
//! each PUBLISH into readings on the stream named by its topic. Packets are decoded and
//! encoded with rumqttc's maintained codecs (`mqttbytes::v4` and `v5::mqttbytes::v5`);
//! the rules those codecs do not check are checked here, in [`check_connect_flags`] and
//! [`check_topic`].
//!
//! # The acknowledgement promise
//!
//! Each connection has a reader half and a writer half joined by a bounded, ordered
//! queue. The reader parses a PUBLISH, submits its readings to the store (without waiting
//! for the commit) and queues the pending verdict; the writer half awaits the verdicts in
//! order and only then writes the PUBACK (QoS 1) or PUBREC (QoS 2). So up to
//! `listener.max_inflight` publishes of a connection share one group commit, and no
//! acknowledgement leaves before its reading is durable.
//!
//! # Exactly once from the sensor
//!
//! For a persistent session (3.1.1 `CleanSession = 0`; 5 `Clean Start = 0` with a session
//! expiry) the session lives in the store ([`crate::store::sessions`]): whether it is
//! present survives a restart, and the packet identifier of every committed PUBLISH is
//! written in the same transaction as its readings. A re-send (`DUP = 1`) of a committed
//! PUBLISH — the sensor missed the PUBACK because the agent crashed after the commit — is
//! acknowledged again and stores nothing. QoS 2 goes further: PUBREC after the commit, the
//! identifier stays taken until PUBREL, whose release is committed before PUBCOMP, so
//! every duplicate is recognised. A clean session keeps nothing and gets at-least-once.
//!
//! # Bad input
//!
//! * Malformed packet, oversize packet, or a protocol violation (a reserved CONNECT flag,
//!   a topic name that is empty or holds `+`, `#` or U+0000, a second CONNECT): the
//!   connection is closed (MQTT 5: after a DISCONNECT with the reason code), counted and
//!   logged; nothing of it is stored.
//! * Unknown protocol version: CONNACK "unacceptable protocol version", then close. An
//!   empty client id with a persistent session: CONNACK "identifier rejected" (5: "client
//!   identifier not valid"), then close; with a clean session the listener assigns one.
//! * Bad payload (invalid UTF-8, bad JSON, bad line protocol, bad stream or field name):
//!   counted and logged; MQTT 5 gets PUBACK/PUBREC "payload format invalid" (0x99); MQTT
//!   3.1.1 has no negative acknowledgement, so the publish is acknowledged (re-sending
//!   garbage cannot help) and nothing is stored.
//! * The store refuses (stream full, disk full): MQTT 5 gets PUBACK/PUBREC "quota
//!   exceeded" (0x97) or "implementation specific error" (0x83); MQTT 3.1.1 gets no
//!   acknowledgement and the connection is closed, so the sensor keeps the reading and
//!   publishes it again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
use crate::store::window::Publisher;
use crate::store::writer::{AppendError, StoreHandle};
use crate::store::{PublishId, SessionOp};

/// Shared state of the listener.
struct Shared {
    /// `[listener]`.
    cfg: ListenerConfig,
    /// `[payload]`: how PUBLISH payloads are parsed.
    payload: PayloadConfig,
    /// Where readings are committed; every connection queues into the one writer.
    store: StoreHandle,
    /// The agent's metrics.
    metrics: Arc<Metrics>,
    /// Sessions by client id, for takeover and `session_present`.
    sessions: Mutex<Sessions>,
}

/// Open connections by client id. Whether a persistent session exists is the store's
/// business ([`SessionOp`]), so it survives a restart.
#[derive(Default)]
struct Sessions {
    /// Open connection per client id: (connection number, its token). A new connection with
    /// the same id cancels the old one (MQTT session takeover).
    active: HashMap<Arc<str>, (u64, CancellationToken)>,
    /// The next connection's number (tells an old connection from its replacement).
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
    Publish {
        topic: String,
        qos: u8,
        pkid: u16,
        dup: bool,
        payload: bytes::Bytes,
    },
    /// QoS 2, second step: the sensor got our PUBREC.
    PubRel {
        pkid: u16,
    },
    PingReq,
    Disconnect,
    Subscribe {
        pkid: u16,
        filters: usize,
    },
    Unsubscribe {
        pkid: u16,
        filters: usize,
    },
    /// A packet a publisher may send that needs no answer (PUBACK from us? never), ignored.
    Ignored,
}

/// The acknowledgement a PUBLISH gets: PUBACK for QoS 1, PUBREC for QoS 2.
#[derive(Clone, Copy, Debug)]
enum Ack {
    PubAck(u16),
    PubRec(u16),
}

/// What to write back, in order.
enum Outbound {
    /// Bytes ready now.
    Now(BytesMut),
    /// The acknowledgement (none for QoS 0) once the store has decided.
    AfterCommit { ack: Option<Ack>, verdict: oneshot::Receiver<Result<(), AppendError>> },
    /// The acknowledgement with a payload error (MQTT 5 gets a reason code; MQTT 3.1.1 a
    /// plain one).
    BadPayload { ack: Ack },
    /// PUBCOMP once the release of a QoS 2 packet identifier is committed.
    AfterRelease { pkid: u16, verdict: oneshot::Receiver<Result<bool, AppendError>> },
}

/// What a connection is, once CONNECT is accepted.
struct Client {
    /// Client id (assigned by the listener if the sensor sent an empty one).
    id: Arc<str>,
    /// The session outlives the connection: packet identifiers are tracked in the store.
    persistent: bool,
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

/// A CONNECT as the listener needs it.
struct ConnectInfo {
    version: Version,
    client_id: String,
    clean: bool,
    keep_alive: u16,
    /// MQTT 5 session expiry interval, seconds (0 or absent: the session ends with the connection).
    session_expiry: Option<u32>,
}

async fn handle(mut socket: TcpStream, shared: &Shared, shutdown: CancellationToken) -> Result<(), ConnError> {
    let max = shared.cfg.max_packet_bytes.as_u64() as usize;
    let mut buf = BytesMut::with_capacity(4096);

    // CONNECT, within a bounded time.
    let connect = tokio::time::timeout(Duration::from_secs(10), async {
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
    let ConnectInfo { version, client_id, clean, keep_alive, session_expiry } = connect;

    // MQTT-3.1.3-8: an empty client id only with a clean session (MQTT 5: a session that
    // could be resumed needs a name too).
    let persistent = !clean && (version == Version::V4 || session_expiry.unwrap_or(0) > 0);
    if client_id.is_empty() && !clean {
        shared.metrics.bad("client_id_rejected");
        tracing::warn!(?version, "refusing a sensor with an empty client id and a persistent session");
        refuse_connect(
            &mut socket,
            version,
            v4::ConnectReturnCode::BadClientId,
            v5::ConnectReturnCode::ClientIdentifierNotValid,
        )
        .await;
        return Err(ConnError::Protocol("empty client id with a persistent session".into()));
    }

    // Session takeover: a second connection with the same client id closes the first.
    // Registered before the session is opened in the store, so the old connection's
    // close can no longer mark the session disconnected once the new one holds it.
    let conn_token = shutdown.child_token();
    let (conn_no, client) = {
        let mut s = shared.sessions.lock().unwrap_or_else(|e| e.into_inner());
        s.next_conn += 1;
        let conn_no = s.next_conn;
        let id: Arc<str> =
            if client_id.is_empty() { format!("brume-auto-{conn_no}").into() } else { client_id.as_str().into() };
        if let Some((_, old)) = s.active.insert(id.clone(), (conn_no, conn_token.clone())) {
            old.cancel();
        }
        (conn_no, Client { id, persistent })
    };
    let assigned = client_id.is_empty().then(|| client.id.to_string());
    // Durable: whether a session was present must survive a restart of the agent, and a
    // clean session must delete the old one before anything of the new one is stored.
    let session_present = match shared.store.session(SessionOp::Open { client: client.id.clone(), persistent }).await {
        Ok(present) => present,
        Err(e) => {
            tracing::warn!(error = %e, "cannot open the sensor's session; refusing the connection");
            refuse_connect(
                &mut socket,
                version,
                v4::ConnectReturnCode::ServiceUnavailable,
                v5::ConnectReturnCode::ServerUnavailable,
            )
            .await;
            forget_connection(shared, &client.id, conn_no);
            return Err(ConnError::Refused);
        }
    };
    let max_expiry = u32::try_from(shared.cfg.session_expiry.as_secs()).unwrap_or(u32::MAX);
    let mut out = BytesMut::new();
    match version {
        Version::V4 => {
            v4::ConnAck::new(v4::ConnectReturnCode::Success, session_present).write(&mut out).map_err(|e| e.to_string())
        }
        Version::V5 => {
            let props = v5::ConnAckProperties {
                receive_max: Some(shared.cfg.max_inflight),
                // Absent means QoS 2 is supported.
                max_qos: None,
                retain_available: Some(0),
                max_packet_size: Some(max as u32),
                topic_alias_max: Some(0),
                wildcard_subscription_available: Some(0),
                subscription_identifiers_available: Some(0),
                shared_subscription_available: Some(0),
                // A client asking for more than `listener.session_expiry` gets that much.
                session_expiry_interval: session_expiry.filter(|&e| persistent && e > max_expiry).map(|_| max_expiry),
                assigned_client_identifier: assigned,
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
    tracing::debug!(client_id = %client.id, ?version, persistent, session_present, "sensor connected");

    let keep_alive =
        if keep_alive == 0 { shared.cfg.default_keep_alive } else { Duration::from_secs(u64::from(keep_alive)) };
    let idle_limit = keep_alive.mul_f64(1.5);
    let (rd, mut wr) = socket.into_split();
    let (q_tx, mut q_rx) = mpsc::channel::<Outbound>(usize::from(shared.cfg.max_inflight));
    // This connection as the store's commit window sees it (see `store::window`).
    let load = Arc::new(shared.store.publisher());
    let writer_load = load.clone();

    // Stops the reader: on shutdown or takeover (parent token), or when the writer fails.
    let reader_stop = conn_token.child_token();
    let stop_reader = reader_stop.clone();
    // Writer half: awaits verdicts in order, writes acknowledgements.
    // Acknowledgements whose verdicts are already in are written together, in one write:
    // a group commit answers many PUBLISHes at once, and one syscall per PUBACK would cost
    // CPU per reading and make the sensor's next burst trickle in.
    let writer = async move {
        let mut out = BytesMut::new();
        loop {
            let item = match q_rx.try_recv() {
                Ok(item) => item,
                Err(mpsc::error::TryRecvError::Empty) => {
                    if !out.is_empty() {
                        wr.write_all(&out).await?;
                        out.clear();
                    }
                    match q_rx.recv().await {
                        Some(item) => item,
                        None => break,
                    }
                }
                Err(mpsc::error::TryRecvError::Disconnected) => break,
            };
            match item {
                Outbound::Now(b) => out.extend_from_slice(&b),
                Outbound::BadPayload { ack } => write_ack(version, ack, Some(Negative::PayloadFormatInvalid), &mut out),
                Outbound::AfterCommit { ack, mut verdict } => {
                    let verdict = match verdict.try_recv() {
                        Ok(v) => v,
                        Err(oneshot::error::TryRecvError::Empty) => {
                            if !out.is_empty() {
                                wr.write_all(&out).await?;
                                out.clear();
                            }
                            verdict.await.unwrap_or(Err(AppendError::Closed))
                        }
                        Err(oneshot::error::TryRecvError::Closed) => Err(AppendError::Closed),
                    };
                    writer_load.answered(Instant::now());
                    match (verdict, ack) {
                        (Ok(()), Some(ack)) => write_ack(version, ack, None, &mut out),
                        (Ok(()), None) => {}
                        (Err(e), ack) => {
                            tracing::warn!(error = %e, "reading refused by the store");
                            let reason = match e {
                                AppendError::Refused(_) => Negative::QuotaExceeded,
                                _ => Negative::ImplementationSpecificError,
                            };
                            match (version, ack) {
                                (Version::V5, Some(ack)) => write_ack(version, ack, Some(reason), &mut out),
                                // QoS 0 has no acknowledgement to withhold: it is simply lost,
                                // as QoS 0 allows. Counted by the store as refused.
                                (_, None) => {}
                                // 3.1.1 has no negative acknowledgement: never ack, close instead
                                // (after the acknowledgements of what was committed before it).
                                (Version::V4, Some(_)) => {
                                    let _ = wr.write_all(&out).await;
                                    return Err(ConnError::Refused);
                                }
                            }
                        }
                    }
                }
                Outbound::AfterRelease { pkid, verdict } => {
                    if !out.is_empty() {
                        wr.write_all(&out).await?;
                        out.clear();
                    }
                    match verdict.await.unwrap_or(Err(AppendError::Closed)) {
                        Ok(_) => pubcomp(version, pkid, &mut out),
                        // Not durably released: no PUBCOMP. The sensor re-sends PUBREL on its
                        // next connection.
                        Err(e) => {
                            tracing::warn!(error = %e, pkid, "cannot release a QoS 2 packet identifier; closing");
                            return Err(ConnError::Refused);
                        }
                    }
                }
            }
        }
        if !out.is_empty() {
            wr.write_all(&out).await?;
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

    let reader = read_loop(rd, buf, version, max, idle_limit, shared, &client, q_tx, &load, reader_stop);
    // The reader ends on DISCONNECT, EOF, error or shutdown; dropping its queue sender lets
    // the writer finish every pending PUBACK first.
    let (r, w) = tokio::join!(reader, writer);
    if forget_connection(shared, &client.id, conn_no) && client.persistent {
        // The session's expiry starts now (unless a newer connection took it over).
        let _ = shared.store.session(SessionOp::Close { client: client.id.clone() }).await;
    }
    r.and(w)
}

/// Answers a CONNECT with a refusal (the caller then closes): `code4` or `code5` by version.
async fn refuse_connect(
    socket: &mut TcpStream,
    version: Version,
    code4: v4::ConnectReturnCode,
    code5: v5::ConnectReturnCode,
) {
    let mut out = BytesMut::new();
    let _ = match version {
        Version::V4 => v4::ConnAck::new(code4, false).write(&mut out).map_err(|e| e.to_string()),
        Version::V5 => v5::ConnAck { session_present: false, code: code5, properties: None }
            .write(&mut out)
            .map_err(|e| e.to_string()),
    };
    let _ = socket.write_all(&out).await;
}

/// Removes connection `conn_no` of `client` from the active ones, unless a newer
/// connection took over. Returns whether it was still the active one.
fn forget_connection(shared: &Shared, client: &Arc<str>, conn_no: u64) -> bool {
    let mut s = shared.sessions.lock().unwrap_or_else(|e| e.into_inner());
    if s.active.get(client).is_some_and(|(n, _)| *n == conn_no) {
        s.active.remove(client);
        true
    } else {
        false
    }
}

/// Reads the protocol level of a CONNECT and checks its flags byte, which rumqttc's
/// decoders do not: the reserved bit must be 0 (MQTT-3.1.2-3). `Ok(None)` if `buf` does
/// not hold the flags yet; `Ok(Some(level))` if they are fine, `Ok(Some(0))` if `buf` is
/// not a CONNECT at all (the decoder then says what is wrong).
pub fn check_connect_flags(buf: &[u8]) -> Result<Option<u8>, String> {
    if buf.first() != Some(&0x10) {
        return Ok(Some(0));
    }
    // Fixed header: type byte, remaining length (1 to 4 bytes, 7 bits each).
    let mut i = 1;
    loop {
        match buf.get(i) {
            None => return Ok(None),
            Some(b) if b & 0x80 != 0 && i < 4 => i += 1,
            Some(_) => break,
        }
    }
    // Variable header: protocol name (u16 length + bytes), level, flags.
    let Some(len) = buf.get(i + 1..i + 3) else { return Ok(None) };
    let level_at = i + 3 + usize::from(u16::from_be_bytes([len[0], len[1]]));
    match (buf.get(level_at), buf.get(level_at + 1)) {
        (_, None) => Ok(None),
        (_, Some(flags)) if flags & 0x01 != 0 => Err("the reserved CONNECT flag is set (MQTT-3.1.2-3)".into()),
        (Some(&level), Some(_)) => Ok(Some(level)),
        (None, Some(_)) => unreachable!("the level precedes the flags"),
    }
}

/// Checks a PUBLISH topic name: not empty, no wildcard `+` or `#` (MQTT-3.3.2-2), no
/// U+0000 (MQTT-1.5.3-2). (This listener offers no topic aliases, so an empty name has
/// nothing to stand for.)
pub fn check_topic(topic: &str) -> Result<(), String> {
    if topic.is_empty() {
        Err("empty topic name".into())
    } else if topic.contains(['+', '#']) {
        Err(format!("topic name {topic:?} contains a wildcard"))
    } else if topic.contains('\0') {
        Err(format!("topic name {topic:?} contains U+0000"))
    } else {
        Ok(())
    }
}

/// Tries to read a CONNECT from `buf`. `Ok(None)`: need more bytes.
async fn read_connect(
    buf: &mut BytesMut,
    max: usize,
    socket: &mut TcpStream,
    shared: &Shared,
) -> Result<Option<ConnectInfo>, ConnError> {
    if buf.is_empty() {
        return Ok(None);
    }
    let level = match check_connect_flags(buf) {
        Ok(None) => return Ok(None),
        Ok(Some(level)) => level,
        Err(e) => {
            shared.metrics.bad("protocol_error");
            return Err(ConnError::Protocol(e));
        }
    };
    // Level 5 goes to the v5 decoder. Everything else is tried as 3.1.1 on a copy, whose
    // decoder also accepts level 5 (misreading the properties) and refuses other levels.
    let mut copy = buf.clone();
    let v4_read = if level == 5 {
        Err(rumqttc::mqttbytes::Error::InvalidProtocolLevel(5))
    } else {
        v4::Packet::read(&mut copy, max).and_then(|p| match p {
            v4::Packet::Connect(c) if c.protocol == rumqttc::mqttbytes::Protocol::V5 => {
                Err(rumqttc::mqttbytes::Error::InvalidProtocolLevel(5))
            }
            p => Ok(p),
        })
    };
    match v4_read {
        Ok(v4::Packet::Connect(c)) => {
            *buf = copy;
            Ok(Some(ConnectInfo {
                version: Version::V4,
                client_id: c.client_id,
                clean: c.clean_session,
                keep_alive: c.keep_alive,
                session_expiry: None,
            }))
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
                    Ok(Some(ConnectInfo {
                        version: Version::V5,
                        session_expiry: c.properties.as_ref().and_then(|p| p.session_expiry_interval),
                        client_id: c.client_id,
                        clean: c.clean_start,
                        keep_alive: c.keep_alive,
                    }))
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
    client: &Client,
    q: mpsc::Sender<Outbound>,
    load: &Publisher,
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
                Inbound::Publish { topic, qos, pkid, dup, payload } => {
                    let item = publish(shared, client, &topic, qos, pkid, dup, &payload).await;
                    if matches!(item, Outbound::AfterCommit { .. }) {
                        load.submitted(Instant::now());
                    }
                    // A full queue of pending acknowledgements: nothing more can be read
                    // from this connection until a commit, so it counts as waiting.
                    let full = q.capacity() == 0;
                    if full {
                        load.quiet();
                    }
                    if q.send(item).await.is_err() {
                        return Ok(()); // writer failed; its error is reported
                    }
                    if full {
                        load.active();
                    }
                }
                Inbound::PubRel { pkid } => {
                    let item = if client.persistent {
                        let op = SessionOp::Release { client: client.id.clone(), pkid };
                        match shared.store.submit_session(op).await {
                            Ok(verdict) => Outbound::AfterRelease { pkid, verdict },
                            Err(e) => {
                                let (tx, rx) = oneshot::channel();
                                let _ = tx.send(Err(e));
                                Outbound::AfterRelease { pkid, verdict: rx }
                            }
                        }
                    } else {
                        // A clean session keeps nothing to release: the PUBREC went out
                        // after the commit, and the sensor cannot re-send across connections.
                        let mut out = BytesMut::new();
                        pubcomp(version, pkid, &mut out);
                        Outbound::Now(out)
                    };
                    if q.send(item).await.is_err() {
                        return Ok(());
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
        let read = async {
            // With readings awaiting their commit, a silence longer than this connection's
            // usual gap means the sensor waits for its acknowledgements: say so, so the
            // commit window does not hold them back (see `store::window`).
            let Some(quiet_after) = load.quiet_after() else {
                return rd.read_buf(&mut buf).await;
            };
            let read = rd.read_buf(&mut buf);
            tokio::pin!(read);
            if quiet_after.is_zero() {
                // Quiet the moment the socket has nothing more (bytes already there are
                // read first).
                tokio::select! {
                    biased;
                    r = &mut read => return r,
                    _ = std::future::ready(()) => load.quiet(),
                }
                let r = read.await;
                load.active();
                return r;
            }
            tokio::select! {
                r = &mut read => return r,
                _ = tokio::time::sleep(quiet_after) => load.quiet(),
            }
            let r = read.await;
            load.active();
            r
        };
        let n = tokio::select! {
            _ = token.cancelled() => return Ok(()),
            r = tokio::time::timeout(idle_limit, read) => match r {
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
                v4::Packet::Publish(p) => {
                    check_topic(&p.topic).map_err(|e| ("bad_topic", e, None))?;
                    Inbound::Publish {
                        topic: p.topic,
                        qos: qos_num(p.qos),
                        pkid: p.pkid,
                        dup: p.dup,
                        payload: p.payload,
                    }
                }
                v4::Packet::PubRel(r) => Inbound::PubRel { pkid: r.pkid },
                v4::Packet::PingReq => Inbound::PingReq,
                v4::Packet::Disconnect => Inbound::Disconnect,
                v4::Packet::Subscribe(s) => Inbound::Subscribe { pkid: s.pkid, filters: s.filters.len() },
                v4::Packet::Unsubscribe(u) => Inbound::Unsubscribe { pkid: u.pkid, filters: u.topics.len() },
                v4::Packet::Connect(_) => return Err(("protocol_error", "second CONNECT".into(), None)),
                _ => Inbound::Ignored,
            })),
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
            Err(e @ rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(_)) => {
                Err(("packet_too_large", e.to_string(), None))
            }
            Err(e) => Err(("malformed_packet", e.to_string(), None)),
        },
        Version::V5 => match v5::Packet::read(buf, Some(max as u32)) {
            Ok(p) => Ok(Some(match p {
                v5::Packet::Publish(p) => {
                    let topic = match String::from_utf8(p.topic.to_vec()) {
                        Ok(t) => t,
                        Err(_) => {
                            return Err((
                                "malformed_packet",
                                "topic is not UTF-8".into(),
                                Some(v5::DisconnectReasonCode::MalformedPacket),
                            ));
                        }
                    };
                    check_topic(&topic)
                        .map_err(|e| ("bad_topic", e, Some(v5::DisconnectReasonCode::TopicNameInvalid)))?;
                    let qos = match p.qos {
                        rumqttc::v5::mqttbytes::QoS::AtMostOnce => 0,
                        rumqttc::v5::mqttbytes::QoS::AtLeastOnce => 1,
                        rumqttc::v5::mqttbytes::QoS::ExactlyOnce => 2,
                    };
                    Inbound::Publish { topic, qos, pkid: p.pkid, dup: p.dup, payload: p.payload }
                }
                v5::Packet::PubRel(r) => Inbound::PubRel { pkid: r.pkid },
                v5::Packet::PingReq(_) => Inbound::PingReq,
                v5::Packet::Disconnect(_) => Inbound::Disconnect,
                v5::Packet::Subscribe(s) => Inbound::Subscribe { pkid: s.pkid, filters: s.filters.len() },
                v5::Packet::Unsubscribe(u) => Inbound::Unsubscribe { pkid: u.pkid, filters: u.filters.len() },
                v5::Packet::Connect(..) => {
                    return Err((
                        "protocol_error",
                        "second CONNECT".into(),
                        Some(v5::DisconnectReasonCode::ProtocolError),
                    ));
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
async fn publish(
    shared: &Shared,
    client: &Client,
    topic: &str,
    qos: u8,
    pkid: u16,
    dup: bool,
    payload: &[u8],
) -> Outbound {
    let stream = topic.strip_prefix(shared.cfg.strip_prefix.as_str()).unwrap_or(topic);
    let ack = match qos {
        0 => None,
        1 => Some(Ack::PubAck(pkid)),
        _ => Some(Ack::PubRec(pkid)),
    };
    let readings = match payload::parse_mqtt(stream, payload, crate::now_ns(), &shared.payload) {
        Ok(r) => r,
        Err(e) => {
            shared.metrics.bad(e.reason());
            tracing::warn!(topic, error = %e, "bad sensor payload; nothing stored");
            return match ack {
                Some(ack) => Outbound::BadPayload { ack },
                None => Outbound::Now(BytesMut::new()),
            };
        }
    };
    shared.metrics.received("mqtt", readings.len() as u64);
    // Only a persistent session can re-send after a reconnect, so only it is tracked.
    let id = (client.persistent && qos > 0).then(|| PublishId {
        client: client.id.clone(),
        pkid,
        qos,
        dup,
        // QoS 2 identifiers are matched alone (see `store::sessions`).
        digest: if qos == 1 { crate::store::sessions::digest(topic, payload) } else { 0 },
    });
    match shared.store.submit_publish(readings, Some(client.id.clone()), id).await {
        Ok(verdict) => Outbound::AfterCommit { ack, verdict },
        Err(e) => {
            let (tx, rx) = oneshot::channel();
            let _ = tx.send(Err(e));
            Outbound::AfterCommit { ack, verdict: rx }
        }
    }
}

/// A negative acknowledgement (MQTT 5 reason codes shared by PUBACK and PUBREC).
#[derive(Clone, Copy, Debug)]
enum Negative {
    PayloadFormatInvalid,
    QuotaExceeded,
    ImplementationSpecificError,
}

/// Writes a PUBACK or PUBREC, with a reason code on MQTT 5 (3.1.1 has none).
fn write_ack(version: Version, ack: Ack, reason: Option<Negative>, out: &mut BytesMut) {
    match ack {
        Ack::PubAck(pkid) => puback(
            version,
            pkid,
            reason.map(|r| match r {
                Negative::PayloadFormatInvalid => v5::PubAckReason::PayloadFormatInvalid,
                Negative::QuotaExceeded => v5::PubAckReason::QuotaExceeded,
                Negative::ImplementationSpecificError => v5::PubAckReason::ImplementationSpecificError,
            }),
            out,
        ),
        Ack::PubRec(pkid) => match version {
            Version::V4 => {
                let _ = v4::PubRec::new(pkid).write(out);
            }
            Version::V5 => {
                let mut rec = v5::PubRec::new(pkid, None);
                if let Some(r) = reason {
                    rec.reason = match r {
                        Negative::PayloadFormatInvalid => v5::PubRecReason::PayloadFormatInvalid,
                        Negative::QuotaExceeded => v5::PubRecReason::QuotaExceeded,
                        Negative::ImplementationSpecificError => v5::PubRecReason::ImplementationSpecificError,
                    };
                }
                let _ = rec.write(out);
            }
        },
    }
}

fn pubcomp(version: Version, pkid: u16, out: &mut BytesMut) {
    match version {
        Version::V4 => {
            let _ = v4::PubComp::new(pkid).write(out);
        }
        Version::V5 => {
            let _ = v5::PubComp::new(pkid, None).write(out);
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
