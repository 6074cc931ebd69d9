//! `prune`: delete the packs no snapshot uses, and rewrite the sparse ones.
//!
//! # Why it is safe (invariant 7)
//!
//! Deleting is decided in two steps, and storage is only touched after the second:
//!
//! 1. **Condemn.** In one write transaction (`BEGIN IMMEDIATE`, so it is serialized with every
//!    snapshot commit), the catalog re-checks that a pack holds no live chunk (one that a
//!    snapshot in the catalog uses) and records it in `condemned_packs`. Any snapshot
//!    committed before that transaction was seen by the check.
//! 2. **Fence.** From that commit on, a condemned pack is not usable (`USABLE_PACK`): backups
//!    that load their dedup index afterwards store that data again (the chunk row moves to
//!    the new pack), and the commit guard in `commit_snapshot` refuses any snapshot that
//!    would use a chunk still placed in a condemned pack. A backup that loaded its index
//!    earlier and deduplicated against such a chunk therefore fails to commit with a
//!    retryable error and runs again (once, inside `backup`), storing the data anew. So no
//!    committed snapshot ever references a chunk in a condemned pack, and deleting the
//!    condemned pack from storage cannot hurt one.
//!
//! Packs created after the oldest run still registered (a backup in flight, whose snapshot
//! is not committed yet) are not considered at all, so prune never condemns the packs a
//! running backup just uploaded; a prune therefore never waits for a backup, nor a backup
//! for a prune.
//!
//! Repacking copies each live blob of a sparse pack (read, authenticated against its id,
//! written unchanged into a new pack), uploads the new pack and records it (the uploaded
//! pack holds no chunk yet, so a crash here leaves a pack the next prune deletes as unused),
//! then repoints the chunks at it in one transaction, and only then condemns the old pack
//! (with the same re-check: a chunk some backup reused meanwhile keeps it alive).
//!
//! A condemned pack's object is deleted, and then the catalog forgets it; a crash between
//! the two leaves a condemned row that the next prune finishes (deleting a missing object is
//! not an error). At every point, every chunk a snapshot uses is in a stored pack that the
//! catalog points at.

use std::collections::HashMap;

use futures_util::StreamExt;
use serde::Serialize;
use tokio::sync::mpsc;

use super::packer::upload_packs;
use super::ranges;
use super::repo::Repo;
use super::run::{Run, reclaim};
use crate::catalog::{Catalog, PackUsage, now_ms};
use crate::error::Error;
use crate::format::crypto::{Keys, SealMode};
use crate::format::pack::{self, BlobKind, MAX_BLOB, MAX_SEALED_BLOB, PackEntry, PackWriter};
use crate::format::snapshot::SnapshotObject;
use crate::progress::{CancelFlag, Phase, Progress, ProgressReport};
use crate::storage::{ObjectRef, REMOVE_BATCH, with_retry};

/// What to prune.
#[derive(Clone, Debug)]
pub struct PruneOptions {
    pub dry_run: bool,
    /// Most live bytes moved by repacking in this run (None: no limit).
    pub max_repack: Option<u64>,
    /// Repack packs whose live share is below this percentage.
    pub repack_below: f64,
}

impl Default for PruneOptions {
    fn default() -> Self {
        PruneOptions {
            dry_run: false,
            max_repack: None,
            repack_below: 50.0,
        }
    }
}

/// What a prune found and did (or, in a dry run, would do).
#[derive(Clone, Debug, Default, Serialize)]
pub struct PruneReport {
    pub dry_run: bool,
    /// Stored packs considered, and their bytes.
    pub packs: u64,
    pub bytes: u64,
    /// Packs with no live chunk: deleted.
    pub unused_packs: u64,
    pub unused_bytes: u64,
    /// Sparse packs rewritten, the live bytes moved out of them, and the new packs.
    pub repacked_packs: u64,
    pub repacked_bytes: u64,
    pub repacked_freed: u64,
    pub new_packs: u64,
    /// Sparse packs left for a later run (over --max-repack, or holding unauthenticated
    /// format-1 blobs).
    pub sparse_left: u64,
    /// Packs newer than a backup still running: not considered this time.
    pub recent_packs: u64,
    /// Packs a previous prune condemned but did not finish deleting.
    pub resumed_packs: u64,
    /// Objects deleted from storage, and the calls it took.
    pub deleted_objects: u64,
    pub delete_calls: u64,
    /// Snapshot objects read to learn their listing chunks (snapshots from older versions).
    pub listings_read: u64,
    /// Packs condemned and deleted in this run, by id.
    pub deleted: Vec<String>,
}

