//! GGUF block dequantization references (kernels in `cuda/dequant.cu`) and ggml's reference
//! quantizers for tests. Each block holds 32 values:
//!
//! | format | bytes | layout                              | value                |
//! |--------|-------|-------------------------------------|----------------------|
//! | Q4_0   | 18    | f16 `d`, 16 bytes of nibbles        | `(q - 8) * d`        |
//! | Q4_1   | 20    | f16 `d`, f16 `m`, 16 bytes          | `q * d + m`          |
//! | Q8_0   | 34    | f16 `d`, 32 signed bytes            | `q * d`              |
//!
//! Value `j < 16` is the low nibble of byte `j`, value `j >= 16` the high nibble of byte
//! `j - 16`. Arithmetic is f32 with each operation rounded (the kernels avoid FMA to match);
//! f16 outputs round the f32 value to nearest even.

use half::f16;

/// Values per block of every supported format.
pub const BLOCK_VALUES: usize = 32;

/// A GGUF block format the kernels dequantize.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlockFormat {
    /// 4-bit, symmetric, one f16 scale.
    Q4_0,
    /// 4-bit, one f16 scale and one f16 minimum.
    Q4_1,
    /// 8-bit, one f16 scale.
    Q8_0,
}

/// Why a byte buffer could not be dequantized.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{len} bytes are not a whole number of {format:?} blocks of {block_bytes} bytes")]
pub struct DequantizeError {
    /// The format asked for.
    pub format: BlockFormat,
    /// Length of the buffer.
    pub len: usize,
    /// Bytes per block of the format.
    pub block_bytes: usize,
}

impl BlockFormat {
    /// Every supported format.
    pub const ALL: [BlockFormat; 3] = [BlockFormat::Q4_0, BlockFormat::Q4_1, BlockFormat::Q8_0];

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            BlockFormat::Q4_0 => 18,
            BlockFormat::Q4_1 => 20,
            BlockFormat::Q8_0 => 34,
        }
    }

    /// The f32 and f16 kernels of the format.
    pub fn kernels(self) -> (&'static str, &'static str) {
        match self {
            BlockFormat::Q4_0 => ("dequant_q4_0_f32", "dequant_q4_0_f16"),
            BlockFormat::Q4_1 => ("dequant_q4_1_f32", "dequant_q4_1_f16"),
            BlockFormat::Q8_0 => ("dequant_q8_0_f32", "dequant_q8_0_f16"),
        }
    }
}

fn half_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

fn nibble(qs: &[u8], j: usize) -> u8 {
    if j < 16 {
        qs[j] & 0x0f
    } else {
        qs[j - 16] >> 4
    }
}

fn block_values(format: BlockFormat, block: &[u8]) -> [f32; BLOCK_VALUES] {
    let d = half_at(block, 0);
    std::array::from_fn(|j| match format {
        BlockFormat::Q4_0 => (nibble(&block[2..], j) as i32 - 8) as f32 * d,
        BlockFormat::Q4_1 => nibble(&block[4..], j) as f32 * d + half_at(block, 2),
        BlockFormat::Q8_0 => (block[2 + j] as i8) as f32 * d,
    })
}

/// `dequant_<format>_f32`: the values of every block of `bytes`.
pub fn dequantize_f32(format: BlockFormat, bytes: &[u8]) -> Result<Vec<f32>, DequantizeError> {
    let block_bytes = format.block_bytes();
    if !bytes.len().is_multiple_of(block_bytes) {
        return Err(DequantizeError {
            format,
            len: bytes.len(),
            block_bytes,
        });
    }
    Ok(bytes
        .chunks_exact(block_bytes)
        .flat_map(|block| block_values(format, block))
        .collect())
}

/// `dequant_<format>_f16`: the values of every block of `bytes`, rounded to f16.
pub fn dequantize_f16(format: BlockFormat, bytes: &[u8]) -> Result<Vec<f16>, DequantizeError> {
    Ok(dequantize_f32(format, bytes)?
        .into_iter()
        .map(f16::from_f32)
        .collect())
}

