//! Retention: forgetting snapshots, and what prune needs (which chunks are live, which packs
//! hold them, condemning and dropping packs, repointing chunks to their new pack).
//!
//! Liveness has one definition here ([`live_chunks`]): a chunk is live when a snapshot in the
//! catalog uses it, as file content (through an entry valid in that snapshot), as a listing
//! chunk or as the snapshot object itself. Every decision to delete is re-checked against it
//! inside the write transaction that records the decision, so a snapshot committed a moment
//! earlier is always seen.

use std::collections::HashSet;

use crate::catalog::Conn;
use sqlx::Row;

use super::{CHUNK_LISTS, Catalog, PackRow, db, now_ms};
use crate::error::Error;
use crate::format::crypto::ChunkId;

/// Ids of the live chunks, as a subquery.
fn live_chunks() -> String {
    format!(
        "SELECT ch.id FROM {CHUNK_LISTS} cc JOIN chunks ch ON ch.no = cc.chunk_no \
         WHERE cc.content_id IN \
         (SELECT e.content_id FROM entries e WHERE e.content_id IS NOT NULL AND EXISTS \
            (SELECT 1 FROM snapshots s WHERE s.root_id = e.root_id AND s.seq >= e.from_seq \
             AND (e.to_seq IS NULL OR s.seq < e.to_seq))) \
         UNION SELECT blob_id FROM snapshots \
         UNION SELECT chunk_id FROM snapshot_listing"
    )
}

/// Points the chunk `$6` at pack number `$1`, offset `$2`, lengths `$3`, `$4` and flags `$5`,
/// if it still lives in pack `$7` (a pack id).
pub(super) fn repoint_sql() -> String {
    format!(
        "UPDATE chunks SET pack_no = $1, \"offset\" = $2, length = $3, raw_length = $4, flags = $5 \
         WHERE {} AND pack_no = (SELECT no FROM packs WHERE id = $7)",
        super::chunk_id_is("id", "$6")
    )
}

/// What a forget removed from the catalog.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ForgetOutcome {
    pub snapshots: u64,
    pub entries: u64,
    pub contents: u64,
}

/// A stored pack and how much of it is live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackUsage {
    pub id: String,
    pub size: u64,
    pub encrypted: bool,
    pub location: String,
    pub created_at: i64,
    /// Blobs the catalog places in this pack.
    pub chunks: u64,
    pub live_chunks: u64,
    /// Sealed bytes of the live blobs.
    pub live_bytes: u64,
    /// Format-1 unencrypted blobs (no MAC): such a pack is never repacked.
    pub unauthenticated: u64,
}

/// Records the listing chunks of a snapshot just inserted (inside its commit).
pub(super) async fn record_listing(
    tx: &mut Conn,
    root_id: i64,
    seq: i64,
    listing: &[ChunkId],
) -> Result<(), Error> {
    let id: i64 = sqlx::query_scalar("SELECT id FROM snapshots WHERE root_id = $1 AND seq = $2")
        .bind(root_id)
        .bind(seq)
        .fetch_one(&mut *tx)
        .await
        .map_err(db("recording a snapshot's listing"))?;
    insert_listing(tx, id, listing).await
}

async fn insert_listing(tx: &mut Conn, snapshot_id: i64, listing: &[ChunkId]) -> Result<(), Error> {
    const WHAT: &str = "recording a snapshot's listing";
    for (i, c) in listing.iter().enumerate() {
        sqlx::query(
            "INSERT INTO snapshot_listing (snapshot_id, seq, chunk_id) VALUES ($1, $2, $3) \
             ON CONFLICT DO NOTHING",
        )
        .bind(snapshot_id)
        .bind(i as i64)
        .bind(&c.0[..])
        .execute(&mut *tx)
        .await
        .map_err(db(WHAT))?;
    }
    sqlx::query("UPDATE snapshots SET listing_known = 1 WHERE id = $1")
        .bind(snapshot_id)
        .execute(&mut *tx)
        .await
        .map_err(db(WHAT))?;
    Ok(())
}

