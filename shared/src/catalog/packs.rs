//! Packs and the chunks they hold.

use std::collections::{HashMap, HashSet};

use crate::catalog::Conn;
use sqlx::Row;

use super::{
    CHUNK_LISTS, Catalog, ChunkLoc, DAMAGED_CHUNK, Dialect, PREFIX_BYTES, PackRow, USABLE_PACK,
    chunk_id_in, chunk_id_is, db, json_rows, list_chunks_join, now_ms,
};
use crate::error::Error;
use crate::format::crypto::ChunkId;
use crate::format::pack::PackEntry;

impl Catalog {
    /// Records a pack `run_id` is about to upload (before the upload, so that a crash leaves
    /// a row naming the object to reclaim).
    pub async fn pack_uploading(
        &self,
        id: &str,
        size: u64,
        encrypted: bool,
        run_id: &str,
    ) -> Result<(), Error> {
        sqlx::query(
            "INSERT INTO packs (id, state, size, encrypted, created_at, run_id) VALUES ($1, 'uploading', $2, $3, $4, $5)",
        )
        .bind(id)
        .bind(size as i64)
        .bind(i64::from(encrypted))
        .bind(now_ms())
        .bind(run_id)
        .execute(&self.pool)
        .await
        .map_err(db("recording a pack"))?;
        Ok(())
    }

    /// Marks a pack `run_id` uploaded durable in storage and indexes its blobs, in one
    /// transaction. Fenced: if another process reclaimed the pack (it took this run for
    /// dead), nothing is recorded and the run must stop.
    pub async fn pack_uploaded(
        &self,
        run_id: &str,
        id: &str,
        size: u64,
        location: &str,
        entries: &[PackEntry],
    ) -> Result<(), Error> {
        const WHAT: &str = "storing a pack";
        let mut tx = crate::catalog::begin_write(&self.pool)
            .await
            .map_err(db(WHAT))?;
        let no: Option<i64> = sqlx::query_scalar(
            "UPDATE packs SET state = 'stored', size = $1, location = $2, run_id = NULL \
             WHERE id = $3 AND run_id = $4 RETURNING no",
        )
        .bind(size as i64)
        .bind(location)
        .bind(id)
        .bind(run_id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db(WHAT))?;
        let Some(no) = no else {
            return Err(Error::Changed(format!(
                "pack {id} was reclaimed by another process while this run uploaded it"
            )));
        };
        index_blobs(&mut tx, (id, no), entries).await?;
        tx.commit().await.map_err(db(WHAT))?;
        Ok(())
    }

    /// Records a pack found in storage (recover) as stored and indexes its blobs, in one
    /// transaction.
    pub async fn pack_stored(
        &self,
        id: &str,
        size: u64,
        encrypted: bool,
        location: &str,
        entries: &[PackEntry],
    ) -> Result<(), Error> {
        let mut tx = crate::catalog::begin_write(&self.pool)
            .await
            .map_err(db("storing a pack"))?;
        let no: i64 = sqlx::query_scalar(
            "INSERT INTO packs (id, state, size, encrypted, location, created_at) VALUES ($1, 'stored', $2, $3, $4, $5) \
             ON CONFLICT (id) DO UPDATE SET state = 'stored', size = excluded.size, location = excluded.location \
             RETURNING no",
        )
        .bind(id)
        .bind(size as i64)
        .bind(i64::from(encrypted))
        .bind(location)
        .bind(now_ms())
        .fetch_one(&mut *tx)
        .await
        .map_err(db("storing a pack"))?;
        index_blobs(&mut tx, (id, no), entries).await?;
        tx.commit().await.map_err(db("storing a pack"))?;
        Ok(())
    }

    /// Unfinished packs: (pack id, the run uploading or reclaiming it). A row without a run
    /// was left by a version that did not record runs.
    pub async fn unfinished_packs(&self) -> Result<Vec<(String, Option<String>)>, Error> {
        sqlx::query_as("SELECT id, run_id FROM packs WHERE state = 'uploading' ORDER BY id")
            .fetch_all(&self.pool)
            .await
            .map_err(db("listing unfinished packs"))
    }

