//! [`FleetStore`] on PostgreSQL: the control plane's tables (migration 7, jobs 8), shared by
//! every hub. Concurrency between hubs: a desired state is read `FOR UPDATE` before it
//! is compared and replaced, so two hubs computing the same change assign one
//! generation; deployment updates compare and set `revision`.

use brume_protocol::{AgentReport, Phase, Report};

use super::{PostgresStore, pg};
use crate::store::fleet::{
    Deployment, DeploymentAgent, DeploymentSpec, DesiredContent, FleetStore, Job, JobAgent, JobSpec, ModuleUpload,
    PutModule, RegisteredModule, StoredDesired, StoredReport, decode_report, deployment_agent, deployment_row,
    desired_content, desired_message, job_agent_row, job_row, job_spec_json, spec_json,
};
use crate::store::{StoreError, module_ref, storable_text};

/// The control plane (see `crate::store::fleet`); the same tables as SQLite's v6.
pub(super) const SCHEMA_V7: &str = r#"
CREATE TABLE module_registry (
    sha256      bytea PRIMARY KEY,
    name        text COLLATE "C" NOT NULL,
    version     text COLLATE "C" NOT NULL,
    size        int8 NOT NULL,
    manifest    text NOT NULL,
    key_id      text NOT NULL,
    signature   text NOT NULL,
    uploaded_ms int8 NOT NULL,
    wasm        bytea NOT NULL,
    UNIQUE (name, version)
);
CREATE TABLE deployments (
    id              int8 GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    spec            text NOT NULL,
    state           text NOT NULL,
    wave            int8 NOT NULL,
    wave_started_ms int8 NOT NULL,
    reason          text NOT NULL,
    revision        int8 NOT NULL,
    created_ms      int8 NOT NULL,
    updated_ms      int8 NOT NULL
);
CREATE TABLE deployment_agents (
    deployment int8 NOT NULL,
    agent_id   text COLLATE "C" NOT NULL,
    wave       int8 NOT NULL,
    added_ms   int8 NOT NULL,
    phase      text NOT NULL DEFAULT 'pending',
    error      text NOT NULL DEFAULT '',
    PRIMARY KEY (deployment, agent_id)
);
CREATE TABLE desired (
    agent_id   text COLLATE "C" PRIMARY KEY,
    generation int8 NOT NULL,
    message    bytea NOT NULL
);
CREATE TABLE reports (
    agent_id    text COLLATE "C" PRIMARY KEY,
    generation  int8 NOT NULL,
    sent_ms     int8 NOT NULL,
    received_ms int8 NOT NULL,
    report      bytea NOT NULL
);
"#;

/// Re-processing jobs and each agent's progress on them; the same tables as SQLite's v7.
pub(super) const SCHEMA_V8: &str = r#"
CREATE TABLE reprocess_jobs (
    id         int8 GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    spec       text NOT NULL,
    cancelled  boolean NOT NULL DEFAULT false,
    created_ms int8 NOT NULL,
    updated_ms int8 NOT NULL
);
CREATE TABLE reprocess_agents (
    job            int8 NOT NULL,
    agent_id       text COLLATE "C" NOT NULL,
    phase          text NOT NULL DEFAULT 'pending',
    readings_in    int8 NOT NULL DEFAULT 0,
    readings_out   int8 NOT NULL DEFAULT 0,
    batches_failed int8 NOT NULL DEFAULT 0,
    error          text NOT NULL DEFAULT '',
    PRIMARY KEY (job, agent_id)
);
"#;

const JOB_COLUMNS: &str = "id, spec, cancelled, created_ms, updated_ms";

fn job_from(r: &tokio_postgres::Row) -> Result<Job, StoreError> {
    job_row(r.get(0), r.get(1), r.get(2), r.get(3), r.get(4))
}

const REGISTRY_COLUMNS: &str = "name, version, sha256, size, manifest, key_id, signature, uploaded_ms";
const DEPLOYMENT_COLUMNS: &str = "id, spec, state, wave, wave_started_ms, reason, revision, created_ms, updated_ms";

