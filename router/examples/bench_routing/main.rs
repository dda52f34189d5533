//! `bench/routing`: the router in front of N real daemons whose pinned KV budget holds only
//! part of S skills, on the skills workload (`skillkv bench skills`: 1–3 of S skills per
//! request by Zipf popularity, a ~100-token question, a short answer). One run compares the
//! routing policies — locality, round-robin, least-loaded — each on a fresh fleet with the same
//! skill placement: skill KV hit rate, TTFT p50/p99 and requests/s, side by side with ratios
//! to round-robin. Then the router's own overhead against a backend that answers at once.
//!
//! Placement (`--placement`, see [`skills`]): by default as the operator places Skill objects
//! — the hottest skills on every daemon, the long tail once, by the operator's own placement
//! function — every daemon pushed every skill, pinned where placed (as the controller does);
//! or `partitioned`, each skill pinned on one daemon and known (served cold) by the others.
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
mod report;
mod skills;

use std::collections::BTreeSet;
use std::error::Error;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::{Request, StatusCode, header};
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use skillkv_api::v1alpha1::{Assembly, PlacementState};
use skillkv_daemon::cli::bench::skills::{WorkItem, workload};
use skillkv_daemon::engine::testing::TinyModelSpec;
use skillkv_router::client::{Upstream, get_request};
use skillkv_router::routing::{Policy, RoutingConfig};
use skillkv_router::{BackendConfig, BoundRouter, RouterConfig};
use tokio::sync::oneshot;

use crate::real::{DaemonOptions, RealDaemon, client, sample_value, write_model};
use crate::report::{PolicyResult, one_request, policy_name, print_table};
use crate::skills::{PlacementMode, skill_document};

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
    /// Pinned budget of each daemon, in skills [default: S/2 for `replicate-hot`, S/N + 0.5
    /// for `partitioned`].
    #[arg(long)]
    pinned_skills: Option<f64>,
    /// How skills are placed: `replicate-hot` (as the operator places Skill objects: the
    /// `--hot-skills` most popular on every daemon with a higher priority, the rest with
    /// `replicas: 1`) or `partitioned` (each pinned on one daemon, served cold by the others).
    #[arg(long, value_enum, default_value = "replicate-hot")]
    placement: PlacementMode,
    /// The router's bounded-load slack ε (its `--load-epsilon`).
    #[arg(long, default_value_t = RoutingConfig::default().load_epsilon)]
    load_epsilon: f64,
    /// `replicate-hot`: how many of the most popular skills every daemon holds.
    #[arg(long, default_value_t = 3)]
    hot_skills: usize,
    /// Fraction of each daemon's KV pool skills may pin (the daemon's default); the pool is
    /// the pinned budget over it.
    #[arg(long, default_value_t = 0.5)]
    pinned_fraction: f64,
    /// Tokens of each request's question, in the model's own tokens (the workload's questions
    /// are cut or extended to fit, so that a byte-level tokenizer does not make them 3× longer).
    #[arg(long, default_value_t = 100)]
    question_tokens: usize,
    /// Each daemon's request timeout, seconds (its `--request-timeout`): long enough that
    /// a queue behind cold prefills on a slow machine is measured, not cut off.
    #[arg(long, default_value_t = 600)]
    request_timeout_secs: u64,
    /// Requests per policy (180: with 90, most of a run is the daemons' caches warming up).
    #[arg(long, default_value_t = 180)]
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

/// The probe: bytes of KV per token and characters per token of skill text, from one daemon
/// (returned for [`skill_tokens`]).
async fn calibrate(
    options: &DaemonOptions,
    model_id: &str,
    chars: usize,
) -> BenchResult<(RealDaemon, usize, f64)> {
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
    Ok((daemon, bytes_per_token, chars_per_token))
}

