//! Forwarding: sends outbox batches over MQTT and removes them only when acknowledged.
//!
//! Two tasks cooperate:
//!
//! * the **event-loop task** polls rumqttc's `EventLoop` nonstop (nothing is sent, acked
//!   or reconnected otherwise), reconnects with capped, jittered exponential backoff, and
//!   turns the events that matter into [`LinkEvent`]s;
//! * the **forwarder** keeps a window of batches in flight ([`window::Window`]), loads
//!   each from the store when it is sent (a batch is a range of reading ids, see
//!   [`crate::store`]), sends it through the mode's [`Sink`], and reacts to
//!   acknowledgements, reconnects, hub announcements and timeouts.
//!
//! In `hub` mode a batch is acknowledged by the hub's [`HubMessage::AckV1`], published
//! after the hub committed it; the broker's PUBACK means nothing here. In `json` mode the
//! broker's PUBACK of every message of the batch is the acknowledgement.
//!
//! With `forward.hub_keys` set, the event-loop task acts on a hub message (ack, desired
//! state, online announcement) only if it is signed by a pinned hub key for the topic it
//! arrived on ([`HubAuth`]): anyone else who can publish on the broker could otherwise
//! make the agent delete batches the hub never stored.
//!
//! rumqttc keeps unacknowledged publishes only in memory and, with a clean session, drops
//! them on reconnect. That is fine: the outbox in SQLite is the source of truth, and after
//! every (re)connect the forwarder starts again from the oldest unacknowledged batch. The
//! hub deduplicates on (agent, epoch, seq), so re-sends are harmless.

mod window;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use std::borrow::Cow;

use brume_protocol::{AgentMessage, Batch, HubKind, HubMessage, Value, topics};
use brume_protocol::{AgentStatus, Desired, DesiredState, ModuleHealth, StatusExtV2, StatusV1};
use brume_signing::{KeyId, Keyring, SignatureError};
use rand::Rng;
use rumqttc::{AsyncClient, Event, EventLoop, LastWill, MqttOptions, Outgoing, Packet, QoS};

use crate::modules::SharedModuleStatus;
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ForwardMode, JsonGranularity};
use crate::metrics::Metrics;
use crate::store::writer::StoreHandle;

/// What the event-loop task reports to the forwarder.
#[derive(Debug)]
enum LinkEvent {
    Connected,
    Disconnected,
    /// Hub mode: the hub committed these batches.
    HubAck {
        epoch: u64,
        seqs: Vec<u64>,
    },
    /// Hub mode: a hub (re)subscribed at this time (its clock); what the broker received
    /// before may have been dropped.
    HubOnline(i64),
    /// JSON mode: rumqttc assigned this packet id to the next outgoing publish.
    Published(u16),
    /// JSON mode: the broker acknowledged this packet id.
    PubAck(u16),
}

/// Forwarding state shown in the agent's JSON status.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ForwardStatus {
    /// Connected to the cloud broker.
    pub connected: bool,
    /// Batches sent and awaiting acknowledgement.
    pub in_flight: usize,
    /// Readings acknowledged per second over the last 10 s (drain rate).
    pub acked_readings_per_s: f64,
    /// Last connection error, if any.
    pub last_error: Option<String>,
}

/// Shared, lock-protected forwarding status.
pub type SharedForwardStatus = Arc<Mutex<ForwardStatus>>;

/// The forwarder's side of the control plane (hub mode with `fleet.hub_url` set): the
/// forwarding connection also carries the hub's desired states in and the agent's module
/// reports out (see [`crate::fleet`]).
pub struct FleetLink {
    /// Desired states received on `brume/v1/agents/<id>/desired`: replaced only by a
    /// higher generation, so a stale retained message arriving late changes nothing.
    pub desired: watch::Sender<Option<Desired>>,
    /// The latest report, published retained when it changes and after every connect.
    pub reports: watch::Receiver<Option<Vec<u8>>>,
}

