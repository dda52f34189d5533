//! `bench/routing`: the router in front of N real daemons whose pinned KV budget holds only
//! part of S skills, on the skills workload (`skillkv bench skills`: 1–3 of S skills per
//! request by Zipf popularity, a ~100-token question, a short answer). One run compares the
//! routing policies — locality, round-robin, least-loaded — each on a fresh fleet with the same
//! skill placement: skill KV hit rate, TTFT p50/p99 and requests/s, side by side with ratios
//! to round-robin. Then the router's own overhead against a backend that answers at once.
//!
//! Placement (what the operator would do): every daemon knows every skill; daemon `d` gives
//! skill `j` a high priority when `j mod N == d`, so each skill is pinned on exactly one daemon
//! and the rest do not fit its budget (Failed: InsufficientKVCapacity, served cold).
//!
//! ```sh
//! cargo run -p skillkv-router --example bench_routing -- --help
//! ```
//!
//! The default model is a synthetic GGUF (`--model` takes any GGUF, e.g. SmolLM2), so that
//! the comparison finishes in minutes on a small CPU machine while prefill still dominates.

mod overhead;
#[path = "../../tests/real/mod.rs"]
mod real;

use std::error::Error;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::{Request, StatusCode, header};
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use skillkv_api::v1alpha1::{Assembly, PlacementState};
use skillkv_daemon::cli::bench::percentile;
use skillkv_daemon::cli::bench::skills::{WorkItem, workload};
use skillkv_daemon::engine::testing::TinyModelSpec;
use skillkv_router::client::{Upstream, get_request};
use skillkv_router::routing::{Policy, RoutingConfig};
use skillkv_router::{BackendConfig, BoundRouter, RouterConfig};
use tokio::sync::oneshot;

use crate::real::{DaemonOptions, RealDaemon, client, write_model};

type BenchResult<T> = Result<T, Box<dyn Error>>;

/// `bench_routing` flags.
fn parse_assembly(text: &str) -> Result<Assembly, String> {
    serde_json::from_value(Value::String(text.to_string()))
        .map_err(|_| format!("`{text}` is neither `exact` nor `modular`"))
}

#[derive(Debug, Parser)]
#[command(about = "Compare the router's policies on the skills workload over N real daemons")]
struct Args {
    /// GGUF model [default: a synthetic model, see --synthetic-*].
    #[arg(long)]
    model: Option<PathBuf>,
    /// Layers of the synthetic model.
    #[arg(long, default_value_t = 2)]
    synthetic_layers: usize,
    /// Width of the synthetic model.
    #[arg(long, default_value_t = 64)]
    synthetic_hidden: usize,
    /// Daemons.
    #[arg(long, default_value_t = 3)]
    daemons: usize,
    /// Skills S.
    #[arg(long, default_value_t = 12)]
    skills: usize,
    /// Tokens per skill (approximate).
    #[arg(long, default_value_t = 2000)]
    skill_tokens: usize,
    /// Pinned budget of each daemon, in skills (S/N plus a little slack by default).
    #[arg(long)]
    pinned_skills: Option<f64>,
    /// Fraction of each daemon's KV pool skills may pin (the daemon's default); the pool is
    /// the pinned budget over it.
    #[arg(long, default_value_t = 0.5)]
    pinned_fraction: f64,
    /// Requests per policy.
    #[arg(long, default_value_t = 90)]
    requests: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 6)]
    concurrency: usize,
    /// Tokens generated per request.
    #[arg(long, default_value_t = 8)]
    max_tokens: usize,
    /// Zipf exponent of skill popularity.
    #[arg(long, default_value_t = 1.1)]
    zipf: f64,
    /// Seed of the workload.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Policies to compare, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "locality,round-robin,least-loaded"
    )]
    policies: Vec<Policy>,
    /// Assembly of the daemons' skills: `exact` (only a request's first skill is a reusable
    /// prefix) or `modular` (every pinned skill of the request is copied from its own KV).
    #[arg(long, default_value = "exact", value_parser = parse_assembly)]
    assembly: Assembly,
    /// Requests of the overhead measurement (each direct and through the router).
    #[arg(long, default_value_t = 3000)]
    overhead_requests: usize,
}

/// What one request saw.
#[derive(Debug, Default, Clone)]
struct Sample {
    ttft: f64,
    skills: usize,
    warm: usize,
    prompt_tokens: u64,
    cached_tokens: u64,
    failed: bool,
}

