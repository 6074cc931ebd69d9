//! The scrub: rotation within a budget, damage naming the right files and snapshots, self-heal
//! from intact files on disk (and only from those), and the heal's write order under failure.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;

use common::*;
use sqlx::Row;
use storinator_shared::catalog::CHUNK_LISTS;
use storinator_shared::ops::alerts::{AlertPolicy, Alerts};
use storinator_shared::{
    BackupOptions, CancelFlag, Error, Jobs, NoProgress, Repo, RestoreOptions, Schedules,
    ScrubOptions, ScrubReport, Storage,
};

const DAY: i64 = 86_400_000;
const T0: i64 = 1_780_000_000_000;

/// A folder of incompressible files, two with the same content.
fn make_files(root: &std::path::Path) {
    std::fs::create_dir_all(root.join("photos")).unwrap();
    for i in 0..8u64 {
        std::fs::write(
            root.join(format!("photos/p{i}.bin")),
            bytes(90_000 + 7_000 * i as usize, 10 + i),
        )
        .unwrap();
    }
    std::fs::write(root.join("photos/twin-a.bin"), bytes(120_000, 99)).unwrap();
    std::fs::write(root.join("photos/twin-b.bin"), bytes(120_000, 99)).unwrap();
    std::fs::write(root.join("notes.txt"), b"remember the milk\n").unwrap();
}

async fn backup(f: &Fixture, src: &std::path::Path) -> String {
    f.repo
        .backup(
            &BackupOptions {
                path: src.to_path_buf(),
                owner: "local".into(),
                encrypt: true,
            },
            &NoProgress,
            &CancelFlag::new(),
        )
        .await
        .unwrap()
        .snapshot
        .short_id
}

async fn restore(f: &Fixture, src: &std::path::Path, to: &str) -> Result<(), Error> {
    f.repo
        .restore(
            &RestoreOptions {
                path: src.to_string_lossy().into_owned(),
                to: f.path(to),
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
        .map(|_| ())
}

async fn scrub(repo: &Repo, budget: u64, now: i64, heal: bool) -> Result<ScrubReport, Error> {
    repo.scrub(
        &ScrubOptions {
            budget,
            now_ms: now,
            heal,
        },
        &NoProgress,
        &CancelFlag::new(),
    )
    .await
}

/// Where the first chunk of a stored file lives: (chunk id, pack, offset, length).
async fn first_chunk_of(f: &Fixture, path: &str) -> (Vec<u8>, String, i64, i64) {
    let r = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT c.id, p.id, c.\"offset\", c.length FROM entries e
           JOIN {CHUNK_LISTS} cc ON cc.content_id = e.content_id
           JOIN chunks c ON c.no = cc.chunk_no JOIN packs p ON p.no = c.pack_no
          WHERE e.path = $1 ORDER BY cc.seq LIMIT 1"
    )))
    .bind(path)
    .fetch_one(f.repo.catalog.pool())
    .await
    .unwrap();
    (r.get(0), r.get(1), r.get(2), r.get(3))
}

/// Stored paths of the files whose content uses a chunk in `pack` (the files that pack's
/// damage affects), from the catalog.
async fn files_in_pack(f: &Fixture, pack: &str) -> BTreeSet<String> {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT DISTINCT e.path FROM entries e JOIN {CHUNK_LISTS} cc ON cc.content_id = e.content_id
           JOIN chunks c ON c.no = cc.chunk_no JOIN packs p ON p.no = c.pack_no WHERE p.id = $1"
    )))
    .bind(pack)
    .fetch_all(f.repo.catalog.pool())
    .await
    .unwrap()
    .into_iter()
    .collect()
}

fn affected_paths(r: &ScrubReport) -> BTreeSet<String> {
    r.affected.iter().map(|a| a.path.clone()).collect()
}

