//! Prometheus metrics of the agent, served at `/metrics`.
//!
//! Counters are updated where events happen; gauges that describe the store and the
//! outbox are computed from the latest [`StoreSnapshot`](crate::store::StoreSnapshot)
//! when scraped, so they can never drift from the store.

use std::sync::atomic::{AtomicI64, AtomicU64};

use brume_protocol::LossReason;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Label: a source (`mqtt`, `http`, `subscribe`, `simulator`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabel {
    /// Source name.
    pub source: String,
}

/// Labels: a reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// Reason name.
    pub reason: String,
}

/// Labels: an MQTT client id.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClientLabel {
    /// Client id.
    pub client: String,
}

/// Labels: an error kind.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// Kind name.
    pub kind: String,
}

/// Labels: a stream and a reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamReasonLabel {
    /// Stream name.
    pub stream: String,
    /// Reason name.
    pub reason: String,
}

/// Labels: a module and a result or event.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModuleLabel {
    /// Module name.
    pub module: String,
    /// Result (`ok`, an error kind, `store_refused`) or event (`loaded`, `disabled`, …).
    pub result: String,
}

/// Labels: a module.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModuleNameLabel {
    /// Module name.
    pub module: String,
}

/// Labels: a module and one of its own metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModuleMetricLabel {
    /// Module name.
    pub module: String,
    /// The module's metric name.
    pub name: String,
}

/// All agent metrics.
pub struct Metrics {
    /// Readings received per source (before the store's verdict).
    pub readings_received: Family<SourceLabel, Counter>,
    /// Readings durably committed.
    pub readings_committed: Counter,
    /// Sensor PUBLISHes of persistent sessions recognised as re-sends of committed ones
    /// (acknowledged again, nothing stored).
    pub sensor_resends_deduplicated: Counter,
    /// Readings refused (not acknowledged to their sender) per reason.
    pub readings_refused: Family<ReasonLabel, Counter>,
    /// Publishes refused because their client's budget of new streams was spent, per client.
    pub stream_quota_refused: Family<ClientLabel, Counter>,
    /// Payloads or packets rejected as malformed, per reason.
    pub bad_input: Family<ReasonLabel, Counter>,
    /// Readings dropped after being accepted, per stream and reason (loss accounting).
    pub readings_dropped: Family<StreamReasonLabel, Counter>,
    /// Store commit errors per kind.
    pub store_errors: Family<KindLabel, Counter>,
    /// Commit latency.
    pub commit_seconds: Histogram,
    /// Store transactions committed: each writes a few pages of flash whatever it holds.
    pub commits: Counter,
    /// Batches cut.
    pub batches_cut: Counter,
    /// Batches published to the broker (including re-sends).
    pub batches_sent: Counter,
    /// Batches re-sent after a timeout or reconnect.
    pub batches_resent: Counter,
    /// Batches acknowledged by the hub.
    pub batches_acked: Counter,
    /// Readings acknowledged by the hub (or the broker in JSON mode).
    pub readings_acked: Counter,
    /// 1 while connected to the cloud broker.
    pub connected: Gauge,
    /// Reconnect attempts to the cloud broker.
    pub reconnects: Counter,
    /// Desired states received from the hub, by `result="taken|stale|rejected"` (stale:
    /// not newer than the one held, e.g. a replayed or late retained message).
    pub desired_states: Family<[(&'static str, &'static str); 1], Counter>,
    /// Hub messages dropped before they were acted on, by `kind="ack|desired|announcement"`
    /// and `reason="unsigned|untrusted_key|bad_signature|malformed"` (signatures are
    /// checked only with `forward.hub_keys`).
    pub hub_messages_rejected: Family<[(&'static str, &'static str); 2], Counter>,
    /// Open sensor connections on the built-in listener.
    pub listener_connections: Gauge,
    /// Store bytes (budget accounting), set at scrape time.
    pub store_bytes: Gauge<i64, AtomicI64>,
    /// Readings in the store, set at scrape time.
    pub store_readings: Gauge<i64, AtomicI64>,
    /// Unacknowledged batches, set at scrape time.
    pub outbox_batches: Gauge<i64, AtomicI64>,
    /// Readings in unacknowledged batches, set at scrape time.
    pub outbox_readings: Gauge<i64, AtomicI64>,
    /// Readings not yet batched, set at scrape time.
    pub unbatched_readings: Gauge<i64, AtomicI64>,
    /// Age of the oldest unacknowledged batch, seconds, set at scrape time.
    pub outbox_oldest_age_seconds: Gauge<f64, AtomicU64>,
    /// 0 when the store is writable, 1 when the last commit failed.
    pub store_unavailable: Gauge,
    /// Module batches by result (`ok` or the error kind).
    pub module_batches: Family<ModuleLabel, Counter>,
    /// Module lifecycle events (`loaded`, `load_error`, `disabled`).
    pub module_events: Family<ModuleLabel, Counter>,
    /// Readings handed to modules.
    pub module_readings_in: Family<ModuleNameLabel, Counter>,
    /// Readings modules produced.
    pub module_readings_out: Family<ModuleNameLabel, Counter>,
    /// Fuel modules consumed.
    pub module_fuel: Family<ModuleNameLabel, Counter>,
    /// Metrics modules report about themselves.
    pub module_gauges: Family<ModuleMetricLabel, Gauge<f64, AtomicU64>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            readings_received: Family::default(),
            readings_committed: Counter::default(),
            sensor_resends_deduplicated: Counter::default(),
            readings_refused: Family::default(),
            stream_quota_refused: Family::default(),
            bad_input: Family::default(),
            readings_dropped: Family::default(),
            store_errors: Family::default(),
            commit_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            commits: Counter::default(),
            batches_cut: Counter::default(),
            batches_sent: Counter::default(),
            batches_resent: Counter::default(),
            batches_acked: Counter::default(),
            readings_acked: Counter::default(),
            connected: Gauge::default(),
            reconnects: Counter::default(),
            desired_states: Family::default(),
            hub_messages_rejected: Family::default(),
            listener_connections: Gauge::default(),
            store_bytes: Gauge::default(),
            store_readings: Gauge::default(),
            outbox_batches: Gauge::default(),
            outbox_readings: Gauge::default(),
            unbatched_readings: Gauge::default(),
            outbox_oldest_age_seconds: Gauge::default(),
            store_unavailable: Gauge::default(),
            module_batches: Family::default(),
            module_events: Family::default(),
            module_readings_in: Family::default(),
            module_readings_out: Family::default(),
            module_fuel: Family::default(),
            module_gauges: Family::default(),
        }
    }
}