/// ggml's reference quantizer of `values` (a multiple of 32 long) into `format` blocks.
pub fn quantize(format: BlockFormat, values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() / BLOCK_VALUES * format.block_bytes());
    for block in values.chunks_exact(BLOCK_VALUES) {
        match format {
            BlockFormat::Q4_0 => {
                let max = block
                    .iter()
                    .copied()
                    .fold(0.0f32, |m, x| if x.abs() > m.abs() { x } else { m });
                let d = max / -8.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend(f16::from_f32(d).to_le_bytes());
                let q = |x: f32| ((x * id + 8.5) as u8).min(15);
                out.extend((0..16).map(|j| q(block[j]) | (q(block[j + 16]) << 4)));
            }
            BlockFormat::Q4_1 => {
                let min = block.iter().copied().fold(f32::INFINITY, f32::min);
                let max = block.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let d = (max - min) / 15.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend(f16::from_f32(d).to_le_bytes());
                out.extend(f16::from_f32(min).to_le_bytes());
                let q = |x: f32| (((x - min) * id + 0.5) as u8).min(15);
                out.extend((0..16).map(|j| q(block[j]) | (q(block[j + 16]) << 4)));
            }
            BlockFormat::Q8_0 => {
                let amax = block.iter().fold(0.0f32, |m, x| m.max(x.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend(f16::from_f32(d).to_le_bytes());
                out.extend(block.iter().map(|x| (x * id).round() as i8 as u8));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_q4_0_block_decodes_nibbles_around_eight() {
        let mut block = f16::from_f32(0.5).to_le_bytes().to_vec();
        // Byte j: low nibble j, high nibble 15 - j.
        block.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let values = dequantize_f32(BlockFormat::Q4_0, &block).unwrap();
        for j in 0..16 {
            assert_eq!(values[j], (j as f32 - 8.0) * 0.5);
            assert_eq!(values[16 + j], ((15 - j) as f32 - 8.0) * 0.5);
        }
    }

    #[test]
    fn known_q4_1_block_adds_the_minimum() {
        let mut block = f16::from_f32(0.25).to_le_bytes().to_vec();
        block.extend(f16::from_f32(-1.0).to_le_bytes());
        block.extend((0..16u8).map(|j| j | (3 << 4)));
        let values = dequantize_f32(BlockFormat::Q4_1, &block).unwrap();
        for j in 0..16 {
            assert_eq!(values[j], j as f32 * 0.25 - 1.0);
            assert_eq!(values[16 + j], 3.0 * 0.25 - 1.0);
        }
    }

    #[test]
    fn known_q8_0_block_is_signed() {
        let mut block = f16::from_f32(2.0).to_le_bytes().to_vec();
        block.extend((0..32).map(|j| (j as i8 - 16) as u8));
        block[2] = 0x80; // -128
        let values = dequantize_f32(BlockFormat::Q8_0, &block).unwrap();
        assert_eq!(values[0], -256.0);
        for (j, value) in values.iter().enumerate().skip(1) {
            assert_eq!(*value, (j as f32 - 16.0) * 2.0);
        }
    }

    #[test]
    fn quantize_then_dequantize_round_trips_within_a_step() {
        let values: Vec<f32> = (0..96)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 13.0)
            .collect();
        for format in BlockFormat::ALL {
            let bytes = quantize(format, &values);
            assert_eq!(bytes.len(), 3 * format.block_bytes());
            let back = dequantize_f32(format, &bytes).unwrap();
            for (block, (orig, got)) in values.chunks(32).zip(back.chunks(32)).enumerate() {
                let range = orig.iter().fold(0.0f32, |m, x| m.max(x.abs()));
                let step = match format {
                    BlockFormat::Q4_0 => range / 8.0,
                    BlockFormat::Q4_1 => 2.0 * range / 15.0,
                    BlockFormat::Q8_0 => range / 127.0,
                };
                // Half a step of rounding, except Q4_0's clipped end (-max lands on 7 * d).
                let bound = if format == BlockFormat::Q4_0 {
                    step
                } else {
                    step * 0.5
                };
                for (a, b) in orig.iter().zip(got) {
                    assert!(
                        (a - b).abs() <= bound + range * 2e-3,
                        "{format:?} block {block}: {a} vs {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn f16_output_is_the_rounded_f32_output() {
        let values: Vec<f32> = (0..64).map(|i| (i as f32 - 31.5) / 3.0).collect();
        for format in BlockFormat::ALL {
            let bytes = quantize(format, &values);
            let wide = dequantize_f32(format, &bytes).unwrap();
            let narrow = dequantize_f16(format, &bytes).unwrap();
            for (w, n) in wide.iter().zip(&narrow) {
                assert_eq!(*n, f16::from_f32(*w));
            }
        }
    }

    #[test]
    fn partial_blocks_are_rejected() {
        let error = dequantize_f32(BlockFormat::Q4_1, &[0; 30]).unwrap_err();
        assert_eq!(error.block_bytes, 20);
        assert_eq!(
            error.to_string(),
            "30 bytes are not a whole number of Q4_1 blocks of 20 bytes"
        );
    }
}
