//! The MQTT side of the hub: one task that drives rumqttc's `EventLoop` and hands
//! batch publishes to the ingest task, and [`MqttHandle`], through which the ingest task
//! publishes hub acks and acknowledges publishes to the broker.
//!
//! # Why the event loop task never waits on anyone
//!
//! rumqttc does all network IO, keep-alives and reconnects inside `EventLoop::poll`, and
//! the requests the ingest task makes (`publish`, `ack`) travel through a bounded
//! channel that only `poll` drains. If the event loop task ever awaited the ingest task
//! (say, a full delivery queue) while the ingest task awaited room in the request
//! channel, both would stop for good. So the event loop task only uses non-blocking
//! operations: `try_send` to the ingest queue and `try_ack` for overload rejects. The
//! queue is bounded yet never fills in normal operation because deliveries are QoS 1
//! with manual acks: the broker stops sending once its in-flight window for this client
//! (mosquitto: `max_inflight_messages`, 20 by default) is full of unacknowledged
//! publishes, which is far below [`DELIVERY_QUEUE`].
//!
//! # Broker acks and reconnects
//!
//! The hub connects with `clean_session = true`, so after a reconnect the broker has
//! forgotten the old session: packet ids of publishes received on the previous
//! connection mean nothing (or something else) on the new one. Every delivery is
//! therefore tagged with a connection generation, and [`MqttHandle::ack_broker`] drops
//! acks for an older generation. Such publishes are not lost: the hub ack was sent
//! (or the batch is re-sent by the agent, which retries until it gets a hub ack).
//!
//! While the hub is away, the broker drops the batches agents publish (nobody is
//! subscribed). So once both subscriptions are confirmed after a (re)connect, the hub
//! publishes a retained `HubAnnouncement::OnlineV1` on `brume/v1/hub/online`: agents
//! re-send their batches in flight at once instead of after `forward.ack_timeout`.
//! Reconnects back off from 100 ms to at most 2 s with full jitter: a returning broker
//! is found within about 2 s, and a fleet of hubs does not reconnect in the same instant.
//!
//! # Signed messages
//!
//! With `mqtt.signing_key` set, everything the hub publishes to agents (acks, desired
//! states, the online announcement) goes out as a `SignedV1` bound to its topic
//! ([`Sealer`]), so agents that pin the hub's public key act on nothing a broker client
//! forged. [`MqttHandle`] has no untyped publish: every message passes the sealer.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rand::Rng;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Outgoing, Packet, Publish, QoS, Request, Subscribe};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use brume_protocol::{AckV1, HubKind, HubMessage, SignedV1, topics};
use brume_signing::SecretKey;

use crate::config::Config;
use crate::metrics::Metrics;

/// Signs what the hub publishes to agents when it has a key (`mqtt.signing_key`);
/// without one, messages go out unsigned, as before signing existed.
#[derive(Debug, Clone, Default)]
pub struct Sealer(Option<Arc<SecretKey>>);

impl Sealer {
    /// A sealer signing with `key`, or passing messages through unsigned.
    pub fn new(key: Option<SecretKey>) -> Sealer {
        Sealer(key.map(Arc::new))
    }

    /// The payload to publish on `topic` for `message` (an unsigned message of `kind`'s
    /// envelope).
    pub fn seal(&self, kind: HubKind, topic: &str, message: Vec<u8>) -> Vec<u8> {
        match &self.0 {
            None => message,
            Some(key) => {
                let (key_id, signature) = key.sign_hub_message(topic, &message);
                kind.seal(SignedV1 { message, key_id: key_id.0, signature: signature.to_vec() })
            }
        }
    }
}

/// Capacity of the queue from the event loop task to the ingest task, in publishes.
/// See the module docs for why it does not fill in practice.
pub const DELIVERY_QUEUE: usize = 1024;

/// Capacity of rumqttc's request channel (publishes and acks from the hub to the broker).
const REQUEST_CHANNEL: usize = 256;

/// Allowance for the MQTT fixed header, topic and packet id on top of the largest
/// payload the protocol allows ([`brume_protocol::limits::MAX_MESSAGE_BYTES`]).
const PACKET_OVERHEAD: usize = 1024;

/// Largest outgoing packet: a desired state (up to 64 modules with their configuration)
/// can be megabytes; acks are small.
const MAX_OUTGOING_PACKET: usize = brume_protocol::limits::MAX_MESSAGE_BYTES + PACKET_OVERHEAD;

/// First reconnect delay; doubled after every failure up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest reconnect delay: a returning broker is found within about this long.
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// A publish received from the broker, tagged with the connection it arrived on.
#[derive(Debug)]
pub struct Delivery {
    /// The publish, needed to acknowledge it to the broker.
    pub publish: Publish,
    /// Connection generation the publish arrived on.
    pub generation: u64,
}

