//! Causal grouped-query attention over the paged KV pool (CPU).
//!
//! Work is split into items of (chunk, KV head, tile of tokens) run on candle's CPU thread pool.
//! Inside an item, up to four query rows (token × head of the group) share every K/V block they
//! read. Scores of one query against a block's 16 slots are 16-lane FMAs over the transposed K
//! layout of [`KvPool`](crate::engine::kv_pool::KvPool); softmax is online (running max and sum
//! per row, one rescale per block). Each row's arithmetic is the same whatever rows it is grouped
//! with, so a sequence's output never depends on the rest of the batch.

use std::sync::OnceLock;

use crate::engine::batch::{BLOCK_SIZE, BlockId};
use crate::engine::model::ops::exp_lanes;

/// Query rows processed together against each block.
const ROWS_PER_GROUP: usize = 4;
/// Tokens of one chunk handled by one work item.
const TOKENS_PER_ITEM: usize = 8;

/// Head geometry of the attention.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads.
    pub n_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
}

/// The rows of one sequence's chunk within the batch.
#[derive(Debug, Clone, Copy)]
pub struct ChunkRows<'a> {
    /// Batch row of the chunk's first token.
    pub first_row: usize,
    /// Number of tokens in the chunk.
    pub len: usize,
    /// Position of the chunk's first token.
    pub start_pos: usize,
    /// The sequence's KV blocks.
    pub block_table: &'a [BlockId],
}

/// One layer's K and V storage in the pool layout.
#[derive(Debug, Clone, Copy)]
pub struct LayerKv<'a> {
    /// K, `[block][kv_head][head_dim][slot]`.
    pub k: &'a [f32],
    /// V, `[block][kv_head][slot][head_dim]`.
    pub v: &'a [f32],
}

#[derive(Debug, Clone, Copy)]
struct WorkItem {
    chunk: usize,
    kv_head: usize,
    first_token: usize,
    tokens: usize,
}

