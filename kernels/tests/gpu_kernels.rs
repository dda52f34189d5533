//! Every kernel against its CPU reference on random inputs, on the first CUDA device. Exact
//! kernels (gathers, copies, RoPE, dequantization, argmax) must match bit for bit; kernels that
//! reduce in another order or use the device's `expf` get relative bounds for f32. Without a
//! device (or without libnvrtc) each test prints "skipped: no GPU" and passes. The attention
//! kernels have their own file, `gpu_attention.rs`.
#![cfg(feature = "cuda")]

mod common;

use std::sync::Arc;

use common::{Gpu, Rng, assert_close, grid, launch};
use cudarc::driver::{LaunchConfig, PushKernelArg};
use half::f16;
use skillkv_kernels::loader::LoadKernelError;
use skillkv_kernels::reference::dequant::{self, BlockFormat};
use skillkv_kernels::reference::kv::{self, KvShape, RowLayout};
use skillkv_kernels::reference::{elementwise, rope, rope::RopeTable};
use skillkv_kernels::registry::{self, BLOCK_SIZE};

fn elements(n: usize) -> LaunchConfig {
    LaunchConfig::for_num_elems(n as u32)
}

#[test]
fn elementwise_kernels_match_their_references() {
    let Some(gpu) = Gpu::open() else { return };
    let mut rng = Rng(1);
    let (rows, hidden, vocab) = (7usize, 576usize, 1000usize);
    let (rows_i, hidden_i) = (rows as i32, hidden as i32);

    let table = rng.f32s(vocab * hidden, 1.0);
    let tokens: Vec<u32> = (0..rows).map(|_| rng.below(vocab as u32)).collect();
    let (d_table, d_tokens) = (gpu.upload(&table), gpu.upload(&tokens));
    let mut d_out = gpu.stream.alloc_zeros::<f32>(rows * hidden).unwrap();
    let f = gpu.function("embedding_gather_f32");
    let mut args = gpu.stream.launch_builder(&f);
    args.arg(&d_table)
        .arg(&d_tokens)
        .arg(&mut d_out)
        .arg(&rows_i)
        .arg(&hidden_i);
    launch(&mut args, grid((rows as u32, 1, 1), 128));
    let embedded = gpu.download(&d_out);
    assert_eq!(
        embedded,
        elementwise::embedding_gather(&table, hidden, &tokens)
    );

    let weight = rng.f32s(hidden, 2.0);
    let eps = 1e-5f32;
    let d_weight = gpu.upload(&weight);
    let d_in = gpu.upload(&embedded);
    let f = gpu.function("rms_norm_f32");
    let mut args = gpu.stream.launch_builder(&f);
    args.arg(&d_in)
        .arg(&d_weight)
        .arg(&mut d_out)
        .arg(&rows_i)
        .arg(&hidden_i)
        .arg(&eps);
    launch(&mut args, grid((rows as u32, 1, 1), 256));
    let expected = elementwise::rms_norm(&embedded, &weight, eps);
    assert_close("rms_norm", &gpu.download(&d_out), &expected, 1e-5, 1e-6);

    let gate_up = rng.f32s(rows * 2 * hidden, 8.0);
    let d_gate_up = gpu.upload(&gate_up);
    let f = gpu.function("silu_mul_f32");
    let mut args = gpu.stream.launch_builder(&f);
    args.arg(&d_gate_up)
        .arg(&mut d_out)
        .arg(&rows_i)
        .arg(&hidden_i);
    launch(&mut args, elements(rows * hidden));
    let expected = elementwise::silu_mul(&gate_up, hidden);
    assert_close("silu_mul", &gpu.download(&d_out), &expected, 1e-5, 1e-6);

    let mut residual = rng.f32s(rows * hidden, 4.0);
    let delta = rng.f32s(rows * hidden, 4.0);
    let mut d_residual = gpu.upload(&residual);
    let d_delta = gpu.upload(&delta);
    let n = (rows * hidden) as i32;
    let f = gpu.function("add_in_place_f32");
    let mut args = gpu.stream.launch_builder(&f);
    args.arg(&mut d_residual).arg(&d_delta).arg(&n);
    launch(&mut args, elements(rows * hidden));
    elementwise::add_in_place(&mut residual, &delta);
    assert_eq!(gpu.download(&d_residual), residual);

    // The Q part (columns 64..128 of 160-wide rows, as in fused QKV rows).
    let (stride, offset, width) = (160usize, 64usize, 64usize);
    let fused = rng.f32s(rows * stride, 4.0);
    let d_fused = gpu.upload(&fused);
    let mut d_columns = gpu.stream.alloc_zeros::<f32>(rows * width).unwrap();
    let dims = [stride, offset, width].map(|v| v as i32);
    let f = gpu.function("gather_columns_f32");
    let mut args = gpu.stream.launch_builder(&f);
    args.arg(&d_fused)
        .arg(&mut d_columns)
        .arg(&rows_i)
        .arg(&dims[0])
        .arg(&dims[1])
        .arg(&dims[2]);
    launch(&mut args, elements(rows * width));
    assert_eq!(
        gpu.download(&d_columns),
        elementwise::gather_columns(&fused, rows, stride, offset, width)
    );

    // Argmax with ties (a copied maximum), NaN and an all-NaN row.
    let vocab_i = vocab as i32;
    let mut logits = rng.f32s(rows * vocab, 10.0);
    let best = logits[..vocab].iter().copied().fold(f32::MIN, f32::max);
    logits[vocab - 1] = best;
    logits[vocab + 3] = f32::NAN;
    logits[2 * vocab..3 * vocab].fill(f32::NAN);
    logits[3 * vocab..4 * vocab].fill(f32::NEG_INFINITY);
    let d_logits = gpu.upload(&logits);
    let mut d_argmax = gpu.stream.alloc_zeros::<u32>(rows).unwrap();
    let f = gpu.function("argmax_f32");
    let mut args = gpu.stream.launch_builder(&f);
    args.arg(&d_logits)
        .arg(&mut d_argmax)
        .arg(&rows_i)
        .arg(&vocab_i);
    launch(&mut args, grid((rows as u32, 1, 1), 256));
    assert_eq!(gpu.download(&d_argmax), elementwise::argmax(&logits, vocab));
}

