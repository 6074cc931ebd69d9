//! A backup: walk the tree, skip unchanged files, hand the rest to the [`Pipeline`] (read,
//! chunk, dedup, seal) and the [`Packer`] (pack, upload), then commit the snapshot.
//!
//! Finished packs go to an async uploader that records each pack in the catalog only once
//! storage has it. The snapshot (its listing, then the snapshot object, then the catalog rows)
//! is committed last, so a crash anywhere leaves at most unreferenced packs, which the next run
//! deduplicates against instead of uploading again (invariants 1 and 2).
//!
//! [`Pipeline`]: super::pipeline::Pipeline
//! [`Packer`]: super::packer::Packer

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::packer::{Packer, upload_packs};
use super::pipeline::{FileData, FileOutcome, Pipeline};
use super::repo::Repo;
use super::run::{Run, lock_root, reclaim};
use crate::catalog::{EntryRow, NewContent, NewEntry, Owner, SnapshotInfo, check_owner, now_ms};
use crate::error::Error;
use crate::format::EntryKind;
use crate::format::crypto::ChunkId;
use crate::format::pack::{self, BlobKind, FinishedPack};
use crate::format::snapshot::{ListingEntry, SNAPSHOT_VERSION, SnapshotObject};
use crate::progress::{CancelFlag, Counters, Phase, Progress, human_bytes};
/// What to back up.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BackupOptions {
    /// The folder to back up; stored paths start at its own name.
    pub path: PathBuf,
    /// Who owns the snapshot: `local` for the CLI, `tg:<user id>` for chat users.
    pub owner: String,
    /// Encrypt (the default). Unencrypted backups still carry SHA-256 integrity.
    pub encrypt: bool,
}

/// Something that did not make it into the snapshot, or made it in doubtfully.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Warning {
    pub path: String,
    pub message: String,
}

/// The outcome of a backup.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BackupSummary {
    pub snapshot: SnapshotInfo,
    /// Data chunks that were new (not already stored).
    pub new_data_chunks: u64,
    /// Plaintext bytes of those chunks.
    pub new_data_bytes: u64,
    /// Packs uploaded by this run.
    pub packs: u64,
    pub duration_ms: u64,
    pub warnings: Vec<Warning>,
}

impl BackupSummary {
    /// Logical size of the snapshot over what this run stored.
    pub fn dedup_ratio(&self) -> f64 {
        self.snapshot.bytes as f64 / self.snapshot.bytes_stored.max(1) as f64
    }

    /// One line for a person.
    pub fn line(&self) -> String {
        let s = &self.snapshot;
        let secs = self.duration_ms as f64 / 1000.0;
        format!(
            "snapshot {}: {}, {}, {} in snapshot, {} read, {} new stored ({}, dedup {}), {:.1}s{}",
            s.short_id,
            crate::progress::plural(s.files, "file", "files"),
            crate::progress::plural(s.dirs, "dir", "dirs"),
            human_bytes(s.bytes),
            human_bytes(s.bytes_read),
            human_bytes(s.bytes_stored),
            crate::progress::plural(self.new_data_chunks, "new chunk", "new chunks"),
            crate::progress::dedup_figure(s.bytes, s.bytes_stored),
            secs,
            if self.warnings.is_empty() {
                String::new()
            } else {
                format!(
                    ", {}",
                    crate::progress::plural(self.warnings.len() as u64, "warning", "warnings")
                )
            }
        )
    }
}

/// A walked item.
struct Item {
    rel: String,
    abs: PathBuf,
    kind: EntryKind,
    size: u64,
    mtime_ns: i64,
    mode: u32,
    inode: u64,
    target: Option<String>,
    owner: Owner,
    content: Content,
}

enum Content {
    None,
    /// Unchanged since the previous snapshot.
    Reused {
        content_id: i64,
        sha256: [u8; 32],
    },
    /// To be read: index into the read results.
    Read(usize),
}