/// Runs forwarding until `shutdown` is cancelled.
pub async fn run(
    cfg: Config,
    store: StoreHandle,
    metrics: Arc<Metrics>,
    status: SharedForwardStatus,
    modules: SharedModuleStatus,
    fleet: Option<FleetLink>,
    shutdown: CancellationToken,
) {
    let f = &cfg.forward;
    if f.mode == ForwardMode::Off {
        return;
    }
    let presence = Presence {
        agent_id: cfg.agent_id.clone(),
        labels: cfg.labels.iter().map(|(k, v)| (k.clone(), v.clone())).chain(crate::platform_labels()).collect(),
        started_ms: now_ms(),
        heartbeat: f.heartbeat,
        modules,
    };
    if f.mode == ForwardMode::Hub && f.hub_keys.is_empty() {
        tracing::warn!(
            "forward.hub_keys is empty: acknowledgements and desired states are not authenticated, so any client \
             of the broker can make this agent drop batches from its outbox; pin the hubs' key (cloud-hub keygen)"
        );
    }
    let client_id = if f.client_id.is_empty() { format!("brume-agent-{}", cfg.agent_id) } else { f.client_id.clone() };
    let mut opts = MqttOptions::new(client_id, f.host.clone(), f.port);
    if set_mqtt_tls(&mut opts, f.tls.as_ref(), "forward.tls").is_err() {
        return; // not forwarding: readings stay in the store
    }
    opts.set_keep_alive(f.keep_alive);
    opts.set_clean_session(true);
    // Incoming: acks are small; a desired state (up to 64 modules with their configs)
    // can be megabytes.
    let incoming = if fleet.is_some() { brume_protocol::limits::MAX_MESSAGE_BYTES + 1024 } else { 64 * 1024 };
    opts.set_max_packet_size(incoming, brume_protocol::limits::MAX_MESSAGE_BYTES);
    // Per-reading JSON mode has many messages per batch in flight.
    let inflight = if f.mode == ForwardMode::Json { 1000 } else { f.window.max(1) };
    opts.set_inflight(inflight.min(u16::MAX as usize) as u16);
    if f.mode == ForwardMode::Hub {
        // The broker announces an agent that vanishes (crash, power cut, lost link).
        let will = presence.message(false, &store.snapshot().borrow());
        opts.set_last_will(LastWill::new(topics::status(&cfg.agent_id), will, QoS::AtLeastOnce, true));
    }
    let (client, eventloop) = AsyncClient::new(opts, inflight + 16);
    let (ev_tx, ev_rx) = mpsc::channel(1024);
    let (desired, reports) = match fleet {
        Some(f) => (Some(f.desired), Some(f.reports)),
        None => (None, None),
    };
    let link = tokio::spawn(event_loop_task(
        eventloop,
        ev_tx,
        cfg.clone(),
        metrics.clone(),
        status.clone(),
        desired,
        shutdown.clone(),
    ));
    let mut fwd = Forwarder::new(cfg, store, client.clone(), metrics, status, presence, reports);
    fwd.run(ev_rx, shutdown).await;
    fwd.publish_presence(false).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), client.disconnect()).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), link).await;
}