impl Catalog {
    /// Removes snapshots (by short id) of one root from the catalog, with the entries and
    /// contents no remaining snapshot uses, in one transaction. Chunks and packs stay: prune
    /// deletes them. Returns what went.
    pub async fn forget_snapshots(
        &self,
        owner: &str,
        root: &str,
        short_ids: &[String],
    ) -> Result<ForgetOutcome, Error> {
        const WHAT: &str = "forgetting snapshots";
        let mut tx = crate::catalog::begin_write(&self.pool)
            .await
            .map_err(db(WHAT))?;
        let root_id: i64 =
            sqlx::query_scalar("SELECT id FROM roots WHERE owner = $1 AND path = $2")
                .bind(owner)
                .bind(root)
                .fetch_optional(&mut *tx)
                .await
                .map_err(db(WHAT))?
                .ok_or_else(|| Error::NotFound(format!("no backups of {root} (owner {owner})")))?;
        let mut out = ForgetOutcome::default();
        for id in short_ids {
            out.snapshots +=
                sqlx::query("DELETE FROM snapshots WHERE root_id = $1 AND short_id = $2")
                    .bind(root_id)
                    .bind(id)
                    .execute(&mut *tx)
                    .await
                    .map_err(db(WHAT))?
                    .rows_affected();
        }
        // Entry rows valid in no remaining snapshot of the root. (The newest snapshot is
        // only forgotten with everything else, so current rows go only when the root is
        // emptied, and the next backup starts afresh.)
        out.entries = sqlx::query(
            "DELETE FROM entries WHERE root_id = $1 AND NOT EXISTS (SELECT 1 FROM snapshots s \
             WHERE s.root_id = entries.root_id AND s.seq >= entries.from_seq \
             AND (entries.to_seq IS NULL OR s.seq < entries.to_seq))",
        )
        .bind(root_id)
        .execute(&mut *tx)
        .await
        .map_err(db(WHAT))?
        .rows_affected();
        sqlx::query(
            "DELETE FROM content_chunks WHERE content_id NOT IN \
             (SELECT content_id FROM entries WHERE content_id IS NOT NULL)",
        )
        .execute(&mut *tx)
        .await
        .map_err(db(WHAT))?;
        out.contents = sqlx::query(
            "DELETE FROM contents WHERE id NOT IN (SELECT content_id FROM entries WHERE content_id IS NOT NULL)",
        )
        .execute(&mut *tx)
        .await
        .map_err(db(WHAT))?
        .rows_affected();
        tx.commit().await.map_err(db(WHAT))?;
        Ok(out)
    }

    /// Snapshots whose listing chunks are not recorded (committed before they were), as
    /// (snapshot row id, snapshot object id).
    pub async fn snapshots_without_listing(&self) -> Result<Vec<(i64, ChunkId)>, Error> {
        let rows: Vec<(i64, Vec<u8>)> =
            sqlx::query_as("SELECT id, blob_id FROM snapshots WHERE listing_known = 0")
                .fetch_all(&self.pool)
                .await
                .map_err(db("listing snapshots"))?;
        rows.into_iter()
            .map(|(id, b)| Ok((id, ChunkId::from_slice(&b)?)))
            .collect()
    }

    /// Records the listing chunks of an existing snapshot (read from its object).
    pub async fn set_listing(&self, snapshot_id: i64, listing: &[ChunkId]) -> Result<(), Error> {
        let mut tx = self.pool.begin().await.map_err(db("recording a listing"))?;
        insert_listing(&mut tx, snapshot_id, listing).await?;
        tx.commit().await.map_err(db("recording a listing"))
    }

    /// Every stored, not condemned pack created before `before` (Unix ms), with its live
    /// share. Packs created since may belong to a backup that has not committed yet.
    pub async fn pack_usage(&self, before: i64) -> Result<Vec<PackUsage>, Error> {
        let sql = format!(
            "WITH live(id) AS ({}) \
             SELECT p.id, p.size, p.encrypted, p.location, p.created_at, COUNT(c.id), \
             CAST(COALESCE(SUM(CASE WHEN c.id IN (SELECT id FROM live) THEN 1 ELSE 0 END), 0) AS BIGINT), \
             CAST(COALESCE(SUM(CASE WHEN c.id IN (SELECT id FROM live) THEN c.length ELSE 0 END), 0) AS BIGINT), \
             CAST(COALESCE(SUM(CASE WHEN c.flags & 3 = 0 THEN 1 ELSE 0 END), 0) AS BIGINT) \
             FROM packs p LEFT JOIN chunks c ON c.pack_no = p.no \
             WHERE p.state = 'stored' AND p.created_at < ? \
             AND p.id NOT IN (SELECT pack_id FROM condemned_packs) \
             GROUP BY p.no ORDER BY p.created_at, p.id",
            live_chunks()
        );
        let rows = sqlx::query(crate::catalog::sql(sql))
            .bind(before)
            .fetch_all(&self.pool)
            .await
            .map_err(db("measuring packs"))?;
        Ok(rows
            .iter()
            .map(|r| PackUsage {
                id: r.get(0),
                size: r.get::<i64, _>(1) as u64,
                encrypted: super::flag(r, 2),
                location: r.get(3),
                created_at: r.get(4),
                chunks: r.get::<i64, _>(5) as u64,
                live_chunks: r.get::<i64, _>(6) as u64,
                live_bytes: r.get::<i64, _>(7) as u64,
                unauthenticated: r.get::<i64, _>(8) as u64,
            })
            .collect())
    }

