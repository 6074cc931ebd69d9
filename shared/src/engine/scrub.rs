//! The scrub: read stored packs back within a daily budget, authenticate every chunk, and heal
//! what was damaged from the files still on disk.
//!
//! Each run first checks every pack's presence and size with one listing of the store (for
//! Telegram, message-class calls: one per hundred messages), then reads packs in rotation: an
//! unfinished pass first, then packs never read, then the longest unread, stopping when the
//! budget is spent (the last chunk read may cross it) and remembering where (a pack larger
//! than a day's budget is read over several days). Each run reads at least its budget, so at
//! B bytes a day a store of T bytes is read whole within ceil(T / B) days, the cycle the report
//! states (packs added meanwhile come first and extend it by their own size).
//!
//! Damage (a missing pack, a wrong size, a chunk that fails authentication) is recorded per
//! chunk. The heal then looks for each damaged data chunk's plaintext on disk: a file of a
//! snapshot that uses the chunk, whose current content still hashes to the SHA-256 the
//! snapshot recorded. Its chunks are cut at the recorded lengths, checked against their ids,
//! sealed into a new pack and uploaded; only once storage has the pack does the catalog point
//! the chunks at it (the same fenced `pack_uploaded` step a backup uses: invariant 1). What cannot be
//! healed stays listed, with the files and snapshots it affects.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::time::Instant;

use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use super::packer::{Packer, upload_packs};
use super::ranges;
use super::repo::Repo;
use super::run::Run;
use crate::catalog::{AffectedFile, BlobRow, Damage, PackFinding, ScrubPack, ScrubReport};
use crate::error::{Error, StorageError};
use crate::format::crypto::{self, ChunkId, SealMode};
use crate::format::keyring::KeyRing;
use crate::format::pack::{self, BlobKind, FinishedPack};
use crate::progress::{CancelFlag, Counters, Phase, Progress};
use crate::storage::{Lanes, ObjectInfo, ObjectRef};

/// What a scrub run may do.
#[derive(Clone, Debug)]
pub struct ScrubOptions {
    /// Bytes of packs to read back.
    pub budget: u64,
    /// The time the run counts as (Unix ms): last-read dates and the report use it.
    pub now_ms: i64,
    /// Heal damaged chunks from the files on disk.
    pub heal: bool,
}

/// Runs a scrub. Called through [`Repo::scrub`].
pub(crate) async fn run(
    repo: &Repo,
    opts: &ScrubOptions,
    progress: &dyn Progress,
    cancel: &CancelFlag,
) -> Result<ScrubReport, Error> {
    let started = Instant::now();
    let counters = Counters::default();
    counters.set_phase(Phase::Verifying);
    let mut report = ScrubReport {
        started_at: opts.now_ms,
        budget: opts.budget,
        ..ScrubReport::default()
    };
    // The catalog's packs first, then the listing: a pack stored in between is then in the
    // listing too, never reported missing by mistake.
    let queue = repo.catalog.scrub_queue().await?;
    report.packs_total = queue.len() as u64;
    report.bytes_total = queue.iter().map(|p| p.size).sum();
    // With copies in several lanes every copy is read: the cycle reads `copies` times the
    // bytes.
    let copies = repo.storage.as_lanes().map_or(1, |l| l.copies() as u64);
    report.cycle_days = (report.bytes_total * copies)
        .div_ceil(opts.budget.max(1))
        .max(1);
    counters.bytes_total.store(
        opts.budget.min(report.bytes_total),
        std::sync::atomic::Ordering::Relaxed,
    );
    progress.report(&counters.report());

    let readable = presence_check(repo, &queue, opts.now_ms, &mut report).await?;
    read_rotation(
        repo,
        &readable,
        opts,
        &mut report,
        &counters,
        progress,
        cancel,
    )
    .await?;

    let damage = repo.catalog.unhealed_damage().await?;
    let healed = if opts.heal && !damage.is_empty() {
        heal(repo, &damage, cancel).await?
    } else {
        Healing::default()
    };
    describe_damage(repo, &damage, &healed, &mut report).await?;
    // Copies found missing or damaged are stored again from a good one.
    report.copies = super::copies::heal(repo).await?;

    let after = repo.catalog.scrub_queue().await?;
    report.never_read = after.iter().filter(|p| p.last_read_at.is_none()).count() as u64;
    report.oldest_read_at = after.iter().filter_map(|p| p.last_read_at).min();
    report.finished_at = opts.now_ms + started.elapsed().as_millis() as i64;
    repo.catalog.record_scrub(&report).await?;
    counters.set_phase(Phase::Done);
    progress.report(&counters.report());
    Ok(report)
}

