//! Storage format 2 still reads format 1 (`tests/fixtures/format1`, written by the engine
//! before format 2), and decides deliberately about format-1 unencrypted objects, which carry
//! only a checksum anyone can compute: they are accepted where something authenticated (the
//! catalog that wrote them) vouches for their ids, and skipped by `recover`, where nothing does.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::*;
use storinator_shared::{
    BackupOptions, CancelFlag, Catalog, ChunkerParams, DirStorage, EngineSettings, NoProgress,
    Repo, RestoreOptions, recover,
};

const FORMAT1_PASS: &str = "format one passphrase";

fn fixture_settings() -> EngineSettings {
    EngineSettings {
        pack_size: 64 * 1024,
        compression: Some(3),
        chunker: ChunkerParams::small(),
        threads: 1,
        hostname: "test".into(),
    }
}

/// A copy of the format-1 repository (opening it migrates the catalog).
fn copy_fixture(to: &Path) -> (PathBuf, PathBuf) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/format1");
    let store = to.join("store");
    std::fs::create_dir_all(&store).unwrap();
    for e in std::fs::read_dir(src.join("store")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), store.join(e.file_name())).unwrap();
    }
    let db = to.join("catalog.db");
    std::fs::copy(src.join("catalog.db"), &db).unwrap();
    (store, db)
}

/// What the fixture's generator wrote into each root (see its README).
fn expected(name: &str) -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("a.txt", format!("{name} file a\n").repeat(50).into_bytes()),
        ("sub/b.bin", bytes(40_000, 7)),
        ("sub/c.txt", b"c".to_vec()),
    ]
}

fn restore_opts(path: &str, to: &Path) -> RestoreOptions {
    RestoreOptions {
        path: path.into(),
        to: to.to_path_buf(),
        snapshot: None,
        owner: "local".into(),
        overwrite: false,
        within: None,
        same_owner: None,
    }
}

async fn open(dir: &Path) -> Repo {
    let (store, db) = copy_fixture(dir);
    let storage = Arc::new(DirStorage::open(&store).unwrap());
    let catalog = Catalog::open_file(&db).await.unwrap();
    Repo::open(catalog, storage, FORMAT1_PASS, fixture_settings())
        .await
        .unwrap()
}

#[tokio::test]
async fn a_format1_repository_restores_both_snapshots_from_its_catalog() {
    let dir = tempfile::tempdir().unwrap();
    let repo = open(dir.path()).await;
    let snaps = repo.snapshots("local", None).await.unwrap();
    assert_eq!(snaps.len(), 2);
    for s in &snaps {
        let name = Path::new(&s.root).file_name().unwrap().to_str().unwrap();
        let out = dir.path().join(format!("out-{name}"));
        // The unencrypted one is format 1 (checksums only): the catalog vouches for its ids.
        repo.restore(
            &restore_opts(&s.root, &out),
            &NoProgress,
            &CancelFlag::new(),
        )
        .await
        .unwrap();
        for (rel, content) in expected(name) {
            assert_eq!(std::fs::read(out.join(name).join(rel)).unwrap(), content);
        }
        assert_eq!(
            std::fs::read_link(out.join(name).join("link")).unwrap(),
            Path::new("a.txt")
        );
    }
    assert!(
        repo.verify(true, &NoProgress)
            .await
            .unwrap()
            .problems
            .is_empty()
    );
}

#[tokio::test]
async fn recover_of_format1_storage_takes_what_is_authenticated_and_names_what_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = copy_fixture(dir.path());
    let storage = Arc::new(DirStorage::open(&store).unwrap());
    let catalog = Catalog::open_file(&dir.path().join("new.db"))
        .await
        .unwrap();
    let (repo, report) = recover(
        catalog,
        storage,
        FORMAT1_PASS,
        fixture_settings(),
        &NoProgress,
    )
    .await
    .unwrap();
    // The encrypted snapshot (format-1 encrypted objects carry a MAC) comes back whole.
    assert_eq!(report.snapshots, 1, "{report:?}");
    let snaps = repo.snapshots("local", None).await.unwrap();
    assert!(snaps[0].encrypted && snaps[0].root.ends_with("/secret"));
    let out = dir.path().join("out");
    repo.restore(
        &restore_opts(&snaps[0].root, &out),
        &NoProgress,
        &CancelFlag::new(),
    )
    .await
    .unwrap();
    for (rel, content) in expected("secret") {
        assert_eq!(
            std::fs::read(out.join("secret").join(rel)).unwrap(),
            content
        );
    }
    // The unencrypted pack is indistinguishable from one anybody could post: skipped, named.
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    let p = &report.problems[0];
    assert!(p.contains(".enc") && p.contains("unauthenticated"), "{p}");
}

