//! A throwaway PostgreSQL server for tests: a fresh cluster made with the system's own
//! PostgreSQL binaries (`initdb`, `pg_ctl`) in a temporary folder, listening on a free port of
//! 127.0.0.1 only, stopped and deleted when the [`PgCluster`] is dropped.
//!
//! A machine without the server binaries gets [`PgError::NotInstalled`], whose message says
//! what to install: a test that needs PostgreSQL fails loudly rather than passing without it.
//!
//! PostgreSQL refuses to run as root, so under root (CI containers) the cluster's folder is
//! handed to the `postgres` system user that Debian's package creates, and the server runs as
//! that user.
//!
//! A test process killed with SIGKILL can't stop its server. Each cluster's folder records
//! the pid of the process that made it; the next [`PgCluster::start`] on the machine stops and
//! deletes clusters whose maker is gone.

use std::ffi::OsStr;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use nix::unistd::{Gid, Uid, User};

/// Folders of clusters made by this module start with this, in the system's temp folder.
const PREFIX: &str = "storinator-pg-";
/// The superuser of every throwaway cluster (trust authentication on 127.0.0.1).
pub const USER: &str = "storinator";

#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error(
        "the PostgreSQL server binaries (initdb, pg_ctl) were not found; the tests that use PostgreSQL need them\n\
         hint: install them (Debian: `apt-get install postgresql`), or point STORINATOR_PG_BIN at the folder holding initdb"
    )]
    NotInstalled,
    #[error(
        "running as root, and there is no `postgres` user to run the server as\nhint: install Debian's postgresql package, which creates it"
    )]
    NoServerUser,
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}):\n{output}")]
    Command {
        command: String,
        status: String,
        output: String,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> PgError {
    let what = what.into();
    move |source| PgError::Io { what, source }
}

/// A running throwaway cluster. Dropping it stops the server and deletes its folder.
pub struct PgCluster {
    dir: Option<tempfile::TempDir>,
    bin: PathBuf,
    run_as: Option<(Uid, Gid)>,
    port: u16,
}

impl PgCluster {
    /// Makes and starts a new cluster (about a second: `initdb` without fsync).
    pub fn start() -> Result<Self, PgError> {
        let bin = find_binaries()?;
        let run_as = server_user()?;
        reap_orphans(&bin, run_as);
        let dir = tempfile::Builder::new()
            .prefix(PREFIX)
            .tempdir()
            .map_err(io("making the cluster's folder"))?;
        std::fs::write(dir.path().join("owner.pid"), std::process::id().to_string())
            .map_err(io("recording the cluster's owner"))?;
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(dir.path(), Some(uid.as_raw()), Some(gid.as_raw()))
                .map_err(io("handing the cluster's folder to postgres"))?;
        }
        let mut cluster = PgCluster {
            dir: Some(dir),
            bin,
            run_as,
            port: 0,
        };
        cluster.init()?;
        // The port is free when asked for, but another process may take it before the server
        // binds it: try a few.
        let mut last = None;
        for _ in 0..5 {
            cluster.port = free_port()?;
            match cluster.pg_ctl_start() {
                Ok(()) => return Ok(cluster),
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("tried at least once"))
    }

    /// The cluster's folder.
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().expect("present until drop").path()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of database `name` (`postgres` always exists; see [`PgCluster::create_database`]).
    pub fn url(&self, name: &str) -> String {
        format!("postgres://{USER}@127.0.0.1:{}/{name}", self.port)
    }

    /// Creates an empty database `name` and returns its URL: one per test keeps tests sharing
    /// a cluster apart.
    pub fn create_database(&self, name: &str) -> Result<String, PgError> {
        self.createdb(name, None)
    }

    /// Creates database `name` as a copy of database `template` (`CREATE DATABASE … TEMPLATE`)
    /// and returns its URL: a snapshot of a catalog, as copying a SQLite file is. PostgreSQL
    /// refuses while another session is connected to `template` (it waits a few seconds for
    /// sessions that are closing).
    pub fn create_database_from(&self, name: &str, template: &str) -> Result<String, PgError> {
        self.createdb(name, Some(template))
    }

    fn createdb(&self, name: &str, template: Option<&str>) -> Result<String, PgError> {
        let port = self.port.to_string();
        let mut args = vec!["-h", "127.0.0.1", "-p", &port, "-U", USER];
        if let Some(template) = template {
            args.extend(["-T", template]);
        }
        args.push(name);
        self.run("createdb", args)?;
        Ok(self.url(name))
    }

    fn data(&self) -> PathBuf {
        self.dir().join("data")
    }

    fn init(&self) -> Result<(), PgError> {
        let data = self.data();
        self.run(
            "initdb",
            [
                OsStr::new("-D"),
                data.as_os_str(),
                OsStr::new("-U"),
                OsStr::new(USER),
                OsStr::new("--auth=trust"),
                OsStr::new("--encoding=UTF8"),
                OsStr::new("--locale=C"),
                OsStr::new("--no-sync"),
            ],
        )
        .map(drop)
    }

    fn pg_ctl_start(&self) -> Result<(), PgError> {
        let data = self.data();
        let log = self.dir().join("server.log");
        // Only 127.0.0.1, the socket in our own folder, and no fsync: a test cluster holds
        // nothing worth a durable write.
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=off -c synchronous_commit=off -c full_page_writes=off",
            self.port,
            self.dir().display()
        );
        self.run(
            "pg_ctl",
            [
                OsStr::new("start"),
                OsStr::new("-w"),
                OsStr::new("-t"),
                OsStr::new("30"),
                OsStr::new("-D"),
                data.as_os_str(),
                OsStr::new("-l"),
                log.as_os_str(),
                OsStr::new("-o"),
                OsStr::new(&options),
            ],
        )
        .map(drop)
        .map_err(|e| match e {
            PgError::Command {
                command,
                status,
                output,
            } => PgError::Command {
                command,
                status,
                output: format!(
                    "{output}\nserver log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                ),
            },
            e => e,
        })
    }

    fn run<I, S>(&self, tool: &str, args: I) -> Result<Output, PgError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        run_tool(&self.bin, self.run_as, tool, args)
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        stop_server(&self.bin, self.run_as, &self.data());
        if let Some(dir) = self.dir.take() {
            let _ = dir.close();
        }
    }
}

