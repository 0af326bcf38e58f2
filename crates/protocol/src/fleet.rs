//! The control plane: what the hub wants an agent to run, and what the agent reports.
//!
//! * [`DesiredState`] (hub → agent), retained on [`topics::desired`]: the complete set of
//!   modules one agent should run from deployments, with a `generation` that grows by
//!   one each time the set changes. Because it is retained, an agent that was offline
//!   receives the latest one when it subscribes; because it is complete (not a delta),
//!   missing an intermediate one costs nothing. An agent applies a generation only if it
//!   is greater than the last one it applied, so a stale or replayed message can never
//!   downgrade it.
//! * [`AgentReport`] (agent → hub), retained on [`topics::report`]: the generation the
//!   agent has applied and, per module, what runs and how far the deployment got on this
//!   agent, sent whenever that changes.
//!
//! Version 2 of both adds **re-processing jobs**: the hub asks an agent to run a module
//! build over the readings it kept from a past time range ([`ReprocessJob`]); the agent
//! forwards the results as a re-processed variant of each output stream
//! (`crate::variant_stream`) and reports each job's progress ([`JobReport`]). Hubs send
//! version 1 while an agent has no job, and agents report version 1 while they have none,
//! so either side can be upgraded first.
//!
//! Modules themselves are not carried here: the agent downloads them from a hub's HTTP
//! API by sha256 and checks the digest and the publisher's signature before it runs them.

use serde::{Deserialize, Serialize};

use crate::topics;
use crate::{DecodeError, MAX_MODULE_LABEL, ModuleRef, decode_exact, invalid, validate_agent_id, validate_name};

/// Most modules in one desired state or report.
pub const MAX_FLEET_MODULES: usize = 64;
/// Longest module configuration (JSON text), bytes.
pub const MAX_MODULE_CONFIG: usize = 64 * 1024;
/// Most input patterns of one module.
pub const MAX_MODULE_INPUTS: usize = 64;
/// Longest signature text, bytes (`brume-sig-v1:` + key id + 128 hex digits is 159).
pub const MAX_SIGNATURE_TEXT: usize = 256;
/// Longest error text in a report, bytes.
pub const MAX_REPORT_ERROR: usize = 1024;
/// Most re-processing jobs in one desired state or report.
pub const MAX_REPROCESS_JOBS: usize = 16;

/// The modules an agent should run. Versioned envelope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DesiredState {
    /// Version 1.
    V1(DesiredV1),
    /// Version 2: version 1 plus re-processing jobs.
    V2(DesiredV2),
    /// A message of this envelope (a `V1` or `V2`) signed by the hub: see
    /// [`crate::SignedV1`]. [`DesiredState::decode`] refuses it: verify it and decode the
    /// message inside.
    SignedV1(crate::SignedV1),
}

/// The desired state as this build uses it: [`DesiredState::decode`] returns every
/// version as this.
pub type Desired = DesiredV2;

/// Version 1 of the desired state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredV1 {
    /// The agent it is for. Must match the topic.
    pub agent_id: String,
    /// Grows by one with every change of `modules` for this agent (the hub's store
    /// assigns it). Agents apply only generations greater than the last they applied.
    pub generation: u64,
    /// When the hub computed it, ms since the Unix epoch (hub clock; for people).
    pub issued_ms: i64,
    /// Every module the agent should run from deployments, by name (strictly ascending,
    /// unique). Modules from the agent's own config are not listed and not touched.
    pub modules: Vec<DesiredModuleV1>,
}

/// Version 2 of the desired state: [`DesiredV1`] plus re-processing jobs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredV2 {
    /// The agent it is for. Must match the topic.
    pub agent_id: String,
    /// See [`DesiredV1::generation`]; grows with every change of modules or jobs.
    pub generation: u64,
    /// When the hub computed it, ms since the Unix epoch.
    pub issued_ms: i64,
    /// See [`DesiredV1::modules`].
    pub modules: Vec<DesiredModule>,
    /// Re-processing jobs the agent has not finished (by id, strictly ascending). A job
    /// no longer listed is not started, or is stopped where it is.
    pub reprocess: Vec<ReprocessJob>,
}

