//! The 8-bit side of the CPU matrix multiply: activation rows rounded to 8-bit codes per block
//! of 32 ([`QuantizedRows`], as llama.cpp and candle round them before a quantized dot
//! product), and the 32-byte vector operations of the dot product itself ([`Bytes`]).
//!
//! A block's dot product is exact integer arithmetic: lane `i` of [`dot_u8_i8`] is the sum of
//! the products of bytes `4i..4i + 4`, whatever computes it. On x86-64 with AVX2 (the
//! workspace's baseline) that is `vpmaddubsw` then `vpmaddwd` (through `safe_arch`); elsewhere a
//! portable loop gives the same lanes, so the float arithmetic around it sees the same values
//! on every platform.

use wide::{f32x8, i32x8};

/// Values per quantization block (GGUF's Q8_0 and Q4_1 blocks, and the activation blocks).
pub const BLOCK: usize = 32;

/// Activation rows `[rows][width]` as 8-bit codes per block of 32: value ≈ code × scale, with
/// `scale = max |x| / 127` of the block. As in ggml's (llama.cpp's, candle's) Q8_0 and Q8_1
/// quantization, the codes are `round(x / scale)` (ties away from zero) with the f32 scale, and
/// the scale is then kept as an f16 value.
#[derive(Debug)]
pub struct QuantizedRows {
    blocks: usize,
    codes: Vec<[i8; BLOCK]>,
    /// `[rows][blocks]`: each block's scale.
    scales: Vec<f32>,
    /// `[rows][blocks]`: each block's `scale × Σ codes`, the sum of the values it stands for.
    sums: Vec<f32>,
}

impl QuantizedRows {
    /// Rounds `input` (rows of `width` values, `width` a multiple of [`BLOCK`]) to codes.
    pub fn quantize(input: &[f32], width: usize) -> Self {
        debug_assert!(width.is_multiple_of(BLOCK) && input.len().is_multiple_of(width.max(1)));
        let count = input.len() / BLOCK;
        let mut codes = Vec::with_capacity(count);
        let mut scales = Vec::with_capacity(count);
        let mut sums = Vec::with_capacity(count);
        // round(r) with ties away from zero, as trunc(r + copysign(0.5⁻, r)) (LLVM's own lowering
        // of `f32::round`, here on eight lanes).
        let (sign, below_half) = (f32x8::splat(-0.0), f32x8::splat(0.499_999_97));
        for block in input.as_chunks::<BLOCK>().0 {
            let parts: [f32x8; BLOCK / 8] = std::array::from_fn(|part| {
                f32x8::new(std::array::from_fn(|lane| block[part * 8 + lane]))
            });
            let max = parts
                .iter()
                .fold(f32x8::ZERO, |max, part| max.max(part.abs()))
                .to_array()
                .into_iter()
                .fold(0.0f32, f32::max);
            let scale = max / 127.0;
            let inverse = f32x8::splat(if scale != 0.0 { 1.0 / scale } else { 0.0 });
            let mut block_codes = [0i8; BLOCK];
            let mut total = i32x8::ZERO;
            for (part, chunk) in parts.iter().zip(block_codes.chunks_exact_mut(8)) {
                let ratio = *part * inverse;
                // In -127..=127 for finite input (NaN gives 0).
                let rounded = (ratio + (below_half | (ratio & sign))).trunc_int();
                total += rounded;
                for (code, value) in chunk.iter_mut().zip(rounded.to_array()) {
                    *code = value as i8;
                }
            }
            let scale = half::f16::from_f32(scale).to_f32();
            codes.push(block_codes);
            scales.push(scale);
            sums.push(scale * total.to_array().into_iter().sum::<i32>() as f32);
        }
        Self {
            blocks: width / BLOCK,
            codes,
            scales,
            sums,
        }
    }

    /// Block `block` of row `row`: its codes and scale.
    #[inline(always)]
    pub fn block(&self, row: usize, block: usize) -> (&[i8; BLOCK], f32) {
        let index = row * self.blocks + block;
        (&self.codes[index], self.scales[index])
    }

    /// Row `row`: its blocks' codes and scales.
    #[inline(always)]
    pub fn row(&self, row: usize) -> (&[[i8; BLOCK]], &[f32]) {
        let range = row * self.blocks..(row + 1) * self.blocks;
        (&self.codes[range.clone()], &self.scales[range])
    }