/// What one policy measured.
#[derive(Debug)]
struct PolicyResult {
    policy: Policy,
    samples: Vec<Sample>,
    wall: Duration,
}

impl PolicyResult {
    fn ok(&self) -> impl Iterator<Item = &Sample> {
        self.samples.iter().filter(|s| !s.failed)
    }
    fn hit_rate(&self) -> f64 {
        let (warm, total) = self
            .ok()
            .fold((0, 0), |(w, t), s| (w + s.warm, t + s.skills));
        warm as f64 / total.max(1) as f64
    }
    fn cached_share(&self) -> f64 {
        let (cached, prompt) = self.ok().fold((0, 0), |(c, p), s| {
            (c + s.cached_tokens, p + s.prompt_tokens)
        });
        cached as f64 / prompt.max(1) as f64
    }
    fn ttft(&self, q: f64) -> f64 {
        let values: Vec<f64> = self.ok().map(|s| s.ttft).collect();
        percentile(&values, q)
    }
    fn rps(&self) -> f64 {
        self.ok().count() as f64 / self.wall.as_secs_f64().max(1e-9)
    }
}

const TOPICS: [&str; 16] = [
    "caches", "queues", "kernels", "indexes", "leases", "shards", "tokens", "sockets", "paging",
    "locks", "probes", "quotas", "batches", "replicas", "schemas", "traces",
];
const NOUNS: [&str; 12] = [
    "request", "buffer", "thread", "budget", "counter", "window", "table", "stream", "timer",
    "record", "header", "worker",
];
const VERBS: [&str; 8] = [
    "stalls", "grows", "retries", "drops", "splits", "waits", "spikes", "drifts",
];

/// A SKILL.md of about `chars` characters about its own topic.
fn skill_document(index: usize, chars: usize) -> (String, String) {
    let name = format!("skill-{index:02}");
    let topic = TOPICS[index % TOPICS.len()];
    let mut rng = StdRng::seed_from_u64(1000 + index as u64);
    let mut body = format!("Guide {index} on {topic}. ");
    let mut rule = 0;
    while body.len() < chars {
        let pick =
            |rng: &mut StdRng, words: &[&'static str]| words[rng.random_range(0..words.len())];
        body.push_str(&format!(
            "Rule {rule} for {topic}: when the {} {}, check the {} before the {}. ",
            pick(&mut rng, &NOUNS),
            pick(&mut rng, &VERBS),
            pick(&mut rng, &NOUNS),
            pick(&mut rng, &NOUNS),
        ));
        rule += 1;
    }
    let text = real::skill_markdown(&name, &format!("Guidance on {topic} number {index}"), &body);
    (name, text)
}

async fn post_json(
    client: &Upstream,
    url: &str,
    body: &Value,
) -> BenchResult<(StatusCode, axum::http::HeaderMap, Bytes)> {
    let request = Request::post(url)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())))?;
    let response = client.request(request).await?;
    let (parts, body) = response.into_parts();
    Ok((
        parts.status,
        parts.headers,
        body.collect().await?.to_bytes(),
    ))
}

/// The probe: bytes of KV per token and characters per token of skill text, from one daemon.
async fn calibrate(
    options: &DaemonOptions,
    model_id: &str,
    chars: usize,
) -> BenchResult<(usize, f64)> {
    let http = client();
    let daemon = RealDaemon::start(options);
    daemon.wait_ready(&http, Duration::from_secs(120)).await;
    let bytes_per_token = daemon.state(&http).await.kv_budget.kv_bytes_per_token;
    let url = format!("http://{}/v1/chat/completions", daemon.public);
    let mut tokens = Vec::new();
    // At least one character per token: `chars` characters fit where `chars` tokens do.
    let (_, sample) = skill_document(0, chars);
    for content in ["x".to_string(), sample.clone()] {
        let body = json!({"model": model_id, "max_tokens": 1, "skills": [],
            "messages": [{"role": "user", "content": content}]});
        let (status, _, bytes) = post_json(&http, &url, &body).await?;
        if status != StatusCode::OK {
            return Err(format!(
                "calibration request: {status}: {}",
                String::from_utf8_lossy(&bytes)
            )
            .into());
        }
        let answer: Value = serde_json::from_slice(&bytes)?;
        tokens.push(answer["usage"]["prompt_tokens"].as_u64().unwrap_or(0) as f64);
    }
    let chars_per_token = (sample.len() - 1) as f64 / (tokens[1] - tokens[0]).max(1.0);
    Ok((bytes_per_token, chars_per_token))
}

