//! The agent's local HTTP server: batch ingest, health, Prometheus metrics and a JSON
//! status.
//!
//! * `POST /api/v1/write[?stream=S]`: JSON (`Content-Type: application/json`: an object
//!   or an array of objects) or InfluxDB line protocol (anything else). 204 only after the
//!   readings are committed; 400 with `{"error": ...}` naming what is wrong; 413 when too
//!   large; 507 when the store refuses by policy; 503 when the store cannot write.
//! * `GET /healthz`: 200 `ok` while the store is writable, 503 otherwise.
//! * `GET /metrics`: Prometheus text format.
//! * `GET /api/v1/status`: store, outbox and connection state as JSON.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::forward::SharedForwardStatus;
use crate::ingest::payload::{self, PayloadConfig};
use crate::metrics::Metrics;
use crate::store::writer::{AppendError, StoreHandle};

/// State shared by the handlers.
#[derive(Clone)]
pub struct AppState {
    /// The agent's id.
    pub agent_id: String,
    /// The store.
    pub store: StoreHandle,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Prometheus registry built from `metrics`.
    pub registry: Arc<prometheus_client::registry::Registry>,
    /// Payload parsing options.
    pub payload: PayloadConfig,
    /// Forwarding status.
    pub forward: SharedForwardStatus,
    /// WASM module status.
    pub modules: crate::modules::SharedModuleStatus,
    /// Agent start time.
    pub started: std::time::Instant,
}

/// The router.
pub fn router(state: AppState) -> Router {
    let limit = state.payload.max_payload_bytes.saturating_mul(64).max(1 << 20);
    Router::new()
        .route("/api/v1/write", post(write))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/api/v1/status", get(status))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// Serves until `shutdown`; in-flight requests finish first.
pub async fn serve(listener: TcpListener, state: AppState, shutdown: CancellationToken) -> std::io::Result<()> {
    axum::serve(listener, router(state)).with_graceful_shutdown(shutdown.cancelled_owned()).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WriteParams {
    stream: Option<String>,
}

fn error(code: StatusCode, msg: impl std::fmt::Display) -> Response {
    (code, axum::Json(serde_json::json!({ "error": msg.to_string() }))).into_response()
}

async fn write(
    State(st): State<AppState>,
    params: Result<Query<WriteParams>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Query(params) = match params {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("bad query string: {e}")),
    };
    let ct = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
    let readings = match payload::parse_http(params.stream.as_deref(), ct, &body, crate::now_ns(), &st.payload) {
        Ok(r) => r,
        Err(e) => {
            st.metrics.bad(e.reason());
            let code = if e.reason() == "too_large" { StatusCode::PAYLOAD_TOO_LARGE } else { StatusCode::BAD_REQUEST };
            return error(code, e);
        }
    };
    let n = readings.len();
    st.metrics.received("http", n as u64);
    match st.store.append(readings).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e @ AppendError::Refused(_)) => error(StatusCode::INSUFFICIENT_STORAGE, e),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

async fn healthz(State(st): State<AppState>) -> Response {
    match st.store.status() {
        None => (StatusCode::OK, "ok").into_response(),
        Some(kind) => (StatusCode::SERVICE_UNAVAILABLE, format!("store unavailable: {kind}")).into_response(),
    }
}

async fn metrics(State(st): State<AppState>) -> Response {
    let snap = st.store.snapshot().borrow().clone();
    st.metrics.set_snapshot(&snap, st.store.status().is_some());
    let mut text = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &st.registry) {
        return error(StatusCode::INTERNAL_SERVER_ERROR, e);
    }
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text).into_response()
}

async fn status(State(st): State<AppState>) -> Response {
    let snap = st.store.snapshot().borrow().clone();
    let fwd = st.forward.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let losses = st.store.read(|r| r.losses()).await.unwrap_or_default();
    let oldest_age_s = snap.oldest_created_ms.map(|c| ((crate::now_ns() / 1_000_000 - c).max(0)) as f64 / 1000.0);
    axum::Json(serde_json::json!({
        "agent_id": st.agent_id,
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_s": st.started.elapsed().as_secs(),
        "store": {
            "epoch": snap.epoch,
            "status": st.store.status().unwrap_or("ok"),
            "bytes": snap.bytes,
            "readings": snap.readings,
            "streams": snap.streams,
            "unbatched_readings": snap.unbatched,
        },
        "outbox": {
            "batches": snap.outbox_batches,
            "readings": snap.outbox_readings,
            "oldest_seq": snap.oldest_seq,
            "newest_seq": snap.newest_seq,
            "oldest_age_s": oldest_age_s,
        },
        "forward": fwd,
        "modules": st.modules.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect::<Vec<_>>(),
        "losses": losses.iter().map(|l| serde_json::json!({
            "stream": l.stream, "reason": l.reason.as_str(), "total": l.total,
        })).collect::<Vec<_>>(),
    }))
    .into_response()
}