#[test]
fn rope_kernels_match_their_references_bit_for_bit() {
    let Some(gpu) = Gpu::open() else { return };
    let mut rng = Rng(2);
    let (n_heads, n_kv_heads, head_dim) = (9usize, 3usize, 64usize);
    let table = RopeTable::new(head_dim, 100_000.0, 2048);
    let (d_cos, d_sin) = (gpu.upload(table.cos_table()), gpu.upload(table.sin_table()));

    // Rotate the K heads inside fused QKV rows.
    let rows = 13usize;
    let stride = (n_heads + 2 * n_kv_heads) * head_dim;
    let mut x = rng.f32s(rows * stride, 3.0);
    let positions: Vec<u32> = (0..rows).map(|_| rng.below(2048)).collect();
    let (mut d_x, d_positions) = (gpu.upload(&x), gpu.upload(&positions));
    let args_i = [rows, stride, n_heads * head_dim, n_kv_heads, head_dim].map(|v| v as i32);
    let f = gpu.function("rope_apply_f32");
    let mut args = gpu.stream.launch_builder(&f);
    args.arg(&mut d_x).arg(&d_positions).arg(&d_cos).arg(&d_sin);
    for value in &args_i {
        args.arg(value);
    }
    launch(&mut args, elements(rows * n_kv_heads * head_dim / 2));
    table.apply(&mut x, &positions, stride, n_heads * head_dim, n_kv_heads);
    assert_eq!(gpu.download(&d_x), x);

    // Re-rotate positions 5..45 of a sequence by -3.
    let shape = KvShape {
        n_kv_heads,
        head_dim,
    };
    let block_table = [4u32, 0, 2, 1];
    let mut k_pool = rng.f32s(5 * shape.block_floats(), 2.0);
    let rotation = table.delta(-3);
    let (mut d_k, d_table) = (gpu.upload(&k_pool), gpu.upload(&block_table));
    let (d_dcos, d_dsin) = (gpu.upload(&rotation.cos), gpu.upload(&rotation.sin));
    let args_i = [5, 40, n_kv_heads as i32, head_dim as i32];
    let f = gpu.function("rope_rerotate_k_f32");
    let mut args = gpu.stream.launch_builder(&f);
    args.arg(&mut d_k).arg(&d_table).arg(&d_dcos).arg(&d_dsin);
    for value in &args_i {
        args.arg(value);
    }
    launch(&mut args, elements(40 * n_kv_heads * head_dim / 2));
    rope::rerotate_k(&mut k_pool, &block_table, 5, 40, shape, &rotation);
    assert_eq!(gpu.download(&d_k), k_pool);
}