    /// Hands an unfinished pack from a dead run (`from`) to the reclaiming run `to`, so that
    /// the dead run's `pack_uploaded` can no longer succeed. False if someone else got it.
    pub async fn claim_unfinished_pack(
        &self,
        id: &str,
        from: Option<&str>,
        to: &str,
    ) -> Result<bool, Error> {
        let done = sqlx::query(
            "UPDATE packs SET run_id = $1 WHERE id = $2 AND state = 'uploading' AND run_id IS NOT DISTINCT FROM $3",
        )
        .bind(to)
        .bind(id)
        .bind(from)
        .execute(&self.pool)
        .await
        .map_err(db("reclaiming an unfinished pack"))?;
        Ok(done.rows_affected() == 1)
    }

    /// Forgets an unfinished pack of `run_id` once its object is gone from storage.
    pub async fn forget_unfinished_pack(&self, id: &str, run_id: &str) -> Result<(), Error> {
        sqlx::query(
            "DELETE FROM packs WHERE id = $1 AND run_id = $2 AND state = 'uploading' \
             AND NOT EXISTS (SELECT 1 FROM chunks WHERE pack_no = packs.no)",
        )
        .bind(id)
        .bind(run_id)
        .execute(&self.pool)
        .await
        .map_err(db("forgetting an unfinished pack"))?;
        Ok(())
    }

    /// Forgets a pack that is not being uploaded and holds no chunk the catalog uses (all of
    /// them were stored again elsewhere). True if it was forgotten.
    pub async fn forget_unused_pack(&self, id: &str) -> Result<bool, Error> {
        let done = sqlx::query(
            "DELETE FROM packs WHERE id = $1 AND state <> 'uploading' \
             AND NOT EXISTS (SELECT 1 FROM chunks WHERE pack_no = packs.no)",
        )
        .bind(id)
        .execute(&self.pool)
        .await
        .map_err(db("forgetting a pack"))?;
        Ok(done.rows_affected() == 1)
    }

    pub async fn set_pack_state(&self, id: &str, state: &str) -> Result<(), Error> {
        sqlx::query("UPDATE packs SET state = $1 WHERE id = $2")
            .bind(state)
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(db("updating a pack"))?;
        Ok(())
    }

