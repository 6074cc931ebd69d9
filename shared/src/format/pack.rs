//! Packs: many sealed blobs in one stored object, with a sealed trailer listing them.
//!
//! Layout of `<pack-id>.enc`:
//!
//! ```text
//! blob 0 | blob 1 | ... | blob n-1 | sealed trailer | trailer length (u32 LE) | "STPACK01"
//! ```
//!
//! Each blob is self-describing (see `crypto`). The trailer lists, for every blob, its kind,
//! flags, id, offset, sealed length and plaintext length, so the catalog can be rebuilt from
//! trailers alone. It is sealed like the pack's blobs (encrypted in an encrypted pack), so it is
//! authenticated with the key in either kind of pack (format 2); a format-1 unencrypted pack's
//! trailer carries only a checksum, and [`open_trailer`] refuses it.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

pub use crate::error::PackError;
use crate::format::crypto::{self, ChunkId, Keys, SealMode};

pub const PACK_MAGIC: &[u8; 8] = b"STPACK01";
/// Bytes after the sealed trailer: its length and the magic.
pub const PACK_TAIL_LEN: u64 = 4 + 8;
const ENTRY_LEN: usize = 1 + 1 + 32 + 8 + 4 + 4;
/// Plaintext cap when opening blobs (largest chunk is 4 MiB; listings are smaller).
pub const MAX_BLOB: usize = 16 << 20;
/// Largest sealed blob a trailer may describe (an incompressible `MAX_BLOB`).
pub const MAX_SEALED_BLOB: u64 = (MAX_BLOB + 4 + 16 + 16 + 32) as u64;
/// Largest trailer we accept when reading (about 1.3 million entries).
const MAX_TRAILER: usize = 64 << 20;

/// What a blob holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum BlobKind {
    /// A chunk of file content.
    Data = 0,
    /// A chunk of a snapshot's listing (its entries, one JSON object per line).
    Listing = 1,
    /// A snapshot object (which root, when, which listing chunks).
    Snapshot = 2,
}

impl BlobKind {
    pub fn from_u8(v: u8) -> Option<BlobKind> {
        match v {
            0 => Some(BlobKind::Data),
            1 => Some(BlobKind::Listing),
            2 => Some(BlobKind::Snapshot),
            _ => None,
        }
    }
}

/// Blob flags as stored in the trailer and the catalog: the blob is encrypted.
pub const FLAG_ENCRYPTED: u8 = 1;
/// The blob is authenticated by a MAC (every blob written in format 2; format-1 encrypted
/// blobs are too, without this flag). A blob with neither flag is a format-1 unencrypted one.
pub const FLAG_MAC: u8 = 2;
const KNOWN_ENTRY_FLAGS: u8 = FLAG_ENCRYPTED | FLAG_MAC;

/// True when entry flags describe an authenticated blob.
pub fn flags_authenticated(flags: u8) -> bool {
    flags & (FLAG_ENCRYPTED | FLAG_MAC) != 0
}

/// One blob's place in a pack.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackEntry {
    pub kind: BlobKind,
    pub flags: u8,
    pub id: ChunkId,
    pub offset: u64,
    pub length: u32,
    pub raw_length: u32,
}

/// A random pack id, shown as 32 hex digits; the stored object is `<id>.enc`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PackId(pub String);

impl PackId {
    pub fn random() -> PackId {
        let mut b = [0u8; 16];
        getrandom::fill(&mut b).expect("operating system random source failed");
        PackId(hex::encode(b))
    }
    pub fn object_name(&self) -> String {
        format!("{}.enc", self.0)
    }
    /// The pack id of an object name, if it names a pack.
    pub fn from_object_name(name: &str) -> Option<PackId> {
        let id = name.strip_suffix(".enc")?;
        (id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| PackId(id.to_string()))
    }
}

/// Serializes trailer entries.
/// Most bytes a pack of `blobs` blobs holds besides them: its sealed trailer (one entry a
/// blob) and its tail.
pub fn overhead_bound(blobs: u64) -> u64 {
    super::crypto::sealed_len_bound(4 + blobs as usize * ENTRY_LEN) as u64 + PACK_TAIL_LEN
}

