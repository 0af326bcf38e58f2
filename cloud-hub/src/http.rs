//! The HTTP API: health, metrics and read-only JSON queries over the store.
//!
//! Handlers hold no state of their own ([`AppState`] is the store and the metrics), and
//! every store call runs on a blocking thread. JSON is built with `serde_json::json!`
//! rather than derived: only protocol types derive `Serialize`, so the API's shapes are
//! written out here, in one place.

use std::sync::Arc;

use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use brume_protocol::Value;
use serde_json::json;

use crate::aggregate::{self, AggregateError, AggregateQuery};
use crate::metrics::Metrics;
use crate::store::{
    AgentSummary, Cursor, HubStore, MAX_QUARANTINE_PAGE, QuarantinedBatch, ReadingsQuery, StoreError, StreamSummary,
};

/// Default page size of `GET /api/v1/readings`.
pub const DEFAULT_LIMIT: usize = 1000;
/// Largest page size of `GET /api/v1/readings`. Pages are streamed (see `readings`), so
/// this does not bound memory; it bounds how long one request holds a query permit.
pub const MAX_LIMIT: usize = 10_000;

/// Shared state of the handlers.
#[derive(Clone)]
pub struct AppState {
    /// The store the API reads.
    pub store: Arc<dyn HubStore>,
    /// Metrics served at `/metrics`.
    pub metrics: Arc<Metrics>,
    /// Cancelled when the hub stops: ends long-lived responses (live tails), so the
    /// server's graceful shutdown does not wait for dashboards to disconnect.
    pub shutdown: tokio_util::sync::CancellationToken,
    /// One permit per expensive query running (`http.max_concurrent_queries`): a query
    /// that finds none is refused with 503 and `Retry-After` instead of queueing, so
    /// neither memory nor the database's load grow with the number of dashboards.
    pub queries: Arc<tokio::sync::Semaphore>,
    /// The control plane: upload checks, and the reconciler's wake-up.
    pub fleet: Arc<crate::fleet::FleetHandle>,
    /// API tokens (`[[http.tokens]]`); without any, the API is open.
    pub auth: Arc<crate::auth::Auth>,
}

impl AppState {
    /// A permit for an expensive query, or the 503 that says to come back.
    pub(crate) fn query_permit(&self) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
        Arc::clone(&self.queries).try_acquire_owned().map_err(|_| {
            self.metrics.queries_refused.inc();
            ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                message: "too many expensive queries are running (http.max_concurrent_queries); retry in a second"
                    .into(),
            }
        })
    }
}

/// Builds the router.
pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/v1/streams", get(streams))
        .route("/api/v1/readings", get(readings))
        .route("/api/v1/agents", get(agents))
        .route("/api/v1/modules", get(modules))
        .route("/api/v1/aggregate", get(aggregate))
        .route("/api/v1/fleet/aggregate", get(fleet_aggregate))
        .route("/api/v1/presence", get(presence))
        .route("/api/v1/tail", get(tail))
        .route("/api/v1/quarantine", get(quarantine_list))
        .route("/api/v1/quarantine/{id}", axum::routing::delete(quarantine_discard))
        .route("/api/v1/quarantine/{id}/payload", get(quarantine_payload))
        .route("/api/v1/quarantine/{id}/reingest", axum::routing::post(quarantine_reingest))
        .route("/api/v1/openapi.json", get(|| async { ([(header::CONTENT_TYPE, "application/json")], OPENAPI) }))
        .route("/api/v1/session", get(crate::auth::session).post(crate::auth::session).delete(crate::auth::session))
        .merge(crate::fleet::http::routes(&state))
        .merge(crate::dashboard::routes())
        .layer(axum::middleware::from_fn_with_state(state.auth.clone(), crate::auth::check))
        .with_state(state)
}

/// An API error: a status and a message, sent as `{"error": message}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    /// An error with this status and message.
    pub(crate) fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError { status, message: message.into() }
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError { status: StatusCode::BAD_REQUEST, message: message.into() }
    }
}

impl ApiError {
    pub(crate) fn not_found(message: impl Into<String>) -> ApiError {
        ApiError { status: StatusCode::NOT_FOUND, message: message.into() }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        tracing::error!(error = %e, "store query failed");
        ApiError { status: StatusCode::INTERNAL_SERVER_ERROR, message: e.to_string() }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, axum::Json(json!({ "error": self.message }))).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut().insert(header::RETRY_AFTER, axum::http::HeaderValue::from_static("1"));
        }
        resp
    }
}

/// Runs a store query on a blocking thread.
pub(crate) async fn query<T: Send + 'static>(
    store: &Arc<dyn HubStore>,
    f: impl FnOnce(&dyn HubStore) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, ApiError> {
    let store = Arc::clone(store);
    tokio::task::spawn_blocking(move || f(&*store))
        .await
        .map_err(|e| ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: format!("query task failed: {e}"),
        })?
        .map_err(ApiError::from)
}

