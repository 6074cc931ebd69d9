//! The loopback Telegram with a data dir survives a restart: the session written before still
//! works and stored packs are still there (what the demo relies on).

mod telegram_support;

use std::time::Duration;

use storinator_shared::storage::{ObjectRef, Storage};
use storinator_testkit::mtproto::{LoopbackOptions, LoopbackTelegram};
use storinator_worker::telegram::{TelegramConfig, TelegramStorage};
use telegram_support::data;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_sessions_and_documents() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let dir = tempfile::tempdir().unwrap();
        let opts = LoopbackOptions {
            data_dir: Some(dir.path().join("server")),
            ..Default::default()
        };
        let server = LoopbackTelegram::start(opts.clone()).await.unwrap();
        let port = server.addr().port();
        let session = dir.path().join("tg.session");
        server.write_session(&session).unwrap();
        let mut cfg = TelegramConfig::new(1, "x", session, dir.path().join("spool"));
        cfg.storage_chat = Some(format!("-100{}", server.channels()[0].id));
        let bytes = data(700_000, 11);
        let loc = {
            let storage = TelegramStorage::connect(cfg.clone()).await.unwrap();
            let p = storage.spool_dir().join("p");
            std::fs::write(&p, &bytes).unwrap();
            storage.put_file("abcdef.enc", &p).await.unwrap()
        };
        server.shutdown().await;

        let server = LoopbackTelegram::start(LoopbackOptions { port, ..opts })
            .await
            .unwrap();
        let storage = TelegramStorage::connect(cfg).await.unwrap();
        let got = storage
            .get_range(&ObjectRef::new("abcdef.enc", loc), 0, bytes.len() as u64)
            .await
            .unwrap();
        assert_eq!(got, bytes);
        assert_eq!(storage.list().await.unwrap().len(), 1);
        drop(server);
    })
    .await
    .unwrap();
}
