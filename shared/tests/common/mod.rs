//! Fixtures shared by the engine's integration tests.
#![allow(dead_code, unused_imports)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use storinator_shared::{Catalog, ChunkerParams, EngineSettings, KdfParams, MemoryStorage, Repo};

pub const PASS: &str = "correct horse battery staple";

/// A repository in a temp dir: catalog file, in-memory storage, small packs and chunks.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub storage: Arc<CountingStorage>,
    pub repo: Repo,
}

pub fn settings() -> EngineSettings {
    EngineSettings {
        pack_size: 256 * 1024,
        compression: Some(1),
        chunker: ChunkerParams::small(),
        threads: 2,
        hostname: "test".into(),
    }
}

impl Fixture {
    pub async fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let storage = Arc::new(InstrumentedStorage::new(MemoryStorage::new(
            dir.path().join("spool"),
        )));
        let repo = Fixture::open_repo(dir.path(), storage.clone(), true).await;
        Fixture { dir, storage, repo }
    }

    pub async fn open_repo(dir: &Path, storage: Arc<CountingStorage>, init: bool) -> Repo {
        let catalog = Catalog::open(&storinator_testkit::db::url_for(&dir.join("catalog.db")))
            .await
            .unwrap();
        if init {
            Repo::init(
                &catalog,
                storage.as_ref(),
                PASS,
                KdfParams::fast_for_tests(),
            )
            .await
            .unwrap();
        }
        Repo::open(catalog, storage, PASS, settings())
            .await
            .unwrap()
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// The id of `local`'s root at `root`, the path its backup was given.
    // Each test crate uses its own subset.
    #[allow(dead_code)]
    pub async fn root_id(&self, root: &str) -> i64 {
        let id = self.repo.catalog.root_id("local", root).await.unwrap();
        id.unwrap_or_else(|| panic!("no root {root} in the catalog"))
    }
}

// Each test crate uses its own subset.
#[allow(unused_imports)]
pub use storinator_shared::format::pack::BlobKind;
// Each test crate uses its own subset.
#[allow(unused_imports)]
pub use storinator_testkit::fixtures::{
    InstrumentedStorage, bytes, describe_tree, duplicate_data_chunks, make_tree, pack_entries,
    stored_packs, temp_files,
};

/// The engine tests' storage: memory, instrumented.
pub type CountingStorage = InstrumentedStorage<MemoryStorage>;

/// A SQLite catalog in `dir` (`catalog.db`) made by the migrations whose file names `keep`
/// accepts: the layout of an older version, for a migration's test. Empty: see
/// [`old_layout_catalog`] for one that holds snapshots.
pub async fn catalog_migrated_by(
    dir: &Path,
    keep: impl Fn(&str) -> bool,
) -> (storinator_shared::catalog::Pool, PathBuf) {
    let migrator = migrator_of(dir, keep).await;
    let db = dir.join("catalog.db");
    let url = format!("sqlite://{}?mode=rwc", db.display());
    sqlx::any::install_default_drivers();
    let pool = storinator_shared::catalog::Pool::connect(&url)
        .await
        .unwrap();
    migrator.run(&pool).await.unwrap();
    (pool, db)
}

/// A migrator of this version's SQLite migrations whose file names `keep` accepts (copied
/// into `dir`/old-migrations).
pub async fn migrator_of(dir: &Path, keep: impl Fn(&str) -> bool) -> sqlx::migrate::Migrator {
    let old = dir.join("old-migrations");
    std::fs::create_dir(&old).unwrap();
    let all = Path::new(env!("CARGO_MANIFEST_DIR")).join("../migrations");
    for e in std::fs::read_dir(&all).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        if e.file_type().unwrap().is_file() && keep(&name) {
            std::fs::copy(e.path(), old.join(&name)).unwrap();
        }
    }
    sqlx::migrate::Migrator::new(old.as_path()).await.unwrap()
}

/// A repository whose catalog (`current.db` in `dir`, SQLite, this version's layout) records
/// what a migration's test then copies into an older layout ([`old_layout_catalog`]): this
/// version writes only its own layout.
pub async fn recording_repo(dir: &Path) -> (Repo, Arc<CountingStorage>) {
    let storage = Arc::new(InstrumentedStorage::new(MemoryStorage::new(
        dir.join("spool"),
    )));
    let db = dir.join("current.db");
    let catalog = Catalog::open(&format!("sqlite://{}?mode=rwc", db.display()))
        .await
        .unwrap();
    Repo::init(
        &catalog,
        storage.as_ref(),
        PASS,
        KdfParams::fast_for_tests(),
    )
    .await
    .unwrap();
    let repo = Repo::open(catalog, storage.clone(), PASS, settings())
        .await
        .unwrap();
    (repo, storage)
}

