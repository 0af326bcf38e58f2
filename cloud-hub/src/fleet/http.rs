//! The control plane's HTTP API: the module registry, deployments and rollout actions,
//! and the fleet's convergence. Shapes are written out with `json!`, like the rest of
//! the API (see `crate::http`), and documented in `openapi.json`.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use brume_protocol::{ModuleRef, Phase, topics};
use serde::Deserialize;
use serde_json::json;
use sha2::Digest;

use super::plan::Fleet;
use crate::http::{ApiError, AppState, query};
use crate::store::fleet::{
    Deployment, DeploymentSpec, DeploymentState, ModuleUpload, PutModule, RegisteredModule, WaveSize,
};

/// The header carrying a module's signature on upload (and on download).
pub const SIGNATURE_HEADER: &str = "brume-signature";

/// The header carrying a precompiled artifact's sha256 (hex) on download.
pub const ARTIFACT_SHA256_HEADER: &str = "brume-artifact-sha256";

/// The control plane's routes.
pub fn routes(state: &AppState) -> Router<AppState> {
    // The upload limit is the registry's, plus one byte so that the registry (not the
    // body extractor) names the limit in its refusal when a module is just over it.
    let upload_limit = state.fleet.registry.max_bytes().saturating_add(1).min(usize::MAX as u64) as usize;
    Router::new()
        .route("/api/v1/registry/modules", get(list_modules).post(upload).layer(DefaultBodyLimit::max(upload_limit)))
        .route("/api/v1/registry/modules/{sha256}", get(download))
        .route("/api/v1/registry/modules/{sha256}/precompiled/{target}", get(download_precompiled))
        .route("/api/v1/deployments", get(list_deployments).post(create_deployment))
        .route("/api/v1/deployments/{id}", get(show_deployment))
        .route("/api/v1/deployments/{id}/{action}", post(deployment_action))
        .route("/api/v1/fleet/agents", get(fleet_agents))
        .merge(super::reprocess::routes())
}

fn module_json(m: &RegisteredModule) -> serde_json::Value {
    json!({
        "name": m.module.name,
        "version": m.module.version,
        "sha256": m.module.sha256_hex(),
        "size": m.size,
        "key_id": m.key_id,
        "signature": m.signature,
        "uploaded_ms": m.uploaded_ms,
        "manifest": serde_json::from_str::<serde_json::Value>(&m.manifest_json).unwrap_or(serde_json::Value::Null),
    })
}

/// `POST /api/v1/registry/modules`: the `.wasm` file as the body, its signature in the
/// `Brume-Signature` header. 201 when stored, 200 when these bytes were already there,
/// 409 when the name and version exist with other bytes, 403 for a signature that is
/// not a trusted key's, 400 for a module that does not load, 413 when too large.
async fn upload(State(s): State<AppState>, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    let signature = match headers.get(SIGNATURE_HEADER).map(|v| v.to_str()) {
        Some(Ok(v)) => Some(v.to_owned()),
        Some(Err(_)) => return Err(ApiError::bad_request("the Brume-Signature header is not ASCII")),
        None => None,
    };
    let fleet = s.fleet.clone();
    let wasm = body.clone();
    let checked = tokio::task::spawn_blocking(move || fleet.registry.check(&wasm, signature.as_deref()))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("module check failed: {e}")))?;
    let checked = match checked {
        Ok(c) => c,
        Err(e) => {
            let status = match &e {
                super::registry::UploadError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
                e if e.is_signature() => StatusCode::FORBIDDEN,
                super::registry::UploadError::Engine(_) => StatusCode::INTERNAL_SERVER_ERROR,
                _ => StatusCode::BAD_REQUEST,
            };
            tracing::warn!(error = %e, bytes = body.len(), "module upload refused");
            return Err(ApiError::new(status, e.to_string()));
        }
    };
    for (target, code) in &checked.artifacts {
        let hex = brume_signing::to_hex(&sha2::Sha256::digest(code));
        s.fleet.artifacts.insert((checked.module.sha256, *target), Bytes::from(code.clone()), hex);
    }
    let now = crate::clock::now_ms();
    let (outcome, stored) = query(&s.store, move |st| {
        let outcome = st.put_module(&ModuleUpload {
            module: checked.module.clone(),
            manifest_json: checked.manifest_json.clone(),
            key_id: checked.key_id.clone(),
            signature: checked.signature.clone(),
            uploaded_ms: now,
            wasm: &body,
        })?;
        Ok((outcome, st.registered_module(&checked.module.name, &checked.module.version)?))
    })
    .await?;
    let Some(stored) = stored else {
        return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "the module was stored but cannot be read back"));
    };
    match outcome {
        PutModule::Stored => {
            tracing::info!(module = %stored.module.name, version = %stored.module.version, sha256 = %stored.module.sha256_hex(), key_id = %stored.key_id, "module registered");
            Ok((StatusCode::CREATED, axum::Json(module_json(&stored))).into_response())
        }
        PutModule::AlreadyStored => Ok((StatusCode::OK, axum::Json(module_json(&stored))).into_response()),
        PutModule::Conflict { existing } => Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "{} {} is already registered with other bytes (sha256 {}); versions are never overwritten: bump the version in the module's manifest",
                stored.module.name,
                stored.module.version,
                ModuleRef { name: String::new(), version: String::new(), sha256: existing }.sha256_hex()
            ),
        )),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ModulesFilter {
    name: Option<String>,
}

