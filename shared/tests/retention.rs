//! Retention: forget by policy, prune (delete and repack), recover after both, and a backup
//! running while a prune deletes.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use storinator_shared::{
    BackupOptions, CancelFlag, Catalog, ForgetOptions, KeepPolicy, NoProgress, PruneOptions, Repo,
    RestoreOptions, Storage,
};

fn backup_opts(path: &Path) -> BackupOptions {
    BackupOptions {
        path: path.to_path_buf(),
        owner: "local".into(),
        encrypt: true,
    }
}

async fn backup(repo: &Repo, path: &Path) -> String {
    repo.backup(&backup_opts(path), &NoProgress, &CancelFlag::new())
        .await
        .unwrap()
        .snapshot
        .short_id
}

fn keep_last(n: u32) -> KeepPolicy {
    KeepPolicy {
        last: Some(n),
        ..Default::default()
    }
}

fn forget_opts(path: &Path, policy: KeepPolicy) -> ForgetOptions {
    ForgetOptions {
        owner: "local".into(),
        path: path.to_string_lossy().into_owned(),
        policy,
        tz: jiff::tz::TimeZone::UTC,
        dry_run: false,
        allow_empty: false,
        only: None,
    }
}

fn no_repack() -> PruneOptions {
    PruneOptions {
        repack_below: 0.0,
        ..Default::default()
    }
}

/// Writes `n` files of `size` distinct bytes named `<prefix><i>.bin`.
fn write_files(dir: &Path, prefix: &str, n: u64, size: usize, seed: u64) {
    std::fs::create_dir_all(dir).unwrap();
    for i in 0..n {
        std::fs::write(
            dir.join(format!("{prefix}{i:02}.bin")),
            bytes(size, seed * 1000 + i),
        )
        .unwrap();
    }
}

/// Every remaining snapshot restores to exactly the tree it was taken of.
async fn assert_all_restore(
    f: &Fixture,
    src: &Path,
    trees: &BTreeMap<String, BTreeMap<String, String>>,
) {
    let snaps = f.repo.snapshots("local", None).await.unwrap();
    assert!(!snaps.is_empty());
    for s in snaps {
        let to = f.path(&format!("restore-{}", s.short_id));
        f.repo
            .restore(
                &RestoreOptions {
                    path: src.to_string_lossy().into_owned(),
                    to: to.clone(),
                    snapshot: Some(s.short_id.clone()),
                    owner: "local".into(),
                    overwrite: false,
                    within: None,
                    same_owner: None,
                },
                &NoProgress,
                &CancelFlag::new(),
            )
            .await
            .unwrap_or_else(|e| panic!("restore of {}: {e}", s.short_id));
        let name = src.file_name().unwrap();
        assert_eq!(
            &describe_tree(&to.join(name)),
            trees.get(&s.short_id).expect("a tree per snapshot"),
            "snapshot {} restores byte for byte",
            s.short_id
        );
        std::fs::remove_dir_all(&to).unwrap();
    }
}

/// Pack objects in storage.
async fn stored_packs(s: &dyn Storage) -> BTreeSet<String> {
    s.list()
        .await
        .unwrap()
        .into_iter()
        .filter_map(|o| {
            let id = o.name.strip_suffix(".enc")?;
            (id.len() == 32).then(|| id.to_string())
        })
        .collect()
}

async fn catalog_packs(c: &Catalog) -> BTreeSet<String> {
    c.packs().await.unwrap().into_iter().map(|p| p.id).collect()
}

/// Storage and catalog hold the same packs, verify --read-data is clean, and every pack the
/// catalog keeps holds a live chunk.
async fn assert_consistent(f: &Fixture) {
    assert_eq!(
        stored_packs(f.storage.as_ref()).await,
        catalog_packs(&f.repo.catalog).await,
        "storage and catalog agree"
    );
    let v = f.repo.verify(true, &NoProgress).await.unwrap();
    assert!(v.problems.is_empty(), "{:?}", v.problems);
}

