//! `verify`: is everything the catalog points at really in storage, and intact? And is
//! everything in storage known to the catalog?

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;

use futures_util::StreamExt;

use super::ranges;
use super::repo::{Repo, VerifyReport};
use super::run::is_alive;
use crate::catalog::{PackRow, now_ms};
use crate::error::Error;
use crate::format::crypto::ChunkId;
use crate::format::keyring::{KeyRing, owner_key_id_of};
use crate::format::pack::{self, BlobKind, PACK_TAIL_LEN, PackEntry, PackId};
use crate::progress::{Counters, Phase, Progress};
use crate::storage::{Lanes, ObjectRef, with_retry};

/// Files named per problem; the rest are counted.
const NAMED_FILES: usize = 20;

/// Checks every stored pack: present, right size, trailer agreeing with the catalog, and with
/// `read_data` every blob's MAC and id. A missing pack is marked so that the next backup
/// stores its chunks again. Each damaged chunk is reported with exactly the files that use it,
/// and the check goes on past it. Objects in storage that the catalog does not know, or that a
/// crashed run left behind, are listed too.
pub(crate) async fn run(
    repo: &Repo,
    read_data: bool,
    progress: &dyn Progress,
) -> Result<VerifyReport, Error> {
    let counters = Counters::default();
    counters.set_phase(Phase::Verifying);
    // Every owner's packs are checked: with every key of the installation.
    let ring = repo.ring_all().await?;
    // Packs known before and after the listing: a pack recorded (before its upload) while
    // the listing runs is known by one of them, so it is never taken for a stranger.
    let known_before: HashSet<String> = pack_ids(repo).await?;
    let listed: HashMap<String, (u64, String)> = repo
        .storage
        .list()
        .await?
        .into_iter()
        .map(|o| (o.name, (o.size, o.location)))
        .collect();
    let all_packs = repo.catalog.packs().await?;
    let mut report = VerifyReport::default();
    report.problems.extend(strangers(
        &listed,
        &known_before,
        &all_packs,
        &repo.catalog.user_key(super::repo::KEY_USER).await?,
    ));
    report
        .problems
        .extend(leftovers(repo, &listed, &all_packs).await?);
    // Packs prune condemned are being deleted: no snapshot uses them, nothing to check.
    let condemned: HashSet<String> = repo
        .catalog
        .condemned_packs()
        .await?
        .into_iter()
        .map(|p| p.id)
        .collect();
    let packs: Vec<PackRow> = all_packs
        .into_iter()
        .filter(|p| p.state != "uploading" && !condemned.contains(&p.id))
        .collect();
    counters
        .files_total
        .store(packs.len() as u64, Ordering::Relaxed);
    counters.bytes_total.store(
        if read_data {
            packs.iter().map(|p| p.size).sum()
        } else {
            0
        },
        Ordering::Relaxed,
    );
    progress.report(&counters.report());
    for p in packs {
        report.packs_checked += 1;
        Counters::add(&counters.files_done, 1);
        let some_copy_good = match repo.storage.as_lanes() {
            Some(lanes) => {
                verify_copies(
                    repo,
                    &ring,
                    lanes,
                    &p,
                    &listed,
                    read_data,
                    &mut report,
                    &counters,
                )
                .await
            }
            None => false,
        };
        if !some_copy_good {
            verify_pack(repo, &ring, &p, &listed, read_data, &mut report, &counters).await?;
        }
        progress.report(&counters.report());
    }
    // Copies found missing or damaged are stored again from a good one.
    report.problems.extend(super::copies::heal(repo).await?);
    counters.set_phase(Phase::Done);
    progress.report(&counters.report());
    Ok(report)
}

async fn pack_ids(repo: &Repo) -> Result<HashSet<String>, Error> {
    Ok(repo
        .catalog
        .packs()
        .await?
        .into_iter()
        .map(|p| p.id)
        .collect())
}