/// The catalog of [`catalog_migrated_by`] holding every row of the catalog `current` (made
/// by [`recording_repo`], closed): each table the old layout has gets the rows of the same
/// table, by the columns both have; the entries in the layout before migration 0021 (the
/// kind as a word, the owner's four columns; the row ids of older layouts in key order), and
/// every chunk list in `content_chunks` before 0026 (from 0026 to 0027, a one-chunk content
/// names its chunk in its row).
pub async fn old_layout_catalog(
    dir: &Path,
    keep: impl Fn(&str) -> bool,
    current: &Path,
) -> (storinator_shared::catalog::Pool, PathBuf) {
    let (pool, db) = catalog_migrated_by(dir, keep).await;
    let mut conn = pool.acquire().await.unwrap();
    let attach = format!("ATTACH DATABASE '{}' AS a", current.display());
    for sql in [
        "PRAGMA foreign_keys = OFF".to_string(),
        attach,
        "BEGIN".into(),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&mut *conn)
            .await
            .unwrap();
    }
    // Each table of the old layout that this version has too, with the columns of each.
    let pairs: Vec<(String, String)> = sqlx::query_as(
        "SELECT m.name, c.name FROM main.sqlite_master m, pragma_table_info(m.name, 'main') c \
         WHERE m.type = 'table' AND m.name NOT LIKE 'sqlite_%' AND m.name <> '_sqlx_migrations' \
         AND (m.name = 'entries' OR (m.name = 'contents' AND c.name = 'chunk_no') OR c.name IN \
              (SELECT n.name FROM pragma_table_info(m.name, 'a') n)) ORDER BY m.name, c.cid",
    )
    .fetch_all(&mut *conn)
    .await
    .unwrap();
    // A content of one chunk is numbered as its chunk since 0027; from 0026 its row names
    // it, and an older layout lists it in `content_chunks`.
    let lists_in_contents = pairs
        .iter()
        .any(|(t, c)| t == "contents" && c == "chunk_no");
    let mut tables: Vec<(String, Vec<String>)> = Vec::new();
    for (table, column) in pairs {
        match tables.last_mut() {
            Some((t, columns)) if *t == table => columns.push(column),
            _ => tables.push((table, vec![column])),
        }
    }
    for (table, mut columns) in tables {
        let source = if table == "entries" {
            columns.retain(|c| OLD_ENTRY_COLUMNS.contains(&c.as_str()));
            format!("({OLD_ENTRIES} ORDER BY e.root_id, e.path, e.from_seq)")
        } else if table == "content_chunks" && !lists_in_contents {
            "(SELECT id AS content_id, 0 AS seq, id AS chunk_no FROM a.contents WHERE id > 0 \
              UNION ALL SELECT content_id, seq, chunk_no FROM a.content_chunks)"
                .to_string()
        } else if table == "contents" && lists_in_contents {
            "(SELECT *, CASE WHEN id > 0 THEN id END AS chunk_no FROM a.contents)".to_string()
        } else {
            format!("a.\"{table}\"")
        };
        let columns = columns
            .iter()
            .map(|c| format!("\"{c}\""))
            .collect::<Vec<_>>()
            .join(", ");
        // The rows the migrations inserted are this version's too: replaced by its rows.
        for sql in [
            format!("DELETE FROM main.\"{table}\""),
            format!("INSERT INTO main.\"{table}\" ({columns}) SELECT {columns} FROM {source}"),
        ] {
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .execute(&mut *conn)
                .await
                .unwrap();
        }
    }
    for sql in ["COMMIT", "DETACH DATABASE a", "PRAGMA foreign_keys = ON"] {
        sqlx::query(sql).execute(&mut *conn).await.unwrap();
    }
    (pool, db)
}

/// The columns of an entry before migration 0021.
const OLD_ENTRY_COLUMNS: [&str; 15] = [
    "root_id",
    "path",
    "kind",
    "size",
    "mtime_ns",
    "mode",
    "inode",
    "content_id",
    "target",
    "from_seq",
    "to_seq",
    "uid",
    "gid",
    "user_name",
    "group_name",
];

/// This version's entries (of the attached catalog `a`) as they were before migration 0021.
const OLD_ENTRIES: &str = "SELECT e.root_id, e.path, \
     CASE e.kind WHEN 0 THEN 'file' WHEN 1 THEN 'dir' WHEN 2 THEN 'symlink' END AS kind, \
     e.size, e.mtime_ns, e.mode, e.inode, e.content_id, e.target, e.from_seq, e.to_seq, \
     o.uid, o.gid, o.user_name, o.group_name \
     FROM a.entries e LEFT JOIN a.owners o ON o.no = e.owner_no";

/// The names in folder `dir`, sorted: what a restore left there (no temporaries, no wrong
/// files).
pub fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}
