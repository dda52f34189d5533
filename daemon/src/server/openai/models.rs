//! `GET /v1/models` and `GET /v1/models/{id}`: the base model (adapters come later).

use axum::Json;
use axum::extract::{Path, State};
use serde_json::{Value, json};

use crate::server::AppState;
use crate::server::errors::ApiError;

fn model_json(id: &str) -> Value {
    json!({"id": id, "object": "model", "created": 0, "owned_by": "skillkv"})
}

/// `GET /v1/models`.
pub async fn list(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let serving = state.serving()?;
    Ok(Json(
        json!({"object": "list", "data": [model_json(&serving.info.id)]}),
    ))
}

/// `GET /v1/models/{id}`.
pub async fn retrieve(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let serving = state.serving()?;
    if id == serving.info.id {
        Ok(Json(model_json(&id)))
    } else {
        Err(ApiError::ModelNotFound { model: id })
    }
}
