//! Runs WASM processing modules against the local streams.
//!
//! Modules run on `module_runtime.threads` OS threads (one by default), never on the async
//! runtime: module calls are synchronous and CPU-bound and must not hold up ingest. A
//! thread runs its modules in turn, one batch each, so a busy module shares its thread
//! fairly and a module in backoff does not hold up the others; each call is bounded by the
//! module's time budget. Modules on one thread share its read connection. For each module:
//!
//! 1. loads the `.wasm` file through the process's one [`WasmEngine`] and restores the
//!    module's progress (input cursor and state) from the store;
//! 2. reads readings after its cursor on the streams its manifest's `inputs` (or the
//!    config's `inputs`, which replace them) match (never its own outputs), in id order,
//!    so in order per stream;
//! 3. calls the module under its budgets (memory, fuel, time, output);
//! 4. commits the module's outputs *together with* its new cursor and state
//!    ([`StoreHandle::commit_module`]): after a crash the module resumes exactly where the
//!    last commit left it, with the state that went with it, so its results are the same
//!    as without the crash;
//! 5. on failure (trap, loop, memory bomb, flood of output, bad output) counts and logs it,
//!    re-instantiates a poisoned instance from the last committed state, skips or retries
//!    the batch as configured, backs off, and after `max_consecutive_failures` disables the
//!    module until its file changes. Input readings are never deleted by a failure.
//!
//! A runner with nothing to do sleeps until the store commits (the writer's snapshot
//! watch changes on every commit), so an idle agent runs no module code and a busy one
//! hands new readings to its modules as soon as they are durable. While the writer
//! commits one batch's outputs, the runner reads and processes the next; it has the
//! verdict of a commit before it queues the next one, so a refused commit is retried from
//! the last committed state and nothing after it lands first.
//!
//! The file is checked for changes every `module_runtime.poll_interval` and reloaded
//! (hot reload). A new version (different hash) keeps the cursor and starts with fresh
//! state, since the old state's format may not be the new version's.
//!
//! A re-processing job ([`Reprocess`]) runs the same way under its own progress key
//! (`#reprocess/<id>`): from fresh state, over the readings with timestamps in its range
//! up to the store's last reading when it loaded, its outputs renamed to the
//! re-processed variant of each output stream (`stream#<sha256>`), until it has read
//! the range through ([`ModuleStatus::finished`]). No module reads variants as input.

mod compile;

pub use compile::{compile_in_child_processes, compile_module_command, precompiled_path};

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use brume_module_abi::{Aggregates, HistoryKind, HistoryQuery, HistoryResult, Input, ModuleReading};
use brume_protocol::Reading;
use brume_wasm_host::{HistoryProvider, LimitOverrides, Limits, LoadedModule, ModuleError, ModuleInstance, WasmEngine};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ModuleConfig, OnFailure, StartAt, pattern_matches};
use crate::metrics::Metrics;
use crate::store::writer::{AppendError, StoreHandle};
use crate::store::{ModuleProgress, StoreError, StoreReader, StoreSnapshot, TimedFields};

/// What the agent's status shows about one module.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ModuleStatus {
    /// Module name.
    pub name: String,
    /// The deployment that put it here (`None`: the agent's own config).
    pub deployment: Option<u64>,
    /// The `.wasm` file.
    pub path: String,
    /// Manifest version, once loaded.
    pub version: Option<String>,
    /// Hex sha256 of the loaded file.
    pub hash: Option<String>,
    /// Running (false: not loaded, or disabled after repeated failures).
    pub enabled: bool,
    /// Last reading id consumed.
    pub cursor: i64,
    /// Batches processed successfully.
    pub batches_ok: u64,
    /// Batches that failed.
    pub batches_failed: u64,
    /// Consecutive failures right now.
    pub consecutive_failures: u32,
    /// The last error, if any.
    pub last_error: Option<String>,
    /// When the running build was loaded, ms since the Unix epoch.
    pub loaded_ms: Option<i64>,
    /// A build from a deployment failed its probation (or did not load). The fleet task
    /// reads this and puts the previous build back (see [`crate::fleet`]).
    pub probation_failed: Option<ProbationFailure>,
    /// Input readings of committed batches since the build loaded.
    pub readings_in: u64,
    /// Output readings committed since the build loaded.
    pub readings_out: u64,
    /// A re-processing job: every reading of its range was processed and committed.
    pub finished: bool,
    /// A candidate build running in this module's shadow, and how it compares.
    pub shadow: Option<ShadowStatus>,
}

/// A candidate build run in the shadow of the running one, on the same input batches:
/// its outputs are counted and dropped, never stored.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ShadowStatus {
    /// Hex sha256 of the candidate.
    pub sha256: String,
    /// Input readings of the batches both processed.
    pub inputs: u64,
    /// Batches the candidate processed (successfully or not).
    pub batches: u64,
    /// The candidate's output readings.
    pub outputs: u64,
    /// The running build's output readings on the same batches.
    pub running_outputs: u64,
    /// Batches the candidate failed on.
    pub failed_batches: u64,
    /// The candidate's last failure.
    pub last_error: Option<String>,
    /// Why the candidate could not be loaded, if it could not.
    pub load_error: Option<String>,
    /// `"<stream> <field>"` → (sum, count) of the numeric output values of the candidate
    /// (`[0]`) and the running build (`[1]`); at most [`MAX_SHADOW_FIELDS`] keys.
    pub means: std::collections::BTreeMap<String, [(f64, u64); 2]>,
}

/// Most output fields a shadow comparison keeps means of.
pub const MAX_SHADOW_FIELDS: usize = 64;

impl ShadowStatus {
    /// The largest difference of a field's mean between the two builds, in percent of the
    /// running build's mean (of its magnitude, at least 1e-9), over fields both output.
    pub fn max_mean_drift_pct(&self) -> Option<u64> {
        self.means
            .values()
            .filter(|[c, r]| c.1 > 0 && r.1 > 0)
            .map(|[c, r]| {
                let (mc, mr) = (c.0 / c.1 as f64, r.0 / r.1 as f64);
                ((mc - mr).abs() / mr.abs().max(1e-9) * 100.0).min(u64::MAX as f64) as u64
            })
            .max()
    }

    fn add_means(&mut self, which: usize, out: &[ModuleReading]) {
        for r in out {
            for f in &r.fields {
                let v = match f.value {
                    brume_protocol::Value::F64(v) if v.is_finite() => v,
                    brume_protocol::Value::I64(v) => v as f64,
                    _ => continue,
                };
                let key = format!("{} {}", r.stream, f.name);
                if !self.means.contains_key(&key) && self.means.len() >= MAX_SHADOW_FIELDS {
                    continue;
                }
                let e = &mut self.means.entry(key).or_default()[which];
                e.0 += v;
                e.1 += 1;
            }
        }
    }
}

/// Which build failed its probation, and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProbationFailure {
    /// Hex sha256 of the build.
    pub sha256: String,
    /// Why.
    pub reason: String,
}

