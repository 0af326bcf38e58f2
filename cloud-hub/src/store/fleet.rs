//! What the stores keep for the control plane: the module registry, deployments and
//! their waves, each agent's desired state and each agent's latest report.
//!
//! Everything the rollout needs lives here, not in a hub's memory, so any hub instance
//! can serve a module, compute an agent's desired state or drive a rollout that another
//! instance started (see `crate::fleet`).

use std::collections::BTreeMap;

use brume_protocol::{DesiredModule, JobPhase, ModuleRef, Report, ReprocessJob};
use serde::{Deserialize, Serialize};

use super::StoreError;

/// A module to register: validated, signature checked (by `crate::fleet::registry`).
#[derive(Debug, Clone)]
pub struct ModuleUpload<'a> {
    /// Manifest name, version and the file's sha256.
    pub module: ModuleRef,
    /// The manifest as JSON, for listings.
    pub manifest_json: String,
    /// Id of the key that signed it.
    pub key_id: String,
    /// The signature (`brume-sig-v1:…`).
    pub signature: String,
    /// Hub time of upload, ms since the Unix epoch.
    pub uploaded_ms: i64,
    /// The `.wasm` file.
    pub wasm: &'a [u8],
}

/// A registered module, without its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisteredModule {
    /// Manifest name, version and sha256.
    pub module: ModuleRef,
    /// File size, bytes.
    pub size: u64,
    /// The manifest as JSON.
    pub manifest_json: String,
    /// Id of the key that signed it.
    pub key_id: String,
    /// The signature.
    pub signature: String,
    /// When it was uploaded, ms since the Unix epoch.
    pub uploaded_ms: i64,
}

/// What [`FleetStore::put_module`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PutModule {
    /// Stored now.
    Stored,
    /// The same bytes were already registered (an upload is idempotent).
    AlreadyStored,
    /// This name and version is registered with other bytes: versions are never
    /// overwritten.
    Conflict {
        /// sha256 of the registered bytes.
        existing: [u8; 32],
    },
}

/// How many agents a wave covers, counted from the start of the rollout (waves are
/// cumulative: `1, 10%, 100%` is one agent, then up to a tenth, then everyone).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WaveSize {
    /// This many agents.
    Agents(u32),
    /// This percentage of the matching agents, rounded up.
    Percent(f64),
}

impl WaveSize {
    /// Cumulative number of agents out of `total` this wave covers (at least one when
    /// there are agents at all).
    pub fn agents_of(self, total: usize) -> usize {
        let n = match self {
            WaveSize::Agents(n) => n as usize,
            WaveSize::Percent(p) => ((p / 100.0) * total as f64).ceil() as usize,
        };
        n.clamp(total.min(1), total)
    }
}

impl std::fmt::Display for WaveSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WaveSize::Agents(n) => write!(f, "{n}"),
            WaveSize::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl std::str::FromStr for WaveSize {
    type Err = String;
    fn from_str(s: &str) -> Result<WaveSize, String> {
        let s = s.trim();
        if let Some(p) = s.strip_suffix('%') {
            match p.trim().parse::<f64>() {
                Ok(p) if p > 0.0 && p <= 100.0 => Ok(WaveSize::Percent(p)),
                _ => Err(format!("wave {s:?}: a percentage must be in (0, 100]")),
            }
        } else {
            match s.parse::<u32>() {
                Ok(n) if n > 0 => Ok(WaveSize::Agents(n)),
                _ => Err(format!("wave {s:?}: expected a number of agents (e.g. 1) or a percentage (e.g. 10%)")),
            }
        }
    }
}

