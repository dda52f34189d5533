//! The CPU backend's matrix multiply: `input [rows, in] · weightᵀ` for weights held in GGUF
//! blocks of 32 inputs — Q8_0 (a scale and 32 signed 8-bit codes) or Q4_1 (a scale, a min and
//! 32 4-bit codes) — as llama.cpp and candle compute it: the activation rows are rounded to
//! 8-bit codes per block of 32 ([`QuantizedRows`]), and each block's dot product is an exact
//! integer sum of byte products (`vpmaddubsw`/`vpmaddwd` on AVX2) scaled once in f32.
//!
//! Blocks go in pairs (see [`int8`]): the weights are laid out at load time so that one
//! 32-byte vector holds two blocks' inputs 0..16 and another their inputs 16..32 (for Q4_1 that
//! is GGUF's own nibble layout, two blocks' bytes side by side), and the activations alike.
//!
//! One kernel serves every batch shape, in register tiles of 8 accumulators (1–3 rows × 4
//! outputs, so a single decode row still runs four independent chains; from 4 rows on, 4 rows ×
//! 2 outputs, so each unpacked weight pair serves four rows and each activation pair two
//! outputs). For output `o` and row `r`, the result is fixed by the arithmetic alone:
//! - per block pair `p`, in increasing `p`: `acc = fma(f32(isum_p), scale_o × scale_r, acc)`
//!   on eight lanes, lanes 0..4 holding exact integer sums of block `2p` (and its scales),
//!   lanes 4..8 of block `2p + 1` (an odd last block pairs with zeros);
//! - then a fixed pairwise sum of the lanes;
//! - for Q4_1, plus `Σ_b min_o,b × sum_r,b` (the block min times the block's activation sum),
//!   one FMA per block in increasing `b`.
//!
//! A row's result therefore never depends on how many rows share the batch or which tile ran
//! it — the property behind "reuse equals recompute" and "batching equals sequential".
//!
//! Work is split into items of (rows × outputs) on candle's CPU thread pool; each output element
//! is computed by exactly one item, so thread count and scheduling do not change results.

use std::sync::OnceLock;

use wide::f32x8;

use crate::engine::model::int8::{
    self, BLOCK, CodePair, Q4Pair, Q8Pair, QuantizedRows, WeightPair, WeightRows,
};

/// Inputs per quantization block.
pub const Q8_BLOCK: usize = BLOCK;
/// Accumulator lanes per output element.
const LANES: usize = 8;
/// Accumulators (rows × outputs) per register tile: with 4 or 2 outputs per tile
/// ([`QuantMatrix::code_tile`]), tiles hold at most 4 rows.
const CODE_TILE_ROWS: usize = 8;
/// From this many rows on, work items split the rows too (prefill chunks).
const SPLIT_ROWS_FROM: usize = 32;
/// Outputs per work item.
const ITEM_OUTPUTS: usize = 32;
/// Rows per work item when rows are split.
const ITEM_ROWS: usize = 64;

/// Why a weight cannot become a [`QuantMatrix`].
#[derive(Debug, thiserror::Error)]
pub enum BuildQuantMatrixError {
    /// The input width is not a multiple of the quantization block.
    #[error("input width {width} is not a multiple of {Q8_BLOCK}")]
    Width {
        /// The input width.
        width: usize,
    },
    /// The block bytes do not match the shape.
    #[error("{bytes} bytes of {format} data for a [{outputs}, {inputs}] matrix")]
    Size {
        /// The GGUF block format.
        format: &'static str,
        /// Bytes given.
        bytes: usize,
        /// Output features.
        outputs: usize,
        /// Input features.
        inputs: usize,
    },
}