    /// The live blobs the catalog places in a pack, in pack order.
    pub async fn live_blobs_in_pack(&self, pack_id: &str) -> Result<Vec<super::BlobRow>, Error> {
        let sql = format!(
            "SELECT id, \"offset\", length, raw_length, kind, flags FROM chunks \
             WHERE pack_no = (SELECT no FROM packs WHERE id = ?) AND id IN ({}) \
             ORDER BY \"offset\"",
            live_chunks()
        );
        let rows = sqlx::query(crate::catalog::sql(sql))
            .bind(pack_id)
            .fetch_all(&self.pool)
            .await
            .map_err(db("listing a pack's live blobs"))?;
        rows.iter().map(super::scrub::blob_from_row).collect()
    }

    /// Points the chunks a repack copied into pack `new` at their new home, each only if it
    /// still lives in the pack it was copied from, in one transaction. `moves` pairs the old
    /// pack of each blob with its entry in the new pack.
    pub async fn repoint_chunks(
        &self,
        new: &str,
        moves: &[(String, crate::format::pack::PackEntry)],
    ) -> Result<(), Error> {
        const WHAT: &str = "repointing repacked chunks";
        let mut tx = crate::catalog::begin_write(&self.pool)
            .await
            .map_err(db(WHAT))?;
        let new_no: i64 = sqlx::query_scalar("SELECT no FROM packs WHERE id = $1")
            .bind(new)
            .fetch_optional(&mut *tx)
            .await
            .map_err(db(WHAT))?
            .ok_or_else(|| Error::Invalid(format!("repacked pack {new} is not in the catalog")))?;
        let sql = repoint_sql();
        for (old, e) in moves {
            sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
                .bind(new_no)
                .bind(e.offset as i64)
                .bind(i64::from(e.length))
                .bind(i64::from(e.raw_length))
                .bind(i64::from(e.flags))
                .bind(&e.id.0[..])
                .bind(old)
                .execute(&mut *tx)
                .await
                .map_err(db(WHAT))?;
        }
        tx.commit().await.map_err(db(WHAT))
    }

    /// Condemns those of `packs` that hold no live chunk now, checked inside the write
    /// transaction that condemns them (so no snapshot committed before it uses them, and the
    /// commit guard refuses any snapshot after it that would). Returns the condemned ones.
    pub async fn condemn_unused_packs(&self, packs: &[String]) -> Result<Vec<String>, Error> {
        const WHAT: &str = "condemning unused packs";
        let mut tx = crate::catalog::begin_write(&self.pool)
            .await
            .map_err(db(WHAT))?;
        // Which of them hold a live chunk: one statement per batch of packs, not per pack
        // (the live set is a pass over the catalog, seconds at a million files).
        let mut holding = HashSet::new();
        for part in packs.chunks(super::bulk::ROWS) {
            let sql = format!(
                "SELECT DISTINCT p.id FROM packs p JOIN chunks c ON c.pack_no = p.no \
                 WHERE p.id IN ({}) AND c.id IN ({})",
                super::bulk::marks(1, part.len()),
                live_chunks()
            );
            let mut q = sqlx::query_scalar::<_, String>(sqlx::AssertSqlSafe(sql));
            for p in part {
                q = q.bind(p);
            }
            holding.extend(q.fetch_all(&mut *tx).await.map_err(db(WHAT))?);
        }
        let mut out = Vec::new();
        for p in packs.iter().filter(|p| !holding.contains(*p)) {
            let stored: i64 =
                sqlx::query_scalar("SELECT COUNT(*) FROM packs WHERE id = $1 AND state = 'stored'")
                    .bind(p)
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(db(WHAT))?;
            if stored == 1 {
                sqlx::query(
                    "INSERT INTO condemned_packs (pack_id, condemned_at) VALUES ($1, $2) \
                     ON CONFLICT DO NOTHING",
                )
                .bind(p)
                .bind(now_ms())
                .execute(&mut *tx)
                .await
                .map_err(db(WHAT))?;
                out.push(p.clone());
            }
        }
        tx.commit().await.map_err(db(WHAT))?;
        Ok(out)
    }

