//! Brume cloud hub: receives agent batches over MQTT, stores each exactly once,
//! acknowledges them, and serves the stored readings over HTTP.
//!
//! Start at [`run`]. The pieces, one task each:
//!
//! * [`mqtt`]: drives the rumqttc event loop (connect, re-subscribe, reconnect with
//!   backoff) and queues batch publishes for ingest;
//! * [`ingest`]: validates batches, stores them in group-committed transactions through
//!   [`store::HubStore`], then publishes hub acks and acks the broker;
//! * [`http`]: the JSON API and `/metrics`.
//!
//! Storage is [`store::HubStore`]: embedded SQLite by default, or PostgreSQL shared by
//! several hub instances (`[storage] backend = "postgres"`, see `POSTGRES.md`).
//!
//! Architecture invariant: a batch is acknowledged (to the agent or to the broker) only
//! after the transaction that stored it has committed, or after it has been rejected as
//! invalid.

pub mod aggregate;
pub mod auth;
pub mod cli;
mod clock;
pub mod config;
pub mod dashboard;
pub mod fleet;
pub mod http;
pub mod ingest;
pub mod metrics;
pub mod mqtt;
pub mod ops;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::{Backend, Config, ConfigError};
pub use store::postgres::PostgresStore;
pub use store::sqlite::SqliteStore;
pub use store::{HubStore, StoreError};

