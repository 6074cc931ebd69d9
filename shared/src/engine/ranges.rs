//! Reading many blobs of one pack: neighbouring blobs coalesced into ranges of a few MiB,
//! several ranges requested at once.
//!
//! Each range read is a round trip to the storage. Over Telegram, 50–150 ms away, a read per
//! blob (thousands of small blobs in a pack) or one range at a time leaves the link idle most
//! of the time; so verify and prune's repack read ranges of whole blobs, skipping only gaps
//! larger than a round trip's worth of bytes, and keep as many ranges requested as the
//! storage's read-ahead holds (they are used in order, so memory stays bounded by it).

use std::ops::Range;

use futures_util::{Stream, StreamExt, stream};

use crate::error::StorageError;
use crate::storage::{ObjectRef, Storage, with_retry};

/// The most one range read spans (unless one blob is larger).
pub(crate) const RANGE_MAX: u64 = 8 << 20;

/// A gap between two blobs read rather than skipped (bytes no one needs, here a pack's dead
/// blobs): 1 MiB crosses a 100 MB/s link in 10 ms, much less than the round trip a separate
/// read costs; Telegram reads whole 4 KiB–1 MiB blocks anyway.
const GAP_MAX: u64 = 1 << 20;

/// One read: bytes `start..end` of the pack, holding blobs `blobs` (indexes into the list the
/// ranges were made from).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct BlobRange {
    pub start: u64,
    pub end: u64,
    pub blobs: Range<usize>,
}

impl BlobRange {
    /// Where the blob at `offset` of `length` bytes lies in this range's bytes.
    pub fn slice(&self, offset: u64, length: u64) -> Range<usize> {
        let s = (offset - self.start) as usize;
        s..s + length as usize
    }
}

/// Groups blobs (`(offset, length)`, sorted by offset) into ranges of at most [`RANGE_MAX`]
/// bytes (a larger blob alone), starting a new range at a gap over [`GAP_MAX`].
pub(crate) fn coalesce(blobs: &[(u64, u64)]) -> Vec<BlobRange> {
    let mut out: Vec<BlobRange> = Vec::new();
    for (i, &(offset, length)) in blobs.iter().enumerate() {
        let end = offset + length;
        if let Some(r) = out.last_mut()
            && offset >= r.end
            && offset - r.end <= GAP_MAX
            && end - r.start <= RANGE_MAX
        {
            r.end = end;
            r.blobs.end = i + 1;
            continue;
        }
        out.push(BlobRange {
            start: offset,
            end,
            blobs: i..i + 1,
        });
    }
    out
}

/// How many ranges to keep requested at once on `storage`.
pub(crate) fn reads_ahead(storage: &dyn Storage) -> usize {
    reads_ahead_of(storage, RANGE_MAX)
}

/// How many reads of about `bytes` each to keep requested at once on `storage`: as many as
/// its read-ahead holds, at least one, at most 64.
pub(crate) fn reads_ahead_of(storage: &dyn Storage, bytes: u64) -> usize {
    (storage.read_ahead() / bytes.max(1)).clamp(1, 64) as usize
}

/// Reads `ranges` of `obj` in order, [`reads_ahead`] of them requested at once, each with the
/// storage's retry policy (`what` names the work in its messages).
pub(crate) fn read<'a>(
    storage: &'a dyn Storage,
    obj: &'a ObjectRef,
    ranges: Vec<BlobRange>,
    what: &'a str,
) -> impl Stream<Item = (BlobRange, Result<Vec<u8>, StorageError>)> + 'a {
    let ahead = reads_ahead(storage);
    stream::iter(ranges)
        .map(move |r| async move {
            let data = with_retry(what, || storage.get_range(obj, r.start, r.end - r.start)).await;
            (r, data)
        })
        .buffered(ahead)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn neighbours_share_a_range_up_to_its_size() {
        let blobs: Vec<(u64, u64)> = (0..20).map(|i| (i * MIB, MIB)).collect();
        let r = coalesce(&blobs);
        assert_eq!(
            r.iter().map(|r| r.blobs.clone()).collect::<Vec<_>>(),
            vec![0..8, 8..16, 16..20]
        );
        assert_eq!((r[1].start, r[1].end), (8 * MIB, 16 * MIB));
        assert_eq!(r[1].slice(9 * MIB, MIB), MIB as usize..2 * MIB as usize);
    }

    #[test]
    fn a_large_gap_or_a_large_blob_starts_a_new_range() {
        let blobs = [
            (0, 100),
            (100 + GAP_MAX, 50), // a gap just small enough: read through
            (100 + GAP_MAX + 51 + GAP_MAX, 10), // one byte too far: a new range
            (4 * GAP_MAX, RANGE_MAX + 1), // larger than a range: alone
            (4 * GAP_MAX + RANGE_MAX + 1, 10),
        ];
        let r = coalesce(&blobs);
        assert_eq!(
            r.iter().map(|r| r.blobs.clone()).collect::<Vec<_>>(),
            vec![0..2, 2..3, 3..4, 4..5]
        );
        assert_eq!(r[0].end, 100 + GAP_MAX + 50);
        assert!(coalesce(&[]).is_empty());
    }
}
