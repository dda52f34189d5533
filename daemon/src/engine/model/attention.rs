//! Causal grouped-query attention over the paged KV pool (CPU).
//!
//! Work is split into items of (chunk, KV head, tile of tokens) run on candle's CPU thread pool.
//! Inside an item, up to six query rows (token × head of the group) share every K/V block they
//! read: their scores against a block's 16 slots are one register tile of broadcast FMAs over
//! the transposed K layout of [`KvPool`](crate::engine::kv_pool::KvPool), and their weighted
//! sums of V are register tiles of rows × up to 32 lanes. Softmax is online (running max and sum
//! per row, one rescale per block). Each row's arithmetic is the same whatever rows it is grouped
//! with, so a sequence's output never depends on the rest of the batch.

use std::sync::OnceLock;

use crate::engine::batch::{BLOCK_SIZE, BlockId};
use crate::engine::model::ops::exp_lanes;
use wide::f32x8;

/// Query rows processed together against each block.
const ROWS_PER_GROUP: usize = 6;
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
            6 => attend_rows::<6>(q, limits, chunk.block_table, geometry, kv, out),
            5 => attend_rows::<5>(q, limits, chunk.block_table, geometry, kv, out),
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
///
/// Per block, the `R` rows' scores are one register tile (`R` × 16 slots), and the weighted
/// sum of values runs over register tiles of `R` rows × up to 32 output lanes, so each K and V
/// vector loaded serves every row. Each row's arithmetic — the order of its fused multiply-adds,
/// its rescales and its `exp` — is the same whatever rows share the tile.
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
        let scores = block_scores::<R>(queries, hd, keys);
        let mut step = BlockStep {
            weights: [[0.0f32; BLOCK_SIZE]; R],
            valid: [0; R],
            correction: [1.0; R],
        };
        for r in 0..R {
            let valid = visible[r]
                .saturating_sub(block_index * BLOCK_SIZE)
                .min(BLOCK_SIZE);
            if valid == 0 {
                continue;
            }
            let mut row_scores = scores[r];
            row_scores[valid..].fill(f32::NEG_INFINITY);
            let block_max = tree_reduce(row_scores, f32::max);
            let new_max = running_max[r].max(block_max);
            let correction = (running_max[r] - new_max).exp();
            running_max[r] = new_max;
            for score in &mut row_scores {
                *score -= new_max;
            }
            let weights = exp_lanes(row_scores);
            running_sum[r] = running_sum[r] * correction + tree_reduce(weights, |a, b| a + b);
            step.weights[r] = weights;
            step.valid[r] = valid;
            step.correction[r] = correction;
        }
        // R rows × V vectors of accumulators, plus V value vectors, within 16 registers.
        if R > 3 {
            accumulate_values::<R, 2>(&step, values, hd, out);
        } else {
            accumulate_values::<R, 4>(&step, values, hd, out);
        }
    }
    for r in 0..R {
        let inverse = 1.0 / running_sum[r];
        for a in &mut out[r * hd..(r + 1) * hd] {
            *a *= inverse;
        }
    }
}

/// `op` folded over a block's 16 values as a fixed tree (halves combined lane by lane), so the
/// steps vectorise and run in parallel instead of one dependent chain of 15.
#[inline(always)]
fn tree_reduce(mut values: [f32; BLOCK_SIZE], op: impl Fn(f32, f32) -> f32) -> f32 {
    const { assert!(BLOCK_SIZE.is_power_of_two()) };
    let mut width = BLOCK_SIZE;
    while width > 1 {
        width /= 2;
        for i in 0..width {
            values[i] = op(values[i], values[i + width]);
        }
    }
    values[0]
}

/// Lanes of one vector.
const LANES: usize = 8;
/// Vectors across a block's slots.
const SLOT_VECTORS: usize = BLOCK_SIZE / LANES;
const _: () = assert!(BLOCK_SIZE.is_multiple_of(LANES));

/// One block's softmax weights for `R` rows: `valid[r]` slots count for row `r` (0: the row
/// sees none of the block), and its running sum of values is rescaled by `correction[r]` first.
struct BlockStep<const R: usize> {
    weights: [[f32; BLOCK_SIZE]; R],
    valid: [usize; R],
    correction: [f32; R],
}

