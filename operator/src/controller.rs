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
    let app = health_router(metrics.clone());
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

    let ctx = Arc::new(Context::new(client.clone(), settings, daemons, metrics));
    let controllers = run_controllers(client, ctx);
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

/// `/healthz` (alive), `/readyz` (serving) and `/metrics`.
pub fn health_router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { (StatusCode::OK, "ok") }))
        .route("/readyz", get(|| async { (StatusCode::OK, "ok") }))
        .route(
            "/metrics",
            get(|State(metrics): State<Arc<Metrics>>| async move { metrics.render() }),
        )
        .with_state(metrics)
}

fn model_of<K: ResourceExt>(
    object: &K,
    model: &str,
) -> Option<ObjectRef<DeserializeGuard<ModelDeployment>>> {
    let namespace = object.namespace()?;
    Some(ObjectRef::new(model).within(&namespace))
}

/// The three controllers, until a termination signal.
async fn run_controllers(client: Client, ctx: Arc<Context>) {
    let children = watcher::Config::default().labels(&format!(
        "{}={}",
        names::MANAGED_BY_LABEL,
        names::MANAGED_BY
    ));
    let pods = watcher::Config::default().labels(names::MODEL_LABEL);
    let models = Controller::new(
        Api::<DeserializeGuard<ModelDeployment>>::all(client.clone()),
        watcher::Config::default().any_semantic(),
    )
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

    let skills = Controller::new(
        Api::<DeserializeGuard<Skill>>::all(client.clone()),
        watcher::Config::default().any_semantic(),
    )
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

    let policies = Controller::new(
        Api::<DeserializeGuard<RateLimitPolicy>>::all(client.clone()),
        watcher::Config::default().any_semantic(),
    )
    .shutdown_on_signal()
    .run(rate_limit::reconcile, rate_limit::error_policy, ctx)
    .for_each(|result| async move {
        if let Err(error) = result {
            tracing::debug!(%error, "RateLimitPolicy reconcile error");
        }
    });

    futures::join!(models, skills, policies);
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
        let server =
            tokio::spawn(async move { axum::serve(listener, health_router(metrics)).await });

        assert_eq!(get(addr, "/healthz").await, (200, "ok".to_owned()));
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
}
