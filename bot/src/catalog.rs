//! What `/snapshots` and `/ls` read: a small view of the catalog, behind a trait so the bot
//! does not depend on the catalog module's internals (and tests can stub it).
//!
//! [`SqlCatalogView`] reads the catalog tables of `migrations/0001_initial.sql` directly
//! (read-only): `roots.path` is the absolute folder that was backed up, and entry paths start
//! with that folder's own name (`/srv/data` → `data/...`).

use async_trait::async_trait;
use sqlx::{Row, SqlitePool};

/// One snapshot as listed to a user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotLine {
    pub short_id: String,
    pub root: String,
    pub finished_at_ms: i64,
    pub files: u64,
    pub bytes: u64,
    pub encrypted: bool,
}

/// One directory entry as listed to a user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryLine {
    pub name: String,
    pub kind: String,
    pub size: u64,
}

#[async_trait]
pub trait CatalogView: Send + Sync + 'static {
    /// Snapshots of `owner`, newest first; with `path`, only those of roots at, above or
    /// below it.
    async fn snapshots(&self, owner: &str, path: Option<&str>)
    -> anyhow::Result<Vec<SnapshotLine>>;

    /// Direct children of `path` in `snapshot` (default: the latest) of `owner`'s backups.
    /// `Ok(None)` when no backup of `owner` contains `path`.
    async fn ls(
        &self,
        owner: &str,
        path: &str,
        snapshot: Option<&str>,
    ) -> anyhow::Result<Option<Vec<EntryLine>>>;
}

/// [`CatalogView`] over the catalog tables in the shared SQLite file.
pub struct SqlCatalogView {
    pool: SqlitePool,
}

impl SqlCatalogView {
    pub fn new(pool: SqlitePool) -> Self {
        SqlCatalogView { pool }
    }
}

#[async_trait]
impl CatalogView for SqlCatalogView {
    async fn snapshots(
        &self,
        owner: &str,
        path: Option<&str>,
    ) -> anyhow::Result<Vec<SnapshotLine>> {
        let path = path.map(|p| p.trim_end_matches('/').to_string());
        let rows = sqlx::query(
            "SELECT s.short_id, r.path, s.finished_at, s.files, s.bytes, s.encrypted
               FROM snapshots s JOIN roots r ON r.id = s.root_id
              WHERE r.owner = ?1
                AND (?2 IS NULL OR r.path = ?2
                     OR substr(?2, 1, length(r.path) + 1) = r.path || '/'
                     OR substr(r.path, 1, length(?2) + 1) = ?2 || '/')
              ORDER BY s.finished_at DESC, s.id DESC LIMIT 30",
        )
        .bind(owner)
        .bind(path)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(SnapshotLine {
                    short_id: r.try_get(0)?,
                    root: r.try_get(1)?,
                    finished_at_ms: r.try_get(2)?,
                    files: r.try_get::<i64, _>(3)?.max(0) as u64,
                    bytes: r.try_get::<i64, _>(4)?.max(0) as u64,
                    encrypted: r.try_get::<i64, _>(5)? != 0,
                })
            })
            .collect()
    }

    async fn ls(
        &self,
        owner: &str,
        path: &str,
        snapshot: Option<&str>,
    ) -> anyhow::Result<Option<Vec<EntryLine>>> {
        let path = path.trim_end_matches('/');
        // The deepest root at or above `path`.
        let root = sqlx::query(
            "SELECT id, path FROM roots WHERE owner = ?1
                AND (path = ?2 OR substr(?2, 1, length(path) + 1) = path || '/')
              ORDER BY length(path) DESC LIMIT 1",
        )
        .bind(owner)
        .bind(path)
        .fetch_optional(&self.pool)
        .await?;
        let Some(root) = root else { return Ok(None) };
        let root_id: i64 = root.try_get(0)?;
        let root_path: String = root.try_get(1)?;
        let seq: Option<i64> = match snapshot {
            Some(id) => {
                sqlx::query_scalar("SELECT seq FROM snapshots WHERE root_id = ? AND short_id = ?")
                    .bind(root_id)
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await?
            }
            None => {
                sqlx::query_scalar("SELECT max(seq) FROM snapshots WHERE root_id = ?")
                    .bind(root_id)
                    .fetch_one(&self.pool)
                    .await?
            }
        };
        let Some(seq) = seq else { return Ok(None) };
        let root_name = root_path.rsplit('/').next().unwrap_or("").to_string();
        let rel = format!(
            "{root_name}{}",
            &path[root_path.trim_end_matches('/').len()..]
        );
        let prefix = format!("{rel}/");
        let rows = sqlx::query(
            "SELECT path, kind, size FROM entries
              WHERE root_id = ?1 AND from_seq <= ?2 AND (to_seq IS NULL OR to_seq > ?2)
                AND substr(path, 1, length(?3)) = ?3
              ORDER BY path",
        )
        .bind(root_id)
        .bind(seq)
        .bind(&prefix)
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::new();
        for r in rows {
            let p: String = r.try_get(0)?;
            let name = &p[prefix.len()..];
            if name.is_empty() || name.contains('/') {
                continue;
            }
            out.push(EntryLine {
                name: name.to_string(),
                kind: r.try_get(1)?,
                size: r.try_get::<i64, _>(2)?.max(0) as u64,
            });
        }
        Ok(Some(out))
    }
}
