//! A private PostgreSQL server for tests: `initdb` into a temporary directory, `pg_ctl
//! start` on a free loopback port, `pg_ctl stop -m immediate` and removal on drop.
//!
//! Used by the hub's store tests, its integration tests, the end-to-end tests and the
//! benchmarks. Needs the PostgreSQL server binaries: found through
//! `BRUME_PG_BINDIR`, `pg_config --bindir` or `/usr/lib/postgresql/*/bin`
//! (`apt-get install postgresql`, or `scripts/deps.sh`).
//!
//! PostgreSQL refuses to run as root. When the tests run as root, every server command
//! runs as the `postgres` system user through `runuser`, with the directory chowned to
//! it; otherwise the commands run directly.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::free_port;

/// A running (or stopped) private PostgreSQL server, destroyed on drop.
pub struct TestPostgres {
    /// TCP port on 127.0.0.1.
    pub port: u16,
    bindir: PathBuf,
    dir: tempfile::TempDir,
    /// Run server commands as the `postgres` user (the tests run as root).
    as_postgres: bool,
    running: bool,
    /// PostgreSQL's default durability (fsync, synced initdb). Off for tests, whose data
    /// need not survive a power cut and which start many servers; on for benchmarks,
    /// whose figures must be what a real deployment gets.
    durable: bool,
}

fn find_bindir() -> PathBuf {
    if let Some(dir) = std::env::var_os("BRUME_PG_BINDIR") {
        return PathBuf::from(dir);
    }
    // pg_config may belong to libpq-dev and point at a server that is not installed, so
    // its answer counts only if initdb is really there.
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").exists() {
            return dir;
        }
    }
    // Debian layout: /usr/lib/postgresql/<major>/bin; take the newest major.
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let major = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((major, bin))
        })
        .collect();
    found.sort();
    match found.pop() {
        Some((_, bin)) => bin,
        None => panic!(
            "PostgreSQL server binaries (initdb, pg_ctl) not found: install the `postgresql` \
             package (scripts/deps.sh) or set BRUME_PG_BINDIR"
        ),
    }
}

fn id_of(flag: &str) -> u32 {
    let out = Command::new("id").args([flag, "postgres"]).output().expect("running `id`");
    assert!(out.status.success(), "running as root, but there is no `postgres` user to run PostgreSQL as");
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

impl TestPostgres {
    /// Creates a cluster (superuser `postgres`, trust authentication) and starts it, with
    /// `fsync = off`: for tests.
    pub fn start() -> TestPostgres {
        TestPostgres::start_with(false)
    }

    /// Like [`TestPostgres::start`], with PostgreSQL's default durability (fsync on,
    /// synchronous commit): for benchmarks.
    pub fn start_durable() -> TestPostgres {
        TestPostgres::start_with(true)
    }

    fn start_with(durable: bool) -> TestPostgres {
        let bindir = find_bindir();
        let dir = tempfile::Builder::new().prefix("brume-pg-").tempdir().unwrap();
        // Files we create are owned by our effective uid: 0 means root.
        let as_postgres = std::fs::metadata(dir.path()).unwrap().uid() == 0;
        if as_postgres {
            std::os::unix::fs::chown(dir.path(), Some(id_of("-u")), Some(id_of("-g"))).unwrap();
        }
        let mut pg = TestPostgres { port: free_port(), bindir, dir, as_postgres, running: false, durable };
        let data = pg.data_dir();
        let mut args: Vec<&std::ffi::OsStr> =
            vec!["-D".as_ref(), data.as_os_str(), "-A".as_ref(), "trust".as_ref(), "-U".as_ref(), "postgres".as_ref()];
        if !durable {
            // Test data does not need to survive a power cut.
            args.push("--no-sync".as_ref());
        }
        pg.run("initdb", &args);
        // The port was free when picked; another process may have taken it since. The
        // server says so in its log: pick another and try again.
        for _ in 0..5 {
            match pg.try_restart() {
                Ok(()) => return pg,
                Err(log) if log.contains("could not bind") || log.contains("already in use") => pg.port = free_port(),
                Err(log) => panic!("PostgreSQL did not start:\n{log}"),
            }
        }
        panic!("PostgreSQL found no free port in 5 attempts")
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Runs a server binary (as `postgres` when we are root); panics with its output
    /// (and the server log) on failure.
    fn run(&self, bin: &str, args: &[&std::ffi::OsStr]) -> Output {
        self.try_run(bin, args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Runs a server binary (as `postgres` when we are root); on failure, its output and
    /// the server log.
    fn try_run(&self, bin: &str, args: &[&std::ffi::OsStr]) -> Result<Output, String> {
        let exe = self.bindir.join(bin);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        let out =
            cmd.args(args).stdin(Stdio::null()).output().map_err(|e| format!("running {}: {e}", exe.display()))?;
        if !out.status.success() {
            let log = std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default();
            return Err(format!(
                "{bin} failed ({}):\n{}{}\nserver log:\n{log}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(out)
    }

    /// Starts the server (again) on the same port and data, waiting until it accepts
    /// connections.
    pub fn restart(&mut self) {
        self.try_restart().unwrap_or_else(|e| panic!("{e}"));
    }

    fn try_restart(&mut self) -> Result<(), String> {
        let data = self.data_dir();
        let log = self.dir.path().join("log");
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=50{}",
            self.port,
            self.dir.path().display(),
            if self.durable { "" } else { " -c fsync=off" }
        );
        self.try_run(
            "pg_ctl",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-l".as_ref(),
                log.as_os_str(),
                "-o".as_ref(),
                opts.as_ref(),
                "-w".as_ref(),
                "start".as_ref(),
            ],
        )?;
        self.running = true;
        Ok(())
    }

    /// Stops the server at once (no shutdown checkpoint, clients are cut off), as a
    /// crash would. [`TestPostgres::restart`] brings it back with all committed data.
    pub fn stop(&mut self) {
        let data = self.data_dir();
        self.run(
            "pg_ctl",
            &["-D".as_ref(), data.as_os_str(), "-m".as_ref(), "immediate".as_ref(), "-w".as_ref(), "stop".as_ref()],
        );
        self.running = false;
    }

    /// Creates an empty database and returns its connection URL.
    pub fn create_db(&self, name: &str) -> String {
        self.psql("postgres", &format!("CREATE DATABASE \"{name}\""));
        self.url(name)
    }

    /// Runs SQL through `psql` on `db`, returning its unaligned, tuples-only output.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let port = self.port.to_string();
        let out = self.run(
            "psql",
            &[
                "-h".as_ref(),
                "127.0.0.1".as_ref(),
                "-p".as_ref(),
                port.as_ref(),
                "-U".as_ref(),
                "postgres".as_ref(),
                "-d".as_ref(),
                db.as_ref(),
                "-At".as_ref(),
                "-v".as_ref(),
                "ON_ERROR_STOP=1".as_ref(),
                "-c".as_ref(),
                sql.as_ref(),
            ],
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Connection URL for database `db`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// The data directory's parent, which also holds the server log (`log`).
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        if self.running {
            // Best effort: a panic here would abort a test that is already unwinding.
            let data = self.data_dir();
            let exe = self.bindir.join("pg_ctl");
            let mut cmd = if self.as_postgres {
                let mut c = Command::new("runuser");
                c.args(["-u", "postgres", "--"]).arg(exe);
                c
            } else {
                Command::new(exe)
            };
            let _ = cmd
                .arg("-D")
                .arg(&data)
                .args(["-m", "immediate", "-w", "stop"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        // TempDir removes the directory after this.
    }
}
