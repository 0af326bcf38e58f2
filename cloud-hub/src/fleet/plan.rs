//! The control plane's decisions, as pure functions of what the store holds: which
//! modules each agent should run ([`Fleet::desired_for`]) and what a rollout does next
//! ([`Fleet::next_step`]). No IO, so every rule is unit tested here, and every hub
//! instance reading the same store decides the same.
//!
//! # Which deployment an agent gets
//!
//! For each module name, the newest live deployment (highest id, state `rolling`,
//! `paused` or `done`) that includes the agent decides the version:
//!
//! * a `done` deployment includes every agent its selector matches now, including agents
//!   that appear later;
//! * a `rolling` or `paused` one includes the agents its waves added so far (that still
//!   match the selector);
//! * an `aborted` or `rolled_back` one includes nobody, so its agents fall back to the
//!   next older deployment of the module (or stop running it if there is none).
//!
//! # How a rollout advances
//!
//! Waves are cumulative sizes over the agents the selector matches, in an order fixed
//! per deployment (online agents first, then by a hash of deployment id and agent id, so
//! different rollouts start on different agents). A wave is complete when every online
//! agent in it reports the version `running` (past its probation on the device), at
//! least one does, and the deployment's probation time has passed since the wave
//! started; then the next wave starts, or the rollout is done. Offline agents never hold
//! a wave up: they get the version when they come back. When the agents in the waves so
//! far that failed or rolled back exceed `abort_threshold` of them, the rollout is
//! aborted, and later waves never get it.
//!
//! # Re-processing jobs
//!
//! A job lists the agents its selector matched when it was created. It is in an agent's
//! desired state until the agent reports it done or failed (as last reported, or as
//! recorded), or an operator cancels it; at most `MAX_REPROCESS_JOBS`, oldest first.

use std::collections::{BTreeMap, HashMap};

use brume_protocol::{DesiredModule, ModuleRef, Phase, Probation, Report, ReprocessJob};
use sha2::{Digest, Sha256};

use crate::store::fleet::{Deployment, DeploymentState, DesiredContent, Job, JobAgent, RegisteredModule};

/// An agent as the control plane sees it (from its presence messages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agent {
    /// Its id.
    pub id: String,
    /// Its labels.
    pub labels: Vec<(String, String)>,
    /// Online now.
    pub online: bool,
}

/// Everything decisions are made from, read from the store in one pass.
#[derive(Debug, Default)]
pub struct Fleet {
    /// Every deployment, by id.
    pub deployments: Vec<Deployment>,
    /// Deployment id → agent → the wave that added it.
    pub members: HashMap<u64, HashMap<String, u32>>,
    /// Registered modules by sha256.
    pub registry: HashMap<[u8; 32], RegisteredModule>,
    /// Known agents, by id.
    pub agents: BTreeMap<String, Agent>,
    /// Each agent's latest report.
    pub reports: HashMap<String, Report>,
    /// The phase each agent last reported for each deployment it is in, as stored:
    /// `(deployment, agent)` → (phase, error). Outlives the report (after a rollback the
    /// agent reports on the previous deployment).
    pub recorded: HashMap<(u64, String), (Phase, String)>,
    /// Every re-processing job, by id.
    pub jobs: Vec<Job>,
    /// Job id → agent → its progress as stored.
    pub job_agents: HashMap<u64, HashMap<String, JobAgent>>,
}

/// What a rollout should do next.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Nothing now.
    Wait,
    /// Add these agents to the current wave.
    AddAgents(Vec<String>),
    /// Start wave `n`.
    NextWave(u32),
    /// Every wave is complete.
    Done,
    /// Too many agents failed: abort, with the reason.
    Abort(String),
}

impl Fleet {
    /// What an agent should run: modules by name, and re-processing jobs by id.
    pub fn desired_for(&self, agent: &Agent) -> DesiredContent {
        DesiredContent { modules: self.modules_for(agent), reprocess: self.jobs_for(agent) }
    }

