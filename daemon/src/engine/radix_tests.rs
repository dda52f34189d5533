//! Unit tests of the radix prefix cache (the random-operation property test lives in
//! `daemon/tests/engine_cache_props.rs`).

use skillkv_api::block_hash::{BLOCK_TOKENS, HashNamespace};

use super::*;

fn namespace(adapter: Option<&str>) -> HashNamespace {
    HashNamespace {
        model_digest: "model".into(),
        tokenizer_digest: "tokenizer".into(),
        adapter_id: adapter.map(str::to_owned),
        kv_dtype: "f32".into(),
        kv_format_version: 1,
    }
}

/// Allocates and inserts one block per hash, as a finished sequence would; returns its blocks.
fn store_chain(cache: &mut PrefixCache, hashes: &[BlockHash]) -> Vec<BlockId> {
    let mut held = cache.acquire_prefix(hashes);
    for index in held.len()..hashes.len() {
        let block = cache.allocate().expect("a block for the chain");
        let parent = index.checked_sub(1).map(|p| hashes[p]);
        held.push(cache.insert(parent, hashes[index], block));
    }
    held
}

fn tokens(len: usize, salt: u32) -> Vec<u32> {
    (0..len as u32).map(|t| t * 7 + salt).collect()
}

#[test]
fn released_chains_stay_cached_and_are_found_again() {
    let mut cache = PrefixCache::new(8);
    let hashes = namespace(None).block_hashes(&tokens(3 * BLOCK_TOKENS, 0));
    let blocks = store_chain(&mut cache, &hashes);
    assert_eq!(cache.stats().used, 3);
    cache.release_all(blocks.clone());
    assert_eq!(
        cache.stats(),
        KvStats {
            total: 8,
            free: 5,
            cached: 3,
            pinned: 0,
            used: 0
        }
    );
    // A prompt sharing the first two blocks then diverging reuses exactly those two.
    let mut other = tokens(3 * BLOCK_TOKENS, 0);
    other[2 * BLOCK_TOKENS + 3] = 999;
    let other_hashes = namespace(None).block_hashes(&other);
    let reused = cache.acquire_prefix(&other_hashes);
    assert_eq!(reused, blocks[..2]);
    cache.release_all(reused);
    cache.check_invariants().expect("invariants");
}

#[test]
fn namespaces_never_share_blocks() {
    let mut cache = PrefixCache::new(8);
    let prompt = tokens(2 * BLOCK_TOKENS, 1);
    let base = store_chain(&mut cache, &namespace(None).block_hashes(&prompt));
    cache.release_all(base);
    let adapter_hashes = namespace(Some("lora-a")).block_hashes(&prompt);
    assert_eq!(cache.matched_len(&adapter_hashes), 0);
}

#[test]
fn eviction_takes_least_recently_used_leaves_first_and_never_referenced_or_pinned() {
    let mut cache = PrefixCache::new(4);
    let old = namespace(None).block_hashes(&tokens(2 * BLOCK_TOKENS, 2));
    let pinned = namespace(None).block_hashes(&tokens(BLOCK_TOKENS, 3));
    let old_blocks = store_chain(&mut cache, &old);
    cache.release_all(old_blocks.clone());
    let pinned_blocks = store_chain(&mut cache, &pinned);
    assert_eq!(cache.pin(&pinned), 1);
    cache.release_all(pinned_blocks.clone());
    let held = cache.allocate().expect("the last free block");
    // The free list is empty: the next allocations evict the old chain, tail first.
    let first = cache.allocate().expect("evicts the old chain's leaf");
    assert_eq!(first, old_blocks[1]);
    let second = cache.allocate().expect("then its parent, now a leaf");
    assert_eq!(second, old_blocks[0]);
    assert_eq!(
        cache.allocate(),
        None,
        "pinned and referenced blocks are never evicted"
    );
    assert_eq!(cache.block_of(&pinned[0]), Some(pinned_blocks[0]));
    assert_eq!(
        cache
            .drain_events()
            .iter()
            .filter(|e| matches!(e, CacheEvent::BlockEvicted { .. }))
            .count(),
        2
    );
    cache.release_all(vec![held, first, second]);
    cache.unpin(&pinned);
    assert_eq!(
        cache.stats(),
        KvStats {
            total: 4,
            free: 3,
            cached: 1,
            pinned: 0,
            used: 0
        }
    );
    cache.check_invariants().expect("invariants");
}

#[test]
fn inserting_content_that_is_already_cached_switches_to_the_cached_block() {
    let mut cache = PrefixCache::new(4);
    let hashes = namespace(None).block_hashes(&tokens(BLOCK_TOKENS, 4));
    let first = store_chain(&mut cache, &hashes);
    let duplicate = cache.allocate().expect("a private block");
    let kept = cache.insert(None, hashes[0], duplicate);
    assert_eq!(kept, first[0]);
    assert!(
        cache.is_free(duplicate),
        "the duplicate goes back to the free list"
    );
    assert_eq!(cache.refcount(first[0]), 2);
    cache.release_all(vec![kept]);
    cache.release_all(first);
    cache.check_invariants().expect("invariants");
}

#[test]
fn a_block_whose_parent_is_not_cached_is_not_inserted() {
    let mut cache = PrefixCache::new(4);
    let hashes = namespace(None).block_hashes(&tokens(2 * BLOCK_TOKENS, 5));
    let block = cache.allocate().expect("a block");
    assert_eq!(cache.insert(Some(hashes[0]), hashes[1], block), block);
    assert_eq!(cache.matched_len(&hashes[1..]), 0);
    cache.release(block);
    assert_eq!(cache.stats().free, 4);
}

#[test]
fn stored_and_evicted_events_name_the_blocks() {
    let mut cache = PrefixCache::new(1);
    let hashes = namespace(None).block_hashes(&tokens(BLOCK_TOKENS, 6));
    let blocks = store_chain(&mut cache, &hashes);
    cache.release_all(blocks);
    let evicting = cache.allocate().expect("evicts the cached block");
    cache.release(evicting);
    assert_eq!(
        cache.drain_events(),
        vec![
            CacheEvent::BlockStored {
                hash: hashes[0],
                parent: None
            },
            CacheEvent::BlockEvicted { hash: hashes[0] },
        ]
    );
    assert!(cache.drain_events().is_empty());
}