/// Each skill's token count as a daemon reports it (what the operator places by): the probe
/// tokenizes every document when it is pushed (known only, not pinned: nothing is prefilled).
async fn skill_tokens(
    probe: &RealDaemon,
    documents: &[(String, String)],
    assembly: Assembly,
) -> BenchResult<Vec<usize>> {
    let http = client();
    let desired: Vec<(String, String, i32, bool)> = documents
        .iter()
        .map(|(name, text)| (name.clone(), text.clone(), 0, false))
        .collect();
    probe.put_desired(&http, 1, &desired, assembly).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let state = probe.state(&http).await;
        let tokens: Option<Vec<usize>> = documents
            .iter()
            .map(|(name, _)| {
                state
                    .skills
                    .iter()
                    .find(|s| s.name == *name && s.tokens > 0)
                    .map(|s| s.tokens)
            })
            .collect();
        if let Some(tokens) = tokens {
            return Ok(tokens);
        }
        if Instant::now() > deadline {
            return Err("the probe daemon did not report every skill's tokens in 60 s".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Starts the router in-process; dropping the sender stops it.
async fn start_router(
    backends: Vec<BackendConfig>,
    routing: RoutingConfig,
) -> BenchResult<(String, String, oneshot::Sender<()>)> {
    let config = RouterConfig {
        listen: "127.0.0.1:0".parse()?,
        health_listen: "127.0.0.1:0".parse()?,
        backends,
        routing,
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

/// What one daemon's `/metrics` says its engine did during a run.
#[derive(Debug, Default)]
struct DaemonFigures {
    preemptions: u64,
    unpinned_prefilled: u64,
    unpinned_cached: u64,
    unpinned_skipped: u64,
}

impl DaemonFigures {
    fn parse(text: &str) -> Self {
        let value = |series: &str| sample_value(text, series).map_or(0, |v| v as u64);
        let unpinned = |outcome: &str| {
            value(&format!(
                "skillkv_unpinned_skill_prefills_total{{outcome=\"{outcome}\"}}"
            ))
        };
        Self {
            preemptions: value("skillkv_preemptions_total"),
            unpinned_prefilled: unpinned("prefilled"),
            unpinned_cached: unpinned("cached"),
            unpinned_skipped: unpinned("skipped"),
        }
    }
}

struct Fleet<'a> {
    options: &'a DaemonOptions,
    documents: &'a [(String, String)],
    /// Each skill's tokens, as the daemons report them.
    tokens: &'a [usize],
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
    let mut states = Vec::new();
    for daemon in &daemons {
        states.push(daemon.state(&http).await);
    }
    let block_tokens = states
        .first()
        .map_or(16, |state| state.kv_budget.block_tokens as u64);
    let demands = skills::demands(fleet.tokens, args.hot_skills, block_tokens);
    let placement = (args.placement == PlacementMode::ReplicateHot)
        .then(|| skills::operator_placement(&states, &demands));
    let desired =
        skills::desired_per_daemon(fleet.documents, placement.as_ref(), &demands, daemons.len());
    for (daemon, skills) in daemons.iter().zip(&desired) {
        daemon.put_desired(&http, 1, skills, args.assembly).await;
    }
    if let Some(placement) = &placement {
        let short: Vec<&String> = placement
            .skills
            .iter()
            .filter(|(_, a)| a.is_short())
            .map(|(name, _)| name)
            .collect();
        println!(
            "  {:<13} placement {}; short of copies: {short:?}",
            policy_name(policy),
            (0..daemons.len())
                .map(|d| format!(
                    "{}: {}",
                    skills::pod_name(d),
                    placement.skills_on(&skills::pod_name(d)).join(",")
                ))
                .collect::<Vec<_>>()
                .join("; ")
        );
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
                .map(|s| s.name.clone())
                .collect::<BTreeSet<String>>(),
        );
    }
    let ceiling = skills::hit_rate_ceiling(work, fleet.documents, &pinned);
    let (api, health, stop) = start_router(
        daemons.iter().map(RealDaemon::backend).collect(),
        RoutingConfig {
            policy,
            load_epsilon: args.load_epsilon,
        },
    )
    .await?;
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
    let mut engine_figures = Vec::new();
    for daemon in &daemons {
        let text = metrics_text(&http, &format!("http://{}", daemon.public)).await?;
        engine_figures.push(DaemonFigures::parse(&text));
    }
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
        "  {:<13} pinned per daemon {:?} (best possible pinned hit rate {:.1}%); decisions {}",
        policy_name(policy),
        pinned.iter().map(BTreeSet::len).collect::<Vec<_>>(),
        ceiling * 100.0,
        decisions.join(" ")
    );
    let per_daemon =
        |figure: fn(&DaemonFigures) -> u64| engine_figures.iter().map(figure).collect::<Vec<_>>();
    println!(
        "  {:<13} per daemon: preemptions {:?}; unpinned skills prefilled {:?}, found cached {:?}, \
         skipped {:?}",
        policy_name(policy),
        per_daemon(|f| f.preemptions),
        per_daemon(|f| f.unpinned_prefilled),
        per_daemon(|f| f.unpinned_cached),
        per_daemon(|f| f.unpinned_skipped),
    );
    drop(stop);
    drop(daemons);
    Ok(PolicyResult {
        policy,
        samples,
        wall,
    })
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
    let pinned_skills = args.pinned_skills.unwrap_or(match args.placement {
        PlacementMode::ReplicateHot => args.skills as f64 / 2.0,
        PlacementMode::Partitioned => args.skills as f64 / args.daemons as f64 + 0.5,
    });
    let mut options = DaemonOptions::new(&model);
    options.max_seqs = args.concurrency.max(4);
    options.request_timeout = Duration::from_secs(args.request_timeout_secs);
    let (probe, bytes_per_token, chars_per_token) =
        calibrate(&options, &model_id, args.skill_tokens).await?;
    let documents: Vec<(String, String)> = (0..args.skills)
        .map(|j| skill_document(j, (args.skill_tokens as f64 * chars_per_token) as usize))
        .collect();
    let tokens = skill_tokens(&probe, &documents, args.assembly).await?;
    let block_tokens = probe.state(&client()).await.kv_budget.block_tokens.max(1);
    drop(probe);
    // The pinned budget holds `pinned_skills` skills; the pool is the budget over the pinned
    // fraction.
    let pinned_bytes = match args.placement {
        // The largest skill's blocks as the operator counts them, plus one block.
        PlacementMode::ReplicateHot => {
            let largest = tokens
                .iter()
                .max()
                .copied()
                .unwrap_or(0)
                .div_ceil(block_tokens);
            ((pinned_skills * largest as f64).ceil() as usize + 1) * block_tokens * bytes_per_token
        }
        // As the first runs: a skill is about `--skill-tokens` plus the system prompt and a
        // partial block.
        PlacementMode::Partitioned => {
            (pinned_skills * (args.skill_tokens + 48) as f64) as usize * bytes_per_token
        }
    };
    options.pinned_fraction = args.pinned_fraction;
    options.kv_cache_bytes = (pinned_bytes as f64 / args.pinned_fraction) as usize;
    let question_chars = (args.question_tokens as f64 * chars_per_token).round() as usize;
    let mut work = workload(args.skills, args.requests, args.zipf, args.seed);
    for item in &mut work {
        item.question = skills::fit_text(&item.question, question_chars);
    }
    let uses: usize = work.iter().map(|w| w.skills.len()).sum();
    println!(
        "routing benchmark: model {description}, {:?} assembly, {:?} placement{}",
        args.assembly,
        args.placement,
        match args.placement {
            PlacementMode::ReplicateHot =>
                format!(" ({} hot skills on every daemon)", args.hot_skills),
            PlacementMode::Partitioned => String::new(),
        }
    );
    println!(
        "  {} daemons, S = {} skills of ~{} tokens, pinned budget {:.1} skills per daemon ({:.0}% of {} MiB KV), \
         {} requests ({} skill uses, Zipf {}, questions of ~{} tokens = {question_chars} characters), \
         concurrency {}, {} tokens out, {} CPU threads, {}",
        args.daemons,
        args.skills,
        args.skill_tokens,
        pinned_skills,
        args.pinned_fraction * 100.0,
        options.kv_cache_bytes >> 20,
        work.len(),
        uses,
        args.zipf,
        args.question_tokens,
        args.concurrency,
        args.max_tokens,
        std::thread::available_parallelism().map_or(1, usize::from),
        match std::env::var("CANDLE_NUM_THREADS") {
            Ok(threads) => format!("CANDLE_NUM_THREADS={threads} compute threads per daemon"),
            Err(_) => "the daemons share one compute pool (CANDLE_NUM_THREADS unset)".to_string(),
        }
    );
    let fleet = Fleet {
        options: &options,
        documents: &documents,
        tokens: &tokens,
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