/// Checks every pack's presence and size against one listing of the store. Returns the packs
/// worth reading (present, right size).
async fn presence_check(
    repo: &Repo,
    queue: &[ScrubPack],
    now: i64,
    report: &mut ScrubReport,
) -> Result<Vec<ScrubPack>, Error> {
    let objects = repo.storage.list().await?;
    if let Some(lanes) = repo.storage.as_lanes() {
        missing_copies(lanes, queue, &objects);
    }
    let listed: HashMap<String, u64> = objects.into_iter().map(|o| (o.name, o.size)).collect();
    let mut readable = Vec::new();
    for p in queue {
        let name = format!("{}.enc", p.id);
        let problem = match listed.get(&name) {
            None => Some(format!("pack {name} is missing from storage")),
            Some(size) if *size != p.size => Some(format!(
                "pack {name} has {size} bytes in storage, the catalog expects {}",
                p.size
            )),
            Some(_) => None,
        };
        match problem {
            None => {
                report.packs_present += 1;
                if p.state == "missing" {
                    // It came back (a transient listing problem): trust it again.
                    repo.catalog.set_pack_state(&p.id, "stored").await?;
                }
                readable.push(p.clone());
            }
            Some(reason) => {
                if !listed.contains_key(&name) {
                    repo.catalog.set_pack_state(&p.id, "missing").await?;
                }
                repo.catalog
                    .scrub_progress(&p.id, 0, false, now, &reason)
                    .await?;
                note_damage(repo, &p.id, None, reason, now, report).await?;
            }
        }
    }
    Ok(readable)
}

/// Remembers, for healing, every copy the catalog names that its lane no longer lists.
fn missing_copies(lanes: &Lanes, queue: &[ScrubPack], objects: &[ObjectInfo]) {
    let listed: HashMap<&str, &str> = objects
        .iter()
        .map(|o| (o.name.as_str(), o.location.as_str()))
        .collect();
    for p in queue {
        let name = format!("{}.enc", p.id);
        let present = listed
            .get(name.as_str())
            .map(|l| lanes.copies_in(l))
            .unwrap_or_default();
        for c in lanes.copies_in(&p.location) {
            if !present.iter().any(|f| f.lane == c.lane) {
                lanes.note_miss(&name, &c.lane);
            }
        }
    }
}

/// Records damage in a pack (`ids`, or all its chunks) and reports it if it is news.
async fn note_damage(
    repo: &Repo,
    pack_id: &str,
    ids: Option<&[ChunkId]>,
    reason: String,
    now: i64,
    report: &mut ScrubReport,
) -> Result<(), Error> {
    let chunks = repo
        .catalog
        .record_damage(pack_id, ids, &reason, now)
        .await?;
    if chunks > 0 {
        report.findings.push(PackFinding {
            pack_id: pack_id.to_string(),
            reason,
            chunks,
        });
    }
    Ok(())
}

