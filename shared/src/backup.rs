//! The backup pipeline: walk, skip unchanged files, chunk, dedup, seal, pack, store, commit.
//!
//! Threads: `readers` threads each take whole files (read with aligned buffers, cut into
//! chunks, hash the file, compute keyed chunk ids and decide dedup), `sealers` threads
//! compress/encrypt/MAC new chunks and append them to the current pack. Finished packs go to
//! an async uploader that records each pack in the catalog only once storage has it. The
//! snapshot (its listing, then the snapshot object, then the catalog rows) is committed last,
//! so a crash anywhere leaves at most unreferenced packs, which the next run deduplicates
//! against instead of uploading again (invariants 1 and 2).

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::Row;

use crate::catalog::{self, EntryKind, EntryRow, SnapshotInfo, db, now_ms};
use crate::chunker::{Chunker, ChunkerParams};
use crate::crypto::{self, ChunkId, SealMode};
use crate::error::Error;
use crate::pack::{BlobKind, FinishedPack, PackWriter};
use crate::progress::{CancelFlag, Counters, Phase, Progress};
use crate::repo::Repo;

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
            "snapshot {}: {} files, {} dirs, {} in snapshot, {} read, {} new stored ({} new chunks, dedup {:.1}x), {:.1}s{}",
            s.short_id,
            s.files,
            s.dirs,
            human_bytes(s.bytes),
            human_bytes(s.bytes_read),
            human_bytes(s.bytes_stored),
            self.new_data_chunks,
            self.dedup_ratio(),
            secs,
            if self.warnings.is_empty() {
                String::new()
            } else {
                format!(", {} warnings", self.warnings.len())
            }
        )
    }
}

/// `1.5 MiB`-style sizes.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// One line of a snapshot listing, as stored (encrypted) in storage.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListingEntry {
    #[serde(rename = "p")]
    pub path: String,
    #[serde(rename = "k")]
    pub kind: EntryKind,
    #[serde(rename = "s")]
    pub size: u64,
    #[serde(rename = "m")]
    pub mtime_ns: i64,
    #[serde(rename = "o")]
    pub mode: u32,
    #[serde(rename = "i")]
    pub inode: u64,
    #[serde(rename = "h", default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(rename = "c", default, skip_serializing_if = "Vec::is_empty")]
    pub chunks: Vec<ChunkId>,
    #[serde(rename = "t", default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// The snapshot object, as stored in storage.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SnapshotObject {
    pub version: u32,
    pub owner: String,
    pub root: String,
    pub hostname: String,
    pub encrypted: bool,
    pub started_at: i64,
    pub finished_at: i64,
    pub listing: Vec<ChunkId>,
    pub files: u64,
    pub dirs: u64,
    pub bytes: u64,
    pub bytes_read: u64,
    pub new_chunks: u64,
    pub bytes_stored: u64,
    pub warnings: u64,
}

/// Chunk sizes for listings: smaller than data chunks so a small change in a large tree
/// stores little.
pub(crate) const LISTING_CHUNKS: ChunkerParams = ChunkerParams {
    min: 16 * 1024,
    avg: 64 * 1024,
    max: 256 * 1024,
};
/// zstd level for listings and snapshot objects (JSON compresses well).
const META_COMPRESSION: i32 = 3;
/// Plaintext cap when opening blobs (largest chunk is 4 MiB; listings are smaller).
pub(crate) const MAX_BLOB: usize = 16 << 20;

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

/// What reading a file produced.
struct FileData {
    sha256: [u8; 32],
    size: u64,
    chunks: Vec<ChunkId>,
}

/// A file's chunk ids in order, filled in by the sealers (which compute the ids).
type ChunkList = Arc<Mutex<Vec<ChunkId>>>;

/// A chunk on its way to a sealer.
/// Readers only cut and hash the file; sealers compute the keyed id, decide dedup and seal.
/// That splits the per-byte work about evenly, so one large file keeps both cores busy.
struct SealJob {
    data: Vec<u8>,
    list: ChunkList,
    index: usize,
}

fn mtime_ns(meta: &std::fs::Metadata) -> i64 {
    meta.mtime()
        .saturating_mul(1_000_000_000)
        .saturating_add(meta.mtime_nsec())
}