#[test]
fn dequantization_kernels_match_their_references_bit_for_bit() {
    let Some(gpu) = Gpu::open() else { return };
    let mut rng = Rng(3);
    let n_blocks = 301usize;
    for format in BlockFormat::ALL {
        // Random nibbles/bytes with finite f16 scales (and minimum).
        let mut bytes = Vec::new();
        for _ in 0..n_blocks {
            let header = if format == BlockFormat::Q4_1 { 2 } else { 1 };
            for value in rng.f32s(header, 0.1) {
                bytes.extend(f16::from_f32(value).to_le_bytes());
            }
            let body = format.block_bytes() - 2 * header;
            bytes.extend((0..body).map(|_| rng.next() as u8));
        }
        let d_bytes = gpu.upload(&bytes);
        let n = n_blocks as i32;
        let (f32_kernel, f16_kernel) = format.kernels();

        let mut d_out = gpu.stream.alloc_zeros::<f32>(n_blocks * 32).unwrap();
        let f = gpu.function(f32_kernel);
        let mut args = gpu.stream.launch_builder(&f);
        args.arg(&d_bytes).arg(&mut d_out).arg(&n);
        launch(&mut args, elements(n_blocks * 32));
        let expected = dequant::dequantize_f32(format, &bytes).unwrap();
        let to_bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            to_bits(&gpu.download(&d_out)),
            to_bits(&expected),
            "{f32_kernel}"
        );

        let mut d_half = gpu.stream.alloc_zeros::<u16>(n_blocks * 32).unwrap();
        let f = gpu.function(f16_kernel);
        let mut args = gpu.stream.launch_builder(&f);
        args.arg(&d_bytes).arg(&mut d_half).arg(&n);
        launch(&mut args, elements(n_blocks * 32));
        let expected: Vec<u16> = dequant::dequantize_f16(format, &bytes)
            .unwrap()
            .iter()
            .map(|h| h.to_bits())
            .collect();
        assert_eq!(gpu.download(&d_half), expected, "{f16_kernel}");
    }
}