/// Objects in storage the catalog does not know. They are only listed, never deleted: they
/// may be another repository's (a shared chat) or packs a lost catalog knew.
fn strangers(
    listed: &HashMap<String, (u64, String)>,
    known_before: &HashSet<String>,
    packs: &[PackRow],
    key: &Option<crate::format::crypto::WrappedKey>,
) -> Vec<String> {
    let known: HashSet<&str> = known_before
        .iter()
        .map(String::as_str)
        .chain(packs.iter().map(|p| p.id.as_str()))
        .collect();
    let key_object = key
        .as_ref()
        .map(|k| super::repo::key_object_name(&k.key_id));
    let mut names: Vec<(&String, u64)> = listed
        .iter()
        .filter(|(name, _)| Some(name.as_str()) != key_object.as_deref())
        .filter(|(name, _)| !super::forget::is_tombstone_name(name))
        // Owner keys: recorded ones, or one a host stored and was killed before recording
        // (nothing uses it; `recover` would index it).
        .filter(|(name, _)| owner_key_id_of(name).is_none())
        .filter(|(name, _)| {
            PackId::from_object_name(name).is_none_or(|id| !known.contains(id.0.as_str()))
        })
        .map(|(name, (size, _))| (name, *size))
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|(name, size)| {
            format!(
                "object {name} ({size} bytes) is in storage but not in the catalog; it was left as it is\nhint: if it is a pack of this repository, `storinator-worker recover` indexes it"
            )
        })
        .collect()
}

/// Unfinished packs of runs that died, still in storage: the next backup deletes them.
async fn leftovers(
    repo: &Repo,
    listed: &HashMap<String, (u64, String)>,
    packs: &[PackRow],
) -> Result<Vec<String>, Error> {
    let unfinished: HashMap<String, Option<String>> =
        repo.catalog.unfinished_packs().await?.into_iter().collect();
    if unfinished.is_empty() {
        return Ok(Vec::new());
    }
    let runs = repo.catalog.runs().await?;
    let now = now_ms();
    let live: HashSet<&str> = runs
        .iter()
        .filter(|r| is_alive(r, &repo.settings.hostname, now))
        .map(|r| r.id.as_str())
        .collect();
    Ok(packs
        .iter()
        .filter(|p| p.state == "uploading" && listed.contains_key(&format!("{}.enc", p.id)))
        .filter(|p| {
            unfinished
                .get(&p.id)
                .is_some_and(|r| r.as_deref().is_none_or(|r| !live.contains(r)))
        })
        .map(|p| {
            format!(
                "pack {}.enc was left unfinished by a backup that did not end; the next backup deletes it",
                p.id
            )
        })
        .collect())
}

/// Checks one pack and records its problems.
async fn verify_pack(
    repo: &Repo,
    ring: &KeyRing,
    p: &PackRow,
    listed: &HashMap<String, (u64, String)>,
    read_data: bool,
    report: &mut VerifyReport,
    counters: &Counters,
) -> Result<(), Error> {
    let name = format!("{}.enc", p.id);
    let outcome = match listed.get(&name) {
        None => Err(format!("pack {name} is missing from storage")),
        Some((size, _)) if *size != p.size => Err(format!(
            "pack {name} has {size} bytes in storage, the catalog expects {}",
            p.size
        )),
        Some((_, location)) => {
            let obj = ObjectRef::new(&name, location.clone());
            check_pack(repo, ring, &obj, p.size, read_data, report, counters).await
        }
    };
    match outcome {
        Ok(damaged) if damaged.is_empty() => {
            if p.state == "missing" {
                // It came back (a transient listing problem): trust it again.
                repo.catalog.set_pack_state(&p.id, "stored").await?;
            }
        }
        Ok(damaged) => {
            let ids: Vec<ChunkId> = damaged.iter().map(|d| d.id).collect();
            let users = repo.catalog.users_of_chunks(&ids).await?;
            for d in damaged {
                let affected = match users.get(&d.id) {
                    Some(u) => affects(u),
                    None if d.kind == Some(BlobKind::Listing) => {
                        "; it is part of a snapshot listing (needed by recover)".to_string()
                    }
                    None => "; no snapshot uses it".to_string(),
                };
                report.problems.push(format!(
                    "pack {name}: chunk {}: {}{affected}",
                    &d.id.to_hex()[..12],
                    d.error
                ));
            }
        }
        Err(problem) => {
            if !listed.contains_key(&name) && repo.catalog.forget_unused_pack(&p.id).await? {
                // Lost, but everything it held was stored again since: nothing to report.
                return Ok(());
            }
            let affected = repo.catalog.paths_using_pack(&p.id, i64::MAX).await?;
            if !listed.contains_key(&name) {
                repo.catalog.set_pack_state(&p.id, "missing").await?;
            }
            report
                .problems
                .push(format!("{problem}{}", affects(&affected)));
        }
    }
    Ok(())
}

