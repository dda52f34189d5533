//! Skill detection latency with 100 skills (issue 5 item 6: < 1 ms per query).
//!
//! ```sh
//! cargo run --release -p skillkv-api --example detect_bench [-- --runs 7]
//! make detector-embeddings && cargo run --release -p skillkv-api --example detect_bench -- \
//!     --detector-embeddings ~/.cache/skillkv/models/wordllama-l2-supercat-256
//! ```
//!
//! Generates, deterministically, 100 skills in the shape of real agent skills (a technology
//! and a task: `postgres-performance`, `kafka-migration`, …, each with a "Use when …"
//! description and 8–10 keywords) and 400 queries (about one skill, two skills, or none),
//! then prints the time to build the detector and the median and p99 time per `detect` call
//! over all runs: with words only, and with `--detector-embeddings` also with the semantic
//! checks, side by side.

use std::hint::black_box;
use std::time::{Duration, Instant};

use std::path::Path;

use skillkv_api::skills::{DetectorSettings, SkillCard};

/// (technology, its own vocabulary).
const TECHNOLOGIES: &[(&str, &[&str])] = &[
    ("postgres", &["sql", "vacuum", "wal", "replica"]),
    ("mysql", &["innodb", "binlog", "sql", "replica"]),
    ("redis", &["cache", "eviction", "cluster", "keyspace"]),
    ("kafka", &["topic", "partition", "consumer lag", "broker"]),
    ("kubernetes", &["pod", "kubectl", "deployment", "helm"]),
    (
        "docker",
        &["dockerfile", "container image", "layer", "compose"],
    ),
    ("terraform", &["hcl", "tfstate", "provider", "module"]),
    ("react", &["hooks", "jsx", "component", "props"]),
    ("django", &["orm", "migration file", "view", "middleware"]),
    ("spark", &["dataframe", "shuffle", "executor", "partition"]),
    ("pytorch", &["tensor", "autograd", "cuda", "dataloader"]),
    (
        "nginx",
        &["reverse proxy", "upstream", "location block", "tls"],
    ),
    (
        "elasticsearch",
        &["index mapping", "shard", "query dsl", "analyzer"],
    ),
    ("graphql", &["schema", "resolver", "n+1", "federation"]),
    ("rust", &["borrow checker", "cargo", "lifetime", "tokio"]),
    ("golang", &["goroutine", "channel", "go module", "pprof"]),
    ("airflow", &["dag", "operator", "scheduler", "xcom"]),
    ("grafana", &["dashboard", "panel", "promql", "alert rule"]),
    ("ansible", &["playbook", "inventory", "role", "idempotent"]),
    ("aws-lambda", &["cold start", "handler", "layer", "timeout"]),
];

/// (task, description of when to use it, its own vocabulary).
const TASKS: &[(&str, &str, &[&str])] = &[
    (
        "performance",
        "is slow or uses too much CPU or memory: measuring latency and throughput, profiling hot paths and tuning configuration",
        &["slow", "latency", "throughput", "profiling", "tuning"],
    ),
    (
        "debugging",
        "fails, crashes or returns wrong results: reading logs and errors, reproducing the failure and finding the root cause",
        &["error", "crash", "failure", "logs", "root cause"],
    ),
    (
        "migration",
        "must be upgraded or moved: version upgrades, schema or data migrations, zero-downtime cutover and rollback plans",
        &[
            "upgrade",
            "migration",
            "rollback",
            "downtime",
            "breaking change",
        ],
    ),
    (
        "security",
        "must be hardened or reviewed: authentication, secrets, network exposure, least privilege and known CVEs",
        &["security", "secrets", "authentication", "cve", "hardening"],
    ),
    (
        "testing",
        "needs automated tests: unit and integration tests, fixtures, mocks, test containers and coverage",
        &["test", "integration test", "mock", "fixture", "coverage"],
    ),
];

/// Words of requests about nothing in particular.
const FILLER: &[&str] = &[
    "please",
    "quickly",
    "our team",
    "in production",
    "since yesterday",
    "for the new service",
    "I think",
    "on staging",
    "after the release",
    "for a customer",
];

/// Queries about none of the skills.
const OFF_TOPIC: &[&str] = &[
    "what's a good recipe for banana bread without eggs",
    "translate 'where is the train station' into German",
    "write a haiku about the first snow",
    "recommend a few science fiction novels like Dune",
    "plan a three-day trip to Lisbon on a budget",
    "what are the rules for castling in chess",
    "how long should I boil an egg for a runny yolk",
    "explain the difference between weather and climate",
];

/// A small deterministic generator (SplitMix64), so every run measures the same data.
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[(self.next() % items.len() as u64) as usize]
    }
}

