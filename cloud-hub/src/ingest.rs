//! The ingest task: validates deliveries, stores them with group commit, then
//! acknowledges them.
//!
//! For every group of deliveries the order is fixed, and it is what makes the hub
//! exactly-once on top of at-least-once MQTT:
//!
//! 1. validate each publish ([`validate`]); rejects are counted, logged and acked to
//!    the broker right away (re-delivering them would not make them valid);
//! 2. store all valid batches in **one** transaction ([`HubStore::ingest`]), which dedups
//!    on `(agent_id, epoch, seq)` and returns only once the commit is durable;
//! 3. publish one `HubMessage::AckV1` per `(agent, epoch)` listing every committed seq,
//!    duplicates included (an agent re-sends precisely because it missed an ack);
//! 4. ack the publishes to the broker.
//!
//! A crash between any two steps loses nothing: before 3 the agent re-sends, after 3 a
//! re-delivery is a duplicate that is acked again. If the commit fails nothing is
//! acknowledged, and the same group is retried with capped backoff until it commits or
//! the hub shuts down.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use brume_protocol::{AckV1, AgentMessage, AgentStatus, Batch, HubMessage, topics, validate_agent_id};
use rand::Rng;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::mqtt::{Delivery, MqttHandle};
use crate::store::{BatchOutcome, HubStore};

/// Earliest reading timestamp accepted (shared with agents, which refuse older ones).
pub const MIN_TS_NS: i64 = brume_protocol::limits::MIN_TS_NS;
/// First reading timestamp refused (shared with agents).
pub const MAX_TS_NS: i64 = brume_protocol::limits::MAX_TS_NS;

/// First delay before retrying a failed transaction.
const RETRY_MIN: Duration = Duration::from_millis(100);
/// Longest delay between transaction retries.
const RETRY_MAX: Duration = Duration::from_secs(10);

/// Why a publish on a batch topic was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    /// The topic does not carry a valid agent id.
    BadTopic,
    /// Not a decodable, valid `AgentMessage`.
    Malformed,
    /// The payload's agent id differs from the topic's.
    AgentMismatch,
    /// A reading's timestamp is before 2000-01-01 or not before 2200-01-01.
    BadTimestamp,
    /// Dropped because the ingest queue was full (see `mqtt` module docs).
    Overloaded,
}

impl Reject {
    /// The `result` label of `brume_hub_batches_total` for this reason.
    pub fn metric_label(self) -> &'static str {
        match self {
            Reject::BadTopic => "rejected_bad_topic",
            Reject::Malformed => "rejected_malformed",
            Reject::AgentMismatch => "rejected_agent_mismatch",
            Reject::BadTimestamp => "rejected_bad_timestamp",
            Reject::Overloaded => "rejected_overloaded",
        }
    }
}

/// Checks one publish: topic, decoding, agent id and timestamps. On refusal returns the
/// reason and a human-readable detail for the log.
pub fn validate(topic: &str, payload: &[u8]) -> Result<Batch, (Reject, String)> {
    let agent = topics::agent_of_batch_topic(topic)
        .ok_or_else(|| (Reject::BadTopic, format!("{topic:?} is not a batch topic")))?;
    validate_agent_id(agent).map_err(|e| (Reject::BadTopic, e.to_string()))?;
    let batch =
        AgentMessage::decode_batch(payload).map_err(|e| (Reject::Malformed, e.to_string()))?;
    if batch.agent_id != agent {
        return Err((
            Reject::AgentMismatch,
            format!(
                "payload agent id {:?} differs from the topic's",
                batch.agent_id
            ),
        ));
    }
    // Sequence numbers are stored as signed 64-bit integers (SQLite and PostgreSQL);
    // nothing legitimate gets near.
    if batch.seq > i64::MAX as u64 {
        return Err((
            Reject::Malformed,
            format!("seq {} is out of range", batch.seq),
        ));
    }
    for chunk in &batch.streams {
        if let Some(p) = chunk
            .points
            .iter()
            .find(|p| !(MIN_TS_NS..MAX_TS_NS).contains(&p.ts_ns))
        {
            return Err((
                Reject::BadTimestamp,
                format!(
                    "stream {:?}: timestamp {} ns is outside 2000-01-01..2200-01-01",
                    chunk.stream, p.ts_ns
                ),
            ));
        }
    }
    Ok(batch)
}

