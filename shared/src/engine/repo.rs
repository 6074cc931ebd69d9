//! A repository: the catalog, a storage backend and the unlocked keys, with the operations
//! the CLI, the daemon and the bot call.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::backup::{self, BackupOptions, BackupSummary};
use super::restore::{self, RestoreOptions, RestoreSummary};
use super::scrub::{self, ScrubOptions};
use super::verify;
use crate::catalog::{
    Catalog, EntryKind, EntryRow, OwnerKeyRow, ScrubReport, SnapshotInfo, check_owner,
};
use crate::config::Config;
use crate::error::{CryptoError, Error};
use crate::format::chunker::ChunkerParams;
use crate::format::crypto::{KdfParams, KeyWrap, Keys, MasterSecret, OwnerKey, WrappedKey};
use crate::format::keyring::{KeyRing, RingKey, owner_key_object_name};
use crate::progress::{CancelFlag, Progress};
use crate::storage::Storage;

/// The catalog's name for the installation key's holder: the key the passphrase unwraps,
/// which wraps every owner's key (see `format::keyring`).
pub const KEY_USER: &str = "default";

/// Tunables of the engine.
#[derive(Clone, Debug)]
pub struct EngineSettings {
    pub pack_size: u64,
    pub compression: Option<i32>,
    pub chunker: ChunkerParams,
    /// Worker threads for chunking and sealing (default: the machine's cores).
    pub threads: usize,
    pub hostname: String,
}

/// Items per batch of a backup or restore: a few MB of state, enough to keep reads and
/// catalog queries efficient.
const DEFAULT_BATCH: usize = 4096;

impl Default for EngineSettings {
    fn default() -> Self {
        EngineSettings {
            pack_size: crate::config::DEFAULT_PACK_SIZE,
            compression: None,
            chunker: ChunkerParams::default(),
            threads: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
            hostname: hostname(),
        }
    }
}

impl EngineSettings {
    pub fn from_config(cfg: &Config) -> Self {
        EngineSettings {
            pack_size: cfg.pack_size,
            compression: cfg.compression,
            ..Default::default()
        }
    }
}

fn hostname() -> String {
    crate::config::machine_hostname()
}

/// Name of the key object in storage.
pub fn key_object_name(key_id: &str) -> String {
    format!("key-{key_id}.enc")
}

/// An unlocked repository.
pub struct Repo {
    pub catalog: Catalog,
    pub storage: Arc<dyn Storage>,
    /// The installation key's subkeys: data from before owner keys, tombstones, restore
    /// temporaries.
    keys: Arc<Keys>,
    /// The installation key's subkeys that wrap owner keys.
    wrap: KeyWrap,
    /// Owner keys opened so far, by key id.
    owner_keys: std::sync::Mutex<std::collections::HashMap<String, RingKey>>,
    /// Creating an owner key: one at a time in this process.
    creating: tokio::sync::Mutex<()>,
    pub settings: EngineSettings,
    /// Whether a backup of a root another live run is backing up waits for it (the daemon)
    /// or fails at once naming the other run (the command line).
    wait_for_locks: bool,
    /// Items a backup or restore handles at a time (see [`Repo::with_batch`]).
    batch: usize,
}

impl Repo {
    /// Creates the key: a random master secret wrapped under `passphrase`, recorded in the
    /// catalog and stored (wrapped) in storage so a new machine can recover.
    pub async fn init(
        catalog: &Catalog,
        storage: &dyn Storage,
        passphrase: &str,
        kdf: KdfParams,
    ) -> Result<WrappedKey, Error> {
        if passphrase.is_empty() {
            return Err(Error::Invalid("the passphrase is empty".into()));
        }
        if let Some(existing) = catalog.user_key(KEY_USER).await? {
            return Err(Error::KeyExists {
                key_id: existing.key_id,
            });
        }
        let master = MasterSecret::generate();
        let wrapped = WrappedKey::wrap(&master, passphrase, kdf)?;
        let json = serde_json::to_vec(&wrapped).expect("wrapped key serializes");
        let name = key_object_name(&wrapped.key_id);
        crate::storage::with_retry("storing the key", || storage.put_bytes(&name, json.clone()))
            .await?;
        catalog.put_user_key(KEY_USER, &wrapped).await?;
        Ok(wrapped)
    }

    /// Unlocks the repository with `passphrase`.
    pub async fn open(
        catalog: Catalog,
        storage: Arc<dyn Storage>,
        passphrase: &str,
        settings: EngineSettings,
    ) -> Result<Repo, Error> {
        Repo::begin_open(catalog, storage, passphrase, settings)
            .await?
            .finish()
            .await
    }