/// Checks each copy of a pack kept in several lanes on its own. A copy that is missing or
/// damaged is remembered for healing (and reported when healed). Returns whether some copy
/// is good; when none is, the caller checks the pack as a whole and reports what it affects.
#[allow(clippy::too_many_arguments)]
async fn verify_copies(
    repo: &Repo,
    ring: &KeyRing,
    lanes: &Lanes,
    p: &PackRow,
    listed: &HashMap<String, (u64, String)>,
    read_data: bool,
    report: &mut VerifyReport,
    counters: &Counters,
) -> bool {
    let name = format!("{}.enc", p.id);
    let present = listed
        .get(&name)
        .map(|(_, loc)| lanes.copies_in(loc))
        .unwrap_or_default();
    let mut good = 0;
    let mut bad = 0;
    for c in lanes.copies_in(&p.location) {
        let Some(found) = present.iter().find(|f| f.lane == c.lane) else {
            tracing::warn!("pack {name}: the copy in lane {} is missing", c.lane);
            lanes.note_miss(&name, &c.lane);
            bad += 1;
            continue;
        };
        let obj = ObjectRef::new(&name, Lanes::location_of(std::slice::from_ref(found)));
        match check_pack(repo, ring, &obj, p.size, read_data, report, counters).await {
            Ok(damaged) if damaged.is_empty() => good += 1,
            Ok(damaged) => {
                tracing::warn!(
                    "pack {name}: the copy in lane {} has {} damaged chunks",
                    c.lane,
                    damaged.len()
                );
                lanes.note_miss(&name, &c.lane);
                bad += 1;
            }
            Err(e) => {
                tracing::warn!("pack {name}: the copy in lane {}: {e}", c.lane);
                lanes.note_miss(&name, &c.lane);
                bad += 1;
            }
        }
    }
    if bad > 0 {
        tracing::warn!("pack {name}: {good} good copies, {bad} failed");
    }
    good > 0
}

/// "; affects root: path, root: path and 3 more files".
fn affects(files: &[(String, String)]) -> String {
    if files.is_empty() {
        return String::new();
    }
    let named: Vec<String> = files
        .iter()
        .take(NAMED_FILES)
        .map(|(root, path)| format!("{root}: {path}"))
        .collect();
    let more = files.len().saturating_sub(NAMED_FILES);
    format!(
        "; affects {}{}",
        named.join(", "),
        if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        }
    )
}

/// A blob of a pack that is damaged or not where the catalog says.
struct Damage {
    id: ChunkId,
    kind: Option<BlobKind>,
    error: String,
}

/// Checks a pack present in storage. `Err` when the pack as a whole is unusable (no valid
/// trailer); otherwise the damaged blobs, every one of them.
async fn check_pack(
    repo: &Repo,
    ring: &KeyRing,
    obj: &ObjectRef,
    size: u64,
    read_data: bool,
    report: &mut VerifyReport,
    counters: &Counters,
) -> Result<Vec<Damage>, String> {
    let err = |e: &dyn std::fmt::Display| format!("pack {}: {e}", obj.name);
    if size < PACK_TAIL_LEN {
        return Err(err(&"too small to be a pack"));
    }
    let tail = with_retry("reading a pack", || {
        repo.storage
            .get_range(obj, size - PACK_TAIL_LEN, PACK_TAIL_LEN)
    })
    .await
    .map_err(|e| err(&e))?;
    let tlen = pack::decode_tail(&obj.name, &tail, size).map_err(|e| e.to_string())?;
    let body_len = size - PACK_TAIL_LEN - tlen;
    let sealed = with_retry("reading a pack", || {
        repo.storage.get_range(obj, body_len, tlen)
    })
    .await
    .map_err(|e| err(&e))?;
    let (entries, authenticated) = match ring.open_trailer(&obj.name, &sealed, body_len) {
        Ok((_, t)) => (t.entries, true),
        // A format-1 unencrypted pack this catalog recorded: its trailer carries only a
        // checksum, so it is compared with the catalog below, which vouches for it.
        Err(crate::error::PackError::Unauthenticated { .. }) => (
            pack::open_format1_trailer(&obj.name, &sealed, body_len).map_err(|e| e.to_string())?,
            false,
        ),
        Err(e) => return Err(e.to_string()),
    };
    report.bytes_read += tlen + PACK_TAIL_LEN;
    let pack_id = obj.name.trim_end_matches(".enc");
    let in_catalog = repo
        .catalog
        .blobs_in_pack(pack_id)
        .await
        .map_err(|e| err(&e))?;
    let mut damaged = misplaced(&in_catalog, &entries).map_err(|e| err(&e))?;
    if read_data {
        // Only the blobs an authenticated source lists are read: the trailer's, or for a
        // format-1 unencrypted pack the catalog's.
        let vouched: HashSet<&[u8]> = in_catalog.iter().map(|(id, _, _)| id.as_slice()).collect();
        let readable: Vec<&PackEntry> = entries
            .iter()
            .filter(|e| authenticated || vouched.contains(e.id.0.as_slice()))
            .collect();
        damaged.extend(read_blobs(repo, ring, obj, readable, report, counters).await);
    }
    Ok(damaged)
}