/// Ready when the MQTT connection is up and the store answers: a load balancer or
/// orchestrator sends no traffic (and an operator gets paged) otherwise. 503 names what is
/// down.
async fn readyz(State(s): State<AppState>) -> Response {
    let mqtt = s.metrics.mqtt_connected.get() == 1;
    let store = Arc::clone(&s.store);
    let db = match tokio::time::timeout(
        std::time::Duration::from_secs(5),
        tokio::task::spawn_blocking(move || store.ping()),
    )
    .await
    {
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(Ok(Err(e))) => Err(e.to_string()),
        Ok(Err(e)) => Err(format!("ping task failed: {e}")),
        Err(_) => Err("no answer within 5 s".to_string()),
    };
    let body = json!({
        "mqtt": if mqtt { "connected" } else { "disconnected" },
        "store": match &db { Ok(()) => "ok".to_string(), Err(e) => e.clone() },
    });
    let status = if mqtt && db.is_ok() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, axum::Json(body)).into_response()
}

async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], s.metrics.encode())
}

/// A stream, or the re-processed variant of one (`build`: the sha256 of the module build
/// that computed it; see `/api/v1/reprocess`).
fn stream_json(s: &StreamSummary) -> serde_json::Value {
    let (stream, build) = brume_protocol::split_variant(&s.stream);
    let mut v = json!({
        "stream": stream,
        "readings": s.readings,
        "first_ts_ns": s.first_ts_ns,
        "last_ts_ns": s.last_ts_ns,
    });
    if let Some(b) = build {
        v["build"] = json!(b);
    }
    v
}

/// The stored name of `stream`, or of its re-processed variant by `build` (64 hex digits
/// of a module build's sha256) when given.
fn stored_stream(stream: Option<String>, build: Option<String>) -> Result<String, String> {
    let stream = stream.filter(|s| !s.is_empty()).ok_or("missing parameter `stream`")?;
    match build {
        None => Ok(stream),
        Some(b) => {
            let sha = brume_protocol::ModuleRef::parse_sha256(&b)
                .ok_or_else(|| format!("parameter `build`: {b:?} is not a sha256 (64 hex digits)"))?;
            Ok(brume_protocol::variant_stream(&stream, &sha))
        }
    }
}

/// `stream` and `build` of a query response, from the stored name.
fn stream_fields(stored: &str) -> (&str, Option<&str>) {
    brume_protocol::split_variant(stored)
}

/// Filters of the listing endpoints, each accepted where it makes sense.
#[derive(Debug, Default)]
struct ListFilter {
    /// Streams: an MQTT-style pattern (`plant/+/temp`, `plant/#`).
    pattern: Option<String>,
    /// Agents and presence: agent ids starting with this.
    prefix: Option<String>,
    /// Presence: only online (true) or offline (false) agents.
    online: Option<bool>,
    /// Streams: only those this agent sent.
    agent: Option<String>,
    /// Agents and presence: `key:value` labels the agent must all carry.
    labels: Vec<(String, String)>,
}

impl ListFilter {
    /// Parses `params`, accepting only the names in `allowed`.
    fn parse(
        params: Result<Query<Vec<(String, String)>>, QueryRejection>,
        allowed: &[&str],
    ) -> Result<ListFilter, ApiError> {
        let Query(params) = params.map_err(|e| ApiError::bad_request(format!("invalid query string: {e}")))?;
        let mut f = ListFilter::default();
        for (k, v) in params {
            match k.as_str() {
                k if !allowed.contains(&k) => {
                    return Err(ApiError::bad_request(format!(
                        "unknown parameter `{k}` (accepted: {})",
                        allowed.join(", ")
                    )));
                }
                "match" => {
                    brume_protocol::topics::validate_pattern(&v)
                        .map_err(|why| ApiError::bad_request(format!("parameter `match`: {why}")))?;
                    f.pattern = Some(v);
                }
                "prefix" => f.prefix = Some(v),
                "agent" => f.agent = Some(v),
                "label" => {
                    let (k, val) = v
                        .split_once(':')
                        .ok_or_else(|| ApiError::bad_request(format!("parameter `label`: {v:?} is not key:value")))?;
                    f.labels.push((k.to_owned(), val.to_owned()));
                }
                "online" => {
                    f.online = Some(v.parse().map_err(|_| {
                        ApiError::bad_request(format!("parameter `online`: {v:?} is not true or false"))
                    })?)
                }
                _ => unreachable!("allowed names are handled above"),
            }
        }
        Ok(f)
    }

    fn stream(&self, name: &str) -> bool {
        self.pattern.as_deref().is_none_or(|p| brume_protocol::topics::pattern_matches(p, name))
    }

    fn agent(&self, id: &str) -> bool {
        self.prefix.as_deref().is_none_or(|p| id.starts_with(p))
    }

    /// Whether an agent with these labels passes the `label` filters.
    fn labelled(&self, labels: &[(String, String)]) -> bool {
        self.labels.iter().all(|want| labels.contains(want))
    }
}

/// All streams, or those matching `match=<pattern>`; with `agent=<id>`, the streams that
/// agent sent, with its own readings in each; with `label=k:v` (repeatable), the streams
/// the agents with those labels sent, with their readings summed.
async fn streams(
    State(s): State<AppState>,
    params: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let f = ListFilter::parse(params, &["match", "agent", "label"])?;
    let list = match (f.agent.clone(), f.labels.is_empty()) {
        (Some(agent), true) => query(&s.store, move |st| st.agent_streams(&agent)).await?,
        (None, true) => query(&s.store, |st| st.streams()).await?,
        (agent, false) => {
            let labels = f.labels.clone();
            query(&s.store, move |st| {
                let mut merged: std::collections::BTreeMap<String, StreamSummary> = Default::default();
                for p in st.presence()? {
                    let id = &p.status.agent_id;
                    if !labels.iter().all(|l| p.status.labels.contains(l)) || agent.as_ref().is_some_and(|a| a != id) {
                        continue;
                    }
                    for x in st.agent_streams(id)? {
                        let m = merged.entry(x.stream.clone()).or_insert(StreamSummary {
                            stream: x.stream.clone(),
                            readings: 0,
                            first_ts_ns: None,
                            last_ts_ns: None,
                        });
                        m.readings += x.readings;
                        m.first_ts_ns = m.first_ts_ns.into_iter().chain(x.first_ts_ns).min();
                        m.last_ts_ns = m.last_ts_ns.into_iter().chain(x.last_ts_ns).max();
                    }
                }
                Ok(merged.into_values().collect::<Vec<_>>())
            })
            .await?
        }
    };
    Ok(axum::Json(
        list.iter().filter(|x| f.stream(brume_protocol::split_variant(&x.stream).0)).map(stream_json).collect(),
    ))
}

