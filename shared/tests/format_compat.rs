//! Storage format 2 still reads format 1 (`tests/fixtures/format1`, written by the engine
//! before format 2), and decides deliberately about format-1 unencrypted objects, which carry
//! only a checksum anyone can compute: they are accepted where something authenticated (the
//! catalog that wrote them) vouches for their ids, and skipped by `recover`, where nothing does.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::*;
use storinator_shared::catalog::CHUNK_LISTS;
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
    copy_repo("format1", to)
}

/// A copy of the fixture repository `name` (its store and catalog) in `to`.
fn copy_repo(name: &str, to: &Path) -> (PathBuf, PathBuf) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
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
    let unauthenticated: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT COUNT(*) FROM chunks ch JOIN {CHUNK_LISTS} cc ON cc.chunk_no = ch.no \
         JOIN entries e ON e.content_id = cc.content_id JOIN roots r ON r.id = e.root_id \
         WHERE r.path = $1 AND ch.flags & 3 = 0"
    )))
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

/// A catalog written before migration 0017 (`tests/fixtures/two-keys`: chunks name their pack
/// by its 32-hex id, contents their key by its 32-hex key id, three keys over five packs).
fn copy_two_keys(to: &Path) -> (PathBuf, PathBuf) {
    copy_repo("two-keys", to)
}

/// A content as every catalog version can name it, whatever its id (migration 0027 numbers
/// them anew): its SHA-256, size, whether encrypted, and its key id ('' for the installation
/// key).
type ContentName = (Vec<u8>, i64, i64, Option<String>);

/// Each chunk's pack id, each content's chunk list (by chunk id), and each entry's content.
#[derive(Debug, PartialEq, Eq)]
struct Links {
    chunk_packs: BTreeMap<Vec<u8>, String>,
    contents: BTreeMap<ContentName, Vec<Vec<u8>>>,
    entry_contents: BTreeMap<(i64, String, i64), Option<ContentName>>,
}

/// The links every catalog version holds alike: contents, chunk lists, entries' contents.
type SameLinks = (
    BTreeMap<i64, (Vec<u8>, i64, i64)>,
    BTreeMap<(i64, i64), Vec<u8>>,
    BTreeMap<(i64, String, i64), Option<i64>>,
);

impl Links {
    /// The links of `same` with each content named by what it is, not by its id (`keys`: each
    /// content's key id). No two contents have one name.
    fn of(
        chunk_packs: BTreeMap<Vec<u8>, String>,
        keys: BTreeMap<i64, Option<String>>,
        (contents, lists, entries): SameLinks,
    ) -> Links {
        let names: BTreeMap<i64, ContentName> = contents
            .into_iter()
            .map(|(id, (sha, size, enc))| (id, (sha, size, enc, keys[&id].clone())))
            .collect();
        let mut by_name: BTreeMap<ContentName, Vec<Vec<u8>>> =
            names.values().map(|n| (n.clone(), Vec::new())).collect();
        assert_eq!(by_name.len(), names.len(), "two contents with one name");
        for ((content, _), chunk) in lists {
            by_name.get_mut(&names[&content]).unwrap().push(chunk);
        }
        Links {
            chunk_packs,
            contents: by_name,
            entry_contents: entries
                .into_iter()
                .map(|(k, c)| (k, c.map(|c| names[&c].clone())))
                .collect(),
        }
    }
}