/// Everything the ingest task needs.
pub struct Ingest {
    /// Where batches are stored.
    pub store: Arc<dyn HubStore>,
    /// Hub and broker acks.
    pub mqtt: MqttHandle,
    /// Deliveries from the event loop task.
    pub deliveries: mpsc::Receiver<Delivery>,
    /// Metrics to update.
    pub metrics: Arc<Metrics>,
    /// Most batches per transaction (group commit limit).
    pub max_batches_per_tx: usize,
}

/// A valid batch waiting to be stored, with the delivery to ack afterwards.
struct Pending {
    batch: Batch,
    delivery: Delivery,
}

impl Ingest {
    /// Runs until `shutdown` is cancelled (checked between transactions, so a group in
    /// progress is committed and acknowledged first) or the delivery queue closes.
    pub async fn run(mut self, shutdown: CancellationToken) {
        loop {
            let first = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                d = self.deliveries.recv() => match d {
                    Some(d) => d,
                    None => break,
                },
            };
            // Group commit: take whatever else is already waiting, without waiting for
            // more. Under load groups grow and one fsync covers many batches; when idle
            // every batch commits alone, so grouping never adds latency.
            let mut group = Vec::new();
            if !self.accept(first, &mut group).await {
                break;
            }
            while group.len() < self.max_batches_per_tx {
                let Ok(d) = self.deliveries.try_recv() else {
                    break;
                };
                if !self.accept(d, &mut group).await {
                    return;
                }
            }
            if group.is_empty() {
                continue;
            }
            let (batches, deliveries): (Vec<_>, Vec<_>) =
                group.into_iter().map(|p| (p.batch, p.delivery)).unzip();
            let batches = Arc::new(batches);
            let Some(outcomes) = self.commit(&batches, &shutdown).await else {
                tracing::info!(
                    batches = batches.len(),
                    "shutting down with an uncommitted group; agents will re-send"
                );
                break;
            };
            if !self.acknowledge(&batches, &deliveries, &outcomes).await {
                break;
            }
        }
        tracing::debug!("ingest task stopped");
    }

    /// Validates a delivery: valid batches join the group, rejects are acked at once.
    /// Returns false if the MQTT event loop is gone.
    async fn accept(&self, d: Delivery, group: &mut Vec<Pending>) -> bool {
        if let Some(agent) = topics::agent_of_status_topic(&d.publish.topic) {
            self.record_presence(agent, &d.publish.payload).await;
            return self.mqtt.ack_broker(&d).await.is_ok();
        }
        match validate(&d.publish.topic, &d.publish.payload) {
            Ok(batch) => {
                group.push(Pending { batch, delivery: d });
                true
            }
            Err((reason, detail)) => {
                self.metrics.count_batch(reason.metric_label());
                let agent = topics::agent_of_batch_topic(&d.publish.topic).unwrap_or("?");
                tracing::warn!(agent_id = agent, topic = %d.publish.topic, reason = reason.metric_label(), "rejected batch: {detail}");
                // Acked so the broker does not keep it in flight: no re-delivery can fix it.
                self.mqtt.ack_broker(&d).await.is_ok()
            }
        }
    }

    /// Stores an agent's presence message. Best effort: a message that cannot be stored
    /// is logged and counted, and the next heartbeat (every few seconds) replaces it.
    async fn record_presence(&self, agent: &str, payload: &[u8]) {
        let status = match AgentStatus::decode(payload) {
            Ok(s) if s.agent_id == agent => s,
            Ok(s) => {
                self.metrics.presence_messages.get_or_create(&[("result", "rejected")]).inc();
                tracing::warn!(agent_id = agent, payload_agent_id = %s.agent_id, "presence message for another agent; ignored");
                return;
            }
            Err(e) => {
                self.metrics.presence_messages.get_or_create(&[("result", "rejected")]).inc();
                tracing::warn!(agent_id = agent, error = %e, "malformed presence message; ignored");
                return;
            }
        };
        let store = Arc::clone(&self.store);
        let result = tokio::task::spawn_blocking(move || store.record_presence(&status, now_ms())).await;
        let outcome = match result {
            Ok(Ok(())) => "stored",
            Ok(Err(e)) => {
                tracing::warn!(agent_id = agent, error = %e, "cannot store a presence message; the next heartbeat will replace it");
                "failed"
            }
            Err(e) => {
                tracing::warn!(agent_id = agent, error = %e, "presence task failed");
                "failed"
            }
        };
        self.metrics.presence_messages.get_or_create(&[("result", outcome)]).inc();
    }

    /// Stores the group, retrying until it commits. `None` if shutdown came first.
    async fn commit(
        &self,
        batches: &Arc<Vec<Batch>>,
        shutdown: &CancellationToken,
    ) -> Option<Vec<BatchOutcome>> {
        let mut delay = RETRY_MIN;
        loop {
            let store = Arc::clone(&self.store);
            // An Arc, not a move: if the store panics, the batches are still here to retry.
            let shared = Arc::clone(batches);
            let started = Instant::now();
            let received_ms = now_ms();
            // Stores block (SQLite on fsync, PostgreSQL on its own runtime): keep them
            // off the async worker threads.
            let joined =
                tokio::task::spawn_blocking(move || store.ingest(&shared, received_ms)).await;
            self.metrics
                .ingest_tx_seconds
                .observe(started.elapsed().as_secs_f64());
            let err = match joined {
                Ok(Ok(outcomes)) => return Some(outcomes),
                Ok(Err(e)) => e.to_string(),
                Err(e) => format!("store panicked: {e}"),
            };
            self.metrics.db_errors.inc();
            let wait = jitter(delay);
            tracing::error!(error = %err, batches = batches.len(), retry_in = ?wait, "ingest transaction failed; nothing acknowledged");
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                _ = tokio::time::sleep(wait) => {}
            }
            delay = (delay * 2).min(RETRY_MAX);
        }
    }

    /// Publishes hub acks, then acks the publishes to the broker, and counts outcomes.
    /// Returns false if the MQTT event loop is gone.
    async fn acknowledge(
        &self,
        batches: &[Batch],
        deliveries: &[Delivery],
        outcomes: &[BatchOutcome],
    ) -> bool {
        // One ack per (agent, epoch). BTreeMap for a deterministic order; seqs keep
        // arrival order with repeats removed (the same batch can arrive twice in a group).
        let mut acks: BTreeMap<(&str, u64), Vec<u64>> = BTreeMap::new();
        for (b, outcome) in batches.iter().zip(outcomes) {
            match outcome {
                BatchOutcome::Stored => {
                    self.metrics.count_batch("stored");
                    let late_ms = now_ms().saturating_sub(b.created_ms).max(0);
                    self.metrics.batch_latency_seconds.observe(late_ms as f64 / 1e3);
                    self.metrics
                        .readings_stored
                        .inc_by(b.reading_count() as u64);
                }
                BatchOutcome::Duplicate => self.metrics.count_batch("duplicate"),
            }
            let seqs = acks.entry((b.agent_id.as_str(), b.epoch)).or_default();
            if !seqs.contains(&b.seq) {
                seqs.push(b.seq);
            }
        }
        for ((agent, epoch), seqs) in acks {
            tracing::debug!(agent_id = agent, epoch, ?seqs, "acknowledging batches");
            let msg = HubMessage::AckV1(AckV1 { epoch, seqs }).encode();
            if self.mqtt.publish(topics::acks(agent), msg).await.is_err() {
                return false;
            }
        }
        for d in deliveries {
            if self.mqtt.ack_broker(d).await.is_err() {
                return false;
            }
        }
        true
    }
}

