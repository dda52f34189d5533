//! Shared helpers of the model tests: where the real model is, and running a sequence through
//! the model in chunks over a paged KV pool.
#![allow(dead_code)]

use std::path::PathBuf;

use skillkv_daemon::engine::batch::{BLOCK_SIZE, BlockId, ForwardBatch, SeqChunk};
use skillkv_daemon::engine::kv_pool::KvPool;
use skillkv_daemon::engine::model::LlamaModel;

/// The real default model: `$SKILLKV_MODEL`, else the `make model` location. Fails the test with
/// instructions when the file is absent.
pub fn real_model_path() -> PathBuf {
    let path = std::env::var_os("SKILLKV_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_default();
            home.join(".cache/skillkv/models/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    assert!(
        path.is_file(),
        "real model not found at {}: run `make model` (or set SKILLKV_MODEL)",
        path.display()
    );
    path
}

/// Runs `tokens` from position 0 in chunks of the given sizes (the last chunk takes the rest),
/// using `blocks` as the block table, and returns the last token's logits.
pub fn prefill_in_chunks(
    model: &LlamaModel,
    pool: &mut KvPool,
    tokens: &[u32],
    chunk_sizes: &[usize],
    blocks: &[BlockId],
) -> Vec<f32> {
    let mut start = 0;
    let mut sizes = chunk_sizes.iter().copied();
    let mut logits = Vec::new();
    while start < tokens.len() {
        let len = sizes
            .next()
            .unwrap_or(tokens.len() - start)
            .min(tokens.len() - start);
        let batch = ForwardBatch {
            chunks: vec![SeqChunk {
                tokens: &tokens[start..start + len],
                start_pos: start,
                block_table: blocks,
                want_logits: true,
            }],
        };
        let output = model.forward(&batch, pool).expect("forward pass");
        logits = output.logits.into_iter().next().expect("logits");
        start += len;
    }
    logits
}

/// Index of the largest logit (greedy token).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (index, value) in logits.iter().enumerate() {
        if *value > logits[best] {
            best = index;
        }
    }
    best as u32
}

/// Greedy continuation of `prompt` by `steps` tokens, one decode step at a time.
pub fn greedy(
    model: &LlamaModel,
    pool: &mut KvPool,
    prompt: &[u32],
    steps: usize,
    blocks: &[BlockId],
) -> Vec<u32> {
    let mut logits = prefill_in_chunks(model, pool, prompt, &[prompt.len()], blocks);
    let mut generated = Vec::with_capacity(steps);
    for step in 0..steps {
        let token = argmax(&logits);
        generated.push(token);
        if step + 1 == steps {
            break;
        }
        let position = prompt.len() + step;
        let batch = ForwardBatch {
            chunks: vec![SeqChunk {
                tokens: std::slice::from_ref(&token),
                start_pos: position,
                block_table: blocks,
                want_logits: true,
            }],
        };
        logits = model
            .forward(&batch, pool)
            .expect("decode step")
            .logits
            .remove(0);
    }
    generated
}

/// Block ids `first, first+1, …` enough for `positions` tokens.
pub fn contiguous_blocks(first: BlockId, positions: usize) -> Vec<BlockId> {
    (0..positions.div_ceil(BLOCK_SIZE) as BlockId)
        .map(|i| first + i)
        .collect()
}

/// Largest absolute difference between two logit vectors.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// `KL(p ‖ q)` in nats of the softmax distributions of two logit rows.
pub fn kl_divergence(p_logits: &[f32], q_logits: &[f32]) -> f64 {
    let log_softmax = |logits: &[f32]| {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
        let log_sum = sum.ln();
        logits
            .iter()
            .map(|&l| f64::from(l - max) - log_sum)
            .collect::<Vec<f64>>()
    };
    let (p, q) = (log_softmax(p_logits), log_softmax(q_logits));
    p.iter().zip(&q).map(|(lp, lq)| lp.exp() * (lp - lq)).sum()
}
