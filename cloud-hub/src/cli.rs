//! The `cloud-hub` command line: flags, config, logging and signals, then [`crate::run`].
//!
//! A library module (not only `main.rs`) so that other packages, such as the e2e tests,
//! can build the exact same binary.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::Config;
use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;

/// Brume cloud hub: stores agent batches received over MQTT and serves them over HTTP.
/// Without a command it runs the hub; the commands manage modules, deployments and the
/// fleet through a hub's API.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// TOML config file (see config.example.toml). Without it, defaults are used.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Overrides `data_dir`.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Overrides `mqtt.host`.
    #[arg(long, value_name = "HOST")]
    mqtt_host: Option<String>,
    /// Overrides `mqtt.port`.
    #[arg(long, value_name = "PORT")]
    mqtt_port: Option<u16>,
    /// Overrides `http.listen`.
    #[arg(long, value_name = "ADDR")]
    http_listen: Option<SocketAddr>,
}

/// Operator commands (see [`crate::ops`]).
#[derive(Debug, clap::Subcommand)]
enum Cmd {
    /// Publisher keys, signatures and the module registry.
    #[command(subcommand)]
    Module(crate::ops::ModuleCmd),
    /// Deploy a registered module to the agents a selector matches, in waves.
    Deploy(crate::ops::DeployArgs),
    /// Deployments: list, show, watch, pause, resume, abort, roll back.
    #[command(subcommand)]
    Rollout(crate::ops::RolloutCmd),
    /// The fleet as the hub sees it.
    #[command(subcommand)]
    Agents(crate::ops::AgentsCmd),
    /// Re-run a module build over readings agents kept from a past time range.
    #[command(subcommand)]
    Reprocess(crate::ops::ReprocessCmd),
    /// Write a new hub signing key (for `mqtt.signing_key`) and print its public key (for
    /// agents' `forward.hub_keys`). Never overwrites a file.
    Keygen {
        /// Where to write the secret key (mode 0600).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Create an API token: prints the token (give it to its holder; it is shown once)
    /// and the `[[http.tokens]]` entry for every hub's config (only its sha256).
    Token {
        /// Who or what will hold it (shown in logs).
        #[arg(long)]
        name: String,
        /// What it may do: read, modules (upload, deploy, rollouts, re-process), fleet
        /// (quarantine). Repeat for several.
        #[arg(long = "scope", value_name = "SCOPE", required = true)]
        scopes: Vec<String>,
    },
}

/// Entry point of the `cloud-hub` binary: returns the process exit code.
pub fn main() -> ExitCode {
    let mut args = Args::parse();
    if let Some(cmd) = args.cmd.take() {
        // Operator commands print for people (or JSON) and log nothing.
        return crate::ops::run(async move {
            match cmd {
                Cmd::Module(c) => crate::ops::module(c).await,
                Cmd::Deploy(a) => crate::ops::deploy(a).await,
                Cmd::Rollout(c) => crate::ops::rollout(c).await,
                Cmd::Agents(c) => crate::ops::agents(c).await,
                Cmd::Reprocess(c) => crate::ops::reprocess(c).await,
                Cmd::Keygen { out } => {
                    let key = brume_signing::SecretKey::generate();
                    key.write_new(&out)?;
                    eprintln!("hub signing key written to {} (set mqtt.signing_key to it on every hub)", out.display());
                    eprintln!("public key (add it to forward.hub_keys of every agent):");
                    println!("{}", key.public());
                    Ok(ExitCode::SUCCESS)
                }
                Cmd::Token { name, scopes } => {
                    for s in &scopes {
                        if !["read", "modules", "fleet"].contains(&s.as_str()) {
                            anyhow::bail!("unknown scope {s:?}: read, modules or fleet");
                        }
                    }
                    let (token, sha256) = crate::auth::new_token();
                    eprintln!("add to [http] of every hub's config:\n");
                    eprintln!("[[http.tokens]]\nname = {name:?}\nsha256 = {sha256:?}\nscopes = {scopes:?}\n");
                    eprintln!("the token (shown once; CLI: export BRUME_TOKEN=...; dashboard: paste it at login):");
                    println!("{token}");
                    Ok(ExitCode::SUCCESS)
                }
            }
        });
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rumqttc=warn"));
    // rumqttc logs through `log`; tracing-subscriber's tracing-log bridge picks it up.
    // Colour only on a terminal: journald and log files get plain text.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    match real_main(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("cloud-hub: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load_config(args: Args) -> anyhow::Result<Config> {
    let mut cfg = match &args.config {
        Some(path) => Config::load(path).with_context(|| format!("loading {}", path.display()))?,
        None => Config::default(),
    };
    if let Some(d) = args.data_dir {
        cfg.data_dir = d;
    }
    if let Some(h) = args.mqtt_host {
        cfg.mqtt.host = h;
    }
    if let Some(p) = args.mqtt_port {
        cfg.mqtt.port = p;
    }
    if let Some(l) = args.http_listen {
        cfg.http.listen = l;
    }
    cfg.validate().context("invalid configuration")?;
    Ok(cfg)
}

fn real_main(args: Args) -> anyhow::Result<()> {
    let cfg = load_config(args)?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the tokio runtime")?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(cfg.http.listen)
            .await
            .with_context(|| format!("binding the HTTP API to {}", cfg.http.listen))?;
        let shutdown = CancellationToken::new();
        tokio::spawn(signal_shutdown(shutdown.clone()));
        crate::run(cfg, listener, shutdown).await.context("hub failed")
    })
}

/// Cancels `shutdown` on SIGTERM or Ctrl-C (SIGINT).
async fn signal_shutdown(shutdown: CancellationToken) {
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        r = tokio::signal::ctrl_c() => if let Err(e) = r { tracing::warn!(error = %e, "cannot listen for Ctrl-C"); std::future::pending::<()>().await },
        _ = term => {}
    }
    tracing::info!("shutdown signal received");
    shutdown.cancel();
}
