//! Queries for looking around in snapshots without restoring anything: a folder's children a
//! page at a time, one entry by handle, the versions of a file across snapshots. The chat's
//! `/browse` and `/versions` and the CLI answer from these.
//!
//! A handle is a small number standing for a path of a root (`entry_handles`), for places
//! where a path does not fit (Telegram's callback data holds 64 bytes). It names the same path
//! in every snapshot of the root; which entry it means depends on the snapshot it is used with.

use sqlx::Row;

use super::{
    Catalog, ENTRY_COLUMNS, ENTRY_FROM, EntryKind, EntryRow, SNAPSHOT_COLUMNS, SnapshotInfo, db,
    entry_from_row, kind_no, snapshot_from_row,
};
use crate::error::Error;

const HANDLES: &str = "naming entries for the chat";

/// The recorded handles of `paths` (of root `root_id`), by path.
async fn handles_of(
    conn: &mut super::Conn,
    root_id: i64,
    paths: &[&str],
) -> Result<std::collections::HashMap<String, i64>, Error> {
    let mut out = std::collections::HashMap::with_capacity(paths.len());
    for part in paths.chunks(super::bulk::ROWS) {
        let sql = format!(
            "SELECT path, id FROM entry_handles WHERE root_id = $1 AND path IN ({})",
            super::bulk::marks(2, part.len())
        );
        let mut q = sqlx::query_as::<_, (String, i64)>(sqlx::AssertSqlSafe(sql)).bind(root_id);
        for path in part {
            q = q.bind(*path);
        }
        out.extend(q.fetch_all(&mut *conn).await.map_err(db(HANDLES))?);
    }
    Ok(out)
}

/// One page of a folder's children.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Page {
    /// Folders first, then everything else, each by name.
    pub entries: Vec<EntryRow>,
    /// Children in all.
    pub total: u64,
}

/// One version of an entry: the row that held it and the snapshots it spans.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Version {
    pub entry: EntryRow,
    /// The first snapshot with this version.
    pub first: SnapshotInfo,
    /// The newest snapshot with this version.
    pub last: SnapshotInfo,
}

/// Entries of snapshot `?2` of root `?1` that are direct children of `?3` (`dir/`).
const CHILDREN: &str = "e.root_id = ?1 AND e.from_seq <= ?2 AND (e.to_seq IS NULL OR e.to_seq > ?2) \
     AND e.path >= ?3 AND e.path < ?4 AND substr(e.path, CAST(?5 AS INTEGER)) NOT LIKE '%/%'";

impl Catalog {
    /// Direct children of the folder at entry path `dir` in snapshot `seq` of a root,
    /// `limit` of them from `offset`.
    pub async fn children(
        &self,
        root_id: i64,
        seq: i64,
        dir: &str,
        offset: u64,
        limit: u64,
    ) -> Result<Page, Error> {
        let below = format!("{dir}/");
        // `dir/` .. `dir0` is every path below dir ('0' follows '/'); SQLite's substr counts
        // characters, so the start of the child's name is counted in characters too.
        let end = format!("{dir}0");
        let name_at = dir.chars().count() as i64 + 2;
        let total: i64 = sqlx::query_scalar(crate::catalog::sql(format!(
            "SELECT COUNT(*) FROM entries e WHERE {CHILDREN}"
        )))
        .bind(root_id)
        .bind(seq)
        .bind(&below)
        .bind(&end)
        .bind(name_at)
        .fetch_one(self.pool())
        .await
        .map_err(db("counting a folder's entries"))?;
        let rows = sqlx::query(crate::catalog::sql(format!(
            "SELECT {ENTRY_COLUMNS} FROM {ENTRY_FROM} \
             WHERE {CHILDREN} ORDER BY e.kind <> {DIR}, e.path LIMIT ?6 OFFSET ?7",
            DIR = kind_no(EntryKind::Dir)
        )))
        .bind(root_id)
        .bind(seq)
        .bind(&below)
        .bind(&end)
        .bind(name_at)
        .bind(limit as i64)
        .bind(offset as i64)
        .fetch_all(self.pool())
        .await
        .map_err(db("listing a folder"))?;
        Ok(Page {
            entries: rows.iter().map(entry_from_row).collect(),
            total: total.max(0) as u64,
        })
    }

