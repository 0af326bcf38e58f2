//! Modules from the hub's deployments: the agent's side of the control plane.
//!
//! The forwarder hands this task every desired state it receives (retained on
//! `brume/v1/agents/<id>/desired`), keeping only the highest generation. The task:
//!
//! 1. ignores a generation it has already applied (a stale or replayed message can never
//!    downgrade the agent);
//! 2. downloads each wanted build it does not have from `fleet.hub_url`, resumably and
//!    size-bounded, and keeps it only if it hashes to the sha256 the desired state names
//!    and carries a signature by one of the keys pinned in this agent's config
//!    (`fleet.trusted_keys`): neither the hub nor the broker can make the agent run code
//!    no trusted publisher signed. The module runners check both again before loading;
//! 3. decides what runs in each slot (module name): the wanted build once it is here,
//!    the previous build meanwhile, nothing for a name no longer wanted, and the
//!    previous build again when the wanted one failed its probation on this device
//!    (decided here, from the runners' status, so it works offline);
//! 4. persists that decision (`data_dir/fleet/state.json`, written atomically, only when
//!    it changes) before handing the set to the runners, so after a crash exactly the
//!    decided build runs in each slot, from the cursor its slot committed;
//! 5. reports, retained on `brume/v1/agents/<id>/report`, the generation applied and each
//!    wanted module's phase, whenever that changes.
//!
//! Re-processing jobs of the desired state run beside the modules: each job's build is
//! downloaded and verified the same way, run by the module runners under its own
//! progress key over its time range ([`crate::modules::Reprocess`]), and reported until
//! the hub drops it from the desired state; a finished job is persisted as such and never
//! run again.
//!
//! A swap is a reload between two batches: the new build takes over the slot's committed
//! cursor (progress is kept per name, see [`crate::modules`]), so no reading is processed
//! twice or skipped. Files are content-addressed (`fleet/modules/<sha256>.wasm`); the
//! wanted, running and previous builds of each slot are kept, anything else is deleted.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use brume_protocol::{
    AgentReport, Desired, DesiredModule, JobPhase, JobReport, ModuleRef, ModuleReport, Phase, Report, ReprocessJob,
};
use brume_signing::{Keyring, Signature, to_hex};
use brume_wasm_host::{ENGINE_VERSION, Target, WasmEngine};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, FleetConfig, OnFailure, StartAt};
use crate::modules::{Managed, ModuleSpec, ProbationSpec, Reprocess, ShadowSpec, ShadowStatus, SharedModuleStatus};

/// How often runners' status is checked for probation results.
const TICK: Duration = Duration::from_secs(1);
/// Download attempts of one build whose bytes do not match before it is reported failed.
const MAX_MISMATCHES: u32 = 3;

/// Precompiled code may be this many times `fleet.max_module_bytes` (native code is
/// several times larger than the `.wasm`).
const PRECOMPILED_SIZE_FACTOR: u64 = 8;

/// Why a download failed.
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    /// The hub could not be reached or answered with an error: retried.
    #[error("download from {url} failed: {reason}")]
    Http {
        /// What was fetched.
        url: String,
        /// Why.
        reason: String,
    },
    /// The bytes are not the build the desired state names (or are larger than it says):
    /// the download is discarded, and retried a few times (a corrupted transfer).
    #[error("downloaded bytes refused: {0}")]
    Refused(String),
    /// The build's signature is not a pinned key's: no download can fix that.
    #[error("not downloaded: {0}")]
    Untrusted(String),
    /// Writing the file failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// What the task persists: the generation applied and what runs in each slot.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct State {
    /// Last generation applied (0: none).
    generation: u64,
    /// The modules that generation wants.
    desired: Vec<DesiredModule>,
    /// What runs in each slot.
    running: BTreeMap<String, DesiredModule>,
    /// What ran in each slot before `running`, for rollback.
    previous: BTreeMap<String, DesiredModule>,
    /// Builds (by [`identity`]: the code with its config and inputs) that failed their
    /// probation here, per slot, with why: not run again while they are wanted.
    rolled_back: BTreeMap<String, ([u8; 32], String)>,
    /// Builds (by [`identity`]) that passed their probation here.
    passed: BTreeSet<[u8; 32]>,
    /// `sent_ms` of the last report: the next one is later, whatever the clock says.
    #[serde(default)]
    report_clock: i64,
    /// Re-processing jobs of the applied desired state, by id.
    #[serde(default)]
    jobs: BTreeMap<u64, JobState>,
    /// Slots whose wanted build (by [`identity`]) runs in the shadow of the running one
    /// until it passes or fails, and since when (ms since the Unix epoch).
    #[serde(default)]
    shadowing: BTreeMap<String, ([u8; 32], i64)>,
}

/// Does a wanted build go through the shadow of the running one first?
fn shadowed(m: &DesiredModule) -> bool {
    m.shadow && m.probation.duration_s > 0
}