#[tokio::test]
async fn an_unencrypted_backup_after_the_upgrade_relies_on_no_format1_blob() {
    let dir = tempfile::tempdir().unwrap();
    let repo = open(dir.path()).await;
    // The same content as the format-1 unencrypted snapshot, backed up again unencrypted.
    let src = dir.path().join("again/public");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    for (rel, content) in expected("public") {
        std::fs::write(src.join(rel), content).unwrap();
    }
    std::os::unix::fs::symlink("a.txt", src.join("link")).unwrap();
    let opts = BackupOptions {
        path: src.clone(),
        owner: "local".into(),
        encrypt: false,
    };
    let s = repo
        .backup(&opts, &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    // c.txt and a.txt are one chunk each, with the same SHA-256 id as their format-1 blobs:
    // stored again all the same, authenticated.
    assert!(s.new_data_chunks >= 3, "{}", s.line());
    let unauthenticated: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM chunks ch JOIN content_chunks cc ON cc.chunk_id = ch.id \
         JOIN entries e ON e.content_id = cc.content_id JOIN roots r ON r.id = e.root_id \
         WHERE r.path = $1 AND ch.flags & 3 = 0",
    )
    .bind(&s.snapshot.root)
    .fetch_one(repo.catalog.pool())
    .await
    .unwrap();
    assert_eq!(
        unauthenticated, 0,
        "the new snapshot relies on a format-1 blob"
    );

    // A new machine recovers it from storage alone: nothing it needs is unauthenticated.
    let storage = Arc::new(DirStorage::open(dir.path().join("store")).unwrap());
    let catalog = Catalog::open_file(&dir.path().join("new.db"))
        .await
        .unwrap();
    let (fresh, report) = recover(
        catalog,
        storage,
        FORMAT1_PASS,
        fixture_settings(),
        &NoProgress,
    )
    .await
    .unwrap();
    assert_eq!(report.snapshots, 2, "{report:?}");
    let out = dir.path().join("out");
    fresh
        .restore(
            &restore_opts(&src.display().to_string(), &out),
            &NoProgress,
            &CancelFlag::new(),
        )
        .await
        .unwrap();
    assert_eq!(describe_tree(&src), describe_tree(&out.join("public")));
}

/// An unchanged file whose chunks are format-1 unencrypted blobs is read again rather than
/// listed with them (the catalog is made to look like a format-1 one).
#[tokio::test]
async fn unchanged_files_on_format1_unencrypted_chunks_are_read_again() {
    let f = Fixture::new().await;
    let src = f.path("src/data");
    make_tree(&src);
    let opts = BackupOptions {
        path: src.clone(),
        owner: "local".into(),
        encrypt: false,
    };
    f.repo
        .backup(&opts, &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    let again = f
        .repo
        .backup(&opts, &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    assert_eq!(again.snapshot.bytes_read, 0);
    sqlx::query("UPDATE chunks SET flags = 0")
        .execute(f.repo.catalog.pool())
        .await
        .unwrap();
    let third = f
        .repo
        .backup(&opts, &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    assert_eq!(
        third.snapshot.bytes_read,
        third.snapshot.bytes,
        "{}",
        third.line()
    );
    assert!(third.new_data_chunks > 0);
    let fourth = f
        .repo
        .backup(&opts, &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    assert_eq!(fourth.snapshot.bytes_read, 0, "{}", fourth.line());
}