    /// Starts unlocking the repository with `passphrase`: the key is unwrapped on a blocking
    /// thread while the caller goes on (see [`Unlocking`]).
    pub async fn begin_open(
        catalog: Catalog,
        storage: Arc<dyn Storage>,
        passphrase: &str,
        settings: EngineSettings,
    ) -> Result<Unlocking, Error> {
        let wrapped = catalog.user_key(KEY_USER).await?.ok_or(Error::NoKey)?;
        let master = start_unwrap(&wrapped, passphrase);
        Ok(Unlocking {
            catalog,
            storage,
            settings,
            wrapped,
            master,
        })
    }

    /// A repository unlocked with the installation's master secret (open, recover).
    pub(crate) fn unlocked(
        catalog: Catalog,
        storage: Arc<dyn Storage>,
        master: &MasterSecret,
        settings: EngineSettings,
    ) -> Repo {
        Repo {
            catalog,
            storage,
            keys: Arc::new(Keys::derive(master)),
            wrap: KeyWrap::derive(master),
            owner_keys: Default::default(),
            creating: Default::default(),
            settings,
            wait_for_locks: true,
            batch: DEFAULT_BATCH,
        }
    }

    /// Sets whether a backup waits for another run's lock on its root (the default) or fails
    /// at once with an error naming that run.
    pub fn with_lock_wait(mut self, wait: bool) -> Repo {
        self.wait_for_locks = wait;
        self
    }

    pub(crate) fn waits_for_locks(&self) -> bool {
        self.wait_for_locks
    }

    /// Sets how many items a backup walks, compares, reads and commits at a time, and how
    /// many entries a restore plans and writes at a time (default 4096): what they hold in
    /// memory is about this many items, whatever the size of the tree. Tests use tiny batches
    /// to cross batch boundaries.
    pub fn with_batch(mut self, items: usize) -> Repo {
        self.batch = items.max(1);
        self
    }

    pub(crate) fn batch(&self) -> usize {
        self.batch
    }

    /// Re-wraps the master secret under a new passphrase (no data is re-encrypted).
    pub async fn change_passphrase(
        catalog: &Catalog,
        storage: &dyn Storage,
        old: &str,
        new: &str,
        kdf: KdfParams,
    ) -> Result<WrappedKey, Error> {
        if new.is_empty() {
            return Err(Error::Invalid("the new passphrase is empty".into()));
        }
        let wrapped = catalog.user_key(KEY_USER).await?.ok_or(Error::NoKey)?;
        let (old, new) = (old.to_string(), new.to_string());
        let rewrapped = tokio::task::spawn_blocking(move || wrapped.rewrap(&old, &new, kdf))
            .await
            .map_err(|e| Error::Invalid(format!("key derivation task failed: {e}")))?
            .map_err(map_passphrase)?;
        let json = serde_json::to_vec(&rewrapped).expect("wrapped key serializes");
        let name = key_object_name(&rewrapped.key_id);
        crate::storage::with_retry("storing the key", || storage.put_bytes(&name, json.clone()))
            .await?;
        catalog.put_user_key(KEY_USER, &rewrapped).await?;
        Ok(rewrapped)
    }

    /// The installation key's subkeys (not an owner's: see [`Repo::owner_key`]).
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// The installation key's subkeys that wrap owner keys.
    pub(crate) fn key_wrap(&self) -> &KeyWrap {
        &self.wrap
    }

    /// The key a backup of `owner` seals and names its data with: the owner's first key,
    /// created if it has none. A new key is stored (in every lane) and then recorded before
    /// this returns, so no blob is ever sealed with a key that storage does not hold.
    pub async fn owner_key(&self, owner: &str) -> Result<RingKey, Error> {
        check_owner(owner)?;
        if let Some(k) = self.first_owner_key(owner).await? {
            return Ok(k);
        }
        let _one_at_a_time = self.creating.lock().await;
        if let Some(k) = self.first_owner_key(owner).await? {
            return Ok(k);
        }
        let key = OwnerKey::generate(owner);
        let row = OwnerKeyRow {
            key_id: key.key_id.clone(),
            owner: owner.to_string(),
            sealed: self.wrap.seal(&key),
        };
        let name = owner_key_object_name(&row.key_id);
        crate::storage::with_retry("storing an owner key", || {
            self.storage.put_bytes(&name, row.sealed.clone())
        })
        .await?;
        self.catalog.add_owner_key(&row).await?;
        if let Some(lanes) = self.storage.as_lanes() {
            lanes.set_seed(&name, row.sealed.clone());
        }
        tracing::info!(key_id = %row.key_id, owner, "created a key for the owner");
        // Another host may have recorded a key for this owner first: every host uses the
        // first, so that the owner's data deduplicates across hosts.
        self.first_owner_key(owner)
            .await?
            .ok_or_else(|| Error::Invalid(format!("the key of owner {owner} was not recorded")))
    }