/// `GET /api/v1/registry/modules[?name=]`.
async fn list_modules(
    State(s): State<AppState>,
    Query(f): Query<ModulesFilter>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let list = query(&s.store, |st| st.registered_modules()).await?;
    Ok(axum::Json(
        list.iter().filter(|m| f.name.as_ref().is_none_or(|n| *n == m.module.name)).map(module_json).collect(),
    ))
}

/// `GET /api/v1/registry/modules/{sha256}`: the bytes. Resumable: `Range: bytes=N-`
/// answers 206 with the rest of the file (other range forms get the whole file, which
/// HTTP allows). The signature comes along in `Brume-Signature`.
async fn download(
    State(s): State<AppState>,
    Path(sha): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let digest = ModuleRef::parse_sha256(&sha)
        .ok_or_else(|| ApiError::bad_request(format!("{sha:?} is not a sha256 (64 hex digits)")))?;
    let (wasm, signature) = module_bytes(&s, digest).await?;
    let total = wasm.len();
    let from = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse::<usize>().ok());
    let mut resp = match from {
        Some(n) if n >= total && total > 0 => {
            let mut r = StatusCode::RANGE_NOT_SATISFIABLE.into_response();
            r.headers_mut().insert(header::CONTENT_RANGE, format!("bytes */{total}").parse().expect("ascii"));
            return Ok(r);
        }
        Some(n) if n > 0 => {
            let mut r = (StatusCode::PARTIAL_CONTENT, wasm.slice(n..)).into_response();
            r.headers_mut()
                .insert(header::CONTENT_RANGE, format!("bytes {n}-{}/{total}", total - 1).parse().expect("ascii"));
            r
        }
        _ => (StatusCode::OK, wasm).into_response(),
    };
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, "application/wasm".parse().expect("ascii"));
    h.insert(header::ACCEPT_RANGES, "bytes".parse().expect("ascii"));
    h.insert(header::ETAG, format!("\"{sha}\"").parse().expect("ascii"));
    // The signature travels in the desired state; the header is for people and tools.
    if let Ok(sig) = signature.parse() {
        h.insert(SIGNATURE_HEADER, sig);
    }
    Ok(resp)
}

