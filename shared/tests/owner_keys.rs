//! A key per owner (issue 13): each owner's data is sealed and named with its own key, so two
//! owners with the same file share no chunk id and no blob, one owner's key opens nothing of
//! another's, `recover` on an empty machine brings every owner back from storage alone, a
//! tampered owner key in storage is refused by name, and a repository from before owner keys
//! (`tests/fixtures/single-key`) still restores.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::*;
use storinator_shared::catalog::CHUNK_LISTS;
use storinator_shared::format::crypto::CryptoError;
use storinator_shared::format::keyring::{KeyRing, RingKey, owner_key_id_of};
use storinator_shared::{
    BackupOptions, CancelFlag, Catalog, ChunkId, DirStorage, Error, NoProgress, Repo,
    RestoreOptions, Storage, recover,
};

fn backup_opts(path: &Path, owner: &str, encrypt: bool) -> BackupOptions {
    BackupOptions {
        path: path.to_path_buf(),
        owner: owner.into(),
        encrypt,
    }
}

fn restore_opts(path: &str, to: &Path, owner: &str, snapshot: Option<String>) -> RestoreOptions {
    RestoreOptions {
        path: path.into(),
        to: to.to_path_buf(),
        snapshot,
        owner: owner.into(),
        overwrite: false,
        within: None,
        same_owner: None,
    }
}

/// A ring of one owner's first key alone.
async fn only_key_of(repo: &Repo, owner: &str) -> KeyRing {
    let k: RingKey = repo.owner_key(owner).await.unwrap();
    KeyRing::new(vec![k])
}

/// The ids of every blob in the packs `ring` opens, how many packs it opened and the bytes
/// of file data they hold.
async fn blob_ids(f: &Fixture, ring: &KeyRing) -> (BTreeSet<ChunkId>, usize, u64) {
    let mut ids = BTreeSet::new();
    let mut packs = 0;
    let mut data = 0;
    for (name, size) in f.storage.inner.snapshot() {
        if name.starts_with("key-") {
            continue;
        }
        let obj = storinator_shared::ObjectRef::new(&name, "");
        let bytes = f
            .storage
            .inner
            .get_range(&obj, 0, size as u64)
            .await
            .unwrap();
        if let Ok(entries) = pack_entries(&name, &bytes, ring) {
            packs += 1;
            for e in entries {
                if e.kind == BlobKind::Data {
                    data += u64::from(e.raw_length);
                }
                ids.insert(e.id);
            }
        }
    }
    (ids, packs, data)
}

