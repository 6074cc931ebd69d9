//! `forget`: remove snapshots of one root by a keep policy ([`super::policy`]).
//!
//! A forgotten snapshot must stay forgotten after `recover` rebuilds the catalog from storage,
//! yet its object lives inside a pack with other blobs until prune rewrites or deletes that
//! pack. So before the catalog forgets anything, a sealed tombstone goes to storage
//! (`forget-<id>.enc`: the snapshot object ids, encrypted and authenticated with the key, its
//! name the keyed id of its contents) and `recover` skips every snapshot a tombstone names.
//! A crash between the two leaves the snapshot in the catalog (the next forget removes it) and
//! a tombstone that `recover` honours: either way the snapshot does not come back.

use std::collections::HashSet;

use jiff::tz::TimeZone;
use serde::{Deserialize, Serialize};

use super::policy::{self, KeepPolicy, KeepReason};
use super::repo::Repo;
use super::run::{Run, lock_root};
use crate::catalog::{Catalog, ForgetOutcome, SnapshotInfo, check_owner};
use crate::error::Error;
use crate::format::crypto::{self, ChunkId, Keys, SealMode};
use crate::progress::CancelFlag;
use crate::storage::{ObjectInfo, ObjectRef, Storage, with_retry};

/// Largest tombstone read back (about 20,000 snapshot ids).
const MAX_TOMBSTONE: u64 = 2 << 20;
const TOMBSTONE_PREFIX: &str = "forget-";
/// Why a snapshot the policy drops stays: it was not in the list the user confirmed.
const NOT_CONFIRMED: &str = "not confirmed";

/// What to forget.
#[derive(Clone, Debug)]
pub struct ForgetOptions {
    pub owner: String,
    /// The backed-up folder, as given to `backup`.
    pub path: String,
    pub policy: KeepPolicy,
    /// Periods are counted in this time zone (the schedules').
    pub tz: TimeZone,
    pub dry_run: bool,
    /// Allow forgetting every snapshot of the root.
    pub allow_empty: bool,
    /// Forget only snapshots named here (short ids), even if the policy now drops more: what
    /// a user confirmed from a dry run shown earlier. `None`: whatever the policy drops.
    pub only: Option<Vec<String>>,
}

/// One snapshot and the rules that keep it (none: it goes).
#[derive(Clone, Debug, Serialize)]
pub struct ForgetItem {
    pub snapshot: SnapshotInfo,
    pub reasons: Vec<&'static str>,
}

/// What a forget decided (and, unless a dry run, did).
#[derive(Clone, Debug, Serialize)]
pub struct ForgetReport {
    pub owner: String,
    pub root: String,
    pub dry_run: bool,
    pub keep: Vec<ForgetItem>,
    pub remove: Vec<ForgetItem>,
    /// Entry and content rows the catalog dropped with the snapshots.
    pub entries_dropped: u64,
    pub contents_dropped: u64,
    /// The tombstone stored for the forgotten snapshots.
    pub tombstone: Option<String>,
}

/// The tombstone's contents.
#[derive(Serialize, Deserialize)]
struct Tombstone {
    version: u32,
    owner: String,
    root: String,
    at: i64,
    /// Snapshot object ids, hex.
    forgotten: Vec<String>,
}