/// Parses `/api/v1/aggregate` parameters: `stream`, `field` (default `value`), `from` and
/// `to` (ns, required), and either `step` (a duration: `10s`, `5m`, `1h`) or `buckets`
/// (default 500, at most [`aggregate::MAX_BUCKETS`]); `build` selects the re-processed
/// variant computed by that module build.
pub fn parse_aggregate_query(params: &[(String, String)]) -> Result<AggregateQuery, String> {
    let (mut stream, mut field, mut from, mut to, mut step, mut buckets) = (None, None, None, None, None, None);
    let mut build = None;
    let int =
        |name: &str, v: &str| v.parse::<i64>().map_err(|_| format!("parameter `{name}`: {v:?} is not an integer"));
    for (k, v) in params {
        match k.as_str() {
            "stream" => stream = Some(v.clone()),
            "build" => build = Some(v.clone()),
            "field" => field = Some(v.clone()),
            "from" => from = Some(int("from", v)?),
            "to" => to = Some(int("to", v)?),
            "step" => {
                let d = humantime::parse_duration(v)
                    .map_err(|e| format!("parameter `step`: {v:?} is not a duration like 10s, 5m or 1h: {e}"))?;
                step = Some(
                    i64::try_from(d.as_nanos())
                        .ok()
                        .filter(|&n| n > 0)
                        .ok_or_else(|| format!("parameter `step`: {v:?} must be positive and under 292 years"))?,
                );
            }
            "buckets" => {
                buckets = Some(match v.parse::<i64>() {
                    Ok(n) if (1..=aggregate::MAX_BUCKETS).contains(&n) => n,
                    _ => {
                        return Err(format!(
                            "parameter `buckets`: {v:?} is not an integer from 1 to {}",
                            aggregate::MAX_BUCKETS
                        ));
                    }
                })
            }
            other => return Err(format!("unknown parameter `{other}`")),
        }
    }
    let stream = stored_stream(stream, build)?;
    let (from, to) = match (from, to) {
        (Some(f), Some(t)) if f < t => (f, t),
        (Some(f), Some(t)) => return Err(format!("`from` ({f}) must be before `to` ({t})")),
        _ => return Err("parameters `from` and `to` (ns since the Unix epoch) are required".into()),
    };
    let step = match (step, buckets) {
        (Some(_), Some(_)) => return Err("give `step` or `buckets`, not both".into()),
        (Some(s), None) => s,
        (None, b) => aggregate::step_for(from, to, b.unwrap_or(500)),
    };
    Ok(AggregateQuery { stream, field: field.unwrap_or_else(|| "value".into()), from, to, step })
}

/// Runs an aggregation on a blocking thread: a query out of range is the client's 400.
async fn run_aggregation<T: Send + 'static>(
    store: &Arc<dyn HubStore>,
    f: impl FnOnce(&dyn HubStore) -> Result<T, AggregateError> + Send + 'static,
) -> Result<T, ApiError> {
    let store = Arc::clone(store);
    match tokio::task::spawn_blocking(move || f(&*store)).await {
        Ok(Ok(out)) => Ok(out),
        Ok(Err(AggregateError::Invalid(m))) => Err(ApiError::bad_request(m)),
        Ok(Err(AggregateError::Store(e))) => Err(e.into()),
        Err(e) => Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("query task failed: {e}"))),
    }
}

/// Buckets of one numeric field: count, min, max, mean and last per bucket.
async fn aggregate(
    State(s): State<AppState>,
    params: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::bad_request(format!("invalid query string: {e}")))?;
    let q = parse_aggregate_query(&params).map_err(ApiError::bad_request)?;
    let _permit = s.query_permit()?;
    let q2 = q.clone();
    let out = run_aggregation(&s.store, move |st| aggregate::aggregate(st, &q2)).await?;
    let buckets: Vec<serde_json::Value> = out.buckets.iter().map(|(start, a)| bucket_json(*start, a)).collect();
    let (stream, build) = stream_fields(&q.stream);
    let mut v = json!({
        "stream": stream,
        "field": q.field,
        "from_ns": out.from,
        "to_ns": out.to,
        "step_ns": q.step,
        "source": if out.from_rollups { "rollups" } else { "raw" },
        "buckets": buckets,
    });
    if let Some(b) = build {
        v["build"] = json!(b);
    }
    Ok(axum::Json(v))
}

