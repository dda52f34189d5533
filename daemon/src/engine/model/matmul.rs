//! The CPU backend's matrix multiply: `input [rows, in] · weightᵀ` for weights held in GGUF
//! blocks of 32 inputs — Q8_0 (an f16 scale and 32 signed 8-bit codes) or Q4_1 (an f16 scale and
//! min and 32 4-bit codes) — with f32 activations.
//!
//! Two kernels compute the very same arithmetic:
//! - decode rows (up to 31 rows, memory-bound) read the quantized codes and dequantize them on
//!   the fly, in register tiles of 8 accumulators (up to 2 rows × 4 outputs for 1–3 rows,
//!   4 rows × 2 outputs from 4 rows on, so each dequantized block serves four rows and each
//!   input vector loaded serves two outputs);
//! - prefill chunks (32 rows or more, compute-bound) read a dense f32 copy of the same weights,
//!   made once at load time, in register tiles of 4 rows × 2 outputs.
//!
//! The dense copy holds exactly what the decode kernel computes (`code × scale` for Q8_0, exact
//! in f32; `fma(code, scale, min)` for Q4_1, one rounding), so both kernels see
//! bit-identical weights. Every output element is accumulated the same way in both: eight lanes
//! over the input dimension (lane `i % 8` takes input `i`, in increasing `i`, one fused
//! multiply-add each), then a fixed pairwise sum of the lanes. A row's result therefore never
//! depends on how many rows share the batch or which kernel ran it — the property behind
//! "reuse equals recompute" and "batching equals sequential".
//!
//! Work is split into tiles of (rows × outputs) on candle's CPU thread pool; each output element
//! is computed by exactly one tile, so thread count and scheduling do not change results.
//! The lanes are `wide::f32x8` vectors: AVX2 registers and `vfmadd` on the workspace's
//! x86-64-v3 baseline, and the same arithmetic in portable code elsewhere.

use std::sync::OnceLock;

use wide::{f32x8, i32x8};

/// Inputs per Q8_0 block.
pub const Q8_BLOCK: usize = 32;
/// Accumulator lanes per output element.
const LANES: usize = 8;
/// Lane vectors per quantization block.
const PARTS: usize = Q8_BLOCK / LANES;
/// Rows per register tile of the dense kernel.
const TILE_ROWS: usize = 4;
/// Outputs per register tile of the dense kernel.
const TILE_OUTPUTS: usize = 2;
/// Accumulators (rows × outputs) per register tile of the code kernel: with 4 or 2 outputs
/// per tile ([`QuantMatrix::code_tile`]), tiles hold at most 4 rows.
const CODE_TILE_ROWS: usize = 8;
/// From this many rows on, the dense f32 kernel runs; below it the 8-bit one.
const DENSE_FROM_ROWS: usize = 32;
/// Outputs per work item.
const ITEM_OUTPUTS: usize = 32;
/// Rows per work item of the dense kernel.
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

/// The quantized weights the decode kernel reads, block by block (32 inputs of one output).
#[derive(Debug)]
enum Codes {
    /// Q8_0: `[outputs][inputs]` signed codes and `[outputs][blocks]` scales (f16 values
    /// widened to f32); weight = code × scale.
    Q8 { codes: Vec<i8>, scales: Vec<f32> },
    /// Q4_1 as stored in GGUF: `[outputs][blocks][16]` bytes whose low nibbles are inputs 0..16
    /// of the block and high nibbles inputs 16..32, and `[outputs][blocks]` (scale, min) f16
    /// pairs; weight = fma(code, scale, min) in f32.
    Q4 {
        nibbles: Vec<i8>,
        scale_min: Vec<[half::f16; 2]>,
    },
}

