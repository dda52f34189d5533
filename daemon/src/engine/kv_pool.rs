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

use skillkv_kernels::reference::kv::KvShape;
use skillkv_kernels::reference::rope::{PairRotation, rerotate_k};

use crate::engine::batch::{BLOCK_SIZE, BlockId};
use crate::engine::gguf::ModelConfig;

/// Per-layer K and V storage for a fixed number of blocks.
#[derive(Debug, Clone)]
pub struct KvPool {
    layers: Vec<LayerKv>,
    num_blocks: usize,
    n_kv_heads: usize,
    head_dim: usize,
}

/// K and V of one layer, `num_blocks * block_floats` each.
#[derive(Debug, Clone)]
struct LayerKv {
    k: Vec<f32>,
    v: Vec<f32>,
}

impl KvPool {
    /// A zero-filled pool of `num_blocks` blocks shaped for `config`.
    pub fn new(config: &ModelConfig, num_blocks: usize) -> Self {
        let block_floats = Self::floats_per_block_layer(config);
        let layers = (0..config.n_layers)
            .map(|_| LayerKv {
                k: vec![0.0; num_blocks * block_floats],
                v: vec![0.0; num_blocks * block_floats],
            })
            .collect();
        Self {
            layers,
            num_blocks,
            n_kv_heads: config.n_kv_heads,
            head_dim: config.head_dim,
        }
    }

    /// Number of blocks in the pool.
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// Number of layers the pool stores.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Bytes one block takes across all layers (K and V), for sizing the pool from a budget.
    pub fn bytes_per_block(config: &ModelConfig) -> usize {
        2 * config.n_layers * Self::floats_per_block_layer(config) * size_of::<f32>()
    }

    /// Floats of K (or of V) in one block of one layer.
    pub fn floats_per_block_layer(config: &ModelConfig) -> usize {
        BLOCK_SIZE * config.n_kv_heads * config.head_dim
    }

    fn block_floats(&self) -> usize {
        BLOCK_SIZE * self.n_kv_heads * self.head_dim
    }

    fn block_range(&self, block: BlockId) -> std::ops::Range<usize> {
        let index = block as usize;
        assert!(
            index < self.num_blocks,
            "block {index} out of range: the pool has {} blocks",
            self.num_blocks
        );
        let floats = self.block_floats();
        index * floats..(index + 1) * floats
    }

    /// Copies block `src` onto block `dst` in every layer (copy-on-write of a shared block).
    pub fn copy_block(&mut self, src: BlockId, dst: BlockId) {
        let src_range = self.block_range(src);
        let dst_start = self.block_range(dst).start;
        for layer in &mut self.layers {
            layer.k.copy_within(src_range.clone(), dst_start);
            layer.v.copy_within(src_range.clone(), dst_start);
        }
    }

    /// Copies, in every layer, the K and V rows of `count` positions starting at `src_start` of
    /// the sequence whose blocks are `src_table` onto the positions starting at `dst_start` of
    /// `dst_table`, then turns the copied K by `rotation` (RoPE by the position delta; `None`
    /// copies K as it is). Positions need not be block-aligned. The source rows are only read;
    /// they must not overlap the destination rows.
    ///
    /// # Panics
    /// When a table does not cover its positions.
    pub fn copy_rows(
        &mut self,
        (src_table, src_start): (&[BlockId], usize),
        (dst_table, dst_start): (&[BlockId], usize),
        count: usize,
        rotation: Option<&PairRotation>,
    ) {
        let shape = KvShape {
            n_kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
        };
        let address = |table: &[BlockId], position: usize| {
            (table[position / BLOCK_SIZE] as usize, position % BLOCK_SIZE)
        };
        for layer in &mut self.layers {
            for offset in 0..count {
                let (src_block, src_slot) = address(src_table, src_start + offset);
                let (dst_block, dst_slot) = address(dst_table, dst_start + offset);
                for head in 0..shape.n_kv_heads {
                    for d in 0..shape.head_dim {
                        layer.k[shape.k_index(dst_block, head, d, dst_slot)] =
                            layer.k[shape.k_index(src_block, head, d, src_slot)];
                    }
                    let from = shape.v_index(src_block, head, src_slot, 0);
                    let to = shape.v_index(dst_block, head, dst_slot, 0);
                    layer.v.copy_within(from..from + shape.head_dim, to);
                }
            }
            if let Some(rotation) = rotation {
                rerotate_k(&mut layer.k, dst_table, dst_start, count, shape, rotation);
            }
        }
    }

