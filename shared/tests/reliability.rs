//! Concurrency and crash leftovers: backups side by side in one process and in two, runs that
//! died holding locks and unfinished packs, objects the catalog doesn't know, damaged chunks.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use storinator_shared::catalog::CHUNK_LISTS;
use storinator_shared::catalog::{NewContent, NewEntry, RunRow};
use storinator_shared::format::pack::{BlobKind, FLAG_ENCRYPTED, FLAG_MAC, PackEntry};
use storinator_shared::{
    BackupOptions, CancelFlag, EntryKind, Error, NoProgress, RestoreOptions, SnapshotInfo, Storage,
};

fn backup_opts(path: &std::path::Path) -> BackupOptions {
    BackupOptions {
        path: path.to_path_buf(),
        owner: "local".into(),
        encrypt: true,
    }
}

fn restore_opts(path: &std::path::Path, to: &std::path::Path) -> RestoreOptions {
    RestoreOptions {
        path: path.to_string_lossy().into_owned(),
        to: to.to_path_buf(),
        snapshot: None,
        owner: "local".into(),
        overwrite: false,
        within: None,
        same_owner: None,
    }
}

/// A folder of `n` files of `size` bytes, distinct contents.
fn make_folder(path: &std::path::Path, n: u64, size: usize, seed: u64) {
    std::fs::create_dir_all(path).unwrap();
    for i in 0..n {
        std::fs::write(
            path.join(format!("f{i:02}.bin")),
            bytes(size, seed * 100 + i),
        )
        .unwrap();
    }
}

async fn backup(
    repo: &storinator_shared::Repo,
    path: &std::path::Path,
) -> Result<storinator_shared::BackupSummary, Error> {
    repo.backup(&backup_opts(path), &NoProgress, &CancelFlag::new())
        .await
}

