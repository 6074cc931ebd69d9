//! Backup roots, snapshots and their entries (a temporal table: each row is valid from one
//! snapshot of its root until the one where the entry changed).

use std::collections::{HashMap, HashSet};

use crate::catalog::Conn;
use futures_util::TryStreamExt;
use sqlx::Row;

use super::{
    CHUNK_LISTS, Catalog, DAMAGED_CHUNK, Dialect, ENTRY_COLUMNS, ENTRY_FROM, EntryJson,
    EntryOutline, EntryRow, Owner, PREFIX_BYTES, SNAPSHOT_COLUMNS, SnapshotInfo, USABLE_PACK,
    chunk_id_is, db, entry_from_json, entry_from_row, entry_json_columns, json_rows, kind_no,
    kind_of, snapshot_from_row,
};
use crate::error::Error;
use crate::format::EntryKind;
use crate::format::crypto::ChunkId;

impl Catalog {
    pub async fn root_id(&self, owner: &str, path: &str) -> Result<Option<i64>, Error> {
        sqlx::query_scalar("SELECT id FROM roots WHERE owner = $1 AND path = $2")
            .bind(owner)
            .bind(path)
            .fetch_optional(&self.pool)
            .await
            .map_err(db("looking up a backup root"))
    }

    /// Roots of an owner, as (id, absolute path).
    pub async fn roots(&self, owner: &str) -> Result<Vec<(i64, String)>, Error> {
        let rows = sqlx::query("SELECT id, path FROM roots WHERE owner = $1 ORDER BY path")
            .bind(owner)
            .fetch_all(&self.pool)
            .await
            .map_err(db("listing backup roots"))?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// Highest committed snapshot sequence number of a root (0 if none).
    pub async fn latest_seq(&self, root_id: i64) -> Result<i64, Error> {
        let seq: Option<i64> =
            sqlx::query_scalar("SELECT MAX(seq) FROM snapshots WHERE root_id = $1")
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
        let rows = sqlx::query(crate::catalog::sql(sql))
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
        let rows = sqlx::query(crate::catalog::sql(sql))
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
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(db("loading the previous snapshot"))?;
        current_entries(&mut conn, root_id, "loading the previous snapshot").await
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
            "SELECT {ENTRY_COLUMNS} FROM {ENTRY_FROM} \
             WHERE e.root_id = ? AND e.from_seq <= ? AND (e.to_seq IS NULL OR e.to_seq > ?) \
             AND (e.path = ? OR (e.path >= ? AND e.path < ?)) ORDER BY e.path"
        );
        let rows = sqlx::query(crate::catalog::sql(sql))
            .bind(root_id)
            .bind(seq)
            .bind(seq)
            .bind(prefix)
            .bind(format!("{prefix}/"))
            .bind(format!("{prefix}0"));
        let mut rows = rows.fetch(&self.pool);
        let mut out = Vec::new();
        while let Some(r) = rows
            .try_next()
            .await
            .map_err(db("listing snapshot entries"))?
        {
            out.push(entry_from_row(&r));
        }
        Ok(out)
    }

