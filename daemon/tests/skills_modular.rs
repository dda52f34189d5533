//! Modular skill assembly on the tiny synthetic model, through the engine's public API: a single
//! skill is served bit for bit as exact assembly does; a later skill's pinned KV is copied (and
//! counted apart from exact reuse); the copied blocks are freed afterwards, the pinned blocks are
//! left untouched and the modular KV never enters the exact prefix cache. A segment prefilled on
//! its own into the prefix cache without a pin (a skill the daemon does not pin) is copied just
//! like a pinned one, and when source and copy cannot both fit, the segment is computed in
//! context instead of the request failing. A fully cached prompt recomputes its last token in
//! a copy of its last block, and exported KV imported elsewhere serves the same tokens.
//!
//! Every case runs on the CPU backend, on the GPU's code path through the kernels' host
//! references ([`EngineDevice::HostKernels`]), whose pool lives behind `PoolOps`, and, built
//! with `cuda`, on CUDA device 0 ("skipped: no GPU" without one). The cases compare a device's
//! results with the same device's, so they hold on a GPU whose sums round differently.

use std::path::PathBuf;
use std::sync::Arc;

use skillkv_daemon::engine::device::EngineDevice;
use skillkv_daemon::engine::handle::{CachedPrefix, PinRequest, PinnedPrefix};
use skillkv_daemon::engine::model::{LlamaModel, LoadOptions};
use skillkv_daemon::engine::sampling::SamplingParams;
use skillkv_daemon::engine::testing::{TinyModelSpec, write_tiny_gguf};
use skillkv_daemon::engine::{
    Engine, EngineConfig, EngineHandle, GenerateRequest, GenerationEvent, KvCacheSize, ModularSpan,
};

const BLOCKS: usize = 64;

/// Every case on the CPU backend (host pool) and on the resident forward pass through the
/// kernels' host references (device pool: copies, re-rotation and exports through `PoolOps`).
macro_rules! on_each_device {
    ($($case:ident),* $(,)?) => {
        mod cpu {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(super::EngineDevice::Cpu).await
                }
            )*
        }
        mod host_kernels {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(super::EngineDevice::HostKernels).await
                }
            )*
        }
        #[cfg(feature = "cuda")]
        mod cuda {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    use skillkv_daemon::engine::device::{DeviceRequest, select_device};
                    match select_device(DeviceRequest::Cuda(0)) {
                        Ok(selected) => super::$case(selected.device).await,
                        Err(error) => println!("skipped: no GPU ({error})"),
                    }
                }
            )*
        }
    };
}

on_each_device!(
    modular_with_a_single_skill_is_exact_bit_for_bit,
    a_later_skill_is_copied_counted_apart_and_its_blocks_freed,
    an_uncached_segment_is_computed_like_exact,
    a_segment_cached_without_a_pin_is_copied_like_a_pinned_one,
    a_copy_that_cannot_fit_beside_its_source_is_computed_in_context,
    a_fully_cached_prompt_recomputes_its_last_token_in_a_private_copy,
    exported_kv_imported_into_another_engine_serves_the_same_tokens,
);

fn engine(device: &EngineDevice, label: &str) -> EngineHandle {
    engine_with_blocks(device, label, BLOCKS)
}

fn engine_with_blocks(device: &EngineDevice, label: &str, blocks: usize) -> EngineHandle {
    let path: PathBuf = std::env::temp_dir().join(format!(
        "skillkv-modular-{label}-{device:?}-{}.gguf",
        std::process::id()
    ));
    write_tiny_gguf(&path, &TinyModelSpec::default()).expect("tiny model");
    let options = LoadOptions {
        device: device.clone(),
        ..LoadOptions::default()
    };
    let loaded = LlamaModel::load(&path, &options).expect("loads");
    let _ = std::fs::remove_file(&path);
    Engine::start(
        Arc::new(loaded.model),
        None,
        EngineConfig {
            kv_cache: KvCacheSize::Blocks(blocks),
            max_batch_tokens: 256,
            ..EngineConfig::default()
        },
    )
    .expect("engine starts")
}

/// Deterministic tokens below the tiny vocabulary.
fn tokens(len: usize, salt: u32) -> Vec<u32> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(37).wrapping_add(salt * 101)) % 300 + 3)
        .collect()
}

