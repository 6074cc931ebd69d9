//! A run: one backup (or recover) writing to the repository, with its own spool folder and a
//! registration in the catalog that other processes can check.
//!
//! Liveness is what everything else here rests on, so it is proved, never guessed: a run holds
//! an exclusive flock on `<spool>/run-<id>/lock` for as long as its process lives (the kernel
//! drops it when the process dies, even on `kill -9`). On the run's own host, a run whose lock
//! can be taken is dead. From another host (a shared database) the lock file is not visible,
//! so a run is alive there until its lease, renewed every [`RENEW_EVERY`], runs out.
//!
//! What a dead run leaves is reclaimed by the next run: its spool folder, the lock of the root
//! it was backing up, and its unfinished packs (their objects are deleted from storage before
//! the catalog forgets them, so an orphan is never lost track of). Nothing of a live run is
//! touched, in this process or another.

use std::collections::HashSet;
use std::fs::{File, TryLockError};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::repo::Repo;
use crate::catalog::{Catalog, RunRow, now_ms};
use crate::error::Error;
use crate::progress::CancelFlag;
use crate::storage::{ObjectRef, Storage, with_retry};

/// How long a run's registration holds without renewal (what another host waits after a
/// crash before it may take over).
pub(crate) const LEASE_MS: i64 = 120_000;
/// How often a live run renews its lease.
const RENEW_EVERY: Duration = Duration::from_secs(30);
/// Longest pause between two looks at a busy root lock.
const LOCK_POLL_MAX: Duration = Duration::from_secs(2);

/// A registered run. [`Run::finish`] unregisters it and removes its spool folder; if it is
/// dropped instead (the task was aborted), the flock goes with the file and the next run
/// reclaims the rest.
pub(crate) struct Run {
    pub id: String,
    dir: PathBuf,
    _lock: File,
    renewer: tokio::task::JoinHandle<()>,
    finished: bool,
}

impl Run {
    /// Creates the run's spool folder, locks it and registers the run.
    pub async fn start(repo: &Repo) -> Result<Run, Error> {
        let spool = repo.storage.spool_dir().to_path_buf();
        let id = random_id();
        let (dir, lock) = tokio::task::spawn_blocking({
            let (spool, id) = (spool.clone(), id.clone());
            move || create_spool(&spool, &id)
        })
        .await
        .map_err(|e| Error::Invalid(format!("spool task failed: {e}")))??;
        let now = now_ms();
        let row = RunRow {
            id: id.clone(),
            host: repo.settings.hostname.clone(),
            pid: std::process::id(),
            lock_path: dir.join("lock").to_string_lossy().into_owned(),
            started_at: now,
            lease_until: now + LEASE_MS,
        };
        if let Err(e) = repo.catalog.run_started(&row).await {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        let renewer = tokio::spawn(renew(repo.catalog.clone(), id.clone()));
        Ok(Run {
            id,
            dir,
            _lock: lock,
            renewer,
            finished: false,
        })
    }

    /// Where this run writes its packs before upload.
    pub fn spool(&self) -> &Path {
        &self.dir
    }

    /// Ends the run: deletes what it left unfinished (a failed upload), unregisters it (its
    /// root lock goes with it) and removes its spool folder.
    pub async fn finish(mut self, repo: &Repo) -> Result<(), Error> {
        self.renewer.abort();
        let mine = repo.catalog.unfinished_packs().await?;
        for (pack, _) in mine
            .into_iter()
            .filter(|(_, r)| r.as_deref() == Some(&self.id))
        {
            delete_unfinished(repo.storage.as_ref(), &repo.catalog, &pack, &self.id).await?;
        }
        repo.catalog.run_ended(&self.id).await?;
        self.finished = true;
        remove_spool(&self.dir);
        Ok(())
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        self.renewer.abort();
        if !self.finished {
            // The registration stays; the lock is released with the file, so the next run
            // sees this one dead and reclaims its packs and registration.
            remove_spool(&self.dir);
        }
    }
}

fn remove_spool(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!("removing spool {}: {e}", dir.display());
    }
}

fn random_id() -> String {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).expect("operating system random source failed");
    hex::encode(b)
}

/// Creates `<spool>/run-<id>/` with its lock file already locked. It is built under a name the
/// sweeper ignores and renamed into place, so no other run ever sees it unlocked. The spool
/// folder itself is locked meanwhile: a sweeper that can lock it knows that every
/// `.new-run-<id>` it sees was left by a creator that died half-way.
fn create_spool(spool: &Path, id: &str) -> Result<(PathBuf, File), Error> {
    std::fs::create_dir_all(spool).map_err(|e| Error::io(spool, e))?;
    let creating = File::open(spool).map_err(|e| Error::io(spool, e))?;
    creating.lock().map_err(|e| Error::io(spool, e))?;
    let tmp = spool.join(format!(".new-run-{id}"));
    std::fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let lock_path = tmp.join("lock");
    let lock = File::create(&lock_path).map_err(|e| Error::io(&lock_path, e))?;
    lock.try_lock().map_err(|e| {
        Error::io(
            &lock_path,
            match e {
                TryLockError::Error(e) => e,
                TryLockError::WouldBlock => std::io::ErrorKind::WouldBlock.into(),
            },
        )
    })?;
    let dir = spool.join(format!("run-{id}"));
    std::fs::rename(&tmp, &dir).map_err(|e| Error::io(&dir, e))?;
    Ok((dir, lock))
}

