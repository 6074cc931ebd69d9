//! The whole unattended chain with Telegram storage: `/schedule` in the chat → the real bot
//! stores the schedule → the real worker daemon fires it when its slot comes (a manual clock
//! shared by both moves to the slot; nobody types anything) → the engine stores the snapshot
//! through the real grammers client in the loopback MTProto server → `/schedules` shows it.

mod telegram_support;

use std::sync::Arc;
use std::time::Duration;

use jiff::tz::TimeZone;
use storinator_bot::BotConfig;
use storinator_shared::ops::rules::FireRules;
use storinator_shared::{
    Catalog, ChunkerParams, EngineSettings, Jobs, KdfParams, ManualClock, Repo, Schedules,
};
use storinator_testkit::botapi::FakeBotApi;
use storinator_testkit::mtproto::LoopbackOptions;
use storinator_worker::daemon::{self, DaemonConfig, Unattended};
use tokio::sync::oneshot;

const USER: i64 = 7;
const WAIT: Duration = Duration::from_secs(90);

fn at(s: &str) -> i64 {
    let dt: jiff::civil::DateTime = s.parse().unwrap();
    dt.to_zoned(TimeZone::get("Europe/Berlin").unwrap())
        .unwrap()
        .timestamp()
        .as_millisecond()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedule_made_in_chat_backs_up_by_itself_through_loopback_telegram() {
    let f = telegram_support::start(LoopbackOptions::default(), false).await;
    let api = FakeBotApi::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let data = root.join("data");
    std::fs::create_dir_all(data.join("photos")).unwrap();
    for i in 0..3u64 {
        std::fs::write(
            data.join(format!("photos/p{i}.bin")),
            telegram_support::data(150 * 1024, i),
        )
        .unwrap();
    }
    std::fs::write(data.join("notes.txt"), b"remember the milk\n").unwrap();
    let root = root.canonicalize().unwrap();
    let data = root.join("data");

    let db_url = format!("sqlite://{}", dir.path().join("st.db").display());
    let catalog = Catalog::open(&db_url).await.unwrap();
    let storage = Arc::new(f.storage);
    Repo::init(
        &catalog,
        storage.as_ref(),
        "pw",
        KdfParams::fast_for_tests(),
    )
    .await
    .unwrap();
    let clock = ManualClock::new(at("2026-05-04 10:15"));
    let jobs = Jobs::new(catalog.pool().clone()).with_clock(Arc::new(clock.clone()));
    let tz = TimeZone::get("Europe/Berlin").unwrap();
    let settings = EngineSettings {
        pack_size: 256 * 1024,
        chunker: ChunkerParams::small(),
        threads: 1,
        ..EngineSettings::default()
    };
    let repo = Repo::open(catalog.clone(), storage, "pw", settings)
        .await
        .unwrap();
    let unattended = Unattended {
        schedules: Schedules::new(jobs.clone(), tz.clone()),
        rules: FireRules {
            backup_roots: vec![root.clone()],
            allowed_users: vec![USER],
            jitter_ms: 0,
            host: None,
        },
        tick: Duration::from_millis(50),
        healthcheck: None,
        scrub_at: None,
        scrub_bytes: 1 << 30,
        canary: false,
    };
    let (wtx, wrx) = oneshot::channel::<()>();
    let worker = tokio::spawn(daemon::run_with(
        Arc::new(repo),
        jobs.clone(),
        DaemonConfig {
            worker_id: "tg-worker".into(),
            concurrency: 1,
            poll_interval: Duration::from_millis(50),
            progress_interval: Duration::from_millis(100),
            restore_roots: Vec::new(),
            ..Default::default()
        },
        Some(unattended),
        async move {
            let _ = wrx.await;
        },
    ));

    let vars = [
        (
            "TELOXIDE_TOKEN".to_string(),
            "110201543:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw".to_string(),
        ),
        ("TELOXIDE_API_URL".into(), api.url()),
        ("STORINATOR_ALLOWED_USERS".into(), USER.to_string()),
        ("STORINATOR_BACKUP_ROOTS".into(), root.display().to_string()),
        ("DATABASE_URL".into(), db_url.clone()),
        ("STORINATOR_BOT_TICK_MS".into(), "50".into()),
        ("STORINATOR_BOT_POLL_TIMEOUT_S".into(), "1".into()),
        ("STORINATOR_TIMEZONE".into(), "Europe/Berlin".into()),
    ];
    let cfg = BotConfig::from_lookup(|k| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()))
        .unwrap();
    let (btx, brx) = oneshot::channel::<()>();
    let bot = tokio::spawn(storinator_bot::run_with(cfg, jobs.clone(), async move {
        let _ = brx.await;
    }));

    api.push_message(USER, USER, &format!("/schedule {} hourly", data.display()));
    let made = api.wait_for_bot_text(USER, "Schedule #1", WAIT).await;
    assert!(made.is_some(), "{}", api.transcript_text(USER));
    // Only the wrapped key is in the storage chat before the slot.
    let before_slot = f.server.documents().len();
    assert_eq!(before_slot, 1, "nothing stored before the slot");

    // The slot comes. Nobody types anything.
    clock.set(at("2026-05-04 11:00"));
    let pool = catalog.pool().clone();
    let snapshot: String = tokio::time::timeout(WAIT, async {
        loop {
            let s: Option<String> = sqlx::query_scalar("SELECT short_id FROM snapshots LIMIT 1")
                .fetch_optional(&pool)
                .await
                .unwrap();
            if let Some(s) = s {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the scheduled backup made a snapshot");
    assert!(
        f.server.documents().len() > before_slot,
        "packs went to the loopback Telegram"
    );
    let job = jobs.get(1).await.unwrap().unwrap();
    assert_eq!(job.schedule_id, Some(1));

    // `/schedules` shows the snapshot the schedule made.
    let before = api.bot_messages(USER).len();
    api.push_message(USER, USER, "/schedules");
    let list = api
        .wait_for(WAIT, |a| {
            a.bot_messages(USER).get(before..).and_then(|m| {
                m.iter()
                    .find(|m| m.text.contains("Your schedules"))
                    .cloned()
            })
        })
        .await
        .expect("a reply to /schedules")
        .text;
    assert!(
        list.contains(&format!("last snapshot {snapshot}")),
        "{list}"
    );
    assert!(list.contains("last run done"), "{list}");
    assert!(list.contains("next Mon 04 May 12:00 CEST"), "{list}");
    // A successful scheduled backup is quiet: no per-run message.
    assert!(
        api.wait_for_bot_text(USER, "Done: snapshot", Duration::from_millis(300))
            .await
            .is_none(),
        "{}",
        api.transcript_text(USER)
    );
    println!("{}", api.transcript_text(USER));

    let _ = wtx.send(());
    worker.await.unwrap().unwrap();
    let _ = btx.send(());
    bot.await.unwrap().unwrap();
}