    /// One pack's row.
    pub async fn pack(&self, id: &str) -> Result<Option<PackRow>, Error> {
        let row =
            sqlx::query("SELECT id, state, size, encrypted, location FROM packs WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await
                .map_err(db("reading a pack"))?;
        Ok(row.as_ref().map(pack_from_row))
    }

    /// Records where a pack's copies are now (a copy healed into a lane). Only a pack still
    /// at `old` is changed: a prune or another heal in between wins.
    pub async fn set_pack_location(&self, id: &str, old: &str, new: &str) -> Result<bool, Error> {
        let done = sqlx::query("UPDATE packs SET location = $1 WHERE id = $2 AND location = $3")
            .bind(new)
            .bind(id)
            .bind(old)
            .execute(&self.pool)
            .await
            .map_err(db("recording a pack's copies"))?;
        Ok(done.rows_affected() == 1)
    }

    pub async fn packs(&self) -> Result<Vec<PackRow>, Error> {
        let rows =
            sqlx::query("SELECT id, state, size, encrypted, location FROM packs ORDER BY id")
                .fetch_all(&self.pool)
                .await
                .map_err(db("listing packs"))?;
        Ok(rows.iter().map(pack_from_row).collect())
    }

    /// Ids of blobs that are safely stored and can be deduplicated against, whose trailer
    /// flags (see `format::pack::FLAG_ENCRYPTED`, `FLAG_MAC`) pass `keep`; a chunk a scrub
    /// found damaged is not: the next backup that meets its data stores it again, which heals
    /// it. Read a page of ids at a time, each page one JSON value (see [`json_rows`]: a row
    /// each through the driver cost a backup more than the rest of its start): only the ids
    /// are held (the backup's dedup index).
    pub async fn stored_chunk_ids(&self, keep: impl Fn(u8) -> bool) -> Result<Vec<ChunkId>, Error> {
        self.stored_chunk_ids_in_pages(keep, CHUNK_PAGE).await
    }

    /// [`Catalog::stored_chunk_ids`], `page` ids per statement (tests use tiny pages).
    async fn stored_chunk_ids_in_pages(
        &self,
        keep: impl Fn(u8) -> bool,
        page_size: usize,
    ) -> Result<Vec<ChunkId>, Error> {
        const WHAT: &str = "loading the chunk index";
        let dialect = Dialect::of(&self.pool);
        let sql = stored_chunks_sql(dialect);
        let mut out = Vec::new();
        let mut after: i64 = 0;
        loop {
            let q = sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
                .bind(after)
                .bind(page_size as i64);
            let page: Vec<(String, i64, i64)> = json_rows::fetch(q, &self.pool, WHAT).await?;
            let bad = |why: String| Error::Invalid(format!("{WHAT}: {why}"));
            let mut last: Option<i64> = None;
            for (hex, flags, no) in &page {
                let id = ChunkId::from_hex(hex).map_err(|e| bad(e.to_string()))?;
                last = last.max(Some(*no));
                if keep(*flags as u8) {
                    out.push(id);
                }
            }
            match last {
                Some(last) if page.len() == page_size => after = last,
                _ => return Ok(out),
            }
        }
    }

    /// Where a blob lives.
    pub async fn chunk(&self, id: &ChunkId) -> Result<Option<ChunkLoc>, Error> {
        let row = sqlx::query(sqlx::AssertSqlSafe(chunk_sql()))
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

    /// The chunk lists (with where each chunk lives) of some contents: a restore asks for one
    /// page of files at a time.
    pub async fn content_chunks_of(
        &self,
        contents: &[i64],
    ) -> Result<HashMap<i64, Vec<ChunkLoc>>, Error> {
        let dialect = Dialect::of(&self.pool);
        let mut out: HashMap<i64, Vec<ChunkLoc>> = HashMap::new();
        for batch in contents.chunks(500) {
            let sql = chunk_lists_sql(dialect, batch.len());
            let mut q = sqlx::query(crate::catalog::sql(sql));
            for id in batch {
                q = q.bind(id);
            }
            type Row = (i64, String, String, String, i64, i64, i64, i64);
            let rows: Vec<Row> = json_rows::fetch(q, &self.pool, "loading chunk lists").await?;
            for (content, id, pack_id, location, offset, length, raw_length, _) in rows {
                out.entry(content).or_default().push(ChunkLoc {
                    id: ChunkId::from_hex(&id)?,
                    pack_id,
                    location,
                    offset: offset as u64,
                    length: length as u64,
                    raw_length: raw_length as u64,
                });
            }
        }
        Ok(out)
    }

    /// How many packs hold the chunks of the files of snapshot `seq` of a root at `prefix` or
    /// below it (a restore's transfer estimate).
    pub async fn packs_under(&self, root_id: i64, seq: i64, prefix: &str) -> Result<u64, Error> {
        let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT COUNT(DISTINCT c.pack_no) FROM entries e JOIN contents k ON k.id = e.content_id \
             {} WHERE e.root_id = $1 AND e.from_seq <= $2 AND (e.to_seq IS NULL OR e.to_seq > $3) \
             AND (e.path = $4 OR (e.path >= $5 AND e.path < $6))",
            list_chunks_join("k", "", "c")
        )))
        .bind(root_id)
        .bind(seq)
        .bind(seq)
        .bind(prefix)
        .bind(format!("{prefix}/"))
        .bind(format!("{prefix}0"))
        .fetch_one(&self.pool)
        .await
        .map_err(db("counting packs"))?;
        Ok(n as u64)
    }

    /// Entries (in any snapshot) whose content uses a chunk of `pack_id`: what a lost pack costs.
    pub async fn paths_using_pack(
        &self,
        pack_id: &str,
        limit: i64,
    ) -> Result<Vec<(String, String)>, Error> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT DISTINCT r.path, e.path FROM entries e JOIN roots r ON r.id = e.root_id \
             WHERE e.content_id IN (SELECT l.content_id FROM {CHUNK_LISTS} l WHERE l.chunk_no IN \
             (SELECT c.no FROM chunks c WHERE c.pack_no = (SELECT no FROM packs WHERE id = $1))) \
             ORDER BY e.path LIMIT $2"
        )))
        .bind(pack_id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(db("finding files in a pack"))?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// For each of `ids`: the files (root, path, in any snapshot) whose content uses it, and
    /// the snapshots (root, short id) whose object it is. What a damaged chunk costs, exactly.
    pub async fn users_of_chunks(
        &self,
        ids: &[ChunkId],
    ) -> Result<HashMap<ChunkId, Vec<(String, String)>>, Error> {
        let mut out: HashMap<ChunkId, Vec<(String, String)>> = HashMap::new();
        for batch in ids.chunks(400) {
            let mut q = sqlx::query(crate::catalog::sql(users_of_chunks_sql(batch.len())));
            // The prefixes first, for `chunks_by_id` (migration 0023), then the ids twice.
            for id in batch {
                q = q.bind(&id.0[..PREFIX_BYTES]);
            }
            for _ in 0..2 {
                for id in batch {
                    q = q.bind(&id.0[..]);
                }
            }
            let rows = q
                .fetch_all(&self.pool)
                .await
                .map_err(db("finding the files of damaged chunks"))?;
            for r in &rows {
                let id: Vec<u8> = r.get(0);
                out.entry(ChunkId::from_slice(&id)?)
                    .or_default()
                    .push((r.get(1), r.get(2)));
            }
        }
        Ok(out)
    }

    /// The blobs the catalog places in a pack, as (id, offset, sealed length).
    pub async fn blobs_in_pack(&self, pack_id: &str) -> Result<Vec<(Vec<u8>, i64, i64)>, Error> {
        sqlx::query_as(
            "SELECT id, \"offset\", length FROM chunks WHERE pack_no = (SELECT no FROM packs WHERE id = $1)",
        )
            .bind(pack_id)
            .fetch_all(&self.pool)
            .await
            .map_err(db("listing a pack's blobs"))
    }
}

