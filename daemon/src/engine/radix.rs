//! The radix prefix cache over full KV blocks, together with the block allocator it manages.
//!
//! Every full block of [`BLOCK_SIZE`] tokens is identified by its chained hash
//! ([`skillkv_api::block_hash`]): the hash covers every token from the start of the prompt and
//! the namespace (model, tokenizer, adapter, KV dtype, KV format), so the tree is a map from
//! hash to node, each node knowing its parent. Namespaces (adapters) therefore live side by side
//! in one map without ever sharing a node.
//!
//! * Lookup walks a prompt's block hashes while they are present and takes one reference per
//!   matched block for the sequence that will read it.
//! * References protect the blocks of running sequences; pins (skills) protect whole prefixes.
//! * Only unreferenced, unpinned *leaves* are evicted, least recently used first, and only when
//!   an allocation finds the free list empty. Because sequences reference and pins cover whole
//!   chains from the root, every cached block becomes an evictable leaf in turn, so
//!   `free + cached` blocks are always available to allocation.
//! * Stored and evicted blocks are recorded as [`CacheEvent`]s for the admin event stream.

use std::collections::{BTreeSet, HashMap};

use serde::Serialize;
use skillkv_api::block_hash::BlockHash;

use crate::engine::batch::BlockId;
use crate::engine::blocks::BlockAllocator;
use crate::engine::stats::KvStats;

/// A change to the set of cached prefix blocks, for the router's prefix index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum CacheEvent {
    /// A block was added to the prefix cache.
    #[serde(rename_all = "camelCase")]
    BlockStored {
        /// The block's chained hash.
        hash: BlockHash,
        /// The previous block's hash, `None` for a prompt's first block.
        parent: Option<BlockHash>,
    },
    /// A block was evicted from the prefix cache.
    #[serde(rename_all = "camelCase")]
    BlockEvicted {
        /// The block's chained hash.
        hash: BlockHash,
    },
}

/// How a tree node counts in [`KvStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NodeClass {
    /// Held by at least one pin.
    Pinned,
    /// Referenced by a sequence, not pinned.
    Referenced,
    /// Neither: evictable once it is a leaf.
    Cached,
}

#[derive(Debug, Clone)]
struct Node {
    block: BlockId,
    parent: Option<BlockHash>,
    children: u32,
    pins: u32,
    last_used: u64,
    /// The class this node is currently counted as.
    counted_as: NodeClass,
    /// Its key in the eviction set, when it is in there.
    eviction_key: Option<(u64, BlockHash)>,
}

/// A broken internal invariant of the prefix cache, found by [`PrefixCache::check_invariants`].
#[derive(Debug, thiserror::Error)]
#[error("prefix cache invariant broken: {0}")]
pub struct CheckCacheInvariantsError(String);

/// The block allocator plus the radix tree of cached prefix blocks.
#[derive(Debug)]
pub struct PrefixCache {
    allocator: BlockAllocator,
    nodes: HashMap<BlockHash, Node>,
    node_of_block: Vec<Option<BlockHash>>,
    /// Unreferenced, unpinned leaves by (last use, hash): the LRU eviction order.
    evictable: BTreeSet<(u64, BlockHash)>,
    cached: usize,
    pinned: usize,
    clock: u64,
    events: Vec<CacheEvent>,
}

impl PrefixCache {
    /// A cache over a pool of `num_blocks` blocks, all free.
    pub fn new(num_blocks: usize) -> Self {
        let allocator = BlockAllocator::new(num_blocks);
        let total = allocator.total();
        Self {
            allocator,
            nodes: HashMap::new(),
            node_of_block: vec![None; total],
            evictable: BTreeSet::new(),
            cached: 0,
            pinned: 0,
            clock: 0,
            events: Vec::new(),
        }
    }

    /// Where every block is.
    pub fn stats(&self) -> KvStats {
        let total = self.allocator.total();
        let free = self.allocator.free_count();
        KvStats {
            total,
            free,
            cached: self.cached,
            pinned: self.pinned,
            used: total - free - self.cached - self.pinned,
        }
    }

    /// Blocks an allocation can get right now (free plus evictable).
    pub fn available(&self) -> usize {
        self.allocator.free_count() + self.cached
    }

    /// References held on `block`.
    pub fn refcount(&self, block: BlockId) -> u32 {
        self.allocator.refcount(block)
    }

    /// Whether `block` is on the free list.
    pub fn is_free(&self, block: BlockId) -> bool {
        self.allocator.is_free(block)
    }

    /// The block cached under `hash`, if any.
    pub fn block_of(&self, hash: &BlockHash) -> Option<BlockId> {
        self.nodes.get(hash).map(|node| node.block)
    }

