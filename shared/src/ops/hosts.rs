//! Storage hosts: several servers behind one bot, sharing one job database.
//!
//! Every worker registers its host name (`STORINATOR_HOST`, default the machine's hostname)
//! and the roots it serves, and renews a heartbeat (`last_seen`) while it runs; several
//! workers may serve one host. The bot routes `/backup`, `/restore` and `/schedule` by those
//! roots ([`route`]): a path one host serves goes to that host, a path two hosts serve needs
//! the `host:` prefix (`web1:/srv/data`), a path no host serves is refused naming the hosts.
//! A routed job carries its host and only that host's workers claim it
//! ([`Jobs::claim_on`](super::jobs::Jobs::claim_on)); a job without a host (queued before
//! hosts existed, or repository-wide work such as verify, scrub, prune) is claimed by any
//! worker.
//!
//! The SQL here is plain enough to port to PostgreSQL: upserts with `ON CONFLICT`, no
//! SQLite-only functions.

use std::collections::BTreeMap;
use std::path::Path;

use sqlx::Row;

use super::jobs::{Jobs, Result};

pub use crate::config::{MAX_HOST_NAME, check_host_name};

/// Splits a `host:/path` argument into its host and its path. Anything else (a plain path,
/// or text before a `:` that is not a host name) is all path.
pub fn split_host(raw: &str) -> (Option<&str>, &str) {
    match raw.split_once(':') {
        Some((host, path)) if path.starts_with('/') && check_host_name(host).is_ok() => {
            (Some(host), path)
        }
        _ => (None, raw),
    }
}

/// What a root is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RootKind {
    /// A folder `/backup` may name (with everything below it); `/restore` of a backed-up
    /// path is routed by these too.
    Backup,
    /// A folder a chat restore may write into.
    Restore,
}

impl RootKind {
    fn as_str(self) -> &'static str {
        match self {
            RootKind::Backup => "backup",
            RootKind::Restore => "restore",
        }
    }
}

/// A registered host, as `/hosts` shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct HostInfo {
    pub name: String,
    pub backup_roots: Vec<String>,
    pub restore_roots: Vec<String>,
    pub registered_at: i64,
    /// The newest heartbeat of any of its workers (Unix milliseconds).
    pub last_seen: i64,
}

impl HostInfo {
    pub fn roots(&self, kind: RootKind) -> &[String] {
        match kind {
            RootKind::Backup => &self.backup_roots,
            RootKind::Restore => &self.restore_roots,
        }
    }

    /// Whether one of its `kind` roots holds `path` (both absolute; compared by component).
    pub fn serves(&self, kind: RootKind, path: &str) -> bool {
        self.roots(kind)
            .iter()
            .any(|r| Path::new(path).starts_with(Path::new(r)))
    }
}

/// When a host was last seen, as `/hosts` and `storinator-worker hosts` say it.
pub fn seen_ago(now_ms: i64, last_seen: i64) -> String {
    let s = (now_ms - last_seen).max(0) / 1000;
    match s {
        0..60 => format!("{s} s ago"),
        60..3_600 => format!("{} min ago", s / 60),
        3_600..86_400 => format!("{} h ago", s / 3_600),
        _ => format!("{} days ago", s / 86_400),
    }
}

/// What a worker registers for its host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registration {
    pub name: String,
    /// Canonical backup roots (`STORINATOR_BACKUP_ROOTS`).
    pub backup_roots: Vec<String>,
    /// Canonical restore roots (`STORINATOR_RESTORE_ROOTS`).
    pub restore_roots: Vec<String>,
}

