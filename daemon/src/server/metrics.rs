//! Prometheus metrics (`skillkv_*`): request counts by route and status, latency histograms,
//! token counters, and — refreshed on every scrape — KV blocks, prefix-cache hit ratio,
//! sequence counts and preemptions, per-skill figures ([`super::skill_metrics`]) and GPU figures.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use skillkv_api::admin::SkillState;

use crate::engine::EngineStats;
use crate::server::AppState;
use crate::server::errors::ApiError;
use crate::server::skill_metrics::SkillMetrics;
use crate::skills::{SkillSelection, UnpinnedPrepared};
use crate::telemetry::GpuSample;

/// Why the metrics could not be set up or rendered.
#[derive(Debug, thiserror::Error)]
#[error("prometheus registry failed")]
pub struct RegisterMetricsError(#[from] prometheus::Error);

/// Every metric the daemon exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    /// Time to first token.
    pub ttft: Histogram,
    /// Time per output token after the first.
    pub tpot: Histogram,
    /// Request latency, end to end.
    pub e2e: Histogram,
    /// Time waiting for admission.
    pub queue: Histogram,
    prompt_tokens: IntCounter,
    completion_tokens: IntCounter,
    cached_tokens: IntCounter,
    skill_selections: IntCounterVec,
    unpinned_skills: IntCounterVec,
    kv_blocks: IntGaugeVec,
    hit_ratio: Gauge,
    running: IntGauge,
    waiting: IntGauge,
    preemptions: IntCounter,
    gpu_present: IntGauge,
    gpu_memory_used: GaugeVec,
    gpu_memory_total: GaugeVec,
    gpu_utilization: GaugeVec,
    gpu_temperature: GaugeVec,
    gpu_power: GaugeVec,
    gpu_ecc_errors: GaugeVec,
    gpu_xid_errors: GaugeVec,
    skills: SkillMetrics,
}

fn histogram(name: &str, help: &str, buckets: Vec<f64>) -> Result<Histogram, prometheus::Error> {
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
}

