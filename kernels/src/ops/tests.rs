//! The checks every operation makes before it runs, and the host implementation against the
//! references it wraps.

use super::host::HostOps;
use super::*;
use crate::reference::attention::paged_attention;
use crate::reference::elementwise;

fn table(first_row: usize, len: usize, start_pos: usize, blocks: &[u32]) -> ChunkRows<'_> {
    ChunkRows {
        first_row,
        len,
        start_pos,
        block_table: blocks,
    }
}

#[test]
fn packing_pads_tables_to_the_blocks_read_and_keeps_chunk_order() {
    let (a, b) = ([3u32, 1, 7, 9], [4u32]);
    // The first chunk ends at position 20: it reads 2 of its 4 blocks.
    let chunks = [table(0, 4, 16, &a), table(4, 1, 0, &b)];
    let packed = PackedChunks::pack(&chunks, 5, 10).unwrap();
    assert_eq!(packed.max_blocks, 2);
    assert_eq!(packed.tables, [3, 1, 4, 0]);
    assert_eq!(packed.first_row, [0, 4]);
    assert_eq!(packed.len, [4, 1]);
    assert_eq!(packed.start_pos, [16, 0]);
    assert_eq!(packed.chunk(0), table(0, 4, 16, &a[..2]));
    assert_eq!(packed.chunk(1).block_table, [4, 0]);
}

#[test]
fn packing_rejects_rows_outside_the_batch_short_tables_and_foreign_blocks() {
    let blocks = [0u32, 1];
    let outside = PackedChunks::pack(&[table(3, 4, 0, &blocks)], 6, 4).unwrap_err();
    assert!(matches!(
        outside,
        KernelOpError::OutOfRange {
            value: 7,
            limit: 6,
            ..
        }
    ));
    let short = PackedChunks::pack(&[table(0, 1, 32, &blocks)], 1, 4).unwrap_err();
    assert!(matches!(
        short,
        KernelOpError::OutOfRange {
            value: 3,
            limit: 2,
            ..
        }
    ));
    let foreign = PackedChunks::pack(&[table(0, 20, 0, &[0, 9])], 20, 4).unwrap_err();
    assert!(
        matches!(
            foreign,
            KernelOpError::OutOfRange {
                value: 9,
                limit: 4,
                ..
            }
        ),
        "{foreign}"
    );
}

#[test]
fn indices_are_checked_on_upload_and_bounds_against_what_they_index() {
    let ops = HostOps;
    assert!(matches!(
        ops.upload_indices(&[0, 5, 2], 5),
        Err(KernelOpError::OutOfRange {
            value: 5,
            limit: 5,
            ..
        })
    ));
    // Tokens checked below 4 do not fit a table of 3 rows.
    let tokens = ops.upload_indices(&[0, 2], 4).unwrap();
    let table = vec![0.0; 3 * 2];
    let mut out = vec![0.0; 2 * 2];
    let error = ops
        .embedding_gather(&table, &tokens, 2, &mut out)
        .unwrap_err();
    assert!(matches!(
        error,
        KernelOpError::OutOfRange {
            value: 4,
            limit: 3,
            ..
        }
    ));
    let tokens = ops.upload_indices(&[2, 0], 3).unwrap();
    ops.embedding_gather(
        &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0].to_vec(),
        &tokens,
        2,
        &mut out,
    )
    .unwrap();
    assert_eq!(out, [5.0, 6.0, 1.0, 2.0]);
}

#[test]
fn lengths_are_checked_against_the_shape_given() {
    let ops = HostOps;
    let weight = ops.upload_matrix(&[1.0; 6], 2, 3).unwrap();
    let mut out = vec![0.0; 4];
    let error = ops.matmul(&weight, &vec![1.0; 5], 2, &mut out).unwrap_err();
    assert!(matches!(
        error,
        KernelOpError::Length {
            what: "input",
            expected: 6,
            actual: 5,
            ..
        }
    ));
    ops.matmul(&weight, &vec![1.0, 2.0, 3.0, 0.5, 0.5, 0.5], 2, &mut out)
        .unwrap();
    assert_eq!(out, [6.0, 6.0, 1.5, 1.5]);
    assert!(ops.upload_matrix(&[1.0; 5], 2, 3).is_err());

    let mut short = vec![0.0; 3];
    assert!(ops.silu_mul(&vec![0.0; 8], 2, 2, &mut short).is_err());
    assert!(ops.add_in_place(&mut short, &vec![0.0; 2]).is_err());
    let columns = ColumnRange {
        rows: 2,
        stride: 4,
        col_offset: 3,
        width: 2,
    };
    let error = ops
        .gather_columns(&vec![0.0; 8], columns, &mut vec![0.0; 4])
        .unwrap_err();
    assert!(matches!(
        error,
        KernelOpError::OutOfRange {
            value: 5,
            limit: 4,
            ..
        }
    ));
}

