//! The whole chain with Telegram storage: chat → bot → job table → worker daemon → engine →
//! the real grammers client → the loopback MTProto server, and back for a restore; and a
//! `/get` of a file over the Bot API's 50 MB, which the worker's own account sends to its
//! Saved Messages.

mod telegram_support;

use std::sync::Arc;
use std::time::Duration;

use storinator_bot::BotConfig;
use storinator_shared::storage::{ObjectRef, Storage};
use storinator_shared::{Catalog, ChunkerParams, EngineSettings, Jobs, KdfParams, Repo};
use storinator_testkit::botapi::FakeBotApi;
use storinator_testkit::mtproto::LoopbackOptions;
use storinator_worker::daemon::{self, DaemonConfig};
use tokio::sync::oneshot;

const USER: i64 = 7;
const WAIT: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_of_a_60_mb_file_goes_through_the_worker_account() {
    // Message-class calls unthrottled: this test is about the chain, not the rate budget.
    let f = telegram_support::start_with(LoopbackOptions::default(), false, |c| {
        c.message_calls_per_minute = 6000
    })
    .await;
    let api = FakeBotApi::start().await.unwrap();
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
    let big = telegram_support::data(60 << 20, 99);
    std::fs::write(data.join("big.bin"), &big).unwrap();
    let root = root.canonicalize().unwrap();
    let data = root.join("data");

    let db_url = format!("sqlite://{}", dir.path().join("st.db").display());
    let catalog = Catalog::open(&db_url).await.unwrap();
    let telegram = f.storage.clone();
    let storage = Arc::new(f.storage);
    Repo::init(
        &catalog,
        storage.as_ref(),
        "pw",
        KdfParams::fast_for_tests(),
    )
    .await
    .unwrap();
    let settings = EngineSettings {
        pack_size: 16 << 20,
        chunker: ChunkerParams::small(),
        threads: 1,
        ..EngineSettings::default()
    };
    let jobs = Jobs::new(catalog.pool().clone());
    let job_view = jobs.clone();
    let repo = Repo::open(catalog, storage, "pw", settings).await.unwrap();

    let (wtx, wrx) = oneshot::channel::<()>();
    let worker = tokio::spawn(daemon::run(
        Arc::new(repo),
        jobs,
        DaemonConfig {
            worker_id: "tg-worker".into(),
            concurrency: 1,
            poll_interval: Duration::from_millis(50),
            progress_interval: Duration::from_millis(100),
            restore_roots: vec![root.clone()],
            outbox_dir: dir.path().join("outbox"),
            courier: Some(Arc::new(telegram.clone())),
            host: None,
            host_heartbeat: Duration::from_secs(30),
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
        ("DATABASE_URL".into(), db_url.clone()),
        (
            "STORINATOR_DATA_DIR".into(),
            dir.path().display().to_string(),
        ),
        ("STORINATOR_BOT_EDIT_INTERVAL_MS".into(), "100".into()),
        ("STORINATOR_BOT_TICK_MS".into(), "50".into()),
        ("STORINATOR_BOT_POLL_TIMEOUT_S".into(), "1".into()),
    ];
    let cfg = BotConfig::from_lookup(|k| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()))
        .unwrap();
    let (btx, brx) = oneshot::channel::<()>();
    let bot = tokio::spawn(storinator_bot::run(cfg, async move {
        let _ = brx.await;
    }));

    api.push_message(USER, USER, &format!("/backup {}", data.display()));
    let done = api.wait_for_bot_text(USER, "Done: snapshot", WAIT).await;
    assert!(done.is_some(), "{}", api.transcript_text(USER));
    let docs = f.server.documents();
    assert!(!docs.is_empty(), "packs went to the loopback Telegram");
    // The scheduler's estimate was recorded on the job before its transfer.
    let job = job_view.get(1).await.unwrap().unwrap();
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

    // /get of a 60 MB file: over the Bot API's 50 MB, so the worker's account sends it to
    // its Saved Messages after the one-time confirmation, and the bot says so.
    api.push_message(USER, USER, &format!("/get {}/big.bin", data.display()));
    let ask = api
        .wait_for_bot_text(USER, "plaintext copy", WAIT)
        .await
        .expect("the first /get asks for confirmation");
    let yes = ask.button_data()[0].clone();
    assert!(yes.starts_with("cg:") && yes.len() <= 64, "{yes}");
    api.push_callback(USER, USER, ask.message_id, &yes);
    let said = api
        .wait_for_bot_text(USER, "Saved Messages: look there", WAIT)
        .await;
    assert!(said.is_some(), "{}", api.transcript_text(USER));
    let (_, msg_id, _, size) = f
        .server
        .documents()
        .into_iter()
        .find(|(chat, _, name, _)| name == "big.bin" && chat == "saved")
        .unwrap_or_else(|| panic!("big.bin in Saved Messages: {:?}", f.server.documents()));
    assert_eq!(size, big.len() as u64);
    let got = telegram
        .get_range(&ObjectRef::new("big.bin", format!("me:{msg_id}")), 0, size)
        .await
        .unwrap();
    assert!(got == big, "the document holds the file's bytes");
    // Nothing of it was left in the outbox, and the Bot API carried no document.
    assert!(api.calls_of("sendDocument").is_empty());
    let left: Vec<_> = std::fs::read_dir(dir.path().join("outbox"))
        .map(|d| d.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
    println!(
        "{} documents in the storage chat\n{}",
        docs.len(),
        api.transcript_text(USER)
    );

    let _ = wtx.send(());
    worker.await.unwrap().unwrap();
    let _ = btx.send(());
    bot.await.unwrap().unwrap();
}