/// Waits until `cond` holds (bounded).
async fn until(what: &str, cond: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Paths with more than one current entry row in a root: must never exist.
async fn duplicate_current_rows(f: &Fixture) -> Vec<(i64, String, i64)> {
    sqlx::query_as(
        "SELECT root_id, path, COUNT(*) FROM entries WHERE to_seq IS NULL \
         GROUP BY root_id, path HAVING COUNT(*) > 1",
    )
    .fetch_all(f.repo.catalog.pool())
    .await
    .unwrap()
}

fn spool_entries(f: &Fixture) -> Vec<String> {
    std::fs::read_dir(f.storage.spool_dir())
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_backups_in_one_process_at_once_both_succeed() {
    let f = Fixture::new().await;
    let (a, b) = (f.path("src/a"), f.path("src/b"));
    make_folder(&a, 6, 150_000, 1);
    make_folder(&b, 6, 150_000, 2);
    // Slow uploads, so A still has packs in its spool when B starts.
    f.storage.delay_ms.store(40, Ordering::Relaxed);
    let second = async {
        until("A's first upload", || f.storage.put_count() >= 1).await;
        f.repo
            .backup(&backup_opts(&b), &NoProgress, &CancelFlag::new())
            .await
    };
    let (ra, rb) = tokio::join!(backup(&f.repo, &a), second);
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert!(ra.packs >= 3 && rb.packs >= 3, "{} {}", ra.packs, rb.packs);
    f.storage.delay_ms.store(0, Ordering::Relaxed);
    for (src, name) in [(&a, "a"), (&b, "b")] {
        let out = f.path(&format!("out-{name}"));
        f.repo
            .restore(&restore_opts(src, &out), &NoProgress, &CancelFlag::new())
            .await
            .unwrap();
        assert_eq!(describe_tree(src), describe_tree(&out.join(name)));
    }
    assert!(spool_entries(&f).is_empty(), "{:?}", spool_entries(&f));
    assert!(f.repo.catalog.runs().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_repos_on_one_database_back_up_one_root_one_after_the_other() {
    let f = Fixture::new().await;
    // A second process: its own catalog handle and repository on the same files.
    let other = Fixture::open_repo(f.dir.path(), f.storage.clone(), false).await;
    let src = f.path("src/data");
    make_folder(&src, 6, 150_000, 3);
    f.storage.delay_ms.store(40, Ordering::Relaxed);
    let second = async {
        until("the first backup's first upload", || {
            f.storage.put_count() >= 1
        })
        .await;
        // Changed meanwhile: the second snapshot differs from the first.
        std::fs::write(src.join("new.txt"), b"added during the first backup").unwrap();
        other
            .backup(&backup_opts(&src), &NoProgress, &CancelFlag::new())
            .await
    };
    let (r1, r2) = tokio::join!(backup(&f.repo, &src), second);
    let (r1, r2) = (r1.unwrap(), r2.unwrap());
    let (first, later) = if r1.snapshot.seq == 1 {
        (r1, r2)
    } else {
        (r2, r1)
    };
    assert_eq!((first.snapshot.seq, later.snapshot.seq), (1, 2));
    // The later one waited for the first to commit before it looked at the catalog: it read
    // only the file added meanwhile, and its snapshot has it.
    assert_eq!(first.snapshot.bytes_read, 6 * 150_000);
    assert_eq!(later.snapshot.bytes_read, 29, "one waited for the other");
    assert_eq!(later.snapshot.files, 7);
    assert!(duplicate_current_rows(&f).await.is_empty());
    f.storage.delay_ms.store(0, Ordering::Relaxed);
    let out = f.path("out");
    f.repo
        .restore(&restore_opts(&src, &out), &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    assert_eq!(describe_tree(&src), describe_tree(&out.join("data")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_backup_of_a_busy_root_fails_fast_naming_the_other_run_when_asked() {
    let f = Fixture::new().await;
    let other = Fixture::open_repo(f.dir.path(), f.storage.clone(), false)
        .await
        .with_lock_wait(false);
    let src = f.path("src/data");
    make_folder(&src, 6, 150_000, 4);
    f.storage.delay_ms.store(40, Ordering::Relaxed);
    let second = async {
        until("the first upload", || f.storage.put_count() >= 1).await;
        other
            .backup(&backup_opts(&src), &NoProgress, &CancelFlag::new())
            .await
    };
    let (r1, r2) = tokio::join!(backup(&f.repo, &src), second);
    r1.unwrap();
    let e = r2.unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, Error::Locked { .. }), "{msg}");
    assert!(
        msg.contains(&format!(
            "{} (owner local) is being backed up by another run",
            src.canonicalize().unwrap().display()
        )) && msg.contains(&format!("pid {} on test", std::process::id())),
        "{msg}"
    );
    assert!(msg.contains("\nhint: "), "{msg}");
    // The first one is done: now it goes through.
    f.storage.delay_ms.store(0, Ordering::Relaxed);
    other
        .backup(&backup_opts(&src), &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
}

/// A run registered as `id` whose liveness is `lock` (a locked file: alive on this host) or
/// nothing (dead: its lock file does not exist).
async fn fake_run(f: &Fixture, id: &str, lock: Option<&std::path::Path>) {
    let lock_path = lock.map_or_else(|| f.path(&format!("gone-{id}/lock")), |p| p.to_path_buf());
    f.repo
        .catalog
        .run_started(&RunRow {
            id: id.into(),
            host: "test".into(),
            pid: 4242,
            lock_path: lock_path.to_string_lossy().into_owned(),
            started_at: 1,
            lease_until: i64::MAX,
        })
        .await
        .unwrap();
}

/// An unfinished pack of `run`, its object already in storage (the crash came after upload).
async fn unfinished_pack(f: &Fixture, run: &str, n: u8) -> String {
    let id = hex::encode([n; 16]);
    f.repo
        .catalog
        .pack_uploading(&id, 5, true, run)
        .await
        .unwrap();
    f.storage
        .put_bytes(&format!("{id}.enc"), b"bytes".to_vec())
        .await
        .unwrap();
    id
}

fn stored_names(f: &Fixture) -> Vec<String> {
    f.storage
        .inner
        .snapshot()
        .into_iter()
        .map(|(n, _)| n)
        .collect()
}

#[tokio::test]
async fn work_of_a_dead_run_is_reclaimed_and_a_live_runs_is_left_alone() {
    let f = Fixture::new().await;
    let (busy, free) = (f.path("src/busy"), f.path("src/free"));
    make_folder(&busy, 2, 10_000, 5);
    make_folder(&free, 2, 10_000, 6);
    let (busy_root, free_root) = (
        busy.canonicalize().unwrap().display().to_string(),
        free.canonicalize().unwrap().display().to_string(),
    );
    // A live run (another process on this host, holding its flock) backing up `busy`.
    let live_lock_path = f.path("live.lock");
    let live_lock = std::fs::File::create(&live_lock_path).unwrap();
    live_lock.lock().unwrap();
    fake_run(&f, "live", Some(&live_lock_path)).await;
    let live_pack = unfinished_pack(&f, "live", 1).await;
    assert!(
        f.repo
            .catalog
            .try_lock_root("local", &busy_root, "live", 1)
            .await
            .unwrap()
            .is_none()
    );
    // A run that was killed while backing up `free`, after uploading a pack it never
    // recorded as stored; and a row an older version left without a run.
    fake_run(&f, "dead", None).await;
    let dead_pack = unfinished_pack(&f, "dead", 2).await;
    let legacy_pack = unfinished_pack(&f, "dead", 3).await;
    sqlx::query("UPDATE packs SET run_id = NULL WHERE id = $1")
        .bind(&legacy_pack)
        .execute(f.repo.catalog.pool())
        .await
        .unwrap();
    assert!(
        f.repo
            .catalog
            .try_lock_root("local", &free_root, "dead", 1)
            .await
            .unwrap()
            .is_none()
    );
    // A dead run's spool folder.
    let dead_spool = f.storage.spool_dir().join("run-dead");
    std::fs::create_dir_all(&dead_spool).unwrap();
    std::fs::write(dead_spool.join("x.partial"), b"half a pack").unwrap();

    // verify names the leftovers of the dead run (not the live one's).
    let report = f.repo.verify(false, &NoProgress).await.unwrap();
    for p in [&dead_pack, &legacy_pack] {
        assert!(
            report
                .problems
                .iter()
                .any(|m| m.contains(&format!("pack {p}.enc was left unfinished"))),
            "{:?}",
            report.problems
        );
    }
    assert!(
        !report.problems.iter().any(|m| m.contains(&live_pack)),
        "{:?}",
        report.problems
    );

    // The dead run's root lock is taken over; its leftovers go, the live run's stay.
    f.repo
        .backup(&backup_opts(&free), &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    let names = stored_names(&f);
    assert!(names.contains(&format!("{live_pack}.enc")), "{names:?}");
    assert!(!names.contains(&format!("{dead_pack}.enc")), "{names:?}");
    assert!(!names.contains(&format!("{legacy_pack}.enc")), "{names:?}");
    let unfinished = f.repo.catalog.unfinished_packs().await.unwrap();
    assert_eq!(unfinished, vec![(live_pack.clone(), Some("live".into()))]);
    let runs: Vec<String> = f
        .repo
        .catalog
        .runs()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(runs, vec!["live".to_string()]);
    assert!(!dead_spool.exists());

    // The live run's root stays locked: a fail-fast backup names it.
    let repo = Fixture::open_repo(f.dir.path(), f.storage.clone(), false)
        .await
        .with_lock_wait(false);
    let e = repo
        .backup(&backup_opts(&busy), &NoProgress, &CancelFlag::new())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("run live (pid 4242 on test"), "{e}");
    // It dies (the kernel drops its flock): the next backup takes over and cleans up.
    drop(live_lock);
    repo.backup(&backup_opts(&busy), &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    assert!(!stored_names(&f).contains(&format!("{live_pack}.enc")));
    assert!(f.repo.catalog.unfinished_packs().await.unwrap().is_empty());
    assert!(f.repo.catalog.runs().await.unwrap().is_empty());
    let report = f.repo.verify(true, &NoProgress).await.unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

#[tokio::test]
async fn a_run_from_another_host_is_alive_until_its_lease_ends() {
    let f = Fixture::new().await;
    let src = f.path("src/data");
    make_folder(&src, 1, 1000, 7);
    let root = src.canonicalize().unwrap().display().to_string();
    let now = storinator_shared::catalog::now_ms();
    let mut run = RunRow {
        id: "far".into(),
        host: "another-host".into(),
        pid: 1,
        // A path that exists here proves nothing about a process on another host.
        lock_path: f.path("nothing-holds-this").to_string_lossy().into_owned(),
        started_at: now,
        lease_until: now + 60_000,
    };
    f.repo.catalog.run_started(&run).await.unwrap();
    let pack = unfinished_pack(&f, "far", 9).await;
    f.repo
        .catalog
        .try_lock_root("local", &root, "far", now)
        .await
        .unwrap();
    let repo = Fixture::open_repo(f.dir.path(), f.storage.clone(), false)
        .await
        .with_lock_wait(false);
    let e = repo
        .backup(&backup_opts(&src), &NoProgress, &CancelFlag::new())
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Locked { .. }), "{e}");
    // The lease runs out without renewal: the run is dead.
    f.repo.catalog.run_ended("far").await.unwrap();
    run.lease_until = now - 1;
    f.repo.catalog.run_started(&run).await.unwrap();
    f.repo
        .catalog
        .try_lock_root("local", &root, "far", now)
        .await
        .unwrap();
    repo.backup(&backup_opts(&src), &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    assert!(!stored_names(&f).contains(&format!("{pack}.enc")));
}

#[tokio::test]
async fn verify_lists_objects_the_catalog_does_not_know_and_leaves_them() {
    let f = Fixture::new().await;
    let src = f.path("src/data");
    make_folder(&src, 2, 10_000, 8);
    f.repo
        .backup(&backup_opts(&src), &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    let stranger = format!("{}.enc", hex::encode([0xab; 16]));
    f.storage.put_bytes(&stranger, vec![1, 2, 3]).await.unwrap();
    f.storage
        .put_bytes("notes.txt", b"hello".to_vec())
        .await
        .unwrap();
    let report = f.repo.verify(false, &NoProgress).await.unwrap();
    assert_eq!(report.problems.len(), 2, "{:?}", report.problems);
    assert!(
        report.problems[0].starts_with(&format!(
            "object {stranger} (3 bytes) is in storage but not in the catalog"
        )) && report.problems[1]
            .starts_with("object notes.txt (5 bytes) is in storage but not in the catalog"),
        "{:?}",
        report.problems
    );
    assert!(
        stored_names(&f).contains(&stranger),
        "verify deletes nothing"
    );
}

/// The pack and offset of the first chunk of `path`'s content.
async fn chunk_of(f: &Fixture, path: &str) -> (String, i64) {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT p.id, c.\"offset\" FROM entries e JOIN {CHUNK_LISTS} cc ON cc.content_id = e.content_id \
         JOIN chunks c ON c.no = cc.chunk_no JOIN packs p ON p.no = c.pack_no \
         WHERE e.path = $1 ORDER BY cc.seq LIMIT 1"
    )))
    .bind(path)
    .fetch_one(f.repo.catalog.pool())
    .await
    .unwrap()
}

#[tokio::test]
async fn verify_read_data_names_exactly_the_files_of_each_bad_chunk_and_checks_everything() {
    let f = Fixture::new().await;
    let src = f.path("src/data");
    // Twelve small files in one pack, and a copy of f03 (same chunk, two files).
    make_folder(&src, 12, 8_000, 9);
    std::fs::copy(src.join("f03.bin"), src.join("f03-copy.bin")).unwrap();
    f.repo
        .backup(&backup_opts(&src), &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    let clean = f.repo.verify(true, &NoProgress).await.unwrap();
    assert!(clean.problems.is_empty(), "{:?}", clean.problems);
    let (pack3, at3) = chunk_of(&f, "data/f03.bin").await;
    let (pack7, at7) = chunk_of(&f, "data/f07.bin").await;
    assert_eq!(pack3, pack7, "the files share a pack");
    for at in [at3, at7] {
        assert!(
            f.storage
                .inner
                .corrupt(&format!("{pack3}.enc"), at as usize + 40)
        );
    }
    let report = f.repo.verify(true, &NoProgress).await.unwrap();
    assert_eq!(report.problems.len(), 2, "{:#?}", report.problems);
    let root = src.canonicalize().unwrap().display().to_string();
    let for_file = |name: &str| {
        report
            .problems
            .iter()
            .find(|p| p.contains(&format!("{root}: data/{name}")))
            .cloned()
            .unwrap_or_else(|| panic!("no problem names {name}: {:#?}", report.problems))
    };
    let p3 = for_file("f03.bin");
    assert!(
        p3.contains("authentication failed")
            && p3.ends_with(&format!(
                "; affects {root}: data/f03-copy.bin, {root}: data/f03.bin"
            )),
        "{p3}"
    );
    let p7 = for_file("f07.bin");
    assert!(
        p7.ends_with(&format!("; affects {root}: data/f07.bin")),
        "{p7}"
    );
    // Everything else was checked, past both bad chunks.
    assert_eq!(report.blobs_checked, clean.blobs_checked - 2);
}

/// Backs up `src` as `local`: its root, the entry of `data/f00.bin` and the snapshot's object,
/// what the tests that commit a snapshot by hand start from.
async fn backed_up(
    f: &Fixture,
    src: &std::path::Path,
) -> (
    String,
    storinator_shared::EntryRow,
    storinator_shared::ChunkId,
) {
    f.repo
        .backup(&backup_opts(src), &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    let root = src.canonicalize().unwrap().display().to_string();
    let root_id = f.root_id(&root).await;
    let mut entries = f.repo.catalog.current_entries(root_id).await.unwrap();
    let file = entries.remove("data/f00.bin").unwrap();
    let blob: Vec<u8> = sqlx::query_scalar("SELECT blob_id FROM snapshots")
        .fetch_one(f.repo.catalog.pool())
        .await
        .unwrap();
    (
        root,
        file,
        storinator_shared::ChunkId::from_slice(&blob).unwrap(),
    )
}

/// The snapshot a run of `local` named "late" commits by hand: one encrypted file of `bytes`
/// under `root`.
fn late_snapshot(root: String, bytes: u64) -> SnapshotInfo {
    SnapshotInfo {
        short_id: "feedfeedfeed".into(),
        owner: "local".into(),
        root,
        seq: 0,
        hostname: "test".into(),
        encrypted: true,
        started_at: 0,
        finished_at: 0,
        files: 1,
        dirs: 0,
        bytes,
        bytes_read: 0,
        new_chunks: 0,
        bytes_stored: 0,
        warnings: 0,
    }
}

#[tokio::test]
async fn a_snapshot_referencing_a_pack_known_to_be_missing_is_never_committed() {
    let f = Fixture::new().await;
    let src = f.path("src/data");
    make_folder(&src, 1, 50_000, 10);
    let (root, file, blob) = backed_up(&f, &src).await;
    let (pack, _) = chunk_of(&f, "data/f00.bin").await;
    // Verify found the pack missing between this run's start and its commit.
    f.repo
        .catalog
        .set_pack_state(&pack, "missing")
        .await
        .unwrap();
    fake_run(&f, "late", None).await;
    let info = late_snapshot(root, 50_000);
    let item = NewEntry {
        path: file.path.clone(),
        kind: EntryKind::File,
        size: file.size,
        mtime_ns: file.mtime_ns + 1,
        mode: file.mode,
        inode: file.inode,
        target: None,
        owner: file.owner.clone(),
        content: NewContent::Existing(file.content_id.unwrap()),
        same: false,
    };
    // Without the root's lock nothing is committed at all.
    let e = f
        .repo
        .catalog
        .commit_snapshot("late", (&info, ""), &blob, &[], std::slice::from_ref(&item))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("lost the lock"), "{e}");
    f.repo
        .catalog
        .try_lock_root("local", &info.root, "late", 1)
        .await
        .unwrap();
    let e = f
        .repo
        .catalog
        .commit_snapshot("late", (&info, ""), &blob, &[], std::slice::from_ref(&item))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Changed(_)), "{e}");
    assert!(e.is_retryable());
    assert_eq!(f.repo.snapshots("local", None).await.unwrap().len(), 1);
    assert!(duplicate_current_rows(&f).await.is_empty());

    f.repo
        .catalog
        .set_pack_state(&pack, "stored")
        .await
        .unwrap();
    // A snapshot whose own object has no chunk row (a prune deleted it after the backup
    // stored it; a foreign key refused it until migration 0023) is refused the same way.
    let e = f
        .repo
        .catalog
        .commit_snapshot(
            "late",
            (&info, ""),
            &storinator_shared::ChunkId([8; 32]),
            &[],
            std::slice::from_ref(&item),
        )
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("own data was deleted by a prune"),
        "{e}"
    );
    assert!(e.is_retryable());
    assert_eq!(f.repo.snapshots("local", None).await.unwrap().len(), 1);

    // So is a new content on a chunk the catalog has no row for, before anything is written.
    let on_a_lost_chunk = NewEntry {
        path: "data/new.bin".into(),
        size: 5,
        owner: item.owner.clone(),
        content: NewContent::New {
            sha256: [7; 32],
            size: 5,
            chunks: vec![storinator_shared::ChunkId([9; 32])],
        },
        ..item
    };
    let e = f
        .repo
        .catalog
        .commit_snapshot("late", (&info, ""), &blob, &[], &[on_a_lost_chunk])
        .await
        .unwrap_err();
    assert!(e.to_string().contains("deleted by a prune"), "{e}");
    assert!(e.is_retryable());
    assert_eq!(f.repo.snapshots("local", None).await.unwrap().len(), 1);
    let contents: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM contents WHERE size = 5")
        .fetch_one(f.repo.catalog.pool())
        .await
        .unwrap();
    assert_eq!(contents, 0, "the refused content was recorded");

    // The file's pack is found missing again, and the file stored again (here as one chunk of
    // another id, as the catalog sees it): its content (found by its SHA-256) keeps its id,
    // below 0, and its list in `content_chunks` is replaced by the one new chunk (a content
    // numbered as its chunk, migration 0027, is one recorded as one chunk from the start).
    f.repo
        .catalog
        .set_pack_state(&pack, "missing")
        .await
        .unwrap();
    let (again, object) = (
        storinator_shared::ChunkId([6; 32]),
        storinator_shared::ChunkId([5; 32]),
    );
    let stored = |id, offset| PackEntry {
        kind: BlobKind::Data,
        flags: FLAG_ENCRYPTED | FLAG_MAC,
        id,
        offset,
        length: 100,
        raw_length: 90,
    };
    f.repo
        .catalog
        .pack_stored(
            "again",
            200,
            true,
            "again",
            &[stored(again, 0), stored(object, 100)],
        )
        .await
        .unwrap();
    let content = file.content_id.unwrap();
    let before = f.repo.catalog.content_chunks_of(&[content]).await.unwrap();
    assert!(before[&content].len() > 1, "several chunks: {before:?}");
    let stored_again = NewEntry {
        path: file.path.clone(),
        kind: EntryKind::File,
        size: file.size,
        mtime_ns: file.mtime_ns + 2,
        mode: file.mode,
        inode: file.inode,
        target: None,
        owner: file.owner.clone(),
        content: NewContent::New {
            sha256: file.sha256.unwrap(),
            size: file.size,
            chunks: vec![again],
        },
        same: false,
    };
    // (Under the key the content was recorded with: the owner's.)
    let key = f.repo.catalog.owner_keys(Some("local")).await.unwrap()[0]
        .key_id
        .clone();
    f.repo
        .catalog
        .commit_snapshot("late", (&info, &key), &object, &[], &[stored_again])
        .await
        .unwrap();
    let after = f.repo.catalog.content_chunks_of(&[content]).await.unwrap();
    let ids: Option<Vec<_>> = after
        .get(&content)
        .map(|l| l.iter().map(|c| c.id).collect());
    assert_eq!(
        ids,
        Some(vec![again]),
        "the repaired content keeps its id and names the new chunk"
    );
}

/// A content of one chunk is numbered as its chunk (migration 0027) and a commit finds it by
/// that number: an item said to be that one chunk but with another SHA-256 than the content
/// recorded for it is refused, naming the content, and nothing is committed.
#[tokio::test]
async fn an_item_whose_one_chunk_is_another_files_content_is_refused() {
    let f = Fixture::new().await;
    let src = f.path("src/data");
    make_folder(&src, 1, 1_000, 10);
    let (root, file, blob) = backed_up(&f, &src).await;
    let content = file.content_id.unwrap();
    let pool = f.repo.catalog.pool();
    let chunk: Vec<u8> = sqlx::query_scalar("SELECT id FROM chunks WHERE no = $1")
        .bind(content)
        .fetch_one(pool)
        .await
        .unwrap();
    fake_run(&f, "late", None).await;
    f.repo
        .catalog
        .try_lock_root("local", &root, "late", 1)
        .await
        .unwrap();
    let info = late_snapshot(root, file.size);
    let item = NewEntry {
        path: "data/other.bin".into(),
        kind: EntryKind::File,
        size: file.size,
        mtime_ns: file.mtime_ns,
        mode: file.mode,
        inode: file.inode + 1,
        target: None,
        owner: file.owner.clone(),
        content: NewContent::New {
            sha256: [7; 32],
            size: file.size,
            chunks: vec![storinator_shared::ChunkId::from_slice(&chunk).unwrap()],
        },
        same: false,
    };
    let key = f.repo.catalog.owner_keys(Some("local")).await.unwrap()[0]
        .key_id
        .clone();
    let e = f
        .repo
        .catalog
        .commit_snapshot("late", (&info, &key), &blob, &[], &[item])
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Invalid(_)), "{e}");
    assert!(
        e.to_string().starts_with(&format!(
            "content {content} of the catalog is not the file content 070707"
        )),
        "{e}"
    );
    assert_eq!(f.repo.snapshots("local", None).await.unwrap().len(), 1);
    let recorded: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM contents")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(recorded, 1);
}

#[tokio::test]
async fn owners_are_local_or_a_numeric_telegram_id() {
    let f = Fixture::new().await;
    let src = f.path("src/data");
    make_folder(&src, 1, 100, 11);
    for bad in [
        "tg:bob", "tg:", "tg:-5", "tg:0", "tg:012", "root", "tg:1 ", "",
    ] {
        let mut o = backup_opts(&src);
        o.owner = bad.into();
        let e = f
            .repo
            .backup(&o, &NoProgress, &CancelFlag::new())
            .await
            .unwrap_err();
        assert!(
            e.to_string().starts_with(&format!(
                "invalid owner {bad:?}: owners are `local` or `tg:<numeric Telegram user id>`"
            )),
            "{e}"
        );
        let mut r = restore_opts(&src, &f.path("out"));
        r.owner = bad.into();
        assert!(
            f.repo
                .restore(&r, &NoProgress, &CancelFlag::new())
                .await
                .is_err()
        );
        assert!(f.repo.snapshots(bad, None).await.is_err());
        assert!(f.repo.ls(bad, "data", None, false).await.is_err());
    }
    assert!(f.repo.catalog.roots("tg:bob").await.unwrap().is_empty());
    let mut o = backup_opts(&src);
    o.owner = "tg:123456789".into();
    f.repo
        .backup(&o, &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
}

#[tokio::test]
async fn a_failed_upload_leaves_no_object_row_or_spool_behind() {
    let f = Fixture::new().await;
    let src = f.path("src/data");
    make_folder(&src, 6, 150_000, 12);
    f.storage.fail_puts_after.store(2, Ordering::SeqCst);
    f.repo
        .backup(&backup_opts(&src), &NoProgress, &CancelFlag::new())
        .await
        .unwrap_err();
    assert!(f.repo.catalog.unfinished_packs().await.unwrap().is_empty());
    assert!(f.repo.catalog.runs().await.unwrap().is_empty());
    assert!(spool_entries(&f).is_empty(), "{:?}", spool_entries(&f));
    let stored: Vec<String> = f
        .repo
        .catalog
        .packs()
        .await
        .unwrap()
        .into_iter()
        .map(|p| format!("{}.enc", p.id))
        .collect();
    let mut objects: Vec<String> = stored_names(&f)
        .into_iter()
        .filter(|n| !n.starts_with("key-"))
        .collect();
    objects.sort();
    let mut stored = stored;
    stored.sort();
    assert_eq!(objects, stored, "every object is a known pack");
}

/// Each owner the entries of a commit name is stored once (a row of `owners`) and read back as
/// it was, whatever it holds: names unknown, an empty name (which is not the unknown one),
/// user and group swapped, a group without a user, no owner at all (no row). A later commit
/// names the same rows again. On PostgreSQL too (`STORINATOR_TEST_DB=postgres`).
#[tokio::test]
async fn entry_owners_are_stored_once_each_and_read_back_as_they_were() {
    use storinator_shared::catalog::Owner;
    // A uid above i32's range.
    const BIG: u32 = 4_000_000_001;
    let f = Fixture::new().await;
    // A stored snapshot's object, for the commits below to name as theirs.
    let src = f.path("src/data");
    make_folder(&src, 1, 1, 11);
    f.repo
        .backup(&backup_opts(&src), &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    let blob: Vec<u8> = sqlx::query_scalar("SELECT blob_id FROM snapshots")
        .fetch_one(f.repo.catalog.pool())
        .await
        .unwrap();
    let blob = storinator_shared::ChunkId::from_slice(&blob).unwrap();
    fake_run(&f, "owners", None).await;
    let root = "/owners";
    f.repo
        .catalog
        .try_lock_root("local", root, "owners", 1)
        .await
        .unwrap();
    let owner =
        |uid: Option<u32>, gid: Option<u32>, user: Option<&str>, group: Option<&str>| Owner {
            uid,
            gid,
            user: user.map(str::to_string),
            group: group.map(str::to_string),
        };
    let owners = [
        owner(Some(0), Some(0), Some("root"), Some("root")),
        owner(Some(BIG), Some(BIG), None, None),
        owner(Some(BIG), Some(BIG), Some(""), None),
        owner(Some(BIG), Some(BIG), None, Some("")),
        owner(Some(BIG), Some(4321), Some("u"), Some("g")),
        owner(Some(BIG), Some(4321), Some("g"), Some("u")),
        Owner::default(),
        owner(None, Some(7), None, Some("seven")),
        owner(Some(0), Some(0), Some("root"), Some("root")),
    ];
    let kinds = [EntryKind::Dir, EntryKind::File, EntryKind::Symlink];
    let mut commits = Vec::new();
    for n in 1..=2u8 {
        let items: Vec<NewEntry> = owners
            .iter()
            .enumerate()
            .map(|(i, o)| NewEntry {
                path: format!("d/p{i}"),
                kind: kinds[i % 3],
                size: 0,
                mtime_ns: i64::from(n),
                mode: 0o644,
                inode: i as u64,
                target: (kinds[i % 3] == EntryKind::Symlink).then(|| "t".to_string()),
                owner: o.clone(),
                content: NewContent::None,
                same: false,
            })
            .collect();
        let info = SnapshotInfo {
            short_id: format!("{n:0>12}"),
            owner: "local".into(),
            root: root.into(),
            seq: 0,
            hostname: "test".into(),
            encrypted: true,
            started_at: 0,
            finished_at: i64::from(n),
            files: 0,
            dirs: 0,
            bytes: 0,
            bytes_read: 0,
            new_chunks: 0,
            bytes_stored: 0,
            warnings: 0,
        };
        let catalog = &f.repo.catalog;
        let seq = catalog.commit_snapshot("owners", (&info, ""), &blob, &[], &items);
        commits.push((seq.await.unwrap(), items));
    }
    let root_id = f.root_id(root).await;
    for (seq, items) in &commits {
        let rows = f.repo.catalog.entries_under(root_id, *seq, "d").await;
        let got: Vec<_> = rows
            .unwrap()
            .into_iter()
            .map(|e| (e.path, e.kind, e.mtime_ns, e.target, e.owner))
            .collect();
        let want: Vec<_> = items
            .iter()
            .map(|i| {
                (
                    i.path.clone(),
                    i.kind,
                    i.mtime_ns,
                    i.target.clone(),
                    i.owner.clone(),
                )
            })
            .collect();
        assert_eq!(got, want, "snapshot {seq}");
    }
    // (The backup above recorded the test's own user: the root/root row is counted apart.)
    let stored: Vec<i64> = sqlx::query_scalar(
        "SELECT COUNT(*) FROM owners WHERE uid IS NULL OR uid = $1 \
         UNION ALL SELECT COUNT(*) FROM owners WHERE uid = 0 AND user_name = 'root'",
    )
    .bind(i64::from(BIG))
    .fetch_all(f.repo.catalog.pool())
    .await
    .unwrap();
    assert_eq!(stored, [6, 1], "one row per owner named, none for no owner");
}

/// The chat names the entries it shows by handles. Handles it made before are read, not
/// written: a page shown again doesn't wait for the write lock a committing backup holds
/// (seconds, for a big one), only a path shown for the first time does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handles_made_before_are_read_while_another_writer_holds_the_lock() {
    let f = Fixture::new().await;
    let src = f.path("src/a");
    make_folder(&src, 3, 100, 7);
    backup(&f.repo, &src).await.unwrap();
    let root_id = f.root_id(&src.to_string_lossy()).await;
    let catalog = &f.repo.catalog;
    let made = catalog
        .entry_handles(root_id, &["a/f00.bin", "a/f01.bin", "a/f00.bin"])
        .await
        .unwrap();
    assert_eq!(made[0], made[2]);
    assert_ne!(made[0], made[1]);

    let writer = storinator_shared::catalog::begin_write(catalog.pool())
        .await
        .unwrap();
    // Bounded only so that a broken build fails instead of waiting out the busy timeout.
    let again = tokio::time::timeout(
        Duration::from_secs(20),
        catalog.entry_handles(root_id, &["a/f01.bin", "a/f00.bin"]),
    )
    .await
    .expect("handles made before waited for the write lock");
    assert_eq!(again.unwrap(), [made[1], made[0]]);
    writer.rollback().await.unwrap();

    // A path not shown before gets a new handle, beside the old ones, once the lock is free.
    let mixed = catalog
        .entry_handles(root_id, &["a/f02.bin", "a/f00.bin"])
        .await
        .unwrap();
    assert_eq!(mixed[1], made[0]);
    assert!(!made.contains(&mixed[0]), "{mixed:?} {made:?}");
}