fn registry_row(r: &tokio_postgres::Row) -> Result<RegisteredModule, StoreError> {
    Ok(RegisteredModule {
        module: module_ref(r.get(0), r.get(1), r.get(2))?,
        size: r.get::<_, i64>(3).max(0) as u64,
        manifest_json: r.get(4),
        key_id: r.get(5),
        signature: r.get(6),
        uploaded_ms: r.get(7),
    })
}

fn deployment_from(r: &tokio_postgres::Row) -> Result<Deployment, StoreError> {
    deployment_row(r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5), r.get(6), r.get(7), r.get(8))
}

impl FleetStore for PostgresStore {
    fn put_module(&self, m: &ModuleUpload<'_>) -> Result<PutModule, StoreError> {
        self.call("storing a module", async {
            let mut conn = self.checkout().await?;
            // Insert-or-nothing first, then look: a concurrent upload of the same name
            // and version waits for the first and then sees its row.
            let inserted = conn
                .client()
                .execute(
                    "INSERT INTO module_registry (name, version, sha256, size, manifest, key_id, signature, uploaded_ms, wasm)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT DO NOTHING",
                    &[
                        &m.module.name,
                        &m.module.version,
                        &m.module.sha256.as_slice(),
                        &(m.wasm.len() as i64),
                        &m.manifest_json,
                        &m.key_id,
                        &m.signature,
                        &m.uploaded_ms,
                        &m.wasm,
                    ],
                )
                .await
                .map_err(pg("storing a module"))?;
            let out = if inserted == 1 {
                PutModule::Stored
            } else {
                let row = conn
                    .client()
                    .query_opt(
                        "SELECT sha256 FROM module_registry WHERE name = $1 AND version = $2",
                        &[&m.module.name, &m.module.version],
                    )
                    .await
                    .map_err(pg("looking up a module version"))?;
                match row.map(|r| r.get::<_, Vec<u8>>(0)) {
                    Some(sha) if sha == m.module.sha256 => PutModule::AlreadyStored,
                    Some(sha) => PutModule::Conflict { existing: sha.try_into().unwrap_or([0; 32]) },
                    // Same bytes under another name and version cannot happen (the name
                    // and version are inside the bytes): the sha256 key conflicted.
                    None => PutModule::AlreadyStored,
                }
            };
            conn.release();
            Ok(out)
        })
    }

    fn registered_modules(&self) -> Result<Vec<RegisteredModule>, StoreError> {
        self.call("listing modules", async {
            let mut conn = self.checkout().await?;
            let rows = conn
                .client()
                .query(
                    &format!("SELECT {REGISTRY_COLUMNS} FROM module_registry ORDER BY name, uploaded_ms, version"),
                    &[],
                )
                .await
                .map_err(pg("listing modules"))?;
            conn.release();
            rows.iter().map(registry_row).collect()
        })
    }

    fn registered_module(&self, name: &str, version: &str) -> Result<Option<RegisteredModule>, StoreError> {
        self.call("looking up a module", async {
            let mut conn = self.checkout().await?;
            let row = conn
                .client()
                .query_opt(
                    &format!("SELECT {REGISTRY_COLUMNS} FROM module_registry WHERE name = $1 AND version = $2"),
                    &[&name, &version],
                )
                .await
                .map_err(pg("looking up a module"))?;
            conn.release();
            row.as_ref().map(registry_row).transpose()
        })
    }

    fn module_wasm(&self, sha256: &[u8; 32]) -> Result<Option<Vec<u8>>, StoreError> {
        self.call("reading a module", async {
            let mut conn = self.checkout().await?;
            let row = conn
                .client()
                .query_opt("SELECT wasm FROM module_registry WHERE sha256 = $1", &[&sha256.as_slice()])
                .await
                .map_err(pg("reading a module"))?;
            conn.release();
            Ok(row.map(|r| r.get(0)))
        })
    }

    fn create_deployment(&self, spec: &DeploymentSpec, now_ms: i64) -> Result<Deployment, StoreError> {
        let spec = spec_json(spec);
        self.call("creating a deployment", async {
            let mut conn = self.checkout().await?;
            let row = conn
                .client()
                .query_one(
                    &format!(
                        "INSERT INTO deployments (spec, state, wave, wave_started_ms, reason, revision, created_ms, updated_ms)
                         VALUES ($1, 'rolling', 0, $2, '', 1, $2, $2) RETURNING {DEPLOYMENT_COLUMNS}"
                    ),
                    &[&spec, &now_ms],
                )
                .await
                .map_err(pg("creating a deployment"))?;
            conn.release();
            deployment_from(&row)
        })
    }