/// The chunk lists of `n` contents (bound), each chunk with where it lives, as one JSON
/// value ([`json_rows`]).
pub(super) fn chunk_lists_sql(dialect: Dialect, n: usize) -> String {
    let marks = vec!["?"; n].join(", ");
    let inner = format!(
        "SELECT k.id AS c0, {} AS c1, p.id AS c2, p.location AS c3, \
         c.\"offset\" AS c4, c.length AS c5, c.raw_length AS c6, COALESCE(cc.seq, 0) AS c7 \
         FROM contents k {} JOIN packs p ON p.no = c.pack_no \
         WHERE k.id IN ({marks})",
        json_rows::hex(dialect, "c.id"),
        list_chunks_join("k", "", "c")
    );
    json_rows::statement(dialect, &inner, 8, "s.c0, s.c7")
}

/// Where the chunk `$1` lives: its pack's id and location, its offset and lengths.
pub(super) fn chunk_sql() -> String {
    format!(
        "SELECT p.id, p.location, c.\"offset\", c.length, c.raw_length FROM chunks c \
         JOIN packs p ON p.no = c.pack_no WHERE {}",
        chunk_id_is("c.id", "$1")
    )
}

/// The files and snapshots using any of `n` chunks: bind their prefixes, then their ids
/// twice.
pub(super) fn users_of_chunks_sql(n: usize) -> String {
    let marks = vec!["?"; n].join(", ");
    let prefix = super::prefix_of("c.id");
    format!(
        "SELECT DISTINCT c.id, r.path, e.path FROM {CHUNK_LISTS} cc \
         JOIN chunks c ON c.no = cc.chunk_no JOIN entries e ON e.content_id = cc.content_id \
         JOIN roots r ON r.id = e.root_id \
         WHERE {prefix} IN ({marks}) AND c.id IN ({marks}) \
         UNION SELECT s.blob_id, r.path, 'snapshot ' || s.short_id FROM snapshots s \
         JOIN roots r ON r.id = s.root_id WHERE s.blob_id IN ({marks}) ORDER BY 2, 3"
    )
}

