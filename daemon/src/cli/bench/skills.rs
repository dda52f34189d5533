//! `skillkv bench skills`: the skills workload — each request uses 1–3 of S skills (Zipf) plus a
//! ~100-token question and a short answer — run twice in one process on the same model: on an
//! engine without prefix reuse (every request prefills its skills) and on one whose skills are
//! prefilled and pinned. Prints TTFT p50/p99 and requests/s of both and their ratios, then the
//! time from start to all-skills-Ready when prefilling vs when loading the node's KV store.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use skillkv_api::skills::SkillDocument;
use skillkv_api::v1alpha1::{Assembly, PlacementState};

use crate::cli::bench::percentile;
use crate::cli::serve::default_model_path;
use crate::cli::serve::parse_assembly;
use crate::engine::chat_template::ChatMessage;
use crate::engine::sampling::SamplingParams;
use crate::engine::{EngineConfig, GenerateRequest, GenerationEvent, KvCacheSize};
use crate::server::serving::{Serving, SkillsSettings};
use crate::skills::assembly::{DEFAULT_MODULAR_RECOMPUTE_TOKENS, modular_spans};
use crate::skills::{SkillUpdate, assemble_chat, load_skill_dir};

/// `skillkv bench skills` flags.
#[derive(Debug, Args)]
pub struct BenchSkillsArgs {
    /// GGUF model [default: $SKILLKV_MODEL, else the default model].
    #[arg(long, env = "SKILLKV_MODEL")]
    pub model: Option<PathBuf>,
    /// Skills folder (`NAME/SKILL.md`).
    #[arg(long, default_value = "skills")]
    pub skills: PathBuf,
    /// Requests per mode.
    #[arg(long, default_value_t = 12)]
    pub requests: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Tokens generated per request.
    #[arg(long, default_value_t = 8)]
    pub max_tokens: usize,
    /// Zipf exponent of skill popularity.
    #[arg(long, default_value_t = 1.1)]
    pub zipf: f64,
    /// Seed of the workload.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// KV cache budget in bytes.
    #[arg(long, default_value_t = 1024 * 1024 * 1024)]
    pub kv_cache_bytes: usize,
    /// Skip the start-to-Ready comparison with the node's KV store.
    #[arg(long)]
    pub no_store: bool,
    /// Assembly of the skills in the cache-on half: `exact` or `modular` (later skills copied
    /// from their own pinned KV; see docs/skills.md).
    #[arg(long, default_value = "exact", value_parser = parse_assembly)]
    pub assembly: Assembly,
    /// With `--assembly modular`: leading tokens of each copied skill recomputed in context.
    #[arg(long, default_value_t = DEFAULT_MODULAR_RECOMPUTE_TOKENS)]
    pub modular_recompute_tokens: usize,
}

/// One request of the workload.
#[derive(Debug, Clone)]
pub struct WorkItem {
    /// Indices of its skills (1–3, distinct, ascending).
    pub skills: Vec<usize>,
    /// The user's question (about 100 tokens).
    pub question: String,
}

const QUESTION_PARTS: [&str; 12] = [
    "We run a service on a small cluster and the latency doubled after the last release.",
    "The logs show nothing unusual, but the p99 went from 80 ms to 400 ms under the same load.",
    "Our KV cache uses blocks of sixteen tokens and we evict the least recently used leaves.",
    "Memory use grows slowly over a day until the pod is killed by the kernel.",
    "A benchmark on my laptop says one thing and the production dashboards say another.",
    "The crash only happens when two requests arrive within the same millisecond.",
    "I want to know how many tokens of context fit into twelve gigabytes of GPU memory.",
    "Profiling shows most of the time in a function that looks trivial.",
    "Please explain the steps you would take, in order, and what each one rules out.",
    "Keep the answer short and concrete; name the tool or the number you would look at first.",
    "We cannot reproduce it locally, only on the shared staging environment.",
    "What would you measure before changing any code at all?",
];