    /// The jobs an agent has yet to finish (see the module docs).
    fn jobs_for(&self, agent: &Agent) -> Vec<ReprocessJob> {
        let mut out = Vec::new();
        for j in self.jobs.iter().filter(|j| !j.cancelled) {
            let Some(member) = self.job_agents.get(&j.id).and_then(|m| m.get(&agent.id)) else { continue };
            let reported = self.reports.get(&agent.id).and_then(|r| r.jobs.iter().find(|r| r.id == j.id));
            if member.phase.is_final() || reported.is_some_and(|r| r.phase.is_final()) {
                continue;
            }
            let Some(m) = ModuleRef::parse_sha256(&j.spec.sha256).and_then(|sha| self.registry.get(&sha)) else {
                tracing::warn!(job = j.id, sha256 = %j.spec.sha256, "job of an unregistered module; skipped");
                continue;
            };
            if out.len() == brume_protocol::MAX_REPROCESS_JOBS {
                tracing::warn!(agent_id = %agent.id, "more jobs than a desired state carries; the rest wait");
                break;
            }
            out.push(ReprocessJob {
                id: j.id,
                module: m.module.clone(),
                size: m.size,
                signature: m.signature.clone(),
                config_json: serde_json::Value::Object(j.spec.config.clone()).to_string(),
                inputs: j.spec.inputs.clone(),
                from_ns: j.spec.from_ns,
                to_ns: j.spec.to_ns,
            });
        }
        out
    }

    /// The modules an agent should run, by name.
    fn modules_for(&self, agent: &Agent) -> Vec<DesiredModule> {
        let mut out: BTreeMap<&str, DesiredModule> = BTreeMap::new();
        for d in self.deployments.iter().rev() {
            if out.contains_key(d.spec.module.as_str()) || !self.includes(d, agent) {
                continue;
            }
            let Some(m) = ModuleRef::parse_sha256(&d.spec.sha256).and_then(|sha| self.registry.get(&sha)) else {
                // Deployments are created only for registered modules, which are never
                // deleted; a missing one means the database was edited by hand.
                tracing::warn!(deployment = d.id, sha256 = %d.spec.sha256, "deployment of an unregistered module; skipped");
                continue;
            };
            out.insert(
                &d.spec.module,
                DesiredModule {
                    module: m.module.clone(),
                    size: m.size,
                    signature: m.signature.clone(),
                    config_json: serde_json::Value::Object(d.spec.config.clone()).to_string(),
                    inputs: d.spec.inputs.clone(),
                    deployment: d.id,
                    probation: Probation {
                        duration_s: d.spec.probation_s,
                        max_failed_batches: d.spec.max_failed_batches,
                    },
                    // No check asked for is sent as version 1, which has no checks: the
                    // same as the defaults, so the stored state compares equal next pass.
                    checks: if d.spec.checks.is_none() { Default::default() } else { d.spec.checks },
                    shadow: d.spec.shadow,
                },
            );
        }
        // The protocol's cap: the newest deployments' modules win (names in order).
        if out.len() > brume_protocol::MAX_FLEET_MODULES {
            tracing::warn!(agent_id = %agent.id, modules = out.len(), "more modules than a desired state carries; the rest are left out");
        }
        out.into_values().take(brume_protocol::MAX_FLEET_MODULES).collect()
    }

    /// Does deployment `d` give its version to `agent` (see the module docs)?
    fn includes(&self, d: &Deployment, agent: &Agent) -> bool {
        let selected = d.spec.selects(&agent.id, &agent.labels);
        match d.state {
            DeploymentState::Done => selected,
            DeploymentState::Rolling | DeploymentState::Paused => {
                selected && self.members.get(&d.id).is_some_and(|m| m.contains_key(&agent.id))
            }
            DeploymentState::Aborted | DeploymentState::RolledBack => false,
        }
    }

    /// How far deployment `d` got on an agent: from its latest report if that is about
    /// `d`, else the last phase recorded for it, else `Pending`.
    pub fn phase(&self, d: u64, agent: &str) -> (Phase, &str) {
        self.reported(d, agent)
            .or_else(|| self.recorded.get(&(d, agent.to_owned())).map(|(p, e)| (*p, e.as_str())))
            .unwrap_or((Phase::Pending, ""))
    }

    /// What the agent's latest report says about deployment `d`, if anything.
    pub fn reported(&self, d: u64, agent: &str) -> Option<(Phase, &str)> {
        self.reports
            .get(agent)
            .and_then(|r| r.modules.iter().find(|m| m.deployment == d))
            .map(|m| (m.phase, m.error.as_str()))
    }

    /// The agents a deployment's selector matches, in rollout order.
    pub fn rollout_order(&self, d: &Deployment) -> Vec<&Agent> {
        let mut v: Vec<(bool, [u8; 32], &Agent)> = self
            .agents
            .values()
            .filter(|a| d.spec.selects(&a.id, &a.labels))
            .map(|a| {
                let h: [u8; 32] = Sha256::new().chain_update(d.id.to_be_bytes()).chain_update(&a.id).finalize().into();
                (!a.online, h, a)
            })
            .collect();
        v.sort_by_key(|x| (x.0, x.1));
        v.into_iter().map(|(_, _, a)| a).collect()
    }

