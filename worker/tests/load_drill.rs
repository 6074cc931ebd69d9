//! Concurrency between processes, through the real daemon and the real command line:
//!
//! - the load drill: 40 backups of different folders from 4 users, queued at once, run by two
//!   `storinator-worker run --concurrency 2` processes sharing the database and the store;
//!   every job succeeds exactly once, and 40 restores (through the same daemons) come back
//!   byte-identical;
//! - the command line backing up a folder the daemon is backing up fails at once, naming the
//!   daemon's run; nothing is ever recorded twice.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use storinator_shared::{
    Catalog, DirStorage, EngineSettings, JobArgs, JobResult, JobState, Jobs, Repo, Storage,
};
use storinator_testkit::fixtures::{InstrumentedStorage, bytes, describe_tree};
use storinator_worker::daemon::{self, DaemonConfig};

const PASS: &str = "pw for tests";
const WAIT: Duration = Duration::from_secs(50);

/// The worker binary with a clean environment pointing at `dir`.
fn worker(dir: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_storinator-worker"));
    c.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("STORINATOR_DATA_DIR", dir.join("data"))
        .env(
            "STORINATOR_STORAGE",
            format!("dir:{}", dir.join("store").display()),
        )
        .env("STORINATOR_PASSPHRASE", PASS)
        .env("STORINATOR_INSECURE_FAST_KDF", "1")
        // The chat's restores write only below the restore roots.
        .env("STORINATOR_RESTORE_ROOTS", dir.join("restored"))
        // Small packs: every backup writes several, so the spools are busy.
        .env("STORINATOR_PACK_SIZE", "65536")
        .current_dir(dir);
    c
}

fn init(dir: &Path) {
    std::fs::create_dir_all(dir.join("data")).unwrap();
    std::fs::create_dir_all(dir.join("restored")).unwrap();
    let out = worker(dir).arg("init").output().unwrap();
    assert!(
        out.status.success(),
        "init: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn db_url(dir: &Path) -> String {
    format!("sqlite://{}", dir.join("data/storinator.db").display())
}

/// Kills a daemon process on drop (a failed assertion must not leave it running) and then
/// shows its log.
struct Daemon(Child, PathBuf);

impl Daemon {
    fn start(dir: &Path, log: &str) -> Daemon {
        let log_path = dir.join(log);
        let log = std::fs::File::create(&log_path).unwrap();
        Daemon(
            worker(dir)
                .args(["run", "--concurrency", "2", "-vv"])
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
            log_path,
        )
    }

    /// SIGTERM, then wait for a clean exit.
    fn stop(mut self) {
        let kill = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status()
            .unwrap();
        assert!(kill.success());
        let t = Instant::now();
        let status = loop {
            if let Some(s) = self.0.try_wait().unwrap() {
                break s;
            }
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "daemon ignored SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(status.code(), Some(0));
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.1).unwrap_or_default();
            eprintln!("--- {} ---\n{log}", self.1.display());
        }
    }
}

