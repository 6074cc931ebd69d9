//! The worker daemon and the job table, without the bot: what runs side by side and what
//! waits, which failures are retried, and that rate limits never fail a job. The job table
//! runs on a manual clock, so backoffs and leases move only when the test says so.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use storinator_shared::{
    CancelFlag, Catalog, ChunkerParams, Clock, DirStorage, EngineSettings, ForgetOptions, Job,
    JobArgs, JobPolicy, JobResult, JobState, Jobs, KdfParams, KeepPolicy, ManualClock, NoProgress,
    PruneOptions, Repo, RestoreOptions,
};
use storinator_testkit::fixtures::{InjectedFault, InstrumentedStorage, bytes};
use storinator_worker::daemon::{self, DaemonConfig};
use tokio::sync::oneshot;

const PASS: &str = "daemon jobs passphrase";
const USER: i64 = 7;
const WAIT: Duration = Duration::from_secs(60);

type Store = InstrumentedStorage<DirStorage>;

struct Daemon {
    dir: tempfile::TempDir,
    jobs: Jobs,
    clock: ManualClock,
    storage: Arc<Store>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Daemon {
    async fn start(concurrency: usize) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let catalog = Catalog::open_file(&dir.path().join("storinator.db"))
            .await
            .unwrap();
        let storage = Arc::new(InstrumentedStorage::new(
            DirStorage::open(dir.path().join("store")).unwrap(),
        ));
        Repo::init(
            &catalog,
            storage.as_ref(),
            PASS,
            KdfParams::fast_for_tests(),
        )
        .await
        .unwrap();
        let clock = ManualClock::new(1_700_000_000_000);
        let jobs = Jobs::new(catalog.pool().clone())
            .with_clock(Arc::new(clock.clone()))
            .with_policy(JobPolicy {
                lease_ms: 60_000,
                backoff_base_ms: 10_000,
                backoff_max_ms: 60_000,
                max_attempts: 2,
            });
        let settings = EngineSettings {
            pack_size: 64 * 1024,
            chunker: ChunkerParams::small(),
            threads: 1,
            ..EngineSettings::default()
        };
        let repo = Repo::open(catalog, storage.clone(), PASS, settings)
            .await
            .unwrap();
        // Whatever else the daemon learns to configure keeps its default here.
        #[allow(clippy::needless_update)]
        let cfg = DaemonConfig {
            worker_id: "w".into(),
            concurrency,
            poll_interval: Duration::from_millis(20),
            progress_interval: Duration::from_millis(50),
            ..DaemonConfig::default()
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(daemon::run(Arc::new(repo), jobs.clone(), cfg, async move {
            let _ = stopped.await;
        }));
        Daemon {
            dir,
            jobs,
            clock,
            storage,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// A folder of `n` incompressible 100 KB files (about one 64 KiB pack each).
    fn folder(&self, name: &str, n: u64) -> PathBuf {
        let p = self.dir.path().join("src").join(name);
        std::fs::create_dir_all(&p).unwrap();
        for i in 0..n {
            std::fs::write(p.join(format!("f{i}.bin")), bytes(100_000, 1000 * n + i)).unwrap();
        }
        p
    }

    async fn backup(&self, path: &Path) -> Job {
        self.jobs
            .enqueue(
                USER,
                USER,
                &JobArgs::Backup {
                    path: path.display().to_string(),
                    encrypt: true,
                },
            )
            .await
            .unwrap()
    }

    /// Waits (bounded) until `done` holds for the job's row.
    async fn wait(&self, job: &Job, what: &str, done: impl Fn(&Job) -> bool) -> Job {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let j = self.jobs.get(job.id).await.unwrap().unwrap();
            if done(&j) {
                return j;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "job {} never {what}: {j:?}",
                job.id
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Another handle on the repository, as a separate process would open it.
    async fn repo(&self) -> Repo {
        let catalog = Catalog::open_file(&self.dir.path().join("storinator.db"))
            .await
            .unwrap();
        let store = DirStorage::open(self.dir.path().join("store")).unwrap();
        Repo::open(
            catalog,
            Arc::new(store),
            PASS,
            EngineSettings {
                pack_size: 64 * 1024,
                chunker: ChunkerParams::small(),
                threads: 1,
                ..EngineSettings::default()
            },
        )
        .await
        .unwrap()
    }

    async fn finished(&self, job: &Job) -> Job {
        self.wait(job, "finished", |j| j.state.is_final()).await
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(WAIT, self.task.take().unwrap())
            .await
            .expect("daemon stops")
            .unwrap()
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_run_side_by_side_but_one_backup_per_folder_at_a_time() {
    let d = Daemon::start(2).await;
    d.storage.delay_ms.store(100, Ordering::SeqCst);
    let (a, b) = (d.folder("a", 8), d.folder("b", 8));
    // Two folders: both backups upload at the same time.
    let ja = d.backup(&a).await;
    let jb = d.backup(&b).await;
    for j in [&ja, &jb] {
        let j = d.finished(j).await;
        assert_eq!(j.state, JobState::Done, "{j:?}");
    }
    assert_eq!(
        d.storage.max_in_flight.load(Ordering::SeqCst),
        2,
        "two jobs ran side by side"
    );
    // The same folder twice: both jobs are claimed at once, but the second backup waits for
    // the first; never two uploads at a time.
    std::fs::write(a.join("extra.bin"), bytes(800_000, 5)).unwrap();
    d.storage.max_in_flight.store(0, Ordering::SeqCst);
    let j1 = d.backup(&a).await;
    std::fs::write(a.join("more.bin"), bytes(300_000, 6)).unwrap();
    let j2 = d.backup(&a).await;
    d.wait(&j2, "started", |j| j.state == JobState::Running)
        .await;
    assert_eq!(
        d.jobs.get(j1.id).await.unwrap().unwrap().state,
        JobState::Running,
        "both jobs run at once"
    );
    for j in [&j1, &j2] {
        assert_eq!(d.finished(j).await.state, JobState::Done);
    }
    assert_eq!(d.storage.max_in_flight.load(Ordering::SeqCst), 1);
    d.stop().await;

    // --concurrency 1: one job at a time, whatever the folders.
    let d = Daemon::start(1).await;
    d.storage.delay_ms.store(100, Ordering::SeqCst);
    let (a, b) = (d.folder("a", 4), d.folder("b", 4));
    let ja = d.backup(&a).await;
    let jb = d.backup(&b).await;
    for j in [&ja, &jb] {
        assert_eq!(d.finished(j).await.state, JobState::Done);
    }
    assert_eq!(d.storage.max_in_flight.load(Ordering::SeqCst), 1);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_are_retried_after_a_pause_and_fatal_ones_are_not() {
    let d = Daemon::start(2).await;
    let verify = || JobArgs::Verify { path: None };

    // Storage unreachable: the job goes back to the queue with the reason, and waits out
    // its backoff (on the job table's clock) before the next attempt.
    *d.storage.list_fault.lock().unwrap() = Some(InjectedFault::Transient);
    let job = d.jobs.enqueue(USER, USER, &verify()).await.unwrap();
    let queued = d
        .wait(&job, "requeued", |j| {
            j.state == JobState::Queued && j.error.is_some()
        })
        .await;
    assert_eq!(queued.attempt, 1);
    assert!(
        queued
            .error
            .as_deref()
            .unwrap()
            .contains("injected listing failure"),
        "{queued:?}"
    );
    assert_eq!(queued.not_before, d.clock.now_ms() + 10_000);
    *d.storage.list_fault.lock().unwrap() = None;
    // Not before the backoff has passed.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        d.jobs.get(job.id).await.unwrap().unwrap().state,
        JobState::Queued
    );
    d.clock.advance(10_000);
    let done = d.finished(&job).await;
    assert_eq!(done.state, JobState::Done, "{done:?}");
    assert_eq!(done.attempt, 2);

    // Storage refusing for good: failed at once, with the reason, attempts left unused.
    *d.storage.list_fault.lock().unwrap() = Some(InjectedFault::Fatal);
    let job = d.jobs.enqueue(USER, USER, &verify()).await.unwrap();
    let failed = d.finished(&job).await;
    assert_eq!(failed.state, JobState::Failed, "{failed:?}");
    assert_eq!(failed.attempt, 1);
    assert!(failed.attempt < failed.max_attempts);
    assert!(
        failed
            .error
            .as_deref()
            .unwrap()
            .contains("injected listing failure"),
        "{failed:?}"
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flood_waits_beyond_every_attempt_budget_never_fail_a_job() {
    let d = Daemon::start(1).await;
    let src = d.folder("data", 3);
    // More flood waits than the job has attempts (2) and than storage calls get retries (5).
    d.storage.put_faults.store(12, Ordering::SeqCst);
    let job = d.backup(&src).await;
    let done = d.finished(&job).await;
    assert_eq!(done.state, JobState::Done, "{done:?}");
    assert_eq!(done.attempt, 1, "waited out, never failed");
    assert!(done.error.is_none());
    assert_eq!(d.storage.put_faults_served.load(Ordering::SeqCst), 12);
    assert!(d.storage.put_count() >= 3);
    d.stop().await;
}

/// A copy of a folder's files (name → content).
fn contents(p: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(p)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

/// A prune job and a backup job on the daemon at the same time, the backup putting back data
/// that only a forgotten snapshot used (so it deduplicates against the very chunks the prune
/// deletes or moves): both finish, every snapshot restores byte for byte, storage and
/// catalog agree, and a later prune finds nothing the backup needs missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prune_job_and_a_backup_job_run_side_by_side() {
    let d = Daemon::start(2).await;
    let a = d.folder("a", 8);
    let mut expected = std::collections::BTreeMap::new();
    let snapshot_of = |j: &Job| match &j.result {
        Some(JobResult::Backup { snapshot, .. }) => snapshot.clone(),
        _ => panic!("{j:?}"),
    };
    let first = contents(&a);
    let j = d.finished(&d.backup(&a).await).await;
    assert_eq!(j.state, JobState::Done, "{j:?}");
    expected.insert(snapshot_of(&j), first.clone());
    // Half the files change; the first snapshot is forgotten: its half becomes garbage.
    for i in 0..4u64 {
        std::fs::write(a.join(format!("f{i}.bin")), bytes(100_000, 77 + i)).unwrap();
    }
    let j = d.finished(&d.backup(&a).await).await;
    expected.insert(snapshot_of(&j), contents(&a));
    let repo = d.repo().await;
    let forgot = repo
        .forget(
            &ForgetOptions {
                owner: format!("tg:{USER}"),
                path: a.display().to_string(),
                policy: KeepPolicy::parse("keep last 1").unwrap(),
                tz: jiff::tz::TimeZone::UTC,
                dry_run: false,
                allow_empty: false,
                only: None,
            },
            &CancelFlag::new(),
        )
        .await
        .unwrap();
    for i in &forgot.remove {
        expected.remove(&i.snapshot.short_id);
    }
    // The forgotten data comes back, and new data with it: a slow backup starts ...
    for i in 0..4u64 {
        let name = format!("f{i}.bin");
        std::fs::write(a.join(&name), &first[&name]).unwrap();
    }
    std::fs::write(a.join("new.bin"), bytes(600_000, 99)).unwrap();
    let third = contents(&a);
    d.storage.delay_ms.store(150, Ordering::SeqCst);
    let uploaded = d.storage.puts.lock().unwrap().len();
    let backup = d.backup(&a).await;
    // Files go in name order: once new.bin's first packs are uploaded, the backup has
    // deduplicated f0-f3 against the forgotten snapshot's chunks, and commits only later.
    let deadline = tokio::time::Instant::now() + WAIT;
    while d.storage.puts.lock().unwrap().len() < uploaded + 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the backup uploads nothing"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // ... and a prune joins it.
    let prune = d
        .jobs
        .enqueue(
            USER,
            USER,
            &JobArgs::Prune {
                max_repack: None,
                repack_below: 90.0,
            },
        )
        .await
        .unwrap();
    // Claimed (a quick prune may be done already) while the backup is still running: the
    // two overlap, and the prune did not wait for the backup.
    d.wait(&prune, "claimed", |j| j.state != JobState::Queued)
        .await;
    assert_eq!(
        d.jobs.get(backup.id).await.unwrap().unwrap().state,
        JobState::Running,
        "the backup was still running when the prune was claimed"
    );
    let prune = d.finished(&prune).await;
    let backup = d.finished(&backup).await;
    assert_eq!(prune.state, JobState::Done, "{prune:?}");
    assert_eq!(backup.state, JobState::Done, "{backup:?}");
    let Some(JobResult::Prune { deleted_packs, .. }) = prune.result else {
        panic!("{prune:?}")
    };
    assert!(deleted_packs > 0, "the prune had work: {prune:?}");
    expected.insert(snapshot_of(&backup), third);
    d.storage.delay_ms.store(0, Ordering::SeqCst);
    // A second prune finishes what the first left (packs of the backup it had to skip).
    let again = repo
        .prune(
            &PruneOptions {
                repack_below: 90.0,
                ..Default::default()
            },
            &NoProgress,
            &CancelFlag::new(),
        )
        .await
        .unwrap();
    assert_eq!(again.sparse_left, 0, "{again:?}");

    // Every snapshot left restores byte for byte.
    assert_eq!(expected.len(), 2);
    for (id, tree) in &expected {
        let to = d.dir.path().join(format!("restore-{id}"));
        repo.restore(
            &RestoreOptions {
                path: a.display().to_string(),
                to: to.clone(),
                snapshot: Some(id.clone()),
                owner: format!("tg:{USER}"),
                overwrite: false,
                within: None,
                same_owner: None,
            },
            &NoProgress,
            &CancelFlag::new(),
        )
        .await
        .unwrap_or_else(|e| panic!("snapshot {id}: {e}"));
        assert_eq!(&contents(&to.join("a")), tree, "snapshot {id}");
    }
    let v = repo.verify(true, &NoProgress).await.unwrap();
    assert!(v.problems.is_empty(), "{:?}", v.problems);
    d.stop().await;
}

/// A daemon of a host registers it with its roots at start, renews its heartbeat while it
/// runs, and registers again if the host's row disappears.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_registers_its_host_and_keeps_its_heartbeat() {
    use storinator_shared::ops::hosts::Registration;
    let dir = tempfile::tempdir().unwrap();
    let catalog = Catalog::open_file(&dir.path().join("storinator.db"))
        .await
        .unwrap();
    let storage = DirStorage::open(dir.path().join("store")).unwrap();
    Repo::init(&catalog, &storage, PASS, KdfParams::fast_for_tests())
        .await
        .unwrap();
    let clock = ManualClock::new(1_700_000_000_000);
    let jobs = Jobs::new(catalog.pool().clone()).with_clock(Arc::new(clock.clone()));
    let repo = Repo::open(catalog, Arc::new(storage), PASS, EngineSettings::default())
        .await
        .unwrap();
    let reg = Registration {
        name: "web1".into(),
        backup_roots: vec!["/srv".into()],
        restore_roots: vec!["/srv/restore".into()],
    };
    let cfg = DaemonConfig {
        worker_id: "web1-1".into(),
        poll_interval: Duration::from_millis(20),
        host: Some(reg.clone()),
        host_heartbeat: Duration::from_millis(20),
        ..DaemonConfig::default()
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(daemon::run(Arc::new(repo), jobs.clone(), cfg, async move {
        let _ = stopped.await;
    }));
    let seen = |at: i64| {
        let jobs = jobs.clone();
        async move {
            let deadline = tokio::time::Instant::now() + WAIT;
            loop {
                let hosts = jobs.hosts().await.unwrap();
                if let [h] = &hosts[..]
                    && h.last_seen >= at
                {
                    return h.clone();
                }
                assert!(tokio::time::Instant::now() < deadline, "{hosts:?}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    let h = seen(clock.now_ms()).await;
    assert_eq!(h.name, "web1");
    assert_eq!(h.backup_roots, ["/srv"]);
    assert_eq!(h.restore_roots, ["/srv/restore"]);
    clock.advance(60_000);
    seen(clock.now_ms()).await;
    // Someone removed the host: the next heartbeat registers it again, roots and all.
    sqlx::query("DELETE FROM hosts")
        .execute(jobs.pool())
        .await
        .unwrap();
    let h = seen(clock.now_ms()).await;
    assert_eq!(h.backup_roots, ["/srv"]);
    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
}
