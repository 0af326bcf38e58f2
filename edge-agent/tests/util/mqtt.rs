//! A raw MQTT client for talking to the agent's built-in listener.
//!
//! It writes packets encoded by rumqttc's codecs (`mqttbytes::v4` and
//! `v5::mqttbytes::v5`) straight onto a `TcpStream`, so a test can also send bytes no
//! real client would (broken remaining lengths, unknown protocol levels, oversize
//! packets) and see exactly what comes back: which packet, which reason code, and
//! whether the agent closed the connection.
//!
//! Every wait is bounded by [`STEP`]; nothing sleeps for a fixed time.

use std::io::ErrorKind;
use std::net::SocketAddr;

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::{self, v4};
use rumqttc::v5::mqttbytes::v5;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::STEP;

/// Largest packet the test client accepts from the agent; far above anything it sends.
const MAX_INBOUND: usize = 1 << 20;

/// QoS of MQTT 3.1.1 packets.
pub use rumqttc::mqttbytes::QoS as QoS4;
/// QoS of MQTT 5 packets.
pub use rumqttc::v5::mqttbytes::QoS as QoS5;

/// One TCP connection to the listener plus the bytes received but not yet decoded.
pub struct RawConn {
    stream: TcpStream,
    /// Received bytes not yet consumed by a `recv_*` call.
    buf: BytesMut,
}

impl RawConn {
    /// Opens a TCP connection; sends nothing.
    pub async fn open(addr: SocketAddr) -> RawConn {
        let stream = tokio::time::timeout(STEP, TcpStream::connect(addr))
            .await
            .expect("connect to the MQTT listener timed out")
            .expect("connect to the MQTT listener");
        stream.set_nodelay(true).expect("set_nodelay");
        RawConn { stream, buf: BytesMut::new() }
    }

