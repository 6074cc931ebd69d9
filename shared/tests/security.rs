//! Issue 15: what someone who can post into storage, or a local user who can write inside a
//! restore target, can and cannot make the engine do.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use sha2::Digest;
use storinator_shared::catalog::CHUNK_LISTS;
use storinator_shared::format::pack::{BlobKind, PACK_MAGIC, PackEntry, encode_trailer};
use storinator_shared::format::snapshot::{ListingEntry, SnapshotObject};
use storinator_shared::{
    BackupOptions, BackupSummary, CancelFlag, Catalog, ChunkId, Error, NoProgress, Repo,
    RestoreOptions, RestoreSummary, Storage, recover,
};

fn backup_opts(path: &Path, owner: &str, encrypt: bool) -> BackupOptions {
    BackupOptions {
        path: path.to_path_buf(),
        owner: owner.into(),
        encrypt,
    }
}

fn restore_opts(path: &Path, to: &Path, owner: &str) -> RestoreOptions {
    RestoreOptions {
        path: path.to_string_lossy().into_owned(),
        to: to.to_path_buf(),
        snapshot: None,
        owner: owner.into(),
        overwrite: false,
        within: None,
        same_owner: None,
    }
}

/// Backs up `src` for `owner`.
async fn backup(repo: &Repo, src: &Path, owner: &str, encrypt: bool) -> BackupSummary {
    repo.backup(
        &backup_opts(src, owner, encrypt),
        &NoProgress,
        &CancelFlag::new(),
    )
    .await
    .unwrap()
}

/// Restores `src` (the path it was backed up from) of `local` into `to`.
async fn restore_to(repo: &Repo, src: &Path, to: &Path) -> Result<RestoreSummary, Error> {
    repo.restore(
        &restore_opts(src, to, "local"),
        &NoProgress,
        &CancelFlag::new(),
    )
    .await
}

// ---------------------------------------------------------------------------------------------
// Hostile storage

/// A format-1 unencrypted blob, which anyone can make: header, payload, bare SHA-256.
fn forged_blob(payload: &[u8], version: u8) -> Vec<u8> {
    let mut b = vec![0xB5, version, 0, 0];
    b.extend_from_slice(payload);
    let sum = sha2::Sha256::digest(&b);
    b.extend_from_slice(&sum);
    b
}

/// A whole pack forged without any key: one data chunk, a listing naming it as `data/pwned`
/// (mode 04755), and a snapshot object of `root` for `owner`, finished far in the future.
fn forged_pack(root: &str, owner: &str, version: u8) -> Vec<u8> {
    let name = Path::new(root).file_name().unwrap().to_str().unwrap();
    let data = b"attacker's content\n".to_vec();
    let data_id = ChunkId(sha2::Sha256::digest(&data).into());
    let line = ListingEntry {
        path: format!("{name}/pwned"),
        kind: storinator_shared::EntryKind::File,
        size: data.len() as u64,
        mtime_ns: 0,
        mode: 0o4755,
        inode: 1,
        sha256: Some(hex::encode(sha2::Sha256::digest(&data))),
        chunks: vec![data_id],
        target: None,
        uid: Some(0),
        gid: Some(0),
        user: None,
        group: None,
    };
    let dir = ListingEntry {
        path: name.to_string(),
        kind: storinator_shared::EntryKind::Dir,
        size: 0,
        mtime_ns: 0,
        mode: 0o755,
        inode: 2,
        sha256: None,
        chunks: vec![],
        target: None,
        uid: None,
        gid: None,
        user: None,
        group: None,
    };
    let mut listing = serde_json::to_vec(&dir).unwrap();
    listing.push(b'\n');
    listing.extend(serde_json::to_vec(&line).unwrap());
    listing.push(b'\n');
    let listing_id = ChunkId(sha2::Sha256::digest(&listing).into());
    let snap = SnapshotObject {
        version: 1,
        owner: owner.into(),
        root: root.into(),
        hostname: "evil".into(),
        encrypted: false,
        started_at: 0,
        finished_at: 4_000_000_000_000,
        listing: vec![listing_id],
        files: 1,
        dirs: 1,
        bytes: data.len() as u64,
        bytes_read: 0,
        new_chunks: 0,
        bytes_stored: 0,
        warnings: 0,
    };
    let snap_json = serde_json::to_vec(&snap).unwrap();
    let snap_id = ChunkId(sha2::Sha256::digest(&snap_json).into());
    let mut pack = Vec::new();
    let mut entries = Vec::new();
    for (kind, id, plain) in [
        (BlobKind::Data, data_id, &data),
        (BlobKind::Listing, listing_id, &listing),
        (BlobKind::Snapshot, snap_id, &snap_json),
    ] {
        let blob = forged_blob(plain, version);
        entries.push(PackEntry {
            kind,
            flags: 0,
            id,
            offset: pack.len() as u64,
            length: blob.len() as u32,
            raw_length: plain.len() as u32,
        });
        pack.extend(blob);
    }
    let trailer = forged_blob(&encode_trailer(&entries), version);
    pack.extend(&trailer);
    pack.extend((trailer.len() as u32).to_le_bytes());
    pack.extend(PACK_MAGIC);
    pack
}

