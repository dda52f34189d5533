//! A bounded set of the prefix blocks one daemon holds, fed by its `blockStored` and
//! `blockEvicted` events. When full, the oldest insertions are forgotten first: the daemon
//! evicts least-recently-used blocks, and a block the router forgets only costs a missed
//! preference, never a wrong answer.

use std::collections::{HashMap, VecDeque};

use skillkv_api::block_hash::BlockHash;

/// The blocks of one daemon.
#[derive(Debug, Clone)]
pub struct PrefixIndex {
    capacity: usize,
    /// Block → the insertion sequence number that is current for it.
    blocks: HashMap<BlockHash, u64>,
    /// Insertions in order; entries whose number is no longer current are stale.
    order: VecDeque<(BlockHash, u64)>,
    next: u64,
}

impl PrefixIndex {
    /// An empty index that keeps at most `capacity` blocks.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            blocks: HashMap::new(),
            order: VecDeque::new(),
            next: 0,
        }
    }

    /// Blocks held.
    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    /// Whether no block is held.
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// Records a stored block (again: it becomes the newest).
    pub fn insert(&mut self, hash: BlockHash) {
        let sequence = self.next;
        self.next += 1;
        self.blocks.insert(hash, sequence);
        self.order.push_back((hash, sequence));
        while self.blocks.len() > self.capacity {
            let Some((oldest, seq)) = self.order.pop_front() else {
                break;
            };
            if self.blocks.get(&oldest) == Some(&seq) {
                self.blocks.remove(&oldest);
            }
        }
        // Stale entries are dropped lazily; keep the queue from growing without bound.
        if self.order.len() > 2 * self.capacity + 16 {
            let blocks = &self.blocks;
            self.order.retain(|(h, s)| blocks.get(h) == Some(s));
        }
    }

    /// Records an evicted block.
    pub fn remove(&mut self, hash: &BlockHash) {
        self.blocks.remove(hash);
    }

    /// Forgets everything (after missed events).
    pub fn clear(&mut self) {
        self.blocks.clear();
        self.order.clear();
    }

    /// Whether `hash` is held.
    pub fn contains(&self, hash: &BlockHash) -> bool {
        self.blocks.contains_key(hash)
    }

    /// How many leading blocks of `chain` (a prompt's chained block hashes) are held.
    pub fn matched_prefix(&self, chain: &[BlockHash]) -> usize {
        chain
            .iter()
            .take_while(|hash| self.blocks.contains_key(*hash))
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(n: u8) -> BlockHash {
        BlockHash([n; 32])
    }

    #[test]
    fn matches_the_longest_held_prefix_only() {
        let mut index = PrefixIndex::new(16);
        for n in [1, 2, 4] {
            index.insert(hash(n));
        }
        assert_eq!(
            index.matched_prefix(&[hash(1), hash(2), hash(3), hash(4)]),
            2
        );
        assert_eq!(index.matched_prefix(&[hash(9), hash(1)]), 0);
        index.remove(&hash(1));
        assert_eq!(index.matched_prefix(&[hash(1), hash(2)]), 0);
    }

    #[test]
    fn forgets_the_oldest_insertions_beyond_capacity() {
        let mut index = PrefixIndex::new(2);
        index.insert(hash(1));
        index.insert(hash(2));
        index.insert(hash(1)); // refreshed: now newer than 2
        index.insert(hash(3));
        assert_eq!(index.len(), 2);
        assert_eq!(index.matched_prefix(&[hash(1)]), 1);
        assert_eq!(index.matched_prefix(&[hash(2)]), 0);
        assert_eq!(index.matched_prefix(&[hash(3)]), 1);
    }

    #[test]
    fn stays_bounded_under_churn() {
        let mut index = PrefixIndex::new(4);
        for round in 0..1000u32 {
            index.insert(BlockHash([(round % 7) as u8; 32]));
        }
        assert!(index.len() <= 4);
        assert!(index.order.len() <= 2 * 4 + 16);
    }
}