    /// Writes raw bytes.
    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write to the MQTT listener");
    }

    /// Encodes and writes an MQTT 3.1.1 packet.
    pub async fn send_v4(&mut self, packet: v4::Packet) {
        let mut out = BytesMut::new();
        packet.write(&mut out, usize::MAX).expect("encode v4 packet");
        self.send(&out).await;
    }

    /// Encodes and writes an MQTT 5 packet.
    pub async fn send_v5(&mut self, packet: v5::Packet) {
        let mut out = BytesMut::new();
        packet.write(&mut out, None).expect("encode v5 packet");
        self.send(&out).await;
    }

    /// Reads more bytes into `buf`; `Ok(0)` on EOF. Bounded by [`STEP`].
    async fn fill(&mut self, what: &str) -> std::io::Result<usize> {
        match tokio::time::timeout(STEP, self.stream.read_buf(&mut self.buf)).await {
            Ok(r) => r,
            Err(_) => panic!("waited {STEP:?} for {what} from the agent; buffered bytes: {:02x?}", &self.buf[..]),
        }
    }

    /// Receives the next MQTT 3.1.1 packet and the exact bytes it was encoded as.
    /// Panics if the agent closes the connection or sends something undecodable.
    pub async fn recv_v4_raw(&mut self) -> (v4::Packet, Bytes) {
        loop {
            let before = self.buf.clone();
            match v4::Packet::read(&mut self.buf, MAX_INBOUND) {
                Ok(p) => {
                    let used = before.len() - self.buf.len();
                    return (p, before.freeze().slice(..used));
                }
                Err(mqttbytes::Error::InsufficientBytes(_)) => self.buf = before,
                Err(e) => panic!("agent sent an undecodable v4 packet ({e}): {:02x?}", &before[..]),
            }
            match self.fill("a v4 packet").await {
                Ok(0) => panic!("agent closed the connection; expected a packet (buffered: {:02x?})", &self.buf[..]),
                Ok(_) => {}
                Err(e) => panic!("read error while waiting for a v4 packet: {e}"),
            }
        }
    }

    /// Receives the next MQTT 3.1.1 packet.
    pub async fn recv_v4(&mut self) -> v4::Packet {
        self.recv_v4_raw().await.0
    }

    /// Receives the next MQTT 5 packet.
    pub async fn recv_v5(&mut self) -> v5::Packet {
        loop {
            let before = self.buf.clone();
            match v5::Packet::read(&mut self.buf, Some(MAX_INBOUND as u32)) {
                Ok(p) => return p,
                Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => self.buf = before,
                Err(e) => panic!("agent sent an undecodable v5 packet ({e}): {:02x?}", &before[..]),
            }
            match self.fill("a v5 packet").await {
                Ok(0) => panic!("agent closed the connection; expected a packet (buffered: {:02x?})", &self.buf[..]),
                Ok(_) => {}
                Err(e) => panic!("read error while waiting for a v5 packet: {e}"),
            }
        }
    }

    /// Waits until the agent closes the connection and returns every byte it sent before
    /// closing that no `recv_*` consumed. A reset counts as a close: the agent may close
    /// with our bytes still unread (an oversize packet), which makes the kernel send RST;
    /// bytes that arrived before it are still returned.
    pub async fn closed_by_agent(&mut self) -> Bytes {
        loop {
            match self.fill("the connection to close").await {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted) => break,
                Err(e) => panic!("unexpected read error while waiting for the close: {e}"),
            }
        }
        self.buf.split().freeze()
    }

    /// Asserts that the agent closes the connection without sending anything more.
    pub async fn assert_closed_silently(&mut self) {
        let rest = self.closed_by_agent().await;
        assert!(rest.is_empty(), "agent sent {rest:02x?} before closing; expected nothing");
    }

    /// Asserts that the agent sends exactly one MQTT 5 DISCONNECT with `code`, then
    /// closes. Checked against the spec's framing rather than rumqttc's decoder, which
    /// rejects the valid reason-code-only form (remaining length 1).
    pub async fn assert_disconnected_v5(&mut self, code: v5::DisconnectReasonCode) {
        let sent = self.closed_by_agent().await;
        let well_formed = match &sent[..] {
            // Remaining length 1: reason code only; 2 or more: reason code, then properties
            // (a one-byte property length and that many bytes).
            [0xE0, 1, reason] => *reason == code as u8,
            [0xE0, len, reason, props_len, rest @ ..] => {
                *reason == code as u8
                    && usize::from(*len) == 2 + usize::from(*props_len)
                    && rest.len() == usize::from(*props_len)
            }
            _ => false,
        };
        assert!(
            well_formed,
            "expected one DISCONNECT {code:?} (0x{:02x}) before the close, got {sent:02x?}",
            code as u8
        );
    }
}