pub fn encode_trailer(entries: &[PackEntry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + entries.len() * ENTRY_LEN);
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for e in entries {
        out.push(e.kind as u8);
        out.push(e.flags);
        out.extend_from_slice(&e.id.0);
        out.extend_from_slice(&e.offset.to_le_bytes());
        out.extend_from_slice(&e.length.to_le_bytes());
        out.extend_from_slice(&e.raw_length.to_le_bytes());
    }
    out
}

/// Parses trailer entries, checking that they describe blobs inside `body_len`.
pub fn decode_trailer(
    pack: &str,
    plain: &[u8],
    body_len: u64,
) -> Result<Vec<PackEntry>, PackError> {
    let bad = |reason: &str| PackError::BadTrailer {
        pack: pack.to_string(),
        reason: reason.to_string(),
    };
    if plain.len() < 4 {
        return Err(bad("trailer is truncated"));
    }
    let n = u32::from_le_bytes(plain[..4].try_into().unwrap()) as usize;
    if plain.len() != 4 + n * ENTRY_LEN {
        return Err(bad("trailer length does not match its entry count"));
    }
    let mut out = Vec::with_capacity(n);
    for rec in plain[4..].chunks_exact(ENTRY_LEN) {
        let kind = BlobKind::from_u8(rec[0]).ok_or_else(|| bad("unknown blob kind"))?;
        if rec[1] & !KNOWN_ENTRY_FLAGS != 0 {
            return Err(bad("unknown blob flags"));
        }
        let e = PackEntry {
            kind,
            flags: rec[1],
            id: ChunkId(rec[2..34].try_into().unwrap()),
            offset: u64::from_le_bytes(rec[34..42].try_into().unwrap()),
            length: u32::from_le_bytes(rec[42..46].try_into().unwrap()),
            raw_length: u32::from_le_bytes(rec[46..50].try_into().unwrap()),
        };
        if e.offset
            .checked_add(u64::from(e.length))
            .is_none_or(|end| end > body_len)
        {
            return Err(bad("an entry points outside the pack"));
        }
        if u64::from(e.length) > MAX_SEALED_BLOB || e.raw_length as usize > MAX_BLOB {
            return Err(bad("an entry is larger than a blob may be"));
        }
        out.push(e);
    }
    Ok(out)
}

/// Parses the 12-byte tail of a pack: the sealed trailer's length.
pub fn decode_tail(pack: &str, tail: &[u8], pack_size: u64) -> Result<u64, PackError> {
    let bad = |reason: &str| PackError::BadTrailer {
        pack: pack.to_string(),
        reason: reason.to_string(),
    };
    if tail.len() != PACK_TAIL_LEN as usize || &tail[4..] != PACK_MAGIC {
        return Err(bad("missing pack magic"));
    }
    let len = u64::from(u32::from_le_bytes(tail[..4].try_into().unwrap()));
    if len as usize > MAX_TRAILER || len + PACK_TAIL_LEN > pack_size {
        return Err(bad("trailer length out of range"));
    }
    Ok(len)
}

/// A pack's table of contents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Trailer {
    pub entries: Vec<PackEntry>,
    /// The pack is encrypted (its trailer, and so every blob in it).
    pub encrypted: bool,
}

/// Opens a sealed trailer (authenticated with `keys`) and decodes it. Every entry must be of
/// the trailer's own kind (encrypted or not): a pack is written all one way.
pub fn open_trailer(
    keys: &Keys,
    pack: &str,
    sealed: &[u8],
    body_len: u64,
) -> Result<Trailer, PackError> {
    let plain = crypto::open(keys, sealed, MAX_TRAILER).map_err(|source| match source {
        crypto::CryptoError::Unauthenticated => PackError::Unauthenticated {
            pack: pack.to_string(),
        },
        source => PackError::Crypto {
            pack: pack.to_string(),
            source,
        },
    })?;
    let encrypted = crypto::sealed_is_encrypted(sealed).map_err(|source| PackError::Crypto {
        pack: pack.to_string(),
        source,
    })?;
    let entries = decode_trailer(pack, &plain, body_len)?;
    if entries
        .iter()
        .any(|e| (e.flags & FLAG_ENCRYPTED != 0) != encrypted)
    {
        return Err(PackError::BadTrailer {
            pack: pack.to_string(),
            reason: "an entry's encryption differs from the pack's".into(),
        });
    }
    Ok(Trailer { entries, encrypted })
}