impl Metrics {
    /// Registers every metric in a fresh registry.
    pub fn new() -> Result<Self, RegisterMetricsError> {
        let latency = vec![
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
        ];
        let per_token = vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];
        let gpu_labels = &["gpu"];
        let registry = Registry::new();
        let metrics = Self {
            skills: SkillMetrics::register(&registry)?,
            registry,
            requests: IntCounterVec::new(
                Opts::new(
                    "skillkv_requests_total",
                    "HTTP requests by route and status",
                ),
                &["route", "status"],
            )?,
            ttft: histogram(
                "skillkv_time_to_first_token_seconds",
                "Time to first token",
                latency.clone(),
            )?,
            tpot: histogram(
                "skillkv_time_per_output_token_seconds",
                "Time per output token after the first",
                per_token,
            )?,
            e2e: histogram(
                "skillkv_e2e_request_latency_seconds",
                "Generation latency, end to end",
                latency.clone(),
            )?,
            queue: histogram(
                "skillkv_queue_time_seconds",
                "Time waiting for admission",
                latency,
            )?,
            prompt_tokens: IntCounter::new(
                "skillkv_prompt_tokens_total",
                "Prompt tokens processed",
            )?,
            completion_tokens: IntCounter::new(
                "skillkv_completion_tokens_total",
                "Tokens generated",
            )?,
            cached_tokens: IntCounter::new(
                "skillkv_cached_prompt_tokens_total",
                "Prompt tokens served from the prefix cache",
            )?,
            skill_selections: IntCounterVec::new(
                Opts::new(
                    "skillkv_skill_selections_total",
                    "Chat requests by how their skills were chosen: named in the request, \
                     detected here, or detected by the router (x-skillkv-detected-skills)",
                ),
                &["selection"],
            )?,
            unpinned_skills: IntCounterVec::new(
                Opts::new(
                    "skillkv_unpinned_skill_prefills_total",
                    "Skills a request used that this daemon does not pin, by what their own KV \
                     needed: found cached, prefilled, failed, or skipped (engine overloaded)",
                ),
                &["outcome"],
            )?,
            kv_blocks: IntGaugeVec::new(
                Opts::new(
                    "skillkv_kv_blocks",
                    "KV blocks by state (total, free, cached, pinned, used)",
                ),
                &["state"],
            )?,
            hit_ratio: Gauge::new(
                "skillkv_prefix_cache_hit_ratio",
                "Cached prompt tokens / prompt tokens since start",
            )?,
            running: IntGauge::new("skillkv_running_sequences", "Sequences running")?,
            waiting: IntGauge::new(
                "skillkv_waiting_sequences",
                "Sequences waiting for admission",
            )?,
            preemptions: IntCounter::new(
                "skillkv_preemptions_total",
                "Running sequences preempted (their KV freed, recomputed on readmission) \
                 because the KV pool ran out of blocks",
            )?,
            gpu_present: IntGauge::new("skillkv_gpu_present", "1 when NVML reports a GPU, else 0")?,
            gpu_memory_used: GaugeVec::new(
                Opts::new("skillkv_gpu_memory_used_bytes", "GPU memory in use"),
                gpu_labels,
            )?,
            gpu_memory_total: GaugeVec::new(
                Opts::new("skillkv_gpu_memory_total_bytes", "GPU memory installed"),
                gpu_labels,
            )?,
            gpu_utilization: GaugeVec::new(
                Opts::new("skillkv_gpu_utilization_ratio", "GPU busy fraction"),
                gpu_labels,
            )?,
            gpu_temperature: GaugeVec::new(
                Opts::new("skillkv_gpu_temperature_celsius", "GPU die temperature"),
                gpu_labels,
            )?,
            gpu_power: GaugeVec::new(
                Opts::new("skillkv_gpu_power_watts", "GPU power draw"),
                gpu_labels,
            )?,
            gpu_ecc_errors: GaugeVec::new(
                Opts::new(
                    "skillkv_gpu_uncorrected_ecc_errors",
                    "Uncorrected ECC errors since the driver loaded",
                ),
                gpu_labels,
            )?,
            gpu_xid_errors: GaugeVec::new(
                Opts::new(
                    "skillkv_gpu_xid_errors",
                    "Critical XID errors NVML reported since the daemon started",
                ),
                gpu_labels,
            )?,
        };
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(metrics.requests.clone()),
            Box::new(metrics.ttft.clone()),
            Box::new(metrics.tpot.clone()),
            Box::new(metrics.e2e.clone()),
            Box::new(metrics.queue.clone()),
            Box::new(metrics.prompt_tokens.clone()),
            Box::new(metrics.completion_tokens.clone()),
            Box::new(metrics.cached_tokens.clone()),
            Box::new(metrics.unpinned_skills.clone()),
            Box::new(metrics.kv_blocks.clone()),
            Box::new(metrics.skill_selections.clone()),
            Box::new(metrics.hit_ratio.clone()),
            Box::new(metrics.running.clone()),
            Box::new(metrics.waiting.clone()),
            Box::new(metrics.preemptions.clone()),
            Box::new(metrics.gpu_present.clone()),
            Box::new(metrics.gpu_memory_used.clone()),
            Box::new(metrics.gpu_memory_total.clone()),
            Box::new(metrics.gpu_utilization.clone()),
            Box::new(metrics.gpu_temperature.clone()),
            Box::new(metrics.gpu_power.clone()),
            Box::new(metrics.gpu_ecc_errors.clone()),
            Box::new(metrics.gpu_xid_errors.clone()),
        ];
        for collector in collectors {
            metrics.registry.register(collector)?;
        }
        Ok(metrics)
    }

    /// Counts one chat request's way of choosing its skills.
    pub fn record_skill_selection(&self, selection: &SkillSelection) {
        self.skill_selections
            .with_label_values(&[selection.label()])
            .inc();
    }

    /// Counts what one request's unpinned skills needed ([`UnpinnedPrepared`]).
    pub fn record_unpinned_skills(&self, prepared: &UnpinnedPrepared) {
        for (outcome, count) in [
            ("cached", prepared.cached),
            ("prefilled", prepared.prefilled),
            ("failed", prepared.failed),
            ("skipped", prepared.skipped),
        ] {
            if count > 0 {
                self.unpinned_skills
                    .with_label_values(&[outcome])
                    .inc_by(count as u64);
            }
        }
    }

    /// Counts one finished generation's tokens and latencies.
    pub fn record_generation(&self, usage: &TokenUsage, e2e: Duration, ttft: Option<Duration>) {
        self.prompt_tokens.inc_by(usage.prompt as u64);
        self.completion_tokens.inc_by(usage.completion as u64);
        self.cached_tokens.inc_by(usage.cached as u64);
        self.e2e.observe(e2e.as_secs_f64());
        if let Some(ttft) = ttft
            && usage.completion > 1
        {
            let per_token =
                (e2e.saturating_sub(ttft)).as_secs_f64() / (usage.completion - 1) as f64;
            self.tpot.observe(per_token);
        }
    }

    /// Refreshes the scrape-time gauges.
    fn refresh(
        &self,
        stats: Option<EngineStats>,
        skills: &[SkillState],
        gpu_present: bool,
        gpus: &[GpuSample],
    ) {
        self.skills.refresh(skills);
        if let Some(stats) = stats {
            for (state, blocks) in [
                ("total", stats.kv.total),
                ("free", stats.kv.free),
                ("cached", stats.kv.cached),
                ("pinned", stats.kv.pinned),
                ("used", stats.kv.used),
            ] {
                self.kv_blocks
                    .with_label_values(&[state])
                    .set(blocks as i64);
            }
            self.running.set(stats.running as i64);
            self.waiting.set(stats.waiting as i64);
            // The engine counts since it started; the counter catches up to it.
            self.preemptions
                .inc_by(stats.preemptions.saturating_sub(self.preemptions.get()));
        }
        let prompt = self.prompt_tokens.get();
        if prompt > 0 {
            self.hit_ratio
                .set(self.cached_tokens.get() as f64 / prompt as f64);
        }
        self.gpu_present
            .set(i64::from(gpu_present && !gpus.is_empty()));
        for gpu in gpus {
            let label = gpu.index.to_string();
            let labels = [label.as_str()];
            self.gpu_memory_used
                .with_label_values(&labels)
                .set(gpu.memory_used_bytes as f64);
            self.gpu_memory_total
                .with_label_values(&labels)
                .set(gpu.memory_total_bytes as f64);
            self.gpu_utilization
                .with_label_values(&labels)
                .set(f64::from(gpu.utilization_percent) / 100.0);
            let optional = [
                (
                    &self.gpu_temperature,
                    gpu.temperature_celsius.map(f64::from),
                ),
                (
                    &self.gpu_power,
                    gpu.power_milliwatts.map(|mw| f64::from(mw) / 1000.0),
                ),
                (
                    &self.gpu_ecc_errors,
                    gpu.uncorrected_ecc_errors.map(|n| n as f64),
                ),
                (&self.gpu_xid_errors, gpu.xid_errors.map(|n| n as f64)),
            ];
            for (gauge, value) in optional {
                if let Some(value) = value {
                    gauge.with_label_values(&labels).set(value);
                }
            }
        }
    }

    /// The text exposition of every metric.
    fn render(&self) -> Result<String, RegisterMetricsError> {
        let mut buffer = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buffer)?;
        Ok(String::from_utf8_lossy(&buffer).into_owned())
    }
}