#[tokio::test]
async fn rotation_reads_every_pack_within_the_stated_cycle_and_keeps_the_budget() {
    let f = Fixture::new().await;
    let src = f.path("src/data");
    make_files(&src);
    backup(&f, &src).await;
    let packs = f.repo.catalog.packs().await.unwrap();
    assert!(packs.len() >= 4, "{} packs", packs.len());
    let total: u64 = packs.iter().map(|p| p.size).sum();
    let budget = total / 3 + 1;
    let biggest_blob: u64 = sqlx::query_scalar::<_, i64>("SELECT max(length) FROM chunks")
        .fetch_one(f.repo.catalog.pool())
        .await
        .unwrap() as u64;

    let first = scrub(&f.repo, budget, T0, true).await.unwrap();
    assert_eq!(first.cycle_days, 3, "ceil(total / budget)");
    assert!(
        first.never_read > 0,
        "a third of the store can't cover it all"
    );
    assert_eq!(
        first.packs_present,
        packs.len() as u64,
        "presence of every pack"
    );
    let mut reads = vec![first];
    for day in 1..3 {
        reads.push(scrub(&f.repo, budget, T0 + day * DAY, true).await.unwrap());
    }
    for r in &reads {
        assert!(
            r.bytes_read <= budget + biggest_blob,
            "read {} with a budget of {budget}",
            r.bytes_read
        );
        assert!(r.findings.is_empty() && r.is_clean(), "{r:?}");
    }
    // Within the cycle every pack was read whole.
    let after = reads.last().unwrap();
    assert_eq!(after.never_read, 0, "{after:?}");
    let queue = f.repo.catalog.scrub_queue().await.unwrap();
    assert!(queue.iter().all(|p| p.last_read_at.is_some()));
    let chunks: i64 = sqlx::query_scalar("SELECT count(*) FROM chunks")
        .fetch_one(f.repo.catalog.pool())
        .await
        .unwrap();
    let checked: u64 = reads.iter().map(|r| r.chunks_checked).sum();
    assert!(
        checked >= chunks as u64,
        "every chunk authenticated once per cycle"
    );
    // The next cycle starts with the pack read longest ago.
    let oldest = queue
        .iter()
        .min_by_key(|p| p.last_read_at)
        .unwrap()
        .id
        .clone();
    assert_eq!(queue[0].id, oldest);
    // The status lines name every pack with its date.
    let status = storinator_shared::ops::alerts::ScrubStatus::load(&f.repo.catalog, budget)
        .await
        .unwrap();
    let lines = status.lines(&jiff::tz::TimeZone::UTC, usize::MAX);
    assert!(lines[0].contains("within 3 days"), "{lines:?}");
    assert_eq!(
        lines.iter().filter(|l| l.contains("last read")).count(),
        packs.len()
    );
}

#[tokio::test]
async fn a_corrupted_pack_names_the_right_files_and_the_heal_makes_restore_whole() {
    let f = Fixture::new().await;
    let src = f.path("src/data");
    make_files(&src);
    let snap = backup(&f, &src).await;
    // A second snapshot of the same files: the damage affects both.
    std::fs::write(src.join("later.txt"), b"added later").unwrap();
    let snap2 = backup(&f, &src).await;

    let (_, pack, offset, length) = first_chunk_of(&f, "data/photos/twin-a.bin").await;
    assert!(
        f.storage
            .inner
            .corrupt(&format!("{pack}.enc"), (offset + length / 2) as usize)
    );
    let expected = files_in_pack(&f, &pack).await;
    assert!(
        expected.contains("data/photos/twin-a.bin") && expected.contains("data/photos/twin-b.bin")
    );
    assert!(matches!(
        restore(&f, &src, "before").await,
        Err(Error::RestoreFailed { .. })
    ));

    // Found, named, not yet healed.
    let r = scrub(&f.repo, u64::MAX / 2, T0, false).await.unwrap();
    assert_eq!(r.findings.len(), 1, "{:?}", r.findings);
    assert!(
        r.findings[0].reason.contains(&pack),
        "{}",
        r.findings[0].reason
    );
    assert_eq!(r.unhealed_chunks, 1);
    // Exactly the files using the damaged chunk: the two twins.
    assert_eq!(
        affected_paths(&r),
        BTreeSet::from([
            "data/photos/twin-a.bin".to_string(),
            "data/photos/twin-b.bin".to_string()
        ])
    );
    for a in &r.affected {
        assert!(!a.healed);
        assert_eq!(a.snapshots, vec![snap.clone(), snap2.clone()], "{a:?}");
        assert_eq!(
            a.disk_path(),
            src.join(&a.path["data/".len()..]).display().to_string()
        );
    }
    // The owner hears about it.
    let alerts = Alerts::new(
        Schedules::new(
            Jobs::new(f.repo.catalog.pool().clone()),
            jiff::tz::TimeZone::UTC,
        ),
        AlertPolicy::default(),
    );
    let runs = alerts.scrub_alerts().await.unwrap();
    let told: Vec<_> = runs.iter().flat_map(|(_, a)| a).collect();
    assert_eq!(told.len(), 1);
    assert_eq!(told[0].owner.as_deref(), Some("local"));
    assert_eq!(told[0].files.len(), 2);

    // The heal stores the chunk again from a file on disk; the restore is whole again.
    let packs_before = f.repo.catalog.packs().await.unwrap().len();
    let r = scrub(&f.repo, 1, T0 + DAY, true).await.unwrap();
    assert_eq!(
        (r.healed_chunks, r.unhealed_chunks, r.heal_packs),
        (1, 0, 1),
        "{r:?}"
    );
    assert!(r.affected.iter().all(|a| a.healed), "{:?}", r.affected);
    assert_eq!(
        f.repo.catalog.packs().await.unwrap().len(),
        packs_before + 1
    );
    restore(&f, &src, "after").await.unwrap();
    let restored = describe_tree(&f.path("after/data"));
    let mut original = describe_tree(&src);
    original.retain(|k, _| restored.contains_key(k));
    assert_eq!(restored, original);
    assert_eq!(
        std::fs::read(f.path("after/data/photos/twin-a.bin")).unwrap(),
        bytes(120_000, 99)
    );
    // Nothing left to heal; the next scrub is clean.
    assert!(f.repo.catalog.unhealed_damage().await.unwrap().is_empty());
    let r = scrub(&f.repo, u64::MAX / 2, T0 + 2 * DAY, true)
        .await
        .unwrap();
    assert!(r.findings.is_empty() && r.is_clean(), "{r:?}");
}

