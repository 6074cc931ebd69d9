//! What the scrub, the alerts and the digest read and write: the scrub's rotation over packs,
//! damaged chunks and what they affect, scrub reports, and a few per-owner snapshot figures.

use serde::{Deserialize, Serialize};
use sqlx::Row;

use super::{CHUNK_LISTS, Catalog, db};
use crate::error::Error;
use crate::format::crypto::ChunkId;

/// A pack in the scrub's rotation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScrubPack {
    pub id: String,
    pub size: u64,
    pub state: String,
    pub location: String,
    /// When the pack was last read whole (`None`: never).
    pub last_read_at: Option<i64>,
    /// Where an unfinished pass stopped (offset of the next blob to read); 0: none.
    pub cursor: u64,
}

/// A blob as the catalog places it in a pack.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobRow {
    pub id: ChunkId,
    pub offset: u64,
    pub length: u64,
    pub raw_length: u64,
    pub kind: u8,
    pub flags: u8,
}

/// The columns `id, offset, length, raw_length, kind, flags` of a `chunks` row.
pub(super) fn blob_from_row(r: &crate::catalog::DbRow) -> Result<BlobRow, Error> {
    Ok(BlobRow {
        id: ChunkId::from_slice(&r.get::<Vec<u8>, _>(0))?,
        offset: r.get::<i64, _>(1) as u64,
        length: r.get::<i64, _>(2) as u64,
        raw_length: r.get::<i64, _>(3) as u64,
        kind: r.get::<i64, _>(4) as u8,
        flags: r.get::<i64, _>(5) as u8,
    })
}

/// A chunk the scrub found damaged and no heal or backup has stored again yet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Damage {
    pub chunk_id: ChunkId,
    pub pack_id: String,
    pub reason: String,
    pub kind: u8,
    pub flags: u8,
    pub raw_length: u64,
}

/// A file whose content uses a damaged chunk, with the snapshots it is in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AffectedFile {
    pub owner: String,
    /// The backed-up folder (`/srv/data`).
    pub root: String,
    /// The path as stored (`data/photos/a.jpg`).
    pub path: String,
    /// Short ids of the snapshots that hold this version of the file.
    pub snapshots: Vec<String>,
    /// True once every damaged chunk of the file was stored again.
    pub healed: bool,
    /// Why it could not be healed (when not healed).
    #[serde(default)]
    pub why: Option<String>,
}

impl AffectedFile {
    /// `/srv/data/photos/a.jpg`: where the file lives on disk (the stored path starts with the
    /// root folder's own name).
    pub fn disk_path(&self) -> String {
        let parent = self.root.rsplit_once('/').map(|(p, _)| p).unwrap_or("");
        format!("{parent}/{}", self.path)
    }
}

/// A pack-level finding of a scrub: damage not known before this run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackFinding {
    pub pack_id: String,
    pub reason: String,
    /// Chunks of the pack the finding covers.
    pub chunks: u64,
}

/// What a scrub run did and found. Stored as JSON in `scrub_runs.report`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScrubReport {
    pub started_at: i64,
    pub finished_at: i64,
    /// The run's read budget in bytes.
    pub budget: u64,
    pub bytes_read: u64,
    /// Packs (and their bytes) the catalog holds as stored or missing.
    pub packs_total: u64,
    pub bytes_total: u64,
    /// Packs found in storage with the right size by the daily presence check.
    pub packs_present: u64,
    /// Packs whose read pass this run completed.
    pub packs_read: u64,
    pub chunks_checked: u64,
    /// Days the rotation takes to read every pack at this budget.
    pub cycle_days: u64,
    /// Packs never read whole yet, and the oldest last-read time among the others.
    pub never_read: u64,
    pub oldest_read_at: Option<i64>,
    pub findings: Vec<PackFinding>,
    /// Files affected by damaged chunks (this run's and earlier unhealed ones).
    pub affected: Vec<AffectedFile>,
    /// Damaged snapshot metadata (listings, snapshot objects), which a heal can't rebuild.
    pub metadata: Vec<String>,
    /// Chunks stored again from files on disk, and chunks still damaged after the run.
    pub healed_chunks: u64,
    pub unhealed_chunks: u64,
    /// Packs written by the heal.
    pub heal_packs: u64,
    /// Copies (in lanes) found missing or damaged, each healed from another copy or not.
    #[serde(default)]
    pub copies: Vec<String>,
}

