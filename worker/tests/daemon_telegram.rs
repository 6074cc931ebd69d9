//! The whole chain with Telegram storage: chat → bot → job table → worker daemon → engine →
//! the real grammers client → the loopback MTProto server, and back for a restore.

mod telegram_support;

use std::sync::Arc;
use std::time::Duration;

use storinator_bot::BotConfig;
use storinator_shared::{Catalog, ChunkerParams, EngineSettings, Jobs, KdfParams, Repo};
use storinator_testkit::botapi::FakeBotApi;
use storinator_testkit::mtproto::LoopbackOptions;
use storinator_worker::daemon::{self, DaemonConfig};
use tokio::sync::oneshot;

const USER: i64 = 7;
const WAIT: Duration = Duration::from_secs(90);

/// The bot and the worker daemon around a storage, talking through a fake Bot API.
struct Chain {
    api: FakeBotApi,
    jobs: Jobs,
    stop_worker: oneshot::Sender<()>,
    worker: tokio::task::JoinHandle<anyhow::Result<()>>,
    stop_bot: oneshot::Sender<()>,
    bot: tokio::task::JoinHandle<anyhow::Result<()>>,
}

async fn chain(
    storage: storinator_worker::telegram::TelegramStorage,
    root: &std::path::Path,
    dir: &std::path::Path,
    settings: EngineSettings,
) -> Chain {
    let api = FakeBotApi::start().await.unwrap();
    let db_url = format!("sqlite://{}", dir.join("st.db").display());
    let catalog = Catalog::open(&db_url).await.unwrap();
    let storage = Arc::new(storage);
    Repo::init(
        &catalog,
        storage.as_ref(),
        "pw",
        KdfParams::fast_for_tests(),
    )
    .await
    .unwrap();
    let jobs = Jobs::new(catalog.pool().clone());
    let repo = Repo::open(catalog, storage, "pw", settings).await.unwrap();
    let (stop_worker, wrx) = oneshot::channel::<()>();
    let worker = tokio::spawn(daemon::run(
        Arc::new(repo),
        jobs.clone(),
        DaemonConfig {
            worker_id: "tg-worker".into(),
            concurrency: 1,
            poll_interval: Duration::from_millis(50),
            progress_interval: Duration::from_millis(100),
            restore_roots: vec![dir.to_path_buf()],
            ..Default::default()
        },
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
        ("DATABASE_URL".into(), db_url),
        ("STORINATOR_BOT_EDIT_INTERVAL_MS".into(), "100".into()),
        ("STORINATOR_BOT_TICK_MS".into(), "50".into()),
        ("STORINATOR_BOT_POLL_TIMEOUT_S".into(), "1".into()),
    ];
    let cfg = BotConfig::from_lookup(|k| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()))
        .unwrap();
    let (stop_bot, brx) = oneshot::channel::<()>();
    let bot = tokio::spawn(storinator_bot::run(cfg, async move {
        let _ = brx.await;
    }));
    Chain {
        api,
        jobs,
        stop_worker,
        worker,
        stop_bot,
        bot,
    }
}

impl Chain {
    async fn stop(self) {
        let _ = self.stop_worker.send(());
        self.worker.await.unwrap().unwrap();
        let _ = self.stop_bot.send(());
        self.bot.await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_backup_and_restore_through_loopback_telegram() {
    let f = telegram_support::start(LoopbackOptions::default(), false).await;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let data = root.join("data");
    std::fs::create_dir_all(data.join("photos")).unwrap();
    for i in 0..4u64 {
        std::fs::write(
            data.join(format!("photos/p{i}.bin")),
            telegram_support::data(200 * 1024, i),
        )
        .unwrap();
    }
    std::fs::write(data.join("notes.txt"), b"remember the milk\n").unwrap();
    let root = root.canonicalize().unwrap();
    let data = root.join("data");
    let settings = EngineSettings {
        pack_size: 256 * 1024,
        chunker: ChunkerParams::small(),
        threads: 1,
        ..EngineSettings::default()
    };
    let c = chain(f.storage, &root, dir.path(), settings).await;
    let api = &c.api;

    api.push_message(USER, USER, &format!("/backup {}", data.display()));
    let done = api.wait_for_bot_text(USER, "Done: snapshot", WAIT).await;
    assert!(done.is_some(), "{}", api.transcript_text(USER));
    let docs = f.server.documents();
    assert!(!docs.is_empty(), "packs went to the loopback Telegram");
    // The scheduler's estimate was recorded on the job before its transfer.
    let job = c.jobs.get(1).await.unwrap().unwrap();
    let estimate = job
        .estimate
        .expect("backup job carries the scheduler's estimate");
    assert!(
        estimate["message_calls"].as_u64().unwrap() >= 1,
        "{estimate}"
    );
    assert!(estimate["part_calls"].as_u64().unwrap() >= 1, "{estimate}");

    let out = root.join("back");
    api.push_message(
        USER,
        USER,
        &format!("/restore {}/photos to {}", data.display(), out.display()),
    );
    let restored = api.wait_for_bot_text(USER, "Restored", WAIT).await;
    assert!(restored.is_some(), "{}", api.transcript_text(USER));
    for i in 0..4u64 {
        assert_eq!(
            std::fs::read(out.join(format!("photos/p{i}.bin"))).unwrap(),
            telegram_support::data(200 * 1024, i)
        );
    }
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_account_says_so_in_the_progress_message() {
    use storinator_testkit::mtproto::PremiumThrottle;
    // Free-account throttling from the first 512 KiB on, at 512 KiB/s.
    let f = telegram_support::start(
        LoopbackOptions {
            premium_throttle: Some(PremiumThrottle {
                after_bytes: 512 * 1024,
                bytes_per_sec: 512 * 1024,
            }),
            ..Default::default()
        },
        false,
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let data = root.join("data");
    std::fs::create_dir_all(&data).unwrap();
    // Incompressible, so about 2 MiB go to Telegram.
    std::fs::write(data.join("big.bin"), telegram_support::data(2 << 20, 9)).unwrap();
    let root = root.canonicalize().unwrap();
    let data = root.join("data");
    let settings = EngineSettings {
        pack_size: 4 << 20,
        chunker: ChunkerParams::small(),
        threads: 1,
        ..EngineSettings::default()
    };
    let c = chain(f.storage, &root, dir.path(), settings).await;
    let api = &c.api;

    api.push_message(USER, USER, &format!("/backup {}", data.display()));
    let slow = api
        .wait_for_bot_text(USER, "at this rate", WAIT)
        .await
        .unwrap_or_else(|| panic!("{}", api.transcript_text(USER)))
        .text;
    assert!(
        slow.contains("limiting this account's upload speed"),
        "{slow}"
    );
    assert!(
        slow.contains("Measured") && slow.contains("/s · ETA"),
        "{slow}"
    );
    let done = api.wait_for_bot_text(USER, "Done: snapshot", WAIT).await;
    assert!(done.is_some(), "{}", api.transcript_text(USER));
    assert!(!f.server.documents().is_empty());
    c.stop().await;
}
