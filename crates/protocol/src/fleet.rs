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

/// The modules an agent should run. Versioned envelope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DesiredState {
    /// Version 1.
    V1(DesiredV1),
}

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
    pub modules: Vec<DesiredModule>,
}

/// One module an agent should run.
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

    /// Decodes and validates a message.
    pub fn decode(bytes: &[u8]) -> Result<DesiredV1, DecodeError> {
        let DesiredState::V1(d) = decode_exact(bytes)?;
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
            validate_module_ref(&m.module)?;
            if m.signature.len() > MAX_SIGNATURE_TEXT {
                return Err(invalid("signature", format!("{} bytes, at most {MAX_SIGNATURE_TEXT}", m.signature.len())));
            }
            if m.config_json.len() > MAX_MODULE_CONFIG {
                return Err(invalid(
                    "module config",
                    format!("{} bytes, at most {MAX_MODULE_CONFIG}", m.config_json.len()),
                ));
            }
            if let Some(inputs) = &m.inputs {
                if inputs.len() > MAX_MODULE_INPUTS {
                    return Err(invalid(
                        "module inputs",
                        format!("{} given, at most {MAX_MODULE_INPUTS}", inputs.len()),
                    ));
                }
                for p in inputs {
                    validate_name("module input", p, crate::limits::MAX_STREAM_NAME)?;
                    topics::validate_pattern(p).map_err(|why| invalid("module input", why))?;
                }
            }
        }
        Ok(d)
    }
}

/// Module names and versions go to text columns and file names: the name rule, plus no
/// path separators in names.
pub fn validate_module_ref(m: &ModuleRef) -> Result<(), DecodeError> {
    validate_name("module name", &m.name, MAX_MODULE_LABEL)?;
    validate_name("module version", &m.version, MAX_MODULE_LABEL)?;
    if m.name.contains(['/', '\\']) || m.name == "." || m.name == ".." {
        return Err(invalid("module name", format!("{:?} must not contain a path separator", m.name)));
    }
    Ok(())
}

/// What an agent reports about its modules. Versioned envelope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentReport {
    /// Version 1.
    V1(ReportV1),
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
    pub modules: Vec<ModuleReport>,
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

/// One module slot in a report.
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
}

impl AgentReport {
    /// Encodes the message.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("encoding to a Vec cannot fail")
    }

    /// Decodes and validates a message.
    pub fn decode(bytes: &[u8]) -> Result<ReportV1, DecodeError> {
        let AgentReport::V1(r) = decode_exact(bytes)?;
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
        }
        Ok(r)
    }
}