impl From<DesiredV1> for DesiredV2 {
    fn from(d: DesiredV1) -> Self {
        DesiredV2 {
            agent_id: d.agent_id,
            generation: d.generation,
            issued_ms: d.issued_ms,
            modules: d.modules.into_iter().map(DesiredModule::from).collect(),
            reprocess: Vec::new(),
        }
    }
}

/// Run a module build over the readings an agent kept from a past time range.
///
/// The agent feeds the build, with fresh state, every reading of its input streams with
/// a timestamp in `[from_ns, to_ns)` that the store holds when the job starts, in the
/// order they were stored, and forwards its outputs as the re-processed variant of each
/// output stream for this build (`crate::variant_stream`), so the hub keeps them beside
/// the originals. Outputs, progress and state are committed together, so a job resumes
/// after a crash without repeating or losing a result. It runs beside the live modules
/// and never touches their progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReprocessJob {
    /// The hub's job id.
    pub id: u64,
    /// The build to run.
    pub module: ModuleRef,
    /// Size of the `.wasm` file, bytes.
    pub size: u64,
    /// The publisher's signature.
    pub signature: String,
    /// The module's configuration as a JSON object.
    pub config_json: String,
    /// Input patterns replacing the manifest's, if set.
    pub inputs: Option<Vec<String>>,
    /// Start of the range (inclusive), ns since the Unix epoch.
    pub from_ns: i64,
    /// End of the range (exclusive), ns since the Unix epoch.
    pub to_ns: i64,
}

/// One module an agent should run, as version 1 of the desired state carries it
/// ([`DesiredModule`] without `checks`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredModuleV1 {
    /// See [`DesiredModule::module`].
    pub module: ModuleRef,
    /// See [`DesiredModule::size`].
    pub size: u64,
    /// See [`DesiredModule::signature`].
    pub signature: String,
    /// See [`DesiredModule::config_json`].
    pub config_json: String,
    /// See [`DesiredModule::inputs`].
    pub inputs: Option<Vec<String>>,
    /// See [`DesiredModule::deployment`].
    pub deployment: u64,
    /// See [`DesiredModule::probation`].
    pub probation: Probation,
}

impl From<DesiredModuleV1> for DesiredModule {
    fn from(m: DesiredModuleV1) -> Self {
        DesiredModule {
            module: m.module,
            size: m.size,
            signature: m.signature,
            config_json: m.config_json,
            inputs: m.inputs,
            deployment: m.deployment,
            probation: m.probation,
            checks: Checks::default(),
            shadow: false,
        }
    }
}

/// One module an agent should run (version 2 of the desired state).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredModule {
    /// The build: manifest name and version, sha256 of the `.wasm` file. The name is the
    /// module's slot on the agent: a new version of a name replaces the running one and
    /// takes over its input cursor.
    pub module: ModuleRef,
    /// Size of the `.wasm` file, bytes (the agent refuses larger downloads).
    pub size: u64,
    /// The publisher's signature (`brume-sig-v1:…`, see `brume-signing`).
    pub signature: String,
    /// The module's configuration as a JSON object (what `config` is in the agent's
    /// TOML, passed to the module's init).
    pub config_json: String,
    /// Input patterns replacing the manifest's, if set.
    pub inputs: Option<Vec<String>>,
    /// The deployment this comes from (the hub's id), for reports.
    pub deployment: u64,
    /// How the agent judges the new version before it commits to it.
    pub probation: Probation,
    /// Data-plane checks during probation, beyond failed batches.
    #[serde(default)]
    pub checks: Checks,
    /// Run the new build in the shadow of the running one for its probation, on the
    /// same input, its outputs counted and dropped; swap only if it passes (see
    /// [`ShadowReport`]). Without a running build in the slot there is nothing to shadow
    /// and the build is swapped in on probation as usual.
    #[serde(default)]
    pub shadow: bool,
}

