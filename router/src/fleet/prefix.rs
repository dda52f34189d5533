//! A bounded set of the prefix blocks one daemon holds, fed by its `blockStored` and
//! `blockEvicted` events. The bound is the daemon's own pool ([`PrefixIndex::fit_to_pool`],
//! once its snapshot reports it) under the router's `--prefix-index-blocks` limit: an index as
//! large as the pool never forgets a block the daemon still holds, since the daemon reports
//! every eviction. Beyond the limit, the least recently *used* blocks are forgotten first —
//! stored or, like the daemon's own LRU, hit: routing a request to the daemon refreshes the
//! blocks it is about to reuse ([`PrefixIndex::touch`]), since a hit emits no event. A block
//! the router forgets only costs a missed preference, never a wrong answer.

use std::collections::{HashMap, VecDeque};

use skillkv_api::block_hash::BlockHash;

/// The blocks of one daemon.
#[derive(Debug, Clone)]
pub struct PrefixIndex {
    /// The router's limit (`--prefix-index-blocks`).
    limit: usize,
    /// Blocks kept: the limit, or the daemon's pool when that is smaller.
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
            limit: capacity.max(1),
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

    /// Blocks kept at most.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bounds the index by the daemon's pool of `pool_blocks` blocks (it can hold no more),
    /// within the router's limit.
    pub fn fit_to_pool(&mut self, pool_blocks: usize) {
        self.capacity = self.limit.min(pool_blocks.max(1));
        self.forget_beyond_capacity();
    }

    /// Records a stored block (again: it becomes the newest).
    pub fn insert(&mut self, hash: BlockHash) {
        self.refresh(hash);
        self.forget_beyond_capacity();
    }

    /// Marks a held block as just used (the daemon is about to reuse it); `false` when it is
    /// not held.
    pub fn touch(&mut self, hash: &BlockHash) -> bool {
        if !self.blocks.contains_key(hash) {
            return false;
        }
        self.refresh(*hash);
        self.forget_beyond_capacity();
        true
    }

    fn refresh(&mut self, hash: BlockHash) {
        let sequence = self.next;
        self.next += 1;
        self.blocks.insert(hash, sequence);
        self.order.push_back((hash, sequence));
    }

    fn forget_beyond_capacity(&mut self) {
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
    fn a_touched_block_outlives_newer_insertions() {
        let mut index = PrefixIndex::new(2);
        index.insert(hash(1));
        index.insert(hash(2));
        assert!(index.touch(&hash(1)), "held blocks can be touched");
        assert!(!index.touch(&hash(9)), "a block not held is not added");
        index.insert(hash(3));
        assert_eq!(index.len(), 2);
        assert!(index.contains(&hash(1)), "the touched block is kept");
        assert!(
            !index.contains(&hash(2)),
            "the least recently used one goes"
        );
        assert!(index.contains(&hash(3)));
    }

    #[test]
    fn is_bounded_by_the_daemons_pool_within_the_limit() {
        let mut index = PrefixIndex::new(8);
        for n in 1..=6 {
            index.insert(hash(n));
        }
        index.fit_to_pool(4);
        assert_eq!(index.capacity(), 4);
        assert_eq!(index.len(), 4, "shrinking forgets the oldest at once");
        assert!(!index.contains(&hash(2)) && index.contains(&hash(3)));
        index.fit_to_pool(1_000);
        assert_eq!(index.capacity(), 8, "never above the router's limit");
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
