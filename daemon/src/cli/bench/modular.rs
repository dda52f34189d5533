//! `skillkv bench modular`: the quality of modular skill assembly against exact assembly on a
//! real model. Every skill of a folder is prefilled and pinned; each prompt is a combination of
//! 2–3 skills (canonical order) plus a question, generated greedily twice — exact (radix prefix
//! reuse, bit-exact) and modular (later skills copied from their own KV, K re-rotated), once per
//! `--recompute` setting. Per prompt it compares the greedy tokens and the next-token
//! distribution at the first generated position, and prints one table row per setting.
//!
//! Agreement over `--tokens` greedy tokens is reported two ways: the *prefix agreement* (tokens
//! equal before the first divergence; everything after a divergence continues a different text)
//! and the *exact-match rate* (prompts whose whole continuation is identical). KL is
//! `KL(P_exact ‖ P_modular)` in nats over the full vocabulary, from the logits the model
//! returned for the prompt's last token.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use clap::Args;

use crate::cli::bench::percentile;
use crate::cli::serve::default_model_path;
use crate::engine::batch::{ForwardBatch, ForwardOutput};
use crate::engine::chat_template::{ChatMessage, ChatTemplate};
use crate::engine::gguf::ModelConfig;
use crate::engine::handle::PinRequest;
use crate::engine::kv_pool::KvPool;
use crate::engine::model::{LlamaModel, LoadOptions};
use crate::engine::sampling::SamplingParams;
use crate::engine::tokenizer::GgufTokenizer;
use crate::engine::{
    Engine, EngineConfig, EngineHandle, ForwardModel, GenerateRequest, GenerationEvent,
    KvCacheSize, ModularSpan,
};
use crate::skills::{assemble_chat, load_skill_dir, tokenize_skill};

/// `skillkv bench modular` flags.
#[derive(Debug, Args)]
pub struct BenchModularArgs {
    /// GGUF model [default: $SKILLKV_MODEL, else the default model].
    #[arg(long, env = "SKILLKV_MODEL")]
    pub model: Option<PathBuf>,
    /// Skills folder (`NAME/SKILL.md`).
    #[arg(long, default_value = "skills")]
    pub skills: PathBuf,
    /// Prompts compared.
    #[arg(long, default_value_t = 50)]
    pub prompts: usize,
    /// Greedy tokens generated per prompt and mode.
    #[arg(long, default_value_t = 32)]
    pub tokens: usize,
    /// Most skills per prompt (2 or more; combinations of 2 up to this many).
    #[arg(long, default_value_t = 3)]
    pub max_skills: usize,
    /// Leading tokens of each copied skill recomputed in context; one table row per value.
    #[arg(long, value_delimiter = ',', default_value = "0,16")]
    pub recompute: Vec<usize>,
    /// KV cache budget in bytes.
    #[arg(long, default_value_t = 2 * 1024 * 1024 * 1024)]
    pub kv_cache_bytes: usize,
}

/// Varied questions, cycled against the skill combinations.
const QUESTIONS: [&str; 25] = [
    "Where do I start?",
    "The p99 latency doubled after the last release. What do I check first?",
    "Explain what a KV cache block is in two sentences.",
    "Our service crashes only under load. How would you narrow it down?",
    "What is the difference between throughput and latency?",
    "Give me three numbers to look at before changing any code.",
    "How many tokens of context fit into 12 GB of GPU memory for a small model?",
    "Why would prefix caching make the first token faster?",
    "Write a one-line summary of your approach.",
    "A test fails once in fifty runs. What now?",
    "Should I profile on my laptop or in production?",
    "What does eviction of the least recently used leaf mean?",
    "Memory grows slowly until the pod is killed. Ideas?",
    "List the steps of a bisection.",
    "Is batching always faster? Answer briefly.",
    "How do I tell a CPU-bound from a memory-bound kernel?",
    "What would you log to debug a race between two requests?",
    "Explain paged attention to a new engineer.",
    "Which metric would convince you a fix worked?",
    "Summarise the most important rule you follow.",
    "What is a good first question to ask the reporter of a bug?",
    "Why can reading a cache be slower than recomputing?",
    "Name one common mistake when measuring performance.",
    "How should blocks be shared between two sequences with the same prefix?",
    "Answer in one word: cache or recompute?",
];

/// The model with a tap on its output: the first logits row since the last [`Self::take`].
#[derive(Debug)]
struct LogitTap<M> {
    inner: M,
    first: Mutex<Option<Vec<f32>>>,
}

impl<M> LogitTap<M> {
    fn take(&self) -> Option<Vec<f32>> {
        self.first
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }
}

impl<M: ForwardModel> ForwardModel for LogitTap<M> {
    type Error = M::Error;

    fn config(&self) -> &ModelConfig {
        self.inner.config()
    }

    fn new_pool(&self, num_blocks: usize) -> Result<KvPool, Self::Error> {
        self.inner.new_pool(num_blocks)
    }

