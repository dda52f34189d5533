//! The 8-bit side of the CPU matrix multiply: activation rows rounded to 8-bit codes per block
//! of 32 ([`QuantizedRows`], as llama.cpp and candle round them before a quantized dot
//! product), the 32-byte vector operations of the dot product itself ([`Bytes`]), and weight
//! blocks unpacked for it ([`WeightPair`], [`WeightRows`]).
//!
//! Blocks go in pairs, laid out as GGUF's Q4_1 nibbles are: the *low* vector of a pair holds
//! inputs 0..16 of its first block then inputs 0..16 of its second, the *high* vector inputs
//! 16..32 of each. One 32-byte load of two Q4_1 blocks' nibbles then unpacks with a shift and a
//! mask into exactly those two vectors, and one dot product ([`dot_q4_pair`]) covers 64 inputs:
//! lanes 0..4 hold the first block's sums, lanes 4..8 the second's, each lane `i % 4` the exact
//! integer sum over inputs `4(i % 4)..4(i % 4) + 4` and `16 + 4(i % 4)..16 + 4(i % 4) + 4`,
//! whatever computes it. On x86-64 with AVX2 (the workspace's baseline) that is `vpmaddubsw`,
//! `vpaddw` and `vpmaddwd` (through `safe_arch`); elsewhere a portable loop gives the same
//! lanes, so the float arithmetic around it sees the same values on every platform.

use wide::{f32x8, i32x8};

/// Values per quantization block (GGUF's Q8_0 and Q4_1 blocks, and the activation blocks).
pub const BLOCK: usize = 32;

/// The codes of a pair of blocks: the low vector (inputs 0..16 of each block) and the high one
/// (inputs 16..32 of each).
pub type CodePair = [[i8; BLOCK]; 2];

/// Activation rows `[rows][width]` as 8-bit codes per block of 32: value ≈ code × scale, with
/// `scale = max |x| / 127` of the block. As in ggml's (llama.cpp's, candle's) Q8_0 and Q8_1
/// quantization, the codes are `round(x / scale)` (ties away from zero) with the f32 scale, and
/// the scale is then kept as an f16 value. An odd last block is paired with a block of zeros.
#[derive(Debug)]
pub struct QuantizedRows {
    blocks: usize,
    pairs: usize,
    /// `[rows][pairs]`.
    codes: Vec<CodePair>,
    /// `[rows][pairs]`: the first block's scale in lanes 0..4, the second's in lanes 4..8.
    scales: Vec<[f32; 8]>,
    /// `[rows][blocks]`: each block's `scale × Σ codes`, the sum of the values it stands for.
    sums: Vec<f32>,
}

impl QuantizedRows {
    /// Rounds `input` (rows of `width` values, `width` a multiple of [`BLOCK`]) to codes.
    pub fn quantize(input: &[f32], width: usize) -> Self {
        debug_assert!(width.is_multiple_of(BLOCK) && input.len().is_multiple_of(width.max(1)));
        let blocks = width / BLOCK;
        let pairs = blocks.div_ceil(2);
        let rows = input.len().checked_div(width).unwrap_or(0);
        let mut codes = vec![[[0; BLOCK]; 2]; rows * pairs];
        let mut scales = vec![[0.0; 8]; rows * pairs];
        let mut sums = Vec::with_capacity(rows * blocks);
        // round(r) with ties away from zero, as trunc(r + copysign(0.5⁻, r)) (LLVM's own lowering
        // of `f32::round`, here on eight lanes).
        let (sign, below_half) = (f32x8::splat(-0.0), f32x8::splat(0.499_999_97));
        for (index, block) in input.as_chunks::<BLOCK>().0.iter().enumerate() {
            let (row, block_in_row) = (index / blocks, index % blocks);
            let (pair, half) = (row * pairs + block_in_row / 2, block_in_row % 2);
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
            let mut total = i32x8::ZERO;
            for (part, ratio) in parts.iter().map(|part| *part * inverse).enumerate() {
                // In -127..=127 for finite input (NaN gives 0).
                let rounded = (ratio + (below_half | (ratio & sign))).trunc_int();
                total += rounded;
                // Parts 0 and 1 are inputs 0..16 (the low vector), parts 2 and 3 the high one.
                let start = half * 16 + (part % 2) * 8;
                let target = &mut codes[pair][part / 2][start..start + 8];
                for (code, value) in target.iter_mut().zip(rounded.to_array()) {
                    *code = value as i8;
                }
            }
            let scale = half::f16::from_f32(scale).to_f32();
            scales[pair][half * 4..half * 4 + 4].fill(scale);
            sums.push(scale * total.to_array().into_iter().sum::<i32>() as f32);
        }
        Self {
            blocks,
            pairs,
            codes,
            scales,
            sums,
        }
    }