    async fn first_owner_key(&self, owner: &str) -> Result<Option<RingKey>, Error> {
        let rows = self.catalog.owner_keys(Some(owner)).await?;
        rows.first().map(|r| self.open_owner_key(r)).transpose()
    }

    /// Opens (once per process) an owner key recorded in the catalog.
    fn open_owner_key(&self, row: &OwnerKeyRow) -> Result<RingKey, Error> {
        if let Some(k) = self.owner_keys.lock().unwrap().get(&row.key_id) {
            return Ok(k.clone());
        }
        let key = self.wrap.open(&row.key_id, &row.sealed)?;
        if key.owner != row.owner {
            return Err(Error::Invalid(format!(
                "owner key {} is recorded for {} but belongs to {}",
                row.key_id, row.owner, key.owner
            )));
        }
        let k = RingKey {
            key_id: row.key_id.clone(),
            owner: key.owner.clone(),
            keys: Arc::new(key.keys()),
        };
        self.owner_keys
            .lock()
            .unwrap()
            .insert(row.key_id.clone(), k.clone());
        Ok(k)
    }

    /// The keys that may open `owner`'s data: its own (first first), then the installation
    /// key (its data from before owner keys). Never another owner's.
    pub async fn ring_for(&self, owner: &str) -> Result<KeyRing, Error> {
        let rows = self.catalog.owner_keys(Some(owner)).await?;
        self.ring_of(&rows)
    }

    /// Every key of the installation: for the operations on all packs (verify, prune, scrub,
    /// copies, recover).
    pub async fn ring_all(&self) -> Result<KeyRing, Error> {
        let rows = self.catalog.owner_keys(None).await?;
        self.ring_of(&rows)
    }

    fn ring_of(&self, rows: &[OwnerKeyRow]) -> Result<KeyRing, Error> {
        let mut keys = rows
            .iter()
            .map(|r| self.open_owner_key(r))
            .collect::<Result<Vec<_>, _>>()?;
        keys.push(RingKey {
            key_id: String::new(),
            owner: String::new(),
            keys: self.keys.clone(),
        });
        Ok(KeyRing::new(keys))
    }

    /// Backs up a folder into a new snapshot.
    pub async fn backup(
        &self,
        opts: &BackupOptions,
        progress: &dyn Progress,
        cancel: &CancelFlag,
    ) -> Result<BackupSummary, Error> {
        backup::run(self, opts, progress, cancel).await
    }

    /// Restores a path of a snapshot.
    pub async fn restore(
        &self,
        opts: &RestoreOptions,
        progress: &dyn Progress,
        cancel: &CancelFlag,
    ) -> Result<RestoreSummary, Error> {
        check_owner(&opts.owner)?;
        let checked = restore::check(&self.catalog, self.batch, opts, progress).await;
        self.restore_checked(opts, checked, progress, cancel).await
    }

    /// The rest of a restore once its checking pass is done.
    async fn restore_checked(
        &self,
        opts: &RestoreOptions,
        checked: Result<restore::Checked, Error>,
        progress: &dyn Progress,
        cancel: &CancelFlag,
    ) -> Result<RestoreSummary, Error> {
        let summary = match checked {
            Ok(checked) => restore::write(self, opts, checked, progress, cancel).await,
            Err(e) => Err(e),
        };
        // A copy the restore found missing or damaged is stored again: the restore itself
        // succeeded from another copy, so a failure here is only logged.
        match super::copies::heal(self).await {
            Ok(notes) => notes.iter().for_each(|n| tracing::info!("{n}")),
            Err(e) => tracing::warn!("healing copies after a restore: {e}"),
        }
        summary
    }

    /// Checks that everything the catalog references is in storage (and, with `read_data`,
    /// intact).
    pub async fn verify(
        &self,
        read_data: bool,
        progress: &dyn Progress,
    ) -> Result<VerifyReport, Error> {
        verify::run(self, read_data, progress).await
    }