/// Three snapshots of a folder whose files change: the first two forgotten, then pruned.
#[tokio::test]
async fn prune_deletes_exactly_the_unreferenced_packs_and_what_is_left_restores() {
    let f = Fixture::new().await;
    let src = f.path("data");
    let mut trees = BTreeMap::new();
    // 1: files that only the first snapshot has, big enough for packs of their own. Which
    // chunks share a pack depends on how the reader threads interleave, so the layout is
    // made certain by counting: no pack passes the pack size, so the old files fill at
    // least `old_packs`; each kept file is one chunk (under the chunker's minimum), so they
    // touch at most 4 of those and the rest hold old data alone.
    let (old_bytes, keep_bytes) = (600_000, 3_000);
    assert!(
        keep_bytes < settings().chunker.min,
        "a kept file is one chunk"
    );
    let old_packs = (3 * old_bytes as u64).div_ceil(settings().pack_size);
    let old_alone = old_packs.saturating_sub(4);
    assert!(old_alone >= 3, "the old files fill {old_packs} packs");
    write_files(&src, "old", 3, old_bytes, 1);
    write_files(&src, "keep", 4, keep_bytes, 2);
    let s1 = backup(&f.repo, &src).await;
    trees.insert(s1.clone(), describe_tree(&src));
    let packs_of_s1 = catalog_packs(&f.repo.catalog).await;
    // 2: the old files go, other ones come (and go again before 3).
    for i in 0..3 {
        std::fs::remove_file(src.join(format!("old{i:02}.bin"))).unwrap();
    }
    write_files(&src, "mid", 2, 300_000, 3);
    let s2 = backup(&f.repo, &src).await;
    trees.insert(s2.clone(), describe_tree(&src));
    for i in 0..2 {
        std::fs::remove_file(src.join(format!("mid{i:02}.bin"))).unwrap();
    }
    write_files(&src, "new", 2, 50_000, 4);
    let s3 = backup(&f.repo, &src).await;
    trees.insert(s3.clone(), describe_tree(&src));

    // Nothing is unused before a forget: a prune deletes nothing.
    let r = f
        .repo
        .prune(&no_repack(), &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    assert_eq!((r.unused_packs, r.deleted_objects), (0, 0), "{r:?}");

    // Keep the last: the first two go (their own files with them).
    let mut opts = forget_opts(&src, keep_last(1));
    opts.dry_run = true;
    let plan = f.repo.forget(&opts, &CancelFlag::new()).await.unwrap();
    let gone: Vec<&str> = plan
        .remove
        .iter()
        .map(|i| i.snapshot.short_id.as_str())
        .collect();
    assert_eq!(gone, vec![s1.as_str(), s2.as_str()]);
    assert_eq!(plan.keep[0].reasons, vec!["last"]);
    assert_eq!(
        f.repo.snapshots("local", None).await.unwrap().len(),
        3,
        "a dry run forgets nothing"
    );
    opts.dry_run = false;
    let done = f.repo.forget(&opts, &CancelFlag::new()).await.unwrap();
    assert!(done.tombstone.is_some());
    trees.remove(&s1);
    trees.remove(&s2);
    let left: Vec<String> = f
        .repo
        .snapshots("local", None)
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.short_id)
        .collect();
    assert_eq!(left, vec![s3.clone()]);

    // `stats` says what a prune would free, without the key.
    let usage = storinator_shared::engine::prune::usage(
        &f.repo.catalog,
        Some("local"),
        settings().pack_size,
    )
    .await
    .unwrap();
    let default_dry = f
        .repo
        .prune(
            &PruneOptions {
                dry_run: true,
                ..Default::default()
            },
            &NoProgress,
            &CancelFlag::new(),
        )
        .await
        .unwrap();
    assert_eq!(usage.prune_would_free, default_dry.freed());
    assert_eq!(usage.unused_packs, default_dry.unused_packs);
    assert_eq!(usage.roots.len(), 1);
    assert_eq!(usage.roots[0].snapshots, 1);
    assert_eq!(usage.listings_unknown, 0);
    assert!(
        usage.prune_would_free > 0 && usage.dedup_ratio > 0.0,
        "{usage:?}"
    );

    // A dry run says what would go and changes nothing.
    let dry = f
        .repo
        .prune(
            &PruneOptions {
                dry_run: true,
                ..no_repack()
            },
            &NoProgress,
            &CancelFlag::new(),
        )
        .await
        .unwrap();
    assert!(
        dry.unused_packs >= 3,
        "the old and mid files' packs: {dry:?}"
    );
    let before = stored_packs(f.storage.as_ref()).await;
    assert_eq!(before, catalog_packs(&f.repo.catalog).await);

    let r = f
        .repo
        .prune(&no_repack(), &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    assert_eq!(r.unused_packs, dry.unused_packs);
    assert_eq!(r.deleted_objects, r.unused_packs);
    let after = stored_packs(f.storage.as_ref()).await;
    let deleted: BTreeSet<String> = before.difference(&after).cloned().collect();
    assert_eq!(deleted, r.deleted.iter().cloned().collect::<BTreeSet<_>>());
    // Exactly the unreferenced ones: each deleted pack held only data of the forgotten
    // snapshots, and each remaining pack holds something the kept snapshot uses.
    let usage = f.repo.catalog.pack_usage(i64::MAX).await.unwrap();
    assert!(usage.iter().all(|p| p.live_chunks > 0), "{usage:?}");
    assert!(
        deleted.iter().filter(|p| packs_of_s1.contains(*p)).count() as u64 >= old_alone,
        "the packs holding old data alone: {deleted:?}"
    );
    assert_consistent(&f).await;
    assert_all_restore(&f, &src, &trees).await;

    // Prune again: nothing left to do.
    let again = f
        .repo
        .prune(&no_repack(), &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    assert_eq!(again.deleted_objects, 0, "{again:?}");

    // Recover from storage alone: the forgotten snapshots stay forgotten.
    let fresh = Catalog::open(&storinator_testkit::db::url_for(&f.path("fresh.db")))
        .await
        .unwrap();
    let (repo, report) =
        storinator_shared::recover(fresh, f.storage.clone(), PASS, settings(), &NoProgress)
            .await
            .unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    let recovered: Vec<String> = repo
        .snapshots("local", None)
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.short_id)
        .collect();
    assert_eq!(recovered, vec![s3]);
}

#[tokio::test]
async fn recover_after_forget_alone_honours_the_tombstone_and_ignores_a_forged_one() {
    let f = Fixture::new().await;
    let src = f.path("data");
    write_files(&src, "a", 2, 10_000, 1);
    let s1 = backup(&f.repo, &src).await;
    write_files(&src, "b", 2, 10_000, 2);
    let s2 = backup(&f.repo, &src).await;
    f.repo
        .forget(&forget_opts(&src, keep_last(1)), &CancelFlag::new())
        .await
        .unwrap();
    // A tombstone anyone could post (not sealed with the key) naming the kept snapshot.
    let forged = format!("forget-{}.enc", "ab".repeat(32));
    f.storage
        .put_bytes(&forged, b"{\"forgotten\":[]}".to_vec())
        .await
        .unwrap();
    // No prune: s1's snapshot object is still in storage.
    let fresh = Catalog::open(&storinator_testkit::db::url_for(&f.path("fresh.db")))
        .await
        .unwrap();
    let (repo, report) =
        storinator_shared::recover(fresh, f.storage.clone(), PASS, settings(), &NoProgress)
            .await
            .unwrap();
    assert_eq!(report.forgotten, 1, "{report:?}");
    assert!(
        report.problems.iter().any(|p| p.contains(&forged)),
        "{:?}",
        report.problems
    );
    let ids: Vec<String> = repo
        .snapshots("local", None)
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.short_id)
        .collect();
    assert_eq!(ids, vec![s2]);
    assert_ne!(ids[0], s1);
}