/// Reads packs in rotation until the budget is spent.
async fn read_rotation(
    repo: &Repo,
    packs: &[ScrubPack],
    opts: &ScrubOptions,
    report: &mut ScrubReport,
    counters: &Counters,
    progress: &dyn Progress,
    cancel: &CancelFlag,
) -> Result<(), Error> {
    for p in packs {
        if report.bytes_read >= opts.budget {
            break;
        }
        if cancel.is_cancelled() {
            return Err(Error::Cancelled);
        }
        let blobs = repo.catalog.blobs_from(&p.id, p.cursor).await?;
        let obj = ObjectRef::new(format!("{}.enc", p.id), p.location.clone());
        // With copies in several lanes every copy is read; a chunk is damage only when no
        // copy holds it intact, and a copy that fails is healed from another.
        let copies = match repo.storage.as_lanes() {
            Some(lanes) => lanes.copy_refs(&obj),
            None => vec![(String::new(), obj)],
        };
        let mut i = blobs.len();
        let mut bad: Option<Vec<(ChunkId, String)>> = None;
        for (lane, obj) in &copies {
            let one_of_several = copies.len() > 1;
            let (reached, copy_bad) = read_copy(
                repo,
                obj,
                &blobs,
                (opts.budget, one_of_several),
                report,
                (counters, progress),
            )
            .await?;
            i = i.min(reached);
            if !copy_bad.is_empty()
                && let Some(lanes) = repo.storage.as_lanes()
            {
                lanes.note_miss(&obj.name, lane);
            }
            bad = Some(match bad {
                None => copy_bad,
                Some(prev) => prev
                    .into_iter()
                    .filter(|(id, _)| copy_bad.iter().any(|(c, _)| c == id))
                    .collect(),
            });
        }
        let bad = bad.unwrap_or_default();
        let done = i >= blobs.len();
        if !bad.is_empty() {
            let ids: Vec<ChunkId> = bad.iter().map(|(id, _)| *id).collect();
            let reason = format!(
                "chunk {} in pack {}.enc: {}",
                &bad[0].0.to_hex()[..12],
                p.id,
                bad[0].1
            );
            note_damage(repo, &p.id, Some(&ids), reason, opts.now_ms, report).await?;
        }
        let cursor = blobs.get(i).map(|b| b.offset).unwrap_or(0);
        let result = if bad.is_empty() {
            "ok".to_string()
        } else {
            format!("{} damaged chunks", bad.len())
        };
        repo.catalog
            .scrub_progress(&p.id, cursor, done, opts.now_ms, &result)
            .await?;
        if done {
            report.packs_read += 1;
        }
    }
    Ok(())
}

/// Reads one copy of a pack's `blobs` within what is left of the budget. Returns how far it
/// got (the index of the first blob not read) and the blobs that failed. When the copy is
/// `one_of_several`, a lane that does not answer fails this copy, not the scrub.
async fn read_copy(
    repo: &Repo,
    obj: &ObjectRef,
    blobs: &[BlobRow],
    (budget, one_of_several): (u64, bool),
    report: &mut ScrubReport,
    (counters, progress): (&Counters, &dyn Progress),
) -> Result<(usize, Vec<(ChunkId, String)>), Error> {
    let mut bad: Vec<(ChunkId, String)> = Vec::new();
    let ring = repo.ring_all().await?;
    let ring = &ring;
    let plan = plan_reads(blobs, budget.saturating_sub(report.bytes_read));
    let mut i = plan.first().map_or(0, |r| r.blobs.start);
    // Several ranges requested at once (see `ranges`), used in order.
    let mut reads = std::pin::pin!(ranges::read(
        repo.storage.as_ref(),
        obj,
        plan,
        "scrubbing a pack"
    ));
    while let Some((range, data)) = reads.next().await {
        let data = match data {
            Ok(d) => d,
            Err(StorageError::NotFound { .. }) => {
                // Vanished since the listing: the whole pack is damage.
                bad.extend(
                    blobs[i..]
                        .iter()
                        .map(|b| (b.id, "pack vanished from storage".into())),
                );
                return Ok((blobs.len(), bad));
            }
            Err(e) if one_of_several => {
                let why = e.to_string();
                bad.extend(blobs[i..].iter().map(|b| (b.id, why.clone())));
                return Ok((blobs.len(), bad));
            }
            Err(e) => return Err(e.into()),
        };
        report.bytes_read += data.len() as u64;
        Counters::add(&counters.bytes_done, data.len() as u64);
        for b in &blobs[range.blobs.clone()] {
            let sealed = data.get(range.slice(b.offset, b.length)).unwrap_or(&[]);
            if let Err(why) = authenticate(ring, b, sealed) {
                bad.push((b.id, why));
            }
            report.chunks_checked += 1;
        }
        i = range.blobs.end;
        progress.report(&counters.report());
    }
    Ok((i, bad))
}