    /// Forgets snapshots of one root by a keep policy (see [`super::forget`]).
    pub async fn forget(
        &self,
        opts: &super::forget::ForgetOptions,
        cancel: &CancelFlag,
    ) -> Result<super::forget::ForgetReport, Error> {
        super::forget::forget(self, opts, cancel).await
    }

    /// Deletes packs no snapshot uses and rewrites sparse ones (see [`super::prune`]).
    pub async fn prune(
        &self,
        opts: &super::prune::PruneOptions,
        progress: &dyn crate::progress::Progress,
        cancel: &CancelFlag,
    ) -> Result<super::prune::PruneReport, Error> {
        super::prune::prune(self, opts, progress, cancel).await
    }

    /// Reads packs back within a budget, authenticating every chunk, and heals damaged chunks
    /// from the files on disk. The report is also recorded in the catalog.
    pub async fn scrub(
        &self,
        opts: &ScrubOptions,
        progress: &dyn Progress,
        cancel: &CancelFlag,
    ) -> Result<ScrubReport, Error> {
        scrub::run(self, opts, progress, cancel).await
    }

    /// Snapshots of `owner`, oldest first; with `path`, only those containing it.
    pub async fn snapshots(
        &self,
        owner: &str,
        path: Option<&str>,
    ) -> Result<Vec<SnapshotInfo>, Error> {
        list_snapshots(&self.catalog, owner, path).await
    }

    /// Entries at `path` in a snapshot (latest by default): the item itself and, for a
    /// directory, its children (all descendants when `recursive`).
    pub async fn ls(
        &self,
        owner: &str,
        path: &str,
        snapshot: Option<&str>,
        recursive: bool,
    ) -> Result<(SnapshotInfo, Vec<EntryRow>), Error> {
        ls(&self.catalog, owner, path, snapshot, recursive).await
    }
}

/// Snapshots of `owner` (no key needed: the bot calls this too).
pub async fn list_snapshots(
    catalog: &Catalog,
    owner: &str,
    path: Option<&str>,
) -> Result<Vec<SnapshotInfo>, Error> {
    check_owner(owner)?;
    let all = catalog.snapshots(owner, None).await?;
    Ok(match path {
        None => all,
        Some(p) => {
            let p = p.trim_end_matches('/');
            all.into_iter()
                .filter(|s| {
                    s.root == p
                        || p.starts_with(&format!("{}/", s.root))
                        || s.root.starts_with(&format!("{p}/"))
                })
                .collect()
        }
    })
}

/// Entries at `path` in a snapshot of `owner` (latest by default): the item itself and, for a
/// directory, its children (all descendants when `recursive`). No key needed: `/ls` in the
/// chat and `storinator-worker ls` both answer from here.
pub async fn ls(
    catalog: &Catalog,
    owner: &str,
    path: &str,
    snapshot: Option<&str>,
    recursive: bool,
) -> Result<(SnapshotInfo, Vec<EntryRow>), Error> {
    check_owner(owner)?;
    let r = restore::resolve(catalog, owner, path, snapshot).await?;
    let entries = catalog
        .entries_under(r.root_id, r.snapshot.seq, &r.prefix)
        .await?;
    if entries.is_empty() {
        return Err(Error::NotFound(format!(
            "{path} is not in snapshot {}",
            r.snapshot.short_id
        )));
    }
    let depth = r.prefix.matches('/').count();
    let entries = entries
        .into_iter()
        .filter(|e| recursive || e.path.matches('/').count() <= depth + 1)
        .collect();
    Ok((r.snapshot, entries))
}

/// Formats an entry like `ls -l`.
pub fn format_entry(e: &EntryRow) -> String {
    let kind = match e.kind {
        EntryKind::Dir => 'd',
        EntryKind::Symlink => 'l',
        EntryKind::File => '-',
    };
    let mut perms = String::with_capacity(9);
    for shift in [6, 3, 0] {
        let bits = (e.mode >> shift) & 7;
        perms.push(if bits & 4 != 0 { 'r' } else { '-' });
        perms.push(if bits & 2 != 0 { 'w' } else { '-' });
        perms.push(if bits & 1 != 0 { 'x' } else { '-' });
    }
    let secs = e.mtime_ns.div_euclid(1_000_000_000);
    let target = e
        .target
        .as_deref()
        .map(|t| format!(" -> {t}"))
        .unwrap_or_default();
    format!(
        "{kind}{perms} {:>10} {} {}{target}",
        crate::progress::human_bytes(e.size),
        format_time(secs * 1000),
        e.path
    )
}

