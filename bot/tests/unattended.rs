//! The bot's side of unattended work, against the fake Bot API with no worker running (the
//! case that matters): schedule commands, the missed-backup alert and "back to normal", the
//! weekly digest. Time is a manual clock shared with the job table; snapshots are made with
//! the real engine on a memory store.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use storinator_bot::BotConfig;
use storinator_shared::{
    BackupOptions, CancelFlag, Catalog, Clock, Jobs, KdfParams, ManualClock, MemoryStorage,
    NoProgress, Repo,
};
use storinator_testkit::botapi::FakeBotApi;
use tokio::sync::oneshot;

const USER: i64 = 7;
const OTHER: i64 = 8;
const WAIT: Duration = Duration::from_secs(15);

fn at(s: &str) -> i64 {
    let dt: jiff::civil::DateTime = s.parse().unwrap();
    dt.to_zoned(jiff::tz::TimeZone::get("Europe/Berlin").unwrap())
        .unwrap()
        .timestamp()
        .as_millisecond()
}

struct Harness {
    api: FakeBotApi,
    jobs: Jobs,
    clock: ManualClock,
    repo: Repo,
    dir: tempfile::TempDir,
    root: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

async fn start(start_ms: i64) -> Harness {
    // Telegram's message rates, ten times faster (bot and fake alike): the bot paces every
    // message, so alerts arrive within the harness's settling time.
    let api = FakeBotApi::start_with(storinator_testkit::botapi::Limits::telegram().faster(10))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    for sub in ["data", "docs"] {
        std::fs::create_dir_all(root.join(sub)).unwrap();
        std::fs::write(root.join(sub).join("a.txt"), format!("hello {sub}")).unwrap();
    }
    let root = root.canonicalize().unwrap();
    let db = format!("sqlite://{}", dir.path().join("st.db").display());
    let vars = [
        (
            "TELOXIDE_TOKEN".to_string(),
            "110201543:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw".to_string(),
        ),
        ("TELOXIDE_API_URL".into(), api.url()),
        ("STORINATOR_ALLOWED_USERS".into(), format!("{USER},{OTHER}")),
        ("STORINATOR_BACKUP_ROOTS".into(), root.display().to_string()),
        ("DATABASE_URL".into(), db.clone()),
        ("STORINATOR_BOT_TICK_MS".into(), "20".into()),
        ("STORINATOR_BOT_POLL_TIMEOUT_S".into(), "1".into()),
        ("STORINATOR_TIMEZONE".into(), "Europe/Berlin".into()),
    ];
    let mut cfg =
        BotConfig::from_lookup(|k| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()))
            .unwrap();
    cfg.limits = storinator_bot::Limits::telegram().faster(10);
    let pool = storinator_bot::db::open(&db).await.unwrap();
    let clock = ManualClock::new(start_ms);
    let jobs = Jobs::new(pool.clone()).with_clock(Arc::new(clock.clone()));
    // The engine, to make snapshots as a worker would have (no worker runs in these tests).
    let store = Arc::new(MemoryStorage::new(dir.path().join("spool")));
    let cat = Catalog::from_pool(pool);
    Repo::init(&cat, store.as_ref(), "pw", KdfParams::fast_for_tests())
        .await
        .unwrap();
    let repo = Repo::open(cat, store, "pw", Default::default())
        .await
        .unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(storinator_bot::run_with(cfg, jobs.clone(), async move {
        let _ = stopped.await;
    }));
    api.wait_for(WAIT, |a| {
        (!a.calls_of("getUpdates").is_empty()).then_some(())
    })
    .await
    .expect("bot starts polling");
    Harness {
        api,
        jobs,
        clock,
        repo,
        dir,
        root,
        stop: Some(stop),
        task: Some(task),
    }
}

impl Harness {
    async fn say_as(&self, user: i64, text: &str) -> String {
        let before = self.api.bot_messages(user).len();
        self.api.push_message(user, user, text);
        let m = self
            .api
            .wait_for(WAIT, |a| a.bot_messages(user).get(before).cloned())
            .await
            .unwrap_or_else(|| panic!("no reply to {text:?}"));
        m.history()[0].clone()
    }

