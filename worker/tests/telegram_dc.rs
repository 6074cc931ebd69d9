//! Several data centres: documents living on another data centre than the account's are read
//! there (FILE_MIGRATE, then the authorization carried over with export/import), by the
//! storage backend and by the engine's restore, verify and recover; and the decision on CDN
//! redirects (refused with a clear error, never followed or looped on).

mod telegram_support;

use std::sync::Arc;
use std::time::Duration;

use storinator_shared::error::StorageError;
use storinator_shared::storage::{ObjectRef, Storage};
use storinator_shared::{
    BackupOptions, CancelFlag, Catalog, ChunkerParams, EngineSettings, KdfParams, NoProgress, Repo,
    RestoreOptions,
};
use storinator_testkit::fixtures::{describe_tree, make_tree};
use storinator_testkit::mtproto::{Fault, LoopbackOptions, LoopbackTelegram};
use storinator_worker::telegram::{TelegramConfig, TelegramStorage};
use telegram_support::*;

const PACK: &str = "00112233445566778899aabbccddeeff.enc";

async fn bounded<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(90), f)
        .await
        .expect("test took too long")
}

/// A second worker process on the same account: fresh connections and caches.
async fn fresh(server: &LoopbackTelegram, dir: &std::path::Path, name: &str) -> TelegramStorage {
    let session = dir.join(format!("{name}.session"));
    server.write_session(&session).unwrap();
    let mut cfg = TelegramConfig::new(1, "loopback", session, dir.join(format!("spool-{name}")));
    cfg.request_timeout = Duration::from_secs(5);
    TelegramStorage::connect(cfg).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documents_on_another_data_centre_are_read_there() {
    bounded(async {
        let f = start(LoopbackOptions::default(), false).await;
        let bytes = data(1_200_000, 1);
        let loc = put(&f.storage, PACK, &bytes).await;
        assert!(f.server.move_document(PACK, 4));
        let c = f.server.counters();

        // The storage that uploaded it still thinks it is home: FILE_MIGRATE_4, then DC 4.
        assert_eq!(
            get_all(&f.storage, PACK, &loc, bytes.len() as u64).await,
            bytes
        );
        assert!(c.get("dc2:upload.getFile") >= 1, "{:?}", c.snapshot());
        assert_eq!(c.get("dc2:auth.exportAuthorization"), 1);
        assert_eq!(c.get("dc4:auth.importAuthorization"), 1);
        let on_four = c.get("dc4:upload.getFile");
        assert!(on_four >= 3, "three windows read on dc 4: {on_four}");

        // A fresh worker reads the document's dc_id and goes straight there.
        let other = fresh(&f.server, f.dir.path(), "other").await;
        let before_home = c.get("dc2:upload.getFile");
        let got = other
            .get_range(&ObjectRef::new(PACK, loc.as_str()), 500_000, 600_000)
            .await
            .unwrap();
        assert_eq!(got, &bytes[500_000..1_100_000]);
        assert_eq!(c.get("dc2:upload.getFile"), before_home, "no detour home");
        // One authorization per data centre and process, reused for every read after.
        other
            .get_range(&ObjectRef::new(PACK, loc.as_str()), 0, 10)
            .await
            .unwrap();
        assert_eq!(c.get("dc4:auth.importAuthorization"), 2);

        // Telegram forgets the imported authorization: it is imported again, once.
        f.server.forget_imported_authorization(4);
        other
            .get_range(&ObjectRef::new(PACK, loc.as_str()), 0, 10)
            .await
            .unwrap();
        assert_eq!(c.get("dc4:auth.importAuthorization"), 3);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_verify_and_recover_read_packs_from_another_data_centre() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let server = LoopbackTelegram::start(LoopbackOptions::default())
            .await
            .unwrap();
        // As for an account that moved, or packs another account uploaded: on dc 4.
        server.place_documents_on(Some(4));
        let storage: Arc<dyn Storage> = Arc::new(fresh(&server, dir.path(), "a").await);
        let catalog = Catalog::open_file(&dir.path().join("a.db")).await.unwrap();
        Repo::init(
            &catalog,
            storage.as_ref(),
            "pw",
            KdfParams::fast_for_tests(),
        )
        .await
        .unwrap();
        let settings = || EngineSettings {
            pack_size: 1 << 20,
            compression: Some(1),
            chunker: ChunkerParams::small(),
            threads: 2,
            hostname: "test".into(),
        };
        let repo = Repo::open(catalog, storage, "pw", settings())
            .await
            .unwrap();
        let src = dir.path().join("src/data");
        make_tree(&src);
        repo.backup(
            &BackupOptions {
                path: src.clone(),
                owner: "local".into(),
                encrypt: true,
            },
            &NoProgress,
            &CancelFlag::new(),
        )
        .await
        .unwrap();
        for (_, _, name, _) in server.documents() {
            assert_eq!(server.document_dc(&name), Some(4), "{name}");
        }

        // A new machine: recover the catalog from storage alone, then restore and verify.
        let storage: Arc<dyn Storage> = Arc::new(fresh(&server, dir.path(), "b").await);
        let catalog = Catalog::open_file(&dir.path().join("b.db")).await.unwrap();
        let (repo, report) =
            storinator_shared::recover(catalog, storage, "pw", settings(), &NoProgress)
                .await
                .unwrap();
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        assert_eq!(report.snapshots, 1);
        let out = dir.path().join("out");
        repo.restore(
            &RestoreOptions {
                path: src.to_string_lossy().into_owned(),
                to: out.clone(),
                snapshot: None,
                owner: "local".into(),
                overwrite: false,
                within: None,
                same_owner: None,
            },
            &NoProgress,
            &CancelFlag::new(),
        )
        .await
        .unwrap();
        assert_eq!(describe_tree(&src), describe_tree(&out.join("data")));
        let v = repo.verify(true, &NoProgress).await.unwrap();
        assert!(v.problems.is_empty(), "{:?}", v.problems);
        let c = server.counters();
        assert!(c.get("dc4:upload.getFile") > 0);
        assert_eq!(
            c.get("dc2:upload.getFile"),
            0,
            "documents were read where they live"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cdn_redirects_are_never_asked_for_and_refused_if_sent_anyway() {
    bounded(async {
        let f = start(LoopbackOptions::default(), false).await;
        let bytes = data(300_000, 2);
        let loc = put(&f.storage, PACK, &bytes).await;
        // A popular document Telegram would serve from a CDN to clients that ask for it:
        // storinator does not ask, so it reads it from its data centre as usual.
        assert!(f.server.serve_from_cdn(PACK));
        assert_eq!(
            get_all(&f.storage, PACK, &loc, bytes.len() as u64).await,
            bytes
        );
        // A redirect anyway: a clear error, one call, no loop and no panic.
        f.server
            .faults()
            .on_call("upload.getFile", 1, Fault::CdnRedirect);
        let before = f.server.counters().get("upload.getFile");
        let err = f
            .storage
            .get_range(&ObjectRef::new(PACK, loc.as_str()), 0, 4096)
            .await
            .unwrap_err();
        assert!(matches!(err, StorageError::Fatal(_)), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("CDN") && msg.contains(PACK), "{msg}");
        assert_eq!(f.server.counters().get("upload.getFile"), before + 1);
        assert_eq!(f.server.faults().fired_on("upload.getFile"), 1);
    })
    .await;
}