/// Starts the router in-process; dropping the sender stops it.
async fn start_router(
    backends: Vec<BackendConfig>,
    policy: Policy,
) -> BenchResult<(String, String, oneshot::Sender<()>)> {
    let config = RouterConfig {
        listen: "127.0.0.1:0".parse()?,
        health_listen: "127.0.0.1:0".parse()?,
        backends,
        routing: RoutingConfig {
            policy,
            ..RoutingConfig::default()
        },
        max_reconnect_backoff: Duration::from_millis(200),
        ..RouterConfig::default()
    };
    let bound = BoundRouter::bind(config).await?;
    let api = format!("http://{}", bound.api_addr().ok_or("no api address")?);
    let health = format!("http://{}", bound.health_addr().ok_or("no health address")?);
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(bound.serve(async move {
        let _ = stopped.await;
    }));
    Ok((api, health, stop))
}

async fn metrics_text(http: &Upstream, health: &str) -> BenchResult<String> {
    let response = http
        .request(get_request(&format!("{health}/metrics"), None)?)
        .await?;
    Ok(String::from_utf8_lossy(&response.into_body().collect().await?.to_bytes()).into_owned())
}

/// Waits until the router follows `count` healthy backends (their skills known).
async fn wait_router_healthy(http: &Upstream, health: &str, count: usize) -> BenchResult<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = metrics_text(http, health).await.unwrap_or_default();
        let healthy = text
            .lines()
            .filter(|l| l.starts_with("skillkv_router_backend_healthy{") && l.ends_with(" 1"))
            .count();
        if healthy == count {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("{healthy} of {count} backends healthy after 30 s").into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One streamed request: TTFT, the daemon's cache header and the final usage.
async fn one_request(http: Upstream, url: String, body: Value, skills: usize) -> Sample {
    let started = Instant::now();
    let mut sample = Sample {
        skills,
        failed: true,
        ..Sample::default()
    };
    let Ok(request) = Request::post(&url)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
    else {
        return sample;
    };
    let Ok(Ok(response)) =
        tokio::time::timeout(Duration::from_secs(300), http.request(request)).await
    else {
        return sample;
    };
    if response.status() != StatusCode::OK {
        eprintln!("request failed: {}", response.status());
        return sample;
    }
    let cache = response
        .headers()
        .get("x-skillkv-cache")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    sample.warm = cache
        .split(';')
        .find_map(|part| part.trim().strip_prefix("warm="))
        .map_or(0, |warm| {
            warm.split(',')
                .filter(|n| !n.is_empty() && *n != "none")
                .count()
        });
    // TTFT: the first event carrying generated text (the opening event only names the role),
    // or the finish event if every token decoded to nothing.
    let mut body = response.into_body();
    let (mut pending, mut first, mut done) = (String::new(), None, false);
    while let Some(Ok(frame)) = body.frame().await {
        let Some(data) = frame.data_ref() else {
            continue;
        };
        pending.push_str(&String::from_utf8_lossy(data));
        while let Some(end) = pending.find("\n\n") {
            let event: String = pending.drain(..end + 2).collect();
            let data = event.trim().trim_start_matches("data: ");
            if data == "[DONE]" {
                done = true;
                continue;
            }
            let Ok(value) = serde_json::from_str::<Value>(data) else {
                continue;
            };
            if let Some(error) = value.get("error") {
                eprintln!("request failed mid-stream: {error}");
            }
            let choice = &value["choices"][0];
            let text = choice["delta"]["content"]
                .as_str()
                .is_some_and(|t| !t.is_empty());
            if first.is_none() && (text || !choice["finish_reason"].is_null()) {
                first = Some(started.elapsed().as_secs_f64());
            }
            if let Some(usage) = value.get("usage").filter(|u| !u.is_null()) {
                sample.prompt_tokens = usage["prompt_tokens"].as_u64().unwrap_or(0);
                sample.cached_tokens = usage["prompt_tokens_details"]["cached_tokens"]
                    .as_u64()
                    .unwrap_or(0);
            }
        }
    }
    sample.failed = first.is_none() || !done;
    sample.ttft = first.unwrap_or(f64::NAN);
    sample
}

struct Fleet<'a> {
    options: &'a DaemonOptions,
    documents: &'a [(String, String)],
    model_id: &'a str,
}

