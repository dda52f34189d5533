//! What every reconcile shares: the Kubernetes client, the settings, the daemon admin client,
//! the Event recorder and the metrics.

use std::sync::Arc;
use std::time::Instant;

use kube::Client;
use kube::runtime::events::{Recorder, Reporter};
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

use crate::daemon::DaemonAdmin;
use crate::settings::ControllerSettings;

/// Shared state of the reconcilers.
#[derive(Clone)]
pub struct Context {
    /// The Kubernetes client.
    pub client: Client,
    /// The controller's settings.
    pub settings: Arc<ControllerSettings>,
    /// The daemon admin client.
    pub daemons: Arc<dyn DaemonAdmin>,
    /// Publishes Events on reconciled objects.
    pub recorder: Recorder,
    /// Operator metrics.
    pub metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("settings", &self.settings)
            .field("daemons", &self.daemons)
            .finish_non_exhaustive()
    }
}

impl Context {
    /// A context around `client`.
    pub fn new(
        client: Client,
        settings: ControllerSettings,
        daemons: Arc<dyn DaemonAdmin>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let reporter = Reporter {
            controller: crate::names::FIELD_MANAGER.to_owned(),
            instance: Some(settings.identity.clone()),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            settings: Arc::new(settings),
            daemons,
            metrics,
        }
    }
}

/// Why the metrics could not be registered.
#[derive(Debug, thiserror::Error)]
#[error("registering operator metrics failed: {0}")]
pub struct RegisterMetricsError(#[from] prometheus::Error);

/// Operator metrics: reconciles, errors by reason, and reconcile duration, per controller.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// The registry `/metrics` renders.
    pub registry: Registry,
    reconciles: IntCounterVec,
    errors: IntCounterVec,
    duration: HistogramVec,
}

impl Metrics {
    /// Registers the metrics in a fresh registry.
    pub fn new() -> Result<Self, RegisterMetricsError> {
        let registry = Registry::new();
        let reconciles = IntCounterVec::new(
            Opts::new("skillkv_operator_reconciles_total", "Reconciles started"),
            &["controller"],
        )?;
        let errors = IntCounterVec::new(
            Opts::new(
                "skillkv_operator_reconcile_errors_total",
                "Reconciles that failed, by reason",
            ),
            &["controller", "reason"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "skillkv_operator_reconcile_duration_seconds",
                "Reconcile duration",
            )
            .buckets(vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
            &["controller"],
        )?;
        registry.register(Box::new(reconciles.clone()))?;
        registry.register(Box::new(errors.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        Ok(Self {
            registry,
            reconciles,
            errors,
            duration,
        })
    }

    /// Counts a reconcile of `controller` and times it until the guard drops.
    pub fn start_reconcile(&self, controller: &str) -> ReconcileTimer {
        self.reconciles.with_label_values(&[controller]).inc();
        ReconcileTimer {
            histogram: self.duration.with_label_values(&[controller]),
            started: Instant::now(),
        }
    }

    /// Counts a failed reconcile.
    pub fn reconcile_failed(&self, controller: &str, reason: &str) {
        self.errors.with_label_values(&[controller, reason]).inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let encoder = prometheus::TextEncoder::new();
        if let Err(error) = encoder.encode_utf8(&self.registry.gather(), &mut out) {
            tracing::warn!(%error, "encoding metrics failed");
        }
        out
    }
}

/// Observes a reconcile's duration when dropped.
#[derive(Debug)]
pub struct ReconcileTimer {
    histogram: prometheus::Histogram,
    started: Instant,
}

impl Drop for ReconcileTimer {
    fn drop(&mut self) {
        self.histogram.observe(self.started.elapsed().as_secs_f64());
    }
}