/// One stream across many agents: `GET /api/v1/fleet/aggregate` takes the parameters of
/// `/api/v1/aggregate` plus `label=key:value` (repeatable; all must match) and `prefix`
/// (agent ids starting with it), which select agents by their presence labels. Per
/// bucket: agents, count, min, max, mean, and p50 and p95 of the agents' means.
async fn fleet_aggregate(
    State(s): State<AppState>,
    params: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::bad_request(format!("invalid query string: {e}")))?;
    let (select, rest): (Vec<_>, Vec<_>) = params.into_iter().partition(|(k, _)| k == "label" || k == "prefix");
    let f = ListFilter::parse(Ok(Query(select)), &["label", "prefix"])?;
    let mut q = parse_aggregate_query(&rest).map_err(ApiError::bad_request)?;
    if !rest.iter().any(|(k, _)| k == "step") {
        // A step chosen from `buckets` is whole minutes from a minute up; below, a minute.
        q.step = q.step.max(aggregate::ROLLUP_NS);
    }
    if q.step % aggregate::ROLLUP_NS != 0 {
        return Err(ApiError::bad_request(
            "parameter `step`: fleet aggregation reads one-minute rollups, so the step must be a whole number of minutes",
        ));
    }
    let _permit = s.query_permit()?;
    let agents = if f.labels.is_empty() && f.prefix.is_none() {
        None
    } else {
        let presence = query(&s.store, |st| st.presence()).await?;
        Some(
            presence
                .into_iter()
                .filter(|p| f.agent(&p.status.agent_id) && f.labelled(&p.status.labels))
                .map(|p| p.status.agent_id)
                .collect::<Vec<_>>(),
        )
    };
    let fq = aggregate::FleetQuery {
        stream: q.stream.clone(),
        field: q.field.clone(),
        from: q.from,
        to: q.to,
        step: q.step,
        agents: agents.clone(),
    };
    let out = run_aggregation(&s.store, move |st| aggregate::fleet(st, &fq)).await?;
    let (stream, build) = stream_fields(&q.stream);
    let mut v = json!({
        "stream": stream,
        "field": q.field,
        "from_ns": out.from,
        "to_ns": out.to,
        "step_ns": q.step,
        "agents": agents,
        "buckets": out.buckets.iter().map(|b| json!({
            "start_ns": b.start, "agents": b.agents, "count": b.count, "min": b.min, "max": b.max,
            "mean": b.mean, "p50": b.p50, "p95": b.p95,
        })).collect::<Vec<_>>(),
    });
    if let Some(b) = build {
        v["build"] = json!(b);
    }
    Ok(axum::Json(v))
}

/// Parses the query string of `GET /api/v1/readings`, naming the bad parameter on error.
pub fn parse_readings_query(params: &[(String, String)]) -> Result<ReadingsQuery, String> {
    let mut stream = None;
    let mut build = None;
    let mut from = None;
    let mut to = None;
    let mut limit = DEFAULT_LIMIT;
    let mut after = None;
    let int =
        |name: &str, v: &str| v.parse::<i64>().map_err(|_| format!("parameter `{name}`: {v:?} is not an integer"));
    for (k, v) in params {
        match k.as_str() {
            "stream" => stream = Some(v.clone()),
            "build" => build = Some(v.clone()),
            "from" => from = Some(int("from", v)?),
            "to" => to = Some(int("to", v)?),
            "limit" => {
                limit = match v.parse::<usize>() {
                    Ok(n) if (1..=MAX_LIMIT).contains(&n) => n,
                    _ => {
                        return Err(format!("parameter `limit`: {v:?} is not an integer from 1 to {MAX_LIMIT}"));
                    }
                }
            }
            "after" => {
                after = Some(Cursor::from_token(v).ok_or_else(|| {
                    format!("parameter `after`: {v:?} is not a cursor returned as `next` by this API")
                })?)
            }
            other => return Err(format!("unknown parameter `{other}`")),
        }
    }
    let stream = stored_stream(stream, build)?;
    Ok(ReadingsQuery { stream, from, to, limit, after })
}

/// Converts a stored fields blob to a JSON object: numbers, booleans and strings.
pub fn fields_json(fields: &[brume_protocol::Field]) -> serde_json::Value {
    let map = fields
        .iter()
        .map(|f| {
            let v = match &f.value {
                // Stored fields are validated on ingest, so floats are finite; null is
                // the only JSON answer for a non-finite one anyway.
                Value::F64(x) => serde_json::Number::from_f64(*x).map_or(serde_json::Value::Null, Into::into),
                Value::I64(i) => (*i).into(),
                Value::Bool(b) => (*b).into(),
                Value::Str(s) => s.clone().into(),
            };
            (f.name.clone(), v)
        })
        .collect::<serde_json::Map<_, _>>();
    serde_json::Value::Object(map)
}

/// Readings read from the store per query while a page is streamed: the most rows a
/// request holds in memory at once, whatever its `limit`.
pub const SUB_PAGE: usize = 1000;
/// Encoded JSON sent to the client in pieces of about this size.
const CHUNK: usize = 64 * 1024;
/// How long a streamed page waits for a client that stops reading before dropping it.
const CLIENT_STALL: std::time::Duration = std::time::Duration::from_secs(30);