fn greedy(prompt: Vec<u32>, max_tokens: usize) -> GenerateRequest {
    GenerateRequest {
        request_id: "modular".to_string(),
        prompt_tokens: prompt,
        sampling: SamplingParams {
            max_tokens,
            ignore_eos: true,
            logprobs: Some(5),
            ..SamplingParams::greedy()
        },
        adapter: None,
    }
}

/// What a finished generation reported.
#[derive(Debug, Default, PartialEq)]
struct Outcome {
    tokens: Vec<u32>,
    logprobs: Vec<(f32, Vec<(u32, f32)>)>,
    started_cached: usize,
    modular_tokens: usize,
    finished_cached: usize,
}

/// `a` generated what `b` did: the same tokens and log-probabilities. On the host a row's
/// result never depends on the batch it ran in, so they are equal; on a GPU cuBLAS may sum in
/// another order for another batch shape, so log-probabilities agree within 1e-3 there.
fn assert_same_generation(device: &EngineDevice, a: &Outcome, b: &Outcome) {
    assert_eq!(a.tokens, b.tokens);
    if matches!(device, EngineDevice::Cpu | EngineDevice::HostKernels) {
        assert_eq!(a.logprobs, b.logprobs);
        return;
    }
    assert_eq!(a.logprobs.len(), b.logprobs.len());
    for ((a_logprob, a_top), (b_logprob, b_top)) in a.logprobs.iter().zip(&b.logprobs) {
        assert!(
            (a_logprob - b_logprob).abs() <= 1e-3,
            "{a_logprob} vs {b_logprob}"
        );
        assert_eq!(a_top.len(), b_top.len());
        for ((_, x), (_, y)) in a_top.iter().zip(b_top) {
            assert!((x - y).abs() <= 1e-3, "{x} vs {y}");
        }
    }
}

/// [`assert_same_generation`] and the same cache accounting.
fn assert_same_outcome(device: &EngineDevice, a: &Outcome, b: &Outcome) {
    assert_same_generation(device, a, b);
    assert_eq!(
        (a.started_cached, a.modular_tokens, a.finished_cached),
        (b.started_cached, b.modular_tokens, b.finished_cached)
    );
}

async fn run(engine: &EngineHandle, prompt: Vec<u32>, spans: Vec<ModularSpan>) -> Outcome {
    let mut stream = engine
        .submit_assembled(greedy(prompt, 6), spans)
        .expect("submits");
    let mut outcome = Outcome::default();
    while let Some(event) = stream.recv().await {
        match event {
            GenerationEvent::Started {
                cached_tokens,
                modular_tokens,
                ..
            } => {
                outcome.started_cached = cached_tokens;
                outcome.modular_tokens = modular_tokens;
            }
            GenerationEvent::Token {
                id,
                logprob,
                top_logprobs,
                ..
            } => {
                outcome.tokens.push(id);
                outcome.logprobs.push((logprob, top_logprobs));
            }
            GenerationEvent::Finished { cached_tokens, .. } => {
                outcome.finished_cached = cached_tokens
            }
            GenerationEvent::Failed(error) => panic!("generation failed: {error:#}"),
        }
    }
    outcome
}

async fn pin(engine: &EngineHandle, tokens: &[u32]) -> PinnedPrefix {
    engine
        .pin(PinRequest {
            tokens: tokens.to_vec(),
            adapter: None,
        })
        .await
        .expect("pins")
}

async fn cache(engine: &EngineHandle, tokens: &[u32]) -> CachedPrefix {
    engine
        .cache_prefix(PinRequest {
            tokens: tokens.to_vec(),
            adapter: None,
        })
        .await
        .expect("caches")
}

async fn modular_with_a_single_skill_is_exact_bit_for_bit(device: EngineDevice) {
    let engine = engine(&device, "single");
    let skill = tokens(45, 1);
    pin(&engine, &skill).await;
    let prompt: Vec<u32> = skill.iter().copied().chain(tokens(7, 9)).collect();
    // The first skill's segment starts at position 0: its pinned KV is the exact prefix.
    let span = ModularSpan {
        start: 0,
        len: skill.len(),
        recompute: 0,
    };
    let modular = run(&engine, prompt.clone(), vec![span]).await;
    assert_eq!(modular.started_cached, 32);
    assert_eq!(modular.modular_tokens, 0);
    // The exact request finds more cached (the modular one cached its exact blocks).
    let exact = run(&engine, prompt, Vec::new()).await;
    assert_eq!(exact.started_cached, 48);
    assert_same_generation(&device, &modular, &exact);
}