pub(super) fn mtime_ns(meta: &std::fs::Metadata) -> i64 {
    meta.mtime()
        .saturating_mul(1_000_000_000)
        .saturating_add(meta.mtime_nsec())
}

/// The folder being backed up.
struct Source {
    /// Canonical absolute path.
    path: PathBuf,
    /// `path` as a string: the root's identity in the catalog.
    root: String,
    /// The folder's own name: stored paths start with it.
    name: String,
}

impl Source {
    fn open(path: &Path) -> Result<Source, Error> {
        let src = std::fs::canonicalize(path).map_err(|e| Error::io(path, e))?;
        let meta = std::fs::metadata(&src).map_err(|e| Error::io(&src, e))?;
        if !meta.is_dir() {
            return Err(Error::Invalid(format!(
                "cannot back up {}: not a directory",
                src.display()
            )));
        }
        let root = src
            .to_str()
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "cannot back up {}: path is not valid UTF-8",
                    src.display()
                ))
            })?
            .to_string();
        let name = src
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("root")
            .to_string();
        Ok(Source {
            path: src,
            root,
            name,
        })
    }
}

/// What the catalog already knows: the root's previous snapshot and the stored chunks.
struct Known {
    previous: Arc<HashMap<String, EntryRow>>,
    /// Chunk lists of the previous snapshot's contents, to list unchanged files unread.
    prev_chunks: HashMap<i64, Vec<ChunkId>>,
    /// Chunks already stored with this encryption setting and authenticated (dedup).
    stored: HashSet<ChunkId>,
}

impl Known {
    async fn load(repo: &Repo, opts: &BackupOptions, root: &str) -> Result<Known, Error> {
        let root_id = repo.catalog.root_id(&opts.owner, root).await?;
        let (previous, prev_chunks) = match root_id {
            Some(id) => (
                repo.catalog.current_entries(id).await?,
                repo.catalog.current_content_chunks(id).await?,
            ),
            None => (HashMap::new(), HashMap::new()),
        };
        let stored = repo
            .catalog
            .stored_chunk_ids()
            .await?
            .into_iter()
            // A format-1 unencrypted blob is not authenticated: `recover` would not index it,
            // so a new snapshot must not rely on it (its data is stored again, authenticated).
            .filter(|(_, flags)| {
                (flags & pack::FLAG_ENCRYPTED != 0) == opts.encrypt
                    && pack::flags_authenticated(*flags)
            })
            .map(|(id, _)| id)
            .collect();
        Ok(Known {
            previous: Arc::new(previous),
            prev_chunks,
            stored,
        })
    }
}

/// What the walk found.
struct Scan {
    items: Vec<Item>,
    /// The files to read: index into `items`, and size.
    to_read: Vec<(usize, u64)>,
    warnings: Vec<Warning>,
}

/// The snapshot's listing, built from the walk and what reading produced.
struct Listing {
    /// JSON lines, sorted by path.
    json: Vec<u8>,
    /// Items that made it into the snapshot (unreadable files did not).
    kept: Vec<usize>,
    files: u64,
    dirs: u64,
    bytes: u64,
}

/// Runs a backup. Called through [`Repo::backup`].
///
/// The backup is a [`Run`]: its packs wait in its own spool folder, and the root's lock in
/// the catalog keeps any other run, in this process or another, from committing a snapshot of
/// the same root at the same time.
pub(crate) async fn run(
    repo: &Repo,
    opts: &BackupOptions,
    progress: &dyn Progress,
    cancel: &CancelFlag,
) -> Result<BackupSummary, Error> {
    check_owner(&opts.owner)?;
    let source = Source::open(&opts.path)?;
    let run = Run::start(repo).await?;
    let mut result = run_locked(repo, opts, &source, &run, progress, cancel).await;
    if let Err(Error::Changed(why)) = &result {
        // The catalog changed under this backup (typically: a prune condemned a pack whose
        // chunks it deduplicated against, so the commit guard refused the snapshot). Once
        // more, with a fresh dedup index: that data is stored again, nothing is lost.
        tracing::warn!("backup of {}: {why}; running it again", source.root);
        result = run_locked(repo, opts, &source, &run, progress, cancel).await;
    }
    let finished = run.finish(repo).await;
    match (result, finished) {
        (Err(e), _) => Err(e),
        (Ok(summary), Ok(())) => Ok(summary),
        (Ok(summary), Err(e)) => {
            // The snapshot is committed; the next run reclaims what this one left.
            tracing::warn!("ending the backup run: {e}");
            Ok(summary)
        }
    }
}