/// How long shutdown waits for the ingest task to finish its current transaction and
/// send its acks.
const INGEST_DRAIN_TIMEOUT: Duration = Duration::from_secs(15);
/// How long shutdown waits for the DISCONNECT to reach the broker.
const MQTT_DISCONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long shutdown waits for in-flight HTTP requests.
const HTTP_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the hub could not run.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The store could not be opened.
    #[error("cannot open the store: {0}")]
    Store(#[from] StoreError),
    /// The HTTP server failed.
    #[error("HTTP server failed: {0}")]
    Http(#[source] std::io::Error),
    /// A task panicked.
    #[error("{task} task failed: {source}")]
    Task {
        /// Which task.
        task: &'static str,
        /// The join error.
        source: tokio::task::JoinError,
    },
}

/// Runs the hub with the store `cfg.storage` selects (SQLite in `cfg.data_dir` by
/// default, or PostgreSQL) until `shutdown` is cancelled.
///
/// `http_listener` is the bound HTTP listener (`cfg.http.listen` is not used here, so
/// tests can pass a listener on port 0). Validates `cfg` first. An unreachable
/// PostgreSQL at start is an error (a supervisor restarts the hub); once running, the
/// hub rides out database outages by retrying, without acknowledging anything.
pub async fn run(cfg: Config, http_listener: TcpListener, shutdown: CancellationToken) -> Result<(), HubError> {
    cfg.validate()?;
    let store: Arc<dyn HubStore> = match cfg.storage.backend {
        Backend::Sqlite => {
            let data_dir = cfg.data_dir.clone();
            // Opening runs migrations and may fsync: not on the async runtime.
            let store = tokio::task::spawn_blocking(move || SqliteStore::open(&data_dir))
                .await
                .map_err(|source| HubError::Task { task: "store open", source })??;
            tracing::info!(path = %store.path().display(), "sqlite store opened");
            Arc::new(store)
        }
        Backend::Postgres => {
            let options = cfg.storage.postgres.store_options(cfg.retention.keep)?;
            // Connecting blocks on this store's own runtime (see store::postgres), which
            // must not happen on an async worker thread.
            let store = tokio::task::spawn_blocking(move || PostgresStore::connect(options))
                .await
                .map_err(|source| HubError::Task { task: "store open", source })??;
            tracing::info!(target = %store.target(), "postgres store opened");
            Arc::new(store)
        }
    };
    run_with_store(cfg, store, http_listener, shutdown).await
}

/// How often retention looks for whole days to delete.
const RETENTION_CHECK: Duration = Duration::from_secs(3600);

/// Deletes raw readings older than `keep` (whole days), at start and every hour. With
/// several hubs each does it; the deletes are idempotent.
async fn retention(store: Arc<dyn HubStore>, keep: Duration, shutdown: CancellationToken) {
    loop {
        let now_ns = crate::clock::now_ns();
        let cutoff = now_ns.saturating_sub(i64::try_from(keep.as_nanos()).unwrap_or(i64::MAX));
        let st = store.clone();
        match tokio::task::spawn_blocking(move || st.drop_days_before(cutoff)).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::info!(readings = n, cutoff_ns = cutoff, "retention deleted old readings"),
            Ok(Err(e)) => tracing::error!(error = %e, "retention failed; will retry in an hour"),
            Err(e) => tracing::error!(error = %e, "retention task failed; will retry in an hour"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(RETENTION_CHECK) => {}
        }
    }
}

/// Keeps the fleet gauges current (`agent_missing_batches`, `agents_online`,
/// `agents_known`, the outbox gauges, `deployments`): one `agents()`, one `presence()` and
/// one `deployments()` query per `every` (`ingest.fleet_metrics_interval`), never per
/// scrape (they read every agent).
async fn refresh_fleet_metrics(
    store: Arc<dyn HubStore>,
    metrics: Arc<metrics::Metrics>,
    every: Duration,
    shutdown: CancellationToken,
) {
    loop {
        let st = store.clone();
        let fleet = tokio::task::spawn_blocking(move || {
            Ok::<_, store::StoreError>((st.agents()?, st.presence()?, st.deployments()?))
        })
        .await;
        match fleet {
            Ok(Ok((agents, presence, deployments))) => {
                let mut missing: std::collections::BTreeMap<String, i64> = Default::default();
                for a in &agents {
                    let n: u64 = a.missing.iter().map(|&(lo, hi)| hi - lo + 1).sum();
                    *missing.entry(a.agent_id.clone()).or_default() += n as i64;
                }
                for (agent, n) in missing {
                    metrics.agent_missing_batches.get_or_create(&vec![("agent_id".to_owned(), agent)]).set(n);
                }
                let now = crate::clock::now_ms();
                metrics.agents_online.set(presence.iter().filter(|p| p.online_at(now)).count() as i64);
                metrics.agents_known.set(presence.len() as i64);
                let outbox = presence.iter().map(|p| i64::try_from(p.status.outbox_batches).unwrap_or(i64::MAX));
                metrics.outbox_batches.set(outbox.clone().fold(0i64, i64::saturating_add));
                metrics.outbox_batches_max.set(outbox.max().unwrap_or(0));
                metrics.backlog_age_max.set(presence.iter().filter_map(|p| p.backlog_age_s()).max().unwrap_or(0));
                for state in ["rolling", "paused", "done", "aborted", "rolled_back"] {
                    let n = deployments.iter().filter(|d| d.state.as_str() == state).count();
                    metrics.deployments.get_or_create(&[("state", state)]).set(n as i64);
                }
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot refresh the per-agent metrics; retrying"),
            Err(e) => tracing::warn!(error = %e, "per-agent metrics task failed; retrying"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// Like [`run`], with a store chosen by the caller.
///
/// Shutdown order: stop taking new batches and let the ingest task commit and ack the
/// group it holds, then send DISCONNECT to the broker, then let in-flight HTTP requests
/// finish. Each wait is bounded; on timeout the remaining work is dropped, which loses
/// nothing durable (unacknowledged batches are re-sent by agents).
pub async fn run_with_store(
    cfg: Config,
    store: Arc<dyn HubStore>,
    http_listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), HubError> {
    cfg.validate()?;
    let metrics = metrics::Metrics::new();
    let tracker = TaskTracker::new();
    let fleet = Arc::new(
        fleet::FleetHandle::new(&cfg.fleet)
            .map_err(|e| ConfigError::Invalid { key: "fleet.trusted_keys", reason: e.to_string() })?,
    );

    // The MQTT task has its own token: it must outlive `shutdown` so that the ingest
    // task's final acks and the DISCONNECT still go out.
    let mqtt_stop = CancellationToken::new();
    let auth = Arc::new(
        auth::Auth::new(&cfg.http.tokens).map_err(|reason| ConfigError::Invalid { key: "http.tokens", reason })?,
    );
    if auth.is_open() {
        tracing::warn!("no http.tokens: the HTTP API and dashboard are open to anyone who can reach the port");
    }
    let sealer = match &cfg.mqtt.signing_key {
        None => mqtt::Sealer::new(None),
        Some(path) => {
            let key = brume_signing::SecretKey::read(path)
                .map_err(|e| ConfigError::Invalid { key: "mqtt.signing_key", reason: e.to_string() })?;
            tracing::info!(public_key = %key.public(), key_id = %key.public().id(), "signing messages to agents");
            mqtt::Sealer::new(Some(key))
        }
    };
    let (mqtt, deliveries, event_loop) = mqtt::start(&cfg, sealer, metrics.clone(), mqtt_stop.clone())
        .map_err(|e| ConfigError::Invalid { key: "mqtt.tls", reason: e.to_string() })?;
    let mqtt_task = tracker.spawn(event_loop);

    let ingest = ingest::Ingest {
        committer: ingest::Committer {
            store: store.clone(),
            metrics: metrics.clone(),
            policy: ingest::QuarantinePolicy { attempts: cfg.ingest.quarantine_after, ..Default::default() },
        },
        mqtt: mqtt.clone(),
        deliveries,
        max_batches_per_tx: cfg.ingest.max_batches_per_tx,
        fleet_poke: Some(fleet.clone()),
    };
    let ingest_task = tracker.spawn(ingest.run(shutdown.clone()));
    if let Some(keep) = cfg.retention.keep {
        tracker.spawn(retention(store.clone(), keep, shutdown.clone()));
    }
    tracker.spawn(
        fleet::Reconciler { store: store.clone(), mqtt: mqtt.clone(), handle: fleet.clone(), cfg: cfg.fleet.clone() }
            .run(shutdown.clone()),
    );
    tracker.spawn(refresh_fleet_metrics(
        store.clone(),
        metrics.clone(),
        cfg.ingest.fleet_metrics_interval,
        shutdown.clone(),
    ));

    let addr = http_listener.local_addr().map_err(HubError::Http)?;
    let app = http::app(http::AppState {
        store,
        metrics: metrics.clone(),
        shutdown: shutdown.clone(),
        queries: Arc::new(tokio::sync::Semaphore::new(cfg.http.max_concurrent_queries)),
        fleet,
        auth,
    });
    let http_shutdown = shutdown.clone();
    let http_task = tracker.spawn(async move {
        axum::serve(http_listener, app).with_graceful_shutdown(http_shutdown.cancelled_owned()).await
    });
    tracker.close();
    tracing::info!(%addr, "HTTP API listening");

    shutdown.cancelled().await;
    tracing::info!("shutting down: finishing the current ingest transaction");
    let mut result = Ok(());
    match tokio::time::timeout(INGEST_DRAIN_TIMEOUT, ingest_task).await {
        Ok(Ok(())) => {}
        Ok(Err(source)) => result = Err(HubError::Task { task: "ingest", source }),
        Err(_) => tracing::warn!("ingest did not finish in {INGEST_DRAIN_TIMEOUT:?}; its batches stay unacknowledged"),
    }
    // Not connected: nothing queued can be delivered, and the event loop may be asleep
    // in its reconnect backoff. Stop it instead of waiting out the timeout.
    if metrics.mqtt_connected.get() == 0 {
        mqtt_stop.cancel();
    }
    // The DISCONNECT is queued behind the ingest task's last acks, so they are sent first.
    let disconnected = async {
        let _ = mqtt.disconnect().await;
        mqtt_task.await
    };
    if tokio::time::timeout(MQTT_DISCONNECT_TIMEOUT, disconnected).await.is_err() {
        tracing::warn!("MQTT disconnect did not complete in {MQTT_DISCONNECT_TIMEOUT:?}");
    }
    mqtt_stop.cancel();
    match tokio::time::timeout(HTTP_DRAIN_TIMEOUT, http_task).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => result = result.and(Err(HubError::Http(e))),
        Ok(Err(source)) => result = result.and(Err(HubError::Task { task: "http", source })),
        Err(_) => tracing::warn!("HTTP requests did not finish in {HTTP_DRAIN_TIMEOUT:?}"),
    }
    // Every task has ended or been abandoned after its timeout; this returns at once
    // unless something is stuck, which the bounded wait turns into a warning.
    if tokio::time::timeout(Duration::from_secs(1), tracker.wait()).await.is_err() {
        tracing::warn!("some tasks did not stop");
    }
    tracing::info!("hub stopped");
    result
}