/// `lists`: the statement of the chunk lists as (content id, seq, chunk id), which name chunks
/// by id before migration 0022 and by number since.
async fn same_links(pool: &sqlx::AnyPool, lists: &str) -> SameLinks {
    let contents: Vec<(i64, Vec<u8>, i64, i64)> =
        sqlx::query_as("SELECT id, sha256, size, encrypted FROM contents")
            .fetch_all(pool)
            .await
            .unwrap();
    let lists: Vec<(i64, i64, Vec<u8>)> = sqlx::query_as(sqlx::AssertSqlSafe(lists.to_string()))
        .fetch_all(pool)
        .await
        .unwrap();
    // Entries by their key: (root, path, first snapshot); they have no other since 0019.
    let entries: Vec<(i64, String, i64, Option<i64>)> =
        sqlx::query_as("SELECT root_id, path, from_seq, content_id FROM entries")
            .fetch_all(pool)
            .await
            .unwrap();
    assert!(!contents.is_empty() && !lists.is_empty() && !entries.is_empty());
    (
        contents
            .into_iter()
            .map(|(id, sha, size, enc)| (id, (sha, size, enc)))
            .collect(),
        lists
            .into_iter()
            .map(|(c, seq, ch)| ((c, seq), ch))
            .collect(),
        entries
            .into_iter()
            .map(|(root, path, from, content)| ((root, path, from), content))
            .collect(),
    )
}

/// The links as the old catalog holds them, read without migrating it.
async fn old_links(db: &Path) -> Links {
    let opts = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(db)
        .read_only(true);
    let pool = sqlx::SqlitePool::connect_with(opts).await.unwrap();
    let chunk_packs: Vec<(Vec<u8>, String)> = sqlx::query_as("SELECT id, pack_id FROM chunks")
        .fetch_all(&pool)
        .await
        .unwrap();
    let content_keys: Vec<(i64, String)> = sqlx::query_as("SELECT id, key_id FROM contents")
        .fetch_all(&pool)
        .await
        .unwrap();
    pool.close().await;
    sqlx::any::install_default_drivers();
    let url = format!("sqlite://{}?mode=ro", db.display());
    let pool = sqlx::AnyPool::connect(&url).await.unwrap();
    let same = same_links(
        &pool,
        "SELECT content_id, seq, chunk_id FROM content_chunks ORDER BY content_id, seq",
    )
    .await;
    pool.close().await;
    let keys = content_keys
        .into_iter()
        .map(|(k, v)| (k, Some(v)))
        .collect();
    Links::of(chunk_packs.into_iter().collect(), keys, same)
}

