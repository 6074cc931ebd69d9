//! End to end: the real bot (dispatcher + notifier) against the fake Bot API server, the real
//! worker daemon with the real engine, one SQLite file, a directory store slowed down so
//! progress is visible. Each test is bounded in time.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use storinator_bot::BotConfig;
use storinator_shared::{
    Catalog, ChunkerParams, DirStorage, EngineSettings, JobPolicy, JobState, Jobs, KdfParams, Repo,
};
use storinator_testkit::botapi::{FakeBotApi, Fault};
use storinator_testkit::fixtures::InstrumentedStorage;
use storinator_worker::daemon::{self, DaemonConfig};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const USER: i64 = 7;
const USER2: i64 = 8;
const CHAT: i64 = 7;
const PASS: &str = "correct horse battery staple";
const WAIT: Duration = Duration::from_secs(60);

struct World {
    api: FakeBotApi,
    dir: tempfile::TempDir,
    root: PathBuf,
    db_url: String,
    jobs: Jobs,
    delay_ms: Arc<AtomicU64>,
    puts: Arc<Mutex<Vec<String>>>,
    bot: Option<(oneshot::Sender<()>, JoinHandle<anyhow::Result<()>>)>,
    worker: Option<(oneshot::Sender<()>, JoinHandle<anyhow::Result<()>>)>,
}

/// Deterministic incompressible bytes.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn make_tree(data: &Path) {
    std::fs::create_dir_all(data.join("photos/2024")).unwrap();
    std::fs::create_dir_all(data.join("docs")).unwrap();
    for i in 0..6u64 {
        std::fs::write(
            data.join(format!("photos/2024/img {i}.raw")),
            noise(i, 96 * 1024),
        )
        .unwrap();
    }
    for i in 0..4u64 {
        std::fs::write(
            data.join(format!("docs/note{i}.txt")),
            noise(100 + i, 40 * 1024),
        )
        .unwrap();
    }
    std::fs::write(data.join("README"), b"hello from the backup\n").unwrap();
}

impl World {
    async fn new(lease_ms: i64) -> World {
        let api = FakeBotApi::start().await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        make_tree(&root.join("data"));
        let root = root.canonicalize().unwrap();
        let db_url = format!("sqlite://{}", dir.path().join("storinator.db").display());
        let catalog = Catalog::open(&db_url).await.unwrap();
        let store = DirStorage::open(dir.path().join("store")).unwrap();
        Repo::init(&catalog, &store, PASS, KdfParams::fast_for_tests())
            .await
            .unwrap();
        let jobs = Jobs::new(catalog.pool().clone()).with_policy(JobPolicy {
            lease_ms,
            backoff_base_ms: 200,
            backoff_max_ms: 1000,
            max_attempts: 3,
        });
        World {
            api,
            dir,
            root,
            db_url,
            jobs,
            delay_ms: Arc::new(AtomicU64::new(60)),
            puts: Arc::default(),
            bot: None,
            worker: None,
        }
    }

