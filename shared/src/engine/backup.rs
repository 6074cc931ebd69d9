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

use std::collections::HashMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::dedup::ChunkSet;
use super::packer::{Packer, upload_packs};
use super::pipeline::{FileOutcome, Pipeline};
use super::repo::Repo;
use super::run::{Run, lock_root, reclaim};
use super::spool::{SpoolReader, SpoolWriter};
use super::walk::{Walked, Walker};
use crate::catalog::{NewContent, NewEntry, Owner, PrevFile, SnapshotInfo, check_owner, now_ms};
use crate::error::Error;
use crate::format::EntryKind;
use crate::format::crypto::ChunkId;
use crate::format::keyring::RingKey;
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

/// A walked item as spooled between the stages: its listing line (the content filled in
/// once known) and what becomes of its content.
#[derive(Serialize, Deserialize)]
struct Item {
    #[serde(rename = "l")]
    line: ListingEntry,
    /// Unchanged since the previous snapshot: its content row (the line has its hash and
    /// chunk list).
    #[serde(rename = "c", default, skip_serializing_if = "Option::is_none")]
    reused: Option<i64>,
    /// A file to read.
    #[serde(rename = "r", default, skip_serializing_if = "is_false")]
    read: bool,
    /// Identical to the root's current row of its path (the commit keeps that row).
    #[serde(rename = "s", default, skip_serializing_if = "is_false")]
    same: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
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
    /// The file on disk of a stored path (which starts with the folder's own name).
    fn abs(&self, rel: &str) -> PathBuf {
        match rel.strip_prefix(self.name.as_str()) {
            Some("") => self.path.clone(),
            Some(rest) if rest.starts_with('/') => self.path.join(&rest[1..]),
            _ => self.path.join(rel),
        }
    }

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

/// The chunks already stored with this encryption setting and authenticated (dedup).
async fn stored_chunks(repo: &Repo, opts: &BackupOptions) -> Result<ChunkSet, Error> {
    let encrypt = opts.encrypt;
    let ids = repo
        .catalog
        .stored_chunk_ids(|flags| {
            // A format-1 unencrypted blob is not authenticated: `recover` would not index it,
            // so a new snapshot must not rely on it (its data is stored again, authenticated).
            (flags & pack::FLAG_ENCRYPTED != 0) == encrypt && pack::flags_authenticated(flags)
        })
        .await?;
    Ok(ChunkSet::from_ids(ids))
}

/// What the walk found, in total: progress and the transfer estimate are told up front.
#[derive(Default)]
struct Totals {
    files: u64,
    to_read: u64,
    read_bytes: u64,
}

/// What went into the snapshot's listing.
#[derive(Default)]
struct Listed {
    files: u64,
    dirs: u64,
    bytes: u64,
    bytes_read: u64,
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
    // The owner's key is stored (every lane) and recorded before any blob is sealed with it.
    let key = repo.owner_key(&opts.owner).await?;
    let run = Run::start(repo).await?;
    let mut result = run_locked(repo, opts, &key, &source, &run, progress, cancel).await;
    if let Err(Error::Changed(why)) = &result {
        // The catalog changed under this backup (typically: a prune condemned a pack whose
        // chunks it deduplicated against, so the commit guard refused the snapshot). Once
        // more, with a fresh dedup index: that data is stored again, nothing is lost.
        tracing::warn!("backup of {}: {why}; running it again", source.root);
        result = run_locked(repo, opts, &key, &source, &run, progress, cancel).await;
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
    key: &RingKey,
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
    let root_id = repo.catalog.root_id(&opts.owner, &source.root).await?;
    let pipeline = Arc::new(Pipeline::new(
        repo,
        &key.keys,
        opts.encrypt,
        stored_chunks(repo, opts).await?,
        &counters,
        cancel,
    ));
    let spool = run.spool();
    let mut warnings = Vec::new();
    let (items, lister, totals) = scan(
        repo,
        source,
        root_id,
        &pipeline,
        spool,
        &mut warnings,
        cancel,
    )
    .await?;
    tracing::debug!(elapsed = ?started.elapsed(), "backup: scan done");
    announce(repo, &totals, &counters, progress);

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
        spool.to_path_buf(),
        opts.encrypt,
        pack_tx,
    );
    let read = read_and_list(
        repo.batch(),
        &pipeline,
        source,
        items,
        lister,
        packer,
        &mut warnings,
        progress,
    )
    .await;
    let (packer, listed, entries) = match read {
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

    tracing::debug!(elapsed = ?started.elapsed(), "backup: files read");
    counters.set_phase(Phase::Committing);
    progress.report(&counters.report());
    let object = SnapshotObject {
        version: SNAPSHOT_VERSION,
        owner: opts.owner.clone(),
        root: source.root.clone(),
        hostname: repo.settings.hostname.clone(),
        encrypted: opts.encrypt,
        started_at,
        finished_at: now_ms(),
        listing: Vec::new(),
        files: listed.files,
        dirs: listed.dirs,
        bytes: listed.bytes,
        bytes_read: listed.bytes_read,
        new_chunks: 0,
        bytes_stored: 0,
        warnings: warnings.len() as u64,
    };
    let listing = spool.join(LISTING_SPOOL);
    let stored = store_snapshot_object(pipeline.clone(), packer, &listing, object).await;
    // An upload failure also stops the snapshot's store: report the cause first.
    let packs = uploader.join().await?;
    let (snapshot_id, object) = stored?;
    tracing::debug!(elapsed = ?started.elapsed(), packs, "backup: every pack stored");
    // Nothing more is stored: free the dedup index before the commit.
    if let Ok(mut ids) = pipeline.known.lock() {
        *ids = ChunkSet::default();
    }

    // Every pack is durable: now the catalog may say the snapshot exists.
    let bytes_stored = counters.bytes_stored.load(Ordering::Relaxed);
    let listing_ids = object.listing.clone();
    let info = snapshot_info(&snapshot_id, object, bytes_stored);
    let seq = commit(
        repo,
        &run.id,
        (&info, &key.key_id),
        &snapshot_id,
        &listing_ids,
        entries,
    )
    .await?;
    tracing::debug!(elapsed = ?started.elapsed(), "backup: snapshot committed");
    counters.set_phase(Phase::Done);
    progress.report(&counters.report());
    Ok(BackupSummary {
        snapshot: SnapshotInfo { seq, ..info },
        new_data_chunks: info.new_chunks,
        new_data_bytes: pipeline.new_bytes.load(Ordering::Relaxed),
        packs,
        duration_ms: started.elapsed().as_millis() as u64,
        warnings,
    })
}

/// The spooled stages' files in the run's folder (removed with it).
const ITEMS_SPOOL: &str = "items.jsonl";
const ENTRIES_SPOOL: &str = "entries.jsonl";
const LISTING_SPOOL: &str = "listing.jsonl";

/// Runs blocking work (file system, spool files) off the async runtime.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Invalid(format!("backup thread failed: {e}")))
}

/// The walk, a batch at a time, each batch compared with the previous snapshot's files of
/// its path range (the walk goes in the catalog's path order, so the ranges follow each
/// other): unchanged files keep their content, the others are to be read. Until the first
/// item to read, the items are listed at once (see [`ScanSide::push_all`]); from there on
/// they go to a spool file for [`read_and_list`]. Returned: that spool's reader, the
/// listing so far and the totals.
///
/// The file system and the catalog work side by side: while a batch's previous files are
/// read from the catalog, a blocking thread spools (or lists) the batch before it and walks
/// the next.
async fn scan(
    repo: &Repo,
    source: &Source,
    root_id: Option<i64>,
    pipeline: &Pipeline,
    spool: &Path,
    warnings: &mut Vec<Warning>,
    cancel: &CancelFlag,
) -> Result<(SpoolReader<Item>, Lister, Totals), Error> {
    let mut side = ScanSide {
        walk: Walk {
            walker: Walker::new(source.path.clone()),
            src: source.path.clone(),
            name: source.name.clone(),
            names: OwnerNames::default(),
            warnings: Vec::new(),
        },
        out: SpoolWriter::create(&spool.join(ITEMS_SPOOL))?,
        lister: Lister::create(spool)?,
        listing_ahead: true,
    };
    let mut totals = Totals::default();
    let mut after: Option<String> = None;
    let (n, cancel) = (repo.batch(), cancel.clone());
    let (s, walked) = blocking({
        let cancel = cancel.clone();
        move || side.walk_next(n, &cancel)
    })
    .await?;
    side = s;
    let mut batch = walked?;
    // Decided items waiting to be spooled.
    let mut decided = Vec::new();
    while let Some(last) = batch.last().map(|i| i.line.path.clone()) {
        let background = tokio::task::spawn_blocking({
            let cancel = cancel.clone();
            move || {
                let pushed = side.push_all(decided);
                let (side, walked) = side.walk_next(n, &cancel);
                (side, pushed, walked)
            }
        });
        let previous = match root_id {
            Some(id) => {
                repo.catalog
                    .previous_files(id, after.as_deref(), &last)
                    .await
            }
            None => Ok(HashMap::new()),
        };
        let (s, pushed, walked) = background
            .await
            .map_err(|e| Error::Invalid(format!("backup thread failed: {e}")))?;
        side = s;
        pushed?;
        let previous = previous?;
        {
            let stored = pipeline.known.lock().unwrap();
            for item in &mut batch {
                decide(item, previous.get(&item.line.path), &stored)?;
                if item.line.kind == EntryKind::File {
                    totals.files += 1;
                }
                if item.read {
                    totals.to_read += 1;
                    totals.read_bytes += item.line.size;
                }
            }
        }
        decided = std::mem::replace(&mut batch, walked?);
        after = Some(last);
    }
    warnings.append(&mut side.walk.warnings);
    let (items, lister) = blocking(move || {
        side.push_all(decided)?;
        Ok::<_, Error>((side.out.finish()?, side.lister))
    })
    .await??;
    Ok((items, lister, totals))
}

/// The file-system side of [`scan`], run on a blocking thread beside the catalog's reads:
/// the walk, and the items' spool file (or the listing).
struct ScanSide {
    walk: Walk,
    out: SpoolWriter<Item>,
    lister: Lister,
    /// No item so far is to be read: the items can be listed as they are decided.
    listing_ahead: bool,
}

impl ScanSide {
    /// The walk's next batch.
    fn walk_next(mut self, n: usize, cancel: &CancelFlag) -> (Self, Result<Vec<Item>, Error>) {
        let batch = self.walk.batch(n, cancel);
        (self, batch)
    }