async fn run_locked(
    repo: &Repo,
    opts: &BackupOptions,
    source: &Source,
    run: &Run,
    progress: &dyn Progress,
    cancel: &CancelFlag,
) -> Result<BackupSummary, Error> {
    let started = Instant::now();
    let started_at = now_ms();
    let counters = Arc::new(Counters::default());
    progress.report(&counters.report());
    lock_root(
        repo,
        run,
        &opts.owner,
        &source.root,
        repo.waits_for_locks(),
        cancel,
    )
    .await?;
    counters.set_phase(Phase::Scanning);
    progress.report(&counters.report());

    // What crashed runs left: their unfinished packs (deleted from storage), spools, locks.
    let reclaimed = reclaim(repo, &run.id).await?;
    if !reclaimed.packs.is_empty() {
        tracing::info!(packs = ?reclaimed.packs, "deleted unfinished packs of runs that died");
    }
    let known = Known::load(repo, opts, &source.root).await?;
    let mut scan = scan(source, &known.previous, cancel).await?;
    reread_unstored(&mut scan, &known);
    announce(repo, &scan, &counters, progress);

    // Uploader: stores finished packs, then indexes them in the catalog.
    let (pack_tx, pack_rx) = mpsc::channel::<FinishedPack>(1);
    let uploader = Uploader(tokio::spawn(upload_packs(
        repo.storage.clone(),
        repo.catalog.clone(),
        run.id.clone(),
        pack_rx,
    )));
    let packer = Packer::new(
        repo.settings.pack_size,
        run.spool().to_path_buf(),
        opts.encrypt,
        pack_tx,
    );
    let pipeline = Arc::new(Pipeline::new(
        repo,
        opts.encrypt,
        known.stored,
        &counters,
        cancel,
    ));
    let (results, packer) = match read_files(&pipeline, &scan, packer, progress).await {
        Ok(v) => v,
        Err(e) => {
            // Let finished packs land (the next run reuses them), then report the failure.
            // An upload failure stops the pipeline too: report the cause, not the symptom.
            return match uploader.join().await {
                Err(upload_error) => Err(upload_error),
                Ok(_) => Err(e),
            };
        }
    };
    let file_data = collect_results(results, &mut scan);

    counters.set_phase(Phase::Committing);
    progress.report(&counters.report());
    let listing = build_listing(&scan.items, &file_data, &known.prev_chunks)?;
    let bytes_read: u64 = file_data.iter().flatten().map(|d| d.size).sum();
    let object = SnapshotObject {
        version: SNAPSHOT_VERSION,
        owner: opts.owner.clone(),
        root: source.root.clone(),
        hostname: repo.settings.hostname.clone(),
        encrypted: opts.encrypt,
        started_at,
        finished_at: now_ms(),
        listing: Vec::new(),
        files: listing.files,
        dirs: listing.dirs,
        bytes: listing.bytes,
        bytes_read,
        new_chunks: 0,
        bytes_stored: 0,
        warnings: scan.warnings.len() as u64,
    };
    let stored = store_snapshot_object(pipeline.clone(), packer, listing.json, object).await;
    // An upload failure also stops the snapshot's store: report the cause first.
    let packs = uploader.join().await?;
    let (snapshot_id, object) = stored?;

    // Every pack is durable: now the catalog may say the snapshot exists.
    let bytes_stored = counters.bytes_stored.load(Ordering::Relaxed);
    let listing_ids = object.listing.clone();
    let info = snapshot_info(&snapshot_id, object, bytes_stored);
    let entries = new_entries(&scan.items, &listing.kept, &file_data);
    let seq = repo
        .catalog
        .commit_snapshot(&run.id, &info, &snapshot_id, &listing_ids, &entries)
        .await?;
    counters.set_phase(Phase::Done);
    progress.report(&counters.report());
    Ok(BackupSummary {
        snapshot: SnapshotInfo { seq, ..info },
        new_data_chunks: info.new_chunks,
        new_data_bytes: pipeline.new_bytes.load(Ordering::Relaxed),
        packs,
        duration_ms: started.elapsed().as_millis() as u64,
        warnings: scan.warnings,
    })
}

