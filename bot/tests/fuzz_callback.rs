//! The bot's inputs under fuzz. Callback data (the Overwrite / Keep buttons) is parsed inline in
//! the bot's callback handler, with no parser of its own to call, so it is fuzzed end to end:
//! generated and mutated `callback_data` (1 to 64 bytes, as Telegram allows) is pressed through
//! the fake Bot API at the real dispatcher, which must answer every press and never enqueue a
//! job for data that is not a valid answer of the presser's own restore. The command argument
//! parsers, which are reachable, are fuzzed directly with millions of inputs.
//!
//! Long runs (see `storinator_testkit::fuzz`):
//!
//! ```sh
//! STORINATOR_FUZZ_ITERS=1000000 cargo test --release -p storinator-bot --test fuzz_callback fuzz_command_arguments -- --nocapture
//! STORINATOR_FUZZ_CALLBACKS=20000 cargo test --release -p storinator-bot --test fuzz_callback fuzz_callback_data -- --nocapture
//! ```

use std::time::Duration;

use arbitrary::{Arbitrary, Unstructured};
use storinator_bot::{BotConfig, args};
use storinator_shared::{JobArgs, JobResult, Jobs};
use storinator_testkit::botapi::FakeBotApi;
use storinator_testkit::fuzz::{Meter, Rng, SLACK, check, fuzz, mutate};

#[global_allocator]
static GLOBAL: Meter = Meter;

const USER: i64 = 7;
const STRANGER_JOB_OWNER: i64 = 8;

#[test]
fn fuzz_command_arguments() {
    let ran = fuzz("command arguments", |rng, raw| {
        let u = &mut Unstructured::new(raw);
        let path = String::arbitrary(u).unwrap_or_default();
        let valid = [
            format!("/srv/{path}"),
            format!("/srv/{path} to /restore/x snapshot ab12"),
            format!("\"/srv/{path} to x\" snapshot 0f"),
            format!("/srv/{path} unencrypted"),
            "#12".to_string(),
        ];
        let base = valid[rng.below(valid.len())].clone().into_bytes();
        let m = mutate(rng, base.clone(), &base);
        let s = String::from_utf8_lossy(&m).into_owned();
        let bound = 8 * s.len() + SLACK;
        check("parse_restore", &m, bound, || args::parse_restore(&s))?;
        check("parse_backup", &m, bound, || args::parse_backup(&s))?;
        check("parse_job_id", &m, bound, || args::parse_job_id(&s))?;
        if let Some(p) = check("normalize_restore_path", &m, bound, || {
            args::normalize_restore_path(&s)
        })? && p.split('/').any(|c| c == ".." || c == ".")
        {
            return Err(format!("normalised {s:?} to {p:?}"));
        }
        Ok(())
    });
    assert!(ran > 0);
}

fn callbacks() -> usize {
    std::env::var("STORINATOR_FUZZ_CALLBACKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(150)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fuzz_callback_data() {
    let api = FakeBotApi::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("bot.db");
    let root = dir.path().display().to_string();
    let vars = [
        (
            "TELOXIDE_TOKEN",
            "110201543:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw".to_string(),
        ),
        ("TELOXIDE_API_URL", api.url()),
        (
            "STORINATOR_ALLOWED_USERS",
            format!("{USER},{STRANGER_JOB_OWNER}"),
        ),
        ("STORINATOR_BACKUP_ROOTS", root.clone()),
        ("DATABASE_URL", format!("sqlite://{}", db.display())),
        ("STORINATOR_BOT_POLL_TIMEOUT_S", "1".into()),
        ("STORINATOR_BOT_TICK_MS", "50".into()),
    ];
    let cfg =
        BotConfig::from_lookup(|k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone()))
            .unwrap();
    // A restore of another user's waiting for an answer: the one real target of a button.
    let pool = storinator_bot::db::open(&cfg.database_url).await.unwrap();
    let jobs = Jobs::new(pool.clone());
    let theirs = jobs
        .enqueue(
            STRANGER_JOB_OWNER,
            STRANGER_JOB_OWNER,
            &JobArgs::Restore {
                path: format!("{root}/x"),
                to: None,
                snapshot: None,
                overwrite: false,
            },
        )
        .await
        .unwrap();
    let (lease_job, lease) = jobs.claim("fuzz").await.unwrap().unwrap();
    assert_eq!(lease_job.id, theirs.id);
    let result = JobResult::Conflicts {
        count: 1,
        sample: vec!["x".into()],
        snapshot: None,
    };
    jobs.fail(&lease, "conflicts", Some(&result), false)
        .await
        .unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let bot = tokio::spawn(storinator_bot::run(cfg, async move {
        let _ = stop_rx.await;
    }));

    let n = callbacks();
    let mut rng = Rng(u64::from_le_bytes(*b"callback") ^ std::process::id() as u64);
    let mut pressed = 0usize;
    while pressed < n {
        let batch = (n - pressed).min(50);
        for _ in 0..batch {
            let valid = [
                format!("ow:{}", theirs.id),
                format!("keep:{}", theirs.id),
                "ow:1".to_string(),
                format!("keep:{}", i64::MAX),
            ];
            let base = valid[rng.below(valid.len())].clone().into_bytes();
            let mut m = mutate(&mut rng, base.clone(), &base);
            m.truncate(64);
            let mut data = String::from_utf8_lossy(&m).into_owned();
            while data.len() > 64 {
                data.pop();
            }
            if data.is_empty() {
                data.push('x');
            }
            api.push_callback(USER, USER, 1, &data);
        }
        pressed += batch;
        let answered = api
            .wait_for(Duration::from_secs(30), |a| {
                (a.calls_of("answerCallbackQuery").len() >= pressed).then_some(())
            })
            .await;
        assert!(
            answered.is_some(),
            "{} of {pressed} presses answered",
            api.calls_of("answerCallbackQuery").len()
        );
        assert!(!bot.is_finished(), "the bot stopped");
    }
    // Another user's restore can't be answered, and nothing else is a job.
    let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM jobs")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(count, 1, "a press enqueued a job");
    let _ = stop_tx.send(());
    bot.await.unwrap().unwrap();
    eprintln!("fuzz callback data: {pressed} presses, every one answered");
}