/// Sends hub acks and broker acks. Cheap to clone.
#[derive(Debug, Clone)]
pub struct MqttHandle {
    client: AsyncClient,
    /// Current connection generation, bumped by the event loop task on every
    /// disconnect and connect.
    generation: Arc<AtomicU64>,
    /// Signs every message to agents (or passes it through without a key).
    sealer: Sealer,
}

impl MqttHandle {
    /// Acknowledges a publish to the broker (PUBACK), unless it arrived on an older
    /// connection (see the module docs). Fails only when the event loop is gone.
    pub async fn ack_broker(&self, d: &Delivery) -> Result<(), rumqttc::ClientError> {
        if d.generation != self.generation.load(Ordering::Acquire) {
            tracing::debug!(pkid = d.publish.pkid, "not acking a publish from an earlier connection");
            return Ok(());
        }
        self.client.ack(&d.publish).await
    }

    /// Publishes an acknowledgement QoS 1 on the agent's ack topic, signed when the hub
    /// has a key. Fails only when the event loop is gone.
    pub async fn publish_ack(&self, agent_id: &str, ack: AckV1) -> Result<(), rumqttc::ClientError> {
        let topic = topics::acks(agent_id);
        let payload = self.sealer.seal(HubKind::Ack, &topic, HubMessage::AckV1(ack).encode());
        self.client.publish(topic, QoS::AtLeastOnce, false, payload).await
    }

    /// Publishes an (unsigned, encoded) desired state QoS 1 and retained on the agent's
    /// desired topic (the broker hands the latest to an agent when it subscribes), signed
    /// when the hub has a key. Fails only when the event loop is gone.
    pub async fn publish_desired(&self, agent_id: &str, message: Vec<u8>) -> Result<(), rumqttc::ClientError> {
        let topic = topics::desired(agent_id);
        let payload = self.sealer.seal(HubKind::Desired, &topic, message);
        self.client.publish(topic, QoS::AtLeastOnce, true, payload).await
    }

    /// Queues a DISCONNECT; the event loop task ends once it has been sent.
    pub async fn disconnect(&self) -> Result<(), rumqttc::ClientError> {
        self.client.disconnect().await
    }
}

/// Builds the client options from the configuration; fails only if `[mqtt.tls]` files
/// cannot be used.
pub fn options(cfg: &Config) -> Result<MqttOptions, brume_tls::TlsError> {
    let client_id = if cfg.mqtt.client_id.is_empty() {
        format!("brume-hub-{:08x}", rand::rng().random::<u32>())
    } else {
        cfg.mqtt.client_id.clone()
    };
    let mut opts = MqttOptions::new(client_id, cfg.mqtt.host.clone(), cfg.mqtt.port);
    opts.set_keep_alive(cfg.mqtt.keep_alive)
        .set_clean_session(true)
        // Acks go to the broker only after the batch is committed (or rejected), so a
        // crash before commit makes the broker's copy the one that survives.
        .set_manual_acks(true)
        .set_max_packet_size(brume_protocol::limits::MAX_MESSAGE_BYTES + PACKET_OVERHEAD, MAX_OUTGOING_PACKET)
        .set_request_channel_capacity(REQUEST_CHANNEL);
    if let Some(tls) = &cfg.mqtt.tls {
        opts.set_transport(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(
            tls.client_config()?,
        )));
    }
    Ok(opts)
}

/// Creates the client and the event loop task's future.
///
/// The returned future runs until `stop` is cancelled or a DISCONNECT queued through
/// [`MqttHandle::disconnect`] has been sent. Deliveries go to the returned receiver.
pub fn start(
    cfg: &Config,
    sealer: Sealer,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) -> Result<(MqttHandle, mpsc::Receiver<Delivery>, impl Future<Output = ()> + Send + 'static), brume_tls::TlsError> {
    let (client, eventloop) = AsyncClient::new(options(cfg)?, REQUEST_CHANNEL);
    let (tx, rx) = mpsc::channel(DELIVERY_QUEUE);
    let generation = Arc::new(AtomicU64::new(0));
    let handle = MqttHandle { client: client.clone(), generation: generation.clone(), sealer: sealer.clone() };
    let driver = EventLoopDriver {
        eventloop,
        client,
        tx,
        generation,
        metrics,
        filter: cfg.batch_filter(),
        status_filter: cfg.status_filter(),
        report_filter: cfg.report_filter(),
        awaiting_subacks: 0,
        sealer,
    };
    Ok((handle, rx, driver.run(stop)))
}

struct EventLoopDriver {
    eventloop: EventLoop,
    /// Used only for non-blocking `try_ack` of publishes dropped on overload.
    client: AsyncClient,
    /// Deliveries to the ingest task; only ever `try_send` (see module docs).
    tx: mpsc::Sender<Delivery>,
    generation: Arc<AtomicU64>,
    metrics: Arc<Metrics>,
    filter: String,
    /// Agents' presence messages.
    status_filter: String,
    /// Agents' module reports.
    report_filter: String,
    /// SUBACKs still expected on the current connection; at 0 the hub announces itself.
    awaiting_subacks: usize,
    /// Signs the announcement.
    sealer: Sealer,
}