/// The quantized weights by pairs of blocks (see the module doc), `[outputs][pairs]`, with
/// scales `[outputs][2 × pairs]` (zero for the padding block of an odd count).
#[derive(Debug)]
enum Codes {
    /// Q8_0: signed codes (low and high vectors) and scales (f16 values widened to f32);
    /// weight = code × scale.
    Q8 {
        codes: Vec<CodePair>,
        scales: Vec<f32>,
    },
    /// Q4_1: two GGUF blocks' nibble bytes side by side (low nibbles are inputs 0..16 of a
    /// block, high nibbles inputs 16..32), scales, and mins by groups of eight outputs,
    /// `[outputs / 8][blocks][8]` (zero past the last output; f16 values widened to f32);
    /// weight = code × scale + min.
    Q4 {
        nibbles: Vec<[u8; Q8_BLOCK]>,
        scales: Vec<f32>,
        mins: Vec<[f32; LANES]>,
    },
}

/// A weight matrix `[outputs, inputs]` in Q8_0 or Q4_1.
#[derive(Debug)]
pub struct QuantMatrix {
    outputs: usize,
    inputs: usize,
    codes: Codes,
}

/// Checks `bytes` holds `[outputs, inputs]` weights in blocks of `block_bytes` bytes.
fn check_size(
    format: &'static str,
    block_bytes: usize,
    bytes: &[u8],
    outputs: usize,
    inputs: usize,
) -> Result<(), BuildQuantMatrixError> {
    if !inputs.is_multiple_of(Q8_BLOCK) {
        return Err(BuildQuantMatrixError::Width { width: inputs });
    }
    if bytes.len() != outputs * inputs / Q8_BLOCK * block_bytes {
        return Err(BuildQuantMatrixError::Size {
            format,
            bytes: bytes.len(),
            outputs,
            inputs,
        });
    }
    Ok(())
}

