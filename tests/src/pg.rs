//! A private PostgreSQL cluster for a test: `initdb` in a temp directory, the server on a free
//! loopback port with its socket in that directory, stopped (immediate mode) when dropped. When
//! the tests run as root the server runs as the `postgres` user, which must own the directory:
//! PostgreSQL refuses to run as root.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::skip;

/// Longest `initdb` plus the server's start may take.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Attempts at starting a server, each on a newly picked free port (another process may take a
/// port between the pick and the bind).
const START_ATTEMPTS: usize = 3;
/// The superuser `initdb` creates (trust authentication on loopback and the socket only).
pub const PG_USER: &str = "outpost";

/// The directory holding `initdb`, `pg_ctl` and `postgres`: `OUTPOST_PG_BINDIR`, else
/// `pg_config --bindir`, else the newest `/usr/lib/postgresql/*/bin`.
pub fn pg_bindir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("OUTPOST_PG_BINDIR") {
        return Some(PathBuf::from(d));
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let d = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if d.join("initdb").exists() {
            return Some(d);
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|d| d.join("initdb").exists())
        .collect();
    found.sort();
    found.pop()
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// One running cluster.
pub struct PgCluster {
    bindir: PathBuf,
    data: PathBuf,
    as_postgres: bool,
    pub port: u16,
    /// The postmaster was SIGKILLed: its pid file is stale, so nothing is signalled at drop.
    killed: AtomicBool,
    _dir: tempfile::TempDir,
}

impl PgCluster {
    /// Starts a cluster, or `None` after `skip` reported that `what` was not tested (no server
    /// binaries; under CI, `skip` fails the test instead).
    pub fn start(what: &str) -> Result<Option<PgCluster>> {
        let Some(bindir) = pg_bindir() else {
            skip(
                what,
                "needs the PostgreSQL server binaries (Debian package `postgresql`; `bash .ci/test` \
                 installs it)",
            );
            return Ok(None);
        };
        PgCluster::start_in(bindir).map(Some)
    }

    fn start_in(bindir: PathBuf) -> Result<PgCluster> {
        let dir = tempfile::Builder::new().prefix("outpost-pg").tempdir()?;
        let as_postgres = running_as_root();
        if as_postgres {
            // The server's user must reach the directory and own its data directory.
            chown_postgres(dir.path())?;
        }
        let data = dir.path().join("data");
        let port = free_port()?;
        let mut c = PgCluster {
            bindir,
            data,
            as_postgres,
            port,
            killed: AtomicBool::new(false),
            _dir: dir,
        };
        let out = c
            .command("initdb")
            .args([
                "-A",
                "trust",
                "-U",
                PG_USER,
                "-E",
                "UTF8",
                "--no-sync",
                "-D",
            ])
            .arg(&c.data)
            .output()
            .context("running initdb")?;
        if !out.status.success() {
            bail!(
                "initdb failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        c.start_on_a_free_port()?;
        Ok(c)
    }

    fn start_on_a_free_port(&mut self) -> Result<()> {
        let mut last = None;
        for _ in 0..START_ATTEMPTS {
            match self.pg_ctl_start() {
                Ok(()) => return Ok(()),
                Err(e) => {
                    last = Some(e);
                    self.port = free_port()?;
                }
            }
        }
        Err(last.expect("at least one attempt"))
    }

    fn command(&self, tool: &str) -> Command {
        let path = self.bindir.join(tool);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        };
        cmd.stdin(Stdio::null());
        cmd
    }

    fn socket_dir(&self) -> PathBuf {
        self.data.parent().expect("data has a parent").to_path_buf()
    }

    fn pg_ctl_start(&self) -> Result<()> {
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c max_connections=200 \
             -c shared_buffers=128MB -c fsync=on -c synchronous_commit=on",
            self.port,
            self.socket_dir().display()
        );
        let log = self.socket_dir().join("server.log");
        let out = self
            .command("pg_ctl")
            .args(["-w", "-t", &START_TIMEOUT.as_secs().to_string(), "-D"])
            .arg(&self.data)
            .arg("-l")
            .arg(&log)
            .args(["-o", &opts, "start"])
            .output()
            .context("running pg_ctl start")?;
        if !out.status.success() {
            bail!(
                "pg_ctl start failed: {}{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        Ok(())
    }

    /// A libpq URL for the `postgres` database on this cluster.
    pub fn url(&self) -> String {
        self.url_for("postgres")
    }

    pub fn url_for(&self, db: &str) -> String {
        format!("postgresql://{PG_USER}@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates database `db` with `createdb`; returns its URL.
    pub fn create_db(&self, db: &str) -> Result<String> {
        let out = self
            .command("createdb")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                PG_USER,
                db,
            ])
            .output()
            .context("running createdb")?;
        if !out.status.success() {
            bail!("createdb {db}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(self.url_for(db))
    }

    /// A streaming standby of `primary` (`pg_basebackup -R -X stream -c fast`), started on its
    /// own port. Make it synchronous on the primary with `synchronous_standby_names` once it
    /// runs.
    pub fn standby_of(primary: &PgCluster) -> Result<PgCluster> {
        let dir = tempfile::Builder::new().prefix("outpost-pg").tempdir()?;
        if primary.as_postgres {
            chown_postgres(dir.path())?;
        }
        let mut c = PgCluster {
            bindir: primary.bindir.clone(),
            data: dir.path().join("data"),
            as_postgres: primary.as_postgres,
            port: free_port()?,
            killed: AtomicBool::new(false),
            _dir: dir,
        };
        let out = c
            .command("pg_basebackup")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &primary.port.to_string(),
                "-U",
                PG_USER,
            ])
            .args(["-R", "-X", "stream", "-c", "fast", "--no-sync", "-D"])
            .arg(&c.data)
            .output()
            .context("running pg_basebackup")?;
        if !out.status.success() {
            bail!(
                "pg_basebackup failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        c.start_on_a_free_port()?;
        Ok(c)
    }

    /// SIGKILL of the postmaster (its children notice and exit): the machine is gone.
    pub fn kill9(&self) -> Result<()> {
        let pid_file = std::fs::read_to_string(self.data.join("postmaster.pid"))
            .context("reading postmaster.pid")?;
        let pid = pid_file
            .lines()
            .next()
            .context("postmaster.pid is empty")?
            .trim();
        let st = Command::new("kill").args(["-9", pid]).status()?;
        if !st.success() {
            bail!("kill -9 {pid} failed");
        }
        self.killed.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Promotes a standby to primary (`pg_ctl promote`, waiting for it).
    pub fn promote(&self) -> Result<()> {
        let out = self
            .command("pg_ctl")
            .args(["-w", "-D"])
            .arg(&self.data)
            .arg("promote")
            .output()?;
        if !out.status.success() {
            bail!("pg_ctl promote: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// Stops the server at once (no checkpoint), as a crash would.
    pub fn stop_immediate(&self) -> Result<()> {
        let out = self
            .command("pg_ctl")
            .args(["-D"])
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "stop"])
            .output()?;
        if !out.status.success() {
            bail!("pg_ctl stop: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// Starts the server again after `stop_immediate` (it recovers from its WAL).
    pub fn restart(&self) -> Result<()> {
        self.pg_ctl_start()
    }

    pub fn data_dir(&self) -> &Path {
        &self.data
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if self.killed.load(Ordering::Relaxed) {
            return;
        }
        let _ = self
            .command("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "-t", "10", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn chown_postgres(dir: &Path) -> Result<()> {
    let st = Command::new("chown")
        .arg("postgres:postgres")
        .arg(dir)
        .status()
        .context("chown")?;
    if !st.success() {
        bail!(
            "chown postgres {} failed (is there a `postgres` user?)",
            dir.display()
        );
    }
    Ok(())
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}