/// Two copies of the same tree, one per owner, backed up encrypted and unencrypted.
async fn two_owners_same_tree(f: &Fixture) -> [(PathBuf, &'static str); 2] {
    let trees = [(f.path("a/data"), "local"), (f.path("b/data"), "tg:1001")];
    for (src, owner) in &trees {
        make_tree(src);
        for encrypt in [true, false] {
            f.repo
                .backup(
                    &backup_opts(src, owner, encrypt),
                    &NoProgress,
                    &CancelFlag::new(),
                )
                .await
                .unwrap();
        }
    }
    assert!(
        files_of(&trees[0].0) == files_of(&trees[1].0),
        "the same files"
    );
    trees
}

#[tokio::test]
async fn two_owners_with_the_same_file_share_no_chunk_id_and_no_blob() {
    let f = Fixture::new().await;
    two_owners_same_tree(&f).await;
    let (a, packs_a, data_a) = blob_ids(&f, &only_key_of(&f.repo, "local").await).await;
    let (b, packs_b, data_b) = blob_ids(&f, &only_key_of(&f.repo, "tg:1001").await).await;
    assert!(packs_a > 0 && packs_b > 0, "{packs_a} {packs_b}");
    assert!(!a.is_empty() && !b.is_empty());
    assert!(
        a.is_disjoint(&b),
        "owners share chunk ids: {:?}",
        a.intersection(&b).take(3).collect::<Vec<_>>()
    );
    // Every pack is one owner's: none opens with the installation key, none with both.
    let all: Vec<_> = f
        .storage
        .inner
        .snapshot()
        .into_iter()
        .filter(|(n, _)| !n.starts_with("key-"))
        .collect();
    assert_eq!(
        packs_a + packs_b,
        all.len(),
        "each pack opens with exactly one owner's key"
    );
    let inst = KeyRing::new(vec![RingKey {
        key_id: String::new(),
        owner: String::new(),
        keys: Arc::new(f.repo.keys().clone()),
    }]);
    assert_eq!(
        blob_ids(&f, &inst).await.1,
        0,
        "the installation key seals no owner's data"
    );
    // The same content, stored by each owner (no dedup across owners): the big file at least
    // once per snapshot kind (encrypted, unencrypted), for each owner.
    assert!(
        data_a >= 2 * 1_500_000 && data_b >= 2 * 1_500_000,
        "{data_a} {data_b}"
    );
    // Both owners have one key each, recorded and stored.
    let rows = f.repo.catalog.owner_keys(None).await.unwrap();
    assert_eq!(rows.len(), 2);
    for r in &rows {
        let name = format!("key-owner-{}.enc", r.key_id);
        assert!(
            f.storage.inner.snapshot().iter().any(|(n, _)| *n == name),
            "{name}"
        );
    }
}

#[tokio::test]
async fn one_owners_key_cannot_open_another_owners_data() {
    let f = Fixture::new().await;
    two_owners_same_tree(&f).await;
    let ring_a = f.repo.ring_for("local").await.unwrap();
    // Owner B's packs: trailers and blobs fail authentication under A's keys.
    let ring_b = only_key_of(&f.repo, "tg:1001").await;
    let mut checked = 0;
    for (name, size) in f.storage.inner.snapshot() {
        if name.starts_with("key-") {
            continue;
        }
        let obj = storinator_shared::ObjectRef::new(&name, "");
        let bytes = f
            .storage
            .inner
            .get_range(&obj, 0, size as u64)
            .await
            .unwrap();
        let Ok(entries) = pack_entries(&name, &bytes, &ring_b) else {
            continue;
        };
        let e = pack_entries(&name, &bytes, &ring_a)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&name) && e.contains("authentication failed"),
            "{e}"
        );
        for entry in entries {
            let sealed =
                &bytes[entry.offset as usize..(entry.offset + u64::from(entry.length)) as usize];
            let err = ring_a.open_chunk(sealed, 16 << 20, &entry.id).unwrap_err();
            assert!(matches!(err, CryptoError::MacMismatch), "{err}");
            checked += 1;
        }
    }
    assert!(checked > 0);

    // A catalog pointing owner A's file at owner B's chunks: the restore refuses the file,
    // naming it and the failed authentication, and writes nothing as good.
    let pool = f.repo.catalog.pool();
    let q = format!(
        "SELECT cc.chunk_no FROM entries e JOIN roots r ON r.id = e.root_id \
         JOIN {CHUNK_LISTS} cc ON cc.content_id = e.content_id \
         JOIN contents c ON c.id = e.content_id \
         WHERE r.owner = $1 AND e.path = 'data/small.txt' AND c.encrypted = 1"
    );
    let q = || sqlx::query_scalar(sqlx::AssertSqlSafe(q.clone()));
    let a_chunk: i64 = q().bind("local").fetch_one(pool).await.unwrap();
    let b_chunk: i64 = q().bind("tg:1001").fetch_one(pool).await.unwrap();
    assert_ne!(a_chunk, b_chunk);
    // A content of one chunk is numbered as its chunk (migration 0027): A's becomes a content
    // whose list, in `content_chunks`, names B's chunk.
    for (sql, chunk) in [
        ("UPDATE contents SET id = -1000 WHERE id = $1", a_chunk),
        (
            "UPDATE entries SET content_id = -1000 WHERE content_id = $1",
            a_chunk,
        ),
        (
            "INSERT INTO content_chunks (content_id, seq, chunk_no) VALUES (-1000, 0, $1)",
            b_chunk,
        ),
    ] {
        let done = sqlx::query(sql).bind(chunk).execute(pool).await.unwrap();
        assert!(done.rows_affected() > 0, "{sql}");
    }
    let snaps = f.repo.snapshots("local", None).await.unwrap();
    let encrypted = snaps.iter().find(|s| s.encrypted).unwrap();
    let out = f.path("out");
    let err = f
        .repo
        .restore(
            &restore_opts(
                "data/small.txt",
                &out,
                "local",
                Some(encrypted.short_id.clone()),
            ),
            &NoProgress,
            &CancelFlag::new(),
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("data/small.txt") && err.contains("authentication failed"),
        "{err}"
    );
    assert!(!out.join("small.txt").exists());
}