fn f16_at(bytes: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

impl QuantMatrix {
    /// Blocks per output.
    fn blocks(&self) -> usize {
        self.inputs / Q8_BLOCK
    }

    /// Block pairs per output.
    fn pairs(&self) -> usize {
        self.blocks().div_ceil(2)
    }

    /// Builds the matrix from GGUF Q8_0 blocks (`f16` scale, little-endian, then 32 `i8`).
    pub fn from_q8_0_bytes(
        bytes: &[u8],
        outputs: usize,
        inputs: usize,
    ) -> Result<Self, BuildQuantMatrixError> {
        const BLOCK_BYTES: usize = 2 + Q8_BLOCK;
        check_size("Q8_0", BLOCK_BYTES, bytes, outputs, inputs)?;
        let blocks = inputs / Q8_BLOCK;
        let pairs = blocks.div_ceil(2);
        let mut codes = vec![[[0; Q8_BLOCK]; 2]; outputs * pairs];
        let mut scales = vec![0.0; outputs * 2 * pairs];
        for (index, block) in bytes.chunks_exact(BLOCK_BYTES).enumerate() {
            let (output, block_in_row) = (index / blocks, index % blocks);
            let half = block_in_row % 2;
            scales[output * 2 * pairs + block_in_row] = f16_at(block, 0);
            let pair = &mut codes[output * pairs + block_in_row / 2];
            for (j, &byte) in block[2..].iter().enumerate() {
                pair[j / 16][half * 16 + j % 16] = byte as i8;
            }
        }
        Ok(Self {
            outputs,
            inputs,
            codes: Codes::Q8 { codes, scales },
        })
    }

    /// Builds the matrix from GGUF Q4_1 blocks (`f16` scale and min, little-endian, then 16
    /// bytes of 4-bit codes), kept as they are: 20 bytes per 32 weights.
    pub fn from_q4_1_bytes(
        bytes: &[u8],
        outputs: usize,
        inputs: usize,
    ) -> Result<Self, BuildQuantMatrixError> {
        const BLOCK_BYTES: usize = 4 + Q8_BLOCK / 2;
        check_size("Q4_1", BLOCK_BYTES, bytes, outputs, inputs)?;
        let blocks = inputs / Q8_BLOCK;
        let pairs = blocks.div_ceil(2);
        let mut nibbles = vec![[0; Q8_BLOCK]; outputs * pairs];
        let mut scales = vec![0.0; outputs * 2 * pairs];
        let mut mins = vec![[0.0; LANES]; outputs.div_ceil(LANES) * blocks];
        for (index, block) in bytes.chunks_exact(BLOCK_BYTES).enumerate() {
            let (output, block_in_row) = (index / blocks, index % blocks);
            let half = block_in_row % 2;
            scales[output * 2 * pairs + block_in_row] = f16_at(block, 0);
            mins[output / LANES * blocks + block_in_row][output % LANES] = f16_at(block, 2);
            nibbles[output * pairs + block_in_row / 2][half * 16..half * 16 + 16]
                .copy_from_slice(&block[4..]);
        }
        Ok(Self {
            outputs,
            inputs,
            codes: Codes::Q4 {
                nibbles,
                scales,
                mins,
            },
        })
    }

    /// Output features.
    pub fn outputs(&self) -> usize {
        self.outputs
    }

    /// Input features.
    pub fn inputs(&self) -> usize {
        self.inputs
    }

    /// The weights as f32 values, `[outputs][inputs]`: `code × scale` for Q8_0 (exact),
    /// `code × scale + min` for Q4_1 (rounded once). The tests' reference.
    #[cfg(test)]
    pub fn dequantize(&self) -> Vec<f32> {
        let (blocks, pairs) = (self.blocks(), self.pairs());
        let mut weights = Vec::with_capacity(self.outputs * self.inputs);
        for output in 0..self.outputs {
            for block in 0..blocks {
                let (pair, half) = (output * pairs + block / 2, block % 2);
                let scale_at = output * 2 * pairs + block;
                for j in 0..Q8_BLOCK {
                    let at = half * 16 + j % 16;
                    weights.push(match &self.codes {
                        Codes::Q8 { codes, scales } => {
                            f32::from(codes[pair][j / 16][at]) * scales[scale_at]
                        }
                        Codes::Q4 {
                            nibbles,
                            scales,
                            mins,
                        } => {
                            let byte = nibbles[pair][at];
                            let code = if j < 16 { byte & 0x0F } else { byte >> 4 };
                            let min = mins[output / LANES * blocks + block][output % LANES];
                            f32::from(code).mul_add(scales[scale_at], min)
                        }
                    });
                }
            }
        }
        weights
    }

    /// `input [rows, inputs] · selfᵀ` → `[rows, outputs]`.
    pub fn matmul(&self, input: &[f32], rows: usize) -> Vec<f32> {
        debug_assert_eq!(input.len(), rows * self.inputs);
        let mut output = vec![0.0; rows * self.outputs];
        if rows == 0 || self.outputs == 0 {
            return output;
        }
        let x = QuantizedRows::quantize(input, self.inputs);
        let row_step = if rows >= SPLIT_ROWS_FROM {
            ITEM_ROWS
        } else {
            rows
        };
        let row_blocks = rows.div_ceil(row_step);
        let output_blocks = self.outputs.div_ceil(ITEM_OUTPUTS);
        let items = row_blocks * output_blocks;
        let results: Vec<OnceLock<Vec<f32>>> = (0..items).map(|_| OnceLock::new()).collect();
        // (first row, rows, first output, outputs) of work item `index`.
        let span = |index: usize| {
            let (row_block, output_block) = (index / output_blocks, index % output_blocks);
            let first_row = row_block * row_step;
            let first_output = output_block * ITEM_OUTPUTS;
            TileSpan {
                first_row,
                row_count: row_step.min(rows - first_row),
                first_output,
                output_count: ITEM_OUTPUTS.min(self.outputs - first_output),
            }
        };
        let run = |index: usize| {
            let tile = self.code_tile(&x, span(index));
            // Each index runs once, so the cell is always empty here.
            let _ = results[index].set(tile);
        };
        if items == 1 {
            run(0);
        } else {
            candle_core::utils::barrier_pool().execute_chunked(items, |range| {
                for index in range {
                    run(index);
                }
            });
        }
        for (index, cell) in results.into_iter().enumerate() {
            let Some(tile) = cell.into_inner() else {
                continue;
            };
            let span = span(index);
            for (offset, values) in tile.chunks_exact(span.output_count).enumerate() {
                let start = (span.first_row + offset) * self.outputs + span.first_output;
                output[start..start + span.output_count].copy_from_slice(values);
            }
        }
        output
    }

    /// `[row_count][output_count]` of one work item, in register tiles of `C` outputs × up to
    /// `8 / C` rows: 1–3 rows take 4 outputs per tile, so a single decode row still runs four
    /// independent accumulator chains; from 4 rows on, 4 rows × 2 outputs, so each unpacked
    /// weight block serves four rows and each activation block two outputs.
    fn code_tile(&self, x: &QuantizedRows, span: TileSpan) -> Vec<f32> {
        let mut tile = vec![0.0; span.row_count * span.output_count];
        match span.row_count {
            1..=3 => self.code_outputs::<4>(x, span, &mut tile),
            _ => self.code_outputs::<2>(x, span, &mut tile),
        }
        if let Codes::Q4 { mins, .. } = &self.codes {
            self.add_min_terms(mins, x, span, &mut tile);
        }
        tile
    }

    /// Adds Q4_1's min terms to a work item's tile: for row `r` and output `o`,
    /// `Σ_b min_o,b × sum_r,b` (the block min times the sum of the row's block), one FMA per
    /// block in increasing `b`, eight outputs side by side in the lanes.
    fn add_min_terms(
        &self,
        mins: &[[f32; LANES]],
        x: &QuantizedRows,
        span: TileSpan,
        tile: &mut [f32],
    ) {
        let blocks = self.blocks();
        // Work items start at multiples of ITEM_OUTPUTS, so groups of eight line up.
        const { assert!(ITEM_OUTPUTS.is_multiple_of(LANES)) };
        for first in (0..span.output_count).step_by(LANES) {
            let count = LANES.min(span.output_count - first);
            let group = (span.first_output + first) / LANES;
            let mins = &mins[group * blocks..(group + 1) * blocks];
            for r in 0..span.row_count {
                let sums = x.sums(span.first_row + r);
                let terms = mins
                    .iter()
                    .zip(sums)
                    .fold(f32x8::ZERO, |acc, (mins, &sum)| {
                        f32x8::new(*mins).mul_add(f32x8::splat(sum), acc)
                    });
                let row = &mut tile[r * span.output_count + first..][..count];
                for (value, term) in row.iter_mut().zip(terms.to_array()) {
                    *value += term;
                }
            }
        }
    }

    /// [`Self::code_tile`] with `C` outputs per register tile.
    fn code_outputs<const C: usize>(&self, x: &QuantizedRows, span: TileSpan, tile: &mut [f32]) {
        let pairs = self.pairs();
        let mut o = 0;
        while o < span.output_count {
            let count = C.min(span.output_count - o);
            // A short last group repeats its last output; the extra sums are dropped.
            let outputs: [usize; C] =
                std::array::from_fn(|c| span.first_output + o + c.min(count - 1));
            let group = OutputGroup { first: o, count };
            let rows = RowsOf { x, span, pairs };
            match &self.codes {
                Codes::Q8 { codes, scales } => {
                    let weights = WeightRows::<Q8Pair, C>::of(codes, scales, outputs, pairs);
                    code_rows(rows, group, tile, &weights);
                }
                Codes::Q4 {
                    nibbles, scales, ..
                } => {
                    let weights = WeightRows::<Q4Pair, C>::of(nibbles, scales, outputs, pairs);
                    code_rows(rows, group, tile, &weights);
                }
            }
            o += count;
        }
    }
}

/// Outputs `first..first + count` of a work item's tile.
#[derive(Clone, Copy)]
struct OutputGroup {
    first: usize,
    count: usize,
}

/// The rows and outputs one work item computes.
#[derive(Clone, Copy)]
struct TileSpan {
    first_row: usize,
    row_count: usize,
    first_output: usize,
    output_count: usize,
}

/// The quantized activation rows of a work item.
#[derive(Clone, Copy)]
struct RowsOf<'a> {
    x: &'a QuantizedRows,
    span: TileSpan,
    pairs: usize,
}