#[test]
fn kv_kernels_match_their_references_bit_for_bit() {
    let Some(gpu) = Gpu::open() else { return };
    let mut rng = Rng(4);
    let shape = KvShape {
        n_kv_heads: 3,
        head_dim: 64,
    };
    let n_blocks = 9usize;
    let mut k_pool = rng.f32s(n_blocks * shape.block_floats(), 1.0);
    let mut v_pool = rng.f32s(n_blocks * shape.block_floats(), 1.0);
    // Fused QKV rows: q (9 heads) | k | v; 21 rows to distinct random slots.
    let q_width = 9 * shape.head_dim;
    let layout = RowLayout {
        stride: q_width + 2 * shape.width(),
        k_offset: q_width,
        v_offset: q_width + shape.width(),
    };
    let rows = 21usize;
    let src = rng.f32s(rows * layout.stride, 3.0);
    let mut slots: Vec<u32> = (0..(n_blocks * BLOCK_SIZE) as u32).collect();
    for i in (1..slots.len()).rev() {
        slots.swap(i, rng.below(i as u32 + 1) as usize);
    }
    slots.truncate(rows);
    let (mut d_k, mut d_v) = (gpu.upload(&k_pool), gpu.upload(&v_pool));
    let (d_src, d_slots) = (gpu.upload(&src), gpu.upload(&slots));
    let args_i = [rows, layout.stride, layout.k_offset, layout.v_offset, 3, 64].map(|v| v as i32);
    let f = gpu.function("kv_write_f32");
    let mut args = gpu.stream.launch_builder(&f);
    args.arg(&mut d_k).arg(&mut d_v).arg(&d_src).arg(&d_slots);
    for value in &args_i {
        args.arg(value);
    }
    launch(&mut args, elements(rows * shape.width()));
    kv::write_kv(&mut k_pool, &mut v_pool, &src, &slots, layout, shape);
    assert_eq!(gpu.download(&d_k), k_pool);
    assert_eq!(gpu.download(&d_v), v_pool);

    let (src_blocks, dst_blocks) = ([0u32, 5, 7], [3u32, 1, 8]);
    let (d_srcb, d_dstb) = (gpu.upload(&src_blocks), gpu.upload(&dst_blocks));
    let (pairs, block_floats) = (3i32, shape.block_floats() as i32);
    let f = gpu.function("kv_block_copy_f32");
    let mut args = gpu.stream.launch_builder(&f);
    args.arg(&mut d_k)
        .arg(&d_srcb)
        .arg(&d_dstb)
        .arg(&pairs)
        .arg(&block_floats);
    launch(&mut args, elements(3 * shape.block_floats()));
    kv::copy_blocks(&mut k_pool, &src_blocks, &dst_blocks, shape.block_floats());
    assert_eq!(gpu.download(&d_k), k_pool);

    // 23 token rows from slots of blocks 0..4 to distinct slots of blocks 5..9.
    let src_slots: Vec<u32> = (0..23).map(|_| rng.below(4 * BLOCK_SIZE as u32)).collect();
    let mut dst_slots: Vec<u32> = (5 * BLOCK_SIZE as u32..(n_blocks * BLOCK_SIZE) as u32).collect();
    for i in (1..dst_slots.len()).rev() {
        dst_slots.swap(i, rng.below(i as u32 + 1) as usize);
    }
    dst_slots.truncate(src_slots.len());
    let (d_src_slots, d_dst_slots) = (gpu.upload(&src_slots), gpu.upload(&dst_slots));
    let args_i = [src_slots.len(), shape.n_kv_heads, shape.head_dim].map(|v| v as i32);
    let f = gpu.function("kv_copy_rows_f32");
    let mut args = gpu.stream.launch_builder(&f);
    args.arg(&mut d_k)
        .arg(&mut d_v)
        .arg(&d_src_slots)
        .arg(&d_dst_slots);
    for value in &args_i {
        args.arg(value);
    }
    launch(&mut args, elements(src_slots.len() * shape.width()));
    kv::copy_rows(&mut k_pool, &mut v_pool, &src_slots, &dst_slots, shape);
    assert_eq!(gpu.download(&d_k), k_pool);
    assert_eq!(gpu.download(&d_v), v_pool);
}

#[test]
fn the_loader_loads_each_module_once_and_rejects_unknown_entry_points() {
    let Some(gpu) = Gpu::open() else { return };
    assert!(matches!(
        gpu.loader.function("no_such_kernel"),
        Err(LoadKernelError::UnknownEntryPoint { .. })
    ));
    for kernel in registry::KERNELS {
        for entry_point in kernel.entry_points {
            gpu.function(entry_point);
        }
    }
}

#[test]
fn cublas_projection_matches_a_cpu_matmul() {
    use skillkv_kernels::gemm::GpuDevice;
    let device = match GpuDevice::open(0) {
        Ok(device) => device,
        Err(error) => return println!("skipped: no GPU ({error})"),
    };
    let mut rng = Rng(9);
    let (outputs, inputs) = (1536usize, 576usize);
    let weights = rng.f32s(outputs * inputs, 0.1);
    let matrix = device.upload_matrix(&weights, outputs, inputs).unwrap();
    // Decode-sized and prefill-sized batches, and an empty one.
    for rows in [0usize, 1, 7, 64] {
        let input = rng.f32s(rows * inputs, 1.0);
        let got = device.matmul(&matrix, &input, rows).unwrap();
        let expected: Vec<f32> = input
            .chunks_exact(inputs)
            .flat_map(|row| {
                weights.chunks_exact(inputs).map(move |w| {
                    row.iter()
                        .zip(w)
                        .map(|(x, w)| f64::from(*x) * f64::from(*w))
                        .sum::<f64>() as f32
                })
            })
            .collect();
        assert_close(&format!("sgemm rows={rows}"), &got, &expected, 1e-4, 1e-4);
    }
    assert!(device.matmul(&matrix, &[0.0; 5], 1).is_err());
}

