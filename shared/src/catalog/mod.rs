//! The catalog layer: the schema and its queries. The database (SQLite, or PostgreSQL; see
//! `db.rs`) holds the wrapped key, packs, chunks, snapshots and their entries (and the job
//! table, see `ops::jobs`). It is a cache of what storage holds; `engine::recover` rebuilds
//! it from storage.
//!
//! Layer rules: the catalog may import `format` and the crate-level foundation modules
//! (`error`, `config`, `clock`, `progress`), never `engine` or `ops`. Every SQL statement of
//! the engine lives here, written once for both databases.

pub mod browse;
mod bulk;
mod db;
mod json_rows;
mod keys;
mod lanes;
mod packs;
mod previous;
mod retention;
mod runs;
mod scrub;
mod snapshots;

pub use db::{Conn, DbRow, Dialect, Pool, Tx, begin_write, flag, numbered, open_pool, sql};
pub use keys::OwnerKeyRow;
pub use lanes::{LaneHealth, LaneProbe, LaneState};
pub use previous::PrevFile;
pub use retention::{ForgetOutcome, PackUsage, RootUsage};
pub use runs::RunRow;
pub use scrub::{
    AffectedFile, BlobRow, Damage, OwnerStats, PackFinding, ScrubPack, ScrubReport, ScrubRun,
};
pub(crate) use snapshots::unchanged;
pub use snapshots::{NewContent, NewEntry, SnapshotCommit};

use std::path::Path;

use serde::{Deserialize, Serialize};
use sqlx::Row;

use crate::error::Error;
pub use crate::format::EntryKind;
use crate::format::crypto::ChunkId;

/// Who owns an entry, as recorded at backup (all `None` for entries from before owners were
/// recorded).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Owner {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub user: Option<String>,
    pub group: Option<String>,
}

/// Unix time in milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

pub(crate) fn db(context: &str) -> impl FnOnce(sqlx::Error) -> Error + '_ {
    move |source| Error::Db {
        context: context.to_string(),
        source,
    }
}

/// The packs whose chunks may be deduplicated against and referenced by a new snapshot, as a
/// condition on `packs p`. One definition: the backup's dedup set and the commit's guard
/// (invariant 1) must agree, and a later state (a pack condemned by prune) changes it here.
pub(crate) const USABLE_PACK: &str =
    "p.state = 'stored' AND NOT EXISTS (SELECT 1 FROM condemned_packs k WHERE k.pack_id = p.id)";
/// A chunk `c` whose copy a scrub found damaged (`damaged_chunks d` with `d.chunk_id = c.id`)
/// and that was not stored again since: not usable either, wherever its pack is. (Damage names
/// its pack by id, a chunk by number: few rows, looked up by key.)
pub(crate) const DAMAGED_CHUNK: &str =
    "d.healed_at IS NULL AND d.pack_id = (SELECT dp.id FROM packs dp WHERE dp.no = c.pack_no)";

/// How many leading bytes of a chunk's id (`chunks_by_id`, migration 0023) and of a content's
/// SHA-256 (`contents_by_sha256`, 0024) their indexes hold, and the lookups bind.
pub(crate) const PREFIX_BYTES: usize = 4;

/// The prefix of `expr` as those indexes name it, `substr(expr, 1, 4)`: a lookup's text must
/// be the index's for the planner to use it (tests ask for the plans).
pub(crate) fn prefix_of(expr: &str) -> String {
    format!("substr({expr}, 1, {PREFIX_BYTES})")
}

/// The chunk `c` is among those a scrub found damaged and that were not healed: a term on
/// `chunks_by_id` (migration 0023) that makes a join of damage and chunks start from the few
/// damaged rows. Without it SQLite reads every chunk and looks each up among the damaged.
pub(crate) fn among_damaged() -> String {
    format!(
        "{} IN (SELECT {} FROM damaged_chunks dd WHERE dd.healed_at IS NULL)",
        prefix_of("c.id"),
        prefix_of("dd.chunk_id")
    )
}

/// The chunk row `col` (`c.id`) is the chunk `id` (an SQL expression: a numbered mark, or
/// another table's column): the prefix that `chunks_by_id` indexes (migration 0023),
/// then the whole id. Every lookup of a chunk by its id names it so: without the prefix term
/// a lookup reads the whole table.
pub(crate) fn chunk_id_is(col: &str, id: &str) -> String {
    format!("{} = {} AND {col} = {id}", prefix_of(col), prefix_of(id))
}

