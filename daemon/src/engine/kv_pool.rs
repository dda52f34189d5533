//! The paged KV storage: for every layer, K and V for `num_blocks` blocks of [`BLOCK_SIZE`]
//! tokens, in f32. The scheduler owns the pool and decides which block holds which positions
//! (block tables); the model reads and writes it during the forward pass.
//!
//! Layout of one block of one layer: K is `[kv_head][head_dim][slot]` (transposed, so the scores
//! of one query against the block's 16 slots are 16-lane vector FMAs with no horizontal sums) and
//! V is `[kv_head][slot][head_dim]`. Attention for one KV head over one block reads one contiguous
//! run of `BLOCK_SIZE * head_dim` floats from each.
//!
//! Besides whole blocks (copy-on-write), the pool copies single token rows between sequences:
//! modular skill assembly moves a skill's independently prefilled KV to another position of a
//! request, turning K by the position delta with the kernels' RoPE reference.
//!
//! The values live in host memory (the CPU forward pass) or in a device's buffers
//! ([`DeviceKv`]: the resident forward pass on a GPU); the scheduler, prefix cache and skill
//! store use the same [`KvPool`] either way. Device operations can fail ([`KvPoolOpError`]);
//! host ones cannot.

use std::any::Any;

use skillkv_kernels::ops::KernelOpError;
use skillkv_kernels::reference::kv::{self, KvShape};
use skillkv_kernels::reference::rope::{PairRotation, rerotate_k};

use crate::engine::batch::{BLOCK_SIZE, BlockId};
use crate::engine::gguf::ModelConfig;

/// A pool operation the device refused or failed (host pools never fail).
#[derive(Debug, thiserror::Error)]
#[error("{operation} in the KV pool failed")]
pub struct KvPoolOpError {
    /// What was being done (`copy block`, `copy rows`, `read block`, `write block`).
    pub operation: &'static str,
    /// The device's error.
    #[source]
    pub source: KernelOpError,
}

/// A pool kept where the kernels run (the resident forward pass's,
/// [`ResidentPool`](crate::engine::model::resident::ResidentPool)), as [`KvPool`] drives it.
/// Arguments arrive checked against the pool's geometry.
pub trait DeviceKv: Send + std::fmt::Debug + Any {
    /// [`KvPool::copy_block`].
    fn copy_block(&mut self, src: BlockId, dst: BlockId) -> Result<(), KvPoolOpError>;

    /// [`KvPool::copy_rows`].
    fn copy_rows(
        &mut self,
        src: (&[BlockId], usize),
        dst: (&[BlockId], usize),
        count: usize,
        rotation: Option<&PairRotation>,
    ) -> Result<(), KvPoolOpError>;

    /// [`KvPool::read_block`].
    fn read_block(
        &self,
        layer: usize,
        block: BlockId,
    ) -> Result<(Vec<f32>, Vec<f32>), KvPoolOpError>;

    /// [`KvPool::write_block`].
    fn write_block(
        &mut self,
        layer: usize,
        block: BlockId,
        k: &[f32],
        v: &[f32],
    ) -> Result<(), KvPoolOpError>;

    /// The pool as `Any`, for the forward pass that owns its concrete type.
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

/// Per-layer K and V storage for a fixed number of blocks, in host memory or on a device.
#[derive(Debug)]
pub struct KvPool {
    storage: Storage,
    num_blocks: usize,
    num_layers: usize,
    shape: KvShape,
}

/// Where the values are.
#[derive(Debug)]
enum Storage {
    /// Host memory, one [`LayerKv`] per layer.
    Host(Vec<LayerKv>),
    /// A device's buffers.
    Device(Box<dyn DeviceKv>),
}

/// K and V of one layer, `num_blocks * block_floats` each.
#[derive(Debug, Clone)]
struct LayerKv {
    k: Vec<f32>,
    v: Vec<f32>,
}

impl KvPool {
    /// A zero-filled host pool of `num_blocks` blocks shaped for `config`.
    pub fn new(config: &ModelConfig, num_blocks: usize) -> Self {
        let block_floats = Self::floats_per_block_layer(config);
        let layers = (0..config.n_layers)
            .map(|_| LayerKv {
                k: vec![0.0; num_blocks * block_floats],
                v: vec![0.0; num_blocks * block_floats],
            })
            .collect();
        Self::with_storage(config, num_blocks, Storage::Host(layers))
    }

