//! Paged attention reference (kernels in `cuda/attention.cu`): causal grouped-query attention
//! of RoPE'd query rows over one layer of the paged KV pool. Query head `h` reads KV head
//! `h / (n_heads / n_kv_heads)`; token `t` of a chunk starting at position `s` sees positions
//! `0 ..= s + t` (the cached prefix and the chunk, causally); scores are
//! `(q * 1/sqrt(head_dim)) · k`, softmax in f32. Decode is a chunk of one token. The kernels
//! compute the same with an online softmax; this reference takes the plain two-pass form.

use crate::reference::kv::{KvShape, read_k, read_v};

/// Head geometry of the attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    /// Query heads (a multiple of `n_kv_heads`).
    pub n_heads: usize,
    /// Key/value heads.
    pub n_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
}

impl AttentionShape {
    /// The KV pool's geometry.
    pub fn kv(&self) -> KvShape {
        KvShape {
            n_kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
        }
    }

    /// Floats of one query (or output) row.
    pub fn row_width(&self) -> usize {
        self.n_heads * self.head_dim
    }

    /// The softmax scale, `1 / sqrt(head_dim)`.
    pub fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }
}

/// The rows of one sequence's chunk within the batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRows<'a> {
    /// Batch row of the chunk's first token.
    pub first_row: usize,
    /// Number of tokens in the chunk.
    pub len: usize,
    /// Position of the chunk's first token.
    pub start_pos: usize,
    /// The sequence's KV blocks.
    pub block_table: &'a [u32],
}

/// Softmax attention of one query head row over explicit K and V head rows.
fn attend(query: &[f32], scale: f32, keys: &[&[f32]], values: &[&[f32]]) -> Vec<f32> {
    let scaled: Vec<f32> = query.iter().map(|q| q * scale).collect();
    let scores: Vec<f32> = keys
        .iter()
        .map(|k| k.iter().zip(&scaled).map(|(k, q)| k * q).sum())
        .collect();
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let weights: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
    let total: f32 = weights.iter().sum();
    let mut out = vec![0.0; query.len()];
    for (w, v) in weights.iter().zip(values) {
        for (o, x) in out.iter_mut().zip(*v) {
            *o += w * x;
        }
    }
    out.iter_mut().for_each(|o| *o /= total);
    out
}

