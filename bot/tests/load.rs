//! The bot under the chat load of issue 16's drill: 4 users send 40 `/backup`s within a few
//! seconds, 20 strangers send 200 messages, and two simulated worker daemons claim, report and
//! finish the jobs through the job table. The fake Bot API enforces Telegram's message rates
//! (five times faster, so the drill takes seconds): the bot must never be refused for going
//! too fast, every user must get every job's final edit and final notice, and every stranger
//! exactly one refusal.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use storinator_bot::BotConfig;
use storinator_shared::{JobResult, Jobs, Phase, ProgressReport};
use storinator_testkit::botapi::{self, FakeBotApi};
use tokio::sync::oneshot;

const USERS: [i64; 4] = [11, 12, 13, 14];
const JOBS_PER_USER: usize = 10;
const STRANGERS: i64 = 20;
const MESSAGES_PER_STRANGER: usize = 10;
const SPEED: u32 = 5;

/// A stand-in for one worker daemon: claims jobs, reports progress three times, finishes.
async fn fake_worker(jobs: Jobs, name: &'static str, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        let Some((job, lease)) = jobs.claim(name).await.unwrap() else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        for step in 1..=3u64 {
            tokio::time::sleep(Duration::from_millis(30)).await;
            let p = ProgressReport {
                phase: Phase::Uploading,
                files_done: step,
                files_total: 3,
                bytes_done: step * 1000,
                bytes_total: 3000,
                bytes_stored: step * 500,
            };
            jobs.report_progress(&lease, &p).await.unwrap();
        }
        let result = JobResult::Backup {
            snapshot: format!("{:08x}", job.id),
            files: 3,
            dirs: 1,
            bytes: 3000,
            bytes_stored: 1500,
            new_chunks: 3,
            warnings: 0,
            duration_ms: 90,
        };
        jobs.finish(&lease, &result).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_final_message_arrives_within_telegram_rates_under_load() {
    let api = FakeBotApi::start_with(botapi::Limits::telegram().faster(SPEED))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("srv");
    for i in 0..USERS.len() * JOBS_PER_USER {
        std::fs::create_dir_all(root.join(format!("f{i}"))).unwrap();
    }
    let root = root.canonicalize().unwrap();
    let db = format!("sqlite://{}", dir.path().join("st.db").display());
    let users: Vec<String> = USERS.iter().map(|u| u.to_string()).collect();
    let vars = [
        (
            "TELOXIDE_TOKEN",
            "110201543:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw".to_string(),
        ),
        ("TELOXIDE_API_URL", api.url()),
        ("STORINATOR_ALLOWED_USERS", users.join(",")),
        ("STORINATOR_BACKUP_ROOTS", root.display().to_string()),
        ("DATABASE_URL", db.clone()),
        ("STORINATOR_BOT_EDIT_INTERVAL_MS", "600".into()),
        ("STORINATOR_BOT_TICK_MS", "25".into()),
        ("STORINATOR_BOT_POLL_TIMEOUT_S", "1".into()),
    ];
    let mut cfg =
        BotConfig::from_lookup(|k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone()))
            .unwrap();
    cfg.limits = storinator_bot::Limits::telegram().faster(SPEED);
    let pool = storinator_bot::db::open(&db).await.unwrap();
    let jobs = Jobs::new(pool);
    let (stop_bot, stopped) = oneshot::channel::<()>();
    let bot = tokio::spawn(storinator_bot::run(cfg, async move {
        let _ = stopped.await;
    }));
    api.wait_for(Duration::from_secs(10), |a| {
        (!a.calls_of("getUpdates").is_empty()).then_some(())
    })
    .await
    .expect("bot starts polling");

    let stop = Arc::new(AtomicBool::new(false));
    let workers = [
        tokio::spawn(fake_worker(jobs.clone(), "daemon-a", stop.clone())),
        tokio::spawn(fake_worker(jobs.clone(), "daemon-b", stop.clone())),
    ];

    // The load: users and strangers interleaved, all within a moment.
    let mut folder = 0;
    for round in 0..JOBS_PER_USER.max(MESSAGES_PER_STRANGER) {
        if round < JOBS_PER_USER {
            for u in USERS {
                api.push_message(u, u, &format!("/backup {}/f{folder}", root.display()));
                folder += 1;
            }
        }
        if round < MESSAGES_PER_STRANGER {
            for s in 0..STRANGERS {
                api.push_message(1000 + s, 1000 + s, "/backup /etc");
            }
        }
    }

    let total = USERS.len() * JOBS_PER_USER;
    let all_notified = api
        .wait_for(Duration::from_secs(90), |a| {
            let n: usize = USERS
                .iter()
                .map(|u| {
                    a.bot_messages(*u)
                        .iter()
                        .filter(|m| m.text.starts_with("✅ Backup #") && m.text.contains(" done: "))
                        .map(|m| m.text.clone())
                        .collect::<HashSet<_>>()
                        .len()
                })
                .sum();
            (n == total).then_some(())
        })
        .await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    assert!(
        all_notified.is_some(),
        "not every final notice arrived:\n{}",
        api.transcript_text(USERS[0])
    );

    for u in USERS {
        let msgs = api.bot_messages(u);
        let finals: Vec<String> = msgs
            .iter()
            .filter(|m| m.text.starts_with("✅ Backup #") && m.text.contains(" done: "))
            .map(|m| m.text.clone())
            .collect();
        let distinct: HashSet<&String> = finals.iter().collect();
        assert_eq!(distinct.len(), JOBS_PER_USER, "{}", api.transcript_text(u));
        assert_eq!(
            finals.len(),
            JOBS_PER_USER,
            "a notice came twice:\n{}",
            api.transcript_text(u)
        );
        // Every progress message ends in its final edit.
        let edited_to_final = msgs
            .iter()
            .filter(|m| m.text.contains("\nDone: snapshot "))
            .count();
        assert_eq!(edited_to_final, JOBS_PER_USER, "{}", api.transcript_text(u));
    }
    for s in 0..STRANGERS {
        let refusals = api.bot_messages(1000 + s);
        assert_eq!(refusals.len(), 1, "{}", api.transcript_text(1000 + s));
        assert!(refusals[0].text.contains("not allowed"));
    }
    let refused = api.rate_limited();
    assert!(
        refused.is_empty(),
        "the bot went over Telegram's rates {} times: {:?}",
        refused.len(),
        refused
            .iter()
            .map(|c| &c.params)
            .take(3)
            .collect::<Vec<_>>()
    );
    // Independently of the fake's verdict: no user chat received more than its burst plus
    // one message per interval over the span it was busy.
    let interval = Duration::from_secs(1) / SPEED;
    for u in USERS {
        let sent: Vec<_> = api
            .calls()
            .into_iter()
            .filter(|c| c.fault.is_none() && c.params["chat_id"] == u)
            .filter(|c| ["sendMessage", "editMessageText"].contains(&c.method.as_str()))
            .collect();
        let span = sent.last().unwrap().at - sent[0].at;
        let allowed = 3 + (span.as_secs_f64() / interval.as_secs_f64()).floor() as usize;
        assert!(
            sent.len() <= allowed,
            "chat {u}: {} messages in {span:?}",
            sent.len()
        );
    }
    stop_bot.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), bot)
        .await
        .expect("bot stops")
        .unwrap()
        .unwrap();
}