/// A re-processing job on this agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct JobState {
    job: ReprocessJob,
    /// Done or failed, and why: such a job is not run again.
    finished: Option<(JobPhase, String)>,
    /// Counts when it finished.
    readings_in: u64,
    readings_out: u64,
    batches_failed: u64,
}

/// What probation judges: the code together with its config and inputs, since a new
/// config can break a build that ran well before.
fn identity(m: &DesiredModule) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(m.module.sha256);
    h.update(m.config_json.as_bytes());
    for i in m.inputs.iter().flatten() {
        h.update([0]);
        h.update(i.as_bytes());
    }
    h.update([u8::from(m.inputs.is_some())]);
    h.finalize().into()
}

/// See `Fleet::present`.
fn build_present(dir: &std::path::Path, sha: &[u8; 32]) -> bool {
    let file = dir.join("modules").join(format!("{}.wasm", to_hex(sha)));
    file.exists() && (WasmEngine::can_compile() || crate::modules::precompiled_path(&file).is_some_and(|p| p.exists()))
}

/// A download that failed, and when to try again.
struct Retry {
    error: String,
    next: Instant,
    attempts: u32,
    mismatches: u32,
}

/// The fleet task; see the module docs.
pub struct Fleet {
    cfg: FleetConfig,
    agent_id: String,
    dir: PathBuf,
    keyring: Arc<Keyring>,
    /// Names of the modules in the agent's own config: a deployment cannot take them.
    static_names: BTreeSet<String>,
    state: State,
    /// What `state.json` holds: `state` is written whenever it differs.
    persisted: State,
    /// Failed downloads by build.
    retries: HashMap<[u8; 32], Retry>,
    /// The set of modules from deployments, for the runners.
    specs: watch::Sender<Vec<ModuleSpec>>,
    /// Every module's status, written by the runners.
    status: SharedModuleStatus,
    /// The last report handed to the forwarder.
    reports: watch::Sender<Option<Vec<u8>>>,
    /// Body of the last report, to send only changes.
    last_report: Option<Report>,
    http: reqwest::Client,
}

/// What the forwarder and the module runners need from [`Fleet::open`].
pub struct FleetLinks {
    /// Desired states received (highest generation kept), filled by the forwarder.
    pub desired: watch::Sender<Option<Desired>>,
    /// Reports to publish (latest), read by the forwarder.
    pub reports: watch::Receiver<Option<Vec<u8>>>,
    /// The modules from deployments, read by the runners.
    pub specs: watch::Receiver<Vec<ModuleSpec>>,
}

