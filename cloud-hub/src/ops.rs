//! The operator commands of the `cloud-hub` binary: publisher keys and signatures, the
//! module registry, deployments and rollouts, the fleet. Everything but key handling
//! talks to a hub's HTTP API (`--hub`, or `BRUME_HUB`), so it works against any hub
//! instance, local or remote.
//!
//! Output is for people by default (aligned tables, one line per change while watching)
//! and JSON with `--json` (the API's own documents, one per line when watching).
//! Exit codes: 0 success; 1 any error (message on stderr); 2 bad command line (clap);
//! 3 `rollout watch` ended with the rollout aborted or rolled back (`reprocess watch`:
//! with a job failed or cancelled).

mod reprocess;
pub use reprocess::ReprocessCmd;
pub use reprocess::reprocess;

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::{Context, bail};
use brume_signing::SecretKey;
use clap::{Args, Subcommand};
use serde_json::{Value, json};

/// Exit code of `rollout watch` when the rollout ended aborted or rolled back.
pub const EXIT_ROLLOUT_FAILED: u8 = 3;

/// Where the hub is.
#[derive(Debug, Clone, Args)]
pub struct HubArgs {
    /// Base URL of a hub's HTTP API.
    #[arg(long, env = "BRUME_HUB", default_value = "http://127.0.0.1:8080")]
    hub: String,
    /// API token (from `cloud-hub token`), for hubs with `[[http.tokens]]`. Prefer the
    /// environment variable: arguments show in `ps`.
    #[arg(long, env = "BRUME_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Print JSON (the API's documents) instead of tables.
    #[arg(long)]
    json: bool,
}