/// The range reads of `blobs` that spend `remaining` bytes of the budget (see
/// [`window_end`]), in order.
fn plan_reads(blobs: &[BlobRow], mut remaining: u64) -> Vec<ranges::BlobRange> {
    let mut plan = Vec::new();
    let mut i = 0;
    while i < blobs.len() && remaining > 0 {
        let j = window_end(blobs, i, remaining);
        let start = blobs[i].offset;
        let end = blobs[j - 1].offset + blobs[j - 1].length;
        remaining = remaining.saturating_sub(end - start);
        plan.push(ranges::BlobRange {
            start,
            end,
            blobs: i..j,
        });
        i = j;
    }
    plan
}

/// The end (exclusive) of the window of blobs starting at `i`: blobs are added while the
/// window fits the read window and the budget is not yet spent, so the last blob of a run may
/// cross the budget by less than one blob. Every run therefore reads at least its budget (or
/// everything left), which is what makes the stated cycle hold.
fn window_end(blobs: &[BlobRow], i: usize, remaining: u64) -> usize {
    let start = blobs[i].offset;
    let mut j = i;
    while j < blobs.len() {
        let before = blobs[j].offset - start;
        let span = blobs[j].offset + blobs[j].length - start;
        if j > i && (before >= remaining || span > ranges::RANGE_MAX) {
            break;
        }
        j += 1;
    }
    j
}

