//! The CPU backend's matrix multiply: `input [rows, in] · weightᵀ` for weights held in GGUF
//! blocks of 32 inputs — Q8_0 (a scale and 32 signed 8-bit codes) or Q4_1 (a scale, a min and
//! 32 4-bit codes) — as llama.cpp and candle compute it: the activation rows are rounded to
//! 8-bit codes per block of 32 ([`QuantizedRows`]), and each block's dot product is an exact
//! integer sum of byte products (`vpmaddubsw`/`vpmaddwd` on AVX2) scaled once in f32.
//!
//! One kernel serves every batch shape, in register tiles of 8 accumulators (1–3 rows × 4
//! outputs, so a single decode row still runs four independent chains; from 4 rows on, 4 rows ×
//! 2 outputs, so each unpacked weight block serves four rows and each activation block two
//! outputs). For output `o` and row `r`, the result is fixed by the arithmetic alone:
//! - per block `b`, in increasing `b`: `acc = fma(f32(isum_b), scale_o,b × scale_r,b, acc)` on
//!   eight lanes, lane `i` holding the exact integer sum of inputs `4i..4i + 4` of the block;
//! - then a fixed pairwise sum of the lanes;
//! - for Q4_1, plus `Σ_b min_o,b × sum_r,b` (the block min times the block's activation sum)
//!   in a fixed order.
//!
//! A row's result therefore never depends on how many rows share the batch or which tile ran
//! it — the property behind "reuse equals recompute" and "batching equals sequential".
//!
//! Work is split into items of (rows × outputs) on candle's CPU thread pool; each output element
//! is computed by exactly one item, so thread count and scheduling do not change results.

use std::sync::OnceLock;

use wide::f32x8;

use crate::engine::model::int8::{self, BLOCK, Bytes, QuantizedRows};

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

