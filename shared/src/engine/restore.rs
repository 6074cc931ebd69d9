//! The restore engine: resolve a path in a snapshot, check the target, fetch only the needed
//! ranges, verify and decrypt, write each file under a temporary name and rename it only once
//! its SHA-256 matches (invariant 3); never write outside the target (invariant 4): everything
//! is created, renamed, chmod'ed and touched through directory handles opened beneath the
//! target that never follow symlinks (see `target`).

use std::collections::{HashMap, VecDeque};
use std::ffi::OsStr;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rustix::fs::{AtFlags, OFlags};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::repo::Repo;
use super::target::{self, Target};
use crate::catalog::{Catalog, ChunkLoc, EntryKind, EntryOutline, EntryRow, Owner, SnapshotInfo};
use crate::error::Error;
use crate::format::crypto::{ChunkId, Keys};
use crate::format::keyring::KeyRing;
use crate::format::pack::MAX_BLOB;
use crate::progress::{CancelFlag, Counters, Phase, Progress};
use crate::storage::{ObjectRef, Storage, with_retry};

/// What to restore, and where.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RestoreOptions {
    /// A path as it was backed up (`/srv/data/photos`), or starting at the root's name
    /// (`data/photos`).
    pub path: String,
    /// The selected item is restored as `<to>/<its name>`.
    pub to: PathBuf,
    /// Snapshot id (or a unique prefix); the latest snapshot of the root when absent.
    pub snapshot: Option<String>,
    pub owner: String,
    /// Replace existing files that differ (otherwise the restore refuses before writing).
    pub overwrite: bool,
    /// Jobs from the chat: `to` must lie in one of these folders (the worker's restore
    /// roots), checked on the directory handle the restore writes through. `None`: the CLI,
    /// whose operator names any folder.
    #[serde(default)]
    pub within: Option<Vec<PathBuf>>,
    /// Restore the recorded owners (default: when running as root, like tar). Without them,
    /// setuid and setgid bits are not restored either.
    #[serde(default)]
    pub same_owner: Option<bool>,
}

/// The outcome of a restore.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RestoreSummary {
    pub snapshot: SnapshotInfo,
    pub target: PathBuf,
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub bytes: u64,
    /// Files already present with the right content, left untouched.
    pub unchanged: u64,
    pub duration_ms: u64,
    /// What was restored differently from the backup (setuid/setgid bits left out, ...).
    #[serde(default)]
    pub warnings: Vec<String>,
    /// Temporary files of an interrupted restore into this target, removed first.
    #[serde(default)]
    pub removed_temp: Vec<PathBuf>,
}

impl RestoreSummary {
    pub fn line(&self) -> String {
        format!(
            "restored {} ({}), {}, {} from snapshot {} into {}{} in {:.1}s",
            crate::progress::plural(self.files, "file", "files"),
            crate::progress::human_bytes(self.bytes),
            crate::progress::plural(self.dirs, "dir", "dirs"),
            crate::progress::plural(self.symlinks, "symlink", "symlinks"),
            self.snapshot.short_id,
            self.target.display(),
            if self.unchanged > 0 {
                format!(" ({} already up to date)", self.unchanged)
            } else {
                String::new()
            },
            self.duration_ms as f64 / 1000.0
        )
    }

    /// Lines for a person about what was cleaned up or restored differently.
    pub fn notes(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.removed_temp.is_empty() {
            out.push(format!(
                "removed {} temporary file(s) left by an interrupted restore: {}",
                self.removed_temp.len(),
                self.removed_temp
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        out.extend(self.warnings.iter().map(|w| format!("warning: {w}")));
        out
    }
}

/// A path resolved to a snapshot and an entry prefix.
#[derive(Clone, Debug)]
pub struct Resolved {
    pub root_id: i64,
    pub snapshot: SnapshotInfo,
    /// Entry path of the selected item (`data/photos`).
    pub prefix: String,
}

/// Finds the snapshot and entry prefix that `path` names for `owner`. Needs no key: the bot's
/// queries and the CLI's resolve paths through this one function.
pub async fn resolve(
    catalog: &Catalog,
    owner: &str,
    path: &str,
    snapshot: Option<&str>,
) -> Result<Resolved, Error> {
    let path = normalize(path).ok_or_else(|| Error::Invalid(format!("invalid path {path:?}")))?;
    let roots = catalog.roots(owner).await?;
    let pinned = match snapshot {
        Some(id) => Some(catalog.snapshot_by_id(owner, id).await?.ok_or_else(|| {
            Error::NotFound(format!("no snapshot {id:?}\nhint: `snapshots` lists them"))
        })?),
        None => None,
    };
    // Candidate roots: the pinned snapshot's, or all of the owner's.
    let candidates: Vec<(i64, String)> = match &pinned {
        Some((root_id, info)) => vec![(*root_id, info.root.clone())],
        None => roots,
    };
    let mut best: Option<(i64, String, String)> = None;
    for (id, root) in candidates {
        let name = Path::new(&root)
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("root")
            .to_string();
        let rest = if path.starts_with('/') {
            strip_dir_prefix(&path, &root)
        } else {
            strip_dir_prefix(&path, &name)
        };
        if let Some(rest) = rest {
            let prefix = if rest.is_empty() {
                name.clone()
            } else {
                format!("{name}/{rest}")
            };
            let better = best.as_ref().is_none_or(|(_, r, _)| root.len() > r.len());
            if better {
                best = Some((id, root, prefix));
            }
        }
    }
    let (root_id, root, prefix) = best.ok_or_else(|| {
        Error::NotFound(format!(
            "{path} is not in any backup\nhint: `snapshots` lists what was backed up"
        ))
    })?;
    let snapshot = match pinned {
        Some((_, info)) => info,
        None => {
            let all = catalog.snapshots(owner, Some(&root)).await?;
            all.into_iter()
                .max_by_key(|s| s.seq)
                .ok_or_else(|| Error::NotFound(format!("no snapshot of {root}")))?
        }
    };
    Ok(Resolved {
        root_id,
        snapshot,
        prefix,
    })
}

/// Lexically normalizes a user path: no `.`, `..` handled, no trailing slash.
fn normalize(path: &str) -> Option<String> {
    let absolute = path.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            c => parts.push(c),
        }
    }
    if parts.is_empty() && !absolute {
        return None;
    }
    Some(if absolute {
        format!("/{}", parts.join("/"))
    } else {
        parts.join("/")
    })
}

fn strip_dir_prefix<'a>(path: &'a str, dir: &str) -> Option<&'a str> {
    if path == dir {
        return Some("");
    }
    if dir == "/" {
        return path.strip_prefix('/');
    }
    path.strip_prefix(dir)?.strip_prefix('/')
}

/// Checks that an entry path from the catalog is a plain relative path.
fn safe_relative(path: &str) -> Option<PathBuf> {
    if path.is_empty() || path.contains('\0') {
        return None;
    }
    let p = Path::new(path);
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            _ => return None,
        }
    }
    // `Path::components` drops `.` and empty parts silently; insist on the exact spelling.
    if path
        .split('/')
        .any(|s| s.is_empty() || s == "." || s == "..")
    {
        return None;
    }
    Some(out)
}

/// One planned item.
#[derive(Clone)]
struct Planned {
    entry: EntryRow,
    /// Where it goes, relative to the target (a plain relative path).
    rel: PathBuf,
    /// For files: the chunk list (empty for empty files).
    chunks: Vec<ChunkLoc>,
}

/// Per-item problems of a restore: what failed (the restore goes on with the rest) and what
/// was done differently from the backup.
#[derive(Default)]
struct Outcome {
    failures: Vec<(String, String)>,
    warnings: Vec<String>,
    /// Files whose content did not match their SHA-256 while blob ids went unchecked, to
    /// write again with them checked (see [`IdChecks`]).
    recheck: Vec<Planned>,
}

impl Outcome {
    fn fail(&mut self, path: &str, reason: impl std::fmt::Display) {
        // Reported once, through the error every caller shows (not logged as well).
        tracing::debug!("restore of {path} failed: {reason}");
        self.failures.push((path.to_string(), reason.to_string()));
    }

    fn merge(&mut self, other: Outcome) {
        self.failures.extend(other.failures);
        self.warnings.extend(other.warnings);
        self.recheck.extend(other.recheck);
    }
}

/// The snapshot's entries at the selected path, page by page in path order ([`Repo::batch`]
/// entries a page): a restore reads them twice (check everything, then write), holding one
/// page at a time, so its memory does not grow with the number of files.
struct Pages<'a> {
    catalog: &'a Catalog,
    resolved: &'a Resolved,
    after: Option<String>,
    page: usize,
    paths: PathCheck,
}

impl<'a> Pages<'a> {
    fn new(catalog: &'a Catalog, page: usize, resolved: &'a Resolved) -> Pages<'a> {
        Pages {
            catalog,
            resolved,
            after: None,
            page,
            paths: PathCheck::new(&resolved.prefix),
        }
    }

    /// The next page, planned (empty at the end).
    async fn next(&mut self) -> Result<Vec<Planned>, Error> {
        let r = self.resolved;
        let page = self
            .catalog
            .entries_page(
                r.root_id,
                r.snapshot.seq,
                &r.prefix,
                self.after.as_deref(),
                self.page,
            )
            .await?;
        if let Some(last) = page.last() {
            self.after = Some(last.path.clone());
        }
        plan_paths(page, &mut self.paths)
    }

    /// The next page's paths, kinds and sizes, each path validated (empty at the end): the
    /// checking pass of a restore into an empty place, which needs nothing else.
    async fn next_outlines(&mut self) -> Result<Vec<EntryOutline>, Error> {
        let r = self.resolved;
        let page = self
            .catalog
            .entry_outlines_page(
                r.root_id,
                r.snapshot.seq,
                &r.prefix,
                self.after.as_deref(),
                self.page,
            )
            .await?;
        if let Some(last) = page.last() {
            self.after = Some(last.path.clone());
        }
        for o in &page {
            self.paths.rel(&o.path, o.kind)?;
        }
        Ok(page)
    }
}

