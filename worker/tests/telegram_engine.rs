//! The engine's backup and restore through the real grammers client against the loopback
//! Telegram: Saved Messages and a channel, under injected faults, and the API-call budget of a
//! many-small-files tree.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use storinator_shared::{
    BackupOptions, CancelFlag, Catalog, ChunkerParams, EngineSettings, Error, KdfParams,
    NoProgress, Repo, RestoreOptions, Storage,
};
use storinator_testkit::fixtures::{bytes, describe_tree, make_tree, temp_files};
use storinator_testkit::mtproto::{Fault, LoopbackOptions, LoopbackTelegram};
use storinator_worker::telegram::{TelegramConfig, TelegramStorage};

const PASS: &str = "loopback passphrase";

struct Env {
    server: LoopbackTelegram,
    repo: Repo,
    /// The same storage as the repo's, for its scheduler's statistics.
    tg: Arc<TelegramStorage>,
    dir: tempfile::TempDir,
}

async fn connect(server: &LoopbackTelegram, dir: &Path, channel: bool) -> Arc<TelegramStorage> {
    let session = dir.join("worker.session");
    server.write_session(&session).unwrap();
    let mut cfg = TelegramConfig::new(1, "loopback", session, dir.join("spool"));
    cfg.request_timeout = Duration::from_secs(2);
    if channel {
        cfg.storage_chat = Some(format!("-100{}", server.channels()[0].id));
    }
    Arc::new(TelegramStorage::connect(cfg).await.unwrap())
}

async fn env(opts: LoopbackOptions, channel: bool, pack_size: u64) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let server = LoopbackTelegram::start(opts).await.unwrap();
    let tg = connect(&server, dir.path(), channel).await;
    let storage: Arc<dyn Storage> = tg.clone();
    let catalog = Catalog::open_file(&dir.path().join("catalog.db"))
        .await
        .unwrap();
    Repo::init(
        &catalog,
        storage.as_ref(),
        PASS,
        KdfParams::fast_for_tests(),
    )
    .await
    .unwrap();
    let settings = EngineSettings {
        pack_size,
        compression: Some(1),
        chunker: ChunkerParams::small(),
        threads: 2,
        hostname: "test".into(),
    };
    let repo = Repo::open(catalog, storage, PASS, settings).await.unwrap();
    Env {
        server,
        repo,
        tg,
        dir,
    }
}

fn backup(src: &Path) -> BackupOptions {
    BackupOptions {
        path: src.to_path_buf(),
        owner: "local".into(),
        encrypt: true,
    }
}

fn restore(src: &Path, to: &Path) -> RestoreOptions {
    RestoreOptions {
        path: src.to_string_lossy().into_owned(),
        to: to.to_path_buf(),
        snapshot: None,
        owner: "local".into(),
        overwrite: false,
        within: None,
        same_owner: None,
    }
}

async fn bounded<T>(secs: u64, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .expect("test took too long")
}