/// Reads a format-1 unencrypted pack's trailer by its checksum alone. Nothing authenticates
/// it: only for comparing with a catalog that recorded the pack (`verify`).
pub fn open_format1_trailer(
    pack: &str,
    sealed: &[u8],
    body_len: u64,
) -> Result<Vec<PackEntry>, PackError> {
    let plain = crypto::open_format1_unencrypted(sealed, MAX_TRAILER).map_err(|source| {
        PackError::Crypto {
            pack: pack.to_string(),
            source,
        }
    })?;
    decode_trailer(pack, &plain, body_len)
}

/// A pack being written to a spool file.
pub struct PackWriter {
    pub id: PackId,
    path: PathBuf,
    /// Buffered: a pack of small files is a hundred thousand blobs of a few KiB, and one
    /// `write` each (under the packer's lock) cost more than sealing them.
    file: BufWriter<File>,
    size: u64,
    entries: Vec<PackEntry>,
    /// Bytes whose write-back to disk has been started.
    flushed: u64,
}

/// Start write-back every this many bytes, so the fsync before upload finds little to do and
/// dirty pages don't pile up (a 1.9 GiB pack would otherwise be flushed all at once).
const WRITEBACK_STEP: u64 = 32 << 20;

/// The pack file's write buffer.
const WRITE_BUFFER: usize = 1 << 20;

