//! End-to-end engine tests: backup and restore through the storage trait.

mod common;

use std::sync::atomic::Ordering;

use common::*;
use storinator_shared::catalog::CHUNK_LISTS;
use storinator_shared::{
    BackupOptions, CancelFlag, Catalog, Error, NoProgress, Repo, RestoreOptions, Storage, Unlocking,
};

fn backup_opts(path: &std::path::Path) -> BackupOptions {
    BackupOptions {
        path: path.to_path_buf(),
        owner: "local".into(),
        encrypt: true,
    }
}

/// An empty catalog beside the fixture's: a new machine after a disaster.
async fn new_machine_catalog(f: &Fixture) -> Catalog {
    Catalog::open(&storinator_testkit::db::url_for(&f.path("new-machine.db")))
        .await
        .unwrap()
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

/// Chunks are sealed several at a time (a reader's small files, what waits in a sealer's
/// queue): a chunk that repeats within one such set is stored once, none is left unsealed
/// when the reading ends, and the tree restores byte for byte.
#[tokio::test]
async fn chunks_sealed_together_are_each_stored_once_and_restore() {
    let f = Fixture::new().await;
    let src = f.path("src/data");
    std::fs::create_dir_all(&src).unwrap();
    let big = bytes(1_000_000, 7);
    std::fs::write(src.join("big-a.bin"), &big).unwrap();
    let first = f
        .repo
        .backup(&backup_opts(&src), &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    assert!(first.new_data_chunks > 8, "{}", first.new_data_chunks);
    let same = bytes(1000, 1);
    // In path order the shared content comes first, so that each reader's last set (the
    // one sealed when reading ends) holds contents of their own.
    for i in 0..9u8 {
        std::fs::write(src.join(format!("a-same-{i}.txt")), &same).unwrap();
        let own = bytes(1000 + usize::from(i), 10 + u64::from(i));
        std::fs::write(src.join(format!("z-own-{i}.txt")), own).unwrap();
    }
    std::fs::write(src.join("big-b.bin"), &big).unwrap();
    let second = f
        .repo
        .backup(&backup_opts(&src), &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    // Nine files of their own and one content nine files share; the large copy's chunks are
    // the first file's.
    assert_eq!(second.new_data_chunks, 10, "{}", second.snapshot.short_id);
    let out = f.path("out");
    f.repo
        .restore(&restore_opts(&src, &out), &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let name = entry.unwrap().file_name();
        assert_eq!(
            std::fs::read(out.join("data").join(&name)).unwrap(),
            std::fs::read(src.join(&name)).unwrap(),
            "{name:?}"
        );
    }
    assert_eq!(std::fs::read_dir(out.join("data")).unwrap().count(), 20);
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
    let catalog = Catalog::open(&storinator_testkit::db::url_for(&f.path("catalog.db")))
        .await
        .unwrap();
    let err = Repo::open(catalog, f.storage.clone(), "not the passphrase", settings())
        .await
        .err()
        .unwrap();
    assert!(matches!(err, Error::WrongPassphrase), "{err}");
    assert_eq!(err.to_string(), "wrong passphrase");
    // No key at all is a different, equally clear error.
    let empty = Catalog::open(&storinator_testkit::db::url_for(&f.path("other.db")))
        .await
        .unwrap();
    let err = Repo::open(empty, f.storage.clone(), PASS, settings())
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("storinator-worker init"), "{err}");
}

/// The fixture's repository opened again, its key still being unwrapped.
async fn unlocking(f: &Fixture, pass: &str) -> Unlocking {
    let catalog = Catalog::open(&storinator_testkit::db::url_for(&f.path("catalog.db")))
        .await
        .unwrap();
    Repo::begin_open(catalog, f.storage.clone(), pass, settings())
        .await
        .unwrap()
}

/// The command line's restore runs its checking pass while the key is unwrapped: it restores
/// what `Repo::restore` does, and with a wrong passphrase it reports that, before anything the
/// pass found, and writes nothing.
#[tokio::test]
async fn a_restore_checked_while_the_key_is_unwrapped_writes_only_with_the_key() {
    let f = Fixture::new().await;
    let src = f.path("src/data");
    make_tree(&src);
    f.repo
        .backup(&backup_opts(&src), &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    let restore = |pass: &'static str, opts: RestoreOptions| {
        let f = &f;
        async move {
            unlocking(f, pass)
                .await
                .restore(&opts, &NoProgress, &CancelFlag::new())
                .await
        }
    };
    let out = f.path("out");
    let err = restore("not the passphrase", restore_opts(&src, &out))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::WrongPassphrase), "{err}");
    assert!(!out.join("data").exists(), "written without the key");
    // What the pass finds comes second: a path that is not in the snapshot.
    let missing = restore_opts(&src.join("no such file"), &out);
    let err = restore("not the passphrase", missing.clone())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::WrongPassphrase), "{err}");
    let err = restore(PASS, missing).await.unwrap_err();
    assert!(matches!(err, Error::NotFound(_)), "{err}");

    let r = restore(PASS, restore_opts(&src, &out)).await.unwrap();
    assert_eq!(r.files, 36);
    assert_eq!(describe_tree(&src), describe_tree(&out.join("data")));
    assert!(temp_files(&out).is_empty());
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
        sqlx::query("UPDATE entries SET path = $1 WHERE path LIKE 'data/%'")
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
    assert_eq!(f.storage.put_count(), 3);
    // The catalog knows exactly the three finished packs, and each is really in storage.
    let finished = f.storage.puts.lock().unwrap().clone();
    let mut stored: Vec<String> = f
        .repo
        .catalog
        .packs()
        .await
        .unwrap()
        .iter()
        .filter(|p| p.state == "stored")
        .map(|p| format!("{}.enc", p.id))
        .collect();
    stored.sort();
    let mut expected = finished.clone();
    expected.sort();
    assert_eq!(
        stored, expected,
        "the catalog's stored packs are the uploaded ones"
    );
    let in_storage: Vec<String> = f
        .storage
        .inner
        .snapshot()
        .into_iter()
        .map(|(n, _)| n)
        .filter(|n| !n.starts_with("key-"))
        .collect();
    assert_eq!(in_storage.len(), 3, "{in_storage:?}");
    let finished_chunks: usize =
        stored_packs(f.storage.as_ref(), &f.repo.ring_all().await.unwrap())
            .await
            .unwrap()
            .iter()
            .map(|p| p.entries.len())
            .sum();
    assert!(finished_chunks > 0);

    f.storage
        .fail_puts_after
        .store(usize::MAX, Ordering::SeqCst);
    let resumed = f
        .repo
        .backup(&backup_opts(&src), &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    // Exactly what was missing went up: no chunk of a finished pack is stored a second
    // time, the finished packs are still there, and this run uploaded exactly its own packs.
    let packs = stored_packs(f.storage.as_ref(), &f.repo.ring_all().await.unwrap())
        .await
        .unwrap();
    assert_eq!(
        duplicate_data_chunks(&packs),
        vec![],
        "chunks uploaded twice"
    );
    let names: Vec<&str> = packs.iter().map(|p| p.name.as_str()).collect();
    for n in &finished {
        assert!(names.contains(&n.as_str()), "finished pack {n} is gone");
    }
    assert_eq!(f.storage.put_count(), 3 + resumed.packs as usize);
    assert_eq!(packs.len(), 3 + resumed.packs as usize);
    let data_chunks: u64 = packs
        .iter()
        .flat_map(|p| &p.entries)
        .filter(|e| e.kind == BlobKind::Data)
        .count() as u64;
    let first_try_data = data_chunks - resumed.new_data_chunks;
    assert!(
        first_try_data > 0,
        "the finished packs held data the resume did not store again"
    );
    let out = f.path("out");
    f.repo
        .restore(&restore_opts(&src, &out), &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    assert_eq!(describe_tree(&src), describe_tree(&out.join("data")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_cancelled_mid_way_keeps_its_finished_packs_and_leaves_no_snapshot() {
    let f = Fixture::new().await;
    let src = f.path("src/data");
    std::fs::create_dir_all(&src).unwrap();
    for i in 0..6 {
        std::fs::write(src.join(format!("f{i}.bin")), bytes(400_000, 30 + i)).unwrap();
    }
    // Cancel right after the second pack has landed: the backup is mid-way through its data.
    let cancel = CancelFlag::new();
    let c = cancel.clone();
    f.storage.on_put(move |_, n| {
        if n == 2 {
            c.cancel();
        }
    });
    let err = f
        .repo
        .backup(&backup_opts(&src), &NoProgress, &cancel)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Cancelled), "{err}");
    assert!(f.repo.snapshots("local", None).await.unwrap().is_empty());
    // Every pack that finished is kept: in storage and in the catalog as stored.
    let finished = f.storage.puts.lock().unwrap().clone();
    assert!(finished.len() >= 2, "{finished:?}");
    let packs_before = stored_packs(f.storage.as_ref(), &f.repo.ring_all().await.unwrap())
        .await
        .unwrap();
    assert_eq!(packs_before.len(), finished.len());
    let in_catalog: Vec<String> = f
        .repo
        .catalog
        .packs()
        .await
        .unwrap()
        .iter()
        .filter(|p| p.state == "stored")
        .map(|p| format!("{}.enc", p.id))
        .collect();
    for n in &finished {
        assert!(in_catalog.contains(n), "{n} not recorded as stored");
    }
    // The next run stores only what is missing.
    f.storage.on_put(|_, _| {});
    let s = f
        .repo
        .backup(&backup_opts(&src), &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    let packs = stored_packs(f.storage.as_ref(), &f.repo.ring_all().await.unwrap())
        .await
        .unwrap();
    assert_eq!(duplicate_data_chunks(&packs), vec![]);
    assert_eq!(packs.len(), finished.len() + s.packs as usize);
    let out = f.path("out");
    f.repo
        .restore(&restore_opts(&src, &out), &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    assert_eq!(describe_tree(&src), describe_tree(&out.join("data")));
}

#[tokio::test]
async fn special_files_and_non_utf8_names_are_warnings_not_failures() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let f = Fixture::new().await;
    let src = f.path("src/data");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("ok.txt"), b"fine").unwrap();
    let status = std::process::Command::new("mkfifo")
        .arg(src.join("a-fifo"))
        .status()
        .unwrap();
    assert!(status.success());
    let _socket = std::os::unix::net::UnixListener::bind(src.join("a-socket")).unwrap();
    // A device file needs CAP_MKNOD; without it that one case is left out, visibly.
    let device = std::process::Command::new("mknod")
        .arg(src.join("a-device"))
        .args(["c", "1", "3"])
        .status()
        .is_ok_and(|s| s.success());
    if !device {
        eprintln!("note: mknod not permitted here; the device-file case is not exercised");
    }
    std::fs::write(src.join(OsStr::from_bytes(b"bad-\xff-name.txt")), b"x").unwrap();
    std::os::unix::fs::symlink(
        OsStr::from_bytes(b"target-\xfe"),
        src.join("link-to-bad-target"),
    )
    .unwrap();
    std::os::unix::fs::symlink("loop", src.join("loop")).unwrap();
    let s = f
        .repo
        .backup(&backup_opts(&src), &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    let warned = |path: &str, what: &str| {
        assert!(
            s.warnings
                .iter()
                .any(|w| w.path == path && w.message.contains(what)),
            "no warning about {path} ({what}): {:?}",
            s.warnings
        );
    };
    warned("data/a-fifo", "fifo");
    warned("data/a-socket", "socket");
    if device {
        warned("data/a-device", "device");
    }
    warned("data/bad-\u{fffd}-name.txt", "UTF-8");
    warned("data/link-to-bad-target", "UTF-8");
    assert_eq!(
        s.warnings.len(),
        4 + usize::from(device),
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
    let restored = names_in(&out.join("data"));
    assert_eq!(
        restored,
        vec!["loop", "ok.txt"],
        "skipped items are not restored"
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
    let fresh = new_machine_catalog(&f).await;
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
    // Lose the pack holding a file's data, one holding none of the snapshot's own objects
    // (those are lost for good with their pack; at least two of the 400 kB fill a pack
    // before the snapshot's objects are written, but which two varies).
    let mut victim = None;
    for i in 0..4 {
        let file = format!("data/doc{i}.txt");
        let pack = pack_of(&f, &file).await;
        if !holds_snapshot_objects(&f, &pack).await {
            victim = Some((file, pack));
            break;
        }
    }
    let (victim, lost) = victim.expect("a pack of file data only");
    f.storage
        .inner
        .remove(&storinator_shared::ObjectRef::new(
            format!("{lost}.enc"),
            "",
        ))
        .await
        .unwrap();
    let victims = files_in_pack(&f, &lost).await;
    assert!(victims.contains(&victim));
    let report = f.repo.verify(false, &NoProgress).await.unwrap();
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.contains("missing") && p.contains(&victim)),
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

/// Forces the next backup to read `file` again (as if it had been touched).
fn touch(file: &std::path::Path, secs: i64) {
    filetime::set_file_mtime(file, filetime::FileTime::from_unix_time(secs, 0)).unwrap();
}

/// The pack holding the first chunk of `path`'s content.
async fn pack_of(f: &Fixture, path: &str) -> String {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT p.id FROM entries e JOIN {CHUNK_LISTS} cc ON cc.content_id = e.content_id \
         JOIN chunks c ON c.no = cc.chunk_no JOIN packs p ON p.no = c.pack_no \
         WHERE e.path = $1 ORDER BY cc.seq LIMIT 1"
    )))
    .bind(path)
    .fetch_one(f.repo.catalog.pool())
    .await
    .unwrap()
}

/// Whether `pack` holds a snapshot's object or a chunk of a snapshot's listing.
async fn holds_snapshot_objects(f: &Fixture, pack: &str) -> bool {
    let n: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM chunks c JOIN packs p ON p.no = c.pack_no WHERE p.id = $1 \
         AND (c.id IN (SELECT blob_id FROM snapshots) \
              OR c.id IN (SELECT chunk_id FROM snapshot_listing))",
    )
    .bind(pack)
    .fetch_one(f.repo.catalog.pool())
    .await
    .unwrap();
    n > 0
}

/// Files whose content has a chunk in `pack`.
async fn files_in_pack(f: &Fixture, pack: &str) -> Vec<String> {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT DISTINCT e.path FROM entries e JOIN {CHUNK_LISTS} cc ON cc.content_id = e.content_id \
         JOIN chunks c ON c.no = cc.chunk_no JOIN packs p ON p.no = c.pack_no \
         WHERE p.id = $1 ORDER BY e.path"
    )))
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
    let content = bytes(600_000, 61);
    std::fs::write(src.join("plain.bin"), &content).unwrap();
    let backup = |encrypt: bool| {
        let mut o = backup_opts(&src);
        o.encrypt = encrypt;
        o
    };
    let plain = f
        .repo
        .backup(&backup(false), &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    assert!(!plain.snapshot.encrypted);
    assert!(plain.new_data_chunks > 1, "{}", plain.new_data_chunks);
    // Unencrypted -> encrypted: the encrypted backup stores every chunk again.
    touch(&src.join("plain.bin"), 1_700_000_000);
    let enc = f
        .repo
        .backup(&backup(true), &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    assert_eq!(plain.new_data_bytes, content.len() as u64);
    assert_eq!(
        enc.new_data_bytes,
        content.len() as u64,
        "encrypted backup reused unencrypted chunks"
    );
    // Encrypted -> unencrypted, in a fresh repository so nothing unencrypted exists yet.
    let g = Fixture::new().await;
    let src2 = g.path("src/data");
    std::fs::create_dir_all(&src2).unwrap();
    std::fs::write(src2.join("plain.bin"), &content).unwrap();
    let mut o = backup_opts(&src2);
    let first = g
        .repo
        .backup(&o, &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    touch(&src2.join("plain.bin"), 1_700_000_000);
    o.encrypt = false;
    let second = g
        .repo
        .backup(&o, &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    assert!(first.new_data_chunks > 1);
    assert_eq!(first.new_data_bytes, content.len() as u64);
    assert_eq!(
        second.new_data_bytes,
        content.len() as u64,
        "unencrypted backup reused encrypted chunks"
    );
    // Both kinds restore from either repository.
    for (repo, src, snap) in [
        (&f.repo, &src, &plain.snapshot.short_id),
        (&f.repo, &src, &enc.snapshot.short_id),
        (&g.repo, &src2, &second.snapshot.short_id),
    ] {
        let out = f.path(&format!("out-{snap}"));
        let mut r = restore_opts(src, &out);
        r.snapshot = Some(snap.clone());
        repo.restore(&r, &NoProgress, &CancelFlag::new())
            .await
            .unwrap();
        assert_eq!(std::fs::read(out.join("data/plain.bin")).unwrap(), content);
    }
}

/// Reads a sealed blob the way someone without the key can, from the README's format alone:
/// `header(4) | payload | MAC(32)`, the header's flags saying whether the payload is encrypted
/// (bit 0) or zstd-compressed (bit 1). `None` for an encrypted blob.
fn read_without_key(sealed: &[u8]) -> Option<Vec<u8>> {
    assert_eq!(sealed[0], 0xB5, "blob magic");
    let flags = sealed[2];
    if flags & 1 != 0 {
        return None;
    }
    let payload = &sealed[4..sealed.len() - 32];
    Some(if flags & 2 != 0 {
        zstd::decode_all(payload).unwrap()
    } else {
        payload.to_vec()
    })
}

/// The sealed trailer of a whole pack and where the blobs end (the format's tail).
fn sealed_trailer(pack: &[u8]) -> (&[u8], u64) {
    let n = pack.len();
    assert_eq!(&pack[n - 8..], b"STPACK01");
    let tlen = u32::from_le_bytes(pack[n - 12..n - 8].try_into().unwrap()) as usize;
    let body = n - 12 - tlen;
    (&pack[body..n - 12], body as u64)
}

#[tokio::test]
async fn unencrypted_packs_are_readable_without_any_key() {
    use storinator_shared::format::pack::decode_trailer;
    let f = Fixture::new().await;
    let src = f.path("src/public-mirror");
    std::fs::create_dir_all(&src).unwrap();
    let content = b"readable without a key ".repeat(50);
    std::fs::write(src.join("plain.txt"), &content).unwrap();
    let mut o = backup_opts(&src);
    o.encrypt = false;
    f.repo
        .backup(&o, &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    // Someone with the packs and no key at all reads the table of contents, the data and the
    // listing (reading is all they can do: the MAC needs the key).
    let mut data = Vec::new();
    let mut listing = Vec::new();
    for (name, size) in f.storage.inner.snapshot() {
        if name.starts_with("key-") {
            continue;
        }
        let obj = storinator_shared::ObjectRef::new(&name, "");
        let pack = f
            .storage
            .inner
            .get_range(&obj, 0, size as u64)
            .await
            .unwrap();
        let (sealed, body_len) = sealed_trailer(&pack);
        let toc = read_without_key(sealed).expect("an unencrypted pack's trailer is in the clear");
        for e in decode_trailer(&name, &toc, body_len).unwrap() {
            let blob = &pack[e.offset as usize..(e.offset + u64::from(e.length)) as usize];
            let plain = read_without_key(blob).expect("unencrypted blob");
            match e.kind {
                BlobKind::Data => data.push(plain),
                BlobKind::Listing => listing.extend(plain),
                BlobKind::Snapshot => {}
            }
        }
    }
    assert_eq!(data, vec![content], "the file's data, in the clear");
    let listing = String::from_utf8(listing).unwrap();
    assert!(listing.contains("public-mirror/plain.txt"), "{listing}");

    // An encrypted pack is not: without the key even its table of contents stays closed.
    let src2 = f.path("src/private");
    std::fs::create_dir_all(&src2).unwrap();
    std::fs::write(src2.join("secret.txt"), b"not for you").unwrap();
    let before: Vec<String> = f
        .storage
        .inner
        .snapshot()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    f.repo
        .backup(&backup_opts(&src2), &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    let (name, size) = f
        .storage
        .inner
        .snapshot()
        .into_iter()
        .find(|(n, _)| !before.contains(n))
        .unwrap();
    let obj = storinator_shared::ObjectRef::new(&name, "");
    let pack = f
        .storage
        .inner
        .get_range(&obj, 0, size as u64)
        .await
        .unwrap();
    assert_eq!(read_without_key(sealed_trailer(&pack).0), None);
    assert!(
        !String::from_utf8_lossy(&pack).contains("secret.txt"),
        "an encrypted pack shows no name"
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
    let catalog = Catalog::open(&storinator_testkit::db::url_for(&f.path("catalog.db")))
        .await
        .unwrap();
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
    // Recovery on a new machine uses the new passphrase too, and only the new one.
    let fresh = Catalog::open(&storinator_testkit::db::url_for(&f.path("fresh.db")))
        .await
        .unwrap();
    let old = storinator_shared::recover(
        fresh.clone(),
        f.storage.clone(),
        PASS,
        settings(),
        &NoProgress,
    )
    .await;
    assert!(
        matches!(old, Err(Error::WrongPassphrase)),
        "{:?}",
        old.err()
    );
    let (recovered, report) = storinator_shared::recover(
        fresh,
        f.storage.clone(),
        "new pass",
        settings(),
        &NoProgress,
    )
    .await
    .unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(report.snapshots, 1);
    let out = f.path("out-recovered");
    recovered
        .restore(&restore_opts(&src, &out), &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    assert_eq!(std::fs::read(out.join("data/x")).unwrap(), b"x");
}

#[tokio::test]
async fn verify_catches_a_pack_of_the_wrong_size_and_a_bad_table_of_contents() {
    let f = Fixture::new().await;
    let src = f.path("src/data");
    std::fs::create_dir_all(&src).unwrap();
    for i in 0..3 {
        std::fs::write(src.join(format!("f{i}.bin")), bytes(200_000, 40 + i)).unwrap();
    }
    f.repo
        .backup(&backup_opts(&src), &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    let clean = f.repo.verify(false, &NoProgress).await.unwrap();
    assert!(clean.problems.is_empty(), "{:?}", clean.problems);
    // Two packs holding file data: one grows by a byte, the other's trailer is damaged.
    let packs = stored_packs(f.storage.as_ref(), &f.repo.ring_all().await.unwrap())
        .await
        .unwrap();
    let with_data: Vec<_> = packs
        .iter()
        .filter(|p| p.entries.iter().any(|e| e.kind == BlobKind::Data))
        .collect();
    assert!(with_data.len() >= 2, "{} packs with data", with_data.len());
    let (longer, damaged) = (with_data[0], with_data[1]);
    let obj = storinator_shared::ObjectRef::new(&longer.name, "");
    let mut bytes_of = f
        .storage
        .inner
        .get_range(&obj, 0, longer.size)
        .await
        .unwrap();
    bytes_of.push(0);
    f.storage
        .inner
        .put_bytes(&longer.name, bytes_of)
        .await
        .unwrap();
    // The last byte of the sealed trailer sits just before the 12-byte tail.
    let at = damaged.size as usize - 12 - 1;
    assert!(f.storage.inner.corrupt(&damaged.name, at));

    let report = f.repo.verify(false, &NoProgress).await.unwrap();
    assert_eq!(report.problems.len(), 2, "{:?}", report.problems);
    let about = |pack: &str| {
        report
            .problems
            .iter()
            .find(|p| p.contains(pack))
            .unwrap_or_else(|| panic!("{pack} not reported: {:?}", report.problems))
            .clone()
    };
    let size_problem = about(&longer.name);
    assert!(
        size_problem.contains(&format!("{} bytes", longer.size + 1))
            && size_problem.contains("data/f"),
        "{size_problem}"
    );
    let toc_problem = about(&damaged.name);
    assert!(
        toc_problem.contains("trailer") && toc_problem.contains("data/f"),
        "{toc_problem}"
    );
}

/// Changes a file between the walk and the read: the first report of the upload phase comes
/// after the walk has recorded the file's size and before any file is read.
struct ChangeAfterWalk {
    file: std::path::PathBuf,
    done: std::sync::atomic::AtomicBool,
}

impl storinator_shared::Progress for ChangeAfterWalk {
    fn report(&self, r: &storinator_shared::ProgressReport) {
        if r.phase == storinator_shared::Phase::Uploading && !self.done.swap(true, Ordering::SeqCst)
        {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(&self.file)
                .unwrap();
            f.write_all(b" and a bit more").unwrap();
        }
    }
}

#[tokio::test]
async fn a_file_changed_while_read_is_stored_as_read_with_a_warning_and_read_again_next_time() {
    let f = Fixture::new().await;
    let src = f.path("src/data");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("steady.txt"), b"steady").unwrap();
    let moving = src.join("moving.log");
    std::fs::write(&moving, b"first line").unwrap();
    let progress = ChangeAfterWalk {
        file: moving.clone(),
        done: Default::default(),
    };
    let s = f
        .repo
        .backup(&backup_opts(&src), &progress, &CancelFlag::new())
        .await
        .unwrap();
    assert!(progress.done.load(Ordering::SeqCst), "the file was changed");
    assert_eq!(s.warnings.len(), 1, "{:?}", s.warnings);
    assert_eq!(s.warnings[0].path, "data/moving.log");
    assert!(
        s.warnings[0].message.contains("changed while being read"),
        "{}",
        s.warnings[0].message
    );
    assert_eq!(s.snapshot.files, 2, "the changed file is in the snapshot");
    let out = f.path("out");
    f.repo
        .restore(&restore_opts(&src, &out), &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(out.join("data/moving.log")).unwrap(),
        b"first line and a bit more",
        "stored as read"
    );
    // The next backup reads it again (and only it); the one after reads nothing.
    let again = f
        .repo
        .backup(&backup_opts(&src), &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    assert!(again.warnings.is_empty(), "{:?}", again.warnings);
    assert_eq!(
        again.snapshot.bytes_read,
        b"first line and a bit more".len() as u64
    );
    let third = f
        .repo
        .backup(&backup_opts(&src), &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    assert_eq!(third.snapshot.bytes_read, 0);
}

#[tokio::test]
async fn recover_twice_changes_nothing_the_second_time() {
    let f = Fixture::new().await;
    let src = f.path("src/data");
    make_tree(&src);
    f.repo
        .backup(&backup_opts(&src), &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    std::fs::write(src.join("small.txt"), b"second version").unwrap();
    f.repo
        .backup(&backup_opts(&src), &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    let fresh = new_machine_catalog(&f).await;
    let (repo, first) = storinator_shared::recover(
        fresh.clone(),
        f.storage.clone(),
        PASS,
        settings(),
        &NoProgress,
    )
    .await
    .unwrap();
    assert!(first.problems.is_empty(), "{:?}", first.problems);
    assert_eq!(first.snapshots, 2);
    let snaps = repo.snapshots("local", None).await.unwrap();
    let rows = repo.catalog.entry_row_count().await.unwrap();
    let puts = f.storage.put_count();
    let objects = f.storage.inner.snapshot();

    let (repo, second) =
        storinator_shared::recover(fresh, f.storage.clone(), PASS, settings(), &NoProgress)
            .await
            .unwrap();
    assert!(second.problems.is_empty(), "{:?}", second.problems);
    assert_eq!(second.snapshots, 0, "no snapshot is recovered twice");
    let again = repo.snapshots("local", None).await.unwrap();
    assert_eq!(
        again.iter().map(|s| &s.short_id).collect::<Vec<_>>(),
        snaps.iter().map(|s| &s.short_id).collect::<Vec<_>>()
    );
    assert_eq!(repo.catalog.entry_row_count().await.unwrap(), rows);
    assert_eq!(
        f.storage.put_count(),
        puts,
        "recover writes nothing to storage"
    );
    assert_eq!(f.storage.inner.snapshot(), objects);
    let out = f.path("out");
    repo.restore(&restore_opts(&src, &out), &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    assert_eq!(describe_tree(&src), describe_tree(&out.join("data")));
}

/// Where the first chunk of `path` (in the current snapshot) is stored: pack id and offset.
async fn first_chunk_of(f: &Fixture, path: &str) -> (String, i64) {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT p.id, c.\"offset\" FROM entries e
           JOIN {CHUNK_LISTS} cc ON cc.content_id = e.content_id AND cc.seq = 0
           JOIN chunks c ON c.no = cc.chunk_no JOIN packs p ON p.no = c.pack_no
          WHERE e.path = $1 AND e.to_seq IS NULL"
    )))
    .bind(path)
    .fetch_one(f.repo.catalog.pool())
    .await
    .unwrap()
}

#[tokio::test]
async fn one_bad_file_fails_alone_and_the_rest_of_the_restore_goes_on() {
    let f = Fixture::new().await;
    let src = f.path("src/data");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    for i in 0..6u64 {
        std::fs::write(src.join(format!("sub/f{i}.bin")), bytes(120_000, 500 + i)).unwrap();
    }
    std::fs::write(src.join("note.txt"), b"a small file after the bad one").unwrap();
    f.repo
        .backup(&backup_opts(&src), &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    // Damage one chunk of one file in the middle of the tree.
    let (pack, offset) = first_chunk_of(&f, "data/sub/f3.bin").await;
    assert!(
        f.storage
            .inner
            .corrupt(&format!("{pack}.enc"), offset as usize + 40)
    );
    let out = f.path("out");
    let err = f
        .repo
        .restore(&restore_opts(&src, &out), &NoProgress, &CancelFlag::new())
        .await
        .unwrap_err();
    let Error::RestoreFailed { failures } = &err else {
        panic!("expected RestoreFailed, got {err}")
    };
    assert_eq!(
        failures.iter().map(|(p, _)| p.as_str()).collect::<Vec<_>>(),
        vec!["data/sub/f3.bin"],
        "{failures:?}"
    );
    assert!(
        failures[0].1.contains("authentication failed"),
        "{failures:?}"
    );
    // Everything else is there, byte for byte, with its metadata; the bad file is not.
    let mut want = describe_tree(&src);
    want.remove("sub/f3.bin");
    assert_eq!(want, describe_tree(&out.join("data")));
    assert!(!out.join("data/sub/f3.bin").exists());
    assert!(temp_files(&out).is_empty());
}

#[tokio::test]
async fn content_whose_size_or_sha256_does_not_match_is_rejected() {
    let f = Fixture::new().await;
    let src = f.path("src/data");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("a.bin"), bytes(100_000, 1)).unwrap();
    std::fs::write(src.join("b.bin"), bytes(100_000, 2)).unwrap();
    std::fs::write(src.join("c.bin"), bytes(150_000, 3)).unwrap();
    std::fs::write(src.join("d.bin"), bytes(50_000, 4)).unwrap();
    f.repo
        .backup(&backup_opts(&src), &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    // The recorded values no longer match the (authentic) data: a's SHA-256 and b's size.
    sqlx::query(
        "UPDATE contents SET sha256 = $1
          WHERE id = (SELECT content_id FROM entries WHERE path = 'data/a.bin')",
    )
    .bind(vec![0u8; 32])
    .execute(f.repo.catalog.pool())
    .await
    .unwrap();
    sqlx::query("UPDATE entries SET size = size + 1 WHERE path = 'data/b.bin'")
        .execute(f.repo.catalog.pool())
        .await
        .unwrap();
    let out = f.path("out");
    let err = f
        .repo
        .restore(&restore_opts(&src, &out), &NoProgress, &CancelFlag::new())
        .await
        .unwrap_err();
    let Error::RestoreFailed { failures } = &err else {
        panic!("expected RestoreFailed, got {err}")
    };
    let mut failed: Vec<&str> = failures.iter().map(|(p, _)| p.as_str()).collect();
    failed.sort();
    assert_eq!(failed, vec!["data/a.bin", "data/b.bin"], "{failures:?}");
    for name in ["a.bin", "b.bin"] {
        assert!(!out.join("data").join(name).exists(), "{name} written");
    }
    assert_eq!(
        std::fs::read(out.join("data/c.bin")).unwrap(),
        bytes(150_000, 3)
    );
    assert_eq!(
        std::fs::read(out.join("data/d.bin")).unwrap(),
        bytes(50_000, 4)
    );
    assert!(temp_files(&out).is_empty());
}

#[tokio::test]
async fn restore_never_writes_through_a_symlink_it_created_itself() {
    let f = Fixture::new().await;
    let src = f.path("src/data");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::write(src.join("sub/file.txt"), b"payload").unwrap();
    let elsewhere = f.path("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, src.join("lnk")).unwrap();
    f.repo
        .backup(&backup_opts(&src), &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    // A crafted listing: the file now lives "under" the symlink the restore creates first.
    sqlx::query("UPDATE entries SET path = 'data/lnk/file.txt' WHERE path = 'data/sub/file.txt'")
        .execute(f.repo.catalog.pool())
        .await
        .unwrap();
    for overwrite in [false, true] {
        let out = f.path(&format!("out-{overwrite}"));
        let mut o = restore_opts(&src, &out);
        o.overwrite = overwrite;
        let err = f
            .repo
            .restore(&o, &NoProgress, &CancelFlag::new())
            .await
            .expect_err("the crafted path was restored");
        // Refused while planning, naming the path and the symlink, before anything is
        // written (not merely failing later because a folder happened to be made first).
        assert!(
            matches!(&err, Error::Invalid(m)
                if m.contains("data/lnk/file.txt") && m.contains("lies under the symlink")),
            "{err}"
        );
        assert!(!out.join("data/lnk").exists(), "{out:?}/data/lnk was made");
        assert!(
            !elsewhere.join("file.txt").exists(),
            "written through the restored symlink"
        );
        assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
        assert!(temp_files(&out).is_empty());
        assert!(temp_files(&elsewhere).is_empty());
    }
}

/// One scalar from the catalog.
async fn count(catalog: &Catalog, sql: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string()))
        .fetch_one(catalog.pool())
        .await
        .unwrap()
}

/// Every content's chunk list covers its bytes exactly once, in order from 0.
async fn chunk_lists_are_whole(catalog: &Catalog) {
    let broken = count(
        catalog,
        &format!(
            "SELECT COUNT(*) FROM (SELECT c.id FROM contents c \
         LEFT JOIN {CHUNK_LISTS} cc ON cc.content_id = c.id \
         LEFT JOIN chunks ch ON ch.no = cc.chunk_no GROUP BY c.id, c.size \
         HAVING c.size <> CAST(COALESCE(SUM(ch.raw_length), 0) AS BIGINT) \
         OR COUNT(cc.seq) <> COALESCE(MAX(cc.seq) + 1, 0)) AS t"
        ),
    )
    .await;
    assert_eq!(broken, 0, "contents whose chunk list does not add up");
}

/// Contents are numbered as migration 0027 says: a content of one chunk has that chunk's
/// number as its id and no rows in `content_chunks`; every other content (several chunks, or
/// none) has an id below 0, counting down from -1 without a gap. Returns how many there are
/// of each (one chunk, other).
async fn contents_are_numbered_by_their_chunks(catalog: &Catalog) -> (i64, i64) {
    let misnumbered = count(
        catalog,
        "SELECT COUNT(*) FROM contents c WHERE c.id > 0 \
         AND NOT EXISTS (SELECT 1 FROM chunks ch WHERE ch.no = c.id)",
    )
    .await;
    assert_eq!(
        misnumbered, 0,
        "a content above 0 that is no chunk's number"
    );
    let listed = count(
        catalog,
        "SELECT COUNT(*) FROM content_chunks WHERE content_id > 0",
    )
    .await;
    assert_eq!(
        listed, 0,
        "a content numbered as its chunk with a list besides"
    );
    let single_listed = count(
        catalog,
        "SELECT COUNT(*) FROM contents c WHERE c.id < 0 \
         AND (SELECT COUNT(*) FROM content_chunks cc WHERE cc.content_id = c.id) = 1",
    )
    .await;
    assert_eq!(single_listed, 0, "a one-chunk content with an id below 0");
    let single = count(catalog, "SELECT COUNT(*) FROM contents WHERE id > 0").await;
    let other = count(catalog, "SELECT COUNT(*) FROM contents WHERE id < 0").await;
    assert_eq!(
        count(catalog, "SELECT COALESCE(MIN(id), 0) FROM contents").await,
        -other,
        "the ids below 0 have a gap"
    );
    (single, other)
}

/// The catalog writes rows many to a statement (`catalog::bulk`, 128 rows each): a backup
/// of hundreds of files, some of them copies of each other and some empty, records each
/// content once with its whole chunk list, and a re-backup closes and adds rows across
/// statement boundaries.
#[tokio::test]
async fn a_commit_of_hundreds_of_files_records_every_row_once() {
    let f = Fixture::new().await;
    let src = f.path("src/data");
    let write = |i: usize, seed: u64| {
        let dir = src.join(format!("d{}", i % 3));
        std::fs::create_dir_all(&dir).unwrap();
        // Files i and i + 150 are copies; every 50th file is empty; some span chunks.
        let len = if i % 50 == 7 {
            0
        } else {
            1_000 + (i % 150) * 997 % 90_000
        };
        std::fs::write(
            dir.join(format!("f{i:03}")),
            bytes(len, seed + (i % 150) as u64),
        )
        .unwrap();
    };
    for i in 0..300 {
        write(i, 1);
    }
    let v1 = describe_tree(&src);
    let opts = backup_opts(&src);
    let s1 = f
        .repo
        .backup(&opts, &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    assert_eq!(s1.snapshot.files, 300);
    let catalog = &f.repo.catalog;
    // 150 distinct contents, the empty one among them.
    assert_eq!(count(catalog, "SELECT COUNT(*) FROM contents").await, 148);
    chunk_lists_are_whole(catalog).await;
    let (single, other) = contents_are_numbered_by_their_chunks(catalog).await;
    assert!(
        single > 0 && other > 1,
        "{single} of one chunk, {other} others"
    );
    let rows1 = catalog.entry_row_count().await.unwrap();
    assert_eq!(rows1, 304, "300 files, 3 folders and the root");

    // Change 200 files (new content) and delete 20: 220 rows closed, 200 added.
    for i in 0..200 {
        write(i, 1_000);
    }
    for i in 280..300 {
        std::fs::remove_file(src.join(format!("d{}", i % 3)).join(format!("f{i:03}"))).unwrap();
    }
    let v2 = describe_tree(&src);
    let s2 = f
        .repo
        .backup(&opts, &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    assert_eq!(s2.snapshot.files, 280);
    chunk_lists_are_whole(catalog).await;
    contents_are_numbered_by_their_chunks(catalog).await;
    assert_eq!(
        count(catalog, "SELECT COUNT(*) FROM entries WHERE to_seq IS NULL").await,
        284
    );
    // The three folders changed too (their mtimes), the root did not.
    assert_eq!(catalog.entry_row_count().await.unwrap(), rows1 + 200 + 3);

    // Files touched but not changed are read again and found among the recorded contents:
    // one of one chunk by its chunk's number, any other by its SHA-256.
    let ids = || async {
        sqlx::query_as::<_, (String, i64)>(
            "SELECT path, content_id FROM entries WHERE to_seq IS NULL AND kind = 0 ORDER BY path",
        )
        .fetch_all(catalog.pool())
        .await
        .unwrap()
    };
    let (contents, before) = (
        count(catalog, "SELECT COUNT(*) FROM contents").await,
        ids().await,
    );
    for i in 200..280 {
        touch(
            &src.join(format!("d{}", i % 3)).join(format!("f{i:03}")),
            1_600_000_000 + i as i64,
        );
    }
    let s3 = f
        .repo
        .backup(&opts, &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    assert!(s3.snapshot.bytes_read > 0, "the touched files were read");
    assert_eq!(s3.snapshot.new_chunks, 0);
    assert_eq!(
        count(catalog, "SELECT COUNT(*) FROM contents").await,
        contents
    );
    assert_eq!(ids().await, before);

    for (s, want) in [(&s1, &v1), (&s2, &v2)] {
        let to = f.path(&format!("out-{}", s.snapshot.seq));
        let mut o = restore_opts(&src, &to);
        o.snapshot = Some(s.snapshot.short_id.clone());
        f.repo
            .restore(&o, &NoProgress, &CancelFlag::new())
            .await
            .unwrap();
        assert_eq!(
            &describe_tree(&to.join("data")),
            want,
            "snapshot {}",
            s.snapshot.seq
        );
    }
}

/// verify --read-data and a scrub read a large pack in ranges of several MiB, as many
/// requested at once as the storage's read-ahead holds: over a far link (Telegram is 50-150 ms
/// away) one range at a time would leave it idle for a round trip per range.
#[tokio::test]
async fn verify_and_scrub_read_a_large_packs_ranges_several_at_once() {
    let f = Fixture::new().await;
    let mut settings = settings();
    settings.pack_size = 40 << 20;
    let repo = Repo::open(f.repo.catalog.clone(), f.storage.clone(), PASS, settings)
        .await
        .unwrap();
    let src = f.path("big");
    std::fs::create_dir_all(&src).unwrap();
    // Incompressible: three 8 MiB ranges' worth in one pack.
    std::fs::write(src.join("blob.bin"), bytes(20 << 20, 42)).unwrap();
    repo.backup(&backup_opts(&src), &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    let usage = repo.catalog.pack_usage(i64::MAX).await.unwrap();
    assert!(usage.iter().any(|p| p.size > 16 << 20), "{usage:?}");
    f.storage.read_delay_ms.store(20, Ordering::SeqCst);
    let report = repo.verify(true, &NoProgress).await.unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    // The memory store reads 16 MiB ahead: two 8 MiB ranges at once, never more.
    assert_eq!(f.storage.read_ahead(), 16 << 20);
    assert_eq!(
        f.storage.max_reads_in_flight.load(Ordering::SeqCst),
        2,
        "ranges read at once"
    );
    // A scrub whose budget covers the pack reads it the same way.
    f.storage.max_reads_in_flight.store(0, Ordering::SeqCst);
    let opts = storinator_shared::ScrubOptions {
        budget: 64 << 20,
        now_ms: 1,
        heal: false,
    };
    let r = repo
        .scrub(&opts, &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    assert!(r.bytes_read >= 20 << 20, "{r:?}");
    assert_eq!(
        f.storage.max_reads_in_flight.load(Ordering::SeqCst),
        2,
        "ranges a scrub read at once"
    );
}

/// Recover reads a snapshot's listing chunks several at once: a large tree's listing is many
/// chunks, and over a far link one read at a time costs a round trip each.
#[tokio::test]
async fn recover_reads_a_listings_chunks_several_at_once() {
    let f = Fixture::new().await;
    let src = f.path("src/many");
    std::fs::create_dir_all(&src).unwrap();
    // Enough entries for a listing of more chunks than the backup seals at once: their ids
    // must come back in order over the batches.
    for i in 0..5000 {
        std::fs::write(src.join(format!("file-{i:04}.txt")), format!("{i}")).unwrap();
    }
    f.repo
        .backup(&backup_opts(&src), &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    let listing: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM snapshot_listing")
        .fetch_one(f.repo.catalog.pool())
        .await
        .unwrap();
    // More chunks than are sealed at once (`pipeline::LISTING_BATCH`, 8).
    assert!(listing > 8, "{listing} listing chunks");
    let fresh = new_machine_catalog(&f).await;
    f.storage.read_delay_ms.store(10, Ordering::SeqCst);
    let (repo, report) =
        storinator_shared::recover(fresh, f.storage.clone(), PASS, settings(), &NoProgress)
            .await
            .unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert!(
        f.storage.max_reads_in_flight.load(Ordering::SeqCst) >= 2,
        "listing chunks read one at a time"
    );
    f.storage.read_delay_ms.store(0, Ordering::SeqCst);
    let out = f.path("out");
    repo.restore(&restore_opts(&src, &out), &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    assert_eq!(describe_tree(&src), describe_tree(&out.join("many")));
}

/// Records the transfer estimates a job announces.
#[derive(Default)]
struct Estimates(std::sync::Mutex<Vec<storinator_shared::TransferEstimate>>);

impl storinator_shared::Progress for Estimates {
    fn estimate(&self, estimate: &storinator_shared::TransferEstimate) {
        self.0.lock().unwrap().push(estimate.clone());
    }
}

/// A backend that announces estimates gets the restore's bytes and its packs counted; one
/// that announces none (a local one) is asked nothing, and the restore skips the count.
#[tokio::test]
async fn a_restore_counts_its_packs_only_for_a_backend_that_estimates() {
    let f = Fixture::new().await;
    let src = f.path("src/data");
    make_tree(&src);
    let summary = f
        .repo
        .backup(&backup_opts(&src), &NoProgress, &CancelFlag::new())
        .await
        .unwrap();

    f.storage.estimates.store(true, Ordering::SeqCst);
    let seen = Estimates::default();
    let r = f
        .repo
        .restore(
            &restore_opts(&src, &f.path("out")),
            &seen,
            &CancelFlag::new(),
        )
        .await
        .unwrap();
    let seen = seen.0.into_inner().unwrap();
    assert_eq!(seen.len(), 1, "{seen:?}");
    // The instrumented backend answers with the objects and bytes it was asked about.
    assert_eq!(seen[0].message_calls, summary.packs);
    assert_eq!(seen[0].part_calls, r.bytes);

    f.storage.estimates.store(false, Ordering::SeqCst);
    let seen = Estimates::default();
    f.repo
        .restore(
            &restore_opts(&src, &f.path("out2")),
            &seen,
            &CancelFlag::new(),
        )
        .await
        .unwrap();
    assert!(seen.0.into_inner().unwrap().is_empty());
}