impl Metrics {
    /// Counts readings received from a source.
    pub fn received(&self, source: &str, n: u64) {
        self.readings_received.get_or_create(&SourceLabel { source: source.into() }).inc_by(n);
    }

    /// Counts refused readings.
    pub fn refused(&self, reason: &str, n: u64) {
        self.readings_refused.get_or_create(&ReasonLabel { reason: reason.into() }).inc_by(n);
    }

    /// Counts a rejected payload or packet.
    pub fn bad(&self, reason: &str) {
        self.bad_input.get_or_create(&ReasonLabel { reason: reason.into() }).inc();
    }

    /// Counts a module batch.
    pub fn module_batch(&self, module: &str, result: &str, n_in: u64, n_out: u64, fuel: u64) {
        self.module_batches.get_or_create(&ModuleLabel { module: module.into(), result: result.into() }).inc();
        let m = ModuleNameLabel { module: module.into() };
        self.module_readings_in.get_or_create(&m).inc_by(n_in);
        self.module_readings_out.get_or_create(&m).inc_by(n_out);
        self.module_fuel.get_or_create(&m).inc_by(fuel);
    }

    /// Counts a module lifecycle event.
    pub fn module_event(&self, module: &str, event: &str) {
        self.module_events.get_or_create(&ModuleLabel { module: module.into(), result: event.into() }).inc();
    }

    /// Sets a metric a module reported about itself.
    pub fn module_metric(&self, module: &str, name: &str, value: f64) {
        self.module_gauges.get_or_create(&ModuleMetricLabel { module: module.into(), name: name.into() }).set(value);
    }

    /// Counts dropped readings.
    pub fn record_dropped(&self, dropped: &[(String, LossReason, u64)]) {
        for (stream, reason, n) in dropped {
            tracing::warn!(
                stream,
                reason = reason.as_str(),
                count = n,
                "readings dropped before the hub acknowledged them"
            );
            self.readings_dropped
                .get_or_create(&StreamReasonLabel { stream: stream.clone(), reason: reason.as_str().into() })
                .inc_by(*n);
        }
    }