#[tokio::test]
async fn forget_never_empties_a_root_unless_asked() {
    let f = Fixture::new().await;
    let src = f.path("data");
    write_files(&src, "a", 1, 1000, 1);
    backup(&f.repo, &src).await;
    // A policy that keeps nothing (within 0 of the newest keeps nothing, as in restic).
    let policy = KeepPolicy {
        within_ms: Some(0),
        ..Default::default()
    };
    let e = f
        .repo
        .forget(&forget_opts(&src, policy.clone()), &CancelFlag::new())
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("--allow-empty"), "{e}");
    let e = f
        .repo
        .forget(
            &forget_opts(&src, KeepPolicy::default()),
            &CancelFlag::new(),
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("no keep rule given"), "{e}");
    let e = f
        .repo
        .forget(
            &forget_opts(&f.path("elsewhere"), keep_last(1)),
            &CancelFlag::new(),
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("elsewhere"), "{e}");
    assert_eq!(f.repo.snapshots("local", None).await.unwrap().len(), 1);
    let mut opts = forget_opts(&src, policy);
    opts.allow_empty = true;
    let r = f.repo.forget(&opts, &CancelFlag::new()).await.unwrap();
    assert_eq!(r.remove.len(), 1);
    assert!(f.repo.snapshots("local", None).await.unwrap().is_empty());
    // Everything is unused now; the next backup of the root starts afresh and restores.
    let p = f
        .repo
        .prune(&no_repack(), &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    assert!(p.deleted_objects >= 1);
    assert!(stored_packs(f.storage.as_ref()).await.is_empty());
    let s = backup(&f.repo, &src).await;
    let mut trees = BTreeMap::new();
    trees.insert(s, describe_tree(&src));
    assert_consistent(&f).await;
    assert_all_restore(&f, &src, &trees).await;
}