    /// Takes decided items: lists them while none so far is to be read (their listing lines
    /// are final, and the listing goes in path order), spools them from the first one to read
    /// on. An unchanged tree is listed entirely here, beside the catalog's reads, and never
    /// spooled and read back.
    fn push_all(&mut self, items: Vec<Item>) -> Result<(), Error> {
        for item in items {
            self.listing_ahead &= !item.read;
            if self.listing_ahead {
                self.lister.list(item)?;
            } else {
                self.out.push(&item)?;
            }
        }
        Ok(())
    }
}

/// Decides what becomes of a walked item: a file's content (see [`decide_content`]), and
/// whether the item is identical to its current row in the catalog (every field the commit
/// compares, the content reused as it was). The scan holds the root's lock, so the commit
/// may keep such a row without reading it again.
fn decide(item: &mut Item, previous: Option<&PrevFile>, stored: &ChunkSet) -> Result<(), Error> {
    if item.line.kind == EntryKind::File {
        decide_content(item, previous, stored)?;
    }
    let Some(p) = previous.filter(|_| !item.read) else {
        return Ok(());
    };
    let line = &item.line;
    let now = NewEntry {
        path: String::new(), // the same path: `previous` is this path's row
        kind: line.kind,
        size: line.size,
        mtime_ns: line.mtime_ns,
        mode: line.mode,
        inode: line.inode,
        target: line.target.clone(),
        owner: Owner {
            uid: line.uid,
            gid: line.gid,
            user: line.user.clone(),
            group: line.group.clone(),
        },
        content: NewContent::None,
        same: false,
    };
    if crate::catalog::unchanged(&p.entry, &now, item.reused) {
        item.same = true;
    }
    Ok(())
}

/// Decides what becomes of a walked file's content. An unchanged file (same size, time and
/// inode as in the previous snapshot) keeps its content and chunk list, but only if every
/// chunk of it is among the stored ones this backup may rely on; otherwise (a chunk of a
/// pack known to be missing, one a scrub found damaged, a format-1 unencrypted chunk) it is
/// read and stored again, unchanged or not (invariant 1).
fn decide_content(
    item: &mut Item,
    previous: Option<&PrevFile>,
    stored: &ChunkSet,
) -> Result<(), Error> {
    let line = &mut item.line;
    let unchanged = previous.map(|p| &p.entry).filter(|p| {
        p.kind == EntryKind::File
            && p.size == line.size
            && p.mtime_ns == line.mtime_ns
            && p.inode == line.inode
    });
    let Some((p, content_id, sha256)) =
        unchanged.and_then(|p| Some((previous?, p.content_id?, p.sha256?)))
    else {
        item.read = true;
        return Ok(());
    };
    if p.chunks.is_empty() && line.size > 0 {
        return Err(Error::Invalid(format!(
            "catalog has no chunk list for {} (content {})\nhint: run `storinator-worker verify`",
            line.path, content_id
        )));
    }
    if line.size > 0 && !p.chunks.iter().all(|id| stored.contains(id)) {
        item.read = true;
        return Ok(());
    }
    line.sha256 = Some(hex::encode(sha256));
    line.chunks = p.chunks.clone();
    item.reused = Some(content_id);
    Ok(())
}

/// Reads what needs reading, a batch of items at a time, and lists every item that made it
/// (unreadable files become warnings) after those the scan listed. Returns the packer (the
/// listing and snapshot object go in after), what was listed and the entries' reader.
///
/// The listing of a batch and the fetch of the next one from the spool run on blocking
/// threads while the batch between them is read. Done one after the other, they left the
/// readers idle between batches (a backup of 100,000 small files kept 1.3 to 1.65 of 2 cores
/// busy while reading, 1.5 to 1.85 since, over two VMs). Items are still listed in path
/// order, a batch at a time; at most three batches are held.
#[allow(clippy::too_many_arguments)]
async fn read_and_list(
    batch_size: usize,
    pipeline: &Arc<Pipeline>,
    source: &Source,
    items: SpoolReader<Item>,
    mut lister: Lister,
    mut packer: Packer,
    warnings: &mut Vec<Warning>,
    progress: &dyn Progress,
) -> Result<(Packer, Listed, SpoolReader<Item>), Error> {
    let fetch = move |mut items: SpoolReader<Item>| {
        blocking(move || {
            let batch = items.next_batch(batch_size);
            (items, batch)
        })
    };
    let (mut items, mut batch) = fetch(items).await?;
    // The batch read last, with its results, waiting to be listed.
    let mut unlisted: Vec<Item> = Vec::new();
    loop {
        let batch_now = batch?;
        if batch_now.is_empty() {
            break;
        }
        let to_read: Vec<(PathBuf, String, u64)> = batch_now
            .iter()
            .filter(|i| i.read)
            .map(|i| (source.abs(&i.line.path), i.line.path.clone(), i.line.size))
            .collect();
        let reading = async {
            if to_read.is_empty() {
                Ok((Vec::new(), packer))
            } else {
                read_files(pipeline, to_read, packer, progress).await
            }
        };
        let listing = list(lister, std::mem::take(&mut unlisted));
        let (read, listed, fetched) = tokio::join!(reading, listing, fetch(items));
        // A failure to read is the one to report when several stages failed.
        let (results, p) = read?;
        packer = p;
        lister = listed?;
        (items, batch) = fetched?;
        unlisted = with_results(batch_now, results, warnings, &mut lister.listed);
    }
    let lister = list(lister, unlisted).await?;
    blocking(move || {
        let (listed, entries) = lister.finish()?;
        Ok((packer, listed, entries))
    })
    .await?
}

/// Lists `items` (in order) on a blocking thread.
async fn list(mut lister: Lister, items: Vec<Item>) -> Result<Lister, Error> {
    if items.is_empty() {
        return Ok(lister);
    }
    blocking(move || {
        items.into_iter().try_for_each(|item| lister.list(item))?;
        Ok::<_, Error>(lister)
    })
    .await?
}

/// Fills the read items' content from what reading produced, in order; leaves out the
/// files that could not be read (as warnings). Counts the bytes read.
fn with_results(
    batch: Vec<Item>,
    results: Vec<FileOutcome>,
    warnings: &mut Vec<Warning>,
    listed: &mut Listed,
) -> Vec<Item> {
    let mut results = results.into_iter();
    let mut kept = Vec::with_capacity(batch.len());
    for mut item in batch {
        if item.read {
            match results.next().expect("one result per file read") {
                Ok((data, warning)) => {
                    warnings.extend(warning);
                    item.line.sha256 = Some(hex::encode(data.sha256));
                    item.line.size = data.size;
                    item.line.chunks = data.chunks;
                    listed.bytes_read += data.size;
                }
                Err(message) => {
                    warnings.push(Warning {
                        path: item.line.path,
                        message,
                    });
                    continue;
                }
            }
        }
        kept.push(item);
    }
    kept
}

/// What becomes of the items that make it into the snapshot, in path order: the listing's
/// lines (one spool file, stored as the snapshot's listing) and the catalog's entries
/// (another, the commit's input), and the counts.
struct Lister {
    listing: SpoolWriter<ListingEntry>,
    entries: SpoolWriter<Item>,
    listed: Listed,
}

impl Lister {
    fn create(spool: &Path) -> Result<Lister, Error> {
        Ok(Lister {
            listing: SpoolWriter::create(&spool.join(LISTING_SPOOL))?,
            entries: SpoolWriter::create(&spool.join(ENTRIES_SPOOL))?,
            listed: Listed::default(),
        })
    }

