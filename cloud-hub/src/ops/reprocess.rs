//! `cloud-hub reprocess ...`: run a registered module build over readings agents kept
//! from a past time range (`/api/v1/reprocess`), follow and cancel such jobs.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde_json::{Value, json};

use super::{Client, EXIT_ROLLOUT_FAILED, HubArgs, module_config, print_json, selector_of, table, text, time_of};

/// `cloud-hub reprocess ...`
#[derive(Debug, Subcommand)]
pub enum ReprocessCmd {
    /// Start a job: run `name@version` over a past time range on the selected agents.
    Run(RunArgs),
    /// List jobs, newest first.
    Ls {
        /// The hub to talk to.
        #[command(flatten)]
        hub: HubArgs,
    },
    /// One job with every agent's progress.
    Show {
        /// Job id.
        id: u64,
        /// The hub to talk to.
        #[command(flatten)]
        hub: HubArgs,
    },
    /// Follow a job until every agent finished (exit 0 if all did it, 3 if any failed or
    /// the job was cancelled).
    Watch {
        /// Job id.
        id: u64,
        /// The hub to talk to.
        #[command(flatten)]
        hub: HubArgs,
    },
    /// Stop a job: agents stop where they are; what they committed is kept.
    Cancel {
        /// Job id.
        id: u64,
        /// The hub to talk to.
        #[command(flatten)]
        hub: HubArgs,
    },
}

/// `cloud-hub reprocess run ...`
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The registered module: `name@version`.
    module: String,
    /// Start of the range: RFC 3339 (`2026-12-04T10:00:00Z`).
    #[arg(long, requires = "to", conflicts_with = "last")]
    from: Option<String>,
    /// End of the range (exclusive): RFC 3339.
    #[arg(long, requires = "from")]
    to: Option<String>,
    /// The range is the last this long up to now (e.g. `1h`, `30m`).
    #[arg(long, required_unless_present = "from")]
    last: Option<humantime::Duration>,
    /// Only agents with this label (`key=value`; repeat for more; `agent_id=<id>` for
    /// one agent). None: every known agent.
    #[arg(long = "select", value_name = "KEY=VALUE")]
    select: Vec<String>,
    /// The module's configuration, a JSON object.
    #[arg(long, value_name = "JSON", conflicts_with = "config_file")]
    config: Option<String>,
    /// The module's configuration from a JSON file.
    #[arg(long, value_name = "FILE")]
    config_file: Option<std::path::PathBuf>,
    /// Input stream patterns replacing the manifest's (comma separated).
    #[arg(long, value_delimiter = ',')]
    inputs: Option<Vec<String>>,
    /// Follow the job until every agent finished (as `reprocess watch`).
    #[arg(long)]
    watch: bool,
    #[command(flatten)]
    hub: HubArgs,
}

fn ns_of(t: SystemTime) -> anyhow::Result<i64> {
    let d = t.duration_since(UNIX_EPOCH).context("a time before 1970")?;
    i64::try_from(d.as_nanos()).context("a time past 2262")
}

fn parse_time(what: &str, s: &str) -> anyhow::Result<i64> {
    let t = humantime::parse_rfc3339_weak(s)
        .with_context(|| format!("--{what} {s:?}: expected RFC 3339, e.g. 2026-12-04T10:00:00Z"))?;
    ns_of(t)
}

/// `1733300000000000000` ns as RFC 3339 (seconds).
fn time_of_ns(ns: &Value) -> String {
    time_of(&json!(ns.as_i64().map(|n| n / 1_000_000)))
}

fn summary(j: &Value) -> String {
    let counts = match j["agents"].as_object() {
        Some(m) if !m.is_empty() => m.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", "),
        _ => "no agents".into(),
    };
    format!(
        "job {}: {} {} over {} .. {}, {}: {} (readings in {}, out {})",
        j["id"],
        text(&j["module"]),
        text(&j["version"]),
        time_of_ns(&j["from"]),
        time_of_ns(&j["to"]),
        text(&j["state"]),
        counts,
        j["readings_in"],
        j["readings_out"],
    )
}

fn show(j: &Value) {
    println!("{}", summary(j));
    println!("  results: GET /api/v1/readings?stream=<output>&build={}  (beside the originals)", text(&j["sha256"]));
    let rows: Vec<Vec<String>> = j["agent_progress"]
        .as_array()
        .map(|a| a.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|a| {
            vec![
                text(&a["agent_id"]),
                text(&a["phase"]),
                if a["online"] == true { "yes".into() } else { "no".into() },
                text(&a["readings_in"]),
                text(&a["readings_out"]),
                text(&a["batches_failed"]),
                text(&a["error"]),
            ]
        })
        .collect();
    if !rows.is_empty() {
        table(&["AGENT", "PHASE", "ONLINE", "IN", "OUT", "FAILED", "ERROR"], &rows);
    }
}