    /// The handles of `paths` of a root (see the module's doc), made for those that have none.
    pub async fn entry_handles(&self, root_id: i64, paths: &[&str]) -> Result<Vec<i64>, Error> {
        // Read first: a page shown before needs no write, so it doesn't wait for the write
        // lock while a backup commits (a big commit holds it for seconds).
        let mut conn = self.pool().acquire().await.map_err(db(HANDLES))?;
        let mut known = handles_of(&mut conn, root_id, paths).await?;
        drop(conn);
        let mut seen = std::collections::HashSet::new();
        let missing: Vec<&str> = paths
            .iter()
            .copied()
            .filter(|p| !known.contains_key(*p) && seen.insert(*p))
            .collect();
        if !missing.is_empty() {
            let mut tx = super::begin_write(self.pool()).await.map_err(db(HANDLES))?;
            let head = "INSERT INTO entry_handles (root_id, path)";
            let tail = "ON CONFLICT (root_id, path) DO NOTHING";
            super::bulk::insert(&mut tx, (head, 2, tail), &missing, |q, path| {
                q.bind(root_id).bind(*path)
            })
            .await
            .map_err(db(HANDLES))?;
            known.extend(handles_of(&mut tx, root_id, &missing).await?);
            tx.commit().await.map_err(db(HANDLES))?;
        }
        paths
            .iter()
            .map(|p| {
                known
                    .get(*p)
                    .copied()
                    .ok_or_else(|| Error::Invalid(format!("no handle was recorded for {p:?}")))
            })
            .collect()
    }

    /// The entry whose path has handle `handle`, if the path is part of snapshot `seq` of the
    /// root.
    pub async fn entry_in(
        &self,
        root_id: i64,
        seq: i64,
        handle: i64,
    ) -> Result<Option<EntryRow>, Error> {
        let row = sqlx::query(crate::catalog::sql(format!(
            "SELECT {ENTRY_COLUMNS} FROM entry_handles h \
             JOIN entries e ON e.root_id = h.root_id AND e.path = h.path \
             LEFT JOIN contents c ON c.id = e.content_id LEFT JOIN owners o ON o.no = e.owner_no \
             WHERE h.id = ?3 AND h.root_id = ?1 AND e.from_seq <= ?2 \
             AND (e.to_seq IS NULL OR e.to_seq > ?2)"
        )))
        .bind(root_id)
        .bind(seq)
        .bind(handle)
        .fetch_optional(self.pool())
        .await
        .map_err(db("looking up an entry"))?;
        Ok(row.as_ref().map(entry_from_row))
    }

    /// The entry at `path` in snapshot `seq` of the root.
    pub async fn entry_at(
        &self,
        root_id: i64,
        seq: i64,
        path: &str,
    ) -> Result<Option<EntryRow>, Error> {
        let row = sqlx::query(crate::catalog::sql(format!(
            "SELECT {ENTRY_COLUMNS} FROM {ENTRY_FROM} \
             WHERE e.root_id = ?1 AND e.path = ?3 AND e.from_seq <= ?2 \
             AND (e.to_seq IS NULL OR e.to_seq > ?2)"
        )))
        .bind(root_id)
        .bind(seq)
        .bind(path)
        .fetch_optional(self.pool())
        .await
        .map_err(db("looking up an entry"))?;
        Ok(row.as_ref().map(entry_from_row))
    }

    /// Every version of the entry at `path` in a root, newest first. Versions whose
    /// snapshots are all gone are left out.
    pub async fn versions(&self, root_id: i64, path: &str) -> Result<Vec<Version>, Error> {
        let rows = sqlx::query(crate::catalog::sql(format!(
            "SELECT {ENTRY_COLUMNS}, e.from_seq, e.to_seq FROM {ENTRY_FROM} \
             WHERE e.root_id = ? AND e.path = ? ORDER BY e.from_seq DESC"
        )))
        .bind(root_id)
        .bind(path)
        .fetch_all(self.pool())
        .await
        .map_err(db("listing versions"))?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let from: i64 = r.get("from_seq");
            let to: Option<i64> = r.get("to_seq");
            let snaps = sqlx::query(crate::catalog::sql(format!(
                "SELECT {SNAPSHOT_COLUMNS} FROM snapshots s JOIN roots r ON r.id = s.root_id \
                 WHERE s.root_id = ?1 AND s.seq >= ?2 AND (?3 IS NULL OR s.seq < ?3) \
                 ORDER BY s.seq"
            )))
            .bind(root_id)
            .bind(from)
            .bind(to)
            .fetch_all(self.pool())
            .await
            .map_err(db("listing versions"))?;
            if let (Some(first), Some(last)) = (snaps.first(), snaps.last()) {
                out.push(Version {
                    entry: entry_from_row(r),
                    first: snapshot_from_row(first),
                    last: snapshot_from_row(last),
                });
            }
        }
        Ok(out)
    }
}