/// Restores every snapshot of `owner` and checks each against `src`.
async fn restores_identical(repo: &Repo, owner: &str, src: &Path, out: &Path, expect: usize) {
    let snaps = repo.snapshots(owner, None).await.unwrap();
    assert_eq!(snaps.len(), expect, "{owner}: {snaps:?}");
    for s in snaps {
        let to = out.join(&s.short_id);
        repo.restore(
            &restore_opts(&s.root, &to, owner, Some(s.short_id.clone())),
            &NoProgress,
            &CancelFlag::new(),
        )
        .await
        .unwrap();
        let name = src.file_name().unwrap();
        assert_eq!(
            describe_tree(src),
            describe_tree(&to.join(name)),
            "{owner} {}",
            s.short_id
        );
    }
}

#[tokio::test]
async fn recover_on_an_empty_machine_restores_every_owners_snapshots() {
    let f = Fixture::new().await;
    let trees = two_owners_same_tree(&f).await;
    let fresh = Catalog::open_file(&f.path("new-machine.db")).await.unwrap();
    let (repo, report) = recover(fresh, f.storage.clone(), PASS, settings(), &NoProgress)
        .await
        .unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(report.snapshots, 4);
    for (src, owner) in &trees {
        restores_identical(&repo, owner, src, &f.path(&format!("out-{owner}")), 2).await;
    }
    // The recovered catalog knows both owner keys: new backups keep deduplicating.
    let before = f.storage.inner.snapshot().len();
    repo.backup(
        &backup_opts(&trees[1].0, "tg:1001", true),
        &NoProgress,
        &CancelFlag::new(),
    )
    .await
    .unwrap();
    let summary_packs = f.storage.inner.snapshot().len() - before;
    assert!(
        summary_packs <= 1,
        "an unchanged tree stored {summary_packs} packs again"
    );
    assert_eq!(repo.catalog.owner_keys(None).await.unwrap().len(), 2);
}