/// Renews a run's lease until the run ends (the task is aborted).
async fn renew(catalog: Catalog, id: String) {
    loop {
        tokio::time::sleep(RENEW_EVERY).await;
        match catalog.run_renewed(&id, now_ms() + LEASE_MS).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::error!(run = id, "run was declared dead by another process");
                return;
            }
            Err(e) => tracing::warn!(run = id, "renewing the run's lease failed: {e}"),
        }
    }
}

/// Whether the run's process holds the flock on `path`: `None` when that can't be told.
fn lock_is_held(path: &Path) -> Option<bool> {
    match File::open(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(false),
        Err(_) => None,
        Ok(f) => match f.try_lock() {
            // Taken (and released with `f`): nobody holds it.
            Ok(()) => Some(false),
            Err(TryLockError::WouldBlock) => Some(true),
            Err(TryLockError::Error(_)) => None,
        },
    }
}

/// Whether a registered run may still be working (see the module docs).
pub(crate) fn is_alive(run: &RunRow, host: &str, now: i64) -> bool {
    if run.host == host
        && let Some(held) = lock_is_held(Path::new(&run.lock_path))
    {
        return held;
    }
    run.lease_until >= now
}

/// "run 1f2e… (pid 4242 on host, started 2026-11-24 14:03)".
fn describe(run: &RunRow) -> String {
    format!(
        "run {} (pid {} on {}, started {} UTC)",
        run.id,
        run.pid,
        run.host,
        super::repo::format_time(run.started_at)
    )
}

/// Takes the lock of a backup root for `run`. A lock held by a dead run is taken over; one
/// held by a live run is waited for (polling, until `cancel`) or, with `wait` false, refused
/// with an error naming the holder.
pub(crate) async fn lock_root(
    repo: &Repo,
    run: &Run,
    owner: &str,
    root: &str,
    wait: bool,
    cancel: &CancelFlag,
) -> Result<(), Error> {
    let mut pause = Duration::from_millis(100);
    let mut announced = false;
    loop {
        let now = now_ms();
        let Some(holder) = repo
            .catalog
            .try_lock_root(owner, root, &run.id, now)
            .await?
        else {
            return Ok(());
        };
        if !is_alive(&holder, &repo.settings.hostname, now) {
            tracing::warn!(
                "{root}: taking over the lock of {}, which is no longer running",
                describe(&holder)
            );
            repo.catalog
                .take_over_root(owner, root, &holder.id, &run.id, now)
                .await?;
            continue;
        }
        let locked = Error::Locked {
            what: format!("{root} (owner {owner})"),
            holder: describe(&holder),
        };
        if !wait {
            return Err(locked);
        }
        if !announced {
            tracing::info!("{locked}; waiting");
            announced = true;
        }
        if cancel.is_cancelled() {
            return Err(Error::Cancelled);
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(LOCK_POLL_MAX);
    }
}

/// What [`reclaim`] cleaned up.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Reclaimed {
    pub runs: usize,
    pub packs: Vec<String>,
    pub spools: usize,
}

/// Cleans up after runs that are provably dead: deletes their unfinished packs from storage
/// (then from the catalog), unregisters them (releasing their root locks) and removes their
/// spool folders here. `me` is the calling run, never reclaimed.
pub(crate) async fn reclaim(repo: &Repo, me: &str) -> Result<Reclaimed, Error> {
    let now = now_ms();
    let host = &repo.settings.hostname;
    let mut out = Reclaimed::default();
    // The packs first, then the runs: a run registers before it creates a pack, so every
    // pack listed here belongs to a run in the list read next, unless that run has ended
    // (then the pack is truly left over). Read the other way round, a run starting between
    // the two reads would look dead and lose the pack it is uploading.
    let unfinished = repo.catalog.unfinished_packs().await?;
    let runs = repo.catalog.runs().await?;
    let (live, dead): (Vec<RunRow>, Vec<RunRow>) = runs
        .into_iter()
        .partition(|r| r.id == me || is_alive(r, host, now));
    let live: HashSet<String> = live.into_iter().map(|r| r.id).collect();
    for (pack, run) in unfinished {
        if run.as_deref().is_some_and(|r| live.contains(r)) {
            continue;
        }
        if !repo
            .catalog
            .claim_unfinished_pack(&pack, run.as_deref(), me)
            .await?
        {
            continue; // another run got to it first
        }
        delete_unfinished(repo.storage.as_ref(), &repo.catalog, &pack, me).await?;
        out.packs.push(pack);
    }
    for run in &dead {
        tracing::info!("reclaimed {}", describe(run));
        repo.catalog.run_ended(&run.id).await?;
        out.runs += 1;
    }
    let spool = repo.storage.spool_dir().to_path_buf();
    out.spools = tokio::task::spawn_blocking(move || sweep_spool(&spool))
        .await
        .map_err(|e| Error::Invalid(format!("spool task failed: {e}")))?;
    Ok(out)
}