/// Pool maintenance through `ops`: a block copy, a row copy with re-rotation, a ranged upload;
/// returns the K and V pools and a ranged download.
fn pool_maintenance<K: skillkv_kernels::ops::PoolOps>(
    ops: &K,
    (k, v): (&[f32], &[f32]),
    shape: KvShape,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let blocks = k.len() / shape.block_floats();
    let slots = blocks * BLOCK_SIZE;
    let (mut k_pool, mut v_pool) = (ops.upload_f32(k).unwrap(), ops.upload_f32(v).unwrap());
    let src = ops.upload_indices(&[0, 2], blocks).unwrap();
    let dst = ops.upload_indices(&[5, 6], blocks).unwrap();
    ops.kv_copy_blocks((&mut k_pool, &mut v_pool), &src, &dst, shape.block_floats())
        .unwrap();
    // Positions 3..30 of table [1, 2] go to positions 9..36 of table [7, 3, 4], turned by 6.
    let (src_table, dst_table) = ([1u32, 2], [7u32, 3, 4]);
    let src_slots: Vec<u32> = (3..30).map(|p| kv::flat_slot(&src_table, p)).collect();
    let dst_slots: Vec<u32> = (9..36).map(|p| kv::flat_slot(&dst_table, p)).collect();
    let src_slots = ops.upload_indices(&src_slots, slots).unwrap();
    let dst_slots = ops.upload_indices(&dst_slots, slots).unwrap();
    ops.kv_copy_rows((&mut k_pool, &mut v_pool), &src_slots, &dst_slots, shape)
        .unwrap();
    let rope = RopeTable::new(shape.head_dim, 10_000.0, 1);
    let rotation = ops.upload_rotation(&rope.delta(6)).unwrap();
    let table = ops.upload_indices(&dst_table, blocks).unwrap();
    ops.rope_rerotate_k(&mut k_pool, &table, 9..36, &rotation, shape)
        .unwrap();
    let patch: Vec<f32> = (0..shape.block_floats()).map(|i| i as f32).collect();
    ops.upload_range(&mut v_pool, 8 * shape.block_floats(), &patch)
        .unwrap();
    let range = ops
        .download_range(&k_pool, shape.block_floats()..3 * shape.block_floats())
        .unwrap();
    (
        ops.download_f32(&k_pool).unwrap(),
        ops.download_f32(&v_pool).unwrap(),
        range,
    )
}

#[test]
fn pool_operations_on_the_gpu_match_the_host_ones() {
    use skillkv_kernels::gemm::GpuDevice;
    use skillkv_kernels::ops::cuda::CudaOps;
    use skillkv_kernels::ops::host::HostOps;
    let device = match GpuDevice::open(0) {
        Ok(device) => Arc::new(device),
        Err(error) => return println!("skipped: no GPU ({error})"),
    };
    let ops = CudaOps::new(device).expect("kernel loader");
    let mut rng = Rng(11);
    let shape = KvShape {
        n_kv_heads: 3,
        head_dim: 64,
    };
    let k = rng.f32s(9 * shape.block_floats(), 1.0);
    let v = rng.f32s(9 * shape.block_floats(), 1.0);
    let (gpu_k, gpu_v, gpu_range) = pool_maintenance(&ops, (&k, &v), shape);
    let (host_k, host_v, host_range) = pool_maintenance(&HostOps, (&k, &v), shape);
    assert_close("K after maintenance", &gpu_k, &host_k, 1e-6, 1e-6);
    assert_eq!(gpu_v, host_v);
    assert_eq!(gpu_range, host_range);
}
