//! The paged-attention kernels (decode and chunked prefill) against the CPU reference, on
//! random pools and block tables across block boundaries and head shapes. Without a device (or
//! without libnvrtc) the test prints "skipped: no GPU" and passes.
#![cfg(feature = "cuda")]

mod common;

use common::{Gpu, Rng, assert_close, grid, launch};
use cudarc::driver::PushKernelArg;
use skillkv_kernels::reference::attention::{AttentionShape, ChunkRows, paged_attention};
use skillkv_kernels::registry::{self, BLOCK_SIZE};

/// A pool of random K/V and block tables for `lens` sequences (distinct blocks each).
fn attention_case(
    rng: &mut Rng,
    shape: AttentionShape,
    lens: &[usize],
) -> (Vec<f32>, Vec<f32>, Vec<Vec<u32>>) {
    let blocks: usize = lens.iter().map(|l| l.div_ceil(BLOCK_SIZE)).sum();
    let mut ids: Vec<u32> = (0..blocks as u32 + 3).collect();
    for i in (1..ids.len()).rev() {
        ids.swap(i, rng.below(i as u32 + 1) as usize);
    }
    let mut next = ids.into_iter();
    let tables = lens
        .iter()
        .map(|l| next.by_ref().take(l.div_ceil(BLOCK_SIZE)).collect())
        .collect();
    let floats = (blocks + 3) * shape.kv().block_floats();
    (rng.f32s(floats, 2.0), rng.f32s(floats, 2.0), tables)
}

/// Tables padded to one `[n][max_blocks]` array.
fn padded(tables: &[Vec<u32>]) -> (Vec<u32>, i32) {
    let max_blocks = tables.iter().map(Vec::len).max().unwrap_or(0);
    let flat = tables
        .iter()
        .flat_map(|t| {
            t.iter()
                .copied()
                .chain(std::iter::repeat(0))
                .take(max_blocks)
        })
        .collect();
    (flat, max_blocks as i32)
}

#[test]
fn paged_attention_kernels_match_the_reference() {
    let Some(gpu) = Gpu::open() else { return };
    let mut rng = Rng(5);
    for shape in [
        AttentionShape {
            n_heads: 9,
            n_kv_heads: 3,
            head_dim: 64,
        },
        AttentionShape {
            n_heads: 8,
            n_kv_heads: 8,
            head_dim: 80,
        },
        AttentionShape {
            n_heads: 32,
            n_kv_heads: 8,
            head_dim: 128,
        },
    ] {
        let threads = registry::attention_threads(shape.head_dim).expect("supported head");
        let dims = [shape.n_heads, shape.n_kv_heads, shape.head_dim].map(|v| v as i32);
        let scale = shape.scale();

        // Decode: one row per sequence, lengths across block boundaries.
        let lens = [1usize, 16, 17, 200, 513];
        let (k_pool, v_pool, tables) = attention_case(&mut rng, shape, &lens);
        let queries = rng.f32s(lens.len() * shape.row_width(), 2.0);
        let (flat, max_blocks) = padded(&tables);
        let seq_lens: Vec<u32> = lens.iter().map(|&l| l as u32).collect();
        let (d_q, d_k, d_v) = (
            gpu.upload(&queries),
            gpu.upload(&k_pool),
            gpu.upload(&v_pool),
        );
        let (d_tables, d_lens) = (gpu.upload(&flat), gpu.upload(&seq_lens));
        let mut d_out = gpu.stream.alloc_zeros::<f32>(queries.len()).unwrap();
        let n_seqs = lens.len() as i32;
        let f = gpu.function("paged_attention_decode_f32");
        let mut args = gpu.stream.launch_builder(&f);
        args.arg(&d_q)
            .arg(&d_k)
            .arg(&d_v)
            .arg(&d_tables)
            .arg(&d_lens)
            .arg(&mut d_out);
        args.arg(&n_seqs)
            .arg(&max_blocks)
            .arg(&dims[0])
            .arg(&dims[1])
            .arg(&dims[2])
            .arg(&scale);
        launch(
            &mut args,
            grid((lens.len() as u32, shape.n_heads as u32, 1), threads),
        );
        let chunks: Vec<ChunkRows<'_>> = lens
            .iter()
            .zip(&tables)
            .enumerate()
            .map(|(i, (&len, table))| ChunkRows {
                first_row: i,
                len: 1,
                start_pos: len - 1,
                block_table: table,
            })
            .collect();
        let expected = paged_attention(shape, &queries, &chunks, &k_pool, &v_pool);
        assert_close("decode", &gpu.download(&d_out), &expected, 1e-4, 1e-5);

        // Prefill: chunks (first row, len, start) after cached prefixes, one starting at 0.
        let specs = [
            (0usize, 5usize, 0usize),
            (5, 40, 23),
            (45, 1, 300),
            (46, 17, 16),
        ];
        let total_lens: Vec<usize> = specs.iter().map(|&(_, len, start)| start + len).collect();
        let (k_pool, v_pool, tables) = attention_case(&mut rng, shape, &total_lens);
        let rows = 63usize;
        let queries = rng.f32s(rows * shape.row_width(), 2.0);
        let (flat, max_blocks) = padded(&tables);
        let column = |i: usize| {
            specs
                .iter()
                .map(|s| [s.0, s.1, s.2][i] as u32)
                .collect::<Vec<_>>()
        };
        let (d_first, d_len, d_start) = (
            gpu.upload(&column(0)),
            gpu.upload(&column(1)),
            gpu.upload(&column(2)),
        );
        let (d_q, d_k, d_v) = (
            gpu.upload(&queries),
            gpu.upload(&k_pool),
            gpu.upload(&v_pool),
        );
        let d_tables = gpu.upload(&flat);
        let mut d_out = gpu.stream.alloc_zeros::<f32>(queries.len()).unwrap();
        let n_chunks = specs.len() as i32;
        let f = gpu.function("paged_attention_prefill_f32");
        let mut args = gpu.stream.launch_builder(&f);
        args.arg(&d_q)
            .arg(&d_k)
            .arg(&d_v)
            .arg(&d_tables)
            .arg(&d_first)
            .arg(&d_len)
            .arg(&d_start);
        args.arg(&mut d_out).arg(&n_chunks).arg(&max_blocks);
        args.arg(&dims[0]).arg(&dims[1]).arg(&dims[2]).arg(&scale);
        launch(
            &mut args,
            grid((40, shape.n_heads as u32, specs.len() as u32), threads),
        );
        let chunks: Vec<ChunkRows<'_>> = specs
            .iter()
            .zip(&tables)
            .map(|(&(first_row, len, start_pos), table)| ChunkRows {
                first_row,
                len,
                start_pos,
                block_table: table,
            })
            .collect();
        let expected = paged_attention(shape, &queries, &chunks, &k_pool, &v_pool);
        assert_close("prefill", &gpu.download(&d_out), &expected, 1e-4, 1e-5);
    }
}
