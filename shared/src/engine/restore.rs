//! The restore engine: resolve a path in a snapshot, check the target, fetch only the needed
//! ranges, verify and decrypt, write each file under a temporary name and rename it only once
//! its SHA-256 matches (invariant 3); never write outside the target (invariant 4).

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::repo::Repo;
use crate::catalog::{Catalog, ChunkLoc, EntryKind, EntryRow, SnapshotInfo};
use crate::error::Error;
use crate::format::crypto::{self, ChunkId, Keys};
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
struct Planned {
    entry: EntryRow,
    dest: PathBuf,
    /// For files: the chunk list (empty for empty files).
    chunks: Vec<ChunkLoc>,
}

/// Runs a restore. Called through [`Repo::restore`].
pub(crate) async fn run(
    repo: &Repo,
    opts: &RestoreOptions,
    progress: &dyn Progress,
    cancel: &CancelFlag,
) -> Result<RestoreSummary, Error> {
    let started = Instant::now();
    let counters = Arc::new(Counters::default());
    counters.set_phase(Phase::Scanning);
    progress.report(&counters.report());

    let resolved = resolve(
        &repo.catalog,
        &opts.owner,
        &opts.path,
        opts.snapshot.as_deref(),
    )
    .await?;
    let entries = repo
        .catalog
        .entries_under(resolved.root_id, resolved.snapshot.seq, &resolved.prefix)
        .await?;
    if entries.is_empty() {
        return Err(Error::NotFound(format!(
            "{} is not in snapshot {}",
            opts.path, resolved.snapshot.short_id
        )));
    }
    let to = prepare_target(&opts.to)?;
    let mut plan = plan_paths(entries, &resolved.prefix, &to)?;
    let skip = check_existing(&plan, opts.overwrite).await?;
    let (files_total, bytes_total) = attach_chunk_lists(repo, &resolved, &mut plan, &skip).await?;
    counters.files_total.store(files_total, Ordering::Relaxed);
    counters.bytes_total.store(bytes_total, Ordering::Relaxed);
    counters.set_phase(Phase::Downloading);
    progress.report(&counters.report());
    let packs: std::collections::HashSet<&str> = plan
        .iter()
        .flat_map(|p| p.chunks.iter().map(|c| c.pack_id.as_str()))
        .collect();
    if let Some(estimate) = repo.storage.estimate(bytes_total, packs.len() as u64) {
        progress.estimate(&estimate);
    }

    // Directories first (parents before children: the plan is sorted by path).
    let dirs: Vec<usize> = (0..plan.len())
        .filter(|&i| plan[i].entry.kind == EntryKind::Dir)
        .collect();
    for &i in &dirs {
        ensure_dir(&to, &plan[i].dest)?;
    }

    // Files.
    let files: Vec<usize> = (0..plan.len())
        .filter(|&i| plan[i].entry.kind == EntryKind::File && !skip[i])
        .collect();
    let plan = Arc::new(plan);
    let failures =
        fetch_and_write(repo, &to, plan.clone(), &files, &counters, progress, cancel).await?;

    let symlinks = finish_links_and_dirs(&to, &plan, &skip, &dirs)?;
    if !failures.is_empty() {
        return Err(Error::RestoreFailed { failures });
    }
    counters.set_phase(Phase::Done);
    progress.report(&counters.report());
    let unchanged = skip.iter().filter(|s| **s).count() as u64;
    Ok(RestoreSummary {
        snapshot: resolved.snapshot,
        target: to.join(resolved.prefix.rsplit('/').next().unwrap_or("")),
        files: files.len() as u64,
        dirs: dirs.len() as u64,
        symlinks,
        bytes: counters.bytes_done.load(Ordering::Relaxed),
        unchanged,
        duration_ms: started.elapsed().as_millis() as u64,
    })
}

/// Creates the target directory if needed; returns its canonical path.
fn prepare_target(to: &Path) -> Result<PathBuf, Error> {
    std::fs::create_dir_all(to).map_err(|e| Error::io(to, e))?;
    let canonical = std::fs::canonicalize(to).map_err(|e| Error::io(to, e))?;
    if !canonical.is_dir() {
        return Err(Error::Invalid(format!(
            "restore target {} is not a directory",
            canonical.display()
        )));
    }
    Ok(canonical)
}

