//! `skillkv bench engine`: the engine's speed on the real model — prefill tok/s of a long prompt
//! in scheduler-sized chunks, greedy decode tok/s at several stream counts (all streams in one
//! batch per step), and the time to first token of a long prompt cold vs with its prefix cached
//! (through the scheduler, as a request sees it). Each figure is the median of `--repeats` runs.
//!
//! The token ids are those of `bench/llama_cpp_bench.py`, which runs llama.cpp on the same
//! workloads and this command in the same run and prints the ratios.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use clap::Args;
use serde::Serialize;

use crate::cli::bench::percentile;
use crate::cli::serve::default_model_path;
use crate::engine::batch::{BLOCK_SIZE, BlockId, ForwardBatch, SeqChunk};
use crate::engine::device::{DeviceRequest, select_device};
use crate::engine::model::{LlamaModel, LoadOptions};
use crate::engine::sampling::SamplingParams;
use crate::engine::{Engine, EngineConfig, GenerateRequest, GenerationEvent, KvCacheSize};

/// `skillkv bench engine` flags.
#[derive(Debug, Args)]
pub struct BenchEngineArgs {
    /// GGUF model [default: $SKILLKV_MODEL, else the default model].
    #[arg(long, env = "SKILLKV_MODEL")]
    pub model: Option<PathBuf>,
    /// Prompt length of the prefill and time-to-first-token measurements.
    #[arg(long, default_value_t = 2000)]
    pub prefill_tokens: usize,
    /// Tokens per prefill chunk (the scheduler's maxBatchTokens).
    #[arg(long, default_value_t = 512)]
    pub chunk: usize,
    /// Stream counts of the decode measurements.
    #[arg(long, value_delimiter = ',', default_value = "1,4,8,16")]
    pub streams: Vec<usize>,
    /// Prompt length of every decode stream.
    #[arg(long, default_value_t = 128)]
    pub decode_prompt: usize,
    /// Decode steps measured per run.
    #[arg(long, default_value_t = 64)]
    pub decode_steps: usize,
    /// Runs per figure; the median is reported.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Where the model runs: auto, cpu or cuda[:N] (see `skillkv serve --device`).
    #[arg(long, default_value = "auto")]
    pub device: DeviceRequest,
}

/// Decode throughput at one stream count.
#[derive(Debug, Serialize)]
pub struct DecodeFigure {
    /// Streams decoded together.
    pub streams: usize,
    /// Tokens per second over all streams.
    pub aggregate_tok_s: f64,
    /// Tokens per second of one stream.
    pub per_stream_tok_s: f64,
}

/// Everything `skillkv bench engine` measures.
#[derive(Debug, Serialize)]
pub struct EngineReport {
    /// The device the model ran on (`cpu` or the GPU's name).
    pub device: String,
    /// Threads of the CPU pool.
    pub threads: usize,
    /// Prompt length of the prefill and TTFT figures.
    pub prefill_tokens: usize,
    /// Prefill chunk size.
    pub chunk: usize,
    /// Prefill throughput.
    pub prefill_tok_s: f64,
    /// Decode throughput per stream count.
    pub decode: Vec<DecodeFigure>,
    /// Time to first token of a prompt nothing of which is cached.
    pub ttft_cold_ms: f64,
    /// Time to first token of the same prompt sent again (all full blocks but the last token
    /// reused).
    pub ttft_cached_ms: f64,
    /// Prompt tokens the cached request reused.
    pub cached_tokens: usize,
}

/// Deterministic prompt ids, as in `bench/llama_cpp_bench.py`.
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

fn median(values: &[f64]) -> f64 {
    percentile(values, 0.5)
}

/// Prefill tok/s of `args.prefill_tokens` tokens in chunks of `args.chunk`.
fn measure_prefill(model: &LlamaModel, args: &BenchEngineArgs) -> anyhow::Result<f64> {
    let chunk = args.chunk.max(1);
    let prompt = token_ids(args.prefill_tokens, 0);
    let blocks = blocks_for(0, prompt.len());
    let mut pool = model.new_pool(blocks.len())?;
    let mut rates = Vec::new();
    for _ in 0..args.repeats.max(1) {
        let started = Instant::now();
        for (index, tokens) in prompt.chunks(chunk).enumerate() {
            let batch = ForwardBatch {
                chunks: vec![SeqChunk {
                    tokens,
                    start_pos: index * chunk,
                    block_table: &blocks,
                    want_logits: true,
                }],
            };
            model.forward(&batch, &mut pool)?;
        }
        rates.push(prompt.len() as f64 / started.elapsed().as_secs_f64());
    }
    Ok(median(&rates))
}

/// Greedy decode throughput of `streams` sequences stepping together.
fn measure_decode(
    model: &LlamaModel,
    args: &BenchEngineArgs,
    streams: usize,
) -> anyhow::Result<DecodeFigure> {
    let positions = args.decode_prompt + args.decode_steps;
    let tables: Vec<Vec<BlockId>> = (0..streams).map(|s| blocks_for(s, positions)).collect();
    let mut pool = model.new_pool(streams * tables[0].len())?;
    let mut rates = Vec::new();
    for _ in 0..args.repeats.max(1) {
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
        rates.push((streams * args.decode_steps) as f64 / started.elapsed().as_secs_f64());
    }
    let aggregate = median(&rates);
    Ok(DecodeFigure {
        streams,
        aggregate_tok_s: aggregate,
        per_stream_tok_s: aggregate / streams as f64,
    })
}