/// Attention output `[rows][n_heads * head_dim]` for the RoPE'd `queries` (same layout); the K
/// and V of every attended position must already be in `kv`.
pub fn paged_attention(
    shape: AttentionShape,
    queries: &[f32],
    chunks: &[ChunkRows<'_>],
    kv: LayerKv<'_>,
) -> Vec<f32> {
    let row_width = shape.n_heads * shape.head_dim;
    let mut items = Vec::new();
    for (chunk_index, chunk) in chunks.iter().enumerate() {
        for kv_head in 0..shape.n_kv_heads {
            for first_token in (0..chunk.len).step_by(TOKENS_PER_ITEM) {
                items.push(WorkItem {
                    chunk: chunk_index,
                    kv_head,
                    first_token,
                    tokens: TOKENS_PER_ITEM.min(chunk.len - first_token),
                });
            }
        }
    }
    let results: Vec<OnceLock<Vec<f32>>> = items.iter().map(|_| OnceLock::new()).collect();
    candle_core::utils::barrier_pool().execute_chunked(items.len(), |range| {
        for index in range {
            let item = items[index];
            let output = attend_item(shape, queries, &chunks[item.chunk], item, kv);
            // Each index is visited once, so the cell is always empty here.
            let _ = results[index].set(output);
        }
    });
    let group = shape.n_heads / shape.n_kv_heads;
    let group_width = group * shape.head_dim;
    let mut output = vec![0.0; queries.len()];
    for (item, result) in items.iter().zip(results) {
        let Some(values) = result.into_inner() else {
            continue;
        };
        let chunk = &chunks[item.chunk];
        for (token, values) in values.chunks_exact(group_width).enumerate() {
            let row = chunk.first_row + item.first_token + token;
            let start = row * row_width + item.kv_head * group_width;
            output[start..start + group_width].copy_from_slice(values);
        }
    }
    output
}

/// Output `[tokens][group heads][head_dim]` of one work item.
fn attend_item(
    shape: AttentionShape,
    queries: &[f32],
    chunk: &ChunkRows<'_>,
    item: WorkItem,
    kv: LayerKv<'_>,
) -> Vec<f32> {
    let hd = shape.head_dim;
    let group = shape.n_heads / shape.n_kv_heads;
    let row_width = shape.n_heads * hd;
    let scale = 1.0 / (hd as f32).sqrt();
    let rows = item.tokens * group;
    // Scaled query rows, token-major then head, and each row's number of visible positions.
    let mut scaled = Vec::with_capacity(rows * hd);
    let mut visible = Vec::with_capacity(rows);
    for token in item.first_token..item.first_token + item.tokens {
        let row = &queries[(chunk.first_row + token) * row_width..][..row_width];
        for head in item.kv_head * group..(item.kv_head + 1) * group {
            scaled.extend(row[head * hd..(head + 1) * hd].iter().map(|q| q * scale));
            visible.push(chunk.start_pos + token + 1);
        }
    }
    let geometry = BlockGeometry {
        head_dim: hd,
        block_stride: shape.n_kv_heads * hd * BLOCK_SIZE,
        head_offset: item.kv_head * hd * BLOCK_SIZE,
    };
    let mut output = vec![0.0; rows * hd];
    let mut start = 0;
    while start < rows {
        let count = ROWS_PER_GROUP.min(rows - start);
        let q = &scaled[start * hd..(start + count) * hd];
        let limits = &visible[start..start + count];
        let out = &mut output[start * hd..(start + count) * hd];
        match count {
            4 => attend_rows::<4>(q, limits, chunk.block_table, geometry, kv, out),
            3 => attend_rows::<3>(q, limits, chunk.block_table, geometry, kv, out),
            2 => attend_rows::<2>(q, limits, chunk.block_table, geometry, kv, out),
            _ => attend_rows::<1>(q, limits, chunk.block_table, geometry, kv, out),
        }
        start += count;
    }
    output
}

/// Where one KV head's data sits inside a block.
#[derive(Debug, Clone, Copy)]
struct BlockGeometry {
    head_dim: usize,
    block_stride: usize,
    head_offset: usize,
}

/// Online-softmax attention of `R` query rows (`[R][head_dim]`, pre-scaled) that see
/// `visible[r]` positions each; writes `[R][head_dim]` into `out`.
fn attend_rows<const R: usize>(
    queries: &[f32],
    visible: &[usize],
    block_table: &[BlockId],
    geometry: BlockGeometry,
    kv: LayerKv<'_>,
    out: &mut [f32],
) {
    let hd = geometry.head_dim;
    let mut running_max = [f32::NEG_INFINITY; R];
    let mut running_sum = [0.0f32; R];
    out.fill(0.0);
    let most_visible = visible.iter().copied().max().unwrap_or(0);
    let blocks = most_visible.div_ceil(BLOCK_SIZE).min(block_table.len());
    for (block_index, &block) in block_table[..blocks].iter().enumerate() {
        let base = block as usize * geometry.block_stride + geometry.head_offset;
        let keys = &kv.k[base..base + hd * BLOCK_SIZE];
        let values = &kv.v[base..base + hd * BLOCK_SIZE];
        let mut scores = [[0.0f32; BLOCK_SIZE]; R];
        let (key_rows, _) = keys.as_chunks::<BLOCK_SIZE>();
        for (d, key_row) in key_rows.iter().enumerate() {
            for (r, row_scores) in scores.iter_mut().enumerate() {
                let q = queries[r * hd + d];
                for (score, key) in row_scores.iter_mut().zip(key_row) {
                    *score = q.mul_add(*key, *score);
                }
            }
        }
        for r in 0..R {
            let valid = visible[r]
                .saturating_sub(block_index * BLOCK_SIZE)
                .min(BLOCK_SIZE);
            if valid == 0 {
                continue;
            }
            let row_scores = &mut scores[r];
            row_scores[valid..].fill(f32::NEG_INFINITY);
            let block_max = row_scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let new_max = running_max[r].max(block_max);
            let correction = (running_max[r] - new_max).exp();
            running_max[r] = new_max;
            let mut shifted = *row_scores;
            for score in &mut shifted {
                *score -= new_max;
            }
            let weights = exp_lanes(shifted);
            running_sum[r] = running_sum[r] * correction + weights.iter().sum::<f32>();
            let acc = &mut out[r * hd..(r + 1) * hd];
            if correction != 1.0 {
                for a in acc.iter_mut() {
                    *a *= correction;
                }
            }
            for (weight, value_row) in weights[..valid].iter().zip(values.chunks_exact(hd)) {
                for (a, v) in acc.iter_mut().zip(value_row) {
                    *a = weight.mul_add(*v, *a);
                }
            }
        }
    }
    for r in 0..R {
        let inverse = 1.0 / running_sum[r];
        for a in &mut out[r * hd..(r + 1) * hd] {
            *a *= inverse;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Straightforward softmax attention for one query over explicit K/V rows.
    fn naive(query: &[f32], keys: &[Vec<f32>], values: &[Vec<f32>]) -> Vec<f32> {
        let scale = 1.0 / (query.len() as f32).sqrt();
        let scores: Vec<f32> = keys
            .iter()
            .map(|k| k.iter().zip(query).map(|(a, b)| a * b).sum::<f32>() * scale)
            .collect();
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let weights: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
        let total: f32 = weights.iter().sum();
        let mut out = vec![0.0; query.len()];
        for (w, v) in weights.iter().zip(values) {
            for (o, x) in out.iter_mut().zip(v) {
                *o += w / total * x;
            }
        }
        out
    }

    #[test]
    fn paged_attention_matches_naive_softmax_attention() {
        let shape = AttentionShape {
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 8,
        };
        let positions = 37; // three blocks, the last one partial
        let block_table: Vec<BlockId> = vec![4, 0, 2];
        let block_stride = shape.n_kv_heads * shape.head_dim * BLOCK_SIZE;
        let mut k = vec![f32::NAN; 5 * block_stride];
        let mut v = vec![f32::NAN; 5 * block_stride];
        let value = |p: usize, h: usize, d: usize, salt: usize| {
            (((p * 31 + h * 17 + d * 7 + salt) % 23) as f32 - 11.0) / 7.0
        };
        let mut keys = vec![vec![Vec::new(); positions]; shape.n_kv_heads];
        let mut vals = vec![vec![Vec::new(); positions]; shape.n_kv_heads];
        for p in 0..positions {
            let block = block_table[p / BLOCK_SIZE] as usize;
            let slot = p % BLOCK_SIZE;
            for h in 0..shape.n_kv_heads {
                for d in 0..shape.head_dim {
                    let head_base = block * block_stride + h * shape.head_dim * BLOCK_SIZE;
                    k[head_base + d * BLOCK_SIZE + slot] = value(p, h, d, 1);
                    v[head_base + slot * shape.head_dim + d] = value(p, h, d, 2);
                    keys[h][p].push(value(p, h, d, 1));
                    vals[h][p].push(value(p, h, d, 2));
                }
            }
        }
        // A chunk of the last 10 positions, after 2 rows of another (absent) chunk.
        let chunk = ChunkRows {
            first_row: 2,
            len: 10,
            start_pos: positions - 10,
            block_table: &block_table,
        };
        let row_width = shape.n_heads * shape.head_dim;
        let queries: Vec<f32> = (0..12 * row_width)
            .map(|i| ((i % 13) as f32 - 6.0) / 5.0)
            .collect();
        let output = paged_attention(shape, &queries, &[chunk], LayerKv { k: &k, v: &v });
        for token in 0..10 {
            let row = 2 + token;
            let visible = chunk.start_pos + token + 1;
            for head in 0..shape.n_heads {
                let kv_head = head / 2;
                let q = &queries[row * row_width + head * shape.head_dim..][..shape.head_dim];
                let expected = naive(q, &keys[kv_head][..visible], &vals[kv_head][..visible]);
                let got = &output[row * row_width + head * shape.head_dim..][..shape.head_dim];
                for (a, b) in got.iter().zip(&expected) {
                    assert!(
                        (a - b).abs() < 1e-5,
                        "token {token} head {head}: {a} vs {b}"
                    );
                }
            }
        }
        assert!(output[..2 * row_width].iter().all(|&x| x == 0.0));
    }
}