/// Runs a backup. Called through [`Repo::backup`].
pub(crate) async fn run(
    repo: &Repo,
    opts: &BackupOptions,
    progress: &dyn Progress,
    cancel: &CancelFlag,
) -> Result<BackupSummary, Error> {
    let started = Instant::now();
    let started_at = now_ms();
    let src = std::fs::canonicalize(&opts.path).map_err(|e| Error::io(&opts.path, e))?;
    let meta = std::fs::metadata(&src).map_err(|e| Error::io(&src, e))?;
    if !meta.is_dir() {
        return Err(Error::Invalid(format!(
            "cannot back up {}: not a directory",
            src.display()
        )));
    }
    let root_str = src
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

    // One backup per root at a time: snapshot sequence numbers are per root.
    let _root_guard = repo.lock_root(&opts.owner, &root_str).await;

    let counters = Arc::new(Counters::default());
    counters.set_phase(Phase::Scanning);
    progress.report(&counters.report());

    // Forget packs a crashed run left half-uploaded; their spool files are garbage too.
    repo.catalog.forget_unfinished_packs().await?;
    clean_spool(repo.storage.spool_dir());

    let root_id = repo.catalog.root_id(&opts.owner, &root_str).await?;
    let previous = Arc::new(match root_id {
        Some(id) => repo.catalog.current_entries(id).await?,
        None => HashMap::new(),
    });
    let prev_chunks = match root_id {
        Some(id) => current_content_chunks(repo, id).await?,
        None => HashMap::new(),
    };
    let known: HashSet<ChunkId> = repo
        .catalog
        .stored_chunk_ids()
        .await?
        .into_iter()
        .filter(|(_, enc)| *enc == opts.encrypt)
        .map(|(id, _)| id)
        .collect();

    // Walk (blocking I/O).
    let (items, to_read, mut warnings) = {
        let src = src.clone();
        let name = name.clone();
        let cancel = cancel.clone();
        let previous = previous.clone();
        tokio::task::spawn_blocking(move || walk(&src, &name, &previous, &cancel))
            .await
            .map_err(|e| Error::Invalid(format!("walker failed: {e}")))??
    };
    let files_total = items.iter().filter(|i| i.kind == EntryKind::File).count() as u64;
    let unchanged_files = files_total - to_read.len() as u64;
    counters.files_total.store(files_total, Ordering::Relaxed);
    counters
        .files_done
        .store(unchanged_files, Ordering::Relaxed);
    counters
        .bytes_total
        .store(to_read.iter().map(|(_, s)| *s).sum(), Ordering::Relaxed);
    counters.set_phase(Phase::Uploading);
    progress.report(&counters.report());
    // Worst case (nothing deduplicates): every byte read is uploaded.
    let upload_bytes: u64 = to_read.iter().map(|(_, s)| *s).sum();
    let packs = upload_bytes.div_ceil(repo.settings.pack_size).max(1);
    if let Some(estimate) = repo.storage.estimate(upload_bytes, packs) {
        tracing::info!(?estimate, "transfer estimate");
        progress.estimate(&estimate);
    }

    // Uploader: stores finished packs, then indexes them in the catalog.
    let (pack_tx, pack_rx) = tokio::sync::mpsc::channel::<FinishedPack>(1);
    let uploader = tokio::spawn(upload_packs(
        repo.storage.clone(),
        repo.catalog.clone(),
        pack_rx,
    ));

    // Chunk, seal and pack (CPU-bound threads).
    let pipeline = Pipeline {
        keys: repo.keys().clone(),
        encrypt: opts.encrypt,
        compression: repo.settings.compression,
        chunker: repo.settings.chunker,
        pack_size: repo.settings.pack_size,
        threads: repo.settings.threads.max(1),
        spool: repo.storage.spool_dir().to_path_buf(),
        known: Mutex::new(known),
        counters: counters.clone(),
        cancel: cancel.clone(),
        failed: AtomicBool::new(false),
        new_chunks: AtomicU64::new(0),
        new_bytes: AtomicU64::new(0),
    };
    let pipeline = Arc::new(pipeline);
    let read_paths: Vec<(PathBuf, String, u64)> = to_read
        .iter()
        .map(|(i, _)| (items[*i].abs.clone(), items[*i].rel.clone(), items[*i].size))
        .collect();

    // Progress ticker.
    let ticker = {
        let counters = counters.clone();
        let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
        (stop_tx, async move {
            let mut last = None;
            loop {
                tokio::select! {
                    _ = &mut stop_rx => break,
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                }
                let r = counters.report();
                if last.as_ref() != Some(&r) {
                    progress.report(&r);
                    last = Some(r);
                }
            }
        })
    };
    let (stop_ticker, ticker_fut) = ticker;

    let work = {
        let pipeline = pipeline.clone();
        let pack_tx = pack_tx.clone();
        tokio::task::spawn_blocking(move || pipeline.read_all(read_paths, pack_tx))
    };
    let (read_result, ()) = tokio::join!(
        async {
            let r = work.await;
            let _ = stop_ticker.send(());
            r
        },
        ticker_fut
    );
    let (results, packer) =
        match read_result.map_err(|e| Error::Invalid(format!("backup thread failed: {e}")))? {
            Ok(v) => v,
            Err(e) => {
                // Let finished packs land (the next run reuses them), then report the failure.
                // An upload failure stops the pipeline too: report the cause, not the symptom.
                drop(pack_tx);
                return match uploader.await {
                    Ok(Err(upload_error)) => Err(upload_error),
                    _ => Err(e),
                };
            }
        };

    // Collect file results; unreadable files become warnings.
    let mut file_data: Vec<Option<FileData>> = Vec::with_capacity(results.len());
    for (r, (idx, _)) in results.into_iter().zip(&to_read) {
        match r {
            Ok((data, warning)) => {
                if let Some(w) = warning {
                    warnings.push(w);
                }
                file_data.push(Some(data));
            }
            Err(message) => {
                warnings.push(Warning {
                    path: items[*idx].rel.clone(),
                    message,
                });
                file_data.push(None);
            }
        }
    }

    // Build the listing (sorted by path) and the snapshot object.
    counters.set_phase(Phase::Committing);
    progress.report(&counters.report());
    let mut listing = Vec::with_capacity(items.len() * 160);
    let (mut files, mut dirs, mut bytes) = (0u64, 0u64, 0u64);
    let mut kept: Vec<usize> = Vec::with_capacity(items.len());
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
                files += 1;
                bytes += size;
            }
            EntryKind::Dir => dirs += 1,
            EntryKind::Symlink => {}
        }
        kept.push(i);
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
        };
        serde_json::to_writer(&mut listing, &line).expect("listing entries serialize");
        listing.push(b'\n');
    }
    let bytes_read: u64 = file_data.iter().flatten().map(|d| d.size).sum();

    let finished_at = now_ms();
    let n_warnings = warnings.len() as u64;
    let hostname = repo.settings.hostname.clone();
    let snapshot_id = {
        let pipeline = pipeline.clone();
        let opts = opts.clone();
        let root_str = root_str.clone();
        tokio::task::spawn_blocking(move || -> Result<ChunkId, Error> {
            let mut packer = packer;
            let listing_ids =
                pipeline.store_bytes(&mut packer, &listing, BlobKind::Listing, &pack_tx)?;
            let object = SnapshotObject {
                version: 1,
                owner: opts.owner.clone(),
                root: root_str,
                hostname,
                encrypted: opts.encrypt,
                started_at,
                finished_at,
                listing: listing_ids,
                files,
                dirs,
                bytes,
                bytes_read,
                new_chunks: pipeline.new_chunks.load(Ordering::Relaxed),
                bytes_stored: pipeline.counters.bytes_stored.load(Ordering::Relaxed),
                warnings: n_warnings,
            };
            let json = serde_json::to_vec(&object).expect("snapshot object serializes");
            let id = pipeline.blob_id(&json);
            pipeline.add_blob(&mut packer, BlobKind::Snapshot, id, &json, &pack_tx)?;
            if let Some(w) = packer.take() {
                let done = w
                    .finish(pipeline.mode())
                    .map_err(|e| Error::io(&pipeline.spool, e))?;
                pack_tx
                    .blocking_send(done)
                    .map_err(|_| Error::Invalid("uploader stopped".into()))?;
            }
            Ok(id)
        })
        .await
        .map_err(|e| Error::Invalid(format!("backup thread failed: {e}")))?
    };
    let packs = uploader
        .await
        .map_err(|e| Error::Invalid(format!("uploader failed: {e}")))??;
    let snapshot_id = snapshot_id?;

    // Every pack is durable: now the catalog may say the snapshot exists.
    let new_chunks = pipeline.new_chunks.load(Ordering::Relaxed);
    let info = SnapshotInfo {
        short_id: snapshot_id.to_hex()[..12].to_string(),
        owner: opts.owner.clone(),
        root: root_str.clone(),
        seq: 0,
        hostname: repo.settings.hostname.clone(),
        encrypted: opts.encrypt,
        started_at,
        finished_at,
        files,
        dirs,
        bytes,
        bytes_read,
        new_chunks,
        bytes_stored: counters.bytes_stored.load(Ordering::Relaxed),
        warnings: warnings.len() as u64,
    };
    let commit_items: Vec<NewEntry> = kept
        .iter()
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
                content,
            }
        })
        .collect();
    let seq = commit_snapshot(repo, &info, &snapshot_id, &commit_items, &previous).await?;
    counters.set_phase(Phase::Done);
    progress.report(&counters.report());
    Ok(BackupSummary {
        snapshot: SnapshotInfo { seq, ..info },
        new_data_chunks: new_chunks,
        new_data_bytes: pipeline.new_bytes.load(Ordering::Relaxed),
        packs,
        duration_ms: started.elapsed().as_millis() as u64,
        warnings,
    })
}