/// Indexes the blobs of a stored pack. A chunk that already lives in another (stored) pack
/// keeps its first home; one in a pack known to be missing, or found damaged by a scrub, moves
/// here, and so does a format-1 unencrypted one (no MAC, flags 0) when this copy is
/// authenticated. Damaged chunks that now live here are healed.
///
/// Never two rows for one id (no unique constraint says so since migration 0023): the rows the
/// ids have are looked up first, inside the caller's write transaction, which no other writer
/// shares (SQLite's write lock, PostgreSQL's advisory write lock).
async fn index_blobs(
    tx: &mut Conn,
    (pack_id, pack_no): (&str, i64),
    entries: &[PackEntry],
) -> Result<(), Error> {
    const WHAT: &str = "indexing a pack";
    // A repeated blob adds nothing: its first copy is the one indexed, as row by row.
    let mut seen = HashSet::new();
    let unique: Vec<&PackEntry> = entries.iter().filter(|e| seen.insert(e.id)).collect();
    let homes = chunk_homes(tx, &unique).await?;
    let mut new = Vec::new();
    for e in unique {
        match homes.get(&e.id) {
            None => new.push(e),
            Some(home) if home.unusable || (home.flags & 3 == 0 && e.flags & 3 != 0) => {
                sqlx::query(
                    "UPDATE chunks SET pack_no = $1, \"offset\" = $2, length = $3, raw_length = $4, \
                     flags = $5 WHERE no = $6",
                )
                .bind(pack_no)
                .bind(e.offset as i64)
                .bind(i64::from(e.length))
                .bind(i64::from(e.raw_length))
                .bind(i64::from(e.flags))
                .bind(home.no)
                .execute(&mut *tx)
                .await
                .map_err(db(WHAT))?;
            }
            Some(_) => {}
        }
    }
    let head = "INSERT INTO chunks (id, pack_no, \"offset\", length, raw_length, kind, flags)";
    super::bulk::insert(tx, (head, 7, ""), &new, |q, e| {
        q.bind(&e.id.0[..])
            .bind(pack_no)
            .bind(e.offset as i64)
            .bind(i64::from(e.length))
            .bind(i64::from(e.raw_length))
            .bind(e.kind as u8 as i64)
            .bind(i64::from(e.flags))
    })
    .await
    .map_err(db(WHAT))?;
    sqlx::query(
        "UPDATE damaged_chunks SET healed_at = $1, healed_pack = $2 \
         WHERE healed_at IS NULL AND chunk_id IN (SELECT id FROM chunks WHERE pack_no = $3)",
    )
    .bind(now_ms())
    .bind(pack_id)
    .bind(pack_no)
    .execute(&mut *tx)
    .await
    .map_err(db("recording healed chunks"))?;
    Ok(())
}

/// Where a chunk the catalog has lives: its row's number, its flags, and whether its copy is
/// unusable (its pack missing or condemned, or the copy found damaged and not healed).
struct ChunkHome {
    no: i64,
    flags: u8,
    unusable: bool,
}

/// The rows of those of `entries` the catalog has, by id.
async fn chunk_homes(
    tx: &mut Conn,
    entries: &[&PackEntry],
) -> Result<HashMap<ChunkId, ChunkHome>, Error> {
    let mut out = HashMap::with_capacity(entries.len());
    for part in entries.chunks(super::bulk::ROWS) {
        let sql = chunk_homes_sql(Dialect::of_conn(tx), part.len());
        let mut q = sqlx::query_as::<_, (Vec<u8>, i64, i64, i64)>(sqlx::AssertSqlSafe(sql));
        for e in part {
            q = q.bind(&e.id.0[..PREFIX_BYTES]);
        }
        for e in part {
            q = q.bind(&e.id.0[..]);
        }
        for (id, no, flags, unusable) in
            q.fetch_all(&mut *tx).await.map_err(db("indexing a pack"))?
        {
            let home = ChunkHome {
                no,
                flags: flags as u8,
                unusable: unusable != 0,
            };
            out.insert(ChunkId::from_slice(&id)?, home);
        }
    }
    Ok(out)
}