    async fn say(&self, text: &str) -> String {
        self.say_as(USER, text).await
    }

    async fn wait_text(&self, needle: &str) -> String {
        self.api
            .wait_for_bot_text(USER, needle, WAIT)
            .await
            .unwrap_or_else(|| {
                panic!(
                    "the bot never said {needle:?}:\n{}",
                    self.api.transcript_text(USER)
                )
            })
            .text
    }

    fn count(&self, needle: &str) -> usize {
        self.api
            .bot_messages(USER)
            .iter()
            .filter(|m| m.text.contains(needle))
            .count()
    }

    /// Lets the alert sender make a few passes (its period is ten bot ticks).
    async fn settle(&self) {
        tokio::time::sleep(Duration::from_millis(700)).await;
    }

    /// A snapshot of `sub` for the user, as if finished at the clock's time.
    async fn snapshot(&self, sub: &str) -> String {
        let s = self
            .repo
            .backup(
                &BackupOptions {
                    path: self.root.join(sub),
                    owner: format!("tg:{USER}"),
                    encrypt: true,
                },
                &NoProgress,
                &CancelFlag::new(),
            )
            .await
            .unwrap();
        sqlx::query("UPDATE snapshots SET finished_at = $1 WHERE short_id = $2")
            .bind(self.clock.now_ms())
            .bind(&s.snapshot.short_id)
            .execute(self.jobs.pool())
            .await
            .unwrap();
        s.snapshot.short_id
    }

