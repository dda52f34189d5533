//! `skillkv-operator controller`: logging, the health and metrics endpoints, leader election
//! with a Lease (kube-lease-manager), and the three controllers (ModelDeployment pools, Skill
//! finalizers, RateLimitPolicies) run while this replica leads.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::core::DeserializeGuard;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, watcher};
use kube::{Api, Client, ResourceExt};
use kube_lease_manager::LeaseManagerBuilder;
use skillkv_api::v1alpha1::{LoRAAdapter, ModelDeployment, RateLimitPolicy, Skill};

use crate::context::{Context, Metrics, RegisterMetricsError};
use crate::daemon::HttpDaemonAdmin;
use crate::settings::ControllerSettings;
use crate::{fleet, names, rate_limit, skill_finalizer};

/// Seconds a Lease is held without renewal before another replica may take it.
const LEASE_SECONDS: u64 = 15;
/// Seconds before expiry the holder renews.
const LEASE_GRACE_SECONDS: u64 = 5;

/// Why the controller stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunControllerError {
    /// No Kubernetes configuration (in-cluster or kubeconfig) could be loaded.
    #[error("connecting to Kubernetes failed: {0}")]
    Connect(#[source] kube::Error),
    /// The metrics could not be registered.
    #[error(transparent)]
    Metrics(#[from] RegisterMetricsError),
    /// The health endpoint could not bind its address.
    #[error("binding {addr} for /healthz and /metrics failed: {source}")]
    BindHealth {
        /// The address.
        addr: std::net::SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The leader-election Lease could not be set up or renewed.
    #[error("leader election failed: {0}")]
    LeaderElection(#[source] kube_lease_manager::LeaseManagerError),
    /// Another replica took the Lease: this one stops so that it restarts as a standby.
    #[error("leadership lost")]
    LeadershipLost,
}

/// What `/readyz` reports: a standby (waiting for the Lease) is ready to take over; the leader
/// is ready once every controller's watch has listed its objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// Not leading: healthy, waiting for the Lease.
    Standby,
    /// Leading, and the controllers' watches have not finished their first list.
    Syncing,
    /// Leading with every watch synced.
    Ready,
}

/// The shared readiness of this replica.
#[derive(Debug, Clone)]
pub struct ReadinessState(Arc<tokio::sync::watch::Sender<Readiness>>);

impl Default for ReadinessState {
    fn default() -> Self {
        Self(Arc::new(tokio::sync::watch::Sender::new(
            Readiness::Standby,
        )))
    }
}

impl ReadinessState {
    /// The current readiness.
    pub fn get(&self) -> Readiness {
        *self.0.borrow()
    }

    /// Moves to `readiness`.
    pub fn set(&self, readiness: Readiness) {
        self.0.send_replace(readiness);
    }
}

/// State of the health endpoints.
#[derive(Debug, Clone)]
struct HealthState {
    metrics: Arc<Metrics>,
    readiness: ReadinessState,
}

/// Initialises `tracing` in the format the settings ask for (`json` or `text`).
pub fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if format == "text" {
        builder.init();
    } else {
        builder.json().init();
    }
}

/// Runs the controller until a termination signal or the loss of leadership.
pub async fn run(settings: ControllerSettings) -> Result<(), RunControllerError> {
    let client = Client::try_default()
        .await
        .map_err(RunControllerError::Connect)?;
    let metrics = Arc::new(Metrics::new()?);
    let listener = tokio::net::TcpListener::bind(settings.metrics_addr)
        .await
        .map_err(|source| RunControllerError::BindHealth {
            addr: settings.metrics_addr,
            source,
        })?;
    tracing::info!(addr = %settings.metrics_addr, "serving /healthz, /readyz and /metrics");
    let readiness = ReadinessState::default();
    let app = health_router(metrics.clone(), readiness.clone());
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            tracing::error!(%error, "health endpoint stopped");
        }
    });

    let daemons = Arc::new(HttpDaemonAdmin::new(settings.daemon_timeout()));
    let lease = LeaseManagerBuilder::new(client.clone(), &settings.lease_name)
        .with_namespace(&settings.namespace)
        .with_identity(&settings.identity)
        .with_duration(LEASE_SECONDS)
        .with_grace(LEASE_GRACE_SECONDS)
        .with_field_manager(names::FIELD_MANAGER)
        .build()
        .await
        .map_err(RunControllerError::LeaderElection)?;
    let (mut leading, lease_task) = lease.watch().await;
    tracing::info!(lease = %settings.lease_name, identity = %settings.identity, "waiting for leadership");
    while !*leading.borrow_and_update() {
        if leading.changed().await.is_err() {
            return Err(lease_failure(lease_task).await);
        }
    }
    tracing::info!(identity = %settings.identity, "leading: starting controllers");

    readiness.set(Readiness::Syncing);
    let ctx = Arc::new(Context::new(client.clone(), settings, daemons, metrics));
    let controllers = run_controllers(client, ctx, readiness);
    tokio::pin!(controllers);
    loop {
        tokio::select! {
            () = &mut controllers => {
                tracing::info!("controllers stopped (signal); releasing the Lease");
                break;
            }
            changed = leading.changed() => {
                if changed.is_err() {
                    return Err(lease_failure(lease_task).await);
                }
                if !*leading.borrow() {
                    tracing::error!("leadership lost; stopping");
                    return Err(RunControllerError::LeadershipLost);
                }
            }
        }
    }
    // Closing the channel makes the lease task release the Lease, so a standby takes over at once.
    drop(leading);
    if tokio::time::timeout(std::time::Duration::from_secs(5), lease_task)
        .await
        .is_err()
    {
        tracing::warn!("releasing the Lease timed out; it expires on its own");
    }
    Ok(())
}

