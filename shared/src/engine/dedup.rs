//! The backup's dedup index: the ids of every chunk stored (or being stored by this run),
//! asked once per chunk read. At a million chunks a hash set of 32-byte ids takes about
//! 70 MB (buckets at most 7/8 full, doubling); a sorted vector takes the ids' own 32 bytes
//! each. So the ids live in a sorted vector (binary search) and the ones this run adds
//! collect in a small hash set that is merged into the vector whenever it fills.
//!
//! An unchanged re-backup asks once per chunk of every file (invariant 1), so the search
//! compares ids by their first eight bytes as a number (see [`by_id`]) rather than calling
//! `memcmp` on 32 at every step.

use std::cmp::Ordering;
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
        ids.sort_unstable_by(by_id);
        ids.dedup();
        ids.shrink_to_fit();
        ChunkSet {
            sorted: ids,
            recent: HashSet::new(),
        }
    }

    pub(super) fn contains(&self, id: &ChunkId) -> bool {
        self.recent.contains(id) || self.sorted.binary_search_by(|c| by_id(c, id)).is_ok()
    }

    /// Adds `id`; false if it was there already.
    pub(super) fn insert(&mut self, id: ChunkId) -> bool {
        if self.sorted.binary_search_by(|c| by_id(c, &id)).is_ok() || !self.recent.insert(id) {
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
