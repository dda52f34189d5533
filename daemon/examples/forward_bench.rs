//! Forward-pass throughput of the engine's model on the real default model: prefill tok/s of a
//! long prompt in scheduler-sized chunks, and greedy decode tok/s at several stream counts (all
//! streams decoded together in one batch per step). The token ids match
//! `bench/llama_cpp_bench.py` so the two can be compared in one run:
//!
//! ```text
//! cargo run --release -p skillkv-daemon --example forward_bench
//! /tmp/llamacpp-venv/bin/python bench/llama_cpp_bench.py
//! ```

use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use skillkv_daemon::engine::batch::{BLOCK_SIZE, BlockId, ForwardBatch, SeqChunk};
use skillkv_daemon::engine::kv_pool::KvPool;
use skillkv_daemon::engine::model::{LlamaModel, LoadOptions};

#[derive(Debug, Parser)]
struct Args {
    /// GGUF model (default: $SKILLKV_MODEL, then the `make model` location).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Prompt length of the prefill measurement.
    #[arg(long, default_value_t = 2000)]
    prefill_tokens: usize,
    /// Tokens per prefill chunk (the scheduler's maxBatchTokens).
    #[arg(long, default_value_t = 512)]
    chunk: usize,
    /// Stream counts of the decode measurements.
    #[arg(long, value_delimiter = ',', default_value = "1,4,8,16")]
    streams: Vec<usize>,
    /// Prompt length of every decode stream.
    #[arg(long, default_value_t = 128)]
    decode_prompt: usize,
    /// Decode steps measured.
    #[arg(long, default_value_t = 128)]
    decode_steps: usize,
    /// Best of this many runs.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
}

fn token_ids(count: usize, offset: usize) -> Vec<u32> {
    (0..count)
        .map(|i| (100 + ((i + offset) * 7919) % 20000) as u32)
        .collect()
}

fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (index, value) in logits.iter().enumerate() {
        if *value > logits[best] {
            best = index;
        }
    }
    best as u32
}

fn blocks_for(sequence: usize, positions: usize) -> Vec<BlockId> {
    let per_sequence = positions.div_ceil(BLOCK_SIZE);
    (0..per_sequence)
        .map(|i| (sequence * per_sequence + i) as BlockId)
        .collect()
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let path = args
        .model
        .or_else(|| std::env::var_os("SKILLKV_MODEL").map(PathBuf::from))
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_default();
            home.join(".cache/skillkv/models/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    let started = Instant::now();
    let loaded = LlamaModel::load(&path, &LoadOptions::default())?;
    println!(
        "loaded {} in {:.2}s",
        path.display(),
        started.elapsed().as_secs_f64()
    );
    let model = &loaded.model;

    let prompt = token_ids(args.prefill_tokens, 0);
    let blocks = blocks_for(0, prompt.len());
    let mut pool = KvPool::new(&loaded.config, blocks.len());
    let mut best = f64::MAX;
    for _ in 0..args.repeats {
        let started = Instant::now();
        for (index, chunk) in prompt.chunks(args.chunk.max(1)).enumerate() {
            let batch = ForwardBatch {
                chunks: vec![SeqChunk {
                    tokens: chunk,
                    start_pos: index * args.chunk.max(1),
                    block_table: &blocks,
                    want_logits: true,
                }],
            };
            model.forward(&batch, &mut pool)?;
        }
        best = best.min(started.elapsed().as_secs_f64());
    }
    println!(
        "prefill {:.1} tok/s ({} tokens in chunks of {})",
        args.prefill_tokens as f64 / best,
        args.prefill_tokens,
        args.chunk
    );

    for &streams in &args.streams {
        let positions = args.decode_prompt + args.decode_steps;
        let tables: Vec<Vec<BlockId>> = (0..streams).map(|s| blocks_for(s, positions)).collect();
        let mut pool = KvPool::new(&loaded.config, streams * tables[0].len());
        let mut best = f64::MAX;
        for _ in 0..args.repeats {
            let mut next = Vec::with_capacity(streams);
            for (stream, table) in tables.iter().enumerate() {
                let prompt = token_ids(args.decode_prompt, stream * 31);
                let batch = ForwardBatch {
                    chunks: vec![SeqChunk {
                        tokens: &prompt,
                        start_pos: 0,
                        block_table: table,
                        want_logits: true,
                    }],
                };
                next.push(argmax(&model.forward(&batch, &mut pool)?.logits[0]));
            }
            let started = Instant::now();
            for step in 0..args.decode_steps {
                let tokens = next.clone();
                let batch = ForwardBatch {
                    chunks: tokens
                        .iter()
                        .zip(&tables)
                        .map(|(token, table)| SeqChunk {
                            tokens: std::slice::from_ref(token),
                            start_pos: args.decode_prompt + step,
                            block_table: table,
                            want_logits: true,
                        })
                        .collect(),
                };
                let output = model.forward(&batch, &mut pool)?;
                next = output.logits.iter().map(|l| argmax(l)).collect();
            }
            best = best.min(started.elapsed().as_secs_f64());
        }
        let total = (streams * args.decode_steps) as f64;
        println!(
            "decode {streams:>2} streams: {:.1} tok/s aggregate, {:.1} tok/s per stream",
            total / best,
            args.decode_steps as f64 / best
        );
    }
    Ok(())
}