/// What an operator asked for: deploy this build, with this config, to the agents whose
/// labels match, in these waves. Stored as JSON (`deployments.spec`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeploymentSpec {
    /// Module name (the slot on the agents).
    pub module: String,
    /// Version.
    pub version: String,
    /// Hex sha256 of the registered build.
    pub sha256: String,
    /// The module's configuration (a JSON object).
    pub config: serde_json::Map<String, serde_json::Value>,
    /// Input patterns replacing the manifest's, if set.
    pub inputs: Option<Vec<String>>,
    /// Label equalities an agent must all have (`site = plant-1`); empty: every agent.
    /// `agent_id` matches the agent's id.
    pub selector: BTreeMap<String, String>,
    /// Cumulative wave sizes; the last is always extended to every matching agent.
    pub waves: Vec<WaveSize>,
    /// How long each wave's agents keep the version on probation before the next wave
    /// starts, seconds.
    pub probation_s: u32,
    /// Failed batches an agent tolerates during probation before it rolls back.
    pub max_failed_batches: u32,
    /// Fraction (0..=1) of a wave's agents failed or rolled back at which the rollout is
    /// aborted.
    pub abort_threshold: f64,
    /// Data-plane checks agents apply during probation (none by default).
    #[serde(default)]
    pub checks: brume_protocol::Checks,
    /// Agents run the build in the shadow of the running one during probation and swap
    /// only if it passes.
    #[serde(default)]
    pub shadow: bool,
}

impl DeploymentSpec {
    /// Does an agent with this id and these labels match the selector?
    pub fn selects(&self, agent_id: &str, labels: &[(String, String)]) -> bool {
        selector_matches(&self.selector, agent_id, labels)
    }
}

/// Does an agent with this id and these labels have every label of the selector?
/// `agent_id` matches the agent's id.
pub fn selector_matches(selector: &BTreeMap<String, String>, agent_id: &str, labels: &[(String, String)]) -> bool {
    selector
        .iter()
        .all(|(k, v)| if k == "agent_id" { agent_id == v } else { labels.iter().any(|(lk, lv)| lk == k && lv == v) })
}

/// Where a rollout is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeploymentState {
    /// Waves are being rolled out.
    Rolling,
    /// An operator paused it: no new wave starts; agents already in keep the version.
    Paused,
    /// Every wave is done; agents that match later get the version too.
    Done,
    /// Stopped (by an operator or the abort threshold) and withdrawn: its agents return
    /// to what the previous deployment of the module gives them.
    Aborted,
    /// Withdrawn after it was done, by an operator: same effect as aborted.
    RolledBack,
}

impl DeploymentState {
    /// Stable lower-case name for the API and storage.
    pub fn as_str(self) -> &'static str {
        match self {
            DeploymentState::Rolling => "rolling",
            DeploymentState::Paused => "paused",
            DeploymentState::Done => "done",
            DeploymentState::Aborted => "aborted",
            DeploymentState::RolledBack => "rolled_back",
        }
    }

    /// Parses [`as_str`](Self::as_str).
    pub fn parse(s: &str) -> Result<DeploymentState, StoreError> {
        Ok(match s {
            "rolling" => DeploymentState::Rolling,
            "paused" => DeploymentState::Paused,
            "done" => DeploymentState::Done,
            "aborted" => DeploymentState::Aborted,
            "rolled_back" => DeploymentState::RolledBack,
            other => return Err(StoreError::Corrupt(format!("unknown deployment state {other:?}"))),
        })
    }

    /// Does the deployment still give its agents the version?
    pub fn is_live(self) -> bool {
        matches!(self, DeploymentState::Rolling | DeploymentState::Paused | DeploymentState::Done)
    }
}

/// A deployment and where its rollout is.
#[derive(Debug, Clone, PartialEq)]
pub struct Deployment {
    /// Assigned by the store, increasing: a later deployment of the same module name
    /// takes precedence on the agents both select.
    pub id: u64,
    /// What was asked for.
    pub spec: DeploymentSpec,
    /// Where it is.
    pub state: DeploymentState,
    /// Index of the current wave in `spec.waves`.
    pub wave: u32,
    /// When the current wave started, ms since the Unix epoch.
    pub wave_started_ms: i64,
    /// Why it was paused, aborted or rolled back; empty otherwise.
    pub reason: String,
    /// Changes with every update: updates name the revision they read, so two hubs
    /// driving the same rollout cannot both advance it.
    pub revision: u64,
    /// When it was created, ms since the Unix epoch.
    pub created_ms: i64,
    /// When it last changed, ms since the Unix epoch.
    pub updated_ms: i64,
}

