//! The KV block allocator: which of the pool's fixed blocks are free and how many running
//! sequences reference each of the others.
//!
//! A block is either *free* (on the free list, no references) or *taken*. A taken block is
//! referenced by zero or more sequences; one with zero references stays taken only while the
//! radix prefix cache ([`crate::engine::radix`]) keeps it as a cached prefix block. The
//! allocator itself knows nothing about the tree: the prefix cache decides when an unreferenced
//! block goes back to the free list.
//!
//! Ownership is explicit rather than by `Drop`: the engine thread is the only owner of the
//! allocator, a sequence's [`BlockTable`] holds one reference per entry, and the prefix cache
//! releases a whole table in one call when the sequence finishes, is preempted or cancelled.

use crate::engine::batch::{BLOCK_SIZE, BlockId};

/// Number of blocks needed to hold `tokens` positions.
pub fn blocks_for_tokens(tokens: usize) -> usize {
    tokens.div_ceil(BLOCK_SIZE)
}

/// Free list and reference counts of a fixed pool of blocks.
#[derive(Debug, Clone)]
pub struct BlockAllocator {
    refcounts: Vec<u32>,
    is_free: Vec<bool>,
    free: Vec<BlockId>,
}

impl BlockAllocator {
    /// An allocator over blocks `0 .. num_blocks`, all free.
    pub fn new(num_blocks: usize) -> Self {
        let top = BlockId::try_from(num_blocks).unwrap_or(BlockId::MAX);
        Self {
            refcounts: vec![0; top as usize],
            is_free: vec![true; top as usize],
            // Reversed so that allocation hands out low ids first (easier to read in logs).
            free: (0..top).rev().collect(),
        }
    }

    /// Number of blocks in the pool.
    pub fn total(&self) -> usize {
        self.refcounts.len()
    }

    /// Number of free blocks.
    pub fn free_count(&self) -> usize {
        self.free.len()
    }

    /// Whether `block` is on the free list.
    pub fn is_free(&self, block: BlockId) -> bool {
        self.is_free.get(block as usize).copied().unwrap_or(false)
    }

    /// References held on `block` by sequences.
    pub fn refcount(&self, block: BlockId) -> u32 {
        self.refcounts.get(block as usize).copied().unwrap_or(0)
    }

    /// Takes a free block with one reference, or `None` when none is free.
    pub fn allocate(&mut self) -> Option<BlockId> {
        let block = self.free.pop()?;
        self.is_free[block as usize] = false;
        self.refcounts[block as usize] = 1;
        Some(block)
    }

    /// Adds a reference to a taken block (a cached block being reused counts as taken).
    pub fn retain(&mut self, block: BlockId) {
        debug_assert!(!self.is_free(block), "retain of free block {block}");
        if let Some(count) = self.refcounts.get_mut(block as usize) {
            *count += 1;
        }
    }

    /// Drops one reference and returns how many remain. The block stays taken: the caller
    /// either keeps it cached or hands it back with [`Self::free_block`].
    pub fn release(&mut self, block: BlockId) -> u32 {
        let Some(count) = self.refcounts.get_mut(block as usize) else {
            return 0;
        };
        debug_assert!(*count > 0, "release of unreferenced block {block}");
        *count = count.saturating_sub(1);
        *count
    }

    /// Puts an unreferenced taken block back on the free list.
    pub fn free_block(&mut self, block: BlockId) {
        let index = block as usize;
        debug_assert_eq!(self.refcount(block), 0, "freeing referenced block {block}");
        if index < self.is_free.len() && !self.is_free[index] {
            self.is_free[index] = true;
            self.free.push(block);
        }
    }
}

/// A sequence's KV blocks in position order; each entry holds one reference.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BlockTable {
    blocks: Vec<BlockId>,
}

impl BlockTable {
    /// The blocks, in position order.
    pub fn blocks(&self) -> &[BlockId] {
        &self.blocks
    }

    /// Number of blocks.
    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    /// Whether the table holds no block.
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// Positions the table can hold.
    pub fn capacity_tokens(&self) -> usize {
        self.blocks.len() * BLOCK_SIZE
    }

    /// Appends a block whose reference the table now owns.
    pub fn push(&mut self, block: BlockId) {
        self.blocks.push(block);
    }

    /// Replaces entry `index` with `block` and returns the old block (whose reference the
    /// caller now owns).
    pub fn replace(&mut self, index: usize, block: BlockId) -> Option<BlockId> {
        self.blocks
            .get_mut(index)
            .map(|slot| std::mem::replace(slot, block))
    }

    /// Empties the table, handing every reference to the caller.
    pub fn take_all(&mut self) -> Vec<BlockId> {
        std::mem::take(&mut self.blocks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_every_block_once_then_runs_out() {
        let mut allocator = BlockAllocator::new(3);
        let mut got: Vec<BlockId> = (0..3).filter_map(|_| allocator.allocate()).collect();
        got.sort_unstable();
        assert_eq!(got, vec![0, 1, 2]);
        assert_eq!(allocator.allocate(), None);
        assert_eq!(allocator.free_count(), 0);
    }

    #[test]
    fn a_block_returns_to_the_free_list_only_when_freed() {
        let mut allocator = BlockAllocator::new(1);
        let block = allocator.allocate().expect("one free block");
        allocator.retain(block);
        assert_eq!(allocator.release(block), 1);
        assert_eq!(allocator.release(block), 0);
        assert!(!allocator.is_free(block));
        allocator.free_block(block);
        assert!(allocator.is_free(block));
        assert_eq!(allocator.allocate(), Some(block));
    }

    #[test]
    fn blocks_for_tokens_rounds_up() {
        assert_eq!(blocks_for_tokens(0), 0);
        assert_eq!(blocks_for_tokens(1), 1);
        assert_eq!(blocks_for_tokens(BLOCK_SIZE), 1);
        assert_eq!(blocks_for_tokens(BLOCK_SIZE + 1), 2);
    }

    #[test]
    fn block_table_hands_back_its_references() {
        let mut table = BlockTable::default();
        table.push(4);
        table.push(7);
        assert_eq!(table.capacity_tokens(), 2 * BLOCK_SIZE);
        assert_eq!(table.replace(1, 9), Some(7));
        assert_eq!(table.take_all(), vec![4, 9]);
        assert!(table.is_empty());
    }
}