async fn round_trip(channel: bool) {
    let e = env(LoopbackOptions::default(), channel, 4 << 20).await;
    let src = e.dir.path().join("src/data");
    make_tree(&src);
    std::fs::write(src.join("big.bin"), bytes(12 << 20, 5)).unwrap();
    let s = e
        .repo
        .backup(&backup(&src), &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    assert!(s.packs >= 3, "{} packs", s.packs);
    // Every pack is a document named <id>.enc, nothing else about the tree.
    for (_, _, name, _) in e.server.documents() {
        assert!(name.ends_with(".enc") && !name.contains("data"), "{name}");
    }
    let out = e.dir.path().join("out");
    e.repo
        .restore(&restore(&src, &out), &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    assert_eq!(describe_tree(&src), describe_tree(&out.join("data")));
    let report = e.repo.verify(true, &NoProgress).await.unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    e.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_round_trip_through_saved_messages() {
    bounded(120, round_trip(false)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_round_trip_through_a_channel() {
    bounded(120, round_trip(true)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_and_restore_survive_telegram_faults() {
    bounded(180, async {
        let e = env(LoopbackOptions::default(), false, 4 << 20).await;
        let src = e.dir.path().join("src/data");
        make_tree(&src);
        std::fs::write(src.join("big.bin"), bytes(14 << 20, 6)).unwrap();
        let faults = e.server.faults();
        // 4 MiB packs are small files for Telegram: their parts go by upload.saveFilePart.
        faults.on_call("messages.sendMedia", 1, Fault::flood_wait(1));
        faults.on_call("messages.sendMedia", 3, Fault::flood_premium_wait(1));
        faults.on_call("upload.saveFilePart", 6, Fault::DropConnection);
        faults.on_call("upload.saveFilePart", 2, Fault::Hang);
        faults.on_call(
            "messages.sendMedia",
            2,
            Fault::rpc(400, "FILE_PART_0_MISSING"),
        );
        let s = e
            .repo
            .backup(&backup(&src), &NoProgress, &CancelFlag::new())
            .await
            .unwrap();
        assert!(s.packs >= 4, "{} packs", s.packs);
        // Each scripted fault fired, and the client dealt with each as Telegram expects.
        assert_eq!(
            faults.fired_on("messages.sendMedia"),
            3,
            "{:?}",
            faults.fired()
        );
        assert_eq!(
            faults.fired_on("upload.saveFilePart"),
            2,
            "{:?}",
            faults.fired()
        );
        assert_eq!(faults.fired().len(), 5);
        assert_eq!(e.server.counters().get("upload.saveBigFilePart"), 0);
        let stats = e.tg.scheduler().stats();
        assert_eq!(stats.flood_waits, 2, "{stats:?}");
        assert_eq!(stats.upload_restarts, 1, "{stats:?}");
        assert!(
            stats.retries >= 2,
            "the hang and the drop were retried: {stats:?}"
        );
        assert!(stats.reconnects >= 2, "{stats:?}");

        faults.clear();
        e.server.expire_file_references();
        faults.on_call("upload.getFile", 2, Fault::flood_wait(1));
        faults.on_call("upload.getFile", 5, Fault::DropConnection);
        faults.on_call("upload.getFile", 7, Fault::Hang);
        let out = e.dir.path().join("out");
        e.repo
            .restore(&restore(&src, &out), &NoProgress, &CancelFlag::new())
            .await
            .unwrap();
        assert_eq!(faults.fired_on("upload.getFile"), 3, "{:?}", faults.fired());
        assert_eq!(faults.fired().len(), 8);
        let after = e.tg.scheduler().stats();
        assert_eq!(after.flood_waits, 3, "{after:?}");
        assert!(after.retries >= stats.retries + 2, "{after:?}");
        assert!(
            e.server.counters().get("messages.getMessages") >= 1,
            "expired file references were refetched"
        );
        assert_eq!(describe_tree(&src), describe_tree(&out.join("data")));
        e.server.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_download_is_named_and_deleted_pack_is_reported() {
    bounded(120, async {
        let e = env(LoopbackOptions::default(), false, 4 << 20).await;
        let src = e.dir.path().join("src/data");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("precious.bin"), bytes(300_000, 8)).unwrap();
        e.repo.backup(&backup(&src), &NoProgress, &CancelFlag::new()).await.unwrap();

        e.server.faults().with_probability("upload.getFile", 1.0, 1000, Fault::CorruptDownload);
        let out = e.dir.path().join("out");
        let err = e.repo.restore(&restore(&src, &out), &NoProgress, &CancelFlag::new()).await.unwrap_err();
        assert!(e.server.faults().fired_on("upload.getFile") >= 1);
        assert!(matches!(&err, Error::RestoreFailed { failures } if failures[0].0 == "data/precious.bin"), "{err}");
        assert!(!out.join("data/precious.bin").exists());
        assert!(temp_files(&out).is_empty());
        e.server.faults().clear();

        let packs = e.repo.catalog.packs().await.unwrap();
        let data_pack = packs.iter().max_by_key(|p| p.size).unwrap();
        assert!(e.server.delete_document_named(&format!("{}.enc", data_pack.id)));
        let report = e.repo.verify(false, &NoProgress).await.unwrap();
        assert!(
            report.problems.iter().any(|p| p.contains("missing") && p.contains("data/precious.bin")),
            "{:?}",
            report.problems
        );
        e.server.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_small_files_cost_calls_by_bytes_not_by_files() {
    bounded(240, async {
        let pack_size: u64 = 2 << 20;
        let e = env(LoopbackOptions::default(), false, pack_size).await;
        let src = e.dir.path().join("src/many");
        for i in 0..10_000u64 {
            let dir = src.join(format!("d{:02}", i % 50));
            if i < 50 {
                std::fs::create_dir_all(&dir).unwrap();
            }
            std::fs::write(
                dir.join(format!("f{i:05}.txt")),
                bytes(600 + (i as usize % 900), i),
            )
            .unwrap();
        }
        let before = e.server.counters().message_class_calls();
        let s = e
            .repo
            .backup(&backup(&src), &NoProgress, &CancelFlag::new())
            .await
            .unwrap();
        let calls = e.server.counters().message_class_calls() - before;
        let stored = s.snapshot.bytes_stored;
        let packs_by_bytes = stored.div_ceil(pack_size);
        println!(
            "10k files: {} bytes stored, {} packs, {} message-class calls, counters {:?}",
            stored,
            s.packs,
            calls,
            e.server.counters().snapshot()
        );
        assert_eq!(s.snapshot.files, 10_000);
        assert!(
            s.packs <= packs_by_bytes + 1,
            "{} packs for {stored} bytes",
            s.packs
        );
        assert!(
            calls <= 2 * (packs_by_bytes + 1) + 4,
            "{calls} message-class calls for {packs_by_bytes} packs"
        );
        e.server.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_machine_recovers_everything_from_telegram_and_the_passphrase() {
    bounded(120, async {
        let e = env(LoopbackOptions::default(), true, 4 << 20).await;
        let src = e.dir.path().join("src/data");
        make_tree(&src);
        e.repo
            .backup(&backup(&src), &NoProgress, &CancelFlag::new())
            .await
            .unwrap();

        // The server burned: a new machine has only the Telegram account and the passphrase.
        let fresh = tempfile::tempdir().unwrap();
        let storage = connect(&e.server, fresh.path(), true).await;
        let catalog = Catalog::open_file(&fresh.path().join("catalog.db"))
            .await
            .unwrap();
        let (repo, report) = storinator_shared::recover(
            catalog,
            storage,
            PASS,
            EngineSettings::default(),
            &NoProgress,
        )
        .await
        .unwrap();
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        assert_eq!(report.snapshots, 1);
        let out = fresh.path().join("out");
        repo.restore(&restore(&src, &out), &NoProgress, &CancelFlag::new())
            .await
            .unwrap();
        assert_eq!(describe_tree(&src), describe_tree(&out.join("data")));
        e.server.shutdown().await;
    })
    .await;
}

/// The next pack goes up while the last one is published: with packs uploaded one after the
/// other, the link idles at every pack boundary (the last parts' answers, then the sendMedia
/// round trip). The first pack's sendMedia is held up for a while; parts of the next pack
/// must reach Telegram before it completes, and the window shared by both stays bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_pack_goes_up_while_the_last_one_is_published() {
    bounded(120, async {
        let e = env(LoopbackOptions::default(), false, 4 << 20).await;
        // A first backup stores what a repository's first backup stores besides packs (its
        // owner's key), so that the next backup's first send is a pack's.
        let warm = e.dir.path().join("src/warm");
        std::fs::create_dir_all(&warm).unwrap();
        std::fs::write(warm.join("small"), bytes(1000, 20)).unwrap();
        e.repo
            .backup(&backup(&warm), &NoProgress, &CancelFlag::new())
            .await
            .unwrap();
        let src = e.dir.path().join("src/data");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("big.bin"), bytes(14 << 20, 21)).unwrap();
        let counters = e.server.counters();
        let sends = counters.get("messages.sendMedia");
        // Well under the storage's request timeout (2 s), so the send is answered, late.
        e.server.faults().on_call(
            "messages.sendMedia",
            1,
            Fault::Delay(Duration::from_millis(1000)),
        );
        let docs = e.server.documents().len();
        let parts = || counters.get("upload.saveFilePart") + counters.get("upload.saveBigFilePart");
        let parts_before = parts();
        // Watched from a thread of its own: the backup's future does CPU work between its
        // awaits, and a watcher polled beside it would miss the moment.
        let watch = || {
            // Parts counted when the first send reached the server, and the most counted
            // while it was still pending (read before the documents, so no later part counts).
            // The send is looked for before the documents: with two packs in flight, the next
            // pack's send may arrive and publish its document between two looks, while the
            // first send is still delayed; the first send was pending all the same.
            let (mut at_send, mut during) = (None, 0);
            loop {
                let p = parts();
                let sent = counters.get("messages.sendMedia") > sends;
                if sent {
                    at_send.get_or_insert(p);
                }
                if e.server.documents().len() > docs {
                    break;
                }
                if sent {
                    during = p;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            (at_send, during)
        };
        let (opts, cancel) = (backup(&src), CancelFlag::new());
        let (s, (at_send, during)) = tokio::task::block_in_place(|| {
            std::thread::scope(|scope| {
                let watcher = scope.spawn(watch);
                let s = tokio::runtime::Handle::current().block_on(e.repo.backup(
                    &opts,
                    &NoProgress,
                    &cancel,
                ));
                (s, watcher.join().unwrap())
            })
        });
        let s = s.unwrap();
        assert!(s.packs >= 3, "{} packs", s.packs);
        assert_eq!(e.server.faults().fired_on("messages.sendMedia"), 1);
        let at_send = at_send.unwrap_or_else(|| {
            panic!(
                "the first send was not seen pending: {:?}, {} documents before",
                counters.snapshot(),
                docs
            )
        });
        // One pack at a time, the parts counted when the first send arrived are the first
        // pack's alone (no more than the largest pack's), and none come while it is
        // pending. Two at once, the next pack's parts come before the send, or during it
        // (which of the two depends on how fast the packer makes the next pack).
        let largest = e
            .server
            .documents()
            .iter()
            .map(|d| d.3.div_ceil(512 << 10))
            .max()
            .unwrap_or(0);
        assert!(
            during > at_send || at_send - parts_before > largest,
            "no part of another pack went up before the first pack was published ({} parts \
             before its send, {} during, the largest pack has {largest}): packs went one at a time",
            at_send - parts_before,
            during - at_send
        );
        let stats = e.tg.scheduler().stats();
        let bound = e.tg.scheduler().config().max_part_concurrency as u64;
        assert!(
            stats.peak_parts_in_flight <= bound,
            "the packs share one bounded window: {stats:?}"
        );
        let out = e.dir.path().join("out");
        e.repo
            .restore(&restore(&src, &out), &NoProgress, &CancelFlag::new())
            .await
            .unwrap();
        assert_eq!(describe_tree(&src), describe_tree(&out.join("data")));
        e.server.shutdown().await;
    })
    .await;
}