    /// Packs condemned and not yet dropped (a prune deletes them, or finishes the work of one
    /// that died).
    pub async fn condemned_packs(&self) -> Result<Vec<PackRow>, Error> {
        let rows = sqlx::query(
            "SELECT p.id, p.state, p.size, p.encrypted, p.location FROM packs p \
             JOIN condemned_packs k ON k.pack_id = p.id ORDER BY p.id",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(db("listing condemned packs"))?;
        Ok(rows.iter().map(super::packs::pack_from_row).collect())
    }

    /// Forgets a condemned pack whose object is gone from storage: its chunk rows (those
    /// still placed in it), its scrub records and the pack. A chunk list still naming one of
    /// its chunks (which the condemnation rules out) fails it rather than leaving a dangling
    /// reference: the check a foreign key made before migration 0025, once per chunk and by
    /// a scan of every chunk list each time, made once per pack here.
    pub async fn drop_condemned_pack(&self, id: &str) -> Result<(), Error> {
        const WHAT: &str = "dropping a deleted pack";
        let mut tx = crate::catalog::begin_write(&self.pool)
            .await
            .map_err(db(WHAT))?;
        let used: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT COUNT(*) FROM {CHUNK_LISTS} l WHERE l.chunk_no IN \
             (SELECT c.no FROM chunks c JOIN packs p ON p.no = c.pack_no WHERE p.id = $1)"
        )))
        .bind(id)
        .fetch_one(&mut *tx)
        .await
        .map_err(db(WHAT))?;
        if used > 0 {
            drop(tx);
            let paths = self.paths_using_pack(id, 3).await?;
            let names: Vec<&str> = paths.iter().map(|(_, p)| p.as_str()).collect();
            let users = if names.is_empty() {
                String::new()
            } else {
                format!(" (files {})", names.join(", "))
            };
            return Err(Error::Invalid(format!(
                "pack {id} is deleted from storage, but {used} chunk list entr{} of the catalog \
                 still name its chunks{users}: its rows are kept\nhint: back up those folders \
                 again (a backup stores the data of a condemned pack again), then prune",
                if used == 1 { "y" } else { "ies" }
            )));
        }
        for sql in [
            "DELETE FROM damaged_chunks WHERE pack_id = $1",
            "DELETE FROM scrub_packs WHERE pack_id = $1",
            "DELETE FROM chunks WHERE pack_no = (SELECT no FROM packs WHERE id = $1)",
            "DELETE FROM packs WHERE id = $1 AND id IN (SELECT pack_id FROM condemned_packs)",
            "DELETE FROM condemned_packs WHERE pack_id = $1",
        ] {
            sqlx::query(sql)
                .bind(id)
                .execute(&mut *tx)
                .await
                .map_err(db(WHAT))?;
        }
        tx.commit().await.map_err(db(WHAT))
    }
}

impl Catalog {
    /// Short ids and object ids of the snapshots of one root.
    pub async fn snapshot_object_ids(
        &self,
        owner: &str,
        root: &str,
    ) -> Result<Vec<(String, ChunkId)>, Error> {
        let rows: Vec<(String, Vec<u8>)> = sqlx::query_as(
            "SELECT s.short_id, s.blob_id FROM snapshots s JOIN roots r ON r.id = s.root_id \
             WHERE r.owner = $1 AND r.path = $2",
        )
        .bind(owner)
        .bind(root)
        .fetch_all(&self.pool)
        .await
        .map_err(db("listing snapshots"))?;
        rows.into_iter()
            .map(|(s, b)| Ok((s, ChunkId::from_slice(&b)?)))
            .collect()
    }
}

/// One backed-up folder's share of the repository.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RootUsage {
    pub owner: String,
    pub root: String,
    pub snapshots: u64,
    /// Size of the newest snapshot's files.
    pub latest_bytes: u64,
    /// Sum of the file sizes over all its snapshots (what storing each in full would take).
    pub logical_bytes: u64,
    /// Bytes its backups added to storage (new chunks, at the time).
    pub added_bytes: u64,
}