/// Opens a sealed blob and checks that it is the chunk the catalog says it is.
fn authenticate(ring: &KeyRing, b: &BlobRow, sealed: &[u8]) -> Result<(), String> {
    if sealed.len() as u64 != b.length {
        return Err("the pack is shorter than the catalog says".into());
    }
    // The catalog vouches for the id (so a format-1 unencrypted blob is checked against it).
    match ring.open_chunk(sealed, pack::MAX_BLOB, &b.id) {
        Ok(_) => Ok(()),
        Err(crypto::CryptoError::WrongId) => Err("the chunk holds the wrong data".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// What a heal achieved.
#[derive(Default)]
struct Healing {
    /// Chunks stored again.
    chunks: HashSet<ChunkId>,
    /// Per content: why none of its files could be used.
    failures: HashMap<i64, String>,
    packs: u64,
}

/// A content with damaged chunks, and where its plaintext may still be on disk.
struct Target {
    content_id: i64,
    sha256: [u8; 32],
    size: u64,
    encrypted: bool,
    layout: Vec<(ChunkId, u64)>,
    needed: HashSet<ChunkId>,
    paths: Vec<String>,
}

/// Stores damaged data chunks again from files on disk.
async fn heal(repo: &Repo, damage: &[Damage], cancel: &CancelFlag) -> Result<Healing, Error> {
    let mut targets: BTreeMap<i64, Target> = BTreeMap::new();
    for d in damage.iter().filter(|d| d.kind == BlobKind::Data as u8) {
        for (content_id, sha256, size, encrypted) in
            repo.catalog.contents_using(&d.chunk_id).await?
        {
            if let Some(t) = targets.get_mut(&content_id) {
                t.needed.insert(d.chunk_id);
                continue;
            }
            let mut paths: Vec<String> = repo
                .catalog
                .files_with_content(content_id)
                .await?
                .iter()
                .map(AffectedFile::disk_path)
                .collect();
            paths.dedup();
            targets.insert(
                content_id,
                Target {
                    content_id,
                    sha256,
                    size,
                    encrypted,
                    layout: repo.catalog.content_layout(content_id).await?,
                    needed: HashSet::from([d.chunk_id]),
                    paths,
                },
            );
        }
    }
    if targets.is_empty() {
        return Ok(Healing::default());
    }

    // Healing writes packs: as a run (its own spool; its packs recorded before upload, so a
    // kill leaves nothing the next run can't reclaim).
    let run = Run::start(repo).await?;
    let healing = heal_packs(repo, &run, targets.into_values().collect(), cancel).await;
    let finished = run.finish(repo).await;
    let healing = healing?;
    finished?;
    Ok(healing)
}

/// Reads the damaged chunks' data from the files on disk, packs and uploads it.
async fn heal_packs(
    repo: &Repo,
    run: &Run,
    targets: Vec<Target>,
    cancel: &CancelFlag,
) -> Result<Healing, Error> {
    // Packs of the healed chunks: one uploader, a packer per encryption setting.
    let (tx, rx) = mpsc::channel::<FinishedPack>(1);
    // Dropped with the scrub (a job stopped hard), the upload stops too.
    let mut uploader = AbortOnDrop(tokio::spawn(upload_packs(
        repo.storage.clone(),
        repo.catalog.clone(),
        run.id.clone(),
        rx,
    )));
    // A chunk is stored again under the key that named it (found by its id), in a pack of
    // that key's alone.
    let ring = repo.ring_all().await?;
    let settings = (repo.settings.pack_size, repo.settings.compression);
    let spool = run.spool().to_path_buf();
    let cancel = cancel.clone();
    let work = tokio::task::spawn_blocking(move || {
        let _ = std::fs::create_dir_all(&spool);
        let mut packers: HashMap<(usize, bool), Packer> = HashMap::new();
        let mut healing = Healing::default();
        let mut buf = Vec::new();
        for t in &targets {
            if cancel.is_cancelled() {
                break;
            }
            if t.needed.iter().all(|id| healing.chunks.contains(id)) {
                continue;
            }
            let mut why = Vec::new();
            let mut found = None;
            for path in &t.paths {
                match plaintext_from_disk(path, t, &ring) {
                    Ok(chunks) => {
                        found = Some(chunks);
                        break;
                    }
                    Err(e) => why.push(format!("{path}: {e}")),
                }
            }
            let Some((slot, chunks)) = found else {
                if why.is_empty() {
                    why.push("no file of any snapshot uses it".into());
                }
                healing.failures.insert(t.content_id, why.join("; "));
                continue;
            };
            let keys = &ring.get(slot).keys;
            let mode = if t.encrypted {
                SealMode::Encrypted(keys)
            } else {
                SealMode::Plain(keys)
            };
            let packer = packers
                .entry((slot, t.encrypted))
                .or_insert_with(|| Packer::new(settings.0, spool.clone(), t.encrypted, tx.clone()));
            for (id, data) in chunks {
                if !healing.chunks.insert(id) {
                    continue;
                }
                buf.clear();
                crypto::seal_into(&mut buf, mode, &data, settings.1);
                packer.append(mode, BlobKind::Data, id, &buf, data.len())?;
            }
        }
        drop(tx);
        for ((slot, encrypted), mut p) in packers {
            let keys = &ring.get(slot).keys;
            let mode = if encrypted {
                SealMode::Encrypted(keys)
            } else {
                SealMode::Plain(keys)
            };
            p.flush(mode)?;
        }
        Ok::<_, Error>(healing)
    });
    let healing = work
        .await
        .map_err(|e| Error::Invalid(format!("heal thread failed: {e}")));
    // The packer's senders are gone now: the uploader finishes with the last pack.
    let packs = (&mut uploader.0)
        .await
        .map_err(|e| Error::Invalid(format!("uploader failed: {e}")))??;
    let mut healing = healing??;
    healing.packs = packs;
    Ok(healing)
}

/// Aborts a task when dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Needed chunks' ids and plaintext, in file order.
type Plaintexts = Vec<(ChunkId, Vec<u8>)>;

/// Reads a file whose content should be `t`: the whole file must hash to the recorded
/// SHA-256, and each needed chunk (cut at the recorded lengths) to its id under one key of
/// `ring`. Returns that key's slot and the needed chunks' plaintext.
fn plaintext_from_disk(
    path: &str,
    t: &Target,
    ring: &KeyRing,
) -> Result<(usize, Plaintexts), String> {
    let meta = std::fs::symlink_metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => "no longer on disk".to_string(),
        _ => e.to_string(),
    })?;
    if !meta.is_file() {
        return Err("no longer a regular file".into());
    }
    if meta.len() != t.size {
        return Err("changed on disk since the backup (size differs)".into());
    }
    // No following a symlink swapped in, no blocking on a fifo.
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| e.to_string())?;
    let mut sha = Sha256::new();
    let mut out = Vec::new();
    let mut buf = Vec::new();
    let mut slot = None;
    for (id, len) in &t.layout {
        buf.resize(*len as usize, 0);
        file.read_exact(&mut buf)
            .map_err(|_| "changed on disk since the backup (shorter)".to_string())?;
        sha.update(&buf);
        if t.needed.contains(id) {
            // The key that named the content's chunks: the first needed chunk finds it.
            let named = |slot: usize| ring.get(slot).keys.blob_id(t.encrypted, &buf) == *id;
            match slot {
                Some(s) if named(s) => {}
                None => {
                    slot = Some(
                        (0..ring.len())
                            .find(|&s| named(s))
                            .ok_or_else(|| "changed on disk since the backup".to_string())?,
                    )
                }
                Some(_) => return Err("changed on disk since the backup".into()),
            }
            out.push((*id, buf.clone()));
        }
    }
    let mut extra = [0u8; 1];
    if file.read(&mut extra).map_err(|e| e.to_string())? != 0 {
        return Err("changed on disk since the backup (longer)".into());
    }
    if <[u8; 32]>::from(sha.finalize()) != t.sha256 {
        return Err("changed on disk since the backup (its SHA-256 differs)".into());
    }
    Ok((slot.unwrap_or(0), out))
}