async fn readings(
    State(s): State<AppState>,
    params: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::bad_request(format!("invalid query string: {e}")))?;
    let q = parse_readings_query(&params).map_err(ApiError::bad_request)?;
    let permit = s.query_permit()?;
    // A page is streamed: read from the store SUB_PAGE rows at a time (keyset paging
    // inside the page, each a short read of its own), encoded reading by reading and sent
    // in CHUNK-sized pieces as the client takes them. A request holds at most one
    // sub-page of rows and a few chunks, so memory does not grow with `limit` or with the
    // speed of the client. The first sub-page is read before answering, so a failing
    // store still gets a proper error status; a later failure aborts the response (the
    // client sees a truncated body, never a well-formed short page) and is logged.
    let mut sub = ReadingsQuery { limit: q.limit.min(SUB_PAGE), ..q.clone() };
    let first = query(&s.store, {
        let sub = sub.clone();
        move |st| st.readings(&sub)
    })
    .await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(2);
    let store = Arc::clone(&s.store);
    let shutdown = s.shutdown.clone();
    tokio::spawn(async move {
        // Declared in this order so the permit is released before the sender is dropped,
        // which is what ends the body: a client that has read a page may start the next.
        let tx = tx;
        let _permit = permit;
        let send = |chunk: Vec<u8>| {
            let tx = tx.clone();
            async move {
                match tokio::time::timeout(CLIENT_STALL, tx.send(Ok(chunk.into()))).await {
                    Ok(Ok(())) => true,
                    Ok(Err(_)) => false, // the client went away
                    Err(_) => {
                        tracing::warn!(
                            stalled_s = CLIENT_STALL.as_secs(),
                            "readings client stopped reading; response dropped"
                        );
                        false
                    }
                }
            }
        };
        let mut buf = Vec::with_capacity(CHUNK + 4096);
        let (stream, build) = stream_fields(&q.stream);
        buf.extend_from_slice(b"{\"stream\":");
        serde_json::to_writer(&mut buf, stream).expect("writing to a Vec");
        if let Some(build) = build {
            buf.extend_from_slice(b",\"build\":");
            serde_json::to_writer(&mut buf, build).expect("writing to a Vec");
        }
        buf.extend_from_slice(b",\"readings\":[");
        let (mut page, mut left, mut first_reading) = (first, q.limit, true);
        let next = loop {
            for r in &page.readings {
                if let Err(e) = encode_reading(&mut buf, r, first_reading) {
                    tracing::error!(error = %e, stream = %q.stream, "stored readings cannot be decoded; response aborted");
                    let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
                    return;
                }
                first_reading = false;
                if buf.len() >= CHUNK && !send(std::mem::replace(&mut buf, Vec::with_capacity(CHUNK + 4096))).await {
                    return;
                }
            }
            left -= page.readings.len();
            match page.next.take() {
                Some(c) if left > 0 => sub = ReadingsQuery { limit: left.min(SUB_PAGE), after: Some(c), ..sub },
                // Either the stream has no more readings (None) or this page is full.
                next => break next,
            }
            if shutdown.is_cancelled() {
                let _ = tx.send(Err(std::io::Error::other("the hub is stopping"))).await;
                return;
            }
            let q2 = sub.clone();
            page = match query(&store, move |st| st.readings(&q2)).await {
                Ok(p) => p,
                Err(e) => {
                    let _ = tx.send(Err(std::io::Error::other(e.message))).await;
                    return;
                }
            };
        };
        buf.extend_from_slice(b"],\"next\":");
        serde_json::to_writer(&mut buf, &next.as_ref().map(|c| c.to_token())).expect("writing to a Vec");
        buf.push(b'}');
        send(buf).await;
    });
    let body = axum::body::Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

/// Appends one reading of a `/api/v1/readings` page to `buf`, preceded by a comma unless
/// it is the first.
fn encode_reading(buf: &mut Vec<u8>, r: &crate::store::StoredReading, first: bool) -> Result<(), StoreError> {
    let fields = r.fields.decode().map_err(|e| {
        StoreError::Corrupt(format!("fields of agent {} seq {} reading {}: {e}", r.agent_id, r.seq, r.idx))
    })?;
    let mut o =
        json!({ "ts_ns": r.ts_ns, "agent_id": r.agent_id, "seq": r.seq, "idx": r.idx, "fields": fields_json(&fields) });
    if let Some(m) = &r.module {
        o["module"] = module_json(m);
    }
    if !first {
        buf.push(b',');
    }
    serde_json::to_writer(&mut *buf, &o).expect("writing to a Vec");
    Ok(())
}

fn agent_json(a: &AgentSummary) -> serde_json::Value {
    json!({
        "agent_id": a.agent_id,
        "epoch": a.epoch,
        "batches": a.batches,
        "readings": a.readings,
        "watermark": a.watermark,
        "max_seq": a.max_seq,
        "missing": a.missing.iter().map(|&(lo, hi)| json!([lo, hi])).collect::<Vec<_>>(),
        "missing_since_ms": a.missing_since_ms,
        "losses": a.losses.iter().map(|l| json!({
            "stream": l.stream, "reason": l.reason.as_str(), "total": l.total,
        })).collect::<Vec<_>>(),
        "last_seen_ms": a.last_seen_ms,
    })
}

fn module_json(m: &brume_protocol::ModuleRef) -> serde_json::Value {
    json!({ "name": m.name, "version": m.version, "sha256": m.sha256_hex() })
}

fn bucket_json(start: i64, a: &aggregate::Agg) -> serde_json::Value {
    json!({ "start_ns": start, "count": a.count, "min": a.min, "max": a.max, "mean": a.mean(), "last": a.last })
}

