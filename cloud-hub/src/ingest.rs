//! The ingest task: validates deliveries, stores them with group commit, then
//! acknowledges them.
//!
//! For every group of deliveries the order is fixed, and it is what makes the hub
//! exactly-once on top of at-least-once MQTT:
//!
//! 1. validate each publish ([`validate`]); a publish that is not a batch of the topic's
//!    agent is refused (counted, logged, acked to the broker: re-delivering it would not
//!    make it valid). A batch whose envelope names the topic's agent, an epoch and a
//!    sequence number but whose content breaks the protocol's rules is **quarantined**
//!    (below) and acknowledged, so the agent's outbox moves on;
//! 2. store all valid batches in **one** transaction ([`HubStore::ingest`]), which dedups
//!    on `(agent_id, epoch, seq)` and returns only once the commit is durable;
//! 3. publish one `HubMessage::AckV1` per `(agent, epoch)` listing every committed seq,
//!    duplicates and quarantined batches included (an agent re-sends precisely because
//!    it missed an ack);
//! 4. ack the publishes to the broker.
//!
//! A crash between any two steps loses nothing: before 3 the agent re-sends, after 3 a
//! re-delivery is a duplicate that is acked again.
//!
//! # When the transaction fails
//!
//! One batch must never hold up the others ([`Committer`]). A failed transaction is
//! either the database being unavailable ([`StoreError::is_transient`], or it does not
//! answer a ping): then nothing is wrong with the batches, nothing is acknowledged, and
//! the same group is retried with capped backoff until it commits or the hub shuts down.
//! Or the database answers but refuses the group: then its content is the suspect. The
//! group is split in halves, each stored on its own, recursively, so every good batch
//! commits; a batch that the database refuses alone `ingest.quarantine_after` times in a
//! row is quarantined: its raw bytes and the error go to the store's quarantine table
//! (in their own transaction), it is counted and acknowledged, and an operator can list,
//! download, re-ingest or discard it (`/api/v1/quarantine`). Nothing is dropped silently:
//! the hub acknowledges a batch only once it is durably stored, as readings or as
//! quarantined bytes.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use brume_protocol::{AckV1, AgentMessage, AgentStatus, Batch, topics, validate_agent_id};
use rand::Rng;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::clock::now_ms;
use crate::metrics::Metrics;
use crate::mqtt::{Delivery, MqttHandle};
use crate::store::{BatchOutcome, HubStore, NewQuarantine, QuarantineReason, StoreError};

/// First delay before retrying a failed transaction.
const RETRY_MIN: Duration = Duration::from_millis(100);
/// Longest delay between transaction retries.
const RETRY_MAX: Duration = Duration::from_secs(10);
/// How long a ping may take before the store counts as unavailable.
const PING_TIMEOUT: Duration = Duration::from_secs(10);

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
    let batch = AgentMessage::decode_batch(payload).map_err(|e| (Reject::Malformed, e.to_string()))?;
    if batch.agent_id != agent {
        return Err((Reject::AgentMismatch, format!("payload agent id {:?} differs from the topic's", batch.agent_id)));
    }
    // Sequence numbers are stored as signed 64-bit integers (SQLite and PostgreSQL);
    // nothing legitimate gets near.
    if batch.seq > i64::MAX as u64 {
        return Err((Reject::Malformed, format!("seq {} is out of range", batch.seq)));
    }
    // The protocol's one timestamp rule, checked here rather than at decode so that a
    // bad timestamp gets its own reason (and its own count) instead of "malformed".
    for chunk in &batch.streams {
        for p in &chunk.points {
            brume_protocol::validate_timestamp(p.ts_ns)
                .map_err(|e| (Reject::BadTimestamp, format!("stream {:?}: {e}", chunk.stream)))?;
        }
    }
    Ok(batch)
}

/// The envelope of a refused publish, if it can be trusted enough to quarantine the
/// batch and acknowledge it: the topic names a valid agent, the payload is a batch
/// envelope of that same agent. `None` for anything else (garbage, a foreign agent id),
/// which is refused without an ack since there is nobody to tell.
pub fn quarantinable(topic: &str, payload: &[u8]) -> Option<brume_protocol::BatchKey> {
    let agent = topics::agent_of_batch_topic(topic)?;
    validate_agent_id(agent).ok()?;
    let key = AgentMessage::peek_key(payload).ok()?;
    (key.agent_id == agent).then_some(key)
}