/// Shared status of all modules by name, for `/api/v1/status`, presence and the fleet
/// task. Locked briefly, never across an await.
pub type SharedModuleStatus = Arc<Mutex<std::collections::BTreeMap<String, ModuleStatus>>>;

/// A module to run: from the agent's config ([`ModuleSpec::from_config`]) or from the
/// hub's desired state (built by [`crate::fleet`], with [`Managed`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ModuleSpec {
    /// Name: progress and state are kept under it, and a new build of the same name
    /// takes over the cursor.
    pub name: String,
    /// The `.wasm` file.
    pub path: std::path::PathBuf,
    /// Configuration handed to the module's init, as JSON.
    pub config_json: String,
    /// Input patterns replacing the manifest's.
    pub inputs: Option<Vec<String>>,
    /// Failed batch: skip or retry.
    pub on_failure: OnFailure,
    /// Disabled after this many consecutive failures.
    pub max_consecutive_failures: u32,
    /// Where a module without saved progress starts.
    pub start_at: StartAt,
    /// Budget overrides.
    pub memory: Option<u64>,
    /// Fuel per batch override.
    pub fuel_per_batch: Option<u64>,
    /// Time per batch override.
    pub time_per_batch: Option<Duration>,
    /// Output readings per batch override.
    pub max_output_readings: Option<u32>,
    /// Set for modules from a deployment (and re-processing jobs).
    pub managed: Option<Managed>,
    /// Set for a re-processing job (`name` is then its progress key).
    pub reprocess: Option<Reprocess>,
}

/// A re-processing job's run of a build (see [`brume_protocol::ReprocessJob`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Reprocess {
    /// The hub's job id.
    pub job: u64,
    /// The build's module name (its manifest must say so; recorded as lineage).
    pub module: String,
    /// Start of the range (inclusive), ns.
    pub from_ns: i64,
    /// End of the range (exclusive), ns.
    pub to_ns: i64,
}

impl Reprocess {
    /// The progress key (and status name) of job `id`: `#` never starts a module name.
    pub fn key(id: u64) -> String {
        format!("#reprocess/{id}")
    }
}

/// What a module from a deployment carries beyond its config.
#[derive(Debug, Clone, PartialEq)]
pub struct Managed {
    /// The build: the file must hash to this, and the signature must be a trusted key's
    /// signature of it, or the module is not loaded.
    pub sha256: [u8; 32],
    /// The publisher's signature.
    pub signature: brume_signing::Signature,
    /// The keys pinned in the agent's config (`fleet.trusted_keys`).
    pub keyring: Arc<brume_signing::Keyring>,
    /// The deployment.
    pub deployment: u64,
    /// Probation: `Some((duration, max_failed_batches))` while the build has not passed
    /// it on this agent.
    pub probation: Option<ProbationSpec>,
    /// A candidate build to run in this one's shadow.
    pub shadow: Option<ShadowSpec>,
}

/// A candidate build to run in the shadow of a module (see [`ShadowStatus`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ShadowSpec {
    /// Its file (hashed and its signature checked, like any managed build).
    pub path: std::path::PathBuf,
    /// Its sha256.
    pub sha256: [u8; 32],
    /// The publisher's signature.
    pub signature: brume_signing::Signature,
    /// Its configuration.
    pub config_json: String,
}

/// How a build from a deployment is judged while on probation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProbationSpec {
    /// How long.
    pub duration: Duration,
    /// Failed batches tolerated.
    pub max_failed: u32,
    /// Output-rate and failure-rate checks.
    pub checks: brume_protocol::Checks,
}

impl ModuleSpec {
    /// The spec of a module from the agent's config (`[[modules]]` entry `i`).
    pub fn from_config(i: usize, m: &ModuleConfig) -> ModuleSpec {
        let name = m.name.clone().unwrap_or_else(|| {
            m.path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| format!("module{i}"))
        });
        ModuleSpec {
            name,
            path: m.path.clone(),
            config_json: match &m.config {
                Some(t) => serde_json::to_string(t).unwrap_or_else(|_| "{}".into()),
                None => "{}".into(),
            },
            inputs: m.inputs.clone(),
            on_failure: m.on_failure,
            max_consecutive_failures: m.max_consecutive_failures,
            start_at: m.start_at,
            memory: m.memory.map(|b| b.as_u64()),
            fuel_per_batch: m.fuel_per_batch,
            time_per_batch: m.time_per_batch,
            max_output_readings: m.max_output_readings,
            managed: None,
            reprocess: None,
        }
    }
}

/// Which module thread runs the module `name`: fixed by the name, so a module keeps its
/// thread when the set of modules changes.
fn thread_of(name: &str, threads: usize) -> usize {
    let h = Sha256::digest(name.as_bytes());
    (u64::from_le_bytes(h[..8].try_into().expect("8 bytes")) % threads.max(1) as u64) as usize
}

