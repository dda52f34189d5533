//! A device pool (here [`ResidentPool<HostOps>`] behind [`KvPool::on_device`]) does what the
//! host pool does: the same writes, block copies and row copies with K re-rotation read back
//! the same values, and bad requests fail the same way.

use skillkv_kernels::ops::host::HostOps;
use skillkv_kernels::reference::rope::RopeTable;

use super::*;
use crate::engine::kv_pool::KvPool;
use crate::engine::model::ForwardError;

fn config() -> ModelConfig {
    ModelConfig {
        n_layers: 3,
        hidden: 16,
        ffn: 32,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 4,
        vocab: 10,
        rope_theta: 10_000.0,
        rms_eps: 1e-5,
        context_length: 256,
    }
}

const BLOCKS: usize = 7;

/// A host pool and a device pool of [`BLOCKS`] blocks with the same distinct values.
fn pools() -> (KvPool, KvPool) {
    let config = config();
    let device = ResidentPool::new(Arc::new(HostOps), &config, BLOCKS).expect("allocates");
    let mut device = KvPool::on_device(&config, BLOCKS, Box::new(device));
    let mut host = KvPool::new(&config, BLOCKS);
    let floats = KvPool::floats_per_block_layer(&config);
    for layer in 0..config.n_layers {
        for block in 0..BLOCKS as u32 {
            let salt = (layer * BLOCKS + block as usize) * floats;
            let k: Vec<f32> = (0..floats)
                .map(|i| ((salt + i) % 97) as f32 / 7.0)
                .collect();
            let v: Vec<f32> = k.iter().map(|x| 3.0 - x).collect();
            host.write_block(layer, block, &k, &v).unwrap();
            device.write_block(layer, block, &k, &v).unwrap();
        }
    }
    (host, device)
}

fn assert_same(host: &KvPool, device: &KvPool) {
    for layer in 0..config().n_layers {
        for block in 0..BLOCKS as u32 {
            assert_eq!(
                host.read_block(layer, block).unwrap(),
                device.read_block(layer, block).unwrap(),
                "layer {layer} block {block}"
            );
        }
    }
}

#[test]
fn a_device_pool_reads_back_what_the_host_pool_does_after_every_operation() {
    let (mut host, mut device) = pools();
    assert!(host.is_host() && !device.is_host());
    assert_same(&host, &device);
    for pool in [&mut host, &mut device] {
        pool.copy_block(4, 1).unwrap();
    }
    assert_same(&host, &device);
    // Positions 5..37 of table [0, 2, 3] go to positions 11..43 of table [5, 6, 1], K turned
    // by 6 positions; then an unturned copy.
    let rope = RopeTable::new(config().head_dim, config().rope_theta, 1);
    let rotation = rope.delta(6);
    for pool in [&mut host, &mut device] {
        pool.copy_rows((&[0, 2, 3], 5), (&[5, 6, 1], 11), 32, Some(&rotation))
            .unwrap();
        pool.copy_rows((&[4], 0), (&[0], 3), 9, None).unwrap();
    }
    assert_same(&host, &device);
    // The copies changed something: the host pool is the reference for the values.
    let (fresh, _) = pools();
    assert_ne!(
        fresh.read_block(0, 6).unwrap(),
        host.read_block(0, 6).unwrap()
    );
}

#[test]
fn the_forward_pass_refuses_a_pool_that_is_not_its_own() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("tiny.gguf");
    crate::engine::testing::write_tiny_gguf(&path, &Default::default()).expect("tiny model");
    let kernels = crate::engine::model::LlamaModel::load(
        &path,
        &crate::engine::model::LoadOptions {
            device: crate::engine::device::EngineDevice::HostKernels,
            ..Default::default()
        },
    )
    .expect("loads")
    .model;
    let cpu = crate::engine::model::LlamaModel::load(&path, &Default::default())
        .expect("loads")
        .model;
    assert_eq!(kernels.backend_name(), "host-kernels");
    let tokens = [5u32, 6, 7];
    let table = [0u32];
    let batch = crate::engine::batch::ForwardBatch {
        chunks: vec![crate::engine::batch::SeqChunk {
            tokens: &tokens,
            start_pos: 0,
            block_table: &table,
            want_logits: true,
        }],
    };
    let mut host_pool = cpu.new_pool(2).unwrap();
    let mut device_pool = kernels.new_pool(2).unwrap();
    assert!(!device_pool.is_host());
    for (model, pool, expected) in [
        (&kernels, &mut host_pool, "host-kernels"),
        (&cpu, &mut device_pool, "host"),
    ] {
        match model.forward(&batch, pool) {
            Err(ForwardError::PoolElsewhere { expected: named }) => assert_eq!(named, expected),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
    assert_eq!(
        kernels
            .forward(&batch, &mut device_pool)
            .unwrap()
            .logits
            .len(),
        1
    );
    assert_eq!(cpu.forward(&batch, &mut host_pool).unwrap().logits.len(), 1);
}