/// Chunk lists of the contents current in a root (to list unchanged files without reading).
async fn current_content_chunks(
    repo: &Repo,
    root_id: i64,
) -> Result<HashMap<i64, Vec<ChunkId>>, Error> {
    let rows = sqlx::query(
        "SELECT cc.content_id, cc.chunk_id FROM content_chunks cc WHERE cc.content_id IN \
         (SELECT content_id FROM entries WHERE root_id = ? AND to_seq IS NULL AND content_id IS NOT NULL) \
         ORDER BY cc.content_id, cc.seq",
    )
    .bind(root_id)
    .fetch_all(repo.catalog.pool())
    .await
    .map_err(db("loading chunk lists"))?;
    let mut out: HashMap<i64, Vec<ChunkId>> = HashMap::new();
    for r in rows {
        let id: Vec<u8> = r.get(1);
        out.entry(r.get(0))
            .or_default()
            .push(ChunkId::from_slice(&id)?);
    }
    Ok(out)
}

/// Removes leftovers of interrupted runs from the spool.
fn clean_spool(spool: &Path) {
    let _ = std::fs::create_dir_all(spool);
    if let Ok(rd) = std::fs::read_dir(spool) {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().ends_with(".partial") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

type WalkResult = (Vec<Item>, Vec<(usize, u64)>, Vec<Warning>);

/// Walks `src`; decides which files need reading.
fn walk(
    src: &Path,
    name: &str,
    previous: &HashMap<String, EntryRow>,
    cancel: &CancelFlag,
) -> Result<WalkResult, Error> {
    let mut items = Vec::new();
    let mut to_read = Vec::new();
    let mut warnings = Vec::new();
    let walker = walkdir::WalkDir::new(src)
        .follow_links(false)
        .sort_by_file_name();
    for entry in walker {
        if cancel.is_cancelled() {
            return Err(Error::Cancelled);
        }
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                let path = e
                    .path()
                    .map(|p| rel_display(src, name, p))
                    .unwrap_or_else(|| name.to_string());
                if e.depth() == 0 {
                    return Err(Error::Invalid(format!(
                        "cannot read {}: {e}",
                        src.display()
                    )));
                }
                warnings.push(Warning {
                    path,
                    message: e.to_string(),
                });
                continue;
            }
        };
        let rel = match rel_path(src, name, entry.path()) {
            Some(r) => r,
            None => {
                warnings.push(Warning {
                    path: rel_display(src, name, entry.path()),
                    message: "skipped: name is not valid UTF-8".into(),
                });
                continue;
            }
        };
        let meta = match entry.metadata() {
            Ok(m) => m,
            Err(e) => {
                warnings.push(Warning {
                    path: rel,
                    message: format!("skipped: {e}"),
                });
                continue;
            }
        };
        let ft = meta.file_type();
        let (kind, target) = if ft.is_dir() {
            (EntryKind::Dir, None)
        } else if ft.is_file() {
            (EntryKind::File, None)
        } else if ft.is_symlink() {
            match std::fs::read_link(entry.path()) {
                Ok(t) => match t.to_str() {
                    Some(t) => (EntryKind::Symlink, Some(t.to_string())),
                    None => {
                        warnings.push(Warning {
                            path: rel,
                            message: "skipped: symlink target is not valid UTF-8".into(),
                        });
                        continue;
                    }
                },
                Err(e) => {
                    warnings.push(Warning {
                        path: rel,
                        message: format!("skipped: {e}"),
                    });
                    continue;
                }
            }
        } else {
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
            warnings.push(Warning {
                path: rel,
                message: format!("skipped: {what}"),
            });
            continue;
        };
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
                    to_read.push((items.len(), size));
                    Content::Read(to_read.len() - 1)
                }
            }
        } else {
            Content::None
        };
        items.push(Item {
            rel,
            abs: entry.path().to_path_buf(),
            kind,
            size,
            mtime_ns: mtime,
            mode: meta.permissions().mode() & 0o7777,
            inode,
            target,
            content,
        });
    }
    Ok((items, to_read, warnings))
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