    /// A pool of `num_blocks` blocks shaped for `config` whose values `device` keeps.
    pub fn on_device(config: &ModelConfig, num_blocks: usize, device: Box<dyn DeviceKv>) -> Self {
        Self::with_storage(config, num_blocks, Storage::Device(device))
    }

    fn with_storage(config: &ModelConfig, num_blocks: usize, storage: Storage) -> Self {
        Self {
            storage,
            num_blocks,
            num_layers: config.n_layers,
            shape: config.kv_shape(),
        }
    }

    /// Number of blocks in the pool.
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// Number of layers the pool stores.
    pub fn num_layers(&self) -> usize {
        self.num_layers
    }

    /// Whether the values are in host memory (the host forward pass's pool).
    pub fn is_host(&self) -> bool {
        matches!(self.storage, Storage::Host(_))
    }

    /// Bytes one block takes across all layers (K and V), for sizing the pool from a budget.
    pub fn bytes_per_block(config: &ModelConfig) -> usize {
        2 * config.n_layers * Self::floats_per_block_layer(config) * size_of::<f32>()
    }

    /// Floats of K (or of V) in one block of one layer.
    pub fn floats_per_block_layer(config: &ModelConfig) -> usize {
        config.kv_shape().block_floats()
    }

    fn block_range(&self, block: BlockId) -> std::ops::Range<usize> {
        let index = block as usize;
        assert!(
            index < self.num_blocks,
            "block {index} out of range: the pool has {} blocks",
            self.num_blocks
        );
        let floats = self.shape.block_floats();
        index * floats..(index + 1) * floats
    }

    /// Copies block `src` onto block `dst` in every layer (copy-on-write of a shared block).
    ///
    /// # Panics
    /// When a block is outside the pool.
    pub fn copy_block(&mut self, src: BlockId, dst: BlockId) -> Result<(), KvPoolOpError> {
        self.block_range(src);
        self.block_range(dst);
        let block_floats = self.shape.block_floats();
        match &mut self.storage {
            Storage::Host(layers) => {
                for layer in layers {
                    for values in [&mut layer.k, &mut layer.v] {
                        kv::copy_blocks(values, &[src], &[dst], block_floats);
                    }
                }
                Ok(())
            }
            Storage::Device(device) => device.copy_block(src, dst),
        }
    }

    /// Copies, in every layer, the K and V rows of `count` positions starting at `src_start` of
    /// the sequence whose blocks are `src_table` onto the positions starting at `dst_start` of
    /// `dst_table`, then turns the copied K by `rotation` (RoPE by the position delta; `None`
    /// copies K as it is). Positions need not be block-aligned. The source rows are only read;
    /// they must not overlap the destination rows.
    ///
    /// # Panics
    /// When a table does not cover its positions or names a block outside the pool.
    pub fn copy_rows(
        &mut self,
        (src_table, src_start): (&[BlockId], usize),
        (dst_table, dst_start): (&[BlockId], usize),
        count: usize,
        rotation: Option<&PairRotation>,
    ) -> Result<(), KvPoolOpError> {
        if count == 0 {
            return Ok(());
        }
        for (table, start) in [(src_table, src_start), (dst_table, dst_start)] {
            for &block in &table[start / BLOCK_SIZE..=(start + count - 1) / BLOCK_SIZE] {
                self.block_range(block);
            }
        }
        let shape = self.shape;
        match &mut self.storage {
            Storage::Host(layers) => {
                let src_slots = kv::flat_slots(src_table, src_start..src_start + count);
                let dst_slots = kv::flat_slots(dst_table, dst_start..dst_start + count);
                for layer in layers {
                    kv::copy_rows(&mut layer.k, &mut layer.v, &src_slots, &dst_slots, shape);
                    if let Some(rotation) = rotation {
                        rerotate_k(&mut layer.k, dst_table, dst_start, count, shape, rotation);
                    }
                }
                Ok(())
            }
            Storage::Device(device) => device.copy_rows(
                (src_table, src_start),
                (dst_table, dst_start),
                count,
                rotation,
            ),
        }
    }