/// Asks the kernel to start writing a range of the file to disk, without waiting for it.
#[cfg(target_os = "linux")]
fn start_writeback(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain syscall on a file descriptor we own; it reads no memory of ours. Its
    // failure only loses the optimisation (the fsync before upload still makes it durable).
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as i64,
            len as i64,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn start_writeback(_file: &File, _offset: u64, _len: u64) {}

/// A pack whose trailer is written: ready for upload.
#[derive(Debug)]
pub struct FinishedPack {
    pub id: PackId,
    pub path: PathBuf,
    pub size: u64,
    pub encrypted: bool,
    pub entries: Vec<PackEntry>,
}

impl PackWriter {
    pub fn create(spool: &Path) -> std::io::Result<PackWriter> {
        let id = PackId::random();
        let path = spool.join(format!("{}.partial", id.0));
        let file = File::create(&path)?;
        Ok(PackWriter {
            id,
            path,
            file: BufWriter::with_capacity(WRITE_BUFFER, file),
            size: 0,
            entries: Vec::new(),
            flushed: 0,
        })
    }

    /// The spool file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes written so far plus the worst-case size of the trailer with one more entry.
    pub fn size_with(&self, blob_len: usize) -> u64 {
        self.size
            + blob_len as u64
            + crypto::sealed_len_bound(4 + (self.entries.len() + 1) * ENTRY_LEN) as u64
            + PACK_TAIL_LEN
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Blobs in the pack so far.
    pub fn blobs(&self) -> usize {
        self.entries.len()
    }

    /// Appends a sealed blob.
    pub fn add(
        &mut self,
        kind: BlobKind,
        id: ChunkId,
        sealed: &[u8],
        raw_length: usize,
        encrypted: bool,
    ) -> std::io::Result<()> {
        self.file.write_all(sealed)?;
        self.entries.push(PackEntry {
            kind,
            flags: FLAG_MAC | if encrypted { FLAG_ENCRYPTED } else { 0 },
            id,
            offset: self.size,
            length: sealed.len() as u32,
            raw_length: raw_length as u32,
        });
        self.size += sealed.len() as u64;
        if self.size - self.flushed >= WRITEBACK_STEP {
            self.file.flush()?;
            start_writeback(self.file.get_ref(), self.flushed, self.size - self.flushed);
            self.flushed = self.size;
        }
        Ok(())
    }

    /// Writes the trailer and closes the file.
    pub fn finish(mut self, mode: SealMode<'_>) -> std::io::Result<FinishedPack> {
        let trailer = crypto::seal(mode, &encode_trailer(&self.entries), None);
        self.file.write_all(&trailer)?;
        self.file.write_all(&(trailer.len() as u32).to_le_bytes())?;
        self.file.write_all(PACK_MAGIC)?;
        self.file.flush()?;
        let size = self.size + trailer.len() as u64 + PACK_TAIL_LEN;
        Ok(FinishedPack {
            id: self.id,
            path: self.path,
            size,
            encrypted: mode.is_encrypted(),
            entries: self.entries,
        })
    }

    /// Drops the spool file of an abandoned pack.
    pub fn discard(self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::crypto::{MasterSecret, plain_chunk_id};

    #[test]
    fn trailer_round_trip_through_a_pack_file() {
        let dir = tempfile::tempdir().unwrap();
        let keys = Keys::derive(&MasterSecret::generate());
        let mut w = PackWriter::create(dir.path()).unwrap();
        let blobs: Vec<Vec<u8>> = (0..5).map(|i| vec![i as u8; 1000 * (i + 1)]).collect();
        for b in &blobs {
            let sealed = crypto::seal(SealMode::Encrypted(&keys), b, None);
            w.add(BlobKind::Data, keys.chunk_id(b), &sealed, b.len(), true)
                .unwrap();
        }
        let bound = w.size_with(0);
        let done = w.finish(SealMode::Encrypted(&keys)).unwrap();
        let bytes = std::fs::read(&done.path).unwrap();
        assert_eq!(bytes.len() as u64, done.size);
        assert!(done.size <= bound);
        let tail = &bytes[bytes.len() - PACK_TAIL_LEN as usize..];
        let tlen = decode_tail("p", tail, done.size).unwrap();
        let body_len = done.size - PACK_TAIL_LEN - tlen;
        let sealed_trailer = &bytes[body_len as usize..(done.size - PACK_TAIL_LEN) as usize];
        let trailer = open_trailer(&keys, "p", sealed_trailer, body_len).unwrap();
        assert!(trailer.encrypted);
        assert_eq!(trailer.entries, done.entries);
        for (e, b) in trailer.entries.iter().zip(&blobs) {
            assert_eq!(e.flags, FLAG_ENCRYPTED | FLAG_MAC);
            let sealed = &bytes[e.offset as usize..(e.offset + u64::from(e.length)) as usize];
            assert_eq!(&crypto::open(&keys, sealed, 1 << 20).unwrap(), b);
        }
        // The trailer can't be read with another key.
        let other = Keys::derive(&MasterSecret::generate());
        assert!(open_trailer(&other, "p", sealed_trailer, body_len).is_err());
        assert!(decode_tail("p", &[0; 12], done.size).is_err());
    }

    #[test]
    fn trailer_rejects_out_of_range_entries() {
        let e = PackEntry {
            kind: BlobKind::Data,
            flags: 0,
            id: plain_chunk_id(b"x"),
            offset: 90,
            length: 20,
            raw_length: 1,
        };
        assert!(decode_trailer("p", &encode_trailer(std::slice::from_ref(&e)), 100).is_err());
        assert!(decode_trailer("p", &encode_trailer(std::slice::from_ref(&e)), 110).is_ok());
        let huge = PackEntry {
            offset: 0,
            length: u32::MAX,
            ..e.clone()
        };
        assert!(decode_trailer("p", &encode_trailer(&[huge]), u64::MAX).is_err());
        let odd_flags = PackEntry { flags: 0x80, ..e };
        assert!(decode_trailer("p", &encode_trailer(&[odd_flags]), 110).is_err());
    }

    #[test]
    fn pack_ids_name_objects() {
        let id = PackId::random();
        assert_eq!(PackId::from_object_name(&id.object_name()), Some(id));
        assert_eq!(PackId::from_object_name("key-00.enc"), None);
    }
}