    async fn stop(mut self) {
        self.stop.take().unwrap().send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), self.task.take().unwrap())
            .await
            .expect("bot stops")
            .unwrap()
            .unwrap();
        drop(self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedule_commands_check_their_input_and_keep_users_apart() {
    let h = start(at("2026-05-04 10:15")).await;
    let data = h.root.join("data").display().to_string();
    let reply = h
        .say(&format!(
            "/schedule {data} daily 02:30 keep daily 7 weekly 4"
        ))
        .await;
    assert!(reply.contains("Schedule #1"), "{reply}");
    assert!(
        reply.contains("Tue 05 May 02:30 CEST"),
        "first run in the zone: {reply}"
    );
    assert!(reply.contains("keep daily 7 weekly 4"), "{reply}");
    let outside = h.dir.path().display().to_string();
    let reply = h.say(&format!("/schedule {outside} hourly")).await;
    assert!(reply.contains("outside the folders"), "{reply}");
    let reply = h.say(&format!("/schedule {data} fortnightly")).await;
    assert!(reply.contains("hourly, daily [HH:MM]"), "{reply}");
    let reply = h.say(&format!("/schedule {data} \"0 3 * * 1-5\"")).await;
    assert!(reply.contains("Schedule #2"), "{reply}");

    let list = h.say("/schedules").await;
    assert!(
        list.contains("#1") && list.contains("daily 02:30") && list.contains("#2"),
        "{list}"
    );
    assert!(list.contains("keep daily 7 weekly 4"), "{list}");
    assert!(list.contains("no snapshot yet"), "{list}");
    // Another user sees none of them and can't touch them.
    assert!(h.say_as(OTHER, "/schedules").await.contains("no schedules"));
    assert!(
        h.say_as(OTHER, "/pause 1")
            .await
            .contains("You have no schedule #1")
    );
    assert!(
        h.say_as(OTHER, "/unschedule 1")
            .await
            .contains("You have no schedule #1")
    );

    assert!(h.say("/pause 1").await.contains("paused"));
    assert!(h.say("/schedules").await.contains("⏸"));
    let reply = h.say("/resume #1").await;
    assert!(
        reply.contains("resumed") && reply.contains("Next run"),
        "{reply}"
    );
    assert!(h.say("/unschedule 2").await.contains("removed"));
    assert!(h.say("/pause two").await.contains("not a schedule id"));
    let list = h.say("/schedules").await;
    assert!(!list.contains("#2"), "{list}");

    let scrub = h.say("/scrub").await;
    assert!(scrub.contains("no scrub has run yet"), "{scrub}");
    // /verify starts the full check and shows where the continuous one stands.
    h.api.push_message(USER, USER, "/verify");
    let summary = h.wait_text("🧽 Scrub:").await;
    assert!(summary.contains("no scrub has run yet"), "{summary}");
    sqlx::query("DELETE FROM jobs")
        .execute(h.jobs.pool())
        .await
        .unwrap();
    // No job rows from any of this: schedules fire from the worker.
    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs")
        .fetch_one(h.jobs.pool())
        .await
        .unwrap();
    assert_eq!(jobs, 0);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missed_backup_is_reported_with_the_worker_stopped_then_back_to_normal() {
    let h = start(at("2026-05-04 10:15")).await;
    let data = h.root.join("data").display().to_string();
    assert!(
        h.say(&format!("/schedule {data} hourly"))
            .await
            .contains("Schedule #1")
    );
    h.settle().await;
    assert_eq!(h.count("Missed backup"), 0, "nothing is due yet");
    // No worker runs: 11:00 passes, and the hour of grace after it.
    h.clock.set(at("2026-05-04 12:01"));
    let alert = h.wait_text("Missed backup").await;
    assert!(
        alert.contains(&data) && alert.contains("schedule #1"),
        "{alert}"
    );
    assert!(
        alert.contains("Mon 04 May 12:00 CEST"),
        "the deadline, in the zone: {alert}"
    );
    assert!(alert.contains("no snapshot of it yet"), "{alert}");
    // Said once, however long it stays missed.
    h.clock.set(at("2026-05-04 18:00"));
    h.settle().await;
    assert_eq!(
        h.count("Missed backup"),
        1,
        "{}",
        h.api.transcript_text(USER)
    );
    assert!(h.say("/schedules").await.contains("🟠"));
    // A snapshot arrives (the worker is back): back to normal, once.
    let snap = h.snapshot("data").await;
    let back = h.wait_text("Back to normal").await;
    assert!(back.contains(&snap), "{back}");
    h.settle().await;
    assert_eq!(h.count("Back to normal"), 1);
    assert!(h.say("/schedules").await.contains("🟢"));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_weekly_digest_of_a_user_with_two_schedules() {
    let h = start(at("2026-05-04 10:15")).await;
    let data = h.root.join("data").display().to_string();
    let docs = h.root.join("docs").display().to_string();
    h.say(&format!("/schedule {data} daily 03:00 keep daily 7"))
        .await;
    h.say(&format!("/schedule {docs} weekly wed 04:00")).await;
    // The user is registered for digests from the next Monday on.
    let pool = h.jobs.pool().clone();
    tokio::time::timeout(WAIT, async {
        loop {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM user_settings")
                .fetch_one(&pool)
                .await
                .unwrap();
            if n > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the user is registered for the digest");
    h.clock.set(at("2026-05-06 03:05"));
    h.snapshot("data").await;
    h.clock.set(at("2026-05-06 04:05"));
    h.snapshot("docs").await;
    h.settle().await;
    assert_eq!(h.count("Weekly digest"), 0, "not before Monday 09:00");

    h.clock.set(at("2026-05-11 09:01"));
    let d = h.wait_text("Weekly digest").await;
    assert!(
        d.contains("Mon 04 May 09:00 CEST – Mon 11 May 09:01 CEST"),
        "{d}"
    );
    assert!(d.contains("Snapshots made: 2"), "{d}");
    assert!(d.contains("new data stored:"), "{d}");
    assert!(
        d.contains("Total stored:") && d.contains("in 2 snapshots"),
        "{d}"
    );
    assert!(d.contains("Schedules (2):"), "{d}");
    assert!(d.contains(&format!("#1 {data} · daily 03:00")), "{d}");
    assert!(d.contains(&format!("#2 {docs} · weekly wed 04:00")), "{d}");
    assert!(d.contains("keep daily 7"), "{d}");
    // The daily one has had no snapshot since Wednesday: it shows as late.
    assert!(d.contains("🟠 #1") && d.contains("🟢 #2"), "{d}");
    assert!(d.contains("Last scrub: none yet"), "{d}");
    assert!(d.contains("Storage: no anomalies"), "{d}");
    h.settle().await;
    assert_eq!(h.count("Weekly digest"), 1, "one per week");

    // Opted out: no digest the next Monday.
    assert!(h.say("/digest off").await.contains("off"));
    h.clock.set(at("2026-05-18 09:01"));
    h.settle().await;
    assert_eq!(h.count("📰 Weekly digest, "), 1);
    // It can be read on demand.
    let now = h.say("/digest").await;
    assert!(
        now.contains("Weekly digest") && now.contains("the weekly digest is off"),
        "{now}"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storage_lane_the_canary_found_silent_is_told_to_every_user_once() {
    use storinator_shared::catalog::{LaneProbe, LaneState};
    let h = start(at("2026-05-04 10:15")).await;
    let probe = |lane: &str, state: LaneState, detail: &str| LaneProbe {
        lane: lane.into(),
        state,
        detail: detail.into(),
        copies: 12,
        missing: 0,
    };
    let now = h.clock.now_ms();
    // A first "ok" is no news.
    for lane in ["first", "second"] {
        h.repo
            .catalog
            .record_lane_probe(&probe(lane, LaneState::Ok, ""), now)
            .await
            .unwrap();
    }
    h.settle().await;
    assert_eq!(h.count("Storage lane"), 0);
    // The canary finds lane "second" silent (its account was deleted).
    h.repo
        .catalog
        .record_lane_probe(
            &probe(
                "second",
                LaneState::Silent,
                "telegram refused: USER_DEACTIVATED",
            ),
            now + 1,
        )
        .await
        .unwrap();
    let alert = h.wait_text("Storage lane second stopped answering").await;
    assert!(alert.contains("USER_DEACTIVATED"), "{alert}");
    let other = h
        .api
        .wait_for_bot_text(OTHER, "Storage lane second", WAIT)
        .await;
    assert!(other.is_some(), "every allowed user hears about storage");
    h.settle().await;
    assert_eq!(h.count("Storage lane"), 1, "told once");
    // Back to normal: said once too.
    h.repo
        .catalog
        .record_lane_probe(&probe("second", LaneState::Ok, ""), now + 2)
        .await
        .unwrap();
    h.wait_text("Storage lane second answers again").await;
    h.settle().await;
    assert_eq!(h.count("Storage lane"), 2);
    h.stop().await;
}

/// A schedule's keep policy that failed after its backup (recorded by the worker) is told to
/// the schedule's owner, once, in words that say the backup is safe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_keep_policy_is_told_to_the_owner_once() {
    let h = start(at("2026-05-04 10:15")).await;
    let data = h.root.join("data").display().to_string();
    assert!(
        h.say(&format!("/schedule {data} hourly keep last 2"))
            .await
            .contains("Schedule #1")
    );
    let schedules = storinator_shared::Schedules::new(
        h.jobs.clone(),
        jiff::tz::TimeZone::get("Europe/Berlin").unwrap(),
    );
    schedules
        .record_forget_failure(
            1,
            41,
            "keep last 2: storing forget-ab12.enc failed: disk full",
        )
        .await
        .unwrap();
    let alert = h.wait_text("Keep policy not applied").await;
    assert!(
        alert.contains(&data)
            && alert.contains("schedule #1")
            && alert.contains("storing forget-ab12.enc failed: disk full")
            && alert.contains("job #41")
            && alert.contains("no snapshot was forgotten"),
        "{alert}"
    );
    h.settle().await;
    assert_eq!(h.count("Keep policy not applied"), 1, "told once");
    // The other user hears nothing of it.
    assert!(
        h.api
            .bot_messages(OTHER)
            .iter()
            .all(|m| !m.text.contains("Keep policy")),
        "only the owner is told"
    );
    h.stop().await;
}
