//! The SQLite catalog: keys, packs, chunks, snapshots and their entries (and the job table,
//! see `jobs`). It is a cache of what storage holds; `recover` rebuilds it from storage.

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};

use crate::crypto::{ChunkId, WrappedKey};
use crate::error::Error;
use crate::pack::PackEntry;

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

/// Opens (creating if needed) the SQLite database at `url`, in WAL mode with a busy
/// timeout and foreign keys on, and brings its schema up to date.
pub async fn open_pool(url: &str) -> Result<SqlitePool, Error> {
    let opts = SqliteConnectOptions::from_str(url)
        .map_err(|e| Error::Invalid(format!("invalid DATABASE_URL {url:?}: {e}")))?;
    if let Some(parent) = opts
        .get_filename()
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
    {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    let opts = opts
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(Duration::from_secs(30))
        .foreign_keys(true);
    let pool = SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(opts)
        .await
        .map_err(|source| Error::Db {
            context: format!("opening {url}"),
            source,
        })?;
    sqlx::migrate!("../migrations")
        .run(&pool)
        .await
        .map_err(|e| Error::Invalid(format!("migrating the catalog at {url}: {e}")))?;
    Ok(pool)
}

/// Kind of a snapshot entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
}

impl EntryKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::File => "file",
            EntryKind::Dir => "dir",
            EntryKind::Symlink => "symlink",
        }
    }
    pub fn parse(s: &str) -> Option<EntryKind> {
        match s {
            "file" => Some(EntryKind::File),
            "dir" => Some(EntryKind::Dir),
            "symlink" => Some(EntryKind::Symlink),
            _ => None,
        }
    }
}

/// One entry of a snapshot as the catalog holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryRow {
    pub id: i64,
    pub path: String,
    pub kind: EntryKind,
    pub size: u64,
    pub mtime_ns: i64,
    pub mode: u32,
    pub inode: u64,
    pub content_id: Option<i64>,
    pub sha256: Option<[u8; 32]>,
    pub target: Option<String>,
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
    pool: SqlitePool,
}

const SNAPSHOT_COLUMNS: &str = "s.short_id, r.owner, r.path, s.seq, s.hostname, s.encrypted, s.started_at, \
     s.finished_at, s.files, s.dirs, s.bytes, s.bytes_read, s.new_chunks, s.bytes_stored, s.warnings";