/// Many small files share packs; most go. Repack rewrites the sparse packs' live blobs.
#[tokio::test]
async fn repack_rewrites_sparse_packs_within_the_budget() {
    let f = Fixture::new().await;
    let src = f.path("data");
    write_files(&src, "f", 40, 20_000, 7);
    let s1 = backup(&f.repo, &src).await;
    let _ = s1;
    // Keep one file in four.
    for i in 0..40 {
        if i % 4 != 0 {
            std::fs::remove_file(src.join(format!("f{i:02}.bin"))).unwrap();
        }
    }
    let s2 = backup(&f.repo, &src).await;
    let mut trees = BTreeMap::new();
    trees.insert(s2.clone(), describe_tree(&src));
    f.repo
        .forget(&forget_opts(&src, keep_last(1)), &CancelFlag::new())
        .await
        .unwrap();
    let usage = f.repo.catalog.pack_usage(i64::MAX).await.unwrap();
    let sparse = usage
        .iter()
        .filter(|p| p.live_chunks > 0 && p.live_bytes * 2 < p.size)
        .count();
    assert!(sparse >= 2, "{usage:?}");
    let stored_before: u64 = usage.iter().map(|p| p.size).sum();

    // A budget of one small pack's live bytes moves at most that.
    let budget = usage
        .iter()
        .filter(|p| p.live_chunks > 0 && p.live_bytes * 2 < p.size)
        .map(|p| p.live_bytes)
        .min()
        .unwrap();
    let reads = f.storage.reads.load(Ordering::SeqCst);
    let r = f
        .repo
        .prune(
            &PruneOptions {
                max_repack: Some(budget),
                ..Default::default()
            },
            &NoProgress,
            &CancelFlag::new(),
        )
        .await
        .unwrap();
    assert!(r.repacked_bytes <= budget, "{r:?}");
    assert_eq!(r.repacked_packs, 1, "{r:?}");
    // The pack's live blobs came in one range read, not one read (a round trip) each.
    assert_eq!(f.storage.reads.load(Ordering::SeqCst) - reads, 1, "{r:?}");
    assert!(r.sparse_left >= 1, "{r:?}");
    assert_consistent(&f).await;
    assert_all_restore(&f, &src, &trees).await;

    // No budget: every sparse pack is rewritten.
    let r = f
        .repo
        .prune(&PruneOptions::default(), &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    assert!(r.repacked_packs >= 1 && r.new_packs >= 1, "{r:?}");
    assert_eq!(r.sparse_left, 0, "{r:?}");
    let usage = f.repo.catalog.pack_usage(i64::MAX).await.unwrap();
    let stored_after: u64 = usage.iter().map(|p| p.size).sum();
    assert!(
        stored_after * 2 < stored_before,
        "{stored_before} -> {stored_after}"
    );
    assert!(
        usage
            .iter()
            .all(|p| p.live_bytes * 2 >= p.size || p.live_chunks == 0),
        "{usage:?}"
    );
    assert_consistent(&f).await;
    assert_all_restore(&f, &src, &trees).await;
    // And recover reads the new packs.
    let fresh = Catalog::open(&storinator_testkit::db::url_for(&f.path("fresh.db")))
        .await
        .unwrap();
    let (repo, report) =
        storinator_shared::recover(fresh, f.storage.clone(), PASS, settings(), &NoProgress)
            .await
            .unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(repo.snapshots("local", None).await.unwrap().len(), 1);
}

/// A backup that deduplicates against data a prune is deleting at that very moment: the
/// prune condemns the packs after the backup loaded its index, the backup's commit is
/// refused, and it stores the data again; every snapshot restores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_running_while_prune_deletes_its_reused_data_stores_it_again() {
    let f = Fixture::new().await;
    let src = f.path("data");
    write_files(&src, "x", 3, 100_000, 1);
    let v1 = describe_tree(&src);
    let _s1 = backup(&f.repo, &src).await;
    // x changes; the old x is forgotten: its chunks are unreferenced now.
    write_files(&src, "x", 3, 100_000, 2);
    let s2 = backup(&f.repo, &src).await;
    let mut trees = BTreeMap::new();
    trees.insert(s2.clone(), describe_tree(&src));
    f.repo
        .forget(&forget_opts(&src, keep_last(1)), &CancelFlag::new())
        .await
        .unwrap();
    // x goes back to its first content (dedup would reuse the dead chunks) and new files
    // make the backup upload for a while.
    write_files(&src, "x", 3, 100_000, 1);
    write_files(&src, "slow", 6, 100_000, 3);
    let expected = describe_tree(&src);
    assert_ne!(expected, v1);
    f.storage.delay_ms.store(150, Ordering::SeqCst);
    let puts = f.storage.put_count();
    let backup_task = {
        let repo =
            std::sync::Arc::new(Fixture::open_repo(f.dir.path(), f.storage.clone(), false).await);
        let src = src.clone();
        tokio::spawn(async move {
            repo.backup(&backup_opts(&src), &NoProgress, &CancelFlag::new())
                .await
        })
    };
    // Once the backup uploads, its index is loaded: prune now.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while f.storage.put_count() == puts {
        assert!(
            std::time::Instant::now() < deadline,
            "the backup never uploaded"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let r = f
        .repo
        .prune(&no_repack(), &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    assert!(r.deleted_objects >= 1, "the old x packs go: {r:?}");
    f.storage.delay_ms.store(0, Ordering::SeqCst);
    let summary = backup_task.await.unwrap().unwrap();
    trees.insert(summary.snapshot.short_id.clone(), expected);
    assert_consistent(&f).await;
    assert_all_restore(&f, &src, &trees).await;
    // And a later prune finds nothing in use to delete.
    let again = f
        .repo
        .prune(&no_repack(), &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    assert_consistent(&f).await;
    assert_all_restore(&f, &src, &trees).await;
    let _ = again;
}
