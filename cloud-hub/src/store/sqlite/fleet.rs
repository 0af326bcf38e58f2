//! [`FleetStore`] on SQLite: the control plane's tables (schema v6, jobs v7).

use brume_protocol::{AgentReport, Phase, Report};
use rusqlite::{OptionalExtension, TransactionBehavior, params};

use super::{SqliteStore, lock, sql};
use crate::store::fleet::{
    Deployment, DeploymentAgent, DeploymentSpec, DesiredContent, FleetStore, Job, JobAgent, JobSpec, ModuleUpload,
    PutModule, RegisteredModule, StoredDesired, StoredReport, decode_report, deployment_agent, deployment_row,
    desired_content, desired_message, job_agent_row, job_row, job_spec_json, spec_json,
};
use crate::store::{StoreError, module_ref, storable_text};

/// The control plane (see `crate::store::fleet`). `module_registry.wasm` holds the module
/// bytes, so the one file is the whole hub.
pub(super) const SCHEMA_V6: &str = "
CREATE TABLE module_registry (
    sha256      BLOB PRIMARY KEY,
    name        TEXT NOT NULL,
    version     TEXT NOT NULL,
    size        INTEGER NOT NULL,
    manifest    TEXT NOT NULL,
    key_id      TEXT NOT NULL,
    signature   TEXT NOT NULL,
    uploaded_ms INTEGER NOT NULL,
    wasm        BLOB NOT NULL,
    UNIQUE (name, version)
);
CREATE TABLE deployments (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    spec            TEXT NOT NULL,
    state           TEXT NOT NULL,
    wave            INTEGER NOT NULL,
    wave_started_ms INTEGER NOT NULL,
    reason          TEXT NOT NULL,
    revision        INTEGER NOT NULL,
    created_ms      INTEGER NOT NULL,
    updated_ms      INTEGER NOT NULL
);
CREATE TABLE deployment_agents (
    deployment INTEGER NOT NULL,
    agent_id   TEXT NOT NULL,
    wave       INTEGER NOT NULL,
    added_ms   INTEGER NOT NULL,
    phase      TEXT NOT NULL DEFAULT 'pending',
    error      TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (deployment, agent_id)
) WITHOUT ROWID;
CREATE TABLE desired (
    agent_id   TEXT PRIMARY KEY,
    generation INTEGER NOT NULL,
    message    BLOB NOT NULL
) WITHOUT ROWID;
CREATE TABLE reports (
    agent_id    TEXT PRIMARY KEY,
    generation  INTEGER NOT NULL,
    sent_ms     INTEGER NOT NULL,
    received_ms INTEGER NOT NULL,
    report      BLOB NOT NULL
) WITHOUT ROWID;
";

/// Re-processing jobs and each agent's progress on them.
pub(super) const SCHEMA_V7: &str = "
CREATE TABLE reprocess_jobs (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    spec       TEXT NOT NULL,
    cancelled  INTEGER NOT NULL DEFAULT 0,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL
);
CREATE TABLE reprocess_agents (
    job            INTEGER NOT NULL,
    agent_id       TEXT NOT NULL,
    phase          TEXT NOT NULL DEFAULT 'pending',
    readings_in    INTEGER NOT NULL DEFAULT 0,
    readings_out   INTEGER NOT NULL DEFAULT 0,
    batches_failed INTEGER NOT NULL DEFAULT 0,
    error          TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (job, agent_id)
) WITHOUT ROWID;
";

const JOB_COLUMNS: &str = "id, spec, cancelled, created_ms, updated_ms";
const JOB_AGENT_COLUMNS: &str = "job, agent_id, phase, readings_in, readings_out, batches_failed, error";

