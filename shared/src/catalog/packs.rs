//! Packs and the chunks they hold.

use std::collections::{HashMap, HashSet};

use crate::catalog::Conn;
use sqlx::Row;

use super::{
    Catalog, ChunkLoc, DAMAGED_CHUNK, Dialect, PackRow, USABLE_PACK, db, json_rows, now_ms,
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
        let mut after: Vec<u8> = Vec::new();
        loop {
            let q = sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
                .bind(after.clone())
                .bind(page_size as i64);
            let page: Vec<(String, i64)> = json_rows::fetch(q, &self.pool, WHAT).await?;
            let bad = |why: String| Error::Invalid(format!("{WHAT}: {why}"));
            let mut last: Option<ChunkId> = None;
            for (hex, flags) in &page {
                let id = ChunkId::from_hex(hex).map_err(|e| bad(e.to_string()))?;
                last = last.max(Some(id));
                if keep(*flags as u8) {
                    out.push(id);
                }
            }
            match last {
                Some(last) if page.len() == page_size => after = last.0.to_vec(),
                _ => return Ok(out),
            }
        }
    }

    /// Where a blob lives.
    pub async fn chunk(&self, id: &ChunkId) -> Result<Option<ChunkLoc>, Error> {
        let row = sqlx::query(
            "SELECT p.id, p.location, c.\"offset\", c.length, c.raw_length FROM chunks c \
             JOIN packs p ON p.no = c.pack_no WHERE c.id = $1",
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

    /// The chunk lists (with where each chunk lives) of some contents: a restore asks for one
    /// page of files at a time.
    pub async fn content_chunks_of(
        &self,
        contents: &[i64],
    ) -> Result<HashMap<i64, Vec<ChunkLoc>>, Error> {
        let dialect = Dialect::of(&self.pool);
        let id = json_rows::hex(dialect, "c.id");
        let mut out: HashMap<i64, Vec<ChunkLoc>> = HashMap::new();
        for batch in contents.chunks(500) {
            let marks = vec!["?"; batch.len()].join(", ");
            let inner = format!(
                "SELECT cc.content_id AS c0, {id} AS c1, p.id AS c2, p.location AS c3, \
                 c.\"offset\" AS c4, c.length AS c5, c.raw_length AS c6, cc.seq AS c7 \
                 FROM content_chunks cc JOIN chunks c ON c.no = cc.chunk_no JOIN packs p ON p.no = c.pack_no \
                 WHERE cc.content_id IN ({marks})"
            );
            let sql = json_rows::statement(dialect, &inner, 8, "s.c0, s.c7");
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
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(DISTINCT c.pack_no) FROM entries e \
             JOIN content_chunks cc ON cc.content_id = e.content_id JOIN chunks c ON c.no = cc.chunk_no \
             WHERE e.root_id = $1 AND e.from_seq <= $2 AND (e.to_seq IS NULL OR e.to_seq > $3) \
             AND (e.path = $4 OR (e.path >= $5 AND e.path < $6))",
        )
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
        let rows = sqlx::query(
            "SELECT DISTINCT r.path, e.path FROM entries e JOIN roots r ON r.id = e.root_id \
             WHERE e.content_id IN (SELECT cc.content_id FROM content_chunks cc JOIN chunks c ON c.no = cc.chunk_no \
             WHERE c.pack_no = (SELECT no FROM packs WHERE id = $1)) ORDER BY e.path LIMIT $2",
        )
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
            let marks = vec!["?"; batch.len()].join(", ");
            let sql = format!(
                "SELECT DISTINCT c.id, r.path, e.path FROM content_chunks cc \
                 JOIN chunks c ON c.no = cc.chunk_no JOIN entries e ON e.content_id = cc.content_id JOIN roots r ON r.id = e.root_id \
                 WHERE c.id IN ({marks}) \
                 UNION SELECT s.blob_id, r.path, 'snapshot ' || s.short_id FROM snapshots s \
                 JOIN roots r ON r.id = s.root_id WHERE s.blob_id IN ({marks}) ORDER BY 2, 3"
            );
            let mut q = sqlx::query(crate::catalog::sql(sql));
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

/// Indexes the blobs of a stored pack. A chunk that already lives in another (stored) pack
/// keeps its first home; one in a pack known to be missing, or found damaged by a scrub, moves
/// here, and so does a format-1 unencrypted one (no MAC, flags 0) when this copy is
/// authenticated. Damaged chunks that now live here are healed.
async fn index_blobs(
    tx: &mut Conn,
    (pack_id, pack_no): (&str, i64),
    entries: &[PackEntry],
) -> Result<(), Error> {
    // A chunk whose pack is no longer usable (missing, or condemned by prune) moves here too.
    let tail = format!(
        "ON CONFLICT (id) DO UPDATE SET pack_no = excluded.pack_no, \"offset\" = excluded.\"offset\", \
         length = excluded.length, raw_length = excluded.raw_length, flags = excluded.flags \
         WHERE NOT EXISTS (SELECT 1 FROM packs p WHERE p.no = chunks.pack_no AND {USABLE_PACK}) \
         OR (chunks.flags & 3 = 0 AND excluded.flags & 3 <> 0) \
         OR EXISTS (SELECT 1 FROM damaged_chunks d JOIN packs dp ON dp.id = d.pack_id \
                    WHERE d.chunk_id = chunks.id AND dp.no = chunks.pack_no AND d.healed_at IS NULL)"
    );
    // One row per id and statement (PostgreSQL refuses to update a row twice in one): a
    // repeated blob adds nothing, its first copy is the one indexed, as row by row.
    let mut seen = HashSet::new();
    let unique: Vec<&PackEntry> = entries.iter().filter(|e| seen.insert(e.id)).collect();
    let head = "INSERT INTO chunks (id, pack_no, \"offset\", length, raw_length, kind, flags)";
    super::bulk::insert(tx, (head, 7, &tail), &unique, |q, e| {
        q.bind(&e.id.0[..])
            .bind(pack_no)
            .bind(e.offset as i64)
            .bind(i64::from(e.length))
            .bind(i64::from(e.raw_length))
            .bind(e.kind as u8 as i64)
            .bind(i64::from(e.flags))
    })
    .await
    .map_err(db("indexing a pack"))?;
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

/// The usable chunks after the id `$1` (in id order, the chunks' primary key), at most `$2`
/// of them, as JSON pairs of hex id and flags (in no particular order: the reader finds the
/// page's last id itself).
fn stored_chunks_sql(dialect: Dialect) -> String {
    let inner = format!(
        "SELECT {} AS c0, c.flags AS c1 FROM chunks c JOIN packs p ON p.no = c.pack_no \
         WHERE c.id > $1 AND {USABLE_PACK} \
         AND NOT EXISTS (SELECT 1 FROM damaged_chunks d WHERE d.chunk_id = c.id AND {DAMAGED_CHUNK}) \
         ORDER BY c.id LIMIT $2",
        json_rows::hex(dialect, "c.id")
    );
    json_rows::statement(dialect, &inner, 2, "")
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