/// The chunk row `col` is one of `n` chunks whose ids are bound after their `n` prefixes:
/// bind `&id.0[..PREFIX_BYTES]` for each id, then `&id.0[..]` for each, and no other value.
/// What [`chunk_id_is`] is for one id. The marks are bare on SQLite, as [`bulk::values`] says
/// why: these statements run once per 128 chunks a backup stores or records.
pub(crate) fn chunk_id_in(dialect: Dialect, col: &str, n: usize) -> String {
    let marks = |first: usize| match dialect {
        Dialect::Sqlite => vec!["?"; n].join(", "),
        Dialect::Postgres => bulk::marks(first, n),
    };
    format!(
        "{} IN ({}) AND {col} IN ({})",
        prefix_of(col),
        marks(1),
        marks(n + 1)
    )
}

/// Checks an owner name: `local` (the CLI's own backups) or `tg:<Telegram user id>` (a chat
/// user's), the id a positive decimal number. Every entry point (command line, job, engine)
/// checks it, so the catalog never holds an owner nobody can name again.
pub fn check_owner(owner: &str) -> Result<(), Error> {
    if owner == "local" {
        return Ok(());
    }
    let valid_id = owner.strip_prefix("tg:").is_some_and(|id| {
        !id.is_empty()
            && id.len() <= 19
            && id.bytes().all(|b| b.is_ascii_digit())
            && !id.starts_with('0')
            && id.parse::<i64>().is_ok()
    });
    if valid_id {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "invalid owner {owner:?}: owners are `local` or `tg:<numeric Telegram user id>`\nhint: a chat user's backups are `tg:123456789` (the id the bot shows)"
        )))
    }
}

/// An entry's path, kind and size ([`Catalog::entry_outlines_page`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryOutline {
    pub path: String,
    pub kind: EntryKind,
    pub size: u64,
}

/// One entry of a snapshot as the catalog holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryRow {
    pub path: String,
    pub kind: EntryKind,
    pub size: u64,
    pub mtime_ns: i64,
    pub mode: u32,
    pub inode: u64,
    pub content_id: Option<i64>,
    pub sha256: Option<[u8; 32]>,
    pub target: Option<String>,
    pub owner: Owner,
}

/// A snapshot as listed to users.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub short_id: String,
    pub owner: String,
    pub root: String,
    pub seq: i64,
    pub hostname: String,
    pub encrypted: bool,
    pub started_at: i64,
    pub finished_at: i64,
    pub files: u64,
    pub dirs: u64,
    pub bytes: u64,
    pub bytes_read: u64,
    pub new_chunks: u64,
    pub bytes_stored: u64,
    pub warnings: u64,
}

/// A pack row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackRow {
    pub id: String,
    pub state: String,
    pub size: u64,
    pub encrypted: bool,
    pub location: String,
}

/// Where a chunk lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkLoc {
    pub id: ChunkId,
    pub pack_id: String,
    pub location: String,
    pub offset: u64,
    pub length: u64,
    pub raw_length: u64,
}

/// The catalog.
#[derive(Clone)]
pub struct Catalog {
    pool: Pool,
}

pub(crate) const SNAPSHOT_COLUMNS: &str = "s.short_id, r.owner, r.path, s.seq, s.hostname, s.encrypted, s.started_at, \
     s.finished_at, s.files, s.dirs, s.bytes, s.bytes_read, s.new_chunks, s.bytes_stored, s.warnings";

pub(crate) fn snapshot_from_row(r: &DbRow) -> SnapshotInfo {
    SnapshotInfo {
        short_id: r.get(0),
        owner: r.get(1),
        root: r.get(2),
        seq: r.get(3),
        hostname: r.get(4),
        encrypted: flag(r, 5),
        started_at: r.get(6),
        finished_at: r.get(7),
        files: r.get::<i64, _>(8) as u64,
        dirs: r.get::<i64, _>(9) as u64,
        bytes: r.get::<i64, _>(10) as u64,
        bytes_read: r.get::<i64, _>(11) as u64,
        new_chunks: r.get::<i64, _>(12) as u64,
        bytes_stored: r.get::<i64, _>(13) as u64,
        warnings: r.get::<i64, _>(14) as u64,
    }
}

pub(crate) const ENTRY_COLUMNS: &str = "e.path, e.kind, e.size, e.mtime_ns, e.mode, e.inode, e.content_id, c.sha256, e.target, \
     o.uid, o.gid, o.user_name, o.group_name";

/// What [`ENTRY_COLUMNS`] reads from: the entries `e` with their contents `c` and owners `o`
/// (migration 0021: an entry names its owner by number; none recorded, no row).
pub(crate) const ENTRY_FROM: &str = "entries e LEFT JOIN contents c ON c.id = e.content_id \
     LEFT JOIN owners o ON o.no = e.owner_no";

