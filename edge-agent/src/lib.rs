//! Brume edge agent.
//!
//! Sensors publish to the built-in MQTT listener (or the agent subscribes to a local
//! broker, or they POST over HTTP, or the simulator runs); every reading is committed to
//! the local SQLite [`store`] before it is acknowledged; committed readings are cut into
//! batches in the store's outbox; the [`forward`]er sends the batches over MQTT and
//! deletes each only when the hub says it has committed it.
//!
//! Start at [`run`]. `ARCHITECTURE.md` at the repository root has the bird's-eye view.

pub mod cli;
pub mod config;
pub mod fleet;
pub mod forward;
pub mod http;
pub mod ingest;
pub mod metrics;
pub mod modules;
pub mod store;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::store::StoreOptions;
use crate::store::writer::StoreHandle;

/// Nanoseconds since the Unix epoch, now.
pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos().min(i64::MAX as u128) as i64)
        .unwrap_or(0)
}

/// Labels the agent sets itself; operator labels may not start with it.
pub const PLATFORM_LABEL_PREFIX: &str = "brume.";

/// What this agent runs on, as labels in its presence messages, so that the hub shows
/// them and deployments select by them like by any label (as Kubernetes' well-known
/// `kubernetes.io/arch` node label): `brume.arch` (`x86_64`, `aarch64`, `armv7`),
/// `brume.build` (`jit`: compiles modules itself; `runtime`: loads them precompiled)
/// and `brume.engine` (the wasmtime release precompiled code must match).
pub fn platform_labels() -> [(String, String); 3] {
    let arch = brume_wasm_host::Target::host().map_or(std::env::consts::ARCH, brume_wasm_host::Target::name);
    let build = if brume_wasm_host::WasmEngine::can_compile() { "jit" } else { "runtime" };
    [
        ("brume.arch".into(), arch.into()),
        ("brume.build".into(), build.into()),
        ("brume.engine".into(), brume_wasm_host::ENGINE_VERSION.into()),
    ]
}

/// Tells systemd (a `Type=notify` unit, see `cross/systemd/edge-agent.service`) that the
/// agent is up, and starts the watchdog pings when the unit asks for them
/// (`WatchdogSec=`). Nothing happens without systemd (`NOTIFY_SOCKET` unset).
///
/// The pings come from a task on the agent's runtime, every half of the watchdog period:
/// a runtime that hangs (a deadlock, a worker blocked forever) stops them, and systemd
/// kills and restarts the agent, which resumes from its durable store.
fn systemd_ready(shutdown: &CancellationToken) -> Option<tokio::task::JoinHandle<()>> {
    std::env::var_os("NOTIFY_SOCKET")?;
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        tracing::warn!(error = %e, "cannot notify systemd that the agent is ready");
    }
    let period = sd_notify::watchdog_enabled()? / 2;
    tracing::info!(period_ms = period.as_millis() as u64, "systemd watchdog enabled");
    let stop = shutdown.clone();
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
                }
                () = stop.cancelled() => return,
            }
        }
    }))
}

/// The sockets the agent serves on, bound by the caller (tests bind port 0).
pub struct Listeners {
    /// Built-in MQTT listener, if enabled.
    pub mqtt: Option<TcpListener>,
    /// Local HTTP server, if enabled.
    pub http: Option<TcpListener>,
}

impl Listeners {
    /// Binds the addresses in the config.
    pub async fn bind(cfg: &Config) -> anyhow::Result<Listeners> {
        let mqtt = if cfg.listener.enabled {
            Some(
                TcpListener::bind(cfg.listener.listen)
                    .await
                    .with_context(|| format!("cannot listen for MQTT on {} (listener.listen)", cfg.listener.listen))?,
            )
        } else {
            None
        };
        let http = if cfg.http.enabled {
            Some(
                TcpListener::bind(cfg.http.listen)
                    .await
                    .with_context(|| format!("cannot listen for HTTP on {} (http.listen)", cfg.http.listen))?,
            )
        } else {
            None
        };
        Ok(Listeners { mqtt, http })
    }
}