/// `cloud-hub module ...`
#[derive(Debug, Subcommand)]
pub enum ModuleCmd {
    /// Create a publisher key pair: writes the secret key (mode 0600, never overwritten)
    /// and prints the public key to put in `fleet.trusted_keys` of hubs and agents.
    Keygen {
        /// Where to write the secret key.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Print the public key of a secret key file.
    Pubkey {
        /// The secret key.
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
    },
    /// Sign a module: writes `<module>.sig` next to it and prints the signature.
    Sign {
        /// The publisher's secret key.
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// The `.wasm` file.
        module: PathBuf,
    },
    /// Upload a signed module to the registry. The signature comes from `--key` (signs
    /// now), `--signature`, or `<module>.sig`.
    Push {
        /// The `.wasm` file.
        module: PathBuf,
        /// Sign with this secret key.
        #[arg(long, value_name = "FILE", conflicts_with = "signature")]
        key: Option<PathBuf>,
        /// The signature text (`brume-sig-v1:…`).
        #[arg(long)]
        signature: Option<String>,
        /// The hub to talk to.
        #[command(flatten)]
        hub: HubArgs,
    },
    /// Compile a module ahead of time for devices of an architecture, for runtime-only
    /// agents running it from their own config: writes `<stem>.<target>.cwasm` beside the
    /// `.wasm` (where the agent looks for it) unless `--out` says otherwise. Modules
    /// deployed through a hub need no such step: the hub serves precompiled builds.
    Precompile {
        /// The device architecture: `aarch64`, `armv7` or `x86_64` (repeat for more).
        #[arg(long = "target", value_name = "ARCH", required = true)]
        targets: Vec<brume_wasm_host::Target>,
        /// The `.wasm` file.
        module: PathBuf,
        /// Where to write the compiled code (only with one `--target`).
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// List the registry.
    Ls {
        /// Only this module name.
        #[arg(long)]
        name: Option<String>,
        /// The hub to talk to.
        #[command(flatten)]
        hub: HubArgs,
    },
}

/// `cloud-hub deploy ...`
#[derive(Debug, Args)]
pub struct DeployArgs {
    /// The registered module: `name@version`.
    module: String,
    /// Only agents with this label (`key=value`; repeat for more; `agent_id=<id>` for
    /// one agent). None: every agent.
    #[arg(long = "select", value_name = "KEY=VALUE")]
    select: Vec<String>,
    /// Cumulative wave sizes: agents or percentages, e.g. `1,10%,100%`.
    #[arg(long, default_value = "100%", value_delimiter = ',')]
    waves: Vec<String>,
    /// How long each wave's agents judge the version before the next wave starts.
    #[arg(long, default_value = "30s")]
    probation: humantime::Duration,
    /// Failed batches an agent tolerates during probation before it rolls back.
    #[arg(long, default_value_t = 0)]
    max_failed_batches: u32,
    /// Fraction of a wave's agents failed or rolled back at which the rollout aborts.
    #[arg(long, default_value_t = 0.1)]
    abort_threshold: f64,
    /// Roll back on an agent when, during probation, the build's outputs per input differ
    /// from those of the build it replaced there by more than this percentage.
    #[arg(long, value_name = "PERCENT")]
    max_output_change: Option<u32>,
    /// Roll back on an agent when more than this percentage of the build's batches fail
    /// during probation (with --max-failed-batches high enough to let it be judged).
    #[arg(long, value_name = "PERCENT")]
    max_failed_pct: Option<u32>,
    /// Input readings a build must have processed before those two are judged.
    #[arg(long, default_value_t = 100)]
    min_inputs: u32,
    /// Run the new build in the shadow of the running one during probation (same input,
    /// outputs counted and dropped), compare, and swap only if it passes.
    #[arg(long)]
    shadow: bool,
    /// The module's configuration, a JSON object (e.g. `'{"limit": 80}'`).
    #[arg(long, value_name = "JSON", conflicts_with = "config_file")]
    config: Option<String>,
    /// The module's configuration from a JSON file.
    #[arg(long, value_name = "FILE")]
    config_file: Option<PathBuf>,
    /// Input stream patterns replacing the manifest's (comma separated).
    #[arg(long, value_delimiter = ',')]
    inputs: Option<Vec<String>>,
    /// Follow the rollout until it ends (as `rollout watch`).
    #[arg(long)]
    watch: bool,
    #[command(flatten)]
    hub: HubArgs,
}

/// `cloud-hub rollout ...`
#[derive(Debug, Subcommand)]
pub enum RolloutCmd {
    /// List deployments, newest first.
    Ls {
        /// The hub to talk to.
        #[command(flatten)]
        hub: HubArgs,
    },
    /// One deployment with every agent's progress.
    Show {
        /// Deployment id.
        id: u64,
        /// The hub to talk to.
        #[command(flatten)]
        hub: HubArgs,
    },
    /// Follow a deployment until it is done (exit 0), aborted or rolled back (exit 3).
    Watch {
        /// Deployment id.
        id: u64,
        /// The hub to talk to.
        #[command(flatten)]
        hub: HubArgs,
    },
    /// Stop starting new waves.
    Pause(ActionArgs),
    /// Continue a paused rollout.
    Resume(ActionArgs),
    /// Stop the rollout and withdraw it: its agents go back to the previous deployment.
    Abort(ActionArgs),
    /// Withdraw a deployment, also after it is done.
    Rollback(ActionArgs),
}

/// A rollout action.
#[derive(Debug, Args)]
pub struct ActionArgs {
    /// Deployment id.
    id: u64,
    /// Why (recorded and shown).
    #[arg(long)]
    reason: Option<String>,
    #[command(flatten)]
    hub: HubArgs,
}

/// `cloud-hub agents ...`
#[derive(Debug, Subcommand)]
pub enum AgentsCmd {
    /// Known agents: online, labels, desired-state convergence, module phases.
    Ls {
        /// The hub to talk to.
        #[command(flatten)]
        hub: HubArgs,
    },
}

/// Runs an operator command on a small runtime of its own.
pub fn run(f: impl std::future::Future<Output = anyhow::Result<ExitCode>>) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cloud-hub: cannot start a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(f) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("cloud-hub: {e:#}");
            ExitCode::FAILURE
        }
    }
}

struct Client {
    base: String,
    http: reqwest::Client,
}

impl Client {
    fn new(hub: &HubArgs) -> anyhow::Result<Client> {
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(t) = &hub.token {
            let mut v = reqwest::header::HeaderValue::try_from(format!("Bearer {t}"))
                .context("BRUME_TOKEN / --token is not a valid token (printable ASCII)")?;
            v.set_sensitive(true);
            headers.insert(reqwest::header::AUTHORIZATION, v);
        }
        let http = reqwest::Client::builder().default_headers(headers).build().context("building the HTTP client")?;
        Ok(Client { base: hub.hub.trim_end_matches('/').to_owned(), http })
    }