#[tokio::test]
async fn a_tampered_or_misnamed_owner_key_in_storage_is_refused_by_name() {
    let f = Fixture::new().await;
    let trees = two_owners_same_tree(&f).await;
    let b_key = f.repo.owner_key("tg:1001").await.unwrap().key_id;
    let b_name = format!("key-owner-{b_key}.enc");
    // A flipped byte.
    assert!(f.storage.inner.corrupt(&b_name, 40));
    let fresh = Catalog::open_file(&f.path("m1.db")).await.unwrap();
    let (repo, report) = recover(fresh, f.storage.clone(), PASS, settings(), &NoProgress)
        .await
        .unwrap();
    let named = report
        .problems
        .iter()
        .find(|p| p.contains(&b_name))
        .unwrap_or_else(|| panic!("{:?}", report.problems));
    assert!(named.contains("authentication failed"), "{named}");
    // Its owner's packs are skipped, named; the other owner's come back whole.
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.contains("skipped") && p.starts_with("pack "))
    );
    assert!(repo.snapshots("tg:1001", None).await.unwrap().is_empty());
    restores_identical(&repo, "local", &trees[0].0, &f.path("out1"), 2).await;

    // The intact key object stored under another key's name: refused, naming both.
    assert!(f.storage.inner.corrupt(&b_name, 40), "flipped back");
    let a_key = f.repo.owner_key("local").await.unwrap().key_id;
    let a_name = format!("key-owner-{a_key}.enc");
    let obj = storinator_shared::ObjectRef::new(&b_name, "");
    let b_bytes = f.storage.inner.get_range(&obj, 0, 4096).await;
    let b_bytes = match b_bytes {
        Ok(b) => b,
        Err(_) => {
            let size = f
                .storage
                .inner
                .snapshot()
                .into_iter()
                .find(|(n, _)| *n == b_name)
                .unwrap()
                .1;
            f.storage
                .inner
                .get_range(&obj, 0, size as u64)
                .await
                .unwrap()
        }
    };
    f.storage.inner.put_bytes(&a_name, b_bytes).await.unwrap();
    let fresh = Catalog::open_file(&f.path("m2.db")).await.unwrap();
    let (_, report) = recover(fresh, f.storage.clone(), PASS, settings(), &NoProgress)
        .await
        .unwrap();
    let named = report
        .problems
        .iter()
        .find(|p| p.contains(&a_name))
        .unwrap_or_else(|| panic!("{:?}", report.problems));
    assert!(named.contains(&format!("it holds key {b_key}")), "{named}");
    assert!(owner_key_id_of(&a_name).is_some());
}

/// A copy of the single-key fixture (opening it migrates the catalog).
fn copy_fixture(to: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/single-key");
    let store = to.join("store");
    std::fs::create_dir_all(&store).unwrap();
    for e in std::fs::read_dir(src.join("store")).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), store.join(e.file_name())).unwrap();
        }
    }
    let db = to.join("catalog.db");
    std::fs::copy(src.join("catalog.db"), &db).unwrap();
    (store, db, src.join("expected"))
}

const SINGLE_KEY_PASS: &str = "single key passphrase";

/// Files of a restored tree, by relative path, with their bytes.
fn files_of(root: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<_> = walkdir::WalkDir::new(root)
        .into_iter()
        .map(Result::unwrap)
        .filter(|e| e.file_type().is_file())
        .map(|e| {
            let rel = e
                .path()
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            (rel, std::fs::read(e.path()).unwrap())
        })
        .collect();
    out.sort();
    out
}

async fn legacy_restores(repo: &Repo, expected: &Path, out: &Path) {
    for (owner, name, count) in [("local", "docs", 1), ("tg:42", "notes", 2)] {
        let snaps = repo.snapshots(owner, None).await.unwrap();
        assert_eq!(snaps.len(), count, "{owner}");
        for s in snaps {
            let to = out.join(&s.short_id);
            repo.restore(
                &restore_opts(&s.root, &to, owner, Some(s.short_id.clone())),
                &NoProgress,
                &CancelFlag::new(),
            )
            .await
            .unwrap();
            assert_eq!(
                files_of(&expected.join(name)),
                files_of(&to.join(name)),
                "{owner}"
            );
        }
    }
}