/// The quantized weights, block by block (32 inputs of one output), `[outputs][blocks]`.
#[derive(Debug)]
enum Codes {
    /// Q8_0: signed codes and scales (f16 values widened to f32); weight = code × scale.
    Q8 {
        codes: Vec<[i8; Q8_BLOCK]>,
        scales: Vec<f32>,
    },
    /// Q4_1 as stored in GGUF: 16 bytes whose low nibbles are inputs 0..16 of the block and
    /// high nibbles inputs 16..32, scales and mins (f16 values widened to f32);
    /// weight = code × scale + min.
    Q4 {
        nibbles: Vec<[u8; Q8_BLOCK / 2]>,
        scales: Vec<f32>,
        mins: Vec<f32>,
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
    /// Builds the matrix from GGUF Q8_0 blocks (`f16` scale, little-endian, then 32 `i8`).
    pub fn from_q8_0_bytes(
        bytes: &[u8],
        outputs: usize,
        inputs: usize,
    ) -> Result<Self, BuildQuantMatrixError> {
        const BLOCK_BYTES: usize = 2 + Q8_BLOCK;
        check_size("Q8_0", BLOCK_BYTES, bytes, outputs, inputs)?;
        let (codes, scales) = bytes
            .chunks_exact(BLOCK_BYTES)
            .map(|block| {
                let codes: [i8; Q8_BLOCK] = std::array::from_fn(|j| block[2 + j] as i8);
                (codes, f16_at(block, 0))
            })
            .unzip();
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
        let count = outputs * inputs / Q8_BLOCK;
        let mut nibbles = Vec::with_capacity(count);
        let mut scales = Vec::with_capacity(count);
        let mut mins = Vec::with_capacity(count);
        for block in bytes.chunks_exact(BLOCK_BYTES) {
            scales.push(f16_at(block, 0));
            mins.push(f16_at(block, 2));
            nibbles.push(std::array::from_fn(|j| block[4 + j]));
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
    /// `code × scale + min` for Q4_1 (rounded once).
    pub fn dequantize(&self) -> Vec<f32> {
        match &self.codes {
            Codes::Q8 { codes, scales } => codes
                .iter()
                .zip(scales)
                .flat_map(|(codes, &scale)| codes.map(|code| f32::from(code) * scale))
                .collect(),
            Codes::Q4 {
                nibbles,
                scales,
                mins,
            } => nibbles
                .iter()
                .zip(scales.iter().zip(mins))
                .flat_map(|(bytes, (&scale, &min))| {
                    let code = |j: usize| {
                        if j < Q8_BLOCK / 2 {
                            bytes[j] & 0x0F
                        } else {
                            bytes[j - Q8_BLOCK / 2] >> 4
                        }
                    };
                    (0..Q8_BLOCK).map(move |j| f32::from(code(j)).mul_add(scale, min))
                })
                .collect(),
        }
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
        tile
    }

    /// [`Self::code_tile`] with `C` outputs per register tile.
    fn code_outputs<const C: usize>(&self, x: &QuantizedRows, span: TileSpan, tile: &mut [f32]) {
        let blocks = self.inputs / Q8_BLOCK;
        let mut o = 0;
        while o < span.output_count {
            let count = C.min(span.output_count - o);
            // A short last group repeats its last output; the extra sums are dropped.
            let outputs: [usize; C] =
                std::array::from_fn(|c| span.first_output + o + c.min(count - 1));
            let group = OutputGroup { first: o, count };
            let rows = RowsOf { x, span, blocks };
            match &self.codes {
                Codes::Q8 { codes, scales } => {
                    let codes =
                        outputs.map(|output| &codes[output * blocks..(output + 1) * blocks]);
                    let scales =
                        outputs.map(|output| &scales[output * blocks..(output + 1) * blocks]);
                    assert!(
                        codes
                            .iter()
                            .zip(&scales)
                            .all(|(c, s)| c.len() == blocks && s.len() == blocks)
                    );
                    code_rows::<C, _, _>(rows, group, tile, |c, block| {
                        (Q8Block::new(&codes[c][block]), scales[c][block])
                    });
                }
                Codes::Q4 {
                    nibbles,
                    scales,
                    mins,
                } => {
                    let nibbles =
                        outputs.map(|output| &nibbles[output * blocks..(output + 1) * blocks]);
                    let scales =
                        outputs.map(|output| &scales[output * blocks..(output + 1) * blocks]);
                    assert!(
                        nibbles
                            .iter()
                            .zip(&scales)
                            .all(|(n, s)| n.len() == blocks && s.len() == blocks)
                    );
                    code_rows::<C, _, _>(rows, group, tile, |c, block| {
                        (Q4Block::new(&nibbles[c][block]), scales[c][block])
                    });
                    // The mins' share: Σ_b min_b × (sum of the row's block b).
                    for (c, &output) in outputs.iter().enumerate().take(count) {
                        let mins = &mins[output * blocks..(output + 1) * blocks];
                        for r in 0..span.row_count {
                            let sums = x.sums(span.first_row + r);
                            tile[r * span.output_count + o + c] += block_dot(mins, sums);
                        }
                    }
                }
            }
            o += count;
        }
    }
}

/// `Σ a_b × b_b` in a fixed order: eight lanes over whole groups of eight, summed pairwise,
/// then the remaining terms in sequence.
fn block_dot(a: &[f32], b: &[f32]) -> f32 {
    let (a_lanes, a_rest) = a.as_chunks::<LANES>();
    let (b_lanes, b_rest) = b.as_chunks::<LANES>();
    let lanes = a_lanes
        .iter()
        .zip(b_lanes)
        .fold(f32x8::ZERO, |acc, (a, b)| {
            f32x8::new(*a).mul_add(f32x8::new(*b), acc)
        });
    let l = lanes.to_array();
    let grouped = ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]));
    a_rest
        .iter()
        .zip(b_rest)
        .fold(grouped, |acc, (a, b)| a.mul_add(*b, acc))
}

/// One weight block unpacked for the byte dot product.
trait WeightBlock: Copy {
    /// Lane `i`: the exact sum of weight code × activation code over inputs `4i..4i + 4`.
    fn dot(self, activations: Bytes) -> wide::i32x8;
}