/// Runs the kernel over all rows of a work item for one group of `C` outputs whose block pairs
/// `weights` holds, writing the group's columns of `tile`.
#[inline(always)]
fn code_rows<const C: usize, P: WeightPair>(
    rows: RowsOf<'_>,
    group: OutputGroup,
    tile: &mut [f32],
    weights: &WeightRows<'_, P, C>,
) {
    let TileSpan {
        first_row,
        row_count,
        output_count,
        ..
    } = rows.span;
    let mut r = 0;
    while r < row_count {
        const {
            assert!(
                CODE_TILE_ROWS / C <= 4,
                "the match below has arms for 1..=4 rows"
            )
        };
        let count = (CODE_TILE_ROWS / C).min(row_count - r);
        let mut put = |sums: &[[f32; C]]| {
            for (i, row_sums) in sums.iter().enumerate() {
                let start = (r + i) * output_count + group.first;
                if group.count == C {
                    // A fixed-size copy: register moves, not a `memcpy` call per row.
                    tile[start..start + C].copy_from_slice(row_sums);
                } else {
                    tile[start..start + group.count].copy_from_slice(&row_sums[..group.count]);
                }
            }
        };
        let first = first_row + r;
        let (x, pairs) = (rows.x, rows.pairs);
        match count {
            4 => put(&code_kernel::<4, C, P>(x, first, pairs, weights)),
            3 => put(&code_kernel::<3, C, P>(x, first, pairs, weights)),
            2 => put(&code_kernel::<2, C, P>(x, first, pairs, weights)),
            _ => put(&code_kernel::<1, C, P>(x, first, pairs, weights)),
        }
        r += count;
    }
}