/// What the checking pass found.
#[derive(Default)]
struct Found {
    /// Per entry in path order: already there and identical (left alone).
    skip: Vec<bool>,
    conflicts: Vec<PathBuf>,
    files: u64,
    bytes: u64,
}

/// A restore whose checking pass is done ([`check`]), ready for [`write`].
pub(crate) struct Checked {
    started: Instant,
    counters: Arc<Counters>,
    resolved: Resolved,
    target: Arc<Target>,
    /// Per entry in path order: already there and identical (left alone).
    skip: Vec<bool>,
}

/// A restore's first pass, which needs no key: the path resolved, the target opened (created
/// if missing) and every entry's path validated and compared with what the target holds.
/// Called through [`Repo::restore`] and [`super::repo::Unlocking::restore`].
pub(crate) async fn check(
    catalog: &Catalog,
    batch: usize,
    opts: &RestoreOptions,
    progress: &dyn Progress,
) -> Result<Checked, Error> {
    let started = Instant::now();
    let counters = Arc::new(Counters::default());
    counters.set_phase(Phase::Scanning);
    progress.report(&counters.report());

    let resolved = resolve(catalog, &opts.owner, &opts.path, opts.snapshot.as_deref()).await?;
    let target = {
        let (to, within) = (opts.to.clone(), opts.within.clone());
        Arc::new(blocking(move || Target::open(&to, within.as_deref())).await??)
    };
    let fresh = {
        let (target, name) = (target.clone(), landing_name(&resolved.prefix));
        !blocking(move || target.holds(OsStr::new(&name)))
            .await?
            .map_err(|e| Error::io(opts.to.join(landing_name(&resolved.prefix)), e))?
    };
    let pages = Pages::new(catalog, batch, &resolved);
    let found = check_all(pages, &target, opts.overwrite, fresh).await?;
    if found.skip.is_empty() {
        return Err(Error::NotFound(format!(
            "{} is not in snapshot {}",
            opts.path, resolved.snapshot.short_id
        )));
    }
    if !found.conflicts.is_empty() {
        return Err(Error::Conflicts {
            paths: found.conflicts,
        });
    }
    counters.files_total.store(found.files, Ordering::Relaxed);
    counters.bytes_total.store(found.bytes, Ordering::Relaxed);
    Ok(Checked {
        started,
        counters,
        resolved,
        target,
        skip: found.skip,
    })
}

/// A restore's writing pass, after [`check`].
pub(crate) async fn write(
    repo: &Repo,
    opts: &RestoreOptions,
    checked: Checked,
    progress: &dyn Progress,
    cancel: &CancelFlag,
) -> Result<RestoreSummary, Error> {
    let Checked {
        started,
        counters,
        resolved,
        target,
        skip,
    } = checked;
    counters.set_phase(Phase::Downloading);
    progress.report(&counters.report());
    // Counting the packs is a query over every chunk of the restore, on the way to the first
    // write: only for backends that announce an estimate (local ones give none).
    let bytes = counters.bytes_total.load(Ordering::Relaxed);
    if repo.storage.estimate(bytes, 0).is_some() {
        let packs = repo
            .catalog
            .packs_under(resolved.root_id, resolved.snapshot.seq, &resolved.prefix)
            .await?;
        if let Some(estimate) = repo.storage.estimate(bytes, packs) {
            progress.estimate(&estimate);
        }
    }

    let same_owner = opts.same_owner.unwrap_or_else(running_as_root);
    let written = write_all(
        repo, &resolved, &target, &skip, same_owner, &counters, progress, cancel,
    )
    .await?;
    let Written {
        mut outcome,
        removed_temp,
        files,
        symlinks,
        dirs,
    } = written;

    // The folders' recorded owners, modes and times, deepest first (writing into a folder
    // changes its time; a read-only folder must get its contents first).
    let dir_count = dirs.len() as u64;
    let finish = {
        let target = target.clone();
        blocking(move || {
            let mut outcome = Outcome::default();
            let mut owners = Owners::new(same_owner);
            finish_dirs(&target, &dirs, &mut owners, &mut outcome);
            outcome
        })
        .await?
    };
    outcome.merge(finish);
    for w in &outcome.warnings {
        tracing::warn!("restore: {w}");
    }
    if !outcome.failures.is_empty() {
        return Err(Error::RestoreFailed {
            failures: outcome.failures,
        });
    }
    counters.set_phase(Phase::Done);
    progress.report(&counters.report());
    let unchanged = skip.iter().filter(|s| **s).count() as u64;
    Ok(RestoreSummary {
        snapshot: resolved.snapshot,
        target: target.path().join(landing_name(&resolved.prefix)),
        files,
        dirs: dir_count,
        symlinks,
        bytes: counters.bytes_done.load(Ordering::Relaxed),
        unchanged,
        duration_ms: started.elapsed().as_millis() as u64,
        warnings: outcome.warnings,
        removed_temp: removed_temp.iter().map(|r| target.display(r)).collect(),
    })
}

/// The checking pass: every path validated and compared with what the target holds, before
/// anything is written. When nothing is where the selected item lands (`fresh`), nothing
/// below it can differ: only the paths are validated and the totals counted, from the
/// entries' paths, kinds and sizes.
async fn check_all(
    mut pages: Pages<'_>,
    target: &Arc<Target>,
    overwrite: bool,
    fresh: bool,
) -> Result<Found, Error> {
    let mut checked = Found::default();
    loop {
        if fresh {
            let outlines = pages.next_outlines().await?;
            if outlines.is_empty() {
                return Ok(checked);
            }
            for o in outlines.iter().filter(|o| o.kind == EntryKind::File) {
                checked.files += 1;
                checked.bytes += o.size;
            }
            checked
                .skip
                .resize(checked.skip.len() + outlines.len(), false);
            continue;
        }
        let plan = pages.next().await?;
        if plan.is_empty() {
            return Ok(checked);
        }
        let (skip, conflicts) = check_existing(target, &plan, overwrite).await?;
        for (p, s) in plan.iter().zip(&skip) {
            if p.entry.kind == EntryKind::File && !s {
                checked.files += 1;
                checked.bytes += p.entry.size;
            }
        }
        checked.skip.extend(skip);
        checked.conflicts.extend(conflicts);
    }
}

/// What the writing pass did.
struct Written {
    outcome: Outcome,
    removed_temp: Vec<PathBuf>,
    files: u64,
    symlinks: u64,
    /// The folders, for their metadata at the very end.
    dirs: Vec<Planned>,
}

/// A page ready for the fetchers: its folders and symlinks exist, its files' chunk lists are
/// attached.
struct ReadyPage {
    plan: Arc<Vec<Planned>>,
    /// The page's files to write (not already there), in path order.
    files: Vec<usize>,
}

/// The writing pass: pages are prepared (leftovers of an interrupted restore removed, folders
/// created writable, symlinks made, chunk lists attached) while the files of the pages before
/// are fetched and written, so that reads and writers never wait for a page boundary.
#[allow(clippy::too_many_arguments)]
async fn write_all(
    repo: &Repo,
    resolved: &Resolved,
    target: &Arc<Target>,
    skip: &[bool],
    same_owner: bool,
    counters: &Arc<Counters>,
    progress: &dyn Progress,
    cancel: &CancelFlag,
) -> Result<Written, Error> {
    // Temporary names are tagged with the installation key (any restore may meet them); blobs
    // open under the snapshot owner's keys or the installation key (data from before owner
    // keys), never another owner's.
    let keys = repo.keys().clone();
    let ring = Arc::new(repo.ring_for(&resolved.snapshot.owner).await?);
    let mut written = Written {
        outcome: Outcome::default(),
        removed_temp: Vec::new(),
        files: 0,
        symlinks: 0,
        dirs: Vec::new(),
    };
    // One page prepared ahead of the one being fetched: memory stays a few pages.
    let (page_tx, page_rx) = tokio::sync::mpsc::channel::<ReadyPage>(1);
    let shared = WriterShared {
        target: target.clone(),
        keys: keys.clone(),
        ring,
        same_owner,
        counters: counters.clone(),
        cancel: cancel.clone(),
        ids: Arc::new(IdChecks::new()),
    };
    let encrypted = resolved.snapshot.encrypted;
    let fetch = fetch_and_write(repo, shared.clone(), page_rx, encrypted, progress);
    let prepare = async {
        let mut pages = Pages::new(&repo.catalog, repo.batch(), resolved);
        let mut done = 0;
        loop {
            let mut plan = pages.next().await?;
            if plan.is_empty() || cancel.is_cancelled() {
                break;
            }
            let skip: Vec<bool> = skip
                .get(done..done + plan.len())
                .ok_or_else(|| {
                    Error::Changed(format!(
                        "snapshot {} changed during the restore",
                        resolved.snapshot.short_id
                    ))
                })?
                .to_vec();
            done += plan.len();
            attach_chunk_lists(repo, &mut plan, &skip).await?;
            let files: Vec<usize> = (0..plan.len())
                .filter(|&i| plan[i].entry.kind == EntryKind::File && !skip[i])
                .collect();
            let plan = Arc::new(plan);
            let (removed, links, outcome) = {
                let (target, plan, keys) = (target.clone(), plan.clone(), keys.clone());
                blocking(move || {
                    let removed = remove_own_temp_files(&target, &plan, &keys);
                    let mut outcome = Outcome::default();
                    make_dirs(&target, &plan, &mut outcome);
                    let mut owners = Owners::new(same_owner);
                    let links =
                        make_symlinks(&target, &plan, &skip, &keys, &mut owners, &mut outcome);
                    (removed, links, outcome)
                })
                .await?
            };
            written.removed_temp.extend(removed);
            written.symlinks += links;
            written.outcome.merge(outcome);
            written.dirs.extend(
                plan.iter()
                    .filter(|p| p.entry.kind == EntryKind::Dir)
                    .map(|p| Planned {
                        entry: p.entry.clone(),
                        rel: p.rel.clone(),
                        chunks: Vec::new(),
                    }),
            );
            written.files += files.len() as u64;
            if page_tx.send(ReadyPage { plan, files }).await.is_err() {
                break; // the fetchers stopped: their error or the cancellation tells why
            }
        }
        drop(page_tx);
        Ok::<(), Error>(())
    };
    let (fetched, prepared) = tokio::join!(fetch, prepare);
    let mut outcome = fetched?;
    prepared?;
    let recheck = std::mem::take(&mut outcome.recheck);
    written.outcome.merge(outcome);
    if !recheck.is_empty() && !cancel.is_cancelled() {
        let again = write_again(repo, shared, recheck, encrypted, progress).await?;
        written.outcome.merge(again);
    }
    if cancel.is_cancelled() {
        return Err(Error::Cancelled);
    }
    written.removed_temp.sort();
    Ok(written)
}