/// A generation's token counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenUsage {
    /// Prompt tokens.
    pub prompt: usize,
    /// Generated tokens.
    pub completion: usize,
    /// Prompt tokens served from the prefix cache.
    pub cached: usize,
}

/// Middleware: counts every response by matched route and status.
pub async fn count_requests(
    State(metrics): State<Arc<Metrics>>,
    request: Request,
    next: Next,
) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |path| path.as_str().to_string());
    let response = next.run(request).await;
    metrics
        .requests
        .with_label_values(&[route.as_str(), response.status().as_str()])
        .inc();
    response
}

/// `GET /metrics`.
pub async fn render(State(state): State<AppState>) -> Response {
    let (stats, skills) = match state.serving() {
        Ok(serving) => (serving.engine.stats().await, serving.skills.snapshot()),
        Err(_) => (None, Vec::new()),
    };
    let gpu = state.gpu.clone();
    let gpus = tokio::task::spawn_blocking(move || gpu.sample())
        .await
        .unwrap_or_default();
    state
        .metrics
        .refresh(stats, &skills, state.gpu.present(), &gpus);
    match state.metrics.render() {
        Ok(text) => ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], text).into_response(),
        Err(error) => ApiError::Internal {
            message: error.to_string(),
        }
        .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preemptions_follow_the_engine_count_and_never_go_back() {
        let metrics = Metrics::new().expect("registers");
        let stats = |preemptions| EngineStats {
            preemptions,
            ..EngineStats::default()
        };
        for (engine, exported) in [(0, 0), (3, 3), (3, 3), (7, 7)] {
            metrics.refresh(Some(stats(engine)), &[], false, &[]);
            let text = metrics.render().expect("renders");
            assert!(
                text.contains(&format!("\nskillkv_preemptions_total {exported}\n")),
                "{text}"
            );
        }
    }

    #[test]
    fn gpu_figures_appear_only_with_a_gpu() {
        let metrics = Metrics::new().expect("registers");
        metrics.refresh(None, &[], false, &[]);
        let text = metrics.render().expect("renders");
        assert!(text.contains("skillkv_gpu_present 0"));
        assert!(!text.contains("skillkv_gpu_temperature_celsius{"));
        let gpu = GpuSample {
            index: 0,
            memory_used_bytes: 1024,
            memory_total_bytes: 4096,
            utilization_percent: 50,
            temperature_celsius: Some(61),
            power_milliwatts: Some(250_000),
            uncorrected_ecc_errors: None,
            xid_errors: Some(0),
        };
        metrics.refresh(None, &[], true, &[gpu]);
        let text = metrics.render().expect("renders");
        assert!(text.contains("skillkv_gpu_present 1"));
        assert!(text.contains("skillkv_gpu_utilization_ratio{gpu=\"0\"} 0.5"));
        assert!(text.contains("skillkv_gpu_temperature_celsius{gpu=\"0\"} 61"));
        assert!(text.contains("skillkv_gpu_power_watts{gpu=\"0\"} 250"));
        assert!(!text.contains("skillkv_gpu_uncorrected_ecc_errors{"));
        assert!(text.contains("skillkv_gpu_xid_errors{gpu=\"0\"} 0"));
    }

    #[test]
    fn hit_ratio_is_cached_over_prompt_tokens() {
        let metrics = Metrics::new().expect("registers");
        let usage = TokenUsage {
            prompt: 40,
            completion: 3,
            cached: 10,
        };
        metrics.record_generation(
            &usage,
            Duration::from_millis(30),
            Some(Duration::from_millis(10)),
        );
        metrics.refresh(None, &[], false, &[]);
        let text = metrics.render().expect("renders");
        assert!(text.contains("skillkv_prefix_cache_hit_ratio 0.25"));
        assert!(text.contains("skillkv_time_per_output_token_seconds_count 1"));
    }
}