async fn watch(client: &Client, id: u64, json: bool) -> anyhow::Result<ExitCode> {
    let mut last = String::new();
    loop {
        let j = client.get(&format!("/api/v1/reprocess/{id}")).await?;
        let line = if json { j.to_string() } else { summary(&j) };
        if line != last {
            println!("{line}");
            last = line;
        }
        match j["state"].as_str() {
            Some("done") => return Ok(ExitCode::SUCCESS),
            Some("failed" | "cancelled") => return Ok(ExitCode::from(EXIT_ROLLOUT_FAILED)),
            _ => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    }
}

/// `cloud-hub reprocess ...`
pub async fn reprocess(cmd: ReprocessCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        ReprocessCmd::Run(a) => run(a).await,
        ReprocessCmd::Ls { hub } => {
            let v = Client::new(&hub)?.get("/api/v1/reprocess").await?;
            if hub.json {
                print_json(&v);
            } else {
                let rows: Vec<Vec<String>> = v
                    .as_array()
                    .map(|a| a.as_slice())
                    .unwrap_or_default()
                    .iter()
                    .map(|j| {
                        vec![
                            j["id"].to_string(),
                            format!("{}@{}", text(&j["module"]), text(&j["version"])),
                            text(&j["state"]),
                            format!("{} .. {}", time_of_ns(&j["from"]), time_of_ns(&j["to"])),
                            j["readings_out"].to_string(),
                            time_of(&j["created_ms"]),
                        ]
                    })
                    .collect();
                table(&["ID", "MODULE", "STATE", "RANGE", "OUT", "CREATED"], &rows);
            }
            Ok(ExitCode::SUCCESS)
        }
        ReprocessCmd::Show { id, hub } => {
            let j = Client::new(&hub)?.get(&format!("/api/v1/reprocess/{id}")).await?;
            if hub.json {
                print_json(&j)
            } else {
                show(&j)
            }
            Ok(ExitCode::SUCCESS)
        }
        ReprocessCmd::Watch { id, hub } => watch(&Client::new(&hub)?, id, hub.json).await,
        ReprocessCmd::Cancel { id, hub } => {
            let j = Client::new(&hub)?.post(&format!("/api/v1/reprocess/{id}/cancel"), &json!({})).await?;
            if hub.json {
                print_json(&j)
            } else {
                println!("{}", summary(&j))
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn run(a: RunArgs) -> anyhow::Result<ExitCode> {
    let (name, version) =
        a.module.split_once('@').context("give the module as name@version (see `cloud-hub module ls`)")?;
    let (from, to) = match (&a.from, &a.to, a.last) {
        (Some(f), Some(t), _) => (parse_time("from", f)?, parse_time("to", t)?),
        (_, _, Some(last)) => {
            let to = ns_of(SystemTime::now())?;
            (to - i64::try_from(Duration::from(last).as_nanos()).context("--last is too long")?, to)
        }
        _ => bail!("give --from and --to, or --last"),
    };
    let selector: BTreeMap<String, String> = selector_of(&a.select)?;
    let mut body = json!({
        "module": name,
        "version": version,
        "from": from,
        "to": to,
        "config": module_config(a.config.as_deref(), a.config_file.as_deref())?,
        "selector": selector,
    });
    if let Some(i) = &a.inputs {
        body["inputs"] = json!(i);
    }
    let client = Client::new(&a.hub)?;
    let j = client.post("/api/v1/reprocess", &body).await?;
    let id = j["id"].as_u64().context("the hub's answer has no job id")?;
    if a.hub.json {
        print_json(&j);
    } else {
        println!("{}", summary(&j));
    }
    if a.watch { watch(&client, id, a.hub.json).await } else { Ok(ExitCode::SUCCESS) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_as_rfc3339() {
        assert_eq!(parse_time("from", "2024-01-01T00:00:00Z").unwrap(), 1_704_067_200_000_000_000);
        let err = parse_time("from", "yesterday").unwrap_err().to_string();
        assert!(err.contains("--from") && err.contains("RFC 3339"), "{err}");
        assert_eq!(time_of_ns(&json!(1_704_067_200_000_000_000i64)), "2024-01-01T00:00:00Z");
    }
}
