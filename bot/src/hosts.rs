//! Routing chat commands to the storage host that serves their path (see
//! `storinator_shared::ops::hosts`), and `/hosts`.
//!
//! With one storage host (or none registered yet) on SQLite the bot sees that host's folders,
//! as it always did: it checks a path on its own file system (canonical, existing, inside
//! `STORINATOR_BACKUP_ROOTS`). With several, or on PostgreSQL (the database for a bot on a
//! machine of its own), a path lives on another machine: the bot checks it by text
//! (absolute, no `.` or `..`) and against the roots the hosts registered, and the host's
//! worker checks the folder itself when the job runs.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use storinator_shared::catalog::Dialect;
use storinator_shared::ops::hosts::{HostInfo, RootKind, RouteError, route, split_host};

use crate::{App, args};

/// Where a job goes: its path (canonical where the bot could resolve it) and its host
/// (`None`: any worker, no host having registered).
pub(crate) struct Routed {
    pub path: String,
    pub host: Option<String>,
    /// The host's record, when there are several hosts (its restore roots bound `to`).
    pub info: Option<HostInfo>,
}

/// Whether the hosts' folders are elsewhere than the bot's file system: with several hosts,
/// or any number on PostgreSQL.
fn remote(app: &App, hosts: &[HostInfo]) -> bool {
    hosts.len() > 1 || Dialect::of(app.jobs.pool()) == Dialect::Postgres
}

/// Routes a folder to back up (or schedule). `Err` is the text to answer with.
pub(crate) async fn backup_path(
    app: &Arc<App>,
    raw: &str,
) -> anyhow::Result<Result<Routed, String>> {
    let (named, path) = split_host(raw);
    let hosts = app.jobs.hosts().await?;
    if !remote(app, &hosts) {
        let canon = match args::check_backup_path(path, &app.cfg.backup_roots) {
            Ok(p) => p,
            Err(e) => return Ok(Err(e)),
        };
        let canon = canon
            .to_str()
            .context("backup path is not UTF-8")?
            .to_string();
        return Ok(only_host(&hosts, named, &canon).map(|host| Routed {
            path: canon,
            host,
            info: None,
        }));
    }
    let path = match args::normalize_restore_path(path) {
        Ok(p) => p,
        Err(e) => return Ok(Err(e)),
    };
    Ok(several(&hosts, named, path))
}

/// Routes a path to restore: to the host named (`web2:/srv/data` restores there, whichever
/// host made the backup: a lost server's data onto another), else by the hosts' backup
/// roots. With one host (or none registered), to it, as before hosts.
pub(crate) async fn restore_path(
    app: &Arc<App>,
    raw: &str,
) -> anyhow::Result<Result<Routed, String>> {
    let (named, path) = split_host(raw);
    let path = match args::normalize_restore_path(path) {
        Ok(p) => p,
        Err(e) => return Ok(Err(e)),
    };
    let hosts = app.jobs.hosts().await?;
    if let Some(name) = named {
        let Some(h) = hosts.iter().find(|h| h.name == name) else {
            return Ok(Err(RouteError::UnknownHost {
                host: name.to_string(),
                hosts: hosts.iter().map(|h| h.name.clone()).collect(),
            }
            .to_string()));
        };
        return Ok(Ok(Routed {
            path,
            host: Some(h.name.clone()),
            info: remote(app, &hosts).then(|| h.clone()),
        }));
    }
    Ok(match &hosts[..] {
        [] => Ok(Routed {
            path,
            host: None,
            info: None,
        }),
        [h] => Ok(Routed {
            path,
            host: Some(h.name.clone()),
            info: remote(app, &hosts).then(|| h.clone()),
        }),
        _ => several(&hosts, None, path),
    })
}

/// One host or none: the route, where a lone host that registered no backup roots takes
/// what the bot's own roots allow (a worker configured before its roots mattered).
fn only_host(
    hosts: &[HostInfo],
    named: Option<&str>,
    path: &str,
) -> Result<Option<String>, String> {
    if let [h] = hosts
        && h.backup_roots.is_empty()
        && named.is_none_or(|n| n == h.name)
    {
        return Ok(Some(h.name.clone()));
    }
    route(hosts, named, path, RootKind::Backup).map_err(|e| e.to_string())
}

fn several(hosts: &[HostInfo], named: Option<&str>, path: String) -> Result<Routed, String> {
    let host = route(hosts, named, &path, RootKind::Backup).map_err(|e| e.to_string())?;
    let info = hosts
        .iter()
        .find(|h| Some(&h.name) == host.as_ref())
        .cloned();
    Ok(Routed { path, host, info })
}

/// Checks a restore target by text against a remote host's restore roots: absolute, no `.`
/// or `..`, inside one of them. (Its worker enforces the roots again on the folder itself.)
pub(crate) fn check_remote_target(dir: &str, host: &HostInfo) -> Result<String, String> {
    let dir = args::normalize_restore_path(dir)?;
    if host.serves(RootKind::Restore, &dir) {
        Ok(dir)
    } else if host.restore_roots.is_empty() {
        Err(format!(
            "{} takes no restores from the chat (it registered no restore roots)",
            host.name
        ))
    } else {
        Err(format!(
            "{dir} is outside the folders {} may restore into ({})",
            host.name,
            host.restore_roots.join(", ")
        ))
    }
}

/// The folder an in-place restore of `path` writes into.
pub(crate) fn parent_of(path: &str) -> &str {
    Path::new(path)
        .parent()
        .and_then(|p| p.to_str())
        .unwrap_or("/")
}