    /// A page of the entries of snapshot `seq` of a root at `prefix` or below it, in path
    /// order: at most `limit`, after the path `after` (from the start if `None`). A restore
    /// walks a snapshot page by page, holding one page at a time.
    pub async fn entries_page(
        &self,
        root_id: i64,
        seq: i64,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<EntryRow>, Error> {
        let columns = entry_json_columns(Dialect::of(&self.pool));
        let from = ENTRY_FROM;
        let entry =
            |r: EntryJson| entry_from_json(r).map_err(|e| Error::Invalid(format!("catalog: {e}")));
        let page = (root_id, seq, prefix, after, limit);
        self.page_of((&columns, 13, "s.c0"), from, page, entry, |e| &e.path)
            .await
    }

    /// [`Catalog::entries_page`] with each entry's path, kind and size only: what a restore
    /// into an empty place checks before it writes anything (every path valid, the totals),
    /// without the contents join or the other columns.
    pub async fn entry_outlines_page(
        &self,
        root_id: i64,
        seq: i64,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<EntryOutline>, Error> {
        let outline = |(path, kind, size): (String, i64, i64)| {
            Ok(EntryOutline {
                path,
                kind: kind_of(kind),
                size: size as u64,
            })
        };
        self.page_of(
            ("e.path AS c0, e.kind AS c1, e.size AS c2", 3, "s.c0"),
            "entries e",
            (root_id, seq, prefix, after, limit),
            outline,
            |o| &o.path,
        )
        .await
    }

    /// The paging of [`Catalog::entries_page`]: `width` columns named `c0`, ... (`path`
    /// the one that orders them, as `s.cN`) of `from` (whose entries are `e`), read as rows
    /// `R` (see [`json_rows`]) and made `T` by `map`.
    async fn page_of<R: serde::de::DeserializeOwned, T>(
        &self,
        (selected, width, path): (&str, usize, &str),
        from_clause: &str,
        (root_id, seq, prefix, after, limit): (i64, i64, &str, Option<&str>, usize),
        map: impl Fn(R) -> Result<T, Error>,
        path_of: impl Fn(&T) -> &str,
    ) -> Result<Vec<T>, Error> {
        let dialect = Dialect::of(&self.pool);
        // The range [prefix, prefix0) from the (root_id, path) index: the prefix itself, its
        // descendants (`prefix/...`) and siblings that continue with a byte below '/'
        // (`prefix-x`), filtered out here. '0' follows '/' in byte order.
        let below = format!("{prefix}/");
        let mut page = Vec::with_capacity(limit.min(4096));
        let mut from = after.unwrap_or(prefix).to_string();
        let mut strict = after.is_some();
        // Rows of the skipped siblings count against the limit: page on until a page holds
        // wanted rows or the range ends.
        loop {
            let inner = format!(
                "SELECT {selected} FROM {from_clause} \
                 WHERE e.root_id = ? AND e.path {} ? AND e.path < ? \
                 AND e.from_seq <= ? AND (e.to_seq IS NULL OR e.to_seq > ?) \
                 ORDER BY e.path LIMIT ?",
                if strict { ">" } else { ">=" }
            );
            let sql = json_rows::statement(dialect, &inner, width, path);
            let query = sqlx::query(crate::catalog::sql(sql))
                .bind(root_id)
                .bind(from.clone())
                .bind(format!("{prefix}0"))
                .bind(seq)
                .bind(seq)
                .bind(limit as i64);
            let rows: Vec<R> =
                json_rows::fetch(query, &self.pool, "listing snapshot entries").await?;
            let full = rows.len() == limit;
            for r in rows {
                let e = map(r)?;
                let path = path_of(&e);
                from.clear();
                from.push_str(path);
                if path == prefix || path.starts_with(&below) {
                    page.push(e);
                }
            }
            strict = true;
            if !page.is_empty() || !full {
                return Ok(page);
            }
        }
    }

    /// Number of entry rows (tests and the schema's promise: unchanged trees add none).
    pub async fn entry_row_count(&self) -> Result<i64, Error> {
        sqlx::query_scalar("SELECT COUNT(*) FROM entries")
            .fetch_one(&self.pool)
            .await
            .map_err(db("counting entries"))
    }

    /// Ids of the snapshot objects the catalog holds.
    pub async fn snapshot_blob_ids(&self) -> Result<Vec<Vec<u8>>, Error> {
        sqlx::query_scalar("SELECT blob_id FROM snapshots")
            .fetch_all(&self.pool)
            .await
            .map_err(db("listing snapshots"))
    }

    /// Records a snapshot and its entries in one transaction (see [`SnapshotCommit`]), the
    /// entries given all at once in any order. Returns the snapshot's sequence number.
    pub async fn commit_snapshot(
        &self,
        run_id: &str,
        (info, key_id): (&SnapshotInfo, &str),
        blob_id: &ChunkId,
        listing: &[ChunkId],
        items: &[NewEntry],
    ) -> Result<i64, Error> {
        let mut commit = self
            .begin_snapshot_commit(run_id, (info, key_id), blob_id, listing)
            .await?;
        let mut sorted: Vec<&NewEntry> = items.iter().collect();
        sorted.sort_by(|a, b| a.path.cmp(&b.path));
        commit.add(&sorted).await?;
        commit.finish(info, blob_id, listing).await
    }

    /// Starts recording a snapshot: its entries follow in batches, in path order
    /// ([`SnapshotCommit::add`]), and [`SnapshotCommit::finish`] makes it exist. Rows are
    /// written only for what changed since the root's previous snapshot.
    ///
    /// The transaction takes the write lock first (`BEGIN IMMEDIATE`), checks that `run_id`
    /// still holds the root's lock, and reads the previous entries inside it (a path range at
    /// a time, as the batches come), so two writers can never both close one entry or leave
    /// two current rows for a path. It refuses (with [`Error::Changed`], worth a retry) a
    /// snapshot that references a chunk whose pack is not stored (invariant 1): a file whose
    /// content has such a chunk must have been read and stored again, which also repairs its
    /// chunk list here.
    ///
    /// `key_id` names the key the snapshot's new chunks are named with (an owner key; empty:
    /// the installation key): a new file content is shared only with contents of that key.
    pub async fn begin_snapshot_commit(
        &self,
        run_id: &str,
        (info, key_id): (&SnapshotInfo, &str),
        blob_id: &ChunkId,
        listing: &[ChunkId],
    ) -> Result<SnapshotCommit, Error> {
        let mut tx = crate::catalog::begin_write(&self.pool)
            .await
            .map_err(db(COMMIT))?;
        super::runs::check_root_lock(&mut tx, &info.owner, &info.root, run_id).await?;
        let (root_id, seq) = root_and_next_seq(&mut tx, &info.owner, &info.root).await?;
        let key_no = key_no(&mut tx, key_id).await?;
        let unusable = Unusable::load(&mut tx).await?;
        if let Some(c) = std::iter::once(blob_id)
            .chain(listing)
            .find(|c| unusable.chunks.contains(*c))
        {
            return Err(Error::Changed(format!(
                "snapshot data {} is in a pack that is not stored",
                &c.to_hex()[..12]
            )));
        }
        Ok(SnapshotCommit {
            tx,
            root_id,
            seq,
            encrypted: info.encrypted,
            key_no,
            unusable,
            last: None,
            owners: HashMap::new(),
        })
    }
}

/// A snapshot being recorded: one open write transaction, fed the snapshot's entries in
/// batches in path order (bytewise, as SQLite orders text), so that neither the entries nor
/// the previous snapshot's rows are ever all in memory. Each batch is compared with the
/// previous rows of its own path range: the range since the last batch's last path, so that
/// the ranges cover every path exactly once and a previous row in none of the batches (the
/// file is gone) is closed too. Dropped unfinished, it rolls back and nothing is recorded.
pub struct SnapshotCommit {
    tx: crate::catalog::Tx,
    root_id: i64,
    seq: i64,
    encrypted: bool,
    /// The key of the snapshot's chunk ids, by number (see [`key_no`]).
    key_no: i64,
    unusable: Unusable,
    /// The last path recorded so far.
    last: Option<String>,
    /// The `owners` row of each owner this commit recorded entries of (see [`owner_no`]).
    owners: HashMap<Owner, i64>,
}

impl SnapshotCommit {
    /// Records the next entries, in path order after every entry recorded before them.
    pub async fn add(&mut self, items: &[&NewEntry]) -> Result<(), Error> {
        let Some(hi) = items.last().map(|i| i.path.clone()) else {
            return Ok(());
        };
        let mut after = self.last.as_deref();
        for item in items {
            if after.is_some_and(|a| a >= item.path.as_str()) {
                return Err(Error::Invalid(format!(
                    "snapshot entry {:?} is out of path order (after {:?})",
                    item.path,
                    after.unwrap_or_default()
                )));
            }
            after = Some(&item.path);
        }
        let range = (self.last.as_deref(), Some(hi.as_str()));
        let trusted = trusts_same_as(&mut self.tx, self.root_id, items, range).await?;
        let mut previous = if trusted {
            HashMap::new()
        } else {
            current_entries_in(&mut self.tx, self.root_id, range.0, range.1).await?
        };
        let contents = content_ids(
            &mut self.tx,
            items,
            (self.encrypted, self.key_no),
            &mut self.unusable,
        )
        .await?;
        let mut closed = Vec::new();
        let mut added = Vec::new();
        for (item, content_id) in items.iter().zip(contents) {
            if content_id.is_some_and(|c| self.unusable.contents.contains(&c)) {
                return Err(Error::Changed(format!(
                    "{} references chunks of a pack known to be missing",
                    item.path
                )));
            }
            if trusted && item.same {
                continue; // its current row stays
            }
            let prev = previous.remove(&item.path);
            if prev
                .as_ref()
                .is_some_and(|p| unchanged(p, item, content_id))
            {
                continue; // no row written
            }
            closed.extend(prev.map(|p| p.path));
            added.push((*item, content_id));
        }
        // What no item of the batch named is gone since the previous snapshot.
        closed.extend(previous.into_keys());
        close_entries(&mut self.tx, self.root_id, &closed, self.seq).await?;
        let mut rows = Vec::with_capacity(added.len());
        for (item, content_id) in added {
            let owner = owner_no(&mut self.tx, &mut self.owners, &item.owner).await?;
            rows.push((item, content_id, owner));
        }
        insert_entries(&mut self.tx, self.root_id, self.seq, &rows).await?;
        self.last = Some(hi);
        Ok(())
    }

    /// Closes what no batch named (gone since the previous snapshot), records the snapshot
    /// and commits. Returns the snapshot's sequence number.
    pub async fn finish(
        mut self,
        info: &SnapshotInfo,
        blob_id: &ChunkId,
        listing: &[ChunkId],
    ) -> Result<i64, Error> {
        let gone =
            current_entries_in(&mut self.tx, self.root_id, self.last.as_deref(), None).await?;
        let gone: Vec<String> = gone.into_keys().collect();
        close_entries(&mut self.tx, self.root_id, &gone, self.seq).await?;
        let tx = &mut *self.tx;
        insert_snapshot(tx, self.root_id, self.seq, info, blob_id).await?;
        super::retention::record_listing(tx, self.root_id, self.seq, listing).await?;
        self.tx.commit().await.map_err(db(COMMIT))?;
        Ok(self.seq)
    }
}

/// Whether the batch's items that the backup found identical to a current row
/// ([`NewEntry::same`]) account for every current row of their path range: then the
/// range's rows need no reading (they stay, and the other items are new paths). The
/// backup compared them while holding the root's lock, which this transaction found it
/// still holds, so no other writer changed the root's rows since (backups, forget and
/// recover all take that lock). Counting is a walk of the index, not a row per entry
/// through the driver. Otherwise (a path changed, appeared or went) the range is
/// compared row by row.
async fn trusts_same_as(
    tx: &mut Conn,
    root_id: i64,
    items: &[&NewEntry],
    (after, upto): (Option<&str>, Option<&str>),
) -> Result<bool, Error> {
    let same = items.iter().filter(|i| i.same).count() as i64;
    let sql = format!(
        "SELECT COUNT(*) FROM entries e WHERE e.root_id = ? AND e.to_seq IS NULL{}",
        path_range(after, upto)
    );
    let mut q = sqlx::query_scalar::<_, i64>(crate::catalog::sql(sql)).bind(root_id);
    for bound in [after, upto].into_iter().flatten() {
        q = q.bind(bound);
    }
    let current = q.fetch_one(&mut *tx).await.map_err(db(COMMIT))?;
    Ok(current == same)
}

/// What a snapshot must not reference: chunks whose pack is not stored, and the contents
/// whose chunk lists use them.
struct Unusable {
    chunks: HashSet<ChunkId>,
    contents: HashSet<i64>,
}

impl Unusable {
    async fn load(tx: &mut Conn) -> Result<Unusable, Error> {
        let rows: Vec<(i64, Vec<u8>)> = sqlx::query_as(crate::catalog::sql(unusable_chunks_sql()))
            .fetch_all(&mut *tx)
            .await
            .map_err(db(COMMIT))?;
        let chunks = rows
            .iter()
            .map(|(_, id)| ChunkId::from_slice(id))
            .collect::<Result<HashSet<_>, _>>()?;
        let mut contents = HashSet::new();
        for batch in rows.chunks(500) {
            let marks = vec!["?"; batch.len()].join(", ");
            let sql = format!(
                "SELECT DISTINCT l.content_id FROM {CHUNK_LISTS} l WHERE l.chunk_no IN ({marks})"
            );
            let mut q = sqlx::query_scalar::<_, i64>(crate::catalog::sql(sql));
            for (no, _) in batch {
                q = q.bind(*no);
            }
            contents.extend(q.fetch_all(&mut *tx).await.map_err(db(COMMIT))?);
        }
        Ok(Unusable { chunks, contents })
    }
}

/// The chunks [`Unusable`] names, as (number, id).
pub(super) fn unusable_chunks_sql() -> String {
    format!(
        "SELECT no, id FROM chunks WHERE pack_no IN (SELECT p.no FROM packs p WHERE NOT ({USABLE_PACK})) \
         UNION SELECT c.no, c.id FROM damaged_chunks d JOIN chunks c ON {} \
         WHERE {} AND {DAMAGED_CHUNK}",
        chunk_id_is("c.id", "d.chunk_id"),
        super::among_damaged()
    )
}

/// The current entries of a root, by path, as seen on `conn` (inside a commit's transaction:
/// what it is about to change). Read row by row: only the map is held.
async fn current_entries(
    conn: &mut Conn,
    root_id: i64,
    what: &str,
) -> Result<HashMap<String, EntryRow>, Error> {
    let sql = format!(
        "SELECT {ENTRY_COLUMNS} FROM {ENTRY_FROM} \
         WHERE e.root_id = ? AND e.to_seq IS NULL"
    );
    let mut rows = sqlx::query(crate::catalog::sql(sql))
        .bind(root_id)
        .fetch(&mut *conn);
    let mut out = HashMap::new();
    while let Some(r) = rows.try_next().await.map_err(db(what))? {
        let e = entry_from_row(&r);
        out.insert(e.path.clone(), e);
    }
    Ok(out)
}

/// The current entries of a root with a path after `after` (all if `None`) up to and
/// including `upto` (no end if `None`), by path.
async fn current_entries_in(
    conn: &mut Conn,
    root_id: i64,
    after: Option<&str>,
    upto: Option<&str>,
) -> Result<HashMap<String, EntryRow>, Error> {
    let sql = format!(
        "SELECT {ENTRY_COLUMNS} FROM {ENTRY_FROM} \
         WHERE e.root_id = ? AND e.to_seq IS NULL{}",
        path_range(after, upto)
    );
    let mut q = sqlx::query(crate::catalog::sql(sql)).bind(root_id);
    for bound in [after, upto].into_iter().flatten() {
        q = q.bind(bound);
    }
    let mut rows = q.fetch(&mut *conn);
    let mut out = HashMap::new();
    while let Some(r) = rows.try_next().await.map_err(db(COMMIT))? {
        let e = entry_from_row(&r);
        out.insert(e.path.clone(), e);
    }
    Ok(out)
}

/// The bounds of a path range after `after` up to and including `upto`, as plain
/// comparisons (not `? IS NULL OR ...`), so SQLite reads just the range from the
/// (root_id, path) index.
fn path_range(after: Option<&str>, upto: Option<&str>) -> &'static str {
    match (after.is_some(), upto.is_some()) {
        (true, true) => " AND e.path > ? AND e.path <= ?",
        (true, false) => " AND e.path > ?",
        (false, true) => " AND e.path <= ?",
        (false, false) => "",
    }
}

const COMMIT: &str = "committing the snapshot";

/// A chunk a snapshot names has no row: a prune deleted it after this backup deduplicated
/// against it. Worth a retry (which stores that data again), like the guard's refusals.
fn chunk_gone() -> Error {
    Error::Changed("a chunk this snapshot uses was deleted by a prune meanwhile".into())
}

/// The root's id (creating the root) and the sequence number its next snapshot gets.
async fn root_and_next_seq(tx: &mut Conn, owner: &str, root: &str) -> Result<(i64, i64), Error> {
    sqlx::query(
        "INSERT INTO roots (owner, path) VALUES ($1, $2) ON CONFLICT (owner, path) DO NOTHING",
    )
    .bind(owner)
    .bind(root)
    .execute(&mut *tx)
    .await
    .map_err(db(COMMIT))?;
    let root_id: i64 = sqlx::query_scalar("SELECT id FROM roots WHERE owner = $1 AND path = $2")
        .bind(owner)
        .bind(root)
        .fetch_one(&mut *tx)
        .await
        .map_err(db(COMMIT))?;
    let seq: i64 =
        sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0) + 1 FROM snapshots WHERE root_id = $1")
            .bind(root_id)
            .fetch_one(&mut *tx)
            .await
            .map_err(db(COMMIT))?;
    Ok((root_id, seq))
}