/// Runs the agent until `shutdown` is cancelled, then shuts down in order:
/// stop ingest (pending commits finish and are acknowledged) → stop taking deployments →
/// stop WASM modules after
/// their current batch (its outputs and progress commit together) → stop forwarding and
/// disconnect → the store writer commits what it has and exits.
pub async fn run(cfg: Config, listeners: Listeners, shutdown: CancellationToken) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::default());
    let (store, writer) = StoreHandle::start(
        cfg.data_dir.clone(),
        &cfg.agent_id,
        StoreOptions::from_config(&cfg),
        crate::store::writer::WriterOptions::from_config(&cfg.store),
        metrics.clone(),
    )
    .with_context(|| format!("cannot open the store in {} (data_dir)", cfg.data_dir.display()))?;
    let snap = store.snapshot().borrow().clone();
    tracing::info!(
        agent_id = %cfg.agent_id,
        data_dir = %cfg.data_dir.display(),
        epoch = snap.epoch,
        readings = snap.readings,
        outbox_batches = snap.outbox_batches,
        "store open"
    );

    let ingest_stop = CancellationToken::new();
    let forward_stop = CancellationToken::new();
    let ingest = TaskTracker::new();
    let forward_status = Arc::new(Mutex::new(forward::ForwardStatus::default()));
    let module_status: modules::SharedModuleStatus = Arc::new(Mutex::new(Default::default()));

    // Modules from deployments: the fleet state decides which builds the runners start
    // with (exactly those decided before the last stop).
    let fleet_stop = CancellationToken::new();
    let (fleet, fleet_link, managed) = if cfg.fleet.enabled() {
        let (fleet, links) = fleet::Fleet::open(&cfg, module_status.clone()).context("opening the fleet state")?;
        let link = forward::FleetLink { desired: links.desired.clone(), reports: links.reports };
        (Some((fleet, links.desired.subscribe())), Some(link), Some(links.specs))
    } else {
        (None, None, None)
    };
    // Modules start before ingest so that `start_at = "latest"` means from agent start.
    let runners = modules::ModuleRunners::start(&cfg, store.clone(), metrics.clone(), module_status.clone(), managed)
        .context("starting WASM modules")?;
    let fleet_task = fleet.map(|(fleet, desired)| tokio::spawn(fleet.run(desired, fleet_stop.clone())));
    if let Some(l) = listeners.mqtt {
        tracing::info!(addr = %l.local_addr()?, "MQTT listener for sensors");
        ingest.spawn(ingest::mqtt_listener::serve(
            l,
            cfg.listener.clone(),
            cfg.payload.clone(),
            store.clone(),
            metrics.clone(),
            ingest_stop.clone(),
        ));
    }
    if let Some(l) = listeners.http {
        tracing::info!(addr = %l.local_addr()?, "HTTP: /api/v1/write, /healthz, /metrics, /api/v1/status");
        let state = http::AppState {
            agent_id: cfg.agent_id.clone(),
            store: store.clone(),
            registry: Arc::new(metrics.registry()),
            metrics: metrics.clone(),
            payload: cfg.payload.clone(),
            forward: forward_status.clone(),
            modules: module_status.clone(),
            started: std::time::Instant::now(),
        };
        let stop = ingest_stop.clone();
        ingest.spawn(async move {
            if let Err(e) = http::serve(l, state, stop).await {
                tracing::error!(error = %e, "HTTP server failed");
            }
        });
    }
    if cfg.subscribe.enabled {
        ingest.spawn(ingest::subscribe::run(
            cfg.subscribe.clone(),
            cfg.agent_id.clone(),
            cfg.payload.clone(),
            store.clone(),
            metrics.clone(),
            ingest_stop.clone(),
        ));
    }
    if cfg.simulator.enabled {
        ingest.spawn(ingest::simulator::run(
            cfg.simulator.clone(),
            store.clone(),
            metrics.clone(),
            ingest_stop.clone(),
        ));
    }
    ingest.close();
    let forwarder = tokio::spawn(forward::run(
        cfg.clone(),
        store.clone(),
        metrics.clone(),
        forward_status,
        module_status.clone(),
        fleet_link,
        forward_stop.clone(),
    ));

    let watchdog = systemd_ready(&shutdown);

    shutdown.cancelled().await;
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    if let Some(w) = watchdog {
        w.abort();
    }
    tracing::info!("shutting down: stopping ingest");
    ingest_stop.cancel();
    if tokio::time::timeout(Duration::from_secs(10), ingest.wait()).await.is_err() {
        tracing::warn!("ingest did not stop within 10 s; unacknowledged readings stay with their senders");
    }
    if let Some(mut task) = fleet_task {
        // Between steps it stops at once; a download in progress is dropped (the part
        // file is resumed at the next start).
        fleet_stop.cancel();
        if tokio::time::timeout(Duration::from_secs(2), &mut task).await.is_err() {
            task.abort();
        }
    }
    tracing::info!("stopping modules after their current batch");
    // A batch is bounded by the module's time budget, but a module still compiling (a
    // child process, up to 300 s) is not: leave it. Modules resume from their last commit.
    if tokio::time::timeout(Duration::from_secs(10), tokio::task::spawn_blocking(move || runners.stop())).await.is_err()
    {
        tracing::warn!("modules did not stop within 10 s; leaving them (they resume from their last commit)");
    }
    tracing::info!("stopping forwarding");
    forward_stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), forwarder).await;
    drop(store);
    // The writer exits once every handle is gone, after committing what it holds. A module
    // left running above still holds one: then stop waiting. Nothing it holds was
    // acknowledged, and SQLite recovers its WAL at the next start.
    if tokio::time::timeout(Duration::from_secs(30), tokio::task::spawn_blocking(move || writer.join())).await.is_err()
    {
        tracing::warn!("the store writer did not finish within 30 s; exiting without it");
    }
    tracing::info!("stopped");
    Ok(())
}
