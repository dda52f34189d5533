//! The engine with real forward passes: a tiny synthetic GGUF for the mechanics (batching,
//! chunking, reuse, preemption) and the real default model for behaviour (64 greedy tokens
//! identical, and every step's top log-probabilities within 1e-4, with the prefix cached or
//! recomputed; batched or alone; stop strings).

mod engine_support;
mod model_support;

use std::path::PathBuf;
use std::sync::Arc;

use engine_support::{Collected, collect, greedy, greedy_with_logprobs, prompt};
use skillkv_api::block_hash::BLOCK_TOKENS;
use skillkv_daemon::engine::handle::{
    Engine, EngineConfig, EngineHandle, FinishReason, KvCacheSize,
};
use skillkv_daemon::engine::model::{LlamaModel, LoadOptions};
use skillkv_daemon::engine::testing::{TinyModelSpec, write_tiny_gguf};
use skillkv_daemon::engine::tokenizer::GgufTokenizer;

/// A loaded model with its tokenizer (the tiny model has none).
struct Loaded {
    model: Arc<LlamaModel>,
    tokenizer: Option<Arc<GgufTokenizer>>,
    vocab: usize,
}

impl Loaded {
    fn engine(&self, config: EngineConfig) -> EngineHandle {
        Engine::start(self.model.clone(), self.tokenizer.clone(), config).expect("engine starts")
    }

    async fn alone(&self, prompt: &[u32], max_tokens: usize) -> Vec<u32> {
        let engine = self.engine(EngineConfig::default());
        let out = collect(
            engine
                .submit(greedy("alone", prompt.to_vec(), max_tokens))
                .expect("submit"),
        )
        .await;
        assert_eq!(out.reason, Some(FinishReason::Length), "{out:?}");
        engine.shutdown().await;
        out.tokens
    }
}

fn tiny() -> Loaded {
    let path: PathBuf =
        std::env::temp_dir().join(format!("skillkv-engine-tiny-{}.gguf", std::process::id()));
    write_tiny_gguf(&path, &TinyModelSpec::default()).expect("write tiny gguf");
    let loaded = LlamaModel::load(&path, &LoadOptions::default()).expect("load tiny gguf");
    let _ = std::fs::remove_file(&path);
    Loaded {
        vocab: loaded.config.vocab,
        model: Arc::new(loaded.model),
        tokenizer: None,
    }
}

fn real() -> Loaded {
    let path = model_support::real_model_path();
    let loaded = LlamaModel::load(
        &path,
        &LoadOptions {
            max_context: Some(2048),
            ..LoadOptions::default()
        },
    )
    .expect("load the real model");
    let tokenizer = GgufTokenizer::from_gguf(&loaded.gguf).expect("tokenizer from gguf");
    Loaded {
        vocab: loaded.config.vocab,
        model: Arc::new(loaded.model),
        tokenizer: Some(Arc::new(tokenizer)),
    }
}

fn encode(loaded: &Loaded, text: &str) -> Vec<u32> {
    loaded
        .tokenizer
        .as_ref()
        .expect("real model has a tokenizer")
        .encode(text)
        .expect("encode")
}

/// Prompts sharing a cached `base` prefix: mid-block, on a block boundary, and the full hit.
fn reuse_cases(base: &[u32], tail_a: &[u32], tail_b: &[u32]) -> Vec<(&'static str, Vec<u32>)> {
    let boundary = base.len() / BLOCK_TOKENS * BLOCK_TOKENS;
    vec![
        ("mid-block", [&base[..boundary - 5], tail_a].concat()),
        (
            "block boundary",
            [&base[..boundary - BLOCK_TOKENS], tail_b].concat(),
        ),
        ("full hit", base[..boundary].to_vec()),
    ]
}

/// Log-probabilities of the top alternatives reported with every token.
const TOP_LOGPROBS: usize = 5;
/// Largest difference allowed between cached and recomputed log-probabilities (f32 KV).
const LOGIT_TOLERANCE: f32 = 1e-4;

