//! The bot against the fake Bot API server, with a scripted worker driving the job table.
//! Each test runs the real dispatcher and notifier on a real SQLite file.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use storinator_bot::BotConfig;
use storinator_shared::engine::repo::KEY_USER;
use storinator_shared::{
    BackupOptions, CancelFlag, Catalog, DirStorage, EngineSettings, Job, JobArgs, JobPolicy,
    JobResult, JobState, Jobs, KdfParams, ManualClock, NoProgress, Phase, ProgressReport, Repo,
    Signal,
};
use storinator_testkit::botapi::{self, FakeBotApi, Fault};
use tokio::sync::oneshot;

const USER: i64 = 7;
const OTHER_USER: i64 = 8;
const CHAT: i64 = 70;
const WAIT: Duration = Duration::from_secs(10);

struct Harness {
    api: FakeBotApi,
    jobs: Jobs,
    _dir: tempfile::TempDir,
    root: PathBuf,
    outside: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    /// The PostgreSQL server of a bot on PostgreSQL.
    _pg: Option<storinator_testkit::pg::PgCluster>,
}

/// A real snapshot of `root/data` for `owner`, in the bot's database (directory storage).
async fn backup_as(
    pool: &storinator_shared::catalog::Pool,
    dir: &Path,
    root: &Path,
    owner: &str,
) -> String {
    let catalog = Catalog::from_pool(pool.clone());
    let store = DirStorage::open(dir.join("store")).unwrap();
    if catalog.user_key(KEY_USER).await.unwrap().is_none() {
        Repo::init(&catalog, &store, "pw", KdfParams::fast_for_tests())
            .await
            .unwrap();
    }
    let repo = Repo::open(catalog, Arc::new(store), "pw", EngineSettings::default())
        .await
        .unwrap();
    let opts = BackupOptions {
        path: root.join("data"),
        owner: owner.into(),
        encrypt: true,
    };
    repo.backup(&opts, &NoProgress, &CancelFlag::new())
        .await
        .unwrap()
        .snapshot
        .short_id
}

/// Telegram's limits, five times faster: the tests keep their shape without the waiting.
const SPEED: u32 = 5;

async fn start(clock: Option<ManualClock>) -> Harness {
    start_with(clock, 100).await
}

/// The bot with its minimum interval between edits of one progress message.
async fn start_with(clock: Option<ManualClock>, edit_interval_ms: u64) -> Harness {
    start_on(clock, edit_interval_ms, None).await
}

/// The bot on `pg`'s database instead of a SQLite file.
async fn start_on(
    clock: Option<ManualClock>,
    edit_interval_ms: u64,
    pg: Option<storinator_testkit::pg::PgCluster>,
) -> Harness {
    let api = FakeBotApi::start_with(botapi::Limits::telegram().faster(SPEED))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(root.join("data/sub")).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(root.join("data/a.txt"), b"hello").unwrap();
    std::fs::write(root.join("file.txt"), b"x").unwrap();
    let root = root.canonicalize().unwrap();
    let outside = outside.canonicalize().unwrap();
    let db = match &pg {
        Some(pg) => pg.create_database("storinator").unwrap(),
        None => format!("sqlite://{}", dir.path().join("st.db").display()),
    };
    let vars = [
        (
            "TELOXIDE_TOKEN".to_string(),
            "110201543:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw".to_string(),
        ),
        ("TELOXIDE_API_URL".into(), api.url()),
        (
            "STORINATOR_ALLOWED_USERS".into(),
            format!("{USER},{OTHER_USER}"),
        ),
        ("STORINATOR_BACKUP_ROOTS".into(), root.display().to_string()),
        ("DATABASE_URL".into(), db.clone()),
        (
            "STORINATOR_BOT_EDIT_INTERVAL_MS".into(),
            edit_interval_ms.to_string(),
        ),
        ("STORINATOR_BOT_TICK_MS".into(), "25".into()),
        ("STORINATOR_BOT_POLL_TIMEOUT_S".into(), "1".into()),
    ];
    let mut cfg =
        BotConfig::from_lookup(|k| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()))
            .unwrap();
    cfg.limits = storinator_bot::Limits::telegram().faster(SPEED);
    let pool = storinator_bot::db::open(&db).await.unwrap();
    let mut jobs = Jobs::new(pool.clone());
    if let Some(c) = clock {
        jobs = jobs.with_clock(Arc::new(c));
    }
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(storinator_bot::run_with(cfg, jobs.clone(), async move {
        let _ = stopped.await;
    }));
    // Ready once the menu is set.
    api.wait_for(WAIT, |a| {
        (!a.calls_of("getUpdates").is_empty()).then_some(())
    })
    .await
    .expect("bot starts polling");
    Harness {
        api,
        jobs,
        _dir: dir,
        root,
        outside,
        stop: Some(stop),
        task: Some(task),
        _pg: pg,
    }
}