    /// K (`[kv_head][head_dim][slot]`) and V (`[kv_head][slot][head_dim]`) of one block of one
    /// layer.
    pub fn read_block(&self, layer: usize, block: BlockId) -> (&[f32], &[f32]) {
        let range = self.block_range(block);
        let kv = &self.layers[layer];
        (&kv.k[range.clone()], &kv.v[range])
    }

    /// Overwrites K and V of one block of one layer (same layout as [`Self::read_block`]).
    pub fn write_block(&mut self, layer: usize, block: BlockId, k: &[f32], v: &[f32]) {
        let range = self.block_range(block);
        let kv = &mut self.layers[layer];
        kv.k[range.clone()].copy_from_slice(k);
        kv.v[range].copy_from_slice(v);
    }

    /// Mutable K and V of one whole layer, for the forward pass.
    pub(crate) fn layer_mut(&mut self, layer: usize) -> (&mut [f32], &mut [f32]) {
        let kv = &mut self.layers[layer];
        (&mut kv.k, &mut kv.v)
    }

    /// K and V of one whole layer, for the forward pass.
    pub(crate) fn layer(&self, layer: usize) -> (&[f32], &[f32]) {
        let kv = &self.layers[layer];
        (&kv.k, &kv.v)
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
            pool.write_block(layer, 1, &k, &v);
            let (read_k, read_v) = pool.read_block(layer, 1);
            assert_eq!(read_k, k.as_slice());
            assert_eq!(read_v, v.as_slice());
        }
        pool.copy_block(1, 2);
        for layer in 0..2 {
            assert_eq!(pool.read_block(layer, 2), pool.read_block(layer, 1));
            assert!(pool.read_block(layer, 0).0.iter().all(|&x| x == 0.0));
        }
    }

    #[test]
    fn copy_rows_moves_unaligned_rows_and_turns_only_the_copied_k() {
        use skillkv_kernels::reference::kv::read_k;
        use skillkv_kernels::reference::rope::RopeTable;
        let config = tiny_config();
        let shape = KvShape {
            n_kv_heads: config.n_kv_heads,
            head_dim: config.head_dim,
        };
        let floats = KvPool::floats_per_block_layer(&config);
        let mut pool = KvPool::new(&config, 5);
        for layer in 0..2 {
            let k: Vec<f32> = (0..floats).map(|i| (i + 1 + layer * 100) as f32).collect();
            let v: Vec<f32> = k.iter().map(|x| -x).collect();
            pool.write_block(layer, 0, &k, &v);
            pool.write_block(layer, 1, &v, &k);
        }
        // Source positions 5..25 (blocks 0 and 1) go to positions 19..39 of table [2, 3, 4].
        let (src, dst) = ([0u32, 1], [2u32, 3, 4]);
        let rope = RopeTable::new(config.head_dim, config.rope_theta, 1);
        let rotation = rope.delta(14);
        pool.copy_rows((&src, 5), (&dst, 19), 20, Some(&rotation));
        for layer in 0..2 {
            let (k, v) = pool.layer(layer);
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
                    skillkv_kernels::reference::kv::read_v(v, &dst, 19 + offset, shape),
                    skillkv_kernels::reference::kv::read_v(v, &src, 5 + offset, shape)
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
