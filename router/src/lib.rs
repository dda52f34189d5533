//! skillkv's router (`skillkv-operator router`): one OpenAI-compatible endpoint in front of the
//! daemons that sends each request where its KV already is.
//!
//! [`run`] takes a [`RouterConfig`] (built from [`RouterArgs`] by the binary) and serves until
//! SIGTERM/SIGINT: the OpenAI API, the health/metrics port, and one task per daemon following
//! its admin event stream ([`fleet`]). Per request: API key ([`auth`]), body summary
//! ([`request`]), rate limits ([`ratelimit`]), routing decision ([`routing`], pure), then
//! forwarding with retries before the first byte ([`proxy`]) and a pass-through body that
//! settles usage and metrics when it ends ([`observe`]). In a cluster, [`discovery`] keeps the
//! fleet, the API keys and the rate limits current from the Kubernetes API.

pub mod auth;
pub mod client;
pub mod config;
pub mod discovery;
pub mod error;
pub mod fleet;
pub mod metrics;
pub mod observe;
pub mod proxy;
pub mod ratelimit;
pub mod request;
pub mod request_id;
pub mod routing;
pub mod server;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

pub use crate::config::{BackendConfig, DiscoveryConfig, RouterArgs, RouterConfig};
use crate::discovery::{Discovery, DiscoveryTargets, StartDiscoveryError};
use crate::fleet::Fleet;
use crate::fleet::follow::Followers;
use crate::metrics::{RegisterMetricsError, RouterMetrics};
use crate::server::Shared;

/// Why the router stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunRouterError {
    /// A listener could not bind.
    #[error("binding {address} failed")]
    Bind {
        /// The address.
        address: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The metrics could not be registered.
    #[error(transparent)]
    Metrics(#[from] RegisterMetricsError),
    /// A server failed while running.
    #[error("the HTTP server failed")]
    Serve(#[source] std::io::Error),
    /// Kubernetes discovery could not start.
    #[error(transparent)]
    Discovery(#[from] StartDiscoveryError),
}

/// A router whose listeners are bound, before it serves.
#[derive(Debug)]
pub struct BoundRouter {
    api: TcpListener,
    health: TcpListener,
    shared: Arc<Shared>,
    discovery: Option<Discovery>,
}

async fn bind_listener(address: SocketAddr) -> Result<TcpListener, RunRouterError> {
    TcpListener::bind(address)
        .await
        .map_err(|source| RunRouterError::Bind { address, source })
}

impl BoundRouter {
    /// Binds both listeners and sets up the fleet; with `config.discovery`, connects to the
    /// Kubernetes API.
    pub async fn bind(config: RouterConfig) -> Result<Self, RunRouterError> {
        let discovery = match config.discovery.clone() {
            Some(discovery) => Some(Discovery::connect(discovery).await?),
            None => None,
        };
        Self::bind_with(config, discovery).await
    }

    /// Binds both listeners and sets up the fleet, to be kept current by `discovery` (whatever
    /// `config.discovery` says).
    pub async fn bind_with(
        config: RouterConfig,
        discovery: Option<Discovery>,
    ) -> Result<Self, RunRouterError> {
        let api = bind_listener(config.listen).await?;
        let health = bind_listener(config.health_listen).await?;
        tracing::info!(detection = %config.detector.mode(), "skill detection");
        let fleet = Arc::new(Fleet::new(
            config.backends.clone(),
            config.prefix_index_blocks,
            config.detector.clone(),
        ));
        let client = client::upstream_client(config.connect_timeout);
        let metrics = Arc::new(RouterMetrics::new()?);
        Ok(Self {
            api,
            health,
            shared: Arc::new(Shared::new(config, fleet, client, metrics)),
            discovery,
        })
    }

    /// Where the OpenAI API listens.
    pub fn api_addr(&self) -> Option<SocketAddr> {
        self.api.local_addr().ok()
    }

    /// Where health and metrics listen.
    pub fn health_addr(&self) -> Option<SocketAddr> {
        self.health.local_addr().ok()
    }

    /// The fleet state (for tests and embedding).
    pub fn fleet(&self) -> Arc<Fleet> {
        self.shared.fleet.clone()
    }

    /// Serves until `shutdown` resolves, then lets in-flight requests finish within the grace
    /// period.
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), RunRouterError> {
        let shared = self.shared;
        let followers = Arc::new(Followers::new(
            shared.client.clone(),
            shared.config.max_reconnect_backoff,
        ));
        followers.start(&shared.fleet.pods());
        let mut background = JoinSet::new();
        let discovering = self.discovery.is_some();
        if let Some(discovery) = self.discovery {
            background.spawn(discovery.run(DiscoveryTargets {
                fleet: shared.fleet.clone(),
                followers: followers.clone(),
                api_keys: shared.config.api_keys.clone(),
                rate_limiter: shared.config.rate_limiter.clone(),
                metrics: shared.metrics.clone(),
            }));
        }
        tracing::info!(
            api = ?self.api.local_addr().ok(),
            health = ?self.health.local_addr().ok(),
            discovery = if discovering { "kubernetes" } else { "static" },
            backends = shared.fleet.pods().len(),
            api_keys = shared.config.api_keys.len(),
            rate_limit_policies = shared.config.rate_limiter.policy_count(),
            policy = ?shared.config.routing.policy,
            "router listening"
        );
        let (stop_sender, stop) = watch::channel(false);
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop_sender.send(true);
        });
        let stopped = |mut stop: watch::Receiver<bool>| async move {
            let _ = stop.wait_for(|stopped| *stopped).await;
        };
        let api = axum::serve(self.api, server::api_router(shared.clone()))
            .with_graceful_shutdown(stopped(stop.clone()));
        let health = axum::serve(self.health, server::health_router(shared.clone()))
            .with_graceful_shutdown(stopped(stop.clone()));
        let grace = shared.config.shutdown_grace;
        let result = tokio::select! {
            result = async { tokio::try_join!(api.into_future(), health.into_future()) } => {
                result.map(|_| ()).map_err(RunRouterError::Serve)
            }
            () = async { stopped(stop.clone()).await; tokio::time::sleep(grace).await } => {
                tracing::warn!(grace_s = grace.as_secs(), "grace period over; closing remaining connections");
                Ok(())
            }
        };
        background.abort_all();
        followers.stop_all();
        tracing::info!("router stopped");
        result
    }
}

/// Runs the router until SIGTERM or SIGINT.
pub async fn run(config: RouterConfig) -> Result<(), RunRouterError> {
    BoundRouter::bind(config)
        .await?
        .serve(shutdown_signal())
        .await
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; only Ctrl-C stops the router");
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
    tracing::info!("shutdown signal received; draining");
}