/// An agent in a deployment's waves, and the last phase it reported for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeploymentAgent {
    /// The deployment.
    pub deployment: u64,
    /// The agent.
    pub agent_id: String,
    /// The wave that added it.
    pub wave: u32,
    /// The last phase the agent reported for this deployment (kept after the agent moved
    /// on, e.g. to the previous deployment after a rollback).
    pub phase: brume_protocol::Phase,
    /// The error that went with it.
    pub error: String,
}

/// An agent's latest report and when a hub received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredReport {
    /// The report.
    pub report: Report,
    /// Hub time of receipt, ms since the Unix epoch.
    pub received_ms: i64,
}

/// What an operator asked to re-process: run this build over the readings the selected
/// agents kept from `[from_ns, to_ns)`. Stored as JSON (`reprocess_jobs.spec`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// Module name.
    pub module: String,
    /// Version.
    pub version: String,
    /// Hex sha256 of the registered build.
    pub sha256: String,
    /// The module's configuration (a JSON object).
    pub config: serde_json::Map<String, serde_json::Value>,
    /// Input patterns replacing the manifest's, if set.
    pub inputs: Option<Vec<String>>,
    /// Label equalities the agents had when the job was created (see
    /// [`DeploymentSpec::selects`]).
    pub selector: BTreeMap<String, String>,
    /// Start of the range (inclusive), ns since the Unix epoch.
    pub from_ns: i64,
    /// End of the range (exclusive), ns since the Unix epoch.
    pub to_ns: i64,
}

/// A re-processing job.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    /// Assigned by the store, increasing.
    pub id: u64,
    /// What was asked for.
    pub spec: JobSpec,
    /// Cancelled by an operator: no agent starts it, running ones stop where they are.
    pub cancelled: bool,
    /// When it was created, ms since the Unix epoch.
    pub created_ms: i64,
    /// When it was last changed (cancelled), ms since the Unix epoch.
    pub updated_ms: i64,
}

/// One agent's part of a job, as it last reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobAgent {
    /// The job.
    pub job: u64,
    /// The agent.
    pub agent_id: String,
    /// How far it got.
    pub phase: JobPhase,
    /// Input readings processed.
    pub readings_in: u64,
    /// Output readings committed on the agent.
    pub readings_out: u64,
    /// Batches the build failed on.
    pub batches_failed: u64,
    /// Why it failed, or the last batch error.
    pub error: String,
}

impl JobAgent {
    /// The row for an agent's report of a job.
    pub fn from_report(job: u64, agent_id: &str, r: &brume_protocol::JobReport) -> JobAgent {
        JobAgent {
            job,
            agent_id: agent_id.to_owned(),
            phase: r.phase,
            readings_in: r.readings_in,
            readings_out: r.readings_out,
            batches_failed: r.batches_failed,
            error: r.error.clone(),
        }
    }
}

/// What a desired state holds besides its agent, generation and issue time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DesiredContent {
    /// Modules from deployments, by name.
    pub modules: Vec<DesiredModule>,
    /// Re-processing jobs, by id.
    pub reprocess: Vec<ReprocessJob>,
}

/// An agent's current desired state as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredDesired {
    /// The agent.
    pub agent_id: String,
    /// Its generation.
    pub generation: u64,
    /// The encoded `DesiredState` message, as published.
    pub message: Vec<u8>,
}