/// A registered module's bytes and signature: from the cache, else read once from the
/// store however many agents ask at once (the first fills the cache while the others
/// wait for it, then find the bytes there).
async fn module_bytes(s: &AppState, digest: [u8; 32]) -> Result<(Bytes, String), ApiError> {
    if let Some(found) = s.fleet.blobs.get(&digest) {
        return Ok(found);
    }
    let _fill = s.fleet.blob_fill.lock().await;
    if let Some(found) = s.fleet.blobs.get(&digest) {
        return Ok(found);
    }
    // A database read: bounded like any expensive query.
    let _permit = s.query_permit()?;
    let found = query(&s.store, move |st| {
        let Some(wasm) = st.module_wasm(&digest)? else { return Ok(None) };
        let meta = st.registered_modules()?.into_iter().find(|m| m.module.sha256 == digest);
        Ok(Some((wasm, meta.map(|m| m.signature).unwrap_or_default())))
    })
    .await?;
    let Some((wasm, signature)) = found else {
        return Err(ApiError::not_found(format!("no registered module has sha256 {}", brume_signing::to_hex(&digest))));
    };
    let wasm = Bytes::from(wasm);
    s.fleet.blobs.insert(digest, wasm.clone(), signature.clone());
    Ok((wasm, signature))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PrecompiledQuery {
    /// The agent's engine ([`brume_wasm_host::ENGINE_VERSION`]); code compiled by another
    /// wasmtime release would not load there.
    engine: Option<String>,
}

/// `GET /api/v1/registry/modules/{sha256}/precompiled/{target}[?engine=]`: the module
/// compiled for devices of `target` (`x86_64`, `aarch64`, `armv7`), for runtime-only
/// agents. Compiled on upload, or here on first request (one at a time) by a hub that
/// has not compiled it yet; kept in memory. The artifact's sha256 comes in
/// `Brume-Artifact-Sha256`. 409 when the agent's engine is not this hub's.
async fn download_precompiled(
    State(s): State<AppState>,
    Path((sha, target)): Path<(String, String)>,
    Query(q): Query<PrecompiledQuery>,
) -> Result<Response, ApiError> {
    let digest = ModuleRef::parse_sha256(&sha)
        .ok_or_else(|| ApiError::bad_request(format!("{sha:?} is not a sha256 (64 hex digits)")))?;
    let target: brume_wasm_host::Target = target.parse().map_err(|e| ApiError::bad_request(format!("{e}")))?;
    if let Some(engine) = q.engine.filter(|e| e != brume_wasm_host::ENGINE_VERSION) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "this hub compiles for {}, the agent runs {engine}: code compiled by one does not load in the other; run hubs and agents of the same Brume release",
                brume_wasm_host::ENGINE_VERSION
            ),
        ));
    }
    let key = (digest, target);
    let (code, hex) = match s.fleet.artifacts.get(&key) {
        Some(found) => found,
        None => {
            let (wasm, _) = module_bytes(&s, digest).await?;
            let _fill = s.fleet.artifact_fill.lock().await;
            match s.fleet.artifacts.get(&key) {
                Some(found) => found,
                None => {
                    let fleet = s.fleet.clone();
                    let code = tokio::task::spawn_blocking(move || fleet.registry.precompile(target, &wasm))
                        .await
                        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("precompiling: {e}")))?
                        .map_err(|e| {
                            tracing::error!(sha256 = %sha, %target, error = %e, "cannot precompile a registered module");
                            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
                        })?;
                    let hex = brume_signing::to_hex(&sha2::Sha256::digest(&code));
                    let code = Bytes::from(code);
                    s.fleet.artifacts.insert(key, code.clone(), hex.clone());
                    (code, hex)
                }
            }
        }
    };
    let mut resp = (StatusCode::OK, code).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, "application/octet-stream".parse().expect("ascii"));
    h.insert(ARTIFACT_SHA256_HEADER, hex.parse().expect("hex is ascii"));
    Ok(resp)
}

/// The body of `POST /api/v1/deployments`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewDeployment {
    module: String,
    version: String,
    #[serde(default)]
    config: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    inputs: Option<Vec<String>>,
    #[serde(default)]
    selector: BTreeMap<String, String>,
    #[serde(default = "default_waves")]
    waves: Vec<String>,
    #[serde(default = "default_probation", with = "humantime_serde")]
    probation: Duration,
    #[serde(default)]
    max_failed_batches: u32,
    #[serde(default = "default_abort_threshold")]
    abort_threshold: f64,
    /// Roll back on an agent when the build's outputs per input differ from its
    /// predecessor's there by more than this percentage.
    #[serde(default)]
    max_output_change_pct: Option<u32>,
    /// Roll back on an agent when more than this percentage of its batches failed.
    #[serde(default)]
    max_failed_pct: Option<u32>,
    /// Inputs before those two are judged.
    #[serde(default = "default_min_inputs")]
    min_inputs: u32,
    /// Run the build in the shadow of the running one during probation.
    #[serde(default)]
    shadow: bool,
}

fn default_min_inputs() -> u32 {
    100
}

fn default_waves() -> Vec<String> {
    vec!["100%".into()]
}

fn default_probation() -> Duration {
    Duration::from_secs(30)
}

fn default_abort_threshold() -> f64 {
    0.1
}

