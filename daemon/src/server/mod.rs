//! `skillkv serve`: the public HTTP server (OpenAI API, `/healthz`, `/readyz`, `/metrics`) and
//! the admin server on its own port, their shared state, and graceful shutdown.
//!
//! The listeners bind first; the model loads in the background and `/readyz` turns 200 once the
//! engine runs. On SIGTERM/SIGINT both servers stop accepting, in-flight requests get
//! `shutdown_grace` to finish, then the engine shuts down.

pub mod admin;
pub mod auth;
pub mod config;
pub mod errors;
pub mod metrics;
pub mod openai;
pub mod request_id;
pub mod serving;
pub mod skill_metrics;

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, Uri};
use axum::middleware::{from_fn, from_fn_with_state};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::sync::watch;

use self::auth::KeySet;
pub use self::config::ServeConfig;
use self::errors::ApiError;
use self::metrics::{Metrics, RegisterMetricsError};
use self::serving::{LoadServingError, Serving};
use crate::skills::{LoadSkillDirError, SkillUpdate, load_skill_dir};
use crate::telemetry::GpuTelemetry;

/// State every handler shares.
#[derive(Debug, Clone)]
pub struct AppState {
    /// The settings.
    pub config: Arc<ServeConfig>,
    serving: Arc<OnceLock<Serving>>,
    /// The metrics.
    pub metrics: Arc<Metrics>,
    /// GPU telemetry.
    pub gpu: Arc<GpuTelemetry>,
}

impl AppState {
    /// The loaded model, or 503 while it loads.
    pub fn serving(&self) -> Result<&Serving, ApiError> {
        self.serving.get().ok_or_else(|| ApiError::Unavailable {
            reason: "the model is loading".to_string(),
        })
    }
}

