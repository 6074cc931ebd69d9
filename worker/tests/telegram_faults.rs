//! The backend under Telegram's failure modes, injected by the loopback server: uploads and
//! range reads must still come back byte-identical, and data problems must not be masked.

mod telegram_support;

use std::time::Duration;

use storinator_shared::error::StorageError;
use storinator_shared::storage::{ObjectRef, Storage};
use storinator_testkit::mtproto::{Fault, LoopbackOptions};
use telegram_support::*;

const PACK: &str = "00112233445566778899aabbccddeeff.enc";

async fn bounded<F: std::future::Future<Output = ()>>(secs: u64, f: F) {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .expect("test took too long");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flood_waits_pause_and_retry_without_failing() {
    bounded(60, async {
        // One attempt per call: a flood wait is not a failed attempt, so no budget runs out.
        let f = start_with(LoopbackOptions::default(), false, |c| c.max_attempts = 1).await;
        let faults = f.server.faults();
        faults.on_calls("messages.sendMedia", 1, 2, Fault::flood_wait(1));
        faults.on_call("upload.saveFilePart", 2, Fault::flood_premium_wait(1));
        faults.on_call("upload.getFile", 1, Fault::flood_wait(1));
        let bytes = data(3 * 1024 * 1024 + 5, 2);
        let loc = put(&f.storage, PACK, &bytes).await;
        assert_eq!(
            get_all(&f.storage, PACK, &loc, bytes.len() as u64).await,
            bytes
        );
        let c = f.server.counters();
        assert_eq!(c.get("messages.sendMedia"), 3, "two refused, one accepted");
        assert_eq!(f.server.documents().len(), 1);
        assert_eq!(faults.fired().len(), 4, "{:?}", faults.fired());
        let stats = f.storage.scheduler().stats();
        assert_eq!(stats.flood_waits, 4, "{stats:?}");
        assert_eq!(stats.flood_wait_seconds, 4, "{stats:?}");
        assert_eq!(stats.retries, 0, "flood waits are not retries: {stats:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_connections_are_resumed() {
    bounded(60, async {
        let f = start(LoopbackOptions::default(), false).await;
        let faults = f.server.faults();
        faults.on_call("upload.saveBigFilePart", 3, Fault::DropConnection);
        faults.on_call("messages.sendMedia", 1, Fault::DropConnection);
        faults.on_call("upload.getFile", 2, Fault::DropConnection);
        let bytes = data(11 * 1024 * 1024, 3);
        let loc = put(&f.storage, PACK, &bytes).await;
        assert_eq!(
            get_all(&f.storage, PACK, &loc, bytes.len() as u64).await,
            bytes
        );
        // Each drop happened, and each cost exactly one retry of the call it hit.
        let fired: Vec<String> = faults.fired().into_iter().map(|x| x.method).collect();
        assert_eq!(
            fired,
            [
                "upload.saveBigFilePart",
                "messages.sendMedia",
                "upload.getFile"
            ]
        );
        let stats = f.storage.scheduler().stats();
        assert!(stats.retries >= 3, "{stats:?}");
        assert!(
            stats.reconnects >= 1,
            "the part connection was reopened: {stats:?}"
        );
        let c = f.server.counters();
        assert_eq!(
            c.get("messages.sendMedia"),
            2,
            "the dropped send went again"
        );
        // Parts are pipelined: every part the server had taken on the dropped connection and
        // not answered went again (at least the one the drop hit, at most a connection's load).
        let sent = c.get("upload.saveBigFilePart");
        assert!(
            (22 + 1..=22 + stats.peak_parts_per_connection).contains(&sent),
            "parts lost with the connection went again, and only those: {sent} calls ({stats:?})"
        );
        assert_eq!(f.server.documents().len(), 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_calls_time_out_and_are_retried() {
    bounded(60, async {
        // A short timeout keeps the test quick; a busy machine may time out a healthy call
        // too, so there is room for extra attempts.
        let f = start_with(LoopbackOptions::default(), false, |c| {
            c.request_timeout = Duration::from_millis(1000);
            c.max_attempts = 20;
        })
        .await;
        let faults = f.server.faults();
        faults.on_call("upload.saveFilePart", 1, Fault::Hang);
        faults.on_call("messages.sendMedia", 1, Fault::Hang);
        faults.on_call("upload.getFile", 1, Fault::Hang);
        let bytes = data(2 * 1024 * 1024, 4);
        let loc = put(&f.storage, PACK, &bytes).await;
        assert_eq!(
            get_all(&f.storage, PACK, &loc, bytes.len() as u64).await,
            bytes
        );
        assert_eq!(f.server.documents().len(), 1);
        // The three hung calls fired, and each ended in a timeout and a retry.
        assert_eq!(faults.fired().len(), 3, "{:?}", faults.fired());
        let stats = f.storage.scheduler().stats();
        assert!(stats.retries >= 3, "{stats:?}");
        let c = f.server.counters();
        assert!(c.get("messages.sendMedia") >= 2, "the hung send went again");
        assert!(
            c.get("upload.saveFilePart") >= 5,
            "4 parts + the hung one again"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_parts_restart_the_pack() {
    bounded(60, async {
        let opts = LoopbackOptions {
            part_ttl: Duration::from_millis(1500),
            ..Default::default()
        };
        let f = start(opts, false).await;
        // The first send is held until the parts have really expired on the server.
        f.server.faults().on_call(
            "messages.sendMedia",
            1,
            Fault::Delay(Duration::from_millis(2500)),
        );
        let bytes = data(11 * 1024 * 1024 + 100, 5);
        let loc = put(&f.storage, PACK, &bytes).await;
        assert_eq!(
            get_all(&f.storage, PACK, &loc, bytes.len() as u64).await,
            bytes
        );
        assert_eq!(f.server.faults().fired().len(), 1);
        assert_eq!(f.server.counters().get("messages.sendMedia"), 2);
        assert_eq!(f.server.counters().get("upload.saveBigFilePart"), 2 * 23);
        assert_eq!(f.storage.scheduler().stats().upload_restarts, 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_file_reference_refetches_the_message() {
    bounded(60, async {
        let f = start(LoopbackOptions::default(), true).await;
        let bytes = data(1_500_000, 6);
        let loc = put(&f.storage, PACK, &bytes).await;
        f.server.expire_file_references();
        let got = f
            .storage
            .get_range(&ObjectRef::new(PACK, loc.as_str()), 700_000, 600_000)
            .await
            .unwrap();
        assert_eq!(got, &bytes[700_000..1_300_000]);
        assert_eq!(f.server.counters().get("channels.getMessages"), 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_download_is_returned_as_is() {
    bounded(60, async {
        let f = start(LoopbackOptions::default(), false).await;
        let bytes = data(100_000, 7);
        let loc = put(&f.storage, PACK, &bytes).await;
        f.server
            .faults()
            .on_call("upload.getFile", 1, Fault::CorruptDownload);
        let bad = get_all(&f.storage, PACK, &loc, bytes.len() as u64).await;
        assert_eq!(f.server.faults().fired_on("upload.getFile"), 1);
        assert_eq!(bad.len(), bytes.len());
        assert_ne!(
            bad, bytes,
            "the backend must not hide corruption (the MAC check does)"
        );
        assert_eq!(
            get_all(&f.storage, PACK, &loc, bytes.len() as u64).await,
            bytes
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_deleted_behind_our_back_is_not_found() {
    bounded(60, async {
        let f = start(LoopbackOptions::default(), false).await;
        let bytes = data(50_000, 8);
        let loc = put(&f.storage, PACK, &bytes).await;
        put(&f.storage, "key-00.enc", b"wrapped").await;
        assert!(f.server.delete_document_named(PACK));
        let err = f
            .storage
            .get_range(&ObjectRef::new(PACK, loc.as_str()), 0, 10)
            .await
            .unwrap_err();
        assert!(matches!(err, StorageError::NotFound { .. }), "{err:?}");
        let names: Vec<_> = f
            .storage
            .list()
            .await
            .unwrap()
            .into_iter()
            .map(|o| o.name)
            .collect();
        assert_eq!(names, vec!["key-00.enc".to_string()]);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resent_pack_after_a_crash_is_not_duplicated() {
    bounded(60, async {
        let f = start(LoopbackOptions::default(), false).await;
        let bytes = data(200_000, 9);
        let loc = put(&f.storage, PACK, &bytes).await;
        // A second worker process (fresh cache) uploads the same pack again, as after a crash
        // between the send and the catalog commit: same random_id, so no second message.
        let session = f.dir.path().join("again.session");
        f.server.write_session(&session).unwrap();
        let cfg = storinator_worker::telegram::TelegramConfig::new(
            1,
            "loopback",
            session,
            f.dir.path().join("spool-again"),
        );
        let again = storinator_worker::telegram::TelegramStorage::connect(cfg)
            .await
            .unwrap();
        let loc2 = put(&again, PACK, &bytes).await;
        assert_eq!(loc, loc2);
        assert_eq!(f.server.documents().len(), 1);
        assert_eq!(f.server.counters().get("messages.sendMedia"), 2);
        // After a delete the name can be stored again.
        again
            .remove(&ObjectRef::new(PACK, loc2.as_str()))
            .await
            .unwrap();
        let loc3 = put(&again, PACK, &bytes).await;
        assert_ne!(loc3, loc);
        assert_eq!(
            get_all(&again, PACK, &loc3, bytes.len() as u64).await,
            bytes
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_calls_grow_with_packs_not_bytes() {
    bounded(60, async {
        let f = start(LoopbackOptions::default(), false).await;
        let n = 12;
        for i in 0..n {
            put(
                &f.storage,
                &format!("{i:032x}.enc"),
                &data(300_000 + i * 1000, i as u64),
            )
            .await;
        }
        let c = f.server.counters();
        assert_eq!(c.get("messages.sendMedia"), n as u64);
        assert_eq!(c.message_class_calls(), n as u64, "{:?}", c.snapshot());
        let e = f.storage.estimate(12 * 300_000, n as u64);
        assert_eq!(e.message_calls, n as u64);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_rate_limit_answers_flood_wait_and_uploads_complete() {
    bounded(60, async {
        // Ten sends at once against a budget of four per two seconds: the server must refuse
        // some however slow the machine is (all ten are under way well within the window).
        let opts = LoopbackOptions {
            message_rate: Some((4, Duration::from_secs(2))),
            ..Default::default()
        };
        let f = std::sync::Arc::new(start(opts, false).await);
        let mut puts = tokio::task::JoinSet::new();
        for i in 0..10u64 {
            let f = f.clone();
            puts.spawn(async move {
                put(&f.storage, &format!("{i:032x}.enc"), &data(10_000, i)).await;
            });
        }
        while let Some(r) = puts.join_next().await {
            r.unwrap();
        }
        assert_eq!(f.server.documents().len(), 10);
        let stats = f.storage.scheduler().stats();
        assert!(stats.flood_waits >= 1, "{stats:?}");
        let sends = f.server.counters().get("messages.sendMedia");
        assert_eq!(
            sends,
            10 + stats.flood_waits,
            "every refused send was waited out and sent again"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_drops_and_floods_still_round_trip() {
    bounded(120, async {
        let f = start_with(LoopbackOptions::default(), true, |c| {
            c.request_timeout = Duration::from_secs(2);
            c.max_attempts = 20;
        })
        .await;
        let faults = f.server.faults();
        faults.with_probability("*", 0.03, 6, Fault::DropConnection);
        faults.with_probability("upload.saveBigFilePart", 0.05, 3, Fault::flood_wait(1));
        faults.with_probability("upload.getFile", 0.05, 3, Fault::Hang);
        let mut packs = Vec::new();
        for i in 0..3u64 {
            let name = format!("{i:032x}.enc");
            let bytes = data(10 * 1024 * 1024 + 4096 * i as usize + 1, 50 + i);
            let loc = put(&f.storage, &name, &bytes).await;
            packs.push((name, loc, bytes));
        }
        for (name, loc, bytes) in &packs {
            let got = f
                .storage
                .get_range(
                    &ObjectRef::new(name.as_str(), loc.as_str()),
                    1000,
                    bytes.len() as u64 - 2000,
                )
                .await
                .unwrap();
            assert!(got == bytes[1000..bytes.len() - 1000], "{name} differs");
        }
        assert_eq!(f.server.documents().len(), 3);
        let stats = f.storage.scheduler().stats();
        let fired = faults.fired();
        assert!(!fired.is_empty(), "no fault fired");
        let floods = fired
            .iter()
            .filter(|x| matches!(x.fault, Fault::RpcError { .. }))
            .count() as u64;
        // A refusal's answer can be lost with its connection (several parts share one, and
        // connections close on drops, hangs and cuts of the window): its part is then sent
        // again like a dropped one. So every fault was either waited out or retried.
        assert!(stats.flood_waits <= floods, "{stats:?} {fired:?}");
        assert!(
            stats.retries >= fired.len() as u64 - stats.flood_waits,
            "every drop, hang and unanswered refusal was retried: {stats:?} {fired:?}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewriting_a_name_replaces_the_object() {
    bounded(60, async {
        let f = start(LoopbackOptions::default(), false).await;
        f.storage
            .put_bytes("key-1.enc", b"wrapped-v1".to_vec())
            .await
            .unwrap();
        // Same name, new bytes (a passphrase change re-wraps the key).
        let loc = f
            .storage
            .put_bytes("key-1.enc", b"wrapped-v2!".to_vec())
            .await
            .unwrap();
        let got = f
            .storage
            .get_range(&ObjectRef::new("key-1.enc", ""), 0, 11)
            .await
            .unwrap();
        assert_eq!(got, b"wrapped-v2!");
        let listed = f.storage.list().await.unwrap();
        assert_eq!(listed.len(), 1, "{listed:?}");
        assert_eq!(listed[0].location, loc);
        // Putting the same bytes again stores nothing new; a third version still replaces.
        let again = f
            .storage
            .put_bytes("key-1.enc", b"wrapped-v2!".to_vec())
            .await
            .unwrap();
        assert_eq!(again, loc);
        f.storage
            .put_bytes("key-1.enc", b"wrapped-v3".to_vec())
            .await
            .unwrap();
        let got = f
            .storage
            .get_range(&ObjectRef::new("key-1.enc", ""), 0, 10)
            .await
            .unwrap();
        assert_eq!(got, b"wrapped-v3");
        assert_eq!(f.server.documents().len(), 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_dropped_while_idle_are_reopened() {
    bounded(60, async {
        let f = start(LoopbackOptions::default(), false).await;
        let bytes = data(11 * 1024 * 1024, 12);
        let loc = put(&f.storage, PACK, &bytes).await;
        // Both the client's pool connection and the idle part connections go away.
        f.server.drop_connections();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            get_all(&f.storage, PACK, &loc, bytes.len() as u64).await,
            bytes
        );
        f.server.drop_connections();
        tokio::time::sleep(Duration::from_millis(100)).await;
        put(&f.storage, "key-9.enc", &data(12 * 1024 * 1024, 13)).await;
        assert_eq!(f.server.documents().len(), 2);
    })
    .await;
}