#[tokio::test]
async fn a_forged_pack_in_storage_is_skipped_by_recover_and_never_becomes_a_snapshot() {
    let f = Fixture::new().await;
    let src = f.path("srv/data");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("real.txt"), b"the user's own file\n").unwrap();
    let owner = "tg:42";
    let real = backup(&f.repo, &src, owner, true).await;
    let root = real.snapshot.root.clone();

    // The attacker posts packs into the storage chat: one in format 1 (bare checksums, what
    // the old reader trusted) and one dressed as format 2 with no valid MAC.
    let forged_v1 = "00000000000000000000000000000001.enc";
    let forged_v2 = "00000000000000000000000000000002.enc";
    f.storage
        .put_bytes(forged_v1, forged_pack(&root, owner, 1))
        .await
        .unwrap();
    f.storage
        .put_bytes(forged_v2, forged_pack(&root, owner, 2))
        .await
        .unwrap();

    // The server burns; recover on a new machine.
    let catalog = Catalog::open(&storinator_testkit::db::url_for(&f.path("new-catalog.db")))
        .await
        .unwrap();
    let (repo, report) = recover(catalog, f.storage.clone(), PASS, settings(), &NoProgress)
        .await
        .unwrap();
    for name in [forged_v1, forged_v2] {
        assert!(
            report.problems.iter().any(|p| p.contains(name)),
            "{name} not named in {:?}",
            report.problems
        );
    }
    assert_eq!(report.snapshots, 1, "{report:?}");
    let snaps = repo.snapshots(owner, None).await.unwrap();
    assert_eq!(snaps.len(), 1);
    assert_eq!(snaps[0].short_id, real.snapshot.short_id);
    assert!(
        repo.catalog
            .packs()
            .await
            .unwrap()
            .iter()
            .all(|p| !forged_v1.starts_with(&p.id) && !forged_v2.starts_with(&p.id)),
        "a forged pack was indexed"
    );

    // The latest snapshot restores the user's file, not the attacker's.
    let out = f.path("out");
    repo.restore(
        &restore_opts(Path::new(&root), &out, owner),
        &NoProgress,
        &CancelFlag::new(),
    )
    .await
    .unwrap();
    assert_eq!(
        std::fs::read(out.join("data/real.txt")).unwrap(),
        b"the user's own file\n"
    );
    assert!(!out.join("data/pwned").exists());
}