    fn deployments(&self) -> Result<Vec<Deployment>, StoreError> {
        self.call("listing deployments", async {
            let mut conn = self.checkout().await?;
            let rows = conn
                .client()
                .query(&format!("SELECT {DEPLOYMENT_COLUMNS} FROM deployments ORDER BY id"), &[])
                .await
                .map_err(pg("listing deployments"))?;
            conn.release();
            rows.iter().map(deployment_from).collect()
        })
    }

    fn update_deployment(&self, d: &Deployment, now_ms: i64) -> Result<Option<Deployment>, StoreError> {
        let reason = storable_text(&d.reason);
        self.call("updating a deployment", async {
            let mut conn = self.checkout().await?;
            let row = conn
                .client()
                .query_opt(
                    &format!(
                        "UPDATE deployments SET state = $3, wave = $4, wave_started_ms = $5, reason = $6,
                            revision = revision + 1, updated_ms = $7
                         WHERE id = $1 AND revision = $2 RETURNING {DEPLOYMENT_COLUMNS}"
                    ),
                    &[
                        &(d.id as i64),
                        &(d.revision as i64),
                        &d.state.as_str(),
                        &i64::from(d.wave),
                        &d.wave_started_ms,
                        &reason,
                        &now_ms,
                    ],
                )
                .await
                .map_err(pg("updating a deployment"))?;
            conn.release();
            row.as_ref().map(deployment_from).transpose()
        })
    }

    fn add_deployment_agents(
        &self,
        d: &Deployment,
        agents: &[String],
        now_ms: i64,
    ) -> Result<Option<Deployment>, StoreError> {
        let mut sorted: Vec<&str> = agents.iter().map(String::as_str).collect();
        // Key order, like every multi-row write here, so concurrent hubs cannot deadlock.
        sorted.sort_unstable();
        self.call("adding agents to a wave", async {
            let mut conn = self.checkout().await?;
            let tx = conn.client().transaction().await.map_err(pg("starting to add agents to a wave"))?;
            let row = tx
                .query_opt(
                    &format!(
                        "UPDATE deployments SET revision = revision + 1, updated_ms = $3
                         WHERE id = $1 AND revision = $2 AND state = 'rolling' AND wave = $4 RETURNING {DEPLOYMENT_COLUMNS}"
                    ),
                    &[&(d.id as i64), &(d.revision as i64), &now_ms, &i64::from(d.wave)],
                )
                .await
                .map_err(pg("claiming a deployment"))?;
            let Some(row) = row else {
                tx.rollback().await.map_err(pg("ending a claim"))?;
                conn.release();
                return Ok(None);
            };
            let updated = deployment_from(&row)?;
            tx.execute(
                "INSERT INTO deployment_agents (deployment, agent_id, wave, added_ms)
                 SELECT $1, a, $2, $3 FROM unnest($4::text[]) AS a ORDER BY a
                 ON CONFLICT DO NOTHING",
                &[&(d.id as i64), &i64::from(d.wave), &now_ms, &sorted],
            )
            .await
            .map_err(pg("adding agents to a wave"))?;
            tx.commit().await.map_err(pg("committing agents of a wave"))?;
            conn.release();
            Ok(Some(updated))
        })
    }

    fn deployment_agents(&self) -> Result<Vec<DeploymentAgent>, StoreError> {
        self.call("listing deployment agents", async {
            let mut conn = self.checkout().await?;
            let rows = conn
                .client()
                .query(
                    "SELECT deployment, agent_id, wave, phase, error FROM deployment_agents ORDER BY deployment, agent_id",
                    &[],
                )
                .await
                .map_err(pg("listing deployment agents"))?;
            conn.release();
            rows.iter().map(|r| deployment_agent(r.get(0), r.get(1), r.get(2), r.get(3), r.get(4))).collect()
        })
    }