/// The number `contents.key_no` gives the key `key_id` names: 0 for the installation key (an
/// empty id), otherwise the owner key's row in `owner_keys` (recorded before anything is
/// sealed with it, so a key id without a row is an error, never filed under another key).
async fn key_no(tx: &mut Conn, key_id: &str) -> Result<i64, Error> {
    if key_id.is_empty() {
        return Ok(0);
    }
    sqlx::query_scalar("SELECT id FROM owner_keys WHERE key_id = $1")
        .bind(key_id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db(COMMIT))?
        .ok_or_else(|| {
            Error::Invalid(format!(
                "owner key {key_id} is not recorded in the catalog\nhint: `recover` imports the owner keys storage holds"
            ))
        })
}

/// A file content's identity within a key: its SHA-256 and size.
type ContentKey = ([u8; 32], u64);

/// A batch's new contents, each with its chunk list.
type NewContents<'a> = HashMap<ContentKey, &'a [ChunkId]>;

/// The content row of each item (`None`: not a file): a reused one as it is, a new one
/// found among the contents of the snapshot's key, or recorded with its chunk list. A
/// content of one chunk has that chunk's number as its id (migration 0027), so it is found
/// by the number (which the commit looks up anyway); any other by its SHA-256 and size. A
/// few statements per batch, not several per file (see `bulk`).
async fn content_ids(
    tx: &mut Conn,
    items: &[&NewEntry],
    key: (bool, i64),
    unusable: &mut Unusable,
) -> Result<Vec<Option<i64>>, Error> {
    // The batch's new contents, each once (the first item's chunk list stands for its
    // copies: the same bytes are cut and named the same way).
    let mut new: NewContents<'_> = HashMap::new();
    for item in items {
        if let NewContent::New {
            sha256,
            size,
            chunks,
        } = &item.content
        {
            new.entry((*sha256, *size)).or_insert(chunks);
        }
    }
    let singles: Vec<(&ChunkId, &[u8; 32])> = new
        .iter()
        .filter_map(|((sha256, _), chunks)| Some((only_chunk(chunks)?, sha256)))
        .collect();
    let found = single_chunks(tx, &singles).await?;
    let mut numbers: HashMap<ChunkId, i64> = found.iter().map(|(id, s)| (*id, s.no)).collect();
    let mut ids = existing_contents(tx, &new, &found, key).await?;
    let existing: HashSet<i64> = ids.values().copied().collect();
    let recorded = record_contents(tx, &new, &ids, &mut numbers, key, unusable).await?;
    ids.extend(recorded);
    repair_contents(tx, &new, &ids, &existing, unusable).await?;
    Ok(items
        .iter()
        .map(|item| match &item.content {
            NewContent::None => None,
            NewContent::Existing(id) => Some(*id),
            NewContent::New { sha256, size, .. } => ids.get(&(*sha256, *size)).copied(),
        })
        .collect())
}

