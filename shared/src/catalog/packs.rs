//! Packs and the chunks they hold.

use std::collections::HashMap;

use sqlx::Row;

use super::{Catalog, ChunkLoc, PackRow, db, now_ms};
use crate::error::Error;
use crate::format::crypto::ChunkId;
use crate::format::pack::PackEntry;

impl Catalog {
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
            // in a pack known to be missing, or found damaged by a scrub, moves here, and so
            // does a format-1 unencrypted one (no MAC, flags 0) when this copy is authenticated.
            sqlx::query(
                "INSERT INTO chunks (id, pack_id, offset, length, raw_length, kind, flags) VALUES (?, ?, ?, ?, ?, ?, ?) \
                 ON CONFLICT (id) DO UPDATE SET pack_id = excluded.pack_id, offset = excluded.offset, \
                 length = excluded.length, raw_length = excluded.raw_length, flags = excluded.flags \
                 WHERE (SELECT state FROM packs WHERE id = chunks.pack_id) <> 'stored' \
                 OR (chunks.flags & 3 = 0 AND excluded.flags & 3 <> 0) \
                 OR EXISTS (SELECT 1 FROM damaged_chunks d WHERE d.chunk_id = chunks.id \
                            AND d.pack_id = chunks.pack_id AND d.healed_at IS NULL)",
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
        // Damaged chunks that now live here are healed.
        sqlx::query(
            "UPDATE damaged_chunks SET healed_at = ?, healed_pack = ? \
             WHERE healed_at IS NULL AND chunk_id IN (SELECT id FROM chunks WHERE pack_id = ?)",
        )
        .bind(now_ms())
        .bind(id)
        .bind(id)
        .execute(&mut *tx)
        .await
        .map_err(db("recording healed chunks"))?;
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
    /// trailer flags (see `format::pack::FLAG_ENCRYPTED`, `FLAG_MAC`); a chunk a scrub found
    /// damaged is not: the next backup that meets its data stores it again, which heals it.
    pub async fn stored_chunk_ids(&self) -> Result<Vec<(ChunkId, u8)>, Error> {
        let rows = sqlx::query(
            "SELECT c.id, c.flags FROM chunks c JOIN packs p ON p.id = c.pack_id WHERE p.state = 'stored' \
             AND NOT EXISTS (SELECT 1 FROM damaged_chunks d WHERE d.chunk_id = c.id \
                             AND d.pack_id = c.pack_id AND d.healed_at IS NULL)",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(db("loading the chunk index"))?;
        rows.iter()
            .map(|r| {
                let id: Vec<u8> = r.get(0);
                let flags: i64 = r.get(1);
                Ok((ChunkId::from_slice(&id)?, flags as u8))
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

    /// The blobs the catalog places in a pack, as (id, offset, sealed length).
    pub async fn blobs_in_pack(&self, pack_id: &str) -> Result<Vec<(Vec<u8>, i64, i64)>, Error> {
        sqlx::query_as("SELECT id, offset, length FROM chunks WHERE pack_id = ?")
            .bind(pack_id)
            .fetch_all(&self.pool)
            .await
            .map_err(db("listing a pack's blobs"))
    }
}