async fn event_loop_task(
    mut eventloop: EventLoop,
    tx: mpsc::Sender<LinkEvent>,
    cfg: Config,
    metrics: Arc<Metrics>,
    status: SharedForwardStatus,
    desired: Option<watch::Sender<Option<Desired>>>,
    shutdown: CancellationToken,
) {
    let ack_topic = topics::acks(&cfg.agent_id);
    let desired_topic = topics::desired(&cfg.agent_id);
    // Parsed when the config was validated.
    let auth = HubAuth { keys: Keyring::parse(&cfg.forward.hub_keys).unwrap_or_default() };
    // Rejections are counted each; logged as a warning at most every 10 s, so a flood of
    // forgeries cannot flood the log (and the flash it is written to).
    let mut last_warned_rejection: Option<Instant> = None;
    let mut open = |kind: HubKind, topic: &str, payload: &'_ [u8]| -> Option<Vec<u8>> {
        match auth.open(kind, topic, payload) {
            Ok(m) => Some(m.into_owned()),
            Err(reason) => {
                metrics.hub_messages_rejected.get_or_create(&[("kind", kind.as_str()), ("reason", reason)]).inc();
                if last_warned_rejection.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                    last_warned_rejection = Some(Instant::now());
                    tracing::warn!(
                        topic,
                        reason,
                        "dropping a hub message that is not verifiably from a trusted hub \
                         (further ones for 10 s only counted in brume_agent_hub_messages_rejected_total)"
                    );
                } else {
                    tracing::debug!(topic, reason, "dropping a hub message that is not verifiably from a trusted hub");
                }
                None
            }
        }
    };
    let json = cfg.forward.mode == ForwardMode::Json;
    let mut backoff = cfg.forward.reconnect_min;
    let mut connected = false;
    // The last connection error logged as a warning: a new kind of failure (refused, a
    // certificate the broker rejects or that does not verify) is reported once, repeats
    // at debug level.
    let mut last_warned: Option<String> = None;
    loop {
        let ev = tokio::select! {
            _ = shutdown.cancelled() => break,
            ev = eventloop.poll() => ev,
        };
        let link = match ev {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                tracing::info!(host = %cfg.forward.host, port = cfg.forward.port, "connected to cloud broker");
                backoff = cfg.forward.reconnect_min;
                connected = true;
                last_warned = None;
                metrics.connected.set(1);
                status.lock().unwrap_or_else(|e| e.into_inner()).last_error = None;
                Some(LinkEvent::Connected)
            }
            Ok(Event::Incoming(Packet::Publish(p))) if p.topic == topics::HUB_ONLINE => {
                open(HubKind::Announcement, &p.topic, &p.payload).and_then(|m| {
                    match brume_protocol::HubAnnouncement::decode(&m) {
                        Ok(brume_protocol::HubAnnouncement::OnlineV1(o)) => Some(LinkEvent::HubOnline(o.subscribed_ms)),
                        Ok(brume_protocol::HubAnnouncement::SignedV1(_)) => None, // refused by `open`
                        Err(e) => {
                            tracing::warn!(error = %e, "ignoring undecodable hub announcement");
                            None
                        }
                    }
                })
            }
            Ok(Event::Incoming(Packet::Publish(p))) if p.topic == ack_topic => {
                open(HubKind::Ack, &p.topic, &p.payload).and_then(|m| match HubMessage::decode(&m) {
                    Ok(HubMessage::AckV1(a)) => Some(LinkEvent::HubAck { epoch: a.epoch, seqs: a.seqs }),
                    Ok(HubMessage::SignedV1(_)) => None, // refused by `open`
                    Err(e) => {
                        tracing::warn!(error = %e, "ignoring undecodable acknowledgement from the hub");
                        None
                    }
                })
            }
            Ok(Event::Incoming(Packet::Publish(p))) if p.topic == desired_topic => {
                if let Some(d) = &desired
                    && let Some(m) = open(HubKind::Desired, &p.topic, &p.payload)
                {
                    take_desired(d, &cfg.agent_id, &m, &metrics);
                }
                None
            }
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) if json => Some(LinkEvent::Published(pkid)),
            Ok(Event::Incoming(Packet::PubAck(a))) if json => Some(LinkEvent::PubAck(a.pkid)),
            Ok(_) => None,
            Err(e) => {
                if connected {
                    tracing::warn!(error = %e, "lost connection to cloud broker; buffering locally");
                    connected = false;
                    metrics.connected.set(0);
                    let _ = tx.send(LinkEvent::Disconnected).await;
                } else if last_warned.as_deref() != Some(&e.to_string()) {
                    tracing::warn!(
                        error = %e,
                        host = %cfg.forward.host,
                        port = cfg.forward.port,
                        tls = cfg.forward.tls.is_some(),
                        "cannot connect to cloud broker; buffering locally and retrying"
                    );
                    last_warned = Some(e.to_string());
                } else {
                    tracing::debug!(error = %e, "cloud broker still unreachable");
                }
                status.lock().unwrap_or_else(|e| e.into_inner()).last_error = Some(e.to_string());
                metrics.reconnects.inc();
                // Capped exponential backoff with full jitter in [0, backoff]: with the
                // default cap (2 s) a returning broker is found within about 2 s, and a
                // fleet that lost it together comes back spread over that time.
                let jittered = backoff.mul_f64(rand::rng().random_range(0.0..=1.0));
                backoff = (backoff * 2).min(cfg.forward.reconnect_max);
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(jittered) => {}
                }
                None
            }
        };
        if let Some(link) = link
            && tx.send(link).await.is_err()
        {
            break;
        }
    }
    metrics.connected.set(0);
}