    /// K (`[kv_head][head_dim][slot]`) and V (`[kv_head][slot][head_dim]`) of one block of one
    /// layer.
    ///
    /// # Panics
    /// When the block or the layer is outside the pool.
    pub fn read_block(
        &self,
        layer: usize,
        block: BlockId,
    ) -> Result<(Vec<f32>, Vec<f32>), KvPoolOpError> {
        let range = self.block_range(block);
        assert!(layer < self.num_layers, "layer {layer} out of range");
        match &self.storage {
            Storage::Host(layers) => {
                let kv = &layers[layer];
                Ok((kv.k[range.clone()].to_vec(), kv.v[range].to_vec()))
            }
            Storage::Device(device) => device.read_block(layer, block),
        }
    }

    /// Overwrites K and V of one block of one layer (same layout as [`Self::read_block`]).
    ///
    /// # Panics
    /// When the block or the layer is outside the pool, or `k` or `v` is not one block long.
    pub fn write_block(
        &mut self,
        layer: usize,
        block: BlockId,
        k: &[f32],
        v: &[f32],
    ) -> Result<(), KvPoolOpError> {
        let range = self.block_range(block);
        assert!(layer < self.num_layers, "layer {layer} out of range");
        assert!(
            k.len() == range.len() && v.len() == range.len(),
            "a block of K and V is {} floats each",
            range.len()
        );
        match &mut self.storage {
            Storage::Host(layers) => {
                let kv = &mut layers[layer];
                kv.k[range.clone()].copy_from_slice(k);
                kv.v[range].copy_from_slice(v);
                Ok(())
            }
            Storage::Device(device) => device.write_block(layer, block, k, v),
        }
    }

    /// The device pool as `Any` (for the forward pass that owns its type); `None` for a host
    /// pool.
    pub(crate) fn device_mut(&mut self) -> Option<&mut dyn Any> {
        match &mut self.storage {
            Storage::Host(_) => None,
            Storage::Device(device) => Some(device.as_any_mut()),
        }
    }

    /// Mutable K and V of one whole layer of a host pool, for the host forward pass; `None`
    /// for a device pool.
    pub(crate) fn layer_mut(&mut self, layer: usize) -> Option<(&mut [f32], &mut [f32])> {
        match &mut self.storage {
            Storage::Host(layers) => {
                let kv = &mut layers[layer];
                Some((&mut kv.k, &mut kv.v))
            }
            Storage::Device(_) => None,
        }
    }