/// Waits until every job in `ids` is final; returns them.
async fn wait_final(jobs: &Jobs, ids: &[i64]) -> Vec<storinator_shared::Job> {
    let deadline = Instant::now() + WAIT;
    loop {
        let mut all = Vec::new();
        for id in ids {
            all.push(jobs.get(*id).await.unwrap().unwrap());
        }
        if all.iter().all(|j| j.state.is_final()) {
            return all;
        }
        let open: Vec<_> = all
            .iter()
            .filter(|j| !j.state.is_final())
            .map(|j| (j.id, j.state))
            .collect();
        assert!(Instant::now() < deadline, "jobs not finished: {open:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A small folder of its own for user `u`, folder `i`: a few files across a few packs.
fn folder(root: &Path, u: i64, i: u64) -> PathBuf {
    let p = root.join(format!("user{u}/folder{i:02}"));
    std::fs::create_dir_all(p.join("sub")).unwrap();
    let seed = (u as u64) * 1000 + i * 10;
    std::fs::write(p.join("a.bin"), bytes(90_000, seed)).unwrap();
    std::fs::write(p.join("sub/b.bin"), bytes(50_000, seed + 1)).unwrap();
    std::fs::write(p.join("sub/c.txt"), format!("user {u} folder {i}\n")).unwrap();
    // Shared by every folder: deduplicated across users and jobs running at once.
    std::fs::write(p.join("common.bin"), bytes(70_000, 7)).unwrap();
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_backups_from_four_users_on_two_daemons_all_succeed_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    init(dir);
    let src = dir.join("src");
    std::fs::create_dir_all(&src).unwrap();
    let src = src.canonicalize().unwrap();
    let users = [11_i64, 22, 33, 44];
    let mut folders = Vec::new();
    for u in users {
        for i in 0..10 {
            folders.push((u, folder(&src, u, i).canonicalize().unwrap()));
        }
    }
    let catalog = Catalog::open(&db_url(dir)).await.unwrap();
    let jobs = Jobs::new(catalog.pool().clone());
    let started = Instant::now();
    let d1 = Daemon::start(dir, "daemon1.log");
    let d2 = Daemon::start(dir, "daemon2.log");
    // The users send their /backup commands interleaved, all within a moment.
    let mut queued = Vec::new();
    for i in 0..10 {
        for (u, path) in folders
            .iter()
            .filter(|(_, p)| p.ends_with(format!("folder{i:02}")))
        {
            let args = JobArgs::Backup {
                path: path.display().to_string(),
                encrypt: true,
            };
            queued.push((jobs.enqueue(*u, *u, &args).await.unwrap().id, *u, path));
        }
    }
    let ids: Vec<i64> = queued.iter().map(|(id, _, _)| *id).collect();
    let done = wait_final(&jobs, &ids).await;
    let backup_secs = started.elapsed().as_secs_f64();
    for j in &done {
        assert_eq!(
            (j.state, j.attempt, j.error.as_deref()),
            (JobState::Done, 1, None),
            "job {} ran once and succeeded",
            j.id
        );
    }
    // Exactly one snapshot per folder, the one each job reported, owned by its user.
    for (j, (_, u, path)) in done.iter().zip(&queued) {
        let snaps = storinator_shared::list_snapshots(&catalog, &format!("tg:{u}"), None)
            .await
            .unwrap();
        let of_path: Vec<_> = snaps
            .iter()
            .filter(|s| Path::new(&s.root) == path.as_path())
            .collect();
        assert_eq!(of_path.len(), 1, "{}", path.display());
        match &j.result {
            Some(JobResult::Backup {
                snapshot, files, ..
            }) => {
                assert_eq!(snapshot, &of_path[0].short_id);
                assert_eq!(*files, 4);
            }
            other => panic!("job {}: {other:?}", j.id),
        }
    }
    assert_eq!(
        storinator_shared::list_snapshots(&catalog, "tg:11", None)
            .await
            .unwrap()
            .len(),
        10
    );

    // Every folder restores, byte for byte, through the same daemons.
    let out = dir.join("restored");
    let mut restores = Vec::new();
    for (u, path) in &folders {
        let to = out.join(path.strip_prefix(&src).unwrap());
        let args = JobArgs::Restore {
            path: path.display().to_string(),
            to: Some(to.parent().unwrap().display().to_string()),
            snapshot: None,
            overwrite: false,
        };
        restores.push(jobs.enqueue(*u, *u, &args).await.unwrap().id);
    }
    for j in wait_final(&jobs, &restores).await {
        assert_eq!((j.state, j.attempt), (JobState::Done, 1), "{j:?}");
    }
    for (_, path) in &folders {
        let to = out.join(path.strip_prefix(&src).unwrap());
        assert_eq!(
            describe_tree(path),
            describe_tree(&to),
            "{}",
            path.display()
        );
    }
    println!(
        "40 backups on two daemons in {backup_secs:.1}s; 40 restores done after {:.1}s",
        started.elapsed().as_secs_f64()
    );
    d1.stop();
    d2.stop();

    // Nothing left behind: no runs, no unfinished packs, no spool, no stranger in storage.
    assert!(catalog.runs().await.unwrap().is_empty());
    assert!(catalog.unfinished_packs().await.unwrap().is_empty());
    let spool: Vec<_> = std::fs::read_dir(dir.join("store/.spool"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(spool.is_empty(), "{spool:?}");
    let store = DirStorage::open(dir.join("store")).unwrap();
    let mut objects: Vec<String> = store
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.name)
        .filter(|n| !n.starts_with("key-"))
        .collect();
    let mut packs: Vec<String> = catalog
        .packs()
        .await
        .unwrap()
        .into_iter()
        .map(|p| format!("{}.enc", p.id))
        .collect();
    objects.sort();
    packs.sort();
    assert_eq!(objects, packs);
    let dup: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM (SELECT 1 FROM entries WHERE to_seq IS NULL \
         GROUP BY root_id, path HAVING COUNT(*) > 1)",
    )
    .fetch_one(catalog.pool())
    .await
    .unwrap();
    assert_eq!(dup, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_line_refuses_a_folder_the_daemon_is_backing_up_naming_its_run() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    init(dir);
    let data = dir.join("src/data");
    std::fs::create_dir_all(&data).unwrap();
    for i in 0..8 {
        std::fs::write(data.join(format!("f{i}.bin")), bytes(100_000, i)).unwrap();
    }
    let data = data.canonicalize().unwrap();
    // The daemon (the same code as `storinator-worker run`) in this process, with uploads
    // slowed down so its backup is surely running when the command line starts.
    let catalog = Catalog::open(&db_url(dir)).await.unwrap();
    let storage = Arc::new(InstrumentedStorage::new(
        DirStorage::open(dir.join("store")).unwrap(),
    ));
    storage.delay_ms.store(150, Ordering::Relaxed);
    let settings = EngineSettings {
        pack_size: 65_536,
        ..EngineSettings::default()
    };
    let repo = Repo::open(catalog.clone(), storage.clone(), PASS, settings)
        .await
        .unwrap();
    let jobs = Jobs::new(catalog.pool().clone());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let daemon = tokio::spawn(daemon::run(
        Arc::new(repo),
        jobs.clone(),
        DaemonConfig {
            worker_id: "in-process".into(),
            concurrency: 2,
            poll_interval: Duration::from_millis(20),
            progress_interval: Duration::from_millis(100),
            restore_roots: Vec::new(),
            outbox_dir: dir.join("outbox"),
            courier: None,
            host: None,
            host_heartbeat: Duration::from_secs(30),
        },
        async move {
            let _ = stop_rx.await;
        },
    ));
    let job = jobs
        .enqueue(
            7,
            7,
            &JobArgs::Backup {
                path: data.display().to_string(),
                encrypt: true,
            },
        )
        .await
        .unwrap();
    let deadline = Instant::now() + WAIT;
    while storage.put_count() < 1 {
        assert!(
            Instant::now() < deadline,
            "the daemon's backup never started"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let cli = worker(dir)
        .args(["backup", &data.display().to_string(), "--owner", "tg:7"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&cli.stderr);
    assert_eq!(cli.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "{} (owner tg:7) is being backed up by another run (run ",
            data.display()
        )) && err.contains(&format!("(pid {} on ", std::process::id())),
        "{err}"
    );
    let done = wait_final(&jobs, &[job.id]).await;
    assert_eq!(done[0].state, JobState::Done, "{:?}", done[0]);
    // The daemon's run is over: now the command line goes through.
    let cli = worker(dir)
        .args(["backup", &data.display().to_string(), "--owner", "tg:7"])
        .output()
        .unwrap();
    assert!(
        cli.status.success(),
        "{}",
        String::from_utf8_lossy(&cli.stderr)
    );
    // A job whose user id is not a Telegram id is refused, not run as someone else.
    let bad = jobs
        .enqueue(
            -5,
            -5,
            &JobArgs::Backup {
                path: data.display().to_string(),
                encrypt: true,
            },
        )
        .await
        .unwrap();
    let bad = wait_final(&jobs, &[bad.id]).await.remove(0);
    assert_eq!(bad.state, JobState::Failed);
    assert_eq!(bad.attempt, 1, "not retried");
    assert!(
        bad.error
            .as_deref()
            .unwrap_or("")
            .starts_with("invalid owner \"tg:-5\""),
        "{:?}",
        bad.error
    );
    let _ = stop_tx.send(());
    daemon.await.unwrap().unwrap();
    let snaps = storinator_shared::list_snapshots(&catalog, "tg:7", None)
        .await
        .unwrap();
    assert_eq!(snaps.len(), 2);
    let dup: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM (SELECT 1 FROM entries WHERE to_seq IS NULL \
         GROUP BY root_id, path HAVING COUNT(*) > 1)",
    )
    .fetch_one(catalog.pool())
    .await
    .unwrap();
    assert_eq!(dup, 0);
}

#[test]
fn the_command_line_checks_the_owner_flag() {
    let dir = tempfile::tempdir().unwrap();
    let out = worker(dir.path())
        .args(["snapshots", "--owner", "tg:bob"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("invalid value 'tg:bob' for '--owner <OWNER>'")
            && err.contains("owners are `local` or `tg:<numeric Telegram user id>`"),
        "{err}"
    );
}