/// Writes again, with every blob's id checked, the files whose content did not match their
/// SHA-256 in the first pass (see [`IdChecks`]): a copy holding the wrong chunk now gives way
/// to another lane's, and a file that still fails is reported with the chunk at fault.
async fn write_again(
    repo: &Repo,
    shared: WriterShared,
    files: Vec<Planned>,
    encrypted: bool,
    progress: &dyn Progress,
) -> Result<Outcome, Error> {
    tracing::warn!(
        files = files.len(),
        "restore: content that did not match its SHA-256; reading it again with every chunk checked"
    );
    let shared = WriterShared {
        ids: Arc::new(IdChecks::rechecking()),
        ..shared
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<ReadyPage>(1);
    let page = ReadyPage {
        files: (0..files.len()).collect(),
        plan: Arc::new(files),
    };
    tx.send(page).await.expect("the receiver is held below");
    drop(tx);
    fetch_and_write(repo, shared, rx, encrypted, progress).await
}

/// The name the selected item (entry path `prefix`) gets in the target.
fn landing_name(prefix: &str) -> String {
    prefix.rsplit('/').next().unwrap_or(prefix).to_string()
}

/// Runs blocking file system work off the async runtime.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Invalid(format!("restore task failed: {e}")))
}

fn running_as_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Maps a page of entries (in path order) to their paths below the target, validating every
/// path (see [`PathCheck`]).
fn plan_paths(entries: Vec<EntryRow>, paths: &mut PathCheck) -> Result<Vec<Planned>, Error> {
    let mut plan = Vec::with_capacity(entries.len());
    for entry in entries {
        let rel = paths.rel(&entry.path, entry.kind)?;
        plan.push(Planned {
            entry,
            rel,
            chunks: Vec::new(),
        });
    }
    Ok(plan)
}

/// Validates a restore's paths in path order. The selected item (`prefix`) lands at
/// `<to>/<its own name>`; no path may leave the target, and none may pass through a symlink
/// the restore itself creates (in path order a symlink comes before anything that would lie
/// under it, so the symlinks seen so far are enough).
struct PathCheck {
    /// `prefix` up to and with its last `/` (empty at the top).
    selected_parent: String,
    links: std::collections::HashSet<String>,
}

impl PathCheck {
    fn new(prefix: &str) -> PathCheck {
        PathCheck {
            selected_parent: prefix
                .rfind('/')
                .map_or("", |i| &prefix[..i + 1])
                .to_string(),
            links: Default::default(),
        }
    }

    /// Where the entry `path` of kind `kind` goes, relative to the target.
    fn rel(&mut self, path: &str, kind: EntryKind) -> Result<PathBuf, Error> {
        let rel = path
            .strip_prefix(self.selected_parent.as_str())
            .and_then(safe_relative)
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "refusing to restore {path:?}: the path would leave the target directory"
                ))
            })?;
        let mut ancestor = path;
        while let Some(i) = ancestor.rfind('/') {
            ancestor = &ancestor[..i];
            if self.links.contains(ancestor) {
                return Err(Error::Invalid(format!(
                    "refusing to restore {path:?}: it lies under the symlink {ancestor:?}"
                )));
            }
        }
        if kind == EntryKind::Symlink {
            self.links.insert(path.to_string());
        }
        Ok(rel)
    }
}

/// Compares what already exists with a page of the plan: identical items are skipped
/// (`true` in the result), differing ones are conflicts (refusing the restore) unless
/// overwriting was asked for. Decided for all before anything is written.
async fn check_existing(
    target: &Arc<Target>,
    plan: &[Planned],
    overwrite: bool,
) -> Result<(Vec<bool>, Vec<PathBuf>), Error> {
    let checks: Vec<ExistingCheck> = plan
        .iter()
        .map(|p| ExistingCheck {
            rel: p.rel.clone(),
            kind: p.entry.kind,
            size: p.entry.size,
            sha256: p.entry.sha256,
            target: p.entry.target.clone(),
        })
        .collect();
    let t = target.clone();
    let results = blocking(move || {
        checks
            .iter()
            .map(|c| existing_state(&t, c))
            .collect::<Vec<_>>()
    })
    .await?;
    let mut conflicts = Vec::new();
    let mut skip = vec![false; plan.len()];
    for (i, state) in results.into_iter().enumerate() {
        match state {
            Existing::Absent => {}
            Existing::Same => skip[i] = true,
            Existing::Differs => {
                if plan[i].entry.kind == EntryKind::Dir || !overwrite {
                    conflicts.push(target.display(&plan[i].rel));
                }
            }
            Existing::Error(e) => return Err(Error::io(target.display(&plan[i].rel), e)),
        }
    }
    Ok((skip, conflicts))
}

/// Gives every file of a page to fetch its chunk list (one catalog query per page).
async fn attach_chunk_lists(repo: &Repo, plan: &mut [Planned], skip: &[bool]) -> Result<(), Error> {
    let wanted = |i: usize, p: &Planned| p.entry.kind == EntryKind::File && !skip[i];
    let mut contents = Vec::new();
    for (i, p) in plan.iter().enumerate() {
        if !wanted(i, p) {
            continue;
        }
        contents.push(p.entry.content_id.ok_or_else(|| {
            Error::Invalid(format!("catalog entry {} has no content", p.entry.path))
        })?);
    }
    contents.sort_unstable();
    contents.dedup();
    let chunk_lists = repo.catalog.content_chunks_of(&contents).await?;
    for (i, p) in plan.iter_mut().enumerate() {
        if !wanted(i, p) {
            continue;
        }
        let content = p.entry.content_id.expect("checked above");
        // A content shared by several files is restored for each of them.
        p.chunks = match chunk_lists.get(&content) {
            Some(list) => list.clone(),
            // An empty file has no chunks.
            None if p.entry.size == 0 => Vec::new(),
            None => {
                return Err(Error::Invalid(format!(
                    "catalog has no chunk list for {}\nhint: run `storinator-worker verify`",
                    p.entry.path
                )));
            }
        };
    }
    Ok(())
}

/// Creates the planned folders (0700 until their recorded modes are applied at the end).
/// A folder that can't be made is a failure of that folder; the rest goes on.
fn make_dirs(target: &Target, plan: &[Planned], outcome: &mut Outcome) {
    for p in plan.iter().filter(|p| p.entry.kind == EntryKind::Dir) {
        if let Err(e) = target.make_dirs(&p.rel) {
            outcome.fail(&p.entry.path, dir_error(target, &p.rel, e));
        }
    }
}

fn dir_error(target: &Target, rel: &Path, e: std::io::Error) -> String {
    if target::is_not_a_dir(&e) {
        format!(
            "refusing to restore through a symlink or a file on the way to {}",
            target.display(rel).display()
        )
    } else {
        format!("{}: {e}", target.display(rel).display())
    }
}

/// Creates the symlinks (each under a temporary name, renamed into place). Returns how many
/// were made.
fn make_symlinks(
    target: &Target,
    plan: &[Planned],
    skip: &[bool],
    keys: &Keys,
    owners: &mut Owners,
    outcome: &mut Outcome,
) -> u64 {
    let mut made = 0;
    let mut temps = TempNames::new();
    for (i, p) in plan.iter().enumerate() {
        if p.entry.kind != EntryKind::Symlink || skip[i] {
            continue;
        }
        match restore_symlink(target, p, keys, &mut temps, owners) {
            Ok(()) => made += 1,
            Err(e) => outcome.fail(&p.entry.path, e),
        }
    }
    made
}

fn restore_symlink(
    target: &Target,
    p: &Planned,
    keys: &Keys,
    temps: &mut TempNames,
    owners: &mut Owners,
) -> Result<(), String> {
    let (parent, name) = split_rel(&p.rel);
    let (dir, _) = target
        .make_dirs(parent)
        .map_err(|e| dir_error(target, parent, e))?;
    let link_target = p.entry.target.as_deref().unwrap_or("");
    let tmp = temps.name(keys, name.as_bytes());
    let tmp = OsStr::from_bytes(&tmp);
    let shown = || target.display(&p.rel).display().to_string();
    rustix::fs::symlinkat(link_target, &dir, tmp).map_err(|e| format!("{}: {e}", shown()))?;
    let result = (|| -> std::io::Result<()> {
        if let Some((uid, gid)) = owners.ids(&p.entry.owner) {
            rustix::fs::chownat(&dir, tmp, Some(uid), Some(gid), AtFlags::SYMLINK_NOFOLLOW)?;
        }
        rustix::fs::utimensat(
            &dir,
            tmp,
            &times(p.entry.mtime_ns),
            AtFlags::SYMLINK_NOFOLLOW,
        )?;
        rustix::fs::renameat(&dir, tmp, &dir, name)?;
        Ok(())
    })();
    result.map_err(|e| {
        let _ = rustix::fs::unlinkat(&dir, tmp, AtFlags::empty());
        format!("{}: {e}", shown())
    })
}

