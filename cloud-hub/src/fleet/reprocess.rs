//! Re-processing jobs over HTTP: `POST /api/v1/reprocess` runs a registered build over
//! the readings the selected agents kept from a past time range; `GET` lists jobs and
//! shows each agent's progress; `POST /api/v1/reprocess/{id}/cancel` stops one.
//!
//! The results arrive as the re-processed variant of each output stream for that build
//! (`brume_protocol::variant_stream`) and are read with `build=<sha256>` on the readings
//! and aggregate APIs, beside the originals.

use std::collections::BTreeMap;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use brume_protocol::JobPhase;
use serde::Deserialize;
use serde_json::json;

use super::plan::Fleet;
use crate::http::{ApiError, AppState, query};
use crate::store::fleet::{Job, JobSpec, selector_matches};

/// The routes of re-processing jobs.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/reprocess", get(list_jobs).post(create_job))
        .route("/api/v1/reprocess/{id}", get(show_job))
        .route("/api/v1/reprocess/{id}/cancel", post(cancel_job))
}

/// The body of `POST /api/v1/reprocess`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewJob {
    module: String,
    version: String,
    /// Start of the range (inclusive), ns since the Unix epoch.
    from: i64,
    /// End of the range (exclusive), ns since the Unix epoch.
    to: i64,
    #[serde(default)]
    config: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    inputs: Option<Vec<String>>,
    #[serde(default)]
    selector: BTreeMap<String, String>,
}

/// Checks a new job, naming the field at fault.
fn spec_of(n: NewJob, sha256: String) -> Result<JobSpec, String> {
    brume_protocol::validate_timestamp(n.from).map_err(|e| format!("from: {e}"))?;
    brume_protocol::validate_timestamp(n.to.saturating_sub(1)).map_err(|e| format!("to: {e}"))?;
    if n.from >= n.to {
        return Err(format!("from ({}) must be before to ({})", n.from, n.to));
    }
    super::http::check_config_and_inputs(&n.config, n.inputs.as_deref())?;
    super::http::check_selector(&n.selector)?;
    Ok(JobSpec {
        module: n.module,
        version: n.version,
        sha256,
        config: n.config,
        inputs: n.inputs,
        selector: n.selector,
        from_ns: n.from,
        to_ns: n.to,
    })
}

/// `POST /api/v1/reprocess`: 201 with the job; 400 for a bad request or a selector that
/// matches no known agent; 409 when an unfinished job already re-processes this build
/// over an overlapping range on one of the agents (its results would be stored twice).
async fn create_job(
    State(s): State<AppState>,
    body: Result<axum::Json<NewJob>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let axum::Json(n) = body.map_err(|e| ApiError::bad_request(format!("reprocess: {}", e.body_text())))?;
    let (name, version) = (n.module.clone(), n.version.clone());
    let registered = query(&s.store, move |st| st.registered_module(&name, &version)).await?.ok_or_else(|| {
        ApiError::bad_request(format!(
            "{} {} is not in the registry: upload it first (cloud-hub module push)",
            n.module, n.version
        ))
    })?;
    let spec = spec_of(n, registered.module.sha256_hex()).map_err(ApiError::bad_request)?;
    let fleet = super::http::load_fleet(&s).await?;
    let agents: Vec<String> = fleet
        .agents
        .values()
        .filter(|a| selector_matches(&spec.selector, &a.id, &a.labels))
        .map(|a| a.id.clone())
        .collect();
    if agents.is_empty() {
        return Err(ApiError::bad_request(format!(
            "selector {:?} matches no known agent (see GET /api/v1/fleet/agents)",
            spec.selector
        )));
    }
    for j in fleet.jobs.iter().filter(|j| !j.cancelled && j.spec.sha256 == spec.sha256) {
        let overlaps = j.spec.from_ns < spec.to_ns && spec.from_ns < j.spec.to_ns;
        let members = fleet.job_agents.get(&j.id);
        let shared =
            agents.iter().find(|a| members.and_then(|m| m.get(*a)).is_some_and(|m| m.phase != JobPhase::Failed));
        if let (true, Some(agent)) = (overlaps, shared) {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!(
                    "job {} already re-processes {} {} over an overlapping range on {agent}; \
                     cancel it first or pick another range",
                    j.id, spec.module, spec.version
                ),
            ));
        }
    }
    let now = crate::clock::now_ms();
    let job = query(&s.store, move |st| st.create_job(&spec, &agents, now)).await?;
    tracing::info!(job = job.id, module = %job.spec.module, version = %job.spec.version, from_ns = job.spec.from_ns, to_ns = job.spec.to_ns, selector = ?job.spec.selector, "re-processing job created");
    s.fleet.poke.notify_one();
    let fleet = super::http::load_fleet(&s).await?;
    Ok((StatusCode::CREATED, axum::Json(job_json(&fleet, &job, true))).into_response())
}