async fn run_policy(
    fleet: &Fleet<'_>,
    args: &Args,
    policy: Policy,
    work: &[WorkItem],
) -> BenchResult<PolicyResult> {
    let http = client();
    let daemons: Vec<RealDaemon> = (0..args.daemons)
        .map(|_| RealDaemon::start(fleet.options))
        .collect();
    for daemon in &daemons {
        daemon.wait_ready(&http, Duration::from_secs(120)).await;
    }
    for (d, daemon) in daemons.iter().enumerate() {
        let skills: Vec<(String, String, i32)> = fleet
            .documents
            .iter()
            .enumerate()
            .map(|(j, (name, text))| {
                (
                    name.clone(),
                    text.clone(),
                    if j % args.daemons == d { 100 } else { 0 },
                )
            })
            .collect();
        daemon.put_desired(&http, 1, &skills, args.assembly).await;
    }
    let mut pinned = Vec::new();
    for daemon in &daemons {
        let state = daemon
            .wait_skills_settled(&http, Duration::from_secs(600))
            .await;
        pinned.push(
            state
                .skills
                .iter()
                .filter(|s| s.state == PlacementState::Ready)
                .count(),
        );
    }
    let (api, health, stop) =
        start_router(daemons.iter().map(RealDaemon::backend).collect(), policy).await?;
    wait_router_healthy(&http, &health, daemons.len()).await?;
    let url = format!("{api}/v1/chat/completions");
    let semaphore = Arc::new(tokio::sync::Semaphore::new(args.concurrency.max(1)));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for item in work {
        let names: Vec<&str> = item
            .skills
            .iter()
            .map(|&j| fleet.documents[j].0.as_str())
            .collect();
        let body = json!({"model": fleet.model_id, "stream": true, "max_tokens": args.max_tokens,
            "ignore_eos": true, "skills": names, "stream_options": {"include_usage": true},
            "messages": [{"role": "user", "content": item.question}]});
        let permit = semaphore.clone().acquire_owned().await?;
        let (http, url, skills) = (http.clone(), url.clone(), item.skills.len());
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            one_request(http, url, body, skills).await
        }));
    }
    let mut samples = Vec::new();
    for task in tasks {
        samples.push(task.await?);
    }
    let wall = started.elapsed();
    let decisions: Vec<String> = metrics_text(&http, &health)
        .await?
        .lines()
        .filter(|l| l.starts_with("skillkv_router_routing_decisions_total{"))
        .map(|l| {
            l.trim_start_matches("skillkv_router_routing_decisions_total")
                .to_string()
        })
        .collect();
    println!(
        "  {:<13} pinned per daemon {pinned:?}; decisions {}",
        policy_name(policy),
        decisions.join(" ")
    );
    drop(stop);
    drop(daemons);
    Ok(PolicyResult {
        policy,
        samples,
        wall,
    })
}

fn policy_name(policy: Policy) -> &'static str {
    match policy {
        Policy::Locality => "locality",
        Policy::RoundRobin => "round-robin",
        Policy::LeastLoaded => "least-loaded",
    }
}

fn print_table(results: &[PolicyResult]) {
    let baseline = results.iter().find(|r| r.policy == Policy::RoundRobin);
    println!(
        "{:<13} {:>9} {:>9} {:>11} {:>11} {:>8} {:>7}  vs round-robin (hit, TTFT p50, req/s)",
        "policy", "hit rate", "cached", "TTFT p50", "TTFT p99", "req/s", "failed"
    );
    for result in results {
        let ratios = baseline.map_or_else(String::new, |base| {
            format!(
                "{:.2}x  {:.2}x  {:.2}x",
                result.hit_rate() / base.hit_rate().max(1e-9),
                result.ttft(0.5) / base.ttft(0.5).max(1e-9),
                result.rps() / base.rps().max(1e-9)
            )
        });
        println!(
            "{:<13} {:>8.1}% {:>8.1}% {:>8.1} ms {:>8.1} ms {:>8.2} {:>7}  {ratios}",
            policy_name(result.policy),
            result.hit_rate() * 100.0,
            result.cached_share() * 100.0,
            result.ttft(0.5) * 1e3,
            result.ttft(0.99) * 1e3,
            result.rps(),
            result.samples.iter().filter(|s| s.failed).count(),
        );
    }
}