    /// Sends a request; a non-2xx answer becomes an error with the API's message.
    async fn send(&self, req: reqwest::RequestBuilder) -> anyhow::Result<(u16, Value)> {
        let resp = req.send().await.with_context(|| format!("cannot reach the hub at {}", self.base))?;
        let status = resp.status().as_u16();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        if !(200..300).contains(&status) {
            let msg = body["error"].as_str().map(str::to_owned).unwrap_or_else(|| body.to_string());
            bail!("the hub refused (HTTP {status}): {msg}");
        }
        Ok((status, body))
    }

    async fn get(&self, path: &str) -> anyhow::Result<Value> {
        Ok(self.send(self.http.get(format!("{}{path}", self.base))).await?.1)
    }

    async fn post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        Ok(self.send(self.http.post(format!("{}{path}", self.base)).json(body)).await?.1)
    }
}

fn print_json(v: &Value) {
    println!("{v}");
}

/// Prints rows as aligned columns under a header.
fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut width: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            width[i] = width[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let s: Vec<String> = cells.iter().enumerate().map(|(i, c)| format!("{c:<w$}", w = width[i])).collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r.clone());
    }
}

fn time_of(ms: &Value) -> String {
    ms.as_i64()
        .and_then(|ms| u64::try_from(ms).ok())
        .map(|ms| humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string())
        .unwrap_or_default()
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// `cloud-hub module ...`
pub async fn module(cmd: ModuleCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        ModuleCmd::Keygen { out } => {
            let key = SecretKey::generate();
            key.write_new(&out)?;
            eprintln!("secret key written to {} (keep it private; it is never overwritten)", out.display());
            eprintln!("public key (add it to fleet.trusted_keys of hubs and agents):");
            println!("{}", key.public());
        }
        ModuleCmd::Precompile { targets, module, out } => {
            if out.is_some() && targets.len() > 1 {
                anyhow::bail!("--out names one file: give one --target with it");
            }
            let wasm = std::fs::read(&module).with_context(|| format!("reading {}", module.display()))?;
            // The same checks as the registry's, then one compilation per target.
            let engine = brume_wasm_host::WasmEngine::new(Default::default())?;
            let loaded = engine.load(&wasm).with_context(|| format!("{} does not load", module.display()))?;
            let precompiler = brume_wasm_host::Precompiler::new()?;
            for target in targets {
                let code = precompiler
                    .precompile(target, &wasm)
                    .with_context(|| format!("precompiling {} for {target}", module.display()))?;
                let dest = out.clone().unwrap_or_else(|| module.with_extension(format!("{}.cwasm", target.name())));
                std::fs::write(&dest, &code).with_context(|| format!("writing {}", dest.display()))?;
                eprintln!(
                    "{} {} for {target} ({}): {} ({} bytes)",
                    loaded.manifest().name,
                    loaded.manifest().version,
                    brume_wasm_host::ENGINE_VERSION,
                    dest.display(),
                    code.len()
                );
            }
        }
        ModuleCmd::Pubkey { key } => println!("{}", SecretKey::read(&key)?.public()),
        ModuleCmd::Sign { key, module } => {
            let key = SecretKey::read(&key)?;
            let wasm = std::fs::read(&module).with_context(|| format!("reading {}", module.display()))?;
            let sig = key.sign(&wasm);
            let out = sig_path(&module);
            std::fs::write(&out, format!("{sig}\n")).with_context(|| format!("writing {}", out.display()))?;
            eprintln!("signature written to {}", out.display());
            println!("{sig}");
        }
        ModuleCmd::Push { module, key, signature, hub } => {
            let wasm = std::fs::read(&module).with_context(|| format!("reading {}", module.display()))?;
            let signature = match (key, signature) {
                (Some(k), _) => SecretKey::read(&k)?.sign(&wasm).to_string(),
                (None, Some(s)) => s,
                (None, None) => {
                    let p = sig_path(&module);
                    std::fs::read_to_string(&p)
                        .with_context(|| {
                            format!("no signature: give --key or --signature, or sign first (`cloud-hub module sign`, which writes {})", p.display())
                        })?
                        .trim()
                        .to_owned()
                }
            };
            let client = Client::new(&hub)?;
            let size = wasm.len();
            let body = upload_body(wasm, !hub.json && std::io::stderr().is_terminal());
            let (status, v) = client
                .send(
                    client
                        .http
                        .post(format!("{}/api/v1/registry/modules", client.base))
                        .header(crate::fleet::http::SIGNATURE_HEADER, signature)
                        .header(reqwest::header::CONTENT_LENGTH, size)
                        .body(body),
                )
                .await?;
            if hub.json {
                print_json(&v);
            } else {
                let what = if status == 201 { "registered" } else { "already registered (same bytes)" };
                println!(
                    "{} {} {what}: sha256 {}, {} bytes, signed by {}",
                    text(&v["name"]),
                    text(&v["version"]),
                    text(&v["sha256"]),
                    v["size"],
                    text(&v["key_id"])
                );
            }
        }
        ModuleCmd::Ls { name, hub } => {
            let client = Client::new(&hub)?;
            let path = match &name {
                Some(n) => format!("/api/v1/registry/modules?name={}", urlencode(n)),
                None => "/api/v1/registry/modules".into(),
            };
            let v = client.get(&path).await?;
            if hub.json {
                print_json(&v);
            } else {
                let rows: Vec<Vec<String>> = v
                    .as_array()
                    .map(|a| a.as_slice())
                    .unwrap_or_default()
                    .iter()
                    .map(|m| {
                        vec![
                            text(&m["name"]),
                            text(&m["version"]),
                            text(&m["sha256"]).chars().take(12).collect(),
                            m["size"].to_string(),
                            text(&m["key_id"]),
                            time_of(&m["uploaded_ms"]),
                        ]
                    })
                    .collect();
                table(&["NAME", "VERSION", "SHA256", "BYTES", "KEY", "UPLOADED"], &rows);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn sig_path(module: &Path) -> PathBuf {
    let mut s = module.as_os_str().to_owned();
    s.push(".sig");
    PathBuf::from(s)
}

/// Query-string encoding of one value.
fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The upload body, in 64 KiB pieces; with `progress`, the share sent so far is printed
/// on stderr as it goes (for large modules on slow links).
fn upload_body(wasm: Vec<u8>, progress: bool) -> reqwest::Body {
    const PIECE: usize = 64 * 1024;
    let total = wasm.len().max(1);
    let bytes = bytes::Bytes::from(wasm);
    let pieces: Vec<bytes::Bytes> =
        (0..bytes.len()).step_by(PIECE).map(|at| bytes.slice(at..(at + PIECE).min(bytes.len()))).collect();
    let mut sent = 0usize;
    let stream = tokio_stream::iter(pieces.into_iter().map(move |p| {
        sent += p.len();
        if progress {
            eprint!("\ruploading: {:>3}% of {total} bytes", sent * 100 / total);
            if sent == total {
                eprintln!();
            }
        }
        Ok::<_, std::io::Error>(p)
    }));
    reqwest::Body::wrap_stream(stream)
}

/// `cloud-hub deploy ...`
pub async fn deploy(a: DeployArgs) -> anyhow::Result<ExitCode> {
    let (name, version) =
        a.module.split_once('@').context("give the module as name@version (see `cloud-hub module ls`)")?;
    let selector = selector_of(&a.select)?;
    let config = module_config(a.config.as_deref(), a.config_file.as_deref())?;
    let mut body = json!({
        "module": name,
        "version": version,
        "config": config,
        "selector": selector,
        "waves": a.waves,
        "probation": a.probation.to_string(),
        "max_failed_batches": a.max_failed_batches,
        "abort_threshold": a.abort_threshold,
        "max_output_change_pct": a.max_output_change,
        "max_failed_pct": a.max_failed_pct,
        "min_inputs": a.min_inputs,
        "shadow": a.shadow,
    });
    if let Some(i) = &a.inputs {
        body["inputs"] = json!(i);
    }
    let client = Client::new(&a.hub)?;
    let d = client.post("/api/v1/deployments", &body).await?;
    let id = d["id"].as_u64().context("the hub's answer has no deployment id")?;
    if a.hub.json {
        print_json(&d);
    } else {
        println!("deployment {id}: {name} {version} to {} in waves {}", selector_text(&d["selector"]), waves_text(&d));
    }
    if a.watch { watch(&client, id, a.hub.json).await } else { Ok(ExitCode::SUCCESS) }
}

/// `--select key=value` flags as a selector.
fn selector_of(select: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    let mut selector = BTreeMap::new();
    for s in select {
        let (k, v) = s.split_once('=').with_context(|| format!("--select {s:?}: expected key=value"))?;
        selector.insert(k.to_owned(), v.to_owned());
    }
    Ok(selector)
}

/// `--config JSON` or `--config-file FILE`: a JSON object (empty if neither).
fn module_config(config: Option<&str>, file: Option<&Path>) -> anyhow::Result<Value> {
    let config: Value = match (config, file) {
        (Some(c), _) => serde_json::from_str(c).context("--config is not JSON")?,
        (None, Some(f)) => {
            serde_json::from_slice(&std::fs::read(f).with_context(|| format!("reading {}", f.display()))?)
                .with_context(|| format!("{} is not JSON", f.display()))?
        }
        (None, None) => json!({}),
    };
    if !config.is_object() {
        bail!("the module configuration must be a JSON object");
    }
    Ok(config)
}

fn selector_text(s: &Value) -> String {
    match s.as_object() {
        Some(m) if !m.is_empty() => m.iter().map(|(k, v)| format!("{k}={}", text(v))).collect::<Vec<_>>().join(","),
        _ => "every agent".into(),
    }
}

fn waves_text(d: &Value) -> String {
    d["waves"].as_array().map(|w| w.iter().map(text).collect::<Vec<_>>().join(", ")).unwrap_or_default()
}

fn counts_text(d: &Value) -> String {
    match d["agents"].as_object() {
        Some(m) if !m.is_empty() => m.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", "),
        _ => "no agents yet".into(),
    }
}

fn summary(d: &Value) -> String {
    let waves = d["waves"].as_array().map_or(0, |w| w.len());
    let mut s = format!(
        "deployment {}: {} {} {}, wave {}/{} ({}), {}",
        d["id"],
        text(&d["module"]),
        text(&d["version"]),
        text(&d["state"]),
        d["wave"].as_u64().unwrap_or(0) + 1,
        waves,
        waves_text(d),
        counts_text(d)
    );
    if let Some(r) = d["reason"].as_str() {
        s.push_str(&format!(" — {r}"));
    }
    s
}

fn show(d: &Value) {
    println!("{}", summary(d));
    println!(
        "  selector {}, probation {}s, abort at {} failed, sha256 {}",
        selector_text(&d["selector"]),
        d["probation_s"],
        d["abort_threshold"],
        text(&d["sha256"])
    );
    let mut checks = Vec::new();
    if let Some(p) = d["max_output_change_pct"].as_u64() {
        checks.push(format!("outputs per input within ±{p}% of the previous build's"));
    }
    if let Some(p) = d["max_failed_pct"].as_u64() {
        checks.push(format!("at most {p}% of batches failed"));
    }
    if !checks.is_empty() {
        println!("  checks: {}, after {} inputs", checks.join(", "), d["min_inputs"]);
    }
    let rows: Vec<Vec<String>> = d["agent_progress"]
        .as_array()
        .map(|a| a.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|a| {
            vec![
                text(&a["agent_id"]),
                text(&a["wave"]),
                text(&a["phase"]),
                if a["online"] == true { "yes".into() } else { "no".into() },
                text(&a["running"]["version"]),
                shadow_text(&a["shadow"]),
                text(&a["error"]),
            ]
        })
        .collect();
    if !rows.is_empty() {
        table(&["AGENT", "WAVE", "PHASE", "ONLINE", "RUNNING", "SHADOW", "ERROR"], &rows);
    }
}

/// A shadow comparison in a few words: inputs, outputs against the running build's,
/// failures, mean drift.
fn shadow_text(s: &Value) -> String {
    if s.is_null() {
        return String::new();
    }
    let mut t = format!("{} in, out {} vs {}", s["inputs"], s["outputs"], s["running_outputs"]);
    if s["failed_batches"].as_u64().unwrap_or(0) > 0 {
        t.push_str(&format!(", {} failed", s["failed_batches"]));
    }
    if let Some(d) = s["max_mean_drift_pct"].as_u64() {
        t.push_str(&format!(", drift {d}%"));
    }
    t
}

/// Follows a rollout: prints each change, returns when it ends.
async fn watch(client: &Client, id: u64, json: bool) -> anyhow::Result<ExitCode> {
    let mut last = String::new();
    loop {
        let d = client.get(&format!("/api/v1/deployments/{id}")).await?;
        let line = if json { d.to_string() } else { summary(&d) };
        if line != last {
            println!("{line}");
            last = line;
        }
        match d["state"].as_str() {
            Some("done") => return Ok(ExitCode::SUCCESS),
            Some("aborted" | "rolled_back") => return Ok(ExitCode::from(EXIT_ROLLOUT_FAILED)),
            _ => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    }
}

/// `cloud-hub rollout ...`
pub async fn rollout(cmd: RolloutCmd) -> anyhow::Result<ExitCode> {
    let (action, a) = match cmd {
        RolloutCmd::Ls { hub } => {
            let v = Client::new(&hub)?.get("/api/v1/deployments").await?;
            if hub.json {
                print_json(&v);
            } else {
                let rows: Vec<Vec<String>> = v
                    .as_array()
                    .map(|a| a.as_slice())
                    .unwrap_or_default()
                    .iter()
                    .map(|d| {
                        vec![
                            d["id"].to_string(),
                            format!("{}@{}", text(&d["module"]), text(&d["version"])),
                            text(&d["state"]),
                            format!(
                                "{}/{}",
                                d["wave"].as_u64().unwrap_or(0) + 1,
                                d["waves"].as_array().map_or(0, |w| w.len())
                            ),
                            selector_text(&d["selector"]),
                            counts_text(d),
                            time_of(&d["created_ms"]),
                        ]
                    })
                    .collect();
                table(&["ID", "MODULE", "STATE", "WAVE", "SELECTOR", "AGENTS", "CREATED"], &rows);
            }
            return Ok(ExitCode::SUCCESS);
        }
        RolloutCmd::Show { id, hub } => {
            let d = Client::new(&hub)?.get(&format!("/api/v1/deployments/{id}")).await?;
            if hub.json {
                print_json(&d)
            } else {
                show(&d)
            }
            return Ok(ExitCode::SUCCESS);
        }
        RolloutCmd::Watch { id, hub } => return watch(&Client::new(&hub)?, id, hub.json).await,
        RolloutCmd::Pause(a) => ("pause", a),
        RolloutCmd::Resume(a) => ("resume", a),
        RolloutCmd::Abort(a) => ("abort", a),
        RolloutCmd::Rollback(a) => ("rollback", a),
    };
    let body = match &a.reason {
        Some(r) => json!({ "reason": r }),
        None => json!({}),
    };
    let d = Client::new(&a.hub)?.post(&format!("/api/v1/deployments/{}/{action}", a.id), &body).await?;
    if a.hub.json {
        print_json(&d)
    } else {
        println!("{}", summary(&d))
    }
    Ok(ExitCode::SUCCESS)
}

/// `cloud-hub agents ...`
pub async fn agents(cmd: AgentsCmd) -> anyhow::Result<ExitCode> {
    let AgentsCmd::Ls { hub } = cmd;
    let v = Client::new(&hub)?.get("/api/v1/fleet/agents").await?;
    if hub.json {
        print_json(&v);
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = v
        .as_array()
        .map(|a| a.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|a| {
            // The agent's own `brume.*` labels make the PLATFORM column.
            let labels = a["labels"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .filter(|(k, _)| !k.starts_with("brume."))
                        .map(|(k, v)| format!("{k}={}", text(v)))
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default();
            let platform = match (text(&a["labels"]["brume.arch"]), text(&a["labels"]["brume.build"])) {
                (arch, _) if arch.is_empty() => "-".to_string(),
                (arch, build) => format!("{arch}/{build}"),
            };
            let modules = a["modules"]
                .as_array()
                .map(|m| {
                    m.iter()
                        .map(|m| {
                            format!("{}@{} {}", text(&m["name"]), text(&m["wanted"]["version"]), text(&m["phase"]))
                        })
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_default();
            vec![
                text(&a["agent_id"]),
                if a["online"] == true { "online".into() } else { "offline".into() },
                platform,
                labels,
                format!("{}/{}", a["reported_generation"], a["desired_generation"]),
                modules,
            ]
        })
        .collect();
    table(&["AGENT", "STATUS", "PLATFORM", "LABELS", "GENERATION", "MODULES"], &rows);
    Ok(ExitCode::SUCCESS)
}