/// The upload task. Dropping it (the backup's future was dropped) stops the uploads.
struct Uploader(tokio::task::JoinHandle<Result<u64, Error>>);

impl Uploader {
    async fn join(mut self) -> Result<u64, Error> {
        (&mut self.0)
            .await
            .map_err(|e| Error::Invalid(format!("uploader failed: {e}")))?
    }
}

impl Drop for Uploader {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// An unchanged file is listed with its previous chunk list only if every chunk of it is
/// among the stored ones this backup may rely on; otherwise (a chunk of a pack known to be
/// missing, one a scrub found damaged, a format-1 unencrypted chunk) it is read and stored
/// again, unchanged or not (invariant 1).
fn reread_unstored(scan: &mut Scan, known: &Known) {
    for (i, item) in scan.items.iter_mut().enumerate() {
        let Content::Reused { content_id, .. } = item.content else {
            continue;
        };
        let stored = known
            .prev_chunks
            .get(&content_id)
            .is_some_and(|c| c.iter().all(|id| known.stored.contains(id)));
        if !stored && item.size > 0 {
            scan.to_read.push((i, item.size));
            item.content = Content::Read(scan.to_read.len() - 1);
        }
    }
}

/// The catalog's view of a snapshot whose object is stored.
fn snapshot_info(id: &ChunkId, object: SnapshotObject, bytes_stored: u64) -> SnapshotInfo {
    SnapshotInfo {
        short_id: id.to_hex()[..12].to_string(),
        owner: object.owner,
        root: object.root,
        seq: 0,
        hostname: object.hostname,
        encrypted: object.encrypted,
        started_at: object.started_at,
        finished_at: object.finished_at,
        files: object.files,
        dirs: object.dirs,
        bytes: object.bytes,
        bytes_read: object.bytes_read,
        new_chunks: object.new_chunks,
        bytes_stored,
        warnings: object.warnings,
    }
}

/// Walks the tree (blocking I/O, off the runtime).
async fn scan(
    source: &Source,
    previous: &Arc<HashMap<String, EntryRow>>,
    cancel: &CancelFlag,
) -> Result<Scan, Error> {
    let (src, name) = (source.path.clone(), source.name.clone());
    let (cancel, previous) = (cancel.clone(), previous.clone());
    tokio::task::spawn_blocking(move || walk(&src, &name, &previous, &cancel))
        .await
        .map_err(|e| Error::Invalid(format!("walker failed: {e}")))?
}

/// Tells progress how much there is to do, and storage's estimate of the transfer.
fn announce(repo: &Repo, scan: &Scan, counters: &Counters, progress: &dyn Progress) {
    let files_total = scan
        .items
        .iter()
        .filter(|i| i.kind == EntryKind::File)
        .count() as u64;
    let unchanged_files = files_total - scan.to_read.len() as u64;
    // Worst case (nothing deduplicates): every byte read is uploaded.
    let upload_bytes: u64 = scan.to_read.iter().map(|(_, s)| *s).sum();
    counters.files_total.store(files_total, Ordering::Relaxed);
    counters
        .files_done
        .store(unchanged_files, Ordering::Relaxed);
    counters.bytes_total.store(upload_bytes, Ordering::Relaxed);
    counters.set_phase(Phase::Uploading);
    progress.report(&counters.report());
    let packs = upload_bytes.div_ceil(repo.settings.pack_size).max(1);
    if let Some(estimate) = repo.storage.estimate(upload_bytes, packs) {
        tracing::info!(?estimate, "transfer estimate");
        progress.estimate(&estimate);
    }
}

/// Runs the pipeline over the files to read (CPU-bound threads), reporting progress every
/// 250 ms while it works.
async fn read_files(
    pipeline: &Arc<Pipeline>,
    scan: &Scan,
    packer: Packer,
    progress: &dyn Progress,
) -> Result<(Vec<FileOutcome>, Packer), Error> {
    let read_paths: Vec<(PathBuf, String, u64)> = scan
        .to_read
        .iter()
        .map(|(i, _)| {
            let item = &scan.items[*i];
            (item.abs.clone(), item.rel.clone(), item.size)
        })
        .collect();
    let work = {
        let pipeline = pipeline.clone();
        tokio::task::spawn_blocking(move || pipeline.read_all(read_paths, packer))
    };
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let ticker = async {
        let mut last = None;
        loop {
            tokio::select! {
                _ = &mut stop_rx => break,
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
            let r = pipeline.counters.report();
            if last.as_ref() != Some(&r) {
                progress.report(&r);
                last = Some(r);
            }
        }
    };
    let (read_result, ()) = tokio::join!(
        async {
            let r = work.await;
            let _ = stop_tx.send(());
            r
        },
        ticker
    );
    read_result.map_err(|e| Error::Invalid(format!("backup thread failed: {e}")))?
}

/// Pairs read results with the items; unreadable files become warnings.
fn collect_results(results: Vec<FileOutcome>, scan: &mut Scan) -> Vec<Option<FileData>> {
    let mut file_data = Vec::with_capacity(results.len());
    for (r, (idx, _)) in results.into_iter().zip(&scan.to_read) {
        match r {
            Ok((data, warning)) => {
                scan.warnings.extend(warning);
                file_data.push(Some(data));
            }
            Err(message) => {
                scan.warnings.push(Warning {
                    path: scan.items[*idx].rel.clone(),
                    message,
                });
                file_data.push(None);
            }
        }
    }
    file_data
}

/// Builds the listing (sorted by path, as the walk was).
fn build_listing(
    items: &[Item],
    file_data: &[Option<FileData>],
    prev_chunks: &HashMap<i64, Vec<ChunkId>>,
) -> Result<Listing, Error> {
    let mut listing = Listing {
        json: Vec::with_capacity(items.len() * 160),
        kept: Vec::with_capacity(items.len()),
        files: 0,
        dirs: 0,
        bytes: 0,
    };
    for (i, item) in items.iter().enumerate() {
        let (sha, chunks, size) = match &item.content {
            Content::None => (None, Vec::new(), item.size),
            Content::Reused { content_id, sha256 } => {
                let chunks = match prev_chunks.get(content_id) {
                    Some(c) => c.clone(),
                    None if item.size == 0 => Vec::new(),
                    None => {
                        return Err(Error::Invalid(format!(
                            "catalog has no chunk list for {} (content {content_id})\nhint: run `storinator-worker verify`",
                            item.rel
                        )));
                    }
                };
                (Some(hex::encode(sha256)), chunks, item.size)
            }
            Content::Read(r) => match &file_data[*r] {
                Some(d) => (Some(hex::encode(d.sha256)), d.chunks.clone(), d.size),
                None => continue,
            },
        };
        match item.kind {
            EntryKind::File => {
                listing.files += 1;
                listing.bytes += size;
            }
            EntryKind::Dir => listing.dirs += 1,
            EntryKind::Symlink => {}
        }
        listing.kept.push(i);
        let line = ListingEntry {
            path: item.rel.clone(),
            kind: item.kind,
            size,
            mtime_ns: item.mtime_ns,
            mode: item.mode,
            inode: item.inode,
            sha256: sha,
            chunks,
            target: item.target.clone(),
            uid: item.owner.uid,
            gid: item.owner.gid,
            user: item.owner.user.clone(),
            group: item.owner.group.clone(),
        };
        serde_json::to_writer(&mut listing.json, &line).expect("listing entries serialize");
        listing.json.push(b'\n');
    }
    Ok(listing)
}

/// Stores the listing and then the snapshot object (filling in the listing's chunk ids and
/// this run's counts), and sends the last pack to the uploader. Returns the snapshot's id
/// and the object as stored.
async fn store_snapshot_object(
    pipeline: Arc<Pipeline>,
    mut packer: Packer,
    listing: Vec<u8>,
    mut object: SnapshotObject,
) -> Result<(ChunkId, SnapshotObject), Error> {
    tokio::task::spawn_blocking(move || {
        object.listing = pipeline.store_bytes(&mut packer, &listing, BlobKind::Listing)?;
        object.new_chunks = pipeline.new_chunks.load(Ordering::Relaxed);
        object.bytes_stored = pipeline.counters.bytes_stored.load(Ordering::Relaxed);
        let json = serde_json::to_vec(&object).expect("snapshot object serializes");
        let id = pipeline.blob_id(&json);
        pipeline.add_blob(&mut packer, BlobKind::Snapshot, id, &json)?;
        packer.flush(pipeline.mode())?;
        Ok((id, object))
    })
    .await
    .map_err(|e| Error::Invalid(format!("backup thread failed: {e}")))?
}

/// The catalog rows of the items that made it into the snapshot.
fn new_entries(items: &[Item], kept: &[usize], file_data: &[Option<FileData>]) -> Vec<NewEntry> {
    kept.iter()
        .map(|&i| {
            let item = &items[i];
            let content = match &item.content {
                Content::None => NewContent::None,
                Content::Reused { content_id, .. } => NewContent::Existing(*content_id),
                Content::Read(r) => {
                    let d = file_data[*r].as_ref().expect("kept items have data");
                    NewContent::New {
                        sha256: d.sha256,
                        size: d.size,
                        chunks: d.chunks.clone(),
                    }
                }
            };
            NewEntry {
                path: item.rel.clone(),
                kind: item.kind,
                size: match &content {
                    NewContent::New { size, .. } => *size,
                    _ => item.size,
                },
                mtime_ns: item.mtime_ns,
                mode: item.mode,
                inode: item.inode,
                target: item.target.clone(),
                owner: item.owner.clone(),
                content,
            }
        })
        .collect()
}

/// Walks `src` in path order; decides which files need reading.
fn walk(
    src: &Path,
    name: &str,
    previous: &HashMap<String, EntryRow>,
    cancel: &CancelFlag,
) -> Result<Scan, Error> {
    let mut scan = Scan {
        items: Vec::new(),
        to_read: Vec::new(),
        warnings: Vec::new(),
    };
    let mut names = OwnerNames::default();
    let walker = walkdir::WalkDir::new(src)
        .follow_links(false)
        .sort_by_file_name();
    for entry in walker {
        if cancel.is_cancelled() {
            return Err(Error::Cancelled);
        }
        let entry = match entry {
            Ok(e) => e,
            Err(e) if e.depth() == 0 => {
                return Err(Error::Invalid(format!(
                    "cannot read {}: {e}",
                    src.display()
                )));
            }
            Err(e) => {
                let path = e
                    .path()
                    .map(|p| rel_display(src, name, p))
                    .unwrap_or_else(|| name.to_string());
                scan.warnings.push(Warning {
                    path,
                    message: e.to_string(),
                });
                continue;
            }
        };
        match walked_item(
            src,
            name,
            &entry,
            previous,
            &mut scan.to_read,
            scan.items.len(),
            &mut names,
        ) {
            Ok(item) => scan.items.push(item),
            Err(w) => scan.warnings.push(w),
        }
    }
    Ok(scan)
}

/// One walked entry as an item of the snapshot, or the warning that leaves it out. A file
/// that needs reading is queued on `to_read` (as item number `index`).
fn walked_item(
    src: &Path,
    name: &str,
    entry: &walkdir::DirEntry,
    previous: &HashMap<String, EntryRow>,
    to_read: &mut Vec<(usize, u64)>,
    index: usize,
    names: &mut OwnerNames,
) -> Result<Item, Warning> {
    let rel = rel_path(src, name, entry.path()).ok_or_else(|| Warning {
        path: rel_display(src, name, entry.path()),
        message: "skipped: name is not valid UTF-8".into(),
    })?;
    let skipped = |message: String| Warning {
        path: rel.clone(),
        message,
    };
    let meta = entry
        .metadata()
        .map_err(|e| skipped(format!("skipped: {e}")))?;
    let (kind, target) = classify(entry.path(), &meta).map_err(skipped)?;
    let size = if kind == EntryKind::File {
        meta.len()
    } else {
        0
    };
    let mtime = mtime_ns(&meta);
    let inode = meta.ino();
    let content = if kind == EntryKind::File {
        match previous.get(&rel) {
            Some(p)
                if p.kind == EntryKind::File
                    && p.size == size
                    && p.mtime_ns == mtime
                    && p.inode == inode
                    && p.content_id.is_some()
                    && p.sha256.is_some() =>
            {
                Content::Reused {
                    content_id: p.content_id.unwrap(),
                    sha256: p.sha256.unwrap(),
                }
            }
            _ => {
                to_read.push((index, size));
                Content::Read(to_read.len() - 1)
            }
        }
    } else {
        Content::None
    };
    Ok(Item {
        rel,
        abs: entry.path().to_path_buf(),
        kind,
        size,
        mtime_ns: mtime,
        mode: meta.permissions().mode() & 0o7777,
        inode,
        target,
        owner: names.owner(meta.uid(), meta.gid()),
        content,
    })
}

/// User and group names by id, looked up once each (the system's user database, through
/// NSS).
#[derive(Default)]
struct OwnerNames {
    users: HashMap<u32, Option<String>>,
    groups: HashMap<u32, Option<String>>,
}

impl OwnerNames {
    fn owner(&mut self, uid: u32, gid: u32) -> Owner {
        let user = self
            .users
            .entry(uid)
            .or_insert_with(|| {
                nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
                    .ok()
                    .flatten()
                    .map(|u| u.name)
            })
            .clone();
        let group = self
            .groups
            .entry(gid)
            .or_insert_with(|| {
                nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid))
                    .ok()
                    .flatten()
                    .map(|g| g.name)
            })
            .clone();
        Owner {
            uid: Some(uid),
            gid: Some(gid),
            user,
            group,
        }
    }
}

