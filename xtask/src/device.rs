//! Bench group `device` (`cargo xtask bench --only device`): the agent as shipped to
//! devices.
//!
//! - Sizes of the stripped `device` builds per target, runtime-only (the default, with
//!   its budget) and with the JIT compiler.
//! - A module's cost per reading on armv7 (Pulley) against aarch64 (native code), both
//!   under qemu-user on this machine: the emulator makes absolute figures meaningless, so
//!   only their ratio is reported.
//! - On this machine, natively: the runtime-only agent against the JIT agent (start to
//!   module loaded, resident memory after processing).
//!
//! Each module-cost run: the agent stores N readings (`/api/v1/write`, no module), stops,
//! and starts again with the threshold example processing them from the start
//! (`start_at = "earliest"`); the agent process's CPU time from "module loaded" to "N
//! readings in" is the module's work (calls, fuel and epoch checks, output commits), the
//! same on every target.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::util::{Mosquitto, Proc, cpu_secs, free_port, proc_status_bytes, wait_port};

/// Readings processed per module-cost run.
pub const READINGS: usize = 20_000;

/// What one module-cost run measured.
pub struct ModuleRun {
    /// Process start to the module reported loaded, seconds.
    pub load_secs: f64,
    /// Agent CPU per reading while the module processed the backlog, µs.
    pub cpu_us_per_reading: f64,
    /// Resident memory at the end, bytes (of qemu and the guest under emulation).
    pub rss: u64,
}

/// Runs the agent `cmd` (the binary, or a runner and its arguments ending with the
/// binary) with the threshold example at `module` (and its precompiled sibling, if the
/// build needs one).
pub fn module_run(cmd: &[String], module: &Path) -> Result<ModuleRun> {
    let mosq = Mosquitto::start()?;
    let dir = tempfile::tempdir()?;
    let (mqtt, http) = (free_port(), free_port());
    let base = format!("agent_id = \"bench-device\"\ndata_dir = {:?}\n", dir.path().join("data").display().to_string());
    let sections = format!(
        "\n[forward]\nhost = \"127.0.0.1\"\nport = {}\n\n[listener]\nlisten = \"127.0.0.1:{mqtt}\"\n\n[http]\nlisten = \"127.0.0.1:{http}\"\n",
        mosq.port
    );
    let cfg = dir.path().join("agent.toml");
    let spawn = |extra: &str| -> Result<Proc> {
        std::fs::write(&cfg, format!("{base}{extra}{sections}"))?;
        let mut args: Vec<String> = cmd[1..].to_vec();
        args.extend(["--config".into(), cfg.display().to_string()]);
        let p = Proc::spawn(
            "edge-agent",
            Path::new(&cmd[0]),
            &args,
            &dir.path().join("agent.log"),
            &[("RUST_LOG", "warn")],
        )?;
        wait_port("the agent's HTTP API", http, Duration::from_secs(120))?;
        Ok(p)
    };

    // The input, stored without a module.
    let mut agent = spawn("")?;
    let client = reqwest::blocking::Client::new();
    for chunk in 0..READINGS / 1000 {
        let body: Vec<serde_json::Value> = (0..1000)
            .map(|j| {
                let i = (chunk * 1000 + j) as i64;
                serde_json::json!({"value": (i * 37) % 101, "ts": 1_700_000_000_000i64 + i})
            })
            .collect();
        let r = client
            .post(format!("http://127.0.0.1:{http}/api/v1/write?stream=sensors/0"))
            .json(&body)
            .send()
            .context("writing readings")?;
        if !r.status().is_success() {
            bail!("write refused: {}", r.status());
        }
    }
    agent.terminate()?;

    // The module over all of it.
    let started = Instant::now();
    let mut agent = spawn(&format!(
        "modules = [{{ path = {:?}, start_at = \"earliest\", config = {{ limit = 80.0 }} }}]\n",
        module.display().to_string()
    ))?;
    let status = |what: &str| -> Result<serde_json::Value> {
        let v: serde_json::Value =
            client.get(format!("http://127.0.0.1:{http}/api/v1/status")).send()?.json().context("status")?;
        v["modules"].get(0).cloned().with_context(|| format!("{what}: no module in the status"))
    };
    let deadline = Instant::now() + Duration::from_secs(600);
    let (load_secs, cpu0) = loop {
        agent.check_alive()?;
        let m = status("loading")?;
        if m["loaded_ms"].is_i64() {
            break (started.elapsed().as_secs_f64(), cpu_secs(agent.pid()).context("agent CPU")?);
        }
        if let Some(e) = m["last_error"].as_str() {
            bail!("the module does not load: {e}");
        }
        if Instant::now() > deadline {
            bail!("the module did not load within 10 min");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    loop {
        agent.check_alive()?;
        if status("processing")?["readings_in"].as_u64().unwrap_or(0) >= READINGS as u64 {
            break;
        }
        if Instant::now() > deadline {
            bail!("the module did not process {READINGS} readings within 10 min");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let cpu1 = cpu_secs(agent.pid()).context("agent CPU")?;
    let rss = proc_status_bytes(agent.pid(), "VmRSS").unwrap_or(0);
    agent.terminate()?;
    Ok(ModuleRun { load_secs, cpu_us_per_reading: 1e6 * (cpu1 - cpu0) / READINGS as f64, rss })
}

/// The threshold example copied into a fresh directory, with its code precompiled for
/// `arch` beside it (by the release hub's `module precompile`) when `arch` is given.
pub fn module_dir(root: &Path, hub: &Path, arch: Option<&str>) -> Result<(tempfile::TempDir, PathBuf)> {
    let dir = tempfile::tempdir()?;
    let wasm = dir.path().join("threshold.wasm");
    std::fs::copy(root.join("target/modules/threshold.wasm"), &wasm).context("the threshold example")?;
    if let Some(arch) = arch {
        let st = std::process::Command::new(hub)
            .args(["module", "precompile", "--target", arch])
            .arg(&wasm)
            .stderr(std::process::Stdio::null())
            .status()?;
        if !st.success() {
            bail!("cloud-hub module precompile --target {arch} failed");
        }
    }
    Ok((dir, wasm))
}