/// The CPU side of a backup.
struct Pipeline {
    keys: crypto::Keys,
    encrypt: bool,
    compression: Option<i32>,
    chunker: ChunkerParams,
    pack_size: u64,
    threads: usize,
    spool: PathBuf,
    known: Mutex<HashSet<ChunkId>>,
    counters: Arc<Counters>,
    cancel: CancelFlag,
    failed: AtomicBool,
    new_chunks: AtomicU64,
    new_bytes: AtomicU64,
}

type FileOutcome = Result<(FileData, Option<Warning>), String>;
/// A read file before its chunk ids are all known.
type PendingOutcome = Result<(FileData, ChunkList, Option<Warning>), String>;
type Packer = Option<PackWriter>;

impl Pipeline {
    fn mode(&self) -> SealMode<'_> {
        if self.encrypt {
            SealMode::Encrypted(&self.keys)
        } else {
            SealMode::Plain
        }
    }

    fn blob_id(&self, data: &[u8]) -> ChunkId {
        if self.encrypt {
            self.keys.chunk_id(data)
        } else {
            crypto::plain_chunk_id(data)
        }
    }

    fn cdc_seed(&self) -> u64 {
        // Derived from the id key: boundaries differ per repository (see chunker).
        let id = self.keys.chunk_id(b"t-storinator fastcdc gear seed");
        u64::from_le_bytes(id.0[..8].try_into().unwrap())
    }

    /// Reads every file, returning per-file outcomes in order and the open packer.
    fn read_all(
        self: Arc<Self>,
        files: Vec<(PathBuf, String, u64)>,
        pack_tx: tokio::sync::mpsc::Sender<FinishedPack>,
    ) -> Result<(Vec<FileOutcome>, Packer), Error> {
        let next = AtomicUsize::new(0);
        let results: Mutex<Vec<Option<PendingOutcome>>> =
            Mutex::new((0..files.len()).map(|_| None).collect());
        let packer: Mutex<Packer> = Mutex::new(None);
        let fatal: Mutex<Option<Error>> = Mutex::new(None);
        let (seal_tx, seal_rx) = mpsc::sync_channel::<SealJob>(self.threads * 2);
        let seal_rx = Mutex::new(seal_rx);
        std::thread::scope(|s| {
            let mut readers = Vec::new();
            for _ in 0..self.threads {
                let seal_tx = seal_tx.clone();
                readers.push(s.spawn(|| {
                    let seal_tx = seal_tx;
                    loop {
                        if self.failed.load(Ordering::Relaxed) {
                            break;
                        }
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some((path, rel, size)) = files.get(i) else {
                            break;
                        };
                        let outcome = self.read_file(path, rel, *size, &seal_tx);
                        match outcome {
                            Err(ReadError::Fatal(e)) => {
                                self.failed.store(true, Ordering::Relaxed);
                                fatal.lock().unwrap().get_or_insert(e);
                                break;
                            }
                            Err(ReadError::Skip(msg)) => {
                                results.lock().unwrap()[i] = Some(Err(msg))
                            }
                            Ok(v) => results.lock().unwrap()[i] = Some(Ok(v)),
                        }
                        Counters::add(&self.counters.files_done, 1);
                    }
                }));
            }
            drop(seal_tx);
            for _ in 0..self.threads {
                s.spawn(|| {
                    let mut buf = Vec::new();
                    loop {
                        let job = match seal_rx.lock().unwrap().recv() {
                            Ok(j) => j,
                            Err(_) => break,
                        };
                        if self.failed.load(Ordering::Relaxed) {
                            continue; // drain so readers never block
                        }
                        let id = self.blob_id(&job.data);
                        job.list.lock().unwrap()[job.index] = id;
                        if !self.known.lock().unwrap().insert(id) {
                            continue; // already stored, or being stored by this run
                        }
                        self.new_chunks.fetch_add(1, Ordering::Relaxed);
                        self.new_bytes
                            .fetch_add(job.data.len() as u64, Ordering::Relaxed);
                        buf.clear();
                        crypto::seal_into(&mut buf, self.mode(), &job.data, self.compression);
                        let mut guard = packer.lock().unwrap();
                        if let Err(e) = self.append(
                            &mut guard,
                            BlobKind::Data,
                            id,
                            &buf,
                            job.data.len(),
                            &pack_tx,
                        ) {
                            self.failed.store(true, Ordering::Relaxed);
                            fatal.lock().unwrap().get_or_insert(e);
                        }
                    }
                });
            }
            for r in readers {
                let _ = r.join();
            }
        });
        if let Some(e) = fatal.into_inner().unwrap() {
            if let Some(w) = packer.into_inner().unwrap() {
                w.discard();
            }
            return Err(e);
        }
        // Every sealer has finished: each file's chunk list is complete.
        let results = results
            .into_inner()
            .unwrap()
            .into_iter()
            .map(|r| {
                r.expect("every file was read")
                    .map(|(mut data, list, warning)| {
                        data.chunks = std::mem::take(&mut *list.lock().unwrap());
                        (data, warning)
                    })
            })
            .collect();
        Ok((results, packer.into_inner().unwrap()))
    }

    /// Appends a sealed blob to the current pack, starting a new pack when it would overflow.
    fn append(
        &self,
        packer: &mut Packer,
        kind: BlobKind,
        id: ChunkId,
        sealed: &[u8],
        raw_len: usize,
        pack_tx: &tokio::sync::mpsc::Sender<FinishedPack>,
    ) -> Result<(), Error> {
        if let Some(w) = packer.as_ref()
            && !w.is_empty()
            && w.size_with(sealed.len()) > self.pack_size
        {
            let w = packer.take().unwrap();
            let done = w
                .finish(self.mode())
                .map_err(|e| Error::io(&self.spool, e))?;
            pack_tx
                .blocking_send(done)
                .map_err(|_| Error::Invalid("pack upload failed".into()))?;
        }
        if packer.is_none() {
            *packer = Some(PackWriter::create(&self.spool).map_err(|e| Error::io(&self.spool, e))?);
        }
        packer
            .as_mut()
            .unwrap()
            .add(kind, id, sealed, raw_len, self.encrypt)
            .map_err(|e| Error::io(&self.spool, e))?;
        Counters::add(&self.counters.bytes_stored, sealed.len() as u64);
        Ok(())
    }

    /// Seals and packs one blob unless it is already known.
    fn add_blob(
        &self,
        packer: &mut Packer,
        kind: BlobKind,
        id: ChunkId,
        data: &[u8],
        pack_tx: &tokio::sync::mpsc::Sender<FinishedPack>,
    ) -> Result<(), Error> {
        if !self.known.lock().unwrap().insert(id) {
            return Ok(());
        }
        let sealed = crypto::seal(self.mode(), data, Some(META_COMPRESSION));
        self.append(packer, kind, id, &sealed, data.len(), pack_tx)
    }

    /// Chunks `data` (a listing) into blobs; returns their ids in order.
    fn store_bytes(
        &self,
        packer: &mut Packer,
        data: &[u8],
        kind: BlobKind,
        pack_tx: &tokio::sync::mpsc::Sender<FinishedPack>,
    ) -> Result<Vec<ChunkId>, Error> {
        let mut ids = Vec::new();
        let mut chunker = Chunker::new(data, LISTING_CHUNKS, self.cdc_seed());
        while let Some(chunk) = chunker
            .next_chunk()
            .map_err(|e| Error::Invalid(format!("chunking listing: {e}")))?
        {
            let id = self.blob_id(chunk);
            self.add_blob(packer, kind, id, chunk, pack_tx)?;
            ids.push(id);
        }
        Ok(ids)
    }

    fn read_file(
        &self,
        path: &Path,
        rel: &str,
        expected: u64,
        seal_tx: &mpsc::SyncSender<SealJob>,
    ) -> Result<(FileData, ChunkList, Option<Warning>), ReadError> {
        let file = File::open(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                ReadError::Skip("skipped: vanished before it could be read".into())
            }
            _ => ReadError::Skip(format!("skipped: cannot open: {e}")),
        })?;
        let before = file
            .metadata()
            .map_err(|e| ReadError::Skip(format!("skipped: {e}")))?;
        let mut chunker = Chunker::new(&file, self.chunker, self.cdc_seed());
        let mut sha = Sha256::new();
        let list: ChunkList = Arc::default();
        let mut size = 0u64;
        loop {
            if self.cancel.is_cancelled() {
                return Err(ReadError::Fatal(Error::Cancelled));
            }
            if self.failed.load(Ordering::Relaxed) {
                return Err(ReadError::Fatal(Error::Invalid("backup aborted".into())));
            }
            let chunk = match chunker.next_chunk() {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(e) => return Err(ReadError::Skip(format!("skipped: read error: {e}"))),
            };
            sha.update(chunk);
            size += chunk.len() as u64;
            Counters::add(&self.counters.bytes_done, chunk.len() as u64);
            let index = {
                let mut l = list.lock().unwrap();
                l.push(ChunkId([0; 32]));
                l.len() - 1
            };
            seal_tx
                .send(SealJob {
                    data: chunk.to_vec(),
                    list: list.clone(),
                    index,
                })
                .map_err(|_| ReadError::Fatal(Error::Invalid("backup aborted".into())))?;
        }
        let after = std::fs::symlink_metadata(path).ok();
        let changed = size != expected
            || after.is_none_or(|a| a.len() != before.len() || mtime_ns(&a) != mtime_ns(&before));
        let warning = changed.then(|| Warning {
            path: rel.to_string(),
            message: "changed while being read: stored as read; the next backup will read it again"
                .into(),
        });
        Ok((
            FileData {
                sha256: sha.finalize().into(),
                size,
                chunks: Vec::new(),
            },
            list,
            warning,
        ))
    }
}