    async fn start_bot(&mut self) {
        let vars = [
            ("TELOXIDE_TOKEN".to_string(), "123456:E2E".to_string()),
            ("TELOXIDE_API_URL".into(), self.api.url()),
            ("STORINATOR_ALLOWED_USERS".into(), format!("{USER},{USER2}")),
            (
                "STORINATOR_BACKUP_ROOTS".into(),
                self.root.display().to_string(),
            ),
            ("DATABASE_URL".into(), self.db_url.clone()),
            ("STORINATOR_BOT_EDIT_INTERVAL_MS".into(), "150".into()),
            ("STORINATOR_BOT_TICK_MS".into(), "50".into()),
            ("STORINATOR_BOT_POLL_TIMEOUT_S".into(), "1".into()),
        ];
        let cfg =
            BotConfig::from_lookup(|k| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()))
                .unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(storinator_bot::run(cfg, async move {
            let _ = rx.await;
        }));
        self.api
            .wait_for(WAIT, |a| {
                (!a.calls_of("getUpdates").is_empty()).then_some(())
            })
            .await
            .expect("bot polls");
        self.bot = Some((tx, task));
    }

    /// Start a worker daemon as a fresh process would: its own catalog handle and repo.
    async fn start_worker(&mut self, id: &str) {
        let catalog = Catalog::open(&self.db_url).await.unwrap();
        let storage = Arc::new(InstrumentedStorage {
            inner: DirStorage::open(self.dir.path().join("store")).unwrap(),
            delay_ms: self.delay_ms.clone(),
            fail_puts_after: Arc::new(std::sync::atomic::AtomicUsize::new(usize::MAX)),
            puts: self.puts.clone(),
        });
        let settings = EngineSettings {
            pack_size: 64 * 1024,
            chunker: ChunkerParams::small(),
            threads: 1,
            ..EngineSettings::default()
        };
        let repo = Repo::open(catalog, storage, PASS, settings).await.unwrap();
        let cfg = DaemonConfig {
            worker_id: id.to_string(),
            concurrency: 2,
            poll_interval: Duration::from_millis(50),
            progress_interval: Duration::from_millis(100),
            restore_roots: vec![self.root.clone()],
        };
        let (tx, rx) = oneshot::channel::<()>();
        let jobs = self.jobs.clone();
        let task = tokio::spawn(daemon::run(Arc::new(repo), jobs, cfg, async move {
            let _ = rx.await;
        }));
        self.worker = Some((tx, task));
    }

    /// Graceful worker stop (SIGTERM path).
    async fn stop_worker(&mut self) {
        let (tx, task) = self.worker.take().unwrap();
        let _ = tx.send(());
        tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("worker stops")
            .unwrap()
            .unwrap();
    }

    /// Kill the worker: its tasks vanish mid-flight, no cleanup, leases left to expire.
    fn kill_worker(&mut self) {
        let (_tx, task) = self.worker.take().unwrap();
        task.abort();
    }

    async fn stop(mut self) {
        if self.worker.is_some() {
            self.stop_worker().await;
        }
        let (tx, task) = self.bot.take().unwrap();
        let _ = tx.send(());
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("bot stops")
            .unwrap()
            .unwrap();
    }

    fn say(&self, text: &str) {
        self.api.push_message(USER, CHAT, text);
    }

    async fn wait_text(&self, needle: &str) -> String {
        match self.api.wait_for_bot_text(CHAT, needle, WAIT).await {
            Some(m) => m.text,
            None => panic!(
                "no bot message with {needle:?}:\n{}",
                self.api.transcript_text(CHAT)
            ),
        }
    }

    async fn job_count(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM jobs")
            .fetch_one(self.jobs.pool())
            .await
            .unwrap()
    }

    async fn latest_job(&self) -> storinator_shared::Job {
        self.jobs.list_for_user(USER, 1).await.unwrap().remove(0)
    }
}

fn assert_same_tree(a: &Path, b: &Path) {
    let mut count = 0;
    for entry in walk(a) {
        let rel = entry.strip_prefix(a).unwrap();
        let other = b.join(rel);
        if entry.is_dir() {
            assert!(other.is_dir(), "{} missing", other.display());
        } else {
            assert_eq!(
                std::fs::read(&entry).unwrap(),
                std::fs::read(&other).unwrap(),
                "{}",
                rel.display()
            );
            count += 1;
        }
    }
    assert_eq!(walk(a).len(), walk(b).len(), "same number of entries");
    assert!(count > 0);
}