impl EventLoopDriver {
    async fn run(mut self, stop: CancellationToken) {
        let mut backoff = BACKOFF_MIN;
        loop {
            // Cancelling `poll` mid-write could leave a half-written packet, but the
            // stop token is only cancelled when the connection is being dropped anyway.
            let event = tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                ev = self.eventloop.poll() => ev,
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    self.generation.fetch_add(1, Ordering::AcqRel);
                    self.metrics.mqtt_connected.set(1);
                    backoff = BACKOFF_MIN;
                    tracing::info!(code = ?ack.code, filter = %self.filter, "connected to MQTT broker, subscribing");
                    // clean_session = true: the broker forgot our subscription, so
                    // subscribe again on every connect. Pushed straight into the event
                    // loop's pending queue (emptied by poll before it returned ConnAck)
                    // because awaiting the request channel from this task could deadlock.
                    for f in [&self.status_filter, &self.report_filter, &self.filter] {
                        self.eventloop
                            .pending
                            .push_front(Request::Subscribe(Subscribe::new(f.clone(), QoS::AtLeastOnce)));
                    }
                    self.awaiting_subacks = 3;
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    if ack.return_codes.iter().any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure)) {
                        tracing::error!(filter = %self.filter, "broker refused the batch subscription");
                    } else {
                        tracing::info!(filter = %self.filter, "subscribed to agent batches");
                    }
                    self.awaiting_subacks = self.awaiting_subacks.saturating_sub(1);
                    if self.awaiting_subacks == 0 {
                        // Subscribed: tell agents to re-send what the broker dropped while
                        // no hub was listening. Queued like the subscriptions (see above).
                        let msg = brume_protocol::HubAnnouncement::OnlineV1(brume_protocol::HubOnlineV1 {
                            subscribed_ms: crate::clock::now_ms(),
                        });
                        let payload = self.sealer.seal(HubKind::Announcement, topics::HUB_ONLINE, msg.encode());
                        let mut p = Publish::new(topics::HUB_ONLINE, QoS::AtLeastOnce, payload);
                        p.retain = true;
                        self.eventloop.pending.push_back(Request::Publish(p));
                    }
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => self.deliver(publish),
                Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                    tracing::info!("disconnected from MQTT broker");
                    break;
                }
                Ok(_) => {}
                Err(err) => {
                    // Acks queued from now on refer to a dead connection: bump the
                    // generation before anything else can be queued.
                    self.generation.fetch_add(1, Ordering::AcqRel);
                    self.metrics.mqtt_connected.set(0);
                    let delay = jitter(backoff);
                    tracing::warn!(error = %err, retry_in = ?delay, "MQTT connection failed");
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(delay) => {}
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
        self.metrics.mqtt_connected.set(0);
    }

    fn deliver(&self, publish: Publish) {
        let generation = self.generation.load(Ordering::Acquire);
        match self.tx.try_send(Delivery { publish, generation }) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(d)) => {
                // Only reachable with QoS 0 floods or a broker ignoring its in-flight
                // window. Drop the batch but ack it so the broker's window stays open;
                // the agent re-sends because it gets no hub ack.
                self.metrics.count_overloaded();
                tracing::warn!(topic = %d.publish.topic, "ingest queue full, dropping batch");
                if let Err(e) = self.client.try_ack(&d.publish) {
                    tracing::warn!(error = %e, "cannot ack dropped batch");
                }
            }
            // The ingest task has stopped (shutdown): leave the publish unacked.
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }
}

/// A random delay in `[0, d]` (full jitter), so hubs that lost the broker together do
/// not reconnect in lockstep.
fn jitter(d: Duration) -> Duration {
    let ms = d.as_millis() as u64;
    Duration::from_millis(rand::rng().random_range(0..=ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_is_full_and_capped() {
        let js: Vec<Duration> = (0..200).map(|_| jitter(Duration::from_millis(400))).collect();
        assert!(js.iter().all(|j| *j <= Duration::from_millis(400)), "{js:?}");
        assert!(js.iter().any(|j| *j < Duration::from_millis(200)), "spread over the whole range: {js:?}");
        assert_eq!(BACKOFF_MAX, Duration::from_secs(2), "a returning broker is found within ~2 s");
    }

    #[test]
    fn options_from_config() {
        let cfg = Config::default();
        let opts = options(&cfg).unwrap();
        assert!(opts.client_id().starts_with("brume-hub-"));
        assert!(opts.manual_acks());
        assert!(opts.clean_session());
        assert!(opts.max_packet_size() >= brume_protocol::limits::MAX_MESSAGE_BYTES);
    }
}
