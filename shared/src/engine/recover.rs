//! `recover`: rebuild the catalog from storage alone, with the passphrase (the server burned).

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use futures_util::{StreamExt, stream};
use serde::{Deserialize, Serialize};

use super::ranges;
use super::repo::{EngineSettings, KEY_USER, Repo, unwrap_key};
use super::run::{Run, lock_root, reclaim};
use crate::catalog::{Catalog, NewContent, NewEntry, Owner, OwnerKeyRow, SnapshotInfo};
use crate::error::Error;
use crate::format::EntryKind;
use crate::format::crypto::{self, ChunkId, MasterSecret, WrappedKey};
use crate::format::keyring::{KeyRing, owner_key_id_of};
use crate::format::pack::{self, BlobKind, MAX_BLOB, MAX_SEALED_BLOB, PACK_TAIL_LEN, PackId};
use crate::format::snapshot::{SnapshotObject, decode_listing};
use crate::progress::{CancelFlag, Counters, Phase, Progress};
use crate::storage::{ObjectRef, Storage, with_retry};

/// What `recover` found.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RecoverReport {
    pub packs: u64,
    pub chunks: u64,
    pub snapshots: u64,
    /// Packs that could not be read (named), and other problems.
    pub problems: Vec<String>,
    /// Snapshot objects still in storage that a tombstone says were forgotten (skipped).
    #[serde(default)]
    pub forgotten: u64,
}

/// Rebuilds the catalog from storage: the wrapped key, every pack trailer, every snapshot
/// object and its listing. Safe to run again: what is already known is kept.
///
/// Storage is hostile until authenticated (invariant 6): only packs whose trailer is
/// authenticated with the key are indexed, every snapshot object and listing chunk is opened
/// against the id an authenticated source gives for it, and anything else (a forged pack, a
/// format-1 unencrypted pack, a planted key object) is skipped with a problem naming it.
pub async fn recover(
    catalog: Catalog,
    storage: Arc<dyn Storage>,
    passphrase: &str,
    settings: EngineSettings,
    progress: &dyn Progress,
) -> Result<(Repo, RecoverReport), Error> {
    let counters = Counters::default();
    counters.set_phase(Phase::Scanning);
    progress.report(&counters.report());
    let objects = storage.list().await?;
    let mut report = RecoverReport::default();

    let master = find_key(
        &catalog,
        storage.as_ref(),
        &objects,
        passphrase,
        &mut report,
    )
    .await?;
    let repo = Repo::unlocked(catalog, storage, &master, settings);
    drop(master);
    import_owner_keys(&repo, &objects, &mut report).await?;
    let ring = repo.ring_all().await?;
    let (catalog, storage) = (&repo.catalog, &repo.storage);

    // Packs: index every trailer.
    let pack_objects: Vec<_> = objects
        .iter()
        .filter(|o| PackId::from_object_name(&o.name).is_some())
        .collect();
    counters.files_total.store(
        pack_objects.len() as u64,
        std::sync::atomic::Ordering::Relaxed,
    );
    let mut snapshot_blobs: Vec<(ChunkId, ObjectRef, pack::PackEntry)> = Vec::new();
    for o in pack_objects {
        let obj = ObjectRef::new(&o.name, o.location.clone());
        // Only a trailer authenticated with the key is indexed: a pack anyone could have
        // posted (a forged or format-1 unencrypted one) is skipped whole, named in the report.
        match read_trailer(storage.as_ref(), &ring, &obj, o.size).await {
            Ok(trailer) => {
                let id = o.name.trim_end_matches(".enc");
                catalog
                    .pack_stored(id, o.size, trailer.encrypted, &o.location, &trailer.entries)
                    .await?;
                report.packs += 1;
                report.chunks += trailer.entries.len() as u64;
                for e in trailer.entries {
                    if e.kind == BlobKind::Snapshot {
                        snapshot_blobs.push((e.id, obj.clone(), e));
                    }
                }
            }
            Err(e) => problem(&mut report, format!("{e}; skipped")),
        }
        Counters::add(&counters.files_done, 1);
        progress.report(&counters.report());
    }

    // Snapshots: oldest first per root, each committed like a fresh backup would, except
    // those a tombstone says were forgotten (invariant 7).
    let mut tomb_problems = Vec::new();
    let forgotten = super::forget::forgotten_snapshots(
        storage.as_ref(),
        repo.keys(),
        &objects,
        &mut tomb_problems,
    )
    .await?;
    for p in tomb_problems {
        problem(&mut report, p);
    }
    let known: HashSet<Vec<u8>> = catalog.snapshot_blob_ids().await?.into_iter().collect();
    let mut objects_by_time: BTreeMap<(i64, String), (ChunkId, String, SnapshotObject)> =
        BTreeMap::new();
    for (id, obj, entry) in snapshot_blobs {
        if known.contains(id.0.as_slice()) {
            continue;
        }
        if forgotten.contains(&id) {
            report.forgotten += 1;
            continue;
        }
        match read_snapshot_object(storage.as_ref(), &ring, &obj, &entry).await {
            Ok((key_id, s)) => {
                objects_by_time.insert((s.finished_at, id.to_hex()), (id, key_id, s));
            }
            Err(e) => problem(&mut report, format!("{e}; skipped")),
        }
    }
    counters.set_phase(Phase::Committing);
    // Committing snapshots is writing to their roots: as a run, under each root's lock.
    let run = Run::start(&repo).await?;
    // A recover killed before this one left its spool (and perhaps its registration).
    reclaim(&repo, &run.id).await?;
    for (_, (id, key_id, s)) in objects_by_time {
        match restore_snapshot(&repo, &run, &ring, (&id, &key_id), &s).await {
            Ok(()) => report.snapshots += 1,
            Err(e) => problem(
                &mut report,
                format!(
                    "snapshot {} of {}: {e}; skipped",
                    &id.to_hex()[..12],
                    s.root
                ),
            ),
        }
    }
    run.finish(&repo).await?;
    counters.set_phase(Phase::Done);
    progress.report(&counters.report());
    Ok((repo, report))
}

