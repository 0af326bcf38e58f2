//! The control plane: the module registry, deployments and their rollouts, and each
//! agent's desired state.
//!
//! * [`registry`] checks uploads (signature, then the module loads).
//! * [`plan`] decides, from what the store holds, which modules each agent should run
//!   and what each rollout does next: pure functions, so every hub decides the same.
//! * [`http`] is the operator API (`/api/v1/registry/…`, `/api/v1/deployments/…`,
//!   `/api/v1/fleet/agents`); [`reprocess`] its re-processing jobs (`/api/v1/reprocess/…`).
//! * [`Reconciler`] (one task per hub) drives rollouts and keeps desired states current:
//!   every `fleet.reconcile_interval`, and at once when poked (an API change, an agent's
//!   report). It writes a desired state to the store only when it changes, which bumps its
//!   generation in the same transaction, and then publishes it retained on
//!   `brume/v1/agents/<id>/desired`, so an offline agent gets the latest one when it
//!   reconnects.
//!
//! # Several hubs
//!
//! Nothing here is held in memory between passes except when this hub last sent each
//! agent its state (to space out republishing). Each pass compares what it computes with
//! what the store holds, so a hub that wrote from a stale view is corrected by the next
//! pass of any hub. Two hubs driving one rollout compare and set the
//! deployment's revision, so a wave starts once. Two hubs publishing different
//! generations for one agent in the wrong order could leave an older retained message on
//! the broker; agents ignore generations they have passed, and an online agent whose
//! report lags the stored generation is sent the stored message again after
//! `fleet.republish_after`.

pub mod http;
pub mod plan;
pub mod registry;
pub mod reprocess;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::FleetConfig;
use crate::mqtt::MqttHandle;
use crate::store::fleet::{DeploymentState, DesiredContent, JobAgent, StoredDesired};
use crate::store::{HubStore, StoreError};
use plan::{Agent, Fleet, Step};

/// What the HTTP API and the ingest task share with the reconciler.
pub struct FleetHandle {
    /// Checks uploads.
    pub registry: registry::Registry,
    /// Wakes the reconciler for a pass now.
    pub poke: Notify,
    /// Recently downloaded modules, so a wave of agents downloading one build costs one
    /// database read (`fleet.blob_cache` bytes at most).
    pub blobs: BlobCache,
    /// Held while a missing module is read into [`FleetHandle::blobs`]: a wave of agents
    /// asking for the same build at once waits for one read instead of each taking a
    /// query permit (or getting 503).
    pub blob_fill: tokio::sync::Mutex<()>,
    /// Modules precompiled for device architectures, by (module sha256, target), with
    /// the artifact's sha256 in hex (`fleet.blob_cache` bytes at most, besides
    /// [`FleetHandle::blobs`]).
    pub artifacts: BlobCache<([u8; 32], brume_wasm_host::Target)>,
    /// Held while an artifact missing from [`FleetHandle::artifacts`] is compiled: one
    /// compilation at a time, however many agents ask.
    pub artifact_fill: tokio::sync::Mutex<()>,
}

/// One cached entry: key, bytes, a text that goes with them (a module's signature, an
/// artifact's sha256).
type Cached<K> = (K, bytes::Bytes, String);

/// Bytes by key, least recently used dropped first, at most `capacity` bytes: modules by
/// sha256, precompiled artifacts by (sha256, target). The bytes are shared (`Bytes`):
/// serving a cached entry copies nothing. The lock is held only to look up or insert,
/// never during IO.
pub struct BlobCache<K = [u8; 32]> {
    capacity: u64,
    /// Entries, least recently used first.
    entries: std::sync::Mutex<Vec<Cached<K>>>,
}

impl<K: PartialEq> BlobCache<K> {
    /// An empty cache of `capacity` bytes (0: caches nothing).
    pub fn new(capacity: u64) -> BlobCache<K> {
        BlobCache { capacity, entries: std::sync::Mutex::new(Vec::new()) }
    }

    /// The cached bytes and text of an entry, marking it used.
    pub fn get(&self, key: &K) -> Option<(bytes::Bytes, String)> {
        let mut e = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let i = e.iter().position(|(k, _, _)| k == key)?;
        let entry = e.remove(i);
        let found = (entry.1.clone(), entry.2.clone());
        e.push(entry);
        Some(found)
    }

    /// Caches an entry, dropping the least recently used to make room. An entry larger
    /// than the whole cache is not cached.
    pub fn insert(&self, key: K, bytes: bytes::Bytes, text: String) {
        if bytes.len() as u64 > self.capacity {
            return;
        }
        let mut e = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        e.retain(|(k, _, _)| *k != key);
        e.push((key, bytes, text));
        while e.iter().map(|(_, b, _)| b.len() as u64).sum::<u64>() > self.capacity {
            e.remove(0);
        }
    }
}

