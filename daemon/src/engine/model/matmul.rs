//! The CPU backend's matrix multiply: `input [rows, in] · weightᵀ` for weights held as Q8_0
//! (per 32 inputs one f16 scale and 32 signed 8-bit codes) with f32 activations.
//!
//! Two kernels compute the very same arithmetic:
//! - decode rows (up to 31 rows, memory-bound) read the 8-bit codes and dequantize them on the
//!   fly, in tiles of up to 8 rows;
//! - prefill chunks (32 rows or more, compute-bound) read a dense f32 copy of the same weights, made
//!   once at load time, in register tiles of 4 rows × 2 outputs.
//!
//! A code times its f16 scale is exact in f32 (8 + 11 significant bits), so both kernels see
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

use wide::{f32x8, i8x16, i16x8, i16x16, i32x8};

/// Inputs per Q8_0 block.
pub const Q8_BLOCK: usize = 32;
/// Accumulator lanes per output element.
const LANES: usize = 8;
/// Rows per register tile of the dense kernel.
const TILE_ROWS: usize = 4;
/// Outputs per register tile of the dense kernel.
const TILE_OUTPUTS: usize = 2;
/// Rows per register tile of the 8-bit kernel.
const CODE_TILE_ROWS: usize = 8;
/// From this many rows on, the dense f32 kernel runs; below it the 8-bit one.
const DENSE_FROM_ROWS: usize = 32;
/// Outputs per work item.
const ITEM_OUTPUTS: usize = 32;
/// Rows per work item of the dense kernel.
const ITEM_ROWS: usize = 64;

/// Why a weight cannot become a [`Q8Matrix`].
#[derive(Debug, thiserror::Error)]
pub enum BuildQ8MatrixError {
    /// The input width is not a multiple of the Q8_0 block.
    #[error("input width {width} is not a multiple of {Q8_BLOCK}")]
    Width {
        /// The input width.
        width: usize,
    },
    /// The Q8_0 bytes do not match the shape.
    #[error("{bytes} bytes of Q8_0 data for a [{outputs}, {inputs}] matrix")]
    Size {
        /// Bytes given.
        bytes: usize,
        /// Output features.
        outputs: usize,
        /// Input features.
        inputs: usize,
    },
}

/// A weight matrix `[outputs, inputs]` in Q8_0 with a dense copy of the same values.
#[derive(Debug)]
pub struct Q8Matrix {
    outputs: usize,
    inputs: usize,
    /// `[outputs][inputs]` codes.
    codes: Vec<i8>,
    /// `[outputs][inputs / 32]` scales (f16 values widened to f32).
    scales: Vec<f32>,
    /// `[outputs][inputs]` = code × scale, exactly.
    dense: Vec<f32>,
}

impl Q8Matrix {
    /// Builds the matrix from GGUF Q8_0 blocks (`f16` scale, little-endian, then 32 `i8`).
    pub fn from_q8_0_bytes(
        bytes: &[u8],
        outputs: usize,
        inputs: usize,
    ) -> Result<Self, BuildQ8MatrixError> {
        const BLOCK_BYTES: usize = 2 + Q8_BLOCK;
        if !inputs.is_multiple_of(Q8_BLOCK) {
            return Err(BuildQ8MatrixError::Width { width: inputs });
        }
        let blocks = outputs * inputs / Q8_BLOCK;
        if bytes.len() != blocks * BLOCK_BYTES {
            return Err(BuildQ8MatrixError::Size {
                bytes: bytes.len(),
                outputs,
                inputs,
            });
        }
        let mut codes = Vec::with_capacity(outputs * inputs);
        let mut scales = Vec::with_capacity(blocks);
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
            codes,
            scales,
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
                let w = [weight(o), weight(o + 1.min(os - 1))];
                let sums = dense_kernel::<TILE_ROWS, TILE_OUTPUTS>([xr(0), xr(1), xr(2), xr(3)], w);
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

    /// `[row_count][output_count]` from the 8-bit codes, one output at a time for all rows.
    fn code_tile(
        &self,
        x: &[f32],
        row_count: usize,
        first_output: usize,
        output_count: usize,
    ) -> Vec<f32> {
        let k = self.inputs;
        let blocks = k / Q8_BLOCK;
        let mut tile = vec![0.0; row_count * output_count];
        for o in 0..output_count {
            let output = first_output + o;
            let codes = &self.codes[output * k..(output + 1) * k];
            let scales = &self.scales[output * blocks..(output + 1) * blocks];
            let mut r = 0;
            while r < row_count {
                let rs = CODE_TILE_ROWS.min(row_count - r);
                let mut put = |sums: &[f32]| {
                    for (i, &sum) in sums.iter().enumerate() {
                        tile[(r + i) * output_count + o] = sum;
                    }
                };
                match rs {
                    8 => put(&code_kernel::<8>(row_refs(x, k, r), codes, scales)),
                    7 => put(&code_kernel::<7>(row_refs(x, k, r), codes, scales)),
                    6 => put(&code_kernel::<6>(row_refs(x, k, r), codes, scales)),
                    5 => put(&code_kernel::<5>(row_refs(x, k, r), codes, scales)),
                    4 => put(&code_kernel::<4>(row_refs(x, k, r), codes, scales)),
                    3 => put(&code_kernel::<3>(row_refs(x, k, r), codes, scales)),
                    2 => put(&code_kernel::<2>(row_refs(x, k, r), codes, scales)),
                    _ => put(&code_kernel::<1>(row_refs(x, k, r), codes, scales)),
                }
                r += rs;
            }
        }
        tile
    }
}

/// `R` consecutive `k`-wide rows of `x`, from row `first`.
#[inline(always)]
fn row_refs<const R: usize>(x: &[f32], k: usize, first: usize) -> [&[f32]; R] {
    std::array::from_fn(|i| &x[(first + i) * k..(first + i + 1) * k])
}

/// The fixed final reduction of the eight lanes.
#[inline(always)]
fn reduce(lanes: f32x8) -> f32 {
    let l = lanes.to_array();
    ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]))
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
    acc.map(|row| row.map(reduce))
}