/// A weight matrix `[outputs, inputs]` in Q8_0 or Q4_1 with a dense f32 copy of the same values.
#[derive(Debug)]
pub struct QuantMatrix {
    outputs: usize,
    inputs: usize,
    codes: Codes,
    /// `[outputs][inputs]`: exactly the values the decode kernel computes from `codes`.
    dense: Vec<f32>,
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

impl QuantMatrix {
    /// Builds the matrix from GGUF Q8_0 blocks (`f16` scale, little-endian, then 32 `i8`).
    pub fn from_q8_0_bytes(
        bytes: &[u8],
        outputs: usize,
        inputs: usize,
    ) -> Result<Self, BuildQuantMatrixError> {
        const BLOCK_BYTES: usize = 2 + Q8_BLOCK;
        check_size("Q8_0", BLOCK_BYTES, bytes, outputs, inputs)?;
        let mut codes = Vec::with_capacity(outputs * inputs);
        let mut scales = Vec::with_capacity(outputs * inputs / Q8_BLOCK);
        let mut dense = Vec::with_capacity(outputs * inputs);
        for block in bytes.chunks_exact(BLOCK_BYTES) {
            let scale = half::f16::from_le_bytes([block[0], block[1]]).to_f32();
            scales.push(scale);
            for &byte in &block[2..] {
                let code = byte as i8;
                codes.push(code);
                dense.push(f32::from(code) * scale);
            }
        }
        Ok(Self {
            outputs,
            inputs,
            codes: Codes::Q8 { codes, scales },
            dense,
        })
    }

