//! Helpers shared by the benchmarks: samples and their summary, number formatting, child
//! processes, a private mosquitto, machine facts.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Samples of one measurement (a rate or a size), summarised as median [min..max].
#[derive(Debug, Clone, Default)]
pub struct Samples(pub Vec<f64>);

impl Samples {
    pub fn push(&mut self, v: f64) {
        self.0.push(v);
    }

    fn sorted(&self) -> Vec<f64> {
        let mut v = self.0.clone();
        v.sort_by(|a, b| a.total_cmp(b));
        v
    }

    /// Median (mean of the middle two for an even count); NaN when empty.
    pub fn median(&self) -> f64 {
        let v = self.sorted();
        match v.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        }
    }

    pub fn min(&self) -> f64 {
        self.sorted().first().copied().unwrap_or(f64::NAN)
    }

    pub fn max(&self) -> f64 {
        self.sorted().last().copied().unwrap_or(f64::NAN)
    }

    /// `median [min..max]` of a rate, or just the value for a single sample.
    pub fn fmt_rate(&self) -> String {
        if self.0.len() <= 1 {
            format!("{}/s", group(self.median()))
        } else {
            format!("{}/s [{}..{}]", group(self.median()), group(self.min()), group(self.max()))
        }
    }
}

/// An integer with thousands separators: 1234567.8 → "1,234,568".
pub fn group(v: f64) -> String {
    if !v.is_finite() {
        return "n/a".into();
    }
    let n = v.round() as i64;
    let s = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}

/// Bytes as "12.3 MB (11.7 MiB)".
pub fn fmt_bytes(b: f64) -> String {
    format!("{:.1} MB ({:.1} MiB)", b / 1e6, b / (1024.0 * 1024.0))
}

pub use brume_test_support::free_port;

/// Waits until something accepts TCP connections on 127.0.0.1:`port`.
pub fn wait_port(what: &str, port: u16, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("{what} did not listen on 127.0.0.1:{port} within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// A child process, killed on drop.
pub struct Proc {
    child: Option<Child>,
    name: String,
}

impl Proc {
    /// Spawns `exe args` with stdout and stderr appended to `log`.
    pub fn spawn(name: &str, exe: &Path, args: &[String], log: &Path, env: &[(&str, &str)]) -> Result<Proc> {
        let out = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
        let mut cmd = Command::new(exe);
        cmd.args(args).stdin(Stdio::null()).stdout(out.try_clone()?).stderr(out);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().with_context(|| format!("spawning {}", exe.display()))?;
        Ok(Proc { child: Some(child), name: name.into() })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Fails if the process has already exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(c) = self.child.as_mut()
            && let Some(st) = c.try_wait()?
        {
            bail!("{} exited early: {st}", self.name);
        }
        Ok(())
    }

    /// SIGTERM (through `kill`, the workspace forbids `unsafe`), then waits up to 20 s for
    /// a clean exit before SIGKILL.
    pub fn terminate(&mut self) -> Result<()> {
        let Some(mut c) = self.child.take() else {
            return Ok(());
        };
        let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if c.try_wait()?.is_some() {
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                bail!("{} ignored SIGTERM for 20 s; killed", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts a `cloud-hub` release process with its config in `dir/hub.toml`: its SQLite
/// store in `data`, the broker on `mqtt_port`, the HTTP API on a free port, then `extra`
/// TOML (more keys of `[http]` first, then whole tables); logs to `dir/hub.log` at warn.
/// Returns the process and its HTTP port once the API answers.
pub fn spawn_hub(exe: &Path, dir: &Path, data: &Path, mqtt_port: u16, extra: &str) -> Result<(Proc, u16)> {
    let http = free_port();
    let cfg = dir.join("hub.toml");
    std::fs::write(
        &cfg,
        format!(
            "data_dir = {:?}\n[mqtt]\nhost = \"127.0.0.1\"\nport = {mqtt_port}\n[http]\nlisten = \"127.0.0.1:{http}\"\n{extra}\n",
            data.display().to_string()
        ),
    )?;
    let hub = Proc::spawn(
        "cloud-hub",
        exe,
        &["--config".into(), cfg.display().to_string()],
        &dir.join("hub.log"),
        &[("RUST_LOG", "warn")],
    )?;
    wait_port("the hub's HTTP API", http, Duration::from_secs(30))?;
    Ok((hub, http))
}

pub use brume_test_support::Mosquitto;

pub use brume_test_support::which;

/// Output of a command's first line, or "unknown".
pub fn cmd_line(prog: &str, args: &[&str]) -> String {
    Command::new(prog)
        .args(args)
        .output()
        .ok()
        .map(|o| {
            let mut s = String::from_utf8_lossy(&o.stdout).to_string();
            if s.trim().is_empty() {
                s = String::from_utf8_lossy(&o.stderr).to_string();
            }
            s.lines().next().unwrap_or("").trim().to_string()
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// `key: value` from /proc/<pid>/status, in bytes (the file gives kB = KiB).
pub fn proc_status_bytes(pid: u32, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with(key) && l[key.len()..].starts_with(':'))?;
    let kb: u64 = line[key.len() + 1..].split_whitespace().next()?.parse().ok()?;
    Some(kb * 1024)
}

/// Type of the file system holding `path` (longest mount-point prefix in /proc/mounts).
pub fn fs_type(path: &Path) -> String {
    let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_dev, mnt, ty) = (f.next()?, f.next()?, f.next()?);
            path.starts_with(mnt).then(|| (mnt.len(), format!("{ty} ({mnt})")))
        })
        .max_by_key(|(n, _)| *n)
        .map(|(_, s)| s)
        .unwrap_or_else(|| "unknown".into())
}

/// Facts about the machine the benchmarks ran on.
pub struct Machine {
    pub nproc: usize,
    pub cpu: String,
    pub kernel: String,
    pub rustc: String,
    pub mosquitto: String,
    pub date: String,
    pub tmp_fs: String,
}

impl Machine {
    pub fn probe() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        Machine {
            nproc: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            cpu,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
            rustc: cmd_line("rustc", &["--version"]),
            mosquitto: which("mosquitto")
                .map(|m| cmd_line(&m.display().to_string(), &["-h"]))
                .unwrap_or_else(|| "not installed".into()),
            date: cmd_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
            tmp_fs: fs_type(&std::env::temp_dir()),
        }
    }
}

/// CPU seconds (user + system) a process has used, from `/proc/<pid>/stat`.
pub fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces), 1-based: 14 utime, 15 stime.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0) // USER_HZ is 100 on Linux
}