impl PruneReport {
    /// Bytes freed in storage (or that would be).
    pub fn freed(&self) -> u64 {
        self.unused_bytes + self.repacked_freed
    }
}

/// Refuses options no prune can honour, naming the option.
fn check_options(opts: &PruneOptions) -> Result<(), Error> {
    if !(0.0..=100.0).contains(&opts.repack_below) {
        return Err(Error::Invalid(format!(
            "--repack-below {} is not a percentage from 0 to 100",
            opts.repack_below
        )));
    }
    Ok(())
}

/// Runs a prune. A dry run changes nothing in storage (it may record listing chunks of old
/// snapshots in the catalog, which is a cache of storage). `progress` hears the packs
/// deleted (as files) and the live bytes moved by repacking (as bytes).
pub async fn prune(
    repo: &Repo,
    opts: &PruneOptions,
    progress: &dyn Progress,
    cancel: &CancelFlag,
) -> Result<PruneReport, Error> {
    check_options(opts)?;
    let run = Run::start(repo).await?;
    let result = prune_in_run(repo, &run, opts, progress, cancel).await;
    let finished = run.finish(repo).await;
    let report = result?;
    finished?;
    Ok(report)
}

/// What a prune with `opts` would delete and rewrite now, and free: the dry run that
/// `prune --dry-run`, `stats`, `/usage` and the chat's `/prune` all show. From the catalog
/// alone (no key; snapshots from older versions whose listings are unknown count as using
/// nothing beyond their files until a prune reads them: [`UsageReport::listings_unknown`]).
pub async fn estimate(
    catalog: &Catalog,
    opts: &PruneOptions,
    pack_size: u64,
) -> Result<PruneReport, Error> {
    check_options(opts)?;
    estimate_at(catalog, opts, pack_size, None, now_ms()).await
}

/// [`estimate`] as a prune started at `started` by run `own_run` sees it.
async fn estimate_at(
    catalog: &Catalog,
    opts: &PruneOptions,
    pack_size: u64,
    own_run: Option<&str>,
    started: i64,
) -> Result<PruneReport, Error> {
    let survey = Survey::take(catalog, own_run, started).await?;
    let plan = Plan::new(&survey.usage, opts, pack_size);
    Ok(survey.report(&plan, true))
}

async fn prune_in_run(
    repo: &Repo,
    run: &Run,
    opts: &PruneOptions,
    progress: &dyn Progress,
    cancel: &CancelFlag,
) -> Result<PruneReport, Error> {
    let started = now_ms();
    let mut shown = ProgressReport {
        phase: Phase::Pruning,
        ..Default::default()
    };
    progress.report(&shown);
    let mut resumed = PruneReport::default();
    if !opts.dry_run {
        // Dead runs still registered would hold the fence back; their leftovers go first.
        reclaim(repo, &run.id).await?;
        delete_condemned(repo, &mut resumed, &mut shown, progress).await?;
    }
    resumed.listings_read = learn_listings(repo).await?;
    if opts.dry_run {
        let mut report = estimate_at(
            &repo.catalog,
            opts,
            repo.settings.pack_size,
            Some(&run.id),
            started,
        )
        .await?;
        report.listings_read = resumed.listings_read;
        return Ok(report);
    }
    let survey = Survey::take(&repo.catalog, Some(&run.id), started).await?;
    let plan = Plan::new(&survey.usage, opts, repo.settings.pack_size);
    let mut report = survey.report(&plan, false);
    report.resumed_packs = resumed.deleted_objects;
    report.deleted_objects = resumed.deleted_objects;
    report.delete_calls = resumed.delete_calls;
    report.deleted = resumed.deleted;
    report.listings_read = resumed.listings_read;
    shown.files_total = shown.files_done + (plan.unused.len() + plan.sparse.len()) as u64;
    shown.bytes_total = plan.sparse.iter().map(|p| p.live_bytes).sum();
    progress.report(&shown);
    let unused: Vec<String> = plan.unused.iter().map(|p| p.id.clone()).collect();
    repo.catalog.condemn_unused_packs(&unused).await?;
    if !plan.sparse.is_empty() && !cancel.is_cancelled() {
        repack(repo, run, &plan.sparse, &mut report, &mut shown, progress).await?;
    }
    delete_condemned(repo, &mut report, &mut shown, progress).await?;
    shown.phase = Phase::Done;
    progress.report(&shown);
    Ok(report)
}