    /// K and V of one whole layer of a host pool; `None` for a device pool.
    pub(crate) fn layer(&self, layer: usize) -> Option<(&[f32], &[f32])> {
        match &self.storage {
            Storage::Host(layers) => {
                let kv = &layers[layer];
                Some((&kv.k, &kv.v))
            }
            Storage::Device(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_config() -> ModelConfig {
        ModelConfig {
            n_layers: 2,
            hidden: 8,
            ffn: 16,
            n_heads: 2,
            n_kv_heads: 1,
            head_dim: 4,
            vocab: 10,
            rope_theta: 10_000.0,
            rms_eps: 1e-5,
            context_length: 64,
        }
    }

    #[test]
    fn bytes_per_block_counts_k_and_v_of_every_layer() {
        let config = tiny_config();
        assert_eq!(KvPool::bytes_per_block(&config), 2 * 2 * BLOCK_SIZE * 4 * 4);
    }

    #[test]
    fn write_then_read_round_trips_and_copy_block_copies_every_layer() {
        let config = tiny_config();
        let mut pool = KvPool::new(&config, 3);
        let floats = KvPool::floats_per_block_layer(&config);
        for layer in 0..2 {
            let k: Vec<f32> = (0..floats).map(|i| (i + layer * 1000) as f32).collect();
            let v: Vec<f32> = k.iter().map(|x| -x).collect();
            pool.write_block(layer, 1, &k, &v).unwrap();
            let (read_k, read_v) = pool.read_block(layer, 1).unwrap();
            assert_eq!(read_k, k);
            assert_eq!(read_v, v);
        }
        pool.copy_block(1, 2).unwrap();
        for layer in 0..2 {
            assert_eq!(
                pool.read_block(layer, 2).unwrap(),
                pool.read_block(layer, 1).unwrap()
            );
            assert!(
                pool.read_block(layer, 0)
                    .unwrap()
                    .0
                    .iter()
                    .all(|&x| x == 0.0)
            );
        }
    }

    #[test]
    fn copy_rows_moves_unaligned_rows_and_turns_only_the_copied_k() {
        use skillkv_kernels::reference::kv::read_k;
        use skillkv_kernels::reference::rope::RopeTable;
        let config = tiny_config();
        let shape = config.kv_shape();
        let floats = KvPool::floats_per_block_layer(&config);
        let mut pool = KvPool::new(&config, 5);
        for layer in 0..2 {
            let k: Vec<f32> = (0..floats).map(|i| (i + 1 + layer * 100) as f32).collect();
            let v: Vec<f32> = k.iter().map(|x| -x).collect();
            pool.write_block(layer, 0, &k, &v).unwrap();
            pool.write_block(layer, 1, &v, &k).unwrap();
        }
        // Source positions 5..25 (blocks 0 and 1) go to positions 19..39 of table [2, 3, 4].
        let (src, dst) = ([0u32, 1], [2u32, 3, 4]);
        let rope = RopeTable::new(config.head_dim, config.rope_theta, 1);
        let rotation = rope.delta(14);
        pool.copy_rows((&src, 5), (&dst, 19), 20, Some(&rotation))
            .unwrap();
        for layer in 0..2 {
            let (k, v) = pool.layer(layer).unwrap();
            for offset in 0..20 {
                let mut expected = read_k(k, &src, 5 + offset, shape);
                rope_row(&mut expected, &rotation);
                let got = read_k(k, &dst, 19 + offset, shape);
                for (a, b) in got.iter().zip(&expected) {
                    assert!(
                        (a - b).abs() < 1e-4,
                        "layer {layer} row {offset}: {a} vs {b}"
                    );
                }
                assert_eq!(
                    kv::read_v(v, &dst, 19 + offset, shape),
                    kv::read_v(v, &src, 5 + offset, shape)
                );
            }
            // Rows around the copy stay untouched (zero).
            for position in [18, 39, 40] {
                assert!(read_k(k, &dst, position, shape).iter().all(|&x| x == 0.0));
            }
        }
    }

    /// Turns each adjacent pair of every head of `row` (one token's K) by `rotation`.
    fn rope_row(row: &mut [f32], rotation: &PairRotation) {
        let pairs = rotation.cos.len();
        for head in row.chunks_exact_mut(2 * pairs) {
            for (pair, (c, s)) in head
                .chunks_exact_mut(2)
                .zip(rotation.cos.iter().zip(&rotation.sin))
            {
                let (x0, x1) = (pair[0], pair[1]);
                pair[0] = x0 * c - x1 * s;
                pair[1] = x0 * s + x1 * c;
            }
        }
    }
}
