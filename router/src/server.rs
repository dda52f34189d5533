//! The router's two HTTP servers and their handlers: the OpenAI API (`/v1/chat/completions`,
//! `/v1/completions`, `/v1/models`) and the health port (`/healthz`, `/readyz`, `/metrics`).
//! A generation request is authenticated, read, rate limited, routed and forwarded, in that
//! order; everything before forwarding is the router overhead the metrics measure.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::extract::{Path, Request, State};
use axum::http::{StatusCode, Uri, header};
use axum::middleware::from_fn;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use http_body_util::BodyExt;
use serde_json::{Value, json};

use crate::auth::{Authentication, Caller};
use crate::client::{Upstream, get_request};
use crate::config::RouterConfig;
use crate::error::RouteRequestError;
use crate::fleet::{Fleet, Pod};
use crate::metrics::RouterMetrics;
use crate::proxy::{Dispatch, forward};
use crate::request::{Endpoint, RequestSummary, summarize};
use crate::request_id::{self, RequestId};
use crate::routing::decide;

/// How long `/v1/models` waits for each daemon.
const MODELS_TIMEOUT: Duration = Duration::from_secs(2);

/// Everything the handlers share.
#[derive(Debug)]
pub struct Shared {
    /// The settings.
    pub config: RouterConfig,
    /// The daemons.
    pub fleet: Arc<Fleet>,
    /// The client to them.
    pub client: Upstream,
    /// The metrics.
    pub metrics: Arc<RouterMetrics>,
    turn: AtomicU64,
}

impl Shared {
    /// Shared state over `fleet`.
    pub fn new(
        config: RouterConfig,
        fleet: Arc<Fleet>,
        client: Upstream,
        metrics: Arc<RouterMetrics>,
    ) -> Self {
        Self {
            config,
            fleet,
            client,
            metrics,
            turn: AtomicU64::new(0),
        }
    }
}

type AppState = Arc<Shared>;

/// The OpenAI API.
pub fn api_router(state: AppState) -> Router {
    Router::new()
        .route(
            Endpoint::ChatCompletions.path(),
            post(|s: State<AppState>, r: Request| generate(s, Endpoint::ChatCompletions, r)),
        )
        .route(
            Endpoint::Completions.path(),
            post(|s: State<AppState>, r: Request| generate(s, Endpoint::Completions, r)),
        )
        .route("/v1/models", get(list_models))
        .route("/v1/models/{id}", get(retrieve_model))
        .fallback(|uri: Uri| async move {
            RouteRequestError::RouteNotFound {
                path: uri.path().to_string(),
            }
        })
        .layer(from_fn(request_id::assign))
        .with_state(state)
}

/// Health and metrics.
pub fn health_router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(render_metrics))
        .with_state(state)
}

async fn ready(State(state): State<AppState>) -> Response {
    let now = Instant::now();
    let healthy = state
        .fleet
        .pods()
        .iter()
        .filter(|pod| pod.is_healthy(now))
        .count();
    if healthy > 0 {
        (StatusCode::OK, format!("ready: {healthy} healthy backends")).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "no healthy backend").into_response()
    }
}

async fn render_metrics(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(&state.fleet),
    )
        .into_response()
}

fn authenticate(state: &Shared, request: &Request) -> Result<Caller, RouteRequestError> {
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok());
    match state.config.api_keys.authenticate(authorization) {
        Authentication::Allowed(caller) => Ok(caller),
        Authentication::Denied => Err(RouteRequestError::Unauthorized),
    }
}

/// The skills a request needs: the ones it names, or those detected in its text among the
/// skills of its `pool`.
fn request_skills(fleet: &Fleet, pool: &[Arc<Pod>], summary: &RequestSummary) -> Vec<String> {
    if let Some(skills) = &summary.skills {
        return skills.clone();
    }
    if summary.detection_text.is_empty() {
        return Vec::new();
    }
    let mut names: Vec<String> = fleet
        .detector(pool)
        .detect(&summary.detection_text)
        .into_iter()
        .map(|d| d.name)
        .collect();
    names.sort();
    names
}

async fn generate(State(state): State<AppState>, endpoint: Endpoint, request: Request) -> Response {
    match route_and_forward(&state, endpoint, request).await {
        Ok(response) => response,
        Err(error) => {
            if let RouteRequestError::RateLimited(rejection) = &error {
                state
                    .metrics
                    .rate_limited
                    .with_label_values(&[rejection.kind.as_str()])
                    .inc();
            }
            error.into_response()
        }
    }
}