async fn restore_snapshot(
    repo: &Repo,
    run: &Run,
    ring: &KeyRing,
    (id, key_id): (&ChunkId, &str),
    s: &SnapshotObject,
) -> Result<(), Error> {
    let mut reads = Vec::with_capacity(s.listing.len());
    for chunk in &s.listing {
        let loc = repo.catalog.chunk(chunk).await?.ok_or_else(|| {
            Error::NotFound(format!(
                "listing chunk {} is in no pack",
                &chunk.to_hex()[..12]
            ))
        })?;
        if loc.length > MAX_SEALED_BLOB {
            return Err(Error::Invalid(format!(
                "listing chunk {} is larger than a blob may be",
                &chunk.to_hex()[..12]
            )));
        }
        let obj = ObjectRef::new(format!("{}.enc", loc.pack_id), loc.location.clone());
        reads.push((chunk, obj, loc.offset, loc.length));
    }
    // Several listing chunks requested at once (each read is a round trip; a large tree's
    // listing is many chunks), within the storage's read-ahead, used in order.
    let bytes: u64 = reads.iter().map(|r| r.3).sum();
    let ahead = ranges::reads_ahead_of(repo.storage.as_ref(), bytes / reads.len().max(1) as u64);
    let storage = repo.storage.as_ref();
    let mut fetched = stream::iter(&reads)
        .map(|(chunk, obj, offset, length)| async move {
            let sealed = with_retry("reading a listing", || {
                storage.get_range(obj, *offset, *length)
            })
            .await;
            (*chunk, sealed)
        })
        .buffered(ahead);
    let mut listing = Vec::new();
    while let Some((chunk, sealed)) = fetched.next().await {
        // The authenticated snapshot object vouches for the listing chunk's id.
        let (_, opened) = ring.open_chunk(&sealed?, MAX_BLOB, chunk)?;
        if s.encrypted && !opened.encrypted {
            return Err(Error::Invalid(format!(
                "listing chunk {} of an encrypted snapshot is not encrypted",
                &chunk.to_hex()[..12]
            )));
        }
        listing.extend(opened.plaintext);
    }
    let mut items = Vec::new();
    for e in decode_listing(&listing)? {
        let content = match (e.kind, &e.sha256) {
            (EntryKind::File, Some(h)) => {
                let sha: [u8; 32] = hex::decode(h)
                    .ok()
                    .and_then(|v| v.try_into().ok())
                    .ok_or_else(|| {
                        Error::Invalid(format!("listing entry {} has a bad hash", e.path))
                    })?;
                NewContent::New {
                    sha256: sha,
                    size: e.size,
                    chunks: e.chunks.clone(),
                }
            }
            _ => NewContent::None,
        };
        items.push(NewEntry {
            path: e.path,
            kind: e.kind,
            size: e.size,
            mtime_ns: e.mtime_ns,
            mode: e.mode,
            inode: e.inode,
            target: e.target,
            owner: Owner {
                uid: e.uid,
                gid: e.gid,
                user: e.user,
                group: e.group,
            },
            content,
            same: false,
        });
    }
    let info = SnapshotInfo {
        short_id: id.to_hex()[..12].to_string(),
        owner: s.owner.clone(),
        root: s.root.clone(),
        seq: 0,
        hostname: s.hostname.clone(),
        encrypted: s.encrypted,
        started_at: s.started_at,
        finished_at: s.finished_at,
        files: s.files,
        dirs: s.dirs,
        bytes: s.bytes,
        bytes_read: s.bytes_read,
        new_chunks: s.new_chunks,
        bytes_stored: s.bytes_stored,
        warnings: s.warnings,
    };
    lock_root(repo, run, &s.owner, &s.root, true, &CancelFlag::new()).await?;
    let committed = repo
        .catalog
        .commit_snapshot(&run.id, (&info, key_id), id, &s.listing, &items)
        .await;
    repo.catalog.unlock_root(&s.owner, &s.root, &run.id).await?;
    committed.map(|_| ())
}