    /// How many leading `hashes` are cached, without taking references.
    pub fn matched_len(&self, hashes: &[BlockHash]) -> usize {
        hashes
            .iter()
            .take_while(|hash| self.nodes.contains_key(hash))
            .count()
    }

    /// The blocks of the longest cached prefix of `hashes`, with one reference taken on each
    /// for the caller.
    pub fn acquire_prefix(&mut self, hashes: &[BlockHash]) -> Vec<BlockId> {
        let matched = self.matched_len(hashes);
        let now = self.tick();
        hashes[..matched]
            .iter()
            .map(|hash| {
                let block = self.nodes[hash].block;
                self.allocator.retain(block);
                if let Some(node) = self.nodes.get_mut(hash) {
                    node.last_used = now;
                }
                self.refresh(hash);
                block
            })
            .collect()
    }

    /// A block with one reference for the caller, evicting the least recently used cached leaf
    /// when no block is free. `None` when every block is referenced or pinned.
    pub fn allocate(&mut self) -> Option<BlockId> {
        if self.allocator.free_count() == 0 {
            self.evict_one();
        }
        self.allocator.allocate()
    }

    /// Drops the caller's reference on `block`. An unreferenced block stays cached if it is in
    /// the tree and goes back to the free list otherwise.
    pub fn release(&mut self, block: BlockId) {
        if self.allocator.release(block) > 0 {
            return;
        }
        match self.node_of_block.get(block as usize).copied().flatten() {
            Some(hash) => {
                let now = self.tick();
                if let Some(node) = self.nodes.get_mut(&hash) {
                    node.last_used = now;
                }
                self.refresh(&hash);
            }
            None => self.allocator.free_block(block),
        }
    }

    /// Releases every block of a table, last block first so that a chain's tail is evicted
    /// before its head.
    pub fn release_all(&mut self, blocks: Vec<BlockId>) {
        for block in blocks.into_iter().rev() {
            self.release(block);
        }
    }

    /// Records that the caller's `block` (holding one reference) contains the full block
    /// `hash` whose predecessor is `parent`. Returns the block the caller should hold from now
    /// on: its own, or — when the same content is already cached in another block — the cached
    /// one (with a reference taken, and the caller's block released).
    ///
    /// A block whose parent is not cached is not inserted (the tree only holds whole chains).
    pub fn insert(
        &mut self,
        parent: Option<BlockHash>,
        hash: BlockHash,
        block: BlockId,
    ) -> BlockId {
        if let Some(existing) = self.nodes.get(&hash).map(|node| node.block) {
            if existing != block {
                self.allocator.retain(existing);
                self.refresh(&hash);
                self.release(block);
            }
            return existing;
        }
        if let Some(parent_hash) = parent
            && !self.nodes.contains_key(&parent_hash)
        {
            tracing::debug!(%hash, %parent_hash, "not caching a block whose parent is not cached");
            return block;
        }
        if self
            .node_of_block
            .get(block as usize)
            .is_none_or(|owner| owner.is_some())
        {
            tracing::error!(block, %hash, "block is already cached under another hash");
            return block;
        }
        let now = self.tick();
        self.nodes.insert(
            hash,
            Node {
                block,
                parent,
                children: 0,
                pins: 0,
                last_used: now,
                counted_as: NodeClass::Referenced,
                eviction_key: None,
            },
        );
        self.node_of_block[block as usize] = Some(hash);
        self.refresh(&hash);
        if let Some(parent_hash) = parent {
            if let Some(parent_node) = self.nodes.get_mut(&parent_hash) {
                parent_node.children += 1;
            }
            self.refresh(&parent_hash);
        }
        self.events.push(CacheEvent::BlockStored { hash, parent });
        block
    }

    /// Pins the longest cached prefix of `hashes` and returns how many blocks it pinned; pass
    /// exactly those to [`Self::unpin`] later.
    pub fn pin(&mut self, hashes: &[BlockHash]) -> usize {
        let matched = self.matched_len(hashes);
        for hash in &hashes[..matched] {
            if let Some(node) = self.nodes.get_mut(hash) {
                node.pins += 1;
            }
            self.refresh(hash);
        }
        matched
    }

    /// Removes one pin from each of `hashes` (which a [`Self::pin`] call pinned).
    pub fn unpin(&mut self, hashes: &[BlockHash]) {
        let now = self.tick();
        for hash in hashes.iter().rev() {
            if let Some(node) = self.nodes.get_mut(hash) {
                debug_assert!(node.pins > 0, "unpin of unpinned block {hash}");
                node.pins = node.pins.saturating_sub(1);
                node.last_used = now;
            }
            self.refresh(hash);
        }
    }

