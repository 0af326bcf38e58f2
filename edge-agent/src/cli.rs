//! The `edge-agent` command line: flags, logging and signals, then [`crate::run`].

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;

/// Brume edge agent: durable sensor ingest into SQLite, store-and-forward to the hub over MQTT.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// TOML config file (see edge-agent/config.example.toml). Without it, defaults apply.
    #[arg(short, long)]
    config: Option<PathBuf>,
    /// Override `agent_id`.
    #[arg(long)]
    agent_id: Option<String>,
    /// Override `data_dir`.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Override `forward.host:forward.port` (the cloud broker), e.g. 127.0.0.1:1883.
    #[arg(long)]
    broker: Option<String>,
    /// Override `listener.listen` (the MQTT listener for sensors).
    #[arg(long)]
    mqtt_listen: Option<std::net::SocketAddr>,
    /// Override `http.listen`.
    #[arg(long)]
    http_listen: Option<std::net::SocketAddr>,
    /// Enable the simulator with this many readings per second.
    #[arg(long)]
    simulate: Option<f64>,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    print_config: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Compile and check a WASM module into the agent's module cache format. The agent
    /// runs this in a child process of itself, so the compiler's memory never stays
    /// resident in the long-lived agent.
    #[command(hide = true)]
    CompileModule {
        /// The `.wasm` file.
        input: PathBuf,
        /// Where to write the compiled module.
        output: PathBuf,
    },
}

/// Entry point of the `edge-agent` binary.
pub fn main() -> ExitCode {
    // `RUST_LOG` as `target=level` directives (`info,edge_agent::forward=debug`). Parsed
    // by `Targets`, not `EnvFilter`: the same syntax without span filters, and without
    // the regex engine, 220 KB of a device binary.
    const DEFAULT_LOG: &str = "info,rumqttc=warn";
    let (filter, bad_filter) = match std::env::var("RUST_LOG") {
        Ok(v) => match v.parse::<tracing_subscriber::filter::Targets>() {
            Ok(t) => (t, None),
            Err(e) => (DEFAULT_LOG.parse().expect("valid directives"), Some(format!("RUST_LOG={v:?}: {e}"))),
        },
        Err(_) => (DEFAULT_LOG.parse().expect("valid directives"), None),
    };
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                // Colour only on a terminal: journald and log files get plain text.
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_writer(std::io::stderr),
        )
        .with(filter)
        .init();
    if let Some(why) = bad_filter {
        tracing::warn!("ignoring an invalid log filter ({why}); logging at {DEFAULT_LOG}");
    }
    match real_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("edge-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Command::CompileModule { input, output }) = &cli.command {
        return crate::modules::compile_module_command(input, output);
    }
    match std::env::current_exe() {
        Ok(exe) => crate::modules::compile_in_child_processes(exe),
        Err(e) => tracing::warn!(error = %e, "cannot find the agent's own executable; WASM modules compile in-process"),
    }
    let mut cfg = match &cli.config {
        Some(p) => crate::config::Config::load(p)?,
        None => crate::config::Config::default(),
    };
    if let Some(v) = cli.agent_id {
        cfg.agent_id = v;
    }
    if let Some(v) = cli.data_dir {
        cfg.data_dir = v;
    }
    if let Some(b) = cli.broker {
        let (h, p) = b.rsplit_once(':').context("--broker must be HOST:PORT")?;
        cfg.forward.host = h.to_string();
        cfg.forward.port = p.parse().context("--broker port must be a number")?;
    }
    if let Some(v) = cli.mqtt_listen {
        cfg.listener.listen = v;
    }
    if let Some(v) = cli.http_listen {
        cfg.http.listen = v;
    }
    if let Some(rate) = cli.simulate {
        cfg.simulator.enabled = true;
        cfg.simulator.rate = rate;
        cfg.simulator.batch = ((rate / 10.0).ceil() as usize).max(1);
    }
    cfg.validate()?;
    if cli.print_config {
        print!("{}", toml::to_string(&cfg).context("serialising the config")?);
        return Ok(());
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")?;
    let result = rt.block_on(async move {
        let listeners = crate::Listeners::bind(&cfg).await?;
        let shutdown = CancellationToken::new();
        let signal = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            signal.cancel();
        });
        crate::run(cfg, listeners, shutdown).await
    });
    // `run` bounds its own waits; a blocking task it gave up on must not hold the exit
    // (dropping the runtime would wait for it).
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    result
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("Ctrl-C received"),
    }
}