#[test]
fn rope_positions_and_kv_slots_must_fall_inside_their_tables() {
    let ops = HostOps;
    let rope = ops.upload_rope(&RopeTable::new(4, 10_000.0, 8)).unwrap();
    let positions = ops.upload_indices(&[1, 9], 10).unwrap();
    let heads = HeadRange {
        row_stride: 4,
        col_offset: 0,
        n_heads: 1,
    };
    let error = ops
        .rope_apply(&mut vec![0.0; 8], &positions, &rope, heads)
        .unwrap_err();
    assert!(matches!(
        error,
        KernelOpError::OutOfRange {
            value: 10,
            limit: 8,
            ..
        }
    ));

    let shape = KvShape {
        n_kv_heads: 1,
        head_dim: 2,
    };
    let layout = RowLayout {
        stride: 4,
        k_offset: 0,
        v_offset: 2,
    };
    let (mut k, mut v) = (
        vec![0.0; 2 * shape.block_floats()],
        vec![0.0; 2 * shape.block_floats()],
    );
    let slots = ops.upload_indices(&[33], 34).unwrap();
    let error = ops
        .kv_write((&mut k, &mut v), &vec![0.0; 4], &slots, layout, shape)
        .unwrap_err();
    assert!(matches!(
        error,
        KernelOpError::OutOfRange {
            value: 34,
            limit: 32,
            ..
        }
    ));
    let slots = ops.upload_indices(&[17], 32).unwrap();
    ops.kv_write(
        (&mut k, &mut v),
        &vec![1.0, 2.0, 3.0, 4.0],
        &slots,
        layout,
        shape,
    )
    .unwrap();
    assert_eq!(k[shape.k_index(1, 0, 1, 1)], 2.0);
    assert_eq!(v[shape.v_index(1, 0, 1, 1)], 4.0);
}

#[test]
fn host_attention_through_packed_chunks_equals_the_reference() {
    let ops = HostOps;
    let shape = AttentionShape {
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 8,
    };
    let floats = 6 * shape.kv().block_floats();
    let wave = |n: usize, salt: f32| -> Vec<f32> {
        (0..n).map(|i| (i as f32 * 0.37 + salt).sin()).collect()
    };
    let (k_pool, v_pool) = (wave(floats, 0.1), wave(floats, 2.3));
    let (a, b) = ([5u32, 2, 0], [1u32, 3]);
    // A chunk of 3 after a 30-token prefix and a decode row at position 20.
    let chunks = [table(0, 3, 30, &a), table(3, 1, 20, &b)];
    let queries = wave(4 * shape.row_width(), 1.7);
    let expected = paged_attention(shape, &queries, &chunks, &k_pool, &v_pool);
    let device_chunks = ops.upload_chunks(&chunks, 4, 6).unwrap();
    let mut out = vec![0.0; queries.len()];
    ops.paged_attention(
        &queries,
        (&k_pool, &v_pool),
        &device_chunks,
        shape,
        &mut out,
    )
    .unwrap();
    assert_eq!(out, expected);

    let too_wide = AttentionShape {
        head_dim: 512,
        ..shape
    };
    assert!(
        ops.paged_attention(
            &queries,
            (&k_pool, &v_pool),
            &device_chunks,
            too_wide,
            &mut out
        )
        .is_err()
    );
    // Tables checked against a pool of 6 blocks are refused for a pool of 5.
    let small = vec![0.0; 5 * shape.kv().block_floats()];
    assert!(matches!(
        ops.paged_attention(&queries, (&small, &small), &device_chunks, shape, &mut out),
        Err(KernelOpError::Length {
            what: "pool blocks",
            ..
        })
    ));
}

#[test]
fn host_elementwise_operations_are_the_references() {
    let ops = HostOps;
    let x: Vec<f32> = (0..12).map(|i| i as f32 - 5.5).collect();
    let weight = vec![0.5, 1.0, 2.0, -1.0];
    let mut out = vec![0.0; 12];
    ops.rms_norm(&x, &weight, 3, 1e-5, &mut out).unwrap();
    assert_eq!(out, elementwise::rms_norm(&x, &weight, 1e-5));
    let mut out = vec![0.0; 6];
    ops.silu_mul(&x, 3, 2, &mut out).unwrap();
    assert_eq!(out, elementwise::silu_mul(&x, 2));
}

const POOL_SHAPE: KvShape = KvShape {
    n_kv_heads: 2,
    head_dim: 4,
};