/// Eight codes widened to f32 lanes.
#[inline(always)]
fn widen(codes: i16x8) -> f32x8 {
    f32x8::from_i32x8(i32x8::from_i16x8(codes))
}

/// Dot products of `R` input rows with one weight row given as Q8_0 codes and scales.
#[inline(always)]
fn code_kernel<const R: usize>(x: [&[f32]; R], codes: &[i8], scales: &[f32]) -> [f32; R] {
    const PARTS: usize = Q8_BLOCK / LANES;
    const HALF: usize = Q8_BLOCK / 2;
    let x = x.map(|row| row.as_chunks::<LANES>().0);
    let (halves, _) = codes.as_chunks::<HALF>();
    let steps = scales.len() * PARTS;
    assert!(halves.len() == 2 * scales.len() && x.iter().all(|row| row.len() == steps));
    let mut acc = [f32x8::ZERO; R];
    for (block, &scale) in scales.iter().enumerate() {
        let scale = f32x8::splat(scale);
        // Sign-extend 16 codes at a time (one vpmovsxbw), then to i32 and f32.
        let mut weights = [f32x8::ZERO; PARTS];
        for half in 0..2 {
            let wide16 = i16x16::from_i8x16(i8x16::new(halves[2 * block + half])).to_array();
            let (low, high) = wide16.split_at(LANES);
            for (part, codes) in [low, high].into_iter().enumerate() {
                let codes: [i16; LANES] = codes.try_into().unwrap_or([0; LANES]);
                weights[2 * half + part] = widen(i16x8::new(codes)) * scale;
            }
        }
        for (part, weights) in weights.iter().enumerate() {
            let step = block * PARTS + part;
            for (acc_row, x_row) in acc.iter_mut().zip(&x) {
                *acc_row = load(&x_row[step]).mul_add(*weights, *acc_row);
            }
        }
    }
    acc.map(reduce)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Q8_0 bytes of a deterministic pseudo-random `[outputs, inputs]` matrix.
    fn q8_bytes(outputs: usize, inputs: usize, seed: u32) -> Vec<u8> {
        let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state
        };
        let mut bytes = Vec::new();
        for _ in 0..outputs * inputs / Q8_BLOCK {
            let scale = half::f16::from_f32(0.001 + (next() % 1000) as f32 * 1e-5);
            bytes.extend_from_slice(&scale.to_le_bytes());
            bytes.extend((0..Q8_BLOCK).map(|_| (next() % 255) as u8));
        }
        bytes
    }

    fn inputs(rows: usize, width: usize) -> Vec<f32> {
        (0..rows * width)
            .map(|i| ((i * 7919 % 2003) as f32 - 1001.0) / 317.0)
            .collect()
    }

    #[test]
    fn matches_a_plain_f64_matmul() {
        let (outputs, width) = (70, 96);
        let matrix =
            Q8Matrix::from_q8_0_bytes(&q8_bytes(outputs, width, 3), outputs, width).unwrap();
        for rows in [1, 3, 9, 70] {
            let x = inputs(rows, width);
            let got = matrix.matmul(&x, rows);
            for r in 0..rows {
                for o in 0..outputs {
                    let expected: f64 = (0..width)
                        .map(|i| {
                            f64::from(x[r * width + i]) * f64::from(matrix.dense()[o * width + i])
                        })
                        .sum();
                    let value = got[r * outputs + o];
                    assert!(
                        (f64::from(value) - expected).abs() <= 1e-4 * (1.0 + expected.abs()),
                        "rows {rows}: [{r}, {o}] = {value}, expected {expected}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_row_gives_the_same_bits_alone_and_in_any_batch() {
        let (outputs, width) = (67, 160);
        let matrix =
            Q8Matrix::from_q8_0_bytes(&q8_bytes(outputs, width, 9), outputs, width).unwrap();
        let x = inputs(130, width);
        let batch = matrix.matmul(&x, 130);
        for row in [0, 5, 63, 64, 129] {
            let alone = matrix.matmul(&x[row * width..(row + 1) * width], 1);
            assert_eq!(
                alone,
                batch[row * outputs..(row + 1) * outputs],
                "row {row}"
            );
            let few = matrix.matmul(
                &x[row.saturating_sub(2) * width..(row + 1) * width],
                row.min(2) + 1,
            );
            assert_eq!(
                &few[row.min(2) * outputs..],
                &batch[row * outputs..(row + 1) * outputs]
            );
        }
    }

    #[test]
    fn rejects_bad_shapes() {
        assert!(matches!(
            Q8Matrix::from_q8_0_bytes(&[], 1, 30),
            Err(BuildQ8MatrixError::Width { width: 30 })
        ));
        assert!(matches!(
            Q8Matrix::from_q8_0_bytes(&[0; 33], 1, 32),
            Err(BuildQ8MatrixError::Size { bytes: 33, .. })
        ));
    }
}
