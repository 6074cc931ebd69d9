//! The backup's dedup index: the ids of every chunk stored (or being stored by this run),
//! asked once per chunk read. At a million chunks a hash set of 32-byte ids takes about
//! 70 MB (buckets at most 7/8 full, doubling); a sorted vector takes the ids' own 32 bytes
//! each. So the ids live in a sorted vector (binary search) and the ones this run adds
//! collect in a small hash set that is merged into the vector whenever it fills.

use std::collections::HashSet;

use crate::format::crypto::ChunkId;

/// New ids held in the hash set before they are merged into the sorted vector: about 3 MB.
const MERGE_AT: usize = 1 << 16;

#[derive(Default)]
pub(super) struct ChunkSet {
    sorted: Vec<ChunkId>,
    recent: HashSet<ChunkId>,
}

impl ChunkSet {
    /// The set of `ids` (in any order, duplicates allowed), sorted in place.
    pub(super) fn from_ids(mut ids: Vec<ChunkId>) -> ChunkSet {
        ids.sort_unstable();
        ids.dedup();
        ids.shrink_to_fit();
        ChunkSet {
            sorted: ids,
            recent: HashSet::new(),
        }
    }

    pub(super) fn contains(&self, id: &ChunkId) -> bool {
        self.recent.contains(id) || self.sorted.binary_search(id).is_ok()
    }

    /// Adds `id`; false if it was there already.
    pub(super) fn insert(&mut self, id: ChunkId) -> bool {
        if self.sorted.binary_search(&id).is_ok() || !self.recent.insert(id) {
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
        new.sort_unstable();
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
    }
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