/// 100 skills: every technology with every task.
fn skills() -> Vec<SkillCard> {
    let mut cards = Vec::new();
    for (task, when, task_words) in TASKS {
        for (tech, tech_words) in TECHNOLOGIES {
            let mut keywords: Vec<String> = vec![(*tech).to_owned()];
            keywords.extend(tech_words.iter().map(|w| (*w).to_owned()));
            keywords.extend(task_words.iter().map(|w| format!("{tech} {w}")));
            cards.push(SkillCard {
                name: format!("{tech}-{task}"),
                description: format!(
                    "Use when a {tech} system {when}. Covers {} and {}.",
                    tech_words[0], tech_words[1]
                ),
                keywords,
            });
        }
    }
    cards
}

/// `count` queries: 70% about one skill, 20% about two, 10% about none.
fn queries(count: usize, rng: &mut Rng) -> Vec<String> {
    (0..count)
        .map(|i| match i % 10 {
            0 => (*rng.pick(OFF_TOPIC)).to_owned(),
            1 | 2 => {
                let (a, a_words) = rng.pick(TECHNOLOGIES);
                let (b, b_words) = rng.pick(TECHNOLOGIES);
                let (_, _, task_words) = rng.pick(TASKS);
                format!(
                    "our {a} {} is {} and the {b} {} {} too, how do we fix both",
                    rng.pick(a_words),
                    rng.pick(task_words),
                    rng.pick(b_words),
                    rng.pick(task_words),
                )
            }
            _ => {
                let (tech, words) = rng.pick(TECHNOLOGIES);
                let (_, _, task_words) = rng.pick(TASKS);
                format!(
                    "{} the {tech} {} shows {} {}, what should I check first?",
                    rng.pick(FILLER),
                    rng.pick(words),
                    rng.pick(task_words),
                    rng.pick(FILLER),
                )
            }
        })
        .collect()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[index]
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| args.iter().skip_while(|a| *a != name).nth(1).cloned();
    let runs: usize = flag("--runs").map_or(7, |n| n.parse().expect("--runs takes a number"));
    let semantic = flag("--detector-embeddings").map(|dir| {
        DetectorSettings::load(Some(Path::new(&dir)))
            .unwrap_or_else(|e| panic!("--detector-embeddings {dir}: {e}"))
    });
    let cards = skills();
    let mut rng = Rng(0x5EED);
    let queries = queries(400, &mut rng);
    println!(
        "{} skills, {} queries, {runs} runs",
        cards.len(),
        queries.len()
    );

    let mut settings = vec![("words only", DetectorSettings::default())];
    settings.extend(semantic.map(|semantic| ("words and meaning", semantic)));
    for (label, settings) in &settings {
        measure(label, settings, &cards, &queries, runs);
    }
}

/// Time building a detector with `settings` and `detect` over `queries`, `runs` times.
fn measure(
    label: &str,
    settings: &DetectorSettings,
    cards: &[SkillCard],
    queries: &[String],
    runs: usize,
) {
    let mut builds: Vec<Duration> = (0..runs.max(1) * 5)
        .map(|_| {
            let start = Instant::now();
            black_box(settings.build(cards.iter().cloned()));
            start.elapsed()
        })
        .collect();
    builds.sort();

    let detector = settings.build(cards.iter().cloned());
    let selected: usize = queries.iter().map(|q| detector.detect(q).len()).sum();
    println!("{label}: {selected} skills selected in all");
    let mut all = Vec::with_capacity(runs * queries.len());
    for run in 1..=runs {
        let mut times: Vec<Duration> = queries
            .iter()
            .map(|query| {
                let start = Instant::now();
                black_box(detector.detect(black_box(query)));
                start.elapsed()
            })
            .collect();
        times.sort();
        println!(
            "  run {run}: median {:.1} µs, p99 {:.1} µs per query",
            micros(percentile(&times, 0.5)),
            micros(percentile(&times, 0.99))
        );
        all.extend(times);
    }
    all.sort();
    let (median, p99) = (percentile(&all, 0.5), percentile(&all, 0.99));
    println!(
        "{label}, detect, all runs: median {:.1} µs, p99 {:.1} µs, max {:.1} µs per query (target < 1000 µs): {}",
        micros(median),
        micros(p99),
        micros(*all.last().expect("at least one query")),
        if p99 < Duration::from_millis(1) {
            "met"
        } else {
            "NOT met"
        }
    );
    println!(
        "{label}, build for {} skills: median {:.0} µs, p99 {:.0} µs over {} builds",
        cards.len(),
        micros(percentile(&builds, 0.5)),
        micros(percentile(&builds, 0.99)),
        builds.len()
    );
}