/// Applies the folders' recorded owners, modes and times, deepest first.
fn finish_dirs(target: &Target, plan: &[Planned], owners: &mut Owners, outcome: &mut Outcome) {
    let mut dirs: Vec<&Planned> = plan
        .iter()
        .filter(|p| p.entry.kind == EntryKind::Dir)
        .collect();
    dirs.sort_by_key(|p| std::cmp::Reverse(p.rel.components().count()));
    for p in dirs {
        let result = target
            .dir(&p.rel)
            .map_err(|e| dir_error(target, &p.rel, e))
            .and_then(|fd| {
                apply_metadata(
                    fd.as_fd(),
                    &p.entry,
                    owners,
                    &target.display(&p.rel),
                    &mut outcome.warnings,
                )
                .map_err(|e| format!("{}: {e}", target.display(&p.rel).display()))
            });
        if let Err(e) = result {
            outcome.fail(&p.entry.path, e);
        }
    }
}

/// The parent (relative, possibly empty) and the name of a planned path.
fn split_rel(rel: &Path) -> (&Path, &OsStr) {
    (
        rel.parent().unwrap_or(Path::new("")),
        rel.file_name().expect("planned paths have a name"),
    )
}

fn times(ns: i64) -> rustix::fs::Timestamps {
    rustix::fs::Timestamps {
        last_access: rustix::fs::Timespec {
            tv_sec: 0,
            tv_nsec: rustix::fs::UTIME_OMIT,
        },
        last_modification: rustix::fs::Timespec {
            tv_sec: ns.div_euclid(1_000_000_000),
            tv_nsec: ns.rem_euclid(1_000_000_000) as _,
        },
    }
}

/// Whose files these become. As root (or with `same_owner`), the recorded owner: the user and
/// group by name where this system knows the name, else by number (as tar does). Otherwise
/// nobody's but the restoring user's.
struct Owners {
    restore: bool,
    users: HashMap<String, Option<u32>>,
    groups: HashMap<String, Option<u32>>,
}

impl Owners {
    fn new(restore: bool) -> Owners {
        Owners {
            restore,
            users: HashMap::new(),
            groups: HashMap::new(),
        }
    }

    fn ids(&mut self, owner: &Owner) -> Option<(rustix::fs::Uid, rustix::fs::Gid)> {
        if !self.restore {
            return None;
        }
        let uid = match &owner.user {
            Some(name) => cached(&mut self.users, name, |name| {
                nix::unistd::User::from_name(name)
                    .ok()
                    .flatten()
                    .map(|u| u.uid.as_raw())
            }),
            None => None,
        }
        .or(owner.uid)?;
        let gid = match &owner.group {
            Some(name) => cached(&mut self.groups, name, |name| {
                nix::unistd::Group::from_name(name)
                    .ok()
                    .flatten()
                    .map(|g| g.gid.as_raw())
            }),
            None => None,
        }
        .or(owner.gid)?;
        Some((
            rustix::fs::Uid::from_raw(uid),
            rustix::fs::Gid::from_raw(gid),
        ))
    }
}

/// The id of a user or group name, looked up once (a hit costs no copy of the name: this
/// runs for every file).
fn cached(
    ids: &mut HashMap<String, Option<u32>>,
    name: &str,
    look_up: impl FnOnce(&str) -> Option<u32>,
) -> Option<u32> {
    if let Some(id) = ids.get(name) {
        return *id;
    }
    let id = look_up(name);
    ids.insert(name.to_string(), id);
    id
}

/// Owner, then mode, then time, on an open handle (ownership first: `chown` clears the
/// setuid and setgid bits). setuid/setgid bits are restored only with the recorded owner: a
/// user's setuid file must not become a setuid file of the restoring user (root).
fn apply_metadata(
    fd: BorrowedFd<'_>,
    entry: &EntryRow,
    owners: &mut Owners,
    shown: &Path,
    warnings: &mut Vec<String>,
) -> std::io::Result<()> {
    let mut mode = entry.mode & 0o7777;
    match owners.ids(&entry.owner) {
        Some((uid, gid)) => rustix::fs::fchown(fd, Some(uid), Some(gid))?,
        None if mode & SUID_SGID != 0 => {
            mode &= !SUID_SGID;
            warnings.push(format!(
                "{}: setuid/setgid bits not restored: its owner was not restored (only root restores owners)",
                shown.display()
            ));
        }
        None => {}
    }
    set_mode(
        mode,
        |m| rustix::fs::fchmod(fd, rustix::fs::Mode::from_raw_mode(m)).map_err(Into::into),
        shown,
        warnings,
    )?;
    rustix::fs::futimens(fd, &times(entry.mtime_ns))?;
    Ok(())
}

const SUID_SGID: u32 = 0o6000;

/// The mode a file is created with: its recorded mode where having it before the content is
/// verified gives nobody anything the finished file would not (no setuid, setgid or sticky
/// bit; nobody but the owner may write; the owner may read and write; the group, whose id may
/// still change, gets nothing everyone does not, and everyone nothing the owner does not);
/// otherwise 0600 until [`apply_metadata`] sets it. A created mode that is already right
/// spares the `chmod`.
fn creation_mode(mode: u32) -> u32 {
    let mode = mode & 0o7777;
    let (owner, group, other) = ((mode >> 6) & 0o7, (mode >> 3) & 0o7, mode & 0o7);
    let safe =
        mode & 0o7022 == 0 && owner & 0o6 == 0o6 && group & !other == 0 && other & !owner == 0;
    if safe { mode } else { 0o600 }
}

/// A written file's metadata. Where it was created with its recorded mode and an `fstat`
/// shows that mode and the owner it should have (the umask, a default ACL, a set-group-id
/// folder or the filesystem may have decided otherwise), only the time is left to set;
/// otherwise all of it is applied, as for any item.
fn finish_file(
    fd: BorrowedFd<'_>,
    entry: &EntryRow,
    created_mode: u32,
    owners: &mut Owners,
    shown: &Path,
    warnings: &mut Vec<String>,
) -> std::io::Result<()> {
    if created_mode == entry.mode & 0o7777 {
        let st = rustix::fs::fstat(fd)?;
        let owner_right = owners
            .ids(&entry.owner)
            .is_none_or(|(uid, gid)| st.st_uid == uid.as_raw() && st.st_gid == gid.as_raw());
        if owner_right && st.st_mode & 0o7777 == created_mode {
            rustix::fs::futimens(fd, &times(entry.mtime_ns))?;
            return Ok(());
        }
    }
    apply_metadata(fd, entry, owners, shown, warnings)
}

/// Sets `mode` through `chmod`. Where the system refuses setuid/setgid bits (systemd's
/// `RestrictSUIDSGID=yes` makes such a chmod fail with EPERM), the rest of the mode is set
/// without them and a warning says so, instead of failing the item.
fn set_mode(
    mode: u32,
    chmod: impl Fn(u32) -> std::io::Result<()>,
    shown: &Path,
    warnings: &mut Vec<String>,
) -> std::io::Result<()> {
    match chmod(mode) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) && mode & SUID_SGID != 0 => {
            chmod(mode & !SUID_SGID)?;
            warnings.push(format!(
                "{}: setuid/setgid bits refused by the system ({e}); restored without them",
                shown.display()
            ));
            Ok(())
        }
        r => r,
    }
}

/// What to compare an existing path against.
struct ExistingCheck {
    rel: PathBuf,
    kind: EntryKind,
    size: u64,
    sha256: Option<[u8; 32]>,
    target: Option<String>,
}

enum Existing {
    Absent,
    Same,
    Differs,
    Error(std::io::Error),
}

/// What is at `rel` already, compared with the entry to restore. Looked at through handles
/// that never follow symlinks: a symlink or a file where a folder should be on the way makes
/// the item differ (a conflict), never a path to look through.
fn existing_state(target: &Target, c: &ExistingCheck) -> Existing {
    let (parent, name) = split_rel(&c.rel);
    let dir = match target.dir_path(parent) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Existing::Absent,
        Err(e) if target::is_not_a_dir(&e) => return Existing::Differs,
        Err(e) => return Existing::Error(e),
    };
    let st = match rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(rustix::io::Errno::NOENT) => return Existing::Absent,
        Err(e) => return Existing::Error(e.into()),
    };
    let ft = rustix::fs::FileType::from_raw_mode(st.st_mode);
    match c.kind {
        EntryKind::Dir if ft == rustix::fs::FileType::Directory => Existing::Same,
        EntryKind::Symlink if ft == rustix::fs::FileType::Symlink => {
            match rustix::fs::readlinkat(&dir, name, Vec::new()) {
                Ok(t) if Some(t.as_bytes()) == c.target.as_deref().map(str::as_bytes) => {
                    Existing::Same
                }
                _ => Existing::Differs,
            }
        }
        EntryKind::File
            if ft == rustix::fs::FileType::RegularFile && st.st_size as u64 == c.size =>
        {
            match target.open_regular(&c.rel) {
                Ok(Some(f)) => match sha256_file(f) {
                    Ok(have) if Some(have) == c.sha256 => Existing::Same,
                    Ok(_) => Existing::Differs,
                    Err(e) => Existing::Error(e),
                },
                Ok(None) => Existing::Differs,
                Err(e) if target::is_not_a_dir(&e) => Existing::Differs,
                Err(e) => Existing::Error(e),
            }
        }
        _ => Existing::Differs,
    }
}

fn sha256_file(mut f: File) -> std::io::Result<[u8; 32]> {
    let mut sha = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        sha.update(&buf[..n]);
    }
    Ok(sha.finalize().into())
}

/// Temporary names: `.storinator-<nonce>-<tag>.tmp`, 41 bytes whatever the final name (so a
/// name of any length the backup accepted fits NAME_MAX), where the tag is a keyed hash of the
/// nonce and the final name. A later restore recognises exactly the temporary files that a
/// restore with this key made for a name it restores again, and removes only those.
const TEMP_PREFIX: &str = ".storinator-";
const TEMP_SUFFIX: &str = ".tmp";
const TEMP_LABEL: &[u8] = b"restore temporary";