/// Maps every entry to its destination under `to`, validating every path before anything
/// touches the disk. The selected item (`prefix`) lands at `<to>/<its own name>`.
fn plan_paths(entries: Vec<EntryRow>, prefix: &str, to: &Path) -> Result<Vec<Planned>, Error> {
    let selected_parent = match prefix.rfind('/') {
        Some(i) => &prefix[..i + 1],
        None => "",
    };
    let mut plan = Vec::with_capacity(entries.len());
    for entry in entries {
        let rel = entry
            .path
            .strip_prefix(selected_parent)
            .and_then(safe_relative)
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "refusing to restore {:?}: the path would leave the target directory",
                    entry.path
                ))
            })?;
        let dest = to.join(rel);
        if !dest.starts_with(to) {
            return Err(Error::Invalid(format!(
                "refusing to restore {:?} outside {}",
                entry.path,
                to.display()
            )));
        }
        plan.push(Planned {
            entry,
            dest,
            chunks: Vec::new(),
        });
    }
    // A path may not pass through a symlink the restore itself creates.
    let links: Vec<&str> = plan
        .iter()
        .filter(|p| p.entry.kind == EntryKind::Symlink)
        .map(|p| p.entry.path.as_str())
        .collect();
    for p in &plan {
        if let Some(l) = links
            .iter()
            .find(|l| p.entry.path.starts_with(&format!("{l}/")))
        {
            return Err(Error::Invalid(format!(
                "refusing to restore {:?}: it lies under the symlink {l:?}",
                p.entry.path
            )));
        }
    }
    Ok(plan)
}

/// Compares what already exists with the plan: identical items are skipped (`true` in the
/// result), differing ones refuse the restore unless overwriting was asked for. Decided for
/// all before anything is written.
async fn check_existing(plan: &[Planned], overwrite: bool) -> Result<Vec<bool>, Error> {
    let checks: Vec<ExistingCheck> = plan
        .iter()
        .map(|p| {
            (
                p.dest.clone(),
                p.entry.kind,
                p.entry.size,
                p.entry.sha256,
                p.entry.target.clone(),
            )
        })
        .collect();
    let results = tokio::task::spawn_blocking(move || {
        checks
            .into_iter()
            .map(|(d, k, s, h, t)| existing_state(&d, k, s, h.as_ref(), t.as_deref()))
            .collect::<Vec<_>>()
    })
    .await
    .map_err(|e| Error::Invalid(format!("restore check failed: {e}")))?;
    let mut conflicts = Vec::new();
    let mut skip = vec![false; plan.len()];
    for (i, state) in results.into_iter().enumerate() {
        match state {
            Existing::Absent => {}
            Existing::Same => skip[i] = true,
            Existing::Differs => {
                if plan[i].entry.kind == EntryKind::Dir || !overwrite {
                    conflicts.push(plan[i].dest.clone());
                }
            }
            Existing::Error(e) => return Err(Error::io(&plan[i].dest, e)),
        }
    }
    if !conflicts.is_empty() {
        return Err(Error::Conflicts { paths: conflicts });
    }
    Ok(skip)
}

/// Gives every file to fetch its chunk list (one catalog query for the whole restore).
/// Returns the number of files and bytes to fetch.
async fn attach_chunk_lists(
    repo: &Repo,
    resolved: &Resolved,
    plan: &mut [Planned],
    skip: &[bool],
) -> Result<(u64, u64), Error> {
    let (mut files_total, mut bytes_total) = (0, 0);
    let chunk_lists = repo
        .catalog
        .content_chunks_under(resolved.root_id, resolved.snapshot.seq, &resolved.prefix)
        .await?;
    for (i, p) in plan.iter_mut().enumerate() {
        if p.entry.kind != EntryKind::File || skip[i] {
            continue;
        }
        let content = p.entry.content_id.ok_or_else(|| {
            Error::Invalid(format!("catalog entry {} has no content", p.entry.path))
        })?;
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
        bytes_total += p.entry.size;
        files_total += 1;
    }
    Ok((files_total, bytes_total))
}

