//! End-to-end engine tests: backup and restore through the storage trait.

mod common;

use std::sync::atomic::Ordering;

use common::*;
use storinator_shared::{
    BackupOptions, CancelFlag, Catalog, Error, NoProgress, Repo, RestoreOptions, Storage,
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

#[tokio::test]
async fn round_trip_restores_byte_identical_tree_with_modes_and_mtimes() {
    let f = Fixture::new().await;
    let src = f.path("src/data");
    make_tree(&src);
    let summary = f
        .repo
        .backup(&backup_opts(&src), &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    assert!(summary.warnings.is_empty(), "{:?}", summary.warnings);
    assert!(
        summary.packs >= 3,
        "the large file must span several packs, got {} packs",
        summary.packs
    );
    assert_eq!(summary.snapshot.files, 36);
    // The duplicate 1.5 MB file is stored once.
    assert!(
        summary.new_data_bytes < 1_500_000 + 1_000_000,
        "{}",
        summary.new_data_bytes
    );
    let objects = f.storage.inner.snapshot();
    assert!(
        objects.iter().all(|(name, _)| name.ends_with(".enc")),
        "{objects:?}"
    );

    let out = f.path("out");
    let r = f
        .repo
        .restore(&restore_opts(&src, &out), &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    assert_eq!(r.files, 36);
    assert_eq!(describe_tree(&src), describe_tree(&out.join("data")));
    assert!(temp_files(&out).is_empty());

    // A subfolder restores as <to>/<its name>.
    let sub = f.path("sub-out");
    f.repo
        .restore(
            &restore_opts(&src.join("nested/deeper"), &sub),
            &NoProgress,
            &CancelFlag::new(),
        )
        .await
        .unwrap();
    assert_eq!(
        describe_tree(&src.join("nested/deeper")),
        describe_tree(&sub.join("deeper"))
    );
    // And so does a single file.
    f.repo
        .restore(
            &restore_opts(&src.join("small.txt"), &sub),
            &NoProgress,
            &CancelFlag::new(),
        )
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(sub.join("small.txt")).unwrap(),
        b"hello, storinator\n"
    );
}

#[tokio::test]
async fn no_plaintext_name_or_content_reaches_storage() {
    let f = Fixture::new().await;
    let src = f.path("src/secret-folder");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(
        src.join("passwords-list.txt"),
        b"the quick brown fox jumps over the lazy dog ".repeat(100),
    )
    .unwrap();
    f.repo
        .backup(&backup_opts(&src), &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    let mut everything = Vec::new();
    for (name, size) in f.storage.inner.snapshot() {
        assert!(
            !name.contains("secret") && !name.contains("passwords"),
            "{name}"
        );
        let obj = storinator_shared::ObjectRef::new(&name, "");
        everything.extend(
            f.storage
                .inner
                .get_range(&obj, 0, size as u64)
                .await
                .unwrap(),
        );
    }
    let hay = String::from_utf8_lossy(&everything);
    assert!(
        !hay.contains("passwords-list")
            && !hay.contains("secret-folder")
            && !hay.contains("quick brown")
    );
}

#[tokio::test]
async fn unchanged_rebackup_reads_nothing_and_stores_no_chunks() {
    let f = Fixture::new().await;
    let src = f.path("src/data");
    make_tree(&src);
    f.repo
        .backup(&backup_opts(&src), &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    let rows = f.repo.catalog.entry_row_count().await.unwrap();
    let again = f
        .repo
        .backup(&backup_opts(&src), &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    assert_eq!(again.new_data_chunks, 0);
    assert_eq!(
        again.snapshot.bytes_read, 0,
        "unchanged files must not be read"
    );
    assert_eq!(
        f.repo.catalog.entry_row_count().await.unwrap(),
        rows,
        "an unchanged tree adds no entry rows"
    );
    assert_eq!(again.snapshot.files, 36);
    // Both snapshots restore.
    let snaps = f.repo.snapshots("local", None).await.unwrap();
    assert_eq!(snaps.len(), 2);
    for s in &snaps {
        let out = f.path(&format!("out-{}", s.short_id));
        let mut o = restore_opts(&src, &out);
        o.snapshot = Some(s.short_id.clone());
        f.repo
            .restore(&o, &NoProgress, &CancelFlag::new())
            .await
            .unwrap();
        assert_eq!(describe_tree(&src), describe_tree(&out.join("data")));
    }
}

#[tokio::test]
async fn a_small_edit_stores_only_the_affected_chunks() {
    let f = Fixture::new().await;
    let src = f.path("src/data");
    std::fs::create_dir_all(&src).unwrap();
    let mut big = bytes(4_000_000, 9);
    std::fs::write(src.join("big.bin"), &big).unwrap();
    let first = f
        .repo
        .backup(&backup_opts(&src), &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    assert!(first.new_data_chunks > 100, "{}", first.new_data_chunks);
    big[2_000_000..2_000_010].copy_from_slice(b"0123456789");
    std::fs::write(src.join("big.bin"), &big).unwrap();
    let second = f
        .repo
        .backup(&backup_opts(&src), &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    assert!(
        second.new_data_chunks >= 1 && second.new_data_chunks <= 3,
        "{} new chunks",
        second.new_data_chunks
    );
    assert!(second.new_data_bytes < 200_000, "{}", second.new_data_bytes);
    let out = f.path("out");
    f.repo
        .restore(&restore_opts(&src, &out), &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    assert_eq!(std::fs::read(out.join("data/big.bin")).unwrap(), big);
}

#[tokio::test]
async fn a_flipped_byte_fails_the_restore_naming_the_file_and_writes_nothing_corrupt() {
    let f = Fixture::new().await;
    let src = f.path("src/data");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("victim.bin"), bytes(100_000, 4)).unwrap();
    f.repo
        .backup(&backup_opts(&src), &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    // Flip a byte inside the first blob of every pack holding data.
    let chunks = f.repo.catalog.packs().await.unwrap();
    for p in &chunks {
        assert!(f.storage.inner.corrupt(&format!("{}.enc", p.id), 100));
    }
    let out = f.path("out");
    let err = f
        .repo
        .restore(&restore_opts(&src, &out), &NoProgress, &CancelFlag::new())
        .await
        .unwrap_err();
    match &err {
        Error::RestoreFailed { failures } => {
            assert_eq!(failures.len(), 1);
            assert_eq!(failures[0].0, "data/victim.bin");
            assert!(
                failures[0].1.contains("authentication failed"),
                "{}",
                failures[0].1
            );
        }
        other => panic!("expected RestoreFailed, got {other}"),
    }
    assert!(err.to_string().contains("data/victim.bin"));
    assert!(
        !out.join("data/victim.bin").exists(),
        "a corrupted file must not be left in the target"
    );
    assert!(temp_files(&out).is_empty());
    // verify --read-data reports the pack and the file.
    let report = f.repo.verify(true, &NoProgress).await.unwrap();
    assert!(!report.problems.is_empty());
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.contains("data/victim.bin")),
        "{:?}",
        report.problems
    );
}

#[tokio::test]
async fn wrong_passphrase_is_a_clear_error() {
    let f = Fixture::new().await;
    let catalog = Catalog::open_file(&f.path("catalog.db")).await.unwrap();
    let err = Repo::open(catalog, f.storage.clone(), "not the passphrase", settings())
        .await
        .err()
        .unwrap();
    assert!(matches!(err, Error::WrongPassphrase), "{err}");
    assert_eq!(err.to_string(), "wrong passphrase");
    // No key at all is a different, equally clear error.
    let empty = Catalog::open_file(&f.path("other.db")).await.unwrap();
    let err = Repo::open(empty, f.storage.clone(), PASS, settings())
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("storinator-worker init"), "{err}");
}

#[tokio::test]
async fn restore_refuses_a_crafted_path_that_escapes_the_target() {
    let f = Fixture::new().await;
    let src = f.path("src/data");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("innocent.txt"), b"x").unwrap();
    f.repo
        .backup(&backup_opts(&src), &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    for evil in ["data/../../escaped.txt", "data/../escaped.txt"] {
        sqlx::query("UPDATE entries SET path = ? WHERE path LIKE 'data/%'")
            .bind(evil)
            .execute(f.repo.catalog.pool())
            .await
            .unwrap();
        let out = f.path("target/inner");
        let err = f
            .repo
            .restore(&restore_opts(&src, &out), &NoProgress, &CancelFlag::new())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("would leave the target"), "{err}");
        assert!(!f.path("escaped.txt").exists() && !f.path("target/escaped.txt").exists());
        assert!(
            !out.join("data").exists(),
            "nothing is written when a path is refused"
        );
    }
}

#[tokio::test]
async fn restore_never_writes_through_a_symlink_in_the_target() {
    let f = Fixture::new().await;
    let src = f.path("src/data");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::write(src.join("sub/file.txt"), b"payload").unwrap();
    f.repo
        .backup(&backup_opts(&src), &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    let out = f.path("out");
    let elsewhere = f.path("elsewhere");
    std::fs::create_dir_all(out.join("data")).unwrap();
    std::fs::create_dir_all(&elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, out.join("data/sub")).unwrap();
    let mut o = restore_opts(&src, &out);
    o.overwrite = true;
    let err = f
        .repo
        .restore(&o, &NoProgress, &CancelFlag::new())
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("existing") || err.to_string().contains("symlink"),
        "{err}"
    );
    assert!(!elsewhere.join("file.txt").exists());
}

#[tokio::test]
async fn restore_refuses_to_overwrite_differing_files_unless_asked() {
    let f = Fixture::new().await;
    let src = f.path("src/data");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("a.txt"), b"original").unwrap();
    std::fs::write(src.join("b.txt"), b"same").unwrap();
    f.repo
        .backup(&backup_opts(&src), &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    let out = f.path("out");
    std::fs::create_dir_all(out.join("data")).unwrap();
    std::fs::write(out.join("data/a.txt"), b"local edits").unwrap();
    std::fs::write(out.join("data/b.txt"), b"same").unwrap();
    let err = f
        .repo
        .restore(&restore_opts(&src, &out), &NoProgress, &CancelFlag::new())
        .await
        .unwrap_err();
    match &err {
        Error::Conflicts { paths } => {
            assert_eq!(paths, &vec![out.canonicalize().unwrap().join("data/a.txt")])
        }
        other => panic!("expected a conflict, got {other}"),
    }
    assert_eq!(
        std::fs::read(out.join("data/a.txt")).unwrap(),
        b"local edits",
        "nothing overwritten"
    );
    let mut o = restore_opts(&src, &out);
    o.overwrite = true;
    let r = f
        .repo
        .restore(&o, &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    assert_eq!(
        r.unchanged, 2,
        "the identical file and the existing dir are left alone"
    );
    assert_eq!(std::fs::read(out.join("data/a.txt")).unwrap(), b"original");
}

#[tokio::test]
async fn an_interrupted_backup_resumes_without_reuploading_finished_packs() {
    let f = Fixture::new().await;
    let src = f.path("src/data");
    std::fs::create_dir_all(&src).unwrap();
    for i in 0..6 {
        std::fs::write(src.join(format!("f{i}.bin")), bytes(400_000, 100 + i)).unwrap();
    }
    f.storage.fail_puts_after.store(3, Ordering::SeqCst);
    let err = f
        .repo
        .backup(&backup_opts(&src), &NoProgress, &CancelFlag::new())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("injected"), "{err}");
    assert!(
        f.repo.snapshots("local", None).await.unwrap().is_empty(),
        "no snapshot without all its packs"
    );
    let stored_before = f.storage.put_count();
    assert_eq!(stored_before, 3);
    // Every pack the catalog knows is really in storage.
    let in_storage: Vec<String> = f
        .storage
        .inner
        .snapshot()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    for p in f
        .repo
        .catalog
        .packs()
        .await
        .unwrap()
        .iter()
        .filter(|p| p.state == "stored")
    {
        assert!(in_storage.contains(&format!("{}.enc", p.id)));
    }

    f.storage
        .fail_puts_after
        .store(usize::MAX, Ordering::SeqCst);
    let resumed = f
        .repo
        .backup(&backup_opts(&src), &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    let total_packs_first_try = 2_400_000 / 256_000;
    assert!(
        (resumed.packs as usize) < total_packs_first_try,
        "resume uploaded {} packs; the 3 finished ones must not be uploaded again",
        resumed.packs
    );
    let out = f.path("out");
    f.repo
        .restore(&restore_opts(&src, &out), &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    assert_eq!(describe_tree(&src), describe_tree(&out.join("data")));
}

#[tokio::test]
async fn cancelled_backup_stops_and_leaves_no_snapshot() {
    let f = Fixture::new().await;
    let src = f.path("src/data");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("f.bin"), bytes(500_000, 3)).unwrap();
    let cancel = CancelFlag::new();
    cancel.cancel();
    let err = f
        .repo
        .backup(&backup_opts(&src), &NoProgress, &cancel)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Cancelled), "{err}");
    assert!(f.repo.snapshots("local", None).await.unwrap().is_empty());
}

#[tokio::test]
async fn special_and_unreadable_files_are_warnings_not_failures() {
    let f = Fixture::new().await;
    let src = f.path("src/data");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("ok.txt"), b"fine").unwrap();
    let fifo = src.join("a-fifo");
    let status = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(status.success());
    std::os::unix::fs::symlink("loop", src.join("loop")).unwrap();
    let s = f
        .repo
        .backup(&backup_opts(&src), &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    assert!(
        s.warnings
            .iter()
            .any(|w| w.path == "data/a-fifo" && w.message.contains("fifo")),
        "{:?}",
        s.warnings
    );
    assert_eq!(s.snapshot.files, 1);
    let out = f.path("out");
    f.repo
        .restore(&restore_opts(&src, &out), &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    assert_eq!(std::fs::read(out.join("data/ok.txt")).unwrap(), b"fine");
    assert_eq!(
        std::fs::read_link(out.join("data/loop")).unwrap(),
        std::path::Path::new("loop")
    );
}

#[tokio::test]
async fn recover_rebuilds_the_catalog_from_storage_alone() {
    let f = Fixture::new().await;
    let src = f.path("src/data");
    make_tree(&src);
    let first = f
        .repo
        .backup(&backup_opts(&src), &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    std::fs::write(src.join("small.txt"), b"changed later").unwrap();
    f.repo
        .backup(&backup_opts(&src), &NoProgress, &CancelFlag::new())
        .await
        .unwrap();

    // A new machine: empty catalog, same storage, the passphrase.
    let fresh = Catalog::open_file(&f.path("new-machine.db")).await.unwrap();
    let wrong = storinator_shared::recover(
        fresh.clone(),
        f.storage.clone(),
        "wrong",
        settings(),
        &NoProgress,
    )
    .await;
    assert!(matches!(wrong, Err(Error::WrongPassphrase)));
    let (repo, report) =
        storinator_shared::recover(fresh, f.storage.clone(), PASS, settings(), &NoProgress)
            .await
            .unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(report.snapshots, 2);
    let snaps = repo.snapshots("local", None).await.unwrap();
    assert_eq!(snaps.len(), 2);
    assert_eq!(snaps[0].short_id, first.snapshot.short_id);
    let out = f.path("out");
    repo.restore(&restore_opts(&src, &out), &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    assert_eq!(describe_tree(&src), describe_tree(&out.join("data")));
    // The older snapshot too.
    let mut o = restore_opts(&src.join("small.txt"), &f.path("old"));
    o.snapshot = Some(first.snapshot.short_id.clone());
    repo.restore(&o, &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(f.path("old/small.txt")).unwrap(),
        b"hello, storinator\n"
    );
}

#[tokio::test]
async fn verify_reports_a_missing_pack_and_the_next_backup_heals_it() {
    let f = Fixture::new().await;
    let src = f.path("src/data");
    std::fs::create_dir_all(&src).unwrap();
    // Four files of 100 kB: a few to a 256 KiB pack.
    for i in 0..4 {
        std::fs::write(src.join(format!("doc{i}.txt")), bytes(100_000, 70 + i)).unwrap();
    }
    f.repo
        .backup(&backup_opts(&src), &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    assert!(
        f.repo
            .verify(false, &NoProgress)
            .await
            .unwrap()
            .problems
            .is_empty()
    );
    // Lose the pack holding doc0's data.
    let lost = pack_of(&f, "data/doc0.txt").await;
    f.storage
        .inner
        .remove(&storinator_shared::ObjectRef::new(
            format!("{lost}.enc"),
            "",
        ))
        .await
        .unwrap();
    let victims = files_in_pack(&f, &lost).await;
    assert!(victims.contains(&"data/doc0.txt".to_string()));
    let report = f.repo.verify(false, &NoProgress).await.unwrap();
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.contains("missing") && p.contains("data/doc0.txt")),
        "{:?}",
        report.problems
    );
    // The files are unchanged on disk (same size, mtime, inode): the next backup must still
    // read and store again exactly those whose chunks were lost, and nothing else.
    let again = f
        .repo
        .backup(&backup_opts(&src), &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    assert_eq!(
        again.snapshot.bytes_read,
        100_000 * victims.len() as u64,
        "exactly the files of the lost pack are read again"
    );
    assert!(again.new_data_chunks > 0);
    let out = f.path("out");
    f.repo
        .restore(&restore_opts(&src, &out), &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    assert_eq!(describe_tree(&src), describe_tree(&out.join("data")));
    // The old snapshot heals too (it shares the contents), and nothing uses the lost pack.
    let first = f.repo.snapshots("local", None).await.unwrap()[0].clone();
    let mut o = restore_opts(&src, &f.path("out-first"));
    o.snapshot = Some(first.short_id);
    f.repo
        .restore(&o, &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    assert!(files_in_pack(&f, &lost).await.is_empty());
    // So verify finds nothing wrong any more (the lost pack is forgotten).
    let report = f.repo.verify(true, &NoProgress).await.unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert!(
        f.repo
            .catalog
            .packs()
            .await
            .unwrap()
            .iter()
            .all(|p| p.id != lost)
    );
}

/// The pack holding the first chunk of `path`'s content.
async fn pack_of(f: &Fixture, path: &str) -> String {
    sqlx::query_scalar(
        "SELECT c.pack_id FROM entries e JOIN content_chunks cc ON cc.content_id = e.content_id \
         JOIN chunks c ON c.id = cc.chunk_id WHERE e.path = ? ORDER BY cc.seq LIMIT 1",
    )
    .bind(path)
    .fetch_one(f.repo.catalog.pool())
    .await
    .unwrap()
}

/// Files whose content has a chunk in `pack`.
async fn files_in_pack(f: &Fixture, pack: &str) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT DISTINCT e.path FROM entries e JOIN content_chunks cc ON cc.content_id = e.content_id \
         JOIN chunks c ON c.id = cc.chunk_id WHERE c.pack_id = ? ORDER BY e.path",
    )
    .bind(pack)
    .fetch_all(f.repo.catalog.pool())
    .await
    .unwrap()
}

#[tokio::test]
async fn unencrypted_backups_round_trip_and_are_not_deduplicated_with_encrypted_ones() {
    let f = Fixture::new().await;
    let src = f.path("src/data");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("plain.txt"), b"readable without a key ".repeat(50)).unwrap();
    let mut o = backup_opts(&src);
    o.encrypt = false;
    let s = f
        .repo
        .backup(&o, &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    assert!(!s.snapshot.encrypted);
    assert!(s.new_data_chunks > 0);
    // An encrypted backup of the same data must not reuse the plaintext chunks.
    let mut o2 = backup_opts(&src);
    o2.encrypt = true;
    filetime::set_file_mtime(
        src.join("plain.txt"),
        filetime::FileTime::from_unix_time(1_700_000_000, 0),
    )
    .unwrap();
    let s2 = f
        .repo
        .backup(&o2, &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    assert!(
        s2.new_data_chunks > 0,
        "encrypted backup reused unencrypted chunks"
    );
    let out = f.path("out");
    let mut r = restore_opts(&src, &out);
    r.snapshot = Some(s.snapshot.short_id.clone());
    f.repo
        .restore(&r, &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(out.join("data/plain.txt")).unwrap(),
        b"readable without a key ".repeat(50)
    );
}

#[tokio::test]
async fn passphrase_change_rewraps_without_touching_data() {
    let f = Fixture::new().await;
    let src = f.path("src/data");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("x"), b"x").unwrap();
    f.repo
        .backup(&backup_opts(&src), &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    let packs_before = f.storage.put_count();
    Repo::change_passphrase(
        &f.repo.catalog,
        f.storage.as_ref(),
        PASS,
        "new pass",
        storinator_shared::KdfParams::fast_for_tests(),
    )
    .await
    .unwrap();
    assert_eq!(f.storage.put_count(), packs_before, "no pack is rewritten");
    let catalog = Catalog::open_file(&f.path("catalog.db")).await.unwrap();
    assert!(
        Repo::open(catalog.clone(), f.storage.clone(), PASS, settings())
            .await
            .is_err()
    );
    let repo = Repo::open(catalog, f.storage.clone(), "new pass", settings())
        .await
        .unwrap();
    repo.restore(
        &restore_opts(&src, &f.path("out")),
        &NoProgress,
        &CancelFlag::new(),
    )
    .await
    .unwrap();
    // Recovery on a new machine uses the new passphrase too.
    let fresh = Catalog::open_file(&f.path("fresh.db")).await.unwrap();
    storinator_shared::recover(
        fresh,
        f.storage.clone(),
        "new pass",
        settings(),
        &NoProgress,
    )
    .await
    .unwrap();
}