/// A Q4_1 block's 32 codes (0..=15), unsigned.
#[derive(Clone, Copy)]
struct Q4Block(Bytes);

impl Q4Block {
    #[inline(always)]
    fn new(bytes: &[u8; Q8_BLOCK / 2]) -> Self {
        Self(int8::unpack_nibbles(bytes))
    }
}

impl WeightBlock for Q4Block {
    #[inline(always)]
    fn dot(self, activations: Bytes) -> wide::i32x8 {
        int8::dot_u8_i8(self.0, activations)
    }
}

/// A Q8_0 block's codes: their magnitudes (unsigned) and the codes themselves, whose signs
/// move onto the activations.
#[derive(Clone, Copy)]
struct Q8Block {
    magnitudes: Bytes,
    codes: Bytes,
}

impl Q8Block {
    #[inline(always)]
    fn new(codes: &[i8; Q8_BLOCK]) -> Self {
        let codes = int8::load(codes);
        Self {
            magnitudes: int8::abs(codes),
            codes,
        }
    }
}

impl WeightBlock for Q8Block {
    #[inline(always)]
    fn dot(self, activations: Bytes) -> wide::i32x8 {
        int8::dot_u8_i8(self.magnitudes, int8::apply_sign(activations, self.codes))
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
    blocks: usize,
}

/// Runs the kernel over all rows of a work item for one group of `C` outputs whose blocks
/// `weights(c, block)` gives, writing the group's columns of `tile`.
#[inline(always)]
fn code_rows<const C: usize, B: WeightBlock, W: Fn(usize, usize) -> (B, f32)>(
    rows: RowsOf<'_>,
    group: OutputGroup,
    tile: &mut [f32],
    weights: W,
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
                tile[start..start + group.count].copy_from_slice(&row_sums[..group.count]);
            }
        };
        let first = first_row + r;
        let (x, blocks) = (rows.x, rows.blocks);
        match count {
            4 => put(&code_kernel::<4, C, B, W>(x, first, blocks, &weights)),
            3 => put(&code_kernel::<3, C, B, W>(x, first, blocks, &weights)),
            2 => put(&code_kernel::<2, C, B, W>(x, first, blocks, &weights)),
            _ => put(&code_kernel::<1, C, B, W>(x, first, blocks, &weights)),
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

/// Dot products of rows `first..first + R` of `x` with `C` weight rows whose blocks
/// `weights(c, block)` gives (block and its scale).
#[inline(always)]
fn code_kernel<const R: usize, const C: usize, B: WeightBlock, W: Fn(usize, usize) -> (B, f32)>(
    x: &QuantizedRows,
    first: usize,
    blocks: usize,
    weights: &W,
) -> [[f32; C]; R] {
    let rows: [(&[[i8; Q8_BLOCK]], &[f32]); R] = std::array::from_fn(|r| x.row(first + r));
    assert!(
        rows.iter()
            .all(|(codes, scales)| codes.len() == blocks && scales.len() == blocks)
    );
    let mut acc = [[f32x8::ZERO; C]; R];
    for block in 0..blocks {
        let weight_blocks: [(B, f32); C] = std::array::from_fn(|c| weights(c, block));
        let weight_scales = weight_blocks.map(|(_, scale)| f32x8::splat(scale));
        for (acc_row, (codes, scales)) in acc.iter_mut().zip(&rows) {
            let activations = int8::load(&codes[block]);
            let row_scale = f32x8::splat(scales[block]);
            for ((acc_out, (weight, _)), weight_scale) in
                acc_row.iter_mut().zip(&weight_blocks).zip(&weight_scales)
            {
                // The same product in every lane as `weight scale × row scale` in f32.
                let scale = *weight_scale * row_scale;
                let sum = f32x8::from_i32x8(weight.dot(activations));
                *acc_out = sum.mul_add(scale, *acc_out);
            }
        }
    }
    reduce_tile(acc)
}

#[cfg(test)]
#[path = "matmul_tests.rs"]
mod tests;