    /// Sets the scrape-time gauges from a store snapshot.
    pub fn set_snapshot(&self, s: &crate::store::StoreSnapshot, unavailable: bool) {
        self.store_bytes.set(s.bytes as i64);
        self.store_readings.set(s.readings as i64);
        self.outbox_batches.set(s.outbox_batches as i64);
        self.outbox_readings.set(s.outbox_readings as i64);
        self.unbatched_readings.set(s.unbatched as i64);
        let age = s.oldest_created_ms.map_or(0.0, |c| ((crate::now_ns() / 1_000_000 - c).max(0)) as f64 / 1000.0);
        self.outbox_oldest_age_seconds.set(age);
        self.store_unavailable.set(i64::from(unavailable));
    }

    /// Builds a registry exposing every metric with the `brume_agent_` prefix.
    pub fn registry(self: &std::sync::Arc<Self>) -> Registry {
        let mut r = Registry::with_prefix("brume_agent");
        r.register("readings_received", "Readings received per source", self.readings_received.clone());
        r.register("readings_committed", "Readings durably committed", self.readings_committed.clone());
        r.register(
            "sensor_resends_deduplicated",
            "Sensor re-sends (MQTT DUP) of publishes already committed: acknowledged again, not stored",
            self.sensor_resends_deduplicated.clone(),
        );
        r.register("readings_refused", "Readings refused, not acknowledged", self.readings_refused.clone());
        r.register(
            "stream_quota_refused",
            "Publishes refused because the client's quota of new streams was spent, per client id",
            self.stream_quota_refused.clone(),
        );
        r.register("bad_input", "Malformed packets or payloads rejected", self.bad_input.clone());
        r.register(
            "readings_dropped",
            "Accepted readings dropped before the hub acknowledged them",
            self.readings_dropped.clone(),
        );
        r.register("store_errors", "Store commit errors", self.store_errors.clone());
        r.register("commit_seconds", "Store commit latency", self.commit_seconds.clone());
        r.register("commits", "Store transactions committed (each writes a few pages of flash)", self.commits.clone());
        r.register("batches_cut", "Batches cut into the outbox", self.batches_cut.clone());
        r.register("batches_sent", "Batches published, including re-sends", self.batches_sent.clone());
        r.register("batches_resent", "Batches re-sent after timeout or reconnect", self.batches_resent.clone());
        r.register("batches_acked", "Batches acknowledged by the hub", self.batches_acked.clone());
        r.register("readings_acked", "Readings acknowledged by the hub", self.readings_acked.clone());
        r.register("connected", "1 while connected to the cloud broker", self.connected.clone());
        r.register("reconnects", "Reconnect attempts to the cloud broker", self.reconnects.clone());
        r.register(
            "desired_states",
            "Desired states received from the hub, by result (taken, stale, rejected)",
            self.desired_states.clone(),
        );
        r.register(
            "hub_messages_rejected",
            "Hub messages dropped unread, by kind and reason (unsigned, untrusted_key, bad_signature, malformed)",
            self.hub_messages_rejected.clone(),
        );
        r.register("listener_connections", "Open sensor connections", self.listener_connections.clone());
        r.register("store_bytes", "Bytes of stored readings", self.store_bytes.clone());
        r.register("store_readings", "Readings in the store", self.store_readings.clone());
        r.register("outbox_batches", "Batches awaiting the hub's acknowledgement", self.outbox_batches.clone());
        r.register("outbox_readings", "Readings awaiting the hub's acknowledgement", self.outbox_readings.clone());
        r.register("unbatched_readings", "Readings not yet cut into a batch", self.unbatched_readings.clone());
        r.register(
            "outbox_oldest_age_seconds",
            "Age of the oldest unacknowledged batch",
            self.outbox_oldest_age_seconds.clone(),
        );
        r.register(
            "store_unavailable",
            "1 while the store cannot commit (disk full, read-only)",
            self.store_unavailable.clone(),
        );
        r.register("module_batches", "Module batches by result", self.module_batches.clone());
        r.register("module_events", "Module lifecycle events", self.module_events.clone());
        r.register("module_readings_in", "Readings handed to modules", self.module_readings_in.clone());
        r.register("module_readings_out", "Readings produced by modules", self.module_readings_out.clone());
        r.register("module_fuel", "Fuel consumed by modules", self.module_fuel.clone());
        r.register("module_metric", "Metrics reported by modules", self.module_gauges.clone());
        r
    }
}