/// The API described in OpenAPI 3 (`cloud-hub/openapi.json`), served at
/// `/api/v1/openapi.json`. A test checks it lists exactly the routes this router serves.
pub const OPENAPI: &str = include_str!("../openapi.json");

/// How often a live tail looks for new data.
const TAIL_POLL: std::time::Duration = std::time::Duration::from_secs(1);

/// Live tail for dashboards, as Server-Sent Events: `GET /api/v1/tail?stream=s&field=value&step=1m`
/// sends the current and previous bucket at once, then an event (`bucket`, the JSON of
/// one `/api/v1/aggregate` bucket) whenever a bucket of the last two steps changes. It
/// polls the store every second, so it sees what any hub instance ingested.
async fn tail(
    State(s): State<AppState>,
    params: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(mut params) = params.map_err(|e| ApiError::bad_request(format!("invalid query string: {e}")))?;
    if let Some(k) = params.iter().map(|(k, _)| k.as_str()).find(|k| !["stream", "field", "step"].contains(k)) {
        return Err(ApiError::bad_request(format!("unknown parameter `{k}`")));
    }
    if !params.iter().any(|(k, _)| k == "step") {
        params.push(("step".into(), "1m".into()));
    }
    // `from` and `to` are set per poll; placeholders make the shared parser check the rest.
    params.extend([("from".to_string(), "0".to_string()), ("to".to_string(), "1".to_string())]);
    let q = parse_aggregate_query(&params).map_err(ApiError::bad_request)?;
    let (tx, rx) = tokio::sync::mpsc::channel::<axum::response::sse::Event>(16);
    let store = Arc::clone(&s.store);
    let shutdown = s.shutdown.clone();
    tokio::spawn(async move {
        let mut sent: std::collections::BTreeMap<i64, aggregate::Agg> = Default::default();
        loop {
            let now = crate::clock::now_ns();
            let from = (now - q.step) - (now - q.step).rem_euclid(q.step);
            let mut poll = q.clone();
            (poll.from, poll.to) = (from, now.saturating_add(q.step));
            let st = Arc::clone(&store);
            let result = tokio::task::spawn_blocking(move || aggregate::aggregate(&*st, &poll)).await;
            match result {
                Ok(Ok(out)) => {
                    for (start, a) in out.buckets {
                        if sent.get(&start) != Some(&a) {
                            let ev = axum::response::sse::Event::default()
                                .event("bucket")
                                .data(bucket_json(start, &a).to_string());
                            if tx.send(ev).await.is_err() {
                                return; // the client went away
                            }
                            sent.insert(start, a);
                        }
                    }
                    sent.retain(|&start, _| start >= from);
                }
                Ok(Err(e)) => tracing::warn!(stream = %q.stream, error = %e, "live tail query failed; retrying"),
                Err(e) => tracing::warn!(error = %e, "live tail task failed; retrying"),
            }
            tokio::select! {
                _ = tx.closed() => return,
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(TAIL_POLL) => {}
            }
        }
    });
    let events = tokio_stream::StreamExt::map(
        tokio_stream::wrappers::ReceiverStream::new(rx),
        Ok::<_, std::convert::Infallible>,
    );
    Ok(axum::response::sse::Sse::new(events).keep_alive(axum::response::sse::KeepAlive::default()).into_response())
}

/// Every agent's presence: online or not, last seen, version, uptime, backlog, modules.
async fn presence(
    State(s): State<AppState>,
    params: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let f = ListFilter::parse(params, &["prefix", "online", "label"])?;
    let list = query(&s.store, |st| st.presence()).await?;
    let now = crate::clock::now_ms();
    Ok(axum::Json(
        list.iter()
            .filter(|p| {
                f.agent(&p.status.agent_id)
                    && f.labelled(&p.status.labels)
                    && f.online.is_none_or(|o| o == p.online_at(now))
            })
            .map(|p| {
                let st = &p.status;
                json!({
                    "agent_id": st.agent_id,
                    "online": p.online_at(now),
                    "last_seen_ms": p.received_ms,
                    "version": st.version,
                    "started_ms": st.started_ms,
                    "uptime_s": (st.sent_ms - st.started_ms).max(0) / 1000,
                    "heartbeat_s": st.heartbeat_s,
                    "store_readings": st.store_readings,
                    "outbox_batches": st.outbox_batches,
                    "outbox_readings": st.outbox_readings,
                    "oldest_outbox_ms": p.ext.oldest_outbox_ms,
                    "backlog_age_s": p.backlog_age_s(),
                    "labels": st.labels.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>(),
                    "modules": st.modules.iter().map(|m| json!({
                        "name": m.name, "sha256": m.sha256, "enabled": m.enabled,
                        "batches_failed": m.batches_failed,
                        "last_error": (!m.last_error.is_empty()).then_some(&m.last_error),
                    })).collect::<Vec<_>>(),
                })
            })
            .collect(),
    ))
}

fn quarantine_json(q: &QuarantinedBatch) -> serde_json::Value {
    json!({
        "id": q.id,
        "agent_id": q.agent_id,
        "epoch": q.epoch,
        "seq": q.seq,
        "topic": q.topic,
        "reason": q.reason.as_str(),
        "error": q.error,
        "bytes": q.bytes,
        "first_received_ms": q.first_received_ms,
        "last_received_ms": q.last_received_ms,
        "deliveries": q.deliveries,
    })
}