fn job_from(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<Job, StoreError>> {
    let spec: String = r.get(1)?;
    Ok(job_row(r.get(0)?, &spec, r.get::<_, i64>(2)? != 0, r.get(3)?, r.get(4)?))
}

fn job_agent_from(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<JobAgent, StoreError>> {
    let phase: String = r.get(2)?;
    Ok(job_agent_row(r.get(0)?, r.get(1)?, &phase, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?))
}

const REGISTRY_COLUMNS: &str = "name, version, sha256, size, manifest, key_id, signature, uploaded_ms";
const DEPLOYMENT_COLUMNS: &str = "id, spec, state, wave, wave_started_ms, reason, revision, created_ms, updated_ms";

fn registry_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<RegisteredModule, StoreError>> {
    let sha: Vec<u8> = r.get(2)?;
    let module = module_ref(r.get(0)?, r.get(1)?, &sha);
    Ok(module.map(|module| RegisteredModule {
        module,
        size: r.get::<_, i64>(3).unwrap_or(0).max(0) as u64,
        manifest_json: r.get(4).unwrap_or_default(),
        key_id: r.get(5).unwrap_or_default(),
        signature: r.get(6).unwrap_or_default(),
        uploaded_ms: r.get(7).unwrap_or_default(),
    }))
}

fn deployment_from(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<Deployment, StoreError>> {
    let spec: String = r.get(1)?;
    let state: String = r.get(2)?;
    Ok(deployment_row(r.get(0)?, &spec, &state, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?, r.get(7)?, r.get(8)?))
}

impl FleetStore for SqliteStore {
    fn put_module(&self, m: &ModuleUpload<'_>) -> Result<PutModule, StoreError> {
        let mut guard = lock(&self.writer);
        let tx = guard
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql("starting module upload"))?;
        let existing: Option<Vec<u8>> = tx
            .query_row(
                "SELECT sha256 FROM module_registry WHERE name = ?1 AND version = ?2",
                params![m.module.name, m.module.version],
                |r| r.get(0),
            )
            .optional()
            .map_err(sql("looking up a module version"))?;
        if let Some(sha) = existing {
            return Ok(if sha == m.module.sha256 {
                PutModule::AlreadyStored
            } else {
                PutModule::Conflict { existing: sha.try_into().unwrap_or([0; 32]) }
            });
        }
        tx.execute(
            "INSERT INTO module_registry (name, version, sha256, size, manifest, key_id, signature, uploaded_ms, wasm)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                m.module.name,
                m.module.version,
                m.module.sha256.as_slice(),
                m.wasm.len() as i64,
                m.manifest_json,
                m.key_id,
                m.signature,
                m.uploaded_ms,
                m.wasm
            ],
        )
        .map_err(sql("storing a module"))?;
        tx.commit().map_err(sql("committing a module"))?;
        Ok(PutModule::Stored)
    }

    fn registered_modules(&self) -> Result<Vec<RegisteredModule>, StoreError> {
        self.with_reader(|conn| {
            let mut st = conn
                .prepare_cached(&format!(
                    "SELECT {REGISTRY_COLUMNS} FROM module_registry ORDER BY name, uploaded_ms, version"
                ))
                .map_err(sql("listing modules"))?;
            let rows = st
                .query_map([], registry_row)
                .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
                .map_err(sql("listing modules"))?;
            rows.into_iter().collect()
        })
    }

    fn registered_module(&self, name: &str, version: &str) -> Result<Option<RegisteredModule>, StoreError> {
        self.with_reader(|conn| {
            conn.prepare_cached(&format!(
                "SELECT {REGISTRY_COLUMNS} FROM module_registry WHERE name = ?1 AND version = ?2"
            ))
            .and_then(|mut st| st.query_row(params![name, version], registry_row).optional())
            .map_err(sql("looking up a module"))?
            .transpose()
        })
    }

    fn module_wasm(&self, sha256: &[u8; 32]) -> Result<Option<Vec<u8>>, StoreError> {
        self.with_reader(|conn| {
            conn.prepare_cached("SELECT wasm FROM module_registry WHERE sha256 = ?1")
                .and_then(|mut st| st.query_row([sha256.as_slice()], |r| r.get(0)).optional())
                .map_err(sql("reading a module"))
        })
    }

    fn create_deployment(&self, spec: &DeploymentSpec, now_ms: i64) -> Result<Deployment, StoreError> {
        let guard = lock(&self.writer);
        guard
            .conn
            .prepare_cached(&format!(
                "INSERT INTO deployments (spec, state, wave, wave_started_ms, reason, revision, created_ms, updated_ms)
                 VALUES (?1, 'rolling', 0, ?2, '', 1, ?2, ?2) RETURNING {DEPLOYMENT_COLUMNS}"
            ))
            .and_then(|mut st| st.query_row(params![spec_json(spec), now_ms], deployment_from))
            .map_err(sql("creating a deployment"))?
    }

    fn deployments(&self) -> Result<Vec<Deployment>, StoreError> {
        self.with_reader(|conn| {
            let mut st = conn
                .prepare_cached(&format!("SELECT {DEPLOYMENT_COLUMNS} FROM deployments ORDER BY id"))
                .map_err(sql("listing deployments"))?;
            let rows = st
                .query_map([], deployment_from)
                .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
                .map_err(sql("listing deployments"))?;
            rows.into_iter().collect()
        })
    }

    fn update_deployment(&self, d: &Deployment, now_ms: i64) -> Result<Option<Deployment>, StoreError> {
        let guard = lock(&self.writer);
        guard
            .conn
            .prepare_cached(&format!(
                "UPDATE deployments SET state = ?3, wave = ?4, wave_started_ms = ?5, reason = ?6,
                    revision = revision + 1, updated_ms = ?7
                 WHERE id = ?1 AND revision = ?2 RETURNING {DEPLOYMENT_COLUMNS}"
            ))
            .and_then(|mut st| {
                st.query_row(
                    params![
                        d.id as i64,
                        d.revision as i64,
                        d.state.as_str(),
                        d.wave,
                        d.wave_started_ms,
                        crate::store::storable_text(&d.reason),
                        now_ms
                    ],
                    deployment_from,
                )
                .optional()
            })
            .map_err(sql("updating a deployment"))?
            .transpose()
    }

    fn add_deployment_agents(
        &self,
        d: &Deployment,
        agents: &[String],
        now_ms: i64,
    ) -> Result<Option<Deployment>, StoreError> {
        let (deployment, wave) = (d.id, d.wave);
        let mut guard = lock(&self.writer);
        let tx = guard
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql("starting to add agents to a wave"))?;
        let updated = tx
            .prepare_cached(&format!(
                "UPDATE deployments SET revision = revision + 1, updated_ms = ?3
                 WHERE id = ?1 AND revision = ?2 AND state = 'rolling' AND wave = ?4 RETURNING {DEPLOYMENT_COLUMNS}"
            ))
            .and_then(|mut st| {
                st.query_row(params![d.id as i64, d.revision as i64, now_ms, d.wave], deployment_from).optional()
            })
            .map_err(sql("claiming a deployment"))?
            .transpose()?;
        let Some(updated) = updated else { return Ok(None) };
        {
            let mut st = tx
                .prepare_cached(
                    "INSERT INTO deployment_agents (deployment, agent_id, wave, added_ms) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT DO NOTHING",
                )
                .map_err(sql("adding agents to a wave"))?;
            for a in agents {
                st.execute(params![deployment as i64, a, wave, now_ms]).map_err(sql("adding agents to a wave"))?;
            }
        }
        tx.commit().map_err(sql("committing agents of a wave"))?;
        Ok(Some(updated))
    }

    fn deployment_agents(&self) -> Result<Vec<DeploymentAgent>, StoreError> {
        self.with_reader(|conn| {
            let rows: Vec<(i64, String, i64, String, String)> = conn
                .prepare_cached(
                    "SELECT deployment, agent_id, wave, phase, error FROM deployment_agents ORDER BY deployment, agent_id",
                )
                .and_then(|mut st| {
                    st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))?.collect()
                })
                .map_err(sql("listing deployment agents"))?;
            rows.into_iter().map(|(d, a, w, p, e)| deployment_agent(d, a, w, &p, e)).collect()
        })
    }

    fn record_phases(&self, phases: &[(u64, String, Phase, String)]) -> Result<(), StoreError> {
        let mut guard = lock(&self.writer);
        let tx = guard
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql("starting to record phases"))?;
        {
            let mut st = tx
                .prepare_cached(
                    "UPDATE deployment_agents SET phase = ?3, error = ?4 WHERE deployment = ?1 AND agent_id = ?2",
                )
                .map_err(sql("recording phases"))?;
            for (d, a, p, e) in phases {
                st.execute(params![*d as i64, a, p.as_str(), storable_text(e)]).map_err(sql("recording phases"))?;
            }
        }
        tx.commit().map_err(sql("committing phases"))
    }

    fn set_desired(
        &self,
        agent_id: &str,
        content: &DesiredContent,
        issued_ms: i64,
    ) -> Result<Option<StoredDesired>, StoreError> {
        let mut guard = lock(&self.writer);
        let tx = guard
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql("starting a desired state"))?;
        let current: Option<(i64, Vec<u8>)> = tx
            .query_row("SELECT generation, message FROM desired WHERE agent_id = ?1", [agent_id], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()
            .map_err(sql("reading a desired state"))?;
        let generation = match current {
            Some((_, msg)) if desired_content(&msg).is_ok_and(|c| c == *content) => return Ok(None),
            Some((g, _)) => g as u64 + 1,
            None => 1,
        };
        let message = desired_message(agent_id, generation, issued_ms, content);
        tx.execute(
            "INSERT INTO desired (agent_id, generation, message) VALUES (?1, ?2, ?3)
             ON CONFLICT (agent_id) DO UPDATE SET generation = excluded.generation, message = excluded.message",
            params![agent_id, generation as i64, message],
        )
        .map_err(sql("writing a desired state"))?;
        tx.commit().map_err(sql("committing a desired state"))?;
        Ok(Some(StoredDesired { agent_id: agent_id.to_owned(), generation, message }))
    }

    fn desired_states(&self) -> Result<Vec<StoredDesired>, StoreError> {
        self.with_reader(|conn| {
            conn.prepare_cached("SELECT agent_id, generation, message FROM desired ORDER BY agent_id")
                .and_then(|mut st| {
                    st.query_map([], |r| {
                        Ok(StoredDesired {
                            agent_id: r.get(0)?,
                            generation: r.get::<_, i64>(1)? as u64,
                            message: r.get(2)?,
                        })
                    })?
                    .collect()
                })
                .map_err(sql("listing desired states"))
        })
    }

    fn record_report(&self, report: &Report, received_ms: i64) -> Result<(), StoreError> {
        let blob = AgentReport::for_report(report.clone()).encode();
        let guard = lock(&self.writer);
        guard
            .conn
            .prepare_cached(
                "INSERT INTO reports (agent_id, generation, sent_ms, received_ms, report) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (agent_id) DO UPDATE SET generation = excluded.generation, sent_ms = excluded.sent_ms,
                     received_ms = excluded.received_ms, report = excluded.report
                 WHERE (excluded.generation, excluded.sent_ms) >= (reports.generation, reports.sent_ms)",
            )
            .and_then(|mut st| {
                st.execute(params![report.agent_id, report.generation as i64, report.sent_ms, received_ms, blob])
            })
            .map_err(sql("recording a report"))?;
        Ok(())
    }

    fn reports(&self) -> Result<Vec<StoredReport>, StoreError> {
        self.with_reader(|conn| {
            conn.prepare_cached("SELECT report, received_ms FROM reports ORDER BY agent_id")
                .and_then(|mut st| {
                    st.query_map([], |r| Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, i64>(1)?)))?
                        .collect::<Result<Vec<_>, _>>()
                })
                .map_err(sql("listing reports"))?
                .into_iter()
                .map(|(blob, at)| decode_report(&blob, at))
                .collect()
        })
    }

    fn create_job(&self, spec: &JobSpec, agents: &[String], now_ms: i64) -> Result<Job, StoreError> {
        let mut guard = lock(&self.writer);
        let tx = guard.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(sql("starting a job"))?;
        let job = tx
            .query_row(
                &format!(
                    "INSERT INTO reprocess_jobs (spec, created_ms, updated_ms) VALUES (?1, ?2, ?2) RETURNING {JOB_COLUMNS}"
                ),
                params![job_spec_json(spec), now_ms],
                job_from,
            )
            .map_err(sql("creating a job"))??;
        {
            let mut st = tx
                .prepare_cached("INSERT INTO reprocess_agents (job, agent_id) VALUES (?1, ?2)")
                .map_err(sql("adding job agents"))?;
            for a in agents {
                st.execute(params![job.id as i64, a]).map_err(sql("adding job agents"))?;
            }
        }
        tx.commit().map_err(sql("committing a job"))?;
        Ok(job)
    }

    fn jobs(&self) -> Result<Vec<Job>, StoreError> {
        self.with_reader(|conn| {
            let mut st = conn
                .prepare_cached(&format!("SELECT {JOB_COLUMNS} FROM reprocess_jobs ORDER BY id"))
                .map_err(sql("listing jobs"))?;
            let rows = st
                .query_map([], job_from)
                .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
                .map_err(sql("listing jobs"))?;
            rows.into_iter().collect()
        })
    }

    fn job_agents(&self) -> Result<Vec<JobAgent>, StoreError> {
        self.with_reader(|conn| {
            let mut st = conn
                .prepare_cached(&format!("SELECT {JOB_AGENT_COLUMNS} FROM reprocess_agents ORDER BY job, agent_id"))
                .map_err(sql("listing job agents"))?;
            let rows = st
                .query_map([], job_agent_from)
                .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
                .map_err(sql("listing job agents"))?;
            rows.into_iter().collect()
        })
    }

    fn record_job_progress(&self, progress: &[JobAgent]) -> Result<(), StoreError> {
        let mut guard = lock(&self.writer);
        let tx = guard
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql("starting to record job progress"))?;
        {
            let mut st = tx
                .prepare_cached(
                    "UPDATE reprocess_agents SET phase = ?3, readings_in = ?4, readings_out = ?5, batches_failed = ?6,
                         error = ?7 WHERE job = ?1 AND agent_id = ?2",
                )
                .map_err(sql("recording job progress"))?;
            for p in progress {
                st.execute(params![
                    p.job as i64,
                    p.agent_id,
                    p.phase.as_str(),
                    p.readings_in as i64,
                    p.readings_out as i64,
                    p.batches_failed as i64,
                    storable_text(&p.error)
                ])
                .map_err(sql("recording job progress"))?;
            }
        }
        tx.commit().map_err(sql("committing job progress"))
    }

    fn cancel_job(&self, id: u64, now_ms: i64) -> Result<Option<Job>, StoreError> {
        let guard = lock(&self.writer);
        let job = guard
            .conn
            .query_row(
                &format!(
                    "UPDATE reprocess_jobs SET cancelled = 1, updated_ms = ?2 WHERE id = ?1 RETURNING {JOB_COLUMNS}"
                ),
                params![id as i64, now_ms],
                job_from,
            )
            .optional()
            .map_err(sql("cancelling a job"))?;
        job.transpose()
    }
}