#[test]
fn pool_operations_refuse_foreign_blocks_slots_and_ranges() {
    let ops = HostOps;
    let floats = 3 * POOL_SHAPE.block_floats();
    let (mut k, mut v) = (vec![0.0; floats], vec![0.0; floats]);
    let blocks_ok = ops.upload_indices(&[0, 1], 3).unwrap();
    let blocks_far = ops.upload_indices(&[0, 1], 4).unwrap();
    let refused = ops
        .kv_copy_blocks(
            (&mut k, &mut v),
            &blocks_ok,
            &blocks_far,
            POOL_SHAPE.block_floats(),
        )
        .unwrap_err();
    assert!(
        matches!(
            refused,
            KernelOpError::OutOfRange {
                value: 4,
                limit: 3,
                ..
            }
        ),
        "{refused}"
    );
    let one = ops.upload_indices(&[5], 48).unwrap();
    let refused = ops
        .kv_copy_rows((&mut k, &mut v), &blocks_ok, &one, POOL_SHAPE)
        .unwrap_err();
    assert!(matches!(refused, KernelOpError::Length { .. }), "{refused}");
    let mut short_v = vec![0.0; floats - 1];
    let refused = ops
        .kv_copy_rows((&mut k, &mut short_v), &one, &one, POOL_SHAPE)
        .unwrap_err();
    assert!(matches!(refused, KernelOpError::Length { .. }), "{refused}");

    let rope = RopeTable::new(POOL_SHAPE.head_dim, 10_000.0, 1);
    let rotation = ops.upload_rotation(&rope.delta(3)).unwrap();
    let table = ops.upload_indices(&[2, 0], 3).unwrap();
    // The table covers 32 positions.
    let refused = ops
        .rope_rerotate_k(&mut k, &table, 20..33, &rotation, POOL_SHAPE)
        .unwrap_err();
    assert!(
        matches!(
            refused,
            KernelOpError::OutOfRange {
                value: 33,
                limit: 32,
                ..
            }
        ),
        "{refused}"
    );
    let wide = RopeTable::new(8, 10_000.0, 1);
    let wrong = ops.upload_rotation(&wide.delta(3)).unwrap();
    let refused = ops
        .rope_rerotate_k(&mut k, &table, 0..4, &wrong, POOL_SHAPE)
        .unwrap_err();
    assert!(matches!(refused, KernelOpError::Length { .. }), "{refused}");

    assert!(ops.download_range(&k, floats - 2..floats + 1).is_err());
    assert!(ops.upload_range(&mut k, floats - 2, &[1.0; 3]).is_err());
    assert!(ops.upload_range(&mut k, usize::MAX, &[1.0]).is_err());
}

#[test]
fn host_pool_operations_follow_the_references() {
    use crate::reference::kv::{copy_rows, flat_slot};
    use crate::reference::rope::rerotate_k;
    let ops = HostOps;
    let floats = 4 * POOL_SHAPE.block_floats();
    let k0: Vec<f32> = (0..floats).map(|i| (i % 13) as f32 - 6.0).collect();
    let v0: Vec<f32> = k0.iter().map(|x| x * 0.5).collect();
    let (mut k, mut v) = (k0.clone(), v0.clone());
    let (src_table, dst_table) = ([0u32], [1u32, 2]);
    let src: Vec<u32> = (2..12).map(|p| flat_slot(&src_table, p)).collect();
    let dst: Vec<u32> = (12..22).map(|p| flat_slot(&dst_table, p)).collect();
    let (src_i, dst_i) = (
        ops.upload_indices(&src, 64).unwrap(),
        ops.upload_indices(&dst, 64).unwrap(),
    );
    ops.kv_copy_rows((&mut k, &mut v), &src_i, &dst_i, POOL_SHAPE)
        .unwrap();
    let rope = RopeTable::new(POOL_SHAPE.head_dim, 10_000.0, 1);
    let rotation = rope.delta(10);
    let device_rotation = ops.upload_rotation(&rotation).unwrap();
    let table = ops.upload_indices(&dst_table, 4).unwrap();
    ops.rope_rerotate_k(&mut k, &table, 12..22, &device_rotation, POOL_SHAPE)
        .unwrap();
    let (mut expected_k, mut expected_v) = (k0, v0);
    copy_rows(&mut expected_k, &mut expected_v, &src, &dst, POOL_SHAPE);
    rerotate_k(&mut expected_k, &dst_table, 12, 10, POOL_SHAPE, &rotation);
    assert_eq!(k, expected_k);
    assert_eq!(v, expected_v);

    let block = POOL_SHAPE.block_floats();
    let patch: Vec<f32> = (0..block).map(|i| i as f32 * 2.0).collect();
    ops.upload_range(&mut v, 3 * block, &patch).unwrap();
    assert_eq!(ops.download_range(&v, 3 * block..4 * block).unwrap(), patch);
    assert_eq!(
        ops.download_range(&v, 0..3 * block).unwrap(),
        expected_v[..3 * block]
    );
}
