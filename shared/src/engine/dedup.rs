//! The backup's dedup index: the ids of every chunk stored (or being stored by this run),
//! asked once per chunk read. At a million chunks a hash set of 32-byte ids takes about
//! 70 MB (buckets at most 7/8 full, doubling); a sorted vector takes the ids' own 32 bytes
//! each. So the ids live in a sorted vector (binary search) and the ones this run adds
//! collect in a small hash set that is merged into the vector whenever it fills.
//!
//! An unchanged re-backup asks once per chunk of every file (invariant 1), and a binary
//! search of a vector larger than the caches waits on memory at most of its steps. So a
//! table of where each value of the ids' first two bytes starts narrows the search to a
//! few neighbouring ids first (ids are keyed hashes, spread evenly: at a million ids, about
//! 15 per value; 256 KiB of table), and the search compares ids by their first eight bytes
//! as a number (see [`by_id`]) rather than calling `memcmp` on 32 at every step.

use std::cmp::Ordering;
use std::collections::HashSet;

use crate::format::crypto::ChunkId;

/// New ids held in the hash set before they are merged into the sorted vector: about 3 MB.
const MERGE_AT: usize = 1 << 16;

#[derive(Default)]
pub(super) struct ChunkSet {
    sorted: Vec<ChunkId>,
    /// Where the ids of each first-two-bytes value start in `sorted` (and one past the last
    /// value's end); empty while `sorted` is.
    starts: Vec<u32>,
    recent: HashSet<ChunkId>,
}

/// The bits of an id's start that [`ChunkSet::starts`] is indexed by.
const TABLE_BITS: u32 = 16;

fn bucket(id: &ChunkId) -> usize {
    usize::from(u16::from_be_bytes([id.0[0], id.0[1]])) >> (16 - TABLE_BITS)
}

impl ChunkSet {
    /// The set of `ids` (in any order, duplicates allowed), sorted in place.
    pub(super) fn from_ids(mut ids: Vec<ChunkId>) -> ChunkSet {
        ids.sort_unstable_by(by_id);
        ids.dedup();
        ids.shrink_to_fit();
        let mut set = ChunkSet {
            sorted: ids,
            starts: Vec::new(),
            recent: HashSet::new(),
        };
        set.index();
        set
    }

    pub(super) fn contains(&self, id: &ChunkId) -> bool {
        self.recent.contains(id) || self.in_sorted(id)
    }

    /// Whether `id` is in the sorted vector: a binary search among the ids that start as it
    /// does.
    fn in_sorted(&self, id: &ChunkId) -> bool {
        let among = match self.starts.get(bucket(id)..bucket(id) + 2) {
            Some(&[from, to]) => &self.sorted[from as usize..to as usize],
            _ => &self.sorted[..],
        };
        among.binary_search_by(|c| by_id(c, id)).is_ok()
    }

    /// Builds the table of [`ChunkSet::starts`] for the sorted vector as it is.
    fn index(&mut self) {
        self.starts.clear();
        if self.sorted.is_empty() {
            return;
        }
        let buckets = 1 << TABLE_BITS;
        self.starts.reserve_exact(buckets + 1);
        let mut at = 0;
        for b in 0..buckets {
            while at < self.sorted.len() && bucket(&self.sorted[at]) < b {
                at += 1;
            }
            self.starts.push(at as u32);
        }
        self.starts.push(self.sorted.len() as u32);
    }

    /// Adds `id`; false if it was there already.
    pub(super) fn insert(&mut self, id: ChunkId) -> bool {
        if self.in_sorted(&id) || !self.recent.insert(id) {
            return false;
        }
        if self.recent.len() >= MERGE_AT {
            self.merge();
        }
        true
    }

    /// Merges the recent ids into the sorted vector, from the back, in place.
    fn merge(&mut self) {
        let mut new: Vec<ChunkId> = self.recent.drain().collect();
        new.sort_unstable_by(by_id);
        let old = self.sorted.len();
        self.sorted.reserve_exact(new.len());
        self.sorted.resize(old + new.len(), ChunkId([0; 32]));
        let (mut i, mut j, mut k) = (old, new.len(), old + new.len());
        while j > 0 {
            if i > 0 && self.sorted[i - 1] > new[j - 1] {
                self.sorted[k - 1] = self.sorted[i - 1];
                i -= 1;
            } else {
                self.sorted[k - 1] = new[j - 1];
                j -= 1;
            }
            k -= 1;
        }
        self.index();
    }
}

/// The ids' own order (bytewise), decided by the first eight bytes as a big-endian number
/// unless they are equal: ids are keyed hashes, so they nearly never are.
fn by_id(a: &ChunkId, b: &ChunkId) -> Ordering {
    let head = |c: &ChunkId| u64::from_be_bytes(c.0[..8].try_into().expect("8 bytes"));
    head(a).cmp(&head(b)).then_with(|| a.cmp(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u64) -> ChunkId {
        // Spread over the id space, not in insertion order.
        let mut b = [0u8; 32];
        b[..8].copy_from_slice(&n.wrapping_mul(0x9e37_79b9_7f4a_7c15).to_be_bytes());
        b[31] = n as u8;
        ChunkId(b)
    }

    #[test]
    fn ids_compare_as_their_bytes_do() {
        let mut ids: Vec<ChunkId> = (0..2000).map(id).collect();
        // Ids that share their first eight bytes and differ after.
        for tail in [0_u8, 1, 255, 7] {
            let mut b = [9u8; 32];
            b[31] = tail;
            ids.push(ChunkId(b));
        }
        for a in ids.iter().step_by(7) {
            for b in &ids {
                assert_eq!(by_id(a, b), a.0.cmp(&b.0), "{a:?} {b:?}");
            }
        }
    }

    #[test]
    fn ids_at_either_end_of_the_table_and_in_crowded_buckets_are_found() {
        let mut ids = Vec::new();
        for first in [[0u8, 0], [0, 1], [0x80, 0], [0xff, 0xfe], [0xff, 0xff]] {
            for last in [0u8, 3, 200] {
                let mut b = [7u8; 32];
                b[..2].copy_from_slice(&first);
                b[31] = last;
                ids.push(ChunkId(b));
            }
        }
        let set = ChunkSet::from_ids(ids.clone());
        for c in &ids {
            assert!(set.contains(c), "{c:?}");
            let mut other = *c;
            other.0[31] = 100;
            assert!(!set.contains(&other), "{other:?}");
        }
        assert!(!ChunkSet::default().contains(&ids[0]));
        assert!(!ChunkSet::from_ids(Vec::new()).contains(&ids[0]));
    }

    #[test]
    fn membership_survives_merges_and_duplicates_are_refused() {
        let mut set = ChunkSet::from_ids((0..1000).map(id).chain((0..10).map(id)).collect());
        assert!(set.contains(&id(999)) && !set.contains(&id(1000)));
        assert!(!set.insert(id(5)), "stored already");
        let n = MERGE_AT as u64 * 2 + 17;
        for k in 1000..1000 + n {
            assert!(set.insert(id(k)), "{k} is new");
            assert!(!set.insert(id(k)), "{k} is there now");
        }
        assert!(set.sorted.len() >= MERGE_AT * 2, "merged into the vector");
        assert!(
            set.sorted.windows(2).all(|w| w[0] < w[1]),
            "sorted, no duplicates"
        );
        for k in 0..1000 + n {
            assert!(set.contains(&id(k)), "{k}");
        }
        assert!(!set.contains(&id(1000 + n)));
    }
}