/// How the ingest task treats a batch the database refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuarantinePolicy {
    /// Attempts of a batch stored alone, each refused, before it is quarantined.
    pub attempts: u32,
    /// Wait between those attempts.
    pub retry_delay: Duration,
}

impl Default for QuarantinePolicy {
    fn default() -> Self {
        QuarantinePolicy { attempts: 3, retry_delay: RETRY_MIN }
    }
}

/// What became of one batch of a group. Every outcome is durable and acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Stored for the first time, or already stored.
    Store(BatchOutcome),
    /// Refused by the database and kept in quarantine under this id.
    Quarantined(i64),
}

/// Stores groups of validated batches: one transaction when it can, split into smaller
/// ones and quarantine when the database refuses some of them (see the module docs).
/// Independent of MQTT, so it is tested against both stores directly.
pub struct Committer {
    /// Where batches are stored.
    pub store: Arc<dyn HubStore>,
    /// Metrics to update (transaction time, database errors, quarantines).
    pub metrics: Arc<Metrics>,
    /// When a refused batch is quarantined.
    pub policy: QuarantinePolicy,
}

/// A failed store call: the error text and whether the database said it is unavailable.
struct Failure {
    error: String,
    transient: bool,
}

impl Committer {
    /// Stores `batches`, where `raw[i]` is the topic and payload batch `i` arrived as
    /// (kept if it is quarantined). Returns one outcome per batch, in order, once each is
    /// durably stored or quarantined; `None` if `shutdown` came first (nothing of what is
    /// not yet stored may be acknowledged then).
    pub async fn store(
        &self,
        batches: &Arc<Vec<Batch>>,
        raw: &[(&str, &[u8])],
        shutdown: &CancellationToken,
    ) -> Option<Vec<Outcome>> {
        assert_eq!(batches.len(), raw.len(), "one raw payload per batch");
        let mut outcomes: Vec<Option<Outcome>> = vec![None; batches.len()];
        // Parts still to store, front first: a range of the group and how many times in
        // a row it was refused alone. Halves stay in order, so batches commit in
        // arrival order.
        let mut work: VecDeque<(Range<usize>, u32)> = VecDeque::from([(0..batches.len(), 0)]);
        let mut delay = RETRY_MIN;
        while let Some((range, refusals)) = work.pop_front() {
            if range.is_empty() {
                continue;
            }
            let failure = match self.ingest(batches, range.clone()).await {
                Ok(stored) => {
                    for (i, o) in range.zip(stored) {
                        outcomes[i] = Some(Outcome::Store(o));
                    }
                    delay = RETRY_MIN;
                    continue;
                }
                Err(f) => f,
            };
            self.metrics.db_errors.inc();
            if failure.transient || !self.store_answers().await {
                let wait = jitter(delay);
                tracing::error!(error = %failure.error, batches = range.len(), retry_in = ?wait, "ingest transaction failed (database unavailable); nothing acknowledged");
                work.push_front((range, refusals));
                tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    _ = tokio::time::sleep(wait) => {}
                }
                delay = (delay * 2).min(RETRY_MAX);
                continue;
            }
            // The database answers, but refused this part: its content is the suspect.
            if range.len() > 1 {
                tracing::warn!(error = %failure.error, batches = range.len(), "the database refused a group of batches; storing its halves separately");
                let mid = range.start + range.len() / 2;
                work.push_front((mid..range.end, 0));
                work.push_front((range.start..mid, 0));
                continue;
            }
            let i = range.start;
            let b = &batches[i];
            let refusals = refusals + 1;
            let known = self.quarantine_id(b).await;
            if refusals < self.policy.attempts && known.is_none() {
                tracing::warn!(agent_id = %b.agent_id, epoch = b.epoch, seq = b.seq, refusals, error = %failure.error, "the database refused a batch; retrying it alone");
                work.push_front((range, refusals));
                tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    _ = tokio::time::sleep(self.policy.retry_delay) => {}
                }
                continue;
            }
            let (topic, payload) = raw[i];
            let q = NewQuarantine {
                agent_id: &b.agent_id,
                epoch: b.epoch,
                seq: b.seq,
                topic,
                reason: QuarantineReason::Rejected,
                error: &failure.error,
                payload,
                received_ms: now_ms(),
            };
            let id = self.quarantine(&q, shutdown).await?;
            outcomes[i] = Some(Outcome::Quarantined(id));
        }
        Some(outcomes.into_iter().map(|o| o.expect("every batch has an outcome")).collect())
    }

    /// One transaction over `batches[range]`, on a blocking thread.
    async fn ingest(&self, batches: &Arc<Vec<Batch>>, range: Range<usize>) -> Result<Vec<BatchOutcome>, Failure> {
        let store = Arc::clone(&self.store);
        // An Arc, not a move: if the store panics, the batches are still here to retry.
        let shared = Arc::clone(batches);
        let started = Instant::now();
        let received_ms = now_ms();
        // Stores block (SQLite on fsync, PostgreSQL on its own runtime): keep them off
        // the async worker threads.
        let joined = tokio::task::spawn_blocking(move || store.ingest(&shared[range], received_ms)).await;
        self.metrics.ingest_tx_seconds.observe(started.elapsed().as_secs_f64());
        match joined {
            Ok(Ok(outcomes)) => Ok(outcomes),
            Ok(Err(e)) => Err(Failure { transient: e.is_transient(), error: e.to_string() }),
            // A panic on some input is about the input, as far as anyone can tell.
            Err(e) => Err(Failure { transient: false, error: format!("store panicked: {e}") }),
        }
    }

    /// Whether the store answers a ping: if it does not, a failure is not the batches' fault.
    async fn store_answers(&self) -> bool {
        let store = Arc::clone(&self.store);
        matches!(
            tokio::time::timeout(PING_TIMEOUT, tokio::task::spawn_blocking(move || store.ping())).await,
            Ok(Ok(Ok(())))
        )
    }

    /// The quarantine entry of a batch, if any (an agent re-sending a quarantined batch
    /// whose ack it missed). `None` also when the lookup fails: then the batch is
    /// retried as if new.
    async fn quarantine_id(&self, b: &Batch) -> Option<i64> {
        let store = Arc::clone(&self.store);
        let (agent, epoch, seq) = (b.agent_id.clone(), b.epoch, b.seq);
        tokio::task::spawn_blocking(move || store.quarantine_id(&agent, epoch, seq)).await.ok()?.ok()?
    }

    /// Stores a quarantine entry, retrying with backoff until it is durable; `None` if
    /// `shutdown` came first. Logged at ERROR: someone has to look at it.
    pub async fn quarantine(&self, q: &NewQuarantine<'_>, shutdown: &CancellationToken) -> Option<i64> {
        let mut delay = RETRY_MIN;
        loop {
            let store = Arc::clone(&self.store);
            let owned = (q.agent_id.to_owned(), q.topic.to_owned(), q.error.to_owned(), q.payload.to_vec());
            let (epoch, seq, reason, received_ms) = (q.epoch, q.seq, q.reason, q.received_ms);
            let result = tokio::task::spawn_blocking(move || {
                let (agent_id, topic, error, payload) = &owned;
                store.quarantine(&NewQuarantine { agent_id, epoch, seq, topic, reason, error, payload, received_ms })
            })
            .await;
            let err = match result {
                Ok(Ok(id)) => {
                    self.metrics.quarantined.get_or_create(&[("reason", q.reason.as_str())]).inc();
                    tracing::error!(
                        agent_id = %q.agent_id, epoch = q.epoch, seq = q.seq, quarantine_id = id,
                        reason = q.reason.as_str(), error = %q.error,
                        "batch quarantined and acknowledged; see GET /api/v1/quarantine to re-ingest or discard it"
                    );
                    return Some(id);
                }
                Ok(Err(e)) => e.to_string(),
                Err(e) => format!("store panicked: {e}"),
            };
            let wait = jitter(delay);
            tracing::error!(error = %err, agent_id = %q.agent_id, seq = q.seq, retry_in = ?wait, "cannot store a quarantined batch; not acknowledged, retrying");
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                _ = tokio::time::sleep(wait) => {}
            }
            delay = (delay * 2).min(RETRY_MAX);
        }
    }
}

