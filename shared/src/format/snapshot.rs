//! The stored snapshot: its listing (JSON lines, one [`ListingEntry`] per item, cut into
//! content-defined chunks of [`LISTING_CHUNKS`]) and the [`SnapshotObject`] that completes it.
//! Both are compressed and sealed like data chunks.
//!
//! What comes out of storage is decoded with [`SnapshotObject::decode`] and
//! [`decode_listing`], which check every field against the format's rules (a listing path is
//! a plain relative path, a file has a hash, ...) and fail with a [`FormatError`].

use serde::{Deserialize, Serialize};

use super::chunker::ChunkerParams;
use super::crypto::ChunkId;
pub use crate::error::FormatError;

/// The snapshot object version written: 2 adds owners to listing entries and is stored in
/// blob format 2. Version 1 is still read.
pub const SNAPSHOT_VERSION: u32 = 2;

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
    /// Owner (numeric uid and, when the backup host knew it, the user name). Absent in
    /// snapshot version 1.
    #[serde(rename = "u", default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(rename = "g", default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
    #[serde(rename = "un", default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(rename = "gn", default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

/// Longest path, symlink target or owner name a listing line may hold (PATH_MAX).
const MAX_TEXT: usize = 4096;

/// True for a plain relative path: non-empty components, no `.` or `..`, no NUL, no leading
/// or trailing slash. Restore refuses anything else again; this catches it at the door.
pub fn is_plain_relative(path: &str) -> bool {
    !path.is_empty()
        && path.len() <= MAX_TEXT
        && !path.contains('\0')
        && path
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != ".." && c.len() <= 255)
}

impl ListingEntry {
    /// Checks one decoded line against the format's rules.
    fn check(&self) -> Result<(), String> {
        if !is_plain_relative(&self.path) {
            return Err(format!("path {:?} is not a plain relative path", self.path));
        }
        if self.mode > 0o7777 {
            return Err(format!("mode {:o} has bits beyond 07777", self.mode));
        }
        for name in [&self.user, &self.group].into_iter().flatten() {
            if name.is_empty() || name.len() > 256 || name.contains('\0') {
                return Err("owner name is empty, too long or holds NUL".into());
            }
        }
        match self.kind {
            EntryKind::File => {
                let sha_ok = self
                    .sha256
                    .as_deref()
                    .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()));
                if !sha_ok {
                    return Err("a file needs a 64-digit SHA-256".into());
                }
                if self.target.is_some() {
                    return Err("a file has no symlink target".into());
                }
                if self.chunks.is_empty() != (self.size == 0) {
                    return Err("a file has chunks exactly when it is not empty".into());
                }
            }
            EntryKind::Dir | EntryKind::Symlink => {
                if self.sha256.is_some() || !self.chunks.is_empty() {
                    return Err("only files have content".into());
                }
                let target_ok = match (&self.kind, &self.target) {
                    (EntryKind::Symlink, Some(t)) => {
                        !t.is_empty() && t.len() <= MAX_TEXT && !t.contains('\0')
                    }
                    (EntryKind::Dir, None) => true,
                    _ => false,
                };
                if !target_ok {
                    return Err("a symlink needs a target, a folder has none".into());
                }
            }
        }
        Ok(())
    }
}

/// Decodes a listing (JSON lines), checking each line. Lines are numbered from 1.
pub fn decode_listing(listing: &[u8]) -> Result<Vec<ListingEntry>, FormatError> {
    let mut out = Vec::new();
    for (i, line) in listing
        .split(|b| *b == b'\n')
        .enumerate()
        .filter(|(_, l)| !l.is_empty())
    {
        let bad = |reason: String| FormatError::Listing {
            line: i + 1,
            reason,
        };
        let e: ListingEntry = serde_json::from_slice(line).map_err(|e| bad(e.to_string()))?;
        e.check().map_err(bad)?;
        out.push(e);
    }
    Ok(out)
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

impl SnapshotObject {
    /// Decodes a snapshot object from storage and checks it: a known version, an owner that
    /// is `local` or `tg:<numeric id>`, an absolute root, sane times and counts.
    pub fn decode(bytes: &[u8]) -> Result<SnapshotObject, FormatError> {
        let bad = |m: String| FormatError::Snapshot(m);
        let s: SnapshotObject = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        if s.version == 0 || s.version > SNAPSHOT_VERSION {
            return Err(bad(format!("unknown version {}", s.version)));
        }
        if !is_owner(&s.owner) {
            return Err(bad(format!("owner {:?} is not local or tg:<id>", s.owner)));
        }
        let root_ok = s.root.starts_with('/')
            && s.root.len() <= MAX_TEXT
            && !s.root.contains('\0')
            && (s.root == "/" || is_plain_relative(&s.root[1..]));
        if !root_ok {
            return Err(bad(format!(
                "root {:?} is not a normal absolute path",
                s.root
            )));
        }
        if s.hostname.len() > 256 {
            return Err(bad("host name is too long".into()));
        }
        if s.started_at > s.finished_at {
            return Err(bad("finished before it started".into()));
        }
        Ok(s)
    }
}

/// `local` or `tg:<numeric Telegram user id>`.
pub fn is_owner(owner: &str) -> bool {
    owner == "local"
        || owner.strip_prefix("tg:").is_some_and(|id| {
            !id.is_empty() && id.len() <= 20 && id.bytes().all(|b| b.is_ascii_digit())
        })
}

/// Chunk sizes for listings: smaller than data chunks so a small change in a large tree
/// stores little.
pub const LISTING_CHUNKS: ChunkerParams = ChunkerParams {
    min: 16 * 1024,
    avg: 64 * 1024,
    max: 256 * 1024,
};
/// zstd level for listings and snapshot objects (JSON compresses well). Level 1, not 3: on
/// listings in 64 KiB blocks (`zstd -b -B65536`; 117,410 paths of `/usr` with random hashes),
/// level 1 compressed 283 MB/s to 3.81:1 and level 3 172 MB/s to 3.69:1. Hex hashes, most of a
/// listing, gain nothing from level 3's longer search.
pub const META_COMPRESSION: i32 = 1;