/// `GET /api/v1/reprocess`: newest first.
async fn list_jobs(State(s): State<AppState>) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let fleet = super::http::load_fleet(&s).await?;
    Ok(axum::Json(fleet.jobs.iter().rev().map(|j| job_json(&fleet, j, false)).collect()))
}

fn find(fleet: &Fleet, id: u64) -> Result<&Job, ApiError> {
    fleet.jobs.iter().find(|j| j.id == id).ok_or_else(|| ApiError::not_found(format!("no re-processing job {id}")))
}

/// `GET /api/v1/reprocess/{id}`: with every agent's progress.
async fn show_job(State(s): State<AppState>, Path(id): Path<u64>) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let fleet = super::http::load_fleet(&s).await?;
    Ok(axum::Json(job_json(&fleet, find(&fleet, id)?, true)))
}

/// `POST /api/v1/reprocess/{id}/cancel`: agents that have not finished stop where they
/// are (what they committed stays, and is forwarded). 409 when it is already finished.
async fn cancel_job(State(s): State<AppState>, Path(id): Path<u64>) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let fleet = super::http::load_fleet(&s).await?;
    let job = find(&fleet, id)?;
    let state = job_state(&fleet, job);
    if state != "running" {
        return Err(ApiError::new(StatusCode::CONFLICT, format!("cannot cancel job {id}: it is {state}")));
    }
    let now = crate::clock::now_ms();
    let job = query(&s.store, move |st| st.cancel_job(id, now))
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no re-processing job {id}")))?;
    tracing::info!(job = id, "re-processing job cancelled by an operator");
    s.fleet.poke.notify_one();
    let fleet = super::http::load_fleet(&s).await?;
    Ok(axum::Json(job_json(&fleet, &job, false)))
}

/// `cancelled`, `running` (an agent has not finished), `failed` (every agent finished,
/// some failed) or `done`.
fn job_state(fleet: &Fleet, j: &Job) -> &'static str {
    if j.cancelled {
        return "cancelled";
    }
    let members = fleet.job_agents.get(&j.id);
    let phases: Vec<JobPhase> = members.map(|m| m.values().map(|a| a.phase).collect()).unwrap_or_default();
    if phases.iter().any(|p| !p.is_final()) {
        "running"
    } else if phases.contains(&JobPhase::Failed) {
        "failed"
    } else {
        "done"
    }
}

fn job_json(fleet: &Fleet, j: &Job, with_agents: bool) -> serde_json::Value {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    let mut rows = Vec::new();
    let (mut readings_in, mut readings_out) = (0u64, 0u64);
    if let Some(members) = fleet.job_agents.get(&j.id) {
        let mut members: Vec<_> = members.values().collect();
        members.sort_by(|a, b| a.agent_id.cmp(&b.agent_id));
        for a in members {
            *counts.entry(a.phase.as_str()).or_default() += 1;
            readings_in += a.readings_in;
            readings_out += a.readings_out;
            rows.push(json!({
                "agent_id": a.agent_id,
                "phase": a.phase.as_str(),
                "readings_in": a.readings_in,
                "readings_out": a.readings_out,
                "batches_failed": a.batches_failed,
                "error": (!a.error.is_empty()).then_some(&a.error),
                "online": fleet.agents.get(&a.agent_id).is_some_and(|x| x.online),
            }));
        }
    }
    let mut v = json!({
        "id": j.id,
        "module": j.spec.module,
        "version": j.spec.version,
        "sha256": j.spec.sha256,
        "from": j.spec.from_ns,
        "to": j.spec.to_ns,
        "state": job_state(fleet, j),
        "selector": j.spec.selector,
        "config": j.spec.config,
        "inputs": j.spec.inputs,
        "created_ms": j.created_ms,
        "updated_ms": j.updated_ms,
        "agents": counts,
        "readings_in": readings_in,
        "readings_out": readings_out,
    });
    if with_agents {
        v["agent_progress"] = json!(rows);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_job(from: i64, to: i64) -> NewJob {
        NewJob {
            module: "m".into(),
            version: "1".into(),
            from,
            to,
            config: Default::default(),
            inputs: None,
            selector: Default::default(),
        }
    }

    #[test]
    fn spec_of_names_the_bad_field() {
        let t = 1_700_000_000_000_000_000;
        assert!(spec_of(new_job(t, t + 1), "ab".into()).is_ok());
        for (n, want) in [
            (new_job(t, t), "must be before"),
            (new_job(0, t), "from:"),
            (new_job(t, i64::MAX), "to:"),
            (NewJob { inputs: Some(vec!["a/#/b".into()]), ..new_job(t, t + 1) }, "inputs"),
            (NewJob { selector: [(String::new(), "x".into())].into(), ..new_job(t, t + 1) }, "selector"),
        ] {
            let err = spec_of(n, "ab".into()).unwrap_err();
            assert!(err.contains(want), "{err:?} should name {want:?}");
        }
    }
}
