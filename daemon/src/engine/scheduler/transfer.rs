//! Moving a pinned prefix's KV out of the pool and back in: what the node's skill store
//! ([`crate::skills::store`]) saves after a prefill and loads at start instead of recomputing.

use std::sync::Arc;

use skillkv_api::block_hash::{BlockHash, block_hashes_from};

use crate::engine::batch::{BLOCK_SIZE, BlockId};
use crate::engine::handle::{PinId, PinnedPrefix};
use crate::engine::kv_pool::{KvPool, KvPoolOpError};

use super::{ForwardModel, Scheduler};

/// The KV of a run of full blocks: per layer, K and V of every block, block after block, in the
/// pool's layout.
#[derive(Debug, Clone, PartialEq)]
pub struct PrefixKv {
    /// Floats of K (or V) per block and layer.
    pub block_floats: usize,
    /// Blocks covered.
    pub blocks: usize,
    /// `(k, v)` per layer, each `blocks * block_floats` long.
    pub layers: Vec<(Vec<f32>, Vec<f32>)>,
}

/// Why a prefix could not be brought into the pool.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ImportPrefixError {
    /// The KV does not match the model's layers and block shape or the token count.
    #[error("the stored KV has the wrong shape: {0}")]
    Shape(String),
    /// Not enough blocks can be freed.
    #[error("no free KV block for the prefix ({needed} needed)")]
    NoSpace {
        /// Blocks needed.
        needed: usize,
    },
    /// The engine thread is gone.
    #[error("the engine is not running")]
    EngineStopped,
    /// The device failed to take the values.
    #[error("the stored KV could not be written into the pool")]
    Write(#[source] Arc<KvPoolOpError>),
}

impl<M: ForwardModel> Scheduler<M> {
    /// The KV of the blocks of pin `pin_id`, `None` for an unknown pin.
    pub fn export_pin(&self, pin_id: PinId) -> Result<Option<PrefixKv>, KvPoolOpError> {
        let Some(hashes) = self.pins.get(&pin_id.0) else {
            return Ok(None);
        };
        let Some(blocks) = hashes
            .iter()
            .map(|hash| self.cache.block_of(hash))
            .collect::<Option<Vec<BlockId>>>()
        else {
            return Ok(None);
        };
        let block_floats = KvPool::floats_per_block_layer(self.model.config());
        let layers = (0..self.kv.num_layers())
            .map(|layer| {
                let mut k = Vec::with_capacity(blocks.len() * block_floats);
                let mut v = Vec::with_capacity(blocks.len() * block_floats);
                for &block in &blocks {
                    let (block_k, block_v) = self.kv.read_block(layer, block)?;
                    k.extend_from_slice(&block_k);
                    v.extend_from_slice(&block_v);
                }
                Ok((k, v))
            })
            .collect::<Result<_, KvPoolOpError>>()?;
        Ok(Some(PrefixKv {
            block_floats,
            blocks: blocks.len(),
            layers,
        }))
    }

    /// Writes `kv` as the full blocks of `tokens` (chained from `root`), inserts them into the
    /// prefix cache and pins them. Blocks already cached are reused, not overwritten.
    pub fn import_pinned(
        &mut self,
        root: BlockHash,
        tokens: &[u32],
        kv: &PrefixKv,
    ) -> Result<PinnedPrefix, ImportPrefixError> {
        let hashes = block_hashes_from(root, tokens);
        let block_floats = KvPool::floats_per_block_layer(self.model.config());
        let shape_ok = kv.blocks == hashes.len()
            && kv.block_floats == block_floats
            && kv.layers.len() == self.kv.num_layers()
            && kv
                .layers
                .iter()
                .all(|(k, v)| k.len() == kv.blocks * block_floats && v.len() == k.len());
        if !shape_ok {
            return Err(ImportPrefixError::Shape(format!(
                "{} blocks × {} floats × {} layers for {} full blocks of tokens; the model needs {} \
                 floats × {} layers",
                kv.blocks,
                kv.block_floats,
                kv.layers.len(),
                hashes.len(),
                block_floats,
                self.kv.num_layers()
            )));
        }
        let mut held = self.cache.acquire_prefix(&hashes);
        let cached = held.len();
        for (index, hash) in hashes.iter().enumerate().skip(cached) {
            let Some(block) = self.cache.allocate() else {
                self.cache.release_all(held);
                self.publish_cache_events();
                return Err(ImportPrefixError::NoSpace {
                    needed: hashes.len() - index,
                });
            };
            let range = index * block_floats..(index + 1) * block_floats;
            let written = kv
                .layers
                .iter()
                .enumerate()
                .try_for_each(|(layer, (k, v))| {
                    self.kv
                        .write_block(layer, block, &k[range.clone()], &v[range.clone()])
                });
            if let Err(error) = written {
                // The block holds partial values: it goes back to the free list unregistered.
                self.cache.release(block);
                self.cache.release_all(held);
                self.publish_cache_events();
                return Err(ImportPrefixError::Write(Arc::new(error)));
            }
            let parent = index.checked_sub(1).map(|previous| hashes[previous]);
            held.push(self.cache.insert(parent, *hash, block));
        }
        let pinned = self.cache.pin(&hashes);
        self.cache.release_all(held);
        let id = self.next_pin;
        self.next_pin += 1;
        let pinned_hashes = hashes[..pinned].to_vec();
        self.pins.insert(id, pinned_hashes.clone());
        self.publish_cache_events();
        tracing::info!(pinned_blocks = pinned, "prefix imported and pinned");
        Ok(PinnedPrefix {
            id: PinId(id),
            pinned_tokens: pinned * BLOCK_SIZE,
            cached_tokens: cached * BLOCK_SIZE,
            hashes: pinned_hashes,
        })
    }
}