/// The chunk of a list of one.
fn only_chunk(chunks: &[ChunkId]) -> Option<&ChunkId> {
    match chunks {
        [only] => Some(only),
        _ => None,
    }
}

/// What the catalog holds of the chunk of a one-chunk content (see [`single_chunks`]).
struct SingleChunk {
    /// The chunk's number.
    no: i64,
    /// A content is numbered as the chunk.
    numbered: bool,
    /// A content with an id below 0 shares the first bytes of this one's SHA-256: perhaps
    /// this content, listed in `content_chunks` by an older catalog (migration 0027).
    maybe_listed: bool,
}

/// The ids of the contents of `new` recorded already (for the snapshot's key). A content of
/// one chunk is the one numbered as its chunk (`singles`: the chunks of those lists that have
/// a row, and which of them are worth each lookup). The others (and a one-chunk content that
/// an older catalog listed in `content_chunks`, migration 0027) are found by the first bytes
/// of their SHA-256 among the ids below 0 (the partial index `contents_by_sha256`); a row
/// whose whole SHA-256 and size are not one of `new`'s is another content that shares the
/// prefix.
async fn existing_contents(
    tx: &mut Conn,
    new: &NewContents<'_>,
    singles: &HashMap<ChunkId, SingleChunk>,
    (encrypted, key_no): (bool, i64),
) -> Result<HashMap<ContentKey, i64>, Error> {
    let mut ids = HashMap::new();
    let single = |chunks: &[ChunkId]| singles.get(only_chunk(chunks)?);
    let by_number: HashMap<i64, &ContentKey> = new
        .iter()
        .filter_map(|(k, chunks)| single(chunks).filter(|s| s.numbered).map(|s| (s.no, k)))
        .collect();
    let nos: Vec<i64> = by_number.keys().copied().collect();
    for part in nos.chunks(super::bulk::ROWS) {
        let sql = format!(
            "SELECT id, sha256, size, encrypted, key_no FROM contents WHERE id IN ({})",
            super::bulk::marks(1, part.len())
        );
        let mut q = sqlx::query_as::<_, (i64, Vec<u8>, i64, i64, i64)>(sqlx::AssertSqlSafe(sql));
        for no in part {
            q = q.bind(*no);
        }
        for (id, sha256, size, enc, key) in q.fetch_all(&mut *tx).await.map_err(db(COMMIT))? {
            let want = by_number[&id];
            if sha256 != want.0 || size as u64 != want.1 || (enc != 0) != encrypted || key != key_no
            {
                return Err(Error::Invalid(format!(
                    "content {id} of the catalog is not the file content {} its chunk holds",
                    hex::encode(&want.0[..6])
                )));
            }
            ids.insert(*want, id);
        }
    }
    // A one-chunk content found above, or whose chunk has a row and no listed content near
    // its SHA-256, needs no lookup by SHA-256: on a first backup of small files, that is all.
    let keys: Vec<&ContentKey> = new
        .iter()
        .filter(|(k, chunks)| {
            !ids.contains_key(*k) && single(chunks).is_none_or(|s| s.maybe_listed)
        })
        .map(|(k, _)| k)
        .collect();
    for part in keys.chunks(super::bulk::ROWS) {
        let mut q = sqlx::query(sqlx::AssertSqlSafe(existing_contents_sql(part.len())))
            .bind(i64::from(encrypted))
            .bind(key_no);
        for (sha256, _) in part {
            q = q.bind(&sha256[..PREFIX_BYTES]);
        }
        for r in q.fetch_all(&mut *tx).await.map_err(db(COMMIT))? {
            let sha256: Vec<u8> = r.get(1);
            let Ok(sha256) = <[u8; 32]>::try_from(sha256.as_slice()) else {
                continue; // not a content of this batch
            };
            let key = (sha256, r.get::<i64, _>(2) as u64);
            if new.contains_key(&key) {
                ids.insert(key, r.get::<i64, _>(0));
            }
        }
    }
    Ok(ids)
}