/// Quarantined batches, oldest first, one page (`after`, `limit`) at a time.
async fn quarantine_list(
    State(s): State<AppState>,
    params: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::bad_request(format!("invalid query string: {e}")))?;
    let (mut after, mut limit) = (0i64, 100usize);
    for (k, v) in &params {
        match k.as_str() {
            "after" => {
                after =
                    v.parse().map_err(|_| ApiError::bad_request(format!("parameter `after`: {v:?} is not an id")))?
            }
            "limit" => {
                limit = match v.parse::<usize>() {
                    Ok(n) if (1..=MAX_QUARANTINE_PAGE).contains(&n) => n,
                    _ => {
                        return Err(ApiError::bad_request(format!(
                            "parameter `limit`: {v:?} is not an integer from 1 to {MAX_QUARANTINE_PAGE}"
                        )));
                    }
                }
            }
            other => {
                return Err(ApiError::bad_request(format!("unknown parameter `{other}` (accepted: after, limit)")));
            }
        }
    }
    let page = query(&s.store, move |st| st.quarantined(after, limit)).await?;
    let next = (page.len() == limit).then(|| page.last().map(|q| q.id)).flatten();
    Ok(axum::Json(json!({
        "batches": page.iter().map(quarantine_json).collect::<Vec<_>>(),
        "next": next,
    })))
}

/// The raw payload of a quarantined batch, byte for byte as it arrived.
async fn quarantine_payload(State(s): State<AppState>, Path(id): Path<i64>) -> Result<Response, ApiError> {
    let _permit = s.query_permit()?;
    match query(&s.store, move |st| st.quarantined_payload(id)).await? {
        Some((q, payload)) => Ok((
            [
                (header::CONTENT_TYPE, "application/octet-stream".to_string()),
                (
                    header::CONTENT_DISPOSITION,
                    format!("attachment; filename=\"{}-{}-{}.batch\"", q.agent_id, q.epoch, q.seq),
                ),
            ],
            payload,
        )
            .into_response()),
        None => Err(ApiError::not_found(format!("no quarantined batch with id {id}"))),
    }
}

/// Stores a quarantined batch again (after a fix) and removes it from quarantine.
async fn quarantine_reingest(
    State(s): State<AppState>,
    Path(id): Path<i64>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    use crate::ingest::ReingestResult;
    match query(&s.store, move |st| crate::ingest::reingest(st, id)).await? {
        ReingestResult::NotFound => Err(ApiError::not_found(format!("no quarantined batch with id {id}"))),
        ReingestResult::Stored(outcome) => {
            s.metrics.quarantine_released.get_or_create(&[("action", "reingested")]).inc();
            tracing::info!(quarantine_id = id, ?outcome, "quarantined batch re-ingested");
            let outcome = match outcome {
                crate::store::BatchOutcome::Stored => "stored",
                crate::store::BatchOutcome::Duplicate => "duplicate",
            };
            Ok(axum::Json(json!({ "id": id, "outcome": outcome })))
        }
        ReingestResult::StillInvalid(why) | ReingestResult::StillRefused(why) => Err(ApiError {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            message: format!("quarantined batch {id} is still refused, and stays in quarantine: {why}"),
        }),
    }
}

/// Discards a quarantined batch: an operator's explicit decision, logged and counted.
async fn quarantine_discard(State(s): State<AppState>, Path(id): Path<i64>) -> Result<StatusCode, ApiError> {
    if query(&s.store, move |st| st.release_quarantined(id)).await? {
        s.metrics.quarantine_released.get_or_create(&[("action", "discarded")]).inc();
        tracing::warn!(quarantine_id = id, "quarantined batch discarded by an API call; its readings are gone");
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(format!("no quarantined batch with id {id}")))
    }
}

/// Module builds whose outputs the hub has stored: lineage at a glance.
async fn modules(State(s): State<AppState>) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let list = query(&s.store, |st| st.modules()).await?;
    Ok(axum::Json(
        list.iter()
            .map(|m| {
                let mut o = module_json(&m.module);
                o["agents"] = json!(m.agents);
                o["readings"] = json!(m.readings);
                o
            })
            .collect(),
    ))
}