/// Opens a connection and completes an MQTT 3.1.1 CONNECT with `clean_session`.
pub async fn connect_v4(addr: SocketAddr, client_id: &str, clean_session: bool) -> (RawConn, v4::ConnAck) {
    let mut conn = RawConn::open(addr).await;
    let mut connect = v4::Connect::new(client_id);
    connect.clean_session = clean_session;
    connect.keep_alive = 60;
    conn.send_v4(v4::Packet::Connect(connect)).await;
    match conn.recv_v4().await {
        v4::Packet::ConnAck(ack) => (conn, ack),
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

/// Opens a connection and completes an MQTT 3.1.1 CONNECT that must succeed.
pub async fn connect_ok_v4(addr: SocketAddr, client_id: &str) -> RawConn {
    let (conn, ack) = connect_v4(addr, client_id, true).await;
    assert_eq!(ack.code, v4::ConnectReturnCode::Success, "CONNACK code");
    conn
}

/// Opens a connection and completes an MQTT 5 CONNECT (clean start).
pub async fn connect_v5(addr: SocketAddr, client_id: &str) -> (RawConn, v5::ConnAck) {
    let mut conn = RawConn::open(addr).await;
    let connect = v5::Connect { keep_alive: 60, client_id: client_id.into(), clean_start: true, properties: None };
    conn.send_v5(v5::Packet::Connect(connect, None, None)).await;
    match conn.recv_v5().await {
        v5::Packet::ConnAck(ack) => (conn, ack),
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

/// Opens a connection and completes an MQTT 5 CONNECT with `clean_start` and a session
/// expiry interval (seconds; `None`: the session ends with the connection).
pub async fn connect_v5_session(
    addr: SocketAddr,
    client_id: &str,
    clean_start: bool,
    session_expiry: Option<u32>,
) -> (RawConn, v5::ConnAck) {
    let mut conn = RawConn::open(addr).await;
    let properties = session_expiry
        .map(|e| v5::ConnectProperties { session_expiry_interval: Some(e), ..v5::ConnectProperties::new() });
    let connect = v5::Connect { keep_alive: 60, client_id: client_id.into(), clean_start, properties };
    conn.send_v5(v5::Packet::Connect(connect, None, None)).await;
    match conn.recv_v5().await {
        v5::Packet::ConnAck(ack) => (conn, ack),
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

/// Opens a connection and completes an MQTT 5 CONNECT that must succeed.
pub async fn connect_ok_v5(addr: SocketAddr, client_id: &str) -> RawConn {
    let (conn, ack) = connect_v5(addr, client_id).await;
    assert_eq!(ack.code, v5::ConnectReturnCode::Success, "CONNACK code");
    conn
}

/// An MQTT 3.1.1 PUBLISH. `pkid` is ignored for QoS 0.
pub fn publish_v4(topic: &str, qos: QoS4, pkid: u16, payload: impl Into<Vec<u8>>) -> v4::Packet {
    let mut p = v4::Publish::new(topic, qos, payload);
    p.pkid = if qos == QoS4::AtMostOnce { 0 } else { pkid };
    v4::Packet::Publish(p)
}

/// An MQTT 5 PUBLISH. `pkid` is ignored for QoS 0.
pub fn publish_v5(topic: &str, qos: QoS5, pkid: u16, payload: impl Into<Vec<u8>>) -> v5::Packet {
    let mut p = v5::Publish::new(topic, qos, Bytes::from(payload.into()), None);
    p.pkid = if qos == QoS5::AtMostOnce { 0 } else { pkid };
    v5::Packet::Publish(p)
}

/// Receives a v4 PUBACK and checks its packet id.
pub async fn expect_puback_v4(conn: &mut RawConn, pkid: u16) {
    match conn.recv_v4().await {
        v4::Packet::PubAck(ack) => assert_eq!(ack.pkid, pkid, "PUBACK packet id"),
        other => panic!("expected PUBACK {pkid}, got {other:?}"),
    }
}

/// Receives a v5 PUBACK and checks its packet id and reason code.
pub async fn expect_puback_v5(conn: &mut RawConn, pkid: u16, reason: v5::PubAckReason) {
    match conn.recv_v5().await {
        v5::Packet::PubAck(ack) => {
            assert_eq!(ack.pkid, pkid, "PUBACK packet id");
            assert_eq!(ack.reason, reason, "PUBACK reason for packet {pkid}");
        }
        other => panic!("expected PUBACK {pkid} ({reason:?}), got {other:?}"),
    }
}

/// A hand-built CONNECT (3.1.1 layout) with any protocol name and level, for versions
/// rumqttc cannot encode (`MQIsdp`/3, `MQTT`/6).
pub fn raw_connect(protocol_name: &str, level: u8, client_id: &str) -> Vec<u8> {
    raw_connect_flags(protocol_name, level, client_id, 0x02) // clean session
}

/// [`raw_connect`] with any connect flags byte (e.g. the reserved bit 0 set).
pub fn raw_connect_flags(protocol_name: &str, level: u8, client_id: &str, flags: u8) -> Vec<u8> {
    let mut var = Vec::new();
    var.extend_from_slice(&(protocol_name.len() as u16).to_be_bytes());
    var.extend_from_slice(protocol_name.as_bytes());
    var.push(level);
    var.push(flags);
    var.extend_from_slice(&60u16.to_be_bytes()); // keep alive
    var.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    var.extend_from_slice(client_id.as_bytes());
    assert!(var.len() < 128, "one-byte remaining length only");
    let mut packet = vec![0x10, var.len() as u8];
    packet.extend_from_slice(&var);
    packet
}
