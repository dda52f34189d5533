//! The OpenAI-compatible API under `/v1`: chat completions, completions and models, their
//! request/response types, the generation driver and the SSE wire format.

pub mod chat;
pub mod completions;
pub mod generate;
pub mod models;
pub mod sse;
pub mod types;

use axum::Router;
use axum::routing::{get, post};

use crate::server::AppState;

/// The `/v1` routes.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/chat/completions", post(chat::create))
        .route("/v1/completions", post(completions::create))
        .route("/v1/models", get(models::list))
        .route("/v1/models/{id}", get(models::retrieve))
}