/// A deterministic workload: 1–3 distinct skills per request, by Zipf popularity, and a
/// question of about 100 tokens. (Also the workload of the router's benchmark.)
pub fn workload(skills: usize, requests: usize, zipf: f64, seed: u64) -> Vec<WorkItem> {
    let mut rng = StdRng::seed_from_u64(seed);
    let weights: Vec<f64> = (1..=skills)
        .map(|rank| 1.0 / (rank as f64).powf(zipf))
        .collect();
    let total: f64 = weights.iter().sum();
    (0..requests)
        .map(|_| {
            let count = rng.random_range(1..=3.min(skills));
            let mut chosen: Vec<usize> = Vec::new();
            while chosen.len() < count {
                let mut pick = rng.random::<f64>() * total;
                let skill = weights
                    .iter()
                    .position(|&weight| {
                        pick -= weight;
                        pick <= 0.0
                    })
                    .unwrap_or(skills - 1);
                if !chosen.contains(&skill) {
                    chosen.push(skill);
                }
            }
            chosen.sort_unstable();
            let question = (0..4)
                .map(|_| QUESTION_PARTS[rng.random_range(0..QUESTION_PARTS.len())])
                .collect::<Vec<_>>()
                .join(" ");
            WorkItem {
                skills: chosen,
                question,
            }
        })
        .collect()
}

/// What one mode measured.
#[derive(Debug)]
struct ModeResult {
    ttft: Vec<f64>,
    wall: Duration,
    cached_tokens: usize,
    prompt_tokens: usize,
}

impl ModeResult {
    fn requests_per_second(&self) -> f64 {
        self.ttft.len() as f64 / self.wall.as_secs_f64().max(1e-9)
    }
}

async fn run_mode(
    serving: &Serving,
    documents: &[SkillDocument],
    work: &[WorkItem],
    args: &BenchSkillsArgs,
    assembly: Assembly,
) -> anyhow::Result<ModeResult> {
    let semaphore = Arc::new(tokio::sync::Semaphore::new(args.concurrency.max(1)));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (index, item) in work.iter().enumerate() {
        let texts: Vec<&str> = item
            .skills
            .iter()
            .map(|&skill| documents[skill].text.as_str())
            .collect();
        let prompt = assemble_chat(
            &serving.template,
            &serving.tokenizer,
            &texts,
            &[ChatMessage::new("user", item.question.clone())],
        )?;
        let spans: Vec<_> = prompt
            .skill_spans
            .iter()
            .map(|span| (assembly, span.clone()))
            .collect();
        let modular = modular_spans(&spans, args.modular_recompute_tokens);
        let permit = semaphore.clone().acquire_owned().await?;
        let submitted = Instant::now();
        let request = GenerateRequest {
            request_id: format!("bench-{index}"),
            prompt_tokens: prompt.tokens,
            sampling: SamplingParams {
                max_tokens: args.max_tokens,
                ignore_eos: true,
                ..SamplingParams::default()
            },
            adapter: None,
        };
        let mut stream = serving.engine.submit_assembled(request, modular)?;
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            let mut ttft = None;
            let mut usage = (0, 0);
            while let Some(event) = stream.recv().await {
                match event {
                    GenerationEvent::Token { .. } if ttft.is_none() => {
                        ttft = Some(submitted.elapsed().as_secs_f64());
                    }
                    GenerationEvent::Finished {
                        prompt_tokens,
                        cached_tokens,
                        ..
                    } => {
                        usage = (prompt_tokens, cached_tokens);
                        break;
                    }
                    GenerationEvent::Failed(error) => return Err(anyhow::anyhow!(error)),
                    _ => {}
                }
            }
            Ok((ttft.unwrap_or(f64::NAN), usage))
        }));
    }
    let mut result = ModeResult {
        ttft: Vec::new(),
        wall: Duration::ZERO,
        cached_tokens: 0,
        prompt_tokens: 0,
    };
    for task in tasks {
        let (ttft, (prompt, cached)) = task.await??;
        result.ttft.push(ttft);
        result.prompt_tokens += prompt;
        result.cached_tokens += cached;
    }
    result.wall = started.elapsed();
    Ok(result)
}

fn load(
    model: &Path,
    args: &BenchSkillsArgs,
    reuse: bool,
    store: Option<&Path>,
) -> anyhow::Result<Serving> {
    let config = EngineConfig {
        kv_cache: KvCacheSize::Bytes(args.kv_cache_bytes),
        reuse_prefixes: reuse,
        ..EngineConfig::default()
    };
    let settings = SkillsSettings {
        pinned_fraction: 0.5,
        store_dir: store.map(Path::to_path_buf),
        ..SkillsSettings::default()
    };
    Ok(Serving::load(model, config, &settings)?)
}

/// Registers the skills and returns the time until all are Ready.
async fn prefill_all(
    serving: &Serving,
    documents: &[SkillDocument],
    assembly: Assembly,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut changes = serving.skills.watch_changes();
    serving.skills.upsert(
        documents
            .iter()
            .map(|document| {
                SkillUpdate::from_folder(document.name().to_string(), document.clone(), assembly)
            })
            .collect(),
    );
    while !serving.skills.all_settled() {
        changes.changed().await?;
    }
    let elapsed = started.elapsed();
    if let Some(failed) = serving
        .skills
        .snapshot()
        .into_iter()
        .find(|state| state.state != PlacementState::Ready)
    {
        anyhow::bail!(
            "skill {} is {:?}: {:?}",
            failed.name,
            failed.state,
            failed.message
        );
    }
    Ok(elapsed)
}