impl Catalog {
    /// Per backed-up folder: snapshots, sizes, and what its backups added.
    pub async fn usage_by_root(&self) -> Result<Vec<RootUsage>, Error> {
        let rows = sqlx::query(
            "SELECT r.owner, r.path, COUNT(s.id), \
             COALESCE((SELECT s2.bytes FROM snapshots s2 WHERE s2.root_id = r.id \
                       ORDER BY s2.seq DESC LIMIT 1), 0), \
             CAST(COALESCE(SUM(s.bytes), 0) AS BIGINT), CAST(COALESCE(SUM(s.bytes_stored), 0) AS BIGINT) \
             FROM roots r LEFT JOIN snapshots s ON s.root_id = r.id \
             GROUP BY r.id ORDER BY r.owner, r.path",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(db("measuring backed-up folders"))?;
        Ok(rows
            .iter()
            .map(|r| RootUsage {
                owner: r.get(0),
                root: r.get(1),
                snapshots: r.get::<i64, _>(2) as u64,
                latest_bytes: r.get::<i64, _>(3) as u64,
                logical_bytes: r.get::<i64, _>(4) as u64,
                added_bytes: r.get::<i64, _>(5) as u64,
            })
            .collect())
    }

    /// Snapshots whose listing chunks are not recorded yet (prune learns them).
    pub async fn snapshots_without_listing_count(&self) -> Result<u64, Error> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM snapshots WHERE listing_known = 0")
            .fetch_one(&self.pool)
            .await
            .map_err(db("counting snapshots"))?;
        Ok(n as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::pack::{BlobKind, FLAG_ENCRYPTED, FLAG_MAC, PackEntry};

    async fn catalog_in(dir: &tempfile::TempDir) -> Catalog {
        let url = storinator_testkit::db::url_for(&dir.path().join("c.db"));
        Catalog::open(&url).await.unwrap()
    }

    /// An authenticated data chunk of id `[n; 32]`, 10 bytes at offset `10 n`.
    fn entry(n: u8) -> PackEntry {
        PackEntry {
            kind: BlobKind::Data,
            flags: FLAG_ENCRYPTED | FLAG_MAC,
            id: ChunkId([n; 32]),
            offset: u64::from(n) * 10,
            length: 10,
            raw_length: 10,
        }
    }

    /// Of several packs, only those holding no live chunk are condemned, checked together: a
    /// chunk is live as a snapshot's object, as a listing chunk or in a content an entry of a
    /// snapshot uses (a one-chunk content, numbered as its chunk, or `content_chunks`).
    #[tokio::test]
    async fn only_packs_without_a_live_chunk_are_condemned() {
        let dir = tempfile::tempdir().unwrap();
        let catalog = catalog_in(&dir).await;
        // p1: the snapshot's object; p2: a one-chunk content's chunk; p3: the second chunk of
        // a two-chunk content (the first is in p2); p4: a content no entry uses; p5: nothing.
        for (pack, n) in [("p1", 1), ("p2", 2), ("p3", 3), ("p4", 4), ("p5", 5)] {
            catalog
                .pack_stored(pack, 100, true, pack, &[entry(n), entry(n + 10)])
                .await
                .unwrap();
        }
        let pool = catalog.pool();
        let no = |n: u8| async move {
            sqlx::query_scalar::<_, i64>("SELECT no FROM chunks WHERE id = $1")
                .bind(&entry(n).id.0[..])
                .fetch_one(pool)
                .await
                .unwrap()
        };
        // A content of one chunk is numbered as its chunk (migration 0027); the list of
        // another (its id below 0) is in `content_chunks`.
        let content = |id: i64| async move {
            sqlx::query(
                "INSERT INTO contents (id, sha256, size, encrypted, key_no) \
                 VALUES ($1, $2, 10, 1, 0)",
            )
            .bind(id)
            .bind(&[id as u8; 32][..])
            .execute(pool)
            .await
            .unwrap();
        };
        let single = no(2).await;
        content(single).await;
        content(-1).await;
        content(no(4).await).await;
        for (seq, n) in [(0, 12), (1, 3)] {
            sqlx::query(
                "INSERT INTO content_chunks (content_id, seq, chunk_no) VALUES (-1, $1, $2)",
            )
            .bind(seq)
            .bind(no(n).await)
            .execute(pool)
            .await
            .unwrap();
        }
        sqlx::query("INSERT INTO roots (owner, path) VALUES ('local', '/r')")
            .execute(pool)
            .await
            .unwrap();
        sqlx::query(
            "INSERT INTO snapshots (root_id, seq, short_id, blob_id, hostname, encrypted, \
             started_at, finished_at, files, dirs, bytes, bytes_read, new_chunks, bytes_stored, \
             warnings) SELECT id, 1, 'abcd', $1, 'h', 1, 0, 0, 2, 0, 20, 20, 0, 0, 0 FROM roots",
        )
        .bind(&entry(1).id.0[..])
        .execute(pool)
        .await
        .unwrap();
        for (path, content) in [("/r/a", single), ("/r/b", -1)] {
            sqlx::query(
                "INSERT INTO entries (root_id, path, kind, size, mtime_ns, mode, inode, content_id, \
                 from_seq) SELECT id, $1, 0, 10, 0, 420, 1, $2, 1 FROM roots",
            )
            .bind(path)
            .bind(content)
            .execute(pool)
            .await
            .unwrap();
        }
        let packs: Vec<String> = ["p1", "p2", "p3", "p4", "p5"].map(String::from).to_vec();
        let condemned = catalog.condemn_unused_packs(&packs).await.unwrap();
        assert_eq!(condemned, ["p4", "p5"]);
        let recorded: Vec<String> =
            sqlx::query_scalar("SELECT pack_id FROM condemned_packs ORDER BY pack_id")
                .fetch_all(pool)
                .await
                .unwrap();
        assert_eq!(recorded, ["p4", "p5"]);
    }

    /// Dropping a condemned pack is refused while a chunk list, of either kind, still names one
    /// of its chunks (what the foreign key on `content_chunks.chunk_no` refused before
    /// migration 0025), and every row stays; once no list names them, the pack goes with its
    /// chunks.
    #[tokio::test]
    async fn a_pack_whose_chunks_a_content_names_is_not_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let catalog = catalog_in(&dir).await;
        catalog
            .pack_stored("p1", 100, true, "l1", &[entry(1), entry(2)])
            .await
            .unwrap();
        let pool = catalog.pool();
        let run = |sql: &'static str| async move {
            sqlx::query(sql).execute(pool).await.unwrap();
        };
        sqlx::query(
            "INSERT INTO contents (id, sha256, size, encrypted, key_no) VALUES (-1, $1, 10, 1, 0)",
        )
        .bind(&[9_u8; 32][..])
        .execute(pool)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO content_chunks (content_id, seq, chunk_no) \
             SELECT -1, 0, no FROM chunks WHERE id = $1",
        )
        .bind(&entry(2).id.0[..])
        .execute(pool)
        .await
        .unwrap();
        run("INSERT INTO condemned_packs (pack_id, condemned_at) VALUES ('p1', 0)").await;
        let count = |sql: &'static str| async move {
            sqlx::query_scalar::<_, i64>(sql)
                .fetch_one(pool)
                .await
                .unwrap()
        };
        let rows = || async {
            (
                count("SELECT COUNT(*) FROM chunks").await,
                count("SELECT COUNT(*) FROM packs WHERE id = 'p1'").await,
                count("SELECT COUNT(*) FROM condemned_packs").await,
            )
        };

        let err = catalog.drop_condemned_pack("p1").await.unwrap_err();
        assert!(matches!(err, Error::Invalid(_)), "{err}");
        assert!(
            err.to_string()
                .starts_with("pack p1 is deleted from storage, but 1 chunk list entry"),
            "{err}"
        );
        assert!(
            err.to_string()
                .contains("\nhint: back up those folders again"),
            "{err}"
        );
        assert_eq!(rows().await, (2, 1, 1));

        // A content of one chunk is numbered as it (migration 0027): the same.
        run("DELETE FROM content_chunks").await;
        sqlx::query("UPDATE contents SET id = (SELECT no FROM chunks WHERE id = $1)")
            .bind(&entry(1).id.0[..])
            .execute(pool)
            .await
            .unwrap();
        let err = catalog.drop_condemned_pack("p1").await.unwrap_err();
        assert!(
            err.to_string().contains(", but 1 chunk list entry"),
            "{err}"
        );
        assert_eq!(rows().await, (2, 1, 1));

        // The content is forgotten: nothing names the pack's chunks any more.
        run("DELETE FROM contents").await;
        catalog.drop_condemned_pack("p1").await.unwrap();
        assert_eq!(rows().await, (0, 0, 0));
    }
}