/// Records a problem (it names the object) and logs it.
fn problem(report: &mut RecoverReport, message: String) {
    tracing::warn!("recover: {message}");
    report.problems.push(message);
}

/// The master secret: unwrapped from the catalog's key if it has one, else from the first key
/// object in storage that the passphrase opens. A key object that is too large, malformed or
/// out of bounds is skipped with a problem naming it: a planted one must not stop `recover`.
async fn find_key(
    catalog: &Catalog,
    storage: &dyn Storage,
    objects: &[crate::storage::ObjectInfo],
    passphrase: &str,
    report: &mut RecoverReport,
) -> Result<MasterSecret, Error> {
    if let Some(w) = catalog.user_key(KEY_USER).await? {
        return unwrap_key(&w, passphrase).await;
    }
    let mut wrong = false;
    // (Owner keys are opened with the installation key, later: `import_owner_keys`.)
    for o in objects
        .iter()
        .filter(|o| o.name.starts_with("key-") && owner_key_id_of(&o.name).is_none())
    {
        if o.size > crypto::MAX_KEY_OBJECT {
            problem(
                report,
                format!(
                    "{} is {} bytes, too large for a key object; skipped",
                    o.name, o.size
                ),
            );
            continue;
        }
        let obj = ObjectRef::new(&o.name, o.location.clone());
        let bytes = with_retry("reading the key", || storage.get_range(&obj, 0, o.size)).await?;
        let w = match WrappedKey::decode(&bytes) {
            Ok(w) => w,
            Err(e) => {
                problem(report, format!("{}: {e}; skipped", o.name));
                continue;
            }
        };
        match unwrap_key(&w, passphrase).await {
            Ok(m) => {
                catalog.put_user_key(KEY_USER, &w).await?;
                return Ok(m);
            }
            Err(Error::WrongPassphrase) => wrong = true,
            Err(e) => problem(report, format!("{}: {e}; skipped", o.name)),
        }
    }
    if wrong {
        return Err(Error::WrongPassphrase);
    }
    Err(Error::NotFound(format!(
        "no key object in {}",
        storage.describe()
    )))
}