impl FleetHandle {
    /// From the configuration (validated: the keys parse).
    pub fn new(cfg: &FleetConfig) -> Result<FleetHandle, brume_signing::SignatureError> {
        Ok(FleetHandle {
            registry: registry::Registry::new(
                brume_signing::Keyring::parse(&cfg.trusted_keys)?,
                cfg.max_module_bytes.as_u64(),
            ),
            poke: Notify::new(),
            blobs: BlobCache::new(cfg.blob_cache.as_u64()),
            blob_fill: tokio::sync::Mutex::new(()),
            artifacts: BlobCache::new(cfg.blob_cache.as_u64()),
            artifact_fill: tokio::sync::Mutex::new(()),
        })
    }
}

/// Reads everything the decisions need, in one pass.
pub fn load(store: &dyn HubStore, now_ms: i64) -> Result<Fleet, StoreError> {
    let mut fleet = Fleet { deployments: store.deployments()?, ..Default::default() };
    for m in store.deployment_agents()? {
        fleet.members.entry(m.deployment).or_default().insert(m.agent_id.clone(), m.wave);
        fleet.recorded.insert((m.deployment, m.agent_id), (m.phase, m.error));
    }
    fleet.registry = store.registered_modules()?.into_iter().map(|m| (m.module.sha256, m)).collect();
    for p in store.presence()? {
        let online = p.online_at(now_ms);
        let s = p.status;
        fleet.agents.insert(s.agent_id.clone(), Agent { id: s.agent_id, labels: s.labels, online });
    }
    fleet.reports = store.reports()?.into_iter().map(|r| (r.report.agent_id.clone(), r.report)).collect();
    fleet.jobs = store.jobs()?;
    for a in store.job_agents()? {
        fleet.job_agents.entry(a.job).or_default().insert(a.agent_id.clone(), a);
    }
    Ok(fleet)
}

/// Drives rollouts and publishes desired states (see the module docs).
pub struct Reconciler {
    /// Where everything lives.
    pub store: Arc<dyn HubStore>,
    /// Publishes desired states.
    pub mqtt: MqttHandle,
    /// Poked by the API and by reports.
    pub handle: Arc<FleetHandle>,
    /// `[fleet]`.
    pub cfg: FleetConfig,
}

/// The reconciler's caches: only save work, never decide anything.
#[derive(Default)]
struct Caches {
    /// When this hub last published each agent's desired state.
    published: HashMap<String, Instant>,
}

impl Reconciler {
    /// Runs until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let caches = Arc::new(std::sync::Mutex::new(Caches::default()));
        loop {
            let store = self.store.clone();
            let c = caches.clone();
            let republish_after = self.cfg.republish_after;
            let pass = tokio::task::spawn_blocking(move || {
                let mut c = c.lock().unwrap_or_else(|e| e.into_inner());
                pass(&*store, &mut c, republish_after, crate::clock::now_ms())
            })
            .await;
            match pass {
                Ok(Ok(out)) => {
                    for sd in out {
                        if self.mqtt.publish_desired(&sd.agent_id, sd.message).await.is_err() {
                            return; // the event loop is gone: shutting down
                        }
                        tracing::debug!(agent_id = %sd.agent_id, generation = sd.generation, "desired state published");
                    }
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "fleet reconcile pass failed; retrying"),
                Err(e) => tracing::warn!(error = %e, "fleet reconcile task failed; retrying"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.handle.poke.notified() => {}
                _ = tokio::time::sleep(self.cfg.reconcile_interval) => {}
            }
        }
    }
}

/// One pass: advance rollouts, then write the desired states that changed. Returns the
/// messages to publish.
fn pass(
    store: &dyn HubStore,
    c: &mut Caches,
    republish_after: Duration,
    now_ms: i64,
) -> Result<Vec<StoredDesired>, StoreError> {
    let mut fleet = load(store, now_ms)?;
    record_phases(store, &mut fleet)?;
    record_job_progress(store, &mut fleet)?;
    for i in 0..fleet.deployments.len() {
        advance(store, &mut fleet, i, now_ms)?;
    }
    let stored = store.desired_states()?;
    // Compared with what the store holds, not with what this hub last wrote: another hub
    // may have written since (from an older or newer view), and the store is the truth.
    // A stored message that does not decode (`None`) is always replaced.
    let current: HashMap<&str, Option<DesiredContent>> =
        stored.iter().map(|d| (d.agent_id.as_str(), crate::store::fleet::desired_content(&d.message).ok())).collect();
    let mut out = Vec::new();
    for agent in fleet.agents.values() {
        let content = fleet.desired_for(agent);
        // An agent no deployment or job ever included has nothing to be told: no row, no
        // retained message (a fleet without deployments publishes nothing).
        let unchanged = match current.get(agent.id.as_str()) {
            Some(Some(c)) => *c == content,
            Some(None) => false,
            None => content == DesiredContent::default(),
        };
        if unchanged {
            continue;
        }
        if let Some(sd) = store.set_desired(&agent.id, &content, now_ms)? {
            tracing::info!(
                agent_id = %agent.id,
                generation = sd.generation,
                modules = content.modules.len(),
                jobs = content.reprocess.len(),
                "desired state changed"
            );
            c.published.insert(agent.id.clone(), Instant::now());
            out.push(sd);
        }
    }
    // Online agents that report an older generation than the stored one: send it again
    // (see the module docs for how that can happen).
    for sd in stored {
        let lagging = fleet.agents.get(&sd.agent_id).is_some_and(|a| a.online)
            && fleet.reports.get(&sd.agent_id).is_none_or(|r| r.generation < sd.generation);
        let recently = c.published.get(&sd.agent_id).is_some_and(|t| t.elapsed() < republish_after);
        if lagging && !recently && !out.iter().any(|o| o.agent_id == sd.agent_id) {
            tracing::info!(agent_id = %sd.agent_id, generation = sd.generation, "agent lags its desired state; publishing it again");
            c.published.insert(sd.agent_id.clone(), Instant::now());
            out.push(sd);
        }
    }
    Ok(out)
}