async fn a_later_skill_is_copied_counted_apart_and_its_blocks_freed(device: EngineDevice) {
    let engine = engine(&device, "later");
    let first = tokens(37, 2);
    let second = tokens(50, 3);
    let first_pin = pin(&engine, &first).await;
    let second_pin = pin(&engine, &second).await;
    let before = engine.kv_stats().await.expect("stats");
    let second_kv = engine.export_pin(second_pin.id).await.expect("exports");
    let first_kv = engine.export_pin(first_pin.id).await.expect("exports");

    let question = tokens(9, 4);
    let prompt: Vec<u32> = [first.as_slice(), &second, &question].concat();
    let span = ModularSpan {
        start: first.len(),
        len: second.len(),
        recompute: 2,
    };
    let modular = run(&engine, prompt.clone(), vec![span]).await;
    // Exact reuse: the first skill's two full blocks. Copied: the second skill's three full
    // blocks (48 tokens) minus the two recomputed ones.
    assert_eq!(modular.started_cached, 32);
    assert_eq!(modular.finished_cached, 32);
    assert_eq!(modular.modular_tokens, 48 - 2);
    assert_eq!(modular.tokens.len(), 6);

    // Everything the request held is back: no block is referenced, the pins are unchanged and
    // the pinned KV was only read.
    let after = engine.kv_stats().await.expect("stats");
    assert_eq!(after.used, 0, "{after:?}");
    assert_eq!(after.pinned, before.pinned, "{after:?}");
    assert_eq!(after.free + after.cached, before.free + before.cached);
    assert_eq!(engine.export_pin(second_pin.id).await, Some(second_kv));
    assert_eq!(engine.export_pin(first_pin.id).await, Some(first_kv));

    // The modular KV did not enter the exact prefix cache: an exact request for the same prompt
    // reuses only the first skill (position 37 starts the copied rows, inside block 2).
    let exact = run(&engine, prompt.clone(), Vec::new()).await;
    assert_eq!(exact.started_cached, 32);
    assert_eq!(exact.modular_tokens, 0);
    // Now the exact combination is cached; a modular request still copies (its KV does not
    // depend on what other requests cached) and still reports only exact reuse as cached.
    let again = run(&engine, prompt, vec![span]).await;
    assert_same_outcome(&device, &again, &modular);

    // Many modular requests in a row leak nothing.
    for salt in 0..4 {
        let prompt: Vec<u32> = [first.as_slice(), &second, &tokens(5 + salt, salt as u32)].concat();
        run(&engine, prompt, vec![span]).await;
    }
    let end = engine.kv_stats().await.expect("stats");
    assert_eq!(end.used, 0, "{end:?}");
    assert_eq!(end.pinned, before.pinned, "{end:?}");
    assert_eq!(end.free + end.cached + end.pinned, BLOCKS);
}

async fn an_uncached_segment_is_computed_like_exact(device: EngineDevice) {
    let engine = engine(&device, "uncached");
    let first = tokens(20, 5);
    pin(&engine, &first).await;
    // The second segment was never prefilled on its own: nothing to copy, so the request is
    // served exactly.
    let prompt: Vec<u32> = [first.as_slice(), &tokens(40, 6), &tokens(4, 7)].concat();
    let span = ModularSpan {
        start: first.len(),
        len: 40,
        recompute: 0,
    };
    let modular = run(&engine, prompt.clone(), vec![span]).await;
    assert_eq!(modular.modular_tokens, 0);
    let exact = run(&engine, prompt, Vec::new()).await;
    assert_same_generation(&device, &modular, &exact);
}