impl ScrubReport {
    /// True when nothing is damaged (or all of it was healed).
    pub fn is_clean(&self) -> bool {
        self.unhealed_chunks == 0
    }

    /// One line for people: `read 1.0 GiB (12 packs, 9 812 chunks), cycle 14 days: no damage`.
    pub fn line(&self) -> String {
        let damage = if self.findings.is_empty() && self.unhealed_chunks == 0 {
            "no damage".to_string()
        } else if self.unhealed_chunks == 0 {
            format!("damage found and healed ({} chunks)", self.healed_chunks)
        } else {
            format!(
                "{} damaged chunks ({} healed, {} could not be healed)",
                self.healed_chunks + self.unhealed_chunks,
                self.healed_chunks,
                self.unhealed_chunks
            )
        };
        let copies = match self.copies.len() {
            0 => String::new(),
            n => format!("; {n} pack copies failed in a lane (see the report)"),
        };
        format!(
            "read {} ({} chunks, {} packs finished), {} of {} packs present; cycle {} day{}: {damage}{copies}",
            crate::progress::human_bytes(self.bytes_read),
            self.chunks_checked,
            self.packs_read,
            self.packs_present,
            self.packs_total,
            self.cycle_days,
            if self.cycle_days == 1 { "" } else { "s" }
        )
    }
}

/// One recorded scrub run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScrubRun {
    pub id: i64,
    pub report: ScrubReport,
}