async fn lease_failure(
    task: tokio::task::JoinHandle<
        Result<kube_lease_manager::LeaseManager, kube_lease_manager::LeaseManagerError>,
    >,
) -> RunControllerError {
    match task.await {
        Ok(Err(error)) => RunControllerError::LeaderElection(error),
        _ => RunControllerError::LeadershipLost,
    }
}

/// `/healthz` (alive), `/readyz` (standby, or leading with synced watches) and `/metrics`.
pub fn health_router(metrics: Arc<Metrics>, readiness: ReadinessState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { (StatusCode::OK, "ok") }))
        .route(
            "/readyz",
            get(|State(state): State<HealthState>| async move {
                match state.readiness.get() {
                    Readiness::Standby => (StatusCode::OK, "standby"),
                    Readiness::Syncing => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "leading; watches not yet synced",
                    ),
                    Readiness::Ready => (StatusCode::OK, "ok"),
                }
            }),
        )
        .route(
            "/metrics",
            get(|State(state): State<HealthState>| async move { state.metrics.render() }),
        )
        .with_state(HealthState { metrics, readiness })
}

/// Marks the replica ready once every store has seen its first complete list.
async fn mark_ready_when_synced<A, B, C>(
    readiness: ReadinessState,
    stores: (
        kube::runtime::reflector::Store<A>,
        kube::runtime::reflector::Store<B>,
        kube::runtime::reflector::Store<C>,
    ),
) where
    A: kube::Resource + Clone + 'static,
    A::DynamicType: std::hash::Hash + Eq + Clone,
    B: kube::Resource + Clone + 'static,
    B::DynamicType: std::hash::Hash + Eq + Clone,
    C: kube::Resource + Clone + 'static,
    C::DynamicType: std::hash::Hash + Eq + Clone,
{
    let (a, b, c) = futures::join!(
        stores.0.wait_until_ready(),
        stores.1.wait_until_ready(),
        stores.2.wait_until_ready()
    );
    if a.is_ok() && b.is_ok() && c.is_ok() {
        tracing::info!("watches synced: ready");
        readiness.set(Readiness::Ready);
    }
}

fn model_of<K: ResourceExt>(
    object: &K,
    model: &str,
) -> Option<ObjectRef<DeserializeGuard<ModelDeployment>>> {
    let namespace = object.namespace()?;
    Some(ObjectRef::new(model).within(&namespace))
}