/// Stores the phases agents reported for the deployments they are in, where they
/// changed: a deployment's progress outlives the reports (after a rollback an agent
/// reports on the previous deployment).
fn record_phases(store: &dyn HubStore, fleet: &mut Fleet) -> Result<(), StoreError> {
    let mut changed = Vec::new();
    for (d, members) in &fleet.members {
        for agent in members.keys() {
            if let Some((phase, error)) = fleet.reported(*d, agent)
                && fleet.recorded.get(&(*d, agent.clone())).is_none_or(|(p, e)| *p != phase || e != error)
            {
                changed.push((*d, agent.clone(), phase, error.to_owned()));
            }
        }
    }
    if !changed.is_empty() {
        store.record_phases(&changed)?;
        for (d, a, p, e) in changed {
            fleet.recorded.insert((d, a), (p, e));
        }
    }
    Ok(())
}

/// Stores what agents reported about the jobs they are in, where it changed. A job's
/// progress outlives the report (the agent stops reporting a job once it is out of its
/// desired state).
fn record_job_progress(store: &dyn HubStore, fleet: &mut Fleet) -> Result<(), StoreError> {
    let mut changed = Vec::new();
    for (job, members) in &fleet.job_agents {
        for (agent, stored) in members {
            let Some(r) = fleet.reports.get(agent).and_then(|r| r.jobs.iter().find(|r| r.id == *job)) else { continue };
            let now = JobAgent::from_report(*job, agent, r);
            // A final phase is never taken back by an older report.
            if now != *stored && !stored.phase.is_final() {
                changed.push(now);
            }
        }
    }
    if !changed.is_empty() {
        store.record_job_progress(&changed)?;
        for a in changed {
            if a.phase.is_final() {
                tracing::info!(job = a.job, agent_id = %a.agent_id, phase = a.phase.as_str(), readings_in = a.readings_in, readings_out = a.readings_out, error = %a.error, "re-processing job finished on an agent");
            }
            fleet.job_agents.entry(a.job).or_default().insert(a.agent_id.clone(), a);
        }
    }
    Ok(())
}

/// Applies rollout steps to deployment `i` until it has to wait. Another hub updating
/// the deployment first ends the loop: that hub made the step.
fn advance(store: &dyn HubStore, fleet: &mut Fleet, i: usize, now_ms: i64) -> Result<(), StoreError> {
    // Each step either adds agents (then the wave is full) or moves the state on; a
    // handful per pass is plenty, and the bound keeps a pass short whatever happens.
    for _ in 0..8 {
        let d = &fleet.deployments[i];
        let mut next = d.clone();
        match fleet.next_step(d, now_ms) {
            Step::Wait => return Ok(()),
            Step::AddAgents(agents) => {
                tracing::info!(deployment = d.id, wave = d.wave, agents = ?agents, "adding agents to the rollout");
                let Some(updated) = store.add_deployment_agents(d, &agents, now_ms)? else {
                    return Ok(()); // changed meanwhile (another hub, an operator): next pass
                };
                let members = fleet.members.entry(updated.id).or_default();
                for a in agents {
                    members.entry(a).or_insert(updated.wave);
                }
                fleet.deployments[i] = updated;
                continue;
            }
            Step::NextWave(w) => {
                next.wave = w;
                next.wave_started_ms = now_ms;
            }
            Step::Done => next.state = DeploymentState::Done,
            Step::Abort(reason) => {
                tracing::warn!(deployment = d.id, module = %d.spec.module, version = %d.spec.version, %reason, "rollout aborted");
                next.state = DeploymentState::Aborted;
                next.reason = reason;
            }
        }
        match store.update_deployment(&next, now_ms)? {
            Some(updated) => {
                tracing::info!(
                    deployment = updated.id,
                    state = updated.state.as_str(),
                    wave = updated.wave,
                    "rollout advanced"
                );
                fleet.deployments[i] = updated;
            }
            None => return Ok(()),
        }
    }
    Ok(())
}
