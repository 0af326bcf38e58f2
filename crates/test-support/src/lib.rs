//! Dev-only harness shared by every test and benchmark that needs a real server: a
//! private mosquitto ([`Mosquitto`]) and a private PostgreSQL ([`TestPostgres`]) on
//! 127.0.0.1, each in its own temporary directory, stopped and removed on drop; and the
//! example WASM modules as fixtures ([`built_module`], [`with_version`]).
//!
//! Neither server can be asked to bind port 0 and report the port it got, so a port is
//! picked by binding port 0 and releasing it ([`free_port`]); another process may take
//! it in between. Both servers are therefore started with a retry: when the server says
//! the port is taken (mosquitto exits before listening, PostgreSQL logs "could not
//! bind"), a new port is picked and the start tried again.

mod modules;
mod postgres;

use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use modules::{built_module, built_module_bytes, stub_module_wat, with_version};
pub use postgres::TestPostgres;

/// Why a server could not be started (or restarted): what failed, with its log.
#[derive(Debug)]
pub struct StartError(pub String);

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StartError {}

/// How long a server may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// Attempts at a free port before giving up.
const PORT_ATTEMPTS: usize = 5;

/// A TCP port on 127.0.0.1 that was free a moment ago (bound to port 0, then released).
/// Start servers on it with a retry: see the crate documentation.
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding 127.0.0.1:0")
}

/// Finds an executable on `PATH` or in the usual system directories (mosquitto lives
/// in `/usr/sbin`, which is not on every user's `PATH`).
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .chain(["/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin", "/sbin"])
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// A private mosquitto broker on 127.0.0.1, killed on drop. Its configuration is
/// `listener PORT 127.0.0.1`, `allow_anonymous true` and what the caller adds.
pub struct Mosquitto {
    /// The broker's port on 127.0.0.1.
    pub port: u16,
    /// The running broker; `None` while stopped.
    child: Option<Child>,
    /// The configuration file, for restarts.
    conf: PathBuf,
    /// Holds the configuration, the log and any persistence file.
    dir: tempfile::TempDir,
}

impl Mosquitto {
    /// Starts mosquitto with `persistence false` and waits until it accepts connections.
    pub fn start() -> Result<Mosquitto, StartError> {
        Mosquitto::start_with(|_| "persistence false\n".into())
    }

    /// Starts mosquitto with `extra(dir)` appended to its configuration, `dir` being its
    /// private directory (for `persistence_location`), on a free port (retried if the
    /// port is taken before mosquitto binds it).
    pub fn start_with(extra: impl Fn(&Path) -> String) -> Result<Mosquitto, StartError> {
        Mosquitto::try_start(extra).map_err(StartError)
    }

    fn try_start(extra: impl Fn(&Path) -> String) -> Result<Mosquitto, String> {
        let exe = which("mosquitto").ok_or("mosquitto not found: install it (apt-get install mosquitto)")?;
        let dir = tempfile::Builder::new().prefix("brume-mosquitto-").tempdir().map_err(|e| e.to_string())?;
        let conf = dir.path().join("mosquitto.conf");
        let mut last = String::new();
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port();
            std::fs::write(&conf, format!("listener {port} 127.0.0.1\nallow_anonymous true\n{}", extra(dir.path())))
                .map_err(|e| format!("writing {}: {e}", conf.display()))?;
            let mut child = spawn(&exe, &conf, dir.path())?;
            match wait_listening(&mut child, port, dir.path()) {
                Ok(()) => return Ok(Mosquitto { port, child: Some(child), conf, dir }),
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    last = e;
                }
            }
        }
        Err(format!("mosquitto did not start in {PORT_ATTEMPTS} attempts; last: {last}"))
    }

    /// The broker's process id (0 while stopped).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// The broker's private directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Kills the broker at once (an outage): clients see their connections drop.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the broker again on the same port with the same configuration and waits
    /// until it accepts connections.
    pub fn restart(&mut self) -> Result<(), StartError> {
        assert!(self.child.is_none(), "mosquitto is still running");
        let exe = which("mosquitto").ok_or_else(|| StartError("mosquitto not found".into()))?;
        let child = self.child.insert(spawn(&exe, &self.conf, self.dir.path()).map_err(StartError)?);
        wait_listening(child, self.port, self.dir.path()).map_err(StartError)
    }
}

/// Polls `port` until it accepts connections; fails at once if the server exits (with
/// its log from `dir`).
fn wait_listening(child: &mut Child, port: u16, dir: &Path) -> Result<(), String> {
    let deadline = Instant::now() + START_TIMEOUT;
    while TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            let log = std::fs::read_to_string(dir.join("log")).unwrap_or_default();
            return Err(format!("mosquitto exited ({status}) before listening on {port}: {log}"));
        }
        if Instant::now() > deadline {
            return Err(format!("mosquitto did not listen on {port} within {START_TIMEOUT:?}"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.stop();
    }
}

fn spawn(exe: &Path, conf: &Path, dir: &Path) -> Result<Child, String> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("log"))
        .map_err(|e| format!("opening the mosquitto log: {e}"))?;
    let err = log.try_clone().map_err(|e| e.to_string())?;
    Command::new(exe)
        .arg("-c")
        .arg(conf)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("spawning {}: {e}", exe.display()))
}