fn temp_name_with(keys: &Keys, nonce: &[u8; 4], name: &[u8]) -> Vec<u8> {
    let tag = keys.temp_tag(&[TEMP_LABEL, nonce, name]);
    format!(
        "{TEMP_PREFIX}{}-{}{TEMP_SUFFIX}",
        hex::encode(nonce),
        hex::encode(&tag[..8])
    )
    .into_bytes()
}

/// Where the nonces of temporary names come from: a random start drawn once per writer, then
/// counted up, instead of the system's random source per file. The keyed tag, not the nonce,
/// makes a name impossible to guess (or plant) without the key; the nonce only keeps apart
/// two restores writing the same name, which a random start does as well as per-file draws.
struct TempNames {
    next: u32,
}

impl TempNames {
    fn new() -> TempNames {
        let mut start = [0u8; 4];
        getrandom::fill(&mut start).expect("operating system random source failed");
        TempNames {
            next: u32::from_le_bytes(start),
        }
    }

    /// A fresh temporary name for the final name `name`.
    fn name(&mut self, keys: &Keys, name: &[u8]) -> Vec<u8> {
        let nonce = self.next.to_le_bytes();
        self.next = self.next.wrapping_add(1);
        temp_name_with(keys, &nonce, name)
    }
}

/// The nonce of a name shaped like a temporary one.
fn temp_nonce(name: &[u8]) -> Option<[u8; 4]> {
    let s = std::str::from_utf8(name).ok()?;
    let inner = s.strip_prefix(TEMP_PREFIX)?.strip_suffix(TEMP_SUFFIX)?;
    let (nonce, tag) = inner.split_once('-')?;
    if tag.len() != 16 || !tag.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; 4];
    hex::decode_to_slice(nonce, &mut out).ok()?;
    Some(out)
}

/// Removes the temporary files an interrupted restore left for the names this restore
/// writes, in the folders it writes to. Returns their paths (relative to the target).
fn remove_own_temp_files(target: &Target, plan: &[Planned], keys: &Keys) -> Vec<PathBuf> {
    let mut by_dir: HashMap<&Path, Vec<&[u8]>> = HashMap::new();
    for p in plan.iter().filter(|p| p.entry.kind != EntryKind::Dir) {
        let (parent, name) = split_rel(&p.rel);
        by_dir.entry(parent).or_default().push(name.as_bytes());
    }
    let mut removed = Vec::new();
    for (dir_rel, names) in by_dir {
        let Ok(dir) = target.dir(dir_rel) else {
            continue; // not there yet: nothing left in it
        };
        let Ok(present) = target::list_dir(&dir) else {
            continue;
        };
        for entry in present {
            let Some(nonce) = temp_nonce(&entry) else {
                continue;
            };
            let ours = names
                .iter()
                .any(|n| temp_name_with(keys, &nonce, n) == entry);
            if ours && target::unlink(&dir, &entry).is_ok() {
                removed.push(dir_rel.join(OsStr::from_bytes(&entry)));
            }
        }
    }
    removed.sort();
    if !removed.is_empty() {
        tracing::warn!(
            "removed {} temporary file(s) left by an interrupted restore into {}",
            removed.len(),
            target.path().display()
        );
    }
    removed
}

/// Largest single range read: blobs of one pack near each other are fetched together up to
/// this size.
const MAX_READ: u64 = 4 << 20;
/// Bytes between blobs that are cheaper to read through than to skip (a read may also waste
/// up to as much as it uses).
const MAX_GAP: u64 = 64 << 10;

/// One blob of a range read, destined for a file.
#[derive(Clone)]
struct BlobSlot {
    id: ChunkId,
    /// Where it starts in the pack.
    offset: u64,
    length: usize,
    raw_length: usize,
}

/// A range read of one pack covering blobs, listed in the order their files want them (not
/// necessarily the pack's: a backup's sealing threads interleave neighbouring files' blobs).
#[derive(Clone)]
struct RangeRead {
    obj: ObjectRef,
    offset: u64,
    len: u64,
    /// Bytes of the range that are blobs of the read.
    used: u64,
    blobs: Vec<BlobSlot>,
}

impl RangeRead {
    /// Takes `c` if it lies in the same pack and the range grown to cover it stays within
    /// [`MAX_READ`] and wastes no more than [`MAX_GAP`] or than it uses.
    fn take(&mut self, c: &ChunkLoc) -> bool {
        if self.obj.name.strip_suffix(".enc") != Some(c.pack_id.as_str()) {
            return false;
        }
        let start = self.offset.min(c.offset);
        let end = (self.offset + self.len).max(c.offset + c.length);
        let used = self.used + c.length;
        let span = end - start;
        if span > MAX_READ || span - used.min(span) > MAX_GAP.max(used) {
            return false;
        }
        self.offset = start;
        self.len = span;
        self.used = used;
        self.blobs.push(BlobSlot::of(c));
        true
    }
}

impl BlobSlot {
    fn of(c: &ChunkLoc) -> BlobSlot {
        BlobSlot {
            id: c.id,
            offset: c.offset,
            length: c.length as usize,
            raw_length: c.raw_length as usize,
        }
    }
}

/// A decrypted blob (or why it could not be had), in file order.
type BlobResult = Result<Vec<u8>, String>;

/// Plans range reads over the blobs of `files` in file order, merging blobs of the same pack
/// that lie near each other.
fn plan_reads(plan: &[Planned], files: &[usize]) -> Vec<RangeRead> {
    merge_reads(files.iter().flat_map(|&i| &plan[i].chunks))
}

/// Range reads for blobs wanted in this order: each blob joins the read before it when it can
/// (see [`RangeRead::take`]).
fn merge_reads<'a>(chunks: impl Iterator<Item = &'a ChunkLoc>) -> Vec<RangeRead> {
    let mut reads: Vec<RangeRead> = Vec::new();
    for c in chunks {
        if let Some(r) = reads.last_mut()
            && r.take(c)
        {
            continue;
        }
        reads.push(RangeRead {
            obj: ObjectRef::new(format!("{}.enc", c.pack_id), c.location.clone()),
            offset: c.offset,
            len: c.length,
            used: c.length,
            blobs: vec![BlobSlot::of(c)],
        });
    }
    reads
}

/// What every writer needs.
#[derive(Clone)]
struct WriterShared {
    target: Arc<Target>,
    keys: Keys,
    ring: Arc<KeyRing>,
    same_owner: bool,
    counters: Arc<Counters>,
    cancel: CancelFlag,
    ids: Arc<IdChecks>,
}

/// Whether the fetchers check each blob's id ([`KeyRing::open_chunk`]) or only authenticate
/// it ([`KeyRing::open_unbound`]).
///
/// A restore starts without: every file is hashed before its rename anyway, and recomputing
/// the keyed id is one more SHA-256 pass over every byte (the third, with the MAC's and the
/// file's). A blob that authenticates but holds another chunk (a catalog pointing at the
/// wrong place, or storage that moved authentic blobs around) then shows as a file whose
/// SHA-256 differs. The first such file turns the checks on for the reads started after it,
/// and the files that differed are written again with them ([`write_again`]), where a wrong
/// copy gives way to another lane's, as a damaged one always did.
struct IdChecks {
    on: AtomicBool,
    /// This pass writes files that differed once: a difference now is a failure.
    rechecking: bool,
}

/// Files to write again that one writer keeps: past it, a file that differs fails at once
/// (the checks are on by then; this bounds memory when much of the storage is wrong).
const RECHECK_AT_MOST: usize = 1024;

impl IdChecks {
    fn new() -> IdChecks {
        IdChecks {
            on: AtomicBool::new(false),
            rechecking: false,
        }
    }

    fn rechecking() -> IdChecks {
        IdChecks {
            on: AtomicBool::new(true),
            rechecking: true,
        }
    }

    fn on(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }
}

/// Writers working side by side. A file's creation and rename hold its folder's lock in the
/// kernel, so a folder goes to one writer at a time (see [`Router`]); writers in different
/// folders overlap their system calls, hashing and waits for the disk.
fn writer_count() -> usize {
    std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(2, 4)
}

/// What a writer receives, in order: the files of a page that are its own, then the blobs of
/// those files in file order, in batches (one per range read: a wake-up per read, not per
/// blob).
enum ToWriter {
    Page(Arc<Vec<Planned>>, Vec<usize>),
    Blobs(Vec<BlobResult>),
}

/// Hands out the files of each page to the writers: consecutive files of one folder to the
/// same writer, the next folder to the next writer.
struct Router {
    writers: usize,
    next: usize,
    folder: Option<PathBuf>,
}

impl Router {
    /// The writer of every file of the page, in the order of `files`.
    fn assign(&mut self, plan: &[Planned], files: &[usize]) -> Vec<usize> {
        files
            .iter()
            .map(|&i| {
                let (parent, _) = split_rel(&plan[i].rel);
                if self.folder.as_deref() != Some(parent) {
                    self.next = (self.next + 1) % self.writers;
                    self.folder = Some(parent.to_path_buf());
                }
                self.next
            })
            .collect()
    }
}

/// A step of the fetchers, in the order the writers must see it.
enum Step {
    /// Tell writers the files of a page that are theirs.
    Pages(Vec<(usize, ToWriter)>),
    /// A range read, and the writer of each of its blobs.
    Read(RangeRead, Vec<usize>),
}

/// A step under way.
enum InFlight {
    Pages(Vec<(usize, ToWriter)>),
    /// A range read under way: its task, the writer of each blob, its length.
    Read(tokio::task::JoinHandle<Vec<BlobResult>>, Vec<usize>, u64),
}

/// Whether another range read may start with `reads` of `bytes` under way: always one, then
/// as long as less than the storage's read-ahead is requested. Reads finish in any order but
/// are used in order, so a far backend needs more than its bandwidth-delay product asked for
/// (see [`crate::storage::Storage::read_ahead`]); the read-ahead also bounds what the fetched
/// blobs waiting for the writers hold (at most it plus one read).
fn may_start_read(reads: usize, bytes: u64, read_ahead: u64) -> bool {
    reads == 0 || bytes < read_ahead
}

