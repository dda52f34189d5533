//! The resident forward pass's paged KV pool: per layer, K and V in `K`'s buffers with the
//! host pool's layout, and the maintenance the scheduler and the skill store need
//! ([`DeviceKv`]) through the kernels' [`PoolOps`]: block copies, row copies with K turned by
//! a position delta, and one block's values to and from the host.

use std::any::Any;
use std::sync::Arc;

use skillkv_kernels::ops::{KernelOpError, PoolOps};
use skillkv_kernels::reference::kv::{KvShape, flat_slots};
use skillkv_kernels::reference::rope::PairRotation;

use crate::engine::batch::{BLOCK_SIZE, BlockId};
use crate::engine::gguf::ModelConfig;
use crate::engine::kv_pool::{DeviceKv, KvPoolOpError};

/// One layer's K and V.
#[derive(Debug)]
pub(super) struct ResidentLayer<F> {
    pub(super) k: F,
    pub(super) v: F,
}

/// The paged KV pool in `K`'s buffers, laid out as the host pool.
#[derive(Debug)]
pub struct ResidentPool<K: PoolOps> {
    ops: Arc<K>,
    pub(super) layers: Vec<ResidentLayer<K::F32>>,
    pub(super) num_blocks: usize,
    shape: KvShape,
}

impl<K: PoolOps> ResidentPool<K> {
    /// A zeroed pool of `num_blocks` blocks shaped for `config`.
    pub fn new(
        ops: Arc<K>,
        config: &ModelConfig,
        num_blocks: usize,
    ) -> Result<Self, KernelOpError> {
        let shape = config.kv_shape();
        let floats = num_blocks.saturating_mul(shape.block_floats());
        let layers = (0..config.n_layers)
            .map(|_| {
                Ok(ResidentLayer {
                    k: ops.zeros_f32(floats)?,
                    v: ops.zeros_f32(floats)?,
                })
            })
            .collect::<Result<_, KernelOpError>>()?;
        Ok(Self {
            ops,
            layers,
            num_blocks,
            shape,
        })
    }

    /// Blocks in the pool.
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// Layers in the pool.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    fn block_range(&self, block: BlockId) -> std::ops::Range<usize> {
        let floats = self.shape.block_floats();
        block as usize * floats..(block as usize + 1) * floats
    }
}

fn failed(operation: &'static str) -> impl Fn(KernelOpError) -> KvPoolOpError {
    move |source| KvPoolOpError { operation, source }
}

impl<K: PoolOps + 'static> DeviceKv for ResidentPool<K> {
    fn copy_block(&mut self, src: BlockId, dst: BlockId) -> Result<(), KvPoolOpError> {
        let error = failed("copy block");
        let ops = &*self.ops;
        let src = ops
            .upload_indices(&[src], self.num_blocks)
            .map_err(&error)?;
        let dst = ops
            .upload_indices(&[dst], self.num_blocks)
            .map_err(&error)?;
        let block_floats = self.shape.block_floats();
        self.layers.iter_mut().try_for_each(|layer| {
            ops.kv_copy_blocks((&mut layer.k, &mut layer.v), &src, &dst, block_floats)
                .map_err(&error)
        })
    }

    fn copy_rows(
        &mut self,
        (src_table, src_start): (&[BlockId], usize),
        (dst_table, dst_start): (&[BlockId], usize),
        count: usize,
        rotation: Option<&PairRotation>,
    ) -> Result<(), KvPoolOpError> {
        let error = failed("copy rows");
        let ops = &*self.ops;
        let bound = self.num_blocks * BLOCK_SIZE;
        let src_slots = ops
            .upload_indices(&flat_slots(src_table, src_start..src_start + count), bound)
            .map_err(&error)?;
        let dst_slots = ops
            .upload_indices(&flat_slots(dst_table, dst_start..dst_start + count), bound)
            .map_err(&error)?;
        let turn = match rotation {
            Some(rotation) => Some((
                ops.upload_rotation(rotation).map_err(&error)?,
                ops.upload_indices(dst_table, self.num_blocks)
                    .map_err(&error)?,
            )),
            None => None,
        };
        let shape = self.shape;
        for layer in &mut self.layers {
            ops.kv_copy_rows((&mut layer.k, &mut layer.v), &src_slots, &dst_slots, shape)
                .map_err(&error)?;
            if let Some((rotation, table)) = &turn {
                ops.rope_rerotate_k(
                    &mut layer.k,
                    table,
                    dst_start..dst_start + count,
                    rotation,
                    shape,
                )
                .map_err(&error)?;
            }
        }
        Ok(())
    }

    fn read_block(
        &self,
        layer: usize,
        block: BlockId,
    ) -> Result<(Vec<f32>, Vec<f32>), KvPoolOpError> {
        let error = failed("read block");
        let range = self.block_range(block);
        let kv = &self.layers[layer];
        Ok((
            self.ops
                .download_range(&kv.k, range.clone())
                .map_err(&error)?,
            self.ops.download_range(&kv.v, range).map_err(&error)?,
        ))
    }

    fn write_block(
        &mut self,
        layer: usize,
        block: BlockId,
        k: &[f32],
        v: &[f32],
    ) -> Result<(), KvPoolOpError> {
        let error = failed("write block");
        let start = self.block_range(block).start;
        let kv = &mut self.layers[layer];
        self.ops.upload_range(&mut kv.k, start, k).map_err(&error)?;
        self.ops.upload_range(&mut kv.v, start, v).map_err(&error)
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

#[cfg(test)]
#[path = "pool_tests.rs"]
mod tests;
