//! Per-skill Prometheus metrics, refreshed from the registry's snapshot on every scrape:
//! `skillkv_skill_state{skill,state}` (1 for the skill's current state), tokens, KV bytes,
//! last prefill time, and the counters hits, cached prompt tokens and prefill seconds saved.

use prometheus::core::{AtomicF64, AtomicU64, GenericCounterVec};
use prometheus::{GaugeVec, IntGaugeVec, Opts, Registry};
use skillkv_api::admin::SkillState;
use skillkv_api::v1alpha1::PlacementState;

const STATES: [(PlacementState, &str); 5] = [
    (PlacementState::Pending, "Pending"),
    (PlacementState::Prefilling, "Prefilling"),
    (PlacementState::Ready, "Ready"),
    (PlacementState::Failed, "Failed"),
    (PlacementState::Unpinned, "Unpinned"),
];

/// The per-skill metrics.
#[derive(Debug)]
pub struct SkillMetrics {
    state: IntGaugeVec,
    tokens: IntGaugeVec,
    kv_bytes: IntGaugeVec,
    prefill_seconds: GaugeVec,
    hits: GenericCounterVec<AtomicU64>,
    cached_tokens: GenericCounterVec<AtomicU64>,
    seconds_saved: GenericCounterVec<AtomicF64>,
}

impl SkillMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let skill = &["skill"];
        let metrics = Self {
            state: IntGaugeVec::new(
                Opts::new(
                    "skillkv_skill_state",
                    "1 for each skill's current state (Pending, Prefilling, Ready, Failed)",
                ),
                &["skill", "state"],
            )?,
            tokens: IntGaugeVec::new(
                Opts::new(
                    "skillkv_skill_tokens",
                    "Tokens of the skill's prompt segment",
                ),
                skill,
            )?,
            kv_bytes: IntGaugeVec::new(
                Opts::new("skillkv_skill_kv_bytes", "Bytes of KV pinned for the skill"),
                skill,
            )?,
            prefill_seconds: GaugeVec::new(
                Opts::new(
                    "skillkv_skill_prefill_seconds",
                    "How long the skill's serving version took to prefill",
                ),
                skill,
            )?,
            hits: GenericCounterVec::new(
                Opts::new("skillkv_skill_hits_total", "Requests that used the skill"),
                skill,
            )?,
            cached_tokens: GenericCounterVec::new(
                Opts::new(
                    "skillkv_skill_cached_tokens_total",
                    "Prompt tokens of the skill's segment served from cached KV",
                ),
                skill,
            )?,
            seconds_saved: GenericCounterVec::new(
                Opts::new(
                    "skillkv_skill_prefill_seconds_saved_total",
                    "Estimated prefill seconds saved by the skill's cached KV",
                ),
                skill,
            )?,
        };
        registry.register(Box::new(metrics.state.clone()))?;
        registry.register(Box::new(metrics.tokens.clone()))?;
        registry.register(Box::new(metrics.kv_bytes.clone()))?;
        registry.register(Box::new(metrics.prefill_seconds.clone()))?;
        registry.register(Box::new(metrics.hits.clone()))?;
        registry.register(Box::new(metrics.cached_tokens.clone()))?;
        registry.register(Box::new(metrics.seconds_saved.clone()))?;
        Ok(metrics)
    }

    /// Sets every figure from `skills` (the registry's snapshot); skills that are gone lose
    /// their series.
    pub fn refresh(&self, skills: &[SkillState]) {
        self.state.reset();
        self.tokens.reset();
        self.kv_bytes.reset();
        self.prefill_seconds.reset();
        let keep: Vec<&str> = skills.iter().map(|s| s.name.as_str()).collect();
        for skill in skills {
            let name = skill.name.as_str();
            for (state, label) in STATES {
                self.state
                    .with_label_values(&[name, label])
                    .set(i64::from(skill.state == state));
            }
            self.tokens
                .with_label_values(&[name])
                .set(skill.tokens as i64);
            self.kv_bytes
                .with_label_values(&[name])
                .set(skill.kv_bytes as i64);
            if let Some(millis) = skill.prefill_millis {
                self.prefill_seconds
                    .with_label_values(&[name])
                    .set(millis as f64 / 1000.0);
            }
            advance_u64(&self.hits, name, skill.hits);
            advance_u64(&self.cached_tokens, name, skill.cached_tokens);
            let saved = self.seconds_saved.with_label_values(&[name]);
            let delta = skill.prefill_seconds_saved - saved.get();
            if delta >= 0.0 {
                saved.inc_by(delta);
            } else {
                saved.reset();
                saved.inc_by(skill.prefill_seconds_saved);
            }
        }
        drop_missing(&self.hits, &keep);
        drop_missing(&self.cached_tokens, &keep);
        drop_missing(&self.seconds_saved, &keep);
    }
}

/// Moves a counter up to `total` (the registry counts; the counter mirrors it). A smaller total
/// means the skill was removed and re-added: the series restarts.
fn advance_u64(counters: &GenericCounterVec<AtomicU64>, name: &str, total: u64) {
    let counter = counters.with_label_values(&[name]);
    let current = counter.get();
    if total >= current {
        counter.inc_by(total - current);
    } else {
        counter.reset();
        counter.inc_by(total);
    }
}

fn drop_missing<P: prometheus::core::Atomic + 'static>(
    counters: &GenericCounterVec<P>,
    keep: &[&str],
) {
    use prometheus::core::Collector;
    for family in counters.collect() {
        for metric in family.get_metric() {
            let Some(label) = metric.get_label().iter().find(|l| l.name() == "skill") else {
                continue;
            };
            if !keep.contains(&label.value()) {
                let _ = counters.remove_label_values(&[label.value()]);
            }
        }
    }
}