/// The steps of one page: the writers' shares, then the range reads over its files' blobs
/// (in file order, neighbours in a pack merged).
fn page_steps(router: &mut Router, page: ReadyPage) -> VecDeque<Step> {
    let owner = router.assign(&page.plan, &page.files);
    let mut shares: Vec<Vec<usize>> = vec![Vec::new(); router.writers];
    for (&i, &w) in page.files.iter().zip(&owner) {
        shares[w].push(i);
    }
    let mut steps = VecDeque::new();
    steps.push_back(Step::Pages(
        shares
            .into_iter()
            .enumerate()
            .filter(|(_, files)| !files.is_empty())
            .map(|(w, files)| (w, ToWriter::Page(page.plan.clone(), files)))
            .collect(),
    ));
    let blob_owner: Vec<usize> = page
        .files
        .iter()
        .zip(&owner)
        .flat_map(|(&i, &w)| std::iter::repeat_n(w, page.plan[i].chunks.len()))
        .collect();
    let mut at = 0;
    for read in plan_reads(&page.plan, &page.files) {
        let n = read.blobs.len();
        steps.push_back(Step::Read(read, blob_owner[at..at + n].to_vec()));
        at += n;
    }
    steps
}

/// Fetches the blobs of every page's files (range reads in flight across page boundaries)
/// and hands them to the writers. Returns the files that failed, with reasons, and warnings.
async fn fetch_and_write(
    repo: &Repo,
    shared: WriterShared,
    mut pages: tokio::sync::mpsc::Receiver<ReadyPage>,
    encrypted_snapshot: bool,
    progress: &dyn Progress,
) -> Result<Outcome, Error> {
    let counters = shared.counters.clone();
    let cancel = shared.cancel.clone();
    let ring = shared.ring.clone();
    let ids = shared.ids.clone();
    let mut to_writers = Vec::new();
    let mut writers = Vec::new();
    for _ in 0..writer_count() {
        let (tx, rx) = tokio::sync::mpsc::channel::<ToWriter>(1);
        let shared = shared.clone();
        to_writers.push(tx);
        writers.push(tokio::task::spawn_blocking(move || {
            write_files(&shared, rx)
        }));
    }
    let mut router = Router {
        writers: writers.len(),
        next: 0,
        folder: None,
    };

    let mut steps: VecDeque<Step> = VecDeque::new();
    let mut inflight: VecDeque<InFlight> = VecDeque::new();
    let read_ahead = repo.storage.read_ahead();
    let (mut reads_inflight, mut bytes_inflight) = (0usize, 0u64);
    let mut pages_done = false;
    let mut last_report = Instant::now();
    let mut stopped = false;
    'run: loop {
        // Start reads up to the bound, taking further pages as they are ready (waiting for
        // one only when nothing else is under way).
        while may_start_read(reads_inflight, bytes_inflight, read_ahead) {
            if steps.is_empty() && !pages_done {
                let page = if inflight.is_empty() {
                    pages.recv().await
                } else {
                    match pages.try_recv() {
                        Ok(p) => Some(p),
                        Err(tokio::sync::mpsc::error::TryRecvError::Empty) => break,
                        Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => None,
                    }
                };
                match page {
                    Some(page) => steps = page_steps(&mut router, page),
                    None => pages_done = true,
                }
            }
            match steps.pop_front() {
                Some(Step::Pages(shares)) => inflight.push_back(InFlight::Pages(shares)),
                Some(Step::Read(read, owners)) => {
                    let len = read.len;
                    let opening = Opening {
                        encrypted_snapshot,
                        check_ids: ids.on(),
                    };
                    let handle = tokio::spawn(fetch_range(
                        repo.storage.clone(),
                        ring.clone(),
                        read,
                        opening,
                    ));
                    inflight.push_back(InFlight::Read(handle, owners, len));
                    reads_inflight += 1;
                    bytes_inflight += len;
                }
                None => break,
            }
        }
        let Some(front) = inflight.pop_front() else {
            if pages_done && steps.is_empty() {
                break;
            }
            continue;
        };
        match front {
            InFlight::Pages(shares) => {
                for (w, msg) in shares {
                    if to_writers[w].send(msg).await.is_err() {
                        stopped = true;
                        break 'run;
                    }
                }
            }
            InFlight::Read(handle, owners, len) => {
                reads_inflight -= 1;
                bytes_inflight -= len;
                let blobs = handle
                    .await
                    .map_err(|e| Error::Invalid(format!("restore task failed: {e}")))?;
                let mut batches: Vec<Vec<BlobResult>> = vec![Vec::new(); to_writers.len()];
                for (b, w) in blobs.into_iter().zip(owners) {
                    batches[w].push(b);
                }
                for (w, batch) in batches.into_iter().enumerate() {
                    if !batch.is_empty()
                        && to_writers[w].send(ToWriter::Blobs(batch)).await.is_err()
                    {
                        stopped = true;
                        break 'run;
                    }
                }
            }
        }
        if cancel.is_cancelled() {
            break;
        }
        if last_report.elapsed() > Duration::from_millis(250) {
            progress.report(&counters.report());
            last_report = Instant::now();
        }
    }
    for step in inflight {
        if let InFlight::Read(h, ..) = step {
            h.abort();
        }
    }
    drop(to_writers);
    drop(pages);
    let mut outcome = Outcome::default();
    for w in writers {
        outcome.merge(
            w.await
                .map_err(|e| Error::Invalid(format!("restore writer failed: {e}")))?,
        );
    }
    if stopped && outcome.failures.is_empty() && !cancel.is_cancelled() {
        return Err(Error::Invalid("a restore writer stopped early".into()));
    }
    Ok(outcome)
}

/// Reads one range and opens its blobs. With copies in several lanes, a copy that fails
/// (missing, or a blob that does not authenticate) gives way to the next, and is remembered
/// so the engine can heal it.
async fn fetch_range(
    storage: Arc<dyn Storage>,
    keys: Arc<KeyRing>,
    read: RangeRead,
    opening: Opening,
) -> Vec<BlobResult> {
    let first = fetch_copy(storage.clone(), keys.clone(), read.clone(), opening).await;
    if first.iter().all(Result::is_ok) {
        return first;
    }
    let Some(lanes) = storage.as_lanes() else {
        return first;
    };
    for (lane, obj) in lanes.copy_refs(&read.obj) {
        let one = RangeRead {
            obj,
            ..read.clone()
        };
        let got = fetch_copy(storage.clone(), keys.clone(), one, opening).await;
        if got.iter().all(Result::is_ok) {
            return got;
        }
        tracing::warn!(
            "the copy of {} in lane {lane} fails; trying another",
            read.obj.name
        );
        lanes.note_miss(&read.obj.name, &lane);
    }
    first
}

/// How [`fetch_copy`] opens blobs.
#[derive(Clone, Copy)]
struct Opening {
    /// An encrypted snapshot takes no unencrypted blob.
    encrypted_snapshot: bool,
    /// See [`IdChecks`].
    check_ids: bool,
}

/// Reads one range of one object and opens its blobs: each MAC checked, and each id when
/// `opening` says so (the catalog, which holds only what authenticated sources said, vouches
/// for the ids).
async fn fetch_copy(
    storage: Arc<dyn Storage>,
    keys: Arc<KeyRing>,
    read: RangeRead,
    opening: Opening,
) -> Vec<BlobResult> {
    let what = format!("reading {}", read.obj.name);
    let data = with_retry(&what, || {
        storage.get_range(&read.obj, read.offset, read.len)
    })
    .await;
    let data = match data {
        Ok(d) if d.len() as u64 == read.len => d,
        Ok(d) => {
            let msg = format!(
                "pack {} returned {} bytes instead of {}",
                read.obj.name,
                d.len(),
                read.len
            );
            return read.blobs.iter().map(|_| Err(msg.clone())).collect();
        }
        Err(e) => {
            let msg = format!("pack {}: {e}", read.obj.name);
            return read.blobs.iter().map(|_| Err(msg.clone())).collect();
        }
    };
    tokio::task::spawn_blocking(move || {
        read.blobs
            .iter()
            .map(|b| {
                let at = (b.offset - read.offset) as usize;
                let sealed = &data[at..at + b.length];
                let shown = || format!("chunk {} in pack {}", &b.id.to_hex()[..12], read.obj.name);
                let opened = if opening.check_ids {
                    keys.open_chunk(sealed, MAX_BLOB, &b.id)
                } else {
                    keys.open_unbound(sealed, MAX_BLOB)
                };
                let (_, opened) = opened.map_err(|e| format!("{}: {e}", shown()))?;
                if opened.plaintext.len() != b.raw_length {
                    return Err(format!("{} holds the wrong data", shown()));
                }
                if opening.encrypted_snapshot && !opened.encrypted {
                    return Err(format!(
                        "{} is not encrypted, in an encrypted snapshot",
                        shown()
                    ));
                }
                Ok(opened.plaintext)
            })
            .collect()
    })
    .await
    .unwrap_or_else(|e| vec![Err(format!("decrypt task failed: {e}"))])
}

/// What one writer keeps from file to file.
struct WriterLocal {
    parent: ParentCache,
    temps: TempNames,
    owners: Owners,
    /// Started at the writer's first large file (see [`FileHash`]).
    beside: Option<HashBeside>,
}

/// Files from this size on are hashed on a thread beside their writer's.
const HASH_BESIDE_FROM: u64 = 4 << 20;

/// A file's SHA-256 as its blobs are written. A small file is hashed by its writer. A large
/// one is hashed beside it, on a thread of the writer's own ([`HashBeside`]): one writer
/// hashing and writing an 8 GiB file in turn was the slowest part of its restore (SHA-256
/// 6.3 s, the writes as much again), with the other core half idle.
enum FileHash<'a> {
    Here(Sha256),
    /// The writer's hashing thread; `None` once it is gone (it died, or its channels broke):
    /// this file gets no digest, and the writer's next large file starts another thread.
    Beside(&'a mut Option<HashBeside>),
}