impl Harness {
    /// Send a message and wait for the bot's next new message.
    async fn say(&self, user: i64, text: &str) -> String {
        let before = self.api.bot_messages(CHAT).len();
        self.api.push_message(user, CHAT, text);
        let m = self
            .api
            .wait_for(WAIT, |a| a.bot_messages(CHAT).get(before).cloned())
            .await
            .unwrap_or_else(|| panic!("no reply to {text:?}"));
        m.history()[0].clone()
    }

    async fn job_count(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM jobs")
            .fetch_one(self.jobs.pool())
            .await
            .unwrap()
    }

    /// Wait until the job's progress message text contains `needle`.
    async fn wait_progress(&self, job: &Job, needle: &str) -> String {
        let jobs = self.jobs.clone();
        let id = job.id;
        let deadline = tokio::time::Instant::now() + WAIT;
        let mid = loop {
            if let Some(m) = jobs.get(id).await.unwrap().unwrap().progress_message_id {
                break m;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "job {id} never got a progress message"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        self.api
            .wait_for(WAIT, |a| {
                a.bot_messages(CHAT)
                    .into_iter()
                    .find(|m| m.message_id == mid && m.text.contains(needle))
                    .map(|m| m.text)
            })
            .await
            .unwrap_or_else(|| {
                panic!(
                    "progress message never showed {needle:?}:\n{}",
                    self.api.transcript_text(CHAT)
                )
            })
    }

    async fn stop(mut self) {
        self.stop.take().unwrap().send(()).unwrap();
        let res = tokio::time::timeout(Duration::from_secs(10), self.task.take().unwrap())
            .await
            .expect("bot stops within 10s");
        res.unwrap().unwrap();
    }
}

fn report(phase: Phase, done: u64, total: u64) -> ProgressReport {
    ProgressReport {
        phase,
        files_done: done / 100,
        files_total: total / 100,
        bytes_done: done,
        bytes_total: total,
        bytes_stored: done / 2,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_shows_queued_progress_and_summary() {
    let h = start(None).await;
    let data = h.root.join("data");
    let reply = h.say(USER, &format!("/backup {}", data.display())).await;
    assert!(reply.contains("Queued"), "{reply}");
    let job = h.jobs.list_for_user(USER, 1).await.unwrap().remove(0);
    assert_eq!(
        job.args,
        JobArgs::Backup {
            path: data.display().to_string(),
            encrypt: true
        }
    );

    // A scripted worker.
    let (_, lease) = h.jobs.claim("test-worker").await.unwrap().unwrap();
    for (done, needle) in [(300, "19%"), (900, "56%"), (1500, "94%")] {
        tokio::time::sleep(Duration::from_millis(120)).await;
        let s = h
            .jobs
            .report_progress(&lease, &report(Phase::Uploading, done, 1600))
            .await
            .unwrap();
        assert_eq!(s, Signal::Continue);
        h.wait_progress(&job, needle).await;
    }
    h.jobs
        .finish(
            &lease,
            &JobResult::Backup {
                snapshot: "ab12cd34".into(),
                files: 16,
                dirs: 2,
                bytes: 1600,
                bytes_stored: 800,
                new_chunks: 3,
                warnings: 0,
                duration_ms: 1234,
            },
        )
        .await
        .unwrap();
    let text = h.wait_progress(&job, "Done: snapshot ab12cd34").await;
    assert!(text.contains("Dedup: 2.00×"), "{text}");
    assert!(text.contains("New data stored: 800 B"), "{text}");
    assert!(text.contains("Files: 16 files in 2 folders"), "{text}");
    // Besides the (silent) final edit, a short new message notifies.
    let notice = h
        .api
        .wait_for_bot_text(CHAT, "done: snapshot ab12cd34", WAIT)
        .await
        .unwrap();
    assert_eq!(
        notice.text,
        format!(
            "✅ Backup #{} done: snapshot ab12cd34, 16 files, 1.6 KiB (800 B new).",
            job.id
        )
    );

    let msgs = h.api.bot_messages(CHAT);
    assert_eq!(
        msgs.len(),
        2,
        "one progress message and one final notice per job:\n{}",
        h.api.transcript_text(CHAT)
    );
    let progress_edits = msgs[0]
        .edits
        .iter()
        .filter(|t| t.contains("Phase:"))
        .count();
    assert!(progress_edits >= 2, "{}", h.api.transcript_text(CHAT));
    let commands = h.api.commands();
    assert_eq!(commands.as_array().unwrap().len(), 24);
    for name in ["forget", "prune"] {
        assert!(
            commands
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c["command"].as_str().map(|n| n.trim_start_matches('/')) == Some(name)),
            "/{name} in {commands}"
        );
    }
    println!("{}", h.api.transcript_text(CHAT));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthorized_user_is_refused_and_nothing_is_queued() {
    let h = start(None).await;
    let reply = h
        .say(99, &format!("/backup {}", h.root.join("data").display()))
        .await;
    assert!(reply.contains("not allowed"), "{reply}");
    assert!(reply.contains("99"), "{reply}");
    // Further messages within the stranger interval get no answer: nobody outside can spend
    // the bot's message budget.
    for _ in 0..5 {
        h.api.push_message(99, CHAT, "/jobs");
    }
    h.say(USER, "/jobs").await;
    let refusals = h
        .api
        .bot_messages(CHAT)
        .iter()
        .filter(|m| m.text.contains("not allowed"))
        .count();
    assert_eq!(refusals, 1, "{}", h.api.transcript_text(CHAT));
    assert_eq!(h.job_count().await, 0);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_paths_are_refused_before_a_job_is_written() {
    let h = start(None).await;
    std::os::unix::fs::symlink(&h.outside, h.root.join("escape")).unwrap();
    let cases = [
        (h.outside.display().to_string(), "outside the folders"),
        (
            format!("{}/data/../../outside", h.root.display()),
            "outside the folders",
        ),
        (
            h.root.join("escape").display().to_string(),
            "outside the folders",
        ),
        (
            h.root.join("missing dir").display().to_string(),
            "does not exist",
        ),
        (
            h.root.join("file.txt").display().to_string(),
            "not a folder",
        ),
        ("relative/path".to_string(), "not an absolute path"),
    ];
    for (path, expect) in cases {
        let reply = h.say(USER, &format!("/backup {path}")).await;
        assert!(reply.contains(expect), "{path}: {reply}");
    }
    let reply = h
        .say(
            USER,
            &format!("/restore {}/data to /etc/x", h.root.display()),
        )
        .await;
    assert!(
        reply.contains("outside the folders I may restore into"),
        "{reply}"
    );
    let reply = h
        .say(USER, &format!("/restore {}/data", h.root.display()))
        .await;
    assert!(reply.contains("no backup containing"), "{reply}");
    assert_eq!(h.job_count().await, 0);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_commands_and_bad_arguments_get_usage() {
    let h = start(None).await;
    for (text, expect) in [
        (
            "/frobnicate",
            "I don't know /frobnicate. /help lists the commands.",
        ),
        (
            "/backup",
            "Which folder? Usage: /backup <path> [unencrypted]",
        ),
        ("/cancel soon", "not a job id"),
        ("/restore", "What should I restore? Usage: /restore"),
        ("/ls", "Usage: /ls"),
        ("hello", "I only understand commands. /help lists them."),
        ("/start", "👋 Hi!"),
        ("/help", "/backup"),
        ("/jobs", "no jobs yet"),
        ("/status", "Nothing is running"),
        ("/snapshots", "No snapshots yet"),
        ("/usage", "No backups yet"),
        ("/cancel 41", "no job #41"),
        ("/verify /srv/data", "Usage: /verify (no arguments)"),
    ] {
        let reply = h.say(USER, text).await;
        assert!(reply.contains(expect), "{text}: {reply}");
    }
    assert_eq!(h.job_count().await, 0, "no usage error queues a job");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_of_a_running_job_reaches_the_worker() {
    let h = start(None).await;
    h.say(USER, &format!("/backup {}", h.root.join("data").display()))
        .await;
    let job = h.jobs.list_for_user(USER, 1).await.unwrap().remove(0);
    let (_, lease) = h.jobs.claim("w").await.unwrap().unwrap();
    h.jobs
        .report_progress(&lease, &report(Phase::Uploading, 100, 1000))
        .await
        .unwrap();
    h.wait_progress(&job, "10%").await;

    // Another user can't see or cancel it.
    let reply = h.say(OTHER_USER, &format!("/cancel {}", job.id)).await;
    assert!(reply.contains(&format!("no job #{}", job.id)), "{reply}");
    let reply = h.say(USER, &format!("/cancel #{}", job.id)).await;
    assert!(reply.contains("Cancelling"), "{reply}");
    assert_eq!(h.jobs.heartbeat(&lease).await.unwrap(), Signal::Cancel);
    h.jobs.cancelled(&lease).await.unwrap();
    h.wait_progress(&job, "Cancelled").await;
    let reply = h.say(USER, "/jobs").await;
    assert!(reply.contains("cancelled"), "{reply}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_on_edit_is_obeyed_and_the_final_text_arrives() {
    let h = start(None).await;
    h.say(USER, &format!("/backup {}", h.root.join("data").display()))
        .await;
    let job = h.jobs.list_for_user(USER, 1).await.unwrap().remove(0);
    h.api
        .fail_next_call("editMessageText", Fault::RetryAfter(1));
    let (_, lease) = h.jobs.claim("w").await.unwrap().unwrap();
    h.jobs
        .report_progress(&lease, &report(Phase::Uploading, 500, 1000))
        .await
        .unwrap();
    h.jobs
        .finish(
            &lease,
            &JobResult::Backup {
                snapshot: "s1".into(),
                files: 10,
                dirs: 1,
                bytes: 1000,
                bytes_stored: 1000,
                new_chunks: 1,
                warnings: 0,
                duration_ms: 10,
            },
        )
        .await
        .unwrap();
    h.wait_progress(&job, "Done: snapshot s1").await;
    let edits = h.api.calls_of("editMessageText");
    let limited = edits
        .iter()
        .position(|c| c.fault == Some(Fault::RetryAfter(1)))
        .unwrap();
    let next = &edits[limited + 1];
    assert!(
        next.at >= edits[limited].at + Duration::from_millis(950),
        "next edit came {:?} after the 429",
        next.at - edits[limited].at
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_job_gets_a_separate_notice_with_reason_and_id() {
    let h = start(None).await;
    h.say(USER, &format!("/backup {}", h.root.join("data").display()))
        .await;
    let job = h.jobs.list_for_user(USER, 1).await.unwrap().remove(0);
    let (_, lease) = h.jobs.claim("w").await.unwrap().unwrap();
    let state = h
        .jobs
        .fail(&lease, "data/sub: permission denied", None, false)
        .await
        .unwrap();
    assert_eq!(state, JobState::Failed);
    let notice = h
        .api
        .wait_for_bot_text(CHAT, "failed:", WAIT)
        .await
        .unwrap();
    assert!(
        notice.text.contains("data/sub: permission denied"),
        "{}",
        notice.text
    );
    assert!(
        notice.text.contains(&format!("Job id: {}", job.id)),
        "{}",
        notice.text
    );
    h.wait_progress(&job, "Failed").await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_worker_is_reported_once() {
    let clock = ManualClock::new(1_700_000_000_000);
    let h = start(Some(clock.clone())).await;
    h.say(USER, &format!("/backup {}", h.root.join("data").display()))
        .await;
    let (job, lease) = h.jobs.claim("w").await.unwrap().unwrap();
    h.jobs
        .report_progress(&lease, &report(Phase::Uploading, 250, 1000))
        .await
        .unwrap();
    // A second job whose worker holds a long lease: it stays alive through the clock jump
    // and serves as the marker below.
    h.say(
        USER,
        &format!("/backup {}", h.root.join("data/sub").display()),
    )
    .await;
    let marker = h.jobs.list_for_user(USER, 1).await.unwrap().remove(0);
    assert_ne!(marker.id, job.id);
    let patient = h.jobs.clone().with_policy(JobPolicy {
        lease_ms: 10 * h.jobs.policy().lease_ms,
        ..*h.jobs.policy()
    });
    let (claimed, marker_lease) = patient.claim("w2").await.unwrap().unwrap();
    assert_eq!(claimed.id, marker.id);
    clock.advance(h.jobs.policy().lease_ms + 1);
    let m = h
        .api
        .wait_for_bot_text(CHAT, "stalled", WAIT)
        .await
        .unwrap();
    assert!(m.text.contains("25%"), "{}", m.text);
    assert!(
        m.text.contains(&format!("/cancel {} ", job.id)),
        "{}",
        m.text
    );
    // Proof that the bot has gone over the job table again since (it shows the marker's new
    // progress), and that everything it queued for this chat by then was sent (a reply
    // queued after it has arrived), instead of sleeping: the stall is still reported once.
    patient
        .report_progress(&marker_lease, &report(Phase::Uploading, 500, 1000))
        .await
        .unwrap();
    h.wait_progress(&marker, "50%").await;
    h.api.push_message(USER, CHAT, "/status");
    h.api
        .wait_for_bot_text(CHAT, "2 active jobs", WAIT)
        .await
        .expect("the /status reply");
    let stalls = h
        .api
        .bot_messages(CHAT)
        .iter()
        .filter(|m| m.text.contains("is stalled: the worker stopped responding"))
        .count();
    assert_eq!(stalls, 1, "{}", h.api.transcript_text(CHAT));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_conflicts_ask_before_overwriting() {
    let h = start(None).await;
    let snap = backup_as(h.jobs.pool(), h._dir.path(), &h.root, &format!("tg:{USER}")).await;
    let out = h.root.join("out dir");
    let reply = h
        .say(
            USER,
            &format!(
                "/restore {}/data/sub to {} snapshot {snap}",
                h.root.display(),
                out.display()
            ),
        )
        .await;
    assert!(reply.contains("Queued"), "{reply}");
    // Another user has no backups there.
    let reply = h
        .say(OTHER_USER, &format!("/restore {}/data", h.root.display()))
        .await;
    assert!(reply.contains("no backup containing"), "{reply}");

    let job = h.jobs.list_for_user(USER, 1).await.unwrap().remove(0);
    assert_eq!(
        job.args,
        JobArgs::Restore {
            path: format!("{}/data/sub", h.root.display()),
            to: Some(out.display().to_string()),
            snapshot: Some(snap.clone()),
            overwrite: false,
        }
    );
    let (_, lease) = h.jobs.claim("w").await.unwrap().unwrap();
    let conflicts = JobResult::Conflicts {
        count: 2,
        sample: vec!["sub/a.txt".into(), "sub/b.txt".into()],
        snapshot: Some(snap.clone()),
    };
    h.jobs
        .fail(&lease, "2 existing files differ", Some(&conflicts), false)
        .await
        .unwrap();
    let prompt = h
        .api
        .wait_for_bot_text(CHAT, "Overwrite them?", WAIT)
        .await
        .unwrap();
    assert_eq!(
        prompt.button_data(),
        vec![format!("ow:{}", job.id), format!("keep:{}", job.id)]
    );

    // Telegram makes the new restore's progress message wait: the tap is answered anyway.
    h.api.fail_next_call("sendMessage", Fault::RetryAfter(1));
    // A stranger's tap and another user's tap do nothing; the user's double tap acts once.
    let data = format!("ow:{}", job.id);
    let stranger = h.api.push_callback(99, CHAT, prompt.message_id, &data);
    let other = h
        .api
        .push_callback(OTHER_USER, CHAT, prompt.message_id, &data);
    let first = h.api.push_callback(USER, CHAT, prompt.message_id, &data);
    let second = h.api.push_callback(USER, CHAT, prompt.message_id, &data);
    let edited = h
        .api
        .wait_for_bot_text(CHAT, "overwriting — restore #", WAIT)
        .await
        .unwrap();
    assert_eq!(edited.message_id, prompt.message_id);
    h.api
        .wait_for(WAIT, |a| a.callback_answer(&second))
        .await
        .unwrap();
    assert_eq!(
        h.api.callback_answer(&stranger).unwrap(),
        "You are not allowed to use this bot."
    );
    assert_eq!(
        h.api.callback_answer(&other).unwrap(),
        "That restore is not waiting for an answer."
    );
    assert_eq!(h.api.callback_answer(&first).unwrap(), "Overwriting.");
    assert_eq!(h.api.callback_answer(&second).unwrap(), "Already answered.");
    let calls = h.api.calls();
    let answered = calls
        .iter()
        .position(|c| {
            c.method == "answerCallbackQuery" && c.params["callback_query_id"] == first.as_str()
        })
        .unwrap();
    let posted = calls
        .iter()
        .rposition(|c| c.method == "sendMessage" && c.fault.is_none())
        .unwrap();
    assert!(
        answered < posted,
        "the tap was answered only after the progress message was out"
    );
    let new = h.jobs.list_for_user(USER, 1).await.unwrap().remove(0);
    assert_ne!(new.id, job.id);
    // Pinned to the snapshot the conflict was found in.
    assert_eq!(
        new.args,
        JobArgs::Restore {
            path: format!("{}/data/sub", h.root.display()),
            to: Some(out.display().to_string()),
            snapshot: Some(snap.clone()),
            overwrite: true,
        }
    );
    assert_eq!(h.job_count().await, 2);
    println!("{}", h.api.transcript_text(CHAT));
    h.stop().await;
}

/// A tap whose handling fails (here the prompt table is gone) is still answered, with what
/// went wrong, instead of leaving the button spinning; the bot carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_tap_is_answered_with_the_failure() {
    let h = start(None).await;
    sqlx::query("ALTER TABLE forget_prompts RENAME TO forget_prompts_gone")
        .execute(h.jobs.pool())
        .await
        .unwrap();
    let tap = h.api.push_callback(USER, CHAT, 1, "fg:1");
    let answer = h
        .api
        .wait_for(WAIT, |a| a.callback_answer(&tap))
        .await
        .expect("the tap is answered");
    assert!(answer.starts_with("That did not work: "), "{answer}");
    assert!(answer.contains("forget_prompts"), "{answer}");
    assert_eq!(h.job_count().await, 0);
    let reply = h.say(USER, "/jobs").await;
    assert!(!reply.is_empty());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_existing_keeps_the_files_and_queues_nothing() {
    let h = start(None).await;
    let snap = backup_as(h.jobs.pool(), h._dir.path(), &h.root, &format!("tg:{USER}")).await;
    let out = h.root.join("out dir");
    let reply = h
        .say(
            USER,
            &format!(
                "/restore {}/data/sub to {} snapshot {snap}",
                h.root.display(),
                out.display()
            ),
        )
        .await;
    assert!(reply.contains("Queued"), "{reply}");
    let job = h.jobs.list_for_user(USER, 1).await.unwrap().remove(0);
    let (_, lease) = h.jobs.claim("w").await.unwrap().unwrap();
    let conflicts = JobResult::Conflicts {
        count: 1,
        sample: vec!["sub/a.txt".into()],
        snapshot: Some(snap.clone()),
    };
    h.jobs
        .fail(&lease, "1 existing file differs", Some(&conflicts), false)
        .await
        .unwrap();
    let prompt = h
        .api
        .wait_for_bot_text(CHAT, "Overwrite them?", WAIT)
        .await
        .unwrap();

    // Keep existing: the prompt says so, and no restore is queued.
    let keep = h
        .api
        .push_callback(USER, CHAT, prompt.message_id, &format!("keep:{}", job.id));
    let edited = h
        .api
        .wait_for_bot_text(CHAT, "kept the existing files", WAIT)
        .await
        .unwrap();
    assert_eq!(edited.message_id, prompt.message_id);
    assert!(
        edited.text.contains("nothing was overwritten"),
        "{}",
        edited.text
    );
    let answer = h.api.wait_for(WAIT, |a| a.callback_answer(&keep)).await;
    assert_eq!(answer.as_deref(), Some("Kept."));
    // The answer stands: a later Overwrite tap on the same prompt does nothing either.
    let late = h
        .api
        .push_callback(USER, CHAT, prompt.message_id, &format!("ow:{}", job.id));
    let answer = h.api.wait_for(WAIT, |a| a.callback_answer(&late)).await;
    assert_eq!(answer.as_deref(), Some("Already answered."));
    assert_eq!(h.job_count().await, 1, "no restore was queued");
    assert_eq!(
        h.jobs.get(job.id).await.unwrap().unwrap().state,
        JobState::Failed
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_of_a_running_job_spaced_progress_edits_and_a_retry_notice() {
    // Edits at most every 700 ms: slower than the chat's pacing (200 ms here), so the
    // spacing seen is the bot's own interval.
    let h = start_with(None, 700).await;
    h.say(USER, &format!("/backup {}", h.root.join("data").display()))
        .await;
    let job = h.jobs.list_for_user(USER, 1).await.unwrap().remove(0);
    let (_, lease) = h.jobs.claim("w").await.unwrap().unwrap();
    h.jobs
        .report_progress(&lease, &report(Phase::Uploading, 100, 1000))
        .await
        .unwrap();
    let status = h.say(USER, "/status").await;
    assert!(
        status.contains("1 active job") && status.contains(&format!("#{} ", job.id)),
        "{status}"
    );
    assert!(status.contains("10%"), "{status}");

    // New progress every 50 ms for 2.5 s.
    for i in 1..=50u64 {
        h.jobs
            .report_progress(&lease, &report(Phase::Uploading, 100 + i * 10, 1000))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    h.wait_progress(&job, "60%").await;
    let mid = h
        .jobs
        .get(job.id)
        .await
        .unwrap()
        .unwrap()
        .progress_message_id
        .unwrap();
    let edits: Vec<_> = h
        .api
        .calls_of("editMessageText")
        .into_iter()
        .filter(|c| c.fault.is_none() && c.params["message_id"].as_i64() == Some(i64::from(mid)))
        .collect();
    assert!(edits.len() >= 2, "{} edits", edits.len());
    for w in edits.windows(2) {
        // (Arrival times: a little less than the interval if the earlier edit was delayed.)
        assert!(
            w[1].at >= w[0].at + Duration::from_millis(600),
            "edits {:?} apart:\n{}",
            w[1].at - w[0].at,
            h.api.transcript_text(CHAT)
        );
    }

    // A failure that may go away: the message says the job will be retried, and why.
    h.jobs
        .fail(&lease, "connection reset by peer", None, true)
        .await
        .unwrap();
    let text = h.wait_progress(&job, "Will retry").await;
    assert!(
        text.contains("attempt 2 of") && text.contains("connection reset by peer"),
        "{text}"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_filter_by_path_ls_reads_a_given_snapshot_and_backups_may_be_unencrypted() {
    let h = start(None).await;
    let owner = format!("tg:{USER}");
    let data = h.root.join("data");
    let first = backup_as(h.jobs.pool(), h._dir.path(), &h.root, &owner).await;
    std::fs::write(data.join("later.txt"), b"added after the first backup").unwrap();
    let second = backup_as(h.jobs.pool(), h._dir.path(), &h.root, &owner).await;
    let other_root = h.root.join("other");
    std::fs::create_dir_all(other_root.join("data")).unwrap();
    std::fs::write(other_root.join("data/x.txt"), b"x").unwrap();
    let other = backup_as(h.jobs.pool(), h._dir.path(), &other_root, &owner).await;

    let all = h.say(USER, "/snapshots").await;
    assert!(all.contains("📚 3 snapshots:"), "{all}");
    let of_data = h.say(USER, &format!("/snapshots {}", data.display())).await;
    assert!(of_data.contains("📚 2 snapshots:"), "{of_data}");
    assert!(
        of_data.contains(&first) && of_data.contains(&second) && !of_data.contains(&other),
        "{of_data}"
    );

    let latest = h.say(USER, &format!("/ls {}", data.display())).await;
    assert!(latest.contains("later.txt"), "{latest}");
    let old = h
        .say(USER, &format!("/ls {} snapshot {first}", data.display()))
        .await;
    assert!(old.contains("a.txt") && !old.contains("later.txt"), "{old}");

    let reply = h
        .say(USER, &format!("/backup {} unencrypted", data.display()))
        .await;
    assert!(reply.contains("Queued"), "{reply}");
    let job = h.jobs.list_for_user(USER, 1).await.unwrap().remove(0);
    assert_eq!(
        job.args,
        JobArgs::Backup {
            path: data.display().to_string(),
            encrypt: false
        }
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_is_not_modified_counts_as_done() {
    let h = start(None).await;
    h.say(USER, &format!("/backup {}", h.root.join("data").display()))
        .await;
    let job = h.jobs.list_for_user(USER, 1).await.unwrap().remove(0);
    let (_, lease) = h.jobs.claim("w").await.unwrap().unwrap();
    // Everything the bot had to show so far is shown: no edit is pending.
    let shown = || async {
        let j = h.jobs.get(job.id).await.unwrap().unwrap();
        j.shown_at >= j.updated_at
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    while !shown().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the claim was never shown"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Telegram answers the next edit "message is not modified" (it already shows that
    // text): that edit is done, recorded as shown and not sent again.
    h.api.fail_next_call("editMessageText", Fault::NotModified);
    h.jobs
        .report_progress(&lease, &report(Phase::Uploading, 500, 1000))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while !shown().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the progress was never recorded as shown:\n{}",
            h.api.transcript_text(CHAT)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let edits: Vec<_> = h
        .api
        .calls_of("editMessageText")
        .into_iter()
        .filter(|c| c.params["text"].as_str().unwrap_or("").contains("50%"))
        .collect();
    assert_eq!(edits.len(), 1, "{edits:?}");
    assert_eq!(edits[0].fault, Some(Fault::NotModified));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_final_notice_survives_repeated_429s() {
    let h = start(None).await;
    h.say(USER, &format!("/backup {}", h.root.join("data").display()))
        .await;
    let (_, lease) = h.jobs.claim("w").await.unwrap().unwrap();
    // The next three sends are refused with retry_after (more than the old give-up of two).
    let n = h.api.calls_of("sendMessage").len();
    for i in 1..=3 {
        h.api.fail_call("sendMessage", n + i, Fault::RetryAfter(1));
    }
    h.jobs
        .finish(
            &lease,
            &JobResult::Backup {
                snapshot: "5eed".into(),
                files: 1,
                dirs: 1,
                bytes: 10,
                bytes_stored: 10,
                new_chunks: 1,
                warnings: 0,
                duration_ms: 5,
            },
        )
        .await
        .unwrap();
    let notice = h
        .api
        .wait_for_bot_text(CHAT, "done: snapshot 5eed", WAIT)
        .await;
    assert!(notice.is_some(), "{}", h.api.transcript_text(CHAT));
    let refused: Vec<_> = h
        .api
        .calls_of("sendMessage")
        .into_iter()
        .filter(|c| c.fault == Some(Fault::RetryAfter(1)))
        .collect();
    assert_eq!(refused.len(), 3);
    // Each retry waited out the second it was asked to.
    for pair in h.api.calls_of("sendMessage")[n..].windows(2) {
        assert!(pair[1].at >= pair[0].at + Duration::from_millis(950));
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_shows_the_users_own_folders_and_what_a_prune_would_free() {
    let h = start(None).await;
    backup_as(h.jobs.pool(), h._dir.path(), &h.root, &format!("tg:{USER}")).await;
    let reply = h.say(USER, "/usage").await;
    let root = h.root.join("data");
    assert!(
        reply.contains(&format!("• {}: 1 snapshot", root.display())),
        "{reply}"
    );
    assert!(reply.contains("A prune would free 0 B now."), "{reply}");
    // Another user's backups are not shown.
    let reply = h.say(OTHER_USER, "/usage").await;
    assert!(reply.contains("No backups yet"), "{reply}");
    h.stop().await;
}

/// On PostgreSQL the bot is on a machine of its own: even with a single host it checks a path
/// by its text and the host's registered roots, not on its own file system (where the
/// folder does not exist).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bot_on_postgres_routes_a_lone_hosts_paths_by_their_text() {
    use storinator_shared::ops::hosts::Registration;
    let pg = storinator_testkit::pg::PgCluster::start().unwrap();
    let h = start_on(None, 100, Some(pg)).await;
    h.jobs
        .register_host(&Registration {
            name: "web1".into(),
            backup_roots: vec!["/srv/elsewhere".into()],
            restore_roots: vec!["/srv/restore".into()],
        })
        .await
        .unwrap();
    // Not a folder of the bot's machine: routed by text to web1.
    h.say(USER, "/backup /srv/elsewhere/data").await;
    let job = h.jobs.list_for_user(USER, 1).await.unwrap().pop().unwrap();
    assert_eq!(job.host.as_deref(), Some("web1"));
    assert_eq!(
        job.args,
        JobArgs::Backup {
            path: "/srv/elsewhere/data".into(),
            encrypt: true
        }
    );
    let reply = h.say(USER, "/backup /opt/app").await;
    assert!(reply.contains("/opt/app"), "{reply}");
    assert_eq!(h.jobs.list_for_user(USER, 10).await.unwrap().len(), 1);
    h.stop().await;
}

/// Routing by the hosts the workers registered: with none, as before; with one, the bot still
/// checks the folder on its own file system and the job carries the host; with two serving
/// the same folder, the user names one (`web2:/path`), restores are bound by that host's
/// restore roots, and schedules carry their host. `/hosts` lists them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_are_routed_to_the_host_that_serves_the_path() {
    use storinator_shared::ops::hosts::Registration;
    let h = start(None).await;
    let root = h.root.display().to_string();
    let data = format!("{root}/data");
    let reply = h.say(USER, "/hosts").await;
    assert!(
        reply.contains("No storage host has registered yet"),
        "{reply}"
    );
    let register = |name: &str, backup: &[&str], restore: &[&str]| Registration {
        name: name.into(),
        backup_roots: backup.iter().map(|s| s.to_string()).collect(),
        restore_roots: restore.iter().map(|s| s.to_string()).collect(),
    };

    // One host: the bot still checks the folder itself, and the job goes to that host.
    h.jobs
        .register_host(&register("web1", &[&root], &[&root]))
        .await
        .unwrap();
    h.say(USER, &format!("/backup {data}")).await;
    let job = h.jobs.list_for_user(USER, 1).await.unwrap().pop().unwrap();
    assert_eq!(job.host.as_deref(), Some("web1"));
    let reply = h.say(USER, &format!("/backup {root}/missing")).await;
    assert!(reply.contains("does not exist"), "{reply}");
    let reply = h.say(USER, &format!("/backup web9:{data}")).await;
    assert!(
        reply.contains("no storage host is called web9 (known: web1)"),
        "{reply}"
    );

    // Two hosts serving the folder: name one.
    let outside = h.outside.display().to_string();
    h.jobs
        .register_host(&register("web2", &[&data], &[&outside]))
        .await
        .unwrap();
    let reply = h.say(USER, &format!("/backup {data}")).await;
    assert!(
        reply.contains(&format!("{data} is on 2 hosts: web1, web2")),
        "{reply}"
    );
    assert!(reply.contains(&format!("like web1:{data}")), "{reply}");
    h.say(USER, &format!("/backup web2:{data}")).await;
    let job = h.jobs.list_for_user(USER, 1).await.unwrap().pop().unwrap();
    assert_eq!(job.host.as_deref(), Some("web2"));
    assert!(matches!(job.args, JobArgs::Backup { ref path, .. } if *path == data));
    let reply = h.say(USER, "/jobs").await;
    assert!(reply.contains(&format!("web2:{data}")), "{reply}");

    // Restores: routed the same way, written only into the chosen host's restore roots.
    backup_as(h.jobs.pool(), h.root.parent().unwrap(), &h.root, "tg:7").await;
    let reply = h
        .say(USER, &format!("/restore web2:{data} to {root}/back"))
        .await;
    assert!(
        reply.contains(&format!(
            "{root}/back is outside the folders web2 may restore into ({outside})"
        )),
        "{reply}"
    );
    let before = h.job_count().await;
    h.say(USER, &format!("/restore web2:{data} to {outside}/r"))
        .await;
    assert_eq!(h.job_count().await, before + 1);
    let job = h.jobs.list_for_user(USER, 1).await.unwrap().pop().unwrap();
    assert_eq!(job.host.as_deref(), Some("web2"));
    assert!(
        matches!(job.args, JobArgs::Restore { ref to, .. } if to.as_deref() == Some(&*format!("{outside}/r")))
    );
    let reply = h.say(USER, &format!("/restore {data}")).await;
    assert!(reply.contains("is on 2 hosts"), "{reply}");
    // A named host restores there even when it does not serve the path (a lost server's
    // data onto another), into its restore roots.
    let root_file = format!("{root}/file.txt");
    h.jobs
        .register_host(&register("web3", &[&root_file], &[&outside]))
        .await
        .unwrap();
    h.say(USER, &format!("/restore web3:{data} to {outside}/r3"))
        .await;
    let job = h.jobs.list_for_user(USER, 1).await.unwrap().pop().unwrap();
    assert_eq!(job.host.as_deref(), Some("web3"));
    let reply = h
        .say(USER, &format!("/restore web9:{data} to {outside}/r"))
        .await;
    assert!(
        reply.contains("no storage host is called web9 (known: web1, web2, web3)"),
        "{reply}"
    );

    // Schedules carry their host.
    let reply = h
        .say(USER, &format!("/schedule web2:{data} daily 03:00"))
        .await;
    assert!(
        reply.contains(&format!("web2:{data} · daily 03:00")),
        "{reply}"
    );
    let schedules = storinator_shared::Schedules::new(h.jobs.clone(), jiff::tz::TimeZone::UTC);
    let list = schedules.list("tg:7").await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].host.as_deref(), Some("web2"));
    let reply = h.say(USER, "/schedules").await;
    assert!(
        reply.contains(&format!("web2:{data} · daily 03:00")),
        "{reply}"
    );

    let reply = h.say(USER, "/hosts").await;
    assert!(reply.contains("Storage hosts (3)"), "{reply}");
    assert!(
        reply.contains(&format!("• web1 — {root} · seen ")),
        "{reply}"
    );
    assert!(
        reply.contains(&format!("• web2 — {data} · seen ")) && reply.contains(&outside),
        "{reply}"
    );
    h.stop().await;
}