/// The lookup by SHA-256 of `existing_contents` for `n` prefixes (after the encryption and
/// key): the contents with an id below 0, which the partial index holds.
fn existing_contents_sql(n: usize) -> String {
    format!(
        "SELECT id, sha256, size FROM contents WHERE id < 0 AND encrypted = $1 AND key_no = $2 \
         AND {} IN ({})",
        super::prefix_of("sha256"),
        super::bulk::marks(3, n)
    )
}

/// Records the contents of `new` not in `known`, with their chunk lists; returns their ids.
/// A content of one chunk takes the chunk's number; the others take ids below 0, counting
/// down, and their lists go to `content_chunks`. `numbers` gains the chunks of those lists.
/// A new content must not be built on unusable chunks (a backup that deduplicated against a
/// pack prune condemned since: it stores that data again and retries).
async fn record_contents(
    tx: &mut Conn,
    new: &NewContents<'_>,
    known: &HashMap<ContentKey, i64>,
    numbers: &mut HashMap<ChunkId, i64>,
    (encrypted, key_no): (bool, i64),
    unusable: &Unusable,
) -> Result<HashMap<ContentKey, i64>, Error> {
    let fresh: Vec<(&ContentKey, &&[ChunkId])> = new
        .iter()
        .filter(|(k, _)| !known.contains_key(*k))
        .collect();
    if let Some(((sha256, _), _)) = fresh
        .iter()
        .find(|(_, chunks)| chunks.iter().any(|c| unusable.chunks.contains(c)))
    {
        return Err(Error::Changed(format!(
            "file content {} uses a chunk of a pack that is not stored",
            hex::encode(&sha256[..6])
        )));
    }
    let more: Vec<&ChunkId> = fresh
        .iter()
        .flat_map(|(_, c)| c.iter())
        .filter(|c| !numbers.contains_key(*c))
        .collect();
    numbers.extend(chunk_numbers(tx, &more).await?);
    // Under the commit's write lock, so no other writer takes these ids meanwhile.
    let lowest: i64 = sqlx::query_scalar("SELECT COALESCE(MIN(id), 0) FROM contents")
        .fetch_one(&mut *tx)
        .await
        .map_err(db(COMMIT))?;
    let mut next = lowest.min(0);
    let mut ids = HashMap::new();
    let mut rows = Vec::with_capacity(fresh.len());
    let mut lists = Vec::new();
    for (key, chunks) in fresh {
        let id = match only_chunk(chunks) {
            // No row: a prune deleted the chunk since the backup stored or found it.
            Some(only) => *numbers.get(only).ok_or_else(chunk_gone)?,
            None => {
                next -= 1;
                lists.push((next, *chunks));
                next
            }
        };
        ids.insert(*key, id);
        rows.push((id, key));
    }
    // In the order of their ids, which is the table's: rows added at its end fill its pages
    // (a small file's chunk number grows with the backup, as its pack is indexed).
    rows.sort_unstable_by_key(|(id, _)| *id);
    let head = "INSERT INTO contents (id, sha256, size, encrypted, key_no)";
    super::bulk::insert(tx, (head, 5, ""), &rows, |q, (id, (sha256, size))| {
        q.bind(*id)
            .bind(&sha256[..])
            .bind(*size as i64)
            .bind(i64::from(encrypted))
            .bind(key_no)
    })
    .await
    .map_err(db(COMMIT))?;
    insert_chunk_lists(tx, &lists, numbers).await?;
    Ok(ids)
}