/// Creates the symlinks, then sets directory metadata deepest first (writing files touched
/// their mtimes). Returns the number of symlinks made.
fn finish_links_and_dirs(
    to: &Path,
    plan: &[Planned],
    skip: &[bool],
    dirs: &[usize],
) -> Result<u64, Error> {
    let mut symlinks = 0;
    for (i, p) in plan.iter().enumerate() {
        if p.entry.kind == EntryKind::Symlink && !skip[i] {
            restore_symlink(to, p)?;
            symlinks += 1;
        }
    }
    for &i in dirs.iter().rev() {
        let p = &plan[i];
        std::fs::set_permissions(&p.dest, std::fs::Permissions::from_mode(p.entry.mode))
            .map_err(|e| Error::io(&p.dest, e))?;
        filetime::set_file_mtime(&p.dest, mtime_of(p.entry.mtime_ns))
            .map_err(|e| Error::io(&p.dest, e))?;
    }
    Ok(symlinks)
}

fn mtime_of(ns: i64) -> filetime::FileTime {
    filetime::FileTime::from_unix_time(
        ns.div_euclid(1_000_000_000),
        ns.rem_euclid(1_000_000_000) as u32,
    )
}

/// What to compare an existing path against: destination, kind, size, hash, link target.
type ExistingCheck = (PathBuf, EntryKind, u64, Option<[u8; 32]>, Option<String>);

enum Existing {
    Absent,
    Same,
    Differs,
    Error(std::io::Error),
}

/// What is at `dest` already, compared with the entry to restore.
fn existing_state(
    dest: &Path,
    kind: EntryKind,
    size: u64,
    sha: Option<&[u8; 32]>,
    target: Option<&str>,
) -> Existing {
    let meta = match std::fs::symlink_metadata(dest) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Existing::Absent,
        Err(e) => return Existing::Error(e),
    };
    match kind {
        EntryKind::Dir if meta.is_dir() => Existing::Same,
        EntryKind::Symlink if meta.file_type().is_symlink() => match std::fs::read_link(dest) {
            Ok(t) if Some(t.as_os_str()) == target.map(std::ffi::OsStr::new) => Existing::Same,
            _ => Existing::Differs,
        },
        EntryKind::File if meta.is_file() && meta.len() == size => match (sha, sha256_file(dest)) {
            (Some(want), Ok(have)) if &have == want => Existing::Same,
            (_, Err(e)) => Existing::Error(e),
            _ => Existing::Differs,
        },
        _ => Existing::Differs,
    }
}

fn sha256_file(path: &Path) -> std::io::Result<[u8; 32]> {
    let mut f = File::open(path)?;
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

/// Creates `dest` (a directory under `to`) and any missing parents, refusing to pass
/// through symlinks or to replace files.
fn ensure_dir(to: &Path, dest: &Path) -> Result<(), Error> {
    let rel = dest
        .strip_prefix(to)
        .map_err(|_| Error::Invalid(format!("{} is outside {}", dest.display(), to.display())))?;
    let mut cur = to.to_path_buf();
    for c in rel.components() {
        cur.push(c);
        match std::fs::symlink_metadata(&cur) {
            Ok(m) if m.is_dir() => {}
            Ok(m) if m.file_type().is_symlink() => {
                return Err(Error::Invalid(format!(
                    "refusing to restore through the symlink {}",
                    cur.display()
                )));
            }
            Ok(_) => return Err(Error::Conflicts { paths: vec![cur] }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir(&cur).map_err(|e| Error::io(&cur, e))?;
            }
            Err(e) => return Err(Error::io(&cur, e)),
        }
    }
    Ok(())
}

fn temp_name(dest: &Path) -> PathBuf {
    let mut r = [0u8; 6];
    getrandom::fill(&mut r).expect("operating system random source failed");
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dest.with_file_name(format!(".{name}.storinator-{}.tmp", hex::encode(r)))
}

fn restore_symlink(to: &Path, p: &Planned) -> Result<(), Error> {
    if let Some(parent) = p.dest.parent() {
        ensure_dir(to, parent)?;
    }
    let target = p.entry.target.as_deref().unwrap_or("");
    let tmp = temp_name(&p.dest);
    std::os::unix::fs::symlink(target, &tmp).map_err(|e| Error::io(&tmp, e))?;
    let _ = filetime::set_symlink_file_times(
        &tmp,
        mtime_of(p.entry.mtime_ns),
        mtime_of(p.entry.mtime_ns),
    );
    std::fs::rename(&tmp, &p.dest).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(&p.dest, e)
    })
}