async fn read_trailer(
    storage: &dyn Storage,
    ring: &KeyRing,
    obj: &ObjectRef,
    size: u64,
) -> Result<pack::Trailer, String> {
    let err = |e: &dyn std::fmt::Display| format!("pack {}: {e}", obj.name);
    if size < PACK_TAIL_LEN {
        return Err(err(&"too small to be a pack"));
    }
    let tail = with_retry("reading a pack", || {
        storage.get_range(obj, size - PACK_TAIL_LEN, PACK_TAIL_LEN)
    })
    .await
    .map_err(|e| err(&e))?;
    let tlen = pack::decode_tail(&obj.name, &tail, size).map_err(|e| e.to_string())?;
    let body_len = size - PACK_TAIL_LEN - tlen;
    let sealed = with_retry("reading a pack", || storage.get_range(obj, body_len, tlen))
        .await
        .map_err(|e| err(&e))?;
    ring.open_trailer(&obj.name, &sealed, body_len)
        .map(|(_, t)| t)
        .map_err(|e| e.to_string())
}

/// Reads, authenticates and decodes a snapshot object; its id (from the authenticated
/// trailer) is checked against its content, and its `encrypted` claim against its blob.
/// Returns it with the id of the key that sealed it (empty: the installation key).
async fn read_snapshot_object(
    storage: &dyn Storage,
    ring: &KeyRing,
    obj: &ObjectRef,
    e: &pack::PackEntry,
) -> Result<(String, SnapshotObject), String> {
    let what = |x: &dyn std::fmt::Display| {
        format!(
            "snapshot {} in pack {}: {x}",
            &e.id.to_hex()[..12],
            obj.name
        )
    };
    let sealed = with_retry("reading a blob", || {
        storage.get_range(obj, e.offset, u64::from(e.length))
    })
    .await
    .map_err(|x| what(&x))?;
    let (slot, opened) = ring
        .open_chunk(&sealed, MAX_BLOB, &e.id)
        .map_err(|x| what(&x))?;
    let s = SnapshotObject::decode(&opened.plaintext).map_err(|x| what(&x))?;
    if s.encrypted != opened.encrypted {
        return Err(what(&"its encryption differs from what it claims"));
    }
    let key = ring.get(slot);
    if !key.key_id.is_empty() && key.owner != s.owner {
        return Err(what(&format!(
            "it claims owner {} but is sealed with the key of {}",
            s.owner, key.owner
        )));
    }
    Ok((key.key_id.clone(), s))
}

/// Records every owner key object in storage that the installation key opens (each is
/// authenticated, and checked to be the key its name says, before use). One that fails is
/// skipped with a problem naming it: its owner's data would then be skipped too, by name.
async fn import_owner_keys(
    repo: &Repo,
    objects: &[crate::storage::ObjectInfo],
    report: &mut RecoverReport,
) -> Result<(), Error> {
    for o in objects {
        let Some(key_id) = owner_key_id_of(&o.name) else {
            continue;
        };
        if o.size > crypto::MAX_OWNER_KEY_OBJECT {
            problem(
                report,
                format!(
                    "{} is {} bytes, too large for an owner key; skipped",
                    o.name, o.size
                ),
            );
            continue;
        }
        let obj = ObjectRef::new(&o.name, o.location.clone());
        let bytes = with_retry("reading an owner key", || {
            repo.storage.get_range(&obj, 0, o.size)
        })
        .await?;
        let key = match repo.key_wrap().open(key_id, &bytes) {
            Ok(k) => k,
            Err(e) => {
                problem(report, format!("{}: {e}; skipped", o.name));
                continue;
            }
        };
        if let Err(e) = crate::catalog::check_owner(&key.owner) {
            problem(report, format!("{}: {e}; skipped", o.name));
            continue;
        }
        repo.catalog
            .add_owner_key(&OwnerKeyRow {
                key_id: key.key_id.clone(),
                owner: key.owner.clone(),
                sealed: bytes,
            })
            .await?;
    }
    Ok(())
}