/// Data-plane checks an agent applies to a new build during its probation, beside
/// [`Probation::max_failed_batches`], on its own (offline too). A build that fails one
/// is rolled back like one that traps, and the report says what was measured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checks {
    /// Roll back when the build's output readings per input reading differ from those of
    /// the build it replaced (measured on this agent while that one ran) by more than this
    /// percentage. `None`: not checked; also not checked without a measured predecessor.
    pub max_output_change_pct: Option<u32>,
    /// Roll back when more than this percentage of the build's batches failed.
    /// `None`: not checked.
    pub max_failed_pct: Option<u32>,
    /// Input readings the build must have processed before either is judged (a few
    /// readings say little about a rate).
    pub min_inputs: u32,
}

impl Checks {
    /// No check asked for.
    pub fn is_none(&self) -> bool {
        self.max_output_change_pct.is_none() && self.max_failed_pct.is_none()
    }
}

/// The health checks an agent applies to a new version during probation, on its own
/// (so they work offline). A version that fails them is rolled back to the one that ran
/// before, and the report says why.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Probation {
    /// How long the checks apply after the version starts, seconds (0: no probation;
    /// the version is `running` as soon as it loads).
    pub duration_s: u32,
    /// Failed batches (trap, fuel, time, memory, bad output) tolerated during probation;
    /// one more rolls back.
    pub max_failed_batches: u32,
}

impl DesiredState {
    /// Encodes the message.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("encoding to a Vec cannot fail")
    }

    /// The message for a desired state: version 1 when it has no job and no module with
    /// [`Checks`] (agents that predate them keep working), version 2 otherwise.
    pub fn for_desired(d: Desired) -> DesiredState {
        if d.reprocess.is_empty() && d.modules.iter().all(|m| m.checks.is_none() && !m.shadow) {
            DesiredState::V1(DesiredV1 {
                agent_id: d.agent_id,
                generation: d.generation,
                issued_ms: d.issued_ms,
                modules: d
                    .modules
                    .into_iter()
                    .map(|m| DesiredModuleV1 {
                        module: m.module,
                        size: m.size,
                        signature: m.signature,
                        config_json: m.config_json,
                        inputs: m.inputs,
                        deployment: m.deployment,
                        probation: m.probation,
                    })
                    .collect(),
            })
        } else {
            DesiredState::V2(d)
        }
    }

    /// Decodes and validates a message of any version.
    pub fn decode(bytes: &[u8]) -> Result<Desired, DecodeError> {
        let d: Desired = match decode_exact(bytes)? {
            DesiredState::V1(d) => d.into(),
            DesiredState::V2(d) => d,
            DesiredState::SignedV1(_) => {
                return Err(invalid(
                    "desired state",
                    "a signed message: verify its signature and decode the message inside",
                ));
            }
        };
        validate_agent_id(&d.agent_id)?;
        if d.modules.len() > MAX_FLEET_MODULES {
            return Err(invalid("desired modules", format!("{} listed, at most {MAX_FLEET_MODULES}", d.modules.len())));
        }
        for w in d.modules.windows(2) {
            if w[0].module.name >= w[1].module.name {
                return Err(invalid("desired modules", "names must be unique and in ascending order"));
            }
        }
        for m in &d.modules {
            validate_build(&m.module, &m.signature, &m.config_json, m.inputs.as_deref())?;
            for pct in [m.checks.max_output_change_pct, m.checks.max_failed_pct].into_iter().flatten() {
                if pct > 1_000_000 {
                    return Err(invalid("module checks", format!("{pct}%: at most 1000000%")));
                }
            }
        }
        if d.reprocess.len() > MAX_REPROCESS_JOBS {
            return Err(invalid(
                "reprocess jobs",
                format!("{} listed, at most {MAX_REPROCESS_JOBS}", d.reprocess.len()),
            ));
        }
        for w in d.reprocess.windows(2) {
            if w[0].id >= w[1].id {
                return Err(invalid("reprocess jobs", "ids must be unique and in ascending order"));
            }
        }
        for j in &d.reprocess {
            validate_build(&j.module, &j.signature, &j.config_json, j.inputs.as_deref())?;
            if j.from_ns >= j.to_ns {
                return Err(invalid(
                    "reprocess range",
                    format!("job {}: from {} is not before to {}", j.id, j.from_ns, j.to_ns),
                ));
            }
        }
        Ok(d)
    }
}