    /// The block sums of row `row` (see the `sums` field).
    #[inline(always)]
    pub fn sums(&self, row: usize) -> &[f32] {
        &self.sums[row * self.blocks..(row + 1) * self.blocks]
    }

    /// The value block `block` of row `row` stands for, `code × scale` (tests).
    #[cfg(test)]
    pub fn value(&self, row: usize, index: usize) -> f32 {
        let (codes, scale) = self.block(row, index / BLOCK);
        f32::from(codes[index % BLOCK]) * scale
    }
}

#[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
mod lanes {
    use safe_arch::{
        abs_i8_m256i, bitand_m256i, m128i, m256i, mul_i16_horizontal_add_m256i,
        mul_u8i8_add_horizontal_saturating_m256i, set_m128i_m256i, set_splat_i8_m256i,
        set_splat_i16_m256i, shr_imm_u16_m128i, sign_apply_i8_m256i,
    };
    use wide::i32x8;

    use super::BLOCK;

    /// 32 bytes in one AVX2 register.
    pub type Bytes = m256i;

    /// Loads 32 signed codes.
    #[inline(always)]
    pub fn load(codes: &[i8; BLOCK]) -> Bytes {
        m256i::from(*codes)
    }

    /// The 32 codes of a GGUF Q4_1 block's 16 bytes: low nibbles are codes 0..16, high
    /// nibbles codes 16..32.
    #[inline(always)]
    pub fn unpack_nibbles(bytes: &[u8; BLOCK / 2]) -> Bytes {
        let all = m128i::from(*bytes);
        let both = set_m128i_m256i(shr_imm_u16_m128i::<4>(all), all);
        bitand_m256i(both, set_splat_i8_m256i(0x0F))
    }

    /// `|x|` per byte, as unsigned bytes (−128 becomes 128).
    #[inline(always)]
    pub fn abs(x: Bytes) -> Bytes {
        abs_i8_m256i(x)
    }

    /// `x` with the sign of `sign` per byte (0 where `sign` is 0).
    #[inline(always)]
    pub fn apply_sign(x: Bytes, sign: Bytes) -> Bytes {
        sign_apply_i8_m256i(x, sign)
    }

    /// Lane `i`: `Σ unsigned[j] × signed[j]` over `j` in `4i..4i + 4`. Exact while each pair
    /// of products fits in an `i16` (|pair| ≤ 32,767), which codes of at most 128 × 127 keep.
    #[inline(always)]
    pub fn dot_u8_i8(unsigned: Bytes, signed: Bytes) -> i32x8 {
        let pairs = mul_u8i8_add_horizontal_saturating_m256i(unsigned, signed);
        let quads = mul_i16_horizontal_add_m256i(pairs, set_splat_i16_m256i(1));
        i32x8::new(<[i32; 8]>::from(quads))
    }
}

#[cfg(not(all(target_arch = "x86_64", target_feature = "avx2")))]
mod lanes {
    use wide::i32x8;

    use super::BLOCK;

    /// 32 bytes, interpreted as signed or unsigned by each operation.
    pub type Bytes = [u8; BLOCK];

    /// Loads 32 signed codes.
    #[inline(always)]
    pub fn load(codes: &[i8; BLOCK]) -> Bytes {
        codes.map(|code| code as u8)
    }

    /// The 32 codes of a GGUF Q4_1 block's 16 bytes: low nibbles are codes 0..16, high
    /// nibbles codes 16..32.
    #[inline(always)]
    pub fn unpack_nibbles(bytes: &[u8; BLOCK / 2]) -> Bytes {
        std::array::from_fn(|j| {
            if j < BLOCK / 2 {
                bytes[j] & 0x0F
            } else {
                bytes[j - BLOCK / 2] >> 4
            }
        })
    }

    /// `|x|` per byte, as unsigned bytes (−128 becomes 128).
    #[inline(always)]
    pub fn abs(x: Bytes) -> Bytes {
        x.map(|byte| (byte as i8).unsigned_abs())
    }

    /// `x` with the sign of `sign` per byte (0 where `sign` is 0).
    #[inline(always)]
    pub fn apply_sign(x: Bytes, sign: Bytes) -> Bytes {
        std::array::from_fn(|j| match (sign[j] as i8).signum() {
            -1 => (x[j] as i8).wrapping_neg() as u8,
            0 => 0,
            _ => x[j],
        })
    }

