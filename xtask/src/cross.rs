//! `cargo xtask cross <aarch64|armv7|x86_64>... [--jit]`: the agent built for devices.
//!
//! Installs what is missing (`scripts/cross-deps.sh`: Debian cross toolchains, qemu-user,
//! the Rust targets), then builds `edge-agent` with the `device` profile (fat LTO, one
//! codegen unit, stripped, panic = abort; see the workspace `Cargo.toml`) for each
//! target. Runtime-only by default (no Cranelift: modules arrive precompiled from the
//! hub); `--jit` builds the agent that compiles modules itself. Linkers and qemu runners
//! are in `.cargo/config.toml`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// A device target: the name users type, the Rust triple, the size budget of the
/// runtime-only build (issue "ARM devices"), bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Device {
    /// `aarch64`, `armv7`, `x86_64`.
    pub name: &'static str,
    /// The Rust target triple.
    pub triple: &'static str,
    /// Debian's architecture name, for packages.
    pub deb_arch: &'static str,
    /// Largest acceptable stripped runtime-only binary, bytes.
    pub budget: u64,
}

/// Every device target.
pub const DEVICES: [Device; 3] = [
    Device { name: "aarch64", triple: "aarch64-unknown-linux-gnu", deb_arch: "arm64", budget: 8_000_000 },
    Device { name: "armv7", triple: "armv7-unknown-linux-gnueabihf", deb_arch: "armhf", budget: 6_000_000 },
    Device { name: "x86_64", triple: "x86_64-unknown-linux-gnu", deb_arch: "amd64", budget: 8_000_000 },
];

/// The device target called `name`.
pub fn device(name: &str) -> Result<Device> {
    DEVICES
        .iter()
        .copied()
        .find(|d| d.name == name || d.deb_arch == name)
        .with_context(|| format!("unknown target {name:?}: expected aarch64, armv7 or x86_64"))
}

/// Installs the toolchain for `devices` when missing.
pub fn ensure_toolchains(root: &Path, devices: &[Device]) -> Result<()> {
    let status = Command::new(root.join("scripts/cross-deps.sh"))
        .args(devices.iter().map(|d| d.name))
        .status()
        .context("running scripts/cross-deps.sh")?;
    if !status.success() {
        bail!("scripts/cross-deps.sh failed ({status}): install the cross toolchains it names");
    }
    Ok(())
}

/// Builds the agent for `device`; returns the binary's path.
pub fn build(root: &Path, device: Device, jit: bool) -> Result<PathBuf> {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root).args([
        "build",
        "--locked",
        "--profile",
        "device",
        "--target",
        device.triple,
        "-p",
        "edge-agent",
        "--no-default-features",
    ]);
    if jit {
        cmd.args(["--features", "jit"]);
        // A separate directory: the JIT and runtime-only builds do not overwrite each
        // other's binary.
        cmd.env("CARGO_TARGET_DIR", root.join("target/jit"));
    }
    let status = cmd.status().context("running cargo build")?;
    if !status.success() {
        bail!("building edge-agent for {} failed ({status})", device.triple);
    }
    let dir = if jit { root.join("target/jit") } else { root.join("target") };
    Ok(dir.join(device.triple).join("device").join("edge-agent"))
}

/// `cargo xtask cross`.
pub fn run(root: &Path, targets: &[String], jit: bool) -> Result<()> {
    let devices = targets.iter().map(|t| device(t)).collect::<Result<Vec<_>>>()?;
    ensure_toolchains(root, &devices)?;
    let mut over = Vec::new();
    for d in devices {
        let bin = build(root, d, jit)?;
        let size = std::fs::metadata(&bin).with_context(|| format!("reading {}", bin.display()))?.len();
        let kind = if jit { "JIT (Cranelift)" } else { "runtime-only" };
        println!(
            "{}  {} {kind}, {:.2} MB stripped (budget for runtime-only: {:.1} MB)",
            bin.strip_prefix(root).unwrap_or(&bin).display(),
            d.name,
            size as f64 / 1e6,
            d.budget as f64 / 1e6
        );
        if !jit && size > d.budget {
            over.push(format!("{}: {size} bytes, budget {}", d.name, d.budget));
        }
    }
    if !over.is_empty() {
        bail!("over the size budget: {}", over.join("; "));
    }
    Ok(())
}