async fn route_and_forward(
    state: &Shared,
    endpoint: Endpoint,
    request: Request,
) -> Result<Response, RouteRequestError> {
    let started = Instant::now();
    let caller = authenticate(state, &request)?;
    let request_id = request
        .extensions()
        .get::<RequestId>()
        .map(|id| id.0.clone())
        .unwrap_or_default();
    let (parts, body) = request.into_parts();
    let limit = state.config.max_body_bytes;
    let body = axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| RouteRequestError::PayloadTooLarge { limit })?;
    let summary = summarize(endpoint, &body)?;
    let admission = if state.config.rate_limiter.policy_count() > 0 {
        Some(
            state
                .config
                .rate_limiter
                .admit(&caller, &summary.model, started)
                .map_err(RouteRequestError::RateLimited)?,
        )
    } else {
        None
    };
    let pool = state.fleet.pool(&summary.model);
    if pool.is_empty() {
        return Err(RouteRequestError::ModelNotFound {
            model: summary.model,
        });
    }
    let detected = summary.skills.is_none() && endpoint == Endpoint::ChatCompletions;
    let skills = request_skills(&state.fleet, &pool, &summary);
    let candidates =
        state
            .fleet
            .candidates(&pool, &skills, summary.prompt_tokens.as_deref(), started);
    let turn = state.turn.fetch_add(1, Ordering::Relaxed);
    let decision = decide(&candidates, &skills, &state.config.routing, turn).ok_or_else(|| {
        RouteRequestError::ModelNotFound {
            model: summary.model.clone(),
        }
    })?;
    state
        .metrics
        .decisions
        .with_label_values(&[decision.reason.as_str()])
        .inc();
    tracing::debug!(model = %summary.model, ?skills, reason = decision.reason.as_str(), order = ?decision.order, key = ?caller.key_name, "routed");
    forward(
        state,
        Dispatch {
            endpoint,
            headers: parts.headers,
            body,
            request_id,
            model: summary.model,
            skills,
            detected,
            decision,
            admission,
            started,
        },
    )
    .await
}

/// `/v1/models` of one daemon, or nothing if it does not answer in time.
async fn daemon_models(state: &Shared, url: String) -> Option<Vec<Value>> {
    let request = get_request(&url, None).ok()?;
    let fetch = async {
        let response = state.client.request(request).await.ok()?;
        if response.status() != StatusCode::OK {
            return None;
        }
        let body = response.into_body().collect().await.ok()?.to_bytes();
        let list: Value = serde_json::from_slice(&body).ok()?;
        list.get("data").and_then(Value::as_array).cloned()
    };
    tokio::time::timeout(MODELS_TIMEOUT, fetch)
        .await
        .ok()
        .flatten()
}

/// Every model and adapter any daemon serves, once each.
async fn model_union(state: &Shared) -> Result<Vec<Value>, RouteRequestError> {
    let lists = futures::future::join_all(
        state
            .fleet
            .pods()
            .iter()
            .map(|pod| daemon_models(state, format!("{}/v1/models", pod.backend.url))),
    )
    .await;
    if !lists.is_empty() && lists.iter().all(Option::is_none) {
        return Err(RouteRequestError::Unavailable {
            reason: "no backend answered /v1/models".to_string(),
        });
    }
    let mut seen = BTreeSet::new();
    let mut data: Vec<Value> = lists
        .into_iter()
        .flatten()
        .flatten()
        .filter(|model| {
            model
                .get("id")
                .and_then(Value::as_str)
                .is_some_and(|id| seen.insert(id.to_string()))
        })
        .collect();
    data.extend(adapter_models(&seen, &known_adapters(&state.fleet)));
    Ok(data)
}

/// Every adapter the router knows of (served name → base model id): Ready on a pod, or declared
/// by a LoRAAdapter in the cluster.
fn known_adapters(fleet: &Fleet) -> BTreeMap<String, String> {
    let mut adapters = (*fleet.declared_adapters()).clone();
    for pod in fleet.pods().iter() {
        let state = pod.state();
        if let Some(model) = &state.model {
            for adapter in &state.adapters {
                adapters
                    .entry(adapter.clone())
                    .or_insert_with(|| model.id.clone());
            }
        }
    }
    adapters
}

/// `/v1/models` entries of the adapters whose base model is listed (`listed`) and that are not
/// listed themselves; `parent` names the base model.
fn adapter_models(listed: &BTreeSet<String>, adapters: &BTreeMap<String, String>) -> Vec<Value> {
    adapters
        .iter()
        .filter(|(id, base)| listed.contains(*base) && !listed.contains(*id))
        .map(|(id, base)| {
            json!({"id": id, "object": "model", "created": 0, "owned_by": "skillkv", "parent": base})
        })
        .collect()
}

async fn list_models(State(state): State<AppState>) -> Result<Json<Value>, RouteRequestError> {
    let data = model_union(&state).await?;
    Ok(Json(json!({"object": "list", "data": data})))
}

async fn retrieve_model(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, RouteRequestError> {
    model_union(&state)
        .await?
        .into_iter()
        .find(|model| model.get("id").and_then(Value::as_str) == Some(id.as_str()))
        .map(Json)
        .ok_or(RouteRequestError::ModelNotFound { model: id })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adapters_are_listed_under_a_listed_base_model_once() {
        let listed: BTreeSet<String> = ["base".to_string(), "dup".to_string()].into();
        let adapters: BTreeMap<String, String> = [
            ("sql-lora", "base"),
            ("orphan", "missing-base"),
            ("dup", "base"),
        ]
        .into_iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        let entries = adapter_models(&listed, &adapters);
        assert_eq!(
            entries,
            vec![
                json!({"id": "sql-lora", "object": "model", "created": 0, "owned_by": "skillkv", "parent": "base"})
            ]
        );
    }
}