impl Fleet {
    /// Opens the fleet state in `data_dir/fleet` (creating it), so that the runners start
    /// with exactly the builds decided before the last stop.
    pub fn open(cfg: &Config, status: SharedModuleStatus) -> anyhow::Result<(Fleet, FleetLinks)> {
        use anyhow::Context;
        let dir = cfg.data_dir.join("fleet");
        std::fs::create_dir_all(dir.join("modules")).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join("state.json");
        let state = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .with_context(|| format!("{} is corrupt; remove it to start over", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::default(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let keyring = Arc::new(Keyring::parse(&cfg.fleet.trusted_keys).context("fleet.trusted_keys")?);
        let static_names = cfg.modules.iter().enumerate().map(|(i, m)| ModuleSpec::from_config(i, m).name).collect();
        let (specs, specs_rx) = watch::channel(Vec::new());
        let (reports, reports_rx) = watch::channel(None);
        let (desired, _) = watch::channel(None);
        let http = reqwest::Client::builder()
            .timeout(cfg.fleet.download_timeout)
            .build()
            .context("building the HTTP client for module downloads")?;
        let fleet = Fleet {
            cfg: cfg.fleet.clone(),
            agent_id: cfg.agent_id.clone(),
            dir,
            keyring,
            static_names,
            persisted: state.clone(),
            state,
            retries: HashMap::new(),
            specs,
            status,
            reports,
            last_report: None,
            http,
        };
        fleet.specs.send_replace(fleet.specs_of());
        tracing::info!(generation = fleet.state.generation, modules = ?fleet.state.running.keys().collect::<Vec<_>>(), "fleet state loaded");
        Ok((fleet, FleetLinks { desired, reports: reports_rx, specs: specs_rx }))
    }

    /// Runs until `shutdown`. `desired` is the receiving side of
    /// [`FleetLinks::desired`].
    pub async fn run(mut self, mut desired: watch::Receiver<Option<Desired>>, shutdown: CancellationToken) {
        self.reconcile().await;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                r = desired.changed() => {
                    if r.is_err() {
                        // The forwarder is gone: shutting down.
                        shutdown.cancelled().await;
                        return;
                    }
                    let d = desired.borrow_and_update().clone();
                    if let Some(d) = d {
                        self.apply(d);
                    }
                }
                _ = tokio::time::sleep(TICK) => {}
            }
            self.reconcile().await;
        }
    }

    /// Takes a new desired state, unless its generation was already applied.
    fn apply(&mut self, d: Desired) {
        if d.generation <= self.state.generation {
            tracing::debug!(
                generation = d.generation,
                applied = self.state.generation,
                "desired state already applied; ignored"
            );
            return;
        }
        tracing::info!(generation = d.generation, modules = d.modules.len(), "new desired state");
        self.state.generation = d.generation;
        // A rollback stays in force only while the same build is wanted in the slot.
        self.state
            .rolled_back
            .retain(|slot, (id, _)| d.modules.iter().any(|m| m.module.name == *slot && identity(m) == *id));
        self.state.desired = d.modules;
        // A job no longer wanted stops where it is; a new one starts.
        self.state.jobs.retain(|id, _| d.reprocess.iter().any(|j| j.id == *id));
        for j in d.reprocess {
            self.state.jobs.entry(j.id).or_insert(JobState {
                job: j,
                finished: None,
                readings_in: 0,
                readings_out: 0,
                batches_failed: 0,
            });
        }
    }

    fn file(&self, sha: &[u8; 32]) -> PathBuf {
        self.dir.join("modules").join(format!("{}.wasm", to_hex(sha)))
    }

    /// Whether a build is here and loadable: its `.wasm`, and on a runtime-only agent
    /// its code precompiled for this architecture beside it.
    fn present(&self, sha: &[u8; 32]) -> bool {
        build_present(&self.dir, sha)
    }

    /// Downloads what is missing, decides what runs, checks probation, persists and
    /// hands the set to the runners when it changed, and reports.
    async fn reconcile(&mut self) {
        // Downloads: one at a time, due ones only: the modules' builds, then the jobs'.
        let mut wanted: Vec<(ModuleRef, u64, String)> = Vec::new();
        for m in &self.state.desired {
            if self.static_names.contains(&m.module.name)
                || self.state.rolled_back.get(&m.module.name).is_some_and(|(id, _)| *id == identity(m))
            {
                continue;
            }
            wanted.push((m.module.clone(), m.size, m.signature.clone()));
        }
        for j in self.state.jobs.values().filter(|j| j.finished.is_none()) {
            wanted.push((j.job.module.clone(), j.job.size, j.job.signature.clone()));
        }
        for (module, size, signature) in &wanted {
            if self.present(&module.sha256) {
                continue;
            }
            let due = self
                .retries
                .get(&module.sha256)
                .is_none_or(|r| r.mismatches < MAX_MISMATCHES && Instant::now() >= r.next);
            if !due {
                continue;
            }
            self.report(); // shows `downloading`
            let fetched = match self.file(&module.sha256).exists() {
                true => Ok(()),
                false => self.download(module, *size, signature).await,
            };
            let fetched = match fetched {
                Ok(()) if !WasmEngine::can_compile() => self.download_precompiled(module).await,
                other => other,
            };
            match fetched {
                Ok(()) => {
                    tracing::info!(module = %module.name, version = %module.version, sha256 = %module.sha256_hex(), "module downloaded and verified");
                    self.retries.remove(&module.sha256);
                }
                Err(e) => {
                    let r = self.retries.entry(module.sha256).or_insert(Retry {
                        error: String::new(),
                        next: Instant::now(),
                        attempts: 0,
                        mismatches: 0,
                    });
                    r.attempts += 1;
                    match e {
                        DownloadError::Refused(_) => r.mismatches += 1,
                        DownloadError::Untrusted(_) => r.mismatches = MAX_MISMATCHES,
                        _ => {}
                    }
                    // 2 s, 4 s, ... up to 5 min between attempts.
                    r.next =
                        Instant::now() + Duration::from_secs(2u64 << r.attempts.min(8)).min(Duration::from_secs(300));
                    r.error = e.to_string();
                    if r.mismatches >= MAX_MISMATCHES {
                        // Operator action: pin the publisher's key, or publish a good build.
                        tracing::error!(module = %module.name, version = %module.version, error = %e, "module refused; not retrying");
                    } else {
                        tracing::warn!(module = %module.name, version = %module.version, attempts = r.attempts, error = %e, "module download failed; will retry");
                    }
                }
            }
        }
        self.check_probation();
        self.check_jobs();
        self.check_shadows();
        self.decide();
        if self.state != self.persisted {
            if let Err(e) = self.persist() {
                // Not persisted: back to what is on disk, so the runners keep what ran.
                // Handing them a set that a crash would forget could run two builds of a
                // slot across the restart. The hub sends the desired state again while
                // this agent's reports lag it (`fleet.republish_after`).
                tracing::error!(error = %e, "cannot persist the fleet state; not applying the change");
                self.state = self.persisted.clone();
                return;
            }
            self.persisted = self.state.clone();
            self.specs.send_replace(self.specs_of());
            self.collect_garbage();
        }
        self.report();
    }

    /// Marks builds that passed their probation, and rolls back those that failed it.
    fn check_probation(&mut self) {
        let now_ms = crate::now_ns() / 1_000_000;
        let status = self.status.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for (slot, b) in self.state.running.clone() {
            let Some(s) = status.get(&slot) else { continue };
            let sha = b.module.sha256_hex();
            if let Some(why) = s.probation_failed.as_ref().filter(|f| f.sha256 == sha).map(|f| &f.reason) {
                if self.state.passed.contains(&identity(&b)) {
                    continue; // a build that passed is not rolled back; its failures are its own
                }
                tracing::warn!(module = %slot, version = %b.module.version, reason = %why, "module failed its probation; putting the previous build back");
                self.state.rolled_back.insert(slot.clone(), (identity(&b), why.clone()));
                match self.state.previous.remove(&slot) {
                    Some(p) if self.present(&p.module.sha256) => {
                        self.state.running.insert(slot, p);
                    }
                    _ => {
                        self.state.running.remove(&slot);
                    }
                }
                continue;
            }
            if s.hash.as_deref() != Some(&sha) {
                continue; // not loaded yet
            }
            let over = s.loaded_ms.is_some_and(|t| now_ms - t >= i64::from(b.probation.duration_s) * 1000);
            if over && s.enabled && !self.state.passed.contains(&identity(&b)) {
                tracing::info!(module = %slot, version = %b.module.version, "module passed its probation");
                self.state.passed.insert(identity(&b));
            }
        }
    }

    /// Marks jobs finished: read through (done), or refused, not loadable or disabled after
    /// repeated failures (failed).
    fn check_jobs(&mut self) {
        let status = self.status.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for (id, j) in self.state.jobs.iter_mut().filter(|(_, j)| j.finished.is_none()) {
            let sha = j.job.module.sha256_hex();
            if let Some(r) = self.retries.get(&j.job.module.sha256).filter(|r| r.mismatches >= MAX_MISMATCHES) {
                j.finished = Some((JobPhase::Failed, r.error.clone()));
            } else if let Some(s) = status.get(&Reprocess::key(*id)) {
                if s.finished && s.hash.as_deref() == Some(&sha) {
                    j.finished = Some((JobPhase::Done, String::new()));
                } else if !s.enabled
                    && s.hash.as_deref().is_none_or(|h| h == sha)
                    && let Some(e) = &s.last_error
                {
                    j.finished = Some((JobPhase::Failed, e.clone()));
                }
                if j.finished.is_some() {
                    // Counted once, when it finishes: the state is written only on change.
                    (j.readings_in, j.readings_out, j.batches_failed) =
                        (s.readings_in, s.readings_out, s.batches_failed);
                }
            }
            if let Some((phase, why)) = &j.finished {
                tracing::info!(job = id, module = %j.job.module.name, version = %j.job.module.version, phase = phase.as_str(), readings_in = j.readings_in, readings_out = j.readings_out, error = %why, "re-processing job finished");
            }
        }
    }

    /// Judges candidates running in a shadow: failed (rolled back: never swapped in) or,
    /// once their probation time is over, passed (swapped in by [`decide`](Self::decide)).
    fn check_shadows(&mut self) {
        let now_ms = crate::now_ns() / 1_000_000;
        let status = self.status.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for (slot, (id, started)) in self.state.shadowing.clone() {
            let Some(m) = self.state.desired.iter().find(|m| m.module.name == slot && identity(m) == id).cloned()
            else {
                self.state.shadowing.remove(&slot);
                continue;
            };
            let sha = m.module.sha256_hex();
            let Some(s) = status.get(&slot).and_then(|s| s.shadow.as_ref()).filter(|s| s.sha256 == sha) else {
                continue; // not started yet
            };
            let verdict = match judge_shadow(s, &m) {
                Some(why) => Err(why),
                None if now_ms - started >= i64::from(m.probation.duration_s) * 1000 => Ok(()),
                None => continue,
            };
            self.state.shadowing.remove(&slot);
            match verdict {
                Ok(()) => {
                    tracing::info!(module = %slot, version = %m.module.version, inputs = s.inputs, outputs = s.outputs, running_outputs = s.running_outputs, "candidate passed in the shadow; swapping it in");
                    self.state.passed.insert(id);
                }
                Err(why) => {
                    tracing::warn!(module = %slot, version = %m.module.version, reason = %why, "candidate failed in the shadow; keeping the running build");
                    self.state.rolled_back.insert(slot, (id, why));
                }
            }
        }
    }

    /// What runs in each slot, from what is wanted, here, and not rolled back.
    fn decide(&mut self) {
        let now_ms = crate::now_ns() / 1_000_000;
        let st = &mut self.state;
        let wanted: BTreeMap<&str, &DesiredModule> = st.desired.iter().map(|m| (m.module.name.as_str(), m)).collect();
        st.running.retain(|slot, _| wanted.contains_key(slot.as_str()));
        st.previous.retain(|slot, _| wanted.contains_key(slot.as_str()));
        st.shadowing.retain(|slot, (id, _)| wanted.get(slot.as_str()).is_some_and(|m| identity(m) == *id));
        for (slot, m) in wanted {
            if self.static_names.contains(slot) {
                continue;
            }
            let rolled_back = st.rolled_back.get(slot).is_some_and(|(id, _)| *id == identity(m));
            let here = build_present(&self.dir, &m.module.sha256);
            if rolled_back || !here {
                continue; // keep what runs (the previous build, or nothing)
            }
            match st.running.get(slot) {
                Some(r) if r == m => {}
                Some(r) if identity(r) == identity(m) => {
                    // Same code, config and inputs from another deployment: nothing to judge.
                    st.running.insert(slot.to_owned(), m.clone());
                }
                Some(_) if shadowed(m) && !st.passed.contains(&identity(m)) => {
                    // Runs beside the current build first (see `check_shadows`).
                    st.shadowing.entry(slot.to_owned()).or_insert((identity(m), now_ms));
                }
                _ => {
                    st.shadowing.remove(slot);
                    if let Some(old) = st.running.insert(slot.to_owned(), m.clone()) {
                        st.previous.insert(slot.to_owned(), old);
                    }
                }
            }
        }
    }

    /// The candidate to run in a slot's shadow, if any.
    fn shadow_spec(&self, slot: &str) -> Option<ShadowSpec> {
        let (id, _) = self.state.shadowing.get(slot)?;
        let m = self.state.desired.iter().find(|m| m.module.name == slot && identity(m) == *id)?;
        Some(ShadowSpec {
            path: self.file(&m.module.sha256),
            sha256: m.module.sha256,
            signature: m.signature.parse().ok()?,
            config_json: m.config_json.clone(),
        })
    }

    /// The runners' set.
    fn specs_of(&self) -> Vec<ModuleSpec> {
        self.state
            .running
            .iter()
            .filter_map(|(slot, b)| {
                let signature: Signature = b.signature.parse().ok()?;
                let probation =
                    (b.probation.duration_s > 0 && !self.state.passed.contains(&identity(b))).then(|| ProbationSpec {
                        duration: Duration::from_secs(b.probation.duration_s.into()),
                        max_failed: b.probation.max_failed_batches,
                        checks: b.checks,
                    });
                Some(ModuleSpec {
                    name: slot.clone(),
                    path: self.file(&b.module.sha256),
                    config_json: b.config_json.clone(),
                    inputs: b.inputs.clone(),
                    // On probation a failed batch is retried, never skipped: if the build is
                    // rolled back, the previous one processes that batch, so no reading
                    // goes without its output.
                    on_failure: if probation.is_some() { OnFailure::Retry } else { OnFailure::Skip },
                    max_consecutive_failures: 5,
                    start_at: StartAt::Latest,
                    memory: None,
                    fuel_per_batch: None,
                    time_per_batch: None,
                    max_output_readings: None,
                    managed: Some(Managed {
                        sha256: b.module.sha256,
                        signature,
                        keyring: self.keyring.clone(),
                        deployment: b.deployment,
                        probation,
                        shadow: self.shadow_spec(slot),
                    }),
                    reprocess: None,
                })
            })
            .chain(self.job_specs())
            .collect()
    }

    /// The runners' specs of unfinished jobs whose build is here.
    fn job_specs(&self) -> impl Iterator<Item = ModuleSpec> + '_ {
        self.state.jobs.iter().filter(|(_, j)| j.finished.is_none()).filter_map(|(id, j)| {
            if !self.present(&j.job.module.sha256) {
                return None;
            }
            let path = self.file(&j.job.module.sha256);
            Some(ModuleSpec {
                name: Reprocess::key(*id),
                path,
                config_json: j.job.config_json.clone(),
                inputs: j.job.inputs.clone(),
                // A batch the build fails on is skipped and counted; ten in a row fail
                // the job (its results would be mostly missing anyway).
                on_failure: OnFailure::Skip,
                max_consecutive_failures: 10,
                start_at: StartAt::Earliest,
                memory: None,
                fuel_per_batch: None,
                time_per_batch: None,
                max_output_readings: None,
                managed: Some(Managed {
                    sha256: j.job.module.sha256,
                    signature: j.job.signature.parse().ok()?,
                    keyring: self.keyring.clone(),
                    deployment: 0,
                    probation: None,
                    shadow: None,
                }),
                reprocess: Some(Reprocess {
                    job: *id,
                    module: j.job.module.name.clone(),
                    from_ns: j.job.from_ns,
                    to_ns: j.job.to_ns,
                }),
            })
        })
    }