/// Checks what the agent is asked to run: the build's names, signature text, config size
/// and input patterns.
fn validate_build(
    module: &ModuleRef,
    signature: &str,
    config_json: &str,
    inputs: Option<&[String]>,
) -> Result<(), DecodeError> {
    validate_module_ref(module)?;
    if signature.len() > MAX_SIGNATURE_TEXT {
        return Err(invalid("signature", format!("{} bytes, at most {MAX_SIGNATURE_TEXT}", signature.len())));
    }
    if config_json.len() > MAX_MODULE_CONFIG {
        return Err(invalid("module config", format!("{} bytes, at most {MAX_MODULE_CONFIG}", config_json.len())));
    }
    if let Some(inputs) = inputs {
        if inputs.len() > MAX_MODULE_INPUTS {
            return Err(invalid("module inputs", format!("{} given, at most {MAX_MODULE_INPUTS}", inputs.len())));
        }
        for p in inputs {
            validate_name("module input", p, crate::limits::MAX_STREAM_NAME)?;
            topics::validate_pattern(p).map_err(|why| invalid("module input", why))?;
        }
    }
    Ok(())
}

/// Module names and versions go to text columns and file names: the name rule, plus no
/// path separators in names.
pub fn validate_module_ref(m: &ModuleRef) -> Result<(), DecodeError> {
    validate_name("module name", &m.name, MAX_MODULE_LABEL)?;
    validate_name("module version", &m.version, MAX_MODULE_LABEL)?;
    if m.name.contains(['/', '\\']) || m.name == "." || m.name == ".." {
        return Err(invalid("module name", format!("{:?} must not contain a path separator", m.name)));
    }
    if m.name.starts_with('#') {
        return Err(invalid("module name", format!("{:?}: names starting with '#' are reserved", m.name)));
    }
    Ok(())
}

/// What an agent reports about its modules. Versioned envelope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentReport {
    /// Version 1.
    V1(ReportV1),
    /// Version 2: version 1 plus re-processing jobs.
    V2(ReportV2),
}

/// The report as this build uses it: [`AgentReport::decode`] returns every version as
/// this.
pub type Report = ReportV2;

/// Version 2 of the report: [`ReportV1`] plus the jobs of the desired state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportV2 {
    /// The agent's id. Must match the topic.
    pub agent_id: String,
    /// When it was made, ms since the Unix epoch (agent clock; orders reports).
    pub sent_ms: i64,
    /// The last desired-state generation the agent applied (0: none yet).
    pub generation: u64,
    /// One entry per module from deployments, by name.
    pub modules: Vec<ModuleReport>,
    /// One entry per job of the desired state applied, by id.
    pub jobs: Vec<JobReport>,
}

impl From<ReportV1> for ReportV2 {
    fn from(r: ReportV1) -> Self {
        ReportV2 {
            agent_id: r.agent_id,
            sent_ms: r.sent_ms,
            generation: r.generation,
            modules: r.modules.into_iter().map(ModuleReport::from).collect(),
            jobs: Vec::new(),
        }
    }
}

/// How far a re-processing job got on one agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum JobPhase {
    /// Not started yet.
    Pending,
    /// The build is being downloaded and verified.
    Downloading,
    /// Running over the range.
    Running,
    /// Every reading of the range was processed and its results committed (forwarding
    /// them to the hub goes on like any other reading's).
    Done,
    /// Stopped: the build could not be downloaded, verified or loaded, or failed on too
    /// many batches; `error` says why.
    Failed,
}