    /// Row `row`: its block pairs' codes and scales.
    #[inline(always)]
    pub fn row(&self, row: usize) -> (&[CodePair], &[[f32; 8]]) {
        let range = row * self.pairs..(row + 1) * self.pairs;
        (&self.codes[range.clone()], &self.scales[range])
    }

    /// The block sums of row `row` (see the `sums` field).
    #[inline(always)]
    pub fn sums(&self, row: usize) -> &[f32] {
        &self.sums[row * self.blocks..(row + 1) * self.blocks]
    }

    /// Block `block` of row `row`: its codes in input order and its scale (tests).
    #[cfg(test)]
    pub fn block(&self, row: usize, block: usize) -> ([i8; BLOCK], f32) {
        let (codes, scales) = self.row(row);
        let (pair, half) = (block / 2, block % 2);
        let codes = std::array::from_fn(|j| codes[pair][j / 16][half * 16 + j % 16]);
        (codes, scales[pair][half * 4])
    }

    /// The value input `index` of row `row` stands for, `code × scale` (tests).
    #[cfg(test)]
    pub fn value(&self, row: usize, index: usize) -> f32 {
        let (codes, scale) = self.block(row, index / BLOCK);
        f32::from(codes[index % BLOCK]) * scale
    }
}

#[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
mod lanes {
    use safe_arch::{
        abs_i8_m256i, add_i16_m256i, bitand_m256i, m256i, mul_i16_horizontal_add_m256i,
        mul_u8i8_add_horizontal_saturating_m256i, set_splat_i8_m256i, set_splat_i16_m256i,
        shr_imm_u16_m256i, sign_apply_i8_m256i,
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

    /// Two GGUF Q4_1 blocks' 32 nibble bytes as the low vector (low nibbles: codes 0..16 of
    /// each block) and the high one (high nibbles: codes 16..32).
    #[inline(always)]
    pub fn unpack_nibble_pair(bytes: &[u8; BLOCK]) -> [Bytes; 2] {
        let all = m256i::from(*bytes);
        let mask = set_splat_i8_m256i(0x0F);
        [
            bitand_m256i(all, mask),
            bitand_m256i(shr_imm_u16_m256i::<4>(all), mask),
        ]
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

    /// [`dot_u8_i8`] of the low vectors plus that of the high vectors, for unsigned codes of at
    /// most 15: the pair sums (≤ 2 × 15 × 127 each) are added as `i16` before widening.
    #[inline(always)]
    pub fn dot_q4_pair(weights: [Bytes; 2], activations: [Bytes; 2]) -> i32x8 {
        let low = mul_u8i8_add_horizontal_saturating_m256i(weights[0], activations[0]);
        let high = mul_u8i8_add_horizontal_saturating_m256i(weights[1], activations[1]);
        let quads = mul_i16_horizontal_add_m256i(add_i16_m256i(low, high), set_splat_i16_m256i(1));
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

    /// Two GGUF Q4_1 blocks' 32 nibble bytes as the low vector (low nibbles: codes 0..16 of
    /// each block) and the high one (high nibbles: codes 16..32).
    #[inline(always)]
    pub fn unpack_nibble_pair(bytes: &[u8; BLOCK]) -> [Bytes; 2] {
        [bytes.map(|byte| byte & 0x0F), bytes.map(|byte| byte >> 4)]
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

    /// [`dot_u8_i8`] of the low vectors plus that of the high vectors.
    #[inline(always)]
    pub fn dot_q4_pair(weights: [Bytes; 2], activations: [Bytes; 2]) -> i32x8 {
        dot_u8_i8(weights[0], activations[0]) + dot_u8_i8(weights[1], activations[1])
    }
}

pub use lanes::{Bytes, abs, apply_sign, dot_q4_pair, dot_u8_i8, load, unpack_nibble_pair};

/// A pair of weight blocks unpacked for the byte dot product.
pub(crate) trait WeightPair: Copy {
    /// How the pair is stored.
    type Stored;
    /// Unpacks a stored pair.
    fn unpack(stored: &Self::Stored) -> Self;
    /// Lanes 0..4 for the first block, 4..8 for the second: exact sums of weight code ×
    /// activation code (see [`dot_q4_pair`] for which inputs each lane covers).
    fn dot(self, activations: [Bytes; 2]) -> i32x8;
}

/// Two Q4_1 blocks' codes (0..=15), unsigned, as low and high vectors.
#[derive(Clone, Copy)]
pub(crate) struct Q4Pair([Bytes; 2]);

impl WeightPair for Q4Pair {
    /// Two GGUF blocks' nibble bytes side by side.
    type Stored = [u8; BLOCK];

    #[inline(always)]
    fn unpack(bytes: &[u8; BLOCK]) -> Self {
        Self(unpack_nibble_pair(bytes))
    }

    #[inline(always)]
    fn dot(self, activations: [Bytes; 2]) -> i32x8 {
        dot_q4_pair(self.0, activations)
    }
}

/// Two Q8_0 blocks' codes as low and high vectors: their magnitudes (unsigned) and the codes
/// themselves, whose signs move onto the activations.
#[derive(Clone, Copy)]
pub(crate) struct Q8Pair {
    magnitudes: [Bytes; 2],
    codes: [Bytes; 2],
}

impl WeightPair for Q8Pair {
    type Stored = CodePair;

    #[inline(always)]
    fn unpack(codes: &CodePair) -> Self {
        let codes = codes.each_ref().map(load);
        Self {
            magnitudes: codes.map(abs),
            codes,
        }
    }

    #[inline(always)]
    fn dot(self, activations: [Bytes; 2]) -> i32x8 {
        // Pair sums reach 2 × 128 × 127, so the halves are widened before they are added.
        let [low, high] = [0, 1].map(|half| {
            let signed = apply_sign(activations[half], self.codes[half]);
            dot_u8_i8(self.magnitudes[half], signed)
        });
        low + high
    }
}

/// `C` weight rows of one format: each row's stored block pairs and its block scales
/// (`2 × pairs` of them).
pub(crate) struct WeightRows<'a, P: WeightPair, const C: usize> {
    stored: [&'a [P::Stored]; C],
    scales: [&'a [f32]; C],
}

impl<'a, P: WeightPair, const C: usize> WeightRows<'a, P, C> {
    /// Rows `outputs` of a `[outputs][pairs]` matrix of stored pairs and its
    /// `[outputs][2 × pairs]` scales.
    #[inline(always)]
    pub fn of(
        stored: &'a [P::Stored],
        scales: &'a [f32],
        outputs: [usize; C],
        pairs: usize,
    ) -> Self {
        Self {
            stored: outputs.map(|output| &stored[output * pairs..(output + 1) * pairs]),
            scales: outputs.map(|output| &scales[output * 2 * pairs..(output + 1) * 2 * pairs]),
        }
    }

    /// Pair `pair` of row `c`, unpacked, and its scales (the first block's in lanes 0..4, the
    /// second's in lanes 4..8).
    #[inline(always)]
    pub fn pair(&self, c: usize, pair: usize) -> (P, f32x8) {
        let scales = self.scales[c];
        let (first, second) = (scales[2 * pair], scales[2 * pair + 1]);
        (
            P::unpack(&self.stored[c][pair]),
            f32x8::new([first, first, first, first, second, second, second, second]),
        )
    }
}

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
        assert_eq!(rows.block(0, 0), ([0; 32], 0.0));
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
    fn a_nibble_pair_unpacks_low_then_high_and_sums_per_block() {
        // Block 0: byte j = code j | code 16 + j; block 1 likewise with other codes.
        let code = |block: usize, j: usize| ((j * 7 + block * 3) % 16) as u8;
        let bytes: [u8; 32] =
            std::array::from_fn(|k| code(k / 16, k % 16) | (code(k / 16, 16 + k % 16) << 4));
        // Activation j of block b is b * 32 + j − 30, laid out as the pair's low and high vectors.
        let activation = |block: usize, j: usize| (block * 32 + j) as i8 - 30;
        let low: [i8; 32] = std::array::from_fn(|k| activation(k / 16, k % 16));
        let high: [i8; 32] = std::array::from_fn(|k| activation(k / 16, 16 + k % 16));
        let got = dot_q4_pair(unpack_nibble_pair(&bytes), [load(&low), load(&high)]);
        let expected: [i32; 8] = std::array::from_fn(|lane| {
            let (block, quad) = (lane / 4, lane % 4);
            (4 * quad..4 * quad + 4)
                .flat_map(|j| [j, 16 + j])
                .map(|j| i32::from(code(block, j)) * i32::from(activation(block, j)))
                .sum()
        });
        assert_eq!(got.to_array(), expected);
    }

    #[test]
    fn rows_pair_their_blocks_and_pad_an_odd_one() {
        let input: Vec<f32> = (0..2 * 96).map(|i| (i as f32 * 0.37).sin()).collect();
        let rows = QuantizedRows::quantize(&input, 96);
        for row in 0..2 {
            let (codes, scales) = rows.row(row);
            assert_eq!((codes.len(), scales.len()), (2, 2));
            for block in 0..3 {
                let (block_codes, scale) = rows.block(row, block);
                let (pair, half) = (block / 2, block % 2);
                assert_eq!(scales[pair][half * 4..half * 4 + 4], [scale; 4]);
                assert_eq!(codes[pair][0][half * 16..half * 16 + 16], block_codes[..16]);
                assert_eq!(codes[pair][1][half * 16..half * 16 + 16], block_codes[16..]);
            }
            // The odd third block's partner is zeros.
            assert_eq!(codes[1][0][16..], [0; 16]);
            assert_eq!(scales[1][4..], [0.0; 4]);
        }
    }
}
