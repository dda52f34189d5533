//! In-cluster discovery (`--discovery kubernetes`): the router follows the cluster instead of
//! flags and files.
//!
//! - ModelDeployments, their headless Services' EndpointSlices and their admin-token Secrets →
//!   the fleet's backends ([`backends::desired_backends`]): ready endpoints join, endpoints that
//!   go away leave, and each member's admin event stream is followed with its pool's token.
//! - LoRAAdapters → adapter ids served by their base model ([`backends::declared_adapters`]),
//!   listed in `/v1/models`.
//! - Secrets matching the API-key selector → the API keys ([`keys::key_entries`]), replaced as
//!   a whole.
//! - RateLimitPolicies → the enforced limits ([`policies::enforced_policies`]), split across
//!   the ready endpoints of the router's own Service ([`policies::ready_replicas`]) or
//!   `--replicas`.
//!
//! Every decision is a pure function of the objects; [`watch`] keeps the object stores and
//! wakes one sync loop per concern when its inputs change.

pub mod backends;
pub mod keys;
pub mod names;
pub mod policies;
pub mod watch;

use std::sync::Arc;
use std::time::Instant;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Client;
use kube::core::DeserializeGuard;
use kube::runtime::reflector::Store;
use skillkv_api::v1alpha1::{LoRAAdapter, ModelDeployment, RateLimitPolicy};
use tokio::task::JoinSet;

use self::watch::{Trigger, api, decoded, objects, reflect};
use crate::auth::ApiKeys;
use crate::config::{BackendConfig, DiscoveryConfig};
use crate::fleet::Fleet;
use crate::fleet::follow::Followers;
use crate::metrics::RouterMetrics;
use crate::ratelimit::RateLimiter;

/// Why discovery could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartDiscoveryError {
    /// No Kubernetes client configuration (in-cluster or kubeconfig) was usable.
    #[error("cannot reach the Kubernetes API (no in-cluster config or kubeconfig)")]
    Client(#[source] kube::Error),
}

/// A Kubernetes client and what to watch with it.
#[derive(Clone)]
pub struct Discovery {
    client: Client,
    config: DiscoveryConfig,
}

impl std::fmt::Debug for Discovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Discovery")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// What discovery updates: the router's shared state.
#[derive(Debug, Clone)]
pub struct DiscoveryTargets {
    /// The fleet whose membership and declared adapters it sets.
    pub fleet: Arc<Fleet>,
    /// The follow tasks of the fleet's members.
    pub followers: Arc<Followers>,
    /// The API keys it replaces.
    pub api_keys: ApiKeys,
    /// The rate limiter whose policies it replaces.
    pub rate_limiter: RateLimiter,
    /// Where it counts errors and changes.
    pub metrics: Arc<RouterMetrics>,
}

struct PoolStores {
    models: Store<DeserializeGuard<ModelDeployment>>,
    slices: Store<EndpointSlice>,
    tokens: Store<Secret>,
    adapters: Store<DeserializeGuard<LoRAAdapter>>,
}

impl Discovery {
    /// Connects with the in-cluster configuration (or the local kubeconfig).
    pub async fn connect(config: DiscoveryConfig) -> Result<Self, StartDiscoveryError> {
        let client = Client::try_default()
            .await
            .map_err(StartDiscoveryError::Client)?;
        Ok(Self::with_client(client, config))
    }

    /// Discovery through `client` (a mocked API service in tests).
    pub fn with_client(client: Client, config: DiscoveryConfig) -> Self {
        Self { client, config }
    }

    /// What it watches.
    pub fn config(&self) -> &DiscoveryConfig {
        &self.config
    }

    /// Watches the cluster and keeps `targets` current until aborted.
    pub async fn run(self, targets: DiscoveryTargets) {
        let Self { client, config } = self;
        let namespace = config.namespace.as_deref();
        let metrics = targets.metrics.clone();
        let mut tasks = JoinSet::new();
        tracing::info!(namespace = namespace.unwrap_or("<all>"), api_keys = ?config.api_key_selector, rate_limits = config.watch_rate_limits, router_service = ?config.router_service, "discovering backends in the cluster");

        let children_selector = names::daemon_children_selector();
        let (pool_changed, pool_rx) = Trigger::new();
        let triggers = || vec![pool_changed.clone()];
        let (models, task) = reflect(
            api(&client, namespace),
            None,
            "modeldeployments",
            triggers(),
            metrics.clone(),
        );
        tasks.spawn(task);
        let (slices, task) = reflect(
            api(&client, namespace),
            Some(&children_selector),
            "endpointslices",
            triggers(),
            metrics.clone(),
        );
        tasks.spawn(task);
        let (tokens, task) = reflect(
            api(&client, namespace),
            Some(&children_selector),
            "secrets",
            triggers(),
            metrics.clone(),
        );
        tasks.spawn(task);
        let (adapters, task) = reflect(
            api(&client, namespace),
            None,
            "loraadapters",
            triggers(),
            metrics.clone(),
        );
        tasks.spawn(task);
        let stores = PoolStores {
            models,
            slices,
            tokens,
            adapters,
        };
        tasks.spawn(sync_pools(
            stores,
            pool_rx,
            targets.clone(),
            config.fallback_admin_token.clone(),
        ));

        if let Some(selector) = &config.api_key_selector {
            let (changed, rx) = Trigger::new();
            let (secrets, task) = reflect(
                api(&client, namespace),
                Some(selector),
                "secrets",
                vec![changed],
                metrics.clone(),
            );
            tasks.spawn(task);
            tasks.spawn(sync_keys(secrets, rx, targets.clone()));
        }

        if config.watch_rate_limits {
            let (changed, rx) = Trigger::new();
            let (policies, task) = reflect(
                api(&client, namespace),
                None,
                "ratelimitpolicies",
                vec![changed.clone()],
                metrics.clone(),
            );
            tasks.spawn(task);
            let routers = config.router_service.as_ref().map(|(ns, service)| {
                let selector = format!("{}={service}", names::SERVICE_NAME_LABEL);
                let (store, task) = reflect(
                    api(&client, Some(ns)),
                    Some(&selector),
                    "endpointslices",
                    vec![changed.clone()],
                    metrics.clone(),
                );
                tasks.spawn(task);
                store
            });
            tasks.spawn(sync_policies(
                policies,
                routers,
                config.replicas,
                rx,
                targets.clone(),
            ));
        }
        while tasks.join_next().await.is_some() {}
    }
}

