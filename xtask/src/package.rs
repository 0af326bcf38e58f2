//! `cargo xtask package <aarch64|armv7|x86_64>...`: a `.deb` of the agent per target.
//!
//! Builds the agent for the target (see `cross.rs`; runtime-only, `device` profile) and
//! assembles `target/deb/brume-edge-agent_<version>_<arch>.deb` with `dpkg-deb`:
//!
//! | path | what |
//! |---|---|
//! | `/usr/bin/edge-agent` | the agent |
//! | `/lib/systemd/system/edge-agent.service` | `cross/systemd/edge-agent.service` |
//! | `/etc/brume/edge-agent.toml` | `cross/debian/edge-agent.toml`, a conffile |
//! | `/usr/share/doc/brume-edge-agent/` | README, every config key, licence |
//!
//! and the maintainer scripts in `cross/debian/`. The glibc it needs is read from the
//! binary's symbol versions, so `Depends: libc6 (>= x)` is what the binary really needs.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::cross::{self, Device};

const PACKAGE: &str = "brume-edge-agent";

/// `cargo xtask package`.
pub fn run(root: &Path, targets: &[String]) -> Result<()> {
    let devices = targets.iter().map(|t| cross::device(t)).collect::<Result<Vec<_>>>()?;
    cross::ensure_toolchains(root, &devices)?;
    for d in devices {
        let bin = cross::build(root, d, false)?;
        let deb = package(root, d, &bin)?;
        println!("{}", deb.strip_prefix(root).unwrap_or(&deb).display());
    }
    Ok(())
}

/// Assembles the package for `device` around the agent binary `bin`.
pub fn package(root: &Path, device: Device, bin: &Path) -> Result<PathBuf> {
    let version = env!("CARGO_PKG_VERSION");
    let out_dir = root.join("target/deb");
    let stage = out_dir.join(format!("{PACKAGE}_{}", device.deb_arch));
    if stage.exists() {
        std::fs::remove_dir_all(&stage).with_context(|| format!("removing {}", stage.display()))?;
    }
    let doc = format!("usr/share/doc/{PACKAGE}");
    let files: [(PathBuf, String, u32); 7] = [
        (bin.to_path_buf(), "usr/bin/edge-agent".into(), 0o755),
        (root.join("cross/systemd/edge-agent.service"), "lib/systemd/system/edge-agent.service".into(), 0o644),
        (root.join("cross/debian/edge-agent.toml"), "etc/brume/edge-agent.toml".into(), 0o640),
        (root.join("README.md"), format!("{doc}/README.md"), 0o644),
        (root.join("cross/README.md"), format!("{doc}/DEVICES.md"), 0o644),
        (root.join("edge-agent/config.example.toml"), format!("{doc}/config.example.toml"), 0o644),
        (root.join("LICENSE"), format!("{doc}/copyright"), 0o644),
    ];
    for (src, dst, mode) in &files {
        copy(src, &stage.join(dst), *mode)?;
    }
    for script in ["postinst", "prerm", "postrm"] {
        copy(&root.join("cross/debian").join(script), &stage.join("DEBIAN").join(script), 0o755)?;
    }
    std::fs::write(stage.join("DEBIAN/conffiles"), "/etc/brume/edge-agent.toml\n")?;
    let installed_kb =
        files.iter().map(|(s, _, _)| std::fs::metadata(s).map(|m| m.len()).unwrap_or(0)).sum::<u64>() / 1024;
    let glibc = glibc_needed(bin)?;
    let control = format!(
        "Package: {PACKAGE}\n\
         Version: {version}\n\
         Architecture: {arch}\n\
         Maintainer: Brume developers <brume@localhost>\n\
         Depends: libc6 (>= {glibc}), adduser\n\
         Section: net\n\
         Priority: optional\n\
         Installed-Size: {installed_kb}\n\
         Description: Brume edge agent: durable sensor ingest, WASM modules, store-and-forward\n \
         Ingests sensor readings over MQTT and HTTP into a local SQLite store, runs WASM\n \
         processing modules on them (precompiled by the hub; no compiler on the device),\n \
         and forwards results to a Brume hub over MQTT, exactly once, across outages.\n",
        arch = device.deb_arch,
    );
    std::fs::write(stage.join("DEBIAN/control"), control)?;
    let deb = out_dir.join(format!("{PACKAGE}_{version}_{}.deb", device.deb_arch));
    let status = Command::new("dpkg-deb")
        .args(["--build", "--root-owner-group", "-Zxz"])
        .arg(&stage)
        .arg(&deb)
        .stdout(std::process::Stdio::null())
        .status()
        .context("running dpkg-deb (apt-get install dpkg-dev)")?;
    if !status.success() {
        bail!("dpkg-deb failed ({status})");
    }
    Ok(deb)
}

fn copy(src: &Path, dst: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dst.parent().expect("a file in a directory"))?;
    std::fs::copy(src, dst).with_context(|| format!("copying {} to {}", src.display(), dst.display()))?;
    std::fs::set_permissions(dst, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// The newest glibc symbol version the binary links against, e.g. `2.34`.
fn glibc_needed(bin: &Path) -> Result<String> {
    let out = Command::new("readelf")
        .args(["--dyn-syms", "--wide"])
        .arg(bin)
        .output()
        .context("running readelf (binutils)")?;
    if !out.status.success() {
        bail!("readelf {} failed", bin.display());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let newest = text
        .split("GLIBC_")
        .skip(1)
        .filter_map(|rest| {
            let v: String = rest.chars().take_while(|c| c.is_ascii_digit() || *c == '.').collect();
            let mut parts = v.split('.').map(|p| p.parse::<u32>().ok());
            Some((parts.next()??, parts.next().flatten().unwrap_or(0)))
        })
        .max()
        .context("no GLIBC_ symbol versions in the binary")?;
    Ok(format!("{}.{}", newest.0, newest.1))
}