impl JobPhase {
    /// Stable lower-case name for APIs and storage.
    pub fn as_str(self) -> &'static str {
        match self {
            JobPhase::Pending => "pending",
            JobPhase::Downloading => "downloading",
            JobPhase::Running => "running",
            JobPhase::Done => "done",
            JobPhase::Failed => "failed",
        }
    }

    /// Parses [`as_str`](Self::as_str).
    pub fn parse(s: &str) -> Option<JobPhase> {
        [JobPhase::Pending, JobPhase::Downloading, JobPhase::Running, JobPhase::Done, JobPhase::Failed]
            .into_iter()
            .find(|p| p.as_str() == s)
    }

    /// Done or failed: the agent will not work on it again.
    pub fn is_final(self) -> bool {
        matches!(self, JobPhase::Done | JobPhase::Failed)
    }
}

/// One re-processing job in a report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobReport {
    /// The hub's job id.
    pub id: u64,
    /// How far it got.
    pub phase: JobPhase,
    /// Input readings processed so far.
    pub readings_in: u64,
    /// Output readings committed so far.
    pub readings_out: u64,
    /// Batches the build failed on (skipped).
    pub batches_failed: u64,
    /// Why it failed; the last batch error otherwise; empty if none.
    pub error: String,
}

/// Version 1 of the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportV1 {
    /// The agent's id. Must match the topic.
    pub agent_id: String,
    /// When it was made, ms since the Unix epoch (agent clock; orders reports).
    pub sent_ms: i64,
    /// The last desired-state generation the agent applied (0: none yet).
    pub generation: u64,
    /// One entry per module from deployments, by name.
    pub modules: Vec<ModuleReportV1>,
}

/// How far a deployment got on one agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Phase {
    /// Waiting for its turn (the agent has not started on it).
    Pending,
    /// Being downloaded and verified.
    Downloading,
    /// Running, within its probation period.
    Canary,
    /// Running, past probation.
    Running,
    /// Could not be downloaded, verified or loaded; the previous version (if any) runs.
    Failed,
    /// Failed its probation checks and was replaced by the previous version (if any).
    RolledBack,
    /// Removed: no deployment wants it on this agent any more; not running.
    Removed,
}

impl Phase {
    /// Stable lower-case name for APIs and storage.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "pending",
            Phase::Downloading => "downloading",
            Phase::Canary => "canary",
            Phase::Running => "running",
            Phase::Failed => "failed",
            Phase::RolledBack => "rolled_back",
            Phase::Removed => "removed",
        }
    }

    /// Parses [`as_str`](Self::as_str).
    pub fn parse(s: &str) -> Option<Phase> {
        [
            Phase::Pending,
            Phase::Downloading,
            Phase::Canary,
            Phase::Running,
            Phase::Failed,
            Phase::RolledBack,
            Phase::Removed,
        ]
        .into_iter()
        .find(|p| p.as_str() == s)
    }
}

/// One module slot in a report, as version 1 of the report carries it
/// ([`ModuleReport`] without `shadow`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleReportV1 {
    /// See [`ModuleReport::name`].
    pub name: String,
    /// See [`ModuleReport::deployment`].
    pub deployment: u64,
    /// See [`ModuleReport::wanted`].
    pub wanted: ModuleRef,
    /// See [`ModuleReport::phase`].
    pub phase: Phase,
    /// See [`ModuleReport::running`].
    pub running: Option<ModuleRef>,
    /// See [`ModuleReport::error`].
    pub error: String,
    /// See [`ModuleReport::batches_ok`].
    pub batches_ok: u64,
    /// See [`ModuleReport::batches_failed`].
    pub batches_failed: u64,
}

impl From<ModuleReportV1> for ModuleReport {
    fn from(m: ModuleReportV1) -> Self {
        ModuleReport {
            name: m.name,
            deployment: m.deployment,
            wanted: m.wanted,
            phase: m.phase,
            running: m.running,
            error: m.error,
            batches_ok: m.batches_ok,
            batches_failed: m.batches_failed,
            shadow: None,
        }
    }
}