async fn a_segment_cached_without_a_pin_is_copied_like_a_pinned_one(device: EngineDevice) {
    let first = tokens(37, 2);
    let second = tokens(50, 3);
    let prompt: Vec<u32> = [first.as_slice(), &second, &tokens(9, 4)].concat();
    let span = ModularSpan {
        start: first.len(),
        len: second.len(),
        recompute: 2,
    };
    let pinned_engine = engine(&device, "cache-pinned");
    pin(&pinned_engine, &first).await;
    pin(&pinned_engine, &second).await;
    let from_pins = run(&pinned_engine, prompt.clone(), vec![span]).await;

    let cached_engine = engine(&device, "cache-unpinned");
    // Only full blocks are cached: 32 of 37 and 48 of 50 tokens; the first time nothing was.
    let first_cached = cache(&cached_engine, &first).await;
    assert_eq!(first_cached.full_tokens, 32);
    assert!(!first_cached.was_cached(), "{first_cached:?}");
    let second_cached = cache(&cached_engine, &second).await;
    assert_eq!(second_cached.full_tokens, 48);
    assert!(!second_cached.was_cached(), "{second_cached:?}");
    let again = cache(&cached_engine, &second).await;
    assert!(again.was_cached(), "{again:?}");
    let stats = cached_engine.kv_stats().await.expect("stats");
    assert_eq!((stats.pinned, stats.used), (0, 0), "{stats:?}");
    assert_eq!(stats.cached, 2 + 3, "{stats:?}");

    let from_cache = run(&cached_engine, prompt, vec![span]).await;
    assert_eq!(from_cache.modular_tokens, 48 - 2);
    assert_same_outcome(&device, &from_cache, &from_pins);
}

async fn a_copy_that_cannot_fit_beside_its_source_is_computed_in_context(device: EngineDevice) {
    // 16 blocks: the cached first skill (2 blocks) and second skill (10 blocks) leave 4 free,
    // but the prompt needs 11 more (the copy of the second skill and the question). Reading
    // the source while writing its copy cannot fit; computing the segment can, by evicting it.
    let engine = engine_with_blocks(&device, "cache-tight", 16);
    let first = tokens(32, 8);
    let second = tokens(160, 9);
    cache(&engine, &first).await;
    cache(&engine, &second).await;
    let prompt: Vec<u32> = [first.as_slice(), &second, &tokens(8, 10)].concat();
    let span = ModularSpan {
        start: first.len(),
        len: second.len(),
        recompute: 0,
    };
    let modular = run(&engine, prompt.clone(), vec![span]).await;
    assert_eq!(modular.modular_tokens, 0);
    assert_eq!(modular.started_cached, 32);
    let exact = run(&engine, prompt, Vec::new()).await;
    assert_same_generation(&device, &modular, &exact);
}

async fn a_fully_cached_prompt_recomputes_its_last_token_in_a_private_copy(device: EngineDevice) {
    let engine = engine(&device, "copy-on-write");
    // Three full blocks: the second request finds all of them cached, copies the last one
    // (copy-on-write) and recomputes its last token into the copy.
    let prompt = tokens(48, 11);
    let first = run(&engine, prompt.clone(), Vec::new()).await;
    assert_eq!(first.started_cached, 0);
    let second = run(&engine, prompt.clone(), Vec::new()).await;
    assert_eq!(second.started_cached, 47);
    assert_same_generation(&device, &second, &first);
    // The shared block was only read: a third request sees the same.
    let third = run(&engine, prompt, Vec::new()).await;
    assert_same_outcome(&device, &third, &second);
    let stats = engine.kv_stats().await.expect("stats");
    assert_eq!(stats.used, 0, "{stats:?}");
}

async fn exported_kv_imported_into_another_engine_serves_the_same_tokens(device: EngineDevice) {
    let skill = tokens(40, 12);
    let prompt: Vec<u32> = [skill.as_slice(), &tokens(6, 13)].concat();
    let source = engine(&device, "export");
    let pinned = pin(&source, &skill).await;
    let kv = source.export_pin(pinned.id).await.expect("exports");
    assert_eq!(kv.blocks, 2);
    let expected = run(&source, prompt.clone(), Vec::new()).await;

    let target = engine(&device, "import");
    let imported = target
        .import_pinned(skill.clone(), None, kv.clone())
        .await
        .expect("imports");
    assert_eq!(imported.pinned_tokens, 32);
    assert_eq!(target.export_pin(imported.id).await, Some(kv));
    let served = run(&target, prompt, Vec::new()).await;
    assert_eq!(served.started_cached, 32);
    assert_same_generation(&device, &served, &expected);
}