    fn forward(
        &self,
        batch: &ForwardBatch<'_>,
        kv: &mut KvPool,
    ) -> Result<ForwardOutput, Self::Error> {
        let output = self.inner.forward(batch, kv)?;
        if let Some(row) = output.logits.first() {
            let mut first = self
                .first
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            first.get_or_insert_with(|| row.clone());
        }
        Ok(output)
    }
}

/// One greedy generation: its tokens and the logits of its first position.
struct Greedy {
    tokens: Vec<u32>,
    first_logits: Vec<f32>,
    modular_tokens: usize,
}

fn generate(
    engine: &EngineHandle,
    tap: &LogitTap<LlamaModel>,
    prompt: Vec<u32>,
    spans: Vec<ModularSpan>,
    tokens: usize,
) -> anyhow::Result<Greedy> {
    tap.take();
    let mut stream = engine.submit_assembled(
        GenerateRequest {
            request_id: "bench-modular".to_string(),
            prompt_tokens: prompt,
            sampling: SamplingParams {
                max_tokens: tokens,
                ignore_eos: true,
                ..SamplingParams::greedy()
            },
            adapter: None,
        },
        spans,
    )?;
    let mut out = Greedy {
        tokens: Vec::new(),
        first_logits: Vec::new(),
        modular_tokens: 0,
    };
    while let Some(event) = stream.blocking_recv() {
        match event {
            GenerationEvent::Started { modular_tokens, .. } => out.modular_tokens = modular_tokens,
            GenerationEvent::Token { id, .. } => out.tokens.push(id),
            GenerationEvent::Finished { .. } => break,
            GenerationEvent::Failed(error) => return Err(error.into()),
        }
    }
    out.first_logits = tap
        .take()
        .ok_or_else(|| anyhow::anyhow!("the model returned no logits"))?;
    Ok(out)
}

/// `KL(P ‖ Q)` in nats of the softmax distributions of two logit rows.
pub fn kl_divergence(p_logits: &[f32], q_logits: &[f32]) -> f64 {
    let log_softmax = |logits: &[f32]| {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let sum: f64 = logits.iter().map(|&x| (x as f64 - max).exp()).sum();
        let log_sum = sum.ln() + max;
        logits
            .iter()
            .map(|&x| x as f64 - log_sum)
            .collect::<Vec<f64>>()
    };
    let (log_p, log_q) = (log_softmax(p_logits), log_softmax(q_logits));
    log_p
        .iter()
        .zip(&log_q)
        .map(|(lp, lq)| lp.exp() * (lp - lq))
        .sum::<f64>()
        .max(0.0)
}