/// Every content's chunk list as rows `(content_id, seq, chunk_no)`. A content of one chunk
/// takes that chunk's number as its id (migration 0027): an id above 0 is its own list.
/// Every other content has an id below 0 and its list in `content_chunks` (an empty file's
/// is empty). For statements that filter the lists by content or by chunk (the filter
/// reaches both halves, and the first searches `contents` by its key). A join from the
/// contents to their chunks uses [`list_chunks_join`] instead.
pub const CHUNK_LISTS: &str = "(SELECT id AS content_id, 0 AS seq, id AS chunk_no FROM contents \
     WHERE id > 0 \
     UNION ALL SELECT content_id, seq, chunk_no FROM content_chunks)";

/// Joins the contents aliased `content` to the chunks of their lists, aliased `chunks`
/// (`join`: `""` for an inner join, `"LEFT"` to keep a row without chunks), each list row
/// of `content_chunks` as `cc` (none for a content numbered as its chunk: migration 0027).
/// Both tables are searched by key, which `CHUNK_LISTS` in a join would not promise; a test
/// asks SQLite for the plans of the statements that use it.
pub(crate) fn list_chunks_join(content: &str, join: &str, chunks: &str) -> String {
    format!(
        "LEFT JOIN content_chunks cc ON cc.content_id = {content}.id AND {content}.id < 0 \
         {join} JOIN chunks {chunks} \
         ON {chunks}.no = CASE WHEN {content}.id > 0 THEN {content}.id ELSE cc.chunk_no END"
    )
}

/// `entries.kind` as the catalog stores it (migration 0021): a small integer, not the word
/// the snapshot format in storage uses.
pub(crate) fn kind_no(kind: EntryKind) -> i64 {
    match kind {
        EntryKind::File => 0,
        EntryKind::Dir => 1,
        EntryKind::Symlink => 2,
    }
}

/// The kind of an `entries.kind` number (the column's CHECK allows no other; a file if it
/// somehow were, as an unknown word read before).
pub(crate) fn kind_of(no: i64) -> EntryKind {
    match no {
        1 => EntryKind::Dir,
        2 => EntryKind::Symlink,
        _ => EntryKind::File,
    }
}