/// The (id, number, flags, unusable) of those of `n` chunks (bound as [`chunk_id_in`] says)
/// that have a row.
pub(super) fn chunk_homes_sql(dialect: Dialect, n: usize) -> String {
    format!(
        "SELECT c.id, c.no, c.flags, CASE WHEN EXISTS \
           (SELECT 1 FROM packs p WHERE p.no = c.pack_no AND {USABLE_PACK}) \
         AND NOT EXISTS (SELECT 1 FROM damaged_chunks d JOIN packs dp ON dp.id = d.pack_id \
           WHERE d.chunk_id = c.id AND dp.no = c.pack_no AND d.healed_at IS NULL) \
         THEN 0 ELSE 1 END FROM chunks c WHERE {}",
        chunk_id_in(dialect, "c.id", n)
    )
}

/// The columns `id, state, size, encrypted, location` of a `packs` row.
pub(super) fn pack_from_row(r: &crate::catalog::DbRow) -> PackRow {
    PackRow {
        id: r.get(0),
        state: r.get(1),
        size: r.get::<i64, _>(2) as u64,
        encrypted: super::flag(r, 3),
        location: r.get(4),
    }
}

/// Chunk ids per page of [`Catalog::stored_chunk_ids`]: about 5 MB of JSON.
const CHUNK_PAGE: usize = 65_536;