impl<'a> FileHash<'a> {
    fn new(size: u64, beside: &'a mut Option<HashBeside>) -> FileHash<'a> {
        if size < HASH_BESIDE_FROM {
            return FileHash::Here(Sha256::new());
        }
        if beside.is_none() {
            *beside = HashBeside::start();
        }
        match beside {
            Some(_) => FileHash::Beside(beside),
            None => FileHash::Here(Sha256::new()),
        }
    }

    /// Hashes `data` (or hands it to the hashing thread) and gives it back for writing.
    fn update(&mut self, data: Vec<u8>) -> Arc<Vec<u8>> {
        let data = Arc::new(data);
        match self {
            FileHash::Here(sha) => sha.update(&data[..]),
            FileHash::Beside(slot) => {
                if let Some(b) = slot.as_ref()
                    && b.data.send(Some(data.clone())).is_err()
                {
                    **slot = None;
                }
            }
        }
        data
    }

    /// The digest; `None` when the hashing thread was lost, which fails the file.
    fn finalize(self) -> Option<[u8; 32]> {
        match self {
            FileHash::Here(sha) => Some(sha.finalize().into()),
            FileHash::Beside(slot) => {
                let digest = slot.as_ref().and_then(|b| {
                    b.data.send(None).ok()?;
                    b.digests.recv().ok()
                });
                if digest.is_none() {
                    *slot = None;
                }
                digest
            }
        }
    }
}

/// A writer's hashing thread: takes a file's blobs in order, and `None` at its end, for
/// which it returns the digest. Two blobs wait at most (memory stays bounded).
struct HashBeside {
    data: std::sync::mpsc::SyncSender<Option<Arc<Vec<u8>>>>,
    digests: std::sync::mpsc::Receiver<[u8; 32]>,
}

impl HashBeside {
    fn start() -> Option<HashBeside> {
        let (data, data_rx) = std::sync::mpsc::sync_channel::<Option<Arc<Vec<u8>>>>(2);
        let (digest_tx, digests) = std::sync::mpsc::channel();
        let started = std::thread::Builder::new()
            .name("restore-hash".into())
            .spawn(move || {
                let mut sha = Sha256::new();
                for blob in data_rx {
                    match blob {
                        Some(b) => sha.update(&b[..]),
                        None => {
                            let digest = std::mem::take(&mut sha).finalize().into();
                            if digest_tx.send(digest).is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        match started {
            Ok(_) => Some(HashBeside { data, digests }),
            Err(e) => {
                tracing::warn!("restore: hashing on the writer's own thread: {e}");
                None
            }
        }
    }
}

/// The writer's handle on the folder of the file being written: consecutive files (sorted by
/// path) usually share it.
struct ParentCache {
    rel: Option<PathBuf>,
    fd: Option<std::os::fd::OwnedFd>,
}

/// The blobs a writer receives, one batch at a time.
struct BlobQueue {
    rx: tokio::sync::mpsc::Receiver<ToWriter>,
    batch: std::vec::IntoIter<BlobResult>,
}

impl BlobQueue {
    /// The next blob of the files being written (`None`: the fetchers stopped).
    fn next(&mut self) -> Option<BlobResult> {
        loop {
            if let Some(b) = self.batch.next() {
                return Some(b);
            }
            match self.rx.blocking_recv()? {
                ToWriter::Blobs(batch) => self.batch = batch.into_iter(),
                // A page's share always follows every blob of the share before.
                ToWriter::Page(..) => return None,
            }
        }
    }
}

/// A writer: writes its share of each page's files from blobs arriving in file order. Each
/// file goes to a temporary name in its folder (opened beneath the target, never through a
/// symlink) and is renamed there only once its size and SHA-256 match. A file that fails is
/// reported and the others go on.
fn write_files(ctx: &WriterShared, rx: tokio::sync::mpsc::Receiver<ToWriter>) -> Outcome {
    let mut outcome = Outcome::default();
    let mut local = WriterLocal {
        parent: ParentCache {
            rel: None,
            fd: None,
        },
        temps: TempNames::new(),
        owners: Owners::new(ctx.same_owner),
        beside: None,
    };
    let mut blobs = BlobQueue {
        rx,
        batch: Vec::new().into_iter(),
    };
    while let Some(msg) = blobs.rx.blocking_recv() {
        let ToWriter::Page(plan, files) = msg else {
            outcome.fail("", "restore writer: blobs without their files");
            return outcome;
        };
        for &i in &files {
            let p = &plan[i];
            if ctx.cancel.is_cancelled() {
                return outcome;
            }
            let result = write_one(ctx, p, &mut local, &mut blobs, &mut outcome);
            match result {
                Ok(()) => {}
                Err(WriteError::Failed(reason)) => outcome.fail(&p.entry.path, reason),
                Err(WriteError::Differs) if outcome.recheck.len() < RECHECK_AT_MOST => {
                    outcome.recheck.push(p.clone());
                    continue; // counted when written again
                }
                Err(WriteError::Differs) => outcome.fail(&p.entry.path, DIFFERS),
                // The fetcher stopped (cancelled or failed): abandon the rest.
                Err(WriteError::Stopped) => return outcome,
            }
            Counters::add(&ctx.counters.files_done, 1);
        }
    }
    outcome
}

enum WriteError {
    Failed(String),
    /// The content read does not match the file's SHA-256, and blob ids went unchecked.
    Differs,
    Stopped,
}

const DIFFERS: &str = "content does not match its recorded SHA-256";

/// Receives the blobs of one file (all of them, whatever happens, so the next file starts at
/// its own first blob) and writes them to a temporary file that becomes the file.
fn write_one(
    ctx: &WriterShared,
    p: &Planned,
    local: &mut WriterLocal,
    blobs: &mut BlobQueue,
    outcome: &mut Outcome,
) -> Result<(), WriteError> {
    let WriterLocal {
        parent,
        temps,
        owners,
        beside,
    } = local;
    let (parent_rel, name) = split_rel(&p.rel);
    let mut failure: Option<String> = None;
    if parent.rel.as_deref() != Some(parent_rel) {
        parent.fd = None;
        parent.rel = Some(parent_rel.to_path_buf());
        match ctx.target.make_dirs(parent_rel) {
            Ok((fd, _)) => parent.fd = Some(fd),
            Err(e) => failure = Some(dir_error(&ctx.target, parent_rel, e)),
        }
    } else if parent.fd.is_none() {
        failure = Some(format!(
            "its folder {} could not be opened",
            ctx.target.display(parent_rel).display()
        ));
    }
    let tmp = temps.name(&ctx.keys, name.as_bytes());
    let tmp = OsStr::from_bytes(&tmp);
    let created_mode = creation_mode(p.entry.mode);
    let mut out: Option<File> = None;
    if failure.is_none() {
        let dir = parent.fd.as_ref().expect("opened above");
        match rustix::fs::openat(
            dir,
            tmp,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            rustix::fs::Mode::from_raw_mode(created_mode),
        ) {
            Ok(fd) => out = Some(File::from(fd)),
            Err(e) => {
                failure = Some(format!(
                    "{}: {e}",
                    ctx.target.display(&parent_rel.join(tmp)).display()
                ))
            }
        }
    }
    let mut sha = FileHash::new(p.entry.size, beside);
    let mut written = 0u64;
    for _ in &p.chunks {
        let Some(blob) = blobs.next() else {
            if let (Some(dir), Some(_)) = (&parent.fd, &out) {
                let _ = rustix::fs::unlinkat(dir, tmp, AtFlags::empty());
            }
            return Err(WriteError::Stopped);
        };
        match blob {
            Ok(data) if failure.is_none() => {
                let data = sha.update(data);
                if let Some(f) = out.as_mut()
                    && let Err(e) = f.write_all(&data)
                {
                    failure = Some(format!(
                        "writing {}: {e}",
                        ctx.target.display(&p.rel).display()
                    ));
                }
                written += data.len() as u64;
                Counters::add(&ctx.counters.bytes_done, data.len() as u64);
            }
            Ok(_) => {}
            Err(e) => {
                failure.get_or_insert(e);
            }
        }
    }
    let digest = sha.finalize();
    if digest.is_none() {
        failure.get_or_insert_with(|| "restore: the file's hashing thread stopped".into());
    }
    let differs = failure.is_none() && (written != p.entry.size || digest != p.entry.sha256);
    if differs {
        failure = Some(DIFFERS.into());
    }
    let (Some(dir), Some(out)) = (parent.fd.as_ref(), out) else {
        return Err(WriteError::Failed(failure.unwrap_or_default()));
    };
    if differs && !ctx.ids.rechecking {
        // Perhaps an authentic blob of another chunk: checks on, and this file again later.
        ctx.ids.on.store(true, Ordering::Relaxed);
        drop(out);
        let _ = rustix::fs::unlinkat(dir, tmp, AtFlags::empty());
        ctx.counters
            .bytes_done
            .fetch_sub(written, Ordering::Relaxed);
        return Err(WriteError::Differs);
    }
    let finish = || -> std::io::Result<()> {
        finish_file(
            out.as_fd(),
            &p.entry,
            created_mode,
            owners,
            &ctx.target.display(&p.rel),
            &mut outcome.warnings,
        )?;
        drop(out);
        rustix::fs::renameat(dir, tmp, dir, name)?;
        Ok(())
    };
    let result = match failure {
        None => finish().map_err(|e| format!("{}: {e}", ctx.target.display(&p.rel).display())),
        Some(reason) => Err(reason),
    };
    result.map_err(|reason| {
        let _ = rustix::fs::unlinkat(dir, tmp, AtFlags::empty());
        WriteError::Failed(reason)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash_file(beside: &mut Option<HashBeside>, size: u64, blobs: &[&[u8]]) -> Option<[u8; 32]> {
        let mut h = FileHash::new(size, beside);
        for b in blobs {
            let back = h.update(b.to_vec());
            assert_eq!(&back[..], *b, "the blob comes back for writing as it was");
        }
        h.finalize()
    }

    /// Small files are hashed here, large ones on one thread beside the writer; either way
    /// each file's digest is its own, with no state carried from the file before.
    #[test]
    fn each_file_gets_its_own_digest_here_or_beside() {
        let digest = |parts: &[&[u8]]| -> [u8; 32] { Sha256::digest(parts.concat()).into() };
        let big = HASH_BESIDE_FROM;
        let mut beside = None;
        let (a, b, c): (&[u8], &[u8], &[u8]) = (b"first file ", b"second part", b"other");
        assert_eq!(hash_file(&mut beside, 10, &[a, b]), Some(digest(&[a, b])));
        assert!(beside.is_none(), "a small file starts no thread");
        assert_eq!(hash_file(&mut beside, big, &[a, b]), Some(digest(&[a, b])));
        assert!(beside.is_some(), "a large file starts the writer's thread");
        assert_eq!(hash_file(&mut beside, big, &[c]), Some(digest(&[c])));
        assert_eq!(hash_file(&mut beside, big, &[]), Some(digest(&[])));
        assert_eq!(hash_file(&mut beside, 10, &[c]), Some(digest(&[c])));
    }

    /// A hashing thread that is gone gives no digest (the writer fails that file) rather
    /// than a wrong one or a hang.
    #[test]
    fn a_lost_hashing_thread_gives_no_digest() {
        let (data, data_rx) = std::sync::mpsc::sync_channel(2);
        let (digest_tx, digests) = std::sync::mpsc::channel::<[u8; 32]>();
        drop((data_rx, digest_tx));
        let mut beside = Some(HashBeside { data, digests });
        assert_eq!(hash_file(&mut beside, HASH_BESIDE_FROM, &[b"blob"]), None);
        assert!(beside.is_none(), "the lost thread is let go");
        // The writer's next large file hashes on a new thread, to its own digest.
        let want: [u8; 32] = Sha256::digest(b"next").into();
        assert_eq!(
            hash_file(&mut beside, HASH_BESIDE_FROM, &[b"next"]),
            Some(want)
        );
        assert!(beside.is_some(), "a new thread took over");

        // A thread that dies between two files: its end is seen when the digest is asked.
        let (data, data_rx) = std::sync::mpsc::sync_channel(2);
        let (_digest_tx, digests) = std::sync::mpsc::channel::<[u8; 32]>();
        drop(data_rx);
        let mut beside = Some(HashBeside { data, digests });
        assert_eq!(hash_file(&mut beside, HASH_BESIDE_FROM, &[]), None);
        assert!(beside.is_none(), "the lost thread is let go");
    }

    /// Blobs of one pack that a backup's threads stored slightly out of file order are read
    /// together; a far blob, another pack or a read over its size bound starts a new read.
    #[test]
    fn neighbouring_blobs_of_a_pack_are_read_together_in_any_order() {
        let loc = |pack: &str, offset: u64, length: u64| ChunkLoc {
            id: ChunkId::from_slice(&[offset as u8; 32]).unwrap(),
            pack_id: pack.into(),
            location: String::new(),
            offset,
            length,
            raw_length: length,
        };
        let chunks = [
            loc("p", 1000, 100),
            loc("p", 0, 1000), // before the first: same read
            loc("p", 1200, 50),
            loc("p", 1100, 100),
            loc("p", 10 << 20, 10), // far away
            loc("q", 10 << 20, 10), // another pack
            loc("q", (10 << 20) + 10, MAX_READ),
        ];
        let reads = merge_reads(chunks.iter());
        let shape: Vec<(&str, u64, u64, usize)> = reads
            .iter()
            .map(|r| (r.obj.name.as_str(), r.offset, r.len, r.blobs.len()))
            .collect();
        assert_eq!(
            shape,
            vec![
                ("p.enc", 0, 1250, 4),
                ("p.enc", 10 << 20, 10, 1),
                ("q.enc", 10 << 20, 10, 1),
                ("q.enc", (10 << 20) + 10, MAX_READ, 1),
            ]
        );
        // The blobs stay in the order they are wanted.
        let offsets: Vec<u64> = reads[0].blobs.iter().map(|b| b.offset).collect();
        assert_eq!(offsets, vec![1000, 0, 1200, 1100]);
        // A read wastes at most MAX_GAP, or as much as it uses.
        let sparse = [loc("p", 0, 10), loc("p", MAX_GAP + 100, 10)];
        assert_eq!(merge_reads(sparse.iter()).len(), 2);
    }

    #[test]
    fn safe_paths() {
        assert!(safe_relative("data/a/b").is_some());
        for bad in [
            "",
            "/etc/passwd",
            "data/../../x",
            "data/./x",
            "data//x",
            "..",
            "data/..",
            "a\0b",
        ] {
            assert!(safe_relative(bad).is_none(), "{bad:?}");
        }
    }

    /// systemd's `RestrictSUIDSGID=yes` (in the shipped units) makes a chmod that sets
    /// setuid/setgid fail with EPERM: the mode goes on without those bits, with a warning.
    #[test]
    fn a_refused_setgid_bit_is_dropped_with_a_warning() {
        let tried = std::cell::RefCell::new(Vec::new());
        let restricted = |m: u32| {
            tried.borrow_mut().push(m);
            if m & SUID_SGID != 0 {
                Err(std::io::Error::from_raw_os_error(libc::EPERM))
            } else {
                Ok(())
            }
        };
        let mut warnings = Vec::new();
        set_mode(0o2775, restricted, Path::new("/t/shared"), &mut warnings).unwrap();
        assert_eq!(*tried.borrow(), vec![0o2775, 0o775]);
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].contains("/t/shared") && warnings[0].contains("setuid/setgid"));
        // Other failures, and EPERM without those bits, are errors of the item.
        let mut warnings = Vec::new();
        let eperm = |_| Err(std::io::Error::from_raw_os_error(libc::EPERM));
        assert!(set_mode(0o755, eperm, Path::new("/t/x"), &mut warnings).is_err());
        assert!(warnings.is_empty());
    }

    #[test]
    fn temp_names_are_short_keyed_and_recognised() {
        let keys = Keys::derive(&crate::format::crypto::MasterSecret::generate());
        let long = "n".repeat(255);
        let mut temps = TempNames::new();
        let t = temps.name(&keys, long.as_bytes());
        assert_eq!(t.len(), 41);
        let nonce = temp_nonce(&t).unwrap();
        assert_eq!(temp_name_with(&keys, &nonce, long.as_bytes()), t);
        // The next name for the same final name is another one, and recognised as well.
        let again = temps.name(&keys, long.as_bytes());
        assert_ne!(again, t);
        let nonce = temp_nonce(&again).unwrap();
        assert_eq!(temp_name_with(&keys, &nonce, long.as_bytes()), again);
        // Another name, another key, or a look-alike are not ours.
        assert_ne!(temp_name_with(&keys, &nonce, b"other"), t);
        let other = Keys::derive(&crate::format::crypto::MasterSecret::generate());
        assert_ne!(temp_name_with(&other, &nonce, long.as_bytes()), t);
        assert!(temp_nonce(b".storinator-zz-0000000000000000.tmp").is_none());
        assert!(temp_nonce(b"photo.jpg").is_none());
    }

    /// A file is created with its recorded mode only where that shows nobody anything early:
    /// never special bits, write access beyond the owner, a group allowed more than everyone,
    /// everyone allowed more than the owner, or an owner who cannot write.
    #[test]
    fn files_are_created_with_their_mode_only_where_it_is_safe() {
        for mode in [0o644, 0o755, 0o600, 0o700, 0o604, 0o100644] {
            assert_eq!(creation_mode(mode), mode & 0o7777, "{mode:o}");
        }
        for mode in [
            0o640, 0o750, 0o664, 0o666, 0o646, 0o444, 0o400, 0o4755, 0o2755, 0o1644, 0o614,
        ] {
            assert_eq!(creation_mode(mode), 0o600, "{mode:o}");
        }
    }

    fn file_entry(mode: u32, mtime_ns: i64) -> EntryRow {
        EntryRow {
            path: "/data/f".into(),
            kind: EntryKind::File,
            size: 0,
            mtime_ns,
            mode,
            inode: 0,
            content_id: None,
            sha256: None,
            target: None,
            owner: Owner::default(),
        }
    }

    /// Where the created mode is not the recorded one after all (a umask or a default ACL took
    /// bits away), the mode is set; where it is, only the time is.
    #[test]
    fn a_created_mode_that_came_out_otherwise_is_set() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        for (created, want) in [(0o600, 0o644), (0o644, 0o644)] {
            let f = File::create(&path).unwrap();
            f.set_permissions(std::fs::Permissions::from_mode(created))
                .unwrap();
            let entry = file_entry(want, 1_234_567_890_123_456_789);
            let mut warnings = Vec::new();
            let mut owners = Owners::new(false);
            finish_file(f.as_fd(), &entry, 0o644, &mut owners, &path, &mut warnings).unwrap();
            let m = std::fs::metadata(&path).unwrap();
            assert_eq!(m.mode() & 0o7777, want);
            assert_eq!((m.mtime(), m.mtime_nsec()), (1_234_567_890, 123_456_789));
            assert!(warnings.is_empty());
            std::fs::remove_file(&path).unwrap();
        }
    }

    #[test]
    fn normalizes_user_paths() {
        assert_eq!(normalize("/srv/data/").unwrap(), "/srv/data");
        assert_eq!(normalize("/srv/./data/x/..").unwrap(), "/srv/data");
        assert_eq!(normalize("data/photos").unwrap(), "data/photos");
        assert!(normalize("..").is_none());
        assert_eq!(
            strip_dir_prefix("/srv/data/photos", "/srv/data"),
            Some("photos")
        );
        assert_eq!(strip_dir_prefix("/srv/database", "/srv/data"), None);
        assert_eq!(strip_dir_prefix("/srv/data", "/srv/data"), Some(""));
    }
}