    fn record_phases(&self, phases: &[(u64, String, Phase, String)]) -> Result<(), StoreError> {
        // Key order, so concurrent hubs lock rows in the same order.
        let mut sorted: Vec<&(u64, String, Phase, String)> = phases.iter().collect();
        sorted.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        self.call("recording phases", async {
            let mut conn = self.checkout().await?;
            let tx = conn.client().transaction().await.map_err(pg("starting to record phases"))?;
            for (d, a, p, e) in sorted {
                tx.execute(
                    "UPDATE deployment_agents SET phase = $3, error = $4 WHERE deployment = $1 AND agent_id = $2",
                    &[&(*d as i64), a, &p.as_str(), &storable_text(e)],
                )
                .await
                .map_err(pg("recording phases"))?;
            }
            tx.commit().await.map_err(pg("committing phases"))?;
            conn.release();
            Ok(())
        })
    }

    fn set_desired(
        &self,
        agent_id: &str,
        content: &DesiredContent,
        issued_ms: i64,
    ) -> Result<Option<StoredDesired>, StoreError> {
        self.call("writing a desired state", async {
            let mut conn = self.checkout().await?;
            let tx = conn.client().transaction().await.map_err(pg("starting a desired state"))?;
            // The row exists before it is locked, so two hubs creating it serialise on it.
            tx.execute(
                "INSERT INTO desired (agent_id, generation, message) VALUES ($1, 0, '') ON CONFLICT DO NOTHING",
                &[&agent_id],
            )
            .await
            .map_err(pg("creating a desired state"))?;
            let row = tx
                .query_one("SELECT generation, message FROM desired WHERE agent_id = $1 FOR UPDATE", &[&agent_id])
                .await
                .map_err(pg("reading a desired state"))?;
            let (current, msg): (i64, Vec<u8>) = (row.get(0), row.get(1));
            // A stored message that does not decode is replaced, never an error that
            // would stop every later pass.
            if current > 0 && desired_content(&msg).is_ok_and(|c| c == *content) {
                tx.rollback().await.map_err(pg("ending a desired state"))?;
                conn.release();
                return Ok(None);
            }
            let generation = current as u64 + 1;
            let message = desired_message(agent_id, generation, issued_ms, content);
            tx.execute(
                "UPDATE desired SET generation = $2, message = $3 WHERE agent_id = $1",
                &[&agent_id, &(generation as i64), &message],
            )
            .await
            .map_err(pg("writing a desired state"))?;
            tx.commit().await.map_err(pg("committing a desired state"))?;
            conn.release();
            Ok(Some(StoredDesired { agent_id: agent_id.to_owned(), generation, message }))
        })
    }

    fn desired_states(&self) -> Result<Vec<StoredDesired>, StoreError> {
        self.call("listing desired states", async {
            let mut conn = self.checkout().await?;
            let rows = conn
                .client()
                .query("SELECT agent_id, generation, message FROM desired WHERE generation > 0 ORDER BY agent_id", &[])
                .await
                .map_err(pg("listing desired states"))?;
            conn.release();
            Ok(rows
                .iter()
                .map(|r| StoredDesired { agent_id: r.get(0), generation: r.get::<_, i64>(1) as u64, message: r.get(2) })
                .collect())
        })
    }

    fn record_report(&self, report: &Report, received_ms: i64) -> Result<(), StoreError> {
        let blob = AgentReport::for_report(report.clone()).encode();
        self.call("recording a report", async {
            let mut conn = self.checkout().await?;
            conn.client()
                .execute(
                    "INSERT INTO reports (agent_id, generation, sent_ms, received_ms, report) VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (agent_id) DO UPDATE SET generation = excluded.generation, sent_ms = excluded.sent_ms,
                         received_ms = excluded.received_ms, report = excluded.report
                     WHERE (excluded.generation, excluded.sent_ms) >= (reports.generation, reports.sent_ms)",
                    &[&report.agent_id, &(report.generation as i64), &report.sent_ms, &received_ms, &blob],
                )
                .await
                .map_err(pg("recording a report"))?;
            conn.release();
            Ok(())
        })
    }

    fn reports(&self) -> Result<Vec<StoredReport>, StoreError> {
        self.call("listing reports", async {
            let mut conn = self.checkout().await?;
            let rows = conn
                .client()
                .query("SELECT report, received_ms FROM reports ORDER BY agent_id", &[])
                .await
                .map_err(pg("listing reports"))?;
            conn.release();
            rows.iter().map(|r| decode_report(r.get(0), r.get(1))).collect()
        })
    }