/// `2026-11-24 14:03` (UTC) from Unix milliseconds; a time outside jiff's range (only a
/// hostile or corrupt catalog holds one) is shown as its raw number.
pub fn format_time(ms: i64) -> String {
    match jiff::Timestamp::from_millisecond(ms) {
        Ok(t) => t.strftime("%Y-%m-%d %H:%M").to_string(),
        Err(_) => format!("{ms} ms since 1970"),
    }
}

fn map_passphrase(e: CryptoError) -> Error {
    match e {
        CryptoError::WrongPassphrase => Error::WrongPassphrase,
        e => Error::Crypto(e),
    }
}

/// Argon2 takes a while by design (a third of an unchanged re-backup's time): keep it off
/// the async runtime, and call it once per process. The daemon unlocks at start and runs
/// every job with that key; each CLI command unlocks once.
pub(crate) async fn unwrap_key(
    wrapped: &WrappedKey,
    passphrase: &str,
) -> Result<MasterSecret, Error> {
    join_unwrap(start_unwrap(wrapped, passphrase)).await
}

/// The unwrapping of [`unwrap_key`], started on a blocking thread.
fn start_unwrap(wrapped: &WrappedKey, passphrase: &str) -> Unwrapping {
    tracing::info!("unlocking the key with the passphrase (Argon2id)");
    let (w, p) = (wrapped.clone(), passphrase.to_string());
    tokio::task::spawn_blocking(move || w.unwrap(&p).map_err(map_passphrase))
}

type Unwrapping = tokio::task::JoinHandle<Result<MasterSecret, Error>>;

async fn join_unwrap(task: Unwrapping) -> Result<MasterSecret, Error> {
    task.await
        .map_err(|e| Error::Invalid(format!("key derivation task failed: {e}")))?
}

/// A repository whose key is being unwrapped ([`Repo::begin_open`]): Argon2id (0.2 s on
/// these machines, on one core) runs on a blocking thread while the caller does what needs
/// only the catalog. [`Unlocking::restore`] runs a restore's checking pass meanwhile, which
/// a restore of 100,000 files spent 0.17 s on, also on one core, after Argon2id.
pub struct Unlocking {
    catalog: Catalog,
    storage: Arc<dyn Storage>,
    settings: EngineSettings,
    wrapped: WrappedKey,
    master: Unwrapping,
}

impl Unlocking {
    /// Waits for the key: the repository, unlocked, or the passphrase's error.
    pub async fn finish(self) -> Result<Repo, Error> {
        let master = join_unwrap(self.master).await?;
        if let Some(lanes) = self.storage.as_lanes() {
            // Every lane gets the keys before its first pack: any one lane can recover.
            let json = serde_json::to_vec(&self.wrapped).expect("wrapped key serializes");
            lanes.set_seed(&key_object_name(&self.wrapped.key_id), json);
            for row in self.catalog.owner_keys(None).await? {
                lanes.set_seed(&owner_key_object_name(&row.key_id), row.sealed);
            }
        }
        Ok(Repo::unlocked(
            self.catalog,
            self.storage,
            &master,
            self.settings,
        ))
    }

    /// [`Repo::restore`], its checking pass run while the key is unwrapped. A wrong
    /// passphrase is reported before anything the pass found, and nothing is written without
    /// the key. (The pass, as in every restore, creates the target folder if it is missing.)
    pub async fn restore(
        self,
        opts: &RestoreOptions,
        progress: &dyn Progress,
        cancel: &CancelFlag,
    ) -> Result<RestoreSummary, Error> {
        check_owner(&opts.owner)?;
        let checked = restore::check(&self.catalog, DEFAULT_BATCH, opts, progress).await;
        let repo = self.finish().await?;
        repo.restore_checked(opts, checked, progress, cancel).await
    }
}

/// Summary of a `verify` run.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct VerifyReport {
    pub packs_checked: u64,
    pub blobs_checked: u64,
    pub bytes_read: u64,
    /// Problems, each naming the pack and the files it affects.
    pub problems: Vec<String>,
}

#[cfg(test)]
mod tests {
    #[test]
    fn formats_times() {
        assert_eq!(super::format_time(0), "1970-01-01 00:00");
        assert_eq!(super::format_time(1_795_000_000_000), "2026-11-18 11:06");
        assert_eq!(super::format_time(-60_000), "1969-12-31 23:59");
        assert_eq!(
            super::format_time(i64::MAX),
            "9223372036854775807 ms since 1970"
        );
    }
}
