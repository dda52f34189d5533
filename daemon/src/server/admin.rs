//! The admin API on its own port, behind the admin bearer token: `GET /admin/v1/state` (model,
//! digests, KV budget, load) and `GET /admin/v1/events` (SSE: prefix blocks stored/evicted from
//! the engine's cache events, and periodic load figures).

use axum::body::Bytes;
use axum::extract::State;
use axum::http::Uri;
use axum::middleware::{from_fn, from_fn_with_state};
use axum::response::Response;
use axum::routing::get;
use axum::{Json, Router};
use skillkv_api::admin::{AdminEvent, DaemonState, EVENTS_PATH, KvBudget, LoadFigures, STATE_PATH};
use skillkv_api::block_hash::BLOCK_TOKENS;
use tokio::sync::broadcast;

use crate::engine::radix::CacheEvent;
use crate::engine::{EngineHandle, EngineStats};
use crate::server::auth::{self, KeySet};
use crate::server::errors::ApiError;
use crate::server::openai::sse::event_stream;
use crate::server::{AppState, request_id};

/// The admin router; every route needs the admin token.
pub fn router(state: AppState) -> Router {
    let keys = KeySet::new(state.config.admin_token.as_deref());
    Router::new()
        .route(STATE_PATH, get(daemon_state))
        .route(EVENTS_PATH, get(events))
        .fallback(|uri: Uri| async move {
            ApiError::RouteNotFound {
                path: uri.path().to_string(),
            }
        })
        .layer(from_fn_with_state(keys, auth::require_bearer))
        .layer(from_fn(request_id::assign))
        .with_state(state)
}

fn load_figures(stats: &EngineStats) -> LoadFigures {
    LoadFigures {
        running: stats.running,
        waiting: stats.waiting,
        free_blocks: stats.kv.free,
        cached_blocks: stats.kv.cached,
        pinned_blocks: stats.kv.pinned,
        used_blocks: stats.kv.used,
    }
}

async fn current_stats(engine: &EngineHandle) -> Result<EngineStats, ApiError> {
    engine.stats().await.ok_or_else(|| ApiError::Unavailable {
        reason: "the engine is not running".to_string(),
    })
}

/// `GET /admin/v1/state`.
async fn daemon_state(State(state): State<AppState>) -> Result<Json<DaemonState>, ApiError> {
    let serving = state.serving()?;
    let stats = current_stats(&serving.engine).await?;
    Ok(Json(DaemonState {
        daemon_version: env!("CARGO_PKG_VERSION").to_string(),
        model: serving.info.clone(),
        kv_budget: KvBudget {
            block_tokens: BLOCK_TOKENS,
            total_blocks: stats.kv.total,
        },
        load: load_figures(&stats),
    }))
}

fn event_frame(event: &AdminEvent) -> Bytes {
    let data = serde_json::to_string(event).unwrap_or_else(|_| "{}".to_string());
    Bytes::from(format!("event: {}\ndata: {data}\n\n", event.name()))
}

fn admin_event(event: CacheEvent) -> AdminEvent {
    match event {
        CacheEvent::BlockStored { hash, parent } => AdminEvent::BlockStored { hash, parent },
        CacheEvent::BlockEvicted { hash } => AdminEvent::BlockEvicted { hash },
    }
}

struct EventSource {
    engine: EngineHandle,
    cache_events: broadcast::Receiver<CacheEvent>,
    ticks: tokio::time::Interval,
}

impl EventSource {
    /// The next event; `None` once the engine is gone.
    async fn next(&mut self) -> Option<AdminEvent> {
        tokio::select! {
            received = self.cache_events.recv() => match received {
                Ok(event) => Some(admin_event(event)),
                Err(broadcast::error::RecvError::Lagged(count)) => Some(AdminEvent::EventsMissed { count }),
                Err(broadcast::error::RecvError::Closed) => None,
            },
            _ = self.ticks.tick() => self.engine.stats().await.map(|stats| AdminEvent::Load(load_figures(&stats))),
        }
    }
}

/// `GET /admin/v1/events`: starts with the current load, then cache events as they happen and
/// load figures every `load_event_interval`.
async fn events(State(state): State<AppState>) -> Result<Response, ApiError> {
    let engine = state.serving()?.engine.clone();
    let source = EventSource {
        cache_events: engine.subscribe_cache_events(),
        ticks: tokio::time::interval(state.config.load_event_interval),
        engine,
    };
    let frames = futures::stream::unfold(source, |mut source| async move {
        let event = source.next().await?;
        Some((
            Ok::<_, std::convert::Infallible>(event_frame(&event)),
            source,
        ))
    });
    Ok(event_stream(frames))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_frames_name_the_event() {
        let frame = event_frame(&AdminEvent::Load(LoadFigures::default()));
        let text = std::str::from_utf8(&frame).expect("utf-8");
        assert!(text.starts_with("event: load\ndata: {\"type\":\"load\""));
        assert!(text.ends_with("}\n\n"));
    }
}
