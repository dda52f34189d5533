//! Property test of the block allocator and radix prefix cache over random operation
//! sequences: sequences that look up, allocate, insert and release chains with shared prefixes,
//! pins and unpins, private blocks, and eviction under pressure. After every operation the
//! cache's own bookkeeping must match a recount, no referenced or pinned block may have been
//! evicted, and at the end every reference and pin returns to zero with no block leaked.

use std::collections::HashMap;

use proptest::prelude::*;
use skillkv_api::block_hash::{BLOCK_TOKENS, BlockHash, HashNamespace};
use skillkv_daemon::engine::batch::BlockId;
use skillkv_daemon::engine::radix::PrefixCache;

const POOL_BLOCKS: usize = 12;

#[derive(Debug, Clone)]
enum Op {
    /// A sequence of `blocks` full blocks: the first `shared` come from prefix family `family`.
    Run {
        family: u32,
        shared: usize,
        blocks: usize,
        adapter: bool,
        salt: u32,
    },
    /// The `n`-th running sequence finishes.
    Finish(usize),
    /// Pin the `n`-th running sequence's chain.
    Pin(usize),
    /// Remove the `n`-th pin.
    Unpin(usize),
    /// Take a private block (never cached).
    Scratch,
    /// Release the `n`-th private block.
    ReleaseScratch(usize),
    /// Evict one cached leaf.
    Evict,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..3u32, 0..5usize, 1..6usize, any::<bool>(), any::<u32>()).prop_map(
            |(family, shared, blocks, adapter, salt)| Op::Run { family, shared, blocks, adapter, salt }
        ),
        3 => any::<usize>().prop_map(Op::Finish),
        1 => any::<usize>().prop_map(Op::Pin),
        1 => any::<usize>().prop_map(Op::Unpin),
        1 => Just(Op::Scratch),
        1 => any::<usize>().prop_map(Op::ReleaseScratch),
        1 => Just(Op::Evict),
    ]
}

fn namespace(adapter: bool) -> HashNamespace {
    HashNamespace {
        model_digest: "m".into(),
        tokenizer_digest: "t".into(),
        adapter_id: adapter.then(|| "lora".to_string()),
        kv_dtype: "f32".into(),
        kv_format_version: 1,
    }
}

fn chain_tokens(family: u32, shared: usize, blocks: usize, salt: u32) -> Vec<u32> {
    (0..blocks)
        .flat_map(|block| {
            let value = if block < shared {
                family * 100 + block as u32
            } else {
                10_000 + salt % 50 + block as u32
            };
            std::iter::repeat_n(value, BLOCK_TOKENS)
        })
        .collect()
}

/// What the test itself holds.
#[derive(Default)]
struct Holders {
    sequences: Vec<Vec<BlockId>>,
    sequence_hashes: Vec<Vec<BlockHash>>,
    pins: Vec<Vec<BlockHash>>,
    scratch: Vec<BlockId>,
}

impl Holders {
    fn references(&self) -> HashMap<BlockId, u32> {
        let mut counts = HashMap::new();
        for &block in self.sequences.iter().flatten().chain(&self.scratch) {
            *counts.entry(block).or_insert(0) += 1;
        }
        counts
    }
}

/// Starts a sequence as the scheduler does; gives up (releasing what it took) under pressure.
fn run(cache: &mut PrefixCache, holders: &mut Holders, hashes: Vec<BlockHash>) {
    let mut held = cache.acquire_prefix(&hashes);
    while held.len() < hashes.len() {
        let Some(block) = cache.allocate() else {
            cache.release_all(held);
            return;
        };
        let index = held.len();
        let parent = index.checked_sub(1).map(|p| hashes[p]);
        held.push(cache.insert(parent, hashes[index], block));
    }
    holders.sequences.push(held);
    holders.sequence_hashes.push(hashes);
}

fn apply(cache: &mut PrefixCache, holders: &mut Holders, op: Op) {
    match op {
        Op::Run {
            family,
            shared,
            blocks,
            adapter,
            salt,
        } => {
            let hashes =
                namespace(adapter).block_hashes(&chain_tokens(family, shared, blocks, salt));
            run(cache, holders, hashes);
        }
        Op::Finish(n) if !holders.sequences.is_empty() => {
            let index = n % holders.sequences.len();
            holders.sequence_hashes.remove(index);
            cache.release_all(holders.sequences.remove(index));
        }
        Op::Pin(n) if !holders.sequences.is_empty() => {
            let hashes = &holders.sequence_hashes[n % holders.sequences.len()];
            let pinned = cache.pin(hashes);
            assert_eq!(
                pinned,
                hashes.len(),
                "a running sequence's chain is fully cached"
            );
            holders.pins.push(hashes.clone());
        }
        Op::Unpin(n) if !holders.pins.is_empty() => {
            let hashes = holders.pins.remove(n % holders.pins.len());
            cache.unpin(&hashes);
        }
        Op::Scratch => holders.scratch.extend(cache.allocate()),
        Op::ReleaseScratch(n) if !holders.scratch.is_empty() => {
            let block = holders.scratch.remove(n % holders.scratch.len());
            cache.release(block);
        }
        Op::Evict => {
            cache.evict_one();
        }
        Op::Finish(_) | Op::Pin(_) | Op::Unpin(_) | Op::ReleaseScratch(_) => {}
    }
}

fn check(cache: &PrefixCache, holders: &Holders) -> Result<(), TestCaseError> {
    if let Err(error) = cache.check_invariants() {
        return Err(TestCaseError::fail(error.to_string()));
    }
    for (block, count) in holders.references() {
        prop_assert!(!cache.is_free(block), "referenced block {block} was freed");
        prop_assert_eq!(
            cache.refcount(block),
            count,
            "references of block {}",
            block
        );
    }
    for (hashes, blocks) in holders.sequence_hashes.iter().zip(&holders.sequences) {
        for (hash, block) in hashes.iter().zip(blocks) {
            prop_assert_eq!(
                cache.block_of(hash),
                Some(*block),
                "a running chain lost a block"
            );
        }
    }
    for hash in holders.pins.iter().flatten() {
        prop_assert!(
            cache.block_of(hash).is_some(),
            "pinned block {hash} was evicted"
        );
    }
    let stats = cache.stats();
    prop_assert_eq!(
        stats.free + stats.cached + stats.pinned + stats.used,
        stats.total
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn eviction_never_frees_referenced_or_pinned_blocks_and_nothing_leaks(
        ops in prop::collection::vec(op(), 1..80)
    ) {
        let mut cache = PrefixCache::new(POOL_BLOCKS);
        let mut holders = Holders::default();
        for op in ops {
            apply(&mut cache, &mut holders, op);
            check(&cache, &holders)?;
        }
        for blocks in std::mem::take(&mut holders.sequences) {
            cache.release_all(blocks);
        }
        holders.sequence_hashes.clear();
        for hashes in std::mem::take(&mut holders.pins) {
            cache.unpin(&hashes);
        }
        for block in std::mem::take(&mut holders.scratch) {
            cache.release(block);
        }
        check(&cache, &holders)?;
        let stats = cache.stats();
        prop_assert_eq!(stats.used, 0);
        prop_assert_eq!(stats.pinned, 0);
        prop_assert_eq!(stats.free + stats.cached, POOL_BLOCKS);
        for block in 0..POOL_BLOCKS as BlockId {
            prop_assert_eq!(cache.refcount(block), 0);
        }
        // Every cached block can still be evicted: nothing is stuck.
        while cache.evict_one() {}
        prop_assert_eq!(cache.stats().free, POOL_BLOCKS);
    }
}