/// Checks a new deployment and turns it into a spec, naming the field at fault.
fn spec_of(n: NewDeployment, registered: &RegisteredModule) -> Result<DeploymentSpec, String> {
    let waves = n.waves.iter().map(|w| w.parse::<WaveSize>()).collect::<Result<Vec<_>, _>>()?;
    if waves.is_empty() || waves.len() > 16 {
        return Err("waves: give 1 to 16 waves, e.g. [\"1\", \"10%\", \"100%\"]".into());
    }
    check_config_and_inputs(&n.config, n.inputs.as_deref())?;
    if !(0.0..=1.0).contains(&n.abort_threshold) {
        return Err("abort_threshold: a fraction from 0 (abort on the first failure) to 1".into());
    }
    let probation_s = u32::try_from(n.probation.as_secs()).map_err(|_| "probation: too long".to_string())?;
    check_selector(&n.selector)?;
    for (name, pct) in [("max_output_change_pct", n.max_output_change_pct), ("max_failed_pct", n.max_failed_pct)] {
        if pct.is_some_and(|p| p > 1_000_000) {
            return Err(format!("{name}: a percentage up to 1000000"));
        }
    }
    if n.max_failed_pct.is_some_and(|p| p >= 100) {
        return Err("max_failed_pct: below 100 (at 100 nothing ever fails the check)".into());
    }
    let checks = brume_protocol::Checks {
        max_output_change_pct: n.max_output_change_pct,
        max_failed_pct: n.max_failed_pct,
        min_inputs: n.min_inputs,
    };
    Ok(DeploymentSpec {
        module: n.module,
        version: n.version,
        sha256: registered.module.sha256_hex(),
        config: n.config,
        inputs: n.inputs,
        selector: n.selector,
        waves,
        probation_s,
        max_failed_batches: n.max_failed_batches,
        abort_threshold: n.abort_threshold,
        checks,
        shadow: n.shadow,
    })
}

/// Checks a module's config and input patterns by the rules agents apply when they
/// decode a desired state.
pub(super) fn check_config_and_inputs(
    config: &serde_json::Map<String, serde_json::Value>,
    inputs: Option<&[String]>,
) -> Result<(), String> {
    let config_len = serde_json::Value::Object(config.clone()).to_string().len();
    if config_len > brume_protocol::MAX_MODULE_CONFIG {
        return Err(format!("config: {config_len} bytes of JSON, at most {}", brume_protocol::MAX_MODULE_CONFIG));
    }
    if let Some(inputs) = inputs {
        if inputs.is_empty() || inputs.len() > brume_protocol::MAX_MODULE_INPUTS {
            return Err(format!("inputs: give 1 to {} patterns (or leave it out)", brume_protocol::MAX_MODULE_INPUTS));
        }
        for p in inputs {
            brume_protocol::validate_stream_name(&p.replace(['+', '#'], "x"))
                .map_err(|e| format!("inputs: {p:?}: {e}"))?;
            topics::validate_pattern(p).map_err(|e| format!("inputs: {e}"))?;
        }
    }
    Ok(())
}

/// Checks a selector's label names and values.
pub(super) fn check_selector(selector: &BTreeMap<String, String>) -> Result<(), String> {
    for (k, v) in selector {
        if k.is_empty() || k.len() > 256 || v.len() > 256 {
            return Err("selector: label names of 1 to 256 bytes, values of at most 256".into());
        }
    }
    Ok(())
}

/// Per-phase counts and per-agent rows of a deployment.
fn progress(fleet: &Fleet, d: &Deployment) -> (serde_json::Value, Vec<serde_json::Value>) {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    let mut rows = Vec::new();
    let members = fleet.members.get(&d.id);
    let mut agents: Vec<(&String, Option<u32>)> =
        members.map(|m| m.iter().map(|(a, w)| (a, Some(*w))).collect()).unwrap_or_default();
    if d.state == DeploymentState::Done {
        // Done: every matching agent is included, not only those the waves added.
        for a in fleet.agents.values().filter(|a| d.spec.selects(&a.id, &a.labels)) {
            if members.is_none_or(|m| !m.contains_key(&a.id)) {
                agents.push((&a.id, None));
            }
        }
    }
    agents.sort();
    for (agent, wave) in agents {
        let (mut phase, error) = fleet.phase(d.id, agent);
        // A withdrawn deployment no longer runs anywhere: an agent that ran it and now
        // reports something else has removed it (failures and rollbacks stay as they were).
        if !d.state.is_live()
            && fleet.reported(d.id, agent).is_none()
            && matches!(phase, Phase::Running | Phase::Canary | Phase::Pending | Phase::Downloading)
        {
            phase = Phase::Removed;
        }
        *counts.entry(phase.as_str()).or_default() += 1;
        let slot = fleet.reports.get(agent).and_then(|r| r.modules.iter().find(|m| m.name == d.spec.module));
        let running = slot.and_then(|m| m.running.as_ref());
        let shadow = slot.filter(|m| m.deployment == d.id).and_then(|m| m.shadow.as_ref());
        rows.push(json!({
            "agent_id": agent,
            "wave": wave,
            "phase": phase.as_str(),
            "error": (!error.is_empty()).then_some(error),
            "online": fleet.agents.get(agent).is_some_and(|a| a.online),
            "running": running.map(|m| json!({"version": m.version, "sha256": m.sha256_hex()})),
            "shadow": shadow.map(shadow_json),
        }));
    }
    (json!(counts), rows)
}