#[tokio::test]
async fn planted_key_objects_are_skipped_with_a_problem_and_never_stop_recover() {
    let f = Fixture::new().await;
    let src = f.path("src/data");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("a"), b"a").unwrap();
    backup(&f.repo, &src, "local", true).await;
    // Names that sort before the real key, so recover meets them first.
    let real: storinator_shared::WrappedKey =
        f.repo.catalog.user_key("default").await.unwrap().unwrap();
    let mut costly = real.clone();
    costly.kdf.t_cost = 1_000_000;
    let mut hungry = real.clone();
    hungry.kdf.m_kib = u32::MAX;
    let planted = [
        (
            "key-0000000000000000000000000000000a.enc",
            vec![b'{'; 1 << 20],
        ),
        (
            "key-0000000000000000000000000000000b.enc",
            b"not json".to_vec(),
        ),
        (
            "key-0000000000000000000000000000000c.enc",
            serde_json::to_vec(&costly).unwrap(),
        ),
        (
            "key-0000000000000000000000000000000d.enc",
            serde_json::to_vec(&hungry).unwrap(),
        ),
    ];
    for (name, bytes) in &planted {
        f.storage.put_bytes(name, bytes.clone()).await.unwrap();
    }
    let catalog = Catalog::open(&storinator_testkit::db::url_for(&f.path("new.db")))
        .await
        .unwrap();
    let started = Instant::now();
    let (_, report) = recover(catalog, f.storage.clone(), PASS, settings(), &NoProgress)
        .await
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(20));
    assert_eq!(report.snapshots, 1);
    for (name, _) in &planted {
        assert!(
            report.problems.iter().any(|p| p.contains(name)),
            "{name} not named in {:?}",
            report.problems
        );
    }
}

/// Chunk plaintext lengths of the file `name`'s content, in order.
async fn chunk_lengths(repo: &Repo, sha: &[u8]) -> Vec<i64> {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT ch.raw_length FROM contents c JOIN {CHUNK_LISTS} cc ON cc.content_id = c.id \
         JOIN chunks ch ON ch.no = cc.chunk_no WHERE c.sha256 = $1 ORDER BY c.encrypted, cc.seq"
    )))
    .bind(sha)
    .fetch_all(repo.catalog.pool())
    .await
    .unwrap()
}

#[tokio::test]
async fn encrypted_and_unencrypted_snapshots_cut_chunks_with_unrelated_seeds() {
    let f = Fixture::new().await;
    let content = bytes(600_000, 9);
    let sha: [u8; 32] = sha2::Sha256::digest(&content).into();
    for (dir, encrypt) in [("enc/data", true), ("plain/data", false)] {
        let src = f.path(dir);
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("big"), &content).unwrap();
        backup(&f.repo, &src, "local", encrypt).await;
    }
    let all = chunk_lengths(&f.repo, &sha).await;
    let total: i64 = content.len() as i64;
    // Split the two chunk lists (unencrypted first: ORDER BY c.encrypted).
    let mut acc = 0;
    let split = all
        .iter()
        .position(|l| {
            acc += l;
            acc == total
        })
        .unwrap()
        + 1;
    let (plain, enc) = all.split_at(split);
    assert_eq!(plain.iter().sum::<i64>(), total);
    assert_eq!(enc.iter().sum::<i64>(), total);
    assert!(plain.len() > 5 && enc.len() > 5, "{plain:?} {enc:?}");
    // The cut points visible in the unencrypted pack tell nothing of the encrypted ones.
    assert_ne!(plain, enc, "same cut points: the chunker seed is shared");
}

