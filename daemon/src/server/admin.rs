//! The admin API on its own port, behind the admin bearer token: `PUT /admin/v1/desired` (the
//! controller's full desired set of skills and adapters), `GET /admin/v1/state` (model, digests,
//! KV budget, load, skills, adapters) and `GET /admin/v1/events` (SSE: the current skills and
//! adapters first, then skill and adapter state changes, prefix blocks stored/evicted from the
//! engine's cache events, and periodic load figures).

use axum::body::Bytes;
use axum::extract::State;
use axum::http::Uri;
use axum::middleware::{from_fn, from_fn_with_state};
use axum::response::Response;
use axum::routing::{get, put};
use axum::{Json, Router};
use skillkv_api::admin::{
    AdminEvent, DESIRED_PATH, DaemonState, DesiredState, DesiredStateApplied, EVENTS_PATH,
    KvBudget, KvPoolSizing, LoadFigures, STATE_PATH,
};
use skillkv_api::block_hash::BLOCK_TOKENS;
use tokio::sync::broadcast;

use crate::engine::radix::CacheEvent;
use crate::engine::{EngineHandle, EngineStats};
use crate::server::auth::{self, KeySet};
use crate::server::errors::ApiError;
use crate::server::openai::sse::event_stream;
use crate::server::openai::types::ApiJson;
use crate::server::{AppState, request_id};

/// The admin router; every route needs the admin token.
pub fn router(state: AppState) -> Router {
    let keys = KeySet::new(state.config.admin_token.as_deref());
    Router::new()
        .route(STATE_PATH, get(daemon_state))
        .route(DESIRED_PATH, put(apply_desired))
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
    let skills = serving.skills.config();
    Ok(Json(DaemonState {
        daemon_version: env!("CARGO_PKG_VERSION").to_string(),
        model: serving.info.clone(),
        kv_budget: KvBudget {
            block_tokens: BLOCK_TOKENS,
            total_blocks: stats.kv.total,
            pinned_budget_blocks: skills.pinned_budget_blocks,
            kv_bytes_per_token: skills.kv_bytes_per_token,
            sized_from: serving
                .kv_cache_memory
                .map_or(KvPoolSizing::Configured, |memory| memory.source),
            memory_available_bytes: serving.kv_cache_memory.map(|memory| memory.bytes),
        },
        load: load_figures(&stats),
        desired_generation: serving.desired.generation(),
        skills: serving.skills.snapshot(),
        adapters: serving.desired.adapters(),
        device: Some(serving.device.clone()),
    }))
}

/// `PUT /admin/v1/desired`: 200 with the applied generation (and whether anything changed),
/// 409 for a stale or conflicting generation, 400 for an invalid skill.
async fn apply_desired(
    State(state): State<AppState>,
    ApiJson(desired): ApiJson<DesiredState>,
) -> Result<Json<DesiredStateApplied>, ApiError> {
    let serving = state.serving()?;
    Ok(Json(serving.desired.apply(desired)?))
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
    backlog: std::collections::VecDeque<AdminEvent>,
    cache_events: broadcast::Receiver<CacheEvent>,
    skill_events: broadcast::Receiver<AdminEvent>,
    adapter_events: broadcast::Receiver<AdminEvent>,
    ticks: tokio::time::Interval,
}

/// A broadcast receive as an event: a lag becomes `EventsMissed`, a closed channel `None`.
fn received<T>(
    result: Result<T, broadcast::error::RecvError>,
    convert: impl FnOnce(T) -> AdminEvent,
) -> Option<AdminEvent> {
    match result {
        Ok(event) => Some(convert(event)),
        Err(broadcast::error::RecvError::Lagged(count)) => Some(AdminEvent::EventsMissed { count }),
        Err(broadcast::error::RecvError::Closed) => None,
    }
}

impl EventSource {
    /// The next event; `None` once the engine is gone.
    async fn next(&mut self) -> Option<AdminEvent> {
        if let Some(event) = self.backlog.pop_front() {
            return Some(event);
        }
        tokio::select! {
            result = self.cache_events.recv() => received(result, admin_event),
            result = self.skill_events.recv() => received(result, |event| event),
            result = self.adapter_events.recv() => received(result, |event| event),
            _ = self.ticks.tick() => self.engine.stats().await.map(|stats| AdminEvent::Load(load_figures(&stats))),
        }
    }
}

/// `GET /admin/v1/events`: starts with every skill's and adapter's state and the current load,
/// then skill and adapter changes and cache events as they happen, and load figures every
/// `load_event_interval`.
async fn events(State(state): State<AppState>) -> Result<Response, ApiError> {
    let serving = state.serving()?;
    let engine = serving.engine.clone();
    // Subscribe before taking the snapshot so that no change falls between the two.
    let skill_events = serving.skills.subscribe();
    let adapter_events = serving.desired.subscribe();
    let backlog = serving
        .skills
        .snapshot()
        .into_iter()
        .map(AdminEvent::SkillState)
        .chain(
            serving
                .desired
                .adapters()
                .into_iter()
                .map(AdminEvent::AdapterState),
        )
        .collect();
    let source = EventSource {
        backlog,
        cache_events: engine.subscribe_cache_events(),
        skill_events,
        adapter_events,
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