/// Forgets snapshots of one root by policy. With `dry_run` only the decision is returned.
pub async fn forget(
    repo: &Repo,
    opts: &ForgetOptions,
    cancel: &CancelFlag,
) -> Result<ForgetReport, Error> {
    if opts.dry_run {
        return dry_run(&repo.catalog, opts).await;
    }
    let root = checked_root(&repo.catalog, opts).await?;
    // Under the root's lock, so no backup of this root commits between the decision and the
    // catalog change (its next snapshot would be the newest, which a policy always keeps).
    let run = Run::start(repo).await?;
    let result = async {
        lock_root(repo, &run, &opts.owner, &root, true, cancel).await?;
        let mut report = plan(&repo.catalog, opts, &root).await?;
        if report.remove.is_empty() {
            return Ok(report);
        }
        let ids = repo.catalog.snapshot_object_ids(&opts.owner, &root).await?;
        let forgotten: Vec<ChunkId> = report
            .remove
            .iter()
            .filter_map(|i| {
                ids.iter()
                    .find(|(short, _)| *short == i.snapshot.short_id)
                    .map(|(_, id)| *id)
            })
            .collect();
        report.tombstone = Some(store_tombstone(repo, &opts.owner, &root, &forgotten).await?);
        let short: Vec<String> = report
            .remove
            .iter()
            .map(|i| i.snapshot.short_id.clone())
            .collect();
        let ForgetOutcome {
            entries, contents, ..
        } = repo
            .catalog
            .forget_snapshots(&opts.owner, &root, &short)
            .await?;
        report.entries_dropped = entries;
        report.contents_dropped = contents;
        Ok::<_, Error>(report)
    }
    .await;
    let finished = run.finish(repo).await;
    let report = result?;
    finished?;
    Ok(report)
}

/// What a forget would do, from the catalog alone (no key needed): the `--dry-run` of the
/// CLI and the chat's `/forget` prompt.
pub async fn dry_run(catalog: &Catalog, opts: &ForgetOptions) -> Result<ForgetReport, Error> {
    let root = checked_root(catalog, opts).await?;
    let mut report = plan(catalog, opts, &root).await?;
    report.dry_run = true;
    Ok(report)
}

/// The owner checked, the root resolved, and a policy that keeps something.
async fn checked_root(catalog: &Catalog, opts: &ForgetOptions) -> Result<String, Error> {
    check_owner(&opts.owner)?;
    let root = resolve_root(catalog, &opts.owner, &opts.path).await?;
    if opts.policy.is_empty() && !opts.allow_empty {
        return Err(Error::Invalid(format!(
            "no keep rule given for {root}: forget would remove every snapshot\nhint: give --keep-last, --keep-daily, ... (or --allow-empty to forget them all)"
        )));
    }
    Ok(root)
}

/// The root a path names: an exact backed-up root of the owner (trailing slashes ignored),
/// or the canonical form of the path.
async fn resolve_root(catalog: &Catalog, owner: &str, path: &str) -> Result<String, Error> {
    let roots = catalog.roots(owner).await?;
    let trimmed = if path.len() > 1 {
        path.trim_end_matches('/')
    } else {
        path
    };
    if let Some((_, r)) = roots.iter().find(|(_, r)| r == trimmed) {
        return Ok(r.clone());
    }
    if let Ok(canon) = std::fs::canonicalize(path) {
        let canon = canon.to_string_lossy().into_owned();
        if let Some((_, r)) = roots.iter().find(|(_, r)| *r == canon) {
            return Ok(r.clone());
        }
    }
    Err(Error::NotFound(format!(
        "no backups of {path} (owner {owner})\nhint: `storinator-worker snapshots` lists the backed-up folders"
    )))
}

async fn plan(catalog: &Catalog, opts: &ForgetOptions, root: &str) -> Result<ForgetReport, Error> {
    let snaps = catalog.snapshots(&opts.owner, Some(root)).await?;
    let times: Vec<i64> = snaps.iter().map(|s| s.started_at).collect();
    let decisions = policy::apply(&opts.policy, &times, &opts.tz);
    let mut report = ForgetReport {
        owner: opts.owner.clone(),
        root: root.to_string(),
        dry_run: opts.dry_run,
        keep: Vec::new(),
        remove: Vec::new(),
        entries_dropped: 0,
        contents_dropped: 0,
        tombstone: None,
    };
    for d in decisions {
        let mut item = ForgetItem {
            snapshot: snaps[d.index].clone(),
            reasons: d.reasons.iter().map(|r: &KeepReason| r.as_str()).collect(),
        };
        let confirmed = opts
            .only
            .as_ref()
            .is_none_or(|only| only.contains(&item.snapshot.short_id));
        if !d.keep() && !confirmed {
            item.reasons.push(NOT_CONFIRMED);
        }
        if !item.reasons.is_empty() {
            report.keep.push(item);
        } else {
            report.remove.push(item);
        }
    }
    if report.keep.is_empty() && !report.remove.is_empty() && !opts.allow_empty {
        return Err(Error::Invalid(format!(
            "{} keeps no snapshot of {root}: refusing to forget all {} of them\nhint: pass --allow-empty to forget every snapshot of this folder",
            opts.policy,
            report.remove.len()
        )));
    }
    Ok(report)
}