/// The links as the converted catalog holds them (by pack and key number).
async fn new_links(catalog: &Catalog) -> Links {
    let pool = catalog.pool();
    let chunk_packs: Vec<(Vec<u8>, String)> =
        sqlx::query_as("SELECT c.id, p.id FROM chunks c JOIN packs p ON p.no = c.pack_no")
            .fetch_all(pool)
            .await
            .unwrap();
    let content_keys: Vec<(i64, Option<String>)> = sqlx::query_as(
        "SELECT c.id, CASE WHEN c.key_no = 0 THEN '' ELSE k.key_id END FROM contents c \
         LEFT JOIN owner_keys k ON k.id = c.key_no",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let same = same_links(
        pool,
        &format!(
            "SELECT cc.content_id, cc.seq, c.id FROM {CHUNK_LISTS} cc \
             JOIN chunks c ON c.no = cc.chunk_no ORDER BY cc.content_id, cc.seq"
        ),
    )
    .await;
    Links::of(
        chunk_packs.into_iter().collect(),
        content_keys.into_iter().collect(),
        same,
    )
}

/// Restores every snapshot of both owners and compares each with the tree it was made of: the
/// newest from `two-keys/expected` (owner keys), the older from `single-key/expected`.
async fn two_keys_restore(repo: &Repo, out: &Path) {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    for (owner, name, count) in [("local", "docs", 2), ("tg:42", "notes", 3)] {
        let mut snaps = repo.snapshots(owner, None).await.unwrap();
        snaps.retain(|s| s.root.starts_with("/tmp/legacygen/"));
        assert_eq!(snaps.len(), count, "{owner}");
        for (i, s) in snaps.iter().enumerate() {
            let to = out.join(&s.short_id);
            let opts = RestoreOptions {
                snapshot: Some(s.short_id.clone()),
                owner: owner.into(),
                ..restore_opts(&s.root, &to)
            };
            repo.restore(&opts, &NoProgress, &CancelFlag::new())
                .await
                .unwrap();
            let made_of = if i + 1 == count {
                "two-keys"
            } else {
                "single-key"
            };
            assert_eq!(
                tree_of(&to.join(name)),
                tree_of(&fixtures.join(made_of).join("expected").join(name)),
                "{owner} snapshot {}",
                s.short_id
            );
        }
    }
}

/// Files of a tree by relative path, with their bytes.
fn tree_of(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    walkdir::WalkDir::new(root)
        .into_iter()
        .map(Result::unwrap)
        .filter(|e| e.file_type().is_file())
        .map(|e| {
            let rel = e.path().strip_prefix(root).unwrap().to_path_buf();
            (rel, std::fs::read(e.path()).unwrap())
        })
        .collect()
}

const TWO_KEYS_PASS: &str = "single key passphrase";

/// What must hold of the two-keys fixture once its catalog is converted: the links `before`
/// (read from the old catalog), every snapshot restoring byte-identical, and a new backup of
/// `local` reusing the content its owner key recorded before (same bytes, same key), none of
/// another key's. Returns the repository and the links after that backup.
async fn converted_two_keys_hold(
    catalog: Catalog,
    store: &Path,
    before: &Links,
    dir: &Path,
) -> (Repo, Links) {
    assert_eq!(&new_links(&catalog).await, before);
    let storage = Arc::new(DirStorage::open(store).unwrap());
    let repo = Repo::open(catalog, storage, TWO_KEYS_PASS, fixture_settings())
        .await
        .unwrap();
    two_keys_restore(&repo, &dir.join("out1")).await;
    assert!(
        repo.verify(true, &NoProgress)
            .await
            .unwrap()
            .problems
            .is_empty()
    );
    let tree = dir.join("docs");
    std::fs::create_dir_all(&tree).unwrap();
    let same = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/two-keys/expected/docs/same.txt");
    std::fs::copy(same, tree.join("same.txt")).unwrap();
    std::fs::write(tree.join("new.txt"), "after the upgrade\n").unwrap();
    let opts = BackupOptions {
        path: tree,
        owner: "local".into(),
        encrypt: true,
    };
    repo.backup(&opts, &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    let upgraded = new_links(&repo.catalog).await;
    let added: Vec<_> = upgraded
        .contents
        .keys()
        .filter(|name| !before.contents.contains_key(*name))
        .collect();
    let local_key = repo.catalog.owner_keys(Some("local")).await.unwrap()[0]
        .key_id
        .clone();
    assert_eq!(added.len(), 1, "new.txt only: {added:?}");
    assert_eq!(added[0].3.as_deref(), Some(local_key.as_str()));
    (repo, upgraded)
}

#[tokio::test]
async fn a_catalog_from_before_the_lean_schema_is_converted_with_its_links() {
    let dir = tempfile::tempdir().unwrap();
    let (store, db) = copy_two_keys(dir.path());
    let before = old_links(&db).await;
    assert_eq!(before.chunk_packs.len(), 24);
    let keys: BTreeSet<_> = before.contents.keys().map(|name| &name.3).collect();
    assert_eq!(keys.len(), 3, "the installation key and two owner keys");

    // Migrations 0017 and 0018 run outside a transaction: should a kill lose their
    // bookkeeping rows, they run again on the next open, before any later migration. Then
    // they change nothing.
    let migrator = migrator_of(dir.path(), |name| name < "0020").await;
    let opts = sqlx::sqlite::SqliteConnectOptions::new().filename(&db);
    let pool = sqlx::SqlitePool::connect_with(opts).await.unwrap();
    migrator.run(&pool).await.unwrap();
    let forgot = sqlx::query("DELETE FROM _sqlx_migrations WHERE version IN (17, 18)")
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(forgot.rows_affected(), 2);
    migrator.run(&pool).await.unwrap();
    // So do 0022, 0023, 0025 and 0026 (one-chunk lists in their contents' rows), in the
    // layout they leave, before 0027 numbers those contents as their chunks. (Only the last
    // migration a kill interrupts can lose its row: none runs again after a later one.)
    let later = dir.path().join("later");
    std::fs::create_dir(&later).unwrap();
    let migrator = migrator_of(&later, |name| name < "0027").await;
    migrator.run(&pool).await.unwrap();
    let forgot = sqlx::query("DELETE FROM _sqlx_migrations WHERE version IN (22, 23, 25, 26)")
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(forgot.rows_affected(), 4);
    migrator.run(&pool).await.unwrap();
    pool.close().await;

    let catalog = Catalog::open_file(&db).await.unwrap();
    assert_eq!(contents_indexes(&catalog).await, ["contents_by_sha256"]);
    let numbers = chunks_numbered_in_pack_order(&catalog).await;
    assert_eq!(numbers.len(), 24);
    let (repo, upgraded) = converted_two_keys_hold(catalog, &store, &before, dir.path()).await;
    let numbers = chunks_numbered_in_pack_order(&repo.catalog).await;
    assert!(
        numbers.len() > 24,
        "the backup after the upgrade stored chunks"
    );
    repo.catalog.pool().close().await;
    drop(repo);

    // The chunk numbering (0022), the chunk id's prefix index (0023), the tables without the
    // keys whose deletes scanned (0025) and the contents numbered as their chunks (0027) run
    // outside a transaction too, and again should their bookkeeping rows be lost: they change
    // nothing, links nor each chunk's number or content's id, also those stored since, nor
    // snapshots.
    let opts = sqlx::sqlite::SqliteConnectOptions::new().filename(&db);
    let pool = sqlx::SqlitePool::connect_with(opts).await.unwrap();
    let snapshots = snapshot_rows(&db).await;
    let ids = content_ids(&pool).await;
    let forgot = sqlx::query("DELETE FROM _sqlx_migrations WHERE version IN (22, 23, 25, 27)")
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(forgot.rows_affected(), 4);
    pool.close().await;
    let catalog = Catalog::open_file(&db).await.unwrap();
    assert_eq!(new_links(&catalog).await, upgraded);
    let opts = sqlx::sqlite::SqliteConnectOptions::new().filename(&db);
    let pool = sqlx::SqlitePool::connect_with(opts).await.unwrap();
    assert_eq!(content_ids(&pool).await, ids);
    pool.close().await;
    assert_eq!(chunks_numbered_in_pack_order(&catalog).await, numbers);
    assert_eq!(contents_indexes(&catalog).await, ["contents_by_sha256"]);
    assert_eq!(snapshot_rows(&db).await, snapshots);
    let storage = Arc::new(DirStorage::open(&store).unwrap());
    let repo = Repo::open(catalog, storage, TWO_KEYS_PASS, fixture_settings())
        .await
        .unwrap();
    two_keys_restore(&repo, &dir.path().join("out2")).await;
}

/// Every content's id with its SHA-256, and each entry's content id, in key order.
async fn content_ids(pool: &sqlx::SqlitePool) -> (Vec<(i64, Vec<u8>)>, Vec<Option<i64>>) {
    let contents = sqlx::query_as("SELECT id, sha256 FROM contents ORDER BY id")
        .fetch_all(pool)
        .await
        .unwrap();
    let entries =
        sqlx::query_scalar("SELECT content_id FROM entries ORDER BY root_id, path, from_seq")
            .fetch_all(pool)
            .await
            .unwrap();
    (contents, entries)
}

/// Every snapshot row of the SQLite catalog `db`, as text.
async fn snapshot_rows(db: &std::path::Path) -> Vec<String> {
    let opts = sqlx::sqlite::SqliteConnectOptions::new().filename(db);
    let pool = sqlx::SqlitePool::connect_with(opts).await.unwrap();
    let rows = sqlx::query_scalar(
        "SELECT json_array(id, root_id, seq, short_id, hex(blob_id), hostname, encrypted, \
         started_at, finished_at, files, dirs, bytes, bytes_read, new_chunks, bytes_stored, \
         warnings, listing_known) FROM snapshots ORDER BY id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    pool.close().await;
    rows
}

/// Each chunk's number by id (SQLite), once it is checked that chunk lists name chunks by
/// number (migration 0022), that numbers follow pack order (a pack's chunks are neighbours),
/// that the catalog is whole (integrity and foreign keys), and that chunks are found by their
/// id's prefix, one row per id.
async fn chunks_numbered_in_pack_order(catalog: &Catalog) -> BTreeMap<Vec<u8>, i64> {
    let pool = catalog.pool();
    let columns: Vec<String> =
        sqlx::query_scalar("SELECT name FROM pragma_table_info('content_chunks') ORDER BY cid")
            .fetch_all(pool)
            .await
            .unwrap();
    assert_eq!(columns, ["content_id", "seq", "chunk_no"]);
    let in_pack_order: Vec<i64> =
        sqlx::query_scalar("SELECT no FROM chunks ORDER BY pack_no, \"offset\"")
            .fetch_all(pool)
            .await
            .unwrap();
    assert!(
        in_pack_order.windows(2).all(|w| w[0] < w[1]),
        "{in_pack_order:?}"
    );
    let check: String = sqlx::query_scalar("PRAGMA integrity_check")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(check, "ok");
    let dangling: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM pragma_foreign_key_check")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(dangling, 0);
    // A content of one chunk is numbered as its chunk (migration 0027): it has no rows in
    // `content_chunks`, and its chunk has a row.
    let (single, misplaced): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT COUNT(*) FROM contents WHERE id > 0), \
                (SELECT COUNT(*) FROM content_chunks WHERE content_id > 0) \
              + (SELECT COUNT(*) FROM contents c WHERE c.id > 0 \
                 AND NOT EXISTS (SELECT 1 FROM chunks ch WHERE ch.no = c.id))",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert!(single > 0);
    assert_eq!(misplaced, 0);
    // Deleting a content or a chunk checks no key without an index (migration 0025).
    let keys: Vec<String> = sqlx::query_scalar(
        "SELECT m.name || '.' || f.\"from\" FROM sqlite_schema m, pragma_foreign_key_list(m.name) f \
         WHERE m.name IN ('entries', 'content_chunks') ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(
        keys,
        [
            "content_chunks.content_id",
            "entries.owner_no",
            "entries.root_id"
        ]
    );
    // Found by their id's prefix (migration 0023), one row per id.
    let indexes: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_schema WHERE type = 'index' AND tbl_name = 'chunks' ORDER BY name",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(indexes, ["chunks_by_id", "chunks_by_pack"]);
    let numbers: Vec<(Vec<u8>, i64)> = sqlx::query_as("SELECT id, no FROM chunks")
        .fetch_all(pool)
        .await
        .unwrap();
    let ids: BTreeSet<&Vec<u8>> = numbers.iter().map(|(id, _)| id).collect();
    assert_eq!(ids.len(), numbers.len(), "two rows for one chunk id");
    numbers.into_iter().collect()
}

/// The indexes on `contents` (SQLite): migration 0018 leaves the prefix index alone, without
/// the UNIQUE constraint's index that held whole SHA-256s.
async fn contents_indexes(catalog: &Catalog) -> Vec<String> {
    sqlx::query_scalar("SELECT name FROM pragma_index_list('contents') ORDER BY name")
        .fetch_all(catalog.pool())
        .await
        .unwrap()
}

/// The same catalog as a PostgreSQL one made before `postgres/0002_lean_catalog.sql`: the
/// fixture's rows copied into the schema of `postgres/0001_schema.sql` alone, then the rest of
/// the migrations applied.
#[tokio::test]
async fn a_postgres_catalog_from_before_the_lean_schema_is_converted_with_its_links() {
    let dir = tempfile::tempdir().unwrap();
    let (store, db) = copy_two_keys(dir.path());
    let before = old_links(&db).await;
    let cluster = storinator_testkit::pg::PgCluster::start().unwrap();
    let url = cluster.create_database("lean").unwrap();
    let pg = sqlx::PgPool::connect(&url).await.unwrap();
    let first = dir.path().join("pg-first");
    std::fs::create_dir_all(&first).unwrap();
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../migrations/postgres/0001_schema.sql"),
        first.join("0001_schema.sql"),
    )
    .unwrap();
    sqlx::migrate::Migrator::new(first.as_path())
        .await
        .unwrap()
        .run(&pg)
        .await
        .unwrap();
    copy_catalog_rows(&db, &pg).await;
    sqlx::migrate!("../migrations/postgres")
        .run(&pg)
        .await
        .unwrap();
    let indexes = || async {
        sqlx::query_scalar::<_, String>(
            "SELECT indexname::text FROM pg_indexes WHERE tablename = 'contents' ORDER BY 1",
        )
        .fetch_all(&pg)
        .await
        .unwrap()
    };
    assert_eq!(indexes().await, ["contents_by_sha256", "contents_pkey"]);
    // 0003 runs again, as it would should its bookkeeping row be lost, and changes nothing.
    let forgot = sqlx::query("DELETE FROM _sqlx_migrations WHERE version = 3")
        .execute(&pg)
        .await
        .unwrap();
    assert_eq!(forgot.rows_affected(), 1);
    sqlx::migrate!("../migrations/postgres")
        .run(&pg)
        .await
        .unwrap();
    assert_eq!(indexes().await, ["contents_by_sha256", "contents_pkey"]);
    pg.close().await;
    let catalog = Catalog::open(&url).await.unwrap();
    let (repo, _) = converted_two_keys_hold(catalog, &store, &before, dir.path()).await;
    repo.catalog.pool().close().await;
}

/// Copies the catalog tables of a SQLite file (migrated up to 0016) into a PostgreSQL database
/// of the same schema, in foreign-key order, each value as the type its column declares, and
/// moves each identity past the ids copied (as a catalog that made them would have), except
/// that of `contents`, which the migration must see to.
async fn copy_catalog_rows(db: &Path, pg: &sqlx::PgPool) {
    use sqlx::Row;
    let opts = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(db)
        .read_only(true);
    let lite = sqlx::SqlitePool::connect_with(opts).await.unwrap();
    let tables = [
        "users",
        "owner_keys",
        "packs",
        "chunks",
        "contents",
        "content_chunks",
        "roots",
        "snapshots",
        "entries",
        "snapshot_listing",
    ];
    for table in tables {
        let columns: Vec<(String, String)> =
            sqlx::query_as("SELECT name, type FROM pragma_table_info($1) ORDER BY cid")
                .bind(table)
                .fetch_all(&lite)
                .await
                .unwrap();
        let names: Vec<String> = columns.iter().map(|(n, _)| format!("\"{n}\"")).collect();
        let marks: Vec<String> = (1..=columns.len()).map(|i| format!("${i}")).collect();
        let insert = format!(
            "INSERT INTO {table} ({}) VALUES ({})",
            names.join(", "),
            marks.join(", ")
        );
        let select = format!("SELECT {} FROM {table}", names.join(", "));
        let rows = sqlx::query(sqlx::AssertSqlSafe(select))
            .fetch_all(&lite)
            .await
            .unwrap();
        for row in &rows {
            let mut q = sqlx::query(sqlx::AssertSqlSafe(insert.as_str()));
            for (i, (_, declared)) in columns.iter().enumerate() {
                q = match declared.as_str() {
                    "INTEGER" => q.bind(row.get::<Option<i64>, _>(i)),
                    "TEXT" => q.bind(row.get::<Option<String>, _>(i)),
                    "BLOB" => q.bind(row.get::<Option<Vec<u8>>, _>(i)),
                    "REAL" => q.bind(row.get::<Option<f64>, _>(i)),
                    other => panic!("{table}: column type {other}"),
                };
            }
            q.execute(pg).await.unwrap();
        }
        assert!(!rows.is_empty() || table == "snapshot_listing", "{table}");
        let identity = columns.iter().any(|(n, t)| n == "id" && t == "INTEGER");
        if identity && table != "contents" {
            let setval = format!(
                "SELECT setval(pg_get_serial_sequence('{table}', 'id'), \
                 (SELECT COALESCE(MAX(id), 0) + 1 FROM {table}), false)"
            );
            sqlx::query(sqlx::AssertSqlSafe(setval))
                .execute(pg)
                .await
                .unwrap();
        }
    }
    lite.close().await;
}

/// The bot and the worker start together after an upgrade, and both open the old catalog:
/// its migrations run once, whichever process gets there first, and every opener gets a
/// converted catalog (no "table already exists" or duplicate bookkeeping row for the late
/// ones). Each open is its own pool, as in separate processes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_openers_of_an_old_catalog_at_once_all_get_it_converted() {
    let dir = tempfile::tempdir().unwrap();
    let (_store, db) = copy_two_keys(dir.path());
    let before = old_links(&db).await;
    let opens: Vec<_> = (0..4)
        .map(|_| {
            let db = db.clone();
            tokio::spawn(async move { Catalog::open_file(&db).await })
        })
        .collect();
    let mut catalogs = Vec::new();
    for open in opens {
        catalogs.push(open.await.unwrap().expect("every opener gets the catalog"));
    }
    let first = new_links(&catalogs[0]).await;
    assert_eq!(first.chunk_packs, before.chunk_packs);
    for c in &catalogs {
        assert_eq!(new_links(c).await, first);
    }
    let runs: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM _sqlx_migrations WHERE version = 17")
        .fetch_one(catalogs[0].pool())
        .await
        .unwrap();
    assert_eq!(runs, 1);

    // A first start makes a new catalog the same way.
    let fresh = dir.path().join("fresh/catalog.db");
    let opens: Vec<_> = (0..4)
        .map(|_| {
            let db = fresh.clone();
            tokio::spawn(async move { Catalog::open_file(&db).await })
        })
        .collect();
    for open in opens {
        open.await
            .unwrap()
            .expect("every opener gets the new catalog");
    }
}