/// Deletes an unfinished pack's object (if it got that far) and then forgets it.
async fn delete_unfinished(
    storage: &dyn Storage,
    catalog: &Catalog,
    pack: &str,
    run_id: &str,
) -> Result<(), Error> {
    let obj = ObjectRef::new(format!("{pack}.enc"), "");
    with_retry(&format!("deleting unfinished pack {pack}.enc"), || {
        storage.remove(&obj)
    })
    .await?;
    catalog.forget_unfinished_pack(pack, run_id).await
}

/// Removes the spool folders of runs that are gone from this host (their lock is free), and
/// half-made ones (`.new-run-<id>`) when no run is being created (the spool's own lock is
/// free, see [`create_spool`]). Returns how many it removed. Files of other kinds in the
/// spool are left alone.
fn sweep_spool(spool: &Path) -> usize {
    // Held for the whole sweep: a run created meanwhile waits, so no `.new-run-` folder seen
    // below can belong to a living creator.
    let quiet = File::open(spool).ok().filter(|f| f.try_lock().is_ok());
    let Ok(entries) = std::fs::read_dir(spool) else {
        return 0;
    };
    let mut removed = 0;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let path = e.path();
        let abandoned = if name.starts_with("run-") {
            lock_is_held(&path.join("lock")) == Some(false)
        } else {
            name.starts_with(".new-run-") && quiet.is_some()
        };
        if abandoned && e.file_type().is_ok_and(|t| t.is_dir()) {
            tracing::info!("removing abandoned spool {}", path.display());
            remove_spool(&path);
            removed += 1;
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(lock_path: &Path, host: &str, lease_until: i64) -> RunRow {
        RunRow {
            id: "r".into(),
            host: host.into(),
            pid: 1,
            lock_path: lock_path.to_string_lossy().into_owned(),
            started_at: 0,
            lease_until,
        }
    }

    #[test]
    fn a_run_is_alive_while_its_flock_is_held_on_its_host_and_its_lease_elsewhere() {
        let dir = tempfile::tempdir().unwrap();
        let (run_dir, lock) = create_spool(dir.path(), "abc").unwrap();
        let path = run_dir.join("lock");
        // Same host: the flock decides, whatever the lease says.
        assert!(is_alive(&row(&path, "h", 0), "h", 1_000));
        // Another host can't see the flock: the lease decides.
        assert!(is_alive(&row(&path, "other", 2_000), "h", 1_000));
        assert!(!is_alive(&row(&path, "other", 500), "h", 1_000));
        // The process dies: the kernel drops the flock.
        drop(lock);
        assert!(!is_alive(&row(&path, "h", i64::MAX), "h", 1_000));
        // A removed spool folder is a finished or dead run.
        assert!(!is_alive(
            &row(&dir.path().join("nope/lock"), "h", i64::MAX),
            "h",
            1_000
        ));
    }

    #[test]
    fn the_sweep_removes_only_spools_whose_run_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let (live, _live_lock) = create_spool(dir.path(), "live").unwrap();
        let (dead, dead_lock) = create_spool(dir.path(), "dead").unwrap();
        std::fs::write(live.join("p.partial"), b"in flight").unwrap();
        std::fs::write(dead.join("p.partial"), b"left behind").unwrap();
        drop(dead_lock);
        // A folder whose creator is still at work (it holds the spool's lock), and a file of
        // another kind.
        std::fs::create_dir(dir.path().join(".new-run-young")).unwrap();
        std::fs::write(dir.path().join("key-1.enc.tmp"), b"x").unwrap();
        let creating = File::open(dir.path()).unwrap();
        creating.lock().unwrap();
        assert_eq!(sweep_spool(dir.path()), 1);
        assert!(
            live.join("p.partial").exists(),
            "a live run's pack survives"
        );
        assert!(!dead.exists());
        assert!(dir.path().join(".new-run-young").exists());
        assert!(dir.path().join("key-1.enc.tmp").exists());
        // Its creator died half-way (the lock went with it): the next sweep removes it at
        // once, with no grace period to wait out.
        drop(creating);
        assert_eq!(sweep_spool(dir.path()), 1);
        assert!(!dir.path().join(".new-run-young").exists());
        assert!(dir.path().join("key-1.enc.tmp").exists());
        assert!(live.join("p.partial").exists());
    }

    /// A run being created while a sweep runs is never half-seen: one or the other waits.
    #[test]
    fn runs_created_during_sweeps_survive_them() {
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().to_path_buf();
        let sweeper = {
            let spool = spool.clone();
            std::thread::spawn(move || {
                for _ in 0..300 {
                    sweep_spool(&spool);
                }
            })
        };
        let mut made = Vec::new();
        for i in 0..300 {
            made.push(create_spool(&spool, &format!("r{i}")).unwrap());
        }
        sweeper.join().unwrap();
        for (dir, _lock) in &made {
            assert!(dir.join("lock").exists(), "{} was swept", dir.display());
        }
    }
}