/// Gives a recorded content the chunk list just stored when its own can't be used: it uses
/// unusable chunks (lost or damaged), or format-1 unencrypted blobs (checksums only, which
/// `recover` won't index), and the new list can (same bytes, same SHA-256). A content of one
/// chunk keeps its list, its id: the chunk's row moved when the backup stored it again.
async fn repair_contents(
    tx: &mut Conn,
    new: &NewContents<'_>,
    ids: &HashMap<ContentKey, i64>,
    existing: &HashSet<i64>,
    unusable: &mut Unusable,
) -> Result<(), Error> {
    let listed: Vec<i64> = existing.iter().copied().filter(|id| *id < 0).collect();
    let on_format1 = contents_on_format1(tx, &listed).await?;
    let mut lists = Vec::new();
    for (key, chunks) in new {
        let id = ids[key];
        if !existing.contains(&id) {
            continue;
        }
        let repair =
            unusable.contents.contains(&id) && !chunks.iter().any(|c| unusable.chunks.contains(c));
        if repair {
            unusable.contents.remove(&id);
        }
        if id < 0 && (repair || !chunks.is_empty() && on_format1.contains(&id)) {
            lists.push((id, *chunks));
        }
    }
    let ids: Vec<&ChunkId> = lists.iter().flat_map(|(_, c)| c.iter()).collect();
    let numbers = chunk_numbers(tx, &ids).await?;
    for (id, _) in &lists {
        sqlx::query("DELETE FROM content_chunks WHERE content_id = $1")
            .bind(*id)
            .execute(&mut *tx)
            .await
            .map_err(db(COMMIT))?;
    }
    insert_chunk_lists(tx, &lists, &numbers).await
}

/// Which of `contents` have a chunk on a format-1 unencrypted blob.
async fn contents_on_format1(tx: &mut Conn, contents: &[i64]) -> Result<HashSet<i64>, Error> {
    let mut out = HashSet::new();
    for part in contents.chunks(super::bulk::ROWS) {
        let sql = format!(
            "SELECT DISTINCT l.content_id FROM {CHUNK_LISTS} l JOIN chunks ch ON ch.no = l.chunk_no \
             WHERE ch.flags & 3 = 0 AND l.content_id IN ({})",
            super::bulk::marks(1, part.len())
        );
        let mut q = sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(sql));
        for id in part {
            q = q.bind(*id);
        }
        out.extend(q.fetch_all(&mut *tx).await.map_err(db(COMMIT))?);
    }
    Ok(out)
}

/// Records the chunk lists of the contents with ids below 0 (content id, its chunks in
/// order) in `content_chunks`, each chunk named by its number (migration 0022), from
/// `numbers`. (A content of one chunk is numbered as it: migration 0027.)
async fn insert_chunk_lists(
    tx: &mut Conn,
    lists: &[(i64, &[ChunkId])],
    numbers: &HashMap<ChunkId, i64>,
) -> Result<(), Error> {
    let mut rows: Vec<(i64, i64, i64)> = Vec::new();
    for (id, chunks) in lists {
        for (i, c) in chunks.iter().enumerate() {
            // No row: a prune deleted the chunk since the backup stored or found it. (It
            // can't between this lookup and the insert: a prune writes under the same lock.)
            let no = numbers.get(c).ok_or_else(chunk_gone)?;
            rows.push((*id, i as i64, *no));
        }
    }
    let head = "INSERT INTO content_chunks (content_id, seq, chunk_no)";
    super::bulk::insert(tx, (head, 3, ""), &rows, |q, (id, i, no)| {
        q.bind(*id).bind(*i).bind(*no)
    })
    .await
    .map_err(db(COMMIT))?;
    Ok(())
}

