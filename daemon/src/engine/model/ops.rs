//! Element-wise and row-wise operations of the Llama block on host memory: SwiGLU activation
//! and a vectorisable `exp` here; RMS norm, residual adds and the rotary tables are the CUDA
//! kernels' CPU references (`skillkv_kernels::reference`), re-exported so both backends share
//! one definition. Rows are contiguous `f32` slices of `width` values; every function is
//! deterministic and treats each row independently, so a row's result never depends on the
//! rest of the batch.

pub use skillkv_kernels::reference::elementwise::{add_in_place, rms_norm};
pub use skillkv_kernels::reference::rope::RopeTable;

/// SwiGLU: each input row is `[gate (width) | up (width)]`; the output row is
/// `silu(gate) * up`, with `silu(g) = g / (1 + e^-g)` computed eight lanes at a time.
pub fn silu_mul(gate_up: &[f32], width: usize) -> Vec<f32> {
    const LANES: usize = 8;
    let silu_times = |g: f32, e: f32, u: f32| g / (1.0 + e) * u;
    let rows = gate_up.len() / (2 * width);
    let mut output = vec![0.0; rows * width];
    for (row, out) in gate_up
        .chunks_exact(2 * width)
        .zip(output.chunks_exact_mut(width))
    {
        let (gate, up) = row.split_at(width);
        let (gate_chunks, gate_tail) = gate.as_chunks::<LANES>();
        let (up_chunks, up_tail) = up.as_chunks::<LANES>();
        let (out_chunks, out_tail) = out.as_chunks_mut::<LANES>();
        for ((o, g), u) in out_chunks.iter_mut().zip(gate_chunks).zip(up_chunks) {
            let e = exp_lanes(g.map(|x| -x));
            for lane in 0..LANES {
                o[lane] = silu_times(g[lane], e[lane], u[lane]);
            }
        }
        for ((o, g), u) in out_tail.iter_mut().zip(gate_tail).zip(up_tail) {
            let [e] = exp_lanes([-g]);
            *o = silu_times(*g, e, *u);
        }
    }
    output
}

/// `e^x` for each lane, accurate to a few ULP for x in [-87, 88], exactly 0 for -∞ and very
/// negative x. Written lane-wise so the compiler vectorises it (libm's `expf` does not).
#[inline(always)]
pub fn exp_lanes<const N: usize>(x: [f32; N]) -> [f32; N] {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND_MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer.
    let mut out = [0.0f32; N];
    for lane in 0..N {
        let value = x[lane].clamp(-87.0, 88.0);
        let n = (value * LOG2_E + ROUND_MAGIC) - ROUND_MAGIC;
        let r = value - n * LN2_HI - n * LN2_LO;
        // Taylor/minimax polynomial of e^r on [-ln2/2, ln2/2].
        let mut p = 1.987_569_1e-4_f32;
        p = p.mul_add(r, 1.398_199_9e-3);
        p = p.mul_add(r, 8.333_452e-3);
        p = p.mul_add(r, 4.166_579_6e-2);
        p = p.mul_add(r, 1.666_666_5e-1);
        p = p.mul_add(r, 0.5);
        p = p.mul_add(r * r, r) + 1.0;
        let scale = f32::from_bits((((n as i32) + 127) as u32) << 23);
        out[lane] = if x[lane] < -87.0 { 0.0 } else { p * scale };
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_lanes_matches_std_exp() {
        let inputs: Vec<f32> = (-8700..=0).map(|i| i as f32 * 0.01).collect();
        for chunk in inputs.chunks_exact(4) {
            let lanes: [f32; 4] = [chunk[0], chunk[1], chunk[2], chunk[3]];
            let got = exp_lanes(lanes);
            for (x, y) in lanes.iter().zip(got) {
                let expected = x.exp();
                assert!(
                    (y - expected).abs() <= expected * 2e-7 + 1e-38,
                    "exp({x}) = {y}, expected {expected}"
                );
            }
        }
        assert_eq!(exp_lanes([f32::NEG_INFINITY, -200.0]), [0.0, 0.0]);
    }

    #[test]
    fn rope_at_position_zero_is_identity_and_preserves_norm() {
        let table = RopeTable::new(4, 10_000.0, 8);
        let mut row = vec![1.0, 2.0, 3.0, 4.0];
        table.rotate(&mut row, 0);
        assert_eq!(row, vec![1.0, 2.0, 3.0, 4.0]);
        table.rotate(&mut row, 5);
        let norm_pair0 = row[0] * row[0] + row[1] * row[1];
        assert!((norm_pair0 - 5.0).abs() < 1e-5);
        assert!((row[0] - (5.0f32.cos() - 2.0 * 5.0f32.sin())).abs() < 1e-6);
    }
}
