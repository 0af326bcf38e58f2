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

mod compile;

pub use compile::{compile_in_child_processes, compile_module_command};

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
}

/// Shared status of all modules, for `/api/v1/status`.
pub type SharedModuleStatus = Arc<Mutex<Vec<ModuleStatus>>>;

/// Handle to the running module threads.
pub struct ModuleRunners {
    /// Cancelled by [`stop`](Self::stop); runners check it between batches and while
    /// they wait.
    stop: CancellationToken,
    /// The module threads, joined by [`stop`](Self::stop).
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl ModuleRunners {
    /// Starts the module threads (`module_runtime.threads`, at most one per module).
    /// Nothing to start → no engine is built.
    pub fn start(
        cfg: &Config,
        store: StoreHandle,
        metrics: Arc<Metrics>,
        status: SharedModuleStatus,
    ) -> anyhow::Result<ModuleRunners> {
        let stop = CancellationToken::new();
        let mut threads = Vec::new();
        if cfg.modules.is_empty() {
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
        let n_threads = cfg.module_runtime.threads.clamp(1, cfg.modules.len());
        let mut groups: Vec<Vec<Runner>> = (0..n_threads).map(|_| Vec::new()).collect();
        for (i, m) in cfg.modules.iter().enumerate() {
            let name = m.name.clone().unwrap_or_else(|| {
                m.path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| format!("module{i}"))
            });
            status.lock().unwrap_or_else(|e| e.into_inner()).push(ModuleStatus {
                name: name.clone(),
                path: m.path.display().to_string(),
                ..Default::default()
            });
            groups[i % n_threads].push(Runner {
                index: i,
                name,
                cfg: m.clone(),
                data_dir: cfg.data_dir.clone(),
                batch_max: cfg.module_runtime.batch_max_readings,
                engine: engine.clone(),
                store: store.clone(),
                metrics: metrics.clone(),
                status: status.clone(),
                rt: rt.clone(),
                latest_at_start,
                live: None,
                mtime: None,
            });
        }
        for (t, runners) in groups.into_iter().enumerate() {
            let worker = Worker {
                runners,
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

/// One thread's share of the modules.
struct Worker {
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

/// One configured module and, once loaded, its live instance.
struct Runner {
    index: usize,
    name: String,
    cfg: ModuleConfig,
    data_dir: std::path::PathBuf,
    /// `module_runtime.batch_max_readings`.
    batch_max: usize,
    /// The process's one engine, shared by every module.
    engine: Arc<WasmEngine>,
    /// Where outputs and progress are committed.
    store: StoreHandle,
    /// The agent's metrics.
    metrics: Arc<Metrics>,
    /// Every module's status; this runner writes entry `index`, locked briefly.
    status: SharedModuleStatus,
    /// The agent's runtime, for `block_on` (see [`Worker::rt`]).
    rt: tokio::runtime::Handle,
    /// Where `start_at = "latest"` puts a module without saved progress: the store's last
    /// reading id when the agent started.
    latest_at_start: i64,
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
    hash: String,
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
        while !self.stop.is_cancelled() {
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

    /// Sleeps until the store commits, `until`, or stop.
    fn wait(&self, commits: &mut watch::Receiver<StoreSnapshot>, until: Instant) -> Wake {
        self.rt.block_on(async {
            tokio::select! {
                _ = self.stop.cancelled() => Wake::Stop,
                r = commits.changed() => match r {
                    Ok(()) => Wake::Go,
                    // The writer is gone (shutdown): nothing more will commit.
                    Err(_) => { self.stop.cancelled().await; Wake::Stop }
                },
                _ = tokio::time::sleep_until(until.into()) => Wake::Go,
            }
        })
    }
}

impl Runner {
    fn set_status(&self, f: impl FnOnce(&mut ModuleStatus)) {
        if let Some(s) = self.status.lock().unwrap_or_else(|e| e.into_inner()).get_mut(self.index) {
            f(s);
        }
    }

    /// Hot reload: (re)loads the module when its file appears or changes.
    fn check_file(&mut self, reader: &StoreHistory, history: &Arc<dyn HistoryProvider>) {
        let now_mtime = std::fs::metadata(&self.cfg.path).and_then(|m| m.modified()).ok();
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
        let ready = !l.disabled && l.resume_at.is_none_or(|t| Instant::now() >= t);
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
            .instantiate(&self.engine, limits.clone(), history.clone(), config_json)
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
                self.metrics.module_event(&self.name, "disabled");
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
        match self.rt.block_on(f.reply).unwrap_or(Err(AppendError::Closed)) {
            Ok(()) => {
                l.cursor = f.cursor;
                l.state = f.state;
                l.failures = 0;
                self.metrics.module_batch(&self.name, "ok", f.n_in, f.n_out, f.fuel);
                for (k, v) in &f.metrics {
                    self.metrics.module_metric(&self.name, k, *v);
                }
                let cursor = l.cursor;
                self.set_status(|s| {
                    s.cursor = cursor;
                    s.batches_ok += 1;
                    s.consecutive_failures = 0;
                });
                true
            }
            Err(e) => {
                // Not a module failure: the store refused the outputs (full, disk, shut
                // down). Back to the last committed cursor and state; the same input is
                // processed again later.
                tracing::warn!(module = %self.name, error = %e, "module outputs not committed; will retry the batch");
                self.metrics.module_batch(&self.name, "store_refused", 0, 0, 0);
                self.reinstantiate(l, history);
                if !matches!(e, AppendError::Closed) {
                    l.resume_at = Some(Instant::now() + Duration::from_millis(200));
                }
                false
            }
        }
    }

    /// Loads the file, restores progress, instantiates. `None` (logged) if it cannot.
    fn load(&self, reader: &StoreHistory, history: &Arc<dyn HistoryProvider>, previous: Option<Live>) -> Option<Live> {
        let fail = |what: String| {
            tracing::error!(module = %self.name, path = %self.cfg.path.display(), error = %what, "module not loaded");
            self.metrics.module_event(&self.name, "load_error");
            self.set_status(|s| {
                s.enabled = false;
                s.last_error = Some(what);
            });
            None
        };
        let bytes = match std::fs::read(&self.cfg.path) {
            Ok(b) => b,
            Err(e) => return fail(format!("cannot read {}: {e}", self.cfg.path.display())),
        };
        let file_hash: String = Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
        let module = match compile::load(&self.engine, &self.data_dir, &bytes, &file_hash) {
            Ok(m) => m,
            Err(e) => return fail(e.to_string()),
        };
        let hash = module.hash_hex();
        let replaced = previous.as_ref().map(|p| p.hash.clone()).filter(|h| *h != hash);
        if let Some(mut p) = previous
            && p.hash == hash
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
            memory_bytes: self.cfg.memory.map(|b| b.as_u64()),
            fuel_per_batch: self.cfg.fuel_per_batch,
            time_per_batch: self.cfg.time_per_batch,
            max_output_readings: self.cfg.max_output_readings,
            ..Default::default()
        };
        let limits = Limits::from_manifest(&module.manifest().budgets, &overrides);
        let config_json = match &self.cfg.config {
            Some(t) => serde_json::to_string(t).unwrap_or_else(|_| "{}".into()),
            None => "{}".into(),
        };
        let saved = match reader.lock().module_progress(&self.name) {
            Ok(p) => p,
            Err(e) => return fail(format!("cannot read saved progress: {e}")),
        };
        let (cursor, state) = match saved {
            // Same version: resume exactly, state included.
            Some(p) if p.hash == hash => (p.cursor, p.state),
            // New version: keep the position, start with fresh state.
            Some(p) => (p.cursor, Vec::new()),
            None => match self.cfg.start_at {
                StartAt::Earliest => (0, Vec::new()),
                StartAt::Latest => (self.latest_at_start, Vec::new()),
            },
        };
        let instance = match self.instantiate(&module, &limits, &config_json, &state, history) {
            Ok(i) => i,
            Err(e) => return fail(e),
        };
        let m = module.manifest().clone();
        tracing::info!(module = %self.name, version = %m.version, hash = %hash, cursor, inputs = ?self.cfg.inputs.as_ref().unwrap_or(&m.inputs), outputs = ?m.outputs, "module loaded");
        self.metrics.module_event(&self.name, "loaded");
        self.set_status(|s| {
            s.version = Some(m.version.clone());
            s.hash = Some(hash.clone());
            s.enabled = true;
            s.cursor = cursor;
            s.consecutive_failures = 0;
            s.last_error = None;
        });
        if let Some(old) = replaced {
            compile::forget(&self.data_dir, &old);
        }
        Some(Live {
            module,
            instance,
            limits,
            config_json,
            hash,
            state,
            cursor,
            read_from: cursor,
            in_flight: None,
            failures: 0,
            disabled: false,
            resume_at: None,
        })
    }

    fn progress(&self, l: &Live, cursor: i64, state: Vec<u8>) -> ModuleProgress {
        ModuleProgress {
            name: self.name.clone(),
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
        let inputs = self.cfg.inputs.as_ref().unwrap_or(&manifest.inputs);
        let outputs = &manifest.outputs;
        let mut wanted = |s: &str| inputs.iter().any(|p| pattern_matches(p, s)) && !outputs.iter().any(|o| o == s);
        // The guard is a temporary: released before the module runs and queries history.
        let read = reader.lock().readings_after(l.read_from, self.batch_max, &mut wanted);
        let (rows, scanned_to) = match read {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(module = %self.name, error = %e, "cannot read module input; will retry");
                return false;
            }
        };
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
        let behind = rows.len() >= self.batch_max;
        let input = Input {
            readings: rows
                .into_iter()
                .filter_map(|r| {
                    Some(ModuleReading { stream: r.stream, ts_ns: r.ts_ns, fields: r.fields.decode().ok()? })
                })
                .collect(),
        };
        let n_in = input.readings.len() as u64;
        let result = l.instance.process(&input).and_then(|outcome| {
            let readings = to_readings(&outcome.output.readings)?;
            let state = l.instance.save_state()?;
            Ok((outcome, readings, state))
        });
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
                match self.rt.block_on(self.store.submit_module(readings, progress, behind)) {
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

    fn failed(&self, l: &mut Live, e: ModuleError, last_id: i64, history: &Arc<dyn HistoryProvider>) {
        l.failures += 1;
        self.metrics.module_batch(&self.name, e.kind(), 0, 0, 0);
        tracing::warn!(module = %self.name, kind = e.kind(), error = %e, consecutive = l.failures, "module failed on a batch");
        // Whatever happened, the instance may hold half-updated state: start from the last
        // committed state again.
        self.reinstantiate(l, history);
        if self.cfg.on_failure == OnFailure::Skip && !l.disabled {
            // Skipping is a decision that must survive a restart: persist the cursor.
            let progress = self.progress(l, last_id, l.state.clone());
            if self.rt.block_on(self.store.commit_module(Vec::new(), progress, false)).is_ok() {
                l.cursor = last_id;
                l.read_from = last_id;
            }
        }
        if l.failures >= self.cfg.max_consecutive_failures && !l.disabled {
            // ERROR: an operator must look at the module (or ship a fixed version).
            tracing::error!(module = %self.name, failures = l.failures, "module disabled after repeated failures; replace the file to re-enable it");
            l.disabled = true;
            self.metrics.module_event(&self.name, "disabled");
        }
        let msg = e.to_string();
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