/// A random delay in `[d/2, d]`.
fn jitter(d: Duration) -> Duration {
    let ms = d.as_millis() as u64;
    Duration::from_millis(rand::rng().random_range(ms / 2..=ms))
}

/// Wall-clock time, ms since the Unix epoch (0 if the clock is before 1970).
pub(crate) fn now_ms() -> i64 {
    now_ns() / 1_000_000
}

/// Wall-clock time, ns since the Unix epoch (0 if the clock is before 1970).
pub(crate) fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use brume_protocol::{Field, FieldsBlob, Point, StreamChunk, Value};

    fn batch(agent: &str, ts_ns: i64) -> Batch {
        Batch {
            agent_id: agent.into(),
            epoch: 1,
            seq: 1,
            created_ms: 0,
            streams: vec![StreamChunk {
                stream: "s".into(),
                points: vec![Point {
                    ts_ns,
                    fields: FieldsBlob::encode(&[Field {
                        name: "v".into(),
                        value: Value::F64(1.0),
                    }])
                    .unwrap(),
                }],
            }],
            losses: vec![],
            lineage: vec![],
        }
    }

    fn check(topic: &str, payload: &[u8]) -> Result<(), Reject> {
        validate(topic, payload).map(|_| ()).map_err(|(r, _)| r)
    }

    #[test]
    fn every_reject_label_is_preregistered() {
        for r in [
            Reject::BadTopic,
            Reject::Malformed,
            Reject::AgentMismatch,
            Reject::BadTimestamp,
            Reject::Overloaded,
        ] {
            assert!(
                crate::metrics::ALL_RESULTS.contains(&r.metric_label()),
                "{r:?}"
            );
        }
        let text = crate::metrics::Metrics::new().encode();
        assert!(
            text.contains("brume_hub_batches_total{result=\"rejected_malformed\"} 0"),
            "{text}"
        );
    }

    #[test]
    fn validation_reasons() {
        let ok_ts = MIN_TS_NS + 1;
        let good = AgentMessage::BatchV2(batch("a1", ok_ts)).encode();
        assert_eq!(check("brume/v1/agents/a1/batches", &good), Ok(()));
        assert_eq!(
            check("brume/v1/agents/a2/batches", &good),
            Err(Reject::AgentMismatch)
        );
        assert_eq!(
            check("brume/v1/agents/a 1/batches", &good),
            Err(Reject::BadTopic)
        );
        assert_eq!(
            check("brume/v1/agents/a1/acks", &good),
            Err(Reject::BadTopic)
        );
        assert_eq!(
            check("brume/v1/agents/a1/batches", b"\xff\xff garbage"),
            Err(Reject::Malformed)
        );
        let mut trailing = good.clone();
        trailing.push(0);
        assert_eq!(
            check("brume/v1/agents/a1/batches", &trailing),
            Err(Reject::Malformed)
        );
        for ts in [MIN_TS_NS - 1, MAX_TS_NS, 0, i64::MIN] {
            let m = AgentMessage::BatchV2(batch("a1", ts)).encode();
            assert_eq!(
                check("brume/v1/agents/a1/batches", &m),
                Err(Reject::BadTimestamp),
                "{ts}"
            );
        }
        assert_eq!(
            check(
                "brume/v1/agents/a1/batches",
                &AgentMessage::BatchV2(batch("a1", MAX_TS_NS - 1)).encode()
            ),
            Ok(())
        );
        let mut big_seq = batch("a1", ok_ts);
        big_seq.seq = u64::MAX;
        assert_eq!(
            check(
                "brume/v1/agents/a1/batches",
                &AgentMessage::BatchV2(big_seq).encode()
            ),
            Err(Reject::Malformed)
        );
    }
}