/// The fixed final reduction of each accumulator's eight lanes `l`:
/// `((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7))`. Eight accumulators at a time are
/// transposed so that vector `i` holds lane `i` of each, and the same sums run vertically.
#[inline(always)]
fn reduce_tile<const R: usize, const C: usize>(acc: [[f32x8; C]; R]) -> [[f32; C]; R] {
    let mut out = [[0.0; C]; R];
    let mut first = 0;
    while first < R * C {
        let count = LANES.min(R * C - first);
        let mut group = [f32x8::ZERO; LANES];
        for (i, lanes) in group.iter_mut().take(count).enumerate() {
            let flat = first + i;
            *lanes = acc[flat / C][flat % C];
        }
        let l = f32x8::transpose(group);
        let sums = (((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]))).to_array();
        for (i, &sum) in sums.iter().take(count).enumerate() {
            let flat = first + i;
            out[flat / C][flat % C] = sum;
        }
        first += count;
    }
    out
}

/// Dot products of rows `first..first + R` of `x` with `C` weight rows whose block pairs
/// `weights` holds.
#[inline(always)]
fn code_kernel<const R: usize, const C: usize, P: WeightPair>(
    x: &QuantizedRows,
    first: usize,
    pairs: usize,
    weights: &WeightRows<'_, P, C>,
) -> [[f32; C]; R] {
    let rows: [(&[CodePair], &[[f32; 8]]); R] = std::array::from_fn(|r| x.row(first + r));
    assert!(
        rows.iter()
            .all(|(codes, scales)| codes.len() == pairs && scales.len() == pairs)
    );
    let mut acc = [[f32x8::ZERO; C]; R];
    for pair in 0..pairs {
        let weight_pairs: [(P, f32x8); C] = std::array::from_fn(|c| weights.pair(c, pair));
        for (acc_row, (codes, scales)) in acc.iter_mut().zip(&rows) {
            let activations = codes[pair].each_ref().map(int8::load);
            let row_scales = f32x8::new(scales[pair]);
            for (acc_out, &(weight, weight_scales)) in acc_row.iter_mut().zip(&weight_pairs) {
                let sum = f32x8::from_i32x8(weight.dot(activations));
                *acc_out = sum.mul_add(weight_scales * row_scales, *acc_out);
            }
        }
    }
    reduce_tile(acc)
}

#[cfg(test)]
#[path = "matmul_tests.rs"]
mod tests;