/// The kind of a walked path (and a symlink's target), or why it is skipped.
fn classify(path: &Path, meta: &std::fs::Metadata) -> Result<(EntryKind, Option<String>), String> {
    let ft = meta.file_type();
    if ft.is_dir() {
        return Ok((EntryKind::Dir, None));
    }
    if ft.is_file() {
        return Ok((EntryKind::File, None));
    }
    if ft.is_symlink() {
        let t = std::fs::read_link(path).map_err(|e| format!("skipped: {e}"))?;
        return match t.to_str() {
            Some(t) => Ok((EntryKind::Symlink, Some(t.to_string()))),
            None => Err("skipped: symlink target is not valid UTF-8".into()),
        };
    }
    use std::os::unix::fs::FileTypeExt;
    let what = if ft.is_fifo() {
        "a fifo"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_block_device() || ft.is_char_device() {
        "a device"
    } else {
        "a special file"
    };
    Err(format!("skipped: {what}"))
}

fn rel_path(src: &Path, name: &str, p: &Path) -> Option<String> {
    let rest = p.strip_prefix(src).ok()?;
    if rest.as_os_str().is_empty() {
        return Some(name.to_string());
    }
    Some(format!("{name}/{}", rest.to_str()?))
}

fn rel_display(src: &Path, name: &str, p: &Path) -> String {
    match p.strip_prefix(src) {
        Ok(rest) if !rest.as_os_str().is_empty() => format!("{name}/{}", rest.to_string_lossy()),
        _ => name.to_string(),
    }
}