    /// Lists an item whose content is known (reused or read).
    fn list(&mut self, mut item: Item) -> Result<(), Error> {
        match item.line.kind {
            EntryKind::File => {
                self.listed.files += 1;
                self.listed.bytes += item.line.size;
            }
            EntryKind::Dir => self.listed.dirs += 1,
            EntryKind::Symlink => {}
        }
        self.listing.push(&item.line)?;
        if item.reused.is_some() {
            // The catalog has this content with its chunk list: the commit names it by its
            // row.
            item.line.sha256 = None;
            item.line.chunks = Vec::new();
        }
        self.entries.push(&item)
    }

    /// Closes the listing (left for the snapshot's store) and opens the entries for the
    /// commit.
    fn finish(self) -> Result<(Listed, SpoolReader<Item>), Error> {
        self.listing.close()?;
        Ok((self.listed, self.entries.finish()?))
    }
}

/// Records the snapshot in the catalog from the spooled entries, a batch at a time.
async fn commit(
    repo: &Repo,
    run_id: &str,
    (info, key_id): (&SnapshotInfo, &str),
    snapshot_id: &ChunkId,
    listing: &[ChunkId],
    entries: SpoolReader<Item>,
) -> Result<i64, Error> {
    let mut commit = repo
        .catalog
        .begin_snapshot_commit(run_id, (info, key_id), snapshot_id, listing)
        .await?;
    // The next batch is read from the spool while this one is written to the catalog.
    let n = repo.batch();
    let read = move |mut entries: SpoolReader<Item>| {
        let batch = entries.next_batch(n).and_then(|items| {
            items
                .into_iter()
                .map(new_entry)
                .collect::<Result<Vec<_>, _>>()
        });
        (entries, batch)
    };
    let (mut entries, mut batch) = blocking(move || read(entries)).await?;
    loop {
        let batch_now = batch?;
        if batch_now.is_empty() {
            break;
        }
        let next = tokio::task::spawn_blocking(move || read(entries));
        commit.add(&batch_now.iter().collect::<Vec<_>>()).await?;
        (entries, batch) = next
            .await
            .map_err(|e| Error::Invalid(format!("backup thread failed: {e}")))?;
    }
    commit.finish(info, snapshot_id, listing).await
}

/// The catalog row of an item that made it into the snapshot.
fn new_entry(item: Item) -> Result<NewEntry, Error> {
    let line = item.line;
    let content = match (line.kind, item.reused) {
        (EntryKind::File, Some(id)) => NewContent::Existing(id),
        (EntryKind::File, None) => {
            let sha256 = line
                .sha256
                .as_deref()
                .and_then(|h| hex::decode(h).ok())
                .and_then(|h| <[u8; 32]>::try_from(h).ok())
                .ok_or_else(|| {
                    Error::Invalid(format!("spooled entry {} has no hash", line.path))
                })?;
            NewContent::New {
                sha256,
                size: line.size,
                chunks: line.chunks,
            }
        }
        _ => NewContent::None,
    };
    Ok(NewEntry {
        path: line.path,
        kind: line.kind,
        size: line.size,
        mtime_ns: line.mtime_ns,
        mode: line.mode,
        inode: line.inode,
        target: line.target,
        owner: Owner {
            uid: line.uid,
            gid: line.gid,
            user: line.user,
            group: line.group,
        },
        content,
        same: item.same,
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

/// Tells progress how much there is to do, and storage's estimate of the transfer.
fn announce(repo: &Repo, totals: &Totals, counters: &Counters, progress: &dyn Progress) {
    let unchanged_files = totals.files - totals.to_read;
    // Worst case (nothing deduplicates): every byte read is uploaded.
    let upload_bytes = totals.read_bytes;
    counters.files_total.store(totals.files, Ordering::Relaxed);
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
    read_paths: Vec<(PathBuf, String, u64)>,
    packer: Packer,
    progress: &dyn Progress,
) -> Result<(Vec<FileOutcome>, Packer), Error> {
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

/// Stores the listing and then the snapshot object (filling in the listing's chunk ids and
/// this run's counts), and sends the last pack to the uploader. Returns the snapshot's id
/// and the object as stored.
async fn store_snapshot_object(
    pipeline: Arc<Pipeline>,
    mut packer: Packer,
    listing: &Path,
    mut object: SnapshotObject,
) -> Result<(ChunkId, SnapshotObject), Error> {
    let listing = listing.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let file = std::fs::File::open(&listing).map_err(|e| Error::io(&listing, e))?;
        object.listing = pipeline.store_bytes(&mut packer, file, BlobKind::Listing)?;
        // The listing is stored: its spooled copy is no longer needed.
        let _ = std::fs::remove_file(&listing);
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

/// The walk's state between batches.
struct Walk {
    walker: Walker,
    src: PathBuf,
    name: String,
    names: OwnerNames,
    warnings: Vec<Warning>,
}

impl Walk {
    /// The next (up to) `n` items in path order; what is left out becomes a warning.
    fn batch(&mut self, n: usize, cancel: &CancelFlag) -> Result<Vec<Item>, Error> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            if cancel.is_cancelled() {
                return Err(Error::Cancelled);
            }
            let Some(walked) = self.walker.next() else {
                break;
            };
            match walked {
                Walked::Unlisted(dir, e) if dir == self.src => {
                    return Err(Error::Invalid(format!(
                        "cannot read {}: {e}",
                        self.src.display()
                    )));
                }
                Walked::Unlisted(dir, e) => self.warnings.push(Warning {
                    path: rel_display(&self.src, &self.name, &dir),
                    message: format!("cannot list the folder: {e}"),
                }),
                Walked::Entry(path, meta) => {
                    match walked_item(&self.src, &self.name, &path, meta, &mut self.names) {
                        Ok(item) => out.push(item),
                        Err(w) => self.warnings.push(w),
                    }
                }
            }
        }
        Ok(out)
    }
}

/// One walked entry as an item of the snapshot (its content not decided yet), or the
/// warning that leaves it out.
fn walked_item(
    src: &Path,
    name: &str,
    path: &Path,
    meta: std::io::Result<std::fs::Metadata>,
    names: &mut OwnerNames,
) -> Result<Item, Warning> {
    let rel = rel_path(src, name, path).ok_or_else(|| Warning {
        path: rel_display(src, name, path),
        message: "skipped: name is not valid UTF-8".into(),
    })?;
    let skipped = |message: String| Warning {
        path: rel.clone(),
        message,
    };
    let meta = meta.map_err(|e| skipped(format!("skipped: {e}")))?;
    let (kind, target) = classify(path, &meta).map_err(skipped)?;
    let size = if kind == EntryKind::File {
        meta.len()
    } else {
        0
    };
    let owner = names.owner(meta.uid(), meta.gid());
    Ok(Item {
        line: ListingEntry {
            path: rel,
            kind,
            size,
            mtime_ns: mtime_ns(&meta),
            mode: meta.permissions().mode() & 0o7777,
            inode: meta.ino(),
            sha256: None,
            chunks: Vec::new(),
            target,
            uid: owner.uid,
            gid: owner.gid,
            user: owner.user,
            group: owner.group,
        },
        reused: None,
        read: false,
        same: false,
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