/// The numbers of those of the chunks `ids` that have a row, each looked up once,
/// [`NUMBERS_AT_ONCE`] to a statement. The chunks go in as the rows of a `VALUES` list and
/// the found ones come back as one JSON text of (position, number): a first backup of small
/// files looks up every chunk it stored, and read back as rows of blobs (each handed across
/// sqlx's thread and converted for the `Any` driver) that took most of its commit's time.
async fn chunk_numbers(tx: &mut Conn, ids: &[&ChunkId]) -> Result<HashMap<ChunkId, i64>, Error> {
    let mut seen = HashSet::with_capacity(ids.len());
    let unique: Vec<&ChunkId> = ids.iter().copied().filter(|c| seen.insert(**c)).collect();
    let mut out = HashMap::with_capacity(unique.len());
    for part in unique.chunks(NUMBERS_AT_ONCE) {
        let sql = chunk_numbers_sql(Dialect::of_conn(tx), part.len());
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for (i, id) in part.iter().enumerate() {
            q = q.bind(i as i64).bind(&id.0[..PREFIX_BYTES]).bind(&id.0[..]);
        }
        let found: Vec<(usize, i64)> = json_rows::fetch(q, &mut *tx, COMMIT).await?;
        for (i, no) in found {
            out.insert(**at_position(part, i)?, no);
        }
    }
    Ok(out)
}

/// The item a lookup's result row names by its position in the statement's list.
fn at_position<T>(part: &[T], i: usize) -> Result<&T, Error> {
    part.get(i).ok_or_else(|| {
        Error::Invalid(format!(
            "catalog: {COMMIT}: chunk position {i} out of range"
        ))
    })
}

/// Chunks looked up by one statement of [`chunk_numbers`] (three values each) or of
/// [`single_chunks`] (four).
const NUMBERS_AT_ONCE: usize = 4 * super::bulk::ROWS;

/// For the chunks of one-chunk contents (each with its content's SHA-256), those that have a
/// row: their numbers and which lookups of [`existing_contents`] could find their content.
/// One statement per [`NUMBERS_AT_ONCE`] chunks answers what took three: a first backup of
/// 100,000 small files spent a fifth of its commit looking up, 128 at a time, contents that
/// were not there.
async fn single_chunks(
    tx: &mut Conn,
    singles: &[(&ChunkId, &[u8; 32])],
) -> Result<HashMap<ChunkId, SingleChunk>, Error> {
    let mut out = HashMap::with_capacity(singles.len());
    for part in singles.chunks(NUMBERS_AT_ONCE) {
        let sql = single_chunks_sql(Dialect::of_conn(tx), part.len());
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for (i, (id, sha256)) in part.iter().enumerate() {
            q = q
                .bind(i as i64)
                .bind(&id.0[..PREFIX_BYTES])
                .bind(&id.0[..])
                .bind(&sha256[..PREFIX_BYTES]);
        }
        let found: Vec<(usize, i64, i64, i64)> = json_rows::fetch(q, &mut *tx, COMMIT).await?;
        for (i, no, numbered, maybe_listed) in found {
            let (id, _) = at_position(part, i)?;
            let single = SingleChunk {
                no,
                numbered: numbered != 0,
                maybe_listed: maybe_listed != 0,
            };
            out.insert(**id, single);
        }
    }
    Ok(out)
}

/// [`chunk_numbers_sql`] for `n` chunks of one-chunk contents, bound as rows of (position,
/// id prefix, id, content SHA-256 prefix), with two more columns: whether a content is
/// numbered as the chunk, and whether a content listed in `content_chunks` (an id below 0,
/// in the partial index `contents_by_sha256`) shares the SHA-256 prefix.
pub(super) fn single_chunks_sql(dialect: Dialect, n: usize) -> String {
    let inner = super::bulk::values(
        dialect,
        &format!(
            "SELECT q.column1 AS c0, ch.no AS c1, \
             CASE WHEN EXISTS (SELECT 1 FROM contents c WHERE c.id = ch.no) THEN 1 ELSE 0 END AS c2, \
             CASE WHEN EXISTS (SELECT 1 FROM contents c WHERE c.id < 0 AND {} = q.column4) \
             THEN 1 ELSE 0 END AS c3 FROM (",
            super::prefix_of("c.sha256")
        ),
        4,
        n,
        &format!(
            ") q CROSS JOIN chunks ch WHERE {} = q.column2 AND ch.id = q.column3",
            super::prefix_of("ch.id")
        ),
    );
    json_rows::statement(dialect, &inner, 4, "")
}

/// The (position, number) of those of `n` chunks that have a row, as one JSON text; the chunks
/// are bound as `n` rows of (position, id prefix, id). `CROSS JOIN` makes SQLite go from the
/// list to the chunks: with a plain join its planner read every chunk for each statement,
/// through a Bloom filter of the list (PostgreSQL takes it as a plain join).
pub(super) fn chunk_numbers_sql(dialect: Dialect, n: usize) -> String {
    let inner = super::bulk::values(
        dialect,
        "SELECT q.column1 AS c0, ch.no AS c1 FROM (",
        3,
        n,
        &format!(
            ") q CROSS JOIN chunks ch WHERE {} = q.column2 AND ch.id = q.column3",
            super::prefix_of("ch.id")
        ),
    );
    json_rows::statement(dialect, &inner, 2, "")
}

/// Whether a previous row says all an item says (then no row is written).
pub(crate) fn unchanged(p: &EntryRow, item: &NewEntry, content_id: Option<i64>) -> bool {
    p.kind == item.kind
        && p.size == item.size
        && p.mtime_ns == item.mtime_ns
        && p.mode == item.mode
        && p.inode == item.inode
        && p.content_id == content_id
        && p.target == item.target
        && p.owner == item.owner
}