/// Submits `prompt` for one token and returns (time to that token in ms, cached tokens).
fn time_to_first_token(
    engine: &crate::engine::EngineHandle,
    prompt: Vec<u32>,
) -> anyhow::Result<(f64, usize)> {
    let submitted = Instant::now();
    let mut stream = engine.submit(GenerateRequest {
        request_id: "bench-engine".to_string(),
        prompt_tokens: prompt,
        sampling: SamplingParams {
            max_tokens: 1,
            ignore_eos: true,
            ..SamplingParams::default()
        },
        adapter: None,
    })?;
    let mut first = None;
    while let Some(event) = stream.blocking_recv() {
        match event {
            GenerationEvent::Token { .. } if first.is_none() => {
                first = Some(submitted.elapsed().as_secs_f64() * 1e3);
            }
            GenerationEvent::Finished { cached_tokens, .. } => {
                let ttft = first.ok_or_else(|| anyhow::anyhow!("finished without a token"))?;
                return Ok((ttft, cached_tokens));
            }
            GenerationEvent::Failed(error) => return Err(anyhow::anyhow!(error)),
            _ => {}
        }
    }
    anyhow::bail!("the engine closed the stream without finishing")
}

/// Median TTFT (ms) of fresh prompts and of the same prompts sent again, and the cached tokens.
fn measure_ttft(
    model: Arc<LlamaModel>,
    args: &BenchEngineArgs,
) -> anyhow::Result<(f64, f64, usize)> {
    let repeats = args.repeats.max(1);
    let blocks_per_prompt = args.prefill_tokens.div_ceil(BLOCK_SIZE) + 1;
    let engine = Engine::start(
        model,
        None,
        EngineConfig {
            kv_cache: KvCacheSize::Blocks(blocks_per_prompt * (repeats + 1)),
            max_batch_tokens: args.chunk.max(16),
            ..EngineConfig::default()
        },
    )?;
    let (mut cold, mut cached, mut reused) = (Vec::new(), Vec::new(), 0);
    for repeat in 0..repeats {
        let prompt = token_ids(args.prefill_tokens, 1000 * (repeat + 1));
        let (ttft, _) = time_to_first_token(&engine, prompt.clone())?;
        cold.push(ttft);
        let (ttft, cached_tokens) = time_to_first_token(&engine, prompt)?;
        cached.push(ttft);
        reused = cached_tokens;
    }
    Ok((median(&cold), median(&cached), reused))
}

/// Runs `skillkv bench engine`.
pub fn run(args: &BenchEngineArgs) -> anyhow::Result<()> {
    let path = match &args.model {
        Some(path) => path.clone(),
        None => default_model_path().ok_or_else(|| anyhow::anyhow!("no --model and no $HOME"))?,
    };
    let started = Instant::now();
    let selected = select_device(args.device)?;
    let device = selected
        .info
        .name
        .clone()
        .unwrap_or_else(|| "cpu".to_string());
    let loaded = LlamaModel::load(
        &path,
        &LoadOptions {
            device: selected.device,
            ..LoadOptions::default()
        },
    )?;
    let model = Arc::new(loaded.model);
    let threads = candle_core::utils::barrier_pool().n_workers() + 1;
    if !args.json {
        println!(
            "loaded {} on {device} in {:.2}s; {threads} threads; medians of {} runs",
            path.display(),
            started.elapsed().as_secs_f64(),
            args.repeats.max(1)
        );
    }
    let prefill_tok_s = measure_prefill(&model, args)?;
    if !args.json {
        println!(
            "prefill: {prefill_tok_s:.1} tok/s ({} tokens in chunks of {})",
            args.prefill_tokens, args.chunk
        );
    }
    let mut decode = Vec::new();
    for &streams in &args.streams {
        let figure = measure_decode(&model, args, streams.max(1))?;
        if !args.json {
            println!(
                "decode {:>2} streams: {:.1} tok/s aggregate, {:.1} tok/s per stream",
                figure.streams, figure.aggregate_tok_s, figure.per_stream_tok_s
            );
        }
        decode.push(figure);
    }
    let (ttft_cold_ms, ttft_cached_ms, cached_tokens) = measure_ttft(model, args)?;
    let report = EngineReport {
        device: device.clone(),
        threads,
        prefill_tokens: args.prefill_tokens,
        chunk: args.chunk,
        prefill_tok_s,
        decode,
        ttft_cold_ms,
        ttft_cached_ms,
        cached_tokens,
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "ttft of a {}-token prompt: cold {:.1} ms, prefix cached {:.1} ms ({} tokens reused): {:.1}x faster",
            args.prefill_tokens,
            ttft_cold_ms,
            ttft_cached_ms,
            cached_tokens,
            ttft_cold_ms / ttft_cached_ms.max(1e-9)
        );
    }
    Ok(())
}