fn main() -> BenchResult<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> BenchResult<()> {
    // The in-process daemons catch SIGINT/SIGTERM to drain; the benchmark itself stops at once.
    tokio::spawn(async {
        let _ = tokio::signal::ctrl_c().await;
        eprintln!("interrupted");
        std::process::exit(130);
    });
    let dir = tempfile::tempdir()?;
    let (model, model_id, description) = match &args.model {
        Some(path) => {
            let id = path
                .file_stem()
                .and_then(|s| s.to_str())
                .ok_or("model path has no stem")?
                .to_string();
            (path.clone(), id, format!("{}", path.display()))
        }
        None => {
            let spec = TinyModelSpec {
                n_layers: args.synthetic_layers,
                hidden: args.synthetic_hidden,
                ffn: args.synthetic_hidden * 2,
                context_length: 4 * args.skill_tokens + 1024,
                ..TinyModelSpec::default()
            };
            let description = format!(
                "synthetic Llama GGUF ({} layers, hidden {}, ffn {}, Q8_0, byte-level BPE)",
                spec.n_layers, spec.hidden, spec.ffn
            );
            (
                write_model(dir.path(), "synthetic", &spec),
                "synthetic".to_string(),
                description,
            )
        }
    };
    let pinned_skills = args
        .pinned_skills
        .unwrap_or(args.skills as f64 / args.daemons as f64 + 0.5);
    let mut options = DaemonOptions::new(&model);
    options.max_seqs = args.concurrency.max(4);
    let (bytes_per_token, chars_per_token) =
        calibrate(&options, &model_id, args.skill_tokens).await?;
    let documents: Vec<(String, String)> = (0..args.skills)
        .map(|j| skill_document(j, (args.skill_tokens as f64 * chars_per_token) as usize))
        .collect();
    // The pinned budget holds `pinned_skills` skills (each also pays the system prompt and a
    // partial block); the pool is the budget over the pinned fraction.
    let pinned_bytes = (pinned_skills * (args.skill_tokens + 48) as f64) as usize * bytes_per_token;
    options.pinned_fraction = args.pinned_fraction;
    options.kv_cache_bytes = (pinned_bytes as f64 / args.pinned_fraction) as usize;
    let work = workload(args.skills, args.requests, args.zipf, args.seed);
    let uses: usize = work.iter().map(|w| w.skills.len()).sum();
    println!(
        "routing benchmark: model {description}, {:?} assembly",
        args.assembly
    );
    println!(
        "  {} daemons, S = {} skills of ~{} tokens, pinned budget {:.1} skills per daemon ({:.0}% of {} MiB KV), \
         {} requests ({} skill uses, Zipf {}), concurrency {}, {} tokens out, {} CPU threads",
        args.daemons,
        args.skills,
        args.skill_tokens,
        pinned_skills,
        args.pinned_fraction * 100.0,
        options.kv_cache_bytes >> 20,
        work.len(),
        uses,
        args.zipf,
        args.concurrency,
        args.max_tokens,
        std::thread::available_parallelism().map_or(1, usize::from)
    );
    let fleet = Fleet {
        options: &options,
        documents: &documents,
        model_id: &model_id,
    };
    let mut results = Vec::new();
    for &policy in &args.policies {
        results.push(run_policy(&fleet, &args, policy, &work).await?);
    }
    print_table(&results);
    if let (Some(locality), Some(base)) = (
        results.iter().find(|r| r.policy == Policy::Locality),
        results.iter().find(|r| r.policy == Policy::RoundRobin),
    ) {
        let throughput = locality.rps() / base.rps().max(1e-9);
        println!(
            "targets: hit rate >= 90%: {:.1}% {}; throughput >= 2x round-robin: {throughput:.2}x {}",
            locality.hit_rate() * 100.0,
            met(locality.hit_rate() >= 0.9),
            met(throughput >= 2.0)
        );
    }
    overhead::measure(args.overhead_requests).await
}

fn met(ok: bool) -> &'static str {
    if ok { "met" } else { "NOT met" }
}