/// Puts `opts` on TLS when `tls` is set (`key` names its config table). The files were
/// checked when the config was loaded, but may have gone since: then the error is logged
/// and the connection must not be made.
pub(crate) fn set_mqtt_tls(opts: &mut MqttOptions, tls: Option<&brume_tls::ClientTls>, key: &str) -> Result<(), ()> {
    let Some(tls) = tls else { return Ok(()) };
    match tls.client_config() {
        Ok(c) => {
            opts.set_transport(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(c)));
            Ok(())
        }
        Err(e) => {
            tracing::error!(error = %e, key, "TLS settings unusable; not connecting");
            Err(())
        }
    }
}

/// Checks that hub messages come from a trusted hub (`forward.hub_keys`).
struct HubAuth {
    /// The pinned hub keys; empty: nothing is verified.
    keys: Keyring,
}

impl HubAuth {
    /// The unsigned message to act on in `payload`, received on `topic`, or why it is
    /// dropped (a metric label). With pinned keys only a signed message that one of them
    /// verifies for this topic passes; without, any message passes, a signed one unverified.
    fn open<'a>(&self, kind: HubKind, topic: &str, payload: &'a [u8]) -> Result<Cow<'a, [u8]>, &'static str> {
        match kind.signed_part(payload) {
            Err(_) => Err("malformed"),
            Ok(None) if self.keys.is_empty() => Ok(Cow::Borrowed(payload)),
            Ok(None) => Err("unsigned"),
            Ok(Some(s)) if self.keys.is_empty() => Ok(Cow::Owned(s.message)),
            Ok(Some(s)) => match self.keys.verify_hub_message(topic, &s.message, KeyId(s.key_id), &s.signature) {
                Ok(_) => Ok(Cow::Owned(s.message)),
                Err(SignatureError::UntrustedKey { .. }) => Err("untrusted_key"),
                Err(_) => Err("bad_signature"),
            },
        }
    }
}

/// Keeps a desired state if it is for this agent and newer than the one held. Never
/// blocks: runs in the event loop task.
fn take_desired(d: &watch::Sender<Option<Desired>>, agent_id: &str, payload: &[u8], metrics: &Metrics) {
    match DesiredState::decode(payload) {
        Ok(new) if new.agent_id == agent_id => {
            let taken = d.send_if_modified(|held| {
                // An equal generation is taken again: the fleet task filters what it has
                // applied, and may need it again after failing to persist it.
                if held.as_ref().is_some_and(|h| h.generation > new.generation) {
                    return false;
                }
                *held = Some(new.clone());
                true
            });
            metrics.desired_states.get_or_create(&[("result", if taken { "taken" } else { "stale" })]).inc();
        }
        Ok(other) => {
            metrics.desired_states.get_or_create(&[("result", "rejected")]).inc();
            tracing::warn!(payload_agent_id = %other.agent_id, "desired state for another agent; ignored");
        }
        Err(e) => {
            metrics.desired_states.get_or_create(&[("result", "rejected")]).inc();
            tracing::warn!(error = %e, "undecodable desired state; ignored");
        }
    }
}

/// What the agent says about itself on its status topic.
struct Presence {
    agent_id: String,
    labels: Vec<(String, String)>,
    started_ms: i64,
    heartbeat: Duration,
    modules: SharedModuleStatus,
}