impl Jobs {
    /// Registers (or re-registers) a host with the roots it serves, and marks it seen now.
    /// The roots replace the ones registered before, in one transaction. When this is the
    /// only host there is, backup schedules that have no host yet (made before hosts existed)
    /// become its own, so they keep running here when a second host joins.
    pub async fn register_host(&self, r: &Registration) -> Result<()> {
        let now = self.now_ms();
        // Read-then-write: take the write lock first (a deferred transaction could fail to
        // upgrade its read lock under a concurrent writer).
        let mut tx = crate::catalog::begin_write(self.pool()).await?;
        sqlx::query(
            "INSERT INTO hosts (name, registered_at, last_seen) VALUES ($1, $2, $3)
             ON CONFLICT (name) DO UPDATE SET last_seen = excluded.last_seen",
        )
        .bind(&r.name)
        .bind(now)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM host_roots WHERE host = $1")
            .bind(&r.name)
            .execute(&mut *tx)
            .await?;
        for (kind, roots) in [
            (RootKind::Backup, &r.backup_roots),
            (RootKind::Restore, &r.restore_roots),
        ] {
            for root in roots {
                sqlx::query(
                    "INSERT INTO host_roots (host, kind, path) VALUES ($1, $2, $3)
                     ON CONFLICT (host, kind, path) DO NOTHING",
                )
                .bind(&r.name)
                .bind(kind.as_str())
                .bind(root)
                .execute(&mut *tx)
                .await?;
            }
        }
        sqlx::query(
            "UPDATE schedules SET host = $1 WHERE host IS NULL AND kind = 'backup'
               AND NOT EXISTS (SELECT 1 FROM hosts WHERE name <> $2)",
        )
        .bind(&r.name)
        .bind(&r.name)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Renews a host's heartbeat. False when the host is not registered (someone removed
    /// it): the worker registers again.
    pub async fn host_heartbeat(&self, name: &str) -> Result<bool> {
        let done = sqlx::query("UPDATE hosts SET last_seen = $1 WHERE name = $2")
            .bind(self.now_ms())
            .bind(name)
            .execute(self.pool())
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Removes a host that is gone for good (renamed, retired), with its roots, so that its
    /// folders stop being routed to it. Refused while it has queued or running jobs (they
    /// would wait for it forever: cancel them first). A worker of that host still running
    /// registers it again at its next heartbeat. Returns whether the host existed.
    pub async fn forget_host(&self, name: &str) -> std::result::Result<bool, ForgetHostError> {
        let mut tx = crate::catalog::begin_write(self.pool()).await?;
        let pending: Vec<i64> = sqlx::query_scalar(
            "SELECT id FROM jobs WHERE host = $1 AND state IN ('queued', 'running') ORDER BY id",
        )
        .bind(name)
        .fetch_all(&mut *tx)
        .await?;
        if !pending.is_empty() {
            return Err(ForgetHostError::Busy {
                host: name.to_string(),
                jobs: pending,
            });
        }
        sqlx::query("DELETE FROM host_roots WHERE host = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        let gone = sqlx::query("DELETE FROM hosts WHERE name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tx.commit().await?;
        Ok(gone == 1)
    }

    /// Every registered host with its roots, by name. One query: the bot's `/hosts`, its
    /// routing and the CLI's `hosts` all read this.
    pub async fn hosts(&self) -> Result<Vec<HostInfo>> {
        let rows = sqlx::query(
            "SELECT h.name, h.registered_at, h.last_seen, r.kind, r.path
               FROM hosts h LEFT JOIN host_roots r ON r.host = h.name
              ORDER BY h.name, r.kind, r.path",
        )
        .fetch_all(self.pool())
        .await?;
        let mut hosts: BTreeMap<String, HostInfo> = BTreeMap::new();
        for row in &rows {
            let name: String = row.try_get("name")?;
            let host = hosts.entry(name.clone()).or_insert_with(|| HostInfo {
                name,
                backup_roots: Vec::new(),
                restore_roots: Vec::new(),
                registered_at: 0,
                last_seen: 0,
            });
            host.registered_at = row.try_get("registered_at")?;
            host.last_seen = row.try_get("last_seen")?;
            let path: Option<String> = row.try_get("path")?;
            match (row.try_get::<Option<String>, _>("kind")?.as_deref(), path) {
                (Some("backup"), Some(p)) => host.backup_roots.push(p),
                (Some("restore"), Some(p)) => host.restore_roots.push(p),
                _ => {}
            }
        }
        Ok(hosts.into_values().collect())
    }
}

/// Why a host could not be forgotten.
#[derive(Debug, thiserror::Error)]
pub enum ForgetHostError {
    #[error(
        "host {host} still has {} queued or running (#{})\nhint: cancel them first (/cancel <id>), or let them finish",
        crate::progress::plural(.jobs.len() as u64, "job", "jobs"),
        .jobs.iter().map(|j| j.to_string()).collect::<Vec<_>>().join(", #")
    )]
    Busy { host: String, jobs: Vec<i64> },
    #[error("hosts: {0}")]
    Db(#[from] sqlx::Error),
}

/// Why a path could not be routed to a host. The texts name the path and the hosts.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// `host:` named a host that never registered.
    #[error("no storage host is called {host} (known: {})", names(.hosts))]
    UnknownHost { host: String, hosts: Vec<String> },
    /// No host (or not the one named) serves the path.
    #[error("{}", not_served(.path, .host.as_deref(), .hosts))]
    NotServed {
        path: String,
        host: Option<String>,
        /// Every host with its roots of the kind asked about.
        hosts: Vec<(String, Vec<String>)>,
    },
    /// Several hosts serve the path and none was named.
    #[error("{path} is on {} hosts: {}\nhint: say which, like {}:{path}", .candidates.len(), .candidates.join(", "), .candidates[0])]
    Ambiguous {
        path: String,
        candidates: Vec<String>,
    },
}

fn names(hosts: &[String]) -> String {
    if hosts.is_empty() {
        "none registered yet".into()
    } else {
        hosts.join(", ")
    }
}

fn not_served(path: &str, host: Option<&str>, hosts: &[(String, Vec<String>)]) -> String {
    let listed = hosts
        .iter()
        .map(|(name, roots)| {
            if roots.is_empty() {
                format!("{name} (no folders)")
            } else {
                format!("{name} ({})", roots.join(", "))
            }
        })
        .collect::<Vec<_>>()
        .join("; ");
    match host {
        Some(h) => format!("{h} does not serve {path}\nhint: hosts and their folders: {listed}"),
        None => format!("no storage host serves {path}\nhint: hosts and their folders: {listed}"),
    }
}

/// The host that runs work on `path`, by the hosts' `kind` roots: the host named by `host`
/// (it must serve the path), else the one host that serves it. `Ok(None)` when no host has
/// registered at all (an installation from before hosts, or whose worker never started): the
/// job is left to any worker.
pub fn route(
    hosts: &[HostInfo],
    host: Option<&str>,
    path: &str,
    kind: RootKind,
) -> std::result::Result<Option<String>, RouteError> {
    if hosts.is_empty() && host.is_none() {
        return Ok(None);
    }
    let not_served = |host: Option<&str>| RouteError::NotServed {
        path: path.to_string(),
        host: host.map(str::to_string),
        hosts: hosts
            .iter()
            .map(|h| (h.name.clone(), h.roots(kind).to_vec()))
            .collect(),
    };
    if let Some(name) = host {
        let Some(h) = hosts.iter().find(|h| h.name == name) else {
            return Err(RouteError::UnknownHost {
                host: name.to_string(),
                hosts: hosts.iter().map(|h| h.name.clone()).collect(),
            });
        };
        return if h.serves(kind, path) {
            Ok(Some(h.name.clone()))
        } else {
            Err(not_served(Some(name)))
        };
    }
    let candidates: Vec<String> = hosts
        .iter()
        .filter(|h| h.serves(kind, path))
        .map(|h| h.name.clone())
        .collect();
    match candidates.len() {
        0 => Err(not_served(None)),
        1 => Ok(candidates.into_iter().next()),
        _ => Err(RouteError::Ambiguous {
            path: path.to_string(),
            candidates,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str, roots: &[&str]) -> HostInfo {
        HostInfo {
            name: name.into(),
            backup_roots: roots.iter().map(|r| r.to_string()).collect(),
            restore_roots: vec![],
            registered_at: 0,
            last_seen: 0,
        }
    }

    #[test]
    fn host_prefixes_are_split_only_when_they_are_host_names() {
        assert_eq!(split_host("web1:/srv/data"), (Some("web1"), "/srv/data"));
        assert_eq!(
            split_host("db.example.org:/var/x"),
            (Some("db.example.org"), "/var/x")
        );
        assert_eq!(split_host("/srv/a:b"), (None, "/srv/a:b"));
        assert_eq!(split_host("/srv/data"), (None, "/srv/data"));
        assert_eq!(split_host("web1:srv"), (None, "web1:srv"));
        assert_eq!(split_host("-x:/srv"), (None, "-x:/srv"));
        assert!(check_host_name("").is_err());
        assert!(check_host_name("a b").unwrap_err().contains("\"a b\""));
        assert!(check_host_name(&"a".repeat(254)).is_err());
        assert!(check_host_name("web-1_a.lan").is_ok());
    }

    #[test]
    fn routing_one_host_two_hosts_a_prefix_and_an_unknown_path() {
        let hosts = [
            host("web1", &["/srv", "/home"]),
            host("web2", &["/srv/data", "/opt"]),
        ];
        let r = |h: Option<&str>, p: &str| route(&hosts, h, p, RootKind::Backup);
        // One host serves it: that host, without asking.
        assert_eq!(r(None, "/home/ann").unwrap().as_deref(), Some("web1"));
        assert_eq!(r(None, "/opt").unwrap().as_deref(), Some("web2"));
        // By component, not by text: /srvx is not under /srv.
        assert!(matches!(
            r(None, "/srvx"),
            Err(RouteError::NotServed { .. })
        ));
        // Two hosts serve it: ambiguous, naming both and showing the prefix form.
        let e = r(None, "/srv/data/photos").unwrap_err();
        assert_eq!(
            e,
            RouteError::Ambiguous {
                path: "/srv/data/photos".into(),
                candidates: vec!["web1".into(), "web2".into()],
            }
        );
        assert_eq!(
            e.to_string(),
            "/srv/data/photos is on 2 hosts: web1, web2\nhint: say which, like web1:/srv/data/photos"
        );
        // The prefix decides.
        assert_eq!(
            r(Some("web2"), "/srv/data/photos").unwrap().as_deref(),
            Some("web2")
        );
        assert_eq!(
            r(Some("web1"), "/srv/data").unwrap().as_deref(),
            Some("web1")
        );
        // A named host that does not serve it, or does not exist.
        let e = r(Some("web2"), "/home/ann").unwrap_err().to_string();
        assert!(e.starts_with("web2 does not serve /home/ann"), "{e}");
        let e = r(Some("web3"), "/srv").unwrap_err().to_string();
        assert_eq!(e, "no storage host is called web3 (known: web1, web2)");
        // Nobody serves it: the path and every host with its folders.
        let e = r(None, "/var/lib").unwrap_err().to_string();
        assert_eq!(
            e,
            "no storage host serves /var/lib\nhint: hosts and their folders: web1 (/srv, /home); web2 (/srv/data, /opt)"
        );
        // No host registered: any worker (an installation from before hosts).
        assert_eq!(route(&[], None, "/srv", RootKind::Backup).unwrap(), None);
        assert!(matches!(
            route(&[], Some("web1"), "/srv", RootKind::Backup),
            Err(RouteError::UnknownHost { .. })
        ));
    }
}
