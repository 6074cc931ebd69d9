//! Backups and restores in batches (issue 18, constant memory): the walk goes in the
//! catalog's path order, the previous snapshot is read range by range, the commit and the
//! restore plan go batch by batch. With batches of three items every boundary case is met:
//! names that sort differently bytewise than by folder (`a`, `a-b`, `a.txt`, `a/x`, `a0`),
//! upper case before lower case, non-ASCII after `z`, deep folders, files added, removed and
//! renamed between snapshots.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::*;
use storinator_shared::{BackupOptions, CancelFlag, Catalog, NoProgress, RestoreOptions};

fn backup_opts(path: &Path) -> BackupOptions {
    BackupOptions {
        path: path.to_path_buf(),
        owner: "local".into(),
        encrypt: true,
    }
}

fn restore_opts(path: &Path, to: &Path, snapshot: Option<&str>) -> RestoreOptions {
    RestoreOptions {
        path: path.to_string_lossy().into_owned(),
        to: to.to_path_buf(),
        snapshot: snapshot.map(str::to_string),
        owner: "local".into(),
        overwrite: false,
        within: None,
        same_owner: None,
    }
}

fn write(root: &Path, rel: &str, data: &[u8]) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, data).unwrap();
}

const DEEP: &str = "a/x/d1/d2/d3/d4/d5/d6/d7/d8/d9/d10/d11/d12";

/// The first tree: every name a trap for an order that is not bytewise.
fn first_tree(src: &Path) {
    for (rel, data) in [
        ("a-b", &b"dash"[..]),
        ("a.txt", b"dot"),
        ("a/y", b"in a"),
        ("a/x/f", b"in x"),
        ("a0", b"zero"),
        ("a+", b"plus"),
        (" space", b"leading space"),
        ("B", b"upper"),
        ("b", b"lower"),
        ("\u{e9}", b"e acute"),
        ("z/\u{df}", b"sharp s"),
        ("z/y", b"y"),
    ] {
        write(src, rel, data);
    }
    write(src, &format!("{DEEP}/leaf"), &bytes(50_000, 1));
    std::os::unix::fs::symlink("a/y", src.join("a-link")).unwrap();
}

/// The second tree: removed, renamed, changed and added files interleaved in path order.
fn second_tree(src: &Path) {
    std::fs::remove_file(src.join("a-b")).unwrap();
    std::fs::rename(src.join("a.txt"), src.join("a/a.txt")).unwrap();
    write(src, "a0", b"zero, longer now");
    write(src, "a/x/new", b"new in x");
    write(src, "a,c", b"comma");
    write(src, &format!("{DEEP}/leaf2"), b"second leaf");
    std::fs::remove_dir_all(src.join("z")).unwrap();
    write(src, "zz/q", b"q");
    write(src, "\u{e9}\u{e9}", b"two e acutes");
}

/// The regular files under `root` and their bytes (symlinks not followed).
fn files_and_bytes(root: &Path) -> (u64, u64) {
    walkdir::WalkDir::new(root)
        .into_iter()
        .map(|e| e.unwrap().metadata().unwrap())
        .filter(|m| m.is_file())
        .fold((0, 0), |(files, bytes), m| (files + 1, bytes + m.len()))
}

fn restored(to: &Path) -> BTreeMap<String, String> {
    describe_tree(&to.join("data"))
}

/// The chunk ids of a snapshot's stored listing, in order: equal ids, equal listings.
async fn listing_of(catalog: &Catalog, short_id: &str) -> Vec<Vec<u8>> {
    sqlx::query_scalar(
        "SELECT l.chunk_id FROM snapshot_listing l JOIN snapshots s ON s.id = l.snapshot_id \
         WHERE s.short_id = $1 ORDER BY l.seq",
    )
    .bind(short_id)
    .fetch_all(catalog.pool())
    .await
    .unwrap()
}