/// Attention of `queries` (`[rows][n_heads * head_dim]`) whose every attended position has its
/// K/V in the pool; `keys(p)`/`values(p)` give position `p`'s rows (`[n_kv_heads * head_dim]`).
fn causal(
    shape: AttentionShape,
    queries: &[f32],
    chunks: &[ChunkRows<'_>],
    keys: impl Fn(&ChunkRows<'_>, usize) -> Vec<f32>,
    values: impl Fn(&ChunkRows<'_>, usize) -> Vec<f32>,
) -> Vec<f32> {
    let (hd, width) = (shape.head_dim, shape.row_width());
    let group = shape.n_heads / shape.n_kv_heads;
    let mut output = vec![0.0; queries.len()];
    for chunk in chunks {
        let end = chunk.start_pos + chunk.len;
        let k: Vec<Vec<f32>> = (0..end).map(|p| keys(chunk, p)).collect();
        let v: Vec<Vec<f32>> = (0..end).map(|p| values(chunk, p)).collect();
        for token in 0..chunk.len {
            let row = chunk.first_row + token;
            let visible = chunk.start_pos + token + 1;
            for head in 0..shape.n_heads {
                let kv = (head / group) * hd..(head / group + 1) * hd;
                let k_rows: Vec<&[f32]> = k[..visible].iter().map(|r| &r[kv.clone()]).collect();
                let v_rows: Vec<&[f32]> = v[..visible].iter().map(|r| &r[kv.clone()]).collect();
                let q = &queries[row * width + head * hd..][..hd];
                let out = attend(q, shape.scale(), &k_rows, &v_rows);
                output[row * width + head * hd..][..hd].copy_from_slice(&out);
            }
        }
    }
    output
}

/// `paged_attention_prefill_f32` / `paged_attention_decode_f32`: the attention output
/// (`[rows][n_heads * head_dim]`, zero for rows outside every chunk) of the chunks' query rows
/// over one layer's pool (`k_pool`, `v_pool`).
pub fn paged_attention(
    shape: AttentionShape,
    queries: &[f32],
    chunks: &[ChunkRows<'_>],
    k_pool: &[f32],
    v_pool: &[f32],
) -> Vec<f32> {
    let kv = shape.kv();
    causal(
        shape,
        queries,
        chunks,
        |chunk, p| read_k(k_pool, chunk.block_table, p, kv),
        |chunk, p| read_v(v_pool, chunk.block_table, p, kv),
    )
}

/// Dense causal attention of one sequence's query rows at positions `start_pos ..` over
/// contiguous `keys` and `values` (`[position][n_kv_heads * head_dim]`): what paged attention
/// must equal.
pub fn dense_causal_attention(
    shape: AttentionShape,
    queries: &[f32],
    start_pos: usize,
    keys: &[f32],
    values: &[f32],
) -> Vec<f32> {
    let width = shape.kv().width();
    let chunk = ChunkRows {
        first_row: 0,
        len: queries.len() / shape.row_width(),
        start_pos,
        block_table: &[],
    };
    causal(
        shape,
        queries,
        &[chunk],
        |_, p| keys[p * width..(p + 1) * width].to_vec(),
        |_, p| values[p * width..(p + 1) * width].to_vec(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::kv::{RowLayout, flat_slot, write_kv};

    const SHAPE: AttentionShape = AttentionShape {
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 8,
    };

    fn values(len: usize, salt: usize) -> Vec<f32> {
        (0..len)
            .map(|i| (((i * 31 + salt * 17) % 23) as f32 - 11.0) / 7.0)
            .collect()
    }

    /// A pool of 8 blocks holding `positions` tokens of K and V through `table`.
    fn pool(table: &[u32], k: &[f32], v: &[f32], positions: usize) -> (Vec<f32>, Vec<f32>) {
        let kv = SHAPE.kv();
        let mut k_pool = vec![f32::NAN; 8 * kv.block_floats()];
        let mut v_pool = k_pool.clone();
        // Rows of [k | v], as in fused QKV rows.
        let width = kv.width();
        let rows: Vec<f32> = (0..positions)
            .flat_map(|p| {
                [
                    &k[p * width..(p + 1) * width],
                    &v[p * width..(p + 1) * width],
                ]
            })
            .flatten()
            .copied()
            .collect();
        let layout = RowLayout {
            stride: 2 * width,
            k_offset: 0,
            v_offset: width,
        };
        let slots: Vec<u32> = (0..positions).map(|p| flat_slot(table, p)).collect();
        write_kv(&mut k_pool, &mut v_pool, &rows, &slots, layout, kv);
        (k_pool, v_pool)
    }

    #[test]
    fn one_visible_position_returns_its_value_and_equal_keys_average() {
        let shape = AttentionShape {
            n_heads: 1,
            n_kv_heads: 1,
            head_dim: 2,
        };
        let q = [1.0, 2.0];
        let out = dense_causal_attention(shape, &q, 0, &[0.3, 0.4], &[5.0, -1.0]);
        assert_eq!(out, vec![5.0, -1.0]);
        let out =
            dense_causal_attention(shape, &q, 1, &[1.0, 1.0, 1.0, 1.0], &[2.0, 0.0, 4.0, 1.0]);
        assert_eq!(out, vec![3.0, 0.5]);
    }

    #[test]
    fn paged_prefill_and_decode_equal_dense_causal_attention() {
        let width = SHAPE.kv().width();
        let positions = 37; // three blocks, the last one partial
        let table = [6u32, 1, 4];
        let (k, v) = (values(positions * width, 1), values(positions * width, 2));
        let (k_pool, v_pool) = pool(&table, &k, &v, positions);
        let row = SHAPE.row_width();
        // Prefill: the last 10 positions as rows 2..12 after 2 rows outside any chunk.
        let queries = values(12 * row, 3);
        let chunk = ChunkRows {
            first_row: 2,
            len: 10,
            start_pos: positions - 10,
            block_table: &table,
        };
        let paged = paged_attention(SHAPE, &queries, &[chunk], &k_pool, &v_pool);
        assert!(paged[..2 * row].iter().all(|&x| x == 0.0));
        let dense = dense_causal_attention(SHAPE, &queries[2 * row..], positions - 10, &k, &v);
        assert_eq!(paged[2 * row..], dense[..]);
        // Decode: one row at the last position.
        let decode = ChunkRows {
            first_row: 0,
            len: 1,
            start_pos: positions - 1,
            block_table: &table,
        };
        let paged = paged_attention(SHAPE, &queries[..row], &[decode], &k_pool, &v_pool);
        let dense = dense_causal_attention(SHAPE, &queries[..row], positions - 1, &k, &v);
        assert_eq!(paged, dense);
    }

    #[test]
    fn query_heads_of_a_group_share_their_kv_head_and_later_keys_are_masked() {
        let width = SHAPE.kv().width();
        let (k, v) = (values(3 * width, 4), values(3 * width, 5));
        let q_row = values(SHAPE.head_dim, 6);
        // Heads 0 and 1 (KV head 0) get the same query, so the same output.
        let queries: Vec<f32> = (0..SHAPE.n_heads).flat_map(|_| q_row.clone()).collect();
        let out = dense_causal_attention(SHAPE, &queries, 1, &k, &v);
        let hd = SHAPE.head_dim;
        assert_eq!(out[..hd], out[hd..2 * hd]);
        assert_ne!(out[..hd], out[2 * hd..3 * hd]);
        // Position 2 is invisible to a query at position 1: changing it changes nothing.
        let mut k2 = k.clone();
        k2[2 * width..].iter_mut().for_each(|x| *x += 3.0);
        assert_eq!(dense_causal_attention(SHAPE, &queries, 1, &k2, &v), out);
    }
}