/// [`ENTRY_COLUMNS`] for a [`json_rows`] statement: the same columns in the same order, named
/// `c0`, `c1`, ... (the path is `c0`), the hash as hex.
pub(crate) fn entry_json_columns(dialect: Dialect) -> String {
    ENTRY_COLUMNS
        .split(", ")
        .enumerate()
        .map(|(i, c)| match c {
            "c.sha256" => format!("{} AS c{i}", json_rows::hex(dialect, c)),
            _ => format!("{c} AS c{i}"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// An entry as [`entry_json_columns`] reads it through [`json_rows`].
pub(crate) type EntryJson = (
    String,
    i64,
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

/// The entry of an [`EntryJson`] row, or why its hash is unreadable.
pub(crate) fn entry_from_json(r: EntryJson) -> Result<EntryRow, String> {
    let sha256 = match &r.7 {
        None => None,
        Some(h) => {
            let mut out = [0u8; 32];
            hex::decode_to_slice(h, &mut out)
                .map_err(|e| format!("the SHA-256 {h:?} of {:?}: {e}", r.0))?;
            Some(out)
        }
    };
    Ok(EntryRow {
        path: r.0,
        kind: kind_of(r.1),
        size: r.2 as u64,
        mtime_ns: r.3,
        mode: r.4 as u32,
        inode: r.5 as u64,
        content_id: r.6,
        sha256,
        target: r.8,
        owner: Owner {
            uid: r.9.map(|v| v as u32),
            gid: r.10.map(|v| v as u32),
            user: r.11,
            group: r.12,
        },
    })
}

pub(crate) fn entry_from_row(r: &DbRow) -> EntryRow {
    let sha: Option<Vec<u8>> = r.get(7);
    EntryRow {
        path: r.get(0),
        kind: kind_of(r.get(1)),
        size: r.get::<i64, _>(2) as u64,
        mtime_ns: r.get(3),
        mode: r.get::<i64, _>(4) as u32,
        inode: r.get::<i64, _>(5) as u64,
        content_id: r.get(6),
        sha256: sha.and_then(|s| s.try_into().ok()),
        target: r.get(8),
        owner: Owner {
            uid: r.get::<Option<i64>, _>(9).map(|v| v as u32),
            gid: r.get::<Option<i64>, _>(10).map(|v| v as u32),
            user: r.get(11),
            group: r.get(12),
        },
    }
}

impl Catalog {
    pub async fn open(url: &str) -> Result<Catalog, Error> {
        Ok(Catalog {
            pool: open_pool(url).await?,
        })
    }

    /// Opens a catalog in a file (tests, tools).
    pub async fn open_file(path: &Path) -> Result<Catalog, Error> {
        Catalog::open(&crate::config::sqlite_url(path)).await
    }

    pub fn from_pool(pool: Pool) -> Catalog {
        Catalog { pool }
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::os::unix::fs::PermissionsExt;

    /// What SQLite's `EXPLAIN QUERY PLAN` says of `sql` on `catalog`, one line per step.
    pub(crate) async fn query_plan(catalog: &super::Catalog, sql: &str) -> Vec<String> {
        let sql = format!("EXPLAIN QUERY PLAN {}", super::numbered(sql));
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .fetch_all(catalog.pool())
            .await
            .unwrap()
            .iter()
            .map(|r| sqlx::Row::get::<String, _>(r, 3))
            .collect()
    }

    /// Every statement that finds chunks by id goes through `chunks_by_id`, the index on their
    /// prefix (migration 0023): the prefix term and the index must name the same expression,
    /// or SQLite reads every chunk of the catalog for each id.
    #[tokio::test]
    async fn chunks_are_found_by_id_through_the_prefix_index() {
        let dir = tempfile::tempdir().unwrap();
        let catalog = super::Catalog::open_file(&dir.path().join("c.db"))
            .await
            .unwrap();
        // (what, statement, the name the plan gives `chunks`, whether it is reached by id)
        let statements = [
            (
                "chunk numbers",
                super::snapshots::chunk_numbers_sql(super::Dialect::Sqlite, 3),
                "ch",
                true,
            ),
            (
                "chunks of one-chunk contents",
                super::snapshots::single_chunks_sql(super::Dialect::Sqlite, 3),
                "ch",
                true,
            ),
            (
                "unusable chunks",
                super::snapshots::unusable_chunks_sql(),
                "c",
                true,
            ),
            ("a chunk's place", super::packs::chunk_sql(), "c", true),
            // No index leads from a chunk to the contents using it (nothing else needs one),
            // so this damage report reads the chunk lists and the entries.
            (
                "users of chunks",
                super::packs::users_of_chunks_sql(3),
                "c",
                true,
            ),
            (
                "homes of chunks",
                super::packs::chunk_homes_sql(super::Dialect::Sqlite, 3),
                "c",
                true,
            ),
            (
                "repointing",
                super::retention::repoint_sql(),
                "chunks",
                true,
            ),
            ("damage", super::scrub::record_damage_sql(), "c", true),
            (
                "unhealed damage",
                super::scrub::unhealed_damage_sql(),
                "c",
                true,
            ),
            (
                "contents of a chunk",
                super::scrub::contents_using_sql(),
                "ch",
                true,
            ),
            ("anomalies", super::scrub::anomalies_sql(), "c", true),
        ];
        for (what, sql, chunks, by_id) in statements {
            let plan = query_plan(&catalog, &sql).await;
            let index = format!("SEARCH {chunks} USING INDEX chunks_by_id ");
            assert_eq!(
                plan.iter().any(|p| p.starts_with(&index)),
                by_id,
                "{what}: {plan:?}"
            );
            let scan = format!("SCAN {chunks}");
            assert!(
                !plan
                    .iter()
                    .any(|p| *p == scan || p.starts_with(&format!("{scan} "))),
                "{what}: {plan:?}"
            );
        }
    }

    /// A restore's chunk lists and a backup's previous-snapshot range reach both kinds of
    /// list (a content numbered as its chunk, `content_chunks`; migration 0027) by key, never
    /// reading a whole table.
    #[tokio::test]
    async fn chunk_lists_are_read_by_key() {
        let dir = tempfile::tempdir().unwrap();
        let catalog = super::Catalog::open_file(&dir.path().join("c.db"))
            .await
            .unwrap();
        // (what, statement, the searches that reach the two tables)
        let statements = [
            (
                "a restore's chunk lists",
                super::packs::chunk_lists_sql(super::Dialect::Sqlite, 3),
                [
                    "SEARCH k USING INTEGER PRIMARY KEY",
                    "SEARCH cc USING PRIMARY KEY",
                ],
            ),
            (
                "a backup's previous range",
                super::previous::previous_sql(super::Dialect::Sqlite, true),
                [
                    "SEARCH c USING INTEGER PRIMARY KEY",
                    "SEARCH cc USING PRIMARY KEY",
                ],
            ),
        ];
        for (what, sql, searches) in statements {
            let plan = query_plan(&catalog, &sql).await;
            for search in searches {
                assert!(
                    plan.iter().any(|p| p.starts_with(search)),
                    "{what}: no {search}: {plan:?}"
                );
            }
            assert!(
                plan.iter().all(|p| !p.starts_with("SCAN ")),
                "{what}: {plan:?}"
            );
        }
    }

    /// A foreign key is checked when its parent row is deleted, by looking for child rows:
    /// without an index leading with the child columns, each deleted parent is a scan of the
    /// child table (migration 0025: a forget scanned every entry per content it deleted, a
    /// prune every chunk list per chunk). Every key of the catalog has its index, or a parent
    /// that is never deleted in bulk.
    #[tokio::test]
    async fn every_foreign_key_is_checked_through_an_index() {
        let dir = tempfile::tempdir().unwrap();
        let catalog = super::Catalog::open_file(&dir.path().join("c.db"))
            .await
            .unwrap();
        let keys: Vec<(String, String, String)> = sqlx::query_as(
            "SELECT m.name, f.\"table\", group_concat(f.\"from\", ',') \
             FROM sqlite_schema m, pragma_foreign_key_list(m.name) f \
             WHERE m.type = 'table' GROUP BY m.name, f.id",
        )
        .fetch_all(catalog.pool())
        .await
        .unwrap();
        let indexes: Vec<(String, String)> = sqlx::query_as(
            "SELECT m.name, (SELECT group_concat(COALESCE(name, '(expression)'), ',') FROM \
               (SELECT name FROM pragma_index_info(i.name) ORDER BY seqno)) \
             FROM sqlite_schema m, pragma_index_list(m.name) i WHERE m.type = 'table'",
        )
        .fetch_all(catalog.pool())
        .await
        .unwrap();
        // (child table, parent): why a scan is fine there.
        let exempt = [
            // Owners are never deleted (migration 0021).
            ("entries", "owners"),
            // A schedule's failed forgets: a few rows.
            ("forget_failures", "schedules"),
        ];
        assert!(keys.iter().any(|k| k.0 == "content_chunks"), "{keys:?}");
        for (table, parent, columns) in &keys {
            if exempt.contains(&(table.as_str(), parent.as_str())) {
                continue;
            }
            let led = indexes.iter().any(|(t, cols)| {
                t == table && (cols == columns || cols.starts_with(&format!("{columns},")))
            });
            assert!(
                led,
                "{table}({columns}) -> {parent}: no index leads with it"
            );
        }
    }

    #[test]
    fn owners_are_local_or_tg_and_a_positive_number() {
        for ok in ["local", "tg:1", "tg:123456789", "tg:9223372036854775807"] {
            assert!(super::check_owner(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "Local",
            "tg:",
            "tg:bob",
            "tg:0",
            "tg:007",
            "tg:-1",
            "tg:+1",
            "tg:1 ",
            " tg:1",
            "tg:9223372036854775808",
            "tg:1/2",
            "telegram:1",
        ] {
            let e = super::check_owner(bad).unwrap_err().to_string();
            assert!(e.starts_with(&format!("invalid owner {bad:?}")), "{e}");
        }
    }
    #[tokio::test]
    async fn the_data_dir_and_catalog_are_private() {
        let d = tempfile::tempdir().unwrap();
        let db = d.path().join("new/data/storinator.db");
        super::open_pool(&crate::config::sqlite_url(&db))
            .await
            .unwrap();
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(db.parent().unwrap()), 0o700);
        assert_eq!(mode(&db), 0o600);
        // WAL files follow the database's mode.
        let wal = db.with_extension("db-wal");
        if wal.exists() {
            assert_eq!(mode(&wal), 0o600);
        }
    }

    #[tokio::test]
    async fn a_data_dir_that_cannot_be_created_names_the_setting() {
        let d = tempfile::tempdir().unwrap();
        // A file where a folder should be (root may write anywhere, so not a permission).
        std::fs::write(d.path().join("taken"), b"").unwrap();
        let db = d.path().join("taken/sub/storinator.db");
        let e = super::open_pool(&crate::config::sqlite_url(&db))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("taken"), "{e}");
        let denied = super::db::data_dir_error(
            &d.path().join("x"),
            std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        )
        .to_string();
        assert!(denied.contains("STORINATOR_DATA_DIR"), "{denied}");
    }
}