fn print_mode(name: &str, result: &ModeResult) {
    println!(
        "{name:<26} ttft p50 {:>8.1} ms  p99 {:>8.1} ms  {:>6.2} req/s  cached {:>6}/{:<6} prompt tokens",
        percentile(&result.ttft, 0.5) * 1e3,
        percentile(&result.ttft, 0.99) * 1e3,
        result.requests_per_second(),
        result.cached_tokens,
        result.prompt_tokens
    );
}

/// Runs the benchmark and prints its table.
pub fn run(args: &BenchSkillsArgs) -> anyhow::Result<()> {
    let model = match &args.model {
        Some(path) => path.clone(),
        None => default_model_path().ok_or_else(|| anyhow::anyhow!("no --model and no $HOME"))?,
    };
    let documents: Vec<SkillDocument> = load_skill_dir(&args.skills)?.into_values().collect();
    anyhow::ensure!(
        !documents.is_empty(),
        "no skills in {}",
        args.skills.display()
    );
    let work = workload(documents.len(), args.requests, args.zipf, args.seed);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        println!(
            "skills workload: {} skills, {} requests, concurrency {}, {} tokens out, threads {}",
            documents.len(),
            work.len(),
            args.concurrency,
            args.max_tokens,
            std::thread::available_parallelism().map_or(1, usize::from)
        );
        let cold_engine = load(&model, args, false, None)?;
        let cold = run_mode(&cold_engine, &documents, &work, args, Assembly::Exact).await?;
        cold_engine.engine.shutdown().await;
        print_mode("skill cache off", &cold);

        let store = std::env::temp_dir().join(format!("skillkv-bench-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&store);
        let store_arg = (!args.no_store).then_some(store.as_path());
        let warm_engine = load(&model, args, true, store_arg)?;
        let prefill_time = prefill_all(&warm_engine, &documents, args.assembly).await?;
        let warm = run_mode(&warm_engine, &documents, &work, args, args.assembly).await?;
        warm_engine.engine.shutdown().await;
        let label = match args.assembly {
            Assembly::Exact => "skill cache on (exact)",
            Assembly::Modular => "skill cache on (modular)",
        };
        print_mode(label, &warm);

        let ttft_ratio = percentile(&cold.ttft, 0.5) / percentile(&warm.ttft, 0.5).max(1e-9);
        let throughput_ratio = warm.requests_per_second() / cold.requests_per_second().max(1e-9);
        println!(
            "TTFT p50 cold/warm {ttft_ratio:.1}x (target >= 20x: {}); throughput warm/cold {throughput_ratio:.1}x (target >= 10x: {})",
            if ttft_ratio >= 20.0 { "met" } else { "NOT met" },
            if throughput_ratio >= 10.0 { "met" } else { "NOT met" },
        );
        if !args.no_store {
            let restarted = load(&model, args, true, Some(&store))?;
            let load_time = prefill_all(&restarted, &documents, args.assembly).await?;
            restarted.engine.shutdown().await;
            println!(
                "start to Ready: prefill {:.2} s, from the node's store {:.3} s ({:.0}x)",
                prefill_time.as_secs_f64(),
                load_time.as_secs_f64(),
                prefill_time.as_secs_f64() / load_time.as_secs_f64().max(1e-9)
            );
            let _ = std::fs::remove_dir_all(&store);
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_workload_is_deterministic_and_uses_one_to_three_distinct_skills() {
        let a = workload(5, 200, 1.1, 3);
        let b = workload(5, 200, 1.1, 3);
        assert_eq!(
            a.iter().map(|w| w.skills.clone()).collect::<Vec<_>>(),
            b.iter().map(|w| w.skills.clone()).collect::<Vec<_>>()
        );
        for item in &a {
            assert!((1..=3).contains(&item.skills.len()));
            let mut unique = item.skills.clone();
            unique.dedup();
            assert_eq!(unique.len(), item.skills.len());
            assert!(item.question.split_whitespace().count() >= 40);
        }
        // Zipf: the most popular skill is used more often than the least popular one.
        let uses = |skill| a.iter().filter(|w| w.skills.contains(&skill)).count();
        assert!(uses(0) > uses(4));
    }
}