/// Fills the report's list of affected files and metadata from the damage found before the
/// heal and what the heal stored again.
async fn describe_damage(
    repo: &Repo,
    damage: &[Damage],
    healing: &Healing,
    report: &mut ScrubReport,
) -> Result<(), Error> {
    report.healed_chunks = healing.chunks.len() as u64;
    report.heal_packs = healing.packs;
    report.unhealed_chunks = damage
        .iter()
        .filter(|d| !healing.chunks.contains(&d.chunk_id))
        .count() as u64;
    let damaged: HashSet<ChunkId> = damage.iter().map(|d| d.chunk_id).collect();
    let mut seen = HashSet::new();
    for d in damage {
        if d.kind != BlobKind::Data as u8 {
            let what = match BlobKind::from_u8(d.kind) {
                Some(BlobKind::Snapshot) => {
                    let snaps = repo.catalog.snapshots_with_blob(&d.chunk_id).await?;
                    snaps
                        .iter()
                        .map(|(_, root, id)| format!("snapshot object of {id} ({root})"))
                        .collect::<Vec<_>>()
                        .join(", ")
                }
                _ => "a piece of a snapshot listing".to_string(),
            };
            report.metadata.push(format!(
                "{what} in pack {}.enc: {}; restores from this catalog are unaffected, `recover` from storage would miss it",
                d.pack_id, d.reason
            ));
            continue;
        }
        let contents = repo.catalog.contents_using(&d.chunk_id).await?;
        if contents.is_empty() {
            report.metadata.push(format!(
                "unused chunk {} in pack {}.enc: {}",
                &d.chunk_id.to_hex()[..12],
                d.pack_id,
                d.reason
            ));
        }
        for (content_id, ..) in contents {
            if !seen.insert(content_id) {
                continue;
            }
            let layout = repo.catalog.content_layout(content_id).await?;
            let whole = layout
                .iter()
                .all(|(id, _)| healing.chunks.contains(id) || !damaged.contains(id));
            for mut f in repo.catalog.files_with_content(content_id).await? {
                f.healed = whole;
                if !whole {
                    f.why = Some(
                        healing
                            .failures
                            .get(&content_id)
                            .cloned()
                            .unwrap_or_else(|| d.reason.clone()),
                    );
                }
                report.affected.push(f);
            }
        }
    }
    Ok(())
}