/// The catalog points two chunks at each other's blobs (as a catalog gone wrong, or storage
/// that moved authentic blobs around, would): every MAC passes, and neither file may be
/// written. A restore does not check ids at first; it finds both files' SHA-256 differ, reads
/// them again checking ids, and reports each by path with the chunk at fault. The rest of the
/// tree is restored, and nothing of the two files is left in the target.
#[tokio::test]
async fn authentic_blobs_of_other_chunks_are_found_and_never_written() {
    let f = Fixture::new().await;
    let src = f.path("src/data");
    std::fs::create_dir_all(&src).unwrap();
    // One chunk each (under the chunker's minimum), incompressible, all the same length.
    for i in 0..6u64 {
        std::fs::write(src.join(format!("f{i}")), bytes(3000, i + 1)).unwrap();
    }
    backup(&f.repo, &src, "local", true).await;
    let chunk_of = |name: &str| {
        let sha = sha2::Sha256::digest(std::fs::read(src.join(name)).unwrap()).to_vec();
        let pool = f.repo.catalog.pool().clone();
        async move {
            sqlx::query_as::<_, (i64, i64, i64)>(sqlx::AssertSqlSafe(format!(
                "SELECT ch.no, ch.\"offset\", ch.length FROM contents c \
                 JOIN {CHUNK_LISTS} cc ON cc.content_id = c.id \
                 JOIN chunks ch ON ch.no = cc.chunk_no WHERE c.sha256 = $1"
            )))
            .bind(sha)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    // A restore while the catalog is right: how many range reads the tree takes.
    let reads = || f.storage.reads.load(Ordering::SeqCst);
    let before = reads();
    restore_to(&f.repo, &src, &f.path("clean")).await.unwrap();
    let clean_reads = reads() - before;
    let (a, b) = (chunk_of("f1").await, chunk_of("f4").await);
    assert_eq!(a.2, b.2, "blobs of one length");
    for (no, (offset, length)) in [(a.0, (b.1, b.2)), (b.0, (a.1, a.2))] {
        sqlx::query("UPDATE chunks SET \"offset\" = $1, length = $2 WHERE no = $3")
            .bind(offset)
            .bind(length)
            .bind(no)
            .execute(f.repo.catalog.pool())
            .await
            .unwrap();
    }

    let out = f.path("out");
    let before = reads();
    let err = restore_to(&f.repo, &src, &out).await.unwrap_err();
    let Error::RestoreFailed { failures } = err else {
        panic!("{err}")
    };
    let mut paths: Vec<&str> = failures.iter().map(|(p, _)| p.as_str()).collect();
    paths.sort();
    assert_eq!(paths, ["data/f1", "data/f4"], "{failures:?}");
    // The first pass took the blobs unchecked; the two files were read a second time.
    assert!(
        reads() - before > clean_reads,
        "{} reads against {clean_reads}: no second pass",
        reads() - before
    );
    for (_, reason) in &failures {
        assert!(
            reason.contains("other data than its id says"),
            "the chunk at fault is named: {failures:?}"
        );
    }
    let left = names_in(&out.join("data"));
    assert_eq!(
        left,
        ["f0", "f2", "f3", "f5"],
        "no temporary, no wrong file"
    );
    for name in &left {
        assert_eq!(
            std::fs::read(out.join("data").join(name)).unwrap(),
            std::fs::read(src.join(name)).unwrap()
        );
    }
}

/// Large files are hashed on a thread beside their writer's, one after another on the same
/// thread: each file's digest is its own. Of three large files in one folder (one writer), the
/// middle one's recorded SHA-256 is wrong: it alone is reported and not written, and the files
/// before and after it are restored identical.
#[tokio::test]
async fn large_files_hashed_beside_their_writer_are_each_checked() {
    let f = Fixture::new().await;
    let src = f.path("src/data");
    std::fs::create_dir_all(&src).unwrap();
    for (i, mib) in [5usize, 6, 7].into_iter().enumerate() {
        std::fs::write(
            src.join(format!("large{i}")),
            bytes(mib << 20, 40 + i as u64),
        )
        .unwrap();
    }
    std::fs::write(src.join("small"), bytes(2000, 9)).unwrap();
    backup(&f.repo, &src, "local", true).await;
    let sha = sha2::Sha256::digest(std::fs::read(src.join("large1")).unwrap()).to_vec();
    let changed = sqlx::query("UPDATE contents SET sha256 = $1 WHERE sha256 = $2")
        .bind(sha2::Sha256::digest(b"another content").to_vec())
        .bind(sha)
        .execute(f.repo.catalog.pool())
        .await
        .unwrap();
    assert_eq!(changed.rows_affected(), 1);

    let out = f.path("out");
    let err = restore_to(&f.repo, &src, &out).await.unwrap_err();
    let Error::RestoreFailed { failures } = err else {
        panic!("{err}")
    };
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert_eq!(failures[0].0, "data/large1");
    assert!(
        failures[0]
            .1
            .contains("does not match its recorded SHA-256"),
        "{failures:?}"
    );
    let left = names_in(&out.join("data"));
    assert_eq!(
        left,
        ["large0", "large2", "small"],
        "no temporary, no wrong file"
    );
    for name in &left {
        assert!(
            std::fs::read(out.join("data").join(name)).unwrap()
                == std::fs::read(src.join(name)).unwrap(),
            "{name} restored identical"
        );
    }
}

/// When storage is wrong for more files than a writer keeps to read again (1,024), the files
/// past that bound fail at once as differing, instead of piling up in memory: every file is
/// still reported by path and none is written. Small files of one folder, one pack: a single
/// range read brings more than the bound to one writer before the checks turn on.
#[tokio::test]
async fn files_past_the_recheck_bound_fail_at_once_and_none_is_written() {
    const FILES: u64 = 1_100;
    let f = Fixture::new().await;
    let src = f.path("src/data");
    std::fs::create_dir_all(&src).unwrap();
    for i in 0..FILES {
        std::fs::write(src.join(format!("f{i:04}")), bytes(1500, i + 1)).unwrap();
    }
    std::fs::write(src.join("kept"), bytes(1700, 0)).unwrap();
    backup(&f.repo, &src, "local", true).await;
    // Every file's chunk (one each, all of one length) trades places with its neighbour's.
    let rows: Vec<(i64, i64, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT ch.no, ch.\"offset\", ch.length FROM contents c \
         JOIN {CHUNK_LISTS} cc ON cc.content_id = c.id \
         JOIN chunks ch ON ch.no = cc.chunk_no WHERE c.size = 1500 ORDER BY ch.no"
    )))
    .fetch_all(f.repo.catalog.pool())
    .await
    .unwrap();
    assert_eq!(rows.len() as u64, FILES);
    let mut tx = f.repo.catalog.pool().begin().await.unwrap();
    for pair in rows.chunks(2) {
        let [a, b] = pair else { unreachable!() };
        for (no, (_, offset, length)) in [(a.0, b), (b.0, a)] {
            sqlx::query("UPDATE chunks SET \"offset\" = $1, length = $2 WHERE no = $3")
                .bind(offset)
                .bind(length)
                .bind(no)
                .execute(&mut *tx)
                .await
                .unwrap();
        }
    }
    tx.commit().await.unwrap();

    let out = f.path("out");
    let err = restore_to(&f.repo, &src, &out).await.unwrap_err();
    let Error::RestoreFailed { failures } = err else {
        panic!("{err}")
    };
    assert_eq!(
        failures.len() as u64,
        FILES,
        "every swapped file is reported"
    );
    let by_id = failures
        .iter()
        .filter(|(_, r)| r.contains("other data than its id says"))
        .count();
    let at_once = failures
        .iter()
        .filter(|(_, r)| r.contains("does not match its recorded SHA-256"))
        .count();
    assert_eq!(by_id + at_once, failures.len(), "{:?}", &failures[..3]);
    assert!(by_id >= 1024, "the first 1,024 are read again: {by_id}");
    assert!(
        at_once > 0,
        "past the bound, files fail at once: {by_id} by id"
    );
    let left = names_in(&out.join("data"));
    assert_eq!(left, ["kept"], "no temporary, no wrong file");
    assert_eq!(
        std::fs::read(out.join("data/kept")).unwrap(),
        std::fs::read(src.join("kept")).unwrap()
    );
}