/// Same tokens, and at every step the same top alternatives with log-probabilities (logits up
/// to the normaliser) within [`LOGIT_TOLERANCE`].
fn assert_same_distributions(name: &str, warm: &Collected, cold: &Collected) {
    assert_eq!(
        warm.tokens, cold.tokens,
        "{name}: greedy tokens differ with the prefix cached"
    );
    assert_eq!(warm.top_logprobs.len(), cold.top_logprobs.len(), "{name}");
    for (step, (warm_top, cold_top)) in warm.top_logprobs.iter().zip(&cold.top_logprobs).enumerate()
    {
        assert_eq!(warm_top.len(), TOP_LOGPROBS, "{name}: step {step}");
        for ((warm_id, warm_lp), (cold_id, cold_lp)) in warm_top.iter().zip(cold_top) {
            assert_eq!(
                warm_id, cold_id,
                "{name}: step {step}: {warm_top:?} vs {cold_top:?}"
            );
            assert!(
                (warm_lp - cold_lp).abs() <= LOGIT_TOLERANCE,
                "{name}: step {step}: logprob {warm_lp} cached vs {cold_lp} recomputed"
            );
        }
    }
}

async fn assert_reuse_equals_recompute(
    loaded: &Loaded,
    base: Vec<u32>,
    tail_a: Vec<u32>,
    tail_b: Vec<u32>,
) {
    for (name, second) in reuse_cases(&base, &tail_a, &tail_b) {
        let fresh = loaded.engine(EngineConfig::default());
        let cold = collect(
            fresh
                .submit(greedy_with_logprobs(
                    "cold",
                    second.clone(),
                    64,
                    TOP_LOGPROBS,
                ))
                .expect("submit"),
        )
        .await;
        fresh.shutdown().await;
        assert_eq!(cold.cached_tokens, Some(0), "{name}: {cold:?}");
        let engine = loaded.engine(EngineConfig::default());
        collect(
            engine
                .submit(greedy("warm-up", base.clone(), 2))
                .expect("submit"),
        )
        .await;
        let warm = collect(
            engine
                .submit(greedy_with_logprobs(
                    "warm",
                    second.clone(),
                    64,
                    TOP_LOGPROBS,
                ))
                .expect("submit"),
        )
        .await;
        assert!(
            warm.cached_tokens
                .is_some_and(|cached| cached >= BLOCK_TOKENS),
            "{name}: {warm:?}"
        );
        assert_eq!(warm.tokens.len(), 64, "{name}");
        assert_same_distributions(name, &warm, &cold);
        engine.shutdown().await;
    }
}

async fn assert_batching_equals_sequential(
    loaded: &Loaded,
    prompts: Vec<Vec<u32>>,
    max_tokens: &[usize],
) {
    let mut expected = Vec::new();
    for (prompt, &n) in prompts.iter().zip(max_tokens) {
        expected.push(loaded.alone(prompt, n).await);
    }
    let engine = loaded.engine(EngineConfig {
        max_seqs: 6,
        max_batch_tokens: 96,
        ..EngineConfig::default()
    });
    let mut handles = Vec::new();
    for (i, (prompt, &n)) in prompts.into_iter().zip(max_tokens).enumerate() {
        let stream = engine
            .submit(greedy(&format!("b{i}"), prompt, n))
            .expect("submit");
        handles.push(tokio::spawn(collect(stream)));
    }
    for (i, (handle, expected)) in handles.into_iter().zip(expected).enumerate() {
        assert_eq!(
            handle.await.expect("collector").tokens,
            expected,
            "prompt {i}"
        );
    }
    let stats = engine.kv_stats().await.expect("running");
    assert_eq!(stats.used, 0, "{stats:?}");
    engine.shutdown().await;
}

#[tokio::test]
async fn tiny_model_reuse_equals_recompute() {
    let loaded = tiny();
    let base = prompt(3 * BLOCK_TOKENS + 7, 1, loaded.vocab);
    assert_reuse_equals_recompute(
        &loaded,
        base,
        prompt(11, 2, loaded.vocab),
        prompt(9, 3, loaded.vocab),
    )
    .await;
}