#[tokio::test]
async fn a_file_changed_on_disk_is_not_used_to_heal() {
    let f = Fixture::new().await;
    let src = f.path("src/data");
    make_files(&src);
    backup(&f, &src).await;
    let (_, pack, offset, length) = first_chunk_of(&f, "data/photos/p3.bin").await;
    f.storage
        .inner
        .corrupt(&format!("{pack}.enc"), (offset + length / 2) as usize);
    // Same size, one byte different: the last one, so the chunk the heal needs (the first)
    // is still intact on disk; only the whole file's SHA-256 tells the file changed.
    let mut changed = bytes(90_000 + 7_000 * 3, 13);
    *changed.last_mut().unwrap() ^= 0xff;
    std::fs::write(src.join("photos/p3.bin"), &changed).unwrap();

    let r = scrub(&f.repo, u64::MAX / 2, T0, true).await.unwrap();
    assert_eq!((r.healed_chunks, r.unhealed_chunks), (0, 1), "{r:?}");
    let a = r
        .affected
        .iter()
        .find(|a| a.path == "data/photos/p3.bin")
        .unwrap();
    assert!(!a.healed);
    assert!(
        a.why
            .as_deref()
            .unwrap()
            .contains("changed on disk since the backup"),
        "{a:?}"
    );
    assert!(
        !f.repo.catalog.unhealed_damage().await.unwrap().is_empty(),
        "still listed"
    );
    match restore(&f, &src, "out").await {
        Err(Error::RestoreFailed { failures }) => {
            assert!(
                failures.iter().any(|(p, _)| p.contains("p3.bin")),
                "{failures:?}"
            )
        }
        other => panic!("the damaged file must not restore as good: {other:?}"),
    }
    // The next full scrub meets the same damage: nothing new to tell, still listed.
    let again = scrub(&f.repo, u64::MAX / 2, T0 + DAY / 2, true)
        .await
        .unwrap();
    assert!(again.findings.is_empty(), "{:?}", again.findings);
    assert_eq!(again.unhealed_chunks, 1);
    assert!(
        again
            .affected
            .iter()
            .any(|a| a.path == "data/photos/p3.bin" && !a.healed)
    );
    let alerts = Alerts::new(
        Schedules::new(
            Jobs::new(f.repo.catalog.pool().clone()),
            jiff::tz::TimeZone::UTC,
        ),
        AlertPolicy::default(),
    );
    let runs = alerts.scrub_alerts().await.unwrap();
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[0].1.len(), 1, "the first finding is told");
    assert!(runs[1].1.is_empty(), "the same damage is not told again");
    // Putting the original back lets the next scrub heal it.
    std::fs::write(src.join("photos/p3.bin"), bytes(90_000 + 7_000 * 3, 13)).unwrap();
    let r = scrub(&f.repo, 1, T0 + DAY, true).await.unwrap();
    assert_eq!((r.healed_chunks, r.unhealed_chunks), (1, 0), "{r:?}");
    restore(&f, &src, "out2").await.unwrap();
}

#[tokio::test]
async fn a_missing_pack_is_found_by_the_presence_check_and_healed() {
    let f = Fixture::new().await;
    let src = f.path("src/data");
    make_files(&src);
    backup(&f, &src).await;
    let (_, pack, _, _) = first_chunk_of(&f, "data/photos/p5.bin").await;
    let lost = files_in_pack(&f, &pack).await;
    f.storage
        .inner
        .remove(&storinator_shared::ObjectRef::new(
            format!("{pack}.enc"),
            "",
        ))
        .await
        .unwrap();
    // A budget too small to read that pack: the presence check alone finds it.
    let r = scrub(&f.repo, 1, T0, true).await.unwrap();
    assert_eq!(r.findings.len(), 1);
    assert!(
        r.findings[0].reason.contains("missing from storage"),
        "{:?}",
        r.findings
    );
    assert_eq!(affected_paths(&r), lost);
    assert!(r.affected.iter().all(|a| a.healed), "{:?}", r.affected);
    restore(&f, &src, "out").await.unwrap();
    assert_eq!(
        std::fs::read(f.path("out/data/photos/p5.bin")).unwrap(),
        bytes(90_000 + 7_000 * 5, 15)
    );
}