/// Handle to the running module threads.
pub struct ModuleRunners {
    /// Cancelled by [`stop`](Self::stop); runners check it between batches and while
    /// they wait.
    stop: CancellationToken,
    /// The module threads, joined by [`stop`](Self::stop).
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl ModuleRunners {
    /// Starts the module threads: `module_runtime.threads` of them (at most one per
    /// configured module when the set is fixed). `managed`, when the agent takes modules
    /// from deployments, carries the current set of those ([`crate::fleet`]); the threads
    /// add, replace and remove runners as it changes. Nothing to run and nothing managed:
    /// no engine, no thread.
    pub fn start(
        cfg: &Config,
        store: StoreHandle,
        metrics: Arc<Metrics>,
        status: SharedModuleStatus,
        managed: Option<watch::Receiver<Vec<ModuleSpec>>>,
    ) -> anyhow::Result<ModuleRunners> {
        let stop = CancellationToken::new();
        let mut threads = Vec::new();
        let static_specs: Vec<ModuleSpec> =
            cfg.modules.iter().enumerate().map(|(i, m)| ModuleSpec::from_config(i, m)).collect();
        if static_specs.is_empty() && managed.is_none() {
            return Ok(ModuleRunners { stop, threads });
        }
        let engine = Arc::new(
            WasmEngine::new(Default::default()).map_err(|e| anyhow::anyhow!("cannot start the WASM engine: {e}"))?,
        );
        // "From now on" means from agent start, not from whenever compilation finishes:
        // readings accepted while modules load must still reach them.
        let latest_at_start = StoreReader::open(&cfg.data_dir, &cfg.agent_id)
            .and_then(|r| r.last_id())
            .map_err(|e| anyhow::anyhow!("cannot read the store to position new modules: {e}"))?;
        let rt = tokio::runtime::Handle::current();
        let n_threads = match managed {
            Some(_) => cfg.module_runtime.threads.max(1),
            None => cfg.module_runtime.threads.clamp(1, static_specs.len()),
        };
        let shared = Shared {
            data_dir: cfg.data_dir.clone(),
            batch_max: cfg.module_runtime.batch_max_readings,
            engine,
            store: store.clone(),
            metrics,
            status,
            rt: rt.clone(),
            latest_at_start,
        };
        for t in 0..n_threads {
            let mine: Vec<ModuleSpec> =
                static_specs.iter().filter(|m| thread_of(&m.name, n_threads) == t).cloned().collect();
            let worker = Worker {
                thread: t,
                threads: n_threads,
                static_specs: mine,
                managed: managed.clone(),
                shared: shared.clone(),
                runners: Vec::new(),
                data_dir: cfg.data_dir.clone(),
                agent_id: cfg.agent_id.clone(),
                poll: cfg.module_runtime.poll_interval,
                store: store.clone(),
                stop: stop.clone(),
                rt: rt.clone(),
            };
            threads.push(
                std::thread::Builder::new()
                    .name(format!("modules-{t}"))
                    .spawn(move || worker.run())
                    .map_err(|e| anyhow::anyhow!("cannot start a module thread: {e}"))?,
            );
        }
        Ok(ModuleRunners { stop, threads })
    }

    /// Stops every module after its current batch and waits for the threads.
    pub fn stop(self) {
        self.stop.cancel();
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// What every runner of the process shares.
#[derive(Clone)]
struct Shared {
    data_dir: std::path::PathBuf,
    /// `module_runtime.batch_max_readings`.
    batch_max: usize,
    /// The process's one engine, shared by every module.
    engine: Arc<WasmEngine>,
    /// Where outputs and progress are committed.
    store: StoreHandle,
    /// The agent's metrics.
    metrics: Arc<Metrics>,
    /// Every module's status, by name; a runner writes its own entry, locked briefly.
    status: SharedModuleStatus,
    /// The agent's runtime, for `block_on` (see [`Worker::rt`]).
    rt: tokio::runtime::Handle,
    /// Where `start_at = "latest"` puts a configured module without saved progress: the
    /// store's last reading id when the agent started.
    latest_at_start: i64,
}

/// One thread's share of the modules.
struct Worker {
    /// This thread's index, of `threads`: it runs the modules [`thread_of`] gives it.
    thread: usize,
    threads: usize,
    /// The configured modules this thread runs.
    static_specs: Vec<ModuleSpec>,
    /// The modules from deployments (all of them; this thread runs its share), when the
    /// agent takes them. Watched between batches.
    managed: Option<watch::Receiver<Vec<ModuleSpec>>>,
    shared: Shared,
    runners: Vec<Runner>,
    data_dir: std::path::PathBuf,
    agent_id: String,
    /// How often module files are checked for changes.
    poll: Duration,
    store: StoreHandle,
    /// Cancelled when the modules stop; checked between batches and while waiting.
    stop: CancellationToken,
    /// The agent's runtime, entered with `block_on` to wait for commits (the thread is
    /// not a runtime thread).
    rt: tokio::runtime::Handle,
}

/// One module and, once loaded, its live instance.
struct Runner {
    name: String,
    spec: ModuleSpec,
    shared: Shared,
    /// The loaded module, if its file could be loaded.
    live: Option<Live>,
    /// The file's modification time when it was last looked at.
    mtime: Option<SystemTime>,
}

/// A loaded module with a live instance.
struct Live {
    module: LoadedModule,
    instance: ModuleInstance,
    limits: Limits,
    config_json: String,
    /// The input patterns it was loaded with (a change re-instantiates).
    inputs: Option<Vec<String>>,
    hash: String,
    /// A build from a deployment on probation: its failures are counted against the
    /// deployment's limit.
    probation: Option<Probation>,
    /// Last committed state (restored into a fresh instance after a poisoning failure).
    state: Vec<u8>,
    /// Every reading up to here is consumed and committed with `state` (or, past that,
    /// scanned and not for this module, which needs no commit).
    cursor: i64,
    /// Where the next read starts: past the batch whose commit is in flight, if any.
    read_from: i64,
    /// The commit the writer has not answered yet (at most one).
    in_flight: Option<InFlight>,
    failures: u32,
    disabled: bool,
    /// Backing off (after a failure or a refused commit) until then.
    resume_at: Option<Instant>,
    /// A re-processing job's bounds.
    scan: Option<Scan>,
    /// A candidate build in this one's shadow.
    shadow: Option<ShadowRun>,
}

/// A loaded candidate running in a module's shadow.
struct ShadowRun {
    sha256: [u8; 32],
    config_json: String,
    module: LoadedModule,
    instance: ModuleInstance,
    limits: Limits,
}

/// What a re-processing job reads, and where its outputs go.
struct Scan {
    /// The store's last reading id when the job loaded: nothing later is read.
    upto: i64,
    /// Timestamps read: `[from, to)`.
    ts: (i64, i64),
    /// The build, whose variant of each output stream gets the outputs.
    sha256: [u8; 32],
    /// Read through: nothing more to do.
    finished: bool,
}

/// Probation of a build from a deployment.
struct Probation {
    /// Failures count until then.
    until: Instant,
    /// Failed batches tolerated.
    max_failed: u32,
    /// Failed batches so far.
    failed: u32,
    /// Batches committed so far.
    ok: u32,
    /// Input and output readings of the committed batches.
    inputs: u64,
    outputs: u64,
    /// Data-plane checks.
    checks: brume_protocol::Checks,
    /// Outputs per input of the build this one replaced, measured here while it ran
    /// (`None`: nothing to compare with, e.g. after a restart).
    baseline: Option<f64>,
}

impl Probation {
    /// Why the build fails its data-plane checks now, if it does.
    fn judge(&self) -> Option<String> {
        let c = &self.checks;
        if let Some(max) = c.max_failed_pct {
            let batches = self.ok + self.failed;
            let pct = f64::from(self.failed) * 100.0 / f64::from(batches.max(1));
            if batches >= 10 && pct > f64::from(max) {
                return Some(format!(
                    "{} of {batches} batches failed during probation ({pct:.0}%, at most {max}%)",
                    self.failed
                ));
            }
        }
        if let (Some(max), Some(base)) = (c.max_output_change_pct, self.baseline)
            && self.inputs >= u64::from(c.min_inputs.max(1))
        {
            let rate = self.outputs as f64 / self.inputs as f64;
            let change = if base > 0.0 {
                (rate - base) / base * 100.0
            } else if rate > 0.0 {
                f64::INFINITY
            } else {
                0.0
            };
            if change.abs() > f64::from(max) {
                return Some(format!(
                    "{:.3} outputs per input over {} inputs, against {base:.3} for the build it replaced \
                     ({change:+.0}%, at most ±{max}%)",
                    rate, self.inputs
                ));
            }
        }
        None
    }
}

/// A batch's outputs and progress queued at the writer, with what to record once it is
/// durable.
struct InFlight {
    reply: oneshot::Receiver<Result<(), AppendError>>,
    cursor: i64,
    state: Vec<u8>,
    n_in: u64,
    n_out: u64,
    fuel: u64,
    metrics: Vec<(String, f64)>,
}

/// What waking up found.
enum Wake {
    /// The store committed something (or it is time for a file check).
    Go,
    /// The runners are stopping.
    Stop,
}

impl Worker {
    fn run(mut self) {
        // One read connection for this thread's modules, for their input and their
        // history queries: they never overlap (history is queried during a call, input
        // read between calls, and the thread makes one call at a time).
        let reader = match StoreReader::open(&self.data_dir, &self.agent_id) {
            Ok(r) => Arc::new(StoreHistory { reader: Mutex::new(r) }),
            Err(e) => {
                let names: Vec<&str> = self.runners.iter().map(|r| r.name.as_str()).collect();
                tracing::error!(modules = ?names, error = %e, "modules cannot read the store; not running");
                return;
            }
        };
        let history: Arc<dyn HistoryProvider> = reader.clone();
        // Changes on every commit. Marked seen *before* the modules read, so a commit that
        // lands after a read wakes the thread again.
        let mut commits = self.store.snapshot();
        let mut next_file_check = Instant::now();
        self.sync_specs(&reader, &history);
        while !self.stop.is_cancelled() {
            if self.managed.as_ref().is_some_and(|m| m.has_changed().unwrap_or(false)) {
                self.sync_specs(&reader, &history);
            }
            let now = Instant::now();
            if now >= next_file_check {
                next_file_check = now + self.poll;
                for r in &mut self.runners {
                    r.check_file(&reader, &history);
                }
            }
            commits.borrow_and_update();
            let mut worked = false;
            for r in &mut self.runners {
                worked |= r.step_if_ready(&reader, &history);
            }
            if !worked {
                for r in &mut self.runners {
                    r.settle_live(&history);
                }
                // Wake for a commit, the next file check, or the end of the first backoff.
                let now = Instant::now();
                let until = self
                    .runners
                    .iter()
                    .filter_map(|r| r.live.as_ref().and_then(|l| l.resume_at))
                    .filter(|t| *t > now)
                    .fold(next_file_check, Instant::min);
                if let Wake::Stop = self.wait(&mut commits, until) {
                    break;
                }
            }
        }
        // The last batches' outputs and progress were queued: see them committed (or
        // refused) before reporting the modules stopped.
        for r in &mut self.runners {
            r.settle_live(&history);
        }
    }

    /// Sleeps until the store commits, the set of modules from deployments changes,
    /// `until`, or stop.
    fn wait(&self, commits: &mut watch::Receiver<StoreSnapshot>, until: Instant) -> Wake {
        let mut managed = self.managed.clone();
        self.rt.block_on(async {
            let managed_changed = async {
                match managed.as_mut() {
                    Some(m) => {
                        if m.changed().await.is_err() {
                            // The fleet task is gone (shutdown): the set stays as it is.
                            std::future::pending::<()>().await
                        }
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = self.stop.cancelled() => Wake::Stop,
                r = commits.changed() => match r {
                    Ok(()) => Wake::Go,
                    // The writer is gone (shutdown): nothing more will commit.
                    Err(_) => { self.stop.cancelled().await; Wake::Stop }
                },
                _ = managed_changed => Wake::Go,
                _ = tokio::time::sleep_until(until.into()) => Wake::Go,
            }
        })
    }

    /// Makes the runners match the wanted modules: this thread's configured ones plus its
    /// share of those from deployments. A new module is loaded at once; a changed one
    /// (another build, config or inputs) is reloaded at once, between batches, after its
    /// commit in flight, so the new build takes over the cursor the old one committed
    /// (see [`Runner::load`]); a removed one is stopped after its commit in flight.
    fn sync_specs(&mut self, reader: &StoreHistory, history: &Arc<dyn HistoryProvider>) {
        let mut wanted: Vec<ModuleSpec> = self.static_specs.clone();
        if let Some(m) = self.managed.as_mut() {
            for spec in m.borrow_and_update().iter() {
                if thread_of(&spec.name, self.threads) == self.thread && !wanted.iter().any(|w| w.name == spec.name) {
                    wanted.push(spec.clone());
                }
            }
        }
        let mut kept = Vec::with_capacity(wanted.len());
        for mut r in std::mem::take(&mut self.runners) {
            if wanted.iter().any(|w| w.name == r.name) {
                kept.push(r);
                continue;
            }
            r.settle_live(history);
            if let Some(l) = &r.live {
                compile::forget(&self.shared.data_dir, &l.hash);
            }
            tracing::info!(module = %r.name, "module removed");
            self.shared.metrics.module_event(&r.name, "removed");
            self.shared.status.lock().unwrap_or_else(|e| e.into_inner()).remove(&r.name);
        }
        self.runners = kept;
        for spec in wanted {
            match self.runners.iter_mut().find(|r| r.name == spec.name) {
                Some(r) if r.spec == spec => {}
                Some(r) => {
                    tracing::info!(module = %r.name, path = %spec.path.display(), "module changed; reloading");
                    r.spec = spec;
                    r.mtime = None;
                    r.check_file(reader, history);
                }
                None => {
                    self.shared.status.lock().unwrap_or_else(|e| e.into_inner()).insert(
                        spec.name.clone(),
                        ModuleStatus {
                            name: spec.name.clone(),
                            path: spec.path.display().to_string(),
                            deployment: spec.managed.as_ref().map(|m| m.deployment),
                            ..Default::default()
                        },
                    );
                    let mut r =
                        Runner { name: spec.name.clone(), spec, shared: self.shared.clone(), live: None, mtime: None };
                    r.check_file(reader, history);
                    self.runners.push(r);
                }
            }
        }
    }
}

impl Runner {
    fn set_status(&self, f: impl FnOnce(&mut ModuleStatus)) {
        if let Some(s) = self.shared.status.lock().unwrap_or_else(|e| e.into_inner()).get_mut(&self.name) {
            f(s);
        }
    }

    /// Hot reload: (re)loads the module when its file appears or changes.
    fn check_file(&mut self, reader: &StoreHistory, history: &Arc<dyn HistoryProvider>) {
        let now_mtime = std::fs::metadata(&self.spec.path).and_then(|m| m.modified()).ok();
        if now_mtime == self.mtime {
            return;
        }
        self.mtime = now_mtime;
        if now_mtime.is_some() {
            let mut previous = self.live.take();
            if let Some(l) = previous.as_mut() {
                self.settle(l, history);
            }
            self.live = self.load(reader, history, previous);
        }
    }

    /// Processes one batch if the module is loaded, enabled, not backing off and has
    /// input. Returns whether it did any work.
    fn step_if_ready(&mut self, reader: &StoreHistory, history: &Arc<dyn HistoryProvider>) -> bool {
        let Some(mut l) = self.live.take() else { return false };
        let finished = l.scan.as_ref().is_some_and(|s| s.finished);
        let ready = !l.disabled && !finished && l.resume_at.is_none_or(|t| Instant::now() >= t);
        let worked = ready && {
            l.resume_at = None;
            self.step(&mut l, reader, history)
        };
        self.live = Some(l);
        worked
    }

    /// [`settle`](Self::settle) for the loaded module, if any.
    fn settle_live(&mut self, history: &Arc<dyn HistoryProvider>) {
        if let Some(mut l) = self.live.take() {
            self.settle(&mut l, history);
            self.live = Some(l);
        }
    }

    /// A fresh instance of the module with `state` restored (init runs again).
    fn instantiate(
        &self,
        module: &LoadedModule,
        limits: &Limits,
        config_json: &str,
        state: &[u8],
        history: &Arc<dyn HistoryProvider>,
    ) -> Result<ModuleInstance, String> {
        let mut i = module
            .instantiate(&self.shared.engine, limits.clone(), history.clone(), config_json)
            .map_err(|e| format!("init failed: {e}"))?;
        if !state.is_empty() {
            i.load_state(state).map_err(|e| format!("restoring saved state failed: {e}"))?;
        }
        Ok(i)
    }

    /// Replaces a possibly poisoned instance with one at the last committed state and
    /// rewinds the input to the last committed cursor. Disables the module if even that
    /// fails.
    fn reinstantiate(&self, l: &mut Live, history: &Arc<dyn HistoryProvider>) {
        l.read_from = l.cursor;
        match self.instantiate(&l.module, &l.limits, &l.config_json, &l.state, history) {
            Ok(i) => l.instance = i,
            Err(err) => {
                tracing::error!(module = %self.name, error = %err, "module cannot be re-instantiated; disabling it");
                self.shared.metrics.module_event(&self.name, "disabled");
                l.disabled = true;
                self.set_status(|s| {
                    s.enabled = false;
                    s.last_error = Some(err);
                });
            }
        }
    }

    /// Waits for the commit in flight, if any, and records its verdict. `false` if the
    /// store refused it: the instance is back at the last committed state and the input
    /// rewound, so the batch is processed again.
    fn settle(&self, l: &mut Live, history: &Arc<dyn HistoryProvider>) -> bool {
        let Some(f) = l.in_flight.take() else { return true };
        match self.shared.rt.block_on(f.reply).unwrap_or(Err(AppendError::Closed)) {
            Ok(()) => {
                l.cursor = f.cursor;
                l.state = f.state;
                l.failures = 0;
                self.shared.metrics.module_batch(&self.name, "ok", f.n_in, f.n_out, f.fuel);
                for (k, v) in &f.metrics {
                    self.shared.metrics.module_metric(&self.name, k, *v);
                }
                if let Some(p) = l.probation.as_mut().filter(|p| Instant::now() < p.until) {
                    p.ok += 1;
                    p.inputs += f.n_in;
                    p.outputs += f.n_out;
                    if let Some(why) = p.judge() {
                        self.fail_probation(l, why);
                    }
                }
                let cursor = l.cursor;
                self.set_status(|s| {
                    s.cursor = cursor;
                    s.batches_ok += 1;
                    s.consecutive_failures = 0;
                    s.readings_in += f.n_in;
                    s.readings_out += f.n_out;
                });
                true
            }
            Err(e) => {
                // Not a module failure: the store refused the outputs (full, disk, shut
                // down). Back to the last committed cursor and state; the same input is
                // processed again later.
                tracing::warn!(module = %self.name, error = %e, "module outputs not committed; will retry the batch");
                self.shared.metrics.module_batch(&self.name, "store_refused", 0, 0, 0);
                self.reinstantiate(l, history);
                if !matches!(e, AppendError::Closed) {
                    l.resume_at = Some(Instant::now() + Duration::from_millis(200));
                }
                false
            }
        }
    }

    /// [`load_live`](Self::load_live), then starts, keeps or stops the candidate in its
    /// shadow as the spec says.
    fn load(&self, reader: &StoreHistory, history: &Arc<dyn HistoryProvider>, previous: Option<Live>) -> Option<Live> {
        let mut l = self.load_live(reader, history, previous)?;
        self.sync_shadow(&mut l, history);
        Some(l)
    }

    fn sync_shadow(&self, l: &mut Live, history: &Arc<dyn HistoryProvider>) {
        let Some(m) = self.spec.managed.as_ref() else { return };
        let Some(w) = &m.shadow else {
            l.shadow = None;
            self.set_status(|s| s.shadow = None);
            return;
        };
        if l.shadow.as_ref().is_some_and(|s| s.sha256 == w.sha256 && s.config_json == w.config_json) {
            return;
        }
        l.shadow = None;
        let sha256 = brume_signing::to_hex(&w.sha256);
        let loaded = self.load_shadow(w, &m.keyring, history);
        match &loaded {
            Ok(_) => tracing::info!(module = %self.name, candidate = %sha256, "candidate build running in the shadow"),
            Err(e) => {
                tracing::warn!(module = %self.name, candidate = %sha256, error = %e, "candidate build not loaded")
            }
        }
        let load_error = loaded.as_ref().err().cloned();
        self.set_status(|s| s.shadow = Some(ShadowStatus { sha256, load_error, ..Default::default() }));
        l.shadow = loaded.ok();
    }

    fn load_shadow(
        &self,
        w: &ShadowSpec,
        keyring: &brume_signing::Keyring,
        history: &Arc<dyn HistoryProvider>,
    ) -> Result<ShadowRun, String> {
        let bytes = std::fs::read(&w.path).map_err(|e| format!("cannot read {}: {e}", w.path.display()))?;
        let digest: [u8; 32] = Sha256::digest(&bytes).into();
        if digest != w.sha256 {
            return Err(format!("{} does not hash to the candidate build", w.path.display()));
        }
        keyring.verify(&digest, &w.signature).map_err(|e| format!("signature refused: {e}"))?;
        let module =
            compile::load(&self.shared.engine, &self.shared.data_dir, &w.path, &bytes, &brume_signing::to_hex(&digest))
                .map_err(|e| e.to_string())?;
        if module.manifest().name != self.name {
            return Err(format!("the build is module {:?}, not {:?}", module.manifest().name, self.name));
        }
        let limits = Limits::from_manifest(&module.manifest().budgets, &LimitOverrides::default());
        let instance = self.instantiate(&module, &limits, &w.config_json, &[], history)?;
        Ok(ShadowRun { sha256: w.sha256, config_json: w.config_json.clone(), module, instance, limits })
    }

    /// Runs the candidate on the batch the running build just processed, and counts.
    fn run_shadow(
        &self,
        sh: &mut ShadowRun,
        input: &Input,
        running_out: &[ModuleReading],
        history: &Arc<dyn HistoryProvider>,
    ) {
        let result = sh.instance.process(input).and_then(|o| {
            to_readings(&o.output.readings)?;
            Ok(o)
        });
        let failure = match &result {
            Ok(_) => None,
            Err(e) => {
                // Poisoned, or holding half-updated state: start it afresh.
                match self.instantiate(&sh.module, &sh.limits, &sh.config_json, &[], history) {
                    Ok(i) => sh.instance = i,
                    Err(e) => tracing::warn!(module = %self.name, error = %e, "candidate cannot be re-instantiated"),
                }
                Some(e.to_string())
            }
        };
        self.set_status(|s| {
            let Some(st) = s.shadow.as_mut() else { return };
            st.inputs += input.readings.len() as u64;
            st.batches += 1;
            st.running_outputs += running_out.len() as u64;
            st.add_means(1, running_out);
            match &result {
                Ok(o) => {
                    st.outputs += o.output.readings.len() as u64;
                    st.add_means(0, &o.output.readings);
                }
                Err(_) => {
                    st.failed_batches += 1;
                    st.last_error = failure;
                }
            }
        });
    }

    /// Loads the file, restores progress, instantiates. `None` (logged) if it cannot.
    fn load_live(
        &self,
        reader: &StoreHistory,
        history: &Arc<dyn HistoryProvider>,
        previous: Option<Live>,
    ) -> Option<Live> {
        let managed = self.spec.managed.as_ref().map(|m| brume_signing::to_hex(&m.sha256));
        let fail = |what: String| {
            tracing::error!(module = %self.name, path = %self.spec.path.display(), error = %what, "module not loaded");
            self.shared.metrics.module_event(&self.name, "load_error");
            self.set_status(|s| {
                s.enabled = false;
                // A build from a deployment that does not load here has failed on this
                // device: the fleet task puts the previous build back.
                if let Some(sha256) = &managed {
                    s.probation_failed =
                        Some(ProbationFailure { sha256: sha256.clone(), reason: format!("did not load: {what}") });
                }
                s.last_error = Some(what);
            });
            None
        };
        let bytes = match std::fs::read(&self.spec.path) {
            Ok(b) => b,
            Err(e) => return fail(format!("cannot read {}: {e}", self.spec.path.display())),
        };
        let digest: [u8; 32] = Sha256::digest(&bytes).into();
        if let Some(m) = &self.spec.managed {
            // Checked again here, not only after the download: nothing runs that does not
            // hash to the deployed build and carry a trusted publisher's signature.
            if digest != m.sha256 {
                return fail(format!(
                    "{} does not hash to the deployed build {} (changed on disk?)",
                    self.spec.path.display(),
                    brume_signing::to_hex(&m.sha256)
                ));
            }
            if let Err(e) = m.keyring.verify(&digest, &m.signature) {
                return fail(format!("signature refused: {e}"));
            }
        }
        let file_hash = brume_signing::to_hex(&digest);
        let module =
            match compile::load(&self.shared.engine, &self.shared.data_dir, &self.spec.path, &bytes, &file_hash) {
                Ok(m) => m,
                Err(e) => return fail(e.to_string()),
            };
        let slot = self.spec.reprocess.as_ref().map_or(&self.name, |r| &r.module);
        if managed.is_some() && module.manifest().name != *slot {
            // A signed build of another module put in this slot (a forged or mistaken
            // desired state) would take over this slot's cursor and outputs: refused.
            return fail(format!("the build is module {:?}, deployed as {:?}", module.manifest().name, slot));
        }
        let hash = module.hash_hex();
        let replaced = previous.as_ref().map(|p| p.hash.clone()).filter(|h| *h != hash);
        // Another build, config or inputs in place of a loaded one (not a touched file).
        let had_previous = previous.is_some();
        if let Some(mut p) = previous
            && p.hash == hash
            && p.config_json == self.spec.config_json
            && p.inputs == self.spec.inputs
        {
            // Touched but unchanged: keep the running instance; a disabled module gets
            // another chance, since touching the file is how an operator asks for one.
            if p.disabled {
                tracing::info!(module = %self.name, "module file touched: re-enabling");
                p.disabled = false;
                p.failures = 0;
                self.set_status(|s| {
                    s.enabled = true;
                    s.consecutive_failures = 0;
                });
            }
            return Some(p);
        }
        let overrides = LimitOverrides {
            memory_bytes: self.spec.memory,
            fuel_per_batch: self.spec.fuel_per_batch,
            time_per_batch: self.spec.time_per_batch,
            max_output_readings: self.spec.max_output_readings,
            ..Default::default()
        };
        let limits = Limits::from_manifest(&module.manifest().budgets, &overrides);
        let config_json = self.spec.config_json.clone();
        let saved = match reader.lock().module_progress(&self.name) {
            Ok(p) => p,
            Err(e) => return fail(format!("cannot read saved progress: {e}")),
        };
        let (cursor, state) = match saved {
            // Same version: resume exactly, state included.
            Some(p) if p.hash == hash => (p.cursor, p.state),
            // A job starts before the first reading of its range.
            _ if self.spec.reprocess.is_some() => {
                let from = self.spec.reprocess.as_ref().map_or(0, |r| r.from_ns);
                match reader.lock().reprocess_start(from) {
                    Ok(c) => (c, Vec::new()),
                    Err(e) => return fail(format!("cannot read the store position: {e}")),
                }
            }
            // New version: keep the position, start with fresh state.
            Some(p) => (p.cursor, Vec::new()),
            None => match self.spec.start_at {
                StartAt::Earliest => (0, Vec::new()),
                // A module from a deployment starts when it arrives, not at agent start.
                StartAt::Latest if managed.is_some() => match reader.lock().last_id() {
                    Ok(id) => (id, Vec::new()),
                    Err(e) => return fail(format!("cannot read the store position: {e}")),
                },
                StartAt::Latest => (self.shared.latest_at_start, Vec::new()),
            },
        };
        let scan = match &self.spec.reprocess {
            None => None,
            Some(r) => match reader.lock().last_id() {
                Ok(upto) => Some(Scan { upto, ts: (r.from_ns, r.to_ns), sha256: digest, finished: false }),
                Err(e) => return fail(format!("cannot read the store position: {e}")),
            },
        };
        let instance = match self.instantiate(&module, &limits, &config_json, &state, history) {
            Ok(i) => i,
            Err(e) => return fail(e),
        };
        // What the build being replaced produced per input here, for the output-rate check.
        let baseline = had_previous.then_some(()).and_then(|_| {
            let st = self.shared.status.lock().unwrap_or_else(|e| e.into_inner());
            let s = st.get(&self.name)?;
            let min = self.spec.managed.as_ref()?.probation?.checks.min_inputs.max(1);
            (s.readings_in >= u64::from(min)).then(|| s.readings_out as f64 / s.readings_in as f64)
        });
        let m = module.manifest().clone();
        tracing::info!(module = %self.name, version = %m.version, hash = %hash, cursor, inputs = ?self.spec.inputs.as_ref().unwrap_or(&m.inputs), outputs = ?m.outputs, "module loaded");
        self.shared.metrics.module_event(&self.name, "loaded");
        let deployment = self.spec.managed.as_ref().map(|m| m.deployment);
        self.set_status(|s| {
            s.version = Some(m.version.clone());
            s.hash = Some(hash.clone());
            s.enabled = true;
            s.cursor = cursor;
            s.consecutive_failures = 0;
            s.last_error = None;
            s.deployment = deployment;
            s.loaded_ms = Some(crate::now_ns() / 1_000_000);
            s.probation_failed = None;
            s.readings_in = 0;
            s.readings_out = 0;
            s.finished = false;
        });
        let probation = self.spec.managed.as_ref().and_then(|m| m.probation).map(|p| Probation {
            until: Instant::now() + p.duration,
            max_failed: p.max_failed,
            failed: 0,
            ok: 0,
            inputs: 0,
            outputs: 0,
            checks: p.checks,
            baseline,
        });
        if probation.as_ref().is_some_and(|p| p.checks.max_output_change_pct.is_some() && p.baseline.is_none()) {
            tracing::info!(module = %self.name, "no output rate of a predecessor measured here; the output-rate check is skipped");
        }
        if let Some(old) = replaced {
            compile::forget(&self.shared.data_dir, &old);
        }
        Some(Live {
            module,
            instance,
            limits,
            config_json,
            inputs: self.spec.inputs.clone(),
            hash,
            state,
            cursor,
            read_from: cursor,
            probation,
            in_flight: None,
            failures: 0,
            disabled: false,
            resume_at: None,
            scan,
            shadow: None,
        })
    }

    fn progress(&self, l: &Live, cursor: i64, state: Vec<u8>) -> ModuleProgress {
        ModuleProgress {
            name: self.name.clone(),
            module: self.spec.reprocess.as_ref().map_or_else(|| self.name.clone(), |r| r.module.clone()),
            version: l.module.manifest().version.clone(),
            hash: l.hash.clone(),
            cursor,
            state,
        }
    }

    /// Processes one batch if there is input, while the previous batch's commit is in
    /// flight, and queues its commit. Returns whether it did any work.
    fn step(&self, l: &mut Live, reader: &StoreHistory, history: &Arc<dyn HistoryProvider>) -> bool {
        let manifest = l.module.manifest();
        let inputs = self.spec.inputs.as_ref().unwrap_or(&manifest.inputs);
        let outputs = &manifest.outputs;
        // Re-processed variants are results kept beside their streams, never input.
        let mut wanted = |s: &str| {
            !s.contains(brume_protocol::VARIANT_SEP)
                && inputs.iter().any(|p| pattern_matches(p, s))
                && !outputs.iter().any(|o| o == s)
        };
        // The guard is a temporary: released before the module runs and queries history.
        let read = match &l.scan {
            None => {
                reader.lock().readings_after(l.read_from, self.shared.batch_max, &mut wanted).map(|(r, c)| (r, c, true))
            }
            Some(s) => reader.lock().readings_between(
                l.read_from,
                s.upto,
                s.ts,
                self.shared.batch_max,
                MAX_JOB_SCAN,
                &mut wanted,
            ),
        };
        let (rows, scanned_to, exhausted) = match read {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(module = %self.name, error = %e, "cannot read module input; will retry");
                return false;
            }
        };
        if rows.is_empty() && l.scan.is_some() && !exhausted {
            // A job past a stretch of readings outside its range: on, without waiting.
            l.read_from = scanned_to;
            if l.in_flight.is_none() {
                l.cursor = scanned_to;
            }
            return true;
        }
        if rows.is_empty() && l.scan.is_some() && l.in_flight.is_none() {
            // A job that read its range through, with everything committed: finished.
            if let Some(s) = l.scan.as_mut() {
                s.finished = true;
            }
            tracing::info!(module = %self.name, cursor = l.cursor, "re-processing finished");
            self.set_status(|s| s.finished = true);
            return false;
        }
        if rows.is_empty() {
            // Nothing for us: move past other streams' readings in memory only. Losing this
            // on a crash costs a re-scan, never a result.
            if scanned_to > l.read_from {
                l.read_from = scanned_to;
                if l.in_flight.is_none() {
                    l.cursor = scanned_to;
                    self.set_status(|s| s.cursor = scanned_to);
                }
            }
            return false;
        }
        let last_id = rows.last().map(|r| r.id).unwrap_or(l.read_from);
        // Behind on its input (a full batch read): commit at once; keeping up: ride the
        // commit window with the readings it processed.
        let behind = rows.len() >= self.shared.batch_max;
        let input = Input {
            readings: rows
                .into_iter()
                .filter_map(|r| {
                    Some(ModuleReading { stream: r.stream, ts_ns: r.ts_ns, fields: r.fields.decode().ok()? })
                })
                .collect(),
        };
        let n_in = input.readings.len() as u64;
        let variant = l.scan.as_ref().map(|s| s.sha256);
        let result = l.instance.process(&input).and_then(|outcome| {
            let mut readings = to_readings(&outcome.output.readings)?;
            if let Some(sha) = &variant {
                for r in &mut readings {
                    r.stream = brume_protocol::variant_stream(&r.stream, sha);
                }
            }
            let state = l.instance.save_state()?;
            Ok((outcome, readings, state))
        });
        // A candidate in the shadow sees exactly the batches the running build processed.
        if let (Ok((outcome, _, _)), Some(sh)) = (&result, l.shadow.as_mut()) {
            self.run_shadow(sh, &input, &outcome.output.readings, history);
        }
        // This batch was processed on top of the previous one's state: only if that
        // committed may this one be queued (or its failure be judged).
        if !self.settle(l, history) {
            // Refused: go again from the last committed cursor.
            return true;
        }
        match result {
            Ok((outcome, readings, state)) => {
                let n_out = readings.len() as u64;
                let progress = self.progress(l, last_id, state.clone());
                match self.shared.rt.block_on(self.shared.store.submit_module(readings, progress, behind)) {
                    Ok(reply) => {
                        l.read_from = last_id;
                        l.in_flight = Some(InFlight {
                            reply,
                            cursor: last_id,
                            state,
                            n_in,
                            n_out,
                            fuel: outcome.fuel_used,
                            metrics: outcome.output.metrics,
                        });
                        true
                    }
                    Err(_) => {
                        // The writer is gone: the agent is stopping.
                        self.reinstantiate(l, history);
                        false
                    }
                }
            }
            Err(e) => {
                self.failed(l, e, last_id, history);
                true
            }
        }
    }

    /// The build failed its probation: stop it now (its outputs may be wrong) and let the
    /// fleet task put the previous build back.
    fn fail_probation(&self, l: &mut Live, why: String) {
        if l.disabled {
            return;
        }
        tracing::error!(module = %self.name, error = %why, "module build failed its probation; rolling back");
        self.shared.metrics.module_event(&self.name, "probation_failed");
        l.disabled = true;
        let sha256 = l.hash.clone();
        self.set_status(|s| {
            s.enabled = false;
            s.probation_failed = Some(ProbationFailure { sha256, reason: why });
        });
    }

    fn failed(&self, l: &mut Live, e: ModuleError, last_id: i64, history: &Arc<dyn HistoryProvider>) {
        l.failures += 1;
        self.shared.metrics.module_batch(&self.name, e.kind(), 0, 0, 0);
        tracing::warn!(module = %self.name, kind = e.kind(), error = %e, consecutive = l.failures, "module failed on a batch");
        // Whatever happened, the instance may hold half-updated state: start from the last
        // committed state again.
        self.reinstantiate(l, history);
        if self.spec.on_failure == OnFailure::Skip && !l.disabled {
            // Skipping is a decision that must survive a restart: persist the cursor.
            let progress = self.progress(l, last_id, l.state.clone());
            if self.shared.rt.block_on(self.shared.store.commit_module(Vec::new(), progress, false)).is_ok() {
                l.cursor = last_id;
                l.read_from = last_id;
            }
        }
        if let Some(p) = l.probation.as_mut().filter(|p| Instant::now() < p.until) {
            p.failed += 1;
            let why = if p.failed > p.max_failed {
                Some(format!("{} failed batches during probation (at most {}): {e}", p.failed, p.max_failed))
            } else {
                p.judge().map(|why| format!("{why}: {e}"))
            };
            if let Some(why) = why {
                self.fail_probation(l, why);
            }
        }
        if l.failures >= self.spec.max_consecutive_failures && !l.disabled {
            // ERROR: an operator must look at the module (or ship a fixed version).
            tracing::error!(module = %self.name, failures = l.failures, "module disabled after repeated failures; replace the file to re-enable it");
            l.disabled = true;
            self.shared.metrics.module_event(&self.name, "disabled");
        }
        let msg = e.to_string();
        // Disabled for any reason while on probation (consecutive failures, an instance
        // that cannot be made again): the build failed its probation too.
        if l.disabled && l.probation.as_ref().is_some_and(|p| Instant::now() < p.until) {
            let (sha256, reason) = (l.hash.clone(), format!("disabled during probation: {msg}"));
            self.set_status(|s| {
                if s.probation_failed.is_none() {
                    s.probation_failed = Some(ProbationFailure { sha256, reason });
                }
            });
        }
        let (failures, disabled, cursor) = (l.failures, l.disabled, l.cursor);
        self.set_status(|s| {
            s.batches_failed += 1;
            s.consecutive_failures = failures;
            s.last_error = Some(msg);
            s.enabled = !disabled;
            s.cursor = cursor;
        });
        if !l.disabled {
            // Back off: 100 ms, 200 ms, ... up to 10 s; the thread's other modules go on.
            let backoff =
                Duration::from_millis(100u64.saturating_mul(1 << l.failures.min(7))).min(Duration::from_secs(10));
            l.resume_at = Some(Instant::now() + backoff);
        }
    }
}

/// Converts module output readings into store readings, validating names, timestamps and
/// fields like any other input.
fn to_readings(out: &[ModuleReading]) -> Result<Vec<Reading>, ModuleError> {
    out.iter()
        .map(|r| {
            Reading::new(r.stream.clone(), r.ts_ns, &r.fields)
                .map_err(|e| ModuleError::BadMessage(format!("invalid output reading on {:?}: {e}", r.stream)))
        })
        .collect()
}

/// `brume.history` on the agent's SQLite store, through its own read-only connection.
struct StoreHistory {
    reader: Mutex<StoreReader>,
}

impl StoreHistory {
    fn lock(&self) -> std::sync::MutexGuard<'_, StoreReader> {
        self.reader.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Most stored readings a re-processing job scans for one batch of input.
const MAX_JOB_SCAN: usize = 65_536;

/// Most readings an aggregate query scans.
const MAX_AGGREGATE_SCAN: usize = 200_000;

impl HistoryProvider for StoreHistory {
    fn query(&self, q: &HistoryQuery) -> HistoryResult {
        let reader = self.lock();
        let decode = |rows: Vec<TimedFields>| -> Vec<ModuleReading> {
            rows.into_iter()
                .filter_map(|r| {
                    Some(ModuleReading { stream: q.stream.clone(), ts_ns: r.ts_ns, fields: r.fields.decode().ok()? })
                })
                .collect()
        };
        let res: Result<HistoryResult, StoreError> = match &q.kind {
            HistoryKind::LastN { n, before_ns } => {
                reader.last_n(&q.stream, *before_ns, *n as usize).map(|r| HistoryResult::Readings(decode(r)))
            }
            HistoryKind::Range { from_ns, to_ns, limit } => reader
                .readings(&q.stream, *from_ns, *to_ns, *limit as usize)
                .map(|r| HistoryResult::Readings(decode(r))),
            HistoryKind::Aggregate { from_ns, to_ns, field } => {
                reader.readings(&q.stream, *from_ns, *to_ns, MAX_AGGREGATE_SCAN).map(|rows| {
                    let mut a = Aggregates { count: 0, min: None, max: None, mean: None };
                    let mut sum = 0.0;
                    for r in decode(rows) {
                        if let Some(v) = r.number(field) {
                            a.count += 1;
                            sum += v;
                            a.min = Some(a.min.map_or(v, |m: f64| m.min(v)));
                            a.max = Some(a.max.map_or(v, |m: f64| m.max(v)));
                        }
                    }
                    a.mean = (a.count > 0).then(|| sum / a.count as f64);
                    HistoryResult::Aggregates(a)
                })
            }
        };
        res.unwrap_or_else(|e| HistoryResult::Err(format!("history query failed: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probation(max_change: Option<u32>, max_failed: Option<u32>, baseline: Option<f64>) -> Probation {
        Probation {
            until: Instant::now() + Duration::from_secs(60),
            max_failed: 100,
            failed: 0,
            ok: 0,
            inputs: 0,
            outputs: 0,
            checks: brume_protocol::Checks {
                max_output_change_pct: max_change,
                max_failed_pct: max_failed,
                min_inputs: 100,
            },
            baseline,
        }
    }

    #[test]
    fn output_rate_is_judged_against_the_predecessor_after_min_inputs() {
        let mut p = probation(Some(50), None, Some(0.1));
        (p.inputs, p.outputs) = (99, 99);
        assert_eq!(p.judge(), None, "too few inputs to judge");
        (p.inputs, p.outputs) = (100, 14);
        assert_eq!(p.judge(), None, "+40% is within ±50%");
        (p.inputs, p.outputs) = (100, 16);
        let why = p.judge().unwrap();
        assert!(why.contains("0.160 outputs per input") && why.contains("+60%"), "{why}");
        (p.inputs, p.outputs) = (100, 4);
        assert!(p.judge().unwrap().contains("-60%"));
        // From nothing to something is an infinite change; nothing to nothing is none.
        let mut p = probation(Some(1000), None, Some(0.0));
        (p.inputs, p.outputs) = (100, 1);
        assert!(p.judge().is_some());
        p.outputs = 0;
        assert_eq!(p.judge(), None);
        // No predecessor measured: not judged.
        let mut p = probation(Some(1), None, None);
        (p.inputs, p.outputs) = (1000, 1000);
        assert_eq!(p.judge(), None);
    }

    #[test]
    fn failure_rate_is_judged_after_ten_batches() {
        let mut p = probation(None, Some(20), None);
        (p.ok, p.failed) = (5, 4);
        assert_eq!(p.judge(), None, "nine batches say little");
        (p.ok, p.failed) = (8, 2);
        assert_eq!(p.judge(), None, "20% is allowed");
        (p.ok, p.failed) = (7, 3);
        assert!(p.judge().unwrap().contains("3 of 10 batches failed"));
    }
}
