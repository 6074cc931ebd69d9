//! `recover`: rebuild the catalog from storage alone, with the passphrase (the server burned).

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::repo::{EngineSettings, KEY_USER, Repo, unwrap_key};
use super::run::{Run, lock_root, reclaim};
use crate::catalog::{Catalog, NewContent, NewEntry, SnapshotInfo};
use crate::error::Error;
use crate::format::EntryKind;
use crate::format::crypto::{self, ChunkId, Keys, WrappedKey};
use crate::format::pack::{self, BlobKind, MAX_BLOB, PACK_TAIL_LEN, PackId};
use crate::format::snapshot::{ListingEntry, SnapshotObject};
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
}

/// Rebuilds the catalog from storage: the wrapped key, every pack trailer, every snapshot
/// object and its listing. Safe to run again: what is already known is kept.
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

    // The key: the catalog's if it has one, else one from storage that the passphrase opens.
    let master = match catalog.user_key(KEY_USER).await? {
        Some(w) => unwrap_key(&w, passphrase).await?,
        None => {
            let mut found = None;
            let mut wrong = false;
            for o in objects.iter().filter(|o| o.name.starts_with("key-")) {
                let obj = ObjectRef::new(&o.name, o.location.clone());
                let bytes =
                    with_retry("reading the key", || storage.get_range(&obj, 0, o.size)).await?;
                let Ok(w) = serde_json::from_slice::<WrappedKey>(&bytes) else {
                    report
                        .problems
                        .push(format!("{} is not a key object", o.name));
                    continue;
                };
                match unwrap_key(&w, passphrase).await {
                    Ok(m) => {
                        found = Some((w, m));
                        break;
                    }
                    Err(Error::WrongPassphrase) => wrong = true,
                    Err(e) => return Err(e),
                }
            }
            match found {
                Some((w, m)) => {
                    catalog.put_user_key(KEY_USER, &w).await?;
                    m
                }
                None if wrong => return Err(Error::WrongPassphrase),
                None => {
                    return Err(Error::NotFound(format!(
                        "no key object in {}",
                        storage.describe()
                    )));
                }
            }
        }
    };
    let keys = Keys::derive(&master);

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
        match read_trailer(storage.as_ref(), &keys, &obj, o.size).await {
            Ok(entries) => {
                let id = o.name.trim_end_matches(".enc");
                let encrypted = entries
                    .first()
                    .is_none_or(|e| e.flags & pack::FLAG_ENCRYPTED != 0);
                catalog
                    .pack_stored(id, o.size, encrypted, &o.location, &entries)
                    .await?;
                report.packs += 1;
                report.chunks += entries.len() as u64;
                for e in entries.into_iter().filter(|e| e.kind == BlobKind::Snapshot) {
                    snapshot_blobs.push((e.id, obj.clone(), e));
                }
            }
            Err(e) => report.problems.push(e),
        }
        Counters::add(&counters.files_done, 1);
        progress.report(&counters.report());
    }

    // Snapshots: oldest first per root, each committed like a fresh backup would.
    let known: HashSet<Vec<u8>> = catalog.snapshot_blob_ids().await?.into_iter().collect();
    let mut objects_by_time: BTreeMap<(i64, String), (ChunkId, SnapshotObject)> = BTreeMap::new();
    for (id, obj, entry) in snapshot_blobs {
        if known.contains(id.0.as_slice()) {
            continue;
        }
        match read_blob(storage.as_ref(), &keys, &obj, &entry)
            .await
            .and_then(|b| {
                serde_json::from_slice::<SnapshotObject>(&b)
                    .map_err(|e| format!("snapshot {}: {e}", id.to_hex()))
            }) {
            Ok(s) => {
                objects_by_time.insert((s.finished_at, id.to_hex()), (id, s));
            }
            Err(e) => report.problems.push(e),
        }
    }
    let repo = Repo::with_keys(catalog, storage, keys, settings);
    counters.set_phase(Phase::Committing);
    // Committing snapshots is writing to their roots: as a run, under each root's lock.
    let run = Run::start(&repo).await?;
    // A recover killed before this one left its spool (and perhaps its registration).
    reclaim(&repo, &run.id).await?;
    for (_, (id, s)) in objects_by_time {
        match restore_snapshot(&repo, &run, &id, &s).await {
            Ok(()) => report.snapshots += 1,
            Err(e) => report.problems.push(format!(
                "snapshot {} of {}: {e}",
                &id.to_hex()[..12],
                s.root
            )),
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
    id: &ChunkId,
    s: &SnapshotObject,
) -> Result<(), Error> {
    let mut listing = Vec::new();
    for chunk in &s.listing {
        let loc = repo.catalog.chunk(chunk).await?.ok_or_else(|| {
            Error::NotFound(format!(
                "listing chunk {} is in no pack",
                &chunk.to_hex()[..12]
            ))
        })?;
        let obj = ObjectRef::new(format!("{}.enc", loc.pack_id), loc.location.clone());
        let sealed = with_retry("reading a listing", || {
            repo.storage.get_range(&obj, loc.offset, loc.length)
        })
        .await?;
        listing.extend(crypto::open(Some(repo.keys()), &sealed, MAX_BLOB)?);
    }
    let mut items = Vec::new();
    for line in listing.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let e: ListingEntry = serde_json::from_slice(line)
            .map_err(|e| Error::Invalid(format!("listing of snapshot is damaged: {e}")))?;
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
            content,
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
        .commit_snapshot(&run.id, &info, id, &s.listing, &items)
        .await;
    repo.catalog.unlock_root(&s.owner, &s.root, &run.id).await?;
    committed.map(|_| ())
}

async fn read_trailer(
    storage: &dyn Storage,
    keys: &Keys,
    obj: &ObjectRef,
    size: u64,
) -> Result<Vec<pack::PackEntry>, String> {
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
    pack::open_trailer(Some(keys), &obj.name, &sealed, body_len).map_err(|e| e.to_string())
}

async fn read_blob(
    storage: &dyn Storage,
    keys: &Keys,
    obj: &ObjectRef,
    e: &pack::PackEntry,
) -> Result<Vec<u8>, String> {
    let sealed = with_retry("reading a blob", || {
        storage.get_range(obj, e.offset, u64::from(e.length))
    })
    .await
    .map_err(|x| format!("pack {}: {x}", obj.name))?;
    crypto::open(Some(keys), &sealed, MAX_BLOB).map_err(|x| format!("pack {}: {x}", obj.name))
}