/// Counts and logs what a sync skipped, only when it differs from the last time.
fn report_skipped(
    last: &mut Vec<(String, String)>,
    now: Vec<(String, String)>,
    resource: &'static str,
    metrics: &RouterMetrics,
) {
    if *last == now {
        return;
    }
    for (name, problem) in now.iter().filter(|s| !last.contains(s)) {
        metrics
            .discovery_errors
            .with_label_values(&[resource])
            .inc();
        tracing::warn!(resource, name = %name, problem = %problem, "skipping an object");
    }
    *last = now;
}

async fn sync_pools(
    stores: PoolStores,
    mut changed: tokio::sync::watch::Receiver<()>,
    targets: DiscoveryTargets,
    fallback_token: Option<String>,
) {
    let ready = futures::future::try_join4(
        stores.models.wait_until_ready(),
        stores.slices.wait_until_ready(),
        stores.tokens.wait_until_ready(),
        stores.adapters.wait_until_ready(),
    );
    if ready.await.is_err() {
        return;
    }
    let metrics = &targets.metrics;
    loop {
        let models = decoded(&stores.models, "modeldeployments", metrics);
        let tokens = backends::admin_tokens(&objects(&stores.tokens));
        let desired = backends::desired_backends(
            &models,
            &objects(&stores.slices),
            &tokens,
            fallback_token.as_deref(),
        );
        apply_backends(&targets, desired);
        let adapters = decoded(&stores.adapters, "loraadapters", metrics);
        targets
            .fleet
            .set_declared_adapters(backends::declared_adapters(&models, &adapters));
        if changed.changed().await.is_err() {
            return;
        }
    }
}

/// Makes the fleet `desired`, starts and stops follow tasks, and logs each change.
pub fn apply_backends(targets: &DiscoveryTargets, desired: Vec<BackendConfig>) {
    let change = targets.fleet.set_backends(desired);
    if change.is_empty() {
        return;
    }
    let counter = |change: &str| {
        targets
            .metrics
            .membership_changes
            .with_label_values(&[change])
    };
    for pod in &change.removed {
        counter("removed").inc();
        tracing::info!(pod = %pod.backend.name, url = %pod.backend.url, in_flight = pod.in_flight(), "backend removed");
    }
    for pod in &change.added {
        counter("added").inc();
        let backend = &pod.backend;
        tracing::info!(pod = %backend.name, url = %backend.url, admin_url = ?backend.admin_url, admin_token = backend.admin_token.is_some(), "backend added");
        if backend.admin_url.is_some() && backend.admin_token.is_none() {
            tracing::warn!(pod = %backend.name, "no admin token for this pool yet (its admin-token Secret is missing); its event stream will be refused");
        }
    }
    targets.followers.apply(&change);
    tracing::info!(
        backends = targets.fleet.pods().len(),
        added = change.added.len(),
        removed = change.removed.len(),
        "fleet changed"
    );
}

async fn sync_keys(
    secrets: Store<Secret>,
    mut changed: tokio::sync::watch::Receiver<()>,
    targets: DiscoveryTargets,
) {
    if secrets.wait_until_ready().await.is_err() {
        return;
    }
    let mut skipped_before = Vec::new();
    loop {
        let (entries, skipped) = keys::key_entries(&objects(&secrets));
        let skipped = skipped
            .into_iter()
            .map(|s| (s.secret, s.problem.to_string()))
            .collect();
        report_skipped(&mut skipped_before, skipped, "secrets", &targets.metrics);
        let count = entries.len();
        if targets.api_keys.replace(entries) {
            tracing::info!(keys = count, "API keys updated");
        }
        if changed.changed().await.is_err() {
            return;
        }
    }
}

async fn sync_policies(
    policies: Store<DeserializeGuard<RateLimitPolicy>>,
    routers: Option<Store<EndpointSlice>>,
    fixed_replicas: u32,
    mut changed: tokio::sync::watch::Receiver<()>,
    targets: DiscoveryTargets,
) {
    if policies.wait_until_ready().await.is_err() {
        return;
    }
    if let Some(routers) = &routers
        && routers.wait_until_ready().await.is_err()
    {
        return;
    }
    let metrics = &targets.metrics;
    let mut skipped_before = Vec::new();
    loop {
        let replicas = routers.as_ref().map_or(fixed_replicas, |store| {
            policies::ready_replicas(&objects(store))
        });
        metrics.rate_limit_replicas.set(i64::from(replicas));
        let (enforced, skipped) = policies::enforced_policies(
            &decoded(&policies, "ratelimitpolicies", metrics),
            replicas,
        );
        let skipped = skipped.into_iter().map(|s| (s.policy, s.problem)).collect();
        report_skipped(&mut skipped_before, skipped, "ratelimitpolicies", metrics);
        let count = enforced.len();
        if targets.rate_limiter.replace(enforced, Instant::now()) {
            tracing::info!(policies = count, replicas, "rate limits updated");
        }
        if changed.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod mock_tests;