/// Everything the ingest task needs.
pub struct Ingest {
    /// Stores groups (and quarantines what the database refuses).
    pub committer: Committer,
    /// Hub and broker acks.
    pub mqtt: MqttHandle,
    /// Deliveries from the event loop task.
    pub deliveries: mpsc::Receiver<Delivery>,
    /// Most batches per transaction (group commit limit).
    pub max_batches_per_tx: usize,
    /// Woken when an agent's module report is stored (it may advance a rollout).
    pub fleet_poke: Option<Arc<crate::fleet::FleetHandle>>,
}

/// A valid batch waiting to be stored, with the delivery to ack afterwards.
struct Pending {
    batch: Batch,
    delivery: Delivery,
}

impl Ingest {
    fn metrics(&self) -> &Metrics {
        &self.committer.metrics
    }

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
            if !self.accept(first, &mut group, &shutdown).await {
                break;
            }
            while group.len() < self.max_batches_per_tx {
                let Ok(d) = self.deliveries.try_recv() else {
                    break;
                };
                if !self.accept(d, &mut group, &shutdown).await {
                    return;
                }
            }
            if group.is_empty() {
                continue;
            }
            let (batches, deliveries): (Vec<_>, Vec<_>) = group.into_iter().map(|p| (p.batch, p.delivery)).unzip();
            let batches = Arc::new(batches);
            let raw: Vec<(&str, &[u8])> =
                deliveries.iter().map(|d| (d.publish.topic.as_str(), &d.publish.payload[..])).collect();
            let Some(outcomes) = self.committer.store(&batches, &raw, &shutdown).await else {
                tracing::info!(batches = batches.len(), "shutting down with an uncommitted group; agents will re-send");
                break;
            };
            if !self.acknowledge(&batches, &deliveries, &outcomes).await {
                break;
            }
        }
        tracing::debug!("ingest task stopped");
    }

    /// Validates a delivery: valid batches join the group; invalid ones are quarantined
    /// and acknowledged when their envelope allows it, refused otherwise. Returns false
    /// if the MQTT event loop is gone or shutdown interrupted a quarantine.
    async fn accept(&self, d: Delivery, group: &mut Vec<Pending>, shutdown: &CancellationToken) -> bool {
        if let Some(agent) = topics::agent_of_status_topic(&d.publish.topic) {
            self.record_presence(agent, &d.publish.payload).await;
            return self.mqtt.ack_broker(&d).await.is_ok();
        }
        if let Some(agent) = topics::agent_of_report_topic(&d.publish.topic) {
            self.record_report(agent, &d.publish.payload).await;
            return self.mqtt.ack_broker(&d).await.is_ok();
        }
        let (reason, detail) = match validate(&d.publish.topic, &d.publish.payload) {
            Ok(batch) => {
                group.push(Pending { batch, delivery: d });
                return true;
            }
            Err(refusal) => refusal,
        };
        self.metrics().count_batch(reason.metric_label());
        let agent = topics::agent_of_batch_topic(&d.publish.topic).unwrap_or("?");
        let key = match reason {
            Reject::Malformed | Reject::BadTimestamp => quarantinable(&d.publish.topic, &d.publish.payload),
            Reject::BadTopic | Reject::AgentMismatch | Reject::Overloaded => None,
        };
        let Some(key) = key else {
            tracing::warn!(agent_id = agent, topic = %d.publish.topic, reason = reason.metric_label(), "refused a publish that is not a batch of the topic's agent: {detail}");
            // Acked so the broker does not keep it in flight: no re-delivery can fix it.
            return self.mqtt.ack_broker(&d).await.is_ok();
        };
        let q = NewQuarantine {
            agent_id: &key.agent_id,
            epoch: key.epoch,
            seq: key.seq,
            topic: &d.publish.topic,
            reason: QuarantineReason::Invalid,
            error: &detail,
            payload: &d.publish.payload,
            received_ms: now_ms(),
        };
        if self.committer.quarantine(&q, shutdown).await.is_none() {
            return false;
        }
        let ack = AckV1 { epoch: key.epoch, seqs: vec![key.seq] };
        self.mqtt.publish_ack(&key.agent_id, ack).await.is_ok() && self.mqtt.ack_broker(&d).await.is_ok()
    }

    /// Stores an agent's presence message. Best effort: a message that cannot be stored
    /// is logged and counted, and the next heartbeat (every few seconds) replaces it.
    async fn record_presence(&self, agent: &str, payload: &[u8]) {
        let metrics = self.metrics();
        let (status, ext) = match AgentStatus::decode_full(payload) {
            Ok((s, ext)) if s.agent_id == agent => (s, ext),
            Ok((s, _)) => {
                metrics.presence_messages.get_or_create(&[("result", "rejected")]).inc();
                tracing::warn!(agent_id = agent, payload_agent_id = %s.agent_id, "presence message for another agent; ignored");
                return;
            }
            Err(e) => {
                metrics.presence_messages.get_or_create(&[("result", "rejected")]).inc();
                tracing::warn!(agent_id = agent, error = %e, "malformed presence message; ignored");
                return;
            }
        };
        let store = Arc::clone(&self.committer.store);
        let result = tokio::task::spawn_blocking(move || store.record_presence(&status, &ext, now_ms())).await;
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
        metrics.presence_messages.get_or_create(&[("result", outcome)]).inc();
    }

    /// Stores an agent's module report and wakes the fleet reconciler, which may advance
    /// a rollout on it. Best effort like presence: the agent publishes its report retained
    /// and again on every change, and the broker hands the retained one to a hub that
    /// subscribes again.
    async fn record_report(&self, agent: &str, payload: &[u8]) {
        let metrics = self.metrics();
        let report = match brume_protocol::AgentReport::decode(payload) {
            Ok(r) if r.agent_id == agent => r,
            Ok(r) => {
                metrics.report_messages.get_or_create(&[("result", "rejected")]).inc();
                tracing::warn!(agent_id = agent, payload_agent_id = %r.agent_id, "module report for another agent; ignored");
                return;
            }
            Err(e) => {
                metrics.report_messages.get_or_create(&[("result", "rejected")]).inc();
                tracing::warn!(agent_id = agent, error = %e, "malformed module report; ignored");
                return;
            }
        };
        let store = Arc::clone(&self.committer.store);
        let result = tokio::task::spawn_blocking(move || store.record_report(&report, now_ms())).await;
        let outcome = match result {
            Ok(Ok(())) => {
                if let Some(poke) = &self.fleet_poke {
                    poke.poke.notify_one();
                }
                "stored"
            }
            Ok(Err(e)) => {
                tracing::warn!(agent_id = agent, error = %e, "cannot store a module report");
                "failed"
            }
            Err(e) => {
                tracing::warn!(agent_id = agent, error = %e, "report task failed");
                "failed"
            }
        };
        metrics.report_messages.get_or_create(&[("result", outcome)]).inc();
    }

    /// Publishes hub acks, then acks the publishes to the broker, and counts outcomes.
    /// Returns false if the MQTT event loop is gone.
    async fn acknowledge(&self, batches: &[Batch], deliveries: &[Delivery], outcomes: &[Outcome]) -> bool {
        let metrics = self.metrics();
        // One ack per (agent, epoch). BTreeMap for a deterministic order; seqs keep
        // arrival order with repeats removed (the same batch can arrive twice in a group).
        let mut acks: BTreeMap<(&str, u64), Vec<u64>> = BTreeMap::new();
        for (b, outcome) in batches.iter().zip(outcomes) {
            match outcome {
                Outcome::Store(BatchOutcome::Stored) => {
                    metrics.count_batch("stored");
                    let late_ms = now_ms().saturating_sub(b.created_ms).max(0);
                    metrics.batch_latency_seconds.observe(late_ms as f64 / 1e3);
                    metrics.readings_stored.inc_by(b.reading_count() as u64);
                }
                Outcome::Store(BatchOutcome::Duplicate) => metrics.count_batch("duplicate"),
                Outcome::Quarantined(_) => metrics.count_batch("quarantined"),
            }
            let seqs = acks.entry((b.agent_id.as_str(), b.epoch)).or_default();
            if !seqs.contains(&b.seq) {
                seqs.push(b.seq);
            }
        }
        for ((agent, epoch), seqs) in acks {
            tracing::debug!(agent_id = agent, epoch, ?seqs, "acknowledging batches");
            if self.mqtt.publish_ack(agent, AckV1 { epoch, seqs }).await.is_err() {
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

/// Re-ingests a quarantined batch after a fix: decodes and validates its stored bytes
/// as if they had just arrived, stores them, and removes the quarantine entry once they
/// are committed. Blocking; run it on a blocking thread.
pub fn reingest(store: &dyn HubStore, id: i64) -> Result<ReingestResult, StoreError> {
    let Some((entry, payload)) = store.quarantined_payload(id)? else {
        return Ok(ReingestResult::NotFound);
    };
    let batch = match validate(&entry.topic, &payload) {
        Ok(b) => b,
        Err((reason, detail)) => {
            return Ok(ReingestResult::StillInvalid(format!("{}: {detail}", reason.metric_label())));
        }
    };
    let outcome = match store.ingest(std::slice::from_ref(&batch), now_ms()) {
        Ok(o) => o[0],
        Err(e) if e.is_transient() => return Err(e),
        Err(e) => return Ok(ReingestResult::StillRefused(e.to_string())),
    };
    store.release_quarantined(id)?;
    Ok(ReingestResult::Stored(outcome))
}

/// What [`reingest`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReingestResult {
    /// No quarantine entry with that id.
    NotFound,
    /// Stored (or found already stored) and removed from quarantine.
    Stored(BatchOutcome),
    /// The payload still fails validation; the entry is kept.
    StillInvalid(String),
    /// The database still refuses it; the entry is kept.
    StillRefused(String),
}

/// A random delay in `[d/2, d]`.
fn jitter(d: Duration) -> Duration {
    let ms = d.as_millis() as u64;
    Duration::from_millis(rand::rng().random_range(ms / 2..=ms))
}

#[cfg(test)]
mod tests {
    use super::*;
    use brume_protocol::limits::{MAX_TS_NS, MIN_TS_NS};
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
                    fields: FieldsBlob::encode(&[Field { name: "v".into(), value: Value::F64(1.0) }]).unwrap(),
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
        for r in [Reject::BadTopic, Reject::Malformed, Reject::AgentMismatch, Reject::BadTimestamp, Reject::Overloaded]
        {
            assert!(crate::metrics::ALL_RESULTS.contains(&r.metric_label()), "{r:?}");
        }
        let text = crate::metrics::Metrics::new().encode();
        assert!(text.contains("brume_hub_batches_total{result=\"rejected_malformed\"} 0"), "{text}");
    }

    #[test]
    fn validation_reasons() {
        let ok_ts = MIN_TS_NS + 1;
        let good = AgentMessage::BatchV2(batch("a1", ok_ts)).encode();
        assert_eq!(check("brume/v1/agents/a1/batches", &good), Ok(()));
        assert_eq!(check("brume/v1/agents/a2/batches", &good), Err(Reject::AgentMismatch));
        assert_eq!(check("brume/v1/agents/a 1/batches", &good), Err(Reject::BadTopic));
        assert_eq!(check("brume/v1/agents/a1/acks", &good), Err(Reject::BadTopic));
        assert_eq!(check("brume/v1/agents/a1/batches", b"\xff\xff garbage"), Err(Reject::Malformed));
        let mut trailing = good.clone();
        trailing.push(0);
        assert_eq!(check("brume/v1/agents/a1/batches", &trailing), Err(Reject::Malformed));
        for ts in [MIN_TS_NS - 1, MAX_TS_NS, 0, i64::MIN] {
            let m = AgentMessage::BatchV2(batch("a1", ts)).encode();
            assert_eq!(check("brume/v1/agents/a1/batches", &m), Err(Reject::BadTimestamp), "{ts}");
        }
        assert_eq!(
            check("brume/v1/agents/a1/batches", &AgentMessage::BatchV2(batch("a1", MAX_TS_NS - 1)).encode()),
            Ok(())
        );
        let mut big_seq = batch("a1", ok_ts);
        big_seq.seq = u64::MAX;
        assert_eq!(
            check("brume/v1/agents/a1/batches", &AgentMessage::BatchV2(big_seq).encode()),
            Err(Reject::Malformed)
        );
    }
}
