//! The previous snapshot as a backup compares its walk with it: the current entries of a path
//! range with their contents' chunk lists, read in one statement per range.
//!
//! A range is a batch of the walk (thousands of entries). Read as rows, each entry and each
//! chunk was a row handed from sqlx's SQLite thread to the runtime, copied into the `Any`
//! driver's row and decoded again; at 100,000 small files those hand-offs were most of an
//! unchanged re-backup's time. So the database builds the whole range as one JSON array
//! (see [`json_rows`]), returned as a single text value and parsed here with serde.

use std::collections::HashMap;
use std::collections::hash_map::Entry;

use serde::Deserialize;

use super::{
    Catalog, Dialect, ENTRY_FROM, EntryRow, entry_from_json, entry_json_columns, json_rows,
    list_chunks_join,
};
use crate::error::Error;
use crate::format::crypto::ChunkId;

/// An entry of a root's latest snapshot, as a backup compares it with what is on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrevFile {
    /// Its current row.
    pub entry: EntryRow,
    /// A file's content's chunks in order.
    pub chunks: Vec<ChunkId>,
}

impl Catalog {
    /// What a backup needs of the entries current in a root to skip unchanged ones: by path,
    /// the current row (every kind: the backup tells the commit which items it found
    /// identical, see [`super::NewEntry::same`]) and a file's chunk list, for the paths
    /// after `after` (all if `None`) up to and including `upto`. A backup asks for one range
    /// per batch of its walk (which goes in path order), so only a batch's worth is ever held.
    pub async fn previous_files(
        &self,
        root_id: i64,
        after: Option<&str>,
        upto: &str,
    ) -> Result<HashMap<String, PrevFile>, Error> {
        let sql = previous_sql(Dialect::of(&self.pool), after.is_some());
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(root_id);
        for bound in after.into_iter().chain([upto]) {
            q = q.bind(bound.to_string());
        }
        previous_from_rows(json_rows::fetch(q, &self.pool, WHAT).await?)
    }
}

const WHAT: &str = "loading the previous snapshot";

/// The statement of [`Catalog::previous_files`]: one row per current entry of the range
/// and chunk of its content (an entry without chunks once, its chunk fields null), in the
/// order of [`PrevRow`]'s fields, in no particular order (see [`previous_from_rows`]).
pub(super) fn previous_sql(dialect: Dialect, after: bool) -> String {
    let range = if after {
        "e.path > $2 AND e.path <= $3"
    } else {
        "e.path <= $2"
    };
    let inner = format!(
        "SELECT {}, CASE WHEN c.id > 0 THEN 0 ELSE cc.seq END AS c13, {} AS c14 \
         FROM {ENTRY_FROM} {} \
         WHERE e.root_id = $1 AND e.to_seq IS NULL AND {range}",
        entry_json_columns(dialect),
        json_rows::hex(dialect, "ch.id"),
        list_chunks_join("c", "LEFT", "ch")
    );
    json_rows::statement(dialect, &inner, 15, "")
}

/// One row of [`previous_sql`]: an entry's columns (as in `ENTRY_COLUMNS`), then one chunk
/// of its content (its position in the list and its id), if it has any.
#[derive(Deserialize)]
struct PrevRow(
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
    Option<i64>,
    Option<String>,
);

/// The entries of a range from its rows, by path, each with its chunks in order.
fn previous_from_rows(rows: Vec<PrevRow>) -> Result<HashMap<String, PrevFile>, Error> {
    let bad = |why: String| Error::Invalid(format!("{WHAT}: {why}"));
    let mut files: HashMap<String, PrevFile> = HashMap::with_capacity(rows.len());
    // Chunks that came after a later one of their list (the database may join in any order).
    let mut late: Vec<(String, i64, ChunkId)> = Vec::new();
    for r in rows {
        let chunk = match (r.13, &r.14) {
            (Some(seq), Some(id)) => {
                Some((seq, ChunkId::from_hex(id).map_err(|e| bad(e.to_string()))?))
            }
            _ => None,
        };
        let file = match files.entry(r.0.clone()) {
            Entry::Occupied(o) => o.into_mut(),
            Entry::Vacant(v) => {
                let entry = (
                    r.0, r.1, r.2, r.3, r.4, r.5, r.6, r.7, r.8, r.9, r.10, r.11, r.12,
                );
                v.insert(PrevFile {
                    entry: entry_from_json(entry).map_err(bad)?,
                    chunks: Vec::new(),
                })
            }
        };
        match chunk {
            Some((seq, id)) if seq == file.chunks.len() as i64 => file.chunks.push(id),
            Some((seq, id)) => late.push((file.entry.path.clone(), seq, id)),
            None => {}
        }
    }
    if !late.is_empty() {
        place_late_chunks(&mut files, late).map_err(bad)?;
    }
    Ok(files)
}

/// Puts chunks that came out of order in their place: each list holds its chunks 0..k in
/// order already (pushed as they came), the late ones follow from k on, and together they
/// must number 0..n without a gap or a repeat.
fn place_late_chunks(
    files: &mut HashMap<String, PrevFile>,
    mut late: Vec<(String, i64, ChunkId)>,
) -> Result<(), String> {
    late.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
    for (path, seq, id) in late {
        let file = files
            .get_mut(&path)
            .expect("a late chunk's file is in the map");
        if seq != file.chunks.len() as i64 {
            return Err(format!(
                "the chunk list of {path} (content {:?}) has no chunk {} or two of {seq}",
                file.entry.content_id,
                file.chunks.len()
            ));
        }
        file.chunks.push(id);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> ChunkId {
        ChunkId([n; 32])
    }

    fn row(path: &str, seq: Option<i64>, chunk: Option<u8>) -> serde_json::Value {
        let chunk = chunk.map(|n| hex::encode_upper(id(n).0));
        serde_json::json!([
            path,
            0,
            10,
            5,
            420,
            9,
            3,
            "AB".repeat(32),
            null,
            0,
            0,
            "root",
            null,
            seq,
            chunk
        ])
    }

    #[test]
    fn chunks_come_out_in_list_order_whatever_order_the_rows_came_in() {
        let json = serde_json::Value::Array(vec![
            row("a", Some(2), Some(12)),
            row("b", Some(0), Some(20)),
            row("a", Some(0), Some(10)),
            row("a", Some(1), Some(11)),
            row("c", None, None),
        ])
        .to_string();
        let files = previous_from_rows(serde_json::from_str(&json).unwrap()).unwrap();
        assert_eq!(files["a"].chunks, vec![id(10), id(11), id(12)]);
        assert_eq!(files["b"].chunks, vec![id(20)]);
        assert!(files["c"].chunks.is_empty());
        let a = &files["a"].entry;
        assert_eq!(
            (a.path.as_str(), a.size, a.mode, a.inode),
            ("a", 10, 420, 9)
        );
        assert_eq!(a.sha256, Some([0xab; 32]));
        assert_eq!(a.owner.user.as_deref(), Some("root"));
        assert_eq!(a.owner.group, None);
    }

    #[test]
    fn a_chunk_list_with_a_gap_or_a_repeat_is_an_error() {
        for rows in [
            vec![row("a", Some(0), Some(1)), row("a", Some(2), Some(3))],
            vec![
                row("a", Some(1), Some(2)),
                row("a", Some(0), Some(1)),
                row("a", Some(1), Some(2)),
            ],
        ] {
            let json = serde_json::Value::Array(rows).to_string();
            let e = previous_from_rows(serde_json::from_str(&json).unwrap())
                .unwrap_err()
                .to_string();
            assert!(e.contains("chunk list of a"), "{e}");
        }
    }
}