/// The three controllers, until a termination signal; `readiness` turns Ready once their
/// watches have synced.
async fn run_controllers(client: Client, ctx: Arc<Context>, readiness: ReadinessState) {
    let children = watcher::Config::default().labels(&format!(
        "{}={}",
        names::MANAGED_BY_LABEL,
        names::MANAGED_BY
    ));
    let pods = watcher::Config::default().labels(names::MODEL_LABEL);
    let models = Controller::new(
        Api::<DeserializeGuard<ModelDeployment>>::all(client.clone()),
        watcher::Config::default().any_semantic(),
    );
    let skills = Controller::new(
        Api::<DeserializeGuard<Skill>>::all(client.clone()),
        watcher::Config::default().any_semantic(),
    );
    let policies = Controller::new(
        Api::<DeserializeGuard<RateLimitPolicy>>::all(client.clone()),
        watcher::Config::default().any_semantic(),
    );
    let synced = mark_ready_when_synced(
        readiness,
        (models.store(), skills.store(), policies.store()),
    );
    let models = models
        .owns(Api::<Deployment>::all(client.clone()), children.clone())
        .owns(Api::<Service>::all(client.clone()), children)
        .watches(Api::<Pod>::all(client.clone()), pods, |pod| {
            let model = pod.labels().get(names::MODEL_LABEL)?.clone();
            model_of(&pod, &model)
        })
        .watches(
            Api::<DeserializeGuard<Skill>>::all(client.clone()),
            watcher::Config::default(),
            |guard| {
                guard
                    .0
                    .as_ref()
                    .ok()
                    .and_then(|skill| model_of(skill, &skill.spec.model_ref.name))
            },
        )
        .watches(
            Api::<DeserializeGuard<LoRAAdapter>>::all(client.clone()),
            watcher::Config::default(),
            |guard| {
                guard
                    .0
                    .as_ref()
                    .ok()
                    .and_then(|adapter| model_of(adapter, &adapter.spec.model_ref.name))
            },
        )
        .shutdown_on_signal()
        .run(fleet::reconcile, fleet::error_policy, ctx.clone())
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::debug!(%error, "ModelDeployment reconcile error");
            }
        });

    let skills = skills
        .shutdown_on_signal()
        .run(
            skill_finalizer::reconcile,
            skill_finalizer::error_policy,
            ctx.clone(),
        )
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::debug!(%error, "Skill reconcile error");
            }
        });

    let policies = policies
        .shutdown_on_signal()
        .run(rate_limit::reconcile, rate_limit::error_policy, ctx)
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::debug!(%error, "RateLimitPolicy reconcile error");
            }
        });

    // The readiness task finishes early; the controllers run until the signal.
    futures::join!(models, skills, policies, synced);
}

#[cfg(test)]
mod tests {
    use http_body_util::{BodyExt, Empty};
    use hyper::body::Bytes;
    use hyper_util::client::legacy::Client as HttpClient;
    use hyper_util::rt::TokioExecutor;

    use super::*;

    async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
        let client = HttpClient::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
        let uri: http::Uri = format!("http://{addr}{path}").parse().expect("uri");
        let response = client.get(uri).await.expect("the endpoint answers");
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn health_and_metrics_endpoints_answer() {
        let metrics = Arc::new(Metrics::new().expect("metrics register"));
        drop(metrics.start_reconcile("modeldeployment"));
        metrics.reconcile_failed("modeldeployment", "ApplyConflict");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        let readiness = ReadinessState::default();
        let app = health_router(metrics, readiness.clone());
        let server = tokio::spawn(async move { axum::serve(listener, app).await });

        assert_eq!(get(addr, "/healthz").await, (200, "ok".to_owned()));
        assert_eq!(get(addr, "/readyz").await, (200, "standby".to_owned()));
        readiness.set(Readiness::Syncing);
        assert_eq!(get(addr, "/readyz").await.0, 503);
        readiness.set(Readiness::Ready);
        assert_eq!(get(addr, "/readyz").await, (200, "ok".to_owned()));
        let (status, text) = get(addr, "/metrics").await;
        assert_eq!(status, 200);
        for expected in [
            "skillkv_operator_reconciles_total{controller=\"modeldeployment\"} 1",
            "skillkv_operator_reconcile_errors_total{controller=\"modeldeployment\",reason=\"ApplyConflict\"} 1",
            "skillkv_operator_reconcile_duration_seconds_count{controller=\"modeldeployment\"} 1",
        ] {
            assert!(text.contains(expected), "{expected} missing from:\n{text}");
        }
        assert_eq!(get(addr, "/nope").await.0, 404);
        server.abort();
    }

    #[tokio::test]
    async fn readiness_waits_for_every_store() {
        use kube::runtime::reflector::store;
        use kube::runtime::watcher::Event;
        let readiness = ReadinessState::default();
        readiness.set(Readiness::Syncing);
        let (models, mut models_writer) = store::<Service>();
        let (skills, mut skills_writer) = store::<Pod>();
        let (policies, mut policies_writer) = store::<Deployment>();
        let task = tokio::spawn(mark_ready_when_synced(
            readiness.clone(),
            (models, skills, policies),
        ));
        let mut changes = readiness.0.subscribe();
        models_writer.apply_watcher_event(&Event::InitDone);
        skills_writer.apply_watcher_event(&Event::InitDone);
        tokio::task::yield_now().await;
        assert_eq!(readiness.get(), Readiness::Syncing, "one store still lists");
        policies_writer.apply_watcher_event(&Event::InitDone);
        tokio::time::timeout(std::time::Duration::from_secs(5), changes.changed())
            .await
            .expect("ready in time")
            .expect("sender alive");
        assert_eq!(readiness.get(), Readiness::Ready);
        task.await.expect("the readiness task ends");
    }
}