/// Stops the server of cluster folder `data`, if one runs there (nothing worth a clean
/// shutdown is in a throwaway cluster).
fn stop_server(bin: &Path, run_as: Option<(Uid, Gid)>, data: &Path) {
    if data.join("postmaster.pid").exists() {
        let _ = run_tool(
            bin,
            run_as,
            "pg_ctl",
            [
                OsStr::new("stop"),
                OsStr::new("-m"),
                OsStr::new("immediate"),
                OsStr::new("-w"),
                OsStr::new("-D"),
                data.as_os_str(),
            ],
        );
    }
}

fn run_tool<I, S>(
    bin: &Path,
    run_as: Option<(Uid, Gid)>,
    tool: &str,
    args: I,
) -> Result<Output, PgError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    use std::os::unix::process::CommandExt;
    let path = bin.join(tool);
    let mut cmd = Command::new(&path);
    cmd.args(args).current_dir("/");
    if let Some((uid, gid)) = run_as {
        cmd.uid(uid.as_raw()).gid(gid.as_raw());
    }
    let out = cmd
        .output()
        .map_err(io(format!("running {}", path.display())))?;
    if out.status.success() {
        return Ok(out);
    }
    Err(PgError::Command {
        command: format!("{tool} {:?}", cmd.get_args().collect::<Vec<_>>()),
        status: out.status.to_string(),
        output: format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    })
}

/// The folder holding `initdb` and `pg_ctl`: `STORINATOR_PG_BIN`, else `pg_config
/// --bindir`, else the newest `/usr/lib/postgresql/<version>/bin` (Debian keeps the server
/// binaries off `PATH`).
fn find_binaries() -> Result<PathBuf, PgError> {
    find_binaries_from(std::env::var_os("STORINATOR_PG_BIN"))
}

fn find_binaries_from(configured: Option<std::ffi::OsString>) -> Result<PathBuf, PgError> {
    let has_server = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
    if let Some(dir) = configured {
        let dir = PathBuf::from(dir);
        return if has_server(&dir) {
            Ok(dir)
        } else {
            Err(PgError::NotInstalled)
        };
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && has_server(&dir) {
            return Ok(dir);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            Some((version, e.path().join("bin")))
        })
        .filter(|(_, dir)| has_server(dir))
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, dir)| dir)
        .ok_or(PgError::NotInstalled)
}

/// Under root, the `postgres` user (the server refuses root); otherwise ourselves.
fn server_user() -> Result<Option<(Uid, Gid)>, PgError> {
    if !Uid::effective().is_root() {
        return Ok(None);
    }
    match User::from_name("postgres") {
        Ok(Some(u)) => Ok(Some((u.uid, u.gid))),
        _ => Err(PgError::NoServerUser),
    }
}

fn free_port() -> Result<u16, PgError> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(io("finding a free port"))?;
    Ok(l.local_addr().map_err(io("finding a free port"))?.port())
}

/// Stops and deletes clusters left by test processes that died without dropping them.
fn reap_orphans(bin: &Path, run_as: Option<(Uid, Gid)>) {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        if !name.to_string_lossy().starts_with(PREFIX) {
            continue;
        }
        let dir = e.path();
        let owner = std::fs::read_to_string(dir.join("owner.pid"))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok());
        let alive = owner
            .and_then(rustix::process::Pid::from_raw)
            .is_some_and(|pid| rustix::process::test_kill_process(pid).is_ok());
        // No owner file yet may be a cluster being made right now: leave it.
        if owner.is_none() || alive {
            continue;
        }
        stop_server(bin, run_as, &dir.join("data"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_folder_without_the_server_is_not_installed_with_a_hint() {
        let empty = tempfile::tempdir().unwrap();
        let e = find_binaries_from(Some(empty.path().into())).unwrap_err();
        assert!(matches!(e, PgError::NotInstalled), "{e:?}");
        let msg = e.to_string();
        assert!(msg.contains("initdb"), "{msg}");
        assert!(msg.contains("apt-get install postgresql"), "{msg}");
    }
}