/// A shadow comparison as JSON.
pub(super) fn shadow_json(s: &brume_protocol::ShadowReport) -> serde_json::Value {
    json!({
        "inputs": s.inputs,
        "outputs": s.outputs,
        "running_outputs": s.running_outputs,
        "failed_batches": s.failed_batches,
        "last_error": (!s.last_error.is_empty()).then_some(&s.last_error),
        "max_mean_drift_pct": s.max_mean_drift_pct,
    })
}

fn deployment_json(fleet: &Fleet, d: &Deployment, with_agents: bool) -> serde_json::Value {
    let (counts, rows) = progress(fleet, d);
    let mut v = json!({
        "id": d.id,
        "module": d.spec.module,
        "version": d.spec.version,
        "sha256": d.spec.sha256,
        "state": d.state.as_str(),
        "wave": d.wave,
        "waves": d.spec.waves.iter().map(|w| w.to_string()).collect::<Vec<_>>(),
        "wave_started_ms": d.wave_started_ms,
        "reason": (!d.reason.is_empty()).then_some(&d.reason),
        "selector": d.spec.selector,
        "config": d.spec.config,
        "inputs": d.spec.inputs,
        "probation_s": d.spec.probation_s,
        "max_failed_batches": d.spec.max_failed_batches,
        "abort_threshold": d.spec.abort_threshold,
        "max_output_change_pct": d.spec.checks.max_output_change_pct,
        "max_failed_pct": d.spec.checks.max_failed_pct,
        "min_inputs": d.spec.checks.min_inputs,
        "shadow": d.spec.shadow,
        "created_ms": d.created_ms,
        "updated_ms": d.updated_ms,
        "agents": counts,
    });
    if with_agents {
        v["agent_progress"] = json!(rows);
    }
    v
}

pub(super) async fn load_fleet(s: &AppState) -> Result<Fleet, ApiError> {
    let now = crate::clock::now_ms();
    query(&s.store, move |st| super::load(st, now)).await
}

/// `POST /api/v1/deployments`.
async fn create_deployment(
    State(s): State<AppState>,
    body: Result<axum::Json<NewDeployment>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let axum::Json(n) = body.map_err(|e| ApiError::bad_request(format!("deployment: {}", e.body_text())))?;
    let (name, version) = (n.module.clone(), n.version.clone());
    let registered = query(&s.store, move |st| st.registered_module(&name, &version)).await?.ok_or_else(|| {
        ApiError::bad_request(format!(
            "{} {} is not in the registry: upload it first (cloud-hub module push)",
            n.module, n.version
        ))
    })?;
    let spec = spec_of(n, &registered).map_err(ApiError::bad_request)?;
    let now = crate::clock::now_ms();
    let d = query(&s.store, move |st| st.create_deployment(&spec, now)).await?;
    tracing::info!(deployment = d.id, module = %d.spec.module, version = %d.spec.version, selector = ?d.spec.selector, waves = ?d.spec.waves, "deployment created");
    s.fleet.poke.notify_one();
    let fleet = load_fleet(&s).await?;
    Ok((StatusCode::CREATED, axum::Json(deployment_json(&fleet, &d, false))).into_response())
}

/// `GET /api/v1/deployments`: newest first.
async fn list_deployments(State(s): State<AppState>) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let fleet = load_fleet(&s).await?;
    Ok(axum::Json(fleet.deployments.iter().rev().map(|d| deployment_json(&fleet, d, false)).collect()))
}