#[tokio::test]
async fn tiny_model_batching_equals_sequential() {
    let loaded = tiny();
    let prompts = (0..8)
        .map(|i| prompt(3 + 17 * i, i as u32, loaded.vocab))
        .collect();
    assert_batching_equals_sequential(&loaded, prompts, &[5, 40, 12, 64, 3, 30, 50, 20]).await;
}

#[tokio::test]
async fn tiny_model_preemption_keeps_outputs_identical() {
    let loaded = tiny();
    let prompts: Vec<Vec<u32>> = (0..4).map(|i| prompt(40, 50 + i, loaded.vocab)).collect();
    let mut expected = Vec::new();
    for prompt in &prompts {
        expected.push(loaded.alone(prompt, 40).await);
    }
    let engine = loaded.engine(EngineConfig {
        kv_cache: KvCacheSize::Blocks(12),
        ..EngineConfig::default()
    });
    let mut handles = Vec::new();
    for (i, prompt) in prompts.into_iter().enumerate() {
        let stream = engine
            .submit(greedy(&format!("p{i}"), prompt, 40))
            .expect("submit");
        handles.push(tokio::spawn(collect(stream)));
    }
    for (handle, expected) in handles.into_iter().zip(expected) {
        assert_eq!(handle.await.expect("collector").tokens, expected);
    }
    let stats = engine.stats().await.expect("running");
    assert!(stats.preemptions > 0, "{stats:?}");
    assert_eq!(stats.kv.used, 0, "{stats:?}");
}

const PASSAGE: &str = "The lighthouse keeper climbed the spiral stairs every evening at dusk. \
He trimmed the wick, polished the great lens, and wrote the weather in a leather logbook. \
Ships passing in the night never saw him, but they trusted the beam that swept the rocks.";

#[tokio::test]
async fn real_model_reuse_equals_recompute() {
    let loaded = real();
    let base = encode(&loaded, PASSAGE);
    assert!(
        base.len() >= 3 * BLOCK_TOKENS,
        "passage too short: {}",
        base.len()
    );
    let tail_a = encode(&loaded, " What did the keeper write down?");
    let tail_b = encode(&loaded, " Describe the lens.");
    assert_reuse_equals_recompute(&loaded, base, tail_a, tail_b).await;
}

#[tokio::test]
async fn real_model_batching_equals_sequential() {
    let loaded = real();
    let texts = [
        "Write a haiku about autumn.",
        "List three prime numbers:",
        PASSAGE,
        "Translate 'good morning' into French.",
        "The capital of Italy is",
        "def fibonacci(n):",
        "Once upon a time, in a quiet village,",
        "Explain photosynthesis to a child.",
    ];
    let prompts = texts.iter().map(|text| encode(&loaded, text)).collect();
    assert_batching_equals_sequential(&loaded, prompts, &[16, 24, 8, 32, 12, 20, 28, 4]).await;
}

#[tokio::test]
async fn real_model_stop_strings_end_generation_before_the_match() {
    let loaded = real();
    let engine = loaded.engine(EngineConfig::default());
    let prompt = encode(&loaded, "Once upon a time, in a quiet village,");
    let full = collect(
        engine
            .submit(greedy("full", prompt.clone(), 32))
            .expect("submit"),
    )
    .await;
    // A stop string taken from the middle of the greedy output (it may span tokens).
    let chars: Vec<char> = full.text.chars().collect();
    assert!(chars.len() > 20, "{full:?}");
    let start = chars.len() / 2;
    let stop: String = chars[start..start + 4].iter().collect();
    let cut = full
        .text
        .find(&stop)
        .expect("the stop string is in the text");
    let mut request = greedy("stopped", prompt, 32);
    request.sampling.stop = vec![stop.clone()];
    let stopped = collect(engine.submit(request).expect("submit")).await;
    assert_eq!(stopped.reason, Some(FinishReason::Stop), "{stopped:?}");
    assert_eq!(stopped.text, full.text[..cut], "stop string {stop:?}");
    assert!(stopped.tokens.len() < full.tokens.len());
}