/// Blobs the catalog places in this pack that the trailer does not list at the same place.
fn misplaced(
    in_catalog: &[(Vec<u8>, i64, i64)],
    entries: &[PackEntry],
) -> Result<Vec<Damage>, Error> {
    let by_id: HashMap<[u8; 32], &PackEntry> = entries.iter().map(|e| (e.id.0, e)).collect();
    let mut out = Vec::new();
    for (id, offset, length) in in_catalog {
        let id = ChunkId::from_slice(id)?;
        let ok = by_id
            .get(&id.0)
            .is_some_and(|e| e.offset == *offset as u64 && u64::from(e.length) == *length as u64);
        if !ok {
            out.push(Damage {
                id,
                kind: by_id.get(&id.0).map(|e| e.kind),
                error: "the trailer does not list it where the catalog has it".into(),
            });
        }
    }
    Ok(out)
}

/// Reads the given blobs of a pack (in ranges of whole blobs, several requested at once, see
/// `ranges`) and authenticates each.
async fn read_blobs(
    repo: &Repo,
    ring: &KeyRing,
    obj: &ObjectRef,
    mut sorted: Vec<&PackEntry>,
    report: &mut VerifyReport,
    counters: &Counters,
) -> Vec<Damage> {
    let mut damaged = Vec::new();
    sorted.sort_by_key(|e| e.offset);
    let spans: Vec<(u64, u64)> = sorted
        .iter()
        .map(|e| (e.offset, u64::from(e.length)))
        .collect();
    let mut reads = std::pin::pin!(ranges::read(
        repo.storage.as_ref(),
        obj,
        ranges::coalesce(&spans),
        "reading a pack",
    ));
    while let Some((range, data)) = reads.next().await {
        let blobs = &sorted[range.blobs.clone()];
        let data = match data {
            Ok(d) => d,
            Err(e) => {
                damaged.extend(blobs.iter().map(|b| Damage {
                    id: b.id,
                    kind: Some(b.kind),
                    error: format!("cannot be read: {e}"),
                }));
                continue;
            }
        };
        report.bytes_read += data.len() as u64;
        Counters::add(&counters.bytes_done, data.len() as u64);
        for e in blobs {
            let sealed = data.get(range.slice(e.offset, u64::from(e.length)));
            match sealed.ok_or_else(|| "the storage returned fewer bytes than asked".to_string()) {
                Ok(sealed) => match check_blob(ring, e, sealed) {
                    Ok(()) => report.blobs_checked += 1,
                    Err(error) => damaged.push(Damage {
                        id: e.id,
                        kind: Some(e.kind),
                        error,
                    }),
                },
                Err(error) => damaged.push(Damage {
                    id: e.id,
                    kind: Some(e.kind),
                    error,
                }),
            }
        }
    }
    damaged
}

/// Authenticates one sealed blob and checks that it holds the data its id names.
fn check_blob(ring: &KeyRing, e: &PackEntry, sealed: &[u8]) -> Result<(), String> {
    ring.open_chunk(sealed, pack::MAX_BLOB, &e.id)
        .map(|_| ())
        .map_err(|x| x.to_string())
}