    /// Evicts the least recently used evictable leaf; false when there is none.
    pub fn evict_one(&mut self) -> bool {
        let Some((_, hash)) = self.evictable.pop_first() else {
            return false;
        };
        let Some(node) = self.nodes.remove(&hash) else {
            return false;
        };
        self.cached -= 1;
        self.node_of_block[node.block as usize] = None;
        self.allocator.free_block(node.block);
        if let Some(parent_hash) = node.parent {
            if let Some(parent_node) = self.nodes.get_mut(&parent_hash) {
                parent_node.children = parent_node.children.saturating_sub(1);
            }
            self.refresh(&parent_hash);
        }
        self.events.push(CacheEvent::BlockEvicted { hash });
        true
    }

    /// Takes the events recorded since the last call.
    pub fn drain_events(&mut self) -> Vec<CacheEvent> {
        std::mem::take(&mut self.events)
    }

    /// Recounts everything from scratch and compares with the incremental bookkeeping.
    pub fn check_invariants(&self) -> Result<(), CheckCacheInvariantsError> {
        let fail = |message: String| Err(CheckCacheInvariantsError(message));
        let (mut cached, mut pinned) = (0, 0);
        let mut evictable = BTreeSet::new();
        for (hash, node) in &self.nodes {
            if self.allocator.is_free(node.block) {
                return fail(format!("cached block {} is on the free list", node.block));
            }
            if self.node_of_block[node.block as usize] != Some(*hash) {
                return fail(format!("block {} does not map back to {hash}", node.block));
            }
            if let Some(parent) = node.parent
                && !self.nodes.contains_key(&parent)
            {
                return fail(format!("parent of {hash} is missing"));
            }
            let children = self
                .nodes
                .values()
                .filter(|other| other.parent == Some(*hash))
                .count();
            if children != node.children as usize {
                return fail(format!(
                    "{hash} counts {} children, has {children}",
                    node.children
                ));
            }
            match self.class_of(node) {
                NodeClass::Pinned => pinned += 1,
                NodeClass::Referenced => {}
                NodeClass::Cached => {
                    cached += 1;
                    if node.children == 0 {
                        evictable.insert((node.last_used, *hash));
                    }
                }
            }
        }
        if (cached, pinned) != (self.cached, self.pinned) {
            return fail(format!(
                "counted cached/pinned {}/{} but found {cached}/{pinned}",
                self.cached, self.pinned
            ));
        }
        if evictable != self.evictable {
            return fail("eviction set differs from the unreferenced unpinned leaves".into());
        }
        for block in 0..self.allocator.total() {
            let id = block as BlockId;
            if self.allocator.is_free(id) && self.allocator.refcount(id) != 0 {
                return fail(format!("free block {block} has references"));
            }
            let taken_unreferenced =
                !self.allocator.is_free(id) && self.allocator.refcount(id) == 0;
            if taken_unreferenced && self.node_of_block[block].is_none() {
                return fail(format!(
                    "block {block} leaked: taken, unreferenced, not cached"
                ));
            }
        }
        Ok(())
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    fn class_of(&self, node: &Node) -> NodeClass {
        if node.pins > 0 {
            NodeClass::Pinned
        } else if self.allocator.refcount(node.block) > 0 {
            NodeClass::Referenced
        } else {
            NodeClass::Cached
        }
    }

    /// Brings the counters and the eviction set in line with `hash`'s current state.
    fn refresh(&mut self, hash: &BlockHash) {
        let Some(node) = self.nodes.get(hash) else {
            return;
        };
        let class = self.class_of(node);
        let key =
            (class == NodeClass::Cached && node.children == 0).then_some((node.last_used, *hash));
        let (old_class, old_key) = (node.counted_as, node.eviction_key);
        for (which, delta) in [(old_class, -1isize), (class, 1)] {
            match which {
                NodeClass::Pinned => self.pinned = self.pinned.wrapping_add_signed(delta),
                NodeClass::Cached => self.cached = self.cached.wrapping_add_signed(delta),
                NodeClass::Referenced => {}
            }
        }
        if old_key != key {
            if let Some(old) = old_key {
                self.evictable.remove(&old);
            }
            if let Some(new) = key {
                self.evictable.insert(new);
            }
        }
        if let Some(node) = self.nodes.get_mut(hash) {
            node.counted_as = class;
            node.eviction_key = key;
        }
    }
}

#[cfg(test)]
#[path = "radix_tests.rs"]
mod tests;
