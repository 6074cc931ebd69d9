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

use super::{Catalog, Dialect, EntryRow, Owner, json_rows};
use crate::error::Error;
use crate::format::EntryKind;
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
    /// identical, see [`super::NewEntry::same_as`]) and a file's chunk list, for the paths
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
fn previous_sql(dialect: Dialect, after: bool) -> String {
    let range = if after {
        "e.path > $2 AND e.path <= $3"
    } else {
        "e.path <= $2"
    };
    let inner = format!(
        "SELECT e.id AS c0, e.path AS c1, e.kind AS c2, e.size AS c3, e.mtime_ns AS c4, \
         e.mode AS c5, e.inode AS c6, e.content_id AS c7, {} AS c8, e.target AS c9, \
         e.uid AS c10, e.gid AS c11, e.user_name AS c12, e.group_name AS c13, \
         cc.seq AS c14, {} AS c15 \
         FROM entries e LEFT JOIN contents c ON c.id = e.content_id \
         LEFT JOIN content_chunks cc ON cc.content_id = e.content_id \
         WHERE e.root_id = $1 AND e.to_seq IS NULL AND {range}",
        json_rows::hex(dialect, "c.sha256"),
        json_rows::hex(dialect, "cc.chunk_id")
    );
    json_rows::statement(dialect, &inner, 16, "")
}

/// One row of [`previous_sql`]: an entry's columns (as in `ENTRY_COLUMNS`), then one chunk
/// of its content (its position in the list and its id), if it has any.
#[derive(Deserialize)]
struct PrevRow(
    i64,
    String,
    String,
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
        let chunk = match (r.14, &r.15) {
            (Some(seq), Some(id)) => {
                Some((seq, ChunkId::from_hex(id).map_err(|e| bad(e.to_string()))?))
            }
            _ => None,
        };
        let file = match files.entry(r.1) {
            Entry::Occupied(o) => o.into_mut(),
            Entry::Vacant(v) => {
                let entry = EntryRow {
                    id: r.0,
                    path: v.key().clone(),
                    kind: EntryKind::parse(&r.2).unwrap_or(EntryKind::File),
                    size: r.3 as u64,
                    mtime_ns: r.4,
                    mode: r.5 as u32,
                    inode: r.6 as u64,
                    content_id: r.7,
                    sha256: match &r.8 {
                        Some(h) => Some(sha256_from_hex(h).map_err(bad)?),
                        None => None,
                    },
                    target: r.9,
                    owner: Owner {
                        uid: r.10.map(|v| v as u32),
                        gid: r.11.map(|v| v as u32),
                        user: r.12,
                        group: r.13,
                    },
                };
                v.insert(PrevFile {
                    entry,
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

fn sha256_from_hex(h: &str) -> Result<[u8; 32], String> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(h, &mut out).map_err(|e| format!("a content's SHA-256 {h:?}: {e}"))?;
    Ok(out)
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
            7,
            path,
            "file",
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