    /// Lane `i`: `Σ unsigned[j] × signed[j]` over `j` in `4i..4i + 4`.
    #[inline(always)]
    pub fn dot_u8_i8(unsigned: Bytes, signed: Bytes) -> i32x8 {
        i32x8::new(std::array::from_fn(|lane| {
            (4 * lane..4 * lane + 4)
                .map(|j| i32::from(unsigned[j]) * i32::from(signed[j] as i8))
                .sum()
        }))
    }
}

pub use lanes::{Bytes, abs, apply_sign, dot_u8_i8, load, unpack_nibbles};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_each_block_to_its_own_scale() {
        let mut input: Vec<f32> = (0..64).map(|i| (i as f32 - 20.0) * 0.25).collect();
        input[40] = -100.0;
        let rows = QuantizedRows::quantize(&input, 64);
        let (codes, scale) = rows.block(0, 0);
        assert_eq!(scale, half::f16::from_f32(5.0 / 127.0).to_f32());
        assert_eq!(codes[0], -127);
        assert_eq!(codes[20], 0);
        // 2.75 / (5 / 127) = 69.85.
        assert_eq!(codes[31], 70);
        // 0.5 / (5 / 127) = 12.7; −0.25 → −6.35.
        assert_eq!((codes[22], codes[19]), (13, -6));
        let (codes, scale) = rows.block(0, 1);
        assert_eq!(scale, half::f16::from_f32(100.0 / 127.0).to_f32());
        assert_eq!(codes[8], -127);
        for (index, &value) in input.iter().enumerate() {
            // Half a step, plus the f16 rounding of the scale at 127 steps.
            let block_scale = rows.block(0, index / BLOCK).1;
            let bound = block_scale * (0.5 + 127.0 / 2048.0);
            assert!((rows.value(0, index) - value).abs() <= bound, "{index}");
        }
        let sum: f32 = (0..32).map(|i| rows.value(0, 32 + i)).sum();
        assert!((rows.sums(0)[1] - sum).abs() <= 1e-4 * sum.abs().max(1.0));
    }

    #[test]
    fn ties_round_away_from_zero() {
        // max 127 → scale 1: 2.5 → 3, −0.5 → −1, 1.5 → 2.
        let mut input = [0.0f32; 32];
        input[..4].copy_from_slice(&[127.0, 2.5, -0.5, 1.5]);
        let rows = QuantizedRows::quantize(&input, 32);
        assert_eq!(rows.block(0, 0).0[..4], [127, 3, -1, 2]);
    }

    #[test]
    fn a_zero_block_has_zero_codes_and_scale() {
        let rows = QuantizedRows::quantize(&[0.0; 32], 32);
        assert_eq!(rows.block(0, 0), (&[0; 32], 0.0));
        assert_eq!(rows.sums(0), [0.0]);
    }

    #[test]
    fn byte_lanes_sum_four_products_exactly() {
        let signed: [i8; 32] = std::array::from_fn(|j| if j % 2 == 0 { 127 } else { -127 });
        let weights: [i8; 32] = std::array::from_fn(|j| if j < 16 { -128 } else { j as i8 });
        let expected: [i32; 8] = std::array::from_fn(|lane| {
            (4 * lane..4 * lane + 4)
                .map(|j| i32::from(weights[j]) * i32::from(signed[j]))
                .sum()
        });
        let (weights, signed) = (load(&weights), load(&signed));
        let got = dot_u8_i8(abs(weights), apply_sign(signed, weights));
        assert_eq!(got.to_array(), expected);
    }

    #[test]
    fn nibbles_unpack_low_then_high() {
        let bytes: [u8; 16] = std::array::from_fn(|j| j as u8 | ((15 - j as u8) << 4));
        let ones = load(&[1; 32]);
        // With every activation 1, lane i sums codes 4i..4i + 4.
        let got = dot_u8_i8(unpack_nibbles(&bytes), ones).to_array();
        let codes: Vec<i32> = (0..16).chain((0..16).map(|j| 15 - j)).collect();
        let expected: Vec<i32> = codes.chunks(4).map(|quad| quad.iter().sum()).collect();
        assert_eq!(got.to_vec(), expected);
    }
}