/// How a candidate build running in the shadow of the running one compares with it, on
/// the same input readings: the candidate's outputs are counted and dropped, never
/// stored or forwarded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShadowReport {
    /// Input readings both builds processed.
    pub inputs: u64,
    /// Output readings of the candidate.
    pub outputs: u64,
    /// Output readings of the running build on the same inputs.
    pub running_outputs: u64,
    /// Batches the candidate failed on (trap, fuel, time, memory, bad output).
    pub failed_batches: u64,
    /// The candidate's last failure; empty if none.
    pub last_error: String,
    /// Largest difference between the two builds' means of a numeric output field (same
    /// stream and field), in percent of the running build's mean; `None` if they have
    /// no numeric output field in common yet.
    pub max_mean_drift_pct: Option<u64>,
}

/// One module slot in a report (version 2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleReport {
    /// The module name (its slot).
    pub name: String,
    /// The deployment the phase is about: the one that asked for `wanted`.
    pub deployment: u64,
    /// The build the desired state asks for.
    pub wanted: ModuleRef,
    /// How far `wanted` got.
    pub phase: Phase,
    /// The build running in this slot now, if any (the previous one after a rollback).
    pub running: Option<ModuleRef>,
    /// Why it failed or was rolled back; empty otherwise.
    pub error: String,
    /// Batches the running build processed, and failed, since it started.
    pub batches_ok: u64,
    /// Failed batches since the running build started.
    pub batches_failed: u64,
    /// While `wanted` runs in the shadow of the running build: the comparison so far.
    #[serde(default)]
    pub shadow: Option<ShadowReport>,
}

impl AgentReport {
    /// Encodes the message.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("encoding to a Vec cannot fail")
    }

    /// The message for a report: version 1 when it has no job and no shadow comparison
    /// (hubs that predate them keep taking it), version 2 otherwise.
    pub fn for_report(r: Report) -> AgentReport {
        if r.jobs.is_empty() && r.modules.iter().all(|m| m.shadow.is_none()) {
            AgentReport::V1(ReportV1 {
                agent_id: r.agent_id,
                sent_ms: r.sent_ms,
                generation: r.generation,
                modules: r
                    .modules
                    .into_iter()
                    .map(|m| ModuleReportV1 {
                        name: m.name,
                        deployment: m.deployment,
                        wanted: m.wanted,
                        phase: m.phase,
                        running: m.running,
                        error: m.error,
                        batches_ok: m.batches_ok,
                        batches_failed: m.batches_failed,
                    })
                    .collect(),
            })
        } else {
            AgentReport::V2(r)
        }
    }

    /// Decodes and validates a message of any version.
    pub fn decode(bytes: &[u8]) -> Result<Report, DecodeError> {
        let r: Report = match decode_exact(bytes)? {
            AgentReport::V1(r) => r.into(),
            AgentReport::V2(r) => r,
        };
        validate_agent_id(&r.agent_id)?;
        if r.modules.len() > MAX_FLEET_MODULES {
            return Err(invalid("report modules", format!("{} listed, at most {MAX_FLEET_MODULES}", r.modules.len())));
        }
        for m in &r.modules {
            validate_name("module name", &m.name, MAX_MODULE_LABEL)?;
            validate_module_ref(&m.wanted)?;
            if let Some(running) = &m.running {
                validate_module_ref(running)?;
            }
            if m.error.len() > MAX_REPORT_ERROR {
                return Err(invalid("report error", format!("{} bytes, at most {MAX_REPORT_ERROR}", m.error.len())));
            }
            if m.shadow.as_ref().is_some_and(|s| s.last_error.len() > MAX_REPORT_ERROR) {
                return Err(invalid("report error", format!("shadow error over {MAX_REPORT_ERROR} bytes")));
            }
        }
        if r.jobs.len() > MAX_REPROCESS_JOBS {
            return Err(invalid("report jobs", format!("{} listed, at most {MAX_REPROCESS_JOBS}", r.jobs.len())));
        }
        for j in &r.jobs {
            if j.error.len() > MAX_REPORT_ERROR {
                return Err(invalid("report error", format!("{} bytes, at most {MAX_REPORT_ERROR}", j.error.len())));
            }
        }
        Ok(r)
    }
}
