//! The storage conformance checks (`shared::storage::conformance`) run against the
//! real grammers client and the loopback Telegram, in Saved Messages and in a channel.

mod telegram_support;

use std::time::Duration;

use storinator_shared::storage::{ObjectRef, Storage};
use storinator_testkit::mtproto::LoopbackOptions;
use telegram_support::*;

use storinator_shared::storage::conformance::run as conformance;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_in_saved_messages() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let f = start(LoopbackOptions::default(), false).await;
        conformance(&f.storage).await;
        assert!(f.server.documents().iter().all(|d| d.0 == "saved"));
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_in_a_channel() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let f = start(LoopbackOptions::default(), true).await;
        conformance(&f.storage).await;
        let docs = f.server.documents();
        assert_eq!(docs.len(), 1);
        assert!(docs[0].0.starts_with("channel:"), "{docs:?}");
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_location_and_big_pack_round_trip() {
    tokio::time::timeout(Duration::from_secs(120), async {
        let f = start(LoopbackOptions::default(), false).await;
        // Over 10 MB: saveBigFilePart, 24 parts, last one partial.
        let bytes = data(12 * 1024 * 1024 + 777, 1);
        let loc = put(&f.storage, "0123456789abcdef0123456789abcdef.enc", &bytes).await;
        assert!(f.server.counters().get("upload.saveBigFilePart") >= 25);
        assert_eq!(f.server.counters().get("upload.saveFilePart"), 0);
        let name = "0123456789abcdef0123456789abcdef.enc";
        assert_eq!(
            get_all(&f.storage, name, &loc, bytes.len() as u64).await,
            bytes
        );
        // A fresh storage (empty cache) with a stale location still finds it by name.
        let cfg_storage = start_again(&f).await;
        let got = cfg_storage
            .get_range(&ObjectRef::new(name, "me:999999"), 5_000_000, 3_000_000)
            .await
            .unwrap();
        assert_eq!(got, &bytes[5_000_000..8_000_000]);
    })
    .await
    .unwrap();
}

async fn start_again(f: &Fixture) -> storinator_worker::telegram::TelegramStorage {
    let session = f.dir.path().join("worker2.session");
    f.server.write_session(&session).unwrap();
    let cfg = storinator_worker::telegram::TelegramConfig::new(
        1,
        "loopback",
        session,
        f.dir.path().join("spool2"),
    );
    storinator_worker::telegram::TelegramStorage::connect(cfg)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parts_are_not_gzipped() {
    tokio::time::timeout(Duration::from_secs(60), async {
        // Zeros compress well, so grammers' default sender would gzip these parts.
        let zeros = vec![0u8; 11 * 1024 * 1024];
        let f = start(LoopbackOptions::default(), false).await;
        let loc = put(&f.storage, "0a.enc", &zeros).await;
        assert_eq!(f.server.counters().get("upload.saveBigFilePart"), 22);
        assert_eq!(f.server.counters().get("gzip:upload.saveBigFilePart"), 0);
        assert_eq!(
            get_all(&f.storage, "0a.enc", &loc, zeros.len() as u64).await,
            zeros
        );
        // The counter does see compression when it happens.
        let g = start_with(LoopbackOptions::default(), false, |c| {
            c.compress_parts = true
        })
        .await;
        put(&g.storage, "0b.enc", &zeros).await;
        assert_eq!(g.server.counters().get("gzip:upload.saveBigFilePart"), 22);
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_not_in_the_session_is_found_in_dialogs() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let f = start(
            LoopbackOptions {
                channels: vec!["first".into(), "backups".into()],
                ..Default::default()
            },
            false,
        )
        .await;
        // A session that knows no channels (as after a real login).
        let session = f.dir.path().join("bare.session");
        f.server.write_session(&session).unwrap();
        let mut json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&session).unwrap()).unwrap();
        json["channels"] = serde_json::json!([]);
        std::fs::write(&session, json.to_string()).unwrap();
        let mut cfg = storinator_worker::telegram::TelegramConfig::new(
            1,
            "x",
            session.clone(),
            f.dir.path().join("spool-d"),
        );
        let want = f.server.channels()[1].id;
        cfg.storage_chat = Some(format!("-100{want}"));
        let s = storinator_worker::telegram::TelegramStorage::connect(cfg.clone())
            .await
            .unwrap();
        assert_eq!(s.describe(), format!("telegram:channel -100{want}"));
        put(&s, "ab.enc", b"x").await;
        assert!(f.server.documents()[0].0.ends_with(&want.to_string()));
        // Remembered: the next start needs no dialog scan.
        let before = f.server.counters().get("messages.getDialogs");
        drop(s);
        storinator_worker::telegram::TelegramStorage::connect(cfg.clone())
            .await
            .unwrap();
        assert_eq!(f.server.counters().get("messages.getDialogs"), before);
        cfg.storage_chat = Some("-1009999".into());
        let e = storinator_worker::telegram::TelegramStorage::connect(cfg)
            .await
            .err()
            .unwrap();
        assert!(e.to_string().contains("STORINATOR_STORAGE_CHAT"), "{e}");
    })
    .await
    .unwrap();
}