fn snapshot_from_row(r: &sqlx::sqlite::SqliteRow) -> SnapshotInfo {
    SnapshotInfo {
        short_id: r.get(0),
        owner: r.get(1),
        root: r.get(2),
        seq: r.get(3),
        hostname: r.get(4),
        encrypted: r.get(5),
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

const ENTRY_COLUMNS: &str =
    "e.id, e.path, e.kind, e.size, e.mtime_ns, e.mode, e.inode, e.content_id, c.sha256, e.target";

fn entry_from_row(r: &sqlx::sqlite::SqliteRow) -> EntryRow {
    let sha: Option<Vec<u8>> = r.get(8);
    EntryRow {
        id: r.get(0),
        path: r.get(1),
        kind: EntryKind::parse(r.get::<&str, _>(2)).unwrap_or(EntryKind::File),
        size: r.get::<i64, _>(3) as u64,
        mtime_ns: r.get(4),
        mode: r.get::<i64, _>(5) as u32,
        inode: r.get::<i64, _>(6) as u64,
        content_id: r.get(7),
        sha256: sha.and_then(|s| s.try_into().ok()),
        target: r.get(9),
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

    pub fn from_pool(pool: SqlitePool) -> Catalog {
        Catalog { pool }
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    // ---- keys ----

    pub async fn user_key(&self, name: &str) -> Result<Option<WrappedKey>, Error> {
        let row = sqlx::query(
            "SELECT key_id, kdf_salt, kdf_m_kib, kdf_t_cost, kdf_p_cost, wrapped_key FROM users WHERE name = ?",
        )
        .bind(name)
        .fetch_optional(&self.pool)
        .await
        .map_err(db("reading the key"))?;
        Ok(row.map(|r| WrappedKey {
            key_id: r.get(0),
            salt: r.get(1),
            kdf: crate::crypto::KdfParams {
                m_kib: r.get::<i64, _>(2) as u32,
                t_cost: r.get::<i64, _>(3) as u32,
                p_cost: r.get::<i64, _>(4) as u32,
            },
            wrapped: r.get(5),
        }))
    }

    /// Stores (or replaces, for a passphrase change) the wrapped key of `name`.
    pub async fn put_user_key(&self, name: &str, key: &WrappedKey) -> Result<(), Error> {
        sqlx::query(
            "INSERT INTO users (name, key_id, kdf_salt, kdf_m_kib, kdf_t_cost, kdf_p_cost, wrapped_key, created_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?) \
             ON CONFLICT (name) DO UPDATE SET key_id = excluded.key_id, kdf_salt = excluded.kdf_salt, \
             kdf_m_kib = excluded.kdf_m_kib, kdf_t_cost = excluded.kdf_t_cost, kdf_p_cost = excluded.kdf_p_cost, \
             wrapped_key = excluded.wrapped_key",
        )
        .bind(name)
        .bind(&key.key_id)
        .bind(&key.salt)
        .bind(i64::from(key.kdf.m_kib))
        .bind(i64::from(key.kdf.t_cost))
        .bind(i64::from(key.kdf.p_cost))
        .bind(&key.wrapped)
        .bind(now_ms())
        .execute(&self.pool)
        .await
        .map_err(db("storing the key"))?;
        Ok(())
    }

    // ---- packs and chunks ----

    /// Records a pack about to be uploaded (before the upload, so its id survives a crash).
    pub async fn pack_uploading(&self, id: &str, size: u64, encrypted: bool) -> Result<(), Error> {
        sqlx::query(
            "INSERT INTO packs (id, state, size, encrypted, created_at) VALUES (?, 'uploading', ?, ?, ?) \
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(id)
        .bind(size as i64)
        .bind(encrypted)
        .bind(now_ms())
        .execute(&self.pool)
        .await
        .map_err(db("recording a pack"))?;
        Ok(())
    }

    /// Marks a pack durable in storage and indexes its blobs, in one transaction.
    pub async fn pack_stored(
        &self,
        id: &str,
        size: u64,
        encrypted: bool,
        location: &str,
        entries: &[PackEntry],
    ) -> Result<(), Error> {
        let mut tx = self.pool.begin().await.map_err(db("storing a pack"))?;
        sqlx::query(
            "INSERT INTO packs (id, state, size, encrypted, location, created_at) VALUES (?, 'stored', ?, ?, ?, ?) \
             ON CONFLICT (id) DO UPDATE SET state = 'stored', size = excluded.size, location = excluded.location",
        )
        .bind(id)
        .bind(size as i64)
        .bind(encrypted)
        .bind(location)
        .bind(now_ms())
        .execute(&mut *tx)
        .await
        .map_err(db("storing a pack"))?;
        for e in entries {
            // A chunk that already lives in another (stored) pack keeps its first home; one
            // in a pack known to be missing moves here.
            sqlx::query(
                "INSERT INTO chunks (id, pack_id, offset, length, raw_length, kind, flags) VALUES (?, ?, ?, ?, ?, ?, ?) \
                 ON CONFLICT (id) DO UPDATE SET pack_id = excluded.pack_id, offset = excluded.offset, \
                 length = excluded.length, raw_length = excluded.raw_length, flags = excluded.flags \
                 WHERE (SELECT state FROM packs WHERE id = chunks.pack_id) <> 'stored'",
            )
            .bind(&e.id.0[..])
            .bind(id)
            .bind(e.offset as i64)
            .bind(i64::from(e.length))
            .bind(i64::from(e.raw_length))
            .bind(e.kind as u8 as i64)
            .bind(i64::from(e.flags))
            .execute(&mut *tx)
            .await
            .map_err(db("indexing a pack"))?;
        }
        tx.commit().await.map_err(db("storing a pack"))?;
        Ok(())
    }

    pub async fn set_pack_state(&self, id: &str, state: &str) -> Result<(), Error> {
        sqlx::query("UPDATE packs SET state = ? WHERE id = ?")
            .bind(state)
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(db("updating a pack"))?;
        Ok(())
    }

    pub async fn packs(&self) -> Result<Vec<PackRow>, Error> {
        let rows =
            sqlx::query("SELECT id, state, size, encrypted, location FROM packs ORDER BY id")
                .fetch_all(&self.pool)
                .await
                .map_err(db("listing packs"))?;
        Ok(rows
            .iter()
            .map(|r| PackRow {
                id: r.get(0),
                state: r.get(1),
                size: r.get::<i64, _>(2) as u64,
                encrypted: r.get(3),
                location: r.get(4),
            })
            .collect())
    }

    /// Packs recorded as uploading whose upload never finished (a crash): they are garbage.
    pub async fn forget_unfinished_packs(&self) -> Result<Vec<String>, Error> {
        let ids: Vec<String> = sqlx::query_scalar("SELECT id FROM packs WHERE state = 'uploading'")
            .fetch_all(&self.pool)
            .await
            .map_err(db("listing unfinished packs"))?;
        sqlx::query("DELETE FROM packs WHERE state = 'uploading' AND id NOT IN (SELECT pack_id FROM chunks)")
            .execute(&self.pool)
            .await
            .map_err(db("forgetting unfinished packs"))?;
        Ok(ids)
    }

    /// Ids of blobs that are safely stored and can be deduplicated against, with their
    /// encryption flag.
    pub async fn stored_chunk_ids(&self) -> Result<Vec<(ChunkId, bool)>, Error> {
        let rows = sqlx::query(
            "SELECT c.id, c.flags FROM chunks c JOIN packs p ON p.id = c.pack_id WHERE p.state = 'stored'",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(db("loading the chunk index"))?;
        rows.iter()
            .map(|r| {
                let id: Vec<u8> = r.get(0);
                let flags: i64 = r.get(1);
                Ok((ChunkId::from_slice(&id)?, flags & 1 == 1))
            })
            .collect()
    }

    /// Where a blob lives.
    pub async fn chunk(&self, id: &ChunkId) -> Result<Option<ChunkLoc>, Error> {
        let row = sqlx::query(
            "SELECT c.pack_id, p.location, c.offset, c.length, c.raw_length FROM chunks c \
             JOIN packs p ON p.id = c.pack_id WHERE c.id = ?",
        )
        .bind(&id.0[..])
        .fetch_optional(&self.pool)
        .await
        .map_err(db("looking up a chunk"))?;
        Ok(row.map(|r| ChunkLoc {
            id: *id,
            pack_id: r.get(0),
            location: r.get(1),
            offset: r.get::<i64, _>(2) as u64,
            length: r.get::<i64, _>(3) as u64,
            raw_length: r.get::<i64, _>(4) as u64,
        }))
    }

    /// Chunk lists (in order, with locations) of every file content at `prefix` or below it
    /// in snapshot `seq` of a root: one query for a whole restore.
    pub async fn content_chunks_under(
        &self,
        root_id: i64,
        seq: i64,
        prefix: &str,
    ) -> Result<HashMap<i64, Vec<ChunkLoc>>, Error> {
        let rows = sqlx::query(
            "SELECT cc.content_id, c.id, c.pack_id, p.location, c.offset, c.length, c.raw_length \
             FROM content_chunks cc JOIN chunks c ON c.id = cc.chunk_id JOIN packs p ON p.id = c.pack_id \
             WHERE cc.content_id IN (SELECT e.content_id FROM entries e WHERE e.root_id = ? \
             AND e.from_seq <= ? AND (e.to_seq IS NULL OR e.to_seq > ?) \
             AND (e.path = ? OR (e.path >= ? AND e.path < ?)) AND e.content_id IS NOT NULL) \
             ORDER BY cc.content_id, cc.seq",
        )
        .bind(root_id)
        .bind(seq)
        .bind(seq)
        .bind(prefix)
        .bind(format!("{prefix}/"))
        .bind(format!("{prefix}0"))
        .fetch_all(&self.pool)
        .await
        .map_err(db("loading chunk lists"))?;
        let mut out: HashMap<i64, Vec<ChunkLoc>> = HashMap::new();
        for r in &rows {
            let id: Vec<u8> = r.get(1);
            out.entry(r.get(0)).or_default().push(ChunkLoc {
                id: ChunkId::from_slice(&id)?,
                pack_id: r.get(2),
                location: r.get(3),
                offset: r.get::<i64, _>(4) as u64,
                length: r.get::<i64, _>(5) as u64,
                raw_length: r.get::<i64, _>(6) as u64,
            });
        }
        Ok(out)
    }

    /// Entries (in any snapshot) whose content uses a chunk of `pack_id`: what a lost pack costs.
    pub async fn paths_using_pack(
        &self,
        pack_id: &str,
        limit: i64,
    ) -> Result<Vec<(String, String)>, Error> {
        let rows = sqlx::query(
            "SELECT DISTINCT r.path, e.path FROM entries e JOIN roots r ON r.id = e.root_id \
             WHERE e.content_id IN (SELECT cc.content_id FROM content_chunks cc JOIN chunks c ON c.id = cc.chunk_id \
             WHERE c.pack_id = ?) ORDER BY e.path LIMIT ?",
        )
        .bind(pack_id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(db("finding files in a pack"))?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    // ---- roots, snapshots, entries ----

    pub async fn root_id(&self, owner: &str, path: &str) -> Result<Option<i64>, Error> {
        sqlx::query_scalar("SELECT id FROM roots WHERE owner = ? AND path = ?")
            .bind(owner)
            .bind(path)
            .fetch_optional(&self.pool)
            .await
            .map_err(db("looking up a backup root"))
    }

    /// Roots of an owner, as (id, absolute path).
    pub async fn roots(&self, owner: &str) -> Result<Vec<(i64, String)>, Error> {
        let rows = sqlx::query("SELECT id, path FROM roots WHERE owner = ? ORDER BY path")
            .bind(owner)
            .fetch_all(&self.pool)
            .await
            .map_err(db("listing backup roots"))?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// Highest committed snapshot sequence number of a root (0 if none).
    pub async fn latest_seq(&self, root_id: i64) -> Result<i64, Error> {
        let seq: Option<i64> =
            sqlx::query_scalar("SELECT MAX(seq) FROM snapshots WHERE root_id = ?")
                .bind(root_id)
                .fetch_one(&self.pool)
                .await
                .map_err(db("reading the latest snapshot"))?;
        Ok(seq.unwrap_or(0))
    }

    /// Snapshots of `owner`, oldest first, optionally only those of the root at `root`.
    pub async fn snapshots(
        &self,
        owner: &str,
        root: Option<&str>,
    ) -> Result<Vec<SnapshotInfo>, Error> {
        let sql = format!(
            "SELECT {SNAPSHOT_COLUMNS} FROM snapshots s JOIN roots r ON r.id = s.root_id \
             WHERE r.owner = ? AND (? IS NULL OR r.path = ?) ORDER BY s.finished_at, s.id"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(owner)
            .bind(root)
            .bind(root)
            .fetch_all(&self.pool)
            .await
            .map_err(db("listing snapshots"))?;
        Ok(rows.iter().map(snapshot_from_row).collect())
    }

    /// A snapshot of `owner` by its short id (or a unique prefix of it), with its root id.
    pub async fn snapshot_by_id(
        &self,
        owner: &str,
        short_id: &str,
    ) -> Result<Option<(i64, SnapshotInfo)>, Error> {
        if short_id.is_empty() || !short_id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(None);
        }
        let sql = format!(
            "SELECT {SNAPSHOT_COLUMNS}, s.root_id FROM snapshots s JOIN roots r ON r.id = s.root_id \
             WHERE r.owner = ? AND s.short_id LIKE ? || '%' LIMIT 2"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(owner)
            .bind(short_id.to_ascii_lowercase())
            .fetch_all(&self.pool)
            .await
            .map_err(db("looking up a snapshot"))?;
        match rows.len() {
            1 => Ok(Some((rows[0].get(15), snapshot_from_row(&rows[0])))),
            0 => Ok(None),
            _ => Err(Error::Invalid(format!(
                "snapshot id {short_id:?} is ambiguous: give more digits"
            ))),
        }
    }

    /// The current (latest) entries of a root, by path.
    pub async fn current_entries(&self, root_id: i64) -> Result<HashMap<String, EntryRow>, Error> {
        let sql = format!(
            "SELECT {ENTRY_COLUMNS} FROM entries e LEFT JOIN contents c ON c.id = e.content_id \
             WHERE e.root_id = ? AND e.to_seq IS NULL"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(root_id)
            .fetch_all(&self.pool)
            .await
            .map_err(db("loading the previous snapshot"))?;
        Ok(rows
            .iter()
            .map(entry_from_row)
            .map(|e| (e.path.clone(), e))
            .collect())
    }

    /// Entries of snapshot `seq` of a root at `prefix` or below it, sorted by path.
    pub async fn entries_under(
        &self,
        root_id: i64,
        seq: i64,
        prefix: &str,
    ) -> Result<Vec<EntryRow>, Error> {
        // `prefix/` .. `prefix0` is every path below prefix ('0' follows '/' in byte order).
        let sql = format!(
            "SELECT {ENTRY_COLUMNS} FROM entries e LEFT JOIN contents c ON c.id = e.content_id \
             WHERE e.root_id = ? AND e.from_seq <= ? AND (e.to_seq IS NULL OR e.to_seq > ?) \
             AND (e.path = ? OR (e.path >= ? AND e.path < ?)) ORDER BY e.path"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(root_id)
            .bind(seq)
            .bind(seq)
            .bind(prefix)
            .bind(format!("{prefix}/"))
            .bind(format!("{prefix}0"))
            .fetch_all(&self.pool)
            .await
            .map_err(db("listing snapshot entries"))?;
        Ok(rows.iter().map(entry_from_row).collect())
    }

    /// Number of entry rows (tests and the schema's promise: unchanged trees add none).
    pub async fn entry_row_count(&self) -> Result<i64, Error> {
        sqlx::query_scalar("SELECT COUNT(*) FROM entries")
            .fetch_one(&self.pool)
            .await
            .map_err(db("counting entries"))
    }
}