/// Largest single range read: adjacent blobs are fetched together up to this size.
const MAX_READ: u64 = 8 << 20;
/// Gap between blobs that is cheaper to read through than to skip.
const MAX_GAP: u64 = 64 << 10;
/// Range reads in flight.
const READS_IN_FLIGHT: usize = 4;

/// One blob of a range read, destined for a file.
struct BlobSlot {
    id: ChunkId,
    offset_in_read: usize,
    length: usize,
    raw_length: usize,
}

/// A range read covering adjacent blobs of one pack.
struct RangeRead {
    obj: ObjectRef,
    offset: u64,
    len: u64,
    blobs: Vec<BlobSlot>,
}

/// A decrypted blob (or why it could not be had), in file order.
type BlobResult = Result<Vec<u8>, String>;

/// Fetches every file's chunks in file order and writes the files on a writer thread.
/// Returns the paths that failed, with reasons.
async fn fetch_and_write(
    repo: &Repo,
    to: &Path,
    plan: Arc<Vec<Planned>>,
    files: &[usize],
    counters: &Arc<Counters>,
    progress: &dyn Progress,
    cancel: &CancelFlag,
) -> Result<Vec<(String, String)>, Error> {
    // Plan range reads over the blobs in file order, merging neighbours in the same pack.
    let mut reads: Vec<RangeRead> = Vec::new();
    for &i in files {
        for c in &plan[i].chunks {
            let slot_end = c.offset + c.length;
            if let Some(r) = reads.last_mut()
                && r.obj.name == format!("{}.enc", c.pack_id)
                && c.offset >= r.offset + r.len
                && c.offset - (r.offset + r.len) <= MAX_GAP
                && slot_end - r.offset <= MAX_READ
            {
                r.blobs.push(BlobSlot {
                    id: c.id,
                    offset_in_read: (c.offset - r.offset) as usize,
                    length: c.length as usize,
                    raw_length: c.raw_length as usize,
                });
                r.len = slot_end - r.offset;
                continue;
            }
            reads.push(RangeRead {
                obj: ObjectRef::new(format!("{}.enc", c.pack_id), c.location.clone()),
                offset: c.offset,
                len: c.length,
                blobs: vec![BlobSlot {
                    id: c.id,
                    offset_in_read: 0,
                    length: c.length as usize,
                    raw_length: c.raw_length as usize,
                }],
            });
        }
    }

    // The writer thread consumes blobs in file order.
    let (blob_tx, blob_rx) = tokio::sync::mpsc::channel::<BlobResult>(8);
    let writer = {
        let plan = plan.clone();
        let files = files.to_vec();
        let counters = counters.clone();
        let to = to.to_path_buf();
        let cancel = cancel.clone();
        tokio::task::spawn_blocking(move || {
            write_files(&to, &plan, &files, blob_rx, &counters, &cancel)
        })
    };

    let keys = repo.keys().clone();
    let mut inflight: VecDeque<tokio::task::JoinHandle<Vec<BlobResult>>> = VecDeque::new();
    let mut pending = reads.into_iter();
    let mut last_report = Instant::now();
    let mut send_failed = false;
    loop {
        while inflight.len() < READS_IN_FLIGHT {
            let Some(read) = pending.next() else { break };
            inflight.push_back(tokio::spawn(fetch_range(
                repo.storage.clone(),
                keys.clone(),
                read,
            )));
        }
        let Some(handle) = inflight.pop_front() else {
            break;
        };
        let blobs = handle
            .await
            .map_err(|e| Error::Invalid(format!("restore task failed: {e}")))?;
        for b in blobs {
            if blob_tx.send(b).await.is_err() {
                send_failed = true;
                break;
            }
        }
        if send_failed || cancel.is_cancelled() {
            break;
        }
        if last_report.elapsed() > Duration::from_millis(250) {
            progress.report(&counters.report());
            last_report = Instant::now();
        }
    }
    for h in inflight {
        h.abort();
    }
    drop(blob_tx);
    let failures = writer
        .await
        .map_err(|e| Error::Invalid(format!("restore writer failed: {e}")))??;
    if cancel.is_cancelled() {
        return Err(Error::Cancelled);
    }
    Ok(failures)
}

