//! End to end: the real bot (dispatcher + notifier) against the fake Bot API server, the real
//! worker daemon with the real engine, one SQLite file, a directory store slowed down so
//! progress is visible. Each test is bounded in time.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use std::collections::BTreeMap;
use storinator_bot::BotConfig;

use storinator_shared::{
    CancelFlag, Catalog, ChunkerParams, DirStorage, EngineSettings, ForgetOptions, JobPolicy,
    JobResult, JobState, Jobs, KdfParams, KeepPolicy, NoProgress, PruneOptions, Repo,
    RestoreOptions, human_bytes, plural,
};
use storinator_testkit::botapi::{self, ChatMessage, FakeBotApi, Fault};
use storinator_testkit::fixtures::{
    Gate, InstrumentedStorage, duplicate_data_chunks, stored_packs,
};
use storinator_worker::daemon::{self, DaemonConfig};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const USER: i64 = 7;
const USER2: i64 = 8;
/// Allowed, but no admin.
const USER3: i64 = 9;
const CHAT: i64 = 7;
const PASS: &str = "correct horse battery staple";
const WAIT: Duration = Duration::from_secs(60);
/// Telegram's message rates, five times faster (bot and fake Bot API alike).
const SPEED: u32 = 5;

struct World {
    api: FakeBotApi,
    dir: tempfile::TempDir,
    root: PathBuf,
    db_url: String,
    jobs: Jobs,
    delay_ms: Arc<AtomicU64>,
    gate: Arc<Gate>,
    puts: Arc<Mutex<Vec<String>>>,
    bot: Option<(oneshot::Sender<()>, JoinHandle<anyhow::Result<()>>)>,
    worker: Option<(oneshot::Sender<()>, JoinHandle<anyhow::Result<()>>)>,
    /// The running worker's storage refuses every upload once this is 0 (a dead process
    /// uploads nothing more).
    worker_alive: Option<Arc<std::sync::atomic::AtomicUsize>>,
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
        let api = FakeBotApi::start_with(botapi::Limits::telegram().faster(SPEED))
            .await
            .unwrap();
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
            gate: Default::default(),
            puts: Arc::default(),
            bot: None,
            worker: None,
            worker_alive: None,
        }
    }

    async fn start_bot(&mut self) {
        let vars = [
            (
                "TELOXIDE_TOKEN".to_string(),
                "110201543:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw".to_string(),
            ),
            ("TELOXIDE_API_URL".into(), self.api.url()),
            (
                "STORINATOR_ALLOWED_USERS".into(),
                format!("{USER},{USER2},{USER3}"),
            ),
            // USER and USER2 may act on the whole installation (/prune); USER3 may not.
            ("STORINATOR_ADMIN_USERS".into(), format!("{USER},{USER2}")),
            (
                "STORINATOR_BACKUP_ROOTS".into(),
                self.root.display().to_string(),
            ),
            ("DATABASE_URL".into(), self.db_url.clone()),
            (
                "STORINATOR_DATA_DIR".into(),
                self.dir.path().display().to_string(),
            ),
            ("STORINATOR_BOT_EDIT_INTERVAL_MS".into(), "150".into()),
            ("STORINATOR_BOT_TICK_MS".into(), "50".into()),
            ("STORINATOR_BOT_POLL_TIMEOUT_S".into(), "1".into()),
        ];
        let mut cfg =
            BotConfig::from_lookup(|k| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()))
                .unwrap();
        cfg.limits = storinator_bot::Limits::telegram().faster(SPEED);
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

    fn settings() -> EngineSettings {
        EngineSettings {
            pack_size: 64 * 1024,
            chunker: ChunkerParams::small(),
            threads: 1,
            ..EngineSettings::default()
        }
    }

    /// Start a worker daemon as a fresh process would: its own catalog handle and repo.
    async fn start_worker(&mut self, id: &str) {
        let jobs = self.jobs.clone();
        self.start_worker_with(id, jobs).await;
    }

    /// The same, with its own view of the job table (another lease time, say).
    async fn start_worker_with(&mut self, id: &str, jobs: Jobs) {
        let catalog = Catalog::open(&self.db_url).await.unwrap();
        let mut storage =
            InstrumentedStorage::new(DirStorage::open(self.dir.path().join("store")).unwrap());
        storage.delay_ms = self.delay_ms.clone();
        storage.gate = self.gate.clone();
        storage.puts = self.puts.clone();
        self.worker_alive = Some(storage.fail_puts_after.clone());
        let repo = Repo::open(catalog, Arc::new(storage), PASS, Self::settings())
            .await
            .unwrap();
        let cfg = DaemonConfig {
            worker_id: id.to_string(),
            concurrency: 2,
            poll_interval: Duration::from_millis(50),
            progress_interval: Duration::from_millis(100),
            restore_roots: vec![self.root.clone()],
            outbox_dir: self.dir.path().join("outbox"),
            courier: None,
            host: None,
            host_heartbeat: Duration::from_secs(30),
        };
        let (tx, rx) = oneshot::channel::<()>();
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

    /// Kill the worker: its tasks vanish mid-flight, no cleanup, leases left to expire, and
    /// nothing it had under way reaches storage any more (an aborted task leaves detached
    /// helpers running; a killed process would not).
    fn kill_worker(&mut self) {
        let (_tx, task) = self.worker.take().unwrap();
        self.worker_alive.take().unwrap().store(0, Ordering::SeqCst);
        task.abort();
    }

    /// What really is in the store: every pack's trailer, read with the key.
    async fn stored_packs(&self) -> Vec<storinator_testkit::fixtures::StoredPack> {
        let catalog = Catalog::open(&self.db_url).await.unwrap();
        let store = DirStorage::open(self.dir.path().join("store")).unwrap();
        let repo = Repo::open(catalog, Arc::new(store), PASS, Self::settings())
            .await
            .unwrap();
        stored_packs(repo.storage.as_ref(), &repo.ring_all().await.unwrap())
            .await
            .unwrap()
    }

    /// Successful bot API calls of `method` addressed to `chat`.
    fn calls_to(&self, method: &str, chat: i64) -> usize {
        self.api
            .calls_of(method)
            .iter()
            .filter(|c| c.fault.is_none() && c.params["chat_id"].as_i64() == Some(chat))
            .count()
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

    async fn restart_bot(&mut self) {
        let (tx, task) = self.bot.take().unwrap();
        let _ = tx.send(());
        task.await.unwrap().unwrap();
        self.start_bot().await;
    }

    /// The buttons of a bot message: (label, callback data).
    fn buttons(m: &ChatMessage) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let rows = m
            .reply_markup
            .as_ref()
            .and_then(|k| k["inline_keyboard"].as_array().cloned())
            .unwrap_or_default();
        for row in rows {
            for b in row.as_array().cloned().unwrap_or_default() {
                out.push((
                    b["text"].as_str().unwrap_or("").to_string(),
                    b["callback_data"].as_str().unwrap_or("").to_string(),
                ));
            }
        }
        out
    }

    fn message(&self, id: i32) -> ChatMessage {
        self.api
            .bot_messages(CHAT)
            .into_iter()
            .find(|m| m.message_id == id)
            .unwrap()
    }

    /// Presses the button of message `id` whose label starts with `label`; returns the
    /// callback query id.
    fn press(&self, id: i32, label: &str) -> String {
        let m = self.message(id);
        let (_, data) = Self::buttons(&m)
            .into_iter()
            .find(|(l, _)| l.starts_with(label))
            .unwrap_or_else(|| panic!("no button {label:?} in:\n{}", m.text));
        self.api.push_callback(USER, CHAT, id, &data)
    }

    /// Waits until message `id` shows text containing `needle`.
    async fn wait_edit(&self, id: i32, needle: &str) -> ChatMessage {
        self.api
            .wait_for(WAIT, |a| {
                a.bot_messages(CHAT)
                    .into_iter()
                    .find(|m| m.message_id == id && m.text.contains(needle))
            })
            .await
            .unwrap_or_else(|| {
                panic!(
                    "message {id} never showed {needle:?}:\n{}",
                    self.message(id).text
                )
            })
    }

    /// Waits for a document from the bot named `name`.
    async fn wait_document(&self, name: &str, nth: usize) -> Vec<u8> {
        let m = self
            .api
            .wait_for(WAIT, |a| {
                a.bot_messages(CHAT)
                    .into_iter()
                    .filter(|m| m.document.as_ref().is_some_and(|d| d.file_name == name))
                    .nth(nth)
            })
            .await
            .unwrap_or_else(|| {
                panic!(
                    "no document {name}:\n{}\nsendDocument calls: {:?}",
                    self.api.transcript_text(CHAT),
                    self.api.calls_of("sendDocument")
                )
            });
        m.document.unwrap().bytes.to_vec()
    }

    /// Backs up `root/data` through the chat and waits for its summary.
    async fn backup(&self, nth: usize) {
        self.say(&format!("/backup {}", self.root.join("data").display()));
        self.api
            .wait_for(WAIT, |a| {
                (a.bot_messages(CHAT)
                    .iter()
                    .filter(|m| m.text.contains(" done: snapshot"))
                    .count()
                    > nth)
                    .then_some(())
            })
            .await
            .unwrap_or_else(|| {
                panic!(
                    "backup {nth} never finished:\n{}",
                    self.api.transcript_text(CHAT)
                )
            });
    }

    fn say(&self, text: &str) {
        self.api.push_message(USER, CHAT, text);
    }

    async fn wait_text(&self, needle: &str) -> String {
        self.wait_text_message(needle).await.text
    }

    async fn wait_text_message(&self, needle: &str) -> ChatMessage {
        match self.api.wait_for_bot_text(CHAT, needle, WAIT).await {
            Some(m) => m,
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
    w.wait_text("📚 1 snapshot:").await;
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
    w.backup(0).await;
    // The user changes a file, then restores the folder in place.
    std::fs::write(data.join("docs/note1.txt"), b"changed since the backup").unwrap();
    w.say(&format!("/restore {}/docs", data.display()));
    let prompt = w.wait_text("Overwrite them?").await;
    assert!(prompt.contains("note1.txt"), "{prompt}");
    assert_eq!(
        std::fs::read(data.join("docs/note1.txt")).unwrap(),
        b"changed since the backup"
    );
    // A newer backup (with the changed file) is made before the user answers: Overwrite
    // must restore the snapshot the question was about, not the newest one.
    w.backup(1).await;
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
    // A restarted bot remembers the answer: pressing Overwrite again queues nothing.
    let jobs_before = w.job_count().await;
    w.restart_bot().await;
    let again = w.api.push_callback(USER, CHAT, m.message_id, &ow);
    let answer = w.api.wait_for(WAIT, |a| a.callback_answer(&again)).await;
    assert_eq!(answer.as_deref(), Some("Already answered."));
    assert_eq!(w.job_count().await, jobs_before);
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
    // A short lease for the worker that dies (the bot reports the stall soon after), a long
    // one for the worker that takes over (a busy machine can't make it expire).
    let mut w = World::new(2_000).await;
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
    let job = w.latest_job().await;
    assert_eq!(job.state, JobState::Running);
    // The user hears the job is stalled once the lease runs out.
    w.wait_text("stalled").await;
    let before = w.puts.lock().unwrap().clone();
    assert!(before.len() >= 3);
    let patient = w.jobs.clone().with_policy(JobPolicy {
        lease_ms: 60_000,
        ..*w.jobs.policy()
    });
    w.start_worker_with("w2", patient).await;
    w.wait_text("Done: snapshot").await;
    let job = w.jobs.get(job.id).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Done);
    assert_eq!(job.attempt, 2);
    assert_eq!(job.lease_owner.as_deref(), Some("w2"));
    // The packs finished before the kill are still in storage, and not one chunk of them
    // went up again: every data chunk is stored exactly once.
    let after = w.puts.lock().unwrap().clone();
    let packs = w.stored_packs().await;
    assert_eq!(
        duplicate_data_chunks(&packs),
        vec![],
        "chunks uploaded twice"
    );
    let names: Vec<&str> = packs.iter().map(|p| p.name.as_str()).collect();
    for n in &before {
        assert!(names.contains(&n.as_str()), "finished pack {n} is gone");
    }
    assert_eq!(
        packs.len(),
        after.len(),
        "every upload is in the store, once"
    );
    let Some(storinator_shared::JobResult::Backup { new_chunks, .. }) = job.result else {
        panic!("not a backup result: {:?}", job.result)
    };
    let data_chunks = packs
        .iter()
        .flat_map(|p| &p.entries)
        .filter(|e| e.kind == storinator_shared::format::pack::BlobKind::Data)
        .count() as u64;
    assert!(
        new_chunks < data_chunks,
        "the resumed run stored only what was missing ({new_chunks} of {data_chunks})"
    );
    println!(
        "packs before kill: {}, after restart: {}",
        before.len(),
        after.len() - before.len(),
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
    // The summary itself is an edit of the progress message, so one follows the 429.
    let next = edits
        .get(i + 1)
        .unwrap_or_else(|| panic!("no edit after the 429: {edits:?}"));
    assert!(
        next.at >= edits[i].at + Duration::from_millis(1900),
        "edit too soon after 429"
    );
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
    w.wait_text(" done: snapshot").await;
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
    let sends_before = w.calls_to("sendMessage", CHAT);
    let history_before = w.api.bot_messages(CHAT)[0].history();
    w.start_bot().await;
    w.wait_text(&format!("Backup #{} failed", job.id)).await;
    // The bot records that it told the user; that record is what keeps it from telling again.
    let deadline = std::time::Instant::now() + WAIT;
    while !w.jobs.get(job.id).await.unwrap().unwrap().final_notified {
        assert!(
            std::time::Instant::now() < deadline,
            "the notice was never recorded as sent"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Wait for proof that the bot has looked at the job table again since (a job of another
    // user, finished now, is announced in that user's chat), instead of sleeping.
    let marker = w
        .jobs
        .enqueue(
            USER2,
            USER2,
            &storinator_shared::JobArgs::Backup {
                path: w.root.join("data/photos").display().to_string(),
                encrypt: true,
            },
        )
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    while !w
        .jobs
        .get(marker.id)
        .await
        .unwrap()
        .unwrap()
        .state
        .is_final()
    {
        assert!(std::time::Instant::now() < deadline, "marker job never ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    w.api
        .wait_for(WAIT, |a| (!a.bot_messages(USER2).is_empty()).then_some(()))
        .await
        .expect("the marker job was announced");
    // Exactly the missed notice went out (progress message + failure notice); nothing about
    // the first backup was repeated.
    assert_eq!(
        w.calls_to("sendMessage", CHAT),
        sends_before + 2,
        "{}",
        w.api.transcript_text(CHAT)
    );
    // (The old bot may have been stopped between its last edit and recording it; a repeated
    // edit then gets "message is not modified" and changes nothing.)
    assert_eq!(w.api.bot_messages(CHAT)[0].history(), history_before);
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browse_down_three_levels_and_back_up() {
    let mut w = World::new(5_000).await;
    w.delay_ms.store(0, Ordering::Relaxed);
    w.start_bot().await;
    w.start_worker("w1").await;
    w.backup(0).await;
    let data = w.root.join("data");
    w.say("/browse");
    let top = w.wait_text("📂 ").await;
    assert!(
        top.starts_with(&format!("📂 {}\n", data.display())),
        "{top}"
    );
    assert!(top.contains("3 entries"), "{top}");
    let id = w
        .api
        .wait_for_bot_text(CHAT, "📂 ", WAIT)
        .await
        .unwrap()
        .message_id;
    // Folders first, then files, with sizes.
    let labels: Vec<String> = World::buttons(&w.message(id))
        .into_iter()
        .map(|b| b.0)
        .collect();
    assert_eq!(labels, vec!["📁 docs/", "📁 photos/", "📄 README · 22 B"]);
    w.press(id, "📁 photos/");
    w.wait_edit(id, &format!("📂 {}/photos\n", data.display()))
        .await;
    w.press(id, "📁 2024/");
    let m = w
        .wait_edit(id, &format!("📂 {}/photos/2024\n", data.display()))
        .await;
    assert!(m.text.contains("6 entries"), "{}", m.text);
    w.press(id, "📄 img 3.raw");
    let card = w.wait_edit(id, "Size 96.0 KiB").await;
    assert!(
        card.text
            .contains(&format!("{}/photos/2024/img 3.raw", data.display())),
        "{}",
        card.text
    );
    let actions: Vec<String> = World::buttons(&card).into_iter().map(|b| b.0).collect();
    assert_eq!(
        actions,
        vec![
            "📨 Send me this file",
            "♻️ Restore here",
            "🕘 Versions",
            "⬆️ Back to the folder"
        ]
    );
    w.press(id, "⬆️ Back to the folder");
    w.wait_edit(id, &format!("📂 {}/photos/2024\n", data.display()))
        .await;
    w.press(id, "⬆️ Up");
    w.wait_edit(id, &format!("📂 {}/photos\n", data.display()))
        .await;
    w.press(id, "⬆️ Up");
    let back = w.wait_edit(id, &format!("📂 {}\n", data.display())).await;
    assert!(
        !World::buttons(&back).iter().any(|b| b.0.starts_with("⬆️")),
        "the root has no Up"
    );
    // Every keyboard stayed within Telegram's limits (the fake refuses more than 64 bytes).
    assert!(w.api.rate_limited().is_empty());
    assert!(
        w.api
            .calls_of("editMessageText")
            .iter()
            .all(|c| c.fault.is_none())
    );
    println!("{}", w.api.transcript_text(CHAT));
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_folder_of_500_entries_is_paged() {
    let mut w = World::new(5_000).await;
    w.delay_ms.store(0, Ordering::Relaxed);
    let many = w.root.join("data/many");
    std::fs::create_dir_all(&many).unwrap();
    for i in 0..500 {
        std::fs::write(many.join(format!("f{i:03}")), i.to_string()).unwrap();
    }
    w.start_bot().await;
    w.start_worker("w1").await;
    w.backup(0).await;
    w.say(&format!("/browse {}", many.display()));
    let first = w
        .api
        .wait_for_bot_text(CHAT, "500 entries · page 1 of 25", WAIT)
        .await
        .unwrap();
    let id = first.message_id;
    let page = |m: &ChatMessage| -> Vec<String> {
        World::buttons(m)
            .into_iter()
            .map(|b| b.0)
            .filter(|l| l.starts_with("📄"))
            .collect()
    };
    assert_eq!(page(&first).len(), 20);
    assert_eq!(page(&first)[0], "📄 f000 · 1 B");
    assert!(!World::buttons(&first).iter().any(|b| b.0.starts_with("◀️")));
    w.press(id, "Next ▶️");
    let second = w.wait_edit(id, "page 2 of 25").await;
    assert_eq!(page(&second)[0], "📄 f020 · 2 B");
    w.press(id, "Next ▶️");
    let third = w.wait_edit(id, "page 3 of 25").await;
    assert_eq!(page(&third)[19], "📄 f059 · 2 B");
    w.press(id, "◀️ Previous");
    w.wait_edit(id, "page 2 of 25").await;
    // A page past the end (a made-up or stale button) shows the last page.
    let (_, data) = World::buttons(&w.message(id))
        .into_iter()
        .find(|b| b.0.starts_with("Next"))
        .unwrap();
    let past = format!("{}:999", data.rsplit_once(':').unwrap().0);
    w.api.push_callback(USER, CHAT, id, &past);
    let last = w.wait_edit(id, "page 25 of 25").await;
    assert_eq!(page(&last).last().unwrap(), "📄 f499 · 3 B");
    assert!(
        !World::buttons(&last)
            .iter()
            .any(|b| b.0.starts_with("Next"))
    );
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_sends_a_small_file_as_a_document_after_one_confirmation() {
    let mut w = World::new(5_000).await;
    w.delay_ms.store(0, Ordering::Relaxed);
    w.start_bot().await;
    w.start_worker("w1").await;
    w.backup(0).await;
    let data = w.root.join("data");
    w.say(&format!("/get {}/docs/note2.txt", data.display()));
    let ask = w
        .api
        .wait_for_bot_text(CHAT, "plaintext copy", WAIT)
        .await
        .unwrap();
    w.press(ask.message_id, "Yes, send it");
    let bytes = w.wait_document("note2.txt", 0).await;
    assert_eq!(bytes, noise(102, 40 * 1024));
    let doc = w
        .api
        .bot_messages(CHAT)
        .into_iter()
        .find(|m| m.document.is_some())
        .unwrap();
    assert!(
        doc.text.starts_with("📄 note2.txt · 40.0 KiB · snapshot "),
        "{}",
        doc.text
    );
    // The second time, no question; the file card's button sends too.
    w.say(&format!("/get {}/README", data.display()));
    assert_eq!(
        w.wait_document("README", 0).await,
        b"hello from the backup\n"
    );
    w.say(&format!("/browse {}/docs/note0.txt", data.display()));
    let card = w
        .api
        .wait_for_bot_text(CHAT, "Size 40.0 KiB", WAIT)
        .await
        .unwrap();
    w.press(card.message_id, "📨 Send me this file");
    assert_eq!(w.wait_document("note0.txt", 0).await, noise(100, 40 * 1024));
    let asked = w
        .api
        .bot_messages(CHAT)
        .iter()
        .filter(|m| m.history()[0].contains("plaintext copy"))
        .count();
    assert_eq!(asked, 1, "asked once");
    // Nothing is left behind in the outbox once sent.
    let outbox = w.dir.path().join("outbox");
    let deadline = std::time::Instant::now() + WAIT;
    while std::fs::read_dir(&outbox).map(|d| d.count()).unwrap_or(0) > 0 {
        assert!(std::time::Instant::now() < deadline, "outbox not emptied");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A folder is not a file.
    w.say(&format!("/get {}/docs", data.display()));
    w.wait_text("is not a file").await;
    println!("{}", w.api.transcript_text(CHAT));
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_of_a_file_changed_across_three_snapshots() {
    let mut w = World::new(5_000).await;
    w.delay_ms.store(0, Ordering::Relaxed);
    w.start_bot().await;
    w.start_worker("w1").await;
    let note = w.root.join("data/docs/note3.txt");
    let texts: [&[u8]; 3] = [b"first", b"second, longer", b"third and longest of all"];
    for (i, t) in texts.iter().enumerate() {
        std::fs::write(&note, t).unwrap();
        w.backup(i).await;
    }
    w.say(&format!("/versions {}", note.display()));
    let v = w
        .api
        .wait_for_bot_text(CHAT, "🕘 3 versions of", WAIT)
        .await
        .unwrap_or_else(|| panic!("{}", w.api.transcript_text(CHAT)));
    let lines: Vec<&str> = v.text.lines().collect();
    assert!(lines[1].starts_with("1. 24 B · modified"), "{}", v.text);
    assert!(lines[2].starts_with("2. 14 B"), "{}", v.text);
    assert!(lines[3].starts_with("3. 5 B"), "{}", v.text);
    let labels: Vec<String> = World::buttons(&v).into_iter().map(|b| b.0).collect();
    assert_eq!(
        labels,
        [
            "📨 Send 1",
            "♻️ Restore 1",
            "📨 Send 2",
            "♻️ Restore 2",
            "📨 Send 3",
            "♻️ Restore 3"
        ]
    );
    // The oldest version comes back as it was.
    w.press(v.message_id, "📨 Send 3");
    let ask = w
        .api
        .wait_for_bot_text(CHAT, "plaintext copy", WAIT)
        .await
        .unwrap();
    w.press(ask.message_id, "Yes, send it");
    assert_eq!(w.wait_document("note3.txt", 0).await, b"first");
    w.press(v.message_id, "📨 Send 2");
    assert_eq!(w.wait_document("note3.txt", 1).await, b"second, longer");
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_stale_buttons_are_refused() {
    let mut w = World::new(5_000).await;
    w.delay_ms.store(0, Ordering::Relaxed);
    w.start_bot().await;
    w.start_worker("w1").await;
    w.backup(0).await;
    w.say("/browse");
    let m = w.api.wait_for_bot_text(CHAT, "📂 ", WAIT).await.unwrap();
    let (_, open_docs) = World::buttons(&m)
        .into_iter()
        .find(|b| b.0 == "📁 docs/")
        .unwrap();
    let snap = open_docs.split(':').nth(1).unwrap().to_string();
    let jobs_before = w.job_count().await;
    let cases = [
        // Another allowed user replays the owner's button: not their snapshot.
        (USER2, open_docs.clone()),
        (USER2, format!("g:{snap}:1")),
        // Made-up snapshot, made-up entry, garbage.
        (USER, "b:ffffffffffff:1:0".to_string()),
        (USER, format!("b:{snap}:999999:0")),
        (USER, format!("g:{snap}:abc")),
        (USER, "zz:1".to_string()),
    ];
    let mut ids = Vec::new();
    for (user, data) in &cases {
        ids.push(w.api.push_callback(*user, CHAT, m.message_id, data));
    }
    for (id, (user, data)) in ids.iter().zip(&cases) {
        let answer = w.api.wait_for(WAIT, |a| a.callback_answer(id)).await;
        assert_eq!(
            answer.as_deref(),
            Some("This button is out of date. Send /browse again."),
            "{user} {data}"
        );
    }
    assert_eq!(
        w.message(m.message_id).text,
        m.text,
        "the keyboard was not touched"
    );
    assert_eq!(w.job_count().await, jobs_before, "nothing was queued");
    // A stranger is told no, and nothing more.
    let s = w.api.push_callback(99, CHAT, m.message_id, &open_docs);
    let answer = w.api.wait_for(WAIT, |a| a.callback_answer(&s)).await;
    assert_eq!(
        answer.as_deref(),
        Some("You are not allowed to use this bot.")
    );
    w.stop().await;
}

/// Short ids of the user's snapshots of `root/data`, oldest first.
async fn snapshot_ids(w: &World) -> Vec<String> {
    let catalog = Catalog::open(&w.db_url).await.unwrap();
    let mut snaps = storinator_shared::list_snapshots(&catalog, &format!("tg:{USER}"), None)
        .await
        .unwrap();
    snaps.sort_by_key(|s| s.started_at);
    snaps.into_iter().map(|s| s.short_id).collect()
}

/// Tombstone objects (`forget-<id>.enc`) in the store.
fn tombstones(w: &World) -> Vec<String> {
    walk(&w.dir.path().join("store"))
        .into_iter()
        .filter_map(|p| p.file_name()?.to_str().map(str::to_string))
        .filter(|n| n.starts_with("forget-"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forget_from_the_chat_shows_the_dry_run_and_forgets_only_what_was_confirmed() {
    let mut w = World::new(5_000).await;
    w.delay_ms.store(0, Ordering::Relaxed);
    w.start_bot().await;
    w.start_worker("w1").await;
    for nth in 0..3 {
        w.backup(nth).await;
    }
    let before = snapshot_ids(&w).await;
    assert_eq!(before.len(), 3);
    let data = w.root.join("data");

    // The dry run: the two older ones would go, the newest stays.
    w.say(&format!("/forget {} keep last 1", data.display()));
    let m = w
        .api
        .wait_for_bot_text(CHAT, "Would forget", WAIT)
        .await
        .unwrap();
    assert!(m.text.contains("Would forget 2 snapshots:"), "{}", m.text);
    let (goes, stays) = m.text.split_once("Keeps 1:").unwrap();
    for id in &before[..2] {
        assert!(
            goes.contains(id.as_str()) && !stays.contains(id.as_str()),
            "{}",
            m.text
        );
    }
    assert!(
        stays.contains(&format!("{} ", before[2])) && stays.contains("(last)"),
        "{}",
        m.text
    );
    let labels: Vec<String> = World::buttons(&m).into_iter().map(|b| b.0).collect();
    assert_eq!(labels, ["Forget 2 snapshots", "Cancel"]);
    for (_, data) in World::buttons(&m) {
        assert!(data.len() <= 64, "{data}");
    }

    // Cancel forgets nothing; Forget on the cancelled prompt does nothing either.
    let jobs_before = w.job_count().await;
    let c = w.press(m.message_id, "Cancel");
    let answer = w.api.wait_for(WAIT, |a| a.callback_answer(&c)).await;
    assert_eq!(answer.as_deref(), Some("Cancelled."));
    w.wait_edit(m.message_id, "nothing was forgotten").await;
    let f = w
        .api
        .push_callback(USER, CHAT, m.message_id, &World::buttons(&m)[0].1);
    let answer = w.api.wait_for(WAIT, |a| a.callback_answer(&f)).await;
    assert_eq!(answer.as_deref(), Some("Already answered."));
    assert_eq!(w.job_count().await, jobs_before);
    assert_eq!(snapshot_ids(&w).await, before);

    // A second prompt; another allowed user's tap on it is refused and queues nothing.
    w.say(&format!("/forget {} keep last 1", data.display()));
    let m2 = w
        .api
        .wait_for(WAIT, |a| {
            a.bot_messages(CHAT)
                .into_iter()
                .find(|x| x.text.contains("Would forget") && x.message_id != m.message_id)
        })
        .await
        .unwrap();
    let forget_data = World::buttons(&m2)[0].1.clone();
    let s = w
        .api
        .push_callback(USER2, CHAT, m2.message_id, &forget_data);
    let answer = w.api.wait_for(WAIT, |a| a.callback_answer(&s)).await;
    assert_eq!(
        answer.as_deref(),
        Some("This button is out of date. Send /forget again.")
    );
    assert_eq!(w.job_count().await, jobs_before);
    assert!(tombstones(&w).is_empty());

    // A backup lands before the user confirms: the policy would now drop three, but only the
    // two the user saw go.
    w.backup(3).await;
    let jobs_before = w.job_count().await;
    let f = w.press(m2.message_id, "Forget 2");
    let answer = w.api.wait_for(WAIT, |a| a.callback_answer(&f)).await;
    assert_eq!(answer.as_deref(), Some("Forgetting."));
    w.wait_text("done: forgot 2 snapshots").await;
    assert_eq!(w.job_count().await, jobs_before + 1, "exactly one job");
    let after = snapshot_ids(&w).await;
    assert_eq!(after.len(), 2, "{after:?}");
    assert_eq!(after[0], before[2], "the unconfirmed one stays");
    assert!(!after.contains(&before[0]) && !after.contains(&before[1]));
    assert_eq!(tombstones(&w).len(), 1, "a sealed tombstone was stored");

    // A double tap after the job ran: nothing more.
    let again = w.api.push_callback(USER, CHAT, m2.message_id, &forget_data);
    let answer = w.api.wait_for(WAIT, |a| a.callback_answer(&again)).await;
    assert_eq!(answer.as_deref(), Some("Already answered."));
    assert_eq!(w.job_count().await, jobs_before + 1);
    assert_eq!(snapshot_ids(&w).await, after);

    // A path outside the backup roots is refused as /backup refuses it.
    w.say("/forget /etc keep last 1");
    w.wait_text("Can't forget").await;
    println!("--- chat transcript ---\n{}", w.api.transcript_text(CHAT));
    w.stop().await;
}

/// A repository handle as a separate process would open it (the test's view of storage).
async fn open_repo(w: &World) -> Repo {
    let catalog = Catalog::open(&w.db_url).await.unwrap();
    let store = DirStorage::open(w.dir.path().join("store")).unwrap();
    Repo::open(catalog, Arc::new(store), PASS, World::settings())
        .await
        .unwrap()
}

/// Rewrites some of the tree's files (`round` picks the content), so that the snapshots
/// before it hold data no later one uses.
fn change_tree(data: &Path, round: u64) {
    for i in 0..3u64 {
        std::fs::write(
            data.join(format!("photos/2024/img {i}.raw")),
            noise(1000 * round + i, 96 * 1024),
        )
        .unwrap();
    }
    std::fs::write(
        data.join(format!("docs/note{round}.txt")),
        noise(round, 20 * 1024),
    )
    .unwrap();
}

/// Every snapshot left restores byte for byte to the tree it was taken of; storage holds
/// exactly the catalog's packs, and nothing is left to free.
async fn assert_pruned_repository(w: &World, expected: &BTreeMap<String, PathBuf>) {
    let repo = open_repo(w).await;
    let left = snapshot_ids(w).await;
    assert!(!left.is_empty());
    for id in &left {
        let to = w.dir.path().join(format!("check-{id}"));
        repo.restore(
            &RestoreOptions {
                path: w.root.join("data").display().to_string(),
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
        assert_same_tree(&expected[id], &to.join("data"));
    }
    let mut stored: Vec<String> = w.stored_packs().await.into_iter().map(|p| p.name).collect();
    let mut known: Vec<String> = repo
        .catalog
        .packs()
        .await
        .unwrap()
        .into_iter()
        .map(|p| format!("{}.enc", p.id))
        .collect();
    stored.sort();
    known.sort();
    assert_eq!(stored, known, "storage and catalog agree");
    let v = repo.verify(true, &NoProgress).await.unwrap();
    assert!(v.problems.is_empty(), "{:?}", v.problems);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_from_the_chat_shows_the_dry_run_and_prunes_once_after_confirmation() {
    let mut w = World::new(5_000).await;
    w.delay_ms.store(0, Ordering::Relaxed);
    w.start_bot().await;
    w.start_worker("w1").await;
    let data = w.root.join("data");
    // Three snapshots of a changing tree; a copy of each tree to compare restores with.
    let mut expected = BTreeMap::new();
    for nth in 0..3usize {
        if nth > 0 {
            change_tree(&data, nth as u64);
        }
        w.backup(nth).await;
        let copy = w.dir.path().join(format!("expected-{nth}"));
        copy_tree(&data, &copy);
        let ids = snapshot_ids(&w).await;
        expected.insert(ids.last().unwrap().clone(), copy);
    }
    // Nothing is garbage until a snapshot is forgotten.
    w.say("/prune");
    w.wait_text("Nothing to prune").await;
    let repo = open_repo(&w).await;
    repo.forget(
        &ForgetOptions {
            owner: format!("tg:{USER}"),
            path: data.display().to_string(),
            policy: KeepPolicy::parse("keep last 2").unwrap(),
            tz: jiff::tz::TimeZone::UTC,
            dry_run: false,
            allow_empty: false,
            only: None,
        },
        &CancelFlag::new(),
    )
    .await
    .unwrap();
    assert_eq!(snapshot_ids(&w).await.len(), 2);
    let packs_before = w.stored_packs().await.len();

    // Bad input is named; someone allowed but no admin is refused, with no prompt.
    w.say("/prune repack-below 130");
    w.wait_text("repack-below: \"130\" is not a percentage from 0 to 100")
        .await;
    w.api.push_message(USER3, CHAT, "/prune");
    w.wait_text("Only an admin of this installation may prune")
        .await;

    // The dry run: the engine's own estimate, worded, with two buttons.
    let opts = PruneOptions {
        dry_run: true,
        max_repack: None,
        repack_below: 90.0,
    };
    let dry = storinator_shared::engine::prune::estimate(
        &repo.catalog,
        &opts,
        storinator_shared::config::DEFAULT_PACK_SIZE,
    )
    .await
    .unwrap();
    assert!(dry.unused_packs > 0 && dry.repacked_packs > 0, "{dry:?}");
    w.say("/prune repack-below 90");
    let m = w.wait_text_message("Would free").await;
    for line in [
        format!(
            "Would delete {} no snapshot uses",
            plural(dry.unused_packs, "pack", "packs")
        ),
        format!(
            "Would repack {}",
            plural(dry.repacked_packs, "sparse pack", "sparse packs")
        ),
        format!("Would free {}.", human_bytes(dry.freed())),
    ] {
        assert!(m.text.contains(&line), "{line:?} in:\n{}", m.text);
    }
    let labels: Vec<String> = World::buttons(&m).into_iter().map(|b| b.0).collect();
    assert_eq!(
        labels,
        [
            format!("Prune, frees {}", human_bytes(dry.freed())),
            "Cancel".into()
        ]
    );
    let prune_data = World::buttons(&m)[0].1.clone();

    // Cancel deletes nothing; Prune on the cancelled prompt does nothing either.
    let jobs_before = w.job_count().await;
    let c = w.press(m.message_id, "Cancel");
    let answer = w.api.wait_for(WAIT, |a| a.callback_answer(&c)).await;
    assert_eq!(answer.as_deref(), Some("Cancelled."));
    w.wait_edit(m.message_id, "nothing was deleted").await;
    let again = w.api.push_callback(USER, CHAT, m.message_id, &prune_data);
    let answer = w.api.wait_for(WAIT, |a| a.callback_answer(&again)).await;
    assert_eq!(answer.as_deref(), Some("Already answered."));

    // A second prompt: another admin's tap, a non-admin's, a stranger's, a made-up id:
    // nothing.
    w.say("/prune repack-below 90");
    let m2 = w
        .api
        .wait_for(WAIT, |a| {
            a.bot_messages(CHAT)
                .into_iter()
                .find(|x| x.text.contains("Would free") && x.message_id != m.message_id)
        })
        .await
        .unwrap();
    let prune_data = World::buttons(&m2)[0].1.clone();
    for (user, data, said) in [
        (
            USER2,
            prune_data.clone(),
            "This button is out of date. Send /prune again.",
        ),
        (
            USER3,
            prune_data.clone(),
            "This button is out of date. Send /prune again.",
        ),
        (
            USER,
            "pr:999999".to_string(),
            "This button is out of date. Send /prune again.",
        ),
        (
            99,
            prune_data.clone(),
            "You are not allowed to use this bot.",
        ),
    ] {
        let id = w.api.push_callback(user, CHAT, m2.message_id, &data);
        let answer = w.api.wait_for(WAIT, |a| a.callback_answer(&id)).await;
        assert_eq!(answer.as_deref(), Some(said), "{user} {data}");
    }
    assert_eq!(w.job_count().await, jobs_before, "nothing was queued");
    assert_eq!(
        w.stored_packs().await.len(),
        packs_before,
        "nothing was deleted"
    );

    // Confirmed: exactly one prune job, whose progress and summary reach the chat. The
    // repack's uploads are held until its progress has been shown.
    w.gate.close();
    let p = w.press(m2.message_id, "Prune, frees");
    let answer = w.api.wait_for(WAIT, |a| a.callback_answer(&p)).await;
    assert_eq!(answer.as_deref(), Some("Pruning."));
    let progress = w
        .api
        .wait_for(WAIT, |a| {
            a.bot_messages(CHAT)
                .into_iter()
                .find(|x| x.history().iter().any(|t| t.contains("Phase: pruning")))
        })
        .await;
    w.gate.open();
    let progress =
        progress.unwrap_or_else(|| panic!("no progress shown:\n{}", w.api.transcript_text(CHAT)));
    let done = w.wait_text("Prune #").await;
    let notice = w.wait_text("done: deleted").await;
    let job = w.latest_job().await;
    assert_eq!(job.state, JobState::Done, "{:?}", job.error);
    let Some(JobResult::Prune {
        deleted_packs,
        repacked_packs,
        freed_bytes,
        ..
    }) = job.result
    else {
        panic!("{:?}", job.result)
    };
    assert_eq!(
        notice,
        format!(
            "🧹 Prune #{} done: deleted {}, repacked {repacked_packs}, freed {}.",
            job.id,
            plural(deleted_packs, "pack", "packs"),
            human_bytes(freed_bytes)
        )
    );
    assert!(done.contains(&format!("Prune #{}", job.id)), "{done}");
    assert_eq!(deleted_packs, dry.unused_packs + dry.repacked_packs);
    assert_eq!(repacked_packs, dry.repacked_packs);
    assert_eq!(freed_bytes, dry.freed());
    let final_text = w.wait_edit(progress.message_id, "✅ Prune #").await;
    assert!(final_text.text.contains("deleted"), "{}", final_text.text);
    assert_eq!(w.job_count().await, jobs_before + 1, "exactly one job");
    assert!(w.stored_packs().await.len() < packs_before);

    // A double tap after the job ran: nothing more.
    let again = w.api.push_callback(USER, CHAT, m2.message_id, &prune_data);
    let answer = w.api.wait_for(WAIT, |a| a.callback_answer(&again)).await;
    assert_eq!(answer.as_deref(), Some("Already answered."));
    assert_eq!(w.job_count().await, jobs_before + 1);

    // Storage and catalog agree, every snapshot left restores, nothing is left to free.
    assert_pruned_repository(&w, &expected).await;
    let after = storinator_shared::engine::prune::estimate(
        &open_repo(&w).await.catalog,
        &opts,
        storinator_shared::config::DEFAULT_PACK_SIZE,
    )
    .await
    .unwrap();
    assert_eq!((after.unused_packs, after.freed()), (0, 0), "{after:?}");
    println!("--- chat transcript ---\n{}", w.api.transcript_text(CHAT));
    w.stop().await;
}

fn copy_tree(from: &Path, to: &Path) {
    for entry in walk(from) {
        let dest = to.join(entry.strip_prefix(from).unwrap());
        if entry.is_dir() {
            std::fs::create_dir_all(&dest).unwrap();
        } else {
            std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
            std::fs::copy(&entry, &dest).unwrap();
        }
    }
}