    /// Builds the matrix from GGUF Q4_1 blocks (`f16` scale and min, little-endian, then 16
    /// bytes of 4-bit codes), kept as they are: 20 bytes per 32 weights for decode.
    pub fn from_q4_1_bytes(
        bytes: &[u8],
        outputs: usize,
        inputs: usize,
    ) -> Result<Self, BuildQuantMatrixError> {
        const BLOCK_BYTES: usize = 4 + Q8_BLOCK / 2;
        check_size("Q4_1", BLOCK_BYTES, bytes, outputs, inputs)?;
        let mut nibbles = Vec::with_capacity(outputs * inputs / 2);
        let mut scale_min = Vec::with_capacity(outputs * inputs / Q8_BLOCK);
        let mut dense = vec![0.0; outputs * inputs];
        for (block, weights) in bytes
            .chunks_exact(BLOCK_BYTES)
            .zip(dense.chunks_exact_mut(Q8_BLOCK))
        {
            let scale = half::f16::from_le_bytes([block[0], block[1]]);
            let min = half::f16::from_le_bytes([block[2], block[3]]);
            scale_min.push([scale, min]);
            let (scale, min) = (scale.to_f32(), min.to_f32());
            let (low, high) = weights.split_at_mut(Q8_BLOCK / 2);
            for ((&byte, low), high) in block[4..].iter().zip(low).zip(high) {
                nibbles.push(byte as i8);
                *low = f32::from(byte & 0x0F).mul_add(scale, min);
                *high = f32::from(byte >> 4).mul_add(scale, min);
            }
        }
        Ok(Self {
            outputs,
            inputs,
            codes: Codes::Q4 { nibbles, scale_min },
            dense,
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

    /// The dequantized weights, `[outputs][inputs]`.
    pub fn dense(&self) -> &[f32] {
        &self.dense
    }

    /// `input [rows, inputs] · selfᵀ` → `[rows, outputs]`.
    pub fn matmul(&self, input: &[f32], rows: usize) -> Vec<f32> {
        debug_assert_eq!(input.len(), rows * self.inputs);
        let mut output = vec![0.0; rows * self.outputs];
        if rows == 0 || self.outputs == 0 {
            return output;
        }
        let row_step = if rows >= DENSE_FROM_ROWS {
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
            (
                first_row,
                row_step.min(rows - first_row),
                first_output,
                ITEM_OUTPUTS.min(self.outputs - first_output),
            )
        };
        let run = |index: usize| {
            let (first_row, row_count, first_output, output_count) = span(index);
            let x = &input[first_row * self.inputs..(first_row + row_count) * self.inputs];
            let tile = if rows >= DENSE_FROM_ROWS {
                self.dense_tile(x, row_count, first_output, output_count)
            } else {
                self.code_tile(x, row_count, first_output, output_count)
            };
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
            let (first_row, _, first_output, output_count) = span(index);
            for (offset, values) in tile.chunks_exact(output_count).enumerate() {
                let row = first_row + offset;
                let start = row * self.outputs + first_output;
                output[start..start + output_count].copy_from_slice(values);
            }
        }
        output
    }

    /// `[row_count][output_count]` from the dense weights, in register tiles.
    fn dense_tile(
        &self,
        x: &[f32],
        row_count: usize,
        first_output: usize,
        output_count: usize,
    ) -> Vec<f32> {
        let k = self.inputs;
        let mut tile = vec![0.0; row_count * output_count];
        let weight = |o: usize| &self.dense[(first_output + o) * k..(first_output + o + 1) * k];
        let mut r = 0;
        while r < row_count {
            let rs = TILE_ROWS.min(row_count - r);
            let mut o = 0;
            while o < output_count {
                let os = TILE_OUTPUTS.min(output_count - o);
                let xr = |i: usize| &x[(r + i.min(rs - 1)) * k..(r + i.min(rs - 1) + 1) * k];
                // A short last tile repeats its last row and output; the extra sums are dropped.
                let w: [&[f32]; TILE_OUTPUTS] = std::array::from_fn(|j| weight(o + j.min(os - 1)));
                let x: [&[f32]; TILE_ROWS] = std::array::from_fn(xr);
                let sums = dense_kernel::<TILE_ROWS, TILE_OUTPUTS>(x, w);
                for (i, row_sums) in sums.iter().enumerate().take(rs) {
                    for (j, &sum) in row_sums.iter().enumerate().take(os) {
                        tile[(r + i) * output_count + o + j] = sum;
                    }
                }
                o += os;
            }
            r += rs;
        }
        tile
    }

    /// `[row_count][output_count]` from the quantized codes, in register tiles of `C` outputs ×
    /// up to `8 / C` rows: 1–3 rows take 4 outputs per tile, so a single decode row still runs
    /// four independent accumulator chains; from 4 rows on, 4 rows × 2 outputs, so each
    /// dequantized block serves four rows and each input vector loaded serves two outputs.
    fn code_tile(
        &self,
        x: &[f32],
        row_count: usize,
        first_output: usize,
        output_count: usize,
    ) -> Vec<f32> {
        let mut tile = vec![0.0; row_count * output_count];
        let span = TileSpan {
            x,
            row_count,
            first_output,
            output_count,
        };
        match row_count {
            1..=3 => self.code_outputs::<4>(span, &mut tile),
            _ => self.code_outputs::<2>(span, &mut tile),
        }
        tile
    }

    /// [`Self::code_tile`] with `C` outputs per register tile.
    fn code_outputs<const C: usize>(&self, span: TileSpan<'_>, tile: &mut [f32]) {
        let k = self.inputs;
        let blocks = k / Q8_BLOCK;
        let mut o = 0;
        while o < span.output_count {
            let os = C.min(span.output_count - o);
            // A short last group repeats its last output; the extra sums are dropped.
            let outputs: [usize; C] =
                std::array::from_fn(|c| span.first_output + o + c.min(os - 1));
            let group = OutputGroup {
                first: o,
                count: os,
            };
            match &self.codes {
                Codes::Q8 { codes, scales } => {
                    let halves =
                        outputs.map(|output| codes[output * k..(output + 1) * k].as_chunks().0);
                    let scales =
                        outputs.map(|output| &scales[output * blocks..(output + 1) * blocks]);
                    code_rows::<C, _>(span, group, tile, blocks, |c, block| {
                        q8_weights(&halves[c][2 * block..2 * block + 2], scales[c][block])
                    });
                }
                Codes::Q4 { nibbles, scale_min } => {
                    let bytes = outputs
                        .map(|output| nibbles[output * k / 2..(output + 1) * k / 2].as_chunks().0);
                    let scale_min =
                        outputs.map(|output| &scale_min[output * blocks..(output + 1) * blocks]);
                    code_rows::<C, _>(span, group, tile, blocks, |c, block| {
                        q4_weights(&bytes[c][block], scale_min[c][block])
                    });
                }
            }
            o += os;
        }
    }
}

/// Outputs `first..first + count` of a work item's tile.
#[derive(Clone, Copy)]
struct OutputGroup {
    first: usize,
    count: usize,
}

/// Runs the code kernel over all rows of `span` for one group of `C` outputs whose block
/// weights `weights(c, block)` gives, writing the group's columns of `tile`.
#[inline(always)]
fn code_rows<const C: usize, W: Fn(usize, usize) -> [f32x8; PARTS]>(
    span: TileSpan<'_>,
    group: OutputGroup,
    tile: &mut [f32],
    blocks: usize,
    weights: W,
) {
    let TileSpan {
        x,
        row_count,
        output_count,
        ..
    } = span;
    let k = blocks * Q8_BLOCK;
    let mut r = 0;
    while r < row_count {
        const {
            assert!(
                CODE_TILE_ROWS / C <= 4,
                "the match below has arms for 1..=4 rows"
            )
        };
        let rs = (CODE_TILE_ROWS / C).min(row_count - r);
        let mut put = |sums: &[[f32; C]]| {
            for (i, row_sums) in sums.iter().enumerate() {
                let start = (r + i) * output_count + group.first;
                tile[start..start + group.count].copy_from_slice(&row_sums[..group.count]);
            }
        };
        match rs {
            4 => put(&code_kernel::<4, C, W>(row_refs(x, k, r), blocks, &weights)),
            3 => put(&code_kernel::<3, C, W>(row_refs(x, k, r), blocks, &weights)),
            2 => put(&code_kernel::<2, C, W>(row_refs(x, k, r), blocks, &weights)),
            _ => put(&code_kernel::<1, C, W>(row_refs(x, k, r), blocks, &weights)),
        }
        r += rs;
    }
}

/// The rows and outputs one work item computes.
#[derive(Clone, Copy)]
struct TileSpan<'a> {
    /// The item's input rows.
    x: &'a [f32],
    row_count: usize,
    first_output: usize,
    output_count: usize,
}

/// `R` consecutive `k`-wide rows of `x`, from row `first`.
#[inline(always)]
fn row_refs<const R: usize>(x: &[f32], k: usize, first: usize) -> [&[f32]; R] {
    std::array::from_fn(|i| &x[(first + i) * k..(first + i + 1) * k])
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

#[inline(always)]
fn load(chunk: &[f32; LANES]) -> f32x8 {
    f32x8::new(*chunk)
}

/// Dot products of `R` input rows with `C` weight rows over the dense weights.
#[inline(always)]
fn dense_kernel<const R: usize, const C: usize>(x: [&[f32]; R], w: [&[f32]; C]) -> [[f32; C]; R] {
    let x = x.map(|row| row.as_chunks::<LANES>().0);
    let w = w.map(|row| row.as_chunks::<LANES>().0);
    let steps = w[0].len();
    assert!(x.iter().all(|row| row.len() == steps) && w.iter().all(|row| row.len() == steps));
    let mut acc = [[f32x8::ZERO; C]; R];
    for step in 0..steps {
        let wv: [f32x8; C] = std::array::from_fn(|c| load(&w[c][step]));
        for (acc_row, x_row) in acc.iter_mut().zip(&x) {
            let xv = load(&x_row[step]);
            for (acc_out, wv) in acc_row.iter_mut().zip(&wv) {
                *acc_out = xv.mul_add(*wv, *acc_out);
            }
        }
    }
    reduce_tile(acc)
}

/// Dot products of `R` input rows with `C` weight rows whose block weights `weights(c, block)`
/// gives.
#[inline(always)]
fn code_kernel<const R: usize, const C: usize, W: Fn(usize, usize) -> [f32x8; PARTS]>(
    x: [&[f32]; R],
    blocks: usize,
    weights: &W,
) -> [[f32; C]; R] {
    let x = x.map(|row| row.as_chunks::<LANES>().0);
    assert!(x.iter().all(|row| row.len() == blocks * PARTS));
    let mut acc = [[f32x8::ZERO; C]; R];
    for block in 0..blocks {
        let block_weights: [[f32x8; PARTS]; C] = std::array::from_fn(|c| weights(c, block));
        for part in 0..PARTS {
            let step = block * PARTS + part;
            for (acc_row, x_row) in acc.iter_mut().zip(&x) {
                let xv = load(&x_row[step]);
                for (acc_out, weights) in acc_row.iter_mut().zip(&block_weights) {
                    *acc_out = xv.mul_add(weights[part], *acc_out);
                }
            }
        }
    }
    reduce_tile(acc)
}

/// The 32 weights of one Q4_1 block as four f32 vectors, each `fma(code, scale, min)`.
/// Bytes `0..8` hold inputs 0..8 (low nibbles, part 0) and 16..24 (high nibbles, part 2); bytes
/// `8..16` hold parts 1 and 3: each half is zero-extended to eight lanes once and split.
#[inline(always)]
fn q4_weights(bytes: &[i8; Q8_BLOCK / 2], [scale, min]: [half::f16; 2]) -> [f32x8; PARTS] {
    let (scale, min) = (f32x8::splat(scale.to_f32()), f32x8::splat(min.to_f32()));
    let mask = i32x8::splat(0x0F);
    let mut weights = [f32x8::ZERO; PARTS];
    for (half, lanes) in q4_byte_lanes(bytes).into_iter().enumerate() {
        weights[half] = f32x8::from_i32x8(lanes & mask).mul_add(scale, min);
        weights[2 + half] = f32x8::from_i32x8(lanes >> 4).mul_add(scale, min);
    }
    weights
}

/// Bytes `0..8` and `8..16` of a Q4_1 block, each zero-extended to eight 32-bit lanes (two
/// `vpmovzxbd`).
#[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
#[inline(always)]
fn q4_byte_lanes(bytes: &[i8; Q8_BLOCK / 2]) -> [i32x8; 2] {
    // safe_arch's name for `_mm256_cvtepu8_epi32` says i16, but it widens to 32 bits.
    use safe_arch::{
        byte_shr_imm_u128_m128i, convert_to_i16_m256i_from_lower8_u8_m128i as widen_8_bytes, m128i,
    };
    let all = m128i::from(*bytes);
    [all, byte_shr_imm_u128_m128i::<8>(all)].map(|half| i32x8::new(widen_8_bytes(half).into()))
}

/// Bytes `0..8` and `8..16` of a Q4_1 block, each zero-extended to eight 32-bit lanes.
#[cfg(not(all(target_arch = "x86_64", target_feature = "avx2")))]
#[inline(always)]
fn q4_byte_lanes(bytes: &[i8; Q8_BLOCK / 2]) -> [i32x8; 2] {
    std::array::from_fn(|half| {
        i32x8::new(std::array::from_fn(|j| {
            i32::from(bytes[half * LANES + j] as u8)
        }))
    })
}

/// The 32 weights of one Q8_0 block (two halves of 16 codes) as four f32 vectors.
#[inline(always)]
fn q8_weights(halves: &[[i8; Q8_BLOCK / 2]], scale: f32) -> [f32x8; PARTS] {
    let scale = f32x8::splat(scale);
    let mut weights = [f32x8::ZERO; PARTS];
    for (half, codes) in halves.iter().enumerate() {
        for (part, lanes) in q8_code_lanes(codes).into_iter().enumerate() {
            weights[2 * half + part] = f32x8::from_i32x8(lanes) * scale;
        }
    }
    weights
}

/// Codes `0..8` and `8..16` of sixteen, each sign-extended to eight 32-bit lanes (two
/// `vpmovsxbd`).
#[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
#[inline(always)]
fn q8_code_lanes(codes: &[i8; Q8_BLOCK / 2]) -> [i32x8; 2] {
    use safe_arch::{
        byte_shr_imm_u128_m128i, convert_to_i32_m256i_from_lower8_i8_m128i as widen_8_codes, m128i,
    };
    let all = m128i::from(*codes);
    [all, byte_shr_imm_u128_m128i::<8>(all)].map(|half| i32x8::new(widen_8_codes(half).into()))
}

/// Codes `0..8` and `8..16` of sixteen, each sign-extended to eight 32-bit lanes.
#[cfg(not(all(target_arch = "x86_64", target_feature = "avx2")))]
#[inline(always)]
fn q8_code_lanes(codes: &[i8; Q8_BLOCK / 2]) -> [i32x8; 2] {
    std::array::from_fn(|half| {
        i32x8::new(std::array::from_fn(|j| i32::from(codes[half * LANES + j])))
    })
}

#[cfg(test)]
#[path = "matmul_tests.rs"]
mod tests;