impl Catalog {
    /// Packs the scrub reads, in the order it reads them: an unfinished pass first, then
    /// never-read packs, then the longest unread.
    pub async fn scrub_queue(&self) -> Result<Vec<ScrubPack>, Error> {
        let rows = sqlx::query(
            "SELECT p.id, p.size, p.state, p.location, s.last_read_at, coalesce(s.cursor, 0)
               FROM packs p LEFT JOIN scrub_packs s ON s.pack_id = p.id
              WHERE p.state IN ('stored', 'missing')
                AND p.id NOT IN (SELECT pack_id FROM condemned_packs)
              ORDER BY coalesce(s.cursor, 0) = 0, s.last_read_at IS NOT NULL, s.last_read_at,
                       p.created_at, p.id",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(db("listing packs to scrub"))?;
        Ok(rows
            .iter()
            .map(|r| ScrubPack {
                id: r.get(0),
                size: r.get::<i64, _>(1) as u64,
                state: r.get(2),
                location: r.get(3),
                last_read_at: r.get(4),
                cursor: r.get::<i64, _>(5) as u64,
            })
            .collect())
    }

    /// Blobs the catalog places in a pack, by offset, from `from` on.
    pub async fn blobs_from(&self, pack_id: &str, from: u64) -> Result<Vec<BlobRow>, Error> {
        let rows = sqlx::query(
            "SELECT id, \"offset\", length, raw_length, kind, flags FROM chunks
              WHERE pack_no = (SELECT no FROM packs WHERE id = $1) AND \"offset\" >= $2
              ORDER BY \"offset\"",
        )
        .bind(pack_id)
        .bind(from as i64)
        .fetch_all(&self.pool)
        .await
        .map_err(db("listing a pack's blobs"))?;
        rows.iter().map(blob_from_row).collect()
    }

    /// Records how far the scrub got in a pack; `done` completes the pass.
    pub async fn scrub_progress(
        &self,
        pack_id: &str,
        cursor: u64,
        done: bool,
        now: i64,
        result: &str,
    ) -> Result<(), Error> {
        sqlx::query(
            "INSERT INTO scrub_packs (pack_id, last_read_at, cursor, last_result)
             VALUES ($1, CASE WHEN $2 THEN $3 END, $4, $5)
             ON CONFLICT (pack_id) DO UPDATE SET
                last_read_at = CASE WHEN $2 THEN $3 ELSE scrub_packs.last_read_at END,
                cursor = $4, last_result = $5",
        )
        .bind(pack_id)
        .bind(done)
        .bind(now)
        .bind(if done { 0 } else { cursor as i64 })
        .bind(result)
        .execute(&self.pool)
        .await
        .map_err(db("recording scrub progress"))?;
        Ok(())
    }

    /// Records chunks as damaged: `ids`, or with `None` every chunk the catalog places in the
    /// pack. Returns how many of them were not known to be damaged before.
    pub async fn record_damage(
        &self,
        pack_id: &str,
        ids: Option<&[ChunkId]>,
        reason: &str,
        now: i64,
    ) -> Result<u64, Error> {
        // Damage already known keeps its first finding and doesn't count (DAMAGE_UPSERT).
        let mut n = 0;
        match ids {
            None => {
                let sql = format!(
                    "INSERT INTO damaged_chunks (chunk_id, pack_id, reason, found_at)
                     SELECT c.id, p.id, ?, ? FROM chunks c JOIN packs p ON p.no = c.pack_no
                      WHERE p.id = ? AND true{DAMAGE_UPSERT}"
                );
                n += sqlx::query(crate::catalog::sql(sql))
                    .bind(reason)
                    .bind(now)
                    .bind(pack_id)
                    .execute(&self.pool)
                    .await
                    .map_err(db("recording damage"))?
                    .rows_affected();
            }
            Some(ids) => {
                let sql = crate::catalog::numbered(&record_damage_sql());
                for id in ids {
                    n += sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
                        .bind(reason)
                        .bind(now)
                        .bind(&id.0[..])
                        .bind(pack_id)
                        .execute(&self.pool)
                        .await
                        .map_err(db("recording damage"))?
                        .rows_affected();
                }
            }
        }
        Ok(n)
    }

    /// Damaged chunks not stored again yet (whose catalog row still points at the damaged
    /// pack).
    pub async fn unhealed_damage(&self) -> Result<Vec<Damage>, Error> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(unhealed_damage_sql()))
            .fetch_all(&self.pool)
            .await
            .map_err(db("listing damaged chunks"))?;
        rows.iter()
            .map(|r| {
                Ok(Damage {
                    chunk_id: ChunkId::from_slice(&r.get::<Vec<u8>, _>(0))?,
                    pack_id: r.get(1),
                    reason: r.get(2),
                    kind: r.get::<i64, _>(3) as u8,
                    flags: r.get::<i64, _>(4) as u8,
                    raw_length: r.get::<i64, _>(5) as u64,
                })
            })
            .collect()
    }

    /// Contents whose chunk list uses `chunk`: (content id, sha256, size, encrypted).
    pub async fn contents_using(
        &self,
        chunk: &ChunkId,
    ) -> Result<Vec<(i64, [u8; 32], u64, bool)>, Error> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(contents_using_sql()))
            .bind(&chunk.0[..])
            .fetch_all(&self.pool)
            .await
            .map_err(db("finding contents of a chunk"))?;
        Ok(rows
            .iter()
            .filter_map(|r| {
                let sha: Vec<u8> = r.get(1);
                Some((
                    r.get(0),
                    sha.try_into().ok()?,
                    r.get::<i64, _>(2) as u64,
                    r.get::<i64, _>(3) != 0,
                ))
            })
            .collect())
    }

    /// A content's chunks in order, with their plaintext lengths.
    pub async fn content_layout(&self, content_id: i64) -> Result<Vec<(ChunkId, u64)>, Error> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT c.id, c.raw_length FROM {CHUNK_LISTS} cc JOIN chunks c ON c.no = cc.chunk_no
              WHERE cc.content_id = $1 ORDER BY cc.seq"
        )))
        .bind(content_id)
        .fetch_all(&self.pool)
        .await
        .map_err(db("loading a chunk list"))?;
        rows.iter()
            .map(|r| {
                Ok((
                    ChunkId::from_slice(&r.get::<Vec<u8>, _>(0))?,
                    r.get::<i64, _>(1) as u64,
                ))
            })
            .collect()
    }

    /// Every file (in any snapshot) with this content, with the snapshots it is in.
    pub async fn files_with_content(&self, content_id: i64) -> Result<Vec<AffectedFile>, Error> {
        let rows = sqlx::query(
            "SELECT r.owner, r.path, e.path,
                    (SELECT string_agg(s.short_id, ',') FROM
                        (SELECT short_id FROM snapshots s WHERE s.root_id = e.root_id
                            AND s.seq >= e.from_seq AND (e.to_seq IS NULL OR s.seq < e.to_seq)
                          ORDER BY s.seq) s)
               FROM entries e JOIN roots r ON r.id = e.root_id
              WHERE e.content_id = $1 ORDER BY r.owner, r.path, e.path, e.from_seq",
        )
        .bind(content_id)
        .fetch_all(&self.pool)
        .await
        .map_err(db("finding files of a content"))?;
        let mut out: Vec<AffectedFile> = Vec::new();
        for r in &rows {
            let snaps: Option<String> = r.get(3);
            let snaps: Vec<String> = snaps
                .map(|s| s.split(',').map(str::to_string).collect())
                .unwrap_or_default();
            let (owner, root, path): (String, String, String) = (r.get(0), r.get(1), r.get(2));
            // The same file in several runs of unchanged rows: one line with every snapshot.
            match out
                .iter_mut()
                .find(|f| f.owner == owner && f.root == root && f.path == path)
            {
                Some(f) => f.snapshots.extend(snaps),
                None => out.push(AffectedFile {
                    owner,
                    root,
                    path,
                    snapshots: snaps,
                    healed: false,
                    why: None,
                }),
            }
        }
        Ok(out)
    }

    /// Snapshots whose snapshot object is this blob: `(owner, root, short id)`.
    pub async fn snapshots_with_blob(
        &self,
        blob: &ChunkId,
    ) -> Result<Vec<(String, String, String)>, Error> {
        let rows = sqlx::query(
            "SELECT r.owner, r.path, s.short_id FROM snapshots s JOIN roots r ON r.id = s.root_id
              WHERE s.blob_id = $1",
        )
        .bind(&blob.0[..])
        .fetch_all(&self.pool)
        .await
        .map_err(db("finding a snapshot object"))?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect())
    }

    /// Stores a scrub report; returns its id.
    pub async fn record_scrub(&self, report: &ScrubReport) -> Result<i64, Error> {
        let json = serde_json::to_string(report).expect("scrub report serializes");
        sqlx::query_scalar(
            "INSERT INTO scrub_runs (started_at, finished_at, report) VALUES ($1, $2, $3) RETURNING id",
        )
        .bind(report.started_at)
        .bind(report.finished_at)
        .bind(json)
        .fetch_one(&self.pool)
        .await
        .map_err(db("recording a scrub"))
    }

    fn scrub_run(r: &crate::catalog::DbRow) -> Result<ScrubRun, Error> {
        let id: i64 = r.get(0);
        let json: String = r.get(1);
        let report = serde_json::from_str(&json).map_err(|e| {
            Error::Invalid(format!("scrub run {id}: bad report in the catalog: {e}"))
        })?;
        Ok(ScrubRun { id, report })
    }

    /// The newest scrub run.
    pub async fn last_scrub(&self) -> Result<Option<ScrubRun>, Error> {
        let row = sqlx::query("SELECT id, report FROM scrub_runs ORDER BY id DESC LIMIT 1")
            .fetch_optional(&self.pool)
            .await
            .map_err(db("reading the last scrub"))?;
        row.as_ref().map(Self::scrub_run).transpose()
    }

    /// Scrub runs with damage whose owners were not told yet.
    pub async fn scrubs_to_alert(&self) -> Result<Vec<ScrubRun>, Error> {
        let rows = sqlx::query("SELECT id, report FROM scrub_runs WHERE alerted = 0 ORDER BY id")
            .fetch_all(&self.pool)
            .await
            .map_err(db("reading scrub runs"))?;
        rows.iter().map(Self::scrub_run).collect()
    }

    pub async fn mark_scrub_alerted(&self, id: i64) -> Result<(), Error> {
        sqlx::query("UPDATE scrub_runs SET alerted = 1 WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(db("marking a scrub run"))?;
        Ok(())
    }

    /// The newest snapshot of `owner`'s folder `root`: (short id, finished at).
    pub async fn latest_snapshot_of(
        &self,
        owner: &str,
        root: &str,
    ) -> Result<Option<(String, i64)>, Error> {
        let row = sqlx::query(
            "SELECT s.short_id, s.finished_at FROM snapshots s JOIN roots r ON r.id = s.root_id
              WHERE r.owner = $1 AND r.path = $2 ORDER BY s.finished_at DESC, s.seq DESC LIMIT 1",
        )
        .bind(owner)
        .bind(root)
        .fetch_optional(&self.pool)
        .await
        .map_err(db("finding the latest snapshot"))?;
        Ok(row.map(|r| (r.get(0), r.get(1))))
    }

    /// `owner`'s snapshots finished in `[from, to)`: (count, bytes stored), and over all time.
    pub async fn owner_stats(&self, owner: &str, from: i64, to: i64) -> Result<OwnerStats, Error> {
        let r = sqlx::query(
            "SELECT count(*) FILTER (WHERE s.finished_at >= $2 AND s.finished_at < $3),
                    CAST(coalesce(sum(s.bytes_stored) FILTER (WHERE s.finished_at >= $2 AND s.finished_at < $3), 0) AS BIGINT),
                    count(*), CAST(coalesce(sum(s.bytes_stored), 0) AS BIGINT)
               FROM snapshots s JOIN roots r ON r.id = s.root_id WHERE r.owner = $1",
        )
        .bind(owner)
        .bind(from)
        .bind(to)
        .fetch_one(&self.pool)
        .await
        .map_err(db("summing snapshots"))?;
        Ok(OwnerStats {
            snapshots: r.get::<i64, _>(0) as u64,
            new_bytes: r.get::<i64, _>(1) as u64,
            all_snapshots: r.get::<i64, _>(2) as u64,
            all_bytes: r.get::<i64, _>(3) as u64,
        })
    }

    /// Owners with snapshots (the digest's audience, with the owners of schedules).
    pub async fn owners(&self) -> Result<Vec<String>, Error> {
        sqlx::query_scalar("SELECT DISTINCT owner FROM roots ORDER BY owner")
            .fetch_all(&self.pool)
            .await
            .map_err(db("listing owners"))
    }

    /// Storage-side anomalies: packs known missing, chunks damaged and not healed.
    pub async fn anomalies(&self) -> Result<(u64, u64), Error> {
        let r = sqlx::query(sqlx::AssertSqlSafe(anomalies_sql()))
            .fetch_one(&self.pool)
            .await
            .map_err(db("counting anomalies"))?;
        Ok((r.get::<i64, _>(0) as u64, r.get::<i64, _>(1) as u64))
    }
}