/// The packs a prune considers: every stored, not condemned pack created before the oldest
/// run still registered (other than the prune's own) and before the prune started.
struct Survey {
    usage: Vec<PackUsage>,
    /// Packs left out because a backup that may use them has not committed yet.
    recent: u64,
}

impl Survey {
    async fn take(catalog: &Catalog, own_run: Option<&str>, started: i64) -> Result<Survey, Error> {
        let fence = catalog
            .runs()
            .await?
            .iter()
            .filter(|r| Some(r.id.as_str()) != own_run)
            .map(|r| r.started_at)
            .fold(started, i64::min);
        let (usage, recent): (Vec<PackUsage>, Vec<PackUsage>) = catalog
            .pack_usage(i64::MAX)
            .await?
            .into_iter()
            .partition(|p| p.created_at < fence);
        Ok(Survey {
            usage,
            recent: recent.len() as u64,
        })
    }

    /// The report's figures from the plan; a dry run also counts the repacks as done.
    fn report(&self, plan: &Plan, dry_run: bool) -> PruneReport {
        let mut report = PruneReport {
            dry_run,
            packs: self.usage.len() as u64,
            bytes: self.usage.iter().map(|p| p.size).sum(),
            unused_packs: plan.unused.len() as u64,
            unused_bytes: plan.unused.iter().map(|p| p.size).sum(),
            sparse_left: plan.left as u64,
            recent_packs: self.recent,
            ..Default::default()
        };
        if dry_run {
            report.repacked_packs = plan.sparse.len() as u64;
            report.repacked_bytes = plan.sparse.iter().map(|p| p.live_bytes).sum();
            report.repacked_freed = plan.sparse.iter().map(|p| p.size - p.live_bytes).sum();
        }
        report
    }
}

/// Which packs go, and which are rewritten.
struct Plan<'a> {
    unused: Vec<&'a PackUsage>,
    sparse: Vec<&'a PackUsage>,
    left: usize,
}