enum ReadError {
    /// The file is left out of the snapshot (reported as a warning).
    Skip(String),
    /// The whole backup stops.
    Fatal(Error),
}

/// Content of an entry to commit.
pub(crate) enum NewContent {
    None,
    Existing(i64),
    New {
        sha256: [u8; 32],
        size: u64,
        chunks: Vec<ChunkId>,
    },
}

/// An entry to commit.
pub(crate) struct NewEntry {
    pub path: String,
    pub kind: EntryKind,
    pub size: u64,
    pub mtime_ns: i64,
    pub mode: u32,
    pub inode: u64,
    pub target: Option<String>,
    pub content: NewContent,
}

/// Ends an entry row's validity at snapshot `seq` (it changed or disappeared there).
async fn close_entry(tx: &mut sqlx::SqliteConnection, id: i64, seq: i64) -> Result<(), Error> {
    sqlx::query("UPDATE entries SET to_seq = ? WHERE id = ?")
        .bind(seq)
        .bind(id)
        .execute(tx)
        .await
        .map_err(db("committing the snapshot"))?;
    Ok(())
}

/// Records a snapshot and its entries in one transaction, writing rows only for what changed
/// since the root's previous snapshot. Returns the snapshot's sequence number.
pub(crate) async fn commit_snapshot(
    repo: &Repo,
    info: &SnapshotInfo,
    blob_id: &ChunkId,
    items: &[NewEntry],
    previous: &HashMap<String, EntryRow>,
) -> Result<i64, Error> {
    let ctx = "committing the snapshot";
    let mut tx = repo.catalog.pool().begin().await.map_err(db(ctx))?;
    sqlx::query(
        "INSERT INTO roots (owner, path) VALUES (?, ?) ON CONFLICT (owner, path) DO NOTHING",
    )
    .bind(&info.owner)
    .bind(&info.root)
    .execute(&mut *tx)
    .await
    .map_err(db(ctx))?;
    let root_id: i64 = sqlx::query_scalar("SELECT id FROM roots WHERE owner = ? AND path = ?")
        .bind(&info.owner)
        .bind(&info.root)
        .fetch_one(&mut *tx)
        .await
        .map_err(db(ctx))?;
    let seq: i64 =
        sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0) + 1 FROM snapshots WHERE root_id = ?")
            .bind(root_id)
            .fetch_one(&mut *tx)
            .await
            .map_err(db(ctx))?;
    let mut seen: HashSet<&str> = HashSet::with_capacity(items.len());
    for item in items {
        seen.insert(&item.path);
        let content_id = match &item.content {
            NewContent::None => None,
            NewContent::Existing(id) => Some(*id),
            NewContent::New {
                sha256,
                size,
                chunks,
            } => {
                let inserted = sqlx::query(
                    "INSERT INTO contents (sha256, size, encrypted) VALUES (?, ?, ?) \
                     ON CONFLICT (sha256, size, encrypted) DO NOTHING",
                )
                .bind(&sha256[..])
                .bind(*size as i64)
                .bind(info.encrypted)
                .execute(&mut *tx)
                .await
                .map_err(db(ctx))?
                .rows_affected();
                let id: i64 = sqlx::query_scalar(
                    "SELECT id FROM contents WHERE sha256 = ? AND size = ? AND encrypted = ?",
                )
                .bind(&sha256[..])
                .bind(*size as i64)
                .bind(info.encrypted)
                .fetch_one(&mut *tx)
                .await
                .map_err(db(ctx))?;
                if inserted == 1 {
                    for (i, c) in chunks.iter().enumerate() {
                        sqlx::query("INSERT INTO content_chunks (content_id, seq, chunk_id) VALUES (?, ?, ?)")
                            .bind(id)
                            .bind(i as i64)
                            .bind(&c.0[..])
                            .execute(&mut *tx)
                            .await
                            .map_err(db(ctx))?;
                    }
                }
                Some(id)
            }
        };
        let prev = previous.get(&item.path);
        let same = prev.is_some_and(|p| {
            p.kind == item.kind
                && p.size == item.size
                && p.mtime_ns == item.mtime_ns
                && p.mode == item.mode
                && p.inode == item.inode
                && p.content_id == content_id
                && p.target == item.target
        });
        if same {
            continue;
        }
        if let Some(p) = prev {
            close_entry(&mut tx, p.id, seq).await?;
        }
        sqlx::query(
            "INSERT INTO entries (root_id, path, kind, size, mtime_ns, mode, inode, content_id, target, from_seq) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(root_id)
        .bind(&item.path)
        .bind(item.kind.as_str())
        .bind(item.size as i64)
        .bind(item.mtime_ns)
        .bind(i64::from(item.mode))
        .bind(item.inode as i64)
        .bind(content_id)
        .bind(&item.target)
        .bind(seq)
        .execute(&mut *tx)
        .await
        .map_err(db(ctx))?;
    }
    for (path, p) in previous {
        if !seen.contains(path.as_str()) {
            close_entry(&mut tx, p.id, seq).await?;
        }
    }
    sqlx::query(
        "INSERT INTO snapshots (root_id, seq, short_id, blob_id, hostname, encrypted, started_at, finished_at, \
         files, dirs, bytes, bytes_read, new_chunks, bytes_stored, warnings) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(root_id)
    .bind(seq)
    .bind(&info.short_id)
    .bind(&blob_id.0[..])
    .bind(&info.hostname)
    .bind(info.encrypted)
    .bind(info.started_at)
    .bind(info.finished_at)
    .bind(info.files as i64)
    .bind(info.dirs as i64)
    .bind(info.bytes as i64)
    .bind(info.bytes_read as i64)
    .bind(info.new_chunks as i64)
    .bind(info.bytes_stored as i64)
    .bind(info.warnings as i64)
    .execute(&mut *tx)
    .await
    .map_err(db(ctx))?;
    tx.commit().await.map_err(db(ctx))?;
    Ok(seq)
}

/// Uploads finished packs one at a time and indexes each once storage has it.
async fn upload_packs(
    storage: Arc<dyn crate::storage::Storage>,
    catalog: catalog::Catalog,
    mut packs: tokio::sync::mpsc::Receiver<FinishedPack>,
) -> Result<u64, Error> {
    let mut count = 0u64;
    while let Some(pack) = packs.recv().await {
        let name = pack.id.object_name();
        // The id is recorded before the upload: a crash between the two is detectable.
        catalog
            .pack_uploading(&pack.id.0, pack.size, pack.encrypted)
            .await?;
        let location = crate::storage::with_retry(&format!("uploading {name}"), || {
            storage.put_file(&name, &pack.path)
        })
        .await?;
        catalog
            .pack_stored(
                &pack.id.0,
                pack.size,
                pack.encrypted,
                &location,
                &pack.entries,
            )
            .await?;
        count += 1;
    }
    Ok(count)
}