/// `postgres/0006_lean_entries_owners.sql` on a catalog of the layout before it: each entry
/// keeps its kind and its owner, whatever the owner holds (names unknown, an empty name that
/// is not the unknown one, no owner at all), closed rows as current ones, each owner one row;
/// and a commit after it finds the rows the migration made (the code's key is the migration's).
#[tokio::test]
async fn postgres_entries_keep_their_kind_and_owner_through_the_lean_migration() {
    type Row = (
        String,
        String,
        Option<i64>,
        Option<i64>,
        Option<String>,
        Option<String>,
    );
    let dir = tempfile::tempdir().unwrap();
    let cluster = storinator_testkit::pg::PgCluster::start().unwrap();
    let url = cluster.create_database("owners").unwrap();
    let pg = sqlx::PgPool::connect(&url).await.unwrap();
    let before = dir.path().join("pg-before");
    std::fs::create_dir_all(&before).unwrap();
    let all = Path::new(env!("CARGO_MANIFEST_DIR")).join("../migrations/postgres");
    for e in std::fs::read_dir(&all).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        if name.as_str() < "0006" {
            std::fs::copy(all.join(&name), before.join(&name)).unwrap();
        }
    }
    let migrator = sqlx::migrate::Migrator::new(before.as_path())
        .await
        .unwrap();
    migrator.run(&pg).await.unwrap();
    let root: i64 =
        sqlx::query_scalar("INSERT INTO roots (owner, path) VALUES ('local', '/r') RETURNING id")
            .fetch_one(&pg)
            .await
            .unwrap();
    let rows: Vec<Row> = [
        ("d", "dir", Some(0), Some(0), Some("root"), Some("root")),
        ("d/a", "file", Some(1234), Some(1234), None, None),
        ("d/b", "symlink", Some(1234), Some(1234), Some(""), None),
        ("d/c", "file", Some(1234), Some(1234), None, Some("")),
        ("d/e", "file", None, None, None, None),
        ("d/f", "file", Some(0), Some(0), Some("root"), Some("root")),
    ]
    .into_iter()
    .map(|(p, k, u, g, un, gn)| {
        (
            p.into(),
            k.into(),
            u,
            g,
            un.map(Into::into),
            gn.map(Into::into),
        )
    })
    .collect();
    for (i, r) in rows.iter().enumerate() {
        // Even rows closed at snapshot 2, odd ones current.
        sqlx::query(
            "INSERT INTO entries (root_id, path, kind, size, mtime_ns, mode, inode, from_seq, \
             to_seq, uid, gid, user_name, group_name) \
             VALUES ($1, $2, $3, 0, 0, 0, 0, 1, $4, $5, $6, $7, $8)",
        )
        .bind(root)
        .bind(&r.0)
        .bind(&r.1)
        .bind((i % 2 == 0).then_some(2_i64))
        .bind(r.2)
        .bind(r.3)
        .bind(&r.4)
        .bind(&r.5)
        .execute(&pg)
        .await
        .unwrap();
    }
    sqlx::migrate!("../migrations/postgres")
        .run(&pg)
        .await
        .unwrap();
    let read = || async {
        sqlx::query_as::<_, Row>(
            "SELECT e.path, CASE e.kind WHEN 0 THEN 'file' WHEN 1 THEN 'dir' \
             WHEN 2 THEN 'symlink' END, o.uid, o.gid, o.user_name, o.group_name \
             FROM entries e LEFT JOIN owners o ON o.no = e.owner_no ORDER BY e.path",
        )
        .fetch_all(&pg)
        .await
        .unwrap()
    };
    assert_eq!(read().await, rows);
    let owners = || async {
        sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM owners")
            .fetch_one(&pg)
            .await
            .unwrap()
    };
    assert_eq!(owners().await, 4);

    // A backup after it names its owner by the row the migration made for it, if it is one
    // of those (the tests run as root/root): the code makes keys as the migration did.
    let catalog = Catalog::open(&url).await.unwrap();
    let storage = Arc::new(storinator_shared::MemoryStorage::new(
        dir.path().join("spool"),
    ));
    let kdf = storinator_shared::KdfParams::fast_for_tests();
    Repo::init(&catalog, storage.as_ref(), PASS, kdf)
        .await
        .unwrap();
    let repo = Repo::open(catalog, storage, PASS, settings())
        .await
        .unwrap();
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(&tree).unwrap();
    std::fs::write(tree.join("f"), "f").unwrap();
    let opts = BackupOptions {
        path: tree,
        owner: "local".into(),
        encrypt: true,
    };
    repo.backup(&opts, &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    let twice: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM (SELECT 1 FROM owners GROUP BY uid, gid, user_name, group_name \
         HAVING COUNT(*) > 1) t",
    )
    .fetch_one(&pg)
    .await
    .unwrap();
    assert_eq!(twice, 0, "an owner with two rows");
    assert_eq!(
        read().await[..rows.len()],
        rows[..],
        "the migrated rows stay"
    );
    pg.close().await;
}