impl<'a> Plan<'a> {
    fn new(usage: &'a [PackUsage], opts: &PruneOptions, pack_size: u64) -> Plan<'a> {
        let unused = usage.iter().filter(|p| p.live_chunks == 0).collect();
        let mut sparse: Vec<&PackUsage> = usage
            .iter()
            .filter(|p| {
                // The live share of the blobs, not of the whole object: a small pack whose
                // blobs are all live is below any share of its size by its trailer alone, and
                // rewriting it would free nothing.
                let blobs = p.size.saturating_sub(pack::overhead_bound(p.chunks));
                p.live_chunks > 0
                    && p.live_bytes < blobs
                    && (p.live_bytes as f64) * 100.0 < (blobs as f64) * opts.repack_below
            })
            .collect();
        // The emptiest first: they free the most per byte moved.
        sparse.sort_by(|a, b| {
            (a.live_bytes as f64 / a.size.max(1) as f64)
                .total_cmp(&(b.live_bytes as f64 / b.size.max(1) as f64))
                .then(a.id.cmp(&b.id))
        });
        let mut budget = opts.max_repack.unwrap_or(u64::MAX);
        let mut chosen = Vec::new();
        let mut left = 0;
        for p in sparse {
            // Format-1 unencrypted blobs carry no MAC: they cannot be copied authenticated.
            if p.unauthenticated > 0 || p.live_bytes > budget || p.live_bytes > pack_size {
                left += 1;
                continue;
            }
            budget -= p.live_bytes;
            chosen.push(p);
        }
        Plan {
            unused,
            sparse: chosen,
            left,
        }
    }
}

/// Reads the snapshot objects of snapshots whose listing chunks the catalog does not know
/// (committed by an older version) and records them. Returns how many were read.
async fn learn_listings(repo: &Repo) -> Result<u64, Error> {
    let missing = repo.catalog.snapshots_without_listing().await?;
    let ring = repo.ring_all().await?;
    for (snapshot_id, blob) in &missing {
        let loc = repo.catalog.chunk(blob).await?.ok_or_else(|| {
            Error::NotFound(format!(
                "snapshot object {} is in no pack\nhint: run `storinator-worker verify`; prune stops rather than guess what it uses",
                &blob.to_hex()[..12]
            ))
        })?;
        if loc.length > MAX_SEALED_BLOB {
            return Err(Error::Invalid(format!(
                "snapshot object {} is larger than a blob may be",
                &blob.to_hex()[..12]
            )));
        }
        let obj = ObjectRef::new(format!("{}.enc", loc.pack_id), loc.location.clone());
        let sealed = with_retry("reading a snapshot object", || {
            repo.storage.get_range(&obj, loc.offset, loc.length)
        })
        .await?;
        let (_, opened) = ring.open_chunk(&sealed, MAX_BLOB, blob)?;
        let object = SnapshotObject::decode(&opened.plaintext)?;
        repo.catalog
            .set_listing(*snapshot_id, &object.listing)
            .await?;
    }
    Ok(missing.len() as u64)
}

/// A new pack being filled with blobs copied from sparse packs.
struct Refill {
    writer: PackWriter,
    /// The pack each blob came from.
    sources: Vec<String>,
    /// Sealed bytes copied in (counted as moved once uploaded).
    bytes: u64,
}

/// Rewrites the live blobs of `sparse` into new packs, repoints the catalog, then condemns
/// the old packs (each only if nothing new uses it).
async fn repack(
    repo: &Repo,
    run: &Run,
    sparse: &[&PackUsage],
    report: &mut PruneReport,
    shown: &mut ProgressReport,
    progress: &dyn Progress,
) -> Result<(), Error> {
    // One new pack per key and encryption setting: a pack's trailer is sealed one way, with
    // the key of the blobs it holds (a blob keeps its seal and id, so it stays its owner's).
    let ring = repo.ring_all().await?;
    let mut open: HashMap<(usize, bool), Refill> = HashMap::new();
    let mut done_sources = Vec::new();
    for src in sparse {
        let mut blobs = repo.catalog.live_blobs_in_pack(&src.id).await?;
        blobs.sort_by_key(|b| b.offset);
        let obj = ObjectRef::new(format!("{}.enc", src.id), src.location.clone());
        if let Some(b) = blobs.iter().find(|b| b.length > MAX_SEALED_BLOB) {
            return Err(Error::Invalid(format!(
                "blob {} of pack {} is larger than a blob may be",
                &b.id.to_hex()[..12],
                src.id
            )));
        }
        // The live blobs in ranges, several requested at once (one read per blob would cost
        // a round trip each; see `ranges`).
        let spans: Vec<(u64, u64)> = blobs.iter().map(|b| (b.offset, b.length)).collect();
        let what = format!("reading {}.enc", src.id);
        let mut reads = std::pin::pin!(ranges::read(
            repo.storage.as_ref(),
            &obj,
            ranges::coalesce(&spans),
            &what,
        ));
        while let Some((range, data)) = reads.next().await {
            let data = data?;
            for b in &blobs[range.blobs.clone()] {
                let sealed = data.get(range.slice(b.offset, b.length)).ok_or_else(|| {
                    Error::Invalid(format!(
                        "pack {}: the storage returned fewer bytes than asked for blob {}",
                        src.id,
                        &b.id.to_hex()[..12]
                    ))
                })?;
                // Hostile until authenticated: the copy must be the chunk the catalog names.
                let (slot, opened) = ring.open_chunk(sealed, MAX_BLOB, &b.id).map_err(|e| {
                Error::Invalid(format!(
                    "blob {} of pack {}: {e}\nhint: run `storinator-worker scrub` to find and heal damaged packs",
                    &b.id.to_hex()[..12],
                    src.id
                ))
            })?;
                let encrypted = b.flags & pack::FLAG_ENCRYPTED != 0;
                if opened.encrypted != encrypted {
                    return Err(Error::Invalid(format!(
                        "blob {} of pack {} is not sealed the way the catalog says",
                        &b.id.to_hex()[..12],
                        src.id
                    )));
                }
                let kind = BlobKind::from_u8(b.kind).unwrap_or(BlobKind::Data);
                let group = (slot, encrypted);
                if let Some(r) = open.get(&group)
                    && !r.writer.is_empty()
                    && r.writer.size_with(sealed.len()) > repo.settings.pack_size
                {
                    let full = open.remove(&group).expect("present");
                    shown.bytes_done += full.bytes;
                    let keys = &ring.get(slot).keys;
                    upload_refill(repo, run, full, (keys, encrypted), report).await?;
                    progress.report(shown);
                }
                let refill = match open.entry(group) {
                    std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                    std::collections::hash_map::Entry::Vacant(v) => v.insert(Refill {
                        writer: PackWriter::create(run.spool())
                            .map_err(|e| Error::io(run.spool(), e))?,
                        sources: Vec::new(),
                        bytes: 0,
                    }),
                };
                refill
                    .writer
                    .add(kind, b.id, sealed, b.raw_length as usize, encrypted)
                    .map_err(|e| Error::io(refill.writer.path(), e))?;
                refill.sources.push(src.id.clone());
                refill.bytes += b.length;
            }
        }
        report.repacked_bytes += src.live_bytes;
        done_sources.push(src);
    }
    for ((slot, encrypted), refill) in open.drain() {
        shown.bytes_done += refill.bytes;
        let keys = &ring.get(slot).keys;
        upload_refill(repo, run, refill, (keys, encrypted), report).await?;
        progress.report(shown);
    }
    let ids: Vec<String> = done_sources.iter().map(|p| p.id.clone()).collect();
    let condemned = repo.catalog.condemn_unused_packs(&ids).await?;
    for p in done_sources.iter().filter(|p| condemned.contains(&p.id)) {
        report.repacked_packs += 1;
        report.repacked_freed += p.size - p.live_bytes;
    }
    Ok(())
}

/// Seals, uploads and records a new pack, then points the copied chunks at it.
async fn upload_refill(
    repo: &Repo,
    run: &Run,
    refill: Refill,
    (keys, encrypted): (&Keys, bool),
    report: &mut PruneReport,
) -> Result<(), Error> {
    let mode = if encrypted {
        SealMode::Encrypted(keys)
    } else {
        SealMode::Plain(keys)
    };
    let path = refill.writer.path().to_path_buf();
    let finished = refill
        .writer
        .finish(mode)
        .map_err(|e| Error::io(&path, e))?;
    let new_id = finished.id.0.clone();
    let moves: Vec<(String, PackEntry)> = refill
        .sources
        .into_iter()
        .zip(finished.entries.iter().cloned())
        .collect();
    // The packer's uploader: recorded as this run's unfinished pack before the upload,
    // indexed after it (the copied chunks keep their old home until the repoint below).
    let (tx, rx) = mpsc::channel(1);
    tx.send(finished)
        .await
        .map_err(|_| Error::Invalid("pack upload failed".into()))?;
    drop(tx);
    upload_packs(
        repo.storage.clone(),
        repo.catalog.clone(),
        run.id.clone(),
        rx,
    )
    .await?;
    repo.catalog.repoint_chunks(&new_id, &moves).await?;
    report.new_packs += 1;
    Ok(())
}

/// Deletes every condemned pack from storage, in batches, then forgets each. Returns how
/// many it deleted.
async fn delete_condemned(
    repo: &Repo,
    report: &mut PruneReport,
    shown: &mut ProgressReport,
    progress: &dyn Progress,
) -> Result<u64, Error> {
    let packs = repo.catalog.condemned_packs().await?;
    for batch in packs.chunks(REMOVE_BATCH) {
        let objs: Vec<ObjectRef> = batch
            .iter()
            .map(|p| ObjectRef::new(format!("{}.enc", p.id), p.location.clone()))
            .collect();
        with_retry("deleting unused packs", || repo.storage.remove_many(&objs)).await?;
        report.delete_calls += 1;
        for p in batch {
            repo.catalog.drop_condemned_pack(&p.id).await?;
            report.deleted_objects += 1;
            report.deleted.push(p.id.clone());
        }
        shown.files_done += batch.len() as u64;
        shown.files_total = shown.files_total.max(shown.files_done);
        progress.report(shown);
    }
    Ok(packs.len() as u64)
}

/// What the repository stores, per backed-up folder, and what a prune would free now
/// (`storinator-worker stats`; the chat's `/usage` answers from here too). Needs no key.
#[derive(Clone, Debug, Default, Serialize)]
pub struct UsageReport {
    /// Packs (one stored object, one Telegram message, each) and their bytes.
    pub packs: u64,
    pub stored_bytes: u64,
    /// Per backed-up folder (only `owner`'s when asked for one owner).
    pub roots: Vec<crate::catalog::RootUsage>,
    /// Sum of every snapshot's file sizes over the stored bytes: what deduplication and
    /// incremental backups save (repository-wide).
    pub dedup_ratio: f64,
    /// What `prune` with default options would delete and rewrite now, and free.
    pub unused_packs: u64,
    pub sparse_packs: u64,
    pub prune_would_free: u64,
    /// Snapshots from before listings were recorded: until a prune learns their listings
    /// (reading their objects), the figure above may count those listings as unused.
    pub listings_unknown: u64,
}

/// Measures the repository for `stats` / `/usage`; `owner` limits the per-folder list.
pub async fn usage(
    catalog: &crate::catalog::Catalog,
    owner: Option<&str>,
    pack_size: u64,
) -> Result<UsageReport, Error> {
    let packs = catalog.pack_usage(i64::MAX).await?;
    let all_roots = catalog.usage_by_root().await?;
    let logical: u64 = all_roots.iter().map(|r| r.logical_bytes).sum();
    let prune = estimate(catalog, &PruneOptions::default(), pack_size).await?;
    let stored_bytes: u64 = packs.iter().map(|p| p.size).sum();
    Ok(UsageReport {
        packs: packs.len() as u64,
        stored_bytes,
        roots: all_roots
            .into_iter()
            .filter(|r| owner.is_none_or(|o| r.owner == o))
            .collect(),
        dedup_ratio: if stored_bytes == 0 {
            0.0
        } else {
            logical as f64 / stored_bytes as f64
        },
        unused_packs: prune.unused_packs,
        sparse_packs: prune.repacked_packs,
        prune_would_free: prune.freed(),
        listings_unknown: catalog.snapshots_without_listing_count().await?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pack(id: &str, size: u64, chunks: u64, live_chunks: u64, live_bytes: u64) -> PackUsage {
        PackUsage {
            id: id.into(),
            size,
            encrypted: true,
            location: String::new(),
            created_at: 0,
            chunks,
            live_chunks,
            live_bytes,
            unauthenticated: 0,
        }
    }

    /// A pack is rewritten for its dead blobs, never for its trailer: a tiny pack whose every
    /// blob is live stays, however small its live share of the object.
    #[test]
    fn sparse_means_dead_blobs_not_a_large_trailer() {
        let trailer = pack::overhead_bound(2);
        let usage = [
            // Two live blobs of 60 bytes: under 50% of the object, all of the blobs.
            pack("tiny", 120 + trailer, 2, 2, 120),
            // Half its blobs dead.
            pack("half", 10_000 + trailer, 2, 1, 3_000),
            pack("dead", 5_000, 3, 0, 0),
            pack("full", 100_000 + trailer, 2, 2, 100_000),
        ];
        let opts = PruneOptions {
            repack_below: 50.0,
            ..Default::default()
        };
        let plan = Plan::new(&usage, &opts, 1 << 20);
        let ids = |v: &[&PackUsage]| v.iter().map(|p| p.id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&plan.unused), ["dead"]);
        assert_eq!(ids(&plan.sparse), ["half"]);
        // Everything live is never sparse, whatever the threshold.
        let all = PruneOptions {
            repack_below: 100.0,
            ..Default::default()
        };
        let plan = Plan::new(&usage, &all, 1 << 20);
        assert_eq!(ids(&plan.sparse), ["half"]);
    }
}
