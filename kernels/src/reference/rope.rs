//! Rotary position embedding references (kernels in `cuda/rope.cu`), GGUF/llama.cpp "normal"
//! style as in the daemon: the adjacent pairs `(x[2i], x[2i+1])` of each head turn by
//! `position * theta^(-2i/head_dim)`. [`RopeTable`] holds the cos/sin tables the GPU kernels
//! read, so both sides rotate by the same values; re-rotation of cached K by a position delta
//! (modular skill assembly) uses [`RopeTable::delta`].

use crate::reference::kv::KvShape;
use crate::registry::BLOCK_SIZE;

/// Cosine and sine of every rotary angle for positions `0 .. max_positions`, laid out
/// `[position][head_dim / 2]`.
#[derive(Debug, Clone)]
pub struct RopeTable {
    frequencies: Vec<f32>,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

/// The rotation by one fixed angle per pair, e.g. a position delta.
#[derive(Debug, Clone, PartialEq)]
pub struct PairRotation {
    /// `cos(angle_i)` per pair.
    pub cos: Vec<f32>,
    /// `sin(angle_i)` per pair.
    pub sin: Vec<f32>,
}

impl RopeTable {
    /// Tables for `head_dim`-wide heads with base frequency `theta` (the daemon's formula).
    pub fn new(head_dim: usize, theta: f32, max_positions: usize) -> Self {
        let pairs = head_dim / 2;
        let frequencies: Vec<f32> = (0..pairs)
            .map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32))
            .collect();
        let mut cos = Vec::with_capacity(max_positions * pairs);
        let mut sin = Vec::with_capacity(max_positions * pairs);
        for position in 0..max_positions {
            for frequency in &frequencies {
                let angle = position as f32 * frequency;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Self {
            frequencies,
            cos,
            sin,
        }
    }

    /// Rotated pairs per head (`head_dim / 2`).
    pub fn pairs(&self) -> usize {
        self.frequencies.len()
    }

    /// Number of positions the table covers.
    pub fn max_positions(&self) -> usize {
        self.cos.len() / self.pairs().max(1)
    }

    /// The cosine table, `[position][pair]`.
    pub fn cos_table(&self) -> &[f32] {
        &self.cos
    }

    /// The sine table, `[position][pair]`.
    pub fn sin_table(&self) -> &[f32] {
        &self.sin
    }

    /// The rotation that moves a rotated vector by `delta` positions (negative moves it back).
    pub fn delta(&self, delta: i64) -> PairRotation {
        let (cos, sin) = self
            .frequencies
            .iter()
            .map(|frequency| {
                let angle = delta as f32 * frequency;
                (angle.cos(), angle.sin())
            })
            .unzip();
        PairRotation { cos, sin }
    }

    /// Rotates every head of one token's row in place by `position`.
    ///
    /// # Panics
    /// When `position` is outside the table.
    pub fn rotate(&self, row: &mut [f32], position: usize) {
        let pairs = self.pairs();
        let start = position * pairs;
        rotate_heads(
            row,
            &self.cos[start..start + pairs],
            &self.sin[start..start + pairs],
        );
    }

    /// `rope_apply_f32`: rotates `n_heads` heads starting at `col_offset` of each row of
    /// `x` (rows `row_stride` floats apart) by that row's position.
    pub fn apply(
        &self,
        x: &mut [f32],
        positions: &[u32],
        row_stride: usize,
        col_offset: usize,
        n_heads: usize,
    ) {
        apply_with_tables(
            x,
            positions,
            (&self.cos, &self.sin),
            self.pairs(),
            row_stride,
            col_offset,
            n_heads,
        );
    }
}

/// [`RopeTable::apply`] with the `[position][pair]` cosine and sine tables given apart, as a
/// device keeps them ([`RopeTable::cos_table`], [`RopeTable::sin_table`]); heads are
/// `2 * pairs` wide.
///
/// # Panics
/// When a position is outside the tables or a row reaches past `x`.
pub fn apply_with_tables(
    x: &mut [f32],
    positions: &[u32],
    (cos, sin): (&[f32], &[f32]),
    pairs: usize,
    row_stride: usize,
    col_offset: usize,
    n_heads: usize,
) {
    let width = n_heads * 2 * pairs;
    for (row, &position) in positions.iter().enumerate() {
        let start = row * row_stride + col_offset;
        let angles = position as usize * pairs..(position as usize + 1) * pairs;
        rotate_heads(
            &mut x[start..start + width],
            &cos[angles.clone()],
            &sin[angles],
        );
    }
}

/// Turns each adjacent pair of each head of `row` by the per-pair angle given as cos/sin.
fn rotate_heads(row: &mut [f32], cos: &[f32], sin: &[f32]) {
    for head in row.chunks_exact_mut(2 * cos.len()) {
        for ((pair, c), s) in head.chunks_exact_mut(2).zip(cos).zip(sin) {
            let (x0, x1) = (pair[0], pair[1]);
            pair[0] = x0 * c - x1 * s;
            pair[1] = x0 * s + x1 * c;
        }
    }
}

/// `rope_rerotate_k_f32`: rotates the cached K of positions `start_pos .. start_pos + count`
/// of the sequence with `block_table` by `rotation`, in place in one layer's K pool.
pub fn rerotate_k(
    k_pool: &mut [f32],
    block_table: &[u32],
    start_pos: usize,
    count: usize,
    shape: KvShape,
    rotation: &PairRotation,
) {
    for position in start_pos..start_pos + count {
        let block = block_table[position / BLOCK_SIZE] as usize;
        let slot = position % BLOCK_SIZE;
        for head in 0..shape.n_kv_heads {
            for (pair, (c, s)) in rotation.cos.iter().zip(&rotation.sin).enumerate() {
                let i0 = shape.k_index(block, head, 2 * pair, slot);
                let i1 = shape.k_index(block, head, 2 * pair + 1, slot);
                let (x0, x1) = (k_pool[i0], k_pool[i1]);
                k_pool[i0] = x0 * c - x1 * s;
                k_pool[i1] = x0 * s + x1 * c;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::kv::{RowLayout, flat_slot, read_k, write_kv};

    fn row(len: usize, salt: usize) -> Vec<f32> {
        (0..len)
            .map(|i| (((i * 7 + salt * 13) % 19) as f32 - 9.0) / 4.0)
            .collect()
    }

    #[test]
    fn rotation_at_zero_is_identity_and_preserves_pair_norms() {
        let table = RopeTable::new(4, 10_000.0, 8);
        let mut x = vec![1.0, 2.0, 3.0, 4.0];
        table.rotate(&mut x, 0);
        assert_eq!(x, vec![1.0, 2.0, 3.0, 4.0]);
        table.rotate(&mut x, 5);
        assert!((x[0] * x[0] + x[1] * x[1] - 5.0).abs() < 1e-5);
        assert!((x[0] - (5.0f32.cos() - 2.0 * 5.0f32.sin())).abs() < 1e-6);
    }

    #[test]
    fn apply_rotates_only_the_addressed_heads_of_each_row() {
        let table = RopeTable::new(4, 10_000.0, 16);
        // Two rows of [q head | k head | v head], rotate the k head only.
        let original = row(24, 1);
        let mut x = original.clone();
        table.apply(&mut x, &[3, 9], 12, 4, 1);
        for r in 0..2 {
            assert_eq!(x[r * 12..r * 12 + 4], original[r * 12..r * 12 + 4]);
            assert_eq!(
                x[r * 12 + 8..r * 12 + 12],
                original[r * 12 + 8..r * 12 + 12]
            );
            let mut expected = original[r * 12 + 4..r * 12 + 8].to_vec();
            table.rotate(&mut expected, [3, 9][r]);
            assert_eq!(x[r * 12 + 4..r * 12 + 8], expected[..]);
        }
    }

    #[test]
    fn delta_rotation_equals_rotation_at_the_new_position() {
        let head_dim = 64;
        let table = RopeTable::new(head_dim, 10_000.0, 4096);
        for (position, delta) in [(0usize, 5i64), (17, 300), (1000, -999), (2047, 2048)] {
            let x = row(2 * head_dim, position);
            let mut moved = x.clone();
            table.rotate(&mut moved, position);
            let rotation = table.delta(delta);
            rotate_heads(&mut moved, &rotation.cos, &rotation.sin);
            let mut direct = x.clone();
            table.rotate(&mut direct, (position as i64 + delta) as usize);
            for (a, b) in moved.iter().zip(&direct) {
                assert!((a - b).abs() < 2e-3, "{position}+{delta}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn rerotate_k_in_the_pool_moves_cached_keys_to_their_new_positions() {
        let shape = KvShape {
            n_kv_heads: 2,
            head_dim: 8,
        };
        let table = RopeTable::new(shape.head_dim, 10_000.0, 256);
        let block_table = [3u32, 0, 5];
        let mut k_pool = vec![0.0; 6 * shape.block_floats()];
        let mut v_pool = k_pool.clone();
        let width = shape.width();
        let layout = RowLayout {
            stride: width,
            k_offset: 0,
            v_offset: 0,
        };
        let keys: Vec<Vec<f32>> = (0..40).map(|p| row(width, p)).collect();
        // Cache keys rotated at positions p, then move positions 10..40 by +100.
        for (p, key) in keys.iter().enumerate() {
            let mut rotated = key.clone();
            table.rotate(&mut rotated, p);
            let slot = flat_slot(&block_table, p);
            write_kv(&mut k_pool, &mut v_pool, &rotated, &[slot], layout, shape);
        }
        let untouched = read_k(&k_pool, &block_table, 5, shape);
        rerotate_k(&mut k_pool, &block_table, 10, 30, shape, &table.delta(100));
        assert_eq!(read_k(&k_pool, &block_table, 5, shape), untouched);
        for (p, key) in keys.iter().enumerate().skip(10) {
            let mut expected = key.clone();
            table.rotate(&mut expected, p + 100);
            let got = read_k(&k_pool, &block_table, p, shape);
            for (a, b) in got.iter().zip(&expected) {
                assert!((a - b).abs() < 1e-4, "position {p}: {a} vs {b}");
            }
        }
    }
}
