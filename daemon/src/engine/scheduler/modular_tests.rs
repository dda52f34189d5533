//! Modular copies inside the scheduler, on the tiny synthetic model: where the copied rows go,
//! that K is turned by the position delta and V copied exactly.

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Instant;

use skillkv_api::block_hash::{HashNamespace, block_hashes_from};
use skillkv_kernels::reference::kv::{read_k, read_v};
use tokio::sync::{broadcast, mpsc, oneshot};

use super::*;
use crate::engine::model::{LlamaModel, LoadOptions};
use crate::engine::sampling::{Sampler, SamplingParams};
use crate::engine::scheduler::SchedulerLimits;
use crate::engine::scheduler::sequence::{Generation, Purpose};
use crate::engine::testing::{TinyModelSpec, write_tiny_gguf};

#[test]
fn copy_targets_cover_cached_full_blocks_after_the_recomputed_head() {
    let span = ModularSpan {
        start: 21,
        len: 40,
        recompute: 3,
    };
    // Two of the segment's 40 tokens' blocks are cached: 32 tokens from position 21.
    assert_eq!(copy_target(&span, 2, 100), 24..53);
    assert_eq!(copy_target(&span, 0, 100), 21..21);
    // The prompt's last token is never copied.
    assert_eq!(copy_target(&span, 2, 40), 24..39);
    // Nothing left after the recomputed head.
    let head_only = ModularSpan {
        recompute: 40,
        ..span
    };
    assert!(copy_target(&head_only, 2, 100).is_empty());
}

fn scheduler(reuse_prefixes: bool) -> Scheduler<LlamaModel> {
    let path = std::env::temp_dir().join(format!(
        "skillkv-modular-unit-{}-{reuse_prefixes}.gguf",
        std::process::id()
    ));
    write_tiny_gguf(&path, &TinyModelSpec::default()).expect("tiny model");
    let loaded = LlamaModel::load(&path, &LoadOptions::default()).expect("loads");
    let _ = std::fs::remove_file(&path);
    let limits = SchedulerLimits {
        max_batch_tokens: 512,
        max_seqs: 4,
        reuse_prefixes,
    };
    let kv = loaded.model.new_pool(32).expect("pool");
    Scheduler::new(
        Arc::new(loaded.model),
        limits,
        kv,
        None,
        Arc::new(AtomicUsize::new(0)),
        broadcast::channel(64).0,
    )
}

fn sequence(id: u64, tokens: Vec<u32>, purpose: Purpose) -> Sequence {
    let root = HashNamespace::default().root();
    Sequence::new(id, format!("r{id}"), tokens, root, purpose, false)
}

fn generating(
    id: u64,
    tokens: Vec<u32>,
) -> (Sequence, mpsc::Receiver<crate::engine::GenerationEvent>) {
    let params = SamplingParams {
        max_tokens: 8,
        ignore_eos: true,
        ..SamplingParams::greedy()
    };
    let (events, receiver) = mpsc::channel(16);
    let generation = Generation {
        sampler: Sampler::new(&params),
        params,
        text: None,
        events,
    };
    (
        sequence(id, tokens, Purpose::Generate(Box::new(generation))),
        receiver,
    )
}

fn ids(len: usize, salt: u32) -> Vec<u32> {
    (0..len as u32)
        .map(|i| (i * 31 + salt * 17) % 300 + 3)
        .collect()
}

/// K and V rows of `positions` of one layer of a sequence's table.
fn rows(
    scheduler: &Scheduler<LlamaModel>,
    layer: usize,
    table: &[u32],
    positions: Range<usize>,
) -> Vec<(Vec<f32>, Vec<f32>)> {
    let config = scheduler.model.config();
    let shape = config.kv_shape();
    let (k, v) = scheduler.kv.layer(layer).expect("a host pool");
    positions
        .map(|p| (read_k(k, table, p, shape), read_v(v, table, p, shape)))
        .collect()
}

#[test]
fn a_copied_segment_has_its_k_turned_to_the_new_position_and_its_v_unchanged() {
    let filler = ids(21, 1);
    let segment = ids(40, 2);
    let question = ids(5, 3);
    let prompt: Vec<u32> = [filler.as_slice(), &segment, &question].concat();

    // The segment alone, prefilled from position 0 and pinned.
    let mut modular = scheduler(true);
    let (reply, mut pinned) = oneshot::channel();
    modular.enqueue(sequence(0, segment.clone(), Purpose::Pin(Some(reply))));
    let deadline = Instant::now() + std::time::Duration::from_secs(30);
    let pinned = loop {
        modular.step();
        if let Ok(result) = pinned.try_recv() {
            break result.expect("pinned");
        }
        assert!(Instant::now() < deadline, "pinning did not finish");
    };
    assert_eq!(pinned.pinned_tokens, 32);
    let source: Vec<u32> = block_hashes_from(HashNamespace::default().root(), &segment)
        .iter()
        .map(|hash| modular.cache.block_of(hash).expect("pinned block"))
        .collect();

    // The request copies the segment's 32 pinned rows to positions 21..53.
    let (mut seq, _events) = generating(1, prompt.clone());
    seq.modular = vec![ModularSpan {
        start: 21,
        len: 40,
        recompute: 0,
    }];
    modular.enqueue(seq);
    modular.step();
    let running = &modular.running[0];
    assert_eq!(running.copied, vec![21..53]);
    assert_eq!(running.cached_tokens, 0);
    assert_eq!(running.register_limit, 1);
    let table = running.table.blocks().to_vec();

    // The same prompt computed exactly, in a scheduler of its own.
    let mut exact = scheduler(false);
    let (seq, _exact_events) = generating(2, prompt);
    exact.enqueue(seq);
    exact.step();
    let exact_table = exact.running[0].table.blocks().to_vec();

    for layer in 0..modular.kv.num_layers() {
        let copied = rows(&modular, layer, &table, 21..53);
        let original = rows(&modular, layer, &source, 0..32);
        for ((_, copied_v), (_, original_v)) in copied.iter().zip(&original) {
            assert_eq!(copied_v, original_v, "layer {layer}: V is copied exactly");
        }
    }
    // Layer 0's K depends only on the token and its position (no attention before it), so the
    // copied, re-rotated K must equal K computed at the new position.
    let copied = rows(&modular, 0, &table, 21..53);
    let original = rows(&modular, 0, &source, 0..32);
    let reference = rows(&exact, 0, &exact_table, 21..53);
    let mut unrotated_error = 0.0f32;
    for (offset, ((copied, original), reference)) in
        copied.iter().zip(&original).zip(&reference).enumerate()
    {
        for (a, b) in copied.0.iter().zip(&reference.0) {
            assert!((a - b).abs() < 1e-4, "row {offset}: K {a} vs {b}");
        }
        for (a, b) in copied.1.iter().zip(&reference.1) {
            assert!((a - b).abs() < 1e-5, "row {offset}: V {a} vs {b}");
        }
        for (a, b) in original.0.iter().zip(&reference.0) {
            unrotated_error = unrotated_error.max((a - b).abs());
        }
    }
    // Without the rotation the test would fail: K at position 0.. differs from K at 21...
    assert!(unrotated_error > 1e-2, "{unrotated_error}");
    // The first chunk stopped at the copied rows and the sequence moved past them; the next
    // chunk is the segment's tail and the question.
    assert_eq!(modular.running[0].computed, 53);
    modular.step();
    assert_eq!(modular.running[0].computed, 66);
    modular.check_invariants().expect("cache bookkeeping holds");
}