/// True for the name of a tombstone object (`forget-<id>.enc`).
pub fn is_tombstone_name(name: &str) -> bool {
    name.strip_prefix(TOMBSTONE_PREFIX)
        .and_then(|n| n.strip_suffix(".enc"))
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn tombstone_name(id: &ChunkId) -> String {
    format!("{TOMBSTONE_PREFIX}{}.enc", id.to_hex())
}

async fn store_tombstone(
    repo: &Repo,
    owner: &str,
    root: &str,
    forgotten: &[ChunkId],
) -> Result<String, Error> {
    let t = Tombstone {
        version: 1,
        owner: owner.to_string(),
        root: root.to_string(),
        at: crate::catalog::now_ms(),
        forgotten: forgotten.iter().map(ChunkId::to_hex).collect(),
    };
    let json = serde_json::to_vec(&t).expect("a tombstone serializes");
    let id = repo.keys().chunk_id(&json);
    let sealed = crypto::seal(SealMode::Encrypted(repo.keys()), &json, None);
    let name = tombstone_name(&id);
    with_retry(&format!("storing {name}"), || {
        repo.storage.put_bytes(&name, sealed.clone())
    })
    .await?;
    Ok(name)
}

/// The snapshot object ids that tombstones in storage name, read and authenticated with the
/// key. A tombstone that does not authenticate is reported (named) and ignored: anyone who
/// can post to the storage chat could plant one, and only the key holder may forget.
pub async fn forgotten_snapshots(
    storage: &dyn Storage,
    keys: &Keys,
    objects: &[ObjectInfo],
    problems: &mut Vec<String>,
) -> Result<HashSet<ChunkId>, Error> {
    let mut out = HashSet::new();
    for o in objects {
        let Some(hex) = o
            .name
            .strip_prefix(TOMBSTONE_PREFIX)
            .and_then(|n| n.strip_suffix(".enc"))
        else {
            continue;
        };
        match read_tombstone(storage, keys, o, hex).await {
            Ok(ids) => out.extend(ids),
            Err(e) => problems.push(format!("tombstone {}: {e}; ignored", o.name)),
        }
    }
    Ok(out)
}

async fn read_tombstone(
    storage: &dyn Storage,
    keys: &Keys,
    o: &ObjectInfo,
    hex: &str,
) -> Result<Vec<ChunkId>, Error> {
    let id = ChunkId::from_hex(hex)?;
    if o.size > MAX_TOMBSTONE {
        return Err(Error::Invalid(format!("{} bytes is too large", o.size)));
    }
    let obj = ObjectRef::new(&o.name, o.location.clone());
    let sealed = with_retry(&format!("reading {}", o.name), || {
        storage.get_range(&obj, 0, o.size)
    })
    .await?;
    let opened = crypto::open_chunk(keys, &sealed, MAX_TOMBSTONE as usize, &id)?;
    if !opened.encrypted {
        return Err(Error::Invalid("not encrypted".into()));
    }
    let t: Tombstone = serde_json::from_slice(&opened.plaintext)
        .map_err(|e| Error::Invalid(format!("unreadable: {e}")))?;
    t.forgotten
        .iter()
        .map(|h| ChunkId::from_hex(h).map_err(Error::from))
        .collect()
}