#[tokio::test]
async fn a_single_key_repository_still_restores_and_its_owners_get_keys_for_new_data() {
    let dir = tempfile::tempdir().unwrap();
    let (store, db, expected) = copy_fixture(dir.path());
    let storage: Arc<dyn Storage> = Arc::new(DirStorage::open(&store).unwrap());
    let catalog = Catalog::open_file(&db).await.unwrap();
    let repo = Repo::open(catalog, storage.clone(), SINGLE_KEY_PASS, settings())
        .await
        .unwrap();
    assert!(repo.catalog.owner_keys(None).await.unwrap().is_empty());
    legacy_restores(&repo, &expected, &dir.path().join("out1")).await;

    // New data of an owner of the old repository: sealed with a key of its own.
    let src = dir.path().join("new/notes");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::copy(expected.join("notes/same.txt"), src.join("same.txt")).unwrap();
    std::fs::write(src.join("new.txt"), b"after the upgrade").unwrap();
    repo.backup(
        &backup_opts(&src, "tg:42", true),
        &NoProgress,
        &CancelFlag::new(),
    )
    .await
    .unwrap();
    let rows = repo.catalog.owner_keys(None).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].owner, "tg:42");
    let verified = repo.verify(true, &NoProgress).await.unwrap();
    assert!(verified.problems.is_empty(), "{:?}", verified.problems);

    // A new machine: the old snapshots (installation key) and the new one (owner key).
    let fresh = Catalog::open_file(&dir.path().join("fresh.db"))
        .await
        .unwrap();
    let (repo, report) = recover(fresh, storage, SINGLE_KEY_PASS, settings(), &NoProgress)
        .await
        .unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(report.snapshots, 4);
    legacy_restores_after_upgrade(&repo, &expected, &src, &dir.path().join("out2")).await;
}

async fn legacy_restores_after_upgrade(repo: &Repo, expected: &Path, new: &Path, out: &Path) {
    let docs = repo.snapshots("local", None).await.unwrap();
    assert_eq!(docs.len(), 1);
    let notes = repo.snapshots("tg:42", None).await.unwrap();
    assert_eq!(notes.len(), 3);
    for s in docs.iter().chain(&notes) {
        let to = out.join(&s.short_id);
        repo.restore(
            &restore_opts(&s.root, &to, &s.owner, Some(s.short_id.clone())),
            &NoProgress,
            &CancelFlag::new(),
        )
        .await
        .unwrap();
        let (name, want) = if s.owner == "local" {
            ("docs", expected.join("docs"))
        } else if s.root.ends_with("new/notes") {
            ("notes", new.to_path_buf())
        } else {
            ("notes", expected.join("notes"))
        };
        assert_eq!(
            files_of(&want),
            files_of(&to.join(name)),
            "{} {}",
            s.owner,
            s.root
        );
    }
    // Restoring an owner never uses another owner's key: local's ring holds no tg:42 key.
    let ring = repo.ring_for("local").await.unwrap();
    assert_eq!(ring.len(), 1, "the installation key only: {ring:?}");
    let e = repo
        .restore(
            &restore_opts("notes", out, "local", None),
            &NoProgress,
            &CancelFlag::new(),
        )
        .await
        .unwrap_err();
    assert!(matches!(e, Error::NotFound(_)), "{e}");
}

/// Names of the owner-key objects a store holds.
fn owner_key_objects(m: &storinator_shared::MemoryStorage) -> BTreeSet<String> {
    m.snapshot()
        .into_iter()
        .map(|(n, _)| n)
        .filter(|n| owner_key_id_of(n).is_some())
        .collect()
}