// ---------------------------------------------------------------------------------------------
// Restore and local users

/// A thread keeps swapping `target/data/a` for a symlink to a sentinel folder outside while
/// restores (with overwrite) run into `target`. Nothing may ever appear in the sentinel, and
/// nothing there may change mode or time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_folder_swapped_for_a_symlink_mid_restore_never_leads_outside() {
    let f = Fixture::new().await;
    let src = f.path("src/data");
    std::fs::create_dir_all(src.join("a/b")).unwrap();
    for i in 0..8 {
        std::fs::write(src.join(format!("a/f{i}")), format!("file {i}\n")).unwrap();
        std::fs::write(src.join(format!("a/b/g{i}")), format!("deeper {i}\n")).unwrap();
    }
    std::os::unix::fs::symlink("f0", src.join("a/link")).unwrap();
    std::fs::set_permissions(src.join("a"), std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::set_permissions(src.join("a/f1"), std::fs::Permissions::from_mode(0o4777)).unwrap();
    filetime::set_file_mtime(src.join("a"), filetime::FileTime::from_unix_time(1000, 0)).unwrap();
    filetime::set_file_mtime(
        src.join("a/f1"),
        filetime::FileTime::from_unix_time(1000, 0),
    )
    .unwrap();
    backup(&f.repo, &src, "local", true).await;

    // The sentinel: an outside folder holding files named like restored ones.
    let sentinel = f.path("sentinel");
    std::fs::create_dir_all(sentinel.join("b")).unwrap();
    std::fs::write(sentinel.join("f1"), b"outside").unwrap();
    std::fs::set_permissions(&sentinel, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::set_permissions(sentinel.join("f1"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let before = describe_outside(&sentinel);

    let target = f.path("target");
    std::fs::create_dir_all(target.join("data/a")).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let swaps = Arc::new(AtomicUsize::new(0));
    let swapper = {
        let (a, parked, sentinel) = (
            target.join("data/a"),
            target.join("data/a.parked"),
            sentinel.clone(),
        );
        let (stop, swaps) = (stop.clone(), swaps.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if std::fs::rename(&a, &parked).is_ok() {
                    let _ = std::os::unix::fs::symlink(&sentinel, &a);
                    std::thread::yield_now();
                    let _ = std::fs::remove_file(&a);
                    let _ = std::fs::rename(&parked, &a);
                    swaps.fetch_add(1, Ordering::Relaxed);
                } else {
                    // A restore that recreated `a` between our rename and our symlink leaves
                    // `a.parked` behind, and every later rename onto it fails: clear it (a
                    // link is removed, never followed).
                    if std::fs::symlink_metadata(&parked).is_ok() {
                        let _ = std::fs::remove_dir_all(&parked);
                    }
                    std::thread::yield_now();
                }
            }
        })
    };
    let started = Instant::now();
    let (mut runs, mut ok) = (0, 0);
    // Until both sides have run enough (a loaded machine may starve the swapper for a
    // while), then for a fixed span; bounded either way.
    let enough =
        |runs: usize, swaps: &AtomicUsize| runs >= 20 && swaps.load(Ordering::Relaxed) >= 20;
    while started.elapsed() < Duration::from_secs(30)
        && (!enough(runs, &swaps)
            || (runs < 300 && started.elapsed() < Duration::from_millis(2500)))
    {
        let opts = RestoreOptions {
            overwrite: true,
            ..restore_opts(&src, &target, "local")
        };
        if f.repo
            .restore(&opts, &NoProgress, &CancelFlag::new())
            .await
            .is_ok()
        {
            ok += 1;
        }
        runs += 1;
        assert_eq!(describe_outside(&sentinel), before, "after restore {runs}");
    }
    stop.store(true, Ordering::Relaxed);
    swapper.join().unwrap();
    assert_eq!(describe_outside(&sentinel), before);
    assert!(runs >= 20, "only {runs} restores ran");
    assert!(
        swaps.load(Ordering::Relaxed) >= 20,
        "the swapper barely ran"
    );
    // Without the swapper, the same restore succeeds (remove_dir_all does not follow links).
    std::fs::remove_dir_all(&target).unwrap();
    let opts = restore_opts(&src, &target, "local");
    f.repo
        .restore(&opts, &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    assert_eq!(describe_tree(&src), describe_tree(&target.join("data")));
    eprintln!(
        "{runs} restores ({ok} complete) against {} swaps",
        swaps.load(Ordering::Relaxed)
    );
}

/// Every entry under `dir` with its mode, mtime and content: what must not change.
fn describe_outside(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in walkdir::WalkDir::new(dir).sort_by_file_name() {
        let e = e.unwrap();
        let m = std::fs::symlink_metadata(e.path()).unwrap();
        let content = if m.is_file() {
            std::fs::read(e.path()).unwrap()
        } else {
            Vec::new()
        };
        out.push(format!(
            "{} {:o} {}.{} {} {}:{} {:?}",
            e.path().display(),
            m.mode(),
            m.mtime(),
            m.mtime_nsec(),
            m.len(),
            m.uid(),
            m.gid(),
            content
        ));
    }
    out
}

#[tokio::test]
async fn a_chat_restore_stays_inside_the_restore_roots() {
    let f = Fixture::new().await;
    let src = f.path("src/data");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("x"), b"x").unwrap();
    backup(&f.repo, &src, "tg:7", true).await;
    let root = f.path("restores");
    let outside = f.path("outside");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, root.join("escape")).unwrap();
    let within = Some(vec![root.clone()]);
    for to in [
        outside.clone(),
        root.join("escape"),
        root.join("escape/deeper"),
        root.join("../outside"),
        PathBuf::from("relative/dir"),
    ] {
        let opts = RestoreOptions {
            within: within.clone(),
            ..restore_opts(&src, &to, "tg:7")
        };
        let e = f
            .repo
            .restore(&opts, &NoProgress, &CancelFlag::new())
            .await
            .unwrap_err();
        assert!(matches!(e, Error::Invalid(_)), "{}: {e}", to.display());
    }
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
    let opts = RestoreOptions {
        within,
        ..restore_opts(&src, &root.join("new/place"), "tg:7")
    };
    f.repo
        .restore(&opts, &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    assert_eq!(std::fs::read(root.join("new/place/data/x")).unwrap(), b"x");
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

#[tokio::test]
async fn owners_are_restored_as_root_and_setuid_bits_only_with_them() {
    if !is_root() {
        eprintln!(
            "skipped: restoring owners needs root (the non-root path is tested by worker/tests/restore_process.rs)"
        );
        return;
    }
    let f = Fixture::new().await;
    let src = f.path("src/data");
    std::fs::create_dir_all(src.join("shared")).unwrap();
    std::fs::write(src.join("tool"), b"#!/bin/sh\n").unwrap();
    std::fs::write(src.join("shared/doc"), b"doc").unwrap();
    let own = |p: &Path, u: u32, g: u32| std::os::unix::fs::lchown(p, Some(u), Some(g)).unwrap();
    own(&src.join("tool"), 4321, 4322);
    own(&src.join("shared"), 4321, 4323);
    own(&src.join("shared/doc"), 4324, 4323);
    // chown clears the bits: set them after.
    std::fs::set_permissions(src.join("tool"), std::fs::Permissions::from_mode(0o4755)).unwrap();
    std::fs::set_permissions(src.join("shared"), std::fs::Permissions::from_mode(0o2775)).unwrap();
    backup(&f.repo, &src, "local", true).await;

    // As root: owners, then modes (setuid and setgid kept).
    let out = f.path("as-root");
    let r = f
        .repo
        .restore(
            &restore_opts(&src, &out, "local"),
            &NoProgress,
            &CancelFlag::new(),
        )
        .await
        .unwrap();
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    let m = |p: &Path| std::fs::symlink_metadata(p).unwrap();
    let tool = m(&out.join("data/tool"));
    assert_eq!(
        (tool.uid(), tool.gid(), tool.mode() & 0o7777),
        (4321, 4322, 0o4755)
    );
    let shared = m(&out.join("data/shared"));
    assert_eq!(
        (shared.uid(), shared.gid(), shared.mode() & 0o7777),
        (4321, 4323, 0o2775)
    );
    let doc = m(&out.join("data/shared/doc"));
    assert_eq!((doc.uid(), doc.gid()), (4324, 4323));

    // Owners not restored (--no-same-owner, or any non-root restore): the files become the
    // restoring user's, so the setuid/setgid bits are left out, with a warning each.
    let out = f.path("no-owner");
    let opts = RestoreOptions {
        same_owner: Some(false),
        ..restore_opts(&src, &out, "local")
    };
    let r = f
        .repo
        .restore(&opts, &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    let tool = m(&out.join("data/tool"));
    assert_eq!((tool.uid(), tool.mode() & 0o7777), (0, 0o755));
    assert_eq!(m(&out.join("data/shared")).mode() & 0o7777, 0o775);
    assert_eq!(r.warnings.len(), 2, "{:?}", r.warnings);
    assert!(
        r.warnings
            .iter()
            .any(|w| w.contains("data/tool") && w.contains("setuid"))
    );
}

/// A file created by root already has root's owner and its recorded mode, so the restore
/// leaves them; but in a set-group-id folder it gets the folder's group, which the restore
/// must still correct to the recorded one (as it does any other owner).
#[tokio::test]
async fn files_created_with_another_group_in_a_setgid_folder_get_their_recorded_owner() {
    if !is_root() {
        eprintln!("skipped: restoring owners needs root");
        return;
    }
    let f = Fixture::new().await;
    let src = f.path("src/data");
    std::fs::create_dir_all(&src).unwrap();
    for name in ["plain", "theirs", "private"] {
        std::fs::write(src.join(name), name).unwrap();
    }
    let own = |p: &Path, u: u32, g: u32| std::os::unix::fs::lchown(p, Some(u), Some(g)).unwrap();
    own(&src, 0, 0);
    own(&src.join("plain"), 0, 0);
    own(&src.join("theirs"), 4321, 4322);
    own(&src.join("private"), 0, 0);
    let mode = |p: &Path, m: u32| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m));
    mode(&src.join("plain"), 0o644).unwrap();
    mode(&src.join("theirs"), 0o644).unwrap();
    mode(&src.join("private"), 0o640).unwrap();
    backup(&f.repo, &src, "local", true).await;

    let out = f.path("shared-out");
    std::fs::create_dir_all(&out).unwrap();
    own(&out, 0, 4444);
    mode(&out, 0o2775).unwrap();
    f.repo
        .restore(
            &restore_opts(&src, &out, "local"),
            &NoProgress,
            &CancelFlag::new(),
        )
        .await
        .unwrap();
    let m = |p: &str| {
        let m = std::fs::symlink_metadata(out.join(p)).unwrap();
        (m.uid(), m.gid(), m.mode() & 0o7777)
    };
    assert_eq!(m("data/plain"), (0, 0, 0o644));
    assert_eq!(m("data/theirs"), (4321, 4322, 0o644));
    assert_eq!(m("data/private"), (0, 0, 0o640));
    assert_eq!(describe_tree(&src), describe_tree(&out.join("data")));
}

#[tokio::test]
async fn names_of_255_bytes_and_read_only_folders_restore() {
    let f = Fixture::new().await;
    let src = f.path("src/data");
    let long_dir = "d".repeat(250);
    let long_file = "é".repeat(127) + "x"; // 255 bytes
    std::fs::create_dir_all(src.join(&long_dir).join("locked")).unwrap();
    std::fs::write(src.join(&long_dir).join(&long_file), b"long").unwrap();
    std::fs::write(src.join(&long_dir).join("locked/inner"), b"inner").unwrap();
    std::os::unix::fs::symlink("x", src.join("l".repeat(255))).unwrap();
    std::fs::set_permissions(
        src.join(&long_dir).join("locked"),
        std::fs::Permissions::from_mode(0o000),
    )
    .unwrap();
    backup(&f.repo, &src, "local", true).await;
    let out = f.path("out");
    f.repo
        .restore(
            &restore_opts(&src, &out, "local"),
            &NoProgress,
            &CancelFlag::new(),
        )
        .await
        .unwrap();
    assert_eq!(describe_tree(&src), describe_tree(&out.join("data")));
    assert!(temp_files(&out).is_empty());
    std::fs::set_permissions(
        src.join(&long_dir).join("locked"),
        std::fs::Permissions::from_mode(0o700),
    )
    .unwrap();
    std::fs::set_permissions(
        out.join("data").join(&long_dir).join("locked"),
        std::fs::Permissions::from_mode(0o700),
    )
    .unwrap();
}