/// Completeness per agent, all or those whose id starts with `prefix`.
async fn agents(
    State(s): State<AppState>,
    params: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let f = ListFilter::parse(params, &["prefix", "label"])?;
    let labelled = !f.labels.is_empty();
    let (list, presence) =
        query(&s.store, move |st| Ok((st.agents()?, if labelled { st.presence()? } else { Vec::new() }))).await?;
    // Labels come with presence: an agent never heard from has none.
    let labels_of =
        |id: &str| presence.iter().find(|p| p.status.agent_id == id).map(|p| p.status.labels.as_slice()).unwrap_or(&[]);
    Ok(axum::Json(
        list.iter().filter(|a| f.agent(&a.agent_id) && f.labelled(labels_of(&a.agent_id))).map(agent_json).collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use brume_protocol::Field;

    fn params(q: &[(&str, &str)]) -> Vec<(String, String)> {
        q.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn readings_query_errors_name_the_parameter() {
        let check = |q: &[(&str, &str)], name: &str| {
            let err = parse_readings_query(&params(q)).unwrap_err();
            assert!(err.contains(&format!("`{name}`")), "{q:?}: {err}");
        };
        check(&[], "stream");
        check(&[("stream", "s"), ("from", "x")], "from");
        check(&[("stream", "s"), ("to", "1.5")], "to");
        check(&[("stream", "s"), ("limit", "0")], "limit");
        check(&[("stream", "s"), ("limit", "10001")], "limit");
        check(&[("stream", "s"), ("after", "nope")], "after");
        check(&[("stream", "s"), ("bogus", "1")], "bogus");
    }

    /// Issue 10: one `limit=100000` request took the hub from 12 MB to 349 MB, and each
    /// dashboard added to it. Expensive queries now take a permit; without one they get
    /// 503 with `Retry-After` at once, counted, instead of piling up. (The page size bound
    /// is checked above.)
    #[tokio::test]
    async fn expensive_queries_beyond_the_limit_get_503_with_retry_after() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn HubStore> = Arc::new(crate::store::sqlite::SqliteStore::open(dir.path()).unwrap());
        let queries = Arc::new(tokio::sync::Semaphore::new(1));
        let metrics = Metrics::new();
        let state = AppState {
            store,
            metrics: metrics.clone(),
            shutdown: tokio_util::sync::CancellationToken::new(),
            queries: queries.clone(),
            fleet: Arc::new(crate::fleet::FleetHandle::new(&Default::default()).unwrap()),
            auth: Default::default(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app(state)).await });
        let get = |path: &str| reqwest::get(format!("{url}{path}"));

        // The only permit is taken, as by a query in progress.
        let held = queries.clone().try_acquire_owned().unwrap();
        for path in
            ["/api/v1/readings?stream=s", "/api/v1/aggregate?stream=s&from=0&to=10", "/api/v1/quarantine/1/payload"]
        {
            let resp = get(path).await.unwrap();
            assert_eq!(resp.status(), 503, "{path}");
            assert_eq!(resp.headers()["retry-after"], "1", "{path}");
            assert!(resp.text().await.unwrap().contains("max_concurrent_queries"));
        }
        assert_eq!(metrics.queries_refused.get(), 3);
        // Cheap listings are not limited.
        assert_eq!(get("/api/v1/streams").await.unwrap().status(), 200);
        drop(held);
        let resp = get("/api/v1/readings?stream=s").await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(
            resp.json::<serde_json::Value>().await.unwrap(),
            json!({"stream": "s", "readings": [], "next": null})
        );
    }

    /// Pages are streamed from the store SUB_PAGE readings at a time: a page larger
    /// than that comes out whole, in order, with the right `next`, from a cursor that
    /// may fall anywhere, including on equal timestamps; the query permit is held until
    /// the body is sent and released after.
    #[tokio::test]
    async fn pages_larger_than_a_sub_page_stream_whole_and_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let sqlite = crate::store::sqlite::SqliteStore::open(dir.path()).unwrap();
        // 2,600 readings: 13 batches of 200, timestamps in pairs so cursors land on ties.
        let ts: Vec<i64> = (0..2600).map(|i| 1_000 + i / 2).collect();
        for (seq, chunk) in ts.chunks(200).enumerate() {
            sqlite.ingest(&[crate::store::suite::batch("a", 1, seq as u64 + 1, &[("s", chunk)])], 1).unwrap();
        }
        let store: Arc<dyn HubStore> = Arc::new(sqlite);
        let queries = Arc::new(tokio::sync::Semaphore::new(1));
        let state = AppState {
            store,
            metrics: Metrics::new(),
            shutdown: tokio_util::sync::CancellationToken::new(),
            queries: queries.clone(),
            fleet: Arc::new(crate::fleet::FleetHandle::new(&Default::default()).unwrap()),
            auth: Default::default(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app(state)).await });

        let (mut seen, mut next, mut pages) = (Vec::new(), None::<String>, 0);
        loop {
            let after = next.as_ref().map(|c| format!("&after={c}")).unwrap_or_default();
            let resp = reqwest::get(format!("{url}/api/v1/readings?stream=s&limit=1100{after}")).await.unwrap();
            assert_eq!(resp.status(), 200);
            let page: serde_json::Value = resp.json().await.unwrap();
            pages += 1;
            for r in page["readings"].as_array().unwrap() {
                seen.push((r["ts_ns"].as_i64().unwrap(), r["seq"].as_u64().unwrap(), r["idx"].as_u64().unwrap()));
            }
            // The body is complete once read, so the permit is free again.
            let _permit = queries.clone().try_acquire_owned().expect("permit released after the body");
            match page["next"].as_str() {
                Some(c) => next = Some(c.to_owned()),
                None => break,
            }
        }
        assert_eq!(pages, 3, "1100 + 1100 + 400");
        assert_eq!(seen.len(), 2600, "every reading once");
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "in (ts, seq, idx) order, no repeats");
        assert_eq!(seen.iter().map(|r| r.0).collect::<Vec<_>>(), ts);
    }

    #[test]
    fn readings_query_defaults() {
        let q = parse_readings_query(&params(&[("stream", "s"), ("from", "5")])).unwrap();
        assert_eq!(q, ReadingsQuery { stream: "s".into(), from: Some(5), to: None, limit: DEFAULT_LIMIT, after: None });
    }

    #[test]
    fn fields_to_json() {
        let f = |name: &str, value| Field { name: name.into(), value };
        let j = fields_json(&[
            f("value", Value::F64(1.5)),
            f("n", Value::I64(-3)),
            f("ok", Value::Bool(true)),
            f("name", Value::Str("x".into())),
        ]);
        assert_eq!(j, json!({"value": 1.5, "n": -3, "ok": true, "name": "x"}));
    }
}
