//! KV pool references (kernels in `cuda/kv.cu`): writing tokens' K and V into their block
//! slots, copying whole blocks and single token rows, plus readers used by tests. One layer's K is
//! `[block][kv_head][head_dim][slot]` (transposed per block) and V
//! `[block][kv_head][slot][head_dim]`.

use crate::registry::BLOCK_SIZE;

/// Head geometry of the KV pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvShape {
    /// Key/value heads.
    pub n_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
}

impl KvShape {
    /// Floats of one block of one layer's K (or V).
    pub fn block_floats(&self) -> usize {
        self.n_kv_heads * self.head_dim * BLOCK_SIZE
    }

    /// Floats of one token's K (or V): every KV head.
    pub fn width(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Index in K of `(block, head, d, slot)`.
    pub fn k_index(&self, block: usize, head: usize, d: usize, slot: usize) -> usize {
        ((block * self.n_kv_heads + head) * self.head_dim + d) * BLOCK_SIZE + slot
    }

    /// Index in V of `(block, head, slot, d)`.
    pub fn v_index(&self, block: usize, head: usize, slot: usize, d: usize) -> usize {
        ((block * self.n_kv_heads + head) * BLOCK_SIZE + slot) * self.head_dim + d
    }
}

/// Where a token's K and V sit in its source row (e.g. inside a fused QKV row).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowLayout {
    /// Floats from one row to the next.
    pub stride: usize,
    /// Column of the row's first K value.
    pub k_offset: usize,
    /// Column of the row's first V value.
    pub v_offset: usize,
}

/// `kv_write_f32`: stores row `r`'s K and V at flat slot `slots[r]` (`block * 16 + slot`).
pub fn write_kv(
    k_pool: &mut [f32],
    v_pool: &mut [f32],
    src: &[f32],
    slots: &[u32],
    layout: RowLayout,
    shape: KvShape,
) {
    for (row, &flat) in slots.iter().enumerate() {
        let (block, slot) = (flat as usize / BLOCK_SIZE, flat as usize % BLOCK_SIZE);
        let start = row * layout.stride;
        for head in 0..shape.n_kv_heads {
            for d in 0..shape.head_dim {
                let column = head * shape.head_dim + d;
                k_pool[shape.k_index(block, head, d, slot)] = src[start + layout.k_offset + column];
                v_pool[shape.v_index(block, head, slot, d)] = src[start + layout.v_offset + column];
            }
        }
    }
}

/// `kv_block_copy_f32`: copies block `src_blocks[i]` onto `dst_blocks[i]` in a buffer of
/// `block_floats`-float blocks (one layer's K or V).
pub fn copy_blocks(pool: &mut [f32], src_blocks: &[u32], dst_blocks: &[u32], block_floats: usize) {
    for (&src, &dst) in src_blocks.iter().zip(dst_blocks) {
        let from = src as usize * block_floats;
        pool.copy_within(from..from + block_floats, dst as usize * block_floats);
    }
}

/// `kv_copy_rows_f32`: copies the K and V of flat slot `src_slots[r]` onto flat slot
/// `dst_slots[r]` (`block * 16 + slot`). Destinations must be distinct and none may be a
/// source.
pub fn copy_rows(
    k_pool: &mut [f32],
    v_pool: &mut [f32],
    src_slots: &[u32],
    dst_slots: &[u32],
    shape: KvShape,
) {
    for (&src, &dst) in src_slots.iter().zip(dst_slots) {
        let (src_block, src_slot) = (src as usize / BLOCK_SIZE, src as usize % BLOCK_SIZE);
        let (dst_block, dst_slot) = (dst as usize / BLOCK_SIZE, dst as usize % BLOCK_SIZE);
        for head in 0..shape.n_kv_heads {
            for d in 0..shape.head_dim {
                k_pool[shape.k_index(dst_block, head, d, dst_slot)] =
                    k_pool[shape.k_index(src_block, head, d, src_slot)];
            }
            let from = shape.v_index(src_block, head, src_slot, 0);
            let to = shape.v_index(dst_block, head, dst_slot, 0);
            v_pool.copy_within(from..from + shape.head_dim, to);
        }
    }
}

/// The K of `position` of the sequence with `block_table`, head after head (`width` floats).
pub fn read_k(k_pool: &[f32], block_table: &[u32], position: usize, shape: KvShape) -> Vec<f32> {
    let (block, slot) = locate(block_table, position);
    (0..shape.n_kv_heads)
        .flat_map(|head| (0..shape.head_dim).map(move |d| (head, d)))
        .map(|(head, d)| k_pool[shape.k_index(block, head, d, slot)])
        .collect()
}

/// The V of `position` of the sequence with `block_table`, head after head (`width` floats).
pub fn read_v(v_pool: &[f32], block_table: &[u32], position: usize, shape: KvShape) -> Vec<f32> {
    let (block, slot) = locate(block_table, position);
    (0..shape.n_kv_heads)
        .flat_map(|head| (0..shape.head_dim).map(move |d| (head, d)))
        .map(|(head, d)| v_pool[shape.v_index(block, head, slot, d)])
        .collect()
}