/// Reads one range and opens its blobs (checking each MAC and id).
async fn fetch_range(storage: Arc<dyn Storage>, keys: Keys, read: RangeRead) -> Vec<BlobResult> {
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
                let sealed = &data[b.offset_in_read..b.offset_in_read + b.length];
                let plain = crypto::open(Some(&keys), sealed, crate::format::pack::MAX_BLOB)
                    .map_err(|e| {
                        format!(
                            "chunk {} in pack {}: {e}",
                            &b.id.to_hex()[..12],
                            read.obj.name
                        )
                    })?;
                let encrypted = crypto::sealed_is_encrypted(sealed).unwrap_or(true);
                let id = if encrypted {
                    keys.chunk_id(&plain)
                } else {
                    crypto::plain_chunk_id(&plain)
                };
                if id != b.id || plain.len() != b.raw_length {
                    return Err(format!(
                        "chunk {} in pack {} holds the wrong data",
                        &b.id.to_hex()[..12],
                        read.obj.name
                    ));
                }
                Ok(plain)
            })
            .collect()
    })
    .await
    .unwrap_or_else(|e| vec![Err(format!("decrypt task failed: {e}"))])
}

/// Writes files from blobs arriving in file order. Each file goes to a temporary name and is
/// renamed only once its size and SHA-256 match.
fn write_files(
    to: &Path,
    plan: &[Planned],
    files: &[usize],
    mut blobs: tokio::sync::mpsc::Receiver<BlobResult>,
    counters: &Counters,
    cancel: &CancelFlag,
) -> Result<Vec<(String, String)>, Error> {
    let mut failures = Vec::new();
    let mut ensured: Option<&Path> = None;
    for &i in files {
        let p = &plan[i];
        if cancel.is_cancelled() {
            return Ok(failures);
        }
        // Files arrive sorted by path: consecutive files usually share their folder.
        if let Some(parent) = p.dest.parent()
            && ensured != Some(parent)
        {
            ensure_dir(to, parent)?;
            ensured = Some(parent);
        }
        let tmp = temp_name(&p.dest);
        let mut out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| Error::io(&tmp, e))?;
        let mut sha = Sha256::new();
        let mut written = 0u64;
        let mut failure: Option<String> = None;
        for _ in &p.chunks {
            let Some(blob) = blobs.blocking_recv() else {
                // The fetcher stopped (cancelled or failed): abandon this file.
                drop(out);
                let _ = std::fs::remove_file(&tmp);
                return Ok(failures);
            };
            match blob {
                Ok(data) if failure.is_none() => {
                    sha.update(&data);
                    if let Err(e) = out.write_all(&data) {
                        failure = Some(format!("writing {}: {e}", tmp.display()));
                    }
                    written += data.len() as u64;
                    Counters::add(&counters.bytes_done, data.len() as u64);
                }
                Ok(_) => {}
                Err(e) => {
                    failure.get_or_insert(e);
                }
            }
        }
        let digest: [u8; 32] = sha.finalize().into();
        if failure.is_none() && (written != p.entry.size || Some(digest) != p.entry.sha256) {
            failure = Some("content does not match its recorded SHA-256".into());
        }
        let finish = |out: File| -> std::io::Result<()> {
            out.set_permissions(std::fs::Permissions::from_mode(p.entry.mode))?;
            out.set_modified(mtime_of(p.entry.mtime_ns).into_system_time())?;
            drop(out);
            std::fs::rename(&tmp, &p.dest)
        };
        match failure {
            None => {
                if let Err(e) = finish(out) {
                    let _ = std::fs::remove_file(&tmp);
                    failures.push((p.entry.path.clone(), e.to_string()));
                }
            }
            Some(reason) => {
                drop(out);
                let _ = std::fs::remove_file(&tmp);
                // Reported once, through the error every caller shows (not logged as well).
                tracing::debug!("restore of {} failed: {reason}", p.entry.path);
                failures.push((p.entry.path.clone(), reason));
            }
        }
        Counters::add(&counters.files_done, 1);
    }
    Ok(failures)
}

trait IntoSystemTime {
    fn into_system_time(self) -> std::time::SystemTime;
}

impl IntoSystemTime for filetime::FileTime {
    fn into_system_time(self) -> std::time::SystemTime {
        let base = std::time::UNIX_EPOCH;
        if self.unix_seconds() >= 0 {
            base + Duration::new(self.unix_seconds() as u64, self.nanoseconds())
        } else {
            base - Duration::from_secs(self.unix_seconds().unsigned_abs())
                + Duration::from_nanos(u64::from(self.nanoseconds()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
