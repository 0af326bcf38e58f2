//! Prometheus metrics of the hub, served as text at `GET /metrics`.
//!
//! Counters are registered without the `_total` suffix because prometheus-client
//! appends it when encoding: `batches` is exposed as `brume_hub_batches_total`.

use std::sync::Arc;
use std::sync::atomic::AtomicI64;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Label set of `brume_hub_batches_total`: `result="stored|duplicate|quarantined|rejected_<reason>"`.
pub type ResultLabel = [(&'static str, &'static str); 1];

/// Every `result` label value of `brume_hub_batches_total`.
pub const ALL_RESULTS: [&str; 8] = [
    "stored",
    "duplicate",
    "quarantined",
    "rejected_bad_topic",
    "rejected_malformed",
    "rejected_agent_mismatch",
    "rejected_bad_timestamp",
    "rejected_overloaded",
];

/// All hub metrics plus the registry that encodes them. Cheap to share via `Arc`.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Batches by outcome.
    pub batches: Family<ResultLabel, Counter>,
    /// Readings stored (not counting duplicates).
    pub readings_stored: Counter,
    /// Failed ingest transactions.
    pub db_errors: Counter,
    /// 1 while the MQTT connection is up.
    pub mqtt_connected: Gauge<i64, AtomicI64>,
    /// Duration of ingest transactions, including the commit's fsync.
    pub ingest_tx_seconds: Histogram,
    /// From the agent cutting a batch (its `created_ms`) to the hub committing it.
    pub batch_latency_seconds: Histogram,
    /// Agents' presence messages, by `result="stored|rejected|failed"`.
    pub presence_messages: Family<ResultLabel, Counter>,
    /// Agents' module reports, by `result="stored|rejected|failed"`.
    pub report_messages: Family<ResultLabel, Counter>,
    /// Batches missing below each agent's highest stored sequence number (gaps), per
    /// `agent_id`, refreshed every `ingest.fleet_metrics_interval`.
    pub agent_missing_batches: Family<Vec<(String, String)>, Gauge<i64, AtomicI64>>,
    /// Agents online (by their presence messages), refreshed with the above.
    pub agents_online: Gauge<i64, AtomicI64>,
    /// Agents with a presence message, refreshed with the above.
    pub agents_known: Gauge<i64, AtomicI64>,
    /// Sum of the outbox depths (batches) the agents' presence messages report.
    pub outbox_batches: Gauge<i64, AtomicI64>,
    /// The deepest single outbox among them.
    pub outbox_batches_max: Gauge<i64, AtomicI64>,
    /// The oldest outbox batch of any agent, seconds (`PresenceRecord::backlog_age_s`).
    pub backlog_age_max: Gauge<i64, AtomicI64>,
    /// Deployments per `state="rolling|paused|done|aborted|rolled_back"`.
    pub deployments: Family<[(&'static str, &'static str); 1], Gauge<i64, AtomicI64>>,
    /// Batches put in quarantine (or quarantined again on a re-send), by
    /// `reason="invalid|rejected"`.
    pub quarantined: Family<[(&'static str, &'static str); 1], Counter>,
    /// Quarantine entries leaving quarantine, by `action="reingested|discarded"`.
    pub quarantine_released: Family<[(&'static str, &'static str); 1], Counter>,
    /// Expensive queries refused with 503 because `http.max_concurrent_queries` were running.
    pub queries_refused: Counter,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("brume_hub");
        let batches = Family::<ResultLabel, Counter>::default();
        // Create every result up front so each series exists (at 0) from the first
        // scrape: `rate()` and alerts on a counter that appears late miss its first step.
        for result in ALL_RESULTS {
            let _ = batches.get_or_create(&[("result", result)]);
        }
        registry.register("batches", "Batches received, by result", batches.clone());
        let readings_stored = Counter::default();
        registry.register("readings_stored", "Readings stored (duplicates excluded)", readings_stored.clone());
        let db_errors = Counter::default();
        registry.register("db_errors", "Ingest transactions that failed and were not acknowledged", db_errors.clone());
        let mqtt_connected = Gauge::<i64, AtomicI64>::default();
        registry.register("mqtt_connected", "1 while connected to the MQTT broker", mqtt_connected.clone());
        // 100 µs .. ~3.3 s: a durable SQLite commit is ~0.1-0.3 ms, a large group a few ms.
        let ingest_tx_seconds =
            Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(1e-4, 2.0, 16));
        registry.register("ingest_tx_seconds", "Duration of one ingest transaction", ingest_tx_seconds.clone());
        // 10 ms .. ~3 days: live batches take milliseconds, a backlog after an outage
        // arrives hours or days late.
        let batch_latency_seconds =
            Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(0.01, 4.0, 16));
        registry.register(
            "batch_latency_seconds",
            "From the agent cutting a batch to the hub committing it (agent clock to hub clock), stored batches only",
            batch_latency_seconds.clone(),
        );
        let presence_messages = Family::<ResultLabel, Counter>::default();
        for result in ["stored", "rejected", "failed"] {
            let _ = presence_messages.get_or_create(&[("result", result)]);
        }
        registry.register("presence_messages", "Agents' presence messages, by result", presence_messages.clone());
        let report_messages = Family::<ResultLabel, Counter>::default();
        for result in ["stored", "rejected", "failed"] {
            let _ = report_messages.get_or_create(&[("result", result)]);
        }
        registry.register("report_messages", "Agents' module reports, by result", report_messages.clone());
        let agent_missing_batches = Family::<Vec<(String, String)>, Gauge<i64, AtomicI64>>::default();
        registry.register(
            "agent_missing_batches",
            "Batches missing below the agent's highest stored sequence number, per agent (store epoch)",
            agent_missing_batches.clone(),
        );
        let agents_online = Gauge::<i64, AtomicI64>::default();
        registry.register("agents_online", "Agents whose presence says online", agents_online.clone());
        let agents_known = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "agents_known",
            "Agents that ever sent a presence message (known minus online: agents offline)",
            agents_known.clone(),
        );
        let outbox_batches = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "agents_outbox_batches",
            "Batches waiting in the outboxes of all agents, as their last presence messages said",
            outbox_batches.clone(),
        );
        let outbox_batches_max = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "agent_outbox_batches_max",
            "The longest outbox of any one agent, batches (the dashboard's Fleet page says whose)",
            outbox_batches_max.clone(),
        );
        let backlog_age_max = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "agent_backlog_age_seconds_max",
            "Age of the oldest batch waiting in any agent's outbox, seconds, as the agents' last presence messages said",
            backlog_age_max.clone(),
        );
        let deployments = Family::<ResultLabel, Gauge<i64, AtomicI64>>::default();
        for state in ["rolling", "paused", "done", "aborted", "rolled_back"] {
            let _ = deployments.get_or_create(&[("state", state)]);
        }
        registry.register("deployments", "Module deployments, by state", deployments.clone());
        let quarantined = Family::<ResultLabel, Counter>::default();
        for reason in ["invalid", "rejected"] {
            let _ = quarantined.get_or_create(&[("reason", reason)]);
        }
        registry.register(
            "quarantined",
            "Batches quarantined and acknowledged without being stored, by reason (GET /api/v1/quarantine)",
            quarantined.clone(),
        );
        let quarantine_released = Family::<ResultLabel, Counter>::default();
        for action in ["reingested", "discarded"] {
            let _ = quarantine_released.get_or_create(&[("action", action)]);
        }
        registry.register(
            "quarantine_released",
            "Quarantined batches re-ingested or discarded by an operator",
            quarantine_released.clone(),
        );
        let queries_refused = Counter::default();
        registry.register(
            "http_queries_refused",
            "Expensive API queries refused with 503 because http.max_concurrent_queries were running",
            queries_refused.clone(),
        );
        Arc::new(Metrics {
            queries_refused,
            quarantined,
            quarantine_released,
            registry,
            agent_missing_batches,
            agents_online,
            agents_known,
            outbox_batches,
            outbox_batches_max,
            backlog_age_max,
            deployments,
            presence_messages,
            report_messages,
            batch_latency_seconds,
            batches,
            readings_stored,
            db_errors,
            mqtt_connected,
            ingest_tx_seconds,
        })
    }

    /// Counts one batch the ingest queue had no room for (`rejected_overloaded`): the
    /// transport drops it before ingest sees it.
    pub fn count_overloaded(&self) {
        self.count_batch("rejected_overloaded");
    }

    /// Counts one batch under `result` (`stored`, `duplicate`, `rejected_<reason>`).
    pub fn count_batch(&self, result: &'static str) {
        self.batches.get_or_create(&[("result", result)]).inc();
    }

    /// Encodes every metric in the Prometheus/OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}