fn find(fleet: &Fleet, id: u64) -> Result<&Deployment, ApiError> {
    fleet.deployments.iter().find(|d| d.id == id).ok_or_else(|| ApiError::not_found(format!("no deployment {id}")))
}

/// `GET /api/v1/deployments/{id}`: with every agent's progress.
async fn show_deployment(
    State(s): State<AppState>,
    Path(id): Path<u64>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let fleet = load_fleet(&s).await?;
    Ok(axum::Json(deployment_json(&fleet, find(&fleet, id)?, true)))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ActionBody {
    reason: Option<String>,
}

/// `POST /api/v1/deployments/{id}/{pause|resume|abort|rollback}`, optional body
/// `{"reason": "..."}`. 409 when the action does not apply to the deployment's state.
async fn deployment_action(
    State(s): State<AppState>,
    Path((id, action)): Path<(u64, String)>,
    body: Option<axum::Json<ActionBody>>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    use DeploymentState::*;
    let reason = body.and_then(|b| b.0.reason).unwrap_or_default();
    // A rollout step by a reconciler may land between reading and writing: read again.
    for _ in 0..5 {
        let fleet = load_fleet(&s).await?;
        let d = find(&fleet, id)?;
        let mut next = d.clone();
        let now = crate::clock::now_ms();
        next.state = match (action.as_str(), d.state) {
            ("pause", Rolling) => Paused,
            ("resume", Paused) => {
                // The current wave's probation counts again from now.
                next.wave_started_ms = now;
                Rolling
            }
            ("abort", Rolling | Paused) => Aborted,
            ("rollback", Rolling | Paused | Done) => RolledBack,
            ("pause" | "resume" | "abort" | "rollback", state) => {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    format!("cannot {action} deployment {id}: it is {}", state.as_str()),
                ));
            }
            _ => {
                return Err(ApiError::not_found(format!(
                    "unknown action {action:?}: use pause, resume, abort or rollback"
                )));
            }
        };
        next.reason = if reason.is_empty() { format!("{action} by an operator") } else { reason.clone() };
        if let Some(updated) = query(&s.store, move |st| st.update_deployment(&next, now)).await? {
            tracing::info!(deployment = id, action = %action, reason = %updated.reason, "deployment changed by an operator");
            s.fleet.poke.notify_one();
            let fleet = load_fleet(&s).await?;
            return Ok(axum::Json(deployment_json(&fleet, &updated, false)));
        }
    }
    Err(ApiError::new(StatusCode::CONFLICT, format!("deployment {id} kept changing; try again")))
}

/// `GET /api/v1/fleet/agents`: each known agent's labels, desired and reported
/// generation, and what its modules are doing.
async fn fleet_agents(State(s): State<AppState>) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let now = crate::clock::now_ms();
    let (fleet, desired) = query(&s.store, move |st| Ok((super::load(st, now)?, st.desired_states()?))).await?;
    let desired: BTreeMap<&str, u64> = desired.iter().map(|d| (d.agent_id.as_str(), d.generation)).collect();
    Ok(axum::Json(
        fleet
            .agents
            .values()
            .map(|a| {
                let report = fleet.reports.get(&a.id);
                let wanted = desired.get(a.id.as_str()).copied().unwrap_or(0);
                let reported = report.map_or(0, |r| r.generation);
                json!({
                    "agent_id": a.id,
                    "online": a.online,
                    "labels": a.labels.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>(),
                    "desired_generation": wanted,
                    "reported_generation": reported,
                    "in_sync": reported >= wanted,
                    "modules": report.map(|r| r.modules.iter().map(|m| json!({
                        "name": m.name,
                        "deployment": m.deployment,
                        "wanted": {"version": m.wanted.version, "sha256": m.wanted.sha256_hex()},
                        "phase": m.phase.as_str(),
                        "running": m.running.as_ref().map(|r| json!({"version": r.version, "sha256": r.sha256_hex()})),
                        "error": (!m.error.is_empty()).then_some(&m.error),
                        "batches_ok": m.batches_ok,
                        "batches_failed": m.batches_failed,
                        "shadow": m.shadow.as_ref().map(shadow_json),
                    })).collect::<Vec<_>>()).unwrap_or_default(),
                })
            })
            .collect(),
    ))
}