    fn create_job(&self, spec: &JobSpec, agents: &[String], now_ms: i64) -> Result<Job, StoreError> {
        let spec = job_spec_json(spec);
        self.call("creating a job", async {
            let mut conn = self.checkout().await?;
            let tx = conn.client().transaction().await.map_err(pg("starting a job"))?;
            let row = tx
                .query_one(
                    &format!(
                        "INSERT INTO reprocess_jobs (spec, created_ms, updated_ms) VALUES ($1, $2, $2) RETURNING {JOB_COLUMNS}"
                    ),
                    &[&spec, &now_ms],
                )
                .await
                .map_err(pg("creating a job"))?;
            let job = job_from(&row)?;
            tx.execute(
                "INSERT INTO reprocess_agents (job, agent_id) SELECT $1, unnest($2::text[])",
                &[&(job.id as i64), &agents],
            )
            .await
            .map_err(pg("adding job agents"))?;
            tx.commit().await.map_err(pg("committing a job"))?;
            conn.release();
            Ok(job)
        })
    }

    fn jobs(&self) -> Result<Vec<Job>, StoreError> {
        self.call("listing jobs", async {
            let mut conn = self.checkout().await?;
            let rows = conn
                .client()
                .query(&format!("SELECT {JOB_COLUMNS} FROM reprocess_jobs ORDER BY id"), &[])
                .await
                .map_err(pg("listing jobs"))?;
            conn.release();
            rows.iter().map(job_from).collect()
        })
    }

    fn job_agents(&self) -> Result<Vec<JobAgent>, StoreError> {
        self.call("listing job agents", async {
            let mut conn = self.checkout().await?;
            let rows = conn
                .client()
                .query(
                    "SELECT job, agent_id, phase, readings_in, readings_out, batches_failed, error
                     FROM reprocess_agents ORDER BY job, agent_id",
                    &[],
                )
                .await
                .map_err(pg("listing job agents"))?;
            conn.release();
            rows.iter()
                .map(|r| {
                    let phase: String = r.get(2);
                    job_agent_row(r.get(0), r.get(1), &phase, r.get(3), r.get(4), r.get(5), r.get(6))
                })
                .collect()
        })
    }

    fn record_job_progress(&self, progress: &[JobAgent]) -> Result<(), StoreError> {
        // Key order, so concurrent hubs lock rows in the same order.
        let mut sorted: Vec<&JobAgent> = progress.iter().collect();
        sorted.sort_by(|a, b| (a.job, &a.agent_id).cmp(&(b.job, &b.agent_id)));
        self.call("recording job progress", async {
            let mut conn = self.checkout().await?;
            let tx = conn.client().transaction().await.map_err(pg("starting to record job progress"))?;
            for p in sorted {
                tx.execute(
                    "UPDATE reprocess_agents SET phase = $3, readings_in = $4, readings_out = $5, batches_failed = $6,
                         error = $7 WHERE job = $1 AND agent_id = $2",
                    &[
                        &(p.job as i64),
                        &p.agent_id,
                        &p.phase.as_str(),
                        &(p.readings_in as i64),
                        &(p.readings_out as i64),
                        &(p.batches_failed as i64),
                        &storable_text(&p.error),
                    ],
                )
                .await
                .map_err(pg("recording job progress"))?;
            }
            tx.commit().await.map_err(pg("committing job progress"))?;
            conn.release();
            Ok(())
        })
    }

    fn cancel_job(&self, id: u64, now_ms: i64) -> Result<Option<Job>, StoreError> {
        self.call("cancelling a job", async {
            let mut conn = self.checkout().await?;
            let row = conn
                .client()
                .query_opt(
                    &format!(
                        "UPDATE reprocess_jobs SET cancelled = true, updated_ms = $2 WHERE id = $1 RETURNING {JOB_COLUMNS}"
                    ),
                    &[&(id as i64), &now_ms],
                )
                .await
                .map_err(pg("cancelling a job"))?;
            conn.release();
            row.as_ref().map(job_from).transpose()
        })
    }
}