#[tokio::test]
async fn a_heal_whose_upload_fails_or_dies_leaves_the_catalog_pointing_at_what_exists() {
    let f = Fixture::new().await;
    let src = f.path("src/data");
    make_files(&src);
    backup(&f, &src).await;
    let (chunk, pack, offset, length) = first_chunk_of(&f, "data/photos/p1.bin").await;
    f.storage
        .inner
        .corrupt(&format!("{pack}.enc"), (offset + length / 2) as usize);
    let home = |f: &Fixture, chunk: Vec<u8>| {
        let pool = f.repo.catalog.pool().clone();
        async move {
            sqlx::query_scalar::<_, String>(
                "SELECT p.id FROM chunks c JOIN packs p ON p.no = c.pack_no WHERE c.id = $1",
            )
            .bind(chunk)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    let stored_packs = |f: &Fixture| {
        let pool = f.repo.catalog.pool().clone();
        async move {
            sqlx::query_scalar::<_, String>("SELECT id FROM packs WHERE state = 'stored'")
                .fetch_all(&pool)
                .await
                .unwrap()
                .into_iter()
                .collect::<BTreeSet<_>>()
        }
    };
    let before = stored_packs(&f).await;

    // The upload of the healed pack fails: the scrub fails, the chunk stays where it was.
    f.storage
        .fail_puts_after
        .store(f.storage.put_count(), Ordering::SeqCst);
    assert!(scrub(&f.repo, u64::MAX / 2, T0, true).await.is_err());
    assert_eq!(home(&f, chunk.clone()).await, pack);
    assert_eq!(stored_packs(&f).await, before);
    assert_eq!(f.repo.catalog.unhealed_damage().await.unwrap().len(), 1);

    // The worker dies in the middle of the heal's upload (the task is dropped).
    f.storage
        .fail_puts_after
        .store(usize::MAX, Ordering::SeqCst);
    f.storage.delay_ms.store(300, Ordering::SeqCst);
    let repo = Fixture::open_repo(f.dir.path(), f.storage.clone(), false).await;
    let task = tokio::spawn(async move { scrub(&repo, 1, T0 + DAY, true).await });
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    task.abort();
    let _ = task.await;
    // Past the time the upload would have taken: nothing of the dead run lands later.
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    assert_eq!(
        home(&f, chunk.clone()).await,
        pack,
        "never repointed before storage has it"
    );
    assert_eq!(stored_packs(&f).await, before);

    // The next scrub heals it.
    f.storage.delay_ms.store(0, Ordering::SeqCst);
    let r = scrub(&f.repo, 1, T0 + 2 * DAY, true).await.unwrap();
    assert_eq!(r.healed_chunks, 1, "{r:?}");
    let new_home = home(&f, chunk).await;
    assert_ne!(new_home, pack);
    let listed: BTreeMap<String, usize> = f.storage.inner.snapshot().into_iter().collect();
    assert!(
        listed.contains_key(&format!("{new_home}.enc")),
        "the new home is stored"
    );
    restore(&f, &src, "out").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_running_alongside_a_heal_keeps_every_restore_whole() {
    let f = Fixture::new().await;
    let src = f.path("src/data");
    make_files(&src);
    backup(&f, &src).await;
    let (_, pack, offset, length) = first_chunk_of(&f, "data/photos/p2.bin").await;
    f.storage
        .inner
        .corrupt(&format!("{pack}.enc"), (offset + length / 2) as usize);
    scrub(&f.repo, u64::MAX / 2, T0, false).await.unwrap();
    // A new file with the damaged data: the backup must store the chunk again, not trust
    // the damaged copy; the heal does the same at the same time.
    std::fs::copy(src.join("photos/p2.bin"), src.join("photos/p2-again.bin")).unwrap();
    let repo2 = Fixture::open_repo(f.dir.path(), f.storage.clone(), false).await;
    let src2 = src.clone();
    let b = tokio::spawn(async move {
        repo2
            .backup(
                &BackupOptions {
                    path: src2,
                    owner: "local".into(),
                    encrypt: true,
                },
                &NoProgress,
                &CancelFlag::new(),
            )
            .await
            .unwrap()
    });
    let r = scrub(&f.repo, 1, T0 + DAY, true).await.unwrap();
    b.await.unwrap();
    assert_eq!(r.unhealed_chunks, 0, "{r:?}");
    assert!(f.repo.catalog.unhealed_damage().await.unwrap().is_empty());
    restore(&f, &src, "out").await.unwrap();
    assert_eq!(
        std::fs::read(f.path("out/data/photos/p2-again.bin")).unwrap(),
        bytes(90_000 + 7_000 * 2, 12)
    );
}