#[tokio::test]
async fn owner_keys_are_in_every_lane_even_one_added_later_and_any_lane_recovers() {
    use storinator_shared::MemoryStorage;
    use storinator_shared::storage::{Lane, Lanes};
    let dir = tempfile::tempdir().unwrap();
    let mem: Vec<Arc<MemoryStorage>> = (0..3)
        .map(|i| Arc::new(MemoryStorage::new(dir.path().join(format!("spool{i}")))))
        .collect();
    let lanes = |n: usize| -> Arc<dyn Storage> {
        let list = (0..n)
            .map(|i| Lane::ready(["a", "b", "c"][i], mem[i].clone() as Arc<dyn Storage>))
            .collect();
        Arc::new(Lanes::new(list, n, dir.path().join("spool")).unwrap())
    };
    let db = dir.path().join("catalog.db");
    let catalog = Catalog::open_file(&db).await.unwrap();
    let two = lanes(2);
    Repo::init(
        &catalog,
        two.as_ref(),
        PASS,
        storinator_shared::KdfParams::fast_for_tests(),
    )
    .await
    .unwrap();
    let repo = Repo::open(catalog, two, PASS, settings()).await.unwrap();
    let (mine, theirs) = (dir.path().join("l/data"), dir.path().join("t/data"));
    make_tree(&mine);
    std::fs::create_dir_all(&theirs).unwrap();
    std::fs::write(theirs.join("a.bin"), bytes(300_000, 5)).unwrap();
    for (src, owner) in [(&mine, "local"), (&theirs, "tg:7")] {
        repo.backup(
            &backup_opts(src, owner, true),
            &NoProgress,
            &CancelFlag::new(),
        )
        .await
        .unwrap();
    }
    let keys = owner_key_objects(&mem[0]);
    assert_eq!(keys.len(), 2, "{keys:?}");
    assert_eq!(
        owner_key_objects(&mem[1]),
        keys,
        "every lane holds every owner key"
    );

    // A third lane: it gets every key before its first pack.
    let repo = Repo::open(
        Catalog::open_file(&db).await.unwrap(),
        lanes(3),
        PASS,
        settings(),
    )
    .await
    .unwrap();
    std::fs::write(theirs.join("b.bin"), bytes(100_000, 6)).unwrap();
    repo.backup(
        &backup_opts(&theirs, "tg:7", true),
        &NoProgress,
        &CancelFlag::new(),
    )
    .await
    .unwrap();
    assert_eq!(
        owner_key_objects(&mem[2]),
        keys,
        "the new lane holds every owner key"
    );
    assert!(
        mem[2]
            .snapshot()
            .iter()
            .any(|(n, _)| n.starts_with("key-") && owner_key_id_of(n).is_none())
    );

    // A new machine with lane b alone: every owner's snapshots come back.
    let fresh = Catalog::open_file(&dir.path().join("fresh.db"))
        .await
        .unwrap();
    let (repo, report) = recover(fresh, mem[1].clone(), PASS, settings(), &NoProgress)
        .await
        .unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(report.snapshots, 3);
    restores_identical(&repo, "local", &mine, &dir.path().join("out-l"), 1).await;
    let latest = repo.snapshots("tg:7", None).await.unwrap().pop().unwrap();
    let out = dir.path().join("out-t");
    repo.restore(
        &restore_opts(&latest.root, &out, "tg:7", None),
        &NoProgress,
        &CancelFlag::new(),
    )
    .await
    .unwrap();
    assert_eq!(files_of(&theirs), files_of(&out.join("data")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hosts_making_an_owners_first_key_at_once_use_one_and_deduplicate() {
    let f = Fixture::new().await;
    // A second host: its own process state, the same catalog and storage.
    let other = Fixture::open_repo(f.dir.path(), f.storage.clone(), false).await;
    for i in 0..12 {
        let owner = format!("tg:{}", 500 + i);
        let (a, b) = tokio::join!(f.repo.owner_key(&owner), other.owner_key(&owner));
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!(a.key_id, b.key_id, "{owner}: both hosts seal with one key");
        let name = format!("key-owner-{}.enc", a.key_id);
        assert!(
            f.storage.inner.snapshot().iter().any(|(n, _)| *n == name),
            "{name}"
        );
        let recorded = f.repo.catalog.owner_keys(Some(&owner)).await.unwrap();
        assert!((1..=2).contains(&recorded.len()), "{recorded:?}");
        assert_eq!(recorded[0].key_id, a.key_id, "the first recorded one");
    }
    // One owner's identical data, backed up from both hosts: the second stores no file data.
    let (one, two) = (f.path("h1/data"), f.path("h2/data"));
    make_tree(&one);
    make_tree(&two);
    let first = f
        .repo
        .backup(
            &backup_opts(&one, "tg:500", true),
            &NoProgress,
            &CancelFlag::new(),
        )
        .await
        .unwrap();
    assert!(first.new_data_chunks > 0);
    let second = other
        .backup(
            &backup_opts(&two, "tg:500", true),
            &NoProgress,
            &CancelFlag::new(),
        )
        .await
        .unwrap();
    assert_eq!(second.new_data_chunks, 0, "deduplicated across hosts");
}
