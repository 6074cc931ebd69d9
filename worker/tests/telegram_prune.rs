//! Prune through the real grammers client against the loopback Telegram: the deleted packs'
//! messages are gone from the storage chat (Saved Messages and a channel), deletions go in
//! calls of at most 100 ids, and what remains restores.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use storinator_shared::{
    BackupOptions, CancelFlag, Catalog, ChunkerParams, EngineSettings, ForgetOptions, KdfParams,
    KeepPolicy, NoProgress, PruneOptions, Repo, RestoreOptions, Storage,
};
use storinator_testkit::fixtures::{bytes, describe_tree};
use storinator_testkit::mtproto::{LoopbackOptions, LoopbackTelegram};
use storinator_worker::telegram::{TelegramConfig, TelegramStorage};

const PASS: &str = "loopback passphrase";

async fn repo(server: &LoopbackTelegram, dir: &Path, channel: bool) -> Repo {
    let session = dir.join("worker.session");
    server.write_session(&session).unwrap();
    let mut cfg = TelegramConfig::new(1, "loopback", session, dir.join("spool"));
    cfg.request_timeout = Duration::from_secs(5);
    // The budget is counted below; pacing it in real time would only slow the test down.
    cfg.message_calls_per_minute = 5000;
    if channel {
        cfg.storage_chat = Some(format!("-100{}", server.channels()[0].id));
    }
    let storage: Arc<dyn Storage> = Arc::new(TelegramStorage::connect(cfg).await.unwrap());
    let catalog = Catalog::open_file(&dir.join("catalog.db")).await.unwrap();
    Repo::init(
        &catalog,
        storage.as_ref(),
        PASS,
        KdfParams::fast_for_tests(),
    )
    .await
    .unwrap();
    let settings = EngineSettings {
        pack_size: 16 * 1024,
        compression: None,
        chunker: ChunkerParams::small(),
        threads: 2,
        hostname: "test".into(),
    };
    Repo::open(catalog, storage, PASS, settings).await.unwrap()
}

fn write_files(dir: &Path, n: u64, size: usize, seed: u64) {
    std::fs::create_dir_all(dir).unwrap();
    for i in 0..n {
        std::fs::write(
            dir.join(format!("f{i:03}.bin")),
            bytes(size, seed * 1000 + i),
        )
        .unwrap();
    }
}

async fn backup(repo: &Repo, src: &Path) {
    let opts = BackupOptions {
        path: src.to_path_buf(),
        owner: "local".into(),
        encrypt: true,
    };
    repo.backup(&opts, &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
}

async fn forget_all_but_last(repo: &Repo, src: &Path) {
    let opts = ForgetOptions {
        owner: "local".into(),
        path: src.to_string_lossy().into_owned(),
        policy: KeepPolicy {
            last: Some(1),
            ..Default::default()
        },
        tz: jiff::tz::TimeZone::UTC,
        dry_run: false,
        allow_empty: false,
        only: None,
    };
    repo.forget(&opts, &CancelFlag::new()).await.unwrap();
}

/// Pack documents in the chat, by pack id.
fn chat_packs(server: &LoopbackTelegram) -> BTreeSet<String> {
    server
        .documents()
        .into_iter()
        .filter_map(|(_, _, name, _)| {
            let id = name.strip_suffix(".enc")?;
            (id.len() == 32).then(|| id.to_string())
        })
        .collect()
}

async fn check_restores(repo: &Repo, src: &Path, dir: &Path) {
    let to = dir.join("restored");
    repo.restore(
        &RestoreOptions {
            path: src.to_string_lossy().into_owned(),
            to: to.clone(),
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
    assert_eq!(describe_tree(&to.join("data")), describe_tree(src));
    let v = repo.verify(true, &NoProgress).await.unwrap();
    assert!(v.problems.is_empty(), "{:?}", v.problems);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_deletes_the_messages_of_unused_packs_in_batches_of_100() {
    let dir = tempfile::tempdir().unwrap();
    let server = LoopbackTelegram::start(LoopbackOptions::default())
        .await
        .unwrap();
    let repo = repo(&server, dir.path(), false).await;
    let src = dir.path().join("data");
    // One pack per file: more unused packs than one deleteMessages call may delete.
    write_files(&src, 110, 12_000, 1);
    backup(&repo, &src).await;
    std::fs::remove_dir_all(&src).unwrap();
    write_files(&src, 2, 5_000, 2);
    backup(&repo, &src).await;
    forget_all_but_last(&repo, &src).await;
    let before = chat_packs(&server);
    assert!(before.len() > 110, "{}", before.len());

    let counters = server.counters().snapshot();
    let r = repo
        .prune(
            &PruneOptions {
                repack_below: 0.0,
                ..Default::default()
            },
            &NoProgress,
            &CancelFlag::new(),
        )
        .await
        .unwrap();
    let after_counters = server.counters().snapshot();
    let calls = |m: &str| {
        after_counters.get(m).copied().unwrap_or(0) - counters.get(m).copied().unwrap_or(0)
    };
    assert!(r.deleted_objects > 100, "{r:?}");
    let after = chat_packs(&server);
    let gone: BTreeSet<String> = before.difference(&after).cloned().collect();
    assert_eq!(gone, r.deleted.iter().cloned().collect::<BTreeSet<_>>());
    let catalog: BTreeSet<String> = repo
        .catalog
        .packs()
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.id)
        .collect();
    assert_eq!(after, catalog, "the chat and the catalog agree");
    // Two deleteMessages calls for 100 + the rest; the message ids checked in as many
    // getMessages calls; nothing looked up one by one.
    let batches = r.deleted_objects.div_ceil(100);
    assert_eq!(calls("messages.deleteMessages"), batches);
    assert_eq!(calls("messages.getMessages"), batches);
    assert_eq!(calls("messages.search") + calls("messages.getHistory"), 0);
    check_restores(&repo, &src, dir.path()).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_in_a_channel_repacks_and_deletes_with_channel_calls() {
    let dir = tempfile::tempdir().unwrap();
    let server = LoopbackTelegram::start(LoopbackOptions::default())
        .await
        .unwrap();
    let repo = repo(&server, dir.path(), true).await;
    let src = dir.path().join("data");
    // Small files share packs; three in four go, leaving sparse packs.
    write_files(&src, 24, 3_000, 1);
    backup(&repo, &src).await;
    for i in 0..24 {
        if i % 4 != 0 {
            std::fs::remove_file(src.join(format!("f{i:03}.bin"))).unwrap();
        }
    }
    backup(&repo, &src).await;
    forget_all_but_last(&repo, &src).await;
    let before = chat_packs(&server);
    let counters = server.counters().snapshot();
    let r = repo
        .prune(&PruneOptions::default(), &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    let after_counters = server.counters().snapshot();
    let calls = |m: &str| {
        after_counters.get(m).copied().unwrap_or(0) - counters.get(m).copied().unwrap_or(0)
    };
    assert!(r.repacked_packs >= 1 && r.new_packs >= 1, "{r:?}");
    assert!(calls("channels.deleteMessages") >= 1);
    assert_eq!(calls("messages.deleteMessages"), 0);
    let after = chat_packs(&server);
    for id in &r.deleted {
        assert!(before.contains(id) && !after.contains(id), "{id} is gone");
    }
    check_restores(&repo, &src, dir.path()).await;
    server.shutdown().await;
}