fn walk(p: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(p).unwrap() {
        let path = e.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        }
        out.push(path);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_then_restore_subfolder_through_the_chat() {
    let mut w = World::new(5_000).await;
    w.start_bot().await;
    w.start_worker("w1").await;
    let data = w.root.join("data");
    w.say(&format!("/backup {}", data.display()));
    w.wait_text("Queued").await;
    let summary = w.wait_text("Done: snapshot").await;
    assert!(summary.contains("Files: 11"), "{summary}");
    let backup_msg = w
        .api
        .bot_messages(CHAT)
        .into_iter()
        .find(|m| m.text.contains("Done: snapshot"))
        .unwrap();
    let progress_edits = backup_msg
        .edits
        .iter()
        .filter(|t| t.contains("Phase:"))
        .count();
    assert!(progress_edits >= 2, "{}", w.api.transcript_text(CHAT));

    let out = w.root.join("restored");
    w.say(&format!(
        "/restore {}/photos to {}",
        data.display(),
        out.display()
    ));
    let restored = w.wait_text("Restored").await;
    assert!(restored.contains("Restored 6 files"), "{restored}");
    assert_same_tree(&data.join("photos"), &out.join("photos"));

    // Another allowed user sees none of it and can't restore it.
    let jobs_before = w.job_count().await;
    w.api.push_message(
        USER2,
        USER2,
        &format!(
            "/restore {}/photos to {}/mine",
            data.display(),
            w.root.display()
        ),
    );
    w.api
        .wait_for_bot_text(USER2, "no backup containing", WAIT)
        .await
        .expect("refused");
    w.api.push_message(USER2, USER2, "/snapshots");
    w.api
        .wait_for_bot_text(USER2, "No snapshots yet", WAIT)
        .await
        .expect("none listed");
    w.api.push_message(USER2, USER2, "/cancel 1");
    w.api
        .wait_for_bot_text(USER2, "no job #1", WAIT)
        .await
        .expect("not visible");
    assert_eq!(w.job_count().await, jobs_before);

    w.say("/jobs");
    w.wait_text("Your recent jobs").await;
    w.say(&format!("/snapshots {}", data.display()));
    w.wait_text("snapshots:").await;
    w.say(&format!("/ls {}/photos", data.display()));
    w.wait_text("📁 2024/").await;
    println!("--- chat transcript ---\n{}", w.api.transcript_text(CHAT));
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_over_differing_files_asks_first_then_overwrites() {
    let mut w = World::new(5_000).await;
    w.delay_ms.store(0, Ordering::Relaxed);
    w.start_bot().await;
    w.start_worker("w1").await;
    let data = w.root.join("data");
    w.say(&format!("/backup {}", data.display()));
    w.wait_text("Done: snapshot").await;
    // The user changes a file, then restores the folder in place.
    std::fs::write(data.join("docs/note1.txt"), b"changed since the backup").unwrap();
    w.say(&format!("/restore {}/docs", data.display()));
    let prompt = w.wait_text("Overwrite them?").await;
    assert!(prompt.contains("note1.txt"), "{prompt}");
    assert_eq!(
        std::fs::read(data.join("docs/note1.txt")).unwrap(),
        b"changed since the backup"
    );
    let m = w
        .api
        .bot_messages(CHAT)
        .into_iter()
        .find(|m| m.text.contains("Overwrite them?"))
        .unwrap();
    let ow = m
        .button_data()
        .into_iter()
        .find(|d| d.starts_with("ow:"))
        .unwrap();
    w.api.push_callback(USER, CHAT, m.message_id, &ow);
    w.wait_text("Restored").await;
    assert_eq!(
        std::fs::read(data.join("docs/note1.txt")).unwrap(),
        noise(101, 40 * 1024)
    );
    println!("--- chat transcript ---\n{}", w.api.transcript_text(CHAT));
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_write_no_job_rows() {
    let mut w = World::new(5_000).await;
    w.start_bot().await;
    w.start_worker("w1").await;
    w.api.push_message(
        99,
        99,
        &format!("/backup {}", w.root.join("data").display()),
    );
    let refusal = w
        .api
        .wait_for_bot_text(99, "not allowed", WAIT)
        .await
        .unwrap();
    assert!(refusal.text.contains("99"));
    w.say("/backup /etc");
    w.wait_text("outside the folders").await;
    w.say(&format!("/backup {}/nope", w.root.display()));
    w.wait_text("does not exist").await;
    assert_eq!(w.job_count().await, 0);
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_of_a_running_backup() {
    let mut w = World::new(5_000).await;
    w.delay_ms.store(400, Ordering::Relaxed);
    w.start_bot().await;
    w.start_worker("w1").await;
    w.say(&format!("/backup {}", w.root.join("data").display()));
    w.wait_text("Phase: backing up").await;
    let job = w.latest_job().await;
    w.say(&format!("/cancel {}", job.id));
    w.wait_text("Cancelling").await;
    w.wait_text("Cancelled").await;
    assert_eq!(
        w.jobs.get(job.id).await.unwrap().unwrap().state,
        JobState::Cancelled
    );
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_worker_job_resumes_on_restart_and_completes() {
    let mut w = World::new(1_000).await;
    w.delay_ms.store(150, Ordering::Relaxed);
    w.start_bot().await;
    w.start_worker("w1").await;
    w.say(&format!("/backup {}", w.root.join("data").display()));
    // Let a few packs land, then kill the worker without any cleanup.
    let puts = w.puts.clone();
    w.api
        .wait_for(WAIT, |_| (puts.lock().unwrap().len() >= 3).then_some(()))
        .await
        .expect("uploads start");
    w.kill_worker();
    let before = w.puts.lock().unwrap().clone();
    let job = w.latest_job().await;
    assert_eq!(job.state, JobState::Running);
    // The user hears the job is stalled once the lease runs out.
    w.wait_text("stalled").await;
    w.start_worker("w2").await;
    w.wait_text("Done: snapshot").await;
    let job = w.jobs.get(job.id).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Done);
    assert_eq!(job.attempt, 2);
    let after = w.puts.lock().unwrap().clone();
    let reuploaded: Vec<_> = after[before.len()..]
        .iter()
        .filter(|n| before.contains(n))
        .collect();
    println!(
        "packs before kill: {}, after restart: {}, re-uploaded: {:?}",
        before.len(),
        after.len() - before.len(),
        reuploaded
    );
    println!("--- chat transcript ---\n{}", w.api.transcript_text(CHAT));
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_leaves_the_job_resumable() {
    let mut w = World::new(5_000).await;
    w.delay_ms.store(300, Ordering::Relaxed);
    w.start_bot().await;
    w.start_worker("w1").await;
    w.say(&format!("/backup {}", w.root.join("data").display()));
    w.wait_text("Phase: backing up").await;
    w.stop_worker().await;
    let job = w.latest_job().await;
    assert_eq!(job.state, JobState::Queued, "released, not failed");
    w.wait_text("Paused").await;
    w.delay_ms.store(0, Ordering::Relaxed);
    w.start_worker("w2").await;
    w.wait_text("Done: snapshot").await;
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_on_progress_edit_still_delivers_the_summary() {
    let mut w = World::new(5_000).await;
    w.start_bot().await;
    w.api.fail_call("editMessageText", 1, Fault::RetryAfter(2));
    w.start_worker("w1").await;
    w.say(&format!("/backup {}", w.root.join("data").display()));
    w.wait_text("Done: snapshot").await;
    let edits = w.api.calls_of("editMessageText");
    let i = edits
        .iter()
        .position(|c| c.fault.is_some())
        .expect("the 429 was served");
    if let Some(next) = edits.get(i + 1) {
        assert!(
            next.at >= edits[i].at + Duration::from_millis(1900),
            "edit too soon after 429"
        );
    }
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_job_sends_a_failure_notice() {
    let mut w = World::new(5_000).await;
    w.start_bot().await;
    let victim = w.root.join("data/docs");
    w.say(&format!("/backup {}", victim.display()));
    w.wait_text("Queued").await;
    // The folder disappears before the worker gets to it.
    std::fs::remove_dir_all(&victim).unwrap();
    w.start_worker("w1").await;
    let notice = w.wait_text("failed:").await;
    let job = w.latest_job().await;
    assert!(notice.contains(&format!("Job id: {}", job.id)), "{notice}");
    assert!(notice.contains("docs"), "{notice}");
    assert_eq!(job.state, JobState::Failed);
    println!("{notice}");
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_bot_neither_repeats_nor_misses_notices() {
    let mut w = World::new(5_000).await;
    w.delay_ms.store(0, Ordering::Relaxed);
    w.start_bot().await;
    w.start_worker("w1").await;
    w.say(&format!("/backup {}", w.root.join("data").display()));
    w.wait_text("Done: snapshot").await;
    // Bot goes down; a job finishes (fails) while it is away.
    let (tx, task) = w.bot.take().unwrap();
    let _ = tx.send(());
    task.await.unwrap().unwrap();
    let victim = w.root.join("data/docs");
    let job = w
        .jobs
        .enqueue(
            USER,
            CHAT,
            &storinator_shared::JobArgs::Backup {
                path: victim.display().to_string(),
                encrypt: true,
            },
        )
        .await
        .unwrap();
    std::fs::remove_dir_all(&victim).unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    while w.jobs.get(job.id).await.unwrap().unwrap().state != JobState::Failed {
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let sends_before = w.api.calls_of("sendMessage").len();
    let history_before = w.api.bot_messages(CHAT)[0].history();
    w.start_bot().await;
    w.wait_text(&format!("Backup #{} failed", job.id)).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    // Exactly the missed notice went out (progress message + failure notice); nothing about
    // the first backup was repeated.
    assert_eq!(
        w.api.calls_of("sendMessage").len(),
        sends_before + 2,
        "{}",
        w.api.transcript_text(CHAT)
    );
    // (The old bot may have been stopped between its last edit and recording it; a repeated
    // edit then gets "message is not modified" and changes nothing.)
    assert_eq!(w.api.bot_messages(CHAT)[0].history(), history_before);
    w.stop().await;
}