/// The control plane's storage. Synchronous and blocking, like [`super::HubStore`].
pub trait FleetStore {
    /// Registers a module (see [`PutModule`]). The bytes are stored in the database, so
    /// any hub instance serves them.
    fn put_module(&self, m: &ModuleUpload<'_>) -> Result<PutModule, StoreError>;

    /// Every registered module, by name, then upload time.
    fn registered_modules(&self) -> Result<Vec<RegisteredModule>, StoreError>;

    /// One registered module by name and version.
    fn registered_module(&self, name: &str, version: &str) -> Result<Option<RegisteredModule>, StoreError>;

    /// The bytes of a registered module.
    fn module_wasm(&self, sha256: &[u8; 32]) -> Result<Option<Vec<u8>>, StoreError>;

    /// Creates a deployment in state `rolling` at wave 0 and returns it.
    fn create_deployment(&self, spec: &DeploymentSpec, now_ms: i64) -> Result<Deployment, StoreError>;

    /// Every deployment, by id.
    fn deployments(&self) -> Result<Vec<Deployment>, StoreError>;

    /// Updates state, wave, wave start and reason of `d` if its revision is still
    /// `d.revision`; returns the updated deployment, or `None` if another update came
    /// first (re-read and decide again).
    fn update_deployment(&self, d: &Deployment, now_ms: i64) -> Result<Option<Deployment>, StoreError>;

    /// Adds agents to `d`'s current wave (agents already in it stay in their wave), if
    /// `d` is still rolling at the revision and wave read: the deployment's revision grows
    /// in the same transaction, so two hubs (or a pass racing an operator's pause) cannot
    /// both add agents. Returns the updated deployment, or `None` if it changed first.
    fn add_deployment_agents(
        &self,
        d: &Deployment,
        agents: &[String],
        now_ms: i64,
    ) -> Result<Option<Deployment>, StoreError>;

    /// Agents in each deployment, by deployment, then agent.
    fn deployment_agents(&self) -> Result<Vec<DeploymentAgent>, StoreError>;

    /// Records the phase (and error) agents reported for deployments they are in:
    /// `(deployment, agent_id, phase, error)`.
    fn record_phases(&self, phases: &[(u64, String, brume_protocol::Phase, String)]) -> Result<(), StoreError>;

    /// Makes `content` the agent's desired state. If it differs from the stored one, the
    /// generation grows by one and the new message (with `issued_ms`) is stored and
    /// returned; if it is the same, nothing changes and `None` is returned.
    fn set_desired(
        &self,
        agent_id: &str,
        content: &DesiredContent,
        issued_ms: i64,
    ) -> Result<Option<StoredDesired>, StoreError>;

    /// Every agent's stored desired state, by agent.
    fn desired_states(&self) -> Result<Vec<StoredDesired>, StoreError>;

    /// Records an agent's report unless the stored one is newer (greater generation, or
    /// same generation and later `sent_ms`).
    fn record_report(&self, report: &Report, received_ms: i64) -> Result<(), StoreError>;

    /// Every agent's latest report, by agent.
    fn reports(&self) -> Result<Vec<StoredReport>, StoreError>;

    /// Creates a re-processing job for `agents` (each `pending`) and returns it.
    fn create_job(&self, spec: &JobSpec, agents: &[String], now_ms: i64) -> Result<Job, StoreError>;

    /// Every job, by id.
    fn jobs(&self) -> Result<Vec<Job>, StoreError>;

    /// Every agent of every job, by job, then agent.
    fn job_agents(&self) -> Result<Vec<JobAgent>, StoreError>;

    /// Records what agents reported about their jobs (rows of jobs they are not in are
    /// ignored).
    fn record_job_progress(&self, progress: &[JobAgent]) -> Result<(), StoreError>;

    /// Cancels a job; returns it, or `None` if there is no such job.
    fn cancel_job(&self, id: u64, now_ms: i64) -> Result<Option<Job>, StoreError>;
}

/// What a stored desired-state message holds, to compare with a new one.
pub(crate) fn desired_content(message: &[u8]) -> Result<DesiredContent, StoreError> {
    brume_protocol::DesiredState::decode(message)
        .map(|d| DesiredContent { modules: d.modules, reprocess: d.reprocess })
        .map_err(|e| StoreError::Corrupt(format!("stored desired state does not decode: {e}")))
}

/// The message for a new generation (version 1 unless it has jobs).
pub(crate) fn desired_message(agent_id: &str, generation: u64, issued_ms: i64, content: &DesiredContent) -> Vec<u8> {
    brume_protocol::DesiredState::for_desired(brume_protocol::Desired {
        agent_id: agent_id.to_owned(),
        generation,
        issued_ms,
        modules: content.modules.clone(),
        reprocess: content.reprocess.clone(),
    })
    .encode()
}

/// A job from its stored columns.
pub(crate) fn job_row(
    id: i64,
    spec: &str,
    cancelled: bool,
    created_ms: i64,
    updated_ms: i64,
) -> Result<Job, StoreError> {
    Ok(Job {
        id: id as u64,
        spec: serde_json::from_str(spec)
            .map_err(|e| StoreError::Corrupt(format!("job {id}: stored spec does not parse: {e}")))?,
        cancelled,
        created_ms,
        updated_ms,
    })
}

/// A job agent from its stored columns.
#[allow(clippy::too_many_arguments)]
pub(crate) fn job_agent_row(
    job: i64,
    agent_id: String,
    phase: &str,
    readings_in: i64,
    readings_out: i64,
    batches_failed: i64,
    error: String,
) -> Result<JobAgent, StoreError> {
    Ok(JobAgent {
        job: job as u64,
        agent_id,
        phase: JobPhase::parse(phase)
            .ok_or_else(|| StoreError::Corrupt(format!("unknown job phase {phase:?} in reprocess_agents")))?,
        readings_in: readings_in.max(0) as u64,
        readings_out: readings_out.max(0) as u64,
        batches_failed: batches_failed.max(0) as u64,
        error,
    })
}

/// The JSON text of a job spec, as stored.
pub(crate) fn job_spec_json(spec: &JobSpec) -> String {
    serde_json::to_string(spec).expect("a job spec always serialises")
}

/// A stored report.
pub(crate) fn decode_report(blob: &[u8], received_ms: i64) -> Result<StoredReport, StoreError> {
    let report = brume_protocol::AgentReport::decode(blob)
        .map_err(|e| StoreError::Corrupt(format!("stored report does not decode: {e}")))?;
    Ok(StoredReport { report, received_ms })
}

/// A deployment from its stored columns.
#[allow(clippy::too_many_arguments)]
pub(crate) fn deployment_row(
    id: i64,
    spec: &str,
    state: &str,
    wave: i64,
    wave_started_ms: i64,
    reason: String,
    revision: i64,
    created_ms: i64,
    updated_ms: i64,
) -> Result<Deployment, StoreError> {
    Ok(Deployment {
        id: id as u64,
        spec: serde_json::from_str(spec)
            .map_err(|e| StoreError::Corrupt(format!("deployment {id}: stored spec does not parse: {e}")))?,
        state: DeploymentState::parse(state)?,
        wave: wave.max(0) as u32,
        wave_started_ms,
        reason,
        revision: revision as u64,
        created_ms,
        updated_ms,
    })
}

/// A deployment agent from its stored columns.
pub(crate) fn deployment_agent(
    deployment: i64,
    agent_id: String,
    wave: i64,
    phase: &str,
    error: String,
) -> Result<DeploymentAgent, StoreError> {
    Ok(DeploymentAgent {
        deployment: deployment as u64,
        agent_id,
        wave: wave.max(0) as u32,
        phase: brume_protocol::Phase::parse(phase)
            .ok_or_else(|| StoreError::Corrupt(format!("unknown phase {phase:?} in deployment_agents")))?,
        error,
    })
}

/// The JSON text of a spec, as stored.
pub(crate) fn spec_json(spec: &DeploymentSpec) -> String {
    serde_json::to_string(spec).expect("a spec always serialises")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wave_sizes_parse_and_cover_at_least_one_agent() {
        assert_eq!("1".parse::<WaveSize>().unwrap(), WaveSize::Agents(1));
        assert_eq!(" 10% ".parse::<WaveSize>().unwrap(), WaveSize::Percent(10.0));
        for bad in ["0", "0%", "101%", "x", "-1", ""] {
            assert!(bad.parse::<WaveSize>().is_err(), "{bad}");
        }
        assert_eq!(WaveSize::Percent(10.0).agents_of(5), 1);
        assert_eq!(WaveSize::Percent(50.0).agents_of(5), 3);
        assert_eq!(WaveSize::Agents(10).agents_of(5), 5);
        assert_eq!(WaveSize::Percent(10.0).agents_of(0), 0);
    }
}
