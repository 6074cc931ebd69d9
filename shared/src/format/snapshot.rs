//! The stored snapshot: its listing (JSON lines, one [`ListingEntry`] per item, cut into
//! content-defined chunks of [`LISTING_CHUNKS`]) and the [`SnapshotObject`] that completes it.
//! Both are compressed and sealed like data chunks.

use serde::{Deserialize, Serialize};

use super::chunker::ChunkerParams;
use super::crypto::ChunkId;

/// Kind of a snapshot entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
}

impl EntryKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::File => "file",
            EntryKind::Dir => "dir",
            EntryKind::Symlink => "symlink",
        }
    }
    pub fn parse(s: &str) -> Option<EntryKind> {
        match s {
            "file" => Some(EntryKind::File),
            "dir" => Some(EntryKind::Dir),
            "symlink" => Some(EntryKind::Symlink),
            _ => None,
        }
    }
}

/// One line of a snapshot listing, as stored (encrypted) in storage.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListingEntry {
    #[serde(rename = "p")]
    pub path: String,
    #[serde(rename = "k")]
    pub kind: EntryKind,
    #[serde(rename = "s")]
    pub size: u64,
    #[serde(rename = "m")]
    pub mtime_ns: i64,
    #[serde(rename = "o")]
    pub mode: u32,
    #[serde(rename = "i")]
    pub inode: u64,
    #[serde(rename = "h", default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(rename = "c", default, skip_serializing_if = "Vec::is_empty")]
    pub chunks: Vec<ChunkId>,
    #[serde(rename = "t", default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// The snapshot object, as stored in storage.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SnapshotObject {
    pub version: u32,
    pub owner: String,
    pub root: String,
    pub hostname: String,
    pub encrypted: bool,
    pub started_at: i64,
    pub finished_at: i64,
    pub listing: Vec<ChunkId>,
    pub files: u64,
    pub dirs: u64,
    pub bytes: u64,
    pub bytes_read: u64,
    pub new_chunks: u64,
    pub bytes_stored: u64,
    pub warnings: u64,
}

/// Chunk sizes for listings: smaller than data chunks so a small change in a large tree
/// stores little.
pub const LISTING_CHUNKS: ChunkerParams = ChunkerParams {
    min: 16 * 1024,
    avg: 64 * 1024,
    max: 256 * 1024,
};
/// zstd level for listings and snapshot objects (JSON compresses well).
pub const META_COMPRESSION: i32 = 3;