#[tokio::test]
async fn rebackups_across_batch_boundaries_restore_every_snapshot_exactly() {
    let mut f = Fixture::new().await;
    f.repo = f.repo.with_batch(3);
    let src = f.path("src/data");
    first_tree(&src);
    let v1 = describe_tree(&src);
    let opts = backup_opts(&src);
    let cancel = CancelFlag::new();
    let run = || f.repo.backup(&opts, &NoProgress, &cancel);
    let s1 = run().await.unwrap();
    assert!(s1.warnings.is_empty(), "{:?}", s1.warnings);
    // Every batch's files read and listed once: the counts add up across the boundaries.
    let (files, bytes) = files_and_bytes(&src);
    assert_eq!((s1.snapshot.files, s1.snapshot.bytes_read), (files, bytes));
    assert_eq!(s1.snapshot.bytes, bytes);
    let rows1 = f.repo.catalog.entry_row_count().await.unwrap();
    assert_eq!(rows1 as usize, v1.len(), "one row per item");
    // The listing of a tree read entirely and of the same tree unchanged, listed entirely
    // as the scan decides it, is the same (not a line more, less or moved).
    let listing1 = listing_of(&f.repo.catalog, &s1.snapshot.short_id).await;
    let s1b = run().await.unwrap();
    assert_eq!(s1b.snapshot.bytes_read, 0);
    let listing1b = listing_of(&f.repo.catalog, &s1b.snapshot.short_id).await;
    assert!(!listing1.is_empty());
    assert_eq!(listing1b, listing1);

    second_tree(&src);
    let v2 = describe_tree(&src);
    let s2 = run().await.unwrap();
    assert!(s2.warnings.is_empty(), "{:?}", s2.warnings);
    assert_eq!(s2.snapshot.files, 15, "{v2:?}");
    // Rows only for what changed: the unchanged files (and the deep folders that did not
    // change) share their rows with the first snapshot.
    let rows2 = f.repo.catalog.entry_row_count().await.unwrap();
    assert!(
        rows2 < rows1 + v2.len() as i64 / 2 + 8,
        "{rows1} then {rows2}"
    );
    assert!(s2.new_data_chunks > 0);

    // An unchanged re-backup adds no rows and reads nothing.
    let s3 = run().await.unwrap();
    assert_eq!(f.repo.catalog.entry_row_count().await.unwrap(), rows2);
    assert_eq!(s3.snapshot.bytes_read, 0);
    // Its listing (all listed as decided) is the one of the re-backup before, whose first
    // items were listed as decided and the rest after reading.
    assert_eq!(
        listing_of(&f.repo.catalog, &s3.snapshot.short_id).await,
        listing_of(&f.repo.catalog, &s2.snapshot.short_id).await
    );

    for (snapshot, want) in [(&s1, &v1), (&s2, &v2), (&s3, &v2)] {
        let to = f.path(&format!("out-{}", snapshot.snapshot.short_id));
        let opts = restore_opts(&src, &to, Some(&snapshot.snapshot.short_id));
        f.repo
            .restore(&opts, &NoProgress, &CancelFlag::new())
            .await
            .unwrap();
        assert_eq!(&restored(&to), want, "snapshot {}", snapshot.snapshot.seq);
    }

    // A subtree: `data/a` alone, not its byte-order neighbours (`a-b`, `a.txt`, `a0`) that
    // sort inside the range `a` .. `a0` of the catalog's index.
    let to = f.path("out-sub");
    let opts = restore_opts(&src.join("a"), &to, Some(&s1.snapshot.short_id));
    let summary = f
        .repo
        .restore(&opts, &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    let got = describe_tree(&to);
    let want: BTreeMap<String, String> = v1
        .iter()
        .filter(|(k, _)| k.as_str() == "a" || k.starts_with("a/"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let got: BTreeMap<String, String> = got.into_iter().filter(|(k, _)| !k.is_empty()).collect();
    assert_eq!(got, want);
    assert_eq!(summary.files, 3);
    assert_eq!(summary.dirs, 14);
}

/// A re-backup keeps an entry's row only when every recorded field is as before: a change of
/// mode or owner alone (size, time and inode as they were, so the file is not read) is
/// recorded, whether its batch is one the commit keeps without reading its rows or one it
/// compares row by row.
#[tokio::test]
async fn a_rebackup_records_mode_and_owner_changes_that_keep_size_time_and_inode() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let mut f = Fixture::new().await;
    f.repo = f.repo.with_batch(3);
    let src = f.path("src/data");
    first_tree(&src);
    let opts = backup_opts(&src);
    let cancel = CancelFlag::new();
    f.repo.backup(&opts, &NoProgress, &cancel).await.unwrap();
    let rows1 = f.repo.catalog.entry_row_count().await.unwrap();
    let mtime = |rel: &str| {
        std::fs::symlink_metadata(src.join(rel))
            .unwrap()
            .mtime_nsec()
    };
    let before = (mtime("a0"), mtime("a/x"));
    let chmod = |rel: &str, mode| {
        std::fs::set_permissions(src.join(rel), std::fs::Permissions::from_mode(mode)).unwrap()
    };
    chmod("a0", 0o604);
    chmod("a/x", 0o701);
    chmod("z/y", 0o640);
    let as_root = nix::unistd::geteuid().is_root();
    if as_root {
        std::os::unix::fs::lchown(src.join("B"), Some(4321), Some(4322)).unwrap();
    }
    assert_eq!((mtime("a0"), mtime("a/x")), before, "times as they were");
    let s2 = f.repo.backup(&opts, &NoProgress, &cancel).await.unwrap();
    assert_eq!(s2.snapshot.bytes_read, 0, "nothing to read");

    let root = std::fs::canonicalize(&src).unwrap();
    let root_id = f.root_id(root.to_str().unwrap()).await;
    let entries = f
        .repo
        .catalog
        .entries_under(root_id, s2.snapshot.seq, "data")
        .await
        .unwrap();
    let entry = |p: &str| entries.iter().find(|e| e.path == p).unwrap();
    assert_eq!(entry("data/a0").mode, 0o604);
    assert_eq!(entry("data/a/x").mode, 0o701);
    assert_eq!(entry("data/z/y").mode, 0o640);
    let changed = if as_root {
        assert_eq!(entry("data/B").owner.uid, Some(4321));
        assert_eq!(entry("data/B").owner.gid, Some(4322));
        4
    } else {
        3
    };
    // A row for each changed entry, none for the others.
    let rows2 = f.repo.catalog.entry_row_count().await.unwrap();
    assert_eq!(rows2, rows1 + changed);
    let to = f.path("out");
    let o = restore_opts(&src, &to, Some(&s2.snapshot.short_id));
    f.repo.restore(&o, &NoProgress, &cancel).await.unwrap();
    assert_eq!(restored(&to), describe_tree(&src));
}

/// What a re-backup compares its walk with (the previous snapshot's current rows and chunk
/// lists, read a path range at a time in one statement each) is every field of every row, as
/// a restore reads them row by row: names and targets that need escaping, a file of several
/// chunks, an empty one, folders and links; and ranges that meet cover each path once.
#[tokio::test]
async fn the_previous_snapshot_reads_back_every_field_of_every_entry() {
    use std::os::unix::fs::PermissionsExt;
    let f = Fixture::new().await;
    let src = f.path("src/data");
    first_tree(&src);
    for (rel, data) in [
        ("q\"uote", &b"quote"[..]),
        ("back\\slash", b"backslash"),
        ("new\nline\ttab\u{1}", b"controls"),
        ("\u{1f600}/empty", b""),
    ] {
        write(&src, rel, data);
    }
    write(&src, "several", &bytes(200_000, 7));
    std::os::unix::fs::symlink("../\"odd\"\\target\n", src.join("odd-link")).unwrap();
    std::fs::set_permissions(src.join("a/x"), std::fs::Permissions::from_mode(0o700)).unwrap();
    let s = f
        .repo
        .backup(&backup_opts(&src), &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    assert!(s.warnings.is_empty(), "{:?}", s.warnings);
    let root = std::fs::canonicalize(&src).unwrap();
    let catalog = &f.repo.catalog;
    let root_id = f.root_id(root.to_str().unwrap()).await;
    let rows = catalog
        .entries_under(root_id, s.snapshot.seq, "data")
        .await
        .unwrap();
    let contents: Vec<i64> = rows.iter().filter_map(|e| e.content_id).collect();
    let chunks = catalog.content_chunks_of(&contents).await.unwrap();
    let all = catalog
        .previous_files(root_id, None, "\u{10ffff}")
        .await
        .unwrap();
    assert_eq!(all.len(), rows.len());
    for row in &rows {
        let prev = &all[&row.path];
        assert_eq!(&prev.entry, row);
        let want: Vec<_> = row
            .content_id
            .and_then(|c| chunks.get(&c))
            .map(|l| l.iter().map(|c| c.id).collect())
            .unwrap_or_default();
        assert_eq!(prev.chunks, want, "{}", row.path);
    }
    assert!(all["data/several"].chunks.len() > 2, "several chunks");
    assert!(all["data/\u{1f600}/empty"].chunks.is_empty());
    assert_eq!(
        all["data/odd-link"].entry.target.as_deref(),
        Some("../\"odd\"\\target\n")
    );

    // Ranges that meet, as a backup's batches ask for them.
    let mut paths: Vec<&String> = all.keys().collect();
    paths.sort();
    let mut seen = BTreeMap::new();
    let mut after: Option<&str> = None;
    for upto in paths.iter().skip(4).step_by(5).chain(paths.last()) {
        let range = catalog.previous_files(root_id, after, upto).await.unwrap();
        for (path, prev) in range {
            assert!(after.is_none_or(|a| path.as_str() > a) && &path <= *upto);
            assert!(seen.insert(path, prev).is_none(), "one range each");
        }
        after = Some(upto.as_str());
    }
    assert_eq!(seen.len(), all.len());
    assert!(seen.iter().all(|(p, prev)| all[p] == *prev));
}

#[tokio::test]
async fn a_restore_in_pages_checks_everything_before_writing_anything() {
    let mut f = Fixture::new().await;
    f.repo = f.repo.with_batch(2);
    let src = f.path("src/data");
    first_tree(&src);
    f.repo
        .backup(&backup_opts(&src), &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    // A differing file in the last page of the plan (`é` sorts last): the restore must
    // refuse before the first page is written.
    let to = f.path("out");
    write(&to, "data/\u{e9}", b"someone else's");
    let e = f
        .repo
        .restore(
            &restore_opts(&src, &to, None),
            &NoProgress,
            &CancelFlag::new(),
        )
        .await
        .unwrap_err();
    assert!(e.to_string().contains("\u{e9}"), "{e}");
    assert!(
        !to.join("data/a").exists(),
        "nothing written before the check"
    );
    assert!(
        !to.join("data/B").exists(),
        "nothing written before the check"
    );
}

/// A restore's pages come from the database as one JSON document each (the catalog's
/// `json_rows`); they must hold exactly what the row-by-row query reads: every column, NULLs
/// (folders have no content or hash, files no symlink target), hashes, non-ASCII names, and
/// the paging across the prefix's siblings (`data-x` sorts inside `data`'s range).
#[tokio::test]
async fn restore_pages_read_as_json_hold_what_the_rows_hold() {
    let f = Fixture::new().await;
    let src = f.path("src/data");
    first_tree(&src);
    // Names JSON must escape.
    for name in [
        "q\"uote",
        "new\nline",
        "tab\there",
        "back\\slash",
        "bell\u{7}",
    ] {
        write(&src, &format!("a/{name}"), name.as_bytes());
    }
    let s = f
        .repo
        .backup(&backup_opts(&src), &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    let root = std::fs::canonicalize(&src).unwrap();
    let root_id = f.root_id(root.to_str().unwrap()).await;
    let seq = s.snapshot.seq;
    // `data/a` has siblings inside its range (`data/a+`, `data/a-b`, `data/a.txt` sort before
    // `data/a/`): pages skip them.
    for prefix in ["data", "data/a"] {
        let rows = f
            .repo
            .catalog
            .entries_under(root_id, seq, prefix)
            .await
            .unwrap();
        assert!(rows.iter().any(|e| e.sha256.is_none()), "{prefix}");
        assert!(rows.iter().any(|e| e.sha256.is_some()), "{prefix}");
        for limit in [1, 3, 1000] {
            let (mut paged, mut outlines, mut after) = (Vec::new(), Vec::new(), None::<String>);
            loop {
                let catalog = &f.repo.catalog;
                let page = catalog
                    .entries_page(root_id, seq, prefix, after.as_deref(), limit)
                    .await
                    .unwrap();
                let outline = catalog
                    .entry_outlines_page(root_id, seq, prefix, after.as_deref(), limit)
                    .await
                    .unwrap();
                let Some(last) = page.last() else {
                    assert!(outline.is_empty());
                    break;
                };
                after = Some(last.path.clone());
                paged.extend(page);
                outlines.extend(outline);
            }
            assert_eq!(paged, rows, "{prefix} in pages of {limit}");
            let want: Vec<_> = rows
                .iter()
                .map(|e| (e.path.clone(), e.kind, e.size))
                .collect();
            let got: Vec<_> = outlines
                .into_iter()
                .map(|o| (o.path, o.kind, o.size))
                .collect();
            assert_eq!(got, want, "{prefix}: outlines in pages of {limit}");
        }
    }
    let rows = f
        .repo
        .catalog
        .entries_under(root_id, seq, "data")
        .await
        .unwrap();
    assert!(rows.iter().any(|e| e.target.is_some()));
    // The chunk lists, as the rows say.
    let contents: Vec<i64> = rows.iter().filter_map(|e| e.content_id).collect();
    let lists = f.repo.catalog.content_chunks_of(&contents).await.unwrap();
    let leaf = rows.iter().find(|e| e.path.ends_with("/leaf")).unwrap();
    let chunks = &lists[&leaf.content_id.unwrap()];
    assert!(!chunks.is_empty());
    assert_eq!(chunks.iter().map(|c| c.raw_length).sum::<u64>(), leaf.size);
    for e in rows.iter().filter(|e| e.size > 0 && e.content_id.is_some()) {
        let list = &lists[&e.content_id.unwrap()];
        assert_eq!(
            list.iter().map(|c| c.raw_length).sum::<u64>(),
            e.size,
            "{}",
            e.path
        );
    }
    let to = f.path("out");
    let o = restore_opts(&src, &to, None);
    f.repo
        .restore(&o, &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    assert_eq!(restored(&to), describe_tree(&src));
}

/// Into an empty place a restore checks only the paths before writing (nothing there can
/// differ), reading the entries' paths, kinds and sizes: a crafted path in the last page must
/// still refuse the restore before the first page is written.
#[tokio::test]
async fn a_restore_into_an_empty_place_refuses_a_bad_last_path_before_writing_anything() {
    let mut f = Fixture::new().await;
    f.repo = f.repo.with_batch(2);
    let src = f.path("src/data");
    first_tree(&src);
    f.repo
        .backup(&backup_opts(&src), &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    // `data/é` sorts last; so does what it becomes.
    sqlx::query("UPDATE entries SET path = $1 WHERE path = $2")
        .bind("data/\u{e9}/../../escaped")
        .bind("data/\u{e9}")
        .execute(f.repo.catalog.pool())
        .await
        .unwrap();
    let to = f.path("out");
    let e = f
        .repo
        .restore(
            &restore_opts(&src, &to, None),
            &NoProgress,
            &CancelFlag::new(),
        )
        .await
        .unwrap_err();
    assert!(e.to_string().contains("would leave the target"), "{e}");
    assert!(
        !to.join("data").exists(),
        "nothing written before the check"
    );
    assert!(!f.path("escaped").exists());

    // The same snapshot, its path mended, restores whole into the empty place.
    sqlx::query("UPDATE entries SET path = $1 WHERE path = $2")
        .bind("data/\u{e9}")
        .bind("data/\u{e9}/../../escaped")
        .execute(f.repo.catalog.pool())
        .await
        .unwrap();
    let summary = f
        .repo
        .restore(
            &restore_opts(&src, &to, None),
            &NoProgress,
            &CancelFlag::new(),
        )
        .await
        .unwrap();
    assert_eq!(restored(&to), describe_tree(&src));
    assert_eq!(summary.files, 13);
}

/// A catalog made by the migrations before 0013 (the old layout, with the `entries_current`
/// index) takes the new one and keeps working: backups compare against its rows, restores
/// read them.
#[tokio::test]
async fn a_catalog_of_the_old_layout_migrates_and_its_snapshots_still_work() {
    let dir = tempfile::tempdir().unwrap();
    // A snapshot recorded by this version, copied into the old layout.
    let (repo, storage) = recording_repo(dir.path()).await;
    let src = dir.path().join("src/data");
    first_tree(&src);
    let v1 = describe_tree(&src);
    repo.backup(&backup_opts(&src), &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    repo.catalog.pool().close().await;
    // (And 0015, owner keys, 0017, the lean catalog, and 0020 and 0022, chunk lists by number:
    // independent of the entries' layout this test is about, and the layout of the tables
    // this version's rows are copied into.)
    let also = ["0015", "0017", "0020", "0022"];
    let keep = |name: &str| name < "0013" || also.iter().any(|n| name.starts_with(n));
    let current = dir.path().join("current.db");
    let (pool, db) = old_layout_catalog(dir.path(), keep, &current).await;
    let index = |pool: storinator_shared::catalog::Pool| async move {
        sqlx::query_scalar::<_, i64>(
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'index' AND name = 'entries_current'",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    assert_eq!(index(pool.clone()).await, 1, "the old layout");
    pool.close().await;

    // Opened by this version: migrated.
    let catalog = Catalog::open_file(&db).await.unwrap();
    assert_eq!(index(catalog.pool().clone()).await, 0, "migrated");
    let check: String = sqlx::query_scalar("PRAGMA integrity_check")
        .fetch_one(catalog.pool())
        .await
        .unwrap();
    assert_eq!(check, "ok");
    let repo = storinator_shared::Repo::open(catalog, storage, PASS, settings())
        .await
        .unwrap()
        .with_batch(3);
    let rows = repo.catalog.entry_row_count().await.unwrap();
    let again = repo
        .backup(&backup_opts(&src), &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    assert_eq!(
        again.snapshot.bytes_read, 0,
        "unchanged against the old rows"
    );
    assert_eq!(repo.catalog.entry_row_count().await.unwrap(), rows);
    let to = dir.path().join("out");
    repo.restore(
        &restore_opts(&src, &to, None),
        &NoProgress,
        &CancelFlag::new(),
    )
    .await
    .unwrap();
    assert_eq!(restored(&to), v1);
}

/// Every entry row, in key order, as one JSON text: all the columns a row keeps, in the
/// layout before 0021 (a kind word, the owner's four columns) whichever layout the catalog has.
async fn entry_rows(pool: &storinator_shared::catalog::Pool) -> String {
    let lean: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM sqlite_master WHERE name = 'owners'")
        .fetch_one(pool)
        .await
        .unwrap();
    let rows = if lean == 1 {
        "SELECT e.root_id, e.path, CASE e.kind WHEN 0 THEN 'file' WHEN 1 THEN 'dir' \
         ELSE 'symlink' END AS kind, e.size, e.mtime_ns, e.mode, e.inode, e.content_id, \
         e.target, e.from_seq, e.to_seq, o.uid, o.gid, o.user_name, o.group_name \
         FROM entries e LEFT JOIN owners o ON o.no = e.owner_no"
    } else {
        "SELECT * FROM entries"
    };
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT json_group_array(json_array(root_id, path, kind, size, mtime_ns, mode, inode, \
         content_id, target, from_seq, to_seq, uid, gid, user_name, group_name)) \
         FROM ({rows} ORDER BY root_id, path, from_seq)"
    )))
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Two snapshots ([`first_tree`], then [`second_tree`], batches of 3) recorded by this
/// version ([`recording_repo`], closed), for a migration's test to copy into an older layout.
struct Recorded {
    storage: Arc<CountingStorage>,
    src: PathBuf,
    /// Each snapshot's tree, as [`describe_tree`] gives it.
    trees: Vec<BTreeMap<String, String>>,
    shots: Vec<String>,
    /// The recording catalog.
    current: PathBuf,
}

async fn two_snapshots_recorded(dir: &Path) -> Recorded {
    let (repo, storage) = recording_repo(dir).await;
    let repo = repo.with_batch(3);
    let src = dir.join("src/data");
    let opts = backup_opts(&src);
    let (mut trees, mut shots) = (Vec::new(), Vec::new());
    for change in [first_tree, second_tree] {
        change(&src);
        trees.push(describe_tree(&src));
        let s = repo.backup(&opts, &NoProgress, &CancelFlag::new()).await;
        shots.push(s.unwrap().snapshot.short_id);
    }
    repo.catalog.pool().close().await;
    Recorded {
        storage,
        src,
        trees,
        shots,
        current: dir.join("current.db"),
    }
}

/// Migration 0019 stores entries clustered by (root, path, first snapshot) instead of by
/// rowid with an index: a catalog of the layout before it, holding current and closed rows of
/// three snapshots, keeps every row, and each snapshot restores as it was. The next backup
/// closes the rows of what changed by path, and the handle of a path names its entry in every
/// snapshot that has it.
#[tokio::test]
async fn entries_keyed_by_path_keep_every_row_and_snapshot_through_their_migration() {
    let dir = tempfile::tempdir().unwrap();
    let Recorded {
        storage,
        src,
        mut trees,
        mut shots,
        current,
    } = two_snapshots_recorded(dir.path()).await;
    let opts = backup_opts(&src);
    // (And 0020 and 0022, chunk lists by number: the layout this version's rows are copied
    // into, independent of the entries'.)
    let keep = |name: &str| name < "0019" || name.starts_with("0020") || name.starts_with("0022");
    let (pool, db) = old_layout_catalog(dir.path(), keep, &current).await;
    let layout = |pool: storinator_shared::catalog::Pool| async move {
        sqlx::query_scalar::<_, String>(
            "SELECT group_concat(name || ': ' || coalesce(sql, ''), '; ') FROM sqlite_master \
             WHERE tbl_name = 'entries' ORDER BY name",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    let before = layout(pool.clone()).await;
    assert!(before.contains("entries_by_root") && !before.contains("WITHOUT ROWID"));
    let rows = entry_rows(&pool).await;
    assert!(
        rows.contains("\"data/a-b\""),
        "the first snapshot's rows: {rows}"
    );
    pool.close().await;

    // Opened by this version: migrated, every row as it was.
    let catalog = Catalog::open_file(&db).await.unwrap();
    let after = layout(catalog.pool().clone()).await;
    assert!(
        after.contains("WITHOUT ROWID") && !after.contains("entries_by_root"),
        "{after}"
    );
    assert_eq!(entry_rows(catalog.pool()).await, rows);
    let check: String = sqlx::query_scalar("PRAGMA integrity_check")
        .fetch_one(catalog.pool())
        .await
        .unwrap();
    assert_eq!(check, "ok");

    // A third snapshot: a file changed, one gone, one added; their rows close by path.
    let repo = storinator_shared::Repo::open(catalog, storage, PASS, settings())
        .await
        .unwrap()
        .with_batch(3);
    write(&src, "a0", b"zero, changed once more");
    std::fs::remove_file(src.join("b")).unwrap();
    write(&src, "b2", b"new");
    trees.push(describe_tree(&src));
    let third = repo.backup(&opts, &NoProgress, &CancelFlag::new()).await;
    shots.push(third.unwrap().snapshot.short_id);
    let current: Vec<String> = sqlx::query_scalar(
        "SELECT path FROM entries WHERE to_seq IS NULL AND path IN ('data/a0', 'data/b', 'data/b2') \
         ORDER BY path",
    )
    .fetch_all(repo.catalog.pool())
    .await
    .unwrap();
    assert_eq!(current, ["data/a0", "data/b2"]);
    for (short_id, want) in shots.iter().zip(&trees) {
        let to = dir.path().join(format!("out-{short_id}"));
        let opts = restore_opts(&src, &to, Some(short_id));
        repo.restore(&opts, &NoProgress, &CancelFlag::new())
            .await
            .unwrap();
        assert_eq!(&restored(&to), want, "snapshot {short_id}");
    }

    // One handle per path, the same every time; it names the path's entry of each snapshot.
    let (root_id, _) = repo
        .catalog
        .snapshot_by_id("local", &shots[0])
        .await
        .unwrap()
        .unwrap();
    let handles = repo
        .catalog
        .entry_handles(root_id, &["data/a0", "data/b", "data/a0"])
        .await
        .unwrap();
    assert_eq!(handles[0], handles[2]);
    assert_ne!(handles[0], handles[1]);
    let again = repo.catalog.entry_handles(root_id, &["data/b"]).await;
    assert_eq!(again.unwrap(), [handles[1]]);
    let mut sizes = Vec::new();
    for short_id in &shots {
        let (_, snap) = repo
            .catalog
            .snapshot_by_id("local", short_id)
            .await
            .unwrap()
            .unwrap();
        let a0 = repo.catalog.entry_in(root_id, snap.seq, handles[0]).await;
        sizes.push(a0.unwrap().unwrap().size);
        let b = repo.catalog.entry_in(root_id, snap.seq, handles[1]).await;
        assert_eq!(
            b.unwrap().is_some(),
            short_id != &shots[2],
            "b in {short_id}"
        );
        // Another root's handle, or none, names nothing here.
        let elsewhere = repo
            .catalog
            .entry_in(root_id + 1, snap.seq, handles[0])
            .await;
        assert_eq!(elsewhere.unwrap(), None);
    }
    assert_eq!(sizes, [4, 16, 23]);
}

/// Owners the backups here cannot make (they record the test's own user), set on rows of the
/// layout before 0021: names unknown (a uid without a passwd entry), an empty name (which must
/// not become the unknown one), no owner recorded at all (rows from before 0004), on current
/// and closed rows of files, a folder and a symlink.
const OWNERS: [&str; 6] = [
    "UPDATE entries SET uid = 1234, gid = 1234, user_name = NULL, group_name = NULL \
     WHERE path = 'data/a0' AND to_seq IS NULL",
    "UPDATE entries SET uid = 5, gid = 5, user_name = 'five', group_name = 'five' \
     WHERE path = 'data/a0' AND to_seq IS NOT NULL",
    "UPDATE entries SET uid = 1234, gid = 1234, user_name = '', group_name = NULL \
     WHERE path = 'data/a-link'",
    "UPDATE entries SET uid = 1234, gid = 1234, user_name = NULL, group_name = '' \
     WHERE path = 'data/a-b'",
    "UPDATE entries SET uid = NULL, gid = NULL, user_name = NULL, group_name = NULL \
     WHERE path IN ('data/a', 'data/z/y')",
    "UPDATE entries SET uid = 0, gid = 1234, user_name = 'root', group_name = NULL \
     WHERE path = 'data/b'",
];

/// The entries of snapshot `seq` in the layout before 0021, each as its fields' text.
async fn old_entries_of(pool: &storinator_shared::catalog::Pool, seq: i64) -> Vec<String> {
    type Old = (
        String,
        String,
        i64,
        i64,
        i64,
        i64,
        Option<i64>,
        Option<String>,
        Option<String>,
        Option<i64>,
        Option<i64>,
        Option<String>,
        Option<String>,
    );
    let rows: Vec<Old> = sqlx::query_as(
        "SELECT e.path, e.kind, e.size, e.mtime_ns, e.mode, e.inode, e.content_id, \
         nullif(hex(c.sha256), ''), e.target, e.uid, e.gid, e.user_name, e.group_name \
         FROM entries e LEFT JOIN contents c ON c.id = e.content_id \
         WHERE e.from_seq <= $1 AND (e.to_seq IS NULL OR e.to_seq > $1) ORDER BY e.path",
    )
    .bind(seq)
    .fetch_all(pool)
    .await
    .unwrap();
    // (Debug stops at tuples of 12.)
    let text = |r: Old| {
        format!(
            "{:?}",
            (
                (r.0, r.1, r.2, r.3, r.4, r.5),
                (r.6, r.7, r.8, r.9, r.10, r.11, r.12)
            )
        )
    };
    rows.into_iter().map(text).collect()
}

/// An entry as the catalog reads it, as [`old_entries_of`] writes it.
fn entry_fields(e: &storinator_shared::catalog::EntryRow) -> String {
    let fields = (
        (
            e.path.clone(),
            e.kind.as_str().to_string(),
            e.size as i64,
            e.mtime_ns,
            e.mode as i64,
            e.inode as i64,
        ),
        e.content_id,
        e.sha256.map(hex::encode_upper),
        e.target.clone(),
        e.owner.uid.map(i64::from),
        e.owner.gid.map(i64::from),
        e.owner.user.clone(),
        e.owner.group.clone(),
    );
    format!(
        "{:?}",
        (
            fields.0,
            (
                fields.1, fields.2, fields.3, fields.4, fields.5, fields.6, fields.7
            )
        )
    )
}

/// Migration 0021 stores an entry's kind as a number and its owner as a row of `owners`: a
/// catalog of the layout before it, two snapshots of current and closed rows with the owners
/// of [`OWNERS`], reads back every field of every entry of each snapshot as it was (through
/// both of the catalog's read paths), each distinct owner one row. Run again, the migration
/// changes nothing. A backup after it compares against the migrated rows (an unchanged one
/// reads nothing and adds no row) and every snapshot restores as it was.
#[tokio::test]
async fn lean_entries_keep_every_field_and_owner_through_their_migration() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let Recorded {
        storage,
        src,
        mut trees,
        mut shots,
        current,
    } = two_snapshots_recorded(dir.path()).await;
    let opts = backup_opts(&src);
    // (And 0022, chunk lists by number, which came after 0021 was numbered.)
    let keep = |name: &str| name < "0021" || name.starts_with("0022");
    let (pool, db) = old_layout_catalog(dir.path(), keep, &current).await;
    for sql in OWNERS {
        let done = sqlx::query(sql).execute(&pool).await.unwrap();
        assert!(done.rows_affected() > 0, "{sql}");
    }
    let owners: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM (SELECT DISTINCT uid, gid, user_name, group_name FROM entries \
         WHERE uid IS NOT NULL OR gid IS NOT NULL OR user_name IS NOT NULL \
         OR group_name IS NOT NULL)",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(owners >= 6, "{owners} owners");
    let kinds: Vec<String> = sqlx::query_scalar("SELECT DISTINCT kind FROM entries ORDER BY 1")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(kinds, ["dir", "file", "symlink"]);
    let mut want = Vec::new();
    for seq in [1, 2] {
        want.push(old_entries_of(&pool, seq).await);
    }
    let rows = entry_rows(&pool).await;
    pool.close().await;

    // Opened by this version: migrated, every field of every entry as it was.
    let catalog = Catalog::open_file(&db).await.unwrap();
    let count = |sql: &'static str, catalog: Catalog| async move {
        sqlx::query_scalar::<_, i64>(sql)
            .fetch_one(catalog.pool())
            .await
            .unwrap()
    };
    let migrated = |catalog: Catalog| {
        let (want, rows) = (want.clone(), rows.clone());
        let shots = shots.clone();
        async move {
            let (root_id, _) = catalog
                .snapshot_by_id("local", &shots[0])
                .await
                .unwrap()
                .unwrap();
            for (seq, want) in [1, 2].into_iter().zip(&want) {
                let under = catalog.entries_under(root_id, seq, "data").await.unwrap();
                let got: Vec<String> = under.iter().map(entry_fields).collect();
                assert_eq!(&got, want, "snapshot {seq}");
                let page = catalog.entries_page(root_id, seq, "data", None, 1000).await;
                assert_eq!(page.unwrap(), under, "snapshot {seq} read as JSON");
            }
            assert_eq!(entry_rows(catalog.pool()).await, rows);
            let check: String = sqlx::query_scalar("PRAGMA integrity_check")
                .fetch_one(catalog.pool())
                .await
                .unwrap();
            assert_eq!(check, "ok");
            let broken = count(
                "SELECT COUNT(*) FROM pragma_foreign_key_check",
                catalog.clone(),
            );
            assert_eq!(broken.await, 0);
            assert_eq!(count("SELECT COUNT(*) FROM owners", catalog).await, owners);
        }
    };
    migrated(catalog.clone()).await;
    catalog.pool().close().await;

    // Run again, as it would be should its bookkeeping row be lost: nothing changes.
    let opts_db = sqlx::sqlite::SqliteConnectOptions::new().filename(&db);
    let lite = sqlx::SqlitePool::connect_with(opts_db).await.unwrap();
    let forgot = sqlx::query("DELETE FROM _sqlx_migrations WHERE version = 21")
        .execute(&lite)
        .await
        .unwrap();
    assert_eq!(forgot.rows_affected(), 1);
    lite.close().await;
    let catalog = Catalog::open_file(&db).await.unwrap();
    migrated(catalog.clone()).await;

    // The next backup records this tree's owners where they differ from the rows' (the
    // owners set above); the one after it finds everything unchanged.
    let repo = storinator_shared::Repo::open(catalog, storage, PASS, settings())
        .await
        .unwrap()
        .with_batch(3);
    write(&src, "a0", b"zero, changed once more");
    trees.push(describe_tree(&src));
    let third = repo.backup(&opts, &NoProgress, &CancelFlag::new()).await;
    shots.push(third.unwrap().snapshot.short_id);
    let rows = repo.catalog.entry_row_count().await.unwrap();
    let again = repo.backup(&opts, &NoProgress, &CancelFlag::new()).await;
    assert_eq!(again.unwrap().snapshot.bytes_read, 0, "unchanged");
    assert_eq!(repo.catalog.entry_row_count().await.unwrap(), rows);
    let (root_id, _) = repo
        .catalog
        .snapshot_by_id("local", &shots[2])
        .await
        .unwrap()
        .unwrap();
    let link = std::fs::symlink_metadata(src.join("a-link")).unwrap();
    let now = repo
        .catalog
        .entries_under(root_id, 3, "data/a-link")
        .await
        .unwrap();
    let owner = &now[0].owner;
    assert_eq!((owner.uid, owner.gid), (Some(link.uid()), Some(link.gid())));
    for (short_id, want) in shots.iter().zip(&trees) {
        let to = dir.path().join(format!("out-{short_id}"));
        let opts = restore_opts(&src, &to, Some(short_id));
        repo.restore(&opts, &NoProgress, &CancelFlag::new())
            .await
            .unwrap();
        assert_eq!(&restored(&to), want, "snapshot {short_id}");
    }
}

/// The restore's writers (several, one folder at a time each) get every file's blobs in
/// order while range reads run across page boundaries: many folders, pages that end in the
/// middle of a folder, files of several chunks in several packs next to empty files and
/// symlinks. One damaged chunk in the middle fails its file alone; every other file is
/// restored byte for byte (a blob handed to the wrong writer or file would fail its SHA-256).
#[tokio::test]
async fn restore_writers_get_each_files_blobs_across_pages_and_folders() {
    let mut f = Fixture::new().await;
    f.repo = f.repo.with_batch(5);
    let src = f.path("src/data");
    let mut files = 0;
    for d in 0..9u64 {
        // 3 to 6 files a folder: pages end at every place in a folder.
        for i in 0..3 + d % 4 {
            files += 1;
            let size = match (d + i) % 4 {
                0 => 0,
                1 => 900,
                2 => 300_000 + d * 10_000, // several chunks, in several packs
                _ => 40_000,
            };
            write(
                &src,
                &format!("d{d}/f{i}"),
                &bytes(size as usize, d * 10 + i),
            );
        }
        std::os::unix::fs::symlink("f1", src.join(format!("d{d}/link"))).unwrap();
    }
    let want = describe_tree(&src);
    let s = f
        .repo
        .backup(&backup_opts(&src), &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    assert_eq!(s.snapshot.files, files);

    let to = f.path("out");
    let opts = restore_opts(&src, &to, None);
    let done = f
        .repo
        .restore(&opts, &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    assert_eq!((done.files, done.symlinks), (files, 9));
    assert_eq!(restored(&to), want);

    // Damage the second chunk of a multi-chunk file in the middle of the tree.
    let root = f.repo.catalog.roots("local").await.unwrap()[0].0;
    let entries = f.repo.catalog.current_entries(root).await.unwrap();
    let content = entries["data/d4/f2"].content_id.unwrap();
    let lists = f.repo.catalog.content_chunks_of(&[content]).await.unwrap();
    let chunk = &lists[&content][1];
    assert!(f.storage.inner.corrupt(
        &format!("{}.enc", chunk.pack_id),
        chunk.offset as usize + 40
    ));
    let to = f.path("out-damaged");
    let err = f
        .repo
        .restore(
            &restore_opts(&src, &to, None),
            &NoProgress,
            &CancelFlag::new(),
        )
        .await
        .unwrap_err();
    let storinator_shared::Error::RestoreFailed { failures } = &err else {
        panic!("expected RestoreFailed, got {err}")
    };
    assert_eq!(
        failures.iter().map(|(p, _)| p.as_str()).collect::<Vec<_>>(),
        vec!["data/d4/f2"],
        "{failures:?}"
    );
    let mut want = want;
    want.remove("d4/f2");
    assert_eq!(restored(&to), want);
    assert!(temp_files(&to).is_empty());
}

/// A memory store that says how much to read ahead and records the range reads under way
/// at once. Each read waits until that much is requested (or, so that a restore asking for
/// less still ends, a while), so that the reads a restore keeps requested overlap for sure.
/// (The test runs on one thread: what a restore has started is registered before the
/// reads are let go.)
struct ReadAheadProbe {
    inner: storinator_shared::MemoryStorage,
    read_ahead: u64,
    now: std::sync::Mutex<(usize, u64)>,
    /// The most reads and bytes under way at once, and the longest read.
    peak: std::sync::Mutex<(usize, u64, u64)>,
    enough: tokio::sync::Notify,
}

#[async_trait::async_trait]
impl storinator_shared::Storage for ReadAheadProbe {
    fn describe(&self) -> String {
        "read-ahead probe".into()
    }
    fn spool_dir(&self) -> &Path {
        self.inner.spool_dir()
    }
    async fn put_file(
        &self,
        name: &str,
        path: &Path,
    ) -> Result<storinator_shared::Location, storinator_shared::StorageError> {
        self.inner.put_file(name, path).await
    }
    async fn put_bytes(
        &self,
        name: &str,
        data: Vec<u8>,
    ) -> Result<storinator_shared::Location, storinator_shared::StorageError> {
        self.inner.put_bytes(name, data).await
    }
    async fn get_range(
        &self,
        obj: &storinator_shared::storage::ObjectRef,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, storinator_shared::StorageError> {
        let enough = self.enough.notified();
        let reached = {
            let mut now = self.now.lock().unwrap();
            now.0 += 1;
            now.1 += len;
            let mut peak = self.peak.lock().unwrap();
            *peak = (peak.0.max(now.0), peak.1.max(now.1), peak.2.max(len));
            now.1 >= self.read_ahead
        };
        if reached {
            // Let every read already started register first: a restore that started more
            // than it should is seen doing so.
            for _ in 0..32 {
                tokio::task::yield_now().await;
            }
            self.enough.notify_waiters();
        } else {
            let _ = tokio::time::timeout(std::time::Duration::from_millis(300), enough).await;
        }
        let r = self.inner.get_range(obj, offset, len).await;
        let mut now = self.now.lock().unwrap();
        now.0 -= 1;
        now.1 -= len;
        r
    }
    async fn list(
        &self,
    ) -> Result<Vec<storinator_shared::storage::ObjectInfo>, storinator_shared::StorageError> {
        self.inner.list().await
    }
    async fn remove(
        &self,
        obj: &storinator_shared::storage::ObjectRef,
    ) -> Result<(), storinator_shared::StorageError> {
        self.inner.remove(obj).await
    }
    fn read_ahead(&self) -> u64 {
        self.read_ahead
    }
}

/// A restore keeps as many range reads requested as the storage asks to read ahead (a far
/// backend needs more than its bandwidth-delay product requested: reads finish in any order
/// and are used in order), and no more than that plus one read (what it holds is bounded).
#[tokio::test]
async fn restore_keeps_the_storages_read_ahead_requested_and_no_more() {
    const READ_AHEAD: u64 = 1 << 20;
    let dir = tempfile::tempdir().unwrap();
    let storage = Arc::new(ReadAheadProbe {
        inner: storinator_shared::MemoryStorage::new(dir.path().join("spool")),
        read_ahead: READ_AHEAD,
        now: Default::default(),
        peak: Default::default(),
        enough: Default::default(),
    });
    let catalog = Catalog::open(&storinator_testkit::db::url_for(&dir.path().join("c.db")))
        .await
        .unwrap();
    storinator_shared::Repo::init(
        &catalog,
        storage.as_ref(),
        PASS,
        storinator_shared::KdfParams::fast_for_tests(),
    )
    .await
    .unwrap();
    let repo = storinator_shared::Repo::open(catalog, storage.clone(), PASS, settings())
        .await
        .unwrap();
    // Incompressible files in packs of 256 KiB (the test settings): each range read is at
    // most one pack, so the read-ahead takes more reads than the four a restore once kept.
    let src = dir.path().join("src/data");
    for i in 0..6u64 {
        write(&src, &format!("f{i}"), &bytes(1 << 20, i + 1));
    }
    let want = describe_tree(&src);
    repo.backup(&backup_opts(&src), &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    let to = dir.path().join("out");
    let (opts, cancel) = (restore_opts(&src, &to, None), CancelFlag::new());
    let done = repo.restore(&opts, &NoProgress, &cancel);
    tokio::time::timeout(std::time::Duration::from_secs(60), done)
        .await
        .expect("restore took too long")
        .unwrap();
    assert_eq!(describe_tree(&to.join("data")), want);
    let (reads, bytes, longest) = *storage.peak.lock().unwrap();
    assert!(
        bytes >= READ_AHEAD,
        "only {bytes} bytes in {reads} reads requested at once"
    );
    assert!(
        bytes < READ_AHEAD + longest,
        "{bytes} bytes in {reads} reads requested at once: more than the read-ahead and a read"
    );
}

/// The test kit's instrumented store reads ahead as much as the store it wraps: tests that
/// wrap a store restore the way the store itself is restored.
#[test]
fn the_instrumented_store_reads_ahead_as_the_store_it_wraps() {
    let dir = tempfile::tempdir().unwrap();
    let wrapped = InstrumentedStorage::new(ReadAheadProbe {
        inner: storinator_shared::MemoryStorage::new(dir.path().join("spool")),
        read_ahead: 3 << 20,
        now: Default::default(),
        peak: Default::default(),
        enough: Default::default(),
    });
    assert_eq!(storinator_shared::Storage::read_ahead(&wrapped), 3 << 20);
}