/// The `owners` row of `owner` (`None`: nothing recorded, no row), found or made, each
/// owner looked up once per commit (`known`). The row is unique by its key, the owner as a
/// JSON array made by the database (the expression migration 0021 keys its rows with):
/// a concurrent PostgreSQL writer that made it first makes this insert do nothing.
async fn owner_no(
    tx: &mut Conn,
    known: &mut HashMap<Owner, i64>,
    owner: &Owner,
) -> Result<Option<i64>, Error> {
    if *owner == Owner::default() {
        return Ok(None);
    }
    if let Some(no) = known.get(owner) {
        return Ok(Some(*no));
    }
    let key = match Dialect::of_conn(tx) {
        Dialect::Sqlite => "json_array($1, $2, $3, $4)",
        Dialect::Postgres => "json_build_array($1::bigint, $2::bigint, $3::text, $4::text)::text",
    };
    let bound = |sql: String| {
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(owner.uid.map(i64::from))
            .bind(owner.gid.map(i64::from))
            .bind(owner.user.clone())
            .bind(owner.group.clone())
    };
    bound(format!(
        "INSERT INTO owners (uid, gid, user_name, group_name, key) \
         VALUES ($1, $2, $3, $4, {key}) ON CONFLICT (key) DO NOTHING"
    ))
    .execute(&mut *tx)
    .await
    .map_err(db(COMMIT))?;
    let no: i64 = bound(format!("SELECT no FROM owners WHERE key = {key}"))
        .fetch_one(&mut *tx)
        .await
        .map_err(db(COMMIT))?
        .get(0);
    known.insert(owner.clone(), no);
    Ok(Some(no))
}

/// New entry rows, valid from snapshot `seq` on: each item with its content and owner row.
async fn insert_entries(
    tx: &mut Conn,
    root_id: i64,
    seq: i64,
    items: &[(&NewEntry, Option<i64>, Option<i64>)],
) -> Result<(), Error> {
    let head = "INSERT INTO entries (root_id, path, kind, size, mtime_ns, mode, inode, content_id, target, \
                from_seq, owner_no)";
    super::bulk::insert(
        tx,
        (head, 11, ""),
        items,
        |q, (item, content_id, owner_no)| {
            q.bind(root_id)
                .bind(&item.path)
                .bind(kind_no(item.kind))
                .bind(item.size as i64)
                .bind(item.mtime_ns)
                .bind(i64::from(item.mode))
                .bind(item.inode as i64)
                .bind(*content_id)
                .bind(&item.target)
                .bind(seq)
                .bind(*owner_no)
        },
    )
    .await
    .map_err(db(COMMIT))?;
    Ok(())
}

async fn insert_snapshot(
    tx: &mut Conn,
    root_id: i64,
    seq: i64,
    info: &SnapshotInfo,
    blob_id: &ChunkId,
) -> Result<(), Error> {
    // The snapshot's blob must have a row (what a foreign key checked before migration 0023):
    // a prune may have deleted it since the backup stored it.
    if chunk_numbers(tx, &[blob_id]).await?.is_empty() {
        return Err(Error::Changed(
            "the snapshot's own data was deleted by a prune meanwhile".into(),
        ));
    }
    sqlx::query(
        "INSERT INTO snapshots (root_id, seq, short_id, blob_id, hostname, encrypted, started_at, finished_at, \
         files, dirs, bytes, bytes_read, new_chunks, bytes_stored, warnings) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
    )
    .bind(root_id)
    .bind(seq)
    .bind(&info.short_id)
    .bind(&blob_id.0[..])
    .bind(&info.hostname)
    .bind(i64::from(info.encrypted))
    .bind(info.started_at)
    .bind(info.finished_at)
    .bind(info.files as i64)
    .bind(info.dirs as i64)
    .bind(info.bytes as i64)
    .bind(info.bytes_read as i64)
    .bind(info.new_chunks as i64)
    .bind(info.bytes_stored as i64)
    .bind(info.warnings as i64)
    .execute(&mut *tx)
    .await
    .map_err(db(COMMIT))?;
    Ok(())
}

/// Content of an entry to commit.
pub enum NewContent {
    None,
    Existing(i64),
    New {
        sha256: [u8; 32],
        size: u64,
        chunks: Vec<ChunkId>,
    },
}

/// An entry to commit.
pub struct NewEntry {
    pub path: String,
    pub kind: EntryKind,
    pub size: u64,
    pub mtime_ns: i64,
    pub mode: u32,
    pub inode: u64,
    pub target: Option<String>,
    pub owner: Owner,
    pub content: NewContent,
    /// The backup found this entry identical to the root's current row of its path (every
    /// field [`unchanged`] compares; the content reused as it was), while it held the root's
    /// lock. The commit trusts it: see [`SnapshotCommit::add`].
    pub same: bool,
}

/// Ends the validity of a root's current rows at `paths` at snapshot `seq` (they changed or
/// disappeared there). Only current rows are closed: a row someone else closed means the
/// catalog changed under this commit.
async fn close_entries(
    tx: &mut Conn,
    root_id: i64,
    paths: &[String],
    seq: i64,
) -> Result<(), Error> {
    for part in paths.chunks(super::bulk::ROWS) {
        let sql = format!(
            "UPDATE entries SET to_seq = $1 WHERE root_id = $2 AND to_seq IS NULL AND path IN ({})",
            super::bulk::marks(3, part.len())
        );
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(seq)
            .bind(root_id);
        for path in part {
            q = q.bind(path);
        }
        let done = q.execute(&mut *tx).await.map_err(db(COMMIT))?;
        if done.rows_affected() != part.len() as u64 {
            return Err(Error::Changed(format!(
                "{} of the entries {part:?} were closed by another writer during this commit",
                part.len() as u64 - done.rows_affected()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    /// The lookup of recorded contents goes through the prefix index: its expression and the
    /// index's must be the same text, or SQLite scans every content of the catalog.
    #[tokio::test]
    async fn recorded_contents_are_looked_up_by_the_prefix_index() {
        let dir = tempfile::tempdir().unwrap();
        let catalog = super::super::Catalog::open_file(&dir.path().join("c.db"))
            .await
            .unwrap();
        for sql in [
            super::existing_contents_sql(2),
            super::single_chunks_sql(super::Dialect::Sqlite, 2),
        ] {
            let plan = super::super::tests::query_plan(&catalog, &sql).await;
            assert!(
                plan.iter().any(|p| p.contains("INDEX contents_by_sha256")),
                "{sql}: {plan:?}"
            );
        }
    }
}