impl Presence {
    fn message(&self, online: bool, snap: &crate::store::StoreSnapshot) -> Vec<u8> {
        let label = |s: &str| {
            let mut end = s.len().min(brume_protocol::MAX_STATUS_LABEL);
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            s[..end].to_owned()
        };
        let modules = self
            .modules
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .take(brume_protocol::MAX_STATUS_MODULES)
            .map(|m| ModuleHealth {
                name: label(&m.name),
                sha256: m.hash.clone().unwrap_or_default(),
                enabled: m.enabled,
                batches_failed: m.batches_failed,
                last_error: label(m.last_error.as_deref().unwrap_or("")),
            })
            .collect();
        AgentStatus::V2(
            StatusV1 {
                agent_id: self.agent_id.clone(),
                online,
                version: env!("CARGO_PKG_VERSION").into(),
                started_ms: self.started_ms,
                sent_ms: now_ms(),
                heartbeat_s: self.heartbeat.as_secs().try_into().unwrap_or(u32::MAX),
                store_readings: snap.readings,
                outbox_batches: snap.outbox_batches,
                outbox_readings: snap.outbox_readings,
                modules,
                labels: self.labels.clone(),
            },
            StatusExtV2 { oldest_outbox_ms: snap.oldest_created_ms },
        )
        .encode()
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// How batches leave and how they come back acknowledged: one per forwarding mode.
enum Sink {
    /// Hub mode: one postcard `BatchV2` per batch (`BatchV3` when it carries re-processed
    /// results); acknowledged by the hub's `AckV1`.
    Hub,
    /// JSON mode: plain JSON messages; acknowledged by the broker's PUBACKs of all of them.
    Json(JsonSink),
}

/// JSON mode's bookkeeping: which broker packet ids belong to which batch. rumqttc
/// assigns packet ids in publish order and reports each (`Outgoing::Publish`), so the
/// batches of publishes not yet given an id wait in a queue.
#[derive(Default)]
struct JsonSink {
    /// Sequence numbers of publishes not yet given a packet id, in order.
    unassigned: VecDeque<u64>,
    /// Packet id → batch.
    pkids: HashMap<u16, u64>,
    /// Messages of a batch still awaiting PUBACK.
    remaining: HashMap<u64, usize>,
}

impl JsonSink {
    /// rumqttc gave the next publish this packet id.
    fn assigned(&mut self, pkid: u16) {
        if let Some(seq) = self.unassigned.pop_front() {
            self.pkids.insert(pkid, seq);
        }
    }

    /// The broker acknowledged `pkid`; returns the batch if that was its last message.
    fn puback(&mut self, pkid: u16) -> Option<u64> {
        let seq = self.pkids.remove(&pkid)?;
        let n = self.remaining.get_mut(&seq)?;
        *n -= 1;
        (*n == 0).then(|| {
            self.remaining.remove(&seq);
            seq
        })
    }

    /// Batches from `first` on are sent again: late PUBACKs of the abandoned publishes
    /// must not count for the new ones.
    fn forget_from(&mut self, first: u64) {
        self.pkids.retain(|_, s| *s < first);
        self.remaining.retain(|s, _| *s < first);
        self.unassigned.retain(|s| *s < first);
    }
}

/// Sends outbox batches through a [`Sink`] within a [`window::Window`], and turns link
/// events into acknowledgements, rewinds and re-sends.
struct Forwarder {
    /// What the agent tells the hub about itself (heartbeat, last will).
    presence: Presence,
    /// The agent's config (`[forward]` mostly).
    cfg: Config,
    /// Where batches are read from and acks recorded.
    store: StoreHandle,
    /// rumqttc's request queue; its event loop runs in `event_loop_task`, which owns it.
    client: AsyncClient,
    /// The agent's metrics.
    metrics: Arc<Metrics>,
    /// What `/api/v1/status` shows about the link; locked briefly, never across `.await`.
    status: SharedForwardStatus,
    /// The store's epoch, stamped on every batch.
    epoch: u64,
    /// Whether the broker connection is up (from the event loop's events).
    connected: bool,
    /// Batches in flight in this session.
    window: window::Window,
    /// Publishes a batch in the configured mode (hub batches or JSON).
    sink: Sink,
    /// Recent (time, readings acknowledged), for the drain rate.
    recent_acks: VecDeque<(Instant, u64)>,
    /// The last hub announcement seen (`HubOnlineV1::subscribed_ms`): a different one means
    /// a hub subscribed again, and batches in flight may have been dropped meanwhile.
    hub_online: Option<i64>,
    /// The fleet task's latest module report (hub mode with fleet on).
    reports: Option<watch::Receiver<Option<Vec<u8>>>>,
}

impl Forwarder {
    fn new(
        cfg: Config,
        store: StoreHandle,
        client: AsyncClient,
        metrics: Arc<Metrics>,
        status: SharedForwardStatus,
        presence: Presence,
        reports: Option<watch::Receiver<Option<Vec<u8>>>>,
    ) -> Self {
        let epoch = store.snapshot().borrow().epoch;
        let sink = match cfg.forward.mode {
            ForwardMode::Json => Sink::Json(JsonSink::default()),
            // `run` returns before building a forwarder when forwarding is off.
            ForwardMode::Hub | ForwardMode::Off => Sink::Hub,
        };
        Forwarder {
            presence,
            window: window::Window::new(cfg.forward.window, cfg.forward.ack_timeout),
            sink,
            cfg,
            store,
            client,
            metrics,
            status,
            epoch,
            connected: false,
            recent_acks: VecDeque::new(),
            hub_online: None,
            reports,
        }
    }

    async fn run(&mut self, mut events: mpsc::Receiver<LinkEvent>, shutdown: CancellationToken) {
        let mut snapshot = self.store.snapshot();
        let tick_every = (self.cfg.forward.ack_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
        let mut tick = tokio::time::interval(tick_every);
        let mut heartbeat = tokio::time::interval(self.presence.heartbeat);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut reports = self.reports.clone();
        loop {
            let report_changed = async {
                let changed = match reports.as_mut() {
                    Some(r) => r.changed().await.is_ok(),
                    None => false,
                };
                if !changed {
                    std::future::pending::<()>().await
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = heartbeat.tick() => self.publish_presence(true).await,
                _ = report_changed => self.publish_report().await,
                ev = events.recv() => match ev {
                    Some(ev) => self.on_event(ev).await,
                    None => break,
                },
                changed = snapshot.changed() => {
                    if changed.is_err() { break; }
                    self.fill().await;
                }
                _ = tick.tick() => {
                    self.resend_timed_out();
                    self.fill().await;
                    self.update_status();
                }
            }
        }
    }

    /// Publishes the latest module report, retained, while connected (every connect
    /// publishes it again, so a report made while offline is not lost).
    async fn publish_report(&self) {
        let Some(r) = &self.reports else { return };
        let msg = r.borrow().clone();
        if let Some(msg) = msg
            && self.connected
        {
            let _ = self.client.publish(topics::report(&self.cfg.agent_id), QoS::AtLeastOnce, true, msg).await;
        }
    }

    /// Hub mode, while connected: publishes the agent's presence, retained.
    async fn publish_presence(&self, online: bool) {
        if !matches!(self.sink, Sink::Hub) || !self.connected {
            return;
        }
        let msg = self.presence.message(online, &self.store.snapshot().borrow());
        let _ = self.client.publish(topics::status(&self.cfg.agent_id), QoS::AtLeastOnce, true, msg).await;
    }

    async fn on_event(&mut self, ev: LinkEvent) {
        match ev {
            LinkEvent::Connected => {
                self.connected = true;
                self.restart();
                if matches!(self.sink, Sink::Hub) {
                    // Clean session: subscribe again on every connect. The request is queued
                    // before any publish, so the broker has the subscription before the hub
                    // can answer.
                    let _ = self.client.subscribe(topics::acks(&self.cfg.agent_id), QoS::AtLeastOnce).await;
                    let _ = self.client.subscribe(topics::HUB_ONLINE, QoS::AtLeastOnce).await;
                    if self.reports.is_some() {
                        let _ = self.client.subscribe(topics::desired(&self.cfg.agent_id), QoS::AtLeastOnce).await;
                    }
                }
                // Replaces the last will the broker may have published while we were away.
                self.publish_presence(true).await;
                self.publish_report().await;
                self.fill().await;
            }
            LinkEvent::Disconnected => {
                self.connected = false;
                self.restart();
            }
            LinkEvent::HubOnline(at) => {
                // The first one seen is a baseline (usually the retained message, delivered
                // on subscribe). A new one means a hub subscribed again: batches the broker
                // received while no hub listened were dropped, so everything in flight goes
                // again now rather than after `ack_timeout`. Duplicates are harmless.
                let before = self.hub_online.replace(at);
                if before.is_some_and(|b| b != at) && self.window.len() > 0 {
                    tracing::info!(batches = self.window.len(), "a hub subscribed again; re-sending batches in flight");
                    self.metrics.batches_resent.inc_by(self.window.len() as u64);
                    self.restart();
                    self.fill().await;
                }
            }
            LinkEvent::HubAck { epoch, seqs } => {
                if epoch != self.epoch {
                    tracing::warn!(epoch, ours = self.epoch, "acknowledgement for another store epoch ignored");
                    return;
                }
                self.acked(seqs).await;
                self.fill().await;
            }
            LinkEvent::Published(pkid) => {
                if let Sink::Json(j) = &mut self.sink {
                    j.assigned(pkid);
                }
            }
            LinkEvent::PubAck(pkid) => {
                let done = match &mut self.sink {
                    Sink::Json(j) => j.puback(pkid),
                    Sink::Hub => None,
                };
                if let Some(seq) = done {
                    self.acked(vec![seq]).await;
                    self.fill().await;
                }
            }
        }
    }

    /// Forgets the session: every unacknowledged batch is sent again, oldest first.
    fn restart(&mut self) {
        self.window.restart();
        if let Sink::Json(j) = &mut self.sink {
            *j = JsonSink::default();
        }
    }

    async fn acked(&mut self, seqs: Vec<u64>) {
        let readings: u64 = seqs.iter().filter_map(|&s| self.window.acked(s)).sum();
        self.metrics.batches_acked.inc_by(seqs.len() as u64);
        self.metrics.readings_acked.inc_by(readings);
        self.recent_acks.push_back((Instant::now(), readings));
        self.store.ack(seqs).await;
    }

    fn resend_timed_out(&mut self) {
        if let Some((first, count)) = self.window.rewind_expired(Instant::now()) {
            tracing::debug!(first, count, "acknowledgement timed out; re-sending");
            self.metrics.batches_resent.inc_by(count as u64);
            if let Sink::Json(j) = &mut self.sink {
                j.forget_from(first);
            }
        }
    }

    /// Sends batches until the window is full or the outbox has nothing more.
    async fn fill(&mut self) {
        while self.connected && self.window.room() > 0 {
            let room = self.window.room();
            let after = self.window.cursor();
            let epoch = self.epoch;
            let batches = match self
                .store
                .read(move |r| {
                    let seqs = r.pending_seqs(after, room)?;
                    let mut out = Vec::with_capacity(seqs.len());
                    for s in seqs {
                        if let Some(b) = r.load_batch(epoch, s)? {
                            out.push(b);
                        }
                    }
                    Ok(out)
                })
                .await
            {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the outbox; will retry");
                    return;
                }
            };
            if batches.is_empty() {
                return;
            }
            for b in batches {
                if !self.send(b).await {
                    return;
                }
            }
        }
    }

    /// Publishes one batch through the sink. Returns false if the client is gone.
    async fn send(&mut self, b: Batch) -> bool {
        let (seq, n) = (b.seq, b.reading_count() as u64);
        let sent = match &mut self.sink {
            Sink::Hub => {
                let payload = AgentMessage::for_batch(b).encode();
                self.client.publish(topics::batches(&self.cfg.agent_id), QoS::AtLeastOnce, false, payload).await.is_ok()
            }
            Sink::Json(j) => {
                let messages = json_messages(&self.cfg, &b);
                if !messages.is_empty() {
                    j.remaining.insert(seq, messages.len());
                }
                let mut ok = true;
                for (topic, payload) in &messages {
                    j.unassigned.push_back(seq);
                    if self.client.publish(topic.clone(), QoS::AtLeastOnce, false, payload.clone()).await.is_err() {
                        ok = false;
                        break;
                    }
                }
                if ok && messages.is_empty() {
                    // Everything in it was dropped by retention: nothing to publish, done.
                    self.window.sent(seq, n, Instant::now());
                    self.metrics.batches_sent.inc();
                    self.acked(vec![seq]).await;
                    return true;
                }
                ok
            }
        };
        if sent {
            self.window.sent(seq, n, Instant::now());
            self.metrics.batches_sent.inc();
        }
        sent
    }

    fn update_status(&mut self) {
        let now = Instant::now();
        while self.recent_acks.front().is_some_and(|(t, _)| now.duration_since(*t) > Duration::from_secs(10)) {
            self.recent_acks.pop_front();
        }
        let total: u64 = self.recent_acks.iter().map(|(_, n)| n).sum();
        let mut s = self.status.lock().unwrap_or_else(|e| e.into_inner());
        s.connected = self.connected;
        s.in_flight = self.window.len();
        s.acked_readings_per_s = total as f64 / 10.0;
    }
}

/// JSON mode: the messages of one batch, `(topic, payload)`: one per reading or one per
/// batch (`forward.json_granularity`).
fn json_messages(cfg: &Config, b: &Batch) -> Vec<(String, Vec<u8>)> {
    let topic_base = cfg.forward.json_topic.replace("{agent}", &cfg.agent_id);
    let mut messages = Vec::new();
    let mut all = Vec::new();
    for chunk in &b.streams {
        for p in &chunk.points {
            let obj = json_reading(&cfg.agent_id, &chunk.stream, p.ts_ns, &p.fields);
            match cfg.forward.json_granularity {
                JsonGranularity::Reading => {
                    let topic = topic_base.replace("{stream}", &chunk.stream);
                    messages.push((topic, serde_json::to_vec(&obj).expect("JSON encoding")));
                }
                JsonGranularity::Batch => all.push(obj),
            }
        }
    }
    if cfg.forward.json_granularity == JsonGranularity::Batch && !all.is_empty() {
        let body = serde_json::json!({ "agent_id": cfg.agent_id, "seq": b.seq, "readings": all });
        messages.push((topic_base, serde_json::to_vec(&body).expect("JSON encoding")));
    }
    messages
}

/// A reading as JSON: `{"agent_id","stream","ts_ns","fields":{...}}`.
pub fn json_reading(agent: &str, stream: &str, ts_ns: i64, fields: &brume_protocol::FieldsBlob) -> serde_json::Value {
    let mut map = serde_json::Map::new();
    if let Ok(fields) = fields.decode() {
        for f in fields {
            map.insert(f.name, json_value(&f.value));
        }
    }
    serde_json::json!({ "agent_id": agent, "stream": stream, "ts_ns": ts_ns, "fields": map })
}

/// A field value as JSON.
pub fn json_value(v: &Value) -> serde_json::Value {
    match v {
        Value::F64(x) => serde_json::json!(x),
        Value::I64(x) => serde_json::json!(x),
        Value::Bool(x) => serde_json::json!(x),
        Value::Str(x) => serde_json::json!(x),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use brume_protocol::{AckV1, SignedV1};
    use brume_signing::SecretKey;

    fn signed(key: &SecretKey, topic: &str, message: &[u8]) -> Vec<u8> {
        let (key_id, signature) = key.sign_hub_message(topic, message);
        HubKind::Ack.seal(SignedV1 { message: message.to_vec(), key_id: key_id.0, signature: signature.to_vec() })
    }

    #[test]
    fn hub_auth_passes_only_what_a_pinned_key_signed_for_the_topic() {
        let hub = SecretKey::generate();
        let pinned = HubAuth { keys: Keyring::new(vec![hub.public()]) };
        let open = HubAuth { keys: Keyring::default() };
        let topic = topics::acks("a1");
        let ack = HubMessage::AckV1(AckV1 { epoch: 1, seqs: vec![3] }).encode();
        let good = signed(&hub, &topic, &ack);
        assert_eq!(pinned.open(HubKind::Ack, &topic, &good).unwrap(), &ack[..]);
        assert_eq!(pinned.open(HubKind::Ack, &topic, &ack), Err("unsigned"));
        // Signed for another agent's topic, by another key, altered, undecodable.
        assert_eq!(pinned.open(HubKind::Ack, &topics::acks("a2"), &good), Err("bad_signature"));
        let other = signed(&SecretKey::generate(), &topic, &ack);
        assert_eq!(pinned.open(HubKind::Ack, &topic, &other), Err("untrusted_key"));
        let mut altered = good.clone();
        *altered.last_mut().unwrap() ^= 1;
        assert_eq!(pinned.open(HubKind::Ack, &topic, &altered), Err("bad_signature"));
        assert_eq!(pinned.open(HubKind::Ack, &topic, &good[..good.len() - 1]), Err("malformed"));
        // Without pinned keys both forms are read (nothing can be verified).
        assert_eq!(open.open(HubKind::Ack, &topic, &ack).unwrap(), &ack[..]);
        assert_eq!(open.open(HubKind::Ack, &topic, &other).unwrap(), &ack[..]);
    }
}