    /// Writes the state atomically: a temporary file, fsynced, renamed over the old one,
    /// and the directory fsynced.
    fn persist(&self) -> std::io::Result<()> {
        use std::io::Write;
        let mut tmp = tempfile::NamedTempFile::new_in(&self.dir)?;
        tmp.write_all(&serde_json::to_vec_pretty(&self.state).map_err(std::io::Error::other)?)?;
        tmp.as_file().sync_all()?;
        tmp.persist(self.dir.join("state.json")).map_err(|e| e.error)?;
        std::fs::File::open(&self.dir)?.sync_all()
    }

    /// Deletes module files no slot wants, runs or may roll back to.
    fn collect_garbage(&self) {
        let keep: BTreeSet<String> = self
            .state
            .desired
            .iter()
            .chain(self.state.running.values())
            .chain(self.state.previous.values())
            .map(|m| m.module.sha256_hex())
            .chain(self.state.jobs.values().filter(|j| j.finished.is_none()).map(|j| j.job.module.sha256_hex()))
            .collect();
        let Ok(entries) = std::fs::read_dir(self.dir.join("modules")) else { return };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let sha = name.split('.').next().unwrap_or_default().to_owned();
            if !keep.contains(&sha) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    /// Downloads one build into `fleet/modules`, resuming a partial download, and keeps
    /// it only if it is exactly the wanted build, signed by a pinned key.
    async fn download(&self, module: &ModuleRef, size: u64, signature: &str) -> Result<(), DownloadError> {
        let sha = module.sha256;
        // The signature is checked first: without it the bytes are not worth fetching.
        let sig: Signature = signature.parse().map_err(|e| DownloadError::Untrusted(format!("{e}")))?;
        self.keyring.verify(&sha, &sig).map_err(|e| DownloadError::Untrusted(format!("signature refused: {e}")))?;
        let max = size.min(self.cfg.max_module_bytes.as_u64());
        if size > self.cfg.max_module_bytes.as_u64() {
            return Err(DownloadError::Untrusted(format!(
                "{size} bytes, over fleet.max_module_bytes ({})",
                self.cfg.max_module_bytes
            )));
        }
        let part = self.dir.join("modules").join(format!("{}.part", module.sha256_hex()));
        let io = |op, source| DownloadError::Io { op, path: part.clone(), source };
        let mut have = tokio::fs::metadata(&part).await.map(|m| m.len()).unwrap_or(0);
        if have > max {
            have = 0;
        }
        let url = format!("{}/api/v1/registry/modules/{}", self.cfg.hub_url.trim_end_matches('/'), module.sha256_hex());
        let http_err = |reason: String| DownloadError::Http { url: url.clone(), reason };
        let mut req = self.http.get(&url);
        if have > 0 {
            req = req.header(reqwest::header::RANGE, format!("bytes={have}-"));
        }
        let mut resp = req.send().await.map_err(|e| http_err(e.to_string()))?;
        let mut file = match resp.status().as_u16() {
            206 => tokio::fs::OpenOptions::new().append(true).open(&part).await.map_err(|e| io("opening", e))?,
            200 => {
                have = 0;
                tokio::fs::File::create(&part).await.map_err(|e| io("creating", e))?
            }
            416 if have == max => {
                tokio::fs::OpenOptions::new().append(true).open(&part).await.map_err(|e| io("opening", e))?
            }
            s => {
                let body = resp.text().await.unwrap_or_default();
                return Err(http_err(format!("HTTP {s}: {}", body.chars().take(300).collect::<String>())));
            }
        };
        while let Some(chunk) = resp.chunk().await.map_err(|e| http_err(e.to_string()))? {
            have += chunk.len() as u64;
            if have > max {
                drop(file);
                let _ = tokio::fs::remove_file(&part).await;
                return Err(DownloadError::Refused(format!("more than the {max} bytes announced")));
            }
            file.write_all(&chunk).await.map_err(|e| io("writing", e))?;
        }
        file.sync_all().await.map_err(|e| io("syncing", e))?;
        drop(file);
        let bytes = tokio::fs::read(&part).await.map_err(|e| io("reading", e))?;
        let got: [u8; 32] = Sha256::digest(&bytes).into();
        if got != sha {
            let _ = tokio::fs::remove_file(&part).await;
            return Err(DownloadError::Refused(format!(
                "the file hashes to {}, not to the deployed build {}",
                to_hex(&got),
                to_hex(&sha)
            )));
        }
        let dest = self.file(&sha);
        tokio::fs::rename(&part, &dest).await.map_err(|e| io("renaming", e))?;
        if let Ok(d) = std::fs::File::open(self.dir.join("modules")) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// Downloads the build's code precompiled for this architecture (a runtime-only agent
    /// cannot compile the `.wasm`) beside it, as `<sha256>.<arch>.cwasm`.
    ///
    /// Trust: this is machine code from the hub, checked against the sha256 the hub sends
    /// with it (a damaged transfer) and by wasmtime on load (version, architecture,
    /// settings); the `.wasm` it was compiled from is the signed one. A runtime-only agent
    /// trusts its hub to have compiled that `.wasm` (see SECURITY in ARCHITECTURE.md).
    async fn download_precompiled(&self, module: &ModuleRef) -> Result<(), DownloadError> {
        let wasm = self.file(&module.sha256);
        let (Some(dest), Some(target)) = (crate::modules::precompiled_path(&wasm), Target::host()) else {
            return Err(DownloadError::Untrusted(format!(
                "no precompiled modules exist for this architecture ({}); use an agent built with the `jit` feature",
                std::env::consts::ARCH
            )));
        };
        let url = format!(
            "{}/api/v1/registry/modules/{}/precompiled/{target}?engine={ENGINE_VERSION}",
            self.cfg.hub_url.trim_end_matches('/'),
            module.sha256_hex(),
        );
        let http_err = |reason: String| DownloadError::Http { url: url.clone(), reason };
        let mut resp = self.http.get(&url).send().await.map_err(|e| http_err(e.to_string()))?;
        if !resp.status().is_success() {
            let s = resp.status().as_u16();
            let body = resp.text().await.unwrap_or_default();
            return Err(http_err(format!("HTTP {s}: {}", body.chars().take(300).collect::<String>())));
        }
        let announced = resp
            .headers()
            .get("brume-artifact-sha256")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .ok_or_else(|| http_err("no Brume-Artifact-Sha256 header".into()))?;
        // Compiled code is larger than the module; a bound keeps a broken hub from
        // filling the disk.
        let max = self.cfg.max_module_bytes.as_u64().saturating_mul(PRECOMPILED_SIZE_FACTOR);
        let mut code = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| http_err(e.to_string()))? {
            code.extend_from_slice(&chunk);
            if code.len() as u64 > max {
                return Err(DownloadError::Refused(format!(
                    "precompiled code over {max} bytes ({PRECOMPILED_SIZE_FACTOR} × fleet.max_module_bytes)"
                )));
            }
        }
        let got = to_hex(&Sha256::digest(&code));
        if got != announced {
            return Err(DownloadError::Refused(format!(
                "the precompiled code hashes to {got}, the hub announced {announced}"
            )));
        }
        let part = dest.with_extension("part");
        let io = |op, source| DownloadError::Io { op, path: part.clone(), source };
        tokio::fs::write(&part, &code).await.map_err(|e| io("writing", e))?;
        tokio::fs::File::open(&part)
            .await
            .map_err(|e| io("opening", e))?
            .sync_all()
            .await
            .map_err(|e| io("syncing", e))?;
        tokio::fs::rename(&part, &dest).await.map_err(|e| io("renaming", e))?;
        if let Ok(d) = std::fs::File::open(self.dir.join("modules")) {
            let _ = d.sync_all();
        }
        tracing::info!(module = %module.name, version = %module.version, %target, bytes = code.len(), "precompiled module downloaded");
        Ok(())
    }

    /// Each wanted module's phase on this agent.
    fn report_modules(&self) -> Vec<ModuleReport> {
        let status = self.status.lock().unwrap_or_else(|e| e.into_inner()).clone();
        self.state
            .desired
            .iter()
            .map(|m| {
                let slot = &m.module.name;
                let s = status.get(slot);
                let running = self.state.running.get(slot);
                let running_ref = running
                    .filter(|r| s.is_some_and(|s| s.hash.as_deref() == Some(&r.module.sha256_hex()) && s.enabled))
                    .map(|r| r.module.clone());
                let retry = self.retries.get(&m.module.sha256);
                let (phase, error) = if self.static_names.contains(slot) {
                    (Phase::Failed, format!("the agent's own config has a module named {slot:?}; it is not replaced"))
                } else if let Some((_, why)) = self.state.rolled_back.get(slot).filter(|(id, _)| *id == identity(m)) {
                    (Phase::RolledBack, why.clone())
                } else if let Some(r) = retry.filter(|r| r.mismatches >= MAX_MISMATCHES) {
                    (Phase::Failed, r.error.clone())
                } else if !self.present(&m.module.sha256) {
                    (Phase::Downloading, retry.map(|r| r.error.clone()).unwrap_or_default())
                } else if self.state.shadowing.get(slot).is_some_and(|(id, _)| *id == identity(m)) {
                    let why = s.and_then(|s| s.shadow.as_ref()).and_then(|s| s.last_error.clone());
                    (Phase::Canary, why.unwrap_or_default())
                } else if running.is_some_and(|r| identity(r) == identity(m)) && running_ref.is_some() {
                    let on_probation = m.probation.duration_s > 0 && !self.state.passed.contains(&identity(m));
                    (if on_probation { Phase::Canary } else { Phase::Running }, String::new())
                } else {
                    (Phase::Pending, s.and_then(|s| s.last_error.clone()).unwrap_or_default())
                };
                ModuleReport {
                    name: slot.clone(),
                    deployment: m.deployment,
                    wanted: m.module.clone(),
                    phase,
                    running: running_ref,
                    error: truncate(&error, brume_protocol::MAX_REPORT_ERROR),
                    batches_ok: s.map_or(0, |s| s.batches_ok),
                    batches_failed: s.map_or(0, |s| s.batches_failed),
                    shadow: s
                        .and_then(|s| s.shadow.as_ref())
                        .filter(|x| phase == Phase::Canary && x.sha256 == m.module.sha256_hex())
                        .map(|x| brume_protocol::ShadowReport {
                            inputs: x.inputs,
                            outputs: x.outputs,
                            running_outputs: x.running_outputs,
                            failed_batches: x.failed_batches,
                            last_error: truncate(
                                x.last_error.as_deref().unwrap_or_default(),
                                brume_protocol::MAX_REPORT_ERROR,
                            ),
                            max_mean_drift_pct: x.max_mean_drift_pct(),
                        }),
                }
            })
            .collect()
    }

    /// Each job's phase on this agent.
    fn report_jobs(&self) -> Vec<JobReport> {
        let status = self.status.lock().unwrap_or_else(|e| e.into_inner()).clone();
        self.state
            .jobs
            .iter()
            .map(|(id, j)| {
                let s = status.get(&Reprocess::key(*id));
                let retry = self.retries.get(&j.job.module.sha256);
                let (phase, error) = match &j.finished {
                    Some((phase, why)) => (*phase, why.clone()),
                    None if !self.present(&j.job.module.sha256) => {
                        (JobPhase::Downloading, retry.map(|r| r.error.clone()).unwrap_or_default())
                    }
                    None if s.is_some_and(|s| s.enabled) => {
                        (JobPhase::Running, s.and_then(|s| s.last_error.clone()).unwrap_or_default())
                    }
                    None => (JobPhase::Pending, String::new()),
                };
                let (readings_in, readings_out, batches_failed) = match (s, &j.finished) {
                    (Some(s), None) => (s.readings_in, s.readings_out, s.batches_failed),
                    _ => (j.readings_in, j.readings_out, j.batches_failed),
                };
                JobReport {
                    id: *id,
                    phase,
                    readings_in,
                    readings_out,
                    batches_failed,
                    error: truncate(&error, brume_protocol::MAX_REPORT_ERROR),
                }
            })
            .collect()
    }

    /// Hands a report to the forwarder if anything in it changed.
    fn report(&mut self) {
        let r = Report {
            agent_id: self.agent_id.clone(),
            sent_ms: crate::now_ns() / 1_000_000,
            generation: self.state.generation,
            modules: self.report_modules(),
            jobs: self.report_jobs(),
        };
        // Batch counters alone do not make a new report (they change every batch): they
        // ride along with the next change of generation, phase, build or error.
        // A shadow comparison makes a new report at 1, 2, 4, 8, ... inputs, and on a failure.
        let key = |m: &ModuleReport| {
            let shadow = m.shadow.as_ref().map(|s| (s.inputs.checked_ilog2(), s.failed_batches));
            (m.name.clone(), m.deployment, m.phase, m.running.clone(), m.error.clone(), shadow)
        };
        let job_key = |j: &JobReport| (j.id, j.phase, j.error.clone());
        let same = self.last_report.as_ref().is_some_and(|l| {
            l.generation == r.generation
                && l.modules.iter().map(key).eq(r.modules.iter().map(key))
                && l.jobs.iter().map(job_key).eq(r.jobs.iter().map(job_key))
        });
        if !same {
            // The hub keeps the report with the greatest (generation, sent_ms): sent_ms
            // never goes back, even when the device's clock does (no RTC, an NTP step),
            // and it is persisted with the state so a restart continues from it.
            let mut r = r;
            r.sent_ms = r.sent_ms.max(self.state.report_clock + 1);
            self.state.report_clock = r.sent_ms;
            self.reports.send_replace(Some(AgentReport::for_report(r.clone()).encode()));
            self.last_report = Some(r);
        }
    }
}

/// Why a candidate in the shadow fails, if it does: it did not load, failed too many
/// batches, or its outputs per input drift from the running build's on the same input.
fn judge_shadow(s: &ShadowStatus, m: &DesiredModule) -> Option<String> {
    if let Some(e) = &s.load_error {
        return Some(format!("did not load: {e}"));
    }
    let last = s.last_error.as_deref().unwrap_or_default();
    if s.failed_batches > u64::from(m.probation.max_failed_batches) {
        return Some(format!(
            "{} failed batches in the shadow (at most {}): {last}",
            s.failed_batches, m.probation.max_failed_batches
        ));
    }
    if let Some(max) = m.checks.max_failed_pct {
        let pct = s.failed_batches as f64 * 100.0 / s.batches.max(1) as f64;
        if s.batches >= 10 && pct > f64::from(max) {
            return Some(format!(
                "{} of {} batches failed in the shadow ({pct:.0}%, at most {max}%): {last}",
                s.failed_batches, s.batches
            ));
        }
    }
    if let Some(max) = m.checks.max_output_change_pct
        && s.inputs >= u64::from(m.checks.min_inputs.max(1))
    {
        let change = if s.running_outputs > 0 {
            (s.outputs as f64 - s.running_outputs as f64) / s.running_outputs as f64 * 100.0
        } else if s.outputs > 0 {
            f64::INFINITY
        } else {
            0.0
        };
        if change.abs() > f64::from(max) {
            return Some(format!(
                "{} outputs against {} from the running build on the same {} inputs ({change:+.0}%, at most ±{max}%)",
                s.outputs, s.running_outputs, s.inputs
            ));
        }
    }
    None
}

/// At most `max` bytes of `s`, cut at a character boundary.
fn truncate(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}