/// Tokens equal before the first divergence.
pub fn prefix_agreement(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// The combinations of 2 ..= `max` of `n` items, in canonical (index) order.
fn combinations(n: usize, max: usize) -> Vec<Vec<usize>> {
    let mut all = Vec::new();
    for mask in 1u32..(1 << n) {
        let combo: Vec<usize> = (0..n).filter(|i| mask & (1 << i) != 0).collect();
        if (2..=max).contains(&combo.len()) {
            all.push(combo);
        }
    }
    all.sort_by_key(|combo| (combo.len(), combo.clone()));
    all
}

/// The figures of one modular setting against exact.
#[derive(Debug, Default)]
struct Figures {
    prefix: Vec<f64>,
    exact_match: usize,
    positions_equal: Vec<f64>,
    kl: Vec<f64>,
    copied: usize,
    seconds: f64,
}

/// Runs `skillkv bench modular`.
pub fn run(args: &BenchModularArgs) -> anyhow::Result<()> {
    let path = match &args.model {
        Some(path) => path.clone(),
        None => default_model_path().ok_or_else(|| anyhow::anyhow!("no --model and no $HOME"))?,
    };
    let documents: Vec<_> = load_skill_dir(&args.skills)?.into_iter().collect();
    anyhow::ensure!(
        documents.len() >= 2,
        "modular assembly needs at least 2 skills in {}",
        args.skills.display()
    );
    let loaded = LlamaModel::load(&path, &LoadOptions::default())?;
    let tokenizer = Arc::new(GgufTokenizer::from_gguf(&loaded.gguf)?);
    let template = ChatTemplate::from_gguf(&loaded.gguf)?;
    let tap = Arc::new(LogitTap {
        inner: loaded.model,
        first: Mutex::new(None),
    });
    let engine = Engine::start(
        tap.clone(),
        Some(tokenizer.clone()),
        EngineConfig {
            kv_cache: KvCacheSize::Bytes(args.kv_cache_bytes),
            ..EngineConfig::default()
        },
    )?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let started = Instant::now();
    for (name, document) in &documents {
        let tokens = tokenize_skill(&template, &tokenizer, &document.text)?.tokens;
        let count = tokens.len();
        runtime.block_on(engine.pin(PinRequest {
            tokens,
            adapter: None,
        }))?;
        println!("pinned {name}: {count} tokens");
    }
    println!(
        "skills prefilled in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    let combos = combinations(documents.len(), args.max_skills.max(2));
    let mut exact_seconds = 0.0;
    let mut figures: Vec<Figures> = args.recompute.iter().map(|_| Figures::default()).collect();
    for index in 0..args.prompts {
        let combo = &combos[index % combos.len()];
        let question = QUESTIONS[index % QUESTIONS.len()];
        let texts: Vec<&str> = combo
            .iter()
            .map(|&skill| documents[skill].1.text.as_str())
            .collect();
        let prompt = assemble_chat(
            &template,
            &tokenizer,
            &texts,
            &[ChatMessage::new("user", question)],
        )?;
        let clock = Instant::now();
        let exact = generate(
            &engine,
            &tap,
            prompt.tokens.clone(),
            Vec::new(),
            args.tokens,
        )?;
        exact_seconds += clock.elapsed().as_secs_f64();
        for (&recompute, figure) in args.recompute.iter().zip(&mut figures) {
            let spans = prompt
                .skill_spans
                .iter()
                .skip(1)
                .map(|span| ModularSpan {
                    start: span.start,
                    len: span.len(),
                    recompute,
                })
                .collect();
            let clock = Instant::now();
            let modular = generate(&engine, &tap, prompt.tokens.clone(), spans, args.tokens)?;
            figure.seconds += clock.elapsed().as_secs_f64();
            let agreed = prefix_agreement(&exact.tokens, &modular.tokens);
            let length = exact.tokens.len().max(1);
            figure.prefix.push(agreed as f64);
            figure.exact_match += usize::from(agreed == exact.tokens.len());
            let equal = exact
                .tokens
                .iter()
                .zip(&modular.tokens)
                .filter(|(a, b)| a == b)
                .count();
            figure.positions_equal.push(equal as f64 / length as f64);
            figure
                .kl
                .push(kl_divergence(&exact.first_logits, &modular.first_logits));
            figure.copied += modular.modular_tokens;
        }
        eprintln!(
            "prompt {}/{}: {} skills, {} tokens",
            index + 1,
            args.prompts,
            combo.len(),
            prompt.tokens.len()
        );
    }
    print_table(args, &combos, &figures, exact_seconds);
    Ok(())
}

fn print_table(args: &BenchModularArgs, combos: &[Vec<usize>], figures: &[Figures], exact: f64) {
    let prompts = args.prompts.max(1) as f64;
    let mean = |values: &[f64]| values.iter().sum::<f64>() / values.len().max(1) as f64;
    println!(
        "\nmodular vs exact: {} prompts over {} skill combinations (2..={} skills), {} greedy tokens",
        args.prompts,
        combos.len(),
        args.max_skills.max(2),
        args.tokens
    );
    println!(
        "exact: {:.2}s per prompt (combinations cached lazily)",
        exact / prompts
    );
    println!(
        "| recompute | copied tok/prompt | prefix agreement (tokens) | exact match | positions equal | KL mean | KL p50 | KL max | s/prompt |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (recompute, figure) in args.recompute.iter().zip(figures) {
        println!(
            "| {recompute} | {:.0} | {:.1} / {} | {:.0}% | {:.0}% | {:.4} | {:.4} | {:.4} | {:.2} |",
            figure.copied as f64 / prompts,
            mean(&figure.prefix),
            args.tokens,
            100.0 * figure.exact_match as f64 / prompts,
            100.0 * mean(&figure.positions_equal),
            mean(&figure.kl),
            percentile(&figure.kl, 0.5),
            figure.kl.iter().copied().fold(0.0, f64::max),
            figure.seconds / prompts
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kl_is_zero_for_equal_rows_and_positive_otherwise() {
        let p = [1.0, 2.0, 3.0];
        assert!(kl_divergence(&p, &p).abs() < 1e-12);
        // Shifting every logit leaves the distribution unchanged.
        assert!(kl_divergence(&p, &[11.0, 12.0, 13.0]).abs() < 1e-9);
        let kl = kl_divergence(&[0.0, 0.0], &[0.0, 2.0f32.ln()]);
        // P = (1/2, 1/2), Q = (1/3, 2/3): KL = 1/2 ln(3/2) + 1/2 ln(3/4).
        let expected = 0.5 * (1.5f64).ln() + 0.5 * (0.75f64).ln();
        assert!((kl - expected).abs() < 1e-6, "{kl} vs {expected}");
    }

    #[test]
    fn prefix_agreement_stops_at_the_first_difference() {
        assert_eq!(prefix_agreement(&[1, 2, 3], &[1, 2, 3]), 3);
        assert_eq!(prefix_agreement(&[1, 2, 3], &[1, 9, 3]), 1);
        assert_eq!(prefix_agreement(&[], &[1]), 0);
    }

    #[test]
    fn combinations_are_canonical_and_sized() {
        assert_eq!(
            combinations(3, 3),
            vec![vec![0, 1], vec![0, 2], vec![1, 2], vec![0, 1, 2]]
        );
        assert_eq!(combinations(3, 2).len(), 3);
    }
}
