//! Subscribe mode: consume sensor topics from an existing local broker.
//!
//! The agent holds a persistent session (clean_session = false, fixed client id) with QoS 1
//! subscriptions and manual acknowledgements: a PUBLISH is acknowledged to the broker only
//! after its readings are committed, so the broker keeps (and re-delivers) anything the
//! agent had not yet stored, across agent crashes and restarts. Commits are awaited in
//! order, so PUBACKs go out in the order the publishes arrived, as MQTT requires.
//!
//! A crash after a commit and before its PUBACK makes the broker re-deliver that PUBLISH
//! (`DUP = 1`, same packet identifier) on the next connection. Like the listener's
//! persistent sessions, the agent's own session with the broker is kept in the store
//! (as client `brume-subscribe:<client id>`, see `crate::store::sessions`): each
//! PUBLISH's identifier and digest are committed with its readings, and the re-delivery is
//! acknowledged without being stored again.

use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::payload::{self, PayloadConfig};
use crate::config::SubscribeConfig;
use crate::metrics::Metrics;
use crate::store::writer::{AppendError, StoreHandle};
use crate::store::{PublishId, SessionOp};

/// The MQTT client id of the agent's session with the local broker.
fn opts_client_id(cfg: &SubscribeConfig, agent_id: &str) -> String {
    if cfg.client_id.is_empty() { format!("brume-ingest-{agent_id}") } else { cfg.client_id.clone() }
}

/// Runs subscribe mode until `shutdown`.
pub async fn run(
    cfg: SubscribeConfig,
    agent_id: String,
    payload_cfg: PayloadConfig,
    store: StoreHandle,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let client_id = opts_client_id(&cfg, &agent_id);
    let mut opts = MqttOptions::new(client_id, cfg.host.clone(), cfg.port);
    if crate::forward::set_mqtt_tls(&mut opts, cfg.tls.as_ref(), "subscribe.tls").is_err() {
        return; // not subscribing
    }
    opts.set_clean_session(false);
    opts.set_manual_acks(true);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_max_packet_size(payload_cfg.max_payload_bytes + 4096, 64 * 1024);
    let (client, mut eventloop) = AsyncClient::new(opts, 256);
    // Our session with the broker, as the store tracks sensor sessions: persistent, and
    // "connected" for as long as the agent runs.
    let session: Arc<str> = format!("brume-subscribe:{}", opts_client_id(&cfg, &agent_id)).into();
    if let Err(e) = store.session(SessionOp::Open { client: session.clone(), persistent: true }).await {
        tracing::warn!(error = %e, "cannot record the local broker session; re-deliveries after a crash may be stored twice");
    }
    // Pending verdicts, in arrival order, with the publish to acknowledge.
    //
    // Unbounded on purpose: the loop below polls the `EventLoop`, and the acker's
    // `client.ack()` needs that polling to make progress. If the loop could block on a
    // full queue while the acker blocks on a full request channel, both would stop for
    // good. The queue is bounded in practice by the broker's in-flight window for this
    // session (mosquitto `max_inflight_messages`), since nothing is acknowledged before
    // its commit.
    let (q_tx, mut q_rx) = mpsc::unbounded_channel::<(rumqttc::Publish, Verdict)>();
    let acker_client = client.clone();
    let acker = tokio::spawn(async move {
        while let Some((publish, verdict)) = q_rx.recv().await {
            let ok = match verdict {
                Verdict::Malformed => true, // acknowledge: re-delivery cannot fix it
                Verdict::Pending(v) => matches!(v.await, Ok(Ok(()))),
                Verdict::Failed => false,
            };
            if ok {
                let _ = acker_client.ack(&publish).await;
            } else {
                // Not acknowledged: the broker re-delivers it after we reconnect. Drop the
                // connection now so that happens soon and in order.
                tracing::warn!(topic = %publish.topic, "reading not committed; not acknowledging to the local broker");
                let _ = acker_client.disconnect().await;
            }
        }
    });
    let mut backoff = Duration::from_millis(100);
    loop {
        let ev = tokio::select! {
            _ = shutdown.cancelled() => break,
            ev = eventloop.poll() => ev,
        };
        match ev {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                backoff = Duration::from_millis(100);
                tracing::info!(host = %cfg.host, port = cfg.port, session_present = ack.session_present, "subscribed to local broker");
                for t in &cfg.topics {
                    let _ = client.subscribe(t.clone(), QoS::AtLeastOnce).await;
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let stream = p.topic.strip_prefix(cfg.strip_prefix.as_str()).unwrap_or(&p.topic).to_string();
                let verdict = match payload::parse_mqtt(&stream, &p.payload, crate::now_ns(), &payload_cfg) {
                    Ok(readings) => {
                        metrics.received("subscribe", readings.len() as u64);
                        let id = (p.qos != QoS::AtMostOnce).then(|| PublishId {
                            client: session.clone(),
                            pkid: p.pkid,
                            qos: 1,
                            dup: p.dup,
                            digest: crate::store::sessions::digest(&p.topic, &p.payload),
                        });
                        // Charged to no client: the local broker carries many sensors.
                        match store.submit_publish(readings, None, id).await {
                            Ok(rx) => Verdict::Pending(rx),
                            Err(_) => Verdict::Failed,
                        }
                    }
                    Err(e) => {
                        metrics.bad(e.reason());
                        tracing::warn!(topic = %p.topic, error = %e, "bad payload from local broker; nothing stored");
                        Verdict::Malformed
                    }
                };
                if q_tx.send((p, verdict)).is_err() {
                    break;
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "local broker connection lost; reconnecting");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
    drop(q_tx);
    // Give pending commits a moment to be acknowledged before we disconnect.
    let _ = tokio::time::timeout(Duration::from_secs(5), acker).await;
    let _ = tokio::time::timeout(Duration::from_secs(1), client.disconnect()).await;
}

/// What became of one publish.
enum Verdict {
    /// Not parseable: acknowledged, counted, nothing stored.
    Malformed,
    /// Submitted; the store's verdict arrives here.
    Pending(tokio::sync::oneshot::Receiver<Result<(), AppendError>>),
    /// Could not even be submitted (shutting down): not acknowledged.
    Failed,
}