/// Why `serve` failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A listener could not bind.
    #[error("binding {address} failed")]
    Bind {
        /// The address.
        address: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The metrics registry failed.
    #[error(transparent)]
    Metrics(#[from] RegisterMetricsError),
    /// The model could not be loaded.
    #[error(transparent)]
    Load(#[from] LoadServingError),
    /// The model-loading thread died.
    #[error("the model-loading thread panicked")]
    LoadThread(#[source] tokio::task::JoinError),
    /// The skills folder could not be loaded.
    #[error(transparent)]
    Skills(#[from] LoadSkillDirError),
    /// A server failed while running.
    #[error("the HTTP server failed")]
    Run(#[source] std::io::Error),
}

/// Bound listeners, before serving.
#[derive(Debug)]
pub struct Listeners {
    public: TcpListener,
    admin: Option<TcpListener>,
}

impl Listeners {
    /// Binds the public listener and, with an admin token, the admin one.
    pub async fn bind(config: &ServeConfig) -> Result<Self, ServeError> {
        let bind = |port| async move {
            let address = SocketAddr::new(config.host, port);
            TcpListener::bind(address)
                .await
                .map_err(|source| ServeError::Bind { address, source })
        };
        let public = bind(config.port).await?;
        let admin = match &config.admin_token {
            Some(_) => Some(bind(config.admin_port).await?),
            None => {
                tracing::warn!("no admin token given: the admin API is not served");
                None
            }
        };
        Ok(Self { public, admin })
    }

    /// The address the public listener bound (port 0 resolved to the port it got).
    pub fn public_addr(&self) -> std::io::Result<SocketAddr> {
        self.public.local_addr()
    }

    /// The address of the admin listener, if the admin API is served.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin
            .as_ref()
            .and_then(|listener| listener.local_addr().ok())
    }
}

/// Serves until SIGTERM/SIGINT, then drains within the grace period and stops the engine.
pub async fn serve(config: ServeConfig, listeners: Listeners) -> Result<(), ServeError> {
    let config = Arc::new(config);
    let state = AppState {
        config: config.clone(),
        serving: Arc::new(OnceLock::new()),
        metrics: Arc::new(Metrics::new()?),
        gpu: Arc::new(
            tokio::task::spawn_blocking(GpuTelemetry::init)
                .await
                .unwrap_or_else(|_| GpuTelemetry::absent()),
        ),
    };
    for (name, listener) in [
        ("public", Some(&listeners.public)),
        ("admin", listeners.admin.as_ref()),
    ] {
        if let Some(address) = listener.and_then(|l| l.local_addr().ok()) {
            tracing::info!(listener = name, %address, "listening");
        }
    }
    let (stop_sender, stop) = watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown signal received; draining");
        let _ = stop_sender.send(true);
    });
    let loader = tokio::spawn(load_in_background(state.clone()));

    let public = axum::serve(listeners.public, public_router(state.clone()))
        .with_graceful_shutdown(stopped(stop.clone()));
    let admin = listeners.admin.map(|listener| {
        axum::serve(listener, admin::router(state.clone()))
            .with_graceful_shutdown(stopped(stop.clone()))
    });
    let servers = async {
        match admin {
            Some(admin) => tokio::try_join!(public.into_future(), admin.into_future()).map(|_| ()),
            None => public.await,
        }
    };
    let grace = config.shutdown_grace;
    let result = tokio::select! {
        result = servers => result.map_err(ServeError::Run),
        () = async { stopped(stop.clone()).await; tokio::time::sleep(grace).await } => {
            tracing::warn!(grace_s = grace.as_secs(), "grace period over; closing remaining connections");
            Ok(())
        }
        loaded = loader => match loaded {
            Ok(Err(error)) => Err(error),
            Ok(Ok(())) => Ok(()),
            Err(join) => Err(ServeError::LoadThread(join)),
        },
    };
    if let Some(serving) = state.serving.get() {
        serving.engine.shutdown().await;
    }
    tracing::info!("server stopped");
    result
}

/// Loads the model on a blocking thread and publishes it; an error ends `serve`, success keeps
/// this future pending forever.
async fn load_in_background(state: AppState) -> Result<(), ServeError> {
    let skills = match &state.config.skills_dir {
        Some(dir) => load_skill_dir(dir)?,
        None => Default::default(),
    };
    let path = state.config.model_path.clone();
    let engine = state.config.engine.clone();
    let settings = state.config.skills.clone();
    let model = state.config.model;
    let serving =
        tokio::task::spawn_blocking(move || Serving::load_with(&path, engine, &settings, model))
            .await
            .map_err(ServeError::LoadThread)??;
    if !skills.is_empty() {
        tracing::info!(
            skills = skills.len(),
            "prefilling skills from the skills folder"
        );
    }
    let assembly = state.config.skills.folder_assembly;
    serving.skills.upsert(
        skills
            .into_iter()
            .map(|(name, document)| SkillUpdate::from_folder(name, document, assembly))
            .collect(),
    );
    let _ = state.serving.set(serving);
    std::future::pending().await
}

/// Resolves once `stop` turns true.
async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

async fn wait_for_signal() {
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
                tracing::warn!(%error, "cannot listen for SIGTERM; only Ctrl-C stops the server");
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// The public router.
pub fn public_router(state: AppState) -> Router {
    let keys = KeySet::new(state.config.api_keys.iter().map(String::as_str));
    Router::new()
        .merge(openai::router().route_layer(from_fn_with_state(keys, auth::require_bearer)))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics::render))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes))
        .layer(from_fn_with_state(
            state.metrics.clone(),
            metrics::count_requests,
        ))
        .layer(from_fn(request_id::assign))
        .with_state(state)
}

/// `GET /readyz`: 200 once the model is loaded and no skill is still Pending or Prefilling.
async fn ready(State(state): State<AppState>) -> impl IntoResponse {
    match state.serving() {
        Ok(serving) if serving.skills.all_settled() => (StatusCode::OK, "ready").into_response(),
        Ok(_) => ApiError::Unavailable {
            reason: "skills are still prefilling".to_string(),
        }
        .into_response(),
        Err(error) => error.into_response(),
    }
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::RouteNotFound {
        path: uri.path().to_string(),
    }
}
