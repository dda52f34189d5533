//! Row-wise and element-wise references: embedding gather, RMSNorm, SwiGLU, residual add, column
//! gather and greedy argmax (kernels in `cuda/elementwise.cu`). The daemon's CPU backend uses `rms_norm`
//! and `add_in_place` from here; its SwiGLU uses a vectorised `exp` and agrees with `silu_mul`
//! within rounding, not bit for bit.

/// Rows `table[token]` of `hidden` floats for each token, concatenated.
///
/// # Panics
/// When a token is outside the table.
pub fn embedding_gather(table: &[f32], hidden: usize, tokens: &[u32]) -> Vec<f32> {
    let mut out = Vec::with_capacity(tokens.len() * hidden);
    for &token in tokens {
        let start = token as usize * hidden;
        out.extend_from_slice(&table[start..start + hidden]);
    }
    out
}

/// Each row of `input` times `1 / sqrt(mean(row²) + eps)` times `weight` (one row is
/// `weight.len()` wide).
pub fn rms_norm(input: &[f32], weight: &[f32], eps: f32) -> Vec<f32> {
    let width = weight.len();
    let mut output = vec![0.0; input.len()];
    for (row, out) in input
        .chunks_exact(width)
        .zip(output.chunks_exact_mut(width))
    {
        let sum_squares: f32 = row.iter().map(|x| x * x).sum();
        let scale = 1.0 / (sum_squares / width as f32 + eps).sqrt();
        for ((o, x), w) in out.iter_mut().zip(row).zip(weight) {
            *o = x * scale * w;
        }
    }
    output
}

/// SwiGLU: input rows are `[gate (width) | up (width)]`, output rows `silu(gate) * up`.
pub fn silu_mul(gate_up: &[f32], width: usize) -> Vec<f32> {
    let mut output = Vec::with_capacity(gate_up.len() / 2);
    for row in gate_up.chunks_exact(2 * width) {
        let (gate, up) = row.split_at(width);
        output.extend(gate.iter().zip(up).map(|(g, u)| g / (1.0 + (-g).exp()) * u));
    }
    output
}

/// `residual += delta`, element-wise.
pub fn add_in_place(residual: &mut [f32], delta: &[f32]) {
    for (r, d) in residual.iter_mut().zip(delta) {
        *r += d;
    }
}

/// Columns `col_offset .. col_offset + width` of each of `rows` rows of `src` (rows
/// `src_stride` floats apart), as contiguous `[rows][width]` rows.
///
/// # Panics
/// When a row reaches past `src`.
pub fn gather_columns(
    src: &[f32],
    rows: usize,
    src_stride: usize,
    col_offset: usize,
    width: usize,
) -> Vec<f32> {
    (0..rows)
        .flat_map(|row| {
            let start = row * src_stride + col_offset;
            src[start..start + width].iter().copied()
        })
        .collect()
}

/// For each row of `vocab` logits, the index of the largest non-NaN value, the lowest index on
/// ties, 0 when every value is NaN. (The daemon's sampler agrees except for a NaN at index 0,
/// which it keeps.)
pub fn argmax(logits: &[f32], vocab: usize) -> Vec<u32> {
    logits
        .chunks_exact(vocab)
        .map(|row| {
            let mut best: Option<(usize, f32)> = None;
            for (index, &value) in row.iter().enumerate() {
                if value.is_nan() {
                    continue;
                }
                if best.is_none_or(|(_, b)| value > b) {
                    best = Some((index, value));
                }
            }
            best.map_or(0, |(index, _)| index as u32)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedding_gather_copies_the_tokens_rows_in_order() {
        let table: Vec<f32> = (0..12).map(|i| i as f32).collect();
        assert_eq!(
            embedding_gather(&table, 3, &[2, 0, 2]),
            vec![6.0, 7.0, 8.0, 0.0, 1.0, 2.0, 6.0, 7.0, 8.0]
        );
    }

    #[test]
    fn rms_norm_gives_unit_rms_times_weight() {
        let out = rms_norm(&[3.0, 4.0, 0.0, 0.0], &[1.0, 2.0], 1e-6);
        let scale = 1.0 / (12.5f32 + 1e-6).sqrt();
        assert_eq!(out[0], 3.0 * scale);
        assert_eq!(out[1], 4.0 * scale * 2.0);
        assert_eq!(&out[2..], &[0.0, 0.0]);
    }

    #[test]
    fn silu_mul_gates_up_by_silu_of_gate() {
        let out = silu_mul(&[0.0, 2.0, 5.0, 7.0, -1.0, 1.0, 1.0, 1.0], 2);
        assert_eq!(out[0], 0.0);
        assert!((out[1] - 2.0 / (1.0 + (-2.0f32).exp()) * 7.0).abs() < 1e-6);
        assert!((out[2] - -1.0 / (1.0 + 1.0f32.exp())).abs() < 1e-6);
        assert!((out[3] - 1.0 / (1.0 + (-1.0f32).exp())).abs() < 1e-6);
    }

    #[test]
    fn add_in_place_adds_elementwise() {
        let mut residual = vec![1.0, 2.0, 3.0];
        add_in_place(&mut residual, &[0.5, -2.0, 0.0]);
        assert_eq!(residual, vec![1.5, 0.0, 3.0]);
    }

    #[test]
    fn gather_columns_takes_one_column_range_of_each_row() {
        // Rows of 5: [q0 q1 | k0 | v0 v1], take the Q part and the V part.
        let src = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0];
        assert_eq!(gather_columns(&src, 2, 5, 0, 2), [1.0, 2.0, 6.0, 7.0]);
        assert_eq!(gather_columns(&src, 2, 5, 3, 2), [4.0, 5.0, 9.0, 10.0]);
    }

    #[test]
    fn argmax_takes_the_first_maximum_and_skips_nan() {
        let logits = [
            1.0,
            3.0,
            3.0,
            -1.0, // tie: first
            f32::NAN,
            -5.0,
            f32::NAN,
            -4.0, // NaN never wins
            f32::NAN,
            f32::NAN,
            f32::NAN,
            f32::NAN, // all NaN: 0
            f32::NEG_INFINITY,
            f32::NEG_INFINITY,
            f32::NEG_INFINITY,
            f32::NEG_INFINITY,
        ];
        assert_eq!(argmax(&logits, 4), vec![1, 3, 0, 0]);
    }
}
