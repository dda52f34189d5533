//! Prometheus metrics of the router (`skillkv_router_*`): requests by model, pool, pod and
//! status; routing decisions by reason; retries; rate-limit rejections; end-to-end latency and
//! router overhead; in-cluster discovery's errors and membership changes; and, refreshed on
//! each scrape, the number of backends and every backend's health and in-flight count.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::fleet::Fleet;

/// Why the metrics could not be registered.
#[derive(Debug, thiserror::Error)]
#[error("registering the router's metrics failed")]
pub struct RegisterMetricsError(#[from] prometheus::Error);

/// Every metric of the router.
#[derive(Debug)]
pub struct RouterMetrics {
    registry: Registry,
    /// Requests by model, pool, pod and status.
    pub requests: IntCounterVec,
    /// Routing decisions by reason.
    pub decisions: IntCounterVec,
    /// Attempts moved to another pod, by cause.
    pub retries: IntCounterVec,
    /// Requests refused by a rate limit, by limit.
    pub rate_limited: IntCounterVec,
    /// Time from the request's arrival to the end of the response body.
    pub latency: HistogramVec,
    /// Time the router spends before it sends the request to a daemon.
    pub overhead: Histogram,
    /// Errors of in-cluster discovery, by resource (watch failures, unusable objects).
    pub discovery_errors: IntCounterVec,
    /// Backends that joined or left the fleet, by change (`added`, `removed`).
    pub membership_changes: IntCounterVec,
    /// The router replicas the rate limits are split across.
    pub rate_limit_replicas: IntGauge,
    backends: IntGauge,
    backend_healthy: IntGaugeVec,
    backend_in_flight: IntGaugeVec,
    backend_prefix_blocks: IntGaugeVec,
}

impl RouterMetrics {
    /// Registers every metric in a fresh registry.
    pub fn new() -> Result<Self, RegisterMetricsError> {
        let latency_buckets = vec![
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
        ];
        let overhead_buckets = vec![
            0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1,
        ];
        let metrics = Self {
            registry: Registry::new(),
            requests: IntCounterVec::new(
                Opts::new(
                    "skillkv_router_requests_total",
                    "Requests forwarded, by model, pool, pod and status",
                ),
                &["model", "pool", "pod", "status"],
            )?,
            decisions: IntCounterVec::new(
                Opts::new(
                    "skillkv_router_routing_decisions_total",
                    "Routing decisions by reason (skill-hit, prefix-hit, load, hash, round-robin, fallback)",
                ),
                &["reason"],
            )?,
            retries: IntCounterVec::new(
                Opts::new(
                    "skillkv_router_retries_total",
                    "Requests moved to another pod before the first byte, by cause",
                ),
                &["cause"],
            )?,
            rate_limited: IntCounterVec::new(
                Opts::new(
                    "skillkv_router_rate_limited_total",
                    "Requests refused with 429, by limit (requests, tokens, concurrency)",
                ),
                &["limit"],
            )?,
            latency: HistogramVec::new(
                HistogramOpts::new(
                    "skillkv_router_request_duration_seconds",
                    "Request latency through the router, to the end of the response",
                )
                .buckets(latency_buckets),
                &["model"],
            )?,
            overhead: Histogram::with_opts(
                HistogramOpts::new(
                    "skillkv_router_overhead_seconds",
                    "Router time before the request is sent to a daemon (auth, limits, routing)",
                )
                .buckets(overhead_buckets),
            )?,
            discovery_errors: IntCounterVec::new(
                Opts::new(
                    "skillkv_router_discovery_errors_total",
                    "In-cluster discovery errors, by resource (watch failures and skipped objects)",
                ),
                &["resource"],
            )?,
            membership_changes: IntCounterVec::new(
                Opts::new(
                    "skillkv_router_backend_changes_total",
                    "Backends that joined (added) or left (removed) the fleet",
                ),
                &["change"],
            )?,
            rate_limit_replicas: IntGauge::new(
                "skillkv_router_rate_limit_replicas",
                "Router replicas the rate limits are split across",
            )?,
            backends: IntGauge::new(
                "skillkv_router_backends",
                "Backends in the fleet (given with --backend, or discovered in the cluster)",
            )?,
            backend_healthy: IntGaugeVec::new(
                Opts::new(
                    "skillkv_router_backend_healthy",
                    "1 when the backend is reachable and its event stream is up",
                ),
                &["pod"],
            )?,
            backend_in_flight: IntGaugeVec::new(
                Opts::new(
                    "skillkv_router_backend_in_flight",
                    "Requests in flight from this router on the backend",
                ),
                &["pod"],
            )?,
            backend_prefix_blocks: IntGaugeVec::new(
                Opts::new(
                    "skillkv_router_backend_prefix_blocks",
                    "Prefix blocks the router's index holds for the backend",
                ),
                &["pod"],
            )?,
        };
        for collector in [
            Box::new(metrics.requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(metrics.decisions.clone()),
            Box::new(metrics.retries.clone()),
            Box::new(metrics.rate_limited.clone()),
            Box::new(metrics.latency.clone()),
            Box::new(metrics.overhead.clone()),
            Box::new(metrics.discovery_errors.clone()),
            Box::new(metrics.membership_changes.clone()),
            Box::new(metrics.rate_limit_replicas.clone()),
            Box::new(metrics.backends.clone()),
            Box::new(metrics.backend_healthy.clone()),
            Box::new(metrics.backend_in_flight.clone()),
            Box::new(metrics.backend_prefix_blocks.clone()),
        ] {
            metrics.registry.register(collector)?;
        }
        Ok(metrics)
    }

    /// The Prometheus text exposition, with backend gauges refreshed from `fleet`.
    pub fn render(&self, fleet: &Fleet) -> String {
        let now = std::time::Instant::now();
        let pods = fleet.pods();
        self.backends.set(pods.len() as i64);
        // Pods that left the fleet lose their series.
        self.backend_healthy.reset();
        self.backend_in_flight.reset();
        self.backend_prefix_blocks.reset();
        for pod in pods.iter() {
            let name = pod.backend.name.as_str();
            self.backend_healthy
                .with_label_values(&[name])
                .set(i64::from(pod.is_healthy(now)));
            self.backend_in_flight
                .with_label_values(&[name])
                .set(pod.in_flight() as i64);
            self.backend_prefix_blocks
                .with_label_values(&[name])
                .set(pod.state().prefix.len() as i64);
        }
        let mut buffer = Vec::new();
        if let Err(error) = TextEncoder::new().encode(&self.registry.gather(), &mut buffer) {
            tracing::error!(%error, "encoding metrics failed");
        }
        String::from_utf8_lossy(&buffer).into_owned()
    }
}