/// `q · k` of `R` query rows with a block's 16 keys (`[head_dim][slot]` layout): per dimension,
/// one fused multiply-add of the broadcast query value into each row's 16 scores.
#[inline(always)]
fn block_scores<const R: usize>(
    queries: &[f32],
    hd: usize,
    keys: &[f32],
) -> [[f32; BLOCK_SIZE]; R] {
    let mut acc = [[f32x8::ZERO; SLOT_VECTORS]; R];
    let (key_rows, _) = keys.as_chunks::<BLOCK_SIZE>();
    for (d, key_row) in key_rows.iter().enumerate() {
        let (key_lanes, _) = key_row.as_chunks::<LANES>();
        let k: [f32x8; SLOT_VECTORS] = std::array::from_fn(|v| f32x8::new(key_lanes[v]));
        for (r, row) in acc.iter_mut().enumerate() {
            let q = f32x8::splat(queries[r * hd + d]);
            for (lanes, k) in row.iter_mut().zip(&k) {
                *lanes = q.mul_add(*k, *lanes);
            }
        }
    }
    acc.map(|row| {
        let mut scores = [0.0f32; BLOCK_SIZE];
        for (chunk, lanes) in scores.chunks_exact_mut(LANES).zip(row) {
            chunk.copy_from_slice(lanes.as_array());
        }
        scores
    })
}

/// `out[r] = out[r] × correction[r] + Σ_s weights[r][s] · values[s]` over each row's valid
/// slots in increasing order, in register tiles of `R` rows × `V` vectors of the head.
#[inline(always)]
fn accumulate_values<const R: usize, const V: usize>(
    step: &BlockStep<R>,
    values: &[f32],
    hd: usize,
    out: &mut [f32],
) {
    let mut d = 0;
    while d + V * LANES <= hd {
        value_tile::<R, V>(step, values, hd, d, out);
        d += V * LANES;
    }
    while d + LANES <= hd {
        value_tile::<R, 1>(step, values, hd, d, out);
        d += LANES;
    }
    // A head width that is not a multiple of the lanes: the same arithmetic, one lane at a time.
    for lane in d..hd {
        for r in 0..R {
            let a = &mut out[r * hd + lane];
            if step.correction[r] != 1.0 {
                *a *= step.correction[r];
            }
            for s in 0..step.valid[r] {
                *a = step.weights[r][s].mul_add(values[s * hd + lane], *a);
            }
        }
    }
}

/// [`accumulate_values`] for head lanes `d..d + V * 8` of every row.
#[inline(always)]
fn value_tile<const R: usize, const V: usize>(
    step: &BlockStep<R>,
    values: &[f32],
    hd: usize,
    d: usize,
    out: &mut [f32],
) {
    let load = |slice: &[f32]| {
        let (lanes, _) = slice[..LANES].as_chunks::<LANES>();
        f32x8::new(lanes[0])
    };
    let mut acc: [[f32x8; V]; R] =
        std::array::from_fn(|r| std::array::from_fn(|v| load(&out[r * hd + d + v * LANES..])));
    for (row, &correction) in acc.iter_mut().zip(&step.correction) {
        if correction != 1.0 {
            let correction = f32x8::splat(correction);
            for lanes in row.iter_mut() {
                *lanes *= correction;
            }
        }
    }
    let most = step.valid.iter().copied().max().unwrap_or(0);
    for s in 0..most {
        let value: [f32x8; V] = std::array::from_fn(|v| load(&values[s * hd + d + v * LANES..]));
        for (r, row) in acc.iter_mut().enumerate() {
            if s >= step.valid[r] {
                continue;
            }
            let weight = f32x8::splat(step.weights[r][s]);
            for (lanes, value) in row.iter_mut().zip(&value) {
                *lanes = weight.mul_add(*value, *lanes);
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        for (v, lanes) in row.iter().enumerate() {
            let start = r * hd + d + v * LANES;
            out[start..start + LANES].copy_from_slice(lanes.as_array());
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
