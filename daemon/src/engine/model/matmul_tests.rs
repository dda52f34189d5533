//! Tests of [`super`]: both block formats against a plain f64 matmul of the rounded activations
//! and near the unrounded one, the GGUF Q4_1 layout, and a row's bits being the same alone and in
//! every batch shape.

use super::*;
use crate::engine::model::int8::QuantizedRows;

/// A deterministic pseudo-random `[outputs, inputs]` matrix in Q8_0 and one in Q4_1.
fn matrices(outputs: usize, inputs: usize, seed: u32) -> [QuantMatrix; 2] {
    let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        state
    };
    let mut q8 = Vec::new();
    let mut q4 = Vec::new();
    for _ in 0..outputs * inputs / Q8_BLOCK {
        let scale = half::f16::from_f32(0.001 + (next() % 1000) as f32 * 1e-5);
        q8.extend_from_slice(&scale.to_le_bytes());
        q8.extend((0..Q8_BLOCK).map(|_| (next() % 255) as u8));
        let min = half::f16::from_f32(-0.01 - (next() % 1000) as f32 * 1e-4);
        q4.extend_from_slice(&scale.to_le_bytes());
        q4.extend_from_slice(&min.to_le_bytes());
        q4.extend((0..Q8_BLOCK / 2).map(|_| (next() % 256) as u8));
    }
    [
        QuantMatrix::from_q8_0_bytes(&q8, outputs, inputs).unwrap(),
        QuantMatrix::from_q4_1_bytes(&q4, outputs, inputs).unwrap(),
    ]
}

fn inputs(rows: usize, width: usize) -> Vec<f32> {
    (0..rows * width)
        .map(|i| ((i * 7919 % 2003) as f32 - 1001.0) / 317.0)
        .collect()
}

#[test]
fn matches_a_plain_f64_matmul_of_the_rounded_activations() {
    let (outputs, width) = (70, 96);
    for (matrix, rows) in matrices(outputs, width, 3)
        .iter()
        .flat_map(|matrix| [1, 2, 3, 5, 9, 70].map(|rows| (matrix, rows)))
    {
        let x = inputs(rows, width);
        let rounded = QuantizedRows::quantize(&x, width);
        let weights = matrix.dequantize();
        let got = matrix.matmul(&x, rows);
        for r in 0..rows {
            for o in 0..outputs {
                let expected: f64 = (0..width)
                    .map(|i| f64::from(rounded.value(r, i)) * f64::from(weights[o * width + i]))
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
fn rounding_the_activations_moves_a_product_by_at_most_a_step_per_input() {
    let (outputs, width) = (40, 128);
    let x = inputs(3, width);
    let rounded = QuantizedRows::quantize(&x, width);
    for matrix in &matrices(outputs, width, 5) {
        let weights = matrix.dequantize();
        let got = matrix.matmul(&x, 3);
        for r in 0..3 {
            for o in 0..outputs {
                let w = &weights[o * width..(o + 1) * width];
                let exact: f64 = (0..width)
                    .map(|i| f64::from(x[r * width + i]) * f64::from(w[i]))
                    .sum();
                // |x − rounded x| ≤ half a step, plus the f16 rounding of the scale (at most
                // 2⁻¹¹ relative) times up to 127 steps, for every input of a block.
                let bound: f64 = (0..width)
                    .map(|i| {
                        let scale = rounded.block(r, i / Q8_BLOCK).1;
                        f64::from(w[i].abs()) * f64::from(scale) * (0.5 + 127.0 / 2048.0)
                    })
                    .sum();
                let value = f64::from(got[r * outputs + o]);
                assert!(
                    (value - exact).abs() <= bound * 1.001 + 1e-4,
                    "[{r}, {o}] = {value}, unrounded {exact}, bound {bound}"
                );
            }
        }
    }
}

#[test]
fn a_row_gives_the_same_bits_alone_and_in_any_batch() {
    let (outputs, width) = (67, 160);
    let x = inputs(130, width);
    for (matrix, row) in matrices(outputs, width, 9)
        .iter()
        .flat_map(|matrix| [0, 5, 63, 64, 129].map(|row| (matrix, row)))
    {
        let batch = matrix.matmul(&x, 130);
        let alone = matrix.matmul(&x[row * width..(row + 1) * width], 1);
        assert_eq!(
            alone,
            batch[row * outputs..(row + 1) * outputs],
            "row {row}"
        );
        // Batches of 2..=32 rows ending with `row` take each register-tile shape (with short
        // row tiles up to 31 rows) and, at 32, work items that split the rows.
        for before in (1..=8).chain([10, 15, 22, 30, 31]) {
            let first = row.saturating_sub(before);
            let few = matrix.matmul(&x[first * width..(row + 1) * width], row - first + 1);
            assert_eq!(
                &few[(row - first) * outputs..],
                &batch[row * outputs..(row + 1) * outputs],
                "row {row} after {before}"
            );
        }
    }
}

#[test]
fn q4_1_weights_follow_ggml_layout() {
    // Block: scale 0.5, min -1, byte j = code j (low nibble) | code j + 16 (high nibble).
    let mut block = Vec::new();
    block.extend_from_slice(&half::f16::from_f32(0.5).to_le_bytes());
    block.extend_from_slice(&half::f16::from_f32(-1.0).to_le_bytes());
    block.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let matrix = QuantMatrix::from_q4_1_bytes(&block, 1, Q8_BLOCK).unwrap();
    let expected: Vec<f32> = (0..16)
        .chain((0..16).map(|j| 15 - j))
        .map(|code| code as f32 * 0.5 - 1.0)
        .collect();
    assert_eq!(matrix.dequantize(), expected);
    // A one-hot input (code 127 at its scale) picks weight 17.
    let mut x = vec![0.0; Q8_BLOCK];
    x[17] = 1.0;
    let one = QuantizedRows::quantize(&x, Q8_BLOCK).value(0, 17);
    assert!((one - 1.0).abs() < 1e-3, "{one}");
    let got = matrix.matmul(&x, 1)[0];
    assert!((got - (14.0 * 0.5 - 1.0) * one).abs() < 1e-5, "{got}");
}

#[test]
fn rejects_bad_shapes() {
    assert!(matches!(
        QuantMatrix::from_q8_0_bytes(&[], 1, 30),
        Err(BuildQuantMatrixError::Width { width: 30 })
    ));
    assert!(matches!(
        QuantMatrix::from_q8_0_bytes(&[0; 33], 1, 32),
        Err(BuildQuantMatrixError::Size { bytes: 33, .. })
    ));
    assert!(matches!(
        QuantMatrix::from_q4_1_bytes(&[0; 34], 1, 32),
        Err(BuildQuantMatrixError::Size {
            format: "Q4_1",
            bytes: 34,
            ..
        })
    ));
}