/// The flat slot (`block * 16 + slot`) of `position` through `block_table`.
pub fn flat_slot(block_table: &[u32], position: usize) -> u32 {
    let (block, slot) = locate(block_table, position);
    (block * BLOCK_SIZE + slot) as u32
}

/// The flat slots of `positions` through `block_table`, in order.
pub fn flat_slots(block_table: &[u32], positions: std::ops::Range<usize>) -> Vec<u32> {
    positions
        .map(|position| flat_slot(block_table, position))
        .collect()
}

fn locate(block_table: &[u32], position: usize) -> (usize, usize) {
    (
        block_table[position / BLOCK_SIZE] as usize,
        position % BLOCK_SIZE,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHAPE: KvShape = KvShape {
        n_kv_heads: 2,
        head_dim: 4,
    };

    #[test]
    fn copied_rows_read_back_at_their_destinations_and_nothing_else_moves() {
        let mut k: Vec<f32> = (0..4 * SHAPE.block_floats()).map(|i| i as f32).collect();
        let mut v: Vec<f32> = k.iter().map(|x| -x).collect();
        let (k0, v0) = (k.clone(), v.clone());
        // Positions 14..18 of table [0, 1] go to positions 3..7 of table [3].
        let (src_table, dst_table) = ([0u32, 1], [3u32]);
        let src: Vec<u32> = (14..18).map(|p| flat_slot(&src_table, p)).collect();
        let dst: Vec<u32> = (3..7).map(|p| flat_slot(&dst_table, p)).collect();
        copy_rows(&mut k, &mut v, &src, &dst, SHAPE);
        for offset in 0..4 {
            assert_eq!(
                read_k(&k, &dst_table, 3 + offset, SHAPE),
                read_k(&k0, &src_table, 14 + offset, SHAPE)
            );
            assert_eq!(
                read_v(&v, &dst_table, 3 + offset, SHAPE),
                read_v(&v0, &src_table, 14 + offset, SHAPE)
            );
        }
        for position in (0..3).chain(7..16) {
            assert_eq!(
                read_k(&k, &dst_table, position, SHAPE),
                read_k(&k0, &dst_table, position, SHAPE)
            );
            assert_eq!(
                read_v(&v, &dst_table, position, SHAPE),
                read_v(&v0, &dst_table, position, SHAPE)
            );
        }
        assert_eq!(
            k[..3 * SHAPE.block_floats()],
            k0[..3 * SHAPE.block_floats()]
        );
    }

    #[test]
    fn written_rows_read_back_from_their_slots_in_the_pool_layouts() {
        let mut k = vec![0.0; 3 * SHAPE.block_floats()];
        let mut v = vec![0.0; 3 * SHAPE.block_floats()];
        // Rows of [q (2) | k (8) | v (8)].
        let src: Vec<f32> = (0..3 * 18).map(|i| i as f32).collect();
        let layout = RowLayout {
            stride: 18,
            k_offset: 2,
            v_offset: 10,
        };
        let table = [2u32, 1];
        let positions = [0usize, 17, 31];
        let slots: Vec<u32> = positions.iter().map(|&p| flat_slot(&table, p)).collect();
        assert_eq!(slots, vec![32, 17, 31]);
        write_kv(&mut k, &mut v, &src, &slots, layout, SHAPE);
        for (row, &p) in positions.iter().enumerate() {
            assert_eq!(
                read_k(&k, &table, p, SHAPE),
                src[row * 18 + 2..row * 18 + 10]
            );
            assert_eq!(
                read_v(&v, &table, p, SHAPE),
                src[row * 18 + 10..row * 18 + 18]
            );
        }
        // K is transposed: head 0, dims 0 and 1 of position 17 (block 1, slot 1) are 16 apart.
        let base = SHAPE.block_floats();
        assert_eq!(k[base + 1], src[18 + 2]);
        assert_eq!(k[base + 16 + 1], src[18 + 3]);
        // V is not: the same values are adjacent.
        assert_eq!(v[base + 4..base + 6], src[18 + 10..18 + 12]);
    }

    #[test]
    fn copy_blocks_duplicates_whole_blocks_and_leaves_the_rest() {
        let bf = SHAPE.block_floats();
        let mut pool: Vec<f32> = (0..4 * bf).map(|i| i as f32).collect();
        let original = pool.clone();
        copy_blocks(&mut pool, &[0, 3], &[2, 1], bf);
        assert_eq!(pool[..bf], original[..bf]);
        assert_eq!(pool[bf..2 * bf], original[3 * bf..]);
        assert_eq!(pool[2 * bf..3 * bf], original[..bf]);
        assert_eq!(pool[3 * bf..], original[3 * bf..]);
    }
}