    /// What rollout `d` should do next at `now_ms`.
    pub fn next_step(&self, d: &Deployment, now_ms: i64) -> Step {
        if d.state != DeploymentState::Rolling {
            return Step::Wait;
        }
        let order = self.rollout_order(d);
        let empty = HashMap::new();
        let members = self.members.get(&d.id).unwrap_or(&empty);
        let last = d.spec.waves.len().saturating_sub(1) as u32;
        let target = if d.wave >= last {
            order.len()
        } else {
            d.spec.waves.get(d.wave as usize).map_or(order.len(), |w| w.agents_of(order.len()))
        };
        let in_waves: Vec<&Agent> = order.iter().copied().filter(|a| members.contains_key(&a.id)).collect();
        if in_waves.len() < target {
            let add = order
                .iter()
                .filter(|a| !members.contains_key(&a.id))
                .take(target - in_waves.len())
                .map(|a| a.id.clone())
                .collect();
            return Step::AddAgents(add);
        }
        let failed: Vec<(&str, &str)> = in_waves
            .iter()
            .filter_map(|a| match self.phase(d.id, &a.id) {
                (Phase::Failed | Phase::RolledBack, why) => Some((a.id.as_str(), why)),
                _ => None,
            })
            .collect();
        if !failed.is_empty()
            && failed.len() as f64 / in_waves.len() as f64 >= d.spec.abort_threshold.max(f64::MIN_POSITIVE)
        {
            let (agent, why) = failed[0];
            return Step::Abort(format!(
                "{} of {} agents failed or rolled back (abort threshold {}); first: {agent}: {why}",
                failed.len(),
                in_waves.len(),
                d.spec.abort_threshold
            ));
        }
        let running = |a: &Agent| self.phase(d.id, &a.id).0 == Phase::Running;
        let settled = in_waves.iter().filter(|a| a.online).all(|a| running(a));
        let probation_over = now_ms >= d.wave_started_ms.saturating_add(i64::from(d.spec.probation_s) * 1000);
        let wave_complete = settled && probation_over && (in_waves.iter().any(|a| running(a)) || in_waves.is_empty());
        if !wave_complete {
            Step::Wait
        } else if d.wave >= last {
            Step::Done
        } else {
            Step::NextWave(d.wave + 1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::fleet::{DeploymentSpec, WaveSize};
    use brume_protocol::ModuleReport;

    fn registered(version: &str) -> RegisteredModule {
        let sha = brume_signing::module_digest(version.as_bytes());
        RegisteredModule {
            module: ModuleRef { name: "thr".into(), version: version.into(), sha256: sha },
            size: 10,
            manifest_json: "{}".into(),
            key_id: "k".into(),
            signature: format!("sig-{version}"),
            uploaded_ms: 0,
        }
    }

    fn deployment(id: u64, version: &str, state: DeploymentState, waves: &[&str]) -> Deployment {
        Deployment {
            id,
            spec: DeploymentSpec {
                module: "thr".into(),
                version: version.into(),
                sha256: registered(version).module.sha256_hex(),
                config: serde_json::Map::new(),
                inputs: None,
                selector: [("site".to_string(), "a".to_string())].into(),
                waves: waves.iter().map(|w| w.parse::<WaveSize>().unwrap()).collect(),
                probation_s: 10,
                max_failed_batches: 0,
                abort_threshold: 0.3,
                checks: Default::default(),
                shadow: false,
            },
            state,
            wave: 0,
            wave_started_ms: 0,
            reason: String::new(),
            revision: 1,
            created_ms: 0,
            updated_ms: 0,
        }
    }

    fn fleet(deployments: Vec<Deployment>, agents: &[(&str, &str, bool)]) -> Fleet {
        Fleet {
            registry: ["1", "2", "3"].iter().map(|v| (registered(v).module.sha256, registered(v))).collect(),
            deployments,
            agents: agents
                .iter()
                .map(|(id, site, online)| {
                    (
                        id.to_string(),
                        Agent { id: id.to_string(), labels: vec![("site".into(), site.to_string())], online: *online },
                    )
                })
                .collect(),
            ..Default::default()
        }
    }

    fn report(f: &mut Fleet, agent: &str, deployment: u64, phase: Phase) {
        f.reports.insert(
            agent.into(),
            Report {
                agent_id: agent.into(),
                sent_ms: 0,
                generation: 1,
                modules: vec![ModuleReport {
                    name: "thr".into(),
                    deployment,
                    wanted: registered("2").module,
                    phase,
                    running: None,
                    error: if phase == Phase::RolledBack { "trap".into() } else { String::new() },
                    batches_ok: 0,
                    batches_failed: 0,
                    shadow: None,
                }],
                jobs: Vec::new(),
            },
        );
    }

    fn versions(f: &Fleet, agent: &str) -> Vec<String> {
        f.desired_for(&f.agents[agent]).modules.iter().map(|m| m.module.version.clone()).collect()
    }

    #[test]
    fn the_newest_deployment_that_includes_an_agent_decides() {
        let mut f = fleet(
            vec![
                deployment(1, "1", DeploymentState::Done, &["100%"]),
                deployment(2, "2", DeploymentState::Rolling, &["1", "100%"]),
            ],
            &[("a1", "a", true), ("a2", "a", true), ("b1", "b", true)],
        );
        f.members.insert(2, [("a1".to_string(), 0)].into());
        assert_eq!(versions(&f, "a1"), ["2"], "in the rolling wave");
        assert_eq!(versions(&f, "a2"), ["1"], "not yet: keeps the done deployment's version");
        assert!(versions(&f, "b1").is_empty(), "selector does not match");
        let d = f.desired_for(&f.agents["a1"]).modules.remove(0);
        assert_eq!((d.deployment, d.signature.as_str(), d.size, d.probation.duration_s), (2, "sig-2", 10, 10));

        // Aborted: everyone falls back to the older deployment.
        f.deployments[1].state = DeploymentState::Aborted;
        assert_eq!(versions(&f, "a1"), ["1"]);
        // Done: every matching agent, including new ones.
        f.deployments[1].state = DeploymentState::Done;
        f.agents
            .insert("a3".into(), Agent { id: "a3".into(), labels: vec![("site".into(), "a".into())], online: false });
        assert_eq!(versions(&f, "a3"), ["2"]);
        f.deployments[1].state = DeploymentState::RolledBack;
        f.deployments[0].state = DeploymentState::RolledBack;
        assert!(versions(&f, "a3").is_empty(), "nothing live: the module is removed");
    }

    #[test]
    fn waves_add_online_agents_first_and_wait_for_them_to_run() {
        let mut f = fleet(
            vec![deployment(7, "2", DeploymentState::Rolling, &["1", "50%", "100%"])],
            &[("a1", "a", true), ("a2", "a", true), ("a3", "a", false), ("a4", "a", true), ("b", "b", true)],
        );
        let d = f.deployments[0].clone();
        let Step::AddAgents(first) = f.next_step(&d, 0) else { panic!("{:?}", f.next_step(&d, 0)) };
        assert_eq!(first.len(), 1);
        assert_ne!(first[0], "a3", "an offline agent is never the canary when an online one can be");
        f.members.insert(7, [(first[0].clone(), 0)].into());
        assert_eq!(f.next_step(&d, 0), Step::Wait, "not reported yet");
        report(&mut f, &first[0], 7, Phase::Canary);
        assert_eq!(f.next_step(&d, 60_000), Step::Wait, "still on probation on the device");
        report(&mut f, &first[0], 7, Phase::Running);
        assert_eq!(f.next_step(&d, 5_000), Step::Wait, "the wave's probation time has not passed");
        assert_eq!(f.next_step(&d, 10_000), Step::NextWave(1));

        let mut d = d;
        d.wave = 2;
        let Step::AddAgents(rest) = f.next_step(&d, 10_000) else { panic!() };
        assert_eq!(rest.len(), 3, "the last wave takes every matching agent: {rest:?}");
        let m = f.members.get_mut(&7).unwrap();
        for a in &rest {
            m.insert(a.clone(), 2);
        }
        for a in rest.iter().filter(|a| *a != "a3") {
            report(&mut f, a, 7, Phase::Running);
        }
        assert_eq!(f.next_step(&d, 10_000), Step::Done, "the offline agent does not hold the rollout up");
    }

    #[test]
    fn failures_over_the_threshold_abort() {
        let mut f = fleet(
            vec![deployment(3, "3", DeploymentState::Rolling, &["2", "100%"])],
            &[("a1", "a", true), ("a2", "a", true), ("a3", "a", true), ("a4", "a", true)],
        );
        let d = f.deployments[0].clone();
        let Step::AddAgents(first) = f.next_step(&d, 0) else { panic!() };
        f.members.insert(3, first.iter().map(|a| (a.clone(), 0)).collect());
        report(&mut f, &first[0], 3, Phase::Running);
        report(&mut f, &first[1], 3, Phase::RolledBack);
        let Step::Abort(why) = f.next_step(&d, 20_000) else { panic!("{:?}", f.next_step(&d, 20_000)) };
        assert!(why.contains("1 of 2") && why.contains("trap"), "{why}");
        let mut paused = d.clone();
        paused.state = DeploymentState::Paused;
        assert_eq!(f.next_step(&paused, 20_000), Step::Wait, "a paused rollout does nothing");
    }

    fn job(id: u64, cancelled: bool) -> Job {
        Job {
            id,
            spec: crate::store::fleet::JobSpec {
                module: "thr".into(),
                version: "2".into(),
                sha256: registered("2").module.sha256_hex(),
                config: serde_json::Map::new(),
                inputs: None,
                selector: Default::default(),
                from_ns: 10,
                to_ns: 20,
            },
            cancelled,
            created_ms: 0,
            updated_ms: 0,
        }
    }

    fn member(job: u64, agent: &str, phase: brume_protocol::JobPhase) -> JobAgent {
        JobAgent {
            job,
            agent_id: agent.into(),
            phase,
            readings_in: 0,
            readings_out: 0,
            batches_failed: 0,
            error: String::new(),
        }
    }

    /// A job is in the desired state of the agents it lists until each reports it done or
    /// failed (or it is recorded so), and nowhere once cancelled.
    #[test]
    fn jobs_stay_until_finished_and_leave_when_cancelled() {
        use brume_protocol::{JobPhase, JobReport};
        let mut f = fleet(vec![], &[("a1", "a", true), ("a2", "a", true), ("a3", "a", true)]);
        f.jobs = vec![job(1, false), job(2, true)];
        for (j, a, p) in [(1, "a1", JobPhase::Running), (1, "a2", JobPhase::Done), (2, "a1", JobPhase::Pending)] {
            f.job_agents.entry(j).or_default().insert(a.into(), member(j, a, p));
        }
        let jobs = |f: &Fleet, a: &str| f.desired_for(&f.agents[a]).reprocess.iter().map(|j| j.id).collect::<Vec<_>>();
        assert_eq!(jobs(&f, "a1"), [1], "running: listed; cancelled: not");
        assert_eq!(jobs(&f, "a2"), Vec::<u64>::new(), "recorded done");
        assert_eq!(jobs(&f, "a3"), Vec::<u64>::new(), "not one of the job's agents");
        let d = &f.desired_for(&f.agents["a1"]).reprocess[0];
        assert_eq!((d.module.version.as_str(), d.signature.as_str(), d.from_ns, d.to_ns), ("2", "sig-2", 10, 20));
        // Reported done before the hub recorded it: already out.
        f.reports.insert(
            "a1".into(),
            Report {
                agent_id: "a1".into(),
                sent_ms: 0,
                generation: 1,
                modules: vec![],
                jobs: vec![JobReport {
                    id: 1,
                    phase: JobPhase::Done,
                    readings_in: 5,
                    readings_out: 5,
                    batches_failed: 0,
                    error: String::new(),
                }],
            },
        );
        assert_eq!(jobs(&f, "a1"), Vec::<u64>::new());
    }

    /// What `desired_for` computes survives the store's encoding unchanged (version 1 or
    /// 2), or the reconciler would see a change, and bump the generation, on every pass.
    #[test]
    fn desired_states_round_trip_through_their_message() {
        use crate::store::fleet::{desired_content, desired_message};
        for (checks, shadow) in [
            (brume_protocol::Checks { max_output_change_pct: None, max_failed_pct: None, min_inputs: 100 }, false),
            (brume_protocol::Checks { max_output_change_pct: Some(5), max_failed_pct: None, min_inputs: 100 }, false),
            (Default::default(), true),
        ] {
            let mut d = deployment(1, "2", DeploymentState::Done, &["100%"]);
            (d.spec.checks, d.spec.shadow) = (checks, shadow);
            let mut f = fleet(vec![d], &[("a1", "a", true)]);
            f.jobs = vec![job(1, false)];
            f.job_agents.entry(1).or_default().insert("a1".into(), member(1, "a1", brume_protocol::JobPhase::Pending));
            for content in
                [f.desired_for(&f.agents["a1"]), DesiredContent { reprocess: vec![], ..f.desired_for(&f.agents["a1"]) }]
            {
                let message = desired_message("a1", 1, 0, &content);
                assert_eq!(desired_content(&message).unwrap(), content, "{checks:?} {shadow}");
            }
        }
    }
}