/// Records the chunk `?3` of pack `?4` as damaged (`?1` the reason, `?2` the time), if the
/// catalog places it in that pack. (The chunk found by id, its pack compared after: a pack
/// holds thousands of chunks.)
pub(super) fn record_damage_sql() -> String {
    format!(
        "INSERT INTO damaged_chunks (chunk_id, pack_id, reason, found_at)
         SELECT c.id, ?4, ?1, ?2 FROM chunks c
          WHERE {} AND c.pack_no = (SELECT p.no FROM packs p WHERE p.id = ?4){DAMAGE_UPSERT}",
        super::chunk_id_is("c.id", "?3")
    )
}

/// Damage already known (unhealed, in the same pack) keeps its first finding and doesn't
/// count: [`Catalog::record_damage`] returns what it newly found.
const DAMAGE_UPSERT: &str = " ON CONFLICT (chunk_id) DO UPDATE SET pack_id = excluded.pack_id,
              reason = excluded.reason, found_at = excluded.found_at, healed_at = NULL,
              healed_pack = NULL
              WHERE damaged_chunks.healed_at IS NOT NULL OR damaged_chunks.pack_id <> excluded.pack_id";

/// Damaged chunks whose row still points at the damaged pack, in pack order.
pub(super) fn unhealed_damage_sql() -> String {
    format!(
        "SELECT d.chunk_id, d.pack_id, d.reason, c.kind, c.flags, c.raw_length
           FROM damaged_chunks d JOIN chunks c ON {}
           JOIN packs p ON p.no = c.pack_no
          WHERE {} AND d.healed_at IS NULL AND p.id = d.pack_id
          ORDER BY d.pack_id, c.\"offset\"",
        super::chunk_id_is("c.id", "d.chunk_id"),
        super::among_damaged()
    )
}

/// The contents whose chunk list uses the chunk `$1`.
pub(super) fn contents_using_sql() -> String {
    format!(
        "SELECT DISTINCT c.id, c.sha256, c.size, c.encrypted FROM contents c
           JOIN {CHUNK_LISTS} cc ON cc.content_id = c.id
          WHERE cc.chunk_no = (SELECT ch.no FROM chunks ch WHERE {})",
        super::chunk_id_is("ch.id", "$1")
    )
}

/// Packs known missing, and damaged chunks not healed.
pub(super) fn anomalies_sql() -> String {
    format!(
        "SELECT (SELECT count(*) FROM packs WHERE state = 'missing'),
                (SELECT count(*) FROM damaged_chunks d JOIN chunks c ON {}
                  JOIN packs p ON p.no = c.pack_no
                  WHERE {} AND d.healed_at IS NULL AND p.id = d.pack_id)",
        super::chunk_id_is("c.id", "d.chunk_id"),
        super::among_damaged()
    )
}

/// Per-owner snapshot figures for the digest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OwnerStats {
    pub snapshots: u64,
    pub new_bytes: u64,
    pub all_snapshots: u64,
    pub all_bytes: u64,
}