/// The usable chunks numbered after `$1` (in number order, the chunks' primary key: one walk
/// of the table, in the order the rows are stored), at most `$2` of them, as JSON triples of
/// hex id, flags and number (in no particular order: the reader finds the page's last number
/// itself).
fn stored_chunks_sql(dialect: Dialect) -> String {
    let inner = format!(
        "SELECT {} AS c0, c.flags AS c1, c.no AS c2 FROM chunks c JOIN packs p ON p.no = c.pack_no \
         WHERE c.no > $1 AND {USABLE_PACK} \
         AND NOT EXISTS (SELECT 1 FROM damaged_chunks d WHERE d.chunk_id = c.id AND {DAMAGED_CHUNK}) \
         ORDER BY c.no LIMIT $2",
        json_rows::hex(dialect, "c.id")
    );
    json_rows::statement(dialect, &inner, 3, "")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::pack::{BlobKind, FLAG_ENCRYPTED, FLAG_MAC};

    fn entry(n: u8, flags: u8) -> PackEntry {
        PackEntry {
            kind: BlobKind::Data,
            flags,
            id: ChunkId([n; 32]),
            offset: u64::from(n) * 10,
            length: 10,
            raw_length: 10,
        }
    }

    /// Chunks whose ids share their first bytes (what `chunks_by_id` indexes, migration
    /// 0023) are told apart by every lookup, and indexing a chunk again never adds a second
    /// row for its id: a second copy in a stored pack leaves the first home, a copy indexed
    /// after its pack went missing moves the row (keeping its number).
    #[tokio::test]
    async fn chunks_sharing_a_prefix_are_told_apart_and_each_has_one_row() {
        let dir = tempfile::tempdir().unwrap();
        let url = storinator_testkit::db::url_for(&dir.path().join("c.db"));
        let catalog = Catalog::open(&url).await.unwrap();
        let twin = |last: u8, offset: u64| {
            let mut id = [7_u8; 32];
            id[31] = last;
            PackEntry {
                id: ChunkId(id),
                offset,
                ..entry(1, FLAG_ENCRYPTED)
            }
        };
        let (a, b) = (twin(1, 0), twin(2, 100));
        catalog
            .pack_stored("p1", 1000, true, "l1", &[a.clone(), b.clone()])
            .await
            .unwrap();
        let rows = || async {
            let mut rows: Vec<(Vec<u8>, i64, i64)> =
                sqlx::query_as("SELECT id, no, \"offset\" FROM chunks")
                    .fetch_all(catalog.pool())
                    .await
                    .unwrap();
            rows.sort();
            rows
        };
        let first = rows().await;
        assert_eq!(first.len(), 2);
        let place = |id: ChunkId| {
            let catalog = &catalog;
            async move {
                catalog
                    .chunk(&id)
                    .await
                    .unwrap()
                    .map(|l| (l.pack_id, l.offset))
            }
        };
        assert_eq!(place(a.id).await, Some(("p1".to_string(), 0)));
        assert_eq!(place(b.id).await, Some(("p1".to_string(), 100)));
        assert_eq!(
            place(twin(3, 0).id).await,
            None,
            "a third id of the same prefix"
        );

        // A second copy of `a` in another stored pack: `a` stays where it is.
        let a_again = PackEntry {
            offset: 40,
            ..a.clone()
        };
        catalog
            .pack_stored("p2", 1000, true, "l2", &[a_again.clone(), twin(4, 60)])
            .await
            .unwrap();
        let second = rows().await;
        assert_eq!(second.len(), 3);
        assert_eq!(place(a.id).await, Some(("p1".to_string(), 0)));
        assert_eq!(place(twin(4, 0).id).await, Some(("p2".to_string(), 60)));

        // p1 goes missing: a copy indexed now moves `a` and `b` there, numbers kept.
        catalog.set_pack_state("p1", "missing").await.unwrap();
        let b_again = PackEntry {
            offset: 80,
            ..b.clone()
        };
        catalog
            .pack_stored("p3", 1000, true, "l3", &[a_again, b_again, twin(1, 999)])
            .await
            .unwrap();
        assert_eq!(place(a.id).await, Some(("p3".to_string(), 40)));
        assert_eq!(place(b.id).await, Some(("p3".to_string(), 80)));
        let third = rows().await;
        assert_eq!(third.len(), 3, "{third:?}");
        let numbers = |rows: &[(Vec<u8>, i64, i64)]| -> Vec<(Vec<u8>, i64)> {
            rows.iter().map(|(id, no, _)| (id.clone(), *no)).collect()
        };
        assert_eq!(numbers(&third), numbers(&second));
        let mut ids = catalog.stored_chunk_ids(|_| true).await.unwrap();
        ids.sort();
        assert_eq!(ids, vec![a.id, b.id, twin(4, 0).id]);
    }

    /// Page after page, every usable chunk exactly once: not those of a missing pack, not a
    /// damaged one, only those whose flags pass.
    #[tokio::test]
    async fn the_chunk_index_comes_page_by_page_without_the_unusable_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let url = storinator_testkit::db::url_for(&dir.path().join("c.db"));
        let catalog = Catalog::open(&url).await.unwrap();
        let enc = FLAG_ENCRYPTED;
        let stored: Vec<PackEntry> = (1..=9)
            .map(|n| entry(n * 20, if n == 4 { FLAG_MAC } else { enc }))
            .collect();
        catalog
            .pack_stored("p1", 1000, true, "l1", &stored)
            .await
            .unwrap();
        let lost = [entry(50, enc), entry(255, enc)];
        catalog
            .pack_stored("p2", 100, true, "l2", &lost)
            .await
            .unwrap();
        catalog.set_pack_state("p2", "missing").await.unwrap();
        sqlx::query(
            "INSERT INTO damaged_chunks (chunk_id, pack_id, reason, found_at) VALUES ($1, 'p1', 'test', 1)",
        )
        .bind(&[140_u8; 32][..])
        .execute(catalog.pool())
        .await
        .unwrap();
        let want: Vec<ChunkId> = [20, 40, 60, 100, 120, 160, 180]
            .map(|n| ChunkId([n; 32]))
            .to_vec();
        for page in [1, 2, 3, 7, 8, 1000] {
            let mut got = catalog
                .stored_chunk_ids_in_pages(|f| f & FLAG_ENCRYPTED != 0, page)
                .await
                .unwrap();
            got.sort();
            assert_eq!(got, want, "pages of {page}");
        }
    }
}
